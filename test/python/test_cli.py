"""The operator CLI (python3 -m dspex_bridge) end to end against a real node,
run as users run it: a subprocess of the interpreter the tests use (in
`make test-python`, the venv with the installed package)."""

import json
import os
import re
import subprocess
import sys
import unittest
import uuid

import _paths
from bridge_node import BridgeNode, free_port
from dspex_bridge import SessionContext, __version__

NODE = None


def setUpModule():
    global NODE
    NODE = BridgeNode().start()


def tearDownModule():
    NODE.stop()


def cli(*args, address=None):
    env = dict(os.environ)
    if env.get("DSPEX_BRIDGE_INSTALLED") != "1":
        env["PYTHONPATH"] = _paths.PKG_DIR
    p = subprocess.run([sys.executable, "-m", "dspex_bridge", "--address", address or NODE.address] + list(args),
                       capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


class Cli(unittest.TestCase):
    def setUp(self):
        self.sid = "cli_" + uuid.uuid4().hex[:8]
        self.ctx = SessionContext(NODE.address, self.sid, cache_ttl=0)

    def tearDown(self):
        self.ctx.cleanup()
        self.ctx.close()

    def test_ping(self):
        rc, out, err = cli("ping")
        self.assertEqual(rc, 0, err)
        self.assertRegex(out, r"^127\.0\.0\.1:\d+: pong: cli in [\d.]+ ms$")

    def test_sessions(self):
        other = SessionContext(NODE.address, self.sid + "_b", cache_ttl=0)
        try:
            other.register_variable("x", "integer", 1)
            rc, out, err = cli("--json", "sessions", "--pattern", self.sid + "*")
            self.assertEqual(rc, 0, err)
            got = json.loads(out)
            self.assertEqual(got["total"], 2)
            self.assertEqual([(s["session_id"], s["variables"]) for s in got["sessions"]],
                             [(self.sid, 0), (self.sid + "_b", 1)])
            rc, out, _ = cli("sessions", "--pattern", self.sid + "*", "--limit", "1")
            self.assertEqual(rc, 0)
            self.assertEqual(out.splitlines()[0].split(), ["SESSION", "VARIABLES", "CREATED"])
            self.assertEqual(out.splitlines()[1].split()[:2], [self.sid, "0"])
            self.assertEqual(out.splitlines()[-1], "(1 of 2 sessions)")
        finally:
            other.cleanup()
            other.close()

    def test_vars_and_history(self):
        self.ctx.register_variable("temperature", "float", 0.5)
        self.ctx.register_variable("prompt", "string", "hello")
        self.ctx.update_variable("temperature", 0.7)
        rc, out, err = cli("vars", self.sid)
        self.assertEqual(rc, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "TYPE", "VERSION", "UPDATED", "VALUE"])
        self.assertEqual([l.split()[:3] for l in lines[1:]], [["prompt", "string", "0"], ["temperature", "float", "1"]])
        self.assertEqual(lines[2].split()[-1], "0.7")
        rc, out, err = cli("--json", "history", self.sid, "temperature")
        self.assertEqual(rc, 0, err)
        self.assertEqual([(e["version"], e["value"]) for e in json.loads(out)], [(0, 0.5)])

    def test_watch_prints_changes_in_order(self):
        self.ctx.register_variable("t", "integer", 0)
        env = dict(os.environ)
        if env.get("DSPEX_BRIDGE_INSTALLED") != "1":
            env["PYTHONPATH"] = _paths.PKG_DIR
        p = subprocess.Popen([sys.executable, "-m", "dspex_bridge", "--address", NODE.address, "--json",
                              "watch", self.sid, "t", "--initial", "--count", "4", "--seconds", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             stdin=subprocess.DEVNULL)
        try:
            first = json.loads(p.stdout.readline())        # the initial value: the watch is live
            self.assertEqual((first["update_type"], first["value"]), ("initial_value", 0))
            for v in (1, 2, 3):
                self.ctx.update_variable("t", v)
            rest = [json.loads(p.stdout.readline()) for _ in range(3)]
            self.assertEqual([(e["version"], e["value"]) for e in rest], [(1, 1), (2, 2), (3, 3)])
            self.assertEqual(p.wait(timeout=30), 0)
        finally:
            if p.poll() is None:
                p.kill()
            p.stdout.close()
            p.stderr.close()

    def test_errors_and_exit_codes(self):
        rc, out, err = cli("vars", "no_such_session_" + self.sid)
        self.assertEqual((rc, out), (3, ""))
        self.assertIn("session not found", err)
        self.ctx.register_variable("x", "integer", 1)
        rc, _, err = cli("history", self.sid, "missing")
        self.assertEqual(rc, 3)
        self.assertIn("not found", err)
        rc, _, err = cli("ping", address="127.0.0.1:%d" % free_port())   # nobody listens there
        self.assertEqual(rc, 4)
        self.assertIn("cannot reach", err)
        rc, _, err = cli("frobnicate")
        self.assertEqual(rc, 2)
        self.assertIn("invalid choice", err)
        for args in (["sessions", "--limit", "-1"], ["history", self.sid, "x", "--limit", "-1"],
                     ["watch", self.sid, "x", "--count", "-2"], ["--timeout", "nan", "ping"]):
            rc, _, err = cli(*args)
            self.assertEqual(rc, 2, args)                 # usage, not "another error"
            self.assertIn("usage:", err)

    def test_json_is_standard_json(self):
        """Non-finite floats as the wire contract's strings, never NaN/Infinity literals."""
        self.ctx.register_variable("f", "float", float("nan"))
        self.ctx.register_variable("e", "embedding", [1.0, float("inf"), float("-inf")])
        self.ctx.update_variable("f", float("inf"))

        def strict(text):
            return json.loads(text, parse_constant=lambda c: self.fail("non-standard JSON: " + c))
        rc, out, err = cli("--json", "vars", self.sid)
        self.assertEqual(rc, 0, err)
        self.assertEqual({v["name"]: v["value"] for v in strict(out)},
                         {"f": "Infinity", "e": [1.0, "Infinity", "-Infinity"]})
        rc, out, err = cli("--json", "history", self.sid, "f")
        self.assertEqual(rc, 0, err)
        self.assertEqual([e["value"] for e in strict(out)], ["NaN"])
        rc, out, err = cli("--json", "watch", self.sid, "e", "--initial", "--count", "1")
        self.assertEqual(rc, 0, err)
        self.assertEqual(strict(out)["value"], [1.0, "Infinity", "-Infinity"])


class Package(unittest.TestCase):
    def test_version_is_the_applications(self):
        app = open(os.path.join(_paths.ROOT, "src", "dspex_bridge.app.src")).read()
        self.assertEqual(__version__, re.search(r'\{vsn, "([^"]+)"\}', app).group(1))

    def test_installed_when_make_says_so(self):
        import dspex_bridge
        where = os.path.realpath(dspex_bridge.__file__)
        if os.environ.get("DSPEX_BRIDGE_INSTALLED") == "1":
            self.assertNotIn(os.path.realpath(_paths.PKG_DIR), where)
            self.assertIn("site-packages", where)
        self.assertTrue(os.path.isfile(os.path.join(os.path.dirname(where), "py.typed")))


if __name__ == "__main__":
    unittest.main()
