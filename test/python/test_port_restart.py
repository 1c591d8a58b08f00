"""The port program is killed mid-call: in-flight calls end UNAVAILABLE, the
supervisor restarts the port, the next call works and no state is lost.
A second node started on a port the first serves does not serve gRPC (it
runs without, saying why), and every client reaches the first node's store."""

import os
import signal
import threading
import time
import unittest
import uuid

import _paths  # noqa: F401
import grpc

from bridge_node import BridgeNode
from dspex_bridge import BridgeUnavailableError, SessionContext

RESTART_DEADLINE = 30.0


class PortKilledMidCall(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.node = BridgeNode().start()

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def wait_for(self, what, pred, deadline=RESTART_DEADLINE):
        """Bounded polling: there is no event telling us an OS process appeared."""
        end = time.monotonic() + deadline
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                self.fail("timed out waiting for " + what)
            time.sleep(0.05)

    def test_kill_port_mid_call_then_recover(self):
        session = "restart_" + uuid.uuid4().hex[:8]
        ctx = SessionContext(self.node.address, session, cache_ttl=0, timeout=10)
        ctx.register_variable("x", "integer", 41)
        pids = self.wait_for("the port program", self.node.port_program_pids)
        self.assertEqual(len(pids), 1, pids)
        old = pids[0]

        # A watch stream is a call that is certainly in flight at the kill.
        watch = ctx.watch(["x"], include_initial=True)
        self.assertEqual(next(watch).value, 41)
        # ...and unary calls hammering the bridge while it dies.
        stop = threading.Event()
        outcomes = {"ok": 0, "unavailable": 0, "other": []}
        lock = threading.Lock()

        def hammer():
            c = SessionContext(self.node.address, session, create=False, cache_ttl=0, timeout=10)
            while not stop.is_set():
                try:
                    c.get_variable("x")
                    key = "ok"
                except BridgeUnavailableError:
                    key = "unavailable"
                except Exception as e:  # noqa: BLE001 - asserted below
                    with lock:
                        outcomes["other"].append(repr(e))
                    continue
                with lock:
                    outcomes[key] += 1
            c.close()

        # daemon threads, stopped on every way out: a failed wait must not
        # leave them hammering, which keeps the interpreter from exiting
        ts = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
        for t in ts:
            t.start()

        def stop_hammering():
            stop.set()
            for t in ts:
                t.join(timeout=30)
        self.addCleanup(stop_hammering)
        self.wait_for("calls to flow", lambda: outcomes["ok"] > 20)
        os.kill(old, signal.SIGKILL)

        with self.assertRaises(BridgeUnavailableError) as cm:
            next(watch)
        self.assertEqual(cm.exception.code, grpc.StatusCode.UNAVAILABLE)

        # The supervisor starts a new port program; calls work again.
        new = self.wait_for("a new port program",
                            lambda: [p for p in self.node.port_program_pids() if p != old])
        self.assertEqual(len(new), 1, new)

        def works():
            try:
                return ctx.get_variable("x") == 41
            except BridgeUnavailableError:
                return False
        self.wait_for("a call to succeed after the restart", works)
        count_before = outcomes["ok"]
        self.wait_for("hammering threads to succeed again",
                      lambda: outcomes["ok"] > count_before + 20)
        stop_hammering()
        self.assertGreater(outcomes["unavailable"], 0, "no call saw the port die")
        self.assertEqual(outcomes["other"], [])
        self.assertNotIn(old, self.node.port_program_pids())

        # State lives in the BEAM: nothing was lost, writes and watches work.
        self.assertEqual(ctx.update_variable("x", 42), 1)
        with ctx.watch(["x"]) as w:
            ctx["x"] = 43
            self.assertEqual(next(w).value, 43)
        ctx.close()


if __name__ == "__main__":
    unittest.main()


class SecondNodeOnTheSamePort(unittest.TestCase):
    def test_second_node_is_refused_and_clients_see_one_store(self):
        session = "dup_" + uuid.uuid4().hex[:8]
        with BridgeNode() as first:
            ctx = SessionContext(first.address, session, cache_ttl=0, timeout=10)
            ctx.register_variable("x", "integer", 42)
            second = BridgeNode(port=first.port).launch()
            try:
                end = time.monotonic() + 60
                while "runs without gRPC" not in second.log():  # bounded polling of its log
                    self.assertLess(time.monotonic(), end, "no busy-port error; log:\n" + second.log())
                    self.assertIsNone(second.proc.poll(), "the second node died; log:\n" + second.log())
                    time.sleep(0.05)
                log = second.log()
                self.assertIn("cannot listen on %s: address in use (eaddrinuse" % first.address, log)
                # fresh clients (new channels) all reach the one store, while
                # the second node retries
                for _ in range(12):
                    c = SessionContext(first.address, session, create=False, cache_ttl=0, timeout=10)
                    try:
                        self.assertEqual(c.get_variable("x"), 42)
                    finally:
                        c.close()
            finally:
                second.stop()
            # and after it is gone
            for _ in range(3):
                c = SessionContext(first.address, session, create=False, cache_ttl=0, timeout=10)
                try:
                    self.assertEqual(c.get_variable("x"), 42)
                finally:
                    c.close()
            ctx.close()
