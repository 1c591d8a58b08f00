%% EUnit tests of dspex_metrics: exact aggregates, sketch accuracy against
%% exact quantiles, window roll-up and retention, merging across "nodes",
%% concurrency, the dashboard and the Prometheus endpoint.
-module(dspex_metrics_tests).
-include_lib("eunit/include/eunit.hrl").

%% An hour-aligned base time, so minute and hour buckets are predictable.
-define(T0, (1700000000 div 3600 * 3600)).
%% The metrics clock during these tests (samples may not be ahead of it).
-define(CLOCK, (?T0 + 600)).

metric() -> list_to_atom("m_" ++ integer_to_list(erlang:unique_integer([positive]))).

%% A fresh application (empty series table) with the endpoint on a free port.
restart(Env) ->
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    [application:set_env(dspex_bridge, K, V) || {K, V} <- [{prometheus_port, 0}, {prometheus_enabled, true},
                                                           {metrics_retention_hours, 24} | Env]],
    {ok, _} = application:ensure_all_started(dspex_bridge),
    ok.

%% Freezes the metrics clock at T for F, then back at the suite's clock.
at_clock(T, F) ->
    ok = dspex_nif:metrics_set_clock(T),
    try F() after ok = dspex_nif:metrics_set_clock(?CLOCK) end.

metrics_test_() ->
    {setup, fun() -> restart([]), ok = dspex_nif:metrics_set_clock(?CLOCK) end,
     fun(_) -> ok = dspex_nif:metrics_set_clock(now) end,
     [fun exact_aggregates/0, fun accuracy_uniform/0, fun accuracy_skewed/0, fun accuracy_heavy_tail/0,
      fun tag_filters/0, fun rollup_to_minutes_and_hours/0, fun retention_drops_old_data/0,
      fun configurable_retention/0, fun memory_is_bounded/0, fun merge_across_nodes/0,
      fun concurrent_recording_is_exact/0, fun bad_arguments/0, fun series_limit/0,
      fun future_time_is_refused_and_cannot_blind_a_series/0, fun refused_sample_keeps_the_handler/0,
      fun too_old_first_sample_is_rejected/0, fun integers_beyond_64_bits/0,
      fun overflowing_sum_is_kept/0, fun labels_are_checked_and_normalised/0,
      fun colliding_family_names_are_refused/0, fun exposition_is_valid/0]}.

%% Samples at successive seconds from T0 (so no single second holds them all).
record_all(M, Vals) ->
    lists:foldl(fun(V, I) -> ok = dspex_metrics:record(M, V, #{}, #{time => ?T0 + I rem 50}), I + 1 end,
                0, Vals),
    ok.

q(M, Agg) -> q(M, ?T0, ?T0 + 59, Agg).
q(M, From, To, Agg) ->
    {ok, V} = dspex_metrics:query(M, From, To, Agg, #{now => ?T0 + 59}),
    V.

exact_aggregates() ->
    M = metric(),
    record_all(M, [3, 1.5, 10, 7.25, 0, -2]),
    #{count := 6, sum := Sum, min := -2.0, max := 10.0, mean := Mean} = q(M, summary),
    ?assertEqual(19.75, Sum),
    ?assertEqual(19.75 / 6, Mean),
    ?assertEqual(6, q(M, count)),
    ?assertEqual(-2.0, q(M, min)),
    %% nothing recorded in another range
    ?assertEqual(0, q(M, ?T0 - 3000, ?T0 - 1, count)),
    ?assertEqual(undefined, q(M, ?T0 - 3000, ?T0 - 1, p99)).

%% Every quantile estimate within 1% of the exact sample at rank floor(q(n-1)).
check_quantiles(M, Vals) ->
    record_all(M, Vals),
    Sorted = list_to_tuple(lists:sort([float(V) || V <- Vals])),
    N = tuple_size(Sorted),
    [begin
         Exact = element(trunc(Q * (N - 1)) + 1, Sorted),
         Est = q(M, {quantile, Q}),
         ?assert(abs(Est - Exact) =< 0.01 * abs(Exact) + 1.0e-12)
     end || Q <- [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]],
    #{p50 := P50, p90 := P90, p95 := P95, p99 := P99, count := N} = q(M, summary),
    [?assert(abs(Est - element(trunc(Q * (N - 1)) + 1, Sorted)) =< 0.01 * element(trunc(Q * (N - 1)) + 1, Sorted))
     || {Q, Est} <- [{0.5, P50}, {0.9, P90}, {0.95, P95}, {0.99, P99}]],
    ok.

accuracy_uniform() ->
    rand:seed(exsss, {1, 2, 3}),
    check_quantiles(metric(), [1.0 + rand:uniform() * 1.0e6 || _ <- lists:seq(1, 20000)]).

accuracy_skewed() ->
    rand:seed(exsss, {4, 5, 6}),
    %% log-normal: latency-like, most samples small, a long right tail
    check_quantiles(metric(), [math:exp(rand:normal(4.0, 1.5)) || _ <- lists:seq(1, 20000)]).

accuracy_heavy_tail() ->
    rand:seed(exsss, {7, 8, 9}),
    %% Pareto (alpha 1.1) plus a spike of identical values
    check_quantiles(metric(), [1.0 / math:pow(rand:uniform(), 1 / 1.1) || _ <- lists:seq(1, 15000)]
                    ++ lists:duplicate(5000, 250.0)).

tag_filters() ->
    M = metric(),
    ok = dspex_metrics:record(M, 10, #{op => get, node => a}, #{time => ?T0}),
    ok = dspex_metrics:record(M, 20, #{op => get, node => b}, #{time => ?T0}),
    ok = dspex_metrics:record(M, 40, #{op => set, node => a}, #{time => ?T0}),
    ?assertEqual(3, q(M, count)),
    ?assertEqual(30.0, q({M, #{op => get}}, sum)),
    ?assertEqual(50.0, q({M, #{node => a}}, sum)),
    ?assertEqual(40.0, q({M, #{node => a, op => set}}, sum)),
    ?assertEqual(0, q({M, #{node => c}}, count)),
    %% tags come back normalised to binaries
    ?assertEqual(lists:sort([#{<<"op">> => <<"get">>, <<"node">> => <<"a">>},
                             #{<<"op">> => <<"get">>, <<"node">> => <<"b">>},
                             #{<<"op">> => <<"set">>, <<"node">> => <<"a">>}]),
                 lists:sort([T || {T, _} <- dspex_metrics:series(M)])).

rollup_to_minutes_and_hours() ->
    M = metric(),
    %% one sample of value 1 per second for three minutes: [T0, T0 + 179]
    [ok = dspex_metrics:record(M, 1, #{}, #{time => ?T0 + I}) || I <- lists:seq(0, 179)],
    Q = fun(From, To, Now) -> {ok, C} = dspex_metrics:query(M, From, To, count, #{now => Now}), C end,
    %% while the seconds are retained, any sub-range is exact
    ?assertEqual(180, Q(?T0, ?T0 + 179, ?T0 + 179)),
    ?assertEqual(10, Q(?T0 + 170, ?T0 + 179, ?T0 + 179)),
    %% ten minutes later only whole minutes remain: a range touching two
    %% minutes counts both in full
    ?assertEqual(180, Q(?T0, ?T0 + 179, ?T0 + 600)),
    ?assertEqual(60, Q(?T0 + 60, ?T0 + 119, ?T0 + 600)),
    ?assertEqual(120, Q(?T0 + 30, ?T0 + 89, ?T0 + 600)),
    %% two hours later only the hour is left, and it is taken whole
    ?assertEqual(180, Q(?T0 + 100, ?T0 + 100, ?T0 + 7200)),
    %% exact aggregates survive the roll-up
    {ok, #{sum := 180.0, min := 1.0, max := 1.0}} = dspex_metrics:query(M, ?T0, ?T0 + 3599, summary, #{now => ?T0 + 7200}).

retention_drops_old_data() ->
    M = metric(),
    ok = dspex_metrics:record(M, 5, #{}, #{time => ?T0}),
    Q = fun(Now) -> {ok, C} = dspex_metrics:query(M, ?T0 - 3600, Now, count, #{now => Now}), C end,
    ?assertEqual(1, Q(?T0 + 23 * 3600)),
    ?assertEqual(1, Q(?T0 + 24 * 3600 + 3599)),   %% the default 24 h (plus the current hour)
    ?assertEqual(0, Q(?T0 + 25 * 3600)),
    %% once the windows moved on, a sample that old is refused
    at_clock(?T0 + 25 * 3600, fun() ->
        ok = dspex_metrics:record(M, 5, #{}, #{time => ?T0 + 25 * 3600}),
        ?assertEqual({error, rejected}, dspex_metrics:record(M, 5, #{}, #{time => ?T0}))
    end).

configurable_retention() ->
    application:set_env(dspex_bridge, metrics_retention_hours, 2),
    Short = metric(),
    ok = dspex_metrics:record(Short, 1, #{}, #{time => ?T0}),
    application:set_env(dspex_bridge, metrics_retention_hours, 24),
    Long = metric(),
    ok = dspex_metrics:record(Long, 1, #{}, #{time => ?T0}),
    Now = ?T0 + 3 * 3600,
    {ok, 0} = dspex_metrics:query(Short, ?T0, ?T0 + 10, count, #{now => Now}),
    {ok, 1} = dspex_metrics:query(Long, ?T0, ?T0 + 10, count, #{now => Now}).

memory_is_bounded() ->
    M = metric(),
    {ok, Ref} = dspex_metrics:series_ref(M, #{}),
    rand:seed(exsss, {9, 9, 9}),
    %% two days of data, a wide value range in every second
    Mem = at_clock(?T0, fun() ->
        [begin
             ok = dspex_nif:metrics_set_clock(?T0 + S * 97),
             [ok = dspex_nif:metrics_record(Ref, math:exp(rand:uniform() * 40 - 20), ?T0 + S * 97) || _ <- [1, 2, 3]]
         end || S <- lists:seq(0, 2 * 24 * 3600 div 97)],
        dspex_nif:metrics_series_memory(Ref)
    end),
    %% per shard (one per scheduler thread that recorded, at most 8):
    %% 60 + 61 + 25 sketches of at most 2048 counters (8 bytes) plus headers
    Shards = min(erlang:system_info(schedulers), 8),
    Bound = Shards * ((60 + 61 + 25) * (2048 * 8 + 512) + 65536),
    ?assert(Mem > 0),
    ?assert(Mem =< Bound).

merge_across_nodes() ->
    rand:seed(exsss, {3, 1, 4}),
    A = [math:exp(rand:normal(3.0, 1.0)) || _ <- lists:seq(1, 8000)],
    B = [math:exp(rand:normal(6.0, 0.5)) || _ <- lists:seq(1, 4000)],
    [MA, MB] = [metric(), metric()],
    record_all(MA, A),
    record_all(MB, B),
    SA = q(MA, sketch),
    SB = q(MB, sketch),
    ?assert(is_binary(SA)),
    {ok, Merged} = dspex_metrics:merge(SA, SB),
    {ok, #{count := 12000, sum := Sum, min := Min, max := Max} = Sum1} = dspex_metrics:summary(Merged),
    All = list_to_tuple(lists:sort(A ++ B)),
    ?assert(abs(Sum - lists:sum(A ++ B)) =< 1.0e-9 * Sum),
    ?assertEqual(element(1, All), Min),
    ?assertEqual(element(12000, All), Max),
    [begin
         Exact = element(trunc(Qf * 11999) + 1, All),
         ?assert(abs(maps:get(K, Sum1) - Exact) =< 0.01 * Exact)
     end || {K, Qf} <- [{p50, 0.5}, {p90, 0.9}, {p95, 0.95}, {p99, 0.99}]],
    %% merging is commutative
    {ok, Merged2} = dspex_metrics:merge(SB, SA),
    ?assertEqual(dspex_metrics:summary(Merged), dspex_metrics:summary(Merged2)),
    ?assertEqual({error, invalid_sketch}, dspex_metrics:merge(SA, <<"garbage">>)),
    ?assertEqual({error, invalid_sketch}, dspex_metrics:summary(binary:part(SA, 0, byte_size(SA) - 1))),
    %% an empty sketch written by hand: accepted with this library's bucket
    %% budget (2048), refused with a larger one (it would make later walks
    %% over the counters unbounded)
    Empty = fun(Budget) -> <<"DXQ", 1, 0, 0.01:64/little-float, Budget/binary, 0, 0, 0>> end,
    ?assertMatch({ok, #{count := 0, p99 := undefined}}, dspex_metrics:summary(Empty(<<16#80, 16#10>>))),
    ?assertEqual({error, invalid_sketch}, dspex_metrics:summary(Empty(<<16#80, 16#20>>))).

concurrent_recording_is_exact() ->
    M = metric(),
    Parent = self(),
    Pids = [spawn_monitor(fun() ->
                                  [ok = dspex_metrics:record(M, I, #{}, #{time => ?T0 + I rem 7}) || I <- lists:seq(1, 5000)],
                                  Parent ! done
                          end) || _ <- lists:seq(1, 8)],
    [receive {'DOWN', Ref, process, Pid, normal} -> ok after 30000 -> error(timeout) end || {Pid, Ref} <- Pids],
    #{count := 40000, sum := Sum, min := 1.0, max := 5000.0} = q(M, summary),
    ?assertEqual(8 * 5000 * 5001 / 2, Sum).

bad_arguments() ->
    M = metric(),
    ?assertEqual({error, {invalid_argument, value}}, dspex_metrics:record(M, nan, #{})),
    ?assertEqual({error, {invalid_argument, metric}}, dspex_metrics:record(<<"9bad name">>, 1, #{})),
    ?assertEqual({error, {invalid_argument, metric}}, dspex_metrics:record({not_a_name}, 1, #{})),
    ?assertEqual({error, {invalid_argument, tags}}, dspex_metrics:record(M, 1, #{<<"bad-label">> => 1})),
    ?assertEqual({error, {invalid_argument, tags}}, dspex_metrics:record(M, 1, #{k => {tuple}})),
    ?assertEqual({error, {invalid_argument, tags}}, dspex_metrics:record(M, 1, not_a_map)),
    ?assertEqual({error, {invalid_argument, time}}, dspex_metrics:record(M, 1, #{}, #{time => soon})),
    ?assertEqual({error, {invalid_argument, range}}, dspex_metrics:query(M, 10, 5, count)),
    ?assertEqual({error, {invalid_argument, aggregation}}, dspex_metrics:query(M, 1, 5, median)),
    ?assertEqual({error, {invalid_argument, aggregation}}, dspex_metrics:query(M, 1, 5, {quantile, 1.5})),
    %% nothing was created by the refused calls
    ?assertEqual([], dspex_metrics:series(M)),
    %% names as lists are joined with underscores
    ok = dspex_metrics:record([my, app, latency], 1, #{}),
    ?assertMatch([{#{}, _}], dspex_metrics:series(my_app_latency)).

series_limit() ->
    Max = length(dspex_metrics:series()) + 2,
    application:set_env(dspex_bridge, metrics_max_series, Max),
    try
        M = metric(),
        ok = dspex_metrics:record(M, 1, #{i => 1}),
        ok = dspex_metrics:record(M, 1, #{i => 2}),
        ?assertEqual({error, {limit_exceeded, series}}, dspex_metrics:record(M, 1, #{i => 3})),
        %% existing series still record
        ok = dspex_metrics:record(M, 1, #{i => 1})
    after
        application:unset_env(dspex_bridge, metrics_max_series)
    end.

%% A time in milliseconds where seconds are meant (far in the future) is
%% refused; before, it moved the series' windows there, so every later sample
%% of the present was rejected and the earlier ones vanished from queries.
future_time_is_refused_and_cannot_blind_a_series() ->
    M = metric(),
    ok = dspex_metrics:record(M, 10, #{r => a}),
    ok = dspex_metrics:record(M, 20, #{r => a}),
    ?assertEqual({error, {invalid_argument, time}},
                 dspex_metrics:record(M, 5, #{r => a}, #{time => ?CLOCK * 1000})),
    ok = dspex_metrics:record(M, 30, #{r => a}),
    %% a few seconds ahead is tolerated (other clocks), further is not
    ok = dspex_metrics:record(M, 40, #{r => a}, #{time => ?CLOCK + 5}),
    ?assertEqual({error, {invalid_argument, time}}, dspex_metrics:record(M, 1, #{r => a}, #{time => ?CLOCK + 6})),
    {ok, #{count := 4, sum := 100.0}} = dspex_metrics:query(M, ?CLOCK - 59, ?CLOCK + 5, summary, #{now => ?CLOCK}).

%% The optimization handler recorded its count with `ok = ...': a refused
%% sample crashed it (and telemetry detaches a crashing handler).
refused_sample_keeps_the_handler() ->
    [Refusing, Success] = [dspex_nif:metrics_series_new(1) || _ <- [1, 2]],
    %% a series that saw a time 3 h ahead refuses `now' with its 1 h retention
    at_clock(?CLOCK + 3 * 3600, fun() -> ok = dspex_nif:metrics_record(Refusing, 1, now) end),
    D0 = dspex_metrics:dropped_samples(),
    _ = dspex_metrics_handler:count_event([dspex, locks, released], #{count => 1}, #{},
                                          {optimization, Refusing, Success}),
    ?assertEqual(D0 + 1, dspex_metrics:dropped_samples()),
    {ok, Sk} = dspex_nif:metrics_query([Success], ?CLOCK, ?CLOCK, ?CLOCK),
    ?assertMatch(#{count := 1, sum := 1.0}, dspex_nif:metrics_sketch_stats(Sk)).

%% A series' first sample was judged against its own time: one older than
%% every window was answered ok and never seen by any query.
too_old_first_sample_is_rejected() ->
    M = metric(),
    ?assertEqual({error, rejected}, dspex_metrics:record(M, 1, #{}, #{time => ?CLOCK - 25 * 3600})),
    ?assertEqual({error, rejected}, dspex_metrics:record(M, 1, #{}, #{time => -(1 bsl 64)})),
    %% the oldest hour still retained (24 h back) is accepted, and seen
    ok = dspex_metrics:record(M, 1, #{}, #{time => ?CLOCK - 24 * 3600}),
    ?assertEqual({ok, 1}, dspex_metrics:query(M, ?CLOCK - 26 * 3600, ?CLOCK, count, #{now => ?CLOCK})).

%% Integers the NIF cannot take as int64 used to raise badarg.
integers_beyond_64_bits() ->
    M = metric(),
    ok = dspex_metrics:record(M, 1 bsl 64, #{}),
    ?assertEqual({ok, float(1 bsl 64)}, dspex_metrics:query(M, ?CLOCK, ?CLOCK, max, #{now => ?CLOCK})),
    ?assertEqual({error, {invalid_argument, value}}, dspex_metrics:record(M, 1 bsl 1100, #{})),
    ?assertEqual({error, {invalid_argument, time}}, dspex_metrics:record(M, 1, #{}, #{time => 1 bsl 64})),
    ?assertEqual({ok, 1}, dspex_metrics:query(M, 0, 1 bsl 64, count, #{now => ?CLOCK})),
    ?assertEqual({ok, 1}, dspex_metrics:query(M, -(1 bsl 70), 1 bsl 70, count)),
    ?assertEqual({error, {invalid_argument, time}}, dspex_metrics:query(M, 0, 1, count, #{now => 1 bsl 64})),
    {ok, Ref} = dspex_metrics:series_ref(M, #{}),
    ?assertEqual({error, {invalid_argument, value}}, dspex_nif:metrics_record(Ref, 1 bsl 64, now)),
    ?assertEqual({error, {invalid_argument, time}}, dspex_nif:metrics_record(Ref, 1, 1 bsl 64)),
    ?assertEqual({ok, 1}, dspex_metrics:query(M, ?CLOCK, ?CLOCK, count, #{now => ?CLOCK})).

%% 1e308 + 1e308 overflows a double: the sum read 0.0 and the mean undefined,
%% even after a -1e308 made the true sum representable again.
overflowing_sum_is_kept() ->
    M = metric(),
    Q = fun() -> {ok, S} = dspex_metrics:query(M, ?CLOCK, ?CLOCK, summary, #{now => ?CLOCK}), S end,
    Prom = fun() -> maps:get({iolist_to_binary([atom_to_list(M), "_sum"]), []}, parse(iolist_to_binary(dspex_prometheus:render()))) end,
    ok = dspex_metrics:record(M, 1.0e308, #{}),
    ok = dspex_metrics:record(M, 1.0e308, #{}),
    ?assertMatch(#{sum := infinity, mean := 1.0e308}, Q()),
    ?assertEqual(inf, Prom()),
    ok = dspex_metrics:record(M, -1.0e308, #{}),
    #{sum := Sum, mean := Mean} = Q(),
    ?assertEqual(1.0e308, Sum),
    ?assert(abs(Mean - 1.0e308 / 3) =< 1.0e-15 * 1.0e308),
    ?assertEqual(1.0e308, Prom()),
    %% and through a serialised sketch
    {ok, Sk} = dspex_metrics:query(M, ?CLOCK, ?CLOCK, sketch, #{now => ?CLOCK}),
    {ok, Both} = dspex_metrics:merge(Sk, Sk),
    ?assertMatch({ok, #{sum := infinity, count := 6}}, dspex_metrics:summary(Both)).

%% Label names and values must be valid for the exposition, and tags that
%% print the same are the same series.
labels_are_checked_and_normalised() ->
    M = metric(),
    Bad = fun(Tags) -> ?assertEqual({error, {invalid_argument, tags}}, dspex_metrics:record(M, 1, Tags)) end,
    Bad(#{quantile => <<"x">>}),        %% the summary's own label
    Bad(#{<<"r">> => a, r => b}),       %% two keys printed as r
    Bad(#{<<"a:b">> => 1}),             %% colons are for metric names only
    Bad(#{<<"__name__">> => 1}),        %% reserved by Prometheus
    Bad(#{'__x' => 1}),
    Bad(#{r => <<255, 0>>}),            %% not UTF-8
    Bad(#{<<>> => 1}),
    ?assertEqual([], dspex_metrics:series(M)),
    ok = dspex_metrics:record(M, 1, #{r => a}),
    ok = dspex_metrics:record(M, 2, #{r => <<"a">>}),
    ok = dspex_metrics:record(M, 3, #{<<"r">> => a}),
    ok = dspex_metrics:record(M, 4, #{n => 7}),
    ok = dspex_metrics:record(M, 5, #{n => <<"7">>}),
    ok = dspex_metrics:record(M, 6, #{r => <<"é"/utf8>>}),
    ?assertEqual([#{<<"n">> => <<"7">>}, #{<<"r">> => <<"a">>}, #{<<"r">> => <<"é"/utf8>>}],
                 lists:sort([T || {T, _} <- dspex_metrics:series(M)])),
    %% filters are normalised the same way
    ?assertEqual({ok, 6.0}, dspex_metrics:query({M, #{r => a}}, ?CLOCK, ?CLOCK, sum, #{now => ?CLOCK})),
    ?assertEqual({ok, 2}, dspex_metrics:query({M, #{<<"n">> => 7}}, ?CLOCK, ?CLOCK, count, #{now => ?CLOCK})),
    ?assertEqual({error, {invalid_argument, tags}},
                 dspex_metrics:query({M, #{r => {x}}}, ?CLOCK, ?CLOCK, count, #{now => ?CLOCK})).

%% A summary `lat' exposes `lat_sum' and `lat_count': a metric of one of
%% those names, or a built-in family's name, would make a second family of
%% the same sample name (or two TYPE lines).
colliding_family_names_are_refused() ->
    M = atom_to_binary(metric()),
    ok = dspex_metrics:record(M, 1, #{}),
    ?assertEqual({error, {name_conflict, M}}, dspex_metrics:record(<<M/binary, "_count">>, 1, #{})),
    ?assertEqual({error, {name_conflict, M}}, dspex_metrics:record(<<M/binary, "_sum">>, 1, #{a => b})),
    %% the other way round
    N = atom_to_binary(metric()),
    ok = dspex_metrics:record(<<N/binary, "_sum">>, 1, #{}),
    ?assertEqual({error, {name_conflict, <<N/binary, "_sum">>}}, dspex_metrics:record(N, 1, #{})),
    %% a counter exposes only its own name
    ok = dspex_metrics:record(<<N/binary, "_total">>, 1, #{}),
    ok = dspex_metrics:record(<<N/binary, "_total_count">>, 1, #{}),
    %% built-in families: `dspex_' names other than the analytics' own series
    [?assertEqual({error, {invalid_argument, metric}}, dspex_metrics:record(B, 1, #{}))
     || B <- [dspex_active_sessions, dspex_metrics_dropped_samples_total, dspex_events_queue_depth,
              dspex_store_duration_us_count, [dspex, cache, hits, total]]],
    ok = dspex_metrics:record(dspex_events_total, 1, #{event => <<"mine">>}),
    ?assertEqual([], dspex_metrics:series(<<M/binary, "_count">>)).

%% The whole exposition, including series made by the cases above, is valid
%% text format 0.0.4: one TYPE line per family, every sample in its family,
%% unique label names, no sample twice, UTF-8 throughout.
exposition_is_valid() ->
    ok = dspex_metrics:record(metric(), 1, #{r => a, s => <<"x\"\n\\">>}),
    Body = iolist_to_binary(dspex_prometheus:render()),
    ?assertEqual(ok, check_exposition(Body)).

check_exposition(Body) ->
    Body = unicode:characters_to_binary(Body), %% UTF-8
    Lines = [L || L <- binary:split(Body, <<"\n">>, [global]), L =/= <<>>],
    {_, _, Seen} =
        lists:foldl(
          fun(<<"# HELP ", _/binary>>, Acc) -> Acc;
             (<<"# TYPE ", T/binary>>, {Types, _, Seen}) ->
                  [Fam, Type] = binary:split(T, <<" ">>),
                  ?assertNot(is_map_key(Fam, Types)),
                  {Types#{Fam => Type}, {Fam, Type}, Seen};
             (Line, {Types, {Fam, Type}, Seen}) ->
                  {Name, Labels} =
                      case re:run(Line, "^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\\{(.*)\\})? \\S+$", [{capture, all_but_first, binary}]) of
                          {match, [N]} -> {N, <<>>};
                          {match, [N, L]} -> {N, L}
                      end,
                  Allowed = case Type of
                                <<"summary">> -> [Fam, <<Fam/binary, "_sum">>, <<Fam/binary, "_count">>];
                                _ -> [Fam]
                            end,
                  ?assert(lists:member(Name, Allowed)),
                  Pairs = label_pairs(Labels),
                  Keys = [K || {K, _} <- Pairs],
                  ?assertEqual(length(Keys), length(lists:usort(Keys))),
                  [?assertMatch({match, _}, re:run(K, "^[a-zA-Z_][a-zA-Z0-9_]*$")) || K <- Keys],
                  Sample = {Name, lists:sort(Pairs)},
                  ?assertNot(is_map_key(Sample, Seen)),
                  {Types, {Fam, Type}, Seen#{Sample => true}}
          end, {#{}, none, #{}}, Lines),
    true = map_size(Seen) > 0,
    ok.

%% Parses `k="v",...' exactly: every byte of the label list must be consumed.
label_pairs(<<>>) -> [];
label_pairs(Labels) ->
    case re:run(Labels, "^([^=]+)=\"((?:[^\"\\\\]|\\\\.)*)\"(?:,(.+))?$", [{capture, all_but_first, binary}, dotall]) of
        {match, [K, V]} -> [{K, V}];
        {match, [K, V, Rest]} -> [{K, V} | label_pairs(Rest)]
    end.

%%% dashboard and Prometheus (fresh application each) ------------------------

dashboard_test_() ->
    {foreach, fun() -> restart([]) end, fun(_) -> ok end,
     [fun dashboard_from_known_events/0, fun dashboard_from_real_operations/0,
      fun native_reads_are_counted_once/0, fun native_reads_from_dirty_and_other_processes/0,
      fun prometheus_scrape/0, fun crashed_server_is_replaced_with_its_handlers/0,
      fun native_sample_keeps_the_second_it_returned_in/0, fun refused_native_samples_are_counted/0,
      fun badarg_read_is_not_a_miss/0]}.

%% Killing the server keeps every series (their table belongs to the
%% supervisor) and the replacement attaches the handlers to them again.
crashed_server_is_replaced_with_its_handlers() ->
    ok = dspex_metrics:record(kept_metric, 7, #{k => v}),
    Old = whereis(dspex_metrics_server),
    Ids = lists:sort([Id || #{id := Id} <- dspex_telemetry:list_handlers([dspex])]),
    ?assert(lists:member({dspex_metrics, [dspex, store, get, stop]}, Ids)),
    MRef = monitor(process, Old),
    exit(Old, kill),
    receive {'DOWN', MRef, process, Old, killed} -> ok after 5000 -> error(not_killed) end,
    New = await_restart(Old, 500),
    ?assert(is_pid(New)),
    ?assertEqual(Ids, lists:sort([Id || #{id := Id} <- dspex_telemetry:list_handlers([dspex])])),
    dspex_telemetry:execute([dspex, store, get, stop], #{duration => us(150)},
                            #{session => <<"s">>, variable => x, result => ok}),
    #{last_minute := #{reads := 1, avg_read_latency_us := R}} = dspex_metrics:dashboard(),
    ?assert(abs(R - 150.0) < 1.0e-9),
    %% the series recorded before the crash is still there, and still records
    Now = dspex_metrics:clock(),
    ?assertEqual({ok, 1}, dspex_metrics:query({kept_metric, #{k => v}}, Now - 59, Now, count)),
    ok = dspex_metrics:record(kept_metric, 9, #{k => v}),
    ?assertEqual({ok, 16.0}, dspex_metrics:query({kept_metric, #{k => v}}, Now - 59, Now + 1, sum)).

%% Binds the native timing of `get' to three fresh series for the duration
%% of F (the analytics' own binding is restored after).
with_fresh_get_series(Hours, F) ->
    [Ok, Miss, Err] = [dspex_nif:metrics_series_new(Hours) || _ <- [ok, miss, error]],
    ok = dspex_nif:metrics_native_bind(get, Ok, Miss, Err),
    try F(Ok, Miss, Err)
    after ok = dspex_metrics_handler:attach_native()
    end.

count_in(Series, From, To) ->
    {ok, Sk} = dspex_nif:metrics_query([Series], From, To, To),
    maps:get(count, dspex_nif:metrics_sketch_stats(Sk)).

%% Natively timed reads wait in a per-thread buffer until something drains it.
%% A sample belongs to the second its call returned in, not to the second of
%% the drain: reads buffered before `Now' was read stay visible in a query
%% ending at `Now' even when the clock has moved on before the query drains.
native_sample_keeps_the_second_it_returned_in() ->
    S = <<"native_tick">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    with_fresh_get_series(24, fun(Ok, _, _) ->
        [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 100)], %% fewer than a buffer holds
        Now = dspex_metrics:clock(),
        await_clock_after(Now, 300), %% the second ticks before the query drains the buffer
        ?assertEqual(100, count_in(Ok, Now - 59, Now))
    end),
    ok = dspex_store:delete_session(S).

%% Bounded poll of the clock itself (the condition is the clock's value).
await_clock_after(_T, 0) -> error(clock_did_not_move);
await_clock_after(T, N) ->
    case dspex_metrics:clock() > T of
        true -> ok;
        false -> timer:sleep(5), await_clock_after(T, N - 1)
    end.

%% A native sample its series refuses (its second is older than the series
%% retains) is counted as dropped, on the dashboard and for Prometheus.
refused_native_samples_are_counted() ->
    S = <<"native_dropped">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    with_fresh_get_series(1, fun(Ok, _, _) ->
        %% the series has seen a time 3 h ahead (recorded while the clock was
        %% there): its 1 h retention no longer covers now
        ok = dspex_nif:metrics_set_clock(dspex_metrics:clock() + 3 * 3600),
        try ok = dspex_nif:metrics_record(Ok, 1.0, now)
        after ok = dspex_nif:metrics_set_clock(now)
        end,
        D0 = dspex_metrics:dropped_samples(),
        [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 5)],
        ok = dspex_nif:metrics_native_flush(),
        ?assertEqual(D0 + 5, dspex_metrics:dropped_samples()),
        %% a handler's record of `now' refused the same way is counted too
        {error, rejected} = dspex_nif:metrics_record(Ok, 1.0, now),
        ?assertEqual(D0 + 6, dspex_metrics:dropped_samples()),
        %% an explicit time refused is answered to its caller, not counted
        {error, rejected} = dspex_nif:metrics_record(Ok, 1.0, dspex_metrics:clock()),
        ?assertEqual(D0 + 6, dspex_metrics:dropped_samples()),
        ?assertMatch(#{dropped_samples := N} when N =:= D0 + 6, dspex_metrics:dashboard()),
        Url = "http://127.0.0.1:" ++ integer_to_list(dspex_prometheus:port()) ++ "/metrics",
        {ok, {{_, 200, _}, _, Body}} = httpc:request(get, {Url, []}, [], [{body_format, binary}]),
        Line = iolist_to_binary(["dspex_metrics_dropped_samples_total ", integer_to_list(D0 + 6)]),
        ?assertMatch({_, _}, binary:match(Body, Line))
    end),
    ok = dspex_store:delete_session(S).

%% A read that raised badarg (a malformed session id) was no read: it is
%% counted neither as a miss nor as anything else.
badarg_read_is_not_a_miss() ->
    with_fresh_get_series(24, fun(Ok, Miss, Err) ->
        ?assertError(badarg, dspex_nif:var_get(12345, x)),
        ?assertError(badarg, dspex_nif:var_get_here(12345, x)),
        {error, session_not_found} = dspex_nif:var_get_here(<<"no_such_session">>, x),
        ok = dspex_nif:metrics_native_flush(),
        Now = dspex_metrics:clock(),
        ?assertEqual({0, 1, 0}, {count_in(Ok, Now - 59, Now), count_in(Miss, Now - 59, Now),
                                 count_in(Err, Now - 59, Now)})
    end).

%% The supervisor restarts the child right after the exit; poll its name
%% (bounded: there is no event to wait for besides the registration).
await_restart(_Old, 0) -> error(not_restarted);
await_restart(Old, N) ->
    case whereis(dspex_metrics_server) of
        Pid when is_pid(Pid), Pid =/= Old ->
            _ = sys:get_state(Pid), %% init/1 (attaching) has finished
            Pid;
        _ -> timer:sleep(10), await_restart(Old, N - 1)
    end.

us(N) -> erlang:convert_time_unit(N, microsecond, native).

dashboard_from_known_events() ->
    Read = fun(Result, Extra) ->
                   dspex_telemetry:execute([dspex, store, get, stop], #{duration => us(150)},
                                           Extra#{session => <<"s">>, variable => x, result => Result})
           end,
    [Read(ok, #{}) || _ <- lists:seq(1, 30)],
    [Read(error, #{error => {not_found, x}}) || _ <- lists:seq(1, 10)],
    [dspex_telemetry:execute([dspex, store, set, stop], #{duration => us(500)},
                             #{session => <<"s">>, variable => x, result => ok}) || _ <- lists:seq(1, 15)],
    [dspex_telemetry:execute([dspex, store, set, stop], #{duration => us(500)},
                             #{session => <<"s">>, variable => x, result => error, error => {invalid_value, <<"v">>}})
     || _ <- lists:seq(1, 5)],
    %% optimizations: three released by their optimizer, one preempted
    [dspex_telemetry:execute([dspex, locks, released], #{count => 1}, #{session => <<"s">>, variable => x})
     || _ <- lists:seq(1, 3)],
    dspex_telemetry:execute([dspex, locks, preempted], #{count => 1}, #{session => <<"s">>, variable => x}),
    #{last_minute := LM, last_hour := LH} = dspex_metrics:dashboard(),
    #{reads := 40, writes := 20, avg_read_latency_us := AvgR, avg_write_latency_us := AvgW,
      cache_hit_rate := Hit, error_rate := Err} = LM,
    ?assert(abs(AvgR - 150.0) < 1.0e-9),
    ?assert(abs(AvgW - 500.0) < 1.0e-9),
    ?assertEqual(30 / 40, Hit),
    ?assertEqual(5 / 60, Err),
    #{operations := 60, p95_latency_us := P95, optimization_success_rate := Opt, active_sessions := Act} = LH,
    ?assert(abs(P95 - 500.0) =< 5.0),
    ?assertEqual(0.75, Opt),
    ?assertEqual(length(dspex_store:list_sessions()), Act).

dashboard_from_real_operations() ->
    S = <<"dash_session">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 20)],
    {error, _} = dspex_store:get(S, missing),
    {ok, _} = dspex_store:set(S, x, 0.7),
    {error, _} = dspex_store:set(S, x, <<"not a float">>),
    #{last_minute := #{reads := 21, writes := 3, cache_hit_rate := Hit, error_rate := Err,
                       avg_read_latency_us := R},
      last_hour := #{operations := 24, active_sessions := Act}} = dspex_metrics:dashboard(),
    ?assertEqual(20 / 21, Hit),
    ?assertEqual(1 / 24, Err),
    ?assert(R > 0),
    ?assert(Act >= 1),
    ok = dspex_store:delete_session(S).

%% get/get_value are timed in the NIF: each call is counted once, whether or
%% not another handler makes the store emit its event, and the other handler
%% still sees every call.
native_reads_are_counted_once() ->
    S = <<"native_once">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 10)],
    [{ok, 0.5} = dspex_store:get_value(S, x) || _ <- lists:seq(1, 3)],
    {error, {not_found, _}} = dspex_store:get(S, nope),
    {error, session_not_found} = dspex_store:get(<<"no_such_session">>, x),
    #{last_minute := #{reads := 15, cache_hit_rate := Hit1}} = dspex_metrics:dashboard(),
    ?assertEqual(13 / 15, Hit1),
    Self = self(),
    ok = dspex_telemetry:attach(native_once_probe, [dspex, store, get, stop],
                                fun(_, #{duration := D}, M, _) -> Self ! {probe, D, M} end, []),
    try
        [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 4)],
        {error, {not_found, _}} = dspex_store:get(S, nope),
        Probed = [receive {probe, D, M} -> {D, M} after 1000 -> error(no_event) end || _ <- lists:seq(1, 5)],
        ?assertEqual([ok, ok, ok, ok, error], [R || {_, #{result := R}} <- Probed]),
        ?assert(lists:all(fun({D, _}) -> is_integer(D) andalso D >= 0 end, Probed)),
        #{last_minute := #{reads := 20, cache_hit_rate := Hit2}} = dspex_metrics:dashboard(),
        ?assertEqual(17 / 20, Hit2)
    after
        dspex_telemetry:detach(native_once_probe)
    end,
    ok = dspex_store:delete_session(S).

%% Samples recorded by other scheduler threads (other processes, a dirty
%% scheduler for a big value) are all visible to the next query.
native_reads_from_dirty_and_other_processes() ->
    S = <<"native_threads">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {ok, _} = dspex_store:register(S, big, embedding, [float(I) || I <- lists:seq(1, 20000)]),
    Parent = self(),
    Pids = [spawn_link(fun() ->
                               [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 1000)],
                               Parent ! {done, self()}
                       end) || _ <- lists:seq(1, 4)],
    [receive {done, P} -> ok end || P <- Pids],
    [{ok, _} = dspex_store:get(S, big) || _ <- lists:seq(1, 3)],
    #{last_minute := #{reads := 4003}} = dspex_metrics:dashboard(),
    ok = dspex_store:delete_session(S).

%% Scrapes /metrics over HTTP and parses every line of the exposition.
prometheus_scrape() ->
    S = <<"prom_session">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 7)],
    ok = dspex_metrics:record(custom_metric, 42, #{label => <<"with \"quotes\"">>}),
    Port = dspex_prometheus:port(),
    ?assert(is_integer(Port) andalso Port > 0),
    Url = "http://127.0.0.1:" ++ integer_to_list(Port),
    {ok, {{_, 200, _}, Headers, Body}} = httpc:request(get, {Url ++ "/metrics", []}, [], [{body_format, binary}]),
    ?assertMatch("text/plain; version=0.0.4" ++ _, proplists:get_value("content-type", Headers)),
    Samples = parse(Body),
    ?assertEqual(7.0, maps:get({<<"dspex_store_duration_us_count">>,
                                [{<<"kind">>, <<"read">>}, {<<"op">>, <<"get">>}, {<<"result">>, <<"ok">>}]}, Samples)),
    P50 = maps:get({<<"dspex_store_duration_us">>,
                    [{<<"kind">>, <<"read">>}, {<<"op">>, <<"get">>}, {<<"quantile">>, <<"0.5">>},
                     {<<"result">>, <<"ok">>}]}, Samples),
    ?assert(P50 > 0),
    ?assertEqual(42.0, maps:get({<<"custom_metric_sum">>, [{<<"label">>, <<"with \\\"quotes\\\"">>}]}, Samples)),
    ?assertEqual(float(length(dspex_store:list_sessions())), maps:get({<<"dspex_active_sessions">>, []}, Samples)),
    ?assertEqual(0.0, maps:get({<<"dspex_events_total">>, [{<<"event">>, <<"locks.acquired">>}]}, Samples)),
    %% every family is announced with a TYPE line
    Types = [T || <<"# TYPE ", T/binary>> <- binary:split(Body, <<"\n">>, [global])],
    ?assert(lists:member(<<"dspex_store_duration_us summary">>, Types)),
    ?assert(lists:member(<<"dspex_events_total counter">>, Types)),
    ?assert(lists:member(<<"dspex_active_sessions gauge">>, Types)),
    {ok, {{_, 404, _}, _, _}} = httpc:request(Url ++ "/other"),
    ok = dspex_store:delete_session(S).

%% {Name, SortedLabels} => Value for every sample line; fails on a bad line.
parse(Body) ->
    Lines = [L || L <- binary:split(Body, <<"\n">>, [global]), L =/= <<>>, binary:first(L) =/= $#],
    maps:from_list([parse_line(L) || L <- Lines]).

parse_line(Line) ->
    {match, [Name, Labels, Value]} =
        re:run(Line, "^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\\{(.*)\\})? (\\S+)$", [{capture, all_but_first, binary}]),
    LabelList = case Labels of
                    <<>> -> [];
                    _ ->
                        {match, Pairs} = re:run(Labels, "([a-zA-Z_][a-zA-Z0-9_]*)=\"((?:[^\"\\\\]|\\\\.)*)\"",
                                                [global, {capture, all_but_first, binary}]),
                        [{K, V} || [K, V] <- Pairs]
                end,
    {{Name, lists:sort(LabelList)}, number(Value)}.

number(<<"NaN">>) -> nan;
number(<<"+Inf">>) -> inf;
number(<<"-Inf">>) -> neg_inf;
number(B) ->
    try binary_to_float(B) catch error:badarg -> float(binary_to_integer(B)) end.

off_switch_test() ->
    restart([{prometheus_enabled, false}]),
    try
        ?assertEqual({error, not_running}, dspex_prometheus:port()),
        %% the rest of the bridge runs and still records
        ok = dspex_metrics:record(metric(), 1, #{})
    after
        restart([])
    end.

%% A second node (a separate OS process with its own NIF, driven over stdio)
%% records its own samples; its serialised sketch merged with ours gives the
%% quantiles of the union within the same 1% bound.
merge_with_a_peer_node_test_() ->
    {timeout, 60, fun merge_with_a_peer_node/0}.

merge_with_a_peer_node() ->
    restart([]),
    ok = dspex_nif:metrics_set_clock(?CLOCK),
    try merge_with_a_peer_node_()
    after ok = dspex_nif:metrics_set_clock(now)
    end.

merge_with_a_peer_node_() ->
    Paths = lists:append([["-pa", P] || P <- code:get_path(), string:find(P, "_build") =/= nomatch]),
    {ok, Peer, _Node} = peer:start_link(#{connection => standard_io, args => Paths}),
    try
        ok = peer:call(Peer, application, set_env, [dspex_bridge, prometheus_enabled, false]),
        {ok, _} = peer:call(Peer, application, ensure_all_started, [dspex_bridge]),
        ok = peer:call(Peer, dspex_nif, metrics_set_clock, [?CLOCK]),
        rand:seed(exsss, {2, 7, 1}),
        Local = [math:exp(rand:normal(2.0, 1.0)) || _ <- lists:seq(1, 5000)],
        Remote = [math:exp(rand:normal(4.0, 0.7)) || _ <- lists:seq(1, 5000)],
        [ok = dspex_metrics:record(cluster_latency, V, #{}, #{time => ?T0}) || V <- Local],
        [ok = peer:call(Peer, dspex_metrics, record, [cluster_latency, V, #{}, #{time => ?T0}]) || V <- Remote],
        {ok, Theirs} = peer:call(Peer, dspex_metrics, query, [cluster_latency, ?T0, ?T0, sketch, #{now => ?T0}]),
        {ok, Ours} = dspex_metrics:query(cluster_latency, ?T0, ?T0, sketch, #{now => ?T0}),
        {ok, Cluster} = dspex_metrics:merge(Ours, Theirs),
        {ok, #{count := 10000, p99 := P99, p50 := P50}} = dspex_metrics:summary(Cluster),
        All = list_to_tuple(lists:sort(Local ++ Remote)),
        [?assert(abs(Est - element(trunc(Q * 9999) + 1, All)) =< 0.01 * element(trunc(Q * 9999) + 1, All))
         || {Q, Est} <- [{0.5, P50}, {0.99, P99}]]
    after
        peer:stop(Peer)
    end.
