%% EUnit: the cluster layer on a one-node cluster (this node, not
%% distributed, `replicas => 0'): the configuration is checked before
%% anything starts, a drain that would leave no owner is refused with nothing
%% changed, calls naming sessions that do not exist leave no state behind, and
%% deleted sessions (deleted or expired) leave no rows once their tombstones
%% are reaped.
-module(dspex_cluster_one_node_tests).
-include_lib("eunit/include/eunit.hrl").

-define(ONE, #{nodes => [node()], replicas => 0}).

one_node_test_() ->
    {setup, fun() -> {ok, _} = application:ensure_all_started(dspex_bridge) end,
     fun(_) -> ok end,
     [{"the configuration is checked at start", fun configuration_is_checked/0},
      {"a bad configuration stops the cluster from starting", fun bad_configuration_does_not_start/0},
      {"drain of the only owner is refused, nothing changed",
       fun() -> with_cluster(fun drain_of_the_only_owner_is_refused/0) end},
      {"writes while every node drains say so",
       fun() -> with_cluster(fun writes_while_every_node_drains_say_so/0) end},
      {"calls on unknown sessions leave nothing behind",
       fun() -> with_cluster(fun unknown_sessions_leave_nothing_behind/0) end},
      {timeout, 60, {"deleted and expired sessions leave no rows",
       fun() -> dspex_one_node_cluster:with(#{keepalive_ms => 50}, fun deleted_sessions_leave_no_rows/0) end}},
      {"a change for a session without a row is refused, nothing created",
       fun() -> with_cluster(fun a_change_without_a_row_is_refused/0) end}]}.

%% The application's cluster supervisor restarted as a one-node cluster, F
%% run, then restarted without a cluster again.
with_cluster(F) -> dspex_one_node_cluster:with(#{}, F).

configuration_is_checked() ->
    Bad = fun(K, C) -> ?assertEqual({error, {invalid_argument, K}}, dspex_cluster_sup:config_of(C)) end,
    Bad(nodes, #{nodes => []}),
    Bad(nodes, #{nodes => ['other@host']}),   % this node missing: never a quorum
    Bad(nodes, #{nodes => foo}),
    Bad(nodes, #{nodes => [<<"a">>]}),
    Bad(nodes, #{nodes => [node() | foo]}),
    Bad(keepalive_ms, ?ONE#{keepalive_ms => -5}),
    Bad(keepalive_ms, ?ONE#{keepalive_ms => 0}),
    Bad(keepalive_ms, ?ONE#{keepalive_ms => foo}),
    Bad(keepalive_ms, ?ONE#{keepalive_ms => 1 bsl 32}),
    Bad(backend, ?ONE#{backend => bogus}),
    Bad(backend, ?ONE#{backend => lists}),   % loadable, not an ownership backend
    Bad(backend, ?ONE#{backend => "static"}),
    Bad(etcd, ?ONE#{backend => etcd, etcd => "http://127.0.0.1:2379"}),
    Bad({unknown_key, replicaz}, ?ONE#{replicaz => 3}),
    Bad(cluster, [{nodes, [node()]}]),
    ?assertMatch(#{nodes := [_], keepalive_ms := 5000, backend := dspex_owner_static}, dspex_cluster_sup:config_of(?ONE)),
    ?assertMatch(#{keepalive_ms := 250, backend := dspex_owner_etcd},
                 dspex_cluster_sup:config_of(?ONE#{keepalive_ms => 250, backend => etcd})),
    %% duplicates are one node
    ?assertMatch(#{nodes := [_]}, dspex_cluster_sup:config_of(#{nodes => [node(), node()]})).

bad_configuration_does_not_start() ->
    [begin
         application:set_env(dspex_bridge, cluster, C),
         try
             ok = supervisor:terminate_child(dspex_bridge_sup, dspex_cluster_sup),
             ?assertEqual({error, {bad_return, {dspex_cluster_sup, init, {error, {invalid_argument, K}}}}},
                          supervisor:restart_child(dspex_bridge_sup, dspex_cluster_sup))
         after
             application:unset_env(dspex_bridge, cluster),
             dspex_one_node_cluster:restart()
         end
     end || {K, C} <- [{nodes, #{nodes => foo}}, {nodes, #{nodes => [<<"a">>]}},
                       {keepalive_ms, ?ONE#{keepalive_ms => -5}}, {backend, ?ONE#{backend => bogus}},
                       {{unknown_key, replicaz}, ?ONE#{replicaz => 3}}]],
    ?assertNot(dspex_cluster:enabled()).

drain_of_the_only_owner_is_refused() ->
    S = <<"one_drain">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    ?assertEqual({error, no_other_owner}, dspex_cluster:drain(node())),
    ?assertMatch(#{draining := [], quorum := true}, dspex_cluster:cluster_status()),
    ?assertEqual({ok, 1}, dspex_store:set(S, x, 2)),
    ?assertEqual([S], dspex_cluster:owned_sessions()),
    ok = dspex_store:delete_session(S).

writes_while_every_node_drains_say_so() ->
    S = <<"one_draining">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    %% as when the drains of two nodes cross (each saw the other eligible)
    ok = dspex_cluster_members:set_draining(node(), true),
    try
        ?assertMatch(#{quorum := true, draining := [_]}, dspex_cluster:cluster_status()),
        ?assertEqual({error, {unavailable, draining}}, dspex_store:set(S, x, 2)),
        ?assertEqual({error, {unavailable, draining}}, dspex_store:create_session(<<"one_draining2">>))
    after
        ok = dspex_cluster_members:set_draining(node(), false)
    end,
    ?assertEqual({ok, 1}, dspex_store:set(S, x, 2)),
    ok = dspex_store:delete_session(S).

unknown_sessions_leave_nothing_behind() ->
    Tab = dspex_cluster_replica:table(),
    Rows0 = ets:info(Tab, size),
    Owned0 = dspex_cluster:owned_sessions(),
    Shipped0 = ets:info(dspex_cluster_shipper:shipped_table(), size),
    Ids = [<<"one_ghost", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 300)],
    [?assertEqual({error, session_not_found}, dspex_store:get(G, x)) || G <- Ids],
    [?assertEqual(false, dspex_store:exists(G, x)) || G <- Ids],
    Me = node(),
    [?assertMatch({ok, #{status := current, node := Me, epoch := 0}}, dspex_cluster:read_status(G)) || G <- Ids],
    %% a write that needs the session finds none, and takes nothing over
    [?assertEqual({error, session_not_found}, dspex_store:set(G, x, 1)) || G <- Ids],
    ?assertEqual({error, session_not_found}, dspex_cluster:migrate_session(hd(Ids), node())),
    ?assertEqual(Rows0, ets:info(Tab, size)),
    ?assertEqual(Owned0, dspex_cluster:owned_sessions()),
    ?assertEqual(#{}, maps:get(overrides, dspex_cluster_members:view())),
    ?assertEqual(Shipped0, ets:info(dspex_cluster_shipper:shipped_table(), size)),
    %% the same ids work as sessions once created
    G1 = hd(Ids),
    {ok, _} = dspex_store:create_session(G1),
    {ok, _} = dspex_store:register(G1, x, integer, 1),
    ?assertMatch({ok, #{value := 1}}, dspex_store:get(G1, x)),
    ?assertMatch({ok, #{epoch := E}} when E > 0, dspex_cluster:read_status(G1)),
    ?assertMatch({ok, #{epoch := _}}, dspex_cluster:migrate_session(G1, node())),
    ok = dspex_store:delete_session(G1).

%% The rows of what keys on a session id in the cluster layer.
row_counts() ->
    [{T, ets:info(T, size)} || T <- [dspex_cluster_replica:table(), dspex_cluster_shipper:shipped_table(),
                                     dspex_cache_vv, dspex_cache_regs]].

rows_of(S) ->
    [T || T <- [dspex_cluster_replica:table(), dspex_cluster_shipper:shipped_table(), dspex_cache_vv],
          ets:member(T, S)].

deleted_sessions_leave_no_rows() ->
    Counts0 = row_counts(),
    Ids = [<<"one_churn", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 500)],
    [begin
         {ok, _} = dspex_store:create_session(S),
         {ok, _} = dspex_store:register(S, x, integer, 1),
         ok = dspex_store:delete_session(S)
     end || S <- Ids],
    %% one expired by its TTL, its deletion replicated by the keeper
    Exp = <<"one_churn_ttl">>,
    {ok, _} = dspex_store:create_session(Exp, #{ttl => 1}),
    {ok, _} = dspex_store:register(Exp, x, integer, 1),
    All = [Exp | Ids],
    ?assertNotEqual([], rows_of(hd(Ids))),   % the tombstone, until reaped
    ok = wait_until(fun() -> lists:all(fun(S) -> rows_of(S) =:= [] end, All) end, 20000),
    ?assertEqual(Counts0, row_counts()),
    %% gone for reads, leaving nothing behind; the id can be created again
    [?assertEqual({error, session_not_found}, dspex_store:get(S, x)) || S <- All],
    ?assertEqual([], rows_of(hd(Ids))),
    S1 = hd(Ids),
    {ok, _} = dspex_store:create_session(S1),
    {ok, _} = dspex_store:register(S1, x, integer, 7),
    ?assertEqual({ok, 7}, dspex_store:get_value(S1, x)),
    ?assertEqual([S1], [S || S <- dspex_cluster:owned_sessions(), lists:member(S, All)]),
    ok = dspex_store:delete_session(S1),
    ok = wait_until(fun() -> rows_of(S1) =:= [] end, 20000).

a_change_without_a_row_is_refused() ->
    S = <<"one_rowless">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    {ok, Export} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    Gone = <<"one_rowless_gone">>,
    %% a straggler full copy of a session whose rows were removed: applying it
    %% would bring the session back
    ?assertEqual({error, need_full},
                 dspex_cluster_replica:apply_change(Gone, 3, 2, node(), {full, Export#{id => Gone}})),
    ?assertEqual({error, session_not_found}, dspex_cluster:local_apply(get_session, [Gone])),
    ?assertEqual([], rows_of(Gone)).

wait_until(F, Timeout) -> dspex_one_node_cluster:wait_until(F, Timeout).
