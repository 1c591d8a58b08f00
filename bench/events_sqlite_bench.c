/* The SQLite event backend (c_src/events/sqlite.c) alone, without the VM: what its write_batch costs the
 * calling thread (the event writer thread) per event, in user and system CPU time (getrusage RUSAGE_THREAD),
 * next to the whole process's (the checkpointer thread included), for N `set/3`-sized events (250-byte data,
 * 40-byte metadata, no principal) in batches of B, after the wall time of C sync-sized commits of 16 events
 * (first, on the fresh log). DX_CKPT_INLINE=1: SQLite's automatic checkpoint in the writer's connection (the
 * build before the checkpointer thread) for comparison.
 *   events_sqlite_bench [N [B [C]]]     (defaults 400000 8192 1000)
 * Writes into a fresh temporary directory, removed at the end. */
#define _GNU_SOURCE
#include "backend.h"
#include "evq.h"
#include "sqlite.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static double tv(struct timeval t) { return (double)t.tv_sec + (double)t.tv_usec / 1e6; }
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void fill(dx_ev_rec *r, const char *var, const uint8_t *data, size_t dn, const uint8_t *meta, size_t mn) {
    memset(r, 0, sizeof *r);
    r->session = "evbench", r->session_len = 7;
    r->type = "variable_updated", r->type_len = 16;
    r->variable = var, r->variable_len = strlen(var);
    r->principal = "", r->principal_len = 0;
    r->changed_by = "", r->changed_by_len = 0;
    r->node = "nonode@nohost", r->node_len = 13;
    r->data = data, r->data_len = dn;
    r->meta = meta, r->meta_len = mn;
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 400000, b = argc > 2 ? strtoul(argv[2], NULL, 10) : 8192,
           commits = argc > 3 ? strtoul(argv[3], NULL, 10) : 1000;
    char dir[] = "/tmp/dx_evsq_bench_XXXXXX", path[128], err[256];
    if (!mkdtemp(dir)) return 1;
    snprintf(path, sizeof path, "%s/events.db", dir);
    const char *inl = getenv("DX_CKPT_INLINE");
    if (inl && *inl && strcmp(inl, "0") != 0) dx_ev_sqlite_ckpt_config(-1, 0);
    else if (getenv("DX_CKPT_PAGES") || getenv("DX_CKPT_LIMIT"))
        dx_ev_sqlite_ckpt_config(getenv("DX_CKPT_PAGES") ? atol(getenv("DX_CKPT_PAGES")) : 0,
                                 getenv("DX_CKPT_LIMIT") ? atol(getenv("DX_CKPT_LIMIT")) : 0);
    void *db;
    if (dx_ev_sqlite_ops.open(path, &db, err, sizeof err)) {
        fprintf(stderr, "open: %s\n", err);
        return 1;
    }
    static uint8_t data[250], meta[40];
    memset(data, 0x5a, sizeof data);
    memset(meta, 0x33, sizeof meta);
    dx_ev_rec *r = calloc(b, sizeof *r);
    const char *vars[4] = {"1", "2", "3", "4"};
    uint64_t seq = 0;
    double c0 = now_s();
    for (size_t c = 0; c < commits; c++) {
        for (size_t i = 0; i < 16; i++) {
            fill(&r[i], vars[i % 4], data, sizeof data, meta, sizeof meta);
            r[i].sequence = ++seq;
            r[i].ts_us = dx_ev_now_us();
            dx_uuid7(r[i].ts_us, r[i].id);
        }
        if (dx_ev_sqlite_ops.write_batch(db, r, 16, err, sizeof err)) {
            fprintf(stderr, "write: %s\n", err);
            return 1;
        }
    }
    printf("%zu commits of 16 events: %.0f us each (wall)\n", commits, (now_s() - c0) * 1e6 / (double)commits);
    struct rusage t0, t1, p0, p1;
    getrusage(RUSAGE_THREAD, &t0);
    getrusage(RUSAGE_SELF, &p0);
    double w0 = now_s();
    for (size_t done = 0; done < n;) {
        size_t k = n - done < b ? n - done : b;
        for (size_t i = 0; i < k; i++) {
            fill(&r[i], vars[i % 4], data, sizeof data, meta, sizeof meta);
            r[i].sequence = ++seq;
            r[i].ts_us = dx_ev_now_us();
            dx_uuid7(r[i].ts_us, r[i].id);
        }
        if (dx_ev_sqlite_ops.write_batch(db, r, k, err, sizeof err)) {
            fprintf(stderr, "write: %s\n", err);
            return 1;
        }
        done += k;
    }
    double w1 = now_s();
    getrusage(RUSAGE_THREAD, &t1);
    getrusage(RUSAGE_SELF, &p1);
    double us = tv(t1.ru_utime) - tv(t0.ru_utime), sy = tv(t1.ru_stime) - tv(t0.ru_stime);
    double pu = tv(p1.ru_utime) - tv(p0.ru_utime), ps = tv(p1.ru_stime) - tv(p0.ru_stime);
    printf("%zu events in batches of %zu: writer thread %.2f us/event (user %.2f, system %.2f), whole process "
           "%.2f us/event, wall %.2f us/event\n",
           n, b, (us + sy) * 1e6 / (double)n, us * 1e6 / (double)n, sy * 1e6 / (double)n,
           (pu + ps) * 1e6 / (double)n, (w1 - w0) * 1e6 / (double)n);
    dx_ev_sqlite_ckpt_stats cs;
    dx_ev_sqlite_ckpt_stats_get(db, &cs);
    printf("checkpointer: %llu checkpoints, %llu commits waited for one at the limit, %llu errors, largest WAL %llu "
           "pages\n", (unsigned long long)cs.passive, (unsigned long long)cs.waits, (unsigned long long)cs.errors,
           (unsigned long long)cs.max_wal_pages);
    dx_ev_sqlite_ops.close(db);
    free(r);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) ? 1 : 0;
}
