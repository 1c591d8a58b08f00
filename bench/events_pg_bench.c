/* Event store, PostgreSQL backend: events/s written with one event per transaction vs
 * batches of 100 and 1000 (every commit durable: synchronous_commit = on, fsync as the
 * server is configured), then events/s read back through a query. The floor: bare
 * one-row INSERT commits on a connection of its own, timed in the same rounds.
 *
 * Needs DX_PG_URL (libpq conninfo); `make bench-events-pg` starts a throwaway server
 * and sets it. DX_BENCH_SCALE=N divides the event counts by N.
 * Rounds are interleaved (1, 100, 1000, 1, 100, 1000, ...) and the median of each size
 * is reported, so a burst of load elsewhere on the machine hits every size alike. */
/* Debian keeps libpq-fe.h in /usr/include/postgresql: found without -I flags as well */
#if __has_include(<libpq-fe.h>)
#include <libpq-fe.h>
#else
#include <postgresql/libpq-fe.h>
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

#define ROUNDS 3
#define SESSIONS 8

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void die(const char *what, const char *err)
{
    fprintf(stderr, "events_pg_bench: %s: %s\n", what, err);
    exit(1);
}

static const char *setting(PGconn *c, const char *name)
{
    static char out[4][64];
    static int k;
    char q[128];
    snprintf(q, sizeof q, "SELECT current_setting('%s')", name); /* constant names only */
    PGresult *r = PQexec(c, q);
    char *o = out[k++ % 4];
    snprintf(o, 64, "%s", PQresultStatus(r) == PGRES_TUPLES_OK ? PQgetvalue(r, 0, 0) : "?");
    PQclear(r);
    return o;
}

typedef struct {
    char session[SESSIONS][32];
    uint64_t next_seq[SESSIONS];
    uint8_t data[96];
    uint8_t meta[22];
    char var[64][16];
} gen;

/* n realistic records: round robin over the sessions, ~90-byte ETF payload. */
static void fill(gen *g, dx_ev_rec *r, size_t n, int64_t ts0)
{
    for (size_t i = 0; i < n; i++) {
        int s = (int)(i % SESSIONS);
        memset(&r[i], 0, sizeof r[i]);
        r[i].sequence = g->next_seq[s]++;
        r[i].ts_us = ts0 + (int64_t)i;
        snprintf(r[i].id, sizeof r[i].id, "0190c0de-%04x-7000-8000-%012llx", s, (unsigned long long)r[i].sequence);
        r[i].session = g->session[s];
        r[i].session_len = strlen(g->session[s]);
        r[i].type = "variable_updated";
        r[i].type_len = 16;
        r[i].variable = g->var[i % 64];
        r[i].variable_len = strlen(g->var[i % 64]);
        r[i].principal = "optimizer";
        r[i].principal_len = 9;
        r[i].changed_by = "mipro-run-17";
        r[i].changed_by_len = 12;
        r[i].node = "dspex@node1";
        r[i].node_len = 11;
        r[i].data = g->data;
        r[i].data_len = sizeof g->data;
        r[i].meta = g->meta;
        r[i].meta_len = sizeof g->meta;
    }
}

static int count_row(void *ctx, const dx_ev_rec *r)
{
    (void)r;
    (*(size_t *)ctx)++;
    return 0;
}

static void no_notices(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(void)
{
    const char *url = getenv("DX_PG_URL");
    if (!url)
        die("setup", "set DX_PG_URL (make bench-events-pg starts a server and sets it)");
    int scale = getenv("DX_BENCH_SCALE") ? atoi(getenv("DX_BENCH_SCALE")) : 1;
    if (scale < 1)
        scale = 1;

    PGconn *admin = PQconnectdb(url);
    if (PQstatus(admin) != CONNECTION_OK)
        die("connect", PQerrorMessage(admin));
    PQsetNoticeProcessor(admin, no_notices, NULL);
    char schema[64], q[256], target[2048];
    snprintf(schema, sizeof schema, "dx_bench_%d", (int)getpid());
    snprintf(q, sizeof q, "DROP SCHEMA IF EXISTS %s CASCADE; CREATE SCHEMA %s", schema, schema);
    PQclear(PQexec(admin, q));
    snprintf(target, sizeof target, "%s options='-csearch_path=%s'", url, schema);

    char err[512];
    void *st = NULL;
    if (dx_ev_pg_ops.open(target, &st, err, sizeof err))
        die("open", err);

    gen g;
    memset(&g, 0, sizeof g);
    for (int s = 0; s < SESSIONS; s++) {
        snprintf(g.session[s], sizeof g.session[s], "bench-session-%d", s);
        g.next_seq[s] = 1;
    }
    for (int v = 0; v < 64; v++)
        snprintf(g.var[v], sizeof g.var[v], "var_%d", v);
    for (size_t i = 0; i < sizeof g.data; i++)
        g.data[i] = (uint8_t)(i * 37 + 11);
    g.data[0] = 131;
    /* #{source => <<"opt">>} as ETF */
    static const uint8_t meta[] = {131, 't', 0, 0, 0, 1, 'w', 6, 's', 'o', 'u', 'r', 'c', 'e', 'm', 0, 0, 0, 3, 'o', 'p', 't'};
    memcpy(g.meta, meta, sizeof meta);

    /* the floor: a bare one-row INSERT committed durably, on a connection of its own */
    PGconn *floor_c = PQconnectdb(target);
    if (PQstatus(floor_c) != CONNECTION_OK)
        die("connect", PQerrorMessage(floor_c));
    PQsetNoticeProcessor(floor_c, no_notices, NULL);
    PQclear(PQexec(floor_c, "SET synchronous_commit = on"));
    PQclear(PQexec(floor_c, "CREATE TABLE dx_bench_floor (v bigint)"));
    double floor_rate[ROUNDS];

    const size_t sizes[3] = {1, 100, 1000};
    const size_t events[3] = {600, 20000, 50000}; /* per round */
    double rate[3][ROUNDS];
    dx_ev_rec *recs = calloc(1000, sizeof *recs);
    if (!recs)
        die("setup", "out of memory");
    size_t total = 0;
    int64_t ts = INT64_C(1764979200000000);

    printf("events_pg_bench: PostgreSQL %d, fsync=%s, synchronous_commit (session)=on, wal_sync_method=%s\n",
           PQserverVersion(admin), setting(admin, "fsync"), setting(admin, "wal_sync_method"));
    for (int round = 0; round < ROUNDS; round++) {
        size_t nf = events[0] / (size_t)scale;
        if (nf < 1)
            nf = 1;
        double f0 = now_s();
        for (size_t i = 0; i < nf; i++) {
            PGresult *r = PQexec(floor_c, "INSERT INTO dx_bench_floor VALUES (1)");
            if (PQresultStatus(r) != PGRES_COMMAND_OK)
                die("floor insert", PQresultErrorMessage(r));
            PQclear(r);
        }
        double fdt = now_s() - f0;
        floor_rate[round] = (double)nf / fdt;
        printf("  round %d, bare INSERT commits: %6zu in %.3f s = %9.0f commits/s (%.3f ms each)\n", round + 1, nf, fdt,
               floor_rate[round], fdt * 1e3 / (double)nf);
        for (int k = 0; k < 3; k++) {
            size_t n = events[k] / (size_t)scale, b = sizes[k];
            if (n < b)
                n = b;
            double t0 = now_s();
            for (size_t done = 0; done < n; done += b) {
                fill(&g, recs, b, ts);
                ts += (int64_t)b;
                if (dx_ev_pg_ops.write_batch(st, recs, b, err, sizeof err))
                    die("write_batch", err);
            }
            double dt = now_s() - t0;
            rate[k][round] = (double)n / dt;
            total += n;
            printf("  round %d, batch %4zu: %6zu events in %.3f s = %9.0f events/s (%.3f ms per batch)\n", round + 1,
                   b, n, dt, rate[k][round], dt * 1e3 / (double)(n / b));
        }
    }
    double med[3];
    for (int k = 0; k < 3; k++) {
        qsort(rate[k], ROUNDS, sizeof(double), cmp_double);
        med[k] = rate[k][ROUNDS / 2];
    }
    printf("events_pg_bench: median events/s: batch 1 = %.0f, batch 100 = %.0f, batch 1000 = %.0f\n", med[0], med[1],
           med[2]);
    printf("events_pg_bench: batch 100 vs 1 = %.1fx, batch 1000 vs 1 = %.1fx\n", med[1] / med[0], med[2] / med[0]);
    qsort(floor_rate, ROUNDS, sizeof(double), cmp_double);
    printf("events_pg_bench: batch 1 vs a bare one-row INSERT commit (%.0f/s) = %.2fx\n", floor_rate[ROUNDS / 2],
           med[0] / floor_rate[ROUNDS / 2]);
    PQfinish(floor_c);

    /* read everything back through the cursor path */
    dx_ev_query all = {0};
    size_t seen = 0;
    double t0 = now_s();
    if (dx_ev_pg_ops.query(st, &all, count_row, &seen, err, sizeof err))
        die("query", err);
    double dt = now_s() - t0;
    if (seen != total) {
        snprintf(err, sizeof err, "read %zu events, wrote %zu", seen, total);
        die("query", err);
    }
    printf("events_pg_bench: read %zu events in %.3f s = %.0f events/s\n", seen, dt, (double)seen / dt);

    dx_ev_pg_ops.close(st);
    free(recs);
    snprintf(q, sizeof q, "DROP SCHEMA %s CASCADE", schema);
    PQclear(PQexec(admin, q));
    PQfinish(admin);
    return 0;
}
