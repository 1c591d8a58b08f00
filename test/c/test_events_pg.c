/* cmocka tests of the PostgreSQL event backend (c_src/events/pg.c) against a real server.
 *
 * Needs DX_PG_URL (a libpq conninfo of a database where the tests may create schemas)
 * and DX_PG_CTL (test/pg/pg_ctl.sh, used to restart and stop the server mid-run).
 * `make test-events-pg` starts a throwaway server and sets both.
 * Every test opens the backend on its own fresh schema (search_path in the conninfo),
 * and checks the result against what it wrote, computed here independently. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

/* Debian keeps libpq-fe.h in /usr/include/postgresql: found without -I flags as well */
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

static const dx_ev_backend_ops *B = &dx_ev_pg_ops;
static const char *g_url, *g_ctl;
static PGconn *g_admin;
static int g_scale = 1; /* DX_TEST_SCALE (valgrind): smaller data sets */

#define BASE_TS INT64_C(1764979200000000) /* 2025-12-06 00:00:00 UTC, in microseconds */

/* ---- server helpers ----------------------------------------------------------------- */

static void no_notices(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

static PGconn *admin(void)
{
    if (!g_admin) {
        g_admin = PQconnectdb(g_url);
        PQsetNoticeProcessor(g_admin, no_notices, NULL);
    }
    if (PQstatus(g_admin) != CONNECTION_OK)
        PQreset(g_admin);
    if (PQstatus(g_admin) != CONNECTION_OK)
        fail_msg("admin connection: %s", PQerrorMessage(g_admin));
    return g_admin;
}

/* Runs SQL on the admin connection; returns the first value of the first row (static), or "". */
static const char *sql1(const char *fmt, ...)
{
    static char out[256];
    char q[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q, sizeof q, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(admin(), q);
    ExecStatusType st = PQresultStatus(r);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        fail_msg("%s: %s", q, PQresultErrorMessage(r));
    out[0] = '\0';
    if (st == PGRES_TUPLES_OK && PQntuples(r) > 0 && PQnfields(r) > 0)
        snprintf(out, sizeof out, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    return out;
}

static void ctl(const char *cmd)
{
    char c[1024];
    snprintf(c, sizeof c, "%s %s", g_ctl, cmd);
    assert_int_equal(system(c), 0);
}

/* A fresh schema and the conninfo that makes it the backend's. */
typedef struct {
    char schema[64];
    char target[1024];
} fresh;

static void fresh_schema(fresh *f)
{
    static int n;
    snprintf(f->schema, sizeof f->schema, "dxt_%d_%d", (int)getpid(), ++n);
    sql1("DROP SCHEMA IF EXISTS %s CASCADE", f->schema);
    sql1("CREATE SCHEMA %s", f->schema);
    snprintf(f->target, sizeof f->target, "%s options='-csearch_path=%s'", g_url, f->schema);
}

static void *open_ok(const fresh *f)
{
    void *st = NULL;
    char err[512] = "";
    int rc = B->open(f->target, &st, err, sizeof err);
    if (rc != 0)
        fail_msg("open: %s", err);
    assert_non_null(st);
    return st;
}

static long count_rows(const fresh *f)
{
    return atol(sql1("SELECT count(*) FROM %s.dspex_events", f->schema));
}

/* ---- records ------------------------------------------------------------------------ */

static const char *SESSIONS[] = {"s-alpha", "s-beta", "s\xff\x00gamma"}; /* the last is not UTF-8, has a NUL */
static const size_t SESSION_LENS[] = {7, 6, 8};
static const char *TYPES[] = {"variable_updated", "variable_created", "lock_acquired"};
static const char *PRINCIPALS[] = {"", "alice", "bob"};
static const char *VARIABLES[] = {"", "temperature", "top_k", "prompt"};

/* A data set: records plus the storage their pointers refer to. */
typedef struct {
    dx_ev_rec *r;
    uint8_t (*data)[24];
    size_t n;
} dataset;

static void rec_fill(dx_ev_rec *r, uint8_t *data, int sess, uint64_t seq, int64_t ts, int k)
{
    memset(r, 0, sizeof *r);
    r->sequence = seq;
    r->ts_us = ts;
    snprintf(r->id, sizeof r->id, "0190c0de-0000-7000-8000-%012llx", (unsigned long long)(sess * 1000000 + seq));
    r->session = SESSIONS[sess];
    r->session_len = SESSION_LENS[sess];
    r->type = TYPES[k % 3];
    r->type_len = strlen(r->type);
    r->variable = VARIABLES[k % 4];
    r->variable_len = strlen(r->variable);
    r->principal = PRINCIPALS[k % 3 == 0 ? 0 : (k / 3) % 2 + 1];
    r->principal_len = strlen(r->principal);
    r->changed_by = "optimizer-7";
    r->changed_by_len = 11;
    r->node = "dspex@host1";
    r->node_len = 11;
    for (int i = 0; i < 24; i++)
        data[i] = (uint8_t)(seq * 31 + (uint64_t)i * 7 + (uint64_t)sess); /* includes zero bytes */
    data[0] = 131;                                                   /* ETF version byte */
    r->data = data;
    r->data_len = 1 + (seq % 24);
    r->meta = (const uint8_t *)"\x83\x6a";
    r->meta_len = 2;
}

/* n records over `sessions` sessions, round robin, sequences from seq0 per session,
 * ts one millisecond apart from ts0. */
static dataset mk_dataset(size_t n, int sessions, uint64_t seq0, int64_t ts0)
{
    dataset d = {calloc(n, sizeof(dx_ev_rec)), calloc(n, 24), n};
    assert_non_null(d.r);
    assert_non_null(d.data);
    for (size_t i = 0; i < n; i++) {
        int sess = (int)(i % (size_t)sessions);
        rec_fill(&d.r[i], d.data[i], sess, seq0 + i / (size_t)sessions, ts0 + (int64_t)i * 1000, (int)i);
    }
    return d;
}

static void free_dataset(dataset *d)
{
    free(d->r);
    free(d->data);
}

static void write_ok(void *st, dx_ev_rec *r, size_t n)
{
    char err[512] = "";
    if (B->write_batch(st, r, n, err, sizeof err) != 0)
        fail_msg("write_batch: %s", err);
}

/* ---- reading back ------------------------------------------------------------------- */

typedef struct {
    uint64_t position, sequence;
    int64_t ts;
    char id[37];
    char session[16];
    size_t session_len;
    char type[24], variable[24], principal[16];
    uint8_t data[32];
    size_t data_len, meta_len;
    int changed_by_ok, node_ok;
} row;

typedef struct {
    row *rows;
    size_t n, cap;
    size_t stop_after; /* 0 = never stop */
} rows;

static void copy_str(char *dst, size_t cap, const char *p, size_t n)
{
    assert_true(n < cap);
    memcpy(dst, p, n);
    dst[n] = '\0';
}

static int collect(void *ctx, const dx_ev_rec *r)
{
    rows *rs = ctx;
    if (rs->n == rs->cap) {
        rs->cap = rs->cap ? rs->cap * 2 : 64;
        rs->rows = realloc(rs->rows, rs->cap * sizeof(row));
        assert_non_null(rs->rows);
    }
    row *w = &rs->rows[rs->n++];
    memset(w, 0, sizeof *w);
    w->position = r->position;
    w->sequence = r->sequence;
    w->ts = r->ts_us;
    memcpy(w->id, r->id, sizeof w->id);
    assert_true(r->session_len < sizeof w->session);
    memcpy(w->session, r->session, r->session_len);
    w->session_len = r->session_len;
    copy_str(w->type, sizeof w->type, r->type, r->type_len);
    copy_str(w->variable, sizeof w->variable, r->variable, r->variable_len);
    copy_str(w->principal, sizeof w->principal, r->principal, r->principal_len);
    assert_true(r->data_len <= sizeof w->data);
    memcpy(w->data, r->data, r->data_len);
    w->data_len = r->data_len;
    w->meta_len = r->meta_len;
    w->changed_by_ok = r->changed_by_len == 11 && memcmp(r->changed_by, "optimizer-7", 11) == 0;
    w->node_ok = r->node_len == 11 && memcmp(r->node, "dspex@host1", 11) == 0;
    return rs->stop_after && rs->n >= rs->stop_after;
}

static rows query_ok(void *st, const dx_ev_query *q)
{
    rows rs = {0};
    char err[512] = "";
    if (B->query(st, q, collect, &rs, err, sizeof err) != 0)
        fail_msg("query: %s", err);
    return rs;
}

static int rec_equals_row(const dx_ev_rec *r, const row *w)
{
    return r->position == w->position && r->sequence == w->sequence && r->ts_us == w->ts &&
           strcmp(r->id, w->id) == 0 && r->session_len == w->session_len &&
           memcmp(r->session, w->session, r->session_len) == 0 && strlen(w->type) == r->type_len &&
           memcmp(r->type, w->type, r->type_len) == 0 && strlen(w->variable) == r->variable_len &&
           memcmp(r->variable, w->variable, r->variable_len) == 0 && strlen(w->principal) == r->principal_len &&
           memcmp(r->principal, w->principal, r->principal_len) == 0 && r->data_len == w->data_len &&
           memcmp(r->data, w->data, r->data_len) == 0 && r->meta_len == w->meta_len && w->changed_by_ok &&
           w->node_ok;
}

/* ---- tests -------------------------------------------------------------------------- */

static void schema_is_created_once_with_indexes(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    B->close(st);
    st = open_ok(&f); /* a second open finds the schema and keeps it */
    assert_string_equal(sql1("SELECT count(*) FROM pg_tables WHERE schemaname = '%s'"
                             " AND tablename IN ('dspex_events', 'dspex_event_snapshots', 'dspex_event_schema')",
                             f.schema),
                        "3");
    assert_string_equal(sql1("SELECT string_agg(indexname, ',' ORDER BY indexname) FROM pg_indexes"
                             " WHERE schemaname = '%s' AND tablename = 'dspex_events'",
                             f.schema),
                        "dspex_events_pkey,dspex_events_principal,dspex_events_session_sequence,"
                        "dspex_events_ts,dspex_events_type");
    assert_string_equal(sql1("SELECT string_agg(version::text, ',') FROM %s.dspex_event_schema", f.schema), "1");
    assert_string_equal(sql1("SELECT attidentity FROM pg_attribute WHERE attrelid = '%s.dspex_events'::regclass"
                             " AND attname = 'position'",
                             f.schema),
                        "a");
    uint64_t v = 99;
    char err[256];
    assert_int_equal(B->max_position(st, &v, err, sizeof err), 0);
    assert_int_equal(v, 0);
    v = 99;
    assert_int_equal(B->session_max_seq(st, "nobody", 6, &v, err, sizeof err), 0);
    assert_int_equal(v, 0);
    B->close(st);

    /* a schema written by a newer build is refused, with the reason */
    sql1("UPDATE %s.dspex_event_schema SET version = 99", f.schema);
    st = (void *)1;
    err[0] = '\0';
    assert_int_equal(B->open(f.target, &st, err, sizeof err), -1);
    assert_null(st);
    assert_non_null(strstr(err, "schema version 99 is newer"));
}

static void batch_positions_follow_array_order(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    dataset d = mk_dataset(1000, 3, 1, BASE_TS);
    write_ok(st, d.r, d.n);
    for (size_t i = 0; i < d.n; i++) {
        assert_true(d.r[i].position > 0);
        if (i)
            assert_true(d.r[i].position > d.r[i - 1].position);
    }
    uint64_t mp = 0, ms = 0;
    char err[256];
    assert_int_equal(B->max_position(st, &mp, err, sizeof err), 0);
    assert_int_equal(mp, d.r[d.n - 1].position);
    assert_int_equal(B->session_max_seq(st, SESSIONS[0], SESSION_LENS[0], &ms, err, sizeof err), 0);
    assert_int_equal(ms, 334); /* 1000 over 3 sessions: 334, 333, 333 */
    assert_int_equal(B->session_max_seq(st, SESSIONS[2], SESSION_LENS[2], &ms, err, sizeof err), 0);
    assert_int_equal(ms, 333);

    /* a second batch continues after the first */
    dataset d2 = mk_dataset(10, 1, 400, BASE_TS + 2000000);
    write_ok(st, d2.r, d2.n);
    assert_true(d2.r[0].position > d.r[d.n - 1].position);

    /* every field round-trips byte for byte (the third session is not UTF-8 and has a NUL) */
    dx_ev_query q = {0};
    rows rs = query_ok(st, &q);
    assert_int_equal(rs.n, 1010);
    for (size_t i = 0; i < d.n; i++)
        assert_true(rec_equals_row(&d.r[i], &rs.rows[i]));
    for (size_t i = 0; i < d2.n; i++)
        assert_true(rec_equals_row(&d2.r[i], &rs.rows[d.n + i]));
    free(rs.rows);

    /* empty batch: nothing to do */
    assert_int_equal(B->write_batch(st, d.r, 0, err, sizeof err), 0);
    free_dataset(&d);
    free_dataset(&d2);
    B->close(st);
}

static void retry_is_idempotent(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    dataset d = mk_dataset(20, 2, 1, BASE_TS);
    write_ok(st, d.r, 10);
    uint64_t first[10];
    for (int i = 0; i < 10; i++)
        first[i] = d.r[i].position;

    /* the same batch again: nothing new, the stored positions come back */
    for (int i = 0; i < 10; i++)
        d.r[i].position = 0;
    write_ok(st, d.r, 10);
    for (int i = 0; i < 10; i++)
        assert_int_equal(d.r[i].position, first[i]);
    assert_int_equal(count_rows(&f), 10);

    /* a batch mixing stored and new records, interleaved, with a duplicate inside it */
    dx_ev_rec mix[13];
    size_t order[13] = {10, 0, 11, 12, 5, 13, 14, 9, 15, 16, 17, 18, 19};
    for (int i = 0; i < 13; i++)
        mix[i] = d.r[order[i]];
    dx_ev_rec dup[14];
    memcpy(dup, mix, sizeof mix);
    dup[13] = d.r[12]; /* the same key twice in one batch */
    write_ok(st, dup, 14);
    assert_int_equal(dup[1].position, first[0]);
    assert_int_equal(dup[4].position, first[5]);
    assert_int_equal(dup[7].position, first[9]);
    uint64_t last = first[9];
    for (int i = 0; i < 13; i++) {
        if (order[i] < 10)
            continue;
        assert_true(dup[i].position > last); /* new ones in array order, after the stored ones */
        last = dup[i].position;
    }
    assert_int_equal(dup[13].position, dup[3].position);
    assert_int_equal(count_rows(&f), 20);

    /* the content of a retried record is not overwritten */
    dx_ev_rec changed = d.r[0];
    changed.type = "something_else";
    changed.type_len = 14;
    write_ok(st, &changed, 1);
    assert_int_equal(changed.position, first[0]);
    dx_ev_query q = {.pos_from = first[0], .pos_to = first[0]};
    rows rs = query_ok(st, &q);
    assert_int_equal(rs.n, 1);
    assert_string_equal(rs.rows[0].type, d.r[0].type);
    free(rs.rows);

    /* a record the schema cannot hold fails the batch before anything is sent */
    dx_ev_rec bad[2] = {d.r[0], d.r[1]};
    bad[1].sequence = 0;
    char err[256] = "";
    assert_int_equal(B->write_batch(st, bad, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "record 1: sequence 0 out of range"));
    bad[1] = d.r[1];
    bad[1].id[3] = '\n';
    assert_int_equal(B->write_batch(st, bad, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "id is not printable ASCII"));
    assert_int_equal(count_rows(&f), 20);
    free_dataset(&d);
    B->close(st);
}


/* A write probes the (session, sequence) index for the records it skipped; it never
 * scans the table. (With a join instead, the prepared statement's cached generic plan,
 * made while the table was small, kept scanning the whole table at every write.) The
 * writer's table statistics are read once its backend has flushed them (bounded poll
 * on the inserted-rows counter). Checked: the join version reads rows here. */
static void writes_never_scan_the_events_table(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    sql1("ALTER TABLE %s.dspex_events SET (autovacuum_enabled = false)", f.schema);
    dataset d = mk_dataset(300, 3, 1, BASE_TS);
    for (size_t i = 0; i < 20; i++) /* enough executions for a generic plan */
        write_ok(st, d.r + i, 1);
    write_ok(st, d.r + 20, 200);
    write_ok(st, d.r, 30); /* a retry: every record is looked up */
    write_ok(st, d.r + 220, 80);
    B->close(st); /* the backend flushes its statistics when it exits */
    int flushed = 0;
    for (int i = 0; i < 3000 && !flushed; i++) {
        flushed = atol(sql1("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = '%s.dspex_events'::regclass",
                            f.schema)) == 300;
        if (!flushed)
            usleep(10000);
    }
    assert_true(flushed);
    /* tuples read by sequential scans (creating the indexes scanned the empty table) */
    assert_string_equal(
        sql1("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relid = '%s.dspex_events'::regclass", f.schema),
        "0");
    free_dataset(&d);
}

/* The same key inserted at the same moment by another writer: the statement's snapshot
 * cannot see the other's row, so the backend looks the stored position up afterwards. */
typedef struct {
    void *st;
    dx_ev_rec rec;
    int rc;
    char err[256];
} racer;

static void *race_writer(void *arg)
{
    racer *r = arg;
    r->rc = B->write_batch(r->st, &r->rec, 1, r->err, sizeof r->err);
    return NULL;
}

static void concurrent_duplicate_gets_the_stored_position(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    dataset d = mk_dataset(1, 1, 1, BASE_TS);
    PGconn *other = PQconnectdb(f.target);
    assert_int_equal(PQstatus(other), CONNECTION_OK);
    PQclear(PQexec(other, "BEGIN"));
    PGresult *res = PQexec(other, "INSERT INTO dspex_events (session, sequence, ts, id, type, variable, principal,"
                                  " changed_by, node, data, meta) VALUES ('s-alpha', 1, now(), 'x', 'other', '', '',"
                                  " '', '', '', '') RETURNING position");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    uint64_t theirs = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);

    racer r = {.st = st, .rec = d.r[0]};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, race_writer, &r), 0);
    /* wait (bounded) until the writer blocks on the other transaction's row */
    int blocked = 0;
    for (int i = 0; i < 3000 && !blocked; i++) {
        blocked = atoi(sql1("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dspex_events'"
                            " AND wait_event_type = 'Lock'")) > 0;
        if (!blocked)
            usleep(10000);
    }
    assert_true(blocked);
    PQclear(PQexec(other, "COMMIT"));
    pthread_join(t, NULL);
    if (r.rc != 0)
        fail_msg("write_batch: %s", r.err);
    assert_int_equal(r.rec.position, theirs);
    assert_int_equal(count_rows(&f), 1);
    PQfinish(other);
    free_dataset(&d);
    B->close(st);
}

/* Reference filter over the written records, for the query tests. */
static int matches(const dx_ev_rec *r, const dx_ev_query *q)
{
    if (q->session_len && (r->session_len != q->session_len || memcmp(r->session, q->session, q->session_len)))
        return 0;
    if (r->sequence < q->seq_from || (q->seq_to && r->sequence > q->seq_to))
        return 0;
    if (r->position < q->pos_from || (q->pos_to && r->position > q->pos_to))
        return 0;
    if ((q->ts_from && r->ts_us < q->ts_from) || (q->ts_to && r->ts_us > q->ts_to))
        return 0;
    if (q->ntypes) {
        int any = 0;
        for (size_t i = 0; i < q->ntypes; i++)
            any |= r->type_len == q->type_lens[i] && memcmp(r->type, q->types[i], r->type_len) == 0;
        if (!any)
            return 0;
    }
    if (q->principal_len && (r->principal_len != q->principal_len || memcmp(r->principal, q->principal, q->principal_len)))
        return 0;
    if (q->variable_len && (r->variable_len != q->variable_len || memcmp(r->variable, q->variable, q->variable_len)))
        return 0;
    return 1;
}

static void check_query(void *st, const dataset *d, const dx_ev_query *q, const char *label)
{
    /* expected: the matching records in position order (= array order), reversed when
     * descending, cut at the limit */
    size_t *idx = malloc(d->n * sizeof *idx), m = 0;
    assert_non_null(idx);
    for (size_t i = 0; i < d->n; i++)
        if (matches(&d->r[i], q))
            idx[m++] = i;
    if (q->descending)
        for (size_t i = 0; i < m / 2; i++) {
            size_t t = idx[i];
            idx[i] = idx[m - 1 - i];
            idx[m - 1 - i] = t;
        }
    if (q->limit && m > q->limit)
        m = q->limit;
    rows rs = query_ok(st, q);
    if (rs.n != m)
        fail_msg("%s: %zu rows, expected %zu", label, rs.n, m);
    for (size_t i = 0; i < m; i++)
        if (!rec_equals_row(&d->r[idx[i]], &rs.rows[i]))
            fail_msg("%s: row %zu is position %llu, expected %llu", label, i,
                     (unsigned long long)rs.rows[i].position, (unsigned long long)d->r[idx[i]].position);
    free(rs.rows);
    free(idx);
}

static void every_query_filter(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    /* 2 500 records: reads without a limit go through the cursor in pages of 1 000 */
    size_t n = g_scale > 1 ? 1200 : 2500;
    dataset d = mk_dataset(n, 3, 1, BASE_TS);
    for (size_t i = 0; i < n; i += 500)
        write_ok(st, d.r + i, n - i < 500 ? n - i : 500);
    uint64_t p0 = d.r[0].position;

    const char *t1[] = {"lock_acquired"};
    size_t l1[] = {13};
    const char *t2[] = {"variable_created", "lock_acquired", "not_a_type"};
    size_t l2[] = {16, 13, 10};
    struct {
        const char *label;
        dx_ev_query q;
    } cases[] = {
        {"all", {0}},
        {"all descending", {.descending = 1}},
        {"session", {.session = SESSIONS[1], .session_len = SESSION_LENS[1]}},
        {"session (not UTF-8)", {.session = SESSIONS[2], .session_len = SESSION_LENS[2]}},
        {"session unknown", {.session = "nobody", .session_len = 6}},
        {"session + seq range", {.session = SESSIONS[0], .session_len = SESSION_LENS[0], .seq_from = 100, .seq_to = 149}},
        {"seq from, all sessions", {.seq_from = 800}},
        {"seq to", {.seq_to = 3}},
        {"session + seq descending + limit",
         {.session = SESSIONS[0], .session_len = SESSION_LENS[0], .seq_from = 10, .descending = 1, .limit = 7}},
        {"pos range", {.pos_from = p0 + 17, .pos_to = p0 + 1216}},
        {"pos from", {.pos_from = p0 + n - 5}},
        {"ts range", {.ts_from = BASE_TS + 100 * 1000, .ts_to = BASE_TS + 199 * 1000}},
        {"ts from", {.ts_from = BASE_TS + 1000 * 1000}},
        {"ts to (exact bound)", {.ts_to = BASE_TS + 2 * 1000}},
        {"one type", {.types = t1, .type_lens = l1, .ntypes = 1}},
        {"two types and an unknown one", {.types = t2, .type_lens = l2, .ntypes = 3}},
        {"principal", {.principal = "alice", .principal_len = 5}},
        {"variable", {.variable = "top_k", .variable_len = 5}},
        {"variable + principal + type",
         {.variable = "prompt", .variable_len = 6, .principal = "bob", .principal_len = 3, .types = t1,
          .type_lens = l1, .ntypes = 1}},
        {"limit", {.limit = 10}},
        {"limit above a page", {.limit = 1500}},
        {"limit + descending + ts", {.ts_to = BASE_TS + 500 * 1000, .limit = 25, .descending = 1}},
        {"everything at once",
         {.session = SESSIONS[1], .session_len = SESSION_LENS[1], .seq_from = 5, .seq_to = 700, .pos_from = p0 + 3,
          .pos_to = p0 + 2000, .ts_from = BASE_TS + 30 * 1000, .ts_to = BASE_TS + 1900 * 1000, .types = t2,
          .type_lens = l2, .ntypes = 3, .principal = "alice", .principal_len = 5, .limit = 40, .descending = 1}},
        {"huge bounds", {.seq_to = UINT64_MAX, .pos_to = UINT64_MAX, .ts_from = INT64_MIN, .ts_to = INT64_MAX,
                         .limit = SIZE_MAX}},
        {"empty ranges", {.seq_from = UINT64_MAX}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_query(st, &d, &cases[i].q, cases[i].label);

    /* the callback stops the read early, on both paths (cursor and single round trip) */
    for (int lim = 0; lim < 2; lim++) {
        dx_ev_query q = {.limit = lim ? 500 : 0};
        rows rs = {.stop_after = lim ? 321 : 1100}; /* the cursor case stops in its second page */
        char err[256];
        assert_int_equal(B->query(st, &q, collect, &rs, err, sizeof err), 0);
        assert_int_equal(rs.n, rs.stop_after);
        assert_true(rec_equals_row(&d.r[rs.n - 1], &rs.rows[rs.n - 1]));
        free(rs.rows);
    }
    /* the connection is usable after an early stop */
    uint64_t mp;
    char err[256];
    assert_int_equal(B->max_position(st, &mp, err, sizeof err), 0);
    assert_int_equal(mp, d.r[n - 1].position);
    free_dataset(&d);
    B->close(st);
}

typedef struct {
    int calls;
    uint64_t seq;
    int64_t ts;
    char blob[32];
    size_t blob_len;
} snapctx;

static int take_snap(void *ctx, const dx_ev_snapshot *s)
{
    snapctx *c = ctx;
    c->calls++;
    c->seq = s->sequence;
    c->ts = s->ts_us;
    assert_true(s->blob_len <= sizeof c->blob);
    memcpy(c->blob, s->blob, s->blob_len);
    c->blob_len = s->blob_len;
    assert_int_equal(s->session_len, 7);
    assert_memory_equal(s->session, "s-alpha", 7);
    return 0;
}

static snapctx latest(void *st, const char *session, uint64_t max_seq, int64_t max_ts)
{
    snapctx c = {0};
    char err[256];
    if (B->latest_snapshot(st, session, strlen(session), max_seq, max_ts, take_snap, &c, err, sizeof err))
        fail_msg("latest_snapshot: %s", err);
    return c;
}

static void snapshots_latest_at_or_before(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    char err[256];
    for (int i = 1; i <= 3; i++) {
        char blob[8] = {(char)131, 0, (char)i, 0, 'x', 0, 0, (char)i};
        dx_ev_snapshot s = {"s-alpha", 7, (uint64_t)(10 * i), BASE_TS + i * 1000000, (const uint8_t *)blob, 8};
        assert_int_equal(B->put_snapshot(st, &s, err, sizeof err), 0);
    }
    dx_ev_snapshot other = {"s-beta", 6, 50, BASE_TS + 9000000, (const uint8_t *)"b", 1};
    assert_int_equal(B->put_snapshot(st, &other, err, sizeof err), 0);

    snapctx c = latest(st, "s-alpha", 0, 0);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.seq, 30);
    assert_int_equal(c.ts, BASE_TS + 3000000);
    assert_int_equal(c.blob_len, 8);
    assert_memory_equal(c.blob, ((char[]){(char)131, 0, 3, 0, 'x', 0, 0, 3}), 8);
    assert_int_equal(latest(st, "s-alpha", 25, 0).seq, 20);
    assert_int_equal(latest(st, "s-alpha", 20, 0).seq, 20); /* inclusive */
    assert_int_equal(latest(st, "s-alpha", 0, BASE_TS + 1500000).seq, 10);
    assert_int_equal(latest(st, "s-alpha", 0, BASE_TS + 2000000).seq, 20); /* inclusive */
    assert_int_equal(latest(st, "s-alpha", 25, BASE_TS + 1999999).seq, 10); /* both bounds */
    assert_int_equal(latest(st, "s-alpha", 9, 0).calls, 0);                 /* none: cb not called */
    assert_int_equal(latest(st, "s-alpha", 0, BASE_TS).calls, 0);
    assert_int_equal(latest(st, "s-gamma", 0, 0).calls, 0);

    /* the same (session, sequence) again replaces it */
    dx_ev_snapshot again = {"s-alpha", 7, 20, BASE_TS + 2500000, (const uint8_t *)"new", 3};
    assert_int_equal(B->put_snapshot(st, &again, err, sizeof err), 0);
    c = latest(st, "s-alpha", 29, 0);
    assert_int_equal(c.seq, 20);
    assert_int_equal(c.ts, BASE_TS + 2500000);
    assert_int_equal(c.blob_len, 3);
    assert_memory_equal(c.blob, "new", 3);
    assert_string_equal(sql1("SELECT count(*) FROM %s.dspex_event_snapshots", f.schema), "4");
    B->close(st);
}

typedef struct {
    uint64_t pos[4096];
    size_t n;
    size_t refuse_at; /* 0 = accept all */
} archive;

static int archive_row(void *ctx, const dx_ev_rec *r)
{
    archive *a = ctx;
    assert_true(a->n < 4096);
    a->pos[a->n++] = r->position;
    return a->refuse_at && a->n >= a->refuse_at;
}

static void expire_before_archives_then_deletes(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    size_t n = 1500; /* more than a cursor page */
    dataset d = mk_dataset(n, 3, 1, BASE_TS);
    write_ok(st, d.r, n);
    char err[256];
    int64_t cut = BASE_TS + 1200 * 1000; /* records 0..1199 are older */

    /* the archiver refuses at the 700th row: nothing is deleted */
    archive a = {.refuse_at = 700};
    assert_int_equal(B->expire_before(st, cut, 0, UINT64_MAX, archive_row, &a, err, sizeof err), 0);
    assert_int_equal(a.n, 700);
    assert_int_equal(count_rows(&f), (long)n);

    archive b = {0};
    assert_int_equal(B->expire_before(st, cut, 0, UINT64_MAX, archive_row, &b, err, sizeof err), 0);
    assert_int_equal(b.n, 1200);
    for (size_t i = 0; i < b.n; i++)
        assert_int_equal(b.pos[i], d.r[i].position); /* every older event, in position order */
    dx_ev_query q = {0};
    rows rs = query_ok(st, &q);
    assert_int_equal(rs.n, n - 1200);
    for (size_t i = 0; i < rs.n; i++)
        assert_true(rec_equals_row(&d.r[1200 + i], &rs.rows[i]));
    free(rs.rows);

    /* nothing older left: the callback is not called */
    archive c = {0};
    assert_int_equal(B->expire_before(st, cut, 0, UINT64_MAX, archive_row, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 0);
    assert_int_equal(B->expire_before(st, INT64_MIN, 0, UINT64_MAX, archive_row, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 0);
    free_dataset(&d);
    B->close(st);
}

/* All sequences 1..n of one session, in order, with increasing positions. */
static void assert_complete_session(void *st, const char *session, size_t slen, uint64_t n)
{
    dx_ev_query q = {.session = session, .session_len = slen};
    rows rs = query_ok(st, &q);
    assert_int_equal(rs.n, n);
    for (size_t i = 0; i < rs.n; i++) {
        assert_int_equal(rs.rows[i].sequence, i + 1);
        if (i)
            assert_true(rs.rows[i].position > rs.rows[i - 1].position);
    }
    free(rs.rows);
}

/* A row callback that restarts the server when it has seen `at` rows. */
typedef struct {
    size_t at, seen;
} restarter;

static int restart_at(void *ctx, const dx_ev_rec *r)
{
    (void)r;
    restarter *x = ctx;
    if (++x->seen == x->at)
        ctl("restart");
    return 0;
}

static void reconnects_after_server_restart(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    dataset d = mk_dataset(400, 1, 1, BASE_TS);
    char err[512];
    write_ok(st, d.r, 100);

    /* restart between two batches: the next write meets a dead connection, reconnects
     * once and succeeds */
    ctl("restart");
    write_ok(st, d.r + 100, 100);
    assert_complete_session(st, SESSIONS[0], SESSION_LENS[0], 200);

    /* restart again: a read reconnects too */
    ctl("restart");
    uint64_t mp = 0;
    assert_int_equal(B->max_position(st, &mp, err, sizeof err), 0);
    assert_int_equal(mp, d.r[199].position);

    /* server down: the write fails with a clear error, and nothing is half-written */
    ctl("down");
    err[0] = '\0';
    assert_int_equal(B->write_batch(st, d.r + 200, 100, err, sizeof err), -1);
    assert_non_null(strstr(err, "connection lost"));
    /* still down: the next call tries to reconnect and says so */
    assert_int_equal(B->max_position(st, &mp, err, sizeof err), -1);
    assert_non_null(strstr(err, "connection lost: reconnect failed"));
    ctl("start");
    /* the writer's retry of the same batch, then the next one */
    write_ok(st, d.r + 200, 100);
    write_ok(st, d.r + 300, 100);
    assert_complete_session(st, SESSIONS[0], SESSION_LENS[0], 400);
    for (size_t i = 1; i < 400; i++)
        assert_true(d.r[i].position > d.r[i - 1].position);

    /* the server restarts in the middle of a long read: the rows already given stay
     * given, the read fails (a retry would give them twice), the next read works */
    /* a read whose rows all arrived before the server went away is complete */
    restarter whole = {.at = 400};
    dx_ev_query all = {0};
    if (B->query(st, &all, restart_at, &whole, err, sizeof err))
        fail_msg("query: %s", err);
    assert_int_equal(whole.seen, 400);
    /* more than a cursor page: the restart at row 150 breaks the next page's fetch */
    dataset more = mk_dataset(1100, 1, 1, BASE_TS + 1000000);
    for (size_t i = 0; i < more.n; i++) {
        more.r[i].session = SESSIONS[1];
        more.r[i].session_len = SESSION_LENS[1];
    }
    write_ok(st, more.r, more.n);
    restarter rs = {.at = 150};
    err[0] = '\0';
    assert_int_equal(B->query(st, &all, restart_at, &rs, err, sizeof err), -1);
    assert_true(rs.seen >= 150 && rs.seen < 1500);
    assert_non_null(strstr(err, "connection lost"));
    free_dataset(&more);
    /* ... and in the middle of an expire: nothing is deleted */
    restarter ex = {.at = 10};
    assert_int_equal(B->expire_before(st, BASE_TS + 100 * 1000, 0, UINT64_MAX, restart_at, &ex, err, sizeof err), -1);
    assert_int_equal(ex.seen, 100); /* the page was read; the delete found the server gone */
    assert_complete_session(st, SESSIONS[0], SESSION_LENS[0], 400);
    free_dataset(&d);
    B->close(st);
}

static void bad_conninfo_is_a_clear_error(void **state)
{
    (void)state;
    void *st = (void *)1;
    char err[512] = "";
    assert_int_equal(B->open("host=127.0.0.1 port=1 connect_timeout=5", &st, err, sizeof err), -1);
    assert_null(st);
    assert_non_null(strstr(err, "connect failed"));
    assert_non_null(strstr(err, "127.0.0.1"));
    assert_null(strchr(err, '\n'));

    err[0] = '\0';
    assert_int_equal(B->open("this is not = a conninfo '", &st, err, sizeof err), -1);
    assert_non_null(strstr(err, "connect failed"));

    char target[1200];
    snprintf(target, sizeof target, "%s dbname=dx_no_such_database", g_url);
    err[0] = '\0';
    assert_int_equal(B->open(target, &st, err, sizeof err), -1);
    assert_non_null(strstr(err, "dx_no_such_database\" does not exist"));

    /* a tiny error buffer is truncated, not overrun */
    char small[8];
    memset(small, 'Z', sizeof small);
    assert_int_equal(B->open("host=127.0.0.1 port=1 connect_timeout=5", &st, small, 5), -1);
    assert_int_equal(strlen(small), 4);
    assert_int_equal(small[5], 'Z');
}

/* Several nodes append to one database: positions are unique, and a reader tailing by
 * position never sees one before all the smaller ones are visible. */
typedef struct {
    const char *target;
    int node;
    size_t batches, per_batch;
    dataset d;
    int rc;
    char err[256];
} node_writer;

static void *node_write(void *arg)
{
    node_writer *w = arg;
    void *st = NULL;
    w->rc = B->open(w->target, &st, w->err, sizeof w->err);
    for (size_t b = 0; w->rc == 0 && b < w->batches; b++)
        w->rc = B->write_batch(st, w->d.r + b * w->per_batch, w->per_batch, w->err, sizeof w->err);
    B->close(st);
    return NULL;
}

typedef struct {
    uint64_t last;
    int gap;
} tail;

static int tail_row(void *ctx, const dx_ev_rec *r)
{
    tail *t = ctx;
    if (r->position != t->last + 1)
        t->gap = 1;
    t->last = r->position;
    return 0;
}

static void nodes_share_one_database(void **state)
{
    (void)state;
    fresh f;
    fresh_schema(&f);
    void *st = open_ok(&f);
    enum { NODES = 3 };
    node_writer w[NODES];
    pthread_t t[NODES];
    size_t batches = g_scale > 1 ? 10 : 60;
    for (int i = 0; i < NODES; i++) {
        w[i] = (node_writer){.target = f.target, .node = i, .batches = batches, .per_batch = 10};
        w[i].d = mk_dataset(batches * 10, 1, 1, BASE_TS);
        for (size_t k = 0; k < w[i].d.n; k++) { /* one session per node */
            w[i].d.r[k].session = SESSIONS[i];
            w[i].d.r[k].session_len = SESSION_LENS[i];
        }
        assert_int_equal(pthread_create(&t[i], NULL, node_write, &w[i]), 0);
    }
    /* tail while they write; positions start at 1 in a fresh schema and no write fails,
     * so the visible positions must always be exactly 1..k */
    tail tl = {0};
    char err[256];
    uint64_t total = NODES * batches * 10;
    for (int rounds = 0; tl.last < total && rounds < 100000; rounds++) {
        dx_ev_query q = {.pos_from = tl.last + 1};
        assert_int_equal(B->query(st, &q, tail_row, &tl, err, sizeof err), 0);
        assert_false(tl.gap);
    }
    for (int i = 0; i < NODES; i++) {
        pthread_join(t[i], NULL);
        if (w[i].rc)
            fail_msg("node %d: %s", i, w[i].err);
    }
    dx_ev_query q = {.pos_from = tl.last + 1};
    assert_int_equal(B->query(st, &q, tail_row, &tl, err, sizeof err), 0);
    assert_false(tl.gap);
    assert_int_equal(tl.last, total);
    for (int i = 0; i < NODES; i++) {
        assert_complete_session(st, SESSIONS[i], SESSION_LENS[i], batches * 10);
        free_dataset(&w[i].d);
    }
    B->close(st);
}


/* ---- a hostile server ----------------------------------------------------------------
 * Speaks just enough of the PostgreSQL v3 protocol (trust login, simple and extended
 * queries) to let the backend open, then answers the statement under test with
 * whatever the test scripts: too many rows, wrong column counts or types, short or
 * oversized values, NULLs, out-of-range numbers. The backend must refuse each answer
 * with an error (and, under ASan/valgrind, without touching memory it should not). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

typedef struct {
    int nf;
    uint32_t types[12];
    int nrows;
    /* writes cell (row, col) into out (up to 64 bytes) and returns its length, -1 = NULL */
    int (*cell)(int row, int col, uint8_t *out);
} answer;

typedef struct {
    int lfd, port;
    pthread_t thr;
    _Atomic(const answer *) insert, query, fetch, scalar;
} fake_pg;

static void wr(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t k = send(fd, b, n, MSG_NOSIGNAL);
        if (k <= 0)
            return;
        b += k;
        n -= (size_t)k;
    }
}

static uint32_t be32_at(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

static int rd(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t k = recv(fd, b, n, 0);
        if (k <= 0)
            return -1;
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One backend message: type, then the body (the length is filled in). */
static void msg(int fd, char type, const void *body, size_t n)
{
    uint8_t h[5] = {(uint8_t)type};
    uint32_t l = htonl((uint32_t)(n + 4));
    memcpy(h + 1, &l, 4);
    wr(fd, h, 5);
    if (n)
        wr(fd, body, n);
}

static size_t put16(uint8_t *p, uint16_t v)
{
    v = htons(v);
    memcpy(p, &v, 2);
    return 2;
}

static size_t put32(uint8_t *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
    return 4;
}

static void row_description(int fd, const answer *a)
{
    uint8_t b[1024];
    size_t n = put16(b, (uint16_t)a->nf);
    for (int i = 0; i < a->nf; i++) {
        n += (size_t)sprintf((char *)b + n, "c%d", i) + 1;
        n += put32(b + n, 0);
        n += put16(b + n, 0);
        n += put32(b + n, a->types[i]);
        n += put16(b + n, 0xFFFF);
        n += put32(b + n, 0xFFFFFFFF);
        n += put16(b + n, 1); /* binary */
    }
    msg(fd, 'T', b, n);
}

static void data_rows(int fd, const answer *a)
{
    for (int r = 0; r < a->nrows; r++) {
        uint8_t b[12 * 72], cell[64];
        size_t n = put16(b, (uint16_t)a->nf);
        for (int c = 0; c < a->nf; c++) {
            int l = a->cell(r, c, cell);
            n += put32(b + n, (uint32_t)l);
            if (l > 0) {
                memcpy(b + n, cell, (size_t)l);
                n += (size_t)l;
            }
        }
        msg(fd, 'D', b, n);
    }
    char tag[32];
    int tl = snprintf(tag, sizeof tag, "SELECT %d", a->nrows);
    msg(fd, 'C', tag, (size_t)tl + 1);
}

static int cell_int4_one(int row, int col, uint8_t *out)
{
    (void)row;
    (void)col;
    put32(out, 1);
    return 4;
}

static int cell_int8_oid(int row, int col, uint8_t *out)
{
    (void)row;
    (void)col;
    put32(out, 0);
    put32(out + 4, 16384);
    return 8;
}

static const answer A_VERSION = {1, {23}, 1, cell_int4_one};
static const answer A_OID = {1, {20}, 1, cell_int8_oid};

/* The scripted answer to a statement, by its text; NULL = a command (no rows). */
static const answer *answer_for(fake_pg *f, const char *sql)
{
    if (strstr(sql, "SELECT version FROM dspex_event_schema"))
        return &A_VERSION;
    if (strstr(sql, "regclass"))
        return &A_OID;
    if (strstr(sql, "WITH v AS"))
        return atomic_load(&f->insert);
    if (strncmp(sql, "FETCH", 5) == 0)
        return atomic_load(&f->fetch);
    if (strncmp(sql, "SELECT position, sequence", 25) == 0)
        return atomic_load(&f->query);
    if (strstr(sql, "max("))
        return atomic_load(&f->scalar);
    return NULL;
}

static void ready(int fd)
{
    msg(fd, 'Z', "I", 1);
}

static void serve(fake_pg *f, int fd)
{
    uint8_t len4[4];
    if (rd(fd, len4, 4))
        return;
    uint32_t len = be32_at(len4);
    if (len < 8 || len > 10000)
        return;
    uint8_t *startup = malloc(len);
    int bad = rd(fd, startup, len - 4);
    free(startup);
    if (bad)
        return;
    uint8_t auth[4] = {0};
    msg(fd, 'R', auth, 4);
    static const char *params[][2] = {{"server_version", "15.0"}, {"integer_datetimes", "on"},
                                      {"client_encoding", "UTF8"}, {"server_encoding", "UTF8"},
                                      {"standard_conforming_strings", "on"}};
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        char b[128];
        int n = snprintf(b, sizeof b, "%s%c%s", params[i][0], 0, params[i][1]);
        msg(fd, 'S', b, (size_t)n + 1);
    }
    uint8_t key[8] = {0, 0, 0, 1, 0, 0, 0, 2};
    msg(fd, 'K', key, 8);
    ready(fd);

    char stmts[2][4096] = {"", ""}; /* [0] unnamed, [1] the prepared insert */
    const char *portal = "";
    for (;;) {
        uint8_t h[5];
        if (rd(fd, h, 5))
            return;
        uint32_t l = be32_at(h + 1);
        if (l < 4 || l > (64u << 20))
            return;
        char *body = malloc(l - 4 + 1);
        if (rd(fd, body, l - 4)) {
            free(body);
            return;
        }
        body[l - 4] = '\0';
        switch (h[0]) {
        case 'Q': { /* simple query: a command */
            const answer *a = answer_for(f, body);
            if (a) {
                row_description(fd, a);
                data_rows(fd, a);
            } else
                msg(fd, 'C', "OK", 3);
            ready(fd);
            break;
        }
        case 'P': { /* Parse: name, query */
            const char *name = body, *q = body + strlen(body) + 1;
            snprintf(stmts[*name ? 1 : 0], sizeof stmts[0], "%s", q);
            msg(fd, '1', NULL, 0);
            break;
        }
        case 'B': { /* Bind: portal, statement */
            const char *st = body + strlen(body) + 1;
            portal = stmts[*st ? 1 : 0];
            msg(fd, '2', NULL, 0);
            break;
        }
        case 'D': {
            const answer *a = answer_for(f, portal);
            if (a)
                row_description(fd, a);
            else
                msg(fd, 'n', NULL, 0);
            break;
        }
        case 'E': {
            const answer *a = answer_for(f, portal);
            if (a)
                data_rows(fd, a);
            else
                msg(fd, 'C', "OK", 3);
            break;
        }
        case 'S':
            ready(fd);
            break;
        case 'X':
            free(body);
            return;
        default:
            break;
        }
        free(body);
    }
}

static void *fake_main(void *arg)
{
    fake_pg *f = arg;
    for (;;) {
        int fd = accept(f->lfd, NULL, NULL);
        if (fd < 0)
            return NULL;
        serve(f, fd);
        close(fd);
    }
}

static void fake_start(fake_pg *f)
{
    memset(f, 0, sizeof *f);
    f->lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(f->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(f->lfd, 4), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&a, &al), 0);
    f->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&f->thr, NULL, fake_main, f), 0);
}

static void fake_stop(fake_pg *f)
{
    shutdown(f->lfd, SHUT_RDWR);
    close(f->lfd);
    pthread_join(f->thr, NULL);
}

/* cells of a well-formed event row (position row+1, sequence row+1) */
static int good_event_cell(int row, int col, uint8_t *out)
{
    switch (col) {
    case 0:
    case 1:
        put32(out, 0);
        put32(out + 4, (uint32_t)row + 1);
        return 8;
    case 2: /* ts: 2025-01-01 in PostgreSQL microseconds */
        put32(out, 0x0002CD98);
        put32(out + 4, 0x7ED48000);
        return 8;
    case 3:
        memcpy(out, "0190c0de-0000-7000-8000-000000000001", 36);
        return 36;
    default:
        memcpy(out, "abc", 3);
        return 3;
    }
}

static int long_id_cell(int row, int col, uint8_t *out)
{
    if (col == 3) {
        memset(out, 'a', 40);
        return 40;
    }
    return good_event_cell(row, col, out);
}

static int null_session_cell(int row, int col, uint8_t *out)
{
    return col == 4 ? -1 : good_event_cell(row, col, out);
}

static int short_seq_cell(int row, int col, uint8_t *out)
{
    int l = good_event_cell(row, col, out);
    return col == 1 ? 4 : l;
}

static int huge_ts_cell(int row, int col, uint8_t *out)
{
    if (col == 2) {
        put32(out, 0x7FFFFFFF);
        put32(out + 4, 0xFFFFFFFF);
        return 8;
    }
    return good_event_cell(row, col, out);
}

static int neg_pos_cell(int row, int col, uint8_t *out)
{
    if (col == 0) {
        put32(out, 0xFFFFFFFF);
        put32(out + 4, 0xFFFFFFFF);
        return 8;
    }
    return good_event_cell(row, col, out);
}

/* insert answers: (ord, position) */
static int ins_good(int row, int col, uint8_t *out)
{
    put32(out, 0);
    put32(out + 4, (uint32_t)(col == 0 ? row + 1 : 100 + row));
    return 8;
}
static int ins_bad_ord(int row, int col, uint8_t *out)
{
    return ins_good(col == 0 ? 1 - row : row, col, out);
}
static int ins_short_pos(int row, int col, uint8_t *out)
{
    int l = ins_good(row, col, out);
    return col == 1 ? 4 : l;
}
static int ins_zero_pos(int row, int col, uint8_t *out)
{
    if (col == 1) {
        memset(out, 0, 8);
        return 8;
    }
    return ins_good(row, col, out);
}
static int ins_null_ord(int row, int col, uint8_t *out)
{
    return col == 0 ? -1 : ins_good(row, col, out);
}

static int scalar_neg(int row, int col, uint8_t *out)
{
    return neg_pos_cell(row, col, out);
}

#define EV_TYPES {20, 20, 1184, 25, 17, 17, 17, 17, 17, 17, 17, 17}

static void expect_err(int rc, const char *err, const char *want)
{
    assert_int_equal(rc, -1);
    if (!strstr(err, want))
        fail_msg("error \"%s\" does not say \"%s\"", err, want);
}

static void hostile_server_answers_are_refused(void **state)
{
    (void)state;
    fake_pg f;
    fake_start(&f);
    char target[256], err[512];
    snprintf(target, sizeof target,
             "host=127.0.0.1 port=%d user=x dbname=y sslmode=disable gssencmode=disable connect_timeout=5", f.port);
    void *st = NULL;
    if (B->open(target, &st, err, sizeof err))
        fail_msg("open against the fake server: %s", err);

    dataset d = mk_dataset(2, 1, 1, BASE_TS);
    static const answer ins_ok = {2, {20, 20}, 2, ins_good};
    atomic_store(&f.insert, &ins_ok);
    assert_int_equal(B->write_batch(st, d.r, 2, err, sizeof err), 0); /* the fake itself is right */
    assert_int_equal(d.r[0].position, 100);
    assert_int_equal(d.r[1].position, 101);
    struct {
        answer a;
        const char *want;
    } ins[] = {
        {{2, {20, 20}, 3, ins_good}, "server returned 3 rows for 2 records"},
        {{2, {20, 20}, 1, ins_good}, "server returned 1 rows for 2 records"},
        {{3, {20, 20, 20}, 2, ins_good}, "server sent 3 columns, expected 2"},
        {{2, {20, 25}, 2, ins_good}, "column 1 has type oid 25"},
        {{2, {20, 20}, 2, ins_bad_ord}, "row 0 has ordinal 2"},
        {{2, {20, 20}, 2, ins_short_pos}, "is NULL or not 8 bytes"},
        {{2, {20, 20}, 2, ins_null_ord}, "is NULL or not 8 bytes"},
        {{2, {20, 20}, 2, ins_zero_pos}, "server returned position 0"},
    };
    for (size_t i = 0; i < sizeof ins / sizeof ins[0]; i++) {
        atomic_store(&f.insert, &ins[i].a);
        err[0] = '\0';
        expect_err(B->write_batch(st, d.r, 2, err, sizeof err), err, ins[i].want);
    }

    /* reads: one round trip (limit 5), and the cursor (no limit) */
    static const answer good = {12, EV_TYPES, 5, good_event_cell};
    atomic_store(&f.query, &good);
    dx_ev_query q5 = {.limit = 5};
    rows rs = query_ok(st, &q5);
    assert_int_equal(rs.n, 5);
    assert_int_equal(rs.rows[4].position, 5);
    assert_int_equal(rs.rows[0].ts, INT64_C(1735689600000000)); /* 2025-01-01T00:00:00Z */
    assert_string_equal(rs.rows[0].id, "0190c0de-0000-7000-8000-000000000001");
    free(rs.rows);
    struct {
        answer a;
        const char *want;
    } qs[] = {
        {{12, EV_TYPES, 6, good_event_cell}, "server sent 6 rows for a limit of 5"},
        {{11, EV_TYPES, 5, good_event_cell}, "server sent 11 columns, expected 12"},
        {{12, {20, 20, 20, 25, 17, 17, 17, 17, 17, 17, 17, 17}, 5, good_event_cell}, "column 2 has type oid 20"},
        {{12, EV_TYPES, 5, long_id_cell}, "id of 40 bytes"},
        {{12, EV_TYPES, 5, null_session_cell}, "column 4 is NULL"},
        {{12, EV_TYPES, 5, short_seq_cell}, "is NULL or not 8 bytes"},
        {{12, EV_TYPES, 5, huge_ts_cell}, "ts out of range"},
        {{12, EV_TYPES, 5, neg_pos_cell}, "has position -1"},
    };
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; i++) {
        atomic_store(&f.query, &qs[i].a);
        rows r2 = {0};
        err[0] = '\0';
        expect_err(B->query(st, &q5, collect, &r2, err, sizeof err), err, qs[i].want);
        free(r2.rows);
    }
    static const answer page_over = {12, EV_TYPES, 1001, good_event_cell};
    atomic_store(&f.fetch, &page_over);
    dx_ev_query all = {0};
    rows r3 = {0};
    expect_err(B->query(st, &all, collect, &r3, err, sizeof err), err, "server sent 1001 rows for a page of 1000");
    assert_int_equal(r3.n, 0);
    free(r3.rows);

    /* scalars */
    uint64_t v;
    static const answer two = {1, {20}, 2, cell_int8_oid};
    atomic_store(&f.scalar, &two);
    expect_err(B->max_position(st, &v, err, sizeof err), err, "server sent 2 rows");
    static const answer neg = {1, {20}, 1, scalar_neg};
    atomic_store(&f.scalar, &neg);
    expect_err(B->session_max_seq(st, "s", 1, &v, err, sizeof err), err, "negative value -1");
    static const answer none = {1, {20}, 0, cell_int8_oid};
    atomic_store(&f.scalar, &none);
    expect_err(B->max_position(st, &v, err, sizeof err), err, "server sent 0 rows");

    B->close(st);
    free_dataset(&d);
    fake_stop(&f);
}

static int drop_schemas(void **state)
{
    (void)state;
    PGresult *r = PQexec(admin(), "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'dxt\\_%'");
    for (int i = 0; i < PQntuples(r); i++)
        sql1("DROP SCHEMA %s CASCADE", PQgetvalue(r, i, 0));
    PQclear(r);
    PQfinish(g_admin);
    g_admin = NULL;
    return 0;
}

int main(void)
{
    g_url = getenv("DX_PG_URL");
    g_ctl = getenv("DX_PG_CTL");
    if (!g_url || !g_ctl) {
        fprintf(stderr, "test_events_pg: set DX_PG_URL (libpq conninfo) and DX_PG_CTL (test/pg/pg_ctl.sh);"
                        " `make test-events-pg` starts a server and sets both\n");
        return 2;
    }
    if (getenv("DX_TEST_SCALE"))
        g_scale = 10;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(schema_is_created_once_with_indexes),
        cmocka_unit_test(batch_positions_follow_array_order),
        cmocka_unit_test(retry_is_idempotent),
        cmocka_unit_test(writes_never_scan_the_events_table),
        cmocka_unit_test(concurrent_duplicate_gets_the_stored_position),
        cmocka_unit_test(every_query_filter),
        cmocka_unit_test(snapshots_latest_at_or_before),
        cmocka_unit_test(expire_before_archives_then_deletes),
        cmocka_unit_test(bad_conninfo_is_a_clear_error),
        cmocka_unit_test(hostile_server_answers_are_refused),
        cmocka_unit_test(nodes_share_one_database),
        cmocka_unit_test(reconnects_after_server_restart),
    };
    return cmocka_run_group_tests_name("events_pg", tests, NULL, drop_schemas);
}
