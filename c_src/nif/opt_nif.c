/* dspex_nif:opt_ask/8, the optimizer kernels (c_src/core/opt*.c) for
 * dspex_opt. Runs on a dirty CPU scheduler: BO's Gaussian-process fit is
 * O(n^3) per ask. Malformed terms are badarg; a history that does not fit the
 * space is {error, {invalid_argument, history}}. */
#include "nif.h"
#include "opt.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int get_num(ErlNifEnv *env, ERL_NIF_TERM t, double *out) {
    ErlNifSInt64 i;
    if (enif_get_double(env, t, out)) return 1;
    if (enif_get_int64(env, t, &i)) {
        *out = (double)i;
        return 1;
    }
    return 0;
}

/* Reads a point (a list of d numbers) into out. */
static int get_point(ErlNifEnv *env, ERL_NIF_TERM l, int d, double *out) {
    ERL_NIF_TERM h;
    for (int j = 0; j < d; j++) {
        if (!enif_get_list_cell(env, l, &h, &l) || !get_num(env, h, &out[j])) return 0;
    }
    return enif_is_empty_list(env, l);
}

static int get_alg(ErlNifEnv *env, ERL_NIF_TERM t, dx_opt_alg *alg) {
    char buf[32];
    if (enif_get_atom(env, t, buf, sizeof buf, ERL_NIF_LATIN1) <= 0) return 0;
    for (int a = 0; a < DX_OPT_N_ALGS; a++)
        if (!strcmp(buf, dx_opt_alg_name((dx_opt_alg)a))) {
            *alg = (dx_opt_alg)a;
            return 1;
        }
    return 0;
}

/* opt_ask(Algorithm, Dims, Told, Pending, Seed, Trial, Budget, Warm):
 * Dims = [0 | Ncat]; Told = [{TrialId, Point, Score | failed}] in the order
 * told; Pending = [Point]; Warm = undefined | the Fitted of the previous ask
 * (BO's GP hyperparameters, d + 2 floats; CMA-ES's state after the complete
 * generations, a binary); returns {ok, Point, Fitted} (Point: numeric values
 * in [0, 1], categorical ones integral indices as floats; Fitted: undefined,
 * d + 2 floats (BO) or a binary (CMA-ES)). */
DX_NIF(nif_opt_ask) {
    dx_opt_alg alg;
    unsigned nd, nt, np;
    ErlNifUInt64 seed, trial, budget;
    if (!get_alg(env, argv[0], &alg) || !enif_get_list_length(env, argv[1], &nd) || nd < 1 ||
        nd > DX_OPT_MAX_DIMS || !enif_get_list_length(env, argv[2], &nt) || nt > DX_OPT_MAX_HIST ||
        !enif_get_list_length(env, argv[3], &np) || np > DX_OPT_MAX_HIST || !enif_get_uint64(env, argv[4], &seed) ||
        !enif_get_uint64(env, argv[5], &trial) || !enif_get_uint64(env, argv[6], &budget) || budget < 1)
        return enif_make_badarg(env);
    int d = (int)nd;
    double warm[DX_OPT_MAX_DIMS + 2], fitted[DX_OPT_MAX_DIMS + 2];
    /* CMA-ES: Warm is the previous ask's state, a binary of native doubles (the run keeps it as given) */
    ErlNifBinary cma_in;
    int cma = alg == DX_OPT_CMAES, has_cma = 0;
    if (cma && enif_inspect_binary(env, argv[7], &cma_in)) {
        if (cma_in.size != dx_opt_cma_state_len(d) * sizeof(double)) return enif_make_badarg(env);
        has_cma = 1;
    }
    int has_warm = !has_cma && !enif_is_atom(env, argv[7]);
    if (cma && has_warm) return enif_make_badarg(env); /* a BO fit is no CMA-ES state */
    if (has_warm && !get_point(env, argv[7], d + 2, warm)) return enif_make_badarg(env);
    if (!has_warm && !has_cma) {
        char a[16];
        if (enif_get_atom(env, argv[7], a, sizeof a, ERL_NIF_LATIN1) <= 0 || strcmp(a, "undefined"))
            return enif_make_badarg(env);
    }
    dx_opt_dim dims[DX_OPT_MAX_DIMS];
    ERL_NIF_TERM l = argv[1], h;
    for (int j = 0; j < d; j++) {
        int k;
        enif_get_list_cell(env, l, &h, &l);
        if (!enif_get_int(env, h, &k) || k < 0 || k == 1 || k > DX_OPT_MAX_CATS) return enif_make_badarg(env);
        dims[j].ncat = k;
    }
    double *x = malloc(((size_t)nt * d + nt + (size_t)np * d + d) * sizeof(double) + 1);
    uint64_t *tid = malloc((size_t)nt * sizeof *tid + 1);
    /* the state in, copied (a binary's bytes need not be aligned for doubles), and out */
    size_t cma_len = cma ? dx_opt_cma_state_len(d) : 0;
    double *cma_buf = cma ? malloc(2 * cma_len * sizeof(double)) : NULL;
    if (!x || !tid || (cma && !cma_buf)) {
        free(x);
        free(tid);
        free(cma_buf);
        return dx_error(env, ATOM_enomem);
    }
    if (has_cma) memcpy(cma_buf, cma_in.data, cma_in.size);
    double *y = x + (size_t)nt * d, *px = y + nt, *out = px + (size_t)np * d;
    ERL_NIF_TERM res;
    l = argv[2];
    for (unsigned i = 0; i < nt; i++) {
        const ERL_NIF_TERM *tup;
        int ar;
        ErlNifUInt64 id;
        enif_get_list_cell(env, l, &h, &l);
        if (!enif_get_tuple(env, h, &ar, &tup) || ar != 3 || !enif_get_uint64(env, tup[0], &id) ||
            !get_point(env, tup[1], d, x + (size_t)i * d))
            goto bad;
        tid[i] = id;
        if (!get_num(env, tup[2], &y[i])) {
            char a[8];
            if (enif_get_atom(env, tup[2], a, sizeof a, ERL_NIF_LATIN1) <= 0 || strcmp(a, "failed")) goto bad;
            y[i] = INFINITY;
        }
    }
    l = argv[3];
    for (unsigned i = 0; i < np; i++) {
        enif_get_list_cell(env, l, &h, &l);
        if (!get_point(env, h, d, px + (size_t)i * d)) goto bad;
    }
    dx_opt_space sp = {d, dims};
    dx_opt_hist hist = {nt, x, y, tid, np, px};
    dx_opt_conf conf = {.budget = budget, .warm = has_warm ? warm : NULL, .fitted = fitted,
                        .cma_in = has_cma ? cma_buf : NULL, .cma_in_len = cma_len, .cma_out = cma ? cma_buf + cma_len : NULL};
    fitted[0] = NAN;
    int rc = dx_opt_ask(alg, &sp, &hist, seed, trial, &conf, out);
    if (rc == DX_OPT_OK) {
        ERL_NIF_TERM pt = enif_make_list(env, 0);
        for (int j = d; j-- > 0;) pt = enif_make_list_cell(env, enif_make_double(env, out[j]), pt);
        ERL_NIF_TERM fit = ATOM_undefined;
        if (cma) {
            unsigned char *b = enif_make_new_binary(env, cma_len * sizeof(double), &fit);
            memcpy(b, cma_buf + cma_len, cma_len * sizeof(double));
        } else if (!isnan(fitted[0])) {
            fit = enif_make_list(env, 0);
            for (int j = d + 2; j-- > 0;) fit = enif_make_list_cell(env, enif_make_double(env, fitted[j]), fit);
        }
        res = enif_make_tuple3(env, ATOM_ok, pt, fit);
    } else if (rc == DX_OPT_E_NOMEM) {
        res = dx_error(env, ATOM_enomem);
    } else {
        res = dx_error2(env, ATOM_invalid_argument, ATOM_history);
    }
    free(x);
    free(tid);
    free(cma_buf);
    return res;
bad:
    free(x);
    free(tid);
    free(cma_buf);
    return enif_make_badarg(env);
}
