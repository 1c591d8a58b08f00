"""1,000 gRPC calls against the port program running under valgrind memcheck.

Starts a node whose port program is wrapped in valgrind (app env
grpc_port_command), drives every kind of call through it (unary RPCs with
success and each error path, malformed bytes, an unknown method, big binary
tensors, concurrent clients on 3 completion-queue threads, a deadline that expires while the BEAM waits, a
cancelled watch stream), then closes the BEAM side while a watch stream is
open (that stream must end UNAVAILABLE) and checks valgrind's report: no
errors, no definite or indirect leaks. Exit status 0 on success.

Usage: valgrind_run.py STUBS_DIR  (stubs made by protoc from priv/proto)
"""

import glob
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

STUBS = os.path.abspath(sys.argv[1])
sys.path.insert(0, STUBS)

import grpc  # noqa: E402
from google.protobuf import any_pb2  # noqa: E402
import snakepit_bridge_pb2 as pb  # noqa: E402
import snakepit_bridge_pb2_grpc as pbg  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET_CALLS = 1000
MAX_MSG = 1 << 20          # the server's configured maximum message size
C = grpc.StatusCode


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def any_of(t, v):
    return any_pb2.Any(type_url="type.googleapis.com/snakepit." + t, value=json.dumps(v).encode())


class Counter:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def add(self, k=1):
        with self.lock:
            self.n += k


CALLS = Counter()


def expect(fn, code=None):
    """Runs one call; checks it ends with `code` (None: OK)."""
    CALLS.add()
    try:
        r = fn()
    except grpc.RpcError as e:
        if e.code() != code:
            raise AssertionError("expected %s, got %s: %s" % (code, e.code(), e.details()))
        return e
    if code is not None:
        raise AssertionError("expected %s, got OK" % code)
    return r


def session_work(stub, sid, rounds):
    expect(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id=sid)))
    expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
        session_id=sid, name="x", type="integer", initial_value=any_of("integer", 0))))
    expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
        session_id=sid, name="t", type="float", initial_value=any_of("float", 0.5),
        constraints_json='{"min": 0, "max": 1}')))
    for i in range(rounds):
        got = expect(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="x")))
        v = got.variable.version
        expect(lambda: stub.SetVariable(pb.SetVariableRequest(
            session_id=sid, variable_identifier="x", value=any_of("integer", v + 1), expected_version=v)))
        # stale expected_version: ABORTED, with the reason and version as trailers
        e = expect(lambda: stub.SetVariable(pb.SetVariableRequest(
            session_id=sid, variable_identifier="x", value=any_of("integer", 0), expected_version=v + 50)), C.ABORTED)
        tr = dict(e.trailing_metadata())
        assert tr.get("dspex-error") == "version_mismatch" and tr.get("dspex-current-version") == str(v + 1), tr
        # constraint violation / bad JSON in the Any (refused in C) / unknown variable
        expect(lambda: stub.SetVariable(pb.SetVariableRequest(
            session_id=sid, variable_identifier="t", value=any_of("float", 7.0))), C.INVALID_ARGUMENT)
        expect(lambda: stub.SetVariable(pb.SetVariableRequest(
            session_id=sid, variable_identifier="t",
            value=any_pb2.Any(type_url="type.googleapis.com/snakepit.float", value=b"{nope"))), C.INVALID_ARGUMENT)
        expect(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="nope")),
               C.NOT_FOUND)
        expect(lambda: stub.SetVariables(pb.BatchSetVariablesRequest(
            session_id=sid, atomic=True, updates={"t": any_of("float", "NaN"), "x": any_of("integer", 1)})))
        expect(lambda: stub.GetVariables(pb.BatchGetVariablesRequest(
            session_id=sid, variable_identifiers=["x", "t", "missing"])))
        expect(lambda: stub.ListVariables(pb.ListVariablesRequest(session_id=sid, pattern="*")))
        expect(lambda: stub.Heartbeat(pb.HeartbeatRequest(session_id=sid)))
    expect(lambda: stub.CleanupSession(pb.CleanupSessionRequest(session_id=sid)))


def big_tensor(stub, sid):
    expect(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id=sid)))
    n = 20000
    data = struct.pack("<%dd" % n, *[i * 0.5 for i in range(n)])
    meta = any_of("tensor", {"dtype": "float64", "shape": [100, 200]})
    expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
        session_id=sid, name="w", type="tensor", initial_value=meta, initial_binary_value=data)))
    got = expect(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="w")))
    assert got.variable.binary_value == data, "tensor did not round-trip"
    # max message size, both ways: 200k float32 in (800 KB) fit, the float64
    # answer (1.6 MB) does not; 300k float32 (1.2 MB) are refused on the way in
    n2 = 200000
    expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
        session_id=sid, name="e", type="embedding", initial_value=any_of("embedding", {"dtype": "float32", "shape": [n2]}),
        initial_binary_value=struct.pack("<%df" % n2, *([0.25] * n2)))))
    e = expect(lambda: stub.GetVariable(pb.GetVariableRequest(session_id=sid, variable_identifier="e")),
               C.RESOURCE_EXHAUSTED)
    tr = dict(e.trailing_metadata())
    assert tr == {"dspex-error": "limit_exceeded", "dspex-limit": "message_size"}, tr
    n3 = 300000
    expect(lambda: stub.SetVariable(pb.SetVariableRequest(
        session_id=sid, variable_identifier="e", value=any_of("embedding", {"dtype": "float32", "shape": [n3]}),
        binary_value=b"\0" * (4 * n3))), C.RESOURCE_EXHAUSTED)
    bad = any_of("tensor", {"dtype": "float64", "shape": [3]})
    expect(lambda: stub.SetVariable(pb.SetVariableRequest(
        session_id=sid, variable_identifier="w", value=bad, binary_value=b"\0" * 7)), C.INVALID_ARGUMENT)


def odd_calls(channel, stub, sid):
    raw = channel.unary_unary("/snakepit.bridge.BridgeService/GetVariable",
                              request_serializer=None, response_deserializer=None)
    expect(lambda: raw(b"\xff\xff\xff\xff\x0f"), C.INVALID_ARGUMENT)          # malformed protobuf
    unknown = channel.unary_unary("/snakepit.bridge.BridgeService/NoSuchRpc",
                                  request_serializer=None, response_deserializer=None)
    expect(lambda: unknown(b""), C.UNIMPLEMENTED)                               # refused in C
    expect(lambda: stub.ExecuteTool(pb.ExecuteToolRequest(session_id=sid)), C.NOT_FOUND)   # no such tool
    expect(lambda: stub.Ping(pb.PingRequest(message="x"), metadata=[("dspex-context", "[1")]),
           C.INVALID_ARGUMENT)
    # a Timestamp out of the range timestamp.proto allows (refused in C)
    from google.protobuf import timestamp_pb2
    expect(lambda: stub.Heartbeat(pb.HeartbeatRequest(
        session_id=sid, client_time=timestamp_pb2.Timestamp(seconds=9223372036853, nanos=2147483647))),
        C.INVALID_ARGUMENT)
    # a deadline that passes while the BEAM waits for a lock: DEADLINE_EXCEEDED,
    # the cancellation reaches the handler, which gives up its wait
    expect(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id=sid)))
    expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
        session_id=sid, name="lr", type="float", initial_value=any_of("float", 0.1))))
    expect(lambda: stub.StartOptimization(pb.StartOptimizationRequest(
        session_id=sid, variable_identifier="lr", optimizer_id="a")))
    expect(lambda: stub.StartOptimization(pb.StartOptimizationRequest(
        session_id=sid, variable_identifier="lr", optimizer_id="b", optimizer_config={"conflict": "wait"}),
        timeout=0.5), C.DEADLINE_EXCEEDED)
    expect(lambda: stub.StopOptimization(pb.StopOptimizationRequest(
        session_id=sid, variable_identifier="lr", optimizer_id="a")))
    # a watch stream, read then cancelled by the client
    stream = stub.WatchVariables(pb.WatchVariablesRequest(
        session_id=sid, variable_identifiers=["lr"], include_initial_values=True))
    CALLS.add()
    first = next(stream)
    assert first.update_type == "initial_value"
    expect(lambda: stub.SetVariable(pb.SetVariableRequest(
        session_id=sid, variable_identifier="lr", value=any_of("float", 0.2))))
    change = next(stream)
    assert change.update_type == "value_change" and change.variable.version == 1
    stream.cancel()


def main():
    port = free_port()
    address = "127.0.0.1:%d" % port
    logdir = os.path.join(ROOT, "_build", "grpc_valgrind")
    os.makedirs(logdir, exist_ok=True)
    vlog = os.path.join(logdir, "valgrind-%d.log" % port)
    wrapper = ["valgrind", "--log-file=" + vlog, "--leak-check=full", "--num-callers=30",
               "--errors-for-leak-kinds=definite,indirect", "--show-leak-kinds=definite,indirect"]
    ebins = glob.glob(os.path.join(ROOT, "_build", "default", "lib", "*", "ebin"))
    erl_list = "[" + ",".join('"%s"' % w for w in wrapper) + "]"
    ev = ('application:load(dspex_bridge), '
          'application:set_env(dspex_bridge, grpc_listen, "%s"), '
          'application:set_env(dspex_bridge, grpc_port_command, %s), '
          'application:set_env(dspex_bridge, grpc_threads, 3), '
          'application:set_env(dspex_bridge, grpc_start_timeout_ms, 300000), '
          'application:set_env(dspex_bridge, grpc_max_message_bytes, %d), '
          '{ok, _} = application:ensure_all_started(dspex_bridge), '
          'io:get_line(""), application:stop(dspex_bridge), init:stop().' % (address, erl_list, MAX_MSG))
    cmd = [os.environ.get("ERL", "erl"), "-noshell"] + sum((["-pa", e] for e in ebins), []) + ["-eval", ev]
    node = subprocess.Popen(cmd, stdin=subprocess.PIPE, cwd=ROOT)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        grpc.channel_ready_future(channel).result(timeout=180)
        stub = pbg.BridgeServiceStub(channel)
        t0 = time.time()
        expect(lambda: stub.Ping(pb.PingRequest(message="hello")))
        big_tensor(stub, "vg_tensor")
        odd_calls(channel, stub, "vg_odd")
        # concurrent clients until the 1,000 calls are done
        errors = []

        def guarded(t):
            try:
                t()
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)
        threads = [threading.Thread(target=guarded, args=(lambda i=i: session_work(stub, "vg_%d" % i, 10),))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        while CALLS.n < TARGET_CALLS:
            expect(lambda: stub.Ping(pb.PingRequest(message="fill")))
        print("valgrind_run: %d calls in %.1f s" % (CALLS.n, time.time() - t0))

        # an open stream when the BEAM side closes the port: ends UNAVAILABLE
        expect(lambda: stub.InitializeSession(pb.InitializeSessionRequest(session_id="vg_last")))
        expect(lambda: stub.RegisterVariable(pb.RegisterVariableRequest(
            session_id="vg_last", name="z", type="integer", initial_value=any_of("integer", 0))))
        stream = stub.WatchVariables(pb.WatchVariablesRequest(
            session_id="vg_last", variable_identifiers=["z"], include_initial_values=True))
        assert next(stream).update_type == "initial_value"
        node.stdin.write(b"\n")
        node.stdin.flush()
        try:
            next(stream)
            raise AssertionError("the stream went on after the BEAM closed the port")
        except grpc.RpcError as e:
            assert e.code() == C.UNAVAILABLE, "open stream ended %s, not UNAVAILABLE" % e.code()
        print("valgrind_run: open stream ended UNAVAILABLE when the BEAM closed the port")
    finally:
        channel.close()
        if node.poll() is None:
            try:
                node.stdin.write(b"\n")
                node.stdin.flush()
            except OSError:
                pass
        node.wait(timeout=60)

    # valgrind writes its summary when the port program exits
    deadline = time.time() + 180
    text = ""
    while time.time() < deadline:
        with open(vlog) as f:
            text = f.read()
        if "ERROR SUMMARY" in text:
            break
        time.sleep(0.2)
    m = re.search(r"ERROR SUMMARY: (\d+) errors", text)
    if not m:
        print(text[-3000:])
        raise SystemExit("valgrind_run: no valgrind summary in %s" % vlog)
    for line in text.splitlines():
        if re.search(r"definitely lost|indirectly lost|ERROR SUMMARY", line):
            print("valgrind_run:", line.split("== ", 1)[-1])
    if int(m.group(1)) != 0:
        print(text[-6000:])
        raise SystemExit("valgrind_run: valgrind reported %s errors (log %s)" % (m.group(1), vlog))
    print("valgrind_run: OK, no memory errors or leaks")


if __name__ == "__main__":
    main()
