"""Integration tests of the event log over gRPC (GetEvents, WatchEvents,
GetStateAt) and the Python client's ctx.get_events / watch_events / state_at.

One node of its own (bridge_node.BridgeNode) with the event log in a fresh
directory and `sync` durability, so an acknowledged write's event is already
in the log when the next call reads it (no polling needed).
"""

import math
import os
import shutil
import tempfile
import threading
import unittest
import uuid

import _paths  # noqa: F401
import grpc

from bridge_node import BridgeNode
from dspex_bridge import SessionContext, SessionNotFoundError
from dspex_bridge._stubs import pb2, pb2_grpc

NODE = None
EVENT_DIR = None


def setUpModule():
    global NODE, EVENT_DIR
    EVENT_DIR = tempfile.mkdtemp(prefix="dspex_events_py_")
    NODE = BridgeNode(erl_flags=["-dspex_bridge", "event_dir", '"%s"' % EVENT_DIR,
                                 "-dspex_bridge", "event_durability", "sync",
                                 "-dspex_bridge", "snapshot_every", "5"]).start()


def tearDownModule():
    if NODE is not None:
        NODE.stop()
    if EVENT_DIR:
        shutil.rmtree(EVENT_DIR, ignore_errors=True)


def sid():
    return "ev_%s" % uuid.uuid4().hex[:10]


class Events(unittest.TestCase):
    def setUp(self):
        self.channel = grpc.insecure_channel(NODE.address)
        self.stub = pb2_grpc.BridgeServiceStub(self.channel)
        self.session = sid()
        self.ctx = SessionContext(self.channel, self.session, cache_ttl=0)

    def tearDown(self):
        self.channel.close()

    def history(self):
        """session_created, register x=0, x=1..3 (versions 1..3): sequences 1..5."""
        self.ctx.register_variable("x", "integer", 0)
        for v in (1, 2, 3):
            self.ctx.update_variable("x", v)

    def test_get_events_in_order_with_json_data(self):
        self.history()
        evs = self.ctx.get_events()
        self.assertEqual([e.type for e in evs],
                         ["session_created", "variable_registered"] + ["variable_updated"] * 3)
        self.assertEqual([e.sequence for e in evs], [1, 2, 3, 4, 5])
        self.assertEqual(sorted(e.position for e in evs), [e.position for e in evs])
        self.assertTrue(all(e.session_id == self.session for e in evs))
        self.assertEqual(len({e.id for e in evs}), 5)
        upd = evs[3]
        self.assertEqual((upd.data["name"], upd.data["old_value"], upd.data["value"], upd.data["version"]),
                         ("x", 1, 2, 2))
        self.assertIn("node", upd.metadata)
        self.assertGreater(upd.timestamp, 1.6e9)

    def test_get_events_bounds_types_limit_direction(self):
        self.history()
        seq = lambda evs: [e.sequence for e in evs]  # noqa: E731
        self.assertEqual(seq(self.ctx.get_events(since=2, until=4)), [2, 3, 4])
        self.assertEqual(seq(self.ctx.get_events(types=["variable_updated"])), [3, 4, 5])
        self.assertEqual(seq(self.ctx.get_events(limit=2)), [1, 2])
        self.assertEqual(seq(self.ctx.get_events(direction="backward", limit=2)), [5, 4])
        all_evs = self.ctx.get_events()
        t3 = all_evs[2].timestamp
        self.assertEqual(seq(self.ctx.get_events(since=t3)), [e.sequence for e in all_evs if e.timestamp >= t3])
        self.assertEqual(seq(self.ctx.get_events(until=t3)), [e.sequence for e in all_evs if e.timestamp <= t3])
        self.assertEqual(self.ctx.get_events(types=["no_such_type"]), [])
        with self.assertRaises(ValueError):
            self.ctx.get_events(direction="sideways")

    def test_get_events_invalid_arguments(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetEvents(pb2.GetEventsRequest(session_id=self.session, limit=-1))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        req = pb2.GetEventsRequest(session_id=self.session, since_sequence=2)
        req.since_time.seconds = 1
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetEvents(req)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetEvents(pb2.GetEventsRequest(session_id=""))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_bad_type_filters_are_invalid_and_leave_other_watches_running(self):
        """A type name the log cannot hold ("", over 255 bytes) is INVALID_ARGUMENT for GetEvents and
        WatchEvents; a watch running meanwhile goes on (the events server did not crash)."""
        self.history()
        got = []
        with self.ctx.watch_events(from_sequence=1, timeout=60) as w:
            got.append(next(w))
            for types in ([""], ["x" * 256], ["ok", "x" * 5000]):
                with self.assertRaises(grpc.RpcError) as cm:
                    self.stub.GetEvents(pb2.GetEventsRequest(session_id=self.session, types=types))
                self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
                call = self.stub.WatchEvents(pb2.WatchEventsRequest(session_id=self.session, types=types,
                                                                    from_sequence=1), timeout=30)
                with self.assertRaises(grpc.RpcError) as cm:
                    next(call)
                self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.ctx.update_variable("x", 4)            # sequence 6, after the bad calls
            for e in w:
                got.append(e)
                if e.sequence == 6:
                    break
        self.assertEqual([e.sequence for e in got], list(range(1, 7)))

    def test_a_status_message_is_bounded(self):
        """An error that echoes a long request still reaches the client as its status (the message is cut
        to 1 KiB), not as RESOURCE_EXHAUSTED for metadata over the client's limit."""
        long_id = "\u00e9" * 50000                     # 100 KB of UTF-8
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetStateAt(pb2.GetStateAtRequest(session_id=long_id, sequence=1))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND)
        details = cm.exception.details()
        self.assertLessEqual(len(details.encode("utf-8")), 1024)
        self.assertTrue(details.startswith("session not found: \u00e9"), details[:40])
        self.assertTrue(details.endswith("..."), details[-10:])

    def test_watch_events_catch_up_then_live_without_gap_or_duplicate(self):
        self.history()                                   # sequences 1..5 stored
        n_live = 100
        got = []
        with self.ctx.watch_events(from_sequence=3, timeout=60) as w:
            writer_ctx = SessionContext(NODE.address, self.session, create=False)

            def writer():
                for v in range(n_live):
                    writer_ctx.update_variable("x", 100 + v, var_type="integer")
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            for e in w:
                got.append(e)
                if len(got) == 3 + n_live:
                    break
            t.join()
            writer_ctx.close()
        self.assertEqual([e.sequence for e in got], list(range(3, 6 + n_live)))
        self.assertEqual([e.data["value"] for e in got[3:]], [100 + v for v in range(n_live)])
        # from a position, filtered by type: the same events
        with self.ctx.watch_events(types=["variable_registered"], from_position=1,
                                   timeout=60) as w:
            first = next(w)
        self.assertEqual((first.type, first.sequence), ("variable_registered", 2))

    def test_watch_events_from_a_sequence_not_written_yet(self):
        self.ctx.register_variable("y", "string", "a")   # sequences 1, 2
        with self.ctx.watch_events(from_sequence=4, timeout=60) as w:
            self.ctx.update_variable("y", "b")           # 3: skipped
            self.ctx.update_variable("y", "c")           # 4
            e = next(w)
        self.assertEqual((e.sequence, e.data["value"]), (4, "c"))

    def test_state_at_sequence_and_time(self):
        self.history()
        evs = self.ctx.get_events()
        for e, value, version in zip(evs[1:], [0, 1, 2, 3], [0, 1, 2, 3]):
            st = self.ctx.state_at(sequence=e.sequence)
            self.assertEqual(st["id"], self.session)
            self.assertEqual((st["variables"]["x"]["value"], st["variables"]["x"]["version"]), (value, version))
            st_t = self.ctx.state_at(time=e.timestamp)
            self.assertEqual(st_t["variables"]["x"]["version"], version)
        self.assertEqual(self.ctx.state_at(sequence=1)["variables"], {})
        with self.assertRaises(SessionNotFoundError):
            SessionContext(self.channel, sid(), create=False).state_at(sequence=3)
        with self.assertRaises(ValueError):
            self.ctx.state_at()
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.GetStateAt(pb2.GetStateAtRequest(session_id=self.session))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_state_at_and_events_decode_values_by_type(self):
        """Non-finite floats, embeddings and tensors as every other read gives
        them, not as the wire's strings: in state_at, in variable_registered
        (its type) and in the value changes (value_type, which the server adds
        to their data), from get_events and watch_events alike."""
        inf = float("inf")
        self.ctx.register_variable("f", "float", float("nan"))
        self.ctx.register_variable("e", "embedding", [1.0, inf])
        self.ctx.register_variable("t", "tensor", {"shape": [2], "data": [-inf, 2.0]})
        self.ctx.register_variable("s", "string", "NaN")     # a string, not a float
        self.ctx.register_variable("i", "integer", 1)
        self.ctx.update_variable("f", -inf)
        last = self.ctx.get_events()[-1].sequence
        vars_ = self.ctx.state_at(sequence=last)["variables"]
        self.assertEqual(vars_["f"]["value"], -inf)
        self.assertTrue(math.isnan(vars_["f"]["history"][0]["value"]))
        self.assertEqual(vars_["e"]["value"], [1.0, inf])
        self.assertEqual(vars_["t"]["value"], {"shape": [2], "data": [-inf, 2.0]})
        registered = {e.data["name"]: e.data for e in self.ctx.get_events(types=["variable_registered"])}
        self.assertTrue(math.isnan(registered["f"]["value"]))
        self.assertEqual(registered["e"]["value"], [1.0, inf])
        self.ctx.update_variable("e", [-inf, 3.0])
        self.ctx.update_variable("t", {"shape": [1, 1], "data": [inf]})
        self.ctx.update_variable("s", "Infinity")
        self.ctx.update_variable("i", 2)
        self.ctx.rollback_variable("f", 0)
        with self.ctx.watch_events(types=["variable_updated", "variable_rolled_back"], from_sequence=1,
                                   timeout=60) as w:
            watched = [next(w) for _ in range(6)]
        for updates in (self.ctx.get_events(types=["variable_updated", "variable_rolled_back"]), watched):
            data = {(e.type, e.data["name"]): e.data for e in updates}
            f = data["variable_updated", "f"]
            self.assertEqual(f["value_type"], "float")
            self.assertEqual(f["value"], -inf)
            self.assertTrue(math.isnan(f["old_value"]) and math.isnan(f["previous"]["value"]))
            back = data["variable_rolled_back", "f"]
            self.assertTrue(math.isnan(back["value"]))
            self.assertEqual(back["old_value"], -inf)
            e = data["variable_updated", "e"]
            self.assertEqual((e["value_type"], e["value"], e["old_value"]), ("embedding", [-inf, 3.0], [1.0, inf]))
            t = data["variable_updated", "t"]
            self.assertEqual((t["value_type"], t["value"], t["old_value"]),
                             ("tensor", {"shape": [1, 1], "data": [inf]}, {"shape": [2], "data": [-inf, 2.0]}))
            st = data["variable_updated", "s"]
            self.assertEqual((st["value_type"], st["value"], st["old_value"]), ("string", "Infinity", "NaN"))
            i = data["variable_updated", "i"]
            self.assertEqual((i["value_type"], i["value"], i["old_value"]), ("integer", 2, 1))
            self.assertIs(type(i["value"]), int)


if __name__ == "__main__":
    unittest.main()
