"""Locates the protoc-generated modules (snakepit_bridge_pb2, _pb2_grpc).

`make python-stubs` writes them to ``_build/python`` at the project root (they
are generated, never committed).  They are found, in order: already importable
(on sys.path), in the directory named by ``DSPEX_BRIDGE_STUBS``, or in a
``_build/python`` directory above this package.  The grpc plugin's output
imports ``snakepit_bridge_pb2`` as a top-level module, so that directory is put
on sys.path.
"""

import importlib
import os
import sys

STUB_MODULE = "snakepit_bridge_pb2"


def _candidates():
    env = os.environ.get("DSPEX_BRIDGE_STUBS")
    if env:
        yield env
    here = os.path.dirname(os.path.realpath(__file__))   # through rebar3's priv symlink
    d = here
    for _ in range(6):
        d = os.path.dirname(d)
        yield os.path.join(d, "_build", "python")


def load():
    """(pb2, pb2_grpc) modules; ImportError naming the places searched."""
    try:
        return importlib.import_module(STUB_MODULE), importlib.import_module(STUB_MODULE + "_grpc")
    except ImportError:
        pass
    tried = []
    for d in _candidates():
        tried.append(d)
        if os.path.isfile(os.path.join(d, STUB_MODULE + ".py")):
            if d not in sys.path:
                sys.path.insert(0, d)
            return importlib.import_module(STUB_MODULE), importlib.import_module(STUB_MODULE + "_grpc")
    raise ImportError("generated gRPC stubs not found (run `make python-stubs`); looked in: "
                      + ", ".join(tried))


pb2, pb2_grpc = load()
