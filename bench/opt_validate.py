#!/usr/bin/env python3
"""Validation of dspex_opt's optimizers against Optuna and SciPy (issue #18).

`make bench` first runs bench/dspex_opt_bench.erl (our algorithms through real
dspex_opt runs; best-so-far regrets in _build/bench/opt_ours.csv, ask times in
_build/bench/opt_ask_overhead.csv). This script runs, on the same functions at
the same budgets and seeds, Optuna's TPE and CMA-ES samplers and SciPy's
differential_evolution and dual_annealing, then writes

  _build/bench/opt_regret.md / .csv   median and IQR of the final best regret
  _build/bench/opt_<problem>.png      convergence plots (median, IQR band)

and prints the issue's goals with the measured numbers. OPT_BENCH_SEEDS
(default 20) sets the number of seeds; it must match the Erlang run.
"""
import csv
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

OUT = "_build/bench"
SEEDS = int(os.environ.get("OPT_BENCH_SEEDS", "20"))

BRANIN_MIN = 0.397887357729739


def branin(x):
    x1, x2 = x
    a = x2 - 5.1 / (4 * math.pi ** 2) * x1 * x1 + 5 / math.pi * x1 - 6
    return a * a + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                 [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                        [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])


def hartmann6(x):
    x = np.asarray(x, dtype=float)
    return float(-np.sum(H6_ALPHA * np.exp(-np.sum(H6_A * (x - H6_P) ** 2, axis=1))))


def rosenbrock(x):
    x = np.asarray(x, dtype=float)
    return float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))


def rastrigin(x):
    x = np.asarray(x, dtype=float)
    return float(10 * len(x) + np.sum(x * x - 10 * np.cos(2 * math.pi * x)))


def ackley(x):
    x = np.asarray(x, dtype=float)
    n = len(x)
    return float(-20 * math.exp(-0.2 * math.sqrt(np.sum(x * x) / n))
                 - math.exp(np.sum(np.cos(2 * math.pi * x)) / n) + 20 + math.e)


def mixed(x):
    c1, c2, x1, x2 = x
    return [2.0, 0.0, 1.0, 3.0][int(c1)] + [1.0, 0.5, 0.0][int(c2)] + (branin([x1, x2]) - BRANIN_MIN) / 10


# name -> (function, dims [(lo, hi)] or ("choice", n), budget, optimum); as in dspex_opt_bench.erl
PROBLEMS = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 50, BRANIN_MIN),
    "hartmann6": (hartmann6, [(0.0, 1.0)] * 6, 50, -3.32236801141551),
    "rosenbrock5": (rosenbrock, [(-2.048, 2.048)] * 5, 100, 0.0),
    "rastrigin10": (rastrigin, [(-5.12, 5.12)] * 10, 200, 0.0),
    "ackley5": (ackley, [(-32.768, 32.768)] * 5, 100, 0.0),
    "mixed": (mixed, [("choice", 4), ("choice", 3), (-5.0, 10.0), (0.0, 15.0)], 100, 0.0),
}


class Budget(Exception):
    pass


class Recorder:
    """Counts evaluations, keeps the best-so-far regret, stops at the budget."""

    def __init__(self, f, budget, opt):
        self.f, self.budget, self.opt = f, budget, opt
        self.curve = []
        self.best = math.inf

    def __call__(self, x):
        if len(self.curve) >= self.budget:
            raise Budget()
        y = self.f(x)
        self.best = min(self.best, y - self.opt)
        self.curve.append(self.best)
        return y


def relaxed(dims):
    """SciPy sees categorical dimensions as [0, n) floored."""
    bounds = [(0.0, d[1] - 1e-9) if d[0] == "choice" else d for d in dims]
    def decode(x):
        return [math.floor(v) if d[0] == "choice" else v for v, d in zip(x, dims)]
    return bounds, decode


def run_scipy(method, name, seed):
    from scipy.optimize import differential_evolution, dual_annealing
    f, dims, budget, opt = PROBLEMS[name]
    bounds, decode = relaxed(dims)
    rec = Recorder(lambda x: f(decode(x)), budget, opt)
    try:
        if method == "scipy_de":
            differential_evolution(rec, bounds, seed=seed, maxiter=100000, polish=False, tol=0, atol=0)
        else:
            dual_annealing(rec, bounds, seed=seed, maxfun=budget, maxiter=100000)
    except Budget:
        pass
    return pad(rec.curve, budget)


def run_optuna(method, name, seed):
    import optuna
    f, dims, budget, opt = PROBLEMS[name]
    sampler = (optuna.samplers.TPESampler(seed=seed) if method == "optuna_tpe"
               else optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False))
    study = optuna.create_study(sampler=sampler)
    rec = Recorder(f, budget, opt)

    def objective(trial):
        x = [trial.suggest_categorical("x%d" % i, list(range(d[1]))) if d[0] == "choice"
             else trial.suggest_float("x%d" % i, d[0], d[1]) for i, d in enumerate(dims)]
        return rec(x)

    study.optimize(objective, n_trials=budget)
    return pad(rec.curve, budget)


def pad(curve, budget):
    return curve + [curve[-1]] * (budget - len(curve))


def optuna_ask_overhead(seeds=10, n=100):
    """Median time of study.ask() (with the sampler's suggestions) once n
    trials are told, TPE on Hartmann6, like the Erlang measurement: wall
    time and this thread's CPU time."""
    import optuna
    times, cpus = [], []
    for seed in range(1, seeds + 1):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        dist = {"x%d" % i: optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(6)}
        for _ in range(n + 1):
            t0, c0 = time.perf_counter(), time.thread_time()
            trial = study.ask(dist)
            t, c = time.perf_counter() - t0, time.thread_time() - c0
            x = [trial.params["x%d" % i] for i in range(6)]
            study.tell(trial, hartmann6(x))
        times.append(t * 1000)
        cpus.append(c * 1000)
    times.sort()
    cpus.sort()
    return times[len(times) // 2 - 1], times[int(len(times) * 0.9) - 1], cpus[len(cpus) // 2 - 1]


def q(values, p):
    return float(np.percentile(values, p))


def main():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(OUT, exist_ok=True)
    curves = defaultdict(list)  # (problem, method) -> [curve per seed]
    ours = os.path.join(OUT, "opt_ours.csv")
    if not os.path.exists(ours):
        sys.exit("run bench/dspex_opt_bench.erl first (make bench)")
    rows = defaultdict(list)
    with open(ours) as fh:
        for r in csv.DictReader(fh):
            rows[(r["problem"], r["algorithm"], int(r["seed"]))].append(float(r["regret"]))
    for (p, a, _s), c in sorted(rows.items()):
        curves[(p, "ours_" + a)].append(c)
    for name in PROBLEMS:
        for method in ["optuna_tpe", "optuna_cmaes", "scipy_de", "scipy_da"]:
            t0 = time.time()
            for seed in range(SEEDS):
                runner = run_optuna if method.startswith("optuna") else run_scipy
                curves[(name, method)].append(runner(method, name, seed))
            finals = [c[-1] for c in curves[(name, method)]]
            print("  %-12s %-14s median final regret %.4g (%.1f s)" % (name, method, np.median(finals),
                                                                     time.time() - t0), flush=True)
    # the table
    table = []
    for (p, m), cs in sorted(curves.items()):
        finals = [c[-1] for c in cs]
        table.append((p, m, PROBLEMS[p][2], len(cs), q(finals, 50), q(finals, 25), q(finals, 75)))
    with open(os.path.join(OUT, "opt_regret.csv"), "w") as fh:
        w = csv.writer(fh)
        w.writerow(["problem", "method", "budget", "seeds", "median", "q25", "q75"])
        w.writerows(table)
    with open(os.path.join(OUT, "opt_regret.md"), "w") as fh:
        fh.write("| problem | method | budget | seeds | median regret | IQR (q25 - q75) |\n|---|---|---|---|---|---|\n")
        for p, m, b, n, med, lo, hi in table:
            fh.write("| %s | %s | %d | %d | %.4g | %.4g - %.4g |\n" % (p, m, b, n, med, lo, hi))
    CURVES.update(curves)
    plots()

    def med(p, m):
        return np.median([c[-1] for c in curves[(p, m)]]) if (p, m) in curves else float("nan")
    # ask overhead
    # ask overhead: CPU time where measured (the honest figure on a shared machine), else wall time
    over, wall = {}, {}
    path = os.path.join(OUT, "opt_ask_overhead.csv")
    if os.path.exists(path):
        with open(path) as fh:
            for r in csv.DictReader(fh):
                wall[r["algorithm"]] = float(r["median_ms"])
                cpu = float(r.get("cpu_median_ms") or "nan")
                over[r["algorithm"]] = cpu if not math.isnan(cpu) else wall[r["algorithm"]]
    o_med, o_p90, o_cpu = optuna_ask_overhead()
    with open(path, "a") as fh:
        fh.write("optuna_tpe,100,%.4f,%.4f,%.4f,nan\n" % (o_med, o_p90, o_cpu))
    print("\nask overhead at 100 observations (Hartmann6, median CPU time; wall time in parentheses): "
          "ours BO %.3f ms (%.3f), ours TPE %.3f ms (%.3f), Optuna TPE %.3f ms (%.3f)"
          % (over.get("bo", math.nan), wall.get("bo", math.nan), over.get("tpe", math.nan),
             wall.get("tpe", math.nan), o_cpu, o_med))
    print("\nregret table: %s/opt_regret.md; plots: %s/opt_<problem>.png\n\ngoals:" % (OUT, OUT))
    goals = [
        ("our BO beats Optuna TPE on Branin at 50", med("branin", "ours_bo") < med("branin", "optuna_tpe"),
         "%.4g vs %.4g" % (med("branin", "ours_bo"), med("branin", "optuna_tpe"))),
        ("our BO beats Optuna TPE on Hartmann6 at 50", med("hartmann6", "ours_bo") < med("hartmann6", "optuna_tpe"),
         "%.4g vs %.4g" % (med("hartmann6", "ours_bo"), med("hartmann6", "optuna_tpe"))),
        ("our TPE within 10% of Optuna TPE on mixed", med("mixed", "ours_tpe") <= 1.1 * med("mixed", "optuna_tpe"),
         "%.4g vs %.4g" % (med("mixed", "ours_tpe"), med("mixed", "optuna_tpe"))),
        ("our CMA-ES within 2x of SciPy DE on Rastrigin-10",
         med("rastrigin10", "ours_cmaes") <= 2 * med("rastrigin10", "scipy_de"),
         "%.4g vs %.4g" % (med("rastrigin10", "ours_cmaes"), med("rastrigin10", "scipy_de"))),
        ("our GA within 2x of SciPy DE on Rastrigin-10",
         med("rastrigin10", "ours_ga") <= 2 * med("rastrigin10", "scipy_de"),
         "%.4g vs %.4g" % (med("rastrigin10", "ours_ga"), med("rastrigin10", "scipy_de"))),
        ("ask overhead BO <= 5 ms at 100 observations", over.get("bo", math.inf) <= 5.0,
         "%.3f ms" % over.get("bo", math.nan)),
        ("ask overhead TPE <= 1 ms at 100 observations", over.get("tpe", math.inf) <= 1.0,
         "%.3f ms (Optuna TPE %.3f ms)" % (over.get("tpe", math.nan), o_cpu)),
    ]
    for label, ok, detail in goals:
        print("  %-52s %-4s %s" % (label, "met" if ok else "NOT met", detail))


def plots():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name in PROBLEMS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (p, m), cs in sorted(CURVES.items()):
            if p != name:
                continue
            arr = np.maximum(np.array(cs), 1e-12)
            x = np.arange(1, arr.shape[1] + 1)
            ax.plot(x, np.median(arr, axis=0), label=m, linestyle="-" if m.startswith("ours") else "--")
            ax.fill_between(x, np.percentile(arr, 25, axis=0), np.percentile(arr, 75, axis=0), alpha=0.12)
        ax.set_yscale("log")
        ax.set_xlabel("evaluations")
        ax.set_ylabel("best regret (median, IQR band)")
        ax.set_title("%s, %d seeds" % (name, SEEDS))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(OUT, "opt_%s.png" % name), dpi=110)
        plt.close(fig)


CURVES = {}

if __name__ == "__main__":
    main()
