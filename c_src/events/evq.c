/* Event queue and writer thread (see evq.h). */
#define _GNU_SOURCE /* pthread_setname_np */
#include "evq.h"
#include "spool.h"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* session -> last assigned sequence; open addressing, grows at 1/2 load. */
typedef struct {
    char *key;
    size_t len;
    uint64_t seq;
    uint64_t hash;
    bool provisional; /* seq counts from 0: the backend's last sequence of the session was unknown */
    int64_t last_ts;  /* time of the session's last event timed by the queue (never goes back) */
} seq_slot;

struct dx_evq {
    dx_evq_config cfg;
    char *node;
    void *st; /* writer's backend state */
    void *seed_st;
    pthread_mutex_t *seed_mu;
    pthread_mutex_t mu;
    pthread_cond_t nonempty, progress;
    dx_ev_item *head, *tail;
    size_t depth, max_depth, bytes;
    _Atomic size_t adepth; /* depth, readable without the mutex (back-pressure checks) */
    uint64_t pushed, done, batches, errors, written, last_pos;
    uint64_t failed_upto; /* tickets <= this saw a failed attempt */
    uint64_t id_ms, id_ctr; /* the last id key taken (under mu, in the queue's order) */
    char last_error[256];
    bool stop, started;
    /* wake-ups: pushers signal the writer only when it sleeps on an empty queue (idle), or lingers
     * and the batch is full; a waiter for durability sets urgent */
    bool idle, lingering, urgent;
    size_t pending;     /* linked items not yet taken by the writer */
    uint64_t commit_seeds; /* sessions looked up in the backend on a committing thread */
    uint64_t nprov;        /* provisional slots (under mu) */
    int64_t pending_since_us; /* when the first of them was linked */
    pthread_t thr;
    seq_slot *slots;
    size_t nslots, used;
    dx_spool *spool;       /* NULL: no spool */
    uint64_t spooled;      /* records in the spool (under mu; changed by the writer only) */
    int64_t next_drain_us; /* writer only: earliest time of the next attempt to move the spool */
    int64_t drain_backoff; /* writer only, ms */
    /* group commit (under mu): the tickets callers wait for (dx_evq_urge), not yet done; how many of them
     * the last commit acknowledged; whether the writer is gathering (waiting for that many again) */
    uint64_t *wt;
    size_t nwt, capwt, last_acked;
    bool gathering;
    uint64_t acked_batches, acked, gathers, gather_timeouts;
    uint64_t cpu_ns, write_cpu_ns, encode_cpu_ns, write_ns;
    int64_t commit_avg_us; /* mean wall time of the recent commits (exponential, 1/8) */
    /* recycled items (cfg.item_slot): written items the writer handed back, for the next pushes, in chunks of
     * up to SPARE_CHUNK (a stack of them, at most spare_max); a committing thread takes a whole chunk into a
     * cache of its own and then takes its items one by one without a lock (one lock per chunk, not per
     * event). A mutex of their own, apart from mu. */
    pthread_mutex_t spare_mu;
    struct spare_chunk *chunks;
    size_t nchunks;
    size_t nspare;         /* items in the chunks (the caches count theirs) */
    struct spare_cache *caches; /* every thread's cache of this queue (freed at close) */
    uint64_t id;           /* this queue among those opened in the process (the threads' caches say whose) */
};

#define SPARE_CHUNK 32
typedef struct spare_chunk {
    dx_ev_item *head;
    size_t n;
} spare_chunk;
/* A committing thread's spare items: only that thread takes from it (no lock); stats and the writer's room
 * read its counts (written by the owner only, relaxed). */
typedef struct spare_cache {
    struct spare_cache *next; /* q->caches, under spare_mu */
    dx_ev_item *head;
    _Atomic size_t n;
    _Atomic uint64_t reused;
} spare_cache;
static _Atomic uint64_t g_evq_ids;
/* a thread's caches of the last few queues it pushed to (the NIF has one; tests open several) */
#define THREAD_CACHES 4
static _Thread_local struct {
    uint64_t q; /* the queue's id (0: none) */
    spare_cache *c;
} t_caches[THREAD_CACHES];
static _Thread_local unsigned t_caches_next;

/* Items in the threads' caches, and reuses so far. Under spare_mu. */
static size_t cached_locked(dx_evq *q, uint64_t *reused) {
    size_t n = 0;
    uint64_t r = 0;
    for (spare_cache *c = q->caches; c; c = c->next) {
        n += atomic_load_explicit(&c->n, memory_order_relaxed);
        r += atomic_load_explicit(&c->reused, memory_order_relaxed);
    }
    if (reused) *reused = r;
    return n;
}

static int dx_str_same(const char *a, size_t al, const char *b, size_t bl) {
    return al == bl && (al == 0 || memcmp(a, b, al) == 0);
}

int64_t dx_ev_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ---- UUIDv7 ------------------------------------------------------------------------ */
static pthread_mutex_t g_uuid_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_uuid_ms, g_uuid_ctr, g_rng[2];

static uint64_t rng_next(void) { /* xorshift128+ */
    uint64_t s1 = g_rng[0];
    const uint64_t s0 = g_rng[1];
    g_rng[0] = s0;
    s1 ^= s1 << 23;
    g_rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return g_rng[1] + s0;
}

/* 48-bit ms time, version 7, 12-bit counter (rand_a, monotonic within a ms; a
 * counter overflow borrows the next ms), variant 10, 62 random bits. */
/* Under g_uuid_mu. */
static void rng_seed(void) {
    if (getrandom(g_rng, sizeof g_rng, 0) != (ssize_t)sizeof g_rng || (!g_rng[0] && !g_rng[1])) {
        g_rng[0] = (uint64_t)dx_ev_now_us() * 0x9e3779b97f4a7c15ull;
        g_rng[1] = (uint64_t)(uintptr_t)&g_rng | 1;
    }
}

static void uuid7_text(uint64_t ms, uint64_t ctr, uint64_t r, char out[37]);

void dx_uuid7(int64_t ts_us, char out[37]) {
    pthread_mutex_lock(&g_uuid_mu);
    if (!g_rng[0] && !g_rng[1]) rng_seed();
    uint64_t ms = ts_us > 0 ? (uint64_t)ts_us / 1000 : 0;
    if (ms <= g_uuid_ms) {
        ms = g_uuid_ms;
        if (++g_uuid_ctr > 0xfff) {
            ms++;
            g_uuid_ctr = 0;
        }
    } else {
        g_uuid_ctr = rng_next() & 0x1ff; /* random start, room to count up */
    }
    g_uuid_ms = ms;
    uint64_t ctr = g_uuid_ctr, r = rng_next();
    pthread_mutex_unlock(&g_uuid_mu);
    uuid7_text(ms, ctr, r, out);
}

void dx_uuid7_format(uint64_t key, char out[37]) {
    pthread_mutex_lock(&g_uuid_mu);
    if (!g_rng[0] && !g_rng[1]) rng_seed();
    uint64_t r = rng_next();
    pthread_mutex_unlock(&g_uuid_mu);
    uuid7_text(key >> 12, key & 0xfff, r, out);
}

static void uuid7_text(uint64_t ms, uint64_t ctr, uint64_t r, char out[37]) {
    uint8_t b[16];
    for (int i = 0; i < 6; i++) b[i] = (uint8_t)(ms >> (40 - 8 * i));
    b[6] = (uint8_t)(0x70 | ((ctr >> 8) & 0x0f));
    b[7] = (uint8_t)ctr;
    b[8] = (uint8_t)(0x80 | ((r >> 56) & 0x3f));
    for (int i = 9; i < 16; i++) b[i] = (uint8_t)(r >> (8 * (15 - i)));
    static const char hex[] = "0123456789abcdef";
    char *p = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10) *p++ = '-';
        *p++ = hex[b[i] >> 4];
        *p++ = hex[b[i] & 15];
    }
    *p = 0;
}

/* ---- sequence map ------------------------------------------------------------------ */
static uint64_t str_hash(const char *p, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 1099511628211ull;
    return h | 1;
}

static seq_slot *seq_find(dx_evq *q, const char *s, size_t n, uint64_t h) {
    size_t mask = q->nslots - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        seq_slot *e = &q->slots[i];
        if (!e->hash) return e;
        if (e->hash == h && e->len == n && (n == 0 || memcmp(e->key, s, n) == 0)) return e;
    }
}

static int seq_grow(dx_evq *q) {
    size_t nn = q->nslots ? q->nslots * 2 : 64;
    seq_slot *ns = calloc(nn, sizeof *ns), *old = q->slots;
    if (!ns) return -1;
    size_t on = q->nslots;
    q->slots = ns;
    q->nslots = nn;
    for (size_t i = 0; i < on; i++)
        if (old[i].hash) *seq_find(q, old[i].key, old[i].len, old[i].hash) = old[i];
    free(old);
    return 0;
}

/* The slot of a known session, or NULL. Under q->mu. */
static seq_slot *seq_lookup(dx_evq *q, const char *s, size_t n) {
    if (!q->nslots) return NULL;
    seq_slot *e = seq_find(q, s, n, str_hash(s, n));
    return e->hash ? e : NULL;
}

/* A new slot whose last sequence is `last'. Under q->mu. */
static seq_slot *seq_insert(dx_evq *q, const char *s, size_t n, uint64_t last) {
    if ((q->used + 1) * 2 > q->nslots && seq_grow(q)) return NULL;
    uint64_t h = str_hash(s, n);
    seq_slot *e = seq_find(q, s, n, h);
    if (e->hash) return e;
    char *k = malloc(n ? n : 1);
    if (!k) return NULL;
    if (n) memcpy(k, s, n);
    *e = (seq_slot){k, n, last, h, false, 0};
    q->used++;
    return e;
}

/* A new slot numbered provisionally (the backend could not say the session's last sequence). Under q->mu. */
static seq_slot *seq_insert_provisional(dx_evq *q, const char *s, size_t n, uint64_t last) {
    seq_slot *e = seq_lookup(q, s, n);
    if (e) return e;
    if ((e = seq_insert(q, s, n, last))) {
        e->provisional = true;
        q->nprov++;
    }
    return e;
}

/* The slot of a session, created if new. Under q->mu. A session not seeded
 * beforehand (dx_evq_seed) is looked up in the backend here, on the committing
 * thread and under the mutex: counted in commit_seeds, it should not happen. */
static seq_slot *seq_slot_of(dx_evq *q, const char *s, size_t n) {
    seq_slot *e = seq_lookup(q, s, n);
    if (e) return e;
    uint64_t last = 0;
    if (q->seed_st) {
        char err[256];
        q->commit_seeds++;
        if (q->seed_mu) pthread_mutex_lock(q->seed_mu);
        int rc = q->cfg.ops->session_max_seq(q->seed_st, s, n, &last, err, sizeof err);
        if (q->seed_mu) pthread_mutex_unlock(q->seed_mu);
        if (rc) return seq_insert_provisional(q, s, n, 0);
    }
    return seq_insert(q, s, n, last);
}

bool dx_evq_known(dx_evq *q, const char *session, size_t len) {
    pthread_mutex_lock(&q->mu);
    bool k = seq_lookup(q, session, len) != NULL;
    pthread_mutex_unlock(&q->mu);
    return k;
}

int dx_evq_seed(dx_evq *q, const char *session, size_t len, char *err, size_t errlen) {
    if (dx_evq_known(q, session, len)) return 0;
    uint64_t last = 0;
    if (q->seed_st) {
        /* the query runs without the queue mutex: pushes go on meanwhile */
        if (q->seed_mu) pthread_mutex_lock(q->seed_mu);
        int rc = q->cfg.ops->session_max_seq(q->seed_st, session, len, &last, err, errlen);
        if (q->seed_mu) pthread_mutex_unlock(q->seed_mu);
        if (rc) {
            /* numbered provisionally until the backend answers (the commit path never asks it again) */
            pthread_mutex_lock(&q->mu);
            (void)seq_insert_provisional(q, session, len, 0);
            pthread_mutex_unlock(&q->mu);
            return -1;
        }
    }
    pthread_mutex_lock(&q->mu);
    /* a push that came first made the slot: seq_insert keeps it */
    seq_slot *e = seq_insert(q, session, len, last);
    pthread_mutex_unlock(&q->mu);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    return 0;
}

uint64_t dx_evq_session_seq(dx_evq *q, const char *session, size_t len) {
    char err[256];
    (void)dx_evq_seed(q, session, len, err, sizeof err);
    pthread_mutex_lock(&q->mu);
    seq_slot *e = seq_lookup(q, session, len);
    uint64_t v = e ? e->seq : 0;
    pthread_mutex_unlock(&q->mu);
    return v;
}

bool dx_evq_known_seq(dx_evq *q, const char *session, size_t len, uint64_t *seq) {
    pthread_mutex_lock(&q->mu);
    seq_slot *e = seq_lookup(q, session, len);
    if (e) *seq = e->seq;
    pthread_mutex_unlock(&q->mu);
    return e != NULL;
}

void dx_evq_session_seq_raise(dx_evq *q, const char *session, size_t len, uint64_t floor) {
    pthread_mutex_lock(&q->mu);
    /* a session not known yet starts at floor, the backend's last sequence of it as the caller just read it
     * (seq_slot_of would read it again, here under the mutex every push takes) */
    seq_slot *e = seq_lookup(q, session, len);
    if (!e) e = seq_insert(q, session, len, floor);
    /* provisional numbers count from 0: the writer adds the backend's last sequence to them (and to the
     * counter) once the backend answers; raised here as well, that last sequence was counted twice */
    if (e && !e->provisional && e->seq < floor) e->seq = floor;
    pthread_mutex_unlock(&q->mu);
}

/* ---- push ---------------------------------------------------------------------------- */
#define PAYLOAD_ALIGN 16

/* An item of at least sz bytes: a recycled one when it fits a slot (its previous payload freed here, on the
 * committing thread), else a new one (of a slot's size when it fits one, so that it can be recycled). */
static dx_ev_item *item_get(dx_evq *q, size_t sz) {
    if (!q->cfg.item_slot || sz > q->cfg.item_slot) {
        dx_ev_item *it = q->cfg.item_alloc(sz);
        if (it) it->alloc = sz;
        return it;
    }
    /* this thread's cache of the queue's spare items (made at its first push: registered for close) */
    spare_cache *c = t_caches[0].q == q->id ? t_caches[0].c : NULL;
    for (int i = 1; !c && i < THREAD_CACHES; i++)
        if (t_caches[i].q == q->id) c = t_caches[i].c;
    if (!c && (c = calloc(1, sizeof *c))) {
        pthread_mutex_lock(&q->spare_mu);
        c->next = q->caches;
        q->caches = c;
        pthread_mutex_unlock(&q->spare_mu);
        /* replaces the oldest (a closed queue's, or one still open: its items then wait in its list of
         * caches until it closes, counted in its spare_max) */
        unsigned k = t_caches_next++ % THREAD_CACHES;
        t_caches[k].q = q->id;
        t_caches[k].c = c;
    }
    dx_ev_item *it = NULL, *next = NULL;
    if (c) {
        if (!c->head) { /* empty: take a whole chunk, the only lock of the chunk's pushes */
            pthread_mutex_lock(&q->spare_mu);
            if (q->nchunks) {
                spare_chunk k = q->chunks[--q->nchunks];
                q->nspare -= k.n;
                c->head = k.head;
                atomic_store_explicit(&c->n, k.n, memory_order_relaxed);
            }
            pthread_mutex_unlock(&q->spare_mu);
        }
        if ((it = c->head)) {
            next = c->head = it->next;
            atomic_store_explicit(&c->n, atomic_load_explicit(&c->n, memory_order_relaxed) - 1, memory_order_relaxed);
            atomic_store_explicit(&c->reused, atomic_load_explicit(&c->reused, memory_order_relaxed) + 1,
                                  memory_order_relaxed);
        }
    }
    /* two items ahead: the one after the next push's was last written by the writer thread, on the other
     * core: its lines are fetched for writing now, while this event and the next go on, rather than one stall
     * at a time then (the hook took about 9% less in 8 of 9 paired runs with the next item's lines). The next
     * push's item, fetched so by the previous push, says where its payload's memory is (the snapshots its
     * release frees, cold by now): fetched now as well, so that the next push frees them without a stall. */
    dx_ev_item *after = next ? next->next : NULL;
    if (next && q->cfg.prefetch_payload && next->payload) q->cfg.prefetch_payload(q->cfg.ctx, next);
    if (after)
        for (size_t off = 0; off < q->cfg.item_slot; off += 64) dx_prefetch_w((char *)after + off);
    if (it) {
        if (it->payload && q->cfg.free_payload) q->cfg.free_payload(q->cfg.ctx, it);
    } else if ((it = q->cfg.item_alloc(q->cfg.item_slot))) {
        it->alloc = q->cfg.item_slot;
    }
    return it;
}

/* The bytes of the item of in; *poff: where its payload copy goes (0: none). */
static size_t item_size(const dx_ev_in *in, size_t *poff) {
    size_t tl = in->session_len + in->type_len + in->variable_len + in->principal_len + in->changed_by_len +
                in->data_len + in->meta_len + in->node_len;
    size_t sz = sizeof(dx_ev_item) + tl;
    *poff = 0;
    if (in->payload_len) { /* the payload in the same allocation, after the text */
        *poff = (sz + PAYLOAD_ALIGN - 1) & ~(size_t)(PAYLOAD_ALIGN - 1);
        sz = *poff + in->payload_len;
    }
    return sz;
}

/* Fills an item (of item_size(in) bytes at least) with the event's bytes. */
static void item_fill(dx_evq *q, dx_ev_item *it, const dx_ev_in *in) {
    size_t poff;
    (void)item_size(in, &poff);
    size_t alloc = it->alloc;
    memset(it, 0, sizeof *it);
    it->alloc = alloc;
    char *p = it->text;
#define CP(field)                                                        \
    it->rec.field = p;                                                   \
    it->rec.field##_len = in->field##_len;                               \
    if (in->field##_len) memcpy(p, in->field, in->field##_len);          \
    p += in->field##_len;
    CP(session) CP(type) CP(variable) CP(principal) CP(changed_by)
#undef CP
    it->rec.data = (const uint8_t *)p;
    it->rec.data_len = in->data_len;
    if (in->data_len) memcpy(p, in->data, in->data_len);
    p += in->data_len;
    it->rec.meta = (const uint8_t *)p;
    it->rec.meta_len = in->meta_len;
    if (in->meta_len) memcpy(p, in->meta, in->meta_len);
    p += in->meta_len;
    if (in->node_len) { /* another node's event (a replica's copy of its owner's log) */
        memcpy(p, in->node, in->node_len);
        it->rec.node = p;
        it->rec.node_len = in->node_len;
    } else {
        it->rec.node = q->node;
        it->rec.node_len = q->cfg.node_len;
    }
    if (in->id_in) {
        memcpy(it->rec.id, in->id_in, 36);
        it->rec.id[36] = 0;
    }
    if (in->payload_len) {
        it->payload = (char *)it + poff;
        memcpy(it->payload, in->payload, in->payload_len);
    } else {
        it->payload = in->payload;
    }
}

/* Under q->mu: stamps and links a prepared item. */
static void link_item(dx_evq *q, dx_ev_item *it, uint64_t seq, int64_t ts, bool want_id) {
    it->rec.sequence = seq;
    it->rec.ts_us = ts;
    /* the id's key is taken here, in the queue's order (ids grow with positions); its text is made here
     * only when the caller wants it back (append/4), the writer makes the others, off the commit path */
    if (!it->rec.id[0]) {
        uint64_t ms = ts > 0 ? (uint64_t)ts / 1000 : 0;
        if (ms <= q->id_ms) {
            ms = q->id_ms;
            if (++q->id_ctr > 0xfff) { /* a counter overflow borrows the next ms */
                ms++;
                q->id_ctr = 0;
            }
        } else {
            q->id_ctr = 0;
        }
        q->id_ms = ms;
        it->id_key = ms << 12 | q->id_ctr;
        if (want_id) dx_uuid7_format(it->id_key, it->rec.id);
    }
    it->ticket = ++q->pushed;
    if (!q->pending++) q->pending_since_us = dx_ev_now_us();
    if (q->tail) q->tail->next = it;
    else q->head = it;
    q->tail = it;
    q->depth++;
    atomic_store_explicit(&q->adepth, q->depth, memory_order_relaxed);
    q->bytes += it->alloc;
    if (q->depth > q->max_depth) q->max_depth = q->depth;
}

int dx_evq_push_many(dx_evq *q, const dx_ev_in *in, size_t n, uint64_t *tickets, uint64_t *seqs) {
    /* the items, and the sessions' slots found by the check (looked up once per event: the hash of the
     * session id and the probe are a good part of a push's work under the mutex) */
    dx_ev_item *stack[16], **items = n <= 16 ? stack : malloc(n * (sizeof *items + sizeof(seq_slot *)));
    if (!items) return -1;
    seq_slot *slot_stack[16], **slots = n <= 16 ? slot_stack : (seq_slot **)(items + n);
    size_t k = 0;
    for (; k < n; k++)
        if (!(items[k] = item_get(q, item_size(&in[k], &(size_t){0})))) break;
    int rc = 0;
    if (k < n) {
        rc = -1;
    } else {
        bool need_now = false; /* one clock reading, only when an event has no time of its own */
        for (size_t i = 0; i < n; i++) need_now |= !in[i].ts_us && !in[i].commit_us;
        int64_t now = need_now ? dx_ev_now_us() : 0;
        pthread_mutex_lock(&q->mu);
        /* the event's bytes are copied into its item with the mutex held: the lock's atomic instruction then
         * waits only for the stores before it, not for these (the item's lines, last written on the writer's
         * core, may still be on their way); they drain after the unlock, ahead of it in store order */
        for (size_t i = 0; i < n; i++) item_fill(q, items[i], &in[i]);
        size_t nslots0 = q->nslots;
        /* check every explicit sequence first: all or nothing */
        for (size_t i = 0; i < n && !rc; i++) {
            seq_slot *e = slots[i] = seq_slot_of(q, in[i].session, in[i].session_len);
            if (!e) rc = -1;
            else if (in[i].sequence) {
                /* explicit sequences (a replica applying the owner's log) must continue the session's */
                uint64_t expect = e->seq + 1;
                for (size_t j = 0; j < i; j++)
                    if (dx_str_same(in[j].session, in[j].session_len, in[i].session, in[i].session_len)) expect++;
                if (in[i].sequence != expect) {
                    rc = -2;
                    if (seqs) seqs[i] = expect - 1;
                }
            }
        }
        /* a new session's slot may have grown the table: the slots found before it moved (rare) */
        bool moved = q->nslots != nslots0;
        for (size_t i = 0; i < n && !rc; i++) {
            seq_slot *e = moved ? seq_slot_of(q, in[i].session, in[i].session_len) : slots[i];
            uint64_t s = ++e->seq;
            items[i]->provisional = e->provisional;
            int64_t ts = in[i].ts_us;
            if (!ts) { /* timed here: the commit's time or now, not before the session's previous event */
                ts = in[i].commit_us ? in[i].commit_us : now;
                if (ts < e->last_ts) ts = e->last_ts;
                e->last_ts = ts;
            }
            link_item(q, items[i], s, ts, in[i].id_out != NULL);
            if (in[i].id_out) memcpy(in[i].id_out, items[i]->rec.id, 37);
            if (in[i].ts_out) *in[i].ts_out = ts;
            if (tickets) tickets[i] = items[i]->ticket;
            if (seqs) seqs[i] = s;
        }
        if (!rc && (q->idle || ((q->lingering || q->gathering) && q->pending >= q->cfg.max_batch))) {
            q->idle = q->lingering = q->gathering = false; /* one signal per wait */
            pthread_cond_signal(&q->nonempty);
        }
        pthread_mutex_unlock(&q->mu);
    }
    if (rc)
        for (size_t i = 0; i < k; i++) q->cfg.item_free(items[i]); /* payloads stay with the caller on failure */
    if (items != stack) free(items);
    return rc;
}

uint64_t dx_evq_push(dx_evq *q, const dx_ev_in *in, uint64_t *seq_out) {
    uint64_t t = 0, s = 0;
    int rc = dx_evq_push_many(q, in, 1, &t, &s);
    if (seq_out) *seq_out = s;
    return rc ? 0 : t;
}

uint64_t dx_evq_ticket(dx_evq *q) {
    pthread_mutex_lock(&q->mu);
    uint64_t t = q->pushed;
    pthread_mutex_unlock(&q->mu);
    return t;
}

uint64_t dx_evq_done(dx_evq *q) {
    pthread_mutex_lock(&q->mu);
    uint64_t t = q->done;
    pthread_mutex_unlock(&q->mu);
    return t;
}

size_t dx_evq_capacity(dx_evq *q) { return q->cfg.capacity; }

bool dx_evq_full(dx_evq *q) {
    return q->cfg.capacity && atomic_load_explicit(&q->adepth, memory_order_relaxed) >= q->cfg.capacity;
}

void dx_evq_stats_get(dx_evq *q, dx_evq_stats *o) {
    pthread_mutex_lock(&q->mu);
    *o = (dx_evq_stats){q->pushed, q->done, q->batches, q->errors, q->written, q->depth, q->max_depth, q->bytes,
                        q->head ? q->head->rec.ts_us : 0, q->last_pos, q->spooled, q->commit_seeds, q->nprov,
                        q->acked_batches, q->acked, q->gathers, q->gather_timeouts, q->cpu_ns, q->write_cpu_ns,
                        q->encode_cpu_ns, q->write_ns, q->commit_avg_us, 0, 0, {0}};
    memcpy(o->last_error, q->last_error, sizeof o->last_error);
    pthread_mutex_unlock(&q->mu);
    pthread_mutex_lock(&q->spare_mu);
    o->spare = q->nspare + cached_locked(q, &o->reused);
    pthread_mutex_unlock(&q->spare_mu);
}

static void urge_locked(dx_evq *q, uint64_t ticket) {
    q->urgent = true;
    if (ticket > q->done) {
        /* one more caller waiting: counted for the gather (not counted if out of memory: only the gather
         * is less precise) */
        if (q->nwt == q->capwt) {
            size_t nc = q->capwt ? q->capwt * 2 : 64;
            uint64_t *n = realloc(q->wt, nc * sizeof *n);
            if (n) {
                q->wt = n;
                q->capwt = nc;
            }
        }
        if (q->nwt < q->capwt) q->wt[q->nwt++] = ticket;
    }
    /* a gathering writer is woken once, when as many callers wait as the last commit acknowledged */
    if (q->gathering ? q->nwt >= q->last_acked : q->lingering || q->idle) {
        q->idle = q->lingering = q->gathering = false;
        pthread_cond_signal(&q->nonempty);
    }
}

void dx_evq_urge(dx_evq *q, uint64_t ticket) {
    pthread_mutex_lock(&q->mu);
    urge_locked(q, ticket);
    pthread_mutex_unlock(&q->mu);
}

/* Under mu, after a commit (or a failed attempt: every waiter is told): forgets the waiters of done tickets,
 * and remembers how many there were (the next gather's target). */
static void ack_waiters(dx_evq *q, bool failed) {
    size_t k = 0, acked = 0;
    for (size_t i = 0; i < q->nwt; i++) {
        if (!failed && q->wt[i] > q->done) q->wt[k++] = q->wt[i];
        else acked++;
    }
    q->nwt = k;
    q->last_acked = failed ? 0 : acked;
    if (acked && !failed) {
        q->acked_batches++;
        q->acked += acked;
    }
}

/* The gather's bound in µs (see evq.h gather_us). */
static int64_t gather_bound_us(const dx_evq *q) {
    if (q->cfg.gather_us > 0) return q->cfg.gather_us;
    int64_t b = q->commit_avg_us / 2;
    return b < DX_EVQ_GATHER_CAP_US ? b : DX_EVQ_GATHER_CAP_US;
}

static uint64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int dx_evq_wait(dx_evq *q, uint64_t ticket) {
    pthread_mutex_lock(&q->mu);
    if (q->done < ticket) urge_locked(q, ticket);
    uint64_t e0 = q->errors;
    while (q->done < ticket && q->errors == e0) pthread_cond_wait(&q->progress, &q->mu);
    int rc = q->done >= ticket ? 0 : -1;
    pthread_mutex_unlock(&q->mu);
    return rc;
}

/* ---- writer ------------------------------------------------------------------------- */
static void free_items(dx_evq *q, dx_ev_item *it) {
    while (it) {
        dx_ev_item *n = it->next;
        if (it->payload && q->cfg.free_payload) q->cfg.free_payload(q->cfg.ctx, it);
        q->cfg.item_free(it);
        it = n;
    }
}

/* Writer thread: one chunk of kept items onto the stack (false: no room, the caller frees them). */
static bool push_chunk(dx_evq *q, dx_ev_item *head, size_t n) {
    pthread_mutex_lock(&q->spare_mu);
    bool ok = q->nchunks < q->cfg.spare_max;
    if (ok) {
        q->chunks[q->nchunks++] = (spare_chunk){head, n};
        q->nspare += n;
    }
    pthread_mutex_unlock(&q->spare_mu);
    return ok;
}

/* Writer thread, after a batch: its items of a slot's size go back to the spare items (up to spare_max in
 * all, the threads' caches included; in chunks of SPARE_CHUNK), payloads kept (freed by the push that reuses
 * the item); the others are freed. */
static void recycle_items(dx_evq *q, dx_ev_item *it) {
    if (!q->cfg.item_slot || !q->chunks) {
        free_items(q, it);
        return;
    }
    pthread_mutex_lock(&q->spare_mu);
    size_t held = q->nspare + cached_locked(q, NULL);
    pthread_mutex_unlock(&q->spare_mu);
    size_t room = held < q->cfg.spare_max ? q->cfg.spare_max - held : 0;
    dx_ev_item *chunk = NULL, *drop = NULL;
    size_t nkeep = 0, nchunk = 0;
    while (it) {
        dx_ev_item *n = it->next;
        if (nkeep < room && it->alloc == q->cfg.item_slot && (!q->cfg.recycle || q->cfg.recycle(q->cfg.ctx, it))) {
            it->next = chunk;
            chunk = it;
            nkeep++;
            if (++nchunk == SPARE_CHUNK) {
                if (!push_chunk(q, chunk, nchunk)) free_items(q, chunk);
                chunk = NULL;
                nchunk = 0;
            }
        } else {
            it->next = drop;
            drop = it;
        }
        it = n;
    }
    if (chunk && !push_chunk(q, chunk, nchunk)) free_items(q, chunk);
    free_items(q, drop);
}

static void note_error(dx_evq *q, const char *err) { /* under q->mu */
    q->errors++;
    q->failed_upto = q->pushed;
    snprintf(q->last_error, sizeof q->last_error, "%s", err);
}

/* Writer thread: ends the provisional numbering of the sessions whose last stored sequence was unknown
 * (the backend was down before their first event here), now that the backend may answer: adds that last
 * sequence to each of their events in the spool (durably, first), in the queue and in `batch' (the writer's,
 * taken off the queue), and to their counters, before any of those events is written to the backend. 0, or
 * -1 + err when the backend cannot say yet (or the spool fails): nothing is written to the backend then. */
static int resolve_provisional(dx_evq *q, dx_ev_item *batch, char *err, size_t errlen) {
    for (;;) {
        pthread_mutex_lock(&q->mu);
        seq_slot *e = NULL;
        for (size_t i = 0; q->nprov && i < q->nslots && !e; i++)
            if (q->slots[i].hash && q->slots[i].provisional) e = &q->slots[i];
        if (!e) {
            q->nprov = 0;
            pthread_mutex_unlock(&q->mu);
            return 0;
        }
        size_t n = e->len;
        char *key = malloc(n ? n : 1);
        if (key && n) memcpy(key, e->key, n);
        pthread_mutex_unlock(&q->mu);
        if (!key) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        uint64_t last = 0;
        if (q->cfg.ops->session_max_seq(q->st, key, n, &last, err, errlen) ||
            (q->spool && dx_spool_renumber(q->spool, key, n, last, err, errlen))) {
            free(key);
            return -1;
        }
        pthread_mutex_lock(&q->mu);
        e = seq_lookup(q, key, n); /* the table may have grown meanwhile */
        if (e && e->provisional) {
            e->seq += last;
            e->provisional = false;
            q->nprov--;
            for (dx_ev_item *it = q->head; it; it = it->next)
                if (it->provisional && dx_str_same(it->rec.session, it->rec.session_len, key, n)) {
                    it->rec.sequence += last;
                    it->provisional = false;
                }
        }
        pthread_mutex_unlock(&q->mu);
        for (dx_ev_item *it = batch; it; it = it->next)
            if (it->provisional && dx_str_same(it->rec.session, it->rec.session_len, key, n)) {
                it->rec.sequence += last;
                it->provisional = false;
            }
        free(key);
    }
}

/* Writer thread: marks in the spool the sessions of provisionally numbered events about to be spooled. */
static int mark_provisional(dx_evq *q, dx_ev_item *batch, char *err, size_t errlen) {
    const dx_ev_item *prev = NULL;
    for (dx_ev_item *it = batch; it; it = it->next) {
        if (!it->provisional) continue;
        if (prev && dx_str_same(prev->rec.session, prev->rec.session_len, it->rec.session, it->rec.session_len))
            continue;
        if (dx_spool_mark_provisional(q->spool, it->rec.session, it->rec.session_len, err, errlen)) return -1;
        prev = it;
    }
    return 0;
}

/* Writer thread: moves the oldest spooled records to the backend, one batch of up to max_batch, and
 * publishes them (on_batch with their positions). 1 when a batch moved, 0 when the spool is empty or the
 * backend failed (retried after a back-off), -1 when the spool itself failed. */
static int drain_once(dx_evq *q, dx_ev_item *batch) {
    char err[256];
    dx_spool_batch b;
    if (resolve_provisional(q, batch, err, sizeof err)) {
        /* the backend cannot say a session's last sequence: nothing moves yet */
        pthread_mutex_lock(&q->mu);
        note_error(q, err);
        q->next_drain_us = dx_ev_now_us() + q->drain_backoff * 1000;
        if (q->drain_backoff < 2000) q->drain_backoff *= 2;
        pthread_mutex_unlock(&q->mu);
        return 0;
    }
    if (dx_spool_peek(q->spool, q->cfg.max_batch, &b, err, sizeof err)) {
        pthread_mutex_lock(&q->mu);
        note_error(q, err);
        pthread_mutex_unlock(&q->mu);
        return -1;
    }
    if (!b.n) {
        pthread_mutex_lock(&q->mu);
        q->spooled = 0;
        pthread_mutex_unlock(&q->mu);
        return 0;
    }
    /* idempotent: records already stored by an attempt whose pop failed keep their position */
    int rc = q->cfg.ops->write_batch(q->st, b.recs, b.n, err, sizeof err);
    if (!rc && dx_spool_pop(q->spool, b.last_id, err, sizeof err)) rc = -1;
    pthread_mutex_lock(&q->mu);
    if (!rc) {
        q->batches++;
        q->written += b.n;
        q->spooled = q->spooled > b.n ? q->spooled - b.n : 0;
        if (b.recs[b.n - 1].position > q->last_pos) q->last_pos = b.recs[b.n - 1].position;
        q->drain_backoff = q->cfg.retry_ms;
    } else {
        note_error(q, err);
        q->next_drain_us = dx_ev_now_us() + q->drain_backoff * 1000;
        if (q->drain_backoff < 2000) q->drain_backoff *= 2;
    }
    uint64_t done = q->done;
    pthread_mutex_unlock(&q->mu);
    if (!rc && q->cfg.on_batch) q->cfg.on_batch(q->cfg.ctx, done, NULL, b.recs, b.n);
    dx_spool_batch_free(&b);
    return rc ? 0 : 1;
}

static void *writer(void *arg) {
    dx_evq *q = arg;
#ifdef __linux__
    pthread_setname_np(pthread_self(), "dx_ev_writer"); /* for perf/top: the event log's writer thread */
#endif
    size_t cap = q->cfg.max_batch;
    dx_ev_rec *recs = malloc(cap * sizeof *recs);
    char err[256];
    for (;;) {
        int64_t gather_until = 0; /* 0: not gathering yet; -1: the gather ended at its bound */
        pthread_mutex_lock(&q->mu);
        for (;;) {
            if (q->stop) break;
            if (q->head) {
                if (q->urgent && q->pending < q->cfg.max_batch && q->cfg.gather_us >= 0 && q->last_acked >= 2 &&
                    q->nwt < q->last_acked && gather_until >= 0) {
                    /* group-commit gather: the last commit acknowledged last_acked waiting callers, fewer wait
                     * now; the others are on their way with their next write (they were just told), so the
                     * next transaction waits for them, a bounded time (a fraction of a commit), instead of
                     * carrying the one or two that came first while the rest wait a whole commit more.
                     * A caller alone (last_acked 1) never waits. */
                    int64_t now = dx_ev_now_us();
                    if (!gather_until) {
                        int64_t b = gather_bound_us(q);
                        if (b <= 0) break;
                        gather_until = now + b;
                        q->gathers++;
                    }
                    if (now >= gather_until) {
                        q->gather_timeouts++;
                        gather_until = -1;
                        break;
                    }
                    struct timespec ts = {gather_until / 1000000, (gather_until % 1000000) * 1000};
                    q->gathering = true;
                    pthread_cond_timedwait(&q->nonempty, &q->mu, &ts);
                    q->gathering = false;
                    continue;
                }
                /* linger for more events: one transaction (and one fsync) for all of them */
                int64_t until = q->pending_since_us + q->cfg.linger_us;
                if (q->urgent || q->pending >= q->cfg.max_batch || q->cfg.linger_us <= 0 || dx_ev_now_us() >= until)
                    break;
                struct timespec ts = {until / 1000000, (until % 1000000) * 1000};
                q->lingering = true;
                pthread_cond_timedwait(&q->nonempty, &q->mu, &ts);
                q->lingering = false;
                continue;
            }
            if (!q->spooled) {
                q->idle = true;
                pthread_cond_wait(&q->nonempty, &q->mu);
                q->idle = false;
                continue;
            }
            int64_t now = dx_ev_now_us();
            if (now >= q->next_drain_us) break;
            struct timespec ts = {q->next_drain_us / 1000000, (q->next_drain_us % 1000000) * 1000};
            /* nothing queued: idle until the spool's next attempt, and a push wakes it as well */
            q->idle = true;
            pthread_cond_timedwait(&q->nonempty, &q->mu, &ts);
            q->idle = false;
        }
        bool stopping = q->stop, spooled = q->spooled > 0;
        bool drain_due = spooled && dx_ev_now_us() >= q->next_drain_us;
        if (!q->head && stopping) {
            pthread_mutex_unlock(&q->mu);
            /* one last try to move the spool; what stays is moved by the next open */
            while (spooled && drain_once(q, NULL) == 1) {
                pthread_mutex_lock(&q->mu);
                spooled = q->spooled > 0;
                pthread_mutex_unlock(&q->mu);
            }
            break;
        }
        /* take up to max_batch items (all of them, without a walk, when they fit: the pushers wait for
         * this mutex); they stay counted in depth until written */
        dx_ev_item *first = q->head, *last = first;
        size_t n = first ? 1 : 0;
        if (first && q->pending <= cap) {
            last = q->tail;
            n = q->pending;
        } else {
            while (first && n < cap && last->next) {
                last = last->next;
                n++;
            }
        }
        if (first) {
            q->head = last->next;
            if (!q->head) q->tail = NULL;
            last->next = NULL;
            q->pending -= n;
            /* what is left waited as long as the batch taken */
            if (q->pending) q->pending_since_us = 0;
            q->urgent = false;
        }
        pthread_mutex_unlock(&q->mu);
        /* the spool goes first (order): move one batch of it when due; a batch behind a spool joins it */
        if (drain_due) {
            (void)drain_once(q, first);
            pthread_mutex_lock(&q->mu);
            spooled = q->spooled > 0;
            pthread_mutex_unlock(&q->mu);
        }
        if (!first) continue;
        int64_t backoff = q->cfg.retry_ms;
        for (;;) {
            int rc = recs ? 0 : -1, to_spool = 0;
            if (!recs) snprintf(err, sizeof err, "out of memory");
            /* provisionally numbered events get their final numbers before they reach the backend */
            int unresolved = !rc && !spooled ? resolve_provisional(q, first, err, sizeof err) : 0;
            size_t i = 0;
            uint64_t c0 = thread_cpu_ns(), c1 = c0, c2 = c0, w0 = 0, w1 = 0;
            for (dx_ev_item *it = first; it && !rc; it = it->next, i++) {
                /* the items were written on other cores: start fetching the next one's lines (header, text,
                 * payload) while this one is encoded (a list is not something the hardware prefetcher follows;
                 * the encoding's CPU per event went from 0.59-0.66 to 0.46-0.48 us in the async bench) */
                if (it->next) {
                    const char *nx = (const char *)it->next;
                    size_t span = it->next->alloc < 512 ? it->next->alloc : 512;
                    for (size_t off = 0; off < span; off += 64) __builtin_prefetch(nx + off);
                }
                if (it->payload && q->cfg.encode && !it->encoded) {
                    if (q->cfg.encode(q->cfg.ctx, it)) {
                        snprintf(err, sizeof err, "encode failed");
                        rc = -1;
                    } else {
                        it->encoded = true; /* once: a retry of this batch writes the same bytes */
                    }
                }
                if (!it->rec.id[0]) {
                    if (it->id_key) dx_uuid7_format(it->id_key, it->rec.id);
                    else dx_uuid7(it->rec.ts_us, it->rec.id);
                }
                recs[i] = it->rec;
                recs[i].position = 0;
            }
            c1 = thread_cpu_ns();
            if (!rc && !spooled) {
                w0 = mono_ns();
                rc = unresolved ? -1 : q->cfg.ops->write_batch(q->st, recs, n, err, sizeof err);
                w1 = mono_ns();
                c2 = thread_cpu_ns();
                if (rc && q->spool) {
                    /* the backend failed: count it, then spool the batch */
                    pthread_mutex_lock(&q->mu);
                    note_error(q, err);
                    pthread_mutex_unlock(&q->mu);
                    to_spool = 1;
                }
            } else if (!rc) {
                to_spool = 1;
            }
            if (to_spool)
                rc = mark_provisional(q, first, err, sizeof err) || dx_spool_append(q->spool, recs, n, err, sizeof err)
                         ? -1 : 0;
            size_t nbytes = 0;
            for (dx_ev_item *it = first; it; it = it->next) nbytes += it->alloc;
            pthread_mutex_lock(&q->mu);
            q->encode_cpu_ns += c1 - c0;
            if (w1) {
                q->write_cpu_ns += c2 - c1;
                q->write_ns += w1 - w0;
                if (!rc) {
                    int64_t us = (int64_t)((w1 - w0) / 1000);
                    q->commit_avg_us = q->commit_avg_us ? q->commit_avg_us + (us - q->commit_avg_us) / 8 : us;
                }
            }
            if (!rc) {
                q->done = last->ticket;
                q->depth -= n;
                atomic_store_explicit(&q->adepth, q->depth, memory_order_relaxed);
                q->bytes -= nbytes;
                if (to_spool) {
                    if (!q->spooled) {
                        q->next_drain_us = dx_ev_now_us() + q->cfg.retry_ms * 1000;
                        q->drain_backoff = q->cfg.retry_ms;
                    }
                    q->spooled += n;
                    spooled = true;
                } else {
                    q->batches++;
                    q->written += n;
                    if (recs[n - 1].position > q->last_pos) q->last_pos = recs[n - 1].position;
                }
            } else {
                note_error(q, err);
            }
            ack_waiters(q, rc != 0);
            q->cpu_ns = thread_cpu_ns(); /* the writer's CPU time so far (on_batch's counts with the next) */
            uint64_t done = q->done;
            pthread_cond_broadcast(&q->progress);
            pthread_mutex_unlock(&q->mu);
            /* spooled records are durable (done) but have no position yet: published when moved */
            if (q->cfg.on_batch)
                q->cfg.on_batch(q->cfg.ctx, done, rc ? err : NULL, rc || to_spool ? NULL : recs,
                                rc || to_spool ? 0 : n);
            if (!rc) break;
            /* never drop: wait, then retry the same batch (also while stopping: the backend may return) */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            int64_t ns = ts.tv_nsec + backoff * 1000000;
            ts.tv_sec += ns / 1000000000;
            ts.tv_nsec = ns % 1000000000;
            pthread_mutex_lock(&q->mu);
            stopping = q->stop;
            if (!stopping) pthread_cond_timedwait(&q->nonempty, &q->mu, &ts);
            pthread_mutex_unlock(&q->mu);
            if (stopping) {
                /* closing with a failing backend: nothing more can be done with these events */
                break;
            }
            if (backoff < 2000) backoff *= 2;
        }
        recycle_items(q, first);
    }
    free(recs);
    if (q->cfg.writer_exit) q->cfg.writer_exit(q->cfg.ctx);
    return NULL;
}

/* Seeds the sequence of a spooled session: above both the backend's and the spool's last; a session whose
 * spooled records are numbered provisionally goes on so (renumbered with them, see resolve_provisional). */
static void seed_spooled(void *ctx, const char *session, size_t len, uint64_t max_seq, int provisional) {
    dx_evq *q = ctx;
    seq_slot *e = provisional ? seq_insert_provisional(q, session, len, max_seq) : seq_slot_of(q, session, len);
    if (e && e->seq < max_seq) e->seq = max_seq;
}

dx_evq *dx_evq_open(const dx_evq_config *cfg, void *seed_st, pthread_mutex_t *seed_mu, char *err, size_t errlen) {
    dx_evq *q = calloc(1, sizeof *q);
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    q->cfg = *cfg;
    if (!q->cfg.max_batch) q->cfg.max_batch = 8192;
    if (q->cfg.retry_ms <= 0) q->cfg.retry_ms = 100;
    if (!q->cfg.item_alloc || !q->cfg.item_free) {
        q->cfg.item_alloc = malloc;
        q->cfg.item_free = free;
    }
    q->node = malloc(cfg->node_len ? cfg->node_len : 1);
    if (!q->node) {
        free(q);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (cfg->node_len) memcpy(q->node, cfg->node, cfg->node_len);
    q->seed_st = seed_st;
    q->seed_mu = seed_mu;
    if (q->cfg.item_slot && !q->cfg.spare_max) q->cfg.spare_max = 4096;
    if (q->cfg.item_slot && q->cfg.item_slot < sizeof(dx_ev_item)) q->cfg.item_slot = 0;
    /* the chunks' stack: every chunk holds at least one of at most spare_max items (none: no recycling) */
    if (q->cfg.item_slot) q->chunks = malloc(q->cfg.spare_max * sizeof *q->chunks);
    q->id = atomic_fetch_add(&g_evq_ids, 1) + 1;
    pthread_mutex_init(&q->mu, NULL);
    pthread_mutex_init(&q->spare_mu, NULL);
    pthread_cond_init(&q->nonempty, NULL);
    pthread_cond_init(&q->progress, NULL);
    if (cfg->ops->open(cfg->target, &q->st, err, errlen)) goto fail;
    if (cfg->ops->max_position(q->st, &q->last_pos, err, errlen)) goto fail_close;
    if (seq_grow(q)) {
        snprintf(err, errlen, "out of memory");
        goto fail_close;
    }
    q->drain_backoff = q->cfg.retry_ms;
    if (cfg->spool_path) {
        if (dx_spool_open(cfg->spool_path, &q->spool, err, errlen) ||
            dx_spool_count(q->spool, &q->spooled, err, errlen) ||
            dx_spool_sessions(q->spool, seed_spooled, q, err, errlen))
            goto fail_close;
    }
    if (pthread_create(&q->thr, NULL, writer, q)) {
        snprintf(err, errlen, "cannot start the writer thread");
        goto fail_close;
    }
    q->started = true;
    return q;
fail_close:
    cfg->ops->close(q->st);
fail:
    dx_spool_close(q->spool);
    free(q->chunks);
    for (size_t i = 0; i < q->nslots; i++) free(q->slots[i].key);
    free(q->slots);
    free(q->node);
    pthread_mutex_destroy(&q->mu);
    pthread_mutex_destroy(&q->spare_mu);
    pthread_cond_destroy(&q->nonempty);
    pthread_cond_destroy(&q->progress);
    free(q);
    return NULL;
}

void dx_evq_close(dx_evq *q) {
    if (!q) return;
    pthread_mutex_lock(&q->mu);
    q->stop = true;
    pthread_cond_broadcast(&q->nonempty);
    pthread_mutex_unlock(&q->mu);
    if (q->started) pthread_join(q->thr, NULL);
    q->cfg.ops->close(q->st);
    dx_spool_close(q->spool);
    free_items(q, q->head);
    /* the spare items, in the chunks and in the threads' caches (no push runs any more) */
    for (size_t i = 0; i < q->nchunks; i++) free_items(q, q->chunks[i].head);
    free(q->chunks);
    for (spare_cache *c = q->caches, *n; c; c = n) {
        n = c->next;
        free_items(q, c->head);
        free(c);
    }
    for (size_t i = 0; i < q->nslots; i++) free(q->slots[i].key);
    free(q->slots);
    free(q->wt);
    free(q->node);
    pthread_mutex_destroy(&q->mu);
    pthread_mutex_destroy(&q->spare_mu);
    pthread_cond_destroy(&q->nonempty);
    pthread_cond_destroy(&q->progress);
    free(q);
}
