/* cmocka tests of the optimizer kernels (c_src/core/opt*.c): every algorithm
 * converges on functions with known optima within a fixed budget and seed
 * (deterministic: the asserts are on regret, never on time), keeps every
 * candidate inside the space, gives the same asks for the same seed and told
 * scores, works with several asks outstanding, and refuses invalid input. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <malloc.h>
#include <math.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "opt.h"
#include "opt_testfn.h"

typedef double (*objective)(const double *u, uint64_t trial);

typedef struct {
    double best;
    double *asks; /* every candidate, for determinism checks (budget x d) */
} run_result;

static int in_space(const dx_opt_space *sp, const double *p) {
    for (int j = 0; j < sp->d; j++) {
        int k = sp->dims[j].ncat;
        if (isnan(p[j]) || p[j] < 0) return 0;
        if (!k && p[j] > 1.0) return 0;
        if (k && (p[j] != floor(p[j]) || p[j] > k - 1)) return 0;
    }
    return 1;
}

/* When set, BO asks chain their fitted hyperparameters (dx_opt_conf.warm). */
static int warm_chain = 0;
/* When set, CMA-ES asks chain their states (dx_opt_conf.cma_in / cma_out). */
static int cma_chain = 0;

/* Drives a run: batches of `batch' asks outstanding, told in reverse order. */
static run_result drive(dx_opt_alg alg, const dx_opt_space *sp, objective f, size_t budget, uint64_t seed,
                        size_t batch) {
    double th[DX_OPT_MAX_DIMS + 2], th_out[DX_OPT_MAX_DIMS + 2];
    int have = 0;
    int d = sp->d;
    double *x = calloc(budget * d, sizeof *x), *y = calloc(budget, sizeof *y);
    uint64_t *tid = calloc(budget, sizeof *tid);
    run_result rr = {INFINITY, calloc(budget * d, sizeof(double))};
    dx_opt_conf conf = {.budget = budget};
    size_t cl = dx_opt_cma_state_len(d);
    double *cma[2] = {calloc(cl, sizeof(double)), calloc(cl, sizeof(double))};
    int cur = 0, have_cma = 0;
    size_t told = 0;
    for (size_t t = 0; t < budget; t += batch) {
        size_t nb = t + batch > budget ? budget - t : batch;
        for (size_t b = 0; b < nb; b++) {
            dx_opt_hist h = {told, x, y, tid, b, rr.asks + t * d};
            if (warm_chain) {
                conf.warm = have ? th : NULL;
                conf.fitted = th_out;
            }
            if (cma_chain) {
                conf.cma_in = have_cma ? cma[cur] : NULL;
                conf.cma_in_len = cl;
                conf.cma_out = cma[1 - cur];
            }
            assert_int_equal(dx_opt_ask(alg, sp, &h, seed, t + b, &conf, rr.asks + (t + b) * d), DX_OPT_OK);
            if (cma_chain) {
                cur = 1 - cur;
                have_cma = 1;
            }
            if (warm_chain && alg == DX_OPT_BO && !isnan(th_out[0])) {
                memcpy(th, th_out, sizeof th);
                have = 1;
            }
            assert_true(in_space(sp, rr.asks + (t + b) * d));
        }
        for (size_t b = nb; b-- > 0;) {
            memcpy(x + told * d, rr.asks + (t + b) * d, d * sizeof *x);
            y[told] = f(rr.asks + (t + b) * d, t + b);
            tid[told] = t + b;
            if (y[told] < rr.best) rr.best = y[told];
            told++;
        }
    }
    free(x);
    free(y);
    free(tid);
    free(cma[0]);
    free(cma[1]);
    return rr;
}

/* ---- test functions (u in the unit cube) --------------------------------- */
static const double shift[5] = {1.3, -2.1, 0.7, 3.2, -0.4};
static double sphere5(const double *u, uint64_t t) { /* [-5, 5]^5, min 0 */
    double s = 0;
    for (int i = 0; i < 5; i++) {
        double v = u[i] * 10 - 5 - shift[i];
        s += v * v;
    }
    return s;
}

#define BRANIN_MIN 0.397887357729739
static double branin(const double *u, uint64_t t) {
    double x1 = -5 + 15 * u[0], x2 = 15 * u[1];
    double a = x2 - 5.1 / (4 * M_PI * M_PI) * x1 * x1 + 5 / M_PI * x1 - 6;
    return a * a + 10 * (1 - 1 / (8 * M_PI)) * cos(x1) + 10;
}

/* categorical (4) x categorical (3) x 2 continuous; min 0 at (1, 2, 0.3, 0.7) */
static double mixed(const double *u, uint64_t t) {
    static const double c1[4] = {2.0, 0.0, 1.0, 3.0}, c2[3] = {1.0, 0.5, 0.0};
    double a = u[2] - 0.3, b = u[3] - 0.7;
    return c1[(int)u[0]] + c2[(int)u[1]] + 10 * (a * a + b * b);
}

/* a noisy sphere: deterministic pseudo-noise per trial, sd 0.05 */
static double noisy_sphere5(const double *u, uint64_t t) {
    uint64_t z = (t + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
    double noise = ((double)(z >> 11) / 9007199254740992.0 - 0.5) * 0.17;
    return sphere5(u, t) + noise;
}

static const dx_opt_dim num5[5] = {{0}, {0}, {0}, {0}, {0}};
static const dx_opt_space sp_num5 = {5, num5};
static const dx_opt_dim num2[2] = {{0}, {0}};
static const dx_opt_space sp_num2 = {2, num2};
static const dx_opt_dim mix4[4] = {{4}, {3}, {0}, {0}};
static const dx_opt_space sp_mixed = {4, mix4};

static double best_of(dx_opt_alg alg, const dx_opt_space *sp, objective f, size_t budget, uint64_t seed,
                      size_t batch) {
    run_result r = drive(alg, sp, f, budget, seed, batch);
    free(r.asks);
    print_message("  %-14s budget %4zu seed %llu batch %zu: best %.6g\n", dx_opt_alg_name(alg), budget,
                  (unsigned long long)seed, batch, r.best);
    return r.best;
}

/* random search is the baseline every other algorithm must beat */
static void test_random_search_baseline(void **st) {
    double r = best_of(DX_OPT_RANDOM, &sp_num5, sphere5, 200, 1, 1);
    assert_true(r < 40.0);
    assert_true(r > 1.0); /* the function is not trivial for it */
}

static void test_sa_converges_on_sphere(void **st) {
    assert_true(best_of(DX_OPT_SA, &sp_num5, sphere5, 400, 1, 1) < 1.0);
    assert_true(best_of(DX_OPT_SA, &sp_num2, branin, 200, 2, 1) - BRANIN_MIN < 0.1);
}

static void test_ga_converges(void **st) {
    assert_true(best_of(DX_OPT_GA, &sp_num5, sphere5, 400, 1, 1) < 1.0);
    assert_true(best_of(DX_OPT_GA, &sp_mixed, mixed, 200, 3, 1) < 0.1);
}

static void test_cmaes_converges(void **st) {
    assert_true(best_of(DX_OPT_CMAES, &sp_num5, sphere5, 400, 1, 1) < 1e-3);
    assert_true(best_of(DX_OPT_CMAES, &sp_num2, branin, 200, 2, 1) - BRANIN_MIN < 1e-3);
}

static void test_tpe_converges(void **st) {
    assert_true(best_of(DX_OPT_TPE, &sp_num2, branin, 100, 2, 1) - BRANIN_MIN < 0.2);
    assert_true(best_of(DX_OPT_TPE, &sp_mixed, mixed, 100, 3, 1) < 0.2);
}

static double hartmann6(const double *u, uint64_t t) {
    (void)t;
    return dx_hartmann6(u);
}
static const dx_opt_dim num6[6] = {{0}, {0}, {0}, {0}, {0}, {0}};
static const dx_opt_space sp_num6 = {6, num6};

#define NSEEDS_H6 201
static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* TPE's Parzen bandwidths follow Optuna's univariate rule (the prior's
 * centre is a neighbour; the extreme points do not look at the box's ends)
 * and its components are scored times their bandwidth (Optuna 3.1's
 * log-pdf): median regret on Hartmann6 at 50 evaluations over 201 seeds
 * 0.561 (0.747 scoring plain mixture densities; 0.826 also with the box's
 * ends as neighbours and the prior left out) */
static void test_tpe_hartmann6_median(void **st) {
    double r[NSEEDS_H6];
    for (int s = 0; s < NSEEDS_H6; s++) {
        run_result rr = drive(DX_OPT_TPE, &sp_num6, hartmann6, 50, (uint64_t)s, 1);
        free(rr.asks);
        r[s] = rr.best - H6_MIN;
    }
    qsort(r, NSEEDS_H6, sizeof r[0], cmp_dbl);
    print_message("  tpe hartmann6 50 evaluations, %d seeds: median regret %.4f\n", NSEEDS_H6, r[NSEEDS_H6 / 2]);
    assert_true(r[NSEEDS_H6 / 2] < 0.62);
}

/* The bench's mixed problem (bench/dspex_opt_bench.erl): two categorical
 * dimensions (4 and 3 categories, the best costing 0) and Branin / 10 on
 * [-5, 10] x [0, 15]; minimum 0. */
static double bench_mixed(const double *u, uint64_t t) {
    static const double c1[4] = {2.0, 0.0, 1.0, 3.0}, c2[3] = {1.0, 0.5, 0.0};
    double v[2] = {u[2], u[3]};
    return c1[(int)u[0]] + c2[(int)u[1]] + (branin(v, t) - BRANIN_MIN) / 10;
}

/* Issue #18's goal, on the bench's mixed problem at 100 evaluations, seeds
 * 0-199: Optuna 3.1's TPE reaches a median regret of 0.0090; ours 0.0064
 * with Optuna's categorical kernels and bandwidth-weighted components
 * (0.0103 before, with half of each categorical kernel spread uniformly and
 * plain mixture densities). The test asserts at least Optuna's figure. */
#define NSEEDS_MIXED 200
static void test_tpe_mixed_median(void **st) {
    double r[NSEEDS_MIXED];
    for (int s = 0; s < NSEEDS_MIXED; s++) {
        run_result rr = drive(DX_OPT_TPE, &sp_mixed, bench_mixed, 100, (uint64_t)s, 1);
        free(rr.asks);
        r[s] = rr.best;
    }
    qsort(r, NSEEDS_MIXED, sizeof r[0], cmp_dbl);
    double med = 0.5 * (r[NSEEDS_MIXED / 2 - 1] + r[NSEEDS_MIXED / 2]);
    print_message("  tpe bench mixed 100 evaluations, %d seeds: median regret %.5f\n", NSEEDS_MIXED, med);
    assert_true(med < 0.0090);
}

static void test_bo_converges(void **st) {
    assert_true(best_of(DX_OPT_BO, &sp_num2, branin, 40, 2, 1) - BRANIN_MIN < 0.05);
    assert_true(best_of(DX_OPT_BO, &sp_mixed, mixed, 40, 3, 1) < 0.1);
}

/* the fit warm-started from the previous ask's hyperparameters converges as well */
static void test_bo_warm_start_converges(void **st) {
    warm_chain = 1;
    double b1 = best_of(DX_OPT_BO, &sp_num2, branin, 40, 2, 1) - BRANIN_MIN;
    double b2 = best_of(DX_OPT_BO, &sp_mixed, mixed, 40, 3, 1);
    double b3 = best_of(DX_OPT_BO, &sp_num5, sphere5, 60, 7, 1);
    warm_chain = 0;
    assert_true(b1 < 0.05);
    assert_true(b2 < 0.1);
    assert_true(b3 < 0.05);
}

/* BO's ask cost (multiply-adds of its dense linear algebra, dx_opt_conf.work:
 * deterministic, not time) on Hartmann6 with the hyperparameters chained as
 * dspex_opt does: the ask at 100 observations, where the fit restarts from
 * scratch, costs at most 1.5 times the median of the warm-started asks at 95
 * to 99 (the restart fits a subset; on all 100 observations it cost 1.9
 * times). */
static void test_bo_restart_ask_cost(void **st) {
    enum { N = 100 };
    double x[(N + 1) * 6], y[N + 1], th[DX_OPT_MAX_DIMS + 2], fitted[DX_OPT_MAX_DIMS + 2];
    uint64_t tid[N + 1], work[N + 1];
    int have = 0;
    for (size_t t = 0; t <= N; t++) {
        dx_opt_hist h = {t, x, y, tid, 0, NULL};
        work[t] = 0;
        dx_opt_conf conf = {.budget = N + 1, .warm = have ? th : NULL, .fitted = fitted, .work = &work[t]};
        assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_num6, &h, 4, t, &conf, x + t * 6), DX_OPT_OK);
        if (!isnan(fitted[0])) {
            memcpy(th, fitted, sizeof th);
            have = 1;
        }
        y[t] = hartmann6(x + t * 6, t);
        tid[t] = t;
    }
    uint64_t w[5];
    for (int i = 0; i < 5; i++) w[i] = work[95 + i];
    for (int i = 1; i < 5; i++)
        for (int j = i; j > 0 && w[j] < w[j - 1]; j--) {
            uint64_t tt = w[j];
            w[j] = w[j - 1];
            w[j - 1] = tt;
        }
    print_message("  bo work: warm asks at 95-99 median %llu, restart at 100: %llu (%.2fx)\n",
                  (unsigned long long)w[2], (unsigned long long)work[N], (double)work[N] / (double)w[2]);
    assert_true(work[N] > 0 && w[2] > 0);
    assert_true((double)work[N] <= 1.5 * (double)w[2]);
}

/* Repeated BO asks reuse their scratch memory (a pool): with glibc's
 * dynamic mmap threshold turned off as the Erlang VM leaves it (blocks of
 * 128 KB or more mapped afresh), the asks after the first at 100
 * observations take (almost) no page faults; a fresh allocation per ask
 * faulted ~120 pages each time, which cost more than the ask's arithmetic. */
static void test_bo_ask_reuses_memory(void **st) {
#if defined(__GLIBC__) && defined(M_MMAP_THRESHOLD)
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
    enum { N = 100 };
    double x[N * 6], y[N], out[6];
    uint64_t tid[N];
    for (int t = 0; t < N; t++) {
        for (int j = 0; j < 6; j++) x[t * 6 + j] = fmod(0.37 * (t + 1) * (j + 2) + 0.11 * j, 1.0);
        y[t] = hartmann6(x + t * 6, (uint64_t)t);
        tid[t] = (uint64_t)t;
    }
    dx_opt_hist h = {N, x, y, tid, 0, NULL};
    dx_opt_conf conf = {.budget = N + 1};
    assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_num6, &h, 1, N, &conf, out), DX_OPT_OK);
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    for (int k = 0; k < 4; k++) assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_num6, &h, 1, N, &conf, out), DX_OPT_OK);
    getrusage(RUSAGE_SELF, &r1);
    long faults = r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt;
    print_message("  bo: page faults over 4 asks at %d observations after the first: %ld\n", N, faults);
    /* under valgrind (the Makefile sets DX_TEST_SCALE) its own shadow memory
     * and translations fault too: the asks ran (memory checked), the count
     * means nothing there */
    dx_opt_release_scratch(); /* and asks after it allocate again */
    assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_num6, &h, 1, N, &conf, out), DX_OPT_OK);
    dx_opt_release_scratch();
    if (getenv("DX_TEST_SCALE")) skip();
    assert_true(faults < 64);
}

static void test_spsa_converges_on_noisy_sphere(void **st) {
    assert_true(best_of(DX_OPT_SPSA_ADAM, &sp_num5, noisy_sphere5, 400, 1, 1) < 1.0);
    assert_true(best_of(DX_OPT_SPSA_MOMENTUM, &sp_num5, noisy_sphere5, 400, 1, 1) < 1.0);
}

/* each algorithm beats random search at the same budget and seed */
static void test_every_algorithm_beats_random(void **st) {
    double base = best_of(DX_OPT_RANDOM, &sp_num5, sphere5, 200, 7, 1);
    for (int a = DX_OPT_SA; a < DX_OPT_N_ALGS; a++) {
        size_t budget = a == DX_OPT_BO ? 60 : 200;
        assert_true(best_of((dx_opt_alg)a, &sp_num5, sphere5, budget, 7, 1) < base);
    }
}

static void test_same_seed_same_asks_other_seed_other_asks(void **st) {
    for (int a = 0; a < DX_OPT_N_ALGS; a++) {
        size_t budget = 30;
        run_result r1 = drive((dx_opt_alg)a, &sp_mixed, mixed, budget, 11, 1);
        run_result r2 = drive((dx_opt_alg)a, &sp_mixed, mixed, budget, 11, 1);
        run_result r3 = drive((dx_opt_alg)a, &sp_mixed, mixed, budget, 12, 1);
        assert_memory_equal(r1.asks, r2.asks, budget * 4 * sizeof(double));
        assert_true(memcmp(r1.asks, r3.asks, budget * 4 * sizeof(double)) != 0);
        free(r1.asks);
        free(r2.asks);
        free(r3.asks);
    }
}

/* four asks outstanding, told out of order: still valid and converging */
static void test_parallel_asks(void **st) {
    assert_true(best_of(DX_OPT_CMAES, &sp_num5, sphere5, 400, 1, 4) < 1e-2);
    assert_true(best_of(DX_OPT_TPE, &sp_mixed, mixed, 100, 3, 4) < 0.3);
    assert_true(best_of(DX_OPT_GA, &sp_num5, sphere5, 400, 1, 4) < 2.0);
    assert_true(best_of(DX_OPT_SPSA_ADAM, &sp_num5, sphere5, 400, 1, 4) < 2.0);
    assert_true(best_of(DX_OPT_BO, &sp_num2, branin, 40, 2, 4) - BRANIN_MIN < 0.2);
}

/* failed trials (+INF) are handled as worst: every algorithm still beats
 * random search when the left half of the space fails */
static double fails_left(const double *u, uint64_t t) { return u[0] < 0.5 ? INFINITY : sphere5(u, t); }
static void test_failed_trials(void **st) {
    double base = best_of(DX_OPT_RANDOM, &sp_num5, fails_left, 150, 5, 1);
    for (int a = DX_OPT_SA; a < DX_OPT_N_ALGS; a++) {
        size_t budget = a == DX_OPT_BO ? 40 : 150;
        assert_true(best_of((dx_opt_alg)a, &sp_num5, fails_left, budget, 5, 1) < base);
    }
}

/* scores near the float range's end: BO's standardisation overflowed (every expected improvement NaN) and
 * its answer came from the scratch block's leftovers, so two identical runs differed after another run used
 * that block; SPSA's gradient became infinite, then NaN, and every later ask was the same point */
static double huge_scores(const double *u, uint64_t t) { return 1e308 * (1.0 - (double)(t % 3) / 3.0) + u[0]; }
static double huge_first(const double *u, uint64_t t) { return t == 0 ? 1e308 : sphere5(u, t); }
static void test_huge_scores(void **st) {
    run_result r1 = drive(DX_OPT_BO, &sp_num2, huge_scores, 20, 3, 1);
    (void)best_of(DX_OPT_BO, &sp_num5, sphere5, 30, 9, 1); /* another run reuses (and rewrites) the scratch block */
    run_result r2 = drive(DX_OPT_BO, &sp_num2, huge_scores, 20, 3, 1);
    assert_memory_equal(r1.asks, r2.asks, 20 * 2 * sizeof(double));
    free(r1.asks);
    free(r2.asks);
    for (int a = DX_OPT_SPSA_MOMENTUM; a <= DX_OPT_SPSA_ADAM; a++) {
        run_result r = drive((dx_opt_alg)a, &sp_num5, huge_first, 40, 1, 1);
        int distinct = 0;
        for (int t = 2; t < 40; t++) {
            int seen = 0;
            for (int u = 2; u < t && !seen; u++) seen = !memcmp(r.asks + t * 5, r.asks + u * 5, 5 * sizeof(double));
            distinct += !seen;
        }
        assert_true(distinct >= 30);
        free(r.asks);
    }
}

/* CMA-ES resumed from the previous ask's state asks exactly what the whole replay asks (one ask at a time and
 * four outstanding, told out of order), and a state that does not fit (more generations than the history
 * has, a damaged matrix) is ignored, not trusted */
static void test_cmaes_resumed_state_same_asks(void **st) {
    const dx_opt_space *sps[2] = {&sp_num5, &sp_mixed};
    objective fs[2] = {sphere5, mixed};
    for (int k = 0; k < 2; k++)
        for (size_t batch = 1; batch <= 4; batch += 3) {
            int d = sps[k]->d;
            run_result r1 = drive(DX_OPT_CMAES, sps[k], fs[k], 120, 5, batch);
            cma_chain = 1;
            run_result r2 = drive(DX_OPT_CMAES, sps[k], fs[k], 120, 5, batch);
            cma_chain = 0;
            assert_memory_equal(r1.asks, r2.asks, 120 * d * sizeof(double));
            free(r1.asks);
            free(r2.asks);
        }
    /* a 5-dimensional history of 3 generations (lambda 8) and states that do not fit it */
    double x[40 * 5], y[40], out1[5], out2[5];
    uint64_t tid[40];
    for (int i = 0; i < 40; i++) {
        for (int j = 0; j < 5; j++) x[i * 5 + j] = (double)((i * 7 + j * 3) % 11) / 10.0;
        y[i] = sphere5(x + i * 5, (uint64_t)i);
        tid[i] = (uint64_t)i;
    }
    dx_opt_hist h = {24, x, y, tid, 0, NULL};
    size_t cl = dx_opt_cma_state_len(5);
    double good[cl], bad[cl];
    dx_opt_conf c0 = {.budget = 100, .cma_out = good};
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h, 1, 24, &c0, out1), DX_OPT_OK);
    assert_true(good[0] == 3.0);
    memcpy(bad, good, sizeof bad);
    bad[0] = 4.0; /* claims a generation the history does not have */
    dx_opt_conf c1 = {.budget = 100, .cma_in = bad, .cma_in_len = cl};
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h, 1, 24, &c1, out2), DX_OPT_OK);
    assert_memory_equal(out1, out2, sizeof out1);
    memcpy(bad, good, sizeof bad);
    bad[2 + 3 * 5 + 1] += 1.0; /* C no longer symmetric */
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h, 1, 24, &c1, out2), DX_OPT_OK);
    assert_memory_equal(out1, out2, sizeof out1);
    memcpy(bad, good, sizeof bad);
    bad[2] += 0.25; /* a state that fits is used, not replayed over: another mean, another ask */
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h, 1, 24, &c1, out2), DX_OPT_OK);
    assert_true(memcmp(out1, out2, sizeof out1) != 0);
    memcpy(bad, good, sizeof bad);
    c1.cma_in_len = cl - 1; /* another space's size */
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h, 1, 24, &c1, out2), DX_OPT_OK);
    assert_memory_equal(out1, out2, sizeof out1);
    /* resumed from its own state after 3 generations, on 5 more told: the whole replay's ask */
    dx_opt_hist h2 = {40, x, y, tid, 0, NULL};
    dx_opt_conf c2 = {.budget = 100, .cma_in = good, .cma_in_len = cl}, c3 = {.budget = 100};
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h2, 1, 40, &c2, out1), DX_OPT_OK);
    assert_int_equal(dx_opt_ask(DX_OPT_CMAES, &sp_num5, &h2, 1, 40, &c3, out2), DX_OPT_OK);
    assert_memory_equal(out1, out2, sizeof out1);
}

static void test_invalid_input_refused(void **st) {
    double out[4], x[4] = {0, 0, 0.5, 1.5}, y[1] = {1.0};
    uint64_t tid[1] = {0};
    dx_opt_conf conf = {.budget = 10};
    dx_opt_hist h0 = {0, NULL, NULL, NULL, 0, NULL};
    dx_opt_hist hb = {1, x, y, tid, 0, NULL};
    assert_int_equal(dx_opt_ask(DX_OPT_TPE, &sp_mixed, &hb, 1, 1, &conf, out), DX_OPT_E_ARG); /* 1.5 > 1 */
    x[3] = 1.0;
    x[0] = 4; /* category out of range */
    assert_int_equal(dx_opt_ask(DX_OPT_TPE, &sp_mixed, &hb, 1, 1, &conf, out), DX_OPT_E_ARG);
    x[0] = 1.5; /* not integral */
    assert_int_equal(dx_opt_ask(DX_OPT_TPE, &sp_mixed, &hb, 1, 1, &conf, out), DX_OPT_E_ARG);
    x[0] = 1;
    y[0] = NAN;
    assert_int_equal(dx_opt_ask(DX_OPT_TPE, &sp_mixed, &hb, 1, 1, &conf, out), DX_OPT_E_ARG);
    y[0] = 1.0;
    assert_int_equal(dx_opt_ask(DX_OPT_TPE, &sp_mixed, &hb, 1, 1, &conf, out), DX_OPT_OK);
    double px[4] = {0, 3, 0.5, 0.5}; /* pending: category 3 of 3 */
    dx_opt_hist hp = {1, x, y, tid, 1, px};
    assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_mixed, &hp, 1, 1, &conf, out), DX_OPT_E_ARG);
    px[1] = 2;
    assert_int_equal(dx_opt_ask(DX_OPT_BO, &sp_mixed, &hp, 1, 1, &conf, out), DX_OPT_OK);
    dx_opt_dim bad[1] = {{1}};
    dx_opt_space spb = {1, bad};
    assert_int_equal(dx_opt_ask(DX_OPT_RANDOM, &spb, &h0, 1, 0, &conf, out), DX_OPT_E_ARG);
    dx_opt_space sp0 = {0, num5};
    assert_int_equal(dx_opt_ask(DX_OPT_RANDOM, &sp0, &h0, 1, 0, &conf, out), DX_OPT_E_ARG);
    assert_int_equal(dx_opt_ask(DX_OPT_N_ALGS, &sp_num2, &h0, 1, 0, &conf, out), DX_OPT_E_ARG);
    conf.budget = 0;
    assert_int_equal(dx_opt_ask(DX_OPT_RANDOM, &sp_num2, &h0, 1, 0, &conf, out), DX_OPT_E_ARG);
    assert_null(dx_opt_alg_name(DX_OPT_N_ALGS));
    assert_string_equal(dx_opt_alg_name(DX_OPT_CMAES), "cmaes");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_search_baseline),
        cmocka_unit_test(test_sa_converges_on_sphere),
        cmocka_unit_test(test_ga_converges),
        cmocka_unit_test(test_cmaes_converges),
        cmocka_unit_test(test_tpe_converges),
        cmocka_unit_test(test_tpe_hartmann6_median),
        cmocka_unit_test(test_tpe_mixed_median),
        cmocka_unit_test(test_bo_converges),
        cmocka_unit_test(test_bo_warm_start_converges),
        cmocka_unit_test(test_bo_restart_ask_cost),
        cmocka_unit_test(test_bo_ask_reuses_memory),
        cmocka_unit_test(test_spsa_converges_on_noisy_sphere),
        cmocka_unit_test(test_every_algorithm_beats_random),
        cmocka_unit_test(test_same_seed_same_asks_other_seed_other_asks),
        cmocka_unit_test(test_parallel_asks),
        cmocka_unit_test(test_failed_trials),
        cmocka_unit_test(test_huge_scores),
        cmocka_unit_test(test_cmaes_resumed_state_same_asks),
        cmocka_unit_test(test_invalid_input_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
