/* Access control in the NIF layer (see acl_nif.c). */
#ifndef DX_ACL_H
#define DX_ACL_H
#include "nif.h"

typedef struct dx_acl dx_acl;

/* Who performs an operation: unset means the session itself (the owner). */
typedef struct {
    int set;
    dx_str id;
    ERL_NIF_TERM context; /* a map, or 0 */
} dx_principal;

/* Reads `as' and `context' from an options map; 0 on a malformed value: `as'
 * neither a binary nor `undefined' (the session itself), or `context' not a
 * map. Every NIF taking a principal answers badarg then: a principal that
 * does not parse never acts as anyone (in particular not as the owner). */
int dx_principal_parse(ErlNifEnv *env, ERL_NIF_TERM opts, dx_principal *p);
/* The same check alone, for an options map parsed later. */
int dx_principal_ok(ErlNifEnv *env, ERL_NIF_TERM opts);
int dx_acl_perm(ErlNifEnv *env, ERL_NIF_TERM t, unsigned *bit);
/* 0 on success (*out set), else the error term to return. */
ERL_NIF_TERM dx_acl_compile(ErlNifEnv *env, ERL_NIF_TERM rules, dx_acl **out);
void dx_acl_free(void *acl);
ERL_NIF_TERM dx_acl_rules(ErlNifEnv *env, const dx_acl *a);
int dx_acl_allows(ErlNifEnv *env, const dx_acl *a, dx_str owner, const dx_principal *p, unsigned perm);

/* Reports a refusal to the audit process: what is dspex_denied (perm set) or
 * dspex_rate_limited (perm 0). */
void dx_audit(ErlNifEnv *env, ERL_NIF_TERM what, ERL_NIF_TERM session, ERL_NIF_TERM var, const dx_principal *p,
              ERL_NIF_TERM perm);

typedef struct {
    ErlNifEnv *env;
    dx_str owner;
    const dx_principal *principal;
    unsigned perm;
} dx_acl_ctx;
/* dx_set_opts.acl_check: the check run under the shard mutex. */
int dx_acl_write_check(void *ctx, const dx_var *v, void *acl);

#define DX_PERM_READ 1
#define DX_PERM_WRITE 2
#define DX_PERM_OBSERVE 4
#define DX_PERM_OPTIMIZE 8
#endif
