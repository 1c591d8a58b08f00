"""Integration tests: the Python client against a real node serving gRPC.

One node (bridge_node.BridgeNode) is started for the module; every test uses
its own session ids so tests do not see each other.
"""

import json
import math
import threading
import time
import unittest
import uuid

import _paths  # noqa: F401
import grpc

from bridge_node import BridgeNode
from dspex_bridge import (AccessDeniedError, BatchUpdateError, BridgeTimeoutError, DependencyCycleError,
                          InvalidValueError, LockedError, PreconditionFailedError,
                          RateLimitedError, SessionContext, SessionNotFoundError,
                          UnsupportedError, VariableExistsError, VariableNotFoundError, LimitExceededError,
                          VersionConflictError, VersionNotFoundError)
from dspex_bridge._stubs import pb2, pb2_grpc
from dspex_bridge import codec

NODE = None
RATE_LIMITED = "py_rate_limited"


def setUpModule():
    global NODE
    # A session whose token bucket barely refills (1 per 1000 s, burst 3): the 4th
    # store call is refused, which is how RESOURCE_EXHAUSTED is reached.
    NODE = BridgeNode(extra_eval=(
        "{ok, _} = dspex_store:create_session(<<\"%s\">>, "
        "#{rate_limit => #{rate => 0.001, burst => 3}}),"
        # tools the BEAM offers to Python (dspex_tools), for the tool bridge tests
        "ok = dspex_tools:expose(add, fun(#{<<\"a\">> := A, <<\"b\">> := B}) -> A + B end, "
        "  #{description => <<\"adds two numbers\">>, "
        "    parameters => [#{name => <<\"a\">>, type => <<\"number\">>, required => true}, "
        "                   #{name => <<\"b\">>, type => <<\"number\">>, required => true}]}),"
        "ok = dspex_tools:expose(echo, fun(Args, #{session := S}) -> #{args => Args, session => S} end),"
        "ok = dspex_tools:expose(fails, fun(_) -> {error, <<\"model unavailable\">>} end),"
        "ok = dspex_tools:expose(pow10, fun(#{<<\"n\">> := N}) -> "
        "  binary_to_integer(<<\"1\", (binary:copy(<<\"0\">>, N))/binary>>) end),"
        "ok = dspex_tools:expose(crashes, fun(_) -> erlang:error(boom) end),"
        "ok = dspex_tools:expose(sleepy, fun(_) -> receive after infinity -> ok end end),"
        "ok = dspex_tools:expose(admin_only, fun(_) -> <<\"secret\">> end, #{allow => [<<\"admin_*\">>]}),"
        # a worker pool whose functions Python clients register and run as tools
        "{ok, _} = dspex_workers:start_pool(py_tool_pool, #{module => \"test/python_workers/tools_mod.py\", size => 1}),"
        % RATE_LIMITED)).start()


def tearDownModule():
    if NODE is not None:
        NODE.stop()


def sid(prefix="s"):
    return "%s_%s" % (prefix, uuid.uuid4().hex[:10])


class BridgeCase(unittest.TestCase):
    def setUp(self):
        self.channel = grpc.insecure_channel(NODE.address, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb2_grpc.BridgeServiceStub(self.channel)
        self.session = sid()
        self.ctx = SessionContext(self.channel, self.session, cache_ttl=0)

    def tearDown(self):
        self.channel.close()


class Sessions(BridgeCase):
    def test_ping_echoes_and_stamps_server_time(self):
        r = self.stub.Ping(pb2.PingRequest(message="hello"))
        self.assertIn("hello", r.message)
        self.assertEqual(self.ctx.ping("again"), r.message.replace("hello", "again"))
        self.assertLess(abs(r.server_time.seconds - time.time()), 60)

    def test_initialize_get_heartbeat_cleanup(self):
        s = sid()
        r = self.stub.InitializeSession(pb2.InitializeSessionRequest(
            session_id=s, metadata={"owner": "test"}))
        self.assertTrue(r.success, r.error_message)
        ctx = SessionContext(self.channel, s, create=False, cache_ttl=0)
        ctx.register_variable("a", "integer", 1)
        ctx.register_variable("b", "string", "x")
        info = ctx.session_info()
        self.assertEqual(info["session_id"], s)
        self.assertEqual(info["variable_count"], 2)
        self.assertEqual(info["metadata"].get("owner"), "test")
        self.assertTrue(ctx.heartbeat())
        # initialize again is idempotent and hands back the existing variables
        again = ctx.initialize()
        self.assertEqual(sorted(again), ["a", "b"])
        self.assertEqual(again["a"].value, 1)
        self.assertEqual(ctx.cleanup(), 2)
        self.assertFalse(ctx.heartbeat())
        with self.assertRaises(SessionNotFoundError):
            ctx.session_info()

    def test_unknown_session_is_not_found(self):
        ctx = SessionContext(self.channel, sid("nosuch"), create=False)
        with self.assertRaises(SessionNotFoundError) as cm:
            ctx.get_variable("x")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(SessionNotFoundError):
            ctx.register_variable("x", "integer", 1)

    def test_context_manager_cleans_up_when_asked(self):
        s = sid()
        with SessionContext(NODE.address, s, cleanup_on_exit=True) as ctx:
            ctx["a"] = 1
            self.assertEqual(ctx.session_info()["variable_count"], 1)
        probe = SessionContext(self.channel, s, create=False)
        with self.assertRaises(SessionNotFoundError):
            probe.session_info()

    def test_two_sessions_are_isolated(self):
        other = SessionContext(self.channel, sid(), cache_ttl=0)
        self.ctx.register_variable("shared_name", "integer", 1)
        other.register_variable("shared_name", "integer", 100)
        self.ctx["shared_name"] = 2
        self.assertEqual(other["shared_name"], 100)
        self.assertEqual(self.ctx["shared_name"], 2)
        self.ctx.register_variable("only_here", "string", "x")
        self.assertNotIn("only_here", other)
        self.assertEqual([v.name for v in other.list_variables()], ["shared_name"])
        other.delete_variable("shared_name")
        self.assertEqual(self.ctx["shared_name"], 2)
        other.cleanup()
        self.assertEqual(self.ctx["only_here"], "x")

    def test_rate_limited_session_is_resource_exhausted(self):
        ctx = SessionContext(self.channel, RATE_LIMITED, create=False, cache_ttl=0)
        ok = 0
        with self.assertRaises(RateLimitedError) as cm:
            ctx.register_variable("r", "integer", 0)
            for _ in range(10):
                ctx.get_variable("r")
                ok += 1
        self.assertEqual(cm.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(cm.exception.reason, "rate_limited")
        self.assertNotIsInstance(cm.exception, LimitExceededError)
        self.assertLessEqual(ok, 2)
        # other sessions are not limited
        self.ctx.register_variable("free", "integer", 0)
        for _ in range(10):
            self.ctx.get_variable("free")

    def test_a_name_with_a_nul_byte_is_refused_not_cut_short(self):
        # protobuf-c keeps no string length: "a\x00b" was registered as "a"
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.RegisterVariable(pb2.RegisterVariableRequest(
                session_id=self.session, name="a\x00b", type="float",
                initial_value=codec.any_pb2.Any(type_url="type.googleapis.com/snakepit.float",
                                                value=b"1.0")), timeout=10)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("name", cm.exception.details())
        with self.assertRaises(VariableNotFoundError):
            self.ctx.get_variable_info("a")

    def test_empty_name_is_invalid_argument_not_a_limit(self):
        with self.assertRaises(InvalidValueError) as cm:
            self.ctx.register_variable("", "integer", 1)
        self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(str(cm.exception), "invalid argument: name must not be empty")
        self.assertNotIsInstance(cm.exception, (LimitExceededError, RateLimitedError))

    def test_value_over_the_size_limit_is_a_limit_not_a_rate_limit(self):
        self.ctx.register_variable("big", "string", "small")
        with self.assertRaises(LimitExceededError) as cm:
            self.ctx.update_variable("big", "x" * ((16 << 20) + 16))
        e = cm.exception
        self.assertEqual((e.code, e.limit, e.reason), (grpc.StatusCode.INVALID_ARGUMENT, "value_size", "limit_exceeded"))
        self.assertTrue(str(e).startswith("limit exceeded: value_size (max_value_bytes = "), str(e))
        self.assertNotIsInstance(e, RateLimitedError)
        self.assertEqual(self.ctx.get_variable("big"), "small")



class Variables(BridgeCase):
    VALUES = [("float", 0.25, 0.75), ("integer", 7, -3), ("string", "héllo", "wörld"),
              ("boolean", True, False), ("embedding", [0.5, -1.0, 2.0], [1.0, 2.0, 3.0]),
              ("tensor", {"shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]},
               {"shape": [2, 2], "data": [0.0, -1.0, 1e300, 5.0]})]

    def test_register_get_update_every_type(self):
        for t, v0, v1 in self.VALUES:
            name = "v_" + t
            vid = self.ctx.register_variable(name, t, v0, metadata={"k": "m"})
            self.assertTrue(vid)
            info = self.ctx.get_variable_info(name)
            self.assertEqual((info.name, info.id, info.type, info.value, info.version),
                             (name, vid, t, v0, 0))
            self.assertEqual(info.metadata.get("k"), "m")
            self.assertEqual(self.ctx.get_variable(vid), v0)      # by id too
            self.assertEqual(self.ctx.update_variable(name, v1), 1)
            self.assertEqual(self.ctx[name], v1)

    def test_choice_and_module_with_constraints(self):
        self.ctx.register_variable("c", "choice", "a", constraints={"choices": ["a", "b"]})
        self.ctx["c"] = "b"
        with self.assertRaises(InvalidValueError) as cm:
            self.ctx["c"] = "z"
        self.assertEqual(cm.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(self.ctx["c"], "b")
        self.ctx.register_variable("m", "module", "Predict",
                                   constraints={"allowed_modules": ["Predict", "ChainOfThought"]})
        self.ctx["m"] = "ChainOfThought"
        self.assertEqual(self.ctx.get_variable_info("m").constraints,
                         {"allowed_modules": ["Predict", "ChainOfThought"]})

    def test_non_finite_floats_round_trip(self):
        self.ctx.register_variable("f", "float", math.inf)
        self.assertEqual(self.ctx["f"], math.inf)
        self.ctx["f"] = -math.inf
        self.assertEqual(self.ctx["f"], -math.inf)
        self.ctx["f"] = math.nan
        self.assertTrue(math.isnan(self.ctx["f"]))

    def test_constraint_violation_is_invalid_argument_and_changes_nothing(self):
        self.ctx.register_variable("t", "float", 0.5, constraints={"min": 0.0, "max": 1.0})
        with self.assertRaises(InvalidValueError) as cm:
            self.ctx.update_variable("t", 1.5)
        self.assertIn("1.0", str(cm.exception))
        info = self.ctx.get_variable_info("t")
        self.assertEqual((info.value, info.version), (0.5, 0))
        with self.assertRaises(InvalidValueError):
            self.ctx.register_variable("bad", "float", 2.0, constraints={"max": 1.0})
        with self.assertRaises(InvalidValueError):
            self.ctx.register_variable("bad", "no_such_type", 1)
        self.assertNotIn("bad", self.ctx)

    def test_wrong_json_for_type_is_invalid_argument(self):
        self.ctx.register_variable("i", "integer", 1)
        req = pb2.SetVariableRequest(session_id=self.session, variable_identifier="i")
        req.value.type_url = codec.type_url("integer")
        req.value.value = b'"not a number"'
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.SetVariable(req)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        req.value.value = b"{broken"
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.SetVariable(req)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)

    def test_register_taken_name_fails(self):
        self.ctx.register_variable("x", "integer", 1)
        with self.assertRaises(VariableExistsError) as cm:
            self.ctx.register_variable("x", "integer", 2)
        self.assertEqual(cm.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        self.assertIn("x", str(cm.exception))
        self.assertEqual(self.ctx["x"], 1)

    def test_missing_variable_is_not_found(self):
        with self.assertRaises(VariableNotFoundError) as cm:
            self.ctx.get_variable("nope")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(KeyError):
            self.ctx["nope"]
        with self.assertRaises(VariableNotFoundError):
            self.ctx.update_variable("nope", 1, var_type="integer")
        with self.assertRaises(VariableNotFoundError):
            self.ctx.delete_variable("nope")

    def test_list_with_glob_and_delete(self):
        for n in ["temp_a", "temp_b", "other"]:
            self.ctx.register_variable(n, "integer", 1)
        self.assertEqual(sorted(v.name for v in self.ctx.list_variables("temp_*")),
                         ["temp_a", "temp_b"])
        self.assertEqual(sorted(v.name for v in self.ctx.list_variables("?ther")), ["other"])
        self.assertEqual(len(self.ctx.list_variables()), 3)
        self.ctx.delete_variable("temp_a")
        self.assertNotIn("temp_a", self.ctx)
        del self.ctx["temp_b"]
        self.assertEqual([v.name for v in self.ctx.list_variables()], ["other"])

    def test_dict_and_attribute_access(self):
        self.ctx["n"] = 3                       # registers as integer
        self.assertEqual(self.ctx.get_variable_info("n").type, "integer")
        self.ctx["n"] = 4
        self.assertEqual(self.ctx["n"], 4)
        self.ctx.v.ratio = 0.5                  # registers as float
        self.assertEqual(self.ctx.v.ratio, 0.5)
        self.ctx.v.ratio = 0.75
        self.assertEqual(self.ctx["ratio"], 0.75)
        self.assertIn("ratio", self.ctx)
        self.assertEqual(sorted(self.ctx.keys()), ["n", "ratio"])
        with self.assertRaises(AttributeError):
            self.ctx.v.missing
        strict = SessionContext(self.channel, self.session, create=False, strict=True)
        with self.assertRaises(VariableNotFoundError):
            strict["new_one"] = 1
        self.assertNotIn("new_one", self.ctx)

    def test_expected_version(self):
        self.ctx.register_variable("cas", "integer", 0)
        self.assertEqual(self.ctx.update_variable("cas", 1, expected_version=0), 1)
        with self.assertRaises(VersionConflictError) as cm:
            self.ctx.update_variable("cas", 2, expected_version=0)
        self.assertEqual(cm.exception.current_version, 1)
        self.assertEqual(cm.exception.code, grpc.StatusCode.ABORTED)
        with self.assertRaises(VersionConflictError) as cm:
            self.ctx.update_variable("cas", 2, expected_version=5)
        self.assertEqual(cm.exception.current_version, 1)
        self.assertEqual(self.ctx.update_variable("cas", 2, expected_version=1), 2)
        self.assertEqual(self.ctx.update_variable("cas", 3), 3)   # no check
        self.assertEqual(self.ctx["cas"], 3)

    def test_batch_get(self):
        self.ctx.register_variable("a", "integer", 1)
        self.ctx.register_variable("b", "string", "two")
        self.assertEqual(self.ctx.get_variables(["a", "b"]), {"a": 1, "b": "two"})
        found, missing = self.ctx.get_variables_info(["a", "zz"])
        self.assertEqual(list(found), ["a"])
        self.assertEqual(missing, ["zz"])
        with self.assertRaises(VariableNotFoundError):
            self.ctx.get_variables(["a", "zz"])

    def test_batch_update_atomic_and_not(self):
        self.ctx.register_variable("a", "integer", 1)
        self.ctx.register_variable("b", "float", 0.5, constraints={"max": 1.0})
        self.assertEqual(self.ctx.update_variables({"a": 2, "b": 0.75}), {"a": 1, "b": 1})
        with self.assertRaises(BatchUpdateError) as cm:
            self.ctx.update_variables({"a": 3, "b": 9.0}, atomic=True)
        self.assertEqual(list(cm.exception.errors), ["b"])
        self.assertEqual(self.ctx.get_variables(["a", "b"]), {"a": 2, "b": 0.75})
        with self.assertRaises(BatchUpdateError) as cm:
            self.ctx.update_variables({"a": 4, "b": 9.0}, atomic=False)
        self.assertEqual(list(cm.exception.errors), ["b"])
        self.assertEqual(cm.exception.new_versions, {"a": 2})
        self.assertEqual(self.ctx.get_variables(["a", "b"]), {"a": 4, "b": 0.75})

    def test_batch_update_unknown_names_are_errors_of_the_batch(self):
        """An unknown name is the server's to refuse, whether or not the
        caller gave its type: BatchUpdateError, the others of a non-atomic
        batch committed, nothing of an atomic one."""
        self.ctx.register_variable("a", "float", 0.1)
        for types in (None, {"zz": "integer"}):
            with self.assertRaises(BatchUpdateError) as cm:
                self.ctx.update_variables({"a": 0.2, "zz": 1}, types=types)
            self.assertEqual(list(cm.exception.errors), ["zz"])
            self.assertIn("a", cm.exception.new_versions)
        self.assertEqual(self.ctx["a"], 0.2)
        for zz in (1, [object()]):                         # [object()]: no type fits it either
            with self.assertRaises(BatchUpdateError) as cm:
                self.ctx.update_variables({"a": 0.3, "zz": zz}, atomic=True)
            self.assertEqual((list(cm.exception.errors), cm.exception.new_versions), (["zz"], {}))
        with self.assertRaises(BatchUpdateError) as cm:
            self.ctx.update_variables({"a": 0.25, "zz": [object()]})
        self.assertEqual((list(cm.exception.errors), list(cm.exception.new_versions)), (["zz"], ["a"]))
        self.ctx["a"] = 0.2
        with self.assertRaises(BatchUpdateError) as cm:
            with self.ctx.batch() as b:
                b["a"] = 0.4
                b["zz"] = 1
        self.assertEqual(list(cm.exception.errors), ["zz"])
        self.assertEqual(self.ctx["a"], 0.2)
        self.assertNotIn("zz", self.ctx)

    def test_every_write_path_retries_a_type_changed_by_another_client(self):
        """Another client deletes "y" and "z" and registers them again with
        other types, so the types this client remembers are stale: a float
        2.5 cannot be encoded as the old integer (refused here), a list sent
        as the old embedding is refused by the server (now a tensor).  Each
        write path retries once with the server's type; none registers."""
        other = SessionContext(self.channel, self.session, create=False, cache_ttl=0)
        tensor = {"shape": [2], "data": [1.0, 2.0]}

        def stale():
            for name, old, new in (("y", ("integer", 1), ("float", 0.0)),
                                   ("z", ("embedding", [0.0]), ("tensor", {"shape": [1], "data": [0.0]}))):
                if name in other:
                    other.delete_variable(name)
                other.register_variable(name, *old)
                self.assertEqual(self.ctx.get_variable_info(name).type, old[0])   # remembered
                other.delete_variable(name)
                other.register_variable(name, *new)

        def check(version=1):
            y, z = self.ctx.get_variable_info("y"), self.ctx.get_variable_info("z")
            self.assertEqual((y.type, y.value, y.version), ("float", 2.5, version))
            self.assertEqual((z.type, z.value, z.version), ("tensor", tensor, version))

        stale()
        self.ctx["y"] = 2.5
        self.ctx.v.z = [1.0, 2.0]
        check()
        stale()
        self.assertEqual(self.ctx.update_variable("y", 2.5, expected_version=0), 1)
        self.assertEqual(self.ctx.update_variable("z", [1.0, 2.0], expected_version=0), 1)
        check()
        for atomic in (False, True):
            stale()
            self.assertEqual(self.ctx.update_variables({"y": 2.5, "z": [1.0, 2.0]}, atomic=atomic),
                             {"y": 1, "z": 1})
            check()
        stale()
        with self.ctx.batch() as b:
            b["y"] = 2.5
            b["z"] = [1.0, 2.0]
        check()
        stale()
        for name, value in (("y", 2.5), ("z", [1.0, 2.0])):
            self.ctx.start_optimization(name, "opt1", {"objective": "minimize", "metric": "loss"})
            self.ctx.report_progress(name, "opt1", 1, value, {"loss": 0.1})
            self.assertTrue(self.ctx.stop_optimization(name, optimizer_id="opt1", apply_best=True).applied)
        check()
        # still refused: a value of no use to the real type (nothing written)
        stale()
        with self.assertRaises(InvalidValueError):
            self.ctx["y"] = "text"
        with self.assertRaises(InvalidValueError):
            self.ctx.update_variables({"z": [1.0, 2.0], "y": "text"}, atomic=True)
        self.assertEqual(self.ctx.get_variables(["y", "z"]), {"y": 0.0, "z": {"shape": [1], "data": [0.0]}})

    def test_setitem_on_a_fresh_name_from_many_threads(self):
        """ctx[n] = v registers if missing: threads racing on the first write
        all succeed (a lost register race becomes an update)."""
        results = []
        barrier = threading.Barrier(4)

        def writer(k):
            ctx = SessionContext(self.channel, self.session, create=False, cache_ttl=0)
            barrier.wait()
            for i in range(10):
                try:
                    ctx["fresh"] = float(k * 100 + i)
                    results.append(None)
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    results.append(e)
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual([r for r in results if r is not None], [])
        self.assertEqual(len(results), 40)
        self.assertEqual(self.ctx.get_variable_info("fresh").version, 39)

    def test_batch_block_writes_all_or_nothing(self):
        self.ctx.register_variable("p", "integer", 1)
        self.ctx.register_variable("q", "choice", "a", constraints={"choices": ["a", "b"]})
        with self.ctx.batch() as b:
            b["p"] = 2
            b["q"] = "b"
        self.assertEqual(b.new_versions, {"p": 1, "q": 1})
        self.assertEqual(self.ctx.get_variables(["p", "q"]), {"p": 2, "q": "b"})
        with self.assertRaises(BatchUpdateError):
            with self.ctx.batch() as b:
                b["p"] = 3
                b["q"] = "zzz"
        with self.assertRaises(RuntimeError):
            with self.ctx.batch() as b:
                b["p"] = 4
                raise RuntimeError("abandon the batch")
        self.assertEqual(self.ctx.get_variables(["p", "q"]), {"p": 2, "q": "b"})

    def test_history_and_rollback(self):
        self.ctx.register_variable("h", "integer", 10)
        for v in (11, 12, 13):
            self.ctx["h"] = v
        hist = self.ctx.get_variable_history("h")
        self.assertEqual([(e.version, e.value) for e in hist], [(2, 12), (1, 11), (0, 10)])
        self.assertEqual([(e.version, e.value) for e in self.ctx.get_variable_history("h", limit=1)],
                         [(2, 12)])
        var = self.ctx.rollback_variable("h", 0)
        self.assertEqual((var.value, var.version), (10, 4))
        self.assertEqual(self.ctx["h"], 10)
        with self.assertRaises(VersionNotFoundError) as cm:
            self.ctx.rollback_variable("h", 99)
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(self.ctx.get_variable_info("h").version, 4)

    def test_big_tensor_round_trip(self):
        n = 256 * 1024                          # 2 MiB of float64
        data = [math.sin(i) * 1e3 for i in range(n)]
        t = {"shape": [512, 512], "data": data}
        self.ctx.register_variable("big", "tensor", t)
        got = self.ctx.get_variable_info("big")
        self.assertEqual(got.value["shape"], [512, 512])
        self.assertEqual(got.value["data"], data)           # float64: exact
        raw = self.stub.GetVariable(pb2.GetVariableRequest(
            session_id=self.session, variable_identifier="big")).variable
        self.assertEqual(len(raw.binary_value), n * 8)      # travelled as binary
        data2 = [x + 1.0 for x in data]
        self.ctx.update_variable("big", {"shape": [512, 512], "data": data2})
        self.assertEqual(self.ctx["big"]["data"][:3], data2[:3])
        self.assertEqual(self.ctx["big"]["data"], data2)
        old = self.ctx.get_variable_history("big")          # archived big value, binary too
        self.assertEqual([e.version for e in old], [0])
        self.assertEqual(old[0].value, t)
        emb = [float(i) for i in range(5000)]
        self.ctx.register_variable("emb", "embedding", emb)
        self.assertEqual(self.ctx["emb"], emb)

    def test_binary_with_wrong_length_is_invalid(self):
        self.ctx.register_variable("e", "embedding", [1.0, 2.0])
        req = pb2.SetVariableRequest(session_id=self.session, variable_identifier="e",
                                     binary_value=b"\0" * 12)
        req.value.type_url = codec.type_url("embedding")
        req.value.value = b'{"shape":[2],"dtype":"float64"}'
        with self.assertRaises(grpc.RpcError) as cm:
            self.stub.SetVariable(req)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        req.binary_value = b"\0" * 8
        req.value.value = b'{"shape":[2],"dtype":"float32"}'
        self.stub.SetVariable(req)
        self.assertEqual(self.ctx["e"], [0.0, 0.0])

    def test_cache_serves_reads_and_own_writes_invalidate(self):
        ctx = SessionContext(self.channel, self.session, create=False, cache_ttl=60)
        other = SessionContext(self.channel, self.session, create=False, cache_ttl=0)
        ctx.register_variable("c", "integer", 1)
        self.assertEqual(ctx["c"], 1)
        other["c"] = 2                          # not seen by ctx's cache...
        self.assertEqual(ctx["c"], 1)
        self.assertGreaterEqual(ctx.cache.hits, 1)
        self.assertEqual(ctx.get_variable("c", bypass_cache=True), 2)
        ctx["c"] = 3                            # ...but its own write is
        self.assertEqual(ctx["c"], 3)


class Concurrency(BridgeCase):
    def test_eight_threads_compare_and_set_increments(self):
        self.ctx.register_variable("counter", "integer", 0)
        per_thread, threads = 50, 8
        conflicts = [0] * threads
        errors = []
        all_connected = threading.Barrier(threads, timeout=60)

        def worker(i):
            try:
                ctx = SessionContext(NODE.address, self.session, create=False, cache_ttl=0)
                ctx.get_variable("counter")          # connected before the race starts
                all_connected.wait()
                done = 0
                while done < per_thread:
                    info = ctx.get_variable_info("counter")
                    try:
                        ctx.update_variable("counter", info.value + 1,
                                            expected_version=info.version)
                        done += 1
                    except VersionConflictError as e:
                        self.assertIsNotNone(e.current_version)
                        self.assertGreater(e.current_version, info.version)
                        conflicts[i] += 1
                ctx.close()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(errors, [])
        info = self.ctx.get_variable_info("counter")
        self.assertEqual(info.value, per_thread * threads)
        self.assertEqual(info.version, per_thread * threads)
        self.assertGreater(sum(conflicts), 0, "8 threads never conflicted: CAS untested")

    def test_watch_sees_every_change_in_order(self):
        self.ctx.register_variable("w", "integer", 0)
        self.ctx.register_variable("w2", "string", "a")
        watch = self.ctx.watch(["w", "w2"], include_initial=True)
        first = [next(watch), next(watch)]
        self.assertEqual(sorted((u.name, u.update_type, u.value) for u in first),
                         [("w", "initial_value", 0), ("w2", "initial_value", "a")])
        n = 200
        writer_ctx = SessionContext(NODE.address, self.session, create=False)

        def writer():
            for i in range(1, n + 1):
                writer_ctx.update_variable("w", i, var_type="integer")
                if i % 50 == 0:
                    writer_ctx.update_variable("w2", "v%d" % i, var_type="string")
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        seen_w, seen_w2 = [], []
        for upd in watch:
            self.assertEqual(upd.update_type, "value_change")
            if upd.name == "w":
                seen_w.append((upd.version, upd.value))
            else:
                seen_w2.append(upd.value)
            if len(seen_w) == n and len(seen_w2) == n // 50:
                break
        watch.cancel()
        t.join()
        self.assertEqual(seen_w, [(i, i) for i in range(1, n + 1)])
        self.assertEqual(seen_w2, ["v50", "v100", "v150", "v200"])
        writer_ctx.close()

    def test_watch_events_invalidate_the_cache_and_report_deletes(self):
        cached = SessionContext(self.channel, self.session, create=False, cache_ttl=600)
        cached.register_variable("x", "integer", 1)
        self.assertEqual(cached["x"], 1)
        with cached.watch(["x"]) as w:
            self.ctx["x"] = 2
            upd = next(w)
            self.assertEqual((upd.name, upd.value, upd.version), ("x", 2, 1))
            self.assertEqual(cached["x"], 2)     # the event dropped the cached 1
            self.ctx.delete_variable("x")        # deleted by another client
            upd = next(w)
            self.assertEqual((upd.name, upd.update_type), ("x", "deleted"))
            self.assertNotIn("x", cached)        # ...and gone from the cache

    def test_cache_watcher_keeps_the_cache_coherent(self):
        cached = SessionContext(self.channel, self.session, create=False, cache_ttl=600)
        cached.register_variable("y", "integer", 1)
        self.assertEqual(cached["y"], 1)
        watcher = cached.watch_cache(["y"])
        try:
            self.assertEqual(cached["y"], 1)
            hits = cached.cache.hits
            self.assertEqual(cached["y"], 1)
            self.assertEqual(cached.cache.hits, hits + 1)        # served locally
            for i, v in enumerate((2, 3, 4), 1):
                self.ctx["y"] = v                                 # another client writes
                self.assertTrue(watcher.wait_for_events(i, 10))
                self.assertEqual(cached["y"], v)
        finally:
            watcher.stop()

    def test_cache_watcher_of_a_name_and_its_id(self):
        vid = self.ctx.register_variable("y", "float", 0.0)
        watcher = self.ctx.watch_cache(["y", vid, "y"], ready_timeout=10)   # one variable
        watcher.stop()

    def test_watch_deadline(self):
        self.ctx.register_variable("quiet", "integer", 0)
        with self.assertRaises(BridgeTimeoutError):
            next(self.ctx.watch(["quiet"], timeout=0.3))

    def test_streams_cut_by_a_tiny_deadline_leave_no_handler(self):
        # The port announced a call after arming its close notice, so a call
        # cancelled at once could be reported cancelled before it existed on
        # the BEAM: its watch loop then ran forever. 500 streams cut by a 1 ms
        # deadline, from 20 threads (most runs leaked one before the fix); every handler must end.
        self.ctx.register_variable("cut", "integer", 0)
        calls = [lambda: self.stub.WatchVariables(pb2.WatchVariablesRequest(
                     session_id=self.session, variable_identifiers=["cut"]), timeout=0.001),
                 lambda: self.stub.WatchEvents(pb2.WatchEventsRequest(session_id=self.session),
                                               timeout=0.001)]

        def caller(k):
            for i in range(25):
                try:
                    for _ in calls[(k + i) % 2]():
                        pass
                except grpc.RpcError:
                    pass
        threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # cancel notices travel on their own: poll (bounded) until only the
        # dashboard call itself is in flight
        end = time.monotonic() + 20
        while self.ctx.get_dashboard(whole_node=True)["grpc"]["in_flight"] > 1:
            self.assertLess(time.monotonic(), end, "a cancelled stream's handler never ended")
            time.sleep(0.01)

    def test_watch_unknown_variable_or_empty_list_fails(self):
        with self.assertRaises(VariableNotFoundError):
            next(self.ctx.watch(["nope"]))
        with self.assertRaises(InvalidValueError):
            next(self.ctx.watch([]))


class Graph(BridgeCase):
    def test_dependencies(self):
        for n in ("a", "b", "c", "d"):
            self.ctx.register_variable(n, "integer", 0)
        self.ctx.add_dependency("a", "b")
        self.ctx.add_dependency("b", "c")
        self.ctx.add_dependency("a", "d", "control")
        self.assertEqual(self.ctx.get_dependencies("c"), ["b"])
        self.assertEqual(sorted(self.ctx.get_dependents("a")), ["b", "d"])
        trans = self.ctx.get_dependents("a", transitive=True)
        self.assertEqual(sorted(trans), ["b", "c", "d"])
        self.assertLess(trans.index("b"), trans.index("c"))
        order = self.ctx.get_update_order("a")
        self.assertEqual(order[0], "a")
        self.assertLess(order.index("b"), order.index("c"))
        with self.assertRaises(DependencyCycleError) as cm:
            self.ctx.add_dependency("c", "a")
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.ctx.remove_dependency("b", "c")
        self.assertEqual(self.ctx.get_dependencies("c"), [])
        self.ctx.add_dependency("c", "a")                 # no cycle any more
        with self.assertRaises(VariableNotFoundError):
            self.ctx.add_dependency("a", "nope")


class Optimization(BridgeCase):
    def test_optimizer_lock_progress_and_apply_best(self):
        self.ctx.register_variable("lr", "float", 0.1)
        oid = self.ctx.start_optimization("lr", "opt1", {"objective": "minimize",
                                                         "metric": "loss"})
        self.assertTrue(oid.startswith("opt1:"), oid)
        st = self.ctx.get_optimization_status("lr")
        self.assertTrue(st.optimizing)
        self.assertEqual(st.optimizer_id, "opt1")
        self.assertGreater(st.fencing_token, 0)
        self.assertTrue(self.ctx.get_variable_info("lr").optimizing)
        # another optimizer is refused; a plain write is refused while locked
        with self.assertRaises(LockedError):
            self.ctx.start_optimization("lr", "opt2", {"conflict": "abort"})
        with self.assertRaises(LockedError) as cm:
            self.ctx["lr"] = 0.5
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        for i, (v, loss) in enumerate([(0.2, 0.9), (0.05, 0.3), (0.3, 0.6)], 1):
            self.ctx.report_progress("lr", "opt1", i, v, {"loss": loss})
        with self.assertRaises(PreconditionFailedError):
            self.ctx.report_progress("lr", "opt2", 9, 0.9, {"loss": 0.0})
        st = self.ctx.get_optimization_status("lr")
        self.assertEqual((st.iterations, st.best_value, st.best_iteration), (3, 0.05, 2))
        self.assertEqual(st.best_metrics, {"loss": 0.3})
        with self.assertRaises(LockedError) as cm:      # held by another optimizer
            self.ctx.stop_optimization("lr", optimizer_id="opt2")
        self.assertIn("opt1", str(cm.exception))
        res = self.ctx.stop_optimization("lr", optimizer_id="opt1", apply_best=True)
        self.assertTrue(res.applied)
        self.assertEqual(res.final_value, 0.05)
        self.assertEqual(self.ctx["lr"], 0.05)
        self.assertFalse(self.ctx.get_optimization_status("lr").optimizing)
        with self.assertRaises(PreconditionFailedError) as cm:   # nothing runs any more
            self.ctx.stop_optimization("lr")
        self.assertNotIsInstance(cm.exception, LockedError)
        self.ctx["lr"] = 0.5                            # unlocked again
        self.assertEqual(self.ctx["lr"], 0.5)

    def test_client_deadline_cancels_a_waiting_optimizer(self):
        self.ctx.register_variable("q", "float", 0.1)
        self.ctx.start_optimization("q", "holder")
        waiter = SessionContext(self.channel, self.session, create=False, timeout=0.5)
        t0 = time.monotonic()
        with self.assertRaises(BridgeTimeoutError) as cm:   # queued behind "holder"
            waiter.start_optimization("q", "waiter", {"conflict": "wait", "timeout_ms": 60000})
        self.assertEqual(cm.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(time.monotonic() - t0, 30)
        # The client gives up at its own deadline; the server's cancel notice
        # travels separately, and nothing streams it back, so poll (bounded)
        # until the node has no call in flight but the dashboard call itself.
        end = time.monotonic() + 20
        while self.ctx.get_dashboard(whole_node=True)["grpc"]["in_flight"] > 1:
            self.assertLess(time.monotonic(), end, "the waiter's call never ended on the server")
            time.sleep(0.01)
        self.assertEqual(self.ctx.get_optimization_status("q").optimizer_id, "holder")
        self.ctx.stop_optimization("q", optimizer_id="holder")
        # The deadline reached the server: the abandoned waiter was not granted.
        st = self.ctx.get_optimization_status("q")
        self.assertFalse(st.optimizing, st)
        self.ctx["q"] = 0.2

    def test_unknown_config_key_is_invalid(self):
        self.ctx.register_variable("x", "float", 0.1)
        with self.assertRaises(InvalidValueError):
            self.ctx.start_optimization("x", "o", {"bogus": 1})
        self.assertFalse(self.ctx.get_optimization_status("x").optimizing)


class Access(BridgeCase):
    def test_deepest_conditions_accepted_stay_readable(self):
        # conditions 99 deep were accepted, then the session's reads failed
        # INTERNAL for good: the reply nests them a few levels further
        self.ctx.register_variable("deep", "float", 0.5)
        nest = "1"
        for _ in range(99):
            nest = "[" + nest + "]"
        self.stub.SetVariablePermissions(pb2.SetVariablePermissionsRequest(
            session_id=self.session, variable_identifier="deep",
            rules=[pb2.AccessRule(session_pattern="x*", permissions=["read"],
                                  conditions_json='{"k":' + nest + '}')]), timeout=10)
        got = self.stub.GetVariable(pb2.GetVariableRequest(session_id=self.session,
                                                           variable_identifier="deep"), timeout=10)
        rules = json.loads(got.variable.access_control_json)
        self.assertIn(nest, json.dumps(rules, separators=(",", ":")))
        events = self.stub.GetEvents(pb2.GetEventsRequest(session_id=self.session), timeout=10)
        self.assertGreater(len(events.events), 0)

    def test_rules_checks_and_denials(self):
        owner = self.ctx
        owner.register_variable("secret", "float", 0.5)
        intruder = owner.as_principal(sid("other"))
        with self.assertRaises(AccessDeniedError) as cm:
            intruder["secret"]
        self.assertEqual(cm.exception.code, grpc.StatusCode.PERMISSION_DENIED)
        owner.set_variable_permissions("secret", [
            {"session_pattern": "*", "permissions": ["read"]},
            {"session_pattern": "admin_*", "permissions": ["read", "write"],
             "conditions": {"role": "tuner"}}])
        self.assertEqual(intruder["secret"], 0.5)
        with self.assertRaises(AccessDeniedError):
            intruder.update_variable("secret", 0.7)
        admin = owner.as_principal("admin_1", context={"role": "tuner"})
        admin.update_variable("secret", 0.7)
        self.assertEqual(owner["secret"], 0.7)
        admin_wrong = owner.as_principal("admin_1", context={"role": "viewer"})
        with self.assertRaises(AccessDeniedError):
            admin_wrong.update_variable("secret", 0.9)
        self.assertEqual(owner["secret"], 0.7)
        self.assertTrue(owner.check_variable_access("secret", "anyone", "read"))
        denied = owner.check_variable_access("secret", "anyone", "write")
        self.assertFalse(denied)
        self.assertTrue(denied.reason)
        self.assertTrue(owner.check_variable_access("secret", "admin_2", "write",
                                                    {"role": "tuner"}))
        with self.assertRaises(InvalidValueError):
            owner.set_variable_permissions("secret", [{"session_pattern": "*",
                                                       "permissions": ["fly"]}])
        with self.assertRaises(AccessDeniedError):   # only the owner sets rules
            intruder.set_variable_permissions("secret", [{"session_pattern": "*",
                                                          "permissions": ["write"]}])

    def test_a_context_of_another_principal_reads_by_the_rules_and_owns_nothing(self):
        self.ctx.register_variable("shared", "float", 0.25)
        self.ctx.set_variable_permissions("shared", [{"session_pattern": "reader_*", "permissions": ["read"]}])
        # built directly with a principal: no InitializeSession (the session's own call)
        reader = SessionContext(self.channel, self.session, principal="reader_1", cache_ttl=0)
        self.assertEqual(reader["shared"], 0.25)
        with self.assertRaises(AccessDeniedError):
            reader.update_variable("shared", 0.5)
        for own in (lambda: reader.register_variable("planted", "float", 0.0),
                    lambda: reader.get_events(),
                    lambda: reader.state_at(sequence=1),
                    lambda: reader.initialize()):
            with self.assertRaises(AccessDeniedError):
                own()
        self.assertNotIn("planted", self.ctx.list_variables())


class Dashboard(BridgeCase):
    def test_dashboard(self):
        self.ctx.register_variable("a", "integer", 1)
        self.ctx.get_variable("a")
        d = self.ctx.get_dashboard()
        self.assertIsInstance(d, dict)
        # the node's own figures and the dspex_metrics analytics, together
        self.assertIn("in_flight", d["grpc"])
        self.assertGreaterEqual(d["metrics"]["last_minute"]["reads"], 1)
        self.assertGreaterEqual(d["metrics"]["last_hour"]["operations"], 2)
        self.assertIn("p95_latency_us", d["metrics"]["last_hour"])
        r = self.stub.GetDashboard(pb2.GetDashboardRequest(session_id=""))
        self.assertGreaterEqual(r.session_count, 1)
        self.assertGreaterEqual(r.variable_count, 1)


if __name__ == "__main__":
    unittest.main()


class ElixirTools(unittest.TestCase):
    """The BEAM's tools (dspex_tools) called from Python: GetExposedElixirTools
    and ExecuteElixirTool, through SessionContext and on the raw wire as
    snakepit 0.4.3's client sends them (JSON text under a StringValue type_url)."""

    def setUp(self):
        self.ctx = SessionContext(NODE.address, sid(), cache_ttl=0, timeout=10)

    def tearDown(self):
        self.ctx.cleanup()
        self.ctx.close()

    def test_deepest_parameter_accepted_echoes_back(self):
        # a parameter 98 deep (the reader takes 100) came back INTERNAL
        deep = "[" * 98 + "]" * 98
        r = self.ctx.stub.ExecuteElixirTool(pb2.ExecuteElixirToolRequest(
            session_id=self.ctx.session_id, tool_name="echo",
            parameters={"x": codec.any_pb2.Any(type_url="type.googleapis.com/snakepit.x",
                                               value=deep.encode())}), timeout=10)
        self.assertTrue(r.success, r)
        self.assertIn(deep, r.result.value.decode().replace(" ", ""))

    def test_list_and_call(self):
        names = [t.name for t in self.ctx.list_elixir_tools()]
        self.assertEqual(names, sorted(names))
        self.assertIn("add", names)
        self.assertNotIn("admin_only", names)          # not for this principal
        add = next(t for t in self.ctx.list_elixir_tools() if t.name == "add")
        self.assertEqual(add.description, "adds two numbers")
        self.assertEqual([(p["name"], p["type"], p["required"]) for p in add.parameters],
                         [("a", "number", True), ("b", "number", True)])
        self.assertEqual(self.ctx.call_elixir_tool("add", a=2, b=3.5), 5.5)
        self.assertEqual(self.ctx.tools.add(a=1, b=2), 3)              # attribute access
        self.assertEqual(self.ctx.elixir_tools["add"](a=4, b=4), 8)    # snakepit's dict of proxies
        self.assertIn("adds two numbers", self.ctx.elixir_tools["add"].__doc__)
        self.assertEqual(self.ctx.call_tool("add", a=0, b=0), 0)
        echoed = self.ctx.call_elixir_tool("echo", x=[1, "two", None, True], y={"k": 1.5})
        self.assertEqual(echoed, {"args": {"x": [1, "two", None, True], "y": {"k": 1.5}},
                                  "session": self.ctx.session_id})

    def test_errors(self):
        from dspex_bridge import ToolError, ToolNotFoundError
        with self.assertRaises(ToolNotFoundError) as cm:
            self.ctx.call_elixir_tool("no_such_tool")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(ToolError) as cm:
            self.ctx.call_elixir_tool("fails")
        self.assertEqual((str(cm.exception), cm.exception.kind), ("model unavailable", "tool_error"))
        with self.assertRaises(ToolError) as cm:
            self.ctx.tools.crashes()
        self.assertEqual(cm.exception.kind, "tool_crashed")
        self.assertIn("boom", str(cm.exception))
        with self.assertRaises(InvalidValueError):
            self.ctx.call_elixir_tool("add", a=object())
        # a bad argument of the tool itself is the tool's failure (a function clause)
        with self.assertRaises(ToolError):
            self.ctx.call_elixir_tool("add", a=1)

    def test_deadline_is_honoured(self):
        ctx = SessionContext(NODE.address, self.ctx.session_id, create=False, timeout=0.3)
        try:
            with self.assertRaises(BridgeTimeoutError):
                ctx.call_elixir_tool("sleepy")
            self.assertEqual(ctx.call_elixir_tool("add", a=1, b=1), 2)   # the server is fine after
        finally:
            ctx.close()

    def test_big_integers_are_exact_both_ways(self):
        """Integers beyond int64, results and arguments: exact, never a float,
        and never a reply the port drops (the call used to hang until its
        deadline)."""
        from dspex_bridge import ToolError
        self.assertEqual(self.ctx.call_elixir_tool("add", a=2 ** 62, b=2 ** 62), 2 ** 63)
        self.assertEqual(self.ctx.call_elixir_tool("add", a=-(2 ** 63), b=-1), -(2 ** 63) - 1)
        self.assertEqual(self.ctx.call_elixir_tool("add", a=10 ** 40, b=1), 10 ** 40 + 1)
        echoed = self.ctx.call_elixir_tool("echo", x=2 ** 64 + 1, y=[-(10 ** 300)])["args"]
        self.assertEqual(echoed, {"x": 2 ** 64 + 1, "y": [-(10 ** 300)]})
        self.assertIs(type(echoed["x"]), int)
        # over 4300 digits no client could read it: the tool's failure, not a hang
        with self.assertRaises(ToolError) as cm:
            self.ctx.call_elixir_tool("pow10", n=4300)
        self.assertEqual(cm.exception.kind, "bad_result")
        self.assertEqual(self.ctx.call_elixir_tool("pow10", n=4299), 10 ** 4299)

    def test_principal_decides(self):
        admin = self.ctx.as_principal("admin_root")
        try:
            self.assertIn("admin_only", [t.name for t in admin.list_elixir_tools()])
            self.assertEqual(admin.call_elixir_tool("admin_only"), "secret")
        finally:
            admin.close()
        with self.assertRaises(AccessDeniedError):
            self.ctx.call_elixir_tool("admin_only")
        intruder = self.ctx.as_principal("intruder")
        with self.assertRaises(AccessDeniedError):
            intruder.call_elixir_tool("admin_only")

    def test_snakepit_wire_format(self):
        """What snakepit 0.4.3's SessionContext sends and reads back."""
        from google.protobuf import any_pb2
        stub = pb2_grpc.BridgeServiceStub(grpc.insecure_channel(NODE.address))
        tools = stub.GetExposedElixirTools(pb2.GetExposedElixirToolsRequest(session_id=self.ctx.session_id),
                                           timeout=10).tools
        self.assertIn("add", [t.name for t in tools])
        params = {k: any_pb2.Any(type_url="type.googleapis.com/google.protobuf.StringValue",
                                 value=json.dumps(v).encode()) for k, v in {"a": 20, "b": 22}.items()}
        r = stub.ExecuteElixirTool(pb2.ExecuteElixirToolRequest(
            session_id=self.ctx.session_id, tool_name="add", parameters=params, metadata={}), timeout=10)
        self.assertTrue(r.success)
        self.assertEqual(json.loads(r.result.value.decode("utf-8")), 42)
        self.assertGreaterEqual(r.execution_time_ms, 0)
        r = stub.ExecuteElixirTool(pb2.ExecuteElixirToolRequest(
            session_id=self.ctx.session_id, tool_name="fails"), timeout=10)
        self.assertFalse(r.success)
        self.assertEqual(r.error_message, "model unavailable")


class PythonTools(unittest.TestCase):
    """Tools of a Python worker pool: RegisterTools (as a worker of the pool
    does, naming it in worker_id), ExecuteTool and ExecuteStreamingTool run
    on the pool's worker through dspex_workers."""

    def setUp(self):
        self.ctx = SessionContext(NODE.address, sid(), cache_ttl=0, timeout=20)

    def tearDown(self):
        self.ctx.cleanup()
        self.ctx.close()

    def test_register_execute_stream(self):
        def count(n, label="item"):
            """yields n items"""
            yield n
        ids = self.ctx.register_tools(["add", count], worker_id="py_tool_pool/1")
        self.assertEqual(ids, {"add": self.ctx.session_id + "/add", "count": self.ctx.session_id + "/count"})
        self.assertEqual(self.ctx.execute_tool("add", a=20, b=22), 42)
        self.assertEqual(self.ctx.execute_tool("add", a=[1], b=[2, 3]), [1, 2, 3])
        items = list(self.ctx.stream_tool("count", n=3, label="x"))
        self.assertEqual(items, [{"i": 0, "label": "x"}, {"i": 1, "label": "x"}, {"i": 2, "label": "x"}])
        self.assertEqual(list(self.ctx.stream_tool("count", n=0)), [])

    def test_streaming_chunks_arrive_before_the_end(self):
        self.ctx.register_tools(["count"], worker_id="py_tool_pool")
        it = self.ctx.stream_tool("count", n=2)
        self.assertEqual(next(it), {"i": 0, "label": "item"})
        self.assertEqual(next(it), {"i": 1, "label": "item"})
        with self.assertRaises(StopIteration):
            next(it)

    def test_errors(self):
        from dspex_bridge import ToolError, ToolNotFoundError
        self.ctx.register_tools(["boom", "count_then_fail", "add"], worker_id="py_tool_pool")
        with self.assertRaises(ToolError) as cm:
            self.ctx.execute_tool("boom")
        self.assertEqual((str(cm.exception), cm.exception.kind), ("ValueError: tool exploded", "python_error"))
        got = []
        with self.assertRaises(ToolError) as cm:
            for item in self.ctx.stream_tool("count_then_fail", n=2):
                got.append(item)
        self.assertEqual(got, [0, 1])
        self.assertEqual(str(cm.exception), "RuntimeError: stream broke after 2")
        with self.assertRaises(ToolNotFoundError):
            self.ctx.execute_tool("never_registered")
        with self.assertRaises(InvalidValueError):
            self.ctx.register_tools(["add"], worker_id="no_such_pool_anywhere")
        # only this session may call its tools unless allowed
        intruder = self.ctx.as_principal("intruder")
        with self.assertRaises(AccessDeniedError):
            intruder.execute_tool("add", a=1, b=2)
        self.ctx.register_tools([{"name": "add", "allow": ["intr*"]}], worker_id="py_tool_pool")
        self.assertEqual(intruder.execute_tool("add", a=1, b=2), 3)

    def test_deadline_is_honoured(self):
        """A Python tool still running at the caller's deadline: DEADLINE_EXCEEDED,
        the worker is replaced (dspex_workers kills it) and the pool serves again."""
        self.ctx.register_tools(["sleep", "add"], worker_id="py_tool_pool")
        short = SessionContext(NODE.address, self.ctx.session_id, create=False, timeout=0.5)
        try:
            with self.assertRaises(BridgeTimeoutError):
                short.execute_tool("sleep", seconds=30)
            with self.assertRaises(BridgeTimeoutError):
                list(short.stream_tool("sleep", seconds=30))
        finally:
            short.close()
        self.assertEqual(self.ctx.execute_tool("add", a=2, b=2), 4)
