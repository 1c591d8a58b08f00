/* The spool of the event writer (issue #15): while the primary backend
 * (PostgreSQL) fails, the writer appends its batches here, a durable FIFO in
 * an embedded SQLite file (WAL, synchronous=FULL: an append returns after
 * fsync), and moves them to the primary in the same order when it is back.
 * Records keep their session, sequence, time and id; only the primary assigns
 * positions. Used by the writer thread only (no locking here).
 * Pure C: no erl_nif types. */
#ifndef DX_EVENTS_SPOOL_H
#define DX_EVENTS_SPOOL_H
#include "backend.h"

typedef struct dx_spool dx_spool;

/* The oldest spooled records, owned by the batch (free with dx_spool_batch_free). */
typedef struct {
    dx_ev_rec *recs;
    size_t n;
    uint64_t last_id; /* spool id of the last record: dx_spool_pop(s, last_id) removes the batch */
    void **mem;       /* one block per record */
} dx_spool_batch;

/* Opens (creates) the spool file. Every function returns 0, or -1 with a message in err. */
int dx_spool_open(const char *path, dx_spool **out, char *err, size_t errlen);
/* Appends n records in one durable transaction, in array order. */
int dx_spool_append(dx_spool *s, const dx_ev_rec *recs, size_t n, char *err, size_t errlen);
/* Number of spooled records. */
int dx_spool_count(dx_spool *s, uint64_t *n, char *err, size_t errlen);
/* Reads the oldest (at most max) records, in append order; b->n is 0 when the spool is empty. */
int dx_spool_peek(dx_spool *s, size_t max, dx_spool_batch *b, char *err, size_t errlen);
void dx_spool_batch_free(dx_spool_batch *b);
/* Removes every record up to spool id upto (inclusive), durably. */
int dx_spool_pop(dx_spool *s, uint64_t upto, char *err, size_t errlen);
/* Calls cb for every spooled session with its highest spooled sequence (to seed the sequence map) and
 * whether its spooled records are numbered provisionally (see dx_spool_mark_provisional). */
int dx_spool_sessions(dx_spool *s,
                      void (*cb)(void *ctx, const char *session, size_t len, uint64_t max_seq, int provisional),
                      void *ctx, char *err, size_t errlen);
/* Records that the session's spooled records are numbered provisionally: its last stored sequence was
 * unknown (the backend was down before its first event here), so they count from 1 (durable). */
int dx_spool_mark_provisional(dx_spool *s, const char *session, size_t len, char *err, size_t errlen);
/* Adds offset (the backend's last sequence of the session) to every spooled record of a provisionally
 * numbered session and ends its provisional mark, in one durable transaction. */
int dx_spool_renumber(dx_spool *s, const char *session, size_t len, uint64_t offset, char *err, size_t errlen);
void dx_spool_close(dx_spool *s);
#endif
