/* The event writer's spool on SQLite (see spool.h). */
#include "spool.h"
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct dx_spool {
    sqlite3 *db;
    sqlite3_stmt *ins, *peek, *pop, *count, *begin, *commit, *rollback, *mark, *renum, *unmark;
};

static const char *SCHEMA =
    "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;"
    "CREATE TABLE IF NOT EXISTS spool("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, session BLOB NOT NULL, sequence INTEGER NOT NULL,"
    " ts_us INTEGER NOT NULL, uid TEXT NOT NULL, type BLOB NOT NULL, variable BLOB NOT NULL,"
    " principal BLOB NOT NULL, changed_by BLOB NOT NULL, node BLOB NOT NULL, data BLOB NOT NULL,"
    " meta BLOB NOT NULL);"
    /* sessions whose spooled records are numbered provisionally (from 1: the backend's last sequence of
     * the session was unknown); they are renumbered before any of them is moved */
    "CREATE TABLE IF NOT EXISTS provisional(session BLOB PRIMARY KEY);"
    "CREATE INDEX IF NOT EXISTS spool_session ON spool(session);";

static int fail(dx_spool *s, const char *what, char *err, size_t errlen) {
    snprintf(err, errlen, "spool %s: %s", what, s && s->db ? sqlite3_errmsg(s->db) : "no database");
    return -1;
}

void dx_spool_close(dx_spool *s) {
    if (!s) return;
    sqlite3_stmt *all[] = {s->ins, s->peek, s->pop, s->count, s->begin, s->commit, s->rollback, s->mark, s->renum,
                           s->unmark};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) sqlite3_finalize(all[i]);
    sqlite3_close_v2(s->db);
    free(s);
}

static int prep(dx_spool *s, const char *sql, sqlite3_stmt **out) {
    return sqlite3_prepare_v3(s->db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL) == SQLITE_OK ? 0 : -1;
}

int dx_spool_open(const char *path, dx_spool **out, char *err, size_t errlen) {
    dx_spool *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (sqlite3_open_v2(path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) !=
        SQLITE_OK) {
        fail(s, "open", err, errlen);
        dx_spool_close(s);
        return -1;
    }
    sqlite3_busy_timeout(s->db, 5000);
    if (sqlite3_exec(s->db, SCHEMA, NULL, NULL, NULL) != SQLITE_OK ||
        prep(s, "INSERT INTO spool(session, sequence, ts_us, uid, type, variable, principal, changed_by, node,"
                " data, meta) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)", &s->ins) ||
        prep(s, "SELECT id, session, sequence, ts_us, uid, type, variable, principal, changed_by, node, data, meta"
                " FROM spool ORDER BY id LIMIT ?1", &s->peek) ||
        prep(s, "DELETE FROM spool WHERE id <= ?1", &s->pop) ||
        prep(s, "SELECT count(*) FROM spool", &s->count) ||
        prep(s, "BEGIN IMMEDIATE", &s->begin) || prep(s, "COMMIT", &s->commit) ||
        prep(s, "ROLLBACK", &s->rollback) ||
        prep(s, "INSERT OR IGNORE INTO provisional(session) VALUES(?1)", &s->mark) ||
        prep(s, "UPDATE spool SET sequence = sequence + ?2 WHERE session = ?1", &s->renum) ||
        prep(s, "DELETE FROM provisional WHERE session = ?1", &s->unmark)) {
        fail(s, "schema", err, errlen);
        dx_spool_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

static int step_reset(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc;
}

static int blob(sqlite3_stmt *st, int i, const void *p, size_t n) {
    /* zero-length blobs stay non-NULL (the columns are NOT NULL) */
    return sqlite3_bind_blob64(st, i, n ? p : "", n, SQLITE_STATIC) == SQLITE_OK ? 0 : -1;
}

int dx_spool_append(dx_spool *s, const dx_ev_rec *recs, size_t n, char *err, size_t errlen) {
    if (step_reset(s->begin) != SQLITE_DONE) return fail(s, "begin", err, errlen);
    for (size_t i = 0; i < n; i++) {
        const dx_ev_rec *r = &recs[i];
        sqlite3_stmt *st = s->ins;
        int bad = blob(st, 1, r->session, r->session_len) ||
                  sqlite3_bind_int64(st, 2, (sqlite3_int64)r->sequence) != SQLITE_OK ||
                  sqlite3_bind_int64(st, 3, r->ts_us) != SQLITE_OK ||
                  sqlite3_bind_text(st, 4, r->id, -1, SQLITE_STATIC) != SQLITE_OK ||
                  blob(st, 5, r->type, r->type_len) || blob(st, 6, r->variable, r->variable_len) ||
                  blob(st, 7, r->principal, r->principal_len) || blob(st, 8, r->changed_by, r->changed_by_len) ||
                  blob(st, 9, r->node, r->node_len) || blob(st, 10, r->data, r->data_len) ||
                  blob(st, 11, r->meta, r->meta_len);
        if (bad || step_reset(st) != SQLITE_DONE) {
            fail(s, "append", err, errlen);
            sqlite3_clear_bindings(st);
            step_reset(s->rollback);
            return -1;
        }
        sqlite3_clear_bindings(st);
    }
    if (step_reset(s->commit) != SQLITE_DONE) {
        fail(s, "commit", err, errlen);
        step_reset(s->rollback);
        return -1;
    }
    return 0;
}

int dx_spool_count(dx_spool *s, uint64_t *n, char *err, size_t errlen) {
    if (sqlite3_step(s->count) != SQLITE_ROW) {
        sqlite3_reset(s->count);
        return fail(s, "count", err, errlen);
    }
    *n = (uint64_t)sqlite3_column_int64(s->count, 0);
    sqlite3_reset(s->count);
    return 0;
}

void dx_spool_batch_free(dx_spool_batch *b) {
    for (size_t i = 0; i < b->n; i++) free(b->mem[i]);
    free(b->mem);
    free(b->recs);
    memset(b, 0, sizeof *b);
}

/* Copies column i into p, returns the pointer to it and advances p. */
static const char *take(sqlite3_stmt *st, int i, char **p, size_t *len) {
    const void *src = sqlite3_column_blob(st, i);
    size_t n = (size_t)sqlite3_column_bytes(st, i);
    char *dst = *p;
    if (n) memcpy(dst, src, n);
    *p += n;
    *len = n;
    return dst;
}

int dx_spool_peek(dx_spool *s, size_t max, dx_spool_batch *b, char *err, size_t errlen) {
    memset(b, 0, sizeof *b);
    if (!max) return 0;
    b->recs = calloc(max, sizeof *b->recs);
    b->mem = calloc(max, sizeof *b->mem);
    if (!b->recs || !b->mem) {
        dx_spool_batch_free(b);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    sqlite3_stmt *st = s->peek;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)max);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        size_t total = 0;
        for (int c = 1; c <= 11; c++) total += (size_t)sqlite3_column_bytes(st, c);
        char *m = malloc(total ? total : 1), *p = m;
        if (!m) {
            sqlite3_reset(st);
            dx_spool_batch_free(b);
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        dx_ev_rec *r = &b->recs[b->n];
        b->mem[b->n++] = m;
        b->last_id = (uint64_t)sqlite3_column_int64(st, 0);
        size_t len;
        r->session = take(st, 1, &p, &r->session_len);
        r->sequence = (uint64_t)sqlite3_column_int64(st, 2);
        r->ts_us = sqlite3_column_int64(st, 3);
        const unsigned char *uid = sqlite3_column_text(st, 4);
        snprintf(r->id, sizeof r->id, "%s", uid ? (const char *)uid : "");
        r->type = take(st, 5, &p, &r->type_len);
        r->variable = take(st, 6, &p, &r->variable_len);
        r->principal = take(st, 7, &p, &r->principal_len);
        r->changed_by = take(st, 8, &p, &r->changed_by_len);
        r->node = take(st, 9, &p, &r->node_len);
        r->data = (const uint8_t *)take(st, 10, &p, &len);
        r->data_len = len;
        r->meta = (const uint8_t *)take(st, 11, &p, &len);
        r->meta_len = len;
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        dx_spool_batch_free(b);
        return fail(s, "read", err, errlen);
    }
    return 0;
}

int dx_spool_pop(dx_spool *s, uint64_t upto, char *err, size_t errlen) {
    sqlite3_bind_int64(s->pop, 1, (sqlite3_int64)upto);
    int rc = step_reset(s->pop);
    sqlite3_clear_bindings(s->pop);
    return rc == SQLITE_DONE ? 0 : fail(s, "delete", err, errlen);
}

int dx_spool_sessions(dx_spool *s,
                      void (*cb)(void *ctx, const char *session, size_t len, uint64_t max_seq, int provisional),
                      void *ctx, char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    /* a provisional mark without records (the batch after it was never appended) counts as 0 */
    if (sqlite3_prepare_v2(s->db,
                           "SELECT session, max(sequence), max(prov) FROM ("
                           " SELECT session, sequence, 0 AS prov FROM spool"
                           " UNION ALL SELECT session, 0, 1 FROM provisional) GROUP BY session",
                           -1, &st, NULL) != SQLITE_OK)
        return fail(s, "sessions", err, errlen);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        cb(ctx, sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0),
           (uint64_t)sqlite3_column_int64(st, 1), sqlite3_column_int(st, 2));
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : fail(s, "sessions", err, errlen);
}

int dx_spool_mark_provisional(dx_spool *s, const char *session, size_t len, char *err, size_t errlen) {
    int bad = blob(s->mark, 1, session, len);
    int rc = bad ? SQLITE_ERROR : step_reset(s->mark);
    sqlite3_clear_bindings(s->mark);
    return rc == SQLITE_DONE ? 0 : fail(s, "mark", err, errlen);
}

int dx_spool_renumber(dx_spool *s, const char *session, size_t len, uint64_t offset, char *err, size_t errlen) {
    if (step_reset(s->begin) != SQLITE_DONE) return fail(s, "begin", err, errlen);
    int bad = blob(s->renum, 1, session, len) || sqlite3_bind_int64(s->renum, 2, (sqlite3_int64)offset) != SQLITE_OK;
    int rc = bad ? SQLITE_ERROR : step_reset(s->renum);
    sqlite3_clear_bindings(s->renum);
    if (rc == SQLITE_DONE) {
        rc = blob(s->unmark, 1, session, len) ? SQLITE_ERROR : step_reset(s->unmark);
        sqlite3_clear_bindings(s->unmark);
    }
    if (rc != SQLITE_DONE || step_reset(s->commit) != SQLITE_DONE) {
        fail(s, "renumber", err, errlen);
        step_reset(s->rollback);
        return -1;
    }
    return 0;
}
