/* c_src/events/pg.c — the PostgreSQL backend of the event store (libpq).
 *
 * Contract: backend.h. Pure C, no erl_nif types.
 *
 * Schema (created on open when absent, in the schema libpq's search_path names first):
 *   dspex_event_schema(version)               one row, the schema version (1)
 *   dspex_events(position identity PK, session bytea, sequence int8, ts timestamptz,
 *                id text, type, variable, principal, changed_by, node, data, meta bytea,
 *                UNIQUE (session, sequence)) + indexes on ts, (type, position), (principal, position)
 *   dspex_event_snapshots(session, sequence, ts, blob, PK (session, sequence))
 * Byte-range strings are stored as bytea, so every record the sqlite backend accepts is
 * accepted here too (no encoding errors that would make a batch fail for ever).
 *
 * Every value travels as a binary parameter (PQexecPrepared / PQexecParams with binary
 * formats); no value is ever spliced into SQL text. Results are read in binary and every
 * row count, field count, type and length taken from the server is checked before use.
 *
 * write_batch is ONE statement (so one transaction, one round trip): the records go as
 * eleven binary arrays, unnest()ed WITH ORDINALITY, inserted in array order under a
 * transaction-scoped advisory lock with ON CONFLICT (session, sequence) DO NOTHING; the
 * same statement returns, per input row, the new position or the one already stored.
 * The advisory lock makes positions visible in increasing order across every writer of
 * the database (several nodes may append to one database): a reader that tails by
 * position never skips a position that commits later. synchronous_commit is set on for
 * the session, so a 0 return means the commit is durable.
 *
 * Connection loss: every operation checks the connection first and resets it (PQreset)
 * when it is bad; an operation that fails because the connection dropped under it is
 * retried once on a fresh connection when that is safe (write_batch is idempotent; a
 * query or expire only when its callback has not been called yet). Errors that come
 * from a lost connection start with "connection lost:".
 *
 * Reads: a query with a limit of at most PAGE_ROWS is one statement; any other read (and
 * expire_before) runs a cursor in a REPEATABLE READ transaction and fetches PAGE_ROWS rows
 * a round trip, so memory stays bounded and an early stop costs no more rows.
 *
 * Threads: one instance = one connection; the caller serialises every call (backend.h).
 * Every call blocks on the network (up to connect_timeout / tcp_user_timeout when the
 * server is gone): call it from the writer thread or a dirty I/O scheduler, never from a
 * normal scheduler. A second instance gives readers a connection of their own. */
#include "backend.h"

/* Debian keeps libpq-fe.h in /usr/include/postgresql: found without -I flags as well */
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SCHEMA_VERSION 1
/* classid of our advisory locks ('DXEV'); objid = the events table's oid, or 0 for DDL */
#define LOCK_CLASS 0x44584556
/* rows fetched per round trip by a cursor */
#define PAGE_ROWS 1000
/* one array parameter must stay below the server's 1 GB allocation limit */
#define MAX_PARAM_BYTES ((size_t)0x3FFFFFFF - 64)
#define MAX_BATCH 10000000u

/* type oids (pg_type.dat; stable across releases) */
#define OID_BYTEA 17
#define OID_INT8 20
#define OID_INT4 23
#define OID_TEXT 25
#define OID_TIMESTAMPTZ 1184
#define OID_BYTEA_ARRAY 1001
#define OID_INT8_ARRAY 1016
#define OID_TEXT_ARRAY 1009
#define OID_TIMESTAMPTZ_ARRAY 1185

/* timestamptz on the wire: int64 microseconds since 2000-01-01 UTC */
#define PG_EPOCH_US INT64_C(946684800000000)
/* the earliest timestamptz the server accepts (4714-11-24 BC), in Unix microseconds */
#define PG_MIN_TS_US (INT64_C(-211813488000000000) + PG_EPOCH_US)
/* the first one it refuses (294277-01-01), in PostgreSQL microseconds */
#define PG_END_TS INT64_C(9223371331200000000)

typedef struct {
    PGconn *conn;
    int ready;          /* session set up on this connection (SET, PREPARE, lock key) */
    uint32_t table_oid; /* oid of dspex_events: objid of the append lock */
} pg_st;

/* ---- errors ----------------------------------------------------------------------- */

static void seterr(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    /* libpq messages end in newlines and may span lines: keep one line */
    for (char *p = err; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    size_t n = strlen(err);
    while (n > 0 && err[n - 1] == ' ')
        err[--n] = '\0';
}

/* Sets err from a failed result (or the connection when res is NULL). */
static void pg_err(pg_st *s, PGresult *res, const char *what, char *err, size_t errlen)
{
    if (PQstatus(s->conn) == CONNECTION_BAD) {
        seterr(err, errlen, "connection lost: %s: %s", what, PQerrorMessage(s->conn));
        return;
    }
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = res ? PQresultErrorMessage(res) : "";
    if (!msg || !*msg)
        msg = PQerrorMessage(s->conn);
    if (state)
        seterr(err, errlen, "%s: SQLSTATE %s: %s", what, state, msg);
    else
        seterr(err, errlen, "%s: %s", what, msg);
}

/* ---- binary encoding -------------------------------------------------------------- */

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32(p + 4, (uint32_t)v);
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* A growable byte buffer; oom is sticky and checked once at the end. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
    int oom;
} buf;

static uint8_t *buf_grow(buf *b, size_t n)
{
    if (b->oom)
        return NULL;
    if (n > MAX_PARAM_BYTES - b->len) {
        b->oom = 2; /* too large for one parameter */
        return NULL;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (!np) {
            b->oom = 1;
            return NULL;
        }
        b->p = np;
        b->cap = cap;
    }
    uint8_t *at = b->p + b->len;
    b->len += n;
    return at;
}

/* One-dimensional, NULL-free array header (array_recv's format). */
static void arr_begin(buf *b, uint32_t elem_oid, size_t n)
{
    uint8_t *h = buf_grow(b, 20);
    if (!h)
        return;
    put_be32(h, 1);                /* ndim */
    put_be32(h + 4, 0);            /* flags: no NULLs */
    put_be32(h + 8, elem_oid);
    put_be32(h + 12, (uint32_t)n); /* dimension */
    put_be32(h + 16, 1);           /* lower bound */
}

static void arr_bytes(buf *b, const void *p, size_t n)
{
    if (n > INT32_MAX) {
        b->oom = 2;
        return;
    }
    uint8_t *h = buf_grow(b, 4 + n);
    if (!h)
        return;
    put_be32(h, (uint32_t)n);
    if (n)
        memcpy(h + 4, p, n);
}

static void arr_int8(buf *b, uint64_t v)
{
    uint8_t *h = buf_grow(b, 12);
    if (!h)
        return;
    put_be32(h, 8);
    put_be64(h + 4, v);
}

/* Query bounds: clamp a Unix-microsecond bound into what timestamptz can carry. */
static int64_t ts_to_pg_clamped(int64_t us)
{
    if (us < PG_MIN_TS_US)
        us = PG_MIN_TS_US;
    return us - PG_EPOCH_US; /* cannot overflow: us >= PG_MIN_TS_US */
}

/* ---- results ---------------------------------------------------------------------- */

/* Checks a result's shape: status, field count, binary format and type of every field. */
static int check_shape(pg_st *s, PGresult *res, ExecStatusType want, int nf, const Oid *types,
                       const char *what, char *err, size_t errlen)
{
    if (!res || PQresultStatus(res) != want) {
        pg_err(s, res, what, err, errlen);
        return -1;
    }
    if (want != PGRES_TUPLES_OK)
        return 0;
    if (PQnfields(res) != nf) {
        seterr(err, errlen, "%s: server sent %d columns, expected %d", what, PQnfields(res), nf);
        return -1;
    }
    for (int i = 0; i < nf; i++) {
        if (PQfformat(res, i) != 1 || PQftype(res, i) != types[i]) {
            seterr(err, errlen, "%s: column %d has type oid %u (format %d), expected %u (binary)", what, i,
                   (unsigned)PQftype(res, i), PQfformat(res, i), (unsigned)types[i]);
            return -1;
        }
    }
    return 0;
}

/* A non-NULL int8 (or timestamptz) field. */
static int field_i64(PGresult *res, int row, int col, int64_t *out, const char *what, char *err, size_t errlen)
{
    if (PQgetisnull(res, row, col) || PQgetlength(res, row, col) != 8) {
        seterr(err, errlen, "%s: row %d column %d is NULL or not 8 bytes", what, row, col);
        return -1;
    }
    *out = (int64_t)get_be64((const uint8_t *)PQgetvalue(res, row, col));
    return 0;
}

static int field_bytes(PGresult *res, int row, int col, const char **p, size_t *len, const char *what, char *err,
                       size_t errlen)
{
    int l = PQgetlength(res, row, col);
    if (PQgetisnull(res, row, col) || l < 0) {
        seterr(err, errlen, "%s: row %d column %d is NULL", what, row, col);
        return -1;
    }
    *p = PQgetvalue(res, row, col);
    *len = (size_t)l;
    return 0;
}

static int pg_ts_to_unix(int64_t pgts, int64_t *out)
{
    if (pgts >= PG_END_TS || pgts < PG_MIN_TS_US - PG_EPOCH_US)
        return -1;
    return __builtin_add_overflow(pgts, PG_EPOCH_US, out) ? -1 : 0;
}

/* ---- connection ------------------------------------------------------------------- */

static void quiet_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* NOTICEs ("relation exists, skipping") would go to the VM's stderr */
}

static int exec_cmd(pg_st *s, const char *sql, const char *what, char *err, size_t errlen)
{
    PGresult *res = PQexec(s->conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        pg_err(s, res, what, err, errlen);
        PQclear(res);
        return -1;
    }
    PQclear(res);
    return 0;
}

/* Ends an open transaction after a failure (best effort: the connection may be gone). */
static void rollback_if_open(pg_st *s)
{
    if (PQstatus(s->conn) == CONNECTION_OK && PQtransactionStatus(s->conn) != PQTRANS_IDLE)
        PQclear(PQexec(s->conn, "ROLLBACK"));
}

static const char INSERT_SQL[] =
    "WITH v AS ("
    " SELECT * FROM unnest($1::bytea[], $2::int8[], $3::timestamptz[], $4::text[], $5::bytea[], $6::bytea[],"
    "  $7::bytea[], $8::bytea[], $9::bytea[], $10::bytea[], $11::bytea[])"
    "  WITH ORDINALITY AS u(session, sequence, ts, id, type, variable, principal, changed_by, node, data, meta, ord)"
    "), l AS (SELECT pg_advisory_xact_lock($12::int4, $13::int4) AS locked"
    "), ins AS ("
    " INSERT INTO dspex_events AS e (session, sequence, ts, id, type, variable, principal, changed_by, node, data, meta)"
    " SELECT v.session, v.sequence, v.ts, v.id, v.type, v.variable, v.principal, v.changed_by, v.node, v.data, v.meta"
    " FROM v CROSS JOIN l ORDER BY v.ord"
    " ON CONFLICT (session, sequence) DO NOTHING"
    " RETURNING e.session, e.sequence, e.position"
    ") SELECT v.ord, COALESCE(ins.position,"
    "  (SELECT o.position FROM dspex_events o WHERE o.session = v.session AND o.sequence = v.sequence))"
    " FROM v LEFT JOIN ins ON ins.session = v.session AND ins.sequence = v.sequence"
    " ORDER BY v.ord";

static const Oid INSERT_TYPES[13] = {OID_BYTEA_ARRAY, OID_INT8_ARRAY,  OID_TIMESTAMPTZ_ARRAY, OID_TEXT_ARRAY,
                                     OID_BYTEA_ARRAY, OID_BYTEA_ARRAY, OID_BYTEA_ARRAY,       OID_BYTEA_ARRAY,
                                     OID_BYTEA_ARRAY, OID_BYTEA_ARRAY, OID_BYTEA_ARRAY,       OID_INT4,
                                     OID_INT4};

/* The stored position of a skipped record is looked up by a correlated subquery, run
 * only for the records the INSERT skipped: it can only be an index probe of
 * (session, sequence). A join with dspex_events here would let the cached generic plan
 * of the prepared statement, made while the table was small, keep a sequential scan of
 * the whole table for every batch as the table grows (measured: a one-record batch
 * went from 3 ms to 65 ms at 200 000 events). */

/* Per-connection set-up: durable commits, the append lock's key, the prepared insert. */
static int setup_session(pg_st *s, char *err, size_t errlen)
{
    if (exec_cmd(s, "SET synchronous_commit = on", "set synchronous_commit", err, errlen))
        return -1;
    static const Oid oid_t[1] = {OID_INT8};
    PGresult *res = PQexecParams(s->conn, "SELECT 'dspex_events'::regclass::oid::int8", 0, NULL, NULL, NULL, NULL, 1);
    int64_t oid = 0;
    int bad = check_shape(s, res, PGRES_TUPLES_OK, 1, oid_t, "look up dspex_events", err, errlen);
    if (!bad && PQntuples(res) != 1) {
        seterr(err, errlen, "look up dspex_events: server sent %d rows", PQntuples(res));
        bad = 1;
    }
    if (!bad)
        bad = field_i64(res, 0, 0, &oid, "look up dspex_events", err, errlen);
    PQclear(res);
    if (bad)
        return -1;
    s->table_oid = (uint32_t)oid;
    res = PQprepare(s->conn, "dx_ev_insert", INSERT_SQL, 13, INSERT_TYPES);
    if (!res || PQresultStatus(res) != PGRES_COMMAND_OK) {
        pg_err(s, res, "prepare insert", err, errlen);
        PQclear(res);
        return -1;
    }
    PQclear(res);
    s->ready = 1;
    return 0;
}

/* A usable connection: reset when bad, leftover transaction ended, session set up. */
static int ensure_conn(pg_st *s, char *err, size_t errlen)
{
    if (PQstatus(s->conn) != CONNECTION_OK) {
        s->ready = 0;
        PQreset(s->conn);
        if (PQstatus(s->conn) != CONNECTION_OK) {
            seterr(err, errlen, "connection lost: reconnect failed: %s", PQerrorMessage(s->conn));
            return -1;
        }
    }
    rollback_if_open(s);
    if (!s->ready)
        return setup_session(s, err, errlen);
    return 0;
}

/* The failure left the connection dead: worth one reconnect and retry. */
static int conn_lost(pg_st *s)
{
    return PQstatus(s->conn) == CONNECTION_BAD;
}

static const char SCHEMA_SQL[] =
    "CREATE TABLE IF NOT EXISTS dspex_events ("
    " position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " session bytea NOT NULL,"
    " sequence bigint NOT NULL CHECK (sequence > 0),"
    " ts timestamptz NOT NULL,"
    " id text NOT NULL,"
    " type bytea NOT NULL,"
    " variable bytea NOT NULL,"
    " principal bytea NOT NULL,"
    " changed_by bytea NOT NULL,"
    " node bytea NOT NULL,"
    " data bytea NOT NULL,"
    " meta bytea NOT NULL,"
    " CONSTRAINT dspex_events_session_sequence UNIQUE (session, sequence));"
    "CREATE INDEX IF NOT EXISTS dspex_events_ts ON dspex_events (ts);"
    "CREATE INDEX IF NOT EXISTS dspex_events_type ON dspex_events (type, position);"
    "CREATE INDEX IF NOT EXISTS dspex_events_principal ON dspex_events (principal, position);"
    "CREATE TABLE IF NOT EXISTS dspex_event_snapshots ("
    " session bytea NOT NULL,"
    " sequence bigint NOT NULL,"
    " ts timestamptz NOT NULL,"
    " blob bytea NOT NULL,"
    " PRIMARY KEY (session, sequence));";

/* Creates the schema when absent; refuses a newer schema version. Runs under an advisory
 * lock so nodes opening one database at the same time do not race on CREATE. */
static int create_schema(pg_st *s, char *err, size_t errlen)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT pg_advisory_xact_lock(%d, 0)", LOCK_CLASS); /* constants only */
    if (exec_cmd(s, "BEGIN", "create schema", err, errlen) || exec_cmd(s, sql, "create schema: lock", err, errlen) ||
        exec_cmd(s, "CREATE TABLE IF NOT EXISTS dspex_event_schema (version integer NOT NULL)", "create schema",
                 err, errlen))
        goto fail;
    static const Oid int4_t[1] = {OID_INT4};
    PGresult *res = PQexecParams(s->conn, "SELECT version FROM dspex_event_schema", 0, NULL, NULL, NULL, NULL, 1);
    if (check_shape(s, res, PGRES_TUPLES_OK, 1, int4_t, "read schema version", err, errlen)) {
        PQclear(res);
        goto fail;
    }
    int rows = PQntuples(res);
    int32_t version = 0;
    if (rows > 1 || (rows == 1 && (PQgetisnull(res, 0, 0) || PQgetlength(res, 0, 0) != 4))) {
        seterr(err, errlen, "dspex_event_schema must hold one version row (has %d)", rows);
        PQclear(res);
        goto fail;
    }
    if (rows == 1) {
        const uint8_t *p = (const uint8_t *)PQgetvalue(res, 0, 0);
        version = (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
    }
    PQclear(res);
    if (version > SCHEMA_VERSION) {
        seterr(err, errlen, "schema version %d is newer than this build's (%d)", (int)version, SCHEMA_VERSION);
        goto fail;
    }
    if (exec_cmd(s, SCHEMA_SQL, "create schema", err, errlen))
        goto fail;
    if (rows == 0) {
        snprintf(sql, sizeof sql, "INSERT INTO dspex_event_schema (version) VALUES (%d)", SCHEMA_VERSION);
        if (exec_cmd(s, sql, "create schema", err, errlen))
            goto fail;
    }
    if (exec_cmd(s, "COMMIT", "create schema: commit", err, errlen))
        goto fail;
    return 0;
fail:
    rollback_if_open(s);
    return -1;
}

static int pg_open(const char *target, void **stp, char *err, size_t errlen)
{
    *stp = NULL;
    if (!target) {
        seterr(err, errlen, "conninfo is NULL");
        return -1;
    }
    /* defaults the conninfo may override (its keywords are processed later): give up a
     * connect after 10 s, and notice a server that vanished without closing the socket
     * within about a minute (TCP keepalives; unacknowledged sends), so a call fails and
     * the caller can spool instead of blocking for the kernel's two hours */
    const char *const keys[] = {"connect_timeout", "keepalives_idle", "keepalives_interval", "keepalives_count",
                                "tcp_user_timeout", "fallback_application_name", "dbname", NULL};
    const char *const vals[] = {"10", "30", "10", "3", "60000", "dspex_events", target, NULL};
    pg_st *s = calloc(1, sizeof *s);
    if (!s) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    s->conn = PQconnectdbParams(keys, vals, 1);
    if (!s->conn) {
        seterr(err, errlen, "out of memory");
        free(s);
        return -1;
    }
    if (PQstatus(s->conn) != CONNECTION_OK) {
        seterr(err, errlen, "connect failed: %s", PQerrorMessage(s->conn));
        goto fail;
    }
    PQsetNoticeProcessor(s->conn, quiet_notices, NULL);
    if (PQserverVersion(s->conn) < 100000) {
        seterr(err, errlen, "server version %d is too old (needs PostgreSQL 10 or later)", PQserverVersion(s->conn));
        goto fail;
    }
    const char *idt = PQparameterStatus(s->conn, "integer_datetimes");
    if (!idt || strcmp(idt, "on") != 0) {
        seterr(err, errlen, "server does not use integer timestamps");
        goto fail;
    }
    if (create_schema(s, err, errlen) || setup_session(s, err, errlen))
        goto fail;
    *stp = s;
    return 0;
fail:
    PQfinish(s->conn);
    free(s);
    return -1;
}

static void pg_close(void *st)
{
    pg_st *s = st;
    if (!s)
        return;
    PQfinish(s->conn);
    free(s);
}

/* ---- write_batch ------------------------------------------------------------------ */

enum { C_SESSION, C_SEQ, C_TS, C_ID, C_TYPE, C_VAR, C_PRINC, C_CHBY, C_NODE, C_DATA, C_META, NCOLS };

/* Encodes the eleven column arrays. -1 with err on a record the schema cannot hold. */
static int encode_batch(const dx_ev_rec *recs, size_t n, buf *cols, char *err, size_t errlen)
{
    static const uint32_t elem[NCOLS] = {OID_BYTEA, OID_INT8,  OID_TIMESTAMPTZ, OID_TEXT,  OID_BYTEA, OID_BYTEA,
                                         OID_BYTEA, OID_BYTEA, OID_BYTEA,       OID_BYTEA, OID_BYTEA};
    for (int c = 0; c < NCOLS; c++)
        arr_begin(&cols[c], elem[c], n);
    for (size_t i = 0; i < n; i++) {
        const dx_ev_rec *r = &recs[i];
        if (r->sequence == 0 || r->sequence > (uint64_t)INT64_MAX) {
            seterr(err, errlen, "record %zu: sequence %llu out of range", i, (unsigned long long)r->sequence);
            return -1;
        }
        if (r->ts_us < PG_MIN_TS_US) {
            seterr(err, errlen, "record %zu: ts_us %lld before 4714 BC", i, (long long)r->ts_us);
            return -1;
        }
        size_t idlen = strnlen(r->id, sizeof r->id);
        if (idlen >= sizeof r->id) {
            seterr(err, errlen, "record %zu: id is not NUL-terminated", i);
            return -1;
        }
        for (size_t k = 0; k < idlen; k++)
            if ((unsigned char)r->id[k] < 0x21 || (unsigned char)r->id[k] > 0x7e) {
                seterr(err, errlen, "record %zu: id is not printable ASCII", i);
                return -1;
            }
        if ((!r->session && r->session_len) || (!r->type && r->type_len) || (!r->variable && r->variable_len) ||
            (!r->principal && r->principal_len) || (!r->changed_by && r->changed_by_len) ||
            (!r->node && r->node_len) || (!r->data && r->data_len) || (!r->meta && r->meta_len)) {
            seterr(err, errlen, "record %zu: NULL pointer with a non-zero length", i);
            return -1;
        }
        arr_bytes(&cols[C_SESSION], r->session, r->session_len);
        arr_int8(&cols[C_SEQ], r->sequence);
        arr_int8(&cols[C_TS], (uint64_t)(r->ts_us - PG_EPOCH_US));
        arr_bytes(&cols[C_ID], r->id, idlen);
        arr_bytes(&cols[C_TYPE], r->type, r->type_len);
        arr_bytes(&cols[C_VAR], r->variable, r->variable_len);
        arr_bytes(&cols[C_PRINC], r->principal, r->principal_len);
        arr_bytes(&cols[C_CHBY], r->changed_by, r->changed_by_len);
        arr_bytes(&cols[C_NODE], r->node, r->node_len);
        arr_bytes(&cols[C_DATA], r->data, r->data_len);
        arr_bytes(&cols[C_META], r->meta, r->meta_len);
    }
    for (int c = 0; c < NCOLS; c++)
        if (cols[c].oom) {
            seterr(err, errlen, cols[c].oom == 2 ? "batch too large: column %d exceeds 1 GB" : "out of memory (column %d)",
                   c);
            return -1;
        }
    return 0;
}

/* The position another writer stored for one record, after a conflict the statement's
 * snapshot could not see (both inserted the same key at the same time). */
static int lookup_position(pg_st *s, const dx_ev_rec *r, uint64_t *pos, char *err, size_t errlen)
{
    uint8_t seq[8];
    put_be64(seq, r->sequence);
    const char *vals[2] = {r->session ? r->session : "", (const char *)seq};
    const int lens[2] = {(int)r->session_len, 8};
    const int fmts[2] = {1, 1};
    static const Oid types[2] = {OID_BYTEA, OID_INT8};
    static const Oid out_t[1] = {OID_INT8};
    PGresult *res = PQexecParams(s->conn, "SELECT position FROM dspex_events WHERE session = $1 AND sequence = $2", 2,
                                 types, vals, lens, fmts, 1);
    int64_t p = 0;
    int rc = -1;
    if (check_shape(s, res, PGRES_TUPLES_OK, 1, out_t, "write_batch: look up position", err, errlen) == 0) {
        if (PQntuples(res) != 1)
            seterr(err, errlen, "write_batch: record (sequence %llu) neither inserted nor stored",
                   (unsigned long long)r->sequence);
        else if (field_i64(res, 0, 0, &p, "write_batch", err, errlen) == 0) {
            if (p > 0) {
                *pos = (uint64_t)p;
                rc = 0;
            } else
                seterr(err, errlen, "write_batch: server returned position %lld", (long long)p);
        }
    }
    PQclear(res);
    return rc;
}

static int write_once(pg_st *s, dx_ev_rec *recs, size_t n, buf *cols, char *err, size_t errlen)
{
    uint8_t lk1[4], lk2[4];
    put_be32(lk1, LOCK_CLASS);
    put_be32(lk2, s->table_oid);
    const char *vals[13];
    int lens[13], fmts[13];
    for (int c = 0; c < NCOLS; c++) {
        vals[c] = (const char *)cols[c].p;
        lens[c] = (int)cols[c].len;
        fmts[c] = 1;
    }
    vals[11] = (const char *)lk1;
    vals[12] = (const char *)lk2;
    lens[11] = lens[12] = 4;
    fmts[11] = fmts[12] = 1;
    PGresult *res = PQexecPrepared(s->conn, "dx_ev_insert", 13, vals, lens, fmts, 1);
    static const Oid out_t[2] = {OID_INT8, OID_INT8};
    if (check_shape(s, res, PGRES_TUPLES_OK, 2, out_t, "write_batch", err, errlen)) {
        PQclear(res);
        return -1;
    }
    if ((size_t)PQntuples(res) != n) {
        seterr(err, errlen, "write_batch: server returned %d rows for %zu records", PQntuples(res), n);
        PQclear(res);
        return -1;
    }
    /* the statement committed: from here on, positions only */
    size_t missing = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t ord, pos = 0;
        if (field_i64(res, (int)i, 0, &ord, "write_batch", err, errlen)) {
            PQclear(res);
            return -1;
        }
        if (ord != (int64_t)i + 1) {
            seterr(err, errlen, "write_batch: row %zu has ordinal %lld", i, (long long)ord);
            PQclear(res);
            return -1;
        }
        if (PQgetisnull(res, (int)i, 1)) {
            recs[i].position = 0;
            missing++;
            continue;
        }
        if (field_i64(res, (int)i, 1, &pos, "write_batch", err, errlen)) {
            PQclear(res);
            return -1;
        }
        if (pos <= 0) {
            seterr(err, errlen, "write_batch: server returned position %lld", (long long)pos);
            PQclear(res);
            return -1;
        }
        recs[i].position = (uint64_t)pos;
    }
    PQclear(res);
    for (size_t i = 0; missing && i < n; i++)
        if (recs[i].position == 0) {
            if (lookup_position(s, &recs[i], &recs[i].position, err, errlen))
                return -1;
            missing--;
        }
    return 0;
}

static int pg_write_batch(void *st, dx_ev_rec *recs, size_t n, char *err, size_t errlen)
{
    pg_st *s = st;
    if (n == 0)
        return 0;
    if (!recs || n > MAX_BATCH) {
        seterr(err, errlen, "write_batch: %zu records (at most %u per batch)", n, MAX_BATCH);
        return -1;
    }
    buf cols[NCOLS];
    memset(cols, 0, sizeof cols);
    int rc = encode_batch(recs, n, cols, err, errlen);
    for (int attempt = 0; rc == 0; attempt++) {
        if (ensure_conn(s, err, errlen)) {
            rc = -1;
            break;
        }
        if (write_once(s, recs, n, cols, err, errlen) == 0)
            break;
        /* idempotent: a retry after a commit whose answer was lost returns the stored positions */
        if (attempt > 0 || !conn_lost(s))
            rc = -1;
    }
    for (int c = 0; c < NCOLS; c++)
        free(cols[c].p);
    return rc;
}

/* ---- reads ------------------------------------------------------------------------ */

/* Parameters of a dynamically built statement (placeholders only; values stay binary). */
typedef struct {
    char sql[1024];
    size_t sqllen;
    int n;
    const char *vals[16];
    int lens[16], fmts[16];
    Oid types[16];
    uint8_t ints[16][8];
    buf arr;      /* the types array, when filtering on types */
    int overflow; /* sql or parameters did not fit (a bug: sizes are fixed by the code) */
} stmt;

static void sql_add(stmt *q, const char *text)
{
    size_t l = strlen(text);
    if (q->sqllen + l < sizeof q->sql) {
        memcpy(q->sql + q->sqllen, text, l + 1);
        q->sqllen += l;
    } else
        q->overflow = 1;
}

/* Appends `<prefix>$k` and binds an int8 (or timestamptz) value to $k. */
static void bind_i64(stmt *q, const char *prefix, Oid type, int64_t v)
{
    if (q->n >= 16) {
        q->overflow = 1;
        return;
    }
    int k = q->n++;
    put_be64(q->ints[k], (uint64_t)v);
    q->vals[k] = (const char *)q->ints[k];
    q->lens[k] = 8;
    q->fmts[k] = 1;
    q->types[k] = type;
    char t[96];
    snprintf(t, sizeof t, "%s$%d", prefix, k + 1);
    sql_add(q, t);
}

static void bind_bytes(stmt *q, const char *prefix, Oid type, const void *p, size_t len)
{
    if (q->n >= 16) {
        q->overflow = 1;
        return;
    }
    int k = q->n++;
    q->vals[k] = len ? (const char *)p : "";
    q->lens[k] = (int)len;
    q->fmts[k] = 1;
    q->types[k] = type;
    char t[96];
    snprintf(t, sizeof t, "%s$%d", prefix, k + 1);
    sql_add(q, t);
}

static int64_t u64_to_i64_sat(uint64_t v)
{
    return v > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)v;
}

#define EVENT_COLS "position, sequence, ts, id, session, type, variable, principal, changed_by, node, data, meta"
static const Oid EVENT_TYPES[12] = {OID_INT8,  OID_INT8,  OID_TIMESTAMPTZ, OID_TEXT,  OID_BYTEA, OID_BYTEA,
                                    OID_BYTEA, OID_BYTEA, OID_BYTEA,       OID_BYTEA, OID_BYTEA, OID_BYTEA};

/* Builds the SELECT of a query; -1 with err when the filter is unusable. */
static int build_query(stmt *q, const dx_ev_query *f, char *err, size_t errlen)
{
    sql_add(q, "SELECT " EVENT_COLS " FROM dspex_events WHERE true");
    if (f->session_len) {
        if (!f->session || f->session_len > INT32_MAX)
            goto bad;
        bind_bytes(q, " AND session = ", OID_BYTEA, f->session, f->session_len);
    }
    if (f->seq_from > 1)
        bind_i64(q, " AND sequence >= ", OID_INT8, u64_to_i64_sat(f->seq_from));
    if (f->seq_to)
        bind_i64(q, " AND sequence <= ", OID_INT8, u64_to_i64_sat(f->seq_to));
    if (f->pos_from > 1)
        bind_i64(q, " AND position >= ", OID_INT8, u64_to_i64_sat(f->pos_from));
    if (f->pos_to)
        bind_i64(q, " AND position <= ", OID_INT8, u64_to_i64_sat(f->pos_to));
    if (f->ts_from)
        bind_i64(q, " AND ts >= ", OID_TIMESTAMPTZ, ts_to_pg_clamped(f->ts_from));
    if (f->ts_to)
        bind_i64(q, " AND ts <= ", OID_TIMESTAMPTZ, ts_to_pg_clamped(f->ts_to));
    if (f->ntypes) {
        if (!f->types || !f->type_lens || f->ntypes > INT32_MAX)
            goto bad;
        arr_begin(&q->arr, OID_BYTEA, f->ntypes);
        for (size_t i = 0; i < f->ntypes; i++) {
            if (!f->types[i] && f->type_lens[i])
                goto bad;
            arr_bytes(&q->arr, f->types[i], f->type_lens[i]);
        }
        if (q->arr.oom) {
            seterr(err, errlen, "query: types filter too large or out of memory");
            return -1;
        }
        bind_bytes(q, " AND type = ANY(", OID_BYTEA_ARRAY, q->arr.p, q->arr.len);
        sql_add(q, ")");
    }
    if (f->principal_len) {
        if (!f->principal || f->principal_len > INT32_MAX)
            goto bad;
        bind_bytes(q, " AND principal = ", OID_BYTEA, f->principal, f->principal_len);
    }
    if (f->variable_len) {
        if (!f->variable || f->variable_len > INT32_MAX)
            goto bad;
        bind_bytes(q, " AND variable = ", OID_BYTEA, f->variable, f->variable_len);
    }
    sql_add(q, f->session_len ? " ORDER BY sequence" : " ORDER BY position");
    sql_add(q, f->descending ? " DESC" : " ASC");
    if (f->limit)
        bind_i64(q, " LIMIT ", OID_INT8, u64_to_i64_sat(f->limit));
    if (q->overflow) {
        seterr(err, errlen, "query: statement too long");
        return -1;
    }
    return 0;
bad:
    seterr(err, errlen, "query: NULL pointer with a non-zero length, or a filter too long");
    return -1;
}

/* Decodes one event row and hands it to cb. Returns cb's result, or -1 with err. */
static int emit_row(PGresult *res, int row, dx_ev_row_cb cb, void *ctx, int *stop, char *err, size_t errlen)
{
    static const char *what = "read event";
    dx_ev_rec r;
    memset(&r, 0, sizeof r);
    int64_t pos, seq, ts;
    const char *p;
    size_t len;
    if (field_i64(res, row, 0, &pos, what, err, errlen) || field_i64(res, row, 1, &seq, what, err, errlen) ||
        field_i64(res, row, 2, &ts, what, err, errlen))
        return -1;
    if (pos <= 0 || seq <= 0 || pg_ts_to_unix(ts, &r.ts_us)) {
        seterr(err, errlen, "%s: row %d has position %lld, sequence %lld, ts out of range or not", what, row,
               (long long)pos, (long long)seq);
        return -1;
    }
    r.position = (uint64_t)pos;
    r.sequence = (uint64_t)seq;
    if (field_bytes(res, row, 3, &p, &len, what, err, errlen))
        return -1;
    if (len >= sizeof r.id) {
        seterr(err, errlen, "%s: row %d has an id of %zu bytes (at most %zu)", what, row, len, sizeof r.id - 1);
        return -1;
    }
    memcpy(r.id, p, len);
    r.id[len] = '\0';
    const char **sp[6] = {&r.session, &r.type, &r.variable, &r.principal, &r.changed_by, &r.node};
    size_t *sl[6] = {&r.session_len, &r.type_len, &r.variable_len, &r.principal_len, &r.changed_by_len, &r.node_len};
    for (int c = 0; c < 6; c++)
        if (field_bytes(res, row, 4 + c, sp[c], sl[c], what, err, errlen))
            return -1;
    if (field_bytes(res, row, 10, &p, &r.data_len, what, err, errlen))
        return -1;
    r.data = (const uint8_t *)p;
    if (field_bytes(res, row, 11, &p, &r.meta_len, what, err, errlen))
        return -1;
    r.meta = (const uint8_t *)p;
    if (cb(ctx, &r))
        *stop = 1;
    return 0;
}

/* Runs q (an event SELECT) through a cursor in the current transaction, PAGE_ROWS rows a
 * round trip, calling cb per row until it asks to stop. *called counts the rows given. */
static int run_cursor(pg_st *s, stmt *q, dx_ev_row_cb cb, void *ctx, size_t *called, int *stop, const char *what,
                      char *err, size_t errlen)
{
    char decl[sizeof q->sql + 64];
    snprintf(decl, sizeof decl, "DECLARE dx_ev_cur NO SCROLL CURSOR FOR %s", q->sql);
    PGresult *res = PQexecParams(s->conn, decl, q->n, q->types, q->vals, q->lens, q->fmts, 1);
    if (check_shape(s, res, PGRES_COMMAND_OK, 0, NULL, what, err, errlen)) {
        PQclear(res);
        return -1;
    }
    PQclear(res);
    char fetch[64];
    snprintf(fetch, sizeof fetch, "FETCH FORWARD %d FROM dx_ev_cur", PAGE_ROWS);
    for (;;) {
        res = PQexecParams(s->conn, fetch, 0, NULL, NULL, NULL, NULL, 1);
        if (check_shape(s, res, PGRES_TUPLES_OK, 12, EVENT_TYPES, what, err, errlen)) {
            PQclear(res);
            return -1;
        }
        int rows = PQntuples(res);
        if (rows < 0 || rows > PAGE_ROWS) {
            seterr(err, errlen, "%s: server sent %d rows for a page of %d", what, rows, PAGE_ROWS);
            PQclear(res);
            return -1;
        }
        for (int i = 0; i < rows && !*stop; i++) {
            if (emit_row(res, i, cb, ctx, stop, err, errlen)) {
                PQclear(res);
                return -1;
            }
            (*called)++;
        }
        PQclear(res);
        if (*stop || rows < PAGE_ROWS)
            return 0;
    }
}

static int query_once(pg_st *s, stmt *q, size_t limit, dx_ev_row_cb cb, void *ctx, size_t *called, char *err,
                      size_t errlen)
{
    int stop = 0;
    if (limit && limit <= PAGE_ROWS) {
        /* one round trip, no transaction */
        PGresult *res = PQexecParams(s->conn, q->sql, q->n, q->types, q->vals, q->lens, q->fmts, 1);
        if (check_shape(s, res, PGRES_TUPLES_OK, 12, EVENT_TYPES, "query", err, errlen)) {
            PQclear(res);
            return -1;
        }
        int rows = PQntuples(res);
        if (rows < 0 || (size_t)rows > limit) {
            seterr(err, errlen, "query: server sent %d rows for a limit of %zu", rows, limit);
            PQclear(res);
            return -1;
        }
        for (int i = 0; i < rows && !stop; i++) {
            if (emit_row(res, i, cb, ctx, &stop, err, errlen)) {
                PQclear(res);
                return -1;
            }
            (*called)++;
        }
        PQclear(res);
        return 0;
    }
    if (exec_cmd(s, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", "query", err, errlen))
        return -1;
    if (run_cursor(s, q, cb, ctx, called, &stop, "query", err, errlen)) {
        rollback_if_open(s);
        return -1;
    }
    /* every row is read: the read is complete even if ending the read-only transaction
     * fails (the connection is then reset by the next call) */
    PQclear(PQexec(s->conn, "COMMIT"));
    return 0;
}

static int pg_query(void *st, const dx_ev_query *f, dx_ev_row_cb cb, void *ctx, char *err, size_t errlen)
{
    pg_st *s = st;
    if (!f || !cb) {
        seterr(err, errlen, "query: NULL filter or callback");
        return -1;
    }
    stmt q;
    memset(&q, 0, sizeof q);
    int rc = build_query(&q, f, err, errlen);
    for (int attempt = 0; rc == 0; attempt++) {
        size_t called = 0;
        if (ensure_conn(s, err, errlen)) {
            rc = -1;
            break;
        }
        if (query_once(s, &q, f->limit, cb, ctx, &called, err, errlen) == 0)
            break;
        /* retry only when no row reached the caller (it would see it twice) */
        if (attempt > 0 || called || !conn_lost(s))
            rc = -1;
    }
    free(q.arr.p);
    return rc;
}

/* A one-row, one-int8 query (NULL reads as 0), retried once after a lost connection. */
static int scalar_i64(pg_st *s, const char *sql, int nparams, const Oid *types, const char *const *vals,
                      const int *lens, uint64_t *out, const char *what, char *err, size_t errlen)
{
    static const Oid out_t[1] = {OID_INT8};
    static const int fmts[4] = {1, 1, 1, 1};
    for (int attempt = 0;; attempt++) {
        if (ensure_conn(s, err, errlen))
            return -1;
        PGresult *res = PQexecParams(s->conn, sql, nparams, types, vals, lens, fmts, 1);
        if (check_shape(s, res, PGRES_TUPLES_OK, 1, out_t, what, err, errlen) == 0) {
            int64_t v = 0;
            int rc = -1;
            if (PQntuples(res) != 1)
                seterr(err, errlen, "%s: server sent %d rows", what, PQntuples(res));
            else if (PQgetisnull(res, 0, 0))
                rc = 0;
            else if (field_i64(res, 0, 0, &v, what, err, errlen) == 0) {
                if (v < 0)
                    seterr(err, errlen, "%s: negative value %lld", what, (long long)v);
                else
                    rc = 0;
            }
            PQclear(res);
            if (rc == 0)
                *out = (uint64_t)v;
            return rc;
        }
        PQclear(res);
        if (attempt > 0 || !conn_lost(s))
            return -1;
    }
}

static int pg_max_position(void *st, uint64_t *pos, char *err, size_t errlen)
{
    return scalar_i64(st, "SELECT max(position) FROM dspex_events", 0, NULL, NULL, NULL, pos, "max_position", err,
                      errlen);
}

static int pg_session_max_seq(void *st, const char *session, size_t len, uint64_t *seq, char *err, size_t errlen)
{
    if ((!session && len) || len > INT32_MAX) {
        seterr(err, errlen, "session_max_seq: bad session");
        return -1;
    }
    static const Oid types[1] = {OID_BYTEA};
    const char *vals[1] = {len ? session : ""};
    const int lens[1] = {(int)len};
    return scalar_i64(st, "SELECT max(sequence) FROM dspex_events WHERE session = $1", 1, types, vals, lens, seq,
                      "session_max_seq", err, errlen);
}

/* ---- snapshots -------------------------------------------------------------------- */

static int pg_put_snapshot(void *st, const dx_ev_snapshot *sn, char *err, size_t errlen)
{
    pg_st *s = st;
    if (!sn || (!sn->session && sn->session_len) || (!sn->blob && sn->blob_len) || sn->session_len > INT32_MAX ||
        sn->blob_len > MAX_PARAM_BYTES || sn->sequence > (uint64_t)INT64_MAX || sn->ts_us < PG_MIN_TS_US) {
        seterr(err, errlen, "put_snapshot: bad snapshot (NULL pointer, size or range)");
        return -1;
    }
    uint8_t seq[8], ts[8];
    put_be64(seq, sn->sequence);
    put_be64(ts, (uint64_t)(sn->ts_us - PG_EPOCH_US));
    const char *vals[4] = {sn->session_len ? sn->session : "", (const char *)seq, (const char *)ts,
                           sn->blob_len ? (const char *)sn->blob : ""};
    const int lens[4] = {(int)sn->session_len, 8, 8, (int)sn->blob_len};
    const int fmts[4] = {1, 1, 1, 1};
    static const Oid types[4] = {OID_BYTEA, OID_INT8, OID_TIMESTAMPTZ, OID_BYTEA};
    for (int attempt = 0;; attempt++) {
        if (ensure_conn(s, err, errlen))
            return -1;
        PGresult *res = PQexecParams(s->conn,
                                     "INSERT INTO dspex_event_snapshots (session, sequence, ts, blob)"
                                     " VALUES ($1, $2, $3, $4) ON CONFLICT (session, sequence)"
                                     " DO UPDATE SET ts = EXCLUDED.ts, blob = EXCLUDED.blob",
                                     4, types, vals, lens, fmts, 1);
        if (check_shape(s, res, PGRES_COMMAND_OK, 0, NULL, "put_snapshot", err, errlen) == 0) {
            PQclear(res);
            return 0;
        }
        PQclear(res);
        if (attempt > 0 || !conn_lost(s))
            return -1;
    }
}

static int pg_latest_snapshot(void *st, const char *session, size_t len, uint64_t max_seq, int64_t max_ts,
                              dx_ev_snap_cb cb, void *ctx, char *err, size_t errlen)
{
    pg_st *s = st;
    if ((!session && len) || len > INT32_MAX || !cb) {
        seterr(err, errlen, "latest_snapshot: bad session or NULL callback");
        return -1;
    }
    stmt q;
    memset(&q, 0, sizeof q);
    sql_add(&q, "SELECT session, sequence, ts, blob FROM dspex_event_snapshots WHERE ");
    bind_bytes(&q, "session = ", OID_BYTEA, session, len);
    if (max_seq)
        bind_i64(&q, " AND sequence <= ", OID_INT8, u64_to_i64_sat(max_seq));
    if (max_ts)
        bind_i64(&q, " AND ts <= ", OID_TIMESTAMPTZ, ts_to_pg_clamped(max_ts));
    sql_add(&q, " ORDER BY sequence DESC LIMIT 1");
    static const Oid out_t[4] = {OID_BYTEA, OID_INT8, OID_TIMESTAMPTZ, OID_BYTEA};
    for (int attempt = 0;; attempt++) {
        if (ensure_conn(s, err, errlen))
            return -1;
        PGresult *res = PQexecParams(s->conn, q.sql, q.n, q.types, q.vals, q.lens, q.fmts, 1);
        if (check_shape(s, res, PGRES_TUPLES_OK, 4, out_t, "latest_snapshot", err, errlen) == 0) {
            int rows = PQntuples(res), rc = 0;
            if (rows > 1) {
                seterr(err, errlen, "latest_snapshot: server sent %d rows for LIMIT 1", rows);
                rc = -1;
            } else if (rows == 1) {
                dx_ev_snapshot sn;
                int64_t seq, ts;
                const char *blob;
                memset(&sn, 0, sizeof sn);
                if (field_bytes(res, 0, 0, &sn.session, &sn.session_len, "latest_snapshot", err, errlen) ||
                    field_i64(res, 0, 1, &seq, "latest_snapshot", err, errlen) ||
                    field_i64(res, 0, 2, &ts, "latest_snapshot", err, errlen) ||
                    field_bytes(res, 0, 3, &blob, &sn.blob_len, "latest_snapshot", err, errlen))
                    rc = -1;
                else if (seq < 0 || pg_ts_to_unix(ts, &sn.ts_us)) {
                    seterr(err, errlen, "latest_snapshot: sequence or ts out of range");
                    rc = -1;
                } else {
                    sn.sequence = (uint64_t)seq;
                    sn.blob = (const uint8_t *)blob;
                    cb(ctx, &sn);
                }
            }
            PQclear(res);
            return rc;
        }
        PQclear(res);
        if (attempt > 0 || !conn_lost(s))
            return -1;
    }
}

/* ---- retention -------------------------------------------------------------------- */

/* One REPEATABLE READ transaction: the cursor and the DELETE see the same snapshot, so
 * exactly the rows given to cb are deleted (a row committed meanwhile by another node is
 * in neither). A concurrent expire of the same rows fails with a serialization error. */
static int expire_once(pg_st *s, stmt *q, stmt *del, dx_ev_row_cb cb, void *ctx, size_t *called, char *err,
                       size_t errlen)
{
    int stop = 0;
    if (exec_cmd(s, "BEGIN ISOLATION LEVEL REPEATABLE READ", "expire_before", err, errlen))
        return -1;
    if (run_cursor(s, q, cb, ctx, called, &stop, "expire_before", err, errlen))
        goto fail;
    if (stop) { /* the caller could not archive: keep everything */
        rollback_if_open(s);
        return 0;
    }
    if (exec_cmd(s, "CLOSE dx_ev_cur", "expire_before", err, errlen))
        goto fail;
    PGresult *res = PQexecParams(s->conn, del->sql, del->n, del->types, del->vals, del->lens, del->fmts, 1);
    if (check_shape(s, res, PGRES_COMMAND_OK, 0, NULL, "expire_before: delete", err, errlen)) {
        PQclear(res);
        goto fail;
    }
    const char *ct = PQcmdTuples(res);
    char *end = NULL;
    errno = 0;
    unsigned long long deleted = strtoull(ct, &end, 10);
    if (!*ct || *end || errno || deleted != *called) {
        seterr(err, errlen, "expire_before: deleted %s rows but read %zu", ct, *called);
        PQclear(res);
        goto fail;
    }
    PQclear(res);
    if (exec_cmd(s, "COMMIT", "expire_before: commit", err, errlen))
        goto fail;
    return 0;
fail:
    rollback_if_open(s);
    return -1;
}

static int pg_expire_before(void *st, int64_t ts_us, uint64_t pos_from, uint64_t pos_to, dx_ev_row_cb cb, void *ctx,
                            char *err, size_t errlen)
{
    pg_st *s = st;
    if (!cb) {
        seterr(err, errlen, "expire_before: NULL callback");
        return -1;
    }
    if (ts_us <= PG_MIN_TS_US)
        return 0; /* nothing can be older */
    stmt q, del;
    memset(&q, 0, sizeof q);
    memset(&del, 0, sizeof del);
    sql_add(&q, "SELECT " EVENT_COLS " FROM dspex_events WHERE ");
    bind_i64(&q, "ts < ", OID_TIMESTAMPTZ, ts_us - PG_EPOCH_US);
    bind_i64(&q, " AND position >= ", OID_INT8, u64_to_i64_sat(pos_from));
    bind_i64(&q, " AND position <= ", OID_INT8, u64_to_i64_sat(pos_to));
    sql_add(&q, " ORDER BY position");
    sql_add(&del, "DELETE FROM dspex_events WHERE ");
    bind_i64(&del, "ts < ", OID_TIMESTAMPTZ, ts_us - PG_EPOCH_US);
    bind_i64(&del, " AND position >= ", OID_INT8, u64_to_i64_sat(pos_from));
    bind_i64(&del, " AND position <= ", OID_INT8, u64_to_i64_sat(pos_to));
    for (int attempt = 0;; attempt++) {
        size_t called = 0;
        if (ensure_conn(s, err, errlen))
            return -1;
        if (expire_once(s, &q, &del, cb, ctx, &called, err, errlen) == 0)
            return 0;
        if (attempt > 0 || called || !conn_lost(s))
            return -1;
    }
}

const dx_ev_backend_ops dx_ev_pg_ops = {
    .name = "postgres",
    .open = pg_open,
    .write_batch = pg_write_batch,
    .query = pg_query,
    .max_position = pg_max_position,
    .session_max_seq = pg_session_max_seq,
    .put_snapshot = pg_put_snapshot,
    .latest_snapshot = pg_latest_snapshot,
    .expire_before = pg_expire_before,
    .close = pg_close,
};
