%% Common Test: the kill -9 failover test with the `etcd' ownership backend.
%% Starts a real etcd (Debian's etcd-server) on loopback, on free ports, with
%% a temporary data directory, and stops it afterwards.
-module(dspex_cluster_etcd_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([etcd_kill_owner_sync_loses_no_acknowledged_write/1, etcd_claims_are_exclusive_and_epochs_rise/1,
         etcd_outage_refuses_writes_then_recovers/1]).

all() -> [etcd_claims_are_exclusive_and_epochs_rise, etcd_kill_owner_sync_loses_no_acknowledged_write,
          etcd_outage_refuses_writes_then_recovers].

free_port() ->
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    ok = gen_tcp:close(L),
    Port.

init_per_testcase(_, Config) ->
    Etcd = os:find_executable("etcd"),
    ?assertNotEqual(false, Etcd),
    Dir = filename:join(?config(priv_dir, Config), "etcd_" ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    CP = free_port(), PP = free_port(),
    Client = "http://127.0.0.1:" ++ integer_to_list(CP),
    PeerUrl = "http://127.0.0.1:" ++ integer_to_list(PP),
    Port = open_port({spawn_executable, Etcd},
                     [{args, ["--name", "dspex_ct", "--data-dir", Dir,
                              "--listen-client-urls", Client, "--advertise-client-urls", Client,
                              "--listen-peer-urls", PeerUrl, "--initial-advertise-peer-urls", PeerUrl,
                              "--initial-cluster", "dspex_ct=" ++ PeerUrl, "--log-level", "error"]},
                      exit_status, stderr_to_stdout]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    {ok, _} = application:ensure_all_started(inets),
    %% etcd gives no readiness signal on a pipe: poll its health endpoint
    ok = dspex_cluster_SUITE:wait_until(fun() -> health(Client) end, 20000, etcd_up),
    [{etcd, {Port, OsPid, Dir}}, {endpoint, Client} | Config].

health(Client) ->
    case httpc:request(get, {Client ++ "/health", []}, [{timeout, 500}], [{body_format, binary}]) of
        {ok, {{_, 200, _}, _, Body}} -> binary:match(Body, <<"true">>) =/= nomatch;
        _ -> false
    end.

end_per_testcase(_, Config) ->
    case get(peers) of
        undefined -> ok;
        Peers -> dspex_cluster_SUITE:stop_cluster(Peers)
    end,
    {Port, OsPid, Dir} = ?config(etcd, Config),
    os:cmd("kill " ++ integer_to_list(OsPid)),
    receive {Port, {exit_status, _}} -> ok after 10000 -> os:cmd("kill -9 " ++ integer_to_list(OsPid)) end,
    _ = file:del_dir_r(Dir),
    ok.

conf(Config) ->
    #{replicas => 1, replication => sync, backend => etcd,
      etcd => #{endpoint => ?config(endpoint, Config), ttl => 2}}.

etcd_claims_are_exclusive_and_epochs_rise(Config) ->
    Peers = dspex_cluster_SUITE:start_cluster("dspex_etcdc", conf(Config)),
    put(peers, Peers),
    [{_, PA}, {_, PB} | _] = Peers,
    V = peer:call(PA, dspex_cluster_members, view, []),
    %% one node holds the key; the other is refused while it does
    {ok, E1} = peer:call(PA, dspex_owner_etcd, claim, [<<"claim_s">>, 1, V]),
    NA = peer:call(PA, erlang, node, []),
    ?assertEqual({error, {held_by, NA}}, peer:call(PB, dspex_owner_etcd, claim, [<<"claim_s">>, 1, V])),
    %% claiming again as the holder gives a higher epoch (a newer revision)
    {ok, E2} = peer:call(PA, dspex_owner_etcd, claim, [<<"claim_s">>, E1 + 1, V]),
    ?assert(E2 > E1),
    ok = peer:call(PA, dspex_owner_etcd, release, [<<"claim_s">>]),
    {ok, E3} = peer:call(PB, dspex_owner_etcd, claim, [<<"claim_s">>, E2 + 1, V]),
    ?assert(E3 > E2),
    %% writes through the store work and carry etcd epochs
    S = <<"etcd_s">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    [?assertEqual({ok, I}, peer:call(PB, dspex_store, set, [S, x, I])) || I <- lists:seq(1, 20)],
    ?assertEqual({ok, 20}, peer:call(PA, dspex_store, get_value, [S, x])),
    Config.

etcd_kill_owner_sync_loses_no_acknowledged_write(Config) ->
    Peers = dspex_cluster_SUITE:start_cluster("dspex_etcdk", conf(Config)),
    put(peers, Peers),
    dspex_cluster_SUITE:run_kill_test(Peers, Config).

%% etcd paused (SIGSTOP): once the leases can no longer be renewed every node
%% refuses writes with no_quorum; when it resumes, new leases are granted,
%% sessions are claimed again and writes go on with the data intact.
etcd_outage_refuses_writes_then_recovers(Config) ->
    Peers = dspex_cluster_SUITE:start_cluster("dspex_etcdo", conf(Config)),
    put(peers, Peers),
    [{_, PA}, {_, PB} | _] = Peers,
    S = <<"outage_s">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {ok, 1} = peer:call(PB, dspex_store, set, [S, x, 1]),
    {_, OsPid, _} = ?config(etcd, Config),
    [] = os:cmd("kill -STOP " ++ integer_to_list(OsPid)),
    try
        ok = dspex_cluster_SUITE:wait_until(
               fun() -> lists:all(fun({_, P}) -> peer:call(P, dspex_store, set, [S, x, 99]) =:= {error, no_quorum} end,
                                  Peers) end, 15000, no_quorum_everywhere)
    after
        os:cmd("kill -CONT " ++ integer_to_list(OsPid))
    end,
    %% (writes made before the leases lapsed succeeded: the version is whatever
    %% it reached, and the next write follows it)
    ok = dspex_cluster_SUITE:wait_until(fun() -> element(1, peer:call(PB, dspex_store, set, [S, x, 2])) =:= ok end,
                                        20000, writes_resume),
    ?assertEqual({ok, 2}, peer:call(PA, dspex_store, get_value, [S, x])),
    {ok, #{version := V}} = peer:call(PA, dspex_store, get, [S, x]),
    {ok, [#{version := Prev, value := PrevValue} | _]} = peer:call(PA, dspex_store, history, [S, x]),
    ?assertEqual(V - 1, Prev),
    ?assert(lists:member(PrevValue, [1, 99])).
