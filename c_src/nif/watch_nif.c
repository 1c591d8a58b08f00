/* Watches: a resource per watch, referenced from each watched variable. The
 * watcher process is monitored; when it dies the watch detaches itself. */
#include "acl.h"
#include "nif.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

ErlNifResourceType *dx_watch_type;
static ErlNifResourceType *dx_notifyq_type;
static void notifyq_dtor(ErlNifEnv *env, void *obj);
static void notifyq_release(void *q);

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
    dx_notifyq_type = enif_open_resource_type(env, NULL, "dspex_notify_queue", notifyq_dtor,
                                              ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER, NULL);
    dx_store_set_notify_release(notifyq_release);
    return dx_watch_type && dx_notifyq_type ? 0 : -1;
}

/* ---- notifications ------------------------------------------------------------
 *
 * A commit never builds or sends a term under its shard mutex. The commit hook
 * (dx_watch_notify, under the mutex) only takes references: the old and new
 * snapshots, and each active watch of the variable, into a record appended to
 * the variable's queue. After the writer has released the mutex it delivers
 * (dx_watch_finish). One writer at a time drains a queue (the one that found
 * it idle), so messages about one variable leave in commit order, and another
 * writer of that variable never waits: its record is delivered by the drainer.
 * Delivery work is estimated in bytes (old + new payload, once per message):
 * above DX_NOTIFY_BUDGET on a normal scheduler, the rest of the drain moves to
 * a dirty CPU scheduler (enif_schedule_nif; the queue resources travel in its
 * arguments, so they outlive the variable if it is deleted meanwhile). */


typedef struct nrec {
    struct nrec *next;
    dx_snap *old, *cur; /* one reference each */
    size_t work;
    size_t nw;
    watch_t *w[]; /* one resource reference each */
} nrec;

typedef struct {
    pthread_mutex_t mu; /* taken under the shard mutex (hook) or alone (drain) */
    nrec *head, *tail;
    size_t queued_work;
    int draining; /* a writer owns the drain */
    char *sid, *name;
    size_t sid_len, name_len;
} notifyq;

_Atomic uint64_t dx_notify_stats[DX_NOTIFY_STATS];

static void rec_free(nrec *r) {
    dx_snap_release(r->old);
    dx_snap_release(r->cur);
    for (size_t i = 0; i < r->nw; i++) enif_release_resource(r->w[i]);
    free(r);
}

static void notifyq_dtor(ErlNifEnv *env, void *obj) {
    notifyq *q = obj;
    for (nrec *r = q->head, *n; r; r = n) {
        n = r->next;
        rec_free(r);
    }
    pthread_mutex_destroy(&q->mu);
    free(q->sid);
    free(q->name);
}

static void notifyq_release(void *q) { enif_release_resource(q); }

static notifyq *notifyq_new(dx_str sid, const dx_var *v) {
    notifyq *q = enif_alloc_resource(dx_notifyq_type, sizeof *q);
    if (!q) return NULL;
    memset(q, 0, sizeof *q);
    pthread_mutex_init(&q->mu, NULL);
    q->sid = malloc(sid.len ? sid.len : 1);
    q->name = malloc(v->name_len ? v->name_len : 1);
    if (!q->sid || !q->name) {
        enif_release_resource(q);
        return NULL;
    }
    memcpy(q->sid, sid.ptr, sid.len);
    q->sid_len = sid.len;
    memcpy(q->name, v->name, v->name_len);
    q->name_len = v->name_len;
    return q;
}

static size_t snap_bytes(const dx_snap *s) { return dx_value_payload_size(&s->value) + s->meta_len + s->by_len; }

void dx_notify_ctx_init(dx_notify_ctx *nc, ErlNifEnv *env, size_t nvars) {
    memset(nc, 0, sizeof *nc);
    nc->env = env;
    nc->q = nc->inline_q;
    nc->cap = sizeof nc->inline_q / sizeof nc->inline_q[0];
    if (nvars > nc->cap) {
        /* a batch may become the drainer of every variable it writes: reserve
         * now, so the hook never allocates for it under the mutexes */
        void **q = enif_alloc(nvars * sizeof *q);
        if (q) {
            nc->q = q;
            nc->cap = nvars;
        }
    }
}

/* Under the shard mutex: references only (see above). */
void dx_watch_notify(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur) {
    dx_notify_ctx *nc = ctx;
    notifyq *q = v->notify;
    if (!v->nwatchers || !q) return;
    nrec *r = malloc(sizeof *r + v->nwatchers * sizeof(watch_t *));
    if (!r) {
        atomic_fetch_add_explicit(&dx_notify_stats[DX_NOTIFY_DROPPED], 1, memory_order_relaxed);
        return;
    }
    r->nw = 0;
    for (size_t i = 0; i < v->nwatchers; i++) {
        watch_t *w = v->watchers[i];
        if (!atomic_load_explicit(&w->active, memory_order_acquire)) continue;
        enif_keep_resource(w);
        r->w[r->nw++] = w;
    }
    if (!r->nw) { /* nobody listens */
        free(r);
        return;
    }
    if (nc->n == nc->cap) {
        /* room to become a drainer (dx_notify_ctx_init reserves it for batches) */
        size_t cap = nc->cap * 2;
        void **nq = nc->q == nc->inline_q ? enif_alloc(cap * sizeof *nq) : enif_realloc(nc->q, cap * sizeof *nq);
        if (!nq) {
            atomic_fetch_add_explicit(&dx_notify_stats[DX_NOTIFY_DROPPED], 1, memory_order_relaxed);
            for (size_t i = 0; i < r->nw; i++) enif_release_resource(r->w[i]);
            free(r);
            return;
        }
        if (nc->q == nc->inline_q) memcpy(nq, nc->inline_q, sizeof nc->inline_q);
        nc->q = nq;
        nc->cap = cap;
    }
    dx_snap_retain(old);
    dx_snap_retain(cur);
    r->old = (dx_snap *)old;
    r->cur = (dx_snap *)cur;
    r->next = NULL;
    r->work = (snap_bytes(old) + snap_bytes(cur) + 64) * (r->nw + 1);
    pthread_mutex_lock(&q->mu);
    if (q->tail) q->tail->next = r;
    else q->head = r;
    q->tail = r;
    q->queued_work += r->work;
    int mine = !q->draining;
    q->draining = 1;
    pthread_mutex_unlock(&q->mu);
    if (mine) {
        enif_keep_resource(q);
        nc->q[nc->n++] = q;
    }
}

/* Builds the terms of one commit and sends them; consumes r. */
static void deliver(ErlNifEnv *env, notifyq *q, nrec *r, ERL_NIF_TERM sid, ERL_NIF_TERM name) {
    const dx_snap *old = r->old, *cur = r->cur;
    ERL_NIF_TERM oldv = dx_value_to_term(env, &old->value), newv = dx_value_to_term(env, &cur->value);
    ERL_NIF_TERM keys[5] = {ATOM_version, ATOM_previous_version, ATOM_updated_at, ATOM_changed_by, ATOM_metadata};
    ERL_NIF_TERM vals[5] = {enif_make_uint64(env, cur->version), enif_make_uint64(env, old->version),
                            enif_make_int64(env, cur->updated_at), dx_blob_to_term(env, cur->by, cur->by_len, ATOM_undefined),
                            dx_blob_to_term(env, cur->meta, cur->meta_len, enif_make_new_map(env))};
    ERL_NIF_TERM meta;
    enif_make_map_from_arrays(env, keys, vals, 5, &meta);
    for (size_t i = 0; i < r->nw; i++) {
        watch_t *w = r->w[i];
        if (!atomic_load_explicit(&w->active, memory_order_acquire)) continue;
        ERL_NIF_TERM msg = enif_make_tuple7(env, ATOM_dspex_variable, enif_make_resource(env, w), sid, name, oldv, newv, meta);
        if (!enif_send(env, &w->pid, NULL, msg)) atomic_store(&w->active, 0);
    }
    atomic_fetch_add_explicit(&dx_notify_stats[dx_on_dirty() ? DX_NOTIFY_DIRTY : DX_NOTIFY_NORMAL], 1,
                              memory_order_relaxed);
    rec_free(r);
}

/* Drains q while its queued work fits *budget (SIZE_MAX: no bound). Returns 1
 * when q is empty and released (no longer draining), 0 when the rest needs a
 * dirty scheduler. */
static int drain(ErlNifEnv *env, notifyq *q, size_t *budget) {
    ERL_NIF_TERM sid = 0, name = 0;
    for (;;) {
        pthread_mutex_lock(&q->mu);
        nrec *r = q->head;
        if (!r) {
            q->draining = 0;
            pthread_mutex_unlock(&q->mu);
            enif_release_resource(q);
            return 1;
        }
        if (q->queued_work > *budget) {
            pthread_mutex_unlock(&q->mu);
            return 0;
        }
        *budget -= *budget == SIZE_MAX ? 0 : q->queued_work;
        q->head = q->tail = NULL;
        q->queued_work = 0;
        pthread_mutex_unlock(&q->mu);
        if (!sid) {
            sid = dx_make_bin(env, q->sid, q->sid_len);
            name = dx_make_bin(env, q->name, q->name_len);
        }
        for (nrec *n; r; r = n) {
            n = r->next;
            deliver(env, q, r, sid, name);
        }
    }
}

/* watch_drain([Queue], Reply): the dirty continuation of dx_watch_finish. */
static ERL_NIF_TERM watch_drain_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    ERL_NIF_TERM l = argv[0], h;
    while (enif_get_list_cell(env, l, &h, &l)) {
        notifyq *q;
        size_t budget = SIZE_MAX;
        if (enif_get_resource(env, h, dx_notifyq_type, (void **)&q)) drain(env, q, &budget);
    }
    return argv[1];
}

ERL_NIF_TERM dx_watch_finish(ErlNifEnv *env, dx_notify_ctx *nc, ERL_NIF_TERM reply) {
    size_t budget = dx_on_dirty() ? SIZE_MAX : DX_NOTIFY_BUDGET;
    size_t i = 0;
    while (i < nc->n && drain(env, nc->q[i], &budget)) i++;
    ERL_NIF_TERM r = reply;
    if (i < nc->n) {
        /* the queues still owned travel as terms; their drain references go along */
        ERL_NIF_TERM l = enif_make_list(env, 0);
        for (size_t k = nc->n; k > i; k--) l = enif_make_list_cell(env, enif_make_resource(env, nc->q[k - 1]), l);
        ERL_NIF_TERM args[2] = {l, reply};
        atomic_fetch_add_explicit(&dx_notify_stats[DX_NOTIFY_RESCHEDULED], 1, memory_order_relaxed);
        r = enif_schedule_nif(env, "watch_drain", ERL_NIF_DIRTY_JOB_CPU_BOUND, watch_drain_dirty, 2, args);
    }
    if (nc->q != nc->inline_q) enif_free(nc->q);
    nc->q = nc->inline_q;
    nc->n = 0;
    return r;
}

/* Makes sure v has a notification queue before its first watcher is added. */
static int ensure_queue(dx_session *s, dx_var *v) {
    if (v->notify) return 0;
    notifyq *q = notifyq_new((dx_str){s->id, s->id_len}, v);
    if (!q) return -1;
    void *got = dx_var_adopt_notify(s, v, q);
    if (got != q) enif_release_resource(q); /* another watch installed one first, or v is gone */
    return got ? 0 : -1;
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
    /* a watch is an operation on the session like a read: one token */
    if (s->rate > 0 && dx_session_take(s, dx_now_ns())) {
        r = dx_error(env, ATOM_rate_limited);
        dx_audit(env, ATOM_dspex_rate_limited, argv[0], ATOM_undefined, &p, 0);
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
        if (ensure_queue(s, vars[i])) {
            atomic_store(&w->active, 0);
            enif_demonitor_process(env, w, &w->mon);
            detach(w);
            r = dx_error2(env, ATOM_not_found, dx_make_bin(env, vars[i]->name, vars[i]->name_len));
            goto out;
        }
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
