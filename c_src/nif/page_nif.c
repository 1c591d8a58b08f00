/* session_page/3: one page of a session's variables by name, with the
 * figures of the whole session that dspex_store:diagnostics/1 reports, for
 * the debug console. Its cost follows the page: the rest of the session is
 * a pointer walk (core dx_session_var_stats) in which no value is copied and
 * no term is built. */
#include "acl.h"
#include "nif.h"
#include <math.h>
#include <stdlib.h>

/* A walk of more variables than this, or a page whose terms cost more bytes
 * of work than BIG_PAGE_BYTES, runs on a dirty scheduler (as var_list). */
#define BIG_SESSION 2000
#define BIG_PAGE_BYTES (256u << 10)
#define LAST_WRITES 10

/* External-format sizes of the atoms a value may hold (without the version
 * byte): they depend on the runtime's atom encoding, so they are measured. */
typedef struct {
    size_t t, f, nan, inf, ninf, shape, data;
} ext_atoms;

static size_t atom_ext(ErlNifEnv *env, ERL_NIF_TERM a) {
    ErlNifBinary b;
    if (!enif_term_to_binary(env, a, &b)) return 0;
    size_t n = b.size - 1;
    enif_release_binary(&b);
    return n;
}

static size_t double_ext(const ext_atoms *x, double d) {
    if (isnan(d)) return x->nan;
    if (isinf(d)) return d > 0 ? x->inf : x->ninf;
    return 9; /* NEW_FLOAT_EXT */
}

static size_t int_ext(int64_t i) {
    if (i >= 0 && i <= 255) return 2;              /* SMALL_INTEGER_EXT */
    if (i >= INT32_MIN && i <= INT32_MAX) return 5; /* INTEGER_EXT */
    uint64_t m = i < 0 ? -(uint64_t)i : (uint64_t)i;
    size_t n = 0;
    for (; m; m >>= 8) n++;
    return 3 + n; /* SMALL_BIG_EXT */
}

/* A list of doubles; `nonfinite' (the snapshot's count of NaNs and
 * infinities) 0 means every one is a 9-byte float and the data is not read. */
static size_t doubles_ext(const ext_atoms *x, const double *d, size_t n, uint32_t nonfinite) {
    if (n == 0) return 1;     /* NIL_EXT */
    size_t s = 5 + 1 + 9 * n; /* LIST_EXT, its NIL tail, NEW_FLOAT_EXT each */
    for (size_t i = 0; nonfinite && i < n; i++)
        if (!isfinite(d[i])) {
            s += double_ext(x, d[i]) - 9;
            nonfinite--;
        }
    return s;
}

static size_t shape_ext(const int64_t *sh, size_t n) {
    if (n == 0) return 1;
    int bytes = n < 65536;
    for (size_t i = 0; i < n && bytes; i++) bytes = sh[i] >= 0 && sh[i] <= 255;
    if (bytes) return 3 + n; /* STRING_EXT */
    size_t s = 5 + 1;
    for (size_t i = 0; i < n; i++) s += int_ext(sh[i]);
    return s;
}

/* erlang:external_size/1 of the term dx_value_to_term makes of the
 * snapshot's value, computed in place: the data of an embedding or tensor is
 * read only when it holds a NaN or an infinity. */
static size_t value_ext(const ext_atoms *x, const dx_snap *snap) {
    const dx_value *v = &snap->value;
    size_t s;
    switch (v->type) {
    case DX_T_FLOAT: s = double_ext(x, v->u.f); break;
    case DX_T_INTEGER: s = int_ext(v->u.i); break;
    case DX_T_BOOLEAN: s = v->u.b ? x->t : x->f; break;
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE: s = 5 + v->u.s.len; break; /* BINARY_EXT */
    case DX_T_EMBEDDING: s = doubles_ext(x, v->u.v.data, v->u.v.n, snap->nonfinite); break;
    case DX_T_TENSOR:
        s = 5 + x->shape + shape_ext(v->u.v.shape, v->u.v.ndim) + x->data +
            doubles_ext(x, v->u.v.data, v->u.v.n, snap->nonfinite);
        break;
    default: s = 0;
    }
    return 1 + s; /* the version byte */
}

static size_t page_cost(const dx_var_stat *p, size_t n) {
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += dx_value_payload_size(&p[i].cur->value) + p[i].cur->meta_len + p[i].cur->by_len + 256;
    return c;
}

static ERL_NIF_TERM changed_by(ErlNifEnv *env, const dx_snap *s) {
    return dx_blob_to_term(env, s->by, s->by_len, ATOM_undefined);
}

/* A non-negative integer; beyond 64 bits it counts as SIZE_MAX (past any end). */
static int get_count(ErlNifEnv *env, ERL_NIF_TERM t, size_t *out) {
    ErlNifUInt64 u;
    if (enif_get_uint64(env, t, &u)) {
        *out = u > SIZE_MAX ? SIZE_MAX : (size_t)u;
        return 1;
    }
    if (enif_term_type(env, t) != ERL_NIF_TERM_TYPE_INTEGER || enif_compare(t, enif_make_int(env, 0)) < 0) return 0;
    *out = SIZE_MAX;
    return 1;
}

/* The session-wide sums, taken in the walk's one pass over the snapshots. */
typedef struct {
    ext_atoms x;
    uint64_t bytes, hist, watchers;
} totals;

static void add_up(void *ctx, const dx_var_stat *e) {
    totals *t = ctx;
    t->bytes += value_ext(&t->x, e->cur);
    t->hist += e->nhist;
    t->watchers += e->nwatchers;
}

static ERL_NIF_TERM build(ErlNifEnv *env, dx_session *s, dx_var_stat *all, size_t total, size_t offset, size_t n,
                          const totals *sum) {
    dx_var_stat last[LAST_WRITES];
    size_t nlast = dx_var_stats_latest(all, total, last, LAST_WRITES);
    ERL_NIF_TERM lw = enif_make_list(env, 0);
    for (size_t i = nlast; i > 0; i--) {
        const dx_var_stat *e = &last[i - 1];
        ERL_NIF_TERM k[4] = {ATOM_changed_by, ATOM_name, ATOM_updated_at, ATOM_version};
        ERL_NIF_TERM v[4] = {changed_by(env, e->cur), dx_make_bin(env, e->var->name, e->var->name_len),
                             enif_make_int64(env, e->cur->updated_at), enif_make_uint64(env, e->cur->version)};
        ERL_NIF_TERM m;
        enif_make_map_from_arrays(env, k, v, 4, &m);
        lw = enif_make_list_cell(env, m, lw);
    }
    /* the page: each variable as var_list gives it, its watchers when it has
     * some, who wrote its current version */
    const dx_var_stat *page = n ? all + offset : all;
    ERL_NIF_TERM vars = enif_make_list(env, 0), watched = enif_make_new_map(env), by = enif_make_new_map(env);
    for (size_t i = n; i > 0; i--) {
        const dx_var_stat *e = &page[i - 1];
        ERL_NIF_TERM name = dx_make_bin(env, e->var->name, e->var->name_len);
        vars = enif_make_list_cell(env, dx_var_to_term_named(env, e->var, e->cur, &name), vars);
        if (e->nwatchers) enif_make_map_put(env, watched, name, enif_make_uint64(env, e->nwatchers), &watched);
        enif_make_map_put(env, by, name, changed_by(env, e->cur), &by);
    }
    int oom = 0;
    ERL_NIF_TERM edges = dx_graph_page_edges(env, s, page, n, &oom);
    if (oom) return dx_error(env, ATOM_enomem);
    ERL_NIF_TERM keys[9] = {ATOM_bytes, ATOM_changed_by, ATOM_edges, ATOM_history_entries, ATOM_last_writes,
                            ATOM_total, ATOM_variables, ATOM_watched, ATOM_watchers};
    ERL_NIF_TERM vals[9] = {enif_make_uint64(env, sum->bytes), by, edges, enif_make_uint64(env, sum->hist), lw,
                            enif_make_uint64(env, total), vars, watched, enif_make_uint64(env, sum->watchers)};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 9, &m);
    return enif_make_tuple2(env, ATOM_ok, m);
}

/* session_page(Session, Offset, Limit) -> {ok, #{total, bytes,
 * history_entries, watchers, last_writes, variables, watched, changed_by,
 * edges}} | {error, session_not_found | rate_limited | enomem}: the
 * variables of ranks [Offset, Offset + Limit) by name. One token of the
 * session's rate limit, taken last, so a call moved to a dirty scheduler
 * pays once. */
DX_NIF(nif_session_page) {
    size_t offset, limit;
    if (!enif_is_binary(env, argv[0]) || !get_count(env, argv[1], &offset) || !get_count(env, argv[2], &limit))
        return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    if (!s) {
        dx_ebr_exit();
        return dx_error(env, ATOM_session_not_found);
    }
    if (!dx_on_dirty() && dx_session_nvars(s) > BIG_SESSION) {
        dx_ebr_exit();
        return enif_schedule_nif(env, "session_page", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_session_page, argc, argv);
    }
    size_t total = 0;
    totals sum = {{atom_ext(env, ATOM_true), atom_ext(env, ATOM_false), atom_ext(env, ATOM_nan),
                   atom_ext(env, ATOM_infinity), atom_ext(env, ATOM_neg_infinity), atom_ext(env, ATOM_shape),
                   atom_ext(env, ATOM_data)}, 0, 0, 0};
    dx_var_stat *all = dx_session_var_stats(s, &total, add_up, &sum);
    ERL_NIF_TERM r;
    if (!all && total) {
        r = dx_error(env, ATOM_enomem);
    } else {
        size_t n = dx_var_stats_page(all, total, offset, limit);
        if (!dx_on_dirty() && n && page_cost(all + offset, n) > BIG_PAGE_BYTES) {
            free(all);
            dx_ebr_exit();
            return enif_schedule_nif(env, "session_page", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_session_page, argc, argv);
        }
        if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
            dx_audit(env, ATOM_dspex_rate_limited, argv[0], ATOM_undefined, NULL, 0);
            r = dx_error(env, ATOM_rate_limited);
        } else {
            r = build(env, s, all, total, offset, n, &sum);
        }
    }
    free(all);
    dx_ebr_exit();
    return r;
}
