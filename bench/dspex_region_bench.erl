%% @doc `make bench' (multi-region part): two regions, each a `peer' node,
%% linked in both directions through the delaying proxy of the tests
%% (test/dspex_region_proxy.erl, compiled into _build/bench). For injected
%% one-way delays of 0, 1, 5, 20 and 60 ms: the RTT each link measures (p50,
%% p99, EWMA over 64 samples) against the injected RTT. Then the probe's cost:
%% bytes per probe on the wire, and the CPU time of both nodes per probe
%% (runtime at probe_ms = 2 minus runtime at probe_ms = 1000 over the same
%% wall time, divided by the extra probes).
%%
%% Cross-region replication (issue #17): the same two regions, each a one-node
%% cluster, linked through proxies of 10 ms one way (20 ms injected RTT);
%% region a is the primary of one session, b its backup. W concurrent writers
%% on a (one variable each) make N sets each, in `async_primary_backup' then in
%% `sync_all': writes/s, the write latency seen by the writers (p50, p99), the
%% replication lag at the primary (`lag_ms', the age of the oldest change b has
%% not acknowledged, sampled every 2 ms: p50, p99, max), the records per batch
%% (group commit) and the CPU of both nodes per write (their runtime during
%% the run minus their runtime over as long a time without writes).
-module(dspex_region_bench).

-export([main/0, main/1]).
%% run on the peers
-export([writers/3, sampler/0, sampler_stop/0]).

-define(PEER_ARGS, ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"]).
-define(SAMPLES, 64).

main() -> main([rtt, replication]).

%% @doc The parts named: `rtt' (RTT and probe cost), `replication'.
-spec main([rtt | replication]) -> ok.
main(Parts) ->
    io:format("~n== dspex_region: measured RTT vs injected delay (2 peer nodes, delaying proxy) ==~n", []),
    Host = hd(string:split(net_adm:localhost(), ".")),
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    Nodes = [begin
                 {ok, P, _} = peer:start(#{name => "region_bench_" ++ X, host => Host, connection => standard_io,
                                           args => ?PEER_ARGS ++ ["-connect_all", "false" | Paths]}),
                 ok = peer:call(P, application, load, [dspex_bridge]),
                 ok = peer:call(P, logger, set_primary_config, [level, warning]),
                 [ok = peer:call(P, application, set_env, [dspex_bridge, K, V])
                  || {K, V} <- [{event_log, false}, {grpc_enabled, false}, {console_enabled, false},
                                {prometheus_enabled, false}]],
                 {list_to_binary(X), P}
             end || X <- ["a", "b"]],
    try
        io:format("~10s ~12s ~10s ~10s ~10s ~10s~n", ["one-way", "injected RTT", "p50", "p99", "ewma", "p50 extra"]),
        _ = lists:member(rtt, Parts) andalso [rtt_row(Nodes, D) || D <- [0, 1, 5, 20, 60]],
        _ = lists:member(rtt, Parts) andalso overhead(Nodes),
        _ = lists:member(replication, Parts) andalso replication(Nodes)
    after
        [catch peer:stop(P) || {_, P} <- Nodes]
    end,
    ok.

%% both regions started with links through proxies of one-way delay D
start(Nodes, D, ProbeMs) -> start(Nodes, D, ProbeMs, #{}).

start(Nodes, D, ProbeMs, Extra) ->
    Proxies = [{Name, begin {ok, Pr} = dspex_region_proxy:start(undefined, D), Pr end} || {Name, _} <- Nodes],
    [begin
         [Other] = [N || {N, _} <- Nodes, N =/= Name],
         Outbound = proplists:get_value(Name, Proxies),
         RC = #{name => Name, coords => {0, 0}, listen => {{127, 0, 0, 1}, 0}, probe_ms => ProbeMs, window => ?SAMPLES,
                peers => [#{name => Other, coords => {0, 0}, gateway => {{127, 0, 0, 1}, dspex_region_proxy:port(Outbound)}}],
                backoff_min_ms => 20, backoff_max_ms => 200},
         _ = case Extra of
                 #{cluster := true} ->
                     ok = peer:call(P, application, set_env,
                                    [dspex_bridge, cluster, #{nodes => [peer:call(P, erlang, node, [])], replicas => 0}]);
                 _ -> ok = peer:call(P, application, unset_env, [dspex_bridge, cluster])
             end,
         ok = peer:call(P, application, set_env, [dspex_bridge, region, maps:merge(RC, maps:without([cluster], Extra))]),
         {ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge])
     end || {Name, P} <- Nodes],
    %% the proxy named after a region carries that region's outbound link
    [begin
         [{_, OP}] = [X || {N, _} = X <- Nodes, N =/= Name],
         ok = dspex_region_proxy:set_target(Pr, peer:call(OP, dspex_region, gateway_port, []))
     end || {Name, Pr} <- Proxies],
    Proxies.

stop(Nodes, Proxies) ->
    [ok = peer:call(P, application, stop, [dspex_bridge]) || {_, P} <- Nodes],
    [dspex_region_proxy:stop(Pr) || {_, Pr} <- Proxies].

the_link(P) ->
    #{peers := Ps} = peer:call(P, dspex_region, topology, []),
    [L] = maps:values(Ps),
    L.

wait(F) -> wait(F, 600).
wait(_, 0) -> error(timeout);
wait(F, N) ->
    case F() of
        true -> ok;
        false -> receive after 100 -> wait(F, N - 1) end
    end.

rtt_row(Nodes, D) ->
    Proxies = start(Nodes, D, 10),
    {_, PA} = hd(Nodes),
    ok = wait(fun() -> maps:get(samples, maps:get(rtt, the_link(PA))) >= ?SAMPLES + 10 end),
    #{rtt := #{p50_ms := P50, p99_ms := P99, ewma_ms := E}} = the_link(PA),
    io:format("~8b ms ~9b ms ~7.2f ms ~7.2f ms ~7.2f ms ~7.2f ms~n", [D, 2 * D, P50, P99, E, P50 - 2 * D]),
    stop(Nodes, Proxies).

overhead(Nodes) ->
    Frame = byte_size(dspex_region_gateway:encode({ping, 1000000, erlang:monotonic_time()})) + 4,
    Run = fun(ProbeMs) ->
                  Proxies = start(Nodes, 0, ProbeMs),
                  ok = wait(fun() -> lists:all(fun({_, P}) -> maps:get(status, the_link(P)) =:= up end, Nodes) end),
                  S0 = [{peer:call(P, erlang, statistics, [runtime]), maps:get(samples, maps:get(rtt, the_link(P)))} || {_, P} <- Nodes],
                  T0 = erlang:monotonic_time(millisecond),
                  receive after 3000 -> ok end,
                  S1 = [{peer:call(P, erlang, statistics, [runtime]), maps:get(samples, maps:get(rtt, the_link(P)))} || {_, P} <- Nodes],
                  Ms = erlang:monotonic_time(millisecond) - T0,
                  Cpu = lists:sum([R1 - R0 || {{{R0, _}, _}, {{R1, _}, _}} <- lists:zip(S0, S1)]),
                  Probes = lists:sum([N1 - N0 || {{_, N0}, {_, N1}} <- lists:zip(S0, S1)]),
                  stop(Nodes, Proxies),
                  {Cpu, Probes, Ms}
          end,
    {CpuIdle, ProbesIdle, MsIdle} = Run(1000),
    {CpuBusy, ProbesBusy, MsBusy} = Run(2),
    %% runtime is in ms: per probe in µs, the idle run's rate scaled to the busy run's wall time
    Extra = CpuBusy - CpuIdle * MsBusy / MsIdle,
    PerProbe = 1000 * Extra / max(1, ProbesBusy - ProbesIdle),
    io:format("probe: ~b bytes per frame each way; ~b probes in ~b ms at probe_ms = 2 (both links), "
              "~.1f us CPU per probe (both nodes, ping and echo)~n", [Frame, ProbesBusy, MsBusy, PerProbe]).

%%% replication -------------------------------------------------------------------

replication(Nodes) ->
    [{_, PA}, {_, PB}] = Nodes,
    io:format("~n== dspex_region: cross-region replication, a -> b, 20 ms injected RTT (one-node clusters) ==~n", []),
    io:format("~-22s ~8s ~8s ~10s ~9s ~9s ~9s ~9s ~9s ~10s ~12s~n",
              ["mode", "writers", "writes", "writes/s", "lat p50", "lat p99", "lag p50", "lag p99", "lag max",
               "recs/batch", "CPU us/write"]),
    Proxies = start(Nodes, 10, 100, #{cluster => true}),
    try
        ok = wait(fun() -> lists:all(fun({_, P}) -> maps:get(status, the_link(P)) =:= up end, Nodes) end),
        ok = wait(fun() -> maps:get(samples, maps:get(rtt, the_link(PA))) >= 3 end),
        [rep_row(PA, PB, Mode, W, N) || Mode <- [async_primary_backup, sync_all], {W, N} <- [{1, 200}, {16, 100}, {64, 40}]]
    after
        stop(Nodes, Proxies)
    end.

rep_row(PA, PB, Mode, W, N) ->
    S = iolist_to_binary(io_lib:format("bench_~s_~b", [Mode, W])),
    #{primary_region := <<"a">>} = peer:call(PA, dspex_region, route_session, [S, #{}]),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    Keys = [<<"k", (integer_to_binary(I))/binary>> || I <- lists:seq(1, W)],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0, #{}]) || K <- Keys],
    ok = wait(fun() -> caught_up(PA) end),
    ok = peer:call(PA, dspex_region, set_replication, [Mode]),
    #{<<"b">> := #{batches := B0, records := R0}} = peer:call(PA, dspex_region_shipper, stats, []),
    ok = peer:call(PA, ?MODULE, sampler, []),
    Cpu0 = [peer:call(P, erlang, statistics, [runtime]) || P <- [PA, PB]],
    T0 = erlang:monotonic_time(microsecond),
    Lat = peer:call(PA, ?MODULE, writers, [S, Keys, N], 600000),
    Us = erlang:monotonic_time(microsecond) - T0,
    ok = wait(fun() -> caught_up(PA) end),
    Cpu1 = [peer:call(P, erlang, statistics, [runtime]) || P <- [PA, PB]],
    Lags = lists:sort(peer:call(PA, ?MODULE, sampler_stop, [])),
    #{<<"b">> := #{batches := B1, records := R1}} = peer:call(PA, dspex_region_shipper, stats, []),
    ok = peer:call(PA, dspex_region, set_replication, [async_primary_backup]),
    Writes = W * N,
    %% the nodes' CPU with no writes over the same wall time (probes, the
    %% lag sampler) is not the writes'
    ok = peer:call(PA, ?MODULE, sampler, []),
    Idle0 = [peer:call(P, erlang, statistics, [runtime]) || P <- [PA, PB]],
    receive after Us div 1000 -> ok end,
    Idle1 = [peer:call(P, erlang, statistics, [runtime]) || P <- [PA, PB]],
    _ = peer:call(PA, ?MODULE, sampler_stop, []),
    Idle = lists:sum([C1 - C0 || {{C0, _}, {C1, _}} <- lists:zip(Idle0, Idle1)]),
    CpuMs = max(0, lists:sum([C1 - C0 || {{C0, _}, {C1, _}} <- lists:zip(Cpu0, Cpu1)]) - Idle),
    Sorted = lists:sort(Lat),
    Pct = fun([], _) -> 0; (L, Q) -> dspex_region_link:percentile(L, Q) end,
    io:format("~-22w ~8b ~8b ~10.1f ~7.1fms ~7.1fms ~7bms ~7bms ~7bms ~10.1f ~12.1f~n",
              [Mode, W, Writes, Writes / (Us / 1.0e6), Pct(Sorted, 0.5) / 1000, Pct(Sorted, 0.99) / 1000,
               Pct(Lags, 0.5), Pct(Lags, 0.99), lists:max([0 | Lags]), (R1 - R0) / max(1, B1 - B0),
               1000 * CpuMs / Writes]).

caught_up(PA) ->
    case peer:call(PA, dspex_region_shipper, stats, []) of
        #{<<"b">> := #{lag_versions := 0}} -> true;
        _ -> false
    end.

%% on the primary: one writer per key, N sets each; every write's latency in us
writers(S, Keys, N) ->
    Me = self(),
    Pids = [spawn_link(fun() ->
                               Lat = [begin
                                          T0 = erlang:monotonic_time(microsecond),
                                          {ok, _} = dspex_store:set(S, K, I),
                                          erlang:monotonic_time(microsecond) - T0
                                      end || I <- lists:seq(1, N)],
                               Me ! {self(), Lat}
                       end) || K <- Keys],
    lists:append([receive {P, L} -> L end || P <- Pids]).

%% on the primary: the lag to b every 2 ms until stopped
sampler() ->
    register(dspex_region_bench_sampler, spawn(fun() -> sample([]) end)),
    ok.

sampler_stop() ->
    dspex_region_bench_sampler ! {stop, self()},
    receive {lags, L} -> L after 10000 -> [] end.

sample(Acc) ->
    receive
        {stop, To} -> To ! {lags, Acc}
    after 2 ->
        #{<<"b">> := #{lag_ms := Ms}} = dspex_region_shipper:stats(),
        sample([Ms | Acc])
    end.
