/* Unit tests of the event queue, writer thread and SQLite backend (c_src/events). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "evq.h"
#include "sqlite.h"
#include <sqlite3.h>
#include <sys/stat.h>

static char g_dir[64];
static int g_fails; /* write_batch calls to fail (failure injection) */
static int g_batches;
static int g_down; /* while set, every write_batch fails (a backend that is down) */
/* gate: while g_hold is set, write_batch waits (the test decides when a transaction ends); batch sizes */
static pthread_mutex_t g_gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_gate_cv = PTHREAD_COND_INITIALIZER;
static int g_hold, g_in_write;
static size_t g_sizes[64], g_nsizes;

static void gate_set(int hold) {
    pthread_mutex_lock(&g_gate_mu);
    g_hold = hold;
    pthread_cond_broadcast(&g_gate_cv);
    pthread_mutex_unlock(&g_gate_mu);
}

static int failing_write(void *st, dx_ev_rec *r, size_t n, char *err, size_t errlen) {
    __atomic_add_fetch(&g_batches, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&g_gate_mu);
    if (g_nsizes < 64) g_sizes[g_nsizes++] = n;
    g_in_write = 1;
    pthread_cond_broadcast(&g_gate_cv);
    while (g_hold) pthread_cond_wait(&g_gate_cv, &g_gate_mu);
    g_in_write = 0;
    pthread_mutex_unlock(&g_gate_mu);
    if (__atomic_load_n(&g_down, __ATOMIC_SEQ_CST)) {
        snprintf(err, errlen, "connection lost: backend down");
        return -1;
    }
    if (__atomic_load_n(&g_fails, __ATOMIC_SEQ_CST) > 0) {
        __atomic_sub_fetch(&g_fails, 1, __ATOMIC_SEQ_CST);
        snprintf(err, errlen, "injected failure");
        return -1;
    }
    return dx_ev_sqlite_ops.write_batch(st, r, n, err, errlen);
}
static dx_ev_backend_ops g_ops;
/* a backend that is down cannot say a session's last sequence either */
static int downable_max_seq(void *st, const char *s, size_t n, uint64_t *seq, char *err, size_t errlen) {
    if (__atomic_load_n(&g_down, __ATOMIC_SEQ_CST)) {
        snprintf(err, errlen, "connection lost: backend down");
        return -1;
    }
    return dx_ev_sqlite_ops.session_max_seq(st, s, n, seq, err, errlen);
}

static void path(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", g_dir, name); }

static int setup(void **st) {
    snprintf(g_dir, sizeof g_dir, "/tmp/dx_events_test_XXXXXX");
    assert_non_null(mkdtemp(g_dir));
    g_ops = dx_ev_sqlite_ops;
    g_ops.write_batch = failing_write;
    g_ops.session_max_seq = downable_max_seq;
    g_fails = 0;
    g_down = 0;
    g_hold = 0;
    g_nsizes = 0;
    return 0;
}
static int teardown(void **st) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    return system(cmd);
}

static dx_ev_in ev(const char *session, const char *type, const char *var) {
    return (dx_ev_in){.session = session, .session_len = strlen(session), .type = type, .type_len = strlen(type),
                      .variable = var, .variable_len = strlen(var), .data = (const uint8_t *)"d", .data_len = 1};
}

typedef struct {
    uint64_t last_seq[8];
    uint64_t last_pos;
    size_t rows;
    int bad;
    char sess[8][16];
    char last_id[37];
    int ids_ordered; /* one writer: ids grow with positions (another writer's ids need not) */
} check_ctx;

static int check_cb(void *c_, const dx_ev_rec *r) {
    check_ctx *c = c_;
    int k = -1;
    for (int i = 0; i < 8; i++)
        if (r->session_len == strlen(c->sess[i]) && memcmp(r->session, c->sess[i], r->session_len) == 0) k = i;
    /* ids grow with positions (UUIDv7 text sorts by time, then counter) */
    if (k < 0 || r->sequence != c->last_seq[k] + 1 || r->position <= c->last_pos || strlen(r->id) != 36 ||
        r->id[14] != '7' || (c->ids_ordered && strcmp(r->id, c->last_id) <= 0))
        c->bad++;
    memcpy(c->last_id, r->id, 37);
    if (k >= 0) c->last_seq[k] = r->sequence;
    c->last_pos = r->position;
    c->rows++;
    return 0;
}

/* The log at path holds exactly rows events, all of session, with gapless sequences from 1,
 * increasing positions and UUIDv7 ids. */
static void check_one_session(const char *path, const char *session, size_t rows) {
    char err[256];
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(path, &db, err, sizeof err), 0);
    check_ctx c = {.ids_ordered = 1};
    snprintf(c.sess[0], sizeof c.sess[0], "%s", session);
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, check_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.rows, rows);
    assert_int_equal(c.bad, 0);
    dx_ev_sqlite_ops.close(db);
}

typedef struct {
    dx_evq *q;
    int id, n;
    uint64_t last_ticket;
} prod_arg;

static void *producer(void *a_) {
    prod_arg *a = a_;
    char s[8];
    snprintf(s, sizeof s, "s%d", a->id % 4);
    for (int i = 0; i < a->n; i++) {
        dx_ev_in e = ev(s, "variable_updated", "x");
        a->last_ticket = dx_evq_push(a->q, &e, NULL);
        if (!a->last_ticket) break;
    }
    return NULL;
}

/* 8 producers over 4 sessions: every event stored once, per-session sequences
 * gapless from 1 in position order, positions increasing, batches grouped. */
static void test_concurrent_producers_gapless(void **st) {
    char p[128];
    path(p, sizeof p, "a.db");
    char err[256];
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .node = "n1", .node_len = 2};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    int per = 2000 * (getenv("DX_TEST_SCALE") ? 1 : 5);
    pthread_t t[8];
    prod_arg a[8];
    g_batches = 0;
    for (int i = 0; i < 8; i++) {
        a[i] = (prod_arg){q, i, per, 0};
        pthread_create(&t[i], NULL, producer, &a[i]);
    }
    for (int i = 0; i < 8; i++) pthread_join(t[i], NULL);
    assert_int_equal(dx_evq_wait(q, dx_evq_ticket(q)), 0);
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.done, (uint64_t)8 * per);
    assert_int_equal(s.depth, 0);
    assert_true(s.batches < s.written); /* group commit */
    dx_evq_close(q);
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    check_ctx c = {0};
    for (int i = 0; i < 4; i++) snprintf(c.sess[i], sizeof c.sess[i], "s%d", i);
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, check_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.rows, (size_t)8 * per);
    assert_int_equal(c.bad, 0);
    for (int i = 0; i < 4; i++) assert_int_equal(c.last_seq[i], (uint64_t)2 * per);
    uint64_t m = 0;
    assert_int_equal(dx_ev_sqlite_ops.session_max_seq(db, "s1", 2, &m, err, sizeof err), 0);
    assert_int_equal(m, (uint64_t)2 * per);
    dx_ev_sqlite_ops.close(db);
}

/* A reopened log continues each session's sequence and the positions. */
static void test_reopen_continues_sequence(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "b.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p};
    for (int round = 0; round < 2; round++) {
        void *seed;
        pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
        assert_int_equal(dx_ev_sqlite_ops.open(p, &seed, err, sizeof err), 0);
        dx_evq *q = dx_evq_open(&cfg, seed, &mu, err, sizeof err);
        assert_non_null(q);
        uint64_t seq = 0, t = 0;
        for (int i = 0; i < 3; i++) {
            dx_ev_in e = ev("s", "session_created", "");
            t = dx_evq_push(q, &e, &seq);
        }
        assert_int_equal(seq, (uint64_t)3 * (round + 1));
        assert_int_equal(dx_evq_wait(q, t), 0);
        dx_evq_close(q);
        dx_ev_sqlite_ops.close(seed);
    }
}

/* A failing backend: waiters learn it, the batch is retried, nothing is lost
 * or reordered. */
static void test_failure_retried_never_dropped(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "c.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 1};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    g_fails = 3;
    uint64_t t = 0;
    for (int i = 0; i < 50; i++) {
        dx_ev_in e = ev("s0", "variable_updated", "x");
        t = dx_evq_push(q, &e, NULL);
    }
    while (dx_evq_done(q) < t) dx_evq_wait(q, t); /* errors wake the waiter; keep waiting */
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.errors, 3);
    assert_string_equal(s.last_error, "injected failure");
    dx_evq_close(q);
    check_one_session(p, "s0", 50);
}

static int g_encodes;
static int counting_encode(void *ctx, dx_ev_item *it) {
    (void)ctx;
    __atomic_add_fetch(&g_encodes, 1, __ATOMIC_SEQ_CST);
    it->rec.data = (const uint8_t *)"e";
    it->rec.data_len = 1;
    return 0;
}

/* A retried batch is not encoded again: each event's payload is encoded once, however many attempts its
 * batch takes (an encoding per attempt replaced, and leaked, the one before: the VM's binaries). */
static void test_failure_retried_encodes_once(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "enc.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 1, .encode = counting_encode};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    g_encodes = 0;
    g_fails = 3;
    static int payload;
    uint64_t t = 0;
    for (int i = 0; i < 20; i++) {
        dx_ev_in e = ev("s0", "variable_updated", "x");
        e.data = NULL;
        e.data_len = 0;
        e.payload = &payload;
        t = dx_evq_push(q, &e, NULL);
    }
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.errors, 3);
    assert_int_equal(__atomic_load_n(&g_encodes, __ATOMIC_SEQ_CST), 20);
    dx_evq_close(q);
    check_one_session(p, "s0", 20);
}

/* writer_exit runs once, on the writer thread (the one that encoded), when the queue closes: what the
 * callbacks kept in that thread's storage (the NIF's encoding environment) can be freed there. */
static _Thread_local int t_encoded_here;
static int g_exits, g_exit_on_writer;
static int thread_marking_encode(void *ctx, dx_ev_item *it) {
    t_encoded_here = 1;
    return counting_encode(ctx, it);
}
static void note_writer_exit(void *ctx) {
    (void)ctx;
    __atomic_add_fetch(&g_exits, 1, __ATOMIC_SEQ_CST);
    if (t_encoded_here) __atomic_add_fetch(&g_exit_on_writer, 1, __ATOMIC_SEQ_CST);
}

static void test_writer_exit_runs_once_on_the_writer_thread(void **st) {
    (void)st;
    char p[128], err[256];
    path(p, sizeof p, "exit.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .encode = thread_marking_encode, .writer_exit = note_writer_exit};
    g_exits = g_exit_on_writer = 0;
    static int payload;
    for (int round = 0; round < 2; round++) {
        dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
        assert_non_null(q);
        dx_ev_in e = ev("s0", "variable_updated", "x");
        e.data = NULL;
        e.data_len = 0;
        e.payload = &payload;
        uint64_t t = dx_evq_push(q, &e, NULL);
        while (dx_evq_done(q) < t) dx_evq_wait(q, t);
        assert_int_equal(__atomic_load_n(&g_exits, __ATOMIC_SEQ_CST), round);
        dx_evq_close(q);
        assert_int_equal(__atomic_load_n(&g_exits, __ATOMIC_SEQ_CST), round + 1);
        assert_int_equal(__atomic_load_n(&g_exit_on_writer, __ATOMIC_SEQ_CST), round + 1);
    }
    assert_int_equal(t_encoded_here, 0); /* (this thread never encoded) */
}

static uint64_t spooled(dx_evq *q) {
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    return s.spooled;
}

static void push_n(dx_evq *q, const char *session, int n, uint64_t *t) {
    for (int i = 0; i < n; i++) {
        dx_ev_in e = ev(session, "variable_updated", "x");
        *t = dx_evq_push(q, &e, NULL);
        assert_true(*t > 0);
    }
}

/* The backend down: batches go to the spool (durable: done advances), later
 * ones follow them; a spool left at close is moved by the next open, whose
 * sequences continue after the spooled ones; the backend back while running:
 * the spool is moved in order. Every event stored once, gapless, in order. */
static void test_backend_down_spools_in_order(void **st) {
    char p[128], sp[128], err[256];
    path(p, sizeof p, "s.db");
    path(sp, sizeof sp, "spool.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 1, .spool_path = sp, .max_batch = 16};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    uint64_t t = 0;
    push_n(q, "s0", 10, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_int_equal(spooled(q), 0);
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    push_n(q, "s0", 100, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t); /* a failed attempt wakes the waiter */
    assert_int_equal(spooled(q), 100);
    dx_evq_close(q); /* still down: the spool stays */

    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
    q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    uint64_t seq = 0;
    dx_ev_in e = ev("s0", "variable_updated", "x");
    t = dx_evq_push(q, &e, &seq);
    assert_int_equal(seq, 111); /* seeded from the spool */
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    for (int i = 0; i < 100000 && spooled(q); i++) usleep(1000); /* bounded */
    assert_int_equal(spooled(q), 0);

    /* down and back while running, with a writer pushing throughout */
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    push_n(q, "s0", 50, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_true(spooled(q) > 0);
    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
    push_n(q, "s0", 50, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    for (int i = 0; i < 100000 && spooled(q); i++) usleep(1000);
    assert_int_equal(spooled(q), 0);
    dx_evq_close(q);

    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    check_ctx c = {0};
    snprintf(c.sess[0], sizeof c.sess[0], "s0");
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, check_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.rows, 10 + 100 + 1 + 50 + 50);
    assert_int_equal(c.bad, 0);
    assert_int_equal(c.last_seq[0], 211);
    dx_ev_sqlite_ops.close(db);
}

/* A session whose first event here comes while the backend is down cannot be seeded: its events are
 * numbered provisionally (from 1) and renumbered after the backend's last sequence of the session when
 * the backend answers, before any of them is stored: spooled ones (also across a close and reopen, the
 * spool remembers they are provisional), queued ones and later ones. Every event stored once, gapless, in
 * order after those the backend held (without it they collided with them and were skipped). */
static void test_unseeded_session_numbered_after_the_backend_when_it_returns(void **st) {
    char p[128], sp[128], err[256];
    path(p, sizeof p, "u.db");
    path(sp, sizeof sp, "uspool.db");
    void *seed;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &seed, err, sizeof err), 0);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 1, .spool_path = sp, .max_batch = 4};
    dx_evq *q = dx_evq_open(&cfg, seed, &mu, err, sizeof err);
    assert_non_null(q);
    uint64_t t = 0;
    push_n(q, "s0", 10, &t);
    push_n(q, "s1", 7, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    dx_evq_close(q);

    /* a node's log starts again: the sessions are new to it; the backend goes down */
    q = dx_evq_open(&cfg, seed, &mu, err, sizeof err);
    assert_non_null(q);
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    assert_int_equal(dx_evq_seed(q, "s0", 2, err, sizeof err), -1);
    push_n(q, "s0", 5, &t);
    uint64_t seq = 0;
    dx_ev_in e = ev("s1", "variable_updated", "x");
    t = dx_evq_push(q, &e, &seq); /* not seeded beforehand: the commit path's lookup fails too */
    assert_int_equal(seq, 1);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_int_equal(spooled(q), 6);
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.provisional, 2);
    dx_evq_close(q); /* still down: the provisional events stay spooled */

    /* back up: the reopened queue renumbers s0's spooled events before moving them */
    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
    q = dx_evq_open(&cfg, seed, &mu, err, sizeof err);
    assert_non_null(q);
    push_n(q, "s0", 3, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    for (int i = 0; i < 100000 && spooled(q); i++) usleep(1000); /* bounded */
    assert_int_equal(spooled(q), 0);
    /* down and back while running: s2 is new to this queue and has events stored by another writer */
    void *other;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &other, err, sizeof err), 0);
    dx_ev_rec pre[3];
    for (int i = 0; i < 3; i++)
        pre[i] = (dx_ev_rec){.sequence = (uint64_t)i + 1, .ts_us = dx_ev_now_us(), .session = "s2", .session_len = 2,
                             .type = "e", .type_len = 1, .data = (const uint8_t *)"d", .data_len = 1};
    for (int i = 0; i < 3; i++) dx_uuid7(pre[i].ts_us, pre[i].id);
    assert_int_equal(dx_ev_sqlite_ops.write_batch(other, pre, 3, err, sizeof err), 0);
    dx_ev_sqlite_ops.close(other);
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    push_n(q, "s2", 9, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
    push_n(q, "s2", 2, &t); /* queued behind the spool, numbered provisionally too */
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    for (int i = 0; i < 100000 && spooled(q); i++) usleep(1000);
    assert_int_equal(spooled(q), 0);
    push_n(q, "s2", 1, &t); /* after the renumbering: final at once */
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.provisional, 0);
    dx_evq_close(q);
    dx_ev_sqlite_ops.close(seed);

    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    check_ctx c = {0};
    snprintf(c.sess[0], sizeof c.sess[0], "s0");
    snprintf(c.sess[1], sizeof c.sess[1], "s1");
    snprintf(c.sess[2], sizeof c.sess[2], "s2");
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, check_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.rows, 10 + 7 + 5 + 1 + 3 + 3 + 9 + 2 + 1);
    assert_int_equal(c.bad, 0);
    assert_int_equal(c.last_seq[0], 18);
    assert_int_equal(c.last_seq[1], 8);
    assert_int_equal(c.last_seq[2], 15);
    dx_ev_sqlite_ops.close(db);
}

/* A new owner's reseed (dx_evq_session_seq_raise with the backend's last sequence of the session, read
 * when the backend answered) of a session the queue numbers provisionally (its first event here came while
 * the backend was down): the provisional numbers count from 0 and the writer adds the backend's last
 * sequence to them once it answers, so the raise must leave them alone. It raised them to that last
 * sequence, which the writer then added once more: a gap of that many numbers. */
static int seq_cb(void *c, const dx_ev_rec *r) {
    uint64_t *v = c;
    if (v[0] < 15) v[1 + v[0]++] = r->sequence;
    return 0;
}

static void test_raise_leaves_provisional_numbers_to_the_writer(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "rp.db");
    void *seed, *other;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &seed, err, sizeof err), 0);
    /* 4 events of r stored by another writer (the old owner) */
    assert_int_equal(dx_ev_sqlite_ops.open(p, &other, err, sizeof err), 0);
    dx_ev_rec pre[4];
    for (int i = 0; i < 4; i++) {
        pre[i] = (dx_ev_rec){.sequence = (uint64_t)i + 1, .ts_us = dx_ev_now_us(), .session = "r", .session_len = 1,
                             .type = "e", .type_len = 1, .data = (const uint8_t *)"d", .data_len = 1};
        dx_uuid7(pre[i].ts_us, pre[i].id);
    }
    assert_int_equal(dx_ev_sqlite_ops.write_batch(other, pre, 4, err, sizeof err), 0);
    dx_ev_sqlite_ops.close(other);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 1};
    dx_evq *q = dx_evq_open(&cfg, seed, &mu, err, sizeof err);
    assert_non_null(q);
    /* down: r's first event here is numbered provisionally; the raise comes before the writer resolves it */
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    uint64_t t = 0, seq = 0;
    dx_ev_in e = ev("r", "variable_updated", "x");
    assert_true(dx_evq_push(q, &e, &seq) > 0);
    assert_int_equal(seq, 1);
    dx_evq_session_seq_raise(q, "r", 1, 4);
    t = dx_evq_push(q, &e, &seq);
    assert_true(t > 0);
    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    dx_evq_close(q);
    dx_ev_sqlite_ops.close(seed);
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    uint64_t got[16] = {0};
    dx_ev_query qq = {.session = "r", .session_len = 1};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, seq_cb, got, err, sizeof err), 0);
    dx_ev_sqlite_ops.close(db);
    assert_int_equal(got[0], 6);
    for (uint64_t i = 0; i < 6; i++) assert_int_equal(got[1 + i], i + 1);
}

/* Back-pressure: at capacity the queue says full (pushes still succeed: a
 * committed change is never dropped); it clears once the writer drains. */
static void test_capacity_full_until_drained(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "f.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .capacity = 10, .retry_ms = 1};
    g_fails = 1000000; /* the backend refuses everything: nothing drains */
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    uint64_t t = 0;
    for (int i = 0; i < 9; i++) {
        dx_ev_in e = ev("s", "e", "");
        t = dx_evq_push(q, &e, NULL);
    }
    assert_false(dx_evq_full(q));
    for (int i = 0; i < 11; i++) {
        dx_ev_in e = ev("s", "e", "");
        t = dx_evq_push(q, &e, NULL);
        assert_true(t > 0);
    }
    assert_true(dx_evq_full(q));
    assert_int_equal(dx_evq_wait(q, t), -1); /* a failed attempt wakes waiters with an error */
    __atomic_store_n(&g_fails, 0, __ATOMIC_SEQ_CST);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_false(dx_evq_full(q));
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.written, 20);
    dx_evq_close(q);
}

/* Item recycling (item_slot): payloads copied into the item (payload_len), the written items reused by the
 * next pushes (no new allocation), each payload freed exactly once (on reuse, when the recycle callback
 * refuses an item, or at close: valgrind/ASan see no leak), at most spare_max items kept, items too big for
 * a slot never recycled; the events written are the ones pushed. */
typedef struct {
    char *owned; /* a block the payload owns: freed by free_payload */
    int mark;
} rc_payload;
static int g_rc_allocs, g_rc_frees, g_rc_payload_frees, g_rc_refuse;
static void *rc_alloc(size_t n) {
    __atomic_add_fetch(&g_rc_allocs, 1, __ATOMIC_SEQ_CST);
    return malloc(n);
}
static void rc_free(void *p) {
    __atomic_add_fetch(&g_rc_frees, 1, __ATOMIC_SEQ_CST);
    free(p);
}
static void rc_free_payload(void *ctx, dx_ev_item *it) {
    rc_payload *p = it->payload;
    assert_true(p->mark == 0x5eed);
    p->mark = 0; /* freed twice would fail the assertion above */
    free(p->owned);
    __atomic_add_fetch(&g_rc_payload_frees, 1, __ATOMIC_SEQ_CST);
}
static bool rc_recycle(void *ctx, dx_ev_item *it) { return !__atomic_load_n(&g_rc_refuse, __ATOMIC_SEQ_CST); }
/* prefetch_payload: called for a kept item one push ahead of its reuse, its payload not freed yet */
static int g_rc_prefetches;
static void rc_prefetch(void *ctx, const dx_ev_item *it) {
    const rc_payload *p = it->payload;
    assert_true(p->mark == 0x5eed);
    __atomic_add_fetch(&g_rc_prefetches, 1, __ATOMIC_SEQ_CST);
}
/* the writer recycles a batch's items after it acknowledged them: bounded polling until it did */
#define EVENTUALLY(cond)                                                      \
    do {                                                                      \
        int n_ = 0;                                                           \
        while (!(cond) && n_++ < 10000) usleep(1000);                         \
        assert_true(cond);                                                    \
    } while (0)
static size_t rc_spare(dx_evq *q) {
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    return s.spare;
}
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)

static uint64_t rc_push(dx_evq *q, size_t varlen) {
    char var[600];
    memset(var, 'v', sizeof var);
    rc_payload p = {.owned = malloc(32), .mark = 0x5eed};
    dx_ev_in e = ev("s", "variable_updated", "");
    e.variable = var;
    e.variable_len = varlen;
    e.payload = &p;
    e.payload_len = sizeof p;
    uint64_t t = dx_evq_push(q, &e, NULL);
    assert_true(t > 0);
    return t;
}

static void test_items_recycled_payloads_freed_once(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "r.db");
    g_rc_allocs = g_rc_frees = g_rc_payload_frees = g_rc_refuse = g_rc_prefetches = 0;
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .item_slot = 512, .spare_max = 50, .free_payload = rc_free_payload,
                         .recycle = rc_recycle, .item_alloc = rc_alloc, .item_free = rc_free,
                         .prefetch_payload = rc_prefetch};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    uint64_t t = 0;
    /* while pushing, the writer is held (gate): it recycles nothing that the same round could reuse */
    gate_set(1);
    for (int i = 0; i < 40; i++) t = rc_push(q, 1);
    gate_set(0);
    assert_int_equal(dx_evq_wait(q, t), 0);
    EVENTUALLY(rc_spare(q) == 40);
    assert_int_equal(g_rc_allocs, 40);
    assert_int_equal(g_rc_payload_frees, 0); /* kept with their items, for the pushes that reuse them */
    /* the next 40 reuse the 40 written items: no allocation; each reuse frees the previous payload */
    assert_int_equal(LOAD(g_rc_prefetches), 0);
    gate_set(1); /* the writer recycles none of these meanwhile: the spare items are the 40 of the first round */
    for (int i = 0; i < 40; i++) t = rc_push(q, 1);
    assert_int_equal(g_rc_allocs, 40);
    assert_int_equal(g_rc_payload_frees, 40);
    /* the 40 came back in chunks of up to 32 per written batch (the first round was written in one or two
     * batches: the first item(s) taken while the gate held the writer, then the rest), each chunk taken
     * whole into this thread's cache: every reuse with another item after it in the cache prefetched that
     * one's payload, while it was still alive (asserted in rc_prefetch): 40 less one per chunk, 2 or 3 */
    assert_in_range(LOAD(g_rc_prefetches), 40 - 3, 40 - 2);
    gate_set(0);
    assert_int_equal(dx_evq_wait(q, t), 0);
    EVENTUALLY(rc_spare(q) == 40);
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.reused, 40);
    /* 80 more (40 reused, 40 new): of the 80 written only spare_max (50) are kept, the others freed with their
     * payloads */
    gate_set(1);
    for (int i = 0; i < 80; i++) t = rc_push(q, 1);
    gate_set(0);
    assert_int_equal(dx_evq_wait(q, t), 0);
    EVENTUALLY(LOAD(g_rc_frees) == 30);
    EVENTUALLY(rc_spare(q) == 50);
    assert_int_equal(g_rc_allocs, 80);
    assert_int_equal(LOAD(g_rc_payload_frees), 40 + 40 + 30);
    /* an event too big for a slot: allocated at its size, freed after it is written */
    t = rc_push(q, 600);
    assert_int_equal(dx_evq_wait(q, t), 0);
    EVENTUALLY(LOAD(g_rc_frees) == 31);
    assert_int_equal(rc_spare(q), 50);
    assert_int_equal(g_rc_allocs, 81);
    /* the recycle callback refuses: items and payloads freed by the writer */
    __atomic_store_n(&g_rc_refuse, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < 10; i++) t = rc_push(q, 1);
    assert_int_equal(dx_evq_wait(q, t), 0);
    EVENTUALLY(LOAD(g_rc_frees) == 41);
    assert_int_equal(rc_spare(q), 40);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.written, 171);
    assert_int_equal(s.reused, 90);
    dx_evq_close(q); /* the spare items' payloads are freed here */
    assert_int_equal(g_rc_payload_frees, 171);
    assert_int_equal(g_rc_frees, g_rc_allocs);
    check_one_session(p, "s", 171);
}

/* An event's time: the commit's own clock reading when it gives one (commit_us), never before the
 * session's previous event timed by the queue (another session's times do not count); an explicit time
 * (a copy of another node's event) is kept as is; no time at all: the clock, not before the previous. */
typedef struct {
    int64_t ts[16];
    size_t n;
} ts_ctx;
static int ts_cb(void *c_, const dx_ev_rec *r) {
    ts_ctx *c = c_;
    if (c->n < 16) c->ts[c->n++] = r->ts_us;
    return 0;
}
static void test_event_time_from_commit_never_back_in_a_session(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "t.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    int64_t now = dx_ev_now_us();
    struct {
        const char *s;
        int64_t commit, ts;
    } evs[] = {{"a", now - 1000, 0}, {"a", now - 2000, 0}, {"b", now - 5000, 0}, {"a", now - 500, 0},
               {"a", 0, now - 9000}, {"a", 0, 0}, {"a", now - 100, 0}};
    int64_t got[7];
    uint64_t t = 0;
    for (size_t i = 0; i < 7; i++) {
        dx_ev_in e = ev(evs[i].s, "variable_updated", "x");
        e.commit_us = evs[i].commit;
        e.ts_us = evs[i].ts;
        e.ts_out = &got[i];
        t = dx_evq_push(q, &e, NULL);
        assert_true(t > 0);
    }
    assert_int_equal(got[0], now - 1000);
    assert_int_equal(got[1], now - 1000); /* not before a's previous event */
    assert_int_equal(got[2], now - 5000); /* b's own */
    assert_int_equal(got[3], now - 500);
    assert_int_equal(got[4], now - 9000); /* explicit: kept */
    assert_true(got[5] >= now);           /* the clock */
    assert_int_equal(got[6], got[5]);     /* the commit's time was before the clock's: not back */
    assert_int_equal(dx_evq_wait(q, t), 0);
    dx_evq_close(q);
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    ts_ctx c = {0};
    dx_ev_query qq = {.session = "a", .session_len = 1};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, ts_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.n, 6);
    int64_t want[6] = {got[0], got[1], got[3], got[4], got[5], got[6]};
    for (size_t i = 0; i < 6; i++) assert_int_equal(c.ts[i], want[i]);
    dx_ev_sqlite_ops.close(db);
}

/* Ids grow with positions whoever makes their text: the push for an event whose caller wants its id back
 * (append/4), the writer for the others, here after every push (the writer is held): ids made at write time
 * sorted after the pushes' own, against the log's order. */
static void test_ids_grow_with_positions(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "ids.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    gate_set(1);
    uint64_t t = 0;
    char ids[200][37];
    for (int i = 0; i < 200; i++) {
        dx_ev_in e = ev("ids", "variable_updated", "x");
        if (i % 2) e.id_out = ids[i];
        t = dx_evq_push(q, &e, NULL);
        assert_true(t > 0);
    }
    gate_set(0);
    assert_int_equal(dx_evq_wait(q, t), 0);
    dx_evq_close(q);
    check_one_session(p, "ids", 200);
}

/* The writer lingers after the first event of a batch (linger_us: an hour here), so events pushed
 * meanwhile share one transaction; a caller waiting for durability ends the linger (if it did not,
 * dx_evq_wait would not return within the test's run). Ids are made by the writer when the caller
 * wants none back, and by the push when it does. */
static void test_linger_groups_and_urge_ends_it(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "l.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .linger_us = 3600LL * 1000000};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    g_batches = 0;
    uint64_t t = 0;
    char id[37] = {0};
    for (int i = 0; i < 100; i++) {
        dx_ev_in e = ev("s", "e", "x");
        if (i == 50) e.id_out = id;
        t = dx_evq_push(q, &e, NULL);
        assert_true(t > 0);
    }
    assert_int_equal(strlen(id), 36);
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.done, 0); /* still lingering */
    assert_int_equal(dx_evq_wait(q, t), 0);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.written, 100);
    assert_int_equal(s.batches, 1);
    /* the next batch lingers again; dx_evq_urge alone ends it too */
    dx_ev_in e = ev("s", "e", "x");
    t = dx_evq_push(q, &e, NULL);
    dx_evq_urge(q, t);
    assert_int_equal(dx_evq_wait(q, t), 0);
    dx_evq_close(q);
    check_one_session(p, "s", 101); /* every id a UUIDv7, sequences gapless */
}

/* Waits until ticket t is durable without counting as a waiting caller (dx_evq_wait counts as one): bounded
 * polling, at most a minute. */
static void done_poll(dx_evq *q, uint64_t t) {
    for (int i = 0; i < 60000 && dx_evq_done(q) < t; i++) usleep(1000);
    assert_true(dx_evq_done(q) >= t);
}

/* Group-commit gather: a commit that acknowledged 4 waiting callers makes the next transaction wait until 4
 * wait again (here the bound is an hour, so only the count ends it): the caller that comes first does not
 * get a transaction of its own while the 3 others wait a whole commit more (if it did, the second batch
 * would hold 1 event and there would be 3 batches). Deterministic: the first batch is held in write_batch
 * until all 4 callers are counted. */
static void test_gather_waits_for_as_many_waiters_as_last_commit(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "g.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .linger_us = 3600LL * 1000000, .gather_us = 3600LL * 1000000};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    gate_set(1);
    uint64_t t[8];
    for (int i = 0; i < 4; i++) {
        dx_ev_in e = ev("s", "e", "x");
        t[i] = dx_evq_push(q, &e, NULL);
    }
    for (int i = 0; i < 4; i++) dx_evq_urge(q, t[i]); /* 4 callers wait */
    pthread_mutex_lock(&g_gate_mu);
    while (!g_in_write) pthread_cond_wait(&g_gate_cv, &g_gate_mu);
    pthread_mutex_unlock(&g_gate_mu);
    gate_set(0);
    done_poll(q, t[3]);
    dx_evq_stats s;
    for (int i = 4; i < 8; i++) { /* they come back one at a time */
        dx_ev_in e = ev("s", "e", "x");
        t[i] = dx_evq_push(q, &e, NULL);
        dx_evq_urge(q, t[i]);
        if (i == 4) { /* the writer waits for the 3 others (bounded polling: a minute at most) */
            for (int k = 0; k < 60000; k++) {
                dx_evq_stats_get(q, &s);
                if (s.gathers) break;
                usleep(1000);
            }
            assert_int_equal(s.gathers, 1);
            assert_int_equal(s.done, t[3]);
        }
    }
    done_poll(q, t[7]);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.batches, 2);
    assert_int_equal(g_nsizes, 2);
    assert_int_equal(g_sizes[0], 4);
    assert_int_equal(g_sizes[1], 4);
    assert_int_equal(s.acked_batches, 2);
    assert_int_equal(s.acked, 8);
    assert_int_equal(s.gathers, 1);
    assert_int_equal(s.gather_timeouts, 0);
    assert_true(s.write_ns > 0 && s.cpu_ns > 0);
    dx_evq_close(q);
    check_one_session(p, "s", 8);
}

/* A caller alone never waits for others: each of its writes is a transaction of its own, started at once
 * (with an hour's bound, a gather would stall the test); fewer callers than last time end the gather at its
 * bound (here 1 ms) and their events are written. */
static void test_gather_never_delays_a_lone_writer_and_is_bounded(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "g1.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .linger_us = 3600LL * 1000000, .gather_us = 3600LL * 1000000};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    for (int i = 0; i < 20; i++) {
        dx_ev_in e = ev("s", "e", "x");
        uint64_t t = dx_evq_push(q, &e, NULL);
        assert_int_equal(dx_evq_wait(q, t), 0);
    }
    dx_evq_stats s;
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.batches, 20);
    assert_int_equal(s.acked, 20);
    assert_int_equal(s.gathers, 0);
    dx_evq_close(q);
    check_one_session(p, "s", 20);

    path(p, sizeof p, "g2.db");
    cfg.target = p;
    cfg.gather_us = 1000;
    q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    g_nsizes = 0;
    gate_set(1);
    uint64_t t[3];
    for (int i = 0; i < 3; i++) {
        dx_ev_in e = ev("s", "e", "x");
        t[i] = dx_evq_push(q, &e, NULL);
    }
    for (int i = 0; i < 3; i++) dx_evq_urge(q, t[i]);
    pthread_mutex_lock(&g_gate_mu);
    while (!g_in_write) pthread_cond_wait(&g_gate_cv, &g_gate_mu);
    pthread_mutex_unlock(&g_gate_mu);
    gate_set(0);
    done_poll(q, t[2]);
    dx_ev_in e = ev("s", "e", "x"); /* one of the three comes back, the others are gone */
    uint64_t t4 = dx_evq_push(q, &e, NULL);
    assert_int_equal(dx_evq_wait(q, t4), 0);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.batches, 2);
    assert_int_equal(s.gathers, 1);
    assert_int_equal(s.gather_timeouts, 1);
    /* a gather that timed out with one caller: the next commit acknowledged one, so no gather after it */
    e = ev("s", "e", "x");
    t4 = dx_evq_push(q, &e, NULL);
    assert_int_equal(dx_evq_wait(q, t4), 0);
    dx_evq_stats_get(q, &s);
    assert_int_equal(s.gathers, 1);
    dx_evq_close(q);
    check_one_session(p, "s", 5);
}

/* While events are spooled the writer waits for the spool's next attempt (an hour here); a push in
 * the meantime still wakes it and is spooled behind the others at once (if it did not, the second
 * wait would last the hour). */
static void test_push_wakes_writer_waiting_to_drain_spool(void **st) {
    char p[128], sp[128], err[256];
    path(p, sizeof p, "w.db");
    path(sp, sizeof sp, "wspool.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .retry_ms = 3600 * 1000, .spool_path = sp,
                         .linger_us = 1000};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    __atomic_store_n(&g_down, 1, __ATOMIC_SEQ_CST);
    uint64_t t = 0;
    push_n(q, "s0", 5, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_int_equal(spooled(q), 5);
    push_n(q, "s0", 5, &t);
    while (dx_evq_done(q) < t) dx_evq_wait(q, t);
    assert_int_equal(spooled(q), 10);
    dx_evq_close(q);
    __atomic_store_n(&g_down, 0, __ATOMIC_SEQ_CST);
}

/* Closing while the writer lingers writes what is queued. */
static void test_close_while_lingering_writes_everything(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "c.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p, .linger_us = 3600LL * 1000000};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    for (int i = 0; i < 10; i++) {
        dx_ev_in e = ev("s", "e", "x");
        assert_true(dx_evq_push(q, &e, NULL) > 0);
    }
    dx_evq_close(q);
    check_one_session(p, "s", 10);
}

/* Replicas push explicit sequences: only the next one is accepted. */
/* Any number of sessions (up to 128): each one's sequences gapless from 1, in position order. */
typedef struct {
    char name[128][16];
    uint64_t last[128];
    size_t n, rows;
    int bad;
} gap_ctx;
static int gap_cb(void *c_, const dx_ev_rec *r) {
    gap_ctx *c = c_;
    size_t k = 0;
    while (k < c->n && !(strlen(c->name[k]) == r->session_len && !memcmp(c->name[k], r->session, r->session_len))) k++;
    if (k == c->n && k < 128 && r->session_len < 16) {
        memcpy(c->name[k], r->session, r->session_len);
        c->name[k][r->session_len] = 0;
        c->n++;
    }
    if (k == 128 || r->sequence != c->last[k] + 1) c->bad++;
    else c->last[k] = r->sequence;
    c->rows++;
    return 0;
}

/* An atomic batch (push_many) whose new sessions grow the sequence table part-way (64 slots, grown at half
 * load): every event numbered in its own session, the ones before the growth included (the push looks each
 * session's slot up once, and again only when the table moved), and an explicit sequence in such a batch
 * still checked against the session's. */
static void test_push_many_across_a_table_growth(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "g.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    assert_non_null(q);
    enum { NEW = 48, N = NEW + 8 };
    char names[NEW][16];
    dx_ev_in in[N];
    uint64_t tickets[N], seqs[N];
    for (int i = 0; i < NEW; i++) {
        snprintf(names[i], sizeof names[i], "g%d", i);
        in[i] = ev(names[i], "variable_updated", "x");
    }
    for (int i = NEW; i < N; i++) in[i] = ev(i % 2 ? "g0" : "g1", "variable_updated", "x");
    assert_int_equal(dx_evq_push_many(q, in, N, tickets, seqs), 0);
    for (int i = 0; i < NEW; i++) assert_int_equal(seqs[i], 1);
    for (int i = NEW; i < N; i++) assert_int_equal(seqs[i], 2 + (i - NEW) / 2);
    for (int i = 1; i < N; i++) assert_int_equal(tickets[i], tickets[i - 1] + 1);
    /* a second batch growing the table again, with explicit sequences: a wrong one refuses the whole batch */
    char more[NEW][16];
    for (int i = 0; i < NEW; i++) {
        snprintf(more[i], sizeof more[i], "h%d", i);
        in[i] = ev(more[i], "variable_updated", "x");
    }
    in[NEW] = ev("g0", "variable_updated", "x");
    in[NEW].sequence = 7; /* g0 is at 5 */
    assert_int_equal(dx_evq_push_many(q, in, NEW + 1, NULL, seqs), -2);
    assert_int_equal(seqs[NEW], 5);
    in[NEW].sequence = 6;
    assert_int_equal(dx_evq_push_many(q, in, NEW + 1, tickets, seqs), 0);
    assert_int_equal(seqs[NEW], 6);
    for (int i = 0; i < NEW; i++) assert_int_equal(seqs[i], 1);
    assert_int_equal(dx_evq_session_seq(q, "g1", 2), 5);
    assert_int_equal(dx_evq_session_seq(q, "h47", 3), 1);
    assert_int_equal(dx_evq_wait(q, tickets[NEW]), 0);
    dx_evq_close(q);
    /* stored: 105 rows, each session's sequences gapless from 1 in position order */
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    gap_ctx c = {0};
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, gap_cb, &c, err, sizeof err), 0);
    dx_ev_sqlite_ops.close(db);
    assert_int_equal(c.rows, N + NEW + 1);
    assert_int_equal(c.bad, 0);
    assert_int_equal(c.n, 2 * NEW);
}

static void test_explicit_sequence_must_continue(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "d.db");
    dx_evq_config cfg = {.ops = &g_ops, .target = p};
    dx_evq *q = dx_evq_open(&cfg, NULL, NULL, err, sizeof err);
    dx_ev_in e = ev("r", "variable_updated", "x");
    e.sequence = 2;
    uint64_t s = 0;
    assert_int_equal(dx_evq_push(q, &e, &s), 0);
    assert_int_equal(s, 0);
    e.sequence = 1;
    assert_true(dx_evq_push(q, &e, &s) > 0);
    dx_evq_session_seq_raise(q, "r", 1, 10);
    e.sequence = 0;
    uint64_t t = dx_evq_push(q, &e, &s);
    assert_int_equal(s, 11);
    assert_int_equal(dx_evq_wait(q, t), 0);
    dx_evq_close(q);
}

/* Idempotent writes, filters, snapshots and retention on the backend itself. */
static int count_cb(void *c, const dx_ev_rec *r) { return ++*(size_t *)c >= 1000000; }
static int snap_cb(void *c, const dx_ev_snapshot *s) {
    *(uint64_t *)c = s->sequence;
    return 0;
}
/* a lean read: sequence, time, type (and data) as stored; id, session, principal and meta left empty */
static int lean_cb(void *c, const dx_ev_rec *r) {
    size_t *n = c;
    if (r->sequence == *n + 1 && r->ts_us == (int64_t)(1000 * r->sequence) && r->type_len == 1 && !r->id[0] &&
        !r->session_len && !r->principal_len && !r->meta_len)
        ++*n;
    return 0;
}
static int arch_cb(void *c, const dx_ev_rec *r) {
    ++*(size_t *)c;
    return 0;
}

/* Batches go in SQ_MULTI (32) rows a statement; a retried batch whose chunk holds stored records (here the
 * second batch repeats 45 of the first's 100, then 55 new ones) takes the stored positions for those and
 * the next positions, gapless, for the new ones; 155 rows in all, each once. */
static void fill_recs(dx_ev_rec *r, size_t n, uint64_t seq0) {
    for (size_t i = 0; i < n; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].sequence = seq0 + i;
        r[i].ts_us = (int64_t)(1000 + seq0 + i);
        dx_uuid7(r[i].ts_us, r[i].id);
        r[i].session = "m";
        r[i].session_len = 1;
        r[i].type = "t";
        r[i].type_len = 1;
        r[i].data = (const uint8_t *)"d";
        r[i].data_len = 1;
    }
}

static void test_backend_multi_row_batches_and_retries(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "m.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_rec a[100], b[100];
    fill_recs(a, 100, 1);
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, a, 100, err, sizeof err), 0);
    for (size_t i = 0; i < 100; i++) assert_int_equal(a[i].position, i + 1);
    fill_recs(b, 100, 56); /* sequences 56..155: 56..100 stored already */
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, b, 100, err, sizeof err), 0);
    for (size_t i = 0; i < 45; i++) assert_int_equal(b[i].position, 56 + i);
    for (size_t i = 45; i < 100; i++) assert_int_equal(b[i].position, 101 + (i - 45));
    uint64_t mp = 0;
    assert_int_equal(dx_ev_sqlite_ops.max_position(db, &mp, err, sizeof err), 0);
    assert_int_equal(mp, 155);
    dx_ev_sqlite_ops.close(db);
    check_one_session(p, "m", 155); /* gapless sequences, increasing positions, each row once */

    /* a chunk partly stored: 32 new events of session n, then m 90..157 (the chunk of m 90..121 inserts
     * 21 rows and meets 11 stored ones: taken out again, then row by row) */
    path(p, sizeof p, "m2.db");
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    fill_recs(a, 100, 1);
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, a, 100, err, sizeof err), 0);
    fill_recs(b, 32, 1);
    for (size_t i = 0; i < 32; i++) b[i].session = "n";
    fill_recs(b + 32, 68, 90);
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, b, 100, err, sizeof err), 0);
    for (size_t i = 0; i < 32; i++) assert_int_equal(b[i].position, 101 + i);
    for (size_t i = 32; i < 43; i++) assert_int_equal(b[i].position, 90 + (i - 32));
    for (size_t i = 43; i < 100; i++) assert_int_equal(b[i].position, 133 + (i - 43));
    check_ctx c = {0};
    snprintf(c.sess[0], sizeof c.sess[0], "m");
    snprintf(c.sess[1], sizeof c.sess[1], "n");
    dx_ev_query qq = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qq, check_cb, &c, err, sizeof err), 0);
    assert_int_equal(c.rows, 189);
    assert_int_equal(c.bad, 0);
    assert_int_equal(c.last_seq[0], 157);
    assert_int_equal(c.last_seq[1], 32);
    dx_ev_sqlite_ops.close(db);

    /* the smaller chunks (16, 8, 4): 29 events of q 1..29 over stored 20..21 (the 8-row chunk of 17..24 meets
     * them: taken out again, then row by row) */
    path(p, sizeof p, "m3.db");
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    fill_recs(a, 2, 20);
    for (size_t i = 0; i < 2; i++) a[i].session = "q";
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, a, 2, err, sizeof err), 0);
    fill_recs(b, 29, 1);
    for (size_t i = 0; i < 29; i++) b[i].session = "q";
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, b, 29, err, sizeof err), 0);
    for (size_t i = 0; i < 19; i++) assert_int_equal(b[i].position, 3 + i);
    assert_int_equal(b[19].position, 1);
    assert_int_equal(b[20].position, 2);
    for (size_t i = 21; i < 29; i++) assert_int_equal(b[i].position, 22 + (i - 21));
    /* and 13 more (8 + 4 + 1), all new */
    fill_recs(b, 13, 30);
    for (size_t i = 0; i < 13; i++) b[i].session = "q";
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, b, 13, err, sizeof err), 0);
    for (size_t i = 0; i < 13; i++) assert_int_equal(b[i].position, 30 + i);
    assert_int_equal(dx_ev_sqlite_ops.max_position(db, &mp, err, sizeof err), 0);
    assert_int_equal(mp, 42);
    check_ctx c3 = {0};
    snprintf(c3.sess[0], sizeof c3.sess[0], "q");
    dx_ev_query q3 = {0};
    q3.session = "q";
    q3.session_len = 1;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &q3, check_cb, &c3, err, sizeof err), 0);
    assert_int_equal(c3.rows, 42); /* each sequence once (positions are not in sequence order here) */
    assert_int_equal(c3.last_seq[0], 42);
    dx_ev_sqlite_ops.close(db);
}

static void test_backend_filters_snapshots_retention(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "e.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_rec r[4];
    const char *types[4] = {"a", "b", "a", "c"};
    for (int i = 0; i < 4; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].sequence = (uint64_t)i + 1;
        r[i].ts_us = 1000 * (i + 1);
        dx_uuid7(r[i].ts_us, r[i].id);
        r[i].session = "s";
        r[i].session_len = 1;
        r[i].type = types[i];
        r[i].type_len = 1;
        r[i].principal = i == 3 ? "bob" : "";
        r[i].principal_len = i == 3 ? 3 : 0;
    }
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 4, err, sizeof err), 0);
    uint64_t pos3 = r[2].position;
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 4, err, sizeof err), 0); /* retry: skipped */
    assert_int_equal(r[2].position, pos3);
    size_t n = 0;
    dx_ev_query q = {.session = "s", .session_len = 1};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &q, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 4);
    const char *ta[1] = {"a"};
    size_t tl[1] = {1};
    dx_ev_query qt = {.types = ta, .type_lens = tl, .ntypes = 1};
    n = 0;
    dx_ev_sqlite_ops.query(db, &qt, count_cb, &n, err, sizeof err);
    assert_int_equal(n, 2);
    dx_ev_query qp = {.principal = "bob", .principal_len = 3};
    n = 0;
    dx_ev_sqlite_ops.query(db, &qp, count_cb, &n, err, sizeof err);
    assert_int_equal(n, 1);
    dx_ev_query ql = {.session = "s", .session_len = 1, .lean = 1};
    n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &ql, lean_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 4);
    dx_ev_query qs = {.seq_from = 2, .seq_to = 3, .limit = 1, .descending = 1};
    n = 0;
    dx_ev_sqlite_ops.query(db, &qs, count_cb, &n, err, sizeof err);
    assert_int_equal(n, 1);
    /* ids are time-sortable */
    assert_true(strcmp(r[0].id, r[3].id) < 0);
    dx_ev_snapshot sn = {"s", 1, 2, 2000, (const uint8_t *)"x", 1};
    assert_int_equal(dx_ev_sqlite_ops.put_snapshot(db, &sn, err, sizeof err), 0);
    uint64_t got = 0;
    assert_int_equal(dx_ev_sqlite_ops.latest_snapshot(db, "s", 1, 3, 0, snap_cb, &got, err, sizeof err), 0);
    assert_int_equal(got, 2);
    got = 0;
    dx_ev_sqlite_ops.latest_snapshot(db, "s", 1, 1, 0, snap_cb, &got, err, sizeof err);
    assert_int_equal(got, 0);
    /* several in one transaction (the snapshotter's): each stored */
    dx_ev_snapshot sns[3] = {{"s", 1, 4, 2100, (const uint8_t *)"y", 1}, {"s", 1, 6, 2200, (const uint8_t *)"z", 1},
                             {"t", 1, 6, 2300, (const uint8_t *)"w", 1}};
    assert_int_equal(dx_ev_sqlite_ops.put_snapshots(db, sns, 3, err, sizeof err), 0);
    got = 0;
    assert_int_equal(dx_ev_sqlite_ops.latest_snapshot(db, "s", 1, 5, 0, snap_cb, &got, err, sizeof err), 0);
    assert_int_equal(got, 4);
    got = 0;
    assert_int_equal(dx_ev_sqlite_ops.latest_snapshot(db, "s", 1, 0, 0, snap_cb, &got, err, sizeof err), 0);
    assert_int_equal(got, 6);
    got = 0;
    assert_int_equal(dx_ev_sqlite_ops.latest_snapshot(db, "t", 1, 0, 0, snap_cb, &got, err, sizeof err), 0);
    assert_int_equal(got, 6);
    size_t archived = 0;
    assert_int_equal(dx_ev_sqlite_ops.expire_before(db, 2500, 0, UINT64_MAX, arch_cb, &archived, err, sizeof err), 0);
    assert_int_equal(archived, 2);
    n = 0;
    dx_ev_sqlite_ops.query(db, &q, count_cb, &n, err, sizeof err);
    assert_int_equal(n, 2);
    uint64_t mp = 0;
    dx_ev_sqlite_ops.max_position(db, &mp, err, sizeof err);
    assert_int_equal(mp, r[3].position);
    /* positions never go back, even once retention removed every event */
    archived = 0;
    assert_int_equal(dx_ev_sqlite_ops.expire_before(db, INT64_MAX, 0, UINT64_MAX, arch_cb, &archived, err, sizeof err), 0);
    assert_int_equal(archived, 2);
    r[0].sequence = 5;
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 1, err, sizeof err), 0);
    assert_int_equal(r[0].position, mp + 1);
    dx_ev_sqlite_ops.close(db);
    /* an unopenable target is an error, not a crash */
    assert_int_equal(dx_ev_sqlite_ops.open("/nonexistent/dir/x.db", &db, err, sizeof err), -1);
    assert_true(strlen(err) > 0);
}

/* Records of n_each 250-byte events of session "k", sequences from seq0. */
static void fill_big(dx_ev_rec *r, size_t n, uint64_t seq0) {
    static const uint8_t data[250] = {1};
    fill_recs(r, n, seq0);
    for (size_t i = 0; i < n; i++) {
        r[i].session = "k";
        r[i].data = data;
        r[i].data_len = sizeof data;
    }
}

static long long file_size(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 ? (long long)sb.st_size : 0;
}

/* The WAL is checkpointed by the checkpointer thread (its counters), and back-to-back transactions, which
 * leave it no moment where the whole WAL is copied before the next one begins, still keep the WAL file near
 * the limit: a commit at the limit waits for a checkpoint, so the next one starts the WAL over. */
static void test_checkpointer_keeps_the_wal_bounded(void **st) {
    char p[128], wal[160], err[256];
    path(p, sizeof p, "ck.db");
    snprintf(wal, sizeof wal, "%s-wal", p);
    dx_ev_sqlite_ckpt_config(8, 64); /* pages: small, so that a short test crosses both */
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_rec r[40];
    long long max_wal = 0;
    for (uint64_t b = 0; b < 300; b++) {
        fill_big(r, 40, 1 + b * 40);
        assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 40, err, sizeof err), 0);
        long long w = file_size(wal);
        if (w > max_wal) max_wal = w;
    }
    dx_ev_sqlite_ckpt_stats cs;
    assert_int_equal(dx_ev_sqlite_ckpt_stats_get(db, &cs), 0);
    assert_true(cs.passive > 0);
    assert_true(cs.waits > 0);
    assert_int_equal(cs.errors, 0);
    /* a 40-event transaction writes well under 64 pages (4 KiB + 24-byte frame headers; 32-byte WAL header) */
    assert_true(max_wal <= (64 + 64) * (4096 + 24) + 32);
    dx_ev_sqlite_ops.close(db);
    dx_ev_sqlite_ckpt_config(0, 0);
    check_one_session(p, "k", 300 * 40);
}

typedef struct {
    sqlite3 *db;
    int release_after_ms;
} holder_arg;
static void *release_later(void *a_) {
    holder_arg *a = a_;
    usleep((useconds_t)a->release_after_ms * 1000); /* how long the lock is held, not a synchronisation */
    sqlite3_exec(a->db, "COMMIT", NULL, NULL, NULL);
    return NULL;
}

/* A batch that finds the log's write lock taken (a checkpoint holding writers back, a retention delete on
 * another connection) waits for it (the busy timeout) and goes in: it used to read first, and SQLite does not
 * wait to upgrade a read transaction, so the batch failed at once with "database is locked". */
static void test_batch_waits_for_the_write_lock(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "lk.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_rec r[4];
    fill_recs(r, 4, 1);
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 4, err, sizeof err), 0);
    holder_arg h = {NULL, 300};
    assert_int_equal(sqlite3_open(p, &h.db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(h.db, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);
    pthread_t t;
    pthread_create(&t, NULL, release_later, &h);
    fill_recs(r, 4, 5);
    int rc = dx_ev_sqlite_ops.write_batch(db, r, 4, err, sizeof err);
    pthread_join(t, NULL);
    sqlite3_close(h.db);
    assert_int_equal(rc, 0);
    dx_ev_sqlite_ops.close(db);
    check_one_session(p, "m", 8);
}

/* Rows of sessions "a" and "b", every 7th with principal "p7", types "variable_updated" / "lock_acquired". */
static void write_mixed(void *db, size_t n) {
    char err[256];
    dx_ev_rec r[64];
    uint64_t seq[2] = {0, 0};
    for (size_t done = 0; done < n;) {
        size_t k = n - done < 64 ? n - done : 64;
        for (size_t i = 0; i < k; i++) {
            size_t g = done + i, sx = g % 2;
            memset(&r[i], 0, sizeof r[i]);
            r[i].sequence = ++seq[sx];
            r[i].ts_us = (int64_t)(1000000 + g);
            dx_uuid7(r[i].ts_us, r[i].id);
            r[i].session = sx ? "b" : "a", r[i].session_len = 1;
            r[i].type = g % 5 ? "variable_updated" : "lock_acquired";
            r[i].type_len = strlen(r[i].type);
            r[i].variable = "x", r[i].variable_len = 1;
            r[i].principal = g % 7 ? "" : "p7", r[i].principal_len = g % 7 ? 0 : 2;
            r[i].data = (const uint8_t *)"d", r[i].data_len = 1;
        }
        assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, k, err, sizeof err), 0);
        done += k;
    }
}

/* The plan of q uses an index or the rowid (SEARCH, or SCAN ... USING ... INDEX), never a scan of the table. */
static void assert_indexed(void *db, const dx_ev_query *q, const char *must, const char *what) {
    char plan[1024], err[256];
    assert_int_equal(dx_ev_sqlite_query_plan(db, q, plan, sizeof plan, err, sizeof err), 0);
    int scan = 0;
    for (const char *p = plan; (p = strstr(p, "SCAN events")); p++)
        if (strncmp(p, "SCAN events USING", 17) != 0) scan = 1;
    if (scan || (must && !strstr(plan, must))) fail_msg("%s: plan \"%s\" (wanted %s)", what, plan, must ? must : "no scan");
}

/* Every query shape the API sends (retention's is test_time_ranges_with_late_rows'; read/2 and fold/4 of a session or of all, since/until by sequence, time or
 * position, types, principal, variable; audit_trail by period, principal, type, variable; the console's pages;
 * state_at's replay) is served by an index, on a log where most rows have no principal. */
static void test_every_query_uses_an_index(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "plan.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    write_mixed(db, 2000);
    const char *vu[1] = {"variable_updated"}, *two[2] = {"variable_updated", "lock_acquired"},
               *lk[1] = {"lock_acquired"}, *rare[2] = {"lock_acquired", "access_denied"};
    size_t vul[1] = {16}, twol[2] = {16, 13}, lkl[1] = {13}, rarel[2] = {13, 13};
    struct {
        dx_ev_query q;
        const char *must;
        const char *what;
    } cases[] = {
        {{.session = "a", .session_len = 1}, "events_session_seq", "session"},
        {{.session = "a", .session_len = 1, .descending = 1, .limit = 1}, "events_session_seq", "session, last"},
        {{.session = "a", .session_len = 1, .seq_from = 10, .seq_to = 20}, "events_session_seq", "session, sequences"},
        {{.session = "a", .session_len = 1, .ts_from = 1000100, .ts_to = 1000200}, NULL, "session, times"},
        {{.session = "a", .session_len = 1, .pos_from = 100}, NULL, "session, positions"},
        {{.session = "a", .session_len = 1, .types = vu, .type_lens = vul, .ntypes = 1}, NULL, "session, type"},
        {{.session = "a", .session_len = 1, .principal = "p7", .principal_len = 2}, NULL, "session, principal"},
        {{.session = "a", .session_len = 1, .variable = "x", .variable_len = 1}, NULL, "session, variable"},
        {{.pos_from = 100, .limit = 1000}, "PRIMARY KEY", "all, from a position (subscriptions, fold)"},
        {{.ts_from = 1000100, .ts_to = 1000200}, "events_late", "all, period (a rowid range and the late rows)"},
        {{.ts_from = 1000100}, "events_late", "all, since a time"},
        {{.types = lk, .type_lens = lkl, .ntypes = 1}, "events_type", "all, type"},
        {{.types = rare, .type_lens = rarel, .ntypes = 2}, "events_type", "all, types"},
        {{.types = two, .type_lens = twol, .ntypes = 2, .pos_from = 100, .limit = 1000}, "PRIMARY KEY",
         "all, types with variable_updated, from a position"},
        {{.types = lk, .type_lens = lkl, .ntypes = 1, .ts_from = 1000100, .ts_to = 1000900}, NULL, "rare type, period"},
        {{.principal = "p7", .principal_len = 2}, "events_principal", "all, principal"},
        {{.principal = "p7", .principal_len = 2, .ts_from = 1000100, .ts_to = 1000900}, NULL, "principal, period"},
        {{.types = vu, .type_lens = vul, .ntypes = 1, .ts_from = 1000100, .ts_to = 1000900}, NULL, "type, period"},
        {{.variable = "x", .variable_len = 1, .ts_from = 1000100, .ts_to = 1000900}, NULL, "variable, period"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) assert_indexed(db, &cases[i].q, cases[i].must, cases[i].what);
    /* no filter at all (the console's newest events of every session): the table in rowid order, read from its
     * end and stopped at the limit, without a sort */
    char plan[1024];
    dx_ev_query qn = {.descending = 1, .limit = 50};
    assert_int_equal(dx_ev_sqlite_query_plan(db, &qn, plan, sizeof plan, err, sizeof err), 0);
    assert_string_equal(plan, "SCAN events");
    /* variable_updated of every session, no range: most rows are of that type and it has no index entries
     * (migrate_partial_index): the table in position order, no sort; with another type too, the same */
    dx_ev_query qv = {.types = vu, .type_lens = vul, .ntypes = 1, .limit = 50};
    assert_int_equal(dx_ev_sqlite_query_plan(db, &qv, plan, sizeof plan, err, sizeof err), 0);
    assert_string_equal(plan, "SCAN events");
    dx_ev_query q2 = {.types = two, .type_lens = twol, .ntypes = 2};
    assert_int_equal(dx_ev_sqlite_query_plan(db, &q2, plan, sizeof plan, err, sizeof err), 0);
    assert_string_equal(plan, "SCAN events");
    /* each type query finds its rows: every 5th is lock_acquired */
    size_t nt = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qv, count_cb, &nt, err, sizeof err), 0);
    assert_int_equal(nt, 50);
    nt = 0;
    dx_ev_query ql = {.types = lk, .type_lens = lkl, .ntypes = 1};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &ql, count_cb, &nt, err, sizeof err), 0);
    assert_int_equal(nt, 400);
    nt = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &q2, count_cb, &nt, err, sizeof err), 0);
    assert_int_equal(nt, 2000);
    /* and they find the rows: the principal's events (every 7th), also of one session */
    size_t n = 0;
    dx_ev_query qp = {.principal = "p7", .principal_len = 2};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qp, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, (2000 + 6) / 7);
    dx_ev_sqlite_ops.close(db);
}

/* A log made by a build with the full type index (every row in it) gets the partial one (without
 * variable_updated) at its first open, keeps every event, and its type queries find the same rows. */
static void test_old_log_gets_the_partial_type_index(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "oldtype.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    write_mixed(db, 700);
    dx_ev_sqlite_ops.close(db);
    sqlite3 *raw;
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    assert_int_equal(sqlite3_exec(raw, "DROP INDEX events_type; CREATE INDEX events_type ON events(type, position);",
                                  NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(raw);
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    const char *lk[1] = {"lock_acquired"}, *vu[1] = {"variable_updated"};
    size_t lkl[1] = {13}, vul[1] = {16};
    dx_ev_query ql = {.types = lk, .type_lens = lkl, .ntypes = 1}, qv = {.types = vu, .type_lens = vul, .ntypes = 1};
    assert_indexed(db, &ql, "events_type", "type, after the migration");
    size_t n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &ql, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 140);
    n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qv, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 560);
    dx_ev_sqlite_ops.close(db);
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    sqlite3_stmt *q;
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT sql FROM sqlite_master WHERE name = 'events_type'", -1, &q, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    assert_non_null(strstr((const char *)sqlite3_column_text(q, 0), "WHERE type <> 'variable_updated'"));
    sqlite3_finalize(q);
    /* the variable_updated rows are not in it */
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT count(*) FROM events INDEXED BY events_type"
                                             " WHERE type <> 'variable_updated'", -1, &q, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(q, 0), 140);
    sqlite3_finalize(q);
    sqlite3_close(raw);
}

/* A log made by a build with the full principal index (every row in it) gets the partial one at its first open,
 * keeps every event, and its principal queries find the same rows through the new index. */
static void test_old_log_gets_the_partial_principal_index(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "old.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    write_mixed(db, 700);
    dx_ev_sqlite_ops.close(db);
    sqlite3 *raw;
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    assert_int_equal(sqlite3_exec(raw, "DROP INDEX events_principal;"
                                       "CREATE INDEX events_principal ON events(principal, position);",
                                  NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(raw);
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_query qp = {.principal = "p7", .principal_len = 2};
    assert_indexed(db, &qp, "events_principal", "principal, after the migration");
    size_t n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qp, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 100);
    n = 0;
    dx_ev_query qa = {0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qa, count_cb, &n, err, sizeof err), 0);
    assert_int_equal(n, 700);
    dx_ev_sqlite_ops.close(db);
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    sqlite3_stmt *q;
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT sql FROM sqlite_master WHERE name = 'events_principal'", -1, &q, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    assert_non_null(strstr((const char *)sqlite3_column_text(q, 0), "WHERE principal <> x''"));
    sqlite3_finalize(q);
    /* rows with an empty principal are not in it */
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT count(*) FROM events INDEXED BY events_principal WHERE principal <> x''",
                                        -1, &q, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(q, 0), 100);
    sqlite3_finalize(q);
    sqlite3_close(raw);
}

typedef struct {
    uint64_t pos[4096];
    size_t n;
} pos_list;
static int collect_cb(void *c_, const dx_ev_rec *r) {
    pos_list *c = c_;
    if (c->n < 4096) c->pos[c->n++] = r->position;
    return 0;
}

/* Times out of position order (a replica's copies of its owner's events, a clock stepping back: every 9th row
 * 5 000 us late, every 13th 100 us late): a time range over every session finds exactly the rows whose time is
 * in it, in position order, as a filter of all rows does; retention removes exactly the older ones. */
static void test_time_ranges_with_late_rows(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "late.db");
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    enum { N = 3000 };
    static int64_t ts[N + 1];
    dx_ev_rec r[50];
    for (size_t b = 0; b < N / 50; b++) {
        fill_recs(r, 50, 1 + b * 50);
        for (size_t i = 0; i < 50; i++) {
            size_t g = b * 50 + i;
            r[i].ts_us = (int64_t)(100000 + 10 * g) - (g % 9 == 0 ? 5000 : 0) - (g % 13 == 0 ? 100 : 0);
        }
        assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 50, err, sizeof err), 0);
        for (size_t i = 0; i < 50; i++) ts[r[i].position] = r[i].ts_us;
    }
    const int64_t ranges[][2] = {{100000, 101000}, {95000, 96000}, {110000, 110000}, {0, 120000}, {118000, 0},
                                 {103000, 0},      {0, 99500},     {125000, 0},      {104321, 107654}};
    for (size_t k = 0; k < sizeof ranges / sizeof ranges[0]; k++) {
        for (int desc = 0; desc < 2; desc++) {
            dx_ev_query q = {.ts_from = ranges[k][0], .ts_to = ranges[k][1], .descending = desc};
            pos_list got = {.n = 0};
            assert_int_equal(dx_ev_sqlite_ops.query(db, &q, collect_cb, &got, err, sizeof err), 0);
            size_t want = 0;
            for (size_t i = 0; i < N; i++) {
                uint64_t pos = desc ? N - i : i + 1;
                if ((q.ts_from && ts[pos] < q.ts_from) || (q.ts_to && ts[pos] > q.ts_to)) continue;
                if (want >= got.n || got.pos[want] != pos)
                    fail_msg("range %zu (%s): row %zu is position %llu, wanted %llu", k, desc ? "desc" : "asc", want,
                             (unsigned long long)(want < got.n ? got.pos[want] : 0), (unsigned long long)pos);
                want++;
            }
            assert_int_equal(got.n, want);
        }
    }
    /* a limit stops in position order */
    dx_ev_query ql = {.ts_from = 100000, .limit = 5};
    pos_list got = {.n = 0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &ql, collect_cb, &got, err, sizeof err), 0);
    assert_int_equal(got.n, 5);
    /* retention bounded by position (what the caller archived): older rows past the bound stay, late ones too */
    size_t archived = 0, older = 0, first_half = 0;
    for (size_t pos = 1; pos <= N; pos++) older += ts[pos] < 112000;
    for (size_t pos = 11; pos <= N / 2; pos++) first_half += ts[pos] < 112000;
    assert_int_equal(dx_ev_sqlite_ops.expire_before(db, 112000, 11, N / 2, arch_cb, &archived, err, sizeof err), 0);
    assert_int_equal(archived, first_half);
    dx_ev_query qh = {0};
    got.n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qh, collect_cb, &got, err, sizeof err), 0);
    assert_int_equal(got.n, N - first_half);
    for (size_t i = 0; i < got.n; i++)
        assert_true(got.pos[i] < 11 || got.pos[i] > N / 2 || ts[got.pos[i]] >= 112000);
    /* retention: exactly the rows older than the bound, late ones too */
    archived = 0;
    assert_int_equal(dx_ev_sqlite_ops.expire_before(db, 112000, 0, UINT64_MAX, arch_cb, &archived, err, sizeof err), 0);
    assert_int_equal(archived, older - first_half);
    dx_ev_query qa = {0};
    got.n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &qa, collect_cb, &got, err, sizeof err), 0);
    assert_int_equal(got.n, N - older);
    for (size_t i = 0; i < got.n; i++) assert_true(ts[got.pos[i]] >= 112000);
    dx_ev_sqlite_ops.close(db);
}

/* A log of a build with the time index of every row (events_ts, no tmax column) is migrated at its first open:
 * every event kept, the running maximum filled in, events_ts dropped, time ranges answered from the new
 * access path, and new events continue it. */
static void test_old_log_gets_the_running_time_maximum(void **st) {
    char p[128], err[256];
    path(p, sizeof p, "oldts.db");
    sqlite3 *raw;
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    assert_int_equal(sqlite3_exec(raw,
                                  "PRAGMA journal_mode=WAL;"
                                  "CREATE TABLE events(position INTEGER PRIMARY KEY, session BLOB NOT NULL,"
                                  " sequence INTEGER NOT NULL, ts_us INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL,"
                                  " variable BLOB NOT NULL, principal BLOB NOT NULL, changed_by BLOB NOT NULL,"
                                  " node BLOB NOT NULL, data BLOB, meta BLOB);"
                                  "CREATE UNIQUE INDEX events_session_seq ON events(session, sequence);"
                                  "CREATE INDEX events_ts ON events(ts_us);"
                                  "CREATE INDEX events_type ON events(type, position);"
                                  "CREATE INDEX events_principal ON events(principal, position);"
                                  "CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
                                  "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)"
                                  " INSERT INTO events SELECT i, 'o', i, 1000 * i - (CASE WHEN i % 7 = 0 THEN 3500 ELSE 0 END),"
                                  " printf('00000000-0000-7000-8000-%012d', i), 't', '', '', '', 'n', x'01', NULL FROM n;"
                                  "INSERT INTO meta VALUES('position', 500);",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(raw);
    void *db;
    assert_int_equal(dx_ev_sqlite_ops.open(p, &db, err, sizeof err), 0);
    dx_ev_query q = {.ts_from = 100000, .ts_to = 200000};
    pos_list got = {.n = 0};
    assert_int_equal(dx_ev_sqlite_ops.query(db, &q, collect_cb, &got, err, sizeof err), 0);
    size_t want = 0;
    for (uint64_t i = 1; i <= 500; i++) {
        int64_t t = 1000 * (int64_t)i - (i % 7 == 0 ? 3500 : 0);
        if (t < 100000 || t > 200000) continue;
        assert_true(want < got.n);
        assert_int_equal(got.pos[want], i);
        want++;
    }
    assert_int_equal(got.n, want);
    dx_ev_rec r[10];
    fill_recs(r, 10, 501);
    for (size_t i = 0; i < 10; i++) r[i].session = "o", r[i].ts_us = 600000 + (int64_t)i;
    assert_int_equal(dx_ev_sqlite_ops.write_batch(db, r, 10, err, sizeof err), 0);
    assert_int_equal(r[0].position, 501);
    dx_ev_query q2 = {.ts_from = 499000};
    got.n = 0;
    assert_int_equal(dx_ev_sqlite_ops.query(db, &q2, collect_cb, &got, err, sizeof err), 0);
    assert_int_equal(got.n, 12); /* 499, 500 and the 10 new ones */
    dx_ev_sqlite_ops.close(db);
    check_one_session(p, "o", 510);
    assert_int_equal(sqlite3_open(p, &raw), SQLITE_OK);
    sqlite3_stmt *s;
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT count(*) FROM sqlite_master WHERE name = 'events_ts'", -1, &s, NULL),
                     SQLITE_OK);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(s, 0), 0);
    sqlite3_finalize(s);
    assert_int_equal(sqlite3_prepare_v2(raw, "SELECT count(*) FROM events WHERE tmax IS NULL", -1, &s, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    assert_int_equal(sqlite3_column_int(s, 0), 0);
    sqlite3_finalize(s);
    sqlite3_close(raw);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_concurrent_producers_gapless, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen_continues_sequence, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_retried_never_dropped, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failure_retried_encodes_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writer_exit_runs_once_on_the_writer_thread, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backend_down_spools_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unseeded_session_numbered_after_the_backend_when_it_returns, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_explicit_sequence_must_continue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_raise_leaves_provisional_numbers_to_the_writer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_push_many_across_a_table_growth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_capacity_full_until_drained, setup, teardown),
        cmocka_unit_test_setup_teardown(test_items_recycled_payloads_freed_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_event_time_from_commit_never_back_in_a_session, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ids_grow_with_positions, setup, teardown),
        cmocka_unit_test_setup_teardown(test_linger_groups_and_urge_ends_it, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gather_waits_for_as_many_waiters_as_last_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gather_never_delays_a_lone_writer_and_is_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_while_lingering_writes_everything, setup, teardown),
        cmocka_unit_test_setup_teardown(test_push_wakes_writer_waiting_to_drain_spool, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backend_filters_snapshots_retention, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backend_multi_row_batches_and_retries, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpointer_keeps_the_wal_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_batch_waits_for_the_write_lock, setup, teardown),
        cmocka_unit_test_setup_teardown(test_every_query_uses_an_index, setup, teardown),
        cmocka_unit_test_setup_teardown(test_old_log_gets_the_partial_principal_index, setup, teardown),
        cmocka_unit_test_setup_teardown(test_old_log_gets_the_partial_type_index, setup, teardown),
        cmocka_unit_test_setup_teardown(test_time_ranges_with_late_rows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_old_log_gets_the_running_time_maximum, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
