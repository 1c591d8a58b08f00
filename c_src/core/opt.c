/* Dispatch and validation of the optimizer kernels; random search, simulated
 * annealing and the genetic algorithm. */
#include "opt_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const names[DX_OPT_N_ALGS] = {"random", "sa", "ga", "cmaes", "tpe", "bo", "spsa_momentum",
                                                 "spsa_adam"};

const char *dx_opt_alg_name(dx_opt_alg alg) { return (unsigned)alg < DX_OPT_N_ALGS ? names[alg] : NULL; }

int dx_opt_check(const dx_opt_space *sp, const dx_opt_hist *h) {
    if (!sp || sp->d < 1 || sp->d > DX_OPT_MAX_DIMS || !sp->dims) return DX_OPT_E_ARG;
    for (int j = 0; j < sp->d; j++) {
        int k = sp->dims[j].ncat;
        if (k != 0 && (k < 2 || k > DX_OPT_MAX_CATS)) return DX_OPT_E_ARG;
    }
    if (!h || h->n > DX_OPT_MAX_HIST || (h->n && (!h->x || !h->y || !h->tid))) return DX_OPT_E_ARG;
    if (h->np > DX_OPT_MAX_HIST || (h->np && !h->px)) return DX_OPT_E_ARG;
    for (size_t i = 0; i < h->n + h->np; i++) {
        if (i < h->n && (isnan(h->y[i]) || h->y[i] == -INFINITY)) return DX_OPT_E_ARG;
        for (int j = 0; j < sp->d; j++) {
            double v = i < h->n ? h->x[i * (size_t)sp->d + j] : h->px[(i - h->n) * (size_t)sp->d + j];
            int k = sp->dims[j].ncat;
            if (isnan(v) || v < 0.0) return DX_OPT_E_ARG;
            if (!k && v > 1.0) return DX_OPT_E_ARG;
            if (k && (v != floor(v) || v > k - 1)) return DX_OPT_E_ARG;
        }
    }
    return DX_OPT_OK;
}

int dx_opt_ask(dx_opt_alg alg, const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
               const dx_opt_conf *conf, double *out) {
    if (dx_opt_check(sp, h) != DX_OPT_OK || !out || !conf || conf->budget < 1) return DX_OPT_E_ARG;
    int rc;
    switch (alg) {
    case DX_OPT_RANDOM: rc = dx_opt_ask_random(sp, h, seed, trial, conf, out); break;
    case DX_OPT_SA: rc = dx_opt_ask_sa(sp, h, seed, trial, conf, out); break;
    case DX_OPT_GA: rc = dx_opt_ask_ga(sp, h, seed, trial, conf, out); break;
    case DX_OPT_CMAES: rc = dx_opt_ask_cmaes(sp, h, seed, trial, conf, out); break;
    case DX_OPT_TPE: rc = dx_opt_ask_tpe(sp, h, seed, trial, conf, out); break;
    case DX_OPT_BO: rc = dx_opt_ask_bo(sp, h, seed, trial, conf, out); break;
    case DX_OPT_SPSA_MOMENTUM: rc = dx_opt_ask_spsa(sp, h, seed, trial, conf, 0, out); break;
    case DX_OPT_SPSA_ADAM: rc = dx_opt_ask_spsa(sp, h, seed, trial, conf, 1, out); break;
    default: return DX_OPT_E_ARG;
    }
    if (rc == DX_OPT_OK) dx_opt_repair(sp, out); /* the contract holds whatever a kernel did */
    return rc;
}

/* ---- random search -------------------------------------------------------- */
int dx_opt_ask_random(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                      const dx_opt_conf *conf, double *out) {
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_RANDOM, trial);
    dx_opt_random_point(sp, &r, out);
    return DX_OPT_OK;
}

/* Reflects v into [0, 1]. */
static double reflect01(double v) {
    for (int i = 0; i < 4 && (v < 0.0 || v > 1.0); i++) v = v < 0.0 ? -v : 2.0 - v;
    return dx_opt_clamp01(v);
}

/* ---- simulated annealing --------------------------------------------------
 * A Metropolis chain replayed from the told trials: each told trial is a
 * proposal from the chain's current point, accepted when better or with
 * probability exp(-delta / T). T follows a geometric schedule over the budget
 * scaled by the running standard deviation of the scores; the step size
 * shrinks geometrically; after a stall the chain restarts from the best. */
int dx_opt_ask_sa(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                  const dx_opt_conf *conf, double *out) {
    int d = sp->d;
    dx_rng r;
    if (h->n == 0) {
        dx_rng_init(&r, seed, DX_S_SA_PROP, trial);
        dx_opt_random_point(sp, &r, out);
        return DX_OPT_OK;
    }
    double budget = (double)conf->budget;
    size_t cur = 0, best = 0, since_best = 0;
    size_t stall = (size_t)fmax(20.0, budget / 10.0);
    double mean = 0.0, m2 = 0.0;
    size_t nfin = 0;
    for (size_t i = 0; i < h->n; i++) {
        double yi = h->y[i];
        if (i > 0) {
            double prog = fmin(1.0, (double)i / budget);
            double sd = nfin > 1 ? sqrt(m2 / (double)(nfin - 1)) : 1.0;
            double temp = (sd > 0 ? sd : 1.0) * 0.5 * pow(1e-3, prog);
            int accept = yi <= h->y[cur];
            if (!accept && isfinite(yi)) {
                dx_rng_init(&r, seed, DX_S_SA_ACC, h->tid[i]);
                accept = dx_rng_unif(&r) < exp(-(yi - h->y[cur]) / temp);
            }
            if (accept) cur = i;
            if (yi < h->y[best]) {
                best = i;
                since_best = 0;
            } else if (++since_best >= stall) {
                cur = best;
                since_best = 0;
            }
        }
        if (isfinite(yi)) { /* Welford */
            nfin++;
            double dlt = yi - mean;
            mean += dlt / (double)nfin;
            m2 += dlt * (yi - mean);
        }
    }
    double prog = fmin(1.0, (double)h->n / budget);
    double step = 0.25 * pow(0.02 / 0.25, prog);
    const double *c = h->x + cur * (size_t)d;
    dx_rng_init(&r, seed, DX_S_SA_PROP, trial);
    int changed = 0;
    for (int j = 0; j < d; j++) {
        int k = sp->dims[j].ncat;
        if (!k) {
            out[j] = reflect01(c[j] + step * dx_rng_normal(&r));
            changed = 1;
        } else if (dx_rng_unif(&r) < 1.0 / d) {
            out[j] = (double)(((int)c[j] + 1 + (int)dx_rng_below(&r, (uint64_t)(k - 1))) % k);
            changed = 1;
        } else {
            out[j] = c[j];
        }
    }
    if (!changed) { /* all categorical and nothing moved: change one */
        int j = (int)dx_rng_below(&r, (uint64_t)d), k = sp->dims[j].ncat;
        out[j] = (double)(((int)c[j] + 1 + (int)dx_rng_below(&r, (uint64_t)(k - 1))) % k);
    }
    return DX_OPT_OK;
}

/* ---- genetic algorithm ----------------------------------------------------
 * Steady-state, elitist: the parents' pool is the best P told trials; two
 * parents by tournament (size 3), blend crossover (BLX-0.5) on numeric genes
 * and uniform crossover on categorical ones, then per-gene mutation with
 * probability 1/d (Gaussian on numeric genes, a random other category on
 * categorical ones). The first P trials are uniformly random. */
int dx_opt_ask_ga(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                  const dx_opt_conf *conf, double *out) {
    int d = sp->d;
    size_t pop = (size_t)(10 + 2 * d);
    if (pop > 40) pop = 40;
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_GA, trial);
    if (h->n < pop) {
        dx_opt_random_point(sp, &r, out);
        return DX_OPT_OK;
    }
    size_t *idx = malloc(h->n * sizeof *idx);
    if (!idx) return DX_OPT_E_NOMEM;
    dx_opt_argsort(h->y, h->n, idx);
    size_t par[2];
    for (int p = 0; p < 2; p++) {
        size_t w = dx_rng_below(&r, pop);
        for (int t = 1; t < 3; t++) {
            size_t c = dx_rng_below(&r, pop);
            if (c < w) w = c;
        }
        par[p] = idx[w];
    }
    free(idx);
    const double *a = h->x + par[0] * (size_t)d, *b = h->x + par[1] * (size_t)d;
    int cross = dx_rng_unif(&r) < 0.9;
    double prog = fmin(1.0, (double)h->n / (double)conf->budget);
    double sigma = 0.1 * (1.0 - 0.8 * prog);
    for (int j = 0; j < d; j++) {
        int k = sp->dims[j].ncat;
        double v = a[j];
        if (cross) {
            if (!k) {
                double lo = fmin(a[j], b[j]), hi = fmax(a[j], b[j]), span = hi - lo;
                v = lo - 0.5 * span + dx_rng_unif(&r) * 2.0 * span;
            } else {
                v = dx_rng_unif(&r) < 0.5 ? a[j] : b[j];
            }
        }
        if (dx_rng_unif(&r) < 1.0 / d) {
            if (!k) v += sigma * dx_rng_normal(&r);
            else v = (double)(((int)v + 1 + (int)dx_rng_below(&r, (uint64_t)(k - 1))) % k);
        }
        out[j] = k ? v : reflect01(v);
    }
    return DX_OPT_OK;
}
