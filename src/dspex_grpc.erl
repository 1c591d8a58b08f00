%% @doc The gRPC server: owns the `dspex_grpc_port' port program (C, gRPC core)
%% and runs each call in its own handler process (`dspex_grpc_handler').
%%
%% The port sends `{call, Id, Method, Request, Metadata, DeadlineMs}' (request
%% decoded to a map by the port); the handler answers through `reply/2',
%% `stream/2', `close/1' or `fail/3' straight to the port, never through this
%% server. A cancelled call (client cancel or deadline) kills its handler.
%%
%% <b>Listening.</b> `start_link/0' returns once the port program listens or
%% has failed to: an address that cannot be served (another process, e.g.
%% another node, holds the port: SO_REUSEPORT is off, so a busy port is never
%% shared) is `{grpc_listen, Why, Address}' (`Why' is `eaddrinuse', `eacces',
%% `eaddrnotavail', `bad_address', `unknown', `timeout' after
%% `grpc_start_timeout_ms', or `{exit_status, N}'). With `grpc_required' =
%% `true', `start_link/0' returns `{error, {grpc_listen, Why, Address}}' and
%% the application does not start; by default the node starts without gRPC,
%% logs one error line, and retries as below (then `status/0' is `failed').
%%
%% <b>Restarts.</b> If the port program dies later, its handlers are killed
%% (in-flight clients see UNAVAILABLE) and it is started again after a
%% back-off (`grpc_restart_backoff_ms', default `{50, 5000}': doubling from
%% the first to the second). One error line is logged for the exit; further
%% failed attempts of the same incident are logged at debug level only. After
%% `grpc_restart_limit' (default 8) attempts without a run of at least
%% `grpc_restart_stable_ms' (default 30 000) it gives up: one error line, the
%% event `[dspex, grpc, port, give_up]', `status/0' reports `failed' with the
%% reason, and `restart/0' tries again. A run that lasted the stable time
%% resets the count and the back-off.
%%
%% Application environment: `grpc_enabled' (default `true'), `grpc_listen'
%% (`"127.0.0.1:50051"', string or binary; port 0 picks a free port, see
%% `listening_port/0'), `grpc_threads' (completion-queue threads, default `auto': half the
%% schedulers, at least 1),
%% `grpc_max_message_bytes' (default 64 MiB, at most 512 MiB), `grpc_max_concurrent_calls'
%% (default 10 000; beyond it calls end UNAVAILABLE), `grpc_stream_queue'
%% (messages queued per stream before a slow reader's stream is ended
%% RESOURCE_EXHAUSTED, default 10 000), `grpc_port_command' (a wrapper command
%% as a list of strings, e.g. valgrind, prepended to the port program),
%% `grpc_required' (`false'), `grpc_start_timeout_ms' (60 000), `grpc_restart_backoff_ms',
%% `grpc_restart_limit', `grpc_restart_stable_ms'.
-module(dspex_grpc).
-behaviour(gen_server).
-include_lib("kernel/include/logger.hrl").

-export([start_link/0, listening_port/0, await_listening/1, address/0, os_pid/0,
         reply/2, stream/2, close/1, fail/3, fail/4, in_flight/0, status/0, restart/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-type ctx() :: {port(), non_neg_integer()}.
-type listen_error() :: {grpc_listen, atom() | {exit_status, integer()} | {spawn, term()}, string()}.
-type status() :: #{state := starting | listening | restarting | failed,
                    address := string(),
                    port := inet:port_number() | undefined,
                    restarts := non_neg_integer(),
                    error := listen_error() | {grpc_port, {exit_status, integer()} | {exit, term()} | {spawn, term()}}
                           | undefined}.
-export_type([ctx/0, listen_error/0, status/0]).

%% @doc Starts the owner and the port program; returns once it listens or
%% has failed to. A failure is `{error, {grpc_listen, Why, Address}}' with
%% `grpc_required' = `true'; otherwise the owner runs, retrying (see above).
-spec start_link() -> {ok, pid()} | {error, listen_error() | term()}.
start_link() ->
    case gen_server:start_link({local, ?MODULE}, ?MODULE, [], []) of
        %% init stops with {shutdown, _}: no crash report for a refused address
        {error, {shutdown, {grpc_listen, _, _} = E}} -> {error, E};
        Other -> Other
    end.

%% @doc The server's state: `listening' (on `port'), `starting' (first start),
%% `restarting' (the port program died; `restarts' attempts so far), or
%% `failed' (gave up; `error' says why, `restart/0' tries again).
-spec status() -> status().
status() -> gen_server:call(?MODULE, status).

%% @doc After the server gave up (`status/0' is `failed'), starts the port
%% program again with a fresh restart count; `{error, running}' otherwise.
-spec restart() -> ok | {error, running}.
restart() -> gen_server:call(?MODULE, restart).

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
fail({Port, Id}, Status, Msg) -> send(Port, {error, Id, dspex_grpc_status:code(Status), bounded(Msg)}).

%% @doc `fail/3' with trailing metadata (header name => printable ASCII
%% binary), such as `dspex_grpc_status:trailers/1' gives for an error.
-spec fail(ctx(), atom(), binary(), #{binary() => binary()}) -> ok.
fail({Port, Id}, Status, Msg, Trailers) ->
    send(Port, {error, Id, dspex_grpc_status:code(Status), bounded(Msg), Trailers}).

%% The status message travels in the trailers, and clients cap a response's metadata (gRPC's default: 8 KiB,
%% counted after the message's percent-encoding): a message that echoes a long request (a session id of
%% 100 KB, a crash's arguments) is cut to ?MAX_MESSAGE bytes, at a character's start, so that the client
%% still gets the status rather than RESOURCE_EXHAUSTED.
-define(MAX_MESSAGE, 1024).
bounded(Msg) when is_binary(Msg), byte_size(Msg) > ?MAX_MESSAGE ->
    <<(utf8_prefix(Msg, ?MAX_MESSAGE - 3))/binary, "...">>;
bounded(Msg) -> Msg.

utf8_prefix(B, N) ->
    case B of
        <<_:N/binary, 2#10:2, _/bitstring>> when N > 0 -> utf8_prefix(B, N - 1); % a continuation byte
        <<P:N/binary, _/binary>> -> P
    end.

send(Port, Term) ->
    try erlang:port_command(Port, term_to_binary(Term)), ok
    catch error:badarg -> ok %% the port is gone: the client already sees UNAVAILABLE
    end.

%%% gen_server ---------------------------------------------------------------

%% @private
-spec init([]) -> {ok, map()} | {stop, {shutdown, listen_error()}}.
init([]) ->
    process_flag(trap_exit, true),
    {Min, _} = backoff_range(),
    St = #{port => undefined, listening => undefined, calls => #{}, mons => #{},
           phase => starting, backoff => Min, attempts => 0, since => undefined, error => undefined,
           listen_error => undefined,
           max_calls => application:get_env(dspex_bridge, grpc_max_concurrent_calls, 10000)},
    case open(St) of
        {ok, St1} ->
            Timeout = application:get_env(dspex_bridge, grpc_start_timeout_ms, 60000),
            await_first(St1, erlang:monotonic_time(millisecond) + Timeout);
        {error, Why} ->
            refuse({spawn, Why}, St)
    end.

%% The first start is synchronous: the node serves when start_link returns,
%% or it knows it cannot. A call can arrive before the listening message; it
%% is handled.
await_first(#{port := Port} = St, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, Bin}} ->
            case binary_to_term(Bin) of
                {listen_error, Why} ->
                    receive {Port, {exit_status, _}} -> ok after 5000 -> kill_port(Port) end,
                    refuse(Why, St);
                {listening, _} = L -> {ok, command(L, St)};
                Other -> await_first(command(Other, St), Deadline)
            end;
        {Port, {exit_status, Status}} ->
            refuse({exit_status, Status}, St)
    after Left ->
            kill_port(Port),
            refuse(timeout, St)
    end.

%% grpc_required: the application does not start; otherwise the node runs
%% without gRPC, retrying as after an exit (bounded, then failed).
refuse(Why, St) ->
    Addr = address(),
    case application:get_env(dspex_bridge, grpc_required, false) of
        true ->
            ?LOG_ERROR("dspex_grpc: cannot serve gRPC on ~ts: ~ts", [Addr, why_text(Why)]),
            {stop, {shutdown, {grpc_listen, Why, Addr}}};
        _ ->
            {ok, down({grpc_listen, Why, Addr}, St#{port := undefined, listening := undefined})}
    end.

why_text(eaddrinuse) -> "address in use (eaddrinuse: another process, e.g. another node, listens on this port)";
why_text(eacces) -> "permission denied (eacces)";
why_text(eaddrnotavail) -> "address not available on this host (eaddrnotavail)";
why_text(bad_address) -> "the address does not resolve (bad_address)";
why_text(timeout) -> "the port program did not start listening in time (timeout)";
why_text(Why) -> io_lib:format("~0p", [Why]).

kill_port(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, Pid} -> os:cmd("kill -9 " ++ integer_to_list(Pid));
        _ -> ok
    end,
    catch port_close(Port),
    ok.

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
    {reply, map_size(C), St};
handle_call(status, _From, #{phase := Ph, listening := L, attempts := A, error := E} = St) ->
    {reply, #{state => Ph, address => address(), port => L, restarts => A, error => E}, St};
handle_call(restart, _From, #{phase := failed} = St) ->
    {Min, _} = backoff_range(),
    ?LOG_NOTICE("dspex_grpc: starting the gRPC port program again, as asked"),
    {reply, ok, start_again(St#{attempts := 0, backoff := Min, phase := restarting})};
handle_call(restart, _From, St) ->
    {reply, {error, running}, St}.

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
handle_info({'EXIT', Port, normal}, #{port := Port} = St) ->
    %% the program exited: exit_status came first (then the port is no longer
    %% this one) or follows
    {noreply, St};
handle_info({'EXIT', Port, Why}, #{port := Port} = St) ->
    %% the port closed on an error, such as `epipe' when a reply was written
    %% to a program that had just died: no exit_status follows, so this is
    %% the end of the program (closing our side makes a live one exit)
    catch port_close(Port),
    {noreply, port_down({exit, Why}, St)};
handle_info({'EXIT', _, _}, St) ->
    {noreply, St};
handle_info({'DOWN', MRef, process, _Pid, Reason}, #{mons := M, calls := C, port := Port} = St) ->
    case maps:take(MRef, M) of
        {Id, M1} ->
            case Reason of
                normal -> ok;
                _ ->
                    ?LOG_ERROR("dspex_grpc: handler of call ~p crashed: ~p", [Id, Reason]),
                    Port =/= undefined andalso
                        fail({Port, Id}, internal, <<"internal error in the call handler">>)
            end,
            {noreply, St#{mons := M1, calls := maps:remove(Id, C)}};
        error -> {noreply, St}
    end;
handle_info(restart_port, #{port := undefined, phase := restarting} = St) ->
    {noreply, start_again(St)};
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
            {ok, St#{port := Port, listening := undefined, since := undefined, listen_error := undefined}}
    catch error:Reason ->
            {error, {Cmd, Reason}}
    end.

%% A restart attempt: a program that cannot even be spawned counts as a
%% failed attempt, like one that exits.
start_again(St) ->
    case open(St) of
        {ok, St1} -> St1;
        {error, Why} -> down({grpc_port, {spawn, Why}}, St#{port := undefined})
    end.

backoff_range() ->
    case application:get_env(dspex_bridge, grpc_restart_backoff_ms, {50, 5000}) of
        {Min, Max} when is_integer(Min), is_integer(Max), Min > 0, Max >= Min -> {Min, Max};
        _ -> {50, 5000}
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
    ?LOG_NOTICE("dspex_grpc: serving gRPC (snakepit.bridge.BridgeService) on ~ts, port ~p", [address(), P]),
    St#{listening := P, phase := listening, since := erlang:monotonic_time(millisecond), error := undefined};
command({listen_error, Why}, St) ->
    %% the exit follows; the restart logic reports it
    St#{listen_error := {grpc_listen, Why, address()}};
command({call, Id, Method, Req, Meta, Deadline}, #{port := Port, calls := C, mons := M, max_calls := Max} = St) ->
    Ctx = {Port, Id},
    case map_size(C) >= Max of
        true ->
            {_, Msg} = dspex_grpc_status:of_error(overload),
            fail(Ctx, unavailable, Msg, dspex_grpc_status:trailers(overload)),
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
    ?LOG_WARNING("dspex_grpc: unexpected message from the port: ~0p", [Other]),
    St.

port_down(Status, #{calls := C, listen_error := E} = St) ->
    [begin exit(Pid, kill), erlang:demonitor(MRef, [flush]) end || {Pid, MRef} <- maps:values(C)],
    dspex_telemetry:execute([dspex, grpc, port, exit], #{in_flight => map_size(C)}, #{status => Status}),
    Reason = case E of
                 {grpc_listen, _, _} -> E;
                 _ when is_integer(Status) -> {grpc_port, {exit_status, Status}};
                 _ -> {grpc_port, Status}
             end,
    down(Reason, St#{port := undefined, listening := undefined, calls := #{}, mons := #{}}, map_size(C)).

down(Reason, St) -> down(Reason, St, 0).

%% The port program is gone (or never came up): restart with back-off, or
%% give up after grpc_restart_limit attempts without a stable run.
down(Reason, #{phase := Phase, since := Since, attempts := A0, backoff := B0} = St, InFlight) ->
    {Min, Max} = backoff_range(),
    Stable = application:get_env(dspex_bridge, grpc_restart_stable_ms, 30000),
    Limit = application:get_env(dspex_bridge, grpc_restart_limit, 8),
    Now = erlang:monotonic_time(millisecond),
    {A, B} = case Phase =:= listening andalso Now - Since >= Stable of
                 true -> {0, Min};  %% after a long, good run: a new incident
                 false -> {A0, B0}
             end,
    St1 = St#{error := Reason, since := undefined},
    if
        A >= Limit ->
            ?LOG_ERROR("dspex_grpc: gave up restarting the gRPC port program after ~b attempts: ~ts; "
                         "gRPC is not served (dspex_grpc:restart() tries again)", [A, reason_text(Reason)]),
            dspex_telemetry:execute([dspex, grpc, port, give_up], #{restarts => A},
                                    #{reason => Reason, address => list_to_binary(address())}),
            St1#{phase := failed};
        true ->
            case A of
                0 when Phase =:= starting ->
                    ?LOG_ERROR("dspex_grpc: ~ts; the node runs without gRPC and retries with back-off, "
                               "at most ~b attempts", [reason_text(Reason), Limit]);
                0 -> ?LOG_ERROR("dspex_grpc: gRPC port program down (~ts, ~b calls in flight); restarting "
                                  "with back-off, at most ~b attempts", [reason_text(Reason), InFlight, Limit]);
                _ -> ?LOG_DEBUG("dspex_grpc: restart attempt ~b failed: ~ts", [A, reason_text(Reason)])
            end,
            erlang:send_after(B, self(), restart_port),
            St1#{phase := restarting, attempts := A + 1, backoff := min(B * 2, Max)}
    end.

reason_text({grpc_listen, Why, Addr}) -> io_lib:format("cannot listen on ~ts: ~ts", [Addr, why_text(Why)]);
reason_text({grpc_port, {exit_status, S}}) -> io_lib:format("exited with status ~p", [S]);
reason_text({grpc_port, {exit, Why}}) -> io_lib:format("the port closed: ~0p", [Why]);
reason_text({grpc_port, {spawn, Why}}) -> io_lib:format("cannot be started: ~0p", [Why]).
