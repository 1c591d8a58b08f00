/* Access control: rules per variable, compiled into an immutable object that
 * the store publishes like a snapshot. Conditions and the rules as given live
 * in a process-independent env owned by the object (terms there may be read
 * from any thread while the object lives; EBR keeps it alive for readers). */
#include "acl.h"
#include "glob.h"
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>

enum { P_READ = 1, P_WRITE = 2, P_OBSERVE = 4, P_OPTIMIZE = 8 };
#define MAX_RULES 64

/* How a pattern matches, decided once when the rules are compiled. */
enum { M_ANY, M_LITERAL, M_PREFIX, M_SUFFIX, M_GLOB };

typedef struct {
    int any;
    int kind;
    char *pat;
    size_t plen;
    unsigned perms;
    ERL_NIF_TERM conds; /* a map in acl->env, or 0 */
    char small[24];     /* short patterns live here: one less cache miss per check */
} rule_t;

struct dx_acl {
    /* Interned: variables with identical rules share one object, so a check
     * touches lines that stay in cache. refs counts the variables holding it. */
    struct dx_acl *next;
    uint64_t hash;
    ErlNifBinary key; /* the rules in external format; identity for interning */
    long refs;        /* under g_intern_mu */
    ErlNifEnv *env;
    ERL_NIF_TERM rules; /* normalized copy, for get_permissions */
    size_t n;
    rule_t rule[];
};

#define INTERN_BUCKETS 1024
static dx_acl *g_intern[INTERN_BUCKETS];
static pthread_mutex_t g_intern_mu = PTHREAD_MUTEX_INITIALIZER;

static void acl_destroy(dx_acl *a) {
    if (a->key.data) enif_release_binary(&a->key);
    for (size_t i = 0; i < a->n; i++)
        if (a->rule[i].pat != a->rule[i].small) free(a->rule[i].pat);
    if (a->env) enif_free_env(a->env);
    free(a);
}

/* Returns the interned twin of a freshly compiled object (taking a reference)
 * and destroys the fresh one, or interns the fresh one. */
static dx_acl *intern(dx_acl *a) {
    pthread_mutex_lock(&g_intern_mu);
    dx_acl **b = &g_intern[a->hash % INTERN_BUCKETS], *e;
    for (e = *b; e; e = e->next)
        if (e->hash == a->hash && e->key.size == a->key.size && memcmp(e->key.data, a->key.data, a->key.size) == 0) break;
    if (e) {
        e->refs++;
    } else {
        a->refs = 1;
        a->next = *b;
        *b = a;
    }
    pthread_mutex_unlock(&g_intern_mu);
    if (e) acl_destroy(a);
    return e ? e : a;
}

/* The store's release hook: drops one variable's reference (after its EBR
 * grace period); the last one unlinks and frees the object. */
void dx_acl_free(void *p) {
    dx_acl *a = p;
    if (!a->key.data) { /* never interned (validation only) */
        acl_destroy(a);
        return;
    }
    pthread_mutex_lock(&g_intern_mu);
    int last = --a->refs == 0;
    if (last) {
        dx_acl **b = &g_intern[a->hash % INTERN_BUCKETS];
        while (*b != a) b = &(*b)->next;
        *b = a->next;
    }
    pthread_mutex_unlock(&g_intern_mu);
    if (last) acl_destroy(a);
}

int dx_acl_perm(ErlNifEnv *env, ERL_NIF_TERM t, unsigned *bit) {
    if (enif_is_identical(t, ATOM_read)) *bit = P_READ;
    else if (enif_is_identical(t, ATOM_write)) *bit = P_WRITE;
    else if (enif_is_identical(t, ATOM_observe)) *bit = P_OBSERVE;
    else if (enif_is_identical(t, ATOM_optimize)) *bit = P_OPTIMIZE;
    else return 0;
    return 1;
}

static ERL_NIF_TERM bad_rule(ErlNifEnv *env, unsigned idx, const char *why) {
    return dx_error(env, enif_make_tuple3(env, ATOM_invalid_rule, enif_make_uint(env, idx), dx_make_bin(env, why, strlen(why))));
}

/* Literal, "abc*" and "*abc" (no other wildcard) need no glob machinery. */
static int classify(const char *p, size_t n) {
    size_t wild = 0;
    for (size_t i = 0; i < n; i++) wild += p[i] == '*' || p[i] == '?';
    if (wild == 0) return M_LITERAL;
    if (wild == 1 && n > 0 && p[n - 1] == '*') return M_PREFIX;
    if (wild == 1 && n > 0 && p[0] == '*') return M_SUFFIX;
    return M_GLOB;
}

static int pattern_matches(const rule_t *r, dx_str who) {
    switch (r->kind) {
    case M_ANY: return 1;
    case M_LITERAL: return dx_str_eq(r->pat, r->plen, who.ptr, who.len);
    case M_PREFIX:
        if (who.len < r->plen - 1) return 0;
        /* short prefixes compare inline: a libc call costs more than the bytes */
        for (size_t i = 0; i < r->plen - 1; i++)
            if (r->pat[i] != who.ptr[i]) return 0;
        return 1;
    case M_SUFFIX:
        return who.len >= r->plen - 1 && memcmp(r->pat + 1, who.ptr + who.len - (r->plen - 1), r->plen - 1) == 0;
    default: return dx_glob_match(r->pat, r->plen, who.ptr, who.len) == 1;
    }
}

ERL_NIF_TERM dx_acl_compile(ErlNifEnv *env, ERL_NIF_TERM rules, dx_acl **out) {
    unsigned n;
    *out = NULL;
    if (!enif_get_list_length(env, rules, &n)) return dx_error2(env, ATOM_invalid_argument, ATOM_rules);
    if (n > MAX_RULES) return bad_rule(env, n, "at most 64 rules per variable");
    dx_acl *a = calloc(1, sizeof *a + n * sizeof(rule_t));
    if (!a || !(a->env = enif_alloc_env())) {
        free(a);
        return dx_error(env, ATOM_enomem);
    }
    ERL_NIF_TERM h, l = rules, norm = enif_make_list(a->env, 0);
    for (unsigned i = 0; enif_get_list_cell(env, l, &h, &l); i++) {
        ERL_NIF_TERM pat, perms, conds, p;
        rule_t *r = &a->rule[i];
        a->n = i + 1;
        size_t msize;
        if (!enif_is_map(env, h)) { dx_acl_free(a); return bad_rule(env, i, "a rule must be a map"); }
        enif_get_map_size(env, h, &msize);
        if (!enif_get_map_value(env, h, ATOM_session_pattern, &pat)) { dx_acl_free(a); return bad_rule(env, i, "session_pattern is missing"); }
        if (!enif_get_map_value(env, h, ATOM_permissions, &perms)) { dx_acl_free(a); return bad_rule(env, i, "permissions are missing"); }
        int has_conds = enif_get_map_value(env, h, ATOM_conditions, &conds);
        if (msize != 2u + (has_conds ? 1u : 0u)) { dx_acl_free(a); return bad_rule(env, i, "unknown key (allowed: session_pattern, permissions, conditions)"); }
        ErlNifBinary pb;
        if (enif_is_identical(pat, ATOM_any)) {
            r->any = 1;
            r->kind = M_ANY;
        } else if (enif_inspect_binary(env, pat, &pb)) {
            if (dx_glob_check((const char *)pb.data, pb.size)) { dx_acl_free(a); return bad_rule(env, i, "session_pattern is longer than 1024 bytes"); }
            r->pat = pb.size <= sizeof r->small ? r->small : malloc(pb.size);
            if (!r->pat) { dx_acl_free(a); return dx_error(env, ATOM_enomem); }
            memcpy(r->pat, pb.data, pb.size);
            r->plen = pb.size;
            r->kind = classify(r->pat, r->plen);
        } else {
            dx_acl_free(a);
            return bad_rule(env, i, "session_pattern must be any or a binary glob");
        }
        unsigned np;
        if (!enif_get_list_length(env, perms, &np) || np == 0) { dx_acl_free(a); return bad_rule(env, i, "permissions must be a non-empty list"); }
        while (enif_get_list_cell(env, perms, &p, &perms)) {
            unsigned bit;
            if (!dx_acl_perm(env, p, &bit)) { dx_acl_free(a); return bad_rule(env, i, "a permission must be read, write, observe or optimize"); }
            r->perms |= bit;
        }
        if (has_conds) {
            if (!enif_is_map(env, conds)) { dx_acl_free(a); return bad_rule(env, i, "conditions must be a map"); }
            r->conds = enif_make_copy(a->env, conds);
        }
        norm = enif_make_list_cell(a->env, enif_make_copy(a->env, h), norm);
    }
    enif_make_reverse_list(a->env, norm, &a->rules);
    *out = a;
    return 0;
}

ERL_NIF_TERM dx_acl_rules(ErlNifEnv *env, const dx_acl *a) { return a ? enif_make_copy(env, a->rules) : enif_make_list(env, 0); }

/* Every condition must equal the request context's value under the same key. */
static int conds_hold(ErlNifEnv *env, ERL_NIF_TERM conds, ERL_NIF_TERM ctx) {
    if (!conds) return 1;
    size_t n;
    enif_get_map_size(env, conds, &n);
    if (n == 0) return 1;
    if (!ctx || !enif_is_map(env, ctx)) return 0;
    ErlNifMapIterator it;
    ERL_NIF_TERM k, v, cv;
    int ok = 1;
    enif_map_iterator_create(env, conds, &it, ERL_NIF_MAP_ITERATOR_FIRST);
    for (; ok && enif_map_iterator_get_pair(env, &it, &k, &v); enif_map_iterator_next(env, &it))
        ok = enif_get_map_value(env, ctx, k, &cv) && enif_compare(cv, v) == 0;
    enif_map_iterator_destroy(env, &it);
    return ok;
}

int dx_acl_allows(ErlNifEnv *env, const dx_acl *a, dx_str owner, const dx_principal *p, unsigned perm) {
    if (!p || !p->set || dx_str_eq(owner.ptr, owner.len, p->id.ptr, p->id.len)) return 1; /* the owner */
    for (size_t i = 0; a && i < a->n; i++) {
        const rule_t *r = &a->rule[i];
        if (!(r->perms & perm)) continue;
        if (!pattern_matches(r, p->id)) continue;
        if (conds_hold(env, r->conds, p->context)) return 1;
    }
    return 0;
}

void dx_audit(ErlNifEnv *env, ERL_NIF_TERM what, ERL_NIF_TERM session, ERL_NIF_TERM var, const dx_principal *p,
              ERL_NIF_TERM perm) {
    ErlNifPid pid;
    /* Only on refusals (rare): the audit process records and reports them. */
    if (!enif_whereis_pid(env, ATOM_dspex_acl_audit, &pid)) return;
    ERL_NIF_TERM who = p && p->set ? dx_make_bin(env, p->id.ptr, p->id.len) : session;
    ERL_NIF_TERM msg = perm ? enif_make_tuple5(env, what, session, var, who, perm) : enif_make_tuple4(env, what, session, var, who);
    enif_send(env, &pid, NULL, msg);
}

int dx_principal_parse(ErlNifEnv *env, ERL_NIF_TERM opts, dx_principal *p) {
    memset(p, 0, sizeof *p);
    ERL_NIF_TERM as, ctx;
    size_t n;
    if (!enif_get_map_size(env, opts, &n) || n == 0) return 1;
    /* a context that is not a map is refused whether or not `as' is given */
    int has_ctx = enif_get_map_value(env, opts, ATOM_context, &ctx);
    if (has_ctx && !enif_is_map(env, ctx)) return 0;
    if (!enif_get_map_value(env, opts, ATOM_as, &as) || enif_is_identical(as, ATOM_undefined)) return 1;
    ErlNifBinary b;
    if (!enif_inspect_binary(env, as, &b)) return 0;
    p->set = 1;
    p->id = (dx_str){(const char *)b.data, b.size};
    if (has_ctx) p->context = ctx;
    return 1;
}

int dx_principal_ok(ErlNifEnv *env, ERL_NIF_TERM opts) {
    dx_principal p;
    return dx_principal_parse(env, opts, &p);
}

/* The store's write-path hook: runs under the shard mutex. */
int dx_acl_write_check(void *ctx, const dx_var *v, void *acl) {
    dx_acl_ctx *c = ctx;
    return dx_acl_allows(c->env, acl, c->owner, c->principal, c->perm);
}

/* ---- NIFs ------------------------------------------------------------------------ */

/* set_permissions(Session, Var, Rules, Opts): owner only. */
DX_NIF(nif_acl_set) {
    char kb[DX_ATOM_TEXT];
    dx_str key, sid;
    dx_principal p;
    if (!dx_get_name(env, argv[1], &key, kb, sizeof kb) || !enif_is_binary(env, argv[0]) || !enif_is_map(env, argv[3]) ||
        !dx_principal_parse(env, argv[3], &p))
        return enif_make_badarg(env);
    dx_acl *a;
    ERL_NIF_TERM err = dx_acl_compile(env, argv[2], &a);
    if (err) return err;
    if (!enif_term_to_binary(env, argv[2], &a->key)) {
        acl_destroy(a);
        return dx_error(env, ATOM_enomem);
    }
    a->hash = dx_hash(a->key.data, a->key.size);
    a = intern(a);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    ERL_NIF_TERM r;
    if (!s) r = dx_error(env, ATOM_session_not_found);
    else if (!v) r = dx_error2(env, ATOM_not_found, argv[1]);
    else if (p.set && !dx_str_eq(sid.ptr, sid.len, p.id.ptr, p.id.len)) r = dx_error(env, ATOM_access_denied);
    else if (dx_var_set_acl(s, v, a)) r = dx_error2(env, ATOM_not_found, argv[1]);
    else {
        a = NULL; /* the variable owns it now */
        r = ATOM_ok;
    }
    dx_ebr_exit();
    if (a) dx_acl_free(a);
    return r;
}

DX_NIF(nif_acl_get) {
    char kb[DX_ATOM_TEXT];
    dx_str key, sid;
    if (!dx_get_name(env, argv[1], &key, kb, sizeof kb) || !enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    ERL_NIF_TERM r = !s ? dx_error(env, ATOM_session_not_found)
                     : !v ? dx_error2(env, ATOM_not_found, argv[1])
                          : enif_make_tuple2(env, ATOM_ok, dx_acl_rules(env, dx_var_acl(v)));
    dx_ebr_exit();
    return r;
}

/* check_access(Session, Var, Principal, Permission, Context) */
DX_NIF(nif_acl_check) {
    char kb[DX_ATOM_TEXT];
    dx_str key, sid;
    unsigned perm;
    ErlNifBinary pb;
    if (!dx_get_name(env, argv[1], &key, kb, sizeof kb) || !enif_is_binary(env, argv[0]) ||
        !enif_inspect_binary(env, argv[2], &pb) || !dx_acl_perm(env, argv[3], &perm) || !enif_is_map(env, argv[4]))
        return enif_make_badarg(env);
    dx_principal p = {1, {(const char *)pb.data, pb.size}, argv[4]};
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    int denied = s && v && !dx_acl_allows(env, dx_var_acl(v), sid, &p, perm);
    ERL_NIF_TERM r = !s ? dx_error(env, ATOM_session_not_found)
                     : !v ? dx_error2(env, ATOM_not_found, argv[1])
                     : denied ? dx_error(env, ATOM_access_denied)
                              : ATOM_ok;
    dx_ebr_exit();
    if (denied) dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &p, argv[3]);
    return r;
}

/* The start of a NIF that walks every variable of the session argv[0]: 1 with *s found and the EBR section
 * entered (the caller exits it), or 0 with *r what the NIF returns now, the section left: session_not_found,
 * or the NIF (self) rescheduled on a dirty scheduler when the session has over 2000 variables. (A flag, not
 * a term that may be 0: enif_schedule_nif's own answer is the VM's non-value, 0.) */
static int walk_session(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[], const char *name,
                        ERL_NIF_TERM (*self)(ErlNifEnv *, int, const ERL_NIF_TERM[]), dx_session **s, dx_str *sid,
                        ERL_NIF_TERM *r) {
    dx_ebr_enter();
    *s = dx_nif_session(env, argv[0], sid);
    if (!*s) {
        dx_ebr_exit();
        *r = dx_error(env, ATOM_session_not_found);
        return 0;
    }
    if (dx_session_nvars(*s) > 2000 && enif_thread_type() == ERL_NIF_THR_NORMAL_SCHEDULER) {
        dx_ebr_exit();
        *r = enif_schedule_nif(env, name, ERL_NIF_DIRTY_JOB_CPU_BOUND, self, argc, argv);
        return 0;
    }
    return 1;
}

/* filter_accessible(Session, Principal, Permission, Context) -> {ok, [Name]} sorted */
DX_NIF(nif_acl_filter) {
    dx_str sid;
    unsigned perm;
    ErlNifBinary pb;
    if (!enif_is_binary(env, argv[0]) || !enif_inspect_binary(env, argv[1], &pb) || !dx_acl_perm(env, argv[2], &perm) ||
        !enif_is_map(env, argv[3]))
        return enif_make_badarg(env);
    dx_principal p = {1, {(const char *)pb.data, pb.size}, argv[3]};
    dx_session *s;
    ERL_NIF_TERM r;
    if (!walk_session(env, argc, argv, "acl_filter", nif_acl_filter, &s, &sid, &r)) return r;
    size_t n = 0;
    dx_var **vars = dx_session_vars_sorted(s, &n);
    ERL_NIF_TERM l = enif_make_list(env, 0);
    for (size_t i = n; vars && i > 0; i--)
        if (dx_acl_allows(env, dx_var_acl(vars[i - 1]), sid, &p, perm))
            l = enif_make_list_cell(env, dx_make_bin(env, vars[i - 1]->name, vars[i - 1]->name_len), l);
    free(vars);
    dx_ebr_exit();
    return (!vars && n) ? dx_error(env, ATOM_enomem) : enif_make_tuple2(env, ATOM_ok, l);
}

/* acl_rules(Session) -> {ok, #{Name => Rules}}: the rules of every variable that has some (no value is read
 * or copied: the debug console's access view). Many variables: on a dirty scheduler, as acl_filter. */
typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM *k, *v;
    size_t n, cap;
    int oom;
} rules_ctx;

static int rules_cb(void *ctx, dx_var *var) {
    rules_ctx *c = ctx;
    const dx_acl *a = dx_var_acl(var);
    if (!a || enif_is_empty_list(c->env, a->rules)) return 0;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 16;
        ERL_NIF_TERM *k = realloc(c->k, cap * sizeof *k), *v = k ? realloc(c->v, cap * sizeof *v) : NULL;
        if (k) c->k = k;
        if (!k || !v) {
            c->oom = 1;
            return 1;
        }
        c->v = v;
        c->cap = cap;
    }
    c->k[c->n] = dx_make_bin(c->env, var->name, var->name_len);
    c->v[c->n++] = dx_acl_rules(c->env, a);
    return 0;
}

DX_NIF(nif_acl_rules) {
    dx_str sid;
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    dx_session *s;
    ERL_NIF_TERM r;
    if (!walk_session(env, argc, argv, "acl_rules", nif_acl_rules, &s, &sid, &r)) return r;
    rules_ctx c = {.env = env};
    dx_session_foreach_var(s, rules_cb, &c);
    dx_ebr_exit();
    ERL_NIF_TERM m;
    int ok = !c.oom && enif_make_map_from_arrays(env, c.k, c.v, c.n, &m);
    free(c.k);
    free(c.v);
    return ok ? enif_make_tuple2(env, ATOM_ok, m) : dx_error(env, ATOM_enomem);
}

DX_NIF(nif_acl_validate) {
    dx_acl *a;
    ERL_NIF_TERM err = dx_acl_compile(env, argv[0], &a);
    if (err) return err;
    dx_acl_free(a);
    return ATOM_ok;
}

/* session_get_rate(Session) -> {ok, #{rate, burst, tokens}}: the token bucket's
 * configuration (rate 0: off) and the tokens it holds now. */
DX_NIF(nif_session_get_rate) {
    dx_str sid;
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    double rate = 0, burst = 0, tokens = 0;
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    if (s) dx_session_get_rate(s, dx_now_ns(), &rate, &burst, &tokens);
    dx_ebr_exit();
    if (!s) return dx_error(env, ATOM_session_not_found);
    ERL_NIF_TERM keys[3] = {enif_make_atom(env, "burst"), enif_make_atom(env, "rate"), enif_make_atom(env, "tokens")};
    ERL_NIF_TERM vals[3] = {enif_make_double(env, burst), enif_make_double(env, rate), enif_make_double(env, tokens)};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 3, &m);
    return enif_make_tuple2(env, ATOM_ok, m);
}

/* session_take(Session) -> ok | {error, rate_limited | session_not_found}: one
 * token of the session's bucket, for the operations metered outside the store's
 * own NIFs (graph, event log, access queries; see dspex_acl:set_rate_limit/3).
 * A refusal is audited as the store's are. */
DX_NIF(nif_session_take) {
    dx_str sid;
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    int limited = s && s->rate > 0 && dx_session_take(s, dx_now_ns());
    dx_ebr_exit();
    if (!s) return dx_error(env, ATOM_session_not_found);
    if (!limited) return ATOM_ok;
    dx_audit(env, ATOM_dspex_rate_limited, argv[0], ATOM_undefined, NULL, 0);
    return dx_error(env, ATOM_rate_limited);
}

/* session_set_rate(Session, Rate, Burst): 0 rate turns limiting off. */
DX_NIF(nif_session_set_rate) {
    dx_str sid;
    double rate, burst;
    ErlNifSInt64 i;
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    if (!enif_get_double(env, argv[1], &rate)) {
        if (!enif_get_int64(env, argv[1], &i)) return enif_make_badarg(env);
        rate = (double)i;
    }
    if (!enif_get_double(env, argv[2], &burst)) {
        if (!enif_get_int64(env, argv[2], &i)) return enif_make_badarg(env);
        burst = (double)i;
    }
    if (rate < 0 || burst < 1) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], &sid);
    if (s) dx_session_set_rate(s, rate, burst);
    dx_ebr_exit();
    return s ? ATOM_ok : dx_error(env, ATOM_session_not_found);
}
