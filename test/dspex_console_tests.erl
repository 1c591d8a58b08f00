%% EUnit tests of the diagnostics API the debug console is built on
%% (dspex_store:diagnostics/1, dspex_graph:to_dot/1 + to_svg/1,2,
%% dspex_metrics:detailed/3,4, dspex_locks:active/0) and of the console's
%% pure parts (security policy, JSON encoding of terms).
-module(dspex_console_tests).
-include_lib("eunit/include/eunit.hrl").
-include_lib("xmerl/include/xmerl.hrl").

sid() -> iolist_to_binary(["console_", integer_to_list(erlang:unique_integer([positive]))]).

app_test_() ->
    {setup, fun() -> {ok, _} = application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun diagnostics_counts_variables_watchers_locks_rules_and_errors/0,
      fun diagnostics_of_unknown_session/0,
      fun diagnostics_page_is_diagnostics_cut_to_the_page/0,
      fun diagnostics_page_bytes_is_the_external_size_of_the_values/0,
      fun diagnostics_page_refuses_bad_input/0,
      fun diagnostics_page_takes_one_token/0,
      fun diagnostics_page_of_a_big_session_lists_nothing_whole/0,
      fun diagnostics_page_while_variables_change/0,
      fun to_dot_escapes_names/0,
      fun to_svg_draws_every_variable_as_a_node/0,
      fun to_svg_is_killed_at_its_timeout/0,
      fun detailed_has_one_point_per_second/0,
      fun detailed_uses_minutes_for_older_ranges/0,
      fun detailed_refuses_bad_ranges/0]}.

diagnostics_counts_variables_watchers_locks_rules_and_errors() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 600, metadata => #{owner => <<"me">>}}),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, _} = dspex_store:register(S, b, string, <<"hello">>),
    {ok, _} = dspex_store:set(S, a, 2.0),
    {ok, _} = dspex_graph:define_derived(S, <<"c">>, float, [a], fun(#{a := A}) when A > 2.5 -> error(boom); (#{a := A}) -> A end),
    Ref = dspex_store:watch(S, [a, b], self()),
    Ref2 = dspex_store:watch(S, [a], self()),
    ok = dspex_acl:set_permissions(S, b, [#{session_pattern => any, permissions => [read]}]),
    {ok, Lock} = dspex_locks:acquire(S, a, opt1, #{}),
    {ok, _} = dspex_store:set(S, a, 3.0, #{lock => Lock, propagate => sync}),
    {ok, D} = dspex_store:diagnostics(S),
    ?assertEqual({S, 3, 600, #{owner => <<"me">>}, not_clustered},
                 {maps:get(session, D), maps:get(variables, D), maps:get(ttl, D), maps:get(metadata, D),
                  maps:get(cluster, D)}),
    %% a: our two watches and the propagator's (c is derived from a)
    ?assertEqual(#{<<"a">> => 3, <<"b">> => 1}, maps:get(watched, D)),
    ?assertEqual(4, maps:get(watchers, D)),
    ?assertMatch([#{session := S, variable := <<"a">>, optimizer := opt1}], maps:get(locks, D)),
    ?assertMatch(#{<<"b">> := [_]}, maps:get(rules, D)),
    ?assertEqual([<<"c">>], maps:keys(maps:get(errors, D))),
    %% newest write first: a (v2) was written last
    ?assertMatch([#{name := <<"a">>, version := 2} | _], maps:get(last_writes, D)),
    ?assert(maps:get(history_entries, D) >= 2),
    ?assert(maps:get(bytes, D) >= byte_size(<<"hello">>)),
    TtlLeft = maps:get(ttl_left_ms, D),
    ?assert(TtlLeft > 0 andalso TtlLeft =< 600000),
    ok = dspex_locks:release(Lock),
    dspex_store:unwatch(Ref), dspex_store:unwatch(Ref2),
    {ok, D2} = dspex_store:diagnostics(S),
    ?assertMatch(#{locks := [], watchers := 1}, D2),
    ok = dspex_store:delete_session(S),
    flush().

flush() -> receive _ -> flush() after 0 -> ok end.

diagnostics_of_unknown_session() ->
    ?assertEqual({error, session_not_found}, dspex_store:diagnostics(sid())),
    ?assertError(function_clause, dspex_store:diagnostics(not_a_binary)).

%% What the console built before diagnostics_page/3 (from diagnostics/1,
%% list/1 and dspex_graph:to_map/1, each a copy of the whole session): the
%% reference the page must equal.
page_by_whole_copies(S, Offset, Limit) ->
    {ok, D} = dspex_store:diagnostics(S),
    {ok, Vars} = dspex_store:list(S),
    {ok, #{edges := Es}} = dspex_graph:to_map(S),
    Page = lists:sublist(Vars, Offset + 1, Limit),
    In = maps:from_keys([N || #{name := N} <- Page], true),
    Cut = maps:map(fun(K, M) when K =:= watched; K =:= changed_by; K =:= errors; K =:= rules ->
                           maps:with(maps:keys(In), M);
                      (_, V) -> V
                   end, D),
    #{diagnostics => steady(Cut), variables => Page,
      edges => [E || #{from := F, to := T} = E <- Es, maps:is_key(F, In) orelse maps:is_key(T, In)]}.

%% the two figures that follow the clock
steady(D) -> maps:without([last_accessed_at, ttl_left_ms], D).

page(S, Offset, Limit) ->
    {ok, #{diagnostics := D} = P} = dspex_store:diagnostics_page(S, Offset, Limit),
    P#{diagnostics => steady(D)}.

%% A session with every type (NaN and infinities inside embeddings and
%% tensors, integers at each encoding's bounds), history, watchers, a lock,
%% rules, edges, a derived variable whose last propagation failed, and
%% changed_by: each page equals the old copies' cut, at every offset.
diagnostics_page_is_diagnostics_cut_to_the_page() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 600, metadata => #{owner => <<"me">>}}),
    seed_every_type(S),
    {ok, _} = dspex_store:set(S, i1, 7, #{changed_by => <<"alice">>}),
    {ok, _} = dspex_store:set(S, i1, 8, #{changed_by => {robot, 1}}),
    {ok, _} = dspex_graph:define_derived(S, <<"d">>, float, [f1], fun(#{f1 := A}) when A > 2.5 -> error(boom);
                                                                      (#{f1 := A}) -> A end),
    ok = dspex_graph:add_dependency(S, i1, f1),
    ok = dspex_graph:add_dependency(S, b1, i2),
    {ok, _} = dspex_store:set(S, f1, 3.0, #{propagate => sync}),
    Ref = dspex_store:watch(S, [f1, s1], self()),
    ok = dspex_acl:set_permissions(S, s1, [#{session_pattern => any, permissions => [read]}]),
    {ok, Lock} = dspex_locks:acquire(S, i2, opt1, #{}),
    {ok, Vars} = dspex_store:list(S),
    N = length(Vars),
    try
        [?assertEqual({O, L, page_by_whole_copies(S, O, L)}, {O, L, page(S, O, L)})
         || {O, L} <- [{0, 500}, {0, 1}, {3, 4}, {N - 2, 10}, {N, 5}, {N + 100, 5}, {0, 0}]],
        %% a page names its edges and its variables' maps only
        #{diagnostics := D, edges := Es} = page(S, 0, 1),
        [#{name := First} | _] = Vars,
        ?assert(lists:all(fun(#{from := F, to := T}) -> F =:= First orelse T =:= First end, Es)),
        ?assert(lists:all(fun(M) -> lists:all(fun(K) -> K =:= First end, maps:keys(M)) end,
                          [maps:get(K, D) || K <- [watched, changed_by, errors, rules]])),
        ?assertEqual(N, maps:get(variables, D))
    after
        ok = dspex_locks:release(Lock),
        dspex_store:unwatch(Ref),
        ok = dspex_store:delete_session(S),
        flush()
    end.

seed_every_type(S) ->
    Ints = [0, 255, 256, -1, 2147483647, 2147483648, -2147483648, -2147483649, 9223372036854775807,
            -9223372036854775808, 1 bsl 40],
    [{ok, _} = dspex_store:register(S, iolist_to_binary(["i", integer_to_list(K)]), integer, V)
     || {K, V} <- lists:zip(lists:seq(1, length(Ints)), Ints)],
    Floats = [1.0, nan, infinity, neg_infinity, -0.0, 1.0e300],
    [{ok, _} = dspex_store:register(S, iolist_to_binary(["f", integer_to_list(K)]), float, V)
     || {K, V} <- lists:zip(lists:seq(1, length(Floats)), Floats)],
    {ok, _} = dspex_store:register(S, e1, embedding, [1.0, nan, infinity, neg_infinity, 2]),
    {ok, _} = dspex_store:register(S, e2, embedding, [0.5 || _ <- lists:seq(1, 40)]),
    {ok, _} = dspex_store:register(S, e3, embedding, []),
    {ok, _} = dspex_store:register(S, t1, tensor, #{shape => [2, 3], data => [1, 2, 3, nan, 5, infinity]}),
    {ok, _} = dspex_store:register(S, t2, tensor, #{shape => [256], data => [float(I) || I <- lists:seq(1, 256)]}),
    {ok, _} = dspex_store:register(S, t3, tensor, #{shape => [1, 300], data => [neg_infinity || _ <- lists:seq(1, 300)]}),
    {ok, _} = dspex_store:register(S, t4, tensor, #{shape => [0], data => []}),
    {ok, _} = dspex_store:register(S, b1, boolean, true),
    {ok, _} = dspex_store:register(S, b2, boolean, false),
    {ok, _} = dspex_store:register(S, s1, string, <<"hello">>),
    {ok, _} = dspex_store:register(S, s2, string, <<>>),
    {ok, _} = dspex_store:register(S, s3, string, binary:copy(<<"x">>, 70000)),
    {ok, _} = dspex_store:register(S, c1, choice, <<"b">>, #{constraints => #{choices => [<<"a">>, <<"b">>]}}),
    {ok, _} = dspex_store:register(S, m1, module, <<"Elixir.Foo">>),
    ok.

%% `bytes' is the sum of erlang:external_size/1 of the values, computed in
%% C without building them: every encoding (small and big integers, atoms
%% for NaN and the infinities, STRING_EXT shapes, empty lists) must agree.
diagnostics_page_bytes_is_the_external_size_of_the_values() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    seed_every_type(S),
    {ok, Vars} = dspex_store:list(S),
    Sum = lists:sum([erlang:external_size(V) || #{value := V} <- Vars]),
    {ok, #{diagnostics := #{bytes := Bytes}}} = dspex_store:diagnostics_page(S, 0, 1),
    ?assertEqual(Sum, Bytes),
    %% one variable at a time, so that a wrong size is named
    [begin
         S1 = sid(),
         {ok, _} = dspex_store:create_session(S1, #{}),
         {ok, _} = dspex_store:register(S1, N, T, V, #{constraints => C}),
         {ok, #{diagnostics := #{bytes := B}}} = dspex_store:diagnostics_page(S1, 0, 1),
         ?assertEqual({N, erlang:external_size(V)}, {N, B}),
         ok = dspex_store:delete_session(S1)
     end || #{name := N, type := T, value := V, constraints := C} <- Vars],
    ok = dspex_store:delete_session(S).

diagnostics_page_refuses_bad_input() ->
    ?assertEqual({error, session_not_found}, dspex_store:diagnostics_page(sid(), 0, 10)),
    [?assertError(function_clause, dspex_store:diagnostics_page(S, O, L))
     || {S, O, L} <- [{not_a_binary, 0, 1}, {<<"s">>, -1, 1}, {<<"s">>, 0, -1}, {<<"s">>, 1.0, 1}, {<<"s">>, 0, x}]],
    [?assertError(badarg, dspex_nif:session_page(S, O, L))
     || {S, O, L} <- [{"list", 0, 1}, {<<"s">>, -1, 1}, {<<"s">>, 0, -(1 bsl 70)}, {<<"s">>, 0.0, 1}, {<<"s">>, 0, x}]],
    %% an offset or limit beyond 64 bits is past any end, not an error
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    {ok, _} = dspex_store:register(S, a, integer, 1),
    ?assertMatch({ok, #{variables := [], diagnostics := #{variables := 1}}},
                 dspex_store:diagnostics_page(S, 1 bsl 70, 1)),
    ?assertMatch({ok, #{variables := [#{name := <<"a">>}]}}, dspex_store:diagnostics_page(S, 0, 1 bsl 70)),
    ok = dspex_store:delete_session(S).

%% A page is one operation on the session's data: one token of its rate
%% limit, whatever the session's size (the copies took one per variable).
diagnostics_page_takes_one_token() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{rate_limit => #{rate => 0.001, burst => 3}}),
    ok = dspex_acl:set_rate_limit(S, 0, 1),
    [{ok, _} = dspex_store:register(S, integer_to_binary(I), integer, I) || I <- lists:seq(1, 20)],
    ok = dspex_acl:set_rate_limit(S, 0.001, 3),
    [?assertMatch({ok, #{variables := [_, _, _, _, _]}}, dspex_store:diagnostics_page(S, 0, 5))
     || _ <- lists:seq(1, 3)],
    ?assertEqual({error, rate_limited}, dspex_store:diagnostics_page(S, 0, 5)),
    ok = dspex_store:delete_session(S).

%% The page of a session above the NIF's dirty threshold (2000 variables)
%% lists no whole session (no var_list, moved to a dirty scheduler or not)
%% and answers the page and the totals.
diagnostics_page_of_a_big_session_lists_nothing_whole() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    Names = [iolist_to_binary(io_lib:format("n~5..0b", [I])) || I <- lists:seq(1, 2500)],
    [{ok, _} = dspex_store:register(S, N, integer, 1) || N <- lists:reverse(Names)],
    #{var_list := Lists0} = dspex_nif:sched_stats(),
    {ok, #{variables := Page, diagnostics := #{variables := 2500, history_entries := 0}}} =
        dspex_store:diagnostics_page(S, 1200, 7),
    ?assertEqual(lists:sublist(Names, 1201, 7), [N || #{name := N} <- Page]),
    ?assertMatch(#{var_list := Lists0}, dspex_nif:sched_stats()),
    ok = dspex_store:delete_session(S).

%% Pages read while two processes write, register and delete variables
%% (the walk runs beside commits and deletions, on a dirty scheduler above
%% 2000 variables): every page is sorted, unique, at most the limit, and its
%% total between the fewest and the most variables there were.
diagnostics_page_while_variables_change() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    Name = fun(I) -> iolist_to_binary(io_lib:format("w~5..0b", [I])) end,
    [{ok, _} = dspex_store:register(S, Name(I), embedding, [1.0, 2.0]) || I <- lists:seq(1, 2200)],
    Parent = self(),
    Writer = fun(From) ->
                     fun Loop(I) ->
                             receive stop -> Parent ! {stopped, self()}
                             after 0 ->
                                     N = Name(From + I rem 200),
                                     _ = dspex_store:delete(S, N),
                                     _ = dspex_store:register(S, N, embedding, [float(I), nan]),
                                     {ok, _} = dspex_store:set(S, Name(I rem 2000 + 1), [float(I), infinity]),
                                     Loop(I + 1)
                             end
                     end
             end,
    Ws = [spawn_link(fun() -> (Writer(F))(0) end) || F <- [3000, 4000]],
    try
        [begin
             {ok, #{variables := Page, diagnostics := #{variables := Total}}} =
                 dspex_store:diagnostics_page(S, Offset, 300),
             Names = [N || #{name := N} <- Page],
             ?assertEqual(lists:usort(Names), Names),
             ?assert(length(Names) =< 300),
             ?assert(Total >= 2200 andalso Total =< 2600)
         end || _ <- lists:seq(1, 20), Offset <- [0, 1000, 2300]]
    after
        [W ! stop || W <- Ws],
        [receive {stopped, W} -> ok end || W <- Ws],
        ok = dspex_store:delete_session(S)
    end.

xss() -> <<"<img src=x onerror=alert(1)>">>.

%% names with quotes, backslashes, angle brackets and a newline
%% (and an entity: Graphviz would draw `a&amp;b' as `a&b')
odd_names() -> [xss(), <<"q\"uote">>, <<"back\\slash">>, <<"two\nlines">>, <<"a&amp;b">>, <<"plain">>].

seed_graph() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    [{ok, _} = dspex_store:register(S, N, integer, 1) || N <- odd_names()],
    [ok = dspex_graph:add_dependency(S, <<"plain">>, N) || N <- odd_names() -- [<<"plain">>]],
    S.

to_dot_escapes_names() ->
    S = seed_graph(),
    {ok, Dot} = dspex_graph:to_dot(S),
    ?assertNotEqual(nomatch, binary:match(Dot, <<"\"q\\\"uote\"">>)),
    ?assertNotEqual(nomatch, binary:match(Dot, <<"\"back\\\\slash\"">>)),
    ok = dspex_store:delete_session(S).

to_svg_draws_every_variable_as_a_node() ->
    S = seed_graph(),
    {ok, Svg} = dspex_graph:to_svg(S),
    %% well-formed XML whose node labels are exactly the names, as text, not
    %% markup (a name with a newline is drawn on two lines)
    {Doc, _} = xmerl_scan:string(binary_to_list(Svg), [{quiet, true}]),
    Labels = [iolist_to_binary([unicode:characters_to_binary(V) || #xmlElement{name = text, content = C} <- Cs,
                                                                    #xmlText{value = V} <- C])
              || #xmlElement{name = g, attributes = As, content = Cs} <- all_elements(Doc),
                 lists:any(fun(#xmlAttribute{name = class, value = "node"}) -> true; (_) -> false end, As)],
    ?assertEqual(lists:sort([binary:replace(N, <<"\n">>, <<>>) || N <- odd_names()]), lists:sort(Labels)),
    ?assertEqual([], [E || #xmlElement{name = E} <- all_elements(Doc), E =:= img orelse E =:= script]),
    ok = dspex_store:delete_session(S).

all_elements(#xmlElement{content = C} = E) -> [E | lists:append([all_elements(X) || X <- C])];
all_elements(_) -> [].

to_svg_is_killed_at_its_timeout() ->
    %% a graph big enough that dot cannot lay it out within 1 ms
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    Names = [integer_to_binary(I) || I <- lists:seq(1, 300)],
    [{ok, _} = dspex_store:register(S, N, integer, 1) || N <- Names],
    [ok = dspex_graph:add_dependency(S, integer_to_binary(I), integer_to_binary(J))
     || I <- lists:seq(1, 299), J <- [I + 1, min(300, I + 7)], J > I],
    ?assertEqual({error, {graphviz, timeout}}, dspex_graph:to_svg(S, #{timeout => 1})),
    %% no message of the killed port is left behind
    receive M -> ?assertEqual(none, M) after 0 -> ok end,
    ?assertEqual({error, session_not_found}, dspex_graph:to_svg(sid())),
    ok = dspex_store:delete_session(S),
    Small = seed_graph(),
    ?assertEqual({error, {graphviz, too_large}}, dspex_graph:to_svg(Small, #{max_bytes => 100})),
    receive M2 -> ?assertEqual(none, M2) after 0 -> ok end,
    ok = dspex_store:delete_session(Small).

%% Samples may not be ahead of the metrics clock: freeze it at the test's Now.
with_clock(Now, F) ->
    ok = dspex_nif:metrics_set_clock(Now),
    try F() after ok = dspex_nif:metrics_set_clock(now) end.

detailed_has_one_point_per_second() ->
    with_clock(1900000000, fun detailed_has_one_point_per_second_/0).

detailed_has_one_point_per_second_() ->
    Now = 1900000000,
    Tags = #{test => detailed1},
    [ok = dspex_metrics:record(console_test_latency, V, Tags, #{time => T})
     || {T, V} <- [{Now - 5, 10}, {Now - 5, 30}, {Now - 3, 7}]],
    {ok, #{step := 1, points := Ps}} =
        dspex_metrics:detailed({console_test_latency, Tags}, Now - 5, Now, #{now => Now}),
    ?assertEqual(lists:seq(Now - 5, Now), [T || #{t := T} <- Ps]),
    ?assertEqual([2, 0, 1, 0, 0, 0], [C || #{count := C} <- Ps]),
    [#{mean := M0, max := X0} | _] = Ps,
    ?assertEqual({20.0, 30.0}, {M0, X0}).

detailed_uses_minutes_for_older_ranges() ->
    with_clock(1900003600, fun detailed_uses_minutes_for_older_ranges_/0).

detailed_uses_minutes_for_older_ranges_() ->
    Now = 1900003600,
    Tags = #{test => detailed2},
    ok = dspex_metrics:record(console_test_latency, 5, Tags, #{time => Now - 600}),
    {ok, #{step := 60, points := Ps}} =
        dspex_metrics:detailed({console_test_latency, Tags}, Now - 900, Now, #{now => Now}),
    ?assert(lists:all(fun(#{t := T}) -> T rem 60 =:= 0 end, Ps)),
    ?assertEqual(1, lists:sum([C || #{count := C} <- Ps])).

detailed_refuses_bad_ranges() ->
    ?assertEqual({error, {invalid_argument, range}}, dspex_metrics:detailed(console_test_latency, 10, 5)),
    ?assertEqual({error, {invalid_argument, range}},
                 dspex_metrics:detailed(console_test_latency, 0, 3600 * 3601, #{now => 3600 * 3601})),
    ?assertEqual({error, {invalid_argument, metric}}, dspex_metrics:detailed(<<"bad name">>, 0, 1)).

%%% security policy (pure) ---------------------------------------------------

conf(Token, Write) -> #{token => Token, write => Write, csrf => <<"csrf123">>, bind => {127, 0, 0, 1}, www => ".",
                        hosts => any}.

%% DNS rebinding: a page of attacker.example, its name rebound to 127.0.0.1,
%% sends `Host: attacker.example'; only the console's own names pass.
host_header_must_name_the_console_test() ->
    Hosts = dspex_console:allowed_hosts({127, 0, 0, 1}, undefined, []),
    C = (conf(undefined, false))#{hosts => Hosts},
    A = fun(H) -> dspex_console_http:authorize("GET", "/api/sessions", H, C) end,
    [?assertEqual(ok, A([{"host", H}])) || H <- ["127.0.0.1", "127.0.0.1:9570", "localhost:9570", "LocalHost",
                                                   "[::1]", "[::1]:9570"]],
    [?assertEqual({deny, 403, host_not_allowed}, A(H))
     || H <- [[{"host", "attacker.example:9570"}], [{"host", "attacker.example"}], [{"host", "127.0.0.1:x"}],
              [{"host", "127.0.0.1:"}], [{"host", "localhost.attacker.example"}], [{"host", "[::1]x"}], []]],
    %% the bind address and console_allowed_hosts are accepted too
    ?assertEqual(["127.0.0.1", "127.0.0.2", "[::1]", "console.lan", "localhost"],
                 dspex_console:allowed_hosts({127, 0, 0, 2}, undefined, ["Console.LAN", 42])),
    %% with a token any name passes unless console_allowed_hosts lists some
    ?assertEqual(any, dspex_console:allowed_hosts({0, 0, 0, 0}, <<"tok">>, [])),
    ?assertEqual({deny, 403, host_not_allowed},
                 dspex_console_http:authorize("GET", "/api/sessions", [{"host", "evil"}, {"authorization", "Bearer tok"}],
                                              (conf(<<"tok">>, false))#{hosts => ["console.lan"]})).

non_loopback_bind_needs_a_token_test() ->
    ?assertEqual(ok, dspex_console:check_config({127, 0, 0, 1}, undefined)),
    ?assertEqual(ok, dspex_console:check_config({127, 0, 0, 2}, undefined)),
    ?assertEqual(ok, dspex_console:check_config({0, 0, 0, 0, 0, 0, 0, 1}, undefined)),
    ?assertEqual(ok, dspex_console:check_config("localhost", undefined)),
    ?assertEqual({error, token_required}, dspex_console:check_config({0, 0, 0, 0}, undefined)),
    ?assertEqual({error, token_required}, dspex_console:check_config({10, 1, 2, 3}, <<>>)),
    ?assertEqual({error, token_required}, dspex_console:check_config("0.0.0.0", undefined)),
    ?assertEqual(ok, dspex_console:check_config({0, 0, 0, 0}, <<"s3cret">>)).

reads_need_the_token_when_one_is_configured_test() ->
    A = fun(M, P, H, C) -> dspex_console_http:authorize(M, P, H, C) end,
    ?assertEqual(ok, A("GET", "/api/overview", [], conf(undefined, false))),
    ?assertEqual({deny, 401, unauthorized}, A("GET", "/api/overview", [], conf(<<"tok">>, false))),
    ?assertEqual({deny, 401, unauthorized},
                 A("GET", "/api/overview", [{"authorization", "Bearer tok2"}], conf(<<"tok">>, false))),
    ?assertEqual({deny, 401, unauthorized},
                 A("GET", "/api/overview", [{"authorization", "Basic tok"}], conf(<<"tok">>, false))),
    ?assertEqual(ok, A("GET", "/api/overview", [{"authorization", "Bearer tok"}], conf(<<"tok">>, false))).

writes_need_console_write_the_token_and_the_csrf_header_test() ->
    A = fun(H, C) -> dspex_console_http:authorize("POST", "/api/rollback", H, C) end,
    Auth = {"authorization", "Bearer tok"},
    Csrf = {"x-dspex-csrf", "csrf123"},
    ?assertEqual({deny, 403, read_only}, A([Auth, Csrf], conf(<<"tok">>, false))),
    ?assertEqual({deny, 401, token_not_configured}, A([Csrf], conf(undefined, true))),
    ?assertEqual({deny, 401, unauthorized}, A([Csrf], conf(<<"tok">>, true))),
    ?assertEqual({deny, 403, csrf}, A([Auth], conf(<<"tok">>, true))),
    ?assertEqual({deny, 403, csrf}, A([Auth, {"x-dspex-csrf", "csrf124"}], conf(<<"tok">>, true))),
    ?assertEqual(ok, A([Auth, Csrf], conf(<<"tok">>, true))),
    %% no other write exists
    ?assertEqual({deny, 403, method_not_allowed},
                 dspex_console_http:authorize("POST", "/api/session", [Auth, Csrf], conf(<<"tok">>, true))).

jsonable_turns_any_term_into_json_test() ->
    T = #{a => undefined, b => {error, {not_found, <<"x">>}}, c => self(), {k, 1} => [1, <<255>>],
          d => [1 | 2], <<"e">> => nan},
    {ok, Json} = dspex_json:encode(dspex_console_http:jsonable(T)),
    {ok, M} = dspex_json:decode(Json),
    ?assertEqual(null, maps:get(<<"a">>, M)),
    ?assertEqual(<<"{error,{not_found,<<\"x\">>}}">>, maps:get(<<"b">>, M)),
    %% a binary that is not UTF-8 becomes its printed form (a valid string)
    ?assertMatch([1, <<"<<", _/binary>>], maps:get(<<"{k,1}">>, M)),
    ?assertEqual(<<"[1|2]">>, maps:get(<<"d">>, M)),
    ?assertEqual(<<"nan">>, maps:get(<<"e">>, M)).

%% metadata #{5 => .., <<"5">> => ..} printed one JSON key twice
jsonable_keys_are_unique_test() ->
    T = #{5 => int, <<"5">> => bin, a => atom, <<"a">> => abin, {k} => tuple, <<"{k}">> => tbin},
    J = dspex_console_http:jsonable(T),
    ?assertEqual(6, map_size(J)),
    ?assertEqual(#{<<"5">> => int, <<"<<\"5\">>">> => bin, <<"a">> => atom, <<"<<\"a\">>">> => abin,
                   <<"{k}">> => tuple, <<"<<\"{k}\">>">> => tbin}, J),
    {ok, Json} = dspex_json:encode(J),
    {ok, M} = dspex_json:decode(Json),
    ?assertEqual(6, map_size(M)).

%%% start-up ------------------------------------------------------------------

%% A busy port (another node's console, say) is a logged warning and no
%% console; a non-loopback bind without a token is no console either.
busy_port_or_missing_token_is_no_console_test() ->
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Busy} = inet:port(L),
    Env = [{console_port, Busy}, {console_bind, {127, 0, 0, 1}}],
    Old = [{K, application:get_env(dspex_bridge, K)} || K <- [console_port, console_bind, console_token]],
    try
        [application:set_env(dspex_bridge, K, V) || {K, V} <- Env],
        ?assertEqual(ignore, dspex_console:init([])),
        application:set_env(dspex_bridge, console_port, 0),
        application:set_env(dspex_bridge, console_bind, {0, 0, 0, 0}),
        application:unset_env(dspex_bridge, console_token),
        ?assertEqual(ignore, dspex_console:init([]))
    after
        [case V of
             undefined -> application:unset_env(dspex_bridge, K);
             {ok, X} -> application:set_env(dspex_bridge, K, X)
         end || {K, V} <- Old],
        gen_tcp:close(L)
    end.

%%% /api/regions ---------------------------------------------------------------

%% The endpoint on a node without a region ("configured": false) and on one
%% whose region has a loopback gateway and one peer region whose gateway is
%% unreachable: its link is down, with the reason, no RTT sample, and the
%% region fenced (one region of two is no majority). Restarts the
%% application with the console on a free port; the environment and the
%% application's state are restored afterwards.
regions_endpoint_with_and_without_a_region_test_() ->
    {timeout, 120, fun regions_endpoint/0}.

regions_endpoint() ->
    Keys = [console_port, console_token, console_enabled, region],
    Old = [{K, application:get_env(dspex_bridge, K)} || K <- Keys],
    WasRunning = lists:keymember(dspex_bridge, 1, application:which_applications()),
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Dead} = inet:port(L),
    ok = gen_tcp:close(L),
    try
        application:set_env(dspex_bridge, console_port, 0),
        application:set_env(dspex_bridge, console_enabled, true),
        application:unset_env(dspex_bridge, console_token),
        application:unset_env(dspex_bridge, region),
        restart(),
        ?assertEqual({200, #{<<"configured">> => false}}, get_json("/api/regions")),
        application:set_env(dspex_bridge, region,
                            #{name => <<"eu">>, coords => {50.11, 8.68}, listen => {{127, 0, 0, 1}, 0},
                              peers => [#{name => <<"us">>, gateway => {{127, 0, 0, 1}, Dead},
                                          coords => {40.71, -74.01}}],
                              backoff_min_ms => 10, backoff_max_ms => 40}),
        restart(),
        %% bounded polling until the link has tried (and failed) to connect
        Poll = fun W(0) -> timeout;
                   W(N) -> case get_json("/api/regions") of
                               {200, #{<<"peers">> := [#{<<"last_error">> := E}]} = Answer} when E =/= null ->
                                   Answer;
                               _ -> receive after 20 -> W(N - 1) end
                           end
               end,
        R = Poll(1000),
        GwPort = dspex_region:gateway_port(),
        ?assertMatch(#{<<"configured">> := true, <<"region">> := <<"eu">>, <<"coords">> := [50.11, 8.68],
                       <<"gateway_port">> := GwPort, <<"transport">> := <<"tcp">>,
                       <<"replication">> := <<"async_primary_backup">>, <<"sessions">> := 0,
                       <<"backup_sessions">> := 0, <<"fenced">> := true, <<"reachable">> := [<<"eu">>]}, R),
        [Peer] = maps:get(<<"peers">>, R),
        DeadGw = iolist_to_binary(["127.0.0.1:", integer_to_list(Dead)]),
        ?assertMatch(#{<<"name">> := <<"us">>, <<"status">> := <<"down">>, <<"gateway">> := DeadGw,
                       <<"coords">> := [40.71, -74.01], <<"sessions">> := 0, <<"last_check_at">> := null,
                       <<"last_error">> := <<"{connect,econnrefused}">>,
                       <<"rtt">> := #{<<"samples">> := 0, <<"p50_ms">> := null, <<"p99_ms">> := null,
                                      <<"ewma_ms">> := null},
                       <<"replication">> := #{<<"lag_versions">> := 0, <<"lag_ms">> := 0}}, Peer),
        ?assert(is_integer(maps:get(<<"since">>, Peer))),
        %% the same answer as a stream event
        ?assertMatch({ok, #{<<"configured">> := true, <<"region">> := <<"eu">>}}, first_sse_event("regions"))
    after
        restore(Old, WasRunning)
    end.

%% The HTTP answers of the console's defects: a foreign Host (DNS rebinding),
%% bad or missing parameters (400, never 500 or 404), HEAD, the page of
%% /api/session, a rollback to a huge version, inets' own error pages.
console_http_test_() ->
    {timeout, 120, fun console_http/0}.

console_http() ->
    Keys = [console_port, console_token, console_enabled, console_write, console_allowed_hosts, region],
    Old = [{K, application:get_env(dspex_bridge, K)} || K <- Keys],
    WasRunning = lists:keymember(dspex_bridge, 1, application:which_applications()),
    try
        application:set_env(dspex_bridge, console_port, 0),
        application:set_env(dspex_bridge, console_enabled, true),
        [application:unset_env(dspex_bridge, K) || K <- [console_token, console_write, console_allowed_hosts, region]],
        restart(),
        console_http_answers()
    after
        restore(Old, WasRunning)
    end.

%% The application environment `Old' ({Key, get_env result}) put back, and the application
%% stopped, then started again if it was running before.
restore(Old, WasRunning) ->
    [case V of
         undefined -> application:unset_env(dspex_bridge, K);
         {ok, X} -> application:set_env(dspex_bridge, K, X)
     end || {K, V} <- Old],
    ok = application:stop(dspex_bridge),
    case WasRunning of
        true -> {ok, _} = application:ensure_all_started(dspex_bridge), ok;
        false -> ok
    end.

console_http_answers() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    Names = [iolist_to_binary(io_lib:format("v~4..0b", [I])) || I <- lists:seq(1, 1205)],
    [{ok, _} = dspex_store:register(S, N, integer, 1) || N <- Names],
    Port = integer_to_list(dspex_console:port()),
    Q = fun(Path) -> Path ++ "?id=" ++ binary_to_list(S) end,
    %% DNS rebinding: the attacker's name is refused, with the security headers
    {403, H403, B403} = raw("GET", "/api/sessions", [{"Host", "attacker.example:" ++ Port}]),
    ?assertEqual({ok, #{<<"error">> => <<"host_not_allowed">>}}, dspex_json:decode(B403)),
    ?assertEqual("DENY", proplists:get_value("x-frame-options", H403)),
    {200, _, _} = raw("GET", "/api/sessions", [{"Host", "localhost:" ++ Port}]),
    {200, _, _} = raw("GET", "/api/sessions", [{"Host", "127.0.0.1:" ++ Port}]),
    %% the empty id: state_at answered 500, timeline every session's events
    ?assertMatch({400, #{<<"error">> := <<"{invalid_argument,session}">>}}, get_json("/api/state_at?id=&seq=1")),
    ?assertMatch({400, #{<<"error">> := <<"{invalid_argument,id}">>}}, get_json("/api/timeline?id=")),
    %% a missing parameter is named (it was 404 not_found)
    ?assertMatch({400, #{<<"error">> := <<"{missing_parameter,var}">>}}, get_json(Q("/api/history"))),
    ?assertMatch({400, #{<<"error">> := <<"{missing_parameter,id}">>}}, get_json("/api/session")),
    ?assertMatch({404, #{<<"error">> := <<"not_found">>}}, get_json("/api/nothing")),
    %% HEAD: the GET's status and headers, no body (it was 404)
    {200, HHead, <<>>} = raw("HEAD", "/api/config", []),
    {200, _, BGet} = raw("GET", "/api/config", []),
    ?assertEqual(integer_to_list(byte_size(BGet)), proplists:get_value("content-length", HHead)),
    {405, HEv, _} = raw("HEAD", "/api/events", []),
    ?assertEqual("GET", proplists:get_value("allow", HEv)),
    %% /api/session: one page of 500 (at most 1000) and the total
    {200, P1} = get_json(Q("/api/session")),
    ?assertMatch(#{<<"total">> := 1205, <<"offset">> := 0, <<"limit">> := 500}, P1),
    ?assertEqual(lists:sublist(Names, 500), [N || #{<<"name">> := N} <- maps:get(<<"variables">>, P1)]),
    ?assertEqual(500, map_size(maps:get(<<"changed_by">>, maps:get(<<"diagnostics">>, P1)))),
    {200, P2} = get_json(Q("/api/session") ++ "&offset=1200&limit=5000"),
    ?assertMatch(#{<<"total">> := 1205, <<"offset">> := 1200, <<"limit">> := 1000}, P2),
    ?assertEqual(lists:nthtail(1200, Names), [N || #{<<"name">> := N} <- maps:get(<<"variables">>, P2)]),
    session_page_answers(),
    %% inets' own error page (no Host in HTTP/1.1) has the security headers
    {400, HBad, _} = raw("GET", "/api/config", [], "HTTP/1.1", false),
    ?assertEqual("DENY", proplists:get_value("x-frame-options", HBad)),
    %% a rollback to 2^64 was a 500 (badarg from the NIF): now 409, nothing written
    Conf = dspex_console:config(),
    persistent_term:put(dspex_console, Conf#{token => <<"tok">>, write => true}),
    try
        Auth = [{"Authorization", "Bearer tok"}, {"X-DSPex-CSRF", binary_to_list(maps:get(csrf, Conf))},
                {"Content-Type", "application/x-www-form-urlencoded"}],
        Body = "id=" ++ binary_to_list(S) ++ "&var=v0001&version=",
        [begin
             {409, _, B} = raw("POST", "/api/rollback", Auth, Body ++ V),
             ?assertEqual({ok, #{<<"error">> => iolist_to_binary(["{version_not_found,", V, "}"])}},
                          dspex_json:decode(B))
         end || V <- ["18446744073709551616", "100000000000000000000000"]],
        {400, _, _} = raw("POST", "/api/rollback", Auth, Body ++ "-1"),
        {200, _, _} = raw("POST", "/api/rollback", Auth, Body ++ "0")
    after
        persistent_term:put(dspex_console, Conf)
    end,
    ok = dspex_store:delete_session(S).

%% /api/session answers byte for byte what it answered when it was built
%% from whole copies of the session (diagnostics/1, list/1, to_map/1),
%% the two figures that follow the clock aside; a rate-limited session's
%% page costs one token (the copies took one per variable: 404
%% rate_limited); a big session's page lists no whole session.
session_page_answers() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    seed_every_type(S),
    {ok, _} = dspex_store:set(S, i1, 7, #{changed_by => <<"alice">>}),
    {ok, _} = dspex_graph:define_derived(S, <<"d">>, float, [f1], fun(#{f1 := A}) when A > 2.5 -> error(boom);
                                                                      (#{f1 := A}) -> A end),
    ok = dspex_graph:add_dependency(S, i1, f1),
    {ok, _} = dspex_store:set(S, f1, 3.0, #{propagate => sync}),
    Ref = dspex_store:watch(S, [f1, s1], self()),
    ok = dspex_acl:set_permissions(S, s1, [#{session_pattern => any, permissions => [read]}]),
    {ok, Lock} = dspex_locks:acquire(S, i2, opt1, #{}),
    Get = fun(Params) -> {200, _, B} = raw("GET", "/api/session?id=" ++ binary_to_list(S) ++ Params, []), B end,
    try
        [?assertEqual({Params, steady_json(old_session_reply(S, O, L))}, {Params, steady_json(Get(Params))})
         || {Params, O, L} <- [{"", 0, 500}, {"&offset=3&limit=4", 3, 4}, {"&offset=20&limit=1", 20, 1},
                               {"&offset=5000", 5000, 500}]]
    after
        ok = dspex_locks:release(Lock),
        dspex_store:unwatch(Ref),
        ok = dspex_store:delete_session(S),
        flush()
    end,
    Limited = sid(),
    {ok, _} = dspex_store:create_session(Limited, #{}),
    [{ok, _} = dspex_store:register(Limited, integer_to_binary(I), integer, I) || I <- lists:seq(1, 20)],
    ok = dspex_acl:set_rate_limit(Limited, 0.001, 5),
    Q = "/api/session?id=" ++ binary_to_list(Limited),
    ?assertMatch({200, #{<<"total">> := 20}}, get_json(Q)),
    ?assertMatch({200, #{<<"total">> := 20}}, get_json(Q)),
    {ok, #{tokens := Left}} = dspex_acl:get_rate_limit(Limited),
    ?assert(Left >= 3.0 andalso Left < 3.01),
    ok = dspex_store:delete_session(Limited),
    Big = sid(),
    {ok, _} = dspex_store:create_session(Big, #{}),
    [{ok, _} = dspex_store:register(Big, iolist_to_binary(io_lib:format("n~5..0b", [I])), integer, I)
     || I <- lists:seq(1, 2500)],
    #{var_list := Lists0} = dspex_nif:sched_stats(),
    ?assertMatch({200, #{<<"total">> := 2500, <<"variables">> := [#{<<"name">> := <<"n02001">>} | _]}},
                 get_json("/api/session?id=" ++ binary_to_list(Big) ++ "&offset=2000&limit=3")),
    ?assertMatch(#{var_list := Lists0}, dspex_nif:sched_stats()),
    %% /api/access reads the rules only, not the whole session
    ok = dspex_acl:set_permissions(Big, <<"n00007">>, [#{session_pattern => <<"team_*">>, permissions => [read]}]),
    ok = dspex_acl:set_permissions(Big, <<"n02400">>, [#{session_pattern => any, permissions => [read, write]}]),
    {200, #{<<"rules">> := Rules}} = get_json("/api/access?id=" ++ binary_to_list(Big)),
    ?assertEqual([<<"n00007">>, <<"n02400">>], lists:sort(maps:keys(Rules))),
    ?assertMatch([#{<<"session_pattern">> := <<"team_*">>}], maps:get(<<"n00007">>, Rules)),
    ?assertMatch(#{var_list := Lists0}, dspex_nif:sched_stats()),
    ok = dspex_store:delete_session(Big).

%% The JSON the console answered before diagnostics_page/3, built as it was.
old_session_reply(S, Offset, Limit) ->
    {ok, D} = dspex_store:diagnostics(S),
    {ok, Vars} = dspex_store:list(S),
    Page = lists:sublist(Vars, Offset + 1, Limit),
    Names = [N || #{name := N} <- Page],
    Holders = maps:from_list([{N, #{optimizer => O, token => T}}
                              || #{variable := N, optimizer := O, token := T} <- maps:get(locks, D)]),
    {ok, #{edges := Es}} = dspex_graph:to_map(S),
    In = maps:from_keys(Names, true),
    Graph = #{nodes => Names, edges => [E || #{from := F, to := T} = E <- Es, maps:is_key(F, In) orelse maps:is_key(T, In)]},
    Cut = maps:map(fun(K, M) when K =:= watched; K =:= changed_by; K =:= errors; K =:= rules -> maps:with(Names, M);
                      (_, V) -> V
                   end, D),
    M = #{diagnostics => Cut, graph => Graph, total => length(Vars), offset => Offset, limit => Limit,
          variables => [(maps:with([id, name, type, value, version, updated_at, created_at, metadata,
                                    constraints, derived, error], V))#{lock => maps:get(N, Holders, null)}
                        || #{name := N} = V <- Page]},
    {ok, Json} = dspex_json:encode(dspex_console_http:jsonable(M)),
    Json.

%% The body with the clock's two figures (the last access, the TTL left) zeroed.
steady_json(Body) ->
    re:replace(Body, <<"\"(last_accessed_at|ttl_left_ms)\":[0-9]+">>, <<"\"\\1\":0">>, [global, {return, binary}]).

%% One request on its own connection: `{Status, LowerCaseHeaders, Body}'.
raw(Method, Path, Headers) -> raw(Method, Path, Headers, "").

raw(Method, Path, Headers, Body) when is_list(Body) ->
    Length = [{"Content-Length", integer_to_list(length(Body))} || Method =:= "POST"],
    raw(Method, Path, Headers ++ Length, "HTTP/1.1", true, Body).

raw(Method, Path, Headers, Version, WithHost) -> raw(Method, Path, Headers, Version, WithHost, "").

raw(Method, Path, Headers, Version, WithHost, Body) ->
    {ok, Sock} = gen_tcp:connect({127, 0, 0, 1}, dspex_console:port(), [binary, {active, false}]),
    try
        Host = [{"Host", "127.0.0.1"} || WithHost, not lists:keymember("Host", 1, Headers)],
        ok = gen_tcp:send(Sock, [Method, " ", Path, " ", Version, "\r\n",
                                 [[K, ": ", V, "\r\n"] || {K, V} <- Host ++ Headers ++ [{"Connection", "close"}]],
                                 "\r\n", Body]),
        Read = fun R(Acc) ->
                       case gen_tcp:recv(Sock, 0, 30000) of
                           {ok, More} -> R(<<Acc/binary, More/binary>>);
                           {error, closed} -> Acc
                       end
               end,
        [Head, Rest] = binary:split(Read(<<>>), <<"\r\n\r\n">>),
        [StatusLine | Lines] = string:split(binary_to_list(Head), "\r\n", all),
        [_, Code | _] = string:split(StatusLine, " ", all),
        Hs = [{string:lowercase(K), string:trim(V)} || L <- Lines, [K, V] <- [string:split(L, ":")]],
        {list_to_integer(Code), Hs, Rest}
    after
        gen_tcp:close(Sock)
    end.

restart() ->
    _ = application:stop(dspex_bridge),
    {ok, _} = application:ensure_all_started(dspex_bridge).

get_json(Path) ->
    Url = "http://127.0.0.1:" ++ integer_to_list(dspex_console:port()) ++ Path,
    {ok, {{_, Status, _}, _, Body}} = httpc:request(get, {Url, []}, [{timeout, 30000}], [{body_format, binary}]),
    {ok, Json} = dspex_json:decode(Body),
    {Status, Json}.

%% The data of the first `Event' of /api/events?<Event>=1 (the stream's
%% first tick comes at once).
first_sse_event(Event) ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, dspex_console:port(), [binary, {active, false}]),
    try
        ok = gen_tcp:send(S, ["GET /api/events?", Event, "=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]),
        Marker = iolist_to_binary(["event: ", Event, "\ndata: "]),
        Read = fun R(Acc) ->
                       case binary:split(Acc, Marker) of
                           [_, Rest] ->
                               case binary:split(Rest, <<"\n">>) of
                                   [Data, _] -> dspex_json:decode(Data);
                                   [_] -> {ok, More} = gen_tcp:recv(S, 0, 30000), R(<<Acc/binary, More/binary>>)
                               end;
                           [_] -> {ok, More} = gen_tcp:recv(S, 0, 30000), R(<<Acc/binary, More/binary>>)
                       end
               end,
        Read(<<>>)
    after
        gen_tcp:close(S)
    end.
