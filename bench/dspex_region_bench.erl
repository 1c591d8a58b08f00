%% @doc `make bench' (multi-region part): two regions, each a `peer' node,
%% linked in both directions through the delaying proxy of the tests
%% (test/dspex_region_proxy.erl, compiled into _build/bench). For injected
%% one-way delays of 0, 1, 5, 20 and 60 ms: the RTT each link measures (p50,
%% p99, EWMA over 64 samples) against the injected RTT. Then the probe's cost:
%% bytes per probe on the wire, and the CPU time of both nodes per probe
%% (runtime at probe_ms = 2 minus runtime at probe_ms = 1000 over the same
%% wall time, divided by the extra probes).
-module(dspex_region_bench).

-export([main/0]).

-define(PEER_ARGS, ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"]).
-define(SAMPLES, 64).

main() ->
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
        [rtt_row(Nodes, D) || D <- [0, 1, 5, 20, 60]],
        overhead(Nodes)
    after
        [catch peer:stop(P) || {_, P} <- Nodes]
    end,
    ok.

%% both regions started with links through proxies of one-way delay D
start(Nodes, D, ProbeMs) ->
    Proxies = [{Name, begin {ok, Pr} = dspex_region_proxy:start(undefined, D), Pr end} || {Name, _} <- Nodes],
    [begin
         [Other] = [N || {N, _} <- Nodes, N =/= Name],
         Outbound = proplists:get_value(Name, Proxies),
         RC = #{name => Name, coords => {0, 0}, listen => {{127, 0, 0, 1}, 0}, probe_ms => ProbeMs, window => ?SAMPLES,
                peers => [#{name => Other, coords => {0, 0}, gateway => {{127, 0, 0, 1}, dspex_region_proxy:port(Outbound)}}],
                backoff_min_ms => 20, backoff_max_ms => 200},
         ok = peer:call(P, application, set_env, [dspex_bridge, region, RC]),
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
