%% @doc One long-lived link from this region to a peer region's gateway.
%%
%% Connects (mutual TLS when `tls' is configured, else plain TCP to a loopback
%% address only: `dspex_region' refuses anything else),
%% sends `{hello, Name, Coords}' and is `up' once the gateway answers
%% `{welcome, PeerName, PeerCoords}' with the configured peer name. While up
%% it sends a probe `{ping, Seq, T0}' every `probe_ms' (at most one in
%% flight) and measures the round trip when the echo comes back: an EWMA
%% (`ewma_alpha') and p50/p99 over the last `window' samples, all in µs of
%% this node's monotonic clock. A probe unanswered for `down_after_ms', a
%% closed socket or a wrong answer takes the link `down'; it reconnects after
%% an exponential backoff with jitter (`backoff_min_ms' doubling to
%% `backoff_max_ms', each wait drawn in [B/2, B]). The samples survive a
%% reconnect. After every change the link writes its row into
%% `dspex_region''s links table (readers never call this process) and emits
%% `[dspex, region, link, up | down]' and `[dspex, region, probe]'.
%%
%% The link also carries cross-region replication: it tells
%% `dspex_region_shipper' when it is up (with its pid) or down, sends the
%% shipper's batches (`{repl, Id, Last, Part}' frames) and hands it the peer's
%% acknowledgements (`{repl_ack, Id, #{need_full}}'); and reads forwarded to
%% the peer (`dspex_region:get/3' with `read => primary'), numbered, answered
%% `{error, {region_unavailable, Peer}}' when the link goes down first.
-module(dspex_region_link).
-behaviour(gen_server).

-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).
-export([percentile/2]).

%% @private
-spec start_link(map(), map()) -> {ok, pid()} | {error, term()}.
start_link(Peer, C) -> gen_server:start_link(?MODULE, {Peer, C}, []).

%% @private
-spec init({map(), map()}) -> {ok, map()}.
init({#{name := PeerName, gateway := Gw}, C}) ->
    self() ! connect,
    {ok, #{peer => PeerName, gateway => Gw, me => maps:get(name, C), coords => maps:get(coords, C),
           conf => C, sock => undefined, conn => undefined, status => down,
           backoff => maps:get(backoff_min_ms, C), seq => 0, outstanding => undefined,
           window => queue:new(), wlen => 0, ewma => undefined, samples => 0, sum_us => 0,
           last_us => undefined, last_check_at => undefined, since => erlang:system_time(millisecond),
           last_error => undefined, reads => #{}}}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()} | {noreply, map()}.
handle_call({read, S, K}, From, #{status := up, sock := Sock, reads := R} = St) ->
    %% a read forwarded to this peer region (dspex_region:get/3, read => primary)
    %% (a number: a reference names this node, an atom the peer would refuse)
    Ref = erlang:unique_integer([positive]),
    ok = send(Sock, {read, Ref, S, K}),
    {noreply, St#{reads => R#{Ref => From}}};
handle_call({read, _, _}, _From, #{peer := P} = St) -> {reply, {error, {region_unavailable, P}}, St};
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(connect, #{gateway := {Host, Port}, conf := C} = St) ->
    Timeout = min(maps:get(down_after_ms, C), 5000),
    Host1 = case Host of B when is_binary(B) -> binary_to_list(B); _ -> Host end,
    Opts = [binary, {packet, 4}, {packet_size, 65536}, {active, once}, {nodelay, true},
            {send_timeout, 5000}, {send_timeout_close, true}],
    Connected = case maps:get(tls, C, undefined) of
                    undefined -> gen_tcp:connect(Host1, Port, Opts, Timeout);
                    Tls ->
                        %% an address has no host name to check: the CA and the region name identify the peer
                        Sni = case is_tuple(Host1) of true -> [{server_name_indication, disable}]; false -> [] end,
                        ssl:connect(Host1, Port, Opts ++ dspex_region_gateway:tls_options(client, Tls) ++ Sni, Timeout)
                end,
    case Connected of
        {ok, S} ->
            Conn = make_ref(),
            ok = send(S, {hello, maps:get(me, St), maps:get(coords, St)}),
            erlang:send_after(maps:get(down_after_ms, C), self(), {hello_timeout, Conn}),
            {noreply, St#{sock => S, conn => Conn, status => connecting}};
        {error, E} -> {noreply, retry({connect, E}, St)}
    end;
handle_info({T, S, B}, #{sock := S} = St) when T =:= tcp; T =:= ssl ->
    ok = dspex_region_gateway:setopts(S, [{active, once}]),
    {noreply, frame(dspex_region_gateway:decode(B), St)};
handle_info({T, S}, #{sock := S} = St) when T =:= tcp_closed; T =:= ssl_closed -> {noreply, down(closed, St)};
handle_info({T, S, E}, #{sock := S} = St) when T =:= tcp_error; T =:= ssl_error -> {noreply, down({tcp_error, E}, St)};
handle_info({ship, Id, Chunks}, #{status := up, sock := S} = St) ->
    %% a batch of dspex_region_shipper: one frame, or consecutive parts
    [ok = send(S, {repl, Id, Last, Part}) || {Last, Part} <- Chunks],
    {noreply, St};
handle_info({ship, Id, _}, #{peer := P} = St) ->
    notify({ship_failed, P, Id}),
    {noreply, St};
handle_info({hello_timeout, Conn}, #{conn := Conn, status := connecting} = St) ->
    {noreply, down(hello_timeout, St)};
handle_info({tick, Conn}, #{conn := Conn, status := up, conf := C} = St) ->
    erlang:send_after(maps:get(probe_ms, C), self(), {tick, Conn}),
    case maps:get(outstanding, St) of
        undefined -> {noreply, probe(St)};
        {_, T0} ->
            Waited = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, millisecond),
            case Waited >= maps:get(down_after_ms, C) of
                true -> {noreply, down(probe_timeout, St)};
                false -> {noreply, St}
            end
    end;
handle_info(_, St) -> {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_, #{sock := S}) when S =/= undefined -> dspex_region_gateway:close(S);
terminate(_, _) -> ok.

%%% frames -----------------------------------------------------------------------

frame({ok, {welcome, Peer, _Coords}}, #{peer := Peer, status := connecting, conn := Conn} = St) ->
    St1 = St#{status => up, since => erlang:system_time(millisecond), backoff => maps:get(backoff_min_ms, maps:get(conf, St)),
              outstanding => undefined, last_error => undefined},
    publish(St1),
    dspex_telemetry:execute([dspex, region, link, up], #{count => 1},
                            #{region => maps:get(me, St), peer => Peer}),
    self() ! {tick, Conn},
    notify({link_up, Peer, self()}),
    St1;
frame({ok, {welcome, Other, _}}, #{status := connecting} = St) -> down({wrong_region, Other}, St);
frame({ok, {pong, Seq, T0}}, #{status := up, outstanding := {Seq, T0}} = St) ->
    Us = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond),
    St1 = sample(Us, St#{outstanding => undefined}),
    publish(St1),
    dspex_telemetry:execute([dspex, region, probe], #{rtt_us => Us},
                            #{region => maps:get(me, St), peer => maps:get(peer, St)}),
    St1;
frame({ok, {repl_ack, Id, #{need_full := NF} = Res}}, #{status := up, peer := P} = St) when is_list(NF) ->
    notify({repl_ack, P, Id, Res}),
    St;
frame({ok, {read_reply, Ref, Reply}}, #{status := up, reads := R} = St) ->
    case maps:take(Ref, R) of
        {From, R1} -> gen_server:reply(From, Reply), St#{reads => R1};
        error -> St
    end;
frame({ok, Msg}, St) -> down({unexpected, Msg}, St);
frame({error, E}, St) -> down(E, St).

probe(#{sock := S, seq := Seq} = St) ->
    T0 = erlang:monotonic_time(),
    ok = send(S, {ping, Seq + 1, T0}),
    St#{seq => Seq + 1, outstanding => {Seq + 1, T0}}.

send(S, Msg) ->
    %% a failed send shows up as tcp_closed / tcp_error on the socket
    _ = (dspex_region_gateway:transport(S)):send(S, dspex_region_gateway:encode(Msg)),
    ok.

%% to the replication shipper, when it runs
notify(Msg) ->
    case whereis(dspex_region_shipper) of
        undefined -> ok;
        Pid -> Pid ! Msg, ok
    end.

%%% statistics -------------------------------------------------------------------

sample(Us, #{window := W, wlen := N, ewma := E, samples := K, sum_us := Sum, conf := C} = St) ->
    Max = maps:get(window, C),
    {W1, N1} = case N >= Max of
                   true -> {queue:in(Us, queue:drop(W)), N};
                   false -> {queue:in(Us, W), N + 1}
               end,
    Alpha = maps:get(ewma_alpha, C),
    E1 = case E of undefined -> float(Us); _ -> Alpha * Us + (1 - Alpha) * E end,
    St#{window => W1, wlen => N1, ewma => E1, samples => K + 1, sum_us => Sum + Us, last_us => Us,
        last_check_at => erlang:system_time(millisecond)}.

%% @private Nearest-rank percentile `Q' (0 < Q =< 1) of a non-empty sorted list.
-spec percentile([number()], float()) -> number().
percentile(Sorted, Q) ->
    N = length(Sorted),
    lists:nth(max(1, min(N, ceil(Q * N))), Sorted).

publish(#{peer := P, window := W} = St) ->
    Sorted = lists:sort(queue:to_list(W)),
    Pct = fun(_) when Sorted =:= [] -> undefined; (Q) -> percentile(Sorted, Q) end,
    dspex_region:link_update(P, #{pid => self(), status => case maps:get(status, St) of up -> up; _ -> down end,
                                  since => maps:get(since, St), last_error => maps:get(last_error, St),
                                  ewma_us => maps:get(ewma, St), p50_us => Pct(0.5), p99_us => Pct(0.99),
                                  samples => maps:get(samples, St), sum_us => maps:get(sum_us, St),
                                  last_us => maps:get(last_us, St), last_check_at => maps:get(last_check_at, St)}).

%%% down and reconnect -------------------------------------------------------------

down(Why, #{sock := S, status := Was} = St) ->
    ok = dspex_region_gateway:close(S),
    St1 = St#{sock => undefined, conn => undefined, outstanding => undefined, reads => #{}},
    %% forwarded reads get no answer on a new connection
    maps:foreach(fun(_, From) -> gen_server:reply(From, {error, {region_unavailable, maps:get(peer, St)}}) end,
                 maps:get(reads, St)),
    notify({link_down, maps:get(peer, St)}),
    case Was of
        up -> dspex_telemetry:execute([dspex, region, link, down], #{count => 1},
                                      #{region => maps:get(me, St), peer => maps:get(peer, St), reason => Why});
        _ -> ok
    end,
    retry(Why, St1).

retry(Why, #{backoff := B, conf := C, status := Was} = St) ->
    Wait = B div 2 + rand:uniform(max(1, B - B div 2)),
    erlang:send_after(Wait, self(), connect),
    Since = case Was of up -> erlang:system_time(millisecond); _ -> maps:get(since, St) end,
    St1 = St#{status => down, since => Since, last_error => Why, backoff => min(2 * B, maps:get(backoff_max_ms, C))},
    publish(St1),
    St1.
