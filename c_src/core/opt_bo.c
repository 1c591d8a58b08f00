/* Bayesian optimisation: a Gaussian process with a Matérn 5/2 kernel (one
 * length scale per dimension; categorical dimensions enter the distance as
 * 2*[a != b], i.e. a one-hot encoding, which keeps the kernel positive
 * definite), signal and noise variances, all fitted by maximising the log
 * marginal likelihood (projected gradient descent with backtracking on the log
 * parameters, inside bounds) on standardised scores; the candidate maximising
 * expected improvement over random and local candidates is proposed. The
 * first max(5, min(10, 2d + 2)) trials are uniformly random. The fit starts
 * from the previous ask's hyperparameters when the caller passes them
 * (dx_opt_conf.warm: 3 steps instead of 12; every 10th ask refits from
 * scratch, on at most 60 observations evenly spaced in time, then takes the
 * 3 warm steps on all of them, so that the restart costs little more than a
 * warm ask). dx_opt_conf.fitted[0] is NaN when nothing was fitted. A failed trial
 * counts as the worst finite score; pending trials (asked, not told) as the
 * best one ("constant liar"), so that parallel asks spread out. Costs O(n^3) per
 * ask: callers run it on a dirty scheduler. */
#include "opt_internal.h"
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OBS 300
#define N_RANDOM 400
#define N_LOCAL 300
#define LOCAL_BATCH 64
#define N_ITER 12
#define N_WARM_ITER 3
#define FIT_SUBSET 60
#define N_LINE 5
#define SQ5 2.23606797749979

typedef struct {
    const dx_opt_space *sp;
    int n, d, np; /* np = d + 2 parameters */
    const double *x; /* n x d */
    const double *y; /* standardised */
    double *K, *L, *alpha, *Kinv, *tmp, *K2;
    double *R, *E; /* per pair of the last K: the scaled distance r and exp(-sqrt(5) r) */
    double *xs; /* n x d: x with numeric coordinates divided by the length scales of the last K */
    double inv[DX_OPT_MAX_DIMS]; /* those 1 / length scale (numeric dimensions) */
    double cw[DX_OPT_MAX_DIMS]; /* 2 / length scale^2 on categorical dimensions, 0 on numeric ones */
    int ncat; /* number of categorical dimensions */
    uint64_t work; /* multiply-adds of the dense linear algebra so far (dx_opt_conf.work) */
} gp;

/* Sets the length scales exp(th[0 .. d-1]) and scales the observations by them. */
static void set_scales(gp *g, const double *th) {
    for (int j = 0; j < g->d; j++) {
        double ell = exp(th[j]);
        int cat = g->sp->dims[j].ncat != 0;
        g->inv[j] = cat ? 1.0 : 1.0 / ell;
        g->cw[j] = cat ? 2.0 / (ell * ell) : 0.0;
    }
    for (int i = 0; i < g->n * g->d; i++) g->xs[i] = g->x[i] * g->inv[i % g->d];
}

/* a point in scaled coordinates (categories left as they are) */
static void scale_point(const gp *g, const double *p, double *out) {
    for (int j = 0; j < g->d; j++) out[j] = p[j] * g->inv[j];
}

/* squared scaled distance of two scaled points, and per-dimension parts into
 * parts (if not NULL); categorical dimensions count 2 / length scale^2 when
 * the categories differ (one-hot encoding) */
static double dist2(const gp *g, const double *a, const double *b, double *parts) {
    double r2 = 0;
    if (!g->ncat && !parts) {
        for (int j = 0; j < g->d; j++) r2 += (a[j] - b[j]) * (a[j] - b[j]);
        return r2;
    }
    for (int j = 0; j < g->d; j++) {
        double q = g->cw[j] != 0.0 ? (a[j] != b[j] ? g->cw[j] : 0.0) : (a[j] - b[j]) * (a[j] - b[j]);
        if (parts) parts[j] = q;
        r2 += q;
    }
    return r2;
}

static double matern(double r2, double sf2) {
    double r = sqrt(r2);
    return sf2 * (1.0 + SQ5 * r + 5.0 / 3.0 * r2) * exp(-SQ5 * r);
}

static void nlml_grad(gp *g, const double *th, double *grad);

/* Negative log marginal likelihood at th (log params); gradient into grad if
 * not NULL. Leaves K, L, alpha, R and E of th. Returns INFINITY if not SPD. */
static double nlml(gp *g, const double *th, double *grad) {
    int n = g->n, d = g->d;
    double sf2 = exp(th[d]), sn2 = exp(th[d + 1]);
    set_scales(g, th);
    for (int i = 0; i < n; i++)
        for (int k = 0; k <= i; k++) {
            /* matern(), keeping r and the exponential for the gradient */
            double r2 = dist2(g, g->xs + i * d, g->xs + k * d, NULL);
            double r = sqrt(r2), e = exp(-SQ5 * r);
            double v = sf2 * (1.0 + SQ5 * r + 5.0 / 3.0 * r2) * e;
            g->K[i * n + k] = g->K[k * n + i] = v;
            g->R[i * n + k] = r;
            g->E[i * n + k] = e;
        }
    memcpy(g->L, g->K, (size_t)n * n * sizeof *g->L);
    g->work += (uint64_t)n * n * n / 6;
    for (int i = 0; i < n; i++) g->L[i * n + i] += sn2 + 1e-8;
    if (dx_opt_cholesky(g->L, n)) return INFINITY;
    memcpy(g->alpha, g->y, n * sizeof *g->alpha);
    dx_opt_chol_fwd(g->L, n, g->alpha);
    double quad = 0, logdet = 0;
    for (int i = 0; i < n; i++) {
        quad += g->alpha[i] * g->alpha[i];
        logdet += log(g->L[i * n + i]);
    }
    dx_opt_chol_bwd(g->L, n, g->alpha);
    double f = 0.5 * quad + logdet + 0.5 * n * 1.8378770664093453;
    if (grad) nlml_grad(g, th, grad);
    return f;
}

/* The gradient of the NLML at th, from the K, L, alpha, R, E and xs that
 * nlml() left for the same th. */
static void nlml_grad(gp *g, const double *th, double *grad) {
    int n = g->n, d = g->d;
    double sf2 = exp(th[d]), sn2 = exp(th[d + 1]);
    /* Kinv = L^-T L^-1: first M = L^-1 (lower triangular), stored
     * transposed (T[c][k] = M[k][c]) so that every sum below runs over
     * contiguous memory; row by row, M[i][c] = -(sum over c <= k < i of
     * L[i][k] M[k][c]) / L[i][i]... */
    double *T = g->K2;
    g->work += (uint64_t)n * n * n / 3;
    for (int i = 0; i < n; i++) {
        const double *Li = g->L + (size_t)i * n;
        int c = 0;
        /* four columns at a time: each sum starts at its own column, then
         * the four run together (each in the same order as alone) */
        for (; c + 3 < i; c += 4) {
            const double *T0 = T + (size_t)c * n, *T1 = T0 + n, *T2 = T1 + n, *T3 = T2 + n;
            double t0 = 0, t1 = 0, t2 = 0, t3 = 0;
            t0 -= Li[c] * T0[c];
            t0 -= Li[c + 1] * T0[c + 1];
            t1 -= Li[c + 1] * T1[c + 1];
            t0 -= Li[c + 2] * T0[c + 2];
            t1 -= Li[c + 2] * T1[c + 2];
            t2 -= Li[c + 2] * T2[c + 2];
            for (int k = c + 3; k < i; k++) {
                double l = Li[k];
                t0 -= l * T0[k];
                t1 -= l * T1[k];
                t2 -= l * T2[k];
                t3 -= l * T3[k];
            }
            T[(size_t)c * n + i] = t0 / Li[i];
            T[(size_t)(c + 1) * n + i] = t1 / Li[i];
            T[(size_t)(c + 2) * n + i] = t2 / Li[i];
            T[(size_t)(c + 3) * n + i] = t3 / Li[i];
        }
        for (; c < i; c++) {
            const double *Tc = T + (size_t)c * n;
            double t = 0;
            for (int k = c; k < i; k++) t -= Li[k] * Tc[k];
            T[(size_t)c * n + i] = t / Li[i];
        }
        T[(size_t)i * n + i] = 1.0 / Li[i];
    }
    /* ...then Kinv[i][k] = sum over r >= i >= k of M[r][i] M[r][k], four k
     * at a time (four independent sums, each in the same order as alone) */
    for (int i = 0; i < n; i++) {
        const double *Ti = T + (size_t)i * n;
        int k = 0;
        for (; k + 3 <= i; k += 4) {
            const double *T0 = T + (size_t)k * n, *T1 = T0 + n, *T2 = T1 + n, *T3 = T2 + n;
            double t0 = 0, t1 = 0, t2 = 0, t3 = 0;
            for (int r = i; r < n; r++) {
                double v = Ti[r];
                t0 += v * T0[r];
                t1 += v * T1[r];
                t2 += v * T2[r];
                t3 += v * T3[r];
            }
            g->Kinv[i * n + k] = g->Kinv[k * n + i] = t0;
            g->Kinv[i * n + k + 1] = g->Kinv[(k + 1) * n + i] = t1;
            g->Kinv[i * n + k + 2] = g->Kinv[(k + 2) * n + i] = t2;
            g->Kinv[i * n + k + 3] = g->Kinv[(k + 3) * n + i] = t3;
        }
        for (; k <= i; k++) {
            const double *Tk = T + (size_t)k * n;
            double t = 0;
            for (int r = i; r < n; r++) t += Ti[r] * Tk[r];
            g->Kinv[i * n + k] = g->Kinv[k * n + i] = t;
        }
    }
    /* dNLML/dth = 0.5 tr((Kinv - alpha alpha^T) dK/dth) */
    for (int p = 0; p < g->np; p++) grad[p] = 0;
    double parts[DX_OPT_MAX_DIMS];
    for (int i = 0; i < n; i++)
        for (int k = 0; k <= i; k++) {
            double wgt = g->Kinv[i * n + k] - g->alpha[i] * g->alpha[k];
            double mult = i == k ? 0.5 : 1.0; /* symmetric: off-diagonal counted twice */
            (void)dist2(g, g->xs + i * d, g->xs + k * d, parts);
            double r = g->R[i * n + k];
            double base = sf2 * 5.0 / 3.0 * (1.0 + SQ5 * r) * g->E[i * n + k];
            for (int j = 0; j < d; j++) grad[j] += mult * wgt * base * parts[j];
            grad[d] += mult * wgt * g->K[i * n + k];
            if (i == k) grad[d + 1] += mult * wgt * sn2;
        }
}

static void clamp_th(int d, double *th) {
    for (int j = 0; j < d; j++) th[j] = fmin(log(20.0), fmax(log(0.01), th[j]));
    th[d] = fmin(log(20.0), fmax(log(0.05), th[d]));
    th[d + 1] = fmin(log(0.5), fmax(log(1e-6), th[d + 1]));
}

static void fit(gp *g, double *th, int iters) {
    int np = g->np;
    double grad[DX_OPT_MAX_DIMS + 2], cand[DX_OPT_MAX_DIMS + 2];
    clamp_th(g->d, th);
    double f = nlml(g, th, grad), step = 0.5;
    int at_th = 1; /* the buffers hold th's factorisation */
    for (int it = 0; it < iters && isfinite(f); it++) {
        double gn = 0;
        for (int p = 0; p < np; p++) gn += grad[p] * grad[p];
        gn = sqrt(gn);
        if (gn < 1e-6) break;
        int moved = 0;
        for (int ls = 0; ls < N_LINE; ls++) {
            for (int p = 0; p < np; p++) cand[p] = th[p] - step * grad[p] / gn;
            clamp_th(g->d, cand);
            double fc = nlml(g, cand, NULL);
            at_th = 0;
            if (fc < f - 1e-9) {
                /* the buffers hold cand's factorisation: its gradient from
                 * them, without building K again */
                memcpy(th, cand, np * sizeof *th);
                f = fc;
                nlml_grad(g, th, grad);
                at_th = 1;
                step *= 1.5;
                moved = 1;
                break;
            }
            step *= 0.4;
        }
        if (!moved) break;
    }
    if (!isfinite(at_th ? f : nlml(g, th, NULL))) { /* fall back to a well-conditioned default */
        for (int j = 0; j < g->d; j++) th[j] = log(0.5);
        th[g->d] = 0.0;
        th[g->d + 1] = log(0.1);
        nlml(g, th, NULL);
    }
}

/* two doubles operated on at once (SSE2 on x86-64, NEON on aarch64; each
 * lane computes exactly what scalar code would) */
typedef double v2d __attribute__((vector_size(16)));
static inline v2d ld2(const double *p) {
    v2d v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void st2(double *p, v2d v) { memcpy(p, &v, sizeof v); }

/* EI (for minimisation) under the fitted GP (L, alpha of th) of the B
 * candidates C (B x d) at once, into e. The triangular solves of the
 * candidates are interleaved (V: n x B, candidate-major innermost), so that
 * they pipeline and vectorise instead of each waiting on its own running
 * sum. */
static void ei_batch(gp *g, const double *th, const double *C, int B, double fbest, double *V, double *mu,
                     double *e) {
    int n = g->n, d = g->d;
    double sf2 = exp(th[d]);
    for (int b = 0; b < B; b++) {
        double cs[DX_OPT_MAX_DIMS];
        scale_point(g, C + (size_t)b * d, cs);
        mu[b] = 0;
        for (int i = 0; i < n; i++) {
            double v = matern(dist2(g, cs, g->xs + i * d, NULL), sf2);
            V[(size_t)i * B + b] = v;
            mu[b] += v * g->alpha[i];
        }
    }
    g->work += (uint64_t)B * n * (n - 1) / 2;
    /* forward substitution, eight candidates at a time held in registers
     * (each candidate's sum over k in the same order as alone: a store per
     * candidate and row instead of one per term) */
    for (int i = 0; i < n; i++) {
        double *Vi = V + (size_t)i * B;
        const double *Li = g->L + (size_t)i * n;
        int b = 0;
        for (; b + 8 <= B; b += 8) {
            v2d t0 = ld2(Vi + b), t1 = ld2(Vi + b + 2), t2 = ld2(Vi + b + 4), t3 = ld2(Vi + b + 6);
            const double *Vk = V + b;
            for (int k = 0; k < i; k++, Vk += B) {
                v2d l = {Li[k], Li[k]};
                t0 -= l * ld2(Vk);
                t1 -= l * ld2(Vk + 2);
                t2 -= l * ld2(Vk + 4);
                t3 -= l * ld2(Vk + 6);
            }
            v2d dg = {Li[i], Li[i]};
            st2(Vi + b, t0 / dg);
            st2(Vi + b + 2, t1 / dg);
            st2(Vi + b + 4, t2 / dg);
            st2(Vi + b + 6, t3 / dg);
        }
        for (; b < B; b++) {
            double t = Vi[b];
            const double *Vk = V + b;
            for (int k = 0; k < i; k++, Vk += B) t -= Li[k] * Vk[0];
            Vi[b] = t / Li[i];
        }
    }
    for (int b = 0; b < B; b++) e[b] = sf2;
    for (int i = 0; i < n; i++) {
        const double *Vi = V + (size_t)i * B;
        for (int b = 0; b < B; b++) e[b] -= Vi[b] * Vi[b];
    }
    for (int b = 0; b < B; b++) {
        double s = sqrt(fmax(e[b], 1e-12));
        double z = (fbest - mu[b]) / s;
        e[b] = (fbest - mu[b]) * dx_opt_Phi(z) + s * dx_opt_phi(z);
    }
}

/* The asks' scratch memory (up to about 6 MB at MAX_OBS observations) is
 * kept in a pool from one ask to the next: at most WS_KEEP blocks, one per
 * ask running at the same time, grown by a quarter when too small, freed by
 * dx_opt_release_scratch (the NIF's unload). Allocated afresh on every ask,
 * it cost more than the ask's arithmetic inside the Erlang VM: the VM sets
 * glibc's malloc thresholds, which turns off its dynamic mmap threshold, so
 * every block of 128 KB or more was a new mapping whose pages fault on first
 * touch (3.1 -> 5.8 ms an ask at 100 observations, measured with the same
 * malloc setting outside the VM). */
#define WS_KEEP 16
typedef struct ws_block {
    struct ws_block *next;
    size_t cap; /* doubles in d */
    double d[];
} ws_block;
static pthread_mutex_t ws_lock = PTHREAD_MUTEX_INITIALIZER;
static ws_block *ws_pool;
static int ws_kept;

/* A block of at least n doubles (contents undefined); NULL when out of memory. */
static ws_block *ws_get(size_t n) {
    pthread_mutex_lock(&ws_lock);
    ws_block *b = ws_pool, **pp = &ws_pool;
    for (ws_block *q = ws_pool, **qq = &ws_pool; q; qq = &q->next, q = q->next)
        if (q->cap >= n) { /* the first one large enough, else the first one */
            b = q;
            pp = qq;
            break;
        }
    if (b) {
        *pp = b->next;
        ws_kept--;
    }
    pthread_mutex_unlock(&ws_lock);
    if (b && b->cap >= n) return b;
    size_t cap = b && b->cap + b->cap / 4 > n ? b->cap + b->cap / 4 : n;
    ws_block *nb = realloc(b, sizeof *nb + cap * sizeof(double));
    if (!nb) {
        free(b);
        return NULL;
    }
    nb->cap = cap;
    return nb;
}

/* Back to the pool (or freed when WS_KEEP blocks are kept already). */
static void ws_put(ws_block *b) {
    pthread_mutex_lock(&ws_lock);
    if (ws_kept < WS_KEEP) {
        b->next = ws_pool;
        ws_pool = b;
        ws_kept++;
        b = NULL;
    }
    pthread_mutex_unlock(&ws_lock);
    free(b);
}

void dx_opt_release_scratch(void) {
    pthread_mutex_lock(&ws_lock);
    ws_block *b = ws_pool;
    ws_pool = NULL;
    ws_kept = 0;
    pthread_mutex_unlock(&ws_lock);
    while (b) {
        ws_block *nx = b->next;
        free(b);
        b = nx;
    }
}

int dx_opt_ask_bo(const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
                  const dx_opt_conf *conf, double *out) {
    int d = sp->d;
    int ninit = 2 * d + 2;
    ninit = ninit < 5 ? 5 : (ninit > 10 ? 10 : ninit);
    dx_rng r;
    dx_rng_init(&r, seed, DX_S_BO, trial);
    if (conf->fitted) conf->fitted[0] = NAN; /* nothing fitted (yet) */
    size_t nf = 0;
    for (size_t i = 0; i < h->n; i++) nf += isfinite(h->y[i]) != 0;
    if (h->n < (size_t)ninit || nf < 2) {
        dx_opt_random_point(sp, &r, out);
        return DX_OPT_OK;
    }
    size_t npend = h->np > 64 ? 64 : h->np;
    size_t ntold = h->n > MAX_OBS - npend ? MAX_OBS - npend : h->n; /* the most recent */
    int n = (int)(ntold + npend);
    size_t nn = (size_t)n * n;
    size_t nl = (size_t)N_LOCAL * d;
    size_t n_mem = 2 * (size_t)n * d + 4 * (size_t)n + 6 * nn + 2 * (size_t)d + FIT_SUBSET * ((size_t)d + 1);
    size_t n_rc = (size_t)N_RANDOM * d + (size_t)n * N_RANDOM + 2 * (size_t)N_RANDOM;
    size_t n_lz = nl + (size_t)LOCAL_BATCH * d + (size_t)n * LOCAL_BATCH + 2 * (size_t)LOCAL_BATCH;
    size_t n_lk = (nl + sizeof(double) - 1) / sizeof(double);
    ws_block *wsb = ws_get(n_mem + n_rc + n_lz + n_lk);
    if (!wsb) return DX_OPT_E_NOMEM;
    double *mem = wsb->d;
    double *X = mem, *Y = X + (size_t)n * d, *alpha = Y + n, *tmp = alpha + n, *K = tmp + n, *L = K + nn,
           *Kinv = L + nn, *K2 = Kinv + nn, *R = K2 + nn, *E = R + nn, *cand = E + nn, *bestc = cand + d,
           *XS = bestc + d, *SX = XS + (size_t)n * d, *SY = SX + (size_t)FIT_SUBSET * d;
    double ymin = INFINITY, ymax = -INFINITY;
    for (size_t i = h->n - ntold; i < h->n; i++)
        if (isfinite(h->y[i])) {
            ymin = fmin(ymin, h->y[i]);
            ymax = fmax(ymax, h->y[i]);
        }
    if (!isfinite(ymin)) ymin = ymax = 0.0;
    for (size_t i = 0; i < ntold; i++) {
        size_t src = h->n - ntold + i;
        memcpy(X + i * d, h->x + src * (size_t)d, d * sizeof *X);
        Y[i] = isfinite(h->y[src]) ? h->y[src] : ymax;
    }
    for (size_t i = 0; i < npend; i++) {
        memcpy(X + (ntold + i) * d, h->px + i * (size_t)d, d * sizeof *X);
        Y[ntold + i] = ymin;
    }
    /* scores near the float range's ends (|y| > 1e150) are scaled down first: their sum, differences and
     * squares would overflow, making every standardised Y and expected improvement NaN */
    double big = 0;
    for (int i = 0; i < n; i++) big = fmax(big, fabs(Y[i]));
    double scale = big > 1e150 ? big : 1.0;
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++) mean += Y[i] / scale;
    mean /= n;
    for (int i = 0; i < n; i++) var += (Y[i] / scale - mean) * (Y[i] / scale - mean);
    double sd = sqrt(var / n);
    if (!(sd > 0)) sd = 1.0;
    double fbest = INFINITY;
    int ibest = 0;
    for (int i = 0; i < n; i++) {
        Y[i] = (Y[i] / scale - mean) / sd;
        if (Y[i] < fbest) {
            fbest = Y[i];
            ibest = i;
        }
    }
    gp g = {sp, n, d, d + 2, X, Y, K, L, alpha, Kinv, tmp, K2, R, E, XS, {0}, {0}, 0, 0};
    for (int j = 0; j < d; j++) g.ncat += sp->dims[j].ncat != 0;
    double th[DX_OPT_MAX_DIMS + 2];
    /* every 10th ask refits from scratch, so a warm chain cannot stay stuck */
    int warm = conf->warm != NULL && h->n % 10 != 0;
    for (int p = 0; p < d + 2 && warm; p++) warm = isfinite(conf->warm[p]);
    if (warm) {
        memcpy(th, conf->warm, (d + 2) * sizeof *th);
    } else {
        for (int j = 0; j < d; j++) th[j] = log(0.3);
        th[d] = 0.0;
        th[d + 1] = log(1e-3);
    }
    if (warm || n <= FIT_SUBSET) {
        fit(&g, th, warm ? N_WARM_ITER : N_ITER);
    } else {
        /* from scratch on FIT_SUBSET observations evenly spaced in time (the
         * most recent included; an eighth of the O(n^3) work at 100), then
         * the warm steps on all of them */
        gp s = g;
        s.n = FIT_SUBSET;
        s.x = SX;
        s.y = SY;
        for (int i = 0; i < FIT_SUBSET; i++) {
            size_t src = (size_t)n - 1 - (size_t)(FIT_SUBSET - 1 - i) * (size_t)n / FIT_SUBSET;
            memcpy(SX + (size_t)i * d, X + src * d, d * sizeof *SX);
            SY[i] = Y[src];
        }
        fit(&s, th, N_ITER);
        g.work = s.work;
        fit(&g, th, N_WARM_ITER);
    }
    if (conf->fitted) memcpy(conf->fitted, th, (d + 2) * sizeof *th);
    double best = -1.0;
    /* the random candidates at once (their EI does not depend on each other) */
    double *RC = mem + n_mem;
    double *RV = RC + (size_t)N_RANDOM * d, *Rmu = RV + (size_t)n * N_RANDOM, *Re = Rmu + N_RANDOM;
    for (int c = 0; c < N_RANDOM; c++) dx_opt_random_point(sp, &r, RC + (size_t)c * d);
    /* the answer when no expected improvement compares (all NaN): the first random candidate, never the
     * scratch block's leftovers */
    memcpy(bestc, RC, d * sizeof *bestc);
    ei_batch(&g, th, RC, N_RANDOM, fbest, RV, Rmu, Re);
    for (int c = 0; c < N_RANDOM; c++)
        if (Re[c] > best) {
            best = Re[c];
            memcpy(bestc, RC + (size_t)c * d, d * sizeof *cand);
        }
    /* the local candidates: around the best observed point (even ones) or
     * the best candidate so far (odd ones), with scales from wide to narrow.
     * The random draws of each are made first, in order; candidates are
     * then built and scored in batches assuming the best candidate does not
     * change within the batch; when one does improve on it, the batch is cut
     * there (the odd ones after it were built around the old best) and the
     * next batch starts right after it: the same candidates and choice as
     * scoring them one by one. */
    double *LZ = RC + n_rc;
    unsigned char *LK = (unsigned char *)(LZ + n_lz);
    double *LC = LZ + nl, *LV = LC + (size_t)LOCAL_BATCH * d, *Lmu = LV + (size_t)n * LOCAL_BATCH,
           *Le = Lmu + LOCAL_BATCH;
    for (int c = 0; c < N_LOCAL; c++) {
        double scale = 0.2 * pow(0.05, (double)c / N_LOCAL);
        for (int j = 0; j < d; j++) {
            size_t q = (size_t)c * d + j;
            int k = sp->dims[j].ncat;
            LK[q] = 0;
            if (!k) LZ[q] = scale * dx_rng_normal(&r);
            else if (dx_rng_unif(&r) < 1.0 / d) {
                LZ[q] = (double)dx_rng_below(&r, (uint64_t)k);
                LK[q] = 1; /* a new category */
            } else LK[q] = 2; /* the centre's */
        }
    }
    int c0 = 0, B = 8;
    while (c0 < N_LOCAL) {
        int nb = c0 + B > N_LOCAL ? N_LOCAL - c0 : B;
        for (int b = 0; b < nb; b++) {
            int c = c0 + b;
            /* parity as in the candidate numbering after the random ones */
            const double *ctr = (N_RANDOM + c) % 2 && best >= 0 ? bestc : X + (size_t)ibest * d;
            for (int j = 0; j < d; j++) {
                size_t q = (size_t)c * d + j;
                LC[(size_t)b * d + j] = LK[q] == 0 ? dx_opt_clamp01(ctr[j] + LZ[q]) : LK[q] == 1 ? LZ[q] : ctr[j];
            }
        }
        ei_batch(&g, th, LC, nb, fbest, LV, Lmu, Le);
        int cut = nb;
        for (int b = 0; b < nb; b++)
            if (Le[b] > best) {
                best = Le[b];
                memcpy(bestc, LC + (size_t)b * d, d * sizeof *cand);
                cut = b + 1;
                break;
            }
        c0 += cut;
        B = cut == nb ? (2 * B > LOCAL_BATCH ? LOCAL_BATCH : 2 * B) : 8;
    }
    memcpy(out, bestc, d * sizeof *out);
    ws_put(wsb);
    if (conf->work) *conf->work += g.work;
    return DX_OPT_OK;
}
