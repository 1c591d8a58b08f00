/* Kernel entry points behind dx_opt_ask (see opt.h for the contract). */
#ifndef DX_OPT_INTERNAL_H
#define DX_OPT_INTERNAL_H
#include "opt_util.h"

/* Streams of the RNG, one per use, so that kernels never share numbers. */
enum { DX_S_RANDOM = 1, DX_S_SA_PROP, DX_S_SA_ACC, DX_S_GA, DX_S_CMA, DX_S_TPE, DX_S_BO, DX_S_SPSA };

int dx_opt_ask_random(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_sa(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_ga(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_cmaes(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_tpe(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_bo(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, double *);
int dx_opt_ask_spsa(const dx_opt_space *, const dx_opt_hist *, uint64_t, uint64_t, const dx_opt_conf *, int adam,
                    double *);
#endif
