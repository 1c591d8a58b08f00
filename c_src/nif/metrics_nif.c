/*
 * Metrics NIFs. A series (one metric name + tag set) is a resource holding up
 * to MAX_SHARDS shards, each a dx_series behind its own mutex on its own
 * cache lines. Each scheduler thread records into "its" shard (fixed per
 * thread), so concurrent recorders of one hot series (every get/2 of every
 * process) neither wait for each other nor bounce counters between cores; a
 * shard's series is created on first use, so a series recorded from one
 * thread costs one shard of memory. Queries merge every shard. Query results
 * are immutable sketch resources (no lock needed). Queries, merges and
 * deserialisation run on dirty CPU schedulers; a query holds each shard's
 * mutex only while that shard is merged (bounded by its 60 + 61 + H + 1
 * slots; a full day measured ~20 us).
 */
#include "metrics_nif.h"
#include "sketch.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SHARDS 8

typedef struct {
    pthread_mutex_t mu;
    dx_series *series; /* NULL until this shard's first record */
    int64_t latest;    /* largest time recorded here (valid if series) */
    /* Since creation, never windowed: what Prometheus wants for _count/_sum. */
    uint64_t total_count;
    dx_sum total_sum;
} __attribute__((aligned(64))) shard_t;

typedef struct {
    unsigned hours, nshards;
    shard_t *shards; /* nshards, 64-byte aligned */
    /* Largest time recorded in any shard (INT64_MIN before the first): a
     * sample is refused when the series as a whole no longer retains it,
     * whichever shard it would land in. */
    _Atomic int64_t latest;
} series_res;

static int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* Each thread's shard number, assigned round-robin on its first record. */
static atomic_uint next_shard;
static __thread int my_shard = -1;

static shard_t *pick_shard(series_res *r) {
    if (my_shard < 0)
        my_shard = (int)(atomic_fetch_add_explicit(&next_shard, 1, memory_order_relaxed) % MAX_SHARDS);
    return &r->shards[(unsigned)my_shard % r->nshards];
}

typedef struct {
    dx_sketch *sk;
} sketch_res;

static ErlNifResourceType *series_type, *sketch_type;
static ERL_NIF_TERM A_get, A_get_value, A_set;
static void calibrate(void);
static ERL_NIF_TERM A_ok, A_error, A_now, A_undefined, A_rejected, A_bad_range, A_enomem, A_invalid_sketch,
    A_incompatible, A_count, A_sum, A_min, A_max, A_mean, A_p50, A_p90, A_p95, A_p99, A_invalid_argument,
    A_time, A_value, A_infinity, A_neg_infinity;

static void series_dtor(ErlNifEnv *env, void *obj) {
    series_res *r = obj;
    if (!r->shards)
        return;
    for (unsigned i = 0; i < r->nshards; i++) {
        dx_series_free(r->shards[i].series);
        pthread_mutex_destroy(&r->shards[i].mu);
    }
    free(r->shards);
}

static void sketch_dtor(ErlNifEnv *env, void *obj) { dx_sketch_free(((sketch_res *)obj)->sk); }

int dx_metrics_init(ErlNifEnv *env) {
    int fl = ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER;
    series_type = enif_open_resource_type(env, NULL, "dspex_metric_series", series_dtor, fl, NULL);
    sketch_type = enif_open_resource_type(env, NULL, "dspex_metric_sketch", sketch_dtor, fl, NULL);
    if (!series_type || !sketch_type)
        return -1;
#define MK(v, s) v = enif_make_atom(env, s)
    MK(A_ok, "ok"); MK(A_error, "error"); MK(A_now, "now"); MK(A_undefined, "undefined");
    MK(A_rejected, "rejected"); MK(A_bad_range, "bad_range"); MK(A_enomem, "enomem");
    MK(A_invalid_sketch, "invalid_sketch"); MK(A_incompatible, "incompatible");
    MK(A_count, "count"); MK(A_sum, "sum"); MK(A_min, "min"); MK(A_max, "max"); MK(A_mean, "mean");
    MK(A_p50, "p50"); MK(A_p90, "p90"); MK(A_p95, "p95"); MK(A_p99, "p99");
    MK(A_get, "get"); MK(A_get_value, "get_value"); MK(A_set, "set");
    MK(A_invalid_argument, "invalid_argument"); MK(A_time, "time"); MK(A_value, "value");
    MK(A_infinity, "infinity"); MK(A_neg_infinity, "neg_infinity");
#undef MK
    calibrate();
    return 0;
}

/* Samples the analytics lost without telling anyone: a batch its series refused,
 * an allocation that failed, a handler's record of `now' that was rejected. */
static _Atomic uint64_t g_dropped;
static void dropped(uint64_t n) { atomic_fetch_add_explicit(&g_dropped, n, memory_order_relaxed); }

int dx_metrics_takeover(ErlNifEnv *env) {
    int fl = ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER;
    ErlNifResourceType *st = enif_open_resource_type(env, NULL, "dspex_metric_series", series_dtor, fl, NULL);
    ErlNifResourceType *kt = enif_open_resource_type(env, NULL, "dspex_metric_sketch", sketch_dtor, fl, NULL);
    return st && kt ? 0 : -1;
}

static ERL_NIF_TERM err(ErlNifEnv *env, ERL_NIF_TERM reason) { return enif_make_tuple2(env, A_error, reason); }

/* Testing only (metrics_set_clock/1): the second the metrics clock is frozen
 * at, or INT64_MIN for the OS clock. One relaxed load on the hot path. */
static _Atomic int64_t g_fixed_clock = INT64_MIN;
#define FIXED_CLOCK_LIMIT ((int64_t)1 << 40) /* far inside the core's 2^62 */

/* Whole seconds only: the coarse clock (a few ms resolution) is several
 * times cheaper than CLOCK_REALTIME and exact enough for 1 s buckets. */
static int64_t wall_sec(void) {
    int64_t fixed = atomic_load_explicit(&g_fixed_clock, memory_order_relaxed);
    if (fixed != INT64_MIN)
        return fixed;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    return (int64_t)ts.tv_sec;
}

/* Seconds since the epoch: an integer, or the atom now (the OS clock). Tests
 * pass explicit times; the core never reads a clock itself. */
static int get_time(ErlNifEnv *env, ERL_NIF_TERM t, int64_t *out) {
    if (enif_is_identical(t, A_now)) {
        *out = wall_sec();
        return 1;
    }
    ErlNifSInt64 v;
    if (!enif_get_int64(env, t, &v))
        return 0;
    *out = v;
    return 1;
}

/* An integer beyond 64 bits (a number that is not a float), by its sign. */
static int big_integer_sign(ErlNifEnv *env, ERL_NIF_TERM t) {
    double d;
    if (!enif_is_number(env, t) || enif_get_double(env, t, &d))
        return 0;
    return enif_compare(t, enif_make_int(env, 0)) < 0 ? -1 : 1;
}

/* get_time, with integers beyond 64 bits saturated: as a bound or a sample
 * time they are simply "before / after everything". */
static int get_time_sat(ErlNifEnv *env, ERL_NIF_TERM t, int64_t *out) {
    if (get_time(env, t, out))
        return 1;
    int sign = big_integer_sign(env, t);
    if (!sign)
        return 0;
    *out = sign < 0 ? INT64_MIN : INT64_MAX;
    return 1;
}

static int get_number(ErlNifEnv *env, ERL_NIF_TERM t, double *out) {
    if (enif_get_double(env, t, out))
        return 1;
    ErlNifSInt64 i;
    if (enif_get_int64(env, t, &i)) {
        *out = (double)i;
        return 1;
    }
    return 0;
}

static ERL_NIF_TERM make_sketch(ErlNifEnv *env, dx_sketch *sk) {
    sketch_res *r = enif_alloc_resource(sketch_type, sizeof *r);
    if (!r) {
        dx_sketch_free(sk);
        return err(env, A_enomem);
    }
    r->sk = sk;
    ERL_NIF_TERM t = enif_make_resource(env, r);
    enif_release_resource(r);
    return t;
}

/* metrics_series_new(RetentionHours) -> Series | {error, enomem}; badarg if
 * the retention is outside [1, DX_SERIES_MAX_RETENTION_H]. */
DX_METRICS_NIF(nif_metrics_series_new) {
    unsigned hours;
    if (!enif_get_uint(env, argv[0], &hours) || hours < 1 || hours > DX_SERIES_MAX_RETENTION_H)
        return enif_make_badarg(env);
    series_res *r = enif_alloc_resource(series_type, sizeof *r);
    if (!r)
        return err(env, A_enomem);
    memset(r, 0, sizeof *r);
    /* one shard per scheduler thread, at most MAX_SHARDS */
    ErlNifSysInfo info;
    enif_system_info(&info, sizeof info);
    unsigned n = info.scheduler_threads > 0 ? (unsigned)info.scheduler_threads : 1;
    n = n > MAX_SHARDS ? MAX_SHARDS : n;
    void *mem = NULL;
    if (posix_memalign(&mem, 64, n * sizeof(shard_t)) != 0) {
        enif_release_resource(r); /* the destructor handles shards == NULL */
        return err(env, A_enomem);
    }
    memset(mem, 0, n * sizeof(shard_t));
    r->shards = mem;
    r->nshards = n;
    r->hours = hours;
    atomic_store(&r->latest, INT64_MIN);
    for (unsigned i = 0; i < n; i++)
        pthread_mutex_init(&r->shards[i].mu, NULL);
    ERL_NIF_TERM t = enif_make_resource(env, r);
    enif_release_resource(r);
    return t;
}

/* How far ahead of the metrics clock a sample may be: callers' clocks (a
 * peer node, erlang:system_time/1 against the coarse clock) can run a little
 * ahead. A sample moves its series' windows to its time, so this is also the
 * most the windows can ever be ahead of `now'. */
#define FUTURE_TOLERANCE_S 5

enum { REC_OK = 0, REC_REJECTED = -1, REC_FUTURE = -2 };

/* Adds one sample v, or the batch sketch b when b is not NULL, at second t;
 * now is the metrics clock. REC_FUTURE: t is beyond now + tolerance;
 * REC_REJECTED: older than every window retains as of max(now, the series'
 * latest time) (judged against the clock too, so a fresh series refuses a
 * sample it would drop at the next query), NaN/inf, or out of memory. */
static int record_into_(series_res *r, int64_t t, int64_t now, double v, const dx_sketch *b) {
    if (t > now + FUTURE_TOLERANCE_S)
        return REC_FUTURE;
    /* the hour ring is the coarsest: it keeps hours [L/3600 - H, L/3600] */
    int64_t L = atomic_load_explicit(&r->latest, memory_order_relaxed);
    int64_t ref = L > now ? L : now;
    if (floor_div(t, 3600) < floor_div(ref, 3600) - (int64_t)r->hours)
        return REC_REJECTED;
    shard_t *sh = pick_shard(r);
    int rc = -1;
    pthread_mutex_lock(&sh->mu);
    if (!sh->series)
        sh->series = dx_series_new(0, r->hours); /* NULL (OOM) is rejected below */
    if (sh->series)
        rc = b ? dx_series_merge(sh->series, t, b) : dx_series_record(sh->series, t, v);
    if (rc == 0) {
        if (sh->total_count == 0 || t > sh->latest)
            sh->latest = t;
        sh->total_count += b ? dx_sketch_count(b) : 1;
        if (b)
            dx_sum_merge(&sh->total_sum, dx_sketch_sum_acc(b));
        else
            dx_sum_add(&sh->total_sum, v);
    }
    pthread_mutex_unlock(&sh->mu);
    if (rc != 0)
        return REC_REJECTED;
    while (t > L && !atomic_compare_exchange_weak(&r->latest, &L, t))
        ; /* L is reloaded by a failed exchange */
    return REC_OK;
}

static int record_into(series_res *r, int64_t t, int64_t now, double v) { return record_into_(r, t, now, v, NULL); }
static int record_batch_into(series_res *r, int64_t t, const dx_sketch *b) {
    return record_into_(r, t, wall_sec(), 0.0, b);
}

/* metrics_record(Series, Value, Time) -> ok | {error, rejected} |
 * {error, {invalid_argument, value | time}}. rejected: a time older than
 * every retained window, or out of memory. invalid_argument: an integer
 * value beyond 64 bits (dspex_metrics converts those to floats) or a time
 * more than FUTURE_TOLERANCE_S ahead of the metrics clock. Integer times
 * beyond 64 bits are just very old or very far ahead. */
DX_METRICS_NIF(nif_metrics_record) {
    series_res *r;
    double v;
    int64_t t;
    if (!enif_get_resource(env, argv[0], series_type, (void **)&r) || !get_time_sat(env, argv[2], &t))
        return enif_make_badarg(env);
    if (!get_number(env, argv[1], &v)) {
        if (!big_integer_sign(env, argv[1]))
            return enif_make_badarg(env);
        return err(env, enif_make_tuple2(env, A_invalid_argument, A_value));
    }
    int is_now = enif_is_identical(argv[2], A_now);
    int rc = record_into(r, t, is_now ? t : wall_sec(), v);
    if (rc == REC_OK)
        return A_ok;
    if (rc == REC_FUTURE)
        return err(env, enif_make_tuple2(env, A_invalid_argument, A_time));
    /* a handler records `now' and ignores the answer: count what it lost */
    if (is_now)
        dropped(1);
    return err(env, A_rejected);
}

/* metrics_set_clock(Seconds | now) -> ok. Testing only: freezes the
 * metrics clock (`now', clock/0, native timing, the future bound) at
 * Seconds, |Seconds| <= 2^40; `now' returns to the OS clock. */
DX_METRICS_NIF(nif_metrics_set_clock) {
    ErlNifSInt64 v;
    if (enif_is_identical(argv[0], A_now)) {
        atomic_store(&g_fixed_clock, INT64_MIN);
        return A_ok;
    }
    if (!enif_get_int64(env, argv[0], &v) || v > FIXED_CLOCK_LIMIT || v < -FIXED_CLOCK_LIMIT)
        return enif_make_badarg(env);
    atomic_store(&g_fixed_clock, (int64_t)v);
    return A_ok;
}

/* ---- native recording of the hottest store operations (get, get_value, set) ----
 * A telemetry handler costs more than a get itself (two clock reads, a
 * metadata map, a fun call, a NIF call). For these the analytics are
 * therefore bound into the NIF: the call is timed with the TSC and the sample
 * appended to a per-thread ring (no lock, no atomic read-modify-write). A ring
 * is drained into the bound series when it fills and before every query or
 * totals read, so a query sees every operation that returned before it. */

#define RING 256

typedef struct ring {
    pthread_mutex_t mu;     /* serialises drainers (the owner or a query) */
    _Atomic unsigned head;  /* written by the owning thread only */
    _Atomic unsigned tail;  /* advanced by a drainer, under mu */
    struct {
        int64_t sec;        /* wall second when the call returned (the coarse clock `now' reads) */
        uint32_t ticks;     /* duration in TSC ticks (saturated) */
        uint8_t op, res;
    } e[RING];
    /* drain scratch (under mu): one sketch per op/outcome, for one second */
    dx_sketch *batch[DX_NATIVE_OPS][DX_NATIVE_RESULTS];
    int64_t batch_sec[DX_NATIVE_OPS][DX_NATIVE_RESULTS];
    struct ring *next;
} ring_t;

static __thread ring_t *t_ring;
static ring_t *g_rings; /* every thread's ring; pushed once, freed at unload */
static pthread_mutex_t g_rings_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t g_bind_mu = PTHREAD_RWLOCK_INITIALIZER; /* bind vs drain */
static series_res *g_bound[DX_NATIVE_OPS][DX_NATIVE_RESULTS]; /* kept resources */
_Atomic int dx_native_enabled[DX_NATIVE_OPS];
static double g_tick_us = 1e-3; /* microseconds per tick, calibrated at load */
/* Sketch key of every short duration, by ticks: draining then needs no log(). */
#define KEY_TABLE 16384
static int64_t *g_key;
static dx_sketch *g_proto; /* the default accuracy, for keys of longer durations */

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
uint64_t dx_native_ticks(void) { return __rdtsc(); }
#else
uint64_t dx_native_ticks(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#endif

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Ticks per microsecond from a 2 ms busy wait (invariant TSC assumed, as on
 * every x86-64 with constant_tsc; elsewhere ticks are nanoseconds). */
static void calibrate(void) {
    int64_t n0 = mono_ns();
    uint64_t t0 = dx_native_ticks();
    while (mono_ns() - n0 < 2000000)
        ;
    int64_t n1 = mono_ns();
    uint64_t t1 = dx_native_ticks();
    if (t1 > t0 && n1 > n0)
        g_tick_us = (double)(n1 - n0) / 1000.0 / (double)(t1 - t0);
    g_proto = dx_sketch_new(0, 0);
    g_key = malloc(KEY_TABLE * sizeof *g_key);
    if (g_proto && g_key)
        for (uint64_t t = 1; t < KEY_TABLE; t++)
            g_key[t] = dx_sketch_key(g_proto, (double)t * g_tick_us);
}

static void flush_batch(ring_t *r, int op, int res) {
    dx_sketch *b = r->batch[op][res];
    if (!b || dx_sketch_count(b) == 0)
        return;
    series_res *s = g_bound[op][res];
    if (s && record_batch_into(s, r->batch_sec[op][res], b) != 0)
        dropped(dx_sketch_count(b));
    dx_sketch_clear(b);
}

/* Drains r into the bound series; the caller holds r->mu. Samples are summed
 * per op, outcome and second into scratch sketches (keys from the table), and
 * each sketch is merged into its series once. Samples of an op unbound
 * meanwhile are dropped (nobody collects them any more). Each sample carries
 * the second it was recorded in, read from the same clock as `now': a query
 * for [.., Now] therefore sees every call that returned before Now was read,
 * however late the drain runs (stamping at drain time put samples buffered
 * across a second boundary into Now + 1). */
static void drain(ring_t *r) {
    unsigned t = atomic_load_explicit(&r->tail, memory_order_relaxed);
    unsigned h = atomic_load_explicit(&r->head, memory_order_acquire);
    if (t == h)
        return;
    pthread_rwlock_rdlock(&g_bind_mu);
    for (; t != h; t++) {
        const __typeof__(r->e[0]) *x = &r->e[t % RING];
        if (!g_bound[x->op][x->res])
            continue;
        dx_sketch **bp = &r->batch[x->op][x->res];
        if (!g_proto || !g_key || (!*bp && !(*bp = dx_sketch_new(0, 0)))) {
            dropped(1); /* out of memory */
            continue;
        }
        if (dx_sketch_count(*bp) && r->batch_sec[x->op][x->res] != x->sec)
            flush_batch(r, x->op, x->res);
        r->batch_sec[x->op][x->res] = x->sec;
        uint64_t ticks = x->ticks ? x->ticks : 1;
        double v = (double)ticks * g_tick_us;
        if (dx_sketch_add_keyed(*bp, v, ticks < KEY_TABLE ? g_key[ticks] : dx_sketch_key(g_proto, v)) != 0)
            dropped(1);
    }
    for (int op = 0; op < DX_NATIVE_OPS; op++)
        for (int res = 0; res < DX_NATIVE_RESULTS; res++)
            flush_batch(r, op, res);
    pthread_rwlock_unlock(&g_bind_mu);
    atomic_store_explicit(&r->tail, h, memory_order_release);
}

static void drain_all(void) {
    pthread_mutex_lock(&g_rings_mu);
    ring_t *list = g_rings;
    pthread_mutex_unlock(&g_rings_mu);
    for (ring_t *r = list; r; r = r->next) { /* rings are only ever pushed at the head */
        pthread_mutex_lock(&r->mu);
        drain(r);
        pthread_mutex_unlock(&r->mu);
    }
}

void dx_native_record(int op, int res, uint64_t t0) {
    uint64_t t1 = dx_native_ticks();
    ring_t *r = t_ring;
    if (!r) {
        if (!(r = calloc(1, sizeof *r))) {
            dropped(1); /* out of memory: the sample is lost, the get is not */
            return;
        }
        pthread_mutex_init(&r->mu, NULL);
        pthread_mutex_lock(&g_rings_mu);
        r->next = g_rings;
        g_rings = r;
        pthread_mutex_unlock(&g_rings_mu);
        t_ring = r;
    }
    unsigned h = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (h - atomic_load_explicit(&r->tail, memory_order_acquire) >= RING) {
        pthread_mutex_lock(&r->mu);
        drain(r);
        pthread_mutex_unlock(&r->mu);
    }
    uint64_t d = t1 > t0 ? t1 - t0 : 0;
    r->e[h % RING].sec = wall_sec();
    r->e[h % RING].ticks = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
    r->e[h % RING].op = (uint8_t)op;
    r->e[h % RING].res = (uint8_t)res;
    atomic_store_explicit(&r->head, h + 1, memory_order_release);
}

static int native_op(ErlNifEnv *env, ERL_NIF_TERM t, int *op) {
    if (enif_is_identical(t, A_get)) *op = DX_NATIVE_GET;
    else if (enif_is_identical(t, A_get_value)) *op = DX_NATIVE_GET_VALUE;
    else if (enif_is_identical(t, A_set)) *op = DX_NATIVE_SET;
    else return 0;
    return 1;
}

/* metrics_native_bind(Op, Ok, Miss, Error) -> ok: Op's calls are timed in the
 * NIF from now on and recorded (in microseconds) into the series of their
 * outcome. metrics_native_bind(Op, undefined, undefined, undefined) unbinds. */
DX_METRICS_NIF(nif_metrics_native_bind) {
    int op;
    series_res *s[DX_NATIVE_RESULTS] = {NULL};
    int unbind = enif_is_identical(argv[1], A_undefined);
    if (!native_op(env, argv[0], &op))
        return enif_make_badarg(env);
    for (int i = 0; !unbind && i < DX_NATIVE_RESULTS; i++)
        if (!enif_get_resource(env, argv[1 + i], series_type, (void **)&s[i]))
            return enif_make_badarg(env);
    /* samples taken under the old binding go to the old series first */
    atomic_store(&dx_native_enabled[op], 0);
    drain_all();
    pthread_rwlock_wrlock(&g_bind_mu);
    for (int i = 0; i < DX_NATIVE_RESULTS; i++) {
        if (g_bound[op][i])
            enif_release_resource(g_bound[op][i]);
        if ((g_bound[op][i] = s[i]))
            enif_keep_resource(s[i]);
    }
    pthread_rwlock_unlock(&g_bind_mu);
    atomic_store(&dx_native_enabled[op], !unbind);
    return A_ok;
}

/* metrics_dropped() -> the number of samples lost since load (see g_dropped). */
DX_METRICS_NIF(nif_metrics_dropped) {
    return enif_make_uint64(env, atomic_load_explicit(&g_dropped, memory_order_relaxed));
}

/* metrics_native_flush() -> ok: drains every thread's pending samples. */
DX_METRICS_NIF(nif_metrics_native_flush) {
    drain_all();
    return A_ok;
}

void dx_metrics_unload(void) {
    for (int op = 0; op < DX_NATIVE_OPS; op++) atomic_store(&dx_native_enabled[op], 0);
    for (ring_t *r = g_rings, *n; r; r = n) {
        n = r->next;
        for (int op = 0; op < DX_NATIVE_OPS; op++)
            for (int res = 0; res < DX_NATIVE_RESULTS; res++) dx_sketch_free(r->batch[op][res]);
        pthread_mutex_destroy(&r->mu);
        free(r);
    }
    g_rings = NULL;
    free(g_key);
    g_key = NULL;
    dx_sketch_free(g_proto);
    g_proto = NULL;
    for (int op = 0; op < DX_NATIVE_OPS; op++)
        for (int i = 0; i < DX_NATIVE_RESULTS; i++)
            if (g_bound[op][i]) {
                enif_release_resource(g_bound[op][i]);
                g_bound[op][i] = NULL;
            }
}

/* metrics_query([Series], From, To, Now) -> {ok, Sketch} | {error, bad_range | enomem}.
 * The union of every series' data in [From, To] (see dx_series_query). */
DX_METRICS_NIF(nif_metrics_query) {
    int64_t from, to, now;
    unsigned len;
    if (!enif_get_list_length(env, argv[0], &len) || !get_time_sat(env, argv[1], &from) ||
        !get_time_sat(env, argv[2], &to) || !get_time(env, argv[3], &now))
        return enif_make_badarg(env);
    if (from > to)
        return err(env, A_bad_range);
    drain_all(); /* natively timed operations that already returned */
    /* check every element before doing any work */
    ERL_NIF_TERM l = argv[0], h;
    while (enif_get_list_cell(env, l, &h, &l)) {
        series_res *r;
        if (!enif_get_resource(env, h, series_type, (void **)&r))
            return enif_make_badarg(env);
    }
    dx_sketch *out = dx_sketch_new(0, 0);
    if (!out)
        return err(env, A_enomem);
    l = argv[0];
    while (enif_get_list_cell(env, l, &h, &l)) {
        series_res *r;
        enif_get_resource(env, h, series_type, (void **)&r);
        /* Every shard must drop old data as the series as a whole would:
         * query them all as of the latest time any of them has seen. */
        int64_t qnow = now;
        for (unsigned i = 0; i < r->nshards; i++) {
            shard_t *sh = &r->shards[i];
            pthread_mutex_lock(&sh->mu);
            if (sh->total_count && sh->latest > qnow)
                qnow = sh->latest;
            pthread_mutex_unlock(&sh->mu);
        }
        for (unsigned i = 0; i < r->nshards; i++) {
            shard_t *sh = &r->shards[i];
            pthread_mutex_lock(&sh->mu);
            int rc = sh->series ? dx_series_query(sh->series, from, to, qnow, out) : 0;
            pthread_mutex_unlock(&sh->mu);
            if (rc != 0) {
                dx_sketch_free(out);
                /* args were checked, so this is a time beyond the core's range or OOM */
                return err(env, A_bad_range);
            }
        }
    }
    ERL_NIF_TERM s = make_sketch(env, out);
    return enif_is_tuple(env, s) ? s : enif_make_tuple2(env, A_ok, s);
}

/* A sum as a float, or infinity / neg_infinity while it is beyond the
 * double range (it is kept scaled, so it can come back by cancellation). */
static ERL_NIF_TERM sum_term(ErlNifEnv *env, double s) {
    return isfinite(s) ? enif_make_double(env, s) : s > 0 ? A_infinity : A_neg_infinity;
}

/* metrics_totals(Series) -> {Count, Sum} since the series was created; Sum
 * as in sum_term. */
DX_METRICS_NIF(nif_metrics_totals) {
    series_res *r;
    if (!enif_get_resource(env, argv[0], series_type, (void **)&r))
        return enif_make_badarg(env);
    drain_all();
    uint64_t c = 0;
    dx_sum s = {0};
    for (unsigned i = 0; i < r->nshards; i++) {
        pthread_mutex_lock(&r->shards[i].mu);
        c += r->shards[i].total_count;
        dx_sum_merge(&s, &r->shards[i].total_sum);
        pthread_mutex_unlock(&r->shards[i].mu);
    }
    return enif_make_tuple2(env, enif_make_uint64(env, c), sum_term(env, dx_sum_value(&s)));
}

DX_METRICS_NIF(nif_metrics_series_memory) {
    series_res *r;
    if (!enif_get_resource(env, argv[0], series_type, (void **)&r))
        return enif_make_badarg(env);
    size_t m = sizeof *r + r->nshards * sizeof(shard_t);
    for (unsigned i = 0; i < r->nshards; i++) {
        pthread_mutex_lock(&r->shards[i].mu);
        m += dx_series_memory(r->shards[i].series);
        pthread_mutex_unlock(&r->shards[i].mu);
    }
    return enif_make_uint64(env, m);
}

static ERL_NIF_TERM num_or_undef(ErlNifEnv *env, double d) {
    return isfinite(d) ? enif_make_double(env, d) : A_undefined;
}

/* metrics_sketch_stats(Sketch) -> #{count, sum, min, max, mean, p50, p90,
 * p95, p99}; everything but count and sum is undefined when empty; sum as
 * in sum_term; the mean is always a float (from the scaled sum). */
DX_METRICS_NIF(nif_metrics_sketch_stats) {
    sketch_res *r;
    if (!enif_get_resource(env, argv[0], sketch_type, (void **)&r))
        return enif_make_badarg(env);
    const dx_sketch *s = r->sk;
    uint64_t n = dx_sketch_count(s);
    double sum = dx_sketch_sum(s);
    ERL_NIF_TERM k[9] = {A_count, A_sum, A_min, A_max, A_mean, A_p50, A_p90, A_p95, A_p99};
    ERL_NIF_TERM v[9] = {enif_make_uint64(env, n),
                         sum_term(env, sum),
                         num_or_undef(env, dx_sketch_min(s)),
                         num_or_undef(env, dx_sketch_max(s)),
                         num_or_undef(env, dx_sketch_mean(s)),
                         num_or_undef(env, dx_sketch_quantile(s, 0.50)),
                         num_or_undef(env, dx_sketch_quantile(s, 0.90)),
                         num_or_undef(env, dx_sketch_quantile(s, 0.95)),
                         num_or_undef(env, dx_sketch_quantile(s, 0.99))};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, k, v, 9, &m);
    return m;
}

/* metrics_sketch_quantile(Sketch, Q) -> float | undefined (empty). */
DX_METRICS_NIF(nif_metrics_sketch_quantile) {
    sketch_res *r;
    double q;
    if (!enif_get_resource(env, argv[0], sketch_type, (void **)&r) || !get_number(env, argv[1], &q) ||
        !(q >= 0.0 && q <= 1.0))
        return enif_make_badarg(env);
    return num_or_undef(env, dx_sketch_quantile(r->sk, q));
}

/* metrics_sketch_to_binary(Sketch) -> binary (the "DXQ" format of sketch.h). */
DX_METRICS_NIF(nif_metrics_sketch_to_binary) {
    sketch_res *r;
    if (!enif_get_resource(env, argv[0], sketch_type, (void **)&r))
        return enif_make_badarg(env);
    size_t need = dx_sketch_serialize(r->sk, NULL, 0);
    ERL_NIF_TERM bin;
    unsigned char *p = enif_make_new_binary(env, need, &bin);
    if (!p)
        return err(env, A_enomem);
    dx_sketch_serialize(r->sk, p, need);
    return bin;
}

/* metrics_sketch_from_binary(Bin) -> {ok, Sketch} | {error, invalid_sketch}
 * (malformed, or a bucket budget above DX_SKETCH_DEFAULT_BUCKETS). */
DX_METRICS_NIF(nif_metrics_sketch_from_binary) {
    ErlNifBinary b;
    if (!enif_inspect_binary(env, argv[0], &b))
        return enif_make_badarg(env);
    dx_sketch *sk = dx_sketch_deserialize(b.data, b.size);
    if (!sk)
        return err(env, A_invalid_sketch);
    /* Only sketches with the budget this library creates: it bounds every
     * later walk over the counters (stats, quantiles, serialisation), which
     * run on normal schedulers, to a few microseconds. */
    if (dx_sketch_max_buckets(sk) > DX_SKETCH_DEFAULT_BUCKETS) {
        dx_sketch_free(sk);
        return err(env, A_invalid_sketch);
    }
    ERL_NIF_TERM s = make_sketch(env, sk);
    return enif_is_tuple(env, s) ? s : enif_make_tuple2(env, A_ok, s);
}

/* metrics_sketch_merge([Sketch]) -> {ok, Sketch} | {error, incompatible}
 * (different accuracies). The inputs are not modified. */
DX_METRICS_NIF(nif_metrics_sketch_merge) {
    unsigned len;
    if (!enif_get_list_length(env, argv[0], &len) || len == 0)
        return enif_make_badarg(env);
    ERL_NIF_TERM l = argv[0], h;
    sketch_res *first = NULL;
    while (enif_get_list_cell(env, l, &h, &l)) {
        sketch_res *r;
        if (!enif_get_resource(env, h, sketch_type, (void **)&r))
            return enif_make_badarg(env);
        if (!first)
            first = r;
    }
    dx_sketch *out = dx_sketch_new(dx_sketch_rel_accuracy(first->sk), 0);
    if (!out)
        return err(env, A_enomem);
    l = argv[0];
    while (enif_get_list_cell(env, l, &h, &l)) {
        sketch_res *r;
        enif_get_resource(env, h, sketch_type, (void **)&r);
        if (dx_sketch_rel_accuracy(r->sk) != dx_sketch_rel_accuracy(out)) {
            dx_sketch_free(out);
            return err(env, A_incompatible);
        }
        if (dx_sketch_merge(out, r->sk) != 0) { /* OOM or a count beyond 2^64 */
            dx_sketch_free(out);
            return err(env, A_enomem);
        }
    }
    ERL_NIF_TERM s = make_sketch(env, out);
    return enif_is_tuple(env, s) ? s : enif_make_tuple2(env, A_ok, s);
}

/* metrics_now() -> the OS clock in seconds, the time `now' means above. */
DX_METRICS_NIF(nif_metrics_now) { return enif_make_int64(env, wall_sec()); }
