"""Worker functions for the dspex_workers tests, some misbehaving on purpose.

work(x) does what the file named by DSPEX_CHAOS_FILE says (read at every call,
so a test heals or breaks the worker by rewriting it):
  ok       return x
  crash    the process exits (code 3)
  hang     stuck in C code holding the GIL, SIGTERM blocked: only SIGKILL ends it
  garbage  a frame that is not JSON, or bytes that are not a frame (at random)
  flood    unsolicited frames, endlessly
"""

import ctypes
import os
import random
import signal
import struct
import time

def _frame_fd():
    return int(os.environ["DSPEX_WORKER_FRAME_FD"])


def _mode():
    path = os.environ.get("DSPEX_CHAOS_FILE")
    if not path:
        return "ok"
    try:
        with open(path) as f:
            return f.read().strip() or "ok"
    except OSError:
        return "ok"


def hang():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    libc = ctypes.PyDLL(None)  # PyDLL keeps the GIL during the call
    while True:
        libc.pause()


def spin():
    """Busy in Python (the GIL is released now and then); says so first, in a
    log frame, so a test can wait for the call to be running."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    body = b'{"type": "log", "level": "info", "message": "spinning"}'
    os.write(_frame_fd(), struct.pack(">I", len(body)) + body)
    while True:
        pass


def garbage_json():
    body = b"{this is not json"
    os.write(_frame_fd(), struct.pack(">I", len(body)) + body)
    time.sleep(3600)


def garbage_raw():
    os.write(_frame_fd(), b"garbage bytes that are no frame at all")
    time.sleep(3600)


def garbage():
    """One of the two, at random."""
    if random.random() < 0.5:
        garbage_json()
    else:
        garbage_raw()


def flood():
    fd = _frame_fd()
    body = b'{"type": "log", "level": "info", "message": "flood"}'
    frame = struct.pack(">I", len(body)) + body
    while True:
        os.write(fd, frame * 64)


def crash():
    os._exit(3)


def work(x):
    mode = _mode()
    if mode == "crash":
        crash()
    elif mode == "hang":
        hang()
    elif mode == "garbage":
        garbage()
    elif mode == "flood":
        flood()
    return x


def env():
    return {"address": os.environ.get("DSPEX_BRIDGE_ADDRESS"),
            "session": os.environ.get("DSPEX_SESSION_ID"),
            "worker_id": os.environ.get("DSPEX_WORKER_ID"),
            "pid": os.getpid()}


def fail(message):
    raise ValueError(message)


def echo(x):
    print("a stray print must not corrupt the protocol")
    return x


def sleep_ms(ms):
    time.sleep(ms / 1000.0)
    return ms


def unserialisable():
    return {1, 2}


FUNCTIONS = {
    "work": work, "env": env, "fail": fail, "echo": echo, "sleep_ms": sleep_ms, "hang": hang,
    "spin": spin, "crash": crash, "garbage": garbage, "garbage_json": garbage_json, "garbage_raw": garbage_raw,
    "flood": flood, "unserialisable": unserialisable,
}


def wedge(delay_ms):
    """Returns, then the process wedges (a thread holds the GIL in C): it can
    no longer answer pings."""
    import threading

    def stuck():
        time.sleep(delay_ms / 1000.0)
        hang()

    threading.Thread(target=stuck, daemon=True).start()
    return "wedging"


FUNCTIONS["wedge"] = wedge


def hold_stdout(seconds):
    """Forks a child that keeps the worker's frame fd (its stdout pipe) open
    but not its stdin, and sleeps; returns the child's pid. Once the worker
    itself dies, its port sees no EOF (so no exit status) while writes to
    its stdin fail with EPIPE."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(0)
            os.close(ready_r)
            os.write(ready_w, b"x")  # stdin closed: the parent may return
            os.close(ready_w)
            time.sleep(seconds)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    return pid


FUNCTIONS["hold_stdout"] = hold_stdout


def _await_file(path):
    while not os.path.exists(path):
        time.sleep(0.005)


def gate(path):
    """Returns "open" once the file ``path`` exists: a test holds a worker
    busy for exactly as long as it wants, whatever the machine's load."""
    _await_file(path)
    return "open"


def crash_at_gate(path):
    """Exits (code 3) once the file ``path`` exists."""
    _await_file(path)
    os._exit(3)


FUNCTIONS["gate"] = gate
FUNCTIONS["crash_at_gate"] = crash_at_gate
