"""Model versions over gRPC (issue #19): ctx.select_model / ctx.record_inference
against a real node running an A/B test started on the BEAM side.

The node registers two names with two versions each and starts a 50/50 test
on success for each; the results of pyrec's are the tool ``ab_results``.
"""

import random
import unittest
import uuid

import _paths  # noqa: F401

from bridge_node import BridgeNode
from dspex_bridge import InvalidValueError, SessionContext
from dspex_bridge.errors import BridgeError

NODE = None


def setUpModule():
    global NODE
    NODE = BridgeNode(extra_eval=(
        # pyclf: a test nobody records to (never decides), for routing
        "{ok, A} = dspex_models:register_model(#{name => <<\"pyclf\">>, version => <<\"1\">>}),"
        "{ok, B} = dspex_models:register_model(#{name => <<\"pyclf\">>, version => <<\"2\">>}),"
        "ok = dspex_models:set_alias(<<\"pyclf\">>, production, A),"
        "{ok, _} = dspex_models:start_ab_test(#{model => <<\"pyclf\">>, variants => [{A, 1}, {B, 1}]}),"
        # pyrec: the test Python's records decide (not before 1000 per arm)
        "{ok, RA} = dspex_models:register_model(#{name => <<\"pyrec\">>, version => <<\"1\">>}),"
        "{ok, RB} = dspex_models:register_model(#{name => <<\"pyrec\">>, version => <<\"2\">>}),"
        "ok = dspex_models:set_alias(<<\"pyrec\">>, production, RA),"
        "{ok, T} = dspex_models:start_ab_test(#{model => <<\"pyrec\">>, variants => [{RA, 1}, {RB, 1}],"
        "                                       mde => 0.05, min_samples => 1000}),"
        "ok = dspex_tools:expose(ab_results, fun(_) ->"
        "  {ok, R} = dspex_models:results(T),"
        "  #{decision => iolist_to_binary(io_lib:format(\"~0p\", [maps:get(decision, R)])),"
        "    counts => [maps:get(n, S) || {_, S} <- maps:get(arm_summary, R)]} end),"
    )).start()


def tearDownModule():
    if NODE is not None:
        NODE.stop()


class ModelsTest(unittest.TestCase):
    def setUp(self):
        self.ctx = SessionContext(NODE.address, "models_%s" % uuid.uuid4().hex[:8])

    def tearDown(self):
        self.ctx.close()

    def test_select_is_sticky_and_splits(self):
        first = {u: self.ctx.select_model("pyclf", user_id="u%d" % u) for u in range(400)}
        again = {u: self.ctx.select_model("pyclf", user_id="u%d" % u) for u in range(400)}
        self.assertEqual(first, again)
        self.assertEqual({"pyclf@1", "pyclf@2"}, set(first.values()))
        on2 = sum(1 for m in first.values() if m == "pyclf@2")
        self.assertTrue(100 < on2 < 300, on2)   # binomial(400, 0.5): 5 sd
        # another session of the same node routes the same unit the same way
        with SessionContext(NODE.address, "models_other_%s" % uuid.uuid4().hex[:8]) as other:
            self.assertEqual(first[7], other.select_model("pyclf", user_id="u7"))

    def test_records_reach_the_experiment(self):
        rnd = random.Random(19)
        for u in range(3000):
            m = self.ctx.select_model("pyrec", user_id="rec%d" % u)
            p = 0.75 if m == "pyrec@1" else 0.95
            self.ctx.record_inference(m, 5 + rnd.random() * 10, rnd.random() < p, score=p)
        res = self.ctx.call_elixir_tool("ab_results")
        # decided once both arms had 1000 (a periodic evaluation may have
        # ended it before the last records, which are then not counted)
        self.assertTrue(all(n >= 1000 for n in res["counts"]), res)
        self.assertEqual("{winner,<<\"pyrec@2\">>}", res["decision"])

    def test_errors(self):
        with self.assertRaises(BridgeError):
            self.ctx.select_model("no_such_model", user_id="x")
        with self.assertRaises(InvalidValueError):
            self.ctx.select_model("", user_id="x")
        with self.assertRaises(InvalidValueError):
            self.ctx.record_inference("pyclf@1", 0, True)
        with self.assertRaises(InvalidValueError):
            self.ctx.record_inference("", 1.0, True)
        with self.assertRaises(TypeError):
            self.ctx.select_model("pyclf", user_id="a", tenant="b")


if __name__ == "__main__":
    unittest.main()
