"""Exceptions raised by the client, one per failure the bridge reports.

The server maps each store error to a gRPC status (see the README's gRPC
section); ``from_rpc_error`` maps it back.  Every exception keeps the server's
message (``str(e)`` and ``e.message``), the gRPC status code (``e.code``) and
the server's reason tag (``e.reason``, from the ``dspex-error`` trailer, e.g.
``"limit_exceeded"``; None from servers that send none, whose errors are
then told apart by their messages).
"""

import re

import grpc


class BridgeError(Exception):
    """Base class of every error reported by the bridge."""

    def __init__(self, message, code=None, reason=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason

    def __str__(self):
        return self.message


class VariableNotFoundError(BridgeError, KeyError):
    """NOT_FOUND: no such variable (also a KeyError, for dict-style access)."""

    def __str__(self):  # KeyError would quote the message
        return self.message


class VersionNotFoundError(VariableNotFoundError):
    """NOT_FOUND: rollback to a version no longer (or never) in the history."""


class SessionNotFoundError(BridgeError):
    """NOT_FOUND: the session does not exist or has expired."""


class ToolNotFoundError(BridgeError, LookupError):
    """NOT_FOUND: the BEAM exposes no tool of that name (to this principal)."""


class ToolError(BridgeError):
    """A tool ran and failed: it returned an error (``kind`` "tool_error"),
    raised ("tool_crashed") or returned something with no JSON form
    ("bad_result").  Carries the tool's message; not a transport error."""

    def __init__(self, message, code=None, reason=None, kind=None):
        super().__init__(message, code, reason)
        self.kind = kind


class VariableExistsError(BridgeError):
    """ALREADY_EXISTS: register of a name that is taken."""


class InvalidValueError(BridgeError, ValueError):
    """INVALID_ARGUMENT: a value failing its type/constraints, or bad arguments."""


class VersionConflictError(BridgeError):
    """ABORTED: expected_version differs; ``current_version`` is the server's."""

    def __init__(self, message, code=None, current_version=None, reason=None):
        super().__init__(message, code, reason)
        self.current_version = current_version


class PreconditionFailedError(BridgeError):
    """FAILED_PRECONDITION: the operation is refused in the variable's current state."""


class LockedError(PreconditionFailedError):
    """FAILED_PRECONDITION: the variable is locked by (another) optimizer, or the
    lock token presented is stale.  Other refusals of the optimizer protocol
    (not the holder, no optimization running) are plain PreconditionFailedError."""


class DependencyCycleError(PreconditionFailedError):
    """FAILED_PRECONDITION: the dependency would close a cycle."""


class AccessDeniedError(BridgeError, PermissionError):
    """PERMISSION_DENIED: no access rule allows this session."""


class RateLimitedError(BridgeError):
    """RESOURCE_EXHAUSTED: the session's rate limit was hit; wait and retry.
    (Also any other RESOURCE_EXHAUSTED that is not a limit, e.g. a watch
    ended because its reader fell too far behind: ``reason`` says which.)"""


class LimitExceededError(BridgeError):
    """A configured limit of the bridge, which retrying does not cure.
    ``limit`` names it: ``value_size``, ``name_length`` or ``history_limit``
    (the request itself is over the limit: INVALID_ARGUMENT), ``sessions`` or
    ``variables`` (a capacity is used up: RESOURCE_EXHAUSTED), or
    ``message_size`` (a request or reply over the gRPC maximum message size:
    RESOURCE_EXHAUSTED)."""

    def __init__(self, message, code=None, limit=None, reason="limit_exceeded"):
        super().__init__(message, code, reason)
        self.limit = limit


class BridgeUnavailableError(BridgeError, ConnectionError):
    """UNAVAILABLE: the bridge is down, restarting or overloaded; retry later."""


class BridgeTimeoutError(BridgeError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class CancelledError(BridgeError):
    """CANCELLED: the call (e.g. a watch) was cancelled."""


class StudyNotFoundError(BridgeError, LookupError):
    """NOT_FOUND: no such optimization study (stopped, ended by its idle
    timeout, or started by another session or principal), or no such trial
    of it (``reason`` "unknown_trial")."""


class BudgetExhaustedError(BridgeError):
    """OUT_OF_RANGE: the study has asked its whole budget of trials."""


class UnsupportedError(BridgeError):
    """UNIMPLEMENTED: the server does not offer this RPC."""


class ClosedError(BridgeError):
    """A call on a SessionContext whose channel was closed (``close()``, or
    the context it was made from by ``as_principal`` closed it).  Not a
    server answer: ``code`` is None.  Make a new context."""


_CURRENT_VERSION = re.compile(r"current(?:[ _]version)?\D{0,20}?(-?\d+)", re.I)


def parse_current_version(message):
    """The current version stated in a version-conflict message, or None."""
    m = _CURRENT_VERSION.search(message or "")
    if m:
        return int(m.group(1))
    nums = re.findall(r"-?\d+", message or "")
    return int(nums[-1]) if len(nums) == 1 else None


_LIMIT = re.compile(r"^limit exceeded: (\w+)")
# gRPC core's own refusals of a message over the maximum size (either side)
_MESSAGE_SIZE = re.compile(r"message larger than max|exceeds the maximum message size", re.I)

_LOCKED = ("locked", "stale_lock", "lock_held_by")


def _not_found(message, code, reason):
    low = (message or "").lower()
    if reason == "session_not_found" or (reason is None and low.startswith("session not found")):
        return SessionNotFoundError(message, code, reason)
    if reason == "tool_not_found" or (reason is None and low.startswith("tool not found")):
        return ToolNotFoundError(message, code, reason)
    if reason in ("run_not_found", "unknown_trial") or (reason is None and (
            low.startswith("optimization study not found") or low.startswith("trial not found"))):
        return StudyNotFoundError(message, code, reason)
    if reason == "version_not_found" or (reason is None and low.startswith("version ") and "history" in low):
        return VersionNotFoundError(message, code, reason)
    return VariableNotFoundError(message, code, reason)


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidValueError,
    grpc.StatusCode.ALREADY_EXISTS: VariableExistsError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: BridgeUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: BridgeTimeoutError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.OUT_OF_RANGE: BudgetExhaustedError,
}


def from_status(code, message, trailers=None):
    """The exception for a gRPC status code, its details message and its
    trailing metadata (a dict; ``dspex-error`` is the server's reason tag)."""
    trailers = trailers or {}
    reason = trailers.get("dspex-error")
    low = (message or "").lower()
    limit = _LIMIT.match(message or "")
    if reason == "limit_exceeded" or (reason is None and limit and code in (
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        return LimitExceededError(message, code, trailers.get("dspex-limit") or (limit and limit.group(1)))
    if reason is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED and _MESSAGE_SIZE.search(message or ""):
        return LimitExceededError(message, code, "message_size")
    if code == grpc.StatusCode.NOT_FOUND:
        return _not_found(message, code, reason)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if reason == "would_create_cycle" or (reason is None and "cycle" in low):
            return DependencyCycleError(message, code, reason)
        if reason in _LOCKED or (reason is None and ("is locked" in low or "stale" in low)):
            return LockedError(message, code, reason)
        return PreconditionFailedError(message, code, reason)
    if code == grpc.StatusCode.ABORTED:
        current = trailers.get("dspex-current-version")
        return VersionConflictError(message, code,
                                    int(current) if current is not None and current.lstrip("-").isdigit()
                                    else parse_current_version(message), reason)
    return _BY_CODE.get(code, BridgeError)(message, code, reason=reason)


def from_rpc_error(err):
    """The exception for a grpc.RpcError raised by a stub call."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    trailers = {}
    try:
        for k, v in (err.trailing_metadata() or ()):
            if isinstance(v, bytes):
                v = v.decode("ascii", "replace")
            trailers[k] = v
    except Exception:  # an RpcError without trailers (e.g. raised by a test double)
        trailers = {}
    return from_status(code, details or str(code), trailers)
