%% @doc The gRPC server: owns the `dspex_grpc_port' port program (C, gRPC core)
%% and runs each call in its own handler process (`dspex_grpc_handler').
%%
%% The port sends `{call, Id, Method, Request, Metadata, DeadlineMs}' (request
%% decoded to a map by the port); the handler answers through `reply/2',
%% `stream/2', `close/1' or `fail/3' straight to the port, never through this
%% server. A cancelled call (client cancel or deadline) kills its handler. If
%% the port program dies, its handlers are killed and it is started again after
%% a back-off (50 ms doubling to 5 s); in-flight clients see UNAVAILABLE.
%%
%% Application environment: `grpc_enabled' (default `true'), `grpc_listen'
%% (`"127.0.0.1:50051"', string or binary; port 0 picks a free port, see
%% `listening_port/0'), `grpc_threads' (completion-queue threads, default `auto': half the
%% schedulers, at least 1),
%% `grpc_max_message_bytes' (default 64 MiB), `grpc_max_concurrent_calls'
%% (default 10 000; beyond it calls end UNAVAILABLE), `grpc_stream_queue'
%% (messages queued per stream before a slow reader's stream is ended
%% RESOURCE_EXHAUSTED, default 10 000), `grpc_port_command' (a wrapper command
%% as a list of strings, e.g. valgrind, prepended to the port program).
-module(dspex_grpc).
-behaviour(gen_server).

-export([start_link/0, listening_port/0, await_listening/1, address/0, os_pid/0,
         reply/2, stream/2, close/1, fail/3, in_flight/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-type ctx() :: {port(), non_neg_integer()}.
-export_type([ctx/0]).

-define(MIN_BACKOFF, 50).
-define(MAX_BACKOFF, 5000).

%% @doc Starts the owner and the port program.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc The TCP port the server listens on, once the port program is up.
-spec listening_port() -> {ok, inet:port_number()} | {error, not_listening}.
listening_port() -> gen_server:call(?MODULE, listening_port).

%% @doc Waits up to `Timeout' ms for the server to listen.
-spec await_listening(non_neg_integer()) -> {ok, inet:port_number()} | {error, not_listening}.
await_listening(Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    await_until(Deadline).

await_until(Deadline) ->
    case catch listening_port() of
        {ok, P} -> {ok, P};
        _ ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> {error, not_listening};
                false -> receive after 20 -> await_until(Deadline) end
            end
    end.

%% @doc The configured listen address (`grpc_listen'), as a string.
-spec address() -> string().
address() ->
    case application:get_env(dspex_bridge, grpc_listen, "127.0.0.1:50051") of
        B when is_binary(B) -> binary_to_list(B);
        L when is_list(L) -> L
    end.

%% @doc The OS pid of the running port program.
-spec os_pid() -> {ok, non_neg_integer()} | {error, not_running}.
os_pid() -> gen_server:call(?MODULE, os_pid).

%% @doc Number of calls being handled.
-spec in_flight() -> non_neg_integer().
in_flight() -> gen_server:call(?MODULE, in_flight).

%% @doc Unary answer (status OK).
-spec reply(ctx(), map()) -> ok.
reply({Port, Id}, Map) -> send(Port, {reply, Id, Map}).

%% @doc One message of a server stream.
-spec stream(ctx(), map()) -> ok.
stream({Port, Id}, Map) -> send(Port, {stream, Id, Map}).

%% @doc Ends a server stream with status OK.
-spec close(ctx()) -> ok.
close({Port, Id}) -> send(Port, {close, Id}).

%% @doc Ends the call with a status (a name such as `not_found') and message.
-spec fail(ctx(), atom(), binary()) -> ok.
fail({Port, Id}, Status, Msg) -> send(Port, {error, Id, dspex_grpc_status:code(Status), Msg}).

send(Port, Term) ->
    try erlang:port_command(Port, term_to_binary(Term)), ok
    catch error:badarg -> ok %% the port is gone: the client already sees UNAVAILABLE
    end.

%%% gen_server ---------------------------------------------------------------

%% @private
-spec init([]) -> {ok, map()}.
init([]) ->
    process_flag(trap_exit, true),
    St = #{port => undefined, listening => undefined, calls => #{}, mons => #{},
           backoff => ?MIN_BACKOFF, max_calls => application:get_env(dspex_bridge, grpc_max_concurrent_calls, 10000)},
    {ok, open(St)}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(listening_port, _From, #{listening := L} = St) ->
    {reply, case L of undefined -> {error, not_listening}; _ -> {ok, L} end, St};
handle_call(os_pid, _From, #{port := P} = St) ->
    Reply = case P =/= undefined andalso erlang:port_info(P, os_pid) of
                {os_pid, Pid} -> {ok, Pid};
                _ -> {error, not_running}
            end,
    {reply, Reply, St};
handle_call(in_flight, _From, #{calls := C} = St) ->
    {reply, map_size(C), St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({Port, {data, Bin}}, #{port := Port} = St) ->
    %% atoms in here are field and method names of the proto, a bounded set
    {noreply, command(binary_to_term(Bin), St)};
handle_info({Port, {exit_status, Status}}, #{port := Port} = St) ->
    {noreply, port_down(Status, St)};
handle_info({'EXIT', Port, _}, #{port := Port} = St) ->
    %% exit_status follows (or came first); nothing else to do here
    {noreply, St};
handle_info({'EXIT', _, _}, St) ->
    {noreply, St};
handle_info({'DOWN', MRef, process, _Pid, Reason}, #{mons := M, calls := C, port := Port} = St) ->
    case maps:take(MRef, M) of
        {Id, M1} ->
            case Reason of
                normal -> ok;
                _ ->
                    logger:error("dspex_grpc: handler of call ~p crashed: ~p", [Id, Reason]),
                    Port =/= undefined andalso
                        fail({Port, Id}, internal, <<"internal error in the call handler">>)
            end,
            {noreply, St#{mons := M1, calls := maps:remove(Id, C)}};
        error -> {noreply, St}
    end;
handle_info(restart_port, #{port := undefined} = St) ->
    {noreply, open(St)};
handle_info(_Msg, St) ->
    {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{port := Port}) ->
    %% closing stdin makes the port program end its open calls UNAVAILABLE and exit
    Port =/= undefined andalso (catch port_close(Port)),
    ok.

%%% internals ----------------------------------------------------------------

open(St) ->
    Exe = filename:join(priv_dir(), "dspex_grpc_port"),
    Args = ["--listen", address(),
            "--threads", integer_to_list(threads()),
            "--max-message-bytes", integer_to_list(application:get_env(dspex_bridge, grpc_max_message_bytes, 64 bsl 20)),
            "--stream-queue", integer_to_list(application:get_env(dspex_bridge, grpc_stream_queue, 10000))],
    {Cmd, CmdArgs} = case application:get_env(dspex_bridge, grpc_port_command, []) of
                         [W | WArgs] -> {os:find_executable(W), WArgs ++ [Exe | Args]};
                         [] -> {Exe, Args}
                     end,
    try open_port({spawn_executable, Cmd}, [{packet, 4}, binary, exit_status, use_stdio, {args, CmdArgs},
                                               %% sanitizer runtimes preloaded into the VM are not for it
                                               {env, [{"LD_PRELOAD", false}]}]) of
        Port ->
            dspex_telemetry:execute([dspex, grpc, port, start], #{system_time => erlang:system_time()},
                                    #{address => list_to_binary(address())}),
            St#{port := Port, listening := undefined}
    catch error:Reason ->
            logger:error("dspex_grpc: cannot start ~ts: ~p", [Cmd, Reason]),
            schedule_restart(St#{port := undefined})
    end.

%% `auto' (the default): half the schedulers, at least one. The BEAM side and,
%% on a small machine, the clients need the other cores; measured on 2 cores,
%% one completion-queue thread served ~1.5x the calls two did.
threads() ->
    case application:get_env(dspex_bridge, grpc_threads, auto) of
        N when is_integer(N), N > 0, N =< 64 -> N;
        _ -> max(1, erlang:system_info(schedulers_online) div 2)
    end.

priv_dir() ->
    case code:priv_dir(dspex_bridge) of
        {error, _} -> filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
        D -> D
    end.

command({listening, P}, St) ->
    logger:notice("dspex_grpc: serving gRPC (snakepit.bridge.BridgeService) on ~ts, port ~p", [address(), P]),
    St#{listening := P, backoff := ?MIN_BACKOFF};
command({call, Id, Method, Req, Meta, Deadline}, #{port := Port, calls := C, mons := M, max_calls := Max} = St) ->
    Ctx = {Port, Id},
    case map_size(C) >= Max of
        true ->
            {_, Msg} = dspex_grpc_status:of_error(overload),
            fail(Ctx, unavailable, Msg),
            dspex_telemetry:execute([dspex, grpc, overload], #{in_flight => map_size(C)}, #{rpc => Method}),
            St;
        false ->
            {Pid, MRef} = spawn_monitor(dspex_grpc_handler, run, [Ctx, Method, Req, Meta, Deadline]),
            St#{calls := C#{Id => {Pid, MRef}}, mons := M#{MRef => Id}}
    end;
command({cancelled, Id}, #{calls := C, mons := M} = St) ->
    case maps:take(Id, C) of
        {{Pid, MRef}, C1} ->
            exit(Pid, kill),
            erlang:demonitor(MRef, [flush]),
            dspex_telemetry:execute([dspex, grpc, cancelled], #{count => 1}, #{id => Id}),
            St#{calls := C1, mons := maps:remove(MRef, M)};
        error -> St
    end;
command(Other, St) ->
    logger:warning("dspex_grpc: unexpected message from the port: ~0p", [Other]),
    St.

port_down(Status, #{calls := C, backoff := B} = St) ->
    [begin exit(Pid, kill), erlang:demonitor(MRef, [flush]) end || {Pid, MRef} <- maps:values(C)],
    Level = case St of #{listening := undefined} when Status =:= 2 -> warning; _ -> error end,
    logger:log(Level, "dspex_grpc: port program exited with status ~p (~b calls in flight); restarting in ~b ms",
               [Status, map_size(C), B]),
    dspex_telemetry:execute([dspex, grpc, port, exit], #{in_flight => map_size(C)}, #{status => Status}),
    schedule_restart(St#{port := undefined, listening := undefined, calls := #{}, mons := #{}}).

schedule_restart(#{backoff := B} = St) ->
    erlang:send_after(B, self(), restart_port),
    St#{backoff := min(B * 2, ?MAX_BACKOFF)}.
