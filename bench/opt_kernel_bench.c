/* Optimizer kernels (c_src/core/opt*.c) measured without the VM, for issue #18:
 *
 *   opt_kernel_bench regret ALG PROBLEM SEED_FROM SEED_TO
 *       runs ALG ("tpe", "bo", ...) on PROBLEM (the bench's branin, hartmann6,
 *       rosenbrock5, rastrigin10, ackley5, mixed: the same functions, boxes and
 *       budgets as bench/dspex_opt_bench.erl) for every seed of the range, one
 *       ask at a time, BO's fitted hyperparameters chained from ask to ask as
 *       dspex_opt does; prints each seed's final regret, then the median
 *       (`median ...': the median line only).
 *   opt_kernel_bench ask [ALG]
 *       the CPU time (CLOCK_THREAD_CPUTIME_ID, and wall time beside it) of one
 *       ask of ALG (default bo) on Hartmann6 at 95..105 observations: for
 *       each of 10 seeds a run of 105 asks, each ask repeated 15 times and
 *       the minimum kept (one run's history, so each repetition computes the
 *       same thing); prints the median over the seeds per observation count.
 *
 * Nothing is written to disk. `make bench-opt-kernel` builds and runs both. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "opt_testfn.h"
#include <time.h>

#include "opt.h"

typedef struct {
    const char *name;
    int d;
    double lo[10], hi[10];
    int ncat[10];
    size_t budget;
    double opt;
    double (*f)(const double *x);
} problem;

#define BRANIN_MIN 0.397887357729739
static double branin(const double *x) {
    double a = x[1] - 5.1 / (4 * M_PI * M_PI) * x[0] * x[0] + 5 / M_PI * x[0] - 6;
    return a * a + 10 * (1 - 1 / (8 * M_PI)) * cos(x[0]) + 10;
}

static double hartmann6(const double *x) { return dx_hartmann6(x); }

static double rosenbrock5(const double *x) {
    double s = 0;
    for (int i = 0; i < 4; i++) s += 100 * (x[i + 1] - x[i] * x[i]) * (x[i + 1] - x[i] * x[i]) + (1 - x[i]) * (1 - x[i]);
    return s;
}

static double rastrigin10(const double *x) {
    double s = 100;
    for (int i = 0; i < 10; i++) s += x[i] * x[i] - 10 * cos(2 * M_PI * x[i]);
    return s;
}

static double ackley5(const double *x) {
    double a = 0, b = 0;
    for (int i = 0; i < 5; i++) {
        a += x[i] * x[i];
        b += cos(2 * M_PI * x[i]);
    }
    return -20 * exp(-0.2 * sqrt(a / 5)) - exp(b / 5) + 20 + M_E;
}

static double mixed(const double *x) {
    static const double c1[4] = {2.0, 0.0, 1.0, 3.0}, c2[3] = {1.0, 0.5, 0.0};
    return c1[(int)x[0]] + c2[(int)x[1]] + (branin(x + 2) - BRANIN_MIN) / 10;
}

static const problem problems[] = {
    {"branin", 2, {-5, 0}, {10, 15}, {0}, 50, BRANIN_MIN, branin},
    {"hartmann6", 6, {0}, {1, 1, 1, 1, 1, 1}, {0}, 50, -3.32236801141551, hartmann6},
    {"rosenbrock5", 5, {-2.048, -2.048, -2.048, -2.048, -2.048}, {2.048, 2.048, 2.048, 2.048, 2.048}, {0}, 100, 0.0,
     rosenbrock5},
    {"rastrigin10", 10, {-5.12, -5.12, -5.12, -5.12, -5.12, -5.12, -5.12, -5.12, -5.12, -5.12},
     {5.12, 5.12, 5.12, 5.12, 5.12, 5.12, 5.12, 5.12, 5.12, 5.12}, {0}, 200, 0.0, rastrigin10},
    {"ackley5", 5, {-32.768, -32.768, -32.768, -32.768, -32.768}, {32.768, 32.768, 32.768, 32.768, 32.768}, {0},
     100, 0.0, ackley5},
    {"mixed", 4, {0, 0, -5, 0}, {0, 0, 10, 15}, {4, 3, 0, 0}, 100, 0.0, mixed},
};

static const problem *find_problem(const char *name) {
    for (size_t i = 0; i < sizeof problems / sizeof problems[0]; i++)
        if (!strcmp(problems[i].name, name)) return &problems[i];
    return NULL;
}

static int find_alg(const char *name) {
    for (int a = 0; a < DX_OPT_N_ALGS; a++)
        if (!strcmp(dx_opt_alg_name((dx_opt_alg)a), name)) return a;
    return -1;
}

static double eval(const problem *p, const double *u) {
    double x[10];
    for (int j = 0; j < p->d; j++) x[j] = p->ncat[j] ? u[j] : p->lo[j] + u[j] * (p->hi[j] - p->lo[j]);
    return p->f(x);
}

static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double wall_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct {
    double *x, *y;
    uint64_t *tid;
    double warm[DX_OPT_MAX_DIMS + 2], fitted[DX_OPT_MAX_DIMS + 2];
    int have_warm;
} run_state;

/* One ask of trial n after n told trials; BO's hyperparameters chained. */
static void ask_one(dx_opt_alg alg, const problem *p, const dx_opt_space *sp, run_state *rs, size_t n, size_t budget,
                    uint64_t seed, double *out, int keep) {
    dx_opt_hist h = {n, rs->x, rs->y, rs->tid, 0, NULL};
    dx_opt_conf conf = {.budget = budget, .warm = rs->have_warm ? rs->warm : NULL, .fitted = rs->fitted};
    if (dx_opt_ask(alg, sp, &h, seed, n, &conf, out) != DX_OPT_OK) {
        fprintf(stderr, "ask failed\n");
        exit(1);
    }
    if (keep && !isnan(rs->fitted[0])) {
        memcpy(rs->warm, rs->fitted, sizeof rs->warm);
        rs->have_warm = 1;
    }
}

static int cmp_dbl(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int cmd_regret(dx_opt_alg alg, const problem *p, long s0, long s1, int verbose) {
    dx_opt_dim dims[10];
    for (int j = 0; j < p->d; j++) dims[j].ncat = p->ncat[j];
    dx_opt_space sp = {p->d, dims};
    size_t ns = (size_t)(s1 - s0 + 1);
    double *fin = malloc(ns * sizeof *fin);
    run_state rs = {malloc(p->budget * p->d * sizeof(double)), malloc(p->budget * sizeof(double)),
                    malloc(p->budget * sizeof(uint64_t)), {0}, {0}, 0};
    for (long s = s0; s <= s1; s++) {
        double best = INFINITY;
        rs.have_warm = 0;
        for (size_t t = 0; t < p->budget; t++) {
            double *u = rs.x + t * p->d;
            ask_one(alg, p, &sp, &rs, t, p->budget, (uint64_t)s, u, 1);
            rs.y[t] = eval(p, u);
            rs.tid[t] = t;
            if (rs.y[t] < best) best = rs.y[t];
        }
        fin[s - s0] = best - p->opt;
        if (verbose) printf("%s %s seed %ld regret %.10g\n", p->name, dx_opt_alg_name(alg), s, fin[s - s0]);
    }
    qsort(fin, ns, sizeof *fin, cmp_dbl);
    double med = ns % 2 ? fin[ns / 2] : 0.5 * (fin[ns / 2 - 1] + fin[ns / 2]);
    printf("%s %s seeds %ld-%ld median regret %.6g (q25 %.6g, q75 %.6g)\n", p->name, dx_opt_alg_name(alg), s0, s1,
           med, fin[ns / 4], fin[(3 * ns) / 4]);
    free(fin);
    free(rs.x);
    free(rs.y);
    free(rs.tid);
    return 0;
}

#define ASK_SEEDS 10
#define ASK_REPS 15
#define ASK_FROM 95
#define ASK_TO 105

static int cmd_ask(dx_opt_alg alg) {
    const problem *p = find_problem("hartmann6");
    dx_opt_dim dims[6] = {{0}, {0}, {0}, {0}, {0}, {0}};
    dx_opt_space sp = {6, dims};
    size_t budget = ASK_TO + 1;
    static double cpu[ASK_TO + 1][ASK_SEEDS], wall[ASK_TO + 1][ASK_SEEDS];
    run_state rs = {malloc(budget * 6 * sizeof(double)), malloc(budget * sizeof(double)),
                    malloc(budget * sizeof(uint64_t)), {0}, {0}, 0};
    for (int s = 0; s < ASK_SEEDS; s++) {
        rs.have_warm = 0;
        for (size_t t = 0; t <= ASK_TO; t++) {
            double *u = rs.x + t * 6;
            if (t >= ASK_FROM) {
                double bc = INFINITY, bw = INFINITY;
                for (int k = 0; k < ASK_REPS; k++) {
                    double c0 = cpu_now(), w0 = wall_now();
                    ask_one(alg, p, &sp, &rs, t, budget, (uint64_t)s + 1, u, 0);
                    double c = cpu_now() - c0, w = wall_now() - w0;
                    bc = fmin(bc, c);
                    bw = fmin(bw, w);
                }
                cpu[t][s] = bc * 1e3;
                wall[t][s] = bw * 1e3;
            }
            ask_one(alg, p, &sp, &rs, t, budget, (uint64_t)s + 1, u, 1);
            rs.y[t] = eval(p, u);
            rs.tid[t] = t;
        }
    }
    printf("%s ask on hartmann6 (min of %d repetitions, median of %d seeds):\n", dx_opt_alg_name(alg), ASK_REPS,
           ASK_SEEDS);
    double sum = 0;
    for (int t = ASK_FROM; t <= ASK_TO; t++) {
        qsort(cpu[t], ASK_SEEDS, sizeof(double), cmp_dbl);
        qsort(wall[t], ASK_SEEDS, sizeof(double), cmp_dbl);
        double c = 0.5 * (cpu[t][ASK_SEEDS / 2 - 1] + cpu[t][ASK_SEEDS / 2]);
        double w = 0.5 * (wall[t][ASK_SEEDS / 2 - 1] + wall[t][ASK_SEEDS / 2]);
        sum += c;
        printf("  at %3d observations: cpu %.3f ms (max over seeds %.3f), wall %.3f ms\n", t, c,
               cpu[t][ASK_SEEDS - 1], w);
    }
    printf("  mean over %d..%d observations: cpu %.3f ms\n", ASK_FROM, ASK_TO, sum / (ASK_TO - ASK_FROM + 1));
    free(rs.x);
    free(rs.y);
    free(rs.tid);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 6 && (!strcmp(argv[1], "regret") || !strcmp(argv[1], "median"))) {
        int a = find_alg(argv[2]);
        const problem *p = find_problem(argv[3]);
        if (a < 0 || !p) {
            fprintf(stderr, "unknown algorithm or problem\n");
            return 2;
        }
        return cmd_regret((dx_opt_alg)a, p, atol(argv[4]), atol(argv[5]), argv[1][0] == 'r');
    }
    if (argc >= 2 && !strcmp(argv[1], "ask")) {
        int a = find_alg(argc >= 3 ? argv[2] : "bo");
        if (a < 0) {
            fprintf(stderr, "unknown algorithm\n");
            return 2;
        }
        return cmd_ask((dx_opt_alg)a);
    }
    fprintf(stderr, "usage: %s regret|median ALG PROBLEM SEED_FROM SEED_TO | ask [ALG]\n", argv[0]);
    return 2;
}
