"""Operator CLI: ``python3 -m dspex_bridge [--address A] COMMAND ...``.

Commands:
  ping                         round trip to the node
  sessions [--pattern P] [--limit N]
                               sessions (id, variables, created), sorted by id
  vars SESSION                 the session's variables (name, type, version, value)
  history SESSION NAME [--limit N]
                               archived versions of a variable, newest first
  watch SESSION NAME [NAME...] [--initial] [--count N] [--seconds S]
                               one line per committed change, until Ctrl-C,
                               N events or S seconds

``--json`` prints JSON (one object per line for watch).  Exit codes: 0 done,
1 another error, 2 usage, 3 unknown session/variable, 4 server unreachable.
"""

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import List, Optional

import grpc

from ._stubs import pb2, pb2_grpc
from .errors import (BridgeError, BridgeTimeoutError, BridgeUnavailableError, SessionNotFoundError,
                     VariableNotFoundError, from_rpc_error)
from .session_context import SessionContext

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 1, 2, 3, 4


def _count(text: str) -> int:
    """An argparse type: an int >= 0 (a bad one is a usage error, exit 2)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0, got %d" % n)
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError("must be a finite number >= 0, got %s" % text)
    return x


def _wire(v):
    """v with non-finite floats as the wire contract's strings: standard JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _wire(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_wire(x) for x in v]
    return v


def _json(obj) -> str:
    # allow_nan=False: NaN/Infinity literals are not JSON; _wire already replaced them
    return json.dumps(_wire(obj), default=str, allow_nan=False)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m dspex_bridge",
                                description="Inspect a running dspex_bridge node over gRPC.")
    p.add_argument("--address", default=os.environ.get("DSPEX_BRIDGE_ADDRESS", "127.0.0.1:50051"),
                   help="host:port of the node (default $DSPEX_BRIDGE_ADDRESS or 127.0.0.1:50051)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds per call (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="round trip to the node")
    s = sub.add_parser("sessions", help="list sessions")
    s.add_argument("--pattern", default="", help="glob over session ids")
    s.add_argument("--limit", type=_count, default=0, help="at most N (0: all)")
    v = sub.add_parser("vars", help="a session's variables")
    v.add_argument("session")
    h = sub.add_parser("history", help="a variable's archived versions")
    h.add_argument("session")
    h.add_argument("name")
    h.add_argument("--limit", type=_count, default=0)
    w = sub.add_parser("watch", help="stream changes of variables")
    w.add_argument("session")
    w.add_argument("names", nargs="+")
    w.add_argument("--initial", action="store_true", help="first print the current values")
    w.add_argument("--count", type=_count, default=0, help="stop after N events (0: never)")
    w.add_argument("--seconds", type=_seconds, default=0, help="stop after S seconds (0: never)")
    return p


def _ts(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds")


def _value(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _table(rows: List[List[str]], out) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n")


def _ctx(args, session: str) -> SessionContext:
    return SessionContext(args.address, session, create=False, cache_ttl=0, timeout=args.timeout)


def _ping(args, out) -> int:
    ctx = _ctx(args, "cli")
    try:
        t0 = time.monotonic()
        reply = ctx.ping("cli")
        ms = (time.monotonic() - t0) * 1000
    finally:
        ctx.close()
    if args.json:
        out.write(_json({"address": args.address, "reply": reply, "ms": round(ms, 3)}) + "\n")
    else:
        out.write("%s: %s in %.1f ms\n" % (args.address, reply, ms))
    return 0


def _sessions(args, out) -> int:
    channel = grpc.insecure_channel(args.address)
    try:
        r = pb2_grpc.BridgeServiceStub(channel).ListSessions(
            pb2.ListSessionsRequest(pattern=args.pattern, limit=args.limit), timeout=args.timeout)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        channel.close()
    rows = [{"session_id": s.session_id, "variables": s.variable_count,
             "created_at": _ts(s.created_at.seconds + s.created_at.nanos / 1e9 if s.HasField("created_at") else None)}
            for s in r.sessions]
    if args.json:
        out.write(_json({"total": r.total, "sessions": rows}) + "\n")
    else:
        _table([["SESSION", "VARIABLES", "CREATED"]] +
               [[x["session_id"], str(x["variables"]), x["created_at"]] for x in rows], out)
        if r.total > len(rows):
            out.write("(%d of %d sessions)\n" % (len(rows), r.total))
    return 0


def _vars(args, out) -> int:
    ctx = _ctx(args, args.session)
    try:
        ctx.session_info()  # an unknown session is an error, not an empty list
        variables = sorted(ctx.list_variables(), key=lambda v: v.name)
    finally:
        ctx.close()
    if args.json:
        out.write(_json([{"name": v.name, "type": v.type, "version": v.version, "value": v.value,
                          "updated_at": v.updated_at} for v in variables]) + "\n")
    else:
        _table([["NAME", "TYPE", "VERSION", "UPDATED", "VALUE"]] +
               [[v.name, v.type, str(v.version), _ts(v.updated_at), _value(v.value)] for v in variables], out)
    return 0


def _history(args, out) -> int:
    ctx = _ctx(args, args.session)
    try:
        entries = ctx.get_variable_history(args.name, limit=args.limit)
    finally:
        ctx.close()
    if args.json:
        out.write(_json([{"version": e.version, "timestamp": e.timestamp, "changed_by": e.changed_by,
                          "value": e.value} for e in entries]) + "\n")
    else:
        _table([["VERSION", "TIME", "CHANGED_BY", "VALUE"]] +
               [[str(e.version), _ts(e.timestamp), e.changed_by or "-", _value(e.value)] for e in entries], out)
    return 0


def _watch(args, out) -> int:
    ctx = _ctx(args, args.session)
    seen = 0
    try:
        w = ctx.watch(args.names, include_initial=args.initial,
                      timeout=args.seconds if args.seconds > 0 else None)
        try:
            for u in w:
                if args.json:
                    out.write(_json({"name": u.name, "update_type": u.update_type, "version": u.version,
                                     "value": u.value, "source": u.source, "timestamp": u.timestamp}) + "\n")
                else:
                    out.write("%s %s v%d %s %s\n" % (_ts(u.timestamp), u.name, u.version, u.update_type,
                                                     _value(u.value)))
                out.flush()
                seen += 1
                if args.count and seen >= args.count:
                    break
        except BridgeTimeoutError:
            if args.seconds <= 0:
                raise
        finally:
            w.cancel()
    finally:
        ctx.close()
    return 0


_COMMANDS = {"ping": _ping, "sessions": _sessions, "vars": _vars, "history": _history, "watch": _watch}


def main(argv: Optional[List[str]] = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args, out)
    except KeyboardInterrupt:
        return 0
    except (SessionNotFoundError, VariableNotFoundError) as e:
        err.write("error: %s\n" % e)
        return EXIT_NOT_FOUND
    except BridgeUnavailableError as e:
        err.write("error: cannot reach %s: %s\n" % (args.address, e))
        return EXIT_UNREACHABLE
    except BridgeTimeoutError as e:
        err.write("error: %s did not answer in time: %s\n" % (args.address, e))
        return EXIT_UNREACHABLE
    except (BridgeError, ValueError) as e:
        err.write("error: %s\n" % e)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
