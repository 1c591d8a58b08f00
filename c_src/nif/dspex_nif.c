/* Registration of the NIF library: the function table and load/unload. */
#include "acl.h"
#include "events_nif.h"
#include "metrics_nif.h"
#include "nif.h"
#include "opt.h"
#include <stdlib.h>
#include <time.h>

/* One copy of this library holds the whole state in C globals (the store,
 * the lock registry, the metrics rings). Reloading dspex_nif (code:load_file)
 * maps the same copy again (dlopen of the same path returns the loaded
 * object), so the new module instance shares that state: `upgrade' checks
 * that the old instance's priv_data is this copy's marker (a different copy,
 * loaded from another path, could not see the state: refused), takes the
 * resource types over and counts the instance; `unload' (when the old code is
 * purged) only uncounts it, and the last instance to go frees everything.
 * load, upgrade and unload run one at a time (code loading is serialised). */
static char g_marker;
static int g_instances;
_Atomic int dx_test_hooks;

/* Load info: 0 (no options) or #{test_hooks => boolean()}. 0 on a bad term. */
static int read_load_info(ErlNifEnv *env, ERL_NIF_TERM info, int *hooks) {
    ERL_NIF_TERM v;
    int i;
    *hooks = 0;
    if (enif_get_int(env, info, &i)) return i == 0;
    if (!enif_is_map(env, info)) return 0;
    if (!enif_get_map_value(env, info, enif_make_atom(env, "test_hooks"), &v)) return 1;
    if (enif_is_identical(v, enif_make_atom(env, "true"))) *hooks = 1;
    else if (!enif_is_identical(v, enif_make_atom(env, "false"))) return 0;
    return 1;
}

/* Everything load sets up, undone in reverse on a failure part way (resource
 * types opened by a failed load are discarded by the runtime). */
static int init_state(ErlNifEnv *env) {
    dx_atoms_init(env);
    /* seed the hash from the clock and the address space layout: once per
     * store, never on upgrade (every table is keyed by it) */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    dx_hash_seed((uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&ts ^ (uint64_t)ts.tv_sec);
    if (dx_watch_init(env)) return 1;
    if (dx_metrics_init(env)) return 1;
    if (dx_events_init(env)) return 1;
    dx_store_set_watcher_release(dx_watch_release);
    dx_store_set_acl_release(dx_acl_free);
    if (dx_store_init() != DX_OK) {
        dx_metrics_unload();
        return 1;
    }
    return 0;
}

static int load(ErlNifEnv *env, void **priv, ERL_NIF_TERM info) {
    int hooks;
    if (!read_load_info(env, info, &hooks)) return 1;
    if (g_instances == 0) {
        if (init_state(env)) return 1;
    } else if (dx_watch_init(env) || dx_metrics_takeover(env)) {
        return 1; /* an instance of this copy is alive: share its state */
    }
    atomic_store(&dx_test_hooks, hooks);
    g_instances++;
    *priv = &g_marker;
    return 0;
}

static int upgrade(ErlNifEnv *env, void **priv, void **old_priv, ERL_NIF_TERM info) {
    int hooks;
    if (*old_priv != &g_marker || g_instances == 0) return 1; /* another copy of the library */
    if (!read_load_info(env, info, &hooks)) return 1;
    if (dx_watch_init(env) || dx_metrics_takeover(env)) return 1;
    atomic_store(&dx_test_hooks, hooks);
    g_instances++;
    *priv = &g_marker;
    return 0;
}

static void unload(ErlNifEnv *env, void *priv) {
    if (priv != &g_marker || --g_instances > 0) return; /* a newer instance still uses the state */
    dx_metrics_unload();
    dx_events_unload();
    dx_store_shutdown();
    dx_lockreg_clear();
    dx_opt_release_scratch(); /* no ask runs: the module is being purged */
    atomic_store(&dx_test_hooks, 0);
}

#define DIRTY ERL_NIF_DIRTY_JOB_CPU_BOUND
static ErlNifFunc funcs[] = {
    {"session_create", 3, nif_session_create, 0},
    {"session_get", 1, nif_session_get, 0},
    {"session_list", 0, nif_session_list, 0},
    {"session_touch", 1, nif_session_touch, 0},
    {"session_delete", 1, nif_session_delete, 0},
    {"sweep", 0, nif_sweep, DIRTY},
    {"reclaim", 0, nif_reclaim, DIRTY},
    {"advance_clock", 1, nif_advance_clock, 0}, /* refused unless loaded with test hooks */
    {"set_limits", 1, nif_set_limits, 0},
    {"get_limits", 0, nif_get_limits, 0},
    {"stats", 0, nif_stats, 0},
    {"var_register", 9, nif_var_register, 0},
    {"var_get", 2, nif_var_get, 0},
    {"var_get", 3, nif_var_get, 0},
    {"var_get_here", 2, nif_var_get_here, 0},
    {"var_get_here", 3, nif_var_get_here, 0},
    {"var_get_value_here", 2, nif_var_get_value_here, 0},
    {"var_set_here", 4, nif_var_set_here, 0},
    {"store_fast_path", 2, nif_store_fast_path, 0},
    {"cache_get", 3, nif_cache_get, 0},
    {"cache_get_value", 3, nif_cache_get_value, 0},
    {"cache_arm", 4, nif_cache_arm, 0},
    {"cache_take_ref", 1, nif_cache_take_ref, 0},
    {"cache_clock", 0, nif_cache_clock, 0},
    {"cache_gen", 1, nif_cache_gen, 0},
    {"cache_hits", 1, nif_cache_hits, 0},
    {"cache_config", 2, nif_cache_config, 0},
    {"cache_info", 1, nif_cache_info, 0},
    {"var_get_value", 2, nif_var_get_value, 0},
    {"var_exists", 2, nif_var_exists, 0},
    {"var_set", 4, nif_var_set, 0},
    {"var_set_derived", 4, nif_var_set_derived, 0}, /* dspex_store:set_derived/4 (the propagator) only */
    {"var_delete", 2, nif_var_delete, 0},
    {"var_delete", 3, nif_var_delete, 0},
    {"var_list", 2, nif_var_list, 0},
    {"var_list", 3, nif_var_list, 0},
    {"session_page", 3, nif_session_page, 0}, /* dspex_store:diagnostics_page/3 */
    {"var_get_many", 2, nif_var_get_many, 0},
    {"var_get_many", 3, nif_var_get_many, 0},
    {"var_set_many", 3, nif_var_set_many, 0},
    {"var_history", 3, nif_var_history, 0},
    {"var_history", 4, nif_var_history, 0},
    {"var_rollback", 4, nif_var_rollback, 0},
    {"watch", 3, nif_watch, 0},
    {"watch", 4, nif_watch, 0},
    {"var_info", 2, nif_var_info, 0},
    {"unwatch", 1, nif_unwatch, 0},
    {"export_session", 1, nif_export_session, DIRTY},
    {"import_session", 1, nif_import_session, DIRTY},
    {"graph_add", 4, nif_graph_add, 0},
    {"graph_remove", 3, nif_graph_remove, 0},
    {"graph_query", 3, nif_graph_query, 0},
    {"graph_clear", 1, nif_graph_clear, 0},
    {"graph_edges", 1, nif_graph_edges, 0},
    {"var_set_error", 3, nif_var_set_error, 0},
    {"var_lock", 4, nif_var_lock, 0},
    {"var_lock", 5, nif_var_lock, 0},
    {"var_lock", 6, nif_var_lock, 0},
    {"lock_list", 0, nif_lock_list, DIRTY},
    {"var_unlock", 3, nif_var_unlock, 0},
    {"acl_set", 4, nif_acl_set, 0},
    {"acl_get", 2, nif_acl_get, 0},
    {"acl_check", 5, nif_acl_check, 0},
    {"acl_filter", 4, nif_acl_filter, 0},
    {"acl_rules", 1, nif_acl_rules, 0},
    {"acl_validate", 1, nif_acl_validate, 0},
    {"session_set_rate", 3, nif_session_set_rate, 0},
    {"session_get_rate", 1, nif_session_get_rate, 0},
    {"session_take", 1, nif_session_take, 0},
    DX_METRICS_FUNCS,
    {"lock_token_floor", 1, nif_lock_token_floor, 0},
    {"replica_apply_batch", 3, nif_replica_apply_batch, 0},
    {"repl_link_open", 1, nif_repl_link_open, 0},
    {"repl_link_id", 1, nif_repl_link_id, 0},
    {"repl_drain", 1, nif_repl_drain, 0},
    {"repl_publish", 5, nif_repl_publish, 0},
    {"repl_publish", 6, nif_repl_publish, 0},
    {"repl_unsettle", 1, nif_repl_unsettle, 0},
    {"repl_forget", 1, nif_repl_forget, 0},
    {"repl_info", 1, nif_repl_info, 0},
    {"repl_announced", 1, nif_repl_announced, 0},
    {"repl_stats", 0, nif_repl_stats, 0},
    {"repl_set", 6, nif_repl_set, 0},
    {"repl_push", 2, nif_repl_push, 0},
    DX_EVENTS_FUNCS,
    {"sched_stats", 0, nif_sched_stats, 0},
    {"rawbuf_debug", 1, nif_rawbuf_debug, 0},
    {"opt_ask", 8, nif_opt_ask, DIRTY}, /* opt_nif.c */
};

ERL_NIF_INIT(dspex_nif, funcs, load, NULL, upgrade, unload)
