/* c_src/events/backend.h — the contract between the event writer and its storage backends.
 * Pure C (no erl_nif types). Shared verbatim by sqlite.c and pg.c; do not change it without the lead. */
#ifndef DX_EVENTS_BACKEND_H
#define DX_EVENTS_BACKEND_H
#include <stddef.h>
#include <stdint.h>

/* One event as stored. Strings are byte ranges (not NUL-terminated) unless said otherwise.
 * data/meta are opaque payloads (the NIF stores term_to_binary-compatible ETF). */
typedef struct {
    uint64_t position;   /* global order in one store; OUTPUT of write_batch (assigned by the backend, >0) */
    uint64_t sequence;   /* per session, from 1, gapless, commit order */
    int64_t ts_us;       /* commit time, microseconds since the Unix epoch */
    char id[37];         /* UUIDv7 text, 36 chars + NUL */
    const char *session;    size_t session_len;
    const char *type;       size_t type_len;      /* e.g. "variable_updated" */
    const char *variable;   size_t variable_len;  /* 0-length when none */
    const char *principal;  size_t principal_len; /* 0-length when none */
    const char *changed_by; size_t changed_by_len;
    const char *node;       size_t node_len;
    const uint8_t *data;    size_t data_len;
    const uint8_t *meta;    size_t meta_len;
} dx_ev_rec;

/* A read. Zero-initialise, then set what you filter on. Ranges are inclusive. */
typedef struct {
    const char *session; size_t session_len;      /* session_len 0 = every session */
    uint64_t seq_from, seq_to;                    /* seq_to 0 = no upper bound */
    uint64_t pos_from, pos_to;                    /* pos_to 0 = no upper bound */
    int64_t ts_from, ts_to;                       /* ts_to 0 = no upper bound */
    const char *const *types; const size_t *type_lens; size_t ntypes;  /* ntypes 0 = all types */
    const char *principal; size_t principal_len;  /* 0 = any */
    const char *variable;  size_t variable_len;   /* 0 = any */
    size_t limit;                                 /* 0 = no limit */
    int descending;                               /* order by position (per session: by sequence) */
    int lean;  /* only position, sequence, ts_us, type and data are needed (a backend may leave the rest empty) */
} dx_ev_query;

/* Called once per row, in order; the record's pointers are valid only during the call.
 * Return 0 to continue, non-zero to stop early (not an error). */
typedef int (*dx_ev_row_cb)(void *ctx, const dx_ev_rec *r);

/* Snapshot of one session's variables at a sequence (for state_at). blob is opaque (ETF). */
typedef struct {
    const char *session; size_t session_len;
    uint64_t sequence; int64_t ts_us;
    const uint8_t *blob; size_t blob_len;
} dx_ev_snapshot;
typedef int (*dx_ev_snap_cb)(void *ctx, const dx_ev_snapshot *s);

/* Every function returns 0 on success, or -1 with a message in err (errlen bytes, NUL-terminated).
 * A backend instance is used by one writer thread at a time plus readers serialised by the caller's mutex,
 * unless the backend documents it is safe for concurrent reads. */
typedef struct {
    const char *name;   /* "sqlite" | "postgres" */
    /* target: a file path (sqlite) or a libpq conninfo string (postgres). Creates the schema if absent. */
    int (*open)(const char *target, void **st, char *err, size_t errlen);
    /* Writes n records in ONE transaction, durable (fsync / synchronous commit) when it returns 0.
     * Assigns recs[i].position in array order. Idempotent: a record whose (session, sequence) is already stored
     * is skipped (and gets the stored position). */
    int (*write_batch)(void *st, dx_ev_rec *recs, size_t n, char *err, size_t errlen);
    int (*query)(void *st, const dx_ev_query *q, dx_ev_row_cb cb, void *ctx, char *err, size_t errlen);
    int (*max_position)(void *st, uint64_t *pos, char *err, size_t errlen);
    /* Highest stored sequence of one session (0 when none). */
    int (*session_max_seq)(void *st, const char *session, size_t len, uint64_t *seq, char *err, size_t errlen);
    int (*put_snapshot)(void *st, const dx_ev_snapshot *s, char *err, size_t errlen);
    /* n snapshots in one transaction (all or none); NULL: the caller calls put_snapshot for each. */
    int (*put_snapshots)(void *st, const dx_ev_snapshot *s, size_t n, char *err, size_t errlen);
    /* The latest snapshot with sequence <= max_seq (max_seq 0 = no bound) and ts_us <= max_ts (0 = no bound);
     * cb is not called when there is none. */
    int (*latest_snapshot)(void *st, const char *session, size_t len, uint64_t max_seq, int64_t max_ts,
                           dx_ev_snap_cb cb, void *ctx, char *err, size_t errlen);
    /* Retention: calls cb (in position order) for every event older than ts_us whose position is in
     * [pos_from, pos_to], then deletes exactly those in the same transaction if every cb returned 0 (the
     * caller archives them in cb, or archived them before and checks them in cb). The position bound keeps a
     * caller that archived a range from deleting a row committed after it read that range (a late row:
     * a replica's copy with its owner's older time). */
    int (*expire_before)(void *st, int64_t ts_us, uint64_t pos_from, uint64_t pos_to, dx_ev_row_cb cb, void *ctx,
                         char *err, size_t errlen);
    void (*close)(void *st);
} dx_ev_backend_ops;

extern const dx_ev_backend_ops dx_ev_sqlite_ops;
extern const dx_ev_backend_ops dx_ev_pg_ops;
#endif
