"""Starts a real dspex_bridge Erlang node serving gRPC on a free port.

Used by the integration tests and bench/grpc_bench.py.  The node runs the
compiled application from _build/default (``make compile``) with the gRPC
listener on 127.0.0.1:<free port>; its output goes to _build/python_test/.
"""

import glob
import os
import signal
import socket
import subprocess
import time

import _paths
import grpc

ROOT = _paths.ROOT
ERL = os.environ.get("ERL", "/usr/bin/erl")
PORT_PROGRAM = "dspex_grpc_port"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_map():
    kids = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                data = f.read()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        # comm may contain spaces/parens: the fields after the last ')' are fixed.
        ppid = int(data[data.rfind(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(pid)
    return kids


def _cmd0(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return ""


class BridgeNode:
    """One Erlang node with the bridge application and its gRPC port program."""

    def __init__(self, port=None, extra_env=None, extra_eval="", erl_flags=()):
        self.extra_eval = extra_eval
        self.erl_flags = list(erl_flags)
        self.port = port or free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.proc = None
        self.extra_env = extra_env or {}
        self.log_path = None

    def _eval(self):
        # The node halts when its stdin closes, so it never outlives the Python
        # process that started it (even one killed by a signal).
        return ("spawn(fun() -> P = open_port({fd, 0, 1}, [in, eof, binary]), "
                "W = fun W() -> receive {P, eof} -> erlang:halt(0); _ -> W() end end, W() end), "
                "application:load(dspex_bridge), "
                "application:set_env(dspex_bridge, grpc_listen, <<\"%s\">>), "
                "{ok, _} = application:ensure_all_started(dspex_bridge), %s ok."
                % (self.address, self.extra_eval))

    def start(self, timeout=60.0):
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self):
        """Starts the node without waiting for it to serve."""
        logdir = os.path.join(ROOT, "_build", "python_test")
        os.makedirs(logdir, exist_ok=True)
        # two nodes may be given one port (a test of the busy port): one log each
        self.log_path = os.path.join(logdir, "node-%d-%d.log" % (self.port, id(self)))
        ebins = glob.glob(os.path.join(ROOT, "_build", "default", "lib", "*", "ebin"))
        if not ebins:
            raise RuntimeError("no _build/default/lib/*/ebin: run `make compile` first")
        cmd = [ERL, "-noshell", "-noinput"] + self.erl_flags
        for e in ebins:
            cmd += ["-pa", e]
        cmd += ["-eval", self._eval()]
        env = dict(os.environ, **self.extra_env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE, env=env, cwd=ROOT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout=60.0):
        channel = grpc.insecure_channel(self.address)
        try:
            fut = grpc.channel_ready_future(channel)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fut.result(timeout=0.5)
                    break
                except grpc.FutureTimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError("node exited (%s); log:\n%s"
                                           % (self.proc.returncode, self.log()))
                    if time.monotonic() > deadline:
                        raise RuntimeError("gRPC port not ready after %.0fs; log:\n%s"
                                           % (timeout, self.log()))
        finally:
            channel.close()

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def port_program_pids(self):
        """OS pids of dspex_grpc_port processes descending from this node."""
        if self.proc is None:
            return []
        kids = _children_map()
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for k in kids.get(pid, []):
                if _cmd0(k) == PORT_PROGRAM:
                    out.append(k)
                todo.append(k)
        return out

    def stop(self, timeout=20.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.stdin.close()           # the node halts; its port program sees EOF
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
