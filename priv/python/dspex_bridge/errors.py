"""Exceptions raised by the client, one per failure the bridge reports.

The server maps each store error to a gRPC status (see the README's gRPC
section); ``from_rpc_error`` maps it back.  Every exception keeps the server's
message (``str(e)`` and ``e.message``) and the gRPC status code (``e.code``).
"""

import re

import grpc


class BridgeError(Exception):
    """Base class of every error reported by the bridge."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        self.code = code

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

    def __init__(self, message, code=None, kind=None):
        super().__init__(message, code)
        self.kind = kind


class VariableExistsError(BridgeError):
    """ALREADY_EXISTS: register of a name that is taken."""


class InvalidValueError(BridgeError, ValueError):
    """INVALID_ARGUMENT: a value failing its type/constraints, or bad arguments."""


class VersionConflictError(BridgeError):
    """ABORTED: expected_version differs; ``current_version`` is the server's."""

    def __init__(self, message, code=None, current_version=None):
        super().__init__(message, code)
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
    """RESOURCE_EXHAUSTED: the session's rate limit (or a size limit) was hit."""


class BridgeUnavailableError(BridgeError, ConnectionError):
    """UNAVAILABLE: the bridge is down, restarting or overloaded; retry later."""


class BridgeTimeoutError(BridgeError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class CancelledError(BridgeError):
    """CANCELLED: the call (e.g. a watch) was cancelled."""


class UnsupportedError(BridgeError):
    """UNIMPLEMENTED: the server does not offer this RPC."""


_CURRENT_VERSION = re.compile(r"current(?:[ _]version)?\D{0,20}?(-?\d+)", re.I)


def parse_current_version(message):
    """The current version stated in a version-conflict message, or None."""
    m = _CURRENT_VERSION.search(message or "")
    if m:
        return int(m.group(1))
    nums = re.findall(r"-?\d+", message or "")
    return int(nums[-1]) if len(nums) == 1 else None


def _not_found(message, code):
    low = (message or "").lower()
    if low.startswith("session not found"):
        return SessionNotFoundError(message, code)
    if low.startswith("tool not found"):
        return ToolNotFoundError(message, code)
    if low.startswith("version ") and "history" in low:
        return VersionNotFoundError(message, code)
    return VariableNotFoundError(message, code)


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidValueError,
    grpc.StatusCode.ALREADY_EXISTS: VariableExistsError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAVAILABLE: BridgeUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: BridgeTimeoutError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
}


def from_status(code, message):
    """The exception for a gRPC status code and its details message."""
    if code == grpc.StatusCode.NOT_FOUND:
        return _not_found(message, code)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        low = (message or "").lower()
        if "cycle" in low:
            return DependencyCycleError(message, code)
        if "is locked" in low or "stale" in low:
            return LockedError(message, code)
        return PreconditionFailedError(message, code)
    if code == grpc.StatusCode.ABORTED:
        return VersionConflictError(message, code, parse_current_version(message))
    return _BY_CODE.get(code, BridgeError)(message, code)


def from_rpc_error(err):
    """The exception for a grpc.RpcError raised by a stub call."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    return from_status(code, details or str(code))
