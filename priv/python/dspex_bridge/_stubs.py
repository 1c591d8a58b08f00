"""The protoc-generated modules of priv/proto/snakepit_bridge.proto.

`make python-stubs` (run by `make`, `make run` and `make test`) writes them into
``dspex_bridge/_proto`` (generated, never committed) with the grpc module's
import made package-relative, so an installed package needs no path set-up.
"""

try:
    from ._proto import snakepit_bridge_pb2 as pb2
    from ._proto import snakepit_bridge_pb2_grpc as pb2_grpc
except ImportError as e:  # pragma: no cover - a source tree without `make python-stubs`
    raise ImportError("dspex_bridge: generated gRPC stubs are missing (run `make python-stubs` "
                      "in the dspex_bridge checkout, then reinstall the package): %s" % e) from None

__all__ = ["pb2", "pb2_grpc"]
