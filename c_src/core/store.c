#include "store.h"
#include "ebr.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static dx_rtab_ref g_sessions;
static pthread_mutex_t g_sessions_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t g_var_counter;
/* Fencing tokens: seeded from the wall clock at first use so they keep rising
 * across restarts, then only incremented. */
static _Atomic uint64_t g_lock_tokens;
static void (*g_release_watcher)(void *w);
static void (*g_release_acl)(void *acl);
/* event log hook (issue #15): see store.h */
static void (*_Atomic g_ev_hook)(const dx_ev_change *c);
static _Thread_local int t_ev_kind; /* DX_EV_VAR_ROLLED_BACK while a rollback commits */
#define EV_EMIT(...)                                                                          \
    do {                                                                                      \
        void (*h_)(const dx_ev_change *) = atomic_load_explicit(&g_ev_hook, memory_order_acquire); \
        if (h_) h_(&(dx_ev_change){__VA_ARGS__});                                             \
    } while (0)
void dx_store_set_event_hook(void (*fn)(const dx_ev_change *c)) { atomic_store(&g_ev_hook, fn); }
static void (*g_release_notify)(void *q);
/* Bumped whenever a session is unlinked: a thread's cached session pointer is
 * only trusted while the generation it was cached under is still current. */
static _Atomic uint64_t g_sess_gen;
static _Thread_local struct {
    dx_session *s;
    uint64_t gen;
} t_last;

static void session_unlinked(void) { atomic_fetch_add_explicit(&g_sess_gen, 1, memory_order_seq_cst); }
/* The limits are read on every write by any scheduler thread and replaced by
 * set_limits from another: a sequence lock publishes them, so a reader always
 * gets one consistent set (never max_history from one call and
 * default_history from another) without taking a lock. Writers are serialised
 * by g_limits_mu; readers retry while a write is in progress (odd sequence).
 * Every field is an atomic so the concurrent accesses are defined behaviour. */
static struct {
    _Atomic uint64_t max_sessions, max_vars, max_value_bytes;
    _Atomic uint32_t max_name_len, max_history, default_history;
} g_lim = {100000, 1000000, 16u << 20, 255, 10000, 50};
static _Atomic unsigned g_lim_seq;
static pthread_mutex_t g_limits_mu = PTHREAD_MUTEX_INITIALIZER;

void dx_store_set_limits(const dx_limits *l) {
    pthread_mutex_lock(&g_limits_mu);
    unsigned q = atomic_load_explicit(&g_lim_seq, memory_order_relaxed);
    atomic_store_explicit(&g_lim_seq, q + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&g_lim.max_sessions, l->max_sessions, memory_order_relaxed);
    atomic_store_explicit(&g_lim.max_vars, l->max_vars, memory_order_relaxed);
    atomic_store_explicit(&g_lim.max_value_bytes, l->max_value_bytes, memory_order_relaxed);
    atomic_store_explicit(&g_lim.max_name_len, l->max_name_len, memory_order_relaxed);
    atomic_store_explicit(&g_lim.max_history, l->max_history, memory_order_relaxed);
    atomic_store_explicit(&g_lim.default_history, l->default_history, memory_order_relaxed);
    atomic_store_explicit(&g_lim_seq, q + 2, memory_order_release);
    pthread_mutex_unlock(&g_limits_mu);
}

dx_limits dx_store_limits(void) {
    dx_limits l;
    unsigned q0, q1;
    do {
        q0 = atomic_load_explicit(&g_lim_seq, memory_order_acquire);
        l.max_sessions = atomic_load_explicit(&g_lim.max_sessions, memory_order_relaxed);
        l.max_vars = atomic_load_explicit(&g_lim.max_vars, memory_order_relaxed);
        l.max_value_bytes = atomic_load_explicit(&g_lim.max_value_bytes, memory_order_relaxed);
        l.max_name_len = atomic_load_explicit(&g_lim.max_name_len, memory_order_relaxed);
        l.max_history = atomic_load_explicit(&g_lim.max_history, memory_order_relaxed);
        l.default_history = atomic_load_explicit(&g_lim.default_history, memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        q1 = atomic_load_explicit(&g_lim_seq, memory_order_relaxed);
    } while ((q0 & 1) || q0 != q1);
    return l;
}
/* Every read of a limit below goes through the sequence lock. */
#define g_limits (dx_store_limits())
void dx_store_set_watcher_release(void (*fn)(void *w)) { g_release_watcher = fn; }
void dx_store_set_acl_release(void (*fn)(void *acl)) { g_release_acl = fn; }
void dx_store_set_notify_release(void (*fn)(void *q)) { g_release_notify = fn; }

static void release_acl(void *acl) {
    if (acl && g_release_acl) g_release_acl(acl);
}

/* ---- snapshots -------------------------------------------------------------- */

/* Branch-free: the exponent bits all ones is NaN or an infinity. */
static uint32_t count_nonfinite(const dx_value *v) {
    if (v->type != DX_T_EMBEDDING && v->type != DX_T_TENSOR) return 0;
    size_t odd = 0;
    for (size_t i = 0; i < v->u.v.n; i++) {
        uint64_t b;
        memcpy(&b, &v->u.v.data[i], sizeof b);
        odd += (b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    }
    return odd > UINT32_MAX ? UINT32_MAX : (uint32_t)odd;
}

dx_snap *dx_snap_new(const dx_value *v, uint64_t version, int64_t now_us, const uint8_t *meta, size_t meta_len,
                     const uint8_t *by, size_t by_len) {
    size_t pay = dx_value_payload_size(v);
    size_t pay_al = (pay + 7) & ~(size_t)7;
    size_t size = sizeof(dx_snap) + pay_al + meta_len + by_len;
    dx_snap *s = malloc(size);
    if (!s) return NULL;
    s->version = version;
    s->updated_at = now_us;
    s->size = size;
    atomic_init(&s->refs, 1);
    dx_value_copy_into(&s->value, v, s->data);
    s->nonfinite = count_nonfinite(&s->value);
    char *p = s->data + pay_al;
    s->meta = meta_len ? (const uint8_t *)p : NULL;
    s->meta_len = meta_len;
    if (meta_len) memcpy(p, meta, meta_len);
    p += meta_len;
    s->by = by_len ? (const uint8_t *)p : NULL;
    s->by_len = by_len;
    if (by_len) memcpy(p, by, by_len);
    return s;
}

void dx_snap_release(void *p) {
    dx_snap *s = p;
    if (!s) return;
    /* the only reference (the common case): nobody can take another, so no
     * locked read-modify-write on this line */
    if (atomic_load_explicit(&s->refs, memory_order_acquire) == 1 ||
        atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) == 1)
        free(s);
}

/* ---- variables: allocation -------------------------------------------------- */

static void var_free(void *p) {
    dx_var *v = p;
    dx_snap_release(atomic_load_explicit(&v->cur, memory_order_relaxed));
    for (uint32_t i = 0; i < v->hist_n; i++) dx_snap_release(v->hist[(v->hist_start + i) % v->history_limit]);
    if (v->notify && g_release_notify) g_release_notify(v->notify);
    free(v->hist);
    for (size_t i = 0; i < v->nwatchers; i++)
        if (g_release_watcher) g_release_watcher(v->watchers[i]);
    free(v->watchers);
    dx_constraints_free(v->cons);
    free(atomic_load_explicit(&v->error, memory_order_relaxed));
    free(v->lock_holder);
    release_acl(atomic_load_explicit(&v->acl, memory_order_relaxed));
    free(v);
}

/* Builds an unpublished variable. Its name and id live in the same allocation
 * as the struct: a lookup then touches fewer cache lines. On success the
 * constraints are moved in. */
static dx_var *var_new(const dx_var_spec *sp, dx_str id, uint64_t version, int64_t created_at, int64_t updated_at,
                       int *limit) {
    dx_limits lim = dx_store_limits(); /* one consistent set for both checks */
    int64_t hl = sp->history_limit < 0 ? (int64_t)lim.default_history : sp->history_limit;
    if (hl > (int64_t)lim.max_history) {
        *limit = DX_L_HISTORY;
        return NULL;
    }
    char idbuf[32];
    size_t idlen = id.len;
    if (!id.ptr) {
        uint64_t n = atomic_fetch_add(&g_var_counter, 1) + 1;
        idlen = 4 + sp->name.len + (size_t)snprintf(idbuf, sizeof idbuf, "_%llu", (unsigned long long)n);
    }
    size_t text = (sp->name.len + 1 + idlen + 1 + 7) & ~(size_t)7;
    dx_var *v = calloc(1, sizeof *v + text + sizeof(dx_constraints));
    if (!v) return NULL;
    v->cons = (dx_constraints *)(void *)(v->inline_text + text);
    v->name = v->inline_text;
    memcpy(v->name, sp->name.ptr, sp->name.len);
    v->name[sp->name.len] = 0;
    v->name_len = sp->name.len;
    v->id = v->name + sp->name.len + 1;
    if (id.ptr) {
        memcpy(v->id, id.ptr, id.len);
    } else {
        memcpy(v->id, "var_", 4);
        memcpy(v->id + 4, sp->name.ptr, sp->name.len);
        memcpy(v->id + 4 + sp->name.len, idbuf, idlen - 4 - sp->name.len);
    }
    v->id[idlen] = 0;
    v->id_len = idlen;
    v->history_limit = (uint32_t)hl;
    v->hist = hl ? calloc((size_t)hl, sizeof(dx_snap *)) : NULL;
    dx_snap *cur = dx_snap_new(sp->value, version, updated_at, sp->meta, sp->meta_len, sp->by, sp->by_len);
    if ((hl && !v->hist) || !cur) {
        free(cur);
        free(v->hist);
        free(v);
        return NULL;
    }
    atomic_store_explicit(&v->cur, cur, memory_order_relaxed);
    v->type = sp->type;
    *v->cons = *sp->cons;
    dx_constraints_init(sp->cons);
    v->created_at = created_at;
    v->derived = sp->derived;
    v->key = (dx_rkey){dx_hash(v->name, v->name_len), v->name, v->name_len};
    return v;
}

static char *dup_bytes(const char *p, size_t len) {
    char *d = malloc(len + 1);
    if (!d) return NULL;
    if (len) memcpy(d, p, len);
    d[len] = 0;
    return d;
}

static dx_shard *shard_of(dx_session *s, uint64_t hash) { return &s->shards[(hash >> 58) % DX_SHARDS]; }

/* ---- sessions ---------------------------------------------------------------- */

int dx_store_init(void) { return dx_rtab_init(&g_sessions, 64); }

static int free_var_cb(void *ctx, dx_rkey *e) {
    var_free(e);
    return 0;
}

static void session_free(void *p) {
    dx_session *s = p;
    for (int i = 0; i < DX_SHARDS; i++) {
        if (atomic_load_explicit(&s->shards[i].tab, memory_order_relaxed)) {
            dx_rtab_foreach(&s->shards[i].tab, free_var_cb, NULL);
            dx_rtab_destroy(&s->shards[i].tab);
        }
        pthread_mutex_destroy(&s->shards[i].mu);
    }
    if (s->graph) dx_graph_free(s->graph);
    pthread_mutex_destroy(&s->graph_mu);
    pthread_mutex_destroy(&s->bucket_mu);
    free(s->meta);
    free(s->id);
    free(s);
}

static int free_session_cb(void *ctx, dx_rkey *e) {
    session_free(e);
    return 0;
}

void dx_store_shutdown(void) {
    session_unlinked();
    dx_ebr_drain();
    if (atomic_load_explicit(&g_sessions, memory_order_relaxed)) {
        dx_rtab_foreach(&g_sessions, free_session_cb, NULL);
        dx_rtab_destroy(&g_sessions);
    }
    dx_ebr_drain();
}

static dx_session *session_new(dx_str id, const uint8_t *meta, size_t meta_len, int64_t ttl_ms, int64_t created_at,
                               int64_t now_ms) {
    dx_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->id = dup_bytes(id.ptr, id.len);
    s->id_len = id.len;
    s->meta = meta_len ? malloc(meta_len) : NULL;
    int ok = s->id && (!meta_len || s->meta) && pthread_mutex_init(&s->graph_mu, NULL) == 0 &&
             pthread_mutex_init(&s->bucket_mu, NULL) == 0;
    int i = 0;
    for (; ok && i < DX_SHARDS; i++) {
        if (pthread_mutex_init(&s->shards[i].mu, NULL)) { ok = 0; break; }
        if (dx_rtab_init(&s->shards[i].tab, 4)) { pthread_mutex_destroy(&s->shards[i].mu); ok = 0; break; }
    }
    if (!ok) {
        for (int j = 0; j < i; j++) {
            dx_rtab_destroy(&s->shards[j].tab);
            pthread_mutex_destroy(&s->shards[j].mu);
        }
        if (s->id && (!meta_len || s->meta)) pthread_mutex_destroy(&s->graph_mu);
        free(s->meta);
        free(s->id);
        free(s);
        return NULL;
    }
    if (meta_len) memcpy(s->meta, meta, meta_len);
    s->meta_len = meta_len;
    s->created_at = created_at;
    s->ttl_ms = ttl_ms;
    atomic_store(&s->last_access, now_ms);
    s->key = (dx_rkey){dx_hash(s->id, s->id_len), s->id, s->id_len};
    return s;
}

/* last_access is refreshed at most once per DX_TOUCH_GRANULARITY_MS (see
 * dx_session_touch), so the last real access may be up to that much later
 * than the recorded one: the grace keeps a session for at least ttl after its
 * last access (and at most ttl + the granularity). */
int dx_session_expired(const dx_session *s, int64_t now_ms) {
    return s->ttl_ms >= 0 &&
           now_ms - atomic_load_explicit(&s->last_access, memory_order_relaxed) > s->ttl_ms + DX_TOUCH_GRANULARITY_MS;
}

int dx_session_id_check(dx_str id, int *limit) {
    if (id.len > g_limits.max_name_len || id.len == 0) { *limit = DX_L_NAME_LENGTH; return DX_E_LIMIT; }
    return dx_utf8_valid(id.ptr, id.len) ? DX_OK : DX_E_INVALID_NAME;
}

int dx_session_create(dx_str id, const uint8_t *meta, size_t meta_len, int64_t ttl_ms, int64_t now_us,
                      int64_t now_ms, dx_session **out, int *created, int *limit) {
    *created = 0;
    int crc = dx_session_id_check(id, limit);
    if (crc) return crc;
    dx_session *s = dx_session_find(id, now_ms);
    if (s) { *out = s; return DX_OK; }
    pthread_mutex_lock(&g_sessions_mu);
    uint64_t h = dx_hash(id.ptr, id.len);
    s = (dx_session *)dx_rtab_find(&g_sessions, h, id.ptr, id.len);
    int replaced = 0;
    if (s && dx_session_expired(s, now_ms)) {
        /* An expired session the sweeper has not reached yet: replace it. */
        replaced = 1;
        dx_rtab_remove(&g_sessions, h, id.ptr, id.len);
        session_unlinked();
        atomic_store(&s->dead, true);
        EV_EMIT(.kind = DX_EV_SESSION_DELETED, .s = s, .reason = DX_EV_REASON_EXPIRED);
        dx_ebr_retire(s, session_free, 1);
        s = NULL;
    }
    int rc = DX_OK;
    if (s) {
        dx_session_touch(s, now_ms);
    } else if (atomic_load(&g_sessions)->used >= g_limits.max_sessions) {
        *limit = DX_L_SESSIONS;
        rc = DX_E_LIMIT;
    } else if (!(s = session_new(id, meta, meta_len, ttl_ms, now_us, now_ms))) {
        rc = DX_E_NOMEM;
    } else if ((rc = dx_rtab_insert(&g_sessions, &s->key))) {
        session_free(s);
        s = NULL;
    } else {
        *created = replaced ? 2 : 1;
        EV_EMIT(.kind = DX_EV_SESSION_CREATED, .s = s);
    }
    pthread_mutex_unlock(&g_sessions_mu);
    *out = s;
    return rc;
}

void dx_session_touch(dx_session *s, int64_t now_ms) {
    /* Write only when the value moves by a second: a store on every read would
     * bounce this cache line between readers on different cores. The expiry
     * check allows for the accesses this skips. */
    if (now_ms - atomic_load_explicit(&s->last_access, memory_order_relaxed) >= DX_TOUCH_GRANULARITY_MS)
        atomic_store_explicit(&s->last_access, now_ms, memory_order_relaxed);
}

dx_session *dx_session_find(dx_str id, int64_t now_ms) {
    /* Callers are in an EBR section: a session unlinked before it began bumped
     * the generation first, so a matching generation means t_last.s is live. */
    uint64_t gen = atomic_load_explicit(&g_sess_gen, memory_order_seq_cst);
    dx_session *s = t_last.s;
    if (!(s && t_last.gen == gen && dx_str_eq(s->id, s->id_len, id.ptr, id.len))) {
        s = (dx_session *)dx_rtab_find(&g_sessions, dx_hash(id.ptr, id.len), id.ptr, id.len);
        if (s) {
            t_last.s = s;
            t_last.gen = gen;
        }
    }
    if (!s || dx_session_expired(s, now_ms)) return NULL;
    dx_session_touch(s, now_ms);
    return s;
}

int dx_session_delete(dx_str id) { return dx_session_delete_reason(id, DX_EV_REASON_DELETED); }

int dx_session_delete_reason(dx_str id, int reason) {
    pthread_mutex_lock(&g_sessions_mu);
    dx_session *s = (dx_session *)dx_rtab_remove(&g_sessions, dx_hash(id.ptr, id.len), id.ptr, id.len);
    if (s) EV_EMIT(.kind = DX_EV_SESSION_DELETED, .s = s, .reason = reason);
    pthread_mutex_unlock(&g_sessions_mu);
    if (!s) return DX_E_SESSION_NOT_FOUND;
    session_unlinked();
    atomic_store(&s->dead, true);
    dx_ebr_retire(s, session_free, 1);
    return DX_OK;
}

typedef struct {
    int64_t now;
    dx_session **list;
    size_t n, cap;
} sweep_ctx;

static int sweep_cb(void *ctx, dx_rkey *e) {
    sweep_ctx *c = ctx;
    dx_session *s = (dx_session *)e;
    if (!dx_session_expired(s, c->now)) return 0;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 16;
        dx_session **l = realloc(c->list, cap * sizeof *l);
        if (!l) return 1;
        c->list = l;
        c->cap = cap;
    }
    c->list[c->n++] = s;
    return 0;
}

size_t dx_session_sweep(int64_t now_ms) {
    sweep_ctx c = {now_ms, NULL, 0, 0};
    pthread_mutex_lock(&g_sessions_mu);
    dx_rtab_foreach(&g_sessions, sweep_cb, &c);
    for (size_t i = 0; i < c.n; i++) {
        dx_rtab_remove(&g_sessions, c.list[i]->key.hash, c.list[i]->id, c.list[i]->id_len);
        session_unlinked();
        atomic_store(&c.list[i]->dead, true);
        EV_EMIT(.kind = DX_EV_SESSION_DELETED, .s = c.list[i], .reason = DX_EV_REASON_EXPIRED);
        dx_ebr_retire(c.list[i], session_free, 1);
    }
    pthread_mutex_unlock(&g_sessions_mu);
    free(c.list);
    return c.n;
}

size_t dx_session_count(void) {
    pthread_mutex_lock(&g_sessions_mu);
    size_t n = atomic_load(&g_sessions)->used;
    pthread_mutex_unlock(&g_sessions_mu);
    return n;
}

typedef struct {
    int (*fn)(void *, dx_session *);
    void *ctx;
} sess_iter;

static int sess_iter_cb(void *ctx, dx_rkey *e) {
    sess_iter *it = ctx;
    return it->fn(it->ctx, (dx_session *)e);
}

void dx_session_foreach(int (*fn)(void *ctx, dx_session *s), void *ctx) {
    sess_iter it = {fn, ctx};
    dx_rtab_foreach(&g_sessions, sess_iter_cb, &it);
}

int64_t dx_session_nvars(const dx_session *s) { return atomic_load_explicit(&s->nvars, memory_order_relaxed); }

/* ---- variables -------------------------------------------------------------------- */

int dx_var_register(dx_session *s, const dx_var_spec *sp, int64_t now_us, dx_var **out, int *limit) {
    if (sp->name.len > g_limits.max_name_len || sp->name.len == 0) { *limit = DX_L_NAME_LENGTH; return DX_E_LIMIT; }
    if (!dx_utf8_valid(sp->name.ptr, sp->name.len)) return DX_E_INVALID_NAME;
    if (dx_value_payload_size(sp->value) > g_limits.max_value_bytes) { *limit = DX_L_VALUE_SIZE; return DX_E_LIMIT; }
    dx_var *v = var_new(sp, (dx_str){NULL, 0}, 0, now_us, now_us, limit);
    if (!v) return *limit == DX_L_HISTORY ? DX_E_LIMIT : DX_E_NOMEM;
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc;
    if (atomic_load(&s->dead)) rc = DX_E_SESSION_NOT_FOUND;
    else if (dx_rtab_find(&sh->tab, v->key.hash, v->name, v->name_len)) rc = DX_E_EXISTS;
    else if (atomic_fetch_add(&s->nvars, 1) >= (int64_t)g_limits.max_vars) {
        atomic_fetch_sub(&s->nvars, 1);
        *limit = DX_L_VARS;
        rc = DX_E_LIMIT;
    } else if ((rc = dx_rtab_insert(&sh->tab, &v->key))) {
        atomic_fetch_sub(&s->nvars, 1);
    } else {
        EV_EMIT(.kind = DX_EV_VAR_REGISTERED, .s = s, .v = v, .cur = atomic_load_explicit(&v->cur, memory_order_relaxed));
    }
    pthread_mutex_unlock(&sh->mu);
    if (rc) {
        /* hand the constraints back so the caller still owns what it passed */
        *sp->cons = *v->cons;
        dx_constraints_init(v->cons);
        var_free(v);
        return rc;
    }
    *out = v;
    return DX_OK;
}

dx_var *dx_var_find_name(dx_session *s, dx_str name) {
    uint64_t h = dx_hash(name.ptr, name.len);
    return (dx_var *)dx_rtab_find(&shard_of(s, h)->tab, h, name.ptr, name.len);
}

int dx_var_id_valid(dx_str name, dx_str id) {
    size_t pre = 4 + name.len + 1;
    if (id.len <= pre || memcmp(id.ptr, "var_", 4) != 0 || (name.len && memcmp(id.ptr + 4, name.ptr, name.len) != 0) ||
        id.ptr[pre - 1] != '_')
        return 0;
    for (size_t i = pre; i < id.len; i++)
        if (id.ptr[i] < '0' || id.ptr[i] > '9') return 0;
    return 1;
}

/* Ids are "var_<name>_<digits>": the name is recoverable, so no second index. */
dx_var *dx_var_find(dx_session *s, dx_str key) {
    dx_var *v = dx_var_find_name(s, key);
    if (v || key.len < 7 || memcmp(key.ptr, "var_", 4) != 0) return v;
    size_t end = key.len;
    while (end > 4 && key.ptr[end - 1] >= '0' && key.ptr[end - 1] <= '9') end--;
    if (end == key.len || end <= 5 || key.ptr[end - 1] != '_') return NULL;
    v = dx_var_find_name(s, (dx_str){key.ptr + 4, end - 5});
    return v && dx_str_eq(v->id, v->id_len, key.ptr, key.len) ? v : NULL;
}

static void hist_push(dx_var *v, dx_snap *old) {
    if (!v->history_limit) {
        dx_ebr_retire(old, dx_snap_release, 0);
        return;
    }
    if (v->hist_n == v->history_limit) {
        dx_ebr_retire(v->hist[v->hist_start], dx_snap_release, 0);
        v->hist[v->hist_start] = old;
        v->hist_start = (v->hist_start + 1) % v->history_limit;
    } else {
        v->hist[(v->hist_start + v->hist_n) % v->history_limit] = old;
        v->hist_n++;
    }
}

static _Thread_local uint8_t *t_holder;
static _Thread_local size_t t_hlen, t_hcap;

/* Under the shard mutex: remember who holds v, for the caller's error term. */
static int refuse_locked(const dx_var *v) {
    t_hlen = 0;
    if (v->lock_holder) {
        size_t n = v->lock_holder->len;
        if (n > t_hcap) {
            uint8_t *b = realloc(t_holder, n);
            if (b) { t_holder = b; t_hcap = n; }
        }
        if (n <= t_hcap) {
            if (n) memcpy(t_holder, v->lock_holder->data, n);
            t_hlen = n;
        }
    }
    return DX_E_LOCKED;
}

void dx_last_lock_holder(const uint8_t **p, size_t *len) {
    *p = t_holder;
    *len = t_hlen;
}

/* Checks done under the shard mutex, so they are atomic with the commit. */
static int precheck(dx_var *v, const dx_value *val, const dx_set_opts *o, uint64_t *version) {
    dx_snap *cur = atomic_load_explicit(&v->cur, memory_order_relaxed);
    if (v->dead) return DX_E_NOT_FOUND;
    if (o && o->acl_check && !o->acl_check(o->acl_ctx, v, atomic_load_explicit(&v->acl, memory_order_relaxed)))
        return DX_E_DENIED;
    if (v->derived && !(o && o->propagation)) return DX_E_DERIVED;
    /* A token that is not the current one is stale whoever holds the lock
     * now; {locked, Holder} is for a write that presented no token. */
    if (o && o->lock_token && o->lock_token != v->lock_token) return DX_E_STALE_LOCK;
    if (v->lock_token && !(o && o->lock_token == v->lock_token)) return refuse_locked(v);
    if (o && o->if_current && o->if_current != cur) return DX_E_RETRY;
    if (o && o->has_expected && o->expected != cur->version) {
        *version = cur->version;
        return DX_E_VERSION_MISMATCH;
    }
    if (val->type != v->type) return DX_E_INVALID;
    if (dx_value_payload_size(val) > g_limits.max_value_bytes) return DX_E_LIMIT;
    if (cur->version >= DX_VERSION_MAX) return DX_E_VERSION_LIMIT; /* prepare's +1 must not wrap */
    return DX_OK;
}

static dx_snap *prepare(dx_var *v, const dx_value *val, const dx_set_opts *o, int64_t now_us) {
    dx_snap *cur = atomic_load_explicit(&v->cur, memory_order_relaxed);
    const uint8_t *meta = cur->meta;
    size_t meta_len = cur->meta_len;
    if (o && o->set_meta) {
        meta = o->meta;
        meta_len = o->meta_len;
    }
    return dx_snap_new(val, cur->version + 1, now_us, meta, meta_len, o ? o->by : NULL, o ? o->by_len : 0);
}

static uint64_t commit(dx_session *s, dx_var *v, dx_snap *next, const dx_set_opts *o, dx_notify_fn nf, void *nctx) {
    dx_snap *old = atomic_load_explicit(&v->cur, memory_order_relaxed);
    atomic_store_explicit(&v->cur, next, memory_order_release);
    EV_EMIT(.kind = t_ev_kind ? t_ev_kind : DX_EV_VAR_UPDATED, .s = s, .v = v, .old = old, .cur = next,
            .principal = o ? o->principal : NULL, .principal_len = o ? o->principal_len : 0);
    if (nf) nf(nctx, s, v, old, next);
    hist_push(v, old);
    return next->version;
}

int dx_var_set(dx_session *s, dx_var *v, const dx_value *val, const dx_set_opts *o, int64_t now_us,
               uint64_t *version, dx_notify_fn nf, void *nctx) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = precheck(v, val, o, version);
    dx_snap *next = rc ? NULL : prepare(v, val, o, now_us);
    if (!rc && !next) rc = DX_E_NOMEM;
    if (!rc) *version = commit(s, v, next, o, nf, nctx);
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

static int cmp_shard_idx(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int dx_var_set_many(dx_session *s, dx_set_item *it, size_t n, bool atomic, bool check_only, int64_t now_us,
                    dx_notify_fn nf, void *nctx) {
    /* Lock the shards involved in ascending index order: no deadlock between batches. */
    int idx[DX_SHARDS], nidx = 0;
    bool used[DX_SHARDS] = {0};
    for (size_t i = 0; i < n; i++) {
        int k = (int)((it[i].var->key.hash >> 58) % DX_SHARDS);
        if (!used[k]) { used[k] = true; idx[nidx++] = k; }
        for (size_t j = 0; j < i; j++)
            if (it[j].var == it[i].var) return DX_E_INVALID;
    }
    qsort(idx, (size_t)nidx, sizeof(int), cmp_shard_idx);
    for (int k = 0; k < nidx; k++) pthread_mutex_lock(&s->shards[idx[k]].mu);
    dx_snap **next = calloc(n ? n : 1, sizeof *next);
    int failed = 0;
    for (size_t i = 0; i < n; i++) {
        it[i].rc = next ? precheck(it[i].var, &it[i].value, &it[i].opts, &it[i].version) : DX_E_NOMEM;
        if (it[i].rc == DX_E_LOCKED && t_hlen && (it[i].holder = malloc(t_hlen))) {
            memcpy(it[i].holder, t_holder, t_hlen);
            it[i].holder_len = t_hlen;
        }
        if (!it[i].rc && !check_only && !(next[i] = prepare(it[i].var, &it[i].value, &it[i].opts, now_us)))
            it[i].rc = DX_E_NOMEM;
        failed |= it[i].rc != DX_OK;
    }
    if (check_only) { /* nothing commits */
        atomic = true;
        failed = 1;
    }
    if (atomic && !failed) EV_EMIT(.kind = DX_EV_BATCH_BEGIN, .s = s, .items = it, .nitems = n);
    if (!(atomic && failed))
        for (size_t i = 0; i < n; i++)
            if (!it[i].rc) it[i].version = commit(s, it[i].var, next[i], &it[i].opts, nf, nctx);
    if (atomic && !failed) EV_EMIT(.kind = DX_EV_BATCH_COMMITTED, .s = s, .items = it, .nitems = n);
    for (int k = nidx - 1; k >= 0; k--) pthread_mutex_unlock(&s->shards[idx[k]].mu);
    if (atomic && failed && next)
        for (size_t i = 0; i < n; i++) free(next[i]);
    free(next);
    return (atomic && failed) || check_only ? DX_E_BATCH : DX_OK;
}

int dx_var_delete(dx_session *s, dx_str key) {
    dx_var *v = dx_var_find(s, key);
    return v ? dx_var_delete_checked(s, v, NULL) : DX_E_NOT_FOUND;
}

/* Like dx_var_delete, but deletes exactly v (the variable the caller looked up
 * and is checking), with the access check run under the shard mutex: a
 * variable deleted and registered again under the same name meanwhile is not
 * touched (DX_E_NOT_FOUND), and rules changed meanwhile are the ones checked. */
int dx_var_delete_checked(dx_session *s, dx_var *v, const dx_set_opts *o) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = DX_E_NOT_FOUND;
    if (v->dead) {
        rc = DX_E_NOT_FOUND;
    } else if (o && o->acl_check && !o->acl_check(o->acl_ctx, v, atomic_load_explicit(&v->acl, memory_order_relaxed))) {
        rc = DX_E_DENIED;
    } else if (v->lock_token) {
        rc = refuse_locked(v);
    } else if (dx_rtab_remove(&sh->tab, v->key.hash, v->name, v->name_len)) {
        v->dead = true;
        atomic_fetch_sub(&s->nvars, 1);
        rc = DX_OK;
        /* in the critical section of the delete, as dx_var_delete: commit order */
        EV_EMIT(.kind = DX_EV_VAR_DELETED, .s = s, .v = v, .old = atomic_load_explicit(&v->cur, memory_order_relaxed),
                .principal = o ? o->principal : NULL, .principal_len = o ? o->principal_len : 0);
        /* lock order: shard, then graph (as dx_var_delete) */
        pthread_mutex_lock(&s->graph_mu);
        if (s->graph) dx_graph_remove_node(s->graph, v->name, v->name_len);
        pthread_mutex_unlock(&s->graph_mu);
    }
    pthread_mutex_unlock(&sh->mu);
    if (!rc) dx_ebr_retire(v, var_free, 0);
    return rc;
}

uint64_t dx_var_lock_current(dx_session *s, dx_var *v) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    uint64_t t = v->dead ? 0 : v->lock_token;
    pthread_mutex_unlock(&sh->mu);
    return t;
}

int dx_var_lock(dx_session *s, dx_var *v, uint64_t expect, const uint8_t *holder, size_t hlen, uint64_t *token,
                const dx_set_opts *acl) {
    dx_blob *b = malloc(sizeof *b + hlen);
    if (!b) return DX_E_NOMEM;
    b->len = hlen;
    if (hlen) memcpy(b->data, holder, hlen);
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = DX_OK;
    if (v->dead) {
        rc = DX_E_NOT_FOUND;
    } else if (acl && acl->acl_check &&
               !acl->acl_check(acl->acl_ctx, v, atomic_load_explicit(&v->acl, memory_order_relaxed))) {
        rc = DX_E_DENIED;
    } else if (v->lock_token && v->lock_token != expect) {
        rc = refuse_locked(v);
        *token = v->lock_token;
    } else {
        uint64_t t = atomic_load(&g_lock_tokens);
        if (t == 0) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            uint64_t seed = (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
            atomic_compare_exchange_strong(&g_lock_tokens, &t, seed);
        }
        v->lock_token = *token = atomic_fetch_add(&g_lock_tokens, 1) + 1;
        free(v->lock_holder);
        v->lock_holder = b;
        b = NULL;
    }
    pthread_mutex_unlock(&sh->mu);
    free(b);
    return rc;
}

uint64_t dx_lock_tokens_raise(uint64_t floor) {
    uint64_t t = atomic_load(&g_lock_tokens);
    while (t < floor && !atomic_compare_exchange_weak(&g_lock_tokens, &t, floor)) {
    }
    return t < floor ? floor : t;
}

int dx_var_unlock(dx_session *s, dx_var *v, uint64_t token) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = DX_E_STALE_LOCK;
    if (!v->dead && token && v->lock_token == token) {
        v->lock_token = 0;
        free(v->lock_holder);
        v->lock_holder = NULL;
        rc = DX_OK;
    }
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

int dx_var_set_acl(dx_session *s, dx_var *v, void *acl) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = v->dead ? DX_E_NOT_FOUND : DX_OK;
    void *old = NULL;
    if (!rc) old = atomic_exchange_explicit(&v->acl, acl, memory_order_acq_rel);
    pthread_mutex_unlock(&sh->mu);
    if (!rc && old) dx_ebr_retire(old, release_acl, 0);
    return rc;
}

void dx_session_set_rate(dx_session *s, double rate, double burst) {
    pthread_mutex_lock(&s->bucket_mu);
    s->burst = burst;
    s->tokens = burst;
    s->bucket_at = 0;
    s->rate = rate;
    pthread_mutex_unlock(&s->bucket_mu);
}

void dx_session_get_rate(dx_session *s, int64_t now_ns, double *rate, double *burst, double *tokens) {
    pthread_mutex_lock(&s->bucket_mu);
    *rate = s->rate;
    *burst = s->burst;
    double t = s->tokens;
    if (s->rate > 0 && s->bucket_at && now_ns > s->bucket_at) {
        t += (double)(now_ns - s->bucket_at) * s->rate / 1e9;
        if (t > s->burst) t = s->burst;
    }
    *tokens = t;
    pthread_mutex_unlock(&s->bucket_mu);
}

int dx_session_take(dx_session *s, int64_t now_ns) {
    if (s->rate <= 0) return DX_OK;
    pthread_mutex_lock(&s->bucket_mu);
    if (s->bucket_at) {
        s->tokens += (double)(now_ns - s->bucket_at) * s->rate / 1e9;
        if (s->tokens > s->burst) s->tokens = s->burst;
    }
    s->bucket_at = now_ns;
    int rc = DX_E_RATE_LIMITED;
    if (s->tokens >= 1.0) {
        s->tokens -= 1.0;
        rc = DX_OK;
    }
    pthread_mutex_unlock(&s->bucket_mu);
    return rc;
}

int dx_var_set_error(dx_session *s, dx_var *v, const uint8_t *blob, size_t len) {
    dx_blob *b = NULL;
    if (blob) {
        b = malloc(sizeof *b + len);
        if (!b) return DX_E_NOMEM;
        b->len = len;
        memcpy(b->data, blob, len);
    }
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    dx_blob *old = atomic_exchange_explicit(&v->error, b, memory_order_acq_rel);
    pthread_mutex_unlock(&sh->mu);
    dx_ebr_retire(old, free, 0);
    return DX_OK;
}

dx_graph *dx_graph_lock(dx_session *s) {
    pthread_mutex_lock(&s->graph_mu);
    if (!s->graph) s->graph = dx_graph_new();
    return s->graph;
}

void dx_graph_unlock(dx_session *s) { pthread_mutex_unlock(&s->graph_mu); }

size_t dx_var_history_locked(dx_var *v, dx_snap **out, size_t max) {
    size_t n = v->hist_n < max ? v->hist_n : max;
    for (size_t i = 0; i < n; i++) out[i] = v->hist[(v->hist_start + i) % (v->history_limit ? v->history_limit : 1)];
    return n;
}

long dx_var_history(dx_session *s, dx_var *v, dx_snap **out, size_t max) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    long n = -1;
    if (!v->dead) {
        n = (long)(v->hist_n < max ? v->hist_n : max);
        for (long i = 0; i < n; i++)
            out[i] = v->hist[(v->hist_start + v->hist_n - 1 - (uint32_t)i) % v->history_limit];
    }
    pthread_mutex_unlock(&sh->mu);
    return n;
}

int dx_var_rollback(dx_session *s, dx_var *v, uint64_t target, const dx_set_opts *o, int64_t now_us,
                    uint64_t *version, dx_notify_fn nf, void *nctx) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    dx_snap *cur = atomic_load_explicit(&v->cur, memory_order_relaxed);
    dx_snap *src = cur->version == target ? cur : NULL;
    for (uint32_t i = 0; !src && i < v->hist_n; i++) {
        dx_snap *h = v->hist[(v->hist_start + i) % v->history_limit];
        if (h->version == target) src = h;
    }
    int rc = v->dead ? DX_E_NOT_FOUND : src ? precheck(v, &src->value, o, version) : DX_E_VERSION_NOT_FOUND;
    if (!rc) {
        /* The old value comes back with the metadata it had then. */
        dx_set_opts ro = o ? *o : (dx_set_opts){0};
        if (!ro.set_meta) {
            ro.set_meta = true;
            ro.meta = src->meta;
            ro.meta_len = src->meta_len;
        }
        dx_snap *next = prepare(v, &src->value, &ro, now_us);
        if (!next) rc = DX_E_NOMEM;
        else {
            t_ev_kind = DX_EV_VAR_ROLLED_BACK;
            *version = commit(s, v, next, o, nf, nctx);
            t_ev_kind = 0;
        }
    }
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

int dx_var_add_watcher(dx_session *s, dx_var *v, void *w) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = DX_OK;
    if (v->dead) rc = DX_E_NOT_FOUND;
    else if (v->nwatchers == v->capwatchers) {
        size_t cap = v->capwatchers ? v->capwatchers * 2 : 4;
        void **nw = realloc(v->watchers, cap * sizeof(void *));
        if (!nw) rc = DX_E_NOMEM;
        else { v->watchers = nw; v->capwatchers = cap; }
    }
    if (!rc) v->watchers[v->nwatchers++] = w;
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

void *dx_var_adopt_notify(dx_session *s, dx_var *v, void *q) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    void *r = NULL;
    if (!v->dead) {
        if (!v->notify) v->notify = q;
        r = v->notify;
    }
    pthread_mutex_unlock(&sh->mu);
    return r;
}

int dx_var_info(dx_session *s, dx_var *v, size_t *nwatchers, size_t *nhist) {
    dx_shard *sh = shard_of(s, v->key.hash);
    pthread_mutex_lock(&sh->mu);
    int rc = v->dead ? -1 : 0;
    *nwatchers = v->nwatchers;
    *nhist = v->hist_n;
    pthread_mutex_unlock(&sh->mu);
    return rc;
}

size_t dx_var_remove_watcher(dx_session *s, dx_var *v, void *w) {
    dx_shard *sh = shard_of(s, v->key.hash);
    size_t removed = 0;
    pthread_mutex_lock(&sh->mu);
    for (size_t i = 0; i < v->nwatchers;) {
        if (v->watchers[i] == w) {
            v->watchers[i] = v->watchers[--v->nwatchers];
            removed++;
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&sh->mu);
    for (size_t i = 0; i < removed; i++)
        if (g_release_watcher) g_release_watcher(w);
    return removed;
}

typedef struct {
    int (*fn)(void *, dx_var *);
    void *ctx;
    int stop;
} var_iter;

static int var_iter_cb(void *ctx, dx_rkey *e) {
    var_iter *it = ctx;
    return it->stop = it->fn(it->ctx, (dx_var *)e);
}

void dx_session_foreach_var(dx_session *s, int (*fn)(void *ctx, dx_var *v), void *ctx) {
    var_iter it = {fn, ctx, 0};
    for (int i = 0; i < DX_SHARDS && !it.stop; i++) dx_rtab_foreach(&s->shards[i].tab, var_iter_cb, &it);
}

typedef struct {
    dx_var **v;
    size_t n, cap;
    int oom;
} collect_ctx;

static int collect_cb(void *ctx, dx_var *v) {
    collect_ctx *c = ctx;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        dx_var **nv = realloc(c->v, cap * sizeof *nv);
        if (!nv) { c->oom = 1; return 1; }
        c->v = nv;
        c->cap = cap;
    }
    c->v[c->n++] = v;
    return 0;
}

static int cmp_name(const void *a, const void *b) {
    const dx_var *x = *(dx_var *const *)a, *y = *(dx_var *const *)b;
    size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
    int c = n ? memcmp(x->name, y->name, n) : 0;
    return c ? c : (x->name_len > y->name_len) - (x->name_len < y->name_len);
}

dx_var **dx_session_vars_sorted(dx_session *s, size_t *n) {
    collect_ctx c = {0};
    dx_session_foreach_var(s, collect_cb, &c);
    if (c.oom) {
        free(c.v);
        *n = 1;
        return NULL;
    }
    if (c.n) qsort(c.v, c.n, sizeof *c.v, cmp_name);
    *n = c.n;
    return c.v;
}

/* ---- one page of a session ------------------------------------------------- */

typedef struct {
    dx_var_stat *v;
    size_t n, cap;
    int oom;
} stat_ctx;

static int stat_cb(void *ctx, dx_rkey *e) {
    stat_ctx *c = ctx;
    dx_var *v = (dx_var *)e;
    if (v->dead) return 0;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        dx_var_stat *nv = realloc(c->v, cap * sizeof *nv);
        if (!nv) { c->oom = 1; return 1; }
        c->v = nv;
        c->cap = cap;
    }
    uint64_t key = 0;
    for (size_t i = 0; i < 8; i++) key = key << 8 | (i < v->name_len ? (uint8_t)v->name[i] : 0);
    /* updated_at is read after the shard is released (dx_session_var_stats) */
    c->v[c->n++] = (dx_var_stat){v, dx_var_current(v), key, 0, v->hist_n,
                                 v->nwatchers > UINT32_MAX ? UINT32_MAX : (uint32_t)v->nwatchers};
    return 0;
}

dx_var_stat *dx_session_var_stats(dx_session *s, size_t *n, void (*each)(void *ctx, const dx_var_stat *e),
                                  void *ctx) {
    stat_ctx c = {0};
    /* sized up front, so the shards are not held across a realloc in the usual case */
    int64_t hint = dx_session_nvars(s);
    c.cap = (hint > 0 ? (size_t)hint : 0) + 64;
    c.v = malloc(c.cap * sizeof *c.v);
    if (!c.v) c.oom = 1;
    for (int i = 0; i < DX_SHARDS && !c.oom; i++) {
        size_t from = c.n;
        pthread_mutex_lock(&s->shards[i].mu);
        dx_rtab_foreach(&s->shards[i].tab, stat_cb, &c);
        pthread_mutex_unlock(&s->shards[i].mu);
        for (size_t j = from; j < c.n && !c.oom; j++) {
            c.v[j].updated_at = c.v[j].cur->updated_at;
            if (each) each(ctx, &c.v[j]);
        }
    }
    if (c.oom) {
        free(c.v);
        *n = 1;
        return NULL;
    }
    *n = c.n;
    return c.v;
}

/* The prefix keys order two names unless they are equal (then the names do):
 * a name that ends inside the prefix is padded with zeros, below any byte
 * but 0, and a tie there falls through to the bytes themselves. */
static int cmp_stat_name(const void *a, const void *b) {
    const dx_var_stat *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return cmp_name(&x->var, &y->var);
}

static void swap_stat(dx_var_stat *a, size_t i, size_t j) {
    dx_var_stat t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Quickselect: afterwards a[k] holds the entry of rank k within a[lo..hi),
 * the entries before it smaller, those after it greater (names are unique).
 * Random pivots, as names come from clients; after 2 log2 n + 8 rounds (an
 * unlucky run) the rest is sorted instead, so the worst case is O(n log n). */
static void select_rank(dx_var_stat *a, size_t lo, size_t hi, size_t k) {
    uint64_t r = (uint64_t)(uintptr_t)a ^ ((uint64_t)hi << 32) ^ 0x9e3779b97f4a7c15ull;
    int budget = 8;
    for (size_t m = hi - lo; m > 1; m >>= 1) budget += 2;
    while (hi - lo > 1) {
        if (budget-- == 0) {
            qsort(a + lo, hi - lo, sizeof *a, cmp_stat_name);
            return;
        }
        r ^= r << 13, r ^= r >> 7, r ^= r << 17; /* xorshift64 */
        swap_stat(a, lo + (size_t)(r % (hi - lo)), hi - 1);
        size_t p = lo;
        for (size_t i = lo; i < hi - 1; i++)
            if (cmp_stat_name(&a[i], &a[hi - 1]) < 0) swap_stat(a, i, p++);
        swap_stat(a, p, hi - 1);
        if (k == p) return;
        if (k < p) hi = p;
        else lo = p + 1;
    }
}

size_t dx_var_stats_page(dx_var_stat *a, size_t n, size_t offset, size_t limit) {
    if (offset >= n || limit == 0) return 0;
    size_t end = limit > n - offset ? n : offset + limit;
    select_rank(a, 0, n, offset);
    if (end < n) select_rank(a, offset, n, end); /* a[offset..end) now the page, unordered */
    qsort(a + offset, end - offset, sizeof *a, cmp_stat_name);
    return end - offset;
}

/* Whether x comes before y in the newest-first order of dx_var_stats_latest. */
static int newer(const dx_var_stat *x, const dx_var_stat *y) {
    if (x->updated_at != y->updated_at) return x->updated_at > y->updated_at;
    return cmp_stat_name(x, y) > 0;
}

size_t dx_var_stats_latest(const dx_var_stat *a, size_t n, dx_var_stat *out, size_t k) {
    size_t m = 0;
    if (k == 0) return 0;
    for (size_t i = 0; i < n; i++) {
        if (m == k && !newer(&a[i], &out[k - 1])) continue;
        size_t j = m < k ? m++ : k - 1;
        for (; j > 0 && newer(&a[i], &out[j - 1]); j--) out[j] = out[j - 1];
        out[j] = a[i];
    }
    return m;
}

void dx_session_lock_all(dx_session *s) {
    for (int i = 0; i < DX_SHARDS; i++) pthread_mutex_lock(&s->shards[i].mu);
}
void dx_session_unlock_all(dx_session *s) {
    for (int i = DX_SHARDS - 1; i >= 0; i--) pthread_mutex_unlock(&s->shards[i].mu);
}

/* ---- import -------------------------------------------------------------------- */

dx_session *dx_import_begin(dx_str id, const uint8_t *meta, size_t meta_len, int64_t ttl_ms, int64_t created_at,
                            int64_t now_ms) {
    int limit;
    if (dx_session_id_check(id, &limit)) return NULL;
    return session_new(id, meta, meta_len, ttl_ms, created_at, now_ms);
}

int dx_import_var_add(dx_session *s, const dx_import_var *iv, const dx_import_hist *hist, size_t nhist, int *limit) {
    const dx_var_spec *sp = &iv->spec;
    if (sp->name.len > g_limits.max_name_len || sp->name.len == 0) { *limit = DX_L_NAME_LENGTH; return DX_E_LIMIT; }
    if (!dx_utf8_valid(sp->name.ptr, sp->name.len)) return DX_E_INVALID_NAME;
    /* an id lookup resolves the name from the id: any other id is unreachable */
    if (!dx_var_id_valid(sp->name, iv->id) || iv->version > DX_VERSION_MAX) return DX_E_INVALID;
    if (dx_value_payload_size(sp->value) > g_limits.max_value_bytes) { *limit = DX_L_VALUE_SIZE; return DX_E_LIMIT; }
    if ((uint64_t)dx_session_nvars(s) >= g_limits.max_vars) { *limit = DX_L_VARS; return DX_E_LIMIT; }
    dx_var *v = var_new(sp, iv->id, iv->version, iv->created_at, iv->updated_at, limit);
    if (!v) return *limit == DX_L_HISTORY ? DX_E_LIMIT : DX_E_NOMEM;
    /* Keep only the newest history_limit entries, as the live store would. */
    size_t skip = nhist > v->history_limit ? nhist - v->history_limit : 0;
    for (size_t i = skip; i < nhist; i++) {
        dx_snap *h = dx_snap_new(&hist[i].value, hist[i].version, hist[i].updated_at, hist[i].meta, hist[i].meta_len,
                                 hist[i].by, hist[i].by_len);
        if (!h) { var_free(v); return DX_E_NOMEM; }
        v->hist[v->hist_n++] = h;
    }
    dx_shard *sh = shard_of(s, v->key.hash);
    int rc = dx_rtab_insert(&sh->tab, &v->key);
    if (rc) {
        var_free(v);
        return rc;
    }
    atomic_fetch_add(&s->nvars, 1);
    return DX_OK;
}

int dx_import_commit(dx_session *s, int *limit) {
    pthread_mutex_lock(&g_sessions_mu);
    int rc;
    if (atomic_load(&g_sessions)->used >= g_limits.max_sessions) {
        *limit = DX_L_SESSIONS;
        rc = DX_E_LIMIT;
    } else {
        rc = dx_rtab_insert(&g_sessions, &s->key);
    }
    pthread_mutex_unlock(&g_sessions_mu);
    if (rc) session_free(s);
    return rc;
}

void dx_import_abort(dx_session *s) { session_free(s); }
