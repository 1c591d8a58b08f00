/* NIFs of the dependency graph: one graph per session (c_src/core/graph.c),
 * serialised by the session's graph mutex. Variables are checked to exist
 * under that mutex, so a concurrent delete can never leave a dangling node. */
#include "nif.h"
#include <pthread.h>
#include <stdlib.h>

/* Queries on graphs this large run on a dirty scheduler. */
#define BIG_GRAPH 20000
#define MAX_EDGE_TYPES 64

/* Edge types are atoms; the graph stores a small index. Atoms are never
 * garbage collected, so keeping their terms across calls is safe. */
static ERL_NIF_TERM g_types[MAX_EDGE_TYPES];
static int g_ntypes;
static pthread_mutex_t g_types_mu = PTHREAD_MUTEX_INITIALIZER;

static int type_index(ERL_NIF_TERM atom) {
    int idx = -1;
    pthread_mutex_lock(&g_types_mu);
    for (int i = 0; i < g_ntypes && idx < 0; i++)
        if (enif_is_identical(g_types[i], atom)) idx = i;
    if (idx < 0 && g_ntypes < MAX_EDGE_TYPES) {
        g_types[g_ntypes] = atom;
        idx = g_ntypes++;
    }
    pthread_mutex_unlock(&g_types_mu);
    return idx;
}

static ERL_NIF_TERM type_atom(int i) {
    pthread_mutex_lock(&g_types_mu);
    ERL_NIF_TERM t = i >= 0 && i < g_ntypes ? g_types[i] : ATOM_undefined;
    pthread_mutex_unlock(&g_types_mu);
    return t;
}

static ERL_NIF_TERM names_list(ErlNifEnv *env, const dx_gname *n, size_t count) {
    ERL_NIF_TERM l = enif_make_list(env, 0);
    for (size_t i = count; i > 0; i--) l = enif_make_list_cell(env, dx_make_bin(env, n[i - 1].ptr, n[i - 1].len), l);
    return l;
}

/* graph_add(Session, From, To, Type) */
DX_NIF(nif_graph_add) {
    char fb[DX_ATOM_TEXT], tb[DX_ATOM_TEXT];
    dx_str from, to;
    if (!dx_get_name(env, argv[1], &from, fb, sizeof fb) || !dx_get_name(env, argv[2], &to, tb, sizeof tb) ||
        !enif_is_atom(env, argv[3]) || !enif_is_binary(env, argv[0]))
        return enif_make_badarg(env);
    int type = type_index(argv[3]);
    if (type < 0) return dx_error2(env, ATOM_invalid_argument, ATOM_type);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    ERL_NIF_TERM r;
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
    } else {
        dx_graph *g = dx_graph_lock(s);
        if (g && dx_graph_node_count(g) > BIG_GRAPH && !dx_on_dirty()) {
            /* reordering a large affected region can take milliseconds */
            dx_graph_unlock(s);
            dx_ebr_exit();
            return enif_schedule_nif(env, "graph_add", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_graph_add, argc, argv);
        }
        dx_var *fv = dx_var_find(s, from), *tv = dx_var_find(s, to);
        if (!g) r = dx_error(env, ATOM_enomem);
        else if (!fv) r = dx_error2(env, ATOM_not_found, argv[1]);
        else if (!tv) r = dx_error2(env, ATOM_not_found, argv[2]);
        else {
            dx_gname *cycle = NULL;
            size_t clen = 0;
            /* the same edge with the same type again changes nothing: `unchanged' (no event is logged) */
            int same = dx_graph_edge_type(g, fv->name, fv->name_len, tv->name, tv->name_len) == type;
            int rc = same ? DX_G_EXISTS
                          : dx_graph_add_edge(g, fv->name, fv->name_len, tv->name, tv->name_len, type, &cycle, &clen);
            if (same) r = ATOM_unchanged;
            else if (rc == DX_G_OK || rc == DX_G_EXISTS) r = ATOM_ok;
            else if (rc == DX_G_CYCLE) r = dx_error2(env, ATOM_would_create_cycle, names_list(env, cycle, clen));
            else r = dx_error(env, ATOM_enomem);
            free(cycle);
        }
        dx_graph_unlock(s);
    }
    dx_ebr_exit();
    return r;
}

/* graph_remove(Session, From, To) */
DX_NIF(nif_graph_remove) {
    char fb[DX_ATOM_TEXT], tb[DX_ATOM_TEXT];
    dx_str from, to;
    if (!dx_get_name(env, argv[1], &from, fb, sizeof fb) || !dx_get_name(env, argv[2], &to, tb, sizeof tb) ||
        !enif_is_binary(env, argv[0]))
        return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    ERL_NIF_TERM r;
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
    } else {
        dx_graph *g = dx_graph_lock(s);
        dx_var *fv = dx_var_find(s, from), *tv = dx_var_find(s, to);
        if (fv && tv && g && dx_graph_remove_edge(g, fv->name, fv->name_len, tv->name, tv->name_len) == DX_G_OK)
            r = ATOM_ok;
        else
            r = dx_error2(env, ATOM_not_found, enif_make_tuple2(env, argv[1], argv[2]));
        dx_graph_unlock(s);
    }
    dx_ebr_exit();
    return r;
}

/* graph_query(Session, Var, dependencies | dependents | all_dependents | update_order) */
DX_NIF(nif_graph_query) {
    char kb[DX_ATOM_TEXT];
    dx_str key;
    ERL_NIF_TERM what = argv[2];
    int kind = enif_is_identical(what, ATOM_dependencies)     ? 0
               : enif_is_identical(what, ATOM_dependents)     ? 1
               : enif_is_identical(what, ATOM_all_dependents) ? 2
               : enif_is_identical(what, ATOM_update_order)   ? 3
                                                              : -1;
    if (kind < 0 || !dx_get_name(env, argv[1], &key, kb, sizeof kb) || !enif_is_binary(env, argv[0]))
        return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    ERL_NIF_TERM r;
    if (!s) {
        dx_ebr_exit();
        return dx_error(env, ATOM_session_not_found);
    }
    dx_var *v = dx_var_find(s, key);
    if (!v) {
        dx_ebr_exit();
        return dx_error2(env, ATOM_not_found, argv[1]);
    }
    dx_graph *g = dx_graph_lock(s);
    if (g && dx_graph_node_count(g) > BIG_GRAPH && !dx_on_dirty()) {
        dx_graph_unlock(s);
        dx_ebr_exit();
        return enif_schedule_nif(env, "graph_query", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_graph_query, argc, argv);
    }
    dx_gname *out = NULL;
    int *types = NULL;
    size_t n = 0;
    int rc = !g ? DX_G_NOMEM
             : kind == 0 ? dx_graph_dependencies(g, v->name, v->name_len, &out, &types, &n)
             : kind == 1 ? dx_graph_dependents(g, v->name, v->name_len, &out, &types, &n)
             : kind == 2 ? dx_graph_all_dependents(g, v->name, v->name_len, &out, &n)
                         : dx_graph_update_order(g, v->name, v->name_len, &out, &n);
    if (rc == DX_G_OK) {
        r = enif_make_tuple2(env, ATOM_ok, names_list(env, out, n));
    } else if (rc == DX_G_NOT_FOUND) {
        /* a variable with no edges: no neighbours, and it alone to update */
        r = enif_make_tuple2(env, ATOM_ok, kind == 3 ? enif_make_list1(env, dx_make_bin(env, v->name, v->name_len))
                                                     : enif_make_list(env, 0));
    } else {
        r = dx_error(env, ATOM_enomem);
    }
    free(out);
    free(types);
    dx_graph_unlock(s);
    dx_ebr_exit();
    return r;
}

DX_NIF(nif_graph_clear) {
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    if (s) {
        dx_graph *g = dx_graph_lock(s);
        if (g) dx_graph_clear(g);
        dx_graph_unlock(s);
    }
    dx_ebr_exit();
    return s ? ATOM_ok : dx_error(env, ATOM_session_not_found);
}

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM list;
} edge_ctx;

static int node_cb(void *ctx, dx_gname n) {
    edge_ctx *c = ctx;
    c->list = enif_make_list_cell(c->env, dx_make_bin(c->env, n.ptr, n.len), c->list);
    return 0;
}

static int edge_cb(void *ctx, dx_gname from, dx_gname to, int type) {
    edge_ctx *c = ctx;
    ERL_NIF_TERM e = enif_make_tuple3(c->env, dx_make_bin(c->env, from.ptr, from.len), dx_make_bin(c->env, to.ptr, to.len),
                                      type_atom(type));
    c->list = enif_make_list_cell(c->env, e, c->list);
    return 0;
}

/* graph_edges(Session) -> {ok, Nodes, [{From, To, Type}]} */
DX_NIF(nif_graph_edges) {
    if (!enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    if (!s) {
        dx_ebr_exit();
        return dx_error(env, ATOM_session_not_found);
    }
    dx_graph *g = dx_graph_lock(s);
    if (g && dx_graph_node_count(g) > BIG_GRAPH && !dx_on_dirty()) {
        dx_graph_unlock(s);
        dx_ebr_exit();
        return enif_schedule_nif(env, "graph_edges", ERL_NIF_DIRTY_JOB_CPU_BOUND, nif_graph_edges, argc, argv);
    }
    edge_ctx nodes = {env, enif_make_list(env, 0)}, edges = {env, enif_make_list(env, 0)};
    if (g) {
        dx_graph_foreach_node(g, node_cb, &nodes);
        dx_graph_foreach_edge(g, edge_cb, &edges);
    }
    dx_graph_unlock(s);
    dx_ebr_exit();
    return enif_make_tuple3(env, ATOM_ok, nodes.list, edges.list);
}

/* var_set_error(Session, Key, Error | undefined): the propagator records a failure. */
DX_NIF(nif_var_set_error) {
    char kb[DX_ATOM_TEXT];
    dx_str key;
    if (!dx_get_name(env, argv[1], &key, kb, sizeof kb) || !enif_is_binary(env, argv[0])) return enif_make_badarg(env);
    ErlNifBinary blob = {0};
    int have = !enif_is_identical(argv[2], ATOM_undefined);
    if (have && dx_term_to_blob(env, argv[2], &blob)) return dx_error(env, ATOM_enomem);
    dx_ebr_enter();
    dx_session *s = dx_nif_session(env, argv[0], NULL);
    dx_var *v = s ? dx_var_find(s, key) : NULL;
    ERL_NIF_TERM r = !s ? dx_error(env, ATOM_session_not_found)
                     : !v ? dx_error2(env, ATOM_not_found, argv[1])
                     : dx_var_set_error(s, v, have ? blob.data : NULL, have ? blob.size : 0) ? dx_error(env, ATOM_enomem)
                                                                                              : ATOM_ok;
    dx_ebr_exit();
    if (have) enif_release_binary(&blob);
    return r;
}

/* The edges with an end among the n variables of page, as {From, To, Type}
 * (no order; an edge between two of them comes twice): each variable's
 * neighbours, under the graph mutex, so the work follows the page, not the
 * graph. Sets *oom (and stops) when out of memory. Inside an EBR section. */
ERL_NIF_TERM dx_graph_page_edges(ErlNifEnv *env, dx_session *s, const dx_var_stat *page, size_t n, int *oom) {
    ERL_NIF_TERM l = enif_make_list(env, 0);
    dx_graph *g = dx_graph_lock(s);
    *oom = !g;
    for (size_t i = 0; g && i < n && !*oom; i++) {
        const dx_var *v = page[i].var;
        ERL_NIF_TERM self = dx_make_bin(env, v->name, v->name_len);
        for (int dir = 0; dir < 2 && !*oom; dir++) {
            dx_gname *out = NULL;
            int *types = NULL;
            size_t k = 0;
            int rc = dir == 0 ? dx_graph_dependencies(g, v->name, v->name_len, &out, &types, &k)
                              : dx_graph_dependents(g, v->name, v->name_len, &out, &types, &k);
            if (rc == DX_G_OK) {
                for (size_t j = 0; j < k; j++) {
                    ERL_NIF_TERM other = dx_make_bin(env, out[j].ptr, out[j].len);
                    /* dependencies: other -> v; dependents: v -> other */
                    l = enif_make_list_cell(env, enif_make_tuple3(env, dir == 0 ? other : self, dir == 0 ? self : other,
                                                                  type_atom(types[j])), l);
                }
            } else if (rc != DX_G_NOT_FOUND) {
                *oom = 1;
            }
            free(out);
            free(types);
        }
    }
    dx_graph_unlock(s);
    return l;
}
