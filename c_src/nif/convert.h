/* Conversion between Erlang terms and the core's C values. */
#ifndef DX_CONVERT_H
#define DX_CONVERT_H
#include "atoms.h"
#include "store.h"
#include "value.h"

#define DX_STACK_NUMS 64
#define DX_STACK_STRS 32
#define DX_ATOM_TEXT 256

/* Scratch space behind a dx_raw: small inputs stay on the stack. */
typedef struct {
    dx_raw raw;
    int too_big; /* the input is larger than the value size limit */
    double nums_stack[DX_STACK_NUMS];
    int64_t shape_stack[DX_MAX_TENSOR_DIMS];
    dx_str strs_stack[DX_STACK_STRS];
    double *nums_heap;
    dx_str *strs_heap;
    char *atoms_heap; /* text of atoms in a string list */
    char atom_text[DX_ATOM_TEXT];
} dx_rawbuf;

/* Fills b->raw from any term; returns 0, or -1 when out of memory (then b
 * holds nothing; dx_rawbuf_free is idempotent either way). */
int dx_term_to_raw(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b, size_t max_bytes);
void dx_rawbuf_free(dx_rawbuf *b);
/* Test hook: heap blocks held by dx_rawbufs now; fail_nth >= 0 makes the
 * fail_nth-th next one fail to allocate (0: none). */
long dx_rawbuf_debug(long fail_nth);
/* A list of at most `limit` cells? (bounded walk, for the dirty-scheduler decision) */
int dx_list_longer_than(ErlNifEnv *env, ERL_NIF_TERM t, size_t limit);

/* Names and ids: a binary, or an atom (its text, written to buf). */
int dx_get_name(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *out, char *buf, size_t buflen);

ERL_NIF_TERM dx_make_bin(ErlNifEnv *env, const char *p, size_t len);
ERL_NIF_TERM dx_value_to_term(ErlNifEnv *env, const dx_value *v);
ERL_NIF_TERM dx_constraints_to_term(ErlNifEnv *env, dx_type t, const dx_constraints *c);
/* DX_OK, DX_E_INVALID (message in err) or DX_E_NOMEM; -1 if not a map. */
int dx_term_to_constraints(ErlNifEnv *env, ERL_NIF_TERM m, dx_type t, dx_constraints *c, char *err, size_t errlen);

/* Opaque blobs (metadata, changed_by) are external term format. */
ERL_NIF_TERM dx_blob_to_term(ErlNifEnv *env, const uint8_t *p, size_t len, ERL_NIF_TERM dflt);
/* 0 on success (release out with enif_release_binary), -1 on failure. */
int dx_term_to_blob(ErlNifEnv *env, ERL_NIF_TERM t, ErlNifBinary *out);

ERL_NIF_TERM dx_type_atom(dx_type t);
int dx_term_to_type(ErlNifEnv *env, ERL_NIF_TERM t, dx_type *out);

/* The map returned by get/2. */
ERL_NIF_TERM dx_var_to_term(ErlNifEnv *env, const dx_var *v, const dx_snap *s);
ERL_NIF_TERM dx_var_to_flat(ErlNifEnv *env, const dx_var *v, const dx_snap *s, const ERL_NIF_TERM *name);
/* Same, with the `name' field set to *name (a binary equal to the name) if given. */
ERL_NIF_TERM dx_var_to_term_named(ErlNifEnv *env, const dx_var *v, const dx_snap *s, const ERL_NIF_TERM *name);
/* #{version, value, updated_at, metadata, changed_by} for history and export. */
ERL_NIF_TERM dx_snap_to_term(ErlNifEnv *env, const dx_snap *s);
#endif
