%% Common Test: the `dspex_models' registry across three `peer' nodes (the
%% cluster helpers of dspex_cluster_SUITE). The registry is a store session,
%% so it is routed to its owner from every node and survives a kill -9 of it.
-module(dspex_models_cluster_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([registry_is_shared_and_survives_owner_failover/1]).

all() -> [registry_is_shared_and_survives_owner_failover].

init_per_testcase(_, Config) -> Config.

end_per_testcase(_, _Config) ->
    case get(peers) of
        undefined -> ok;
        Peers -> dspex_cluster_SUITE:stop_cluster(Peers)
    end,
    ok.

call(P, F, A) -> peer:call(P, dspex_models, F, A).

registry_is_shared_and_survives_owner_failover(_Config) ->
    Peers = dspex_cluster_SUITE:start_cluster("models", #{replication => sync, replicas => 1}),
    put(peers, Peers),
    [{_, P1} | _] = Peers,
    N = <<"clf">>,
    {ok, A} = call(P1, register_model, [#{name => N, version => <<"1">>, params => #{depth => 3}}]),
    {ok, B} = call(P1, register_model, [#{name => N, version => <<"2">>}]),
    ok = call(P1, set_alias, [N, production, A]),
    ok = call(P1, set_alias, [N, staging, B]),
    %% every node sees the same registry; name+version is unique cluster-wide
    [begin
         ?assertMatch({ok, #{id := A, params := #{depth := 3}}}, call(P, get_model, [A])),
         ?assertEqual({ok, A}, call(P, get_alias, [N, production])),
         ?assertEqual({error, {already_exists, B}}, call(P, register_model, [#{name => N, version => <<"2">>}])),
         ?assertEqual({ok, A}, call(P, select_model, [N, #{user_id => <<"u1">>}]))
     end || {_, P} <- Peers],
    %% kill -9 the registry session's owner
    {ok, Owner} = peer:call(P1, dspex_cluster, owner_of, [dspex_models:registry_session()]),
    ok = dspex_cluster_SUITE:kill_node(Owner, Peers),
    [{_, Survivor} | _] = [X || {Node, _} = X <- Peers, Node =/= Owner],
    ok = dspex_cluster_SUITE:wait_until(
           fun() -> call(Survivor, get_alias, [N, production]) =:= {ok, A} end, 20000, registry_after_failover),
    ?assertMatch({ok, #{id := B, status := active}}, call(Survivor, get_model, [B])),
    {ok, Ms} = call(Survivor, list_models, [N]),
    ?assertEqual([A, B], [maps:get(id, M) || M <- Ms]),
    ?assertEqual(#{<<"production">> => A, <<"staging">> => B}, call(Survivor, aliases, [N])),
    %% every survivor has published its routing table (production = A)
    Survivors = [P || {Node, P} <- Peers, Node =/= Owner],
    [ok = peer:call(P, dspex_models, evaluate, []) || P <- Survivors],
    [{single, A} = peer:call(P, persistent_term, get, [{dspex_models_route, N}]) || P <- Survivors],
    %% and it takes changes: an alias move with compare-and-set, a new version
    ok = call(Survivor, set_alias, [N, production, B, #{expected => A}]),
    {ok, C} = call(Survivor, register_model, [#{name => N, version => <<"3">>}]),
    [begin
         ?assertEqual({ok, B}, call(P, get_alias, [N, production])),
         ?assertMatch({ok, #{id := C}}, call(P, get_model, [C])),
         %% the other node's table follows the move at its next evaluation (a
         %% tick every models_check_interval_ms, 1 s by default)
         ok = dspex_cluster_SUITE:wait_until(
                fun() -> call(P, select_model, [N, #{user_id => <<"u1">>}]) =:= {ok, B} end,
                20000, production_move_seen)
     end || P <- Survivors],
    ok.
