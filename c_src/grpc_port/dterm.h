/* dterm: a small owned tree of Erlang-like terms, the common currency of the
 * port. It is produced by the bounded external-term decoder (input from the
 * BEAM), by the JSON reader (Any values from the wire) and by the protobuf
 * walker, and consumed by the ei encoder and the JSON writer. Every decoder
 * here checks every length against the bytes left, so hostile input can only
 * fail, never read out of bounds. No erl_nif or gRPC types: cmocka tests it. */
#ifndef DSPEX_DTERM_H
#define DSPEX_DTERM_H

#include <stddef.h>
#include <stdint.h>

/* DT_BIG: an integer beyond int64 (an Erlang bignum, a long JSON integer),
 * kept exact as its decimal text in u.s ("-" then digits, no leading zero):
 * a tool's result of 2^64 must reach the client as 2^64, not as a float. */
typedef enum { DT_INT, DT_FLOAT, DT_ATOM, DT_BIN, DT_LIST, DT_TUPLE, DT_MAP, DT_BIG } dt_kind;

typedef struct dterm {
    dt_kind kind;
    union {
        int64_t i;
        double f;
        struct { char *p; size_t n; } s;               /* atom / binary / big, NUL-terminated copy */
        struct { struct dterm *v; size_t n; } seq;     /* list / tuple */
        struct { struct dterm *k, *v; size_t n; } map; /* keys unique */
    } u;
} dterm;

#define DT_MAX_DEPTH 100 /* JSON read from the wire */
/* A value the reader took comes back inside the reply's own shape (the
 * {reply, Id, Map} tuple, the message map, a list of events, an event's data,
 * a rule's conditions): the ETF decoder and the JSON writer allow that much
 * more, so anything the server accepted stays readable. */
#define DT_REPLY_NESTING 28
#define DT_MAX_OUT_DEPTH (DT_MAX_DEPTH + DT_REPLY_NESTING)
/* The longest DT_BIG, in decimal digits: Python's default int/str conversion
 * limit, so whatever we accept a Python client can read (and the quadratic
 * base conversion stays in the microseconds). */
#define DT_BIG_MAX_DIGITS 4300
#define DT_BIG_MAX_BYTES 1800 /* its magnitude in bytes: 4300 * log256(10) < 1787 */

/* Constructors: all return 0 on success, -1 on allocation failure. */
void dt_int(dterm *t, int64_t i);
void dt_float(dterm *t, double f);
int dt_atom(dterm *t, const char *s);
int dt_bin(dterm *t, const void *p, size_t n);
int dt_seq(dterm *t, dt_kind kind, size_t n);   /* n zeroed (DT_INT 0) items */
int dt_map(dterm *t, size_t n);                 /* n zeroed pairs */
void dt_free(dterm *t);                          /* frees the children, not t itself */

/* Map helpers. */
const dterm *dt_map_get(const dterm *map, const char *key); /* atom or binary key */
int dt_is_atom(const dterm *t, const char *name);
/* Sorts keys and keeps the LAST value of duplicate keys (JSON objects and
 * protobuf maps may repeat keys; Erlang maps may not). */
void dt_map_dedupe(dterm *map);
int dt_compare(const dterm *a, const dterm *b);

/* External term format (with the 131 version byte). Returns 0 or -1.
 * Integers beyond int64 become DT_BIG (more than DT_BIG_MAX_DIGITS: -1). */
int dt_decode_etf(const unsigned char *buf, size_t len, dterm *out);
/* For a frame dt_decode_etf refused: if it starts as a tuple whose first
 * element is an atom and whose second is a non-negative integer (every
 * command that names a call: {reply, Id, ...}, {error, Id, ...}), sets *id
 * and returns 0, so the call can be failed instead of left unanswered. */
int dt_etf_peek_call_id(const unsigned char *buf, size_t len, uint64_t *id);
/* DT_BIG's decimal text as a bignum's little-endian magnitude: *n bytes in
 * out (room for DT_BIG_MAX_BYTES), *neg the sign.
 * Returns 0 or -1 (not a DT_BIG). For the ei encoder. */
int dt_big_magnitude(const dterm *t, unsigned char *out, size_t *n, int *neg);

/* JSON (RFC 8259, UTF-8 validated, depth-limited). Objects become maps with
 * binary keys, arrays lists, strings binaries, integers that fit int64 DT_INT,
 * longer integers DT_BIG (more than DT_BIG_MAX_DIGITS digits: an error),
 * other numbers DT_FLOAT (an overflowing number becomes the atom infinity or
 * neg_infinity), true/false/null atoms. Returns 0, or -1 with *err set to a
 * static description. */
int dt_parse_json(const char *s, size_t n, dterm *out, const char **err);

/* Growable byte buffer for the writer. */
typedef struct { char *p; size_t n, cap; } dt_buf;
int dt_buf_put(dt_buf *b, const void *p, size_t n);
void dt_buf_free(dt_buf *b);

/* JSON writer: atoms true/false/null are literals, undefined is null, nan /
 * infinity / neg_infinity the strings "NaN" / "Infinity" / "-Infinity", other
 * atoms their text; tuples are arrays; DT_BIG its digits; map keys must be
 * binaries, atoms or integers. Binaries must be valid UTF-8. Returns 0 or -1 (*err set). */
int dt_write_json(const dterm *t, dt_buf *out, const char **err);

int dt_utf8_valid(const unsigned char *p, size_t n);

#endif
