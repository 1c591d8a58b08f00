"""A node-wide capacity limit reached through gRPC is a LimitExceededError
(RESOURCE_EXHAUSTED, dspex-error limit_exceeded), never a RateLimitedError.
(The per-request limits and the rate limit are in test_bridge_integration.)"""

import unittest
import uuid

import _paths  # noqa: F401
import grpc

from bridge_node import BridgeNode
from dspex_bridge import LimitExceededError, RateLimitedError, SessionContext


class CapacityLimit(unittest.TestCase):
    """Its own node: max_variables is node-wide."""

    def test_too_many_variables_is_a_limit_not_a_rate_limit(self):
        with BridgeNode(extra_eval="ok = dspex_store:set_limits(#{max_variables => 2}),") as node:
            ctx = SessionContext(node.address, "cap_" + uuid.uuid4().hex[:8], cache_ttl=0, timeout=10)
            ctx.register_variable("a", "integer", 1)
            ctx.register_variable("b", "integer", 2)
            with self.assertRaises(LimitExceededError) as cm:
                ctx.register_variable("c", "integer", 3)
            e = cm.exception
            self.assertEqual((e.code, e.limit, e.reason), (grpc.StatusCode.RESOURCE_EXHAUSTED, "variables",
                                                           "limit_exceeded"))
            self.assertEqual(str(e), "limit exceeded: variables (max_variables = 2)")
            self.assertNotIsInstance(e, RateLimitedError)
            ctx.close()
