%% Common Test: `dspex_models' across three `peer' nodes (the helpers of
%% dspex_cluster_SUITE). The registry, the A/B tests and the rollouts live in
%% one store session, so they are routed to its owner from every node and
%% survive a kill -9 of it: the new owner resumes every test with the same
%% routing and the counts of all nodes' checkpoints.
-module(dspex_models_cluster_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([registry_is_shared_and_survives_owner_failover/1,
         experiments_and_rollouts_survive_owner_failover/1]).
%% run on the peers
-export([traffic/4, routes/2]).

all() -> [registry_is_shared_and_survives_owner_failover,
          experiments_and_rollouts_survive_owner_failover].

init_per_testcase(_, Config) -> Config.

end_per_testcase(_, _Config) ->
    case get(peers) of
        undefined -> ok;
        Peers -> dspex_cluster_SUITE:stop_cluster(Peers)
    end,
    case get(tmpdir) of
        undefined -> ok;
        Dir -> file:del_dir_r(Dir)
    end,
    ok.

%% three peers like dspex_cluster_SUITE:start_cluster/2, each with its
%% event log in a temporary directory this suite removes
start_cluster(Base, Conf) ->
    Dir = filename:join(os:getenv("TMPDIR", "/tmp"),
                        "dspex_models_ct_" ++ os:getpid() ++ "_" ++
                            integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Dir),
    put(tmpdir, Dir),
    Host = hd(string:split(net_adm:localhost(), ".")),
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    Peers = [begin
                 {ok, P, Node} = peer:start(#{name => Base ++ "_" ++ X, host => Host,
                                              connection => standard_io,
                                              args => ["-setcookie", "dspex_ct", "-connect_all", "false",
                                                       "-kernel", "prevent_overlapping_partitions", "false",
                                                       "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"
                                                       | Paths]}),
                 {Node, P}
             end || X <- ["a", "b", "c"]],
    put(peers, Peers),
    Nodes = [N || {N, _} <- Peers],
    [begin
         ok = peer:call(P, application, load, [dspex_bridge]),
         ok = peer:call(P, application, set_env, [dspex_bridge, event_dir,
                                                   filename:join(Dir, atom_to_list(N))]),
         ok = peer:call(P, application, set_env, [dspex_bridge, grpc_enabled, false]),
         ok = peer:call(P, application, set_env, [dspex_bridge, cluster, Conf#{nodes => Nodes}]),
         {ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge])
     end || {N, P} <- Peers],
    ok = dspex_cluster_SUITE:wait_until(
           fun() ->
                   lists:all(fun({_, P}) ->
                                     maps:get(live, peer:call(P, dspex_cluster, cluster_status, [])) =:= Nodes
                             end, Peers)
           end, 20000, all_live),
    Peers.

call(P, F, A) -> peer:call(P, dspex_models, F, A).

registry_is_shared_and_survives_owner_failover(_Config) ->
    Peers = start_cluster("models", #{replication => sync, replicas => 1}),
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

%% An A/B test and a rollout started from a node that does not own the
%% registry; traffic on all three nodes; the owner is killed (kill -9) while
%% both run: a survivor takes over with the same status, step, routing and
%% the counts of every node's last checkpoint, and both go on to their end.
experiments_and_rollouts_survive_owner_failover(_Config) ->
    Peers = start_cluster("modx", #{replication => sync, replicas => 1}),
    [{_, P1} | _] = Peers,
    {ok, Owner} = peer:call(P1, dspex_cluster, owner_of, [dspex_models:registry_session()]),
    [{_, Starter} | _] = [X || {Node, _} = X <- Peers, Node =/= Owner],
    {N1, A1, B1} = models(Starter, <<"abx">>),
    {N2, A2, B2} = models(Starter, <<"rox">>),
    {ok, T} = call(Starter, start_ab_test, [#{salt => <<"c1">>, model => N1, variants => [{A1, 50}, {B1, 50}], mde => 0.05}]),
    %% min_samples 1000: the new model's samples of one node (about 200 a
    %% round at 10%) cannot complete a step alone
    {ok, R} = call(Starter, start_rollout, [N2, B2, #{salt => <<"cr2">>, steps => [10, 50, 100], step_duration => 0,
                                                       min_samples => 1000,
                                                       gates => [#{metric => error_rate,
                                                                   max_degradation => 0.02}]}]),
    AB = #{A1 => {0.80, 20}, B1 => {0.90, 20}},
    Good = #{A2 => {0.98, 20}, B2 => {0.98, 20}},
    %% every node routes both names alike at once (the starter) or after its
    %% next sync (the others)
    [ok = peer:call(P, dspex_models_server, sync, []) || {_, P} <- Peers],
    Users = lists:seq(1, 300),
    [Route1, Route2] = [peer:call(P1, ?MODULE, routes, [N, Users]) || N <- [N1, N2]],
    ?assertEqual([{ok, A1}, {ok, B1}], lists:usort(Route1)),
    ?assertEqual([{ok, A2}, {ok, B2}], lists:usort(Route2)),
    [begin
         ?assertEqual(Route1, peer:call(P, ?MODULE, routes, [N1, Users])),
         ?assertEqual(Route2, peer:call(P, ?MODULE, routes, [N2, Users]))
     end || {_, P} <- Peers],
    %% 100 units per node on the test: not enough to decide
    [ok = peer:call(P, ?MODULE, traffic, [N1, lists:seq(I * 100, I * 100 + 99), AB, I])
     || {I, {_, P}} <- lists:enumerate(Peers)],
    %% the rollout to its second step (50%) with traffic on every node
    Step2 = fun Loop(Round) when Round =< 20 ->
                    [ok = peer:call(P, ?MODULE, traffic, [N2, lists:seq(Round * 10000 + I * 2000,
                                                                         Round * 10000 + I * 2000 + 1999),
                                                          Good, Round * 10 + I])
                     || {I, {_, P}} <- lists:enumerate(Peers)],
                    [ok = peer:call(P, dspex_models, evaluate, []) || {_, P} <- Peers],
                    case call(Starter, results, [R]) of
                        {ok, #{step := 2}} -> ok;
                        {ok, #{status := running, step := 1}} -> Loop(Round + 1)
                    end
            end,
    ok = Step2(1),
    [ok = peer:call(P, dspex_models, evaluate, []) || {_, P} <- Peers],
    {ok, #{status := running, decision := continue, arm_summary := ArmsT}} = call(Starter, results, [T]),
    ?assertEqual(300, lists:sum([maps:get(n, A) || {_, A} <- ArmsT])),
    {ok, #{status := running, step := 2, percent := 50, arm_summary := ArmsR}} = call(Starter, results, [R]),
    NR = lists:sum([maps:get(n, A) || {_, A} <- ArmsR]),
    Route2b = peer:call(Starter, ?MODULE, routes, [N2, Users]),
    [?assertEqual(Route2b, peer:call(P, ?MODULE, routes, [N2, Users])) || {_, P} <- Peers],

    ok = dspex_cluster_SUITE:kill_node(Owner, Peers),
    Survivors = [P || {Node, P} <- Peers, Node =/= Owner],
    ok = dspex_cluster_SUITE:wait_until(
           fun() -> {ok, #{status := running}} = call(Starter, results, [T]), true end,
           30000, test_after_failover),
    {ok, NewOwner} = peer:call(Starter, dspex_cluster, owner_of, [dspex_models:registry_session()]),
    ?assertNotEqual(Owner, NewOwner),
    %% nothing lost: every node had checkpointed its counts
    {ok, #{arm_summary := ArmsT2}} = call(Starter, results, [T]),
    ?assertEqual(ArmsT, ArmsT2),
    {ok, #{status := running, step := 2, percent := 50, arm_summary := ArmsR2}} = call(Starter, results, [R]),
    ?assertEqual(NR, lists:sum([maps:get(n, A) || {_, A} <- ArmsR2])),
    [begin
         ok = peer:call(P, dspex_models, evaluate, []),
         ?assertEqual(Route1, peer:call(P, ?MODULE, routes, [N1, Users])),
         ?assertEqual(Route2b, peer:call(P, ?MODULE, routes, [N2, Users]))
     end || P <- Survivors],
    %% both go on on the new owner: the test decides, the rollout completes
    Finish = fun Loop(Round) when Round =< 40 ->
                     [begin
                          ok = peer:call(P, ?MODULE, traffic, [N1, lists:seq(Round * 100000 + I * 1000,
                                                                              Round * 100000 + I * 1000 + 999),
                                                               AB, 1000 + Round * 10 + I]),
                          ok = peer:call(P, ?MODULE, traffic, [N2, lists:seq(Round * 100000 + I * 2000,
                                                                              Round * 100000 + I * 2000 + 1999),
                                                               Good, 2000 + Round * 10 + I])
                      end || {I, P} <- lists:enumerate(Survivors)],
                     [ok = peer:call(P, dspex_models, evaluate, []) || P <- Survivors],
                     case {call(Starter, results, [T]), call(Starter, results, [R])} of
                         {{ok, #{status := finished}}, {ok, #{status := finished}}} -> ok;
                         _ -> Loop(Round + 1)
                     end
             end,
    ok = Finish(1),
    {ok, #{decision := {winner, B1}}} = call(Starter, results, [T]),
    {ok, #{decision := completed, percent := 100}} = call(Starter, results, [R]),
    [begin
         ?assertEqual({ok, B2}, call(P, get_alias, [N2, production])),
         ok = dspex_cluster_SUITE:wait_until(
                fun() ->
                        ok = peer:call(P, dspex_models_server, sync, []),
                        [{ok, A1}] =:= lists:usort(peer:call(P, ?MODULE, routes, [N1, Users])) andalso
                            [{ok, B2}] =:= lists:usort(peer:call(P, ?MODULE, routes, [N2, Users]))
                end, 20000, routing_after_the_end)
     end || P <- Survivors],
    %% the new owner's event log has the decisions made after the failover
    NewOwnerPeer = proplists:get_value(NewOwner, Peers),
    ok = peer:call(NewOwnerPeer, dspex_events, await, []),
    {ok, Evs} = peer:call(NewOwnerPeer, dspex_events, read,
                          [dspex_models:registry_session(),
                           #{types => [model_decision, rollout_step, rollout_completed]}]),
    Mine = [{Ty, maps:get(id, D)} || #{type := Ty, data := D} <- Evs],
    ?assert(lists:member({model_decision, T}, Mine)),
    ?assert(lists:member({rollout_completed, R}, Mine)),
    ok.

models(P, Prefix) ->
    N = <<Prefix/binary, (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    {ok, A} = call(P, register_model, [#{name => N, version => <<"1">>}]),
    {ok, B} = call(P, register_model, [#{name => N, version => <<"2">>}]),
    ok = call(P, set_alias, [N, production, A]),
    {N, A, B}.

%% @doc (on a peer) one request per user of `Users': the selected model's
%% `{SuccessProbability, MedianMs}' from `Profile', seeded by `Seed'.
-spec traffic(binary(), [integer()], #{binary() => {float(), number()}}, integer()) -> ok.
traffic(Name, Users, Profile, Seed) ->
    lists:foldl(fun(U, R0) ->
                        {ok, M} = dspex_models:select_model(Name, #{user_id => U}),
                        {P, Med} = maps:get(M, Profile),
                        {X, R1} = rand:uniform_s(R0),
                        {G, R2} = rand:normal_s(R1),
                        ok = dspex_models:record_inference(M, Med * math:exp(0.3 * G), X < P, #{}),
                        R2
                end, rand:seed_s(exsss, {19, 7, Seed}), Users),
    ok.

%% @doc (on a peer) the model of each user.
-spec routes(binary(), [integer()]) -> [term()].
routes(Name, Users) -> [dspex_models:select_model(Name, #{user_id => U}) || U <- Users].
