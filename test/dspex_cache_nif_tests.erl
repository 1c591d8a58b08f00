%% EUnit: the NIF side of the cache hit path (issue #16; c_src/core/cache.c,
%% the cache_* NIFs of c_src/nif/store_nif.c) without a cluster: a copy
%% session armed by hand answers cached and strong reads only while fresh,
%% the default read of var_get/2 and var_get_value/2, long ids, big values,
%% the hit counter, the second-chance bit and bad arguments. `make
%% test-nif-asan' runs it against the sanitizer build. Then the Erlang API's
%% checks of its options and configuration (`dspex_cache',
%% `dspex_store:get/3'), without a cluster and on a one-node cluster.
-module(dspex_cache_nif_tests).
-include_lib("eunit/include/eunit.hrl").

-define(MS, 1000000).

copy(S, Vars) ->
    Id = dspex_cache:cache_id(S),
    _ = dspex_nif:session_delete(Id),
    {ok, _} = dspex_store:create_session(S),
    [{ok, _} = dspex_store:register(S, K, T, V) || {K, T, V} <- Vars],
    {ok, Exp} = dspex_nif:export_session(S),
    ok = dspex_nif:import_session(Exp#{id => Id, ttl => infinity}),
    ok = dspex_store:delete_session(S),
    Id.

nif_hit_path_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end,
     fun(_) -> ok = dspex_store:refresh_fast_path() end,
     [fun freshness/0, fun default_read/0, fun long_ids_big_values_and_bad_arguments/0]}.

freshness() ->
    S = <<"cnif_fresh">>,
    Id = copy(S, [{x, integer, 7}]),
    %% imported, never armed: no read answers
    stale = dspex_nif:cache_get_value(S, x, 100000),
    stale = dspex_nif:cache_get_value(S, x, strong),
    miss = dspex_nif:cache_get_value(<<"cnif_none">>, x, 100000),
    H0 = dspex_nif:cache_hits(false),
    Now = dspex_cache:clock(),
    Gen = dspex_nif:cache_gen(current),
    ok = dspex_nif:cache_arm(Id, Now, Gen, 0),
    {ok, 7} = dspex_nif:cache_get_value(S, x, 100000),
    {var, _, _, _, _, <<"x">>, integer, _, 7, 0} = dspex_nif:cache_get(S, <<"x">>, 100000),
    {error, {not_found, y}} = dspex_nif:cache_get(S, y, 100000),
    stale = dspex_nif:cache_get_value(S, x, 0),
    stale = dspex_nif:cache_get_value(S, x, strong),
    ?assertEqual(H0 + 3, dspex_nif:cache_hits(false)),
    %% hits set the second-chance bit; taking it clears it
    {Now, Gen, 0, 1} = dspex_nif:cache_info(Id),
    true = dspex_nif:cache_take_ref(Id),
    false = dspex_nif:cache_take_ref(Id),
    %% a strong lease: strong reads until it ends
    ok = dspex_nif:cache_arm(Id, 0, 0, dspex_cache:clock() + 60000 * ?MS),
    {ok, 7} = dspex_nif:cache_get_value(S, x, strong),
    %% a view change: cached reads stale, the lease still answers strong ones
    Gen1 = dspex_nif:cache_gen(bump),
    ?assert(Gen1 > Gen),
    stale = dspex_nif:cache_get_value(S, x, 100000),
    {ok, 7} = dspex_nif:cache_get_value(S, x, strong),
    %% a renewal under the new view (an older fill time changes nothing)
    ok = dspex_nif:cache_arm(Id, Now - 1, Gen1, 0),
    {Now, Gen1, _, _} = dspex_nif:cache_info(Id),
    {ok, 7} = dspex_nif:cache_get_value(S, x, 100000),
    ok = dspex_nif:session_delete(Id),
    miss = dspex_nif:cache_get_value(S, x, 100000),
    {error, session_not_found} = dspex_nif:cache_info(Id),
    {error, session_not_found} = dspex_nif:cache_arm(Id, 1, 1, 1).

default_read() ->
    S = <<"cnif_default">>,
    Id = copy(S, [{x, integer, 3}]),
    ok = dspex_nif:cache_arm(Id, dspex_cache:clock(), dspex_nif:cache_gen(current), 0),
    try
        %% the reads made slow (as a cluster does), default cached 60 s: the
        %% NIF answers from the copy; off: slow
        ok = dspex_nif:store_fast_path(get, false),
        ok = dspex_nif:store_fast_path(get_value, false),
        ok = dspex_nif:cache_config(60000, false),
        {ok, 3} = dspex_nif:var_get_value(S, x),
        {var, _, _, _, _, <<"x">>, integer, _, 3, 0} = dspex_nif:var_get(S, <<"x">>),
        slow = dspex_nif:var_get(S, x, #{}),   % with options: never from the copy
        slow = dspex_nif:var_get_value(<<"cnif_none">>, x),
        ok = dspex_nif:cache_config(strong, false),
        slow = dspex_nif:var_get_value(S, x),   % no lease
        %% a hit event wanted: the explicit read answers `copy', var_get slow
        ok = dspex_nif:cache_config(60000, true),
        slow = dspex_nif:var_get_value(S, x),
        copy = dspex_nif:cache_get_value(S, x, 60000),
        ok = dspex_nif:cache_config(off, false),
        slow = dspex_nif:var_get_value(S, x),
        ?assertError(badarg, dspex_nif:cache_config(sometimes, false)),
        ?assertError(badarg, dspex_nif:cache_config(-1, false)),
        ?assertError(badarg, dspex_nif:cache_config(off, maybe))
    after
        ok = dspex_nif:cache_config(off, false),
        ok = dspex_store:refresh_fast_path(),
        _ = dspex_nif:session_delete(Id)
    end.

long_ids_big_values_and_bad_arguments() ->
    %% a session id longer than the NIF's stack buffer (256 bytes)
    L0 = dspex_store:limits(),
    ok = dspex_store:set_limits(#{max_name_length => 1024}),
    S = binary:copy(<<"L">>, 300),
    Id = try copy(S, [{x, integer, 1}, {big, string, binary:copy(<<"b">>, 300000)}])
         after ok = dspex_store:set_limits(maps:with([max_name_length], L0))
         end,
    ok = dspex_nif:cache_arm(Id, dspex_cache:clock(), dspex_nif:cache_gen(current), 0),
    {ok, 1} = dspex_nif:cache_get_value(S, x, 60000),
    %% a value for a dirty scheduler: the caller reads the copy itself
    copy = dspex_nif:cache_get_value(S, big, 60000),
    copy = dspex_nif:cache_get(S, big, 60000),
    {ok, Big} = dspex_nif:var_get_value_here(Id, big),
    ?assertEqual(300000, byte_size(Big)),
    ok = dspex_nif:session_delete(Id),
    %% a session that is not a binary is no copy; bad keys and bounds are badarg
    miss = dspex_nif:cache_get_value(not_a_binary, x, 100),
    ?assertError(badarg, dspex_nif:cache_get(<<"s">>, {1}, 100)),
    ?assertError(badarg, dspex_nif:cache_get(<<"s">>, x, -1)),
    ?assertError(badarg, dspex_nif:cache_get(<<"s">>, x, soon)),
    ?assertError(badarg, dspex_nif:cache_get(<<"s">>, x, 1 bsl 62)),
    ?assertError(badarg, dspex_nif:cache_arm(<<"s">>, x, 1, 1)),
    ?assertError(badarg, dspex_nif:cache_gen(later)),
    ?assertError(badarg, dspex_nif:cache_hits(maybe)).

%%% the Erlang API: options and configuration ---------------------------------

%% The application's cluster supervisor restarted under `Cluster' (a one-node
%% cluster), F run, then restarted without a cluster again.
with_cluster(Cluster, F) -> dspex_one_node_cluster:with(Cluster, F).

restart_cluster() -> dspex_one_node_cluster:restart().

api_test_() ->
    Cached = #{cache => #{mode => cached}},
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [{"get_value/3 checks access rules", fun get_value_checks_access_rules/0},
      {"get_value/3 checks access rules, cached cluster",
       fun() -> with_cluster(Cached, fun get_value_checks_access_rules/0) end},
      {"max_staleness_ms is bounded", fun max_staleness_is_bounded/0},
      {"max_staleness_ms is bounded, cached cluster",
       fun() -> with_cluster(Cached, fun max_staleness_is_bounded/0) end},
      {"strong is refused when disabled, with as too", fun strong_refused_when_disabled/0},
      {"without a cluster every call says so", fun not_clustered_everywhere/0},
      {"the cluster's cache configuration is checked", fun cache_configuration_is_checked/0}]}.

%% A session with one variable readable only by admin_* principals.
acl_session(S) ->
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, <<"secret">>, float, 42.0),
    ok = dspex_acl:set_permissions(S, <<"secret">>, [#{session_pattern => <<"admin_*">>, permissions => [read]}]).

get_value_checks_access_rules() ->
    S = <<"capi_acl">>,
    acl_session(S),
    try
        K = <<"secret">>,
        As = #{as => <<"intruder">>},
        %% get_value/3 takes the options of dspex_store:get/3: the same answer
        ?assertEqual({error, access_denied}, dspex_store:get(S, K, As)),
        ?assertEqual({error, access_denied}, dspex_cache:get(S, K, As)),
        ?assertEqual({error, access_denied}, dspex_cache:get_value(S, K, As)),
        [?assertEqual({error, access_denied}, dspex_cache:get_value(S, K, As#{read => M, max_staleness_ms => 50}))
         || M <- [owner, cached]],
        ?assertEqual({error, access_denied},
                     dspex_cache:get_value(S, K, #{as => <<"intruder">>, context => #{ip => <<"10.0.0.1">>}})),
        ?assertEqual({ok, 42.0}, dspex_cache:get_value(S, K, #{as => <<"admin_1">>})),
        ?assertEqual({ok, 42.0}, dspex_cache:get_value(S, K, #{as => <<"admin_1">>, read => cached})),
        %% a principal that is not a binary is the caller's type error, as elsewhere
        ?assertError(badarg, dspex_store:get(S, K, #{as => "intruder"})),
        ?assertError(badarg, dspex_cache:get_value(S, K, #{as => "intruder"}))
    after
        ok = dspex_store:delete_session(S)
    end.

max_staleness_is_bounded() ->
    S = <<"capi_stale">>,
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    try
        Limit = dspex_cache:max_staleness_limit(),
        ?assertEqual(86400000, Limit),
        Bad = {error, {invalid_argument, max_staleness_ms}},
        %% never the NIF's badarg (its bound is INT64_MAX / 10^6 ms)
        [?assertEqual(Bad, F(S, x, #{read => Mode, max_staleness_ms => Ms}))
         || F <- [fun dspex_store:get/3, fun dspex_cache:get/3, fun dspex_cache:get_value/3],
            Mode <- [cached, owner], Ms <- [Limit + 1, 1 bsl 62, -1, soon]],
        ?assertEqual(Bad, dspex_store:get(S, x, #{max_staleness_ms => 1 bsl 62})),
        ?assertEqual(Bad, dspex_cache:get_value(S, x, #{max_staleness_ms => 1 bsl 62, as => S})),
        ?assertMatch({ok, #{value := 1}}, dspex_store:get(S, x, #{read => cached, max_staleness_ms => Limit})),
        ?assertMatch({ok, #{value := 1}}, dspex_cache:get(S, x, #{read => cached, max_staleness_ms => Limit})),
        ?assertEqual({ok, 1}, dspex_cache:get_value(S, x, #{read => cached, max_staleness_ms => Limit}))
    after
        ok = dspex_store:delete_session(S)
    end.

strong_refused_when_disabled() ->
    S = <<"capi_strong">>,
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    try
        false = dspex_cache:strong_enabled(),
        Bad = {error, {invalid_argument, read}},
        ?assertEqual(Bad, dspex_store:get(S, x, #{read => strong})),
        %% with another option the read is not served in another mode either
        ?assertEqual(Bad, dspex_store:get(S, x, #{read => strong, as => S})),
        ?assertEqual(Bad, dspex_cache:get(S, x, #{read => strong, as => S})),
        ?assertEqual(Bad, dspex_cache:get_value(S, x, #{read => strong, as => S})),
        ?assertEqual(Bad, dspex_cache:get_value(S, x, #{read => strong}))
    after
        ok = dspex_store:delete_session(S)
    end.

not_clustered_everywhere() ->
    false = persistent_term:get(dspex_cluster_routing, false),
    E = {error, not_clustered},
    ?assertEqual(E, dspex_cache:stats()),
    ?assertEqual(E, dspex_cache:warm(<<"s">>)),
    ?assertEqual(E, dspex_cache:conflicts(<<"s">>)),
    ?assertEqual(E, dspex_cache:reset_stats()),
    ?assertEqual(E, dspex_cache:cached_sessions()).

cache_configuration_is_checked() ->
    C = #{nodes => [node()], replicas => 0},
    Limit = dspex_cache:max_staleness_limit(),
    Old = application:get_env(dspex_bridge, cache_max_bytes),
    try
        Stale = {error, {invalid_argument, {cache, max_staleness_ms}}},
        ?assertEqual(Stale, dspex_cluster_sup:config_of(C#{cache => #{max_staleness_ms => 1 bsl 62}})),
        ?assertEqual(Stale, dspex_cluster_sup:config_of(C#{cache => #{max_staleness_ms => Limit + 1}})),
        ?assertMatch(#{}, dspex_cluster_sup:config_of(C#{cache => #{max_staleness_ms => Limit}})),
        %% the environment's cache_max_bytes as the max_bytes key
        [begin
             application:set_env(dspex_bridge, cache_max_bytes, V),
             ?assertEqual({error, {invalid_argument, cache_max_bytes}}, dspex_cluster_sup:config_of(C)),
             ?assertEqual({error, {invalid_argument, cache_max_bytes}}, dspex_cache:max_bytes_config(#{}))
         end || V <- [foo, -5, 1.5]],
        application:set_env(dspex_bridge, cache_max_bytes, 4096),
        ?assertMatch(#{}, dspex_cluster_sup:config_of(C)),
        ?assertEqual({ok, 4096}, dspex_cache:max_bytes_config(#{})),
        ?assertEqual({ok, 10}, dspex_cache:max_bytes_config(#{max_bytes => 10})),
        ?assertEqual({error, {invalid_argument, {cache, max_bytes}}},
                     dspex_cluster_sup:config_of(C#{cache => #{max_bytes => -1}})),
        application:unset_env(dspex_bridge, cache_max_bytes),
        ?assertEqual({ok, 64 * 1024 * 1024}, dspex_cache:max_bytes_config(#{})),
        %% the application does not start its cluster with a bad one: an error, no badarg
        application:set_env(dspex_bridge, cluster, C#{cache => #{mode => cached, max_staleness_ms => 1 bsl 62}}),
        try
            ok = supervisor:terminate_child(dspex_bridge_sup, dspex_cluster_sup),
            ?assertEqual({error, {bad_return, {dspex_cluster_sup, init, Stale}}},
                         supervisor:restart_child(dspex_bridge_sup, dspex_cluster_sup))
        after
            application:unset_env(dspex_bridge, cluster),
            restart_cluster()
        end
    after
        case Old of
            undefined -> application:unset_env(dspex_bridge, cache_max_bytes);
            {ok, V0} -> application:set_env(dspex_bridge, cache_max_bytes, V0)
        end
    end.
