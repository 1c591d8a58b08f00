#!/usr/bin/python3
"""GetVariable round trips per second: our bridge vs a plain python3-grpcio server.

Both servers answer the same GetVariable request with the same Variable message
(the plain server from a dict, in its own process so the client's GIL is not
shared with it).  The client is the same generated stub, with 1 and 8 threads
(one channel per thread), in the same run.  Prints rates and the ratio
bridge / plain (target >= 2x at 8 threads), and the server CPU each spends per
round trip.  `make bench` runs it.

Placement: "split" rows give the client the first half of the CPUs and the
server under test (BEAM + port program, or the grpcio process) the other
half, the usual way to keep a load generator from competing with what it
measures; "shared" rows leave placement to the kernel.  On a small virtual
machine the shared rows swing widely between runs (cross-CPU wake-ups of the
many threads involved are expensive there), so both are printed.

    /usr/bin/python3 bench/grpc_bench.py [--seconds S] [--threads 1,8]
"""

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "test", "python"))

import _paths  # noqa: E402,F401
import grpc  # noqa: E402

from dspex_bridge import SessionContext  # noqa: E402
from dspex_bridge._stubs import pb2, pb2_grpc  # noqa: E402

SESSION = "bench"
NAME = "temperature"


# ------------------------------------------------------------ the plain server

class DictBridge(pb2_grpc.BridgeServiceServicer):
    """GetVariable answered from a dict {(session, identifier): Variable}."""

    def __init__(self, table):
        self.table = table

    def GetVariable(self, request, context):
        var = self.table.get((request.session_id, request.variable_identifier))
        if var is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "variable not found")
        return pb2.GetVariableResponse(variable=var)

    def Ping(self, request, context):
        return pb2.PingResponse(message=request.message)


def serve_dict(port, variable_bytes, workers):
    var = pb2.Variable.FromString(variable_bytes)
    table = {(SESSION, var.name): var, (SESSION, var.id): var}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb2_grpc.add_BridgeServiceServicer_to_server(DictBridge(table), server)
    server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.buffer.read()   # runs until the parent closes our stdin
    server.stop(0)


# ------------------------------------------------------------ the client

def measure(address, threads, seconds, all_procs_ready=None):
    """Aggregate GetVariable round trips/s with `threads` threads.

    all_procs_ready: a multiprocessing barrier when several client processes
    measure together (their windows then start at the same moment).
    """
    req = pb2.GetVariableRequest(session_id=SESSION, variable_identifier=NAME)
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    go = threading.Event()
    stop = threading.Event()

    def run(i):
        ch = grpc.insecure_channel(address)
        stub = pb2_grpc.BridgeServiceStub(ch)
        for _ in range(50):                      # warm up the connection
            stub.GetVariable(req)
        start.wait()
        go.wait()
        n = 0
        while not stop.is_set():
            stub.GetVariable(req)
            n += 1
        counts[i] = n
        ch.close()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    if all_procs_ready is not None:
        all_procs_ready.wait()
    go.set()
    t0 = time.perf_counter()
    time.sleep(seconds)                          # the measuring window itself
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _proc_worker(address, threads, seconds, barrier, results):
    results.put(measure(address, threads, seconds, barrier))


def measure_procs(address, threads, procs, seconds):
    """Like measure, with the threads spread over `procs` client processes."""
    import multiprocessing
    mp = multiprocessing.get_context("spawn")
    barrier, results = mp.Barrier(procs), mp.Queue()
    ps = [mp.Process(target=_proc_worker, args=(address, threads // procs, seconds,
                                                barrier, results)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(results.get() for _ in ps)
    for p in ps:
        p.join()
    return total


def proc_cpu(pids):
    """CPU seconds (user + system) used so far by the processes pids."""
    total = 0.0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure_with_cpu(address, threads, seconds, server_pids, procs=1):
    """(round trips/s, server CPU microseconds per round trip)."""
    c0, t0 = proc_cpu(server_pids), time.perf_counter()
    if procs > 1:
        rate = measure_procs(address, threads, procs, seconds)
    else:
        rate = measure(address, threads, seconds)
    calls = rate * (time.perf_counter() - t0)  # approximate: includes warm-up
    return rate, (proc_cpu(server_pids) - c0) * 1e6 / max(calls, 1)


def place(pids, cpus):
    """Restricts every thread of the processes pids to cpus (None: all CPUs)."""
    cpus = cpus or set(range(os.cpu_count()))
    for pid in pids:
        for tid in os.listdir("/proc/%d/task" % pid):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that has just exited


def placements():
    """(name, client CPUs, server CPUs) of each placement measured."""
    n = os.cpu_count() or 1
    rows = []
    if n >= 2:
        rows.append(("split", set(range(n // 2)), set(range(n // 2, n))))
    rows.append(("shared", None, None))
    return rows


def median_run(runs):
    """The (rate, cpu) run of median rate."""
    return sorted(runs)[len(runs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--procs", type=int, default=2,
                    help="also run the largest thread count over this many client "
                         "processes (1: skip)")
    ap.add_argument("--serve-dict", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--erl-flags", default="",
                    help="extra emulator flags for the bridge node, e.g. '+sbwt none'")
    args = ap.parse_args()
    if args.serve_dict:
        serve_dict(args.serve_dict, sys.stdin.buffer.read(int(sys.stdin.buffer.readline())),
                   args.workers)
        return

    from bridge_node import BridgeNode, free_port
    node = BridgeNode(erl_flags=args.erl_flags.split()).start()
    plain = None
    try:
        ctx = SessionContext(node.address, SESSION)
        ctx.register_variable(NAME, "float", 0.7, constraints={"min": 0.0, "max": 1.0},
                              metadata={"description": "sampling temperature"})
        ch = grpc.insecure_channel(node.address)
        var = pb2_grpc.BridgeServiceStub(ch).GetVariable(pb2.GetVariableRequest(
            session_id=SESSION, variable_identifier=NAME)).variable
        ch.close()
        blob = var.SerializeToString()

        port = free_port()
        plain = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                  "--serve-dict", str(port), "--workers", str(args.workers)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        plain.stdin.write(b"%d\n" % len(blob) + blob)
        plain.stdin.flush()
        if plain.stdout.readline().strip() != b"ready":
            raise RuntimeError("plain server did not start")
        plain_addr = "127.0.0.1:%d" % port
        # Same answer from both servers (byte for byte).
        for addr in (node.address, plain_addr):
            c = grpc.insecure_channel(addr)
            got = pb2_grpc.BridgeServiceStub(c).GetVariable(pb2.GetVariableRequest(
                session_id=SESSION, variable_identifier=NAME)).variable
            c.close()
            assert got.SerializeToString() == blob, addr

        print("gRPC GetVariable round trips/s (%d-byte Variable, median of %d interleaved "
              "%.1fs runs per server, %d cores)" % (len(blob), args.rounds, args.seconds,
                                                     os.cpu_count()))
        print("(server CPU = microseconds of server CPU per round trip: beam + port "
              "program vs the grpcio process)")
        print("%8s %9s %14s %14s %8s %12s %12s" % ("threads", "placement", "dspex_bridge",
                                                    "plain grpcio", "ratio", "bridge CPU", "plain CPU"))
        ours_pids = [node.proc.pid] + node.port_program_pids()
        counts = [int(x) for x in args.threads.split(",")]
        for pname, client_cpus, server_cpus in placements():
            place([os.getpid()], client_cpus)
            place(ours_pids + [plain.pid], server_cpus)
            rows = [(n, 1) for n in counts]
            if args.procs > 1 and client_cpus is None:
                # Supplementary: the largest thread count over several client
                # processes, so the client's GIL limits the compared servers less.
                rows.append((counts[-1], args.procs))
            for n, procs in rows:
                ours, theirs = [], []
                for _ in range(args.rounds):     # alternate, so load swings hit both
                    ours.append(measure_with_cpu(node.address, n, args.seconds, ours_pids, procs))
                    theirs.append(measure_with_cpu(plain_addr, n, args.seconds, [plain.pid], procs))
                (o, o_cpu), (t, t_cpu) = median_run(ours), median_run(theirs)
                label = str(n) if procs == 1 else "%d/%dp" % (n, procs)
                print("%8s %9s %14.0f %14.0f %7.2fx %10.1fus %10.1fus"
                      % (label, pname, o, t, o / t, o_cpu, t_cpu))
                sys.stdout.flush()
    finally:
        if plain is not None:
            plain.stdin.close()
            plain.wait(10)
        node.stop()


if __name__ == "__main__":
    main()
