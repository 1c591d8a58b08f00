"""Objectives a worker pool evaluates for dspex_opt runs (dspex_opt_tests).

``mixed(params)`` is the mixed problem of dspex_opt_tests (minimum 0 at
x = 1.5, lr = 0.01, n = 100, style "b", flag true). The first
``DSPEX_OPT_RENDEZVOUS_N`` calls (counted with files in the directory
``DSPEX_OPT_RENDEZVOUS``) each wait until that many calls have started, so
they succeed only if they run at the same time, in different workers: the
proof that a run evaluates several asks in parallel. A call that waits in vain
raises (a failed trial), it never hangs the test.
"""

import math
import os
import time


def _rendezvous():
    directory = os.environ.get("DSPEX_OPT_RENDEZVOUS")
    if not directory:
        return
    n = int(os.environ.get("DSPEX_OPT_RENDEZVOUS_N", "2"))
    # one file per call, named so that the listing orders the calls
    fd, path = None, None
    for k in range(10000):
        path = os.path.join(directory, "call-%05d" % k)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            continue
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if k >= n:
        return
    deadline = time.monotonic() + 30
    while len([f for f in os.listdir(directory) if f.startswith("call-")]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("call %d: the other %d parallel calls never came" % (k, n - 1))
        time.sleep(0.005)


def mixed(params):
    _rendezvous()
    x, lr, n = params["x"], params["lr"], params["n"]
    style = {"b": 0.0, "a": 1.0, "c": 2.0}[params["style"]]
    flag = 0.0 if params["flag"] else 0.5
    return ((x - 1.5) ** 2 + (math.log10(lr) + 2) ** 2 + (math.log10(n) - 2) ** 2
            + style + flag)


def not_a_number(params):
    return "high"


FUNCTIONS = {"mixed": mixed, "not_a_number": not_a_number}
