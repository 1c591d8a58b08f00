%% @doc EUnit tests of `dspex_models:select_model/2' (routing) and
%% `record_inference/4' (ingest).
-module(dspex_models_select_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dspex_models_registry_tests, [uniq/1]).

select_test_() ->
    {setup, fun dspex_models_registry_tests:start/0, fun(_) -> ok end,
     [{"the bucket hash is fixed (same on every node and release)", fun bucket_fixed/0},
      {"a unit gets the same variant on every call", fun sticky/0},
      {"the split follows the weights", fun weights/0},
      {"select_model and record_inference make no server call", fun no_server_call/0},
      {"record_inference counts per variant; a restricted experiment only", fun ingest/0},
      {"a finished test stops routing and ingesting", fun finished/0},
      {"bad arguments", fun bad_args/0},
      {"the SelectModel and RecordInference RPC handlers", fun grpc_handlers/0},
      {"out-of-range weights, mde, alpha, power are refused; the server and its counts live on",
       fun extreme_specs/0},
      {"RecordInference: the bad field is named; custom values are kept apart from experiment "
       "and checked like record_inference/4", fun grpc_record_fields/0},
      {timeout, 60, {"another node running the same test with the same salt routes every unit alike",
                     fun across_nodes/0}}]}.

two_models(Prefix) ->
    N = uniq(Prefix),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => N, version => <<"b">>}),
    ok = dspex_models:set_alias(N, production, A),
    {N, A, B}.

bucket_fixed() ->
    %% erlang:phash2/2 is documented as portable; these values must never change
    ?assertEqual(erlang:phash2({<<"salt">>, 42}, 10000), dspex_models:bucket(<<"salt">>, 42)),
    ?assertEqual(5712, dspex_models:bucket(<<"salt">>, 42)),
    ?assertEqual(8274, dspex_models:bucket(<<"exp-1">>, <<"user-7">>)).

sticky() ->
    {N, A, B} = two_models(<<"st">>),
    {ok, _} = dspex_models:start_ab_test(#{model => N, variants => [{A, 50}, {B, 50}]}),
    First = [{U, dspex_models:select_model(N, #{user_id => U})} || U <- lists:seq(1, 2000)],
    ?assert(lists:all(fun({U, R}) ->
                              R =:= dspex_models:select_model(N, #{user_id => U, other => x})
                                  andalso R =:= dspex_models:select_model(N, U)
                      end, First)),
    Models = lists:usort([M || {_, {ok, M}} <- First]),
    ?assertEqual(lists:sort([A, B]), Models).

weights() ->
    {N, A, B} = two_models(<<"w">>),
    {ok, _} = dspex_models:start_ab_test(#{model => N, variants => [{A, 80}, {B, 20}]}),
    Total = 20000,
    OnB = length([x || U <- lists:seq(1, Total),
                       dspex_models:select_model(N, #{user_id => U}) =:= {ok, B}]),
    %% binomial(20000, 0.2): sd 56.6; 5 sd
    ?assert(abs(OnB - 4000) < 283),
    %% a unit key other than user_id
    {N2, A2, B2} = two_models(<<"w2">>),
    {ok, _} = dspex_models:start_ab_test(#{model => N2, variants => [{A2, 1}, {B2, 1}], unit => tenant}),
    R = [dspex_models:select_model(N2, #{tenant => T}) || T <- lists:seq(1, 400)],
    ?assertEqual(R, [dspex_models:select_model(N2, #{tenant => T, user_id => 1}) || T <- lists:seq(1, 400)]).

no_server_call() ->
    {N, A, B} = two_models(<<"ns">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    ok = sys:suspend(dspex_models_server),
    try
        {ok, M} = dspex_models:select_model(N, #{user_id => 5}),
        ok = dspex_models:record_inference(M, 12.5, true, #{})
    after
        ok = sys:resume(dspex_models_server)
    end,
    {ok, #{arm_summary := Arms}} = dspex_models:results(T),
    ?assertEqual(1, lists:sum([maps:get(n, S) || {_, S} <- Arms])).

ingest() ->
    {N, A, B} = two_models(<<"in">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], min_samples => 1000}),
    [ok = dspex_models:record_inference(A, 10, true, #{}) || _ <- lists:seq(1, 30)],
    [ok = dspex_models:record_inference(A, 20, false, #{}) || _ <- lists:seq(1, 10)],
    [ok = dspex_models:record_inference(B, 40, true, #{experiment => T}) || _ <- lists:seq(1, 5)],
    [ok = dspex_models:record_inference(B, 40, true, #{experiment => <<"other">>}) || _ <- lists:seq(1, 5)],
    {ok, #{arm_summary := [{A, SA}, {B, SB}], decision := continue}} = dspex_models:results(T),
    ?assertMatch(#{n := 40, successes := 30}, SA),
    ?assertMatch(#{n := 5, successes := 5}, SB),
    %% p50 of A is 10 ms within the histogram's resolution (4.4%)
    P50 = maps:get(latency_p50_ms, SA),
    ?assert(abs(P50 - 10) / 10 < 0.05),
    P95 = maps:get(latency_p95_ms, SA),
    ?assert(abs(P95 - 20) / 20 < 0.05).

finished() ->
    {N, A, B} = two_models(<<"fin">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    ok = dspex_models:stop_test(T),
    {ok, #{decision := {stopped, manual}, status := finished}} = dspex_models:results(T),
    ?assertEqual({ok, A}, dspex_models:select_model(N, #{user_id => 1})),
    ?assertEqual([{ok, A}], lists:usort([dspex_models:select_model(N, #{user_id => U})
                                         || U <- lists:seq(1, 100)])),
    ok = dspex_models:record_inference(B, 1, true, #{}),
    {ok, #{arm_summary := [_, {B, #{n := 0}}]}} = dspex_models:results(T),
    %% a new test on the same name may start now
    {ok, _} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}).

bad_args() ->
    {N, A, B} = two_models(<<"bad">>),
    ?assertError(badarg, dspex_models:record_inference(A, -1, true, #{})),
    ?assertError(badarg, dspex_models:record_inference(A, 1, yes, #{})),
    {ok, TC} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], metric => {custom, score}}),
    ?assertError(badarg, dspex_models:record_inference(A, 1, true, #{score => 1.0e6})),
    ok = dspex_models:record_inference(A, 1, true, #{score => 1000}),
    ok = dspex_models:stop_test(TC),
    ?assertEqual({error, {invalid_argument, variants}},
                 dspex_models:start_ab_test(#{model => N, variants => [{A, 1}]})),
    ?assertEqual({error, {invalid_argument, variants}},
                 dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {A, 1}]})),
    ?assertEqual({error, {invalid_argument, alpha}},
                 dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], alpha => 2.0})),
    ?assertEqual({error, {not_found, <<N/binary, "@zz">>}},
                 dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {<<N/binary, "@zz">>, 1}]})),
    [?assertEqual({error, {invalid_argument, K}},
                  dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], K => V}))
     || {K, V} <- [{max_samples, 0}, {baseline, 1.5}, {direction, up}, {metric, speed},
                   {min_samples, 1}, {max_duration, -1}, {mde, 0}, {power, 1.0}]],
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    ?assertEqual({error, {busy, T}}, dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]})),
    ?assertEqual({error, not_found}, dspex_models:results(<<"nope">>)).

grpc_handlers() ->
    {N, A, B} = two_models(<<"rpc">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}],
                                           metric => {custom, score}, min_samples => 1000}),
    H = fun(M, Req) -> dspex_grpc_handler:handle(M, Req, #{}, undefined) end,
    %% the gRPC unit is a binary: the same model as an Erlang caller passing the same binary
    lists:foreach(fun(U) ->
                          Unit = integer_to_binary(U),
                          {ok, M} = dspex_models:select_model(N, #{user_id => Unit}),
                          ?assertEqual({reply, #{model_id => M}},
                                       H('SelectModel', #{session_id => <<>>, name => N, unit => Unit, unit_key => <<>>})),
                          ?assertEqual({reply, #{model_id => M}},
                                       H('SelectModel', #{session_id => <<"s">>, name => N, unit => Unit,
                                                          unit_key => <<"user_id">>}))
                  end, lists:seq(1, 50)),
    ?assertEqual({error, {no_model, <<"zz_none">>}},
                 H('SelectModel', #{session_id => <<>>, name => <<"zz_none">>, unit => <<"1">>, unit_key => <<>>})),
    ?assertEqual({error, {invalid_argument, name}},
                 H('SelectModel', #{session_id => <<>>, name => <<>>, unit => <<"1">>, unit_key => <<>>})),
    Rec = #{session_id => <<>>, model_id => B, latency_ms => 12.0, success => true, experiment => <<>>,
            custom => #{<<"score">> => 0.5}},
    ?assertEqual({reply, #{}}, H('RecordInference', Rec)),
    ?assertEqual({reply, #{}}, H('RecordInference', Rec#{experiment => <<"another">>})),
    ?assertEqual({error, {invalid_argument, latency_ms}}, H('RecordInference', Rec#{latency_ms => 0.0})),
    ?assertEqual({error, {invalid_argument, model_id}}, H('RecordInference', Rec#{model_id => <<>>})),
    ?assertEqual({error, {invalid_argument, custom}}, H('RecordInference', Rec#{custom => #{<<"score">> => 1.0e9}})),
    {ok, #{arm_summary := [{A, #{n := 0}}, {B, #{n := 1}}]}} = dspex_models:results(T),
    ?assertMatch({not_found, _}, dspex_grpc_status:of_error({no_model, <<"x">>})).

across_nodes() ->
    Paths = lists:append([["-pa", P] || P <- code:get_path(), string:find(P, "_build") =/= nomatch]),
    {ok, Peer, _} = peer:start_link(#{connection => standard_io, args => Paths}),
    try
        [ok = peer:call(Peer, application, set_env, [dspex_bridge, K, V])
         || {K, V} <- [{grpc_enabled, false}, {prometheus_enabled, false}]],
        {ok, _} = peer:call(Peer, application, ensure_all_started, [dspex_bridge]),
        N = uniq(<<"xn">>),
        Setup = fun(Call) ->
                        {ok, A} = Call(dspex_models, register_model, [#{name => N, version => <<"1">>}]),
                        {ok, B} = Call(dspex_models, register_model, [#{name => N, version => <<"2">>}]),
                        {ok, C} = Call(dspex_models, register_model, [#{name => N, version => <<"3">>}]),
                        ok = Call(dspex_models, set_alias, [N, production, A]),
                        {ok, _} = Call(dspex_models, start_ab_test,
                                       [#{model => N, variants => [{A, 60}, {B, 30}, {C, 10}],
                                          salt => <<"exp-19">>}]),
                        ok
                end,
        ok = Setup(fun erlang:apply/3),
        ok = Setup(fun(M, F, A) -> peer:call(Peer, M, F, A) end),
        Units = [integer_to_binary(U) || U <- lists:seq(1, 3000)],
        Here = [dspex_models:select_model(N, #{user_id => U}) || U <- Units],
        There = [peer:call(Peer, dspex_models, select_model, [N, #{user_id => U}]) || U <- Units],
        ?assertEqual(Here, There),
        ?assertEqual(3, length(lists:usort(Here)))
    after
        peer:stop(Peer)
    end.

extreme_specs() ->
    {N, A, B} = two_models(<<"ext">>),
    {N2, C, D} = two_models(<<"ext2">>),
    %% another test with samples its server holds and has not checkpointed yet
    {ok, T0} = dspex_models:start_ab_test(#{model => N2, variants => [{C, 1}, {D, 1}], min_samples => 1000}),
    [ok = dspex_models:record_inference(C, 10, true, #{}) || _ <- lists:seq(1, 50)],
    Pid = whereis(dspex_models_server),
    Spec = #{model => N, variants => [{A, 1}, {B, 1}], baseline => 0.5},
    %% each of these crashed the server: the weights after the test was
    %% stored (so every restart crashed again and the application stopped),
    %% the others in required_samples/1
    [?assertEqual({error, {invalid_argument, K}}, dspex_models:start_ab_test(Spec#{K => V}))
     || {K, V} <- [{variants, [{A, 1.0e308}, {B, 1.0e308}]}, {variants, [{A, 1 bsl 1100}, {B, 1}]},
                   {variants, [{A, 1.0e6 + 1}, {B, 1}]}, {mde, 1.0e-200}, {mde, 1.0e7},
                   {alpha, 5.0e-324}, {alpha, 0.6}, {power, 5.0e-324}, {power, 0.99999},
                   {metric, {custom, experiment}}]],
    ?assertEqual(Pid, whereis(dspex_models_server)),
    ?assertEqual([], [Id || {Id, _} <- maps:to_list(dspex_models:list_tests()),
                            binary:match(Id, N) =/= nomatch]),
    {ok, #{arm_summary := [{C, #{n := 50}}, {D, #{n := 0}}], status := running}} = dspex_models:results(T0),
    %% the bounds themselves are fine
    {ok, T} = dspex_models:start_ab_test(Spec#{variants => [{A, 1.0e6}, {B, 1}], mde => 1.0e-6,
                                               alpha => 1.0e-9, power => 0.9999}),
    {ok, #{spec := #{max_samples := MaxS}}} = dspex_models:results(T),
    ?assert(is_integer(MaxS)),
    ok = dspex_models:stop_test(T),
    ok = dspex_models:stop_test(T0).

grpc_record_fields() ->
    {N, A, B} = two_models(<<"rpcf">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}],
                                           metric => {custom, score}, min_samples => 1000}),
    Rec = #{session_id => <<>>, model_id => A, latency_ms => 10.0, success => true, experiment => <<>>,
            custom => #{}},
    R = fun dspex_models_grpc:record_inference/1,
    ?assertEqual({error, {invalid_argument, success}}, R(Rec#{success => 1})),
    ?assertEqual({error, {invalid_argument, latency_ms}}, R(Rec#{latency_ms => -1})),
    ?assertEqual({error, {invalid_argument, custom}}, R(Rec#{custom => [x]})),
    %% a custom value named `experiment' is not the experiment filter: recorded
    ?assertEqual({reply, #{}}, R(Rec#{custom => #{<<"experiment">> => 1.0, <<"score">> => 5.0}})),
    ?assertEqual({reply, #{}}, R(Rec#{experiment => T, custom => #{<<"experiment">> => 1.0}})),
    %% only a value a running test records is range-checked, as in Erlang
    ?assertEqual({reply, #{}}, R(Rec#{custom => #{<<"some_unrelated_key_7">> => 3000.0}})),
    ok = dspex_models:record_inference(A, 10.0, true, #{some_unrelated_key_8 => 3000.0}),
    ?assertEqual({error, {invalid_argument, custom}}, R(Rec#{custom => #{<<"score">> => 3000.0}})),
    ?assertError(badarg, dspex_models:record_inference(A, 10.0, true, #{score => 3000.0})),
    {ok, #{arm_summary := [{A, #{n := 4}}, {B, #{n := 0}}]}} = dspex_models:results(T),
    ok = dspex_models:stop_test(T).
