%% dspex_tools: the registry of functions the BEAM offers to Python, and the
%% gRPC handlers of GetExposedElixirTools / ExecuteElixirTool on top of it.
-module(dspex_tools_tests).
-include_lib("eunit/include/eunit.hrl").

tools_test_() ->
    {setup, fun() -> {ok, Apps} = application:ensure_all_started(dspex_bridge), Apps end,
     fun(Apps) -> [application:stop(A) || A <- lists:reverse(Apps)] end,
     {foreach, fun() -> [dspex_tools:unexpose(maps:get(name, T)) || T <- dspex_tools:list()] end,
      [fun expose_list_and_call/0, fun errors_of_tools/0, fun validation_refuses_and_changes_nothing/0,
       fun access_by_principal_glob/0, fun deadline_kills_the_tool/0, fun grpc_handlers/0,
       fun bad_timeout_is_refused/0, fun dead_caller_takes_its_tool_along/0]}}.

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
    %% big integers are exact JSON up to 4300 digits; longer ones no client can read
    ok = dspex_tools:expose(pow10, fun(#{<<"n">> := N}) -> binary_to_integer(<<"1", (binary:copy(<<"0">>, N))/binary>>) end),
    Big = binary_to_integer(<<"1", (binary:copy(<<"0">>, 4299))/binary>>),
    ?assertEqual({ok, Big}, dspex_tools:call(pow10, #{<<"n">> => 4299}, #{})),
    ok = dspex_tools:expose(neg_big, fun(_) -> #{n => [-(1 bsl 64)]} end),
    ?assertEqual({ok, #{<<"n">> => [-(1 bsl 64)]}}, dspex_tools:call(neg_big, #{}, #{})),
    ?assertMatch({error, {bad_result, _}}, dspex_tools:call(pow10, #{<<"n">> => 4300}, #{})),
    %% the caller survives and gets no stray message
    receive Stray -> error({stray, Stray}) after 0 -> ok end.

validation_refuses_and_changes_nothing() ->
    F = fun(_) -> ok end,
    ?assertEqual({error, {invalid_argument, name}}, dspex_tools:expose(<<>>, F, #{})),
    ?assertEqual({error, {invalid_argument, function}}, dspex_tools:expose(t, fun() -> ok end, #{})),
    ?assertEqual({error, {invalid_argument, parameters}}, dspex_tools:expose(t, F, #{parameters => [#{}]})),
    ?assertEqual({error, {invalid_argument, allow}}, dspex_tools:expose(t, F, #{allow => [<<>>]})),
    %% the pattern bound of the C matcher: a client-registered glob stays cheap
    ?assertEqual({error, {invalid_argument, allow}}, dspex_tools:expose(t, F, #{allow => [binary:copy(<<"*a">>, 513)]})),
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

bad_timeout_is_refused() ->
    Self = self(),
    ok = dspex_tools:expose(t, fun(_) -> Self ! ran, ok end),
    [?assertEqual({error, {invalid_argument, timeout}}, dspex_tools:call(t, #{}, #{timeout => T}))
     || T <- [-5, 1.5, forever]],
    %% refused before anything ran: the one run is this call's
    ?assertEqual({ok, <<"ok">>}, dspex_tools:call(t, #{}, #{timeout => 1000})),
    receive ran -> ok end,
    receive ran -> error(tool_ran_for_a_bad_timeout) after 0 -> ok end.

%% A caller killed while its tool runs (a cancelled RPC's handler) takes the
%% tool process along; nobody else would ever stop it.
dead_caller_takes_its_tool_along() ->
    Self = self(),
    ok = dspex_tools:expose(hang, fun(_) -> Self ! {running, self()}, receive after infinity -> ok end end),
    Caller = spawn(fun() -> dspex_tools:call(hang, #{}, #{timeout => 600000}) end),
    Tool = receive {running, P} -> P end,
    MRef = erlang:monitor(process, Tool),
    exit(Caller, kill),
    receive {'DOWN', MRef, process, Tool, Reason} -> ?assertEqual(killed, Reason)
    after 5000 -> exit(Tool, kill), error(tool_outlived_its_caller)
    end.

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

%%% Python tools: functions of a worker pool's module, called through the pool

python_tools_test_() ->
    {setup,
     fun() ->
             {ok, Apps} = application:ensure_all_started(dspex_bridge),
             Mod = filename:join([code:lib_dir(dspex_bridge), "test", "python_workers", "tools_mod.py"]),
             {ok, _} = dspex_workers:start_pool(py_tools, #{module => Mod, size => 1,
                                                              breaker => #{threshold => 3}}),
             Apps
     end,
     fun(Apps) ->
             _ = dspex_workers:stop_pool(py_tools),
             [application:stop(A) || A <- lists:reverse(Apps)]
     end,
     [fun python_tool_register_call_stream/0, fun python_tool_errors_and_access/0,
      fun python_tools_over_grpc_handlers/0, fun only_running_pools_are_addressed/0,
      fun failed_duplicate_start_keeps_the_breaker/0, fun restart_backoff_stays_within_the_cap/0,
      fun python_tool_bad_timeout/0, {timeout, 120, fun frames_over_the_limit_spare_the_worker/0}]}.

python_tool_register_call_stream() ->
    S = <<"py_tools_s1">>,
    {ok, #{<<"add">> := <<"py_tools_s1/add">>, <<"count">> := _}} =
        dspex_tools:register_python(S, py_tools, [#{name => add, description => <<"adds">>},
                                                  #{name => <<"count">>, supports_streaming => true}]),
    ?assertMatch([#{name := <<"add">>, description := <<"adds">>, pool := py_tools, supports_streaming := false},
                  #{name := <<"count">>, supports_streaming := true}], dspex_tools:list_python(S, S)),
    ?assertEqual({ok, 7}, dspex_tools:call_python(S, add, #{<<"a">> => 3, <<"b">> => 4}, #{})),
    Tag = make_ref(),
    ?assertEqual({ok, #{<<"chunks">> => 3}},
                 dspex_tools:stream_python(S, count, #{<<"n">> => 3, <<"label">> => <<"x">>}, {self(), Tag}, #{})),
    ?assertEqual([#{<<"i">> => I, <<"label">> => <<"x">>} || I <- [0, 1, 2]],
                 [receive {Tag, {chunk, C}} -> C after 1000 -> error(no_chunk) end || _ <- [1, 2, 3]]),
    %% the stream broke after two items: they were delivered, then the error
    ok = dspex_tools:unregister_python(S, count),
    {ok, _} = dspex_tools:register_python(S, py_tools, [#{name => count_then_fail, supports_streaming => true}]),
    ?assertEqual({error, {tool_error, <<"RuntimeError: stream broke after 2">>}},
                 dspex_tools:stream_python(S, count_then_fail, #{<<"n">> => 2}, {self(), Tag}, #{})),
    ?assertEqual([0, 1], [receive {Tag, {chunk, C}} -> C after 1000 -> error(no_chunk) end || _ <- [1, 2]]),
    ?assertEqual({error, {tool_not_found, <<"count">>}}, dspex_tools:call_python(S, count, #{}, #{})).

python_tool_errors_and_access() ->
    S = <<"py_tools_s2">>,
    ?assertEqual({error, {unknown_pool, no_such_pool}}, dspex_tools:register_python(S, no_such_pool, [#{name => add}])),
    ?assertEqual({error, {invalid_argument, name}}, dspex_tools:register_python(S, py_tools, [#{name => <<>>}])),
    ?assertEqual([], dspex_tools:list_python(S, S)),
    {ok, _} = dspex_tools:register_python(S, py_tools, [#{name => boom}, #{name => add, allow => [<<"friend_*">>]}]),
    ?assertEqual({error, {tool_error, <<"ValueError: tool exploded">>}}, dspex_tools:call_python(S, boom, #{}, #{})),
    %% the session itself, and principals its allow globs name; nobody else
    ?assertEqual({error, access_denied}, dspex_tools:call_python(S, boom, #{}, #{principal => <<"friend_1">>})),
    ?assertEqual({ok, 2}, dspex_tools:call_python(S, add, #{<<"a">> => 1, <<"b">> => 1}, #{principal => <<"friend_1">>})),
    ?assertEqual([<<"add">>], [N || #{name := N} <- dspex_tools:list_python(S, <<"friend_9">>)]),
    ?assertEqual([], dspex_tools:list_python(S, <<"stranger">>)),
    %% a Python function that does not exist, and bad arguments, are the function's failure
    {ok, _} = dspex_tools:register_python(S, py_tools, [#{name => missing_fn}]),
    ?assertMatch({error, {tool_error, <<"unknown_function: missing_fn">>}}, dspex_tools:call_python(S, missing_fn, #{}, #{})),
    ?assertMatch({error, {tool_error, <<"TypeError: ", _/binary>>}}, dspex_tools:call_python(S, add, #{<<"a">> => 1}, #{})),
    %% an open breaker answers without touching the pool
    [ok = dspex_breaker:melt(dspex_workers:breaker(py_tools)) || _ <- lists:seq(1, 3)],
    ?assertEqual({error, circuit_open}, dspex_tools:call_python(S, add, #{<<"a">> => 1, <<"b">> => 1}, #{})),
    ok = dspex_breaker:reset(dspex_workers:breaker(py_tools)),
    ?assertEqual({ok, 2}, dspex_tools:call_python(S, add, #{<<"a">> => 1, <<"b">> => 1}, #{})).

python_tools_over_grpc_handlers() ->
    S = <<"py_tools_s3">>,
    Call = fun(M, Req) -> dspex_grpc_handler:handle(M, Req, #{meta => #{}, deadline => 5000, opts => #{}}, undefined) end,
    {reply, #{success := true, tool_ids := #{<<"add">> := _}}} =
        Call('RegisterTools', #{session_id => S, worker_id => <<"py_tools/1">>,
                                tools => [#{name => <<"add">>, description => <<>>, parameters => [], metadata => #{},
                                            supports_streaming => false}]}),
    ?assertEqual({error, {unknown_pool, <<"nope_pool_xyz">>}},
                 Call('RegisterTools', #{session_id => S, worker_id => <<"nope_pool_xyz">>, tools => []})),
    Arg = fun(V) -> #{type_url => <<"type.googleapis.com/google.protobuf.StringValue">>, value => V} end,
    {reply, #{success := true, result := #{value := 5}}} =
        Call('ExecuteTool', #{session_id => S, tool_name => <<"add">>, parameters => #{<<"a">> => Arg(2), <<"b">> => Arg(3)}}),
    ?assertEqual({unavailable, <<"worker pool circuit breaker is open, retry later">>},
                 dspex_grpc_status:of_error(circuit_open)).

tools_mod() -> filename:join([code:lib_dir(dspex_bridge), "test", "python_workers", "tools_mod.py"]).

%% Naming some other registered process as a pool reaches nothing: the
%% supervisors would crash on a call they do not know.
only_running_pools_are_addressed() ->
    Sups = [{N, whereis(N)} || N <- [dspex_bridge_sup, dspex_workers_sup]],
    ?assertEqual({error, no_pool}, dspex_workers:call(dspex_workers_sup, {f, []}, 2000)),
    ?assertEqual({error, no_pool}, dspex_workers:call(dspex_bridge_sup, {f, []}, 2000)),
    ?assertEqual({error, no_pool}, dspex_workers:status(dspex_workers_sup)),
    ?assertEqual([], dspex_workers:os_pids(dspex_bridge_sup)),
    ?assertEqual({error, {unknown_pool, dspex_bridge_sup}},
                 dspex_tools:register_python(<<"s1">>, dspex_bridge_sup, [])),
    ?assertEqual({error, {unknown_pool, dspex_workers_sup}},
                 dspex_tools:register_python(<<"s1">>, dspex_workers_sup, [#{name => add}])),
    Call = fun(M, Req) -> dspex_grpc_handler:handle(M, Req, #{meta => #{}, deadline => 5000, opts => #{}}, undefined) end,
    ?assertEqual({error, {unknown_pool, dspex_bridge_sup}},
                 Call('RegisterTools', #{session_id => <<"s1">>, worker_id => <<"dspex_bridge_sup/1">>, tools => []})),
    ?assertMatch({invalid_argument, _}, dspex_grpc_status:of_error({unknown_pool, dspex_bridge_sup})),
    %% nothing crashed: the same supervisors, and the pool still answers
    ?assertEqual(Sups, [{N, whereis(N)} || {N, _} <- Sups]),
    ?assertEqual({ok, 3}, dspex_workers:call(py_tools, {add, [1, 2]}, 5000)).

%% A start that fails because the name is taken leaves the running pool's
%% breaker (and options) as they were.
failed_duplicate_start_keeps_the_breaker() ->
    B = dspex_workers:breaker(py_tools),
    {ok, #{opts := #{threshold := 3}}} = dspex_breaker:status(B),
    ?assertMatch({error, {already_started, _}}, dspex_workers:start_pool(py_tools, #{module => tools_mod(), size => 1})),
    ?assertMatch({error, {already_started, _}},
                 dspex_workers:start_pool(py_tools, #{module => tools_mod(), size => 1, breaker => #{threshold => 9}})),
    ?assertMatch({ok, #{state := closed, opts := #{threshold := 3}}}, dspex_breaker:status(B)),
    %% a name some other process holds: refused, and that process untouched
    Sup = whereis(dspex_workers_sup),
    ?assertMatch({error, _}, dspex_workers:start_pool(dspex_workers_sup, #{module => tools_mod(), size => 1,
                                                                         breaker => #{threshold => 2}})),
    ?assertEqual({error, not_found}, dspex_breaker:status(dspex_workers:breaker(dspex_workers_sup))),
    ?assertEqual(Sup, whereis(dspex_workers_sup)),
    %% bad breaker options are refused before any worker starts
    ?assertEqual({error, {invalid_option, threshold}},
                 dspex_workers:start_pool(py_tools_other, #{module => tools_mod(), breaker => #{threshold => 0}})),
    ?assertEqual({error, no_pool}, dspex_workers:status(py_tools_other)),
    ?assertEqual({ok, 3}, dspex_workers:call(py_tools, {add, [1, 2]}, 5000)).

%%% Globs: linear time, characters are code points

%% Stars that the old backtracking matcher retried exponentially (22 s for
%% seven stars and 50 bytes; this pattern and subject would take far longer).
glob_stars_do_not_backtrack_exponentially_test() ->
    Pattern = <<"*a*a*a*a*a*a*a*a*a*a*a*a*b">>,
    Subject = binary:copy(<<"a">>, 2000),
    {Pid, MRef} = spawn_monitor(fun() -> exit({matched, dspex_tools:glob(Pattern, Subject)}) end),
    receive {'DOWN', MRef, process, Pid, Result} -> ?assertEqual({matched, false}, Result)
    after 5000 -> exit(Pid, kill), error(glob_too_slow)
    end,
    ?assert(dspex_tools:glob(Pattern, <<Subject/binary, "b">>)).

glob_characters_test() ->
    ?assert(dspex_tools:glob(<<"?">>, <<"é"/utf8>>)),
    ?assertNot(dspex_tools:glob(<<"??">>, <<"é"/utf8>>)),
    %% an invalid byte is one character, equal to no code point
    ?assert(dspex_tools:glob(<<"a?b">>, <<$a, 16#E9, $b>>)),
    ?assertNot(dspex_tools:glob(<<"é"/utf8>>, <<16#E9>>)),
    ?assert(dspex_tools:glob(<<"**">>, <<>>)),
    ?assertNot(dspex_tools:glob(<<"*?">>, <<>>)),
    ?assert(dspex_tools:glob(<<"*ab*">>, <<"xaxbab">>)).

%% Random patterns and subjects agree with a regular expression built from
%% the pattern (the definition of the matcher's semantics).
glob_agrees_with_regex_test() ->
    rand:seed(exsss, {1, 2, 3}),
    Alphabet = [<<"a">>, <<"b">>, <<"é"/utf8>>],
    Gen = fun(Extra, N) -> iolist_to_binary([lists:nth(rand:uniform(length(Alphabet ++ Extra)), Alphabet ++ Extra)
                                             || _ <- lists:seq(1, rand:uniform(N + 1) - 1)])
          end,
    [begin
         P = Gen([<<"*">>, <<"?">>], 7),
         S = Gen([], 8),
         Re = ["^", [case C of $* -> ".*"; $? -> "."; _ -> [C] end || C <- unicode:characters_to_list(P)], "$"],
         Expected = re:run(S, unicode:characters_to_binary(Re), [unicode, dotall, {capture, none}]) =:= match,
         ?assertEqual({P, S, Expected}, {P, S, dspex_tools:glob(P, S)})
     end || _ <- lists:seq(1, 3000)],
    ok.

python_tool_bad_timeout() ->
    S = <<"py_tools_s4">>,
    {ok, _} = dspex_tools:register_python(S, py_tools, [#{name => add}]),
    ?assertEqual({error, {invalid_argument, timeout}},
                 dspex_tools:call_python(S, add, #{<<"a">> => 1, <<"b">> => 1}, #{timeout => -5})),
    ?assertEqual({ok, 2}, dspex_tools:call_python(S, add, #{<<"a">> => 1, <<"b">> => 1}, #{timeout => 5000})).

%% Jitter never takes a restart's delay past backoff_max_ms. Eight slots
%% whose interpreter cannot run each schedule a restart at the cap (1000 ms,
%% jitter up to 100 ms); the old code added the jitter on top.
restart_backoff_stays_within_the_cap() ->
    Self = self(),
    Id = {?MODULE, restart},
    ok = dspex_telemetry:attach(Id, [dspex, workers, worker, restart],
                                fun(_, #{delay_ms := D}, #{pool := backoff_pool}, _) -> Self ! {delay, D};
                                   (_, _, _, _) -> ok
                                end, []),
    try
        ?assertMatch({error, {spawn_failed, _}},
                     dspex_workers:start_pool(backoff_pool, #{module => tools_mod(), size => 8,
                                                              python => "/nonexistent/python3",
                                                              backoff_min_ms => 1000, backoff_max_ms => 1000})),
        Delays = [receive {delay, D} -> D after 5000 -> error(no_restart_event) end || _ <- lists:seq(1, 8)],
        ?assertEqual([], [D || D <- Delays, D > 1000])
    after dspex_telemetry:detach(Id)
    end.

%% Arguments over worker.py's 64 MiB frame limit are refused before they are
%% sent, and a result over max_frame (16 MiB here) is refused by the worker:
%% an error for that call, not a dead worker or a breaker failure.
frames_over_the_limit_spare_the_worker() ->
    Pids = dspex_workers:os_pids(py_tools),
    {ok, #{restarts := Restarts}} = dspex_workers:status(py_tools),
    ok = dspex_breaker:reset(dspex_workers:breaker(py_tools)),
    Big = binary:copy(<<"a">>, 64 * 1024 * 1024),
    ?assertMatch({error, {too_large, N}} when N > 64 * 1024 * 1024,
                 dspex_workers:call(py_tools, {size, [Big]}, 60000)),
    ?assertMatch({error, {too_large, N}} when N > 16 * 1024 * 1024,
                 dspex_workers:call(py_tools, {big, [17 * 1024 * 1024]}, 60000)),
    Tag = make_ref(),
    ?assertMatch({error, {too_large, _}},
                 dspex_workers:stream(py_tools, {big_chunks, [17 * 1024 * 1024]}, 60000, {self(), Tag})),
    ?assertEqual(<<"small">>, receive {Tag, {chunk, C}} -> C after 0 -> none end),
    %% the same worker, never restarted, and the breaker counted nothing
    ?assertEqual({ok, 5}, dspex_workers:call(py_tools, {size, [<<"abcde">>]}, 5000)),
    ?assertEqual(Pids, dspex_workers:os_pids(py_tools)),
    ?assertMatch({ok, #{restarts := Restarts}}, dspex_workers:status(py_tools)),
    ?assertMatch({ok, #{state := closed, failures := 0}}, dspex_breaker:status(dspex_workers:breaker(py_tools))),
    ?assertMatch({resource_exhausted, _}, dspex_grpc_status:of_error({too_large, 1})).
