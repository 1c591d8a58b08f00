/* The event log's NIF layer (issue #15).
 *
 * Commit path: the store calls ev_hook with the shard (or session table) mutex
 * held. The hook copies the committed snapshots into a payload and pushes it on
 * the queue (c_src/events/evq.c), which assigns the session's sequence, the
 * time and the UUIDv7 in commit order. No term is built there: the writer
 * thread encodes payloads to external term format just before it writes them.
 *
 * Durability: events_await/0 answers `ok' when everything pushed so far is
 * durable, else {wait, Ref}; the writer thread then sends the caller
 * {dspex_events_durable, Ref, ok | {error, {event_store, Reason}}}.
 * The listener process (the pid given to events_open) gets
 * {dspex_events_written, LastPosition, Count} after every written batch and
 * {dspex_events_failed, Reason} after every failed attempt. */
#include "events_nif.h"
#include "evq.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static ErlNifMutex *g_open_mu;
static _Atomic(dx_evq *) g_q;
/* NIF calls using the queue right now (close waits for them): one counter per thread, each on a cache line
 * of its own, so that the commit path's locked increment touches a line no other thread reads or writes (a
 * shared counter shared its line with g_q, g_ops and g_rd, read by every other thread of the log: the hook's
 * increment had to take the line back from them, the costliest instruction of the hook in perf annotate).
 * Threads beyond the slots share one counter. Only the owner thread writes a slot; close reads them all. */
#define EV_INFLIGHT_SLOTS 256
typedef struct {
    _Atomic long n;
    char pad[64 - sizeof(long)];
} inflight_slot;
static inflight_slot g_inflight_slots[EV_INFLIGHT_SLOTS] __attribute__((aligned(64)));
static _Atomic int g_inflight_used; /* slots handed out */
static inflight_slot g_inflight_shared __attribute__((aligned(64)));
static _Thread_local inflight_slot *t_inflight;

static inline inflight_slot *inflight_enter(void) {
    inflight_slot *c = t_inflight;
    if (!c) {
        int i = atomic_load_explicit(&g_inflight_used, memory_order_relaxed);
        while (i < EV_INFLIGHT_SLOTS && !atomic_compare_exchange_weak(&g_inflight_used, &i, i + 1)) {}
        t_inflight = c = i < EV_INFLIGHT_SLOTS ? &g_inflight_slots[i] : &g_inflight_shared;
    }
    /* seq_cst: ordered before the caller's load of g_q (close exchanges g_q, then reads the counters) */
    atomic_fetch_add_explicit(&c->n, 1, memory_order_seq_cst);
    return c;
}

static inline void inflight_exit(inflight_slot *c) {
    if (c == &g_inflight_shared) atomic_fetch_sub_explicit(&c->n, 1, memory_order_release);
    else /* the owner is the only writer: no locked instruction */
        atomic_store_explicit(&c->n, atomic_load_explicit(&c->n, memory_order_relaxed) - 1, memory_order_release);
}

/* close: waits until no call that may have loaded the queue before it was unpublished is still in it */
static void inflight_wait(void) {
    int used = atomic_load(&g_inflight_used);
    for (int i = 0; i <= used && i <= EV_INFLIGHT_SLOTS; i++) {
        inflight_slot *c = i < used && i < EV_INFLIGHT_SLOTS ? &g_inflight_slots[i] : &g_inflight_shared;
        while (atomic_load_explicit(&c->n, memory_order_acquire)) sched_yield();
    }
}
static _Atomic uint64_t g_lost;  /* pushes that failed for lack of memory */
static const dx_ev_backend_ops *g_ops;
static void *g_rd; /* the readers' backend instance */
static pthread_mutex_t g_rd_mu = PTHREAD_MUTEX_INITIALIZER;
/* A third instance, only for the queue's first lookup of a session's last sequence (an indexed read, run
 * in the commit path): never behind a long read of g_rd. */
static void *g_seed;
static pthread_mutex_t g_seed_mu = PTHREAD_MUTEX_INITIALIZER;
static ErlNifMutex *g_wait_mu;
static ErlNifPid g_listener;
static int g_have_listener;
static uint64_t g_snap_every; /* 0: no snapshot notices */
static _Atomic bool g_default_sync; /* the log's default durability is sync (events_open's `durability') */
static _Thread_local dx_str t_principal;

typedef struct waiter {
    struct waiter *next;
    ErlNifPid pid;
    ErlNifEnv *env;
    ERL_NIF_TERM ref;
    uint64_t ticket;
} waiter;
static waiter *g_waiters;
/* Under g_wait_mu: the highest ticket whose batch the listener (dspex_events) has been told of. Durability
 * waits answer from it rather than from the queue's own `done' (which moves before on_batch runs), so a
 * caller that awaited its events finds the listener's messages of them (written positions, snapshots due)
 * already queued: a call to dspex_events after the wait sees them (dspex_events:await/0, then
 * snapshots_sync/0). Reset when a log is opened (tickets start again from 1). */
static uint64_t g_pub_done;

static ERL_NIF_TERM A_event_store, A_wait, A_durable, A_written, A_failed, A_position, A_sequence, A_timestamp,
    A_session, A_node, A_principal, A_request_id, A_variable, A_reason, A_deleted, A_expired, A_migrated,
    A_old_value, A_previous, A_members, A_backend, A_sqlite, A_postgres, A_target, A_capacity, A_max_batch, A_linger_us,
    A_listener, A_pushed, A_done, A_depth, A_max_depth, A_bytes, A_batches, A_written_n, A_lag_us,
    A_last_position, A_last_error, A_lost, A_none, A_not_open, A_seq_from, A_seq_to, A_pos_from, A_pos_to,
    A_ts_from, A_ts_to, A_types, A_limit, A_descending, A_full, A_already_open, A_sequence_gap, A_snap_due, A_snapshot_every, A_spool, A_spooled, A_commit_seeds, A_silent, A_session_not_found, A_provisional,
    A_gather_us, A_acked_batches, A_acked, A_gathers, A_gather_timeouts, A_writer_cpu_us, A_write_cpu_us,
    A_encode_cpu_us, A_write_us, A_commit_avg_us, A_reused, A_spare, A_durability, A_sync, A_async, A_event_wait,
    A_backpressure;
static ERL_NIF_TERM A_types_tab[8];
static const char *const TYPE_NAMES[8] = {"",
                                          "session_created",
                                          "session_deleted",
                                          "variable_registered",
                                          "variable_updated",
                                          "variable_deleted",
                                          "variable_rolled_back",
                                          "batch_committed"};
static const size_t TYPE_LENS[8] = {0, 15, 15, 19, 16, 16, 20, 15};

void dx_events_principal(dx_str id) { t_principal = id; }

/* ---- payloads (built in the commit path, encoded by the writer) ------------------------ */
typedef struct {
    int kind, reason;
    dx_snap *old, *cur;
    dx_type type;
    uint32_t history_limit;
    bool derived;
    bool embedded; /* copied into the queue's item (dx_ev_in.payload_len): not a block of its own */
    int64_t created_at, ttl_ms;
    size_t vid_len; /* variable id: vid_buf, the tail of this payload */
    dx_constraints *cons; /* variable_registered only */
    uint8_t *smeta; /* session metadata (ETF) */
    size_t smeta_len;
    size_t n; /* batch members */
    dx_str *names;
    uint64_t *versions;
    ErlNifBinary enc;
    bool have_enc;
    char vid_buf[];
} ev_payload;

/* A variable id this long or shorter: the payload is built on the committing thread's stack and copied
 * into the queue's item (one allocation per event, or none when the item is a recycled one). */
#define EV_VID_INLINE 64
/* Items of up to this many bytes are recycled (see dx_evq_config.item_slot): an event of a variable with
 * an id of up to EV_VID_INLINE bytes and up to 256 bytes of text (session, type, name, principal,
 * changed_by). */
#define EV_ITEM_SLOT (((sizeof(dx_ev_item) + 256 + 16 + sizeof(ev_payload) + EV_VID_INLINE) + 63) & ~(size_t)63)
/* A written item is kept for reuse only when its event's data was this small: a kept item holds its
 * snapshots until it is reused (at most spare_max items). */
#define EV_RECYCLE_MAX_DATA 1024

/* Snapshots are held by reference (taken in the commit path, under the shard
 * mutex, so they are reachable), not copied. Releasing the last reference
 * frees a snapshot: the committing thread does it for a recycled item (its
 * allocator's own block), the writer for the others. */
static void payload_free(ev_payload *p) {
    if (!p) return;
    dx_snap_release((dx_snap *)p->old);
    dx_snap_release((dx_snap *)p->cur);
    if (p->cons) {
        dx_constraints_free(p->cons);
        free(p->cons);
    }
    free(p->smeta);
    for (size_t i = 0; i < p->n && p->names; i++) free((void *)p->names[i].ptr);
    free(p->names);
    free(p->versions);
    if (p->have_enc) enif_release_binary(&p->enc);
    if (!p->embedded) enif_free(p);
}

static dx_snap *snap_ref(const dx_snap *s) {
    if (s) dx_snap_retain(s);
    return (dx_snap *)s;
}

/* The events of an atomic batch (members' updates, then batch_committed) are
 * collected on the committing thread and pushed together, so they are adjacent
 * in the session's sequence. Every pointer in them stays valid until the batch
 * ends: the batch's shard mutexes are held throughout. */
static _Thread_local struct {
    bool on;
    bool dead; /* the log closed during this batch: none of its events is logged (see batch_abandon) */
    size_t n, cap;
    dx_ev_in *ins;
} t_batch;

/* Drops what the thread collected of an atomic batch (the payloads freed). */
static void batch_clear(void) {
    for (size_t i = 0; i < t_batch.n; i++) payload_free(t_batch.ins[i].payload);
    t_batch.n = 0;
}

/* The log closed between a batch's begin and this event of it: the batch ends after the close, so none of
 * its events is logged, like any change made then (a log reopened before its batch_committed gets none of
 * it either: it did not see the batch begin). The thread stays in the batch until its batch_committed, then
 * logs one event at a time again: a batch left `on' would hold back every later event of the thread. */
static void batch_abandon(int kind) {
    batch_clear();
    t_batch.dead = kind != DX_EV_BATCH_COMMITTED;
    t_batch.on = t_batch.dead;
}

static void batch_flush(dx_evq *q) {
    if (t_batch.n && dx_evq_push_many(q, t_batch.ins, t_batch.n, NULL, NULL)) {
        for (size_t i = 0; i < t_batch.n; i++) payload_free(t_batch.ins[i].payload);
        atomic_fetch_add(&g_lost, t_batch.n);
    }
    t_batch.n = 0;
    t_batch.on = false;
}

/* The session sequence the last event this thread queued one at a time got
 * (0: none since dx_events_take_pushed): the replication fast path
 * (repl_nif.c) ships it with the set that logged it. */
static _Thread_local uint64_t t_pushed;
uint64_t dx_events_take_pushed(void) {
    uint64_t s = t_pushed;
    t_pushed = 0;
    return s;
}

/* 1 when the log is off, or knows the session's last sequence (its next
 * event is numbered after it without asking the backend); 0 otherwise (the
 * first event would have to seed it: dspex_events:last_sequence/1 does). */
int dx_events_known(const char *session, size_t len) {
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    int k = !q || dx_evq_known(q, session, len);
    inflight_exit(ifl);
    return k;
}

/* Queues one event, or adds it to the batch being collected. */
static int push_one(dx_evq *q, const dx_ev_in *in) {
    if (t_batch.on) {
        if (t_batch.n == t_batch.cap) {
            size_t nc = t_batch.cap ? t_batch.cap * 2 : 16;
            dx_ev_in *ni = realloc(t_batch.ins, nc * sizeof *ni);
            if (!ni) { /* out of memory: keep what was collected, in order, and go on one by one */
                batch_flush(q);
                return dx_evq_push(q, in, NULL) ? 0 : -1;
            }
            t_batch.ins = ni;
            t_batch.cap = nc;
        }
        t_batch.ins[t_batch.n++] = *in;
        return 0;
    }
    uint64_t seq = 0;
    int rc = dx_evq_push(q, in, &seq) ? 0 : -1;
    t_pushed = rc ? 0 : seq;
    return rc;
}

static _Thread_local bool t_mute; /* events_session_delete(_, silent) */
/* The last push of this thread found the queue at its capacity (the high-water mark): read and cleared by
 * dx_events_settle right after the commit, which then needs no look at the queue when it is false. */
static _Thread_local bool t_over_mark;
static void ev_hook(const dx_ev_change *c) {
    if (t_mute) return;
    /* log off: no traffic on the shared in-flight counter (the load after the increment decides) */
    if (!atomic_load_explicit(&g_q, memory_order_acquire)) {
        if (t_batch.on) batch_abandon(c->kind);
        return;
    }
    /* a node's cached copy of another node's session (dspex_cache) has no log
     * of its own: the owner's log holds the session's events */
    if (c->s->id_len >= DX_CACHE_PREFIX_LEN && !memcmp(c->s->id, DX_CACHE_PREFIX, DX_CACHE_PREFIX_LEN)) return;
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load_explicit(&g_q, memory_order_acquire);
    if (!q) {
        if (t_batch.on) batch_abandon(c->kind);
        goto out;
    }
    if (c->kind == DX_EV_BATCH_BEGIN) {
        batch_clear(); /* nothing is left over from an earlier batch (every batch ends in batch_committed) */
        t_batch.on = true;
        t_batch.dead = false;
        goto out;
    }
    if (t_batch.dead) { /* the rest of a batch the log closed during */
        if (c->kind == DX_EV_BATCH_COMMITTED) t_batch.on = t_batch.dead = false;
        goto out;
    }
    size_t vid_len = c->kind >= DX_EV_VAR_REGISTERED && c->kind <= DX_EV_VAR_ROLLED_BACK && c->v ? c->v->id_len : 0;
    /* one event at a time: the payload on this stack, copied into the item by the push; an atomic batch's
     * events wait for the batch's end, each in a block of its own */
    union {
        ev_payload p;
        char bytes[sizeof(ev_payload) + EV_VID_INLINE];
    } local;
    bool inline_p = !t_batch.on && vid_len <= EV_VID_INLINE;
    ev_payload *p = inline_p ? &local.p : enif_alloc(sizeof *p + vid_len);
    if (!p) goto lost;
    memset(p, 0, sizeof *p);
    p->embedded = inline_p;
    p->kind = c->kind;
    p->reason = c->reason;
    /* who wrote: the write's own `as' (set, set_many, rollback, delete), else the thread's (set/4); an atomic
     * batch's event names its members' principal when they agree */
    dx_str who = c->principal_len ? (dx_str){c->principal, c->principal_len} : t_principal;
    if (c->kind == DX_EV_BATCH_COMMITTED && c->nitems) {
        who = (dx_str){c->items[0].opts.principal, c->items[0].opts.principal_len};
        for (size_t i = 1; i < c->nitems && who.len; i++)
            if (c->items[i].opts.principal_len != who.len || memcmp(c->items[i].opts.principal, who.ptr, who.len))
                who = (dx_str){0};
    }
    dx_ev_in in = {.session = c->s->id, .session_len = c->s->id_len, .type = TYPE_NAMES[c->kind],
                   .type_len = TYPE_LENS[c->kind], .payload = p, .payload_len = inline_p ? sizeof *p + vid_len : 0,
                   .principal = who.ptr, .principal_len = who.len};
    int ok = 1;
    switch (c->kind) {
    case DX_EV_SESSION_CREATED:
        p->ttl_ms = c->s->ttl_ms;
        p->created_at = c->s->created_at;
        if (c->s->meta_len && (p->smeta = malloc(c->s->meta_len))) {
            memcpy(p->smeta, c->s->meta, c->s->meta_len);
            p->smeta_len = c->s->meta_len;
        }
        ok = !c->s->meta_len || p->smeta;
        break;
    case DX_EV_SESSION_DELETED: break;
    case DX_EV_BATCH_COMMITTED:
        p->names = calloc(c->nitems ? c->nitems : 1, sizeof *p->names);
        p->versions = calloc(c->nitems ? c->nitems : 1, sizeof *p->versions);
        ok = p->names && p->versions;
        for (size_t i = 0; ok && i < c->nitems; i++) {
            const dx_var *v = c->items[i].var;
            char *t = malloc(v->name_len ? v->name_len : 1);
            if (!t) { ok = 0; break; }
            memcpy(t, v->name, v->name_len);
            p->names[i] = (dx_str){t, v->name_len};
            p->versions[i] = c->items[i].version;
            p->n = i + 1;
        }
        break;
    default: { /* variable events */
        const dx_var *v = c->v;
        in.variable = v->name;
        in.variable_len = v->name_len;
        /* an update's new snapshot carries the commit's clock reading (dx_var_set, set_many, rollback: the
         * same CLOCK_REALTIME µs): the event's time, no second reading */
        if ((c->kind == DX_EV_VAR_UPDATED || c->kind == DX_EV_VAR_ROLLED_BACK) && c->cur)
            in.commit_us = c->cur->updated_at;
        const dx_snap *by = c->cur; /* a delete has no writer of its own */
        if (by && by->by_len) {
            in.changed_by = (const char *)by->by;
            in.changed_by_len = by->by_len;
        }
        memcpy(p->vid_buf, v->id, vid_len);
        p->vid_len = vid_len;
        p->type = v->type;
        p->history_limit = v->history_limit;
        p->derived = v->derived;
        p->created_at = v->created_at;
        p->cur = snap_ref(c->cur);
        p->old = snap_ref(c->old);
        if (ok && c->kind == DX_EV_VAR_REGISTERED) {
            if (!(p->cons = malloc(sizeof *p->cons))) {
                ok = 0;
                break;
            }
            dx_constraints_init(p->cons);
            if (v->cons && dx_constraints_copy(p->cons, v->cons) != DX_OK) ok = 0;
        }
    }
    }
    if (!ok || push_one(q, &in)) {
        payload_free(p);
        goto lost;
    }
    if (c->kind == DX_EV_BATCH_COMMITTED && t_batch.on) batch_flush(q);
    t_over_mark = dx_evq_full(q);
    goto out;
lost:
    /* out of memory in the commit path: counted and reported (events_stats lost), never silent */
    atomic_fetch_add(&g_lost, 1);
    if (c->kind == DX_EV_BATCH_COMMITTED && t_batch.on) batch_flush(q); /* the members still go in */
out:
    inflight_exit(ifl);
}

/* ---- writer callbacks (writer thread) ---------------------------------------------------- */
static _Thread_local ErlNifEnv *t_wenv;

/* The writer thread ends (its log closes): its encoding environment goes with it (a new log's writer is a
 * new thread with an environment of its own). */
static void ev_writer_exit(void *ctx) {
    (void)ctx;
    if (t_wenv) enif_free_env(t_wenv);
    t_wenv = NULL;
}

static ERL_NIF_TERM reason_atom(int r) { return r == DX_EV_REASON_EXPIRED ? A_expired : r == DX_EV_REASON_MIGRATED ? A_migrated : A_deleted; }

static ERL_NIF_TERM map_of(ErlNifEnv *env, ERL_NIF_TERM *k, ERL_NIF_TERM *v, size_t n) {
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, k, v, n, &m);
    return m;
}

/* ---- direct external term format for the frequent events -------------------------------------------
 * variable_updated / variable_rolled_back data written straight into external term format (the bytes
 * binary_to_term/1 reads back to the same map as term_to_binary/1 of the built term would), without
 * building the map terms in an environment and walking them again: the writer thread's encoding was a
 * quarter of its time per event. Values of the vector types (embedding, tensor) and blobs that are not
 * plain external term format take the term path below instead. */
typedef struct {
    ErlNifBinary bin; /* grown as needed, shrunk to n at the end */
    size_t n;
    bool oom;
} etf_buf;

static void eb_put(etf_buf *b, const void *d, size_t n) {
    if (b->oom) return;
    if (b->n + n > b->bin.size) {
        size_t nc = b->bin.size * 2;
        while (nc < b->n + n) nc *= 2;
        if (!enif_realloc_binary(&b->bin, nc)) {
            b->oom = true;
            return;
        }
    }
    memcpy(b->bin.data + b->n, d, n);
    b->n += n;
}
static void eb_u8(etf_buf *b, uint8_t v) { eb_put(b, &v, 1); }
static void eb_u32(etf_buf *b, uint32_t v) {
    uint8_t d[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    eb_put(b, d, 4);
}
static void eb_atom(etf_buf *b, const char *a) { /* SMALL_ATOM_UTF8_EXT */
    size_t n = strlen(a);
    eb_u8(b, 119);
    eb_u8(b, (uint8_t)n);
    eb_put(b, a, n);
}
static void eb_big(etf_buf *b, uint64_t mag, int neg) { /* SMALL_BIG_EXT, little-endian digits */
    uint8_t d[8];
    int n = 0;
    while (mag) {
        d[n++] = (uint8_t)mag;
        mag >>= 8;
    }
    eb_u8(b, 110);
    eb_u8(b, (uint8_t)n);
    eb_u8(b, (uint8_t)neg);
    eb_put(b, d, (size_t)n);
}
static void eb_int(etf_buf *b, int64_t v) {
    if (v >= 0 && v <= 255) {
        eb_u8(b, 97);
        eb_u8(b, (uint8_t)v);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
        eb_u8(b, 98);
        eb_u32(b, (uint32_t)(int32_t)v);
    } else {
        eb_big(b, v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, v < 0);
    }
}
static void eb_uint(etf_buf *b, uint64_t v) {
    if (v <= INT32_MAX) eb_int(b, (int64_t)v);
    else eb_big(b, v, 0);
}
static void eb_bin(etf_buf *b, const void *p, size_t n) {
    eb_u8(b, 109);
    eb_u32(b, (uint32_t)n);
    eb_put(b, p, n);
}
static void eb_map(etf_buf *b, uint32_t arity) {
    eb_u8(b, 116);
    eb_u32(b, arity);
}
/* An opaque blob the store keeps in external term format (metadata, changed_by), spliced in without its
 * version byte; empty: dflt_map ? #{} : undefined. -1 when the blob is not plain external term format
 * (compressed, or not ours): the term path decodes it as it always did. */
static int eb_blob(etf_buf *b, const uint8_t *p, size_t n, bool dflt_map) {
    if (!n) {
        if (dflt_map) eb_map(b, 0);
        else eb_atom(b, "undefined");
        return 0;
    }
    if (n < 2 || p[0] != 131 || p[1] == 80) return -1;
    eb_put(b, p + 1, n - 1);
    return 0;
}
static int eb_value(etf_buf *b, const dx_value *v) {
    switch (v->type) {
    case DX_T_FLOAT: {
        double d = v->u.f;
        if (isnan(d)) eb_atom(b, "nan");
        else if (isinf(d)) eb_atom(b, d > 0 ? "infinity" : "neg_infinity");
        else {
            uint64_t u;
            memcpy(&u, &d, 8);
            eb_u8(b, 70); /* NEW_FLOAT_EXT, big-endian IEEE 754 */
            eb_u32(b, (uint32_t)(u >> 32));
            eb_u32(b, (uint32_t)u);
        }
        return 0;
    }
    case DX_T_INTEGER: eb_int(b, v->u.i); return 0;
    case DX_T_BOOLEAN: eb_atom(b, v->u.b ? "true" : "false"); return 0;
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE: eb_bin(b, v->u.s.ptr, v->u.s.len); return 0;
    default: return -1;
    }
}
static int eb_snap(etf_buf *b, const dx_snap *s) { /* as dx_snap_to_term */
    eb_map(b, 5);
    eb_atom(b, "changed_by");
    if (eb_blob(b, s->by, s->by_len, false)) return -1;
    eb_atom(b, "metadata");
    if (eb_blob(b, s->meta, s->meta_len, true)) return -1;
    eb_atom(b, "updated_at");
    eb_int(b, s->updated_at);
    eb_atom(b, "value");
    if (eb_value(b, &s->value)) return -1;
    eb_atom(b, "version");
    eb_uint(b, s->version);
    return 0;
}
/* The data of variable_updated / variable_rolled_back (the same map as the term path's): 0, or -1 to take
 * the term path. */
static int eb_updated(etf_buf *b, const ev_payload *p, const dx_ev_item *it) {
    const dx_snap *c = p->cur, *o = p->old;
    if (!c || !o) return -1;
    eb_u8(b, 131);
    eb_map(b, 10);
    eb_atom(b, "id");
    eb_bin(b, p->vid_buf, p->vid_len);
    eb_atom(b, "name");
    eb_bin(b, it->rec.variable, it->rec.variable_len);
    eb_atom(b, "value");
    if (eb_value(b, &c->value)) return -1;
    eb_atom(b, "old_value");
    if (eb_value(b, &o->value)) return -1;
    eb_atom(b, "version");
    eb_uint(b, c->version);
    eb_atom(b, "previous_version");
    eb_uint(b, o->version);
    eb_atom(b, "updated_at");
    eb_int(b, c->updated_at);
    eb_atom(b, "metadata");
    if (eb_blob(b, c->meta, c->meta_len, true)) return -1;
    eb_atom(b, "changed_by");
    if (eb_blob(b, c->by, c->by_len, false)) return -1;
    eb_atom(b, "previous");
    if (eb_snap(b, o)) return -1;
    return b->oom ? -1 : 0;
}

static int ev_encode(void *ctx, dx_ev_item *it) {
    ev_payload *p = it->payload;
    if (p->kind == DX_EV_VAR_UPDATED || p->kind == DX_EV_VAR_ROLLED_BACK) {
        etf_buf b = {.n = 0, .oom = false};
        if (!enif_alloc_binary(512, &b.bin)) return -1;
        if (eb_updated(&b, p, it) == 0 && !b.oom && enif_realloc_binary(&b.bin, b.n)) {
            p->enc = b.bin;
            p->have_enc = true;
            it->rec.data = p->enc.data;
            it->rec.data_len = p->enc.size;
            return 0;
        }
        enif_release_binary(&b.bin); /* a vector value or a foreign blob: the term path */
    }
    if (!t_wenv && !(t_wenv = enif_alloc_env())) return -1;
    ErlNifEnv *env = t_wenv;
    ERL_NIF_TERM d;
    switch (p->kind) {
    case DX_EV_SESSION_CREATED: {
        ERL_NIF_TERM k[3] = {ATOM_metadata, ATOM_ttl, ATOM_created_at};
        ERL_NIF_TERM v[3] = {dx_blob_to_term(env, p->smeta, p->smeta_len, enif_make_new_map(env)),
                             p->ttl_ms < 0 ? ATOM_infinity : enif_make_int64(env, p->ttl_ms / 1000),
                             enif_make_int64(env, p->created_at)};
        d = map_of(env, k, v, 3);
        break;
    }
    case DX_EV_SESSION_DELETED: {
        ERL_NIF_TERM k[1] = {A_reason}, v[1] = {reason_atom(p->reason)};
        d = map_of(env, k, v, 1);
        break;
    }
    case DX_EV_BATCH_COMMITTED: {
        ERL_NIF_TERM l = enif_make_list(env, 0);
        for (size_t i = p->n; i > 0; i--) {
            ERL_NIF_TERM k[2] = {ATOM_name, ATOM_version};
            ERL_NIF_TERM v[2] = {dx_make_bin(env, p->names[i - 1].ptr, p->names[i - 1].len),
                                 enif_make_uint64(env, p->versions[i - 1])};
            l = enif_make_list_cell(env, map_of(env, k, v, 2), l);
        }
        ERL_NIF_TERM k[1] = {A_members}, v[1] = {l};
        d = map_of(env, k, v, 1);
        break;
    }
    case DX_EV_VAR_REGISTERED: {
        /* the variable as export_session/1 shows it right after registration */
        const dx_snap *c = p->cur;
        ERL_NIF_TERM k[13] = {ATOM_id, ATOM_name, ATOM_type, ATOM_value, ATOM_constraints, ATOM_metadata,
                              ATOM_version, ATOM_created_at, ATOM_updated_at, ATOM_changed_by, ATOM_history_limit,
                              ATOM_history, ATOM_derived};
        ERL_NIF_TERM v[13] = {dx_make_bin(env, p->vid_buf, p->vid_len),
                              dx_make_bin(env, it->rec.variable, it->rec.variable_len),
                              dx_type_atom(p->type),
                              dx_value_to_term(env, &c->value),
                              dx_constraints_to_term(env, p->type, p->cons),
                              dx_blob_to_term(env, c->meta, c->meta_len, enif_make_new_map(env)),
                              enif_make_uint64(env, c->version),
                              enif_make_int64(env, p->created_at),
                              enif_make_int64(env, c->updated_at),
                              dx_blob_to_term(env, c->by, c->by_len, ATOM_undefined),
                              enif_make_uint64(env, p->history_limit),
                              enif_make_list(env, 0),
                              p->derived ? ATOM_true : ATOM_false};
        d = map_of(env, k, v, 13);
        break;
    }
    case DX_EV_VAR_DELETED: {
        ERL_NIF_TERM k[3] = {ATOM_id, ATOM_name, ATOM_version};
        ERL_NIF_TERM v[3] = {dx_make_bin(env, p->vid_buf, p->vid_len), dx_make_bin(env, it->rec.variable, it->rec.variable_len),
                             enif_make_uint64(env, p->old ? p->old->version : 0)};
        d = map_of(env, k, v, 3);
        break;
    }
    default: { /* updated, rolled back */
        const dx_snap *c = p->cur, *o = p->old;
        ERL_NIF_TERM k[10] = {ATOM_id, ATOM_name, ATOM_value, A_old_value, ATOM_version, ATOM_previous_version,
                              ATOM_updated_at, ATOM_metadata, ATOM_changed_by, A_previous};
        ERL_NIF_TERM v[10] = {dx_make_bin(env, p->vid_buf, p->vid_len),
                              dx_make_bin(env, it->rec.variable, it->rec.variable_len),
                              dx_value_to_term(env, &c->value),
                              dx_value_to_term(env, &o->value),
                              enif_make_uint64(env, c->version),
                              enif_make_uint64(env, o->version),
                              enif_make_int64(env, c->updated_at),
                              dx_blob_to_term(env, c->meta, c->meta_len, enif_make_new_map(env)),
                              dx_blob_to_term(env, c->by, c->by_len, ATOM_undefined),
                              dx_snap_to_term(env, o)};
        d = map_of(env, k, v, 10);
    }
    }
    int rc = enif_term_to_binary(env, d, &p->enc) ? 0 : -1;
    enif_clear_env(env);
    if (rc) return -1;
    p->have_enc = true;
    it->rec.data = p->enc.data;
    it->rec.data_len = p->enc.size;
    return 0;
}

static void ev_free_payload(void *ctx, dx_ev_item *it) { payload_free(it->payload); }

/* Writer thread, a written item about to be recycled: the encoding (the writer's block) goes now; the
 * snapshots stay referenced until a committing thread reuses the item (payload_free there), unless they
 * are big (the event's data): then the item is freed at once. */
static bool ev_recycle(void *ctx, dx_ev_item *it) {
    ev_payload *p = it->payload;
    if (!p || !p->embedded || it->rec.data_len > EV_RECYCLE_MAX_DATA) return false;
    if (p->have_enc) {
        enif_release_binary(&p->enc);
        p->have_enc = false;
    }
    it->rec.data = NULL;
    it->rec.data_len = 0;
    return true;
}

/* A committing thread, one kept item ahead of its reuse (evq.h prefetch_payload): the lines the release of
 * its snapshots writes (the reference count; the allocator's header and the first words when it frees). */
static void ev_prefetch_payload(void *ctx, const dx_ev_item *it) {
    const ev_payload *p = it->payload;
    if (!p->embedded) return;
    const dx_snap *s[2] = {p->old, p->cur};
    for (int i = 0; i < 2; i++)
        if (s[i]) {
            dx_prefetch_w((const char *)s[i] - 16);
            dx_prefetch_w(&s[i]->refs);
        }
}

static void ev_on_batch(void *ctx, uint64_t done, const char *err, const dx_ev_rec *recs, size_t n) {
    ErlNifEnv *env = enif_alloc_env();
    if (!env) return;
    enif_mutex_lock(g_wait_mu);
    ErlNifPid lp = g_listener;
    int have = g_have_listener;
    enif_mutex_unlock(g_wait_mu);
    /* the listener first, then the waiters (see g_pub_done) */
    if (have) {
        ERL_NIF_TERM msg =
            err ? enif_make_tuple2(env, A_failed, dx_make_bin(env, err, strlen(err)))
                : enif_make_tuple3(env, A_written, enif_make_uint64(env, n ? recs[n - 1].position : 0),
                                   enif_make_uint64(env, n));
        enif_send(NULL, &lp, env, msg);
        if (!err && g_snap_every) {
            /* sessions whose sequence reached a multiple of snapshot_every in this batch */
            enif_clear_env(env);
            ERL_NIF_TERM due = enif_make_list(env, 0);
            size_t nd = 0;
            for (size_t i = 0; i < n; i++)
                if (recs[i].sequence % g_snap_every == 0) {
                    due = enif_make_list_cell(env, enif_make_tuple2(env, dx_make_bin(env, recs[i].session, recs[i].session_len),
                                                                    enif_make_uint64(env, recs[i].sequence)), due);
                    nd++;
                }
            if (nd) enif_send(NULL, &lp, env, enif_make_tuple2(env, A_snap_due, due));
        }
        enif_clear_env(env);
    }
    ERL_NIF_TERM res = err ? enif_make_tuple2(env, ATOM_error,
                                              enif_make_tuple2(env, A_event_store, dx_make_bin(env, err, strlen(err))))
                           : ATOM_ok;
    enif_mutex_lock(g_wait_mu);
    if (done > g_pub_done) g_pub_done = done;
    for (waiter **pw = &g_waiters; *pw;) {
        waiter *w = *pw;
        if (err || w->ticket <= done) {
            ERL_NIF_TERM msg = enif_make_tuple3(env, A_durable, enif_make_copy(env, w->ref), res);
            enif_send(NULL, &w->pid, env, msg);
            enif_clear_env(env);
            res = err ? enif_make_tuple2(env, ATOM_error,
                                         enif_make_tuple2(env, A_event_store, dx_make_bin(env, err, strlen(err))))
                      : ATOM_ok;
            *pw = w->next;
            enif_free_env(w->env);
            enif_free(w);
        } else {
            pw = &w->next;
        }
    }
    enif_mutex_unlock(g_wait_mu);
    enif_free_env(env);
}

/* ---- NIFs ---------------------------------------------------------------------------------- */
static int get_bin_opt(ErlNifEnv *env, ERL_NIF_TERM m, ERL_NIF_TERM k, ErlNifBinary *b) {
    ERL_NIF_TERM v;
    return enif_get_map_value(env, m, k, &v) && enif_inspect_iolist_as_binary(env, v, b);
}

static ERL_NIF_TERM es_error(ErlNifEnv *env, const char *msg) {
    return dx_error(env, enif_make_tuple2(env, A_event_store, dx_make_bin(env, msg, strlen(msg))));
}

/* events_open(#{backend => sqlite | postgres, target => iodata, node => binary, capacity, max_batch, spool => path,
 *               listener => pid}) -> ok | {error, {event_store, Reason}} */
DX_NIF(nif_events_open) {
    ERL_NIF_TERM be, v;
    ErlNifBinary target, node = {0};
    ErlNifUInt64 cap = 1 << 20, mb = 8192;
    ErlNifPid lp;
    int have_lp = 0;
    if (!enif_is_map(env, argv[0]) || !enif_get_map_value(env, argv[0], A_backend, &be) ||
        !get_bin_opt(env, argv[0], A_target, &target))
        return enif_make_badarg(env);
    get_bin_opt(env, argv[0], A_node, &node);
    if (enif_get_map_value(env, argv[0], A_capacity, &v) && (!enif_get_uint64(env, v, &cap) || !cap))
        return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[0], A_max_batch, &v) && (!enif_get_uint64(env, v, &mb) || !mb || mb > 1000000))
        return enif_make_badarg(env);
    ErlNifUInt64 linger = 0;
    if (enif_get_map_value(env, argv[0], A_linger_us, &v) && (!enif_get_uint64(env, v, &linger) || linger > 10000000))
        return enif_make_badarg(env);
    ErlNifSInt64 gather = 0; /* 0: adaptive, < 0: off, > 0: a fixed bound in µs */
    if (enif_get_map_value(env, argv[0], A_gather_us, &v) && (!enif_get_int64(env, v, &gather) || gather > 10000000))
        return enif_make_badarg(env);
    ErlNifUInt64 every = 0;
    if (enif_get_map_value(env, argv[0], A_snapshot_every, &v) && !enif_get_uint64(env, v, &every))
        return enif_make_badarg(env);
    bool dsync = false; /* the default durability: async unless `durability => sync' */
    if (enif_get_map_value(env, argv[0], A_durability, &v)) {
        if (!enif_is_identical(v, A_sync) && !enif_is_identical(v, A_async)) return enif_make_badarg(env);
        dsync = enif_is_identical(v, A_sync);
    }
    if (enif_get_map_value(env, argv[0], A_listener, &v)) {
        if (!enif_get_local_pid(env, v, &lp)) return enif_make_badarg(env);
        have_lp = 1;
    }
    const dx_ev_backend_ops *ops = NULL;
    if (enif_is_identical(be, A_sqlite)) ops = &dx_ev_sqlite_ops;
#ifdef DX_HAVE_PG
    else if (enif_is_identical(be, A_postgres)) ops = &dx_ev_pg_ops;
#endif
    else return dx_error(env, enif_make_tuple2(env, A_event_store, enif_make_tuple2(env, A_backend, be)));
    ErlNifBinary spool = {0};
    int have_spool = get_bin_opt(env, argv[0], A_spool, &spool);
    if (!have_spool && enif_get_map_value(env, argv[0], A_spool, &v)) return enif_make_badarg(env);
    char *tgt = malloc(target.size + 1), *spool_path = have_spool ? malloc(spool.size + 1) : NULL;
    if (!tgt || (have_spool && !spool_path)) {
        free(tgt);
        free(spool_path);
        return dx_error(env, ATOM_enomem);
    }
    memcpy(tgt, target.data, target.size);
    tgt[target.size] = 0;
    if (have_spool) {
        memcpy(spool_path, spool.data, spool.size);
        spool_path[spool.size] = 0;
    }
    char err[256] = "";
    ERL_NIF_TERM r;
    enif_mutex_lock(g_open_mu);
    if (atomic_load(&g_q)) {
        r = dx_error(env, enif_make_tuple2(env, A_event_store, A_already_open));
        goto out;
    }
    void *rd = NULL, *seed = NULL;
    if (ops->open(tgt, &rd, err, sizeof err)) {
        r = es_error(env, err);
        goto out;
    }
    if (ops->open(tgt, &seed, err, sizeof err)) {
        ops->close(rd);
        r = es_error(env, err);
        goto out;
    }
    dx_evq_config cfg = {.ops = ops, .target = tgt, .node = (const char *)node.data, .node_len = node.size,
                         .max_batch = mb, .capacity = cap, .linger_us = (int64_t)linger, .gather_us = (int64_t)gather, .encode = ev_encode, .free_payload = ev_free_payload,
                         .item_alloc = enif_alloc, .item_free = enif_free,
                         .item_slot = EV_ITEM_SLOT, .recycle = ev_recycle, .prefetch_payload = ev_prefetch_payload,
                         .on_batch = ev_on_batch, .writer_exit = ev_writer_exit, .spool_path = spool_path};
    enif_mutex_lock(g_wait_mu);
    g_have_listener = have_lp;
    if (have_lp) g_listener = lp;
    g_snap_every = every;
    g_pub_done = 0;
    enif_mutex_unlock(g_wait_mu);
    atomic_store(&g_default_sync, dsync);
    dx_evq *q = dx_evq_open(&cfg, seed, &g_seed_mu, err, sizeof err);
    if (!q) {
        ops->close(rd);
        ops->close(seed);
        r = es_error(env, err);
        goto out;
    }
    g_ops = ops;
    g_rd = rd;
    g_seed = seed;
    atomic_store(&g_q, q);
    r = ATOM_ok;
out:
    enif_mutex_unlock(g_open_mu);
    free(tgt);
    free(spool_path);
    return r;
}

static void close_queue(void) {
    dx_evq *q = atomic_exchange(&g_q, NULL);
    if (!q) return;
    /* hooks that loaded q before the exchange finish their push first */
    inflight_wait();
    dx_evq_close(q); /* drains: every queued event is written (or the backend failed for good) */
    pthread_mutex_lock(&g_rd_mu);
    g_ops->close(g_rd);
    g_rd = NULL;
    pthread_mutex_unlock(&g_rd_mu);
    pthread_mutex_lock(&g_seed_mu);
    g_ops->close(g_seed);
    g_seed = NULL;
    pthread_mutex_unlock(&g_seed_mu);
    enif_mutex_lock(g_wait_mu);
    g_have_listener = 0;
    enif_mutex_unlock(g_wait_mu);
}

/* events_close() -> ok: drains the queue, stops the writer and closes the backend. */
DX_NIF(nif_events_close) {
    enif_mutex_lock(g_open_mu);
    close_queue();
    enif_mutex_unlock(g_open_mu);
    return ATOM_ok;
}

/* The type: an atom or a binary, stored as its text. */
static int get_text(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *out, char *buf, size_t len) {
    ErlNifBinary b;
    if (enif_is_atom(env, t)) {
        int n = enif_get_atom(env, t, buf, (unsigned)len, ERL_NIF_LATIN1);
        if (n <= 1) return 0;
        *out = (dx_str){buf, (size_t)n - 1};
        return 1;
    }
    if (!enif_inspect_binary(env, t, &b) || b.size == 0 || b.size > 255) return 0;
    *out = (dx_str){(const char *)b.data, b.size};
    return 1;
}

/* An append's copy of another node's event (a replica following its owner's log): the sequence it must
 * have, its id, time and node. */
typedef struct {
    uint64_t sequence; /* 0: the session's next */
    int64_t ts_us;     /* 0: now */
    char id[37];       /* "" : a new one */
    ErlNifBinary node; /* size 0: this node */
} append_as;

/* An append's data and metadata are encoded (term_to_binary) and copied in the NIF call: past these bounds
 * (some 50 ms for 64 MiB of data) that is done on a dirty scheduler. The check walks at most EV_SMALL_TERMS
 * terms, nested at most EV_SMALL_DEPTH deep, and binaries of EV_SMALL_BYTES in all: beyond any of them the
 * term counts as big. */
#define EV_SMALL_TERMS 4096
#define EV_SMALL_DEPTH 32
#define EV_SMALL_BYTES (256 * 1024)

typedef struct {
    size_t terms, bytes;
} small_budget;

/* 1 when t is beyond the budget (what is left of it is spent by the walk). */
static int big_term(ErlNifEnv *env, ERL_NIF_TERM t, small_budget *b, int depth) {
    ErlNifBinary bin;
    ERL_NIF_TERM h, k, v;
    const ERL_NIF_TERM *el;
    int arity;
    if (depth > EV_SMALL_DEPTH || !b->terms) return 1;
    b->terms--;
    switch (enif_term_type(env, t)) {
    case ERL_NIF_TERM_TYPE_BITSTRING: /* a binary's bytes count; a bit string that is no binary is big */
        if (!enif_inspect_binary(env, t, &bin) || bin.size > b->bytes) return 1;
        b->bytes -= bin.size;
        return 0;
    case ERL_NIF_TERM_TYPE_LIST:
        while (enif_get_list_cell(env, t, &h, &t))
            if (big_term(env, h, b, depth + 1)) return 1;
        return !enif_is_empty_list(env, t) && big_term(env, t, b, depth + 1); /* an improper tail */
    case ERL_NIF_TERM_TYPE_TUPLE:
        enif_get_tuple(env, t, &arity, &el);
        for (int i = 0; i < arity; i++)
            if (big_term(env, el[i], b, depth + 1)) return 1;
        return 0;
    case ERL_NIF_TERM_TYPE_MAP: {
        size_t n;
        ErlNifMapIterator it;
        if (!enif_get_map_size(env, t, &n) || n > b->terms || !enif_map_iterator_create(env, t, &it, ERL_NIF_MAP_ITERATOR_FIRST))
            return 1;
        int big = 0;
        while (!big && enif_map_iterator_get_pair(env, &it, &k, &v)) {
            big = big_term(env, k, b, depth + 1) || big_term(env, v, b, depth + 1);
            enif_map_iterator_next(env, &it);
        }
        enif_map_iterator_destroy(env, &it);
        return big;
    }
    case ERL_NIF_TERM_TYPE_FUN: return 1; /* its environment unread: big */
    default: return 0; /* atoms, numbers, pids, ports, references */
    }
}

static ERL_NIF_TERM append_common(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[], const append_as *as, int full) {
    ErlNifBinary sid, prin = {0}, var = {0}, data, meta, by = {0};
    char tb[256];
    dx_str type;
    ERL_NIF_TERM v;
    if (!enif_inspect_binary(env, argv[0], &sid) || sid.size == 0 || !get_text(env, argv[1], &type, tb, sizeof tb) ||
        !enif_is_map(env, argv[3]))
        return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[3], A_principal, &v) && !enif_is_identical(v, ATOM_undefined) &&
        !enif_inspect_binary(env, v, &prin))
        return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[3], A_variable, &v) && !enif_is_identical(v, ATOM_undefined)) {
        char nb[DX_ATOM_TEXT];
        dx_str n;
        if (!dx_get_name(env, v, &n, nb, sizeof nb)) return enif_make_badarg(env);
        if (!enif_is_binary(env, v)) v = dx_make_bin(env, n.ptr, n.len);
        enif_inspect_binary(env, v, &var);
    }
    dx_evq *q = atomic_load(&g_q);
    if (!q) return dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
    small_budget budget = {EV_SMALL_TERMS, EV_SMALL_BYTES};
    if (!dx_on_dirty() && (big_term(env, argv[2], &budget, 0) || big_term(env, argv[3], &budget, 0)))
        return enif_schedule_nif(env, "events_append", ERL_NIF_DIRTY_JOB_CPU_BOUND,
                                 full ? nif_events_append_as : nif_events_append, argc, argv);
    int have_by = enif_get_map_value(env, argv[3], ATOM_changed_by, &v) && !enif_is_identical(v, ATOM_undefined);
    if (have_by && !enif_term_to_binary(env, v, &by)) return dx_error(env, ATOM_enomem);
    if (!enif_term_to_binary(env, argv[2], &data)) {
        if (have_by) enif_release_binary(&by);
        return dx_error(env, ATOM_enomem);
    }
    if (!enif_term_to_binary(env, argv[3], &meta)) {
        if (have_by) enif_release_binary(&by);
        enif_release_binary(&data);
        return dx_error(env, ATOM_enomem);
    }
    char id[37];
    uint64_t seq = 0, last = 0;
    int64_t ts = 0;
    dx_ev_in in = {.session = (const char *)sid.data, .session_len = sid.size, .type = type.ptr, .type_len = type.len,
                   .variable = (const char *)var.data, .variable_len = var.size, .principal = (const char *)prin.data,
                   .principal_len = prin.size, .changed_by = (const char *)by.data, .changed_by_len = by.size,
                   .data = data.data, .data_len = data.size, .meta = meta.data, .meta_len = meta.size, .id_out = id,
                   .ts_out = &ts};
    if (as) {
        in.sequence = as->sequence;
        in.ts_us = as->ts_us;
        in.id_in = as->id[0] ? as->id : NULL;
        in.node = (const char *)as->node.data;
        in.node_len = as->node.size;
    }
    inflight_slot *ifl = inflight_enter();
    q = atomic_load(&g_q);
    uint64_t t = q ? dx_evq_push(q, &in, &seq) : 0;
    /* an explicit sequence that does not continue the session's: say which one it has */
    bool gap = q && !t && in.sequence &&
               !(dx_evq_known_seq(q, in.session, in.session_len, &last) && last + 1 == in.sequence);
    inflight_exit(ifl);
    if (have_by) enif_release_binary(&by);
    enif_release_binary(&data);
    enif_release_binary(&meta);
    if (!q) return dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
    if (gap) return dx_error(env, enif_make_tuple2(env, A_sequence_gap, enif_make_uint64(env, last)));
    if (!t) return dx_error(env, ATOM_enomem);
    if (full)
        return enif_make_tuple4(env, ATOM_ok, dx_make_bin(env, id, 36), enif_make_uint64(env, seq),
                                enif_make_int64(env, ts));
    return enif_make_tuple3(env, ATOM_ok, dx_make_bin(env, id, 36), enif_make_uint64(env, seq));
}

/* events_append(Session, Type, Data, Meta) -> {ok, Id, Sequence} | {error, ...}
 * Meta keys principal / changed_by / variable fill the indexed columns. */
DX_NIF(nif_events_append) { return append_common(env, argc, argv, NULL, 0); }

/* events_append(Session, Type, Data, Meta, As) -> {ok, Id, Sequence, TimestampUs} | {error, ...}
 * As: #{sequence => N, id => Id, timestamp => Us, node => Bin} (each optional): a copy of an event another
 * node logged (a replica following its owner's log); a given sequence must be the session's next, else
 * {error, {sequence_gap, Last}}. */
DX_NIF(nif_events_append_as) {
    append_as as = {0};
    ERL_NIF_TERM v;
    ErlNifBinary b;
    if (!enif_is_map(env, argv[4])) return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[4], A_sequence, &v) &&
        (!enif_get_uint64(env, v, (ErlNifUInt64 *)&as.sequence) || as.sequence == 0))
        return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[4], A_timestamp, &v) &&
        (!enif_get_int64(env, v, (ErlNifSInt64 *)&as.ts_us) || as.ts_us <= 0))
        return enif_make_badarg(env);
    if (enif_get_map_value(env, argv[4], ATOM_id, &v)) {
        if (!enif_inspect_binary(env, v, &b) || b.size != 36) return enif_make_badarg(env);
        memcpy(as.id, b.data, 36);
        as.id[36] = 0;
    }
    if (enif_get_map_value(env, argv[4], A_node, &v) && (!enif_inspect_binary(env, v, &as.node) || as.node.size > 255))
        return enif_make_badarg(env);
    return append_common(env, argc, argv, &as, 1);
}

/* events_session_delete(Session, Reason) -> ok | {error, session_not_found}: deletes the session like
 * session_delete/1, with the reason its session_deleted event records (deleted | migrated), or none
 * logged (silent: a replica replacing its copy, whose log follows the owner's). */
DX_NIF(nif_events_session_delete) {
    ErlNifBinary sid;
    int reason;
    bool mute = false;
    if (!enif_inspect_binary(env, argv[0], &sid)) return enif_make_badarg(env);
    if (enif_is_identical(argv[1], A_deleted)) reason = DX_EV_REASON_DELETED;
    else if (enif_is_identical(argv[1], A_migrated)) reason = DX_EV_REASON_MIGRATED;
    else if (enif_is_identical(argv[1], A_silent)) reason = DX_EV_REASON_DELETED, mute = true;
    else return enif_make_badarg(env);
    t_mute = mute;
    int rc = dx_session_delete_reason((dx_str){(const char *)sid.data, sid.size}, reason);
    t_mute = false;
    return rc ? dx_error(env, A_session_not_found) : ATOM_ok;
}

static ERL_NIF_TERM await_all(ErlNifEnv *env, dx_evq *q);

/* events_await() -> ok | {wait, Ref} | {error, {event_store, not_open}}: waits for everything pushed so far. */
DX_NIF(nif_events_await) {
    /* counted in flight: a concurrent close waits before it frees the queue */
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    ERL_NIF_TERM r = q ? await_all(env, q) : dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
    inflight_exit(ifl);
    return r;
}

/* events_backpressure() -> ok | {wait, Ref}: ok unless the queue holds `capacity' events or more; then the
 * caller waits until the queue is down to half its capacity (a low-water mark: not until all of it is
 * written, which would stall every async writer for the whole backlog). Not open: ok. */
static ERL_NIF_TERM await_ticket(ErlNifEnv *env, dx_evq *q, uint64_t ticket);
static ERL_NIF_TERM backpressure(ErlNifEnv *env, dx_evq *q) {
    if (!dx_evq_full(q)) return ATOM_ok;
    uint64_t pushed = dx_evq_ticket(q), half = dx_evq_capacity(q) / 2;
    return await_ticket(env, q, pushed > half ? pushed - half : pushed);
}

DX_NIF(nif_events_backpressure) {
    if (!atomic_load(&g_q)) return ATOM_ok;
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    ERL_NIF_TERM r = q ? backpressure(env, q) : ATOM_ok;
    inflight_exit(ifl);
    return r;
}

/* The durability of a write the calling NIF has just committed (dspex_store:set/4's fast path, issue #15):
 * decided here, in the same call, instead of by a second NIF call from Erlang. Result (the write's reply)
 * comes back unchanged when there is nothing to wait for: the log closed, a failed write, or `async' (Opts'
 * `durability', else the log's default) with the queue below its capacity, the high-water mark. Else
 * {event_wait, sync | backpressure, Result, ok | {wait, Ref} | {error, _}}: dspex_events:settle/3 waits as
 * dspex_events:durable/2 would (sync: until everything pushed so far, this write's event included, is
 * durable; back-pressure: until the queue is down to half its capacity). Whether the queue reached its
 * capacity is what the commit's own push saw (t_over_mark): an async write below it touches no shared
 * line here. */
ERL_NIF_TERM dx_events_settle(ErlNifEnv *env, ERL_NIF_TERM opts, ERL_NIF_TERM result) {
    /* log off: one load, no traffic on the shared in-flight counter */
    if (!atomic_load_explicit(&g_q, memory_order_acquire)) return result;
    int arity;
    const ERL_NIF_TERM *el;
    if (!enif_get_tuple(env, result, &arity, &el) || arity != 2 || !enif_is_identical(el[0], ATOM_ok)) return result;
    ERL_NIF_TERM d;
    bool sync = enif_get_map_value(env, opts, A_durability, &d) ? enif_is_identical(d, A_sync)
                                                                 : atomic_load_explicit(&g_default_sync, memory_order_relaxed);
    bool over = t_over_mark;
    t_over_mark = false;
    /* async, and the commit's push left the queue below its capacity: nothing to wait for (the common case,
     * decided without touching the queue) */
    if (!sync && !over) return result;
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    ERL_NIF_TERM w = !q ? ATOM_ok : sync ? await_all(env, q) : backpressure(env, q);
    inflight_exit(ifl);
    if (enif_is_identical(w, ATOM_ok)) return result;
    return enif_make_tuple4(env, A_event_wait, sync ? A_sync : A_backpressure, result, w);
}

static ERL_NIF_TERM await_all(ErlNifEnv *env, dx_evq *q) { return await_ticket(env, q, dx_evq_ticket(q)); }

static ERL_NIF_TERM await_ticket(ErlNifEnv *env, dx_evq *q, uint64_t ticket) {
    enif_mutex_lock(g_wait_mu);
    if (g_pub_done >= ticket) {
        enif_mutex_unlock(g_wait_mu);
        return ATOM_ok;
    }
    waiter *w = enif_alloc(sizeof *w);
    ErlNifEnv *wenv = w ? enif_alloc_env() : NULL;
    if (!wenv) {
        enif_mutex_unlock(g_wait_mu);
        if (w) enif_free(w);
        return dx_error(env, ATOM_enomem);
    }
    ERL_NIF_TERM ref = enif_make_ref(env);
    *w = (waiter){g_waiters, {0}, wenv, enif_make_copy(wenv, ref), ticket};
    enif_self(env, &w->pid);
    g_waiters = w;
    enif_mutex_unlock(g_wait_mu);
    dx_evq_urge(q, ticket); /* a caller waits: no lingering; counted for the group-commit gather */
    return enif_make_tuple2(env, A_wait, ref);
}

static ERL_NIF_TERM bytes_or_undefined(ErlNifEnv *env, const char *p, size_t n) {
    return n ? dx_make_bin(env, p, n) : ATOM_undefined;
}

static ERL_NIF_TERM type_term(ErlNifEnv *env, const char *p, size_t n) {
    ERL_NIF_TERM a;
    if (n < 256 && enif_make_existing_atom_len(env, p, n, &a, ERL_NIF_LATIN1)) return a;
    return dx_make_bin(env, p, n);
}

static ERL_NIF_TERM fast_blob_to_term(ErlNifEnv *env, const uint8_t *p, size_t len, ERL_NIF_TERM dflt);

/* #{id, type, session, sequence, position, data, metadata, timestamp} */
static ERL_NIF_TERM event_term(ErlNifEnv *env, const dx_ev_rec *r) {
    ERL_NIF_TERM meta = fast_blob_to_term(env, r->meta, r->meta_len, enif_make_new_map(env));
    if (!enif_is_map(env, meta)) meta = enif_make_new_map(env);
    enif_make_map_put(env, meta, A_node, bytes_or_undefined(env, r->node, r->node_len), &meta);
    ERL_NIF_TERM pv;
    if (r->principal_len || !enif_get_map_value(env, meta, A_principal, &pv))
        enif_make_map_put(env, meta, A_principal, bytes_or_undefined(env, r->principal, r->principal_len), &meta);
    if (!enif_get_map_value(env, meta, A_request_id, &pv)) enif_make_map_put(env, meta, A_request_id, ATOM_undefined, &meta);
    enif_make_map_put(env, meta, ATOM_changed_by,
                      fast_blob_to_term(env, (const uint8_t *)r->changed_by, r->changed_by_len, ATOM_undefined), &meta);
    if (r->variable_len) enif_make_map_put(env, meta, A_variable, dx_make_bin(env, r->variable, r->variable_len), &meta);
    ERL_NIF_TERM k[8] = {ATOM_id, ATOM_type, A_session, A_sequence, A_position, ATOM_data, ATOM_metadata, A_timestamp};
    ERL_NIF_TERM v[8] = {dx_make_bin(env, r->id, strlen(r->id)),
                         type_term(env, r->type, r->type_len),
                         dx_make_bin(env, r->session, r->session_len),
                         enif_make_uint64(env, r->sequence),
                         enif_make_uint64(env, r->position),
                         fast_blob_to_term(env, r->data, r->data_len, ATOM_undefined),
                         meta,
                         enif_make_int64(env, r->ts_us)};
    return map_of(env, k, v, 8);
}

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM list;
} read_ctx;

/* A query on the reading connection (one reader at a time); "not_open" when the log is closed. */
static int rd_query(const dx_ev_query *q, dx_ev_row_cb cb, void *ctx, char *err, size_t errlen) {
    pthread_mutex_lock(&g_rd_mu);
    int rc = g_rd ? g_ops->query(g_rd, q, cb, ctx, err, errlen) : (snprintf(err, errlen, "not_open"), -1);
    pthread_mutex_unlock(&g_rd_mu);
    return rc;
}

static int read_cb(void *ctx, const dx_ev_rec *r) {
    read_ctx *c = ctx;
    c->list = enif_make_list_cell(c->env, event_term(c->env, r), c->list);
    return 0;
}

static int get_u64_opt(ErlNifEnv *env, ERL_NIF_TERM m, ERL_NIF_TERM k, uint64_t *out) {
    ERL_NIF_TERM v;
    ErlNifUInt64 u;
    if (!enif_get_map_value(env, m, k, &v)) return 1;
    if (!enif_get_uint64(env, v, &u)) return 0;
    *out = u;
    return 1;
}

#define MAX_READ 100000

/* events_read(#{session, seq_from, seq_to, pos_from, pos_to, ts_from, ts_to, types, principal, variable,
 *               limit, descending}) -> {ok, [Event]} (at most 100,000 per call) */
DX_NIF(nif_events_read) {
    ERL_NIF_TERM m = argv[0], v;
    if (!enif_is_map(env, m)) return enif_make_badarg(env);
    dx_ev_query q = {0};
    ErlNifBinary b;
    if (get_bin_opt(env, m, A_session, &b)) {
        q.session = (const char *)b.data;
        q.session_len = b.size;
    }
    if (get_bin_opt(env, m, A_principal, &b)) {
        q.principal = (const char *)b.data;
        q.principal_len = b.size;
    }
    if (get_bin_opt(env, m, A_variable, &b)) {
        q.variable = (const char *)b.data;
        q.variable_len = b.size;
    }
    uint64_t lim = MAX_READ, tsf = 0, tst = 0;
    if (!get_u64_opt(env, m, A_seq_from, &q.seq_from) || !get_u64_opt(env, m, A_seq_to, &q.seq_to) ||
        !get_u64_opt(env, m, A_pos_from, &q.pos_from) || !get_u64_opt(env, m, A_pos_to, &q.pos_to) ||
        !get_u64_opt(env, m, A_ts_from, &tsf) || !get_u64_opt(env, m, A_ts_to, &tst) ||
        !get_u64_opt(env, m, A_limit, &lim) || tsf > INT64_MAX || tst > INT64_MAX)
        return enif_make_badarg(env);
    q.ts_from = (int64_t)tsf;
    q.ts_to = (int64_t)tst;
    q.limit = lim && lim < MAX_READ ? lim : MAX_READ;
    q.descending = enif_get_map_value(env, m, A_descending, &v) && enif_is_identical(v, ATOM_true);
    const char *tp[64];
    size_t tl[64];
    char tbuf[64][256];
    if (enif_get_map_value(env, m, A_types, &v)) {
        ERL_NIF_TERM h, l = v;
        while (enif_get_list_cell(env, l, &h, &l)) {
            dx_str s;
            if (q.ntypes == 64 || !get_text(env, h, &s, tbuf[q.ntypes], sizeof tbuf[0])) return enif_make_badarg(env);
            tp[q.ntypes] = s.ptr;
            tl[q.ntypes++] = s.len;
        }
        if (!enif_is_empty_list(env, l)) return enif_make_badarg(env);
        if (!q.ntypes) return enif_make_tuple2(env, ATOM_ok, enif_make_list(env, 0));
        q.types = tp;
        q.type_lens = tl;
    }
    read_ctx c = {env, enif_make_list(env, 0)};
    char err[256];
    int rc = rd_query(&q, read_cb, &c, err, sizeof err);
    if (rc) return es_error(env, err);
    ERL_NIF_TERM rev;
    enif_make_reverse_list(env, c.list, &rev);
    return enif_make_tuple2(env, ATOM_ok, rev);
}

/* ---- events_replay: the lean read of state_at and the snapshotter ----------------------------------------
 * Only what rebuilding a session's state needs: the events of the types that change it, as
 * {Sequence, TimestampUs, Type, Data}, in sequence order. The others (locks, access denials, batch markers,
 * applications' events) are skipped without building a term, and no event's id, session, node or metadata is
 * decoded: events_read/1 builds all of that for every row, which was most of the snapshotter's CPU. */
static const char *const STATE_TYPES[6] = {"session_created", "session_deleted", "variable_registered",
                                           "variable_updated", "variable_deleted", "variable_rolled_back"};

static ERL_NIF_TERM A_state_types[6], A_updates;

static size_t STATE_TYPE_LENS[6]; /* set at load */

static int state_type(const char *t, size_t n) {
    for (int i = 0; i < 6; i++)
        if (STATE_TYPE_LENS[i] == n && !memcmp(STATE_TYPES[i], t, n)) return i + 1;
    return 0;
}

/* A decoder of the external term format for the log's reads: what binary_to_term(B, [safe]) makes of the event data
 * the log holds (maps, atoms, integers, floats, binaries, lists, tuples), with the atoms looked up in a small
 * per-thread cache instead of the VM's atom table (its lock and hash were a third of a replayed event's
 * decoding). Anything else (pids, references, funs, compressed or foreign terms, a big integer beyond 64 bits, a
 * non-ASCII atom, nesting deeper than 64) returns 0 and the caller takes enif_binary_to_term, so the result is
 * always the same term. */
#define FD_ATOMS 128 /* a power of 2, over twice FD_NAMES */
typedef struct {
    uint8_t len; /* 0: empty slot */
    char text[31];
    ERL_NIF_TERM atom;
} fd_atom;
/* The atoms of the state-changing events' data (keys and atom values), made at load and read-only after:
 * no lock. Others are looked up in the VM's table (existing atoms only, as binary_to_term(B, [safe])). */
static fd_atom g_fd_atoms[FD_ATOMS];
static const char *const FD_NAMES[] = {
    "id", "name", "value", "old_value", "version", "previous_version", "updated_at", "metadata", "changed_by",
    "previous", "type", "constraints", "created_at", "history_limit", "history", "derived", "ttl", "reason",
    "members", "true", "false", "undefined", "infinity", "nan", "neg_infinity", "float", "integer", "string",
    "boolean", "choice", "module", "embedding", "tensor", "deleted", "expired", "migrated", "min", "max",
    "choices", "dimensions", "shape", "pattern", "min_length", "max_length", "nil", "null", "node", "principal",
    "request_id", "variable", "session", "vars", "format", "dspex_session_v1"};

static uint32_t fd_hash(const uint8_t *t, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ t[i]) * 16777619u;
    return h;
}

static void fd_init(ErlNifEnv *env) {
    memset(g_fd_atoms, 0, sizeof g_fd_atoms);
    for (size_t k = 0; k < sizeof FD_NAMES / sizeof FD_NAMES[0]; k++) {
        size_t n = strlen(FD_NAMES[k]);
        for (uint32_t i = fd_hash((const uint8_t *)FD_NAMES[k], n);; i++) {
            fd_atom *e = &g_fd_atoms[i % FD_ATOMS];
            if (e->len) continue;
            e->len = (uint8_t)n;
            memcpy(e->text, FD_NAMES[k], n);
            e->atom = enif_make_atom_len(env, FD_NAMES[k], n);
            break;
        }
    }
}

typedef struct {
    ErlNifEnv *env;
    const uint8_t *p, *end;
} fd_in;

static int fd_need(fd_in *d, size_t n) { return (size_t)(d->end - d->p) >= n; }
static uint32_t fd_u16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }
static uint32_t fd_u32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* An existing atom (never a new one, as binary_to_term(B, [safe])); ASCII only (else 0: the VM decodes it). */
static int fd_atom_of(fd_in *d, size_t n, ERL_NIF_TERM *out) {
    if (!fd_need(d, n)) return 0;
    const uint8_t *t = d->p;
    for (size_t i = 0; i < n; i++)
        if (t[i] >= 128) return 0;
    if (n && n <= sizeof g_fd_atoms[0].text)
        for (uint32_t i = fd_hash(t, n);; i++) {
            const fd_atom *e = &g_fd_atoms[i % FD_ATOMS];
            if (!e->len) break;
            if (e->len == n && !memcmp(e->text, t, n)) {
                *out = e->atom;
                d->p += n;
                return 1;
            }
        }
    if (!enif_make_existing_atom_len(d->env, (const char *)t, n, out, ERL_NIF_LATIN1)) return 0;
    d->p += n;
    return 1;
}

static int fd_check_elements(fd_in *d, uint8_t tag, size_t n, int depth);

/* Decodes the term at d->p into *out and skips it; 0 when it cannot (the VM's decoder is asked then). With out
 * NULL it only checks that it would decode, building nothing (the replay's fold, see run_add): then a map of
 * more than 32 pairs or with two keys of the same encoding is 0 too (keys compared pairwise; a map built would
 * refuse term-equal keys). */
static int fd_term(fd_in *d, ERL_NIF_TERM *out, int depth) {
    if (depth > 64 || !fd_need(d, 1)) return 0;
    uint8_t tag = *d->p++;
    ErlNifEnv *env = d->env;
    ERL_NIF_TERM atom;
    switch (tag) {
    case 97: /* SMALL_INTEGER_EXT */
        if (!fd_need(d, 1)) return 0;
        if (out) *out = enif_make_int(env, *d->p);
        d->p++;
        return 1;
    case 98: /* INTEGER_EXT */
        if (!fd_need(d, 4)) return 0;
        if (out) *out = enif_make_int(env, (int32_t)fd_u32(d->p));
        d->p += 4;
        return 1;
    case 70: { /* NEW_FLOAT_EXT */
        if (!fd_need(d, 8)) return 0;
        uint64_t u = (uint64_t)fd_u32(d->p) << 32 | fd_u32(d->p + 4);
        double f;
        memcpy(&f, &u, 8);
        if (!isfinite(f)) return 0;
        if (out) *out = enif_make_double(env, f);
        d->p += 8;
        return 1;
    }
    case 110: { /* SMALL_BIG_EXT: n, sign, little-endian digits */
        if (!fd_need(d, 2)) return 0;
        size_t n = d->p[0];
        int neg = d->p[1];
        if (n > 8 || !fd_need(d, 2 + n)) return 0;
        uint64_t m = 0;
        for (size_t i = n; i > 0; i--) m = m << 8 | d->p[2 + i - 1];
        if (neg && m > (uint64_t)INT64_MAX + 1) return 0;
        if (out)
            *out = !neg ? enif_make_uint64(env, m)
                        : enif_make_int64(env, m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m);
        d->p += 2 + n;
        return 1;
    }
    case 119: /* SMALL_ATOM_UTF8_EXT */
    case 115: /* SMALL_ATOM_EXT */
        if (!fd_need(d, 1)) return 0;
        d->p++;
        return fd_atom_of(d, d->p[-1], out ? out : &atom);
    case 118: /* ATOM_UTF8_EXT */
    case 100: { /* ATOM_EXT */
        if (!fd_need(d, 2)) return 0;
        size_t n = fd_u16(d->p);
        d->p += 2;
        return fd_atom_of(d, n, out ? out : &atom);
    }
    case 109: { /* BINARY_EXT */
        if (!fd_need(d, 4)) return 0;
        size_t n = fd_u32(d->p);
        if (!fd_need(d, 4 + n)) return 0;
        if (out) {
            unsigned char *b = enif_make_new_binary(env, n, out);
            if (!b) return 0;
            if (n) memcpy(b, d->p + 4, n);
        }
        d->p += 4 + n;
        return 1;
    }
    case 106: /* NIL_EXT */
        if (out) *out = enif_make_list(env, 0);
        return 1;
    case 107: { /* STRING_EXT: a list of bytes */
        if (!fd_need(d, 2)) return 0;
        size_t n = fd_u16(d->p);
        if (!fd_need(d, 2 + n)) return 0;
        if (out) *out = enif_make_string_len(env, (const char *)d->p + 2, n, ERL_NIF_LATIN1);
        d->p += 2 + n;
        return 1;
    }
    case 104: /* SMALL_TUPLE_EXT */
    case 105: /* LARGE_TUPLE_EXT */
    case 108: /* LIST_EXT */
    case 116: { /* MAP_EXT */
        size_t hl = tag == 104 ? 1 : 4;
        if (!fd_need(d, hl)) return 0;
        size_t n = tag == 104 ? d->p[0] : fd_u32(d->p);
        d->p += hl;
        size_t k = tag == 116 ? 2 * n : n;
        if (k > (size_t)(d->end - d->p)) return 0; /* every element takes a byte at least */
        if (!out) return fd_check_elements(d, tag, n, depth);
        ERL_NIF_TERM stack[32], *a = k <= 32 ? stack : enif_alloc(k * sizeof *a);
        if (!a) return 0;
        int ok = 1;
        for (size_t i = 0; ok && i < k; i++) ok = fd_term(d, &a[i], depth + 1);
        if (ok) {
            if (tag == 116) {
                /* keys at even, values at odd indexes */
                ERL_NIF_TERM *ks = enif_alloc((n ? n : 1) * 2 * sizeof *ks);
                if (!ks) ok = 0;
                else {
                    for (size_t i = 0; i < n; i++) {
                        ks[i] = a[2 * i];
                        ks[n + i] = a[2 * i + 1];
                    }
                    ok = enif_make_map_from_arrays(env, ks, ks + n, n, out);
                    enif_free(ks);
                }
            } else if (tag == 108) {
                ERL_NIF_TERM tail;
                ok = fd_term(d, &tail, depth + 1);
                for (size_t i = n; ok && i > 0; i--) tail = enif_make_list_cell(env, a[i - 1], tail);
                if (ok) *out = tail;
            } else {
                *out = enif_make_tuple_from_array(env, a, (unsigned)n);
            }
        }
        if (a != stack) enif_free(a);
        return ok;
    }
    default: return 0;
    }
}

/* fd_term's check of a tuple's, list's or map's n elements (pairs for a map), the header read. */
static int fd_check_elements(fd_in *d, uint8_t tag, size_t n, int depth) {
    if (tag != 116) {
        for (size_t i = 0; i < n; i++)
            if (!fd_term(d, NULL, depth + 1)) return 0;
        return tag == 108 ? fd_term(d, NULL, depth + 1) : 1; /* a list's tail */
    }
    if (n > 32) return 0;
    const uint8_t *ks[32];
    size_t kl[32];
    for (size_t i = 0; i < n; i++) {
        ks[i] = d->p;
        if (!fd_term(d, NULL, depth + 1)) return 0;
        kl[i] = (size_t)(d->p - ks[i]);
        for (size_t j = 0; j < i; j++)
            if (kl[j] == kl[i] && !memcmp(ks[j], ks[i], kl[i])) return 0;
        if (!fd_term(d, NULL, depth + 1)) return 0;
    }
    return 1;
}

/* binary_to_term(Blob, [safe]), or dflt when empty or not decodable: the cached-atom decoder first (the
 * replay's data, and every event's data and metadata that events_read/1 returns, and snapshots). */
static ERL_NIF_TERM fast_blob_to_term(ErlNifEnv *env, const uint8_t *p, size_t len, ERL_NIF_TERM dflt) {
    if (len >= 2 && p[0] == 131) {
        fd_in d = {env, p + 1, p + len};
        ERL_NIF_TERM t;
        if (fd_term(&d, &t, 0) && d.p == d.end) return t;
    }
    return dx_blob_to_term(env, p, len, dflt);
}

/* ---- the fold of runs of updates (events_replay/7) ------------------------------------------------------
 * A run of consecutive variable_updated / variable_rolled_back events of one variable (other types that do not
 * change the state may come between) leaves that variable with the last event's fields and, in its history,
 * the `previous' of each event of the run, of which only the last history_limit matter. Such a run is listed as
 * one {Seq, Ts, {updates, Count, Previous}, Data}: the last event's sequence, time and data, the run's length
 * and the `previous' of its last min(Count, history_limit) events, newest first; the other events of the run
 * are neither decoded nor built as terms (their `previous' is copied, the rest only checked).
 *
 * An event joins a run only when its data is exactly the writer's map (the ten keys below, each once) and
 * every term in it decodes (fd_term with no term to build: the tags fast_blob_to_term takes, existing atoms, finite floats, no
 * map with two keys of the same encoding), so that the event alone would have been decoded and applied;
 * and when the variable's history_limit is known: given by the caller (the variables of its state) or read
 * from a variable_registered event of this call (a variable_deleted or session_created forgets). Anything
 * else ends the run and is listed as events_replay/6 lists it. A run ends at a multiple of Mark too. */
enum { UK_ID, UK_NAME, UK_VALUE, UK_OLD, UK_VERSION, UK_PREVV, UK_UPDATED, UK_META, UK_BY, UK_PREV, UK_N };
static const char *const UPD_KEYS[UK_N] = {"id",         "name",     "value",     "old_value",  "version",
                                           "previous_version", "updated_at", "metadata", "changed_by", "previous"};
static size_t UPD_KEY_LENS[UK_N]; /* set at load */

/* The spans of the writer's variable_updated data; 0 when the data is not exactly that map or not decodable. */
typedef struct {
    const uint8_t *p[UK_N];
    size_t n[UK_N];
} upd_view;

static int upd_parse(ErlNifEnv *env, const uint8_t *b, size_t len, upd_view *v) {
    if (len < 6 || b[0] != 131 || b[1] != 116 || fd_u32(b + 2) != UK_N) return 0;
    fd_in d = {env, b + 6, b + len};
    unsigned seen = 0;
    for (int i = 0; i < UK_N; i++) {
        if (!fd_need(&d, 2) || (d.p[0] != 119 && d.p[0] != 115)) return 0;
        size_t kn = d.p[1];
        if (!fd_need(&d, 2 + kn)) return 0;
        int k = -1;
        for (int j = 0; j < UK_N; j++)
            if (UPD_KEY_LENS[j] == kn && !memcmp(UPD_KEYS[j], d.p + 2, kn)) k = j;
        if (k < 0 || (seen & 1u << k)) return 0;
        seen |= 1u << k;
        d.p += 2 + kn;
        v->p[k] = d.p;
        if (!fd_term(&d, NULL, 1)) return 0;
        v->n[k] = (size_t)(d.p - v->p[k]);
    }
    return d.p == d.end;
}

/* history_limit by variable name (its external format without the 131): open addressing */
typedef struct {
    uint8_t *name; /* NULL: empty; (uint8_t *)1 with len 0: deleted */
    size_t len;
    uint64_t limit;
} lim_ent;
typedef struct {
    lim_ent *t;
    size_t cap, used;
} lim_tab;

static lim_ent *lim_find(lim_tab *lt, const uint8_t *n, size_t len) {
    if (!lt->cap) return NULL;
    for (size_t i = fd_hash(n, len) & (lt->cap - 1), k = 0; k < lt->cap; i = (i + 1) & (lt->cap - 1), k++) {
        lim_ent *e = &lt->t[i];
        if (!e->name) return NULL;
        if (e->len == len && e->name != (uint8_t *)1 && !memcmp(e->name, n, len)) return e;
    }
    return NULL;
}

static int lim_put(lim_tab *lt, const uint8_t *n, size_t len, uint64_t limit) {
    lim_ent *e = lim_find(lt, n, len);
    if (e) return e->limit = limit, 0;
    if ((lt->used + 1) * 2 > lt->cap) {
        size_t nc = lt->cap ? lt->cap * 2 : 16;
        lim_ent *nt = enif_alloc(nc * sizeof *nt);
        if (!nt) return -1;
        memset(nt, 0, nc * sizeof *nt);
        lim_tab o = *lt;
        *lt = (lim_tab){nt, nc, 0};
        for (size_t i = 0; i < o.cap; i++)
            if (o.t[i].name && o.t[i].name != (uint8_t *)1) {
                for (size_t j = fd_hash(o.t[i].name, o.t[i].len) & (nc - 1);; j = (j + 1) & (nc - 1))
                    if (!nt[j].name) {
                        nt[j] = o.t[i];
                        lt->used++;
                        break;
                    }
            }
        enif_free(o.t);
    }
    uint8_t *c = enif_alloc(len ? len : 1);
    if (!c) return -1;
    memcpy(c, n, len);
    for (size_t j = fd_hash(n, len) & (lt->cap - 1);; j = (j + 1) & (lt->cap - 1))
        if (!lt->t[j].name || lt->t[j].name == (uint8_t *)1) {
            lt->used += !lt->t[j].name;
            lt->t[j] = (lim_ent){c, len, limit};
            return 0;
        }
}

static void lim_del(lim_tab *lt, const uint8_t *n, size_t len) {
    lim_ent *e = lim_find(lt, n, len);
    if (e) {
        enif_free(e->name);
        *e = (lim_ent){(uint8_t *)1, 0, 0};
    }
}

static void lim_free(lim_tab *lt) {
    for (size_t i = 0; i < lt->cap; i++)
        if (lt->t[i].name && lt->t[i].name != (uint8_t *)1) enif_free(lt->t[i].name);
    enif_free(lt->t);
    *lt = (lim_tab){NULL, 0, 0};
}

/* a name term's key in the table: its external format without the version byte */
static int lim_put_term(ErlNifEnv *env, lim_tab *lt, ERL_NIF_TERM name, uint64_t limit, int del) {
    ErlNifBinary b;
    if (!enif_term_to_binary(env, name, &b)) return -1;
    int rc = 0;
    if (del) lim_del(lt, b.data + 1, b.size - 1);
    else rc = lim_put(lt, b.data + 1, b.size - 1, limit);
    enif_release_binary(&b);
    return rc;
}

typedef struct {
    uint8_t *p;
    size_t n, cap;
} byte_buf;

static int bb_set(byte_buf *b, const uint8_t *p, size_t n) {
    if (n > b->cap) {
        uint8_t *q = enif_realloc(b->p, n);
        if (!q) return -1;
        b->p = q;
        b->cap = n;
    }
    memcpy(b->p, p, n);
    b->n = n;
    return 0;
}

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM list;
    uint64_t scanned, last_seq, mark;
    int fold, failed;
    lim_tab lims;
    /* the run: its variable (a copy of the name's encoding), length, limit, the last event, and a ring of the
     * last min(count, limit) `previous' encodings (ring[(start + i) % ring_cap], i < ring_n, oldest first) */
    byte_buf name, last;
    uint64_t count, limit, seq;
    int64_t ts;
    int type;
    byte_buf *ring;
    size_t ring_cap, ring_n, ring_start;
} replay_ctx;

static void run_push(replay_ctx *c, ERL_NIF_TERM e) { c->list = enif_make_list_cell(c->env, e, c->list); }

/* Lists the run (the event as it is when alone). */
static void run_flush(replay_ctx *c) {
    if (!c->count) return;
    ErlNifEnv *env = c->env;
    ERL_NIF_TERM data = fast_blob_to_term(env, c->last.p, c->last.n, ATOM_undefined), type;
    if (c->count == 1) {
        type = A_state_types[c->type - 1];
    } else {
        ERL_NIF_TERM prevs = enif_make_list(env, 0);
        for (size_t i = 0; i < c->ring_n; i++) { /* oldest first: the list ends newest first */
            byte_buf *b = &c->ring[(c->ring_start + i) % c->ring_cap];
            fd_in d = {env, b->p, b->p + b->n};
            ERL_NIF_TERM t;
            if (!fd_term(&d, &t, 1) || d.p != d.end) c->failed = 1;
            else prevs = enif_make_list_cell(env, t, prevs);
        }
        type = enif_make_tuple3(env, A_updates, enif_make_uint64(env, c->count), prevs);
    }
    run_push(c, enif_make_tuple4(env, enif_make_uint64(env, c->seq), enif_make_int64(env, c->ts), type, data));
    c->count = 0;
    c->ring_n = 0;
    c->ring_start = 0;
}

/* Adds an update to the run (a new one when another variable's); 0, or -1 when it cannot be folded (and
 * nothing changed). Out of memory: `failed' (the call is made again unfolded). */
static int run_add(replay_ctx *c, const dx_ev_rec *r, int st) {
    upd_view v;
    if (!upd_parse(c->env, r->data, r->data_len, &v)) return -1;
    if (!c->count || c->name.n != v.n[UK_NAME] || memcmp(c->name.p, v.p[UK_NAME], c->name.n)) {
        lim_ent *e = lim_find(&c->lims, v.p[UK_NAME], v.n[UK_NAME]);
        if (!e) return -1;
        uint64_t limit = e->limit;
        run_flush(c);
        if (bb_set(&c->name, v.p[UK_NAME], v.n[UK_NAME])) return c->failed = 1, -1;
        c->limit = limit;
    }
    if (c->limit) {
        if (c->ring_n < c->limit && c->ring_n == c->ring_cap) { /* grow, keeping the order */
            size_t nc = c->ring_cap ? c->ring_cap * 2 : 8;
            if (nc > c->limit) nc = c->limit;
            byte_buf *nr = enif_alloc(nc * sizeof *nr);
            if (!nr) return c->failed = 1, -1;
            memset(nr, 0, nc * sizeof *nr);
            for (size_t i = 0; i < c->ring_cap; i++) nr[i] = c->ring[(c->ring_start + i) % c->ring_cap];
            enif_free(c->ring);
            c->ring = nr;
            c->ring_cap = nc;
            c->ring_start = 0;
        }
        /* after the newest; at the limit the oldest goes */
        byte_buf *slot = &c->ring[(c->ring_start + c->ring_n) % c->ring_cap];
        if (bb_set(slot, v.p[UK_PREV], v.n[UK_PREV])) return c->failed = 1, -1;
        if (c->ring_n < c->limit) c->ring_n++;
        else c->ring_start = (c->ring_start + 1) % c->ring_cap;
    }
    if (bb_set(&c->last, r->data, r->data_len)) return c->failed = 1, -1;
    c->count++;
    c->seq = r->sequence;
    c->ts = r->ts_us;
    c->type = st;
    return 0;
}

static int replay_cb(void *ctx, const dx_ev_rec *r) {
    replay_ctx *c = ctx;
    c->scanned++;
    c->last_seq = r->sequence;
    int st = state_type(r->type, r->type_len);
    int marked = c->mark && r->sequence % c->mark == 0;
    if (!st && !marked) return 0;
    if (c->fold && (st == 4 || st == 6)) {
        if (run_add(c, r, st) == 0) {
            if (marked) run_flush(c);
            return 0;
        }
    }
    if (c->fold) run_flush(c);
    ERL_NIF_TERM data = st ? fast_blob_to_term(c->env, r->data, r->data_len, ATOM_undefined) : ATOM_undefined;
    run_push(c, enif_make_tuple4(c->env, enif_make_uint64(c->env, r->sequence), enif_make_int64(c->env, r->ts_us),
                                 st ? A_state_types[st - 1] : type_term(c->env, r->type, r->type_len), data));
    if (c->fold && (st == 1 || st == 3 || st == 5)) {
        /* what the caller's state learns or forgets of its variables' history_limit */
        ERL_NIF_TERM n, l;
        ErlNifUInt64 lim;
        if (st == 1) {
            lim_free(&c->lims);
        } else if (enif_is_map(c->env, data) && enif_get_map_value(c->env, data, ATOM_name, &n)) {
            if (st == 3 && enif_get_map_value(c->env, data, ATOM_history_limit, &l) && enif_get_uint64(c->env, l, &lim)) {
                if (lim_put_term(c->env, &c->lims, n, lim, 0)) c->failed = 1;
            } else if (lim_put_term(c->env, &c->lims, n, 0, 1)) {
                c->failed = 1;
            }
        }
    }
    return 0;
}

static void replay_ctx_free(replay_ctx *c) {
    lim_free(&c->lims);
    enif_free(c->name.p);
    enif_free(c->last.p);
    for (size_t i = 0; i < c->ring_cap; i++) enif_free(c->ring[i].p);
    enif_free(c->ring);
}

/* events_replay(Session, SeqFrom, SeqTo, TsTo, Limit, Mark) -> {ok, [{Seq, Ts, Type, Data}], Scanned, LastSeq}
 * (dirty I/O): the session's events with SeqFrom =< sequence (=< SeqTo unless 0) (and timestamp =< TsTo unless
 * 0), at most Limit (1..100,000) rows scanned, in sequence order; Scanned rows were read, LastSeq is the last
 * one's sequence (0: none). Listed: those of the types that change the state, and (Mark > 0) the others whose
 * sequence is a multiple of Mark, with Data `undefined' (the snapshotter stores a snapshot there).
 * events_replay(..., Mark, Limits): the same, with the runs of updates folded (see above); Limits is the list
 * of {Name, HistoryLimit} of the variables of the caller's state before SeqFrom. */
DX_NIF(nif_events_replay) {
    ErlNifBinary sid;
    ErlNifUInt64 from, to, lim, mark;
    ErlNifSInt64 tsto;
    if (!enif_inspect_binary(env, argv[0], &sid) || sid.size == 0 || !enif_get_uint64(env, argv[1], &from) ||
        !enif_get_uint64(env, argv[2], &to) || !enif_get_int64(env, argv[3], &tsto) || tsto < 0 ||
        !enif_get_uint64(env, argv[4], &lim) || lim == 0 || lim > MAX_READ || !enif_get_uint64(env, argv[5], &mark) ||
        (argc > 6 && !enif_is_list(env, argv[6])))
        return enif_make_badarg(env);
    dx_ev_query q = {0};
    q.session = (const char *)sid.data;
    q.session_len = sid.size;
    q.seq_from = from;
    q.seq_to = to;
    q.ts_to = tsto;
    q.limit = lim;
    q.lean = 1;
    for (int fold = argc > 6;; fold = 0) {
        replay_ctx c;
        memset(&c, 0, sizeof c);
        c.env = env;
        c.list = enif_make_list(env, 0);
        c.mark = mark;
        c.fold = fold;
        if (fold) {
            ERL_NIF_TERM l = argv[6], h, t;
            const ERL_NIF_TERM *kv;
            int ar;
            ErlNifUInt64 hl;
            while (enif_get_list_cell(env, l, &h, &t)) {
                if (!enif_get_tuple(env, h, &ar, &kv) || ar != 2 || !enif_get_uint64(env, kv[1], &hl)) {
                    replay_ctx_free(&c);
                    return enif_make_badarg(env);
                }
                if (lim_put_term(env, &c.lims, kv[0], hl, 0)) c.failed = 1;
                l = t;
            }
        }
        char err[256];
        int rc = c.failed ? 0 : rd_query(&q, replay_cb, &c, err, sizeof err);
        if (!rc && fold && !c.failed) run_flush(&c);
        replay_ctx_free(&c);
        if (rc) return es_error(env, err);
        if (fold && c.failed) continue; /* out of memory, or a `previous' not decoded after all: unfolded */
        ERL_NIF_TERM rev;
        enif_make_reverse_list(env, c.list, &rev);
        return enif_make_tuple4(env, ATOM_ok, rev, enif_make_uint64(env, c.scanned), enif_make_uint64(env, c.last_seq));
    }
}

DX_NIF(nif_events_stats) {
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    dx_evq_stats s;
    bool full = false;
    if (q) {
        dx_evq_stats_get(q, &s);
        full = dx_evq_full(q);
    }
    inflight_exit(ifl);
    if (!q) return dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
    int64_t lag = s.oldest_ts_us ? dx_now_us() - s.oldest_ts_us : 0;
    ERL_NIF_TERM k[27] = {A_pushed, A_done, A_depth, A_max_depth, A_bytes, A_batches, A_written_n, ATOM_errors,
                          A_lag_us, A_last_position, A_last_error, A_lost, A_full, A_spooled, A_commit_seeds,
                          A_provisional, A_acked_batches, A_acked, A_gathers, A_gather_timeouts, A_writer_cpu_us,
                          A_write_cpu_us, A_encode_cpu_us, A_write_us, A_commit_avg_us, A_reused, A_spare};
    ERL_NIF_TERM v[27] = {enif_make_uint64(env, s.pushed), enif_make_uint64(env, s.done),
                          enif_make_uint64(env, s.depth), enif_make_uint64(env, s.max_depth),
                          enif_make_uint64(env, s.bytes), enif_make_uint64(env, s.batches),
                          enif_make_uint64(env, s.written), enif_make_uint64(env, s.errors),
                          enif_make_int64(env, lag < 0 ? 0 : lag), enif_make_uint64(env, s.last_position),
                          s.last_error[0] ? dx_make_bin(env, s.last_error, strlen(s.last_error)) : ATOM_undefined,
                          enif_make_uint64(env, atomic_load(&g_lost)), full ? ATOM_true : ATOM_false,
                          enif_make_uint64(env, s.spooled), enif_make_uint64(env, s.commit_seeds),
                          enif_make_uint64(env, s.provisional), enif_make_uint64(env, s.acked_batches),
                          enif_make_uint64(env, s.acked), enif_make_uint64(env, s.gathers),
                          enif_make_uint64(env, s.gather_timeouts), enif_make_uint64(env, s.cpu_ns / 1000),
                          enif_make_uint64(env, s.write_cpu_ns / 1000), enif_make_uint64(env, s.encode_cpu_ns / 1000),
                          enif_make_uint64(env, s.write_ns / 1000), enif_make_int64(env, s.commit_avg_us),
                          enif_make_uint64(env, s.reused), enif_make_uint64(env, s.spare)};
    return map_of(env, k, v, 27);
}

/* events_put_snapshot(Session, Sequence, TsUs, Term) -> ok */
DX_NIF(nif_events_put_snapshot) {
    ErlNifBinary sid, blob;
    ErlNifUInt64 seq;
    ErlNifSInt64 ts;
    if (!enif_inspect_binary(env, argv[0], &sid) || !enif_get_uint64(env, argv[1], &seq) ||
        !enif_get_int64(env, argv[2], &ts))
        return enif_make_badarg(env);
    if (!enif_term_to_binary(env, argv[3], &blob)) return dx_error(env, ATOM_enomem);
    dx_ev_snapshot s = {(const char *)sid.data, sid.size, seq, ts, blob.data, blob.size};
    char err[256];
    pthread_mutex_lock(&g_rd_mu);
    int rc = g_rd ? g_ops->put_snapshot(g_rd, &s, err, sizeof err) : (snprintf(err, sizeof err, "not_open"), -1);
    pthread_mutex_unlock(&g_rd_mu);
    enif_release_binary(&blob);
    return rc ? es_error(env, err) : ATOM_ok;
}

/* events_put_snapshots([{Session, Sequence, TsUs, Term}]) -> ok: in one transaction where the backend can (the
 * snapshotter's snapshots of one replay; at most 1,000) */
DX_NIF(nif_events_put_snapshots) {
    unsigned n;
    if (!enif_get_list_length(env, argv[0], &n) || n > 1000) return enif_make_badarg(env);
    if (!n) return ATOM_ok;
    dx_ev_snapshot *ss = enif_alloc(n * sizeof *ss);
    ErlNifBinary *bs = enif_alloc(n * sizeof *bs);
    if (!ss || !bs) {
        enif_free(ss);
        enif_free(bs);
        return dx_error(env, ATOM_enomem);
    }
    ERL_NIF_TERM l = argv[0], h, r = 0;
    unsigned k = 0;
    for (; enif_get_list_cell(env, l, &h, &l); k++) {
        const ERL_NIF_TERM *t;
        int ar;
        ErlNifBinary sid;
        ErlNifUInt64 seq;
        ErlNifSInt64 ts;
        if (!enif_get_tuple(env, h, &ar, &t) || ar != 4 || !enif_inspect_binary(env, t[0], &sid) ||
            !enif_get_uint64(env, t[1], &seq) || !enif_get_int64(env, t[2], &ts)) {
            r = enif_make_badarg(env);
            break;
        }
        if (!enif_term_to_binary(env, t[3], &bs[k])) {
            r = dx_error(env, ATOM_enomem);
            break;
        }
        ss[k] = (dx_ev_snapshot){(const char *)sid.data, sid.size, seq, ts, bs[k].data, bs[k].size};
    }
    if (!r) {
        char err[256];
        int rc = 0;
        pthread_mutex_lock(&g_rd_mu);
        if (!g_rd) rc = (snprintf(err, sizeof err, "not_open"), -1);
        else if (g_ops->put_snapshots) rc = g_ops->put_snapshots(g_rd, ss, n, err, sizeof err);
        else
            for (unsigned i = 0; !rc && i < n; i++) rc = g_ops->put_snapshot(g_rd, &ss[i], err, sizeof err);
        pthread_mutex_unlock(&g_rd_mu);
        r = rc ? es_error(env, err) : ATOM_ok;
    }
    for (unsigned i = 0; i < k; i++) enif_release_binary(&bs[i]);
    enif_free(ss);
    enif_free(bs);
    return r;
}

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM r;
} snap_ctx;

static int snap_cb(void *ctx, const dx_ev_snapshot *s) {
    snap_ctx *c = ctx;
    c->r = enif_make_tuple4(c->env, ATOM_ok, enif_make_uint64(c->env, s->sequence), enif_make_int64(c->env, s->ts_us),
                            fast_blob_to_term(c->env, s->blob, s->blob_len, ATOM_undefined));
    return 0;
}

/* events_latest_snapshot(Session, MaxSeq, MaxTs) -> {ok, Seq, Ts, Term} | none (0 = no bound) */
DX_NIF(nif_events_latest_snapshot) {
    ErlNifBinary sid;
    ErlNifUInt64 seq;
    ErlNifSInt64 ts;
    if (!enif_inspect_binary(env, argv[0], &sid) || !enif_get_uint64(env, argv[1], &seq) ||
        !enif_get_int64(env, argv[2], &ts))
        return enif_make_badarg(env);
    snap_ctx c = {env, A_none};
    char err[256];
    pthread_mutex_lock(&g_rd_mu);
    int rc = g_rd ? g_ops->latest_snapshot(g_rd, (const char *)sid.data, sid.size, seq, ts, snap_cb, &c, err, sizeof err)
                  : (snprintf(err, sizeof err, "not_open"), -1);
    pthread_mutex_unlock(&g_rd_mu);
    return rc ? es_error(env, err) : c.r;
}

typedef struct {
    uint64_t n, archived;
    bool extra;
} expire_ctx;

/* A row past the caller's count is one it did not archive: refused, nothing is deleted. */
static int expire_cb(void *ctx, const dx_ev_rec *r) {
    expire_ctx *c = ctx;
    (void)r;
    if (++c->n > c->archived) c->extra = true;
    return c->extra;
}

/* events_expire(TsUs, PosFrom, PosTo, Archived) -> {ok, Deleted} | {error, {event_store, Reason}}: deletes
 * the events older than TsUs with a position in [PosFrom, PosTo], the range the caller archived (Archived
 * events): more such rows than that (one committed after the caller read the range) deletes nothing. */
DX_NIF(nif_events_expire) {
    ErlNifSInt64 ts;
    ErlNifUInt64 from, to, archived;
    if (!enif_get_int64(env, argv[0], &ts) || !enif_get_uint64(env, argv[1], &from) ||
        !enif_get_uint64(env, argv[2], &to) || !enif_get_uint64(env, argv[3], &archived))
        return enif_make_badarg(env);
    expire_ctx c = {0, archived, false};
    char err[256];
    pthread_mutex_lock(&g_rd_mu);
    int rc = g_rd ? g_ops->expire_before(g_rd, ts, from, to, expire_cb, &c, err, sizeof err)
                  : (snprintf(err, sizeof err, "not_open"), -1);
    pthread_mutex_unlock(&g_rd_mu);
    /* the backends differ on a refusal (SQLite fails, PostgreSQL keeps everything and succeeds): the flag decides */
    if (c.extra) return es_error(env, "expire: the range holds rows that were not archived");
    return rc ? es_error(env, err) : enif_make_tuple2(env, ATOM_ok, enif_make_uint64(env, c.n));
}

/* events_seed(Session) -> ok | {error, {event_store, Reason}}: makes the queue know the session's last
 * sequence before its first event, so the commit path never asks the backend (a round trip to PostgreSQL,
 * or a read of SQLite's pages, under the store's locks on a normal scheduler). Known: answered here; else
 * the backend is asked on a dirty I/O scheduler. Not open: ok. */
static ERL_NIF_TERM events_seed_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid)) return enif_make_badarg(env);
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    char err[256];
    int rc = q ? dx_evq_seed(q, (const char *)sid.data, sid.size, err, sizeof err) : 0;
    inflight_exit(ifl);
    return rc ? es_error(env, err) : ATOM_ok;
}

DX_NIF(nif_events_seed) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid) || sid.size == 0) return enif_make_badarg(env);
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    bool known = !q || dx_evq_known(q, (const char *)sid.data, sid.size);
    inflight_exit(ifl);
    if (known) return ATOM_ok;
    return enif_schedule_nif(env, "events_seed", ERL_NIF_DIRTY_JOB_IO_BOUND, events_seed_dirty, argc, argv);
}

/* events_reseed(Session) -> ok | {error, {event_store, Reason}} (dirty I/O): raises the session's counter to
 * the backend's last sequence of it, when above (a node taking a session over whose events other nodes
 * append to the same database). Not open: ok. */
ERL_NIF_TERM events_reseed_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid) || sid.size == 0) return enif_make_badarg(env);
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    char err[256];
    uint64_t last = 0;
    int rc = 0;
    if (q && g_seed) {
        pthread_mutex_lock(&g_seed_mu);
        rc = g_ops->session_max_seq(g_seed, (const char *)sid.data, sid.size, &last, err, sizeof err);
        pthread_mutex_unlock(&g_seed_mu);
        if (!rc) dx_evq_session_seq_raise(q, (const char *)sid.data, sid.size, last);
    }
    inflight_exit(ifl);
    return rc ? es_error(env, err) : ATOM_ok;
}

/* events_session_seq(Session) -> last assigned sequence (0 = none). Known to the queue: answered here;
 * else the backend is asked on a dirty I/O scheduler. */
static ERL_NIF_TERM events_session_seq_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid)) return enif_make_badarg(env);
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    uint64_t s = q ? dx_evq_session_seq(q, (const char *)sid.data, sid.size) : 0;
    inflight_exit(ifl);
    return q ? enif_make_uint64(env, s) : dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
}

DX_NIF(nif_events_session_seq) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid)) return enif_make_badarg(env);
    inflight_slot *ifl = inflight_enter();
    dx_evq *q = atomic_load(&g_q);
    uint64_t s = 0;
    bool known = q && dx_evq_known_seq(q, (const char *)sid.data, sid.size, &s);
    inflight_exit(ifl);
    if (!q) return dx_error(env, enif_make_tuple2(env, A_event_store, A_not_open));
    if (known) return enif_make_uint64(env, s);
    return enif_schedule_nif(env, "events_session_seq", ERL_NIF_DIRTY_JOB_IO_BOUND, events_session_seq_dirty, argc,
                             argv);
}

int dx_events_init(ErlNifEnv *env) {
#define A(v, s) v = enif_make_atom(env, s)
    A(A_event_store, "event_store"); A(A_wait, "wait"); A(A_durable, "dspex_events_durable");
    A(A_written, "dspex_events_written"); A(A_failed, "dspex_events_failed"); A(A_position, "position");
    A(A_sequence, "sequence"); A(A_timestamp, "timestamp"); A(A_session, "session"); A(A_node, "node");
    A(A_principal, "principal"); A(A_request_id, "request_id"); A(A_variable, "variable"); A(A_reason, "reason");
    A(A_deleted, "deleted"); A(A_expired, "expired"); A(A_migrated, "migrated"); A(A_old_value, "old_value");
    A(A_previous, "previous"); A(A_members, "members"); A(A_backend, "backend"); A(A_sqlite, "sqlite");
    A(A_postgres, "postgres"); A(A_target, "target"); A(A_capacity, "capacity"); A(A_max_batch, "max_batch"); A(A_linger_us, "linger_us"); A(A_gather_us, "gather_us");
    A(A_acked_batches, "acked_batches"); A(A_acked, "acked"); A(A_gathers, "gathers"); A(A_gather_timeouts, "gather_timeouts");
    A(A_writer_cpu_us, "writer_cpu_us"); A(A_write_cpu_us, "write_cpu_us"); A(A_encode_cpu_us, "encode_cpu_us");
    A(A_write_us, "write_us"); A(A_commit_avg_us, "commit_avg_us"); A(A_reused, "reused"); A(A_spare, "spare");
    A(A_durability, "durability"); A(A_sync, "sync"); A(A_async, "async"); A(A_event_wait, "event_wait");
    A(A_backpressure, "backpressure");
    A(A_listener, "listener"); A(A_pushed, "pushed"); A(A_done, "done"); A(A_depth, "depth");
    A(A_max_depth, "max_depth"); A(A_bytes, "bytes"); A(A_batches, "batches"); A(A_written_n, "written");
    A(A_lag_us, "lag_us"); A(A_last_position, "last_position"); A(A_last_error, "last_error"); A(A_lost, "lost");
    A(A_none, "none"); A(A_not_open, "not_open"); A(A_seq_from, "seq_from"); A(A_seq_to, "seq_to");
    A(A_pos_from, "pos_from"); A(A_pos_to, "pos_to"); A(A_ts_from, "ts_from"); A(A_ts_to, "ts_to");
    A(A_types, "types"); A(A_limit, "limit"); A(A_descending, "descending"); A(A_full, "full");
    A(A_already_open, "already_open"); A(A_snap_due, "dspex_events_snapshot_due");
    A(A_snapshot_every, "snapshot_every"); A(A_spool, "spool"); A(A_spooled, "spooled"); A(A_commit_seeds, "commit_seeds"); A(A_sequence_gap, "sequence_gap");
    A(A_silent, "silent"); A(A_provisional, "provisional"); A(A_session_not_found, "session_not_found");
#undef A
    for (int i = 1; i < 8; i++) A_types_tab[i] = enif_make_atom(env, TYPE_NAMES[i]);
    fd_init(env);
    for (int i = 0; i < 6; i++) A_state_types[i] = enif_make_atom(env, STATE_TYPES[i]);
    A_updates = enif_make_atom(env, "updates");
    for (int i = 0; i < 6; i++) STATE_TYPE_LENS[i] = strlen(STATE_TYPES[i]);
    for (int i = 0; i < UK_N; i++) UPD_KEY_LENS[i] = strlen(UPD_KEYS[i]);
    if (!(g_open_mu = enif_mutex_create("dspex_events_open")) || !(g_wait_mu = enif_mutex_create("dspex_events_wait")))
        return -1;
    dx_store_set_event_hook(ev_hook);
    return 0;
}

void dx_events_unload(void) {
    dx_store_set_event_hook(NULL);
    close_queue();
    for (waiter *w = g_waiters, *n; w; w = n) {
        n = w->next;
        enif_free_env(w->env);
        enif_free(w);
    }
    g_waiters = NULL;
    if (g_open_mu) enif_mutex_destroy(g_open_mu);
    if (g_wait_mu) enif_mutex_destroy(g_wait_mu);
}
