%% EUnit: the NIF side of the cache hit path (issue #16; c_src/core/cache.c,
%% the cache_* NIFs of c_src/nif/store_nif.c) without a cluster: a copy
%% session armed by hand answers cached and strong reads only while fresh,
%% the default read of var_get/2 and var_get_value/2, long ids, big values,
%% the hit counter, the second-chance bit and bad arguments. `make
%% test-nif-asan' runs it against the sanitizer build.
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
