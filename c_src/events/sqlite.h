/* c_src/events/sqlite.h — what the SQLite event backend (sqlite.c) offers beyond backend.h: its checkpointer's
 * settings and counters. Pure C. */
#ifndef DX_EVENTS_SQLITE_H
#define DX_EVENTS_SQLITE_H
#include "backend.h"
#include <stddef.h>
#include <stdint.h>

/* The checkpointer thread (see sqlite.c) runs a PASSIVE checkpoint whenever the WAL grew by SQ_CKPT_PAGES
 * (SQLite's own automatic checkpoint threshold); a commit that leaves SQ_CKPT_LIMIT_PAGES or more in the WAL
 * waits for one, so that the next transaction starts the WAL over: the bound of the WAL file (16 MiB of 4 KiB
 * pages, plus one transaction). */
#define SQ_CKPT_PAGES 1000
#define SQ_CKPT_LIMIT_PAGES 4096

typedef struct {
    uint64_t passive, errors;           /* checkpoints run (BUSY is not an error: the next commit asks again) */
    uint64_t waits;                     /* commits that left the WAL at the limit and waited for a checkpoint */
    uint64_t max_wal_pages;             /* the largest WAL size a commit reported to the checkpointer */
} dx_ev_sqlite_ckpt_stats;

/* For tests and the bench: the thresholds of connections opened from now on (0: the defaults above; pages < 0:
 * no checkpointer thread, SQLite's automatic checkpoint in the committing connection, as before). */
void dx_ev_sqlite_ckpt_config(long pages, long limit_pages);
/* The checkpointer counters of one backend instance (what dx_ev_sqlite_ops.open returned). */
int dx_ev_sqlite_ckpt_stats_get(void *st, dx_ev_sqlite_ckpt_stats *out);
/* For tests: SQLite's plan of the query `query' would run for q (EXPLAIN QUERY PLAN's lines, "; "-separated). */
int dx_ev_sqlite_query_plan(void *st, const dx_ev_query *q, char *out, size_t outlen, char *err, size_t errlen);
#endif
