#!/usr/bin/python3
"""Reference figures for dspex_models_stats, from statsmodels and scipy.

Reads a JSON file of cases (written by test/dspex_models_stats_tests.erl) and
prints, as JSON, what statsmodels/scipy compute for them:
  proportions: proportions_ztest (pooled z, two-sided p) and
               confint_proportions_2indep(method="wald") (95% interval of p1 - p0)
  means:       CompareMeans.ztest_ind(usevar="unequal") and zconfint_diff
               (from summary statistics: n, mean, variance)
  chisquare:   scipy.stats.chisquare against the planned weights (SRM)
  mixture:     the normal-mixture likelihood ratio of the mSPRT, integrated
               numerically with scipy.integrate.quad (checks the closed form)
"""
import json
import math
import sys

import numpy as np
from scipy import integrate, stats
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest
from statsmodels.stats.weightstats import _zconfint_generic, _zstat_generic


def proportions(x1, n1, x0, n0):
    z, p = proportions_ztest([x1, x0], [n1, n0], alternative="two-sided")
    lo, hi = confint_proportions_2indep(x1, n1, x0, n0, method="wald", compare="diff", alpha=0.05)
    return {"z": float(z), "p": float(p), "ci": [float(lo), float(hi)]}


def means(t, c):
    (n1, m1, v1), (n0, m0, v0) = t, c
    # what CompareMeans(...).ztest_ind(usevar="unequal") / zconfint_diff compute,
    # from summary statistics (they take raw data; these are their internals)
    std = math.sqrt(v1 / n1 + v0 / n0)
    z, p = _zstat_generic(m1, m0, std, "two-sided", 0)
    lo, hi = _zconfint_generic(m1 - m0, std, 0.05, "two-sided")
    return {"z": float(z), "p": float(p), "ci": [float(lo), float(hi)]}


def chisquare(ns, ws):
    ns = np.asarray(ns, dtype=float)
    ws = np.asarray(ws, dtype=float)
    chi2, p = stats.chisquare(ns, ns.sum() * ws / ws.sum())
    return {"chi2": float(chi2), "p": float(p)}


def mixture(delta, v, tau):
    sd = math.sqrt(v)
    f = lambda th: stats.norm.pdf(delta, th, sd) / stats.norm.pdf(delta, 0, sd) * stats.norm.pdf(th, 0, tau)
    lam, _ = integrate.quad(f, -20 * tau, 20 * tau, epsabs=0, epsrel=1e-12, limit=500, points=[0, delta])
    return {"lambda": lam}


def main():
    with open(sys.argv[1]) as fh:
        cases = json.load(fh)
    out = {
        "proportions": [proportions(*c) for c in cases["proportions"]],
        "means": [means(*c) for c in cases["means"]],
        "chisquare": [chisquare(*c) for c in cases["chisquare"]],
        "mixture": [mixture(*c) for c in cases["mixture"]],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
