/* Helpers of the optimizer kernels (see opt_util.h). */
#include "opt_util.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void dx_rng_init(dx_rng *r, uint64_t seed, uint64_t a, uint64_t b) {
    r->s = mix64(mix64(seed ^ 0x243f6a8885a308d3ull) ^ mix64(a + 0x13198a2e03707344ull) ^
                 mix64(b * 0xa4093822299f31d1ull + 0x082efa98ec4e6c89ull));
}

/* splitmix64 */
uint64_t dx_rng_u64(dx_rng *r) {
    r->s += 0x9e3779b97f4a7c15ull;
    return mix64(r->s);
}

double dx_rng_unif(dx_rng *r) { return (double)(dx_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0); }

double dx_rng_normal(dx_rng *r) {
    /* Box-Muller, one value per call (keeps the stream position simple) */
    double u1 = dx_rng_unif(r), u2 = dx_rng_unif(r);
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint64_t dx_rng_below(dx_rng *r, uint64_t n) {
    if (n <= 1) return 0;
    /* rejection for an unbiased result */
    uint64_t lim = UINT64_MAX - UINT64_MAX % n;
    uint64_t v;
    do v = dx_rng_u64(r);
    while (v >= lim);
    return v % n;
}

double dx_opt_phi(double z) { return 0.3989422804014327 * exp(-0.5 * z * z); }
double dx_opt_Phi(double z) { return 0.5 * erfc(-z / 1.4142135623730951); }
double dx_opt_clamp01(double v) { return v < 0.0 ? 0.0 : (v > 1.0 ? 1.0 : v); }

void dx_opt_random_point(const dx_opt_space *sp, dx_rng *r, double *out) {
    for (int j = 0; j < sp->d; j++)
        out[j] = sp->dims[j].ncat ? (double)dx_rng_below(r, (uint64_t)sp->dims[j].ncat) : dx_rng_unif(r);
}

void dx_opt_repair(const dx_opt_space *sp, double *p) {
    for (int j = 0; j < sp->d; j++) {
        int k = sp->dims[j].ncat;
        if (!k) {
            p[j] = isnan(p[j]) ? 0.5 : dx_opt_clamp01(p[j]);
        } else {
            double v = isnan(p[j]) ? 0.0 : floor(p[j] + 0.5);
            p[j] = v < 0 ? 0 : (v > k - 1 ? k - 1 : v);
        }
    }
}

/* merge sort of indices by y (stable, no qsort context needed) */
static void msort(const double *y, size_t *idx, size_t *tmp, size_t n) {
    if (n < 2) return;
    size_t h = n / 2;
    msort(y, idx, tmp, h);
    msort(y, idx + h, tmp, n - h);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n) tmp[k++] = (y[idx[j]] < y[idx[i]]) ? idx[j++] : idx[i++];
    while (i < h) tmp[k++] = idx[i++];
    while (j < n) tmp[k++] = idx[j++];
    memcpy(idx, tmp, n * sizeof *idx);
}

void dx_opt_argsort(const double *y, size_t n, size_t *idx) {
    for (size_t i = 0; i < n; i++) idx[i] = i;
    if (n < 2) return;
    size_t *tmp = malloc(n * sizeof *tmp);
    if (!tmp) { /* insertion sort fallback: still correct */
        for (size_t i = 1; i < n; i++)
            for (size_t j = i; j > 0 && y[idx[j]] < y[idx[j - 1]]; j--) {
                size_t t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t;
            }
        return;
    }
    msort(y, idx, tmp, n);
    free(tmp);
}

int dx_opt_cholesky(double *a, int n) {
    for (int j = 0; j < n; j++) {
        double s = a[j * n + j];
        for (int k = 0; k < j; k++) s -= a[j * n + k] * a[j * n + k];
        if (!(s > 0.0)) return -1;
        double d = sqrt(s);
        a[j * n + j] = d;
        /* four rows at a time: four independent running sums (each in the
         * same order as alone), so that they pipeline */
        const double *aj = a + (size_t)j * n;
        int i = j + 1;
        for (; i + 3 < n; i += 4) {
            double *a0 = a + (size_t)i * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
            double t0 = a0[j], t1 = a1[j], t2 = a2[j], t3 = a3[j];
            for (int k = 0; k < j; k++) {
                double v = aj[k];
                t0 -= a0[k] * v;
                t1 -= a1[k] * v;
                t2 -= a2[k] * v;
                t3 -= a3[k] * v;
            }
            a0[j] = t0 / d;
            a1[j] = t1 / d;
            a2[j] = t2 / d;
            a3[j] = t3 / d;
        }
        for (; i < n; i++) {
            double t = a[i * n + j];
            for (int k = 0; k < j; k++) t -= a[i * n + k] * aj[k];
            a[i * n + j] = t / d;
        }
        for (int i = 0; i < j; i++) a[i * n + j] = 0.0;
    }
    return 0;
}

void dx_opt_chol_fwd(const double *l, int n, double *b) {
    for (int i = 0; i < n; i++) {
        double s = b[i];
        for (int k = 0; k < i; k++) s -= l[i * n + k] * b[k];
        b[i] = s / l[i * n + i];
    }
}

void dx_opt_chol_bwd(const double *l, int n, double *b) {
    for (int i = n - 1; i >= 0; i--) {
        double s = b[i];
        for (int k = i + 1; k < n; k++) s -= l[k * n + i] * b[k];
        b[i] = s / l[i * n + i];
    }
}

void dx_opt_eigen_sym(double *a, int n, double *w, double *v) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[i * n + j] = i == j;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, tot = 0.0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                tot += a[i * n + j] * a[i * n + j];
                if (i != j) off += a[i * n + j] * a[i * n + j];
            }
        if (off <= 1e-30 * tot || off == 0.0) break;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (fabs(apq) < 1e-300) continue;
                double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (int i = 0; i < n; i++) w[i] = a[i * n + i];
}
