"""Optimization studies: ask/tell runs of the bridge's optimizers (dspex_opt).

    study = ctx.optimize(["temperature", "max_tokens", "style"], algorithm="tpe",
                         budget=60, direction="maximize", seed=7)
    trial_id, params = study.ask()          # {"temperature": 0.42, "max_tokens": 812, ...}
    study.tell(trial_id, 0.87)              # or study.tell(trial_id, failed="timeout")
    best = study.run(evaluate, n_parallel=4)   # asks/evaluates/tells to the end of the budget
    study.stop(apply_best=True)             # writes best.params to the variables

A study holds the optimizer locks of its variables on the server until
``stop()``, or until no call reached it for ``idle_timeout`` seconds.  The
candidates come from the server's algorithms (numeric kernels in C): random,
sa, ga, cmaes, tpe, bo, spsa_momentum, spsa_adam, or a registered plugin.
"""

import json
import math
import numbers
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from ._stubs import pb2
from .errors import BudgetExhaustedError


@dataclass
class Trial:
    """One trial: its parameters, ``state`` (pending, complete or failed),
    its ``score`` (complete) or ``reason`` (failed)."""
    trial_id: int
    params: Dict[str, Any]
    state: str
    score: Optional[float] = None
    reason: Optional[str] = None


@dataclass
class StudyResult:
    """What ``Study.stop`` returns."""
    applied: bool
    best: Optional[Trial]
    trials: int
    apply_errors: List[str]


def _trial(m):
    return Trial(trial_id=m.trial_id, params=json.loads(m.params_json) if m.params_json else {},
                 state=m.state, score=m.score if m.state == "complete" else None,
                 reason=m.reason if m.state == "failed" else None)


class Study:
    """A running optimization of variables of ``ctx``'s session (see the module
    doc).  Thread-safe: several threads may ask and tell at once."""

    def __init__(self, ctx, study_id, space):
        self._ctx = ctx
        self.study_id = study_id
        #: continuous, discrete or mixed
        self.space = space
        self._stopped = False

    def _req(self, cls, **kw):
        return cls(session_id=self._ctx.session_id, study_id=self.study_id, **kw)

    def ask(self):
        """The next candidate: ``(trial_id, params)``.  Raises
        BudgetExhaustedError once ``budget`` trials were asked."""
        r = self._ctx._call("AskTrial", self._req(pb2.AskTrialRequest))
        return r.trial_id, json.loads(r.params_json)

    def tell(self, trial_id, score=None, *, failed=None):
        """The result of a trial: a finite real number (an int, a float, or
        anything ``float()`` takes without loss of finiteness: numpy scalars,
        Fraction, Decimal), or ``failed=`` a reason (a string or an exception).
        Anything else is a ValueError."""
        if failed is not None and failed is not False:
            reason = failed if isinstance(failed, str) else (
                "%s: %s" % (type(failed).__name__, failed) if isinstance(failed, BaseException) else "failed")
            self._ctx._call("TellTrial", self._req(pb2.TellTrialRequest, trial_id=trial_id, failed=True,
                                                   reason=reason))
            return
        value = _finite_score(score)
        if value is None:
            raise ValueError("score must be a finite real number (or give failed=...): %r" % (score,))
        self._ctx._call("TellTrial", self._req(pb2.TellTrialRequest, trial_id=trial_id, score=value))

    def _get(self, include_trials):
        return self._ctx._call("GetStudy", self._req(pb2.GetStudyRequest, include_trials=include_trials))

    def best(self):
        """The best complete trial (a Trial), or None."""
        r = self._get(False)
        return _trial(r.best) if r.has_best else None

    def trials(self):
        """Every trial so far, by id."""
        return [_trial(t) for t in self._get(True).trials]

    def info(self):
        """Settings and counts: algorithm, direction, budget, asked, told,
        pending, variables, space."""
        r = self._get(False)
        return {"study_id": r.study_id, "algorithm": r.algorithm, "direction": r.direction,
                "budget": r.budget, "asked": r.asked, "told": r.told, "pending": r.pending,
                "variables": list(r.variables), "space": r.space}

    def stop(self, apply_best=False):
        """Ends the study and releases the locks; with ``apply_best`` writes
        the best parameters to the variables first.  Returns a StudyResult."""
        r = self._ctx._call("StopStudy", self._req(pb2.StopStudyRequest, apply_best=apply_best))
        self._stopped = True
        if apply_best:
            for name in (r.best and json.loads(r.best.params_json or "{}")) or ():
                self._ctx.cache.invalidate(name)
        return StudyResult(applied=r.applied, best=_trial(r.best) if r.has_best else None,
                           trials=r.trials, apply_errors=list(r.apply_errors))

    def run(self, objective: Callable[[Dict[str, Any]], float], n_parallel=1):
        """Asks, evaluates ``objective(params)`` and tells until the budget is
        used up, with ``n_parallel`` evaluations in flight (threads).  An
        objective that raises, or returns no finite real number (see
        ``tell``), fails its trial.
        Returns ``best()``."""
        if n_parallel < 1:
            raise ValueError("n_parallel must be >= 1")
        errors = []

        def loop():
            while True:
                try:
                    trial_id, params = self.ask()
                except BudgetExhaustedError:
                    return
                try:
                    score = objective(params)
                except Exception as exc:  # the trial failed, not the study
                    self.tell(trial_id, failed=exc)
                    continue
                value = _finite_score(score)
                if value is None:
                    self.tell(trial_id, failed="not a finite number: %s" % (_short_repr(score),))
                else:
                    self.tell(trial_id, value)

        def guarded():
            try:
                loop()
            except BaseException as exc:  # a transport error: stop and re-raise below
                errors.append(exc)

        if n_parallel == 1:
            loop()
        else:
            with ThreadPoolExecutor(max_workers=n_parallel, thread_name_prefix="dspex-study") as pool:
                for _ in range(n_parallel):
                    pool.submit(guarded)
            if errors:
                raise errors[0]
        return self.best()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._stopped:
            self.stop()


def _finite_score(score):
    """score as a finite float, or None.  Duck-typed (no numpy import): any
    real number float() converts finitely; bools, strings, complex numbers and
    an int too large for a float (OverflowError) are not scores."""
    if isinstance(score, (bool, str, bytes)) or score is None:
        return None
    if isinstance(score, numbers.Complex) and not isinstance(score, numbers.Real):
        return None
    try:
        value = float(score)
    except Exception:  # TypeError, OverflowError, or a broken __float__: not a score
        return None
    return value if math.isfinite(value) else None


def _short_repr(x):
    try:
        r = repr(x)
    except Exception:  # a broken __repr__ must not escape run() either
        r = "<%s>" % type(x).__name__
    return r if len(r) <= 80 else r[:77] + "..."
