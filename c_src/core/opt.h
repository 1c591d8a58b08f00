/* Black-box optimizer kernels (pure C, no erl_nif types).
 *
 * Every kernel is a pure function of (space, told history, seed, trial id):
 * it replays the history to rebuild its state and proposes the next
 * candidate, so the same seed and the same told scores give the same asks.
 *
 * Search space: every dimension is either numeric, with candidates in the
 * unit interval [0, 1] (the caller maps it to min/max, linear or log, and
 * rounds integers), or categorical with ncat >= 2 categories, candidates being
 * the index 0 .. ncat-1 as a double. Scores are minimised; a failed trial is
 * told as +INF (worst), never NaN. */
#ifndef DX_OPT_H
#define DX_OPT_H
#include <stddef.h>
#include <stdint.h>

typedef enum {
    DX_OPT_RANDOM = 0,
    DX_OPT_SA,
    DX_OPT_GA,
    DX_OPT_CMAES,
    DX_OPT_TPE,
    DX_OPT_BO,
    DX_OPT_SPSA_MOMENTUM,
    DX_OPT_SPSA_ADAM,
    DX_OPT_N_ALGS
} dx_opt_alg;

#define DX_OPT_MAX_DIMS 64
#define DX_OPT_MAX_CATS 4096
#define DX_OPT_MAX_HIST 100000

typedef struct {
    int ncat; /* 0: numeric in [0, 1]; >= 2: categorical */
} dx_opt_dim;

typedef struct {
    int d;
    const dx_opt_dim *dims;
} dx_opt_space;

/* Told trials, in the order they were told: x is n rows of d values (row
 * major), y the minimised scores (+INF for failed), tid their trial ids. */
typedef struct {
    size_t n;
    const double *x;
    const double *y;
    const uint64_t *tid;
    /* Asked but not yet told (several asks outstanding): np rows of d. BO and
     * TPE use them as "constant liars" so that parallel asks spread out. */
    size_t np;
    const double *px;
} dx_opt_hist;

typedef struct {
    uint64_t budget; /* planned number of trials (schedules of SA/SPSA); >= 1 */
    /* BO only, both optional (NULL): the GP hyperparameters (d + 2 values)
     * fitted by the previous ask, to start the fit from (a few steps then
     * suffice), and where to write this ask's. Passing the previous ask's
     * output keeps runs deterministic: it is a function of the same history. */
    const double *warm;
    double *fitted;
    /* BO only, optional (NULL): where to add the number of multiply-adds
     * this ask spent in its dense linear algebra (Cholesky factorisations,
     * the inverse for the likelihood's gradient, the candidates' triangular
     * solves): a deterministic measure of an ask's cost, for tests. */
    uint64_t *work;
    /* CMA-ES only, both optional (NULL): the state after the complete
     * generations of the previous ask's history (cma_in_len doubles, see
     * dx_opt_cma_state_len), to resume the replay from instead of the first
     * generation, and where to write this ask's (dx_opt_cma_state_len(d)
     * doubles). The told history only grows at its end, so the state after its
     * first generations stays valid: resuming gives the very same asks as the
     * whole replay, whose cost grew with every told trial. A state that does
     * not fit this space and history is ignored (the whole replay runs). */
    const double *cma_in;
    size_t cma_in_len;
    double *cma_out;
} dx_opt_conf;

/* Doubles in a CMA-ES state of a d-dimensional space: generations replayed,
 * step size, mean, the two evolution paths and the covariance matrix. */
size_t dx_opt_cma_state_len(int d);

enum { DX_OPT_OK = 0, DX_OPT_E_ARG = 1, DX_OPT_E_NOMEM = 2 };

/* Validates the space and history (every x and px inside the space, y not NaN).
 * Returns DX_OPT_OK or DX_OPT_E_ARG. */
int dx_opt_check(const dx_opt_space *sp, const dx_opt_hist *h);

/* Proposes the candidate of trial `trial' into out[0 .. d-1]: numeric values in
 * [0, 1], categorical values integral in [0, ncat). Returns a DX_OPT_ code. */
int dx_opt_ask(dx_opt_alg alg, const dx_opt_space *sp, const dx_opt_hist *h, uint64_t seed, uint64_t trial,
               const dx_opt_conf *conf, double *out);

/* Frees the scratch memory BO keeps for later asks (up to 16 blocks of up to
 * about 6 MB). Call it when no ask runs (the NIF's unload does); later asks
 * allocate again. */
void dx_opt_release_scratch(void);

/* Name of an algorithm ("random", "sa", "ga", "cmaes", "tpe", "bo",
 * "spsa_momentum", "spsa_adam"); NULL when out of range. */
const char *dx_opt_alg_name(dx_opt_alg alg);
#endif
