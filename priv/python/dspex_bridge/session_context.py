"""SessionContext: the Python face of one dspex_bridge session over gRPC.

    ctx = SessionContext("127.0.0.1:50051", "my_session")
    ctx.register_variable("temperature", "float", 0.7, constraints={"min": 0, "max": 1})
    ctx["temperature"]            # 0.7  (dict-style)
    ctx.v.temperature = 0.9       # attribute-style (ctx.v is the variable namespace)
    info = ctx.get_variable_info("temperature")
    ctx.update_variable("temperature", 0.3, expected_version=info.version)
    for change in ctx.watch(["temperature"]):
        ...

Every failure is an exception from dspex_bridge.errors carrying the server's
message.  Reads may be served from a client cache (TTL ``cache_ttl`` seconds,
0 disables it); this client's own writes, and watch events seen by any
``watch`` of this context, invalidate it at once.
"""

import inspect
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import grpc
from google.protobuf import any_pb2, timestamp_pb2

from . import codec
from ._stubs import pb2, pb2_grpc
from .cache import VariableCache
from .errors import (BridgeError, ClosedError, InvalidValueError, ToolError, ToolNotFoundError,
                     VariableExistsError, VariableNotFoundError, from_rpc_error)

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Matches the server's default maximum message size (64 MiB).
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


def _ts_seconds(ts):
    """A protobuf Timestamp as float seconds since the epoch (None if unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.seconds + ts.nanos / 1e9


@dataclass
class Variable:
    """A variable as read from the bridge."""
    id: str
    name: str
    type: str
    value: Any
    version: int
    constraints: Dict[str, Any] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    source: str = "ELIXIR"
    updated_at: Optional[float] = None
    optimizing: bool = False
    optimizer_id: str = ""
    access_rules: Any = None


@dataclass
class VariableUpdate:
    """One event of a watch stream."""
    name: str
    id: str
    update_type: str          # "initial_value", "value_change" or "deleted"
    value: Any
    version: int
    source: str
    metadata: Dict[str, str]
    timestamp: Optional[float]
    variable: Optional[Variable]


@dataclass
class ToolSpec:
    """A tool the BEAM application exposes (dspex_tools:expose/3)."""
    name: str
    description: str
    parameters: List[Dict[str, Any]]   # name, type, description, required
    metadata: Dict[str, str]


@dataclass
class HistoryEntry:
    version: int
    value: Any
    timestamp: Optional[float]
    changed_by: str
    metadata: Dict[str, str]


@dataclass
class OptimizationStatus:
    optimizing: bool
    optimizer_id: str
    started_at: Optional[float]
    fencing_token: int = 0
    priority: int = 0
    iterations: int = 0
    waiters: int = 0
    best_value: Any = None
    best_metrics: Dict[str, Any] = field(default_factory=dict)
    best_iteration: int = 0


@dataclass
class StopResult:
    final_value: Any
    applied: bool


@dataclass
class AccessCheck:
    allowed: bool
    reason: str

    def __bool__(self):
        return self.allowed


class BatchUpdateError(BridgeError):
    """A batch update where some (atomic: any, so none committed) updates failed.

    ``errors`` maps each failing name to the server's message; ``new_versions``
    holds the versions of the updates that did commit (non-atomic batches).
    """

    def __init__(self, message, errors, new_versions, atomic):
        super().__init__(message)
        self.errors = errors
        self.new_versions = new_versions
        self.atomic = atomic


def _channel_for(target, max_message):
    opts = [("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message)]
    return grpc.insecure_channel(target, options=opts)


class SessionContext:
    """Variables of one session, reached over gRPC.

    target: a ``grpc.Channel``, or an address ("host:port") for which the
    context opens (and ``close()`` closes) its own channel.
    create: call InitializeSession first (idempotent on the server); by
    default only when the context acts as the session itself (a context with
    another ``principal`` may not create or initialise the session).
    cache_ttl: seconds a read may be served from the client cache (0: never).
    timeout: default deadline of each call, in seconds (None: no deadline).
    principal / context: act as another session (request metadata
    ``dspex-principal`` / ``dspex-context``) on this session's variables; the
    server checks its access rules. Calls on the session as a whole
    (registering, cleanup, dependencies, the event log, the dashboard) are
    the session's own: another principal gets AccessDeniedError.
    strict: ``ctx[name] = value`` never registers a missing variable.
    binary_threshold: embeddings/tensors whose float64 size exceeds it travel
    in binary_value (None: always JSON).
    """

    def __init__(self, target=DEFAULT_ADDRESS, session_id="default", *, create=None,
                 metadata=None, cache_ttl=5.0, timeout=30.0, principal=None,
                 context=None, strict=False, binary_threshold=codec.DEFAULT_BINARY_THRESHOLD,
                 max_message_bytes=DEFAULT_MAX_MESSAGE, cleanup_on_exit=False):
        if isinstance(target, str):
            self._channel = _channel_for(target, max_message_bytes)
            self._owns_channel = True
        else:
            self._channel = target
            self._owns_channel = False
        self.session_id = session_id
        self.stub = pb2_grpc.BridgeServiceStub(self._channel)
        self.timeout = timeout
        self.strict = strict
        self.binary_threshold = binary_threshold
        self.cleanup_on_exit = cleanup_on_exit
        self.cache = VariableCache(cache_ttl)
        self._types = {}
        self._types_lock = threading.Lock()
        self._metadata = []
        if principal is not None:
            self._metadata.append(("dspex-principal", principal))
        if context is not None:
            self._metadata.append(("dspex-context", json.dumps(context)))
        self._principal = principal
        self._context = context
        if create is None:
            create = principal is None or principal == session_id
        if create:
            try:
                self.initialize(metadata)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------ plumbing

    def _call(self, rpc, request, timeout=None):
        return self._invoke(getattr(self.stub, rpc), request,
                            timeout=self.timeout if timeout is None else timeout)

    def _invoke(self, method, request, timeout):
        """One call of a stub method, its failures as BridgeErrors."""
        try:
            return method(request, timeout=timeout, metadata=self._metadata or None)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        except ValueError as e:
            # grpc's own "Cannot invoke RPC on closed channel!": not ours to leak raw
            if "closed" in str(e).lower():
                raise ClosedError("session context is closed: %s" % e) from None
            raise

    @staticmethod
    def _check(resp, what):
        """Raise for the reference protocol's success=false answers."""
        if not resp.success:
            raise BridgeError("%s failed: %s" % (what, resp.error_message or "unknown error"))
        return resp

    def _remember_type(self, name, var_id, var_type):
        with self._types_lock:
            if name:
                self._types[name] = var_type
            if var_id:
                self._types[var_id] = var_type

    def _type_of(self, key):
        with self._types_lock:
            t = self._types.get(key)
        if t is None:
            t = self.get_variable_info(key, bypass_cache=True).type
        return t

    def _remembered_type(self, key):
        with self._types_lock:
            return self._types.get(key)

    def _forget_type(self, *keys):
        with self._types_lock:
            for k in keys:
                if k:
                    self._types.pop(k, None)

    def _fresh_type(self, key):
        """The variable's type as the server has it now (the remembered one
        may be stale: another client may have deleted and re-registered it)."""
        self._forget_type(key)
        return self.get_variable_info(key, bypass_cache=True).type

    def _encode(self, var_type, value):
        try:
            return codec.encode(var_type, value, self.binary_threshold)
        except codec.CodecError as e:
            raise InvalidValueError(str(e)) from None

    def _variable(self, v):
        """Variable message -> Variable, remembering its type."""
        self._remember_type(v.name, v.id, v.type)
        return Variable(
            id=v.id, name=v.name, type=v.type,
            value=codec.decode(v.value, v.binary_value), version=v.version,
            constraints=codec.decode_json(v.constraints_json, {}),
            metadata=dict(v.metadata),
            source=pb2.Variable.Source.Name(v.source),
            updated_at=_ts_seconds(v.last_updated_at),
            optimizing=v.optimization_status.optimizing,
            optimizer_id=v.optimization_status.optimizer_id,
            access_rules=codec.decode_json(v.access_control_json, None))

    # ------------------------------------------------------------ lifecycle

    def as_principal(self, principal, context=None):
        """A context on the same channel and session acting as ``principal``."""
        return SessionContext(self._channel, self.session_id, create=False,
                              cache_ttl=self.cache.ttl, timeout=self.timeout,
                              principal=principal, context=context, strict=self.strict,
                              binary_threshold=self.binary_threshold)

    def initialize(self, metadata=None):
        """InitializeSession; returns the session's initial variables by name."""
        resp = self._call("InitializeSession", pb2.InitializeSessionRequest(
            session_id=self.session_id, metadata=metadata or {}))
        self._check(resp, "InitializeSession")
        return {name: self._variable(v) for name, v in resp.initial_variables.items()}

    def ping(self, message=""):
        """Ping; returns the echoed message."""
        return self._call("Ping", pb2.PingRequest(message=message)).message

    def session_info(self):
        """GetSession as a dict (session_id, metadata, created_at, variable_count)."""
        r = self._call("GetSession", pb2.GetSessionRequest(session_id=self.session_id))
        return {"session_id": r.session_id, "metadata": dict(r.metadata),
                "created_at": _ts_seconds(r.created_at),
                "variable_count": r.variable_count, "tool_count": r.tool_count}

    def heartbeat(self):
        """Heartbeat (refreshes the session's TTL); True if the session is valid."""
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        r = self._call("Heartbeat", pb2.HeartbeatRequest(session_id=self.session_id,
                                                         client_time=now))
        return r.session_valid

    def cleanup(self, force=False):
        """CleanupSession: deletes the session and its variables; returns how many."""
        r = self._call("CleanupSession", pb2.CleanupSessionRequest(
            session_id=self.session_id, force=force))
        self._check(r, "CleanupSession")
        self.cache.clear()
        with self._types_lock:
            self._types.clear()
        return r.resources_cleaned

    def close(self):
        """Close the channel if this context opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if self.cleanup_on_exit:
                self.cleanup()
        finally:
            self.close()
        return False

    # ------------------------------------------------------------ tools

    # The type_url snakepit clients put on tool arguments: JSON text.
    _TOOL_ARG_URL = "type.googleapis.com/google.protobuf.StringValue"

    def list_elixir_tools(self) -> List[ToolSpec]:
        """GetExposedElixirTools: the tools this principal may call, by name."""
        r = self._call("GetExposedElixirTools",
                       pb2.GetExposedElixirToolsRequest(session_id=self.session_id))
        return [ToolSpec(name=t.name, description=t.description,
                         parameters=[{"name": p.name, "type": p.type, "description": p.description,
                                      "required": p.required} for p in t.parameters],
                         metadata=dict(t.metadata)) for t in r.tools]

    def call_elixir_tool(self, tool_name: str, **kwargs) -> Any:
        """ExecuteElixirTool: runs a tool of the BEAM application with keyword
        arguments (JSON-encodable values) and returns its JSON result.

        Raises ToolNotFoundError (no such tool), AccessDeniedError (not for
        this principal), BridgeTimeoutError (the context's deadline passed; the
        tool is killed), InvalidValueError (arguments), ToolError (the tool
        itself failed, raised or returned no JSON)."""
        r = self._call("ExecuteElixirTool", pb2.ExecuteElixirToolRequest(
            session_id=self.session_id, tool_name=tool_name, parameters=self._tool_params(kwargs)))
        if not r.success:
            raise ToolError(r.error_message or "tool failed", kind=r.metadata.get("error_kind"))
        if not r.HasField("result") or not r.result.value:
            return None
        return json.loads(r.result.value.decode("utf-8"))

    # Python tools: functions of a worker pool's module (dspex_workers), run
    # by the BEAM on a free worker of that pool.

    def register_tools(self, tools, worker_id: Optional[str] = None) -> Dict[str, str]:
        """RegisterTools: offers functions of this worker's pool as tools of
        this session.  ``tools``: names, callables (name, docstring and
        parameters are read off them), or dicts with ``name``,
        ``description``, ``parameters`` (dicts: name, type, description,
        required), ``supports_streaming`` and ``allow`` (principal globs that
        may call it besides this session).  ``worker_id`` is the pool's name
        (default: $DSPEX_WORKER_POOL, set in every worker).  Returns the tool
        ids by name."""
        worker_id = worker_id or os.environ.get("DSPEX_WORKER_POOL", "")
        if not worker_id:
            raise InvalidValueError("register_tools needs the pool's name (worker_id or $DSPEX_WORKER_POOL)")
        regs = [self._tool_registration(t) for t in tools]
        r = self._call("RegisterTools", pb2.RegisterToolsRequest(session_id=self.session_id, tools=regs,
                                                                 worker_id=worker_id))
        self._check(r, "RegisterTools")
        return dict(r.tool_ids)

    @staticmethod
    def _tool_registration(t):
        if isinstance(t, str):
            t = {"name": t}
        elif callable(t) and not isinstance(t, dict):
            sig = inspect.signature(t)
            t = {"name": t.__name__, "description": inspect.getdoc(t) or "",
                 "supports_streaming": inspect.isgeneratorfunction(t),
                 "parameters": [{"name": n, "required": p.default is inspect.Parameter.empty}
                                for n, p in sig.parameters.items()
                                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]}
        meta = dict(t.get("metadata", {}))
        if t.get("allow"):
            meta["allow"] = ",".join(t["allow"])
        return pb2.ToolRegistration(
            name=t["name"], description=t.get("description", ""), metadata=meta,
            supports_streaming=bool(t.get("supports_streaming", False)),
            parameters=[pb2.ParameterSpec(name=p["name"], type=p.get("type", ""),
                                          description=p.get("description", ""),
                                          required=bool(p.get("required", False)))
                        for p in t.get("parameters", [])])

    def _tool_params(self, kwargs):
        params = {}
        for key, value in kwargs.items():
            try:
                body = json.dumps(value, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as e:
                raise InvalidValueError("tool argument %r has no JSON form: %s" % (key, e)) from None
            params[key] = any_pb2.Any(type_url=self._TOOL_ARG_URL, value=body)
        return params

    def execute_tool(self, tool_name: str, **kwargs) -> Any:
        """ExecuteTool: runs a Python tool of this session (on its pool's
        worker) with keyword arguments; returns its JSON result.  ToolError
        when the function raised; BridgeUnavailableError when its pool cannot
        run it now (breaker open, queue full, worker died)."""
        r = self._call("ExecuteTool", pb2.ExecuteToolRequest(
            session_id=self.session_id, tool_name=tool_name, parameters=self._tool_params(kwargs)))
        if not r.success:
            raise ToolError(r.error_message or "tool failed", kind=r.metadata.get("error_kind"))
        if not r.HasField("result") or not r.result.value:
            return None
        return json.loads(r.result.value.decode("utf-8"))

    def stream_tool(self, tool_name: str, **kwargs):
        """ExecuteStreamingTool: iterator of the items a Python generator tool
        yields, each as soon as the worker produced it.  Raises ToolError at
        the end if the function raised after its last item."""
        call = self._invoke(self.stub.ExecuteStreamingTool,
                            pb2.ExecuteToolRequest(session_id=self.session_id, tool_name=tool_name,
                                                   parameters=self._tool_params(kwargs), stream=True),
                            timeout=self.timeout)
        try:
            for chunk in call:
                if chunk.is_final:
                    if chunk.metadata.get("error"):
                        raise ToolError(chunk.metadata["error"], kind=chunk.metadata.get("error_kind"))
                    return
                yield json.loads(chunk.data.decode("utf-8"))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def call_tool(self, tool_name: str, **kwargs) -> Any:
        """snakepit's name for calling a tool: here, a tool of the BEAM."""
        return self.call_elixir_tool(tool_name, **kwargs)

    def _tool_proxy(self, spec: ToolSpec) -> Callable[..., Any]:
        def proxy(**kwargs):
            return self.call_elixir_tool(spec.name, **kwargs)
        proxy.__name__ = spec.name
        lines = ["%s: %s%s%s" % (p["name"], p["type"] or "any", " (required)" if p["required"] else "",
                                 " - " + p["description"] if p["description"] else "")
                 for p in spec.parameters]
        proxy.__doc__ = spec.description + ("\n\nParameters:\n" + "\n".join(lines) if lines else "")
        return proxy

    @property
    def elixir_tools(self) -> Dict[str, Callable[..., Any]]:
        """The exposed tools as callables by name (as snakepit's SessionContext
        offers them), listed afresh on every access."""
        return {t.name: self._tool_proxy(t) for t in self.list_elixir_tools()}

    @property
    def tools(self) -> "ToolNamespace":
        """Attribute access to the exposed tools: ``ctx.tools.add(a=1, b=2)``."""
        return ToolNamespace(self)

    # ------------------------------------------------------------ variables

    def register_variable(self, name, var_type, initial_value, constraints=None,
                          metadata=None):
        """Register a variable; returns its id."""
        any_v, binary = self._encode(var_type, initial_value)
        r = self._call("RegisterVariable", pb2.RegisterVariableRequest(
            session_id=self.session_id, name=name, type=var_type, initial_value=any_v,
            constraints_json=codec.encode_json(constraints), metadata=metadata or {},
            initial_binary_value=binary))
        self._check(r, "RegisterVariable")
        self.cache.forget(name)
        self._remember_type(name, r.variable_id, var_type)
        return r.variable_id

    def get_variable_info(self, name, bypass_cache=False):
        """The Variable (value, version, type, constraints, ...) named (or with id) name."""
        if not bypass_cache:
            hit = self.cache.get(name)
            if hit is not None:
                return hit
        r = self._call("GetVariable", pb2.GetVariableRequest(
            session_id=self.session_id, variable_identifier=name, bypass_cache=bypass_cache))
        var = self._variable(r.variable)
        self.cache.put(var)
        return var

    def get_variable(self, name, bypass_cache=False):
        """The value of a variable."""
        return self.get_variable_info(name, bypass_cache).value

    def update_variable(self, name, value, *, expected_version=None, metadata=None,
                        var_type=None):
        """Set a variable; returns the new version.

        expected_version: commit only if the variable is at that version, else
        VersionConflictError (whose current_version is the server's).
        var_type: encode the value as this type (else the type this client
        remembers, retried once with the server's current type if the write
        is refused as an invalid value or not found and that type differs).
        """
        if expected_version is not None and expected_version < 0:
            raise InvalidValueError("expected_version must be >= 0")
        return self._write_typed(
            name, lambda t: self._set_variable(name, value, t, expected_version, metadata), var_type)

    def _write_typed(self, name, write, var_type=None):
        """``write(type)`` with name's type: var_type if given, else the
        remembered one, else the server's.

        The remembered type only saves a round trip; it is never the reason
        for a refusal: a write under it refused as a bad value (client- or
        server-side) or as not found is retried once with the server's
        current type if that differs (the variable may have been deleted and
        registered again with another type by someone else).  A refused write
        committed nothing, so the retry cannot apply a value twice."""
        if var_type is not None:
            return write(var_type)
        remembered = self._remembered_type(name)
        if remembered is None:
            return write(self._type_of(name))
        try:
            return write(remembered)
        except (InvalidValueError, VariableNotFoundError) as first:
            fresh = self._fresh_type(name)
            if fresh == remembered:
                raise first
        return write(fresh)

    def _set_variable(self, name, value, var_type, expected_version, metadata):
        any_v, binary = self._encode(var_type, value)
        req = pb2.SetVariableRequest(session_id=self.session_id, variable_identifier=name,
                                     value=any_v, metadata=metadata or {},
                                     binary_value=binary)
        if expected_version is not None:
            req.expected_version = expected_version
            req.expect_version_zero = expected_version == 0
        self.cache.invalidate(name)
        written = None
        try:
            r = self._call("SetVariable", req)
            self._check(r, "SetVariable")
            written = r.new_version
        finally:
            # the new version is the floor, as for a watch event: another
            # thread's GetVariable answered before this write cannot cache
            # the older version once this returned
            self.cache.invalidate(name, min_version=written)
        return r.new_version

    def list_variables(self, pattern=None):
        """Every variable (or those whose name matches the glob pattern: * and ?)."""
        r = self._call("ListVariables", pb2.ListVariablesRequest(
            session_id=self.session_id, pattern=pattern or ""))
        out = []
        for v in r.variables:
            var = self._variable(v)
            self.cache.put(var)
            out.append(var)
        return out

    def delete_variable(self, name):
        """Delete a variable."""
        try:
            r = self._call("DeleteVariable", pb2.DeleteVariableRequest(
                session_id=self.session_id, variable_identifier=name))
            self._check(r, "DeleteVariable")
        finally:
            self.cache.forget(name)
            self._forget_type(name)

    def get_variables_info(self, names, bypass_cache=False):
        """(found {name: Variable}, missing [name]) in one round trip for the uncached."""
        found, todo = {}, []
        for n in names:
            hit = None if bypass_cache else self.cache.get(n)
            if hit is not None:
                found[n] = hit
            else:
                todo.append(n)
        missing = []
        if todo:
            r = self._call("GetVariables", pb2.BatchGetVariablesRequest(
                session_id=self.session_id, variable_identifiers=todo,
                include_metadata=True, bypass_cache=bypass_cache))
            got = {}
            for key, v in r.variables.items():
                var = self._variable(v)
                self.cache.put(var)
                got[key] = got[var.name] = got[var.id] = var
            missing = list(r.missing_variables)
            for n in todo:
                if n in got:
                    found[n] = got[n]
                elif n not in missing:
                    missing.append(n)
        return found, missing

    def get_variables(self, names, bypass_cache=False):
        """{name: value} of several variables; VariableNotFoundError if any is missing."""
        found, missing = self.get_variables_info(names, bypass_cache)
        if missing:
            raise VariableNotFoundError("variables not found: %s" % ", ".join(missing))
        return {n: found[n].value for n in names}

    def update_variables(self, updates, atomic=False, metadata=None, types=None):
        """Set several variables at once; returns {name: new version}.

        atomic=True: all or nothing.  Any failure raises BatchUpdateError
        (errors by name; for a non-atomic batch the others did commit).
        types: {name: type} to encode values by; the other names go by the
        type this client remembers, or the server's.  As in
        ``update_variable``, a remembered type is never the reason for a
        refusal: a value it cannot encode, or an update the server refuses,
        is tried once more with the server's current type when that differs
        (atomic: the whole batch again, nothing having committed; else the
        refused updates only).
        """
        types = dict(types or {})
        # the names typed from memory: the only types that may be stale
        remembered = {}
        for n in updates:
            if n not in types:
                t = self._remembered_type(n)
                if t is not None:
                    remembered[n] = types[n] = t
        unfit = self._lookup_types([n for n in updates if n not in types], updates, types)
        if unfit and atomic:
            raise self._batch_error(unfit, {}, atomic)
        encoded, stale = {}, []
        for name, value in updates.items():
            if name in unfit:
                continue
            try:
                encoded[name] = self._encode(types[name], value)
            except InvalidValueError:
                if name not in remembered:
                    raise
                stale.append(name)
        if stale:
            # refused here under a remembered type: the server's type decides
            for n in stale:
                del remembered[n]
                self._forget_type(n)
            unfit.update(self._lookup_types(stale, updates, types))
            if unfit and atomic:
                raise self._batch_error(unfit, {}, atomic)
            for n in stale:
                if n not in unfit:
                    encoded[n] = self._encode(types[n], updates[n])
        versions, errs, ok = self._send_batch(encoded, atomic, metadata)
        retry = self._retyped([n for n in errs if n in remembered], types)
        refused = set()
        for n in sorted(retry):
            try:
                encoded[n] = self._encode(types[n], updates[n])
            except InvalidValueError as e:
                # of no use to the variable's real type: its error, as the
                # server's for a bad value (and an atomic batch stays refused)
                errs[n] = str(e)
                refused.add(n)
        retry -= refused
        if retry and not (atomic and refused):
            again = encoded if atomic else {n: encoded[n] for n in retry}
            more_versions, more_errs, ok = self._send_batch(again, atomic, metadata)
            errs = {n: m for n, m in errs.items() if n not in again}
            errs.update(more_errs)
            versions.update(more_versions)
            ok = ok and not errs
        if errs or unfit or not ok:
            raise self._batch_error(dict(errs, **unfit), versions, atomic)
        return versions

    def _lookup_types(self, names, updates, types):
        """Fill types with the server's type of each of names (one round
        trip); returns {name: error} for those it does not know and whose
        value has no type to send it by."""
        unfit = {}
        if not names:
            return unfit
        found, missing = self.get_variables_info(names, bypass_cache=True)
        for n, var in found.items():
            types[n] = var.type
        # A name the server does not know still goes to it, typed by its
        # value: the server's answer (not found) is then an error of the
        # batch like any other, and the rest of a non-atomic batch commits.
        for n in missing:
            try:
                types[n] = codec.infer_type(updates[n])
            except codec.CodecError:
                unfit[n] = "variable not found: %s" % n
        return unfit

    def _retyped(self, names, types):
        """Those of names (refused under a remembered type) whose type on
        the server now differs; types gets the new ones."""
        if not names:
            return set()
        for n in names:
            self._forget_type(n)
        found, _missing = self.get_variables_info(names, bypass_cache=True)
        changed = set()
        for n, var in found.items():
            if var.type != types[n]:
                types[n] = var.type
                changed.add(n)
        return changed

    def _send_batch(self, encoded, atomic, metadata):
        """One SetVariables of {name: (Any, binary)}: ({name: version},
        {name: error}, whether the server reported success)."""
        if not encoded:
            return {}, {}, True
        req = pb2.BatchSetVariablesRequest(session_id=self.session_id,
                                           metadata=metadata or {}, atomic=atomic)
        for name, (any_v, binary) in encoded.items():
            req.updates[name].CopyFrom(any_v)
            if binary:
                req.binary_updates[name] = binary
        for name in encoded:
            self.cache.invalidate(name)
        r = None
        try:
            r = self._call("SetVariables", req)
        finally:
            # each committed version is its variable's floor (see update_variable)
            written = dict(r.new_versions) if r is not None else {}
            for name in encoded:
                self.cache.invalidate(name, min_version=written.get(name) or None)
        return dict(r.new_versions), dict(r.errors), r.success

    @staticmethod
    def _batch_error(errs, versions, atomic):
        return BatchUpdateError(
            "batch update failed%s: %s" % (" (nothing committed)" if atomic else "",
                                           "; ".join("%s: %s" % kv for kv in sorted(errs.items()))),
            errs, versions, atomic)

    def batch(self, atomic=True, metadata=None):
        """Collect writes, sent as one SetVariables when the block ends without error.

            with ctx.batch() as b:       # atomic by default: all or nothing
                b["temperature"] = 0.2
                b["max_tokens"] = 512
            b.new_versions               # {name: version}
        """
        return BatchWriter(self, atomic, metadata)

    # ------------------------------------------------------------ pythonic access

    def __getitem__(self, name):
        return self.get_variable(name)

    # how often ctx[n] = v goes round update -> not found -> register -> exists
    _SETITEM_ATTEMPTS = 3

    def __setitem__(self, name, value):
        # Update, else register.  Another writer may register the name between
        # our update and our register: then ours is just a later write, so the
        # update is tried again (bounded: a name deleted and re-registered in a
        # loop by others does not hold us forever).
        for attempt in range(self._SETITEM_ATTEMPTS):
            try:
                self.update_variable(name, value)
                return
            except VariableNotFoundError:
                if self.strict:
                    raise
            try:
                self.register_variable(name, codec.infer_type(value), value)
                return
            except VariableExistsError:
                if attempt == self._SETITEM_ATTEMPTS - 1:
                    raise

    def __delitem__(self, name):
        self.delete_variable(name)

    def __contains__(self, name):
        try:
            self.get_variable_info(name)
            return True
        except VariableNotFoundError:
            return False

    def keys(self):
        return [v.name for v in self.list_variables()]

    @property
    def v(self):
        """Attribute-style access: ``ctx.v.name`` reads, ``ctx.v.name = x`` writes."""
        return VariableNamespace(self)

    # ------------------------------------------------------------ dependencies

    def add_dependency(self, from_variable, to_variable, dependency_type="data"):
        """Declare that to_variable depends on from_variable (cycles are refused)."""
        self._check(self._call("AddDependency", pb2.AddDependencyRequest(
            session_id=self.session_id, from_variable=from_variable,
            to_variable=to_variable, dependency_type=dependency_type)), "AddDependency")

    def remove_dependency(self, from_variable, to_variable):
        self._check(self._call("RemoveDependency", pb2.RemoveDependencyRequest(
            session_id=self.session_id, from_variable=from_variable,
            to_variable=to_variable)), "RemoveDependency")

    def get_dependencies(self, name):
        """Names of the variables name depends on directly."""
        return list(self._call("GetDependencies", pb2.GetDependenciesRequest(
            session_id=self.session_id, variable_identifier=name)).variables)

    def get_dependents(self, name, transitive=False):
        """Names of the variables depending on name (transitive: all, in update order)."""
        return list(self._call("GetDependents", pb2.GetDependentsRequest(
            session_id=self.session_id, variable_identifier=name,
            transitive=transitive)).variables)

    def get_update_order(self, name):
        """name then all its dependents, in topological order."""
        return list(self._call("GetUpdateOrder", pb2.GetUpdateOrderRequest(
            session_id=self.session_id, variable_identifier=name)).variables)

    # ------------------------------------------------------------ optimization

    def start_optimization(self, name, optimizer_id, config=None):
        """Take the optimizer lock of a variable; returns the optimization id.

        config keys: conflict (wait|abort|preempt), priority, lease_ms,
        timeout_ms, objective (minimize|maximize), metric.
        """
        cfg = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (config or {}).items()}
        r = self._call("StartOptimization", pb2.StartOptimizationRequest(
            session_id=self.session_id, variable_identifier=name,
            optimizer_id=optimizer_id, optimizer_config=cfg))
        self._check(r, "StartOptimization")
        return r.optimization_id

    def stop_optimization(self, name, optimizer_id="", force=False, apply_best=False):
        """Release the optimizer lock; returns StopResult(final_value, applied)."""
        self.cache.invalidate(name)
        r = self._call("StopOptimization", pb2.StopOptimizationRequest(
            session_id=self.session_id, variable_identifier=name, force=force,
            optimizer_id=optimizer_id, apply_best=apply_best))
        if not r.success:
            raise BridgeError("StopOptimization failed: %s" % (r.error_message or "unknown error"))
        return StopResult(codec.decode(r.final_value), r.applied)

    def get_optimization_status(self, name):
        r = self._call("GetOptimizationStatus", pb2.GetOptimizationStatusRequest(
            session_id=self.session_id, variable_identifier=name))
        best = None
        if r.HasField("best_value"):
            best = codec.decode(r.best_value, r.best_binary_value)
        return OptimizationStatus(
            optimizing=r.status.optimizing, optimizer_id=r.status.optimizer_id,
            started_at=_ts_seconds(r.status.started_at), fencing_token=r.fencing_token,
            priority=r.priority, iterations=r.iterations, waiters=r.waiters,
            best_value=best, best_metrics=codec.decode_json(r.best_metrics_json, {}),
            best_iteration=r.best_iteration)

    def report_progress(self, name, optimizer_id, iteration, value, metrics=None):
        """Report a candidate value (and its metrics) of a running optimization.

        The value is encoded by the variable's type as ``update_variable``
        encodes it (a stale remembered type is refreshed and retried once):
        the best candidate is what ``stop_optimization(apply_best=True)``
        writes."""
        def report(var_type):
            any_v, binary = self._encode(var_type, value)
            self._check(self._call("ReportOptimizationProgress", pb2.ReportOptimizationProgressRequest(
                session_id=self.session_id, variable_identifier=name, optimizer_id=optimizer_id,
                iteration=iteration, value=any_v, metrics_json=codec.encode_json(metrics or {}),
                binary_value=binary)), "ReportOptimizationProgress")
        self._write_typed(name, report)

    def optimize(self, variables, algorithm="tpe", budget=100, direction="minimize", seed=0,
                 idle_timeout=600.0, lock_timeout=5.0):
        """Start an optimization study of variables (names) of this session:
        float/integer with min and max (log scale with metadata scale=log),
        choice, boolean.  Returns a Study (ask/tell/best/trials/stop/run).
        The study holds the variables' optimizer locks until ``stop()`` or
        until no call reached it for ``idle_timeout`` seconds; waits up to
        ``lock_timeout`` seconds for them."""
        from .study import Study
        if isinstance(variables, str):
            variables = [variables]
        if direction not in ("minimize", "maximize"):
            raise ValueError("direction must be 'minimize' or 'maximize'")
        r = self._call("StartStudy", pb2.StartStudyRequest(
            session_id=self.session_id, variables=list(variables), algorithm=algorithm or "",
            direction=direction, budget=int(budget), seed=int(seed),
            idle_timeout_ms=max(1, int(idle_timeout * 1000)), lock_timeout_ms=max(1, int(lock_timeout * 1000))),
            timeout=None if self.timeout is None else self.timeout + lock_timeout)
        return Study(self, r.study_id, r.space)

    # ------------------------------------------------------------ history

    def get_variable_history(self, name, limit=0):
        """Archived versions, newest first (limit 0: all kept)."""
        r = self._call("GetVariableHistory", pb2.GetVariableHistoryRequest(
            session_id=self.session_id, variable_identifier=name, limit=limit))
        return [HistoryEntry(e.version, codec.decode(e.value, e.binary_value),
                             _ts_seconds(e.timestamp), e.changed_by, dict(e.metadata))
                for e in r.entries]

    def rollback_variable(self, name, target_version):
        """Write the value of an old version as a new version; returns the Variable."""
        self.cache.invalidate(name)
        written = None
        try:
            r = self._call("RollbackVariable", pb2.RollbackVariableRequest(
                session_id=self.session_id, variable_identifier=name,
                target_version=target_version))
            self._check(r, "RollbackVariable")
            written = r.variable.version
        finally:
            # the rollback's new version is the floor (see update_variable)
            self.cache.invalidate(name, min_version=written)
        return self._variable(r.variable)

    # ------------------------------------------------------------ access control

    def set_variable_permissions(self, name, rules):
        """Replace a variable's access rules.

        rules: dicts {"session_pattern": "*" | glob, "permissions": ["read", "write",
        "observe", "optimize"], "conditions": {key: value}} (conditions optional).
        """
        msgs = []
        for rule in rules:
            msgs.append(pb2.AccessRule(
                session_pattern=rule.get("session_pattern", "*"),
                permissions=list(rule.get("permissions", [])),
                conditions_json=codec.encode_json(rule.get("conditions")) if rule.get("conditions") else ""))
        self._check(self._call("SetVariablePermissions", pb2.SetVariablePermissionsRequest(
            session_id=self.session_id, variable_identifier=name, rules=msgs)),
            "SetVariablePermissions")

    def check_variable_access(self, name, principal, permission, context=None):
        """Would principal (a session id) get permission on name? AccessCheck(allowed, reason)."""
        r = self._call("CheckVariableAccess", pb2.CheckVariableAccessRequest(
            session_id=self.session_id, variable_identifier=name, principal=principal,
            permission=permission, context_json=codec.encode_json(context) if context else ""))
        return AccessCheck(r.allowed, r.reason)

    # ------------------------------------------------------------ dashboard

    def get_dashboard(self, whole_node=False):
        """The dashboard (this session's, or the whole node's) as a dict."""
        r = self._call("GetDashboard", pb2.GetDashboardRequest(
            session_id="" if whole_node else self.session_id))
        return codec.decode_json(r.dashboard_json, {})

    # ------------------------------------------------------------ model versions

    def select_model(self, name, user_id=None, **unit):
        """The model id serving this unit for name (sticky: same unit, same model).

        ``ctx.select_model("clf", user_id="u42")``; another unit key (the one the
        server's experiment uses) as ``ctx.select_model("clf", tenant="t7")``.
        Without a unit the server picks a random bucket.  Units are strings.
        """
        if user_id is not None and unit:
            raise TypeError("give user_id or one other unit key, not both")
        if len(unit) > 1:
            raise TypeError("one unit key at most")
        if user_id is not None:
            key, value = "", user_id
        elif unit:
            key, value = next(iter(unit.items()))
        else:
            key, value = "", ""
        r = self._call("SelectModel", pb2.SelectModelRequest(
            session_id=self.session_id, name=name, unit=str(value), unit_key=key))
        return r.model_id

    def record_inference(self, model_id, latency_ms, success, experiment="", **custom):
        """Record one inference of model_id for its running experiments/rollouts.

        latency_ms > 0; success a bool; experiment restricts it to one test;
        keyword arguments are custom metrics (numbers), e.g. ``score=0.93``.
        """
        self._call("RecordInference", pb2.RecordInferenceRequest(
            session_id=self.session_id, model_id=model_id, latency_ms=float(latency_ms),
            success=bool(success), experiment=experiment,
            custom={k: float(v) for k, v in custom.items()}))

    # ------------------------------------------------------------ watch

    def watch(self, names, include_initial=False, timeout=None):
        """Iterator of VariableUpdate for every committed change of names, in order.

        Runs until cancelled (``w.cancel()``, or leaving ``with ctx.watch(..) as w``)
        or timeout seconds pass (BridgeTimeoutError).  Events invalidate this
        context's cache.
        """
        call = self._invoke(self.stub.WatchVariables,
                            pb2.WatchVariablesRequest(session_id=self.session_id,
                                                      variable_identifiers=list(names),
                                                      include_initial_values=include_initial),
                            timeout=timeout)
        return Watch(self, call)

    def watch_cache(self, names, ready_timeout=30.0):
        """Keep the cache of names coherent: a background watch drops entries on change.

        Returns once the subscription is live (the server sent every initial
        value), so no later commit can be missed; ``.stop()`` ends it.
        """
        return CacheWatcher(self, list(names), ready_timeout)

    # ------------------------------------------------------------ event log

    def get_events(self, since=None, until=None, types=None, limit=0, direction="forward",
                   include_archive=False, timeout=None):
        """This session's events (the event log, dspex_events), oldest first.

        since/until (inclusive) are a sequence number (int) or a time (float
        seconds since the epoch, or a datetime); a side takes one of them.
        types: event types to keep (e.g. ["variable_updated"]); limit: at most
        this many (0: 1000, at most 100000); direction "backward" gives the
        newest first; include_archive also reads retention's archive files.
        Returns a list of Event, values in their data decoded by their type
        (a value change's ``value_type``; see Event).
        """
        if direction not in ("forward", "backward"):
            raise ValueError("direction must be 'forward' or 'backward'")
        req = pb2.GetEventsRequest(session_id=self.session_id, types=list(types or []), limit=limit,
                                   descending=direction == "backward", include_archive=include_archive)
        for bound, seq_field, ts_field in ((since, "since_sequence", "since_time"),
                                           (until, "until_sequence", "until_time")):
            if bound is None:
                continue
            if isinstance(bound, bool):
                raise TypeError("since/until: a sequence (int) or a time (float, datetime)")
            if isinstance(bound, int):
                setattr(req, seq_field, bound)
            else:
                getattr(req, ts_field).CopyFrom(_timestamp(bound))
        r = self._call("GetEvents", req, timeout=timeout)
        return [_event(e) for e in r.events]

    def watch_events(self, types=None, from_position=0, from_sequence=0, timeout=None):
        """Iterator of Event: this session's events from a point, then live.

        from_position (global, Event.position) or from_sequence (this
        session's numbering, Event.sequence) start with a catch-up from the
        log; both 0 streams only events committed after the call.  No gap
        and no duplicate at the switch to live.  Runs until cancelled
        (``w.cancel()``, or leaving ``with ctx.watch_events() as w``) or
        timeout seconds pass (BridgeTimeoutError).  Values in the events'
        data are decoded as ``get_events`` decodes them.
        """
        call = self._invoke(self.stub.WatchEvents,
                            pb2.WatchEventsRequest(session_id=self.session_id, types=list(types or []),
                                                   from_position=from_position, from_sequence=from_sequence),
                            timeout=timeout)
        return EventWatch(call)

    def state_at(self, sequence=None, time=None, timeout=None):
        """The session's state right after its event number ``sequence``, or at
        ``time`` (float seconds since the epoch, or a datetime), rebuilt from
        the event log: a dict with id, metadata, ttl, created_at and
        variables, a dict name -> {name, id, type, value, version, history,
        metadata, constraints, ...}.  SessionNotFoundError when the session
        did not exist then.
        """
        if (sequence is None) == (time is None):
            raise ValueError("give exactly one of sequence and time")
        req = pb2.GetStateAtRequest(session_id=self.session_id)
        if sequence is not None:
            if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
                raise ValueError("sequence must be an int >= 1")
            req.sequence = sequence
        else:
            req.time.CopyFrom(_timestamp(time))
        r = self._call("GetStateAt", req, timeout=timeout)
        state = codec.decode_json(r.state_json, {})
        state["variables"] = {v["name"]: _decode_typed(v) for v in state.get("variables") or []}
        return state

    def _on_event(self, upd):
        if upd.update_type == "deleted":
            self.cache.forget(upd.name)
            self._forget_type(upd.name, upd.id)  # a new variable of that name may have another type
        else:
            self.cache.invalidate(upd.name, min_version=upd.version)
            if upd.id:
                self.cache.invalidate(upd.id, min_version=upd.version)


class _Stream:
    """A server stream: iterate it for messages converted by ``_convert``;
    ``cancel()`` (or leaving ``with``) ends it, which iteration sees as its end."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            m = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(e) from None
        return self._convert(m)

    def _convert(self, m):
        raise NotImplementedError

    def cancel(self):
        self._cancelled = True
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        return False


class Watch(_Stream):
    """A running WatchVariables stream; iterate it for VariableUpdate events."""

    def __init__(self, ctx, call):
        super().__init__(call)
        self._ctx = ctx

    def _convert(self, m):
        var = None
        value = None
        if m.HasField("variable"):
            var = self._ctx._variable(m.variable)
            value = var.value
        upd = VariableUpdate(
            name=var.name if var else m.variable_id, id=m.variable_id,
            update_type=m.update_type, value=value,
            version=var.version if var else -1, source=m.update_source,
            metadata=dict(m.update_metadata), timestamp=_ts_seconds(m.timestamp),
            variable=var)
        self._ctx._on_event(upd)
        return upd


@dataclass
class Event:
    """One event of the session's event log (dspex_events).

    ``data`` is the event's JSON with its values decoded as every other read
    decodes them (``nan``/``inf`` floats, embeddings, tensors) when the data
    says their type: ``type`` (``variable_registered``) or, for the value
    changes ``variable_updated`` and ``variable_rolled_back``, ``value_type``
    (float, integer, boolean, string (also for choice and module
    variables), embedding or tensor), which the server adds to their data.
    Data naming neither (an application's event, or a value change from a
    server older than ``value_type``) keeps the wire's JSON, where a float's
    NaN is the string "NaN"."""
    id: str                   # UUIDv7
    type: str                 # e.g. "variable_updated"
    session_id: str
    sequence: int             # per session, from 1, gapless
    position: int             # global order in the node's event store
    timestamp: Optional[float]
    data: Any                 # JSON (see the proto's event log section)
    metadata: Dict[str, Any]  # node, principal, request_id, changed_by, ...


#: The events whose data is a value change typed by ``value_type``.
_VALUE_EVENTS = ("variable_updated", "variable_rolled_back")


def _event(m):
    data = codec.decode_json(m.data_json)
    return Event(id=m.id, type=m.type, session_id=m.session_id, sequence=m.sequence,
                 position=m.position, timestamp=_ts_seconds(m.timestamp),
                 data=_decode_typed(data, "value_type" if m.type in _VALUE_EVENTS else "type"),
                 metadata=codec.decode_json(m.metadata_json, {}))


def _decode_typed(d, type_key="type"):
    """A variable's JSON (a state_at entry, an event's data) with its values
    decoded by its type as every other read decodes them ("NaN" -> nan,
    tensors flattened, ...): ``value``, ``old_value``, ``previous.value`` and
    each ``history[i].value``.  The type is ``d["type"]``, else (a value
    change event's data) ``d[type_key]``; without one the values stay as the
    wire's JSON."""
    if not isinstance(d, dict):
        return d
    t = d.get("type")
    if not isinstance(t, str):
        t = d.get(type_key)
    if not isinstance(t, str):
        return d

    def dec(holder, key):
        if isinstance(holder, dict) and key in holder:
            try:
                holder[key] = codec.from_json_value(t, holder[key])
            except codec.CodecError:
                pass  # not of its type (a server bug): left as sent rather than lost
    dec(d, "value")
    dec(d, "old_value")
    dec(d.get("previous"), "value")
    for h in d.get("history") or []:
        dec(h, "value")
    return d


def _timestamp(t):
    """float seconds since the epoch or a datetime as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    if hasattr(t, "timestamp"):
        t = t.timestamp()
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError("a time is float seconds since the epoch or a datetime")
    us = int(round(t * 1e6))
    ts.seconds, ts.nanos = us // 1000000, (us % 1000000) * 1000
    return ts


class EventWatch(_Stream):
    """A running WatchEvents stream; iterate it for Event."""

    def _convert(self, m):
        return _event(m)


class BatchWriter:
    """Writes collected by ``SessionContext.batch``; sent on a clean exit."""

    def __init__(self, ctx, atomic, metadata):
        self._ctx, self._atomic, self._metadata = ctx, atomic, metadata
        self.updates = {}
        self.new_versions = None

    def __setitem__(self, name, value):
        self.updates[name] = value

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None and self.updates:
            self.new_versions = self._ctx.update_variables(self.updates, atomic=self._atomic,
                                                           metadata=self._metadata)
        return False


class CacheWatcher:
    """A daemon thread consuming a watch stream so its events invalidate the cache."""

    def __init__(self, ctx, names, ready_timeout):
        self.events = 0
        self.error = None
        self._cond = threading.Condition()
        self._watch = ctx.watch(names, include_initial=True)
        # Live once every requested name or id has its initial value.  The
        # server sends one per variable, and a name and its id are one
        # variable: a count of the names would wait for values never sent.
        self._awaiting = set(names)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dspex-cache-watch")
        self._thread.start()
        with self._cond:
            if not self._cond.wait_for(lambda: not self._awaiting or self.error,
                                       ready_timeout):
                self.stop()
                raise BridgeError("cache watch not live after %ss" % ready_timeout)
        if self.error is not None and self._awaiting:
            raise self.error

    def _run(self):
        try:
            for upd in self._watch:
                with self._cond:
                    if upd.update_type == "initial_value":
                        self._awaiting.discard(upd.name)
                        self._awaiting.discard(upd.id)
                    else:
                        self.events += 1
                    self._cond.notify_all()
        except BridgeError as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def wait_for_events(self, n, timeout=None):
        """Block until n change events were applied to the cache; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.events >= n, timeout)

    def stop(self):
        self._watch.cancel()
        self._thread.join()


class ToolNamespace:
    """``ctx.tools.name(**kwargs)`` calls the BEAM's tool ``name``."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        ctx = self._ctx

        def call(**kwargs):
            return ctx.call_elixir_tool(name, **kwargs)
        call.__name__ = name
        return call

    def __dir__(self):
        return [t.name for t in self._ctx.list_elixir_tools()]


class VariableNamespace:
    """``ctx.v.name`` reads a value, ``ctx.v.name = x`` writes (or registers) it."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._ctx.get_variable(name)
        except VariableNotFoundError as e:
            raise AttributeError(str(e)) from e

    def __setattr__(self, name, value):
        self._ctx[name] = value

    def __delattr__(self, name):
        self._ctx.delete_variable(name)

    def __dir__(self):
        return self._ctx.keys()
