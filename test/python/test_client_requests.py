"""What the client puts on the wire, checked against a recording grpcio server.

These pin the client's side of the contract (fields, metadata, binary
payloads, status mapping over a real transport) independently of the node.
"""

import json
import struct
import unittest
from concurrent import futures

import _paths  # noqa: F401
import grpc

from bridge_node import free_port
from dspex_bridge import (SessionContext, VersionConflictError, AccessDeniedError,
                          BridgeUnavailableError, codec)
from dspex_bridge._stubs import pb2, pb2_grpc


class Recorder(pb2_grpc.BridgeServiceServicer):
    def __init__(self):
        self.requests = []
        self.metadata = []
        self.abort_with = None
        self.version = 0

    def _rec(self, req, context):
        self.requests.append(req)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.abort_with:
            context.abort(*self.abort_with)

    def InitializeSession(self, req, context):
        self._rec(req, context)
        return pb2.InitializeSessionResponse(success=True)

    def RegisterVariable(self, req, context):
        self._rec(req, context)
        return pb2.RegisterVariableResponse(success=True, variable_id="var_" + req.name)

    def GetVariable(self, req, context):
        self._rec(req, context)
        any_v, binary = codec.encode("integer", 5)
        return pb2.GetVariableResponse(variable=pb2.Variable(
            id="var_" + req.variable_identifier, name=req.variable_identifier, type="integer",
            value=any_v, version=self.version))

    def SetVariable(self, req, context):
        self._rec(req, context)
        self.version += 1
        return pb2.SetVariableResponse(success=True, new_version=self.version)

    def SetVariables(self, req, context):
        self._rec(req, context)
        return pb2.BatchSetVariablesResponse(success=True,
                                             new_versions={k: 1 for k in req.updates})


class ClientRequests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rec = Recorder()
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_BridgeServiceServicer_to_server(cls.rec, cls.server)
        cls.port = free_port()
        cls.server.add_insecure_port("127.0.0.1:%d" % cls.port)
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(0)

    def setUp(self):
        self.rec.requests.clear()
        self.rec.metadata.clear()
        self.rec.abort_with = None
        self.ctx = SessionContext("127.0.0.1:%d" % self.port, "s", cache_ttl=0)

    def tearDown(self):
        self.ctx.close()

    def last(self):
        return self.rec.requests[-1]

    def test_expected_version_zero_is_an_explicit_check(self):
        self.ctx.update_variable("x", 1, var_type="integer")
        self.assertEqual((self.last().expected_version, self.last().expect_version_zero), (0, False))
        self.ctx.update_variable("x", 1, var_type="integer", expected_version=0)
        self.assertEqual((self.last().expected_version, self.last().expect_version_zero), (0, True))
        self.ctx.update_variable("x", 1, var_type="integer", expected_version=3)
        self.assertEqual((self.last().expected_version, self.last().expect_version_zero), (3, False))

    def test_update_learns_the_type_with_one_get(self):
        self.ctx.update_variable("fresh", 9)
        kinds = [type(r).__name__ for r in self.rec.requests]
        self.assertEqual(kinds[-2:], ["GetVariableRequest", "SetVariableRequest"])
        self.assertEqual(self.last().value.type_url, codec.type_url("integer"))
        self.ctx.update_variable("fresh", 10)          # type now known: no second get
        self.assertEqual([type(r).__name__ for r in self.rec.requests[-1:]],
                         ["SetVariableRequest"])

    def test_big_values_travel_as_little_endian_binary(self):
        emb = [float(i) / 3 for i in range(2000)]
        self.ctx.register_variable("e", "embedding", emb)
        r = self.last()
        self.assertEqual(r.initial_binary_value, struct.pack("<2000d", *emb))
        self.assertEqual(json.loads(r.initial_value.value), {"shape": [2000], "dtype": "float64"})
        t = {"shape": [40, 50], "data": emb}
        self.ctx.update_variables({"t": t, "i": 3}, types={"t": "tensor", "i": "integer"})
        r = self.last()
        self.assertEqual(set(r.binary_updates), {"t"})
        self.assertEqual(len(r.binary_updates["t"]), 2000 * 8)
        self.assertEqual(json.loads(r.updates["i"].value), 3)
        small = [1.0, 2.0]
        self.ctx.register_variable("s", "embedding", small)
        self.assertEqual(self.last().initial_binary_value, b"")
        self.assertEqual(json.loads(self.last().initial_value.value), small)

    def test_principal_and_context_metadata(self):
        other = self.ctx.as_principal("other_session", {"role": "tuner"})
        other.update_variable("x", 1, var_type="integer")
        md = self.rec.metadata[-1]
        self.assertEqual(md["dspex-principal"], "other_session")
        self.assertEqual(json.loads(md["dspex-context"]), {"role": "tuner"})
        self.ctx.update_variable("x", 1, var_type="integer")
        self.assertNotIn("dspex-principal", self.rec.metadata[-1])

    def test_statuses_become_exceptions_over_the_wire(self):
        self.rec.abort_with = (grpc.StatusCode.ABORTED, "version mismatch: current version 4")
        with self.assertRaises(VersionConflictError) as cm:
            self.ctx.update_variable("x", 1, var_type="integer", expected_version=2)
        self.assertEqual(cm.exception.current_version, 4)
        self.rec.abort_with = (grpc.StatusCode.PERMISSION_DENIED, "access denied")
        with self.assertRaises(AccessDeniedError):
            self.ctx.get_variable("x")

    def test_unreachable_server_is_unavailable(self):
        ctx = SessionContext("127.0.0.1:%d" % free_port(), "s", create=False, timeout=5)
        with self.assertRaises(BridgeUnavailableError):
            ctx.get_variable("x")
        ctx.close()


if __name__ == "__main__":
    unittest.main()
