"""`make run` and bin/dspex_bridge, as a user, systemd or a container run them.

Without a terminal the node must keep serving (gRPC and Prometheus answer)
until SIGTERM or SIGINT, then stop cleanly: exit status 0, no error report,
no process of its tree left (the gRPC port program included). With a
terminal it is an Erlang shell whose prompt comes after the node's banner.

Every node gets free ports and its own node name, so runs of other checkouts
on the machine do not matter. Waits are bounded polls, never fixed sleeps.
"""

import glob
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "bin", "dspex_bridge")
START_TIMEOUT = 240  # `make run` may build first, on a loaded machine
STOP_TIMEOUT = 60
BAD = re.compile(r"CRASH REPORT|ERROR REPORT|SUPERVISOR REPORT|erl_crash|Runtime terminating")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rfind(")") + 2:].split()[1])


def descendants(root):
    """Every live process under root (by parent links), epmd excepted: it
    daemonises and is shared by every node of the machine."""
    kids = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = int(stat.split("/")[2])
        ppid = parent_of(pid)
        if ppid is not None:
            kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            if "epmd" not in cmdline(k):
                out.append(k)
                todo.append(k)
    return out


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def default_signals():
    """In the child, before exec: the stop signals at their defaults, as a
    service manager starts a program. A test run started as a background job
    of a non-interactive shell inherits SIGINT ignored, and a POSIX shell
    cannot trap a signal that was ignored when it started (the script could
    then never turn SIGINT into a clean stop)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def proc_state(pid):
    """State, signal masks and wait channel of a process, from /proc."""
    try:
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open("/proc/%d/wchan" % pid) as f:
            wchan = f.read()
    except OSError:
        return "gone"
    return "%s pending=%s blocked=%s ignored=%s caught=%s wchan=%s" % tuple(
        [fields.get(k, "").strip() for k in ("State", "SigPnd", "SigBlk", "SigIgn", "SigCgt")] + [wchan])


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def serving(grpc, metrics):
    try:
        with socket.create_connection(("127.0.0.1", grpc), timeout=2):
            pass
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class Node:
    """One node started without a terminal, output to a file."""

    def __init__(self, argv, env):
        self.grpc, self.metrics = free_port(), free_port()
        self.name = "dspex_run_test_%d_%d" % (os.getpid(), free_port())
        self.log = tempfile.NamedTemporaryFile(prefix="dspex_run_", suffix=".log", delete=False)
        env = dict(os.environ, **env(self))
        self.proc = subprocess.Popen(argv(self), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=default_signals)

    def output(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def await_serving(self, test):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            test.assertIsNone(self.proc.poll(), "the node exited:\n" + self.output())
            if serving(self.grpc, self.metrics) and "running on node" in self.output():
                return
            time.sleep(0.2)
        test.fail("not serving after %ds:\n%s" % (START_TIMEOUT, self.output()))

    def stop(self, test, sig, target=None):
        tree = descendants(self.proc.pid)
        test.assertTrue(any("dspex_grpc_port" in cmdline(p) for p in tree), tree)
        if target == "group":
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # what each process of the tree was doing (shell in wait, node stopping or not)
            states = [(p, proc_state(p), cmdline(p)[:120]) for p in descendants(self.proc.pid)]
            self.kill()
            test.fail("still running %ds after signal %d (%s):\n%s" % (STOP_TIMEOUT, sig, states, self.output()))
        deadline = time.monotonic() + STOP_TIMEOUT
        while [p for p in tree if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.1)
        test.assertEqual([], [(p, cmdline(p)) for p in tree if alive(p)], "left running")
        return rc

    def kill(self):
        # the whole session: what is left of the tree even when its first
        # process has exited (e.g. a test failing after make died)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self):
        self.kill()
        os.unlink(self.log.name)
        remove_event_log(self.name)


def remove_event_log(name):
    """A named node keeps its event log in data/events/<node>: a test node's
    is of no use after the test."""
    for d in glob.glob(os.path.join(ROOT, "data", "events", name + "@*")):
        shutil.rmtree(d, ignore_errors=True)


def script_env(node):
    return {"DSPEX_GRPC": str(node.grpc), "DSPEX_METRICS": str(node.metrics), "DSPEX_NODE": node.name}


class HeadlessTest(unittest.TestCase):
    def run_node(self, argv, sig, target=None):
        node = Node(argv, script_env)
        self.addCleanup(node.close)
        node.await_serving(self)
        # still serving: end of input did not stop it
        self.assertIsNone(node.proc.poll())
        rc = node.stop(self, sig, target)
        out = node.output()
        self.assertIsNone(BAD.search(out), out)
        self.assertIn("dspex_bridge %s running on node %s@" % (self.vsn(), node.name), out)
        self.assertIn("127.0.0.1:%d" % node.grpc, out)
        self.assertIn("http://127.0.0.1:%d/metrics" % node.metrics, out)
        self.assertIn("node %s stopped (exit status 0)" % node.name, out)
        return rc

    def vsn(self):
        with open(os.path.join(ROOT, "src", "dspex_bridge.app.src")) as f:
            return re.search(r'\{vsn, "([^"]+)"\}', f.read()).group(1)

    def test_script_serves_until_sigterm(self):
        self.assertEqual(0, self.run_node(lambda n: [SCRIPT], signal.SIGTERM))

    def test_script_serves_until_sigint(self):
        self.assertEqual(0, self.run_node(lambda n: [SCRIPT, "start"], signal.SIGINT))

    def test_script_stops_when_its_whole_group_gets_sigterm(self):
        # systemd (KillMode=control-group) and `docker stop` of a shell
        self.assertEqual(0, self.run_node(lambda n: [SCRIPT], signal.SIGTERM, "group"))

    def test_make_run_without_terminal(self):
        # make itself dies of the signal it got (GNU make re-raises it after
        # passing SIGTERM to its children): the node's clean stop is its
        # "exit status 0" line and the empty process tree, checked above
        argv = lambda n: ["make", "--no-print-directory", "run", "GRPC=%d" % n.grpc,
                          "METRICS=%d" % n.metrics, "NODE=%s" % n.name]
        rc = self.run_node(argv, signal.SIGTERM)
        self.assertIn(rc, (0, -signal.SIGTERM))

    def test_unreadable_config_is_refused_before_starting(self):
        env = lambda n: {"DSPEX_NODE": n.name, "DSPEX_CONFIG": "/nonexistent/sys.config"}
        node = Node(lambda n: [SCRIPT], env)
        self.addCleanup(node.close)
        self.assertEqual(2, node.proc.wait(STOP_TIMEOUT), node.output())
        self.assertIn("cannot read the config file /nonexistent/sys.config", node.output())

    def test_config_file_sets_the_environment(self):
        # what ERL_FLAGS could not carry: a string value, through a sys.config
        conf = tempfile.NamedTemporaryFile("w", suffix=".config", delete=False)
        self.addCleanup(os.unlink, conf.name)
        env = lambda n: {"DSPEX_NODE": n.name, "DSPEX_CONFIG": conf.name}
        grpc, metrics = free_port(), free_port()
        conf.write('[{dspex_bridge, [{grpc_listen, "127.0.0.1:%d"}, {prometheus_port, %d}]}].\n'
                   % (grpc, metrics))
        conf.close()
        node = Node(lambda n: [SCRIPT], env)
        self.addCleanup(node.close)
        node.grpc, node.metrics = grpc, metrics
        node.await_serving(self)
        self.assertEqual(0, node.stop(self, signal.SIGTERM))


class TerminalTest(unittest.TestCase):
    def test_banner_comes_before_the_prompt_and_q_stops(self):
        name = "dspex_run_tty_%d_%d" % (os.getpid(), free_port())
        self.addCleanup(remove_event_log, name)
        env = dict(os.environ, DSPEX_GRPC="0", DSPEX_METRICS="0", DSPEX_NODE=name)
        pid, fd = pty.fork()
        if pid == 0:
            os.chdir(ROOT)
            os.execve(SCRIPT, [SCRIPT], env)
        out = b""

        def read_until(marker, timeout):
            nonlocal out
            deadline = time.monotonic() + timeout
            while marker not in out and time.monotonic() < deadline:
                r, _, _ = select.select([fd], [], [], 0.2)
                if r:
                    try:
                        out += os.read(fd, 65536)
                    except OSError:
                        return

        try:
            prompt = ("(%s@" % name).encode()
            read_until(prompt, START_TIMEOUT)
            self.assertIn(prompt, out, out.decode(errors="replace"))
            text = out.decode(errors="replace")
            self.assertIn("running on node %s@" % name, text)
            self.assertLess(text.index("running on node"), text.index("Eshell"), text)
            self.assertLess(text.index("stop           :"), text.index("(%s@" % name), text)
            os.write(fd, b"q().\n")
            deadline = time.monotonic() + STOP_TIMEOUT
            status = None
            while status is None and time.monotonic() < deadline:
                read_until(b"\x00never", 0.2)  # keep the terminal drained
                done, st = os.waitpid(pid, os.WNOHANG)
                status = st if done else None
            self.assertIsNotNone(status, "q(). did not stop the node")
            self.assertTrue(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(fd)


if __name__ == "__main__":
    unittest.main()
