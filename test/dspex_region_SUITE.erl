%% Common Test: three regions, each one `peer' node (reg_a, reg_b, reg_c)
%% running dspex_bridge with a `region' configuration, linked gateway to
%% gateway through delaying TCP proxies (dspex_region_proxy, run by this
%% node): a<->b 5 ms, b<->c 20 ms, a<->c 60 ms one-way, one proxy per
%% direction of each link. Measured RTTs, routing by distance and by
%% measured latency with weights, stability, and a link flap; every case runs
%% twice: in plain TCP (group `plain') and with mutual TLS between the
%% gateways (group `tls', certificates made by `openssl' in a temporary
%% directory).
-module(dspex_region_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, init_per_group/2, end_per_group/2]).
-export([measured_rtt_matches_the_injected_delay/1, routes_to_the_nearest_region_by_coordinates/1,
         routes_to_the_lowest_measured_rtt_without_coordinates/1,
         a_link_flap_is_reported_down_then_up_and_probes_resume/1,
         a_backup_cut_off_from_the_majority_does_not_take_over/1,
         a_client_write_in_a_backup_region_is_refused/1,
         a_backup_whose_own_link_is_down_but_hears_the_primary_does_not_take_over/1,
         topology_and_prometheus_report_every_link/1]).
-export([async_replication_converges_in_order_with_lag_bounded/1,
         a_session_routed_after_its_creation_is_copied_whole/1,
         a_change_larger_than_a_frame_travels_in_parts/1,
         sync_all_acknowledged_writes_are_in_every_backup_one_round_trip_per_batch/1,
         sync_all_times_out_naming_the_region_that_did_not_answer/1,
         a_link_flap_converges_without_duplicate_or_reordered_apply/1,
         a_read_in_a_backup_returns_the_lag_and_read_primary_forwards/1,
         move_session_moves_the_primary_and_the_old_one_refuses_writes/1,
         a_move_survives_the_death_of_its_shipper/1,
         late_changes_of_the_old_primary_are_fenced_and_reported/1,
         an_unreachable_primary_region_fails_over_to_its_first_backup/1,
         sync_all_acknowledged_writes_survive_kill_9_of_the_primary_region/1,
         async_writes_lost_in_a_kill_9_are_a_suffix_within_the_measured_lag/1,
         a_session_expired_by_ttl_in_the_primary_is_deleted_in_its_backups/1]).
-export([concurrent_sets/3, set_with_lag/3]).
%% run on the peers
-export([collector_start/0, collector_get/0]).

-define(REGIONS, [{a, <<"a">>, {50.11, 8.68}},      % Frankfurt
                  {b, <<"b">>, {51.51, -0.13}},     % London
                  {c, <<"c">>, {40.71, -74.01}}]).  % New York
-define(PROBE_MS, 20).
-define(WINDOW, 32).

all() -> [{group, plain}, {group, tls}, {group, replication}, {group, replication_async_kill}].

groups() -> [{plain, [sequence], cases()}, {tls, [sequence], cases()},
             {replication, [sequence], replication_cases()},
             %% regions of their own: region a is killed
             {replication_async_kill, [sequence], [async_writes_lost_in_a_kill_9_are_a_suffix_within_the_measured_lag]}].

%% cross-region replication: each region a one-node cluster, plain TCP
replication_cases() ->
    [async_replication_converges_in_order_with_lag_bounded, a_session_routed_after_its_creation_is_copied_whole,
     a_change_larger_than_a_frame_travels_in_parts,
     sync_all_acknowledged_writes_are_in_every_backup_one_round_trip_per_batch,
     sync_all_times_out_naming_the_region_that_did_not_answer,
     a_link_flap_converges_without_duplicate_or_reordered_apply,
     a_read_in_a_backup_returns_the_lag_and_read_primary_forwards,
     move_session_moves_the_primary_and_the_old_one_refuses_writes,
     a_move_survives_the_death_of_its_shipper,
     late_changes_of_the_old_primary_are_fenced_and_reported,
     an_unreachable_primary_region_fails_over_to_its_first_backup,
     a_backup_cut_off_from_the_majority_does_not_take_over,
     a_client_write_in_a_backup_region_is_refused,
     a_backup_whose_own_link_is_down_but_hears_the_primary_does_not_take_over,
     a_session_expired_by_ttl_in_the_primary_is_deleted_in_its_backups,
     %% last: region a is gone after it
     sync_all_acknowledged_writes_survive_kill_9_of_the_primary_region].

cases() ->
    [measured_rtt_matches_the_injected_delay, routes_to_the_nearest_region_by_coordinates,
     routes_to_the_lowest_measured_rtt_without_coordinates, topology_and_prometheus_report_every_link,
     a_link_flap_is_reported_down_then_up_and_probes_resume].

%% one-way delay of the link between two regions
delay(X, Y) when X > Y -> delay(Y, X);
delay(a, b) -> 5;
delay(b, c) -> 20;
delay(a, c) -> 60.

%% reg_c prefers a over b (weight 4 on b's cost)
weights(c) -> #{<<"b">> => 4.0};
weights(_) -> #{}.

init_per_group(plain, Config) -> start_regions(undefined, Config);
init_per_group(replication, Config) -> start_regions(undefined, [{replication, true} | Config]);
init_per_group(replication_async_kill, Config) -> start_regions(undefined, [{replication, true} | Config]);
init_per_group(tls, Config) ->
    Dir = filename:join(os:getenv("TMPDIR", "/tmp"), "dspex_region_ct_" ++ os:getpid() ++ "_" ++
                            integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Dir),
    ok = file:write_file(filename:join(Dir, "ext"), "subjectAltName=IP:127.0.0.1\n"),
    [begin
         Out = os:cmd("cd " ++ Dir ++ " && " ++ Cmd ++ " >/dev/null 2>&1; echo $?"),
         "0\n" = Out
     end || Cmd <- ["openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
                    "-keyout ca.key -out ca.pem -subj /CN=dspex-region-ct-ca",
                    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                    "-keyout region.key -out region.csr -subj /CN=region",
                    "openssl x509 -req -in region.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
                    "-extfile ext -out region.pem"]],
    F = fun(N) -> filename:join(Dir, N) end,
    start_regions(#{certfile => F("region.pem"), keyfile => F("region.key"), cacertfile => F("ca.pem")},
                  [{tls_dir, Dir} | Config]).

end_per_group(_, Config) ->
    [catch peer:stop(P) || P <- maps:values(?config(peers, Config))],
    [catch dspex_region_proxy:stop(P) || P <- maps:values(?config(proxies, Config))],
    _ = [file:del_dir_r(D) || D <- [?config(tls_dir, Config)], D =/= undefined],
    ok.

start_regions(Tls, Config) ->
    Pairs = [{X, Y} || {X, _, _} <- ?REGIONS, {Y, _, _} <- ?REGIONS, X =/= Y],
    Proxies = maps:from_list([{XY, begin {ok, P} = dspex_region_proxy:start(undefined, delay(X, Y)), P end}
                              || {X, Y} = XY <- Pairs]),
    Host = hd(string:split(net_adm:localhost(), ".")),
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    Peers = maps:from_list(
              [{X, begin
                       {ok, P, _} = peer:start(#{name => "reg_" ++ atom_to_list(X) ++ "_" ++ os:getpid(), host => Host,
                                                 %% (named after this OS process: other runs on the machine use reg_a too)
                                                 connection => standard_io,
                                                 args => ["-setcookie", "dspex_region_ct", "-connect_all", "false",
                                                          "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"
                                                          | Paths]}),
                       P
                   end} || {X, _, _} <- ?REGIONS]),
    [begin
         P = maps:get(X, Peers),
         ok = peer:call(P, application, load, [dspex_bridge]),
         %% nothing on disk, no fixed ports shared by the three nodes
         [ok = peer:call(P, application, set_env, [dspex_bridge, K, V])
          || {K, V} <- [{event_log, false}, {grpc_enabled, false}, {console_enabled, false},
                        {prometheus_port, 0}]],
         RC = #{name => Name, coords => Coords, listen => {{127, 0, 0, 1}, 0},
                peers => [#{name => YName, coords => YCoords,
                            gateway => {{127, 0, 0, 1}, dspex_region_proxy:port(maps:get({X, Y}, Proxies))}}
                          || {Y, YName, YCoords} <- ?REGIONS, Y =/= X],
                weights => weights(X), probe_ms => ?PROBE_MS, window => ?WINDOW,
                down_after_ms => 500, backoff_min_ms => 20, backoff_max_ms => 200},
         RC1 = case Tls of undefined -> RC; _ -> RC#{tls => Tls} end,
         _ = case ?config(replication, Config) of
                 true ->
                     %% a region is a cluster: here of one node, whose writer ships to the backups
                     ok = peer:call(P, application, set_env,
                                    [dspex_bridge, cluster, #{nodes => [peer:call(P, erlang, node, [])], replicas => 0}]);
                 _ -> ok
             end,
         RC2 = case ?config(replication, Config) of
                   true -> RC1#{sync_timeout_ms => 2000, repl_window => 2, region_failover_ms => 1000};
                   _ -> RC1
               end,
         ok = peer:call(P, application, set_env, [dspex_bridge, region, RC2]),
         {ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge])
     end || {X, Name, Coords} <- ?REGIONS],
    %% each proxy X->Y forwards to Y's gateway
    [ok = dspex_region_proxy:set_target(Proxy, peer:call(maps:get(Y, Peers), dspex_region, gateway_port, []))
     || {{_, Y}, Proxy} <- maps:to_list(Proxies)],
    [ok = wait_until(fun() -> all_up(P) end, 20000, {links_up, X}) || {X, P} <- maps:to_list(Peers)],
    [{peers, Peers}, {proxies, Proxies} | Config].

%%% cases ------------------------------------------------------------------------

measured_rtt_matches_the_injected_delay(Config) ->
    Peers = ?config(peers, Config),
    %% a full window of samples on every link
    [ok = wait_until(fun() -> lists:all(fun(#{rtt := #{samples := N}}) -> N >= 2 * ?WINDOW end,
                                        maps:values(maps:get(peers, topology(P))))
                     end, 60000, {samples, X})
     || {X, P} <- maps:to_list(Peers)],
    Rows = fun() ->
                   [{X, Y, 2 * delay(X, Y), maps:get(rtt, maps:get(atom_to_binary(Y), maps:get(peers, topology(maps:get(X, Peers)))))}
                    || {X, _, _} <- ?REGIONS, {Y, _, _} <- ?REGIONS, X =/= Y]
           end,
    %% within 10% of the injected RTT, plus 2 ms (loopback and scheduling add
    %% a fraction of a ms when idle). A load spike on a shared 2-core machine
    %% can hold a window's p50 above that for a while, so the window gets the
    %% time to slide past it; a wrong measurement never converges.
    Within = fun() -> [R || {_, _, Inj, #{p50_ms := P50}} = R <- Rows(), abs(P50 - Inj) > 0.1 * Inj + 2.0] end,
    try wait_until(fun() -> Within() =:= [] end, 60000, rtt_within)
    catch exit:_ -> ?assertEqual([], Within())
    end,
    Final = Rows(),
    [ct:pal("~s -> ~s: injected RTT ~b ms, measured p50 ~.2f ewma ~.2f p99 ~.2f ms (~b samples)",
            [X, Y, Inj, P50, E, P99, N])
     || {X, Y, Inj, #{p50_ms := P50, ewma_ms := E, p99_ms := P99, samples := N}} <- Final],
    %% never below what was injected: the delay is real, not a number (load
    %% only adds to it)
    [?assert(P50 >= Inj - 1.0, {X, Y, Inj, P50}) || {X, Y, Inj, #{p50_ms := P50}} <- Final].

routes_to_the_nearest_region_by_coordinates(Config) ->
    #{a := PA, c := PC} = ?config(peers, Config),
    NewYork = {40.0, -75.0}, Paris = {48.86, 2.35},
    #{primary_region := <<"c">>, backup_regions := [<<"b">>, <<"a">>], policy := nearest} = D1 =
        peer:call(PA, dspex_region, route_session, [<<"s_ny">>, #{client_location => NewYork}]),
    %% Paris: London (344 km) before Frankfurt (479 km)
    #{primary_region := <<"b">>, backup_regions := [<<"a">>, <<"c">>]} =
        peer:call(PA, dspex_region, route_session, [<<"s_paris">>, #{client_location => Paris}]),
    %% reg_c weighs b's cost 4x: Frankfurt wins
    #{primary_region := <<"a">>, backup_regions := [<<"b">>, <<"c">>]} =
        peer:call(PC, dspex_region, route_session, [<<"s_paris">>, #{client_location => Paris}]),
    %% stable: the same session keeps its decision, whatever is asked later
    ?assertEqual(D1, peer:call(PA, dspex_region, route_session, [<<"s_ny">>, #{client_location => Paris}])),
    ?assertEqual(D1, peer:call(PA, dspex_region, route_session, [<<"s_ny">>, #{}])),
    ?assertMatch({error, {invalid_argument, _}},
                 peer:call(PA, dspex_region, route_session, [<<"s_bad">>, #{client_location => {91, 0}}])).

routes_to_the_lowest_measured_rtt_without_coordinates(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    %% the own region costs 0; then by measured RTT (a-b 10 ms, b-c 40, a-c 120)
    #{primary_region := <<"a">>, backup_regions := [<<"b">>, <<"c">>], policy := lowest_rtt} =
        peer:call(PA, dspex_region, route_session, [<<"s_rtt">>, #{}]),
    #{primary_region := <<"b">>, backup_regions := [<<"a">>, <<"c">>]} =
        peer:call(PB, dspex_region, route_session, [<<"s_rtt">>, #{}]),
    %% reg_c: b at 40 ms x 4 = 160 comes after a at 120
    #{primary_region := <<"c">>, backup_regions := [<<"a">>, <<"b">>]} = D =
        peer:call(PC, dspex_region, route_session, [<<"s_rtt">>, #{}]),
    ?assertEqual(D, peer:call(PC, dspex_region, route_session, [<<"s_rtt">>, #{}])).

topology_and_prometheus_report_every_link(Config) ->
    #{a := PA} = ?config(peers, Config),
    #{region := <<"a">>, peers := #{<<"b">> := B, <<"c">> := C}, sessions := Own, transport := Transport} = topology(PA),
    ?assertEqual(case ?config(tls_dir, Config) of undefined -> tcp; _ -> tls end, Transport),
    ?assert(Own >= 1),
    [?assertMatch(#{status := up, last_check_at := T, rtt := #{samples := N}} when is_integer(T) andalso N > 0, L)
     || L <- [B, C]],
    ?assert(maps:get(sessions, C) >= 1),
    Text = iolist_to_binary(peer:call(PA, dspex_prometheus, render, [])),
    [?assertNotEqual(nomatch, binary:match(Text, S), S)
     || S <- [<<"dspex_region_link_up{region=\"a\",peer=\"b\"} 1">>,
              <<"dspex_region_link_up{region=\"a\",peer=\"c\"} 1">>,
              <<"dspex_region_rtt_seconds{region=\"a\",peer=\"c\",quantile=\"0.5\"} 0.1">>,
              <<"dspex_region_rtt_seconds_count{region=\"a\",peer=\"b\"} ">>]].

a_link_flap_is_reported_down_then_up_and_probes_resume(Config) ->
    #{a := PA} = ?config(peers, Config),
    Proxy = maps:get({a, c}, ?config(proxies, Config)),
    ok = peer:call(PA, ?MODULE, collector_start, []),
    %% a session routed to c, from a client near New York
    #{primary_region := <<"c">>} = peer:call(PA, dspex_region, route_session, [<<"s_flap">>, #{client_location => {40.0, -75.0}}]),
    ok = dspex_region_proxy:drop(Proxy),
    ok = wait_until(fun() -> status(PA, <<"c">>) =:= down end, 10000, link_down),
    %% c is unreachable from here: the session goes to the next healthy region
    #{primary_region := <<"b">>, backup_regions := [<<"a">>]} = Moved =
        peer:call(PA, dspex_region, route_session, [<<"s_flap">>, #{client_location => {40.0, -75.0}}]),
    #{rtt := #{samples := Before}} = maps:get(<<"c">>, maps:get(peers, topology(PA))),
    ok = dspex_region_proxy:restore(Proxy),
    ok = wait_until(fun() -> status(PA, <<"c">>) =:= up end, 10000, link_up),
    %% probes resume, and measure the same delay again
    ok = wait_until(fun() -> samples(PA, <<"c">>) >= Before + 5 end, 10000, probes_resume),
    %% ... with the same delay: a probe of the restored link measures about
    %% 120 ms again (polled: one probe delayed by a load spike measures more,
    %% never less)
    LastMs = fun() -> maps:get(last_ms, maps:get(rtt, maps:get(<<"c">>, maps:get(peers, topology(PA))))) end,
    try wait_until(fun() -> L = LastMs(), L >= 118.5 andalso L < 120 * 1.1 + 20 end, 30000, same_delay)
    catch exit:_ -> ?assertEqual(in_range, LastMs())
    end,
    ?assert(LastMs() >= 118.5),
    %% the moved session stays where it was moved
    ?assertEqual(Moved, peer:call(PA, dspex_region, route_session, [<<"s_flap">>, #{}])),
    %% telemetry: down, then up, for the link to c only
    Events = [{Ev, Peer} || {[dspex, region, link, Ev], _, #{peer := Peer}} <- peer:call(PA, ?MODULE, collector_get, [])],
    ?assertEqual([{down, <<"c">>}, {up, <<"c">>}], Events),
    [Route] = [M || {[dspex, region, route], _, #{session := <<"s_flap">>} = M} <- peer:call(PA, ?MODULE, collector_get, []),
                    maps:get(reason, M) =:= failover],
    ?assertMatch(#{primary_region := <<"b">>}, Route).

%%% replication ------------------------------------------------------------------------

%% a session routed from a (own region first: backups b at 10 ms RTT, c at 120 ms)
routed_at_a(PA, S) ->
    %% (a case before may have cut a link: both back up first)
    ok = wait_until(fun() -> all_up(PA) end, 20000, links_up),
    #{primary_region := <<"a">>, backup_regions := [<<"b">>, <<"c">>]} =
        peer:call(PA, dspex_region, route_session, [S, #{}]).

%% a session routed at a, with integer variables Keys (0), replicated to b and c
replicated_at_a(#{a := PA, b := PB, c := PC}, S, Keys) ->
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0, #{}]) || K <- Keys],
    wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated).

seq(P, S) -> element(3, peer:call(P, dspex_cluster_replica, row, [S])).

applied(P, S) -> peer:call(P, dspex_region_receiver, row, [S]).

repl(P, Peer) -> maps:get(replication, maps:get(Peer, maps:get(peers, topology(P)))).

history(P, S, K) ->
    {ok, H} = peer:call(P, dspex_store, history, [S, K, all]),
    [{maps:get(version, E), maps:get(value, E)} || E <- H].

converged(PA, Backups, S) ->
    Seq = seq(PA, S),
    lists:all(fun(P) -> maps:get(seq, applied(P, S)) =:= Seq end, Backups).

async_replication_converges_in_order_with_lag_bounded(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_async">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 200)],
    %% acknowledged after the local commit: the backups follow
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, converged),
    Seq = seq(PA, S),
    ?assertEqual(202, Seq),   % create, register, 200 sets
    %% every change applied once, in order (a replay must reach the version
    %% the primary reached), no full copy needed
    [?assertMatch(#{applies := Seq, full_copies := 0, primary := <<"a">>}, applied(P, S)) || P <- [PB, PC]],
    [?assertEqual(history(PA, S, <<"k">>), history(P, S, <<"k">>)) || P <- [PB, PC]],
    [?assertMatch({ok, #{value := 200, version := 200}}, peer:call(P, dspex_store, get, [S, <<"k">>])) || P <- [PB, PC]],
    %% the lag, measured at the primary, goes back to nothing once the acks are in
    [ok = wait_until(fun() -> case repl(PA, R) of #{lag_versions := 0, lag_ms := 0} -> true; _ -> false end end,
                     10000, {lag, R}) || R <- [<<"b">>, <<"c">>]],
    %% the backups adopted the primary's decision
    ?assertMatch(#{primary_region := <<"a">>}, peer:call(PC, dspex_region, route_session, [S, #{}])),
    Text = iolist_to_binary(peer:call(PA, dspex_prometheus, render, [])),
    ?assertNotEqual(nomatch, binary:match(Text, <<"dspex_region_replication_lag_versions{region=\"a\",peer=\"c\"} 0">>)).

a_session_routed_after_its_creation_is_copied_whole(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_late">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 5)],
    routed_at_a(PA, S),
    {ok, 6} = peer:call(PA, dspex_store, set, [S, <<"k">>, 6]),
    %% the backups miss the first changes: the gap brings one full copy
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, converged),
    [?assertMatch(#{full_copies := 1}, applied(P, S)) || P <- [PB, PC]],
    [?assertEqual(history(PA, S, <<"k">>), history(P, S, <<"k">>)) || P <- [PB, PC]].

a_change_larger_than_a_frame_travels_in_parts(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_big">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    %% frames are at most 64 KiB: a 200 KB registration (a full copy) and a
    %% 300 KB set each leave as several frames, reassembled by the gateway
    Big1 = binary:copy(<<"x">>, 200000),
    Big2 = binary:copy(<<"y">>, 300000),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"big">>, string, Big1, #{}]),
    {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"big">>, Big2]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, converged),
    [?assertMatch({ok, #{value := Big2, version := 1}}, peer:call(P, dspex_store, get, [S, <<"big">>])) || P <- [PB, PC]],
    [?assertMatch(#{applies := 3, full_copies := 0}, applied(P, S)) || P <- [PB, PC]].

sync_all_acknowledged_writes_are_in_every_backup_one_round_trip_per_batch(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_sync">>,
    Keys = [<<"k", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 20)],
    ok = replicated_at_a(?config(peers, Config), S, Keys),
    #{batches := B0} = repl(PA, <<"c">>),
    ok = peer:call(PA, dspex_region, set_replication, [sync_all]),
    try
        %% 20 writers, 10 sets each, concurrently
        Acked = peer:call(PA, ?MODULE, concurrent_sets, [S, Keys, 10], 60000),
        ?assertEqual(200, length(Acked)),
        %% read at once, no waiting: every acknowledged write is in both backups
        [begin
             Final = lists:max([V || {K1, {ok, V}} <- Acked, K1 =:= K]),
             [?assertMatch({ok, #{version := Final}}, peer:call(P, dspex_store, get, [S, K])) || P <- [PB, PC]]
         end || K <- Keys],
        %% group commit: concurrent writes shared batches (at most repl_window,
        %% here 2, in flight), far fewer round trips to c than writes
        #{batches := B1} = repl(PA, <<"c">>),
        ct:pal("sync_all: 200 writes to c in ~b batches", [B1 - B0]),
        ?assert(B1 - B0 < 100, B1 - B0)
    after
        ok = peer:call(PA, dspex_region, set_replication, [async_primary_backup])
    end.

%% on a peer: Keys' writers, N sets each; every answer
concurrent_sets(S, Keys, N) ->
    Me = self(),
    Pids = [spawn_link(fun() ->
                               Me ! {self(), [{K, dspex_store:set(S, K, I)} || I <- lists:seq(1, N)]}
                       end) || K <- Keys],
    lists:append([receive {P, R} -> R end || P <- Pids]).

sync_all_times_out_naming_the_region_that_did_not_answer(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxy = maps:get({a, c}, ?config(proxies, Config)),
    S = <<"r_timeout">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    ok = peer:call(PA, dspex_region, set_replication, [sync_all]),
    try
        ok = dspex_region_proxy:drop(Proxy),
        ok = wait_until(fun() -> status(PA, <<"c">>) =:= down end, 10000, link_down),
        %% committed in a and b, c cannot answer: sync_timeout_ms (2 s) later
        ?assertEqual({error, {region_timeout, [<<"c">>]}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 1], 30000)),
        ?assertMatch({ok, #{value := 1}}, peer:call(PB, dspex_store, get, [S, <<"k">>])),
        ?assertMatch(#{lag_versions := N} when N >= 1, repl(PA, <<"c">>)),
        ok = dspex_region_proxy:restore(Proxy),
        %% still shipped once c is back
        ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, converged),
        ?assertMatch({ok, #{value := 1}}, peer:call(PC, dspex_store, get, [S, <<"k">>]))
    after
        ok = peer:call(PA, dspex_region, set_replication, [async_primary_backup]),
        dspex_region_proxy:restore(Proxy)
    end.

a_link_flap_converges_without_duplicate_or_reordered_apply(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxy = maps:get({a, c}, ?config(proxies, Config)),
    S = <<"r_flap">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 100)],
    %% dropped while batches to c (120 ms RTT) are in flight
    ok = dspex_region_proxy:drop(Proxy),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(101, 200)],
    ok = wait_until(fun() -> status(PA, <<"c">>) =:= down end, 10000, link_down),
    ok = dspex_region_proxy:restore(Proxy),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 30000, converged),
    Seq = seq(PA, S),
    %% batches sent again after the flap: repeats ignored, nothing applied twice or out of order
    [?assertMatch(#{applies := Seq, full_copies := 0}, applied(P, S)) || P <- [PB, PC]],
    [?assertEqual(history(PA, S, <<"k">>), history(P, S, <<"k">>)) || P <- [PB, PC]].

a_read_in_a_backup_returns_the_lag_and_read_primary_forwards(Config) ->
    #{a := PA, b := PB} = ?config(peers, Config),
    Proxy = maps:get({a, b}, ?config(proxies, Config)),
    S = <<"r_read">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 7, #{}]),
    ok = wait_until(fun() -> converged(PA, [PB], S) end, 20000, converged),
    ?assertMatch({ok, #{value := 7}, #{region := <<"b">>, primary_region := <<"a">>, lag_versions := 0, lag_ms := 0}},
                 peer:call(PB, dspex_region, get, [S, <<"k">>, #{read => local}])),
    %% the primary's own copy has no lag
    ?assertMatch({ok, #{value := 7}, #{region := <<"a">>, lag_versions := 0, lag_ms := 0}},
                 peer:call(PA, dspex_region, get, [S, <<"k">>, #{}])),
    %% a -> b cut: b keeps serving its copy, with a growing lag
    ok = dspex_region_proxy:drop(Proxy),
    try
        {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"k">>, 8]),
        ok = wait_until(fun() ->
                                {ok, #{value := 7}, #{lag_ms := Ms}} = peer:call(PB, dspex_region, get, [S, <<"k">>, #{}]),
                                Ms > 0
                        end, 10000, lag_grows),
        %% read => primary: forwarded over b's own link to a
        ?assertMatch({ok, #{value := 8}, #{region := <<"a">>, lag_versions := 0}}, read_primary(PB, S, <<"k">>))
    after
        dspex_region_proxy:restore(Proxy)
    end,
    ok = wait_until(fun() -> converged(PA, [PB], S) end, 20000, converged),
    ?assertMatch({ok, #{value := 8}, #{lag_versions := 0}}, peer:call(PB, dspex_region, get, [S, <<"k">>, #{}])).

move_session_moves_the_primary_and_the_old_one_refuses_writes(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_move">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 10)],
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    ?assertEqual({error, {not_primary, <<"a">>}}, peer:call(PB, dspex_region, move_session, [S, <<"c">>])),
    ok = peer:call(PA, dspex_region, move_session, [S, <<"b">>]),
    %% the old primary refuses writes (and local reads) with a redirect
    ?assertEqual({error, {region_moved, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 99])),
    ?assertEqual({error, {region_moved, <<"b">>}}, peer:call(PA, dspex_region, get, [S, <<"k">>, #{}])),
    ?assertEqual({error, {not_primary, <<"b">>}}, peer:call(PA, dspex_region, move_session, [S, <<"c">>])),
    %% b is the primary, in a higher region epoch, c its backup
    ?assertMatch(#{primary_region := <<"b">>, backup_regions := [<<"c">>], policy := moved, region_epoch := 1},
                 peer:call(PB, dspex_region, route_session, [S, #{}])),
    ?assertMatch({ok, #{value := 10, version := 10}}, peer:call(PB, dspex_store, get, [S, <<"k">>])),
    [{ok, I} = peer:call(PB, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(11, 20)],
    %% c follows b: a full copy at the new region epoch, then b's changes
    ok = wait_until(fun() -> converged(PB, [PC], S) end, 20000, converged),
    ?assertMatch(#{region_epoch := 1, primary := <<"b">>}, applied(PC, S)),
    ?assertEqual(history(PB, S, <<"k">>), history(PC, S, <<"k">>)),
    ?assertMatch({ok, #{value := 20}}, peer:call(PC, dspex_store, get, [S, <<"k">>])),
    ?assertMatch(#{primary_region := <<"b">>}, peer:call(PC, dspex_region, route_session, [S, #{}])),
    %% a's reads go to the new primary
    ?assertMatch({ok, #{value := 20}, #{region := <<"b">>}}, read_primary(PA, S, <<"k">>)).

%% a's shipper is killed while the copy of a move to b waits in its queue
%% (the shipper is held while the move's call reaches it, a -> b is cut, then
%% it queues the copy): its supervisor starts it again (and, rest_for_one,
%% a's gateway, on a new port, and links); once a -> b is back, the new
%% shipper sends the copy: b installs the session, is its primary at region
%% epoch 1 and takes writes, c follows b, a still refuses writes with
%% region_moved and no longer holds the move as pending. Before, the copy
%% went with the shipper: b never got the session.
a_move_survives_the_death_of_its_shipper(Config) ->
    #{a := PA, b := PB, c := PC} = Peers = ?config(peers, Config),
    Proxies = ?config(proxies, Config),
    Proxy = maps:get({a, b}, Proxies),
    S = <<"r_move_restart">>,
    ok = replicated_at_a(Peers, S, [<<"k">>]),
    {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"k">>, 1]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    Sh = peer:call(PA, erlang, whereis, [dspex_region_shipper]),
    Gw = peer:call(PA, erlang, whereis, [dspex_region_gateway]),
    ok = peer:call(PA, sys, suspend, [Sh]),
    Self = self(),
    _ = spawn(fun() -> Self ! {moved, catch peer:call(PA, dspex_region, move_session, [S, <<"b">>], 30000)} end),
    try
        %% the move is recorded (a refuses writes) and its call waits at the shipper
        ok = wait_until(fun() ->
                                {messages, Ms} = peer:call(PA, erlang, process_info, [Sh, messages]),
                                lists:any(fun({'$gen_call', _, {move, S1, <<"b">>}}) -> S1 =:= S; (_) -> false end, Ms)
                        end, 10000, move_call_waits),
        ?assertEqual({error, {region_moved, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 99])),
        %% a -> b cut (nothing sent from now on reaches b), then the copy is queued
        ok = dspex_region_proxy:drop(Proxy),
        ok = peer:call(PA, sys, resume, [Sh]),
        ok = wait_until(fun() -> case repl(PA, <<"b">>) of
                                     #{link := down, lag_versions := N} when N >= 1 -> true;
                                     _ -> false
                                 end
                        end, 10000, copy_queued),
        ?assertEqual(<<"b">>, peer:call(PA, dspex_region, moving, [S])),
        true = peer:call(PA, erlang, exit, [Sh, kill]),
        %% the shipper died during the call (or its sync_timeout_ms passed first)
        Moved = receive {moved, M} -> M after 30000 -> timeout end,
        ct:pal("move_session while its shipper was killed: ~p", [Moved]),
        ?assert(lists:member(Moved, [{error, {region_unavailable, <<"b">>}}, {error, {region_timeout, [<<"b">>]}}]),
                Moved),
        %% the copy went with it: b has not got it
        ?assertMatch(#{primary_region := <<"a">>}, peer:call(PB, dspex_region, decision, [S])),
        ?assertEqual({error, {region_moved, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 99]))
    after
        %% a -> b back at once: b hears a again (a's gateway restarts on a new
        %% port, cutting b's link to a until the proxies follow it: a b that
        %% heard nothing from a for region_failover_ms would take S over)
        dspex_region_proxy:restore(Proxy)
    end,
    %% started again: b and c reach a's new gateway
    ok = wait_until(fun() ->
                            case peer:call(PA, erlang, whereis, [dspex_region_gateway]) of
                                G when is_pid(G), G =/= Gw -> is_integer(peer:call(PA, dspex_region, gateway_port, []));
                                _ -> false
                            end
                    end, 10000, gateway_again),
    Port = peer:call(PA, dspex_region, gateway_port, []),
    [ok = dspex_region_proxy:set_target(maps:get({X, a}, Proxies), Port) || X <- [b, c]],
    ?assertNotEqual(Sh, peer:call(PA, erlang, whereis, [dspex_region_shipper])),
    %% the new shipper's copy reaches b, which becomes the primary
    ok = wait_until(fun() ->
                            case peer:call(PB, dspex_region, decision, [S]) of
                                #{primary_region := <<"b">>, region_epoch := 1, policy := moved} -> true;
                                _ -> false
                            end
                    end, 20000, b_is_the_primary),
    ?assertMatch(#{primary_region := <<"b">>, backup_regions := [<<"c">>]},
                 peer:call(PB, dspex_region, route_session, [S, #{}])),
    ?assertMatch({ok, #{value := 1, version := 1}}, peer:call(PB, dspex_store, get, [S, <<"k">>])),
    {ok, 2} = peer:call(PB, dspex_store, set, [S, <<"k">>, 2]),
    ?assertEqual({error, {region_moved, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 99])),
    %% the acknowledgement reached a: the move is done there
    ok = wait_until(fun() -> peer:call(PA, dspex_region, moving, [S]) =:= undefined end, 20000, move_done),
    ok = wait_until(fun() -> maps:get(region_epoch, applied(PC, S)) =:= 1 andalso converged(PB, [PC], S) end,
                    20000, c_follows_b),
    ?assertMatch({ok, #{value := 2}}, peer:call(PC, dspex_store, get, [S, <<"k">>])),
    %% every link up again (b's and c's to a go through the proxies set above)
    [ok = wait_until(fun() -> all_up(P) end, 20000, {links_up, X}) || {X, P} <- maps:to_list(Peers)].

late_changes_of_the_old_primary_are_fenced_and_reported(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxy = maps:get({a, c}, ?config(proxies, Config)),
    S = <<"r_fence">>,
    ok = replicated_at_a(?config(peers, Config), S, [<<"k">>]),
    %% a's changes for c wait in a's queue (a -> c cut) while the session moves to b
    ok = dspex_region_proxy:drop(Proxy),
    try
        ok = wait_until(fun() -> status(PA, <<"c">>) =:= down end, 10000, link_down),
        [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 5)],
        ok = peer:call(PA, dspex_region, move_session, [S, <<"b">>]),
        %% c takes b's copy, at region epoch 1
        ok = wait_until(fun() -> maps:get(region_epoch, applied(PC, S)) =:= 1 end, 20000, copy_from_b),
        ?assertMatch({ok, #{value := 5}}, peer:call(PC, dspex_store, get, [S, <<"k">>])),
        {ok, 6} = peer:call(PB, dspex_store, set, [S, <<"k">>, 60])
    after
        dspex_region_proxy:restore(Proxy)
    end,
    %% a's late changes (region epoch 0) reach c: refused and counted, never applied
    ok = wait_until(fun() -> maps:get(fenced, applied(PC, S)) >= 1 end, 20000, fenced),
    ok = wait_until(fun() -> converged(PB, [PC], S) end, 20000, converged),
    ?assertEqual(history(PB, S, <<"k">>), history(PC, S, <<"k">>)),
    ?assertMatch({ok, #{value := 60, version := 6}}, peer:call(PC, dspex_store, get, [S, <<"k">>])),
    ok = wait_until(fun() -> case repl(PA, <<"c">>) of #{lag_versions := 0} -> true; _ -> false end end,
                    20000, a_queue_drained).

an_unreachable_primary_region_fails_over_to_its_first_backup(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxies = ?config(proxies, Config),
    Cut = [maps:get(XY, Proxies) || XY <- [{a, b}, {b, a}, {a, c}, {c, a}]],
    S = <<"r_failover">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    [{ok, I} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 5)],
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    [ok = peer:call(P, ?MODULE, collector_start, []) || P <- [PB, PC]],
    %% a cut off from both other regions
    [ok = dspex_region_proxy:drop(P) || P <- Cut],
    %% a, alone, still takes a write (async) before it notices: it will
    %% be refused later
    {ok, 6} = peer:call(PA, dspex_store, set, [S, <<"k">>, 666]),
    Late = seq(PA, S),
    try
        %% a fences itself once it has been without a majority for
        %% region_failover_ms / 2: its clients' writes are refused, reads served
        ok = wait_until(fun() -> peer:call(PA, dspex_region, fenced, []) =/= false end, 20000, a_fenced),
        ?assertEqual({error, {region_fenced, [<<"a">>]}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 777])),
        ?assertEqual(Late, seq(PA, S)),
        ?assertMatch({ok, #{value := 666}, #{region := <<"a">>}}, peer:call(PA, dspex_region, get, [S, <<"k">>, #{}])),
        %% after region_failover_ms (1 s) of a unreachable, b (a's first backup) takes over
        ok = b_takes_over(PB, S),
        ?assertMatch(#{primary_region := <<"b">>, backup_regions := [<<"c">>], policy := failover},
                     peer:call(PB, dspex_region, route_session, [S, #{}])),
        %% c (second backup) does not take over; it follows b at region epoch 1
        ok = wait_until(fun() -> maps:get(region_epoch, applied(PC, S)) =:= 1 end, 20000, c_follows_b),
        ?assertMatch(#{primary_region := <<"b">>}, peer:call(PC, dspex_region, decision, [S])),
        {ok, 6} = peer:call(PB, dspex_store, set, [S, <<"k">>, 60])
    after
        [dspex_region_proxy:restore(P) || P <- Cut]
    end,
    %% a's write made after it lost its regions reaches them: refused and reported
    ok = wait_until(fun() -> maps:get(fenced, applied(PB, S)) + maps:get(fenced, applied(PC, S)) >= 1 end,
                    20000, fenced),
    ok = wait_until(fun() -> converged(PB, [PC], S) end, 20000, converged),
    [?assertMatch({ok, #{value := 60, version := 6}}, peer:call(P, dspex_store, get, [S, <<"k">>])) || P <- [PB, PC]],
    ?assert(lists:any(fun({[dspex, region, replication, fenced], _, #{session := S1}}) -> S1 =:= S; (_) -> false end,
                      peer:call(PC, ?MODULE, collector_get, []))
            orelse maps:get(fenced, applied(PB, S)) >= 1),
    %% the refusal's answer carries the newer decision: a adopts it and takes
    %% no more writes of the session
    ok = wait_until(fun() -> maps:get(primary_region, peer:call(PA, dspex_region, decision, [S])) =:= <<"b">> end,
                    20000, a_learns_the_new_primary),
    ?assertEqual({error, {not_primary_region, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 7])),
    ?assertMatch({ok, #{value := 60}}, peer:call(PB, dspex_store, get, [S, <<"k">>])),
    %% the only change refused in b and c is a's write made before it fenced
    %% itself: nothing of the fenced period was shipped
    FencedSeqs = [Q || P <- [PB, PC], {[dspex, region, replication, fenced], _, #{session := S1, seq := Q}}
                                          <- peer:call(P, ?MODULE, collector_get, []), S1 =:= S],
    ?assertEqual([Late], lists:usort(FencedSeqs)),
    [?assertNot(lists:keymember(777, 2, history(P, S, <<"k">>))) || P <- [PB, PC]],
    %% a, reachable again, is b's last backup: a full copy, then b's changes
    ok = wait_until(fun() ->
                            case peer:call(PB, dspex_region, decision, [S]) of
                                #{backup_regions := [<<"c">>, <<"a">>]} -> true;
                                _ -> false
                            end
                    end, 20000, a_is_a_backup_of_b),
    {ok, 7} = peer:call(PB, dspex_store, set, [S, <<"k">>, 70]),
    ok = wait_until(fun() -> maps:get(region_epoch, applied(PA, S)) =:= 1 andalso converged(PB, [PA, PC], S) end,
                    20000, a_follows_b),
    ?assertEqual(history(PB, S, <<"k">>), history(PA, S, <<"k">>)),
    ?assertMatch(#{primary := <<"b">>, full_copies := 1}, applied(PA, S)),
    ?assertMatch({ok, #{value := 70, version := 7}, #{region := <<"a">>, primary_region := <<"b">>,
                                                      lag_versions := 0, lag_ms := 0}},
                 peer:call(PA, dspex_region, get, [S, <<"k">>, #{}])),
    ?assertMatch(#{primary_region := <<"b">>, backup_regions := [<<"c">>, <<"a">>], region_epoch := 1},
                 peer:call(PA, dspex_region, decision, [S])),
    ?assertEqual({error, {not_primary_region, <<"b">>}}, peer:call(PA, dspex_store, set, [S, <<"k">>, 8])).

%% b, a's first backup, is cut off from a and from c: a is unreachable from b
%% for longer than region_failover_ms, but b alone is no majority of the
%% three regions, so it does not take over (a is still the primary, and c
%% still reaches it); after the heal b follows a again, nothing fenced.
a_backup_cut_off_from_the_majority_does_not_take_over(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxies = ?config(proxies, Config),
    Cut = [maps:get(XY, Proxies) || XY <- [{a, b}, {b, a}, {b, c}, {c, b}]],
    S = <<"r_minority">>,
    ok = replicated_at_a(?config(peers, Config), S, [<<"k">>]),
    [ok = dspex_region_proxy:drop(P) || P <- Cut],
    try
        %% from b, a has been down for more than region_failover_ms (1 s)
        DownFor = fun(R) ->
                          #{status := St, since := Since} = maps:get(R, maps:get(peers, topology(PB))),
                          St =:= down andalso erlang:system_time(millisecond) - Since > 1000
                  end,
        ok = wait_until(fun() -> DownFor(<<"a">>) andalso DownFor(<<"c">>) end, 20000, b_isolated),
        %% a lost b but still reaches c: a majority of 3, it does not fence
        %% itself (once b has been down for it longer than region_failover_ms)
        ok = wait_until(fun() ->
                                #{status := St, since := Since} = maps:get(<<"b">>, maps:get(peers, topology(PA))),
                                St =:= down andalso erlang:system_time(millisecond) - Since > 1000
                        end, 20000, a_sees_b_down),
        ?assertEqual(false, peer:call(PA, dspex_region, fenced, [])),
        %% asked to route the session, b keeps a as its primary (without
        %% the majority rule it took the session over here, region epoch 1)
        ?assertMatch(#{primary_region := <<"a">>}, peer:call(PB, dspex_region, route_session, [S, #{}])),
        ?assertMatch(#{primary_region := <<"a">>}, peer:call(PB, dspex_region, decision, [S])),
        ?assertEqual(0, maps:get(region_epoch, applied(PB, S))),
        %% a goes on taking writes, replicated to c
        [{ok, _} = peer:call(PA, dspex_store, set, [S, <<"k">>, I]) || I <- lists:seq(1, 3)],
        ok = wait_until(fun() -> converged(PA, [PC], S) end, 20000, c_follows_a),
        %% the heal, b <-> c first: b has a majority again (b and c) while a is
        %% still unreachable from it, down for longer than region_failover_ms
        %% and silent; c has heard a all along. b's link to c is up for more
        %% than a failover check period (250 ms) before a comes back: b does
        %% not take over on a majority it has just regained (without the
        %% rule it took the session over here at region epoch 1, and a's
        %% changes were refused here). a's links come back right after that
        %% check period, not later: b's regained majority must not reach
        %% region_failover_ms before b hears a again (that would be a
        %% legitimate takeover), so the margin left to the reconnect
        %% (backoff at most 200 ms) is about 700 ms; the decision is
        %% asserted after, since a takeover before the restore stays visible
        [ok = dspex_region_proxy:restore(maps:get(XY, Proxies)) || XY <- [{b, c}, {c, b}]],
        ok = wait_until(fun() ->
                                #{status := St, since := Since} = maps:get(<<"c">>, maps:get(peers, topology(PB))),
                                St =:= up andalso erlang:system_time(millisecond) - Since > 300
                        end, 20000, b_reaches_c),
        [ok = dspex_region_proxy:restore(P) || P <- Cut],
        ?assertMatch(#{primary_region := <<"a">>}, peer:call(PB, dspex_region, decision, [S]))
    after
        [dspex_region_proxy:restore(P) || P <- Cut]
    end,
    %% healed: b catches up with a's writes, none of them refused
    try wait_until(fun() -> converged(PA, [PB, PC], S) end, 30000, b_catches_up)
    catch C:R ->
            %% (what each side holds, for the log)
            ct:pal("b did not catch up: a at ~p, b ~p, c ~p~na -> b ~p~nb's decision ~p~nb ~p~na ~p",
                   [seq(PA, S), applied(PB, S), applied(PC, S), repl(PA, <<"b">>), peer:call(PB, dspex_region, decision, [S]),
                    topology(PB), topology(PA)]),
            erlang:raise(C, R, [])
    end,
    ?assertEqual(0, maps:get(fenced, applied(PB, S))),
    ?assertMatch({ok, #{value := 3}}, peer:call(PB, dspex_store, get, [S, <<"k">>])).

%% b and c hold replicas of a session whose primary is a: a client's write
%% there is refused with the primary's name (it would diverge from a's
%% history), nothing changes, the replay of a's changes goes on, and reads
%% in the backup are served.
a_client_write_in_a_backup_region_is_refused(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_backup_write">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"k">>, 1]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    [?assertEqual({error, {not_primary_region, <<"a">>}}, peer:call(P, dspex_store, set, [S, <<"k">>, 99]))
     || P <- [PB, PC]],
    ?assertEqual({error, {not_primary_region, <<"a">>}},
                 peer:call(PB, dspex_store, register, [S, <<"k2">>, integer, 0, #{}])),
    {ok, 2} = peer:call(PA, dspex_store, set, [S, <<"k">>, 2]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated_again),
    [?assertMatch({ok, #{value := 2, version := 2}}, peer:call(P, dspex_store, get, [S, <<"k">>])) || P <- [PB, PC]],
    ?assertMatch({error, _}, peer:call(PB, dspex_store, get, [S, <<"k2">>])),
    ?assertEqual(0, maps:get(fenced, applied(PB, S))).

%% only b's own link to a is cut (b -> a): b sees a down for longer than
%% region_failover_ms and still reaches c (a majority), but a's link to b
%% delivers a's batches and probes, so a is alive: b does not take over.
a_backup_whose_own_link_is_down_but_hears_the_primary_does_not_take_over(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    Proxy = maps:get({b, a}, ?config(proxies, Config)),
    S = <<"r_one_way">>,
    ok = replicated_at_a(?config(peers, Config), S, [<<"k">>]),
    ok = dspex_region_proxy:drop(Proxy),
    try
        ok = wait_until(fun() ->
                                #{status := St, since := Since} = maps:get(<<"a">>, maps:get(peers, topology(PB))),
                                St =:= down andalso erlang:system_time(millisecond) - Since > 1000
                        end, 20000, b_sees_a_down),
        %% (without the check b took the session over here, region epoch 1)
        ?assertMatch(#{primary_region := <<"a">>}, peer:call(PB, dspex_region, route_session, [S, #{}])),
        {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"k">>, 1]),
        ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, b_still_follows_a),
        ?assertEqual(0, maps:get(region_epoch, applied(PB, S)))
    after
        dspex_region_proxy:restore(Proxy)
    end.

sync_all_acknowledged_writes_survive_kill_9_of_the_primary_region(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_kill">>,
    Keys = [<<"k", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 10)],
    ok = replicated_at_a(?config(peers, Config), S, Keys),
    ok = peer:call(PA, dspex_region, set_replication, [sync_all]),
    Acked = peer:call(PA, ?MODULE, concurrent_sets, [S, Keys, 10], 60000),
    ?assertEqual(100, length(Acked)),
    %% a backup's copy does not expire on its own clock
    ?assertMatch({ok, #{ttl := infinity}}, peer:call(PB, dspex_store, diagnostics, [S])),
    %% region a's only node, kill -9, right after the acknowledgements
    ok = dspex_cluster_SUITE:kill_node(a, [{a, PA}]),
    %% no acknowledged write is lost, in either region: read at once (b takes
    %% over only after down_after_ms + region_failover_ms, then replaces c's
    %% copy with its own, see below)
    Have = fun(P) ->
                   [begin
                        Final = lists:max([V || {K1, {ok, V}} <- Acked, K1 =:= K]),
                        ?assertMatch({P, {ok, #{value := 10, version := Final}}},
                                     {P, peer:call(P, dspex_store, get, [S, K])})
                    end || K <- Keys]
           end,
    _ = [Have(P) || P <- [PB, PC]],
    %% b takes over (link down after down_after_ms, then region_failover_ms)
    ok = b_takes_over(PB, S),
    %% the new primary has them all
    _ = Have(PB),
    %% taken over, b's copy has the session's TTL again (the default 3600 s)
    ?assertMatch({ok, #{ttl := 3600}}, peer:call(PB, dspex_store, diagnostics, [S])),
    [?assertMatch({ok, #{value := 10}}, peer:call(PB, dspex_store, get, [S, K])) || K <- Keys],
    %% and the session goes on in b, followed by c
    {ok, 11} = peer:call(PB, dspex_store, set, [S, hd(Keys), 11]),
    ok = wait_until(fun() -> maps:get(region_epoch, applied(PC, S)) =:= 1 andalso converged(PB, [PC], S) end,
                    20000, c_follows_b),
    ?assertMatch({ok, #{value := 11}}, peer:call(PC, dspex_store, get, [S, hd(Keys)])),
    VV = fun(P, K) -> {ok, #{value := V, version := Ver}} = peer:call(P, dspex_store, get, [S, K]), {V, Ver} end,
    [?assertEqual(VV(PB, K), VV(PC, K)) || K <- Keys].

%% A session with a TTL of 2 s whose primary is a, kept alive there by
%% touches: the copies in b and c, never accessed, are not swept on their
%% own clock; once a's copy expires (a's sweeper, then its cluster keeper),
%% its deletion is shipped in order after its last change and removes them.
a_session_expired_by_ttl_in_the_primary_is_deleted_in_its_backups(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_ttl">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S, #{ttl => 2}]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, <<"k">>, integer, 0, #{}]),
    {ok, 1} = peer:call(PA, dspex_store, set, [S, <<"k">>, 1]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    %% (listing refreshes no TTL)
    Listed = fun(P) -> lists:member(S, peer:call(P, dspex_nif, session_list, [])) end,
    %% a's copy touched every 200 ms for 4.5 s: more than the TTL and two
    %% sweeps (sweep_interval_ms 1000); the backups' copies stay
    keep_alive(PA, S, erlang:monotonic_time(millisecond) + 4500),
    [?assert(Listed(P), P) || P <- [PA, PB, PC]],
    ?assertMatch({ok, #{ttl := infinity}}, peer:call(PB, dspex_store, diagnostics, [S])),
    ?assertMatch({ok, #{ttl := 2}}, peer:call(PA, dspex_store, diagnostics, [S])),
    %% left alone, a's copy expires; its deletion reaches b and c
    ok = wait_until(fun() -> not lists:any(Listed, [PA, PB, PC]) end, 30000, deleted_everywhere),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, deletion_applied),
    Seq = seq(PA, S),
    ?assertEqual(4, Seq),   % create, register, set, expiry
    [?assertMatch(#{applies := Seq, fenced := 0}, applied(P, S)) || P <- [PB, PC]].

keep_alive(P, S, Until) ->
    case erlang:monotonic_time(millisecond) < Until of
        true ->
            ok = peer:call(P, dspex_store, touch, [S]),
            timer:sleep(200),
            keep_alive(P, S, Until);
        false -> ok
    end.

%% async_primary_backup: writers keep writing one variable of a session whose
%% primary is a; each acknowledgement comes back with the lag to b measured on
%% a right after it (dspex_region_shipper:stats/0, the records committed and
%% not yet applied by b). kill -9 of a's only node in mid-stream; b takes over.
%% The acknowledged writes b lacks are a suffix (every acknowledged version up
%% to b's is in b with its value, in order) and, for every sample (V, L) (the
%% write of version V acknowledged, then L measured), there are at most
%% L + (acknowledged writes of a version above V) of them.
-define(LAG_WRITES, 240).
async_writes_lost_in_a_kill_9_are_a_suffix_within_the_measured_lag(Config) ->
    #{a := PA, b := PB, c := PC} = ?config(peers, Config),
    S = <<"r_async_kill">>,
    K = <<"k">>,
    routed_at_a(PA, S),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    %% every version kept: the whole history is compared
    {ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0, #{history_limit => 1000}]),
    ok = wait_until(fun() -> converged(PA, [PB, PC], S) end, 20000, replicated),
    OsPid = peer:call(PA, os, getpid, []),
    Me = self(),
    Writers = [spawn_monitor(fun() -> lag_writer(PA, S, K, W, 1, Me) end) || W <- lists:seq(1, 4)],
    %% 200 acknowledgements, then kill -9 while the writers go on
    First = [receive {acked, _, _, _} = A -> A end || _ <- lists:seq(1, 200)],
    [] = os:cmd("kill -9 " ++ OsPid),
    Acked = [{V, X, L} || {acked, V, X, L} <- First ++ drain_writers(Writers, [])],
    ?assert(length(Acked) >= 200),
    ok = b_takes_over(PB, S),
    {ok, #{version := Vb, value := Xb}} = peer:call(PB, dspex_store, get, [S, K]),
    HistB = [{Vb, Xb} | history(PB, S, K)],
    %% b's history is whole (0..Vb, no version missing)
    ?assertEqual(lists:seq(0, Vb), lists:sort([V || {V, _} <- HistB])),
    %% no gap: every acknowledged write up to b's version is there, with its value
    ?assertEqual([], [{V, X} || {V, X, _} <- Acked, V =< Vb, not lists:member({V, X}, HistB)]),
    %% the rest, acknowledged and not in b, is a suffix bounded by the measured lag
    Lost = length([V || {V, _, _} <- Acked, V > Vb]),
    Bounds = [{L + length([V1 || {V1, _, _} <- Acked, V1 > V]), V, L} || {V, _, L} <- Acked],
    {Bound, AtV, AtL} = lists:min(Bounds),
    ct:pal("async kill -9: ~b writes acknowledged, b at version ~b, ~b acknowledged lost; "
           "tightest bound ~b (lag ~b sampled after version ~b); max lag sampled ~b",
           [length(Acked), Vb, Lost, Bound, AtL, AtV, lists:max([L || {_, _, L} <- Acked])]),
    [?assert(Lost =< B, {Lost, B, V, L}) || {B, V, L} <- Bounds],
    %% c follows b
    ok = wait_until(fun() -> maps:get(region_epoch, applied(PC, S)) =:= 1 andalso converged(PB, [PC], S) end,
                    20000, c_follows_b),
    ?assertMatch({ok, #{version := Vb}}, peer:call(PC, dspex_store, get, [S, K])).

%% a writer of the test node: one set at a time through a, each answer with
%% the lag to b measured there right after it, until a is gone or it made
%% ?LAG_WRITES writes: the 4 writers' versions then stay within the
%% variable's history_limit of 1000 however late the kill lands on a loaded
%% machine (the whole history is compared)
lag_writer(_PA, _S, _K, _W, I, _Parent) when I > ?LAG_WRITES -> done;
lag_writer(PA, S, K, W, I, Parent) ->
    X = W * 1000000 + I,
    case catch peer:call(PA, ?MODULE, set_with_lag, [S, K, X]) of
        {{ok, V}, L} -> Parent ! {acked, V, X, L}, lag_writer(PA, S, K, W, I + 1, Parent);
        _ -> done
    end.

drain_writers([], Acc) -> lists:reverse(Acc);
drain_writers(Writers, Acc) ->
    receive
        {acked, _, _, _} = A -> drain_writers(Writers, [A | Acc]);
        {'DOWN', Ref, process, Pid, _} -> drain_writers(Writers -- [{Pid, Ref}], Acc)
    after 30000 -> error({writers_stuck, Writers})
    end.

%% on a peer: a set, then the lag to b measured right after its acknowledgement
set_with_lag(S, K, X) ->
    R = dspex_store:set(S, K, X),
    #{<<"b">> := #{lag_versions := L}} = dspex_region_shipper:stats(),
    {R, L}.

%%% helpers -------------------------------------------------------------------------

%% dspex_region:get/3 with read => primary on P: the first answer other than
%% {region_unavailable, _}, which is the answer while P's own link to the
%% primary is down: on a loaded machine a probe can go unanswered for
%% down_after_ms (500 ms here) and take a link down for a moment (b's read
%% got {region_unavailable, <<"a">>} under 4 busy loops; under 5, links went
%% down on probe timeouts in cases that cut nothing); a read that is never
%% forwarded still fails (wait_until times out)
read_primary(P, S, K) ->
    Self = self(),
    ok = wait_until(fun() ->
                            case peer:call(P, dspex_region, get, [S, K, #{read => primary}]) of
                                {error, {region_unavailable, _}} -> false;
                                R -> Self ! {read_primary, R}, true
                            end
                    end, 10000, read_primary),
    receive {read_primary, R} -> R end.

topology(P) -> peer:call(P, dspex_region, topology, []).

status(P, R) -> maps:get(status, maps:get(R, maps:get(peers, topology(P)))).

samples(P, R) -> maps:get(samples, maps:get(rtt, maps:get(R, maps:get(peers, topology(P))))).

all_up(P) ->
    case topology(P) of
        #{peers := Ps} -> lists:all(fun(#{status := S}) -> S =:= up end, maps:values(Ps));
        _ -> false
    end.

%% bounded polling, as in the cluster suite
wait_until(F, Timeout, What) -> dspex_cluster_SUITE:wait_until(F, Timeout, What).

%% b's decision of S names b the primary at region epoch 1 (its takeover)
b_takes_over(PB, S) ->
    wait_until(fun() ->
                       case peer:call(PB, dspex_region, decision, [S]) of
                           #{primary_region := <<"b">>, region_epoch := 1} -> true;
                           _ -> false
                       end
               end, 20000, b_takes_over).

%% on a peer: a process that keeps the region's link and route events
collector_start() ->
    Pid = spawn(fun() -> collector([]) end),
    register(region_ct_collector, Pid),
    ok = dspex_telemetry:attach_many(region_ct, [[dspex, region, link, up], [dspex, region, link, down],
                                                 [dspex, region, route], [dspex, region, replication, fenced]],
                                     fun(E, M, Meta, _) -> region_ct_collector ! {event, E, M, Meta} end, []).

collector(Acc) ->
    receive
        {event, E, M, Meta} -> collector([{E, M, Meta} | Acc]);
        {get, From} -> From ! {events, lists:reverse(Acc)}, collector(Acc)
    end.

collector_get() ->
    region_ct_collector ! {get, self()},
    receive {events, Es} -> Es after 5000 -> timeout end.
