/* Standard test functions with known optima, shared by the optimizer's
 * cmocka tests (test_opt.c) and its kernel bench (bench/opt_kernel_bench.c). */
#ifndef DX_OPT_TESTFN_H
#define DX_OPT_TESTFN_H
#include <math.h>

/* Hartmann6 on the unit cube, minimum -3.32236801141551 */
#define H6_MIN (-3.32236801141551)
static inline double dx_hartmann6(const double *x) {
    static const double al[4] = {1.0, 1.2, 3.0, 3.2};
    static const double A[4][6] = {{10, 3, 17, 3.5, 1.7, 8}, {0.05, 10, 17, 0.1, 8, 14},
                                   {3, 3.5, 1.7, 10, 17, 8}, {17, 8, 0.05, 10, 0.1, 14}};
    static const double P[4][6] = {{1312, 1696, 5569, 124, 8283, 5886}, {2329, 4135, 8307, 3736, 1004, 9991},
                                   {2348, 1451, 3522, 2883, 3047, 6650}, {4047, 8828, 8732, 5743, 1091, 381}};
    double s = 0;
    for (int i = 0; i < 4; i++) {
        double e = 0;
        for (int j = 0; j < 6; j++) {
            double d = x[j] - P[i][j] / 10000;
            e += A[i][j] * d * d;
        }
        s -= al[i] * exp(-e);
    }
    return s;
}
#endif
