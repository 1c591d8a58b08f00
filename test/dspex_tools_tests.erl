%% dspex_tools: the registry of functions the BEAM offers to Python, and the
%% gRPC handlers of GetExposedElixirTools / ExecuteElixirTool on top of it.
-module(dspex_tools_tests).
-include_lib("eunit/include/eunit.hrl").

tools_test_() ->
    {setup, fun() -> {ok, Apps} = application:ensure_all_started(dspex_bridge), Apps end,
     fun(Apps) -> [application:stop(A) || A <- lists:reverse(Apps)] end,
     {foreach, fun() -> [dspex_tools:unexpose(maps:get(name, T)) || T <- dspex_tools:list()] end,
      [fun expose_list_and_call/0, fun errors_of_tools/0, fun validation_refuses_and_changes_nothing/0,
       fun access_by_principal_glob/0, fun deadline_kills_the_tool/0, fun grpc_handlers/0]}}.

expose_list_and_call() ->
    ok = dspex_tools:expose(add, fun(#{<<"a">> := A, <<"b">> := B}) -> A + B end,
                            #{description => <<"adds">>,
                              parameters => [#{name => <<"a">>, type => <<"number">>, required => true},
                                             #{name => <<"b">>, type => <<"number">>, required => true}]}),
    ok = dspex_tools:expose(<<"ctx">>, fun(_, #{session := S, principal := P}) -> {ok, #{s => S, p => P}} end),
    ?assertMatch([#{name := <<"add">>, description := <<"adds">>,
                    parameters := [#{name := <<"a">>, required := true, type := <<"number">>, description := <<>>},
                                   #{name := <<"b">>}]},
                  #{name := <<"ctx">>, description := <<>>, parameters := []}], dspex_tools:list()),
    ?assertEqual({ok, 5}, dspex_tools:call(<<"add">>, #{<<"a">> => 2, <<"b">> => 3}, #{})),
    ?assertEqual({ok, #{<<"s">> => <<"sess">>, <<"p">> => <<"sess">>}},
                 dspex_tools:call(ctx, #{}, #{session => <<"sess">>})),
    %% exposing again replaces
    ok = dspex_tools:expose(add, fun(_) -> replaced end),
    ?assertEqual({ok, <<"replaced">>}, dspex_tools:call(add, #{}, #{})),
    ok = dspex_tools:unexpose(add),
    ?assertEqual({error, {tool_not_found, <<"add">>}}, dspex_tools:call(add, #{}, #{})),
    ?assertEqual({error, {tool_not_found, <<"add">>}}, dspex_tools:unexpose(add)).

errors_of_tools() ->
    ok = dspex_tools:expose(fails, fun(_) -> {error, <<"no luck">>} end),
    ok = dspex_tools:expose(crashes, fun(_) -> error(boom) end),
    ok = dspex_tools:expose(odd, fun(_) -> {ok, self()} end),
    ?assertEqual({error, {tool_error, <<"no luck">>}}, dspex_tools:call(fails, #{}, #{})),
    ?assertMatch({error, {tool_crashed, boom}}, dspex_tools:call(crashes, #{}, #{})),
    ?assertMatch({error, {bad_result, P}} when is_pid(P), dspex_tools:call(odd, #{}, #{})),
    %% the caller survives and gets no stray message
    receive Stray -> error({stray, Stray}) after 0 -> ok end.

validation_refuses_and_changes_nothing() ->
    F = fun(_) -> ok end,
    ?assertEqual({error, {invalid_argument, name}}, dspex_tools:expose(<<>>, F, #{})),
    ?assertEqual({error, {invalid_argument, function}}, dspex_tools:expose(t, fun() -> ok end, #{})),
    ?assertEqual({error, {invalid_argument, parameters}}, dspex_tools:expose(t, F, #{parameters => [#{}]})),
    ?assertEqual({error, {invalid_argument, allow}}, dspex_tools:expose(t, F, #{allow => [<<>>]})),
    ?assertEqual({error, {invalid_argument, timeout}}, dspex_tools:expose(t, F, #{timeout => 0})),
    ?assertEqual({error, {invalid_argument, metadata}}, dspex_tools:expose(t, F, #{metadata => #{a => 1}})),
    ?assertEqual({error, {invalid_argument, colour}}, dspex_tools:expose(t, F, #{colour => red})),
    ?assertEqual([], dspex_tools:list()).

access_by_principal_glob() ->
    ok = dspex_tools:expose(admin, fun(_) -> yes end, #{allow => [<<"admin_*">>, <<"root">>]}),
    ok = dspex_tools:expose(open, fun(_) -> yes end),
    ?assertEqual({ok, <<"yes">>}, dspex_tools:call(admin, #{}, #{principal => <<"admin_7">>})),
    ?assertEqual({ok, <<"yes">>}, dspex_tools:call(admin, #{}, #{session => <<"root">>})),
    ?assertEqual({error, access_denied}, dspex_tools:call(admin, #{}, #{principal => <<"rootx">>})),
    ?assertEqual({error, access_denied}, dspex_tools:call(admin, #{}, #{session => <<"admin">>})),
    ?assertEqual([<<"open">>], [N || #{name := N} <- dspex_tools:list(<<"intruder">>)]),
    ?assertEqual([<<"admin">>, <<"open">>], [N || #{name := N} <- dspex_tools:list(<<"admin_x">>)]).

%% A tool still running at its deadline is killed; the call answers timeout.
deadline_kills_the_tool() ->
    Self = self(),
    ok = dspex_tools:expose(hang, fun(_) -> Self ! {running, self()}, receive after infinity -> ok end end,
                            #{timeout => 50}),
    ?assertEqual({error, timeout}, dspex_tools:call(hang, #{}, #{})),
    Pid = receive {running, P} -> P end,
    ?assertNot(is_process_alive(Pid)),
    %% the caller's deadline wins over the tool's own
    ?assertEqual({error, timeout}, dspex_tools:call(hang, #{}, #{timeout => 10})).

grpc_handlers() ->
    ok = dspex_tools:expose(add, fun(#{<<"a">> := A, <<"b">> := B}) -> A + B end,
                            #{description => <<"adds">>, parameters => [#{name => <<"a">>, required => true}]}),
    ok = dspex_tools:expose(fails, fun(_) -> {error, not_today} end),
    ok = dspex_tools:expose(secret, fun(_) -> 1 end, #{allow => [<<"boss">>]}),
    Call = fun(M, Req, Meta) ->
                   dspex_grpc_handler:handle(M, Req, #{meta => Meta, deadline => infinity,
                                                       opts => case Meta of
                                                                   #{<<"dspex-principal">> := P} -> #{as => P};
                                                                   _ -> #{}
                                                               end}, undefined)
           end,
    {reply, #{tools := Tools}} = Call('GetExposedElixirTools', #{session_id => <<"s">>}, #{}),
    ?assertEqual([<<"add">>, <<"fails">>], [N || #{name := N} <- Tools]),
    [#{description := <<"adds">>, parameters := [#{name := <<"a">>, required := true}]} | _] = Tools,
    Arg = fun(V) -> #{type_url => <<"type.googleapis.com/google.protobuf.StringValue">>, value => V} end,
    {reply, #{success := true, result := #{value := 5}}} =
        Call('ExecuteElixirTool', #{session_id => <<"s">>, tool_name => <<"add">>,
                                    parameters => #{<<"a">> => Arg(2), <<"b">> => Arg(3)}, metadata => #{}}, #{}),
    {reply, #{success := false, error_message := <<"not_today">>, metadata := #{<<"error_kind">> := <<"tool_error">>}}} =
        Call('ExecuteElixirTool', #{session_id => <<"s">>, tool_name => <<"fails">>, parameters => #{}}, #{}),
    ?assertEqual({error, {tool_not_found, <<"nope">>}},
                 Call('ExecuteElixirTool', #{session_id => <<"s">>, tool_name => <<"nope">>, parameters => #{}}, #{})),
    ?assertEqual({error, access_denied},
                 Call('ExecuteElixirTool', #{session_id => <<"s">>, tool_name => <<"secret">>, parameters => #{}}, #{})),
    {reply, #{success := true, result := #{value := 1}}} =
        Call('ExecuteElixirTool', #{session_id => <<"s">>, tool_name => <<"secret">>, parameters => #{}},
             #{<<"dspex-principal">> => <<"boss">>}),
    ?assertEqual({not_found, <<"tool not found: nope">>}, dspex_grpc_status:of_error({tool_not_found, <<"nope">>})).
