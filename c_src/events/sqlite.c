/* The embedded event log backend (backend.h) on SQLite: WAL mode,
 * synchronous=FULL (a commit returns after the WAL is fsynced), prepared
 * statements, one transaction per batch. Positions are row ids assigned here
 * from a high-water mark kept in the `meta' table (written once per batch), so
 * they only ever grow, also after retention deletes the newest-but-old rows. */
#include "backend.h"
#include "sqlite.h"
#include <pthread.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The checkpointer: the log's WAL is copied into the database file by a thread of its own, on a connection of
 * its own, not by the connection that committed (SQLite's automatic checkpoint runs inside the committing
 * COMMIT, i.e. on the event writer thread: reading the WAL's pages, writing and fsyncing the database file).
 * Each connection's WAL hook (called after every commit with the WAL's size in pages) wakes it when the WAL grew
 * by SQ_CKPT_PAGES since its last checkpoint; it runs PASSIVE checkpoints (they never wait for nor block the
 * writer or the readers). A WAL is reused from its start by the first transaction that begins after a
 * checkpoint copied all of it; under a sustained stream of transactions that moment may not come (the next one
 * begins before the checkpoint ends), so when a commit leaves SQ_CKPT_LIMIT_PAGES or more in the WAL the
 * committing thread waits (idle, its locks released) until a checkpoint asked then has ended: the WAL file
 * stays below about SQ_CKPT_LIMIT_PAGES plus one transaction's pages (more only while a reader keeps a snapshot
 * older than the WAL's start: it keeps its pages from being copied, as with SQLite's own checkpoints). */
typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv, done_cv;
    bool started, stop;
    uint64_t asked, finished; /* checkpoints asked for / the last asked one that has ended (or stop) */
    int wal_pages;       /* the WAL's size after the last commit that asked (pages); 0 = nothing asked */
    int ckpt_upto;       /* the WAL's size when the last checkpoint ended: a commit asks again once the WAL grew
                            SQ_CKPT_PAGES past it (or started over below it) */
    char *path;          /* the database file */
    dx_ev_sqlite_ckpt_stats st;
} sq_ckpt;

typedef struct {
    sqlite3 *db;
    sqlite3_stmt *hwm, *ins, *ins_multi[4], *undo_multi, *find, *maxpos, *maxseq, *putsnap, *getsnap, *begin,
        *begin_deferred, *commit, *rollback, *lastmax, *probe, *posrange;
    sq_ckpt ck;
} sq_t;

/* Rows per multi-row INSERT: one statement step (cursors opened, the program run) per SQ_MULTI rows instead
 * of per row; 13 parameters a row stay far below SQLite's limit (32766; 999 before 3.32). A batch's rows go in
 * chunks of 32, 16, 8 and 4 (sq_multi_rows), the last 0-3 one by one: the group commit of 16 sync writers is
 * one statement, not 16 (its inserts took 15 us instead of 24 in the sync bench). */
#define SQ_MULTI 32
#define SQ_NMULTI 4
#define SQ_COLS 13
static const int sq_multi_rows[SQ_NMULTI] = {SQ_MULTI, SQ_MULTI / 2, SQ_MULTI / 4, SQ_MULTI / 8};

/* Partial indexes: see migrate_partial_index. A query filtering on them repeats the index's condition
 * (query_sql): SQLite uses a partial index only when the query's WHERE implies it. */
#define TYPE_INDEX "CREATE INDEX IF NOT EXISTS events_type ON events(type, position) WHERE type <> 'variable_updated';"
#define PRINCIPAL_INDEX "CREATE INDEX IF NOT EXISTS events_principal ON events(principal, position) WHERE principal <> x'';"
#define TYPE_UNINDEXED "variable_updated"

static const char *SCHEMA =
    "CREATE TABLE IF NOT EXISTS events("
    " position INTEGER PRIMARY KEY, session BLOB NOT NULL, sequence INTEGER NOT NULL,"
    " ts_us INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL, variable BLOB NOT NULL,"
    " principal BLOB NOT NULL, changed_by BLOB NOT NULL, node BLOB NOT NULL, data BLOB, meta BLOB, tmax INTEGER);"
    "CREATE UNIQUE INDEX IF NOT EXISTS events_session_seq ON events(session, sequence);"
    TYPE_INDEX PRINCIPAL_INDEX
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);";

/* Snapshots live in a second file, attached as `snap', without fsync: they
 * are derived from the log (a lost one is rebuilt), so putting one never
 * waits for the disk nor for the events table's write lock. */
static const char *SNAP_SCHEMA =
    "PRAGMA snap.journal_mode=WAL; PRAGMA snap.synchronous=OFF;"
    "CREATE TABLE IF NOT EXISTS snap.snapshots(session BLOB NOT NULL, sequence INTEGER NOT NULL,"
    " ts_us INTEGER NOT NULL, blob BLOB NOT NULL, PRIMARY KEY(session, sequence));";

static int fail(sq_t *s, const char *what, char *err, size_t errlen) {
    snprintf(err, errlen, "%s: %s", what, s && s->db ? sqlite3_errmsg(s->db) : "no database");
    return -1;
}

static long g_ckpt_pages = SQ_CKPT_PAGES, g_ckpt_limit = SQ_CKPT_LIMIT_PAGES;

static bool g_ckpt_inline;

void dx_ev_sqlite_ckpt_config(long pages, long limit_pages) {
    g_ckpt_inline = pages < 0;
    g_ckpt_pages = pages > 0 ? pages : SQ_CKPT_PAGES;
    g_ckpt_limit = limit_pages > 0 ? limit_pages : SQ_CKPT_LIMIT_PAGES;
}

static void *ckpt_main(void *arg) {
    sq_ckpt *c = arg;
    sqlite3 *db = NULL;
    /* its own connection: a checkpoint on the writer's connection would run on the writer's thread */
    if (sqlite3_open_v2(c->path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK) {
        sqlite3_close_v2(db);
        db = NULL;
    } else {
        sqlite3_exec(db, "PRAGMA synchronous=FULL", NULL, NULL, NULL); /* the database file is fsynced */
    }
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->stop && c->wal_pages == 0) pthread_cond_wait(&c->cv, &c->mu);
        if (c->stop) break;
        int pages = c->wal_pages;
        c->wal_pages = 0;
        uint64_t gen = c->asked;
        pthread_mutex_unlock(&c->mu);
        int log = 0, done = 0;
        int rc = db ? sqlite3_wal_checkpoint_v2(db, "main", SQLITE_CHECKPOINT_PASSIVE, &log, &done) : SQLITE_CANTOPEN;
        pthread_mutex_lock(&c->mu);
        c->ckpt_upto = log;
        c->st.passive++;
        if (rc != SQLITE_OK && rc != SQLITE_BUSY) c->st.errors++;
        if ((uint64_t)pages > c->st.max_wal_pages) c->st.max_wal_pages = (uint64_t)pages;
        c->finished = gen;
        pthread_cond_broadcast(&c->done_cv);
    }
    c->finished = c->asked; /* nobody waits for a stopped checkpointer */
    pthread_cond_broadcast(&c->done_cv);
    pthread_mutex_unlock(&c->mu);
    sqlite3_close_v2(db);
    return NULL;
}

/* After every commit on a connection (SQLite's WAL hook, on the committing thread, its locks released): the
 * log's WAL wakes the checkpointer thread (started the first time) when it grew by SQ_CKPT_PAGES since the last
 * checkpoint; at SQ_CKPT_LIMIT_PAGES the committing thread also waits (idle) until a checkpoint asked now has
 * ended: with no transaction running it copies the whole WAL (unless a reader still uses older pages), so the
 * next transaction starts the WAL over. An attached database's WAL (the snapshots) is checkpointed here as
 * SQLite's automatic checkpoint would (its commits are not the writer's). */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int pages) {
    sq_t *s = arg;
    if (strcmp(name, "main") != 0) {
        if (pages >= SQ_CKPT_PAGES) sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        return SQLITE_OK;
    }
    if (pages < g_ckpt_pages) return SQLITE_OK;
    sq_ckpt *c = &s->ck;
    pthread_mutex_lock(&c->mu);
    if (pages < c->ckpt_upto) c->ckpt_upto = 0; /* the WAL started over */
    bool at_limit = pages >= g_ckpt_limit;
    if (pages - c->ckpt_upto < g_ckpt_pages && !at_limit) {
        pthread_mutex_unlock(&c->mu);
        return SQLITE_OK;
    }
    if (!c->started && !c->stop && c->path) {
        if (pthread_create(&c->thread, NULL, ckpt_main, c) == 0) c->started = true;
    }
    bool started = c->started && !c->stop;
    if (started) {
        c->wal_pages = pages;
        uint64_t gen = ++c->asked;
        pthread_cond_signal(&c->cv);
        if (at_limit) {
            c->st.waits++;
            while (c->finished < gen) pthread_cond_wait(&c->done_cv, &c->mu);
        }
    }
    pthread_mutex_unlock(&c->mu);
    /* no thread (out of resources): checkpoint here rather than let the WAL grow */
    if (!started) sqlite3_wal_checkpoint_v2(db, "main", SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
}

static void ckpt_stop(sq_t *s) {
    sq_ckpt *c = &s->ck;
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_signal(&c->cv);
    bool started = c->started;
    pthread_mutex_unlock(&c->mu);
    if (started) pthread_join(c->thread, NULL);
}

int dx_ev_sqlite_ckpt_stats_get(void *st, dx_ev_sqlite_ckpt_stats *out) {
    sq_t *s = st;
    pthread_mutex_lock(&s->ck.mu);
    *out = s->ck.st;
    pthread_mutex_unlock(&s->ck.mu);
    return 0;
}

static void sq_close(void *st) {
    sq_t *s = st;
    if (!s) return;
    ckpt_stop(s); /* before the connection: the last one to close checkpoints what is left */
    for (int m = 0; m < SQ_NMULTI; m++) sqlite3_finalize(s->ins_multi[m]);
    sqlite3_stmt **all[] = {&s->hwm, &s->ins, &s->undo_multi, &s->find, &s->maxpos, &s->maxseq,
                            &s->putsnap, &s->getsnap, &s->begin, &s->begin_deferred, &s->commit, &s->rollback,
                            &s->lastmax, &s->probe, &s->posrange};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) sqlite3_finalize(*all[i]);
    sqlite3_close_v2(s->db);
    pthread_mutex_destroy(&s->ck.mu);
    pthread_cond_destroy(&s->ck.cv);
    pthread_cond_destroy(&s->ck.done_cv);
    free(s->ck.path);
    free(s);
}

static int prep(sq_t *s, const char *sql, sqlite3_stmt **out) {
    return sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL) == SQLITE_OK ? 0 : -1;
}

/* INSERT ... VALUES (?,...),(?,...) x sq_multi_rows[m]: row k's parameters are k*SQ_COLS+1 .. (k+1)*SQ_COLS,
 * in the order of bind_row. */
static int prep_multi(sq_t *s, int m) {
    char sql[256 + SQ_MULTI * (SQ_COLS * 2 + 4)];
    size_t o = (size_t)snprintf(sql, sizeof sql, "INSERT INTO events(position,session,sequence,ts_us,id,type,variable,"
                                                 "principal,changed_by,node,data,meta,tmax) VALUES");
    for (int k = 0; k < sq_multi_rows[m]; k++) {
        o += (size_t)snprintf(sql + o, sizeof sql - o, "%s(", k ? "," : "");
        for (int c = 0; c < SQ_COLS; c++) o += (size_t)snprintf(sql + o, sizeof sql - o, "%s?", c ? "," : "");
        o += (size_t)snprintf(sql + o, sizeof sql - o, ")");
    }
    snprintf(sql + o, sizeof sql - o, " ON CONFLICT(session,sequence) DO NOTHING");
    return prep(s, sql, &s->ins_multi[m]);
}

/* Whether index `name' is a full one of an earlier build (its SQL has no WHERE). */
static int index_is_full(sq_t *s, const char *name, int *full) {
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(s->db, "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1", -1, &q, NULL) !=
        SQLITE_OK)
        return -1;
    sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    int rc = sqlite3_step(q);
    const char *sql = rc == SQLITE_ROW ? (const char *)sqlite3_column_text(q, 0) : NULL;
    *full = sql && !strstr(sql, "WHERE");
    sqlite3_finalize(q);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : -1;
}

/* A log written by a build before an index became partial has the full one (every row in it): it is replaced,
 * once, in one transaction, at the first open by this build (the rows the partial index keeps are indexed
 * again; the time it takes grows with their number). Every other table and index is as it was, so an older log
 * opens and keeps every event; nothing is refused.
 * - events_principal: most events have no principal; the index keeps the rows that have one.
 * - events_type: most events of a DSPex log are `variable_updated' (every set); the index keeps the other types'
 *   rows. A query for variable_updated reads the rows in position order (of the session, of the time range, or
 *   all of them) and keeps that type's: where it is most of the rows that costs about what the index did, and
 *   each event written no longer pays the index's b-tree insert (0.3-0.6 us of the writer thread's 2.4-2.7 us
 *   per event, bench/events_sqlite_bench.c). */
static int migrate_partial_index(sq_t *s, const char *name, const char *create, char *err, size_t errlen) {
    int full = 0;
    if (index_is_full(s, name, &full)) return fail(s, "schema", err, errlen);
    if (!full) return 0;
    char *msg = NULL, drop[64];
    snprintf(drop, sizeof drop, "DROP INDEX %s;", name);
    if (sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, &msg) != SQLITE_OK) goto failed;
    if (index_is_full(s, name, &full)) goto failed; /* another connection may have done it meanwhile */
    if (full && (sqlite3_exec(s->db, drop, NULL, NULL, &msg) != SQLITE_OK ||
                 sqlite3_exec(s->db, create, NULL, NULL, &msg) != SQLITE_OK))
        goto failed;
    if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, &msg) != SQLITE_OK) goto failed;
    return 0;
failed:
    snprintf(err, errlen, "schema: %s: %s", name, msg ? msg : sqlite3_errmsg(s->db));
    sqlite3_free(msg);
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* The time index. Times are not in position order in general (a replica copies its owner's events with their
 * own times; a clock can step back), so instead of an index of every row's time (a b-tree insert per row: the
 * indexes beyond the first cost the writer about 1.2 us per event each, bench/events_sqlite_bench.c) each row
 * stores `tmax', the largest time of the rows up to its position (the writer assigns both, in order: a running
 * maximum, non-decreasing in position), and only the rows whose time is below it (late rows: rare) are indexed
 * (events_late, a partial index). A row with ts_us >= T has tmax >= T: it is at or after the first position
 * whose tmax >= T (found by a binary search on the rowid, see time_bound) or it is late; a row with
 * ts_us <= T and ts_us = tmax (not late) is before the first position whose tmax > T. So a time range is a
 * position range plus the late rows of that range of times (sq_query, sq_expire_before).
 * A log written before (a full events_ts index, no tmax column) is migrated at its first open by this build, in
 * one transaction: the column is added and filled in position order (every row is rewritten once: the time
 * grows with the log's size), events_ts dropped, events_late made. Nothing is refused. */
static int migrate_time_index(sq_t *s, char *err, size_t errlen) {
    char *msg = NULL;
    int has = 0;
    sqlite3_stmt *q = NULL;
    const char *col = "SELECT 1 FROM pragma_table_info('events') WHERE name = 'tmax'";
    if (sqlite3_prepare_v2(s->db, col, -1, &q, NULL) != SQLITE_OK) goto failed;
    has = sqlite3_step(q) == SQLITE_ROW;
    sqlite3_finalize(q);
    q = NULL;
    if (!has) {
        if (sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, &msg) != SQLITE_OK) goto failed;
        if (sqlite3_prepare_v2(s->db, col, -1, &q, NULL) != SQLITE_OK) goto failed_tx;
        has = sqlite3_step(q) == SQLITE_ROW; /* another connection may have done it meanwhile */
        sqlite3_finalize(q);
        q = NULL;
        if (!has && sqlite3_exec(s->db,
                                 "ALTER TABLE events ADD COLUMN tmax INTEGER;"
                                 "UPDATE events SET tmax = w.m FROM (SELECT position AS p, MAX(ts_us) OVER (ORDER BY"
                                 " position ROWS UNBOUNDED PRECEDING) AS m FROM events) AS w WHERE events.position = w.p;"
                                 "DROP INDEX IF EXISTS events_ts;"
                                 "CREATE INDEX IF NOT EXISTS events_late ON events(ts_us) WHERE ts_us < tmax;",
                                 NULL, NULL, &msg) != SQLITE_OK)
            goto failed_tx;
        if (sqlite3_exec(s->db, "COMMIT", NULL, NULL, &msg) != SQLITE_OK) goto failed_tx;
    }
    if (sqlite3_exec(s->db, "CREATE INDEX IF NOT EXISTS events_late ON events(ts_us) WHERE ts_us < tmax;", NULL, NULL,
                     &msg) != SQLITE_OK)
        goto failed;
    return 0;
failed_tx:
    sqlite3_finalize(q);
    snprintf(err, errlen, "schema: time index: %s", msg ? msg : sqlite3_errmsg(s->db));
    sqlite3_free(msg);
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
failed:
    snprintf(err, errlen, "schema: time index: %s", msg ? msg : sqlite3_errmsg(s->db));
    sqlite3_free(msg);
    return -1;
}

/* The first position p (of [lo, hi + 1]) such that the first row at or after p has tmax > t (strict) or
 * >= t (!strict), or there is none; tmax being non-decreasing in position, a binary search of rowid probes. */
static int time_bound(sq_t *s, int64_t t, int strict, uint64_t lo, uint64_t hi, uint64_t *out) {
    uint64_t a = lo, b = hi + 1;
    while (a < b) {
        uint64_t mid = a + (b - a) / 2;
        sqlite3_bind_int64(s->probe, 1, (sqlite3_int64)mid);
        int rc = sqlite3_step(s->probe);
        int yes = 1;
        if (rc == SQLITE_ROW) {
            int64_t tm = sqlite3_column_type(s->probe, 0) == SQLITE_NULL ? INT64_MAX : sqlite3_column_int64(s->probe, 0);
            yes = strict ? tm > t : tm >= t;
        }
        sqlite3_reset(s->probe);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE) return -1;
        if (yes) b = mid;
        else a = mid + 1;
    }
    *out = a;
    return 0;
}

/* A time range of a query over every session, as positions: [p0, p1) holds every row of the range that is not
 * late (see migrate_time_index). */
typedef struct {
    int on;
    uint64_t p0, p1;
} sq_trange;

static int time_range(sq_t *s, int64_t from, int64_t to, sq_trange *tr) {
    tr->on = 1;
    int rc = sqlite3_step(s->posrange);
    uint64_t lo = 0, hi = 0;
    int empty = rc != SQLITE_ROW || sqlite3_column_type(s->posrange, 0) == SQLITE_NULL;
    if (!empty) {
        lo = (uint64_t)sqlite3_column_int64(s->posrange, 0);
        hi = (uint64_t)sqlite3_column_int64(s->posrange, 1);
    }
    sqlite3_reset(s->posrange);
    if (rc != SQLITE_ROW) return -1;
    if (empty) {
        tr->p0 = tr->p1 = 0;
        return 0;
    }
    tr->p0 = lo;
    tr->p1 = hi + 1;
    if (from && time_bound(s, from, 0, lo, hi, &tr->p0)) return -1;
    if (to && time_bound(s, to, 1, lo, hi, &tr->p1)) return -1;
    return 0;
}

static int sq_open(const char *target, void **st, char *err, size_t errlen) {
    sq_t *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    *st = NULL;
    pthread_mutex_init(&s->ck.mu, NULL);
    pthread_cond_init(&s->ck.cv, NULL);
    pthread_cond_init(&s->ck.done_cv, NULL);
    s->ck.path = strdup(target);
    if (sqlite3_open_v2(target, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) !=
        SQLITE_OK) {
        fail(s, "open", err, errlen);
        sq_close(s);
        return -1;
    }
    sqlite3_busy_timeout(s->db, 5000);
    char *msg = NULL;
    sqlite3_stmt *att = NULL;
    char *snapfile = sqlite3_mprintf("%s-snapshots", target);
    int arc = snapfile && sqlite3_prepare_v2(s->db, "ATTACH DATABASE ?1 AS snap", -1, &att, NULL) == SQLITE_OK &&
                      sqlite3_bind_text(att, 1, snapfile, -1, SQLITE_TRANSIENT) == SQLITE_OK &&
                      sqlite3_step(att) == SQLITE_DONE;
    sqlite3_finalize(att);
    sqlite3_free(snapfile);
    if (!arc) {
        fail(s, "attach snapshots", err, errlen);
        sq_close(s);
        return -1;
    }
    /* SQLite's default 4 KiB pages: 16 KiB ones took a quarter less CPU per event in large batches (fewer WAL
     * frames and write calls) but made a small sync commit (16 events) some 40% slower (more bytes to write
     * and fsync per commit), and sync commits are the latency that callers wait for */
    /* a 16 MiB page cache (SQLite's default is 2 MiB): the writer's inserts find more of the pages they touch in
     * memory instead of reading them back from the WAL (some 0.1-0.3 us less system time per event in batches
     * of 8 192; bench/events_sqlite_bench.c); it fills only as far as a connection's work needs */
    if (sqlite3_exec(s->db, "PRAGMA main.journal_mode=WAL; PRAGMA main.synchronous=FULL; PRAGMA main.cache_size=-16384;",
                     NULL, NULL, &msg) !=
            SQLITE_OK ||
        sqlite3_exec(s->db, SCHEMA, NULL, NULL, &msg) != SQLITE_OK ||
        sqlite3_exec(s->db, SNAP_SCHEMA, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "schema: %s", msg ? msg : sqlite3_errmsg(s->db));
        sqlite3_free(msg);
        sq_close(s);
        return -1;
    }
    if (migrate_partial_index(s, "events_principal", PRINCIPAL_INDEX, err, errlen) ||
        migrate_partial_index(s, "events_type", TYPE_INDEX, err, errlen) || migrate_time_index(s, err, errlen)) {
        sq_close(s);
        return -1;
    }
    if (prep(s, "INSERT INTO meta(k, v) VALUES('position', ?1) ON CONFLICT(k) DO UPDATE SET v = MAX(v, ?1)",
             &s->hwm) ||
        prep(s, "INSERT INTO events(position,session,sequence,ts_us,id,type,variable,principal,changed_by,node,data,meta,"
                "tmax) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(session,sequence) DO NOTHING", &s->ins) ||
        prep(s, "SELECT tmax FROM events ORDER BY position DESC LIMIT 1", &s->lastmax) ||
        prep(s, "SELECT tmax FROM events WHERE position >= ?1 ORDER BY position LIMIT 1", &s->probe) ||
        prep(s, "SELECT MIN(position), MAX(position) FROM events", &s->posrange) ||
        prep_multi(s, 0) || prep_multi(s, 1) || prep_multi(s, 2) || prep_multi(s, 3) ||
        prep(s, "DELETE FROM events WHERE position BETWEEN ?1 AND ?2", &s->undo_multi) ||
        prep(s, "SELECT position FROM events WHERE session=? AND sequence=?", &s->find) ||
        prep(s, "SELECT MAX(COALESCE((SELECT MAX(position) FROM events), 0),"
                " COALESCE((SELECT v FROM meta WHERE k = 'position'), 0))", &s->maxpos) ||
        prep(s, "SELECT COALESCE(MAX(sequence),0) FROM events WHERE session=?", &s->maxseq) ||
        prep(s, "INSERT OR REPLACE INTO snap.snapshots(session,sequence,ts_us,blob) VALUES(?,?,?,?)", &s->putsnap) ||
        prep(s, "SELECT sequence, ts_us, blob FROM snap.snapshots WHERE session=?1"
                " AND (?2 = 0 OR sequence <= ?2) AND (?3 = 0 OR ts_us <= ?3) ORDER BY sequence DESC LIMIT 1",
             &s->getsnap) ||
        prep(s, "BEGIN IMMEDIATE", &s->begin) || prep(s, "BEGIN", &s->begin_deferred) || prep(s, "COMMIT", &s->commit) || prep(s, "ROLLBACK", &s->rollback)) {
        fail(s, "prepare", err, errlen);
        sq_close(s);
        return -1;
    }
    /* replaces SQLite's automatic checkpoint (which is a WAL hook too) */
    if (!g_ckpt_inline) sqlite3_wal_hook(s->db, wal_hook, s);
    *st = s;
    return 0;
}

static int sq_max_position(void *st, uint64_t *pos, char *err, size_t errlen);

static int step_done(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

static void bind_blob(sqlite3_stmt *st, int i, const void *p, size_t n) {
    sqlite3_bind_blob64(st, i, n ? p : "", n, SQLITE_STATIC);
}

/* Binds one record at parameters b+1 .. b+SQ_COLS (position, session, sequence, ts_us, id, type, variable,
 * principal, changed_by, node, data, meta, tmax). */
static void bind_row(sqlite3_stmt *q, int b, const dx_ev_rec *r, uint64_t position, int64_t tmax) {
    sqlite3_bind_int64(q, b + 1, (sqlite3_int64)position);
    bind_blob(q, b + 2, r->session, r->session_len);
    sqlite3_bind_int64(q, b + 3, (sqlite3_int64)r->sequence);
    sqlite3_bind_int64(q, b + 4, r->ts_us);
    sqlite3_bind_text(q, b + 5, r->id, 36, SQLITE_STATIC);
    sqlite3_bind_text(q, b + 6, r->type, (int)r->type_len, SQLITE_STATIC);
    bind_blob(q, b + 7, r->variable, r->variable_len);
    bind_blob(q, b + 8, r->principal, r->principal_len);
    bind_blob(q, b + 9, r->changed_by, r->changed_by_len);
    bind_blob(q, b + 10, r->node, r->node_len);
    bind_blob(q, b + 11, r->data, r->data_len);
    bind_blob(q, b + 12, r->meta, r->meta_len);
    sqlite3_bind_int64(q, b + 13, tmax);
}

static int sq_write_batch(void *st, dx_ev_rec *r, size_t n, char *err, size_t errlen) {
    sq_t *s = st;
    /* deferred: the first insert locks the events file only (not the attached snapshots) */
    if (step_done(s->begin_deferred)) return fail(s, "begin", err, errlen);
    /* a write first: it takes the events file's write lock waiting (the busy handler) for whoever holds it (a
     * RESTART checkpoint, a retention delete). A read first would open a read transaction, and SQLite does not
     * call the busy handler to upgrade one to a write: the batch would fail at once with "database is locked" */
    sqlite3_bind_int64(s->hwm, 1, 0);
    if (step_done(s->hwm)) {
        fail(s, "begin", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    /* the high-water mark as stored now (another instance may have written since this one last did) */
    uint64_t next;
    if (sq_max_position(s, &next, err, errlen)) {
        step_done(s->rollback);
        return -1;
    }
    /* the running maximum of the times in position order (see migrate_time_index): the last row's */
    int64_t tm = INT64_MIN;
    int lrc = sqlite3_step(s->lastmax);
    if (lrc == SQLITE_ROW && sqlite3_column_type(s->lastmax, 0) != SQLITE_NULL) tm = sqlite3_column_int64(s->lastmax, 0);
    sqlite3_reset(s->lastmax);
    if (lrc != SQLITE_ROW && lrc != SQLITE_DONE) {
        fail(s, "insert", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    size_t i = 0;
    /* SQ_MULTI rows a statement while they all go in (the normal case); a chunk in which some row was stored
     * already (a retried batch) is taken out again and written row by row below, so that every record gets
     * its position (the stored one, or the next) and positions stay gapless */
    for (int m = 0, whole = 1; m < SQ_NMULTI && whole; m++) {
        const int rows = sq_multi_rows[m];
        for (; n - i >= (size_t)rows; i += (size_t)rows) {
            sqlite3_stmt *q = s->ins_multi[m];
            int64_t tk = tm;
            for (int k = 0; k < rows; k++) {
                if (r[i + k].ts_us > tk) tk = r[i + k].ts_us;
                bind_row(q, k * SQ_COLS, &r[i + k], next + 1 + (uint64_t)k, tk);
            }
            int rc = sqlite3_step(q);
            sqlite3_reset(q);
            if (rc != SQLITE_DONE) {
                fail(s, "insert", err, errlen);
                step_done(s->rollback);
                return -1;
            }
            if (sqlite3_changes(s->db) != rows) {
                sqlite3_bind_int64(s->undo_multi, 1, (sqlite3_int64)(next + 1));
                sqlite3_bind_int64(s->undo_multi, 2, (sqlite3_int64)(next + (uint64_t)rows));
                if (step_done(s->undo_multi)) {
                    fail(s, "insert", err, errlen);
                    step_done(s->rollback);
                    return -1;
                }
                whole = 0; /* the rest row by row */
                break;
            }
            for (int k = 0; k < rows; k++) r[i + k].position = ++next;
            tm = tk;
        }
    }
    for (; i < n; i++) {
        sqlite3_stmt *q = s->ins;
        int64_t tk = r[i].ts_us > tm ? r[i].ts_us : tm;
        bind_row(q, 0, &r[i], next + 1, tk);
        if (sqlite3_step(q) != SQLITE_DONE) {
            fail(s, "insert", err, errlen);
            sqlite3_reset(q);
            step_done(s->rollback);
            return -1;
        }
        sqlite3_reset(q);
        if (sqlite3_changes(s->db) == 1) {
            r[i].position = ++next;
            tm = tk;
        } else { /* already stored (a retry): report where */
            bind_blob(s->find, 1, r[i].session, r[i].session_len);
            sqlite3_bind_int64(s->find, 2, (sqlite3_int64)r[i].sequence);
            int rc = sqlite3_step(s->find);
            r[i].position = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(s->find, 0) : 0;
            sqlite3_reset(s->find);
            if (rc != SQLITE_ROW) {
                fail(s, "find", err, errlen);
                step_done(s->rollback);
                return -1;
            }
        }
    }
    sqlite3_bind_int64(s->hwm, 1, (sqlite3_int64)next);
    if (step_done(s->hwm) || step_done(s->commit)) {
        fail(s, "commit", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    return 0;
}

static int sq_max_position(void *st, uint64_t *pos, char *err, size_t errlen) {
    sq_t *s = st;
    int rc = sqlite3_step(s->maxpos);
    if (rc == SQLITE_ROW) *pos = (uint64_t)sqlite3_column_int64(s->maxpos, 0);
    sqlite3_reset(s->maxpos);
    return rc == SQLITE_ROW ? 0 : fail(s, "max_position", err, errlen);
}

static int sq_session_max_seq(void *st, const char *session, size_t len, uint64_t *seq, char *err, size_t errlen) {
    sq_t *s = st;
    bind_blob(s->maxseq, 1, session, len);
    int rc = sqlite3_step(s->maxseq);
    if (rc == SQLITE_ROW) *seq = (uint64_t)sqlite3_column_int64(s->maxseq, 0);
    sqlite3_reset(s->maxseq);
    return rc == SQLITE_ROW ? 0 : fail(s, "session_max_seq", err, errlen);
}

/* Fills r from a row of SELECT position,sequence,ts_us,id,session,type,variable,principal,changed_by,node,data,meta */
static void row_rec(sqlite3_stmt *q, dx_ev_rec *r) {
    memset(r, 0, sizeof *r);
    r->position = (uint64_t)sqlite3_column_int64(q, 0);
    r->sequence = (uint64_t)sqlite3_column_int64(q, 1);
    r->ts_us = sqlite3_column_int64(q, 2);
    const unsigned char *id = sqlite3_column_text(q, 3);
    size_t idn = id ? (size_t)sqlite3_column_bytes(q, 3) : 0;
    if (idn > sizeof r->id - 1) idn = sizeof r->id - 1;
    if (idn) memcpy(r->id, id, idn); /* a copy per row: snprintf("%s") was 1% of a replay */
    r->id[idn] = 0;
#define COL(i, f, T)                                     \
    r->f = (T)sqlite3_column_blob(q, i);                 \
    r->f##_len = (size_t)sqlite3_column_bytes(q, i);
    COL(4, session, const char *)
    COL(5, type, const char *)
    COL(6, variable, const char *)
    COL(7, principal, const char *)
    COL(8, changed_by, const char *)
    COL(9, node, const char *)
    COL(10, data, const uint8_t *)
    COL(11, meta, const uint8_t *)
#undef COL
}

#define COLS "position,sequence,ts_us,id,session,type,variable,principal,changed_by,node,data,meta"

/* The SQL of a query (sq_query, dx_ev_sqlite_query_plan); 0, or -1 with err. */
static int query_sql(const dx_ev_query *qq, const sq_trange *tr, char *sql, size_t len, char *err, size_t errlen) {
    /* lean (the replays): the columns not needed as NULL, not read from the row */
    size_t o = (size_t)snprintf(sql, len, "SELECT %s FROM events WHERE 1",
                                qq->lean ? "position,sequence,ts_us,NULL,NULL,type,NULL,NULL,NULL,NULL,data,NULL" : COLS);
    if (qq->session_len) o += (size_t)snprintf(sql + o, len - o, " AND session=?1");
    if (qq->seq_from) o += (size_t)snprintf(sql + o, len - o, " AND sequence>=?2");
    if (qq->seq_to) o += (size_t)snprintf(sql + o, len - o, " AND sequence<=?3");
    if (qq->pos_from) o += (size_t)snprintf(sql + o, len - o, " AND position>=?4");
    if (qq->pos_to) o += (size_t)snprintf(sql + o, len - o, " AND position<=?5");
    if (qq->ts_from) o += (size_t)snprintf(sql + o, len - o, " AND ts_us>=?6");
    if (qq->ts_to) o += (size_t)snprintf(sql + o, len - o, " AND ts_us<=?7");
    /* every session's events of a time range: the rows of a position range, and the late rows of the time range
     * (migrate_time_index); one session's go through (session, sequence), their times a filter */
    /* (the late rows' range has both ends, an open one as the extreme value: SQLite takes a range open on one
     * side for a large share of the index and would rather scan the table) */
    if (tr->on)
        o += (size_t)snprintf(sql + o, len - o, " AND (position>=%llu AND position<%llu OR ts_us<tmax AND ts_us>=%s"
                              " AND ts_us<=%s)", (unsigned long long)tr->p0, (unsigned long long)tr->p1,
                              qq->ts_from ? "?6" : "-9223372036854775808", qq->ts_to ? "?7" : "9223372036854775807");
    /* the principal index holds only the rows with a principal (a filter always names one): SQLite uses a
     * partial index only when the query's WHERE holds the index's own condition, so it is repeated here */
    if (qq->principal_len) o += (size_t)snprintf(sql + o, len - o, " AND principal=?8 AND principal <> x''");
    if (qq->variable_len) o += (size_t)snprintf(sql + o, len - o, " AND variable=?9");
    if (qq->ntypes > 64) {
        snprintf(err, errlen, "too many types");
        return -1;
    }
    if (qq->ntypes) {
        o += (size_t)snprintf(sql + o, len - o, " AND type IN (");
        for (size_t i = 0; i < qq->ntypes; i++)
            o += (size_t)snprintf(sql + o, len - o, "%s?%zu", i ? "," : "", 10 + i);
        o += (size_t)snprintf(sql + o, len - o, ")");
        /* types that all have rows in the partial type index: say so, for SQLite to use it (a list with
         * variable_updated reads the rows in order instead: migrate_partial_index) */
        int indexed = 1;
        for (size_t i = 0; i < qq->ntypes; i++)
            indexed &= !(qq->type_lens[i] == sizeof TYPE_UNINDEXED - 1 &&
                          !memcmp(qq->types[i], TYPE_UNINDEXED, sizeof TYPE_UNINDEXED - 1));
        if (indexed) o += (size_t)snprintf(sql + o, len - o, " AND type <> '" TYPE_UNINDEXED "'");
    }
    /* one session's events: by sequence (backend.h), which is their position order here (one writer numbers and
     * stores them in commit order): the (session, sequence) index hands the rows over in that order, where
     * ORDER BY position made SQLite copy every row of the range into a temporary B-tree and sort it */
    o += (size_t)snprintf(sql + o, len - o, " ORDER BY %s %s", qq->session_len ? "sequence" : "position",
                          qq->descending ? "DESC" : "ASC");
    if (qq->limit) snprintf(sql + o, len - o, " LIMIT %zu", qq->limit);
    return 0;
}

static void query_bind(sqlite3_stmt *q, const dx_ev_query *qq) {
    if (qq->session_len) bind_blob(q, 1, qq->session, qq->session_len);
    if (qq->seq_from) sqlite3_bind_int64(q, 2, (sqlite3_int64)qq->seq_from);
    if (qq->seq_to) sqlite3_bind_int64(q, 3, (sqlite3_int64)qq->seq_to);
    if (qq->pos_from) sqlite3_bind_int64(q, 4, (sqlite3_int64)qq->pos_from);
    if (qq->pos_to) sqlite3_bind_int64(q, 5, (sqlite3_int64)qq->pos_to);
    if (qq->ts_from) sqlite3_bind_int64(q, 6, qq->ts_from);
    if (qq->ts_to) sqlite3_bind_int64(q, 7, qq->ts_to);
    if (qq->principal_len) bind_blob(q, 8, qq->principal, qq->principal_len);
    if (qq->variable_len) bind_blob(q, 9, qq->variable, qq->variable_len);
    for (size_t i = 0; i < qq->ntypes; i++)
        sqlite3_bind_text(q, (int)(10 + i), qq->types[i], (int)qq->type_lens[i], SQLITE_STATIC);
}

static int sq_query(void *st, const dx_ev_query *qq, dx_ev_row_cb cb, void *ctx, char *err, size_t errlen) {
    sq_t *s = st;
    char sql[1200 + 8 * 64];
    sq_trange tr = {0};
    /* the time range's positions and the rows: one read transaction */
    int tx = !qq->session_len && (qq->ts_from || qq->ts_to) && sqlite3_get_autocommit(s->db);
    if (tx && step_done(s->begin_deferred)) return fail(s, "query", err, errlen);
    if (!qq->session_len && (qq->ts_from || qq->ts_to) && time_range(s, qq->ts_from, qq->ts_to, &tr)) {
        fail(s, "query", err, errlen);
        if (tx) step_done(s->rollback);
        return -1;
    }
    sqlite3_stmt *q = NULL;
    if (query_sql(qq, &tr, sql, sizeof sql, err, errlen)) {
        if (tx) step_done(s->rollback);
        return -1;
    }
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK) {
        fail(s, "query", err, errlen);
        if (tx) step_done(s->rollback);
        return -1;
    }
    query_bind(q, qq);
    int rc;
    dx_ev_rec r;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        row_rec(q, &r);
        if (cb(ctx, &r)) {
            rc = SQLITE_DONE;
            break;
        }
    }
    int ret = rc == SQLITE_DONE ? 0 : fail(s, "query", err, errlen);
    sqlite3_finalize(q);
    if (tx) step_done(s->commit);
    return ret;
}

int dx_ev_sqlite_query_plan(void *st, const dx_ev_query *qq, char *out, size_t outlen, char *err, size_t errlen) {
    sq_t *s = st;
    char sql[1300 + 8 * 64];
    size_t o = (size_t)snprintf(sql, sizeof sql, "EXPLAIN QUERY PLAN ");
    sq_trange tr = {0};
    if (!qq->session_len && (qq->ts_from || qq->ts_to) && time_range(s, qq->ts_from, qq->ts_to, &tr))
        return fail(s, "query plan", err, errlen);
    if (query_sql(qq, &tr, sql + o, sizeof sql - o, err, errlen)) return -1;
    sqlite3_stmt *q;
    if (sqlite3_prepare_v2(s->db, sql, -1, &q, NULL) != SQLITE_OK) return fail(s, "query plan", err, errlen);
    query_bind(q, qq);
    size_t w = 0;
    out[0] = 0;
    int rc;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        const char *d = (const char *)sqlite3_column_text(q, 3);
        if (w < outlen) w += (size_t)snprintf(out + w, outlen - w, "%s%s", w ? "; " : "", d ? d : "");
    }
    sqlite3_finalize(q);
    return rc == SQLITE_DONE ? 0 : fail(s, "query plan", err, errlen);
}

static int sq_put_snapshot(void *st, const dx_ev_snapshot *sn, char *err, size_t errlen) {
    sq_t *s = st;
    bind_blob(s->putsnap, 1, sn->session, sn->session_len);
    sqlite3_bind_int64(s->putsnap, 2, (sqlite3_int64)sn->sequence);
    sqlite3_bind_int64(s->putsnap, 3, sn->ts_us);
    bind_blob(s->putsnap, 4, sn->blob, sn->blob_len);
    return step_done(s->putsnap) ? fail(s, "put_snapshot", err, errlen) : 0;
}

/* One transaction for the snapshotter's snapshots of a replay: a transaction per snapshot took some 100 us each
 * (its WAL frames, locks and index), most of the cost of storing one. Deferred: the first insert locks the
 * attached snapshots database only, never the events (the writer's). */
static int sq_put_snapshots(void *st, const dx_ev_snapshot *sn, size_t n, char *err, size_t errlen) {
    sq_t *s = st;
    if (step_done(s->begin_deferred)) return fail(s, "put_snapshots", err, errlen);
    for (size_t i = 0; i < n; i++)
        if (sq_put_snapshot(st, &sn[i], err, errlen)) {
            (void)step_done(s->rollback);
            return -1;
        }
    if (step_done(s->commit)) {
        fail(s, "put_snapshots", err, errlen);
        (void)step_done(s->rollback);
        return -1;
    }
    return 0;
}

static int sq_latest_snapshot(void *st, const char *session, size_t len, uint64_t max_seq, int64_t max_ts,
                              dx_ev_snap_cb cb, void *ctx, char *err, size_t errlen) {
    sq_t *s = st;
    sqlite3_stmt *q = s->getsnap;
    bind_blob(q, 1, session, len);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)max_seq);
    sqlite3_bind_int64(q, 3, max_ts);
    int rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        dx_ev_snapshot sn = {session, len, (uint64_t)sqlite3_column_int64(q, 0), sqlite3_column_int64(q, 1),
                             sqlite3_column_blob(q, 2), (size_t)sqlite3_column_bytes(q, 2)};
        cb(ctx, &sn);
    }
    sqlite3_reset(q);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : fail(s, "latest_snapshot", err, errlen);
}

static int sq_expire_before(void *st, int64_t ts_us, uint64_t pos_from, uint64_t pos_to, dx_ev_row_cb cb, void *ctx,
                            char *err, size_t errlen) {
    sq_t *s = st;
    if (step_done(s->begin)) return fail(s, "begin", err, errlen);
    /* rows older than ts_us: those before the first position whose tmax >= ts_us, and the late ones (see
     * migrate_time_index) */
    sq_trange tr = {0};
    if (ts_us > 0 && time_range(s, ts_us, 0, &tr)) {
        fail(s, "expire", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    char where[200];
    snprintf(where, sizeof where,
             "WHERE (position < %llu OR ts_us < tmax AND ts_us < ?1) AND ts_us < ?1 AND position BETWEEN ?2 AND ?3",
             (unsigned long long)(ts_us > 0 ? tr.p0 : 0));
    /* positions are below 2^63 (rowids): a larger bound is no bound */
    sqlite3_int64 lo = pos_from > INT64_MAX ? INT64_MAX : (sqlite3_int64)pos_from,
                  hi = pos_to > INT64_MAX ? INT64_MAX : (sqlite3_int64)pos_to;
    char sel[400];
    snprintf(sel, sizeof sel, "SELECT " COLS " FROM events %s ORDER BY position", where);
    sqlite3_stmt *q;
    if (sqlite3_prepare_v2(s->db, sel, -1, &q, NULL) != SQLITE_OK) {
        fail(s, "expire", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    sqlite3_bind_int64(q, 1, ts_us);
    sqlite3_bind_int64(q, 2, lo);
    sqlite3_bind_int64(q, 3, hi);
    int rc, stopped = 0;
    dx_ev_rec r;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        row_rec(q, &r);
        if (cb(ctx, &r)) {
            stopped = 1;
            break;
        }
    }
    sqlite3_finalize(q);
    if (stopped || rc != SQLITE_DONE) {
        if (stopped) snprintf(err, errlen, "archiving failed");
        else fail(s, "expire", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    char sql[400];
    /* snapshots stay: state_at keeps working from the oldest event still in the log */
    snprintf(sql, sizeof sql, "DELETE FROM events %s", where);
    sqlite3_stmt *d = NULL;
    int drc = sqlite3_prepare_v2(s->db, sql, -1, &d, NULL) == SQLITE_OK &&
              sqlite3_bind_int64(d, 1, ts_us) == SQLITE_OK && sqlite3_bind_int64(d, 2, lo) == SQLITE_OK &&
              sqlite3_bind_int64(d, 3, hi) == SQLITE_OK && sqlite3_step(d) == SQLITE_DONE;
    sqlite3_finalize(d);
    if (!drc || step_done(s->commit)) {
        fail(s, "expire", err, errlen);
        step_done(s->rollback);
        return -1;
    }
    return 0;
}

const dx_ev_backend_ops dx_ev_sqlite_ops = {
    .name = "sqlite",
    .open = sq_open,
    .write_batch = sq_write_batch,
    .query = sq_query,
    .max_position = sq_max_position,
    .session_max_seq = sq_session_max_seq,
    .put_snapshot = sq_put_snapshot,
    .put_snapshots = sq_put_snapshots,
    .latest_snapshot = sq_latest_snapshot,
    .expire_before = sq_expire_before,
    .close = sq_close,
};
