#!/usr/bin/python3
"""A DSPex Python worker: runs registered functions for the BEAM.

Started by ``dspex_workers`` (Erlang) as

    /usr/bin/python3 worker.py --module PATH [--address HOST:PORT] [--session ID]
                               [--worker-id N] [--pool NAME]

and spoken to over stdin/stdout with frames: a 4-byte big-endian length, then
that many bytes of UTF-8 JSON (one object). This file imports nothing from the
``dspex_bridge`` package so it runs as a plain script.

BEAM -> worker:  {"type": "call", "id": N, "fn": NAME, "args": [...],
                  "kwargs": {...} (optional), "stream": true (optional)}
                 {"type": "ping", "id": N}
                 {"type": "stop"}
worker -> BEAM:  {"type": "ready", "pid": P, "functions": [...], "session": S}
                 {"type": "load_error", "error": {"type": T, "message": M}}
                 {"type": "reply", "id": N, "ok": RESULT}
                 {"type": "chunk", "id": N, "data": ITEM}   (stream calls, before the reply)
                 {"type": "reply", "id": N, "error": {"type": T, "message": M}}
                 {"type": "reply", "id": N, "too_large": BYTES}
                 {"type": "pong", "id": N}
                 {"type": "log", "level": L, "message": M}

The module at PATH defines the functions: a dict ``FUNCTIONS`` (name ->
callable), or a function ``register(add)`` that calls ``add(name, fn)``.
If it cannot be loaded (missing file, syntax error, an import that fails,
even SystemExit), the worker sends one ``load_error`` frame (the exception's
class name, and its message with the line of PATH that raised it) instead of
``ready`` and exits with status 3, printing nothing: the pool reports it
once, however often it restarts workers.
Functions are called as ``fn(*args, **kwargs)`` one at a time, in the main
thread. A call with ``"stream": true`` sends each item a generator function
yields as a ``chunk`` frame, then the reply ``{"chunks": count}`` (a
non-generator result is one chunk); without it a generator is collected into
a list.

Frame limits: a frame read over MAX_FRAME (64 MiB) ends the worker (the BEAM
refuses larger requests before sending them, so only a broken peer does
that). A reply or chunk whose frame would exceed DSPEX_WORKER_MAX_FRAME (the
pool's ``max_frame``, which the BEAM enforces by killing the worker) is not
sent: the call is answered ``too_large`` with the frame's size instead, and
the worker lives on.

The bridge address and session are also in the environment
(DSPEX_BRIDGE_ADDRESS, DSPEX_SESSION_ID, DSPEX_WORKER_ID, DSPEX_WORKER_POOL)
for the functions (a worker registers its tools with the pool's name).

Never outliving the BEAM:
  * a reader thread owns stdin and ends the process with os._exit at EOF,
    even while a function runs (the BEAM closed the pipe or died);
  * PR_SET_PDEATHSIG makes the kernel SIGKILL this process when its parent
    (the BEAM's erl_child_setup) dies, which also covers a function stuck in
    C code holding the GIL, where no Python thread can run;
  * the BEAM SIGKILLs a worker that misses a deadline.
Frames go to a private duplicate of fd 1, and fd 1 itself is pointed at
stderr, so a stray print() (or C code writing to stdout) cannot corrupt the
protocol. DSPEX_WORKER_FRAME_FD names the private fd (tests use it to
misbehave on purpose).
"""

import argparse
import ctypes
import importlib.util
import json
import os
import queue
import signal
import struct
import sys
import threading
import traceback
import types

# frames read; dspex_worker.erl's MAX_REQUEST matches it
MAX_FRAME = 64 * 1024 * 1024
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """Ask the kernel to SIGKILL us when the parent dies (Linux only)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # the parent may have died before prctl took effect
    if os.getppid() != parent:
        os._exit(1)


def read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def reader(fd, inbox):
    """Owns stdin; EOF or a broken frame ends the process at once."""
    while True:
        head = read_exact(fd, 4)
        if head is None:
            os._exit(0)
        (size,) = struct.unpack(">I", head)
        if size > MAX_FRAME:
            os._exit(2)
        body = read_exact(fd, size)
        if body is None:
            os._exit(0)
        try:
            msg = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            os._exit(2)
        if isinstance(msg, dict) and msg.get("type") == "stop":
            os._exit(0)
        inbox.put(msg)


class FrameTooLarge(Exception):
    """A frame over the limit the BEAM reads (it would kill the worker)."""

    def __init__(self, size):
        super().__init__("frame of %d bytes is over the limit" % size)
        self.size = size


def frame_limit():
    try:
        return int(os.environ.get("DSPEX_WORKER_MAX_FRAME", ""))
    except ValueError:
        return MAX_FRAME


class Channel:
    def __init__(self, fd, limit=MAX_FRAME):
        self.fd = fd
        self.limit = limit
        self.lock = threading.Lock()

    def send(self, obj):
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        if len(body) > self.limit:
            raise FrameTooLarge(len(body))
        frame = struct.pack(">I", len(body)) + body
        with self.lock:
            view = memoryview(frame)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]


def load_functions(path):
    spec = importlib.util.spec_from_file_location("dspex_worker_functions", path)
    if spec is None or spec.loader is None:
        raise ImportError("cannot load module from %r" % path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    functions = {}
    if isinstance(getattr(module, "FUNCTIONS", None), dict):
        functions.update(module.FUNCTIONS)
    register = getattr(module, "register", None)
    if callable(register):
        register(lambda name, fn: functions.__setitem__(str(name), fn))
    bad = [name for name, fn in functions.items() if not callable(fn)]
    if bad:
        raise TypeError("not callable: %s" % ", ".join(sorted(bad)))
    return functions


def error_of(exc):
    return {"type": type(exc).__name__, "message": str(exc)}


def load_error_of(exc, path):
    """The exception's class and message, with the innermost line of the
    module at ``path`` that it passed through (if any)."""
    message = str(exc) or type(exc).__name__
    where = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            where = frame.lineno
    if where is not None:
        message = "%s (%s, line %d)" % (message, path, where)
    return {"type": type(exc).__name__, "message": message[:2000]}


def stream(channel, call_id, result):
    """A streamed call: one ``chunk`` frame per item the function yields (a
    non-generator result is one chunk), then the reply with their count.  An
    exception while iterating ends the stream with that error."""
    items = result if isinstance(result, types.GeneratorType) else iter([result])
    n = 0
    for item in items:
        channel.send({"type": "chunk", "id": call_id, "data": item})
        n += 1
    return {"type": "reply", "id": call_id, "ok": {"chunks": n}}


def serve(functions, channel, inbox):
    while True:
        msg = inbox.get()
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "ping":
            channel.send({"type": "pong", "id": msg.get("id")})
        elif kind == "call":
            call_id = msg.get("id")
            fn = functions.get(msg.get("fn"))
            args = msg.get("args", [])
            kwargs = msg.get("kwargs", {})
            if fn is None:
                reply = {"type": "reply", "id": call_id,
                         "error": {"type": "unknown_function", "message": str(msg.get("fn"))}}
            elif not isinstance(args, list) or not isinstance(kwargs, dict):
                reply = {"type": "reply", "id": call_id,
                         "error": {"type": "bad_args", "message": "args must be a list, kwargs an object"}}
            else:
                try:
                    result = fn(*args, **kwargs)
                    if msg.get("stream"):
                        reply = stream(channel, call_id, result)
                    else:
                        if isinstance(result, types.GeneratorType):
                            result = list(result)  # a generator called without streaming: all at once
                        reply = {"type": "reply", "id": call_id, "ok": result}
                except FrameTooLarge as exc:  # a streamed chunk: the chunks before it stay sent
                    reply = {"type": "reply", "id": call_id, "too_large": exc.size}
                except Exception as exc:  # the function's failure is the caller's answer
                    reply = {"type": "reply", "id": call_id, "error": error_of(exc)}
            try:
                channel.send(reply)
            except FrameTooLarge as exc:  # refused here rather than kill the worker there
                channel.send({"type": "reply", "id": call_id, "too_large": exc.size})
            except (TypeError, ValueError) as exc:  # result not JSON
                channel.send({"type": "reply", "id": call_id,
                              "error": {"type": "bad_result", "message": str(exc)}})
        else:
            channel.send({"type": "log", "level": "warning",
                          "message": "unknown message %r" % (kind,)})


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True)
    parser.add_argument("--address", default=os.environ.get("DSPEX_BRIDGE_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--session", default=os.environ.get("DSPEX_SESSION_ID", ""))
    parser.add_argument("--worker-id", default=os.environ.get("DSPEX_WORKER_ID", "0"))
    parser.add_argument("--pool", default=os.environ.get("DSPEX_WORKER_POOL", ""))
    args = parser.parse_args(argv)

    die_with_parent()

    # protocol on a private fd; fd 1 (and sys.stdout) become stderr
    frame_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ["DSPEX_WORKER_FRAME_FD"] = str(frame_fd)
    os.environ["DSPEX_BRIDGE_ADDRESS"] = args.address
    os.environ["DSPEX_SESSION_ID"] = args.session
    os.environ["DSPEX_WORKER_ID"] = str(args.worker_id)
    os.environ["DSPEX_WORKER_POOL"] = args.pool
    channel = Channel(frame_fd, frame_limit())

    inbox = queue.Queue()
    threading.Thread(target=reader, args=(0, inbox), daemon=True, name="dspex-stdin").start()

    try:
        functions = load_functions(args.module)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt in the module too
        channel.send({"type": "load_error", "error": load_error_of(exc, args.module)})
        return 3

    channel.send({"type": "ready", "pid": os.getpid(), "functions": sorted(functions),
                  "session": args.session, "address": args.address})
    serve(functions, channel, inbox)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
