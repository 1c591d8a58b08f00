"""Optimization studies over gRPC (issue #18): ctx.optimize(...) -> Study with
ask/tell/best/trials/stop and run(objective), against a real node.

Convergence is asserted on a problem with a known optimum within a fixed
budget and seed (deterministic with one evaluation in flight), never on time.
"""

import math
import time
import unittest
import uuid

import _paths  # noqa: F401

from bridge_node import BridgeNode
from dspex_bridge import (BudgetExhaustedError, InvalidValueError, LockedError, PreconditionFailedError,
                          SessionContext, Study, StudyNotFoundError)

NODE = None


def setUpModule():
    global NODE
    NODE = BridgeNode().start()


def tearDownModule():
    if NODE is not None:
        NODE.stop()


def objective(p):
    """The mixed problem of dspex_opt_tests: minimum 0 at x = 1.5, lr = 0.01,
    n = 100, style "b", flag true."""
    return ((p["x"] - 1.5) ** 2 + (math.log10(p["lr"]) + 2) ** 2 + (math.log10(p["n"]) - 2) ** 2
            + {"b": 0.0, "a": 1.0, "c": 2.0}[p["style"]] + (0.0 if p["flag"] else 0.5))


VARS = ["x", "lr", "n", "style", "flag"]


class OptimizeTest(unittest.TestCase):
    def setUp(self):
        self.ctx = SessionContext(NODE.address, "opt_%s" % uuid.uuid4().hex[:8])
        c = self.ctx
        c.register_variable("x", "float", 0.0, constraints={"min": -5.0, "max": 5.0})
        c.register_variable("lr", "float", 0.01, constraints={"min": 1e-4, "max": 1.0}, metadata={"scale": "log"})
        c.register_variable("n", "integer", 10, constraints={"min": 1, "max": 1000}, metadata={"scale": "log"})
        c.register_variable("style", "choice", "a", constraints={"choices": ["a", "b", "c"]})
        c.register_variable("flag", "boolean", False)
        c.register_variable("prompt", "string", "hi")

    def tearDown(self):
        self.ctx.close()

    def test_run_end_to_end_deterministic_and_apply_best(self):
        runs = []
        for _ in range(2):
            study = self.ctx.optimize(VARS, algorithm="tpe", budget=60, seed=3)
            self.assertIsInstance(study, Study)
            self.assertEqual("mixed", study.space)
            # the variables are the study's while it runs
            with self.assertRaises(LockedError):
                self.ctx.update_variable("x", 1.0)
            best = study.run(objective)
            trials = study.trials()
            self.assertEqual(list(range(60)), [t.trial_id for t in trials])
            for t in trials:
                self.assertEqual("complete", t.state)
                self.assertAlmostEqual(objective(t.params), t.score, places=9)
                self.assertTrue(-5.0 <= t.params["x"] <= 5.0 and 1 <= t.params["n"] <= 1000)
                self.assertIsInstance(t.params["n"], int)
                self.assertIn(t.params["style"], ("a", "b", "c"))
                self.assertIsInstance(t.params["flag"], bool)
            self.assertEqual(min(t.score for t in trials), best.score)
            self.assertEqual(best, study.best())
            # better than its own random start (the first 10 trials of TPE);
            # deterministic: the same seed and scores give the same asks
            self.assertLess(best.score, min(t.score for t in trials[:10]))
            info = study.info()
            self.assertEqual((60, 60, 0, "tpe", "minimize"),
                             (info["asked"], info["told"], info["pending"], info["algorithm"], info["direction"]))
            res = study.stop(apply_best=runs == [])
            self.assertEqual(60, res.trials)
            self.assertEqual(best, res.best)
            runs.append((trials, res))
        # the same seed and the same scores: the same asks
        self.assertEqual([t.params for t in runs[0][0]], [t.params for t in runs[1][0]])
        self.assertTrue(runs[0][1].applied)
        self.assertFalse(runs[1][1].applied)
        for name, value in runs[0][1].best.params.items():
            self.assertEqual(value, self.ctx.get_variable(name, bypass_cache=True))
        self.ctx.update_variable("x", 1.0)   # released

    def test_parallel_run_failed_trials_and_maximize(self):
        calls = []

        def f(p):
            calls.append(p)
            if p["x"] < -4.0:
                raise RuntimeError("too far left")
            if p["x"] > 4.5:
                return float("nan")
            return 3.0 - (p["x"] + 2.0) ** 2

        with self.ctx.optimize(["x"], algorithm="bo", budget=24, seed=1, direction="maximize") as study:
            best = study.run(f, n_parallel=3)
            trials = study.trials()
        self.assertEqual(24, len(trials))
        self.assertEqual(24, len(calls))
        for t in trials:
            if t.params["x"] < -4.0:
                self.assertEqual(("failed", "RuntimeError: too far left"), (t.state, t.reason))
            elif t.params["x"] > 4.5:
                self.assertEqual("failed", t.state)
                self.assertIn("not a finite number", t.reason)
            else:
                self.assertEqual("complete", t.state)
        self.assertEqual(max(t.score for t in trials if t.state == "complete"), best.score)
        self.assertGreater(best.score, 2.9)
        # the context manager stopped it
        with self.assertRaises(StudyNotFoundError):
            study.ask()

    def test_any_real_number_is_a_score(self):
        """numpy scalars, Fraction, anything whose float() is finite; an
        objective's non-number (an int beyond the float range, a broken
        __float__) fails its trial inside run(), never escapes it."""
        from fractions import Fraction

        class Score:
            def __init__(self, x):
                self.x = x

            def __float__(self):
                return self.x

        class Broken:
            def __float__(self):
                raise RuntimeError("no float today")

        scores = [Fraction(1, 4), Score(0.5)]
        try:
            import numpy
            scores.append(numpy.float32(0.25))
        except ImportError:  # the package never needs numpy; the test uses it when present
            pass
        results = [Fraction(1, 8), 10 ** 400, Broken(), Score(0.125), Score(float("inf"))]
        with self.ctx.optimize(["x"], budget=len(scores) + 1 + len(results), seed=2) as study:
            for s in scores:
                tid, _ = study.ask()
                study.tell(tid, s)
            tid, _ = study.ask()
            for bad in (10 ** 400, Score(float("nan")), Broken(), "0.5", True, 1j):
                with self.assertRaises(ValueError):
                    study.tell(tid, bad)
            study.tell(tid, failed="refused")
            feed = iter(results)
            study.run(lambda p: next(feed))
            info = study.info()
            trials = study.trials()
        self.assertEqual((info["pending"], info["told"]), (0, len(trials)))
        told = [t.score if t.state == "complete" else t.state for t in trials]
        self.assertEqual(told, [float(s) for s in scores] + ["failed", 0.125, "failed", "failed", 0.125,
                                                             "failed"])

    def test_ask_tell_errors(self):
        study = self.ctx.optimize(["x", "style"], algorithm="random", budget=2, seed=0)
        tid, params = study.ask()
        self.assertEqual({"x", "style"}, set(params))
        with self.assertRaises(ValueError):
            study.tell(tid, float("inf"))
        with self.assertRaises(StudyNotFoundError):
            study.tell(tid + 10, 1.0)
        study.tell(tid, 1.0)
        with self.assertRaises(PreconditionFailedError):
            study.tell(tid, 2.0)
        tid2, _ = study.ask()
        with self.assertRaises(BudgetExhaustedError):
            study.ask()
        study.tell(tid2, failed="evaluation timed out")
        self.assertEqual(["complete", "failed"], [t.state for t in study.trials()])
        self.assertEqual("evaluation timed out", study.trials()[1].reason)
        # another session cannot reach the study
        with SessionContext(NODE.address, "opt_other_%s" % uuid.uuid4().hex[:8]) as other:
            with self.assertRaises(StudyNotFoundError):
                Study(other, study.study_id, "mixed").best()
        res = study.stop()
        self.assertEqual((False, 2, 1.0), (res.applied, res.trials, res.best.score))
        with self.assertRaises(StudyNotFoundError):
            study.ask()
        with self.assertRaises(InvalidValueError):
            self.ctx.optimize(["x"], algorithm="magic")
        with self.assertRaises(InvalidValueError):
            self.ctx.optimize(["x", "prompt"])
        with self.assertRaises(ValueError):
            self.ctx.optimize(["x"], direction="up")

    def test_abandoned_study_ends_after_idle_timeout(self):
        study = self.ctx.optimize(["x"], budget=5, idle_timeout=0.3)
        study.ask()
        self.assertTrue(self.ctx.get_optimization_status("x").optimizing)
        # bounded polling: the server ends the study once nothing called it
        for _ in range(600):
            if not self.ctx.get_optimization_status("x").optimizing:
                break
            time.sleep(0.05)
        self.assertFalse(self.ctx.get_optimization_status("x").optimizing)
        with self.assertRaises(StudyNotFoundError):
            study.ask()


if __name__ == "__main__":
    unittest.main()
