/* Tree-structured Parzen estimator (a product of univariate estimators):
 * the told trials are split at the gamma quantile of the scores, gamma(n) = min(ceil(0.1 n), 25) trials in the "good" group l, the
 * rest in g. Numeric dimensions: a mixture of Gaussians truncated to [0, 1],
 * one per trial plus a wide prior, bandwidths from the distances to the
 * neighbours; categorical: one kernel per trial, half its weight on its
 * category and half spread uniformly (Optuna's prior weight 1), plus a
 * uniform prior. 24 candidates are drawn from l (each dimension
 * independently) and the one maximising the product over dimensions of
 * l(x)/g(x) is proposed (scoring the candidates jointly, rather than
 * dimension by dimension, keeps categorical dimensions from freezing on the
 * first good category). The first 10 trials are uniformly random. Pending trials (asked, not told) join g as if they had
 * failed (Optuna's "constant liar"), so that parallel asks spread out. */
#include "opt_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define N_STARTUP 10
#define N_CAND 24

typedef struct {
    size_t n;
    double *mu, *sg, *lz; /* lz: log of the truncated mass */
} mixture;

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Builds the mixture of points v[0..k-1] plus the prior (0.5, 1.0). */
static void mix_build(mixture *mx, const double *v, size_t k, double *scratch) {
    mx->n = k + 1;
    for (size_t i = 0; i < k; i++) scratch[i] = v[i];
    qsort(scratch, k, sizeof *scratch, cmp_d);
    double minsg = 1.0 / fmin(100.0, 1.0 + (double)mx->n);
    for (size_t i = 0; i < k; i++) {
        double left = scratch[i] - (i ? scratch[i - 1] : 0.0);
        double right = (i + 1 < k ? scratch[i + 1] : 1.0) - scratch[i];
        double s = fmax(left, right);
        mx->mu[i] = scratch[i];
        mx->sg[i] = fmin(1.0, fmax(minsg, s));
    }
    mx->mu[k] = 0.5;
    mx->sg[k] = 1.0;
    for (size_t i = 0; i < mx->n; i++) {
        double z = dx_opt_Phi((1.0 - mx->mu[i]) / mx->sg[i]) - dx_opt_Phi(-mx->mu[i] / mx->sg[i]);
        mx->lz[i] = log(fmax(z, 1e-300));
    }
}

static double mix_logpdf(const mixture *mx, double x) {
    double mxv = -INFINITY;
    double lw = -log((double)mx->n);
    for (size_t i = 0; i < mx->n; i++) {
        double z = (x - mx->mu[i]) / mx->sg[i];
        double l = lw - 0.5 * z * z - 0.9189385332046727 - log(mx->sg[i]) - mx->lz[i];
        if (l > mxv) mxv = l;
    }
    double s = 0;
    for (size_t i = 0; i < mx->n; i++) {
        double z = (x - mx->mu[i]) / mx->sg[i];
        s += exp(lw - 0.5 * z * z - 0.9189385332046727 - log(mx->sg[i]) - mx->lz[i] - mxv);
    }
    return mxv + log(s);
}

static double mix_sample(const mixture *mx, dx_rng *r) {
    size_t c = dx_rng_below(r, mx->n);
    for (int t = 0; t < 64; t++) {
        double x = mx->mu[c] + mx->sg[c] * dx_rng_normal(r);
        if (x >= 0.0 && x <= 1.0) return x;
    }
    return dx_rng_unif(r);
}

int dx_opt_ask_tpe(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                   const dx_opt_conf *conf, double *out) {
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_TPE, trial);
    size_t n = h->n;
    if (n < N_STARTUP) {
        dx_opt_random_point(sp, &r, out);
        return DX_OPT_OK;
    }
    int d = sp->d;
    size_t nb = (size_t)ceil(0.1 * (double)n);
    if (nb > 25) nb = 25;
    if (nb < 1) nb = 1;
    size_t na = n - nb + h->np, nt = n + h->np;
    size_t *idx = malloc(n * sizeof *idx);
    double *mem = malloc((nt + 1) * 10 * sizeof(double) + DX_OPT_MAX_CATS * 2 * sizeof(double));
    if (!idx || !mem) {
        free(idx);
        free(mem);
        return DX_OPT_E_NOMEM;
    }
    dx_opt_argsort(h->y, n, idx);
    double *vb = mem, *va = vb + (nt + 1), *scr = va + (nt + 1);
    mixture l = {0, scr + (nt + 1), scr + 2 * (nt + 1), scr + 3 * (nt + 1)};
    mixture g = {0, scr + 4 * (nt + 1), scr + 5 * (nt + 1), scr + 6 * (nt + 1)};
    double *pl = mem + (nt + 1) * 10, *pg = pl + DX_OPT_MAX_CATS;
    double cand[N_CAND * DX_OPT_MAX_DIMS], score[N_CAND] = {0};
    for (int j = 0; j < d; j++) {
        for (size_t i = 0; i < nb; i++) vb[i] = h->x[idx[i] * (size_t)d + j];
        for (size_t i = 0; i < n - nb; i++) va[i] = h->x[idx[nb + i] * (size_t)d + j];
        for (size_t i = 0; i < h->np; i++) va[n - nb + i] = h->px[i * (size_t)d + j];
        int k = sp->dims[j].ncat;
        if (!k) {
            mix_build(&l, vb, nb, scr);
            mix_build(&g, va, na, scr);
            for (int c = 0; c < N_CAND; c++) {
                double x = mix_sample(&l, &r);
                cand[c * d + j] = x;
                score[c] += mix_logpdf(&l, x) - mix_logpdf(&g, x);
            }
        } else {
            /* each trial is a kernel putting (1 + 1/k) / 2 on its category and
             * 1 / (2k) on each other one; plus a uniform prior kernel */
            for (int c = 0; c < k; c++) {
                pl[c] = (1.0 + 0.5 * (double)nb) / k;
                pg[c] = (1.0 + 0.5 * (double)na) / k;
            }
            for (size_t i = 0; i < nb; i++) pl[(int)vb[i]] += 0.5;
            for (size_t i = 0; i < na; i++) pg[(int)va[i]] += 0.5;
            double tl = (double)nb + 1.0, tg = (double)na + 1.0;
            for (int c = 0; c < N_CAND; c++) {
                double u = dx_rng_unif(&r) * tl, acc = 0;
                int pick = k - 1;
                for (int q = 0; q < k; q++) {
                    acc += pl[q];
                    if (u < acc) {
                        pick = q;
                        break;
                    }
                }
                cand[c * d + j] = pick;
                score[c] += log(pl[pick] / tl) - log(pg[pick] / tg);
            }
        }
    }
    int bc = 0;
    for (int c = 1; c < N_CAND; c++)
        if (score[c] > score[bc]) bc = c;
    memcpy(out, cand + bc * d, d * sizeof *out);
    free(idx);
    free(mem);
    return DX_OPT_OK;
}
