"""gRPC status -> exception mapping, and the client cache."""
import threading
import unittest

import _paths  # noqa: F401
import grpc

from dspex_bridge import codec, errors
from dspex_bridge._stubs import pb2
from dspex_bridge.cache import VariableCache
from dspex_bridge.session_context import BatchUpdateError, SessionContext


class StatusMapping(unittest.TestCase):
    def test_each_status_maps_to_its_exception_keeping_the_message(self):
        C = grpc.StatusCode
        cases = [(C.NOT_FOUND, "variable not found: x", errors.VariableNotFoundError),
                 (C.NOT_FOUND, "variable not found: session not found", errors.VariableNotFoundError),
                 (C.NOT_FOUND, "session not found", errors.SessionNotFoundError),
                 (C.NOT_FOUND, "session not found: variable_s", errors.SessionNotFoundError),
                 (C.NOT_FOUND, "version 9 of the variable is not in its history",
                  errors.VersionNotFoundError),
                 (C.INVALID_ARGUMENT, "value 1.5 is above maximum 1.0", errors.InvalidValueError),
                 (C.ALREADY_EXISTS, "already exists: x", errors.VariableExistsError),
                 (C.ABORTED, "version mismatch, current version 7", errors.VersionConflictError),
                 (C.FAILED_PRECONDITION, "variable is locked by optimizer opt1", errors.LockedError),
                 (C.FAILED_PRECONDITION, "stale optimizer lock token", errors.LockedError),
                 (C.FAILED_PRECONDITION, "not the optimizer holding the lock",
                  errors.PreconditionFailedError),
                 (C.FAILED_PRECONDITION, "no optimization runs on the variable",
                  errors.PreconditionFailedError),
                 (C.FAILED_PRECONDITION, "would create cycle a -> b -> a", errors.DependencyCycleError),
                 (C.FAILED_PRECONDITION, "derived variable", errors.PreconditionFailedError),
                 (C.PERMISSION_DENIED, "access denied", errors.AccessDeniedError),
                 (C.RESOURCE_EXHAUSTED, "rate limited", errors.RateLimitedError),
                 (C.UNAVAILABLE, "bridge restarting", errors.BridgeUnavailableError),
                 (C.DEADLINE_EXCEEDED, "deadline", errors.BridgeTimeoutError),
                 (C.UNIMPLEMENTED, "tools", errors.UnsupportedError),
                 (C.INTERNAL, "boom", errors.BridgeError)]
        for code, msg, cls in cases:
            e = errors.from_status(code, msg)
            self.assertIs(type(e), cls, msg)
            self.assertEqual(str(e), msg)
            self.assertEqual(e.code, code)
            self.assertIsInstance(e, errors.BridgeError)

    def test_limits_are_not_rate_limits(self):
        C = grpc.StatusCode
        # with the server's trailers
        e = errors.from_status(C.INVALID_ARGUMENT, "limit exceeded: value_size (max_value_bytes = 16)",
                               {"dspex-error": "limit_exceeded", "dspex-limit": "value_size"})
        self.assertIs(type(e), errors.LimitExceededError)
        self.assertEqual((e.limit, e.code, e.reason), ("value_size", C.INVALID_ARGUMENT, "limit_exceeded"))
        e = errors.from_status(C.RESOURCE_EXHAUSTED, "limit exceeded: variables (max_variables = 2)",
                               {"dspex-error": "limit_exceeded", "dspex-limit": "variables"})
        self.assertIs(type(e), errors.LimitExceededError)
        self.assertEqual(e.limit, "variables")
        self.assertNotIsInstance(e, errors.RateLimitedError)
        e = errors.from_status(C.RESOURCE_EXHAUSTED, "rate limited", {"dspex-error": "rate_limited"})
        self.assertIs(type(e), errors.RateLimitedError)
        self.assertEqual(e.reason, "rate_limited")
        # without trailers (an older server): told apart by the message
        for code in (C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED):
            e = errors.from_status(code, "limit exceeded: name_length")
            self.assertIs(type(e), errors.LimitExceededError)
            self.assertEqual((e.limit, e.reason), ("name_length", "limit_exceeded"))
        self.assertIs(type(errors.from_status(C.RESOURCE_EXHAUSTED, "rate limited")), errors.RateLimitedError)
        # over the maximum message size: the port's trailers, or gRPC core's own message
        e = errors.from_status(C.RESOURCE_EXHAUSTED, "reply of 9 bytes exceeds the maximum message size",
                               {"dspex-error": "limit_exceeded", "dspex-limit": "message_size"})
        self.assertEqual((type(e), e.limit), (errors.LimitExceededError, "message_size"))
        e = errors.from_status(C.RESOURCE_EXHAUSTED, "Received message larger than max (2000 vs. 1000)")
        self.assertEqual((type(e), e.limit), (errors.LimitExceededError, "message_size"))
        self.assertIs(type(errors.from_status(C.INVALID_ARGUMENT, "invalid argument: name must not be empty")),
                      errors.InvalidValueError)

    def test_the_reason_trailer_decides_over_the_message(self):
        C = grpc.StatusCode
        cases = [(C.NOT_FOUND, "session_not_found", errors.SessionNotFoundError),
                 (C.NOT_FOUND, "version_not_found", errors.VersionNotFoundError),
                 (C.NOT_FOUND, "not_found", errors.VariableNotFoundError),
                 (C.FAILED_PRECONDITION, "would_create_cycle", errors.DependencyCycleError),
                 (C.FAILED_PRECONDITION, "stale_lock", errors.LockedError),
                 (C.FAILED_PRECONDITION, "not_lock_owner", errors.PreconditionFailedError)]
        for code, reason, cls in cases:
            e = errors.from_status(code, "some message", {"dspex-error": reason})
            self.assertIs(type(e), cls, reason)
            self.assertEqual(e.reason, reason)
        e = errors.from_status(C.ABORTED, "conflict",
                               {"dspex-error": "version_mismatch", "dspex-current-version": "12"})
        self.assertEqual(e.current_version, 12)

    def test_from_rpc_error_reads_the_trailers(self):
        class Err(grpc.RpcError):
            def code(self):
                return grpc.StatusCode.INVALID_ARGUMENT

            def details(self):
                return "limit exceeded: value_size"

            def trailing_metadata(self):
                return (("dspex-error", "limit_exceeded"), ("dspex-limit", "value_size"))

        e = errors.from_rpc_error(Err())
        self.assertIs(type(e), errors.LimitExceededError)
        self.assertEqual(e.limit, "value_size")

    def test_version_conflict_carries_the_current_version(self):
        for msg, v in [("version mismatch: current version 12", 12),
                       ("expected 3, current_version=4", 4),
                       ("{version_mismatch,9}", 9), ("conflict", None)]:
            e = errors.from_status(grpc.StatusCode.ABORTED, msg)
            self.assertEqual(e.current_version, v, msg)

    def test_python_base_classes(self):
        self.assertIsInstance(errors.VariableNotFoundError("x"), KeyError)
        self.assertIsInstance(errors.InvalidValueError("x"), ValueError)
        self.assertIsInstance(errors.AccessDeniedError("x"), PermissionError)
        self.assertIsInstance(errors.BridgeUnavailableError("x"), ConnectionError)


class Rec:
    def __init__(self, name, id, version):
        self.name, self.id, self.version = name, id, version


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Cache(unittest.TestCase):
    def assertSameRecord(self, got, want):
        # the cache hands out copies (test_reads_are_copies): compare contents
        self.assertIsNotNone(got)
        self.assertEqual((got.name, got.id, got.version), (want.name, want.id, want.version))

    def test_entries_expire_after_the_ttl(self):
        clock = Clock()
        c = VariableCache(2.0, clock)
        r = Rec("x", "var_x_1", 0)
        c.put(r)
        self.assertSameRecord(c.get("x"), r)
        self.assertSameRecord(c.get("var_x_1"), r)
        clock.t = 1.99
        self.assertSameRecord(c.get("x"), r)
        clock.t = 2.0
        self.assertIsNone(c.get("x"))
        self.assertIsNone(c.get("var_x_1"))

    def test_invalidating_one_key_drops_both(self):
        c = VariableCache(10, Clock())
        c.put(Rec("x", "id1", 0))
        c.invalidate("id1")
        self.assertIsNone(c.get("x"))
        self.assertEqual(len(c), 0)

    def test_an_event_version_refuses_older_reads(self):
        c = VariableCache(10, Clock())
        c.put(Rec("x", "id1", 3))
        c.invalidate("x", min_version=5)      # watch event: version 5 committed
        c.put(Rec("x", "id1", 4))             # a read that raced the event
        self.assertIsNone(c.get("x"))
        self.assertIsNone(c.get("id1"))
        fresh = Rec("x", "id1", 5)
        c.put(fresh)
        self.assertSameRecord(c.get("x"), fresh)
        c.forget("x")                          # deleted: a new variable restarts at 0
        c.put(Rec("x", "id2", 0))
        self.assertEqual(c.get("x").id, "id2")

    def test_ttl_zero_disables(self):
        c = VariableCache(0)
        c.put(Rec("x", "i", 0))
        self.assertIsNone(c.get("x"))


class RacingServer:
    """A stand-in for the BridgeService stub holding one float variable x.

    A GetVariable marked to be held is answered with the version current
    when it arrived, but its reply is only handed back once ``release`` is
    set: the reply of a read that crossed a write of another thread.
    """

    def __init__(self):
        self.version, self.value = 1, 1.0
        self.hold = False
        self.in_flight = threading.Event()   # the held read was answered
        self.release = threading.Event()     # ... and may be delivered

    def _var(self):
        any_v, binary = codec.encode("float", self.value)
        return pb2.Variable(id="var_x_1", name="x", type="float", value=any_v,
                            binary_value=binary, version=self.version)

    def GetVariable(self, req, timeout=None, metadata=None):
        resp = pb2.GetVariableResponse(variable=self._var())
        if self.hold:
            self.hold = False
            self.in_flight.set()
            if not self.release.wait(10):
                raise AssertionError("the held read was never released")
        return resp

    def _write(self, value):
        self.version, self.value = self.version + 1, value

    def SetVariable(self, req, timeout=None, metadata=None):
        self._write(2.0)
        return pb2.SetVariableResponse(success=True, new_version=self.version)

    def SetVariables(self, req, timeout=None, metadata=None):
        self._write(2.0)
        resp = pb2.BatchSetVariablesResponse(success=True)
        resp.new_versions["x"] = self.version
        return resp

    def RollbackVariable(self, req, timeout=None, metadata=None):
        self._write(1.0)
        return pb2.RollbackVariableResponse(success=True, variable=self._var())


class ContextCache(unittest.TestCase):
    """SessionContext's writes leave no room for an older read to be cached."""

    def race(self, write):
        """Thread A's GetVariable is answered before write (thread B) and
        delivered after it returned; B then reads its own write."""
        channel = grpc.insecure_channel("127.0.0.1:1")   # never used: the stub is replaced
        self.addCleanup(channel.close)
        ctx = SessionContext(channel, "s", create=False)
        server = ctx.stub = RacingServer()
        ctx._remember_type("x", "var_x_1", "float")
        server.hold = True
        reader = threading.Thread(target=ctx.get_variable_info, args=("x",))
        reader.start()
        self.assertTrue(server.in_flight.wait(10))
        written = write(ctx)
        server.release.set()
        reader.join(10)
        self.assertFalse(reader.is_alive())
        got = ctx.get_variable_info("x")
        self.assertEqual((got.version, got.value), (server.version, server.value))
        return written

    def test_update_variable_sets_the_version_floor(self):
        self.assertEqual(self.race(lambda ctx: ctx.update_variable("x", 2.0)), 2)

    def test_update_variables_sets_the_version_floor(self):
        self.assertEqual(self.race(lambda ctx: ctx.update_variables({"x": 2.0})), {"x": 2})

    def test_rollback_variable_sets_the_version_floor(self):
        self.assertEqual(self.race(lambda ctx: ctx.rollback_variable("x", 1)).version, 2)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ()


class ScriptedServer:
    """A stand-in stub holding typed variables by name; ``script`` lists
    errors (a status code and message) to raise, per RPC, before answering."""

    def __init__(self, variables=None):
        self.vars = dict(variables or {})     # name -> (type, value, version)
        self.script = {}
        self.calls = []
        self.batches = []
        self.progress = []
        self.before_register = lambda: None

    def _maybe_fail(self, rpc):
        self.calls.append(rpc)
        todo = self.script.get(rpc)
        if todo:
            code, msg = todo.pop(0)
            raise FakeRpcError(code, msg)

    def _var(self, name):
        t, v, ver = self.vars[name]
        any_v, binary = codec.encode(t, v)
        return pb2.Variable(id="var_" + name, name=name, type=t, value=any_v, binary_value=binary, version=ver)

    def GetVariable(self, req, timeout=None, metadata=None):
        self._maybe_fail("GetVariable")
        if req.variable_identifier not in self.vars:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, "variable not found: " + req.variable_identifier)
        return pb2.GetVariableResponse(variable=self._var(req.variable_identifier))

    def _refusal(self, name, any_v):
        """(code, message) of the server's refusal of a write of any_v to
        name, or None: a value encoded as another type is refused."""
        if name not in self.vars:
            return grpc.StatusCode.NOT_FOUND, "variable not found: " + name
        t = self.vars[name][0]
        if codec.type_from_url(any_v.type_url) != t:
            return grpc.StatusCode.INVALID_ARGUMENT, "invalid value: not a " + t
        return None

    def SetVariable(self, req, timeout=None, metadata=None):
        self._maybe_fail("SetVariable")
        name = req.variable_identifier
        refusal = self._refusal(name, req.value)
        if refusal:
            raise FakeRpcError(*refusal)
        t, _, ver = self.vars[name]
        if (req.expected_version or req.expect_version_zero) and req.expected_version != ver:
            raise FakeRpcError(grpc.StatusCode.ABORTED, "version mismatch: current version is %d" % ver)
        self.vars[name] = (t, codec.decode(req.value, req.binary_value), ver + 1)
        return pb2.SetVariableResponse(success=True, new_version=ver + 1)

    def GetVariables(self, req, timeout=None, metadata=None):
        self._maybe_fail("GetVariables")
        resp = pb2.BatchGetVariablesResponse()
        for n in req.variable_identifiers:
            if n in self.vars:
                resp.variables[n].CopyFrom(self._var(n))
            else:
                resp.missing_variables.append(n)
        return resp

    def SetVariables(self, req, timeout=None, metadata=None):
        """As the server: refused updates are errors by name; atomic, any
        refusal commits nothing.  ``batches`` records each batch's names."""
        self._maybe_fail("SetVariables")
        self.batches.append(sorted(req.updates))
        errs = {}
        for n, any_v in req.updates.items():
            refusal = self._refusal(n, any_v)
            if refusal:
                errs[n] = refusal[1]
        resp = pb2.BatchSetVariablesResponse(success=not errs)
        resp.errors.update(errs)
        if req.atomic and errs:
            return resp
        for n, any_v in req.updates.items():
            if n not in errs:
                t, _, ver = self.vars[n]
                self.vars[n] = (t, codec.decode(any_v, req.binary_updates.get(n, b"")), ver + 1)
                resp.new_versions[n] = ver + 1
        return resp

    def ReportOptimizationProgress(self, req, timeout=None, metadata=None):
        self._maybe_fail("ReportOptimizationProgress")
        refusal = self._refusal(req.variable_identifier, req.value)
        if refusal:
            raise FakeRpcError(*refusal)
        self.progress.append((req.variable_identifier, req.iteration,
                              codec.decode(req.value, req.binary_value)))
        return pb2.ReportOptimizationProgressResponse(success=True)

    def RegisterVariable(self, req, timeout=None, metadata=None):
        self._maybe_fail("RegisterVariable")
        self.before_register()
        if req.name in self.vars:
            raise FakeRpcError(grpc.StatusCode.ALREADY_EXISTS, "already exists: " + req.name)
        self.vars[req.name] = (req.type, codec.decode(req.initial_value, req.initial_binary_value), 0)
        return pb2.RegisterVariableResponse(success=True, variable_id="var_" + req.name)


def scripted_context(server, **kw):
    channel = grpc.insecure_channel("127.0.0.1:1")   # never used: the stub is replaced
    ctx = SessionContext(channel, "s", create=False, **kw)
    ctx.stub = server
    return ctx, channel


class ClientBehaviour(unittest.TestCase):
    """Client-side fixes, each against a scripted server (no node)."""

    def context(self, server, **kw):
        ctx, channel = scripted_context(server, **kw)
        self.addCleanup(channel.close)
        return ctx

    def test_setitem_updates_when_a_concurrent_register_wins(self):
        # another writer registers "n" between our failed update and our
        # register: ours must become an update, not VariableExistsError
        server = ScriptedServer()
        server.before_register = lambda: server.vars.setdefault("n", ("float", 0.5, 0))
        ctx = self.context(server)
        ctx["n"] = 0.75
        self.assertEqual(server.vars["n"], ("float", 0.75, 1))
        del server.vars["n"]
        ctx.v.n = 0.25                                      # the attribute form shares the path
        self.assertEqual(server.vars["n"], ("float", 0.25, 1))

    def test_setitem_retries_are_bounded(self):
        server = ScriptedServer()
        # every round: the update finds no variable, the register finds one
        server.script["RegisterVariable"] = [(grpc.StatusCode.ALREADY_EXISTS, "already exists: n")] * 10
        ctx = self.context(server)
        with self.assertRaises(errors.VariableExistsError):
            ctx["n"] = 1.0
        # it did retry, and gave up after a few rounds
        self.assertIn(server.calls.count("RegisterVariable"), range(2, 6))

    def test_a_stale_remembered_type_is_refreshed_not_trusted(self):
        # "y" was an integer when this client saw it; another client deleted
        # it and registered a float "y"
        server = ScriptedServer({"y": ("float", 0.0, 0)})
        ctx = self.context(server)
        ctx._remember_type("y", "var_y", "integer")
        self.assertEqual(ctx.update_variable("y", 2.5), 1)     # refused client-side before
        self.assertEqual(server.vars["y"][:2], ("float", 2.5))
        self.assertEqual(ctx._types.get("y"), "float")
        # refused by the server (the value encodes as the stale type)
        server.vars["y"] = ("integer", 1, 1)
        self.assertEqual(ctx.update_variable("y", 3.0), 2)
        self.assertEqual(server.vars["y"][:2], ("integer", 3))
        # a real refusal is still raised, after one look at the type
        with self.assertRaises(errors.InvalidValueError):
            ctx.update_variable("y", "text")

    # When this client saw them, "y" was an integer, "z" an embedding and "w"
    # a float; another client deleted them and registered them again as a
    # float, a tensor and a string.  A value the stale type cannot encode is
    # refused client-side (y = 2.5); one it encodes is refused by the server
    # (z = [1.0, 2.0] sent as an embedding): each write path must retry once
    # with the server's type, and still refuse a value of no use to it
    # (w = 1.5 is sent as a float, refused, and no string).

    def stale_context(self):
        server = ScriptedServer({"y": ("float", 0.0, 0), "z": ("tensor", {"shape": [1], "data": [0.0]}, 0),
                                 "w": ("string", "a", 0), "c": ("integer", 1, 0)})
        ctx = self.context(server)
        for name, stale in (("y", "integer"), ("z", "embedding"), ("w", "float"), ("c", "integer")):
            ctx._remember_type(name, "var_" + name, stale)
        return server, ctx

    TENSOR = ("tensor", {"shape": [2], "data": [1.0, 2.0]}, 1)

    def test_setitem_retries_a_stale_remembered_type(self):
        server, ctx = self.stale_context()
        ctx["y"] = 2.5
        ctx["z"] = [1.0, 2.0]
        self.assertEqual((server.vars["y"], server.vars["z"]), (("float", 2.5, 1), self.TENSOR))
        self.assertNotIn("RegisterVariable", server.calls)   # an update, not a register
        server.vars["y"] = ("integer", 1, 1)             # and again, the other way round
        ctx.v.y = 7                                      # the attribute form shares the path
        self.assertEqual(server.vars["y"], ("integer", 7, 2))
        with self.assertRaises(errors.InvalidValueError):
            ctx["w"] = 1.5
        with self.assertRaises(errors.InvalidValueError):
            ctx["y"] = "text"
        self.assertEqual((server.vars["y"], server.vars["w"]), (("integer", 7, 2), ("string", "a", 0)))

    def test_update_with_expected_version_retries_a_stale_remembered_type(self):
        server, ctx = self.stale_context()
        self.assertEqual(ctx.update_variable("y", 2.5, expected_version=0), 1)
        self.assertEqual(ctx.update_variable("z", [1.0, 2.0], expected_version=0), 1)
        self.assertEqual((server.vars["y"], server.vars["z"]), (("float", 2.5, 1), self.TENSOR))
        ctx._remember_type("z", "var_z", "embedding")
        with self.assertRaises(errors.VersionConflictError):   # the guard holds on the retry too
            ctx.update_variable("z", [3.0], expected_version=0)
        self.assertEqual(server.vars["z"], self.TENSOR)

    def test_update_variables_retries_stale_remembered_types(self):
        for atomic in (False, True):
            server, ctx = self.stale_context()
            versions = ctx.update_variables({"y": 2.5, "z": [1.0, 2.0], "c": 5}, atomic=atomic)
            self.assertEqual(versions, {"y": 1, "z": 1, "c": 1})
            self.assertEqual((server.vars["y"], server.vars["z"], server.vars["c"]),
                             (("float", 2.5, 1), self.TENSOR, ("integer", 5, 1)))
            # y is looked up before sending; z is refused by the server, then
            # sent again: alone, or (atomic, nothing committed) with the batch
            self.assertEqual(server.batches, [["c", "y", "z"], ["c", "y", "z"] if atomic else ["z"]])
            self.assertEqual((ctx._types.get("y"), ctx._types.get("z")), ("float", "tensor"))

    def test_update_variables_keeps_real_refusals(self):
        server, ctx = self.stale_context()
        # w's fresh type cannot take 1.5 either: its error, the others committed
        with self.assertRaises(BatchUpdateError) as cm:
            ctx.update_variables({"y": 2.5, "z": [1.0, 2.0], "w": 1.5, "c": 5})
        self.assertEqual(list(cm.exception.errors), ["w"])
        self.assertEqual(cm.exception.new_versions, {"y": 1, "z": 1, "c": 1})
        self.assertEqual(server.vars["w"], ("string", "a", 0))
        # atomic: nothing committed, and not sent a second time for nothing
        server, ctx = self.stale_context()
        with self.assertRaises(BatchUpdateError) as cm:
            ctx.update_variables({"y": 2.5, "z": [1.0, 2.0], "w": 1.5, "c": 5}, atomic=True)
        self.assertEqual(cm.exception.new_versions, {})
        self.assertIn("w", cm.exception.errors)
        self.assertEqual(len(server.batches), 1)
        self.assertEqual([server.vars[n][2] for n in "yzwc"], [0, 0, 0, 0])
        # a value no type takes, client-side: nothing sent
        server, ctx = self.stale_context()
        with self.assertRaises(errors.InvalidValueError):
            ctx.update_variables({"y": "text", "c": 5})
        self.assertEqual(server.batches, [])
        # a variable deleted (not registered again): its not-found error stands
        server, ctx = self.stale_context()
        del server.vars["z"]
        with self.assertRaises(BatchUpdateError) as cm:
            ctx.update_variables({"z": [1.0], "c": 5})
        self.assertEqual(cm.exception.errors, {"z": "variable not found: z"})
        self.assertEqual(server.batches, [["c", "z"]])

    def test_batch_block_retries_stale_remembered_types(self):
        server, ctx = self.stale_context()
        with ctx.batch() as b:
            b["y"] = 2.5
            b["z"] = [1.0, 2.0]
        self.assertEqual(b.new_versions, {"y": 1, "z": 1})
        self.assertEqual((server.vars["y"], server.vars["z"]), (("float", 2.5, 1), self.TENSOR))

    def test_report_progress_retries_a_stale_remembered_type(self):
        server, ctx = self.stale_context()
        ctx.report_progress("y", "opt", 1, 2.5)
        ctx.report_progress("z", "opt", 2, [1.0, 2.0])
        self.assertEqual(server.progress, [("y", 1, 2.5), ("z", 2, self.TENSOR[1])])
        with self.assertRaises(errors.InvalidValueError):
            ctx.report_progress("w", "opt", 3, 1.5)
        self.assertEqual(len(server.progress), 2)

    def test_a_deleted_event_forgets_the_type(self):
        from dspex_bridge.session_context import VariableUpdate
        ctx = self.context(ScriptedServer())
        ctx._remember_type("y", "var_y", "integer")
        ctx._on_event(VariableUpdate(name="y", id="var_y", update_type="deleted", value=None, version=-1,
                                     source="", metadata={}, timestamp=None, variable=None))
        self.assertNotIn("y", ctx._types)
        self.assertNotIn("var_y", ctx._types)

    def test_cached_reads_are_copies(self):
        server = ScriptedServer({"e": ("embedding", [1.0, 2.0], 0),
                                 "t": ("tensor", {"shape": [2], "data": [1.0, 2.0]}, 0)})
        ctx = self.context(server, cache_ttl=60)
        first = ctx["e"]                      # the read that filled the cache
        first.append(99.0)
        ctx["e"].append(42.0)                 # a cached read
        info = ctx.get_variable_info("e")
        info.version = 7
        info.value[0] = -1.0
        tensor = ctx["t"]
        tensor["data"][0] = -1.0
        tensor["shape"].append(5)
        self.assertEqual(ctx["e"], [1.0, 2.0])
        self.assertEqual(ctx.get_variable_info("e").version, 0)
        self.assertEqual(ctx["t"], {"shape": [2], "data": [1.0, 2.0]})
        self.assertEqual(server.calls.count("GetVariable"), 2)   # the rest were cache hits

    def test_overflowing_numbers_are_invalid_values(self):
        server = ScriptedServer({"f": ("float", 0.5, 0), "e": ("embedding", [0.5], 0)})
        ctx = self.context(server)
        for name, value in (("f", 10 ** 400), ("e", [10 ** 400]), ("e", [-(10 ** 400)] * 2000)):
            with self.assertRaises(errors.InvalidValueError) as cm:
                ctx.update_variable(name, value)
            self.assertIsInstance(cm.exception, ValueError)
        with self.assertRaises(codec.CodecError):
            codec.encode("embedding", [10 ** 400], binary_threshold=0)
        self.assertNotIn("SetVariable", server.calls)

    def test_a_closed_context_raises_a_bridge_error(self):
        ctx = SessionContext("127.0.0.1:1", "s", create=False)
        ctx.close()
        for call in (ctx.ping, lambda: ctx.get_variable("x"), lambda: ctx.watch(["x"])):
            with self.assertRaises(errors.ClosedError) as cm:
                call()
            self.assertIsInstance(cm.exception, errors.BridgeError)


if __name__ == "__main__":
    unittest.main()
