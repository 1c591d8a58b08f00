/* Stochastic gradient descent (heavy-ball momentum) and Adam driven by SPSA
 * gradient estimates. Iteration k evaluates the pair of trials 2k and 2k+1 at
 * x_k + c_k D_k and x_k - c_k D_k (D_k Rademacher, c_k = 0.1 / (k+1)^0.101);
 * once both are told, the gradient estimate g_j = (y+ - y-) / (x+_j - x-_j),
 * from the points actually evaluated, updates x. The momentum variant divides
 * the estimate by the running RMS of the estimates' norms (so the step does
 * not depend on the scale of the scores); Adam is scale-free by itself. Steps
 * shrink linearly to 10% over the budget. Categorical dimensions are relaxed
 * to [0, 1] like in CMA-ES. A trial whose pair is not yet complete is asked
 * from the latest state. A failed trial counts as the worst finite score plus
 * the score range, so the estimate points away from the failing region. */
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

/* A gradient estimate's component, at most 1e150 in magnitude: scores near the float range's ends make
 * (y+ - y-) / dx infinite, and a square of it (the norms, Adam's second moment) too, which turned the state
 * into NaN for the rest of the run. Both variants normalise their steps, so the clip keeps the direction. */
static double clip(double g) {
    if (isnan(g)) return 0.0;
    return g > 1e150 ? 1e150 : g < -1e150 ? -1e150 : g;
}

static double ck(uint64_t k) { return 0.1 / pow((double)k + 1.0, 0.101); }

static void delta(uint64_t seed, uint64_t k, int d, double *D) {
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_SPSA, k);
    for (int j = 0; j < d; j++) D[j] = (dx_rng_u64(&r) >> 63) ? 1.0 : -1.0;
}

int dx_opt_ask_spsa(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                    const dx_opt_conf *conf, int adam, double *out) {
    int d = sp->d;
    size_t n = h->n;
    double *mem = calloc(5 * (size_t)d + 2 * n + 1, sizeof(double));
    size_t *idx = malloc((n + 1) * sizeof *idx);
    if (!mem || !idx) {
        free(mem);
        free(idx);
        return DX_OPT_E_NOMEM;
    }
    double *x = mem, *v = x + d, *s = v + d, *D = s + d, *gr = D + d, *tids = gr + d;
    for (int j = 0; j < d; j++) x[j] = 0.5;
    for (size_t i = 0; i < n; i++) tids[i] = (double)h->tid[i];
    dx_opt_argsort(tids, n, idx);
    double budget = (double)conf->budget, gsq = 0, ymin = INFINITY, ymax = -INFINITY;
    for (size_t i = 0; i < n; i++)
        if (isfinite(h->y[i])) {
            ymin = fmin(ymin, h->y[i]);
            ymax = fmax(ymax, h->y[i]);
        }
    double yfail = isfinite(ymax) ? ymax + (ymax - ymin) + 1e-9 : NAN;
    uint64_t k = 0;
    /* walk the told trials by trial id, looking for complete pairs in order */
    size_t p = 0;
    for (;;) {
        while (p < n && h->tid[idx[p]] < 2 * k) p++;
        if (p + 1 >= n || h->tid[idx[p]] != 2 * k || h->tid[idx[p + 1]] != 2 * k + 1) break;
        size_t ip = idx[p], im = idx[p + 1];
        double yp = isfinite(h->y[ip]) ? h->y[ip] : yfail, ym = isfinite(h->y[im]) ? h->y[im] : yfail;
        double gn = 0;
        for (int j = 0; j < d; j++) {
            double dx = enc(sp, j, h->x[ip * (size_t)d + j]) - enc(sp, j, h->x[im * (size_t)d + j]);
            gr[j] = isfinite(yp) && isfinite(ym) && fabs(dx) > 1e-12 ? clip(isfinite(yp - ym) ? (yp - ym) / dx : (yp / 2 - ym / 2) / dx * 2) : 0.0;
            gn += gr[j] * gr[j];
        }
        double prog = fmin(1.0, 2.0 * (double)k / budget);
        double lr = 0.05 * (1.0 - 0.9 * prog);
        if (adam) {
            double b1 = 0.9, b2 = 0.999, t = (double)k + 1.0;
            for (int j = 0; j < d; j++) {
                v[j] = b1 * v[j] + (1 - b1) * gr[j];
                s[j] = b2 * s[j] + (1 - b2) * gr[j] * gr[j];
                double mh = v[j] / (1 - pow(b1, t)), sh = s[j] / (1 - pow(b2, t));
                x[j] = dx_opt_clamp01(x[j] - lr * mh / (sqrt(sh) + 1e-12));
            }
        } else {
            gsq = k == 0 ? gn : 0.9 * gsq + 0.1 * gn;
            double norm = gsq > 0 ? sqrt(gsq) : 1.0;
            for (int j = 0; j < d; j++) {
                v[j] = 0.9 * v[j] + gr[j] / norm;
                x[j] = dx_opt_clamp01(x[j] - lr * v[j]);
            }
        }
        k++;
        p += 2;
    }
    uint64_t kk = trial / 2;
    double sign = trial % 2 ? -1.0 : 1.0;
    delta(seed, kk, d, D);
    double c = ck(kk);
    for (int j = 0; j < d; j++) out[j] = dec(sp, j, x[j] + sign * c * D[j]);
    free(mem);
    free(idx);
    return DX_OPT_OK;
}
