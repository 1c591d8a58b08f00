%% A delaying TCP proxy for the region tests and bench: accepts on 127.0.0.1,
%% connects each accepted connection to a target port on 127.0.0.1 and
%% forwards both directions, each chunk held `Delay' ms one-way. A chunk is
%% stamped when it arrives and queued; one timer per direction fires at the
%% head's due time (rounded to the nearest ms, so the delay is unbiased) and
%% forwards every chunk then due, so chunks in flight overlap and throughput
%% is not serialised by the delay. Each direction buffers at most
%% `max_buffer' bytes (default 1 MiB): past that it stops reading its socket
%% (TCP backpressure) until the queue drains. A close is delayed like data.
%%
%% drop/1 closes the listener and every connection (a link flap: the peer
%% sees its connection closed and its reconnects refused); restore/1 listens
%% again on the same port.
-module(dspex_region_proxy).
-behaviour(gen_server).

-export([start/2, start/3, port/1, set_target/2, drop/1, restore/1, stop/1, connections/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).
-export([acceptor/2, pump/1]).

%% Starts a proxy (not linked to the caller) listening on a free port.
-spec start(undefined | inet:port_number(), non_neg_integer()) -> {ok, pid()}.
start(Target, DelayMs) -> start(Target, DelayMs, #{}).

-spec start(undefined | inet:port_number(), non_neg_integer(), map()) -> {ok, pid()}.
start(Target, DelayMs, Opts) -> gen_server:start(?MODULE, {Target, DelayMs, Opts}, []).

-spec port(pid()) -> inet:port_number().
port(P) -> gen_server:call(P, port).

%% The target port of the connections accepted from now on.
-spec set_target(pid(), inet:port_number()) -> ok.
set_target(P, Port) -> gen_server:call(P, {target, Port}).

-spec drop(pid()) -> ok.
drop(P) -> gen_server:call(P, drop).

-spec restore(pid()) -> ok | {error, term()}.
restore(P) -> gen_server:call(P, restore).

-spec stop(pid()) -> ok.
stop(P) -> gen_server:stop(P).

%% Connections forwarded now.
-spec connections(pid()) -> non_neg_integer().
connections(P) -> gen_server:call(P, connections).

%%% server ---------------------------------------------------------------------

init({Target, Delay, Opts}) ->
    process_flag(trap_exit, true),
    St = #{target => Target, delay => Delay, max => maps:get(max_buffer, Opts, 1 bsl 20),
           port => 0, listen => undefined, acceptor => undefined, conns => #{}},
    {ok, St1} = listen(St),
    {ok, St1}.

listen(#{port := Port} = St) ->
    case gen_tcp:listen(Port, [binary, {ip, {127, 0, 0, 1}}, {active, false}, {reuseaddr, true},
                               {nodelay, true}, {backlog, 64}]) of
        {ok, L} ->
            {ok, P} = inet:port(L),
            A = proc_lib:spawn_link(?MODULE, acceptor, [self(), L]),
            {ok, St#{listen => L, port => P, acceptor => A}};
        {error, _} = E -> E
    end.

handle_call(port, _, #{port := P} = St) -> {reply, P, St};
handle_call({target, T}, _, St) -> {reply, ok, St#{target => T}};
handle_call(connections, _, #{conns := C} = St) -> {reply, map_size(C) div 2, St};
handle_call(drop, _, St) -> {reply, ok, close_all(St)};
handle_call(restore, _, #{listen := undefined} = St) ->
    case listen(St) of
        {ok, St1} -> {reply, ok, St1};
        E -> {reply, E, St}
    end;
handle_call(restore, _, St) -> {reply, ok, St}.

handle_cast(_, St) -> {noreply, St}.

handle_info({accepted, Client}, #{target := undefined} = St) ->
    gen_tcp:close(Client),
    {noreply, St};
handle_info({accepted, Client}, #{target := T, delay := D, max := Max, conns := C} = St) ->
    case gen_tcp:connect({127, 0, 0, 1}, T, [binary, {active, false}, {nodelay, true}], 2000) of
        {ok, Server} ->
            Up = proc_lib:spawn_link(?MODULE, pump, [#{in => Client, out => Server, delay => D, max => Max}]),
            Down = proc_lib:spawn_link(?MODULE, pump, [#{in => Server, out => Client, delay => D, max => Max}]),
            ok = gen_tcp:controlling_process(Client, Up),
            ok = gen_tcp:controlling_process(Server, Down),
            Up ! go, Down ! go,
            {noreply, St#{conns => C#{Up => Down, Down => Up}}};
        {error, _} ->
            gen_tcp:close(Client),
            {noreply, St}
    end;
handle_info({'EXIT', A, _}, #{acceptor := A} = St) -> {noreply, St#{acceptor => undefined}};
handle_info({'EXIT', Pid, _}, #{conns := C} = St) ->
    %% one direction ended: end the other one too (both sockets close)
    case maps:take(Pid, C) of
        {Other, C1} -> exit(Other, kill), {noreply, St#{conns => maps:remove(Other, C1)}};
        error -> {noreply, St}
    end;
handle_info(_, St) -> {noreply, St}.

terminate(_, St) -> _ = close_all(St), ok.

close_all(#{listen := L, acceptor := A, conns := C} = St) ->
    _ = [gen_tcp:close(L) || L =/= undefined],
    _ = [begin unlink(A), exit(A, kill) end || A =/= undefined],
    %% killing a pump closes the sockets it controls
    _ = [begin unlink(P), exit(P, kill) end || P <- maps:keys(C)],
    St#{listen => undefined, acceptor => undefined, conns => #{}}.

acceptor(Proxy, L) ->
    case gen_tcp:accept(L) of
        {ok, S} ->
            ok = gen_tcp:controlling_process(S, Proxy),
            Proxy ! {accepted, S},
            acceptor(Proxy, L);
        {error, E} -> exit({accept, E})
    end.

%%% one direction -------------------------------------------------------------------

pump(#{in := In} = St) ->
    receive go -> ok end,
    ok = inet:setopts(In, [{active, once}]),
    loop(St#{q => queue:new(), bytes => 0, reading => true, timer => undefined}).

loop(#{in := In, out := Out, delay := D, max := Max, q := Q, bytes := B} = St) ->
    receive
        {tcp, In, Data} ->
            Due = erlang:monotonic_time() + erlang:convert_time_unit(D, millisecond, native),
            B1 = B + byte_size(Data),
            Reading = B1 < Max,
            _ = [inet:setopts(In, [{active, once}]) || Reading],
            loop(arm(St#{q => queue:in({Due, Data}, Q), bytes => B1, reading => Reading}));
        {tcp_closed, In} ->
            Due = erlang:monotonic_time() + erlang:convert_time_unit(D, millisecond, native),
            loop(arm(St#{q => queue:in({Due, close}, Q), reading => closed}));
        {tcp_error, In, _} ->
            exit(normal);
        {timeout, _, flush} ->
            loop(arm(flush(St#{timer => undefined})));
        {tcp_closed, Out} -> exit(normal);
        {tcp_error, Out, _} -> exit(normal);
        _ -> loop(St)
    end.

%% forwards every chunk now due
flush(#{q := Q, out := Out, bytes := B, in := In, max := Max, reading := R} = St) ->
    Now = erlang:monotonic_time() + erlang:convert_time_unit(500, microsecond, native),
    case queue:peek(Q) of
        {value, {Due, close}} when Due =< Now ->
            gen_tcp:close(Out),
            exit(normal);
        {value, {Due, Data}} when Due =< Now ->
            case gen_tcp:send(Out, Data) of
                ok -> ok;
                {error, _} -> exit(normal)
            end,
            B1 = B - byte_size(Data),
            R1 = case R of
                     false when B1 < Max -> ok = inet:setopts(In, [{active, once}]), true;
                     _ -> R
                 end,
            flush(St#{q => queue:drop(Q), bytes => B1, reading => R1});
        _ -> St
    end.

%% a timer at the head's due time (nearest ms), unless one is set
arm(#{timer := undefined, q := Q} = St) ->
    case queue:peek(Q) of
        {value, {Due, _}} ->
            Half = erlang:convert_time_unit(500, microsecond, native),
            Ms = erlang:convert_time_unit(Due + Half, native, millisecond),
            St#{timer => erlang:start_timer(Ms, self(), flush, [{abs, true}])};
        empty -> St
    end;
arm(St) -> St.
