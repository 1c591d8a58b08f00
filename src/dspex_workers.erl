%% @doc Pools of Python worker OS processes (DSPy programs, optimizers) run
%% from the BEAM, which stays healthy whatever they do.
%%
%% Each worker is `/usr/bin/python3 priv/python/dspex_bridge/worker.py
%% --module M' (configurable), told the bridge address and its session
%% (arguments and environment), and gets calls only after it reported
%% readiness. A worker that crashes, misses a call's deadline or a health
%% ping, answers garbage or floods is SIGKILLed and replaced, with
%% exponential backoff per slot. Stopping a pool or the application leaves no
%% worker process running, and a worker also dies with the BEAM (stdin EOF,
%% and the kernel's parent-death signal for one stuck in C code).
%%
%% `call/3' goes through the pool's circuit breaker (`dspex_breaker', named
%% `{dspex_workers, Pool}') when the pool has one: an open breaker answers
%% `{error, circuit_open}' without touching the pool.
%%
%% Deadlines: `call(Pool, Req, Timeout)' returns by `Timeout' ms whatever
%% the pool or its workers do (the caller stops waiting at the deadline
%% itself); a worker still running the call then is SIGKILLed. Other worker
%% failures are answered once the OS process is gone, or at the deadline if
%% that comes first.
%%
%% Errors of `call/3': `timeout' (the deadline passed, queued or running; a
%% running worker is killed), `overloaded' (the queue is full),
%% `{worker_exit, Status | Reason}' (the worker exited with `Status', or
%% its port closed with `Reason' before the status was known, e.g. `epipe':
%% it died while being written to; one level, never nested), `{bad_reply,
%% Detail}' (not a frame, not JSON, not a protocol message), `flood' (too
%% many unsolicited frames), `{python, Type, Message}' (the function raised;
%% the worker lives on), `{not_json, Term}' (arguments with no JSON form),
%% `{too_large, Bytes}' (the request's frame is over 64 MiB, the most the
%% worker reads, and was not sent; or the function's reply or a streamed
%% chunk is over `max_frame', and the worker did not send it: either way the
%% worker lives on and the breaker does not count it),
%% `{load_error, Type, Message}' and `{spawn_failed, Why}' (no worker is
%% ready and they cannot start: answered at once, see `start_pool/2'),
%% `circuit_open', `no_pool', `pool_stopped'.
%%
%% Telemetry: `[dspex, workers, call | start_pool | stop_pool, stop]'
%% (`#{duration}', `#{pool, result => ok | error_reason_tag}', and `fn' for
%% calls); `[dspex, workers, worker,
%% start]' and `[dspex, workers, worker, exit]' (`#{system_time}', `#{pool,
%% slot, os_pid}' and `reason'); `[dspex, workers, worker, restart]'
%% (`#{delay_ms}', `#{pool, slot, failures, reason}': a slot's restart was
%% scheduled after that backoff).
-module(dspex_workers).

-export([start_pool/2, stop_pool/1, call/3, stream/4, status/1, os_pids/1, breaker/1]).

-type pool() :: atom().
-type request() :: {Fn :: binary() | atom(), Args :: list()}
                 | {Fn :: binary() | atom(), Args :: list(), Kwargs :: #{binary() | atom() => term()}}.
-type call_error() :: timeout | overloaded | {worker_exit, term()} | {bad_reply, term()} | flood
                    | {python, binary(), binary()} | {not_json, term()} | {too_large, pos_integer()}
                    | circuit_open | no_pool
                    | pool_stopped | start_error().
-type start_error() :: {load_error, Type :: binary(), Message :: binary()} | {spawn_failed, term()}.
-export_type([pool/0, request/0, call_error/0, start_error/0]).

%% @doc Starts the pool `Name' (a locally registered atom) under the
%% application's supervisor. Options (defaults):
%% `module' (required: the Python file whose functions workers run),
%% `size' (2), `python' ("/usr/bin/python3"), `script' (the bundled
%% worker.py), `address' (application env `grpc_listen', "127.0.0.1:50051"),
%% `session' (binary; default "Pool_Slot" per worker), `env' ([{K, V}]
%% strings), `max_queue' (64 waiting callers), `ready_timeout_ms' (10000),
%% `health_interval_ms' (5000 or `infinity'), `ping_timeout_ms' (2000),
%% `backoff_min_ms' (100), `backoff_max_ms' (10000), `flood_limit' (200
%% unsolicited frames per second), `max_frame' (16 MiB), `max_mailbox'
%% (1000 messages in a worker's process), `stop_grace_ms' (500),
%% `breaker' (`false', or `dspex_breaker' options to install one).
%% `{error, {invalid_option, Key}}' for a bad or missing option.
%%
%% Returns once a worker is ready (within `ready_timeout_ms'). If a worker
%% fails before that, the pool is stopped (no OS process left) and the
%% failure returned: `{load_error, Type, Message}' (the module did not load:
%% the Python exception's class name and message, with the line of the
%% module that raised it), `{spawn_failed, Why}' (`python' could not be
%% run), `not_ready', `{worker_exit, Status}', ...
-spec start_pool(pool(), map()) -> {ok, pid()} | {error, term()}.
start_pool(Name, Opts) when is_atom(Name), is_map(Opts) ->
    span(start_pool, Name, fun() ->
        case complete(Name, Opts) of
            {ok, #{breaker := BOpts} = Full} ->
                case check_breaker(BOpts) of
                    ok ->
                        %% the breaker is installed only once this call started
                        %% the pool: a failed start (the name is taken, by a
                        %% pool or anything else) leaves every breaker alone
                        case dspex_workers_sup:start_pool(Name, Full) of
                            {ok, Pid} ->
                                case install_breaker(Name, BOpts) of
                                    ok -> await_started(Name, Pid, Full);
                                    Error ->
                                        _ = dspex_workers_sup:stop_pool(Name),
                                        Error
                                end;
                            Error -> Error
                        end;
                    Error -> Error
                end;
            Error -> Error
        end
    end).

%% The pool's first worker is ready, or the pool is stopped again.
await_started(Name, Pid, #{ready_timeout_ms := ReadyMs}) ->
    %% the worker's ready timer bounds this; the margin covers spawning
    R = try gen_server:call(Pid, await_started, ReadyMs + 10000)
        catch exit:{timeout, _} -> {error, not_ready};
              exit:_ -> {error, pool_stopped}
        end,
    case R of
        ok -> {ok, Pid};
        {error, _} = Error ->
            _ = dspex_workers_sup:stop_pool(Name),
            forget_breaker(Name),
            Error
    end.

%% @doc Stops the pool: queued callers get `{error, pool_stopped}', every
%% worker is stopped (SIGKILLed after `stop_grace_ms') before this returns.
-spec stop_pool(pool()) -> ok | {error, not_found}.
stop_pool(Name) ->
    span(stop_pool, Name, fun() ->
        R = dspex_workers_sup:stop_pool(Name),
        forget_breaker(Name),
        R
    end).

forget_breaker(Name) ->
    _ = persistent_term:erase({?MODULE, Name, breaker}),
    _ = dspex_breaker:remove({?MODULE, Name}),
    ok.

%% @doc Runs `Fn(Args...)' on a free worker of `Pool' within `Timeout' ms
%% (queueing included). See the module doc for the errors.
%% `{Fn, Args, Kwargs}' also passes keyword arguments (`Fn(*Args, **Kwargs)').
-spec call(pool(), request(), non_neg_integer()) -> {ok, dspex_json:json()} | {error, call_error()}.
call(Pool, {Fn, Args}, Timeout) -> call(Pool, {Fn, Args, #{}}, Timeout);
call(Pool, {Fn, Args, Kwargs}, Timeout) -> run(Pool, Fn, Args, Kwargs, none, Timeout).

%% @doc Runs `Fn(*Args, **Kwargs)' like `call/3', streamed: every item the
%% Python function yields (a generator; any other result is one item) is
%% sent to `Sink = {Pid, Tag}' as `{Tag, {chunk, Json}}' as soon as the worker
%% produces it, in order; the call then returns `{ok, #{<<"chunks">> => N}}'
%% or an error (chunks already sent stay sent). The deadline bounds the whole
%% stream. Blocks the caller: let another process be the sink to forward the
%% chunks while it runs.
-spec stream(pool(), request(), non_neg_integer(), {pid(), term()}) ->
          {ok, dspex_json:json()} | {error, call_error()}.
stream(Pool, {Fn, Args}, Timeout, Sink) -> stream(Pool, {Fn, Args, #{}}, Timeout, Sink);
stream(Pool, {Fn, Args, Kwargs}, Timeout, {Pid, _} = Sink) when is_pid(Pid) ->
    run(Pool, Fn, Args, Kwargs, Sink, Timeout).

run(Pool, Fn, Args, Kwargs, Sink, Timeout) when is_atom(Pool), is_list(Args), is_map(Kwargs), is_integer(Timeout),
                                               Timeout >= 0, (is_binary(Fn) orelse is_atom(Fn)) ->
    Start = erlang:monotonic_time(),
    FnB = if is_atom(Fn) -> atom_to_binary(Fn, utf8); true -> Fn end,
    %% a plain call keeps the plain wire message (older worker scripts understand it)
    CallArgs = case Kwargs =:= #{} andalso Sink =:= none of
                   true -> Args;
                   false -> #{args => Args, kwargs => Kwargs, sink => Sink}
               end,
    Run = fun() -> pool_call(Pool, FnB, CallArgs, Timeout) end,
    Result = case persistent_term:get({?MODULE, Pool, breaker}, false) of
                 false -> Run();
                 true ->
                     case dspex_breaker:call({?MODULE, Pool}, Run, #{is_failure => fun worker_failure/1}) of
                         %% the breaker table is gone (its server restarted):
                         %% the pool still works, without a breaker
                         {error, not_found} -> Run();
                         R -> R
                     end
             end,
    dspex_telemetry:execute([dspex, workers, call, stop], #{duration => erlang:monotonic_time() - Start},
                            #{pool => Pool, fn => FnB, result => result_tag(Result)}),
    Result.

%% @doc Counts of idle, busy, starting and down workers, queued callers,
%% restarts so far, each slot's state and OS pid, and `load_error': `none',
%% or the `{load_error, Type, Message}' / `{spawn_failed, Why}' with which
%% workers last failed to start (until one is ready again).
%% `{error, no_pool}' when no pool has that name (whatever else may be
%% registered under it), `{error, timeout}' when the pool does not answer
%% within 5 s.
-spec status(pool()) -> {ok, map()} | {error, no_pool | timeout}.
status(Pool) ->
    case dspex_workers_sup:pool(Pool) of
        error -> {error, no_pool};
        {ok, Pid} ->
            try {ok, gen_server:call(Pid, status, 5000)}
            catch exit:{timeout, _} -> {error, timeout};
                  exit:_ -> {error, no_pool}     % it stopped meanwhile
            end
    end.

%% @doc OS pids of the pool's live workers (started, ready or busy).
-spec os_pids(pool()) -> [pos_integer()].
os_pids(Pool) ->
    case status(Pool) of
        {ok, #{workers := Ws}} -> [P || #{os_pid := P, status := St} <- Ws, is_integer(P), St =/= down];
        _ -> []
    end.

%% @doc The name of the pool's circuit breaker (for `dspex_breaker:status/1').
-spec breaker(pool()) -> {dspex_workers, pool()}.
breaker(Pool) -> {?MODULE, Pool}.

%%% Internals ----------------------------------------------------------------------

span(Op, Pool, Fun) ->
    Start = erlang:monotonic_time(),
    R = Fun(),
    dspex_telemetry:execute([dspex, workers, Op, stop], #{duration => erlang:monotonic_time() - Start},
                            #{pool => Pool, result => result_tag(R)}),
    R.

pool_call(Pool, Fn, Args, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    %% the pool and the worker answer by the deadline, but the caller does
    %% not depend on it: it stops waiting at the deadline whatever they do
    %% (a later answer is dropped with the request's alias)
    case dspex_workers_sup:pool(Pool) of
        error -> {error, no_pool};
        {ok, Pid} ->
            Req = gen_server:send_request(Pid, {call, Fn, Args, Deadline}),
            case gen_server:receive_response(Req, {abs, Deadline}) of
                {reply, Reply} -> Reply;
                timeout -> {error, timeout};
                {error, {noproc, _}} -> {error, no_pool};
                {error, {_, _}} -> {error, pool_stopped}
            end
    end.

%% What the breaker counts: the worker misbehaved (not: the function raised,
%% the pool is busy, or the arguments were bad).
worker_failure({error, timeout}) -> true;
worker_failure({error, flood}) -> true;
worker_failure({error, {worker_exit, _}}) -> true;
worker_failure({error, {bad_reply, _}}) -> true;
worker_failure({error, no_pool}) -> true;
worker_failure({error, {load_error, _, _}}) -> true;
worker_failure({error, {spawn_failed, _}}) -> true;
worker_failure(_) -> false.

result_tag(ok) -> ok;
result_tag({ok, _}) -> ok;
result_tag({error, T}) when is_atom(T) -> T;
result_tag({error, T}) when is_tuple(T) -> element(1, T);
result_tag(_) -> error.

check_breaker(false) -> ok;
check_breaker(BOpts) -> dspex_breaker:check_opts(BOpts).

install_breaker(_Name, false) -> ok;
install_breaker(Name, BOpts) ->
    case dspex_breaker:install({?MODULE, Name}, BOpts) of
        ok -> persistent_term:put({?MODULE, Name, breaker}, true), ok;
        Error -> Error
    end.

complete(Name, Opts) ->
    Defaults = #{size => 2, python => "/usr/bin/python3", script => default_script(),
                 address => application:get_env(dspex_bridge, grpc_listen, "127.0.0.1:50051"),
                 session => default, env => [], max_queue => 64, ready_timeout_ms => 10000,
                 health_interval_ms => 5000, ping_timeout_ms => 2000, backoff_min_ms => 100,
                 backoff_max_ms => 10000, flood_limit => 200, max_frame => 16 * 1024 * 1024,
                 max_mailbox => 1000, stop_grace_ms => 500, breaker => false},
    Full = maps:merge(Defaults, Opts),
    case maps:is_key(module, Full) of
        false -> {error, {invalid_option, module}};
        true ->
            case [K || {K, V} <- maps:to_list(Full), not valid(K, V)] of
                [] -> {ok, Full#{name => Name, module := str(maps:get(module, Full)),
                                 python := str(maps:get(python, Full)), script := str(maps:get(script, Full)),
                                 address := str(maps:get(address, Full)),
                                 session := session(maps:get(session, Full))}};
                [K | _] -> {error, {invalid_option, K}}
            end
    end.

%% `default': each worker gets its own session (see dspex_worker).
session(default) -> default;
session(S) -> str(S).

str(B) when is_binary(B) -> unicode:characters_to_list(B);
str(S) -> S.

valid(K, V) when K =:= size; K =:= max_queue; K =:= flood_limit; K =:= max_frame; K =:= max_mailbox ->
    is_integer(V) andalso V > 0;
valid(K, V) when K =:= ready_timeout_ms; K =:= ping_timeout_ms; K =:= stop_grace_ms ->
    is_integer(V) andalso V > 0;
valid(K, V) when K =:= backoff_min_ms; K =:= backoff_max_ms -> is_integer(V) andalso V >= 0;
valid(health_interval_ms, V) -> V =:= infinity orelse (is_integer(V) andalso V > 0);
valid(K, V) when K =:= python; K =:= script; K =:= module; K =:= address ->
    is_list(V) orelse is_binary(V);
valid(session, V) -> V =:= default orelse is_list(V) orelse is_binary(V);
valid(env, V) -> is_list(V) andalso lists:all(fun({A, B}) -> is_list(A) andalso (is_list(B) orelse B =:= false);
                                                  (_) -> false end, V);
valid(breaker, V) -> V =:= false orelse is_map(V);
valid(_, _) -> false.

default_script() ->
    case code:priv_dir(dspex_bridge) of
        {error, _} -> "priv/python/dspex_bridge/worker.py";
        Dir -> filename:join([Dir, "python", "dspex_bridge", "worker.py"])
    end.
