/* Internal helpers of the optimizer kernels: a seeded RNG, distributions,
 * small dense linear algebra. */
#ifndef DX_OPT_UTIL_H
#define DX_OPT_UTIL_H
#include "opt.h"

typedef struct {
    uint64_t s;
} dx_rng;

/* A stream of random numbers determined by (seed, a, b). */
void dx_rng_init(dx_rng *r, uint64_t seed, uint64_t a, uint64_t b);
uint64_t dx_rng_u64(dx_rng *r);
double dx_rng_unif(dx_rng *r);             /* [0, 1) */
double dx_rng_normal(dx_rng *r);           /* N(0, 1) */
uint64_t dx_rng_below(dx_rng *r, uint64_t n); /* [0, n) */

double dx_opt_phi(double z);  /* standard normal pdf */
double dx_opt_Phi(double z);  /* standard normal cdf */
double dx_opt_clamp01(double v);

/* A uniformly random point of the space. */
void dx_opt_random_point(const dx_opt_space *sp, dx_rng *r, double *out);
/* Makes p valid: numeric clamped into [0, 1], categorical rounded and clamped. */
void dx_opt_repair(const dx_opt_space *sp, double *p);

/* Indices 0..n-1 sorted by y ascending (ties by index: stable). */
void dx_opt_argsort(const double *y, size_t n, size_t *idx);

/* In-place Cholesky of the n x n SPD matrix a (lower triangle). 0 on success. */
int dx_opt_cholesky(double *a, int n);
/* Solves L y = b (forward) and L^T x = y (backward) in place. */
void dx_opt_chol_fwd(const double *l, int n, double *b);
void dx_opt_chol_bwd(const double *l, int n, double *b);
/* Eigen-decomposition of the symmetric n x n matrix a (destroyed) by cyclic
 * Jacobi: eigenvalues in w, eigenvectors as the columns of v. */
void dx_opt_eigen_sym(double *a, int n, double *w, double *v);
#endif
