/* The event queue of the event log (issue #15): a bounded multi-producer queue
 * fed by the store's commit path, drained by one writer thread that writes
 * batches to a backend (backend.h) in one transaction each (group commit).
 *
 * Producers push from inside the store's critical sections: a push only copies
 * bytes and takes the queue mutex for a few instructions; it assigns the
 * session's next sequence number (from 1, gapless, in push order), the commit
 * time and a UUIDv7 under that mutex, so the queue order is the commit order.
 *
 * Durability: every push gets a ticket (1, 2, ...); `done' is the highest ticket
 * the backend has made durable. A caller that must wait for durability waits
 * until done >= its ticket (the on_batch callback says when).
 *
 * Pure C: no erl_nif types. Payloads that need the VM to encode (values as
 * external term format) are carried opaque and encoded by the writer thread
 * through the encode callback, off the commit path. */
#ifndef DX_EVENTS_EVQ_H
#define DX_EVENTS_EVQ_H
#include "backend.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

/* Starts fetching the cache line of p for writing (its other copies invalidated), for a line written soon
 * that another core wrote last. __builtin_prefetch(p, 1, 3) alone emits a read prefetch unless the build
 * targets PREFETCHW: the line then arrives shared, and the first store still waits for a second exchange
 * with the other core. PREFETCHW decodes as a no-op hint on x86-64 processors without it. */
static inline void dx_prefetch_w(const void *p) {
#if defined(__x86_64__)
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

typedef struct dx_ev_item {
    struct dx_ev_item *next;
    uint64_t ticket;
    dx_ev_rec rec;   /* strings point into text[]; data/meta into text[] or set by encode */
    void *payload;   /* opaque; encode turns it into rec.data/rec.meta */
    size_t alloc;    /* bytes of this item, for the memory gauge */
    bool encoded;    /* the writer encoded the payload (a retried batch is not encoded again: the encoding
                        would replace, and leak, the one made for the failed attempt) */
    bool provisional; /* numbered from 1 because the session's last stored sequence was unknown (the
                         backend down before its first event here): renumbered before it is written */
    uint64_t id_key;  /* the id's time and counter, taken when the item was queued (0: none): ids then
                         grow with the queue's order, whichever thread writes the id's text */
    _Alignas(8) char text[];
} dx_ev_item;

/* What a producer hands over (every byte is copied). */
typedef struct {
    const char *session; size_t session_len;
    const char *type;    size_t type_len;
    const char *variable; size_t variable_len;
    const char *principal; size_t principal_len;
    const char *changed_by; size_t changed_by_len;
    const uint8_t *data; size_t data_len; /* already encoded, or 0 with payload */
    const uint8_t *meta; size_t meta_len;
    void *payload;                         /* owned by the queue once pushed */
    size_t payload_len;                    /* > 0: payload points to that many bytes (e.g. on the caller's stack),
                                              copied into the item's own allocation; it->payload then points at
                                              the copy (free_payload must not free that block itself) */
    int64_t ts_us;                         /* 0: the queue reads the clock (or takes commit_us); else kept as is */
    int64_t commit_us;                     /* with ts_us 0: the commit's own reading of the clock (0: none), taken
                                              as the event's time instead of a second reading; an event timed
                                              here never gets an earlier time than the session's previous one */
    uint64_t sequence;                     /* 0: assign the session's next; else must be exactly next (replicas) */
    char *id_out;                          /* optional: receives the event's UUIDv7 (37 bytes) */
    const char *id_in;                     /* optional: the event's id (36 chars), kept (a replica copying the
                                              owner's event); else one is made */
    const char *node; size_t node_len;     /* optional: the node that made the event (node_len 0: this one) */
    int64_t *ts_out;                       /* optional: receives the event's time */
} dx_ev_in;

typedef struct dx_evq dx_evq;

typedef struct {
    const dx_ev_backend_ops *ops;
    const char *target;       /* backend open target */
    const char *node; size_t node_len;
    size_t max_batch;         /* records per transaction (default 8192) */
    size_t capacity;          /* queue bound: pushes beyond it still succeed (a committed change is never
                                 dropped) but dx_evq_full() turns true: callers apply back-pressure */
    int64_t retry_ms;         /* pause after a failed batch before retrying it (default 100) */
    int64_t linger_us;        /* how long the writer waits for more events after the first of a batch
                                 (0: none): one wake-up and one transaction per linger, not per event.
                                 dx_evq_urge (a caller waiting for durability) and a full batch end it. */
    int64_t gather_us;        /* group-commit gather (see dx_evq_urge): when the last commit acknowledged w >= 2
                                 waiting callers and fewer than w wait now, the writer waits for as many as
                                 last time before it starts the next transaction, at most this long: 0 (the
                                 default) means the mean duration of the recent commits (half of it, see evq.c)
                                 capped at DX_EVQ_GATHER_CAP_US; > 0 a fixed bound (tests); < 0 never gathers. */
    /* Writer thread: fill it->rec.data/meta from it->payload (return 0, or -1 to fail the batch). */
    int (*encode)(void *ctx, dx_ev_item *it);
    void (*free_payload)(void *ctx, dx_ev_item *it);
    /* Optional allocator of the queue's items (allocated by committing threads, freed by the writer):
       NULL means malloc/free. The NIF passes the VM's, whose per-thread instances take blocks freed
       by another thread back without the malloc arena's consolidation work. */
    void *(*item_alloc)(size_t size);
    void (*item_free)(void *p);
    /* Optional recycling of the items (0: none): an item of up to item_slot bytes is allocated at that size
       and, once written, handed back by the writer to a spare list (at most spare_max items, default 4096)
       instead of being freed; a committing thread takes its next item from there (no allocator call, no
       block freed by one thread and reused by another's allocator): the writer hands them back in chunks of
       up to 32, and a committing thread takes a whole chunk at a time into a cache of its own, so that one
       lock serves a chunk's pushes (spare_max counts the items in the threads' caches too). Before an item goes back, recycle
       (writer thread, optional) drops what the writer added (its encoding) and says whether the item may
       be kept (false: freed at once, payload included). The payload of a kept item is freed (free_payload)
       by the committing thread that reuses the item, or at close: its memory (the store's snapshots) is
       released on the thread that allocated it. */
    size_t item_slot, spare_max;
    bool (*recycle)(void *ctx, dx_ev_item *it);
    /* Optional, with item_slot: starts fetching the memory free_payload will touch for a kept item's payload
       (a committing thread, one item ahead of its reuse: the item is in that thread's own cache of spare
       items, so its payload is alive; only prefetches, no access beyond it->payload's fields). */
    void (*prefetch_payload)(void *ctx, const dx_ev_item *it);
    /* Writer thread, after every attempt: done = highest durable ticket; err NULL on success, else
       the failure (the batch is retried; nothing is dropped). recs are the written records (n of them,
       positions assigned) on success. */
    void (*on_batch)(void *ctx, uint64_t done, const char *err, const dx_ev_rec *recs, size_t n);
    /* Optional: called last on the writer thread before it ends (dx_evq_close), to free what the other
       callbacks kept in that thread's own storage. */
    void (*writer_exit)(void *ctx);
    void *ctx;
    /* Optional: a spool file (spool.h). When set, a batch the backend fails to write is appended there
       instead (durable: it counts as done), later batches follow it while anything is spooled, and the
       writer moves the spooled records to the backend in order as soon as it takes them again (retried
       with back-off, also while idle). A spool left at close is moved by the next open. */
    const char *spool_path;
} dx_evq_config;

typedef struct {
    uint64_t pushed, done, batches, errors, written;
    size_t depth, max_depth, bytes;
    int64_t oldest_ts_us; /* commit time of the oldest queued event (0: empty) */
    uint64_t last_position;
    uint64_t spooled;     /* records in the spool, waiting for the backend */
    uint64_t commit_seeds; /* sessions whose last sequence was read from the backend by a push */
    uint64_t provisional;  /* sessions numbered provisionally, waiting for the backend's last sequence */
    /* group commit: batches that acknowledged at least one waiting caller, and how many callers in all
       (acked / acked_batches = the mean number of sync writes a transaction carried); gathers = times the
       writer waited for more waiters before a transaction, gather_timeouts = of those, how many ended at
       the bound instead of at the count */
    uint64_t acked_batches, acked, gathers, gather_timeouts;
    /* writer thread: CPU time in all (CLOCK_THREAD_CPUTIME_ID), of it in the backend's write_batch and in
       encode; wall time in write_batch (commits and their fsyncs); mean of the recent commits' wall time */
    uint64_t cpu_ns, write_cpu_ns, encode_cpu_ns, write_ns;
    int64_t commit_avg_us;
    /* item recycling (item_slot): items taken from the spare list by pushes, items in it now */
    uint64_t reused;
    size_t spare;
    char last_error[256];
} dx_evq_stats;

/* Opens the backend, reads its highest position and starts the writer thread.
 * seed: optional second backend instance (readers' connection) used to find a
 * session's last stored sequence the first time the queue sees the session;
 * seed_mu serialises it with the caller's own reads. NULL, -1 + err on failure. */
dx_evq *dx_evq_open(const dx_evq_config *cfg, void *seed_st, pthread_mutex_t *seed_mu, char *err, size_t errlen);
/* Stops accepting, lets the writer drain everything (retrying failures until stop_retrying), joins it, closes
 * the backend. */
void dx_evq_close(dx_evq *q);
/* Copies the event into the queue. Returns its ticket (> 0); 0 when out of memory (nothing queued) or, for a
 * given sequence, when it is not the session's next (*seq_out then holds the expected one minus 1). */
uint64_t dx_evq_push(dx_evq *q, const dx_ev_in *in, uint64_t *seq_out);
/* Several events that must be adjacent (an atomic batch): all or nothing. tickets may be NULL. */
int dx_evq_push_many(dx_evq *q, const dx_ev_in *in, size_t n, uint64_t *tickets, uint64_t *seqs);
uint64_t dx_evq_ticket(dx_evq *q); /* tickets handed out so far (the last one) */
uint64_t dx_evq_done(dx_evq *q);   /* highest durable ticket */
bool dx_evq_full(dx_evq *q);
size_t dx_evq_capacity(dx_evq *q); /* the configured bound (0: none) */
void dx_evq_stats_get(dx_evq *q, dx_evq_stats *out);
/* The session's last assigned sequence (0: none yet); seeds it first (blocking, see dx_evq_seed). */
uint64_t dx_evq_session_seq(dx_evq *q, const char *session, size_t len);
/* Whether the queue knows the session's last sequence already. */
bool dx_evq_known(dx_evq *q, const char *session, size_t len);
/* Reads the session's last sequence from the backend (blocking: call it off the commit path, e.g. on a dirty
 * scheduler, before the session's first event), unless known. 0, or -1 + err when the backend cannot say:
 * the session is then numbered provisionally from 1, and the writer renumbers its events (adds the
 * backend's last sequence of the session to each, in the spool, the queue and the batch at hand) as soon as
 * the backend answers, before any of them is written there: no number collides with a stored one. */
int dx_evq_seed(dx_evq *q, const char *session, size_t len, char *err, size_t errlen);
/* The session's last assigned sequence when the queue knows it (returns true), without asking the backend. */
bool dx_evq_known_seq(dx_evq *q, const char *session, size_t len, uint64_t *seq);
/* Raises a session's sequence so that the next one is above floor (a replica taking over); floor is the
 * backend's last sequence of the session, read by the caller: an unknown session starts there (no second
 * read of the backend, which would be under the mutex every push takes); a session numbered provisionally
 * is left to the writer, which numbers it after the backend's last sequence anyway. */
void dx_evq_session_seq_raise(dx_evq *q, const char *session, size_t len, uint64_t floor);
/* Blocks the calling thread until done >= ticket or an attempt fails after it was pushed
 * (returns 0 or -1). For C callers and tests; the NIF uses on_batch instead. */
int dx_evq_wait(dx_evq *q, uint64_t ticket);
/* A caller waits until ticket is durable: the writer writes what is queued now instead of lingering, and
 * counts the caller (one per call, until its ticket is done) for the group-commit gather (gather_us): the
 * callers a commit acknowledges are the ones to wait for before the next transaction. */
#define DX_EVQ_GATHER_CAP_US 5000
void dx_evq_urge(dx_evq *q, uint64_t ticket);

/* UUIDv7 text (36 chars + NUL) for ts_us; monotonic within a process. */
void dx_uuid7(int64_t ts_us, char out[37]);
/* The UUIDv7 text of a key (48-bit ms << 12 | 12-bit counter) with fresh random bits. */
void dx_uuid7_format(uint64_t key, char out[37]);
int64_t dx_ev_now_us(void);
#endif
