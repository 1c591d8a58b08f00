/* Watches: a resource per watch, referenced from each watched variable. The
 * watcher process is monitored; when it dies the watch detaches itself. */
#include "acl.h"
#include "nif.h"
#include <stdatomic.h>

ErlNifResourceType *dx_watch_type;

typedef struct {
    ErlNifPid pid;
    ErlNifMonitor mon;
    _Atomic int active;
    int monitored;
    char *sid;
    size_t sid_len;
    size_t nnames;
    dx_str *names; /* each owned */
} watch_t;

static void watch_dtor(ErlNifEnv *env, void *obj) {
    watch_t *w = obj;
    for (size_t i = 0; i < w->nnames; i++) enif_free((void *)w->names[i].ptr);
    if (w->names) enif_free(w->names);
    if (w->sid) enif_free(w->sid);
}

/* Removes w from every variable it watches. */
static void detach(watch_t *w) {
    dx_ebr_enter();
    dx_session *s = dx_session_find((dx_str){w->sid, w->sid_len}, dx_now_ms());
    for (size_t i = 0; s && i < w->nnames; i++) {
        dx_var *v = dx_var_find_name(s, w->names[i]);
        if (v) dx_var_remove_watcher(s, v, w);
    }
    dx_ebr_exit();
}

static void watch_down(ErlNifEnv *env, void *obj, ErlNifPid *pid, ErlNifMonitor *mon) {
    watch_t *w = obj;
    int was = atomic_exchange(&w->active, 0);
    if (was) detach(w);
}

void dx_watch_release(void *w) { enif_release_resource(w); }

int dx_watch_init(ErlNifEnv *env) {
    ErlNifResourceTypeInit init = {.dtor = watch_dtor, .down = watch_down, .members = 3};
    dx_watch_type = enif_open_resource_type_x(env, "dspex_watch", &init, ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER, NULL);
    return dx_watch_type ? 0 : -1;
}

void dx_watch_notify(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur) {
    struct {
        ErlNifEnv *env;
        ERL_NIF_TERM sid;
    } *nc = ctx;
    ErlNifEnv *env = nc->env;
    ERL_NIF_TERM name = dx_make_bin(env, v->name, v->name_len);
    ERL_NIF_TERM oldv = dx_value_to_term(env, &old->value), newv = dx_value_to_term(env, &cur->value);
    ERL_NIF_TERM keys[5] = {ATOM_version, ATOM_previous_version, ATOM_updated_at, ATOM_changed_by, ATOM_metadata};
    ERL_NIF_TERM vals[5] = {enif_make_uint64(env, cur->version), enif_make_uint64(env, old->version),
                            enif_make_int64(env, cur->updated_at), dx_blob_to_term(env, cur->by, cur->by_len, ATOM_undefined),
                            dx_blob_to_term(env, cur->meta, cur->meta_len, enif_make_new_map(env))};
    ERL_NIF_TERM meta;
    enif_make_map_from_arrays(env, keys, vals, 5, &meta);
    for (size_t i = 0; i < v->nwatchers; i++) {
        watch_t *w = v->watchers[i];
        if (!atomic_load_explicit(&w->active, memory_order_acquire)) continue;
        ERL_NIF_TERM msg = enif_make_tuple7(env, ATOM_dspex_variable, enif_make_resource(env, w), nc->sid, name, oldv, newv, meta);
        /* Sent under the shard mutex: commits of one variable are delivered in order. */
        if (!enif_send(env, &w->pid, NULL, msg)) atomic_store(&w->active, 0);
    }
}

/* watch(Session, [Key], Pid) -> {ok, Ref} */
DX_NIF(nif_watch) {
    ErlNifBinary sidb;
    ErlNifPid pid;
    unsigned n;
    dx_principal p = {0};
    if (!enif_inspect_binary(env, argv[0], &sidb) || !enif_get_list_length(env, argv[1], &n) || n == 0 ||
        !enif_get_local_pid(env, argv[2], &pid) ||
        (argc == 4 && (!enif_is_map(env, argv[3]) || !dx_principal_parse(env, argv[3], &p))))
        return enif_make_badarg(env);
    ERL_NIF_TERM l = argv[1], h;
    while (enif_get_list_cell(env, l, &h, &l)) {
        char kb[DX_ATOM_TEXT];
        dx_str k;
        if (!dx_get_name(env, h, &k, kb, sizeof kb)) return enif_make_badarg(env);
    }
    watch_t *w = enif_alloc_resource(dx_watch_type, sizeof *w);
    if (!w) return dx_error(env, ATOM_enomem);
    memset(w, 0, sizeof *w);
    w->pid = pid;
    w->sid = enif_alloc(sidb.size ? sidb.size : 1);
    w->names = enif_alloc(n * sizeof(dx_str));
    ERL_NIF_TERM r;
    dx_var **vars = enif_alloc(n * sizeof *vars);
    if (!w->sid || !w->names || !vars) {
        r = dx_error(env, ATOM_enomem);
        goto out_noebr;
    }
    memcpy(w->sid, sidb.data, sidb.size);
    w->sid_len = sidb.size;
    dx_ebr_enter();
    dx_session *s = dx_session_find((dx_str){w->sid, w->sid_len}, dx_now_ms());
    if (!s) {
        r = dx_error(env, ATOM_session_not_found);
        goto out;
    }
    l = argv[1];
    for (unsigned i = 0; enif_get_list_cell(env, l, &h, &l); i++) {
        char kb[DX_ATOM_TEXT];
        dx_str k;
        dx_get_name(env, h, &k, kb, sizeof kb);
        if (!(vars[i] = dx_var_find(s, k))) {
            r = dx_error2(env, ATOM_not_found, h);
            goto out;
        }
        if (p.set && !dx_acl_allows(env, dx_var_acl(vars[i]), (dx_str){s->id, s->id_len}, &p, DX_PERM_OBSERVE)) {
            r = dx_error(env, ATOM_access_denied);
            dx_audit(env, ATOM_dspex_denied, argv[0], h, &p, ATOM_observe);
            goto out;
        }
        /* A variable named twice (name and id, say) is watched once. */
        int dup = 0;
        for (unsigned j = 0; j < i; j++) dup |= vars[j] == vars[i];
        if (dup) {
            i--;
            n--;
            continue;
        }
        char *p = enif_alloc(vars[i]->name_len ? vars[i]->name_len : 1);
        if (!p) {
            r = dx_error(env, ATOM_enomem);
            goto out;
        }
        memcpy(p, vars[i]->name, vars[i]->name_len);
        w->names[w->nnames++] = (dx_str){p, vars[i]->name_len};
    }
    atomic_store(&w->active, 1);
    if (enif_monitor_process(env, w, &pid, &w->mon) != 0) {
        /* already dead: nothing to watch for */
        atomic_store(&w->active, 0);
        r = enif_make_tuple2(env, ATOM_ok, enif_make_resource(env, w));
        goto out;
    }
    w->monitored = 1;
    for (unsigned i = 0; i < n; i++) {
        enif_keep_resource(w);
        if (dx_var_add_watcher(s, vars[i], w)) {
            enif_release_resource(w);
            atomic_store(&w->active, 0);
            enif_demonitor_process(env, w, &w->mon);
            detach(w);
            r = dx_error2(env, ATOM_not_found, dx_make_bin(env, vars[i]->name, vars[i]->name_len));
            goto out;
        }
    }
    r = enif_make_tuple2(env, ATOM_ok, enif_make_resource(env, w));
out:
    dx_ebr_exit();
out_noebr:
    if (vars) enif_free(vars);
    enif_release_resource(w);
    return r;
}

/* unwatch(Ref) -> ok (idempotent) */
DX_NIF(nif_unwatch) {
    watch_t *w;
    if (!enif_get_resource(env, argv[0], dx_watch_type, (void **)&w)) return enif_make_badarg(env);
    if (atomic_exchange(&w->active, 0)) {
        if (w->monitored) enif_demonitor_process(env, w, &w->mon);
        detach(w);
    }
    return ATOM_ok;
}
