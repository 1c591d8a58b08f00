/* Unit tests of the quantile sketch and the time-windowed series
 * (c_src/core/sketch.c).
 *
 * Rank rule checked everywhere (same as sketch.h): for q in [0,1] and n
 * samples sorted ascending x[0..n-1], the reference is x[r] with
 * r = floor(q * (n - 1)) computed in double, and an estimate passes when
 * |estimate - x[r]| <= a * |x[r]|, with no extra slack.
 *
 * DX_TEST_SCALE (set by the Makefile for valgrind) means "reduced run". */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "sketch.h"

static int reduced(void) { return getenv("DX_TEST_SCALE") != NULL; }
static size_t scaled(size_t full, size_t small) { return reduced() ? small : full; }

/* ---- deterministic RNG (splitmix64) --------------------------------- */
static uint64_t rng_state;
static void rng_seed(uint64_t s) { rng_state = s; }
static uint64_t rng_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_open01(void) { return ((double)(rng_u64() >> 11) + 0.5) * 0x1p-53; } /* (0,1) */
static double rng_normal(void) {
    return sqrt(-2.0 * log(rng_open01())) * cos(6.283185307179586 * rng_open01());
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t rank_of(double q, size_t n) { return (uint64_t)floor(q * (double)(n - 1)); }

/* Checks 1001 evenly spaced q plus the named percentiles against the sorted
 * samples; only ranks whose true |x| is above min_mag are checked (for
 * collapsed sketches). Returns the largest relative error seen and stores
 * how many ranks were checked. */
static const double named_q[] = {0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0};

static double check_quantiles(const dx_sketch *s, const double *sorted, size_t n, double a, double min_mag,
                              int *checked) {
    double worst = 0.0;
    int nchk = 0;
    size_t nq = sizeof named_q / sizeof named_q[0];
    for (size_t i = 0; i < 1001 + nq; i++) {
        double q = i < 1001 ? (double)i / 1000.0 : named_q[i - 1001];
        double x = sorted[rank_of(q, n)];
        if (fabs(x) <= min_mag)
            continue;
        double est = dx_sketch_quantile(s, q);
        double err = x == 0.0 ? fabs(est) : fabs(est - x) / fabs(x);
        if (!(err <= a)) {
            print_error("q=%.4f rank=%llu exact=%.17g est=%.17g relerr=%.3g\n", q,
                        (unsigned long long)rank_of(q, n), x, est, err);
            fail();
        }
        if (x == 0.0)
            assert_true(est == 0.0);
        if (err > worst)
            worst = err;
        nchk++;
    }
    if (checked)
        *checked = nchk;
    return worst;
}

static double *sorted_copy(const double *v, size_t n) {
    double *c = malloc(n * sizeof *c);
    assert_non_null(c);
    memcpy(c, v, n * sizeof *c);
    qsort(c, n, sizeof *c, cmp_double);
    return c;
}

static long double ref_sum(const double *v, size_t n) {
    long double s = 0;
    for (size_t i = 0; i < n; i++)
        s += v[i];
    return s;
}

/* Builds a sketch of v, checks the exact stats and every quantile. */
static double run_accuracy(const char *name, const double *v, size_t n, double a) {
    dx_sketch *s = dx_sketch_new(a, 0);
    assert_non_null(s);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(dx_sketch_add(s, v[i]), 0);
    double *x = sorted_copy(v, n);
    assert_int_equal(dx_sketch_count(s), n);
    assert_true(dx_sketch_min(s) == x[0]);
    assert_true(dx_sketch_max(s) == x[n - 1]);
    long double rs = ref_sum(v, n);
    assert_true(fabsl((long double)dx_sketch_sum(s) - rs) <= 1e-12L * (fabsl(rs) + 1));
    assert_true(dx_sketch_collapsed_limit(s) == 0.0); /* natural spans stay below 2048 */
    double worst = check_quantiles(s, x, n, a, -1.0, NULL);
    print_message("    %-22s n=%zu max rel err %.5f%% (p50 %.5g p99 %.5g) mem %zu B\n", name, n, worst * 100,
                  dx_sketch_quantile(s, 0.5), dx_sketch_quantile(s, 0.99), dx_sketch_memory(s));
    free(x);
    dx_sketch_free(s);
    return worst;
}

/* ---- accuracy ------------------------------------------------------- */

static void test_accuracy_uniform(void **st) {
    size_t n = scaled(200000, 5000);
    double *v = malloc(n * sizeof *v);
    rng_seed(1);
    for (size_t i = 0; i < n; i++)
        v[i] = 1000.0 * rng_open01();
    run_accuracy("uniform(0,1000)", v, n, 0.01);
    free(v);
}

static void test_accuracy_exponential(void **st) {
    size_t n = scaled(200000, 5000);
    double *v = malloc(n * sizeof *v);
    rng_seed(2);
    for (size_t i = 0; i < n; i++)
        v[i] = -log(rng_open01()) * 0.25;
    run_accuracy("exponential(4)", v, n, 0.01);
    free(v);
}

static void test_accuracy_skewed(void **st) {
    size_t n = scaled(200000, 5000);
    double *v = malloc(n * sizeof *v);
    rng_seed(3);
    for (size_t i = 0; i < n; i++)
        v[i] = exp(3.0 + 2.0 * rng_normal()); /* log-normal, sigma 2 */
    run_accuracy("lognormal(3,2)", v, n, 0.01);
    rng_seed(4);
    for (size_t i = 0; i < n; i++)
        v[i] = 1e-3 * pow(rng_open01(), -1.0 / 1.1); /* Pareto alpha 1.1 */
    run_accuracy("pareto(1.1)", v, n, 0.01);
    rng_seed(5); /* latency-like: 1 ns .. 3 h, log-uniform */
    for (size_t i = 0; i < n; i++)
        v[i] = 1e-9 * pow(1.08e13, rng_open01());
    run_accuracy("latency 1ns..3h", v, n, 0.01);
    free(v);
}

static void test_accuracy_negatives_zeros(void **st) {
    size_t n = scaled(200000, 5000);
    double *v = malloc(n * sizeof *v);
    rng_seed(6);
    for (size_t i = 0; i < n; i++) {
        double u = rng_open01();
        if (u < 0.2)
            v[i] = (i & 1) ? 0.0 : -0.0;
        else if (u < 0.6)
            v[i] = -exp(1.0 + 1.5 * rng_normal());
        else if (u < 0.7)
            v[i] = 42.0; /* heavy duplicates */
        else
            v[i] = 500.0 * rng_open01();
    }
    run_accuracy("mixed neg/zero/pos", v, n, 0.01);
    /* a coarser accuracy setting keeps its own (looser) bound */
    run_accuracy("mixed at a=0.05", v, n, 0.05);
    free(v);
}

/* The checker itself must be able to fail: a 5% sketch is visibly worse
 * than 1% on smooth data. */
static void test_checker_detects_coarse_sketch(void **st) {
    size_t n = scaled(50000, 5000);
    double *v = malloc(n * sizeof *v);
    rng_seed(7);
    for (size_t i = 0; i < n; i++)
        v[i] = 1.0 + 1000.0 * rng_open01();
    dx_sketch *s = dx_sketch_new(0.05, 0);
    for (size_t i = 0; i < n; i++)
        dx_sketch_add(s, v[i]);
    double *x = sorted_copy(v, n);
    double worst = 0;
    for (int i = 1; i < 1000; i++) {
        double q = i / 1000.0, ex = x[rank_of(q, n)];
        double e = fabs(dx_sketch_quantile(s, q) - ex) / ex;
        if (e > worst)
            worst = e;
    }
    assert_true(worst > 0.01);
    assert_true(worst <= 0.05);
    free(x);
    free(v);
    dx_sketch_free(s);
}

static void test_small_exact_cases(void **st) {
    dx_sketch *s = dx_sketch_new(0, 0);
    assert_non_null(s);
    assert_true(dx_sketch_rel_accuracy(s) == 0.01);
    assert_int_equal(dx_sketch_add(s, 5.0), 0);
    for (int i = 0; i <= 10; i++) /* one sample: every quantile is it */
        assert_true(dx_sketch_quantile(s, i / 10.0) == 5.0);
    assert_int_equal(dx_sketch_add_n(s, -3.0, 3), 0);
    assert_int_equal(dx_sketch_add_n(s, 0.0, 2), 0);
    /* samples: -3 -3 -3 0 0 5 ; r = floor(q*5) */
    assert_int_equal(dx_sketch_count(s), 6);
    assert_true(dx_sketch_sum(s) == -4.0);
    assert_true(dx_sketch_min(s) == -3.0 && dx_sketch_max(s) == 5.0);
    assert_true(fabs(dx_sketch_quantile(s, 0.4) + 3.0) <= 0.03); /* r=2 */
    assert_true(dx_sketch_quantile(s, 0.7) == 0.0);               /* r=3 */
    assert_true(dx_sketch_quantile(s, 0.99) == 0.0);              /* r=4 */
    assert_true(dx_sketch_quantile(s, 1.0) == 5.0);
    dx_sketch_clear(s);
    assert_int_equal(dx_sketch_count(s), 0);
    assert_true(isnan(dx_sketch_quantile(s, 0.5)));
    assert_true(isnan(dx_sketch_min(s)) && isnan(dx_sketch_max(s)));
    assert_true(dx_sketch_sum(s) == 0.0);
    assert_int_equal(dx_sketch_add(s, 7.0), 0); /* reusable after clear */
    assert_true(dx_sketch_quantile(s, 0.5) == 7.0);
    dx_sketch_free(s);
    /* extreme finite values stay finite and exact at the ends; the whole
     * double range is ~72700 buckets at 1%, so give it room to not collapse */
    s = dx_sketch_new(0.01, 80000);
    assert_non_null(s);
    dx_sketch_add(s, 7.0);
    assert_int_equal(dx_sketch_add(s, DBL_MAX), 0);
    assert_int_equal(dx_sketch_add(s, -DBL_MAX), 0);
    assert_int_equal(dx_sketch_add(s, DBL_TRUE_MIN), 0);
    assert_true(dx_sketch_quantile(s, 1.0) == DBL_MAX);
    assert_true(dx_sketch_quantile(s, 0.0) == -DBL_MAX);
    double q = dx_sketch_quantile(s, 0.99); /* r=2 -> 7.0 */
    assert_true(fabs(q - 7.0) <= 0.07);
    assert_true(dx_sketch_sum(s) == 7.0); /* compensated: DBL_MAX cancels, 7 survives */
    dx_sketch_free(s);
}

/* ---- invalid input -------------------------------------------------- */

static void test_invalid_input(void **st) {
    assert_null(dx_sketch_new(-0.01, 0));
    assert_null(dx_sketch_new(1.0, 0));
    assert_null(dx_sketch_new(NAN, 0));
    assert_null(dx_sketch_new(1e-9, 0));
    assert_null(dx_sketch_new(0.01, 1));
    assert_null(dx_sketch_new(0.01, DX_SKETCH_MAX_BUCKETS + 1));
    dx_sketch *s = dx_sketch_new(0.01, 2048);
    assert_non_null(s);
    assert_int_equal(dx_sketch_add(s, NAN), -1);
    assert_int_equal(dx_sketch_add(s, INFINITY), -1);
    assert_int_equal(dx_sketch_add(s, -INFINITY), -1);
    assert_int_equal(dx_sketch_add_n(s, NAN, 5), -1);
    assert_int_equal(dx_sketch_add_n(s, 1.0, 0), 0); /* nothing to add */
    assert_int_equal(dx_sketch_count(s), 0);
    assert_true(isnan(dx_sketch_quantile(s, 0.5)));
    assert_int_equal(dx_sketch_add(s, 1.0), 0);
    assert_true(isnan(dx_sketch_quantile(s, NAN)));
    assert_true(isnan(dx_sketch_quantile(s, -0.01)));
    assert_true(isnan(dx_sketch_quantile(s, 1.01)));
    /* count overflow is refused and changes nothing */
    assert_int_equal(dx_sketch_add_n(s, 2.0, UINT64_MAX), -1);
    assert_int_equal(dx_sketch_add_n(s, 2.0, UINT64_MAX - 1), 0);
    assert_int_equal(dx_sketch_add(s, 3.0), -1);
    assert_int_equal(dx_sketch_count(s), UINT64_MAX);
    assert_true(dx_sketch_max(s) == 2.0);
    assert_true(dx_sketch_quantile(s, 0.5) >= 1.98 && dx_sketch_quantile(s, 0.5) <= 2.0);
    dx_sketch *t = dx_sketch_new(0.01, 0);
    dx_sketch_add(t, 1.0);
    assert_int_equal(dx_sketch_merge(s, t), -1);
    assert_int_equal(dx_sketch_count(s), UINT64_MAX);
    dx_sketch_free(t);
    dx_sketch_free(s);
    /* NULL everywhere is harmless */
    dx_sketch_free(NULL);
    dx_sketch_clear(NULL);
    assert_int_equal(dx_sketch_add(NULL, 1.0), -1);
    assert_int_equal(dx_sketch_merge(NULL, NULL), -1);
    assert_int_equal(dx_sketch_count(NULL), 0);
    assert_true(isnan(dx_sketch_quantile(NULL, 0.5)));
    assert_int_equal(dx_sketch_serialize(NULL, NULL, 0), 0);
    assert_null(dx_sketch_deserialize(NULL, 10));
    assert_int_equal(dx_sketch_memory(NULL), 0);
}

/* ---- merge ---------------------------------------------------------- */

static size_t ser(const dx_sketch *s, uint8_t **out) {
    size_t n = dx_sketch_serialize(s, NULL, 0);
    *out = malloc(n ? n : 1);
    assert_non_null(*out);
    assert_int_equal(dx_sketch_serialize(s, *out, n), n);
    return n;
}

static int same_bytes(const dx_sketch *a, const dx_sketch *b) {
    uint8_t *x, *y;
    size_t nx = ser(a, &x), ny = ser(b, &y);
    int eq = nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return eq;
}

static void fill_mixed(double *v, size_t n, uint64_t seed) {
    rng_seed(seed);
    for (size_t i = 0; i < n; i++) {
        double u = rng_open01();
        v[i] = u < 0.1 ? 0.0 : u < 0.3 ? -exp(2.0 * rng_normal()) : exp(1.0 + 2.0 * rng_normal());
    }
}

static void test_merge_halves(void **st) {
    size_t n = scaled(100000, 4000);
    double *v = malloc(n * sizeof *v);
    fill_mixed(v, n, 11);
    dx_sketch *whole = dx_sketch_new(0.01, 0), *a = dx_sketch_new(0.01, 0), *b = dx_sketch_new(0.01, 0);
    for (size_t i = 0; i < n; i++) {
        dx_sketch_add(whole, v[i]);
        dx_sketch_add(i % 3 ? a : b, v[i]); /* interleaved, unequal halves */
    }
    uint64_t ca = dx_sketch_count(a);
    assert_int_equal(dx_sketch_merge(a, b), 0);
    assert_int_equal(dx_sketch_count(a), n);
    assert_int_equal(dx_sketch_count(a), ca + dx_sketch_count(b));
    assert_true(dx_sketch_min(a) == dx_sketch_min(whole));
    assert_true(dx_sketch_max(a) == dx_sketch_max(whole));
    long double rs = ref_sum(v, n);
    assert_true(fabsl((long double)dx_sketch_sum(a) - rs) <= 1e-12L * fabsl(rs));
    double *x = sorted_copy(v, n);
    double worst = check_quantiles(a, x, n, 0.01, -1.0, NULL);
    /* no collapse: the merged buckets are exactly the whole's buckets */
    for (int i = 0; i <= 1000; i++)
        assert_true(dx_sketch_quantile(a, i / 1000.0) == dx_sketch_quantile(whole, i / 1000.0));
    print_message("    merged halves max rel err %.5f%%\n", worst * 100);
    /* merging into an empty sketch copies; merging an empty one is a no-op */
    dx_sketch *e = dx_sketch_new(0.01, 0), *e2 = dx_sketch_new(0.01, 0);
    assert_int_equal(dx_sketch_merge(e, whole), 0);
    assert_int_equal(dx_sketch_merge(e, e2), 0);
    for (int i = 0; i <= 100; i++)
        assert_true(dx_sketch_quantile(e, i / 100.0) == dx_sketch_quantile(whole, i / 100.0));
    assert_true(dx_sketch_min(e) == dx_sketch_min(whole) && dx_sketch_max(e) == dx_sketch_max(whole));
    /* incompatible accuracy: refused, nothing changes */
    dx_sketch *other = dx_sketch_new(0.02, 0);
    dx_sketch_add(other, 1.0);
    uint8_t *before;
    size_t nb = ser(e, &before);
    assert_int_equal(dx_sketch_merge(e, other), -1);
    uint8_t *after;
    size_t na = ser(e, &after);
    assert_true(na == nb && memcmp(before, after, na) == 0);
    free(before);
    free(after);
    /* self merge doubles everything */
    uint64_t c = dx_sketch_count(e);
    double med = dx_sketch_quantile(e, 0.5), sum = dx_sketch_sum(e);
    assert_int_equal(dx_sketch_merge(e, e), 0);
    assert_int_equal(dx_sketch_count(e), 2 * c);
    assert_true(dx_sketch_quantile(e, 0.5) == med);
    assert_true(dx_sketch_sum(e) == 2 * sum);
    free(x);
    free(v);
    dx_sketch_free(whole);
    dx_sketch_free(a);
    dx_sketch_free(b);
    dx_sketch_free(e);
    dx_sketch_free(e2);
    dx_sketch_free(other);
}

/* ---- serialization -------------------------------------------------- */

static void roundtrip(const dx_sketch *s) {
    uint8_t *buf;
    size_t n = ser(s, &buf);
    dx_sketch *d = dx_sketch_deserialize(buf, n);
    assert_non_null(d);
    assert_int_equal(dx_sketch_count(d), dx_sketch_count(s));
    assert_memory_equal(&(double){dx_sketch_sum(d)}, &(double){dx_sketch_sum(s)}, sizeof(double));
    if (dx_sketch_count(s)) {
        assert_true(dx_sketch_min(d) == dx_sketch_min(s));
        assert_true(dx_sketch_max(d) == dx_sketch_max(s));
    }
    assert_true(dx_sketch_rel_accuracy(d) == dx_sketch_rel_accuracy(s));
    assert_true(dx_sketch_collapsed_limit(d) == dx_sketch_collapsed_limit(s));
    for (int i = 0; i <= 1000; i++) {
        double x = dx_sketch_quantile(s, i / 1000.0), y = dx_sketch_quantile(d, i / 1000.0);
        assert_true(x == y || (isnan(x) && isnan(y)));
    }
    assert_true(same_bytes(s, d));
    /* merging a deserialized copy works (windows are usable) */
    assert_int_equal(dx_sketch_merge(d, s), 0);
    assert_int_equal(dx_sketch_count(d), 2 * dx_sketch_count(s));
    free(buf);
    dx_sketch_free(d);
}

static void test_serialize_roundtrip(void **st) {
    size_t n = scaled(50000, 3000);
    double *v = malloc(n * sizeof *v);
    fill_mixed(v, n, 21);
    dx_sketch *s = dx_sketch_new(0.01, 0);
    roundtrip(s); /* empty */
    uint8_t *eb;
    size_t en = ser(s, &eb);
    print_message("    empty sketch: %zu bytes\n", en);
    free(eb);
    for (size_t i = 0; i < n; i++)
        dx_sketch_add(s, v[i]);
    roundtrip(s);
    uint8_t *buf;
    size_t len = ser(s, &buf);
    print_message("    %zu mixed values: %zu bytes serialized, %zu bytes in memory\n", n, len, dx_sketch_memory(s));
    /* too small a buffer: the size is reported and nothing is written */
    uint8_t *small = malloc(len);
    memset(small, 0xAA, len);
    assert_int_equal(dx_sketch_serialize(s, small, len - 1), len);
    for (size_t i = 0; i < len; i++)
        assert_int_equal(small[i], 0xAA);
    free(small);
    /* collapsed sketch and one of a different accuracy/cap */
    dx_sketch *c = dx_sketch_new(0.002, 64);
    for (size_t i = 0; i < n; i++)
        dx_sketch_add(c, v[i]);
    assert_true(dx_sketch_collapsed_limit(c) > 0);
    roundtrip(c);
    /* only zeros / only negatives */
    dx_sketch *z = dx_sketch_new(0.01, 0);
    dx_sketch_add_n(z, 0.0, 3);
    roundtrip(z);
    dx_sketch_add(z, -1e-300);
    roundtrip(z);
    free(buf);
    free(v);
    dx_sketch_free(s);
    dx_sketch_free(c);
    dx_sketch_free(z);
}

/* If a mutated buffer still parses, the result must behave like a sketch. */
static void exercise(dx_sketch *d) {
    if (!d)
        return;
    uint64_t n = dx_sketch_count(d);
    for (int i = 0; i <= 10; i++) {
        double q = dx_sketch_quantile(d, i / 10.0);
        assert_true(n == 0 ? isnan(q) : (q >= dx_sketch_min(d) && q <= dx_sketch_max(d)));
    }
    dx_sketch_add(d, 3.5);
    dx_sketch_add(d, -2.0);
    uint8_t *b;
    size_t len = ser(d, &b);
    dx_sketch *e = dx_sketch_deserialize(b, len);
    assert_non_null(e);
    assert_true(same_bytes(d, e));
    dx_sketch_free(e);
    free(b);
    dx_sketch_free(d);
}

static void test_deserialize_garbage(void **st) {
    dx_sketch *s = dx_sketch_new(0.01, 0);
    double v[500];
    fill_mixed(v, 500, 31);
    for (int i = 0; i < 500; i++)
        dx_sketch_add(s, v[i]);
    uint8_t *buf;
    size_t len = ser(s, &buf);
    /* every truncation fails (the exact length is required) */
    for (size_t l = 0; l < len; l++) {
        uint8_t *t = malloc(l ? l : 1); /* own allocation so ASan sees overreads */
        memcpy(t, buf, l);
        assert_null(dx_sketch_deserialize(t, l));
        free(t);
    }
    /* trailing garbage fails */
    uint8_t *longer = malloc(len + 1);
    memcpy(longer, buf, len);
    longer[len] = 0;
    assert_null(dx_sketch_deserialize(longer, len + 1));
    free(longer);
    /* every single-byte corruption either fails or yields a sane sketch */
    static const uint8_t pat[] = {0x00, 0xFF, 0x80, 0x7F};
    size_t parsed = 0, total = 0;
    uint8_t *m = malloc(len);
    for (size_t i = 0; i < len; i++) {
        for (int j = 0; j < 12; j++) {
            memcpy(m, buf, len);
            m[i] = j < 8 ? (uint8_t)(buf[i] ^ (1u << j)) : pat[j - 8];
            if (m[i] == buf[i])
                continue;
            dx_sketch *d = dx_sketch_deserialize(m, len);
            parsed += d != NULL;
            total++;
            exercise(d);
        }
    }
    print_message("    %zu single-byte corruptions, %zu still parse (count/value bytes)\n", total, parsed);
    assert_true(parsed < total); /* the validation actually rejects things */
    /* the header bytes are all checked */
    for (size_t i = 0; i < 5; i++) {
        memcpy(m, buf, len);
        m[i] ^= 0x40;
        assert_null(dx_sketch_deserialize(m, len));
    }
    free(m);
    /* random buffers, plain and with a valid prefix to reach deeper code */
    rng_seed(32);
    size_t rounds = scaled(200000, 20000), deep_ok = 0;
    uint8_t r[96];
    for (size_t k = 0; k < rounds; k++) {
        size_t l = rng_u64() % sizeof r;
        for (size_t i = 0; i < l; i++)
            r[i] = (uint8_t)rng_u64();
        if (k & 1) { /* "DXQ" v1, flags, a=0.01, max_buckets small */
            size_t pre = l < 15 ? l : 15;
            uint8_t hdr[15];
            memcpy(hdr, buf, 13);
            hdr[4] = (uint8_t)(rng_u64() & 3);
            hdr[13] = 16;
            hdr[14] = (uint8_t)(rng_u64() & 3);
            memcpy(r, hdr, pre);
            for (size_t i = 15; i < l; i++) /* small varints parse more often */
                r[i] &= (rng_u64() & 1) ? 0x07 : 0xFF;
        }
        uint8_t *h = malloc(l ? l : 1);
        memcpy(h, r, l);
        dx_sketch *d = dx_sketch_deserialize(h, l);
        if (d) {
            assert_true(k & 1);
            deep_ok++;
        }
        exercise(d);
        free(h);
    }
    print_message("    %zu random buffers, %zu prefixed ones parsed\n", rounds, deep_ok);
    free(buf);
    dx_sketch_free(s);
}

/* Hand-built buffers for each validation rule. */
struct bb {
    uint8_t b[256];
    size_t n;
};
static void bb_u8(struct bb *w, uint8_t x) { w->b[w->n++] = x; }
static void bb_var(struct bb *w, uint64_t v) {
    while (v >= 0x80) {
        bb_u8(w, (uint8_t)(v | 0x80));
        v >>= 7;
    }
    bb_u8(w, (uint8_t)v);
}
static void bb_f64(struct bb *w, double d) {
    uint64_t u;
    memcpy(&u, &d, 8);
    for (int i = 0; i < 8; i++)
        bb_u8(w, (uint8_t)(u >> (8 * i)));
}
static void bb_head(struct bb *w, uint8_t flags, double a, uint64_t mb, uint64_t zero) {
    w->n = 0;
    bb_u8(w, 'D');
    bb_u8(w, 'X');
    bb_u8(w, 'Q');
    bb_u8(w, 1);
    bb_u8(w, flags);
    bb_f64(w, a);
    bb_var(w, mb);
    bb_var(w, zero);
}
static void bb_stats(struct bb *w, double sum, double mn, double mx) {
    bb_f64(w, sum);
    bb_f64(w, 0.0);
    bb_f64(w, mn);
    bb_f64(w, mx);
}
static dx_sketch *bb_parse(const struct bb *w) {
    uint8_t *h = malloc(w->n);
    memcpy(h, w->b, w->n);
    dx_sketch *d = dx_sketch_deserialize(h, w->n);
    free(h);
    return d;
}

static void test_deserialize_rules(void **st) {
    struct bb w;
    /* valid baseline: one positive bucket (index 0 = value 1.0) x 3 */
    bb_head(&w, 2, 0.01, 2048, 0);
    bb_var(&w, 0);
    bb_var(&w, 1);
    bb_var(&w, 0);
    bb_var(&w, 3);
    bb_stats(&w, 3.0, 1.0, 1.0);
    dx_sketch *d = bb_parse(&w);
    assert_non_null(d);
    assert_int_equal(dx_sketch_count(d), 3);
    assert_true(fabs(dx_sketch_quantile(d, 0.5) - 1.0) <= 0.01);
    dx_sketch_free(d);
    /* wrong version */
    w.b[3] = 2;
    assert_null(bb_parse(&w));
    w.b[3] = 1;
    /* unknown flag bit (bit2, scaled sum, is known) / nonempty flag missing */
    w.b[4] = 10;
    assert_null(bb_parse(&w));
    w.b[4] = 0;
    assert_null(bb_parse(&w));
    w.b[4] = 2;
    assert_non_null(d = bb_parse(&w));
    dx_sketch_free(d);

#define EXPECT_BAD(build)                                                                                      \
    do {                                                                                                       \
        build;                                                                                                 \
        assert_null(bb_parse(&w));                                                                             \
    } while (0)
    /* bad accuracy, bad max_buckets */
    EXPECT_BAD(bb_head(&w, 0, 0.0, 2048, 0); bb_var(&w, 0); bb_var(&w, 0));
    EXPECT_BAD(bb_head(&w, 0, NAN, 2048, 0); bb_var(&w, 0); bb_var(&w, 0));
    EXPECT_BAD(bb_head(&w, 0, 1.5, 2048, 0); bb_var(&w, 0); bb_var(&w, 0));
    EXPECT_BAD(bb_head(&w, 0, 0.01, 0, 0); bb_var(&w, 0); bb_var(&w, 0));
    EXPECT_BAD(bb_head(&w, 0, 0.01, 1, 0); bb_var(&w, 0); bb_var(&w, 0));
    EXPECT_BAD(bb_head(&w, 0, 0.01, 1u << 30, 0); bb_var(&w, 0); bb_var(&w, 0));
    /* valid empty sketch */
    bb_head(&w, 0, 0.01, 2048, 0);
    bb_var(&w, 0);
    bb_var(&w, 0);
    assert_non_null(d = bb_parse(&w));
    dx_sketch_free(d);
    /* overlong varint (11 bytes) for the zero count */
    EXPECT_BAD(bb_head(&w, 0, 0.01, 2048, 0); w.n--;
               for (int i = 0; i < 10; i++) bb_u8(&w, 0x80); bb_u8(&w, 0); bb_var(&w, 0); bb_var(&w, 0));
    /* a zero count bucket */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 0);
               bb_stats(&w, 1, 1, 1));
    /* index beyond any double */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 2 * 100000); bb_var(&w, 1);
               bb_stats(&w, 1, 1, 1));
    /* counts overflowing uint64 */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 2); bb_var(&w, 0); bb_var(&w, UINT64_MAX);
               bb_var(&w, 0); bb_var(&w, 1); bb_stats(&w, 1, 1, 2));
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, UINT64_MAX); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1);
               bb_stats(&w, 1, 0, 1));
    /* span wider than max_buckets (16): buckets 0 and 20 */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 16, 0); bb_var(&w, 0); bb_var(&w, 2); bb_var(&w, 0); bb_var(&w, 1);
               bb_var(&w, 19); bb_var(&w, 1); bb_stats(&w, 2, 1, 2));
    /* more entries than max_buckets */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2, 0); bb_var(&w, 0); bb_var(&w, 3); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0);
               bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1); bb_stats(&w, 3, 1, 1.1));
    /* entry count far beyond the buffer */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 2000));
    /* stats: min > max, non-finite, signs inconsistent with the stores */
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1);
               bb_stats(&w, 1, 2, 1));
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1);
               bb_stats(&w, 1, 1, INFINITY));
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 0); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1);
               bb_stats(&w, 1, -1, 1));
    EXPECT_BAD(bb_head(&w, 2, 0.01, 2048, 1); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0); bb_var(&w, 1);
               bb_stats(&w, 1, 1, 1));
    /* collapsed floor above a bucket */
    EXPECT_BAD(bb_head(&w, 3, 0.01, 2048, 0); bb_var(&w, 10); bb_var(&w, 0); bb_var(&w, 1); bb_var(&w, 0);
               bb_var(&w, 1); bb_stats(&w, 1, 1, 1));
    /* same with the floor at the bucket is fine */
    bb_head(&w, 3, 0.01, 2048, 0);
    bb_var(&w, 0);
    bb_var(&w, 0);
    bb_var(&w, 1);
    bb_var(&w, 0);
    bb_var(&w, 1);
    bb_stats(&w, 1, 1, 1);
    assert_non_null(d = bb_parse(&w));
    assert_true(dx_sketch_collapsed_limit(d) > 0.98 && dx_sketch_collapsed_limit(d) < 1.0);
    dx_sketch_free(d);
#undef EXPECT_BAD
}

/* Structure-aware random buffers: fields drawn from valid, boundary and
 * invalid values so that many get deep into validation, some all the way. */
static uint64_t pick_u(void) {
    static const uint64_t v[] = {0, 1, 2, 3, 15, 16, 17, 127, 128, 2047, 2048, 2049, 37500, 37600,
                                 UINT64_MAX / 2, UINT64_MAX - 1, UINT64_MAX};
    return rng_u64() % 4 ? rng_u64() % 8 : v[rng_u64() % (sizeof v / sizeof v[0])];
}
static double pick_d(void) {
    static const double v[] = {0.0, -0.0, 1.0, -1.0, 2.5, -7.0, 1e300, -1e300, INFINITY, -INFINITY, NAN, DBL_MIN};
    return v[rng_u64() % (sizeof v / sizeof v[0])];
}

static void test_deserialize_structured_fuzz(void **st) {
    rng_seed(33);
    size_t rounds = scaled(300000, 20000), ok = 0;
    struct bb w;
    for (size_t k = 0; k < rounds; k++) {
        static const double accs[] = {0.01, 0.02, 1e-6, 0.5, 0.999, 0.0, -0.01, 1.0, 1e-7};
        uint64_t mb = rng_u64() % 3 ? 16 : pick_u();
        double a = rng_u64() % 3 ? 0.01 : accs[rng_u64() % (sizeof accs / sizeof accs[0])];
        uint8_t flags = (uint8_t)(rng_u64() % 8 ? rng_u64() % 4 : rng_u64());
        bb_head(&w, flags, a, mb, rng_u64() % 2 ? 0 : pick_u());
        if (flags & 1)
            bb_var(&w, rng_u64() % 2 ? rng_u64() % 8 : pick_u());
        for (int sidx = 0; sidx < 2; sidx++) {
            uint64_t n = rng_u64() % 4;
            bb_var(&w, n);
            for (uint64_t j = 0; j < n && w.n < 200; j++) {
                bb_var(&w, rng_u64() % 3 ? rng_u64() % 6 : pick_u());
                bb_var(&w, rng_u64() % 3 ? 1 + rng_u64() % 5 : pick_u());
            }
        }
        if (w.n < 200 && rng_u64() % 4)
            for (int i = 0; i < 4; i++)
                bb_f64(&w, rng_u64() % 2 ? (double)(rng_u64() % 5) - 2.0 : pick_d());
        if (rng_u64() % 8 == 0 && w.n) /* truncate or extend */
            w.n = rng_u64() % 2 ? w.n - 1 - rng_u64() % w.n : w.n;
        if (rng_u64() % 8 == 0 && w.n < 250)
            bb_u8(&w, (uint8_t)rng_u64());
        dx_sketch *d = bb_parse(&w);
        ok += d != NULL;
        exercise(d);
    }
    print_message("    %zu structured random buffers, %zu parsed and behaved\n", rounds, ok);
    assert_true(ok > rounds / 200); /* the generator does reach the end */
    assert_true(ok < rounds / 2);
}

/* ---- memory bound --------------------------------------------------- */

static void test_bucket_cap_adversarial(void **st) {
    size_t n = scaled(200000, 10000);
    double *v = malloc(n * sizeof *v);
    dx_sketch *s = dx_sketch_new(0.01, 0);
    size_t base_mem = dx_sketch_memory(s);
    size_t bound = base_mem + DX_SKETCH_DEFAULT_BUCKETS * sizeof(uint64_t);
    rng_seed(41);
    size_t peak = 0;
    for (size_t i = 0; i < n; i++) { /* log-uniform 1e-300 .. 1e300 */
        v[i] = pow(10.0, -300.0 + 600.0 * rng_open01());
        assert_int_equal(dx_sketch_add(s, v[i]), 0);
        size_t m = dx_sketch_memory(s);
        if (m > peak)
            peak = m;
    }
    assert_true(peak <= bound);
    assert_int_equal(dx_sketch_count(s), n);
    double lim = dx_sketch_collapsed_limit(s);
    assert_true(lim > 1e200 && lim < 1e300); /* collapsed, and ~17 decades kept */
    double *x = sorted_copy(v, n);
    assert_true(dx_sketch_min(s) == x[0] && dx_sketch_max(s) == x[n - 1]);
    int checked;
    double worst = check_quantiles(s, x, n, 0.01, lim * 1.0000001, &checked);
    assert_true(checked >= 20); /* the top ~3% of ranks are above the limit */
    print_message("    1e-300..1e300: peak mem %zu B (bound %zu), limit %.3g, %d ranks above it, max err %.5f%%\n",
                  peak, bound, lim, checked, worst * 100);
    free(x);

    /* both signs, alternating extremes to force repeated re-windowing */
    dx_sketch *t = dx_sketch_new(0.01, 256);
    size_t tb = dx_sketch_memory(t) + 256 * sizeof(uint64_t);
    rng_seed(42);
    for (size_t i = 0; i < n; i++) {
        double e = (i & 1) ? 300.0 * rng_open01() : -300.0 * rng_open01();
        v[i] = ((i >> 1) & 1 ? -1.0 : 1.0) * pow(10.0, e);
        assert_int_equal(dx_sketch_add(t, v[i]), 0);
        assert_true(dx_sketch_memory(t) <= tb);
    }
    x = sorted_copy(v, n);
    assert_int_equal(dx_sketch_count(t), n);
    assert_true(dx_sketch_min(t) == x[0] && dx_sketch_max(t) == x[n - 1]);
    lim = dx_sketch_collapsed_limit(t);
    check_quantiles(t, x, n, 0.01, lim * 1.0000001, &checked);
    assert_true(checked > 0);
    /* merging two collapsed sketches stays bounded and exact in count */
    assert_int_equal(dx_sketch_merge(t, s), 0);
    assert_true(dx_sketch_memory(t) <= tb);
    assert_int_equal(dx_sketch_count(t), 2 * n);
    assert_true(dx_sketch_collapsed_limit(t) >= dx_sketch_collapsed_limit(s));
    roundtrip(t);
    free(x);

    /* the smallest cap (one bucket per sign) still counts exactly */
    dx_sketch *u = dx_sketch_new(0.01, 2);
    for (int i = 1; i <= 100; i++) {
        assert_int_equal(dx_sketch_add(u, i % 2 ? (double)i : -(double)i), 0);
        assert_true(dx_sketch_memory(u) <= base_mem + 2 * sizeof(uint64_t));
    }
    dx_sketch_add(u, 0.0);
    assert_int_equal(dx_sketch_count(u), 101);
    assert_true(dx_sketch_quantile(u, 1.0) == 99.0 && dx_sketch_quantile(u, 0.0) == -100.0);
    assert_true(fabs(dx_sketch_quantile(u, 0.99) - 99.0) <= 0.99); /* top bucket */
    roundtrip(u);
    dx_sketch_free(u);
    free(v);
    dx_sketch_free(s);
    dx_sketch_free(t);
}

/* ---- allocation failure --------------------------------------------- */

static void test_alloc_failure_changes_nothing(void **st) {
    dx_sketch_test_fail_alloc(0);
    assert_null(dx_sketch_new(0.01, 0));
    dx_sketch_test_fail_alloc(-1);
    dx_sketch *s = dx_sketch_new(0.01, 0);
    for (int i = 1; i <= 100; i++)
        dx_sketch_add(s, i);
    /* a far value needs a bigger window: the first attempt fails cleanly */
    uint8_t *before, *after;
    size_t nb = ser(s, &before);
    dx_sketch_test_fail_alloc(0);
    assert_int_equal(dx_sketch_add(s, 1e30), -1);
    dx_sketch_test_fail_alloc(-1);
    size_t na = ser(s, &after);
    assert_true(na == nb && memcmp(before, after, nb) == 0);
    free(after);
    assert_int_equal(dx_sketch_add(s, 1e30), 0);
    /* merge */
    dx_sketch *o = dx_sketch_new(0.01, 0);
    dx_sketch_add(o, -1e-30);
    dx_sketch_add(o, 1e-30);
    free(before);
    nb = ser(s, &before);
    dx_sketch_test_fail_alloc(0);
    assert_int_equal(dx_sketch_merge(s, o), -1);
    dx_sketch_test_fail_alloc(1); /* the second of two windows fails */
    assert_int_equal(dx_sketch_merge(s, o), -1);
    dx_sketch_test_fail_alloc(-1);
    na = ser(s, &after);
    assert_true(na == nb && memcmp(before, after, nb) == 0);
    free(after);
    assert_int_equal(dx_sketch_merge(s, o), 0);
    /* deserialize: each allocation point fails without a leak */
    free(before);
    nb = ser(s, &before);
    for (long k = 0; k < 3; k++) {
        dx_sketch_test_fail_alloc(k);
        assert_null(dx_sketch_deserialize(before, nb));
    }
    dx_sketch_test_fail_alloc(-1);
    dx_sketch *d = dx_sketch_deserialize(before, nb);
    assert_non_null(d);
    dx_sketch_free(d);
    free(before);
    dx_sketch_free(o);
    dx_sketch_free(s);
}

/* ---- series ----------------------------------------------------------- */

#define T0 1699999200LL /* hour-aligned (472222 * 3600) */

static int64_t fdiv_t(int64_t a, int64_t b) { return a / b - (a % b != 0 && a < 0); }

/* Records per second: counts[t - base] values at second t. */
struct rec {
    int64_t base, n;
    uint64_t *cnt;
};

static uint64_t rec_sum(const struct rec *r, int64_t a, int64_t b) {
    uint64_t s = 0;
    for (int64_t t = a; t <= b; t++)
        if (t >= r->base && t < r->base + r->n)
            s += r->cnt[t - r->base];
    return s;
}

/* Brute-force reference of the documented rule, per second rather than by
 * interval arithmetic. H = retention hours, L = max(latest, now). */
static uint64_t ref_query(const struct rec *r, int64_t from, int64_t to, int64_t L, int64_t H) {
    int64_t lo = r->base - 7200, hi = r->base + r->n + 7200; /* data lives inside */
    int64_t f = from > lo ? from : lo, t = to < hi ? to : hi;
    if (t > L)
        t = L;
    if (f > t)
        return 0;
    int64_t h0 = fdiv_t(lo, 3600), m0 = fdiv_t(lo, 60);
    size_t nh = (size_t)(fdiv_t(hi, 3600) - h0 + 1), nm = (size_t)(fdiv_t(hi, 60) - m0 + 1), ns = (size_t)(hi - lo + 1);
    char *hu = calloc(nh, 1), *mu = calloc(nm, 1), *su = calloc(ns, 1);
    enum { NONE, HOUR, MIN, SEC };
#define LEVEL(x)                                                                                                   \
    ((x) >= L - 59 ? SEC : fdiv_t(x, 60) >= fdiv_t(L, 60) - 60 ? MIN : fdiv_t(x, 3600) >= fdiv_t(L, 3600) - H ? HOUR \
                                                                                                             : NONE)
    for (int64_t x = f; x <= t; x++)
        if (LEVEL(x) == HOUR)
            hu[fdiv_t(x, 3600) - h0] = 1;
    for (int64_t x = f; x <= t; x++)
        if (LEVEL(x) == MIN && !hu[fdiv_t(x, 3600) - h0])
            mu[fdiv_t(x, 60) - m0] = 1;
    for (int64_t x = f; x <= t; x++)
        if (LEVEL(x) == SEC && !hu[fdiv_t(x, 3600) - h0] && !mu[fdiv_t(x, 60) - m0])
            su[x - lo] = 1;
#undef LEVEL
    uint64_t s = 0;
    for (int64_t x = r->base; x < r->base + r->n; x++)
        if (hu[fdiv_t(x, 3600) - h0] || mu[fdiv_t(x, 60) - m0] || su[x - lo])
            s += r->cnt[x - r->base];
    free(hu);
    free(mu);
    free(su);
    return s;
}

static uint64_t qcount(dx_series *s, int64_t from, int64_t to, int64_t now) {
    dx_sketch *o = dx_sketch_new(0.01, 0);
    assert_int_equal(dx_series_query(s, from, to, now, o), 0);
    uint64_t c = dx_sketch_count(o);
    dx_sketch_free(o);
    return c;
}

static double value_at(int64_t t, uint64_t j) { return 0.001 * (double)(1 + (t * 7919 + (int64_t)j * 104729) % 5000); }

/* Records 3 h + 1234 s starting at an unaligned second, 1..3 values/s. */
static dx_series *record_three_hours(struct rec *r, int64_t start, int64_t len) {
    dx_series *s = dx_series_new(0.01, 0);
    assert_non_null(s);
    r->base = start;
    r->n = len;
    r->cnt = calloc((size_t)len, sizeof *r->cnt);
    for (int64_t t = start; t < start + len; t++) {
        uint64_t k = 1 + (uint64_t)((t * 31) % 3);
        for (uint64_t j = 0; j < k; j++)
            assert_int_equal(dx_series_record(s, t, value_at(t, j)), 0);
        r->cnt[t - start] = k;
    }
    return s;
}

static void test_series_windows(void **st) {
    struct rec r;
    const int64_t start = T0 + 1234, len = 3 * 3600 + 1234;
    dx_series *s = record_three_hours(&r, start, len);
    const int64_t now = start + len - 1; /* now % 60 != 59: unaligned */
    assert_true(now % 60 != 59);

    /* last minute: answered by single seconds, exact */
    assert_int_equal(qcount(s, now - 59, now, now), rec_sum(&r, now - 59, now));
    /* values of the last minute: quantiles within 1% of the exact ones */
    {
        double vals[200];
        size_t n = 0;
        for (int64_t t = now - 59; t <= now; t++)
            for (uint64_t j = 0; j < r.cnt[t - start]; j++)
                vals[n++] = value_at(t, j);
        qsort(vals, n, sizeof vals[0], cmp_double);
        dx_sketch *o = dx_sketch_new(0.01, 0);
        assert_int_equal(dx_series_query(s, now - 59, now, now, o), 0);
        check_quantiles(o, vals, n, 0.01, -1.0, NULL);
        dx_sketch_free(o);
    }
    /* last hour: [now-3599, now] starts inside minute Lm-60, which only the
     * minute ring has -> counted whole, i.e. from that minute's start */
    int64_t m_first = fdiv_t(now - 3599, 60) * 60;
    assert_int_equal(qcount(s, now - 3599, now, now), rec_sum(&r, m_first, now));
    assert_true(rec_sum(&r, m_first, now) > rec_sum(&r, now - 3599, now)); /* the rule matters here */
    /* ... and a minute-aligned last hour is exact */
    int64_t al = fdiv_t(now, 60) * 60 - 1; /* ends at second 59 */
    assert_int_equal(qcount(s, al - 3599, al, now), rec_sum(&r, al - 3599, al));
    /* 90 s: the minute with now-89 (and the one holding now-59) are whole */
    assert_int_equal(qcount(s, now - 89, now, now), rec_sum(&r, fdiv_t(now - 89, 60) * 60, now));
    /* a range inside the minute ring but before the seconds ring */
    int64_t a = now - 600, b = now - 300;
    assert_int_equal(qcount(s, a, b, now), rec_sum(&r, fdiv_t(a, 60) * 60, fdiv_t(b, 60) * 60 + 59));
    /* spanning hours + minutes + seconds: starts in an hour only the hour ring
     * has; every second from that hour's start to now counted exactly once */
    int64_t from = now - 9000;
    assert_int_equal(qcount(s, from, now, now), rec_sum(&r, fdiv_t(from, 3600) * 3600, now));
    assert_true(fdiv_t(from, 3600) * 3600 > start); /* so the widening is visible */
    assert_int_equal(qcount(s, now - 12000, now, now), rec_sum(&r, start, now)); /* hour 0 holds start */
    /* an old range inside the hour ring: both ends widen to whole hours */
    a = now - 7000;
    b = now - 5000;
    assert_int_equal(qcount(s, a, b, now), rec_sum(&r, fdiv_t(a, 3600) * 3600, fdiv_t(b, 3600) * 3600 + 3599));
    /* a single second inside the seconds ring */
    assert_int_equal(qcount(s, now - 5, now - 5, now), r.cnt[now - 5 - start]);
    /* ranges into the future / before any data */
    assert_int_equal(qcount(s, now + 1, now + 1000, now), 0);
    assert_int_equal(qcount(s, start - 5000, T0 - 1, now), 0);
    /* ... but one ending just before the first record still takes hour 0 whole */
    assert_int_equal(qcount(s, start - 5000, start - 1, now), rec_sum(&r, T0, T0 + 3599));
    assert_int_equal(qcount(s, INT64_MIN, INT64_MAX, now), rec_sum(&r, start, now));

    /* randomized ranges against the brute-force reference */
    rng_seed(51);
    int rounds = reduced() ? 40 : 300;
    for (int i = 0; i < rounds; i++) {
        int64_t x = start - 600 + (int64_t)(rng_u64() % (uint64_t)(len + 1200));
        int64_t y = x + (int64_t)(rng_u64() % (i & 1 ? 200 : 12000));
        assert_int_equal(qcount(s, x, y, now), ref_query(&r, x, y, now, 24));
    }
    /* later "now" at query time: the seconds and minutes have moved on */
    int64_t later = now + 7200;
    assert_int_equal(qcount(s, now - 59, now, later), rec_sum(&r, fdiv_t(now - 59, 3600) * 3600, now));
    assert_int_equal(qcount(s, now - 59, now, later), ref_query(&r, now - 59, now, later, 24));
    assert_int_equal(qcount(s, later - 59, later, later), 0);
    /* the query did not move the series: the last minute is still there */
    assert_int_equal(qcount(s, now - 59, now, now), rec_sum(&r, now - 59, now));

    size_t mem = dx_series_memory(s);
    print_message("    series after 3 h of data: %zu bytes (%zu sketches max)\n", mem, (size_t)(60 + 61 + 25));
    assert_true(mem <= (60 + 61 + 25) * (dx_sketch_memory(NULL) + 256 + 2048 * 8) + 4096);
    free(r.cnt);
    dx_series_free(s);
}

static void test_series_retention(void **st) {
    dx_series *s = dx_series_new(0.01, 2);
    assert_non_null(s);
    /* one value per second for 5 hours starting at an hour boundary */
    const int64_t len = 5 * 3600;
    struct rec r = {T0, len, calloc((size_t)len, sizeof(uint64_t))};
    for (int64_t t = T0; t < T0 + len; t++) {
        assert_int_equal(dx_series_record(s, t, 1.0 + (double)(t % 100)), 0);
        r.cnt[t - T0] = 1;
    }
    const int64_t now = T0 + len - 1;
    /* retained hours: [Lh-2, Lh] = hours 2..4; hours 0 and 1 are gone */
    assert_int_equal(qcount(s, T0, T0 + 2 * 3600 - 1, now), 0);
    assert_int_equal(qcount(s, T0, now, now), 3 * 3600);
    assert_int_equal(qcount(s, T0 + 2 * 3600, now, now), 3 * 3600);
    assert_int_equal(qcount(s, T0 + 2 * 3600 + 100, T0 + 2 * 3600 + 200, now), 3600); /* whole hour 2 */
    /* a value for a dropped hour is refused and changes nothing */
    assert_int_equal(dx_series_record(s, T0 + 3600 + 5, 1.0), -1);
    assert_int_equal(qcount(s, T0, now, now), 3 * 3600);
    /* a late value for a retained hour lands in the hour ring only */
    assert_int_equal(dx_series_record(s, T0 + 2 * 3600 + 7, 1.0), 0);
    assert_int_equal(qcount(s, T0 + 2 * 3600, T0 + 2 * 3600, now), 3601);
    /* a late value inside the seconds ring shows in the last minute */
    assert_int_equal(dx_series_record(s, now - 30, 2.0), 0);
    assert_int_equal(qcount(s, now - 59, now, now), 61);
    /* and one inside the minute ring (whole minute counted) */
    assert_int_equal(dx_series_record(s, now - 1800, 2.0), 0);
    assert_int_equal(qcount(s, now - 1800, now - 1800, now), 61);
    r.cnt[now - 30 - T0]++; /* cross-check against the reference */
    r.cnt[now - 1800 - T0]++;
    r.cnt[2 * 3600 + 7]++;
    for (int i = 0; i < 50; i++) {
        rng_seed(61 + (uint64_t)i);
        int64_t x = T0 + (int64_t)(rng_u64() % (uint64_t)len), y = x + (int64_t)(rng_u64() % 8000);
        assert_int_equal(qcount(s, x, y, now), ref_query(&r, x, y, now, 2));
    }
    /* a long gap: everything before expires as L jumps */
    int64_t far = now + 10 * 3600;
    assert_int_equal(dx_series_record(s, far, 5.0), 0);
    assert_int_equal(qcount(s, T0, far, far), 1);
    assert_int_equal(dx_series_record(s, now, 5.0), -1); /* now older than retention */
    /* memory stays bounded: only 60 + 61 + 3 slots exist */
    size_t mem = dx_series_memory(s);
    assert_true(mem <= (60 + 61 + 3) * (dx_sketch_memory(NULL) + 256 + 2048 * 8) + 4096);
    free(r.cnt);
    dx_series_free(s);
}

static void test_series_invalid(void **st) {
    assert_null(dx_series_new(-1.0, 0));
    assert_null(dx_series_new(0.01, DX_SERIES_MAX_RETENTION_H + 1));
    dx_series *s = dx_series_new(0, 0);
    assert_non_null(s);
    dx_sketch *o = dx_sketch_new(0.01, 0), *o2 = dx_sketch_new(0.02, 0);
    assert_int_equal(dx_series_query(s, 0, 10, 10, o), 0); /* nothing recorded */
    assert_int_equal(dx_series_record(s, 100, NAN), -1);
    assert_int_equal(dx_series_record(s, 100, INFINITY), -1);
    assert_int_equal(dx_series_record(s, INT64_MAX, 1.0), -1);
    assert_int_equal(dx_series_record(s, INT64_MIN, 1.0), -1);
    assert_int_equal(dx_series_query(s, 0, 10, 10, o), 0);
    assert_int_equal(dx_sketch_count(o), 0);
    /* negative times use floor division */
    assert_int_equal(dx_series_record(s, -61, 1.0), 0);
    assert_int_equal(dx_series_record(s, -1, 2.0), 0);
    assert_int_equal(dx_series_record(s, 0, 3.0), 0);
    assert_int_equal(qcount(s, -60, 0, 0), 2);
    assert_int_equal(qcount(s, -61, -61, 0), 1); /* minute -2 ([-120,-61]) from the minute ring */
    assert_int_equal(qcount(s, -60, -60, 0), 1); /* minute -1 whole: holds -1 */
    assert_int_equal(dx_series_query(s, 5, 4, 10, o), -1); /* from > to */
    assert_int_equal(dx_series_query(s, 0, 10, INT64_MAX, o), -1);
    dx_sketch_add(o2, 1.0);
    assert_int_equal(dx_series_query(s, -100, 10, 10, o2), -1); /* accuracy mismatch */
    assert_int_equal(dx_sketch_count(o2), 1);
    assert_int_equal(dx_series_query(NULL, 0, 1, 1, o), -1);
    assert_int_equal(dx_series_record(NULL, 0, 1.0), -1);
    dx_series_free(NULL);
    assert_int_equal(dx_series_memory(NULL), 0);
    /* query failure under OOM leaves out unchanged; record failure records
     * nowhere */
    dx_sketch_add(o, 9.0);
    dx_sketch_test_fail_alloc(0);
    assert_int_equal(dx_series_query(s, -100, 10, 10, o), -1);
    dx_sketch_test_fail_alloc(-1);
    assert_int_equal(dx_sketch_count(o), 1);
    for (long k = 0; k < 6; k++) {
        dx_sketch_test_fail_alloc(k);
        int rc = dx_series_record(s, 1, 1e-200); /* new slots + far windows */
        dx_sketch_test_fail_alloc(-1);
        uint64_t c = qcount(s, 1, 1, 1);
        if (rc == 0) {
            assert_int_equal(c, 1);
            break;
        }
        assert_int_equal(c, 0);
        assert_int_equal(qcount(s, -3600, 3600, 1), 3);
    }
    assert_int_equal(qcount(s, -3600, 3600, 1), 4);
    dx_sketch_free(o);
    dx_sketch_free(o2);
    dx_series_free(s);
}

/* The bucket budget is reported and survives serialisation (the NIF refuses
 * foreign sketches with a larger budget by reading it). */
/* A sum that overflows a double is kept scaled, not lost: it comes back by
 * cancellation, the mean stays finite, and serialisation and merge keep it. */
static void test_sum_survives_overflow(void **st) {
    dx_sketch *s = dx_sketch_new(0, 0);
    assert_non_null(s);
    assert_int_equal(dx_sketch_add(s, 1e308), 0);
    assert_int_equal(dx_sketch_add(s, 1e308), 0);
    assert_true(isinf(dx_sketch_sum(s)) && dx_sketch_sum(s) > 0); /* 2e308: beyond a double */
    assert_true(dx_sketch_mean(s) == 1e308);
    assert_int_equal(dx_sketch_add(s, -1e308), 0);
    assert_true(dx_sketch_sum(s) == 1e308); /* representable again */
    assert_true(fabs(dx_sketch_mean(s) - 1e308 / 3) <= 1e-15 * 1e308);
    /* the scaled sum crosses the wire */
    size_t n = dx_sketch_serialize(s, NULL, 0);
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    dx_sketch_serialize(s, buf, n);
    assert_true(buf[4] & 4);
    dx_sketch *d = dx_sketch_deserialize(buf, n);
    assert_non_null(d);
    assert_true(dx_sketch_sum(d) == 1e308);
    /* merging an unscaled sketch into a scaled one and vice versa */
    dx_sketch *u = dx_sketch_new(0, 0);
    assert_non_null(u);
    assert_int_equal(dx_sketch_add(u, -1e308), 0);
    assert_int_equal(dx_sketch_merge(u, d), 0);
    assert_true(dx_sketch_sum(u) == 0.0 && dx_sketch_mean(u) == 0.0);
    assert_int_equal(dx_sketch_merge(d, d), 0); /* doubling: 2e308 */
    assert_true(isinf(dx_sketch_sum(d)));
    assert_int_equal(dx_sketch_add_n(d, -1e308, 2), 0); /* n copies: 0 */
    assert_true(dx_sketch_sum(d) == 0.0);
    /* the sum is always finite on the wire: an infinite one is malformed */
    buf[n - 32] = 0, buf[n - 31] = 0, buf[n - 30] = 0, buf[n - 29] = 0;
    buf[n - 28] = 0, buf[n - 27] = 0, buf[n - 26] = 0xf0, buf[n - 25] = 0x7f; /* +inf */
    assert_null(dx_sketch_deserialize(buf, n));
    free(buf);
    dx_sketch_free(u);
    dx_sketch_free(d);
    dx_sketch_free(s);
    /* the accumulator alone: n copies that overflow only as a product */
    dx_sum a = {0};
    dx_sum_add_n(&a, 1e300, 1000000);
    dx_sum_add(&a, 5.0);
    dx_sum_add_n(&a, -1e300, 1000000);
    assert_true(dx_sum_value(&a) == 5.0);
    assert_true(dx_sum_mean(&a, 2000001) == 5.0 / 2000001);
}

/* A scaled sum read from the wire is only checked to be finite: one near the
 * largest double (a crafted sketch; a real one would need some 2^64 samples
 * near it) overflowed the scaled sum of a merge to infinity, and the merge's
 * serialised form, whose sum must be finite, was then refused by
 * deserialize (dspex_metrics:merge/2 answered a binary summary/1 called
 * invalid). The scaled sum now saturates at the largest double: the merge
 * still reads as beyond every double, and its serialised form reads back. */
static void test_scaled_sum_from_the_wire_never_overflows(void **st) {
    (void)st;
    dx_sketch *one = dx_sketch_new(0, 0);
    assert_non_null(one);
    assert_int_equal(dx_sketch_add(one, 1.0), 0);
    size_t n = dx_sketch_serialize(one, NULL, 0);
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    dx_sketch_serialize(one, buf, n);
    buf[4] |= 4; /* FL_SCALED */
    const uint8_t dbl_max[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xef, 0x7f}; /* little-endian */
    memcpy(buf + n - 32, dbl_max, 8);                                           /* the sum's hi */
    dx_sketch *w = dx_sketch_deserialize(buf, n);
    assert_non_null(w);
    dx_sketch *m = dx_sketch_new(0, 0);
    assert_non_null(m);
    assert_int_equal(dx_sketch_merge(m, w), 0);
    assert_int_equal(dx_sketch_merge(m, w), 0);
    assert_true(isinf(dx_sketch_sum(m)) && dx_sketch_sum(m) > 0);
    assert_true(dx_sketch_mean(m) == 1.0); /* clamped to [min, max] */
    for (int k = 0; k < 2; k++) {
        if (k) assert_int_equal(dx_sketch_merge(m, m), 0); /* doubling in place */
        size_t mn = dx_sketch_serialize(m, NULL, 0);
        uint8_t *mb = malloc(mn);
        assert_non_null(mb);
        dx_sketch_serialize(m, mb, mn);
        dx_sketch *back = dx_sketch_deserialize(mb, mn);
        assert_non_null(back);
        assert_true(isinf(dx_sketch_sum(back)) && dx_sketch_sum(back) > 0);
        dx_sketch_free(back);
        free(mb);
    }
    /* the accumulator alone, below: saturated, finite, either sign */
    dx_sum a = {0x1p1023, 0.0, 1}, b = a;
    dx_sum_merge(&a, &b);
    assert_true(isfinite(a.hi) && isfinite(a.lo) && isinf(dx_sum_value(&a)));
    dx_sum c = {-0x1p1023, 0.0, 1};
    dx_sum_add_n(&c, -0x1p1023, 1u << 20);
    assert_true(isfinite(c.hi) && isinf(dx_sum_value(&c)) && dx_sum_value(&c) < 0);
    dx_sketch_free(m);
    dx_sketch_free(w);
    dx_sketch_free(one);
    free(buf);
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The documented collapse rule (README, sketch.h): 2048 buckets at 1% cover
 * ~17.7 decades of |v| in all, summed over both signs; beyond that the
 * smallest magnitudes of both signs fold into one bucket per sign, at
 * magnitude L = dx_sketch_collapsed_limit. A quantile whose true sample has
 * |x| > L keeps the 1% bound; one with |x| <= L reads a value of its sign
 * with |estimate| <= L * gamma (the folded bucket's upper end). */
static void test_collapse_rule(void **st) {
    const int n = 5000;
    double *v = malloc(n * sizeof *v);
    assert_non_null(v);
    rng_seed(77);
    /* within the budget: one sign over 17.5 decades, or two over 8.8 each */
    for (int k = 0; k < 2; k++) {
        dx_sketch *s = dx_sketch_new(0, 0);
        assert_non_null(s);
        for (int i = 0; i < n; i++) {
            double m = pow(10, k ? rng_open01() * 8.8 - 4 : rng_open01() * 17.5 - 8);
            assert_int_equal(dx_sketch_add(s, k && (rng_u64() & 1) ? -m : m), 0);
        }
        assert_true(dx_sketch_collapsed_limit(s) == 0.0);
        dx_sketch_free(s);
    }
    /* +-10^U(-8, 8): 2 x 16 decades, the lowest collapse */
    dx_sketch *s = dx_sketch_new(0, 0);
    assert_non_null(s);
    for (int i = 0; i < n; i++) {
        double m = pow(10, rng_open01() * 16 - 8);
        v[i] = rng_u64() & 1 ? -m : m;
        assert_int_equal(dx_sketch_add(s, v[i]), 0);
    }
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    double L = dx_sketch_collapsed_limit(s), g = 1.01 / 0.99;
    assert_true(L > 0.05 && L < 0.5);
    int inside = 0;
    for (int i = 1; i < 100; i++) {
        double q = i / 100.0, x = v[(int)floor(q * (n - 1))], e = dx_sketch_quantile(s, q);
        if (fabs(x) > L) {
            assert_true(fabs(e - x) <= 0.01 * fabs(x));
        } else {
            inside++;
            assert_true((e < 0) == (x < 0) && fabs(e) <= L * g);
        }
    }
    assert_true(inside > 10); /* the median region is in the folded buckets */
    dx_sketch_free(s);
    free(v);
}

static void test_max_buckets_reported(void **st) {
    dx_sketch *s = dx_sketch_new(0.01, 0);
    assert_int_equal(dx_sketch_max_buckets(s), DX_SKETCH_DEFAULT_BUCKETS);
    dx_sketch *big = dx_sketch_new(0.01, 4096);
    assert_int_equal(dx_sketch_max_buckets(big), 4096);
    dx_sketch_add(big, 3.0);
    uint8_t buf[256];
    size_t n = dx_sketch_serialize(big, buf, sizeof buf);
    assert_true(n <= sizeof buf);
    dx_sketch *back = dx_sketch_deserialize(buf, n);
    assert_non_null(back);
    assert_int_equal(dx_sketch_max_buckets(back), 4096);
    assert_int_equal(dx_sketch_max_buckets(NULL), 0);
    dx_sketch_free(back);
    dx_sketch_free(big);
    dx_sketch_free(s);
}

/* add_keyed with the cached key is the same as add, bucket for bucket. */
static void test_add_keyed_matches_add(void **state) {
    (void)state;
    dx_sketch *a = dx_sketch_new(0.01, 0), *b = dx_sketch_new(0.01, 0);
    assert_non_null(a);
    assert_non_null(b);
    for (int i = 1; i <= 20000; i++) {
        double v = (double)i * 0.37e-3 * (1 + (i % 7)); /* like ticks * us-per-tick */
        assert_int_equal(dx_sketch_add(a, v), 0);
        assert_int_equal(dx_sketch_add_keyed(b, v, dx_sketch_key(b, v)), 0);
    }
    assert_int_equal(dx_sketch_count(a), dx_sketch_count(b));
    assert_true(dx_sketch_sum(a) == dx_sketch_sum(b));
    for (double q = 0.0; q <= 1.0; q += 0.01) assert_true(dx_sketch_quantile(a, q) == dx_sketch_quantile(b, q));
    assert_int_equal(dx_sketch_add_keyed(b, 0.0, 0), -1);
    assert_int_equal(dx_sketch_add_keyed(b, -1.0, 0), -1);
    assert_int_equal(dx_sketch_add_keyed(b, NAN, 0), -1);
    dx_sketch_free(a);
    dx_sketch_free(b);
}

/* A merged batch reads back exactly like the same samples recorded one by
 * one, in every window; a batch no window keeps is refused. */
static void test_series_merge_equals_records(void **state) {
    (void)state;
    const int64_t t0 = 1700000000;
    dx_series *one = dx_series_new(0.01, 24), *bat = dx_series_new(0.01, 24);
    assert_non_null(one);
    assert_non_null(bat);
    for (int sec = 0; sec < 200; sec += 7) {
        dx_sketch *b = dx_sketch_new(0.01, 0);
        assert_non_null(b);
        for (int i = 1; i <= 50; i++) {
            double v = 0.05 * i + sec;
            assert_int_equal(dx_series_record(one, t0 + sec, v), 0);
            assert_int_equal(dx_sketch_add(b, v), 0);
        }
        assert_int_equal(dx_series_merge(bat, t0 + sec, b), 0);
        dx_sketch_free(b);
    }
    int64_t now = t0 + 200;
    int64_t ranges[][2] = {{t0, now}, {now - 59, now}, {t0 + 3, t0 + 150}, {now - 3600, now}};
    for (size_t r = 0; r < sizeof ranges / sizeof *ranges; r++) {
        dx_sketch *qa = dx_sketch_new(0.01, 0), *qb = dx_sketch_new(0.01, 0);
        assert_int_equal(dx_series_query(one, ranges[r][0], ranges[r][1], now, qa), 0);
        assert_int_equal(dx_series_query(bat, ranges[r][0], ranges[r][1], now, qb), 0);
        assert_int_equal(dx_sketch_count(qa), dx_sketch_count(qb));
        assert_true(fabs(dx_sketch_sum(qa) - dx_sketch_sum(qb)) < 1e-9 * (1 + fabs(dx_sketch_sum(qa))));
        for (double q = 0.0; q <= 1.0; q += 0.05) assert_true(dx_sketch_quantile(qa, q) == dx_sketch_quantile(qb, q));
        dx_sketch_free(qa);
        dx_sketch_free(qb);
    }
    dx_sketch *b = dx_sketch_new(0.01, 0), *other = dx_sketch_new(0.02, 0);
    assert_int_equal(dx_sketch_add(b, 1.0), 0);
    assert_int_equal(dx_sketch_add(other, 1.0), 0);
    assert_int_equal(dx_series_merge(bat, now - 30 * 24 * 3600, b), -1); /* older than every window */
    assert_int_equal(dx_series_merge(bat, now, other), -1);              /* another accuracy */
    dx_sketch_free(b);
    dx_sketch_free(other);
    dx_series_free(one);
    dx_series_free(bat);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sum_survives_overflow),
        cmocka_unit_test(test_scaled_sum_from_the_wire_never_overflows),
        cmocka_unit_test(test_collapse_rule),
        cmocka_unit_test(test_max_buckets_reported),
        cmocka_unit_test(test_accuracy_uniform),
        cmocka_unit_test(test_accuracy_exponential),
        cmocka_unit_test(test_accuracy_skewed),
        cmocka_unit_test(test_accuracy_negatives_zeros),
        cmocka_unit_test(test_checker_detects_coarse_sketch),
        cmocka_unit_test(test_small_exact_cases),
        cmocka_unit_test(test_invalid_input),
        cmocka_unit_test(test_merge_halves),
        cmocka_unit_test(test_serialize_roundtrip),
        cmocka_unit_test(test_deserialize_garbage),
        cmocka_unit_test(test_deserialize_rules),
        cmocka_unit_test(test_deserialize_structured_fuzz),
        cmocka_unit_test(test_bucket_cap_adversarial),
        cmocka_unit_test(test_alloc_failure_changes_nothing),
        cmocka_unit_test(test_series_windows),
        cmocka_unit_test(test_series_retention),
        cmocka_unit_test(test_series_invalid),
        cmocka_unit_test(test_add_keyed_matches_add),
        cmocka_unit_test(test_series_merge_equals_records),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
