/* NIFs of the variable store: argument checks, term conversion, and calls into
 * the core. Every function that reads shared state brackets it in an EBR
 * section; writers are serialised by the core's shard mutexes. */
#include "acl.h"
#include "events_nif.h"
#include "glob.h"
#include "nif.h"
#include "metrics_nif.h"
#include "repl.h"
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Inputs above these sizes are converted on a dirty scheduler (> ~1 ms of work). */
#define BIG_LIST 20000
#define BIG_BINARY (1u << 20)
#define BIG_VALUE_BYTES (256u << 10)
#define BIG_SESSION 2000

static _Atomic int64_t g_skew_ms; /* test hook: advances the TTL clock */

/* Wall clock in µs, read from the vDSO (as erlang:system_time(microsecond) is
 * in the default time-warp mode, without two calls into ERTS per write). */
int64_t dx_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t dx_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t dx_now_ms(void) {
    /* The coarse clock is a vDSO read of a few ns: it is consulted on every access. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 + atomic_load_explicit(&g_skew_ms, memory_order_relaxed);
}

ERL_NIF_TERM dx_error(ErlNifEnv *env, ERL_NIF_TERM reason) { return enif_make_tuple2(env, ATOM_error, reason); }
ERL_NIF_TERM dx_error2(ErlNifEnv *env, ERL_NIF_TERM tag, ERL_NIF_TERM detail) {
    return dx_error(env, enif_make_tuple2(env, tag, detail));
}
ERL_NIF_TERM dx_error_msg(ErlNifEnv *env, ERL_NIF_TERM tag, const char *msg) {
    return dx_error2(env, tag, dx_make_bin(env, msg, strlen(msg)));
}

static ERL_NIF_TERM limit_atom(int limit) {
    switch (limit) {
    case DX_L_SESSIONS: return ATOM_sessions;
    case DX_L_VARS: return ATOM_variables;
    case DX_L_VALUE_SIZE: return ATOM_value_size;
    case DX_L_NAME_LENGTH: return ATOM_name_length;
    default: return ATOM_history_limit;
    }
}

ERL_NIF_TERM dx_limit_error(ErlNifEnv *env, int limit) { return dx_error2(env, ATOM_limit_exceeded, limit_atom(limit)); }

static ERL_NIF_TERM rc_reason(ErlNifEnv *env, int rc, ERL_NIF_TERM key, uint64_t version, int limit, const char *msg) {
    switch (rc) {
    case DX_E_SESSION_NOT_FOUND: return ATOM_session_not_found;
    case DX_E_NOT_FOUND: return enif_make_tuple2(env, ATOM_not_found, key);
    case DX_E_EXISTS: return enif_make_tuple2(env, ATOM_already_exists, key);
    case DX_E_VERSION_MISMATCH: return enif_make_tuple2(env, ATOM_version_mismatch, enif_make_uint64(env, version));
    case DX_E_INVALID:
        return enif_make_tuple2(env, ATOM_invalid_value, dx_make_bin(env, msg ? msg : "invalid", strlen(msg ? msg : "invalid")));
    case DX_E_LIMIT: return enif_make_tuple2(env, ATOM_limit_exceeded, limit_atom(limit));
    case DX_E_VERSION_NOT_FOUND: return enif_make_tuple2(env, ATOM_version_not_found, enif_make_uint64(env, version));
    case DX_E_DERIVED: return ATOM_derived_variable;
    case DX_E_STALE_LOCK: return ATOM_stale_lock;
    case DX_E_DENIED: return ATOM_access_denied;
    case DX_E_RATE_LIMITED: return ATOM_rate_limited;
    case DX_E_INVALID_NAME: return enif_make_tuple2(env, ATOM_invalid_argument, ATOM_name);
    case DX_E_LOCKED: return enif_make_tuple2(env, ATOM_locked, ATOM_undefined);
    case DX_E_VERSION_LIMIT: return enif_make_tuple2(env, ATOM_limit_exceeded, ATOM_version);
    default: return ATOM_enomem;
    }
}

ERL_NIF_TERM dx_rc_error(ErlNifEnv *env, int rc, ERL_NIF_TERM key, uint64_t version, int limit, const char *msg) {
    return dx_error(env, rc_reason(env, rc, key, version, limit, msg));
}

/* {locked, Holder} for the refusal just returned on this thread: the holder
 * was captured in the same critical section as the refusal. */
static ERL_NIF_TERM locked_reason(ErlNifEnv *env) {
    const uint8_t *h;
    size_t len;
    dx_last_lock_holder(&h, &len);
    return enif_make_tuple2(env, ATOM_locked, len ? dx_blob_to_term(env, h, len, ATOM_undefined) : ATOM_undefined);
}

int dx_on_dirty(void) { return enif_thread_type() != ERL_NIF_THR_NORMAL_SCHEDULER; }

dx_session *dx_nif_session(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *sid) {
    ErlNifBinary b;
    if (!enif_inspect_binary(env, t, &b)) return NULL;
    dx_str id = {(const char *)b.data, b.size};
    if (sid) *sid = id;
    return dx_session_find(id, dx_now_ms());
}

/* True when converting t would take long enough to belong on a dirty scheduler. */
static int big_input(ErlNifEnv *env, ERL_NIF_TERM t) {
    ErlNifBinary b;
    ERL_NIF_TERM d;
    if (enif_is_list(env, t)) return dx_list_longer_than(env, t, BIG_LIST);
    if (enif_is_binary(env, t)) return enif_inspect_binary(env, t, &b) && b.size > BIG_BINARY;
    if (enif_is_map(env, t) && (enif_get_map_value(env, t, ATOM_data, &d))) return dx_list_longer_than(env, d, BIG_LIST);
    return 0;
}

/* Calls moved to a dirty scheduler, per NIF (sched_stats/0 reports them, with
 * the watch notification counters: the tests assert where work ran). */
enum { RS_SESSION_LIST, RS_REGISTER, RS_GET, RS_GET_VALUE, RS_SET, RS_LIST, RS_GET_MANY, RS_SET_MANY, RS_HISTORY,
       RS_ROLLBACK, RS_REPLICA_BATCH, RS_N };
static _Atomic uint64_t g_resched[RS_N];

static ERL_NIF_TERM resched(ErlNifEnv *env, int op, const char *fname,
                            ERL_NIF_TERM (*fun)(ErlNifEnv *, int, const ERL_NIF_TERM[]), int argc,
                            const ERL_NIF_TERM argv[]) {
    atomic_fetch_add_explicit(&g_resched[op], 1, memory_order_relaxed);
    return enif_schedule_nif(env, fname, ERL_NIF_DIRTY_JOB_CPU_BOUND, fun, argc, argv);
}
#define RESCHEDULE(op, fname, fun) resched(env, op, fname, fun, argc, argv)

/* What building the term of a snapshot costs, in bytes of work: its payload
 * and metadata, plus a fixed share for the map around it. Replies above
 * BIG_VALUE_BYTES of work are built on a dirty scheduler. */
static size_t snap_cost(const dx_snap *s) { return dx_value_payload_size(&s->value) + s->meta_len + s->by_len + 256; }

/* rawbuf_debug(FailNth) -> Live: conversion buffers held now; FailNth >= 1
 * makes that allocation from now fail (tests of the error paths), 0 none. */
DX_NIF(nif_rawbuf_debug) {
    ErlNifSInt64 n;
    if (!enif_get_int64(env, argv[0], &n) || n < 0) return enif_make_badarg(env);
    return enif_make_int64(env, dx_rawbuf_debug((long)n));
}

/* sched_stats() -> #{Op => Count}: calls rescheduled to a dirty scheduler per
 * NIF, and watch notifications delivered on normal / dirty schedulers. */
DX_NIF(nif_sched_stats) {
    static const char *const names[RS_N] = {"session_list", "var_register", "var_get", "var_get_value", "var_set",
                                            "var_list", "var_get_many", "var_set_many", "var_history", "var_rollback",
                                            "replica_apply_batch"};
    static const char *const nnames[DX_NOTIFY_STATS] = {"notify_normal", "notify_dirty", "notify_rescheduled",
                                                        "notify_dropped"};
    ERL_NIF_TERM keys[RS_N + DX_NOTIFY_STATS], vals[RS_N + DX_NOTIFY_STATS], m;
    for (int i = 0; i < RS_N; i++) {
        keys[i] = enif_make_atom(env, names[i]);
        vals[i] = enif_make_uint64(env, atomic_load(&g_resched[i]));
    }
    for (int i = 0; i < DX_NOTIFY_STATS; i++) {
        keys[RS_N + i] = enif_make_atom(env, nnames[i]);
        vals[RS_N + i] = enif_make_uint64(env, atomic_load(&dx_notify_stats[i]));
    }
    enif_make_map_from_arrays(env, keys, vals, RS_N + DX_NOTIFY_STATS, &m);
    return m;
}

/* ---- sessions ------------------------------------------------------------------- */

static ERL_NIF_TERM session_info(ErlNifEnv *env, dx_session *s) {
    int64_t now_ms = dx_now_ms(), now_us = dx_now_us();
    int64_t last = atomic_load_explicit(&s->last_access, memory_order_relaxed);
    /* last access is kept in coarse monotonic ms (1 s resolution); never report it before creation */
    int64_t last_us = now_us - (now_ms - last) * 1000;
    if (last_us < s->created_at) last_us = s->created_at;
    ERL_NIF_TERM keys[6] = {ATOM_id, ATOM_metadata, ATOM_ttl, ATOM_created_at, ATOM_last_accessed_at,
                            ATOM_variable_count};
    ERL_NIF_TERM vals[6] = {
        dx_make_bin(env, s->id, s->id_len),
        dx_blob_to_term(env, s->meta, s->meta_len, enif_make_new_map(env)),
        s->ttl_ms < 0 ? ATOM_infinity : enif_make_int64(env, s->ttl_ms / 1000),
        enif_make_int64(env, s->created_at),
        enif_make_int64(env, last_us),
        enif_make_int64(env, dx_session_nvars(s)),
    };
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 6, &m);
    return m;
}

static int get_sid(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *out) {
    ErlNifBinary b;
    if (!enif_inspect_binary(env, t, &b)) return 0;
    *out = (dx_str){(const char *)b.data, b.size};
    return 1;
}

/* Whole seconds in ms stay far from int64 overflow below this. */
#define DX_MAX_TTL_S (1LL << 40)

/* session_create(Id :: binary(), Metadata :: map(), TtlSeconds :: integer() | infinity) */
DX_NIF(nif_session_create) {
    dx_str id;
    ErlNifSInt64 ttl = -1;
    int is_int = enif_term_type(env, argv[2]) == ERL_NIF_TERM_TYPE_INTEGER;
    if (!get_sid(env, argv[0], &id) || !enif_is_map(env, argv[1]) ||
        !(enif_is_identical(argv[2], ATOM_infinity) || is_int))
        return enif_make_badarg(env);
    /* an integer out of range is a bad option value, not a type error */
    if (is_int && !(enif_get_int64(env, argv[2], &ttl) && ttl >= 0 && ttl < DX_MAX_TTL_S))
        return dx_error2(env, ATOM_invalid_argument, ATOM_ttl);
    ErlNifBinary meta = {0};
    size_t mlen = 0;
    size_t msize;
    enif_get_map_size(env, argv[1], &msize);
    if (msize) {
        if (dx_term_to_blob(env, argv[1], &meta)) return dx_error(env, ATOM_enomem);
        mlen = meta.size;
    }
    dx_ebr_enter();
    dx_session *s = NULL;
    int created = 0, limit = 0;
    int rc = dx_session_create(id, meta.data, mlen, ttl < 0 ? -1 : ttl * 1000, dx_now_us(), dx_now_ms(), &s, &created,
                               &limit);
    ERL_NIF_TERM r = rc ? dx_rc_error(env, rc, argv[0], 0, limit, NULL)
                        : enif_make_tuple3(env, ATOM_ok, session_info(env, s),
                                                         created == 2 ? ATOM_replaced : created ? ATOM_true : ATOM_false);
    dx_ebr_exit();
    if (msize) enif_release_binary(&meta);
    return r;
}

DX_NIF(nif_session_get) {
    dx_str id;
    if (!get_sid(env, argv[0], &id)) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_session_find(id, dx_now_ms());
    ERL_NIF_TERM r = s ? enif_make_tuple2(env, ATOM_ok, session_info(env, s)) : dx_error(env, ATOM_session_not_found);
    dx_ebr_exit();
    return r;
}

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM list;
    int64_t now;
} sess_list_ctx;

static int sess_list_cb(void *ctx, dx_session *s) {
    sess_list_ctx *c = ctx;
    if (!dx_session_expired(s, c->now))
        c->list = enif_make_list_cell(c->env, dx_make_bin(c->env, s->id, s->id_len), c->list);
    return 0;
}

DX_NIF(nif_session_list) {
    if (!dx_on_dirty() && dx_session_count() > BIG_SESSION) return RESCHEDULE(RS_SESSION_LIST, "session_list", nif_session_list);
    sess_list_ctx c = {env, enif_make_list(env, 0), dx_now_ms()};
    dx_ebr_enter();
    dx_session_foreach(sess_list_cb, &c);
    dx_ebr_exit();
    return c.list;
}

DX_NIF(nif_session_touch) {
    dx_str id;
    if (!get_sid(env, argv[0], &id)) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_session_find(id, dx_now_ms());
    if (s) atomic_store(&s->last_access, dx_now_ms());
    dx_ebr_exit();
    return s ? ATOM_ok : dx_error(env, ATOM_session_not_found);
}

DX_NIF(nif_session_delete) {
    dx_str id;
    if (!get_sid(env, argv[0], &id)) return enif_make_badarg(env);
    return dx_session_delete(id) ? dx_error(env, ATOM_session_not_found) : ATOM_ok;
}

/* Dirty: may walk every session and free whole sessions. */
DX_NIF(nif_sweep) {
    size_t n = dx_session_sweep(dx_now_ms());
    dx_ebr_reclaim(1);
    return enif_make_uint64(env, n);
}

DX_NIF(nif_reclaim) { return enif_make_uint64(env, dx_ebr_reclaim(1)); }

/* A test hook: refused ({error, test_hooks_disabled}) unless the library was
 * loaded with test hooks enabled (see dspex_nif.c). */
DX_NIF(nif_advance_clock) {
    ErlNifSInt64 ms;
    if (!enif_get_int64(env, argv[0], &ms) || ms < 0) return enif_make_badarg(env);
    if (!atomic_load_explicit(&dx_test_hooks, memory_order_relaxed)) return dx_error(env, ATOM_test_hooks_disabled);
    atomic_fetch_add(&g_skew_ms, ms);
    return ATOM_ok;
}

DX_NIF(nif_set_limits) {
    dx_limits l = dx_store_limits();
    struct {
        ERL_NIF_TERM *key;
        int kind; /* 0: u64, 1: u32 */
        void *field;
    } f[] = {
        {&ATOM_max_sessions, 0, &l.max_sessions},      {&ATOM_max_variables, 0, &l.max_vars},
        {&ATOM_max_value_bytes, 0, &l.max_value_bytes}, {&ATOM_max_name_length, 1, &l.max_name_len},
        {&ATOM_max_history, 1, &l.max_history},          {&ATOM_default_history, 1, &l.default_history},
    };
    if (!enif_is_map(env, argv[0])) return enif_make_badarg(env);
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        ERL_NIF_TERM v;
        ErlNifUInt64 u;
        if (!enif_get_map_value(env, argv[0], *f[i].key, &v)) continue;
        if (!enif_get_uint64(env, v, &u) || (f[i].kind == 1 && u > UINT32_MAX)) return enif_make_badarg(env);
        if (f[i].kind == 0) *(uint64_t *)f[i].field = u;
        else *(uint32_t *)f[i].field = (uint32_t)u;
    }
    if (l.default_history > l.max_history || l.max_name_len == 0) return enif_make_badarg(env);
    dx_store_set_limits(&l);
    return ATOM_ok;
}

DX_NIF(nif_get_limits) {
    dx_limits l = dx_store_limits();
    ERL_NIF_TERM keys[6] = {ATOM_max_sessions, ATOM_max_variables, ATOM_max_value_bytes,
                            ATOM_max_name_length, ATOM_max_history, ATOM_default_history};
    ERL_NIF_TERM vals[6] = {enif_make_uint64(env, l.max_sessions), enif_make_uint64(env, l.max_vars),
                            enif_make_uint64(env, l.max_value_bytes), enif_make_uint64(env, l.max_name_len),
                            enif_make_uint64(env, l.max_history), enif_make_uint64(env, l.default_history)};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 6, &m);
    return m;
}

DX_NIF(nif_stats) {
    ERL_NIF_TERM keys[2] = {ATOM_sessions, ATOM_reclaim_pending};
    ERL_NIF_TERM vals[2] = {enif_make_uint64(env, dx_session_count()), enif_make_uint64(env, dx_ebr_pending())};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 2, &m);
    return m;
}

/* ---- variables -------------------------------------------------------------------- */

/* Looks up the session (caller is inside an EBR section). */
/* The outcome of the read just served (also set by WITH_SESSION), for its native timing: set at each
 * return point; left at -1 by badarg and by a move to a dirty scheduler (the
 * dirty run is timed instead). */
static __thread int t_res;
#define WITH_SESSION(s, term)                                                                     \
    dx_str sid_;                                                                                  \
    if (!get_sid(env, term, &sid_)) {                                                             \
        t_res = -1; /* a badarg is no read: neither a miss nor timed */                           \
        return enif_make_badarg(env);                                                             \
    }                                                                                             \
    dx_ebr_enter();                                                                               \
    dx_session *s = dx_session_find(sid_, dx_now_ms());                                          \
    if (!s) {                                                                                     \
        dx_ebr_exit();                                                                            \
        return dx_error(env, ATOM_session_not_found);                                             \
    }                                                                                             \
    if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {                                         \
        dx_ebr_exit();                                                                            \
        t_res = DX_NATIVE_ERROR;                                                                  \
        dx_audit(env, ATOM_dspex_rate_limited, term, argc > 1 ? argv[1] : ATOM_undefined, NULL, 0); \
        return dx_error(env, ATOM_rate_limited);                                                  \
    }

/* register(Session, Name, Type, Value, Constraints, Metadata, HistoryLimit, ChangedBy, Derived) */
DX_NIF(nif_var_register) {
    char nbuf[DX_ATOM_TEXT];
    dx_str name;
    dx_type type;
    ErlNifSInt64 hl = -1;
    /* a history_limit beyond int64 is over every max_history: the same
     * {limit_exceeded, history_limit} as any other limit too big */
    int huge_hl = enif_term_type(env, argv[6]) == ERL_NIF_TERM_TYPE_INTEGER && !enif_get_int64(env, argv[6], &hl) &&
                  enif_compare(argv[6], enif_make_int(env, 0)) > 0;
    if (huge_hl) hl = INT64_MAX;
    if (!dx_get_name(env, argv[1], &name, nbuf, sizeof nbuf) || !enif_is_map(env, argv[4]) ||
        !enif_is_map(env, argv[5]) ||
        !(enif_is_identical(argv[6], ATOM_undefined) || huge_hl || (enif_get_int64(env, argv[6], &hl) && hl >= 0)) ||
        !(enif_is_identical(argv[8], ATOM_true) || enif_is_identical(argv[8], ATOM_false)))
        return enif_make_badarg(env);
    dx_str sid;
    if (!get_sid(env, argv[0], &sid)) return enif_make_badarg(env);
    if (!dx_term_to_type(env, argv[2], &type)) return dx_error2(env, ATOM_unknown_type, argv[2]);
    if (!dx_on_dirty() && big_input(env, argv[3])) return RESCHEDULE(RS_REGISTER, "var_register", nif_var_register);

    char err[DX_ERRLEN] = "";
    dx_constraints cons;
    dx_constraints_init(&cons);
    int rc = dx_term_to_constraints(env, argv[4], type, &cons, err, sizeof err);
    if (rc < 0) return enif_make_badarg(env);
    if (rc) {
        dx_constraints_free(&cons);
        return rc == DX_E_NOMEM ? dx_error(env, ATOM_enomem) : dx_error_msg(env, ATOM_invalid_constraints, err);
    }
    dx_rawbuf *b = enif_alloc(sizeof *b);
    ErlNifBinary meta = {0}, by = {0};
    size_t msize;
    enif_get_map_size(env, argv[5], &msize);
    int have_by = !enif_is_identical(argv[7], ATOM_undefined);
    ERL_NIF_TERM r;
    dx_value val;
    if (!b || dx_term_to_raw(env, argv[3], b, dx_store_limits().max_value_bytes)) {
        r = dx_error(env, ATOM_enomem);
        goto out;
    }
    if (b->too_big) { r = dx_limit_error(env, DX_L_VALUE_SIZE); goto out; }
    if ((rc = dx_value_check(type, &cons, &b->raw, &val, err, sizeof err))) {
        r = dx_error_msg(env, ATOM_invalid_value, err);
        goto out;
    }
    if ((msize && dx_term_to_blob(env, argv[5], &meta)) || (have_by && dx_term_to_blob(env, argv[7], &by))) {
        r = dx_error(env, ATOM_enomem);
        goto out;
    }
    dx_ebr_enter();
    dx_session *s = dx_session_find(sid, dx_now_ms());
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
    } else if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
        r = dx_error(env, ATOM_rate_limited);
        dx_audit(env, ATOM_dspex_rate_limited, argv[0], argv[1], NULL, 0);
    } else {
        dx_var_spec sp = {name, type, &cons, &val, meta.data, msize ? meta.size : 0, by.data, have_by ? by.size : 0, hl,
                          enif_is_identical(argv[8], ATOM_true)};
        dx_var *v = NULL;
        int limit = 0;
        rc = dx_var_register(s, &sp, dx_now_us(), &v, &limit);
        r = rc ? dx_rc_error(env, rc, dx_make_bin(env, name.ptr, name.len), 0, limit, NULL)
               : enif_make_tuple2(env, ATOM_ok, dx_make_bin(env, v->id, v->id_len));
    }
    dx_ebr_exit();
out:
    if (msize && meta.data) enif_release_binary(&meta);
    if (have_by && by.data) enif_release_binary(&by);
    if (b) {
        dx_rawbuf_free(b);
        enif_free(b);
    }
    dx_constraints_free(&cons);
    return r;
}

/* Finds a var by name or id; key may be a binary or an atom. */
static int get_key(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *k, char *buf) { return dx_get_name(env, t, k, buf, DX_ATOM_TEXT); }

static int big_value(const dx_snap *s) { return s->value.type >= DX_T_STRING && dx_value_payload_size(&s->value) > BIG_VALUE_BYTES; }

static ERL_NIF_TERM var_get(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
static ERL_NIF_TERM var_get_value(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);

/* Runs a read, timing it natively when the analytics are bound to op. */
static inline ERL_NIF_TERM timed(int op, ERL_NIF_TERM (*f)(ErlNifEnv *, int, const ERL_NIF_TERM[]), ErlNifEnv *env,
                                 int argc, const ERL_NIF_TERM argv[]) {
    if (!atomic_load_explicit(&dx_native_enabled[op], memory_order_relaxed)) return f(env, argc, argv);
    uint64_t t0 = dx_native_ticks();
    t_res = -1;
    ERL_NIF_TERM r = f(env, argc, argv);
    if (t_res >= 0) dx_native_record(op, t_res, t0);
    return r;
}

/* The fast path: dspex_store calls var_get/var_get_value/var_set directly and
 * does nothing else, unless dspex_store:refresh_fast_path/0 marked the op
 * slow (cluster routing on, or a telemetry handler besides the native
 * analytics). A slow op answers the atom `slow' and dspex_store takes its full
 * path, which calls the *_here variants (always served). One relaxed load here
 * replaces two persistent_term lookups per call in Erlang. */
static _Atomic int g_slow[DX_NATIVE_OPS];

#define SLOW(op) (atomic_load_explicit(&g_slow[op], memory_order_relaxed))

/* ---- cached copies of other nodes' sessions (issue #16; see core/cache.h) ----
 * A cached read is one NIF call: the copy (session "\0cache:" ++ S) is looked
 * up, its freshness checked against the clock and the view generation, and
 * the variable read, all in one EBR section. Not fresh: `stale'; no copy:
 * `miss' (dspex_cache then runs its slow path: renewal or fill from the owner).
 * `copy': fresh, but the caller reads the copy itself with var_get_here (a
 * value big enough for a dirty scheduler, or a hit event wanted). */

/* The default read of var_get/2 and var_get_value/2 when they are slow (a
 * cluster is on): CACHE_OFF (every read takes dspex_store's path), or a
 * cached read of at most that many ns, or DX_CACHE_STRONG. */
#define CACHE_OFF INT64_MIN
static _Atomic int64_t g_cache_default = CACHE_OFF;
/* A handler listens to [dspex, cache, hit]: hits answer `copy' (the event is
 * emitted in Erlang). */
static _Atomic int g_cache_hit_event;

enum { CR_HIT, CR_MISS, CR_STALE, CR_COPY, CR_BADARG };

/* The read of keyt in the cached copy of session sidt. On CR_HIT *out is
 * the answer; `counted_copy' says whether a CR_COPY counts as a hit (the
 * explicit cache_get does; the default path of var_get leaves it to the
 * cache_get that follows). */
static int cache_read(ErlNifEnv *env, ERL_NIF_TERM sidt, ERL_NIF_TERM keyt, int64_t max_stale_ns, int value_only,
                      int count_copy, ERL_NIF_TERM *out) {
    char kbuf[DX_ATOM_TEXT], ibuf[256];
    dx_str key;
    ErlNifBinary b;
    if (!enif_inspect_binary(env, sidt, &b)) return CR_MISS; /* no copy of a non-session */
    if (!get_key(env, keyt, &key, kbuf)) return CR_BADARG;
    char *id = ibuf;
    size_t cap = sizeof ibuf;
    if (b.size + DX_CACHE_PREFIX_LEN > cap) {
        cap = b.size + DX_CACHE_PREFIX_LEN;
        if (!(id = enif_alloc(cap))) return CR_MISS;
    }
    size_t idlen = dx_cache_id(id, cap, (const char *)b.data, b.size);
    int rc;
    dx_ebr_enter();
    dx_session *s = dx_session_find((dx_str){id, idlen}, dx_now_ms());
    if (!s) {
        rc = CR_MISS;
    } else if (dx_cache_check(&s->cache, dx_cache_now_ns(), dx_cache_gen(), max_stale_ns) != DX_CACHE_HIT) {
        rc = CR_STALE;
    } else if (atomic_load_explicit(&g_cache_hit_event, memory_order_relaxed)) {
        rc = CR_COPY;
    } else {
        dx_var *v = dx_var_find(s, key);
        rc = CR_HIT;
        if (!v) {
            *out = dx_error2(env, ATOM_not_found, keyt);
        } else {
            dx_snap *cur = dx_var_current(v);
            if (big_value(cur) && !dx_on_dirty()) {
                rc = CR_COPY;
            } else if (value_only) {
                *out = enif_make_tuple2(env, ATOM_ok, dx_value_to_term(env, &cur->value));
            } else {
                int by_name = enif_is_binary(env, keyt) && key.len == v->name_len && !memcmp(key.ptr, v->name, key.len);
                *out = v->derived ? enif_make_tuple2(env, ATOM_ok, dx_var_to_term_named(env, v, cur, by_name ? &keyt : NULL))
                                  : dx_var_to_flat(env, v, cur, by_name ? &keyt : NULL);
            }
        }
    }
    dx_ebr_exit();
    if (id != ibuf) enif_free(id);
    if (rc == CR_HIT || (rc == CR_COPY && count_copy)) dx_cache_count_hit();
    return rc;
}

/* var_get/2 or var_get_value/2 found slow: a fresh cached copy answers at
 * once under the default read mode; anything else answers `slow'. */
static ERL_NIF_TERM slow_read(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[], int value_only) {
    int64_t d = atomic_load_explicit(&g_cache_default, memory_order_relaxed);
    ERL_NIF_TERM r;
    if (d != CACHE_OFF && argc == 2 && cache_read(env, argv[0], argv[1], d, value_only, 0, &r) == CR_HIT) return r;
    return ATOM_slow;
}

/* The max_staleness argument: ms (integer >= 0) or `strong'. */
static int get_max_stale(ErlNifEnv *env, ERL_NIF_TERM t, int64_t *ns) {
    ErlNifSInt64 ms;
    if (enif_is_identical(t, ATOM_strong)) {
        *ns = DX_CACHE_STRONG;
        return 1;
    }
    if (!enif_get_int64(env, t, &ms) || ms < 0 || ms > INT64_MAX / 1000000) return 0;
    *ns = ms * 1000000;
    return 1;
}

static ERL_NIF_TERM cache_get(ErlNifEnv *env, const ERL_NIF_TERM argv[], int value_only) {
    int64_t ns;
    ERL_NIF_TERM r;
    if (!get_max_stale(env, argv[2], &ns)) return enif_make_badarg(env);
    switch (cache_read(env, argv[0], argv[1], ns, value_only, 1, &r)) {
    case CR_HIT: return r;
    case CR_MISS: return ATOM_miss;
    case CR_STALE: return ATOM_stale;
    case CR_COPY: return ATOM_copy;
    default: return enif_make_badarg(env);
    }
}

/* cache_get(S, Key, MaxStaleMs | strong) -> Var | {error, _} | miss | stale | copy */
DX_NIF(nif_cache_get) {
    (void)argc;
    return cache_get(env, argv, 0);
}
/* cache_get_value(S, Key, MaxStaleMs | strong) -> {ok, Value} | {error, _} | miss | stale | copy */
DX_NIF(nif_cache_get_value) {
    (void)argc;
    return cache_get(env, argv, 1);
}

/* cache_arm(CopyId, FillNs, Gen, LeaseNs) -> ok | {error, session_not_found}:
 * arms (install) or renews the copy (fill and lease only move forward; 0
 * leaves a field). */
DX_NIF(nif_cache_arm) {
    ErlNifSInt64 fill, lease;
    ErlNifUInt64 gen;
    (void)argc;
    if (!enif_get_int64(env, argv[1], &fill) || !enif_get_uint64(env, argv[2], &gen) ||
        !enif_get_int64(env, argv[3], &lease))
        return enif_make_badarg(env);
    t_res = -1;
    WITH_SESSION(s, argv[0]);
    dx_cache_arm(&s->cache, fill, gen, lease);
    dx_ebr_exit();
    return ATOM_ok;
}

/* cache_take_ref(CopyId) -> boolean(): the copy's second-chance bit, cleared
 * (false when the copy is gone). */
DX_NIF(nif_cache_take_ref) {
    (void)argc;
    t_res = -1;
    WITH_SESSION(s, argv[0]);
    int r = dx_cache_take_ref(&s->cache);
    dx_ebr_exit();
    return r ? ATOM_true : ATOM_false;
}

/* cache_info(CopyId) -> {FillNs, Gen, LeaseNs, Ref} | {error, session_not_found}:
 * the copy's freshness (dspex_cache:entry/1). */
DX_NIF(nif_cache_info) {
    (void)argc;
    t_res = -1;
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r = enif_make_tuple4(env, enif_make_int64(env, atomic_load(&s->cache.fill_ns)),
                                      enif_make_uint64(env, atomic_load(&s->cache.gen)),
                                      enif_make_int64(env, atomic_load(&s->cache.lease_ns)),
                                      enif_make_int(env, atomic_load(&s->cache.ref)));
    dx_ebr_exit();
    return r;
}

/* cache_clock() -> Ns: CLOCK_MONOTONIC, the clock of every cache time. */
DX_NIF(nif_cache_clock) {
    (void)argc;
    (void)argv;
    return enif_make_int64(env, dx_cache_now_ns());
}

/* cache_gen(bump | current) -> Gen: the view generation (bumped on every view change). */
DX_NIF(nif_cache_gen) {
    (void)argc;
    if (enif_is_identical(argv[0], ATOM_current)) return enif_make_uint64(env, dx_cache_gen());
    if (enif_is_identical(argv[0], ATOM_bump)) return enif_make_uint64(env, dx_cache_gen_bump());
    return enif_make_badarg(env);
}

/* cache_hits(Reset) -> Hits (since load or the last reset); Reset: true zeroes them. */
DX_NIF(nif_cache_hits) {
    (void)argc;
    uint64_t n = dx_cache_hits();
    if (enif_is_identical(argv[0], ATOM_true)) dx_cache_reset_hits();
    else if (!enif_is_identical(argv[0], ATOM_false)) return enif_make_badarg(env);
    return enif_make_uint64(env, n);
}

/* cache_config(Default, HitEvent) -> ok. Default: off | strong | MaxStaleMs
 * (the read var_get/2 and var_get_value/2 try when slow); HitEvent: boolean. */
DX_NIF(nif_cache_config) {
    int64_t ns;
    (void)argc;
    if (enif_is_identical(argv[0], ATOM_off)) ns = CACHE_OFF;
    else if (!get_max_stale(env, argv[0], &ns)) return enif_make_badarg(env);
    if (!enif_is_identical(argv[1], ATOM_true) && !enif_is_identical(argv[1], ATOM_false)) return enif_make_badarg(env);
    atomic_store(&g_cache_hit_event, enif_is_identical(argv[1], ATOM_true));
    atomic_store(&g_cache_default, ns);
    return ATOM_ok;
}

DX_NIF(nif_var_get) {
    return SLOW(DX_NATIVE_GET) ? slow_read(env, argc, argv, 0) : timed(DX_NATIVE_GET, var_get, env, argc, argv);
}
DX_NIF(nif_var_get_here) { return timed(DX_NATIVE_GET, var_get, env, argc, argv); }
DX_NIF(nif_var_get_value) {
    return SLOW(DX_NATIVE_GET_VALUE) ? slow_read(env, argc, argv, 1)
                                     : timed(DX_NATIVE_GET_VALUE, var_get_value, env, argc, argv);
}
DX_NIF(nif_var_get_value_here) { return timed(DX_NATIVE_GET_VALUE, var_get_value, env, argc, argv); }

/* store_fast_path(Op, Fast) -> ok; Op: get | get_value | set. */
DX_NIF(nif_store_fast_path) {
    int op;
    if (enif_is_identical(argv[0], ATOM_get)) op = DX_NATIVE_GET;
    else if (enif_is_identical(argv[0], ATOM_get_value)) op = DX_NATIVE_GET_VALUE;
    else if (enif_is_identical(argv[0], ATOM_set)) op = DX_NATIVE_SET;
    else return enif_make_badarg(env);
    if (!enif_is_identical(argv[1], ATOM_true) && !enif_is_identical(argv[1], ATOM_false)) return enif_make_badarg(env);
    atomic_store(&g_slow[op], !enif_is_identical(argv[1], ATOM_true));
    return ATOM_ok;
}

static ERL_NIF_TERM var_get(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    dx_principal p = {0};
    if (!get_key(env, argv[1], &key, kbuf)) return enif_make_badarg(env);
    if (argc == 3) {
        ErlNifBinary pb;
        if (enif_inspect_binary(env, argv[2], &pb)) {
            /* dspex_store passes a bare principal for the common #{as => P} */
            p.set = 1;
            p.id = (dx_str){(const char *)pb.data, pb.size};
        } else if (!enif_is_map(env, argv[2]) || !dx_principal_parse(env, argv[2], &p)) {
            return enif_make_badarg(env);
        }
    }
    t_res = DX_NATIVE_MISS; /* session_not_found, unless the session is found */
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r;
    dx_var *v = dx_var_find(s, key);
    if (v) {
        /* three more cache misses follow on a big table (snapshot, constraints,
         * rules): start them together rather than one after the other */
        __builtin_prefetch(dx_var_current(v));
        __builtin_prefetch(v->cons);
        if (p.set) __builtin_prefetch(dx_var_acl(v));
    }
    t_res = v ? DX_NATIVE_OK : DX_NATIVE_MISS;
    if (!v) {
        r = dx_error2(env, ATOM_not_found, argv[1]);
    } else if (p.set && !dx_acl_allows(env, dx_var_acl(v), (dx_str){s->id, s->id_len}, &p, DX_PERM_READ)) {
        r = dx_error(env, ATOM_access_denied);
        t_res = DX_NATIVE_ERROR;
        dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &p, ATOM_read);
    } else {
        dx_snap *cur = dx_var_current(v);
        if (big_value(cur) && !dx_on_dirty()) {
            dx_ebr_exit();
            t_res = -1;
            return RESCHEDULE(RS_GET, "var_get", nif_var_get_here);
        }
        int by_name = enif_is_binary(env, argv[1]) && key.len == v->name_len && !memcmp(key.ptr, v->name, key.len);
        /* plain variables: the bare tagged tuple (see dx_var_to_flat) */
        r = v->derived ? enif_make_tuple2(env, ATOM_ok, dx_var_to_term_named(env, v, cur, by_name ? &argv[1] : NULL))
                       : dx_var_to_flat(env, v, cur, by_name ? &argv[1] : NULL);
    }
    dx_ebr_exit();
    return r;
}

static ERL_NIF_TERM var_get_value(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    if (!get_key(env, argv[1], &key, kbuf)) return enif_make_badarg(env);
    t_res = DX_NATIVE_MISS; /* session_not_found, unless the session is found */
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r;
    dx_var *v = dx_var_find(s, key);
    t_res = v ? DX_NATIVE_OK : DX_NATIVE_MISS;
    if (!v) {
        r = dx_error2(env, ATOM_not_found, argv[1]);
    } else {
        dx_snap *cur = dx_var_current(v);
        if (big_value(cur) && !dx_on_dirty()) {
            dx_ebr_exit();
            t_res = -1;
            return RESCHEDULE(RS_GET_VALUE, "var_get_value", nif_var_get_value_here);
        }
        r = enif_make_tuple2(env, ATOM_ok, dx_value_to_term(env, &cur->value));
    }
    dx_ebr_exit();
    return r;
}

DX_NIF(nif_var_exists) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    if (!get_key(env, argv[1], &key, kbuf)) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r = dx_var_find(s, key) ? ATOM_true : ATOM_false;
    dx_ebr_exit();
    return r;
}

/* Options of set/rollback: expected_version, metadata (merged), changed_by,
 * lock, as, context. Never `propagation': the right to write a derived
 * variable comes only with var_set_derived (the propagator's entry). */
typedef struct {
    dx_set_opts o;
    ERL_NIF_TERM meta_patch; /* 0: none */
    ErlNifBinary by;
    int have_by;
    dx_principal principal; /* `as' and `context' */
    dx_acl_ctx acl;
} set_opts_buf;

/* Arms the write-path access check when the write is made `as' another session. */
static void arm_acl(ErlNifEnv *env, set_opts_buf *b, dx_str owner) {
    if (!b->principal.set) return;
    b->o.principal = b->principal.id.ptr; /* the event log records who wrote */
    b->o.principal_len = b->principal.id.len;
    b->acl = (dx_acl_ctx){env, owner, &b->principal, DX_PERM_WRITE};
    b->o.acl_check = dx_acl_write_check;
    b->o.acl_ctx = &b->acl;
}

/* Returns 0, or the atom naming the bad option (the caller answers
 * {error, {invalid_argument, Key}}). */
static ERL_NIF_TERM parse_set_opts(ErlNifEnv *env, ERL_NIF_TERM m, set_opts_buf *b) {
    memset(b, 0, sizeof *b);
    size_t left;
    if (!enif_get_map_size(env, m, &left)) return 0;
    /* Most likely options first; stop once every key of the map was seen, so
     * #{} costs nothing and #{lock => L} one lookup. Unknown keys are ignored. */
    ERL_NIF_TERM v;
    if (left && enif_get_map_value(env, m, ATOM_lock, &v)) {
        left--;
        /* a Lock from dspex_locks:acquire/4, or its bare token */
        ERL_NIF_TERM t = v;
        ErlNifUInt64 tok;
        if ((enif_is_map(env, v) && !enif_get_map_value(env, v, ATOM_token, &t)) || !enif_get_uint64(env, t, &tok) ||
            tok == 0)
            return ATOM_lock;
        b->o.lock_token = tok;
    }
    if (left && enif_get_map_value(env, m, ATOM_expected_version, &v)) {
        left--;
        if (!enif_is_identical(v, ATOM_undefined) && !enif_is_identical(v, ATOM_nil)) {
            ErlNifUInt64 u;
            if (!enif_get_uint64(env, v, &u)) return ATOM_expected_version;
            b->o.has_expected = true;
            b->o.expected = u;
        }
    }
    if (left && enif_get_map_value(env, m, ATOM_metadata, &v)) {
        left--;
        if (!enif_is_map(env, v)) return ATOM_metadata;
        b->meta_patch = v;
    }
    if (left && enif_get_map_value(env, m, ATOM_as, &v)) {
        left--;
        if (!dx_principal_parse(env, m, &b->principal)) return ATOM_as;
    }
    if (left && enif_get_map_value(env, m, ATOM_context, &v)) left--;
    if (left && enif_get_map_value(env, m, ATOM_changed_by, &v)) {
        if (dx_term_to_blob(env, v, &b->by)) return ATOM_changed_by;
        b->have_by = 1;
        b->o.by = b->by.data;
        b->o.by_len = b->by.size;
    }
    return 0;
}

static void set_opts_free(set_opts_buf *b) {
    if (b->have_by) enif_release_binary(&b->by);
    b->have_by = 0;
}

/* Merges the patch into the current metadata; the set then only commits if the
 * snapshot is still current, so concurrent merges never lose keys. */
static int merge_meta(ErlNifEnv *env, const dx_snap *cur, ERL_NIF_TERM patch, ErlNifBinary *out) {
    ERL_NIF_TERM base = dx_blob_to_term(env, cur->meta, cur->meta_len, enif_make_new_map(env));
    ErlNifMapIterator it;
    ERL_NIF_TERM k, v;
    if (!enif_is_map(env, base)) base = enif_make_new_map(env);
    enif_map_iterator_create(env, patch, &it, ERL_NIF_MAP_ITERATOR_FIRST);
    while (enif_map_iterator_get_pair(env, &it, &k, &v)) {
        enif_make_map_put(env, base, k, v, &base);
        enif_map_iterator_next(env, &it);
    }
    enif_map_iterator_destroy(env, &it);
    return dx_term_to_blob(env, base, out);
}

/* One set with retry on concurrent metadata change. Returns the reply term
 * (the caller passes it through dx_watch_finish). */
static ERL_NIF_TERM do_set(ErlNifEnv *env, dx_session *s, dx_var *v, ERL_NIF_TERM sidt, ERL_NIF_TERM key,
                           const dx_value *val, set_opts_buf *ob, dx_notify_ctx *nc) {
    for (;;) {
        ErlNifBinary meta = {0};
        dx_set_opts o = ob->o;
        if (ob->meta_patch) {
            dx_snap *cur = dx_var_current(v);
            if (merge_meta(env, cur, ob->meta_patch, &meta)) return dx_error(env, ATOM_enomem);
            o.set_meta = true;
            o.meta = meta.size ? meta.data : NULL;
            o.meta_len = meta.size;
            o.if_current = cur;
        }
        uint64_t version = 0;
        dx_events_principal(ob->principal.set ? ob->principal.id : (dx_str){0}); /* event log: who wrote */
        int rc = dx_var_set(s, v, val, &o, dx_now_us(), &version, dx_watch_notify, nc);
        dx_events_principal((dx_str){0});
        if (ob->meta_patch) enif_release_binary(&meta);
        if (rc == DX_E_RETRY) continue;
        if (rc == DX_E_INVALID) return dx_error_msg(env, ATOM_invalid_value, "value type does not match the variable");
        if (rc == DX_E_LOCKED) return dx_error(env, locked_reason(env));
        if (rc == DX_E_DENIED) dx_audit(env, ATOM_dspex_denied, sidt, key, &ob->principal, ATOM_write);
        return rc ? dx_rc_error(env, rc, key, version, DX_L_VALUE_SIZE, NULL)
                  : enif_make_tuple2(env, ATOM_ok, enif_make_uint64(env, version));
    }
}

static ERL_NIF_TERM nif_var_set_settled(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);
static ERL_NIF_TERM nif_var_set_derived_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);

/* set(Session, Key, Value, Opts); settle: dspex_store:set/4's fast path, which leaves the event log's
 * durability to this call (dx_events_settle); derived: the propagator's write of a derived variable */
static ERL_NIF_TERM var_set_common(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[], int settle, int derived) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    if (!get_key(env, argv[1], &key, kbuf) || !enif_is_map(env, argv[3]) || !dx_principal_ok(env, argv[3]))
        return enif_make_badarg(env);
    if (!dx_on_dirty() && big_input(env, argv[2])) {
        t_res = -1;
        return settle    ? RESCHEDULE(RS_SET, "var_set", nif_var_set_settled)
               : derived ? RESCHEDULE(RS_SET, "var_set", nif_var_set_derived_dirty)
                         : RESCHEDULE(RS_SET, "var_set", nif_var_set_here);
    }
    dx_str sid;
    if (!get_sid(env, argv[0], &sid)) return enif_make_badarg(env);
    set_opts_buf ob;
    ERL_NIF_TERM bad = parse_set_opts(env, argv[3], &ob);
    if (bad) {
        set_opts_free(&ob);
        t_res = DX_NATIVE_ERROR;
        return dx_error2(env, ATOM_invalid_argument, bad);
    }
    ob.o.propagation = derived;
    dx_rawbuf b;
    char err[DX_ERRLEN];
    ERL_NIF_TERM r;
    dx_notify_ctx nc;
    dx_notify_ctx_init(&nc, env, 1);
    dx_ebr_enter();
    dx_session *s = dx_session_find(sid, dx_now_ms());
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    if (s) arm_acl(env, &ob, sid);
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
    } else if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
        r = dx_error(env, ATOM_rate_limited);
        dx_audit(env, ATOM_dspex_rate_limited, argv[0], argv[1], &ob.principal, 0);
    } else if (!v) {
        r = dx_error2(env, ATOM_not_found, argv[1]);
    } else if (dx_term_to_raw(env, argv[2], &b, dx_store_limits().max_value_bytes)) {
        dx_rawbuf_free(&b); /* what the conversion allocated before it failed */
        r = dx_error(env, ATOM_enomem);
    } else {
        dx_value val;
        if (b.too_big) r = dx_limit_error(env, DX_L_VALUE_SIZE);
        else if (dx_value_check(v->type, v->cons, &b.raw, &val, err, sizeof err)) r = dx_error_msg(env, ATOM_invalid_value, err);
        else r = do_set(env, s, v, argv[0], argv[1], &val, &ob, &nc);
        dx_rawbuf_free(&b);
    }
    dx_ebr_exit();
    set_opts_free(&ob);
    int arity;
    const ERL_NIF_TERM *el;
    t_res = enif_get_tuple(env, r, &arity, &el) && arity == 2 && enif_is_identical(el[0], ATOM_ok) ? DX_NATIVE_OK
                                                                                             : DX_NATIVE_ERROR;
    /* the durability first: dx_watch_finish may return enif_schedule_nif's result (the rest of the drain on a
     * dirty scheduler), which is no term to inspect, only to return; the settled reply travels with it */
    if (settle) r = dx_events_settle(env, argv[3], r);
    /* outside the EBR section and every lock: the watch messages */
    return dx_watch_finish(env, &nc, r);
}

static ERL_NIF_TERM var_set(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    return var_set_common(env, argc, argv, 0, 0);
}
static ERL_NIF_TERM var_set_settle(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    return var_set_common(env, argc, argv, 1, 0);
}
static ERL_NIF_TERM var_set_derived(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    return var_set_common(env, argc, argv, 0, 1);
}

/* var_set/4 (dspex_store:set/4 only): the write and its event log durability in one call */
DX_NIF(nif_var_set) { return SLOW(DX_NATIVE_SET) ? ATOM_slow : timed(DX_NATIVE_SET, var_set_settle, env, argc, argv); }
DX_NIF(nif_var_set_here) { return timed(DX_NATIVE_SET, var_set, env, argc, argv); }
/* var_set/4 of a big value, moved to a dirty scheduler */
static ERL_NIF_TERM nif_var_set_settled(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    return timed(DX_NATIVE_SET, var_set_settle, env, argc, argv);
}
/* var_set_derived/4 (dspex_store:set_derived/4, the propagator's only): like
 * var_set_here, and the one write a derived variable accepts */
DX_NIF(nif_var_set_derived) { return timed(DX_NATIVE_SET, var_set_derived, env, argc, argv); }
static ERL_NIF_TERM nif_var_set_derived_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    return timed(DX_NATIVE_SET, var_set_derived, env, argc, argv);
}

/* ---- owner: the replication fast path's set (repl_nif.c, issue #21) ------ */

/* True when set(_, _, Value, _) would move to a dirty scheduler: the fast path leaves it to the writer. */
int dx_set_plain_big(ErlNifEnv *env, ERL_NIF_TERM value) { return big_input(env, value); }

/* set(Session, Key, Value, #{}) as var_set makes it, inside the caller's critical section: the reply
 * ({ok, Version} or the error); the watch messages are queued on nc (the caller passes nc to
 * dx_watch_finish outside its locks). Bad arguments are {error, badarg}-free: badarg terms. */
ERL_NIF_TERM dx_set_plain(ErlNifEnv *env, ERL_NIF_TERM sidt, ERL_NIF_TERM keyt, ERL_NIF_TERM valt, dx_notify_ctx *nc) {
    char kbuf[DX_ATOM_TEXT], err[DX_ERRLEN];
    dx_str key, sid;
    if (!get_key(env, keyt, &key, kbuf) || !get_sid(env, sidt, &sid)) return enif_make_badarg(env);
    set_opts_buf ob;
    memset(&ob, 0, sizeof ob);
    dx_rawbuf b;
    ERL_NIF_TERM r;
    /* counted by the native analytics like a set through var_set (the owner's dashboards see these sets) */
    int timing = atomic_load_explicit(&dx_native_enabled[DX_NATIVE_SET], memory_order_relaxed);
    uint64_t t0 = timing ? dx_native_ticks() : 0;
    dx_ebr_enter();
    dx_session *s = dx_session_find(sid, dx_now_ms());
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
    } else if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
        r = dx_error(env, ATOM_rate_limited);
        dx_audit(env, ATOM_dspex_rate_limited, sidt, keyt, &ob.principal, 0);
    } else if (!v) {
        r = dx_error2(env, ATOM_not_found, keyt);
    } else if (dx_term_to_raw(env, valt, &b, dx_store_limits().max_value_bytes)) {
        dx_rawbuf_free(&b);
        r = dx_error(env, ATOM_enomem);
    } else {
        dx_value val;
        if (b.too_big) r = dx_limit_error(env, DX_L_VALUE_SIZE);
        else if (dx_value_check(v->type, v->cons, &b.raw, &val, err, sizeof err)) r = dx_error_msg(env, ATOM_invalid_value, err);
        else r = do_set(env, s, v, sidt, keyt, &val, &ob, nc);
        dx_rawbuf_free(&b);
    }
    dx_ebr_exit();
    if (timing) {
        int arity;
        const ERL_NIF_TERM *el;
        dx_native_record(DX_NATIVE_SET,
                         enif_get_tuple(env, r, &arity, &el) && arity == 2 && enif_is_identical(el[0], ATOM_ok)
                             ? DX_NATIVE_OK
                             : DX_NATIVE_ERROR,
                         t0);
    }
    return r;
}

/* ---- replicas: a batch of the owner's sets in one call (issue #21) --------
 *
 * replica_apply_batch(Session, {Epoch, Seq, Fence}, [{Epoch, Seq, Key, Value, Opts, Version}])
 *   -> {{Epoch, Seq, Fence}, [ok | {error, need_full} | {error, {stale_epoch, Known}}]}
 *
 * The replica's state of the session in (its row in dspex_cluster_sessions),
 * the owner's replayed sets in commit order; each is taken with the rules of
 * core/repl.h (an older epoch refused, a repeat ignored (ok), a gap
 * need_full) and applied as set(Session, Key, Value, Opts) would be: it must
 * reach the owner's Version, else it is need_full and so is every later one.
 * The new state and one outcome per set come back; the caller writes the row.
 * A malformed argument is badarg and changes nothing. More than
 * REPL_NORMAL_MAX sets (4 us each at most under load: 250 us), or a big value, run on a dirty scheduler. */
#define REPL_NORMAL_MAX 64

typedef struct {
    ErlNifEnv *env;
    dx_session *s; /* NULL: the session is not here (every set fails) */
    ERL_NIF_TERM sidt;
    dx_str sid;
    const ERL_NIF_TERM **tups;
    dx_notify_ctx *nc;
} repl_ctx;

/* One set of the batch, as var_set makes it; 0 when it reached the owner's version. */
static int repl_apply_one(void *vctx, size_t i) {
    repl_ctx *c = vctx;
    ErlNifEnv *env = c->env;
    const ERL_NIF_TERM *t = c->tups[i];
    if (!c->s) return 1;
    char kbuf[DX_ATOM_TEXT], err[DX_ERRLEN];
    dx_str key;
    ErlNifUInt64 want;
    get_key(env, t[2], &key, kbuf);
    enif_get_uint64(env, t[5], &want);
    set_opts_buf ob;
    if (parse_set_opts(env, t[4], &ob)) {
        set_opts_free(&ob);
        return 1;
    }
    arm_acl(env, &ob, c->sid);
    int failed = 1;
    dx_var *v = dx_var_find(c->s, key);
    if (c->s->rate > 0 && dx_session_take(c->s, dx_now_ns())) {
        dx_audit(env, ATOM_dspex_rate_limited, c->sidt, t[2], &ob.principal, 0);
    } else if (v) {
        dx_rawbuf b;
        dx_value val;
        if (!dx_term_to_raw(env, t[3], &b, dx_store_limits().max_value_bytes) && !b.too_big &&
            !dx_value_check(v->type, v->cons, &b.raw, &val, err, sizeof err)) {
            ERL_NIF_TERM r = do_set(env, c->s, v, c->sidt, t[2], &val, &ob, c->nc);
            int arity;
            const ERL_NIF_TERM *el;
            ErlNifUInt64 got;
            failed = !(enif_get_tuple(env, r, &arity, &el) && arity == 2 && enif_is_identical(el[0], ATOM_ok) &&
                       enif_get_uint64(env, el[1], &got) && got == want);
        }
        dx_rawbuf_free(&b);
    }
    set_opts_free(&ob);
    return failed;
}

static int get_u64(ErlNifEnv *env, ERL_NIF_TERM t, uint64_t *out) {
    ErlNifUInt64 u;
    if (!enif_get_uint64(env, t, &u)) return 0;
    *out = u;
    return 1;
}

static void repl_free(void *a, void *b, void *c, void *d) {
    void *p[4] = {a, b, c, d};
    for (int i = 0; i < 4; i++)
        if (p[i]) enif_free(p[i]);
}

DX_NIF(nif_replica_apply_batch) {
    dx_str sid;
    const ERL_NIF_TERM *st;
    int arity;
    unsigned n;
    dx_repl_state state;
    if (!get_sid(env, argv[0], &sid) || !enif_get_tuple(env, argv[1], &arity, &st) || arity != 3 ||
        !get_u64(env, st[0], &state.epoch) || !get_u64(env, st[1], &state.seq) || !get_u64(env, st[2], &state.fence) ||
        !enif_get_list_length(env, argv[2], &n))
        return enif_make_badarg(env);
    /* every record checked before anything is applied: a badarg changes nothing */
    size_t cnt = n ? n : 1;
    const ERL_NIF_TERM **tups = enif_alloc(cnt * sizeof *tups);
    dx_repl_rec *recs = enif_alloc(cnt * sizeof *recs);
    dx_repl_outcome *out = enif_alloc(cnt * sizeof *out);
    ERL_NIF_TERM *res = enif_alloc(cnt * sizeof *res);
    ERL_NIF_TERM l = argv[2], h, r;
    int big = 0;
    if (!tups || !recs || !out || !res) {
        r = dx_error(env, ATOM_enomem);
        goto done;
    }
    for (unsigned i = 0; enif_get_list_cell(env, l, &h, &l); i++) {
        char kbuf[DX_ATOM_TEXT];
        dx_str k;
        ErlNifUInt64 ver;
        if (!enif_get_tuple(env, h, &arity, &tups[i]) || arity != 6 || !get_u64(env, tups[i][0], &recs[i].epoch) ||
            !get_u64(env, tups[i][1], &recs[i].seq) || !get_key(env, tups[i][2], &k, kbuf) ||
            !enif_is_map(env, tups[i][4]) || !dx_principal_ok(env, tups[i][4]) || !enif_get_uint64(env, tups[i][5], &ver)) {
            r = enif_make_badarg(env);
            goto done;
        }
        big |= big_input(env, tups[i][3]);
    }
    if (!dx_on_dirty() && (n > REPL_NORMAL_MAX || big)) {
        repl_free(tups, recs, out, res);
        return RESCHEDULE(RS_REPLICA_BATCH, "replica_apply_batch", nif_replica_apply_batch);
    }
    {
        dx_notify_ctx nc;
        dx_notify_ctx_init(&nc, env, n);
        dx_ebr_enter();
        repl_ctx c = {env, dx_session_find(sid, dx_now_ms()), argv[0], sid, tups, &nc};
        dx_repl_apply_batch(&state, recs, n, repl_apply_one, &c, out);
        dx_ebr_exit();
        for (unsigned i = 0; i < n; i++) {
            switch (out[i].verdict) {
            case DX_REPL_APPLIED:
            case DX_REPL_REPEAT: res[i] = ATOM_ok; break;
            case DX_REPL_STALE:
                res[i] = dx_error2(env, ATOM_stale_epoch, enif_make_uint64(env, out[i].known));
                break;
            default: res[i] = dx_error(env, ATOM_need_full); break;
            }
        }
        ERL_NIF_TERM nst = enif_make_tuple3(env, enif_make_uint64(env, state.epoch), enif_make_uint64(env, state.seq),
                                            enif_make_uint64(env, state.fence));
        r = enif_make_tuple2(env, nst, enif_make_list_from_array(env, res, n));
        repl_free(tups, recs, out, res);
        /* outside the EBR section and every lock: the watch messages */
        return dx_watch_finish(env, &nc, r);
    }
done:
    repl_free(tups, recs, out, res);
    return r;
}


DX_NIF(nif_var_delete) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    if (!get_key(env, argv[1], &key, kbuf)) return enif_make_badarg(env);
    dx_principal p = {0};
    if (argc == 3 && (!enif_is_map(env, argv[2]) || !dx_principal_parse(env, argv[2], &p))) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r = ATOM_ok;
    dx_var *v = dx_var_find(s, key);
    /* the access check runs under the shard mutex, on the variable deleted */
    dx_acl_ctx actx = {env, (dx_str){s->id, s->id_len}, &p, DX_PERM_WRITE};
    dx_set_opts o = {.acl_check = p.set ? dx_acl_write_check : NULL, .acl_ctx = &actx,
                     .principal = p.set ? p.id.ptr : NULL, .principal_len = p.set ? p.id.len : 0};
    int rc = v ? dx_var_delete_checked(s, v, &o) : DX_E_NOT_FOUND;
    if (rc == DX_E_LOCKED) r = dx_error(env, locked_reason(env));
    else if (rc == DX_E_DENIED) {
        r = dx_error(env, ATOM_access_denied);
        dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &p, ATOM_write);
    } else if (rc) r = dx_error2(env, ATOM_not_found, argv[1]);
    dx_ebr_exit();
    return r;
}

/* list(Session, Pattern | all) -> {ok, [Var]} sorted by name */
DX_NIF(nif_var_list) {
    ErlNifBinary pat = {0};
    int all = enif_is_identical(argv[1], ATOM_all);
    if (!all) {
        if (!enif_inspect_binary(env, argv[1], &pat)) return enif_make_badarg(env);
        if (dx_glob_check((const char *)pat.data, pat.size)) return dx_error2(env, ATOM_invalid_argument, ATOM_pattern);
    }
    dx_principal p = {0};
    if (argc == 3 && (!enif_is_map(env, argv[2]) || !dx_principal_parse(env, argv[2], &p))) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    if (!dx_on_dirty() && dx_session_nvars(s) > BIG_SESSION) {
        dx_ebr_exit();
        return RESCHEDULE(RS_LIST, "var_list", nif_var_list);
    }
    size_t n = 0;
    dx_var **vars = dx_session_vars_sorted(s, &n);
    if (vars && !dx_on_dirty()) {
        /* few variables, but their values may be big */
        size_t cost = 0;
        for (size_t i = 0; i < n; i++) cost += snap_cost(dx_var_current(vars[i]));
        if (cost > BIG_VALUE_BYTES) {
            free(vars);
            dx_ebr_exit();
            return RESCHEDULE(RS_LIST, "var_list", nif_var_list);
        }
    }
    ERL_NIF_TERM r;
    if (!vars && n) {
        r = dx_error(env, ATOM_enomem);
    } else {
        ERL_NIF_TERM l = enif_make_list(env, 0);
        for (size_t i = n; i > 0; i--) {
            dx_var *v = vars[i - 1];
            if ((all || dx_glob_match((const char *)pat.data, pat.size, v->name, v->name_len) == 1) &&
                (!p.set || dx_acl_allows(env, dx_var_acl(v), (dx_str){s->id, s->id_len}, &p, DX_PERM_READ)))
                l = enif_make_list_cell(env, dx_var_to_term(env, v, dx_var_current(v)), l);
        }
        r = enif_make_tuple2(env, ATOM_ok, l);
    }
    free(vars);
    dx_ebr_exit();
    return r;
}

/* get_many(Session, Keys) -> {ok, #{found => #{Key => Var}, missing => [Key]}} */
DX_NIF(nif_var_get_many) {
    unsigned len;
    dx_principal p = {0};
    if (!enif_get_list_length(env, argv[1], &len)) return enif_make_badarg(env);
    if (argc == 3 && (!enif_is_map(env, argv[2]) || !dx_principal_parse(env, argv[2], &p))) return enif_make_badarg(env);
    ERL_NIF_TERM l = argv[1], h;
    while (enif_get_list_cell(env, l, &h, &l)) {
        char kbuf[DX_ATOM_TEXT];
        dx_str k;
        if (!get_key(env, h, &k, kbuf)) return enif_make_badarg(env);
    }
    if (!dx_on_dirty() && len > 200) return RESCHEDULE(RS_GET_MANY, "var_get_many", nif_var_get_many);
    WITH_SESSION(s, argv[0]);
    if (!dx_on_dirty()) {
        /* the reply's size decides, not the key count alone */
        size_t cost = 0;
        for (l = argv[1]; enif_get_list_cell(env, l, &h, &l);) {
            char kbuf[DX_ATOM_TEXT];
            dx_str k;
            get_key(env, h, &k, kbuf);
            dx_var *v = dx_var_find(s, k);
            if (v) cost += snap_cost(dx_var_current(v));
        }
        if (cost > BIG_VALUE_BYTES) {
            dx_ebr_exit();
            return RESCHEDULE(RS_GET_MANY, "var_get_many", nif_var_get_many);
        }
    }
    ERL_NIF_TERM found = enif_make_new_map(env), missing = enif_make_list(env, 0), denied = enif_make_list(env, 0);
    l = argv[1];
    while (enif_get_list_cell(env, l, &h, &l)) {
        char kbuf[DX_ATOM_TEXT];
        dx_str k;
        get_key(env, h, &k, kbuf);
        dx_var *v = dx_var_find(s, k);
        if (v && p.set && !dx_acl_allows(env, dx_var_acl(v), (dx_str){s->id, s->id_len}, &p, DX_PERM_READ)) {
            denied = enif_make_list_cell(env, h, denied);
            dx_audit(env, ATOM_dspex_denied, argv[0], h, &p, ATOM_read);
        } else if (v) {
            enif_make_map_put(env, found, h, dx_var_to_term(env, v, dx_var_current(v)), &found);
        } else {
            missing = enif_make_list_cell(env, h, missing);
        }
    }
    dx_ebr_exit();
    ERL_NIF_TERM rev, drev;
    enif_make_reverse_list(env, missing, &rev);
    enif_make_reverse_list(env, denied, &drev);
    /* `denied' only appears when the call was made `as' another session */
    ERL_NIF_TERM keys[3] = {ATOM_denied, ATOM_found, ATOM_missing}, vals[3] = {drev, found, rev}, m;
    if (p.set) enif_make_map_from_arrays(env, keys, vals, 3, &m);
    else enif_make_map_from_arrays(env, keys + 1, vals + 1, 2, &m);
    return enif_make_tuple2(env, ATOM_ok, m);
}

/* set_many(Session, [{Key, Value, Opts}], Atomic) */
DX_NIF(nif_var_set_many) {
    unsigned n;
    if (!enif_get_list_length(env, argv[1], &n) || !(enif_is_identical(argv[2], ATOM_true) || enif_is_identical(argv[2], ATOM_false)))
        return enif_make_badarg(env);
    bool atomic = enif_is_identical(argv[2], ATOM_true);
    /* validate shapes first: a badarg must change nothing */
    ERL_NIF_TERM l = argv[1], h;
    size_t lists = 0;
    while (enif_get_list_cell(env, l, &h, &l)) {
        const ERL_NIF_TERM *tup;
        int arity;
        char kbuf[DX_ATOM_TEXT];
        dx_str k;
        if (!enif_get_tuple(env, h, &arity, &tup) || arity != 3 || !get_key(env, tup[0], &k, kbuf) || !enif_is_map(env, tup[2]) ||
            !dx_principal_ok(env, tup[2]))
            return enif_make_badarg(env);
        lists += enif_is_list(env, tup[1]) || enif_is_map(env, tup[1]);
    }
    if (!dx_on_dirty() && (n > 100 || lists > 0)) return RESCHEDULE(RS_SET_MANY, "var_set_many", nif_var_set_many);
    WITH_SESSION(s, argv[0]);
    size_t cnt = n ? n : 1;
    dx_set_item *items = enif_alloc(cnt * sizeof *items);
    dx_rawbuf *bufs = enif_alloc(cnt * sizeof *bufs);
    set_opts_buf *obs = enif_alloc(cnt * sizeof *obs);
    const ERL_NIF_TERM **tups = enif_alloc(cnt * sizeof *tups);
    dx_var **vars = enif_alloc(cnt * sizeof *vars);
    ERL_NIF_TERM *errs = enif_alloc(cnt * sizeof *errs);
    int *slot = enif_alloc(cnt * sizeof *slot); /* item index per update, -1 failed before the locks */
    ERL_NIF_TERM r;
    size_t ni = 0, nbufs = 0, nobs = 0;
    int any_err = 0;
    dx_notify_ctx nc;
    dx_notify_ctx_init(&nc, env, 0);
    if (!items || !bufs || !obs || !tups || !vars || !errs || !slot) {
        r = dx_error(env, ATOM_enomem);
        goto out;
    }
    /* Resolve every key first: a variable named twice (by name, atom or id)
     * refuses the whole batch, whatever else is wrong with either update. */
    l = argv[1];
    for (unsigned i = 0; enif_get_list_cell(env, l, &h, &l); i++) {
        int arity;
        char kbuf[DX_ATOM_TEXT];
        dx_str k;
        enif_get_tuple(env, h, &arity, &tups[i]);
        get_key(env, tups[i][0], &k, kbuf);
        vars[i] = dx_var_find(s, k);
        for (unsigned j = 0; vars[i] && j < i; j++)
            if (vars[j] == vars[i]) {
                r = dx_error2(env, ATOM_duplicate_variable, tups[i][0]);
                goto out;
            }
    }
    for (unsigned i = 0; i < n; i++) {
        const ERL_NIF_TERM *tup = tups[i];
        char err[DX_ERRLEN];
        dx_var *v = vars[i];
        slot[i] = -1;
        ERL_NIF_TERM bad = parse_set_opts(env, tup[2], &obs[nobs]);
        if (bad) {
            set_opts_free(&obs[nobs]);
            errs[i] = enif_make_tuple2(env, ATOM_invalid_argument, bad);
            any_err = 1;
            continue;
        }
        set_opts_buf *ob = &obs[nobs++];
        arm_acl(env, ob, (dx_str){s->id, s->id_len});
        if (!v) {
            errs[i] = enif_make_tuple2(env, ATOM_not_found, tup[0]);
            any_err = 1;
            continue;
        }
        dx_rawbuf *b = &bufs[nbufs];
        if (dx_term_to_raw(env, tup[1], b, dx_store_limits().max_value_bytes)) {
            dx_rawbuf_free(b);
            errs[i] = ATOM_enomem;
            any_err = 1;
            continue;
        }
        nbufs++;
        dx_value val;
        if (b->too_big) {
            errs[i] = enif_make_tuple2(env, ATOM_limit_exceeded, ATOM_value_size);
            any_err = 1;
            continue;
        }
        if (dx_value_check(v->type, v->cons, &b->raw, &val, err, sizeof err)) {
            errs[i] = enif_make_tuple2(env, ATOM_invalid_value, dx_make_bin(env, err, strlen(err)));
            any_err = 1;
            continue;
        }
        /* Metadata patches are merged now: no retry loop inside the batch's locks. */
        if (ob->meta_patch) {
            ErlNifBinary mb;
            if (!merge_meta(env, dx_var_current(v), ob->meta_patch, &mb)) {
                ERL_NIF_TERM keep;
                unsigned char *d = enif_make_new_binary(env, mb.size, &keep);
                memcpy(d, mb.data, mb.size);
                ob->o.set_meta = true;
                ob->o.meta = d;
                ob->o.meta_len = mb.size;
                enif_release_binary(&mb);
            }
        }
        items[ni] = (dx_set_item){.var = v, .value = val, .opts = ob->o};
        slot[i] = (int)ni++;
    }
    {
        /* An atomic batch that already failed still runs the in-lock checks
         * (check_only) so that every failing update is reported. */
        bool committed = !(atomic && any_err);
        dx_notify_ctx_init(&nc, env, ni);
        dx_var_set_many(s, items, ni, atomic, !committed, dx_now_us(), dx_watch_notify, &nc);
        ERL_NIF_TERM ok_map = enif_make_new_map(env), err_map = enif_make_new_map(env);
        bool failed = false;
        for (unsigned i = 0; i < n; i++) {
            ERL_NIF_TERM key = tups[i][0];
            if (slot[i] < 0) {
                enif_make_map_put(env, err_map, key, errs[i], &err_map);
                failed = true;
                continue;
            }
            dx_set_item *it = &items[slot[i]];
            if (it->rc == DX_OK) {
                if (committed) enif_make_map_put(env, ok_map, key, enif_make_uint64(env, it->version), &ok_map);
            } else {
                ERL_NIF_TERM why =
                    it->rc == DX_E_LOCKED
                        ? enif_make_tuple2(env, ATOM_locked,
                                           it->holder_len ? dx_blob_to_term(env, it->holder, it->holder_len, ATOM_undefined)
                                                          : ATOM_undefined)
                        : rc_reason(env, it->rc, key, it->version, DX_L_VALUE_SIZE, NULL);
                if (it->rc == DX_E_DENIED)
                    dx_audit(env, ATOM_dspex_denied, argv[0], key, ((dx_acl_ctx *)it->opts.acl_ctx)->principal, ATOM_write);
                enif_make_map_put(env, err_map, key, why, &err_map);
                failed = true;
            }
        }
        if (atomic && failed) {
            r = dx_error2(env, ATOM_batch_failed, err_map);
        } else if (atomic) {
            r = enif_make_tuple2(env, ATOM_ok, ok_map);
        } else {
            ERL_NIF_TERM k2[2] = {ATOM_errors, ATOM_updated}, v2[2] = {err_map, ok_map}, m;
            enif_make_map_from_arrays(env, k2, v2, 2, &m);
            r = enif_make_tuple2(env, ATOM_ok, m);
        }
    }
out:
    dx_ebr_exit();
    for (size_t i = 0; items && i < ni; i++) free(items[i].holder);
    for (size_t i = 0; i < nbufs; i++) dx_rawbuf_free(&bufs[i]);
    for (size_t i = 0; i < nobs; i++) set_opts_free(&obs[i]);
    if (items) enif_free(items);
    if (bufs) enif_free(bufs);
    if (obs) enif_free(obs);
    if (tups) enif_free(tups);
    if (vars) enif_free(vars);
    if (errs) enif_free(errs);
    if (slot) enif_free(slot);
    return dx_watch_finish(env, &nc, r);
}

static size_t history_cost(dx_snap **out, long n) {
    size_t cost = 0;
    for (long i = 0; i < n; i++) cost += snap_cost(out[i]);
    return cost;
}

/* history(Session, Key, Limit | all) -> {ok, [Entry]} newest first */
DX_NIF(nif_var_history) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    ErlNifUInt64 lim = UINT64_MAX;
    dx_principal p = {0};
    if (!get_key(env, argv[1], &key, kbuf) || !(enif_is_identical(argv[2], ATOM_all) || enif_get_uint64(env, argv[2], &lim)))
        return enif_make_badarg(env);
    if (argc == 4 && (!enif_is_map(env, argv[3]) || !dx_principal_parse(env, argv[3], &p))) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r;
    dx_var *v = dx_var_find(s, key);
    if (!v) {
        r = dx_error2(env, ATOM_not_found, argv[1]);
    } else if (p.set && !dx_acl_allows(env, dx_var_acl(v), (dx_str){s->id, s->id_len}, &p, DX_PERM_READ)) {
        r = dx_error(env, ATOM_access_denied);
        dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &p, ATOM_read);
    } else {
        size_t max = v->history_limit < lim ? v->history_limit : (size_t)lim;
        dx_snap **out = enif_alloc((max ? max : 1) * sizeof *out);
        long n = out ? dx_var_history(s, v, out, max) : -2;
        if (n == -2) r = dx_error(env, ATOM_enomem);
        else if (n < 0) r = dx_error2(env, ATOM_not_found, argv[1]);
        else if (!dx_on_dirty() && history_cost(out, n) > BIG_VALUE_BYTES) {
            enif_free(out);
            dx_ebr_exit();
            return RESCHEDULE(RS_HISTORY, "var_history", nif_var_history);
        } else {
            ERL_NIF_TERM l = enif_make_list(env, 0);
            for (long i = n; i > 0; i--) l = enif_make_list_cell(env, dx_snap_to_term(env, out[i - 1]), l);
            r = enif_make_tuple2(env, ATOM_ok, l);
        }
        if (out) enif_free(out);
    }
    dx_ebr_exit();
    return r;
}

/* The size of the version a rollback would bring back (0 if not kept). */
static size_t rollback_cost(dx_session *s, dx_var *v, uint64_t target) {
    dx_snap *cur = dx_var_current(v);
    if (cur->version == target) return snap_cost(cur);
    dx_snap **hist = enif_alloc((v->history_limit ? v->history_limit : 1) * sizeof *hist);
    if (!hist) return 0;
    long nh = dx_var_history(s, v, hist, v->history_limit);
    size_t cost = 0;
    for (long i = 0; i < nh; i++)
        if (hist[i]->version == target) cost = snap_cost(hist[i]);
    enif_free(hist);
    return cost;
}

/* rollback(Session, Key, Version, Opts) -> {ok, NewVersion} */
DX_NIF(nif_var_rollback) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    ErlNifUInt64 target;
    set_opts_buf ob;
    dx_str sid;
    if (!get_key(env, argv[1], &key, kbuf) || !enif_get_uint64(env, argv[2], &target) || !enif_is_map(env, argv[3]) ||
        !dx_principal_ok(env, argv[3]) || !get_sid(env, argv[0], &sid))
        return enif_make_badarg(env);
    ERL_NIF_TERM bad = parse_set_opts(env, argv[3], &ob);
    if (bad) {
        set_opts_free(&ob);
        return dx_error2(env, ATOM_invalid_argument, bad);
    }
    ERL_NIF_TERM r;
    dx_notify_ctx nc;
    dx_notify_ctx_init(&nc, env, 1);
    dx_ebr_enter();
    dx_session *s = dx_session_find(sid, dx_now_ms());
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    if (s) arm_acl(env, &ob, sid);
    if (!s) r = dx_error(env, ATOM_session_not_found);
    else if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
        r = dx_error(env, ATOM_rate_limited);
        dx_audit(env, ATOM_dspex_rate_limited, argv[0], argv[1], &ob.principal, 0);
    }
    else if (!v) r = dx_error2(env, ATOM_not_found, argv[1]);
    else if (!dx_on_dirty() && rollback_cost(s, v, target) > BIG_VALUE_BYTES) {
        /* the old value is copied into the new version under the shard mutex */
        dx_ebr_exit();
        set_opts_free(&ob);
        return RESCHEDULE(RS_ROLLBACK, "var_rollback", nif_var_rollback);
    } else {
        for (;;) {
            uint64_t version = target;
            dx_set_opts o = ob.o;
            ErlNifBinary meta = {0};
            int rc = DX_OK;
            if (ob.meta_patch) {
                /* The patch merges into the metadata of the version brought back;
                 * the rollback then commits only if nothing changed meanwhile. */
                dx_snap *cur = dx_var_current(v), *src = cur->version == target ? cur : NULL;
                dx_snap **hist = src ? NULL : enif_alloc((v->history_limit ? v->history_limit : 1) * sizeof *hist);
                long nh = hist ? dx_var_history(s, v, hist, v->history_limit) : 0;
                for (long i = 0; !src && i < nh; i++)
                    if (hist[i]->version == target) src = hist[i];
                if (!src) rc = nh < 0 ? DX_E_NOT_FOUND : DX_E_VERSION_NOT_FOUND;
                else if (merge_meta(env, src, ob.meta_patch, &meta)) rc = DX_E_NOMEM;
                if (hist) enif_free(hist);
                o.set_meta = true;
                o.meta = meta.size ? meta.data : NULL;
                o.meta_len = meta.size;
                o.if_current = cur;
            }
            if (!rc) rc = dx_var_rollback(s, v, target, &o, dx_now_us(), &version, dx_watch_notify, &nc);
            if (meta.data) enif_release_binary(&meta);
            if (rc == DX_E_RETRY) continue;
            if (rc == DX_E_DENIED) dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &ob.principal, ATOM_write);
            r = rc == DX_E_LOCKED ? dx_error(env, locked_reason(env))
                : rc ? dx_rc_error(env, rc, argv[1], version, DX_L_VALUE_SIZE, NULL)
                   : enif_make_tuple2(env, ATOM_ok, enif_make_uint64(env, version));
            break;
        }
    }
    dx_ebr_exit();
    set_opts_free(&ob);
    return dx_watch_finish(env, &nc, r);
}

/* var_info(Session, Key) -> {ok, #{watchers, history_size, history_limit, version, changed_by}}:
 * introspection for tests and operators (version and changed_by of the current version). */
DX_NIF(nif_var_info) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    if (!get_key(env, argv[1], &key, kbuf)) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    ERL_NIF_TERM r;
    dx_var *v = dx_var_find(s, key);
    size_t nw = 0, nh = 0;
    if (!v || dx_var_info(s, v, &nw, &nh)) {
        r = dx_error2(env, ATOM_not_found, argv[1]);
    } else {
        dx_snap *cur = dx_var_current(v);
        ERL_NIF_TERM keys[5] = {ATOM_history_limit, ATOM_history_size, ATOM_watchers, ATOM_version, ATOM_changed_by};
        ERL_NIF_TERM vals[5] = {enif_make_uint64(env, v->history_limit), enif_make_uint64(env, nh), enif_make_uint64(env, nw),
                                enif_make_uint64(env, cur->version), dx_blob_to_term(env, cur->by, cur->by_len, ATOM_undefined)};
        ERL_NIF_TERM m;
        enif_make_map_from_arrays(env, keys, vals, 5, &m);
        r = enif_make_tuple2(env, ATOM_ok, m);
    }
    dx_ebr_exit();
    return r;
}

/* var_lock(Session, Key, Holder, Expect[, Opts[, Meta]]) -> {ok, Token} | {error, {locked, Holder}}:
 * used by dspex_locks only. Expect is the token the caller believes current
 * (0: the variable must be free); preemption passes the holder's token. Opts
 * may hold `as' / `context' (a principal that does not parse is badarg, as
 * everywhere). Meta (any term) is kept with the lock in the lock registry
 * until it is unlocked, replaced or found gone by lock_list/0: a restarted
 * dspex_locks rebuilds its state from it. */
DX_NIF(nif_var_lock) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key, sid;
    ErlNifUInt64 expect;
    dx_principal p = {0};
    if (!get_key(env, argv[1], &key, kbuf) || !enif_get_uint64(env, argv[3], &expect) || !get_sid(env, argv[0], &sid) ||
        (argc >= 5 && (!enif_is_map(env, argv[4]) || !dx_principal_parse(env, argv[4], &p))))
        return enif_make_badarg(env);
    ErlNifBinary holder, meta = {0};
    if (dx_term_to_blob(env, argv[2], &holder)) return dx_error(env, ATOM_enomem);
    if (argc == 6 && dx_term_to_blob(env, argv[5], &meta)) {
        enif_release_binary(&holder);
        return dx_error(env, ATOM_enomem);
    }
    dx_ebr_enter();
    dx_session *s = dx_session_find(sid, dx_now_ms());
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    ERL_NIF_TERM r;
    uint64_t token = 0;
    dx_acl_ctx actx = {env, sid, &p, DX_PERM_OPTIMIZE};
    dx_set_opts acl = {.acl_check = p.set ? dx_acl_write_check : NULL, .acl_ctx = &actx};
    int rc = !s ? DX_E_SESSION_NOT_FOUND : !v ? DX_E_NOT_FOUND
                                             : dx_var_lock(s, v, expect, holder.data, holder.size, &token, &acl);
    /* the registry follows the core: a replaced token's entry goes */
    if (rc == DX_OK && expect) dx_lockreg_drop(expect);
    if (rc == DX_OK && argc == 6) {
        if (dx_lockreg_put(token, sid, (dx_str){v->name, v->name_len}, holder.data, holder.size, meta.data, meta.size)) {
            dx_var_unlock(s, v, token);
            rc = DX_E_NOMEM;
        }
    }
    if (rc == DX_OK) r = enif_make_tuple2(env, ATOM_ok, enif_make_uint64(env, token));
    else if (rc == DX_E_LOCKED) r = dx_error(env, locked_reason(env));
    else if (rc == DX_E_DENIED) {
        r = dx_error(env, ATOM_access_denied);
        dx_audit(env, ATOM_dspex_denied, argv[0], argv[1], &p, ATOM_optimize);
    }
    else r = dx_rc_error(env, rc, argv[1], 0, 0, NULL);
    dx_ebr_exit();
    enif_release_binary(&holder);
    if (argc == 6) enif_release_binary(&meta);
    return r;
}

/* var_unlock(Session, Key, Token) -> ok | {error, stale_lock} */
DX_NIF(nif_var_unlock) {
    char kbuf[DX_ATOM_TEXT];
    dx_str key;
    ErlNifUInt64 token;
    if (!get_key(env, argv[1], &key, kbuf) || !enif_get_uint64(env, argv[2], &token)) return enif_make_badarg(env);
    WITH_SESSION(s, argv[0]);
    dx_var *v = dx_var_find(s, key);
    int rc = v ? dx_var_unlock(s, v, token) : DX_E_NOT_FOUND;
    /* whatever the core says, the token is no longer a held lock */
    dx_lockreg_drop(token);
    ERL_NIF_TERM r = rc ? dx_rc_error(env, rc, argv[1], 0, 0, NULL) : ATOM_ok;
    dx_ebr_exit();
    return r;
}
