"""worker.py speaks the frame protocol and never outlives its stdin.

Run: /usr/bin/python3 -m unittest discover -s test/python_workers -p 'test_*.py'
"""

import json
import os
import struct
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(ROOT, "priv", "python", "dspex_bridge", "worker.py")
CHAOS = os.path.join(HERE, "chaos.py")


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Worker:
    def __init__(self, *extra, module=CHAOS, env=None):
        self.proc = subprocess.Popen(["/usr/bin/python3", WORKER, "--module", module] + list(extra),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **(env or {})))

    def send(self, obj):
        body = json.dumps(obj).encode()
        self.proc.stdin.write(struct.pack(">I", len(body)) + body)
        self.proc.stdin.flush()

    def recv(self):
        head = self.proc.stdout.read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        return json.loads(self.proc.stdout.read(n))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (BrokenPipeError, OSError):
                pass


class ProtocolTest(unittest.TestCase):
    def setUp(self):
        self.w = Worker("--session", "s1", "--address", "10.0.0.1:1")

    def tearDown(self):
        self.w.close()

    def test_ready_then_calls(self):
        ready = self.w.recv()
        self.assertEqual(ready["type"], "ready")
        self.assertEqual(ready["pid"], self.w.proc.pid)
        self.assertEqual(ready["session"], "s1")
        self.assertIn("work", ready["functions"])
        self.w.send({"type": "call", "id": 7, "fn": "echo", "args": [{"a": [1, "é"]}]})
        self.assertEqual(self.w.recv(), {"type": "reply", "id": 7, "ok": {"a": [1, "é"]}})
        self.w.send({"type": "call", "id": 8, "fn": "env", "args": []})
        env = self.w.recv()["ok"]
        self.assertEqual((env["address"], env["session"]), ("10.0.0.1:1", "s1"))

    def test_keyword_arguments_and_streamed_calls(self):
        w = Worker(module=os.path.join(HERE, "tools_mod.py"))
        try:
            self.assertEqual(w.recv()["type"], "ready")
            w.send({"type": "call", "id": 1, "fn": "add", "args": [1], "kwargs": {"b": 2}})
            self.assertEqual(w.recv(), {"type": "reply", "id": 1, "ok": 3})
            # a generator: one chunk frame per item, in order, then the count
            w.send({"type": "call", "id": 2, "fn": "count", "args": [], "kwargs": {"n": 2}, "stream": True})
            self.assertEqual([w.recv() for _ in range(3)],
                             [{"type": "chunk", "id": 2, "data": {"i": 0, "label": "item"}},
                              {"type": "chunk", "id": 2, "data": {"i": 1, "label": "item"}},
                              {"type": "reply", "id": 2, "ok": {"chunks": 2}}])
            # not streamed: the generator's items as one list; a plain value streamed is one chunk
            w.send({"type": "call", "id": 3, "fn": "count", "args": [1]})
            self.assertEqual(w.recv(), {"type": "reply", "id": 3, "ok": [{"i": 0, "label": "item"}]})
            w.send({"type": "call", "id": 4, "fn": "add", "args": [1, 1], "stream": True})
            self.assertEqual([w.recv() for _ in range(2)],
                             [{"type": "chunk", "id": 4, "data": 2}, {"type": "reply", "id": 4, "ok": {"chunks": 1}}])
            # failing mid-stream: the items sent, then the error
            w.send({"type": "call", "id": 5, "fn": "count_then_fail", "args": [1], "stream": True})
            self.assertEqual(w.recv(), {"type": "chunk", "id": 5, "data": 0})
            self.assertEqual(w.recv()["error"], {"type": "RuntimeError", "message": "stream broke after 1"})
            w.send({"type": "call", "id": 6, "fn": "add", "args": [], "kwargs": [1]})
            self.assertEqual(w.recv()["error"]["type"], "bad_args")
        finally:
            w.close()

    def test_errors_are_replies(self):
        self.w.recv()
        self.w.send({"type": "call", "id": 1, "fn": "fail", "args": ["no"]})
        self.assertEqual(self.w.recv()["error"], {"type": "ValueError", "message": "no"})
        self.w.send({"type": "call", "id": 2, "fn": "missing", "args": []})
        self.assertEqual(self.w.recv()["error"]["type"], "unknown_function")
        self.w.send({"type": "call", "id": 3, "fn": "echo", "args": "notalist"})
        self.assertEqual(self.w.recv()["error"]["type"], "bad_args")
        self.w.send({"type": "call", "id": 4, "fn": "unserialisable", "args": []})
        self.assertEqual(self.w.recv()["error"]["type"], "bad_result")
        self.w.send({"type": "ping", "id": 5})
        self.assertEqual(self.w.recv(), {"type": "pong", "id": 5})

    def test_eof_ends_the_worker_even_mid_call(self):
        self.w.recv()
        self.w.send({"type": "call", "id": 1, "fn": "spin", "args": []})
        self.assertEqual(self.w.recv()["message"], "spinning")  # the call is running
        self.assertIsNone(self.w.proc.poll())
        self.w.proc.stdin.close()
        self.assertEqual(self.w.proc.wait(timeout=10), 0)

    def test_stop_message_ends_the_worker(self):
        self.w.recv()
        self.w.send({"type": "stop"})
        self.assertEqual(self.w.proc.wait(timeout=10), 0)

    def test_reply_over_the_frame_limit_is_refused(self):
        # the BEAM kills a worker whose frame is over max_frame: it is not sent
        w = Worker(module=os.path.join(HERE, "tools_mod.py"), env={"DSPEX_WORKER_MAX_FRAME": "1000"})
        try:
            self.assertEqual(w.recv()["type"], "ready")
            w.send({"type": "call", "id": 1, "fn": "big", "args": [2000]})
            reply = w.recv()
            self.assertEqual((reply["id"], reply["type"]), (1, "reply"))
            self.assertGreater(reply["too_large"], 2000)
            w.send({"type": "call", "id": 2, "fn": "big_chunks", "args": [2000], "stream": True})
            self.assertEqual(w.recv(), {"type": "chunk", "id": 2, "data": "small"})
            self.assertGreater(w.recv()["too_large"], 2000)
            w.send({"type": "call", "id": 3, "fn": "add", "args": [1, 2]})
            self.assertEqual(w.recv(), {"type": "reply", "id": 3, "ok": 3})
        finally:
            w.close()

    def test_oversized_frame_ends_the_worker(self):
        self.w.recv()
        self.w.proc.stdin.write(struct.pack(">I", 0xFFFFFFFF))
        self.w.proc.stdin.flush()
        self.assertEqual(self.w.proc.wait(timeout=10), 2)


class LoadTest(unittest.TestCase):
    def test_module_that_does_not_load(self):
        w = Worker(module=os.path.join(HERE, "no_such_module.py"))
        try:
            msg = w.recv()
            self.assertEqual(msg["type"], "load_error")
            self.assertEqual(msg["error"]["type"], "FileNotFoundError")
            self.assertIn("no_such_module.py", msg["error"]["message"])
            self.assertIsNone(w.recv())
            self.assertEqual(w.proc.wait(timeout=10), 3)
        finally:
            w.close()

    def test_module_that_raises_names_its_line(self):
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "broken.py")
            with open(path, "w") as f:
                f.write("import os\n\nraise ImportError('no dspy here')\n")
            for body, kind in (("raise ImportError('no dspy here')", "ImportError"),
                               ("import sys; sys.exit(7)", "SystemExit"),
                               ("def f(:\n", "SyntaxError")):
                with open(path, "w") as f:
                    f.write("import os\n\n" + body + "\n")
                w = Worker(module=path)
                try:
                    msg = w.recv()
                    self.assertEqual((msg["type"], msg["error"]["type"]), ("load_error", kind))
                    if kind == "ImportError":
                        self.assertEqual(msg["error"]["message"], "no dspy here (%s, line 3)" % path)
                    self.assertEqual(w.proc.wait(timeout=10), 3)
                finally:
                    w.close()

    def test_parent_death_kills_a_worker_stuck_in_c(self):
        # a middle process starts the worker and is SIGKILLed; the worker,
        # stuck in C with the GIL held, still gets the parent-death SIGKILL
        code = ("import subprocess,sys,struct,json,os;"
                "p=subprocess.Popen([sys.executable,%r,'--module',%r],stdin=subprocess.PIPE,"
                "stdout=subprocess.PIPE,stderr=subprocess.DEVNULL);"
                "h=p.stdout.read(4);p.stdout.read(struct.unpack('>I',h)[0]);"
                "b=json.dumps({'type':'call','id':1,'fn':'hang','args':[]}).encode();"
                "p.stdin.write(struct.pack('>I',len(b))+b);p.stdin.flush();"
                "print(p.pid,flush=True);os.dup2(os.open(os.devnull,os.O_RDONLY),0);"
                "import time;time.sleep(600)") % (WORKER, CHAOS)
        # the worker keeps a copy of our pipe: give the middle process its own stdin
        middle = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        pid = int(middle.stdout.readline())
        time.sleep(0.3)
        self.assertTrue(alive(pid))
        middle.kill()
        middle.wait()
        middle.stdout.close()
        deadline = time.time() + 10
        while alive(pid) and time.time() < deadline:
            time.sleep(0.02)
        self.assertFalse(alive(pid))


if __name__ == "__main__":
    unittest.main()
