%% Common Test: regions of two nodes (issue #17, third layer). Three regions,
%% each a BEAM cluster of OS-process `peer' nodes: `a' (rm_a1, rm_a2) and `b'
%% (rm_b1, rm_b2) of two nodes each (replicas => 1, sync, the etcd ownership
%% backend so that one node alive keeps its region writable; one etcd on
%% loopback, one key prefix per region), `c' of one (rm_c1). Every node runs
%% the region's configuration (its own gateway and links); the peers of a
%% region name the gateway of its first node (rm_a1, rm_b1, rm_c1), through
%% a TCP proxy of this node per direction of each region pair (one way: a-b
%% 1 ms, b-c 4 ms, a-c 8 ms, so that a's sessions have b then c as backups).
%%
%% What it proves: one routing decision per session per region (made by the
%% session's owner in the region's cluster, whichever node is asked, and held
%% by every node of the region); `sync_all' writes made on either node of
%% `a' are acknowledged once in every backup region (through the in-region
%% sync replica); a client's write on either node of backup region `b' is
%% refused; kill -9 of a session's owner in `a' (the node that made its
%% decision) keeps the decision and the shipping; kill -9 of both nodes of
%% `a' makes `b' take over, on both of its nodes.
-module(dspex_region_multi_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([route_session_is_the_same_on_every_node_of_a_region/1,
         sync_all_writes_on_either_node_of_a_are_in_every_backup/1,
         a_client_write_on_either_node_of_a_backup_region_is_refused/1,
         move_session_on_the_node_that_does_not_own_it_moves_it_for_the_whole_region/1,
         kill_9_of_the_owner_in_a_keeps_the_decision_and_the_shipping/1,
         a_node_started_again_gets_the_region_s_decisions/1,
         kill_9_of_both_nodes_of_a_makes_b_the_primary_on_both_its_nodes/1]).
%% run on the peers
-export([concurrent_sets/3]).

-define(REGIONS, [{a, <<"a">>, {50.11, 8.68}, [a1, a2]},     % Frankfurt
                  {b, <<"b">>, {51.51, -0.13}, [b1, b2]},    % London
                  {c, <<"c">>, {40.71, -74.01}, [c1]}]).     % New York

all() ->
    %% in order: the last two kill region a's nodes
    [route_session_is_the_same_on_every_node_of_a_region,
     sync_all_writes_on_either_node_of_a_are_in_every_backup,
     a_client_write_on_either_node_of_a_backup_region_is_refused,
     move_session_on_the_node_that_does_not_own_it_moves_it_for_the_whole_region,
     kill_9_of_the_owner_in_a_keeps_the_decision_and_the_shipping,
     a_node_started_again_gets_the_region_s_decisions,
     kill_9_of_both_nodes_of_a_makes_b_the_primary_on_both_its_nodes].

%%% setup ------------------------------------------------------------------------------

init_per_suite(Config) ->
    Tmp = filename:join(os:getenv("TMPDIR", "/tmp"), "dspex_region_multi_ct_" ++ os:getpid() ++ "_" ++
                            integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Tmp),
    Config1 = [{tmp_dir, Tmp} | Config],
    try
        start_all(Config1)
    catch C:R:St ->
        end_per_suite(Config1),
        erlang:raise(C, R, St)
    end.

start_all(Config) ->
    Tmp = ?config(tmp_dir, Config),
    {Etcd, Endpoint} = start_etcd(Tmp),
    Config1 = [{etcd, Etcd} | Config],
    put(etcd, Etcd),
    Pairs = [{X, Y} || {X, _, _, _} <- ?REGIONS, {Y, _, _, _} <- ?REGIONS, X =/= Y],
    Proxies = maps:from_list([{XY, begin {ok, P} = dspex_region_proxy:start(undefined, delay(X, Y)), P end}
                              || {X, Y} = XY <- Pairs]),
    put(proxies, Proxies),
    Names = [N || {_, _, _, Ns} <- ?REGIONS, N <- Ns],
    Peers = maps:from_list([{N, start_peer(N)} || N <- Names]),
    put(peers, Peers),
    [configure(X, Name, Coords, Ns, Peers, Proxies, Endpoint) || {X, Name, Coords, Ns} <- ?REGIONS],
    %% each proxy X->Y forwards to the gateway of Y's first node
    [ok = dspex_region_proxy:set_target(Proxy, peer:call(p(gw(Y), Peers), dspex_region, gateway_port, []))
     || {{_, Y}, Proxy} <- maps:to_list(Proxies)],
    [ok = wait_until(fun() -> all_up(P) end, 30000, {links_up, N}) || {N, {P, _}} <- maps:to_list(Peers)],
    %% every node of a two-node region sees the other live
    [ok = wait_until(fun() -> length(maps:get(live, peer:call(p(N, Peers), dspex_cluster_members, view, []))) =:= 2 end,
                     30000, {cluster_live, N}) || N <- [a1, a2, b1, b2]],
    [{peers, Peers}, {proxies, Proxies}, {endpoint, Endpoint} | Config1].

start_peer(N) ->
    Host = hd(string:split(net_adm:localhost(), ".")),
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    %% (named after this OS process, as in dspex_region_SUITE: another run on
    %% the machine, say a CI run, starts rm_a1 too)
    {ok, P, Node} = peer:start(#{name => "rm_" ++ atom_to_list(N) ++ "_" ++ os:getpid(), host => Host,
                                 connection => standard_io,
                                 args => ["-setcookie", "dspex_region_multi_ct", "-connect_all", "false",
                                          "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none" | Paths]}),
    {P, Node}.

configure(X, Name, Coords, Ns, Peers, Proxies, Endpoint) ->
    configure(X, Name, Coords, Ns, Peers, Proxies, Endpoint, Ns).

%% starts the nodes Start of region X (of nodes Ns)
configure(X, Name, Coords, Start, Peers, Proxies, Endpoint, Ns) ->
    Nodes = [node_of(N, Peers) || N <- Ns],
    Cluster = case Ns of
                  [_] -> #{nodes => Nodes, replicas => 0};
                  _ -> #{nodes => Nodes, replicas => 1, replication => sync, backend => etcd,
                         etcd => #{endpoint => Endpoint, ttl => 2, prefix => "/dspex_rm/" ++ atom_to_list(X) ++ "/"}}
              end,
    RC = #{name => Name, coords => Coords, listen => {{127, 0, 0, 1}, 0},
           peers => [#{name => YName, coords => YCoords,
                       gateway => {{127, 0, 0, 1}, dspex_region_proxy:port(maps:get({X, Y}, Proxies))}}
                     || {Y, YName, YCoords, _} <- ?REGIONS, Y =/= X],
           probe_ms => 20, window => 32, down_after_ms => 500, backoff_min_ms => 20, backoff_max_ms => 200,
           sync_timeout_ms => 5000, region_failover_ms => 1000},
    %% the nodes of a region start together (each waits for nothing)
    [begin
         P = p(N, Peers),
         ok = peer:call(P, application, load, [dspex_bridge]),
         [ok = peer:call(P, application, set_env, [dspex_bridge, K, V])
          || {K, V} <- [{event_log, false}, {grpc_enabled, false}, {console_enabled, false},
                        {prometheus_port, 0}, {cluster, Cluster}, {region, RC}]],
         {ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge], 30000)
     end || N <- Start],
    ok.

end_per_suite(Config) ->
    %% (from init_per_suite's process when it failed half way)
    Get = fun(K, Default) -> case ?config(K, Config) of undefined -> case get(K) of undefined -> Default; V -> V end;
                                                        V -> V
                             end
          end,
    [catch peer:stop(P) || {P, _} <- maps:values(Get(peers, #{}))],
    %% a node started again by a case
    _ = [catch peer:stop(P) || D <- [?config(tmp_dir, Config)], D =/= undefined,
                               {ok, B} <- [file:read_file(filename:join(D, "restarted"))],
                               {P, _} <- maps:values(binary_to_term(B))],
    [catch dspex_region_proxy:stop(P) || P <- maps:values(Get(proxies, #{}))],
    _ = [stop_etcd(E) || E <- [Get(etcd, undefined)], E =/= undefined],
    _ = [file:del_dir_r(D) || D <- [?config(tmp_dir, Config)], D =/= undefined],
    ok.

start_etcd(Tmp) ->
    Exe = os:find_executable("etcd"),
    ?assertNotEqual(false, Exe),
    Dir = filename:join(Tmp, "etcd"),
    CP = free_port(), PP = free_port(),
    Client = "http://127.0.0.1:" ++ integer_to_list(CP),
    PeerUrl = "http://127.0.0.1:" ++ integer_to_list(PP),
    %% in the background, not as a port of init_per_suite's process (which
    %% ends before the cases run); its output in the temp dir
    Args = ["--name", "dspex_rm", "--data-dir", Dir,
            "--listen-client-urls", Client, "--advertise-client-urls", Client,
            "--listen-peer-urls", PeerUrl, "--initial-advertise-peer-urls", PeerUrl,
            "--initial-cluster", "dspex_rm=" ++ PeerUrl, "--log-level", "error"],
    Out = os:cmd(string:join([Exe | Args], " ") ++ " >" ++ filename:join(Tmp, "etcd.log") ++ " 2>&1 & echo $!"),
    OsPid = string:trim(Out),
    {ok, _} = application:ensure_all_started(inets),
    ok = wait_until(fun() -> etcd_health(Client) end, 20000, etcd_up),
    {OsPid, Client}.

%% TERM, then (bounded) KILL once it has not exited
stop_etcd(OsPid) ->
    _ = os:cmd("kill " ++ OsPid),
    Gone = fun() -> os:cmd("kill -0 " ++ OsPid ++ " 2>/dev/null && echo alive") =:= "" end,
    try wait_until(Gone, 10000, etcd_stopped)
    catch _:_ -> os:cmd("kill -9 " ++ OsPid)
    end.

etcd_health(Client) ->
    case httpc:request(get, {Client ++ "/health", []}, [{timeout, 500}], [{body_format, binary}]) of
        {ok, {{_, 200, _}, _, Body}} -> binary:match(Body, <<"true">>) =/= nomatch;
        _ -> false
    end.

free_port() ->
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    ok = gen_tcp:close(L),
    Port.

%% one-way delay between two regions (ms): from a, b is nearer than c
delay(X, Y) when X > Y -> delay(Y, X);
delay(a, b) -> 1;
delay(b, c) -> 4;
delay(a, c) -> 8.

%%% cases --------------------------------------------------------------------------------

%% Whichever node of a region is asked first, and with whatever options, the
%% session gets one decision, held by every node of the region; concurrent
%% first calls on both nodes agree.
route_session_is_the_same_on_every_node_of_a_region(Config) ->
    Peers = ?config(peers, Config),
    NewYork = #{client_location => {40.0, -75.0}},
    [begin
         %% asked first on the node that does not own the session (for a
         %% session of each owner: the gateway node too), near New York
         S = owned_by(Owner, Peers, <<"rs_", (atom_to_binary(Owner))/binary>>),
         Other = other(Owner),
         #{primary_region := <<"c">>} = D = peer:call(p(Other, Peers), dspex_region, route_session, [S, NewYork]),
         ?assertEqual(D, peer:call(p(Owner, Peers), dspex_region, route_session, [S, #{}])),
         ?assertEqual(D, peer:call(p(Other, Peers), dspex_region, route_session, [S, #{}])),
         %% held by both nodes (not only answered through the owner)
         [?assertEqual(D, peer:call(p(N, Peers), dspex_region, decision, [S])) || N <- [Owner, Other]]
     end || Owner <- [a1, a2, b1, b2]],
    %% concurrent first calls on both nodes of a, with different options
    [begin
         S = <<"rs_race_", (integer_to_binary(I))/binary>>,
         Me = self(),
         [spawn_link(fun() -> Me ! {N, peer:call(p(N, Peers), dspex_region, route_session, [S, Opts])} end)
          || {N, Opts} <- [{a1, #{}}, {a2, NewYork}]],
         D1 = receive {a1, R1} -> R1 end,
         D2 = receive {a2, R2} -> R2 end,
         ?assertMatch(#{primary_region := _}, D1),
         ?assertEqual(D1, D2)
     end || I <- lists:seq(1, 10)].

%% sync_all writes made on both nodes of a (whichever owns the session, the
%% other routes to it) are acknowledged only once every backup region applied
%% them: read at once on every node of b and on c, each acknowledged version
%% is there. The owner's writer waits for its in-region sync replica; the
%% cluster shipper answers the region shipper, which answers the caller.
sync_all_writes_on_either_node_of_a_are_in_every_backup(Config) ->
    Peers = ?config(peers, Config),
    Keys = [<<"k", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 8)],
    %% routed on the node that does not own it (before: its owner's writer
    %% had no decision and shipped nothing)
    [begin
         S = owned_by(Owner, Peers, <<"sync_", (atom_to_binary(Owner))/binary>>),
         ok = replicated_at_a(Peers, other(Owner), S, Keys),
         [ok = peer:call(p(N, Peers), dspex_region, set_replication, [sync_all]) || N <- [a1, a2]],
         try
             Me = self(),
             {K1, K2} = lists:split(4, Keys),
             [spawn_link(fun() -> Me ! {done, N, peer:call(p(N, Peers), ?MODULE, concurrent_sets, [S, Ks, 10], 60000)} end)
              || {N, Ks} <- [{a1, K1}, {a2, K2}]],
             Acked = lists:append([receive {done, N, R} -> R end || N <- [a1, a2]]),
             ?assertEqual(80, length(Acked)),
             [?assertMatch({ok, _}, R) || {_, R} <- Acked],
             %% read at once, no waiting: every acknowledged write is in b (both nodes) and c
             [begin
                  Final = lists:max([V || {K1_, {ok, V}} <- Acked, K1_ =:= K]),
                  [?assertMatch({ok, #{version := Final}}, peer:call(p(N, Peers), dspex_store, get, [S, K]))
                   || N <- [b1, b2, c1]]
              end || K <- Keys],
             [?assertMatch(#{full_copies := 0, fenced := 0}, applied(p(N, Peers), S)) || N <- [b1, b2, c1]]
         after
             [ok = peer:call(p(N, Peers), dspex_region, set_replication, [async_primary_backup]) || N <- [a1, a2]]
         end
     end || Owner <- [a1, a2]].

%% b holds replicas of a session whose primary is a: a client's write on
%% either of b's nodes is refused with a's name (the decision is on both, not
%% only on the node whose gateway received the changes), and nothing changes.
a_client_write_on_either_node_of_a_backup_region_is_refused(Config) ->
    Peers = ?config(peers, Config),
    S = owned_by(a1, Peers, <<"backup_write">>),
    ok = replicated_at_a(Peers, a1, S, [<<"k">>]),
    [?assertEqual({error, {not_primary_region, <<"a">>}}, peer:call(p(N, Peers), dspex_store, set, [S, <<"k">>, 99]))
     || N <- [b1, b2, c1]],
    ?assertEqual({error, {not_primary_region, <<"a">>}},
                 peer:call(p(b2, Peers), dspex_store, register, [S, <<"k2">>, integer, 0, #{}])),
    {ok, 1} = peer:call(p(a2, Peers), dspex_store, set, [S, <<"k">>, 1]),
    ok = wait_until(fun() -> converged(Peers, S, [b1, b2, c1]) end, 20000, replicated_again),
    [?assertMatch({ok, #{value := 1, version := 1}}, peer:call(p(N, Peers), dspex_store, get, [S, <<"k">>]))
     || N <- [b1, b2, c1]].

%% move_session/2 called on rm_a2 for a session owned by rm_a1 (which made
%% its decision): routed to rm_a1, whose writer's export goes to b; both of
%% a's nodes refuse the session's writes from then on, both of b's nodes
%% answer b (region epoch 1), c follows b through a full copy, and b's
%% writes, on either node, reach c; the move is no longer pending on either
%% node of a once b acknowledged the copy.
move_session_on_the_node_that_does_not_own_it_moves_it_for_the_whole_region(Config) ->
    Peers = ?config(peers, Config),
    S = owned_by(a1, Peers, <<"move">>),
    ok = replicated_at_a(Peers, a1, S, [<<"k">>]),
    {ok, 1} = peer:call(p(a2, Peers), dspex_store, set, [S, <<"k">>, 1]),
    ok = peer:call(p(a2, Peers), dspex_region, move_session, [S, <<"b">>]),
    [?assertEqual({error, {region_moved, <<"b">>}}, peer:call(p(N, Peers), dspex_store, set, [S, <<"k">>, 2]))
     || N <- [a1, a2]],
    [?assertMatch(#{primary_region := <<"b">>, region_epoch := 1}, peer:call(p(N, Peers), dspex_region, decision, [S]))
     || N <- [a1, a2]],
    ok = wait_until(fun() ->
                            lists:all(fun(N) ->
                                              case peer:call(p(N, Peers), dspex_region, route_session, [S, #{}]) of
                                                  #{primary_region := <<"b">>, region_epoch := 1} -> true;
                                                  _ -> false
                                              end
                                      end, [b1, b2])
                    end, 10000, b_is_the_primary_on_both_nodes),
    {ok, 2} = peer:call(p(b1, Peers), dspex_store, set, [S, <<"k">>, 2]),
    {ok, 3} = peer:call(p(b2, Peers), dspex_store, set, [S, <<"k">>, 3]),
    ok = wait_until(fun() ->
                            maps:get(region_epoch, applied(p(c1, Peers), S)) =:= 1 andalso
                                peer:call(p(c1, Peers), dspex_store, get_value, [S, <<"k">>]) =:= {ok, 3}
                    end, 20000, c_follows_b),
    ?assertEqual(history(p(b1, Peers), S, <<"k">>), history(p(c1, Peers), S, <<"k">>)),
    %% b acknowledged the copy to rm_a1, which shipped it: the move is done
    %% on both of a's nodes (a node that becomes the owner sends nothing again)
    ok = wait_until(fun() -> [undefined, undefined] =:= [peer:call(p(N, Peers), dspex_region, moving, [S]) || N <- [a1, a2]]
                    end, 10000, move_done_on_both_nodes).

%% The session's owner in a (here rm_a1: it made the decision, it ships, and
%% it is a's gateway) is killed with kill -9 after sync_all writes: rm_a2
%% takes the session over in a's cluster, still answers a's decision, and
%% its writes reach b and c in order (no gap: no full copy), none refused; b
%% does not take over (it still hears a, through rm_a2's links).
kill_9_of_the_owner_in_a_keeps_the_decision_and_the_shipping(Config) ->
    Peers = ?config(peers, Config),
    S = owned_by(a1, Peers, <<"kill_owner">>),
    Keys = [<<"k", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 4)],
    %% decided on rm_a1 (its owner), asked on rm_a1
    ok = replicated_at_a(Peers, a1, S, Keys),
    D = peer:call(p(a1, Peers), dspex_region, decision, [S]),
    [ok = peer:call(p(N, Peers), dspex_region, set_replication, [sync_all]) || N <- [a1, a2]],
    Acked = peer:call(p(a2, Peers), ?MODULE, concurrent_sets, [S, Keys, 10], 60000),
    [?assertMatch({ok, _}, R) || {_, R} <- Acked],
    ok = kill(a1, Peers),
    %% the decision is still a's, on the node left
    ?assertEqual(D, peer:call(p(a2, Peers), dspex_region, route_session, [S, #{}])),
    %% rm_a2 takes over once rm_a1's etcd lease lapsed: the write is retried
    %% until it is accepted
    Next = fun() -> case peer:call(p(a2, Peers), dspex_store, set, [S, hd(Keys), 11]) of
                        {ok, _} -> true;
                        _ -> false
                    end
           end,
    ok = wait_until(Next, 30000, a2_takes_over),
    [{ok, 11} = peer:call(p(a2, Peers), dspex_store, set, [S, K, 11]) || K <- tl(Keys)],
    %% sync_all: acknowledged means applied in b and c: read at once
    ?assert(converged(Peers, a2, S, [b1, b2, c1])),
    [[?assertMatch({ok, #{value := 11}}, peer:call(p(N, Peers), dspex_store, get, [S, K]))
      || K <- Keys] || N <- [b1, b2, c1]],
    %% b's links to a reach rm_a1's gateway, dead: down for longer than
    %% region_failover_ms (and b reaches c, a majority); yet b hears a
    %% through rm_a2's links (probes and batches into rm_b1's gateway, whose
    %% heard times reach rm_b2, the session's owner in b): no takeover
    ok = wait_until(fun() ->
                            lists:all(fun(N) ->
                                              #{status := St, since := Since} =
                                                  maps:get(<<"a">>, maps:get(peers, topology(p(N, Peers)))),
                                              St =:= down andalso erlang:system_time(millisecond) - Since > 2000
                                      end, [b1, b2])
                    end, 20000, b_sees_a_gateway_down),
    %% in order, no gap, nothing refused, no takeover in b
    [?assertMatch(#{full_copies := 0, fenced := 0, region_epoch := 0, primary := <<"a">>}, applied(p(N, Peers), S))
     || N <- [b1, c1]],
    [?assertEqual(D, peer:call(p(N, Peers), dspex_region, decision, [S])) || N <- [b1, b2, c1]],
    [?assertEqual(history(p(a2, Peers), S, K), history(p(N, Peers), S, K)) || K <- Keys, N <- [b1, c1]],
    ok = peer:call(p(a2, Peers), dspex_region, set_replication, [async_primary_backup]),
    put_env(Config, kill_owner_session, S).

%% rm_a1 (killed above) is started again, empty: it asks rm_a2 for the
%% region's decisions, so it holds the one of a session decided while it was
%% down (given to no one then) and the one of the session it had decided,
%% and refuses a client's write of a session whose primary is another region.
a_node_started_again_gets_the_region_s_decisions(Config) ->
    Peers0 = ?config(peers, Config),
    S = get_env(Config, kill_owner_session),
    %% decided on rm_a2 while rm_a1 is down, and a session routed to c
    S2 = <<"decided_while_a1_down">>,
    D2 = peer:call(p(a2, Peers0), dspex_region, route_session, [S2, #{}]),
    S3 = <<"routed_to_c_while_a1_down">>,
    #{primary_region := <<"c">>} = D3 =
        peer:call(p(a2, Peers0), dspex_region, route_session, [S3, #{client_location => {40.0, -75.0}}]),
    {P1, _} = New = start_peer(a1),
    Peers = Peers0#{a1 => New},
    ok = file:write_file(filename:join(?config(tmp_dir, Config), "restarted"), term_to_binary(#{a1 => New})),
    {a, Name, Coords, Ns} = lists:keyfind(a, 1, ?REGIONS),
    ok = configure(a, Name, Coords, [a1], Peers#{a2 => maps:get(a2, Peers)}, ?config(proxies, Config),
                   ?config(endpoint, Config), Ns),
    %% the other regions' links to a reach its gateway node again
    [ok = dspex_region_proxy:set_target(maps:get({Y, a}, ?config(proxies, Config)),
                                        peer:call(P1, dspex_region, gateway_port, [])) || Y <- [b, c]],
    ok = wait_until(fun() -> length(maps:get(live, peer:call(P1, dspex_cluster_members, view, []))) =:= 2 end,
                    30000, a1_live_again),
    ok = wait_until(fun() ->
                            [peer:call(P1, dspex_region, decision, [X]) || X <- [S, S2, S3]] =:=
                                [peer:call(p(a2, Peers), dspex_region, decision, [X]) || X <- [S, S2, S3]]
                    end, 10000, a1_pulled),
    ?assertEqual(D2, peer:call(P1, dspex_region, decision, [S2])),
    ?assertEqual(D3, peer:call(P1, dspex_region, decision, [S3])),
    ?assertEqual({error, {not_primary_region, <<"c">>}}, peer:call(P1, dspex_store, create_session, [S3])).

%% Both nodes of a are gone: b takes the session over at region epoch 1,
%% decided by the session's owner in b and held by both of b's nodes (each
%% answers b), c follows b; b's writes, on either node, reach c.
kill_9_of_both_nodes_of_a_makes_b_the_primary_on_both_its_nodes(Config) ->
    Peers = ?config(peers, Config),
    S = get_env(Config, kill_owner_session),
    {ok, B} = file:read_file(filename:join(?config(tmp_dir, Config), "restarted")),
    ok = kill(a1, maps:merge(Peers, binary_to_term(B))),
    ok = kill(a2, Peers),
    ok = wait_until(fun() ->
                            lists:all(fun(N) ->
                                              case peer:call(p(N, Peers), dspex_region, decision, [S]) of
                                                  #{primary_region := <<"b">>, region_epoch := 1} -> true;
                                                  _ -> false
                                              end
                                      end, [b1, b2])
                    end, 30000, b_takes_over_on_both_nodes),
    [?assertMatch(#{primary_region := <<"b">>, backup_regions := [<<"c">>], region_epoch := 1},
                  peer:call(p(N, Peers), dspex_region, route_session, [S, #{}])) || N <- [b1, b2]],
    %% every write acknowledged in a is in b
    [?assertMatch({ok, #{value := 11}}, peer:call(p(N, Peers), dspex_store, get, [S, <<"k1">>]))
     || N <- [b1, b2]],
    {ok, _} = peer:call(p(b1, Peers), dspex_store, set, [S, <<"k1">>, 12]),
    {ok, _} = peer:call(p(b2, Peers), dspex_store, set, [S, <<"k2">>, 12]),
    ok = wait_until(fun() ->
                            maps:get(region_epoch, applied(p(c1, Peers), S)) =:= 1 andalso
                                [peer:call(p(c1, Peers), dspex_store, get_value, [S, K]) || K <- [<<"k1">>, <<"k2">>]]
                                =:= [{ok, 12}, {ok, 12}]
                    end, 30000, c_follows_b),
    ?assertMatch(#{primary_region := <<"b">>, region_epoch := 1}, peer:call(p(c1, Peers), dspex_region, decision, [S])).

%%% helpers -------------------------------------------------------------------------------

p(N, Peers) -> element(1, maps:get(N, Peers)).
node_of(N, Peers) -> element(2, maps:get(N, Peers)).

gw(a) -> a1;
gw(b) -> b1;
gw(c) -> c1.

other(a1) -> a2;
other(a2) -> a1;
other(b1) -> b2;
other(b2) -> b1.

%% A session name with Prefix whose owner in its region's cluster is node N
%% (and, for a session of a, whose owner in b is rm_b2, not b's gateway
%% node: the backup applies there what rm_b1's gateway receives, and decides
%% its failover there).
owned_by(N, Peers, Prefix) -> owned_by(N, Peers, Prefix, 0).

owned_by(N, Peers, Prefix, I) ->
    S = <<Prefix/binary, "_", (integer_to_binary(I))/binary>>,
    Want = [{N, node_of(N, Peers)} | [{b2, node_of(b2, Peers)} || lists:member(N, [a1, a2])]],
    case lists:all(fun({M, W}) -> peer:call(p(M, Peers), dspex_cluster, owner_of, [S]) =:= {ok, W} end, Want) of
        true -> S;
        false -> owned_by(N, Peers, Prefix, I + 1)
    end.

%% S routed on node N of a (primary a, backups b then c), created there with
%% integer variables Keys (0), and replicated to every node of b and to c.
replicated_at_a(Peers, N, S, Keys) ->
    #{primary_region := <<"a">>, backup_regions := [<<"b">>, <<"c">>]} =
        peer:call(p(N, Peers), dspex_region, route_session, [S, #{}]),
    {ok, _} = peer:call(p(N, Peers), dspex_store, create_session, [S]),
    [{ok, _} = peer:call(p(N, Peers), dspex_store, register, [S, K, integer, 0, #{}]) || K <- Keys],
    wait_until(fun() -> converged(Peers, S, [b1, b2, c1]) end, 20000, replicated).

%% S reads the same on the nodes Ns as on node Src
converged(Peers, S, Ns) -> converged(Peers, a1, S, Ns).

converged(Peers, Src, S, Ns) ->
    Want = vars(p(Src, Peers), S),
    is_list(Want) andalso lists:all(fun(N) -> vars(p(N, Peers), S) =:= Want end, Ns).

%% the variables of S on a node: name, value, version
vars(P, S) ->
    case peer:call(P, dspex_store, list, [S]) of
        {ok, Vs} -> [{maps:get(name, V), maps:get(value, V), maps:get(version, V)} || V <- Vs];
        Other -> Other
    end.

applied(P, S) -> peer:call(P, dspex_region_receiver, row, [S]).

history(P, S, K) ->
    {ok, H} = peer:call(P, dspex_store, history, [S, K, all]),
    [{maps:get(version, E), maps:get(value, E)} || E <- H].

kill(N, Peers) ->
    OsPid = peer:call(p(N, Peers), os, getpid, []),
    [] = os:cmd("kill -9 " ++ OsPid),
    ok.

%% between cases (each runs in its own process): a file in the suite's temp dir
put_env(Config, K, V) -> ok = file:write_file(env_file(Config, K), term_to_binary(V)).
get_env(Config, K) -> {ok, B} = file:read_file(env_file(Config, K)), binary_to_term(B).
env_file(Config, K) -> filename:join(?config(tmp_dir, Config), atom_to_list(K)).

topology(P) -> peer:call(P, dspex_region, topology, []).

all_up(P) ->
    case topology(P) of
        #{peers := Ps} -> lists:all(fun(#{status := S}) -> S =:= up end, maps:values(Ps));
        _ -> false
    end.

%% on a peer: one writer per key, N sets each; every answer
concurrent_sets(S, Keys, N) ->
    Me = self(),
    Pids = [spawn_link(fun() -> Me ! {self(), [{K, dspex_store:set(S, K, I)} || I <- lists:seq(1, N)]} end)
            || K <- Keys],
    lists:append([receive {P, R} -> R end || P <- Pids]).

wait_until(F, Timeout, What) -> dspex_cluster_SUITE:wait_until(F, Timeout, What).
