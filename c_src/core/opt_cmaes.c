/* CMA-ES (Hansen's (mu/mu_w, lambda) with rank-one and rank-mu updates and
 * cumulative step-size adaptation), replayed from the told trials: they form
 * generations of lambda in the order they were told; the state after every
 * complete generation samples the next candidates. Categorical dimensions are
 * relaxed to [0, 1] (category k is the centre of the k-th of ncat slices). */
#include "opt_internal.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static double enc(const dx_opt_space *sp, int j, double v) {
    int k = sp->dims[j].ncat;
    return k ? (v + 0.5) / k : v;
}

static double dec(const dx_opt_space *sp, int j, double u) {
    int k = sp->dims[j].ncat;
    if (!k) return dx_opt_clamp01(u);
    double c = floor(dx_opt_clamp01(u) * k);
    return c > k - 1 ? k - 1 : c;
}

size_t dx_opt_cma_state_len(int d) { return 2 + 3 * (size_t)d + (size_t)d * d; }

/* The sampling basis of covariance C: eigenvectors B, the square roots of its
 * eigenvalues dd, and C^-1/2 (work: n x n scratch). */
static void eigen(int n, const double *C, double *work, double *dd, double *B, double *invsqrt) {
    memcpy(work, C, (size_t)n * n * sizeof *C);
    dx_opt_eigen_sym(work, n, dd, B);
    for (int j = 0; j < n; j++) dd[j] = sqrt(fmax(dd[j], 1e-20));
    for (int a = 0; a < n; a++)
        for (int b = 0; b < n; b++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += B[a * n + k] * B[b * n + k] / dd[k];
            invsqrt[a * n + b] = s;
        }
}

/* Loads conf's state when it fits (this space's size, at most the complete
 * generations of this history, finite, a symmetric matrix and a step size
 * the replay can reach); returns the generations it covers, 0 otherwise. */
static size_t resume(const dx_opt_conf *conf, int n, size_t gens, double *sigma, double *m, double *ps, double *pc,
                     double *C) {
    const double *in = conf->cma_in;
    size_t len = dx_opt_cma_state_len(n);
    if (!in || conf->cma_in_len != len) return 0;
    for (size_t i = 0; i < len; i++)
        if (!isfinite(in[i])) return 0;
    double g = in[0];
    if (!(g >= 1 && g <= (double)gens && g == floor(g)) || !(in[1] >= 1e-12 && in[1] <= 1.0)) return 0;
    const double *cin = in + 2 + 3 * n;
    for (int a = 0; a < n; a++)
        for (int b = 0; b < a; b++)
            if (cin[a * n + b] != cin[b * n + a]) return 0;
    *sigma = in[1];
    memcpy(m, in + 2, n * sizeof *m);
    memcpy(ps, in + 2 + n, n * sizeof *ps);
    memcpy(pc, in + 2 + 2 * n, n * sizeof *pc);
    memcpy(C, cin, (size_t)n * n * sizeof *C);
    return (size_t)g;
}

int dx_opt_ask_cmaes(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                     const dx_opt_conf *conf, double *out) {
    int n = sp->d;
    int lambda = 4 + (int)floor(3.0 * log((double)n)), mu = lambda / 2;
    size_t nn = (size_t)n * n;
    double *buf = calloc(6 * (size_t)n + 4 * nn + (size_t)mu + (size_t)lambda * n, sizeof(double));
    size_t *idx = malloc((size_t)lambda * sizeof *idx);
    if (!buf || !idx) {
        free(buf);
        free(idx);
        return DX_OPT_E_NOMEM;
    }
    double *m = buf, *ps = m + n, *pc = ps + n, *dd = pc + n, *tmp = dd + n, *mold = tmp + n;
    double *C = mold + n, *B = C + nn, *invsqrt = B + nn, *work = invsqrt + nn, *w = work + nn, *ys = w + mu;
    double wsum = 0, w2 = 0;
    for (int i = 0; i < mu; i++) {
        w[i] = log(mu + 0.5) - log(i + 1.0);
        wsum += w[i];
    }
    for (int i = 0; i < mu; i++) {
        w[i] /= wsum;
        w2 += w[i] * w[i];
    }
    double mueff = 1.0 / w2;
    double cc = (4.0 + mueff / n) / (n + 4.0 + 2.0 * mueff / n);
    double cs = (mueff + 2.0) / (n + mueff + 5.0);
    double c1 = 2.0 / ((n + 1.3) * (n + 1.3) + mueff);
    double cmu = fmin(1.0 - c1, 2.0 * (mueff - 2.0 + 1.0 / mueff) / ((n + 2.0) * (n + 2.0) + mueff));
    double damps = 1.0 + 2.0 * fmax(0.0, sqrt((mueff - 1.0) / (n + 1.0)) - 1.0) + cs;
    double chin = sqrt((double)n) * (1.0 - 1.0 / (4.0 * n) + 1.0 / (21.0 * n * n));
    double sigma = 0.3;
    for (int i = 0; i < n; i++) {
        m[i] = 0.5;
        dd[i] = 1.0;
        C[i * n + i] = B[i * n + i] = invsqrt[i * n + i] = 1.0;
    }
    size_t gens = h->n / (size_t)lambda, g0 = resume(conf, n, gens, &sigma, m, ps, pc, C);
    if (g0 > 0) eigen(n, C, work, dd, B, invsqrt);
    for (size_t g = g0; g < gens; g++) {
        const double *yv = h->y + g * lambda;
        dx_opt_argsort(yv, (size_t)lambda, idx);
        for (int k = 0; k < lambda; k++)
            for (int j = 0; j < n; j++) ys[k * n + j] = enc(sp, j, h->x[(g * lambda + k) * (size_t)n + j]);
        memcpy(mold, m, n * sizeof *m);
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int i = 0; i < mu; i++) s += w[i] * ys[idx[i] * n + j];
            m[j] = s;
        }
        /* ps */
        for (int j = 0; j < n; j++) tmp[j] = (m[j] - mold[j]) / sigma;
        double psn = 0;
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += invsqrt[j * n + k] * tmp[k];
            ps[j] = (1 - cs) * ps[j] + sqrt(cs * (2 - cs) * mueff) * s;
            psn += ps[j] * ps[j];
        }
        psn = sqrt(psn);
        int hsig = psn / sqrt(1.0 - pow(1.0 - cs, 2.0 * (g + 1))) / chin < 1.4 + 2.0 / (n + 1.0);
        for (int j = 0; j < n; j++) pc[j] = (1 - cc) * pc[j] + (hsig ? sqrt(cc * (2 - cc) * mueff) * tmp[j] : 0.0);
        for (int a = 0; a < n; a++)
            for (int b = 0; b <= a; b++) {
                double rmu = 0;
                for (int i = 0; i < mu; i++) {
                    const double *yi = ys + idx[i] * n;
                    rmu += w[i] * (yi[a] - mold[a]) * (yi[b] - mold[b]) / (sigma * sigma);
                }
                double v = (1 - c1 - cmu) * C[a * n + b] +
                           c1 * (pc[a] * pc[b] + (hsig ? 0.0 : cc * (2 - cc) * C[a * n + b])) + cmu * rmu;
                C[a * n + b] = C[b * n + a] = v;
            }
        sigma *= exp((cs / damps) * (psn / chin - 1.0));
        if (sigma > 1.0) sigma = 1.0;
        if (sigma < 1e-12) sigma = 1e-12;
        eigen(n, C, work, dd, B, invsqrt);
    }
    if (conf->cma_out) {
        double *o = conf->cma_out;
        o[0] = (double)gens;
        o[1] = sigma;
        memcpy(o + 2, m, n * sizeof *m);
        memcpy(o + 2 + n, ps, n * sizeof *ps);
        memcpy(o + 2 + 2 * n, pc, n * sizeof *pc);
        memcpy(o + 2 + 3 * n, C, nn * sizeof *C);
    }
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_CMA, trial);
    for (int attempt = 0; attempt < 20; attempt++) {
        for (int k = 0; k < n; k++) tmp[k] = dd[k] * dx_rng_normal(&r);
        int inside = 1;
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += B[j * n + k] * tmp[k];
            mold[j] = m[j] + sigma * s;
            if (mold[j] < 0.0 || mold[j] > 1.0) inside = 0;
        }
        if (inside) break;
    }
    for (int j = 0; j < n; j++) out[j] = dec(sp, j, mold[j]);
    free(buf);
    free(idx);
    return DX_OPT_OK;
}
