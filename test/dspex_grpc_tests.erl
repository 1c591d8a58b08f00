%% Tests of the gRPC server's Erlang side: error -> status mapping, the value
%% codec (JSON Any and raw little-endian binaries), the RPC handlers on the
%% request maps the port program produces, the wire messages a handler sends
%% (through a `cat' port that echoes them back), watch streams, and the port
%% owner (listening on a free port, restart after the port program is killed,
%% a busy port refused at start, bounded restarts with one log line).
-module(dspex_grpc_tests).
-include_lib("eunit/include/eunit.hrl").
%% a logger handler that forwards dspex_grpc's log events to a test process
-export([log/2]).

%%% status mapping ---------------------------------------------------------------

status_mapping_test_() ->
    Cases = [{session_not_found, not_found}, {{not_found, <<"x">>}, not_found},
             {{version_not_found, 3}, not_found},
             {{invalid_value, <<"m">>}, invalid_argument}, {{invalid_argument, name}, invalid_argument},
             {{unknown_type, <<"t">>}, invalid_argument}, {{invalid_constraints, <<"c">>}, invalid_argument},
             {{already_exists, <<"x">>}, already_exists},
             {{version_mismatch, 7}, aborted},
             {{locked, <<"opt">>}, failed_precondition}, {stale_lock, failed_precondition},
             {{lock_held_by, <<"o">>}, failed_precondition}, {{would_create_cycle, [a, b, a]}, failed_precondition},
             {derived_variable, failed_precondition},
             {access_denied, permission_denied},
             {rate_limited, resource_exhausted}, {{limit_exceeded, variables}, resource_exhausted},
             {{limit_exceeded, sessions}, resource_exhausted}, {{limit_exceeded, version}, resource_exhausted},
             %% a request over a size limit is refused whatever the state: not "retry later"
             {{limit_exceeded, value_size}, invalid_argument}, {{limit_exceeded, name_length}, invalid_argument},
             {{limit_exceeded, history_limit}, invalid_argument},
             {overload, unavailable}, {timeout, deadline_exceeded}, {unimplemented, unimplemented},
             {{something, odd}, internal}],
    [?_assertEqual(Status, element(1, dspex_grpc_status:of_error(R))) || {R, Status} <- Cases].

status_messages_test() ->
    {aborted, M} = dspex_grpc_status:of_error({version_mismatch, 7}),
    ?assertEqual(<<"version mismatch: current version is 7">>, M),
    {failed_precondition, C} = dspex_grpc_status:of_error({would_create_cycle, [<<"a">>, <<"b">>, <<"a">>]}),
    ?assertMatch({_, _}, binary:match(C, <<"cycle: a -> b -> a">>)),
    %% a study's lock: its algorithm, not an Erlang term with a pid
    ?assertEqual({failed_precondition, <<"variable is locked by optimizer study (tpe)">>},
                 dspex_grpc_status:of_error({lock_held_by, {dspex_opt, tpe, self()}})),
    ?assertEqual({failed_precondition, <<"variable is locked by optimizer opt1">>},
                 dspex_grpc_status:of_error({locked, <<"opt1">>})),
    ?assertEqual(10, dspex_grpc_status:code(aborted)),
    [?assertEqual(N, dspex_grpc_status:code(dspex_grpc_status:name(N))) || N <- lists:seq(0, 16)].

%% Limits and rate limiting share no message and no dspex-error trailer.
status_trailers_test() ->
    {invalid_argument, VM} = dspex_grpc_status:of_error({limit_exceeded, value_size}),
    ?assertMatch({match, _}, re:run(VM, "^limit exceeded: value_size \\(max_value_bytes = [0-9]+\\)$")),
    {resource_exhausted, <<"rate limited">>} = dspex_grpc_status:of_error(rate_limited),
    ?assertEqual(#{<<"dspex-error">> => <<"limit_exceeded">>, <<"dspex-limit">> => <<"value_size">>},
                 dspex_grpc_status:trailers({limit_exceeded, value_size})),
    ?assertEqual(#{<<"dspex-error">> => <<"rate_limited">>}, dspex_grpc_status:trailers(rate_limited)),
    ?assertEqual(#{<<"dspex-error">> => <<"version_mismatch">>, <<"dspex-current-version">> => <<"7">>},
                 dspex_grpc_status:trailers({version_mismatch, 7})),
    ?assertEqual(#{<<"dspex-error">> => <<"session_not_found">>}, dspex_grpc_status:trailers(session_not_found)),
    ?assertEqual(#{<<"dspex-error">> => <<"not_found">>}, dspex_grpc_status:trailers({not_found, <<"x">>})),
    ?assertEqual(#{<<"dspex-error">> => <<"internal">>}, dspex_grpc_status:trailers({crash, boom})),
    ?assertEqual(#{<<"dspex-error">> => <<"internal">>}, dspex_grpc_status:trailers(<<"odd">>)).

%%% value codec --------------------------------------------------------------------

any(T, V) -> #{type_url => <<"type.googleapis.com/snakepit.", T/binary>>, value => V}.

value_json_test() ->
    ?assertEqual({ok, 0.5}, dspex_grpc_value:decode(float, any(<<"float">>, 0.5), <<>>)),
    ?assertEqual({ok, nan}, dspex_grpc_value:decode(float, any(<<"float">>, <<"NaN">>), <<>>)),
    ?assertEqual({ok, neg_infinity}, dspex_grpc_value:decode(undefined, any(<<"float">>, <<"-Infinity">>), <<>>)),
    ?assertEqual({ok, [1, infinity]}, dspex_grpc_value:decode(embedding, any(<<"embedding">>, [1, <<"Infinity">>]), <<>>)),
    ?assertEqual({ok, #{shape => [2, 2], data => [1, 2, 3, 4]}},
                 dspex_grpc_value:decode(tensor, any(<<"tensor">>, #{<<"shape">> => [2, 2], <<"data">> => [[1, 2], [3, 4]]}), <<>>)),
    ?assertMatch({error, {invalid_value, _}}, dspex_grpc_value:decode(boolean, any(<<"boolean">>, 1), <<>>)),
    ?assertMatch({error, {invalid_value, _}}, dspex_grpc_value:decode(float, undefined, <<>>)),
    ?assertMatch({error, {unknown_type, _}}, dspex_grpc_value:decode(undefined, any(<<"pickle">>, 1), <<>>)),
    ?assertEqual({ok, tensor}, dspex_grpc_value:type_of(<<"type.googleapis.com/snakepit.tensor.binary">>)).

value_binary_test() ->
    F32 = << <<X:32/little-float>> || X <- [1.0, -2.5, 0.25] >>,
    Meta32 = #{<<"dtype">> => <<"float32">>, <<"shape">> => [3]},
    ?assertEqual({ok, [1.0, -2.5, 0.25]}, dspex_grpc_value:decode(embedding, any(<<"embedding">>, Meta32), F32)),
    F64 = << <<X:64/little-float>> || X <- [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] >>,
    ?assertEqual({ok, #{shape => [2, 3], data => [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}},
                 dspex_grpc_value:decode(tensor, any(<<"tensor">>, #{<<"dtype">> => <<"float64">>, <<"shape">> => [2, 3]}), F64)),
    %% NaN and infinities do not match the bit syntax: decoded by hand
    Special = <<0, 0, 192, 127, 0, 0, 128, 127, 0, 0, 128, 255>>,
    ?assertEqual({ok, [nan, infinity, neg_infinity]},
                 dspex_grpc_value:decode(embedding, any(<<"embedding">>, Meta32), Special)),
    %% length must match shape x dtype; the format must be raw_le; only arrays
    ?assertMatch({error, {invalid_value, _}}, dspex_grpc_value:decode(embedding, any(<<"embedding">>, Meta32), <<1, 2, 3>>)),
    ?assertMatch({error, {invalid_value, _}},
                 dspex_grpc_value:decode(embedding, any(<<"embedding">>, Meta32#{<<"binary_format">> => <<"pickle">>}), F32)),
    ?assertMatch({error, {invalid_value, _}}, dspex_grpc_value:decode(float, any(<<"float">>, Meta32), F32)),
    ?assertMatch({error, {invalid_value, _}},
                 dspex_grpc_value:decode(embedding, any(<<"embedding">>, Meta32#{<<"dtype">> => <<"int8">>}), F32)).

value_encode_test() ->
    {Small, <<>>} = dspex_grpc_value:encode(embedding, [1.0, 2.0], 2),
    ?assertEqual([1.0, 2.0], maps:get(value, Small)),
    {Big, Bin} = dspex_grpc_value:encode(embedding, [1.0, nan, 3.0], 2),
    ?assertEqual(#{<<"dtype">> => <<"float64">>, <<"shape">> => [3], <<"binary_format">> => <<"raw_le">>},
                 maps:get(value, Big)),
    ?assertEqual({ok, [1.0, nan, 3.0]}, dspex_grpc_value:decode(embedding, Big, Bin)),
    {T, TB} = dspex_grpc_value:encode(tensor, #{shape => [1, 3], data => [1.0, 2.0, 3.0]}, 2),
    ?assertEqual({ok, #{shape => [1, 3], data => [1.0, 2.0, 3.0]}}, dspex_grpc_value:decode(tensor, T, TB)),
    {J, <<>>} = dspex_grpc_value:encode(tensor, #{shape => [1], data => [1.0]}, 2),
    ?assertEqual(#{<<"shape">> => [1], <<"data">> => [1.0]}, maps:get(value, J)).

%% A shape of many huge dimensions is refused at once, without multiplying
%% them out (that took minutes) and without printing them into the message.
huge_tensor_shape_refused_cheaply_test() ->
    Huge = binary_to_integer(binary:copy(<<"7">>, 4300)),
    Any = #{type_url => <<"type.googleapis.com/snakepit.tensor">>,
            value => #{<<"dtype">> => <<"float64">>, <<"shape">> => lists:duplicate(1000, Huge)}},
    {error, {invalid_value, Msg}} = dspex_grpc_value:decode(tensor, Any, binary:copy(<<0>>, 4096)),
    ?assert(byte_size(Msg) < 200),
    %% still exact for shapes that fit
    Ok = fun(Shape, Bytes) -> dspex_grpc_value:decode(tensor, Any#{value := #{<<"shape">> => Shape}}, Bytes) end,
    ?assertEqual({ok, #{shape => [2, 1], data => [0.0, 0.0]}}, Ok([2, 1], <<0:128>>)),
    {error, {invalid_value, Msg0}} = Ok([Huge, 0], <<0:64>>),
    ?assert(byte_size(Msg0) < 200),
    ?assertMatch({error, {invalid_value, _}}, Ok([2, 2], <<0:128>>)),
    ?assertMatch({error, {invalid_value, _}}, Ok([1], <<0:128>>)).

%%% handlers ----------------------------------------------------------------------

store_setup() ->
    _ = application:stop(dspex_bridge),
    application:load(dspex_bridge),
    ok = application:set_env(dspex_bridge, grpc_enabled, false),
    {ok, Apps} = application:ensure_all_started(dspex_bridge),
    %% the handlers need the registry and the watch groups, not the port
    {ok, Opt} = dspex_grpc_opt:start_link(),
    {ok, Pg} = pg:start_link(dspex_grpc_watch),
    unlink(Opt),
    unlink(Pg),
    {Apps, Opt, Pg}.

store_cleanup({Apps, Opt, Pg}) ->
    [begin Ref = monitor(process, P), exit(P, shutdown), receive {'DOWN', Ref, _, _, _} -> ok end end || P <- [Opt, Pg]],
    [application:stop(A) || A <- lists:reverse(Apps)],
    application:unset_env(dspex_bridge, grpc_enabled).

call(M, Req) -> call(M, Req, #{}).
call(M, Req, Meta) ->
    dspex_grpc_handler:handle(M, Req, #{ctx => none, meta => Meta, deadline => infinity,
                                        opts => acl(Meta)}, none).

acl(#{<<"dspex-principal">> := P}) -> #{as => P};
acl(_) -> #{}.

register_req(S, Name, Type, V) ->
    #{session_id => S, name => Name, type => Type, initial_value => any(Type, V), constraints_json => undefined,
      metadata => #{}, initial_binary_value => <<>>}.

set_req(S, K, Any, EV) ->
    #{session_id => S, variable_identifier => K, value => Any, metadata => #{}, expected_version => EV,
      expect_version_zero => false, binary_value => <<>>}.

handlers_test_() ->
    {setup, fun store_setup/0, fun store_cleanup/1,
     [fun sessions_and_variables/0, fun error_statuses/0, fun batches/0, fun graph_and_history/0,
      fun optimization/0, fun access_control/0, fun dashboard_and_tools/0, fun wire_messages_and_watch/0,
      fun wire_numbers_checked/0, fun every_rpc_honours_the_principal/0,
      fun optimization_rpcs_need_the_principals_permissions/0]}.

sessions_and_variables() ->
    S = <<"grpc_t1">>,
    {reply, #{success := true}} = call('InitializeSession', #{session_id => S, metadata => #{<<"k">> => <<"v">>},
                                                              config => undefined}),
    {reply, #{variable_id := Id}} = call('RegisterVariable',
                                         (register_req(S, <<"temp">>, <<"float">>, 0.5))#{constraints_json => #{<<"min">> => 0, <<"max">> => 1}}),
    {reply, #{variable := V}} = call('GetVariable', #{session_id => S, variable_identifier => Id, bypass_cache => false}),
    ?assertMatch(#{name := <<"temp">>, type := <<"float">>, version := 0, constraints_json := #{min := 0.0, max := 1.0},
                   value := #{type_url := <<"type.googleapis.com/snakepit.float">>, value := 0.5}}, V),
    {reply, #{new_version := 1}} = call('SetVariable', set_req(S, <<"temp">>, any(<<"float">>, 0.75), 0)),
    %% expected_version honoured; ABORTED carries the current version
    ?assertEqual({error, {version_mismatch, 1}}, call('SetVariable', set_req(S, <<"temp">>, any(<<"float">>, 0.1), 5))),
    {reply, #{new_version := 2}} = call('SetVariable', set_req(S, <<"temp">>, any(<<"float">>, 0.1), 1)),
    %% expect_version_zero makes 0 a real expectation
    ?assertEqual({error, {version_mismatch, 2}},
                 call('SetVariable', (set_req(S, <<"temp">>, any(<<"float">>, 0.2), 0))#{expect_version_zero => true})),
    {reply, #{session_id := S, variable_count := 1, metadata := #{<<"k">> := <<"v">>}}} =
        call('GetSession', #{session_id => S}),
    {reply, #{session_valid := true}} = call('Heartbeat', #{session_id => S, client_time => undefined}),
    {reply, #{session_valid := false}} = call('Heartbeat', #{session_id => <<"nope">>, client_time => undefined}),
    {reply, #{variables := [#{name := <<"temp">>}]}} = call('ListVariables', #{session_id => S, pattern => <<"te*">>}),
    {reply, #{variables := []}} = call('ListVariables', #{session_id => S, pattern => <<"x*">>}),
    %% the initial variables come back on a second InitializeSession
    {reply, #{initial_variables := #{<<"temp">> := #{version := 2}}}} =
        call('InitializeSession', #{session_id => S, metadata => #{}, config => undefined}),
    {reply, #{success := true}} = call('DeleteVariable', #{session_id => S, variable_identifier => <<"temp">>}),
    {reply, #{success := true, resources_cleaned := 0}} = call('CleanupSession', #{session_id => S, force => false}),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    %% idempotent
    {reply, #{success := true, resources_cleaned := 0}} = call('CleanupSession', #{session_id => S, force => false}).

error_statuses() ->
    S = <<"grpc_t2">>,
    {ok, _} = dspex_store:create_session(S),
    ?assertEqual({error, session_not_found}, call('GetVariable', #{session_id => <<"none">>, variable_identifier => <<"x">>,
                                                                  bypass_cache => false})),
    ?assertEqual({error, {not_found, <<"x">>}}, call('GetVariable', #{session_id => S, variable_identifier => <<"x">>,
                                                                     bypass_cache => false})),
    ?assertMatch({error, {unknown_type, <<"pickle">>}}, call('RegisterVariable', register_req(S, <<"p">>, <<"pickle">>, 1))),
    ?assertMatch({error, {invalid_value, _}},
                 call('RegisterVariable', (register_req(S, <<"b">>, <<"boolean">>, true))#{initial_value => any(<<"boolean">>, 3)})),
    {reply, _} = call('RegisterVariable', (register_req(S, <<"f">>, <<"float">>, 0.5))#{constraints_json => #{<<"max">> => 1}}),
    ?assertMatch({error, {invalid_value, _}}, call('SetVariable', set_req(S, <<"f">>, any(<<"float">>, 2.0), 0))),
    ?assertMatch({error, {already_exists, _}}, call('RegisterVariable', register_req(S, <<"f">>, <<"float">>, 0.1))),
    ?assertEqual({error, {invalid_argument, session_id}}, call('GetSession', #{session_id => <<>>})),
    ?assertMatch({error, {invalid_constraints, _}},
                 call('RegisterVariable', (register_req(S, <<"c">>, <<"float">>, 0.1))#{constraints_json => [1]})),
    {ok, _} = dspex_store:get(S, <<"f">>).

batches() ->
    S = <<"grpc_t3">>,
    {ok, _} = dspex_store:create_session(S),
    [{reply, _} = call('RegisterVariable', register_req(S, N, <<"integer">>, 0)) || N <- [<<"a">>, <<"b">>]],
    Req = #{session_id => S, metadata => #{}, binary_updates => #{}},
    {reply, #{success := true, new_versions := #{<<"a">> := 1, <<"b">> := 1}}} =
        call('SetVariables', Req#{updates => #{<<"a">> => any(<<"integer">>, 5), <<"b">> => any(<<"integer">>, 6)},
                                  atomic => true}),
    %% atomic: one bad update, nothing written
    {reply, #{success := false, errors := #{<<"a">> := _}}} =
        call('SetVariables', Req#{updates => #{<<"a">> => any(<<"integer">>, <<"x">>), <<"b">> => any(<<"integer">>, 7)},
                                  atomic => true}),
    {ok, 6} = dspex_store:get_value(S, <<"b">>),
    %% not atomic: the good one commits, the bad one is reported
    {reply, #{success := false, errors := #{<<"zz">> := _}, new_versions := #{<<"b">> := 2}}} =
        call('SetVariables', Req#{updates => #{<<"zz">> => any(<<"integer">>, 1), <<"b">> => any(<<"integer">>, 7)},
                                  atomic => false}),
    {reply, #{variables := Found, missing_variables := [<<"nope">>]}} =
        call('GetVariables', #{session_id => S, variable_identifiers => [<<"a">>, <<"nope">>, <<"b">>],
                               include_metadata => true, bypass_cache => false}),
    ?assertEqual([<<"a">>, <<"b">>], lists:sort(maps:keys(Found))).

graph_and_history() ->
    S = <<"grpc_t4">>,
    {ok, _} = dspex_store:create_session(S),
    [{reply, _} = call('RegisterVariable', register_req(S, N, <<"integer">>, 0)) || N <- [<<"a">>, <<"b">>, <<"c">>]],
    Dep = fun(F, T) -> call('AddDependency', #{session_id => S, from_variable => F, to_variable => T,
                                               dependency_type => <<>>}) end,
    {reply, #{success := true}} = Dep(<<"a">>, <<"b">>),
    {reply, #{success := true}} = Dep(<<"b">>, <<"c">>),
    ?assertMatch({error, {would_create_cycle, _}}, Dep(<<"c">>, <<"a">>)),
    ?assertMatch({error, {invalid_argument, _}},
                 call('AddDependency', #{session_id => S, from_variable => <<"a">>, to_variable => <<"c">>,
                                         dependency_type => <<"no such atom zzqq">>})),
    Q = #{session_id => S, variable_identifier => <<"a">>},
    {reply, #{variables := [<<"b">>]}} = call('GetDependents', Q#{transitive => false}),
    {reply, #{variables := [<<"b">>, <<"c">>]}} = call('GetDependents', Q#{transitive => true}),
    {reply, #{variables := [<<"a">>, <<"b">>, <<"c">>]}} = call('GetUpdateOrder', Q),
    {reply, #{variables := [<<"a">>]}} = call('GetDependencies', Q#{variable_identifier => <<"b">>}),
    {reply, #{success := true}} = call('RemoveDependency', #{session_id => S, from_variable => <<"a">>, to_variable => <<"b">>}),
    ?assertMatch({error, {not_found, _}},
                 call('RemoveDependency', #{session_id => S, from_variable => <<"a">>, to_variable => <<"b">>})),
    [{reply, _} = call('SetVariable', set_req(S, <<"a">>, any(<<"integer">>, V), 0)) || V <- [10, 20, 30]],
    {reply, #{entries := [#{version := 2, value := #{value := 20}}, #{version := 1}]}} =
        call('GetVariableHistory', Q#{limit => 2}),
    {reply, #{success := true, variable := #{version := 4, value := #{value := 10}}}} =
        call('RollbackVariable', Q#{target_version => 1}),
    ?assertEqual({error, {version_not_found, 99}}, call('RollbackVariable', Q#{target_version => 99})).

%% Negative numbers from the wire are refused, not taken as "unset" (an
%% unconditional write) or passed on (a rollback to -1 raised badarg in the
%% store: INTERNAL); optimizer_config numbers are int64 at most.
wire_numbers_checked() ->
    S = <<"grpc_t8">>,
    {ok, _} = dspex_store:create_session(S),
    {reply, _} = call('RegisterVariable', register_req(S, <<"n">>, <<"integer">>, 1)),
    ?assertMatch({error, {invalid_argument, <<"expected_version", _/binary>>}},
                 call('SetVariable', set_req(S, <<"n">>, any(<<"integer">>, 2), -1))),
    ?assertMatch({ok, #{version := 0, value := 1}}, dspex_store:get(S, <<"n">>)),
    Q = #{session_id => S, variable_identifier => <<"n">>},
    ?assertMatch({error, {invalid_argument, <<"target_version", _/binary>>}},
                 call('RollbackVariable', Q#{target_version => -1})),
    ?assertMatch({error, {invalid_argument, <<"limit", _/binary>>}}, call('GetVariableHistory', Q#{limit => -5})),
    {reply, #{entries := []}} = call('GetVariableHistory', Q#{limit => 16#7FFFFFFF}), %% never written
    Start = Q#{optimizer_id => <<"o">>},
    [?assertMatch({error, {invalid_argument, _}},
                  call('StartOptimization', Start#{optimizer_config => #{K => V}}))
     || K <- [<<"lease_ms">>, <<"timeout_ms">>, <<"priority">>],
        V <- [binary:copy(<<"9">>, 5000), <<"9223372036854775808">>, <<"-1">>], {K, V} =/= {<<"priority">>, <<"-1">>}],
    {reply, #{status := #{optimizing := false}}} = call('GetOptimizationStatus', Q).

optimization() ->
    S = <<"grpc_t5">>,
    {ok, _} = dspex_store:create_session(S),
    {reply, _} = call('RegisterVariable', register_req(S, <<"lr">>, <<"float">>, 0.5)),
    Start = #{session_id => S, variable_identifier => <<"lr">>, optimizer_id => <<"opt1">>,
              optimizer_config => #{<<"objective">> => <<"minimize">>, <<"metric">> => <<"loss">>}},
    {reply, #{success := true, optimization_id := <<"opt1:", _/binary>>}} = call('StartOptimization', Start),
    %% a second optimizer is refused (abort by default), writers see the lock
    ?assertMatch({error, {lock_held_by, _}}, call('StartOptimization', Start#{optimizer_id => <<"opt2">>})),
    ?assertMatch({error, {locked, _}}, call('SetVariable', set_req(S, <<"lr">>, any(<<"float">>, 0.4), 0))),
    %% the holder writes by naming itself in the metadata
    {reply, #{new_version := 1}} =
        call('SetVariable', (set_req(S, <<"lr">>, any(<<"float">>, 0.45), 0))#{metadata => #{<<"optimizer_id">> => <<"opt1">>}}),
    Prog = fun(I, V, L) ->
                   call('ReportOptimizationProgress',
                        #{session_id => S, variable_identifier => <<"lr">>, optimizer_id => <<"opt1">>, iteration => I,
                          value => any(<<"float">>, V), metrics_json => #{<<"loss">> => L}, binary_value => <<>>})
           end,
    {reply, #{success := true}} = Prog(1, 0.3, 0.9),
    {reply, #{success := true}} = Prog(2, 0.2, 0.1),
    {reply, #{success := true}} = Prog(3, 0.1, 0.5),
    ?assertMatch({error, {lock_held_by, _}},
                 call('ReportOptimizationProgress',
                      #{session_id => S, variable_identifier => <<"lr">>, optimizer_id => <<"other">>, iteration => 1,
                        value => any(<<"float">>, 0.1), metrics_json => undefined, binary_value => <<>>})),
    {reply, St} = call('GetOptimizationStatus', #{session_id => S, variable_identifier => <<"lr">>}),
    ?assertMatch(#{status := #{optimizing := true, optimizer_id := <<"opt1">>}, iterations := 3, best_iteration := 2,
                   best_value := #{value := 0.2}, best_metrics_json := #{<<"loss">> := 0.1}}, St),
    {reply, #{variable := #{optimization_status := #{optimizing := true}}}} =
        call('GetVariable', #{session_id => S, variable_identifier => <<"lr">>, bypass_cache => false}),
    Stop = #{session_id => S, variable_identifier => <<"lr">>, force => false, apply_best => true},
    ?assertMatch({error, {lock_held_by, _}}, call('StopOptimization', Stop#{optimizer_id => <<"opt2">>})),
    {reply, #{success := true, applied := true, final_value := #{value := 0.2}}} =
        call('StopOptimization', Stop#{optimizer_id => <<"opt1">>}),
    {reply, #{status := #{optimizing := false}}} =
        call('GetOptimizationStatus', #{session_id => S, variable_identifier => <<"lr">>}),
    ?assertEqual({error, not_optimizing}, call('StopOptimization', Stop#{optimizer_id => <<>>})),
    {reply, #{new_version := _}} = call('SetVariable', set_req(S, <<"lr">>, any(<<"float">>, 0.4), 0)).

access_control() ->
    S = <<"grpc_t6">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:create_session(<<"grpc_t6_other">>),
    {reply, _} = call('RegisterVariable', register_req(S, <<"secret">>, <<"integer">>, 1)),
    Get = #{session_id => S, variable_identifier => <<"secret">>, bypass_cache => false},
    As = #{<<"dspex-principal">> => <<"grpc_t6_other">>},
    ?assertEqual({error, access_denied}, call('GetVariable', Get, As)),
    {reply, #{success := true}} =
        call('SetVariablePermissions', #{session_id => S, variable_identifier => <<"secret">>,
                                         rules => [#{session_pattern => <<"grpc_t6_*">>, permissions => [<<"read">>],
                                                     conditions_json => undefined}]}),
    {reply, #{variable := #{access_control_json := [#{permissions := [read]}]}}} = call('GetVariable', Get, As),
    ?assertEqual({error, access_denied}, call('SetVariable', set_req(S, <<"secret">>, any(<<"integer">>, 2), 0), As)),
    Check = #{session_id => S, variable_identifier => <<"secret">>, principal => <<"grpc_t6_other">>,
              context_json => undefined},
    {reply, #{allowed := true}} = call('CheckVariableAccess', Check#{permission => <<"read">>}),
    {reply, #{allowed := false, reason := _}} = call('CheckVariableAccess', Check#{permission => <<"write">>}),
    ?assertMatch({error, {invalid_argument, _}}, call('CheckVariableAccess', Check#{permission => <<"admin">>})),
    ?assertMatch({error, {invalid_argument, _}},
                 call('SetVariablePermissions', #{session_id => S, variable_identifier => <<"secret">>,
                                                  rules => [#{session_pattern => <<"*">>, permissions => [<<"root">>],
                                                              conditions_json => undefined}]})).

dashboard_and_tools() ->
    {reply, #{dashboard_json := D, session_count := N}} = call('GetDashboard', #{session_id => <<>>}),
    ?assert(N >= 1),
    ?assert(is_map(D)),
    ?assertEqual({error, {tool_not_found, <<"nope">>}},
                 call('ExecuteTool', #{session_id => <<"x">>, tool_name => <<"nope">>, parameters => #{}})),
    ?assertEqual({error, {unknown_pool, <<"no_pool_named_this">>}},
                 call('RegisterTools', #{session_id => <<"x">>, worker_id => <<"no_pool_named_this">>, tools => []})),
    {reply, #{message := <<"pong: hi">>}} = call('Ping', #{message => <<"hi">>}).

%% What goes back to the port: run/5 writes {packet,4} terms, which `cat' echoes.
wire_messages_and_watch() ->
    S = <<"grpc_t7">>,
    {ok, _} = dspex_store:create_session(S),
    {reply, _} = call('RegisterVariable', register_req(S, <<"w">>, <<"integer">>, 0)),
    Cat = open_port({spawn_executable, os:find_executable("cat")}, [{packet, 4}, binary]),
    try
        ok = dspex_grpc_handler:run({Cat, 1}, 'GetVariable', #{session_id => S, variable_identifier => <<"w">>,
                                                                bypass_cache => false}, #{}, infinity),
        ?assertMatch({reply, 1, #{variable := #{name := <<"w">>}}}, port_term(Cat)),
        ok = dspex_grpc_handler:run({Cat, 2}, 'SetVariable', set_req(S, <<"w">>, any(<<"integer">>, 1), 9), #{}, infinity),
        ?assertEqual({error, 2, 10, <<"version mismatch: current version is 0">>,
                      #{<<"dspex-error">> => <<"version_mismatch">>, <<"dspex-current-version">> => <<"0">>}},
                     port_term(Cat)),
        ok = dspex_grpc_handler:run({Cat, 3}, 'GetVariable', #{session_id => S, variable_identifier => <<"q">>,
                                                                bypass_cache => false}, #{}, infinity),
        ?assertMatch({error, 3, 5, <<"variable not found: q">>, #{<<"dspex-error">> := <<"not_found">>}},
                     port_term(Cat)),
        ok = dspex_grpc_handler:run({Cat, 4}, 'ExecuteTool', #{session_id => S, tool_name => <<"t">>}, #{}, infinity),
        ?assertEqual({error, 4, 5, <<"tool not found: t">>, #{<<"dspex-error">> => <<"tool_not_found">>}}, port_term(Cat)),
        %% an empty name is a missing argument, not a name over the length limit
        ok = dspex_grpc_handler:run({Cat, 6}, 'RegisterVariable', register_req(S, <<>>, <<"integer">>, 1), #{}, infinity),
        ?assertEqual({error, 6, 3, <<"invalid argument: name must not be empty">>,
                      #{<<"dspex-error">> => <<"invalid_argument">>}}, port_term(Cat)),
        %% the rpc stop event, emitted only while someone listens
        Self = self(),
        ok = dspex_telemetry:attach(grpc_rpc_stop_test, [dspex, grpc, rpc, stop],
                                    fun(_, M, Md, _) -> Self ! {rpc_stop, M, Md} end, none),
        try
            ok = dspex_grpc_handler:run({Cat, 40}, 'GetVariable', #{session_id => S, variable_identifier => <<"q">>,
                                                                     bypass_cache => false}, #{}, infinity),
            ?assertMatch({error, 40, 5, _, _}, port_term(Cat)),
            receive {rpc_stop, #{duration := D}, Md} ->
                    ?assert(is_integer(D) andalso D >= 0),
                    ?assertEqual(#{rpc => 'GetVariable', status => not_found, session_id => S}, Md)
            after 5000 -> error(no_rpc_stop_event)
            end
        after
            ok = dspex_telemetry:detach(grpc_rpc_stop_test)
        end,
        ok = dspex_grpc_handler:run({Cat, 41}, 'ExecuteTool', #{session_id => S, tool_name => <<"t">>}, #{}, infinity),
        ?assertMatch({error, 41, 5, _, _}, port_term(Cat)),
        receive {rpc_stop, _, _} -> error(event_after_detach) after 0 -> ok end,
        %% a watch: initial value, every change in order, then the deletion ends it
        Watch = spawn_link(dspex_grpc_handler, run,
                           [{Cat, 5}, 'WatchVariables', #{session_id => S, variable_identifiers => [<<"w">>],
                                                          include_initial_values => true}, #{}, infinity]),
        ?assertMatch({stream, 5, #{update_type := <<"initial_value">>, variable := #{version := 0}}}, port_term(Cat)),
        [{ok, _} = dspex_store:set(S, <<"w">>, V) || V <- lists:seq(1, 50)],
        Versions = [begin
                        {stream, 5, #{update_type := <<"value_change">>, variable := #{version := Ver, value := #{value := Val}}}} =
                            port_term(Cat),
                        ?assertEqual(Ver, Val),
                        Ver
                    end || _ <- lists:seq(1, 50)],
        ?assertEqual(lists:seq(1, 50), Versions),
        {reply, _} = call('DeleteVariable', #{session_id => S, variable_identifier => <<"w">>}),
        ?assertMatch({stream, 5, #{update_type := <<"deleted">>}}, port_term(Cat)),
        ?assertEqual({close, 5}, port_term(Cat)),
        %% linked: an abnormal exit would have killed this test process
        Ref = monitor(process, Watch),
        receive {'DOWN', Ref, process, Watch, R} when R =:= normal; R =:= noproc -> ok
        after 5000 -> error(watch_did_not_end)
        end
    after
        port_close(Cat)
    end.

%% A stream whose port goes away (its owner died) ends and drops its watch.
watch_ends_with_its_port_test_() ->
    {setup, fun store_setup/0, fun store_cleanup/1,
     fun() ->
             S = <<"grpc_t8">>,
             {ok, _} = dspex_store:create_session(S),
             {ok, _} = dspex_store:register(S, <<"v">>, integer, 0),
             Cat = open_port({spawn_executable, os:find_executable("cat")}, [{packet, 4}, binary]),
             {Pid, Ref} = spawn_monitor(dspex_grpc_handler, run,
                                        [{Cat, 1}, 'WatchVariables', #{session_id => S, variable_identifiers => [<<"v">>],
                                                                       include_initial_values => true}, #{}, infinity]),
             ?assertMatch({stream, 1, _}, port_term(Cat)),
             {ok, #{watchers := 1}} = dspex_store:info(S, <<"v">>),
             port_close(Cat),
             receive {'DOWN', Ref, process, Pid, normal} -> ok after 5000 -> error(watch_still_running) end,
             {ok, #{watchers := 0}} = dspex_store:info(S, <<"v">>)
     end}.

port_term(Port) -> port_term(Port, 5000).

port_term(Port, Timeout) ->
    receive {Port, {data, B}} -> binary_to_term(B)
    after Timeout -> error(no_message_from_port)
    end.

%%% the port owner --------------------------------------------------------------------

port_owner_test_() ->
    {setup,
     fun() ->
             _ = application:stop(dspex_bridge),
             application:load(dspex_bridge),
             ok = application:set_env(dspex_bridge, grpc_listen, "127.0.0.1:0"),
             {ok, Apps} = application:ensure_all_started(dspex_bridge),
             Apps
     end,
     fun(Apps) ->
             [application:stop(A) || A <- lists:reverse(Apps)],
             application:unset_env(dspex_bridge, grpc_listen)
     end,
     [{timeout, 60, fun listens_and_restarts/0},
      {timeout, 60, fun restarts_when_the_port_closes_on_an_error/0}]}.

listens_and_restarts() ->
    {ok, P1} = dspex_grpc:await_listening(20000),
    ?assert(P1 > 0),
    {ok, Os1} = dspex_grpc:os_pid(),
    %% the port program is a real listener
    {ok, Sock} = gen_tcp:connect("127.0.0.1", P1, [binary, {active, false}]),
    ok = gen_tcp:close(Sock),
    Owner = whereis(dspex_grpc),
    dspex_telemetry:attach(grpc_test_exit, [dspex, grpc, port, exit],
                           fun(_, _, Meta, Pid) -> Pid ! {port_exit, Meta} end, self()),
    try
        os:cmd("kill -9 " ++ integer_to_list(Os1)),
        receive {port_exit, #{status := Status}} -> ?assertEqual(137, Status)
        after 10000 -> error(no_exit_event)
        end,
        %% restarted by the same owner, on a new OS process
        {ok, _} = dspex_grpc:await_listening(20000),
        {ok, Os2} = dspex_grpc:os_pid(),
        ?assertNotEqual(Os1, Os2),
        ?assertEqual(Owner, whereis(dspex_grpc))
    after
        dspex_telemetry:detach(grpc_test_exit)
    end.

%% A reply written to a port program that has just died closes the port with
%% `{'EXIT', Port, epipe}', and then no exit_status comes (the port is gone
%% before the exit status is read). The owner used to wait for it forever:
%% gRPC stayed down (a Python test killing the port under load saw no new
%% port program in 30 s). Here the owner gets that exit signal as the VM
%% sends it to a process trapping exits.
restarts_when_the_port_closes_on_an_error() ->
    {ok, _} = dspex_grpc:await_listening(20000),
    {ok, Os1} = dspex_grpc:os_pid(),
    #{port := Port} = sys:get_state(dspex_grpc),
    dspex_telemetry:attach(grpc_test_epipe, [dspex, grpc, port, exit],
                           fun(_, _, Meta, Pid) -> Pid ! {port_exit, Meta} end, self()),
    try
        dspex_grpc ! {'EXIT', Port, epipe},
        receive {port_exit, #{status := Status}} -> ?assertEqual({exit, epipe}, Status)
        after 10000 -> error(no_exit_event)
        end,
        {ok, _} = dspex_grpc:await_listening(20000),
        {ok, Os2} = dspex_grpc:os_pid(),
        ?assertNotEqual(Os1, Os2),
        %% the old program was told to end (its stdin closed): it is gone
        ok = wait_gone(Os1, 200)
    after
        dspex_telemetry:detach(grpc_test_epipe)
    end.

wait_gone(_Os, 0) -> error(old_port_program_still_running);
wait_gone(Os, N) ->
    case filelib:is_dir("/proc/" ++ integer_to_list(Os)) of
        false -> ok;
        true -> receive after 50 -> wait_gone(Os, N - 1) end
    end.

%%% a busy port ----------------------------------------------------------------------

%% The port program itself: a second listener on a port already served (by
%% another port program, as a second node would run) reports eaddrinuse and
%% exits 2 instead of sharing the port through SO_REUSEPORT.
second_port_program_on_a_served_port_is_refused_test_() ->
    {timeout, 60, fun() ->
        First = port_program("127.0.0.1:0"),
        {listening, P} = port_term(First, 30000),
        Addr = "127.0.0.1:" ++ integer_to_list(P),
        Second = port_program(Addr),
        ?assertEqual({listen_error, eaddrinuse}, port_term(Second, 30000)),
        receive {Second, {exit_status, S}} -> ?assertEqual(2, S) after 20000 -> error(no_exit) end,
        %% the first still serves; a third on a busy "localhost" is refused too
        {ok, Sock} = gen_tcp:connect("127.0.0.1", P, [binary, {active, false}]),
        ok = gen_tcp:close(Sock),
        Third = port_program("localhost:" ++ integer_to_list(P)),
        ?assertEqual({listen_error, eaddrinuse}, port_term(Third, 30000)),
        Fourth = port_program("no-such-host.invalid:" ++ integer_to_list(P)),
        ?assertEqual({listen_error, bad_address}, port_term(Fourth, 30000)),
        %% an address of no interface here (TEST-NET-1, RFC 5737)
        Fifth = port_program("192.0.2.1:" ++ integer_to_list(P)),
        ?assertEqual({listen_error, eaddrnotavail}, port_term(Fifth, 30000)),
        port_close(First)
    end}.

port_program(Addr) ->
    Exe = filename:join(code:priv_dir(dspex_bridge), "dspex_grpc_port"),
    open_port({spawn_executable, Exe}, [{packet, 4}, binary, exit_status, use_stdio,
                                        {args, ["--listen", Addr, "--threads", "1"]}]).

%% The owner, with grpc_required: a busy port at start is an error returned
%% by start_link, so the application does not start; one log line each.
busy_port_at_start_required_test_() ->
    busy_port_setup([{grpc_required, true}], fun(Addr) ->
        Logs = capture_logs(fun() ->
            Trap = process_flag(trap_exit, true),
            ?assertEqual({error, {grpc_listen, eaddrinuse, Addr}}, dspex_grpc:start_link()),
            receive {'EXIT', _, {shutdown, {grpc_listen, eaddrinuse, _}}} -> ok after 5000 -> ok end,
            process_flag(trap_exit, Trap),
            ?assertEqual(undefined, whereis(dspex_grpc)),
            %% and so the application does not start, naming the cause
            {error, Why} = application:ensure_all_started(dspex_bridge),
            ?assert(contains(Why, {grpc_listen, eaddrinuse, Addr}))
        end),
        [Line | _] = Logs,
        ?assertMatch({match, _}, re:run(Line, "cannot serve gRPC on " ++ Addr ++ ": address in use")),
        ?assertEqual(2, length(Logs)) %% one per start attempt above
    end).

%% By default the node starts without gRPC: one line, bounded retries, one
%% line when giving up, then status/0 says failed and why.
busy_port_at_start_default_test_() ->
    Env = [{grpc_restart_limit, 2}, {grpc_restart_backoff_ms, {10, 20}}],
    busy_port_setup(Env, fun(Addr) ->
        Self = self(),
        dspex_telemetry:attach(grpc_test_give_up0, [dspex, grpc, port, give_up],
                               fun(_, M, Meta, Pid) -> Pid ! {give_up, M, Meta} end, Self),
        try
            Logs = capture_logs(fun() ->
                {ok, Apps} = application:ensure_all_started(dspex_bridge),
                try
                    receive {give_up, #{restarts := 2}, #{reason := {grpc_listen, eaddrinuse, Addr}}} -> ok
                    after 30000 -> error(no_give_up)
                    end,
                    ?assertMatch(#{state := failed, restarts := 2, port := undefined,
                                   error := {grpc_listen, eaddrinuse, Addr}}, dspex_grpc:status()),
                    %% the rest of the node works
                    {ok, _} = dspex_store:create_session(<<"grpc_busy_default">>)
                after
                    [application:stop(A) || A <- lists:reverse(Apps)]
                end
            end),
            ?assertMatch([_, _], Logs),
            [First, Last] = Logs,
            ?assertMatch({match, _}, re:run(First, "cannot listen on " ++ Addr ++ ": address in use .*"
                                                   "the node runs without gRPC and retries with back-off, at most 2")),
            ?assertMatch({match, _}, re:run(Last, "gave up restarting the gRPC port program after 2 attempts"))
        after
            dspex_telemetry:detach(grpc_test_give_up0)
        end
    end).

%% Another listener holds a port; grpc_listen names it.
busy_port_setup(Env, Test) ->
    {setup,
     fun() ->
             _ = application:stop(dspex_bridge),
             application:load(dspex_bridge),
             {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}, {reuseaddr, true}]),
             {ok, P} = inet:port(L),
             Addr = "127.0.0.1:" ++ integer_to_list(P),
             [ok = application:set_env(dspex_bridge, K, V) || {K, V} <- [{grpc_listen, Addr} | Env]],
             {L, Addr}
     end,
     fun({L, _}) ->
             gen_tcp:close(L),
             [application:unset_env(dspex_bridge, K) || {K, _} <- [{grpc_listen, x} | Env]]
     end,
     fun({_, Addr}) -> {timeout, 60, fun() -> Test(Addr) end} end}.

contains(X, X) -> true;
contains(T, X) when is_tuple(T) -> contains(tuple_to_list(T), X);
contains([H | T], X) -> contains(H, X) orelse contains(T, X);
contains(_, _) -> false.

%% The port program dies and every restart meets a busy port: bounded
%% attempts with back-off, one log line for the exit and one when giving up
%% (no line per attempt), then status/0 says failed and why; restart/0
%% serves again once the port is free.
restart_gives_up_on_a_busy_port_test_() ->
    {setup,
     fun() ->
             _ = application:stop(dspex_bridge),
             application:load(dspex_bridge),
             Env = [{grpc_listen, "127.0.0.1:0"}, {grpc_restart_limit, 3}, {grpc_restart_backoff_ms, {10, 40}}],
             [ok = application:set_env(dspex_bridge, K, V) || {K, V} <- Env],
             {ok, Apps} = application:ensure_all_started(dspex_bridge),
             {Apps, Env}
     end,
     fun({Apps, Env}) ->
             [application:stop(A) || A <- lists:reverse(Apps)],
             [application:unset_env(dspex_bridge, K) || {K, _} <- Env]
     end,
     {timeout, 60, fun restart_gives_up_on_a_busy_port/0}}.

restart_gives_up_on_a_busy_port() ->
    {ok, _} = dspex_grpc:await_listening(20000),
    ?assertMatch(#{state := listening, restarts := 0, error := undefined}, dspex_grpc:status()),
    %% the next starts go to an address another listener holds
    {ok, Blocker} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}, {reuseaddr, true}]),
    {ok, Q} = inet:port(Blocker),
    Addr = "127.0.0.1:" ++ integer_to_list(Q),
    ok = application:set_env(dspex_bridge, grpc_listen, Addr),
    {ok, Os} = dspex_grpc:os_pid(),
    Self = self(),
    dspex_telemetry:attach(grpc_test_give_up, [dspex, grpc, port, give_up],
                           fun(_, M, Meta, Pid) -> Pid ! {give_up, M, Meta} end, Self),
    try
        Logs = capture_logs(fun() ->
            os:cmd("kill -9 " ++ integer_to_list(Os)),
            receive {give_up, #{restarts := 3}, #{reason := {grpc_listen, eaddrinuse, Addr}}} -> ok
            after 30000 -> error(no_give_up)
            end
        end),
        ?assertEqual(2, length(Logs)),
        [Down, GaveUp] = Logs,
        ?assertMatch({match, _}, re:run(Down, "port program down \\(exited with status 137")),
        ?assertMatch({match, _}, re:run(GaveUp, "gave up restarting the gRPC port program after 3 attempts: "
                                                "cannot listen on " ++ Addr ++ ": address in use")),
        ?assertMatch(#{state := failed, restarts := 3, port := undefined,
                       error := {grpc_listen, eaddrinuse, Addr}}, dspex_grpc:status()),
        ?assertEqual({error, not_listening}, dspex_grpc:listening_port()),
        %% nothing more happens by itself; once the port is free, restart/0 serves
        ok = gen_tcp:close(Blocker),
        ok = dspex_grpc:restart(),
        {ok, Q} = dspex_grpc:await_listening(20000),
        ?assertEqual({error, running}, dspex_grpc:restart()),
        ?assertMatch(#{state := listening, restarts := 0, port := Q}, dspex_grpc:status())
    after
        dspex_telemetry:detach(grpc_test_give_up),
        catch gen_tcp:close(Blocker),
        application:set_env(dspex_bridge, grpc_listen, "127.0.0.1:0")
    end.

%% Runs F, returning the text of the log events (notice and above) that
%% dspex_grpc logged meanwhile, oldest first.
capture_logs(F) ->
    Id = list_to_atom("grpc_test_log_" ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = logger:add_handler(Id, ?MODULE, #{level => notice, config => #{pid => self()},
                                           filter_default => log,
                                           filters => [{mod, {fun only_grpc/2, dspex_grpc}}]}),
    try F()
    after logger:remove_handler(Id)
    end,
    collect_logs([]).

only_grpc(#{meta := #{mfa := {M, _, _}}} = E, M) -> E;
only_grpc(_, _) -> stop.

collect_logs(Acc) ->
    receive {grpc_test_log, Text} -> collect_logs([Text | Acc])
    after 0 -> lists:reverse(Acc)
    end.

%% @private logger handler callback
-spec log(logger:log_event(), logger:handler_config()) -> ok.
log(#{msg := Msg}, #{config := #{pid := Pid}}) ->
    Text = case Msg of
               {string, S} -> unicode:characters_to_list(S);
               {report, R} -> io_lib:format("~0p", [R]);
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    Pid ! {grpc_test_log, lists:flatten(Text)},
    ok.

%% Every RPC of the service, read from the .proto, has a principal rule, and
%% called by a principal no rule names it neither shows nor changes anything
%% of another session: `owner' RPCs are PERMISSION_DENIED before they run,
%% `rules' ones are refused by the rules (or see only what the principal may).
%% A principal that may only read a variable can neither feed the owner's
%% optimization a candidate (empty optimizer_id) nor stop it (force) and apply
%% it: steering needs `optimize', applying needs `write', and forcing someone
%% else's optimization is the session's (or its starter's) alone.
optimization_rpcs_need_the_principals_permissions() ->
    S = <<"grpc_opt_victim">>, P = <<"grpc_opt_reader">>, Q = <<"grpc_opt_tuner">>, W = <<"grpc_opt_writer">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, v, float, 1.0),
    ok = dspex_acl:set_permissions(S, <<"v">>, [#{session_pattern => P, permissions => [read]},
                                                #{session_pattern => Q, permissions => [read, optimize]},
                                                #{session_pattern => W, permissions => [read, write, optimize]}]),
    V = #{session_id => S, variable_identifier => <<"v">>},
    {reply, #{success := true}} =
        call('StartOptimization', V#{optimizer_id => <<"owner_opt">>, optimizer_config => #{}}),
    Report = V#{optimizer_id => <<>>, iteration => 1, value => any(<<"float">>, 666.0),
                metrics_json => #{<<"score">> => 1}, binary_value => <<>>},
    Stop = V#{force => true, optimizer_id => <<>>, apply_best => true},
    AsP = #{<<"dspex-principal">> => P}, AsQ = #{<<"dspex-principal">> => Q},
    ?assertEqual({error, access_denied}, call('ReportOptimizationProgress', Report, AsP)),
    ?assertEqual({error, access_denied}, call('StopOptimization', Stop, AsP)),
    ?assertEqual({error, access_denied}, call('StopOptimization', Stop#{apply_best => false}, AsP)),
    %% `optimize' without `write': no applying, and no forcing the owner's optimizer
    ?assertEqual({error, access_denied}, call('StopOptimization', Stop, AsQ)),
    ?assertEqual({error, access_denied}, call('StopOptimization', Stop#{apply_best => false}, AsQ)),
    ?assertEqual({error, access_denied}, call('ReportOptimizationProgress', Report, AsQ)),
    %% naming the optimizer is steering it, which `optimize' allows
    {reply, #{success := true}} =
        call('ReportOptimizationProgress', Report#{optimizer_id => <<"owner_opt">>, value => any(<<"float">>, 0.5)}, AsQ),
    {reply, #{status := #{optimizing := true, optimizer_id := <<"owner_opt">>}, iterations := 1}} =
        call('GetOptimizationStatus', V),
    {ok, 1.0} = dspex_store:get_value(S, <<"v">>),
    %% naming the owner's optimizer in a write's metadata is no pass through its
    %% lock for another principal, even one that may write
    AsW = #{<<"dspex-principal">> => W},
    Named = (set_req(S, <<"v">>, any(<<"float">>, 7.0), 0))#{metadata => #{<<"optimizer_id">> => <<"owner_opt">>}},
    ?assertMatch({error, {locked, _}}, call('SetVariable', Named, AsW)),
    {ok, 1.0} = dspex_store:get_value(S, <<"v">>),
    %% the session itself may force it and apply the best
    {reply, #{success := true, applied := true, final_value := #{value := 0.5}}} = call('StopOptimization', Stop),
    %% an optimization the principal started is its own to stop without naming it
    {reply, #{success := true}} =
        call('StartOptimization', V#{optimizer_id => <<"q_opt">>, optimizer_config => #{}}, AsQ),
    {reply, #{success := true, applied := false}} = call('StopOptimization', Stop#{apply_best => false}, AsQ),
    %% an optimization's own principal writes through its lock by naming it
    {reply, #{success := true}} =
        call('StartOptimization', V#{optimizer_id => <<"w_opt">>, optimizer_config => #{}}, AsW),
    ?assertMatch({error, {locked, _}}, call('SetVariable', Named#{metadata => #{}}, AsW)),
    {reply, #{success := true}} = call('SetVariable', Named#{metadata => #{<<"optimizer_id">> => <<"w_opt">>}}, AsW),
    {ok, 7.0} = dspex_store:get_value(S, <<"v">>).

every_rpc_honours_the_principal() ->
    Proto = filename:join([code:priv_dir(dspex_bridge), "proto", "snakepit_bridge.proto"]),
    {ok, Text} = file:read_file(Proto),
    {match, Ms} = re:run(Text, "^\\s*rpc\\s+(\\w+)\\s*\\(", [multiline, global, {capture, all_but_first, binary}]),
    Rpcs = lists:usort([binary_to_atom(M) || [M] <- Ms]),
    S = <<"grpc_victim">>, P = <<"grpc_mallory">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, secret, string, <<"hunter2">>),
    {ok, _} = dspex_store:register(S, other, float, 1.0, #{constraints => #{min => 0.0, max => 2.0}}),
    {ok, _} = dspex_store:register(S, knob, float, 1.0, #{constraints => #{min => 0.0, max => 2.0}}),
    ok = dspex_graph:add_dependency(S, other, secret),
    %% a study of the victim's own, which the principal must not reach
    {reply, #{study_id := Study}} =
        call('StartStudy', #{session_id => S, variables => [<<"other">>], algorithm => <<"random">>,
                             direction => <<"minimize">>, budget => 5, seed => 1, idle_timeout_ms => 60000,
                             lock_timeout_ms => 1000}),
    Before = dspex_store:export_session(S),
    V = #{session_id => S, variable_identifier => <<"secret">>},
    Denied = fun(R) -> R =:= {error, access_denied} end,
    NotFound = fun(R) -> R =:= {error, run_not_found} end,
    Table = #{
      'Ping' => {none, #{message => <<"x">>}, fun(R) -> element(1, R) =:= reply end},
      'SelectModel' => {none, skip, undefined},
      'RecordInference' => {none, skip, undefined},
      'ListSessions' => {owner, #{pattern => <<>>, limit => 0}, Denied},
      'InitializeSession' => {owner, #{session_id => S, metadata => #{}}, Denied},
      'CleanupSession' => {owner, #{session_id => S}, Denied},
      'GetSession' => {owner, #{session_id => S}, Denied},
      'Heartbeat' => {owner, #{session_id => S}, Denied},
      'RegisterVariable' => {owner, register_req(S, <<"planted">>, <<"float">>, 1.0), Denied},
      'AddDependency' => {owner, #{session_id => S, from_variable => <<"secret">>, to_variable => <<"other">>,
                                   dependency_type => <<"data">>}, Denied},
      'RemoveDependency' => {owner, #{session_id => S, from_variable => <<"other">>, to_variable => <<"secret">>}, Denied},
      'GetDependencies' => {owner, V, Denied},
      'GetDependents' => {owner, V#{transitive => true}, Denied},
      'GetUpdateOrder' => {owner, V, Denied},
      'CheckVariableAccess' => {owner, V#{principal => P, permission => <<"read">>, context_json => undefined}, Denied},
      'RegisterTools' => {owner, #{session_id => S, worker_id => <<"nopool">>, tools => []}, Denied},
      'GetDashboard' => {owner, #{session_id => S}, Denied},
      'GetEvents' => {owner, #{session_id => S, since_sequence => 0, until_sequence => 0, since_time => undefined,
                               until_time => undefined, types => [], limit => 0, descending => false,
                               include_archive => false}, Denied},
      'WatchEvents' => {owner, #{session_id => S, types => [], from_position => 0, from_sequence => 0}, Denied},
      'GetStateAt' => {owner, #{session_id => S, sequence => 100, time => undefined}, Denied},
      'GetVariable' => {rules, V, Denied},
      'SetVariable' => {rules, set_req(S, <<"secret">>, any(<<"string">>, <<"x">>), 0), Denied},
      'GetVariables' => {rules, #{session_id => S, variable_identifiers => [<<"secret">>]},
                         fun({reply, #{variables := Vs, missing_variables := [<<"secret">>]}}) -> Vs =:= #{};
                            (_) -> false end},
      'SetVariables' => {rules, #{session_id => S, updates => #{<<"secret">> => any(<<"string">>, <<"x">>)},
                                  binary_updates => #{}, metadata => #{}, atomic => true},
                         fun({reply, #{success := false}}) -> true; (_) -> false end},
      'ListVariables' => {rules, #{session_id => S, pattern => <<>>}, fun(R) -> R =:= {reply, #{variables => []}} end},
      'DeleteVariable' => {rules, V, Denied},
      'WatchVariables' => {rules, #{session_id => S, variable_identifiers => [<<"secret">>],
                                    include_initial_values => true}, Denied},
      'GetVariableHistory' => {rules, V#{limit => 0}, Denied},
      'RollbackVariable' => {rules, V#{target_version => 0}, Denied},
      'StartOptimization' => {rules, V#{optimizer_id => <<"o">>, optimizer_config => #{}}, Denied},
      'StopOptimization' => {rules, V#{force => true, optimizer_id => <<"o">>, apply_best => true}, Denied},
      'GetOptimizationStatus' => {rules, V, Denied},
      'ReportOptimizationProgress' => {rules, V#{optimizer_id => <<"o">>, iteration => 1,
                                                 value => any(<<"string">>, <<"x">>), metrics_json => undefined,
                                                 binary_value => <<>>}, Denied},
      'SetVariablePermissions' => {rules, V#{rules => [#{session_pattern => <<"*">>, permissions => [<<"read">>],
                                                         conditions_json => undefined}]}, Denied},
      'StartStudy' => {rules, #{session_id => S, variables => [<<"knob">>], algorithm => <<"random">>,
                                direction => <<"minimize">>, budget => 5, seed => 1, idle_timeout_ms => 0,
                                lock_timeout_ms => 100}, Denied},
      'AskTrial' => {rules, #{session_id => S, study_id => Study}, NotFound},
      'TellTrial' => {rules, #{session_id => S, study_id => Study, trial_id => 0, failed => false, score => 1.0}, NotFound},
      'GetStudy' => {rules, #{session_id => S, study_id => Study, include_trials => true}, NotFound},
      'StopStudy' => {rules, #{session_id => S, study_id => Study, apply_best => true}, NotFound},
      %% the tools' own allow lists decide (dspex_tools); no tool here allows anyone
      'GetExposedElixirTools' => {rules, #{session_id => S}, fun({reply, #{tools := Ts}}) -> is_list(Ts); (_) -> false end},
      'ExecuteElixirTool' => {rules, #{session_id => S, tool_name => <<"nope">>, parameters => #{}},
                              fun(R) -> element(1, R) =:= error end},
      'ExecuteTool' => {rules, #{session_id => S, tool_name => <<"nope">>, parameters => #{}},
                        fun(R) -> element(1, R) =:= error end},
      'ExecuteStreamingTool' => {rules, #{session_id => S, tool_name => <<"nope">>, parameters => #{}}, skip}},
    %% a new RPC in the .proto must be added here (and given a rule) before this passes
    ?assertEqual(Rpcs, lists:sort(maps:keys(Table))),
    As = #{<<"dspex-principal">> => P},
    [begin
         ?assertEqual({M, Rule}, {M, dspex_grpc_handler:principal_rule(M)}),
         case {Req, Check} of
             {skip, _} -> ok;
             {_, skip} -> ok;
             _ ->
                 R = dspex_grpc_handler:handle(M, Req, #{ctx => {undefined, undefined}, meta => As,
                                                         deadline => infinity, opts => acl(As)},
                                               {undefined, undefined}),
                 ?assertEqual({M, true, R}, {M, Check(R), R})
         end
     end || {M, {Rule, Req, Check}} <- maps:to_list(Table)],
    %% nothing of the victim changed: same variables, values, versions and graph
    ?assertEqual(Before, dspex_store:export_session(S)),
    {reply, _} = dspex_opt_grpc:stop_study(#{session_id => S, study_id => Study, apply_best => false}, #{}),
    %% the session itself is not refused by the gate
    {reply, #{variables := [<<"other">>]}} = call('GetDependencies', V, #{<<"dspex-principal">> => S}).
