%% EUnit tests of dspex_opt: search spaces from variables, ask/tell runs under
%% optimizer locks, determinism, parallel asks, run/3, plugins and the learned
%% selection. Convergence is asserted on functions with known optima within
%% fixed budgets and seeds, never on time.
-module(dspex_opt_tests).
-export([session/0, vars/0, objective/1]).
-include_lib("eunit/include/eunit.hrl").

sid() -> iolist_to_binary(["opt_", integer_to_list(erlang:unique_integer([positive]))]).

%% x in [-5, 5], lr in [1e-4, 1] (log), n integer in [1, 1000] (log),
%% style one of three, flag boolean
session() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.0, #{constraints => #{min => -5.0, max => 5.0}}),
    {ok, _} = dspex_store:register(S, lr, float, 0.01, #{constraints => #{min => 1.0e-4, max => 1.0},
                                                          metadata => #{scale => log}}),
    {ok, _} = dspex_store:register(S, n, integer, 10, #{constraints => #{min => 1, max => 1000},
                                                         metadata => #{<<"scale">> => <<"log">>}}),
    {ok, _} = dspex_store:register(S, style, choice, <<"a">>,
                                   #{constraints => #{choices => [<<"a">>, <<"b">>, <<"c">>]}}),
    {ok, _} = dspex_store:register(S, flag, boolean, false),
    S.

vars() -> [x, lr, n, style, flag].

%% min 0 at x = 1.5, lr = 0.01, n = 100, style b, flag true
objective(#{<<"x">> := X, <<"lr">> := Lr, <<"n">> := N, <<"style">> := St, <<"flag">> := F}) ->
    (X - 1.5) * (X - 1.5) + sq(math:log10(Lr) + 2) + sq(math:log10(N) - 2)
        + case St of <<"b">> -> 0; <<"a">> -> 1; <<"c">> -> 2 end + case F of true -> 0; false -> 0.5 end.

sq(V) -> V * V.

opt_test_() ->
    {setup,
     fun() ->
             _ = application:load(dspex_bridge),
             application:set_env(dspex_bridge, grpc_enabled, false),
             application:set_env(dspex_bridge, prometheus_enabled, false),
             {ok, _} = application:ensure_all_started(dspex_bridge)
     end,
     fun(_) -> ok end,
     [fun space_refuses_unsupported_and_unbounded/0, fun space_maps_and_satisfies_constraints/0,
      fun ask_tell_best_trials/0, fun tell_errors_and_budget/0, fun same_seed_same_asks/0,
      {timeout, 300, fun every_algorithm_converges_and_respects_constraints/0}, fun parallel_run_tells_every_trial/0,
      fun maximize_and_apply_best_under_lock/0, fun locks_held_and_progress_reported/0,
      fun failed_trials_and_crashing_objective/0, fun owner_exit_ends_run_and_releases/0,
      fun runs_are_supervised_and_a_crash_is_contained/0,
      {timeout, 120, fun python_pool_evaluates_asks_in_parallel/0},
      fun run_without_owner_lives_until_idle/0, fun grpc_study_handlers/0, fun run_waiting_for_a_lock_blocks_no_other_start/0,
      fun telemetry_events/0, fun plugin_registered_and_used/0, fun bad_plugins_refused/0,
      fun selection_filters_by_capability/0, fun selection_learns_from_performance/0,
      fun finished_runs_feed_selection/0, fun bad_options/0, fun spaces_past_the_kernels_bounds_refused_at_start/0,
      fun extreme_bounds_and_scores/0, fun regret_is_kept_per_direction/0, fun bad_principal_raises_in_the_caller/0,
      fun run_timeout_bounds_a_fun_evaluation/0, fun registry_arguments_checked/0,
      fun run_ends_when_its_session_is_deleted/0, fun apply_best_needs_write_for_a_principal/0]}.

space_refuses_unsupported_and_unbounded() ->
    S = session(),
    {ok, _} = dspex_store:register(S, prompt, string, <<"hi">>),
    {ok, _} = dspex_store:register(S, free, float, 1.0),
    {ok, _} = dspex_store:register(S, neg, float, 1.0, #{constraints => #{min => -1.0, max => 2.0},
                                                         metadata => #{scale => log}}),
    ?assertEqual({error, {unsupported_type, <<"prompt">>, string}}, dspex_opt:start(S, [x, prompt], #{})),
    ?assertEqual({error, {unbounded, <<"free">>}}, dspex_opt:start(S, [free], #{})),
    ?assertEqual({error, {invalid_log_scale, <<"neg">>}}, dspex_opt:start(S, [neg], #{})),
    ?assertEqual({error, {duplicate_variable, <<"x">>}}, dspex_opt:start(S, [x, x], #{})),
    ?assertEqual({error, {not_found, nope}}, dspex_opt:start(S, [nope], #{})),
    ?assertEqual({error, {invalid_argument, variables}}, dspex_opt:start(S, [], #{})),
    ?assertEqual({error, session_not_found}, dspex_opt:start(<<"no_such_session">>, [x], #{})).

space_maps_and_satisfies_constraints() ->
    S = session(),
    {ok, Sp} = dspex_opt_space:from_variables(S, vars()),
    ?assertEqual([0, 0, 0, 3, 2], dspex_opt_space:dims(Sp)),
    ?assertEqual(mixed, dspex_opt_space:kind(Sp)),
    ?assertEqual(#{<<"x">> => -5.0, <<"lr">> => 1.0e-4, <<"n">> => 1, <<"style">> => <<"a">>, <<"flag">> => false},
                 dspex_opt_space:decode(Sp, [0.0, 0.0, 0.0, 0, 0])),
    #{<<"lr">> := Lr, <<"n">> := N} = dspex_opt_space:decode(Sp, [0.5, 0.5, 0.5, 2, 1]),
    ?assert(abs(Lr - 0.01) < 1.0e-12),   % log scale: the middle is the geometric mean
    ?assertEqual(32, N),                 % round(sqrt(1000))
    %% every decoded point is accepted by the store's own constraint checks
    Rand = rand:seed_s(exsss, 42),
    lists:foldl(fun(_, R0) ->
                        {P, R1} = lists:mapfoldl(fun(0, R) -> rand:uniform_s(R);
                                                    (K, R) -> {V, R2} = rand:uniform_s(K, R), {V - 1, R2}
                                                 end, R0, dspex_opt_space:dims(Sp)),
                        Params = dspex_opt_space:decode(Sp, P),
                        [{ok, _} = dspex_store:set(S, K, V) || {K, V} <- maps:to_list(Params)],
                        %% encode is the inverse on decoded values
                        ?assertEqual(Params, dspex_opt_space:decode(Sp, dspex_opt_space:encode(Sp, Params))),
                        R1
                end, Rand, lists:seq(1, 200)),
    %% a single possible value is fixed, not searched
    {ok, _} = dspex_store:register(S, one, choice, <<"only">>, #{constraints => #{choices => [<<"only">>]}}),
    {ok, Sp2} = dspex_opt_space:from_variables(S, [x, one]),
    ?assertEqual([0], dspex_opt_space:dims(Sp2)),
    ?assertEqual(#{<<"x">> => 0.0, <<"one">> => <<"only">>}, dspex_opt_space:decode(Sp2, [0.5])).

ask_tell_best_trials() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x, style], #{algorithm => random, budget => 5, seed => 1}),
    {ok, 0, P0} = dspex_opt:ask(R),
    {ok, 1, P1} = dspex_opt:ask(R),
    ?assertEqual({error, no_trials}, dspex_opt:best(R)),
    ok = dspex_opt:tell(R, 1, 3.0),
    ok = dspex_opt:tell(R, 0, 2.0),
    ?assertMatch({ok, #{trial := 0, score := 2.0, params := P0}}, dspex_opt:best(R)),
    {ok, 2, _} = dspex_opt:ask(R),
    ?assertMatch([#{id := 0, state := complete, score := 2.0, params := P0},
                  #{id := 1, state := complete, score := 3.0, params := P1},
                  #{id := 2, state := pending}], dspex_opt:trials(R)),
    ?assertMatch({ok, #{asked := 3, told := 2, pending := 1, algorithm := random, space := mixed}},
                 dspex_opt:info(R)),
    {ok, #{best := #{trial := 0}, applied := false, trials := 2}} = dspex_opt:stop(R, #{}),
    ?assertEqual({error, run_not_found}, dspex_opt:ask(R)).

tell_errors_and_budget() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => tpe, budget => 2}),
    {ok, 0, _} = dspex_opt:ask(R),
    ?assertEqual({error, {unknown_trial, 7}}, dspex_opt:tell(R, 7, 1.0)),
    ?assertEqual({error, {invalid_argument, score}}, dspex_opt:tell(R, 0, nan)),
    ok = dspex_opt:tell(R, 0, 1.0),
    ?assertEqual({error, {already_told, 0}}, dspex_opt:tell(R, 0, 1.0)),
    {ok, 1, _} = dspex_opt:ask(R),
    ?assertEqual({error, budget_exhausted}, dspex_opt:ask(R)),
    {ok, _} = dspex_opt:stop(R, #{}).

%% the asks of a run, telling objective/1 of each at once
asks(S, Alg, Seed, N) ->
    {ok, R} = dspex_opt:start(S, vars(), #{algorithm => Alg, budget => N, seed => Seed}),
    Ps = [begin {ok, Id, P} = dspex_opt:ask(R), ok = dspex_opt:tell(R, Id, objective(P)), P end
          || _ <- lists:seq(1, N)],
    {ok, _} = dspex_opt:stop(R, #{}),
    Ps.

same_seed_same_asks() ->
    S = session(),
    [begin
         A = asks(S, Alg, 5, 25),
         ?assertEqual(A, asks(S, Alg, 5, 25)),
         ?assertNotEqual(A, asks(S, Alg, 6, 25))
     end || Alg <- dspex_opt_registry:builtin()].

%% Every built-in algorithm beats random search on the mixed problem: the
%% median best over 5 seeds at the same budget (100); BO and SA come near the known
%% optimum (0). Every candidate passes the store's own constraint checks.
every_algorithm_converges_and_respects_constraints() ->
    S = session(),
    Check = sid(),
    ok = dspex_store:import_session((element(2, dspex_store:export_session(S)))#{id => Check}),
    Budget = 100,
    Run = fun(Alg, Seed) ->
                  {ok, R} = dspex_opt:start(S, vars(), #{algorithm => Alg, budget => Budget, seed => Seed}),
                  F = fun(P) -> [{ok, _} = dspex_store:set(Check, K, V) || {K, V} <- maps:to_list(P)],
                                objective(P) end,
                  {ok, #{score := Best}} = dspex_opt:run(R, F),
                  {ok, _} = dspex_opt:stop(R, #{}),
                  Best
          end,
    Median = fun(Alg) -> lists:nth(3, lists:sort([Run(Alg, Seed) || Seed <- lists:seq(1, 5)])) end,
    Baseline = Median(random),
    ?assert(Baseline > 0.3),  % not trivial for random search
    Medians = [{Alg, Median(Alg)} || Alg <- dspex_opt_registry:builtin() -- [random]],
    ?assertEqual({Baseline, []}, {Baseline, [{Alg, M} || {Alg, M} <- Medians, M >= Baseline]}),
    ?assert(proplists:get_value(bo, Medians) < 0.05),
    ?assert(proplists:get_value(sa, Medians) < 0.2).

parallel_run_tells_every_trial() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, vars(), #{algorithm => bo, budget => 24, seed => 2}),
    Self = self(),
    F = fun(P) -> Self ! {evaluating, self()}, objective(P) end,
    {ok, #{score := _}} = dspex_opt:run(R, F, #{parallel => 4}),
    Ts = dspex_opt:trials(R),
    ?assertEqual(24, length(Ts)),
    ?assert(lists:all(fun(#{state := St}) -> St =:= complete end, Ts)),
    %% pending trials made the parallel asks differ
    Params = [P || #{params := P} <- Ts],
    ?assertEqual(length(Params), length(lists:usort(Params))),
    {ok, _} = dspex_opt:stop(R, #{}).

maximize_and_apply_best_under_lock() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => cmaes, direction => maximize, budget => 80, seed => 4}),
    %% maximum 3 at x = -2
    {ok, #{score := Best, params := #{<<"x">> := X}}} =
        dspex_opt:run(R, fun(#{<<"x">> := V}) -> 3 - (V + 2) * (V + 2) end),
    ?assert(Best > 2.999),
    {ok, #{applied := true, best := #{params := #{<<"x">> := X}}}} = dspex_opt:stop(R, #{apply_best => true}),
    ?assertEqual({ok, X}, dspex_store:get_value(S, x)).

locks_held_and_progress_reported() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x, style], #{algorithm => ga, budget => 10}),
    ?assertMatch({error, {locked, _}}, dspex_store:set(S, x, 1.0)),
    ?assertMatch({ok, _}, dspex_store:set(S, lr, 0.1)),   % not in the run
    ?assertEqual({error, {lock_held_by, {dspex_opt, ga, R}}},
                 dspex_opt:start(S, [style], #{lock => #{conflict => abort}})),
    {ok, Id, #{<<"x">> := X}} = dspex_opt:ask(R),
    ok = dspex_opt:tell(R, Id, 0.25),
    {ok, #{locked := true, iterations := 1, best := #{value := X, score := 0.25}}} = dspex_locks:status(S, x),
    {ok, #{applied := false}} = dspex_opt:stop(R, #{}),
    {ok, #{locked := false}} = dspex_locks:status(S, x),
    ?assertMatch({ok, _}, dspex_store:set(S, x, 1.0)).

failed_trials_and_crashing_objective() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => tpe, budget => 30, seed => 1}),
    F = fun(#{<<"x">> := V}) when V < 0 -> error(negative);
           (#{<<"x">> := V}) when V > 4 -> {failed, too_big};
           (#{<<"x">> := V}) -> (V - 1) * (V - 1)
        end,
    {ok, #{score := B}} = dspex_opt:run(R, F),
    ?assert(B < 0.05),
    Ts = dspex_opt:trials(R),
    Failed = [T || #{state := failed} = T <- Ts],
    ?assert(length(Failed) > 0),
    ?assert(lists:all(fun(#{reason := {error, negative}}) -> true; (#{reason := too_big}) -> true;
                         (_) -> false end, Failed)),
    {ok, _} = dspex_opt:stop(R, #{}).

owner_exit_ends_run_and_releases() ->
    S = session(),
    Self = self(),
    Owner = spawn(fun() -> Self ! {run, dspex_opt:start(S, [x], #{})}, receive stop -> ok end end),
    {ok, R} = receive {run, Res} -> Res end,
    MRef = erlang:monitor(process, R),
    Owner ! stop,
    receive {'DOWN', MRef, process, R, _} -> ok end,
    %% the lock server saw the holder go (bounded polling on its state)
    ok = await(fun() -> dspex_locks:status(S, x) =:= {ok, #{locked => false, waiters => 0}} end, 1000).

%% Runs are temporary children of dspex_opt_sup: a run that crashes frees its
%% locks, is not restarted, and takes down neither the other runs, nor the
%% supervisor, nor the core services.
runs_are_supervised_and_a_crash_is_contained() ->
    S1 = session(),
    S2 = session(),
    Sup = whereis(dspex_opt_sup),
    Core = lists:sort(supervisor:which_children(dspex_core_sup)),
    {ok, R1} = dspex_opt:start(S1, [x, style], #{algorithm => random, budget => 10}),
    {ok, R2} = dspex_opt:start(S2, [x], #{algorithm => random, budget => 10}),
    ?assert(lists:member(R1, dspex_opt_sup:runs())),
    ?assert(lists:member(R2, dspex_opt_sup:runs())),
    {ok, #{locked := true}} = dspex_locks:status(S1, x),
    {ok, 0, _} = dspex_opt:ask(R1),
    MRef = erlang:monitor(process, R1),
    %% a request the run does not know crashes it (function_clause)
    ?assertMatch({'EXIT', _}, catch gen_server:call(R1, no_such_request)),
    receive {'DOWN', MRef, process, R1, Reason} -> ?assertMatch({function_clause, _}, Reason) end,
    ok = await(fun() -> dspex_locks:status(S1, x) =:= {ok, #{locked => false, waiters => 0}}
                            andalso dspex_locks:status(S1, style) =:= {ok, #{locked => false, waiters => 0}} end, 5000),
    ?assertEqual({error, run_not_found}, dspex_opt:ask(R1)),
    ?assertNot(lists:member(R1, dspex_opt_sup:runs())),
    %% the other run goes on; nothing else restarted
    {ok, Id, _} = dspex_opt:ask(R2),
    ok = dspex_opt:tell(R2, Id, 1.0),
    ?assertEqual(Sup, whereis(dspex_opt_sup)),
    ?assertEqual(Core, lists:sort(supervisor:which_children(dspex_core_sup))),
    %% a killed run likewise
    MRef2 = erlang:monitor(process, R2),
    exit(R2, kill),
    receive {'DOWN', MRef2, process, R2, killed} -> ok end,
    ok = await(fun() -> dspex_locks:status(S2, x) =:= {ok, #{locked => false, waiters => 0}} end, 5000),
    ?assertEqual(Sup, whereis(dspex_opt_sup)),
    %% the variables can be optimized again
    {ok, R3} = dspex_opt:start(S1, [x, style], #{algorithm => random, budget => 1}),
    {ok, _} = dspex_opt:stop(R3, #{}).

%% run/3 with a real Python worker pool (test/python_workers/opt_objective.py):
%% the first two asks are evaluated at the same time by two workers (their
%% rendezvous fails otherwise), every score is the objective's, each told trial
%% is reported to the locks' progress and logged as an optimization_trial event.
python_pool_evaluates_asks_in_parallel() ->
    %% a directory of its own, removed at the end
    Dir = filename:basedir(user_cache, "dspex_opt_tests-rv-" ++ os:getpid() ++ "-"
                           ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Dir),
    Module = filename:join([code:lib_dir(dspex_bridge), "test", "python_workers", "opt_objective.py"]),
    try
        {ok, _} = dspex_workers:start_pool(opt_py, #{module => Module, size => 2, health_interval_ms => infinity,
                                                     env => [{"DSPEX_OPT_RENDEZVOUS", Dir},
                                                             {"DSPEX_OPT_RENDEZVOUS_N", "2"}]}),
        ok = await(fun() -> {ok, #{idle := I}} = dspex_workers:status(opt_py), I >= 2 end, 20000),
        ?assert(dspex_events:enabled()),
        S = session(),
        Self = self(),
        TId = {?MODULE, make_ref()},
        ok = dspex_telemetry:attach(TId, [dspex, opt, tell], fun(_, _, #{trial := T}, _) -> Self ! {told, T} end,
                                    undefined),
        {ok, R} = dspex_opt:start(S, vars(), #{algorithm => tpe, budget => 24, seed => 3}),
        {ok, #{id := RunId}} = dspex_opt:info(R),
        {ok, #{score := Best, params := BestP}} = dspex_opt:run(R, {workers, opt_py, mixed},
                                                                #{parallel => 2, timeout => 60000}),
        dspex_telemetry:detach(TId),
        Ts = dspex_opt:trials(R),
        ?assertEqual(24, length(Ts)),
        %% no trial failed (a lone first call fails its rendezvous), and each
        %% score is the objective's value at its parameters
        [?assertMatch(#{state := complete}, T) || T <- Ts],
        [?assert(abs(Sc - objective(P)) < 1.0e-9) || #{params := P, score := Sc} <- Ts],
        ?assertEqual(lists:min([Sc || #{score := Sc} <- Ts]), Best),
        ?assert(abs(Best - objective(BestP)) < 1.0e-9),
        %% the two first calls ran in the two workers
        {ok, Files} = file:list_dir(Dir),
        ?assertEqual(24, length(Files)),
        {ok, Pid0} = file:read_file(filename:join(Dir, "call-00000")),
        {ok, Pid1} = file:read_file(filename:join(Dir, "call-00001")),
        ?assertNotEqual(Pid0, Pid1),
        ?assertEqual(lists:sort(dspex_workers:os_pids(opt_py)),
                     lists:sort([binary_to_integer(Pid0), binary_to_integer(Pid1)])),
        %% telemetry: one tell per trial; progress: the locks saw all 24
        Told = [receive {told, T} -> T after 5000 -> missing end || _ <- Ts],
        ?assertEqual(lists:seq(0, 23), lists:sort(Told)),
        {ok, #{iterations := 24, best := #{score := Best}}} = dspex_locks:status(S, x),
        %% the event log: one optimization_trial per told trial, in tell order
        ok = dspex_events:await(),
        {ok, Evs} = dspex_events:read(S, #{types => [optimization_trial]}),
        ?assertEqual(Told, [T || #{data := #{trial := T}} <- Evs]),
        ?assertEqual(lists:seq(1, 24), [N || #{data := #{told := N}} <- Evs]),
        [?assertMatch(#{run := RunId, algorithm := tpe, state := complete, score := _, params := _}, D)
         || #{data := D} <- Evs],
        #{data := #{best_trial := LastBest}} = lists:last(Evs),
        ?assertEqual({ok, BestP}, case lists:keyfind(LastBest, 1, [{I, P} || #{id := I, params := P} <- Ts]) of
                                      {_, P} -> {ok, P}; false -> error end),
        {ok, _} = dspex_opt:stop(R, #{}),
        %% a function that answers something else than a number fails its trials
        {ok, R2} = dspex_opt:start(S, [x], #{algorithm => random, budget => 2}),
        ?assertEqual({error, no_trials}, dspex_opt:run(R2, {workers, opt_py, not_a_number})),
        [?assertMatch(#{state := failed, reason := {not_a_score, <<"high">>}}, T) || T <- dspex_opt:trials(R2)],
        {ok, _} = dspex_opt:stop(R2, #{})
    after
        _ = dspex_workers:stop_pool(opt_py),
        _ = file:del_dir_r(Dir)
    end.

%% owner => none: the run outlives its starter, is found by its id, and ends
%% (locks released, id forgotten) once no call reached it for idle_timeout ms.
run_without_owner_lives_until_idle() ->
    S = session(),
    Self = self(),
    Starter = spawn(fun() ->
                            Self ! {started, dspex_opt:start(S, [x], #{owner => none, idle_timeout => 300,
                                                                       algorithm => random, budget => 5})}
                    end),
    {ok, R} = receive {started, Res} -> Res end,
    SRef = erlang:monitor(process, Starter),
    receive {'DOWN', SRef, process, Starter, _} -> ok end,
    MRef = erlang:monitor(process, R),
    {ok, #{id := Id}} = dspex_opt:info(R),
    ?assertMatch(<<_:24/binary>>, Id),
    ?assertEqual({ok, R}, dspex_opt:lookup(Id)),
    {ok, T, _} = dspex_opt:ask(R),
    ok = dspex_opt:tell(R, T, 1.0),
    receive {'DOWN', MRef, process, R, normal} -> ok end,
    ?assertEqual({error, run_not_found}, dspex_opt:lookup(Id)),
    ok = await(fun() -> dspex_locks:status(S, x) =:= {ok, #{locked => false, waiters => 0}} end, 5000),
    ?assertEqual({error, run_not_found}, dspex_opt:lookup(<<"nope">>)),
    ?assertEqual({error, {invalid_argument, owner}}, dspex_opt:start(S, [x], #{owner => nobody})),
    ?assertEqual({error, {invalid_argument, idle_timeout}}, dspex_opt:start(S, [x], #{idle_timeout => 0})).

%% The study RPCs through dspex_grpc_handler (request maps as the port shapes
%% them): a study outlives the RPC that started it, is usable by its session
%% and principal only, and maps dspex_opt's errors to their statuses.
grpc_study_handlers() ->
    S = session(),
    H = fun(M, Req, Opts) -> dspex_grpc_handler:handle(M, Req#{session_id => maps:get(session_id, Req, S)},
                                                        #{opts => Opts}, undefined) end,
    Start = #{variables => [<<"x">>, <<"style">>], algorithm => <<"tpe">>, direction => <<"maximize">>, budget => 3,
              seed => 5, idle_timeout_ms => 0, lock_timeout_ms => 0},
    {reply, #{study_id := Id, space := <<"mixed">>}} = H('StartStudy', Start, #{}),
    {ok, Run} = dspex_opt:lookup(Id),
    {ok, #{locked := true}} = dspex_locks:status(S, x),
    Other = session(),
    ?assertEqual({error, run_not_found}, H('AskTrial', #{session_id => Other, study_id => Id}, #{})),
    ?assertEqual({error, run_not_found}, H('AskTrial', #{study_id => Id}, #{as => <<"someone">>})),
    ?assertEqual({error, run_not_found}, H('AskTrial', #{study_id => <<"nope">>}, #{})),
    {reply, #{trial_id := 0, params_json := #{<<"x">> := X0, <<"style">> := _} = P0}} =
        H('AskTrial', #{study_id => Id}, #{}),
    ?assert(is_float(X0)),
    {reply, #{trial_id := 1}} = H('AskTrial', #{study_id => Id}, #{}),
    Tell = #{study_id => Id, trial_id => 0, score => 2.5, failed => false, reason => <<>>},
    ?assertEqual({reply, #{}}, H('TellTrial', Tell, #{})),
    ?assertEqual({error, {already_told, 0}}, H('TellTrial', Tell, #{})),
    ?assertEqual({error, {unknown_trial, 7}}, H('TellTrial', Tell#{trial_id => 7}, #{})),
    ?assertEqual({reply, #{}}, H('TellTrial', Tell#{trial_id => 1, failed => true, reason => <<"oom">>}, #{})),
    {reply, #{trial_id := 2}} = H('AskTrial', #{study_id => Id}, #{}),
    ?assertEqual({error, budget_exhausted}, H('AskTrial', #{study_id => Id}, #{})),
    {reply, G} = H('GetStudy', #{study_id => Id, include_trials => true}, #{}),
    ?assertMatch(#{study_id := Id, algorithm := <<"tpe">>, direction := <<"maximize">>, budget := 3, asked := 3,
                   told := 2, pending := 1, variables := [<<"x">>, <<"style">>], space := <<"mixed">>,
                   has_best := true, best := #{trial_id := 0, score := 2.5, params_json := P0}}, G),
    ?assertMatch([#{trial_id := 0, state := <<"complete">>, score := 2.5},
                  #{trial_id := 1, state := <<"failed">>, reason := <<"oom">>},
                  #{trial_id := 2, state := <<"pending">>}], maps:get(trials, G)),
    {reply, Stop} = H('StopStudy', #{study_id => Id, apply_best => true}, #{}),
    ?assertMatch(#{applied := true, has_best := true, trials := 2, apply_errors := [],
                   best := #{trial_id := 0, params_json := P0}}, Stop),
    ?assertEqual({ok, X0}, dspex_store:get_value(S, x)),
    ?assertNot(is_process_alive(Run)),
    ?assertEqual({error, run_not_found}, H('GetStudy', #{study_id => Id, include_trials => false}, #{})),
    %% refusals of StartStudy
    ?assertEqual({error, {unknown_algorithm, <<"magic">>}}, H('StartStudy', Start#{algorithm => <<"magic">>}, #{})),
    ?assertEqual({error, {invalid_argument, direction}}, H('StartStudy', Start#{direction => <<"up">>}, #{})),
    ?assertEqual({error, {invalid_argument, budget}}, H('StartStudy', Start#{budget => -1}, #{})),
    ?assertEqual({error, {not_found, <<"nope">>}}, H('StartStudy', Start#{variables => [<<"nope">>]}, #{})),
    ?assertEqual({error, {invalid_argument, session_id}}, H('StartStudy', Start#{session_id => <<>>}, #{})),
    %% every error maps to its status
    [?assertEqual(Code, element(1, dspex_grpc_status:of_error(E)))
     || {E, Code} <- [{run_not_found, not_found}, {{unknown_trial, 1}, not_found},
                      {{already_told, 1}, failed_precondition}, {budget_exhausted, out_of_range},
                      {{unknown_algorithm, x}, invalid_argument}, {{unsupported_type, <<"p">>, string}, invalid_argument},
                      {{unbounded, <<"f">>}, invalid_argument}, {{invalid_log_scale, <<"f">>}, invalid_argument}]],
    ?assertEqual(#{<<"dspex-error">> => <<"budget_exhausted">>}, dspex_grpc_status:trailers(budget_exhausted)).

%% A run waits for its locks in its own process, not in the supervisor's
%% start: while one waits, other runs start; it starts once the lock is free.
run_waiting_for_a_lock_blocks_no_other_start() ->
    S1 = session(),
    S2 = session(),
    {ok, L} = dspex_locks:acquire(S1, x, holder, #{}),
    Self = self(),
    Waiter = spawn_link(fun() ->
                                Self ! {waited, dspex_opt:start(S1, [x], #{lock => #{conflict => wait, timeout => 60000}})},
                                receive stop -> ok end
                        end),
    ok = await(fun() -> maps:get(waiters, element(2, dspex_locks:status(S1, x)), 0) =:= 1 end, 5000),
    {ok, R2} = dspex_opt:start(S2, [x], #{budget => 1}),
    receive {waited, Early} -> ?assertEqual(still_waiting, Early) after 0 -> ok end,
    {ok, _} = dspex_opt:stop(R2, #{}),
    ok = dspex_locks:release(L),
    {ok, R1} = receive {waited, Res} -> Res end,
    {ok, #{locked := true, optimizer := {dspex_opt, tpe, R1}}} = dspex_locks:status(S1, x),
    {ok, _} = dspex_opt:stop(R1, #{}),
    Waiter ! stop.

await(F, 0) -> {timeout, F()};
await(F, N) ->
    case F() of
        true -> ok;
        false -> erlang:yield(), timer:sleep(1), await(F, N - 1)
    end.

telemetry_events() ->
    S = session(),
    Self = self(),
    Id = {?MODULE, make_ref()},
    ok = dspex_telemetry:attach_many(Id, [[dspex, opt, E] || E <- [start, ask, tell, stop]],
                                     fun(Ev, M, Meta, _) -> Self ! {ev, Ev, M, Meta} end, undefined),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => sa, budget => 1}),
    {ok, 0, _} = dspex_opt:ask(R),
    ok = dspex_opt:tell(R, 0, 1.0),
    {ok, _} = dspex_opt:stop(R, #{}),
    dspex_telemetry:detach(Id),
    Evs = [receive {ev, [dspex, opt, E], M, Meta} -> {E, M, Meta} after 5000 -> {missing, E} end
           || E <- [start, ask, tell, stop]],
    [{start, _, #{session := S, algorithm := sa, run := R, budget := 1}},
     {ask, #{duration := D}, #{trial := 0}},
     {tell, _, #{trial := 0, result := ok}},
     {stop, _, #{applied := false, trials := 1}}] = Evs,
    ?assert(is_integer(D)).

plugin_registered_and_used() ->
    Id = list_to_atom("walk_" ++ integer_to_list(erlang:unique_integer([positive]))),
    ok = dspex_opt:register_algorithm(#{id => Id, module => dspex_opt_test_plugin,
                                        capabilities => #{spaces => [continuous], noisy => true}}),
    ?assertEqual({error, {already_exists, Id}},
                 dspex_opt:register_algorithm(#{id => Id, module => dspex_opt_test_plugin})),
    ?assertEqual({error, {already_exists, tpe}},
                 dspex_opt:register_algorithm(#{id => tpe, module => dspex_opt_test_plugin})),
    S = session(),
    {ok, R} = dspex_opt:start(S, [x, style], #{algorithm => Id, budget => 60, seed => 3}),
    {ok, #{score := B}} = dspex_opt:run(R, fun(P) -> objective(P#{<<"lr">> => 0.01, <<"n">> => 100,
                                                                   <<"flag">> => true}) end),
    ?assert(B < 0.05),
    {ok, _} = dspex_opt:stop(R, #{}),
    ?assert(lists:keymember(Id, 1, dspex_opt:algorithms())).

bad_plugins_refused() ->
    Reg = fun(Mode) ->
                  persistent_term:put({dspex_opt_bad_plugins, mode}, Mode),
                  dspex_opt:register_algorithm(#{id => Mode, module => dspex_opt_bad_plugins})
          end,
    ?assertMatch({error, {invalid_plugin, {out_of_bounds, [1.5, 1.5, 0]}}}, Reg(out_of_bounds)),
    ?assertMatch({error, {invalid_plugin, {crashed, {error, boom}}}}, Reg(crashes)),
    ?assertMatch({error, {invalid_plugin, {bad_return, ask, not_a_point}}}, Reg(bad_return)),
    ?assertMatch({error, {invalid_plugin, {missing_callbacks, [init, ask, tell]}}},
                 dspex_opt:register_algorithm(#{id => lists_plugin, module => lists})),
    ?assertEqual(error, dspex_opt_registry:lookup(crashes)),
    persistent_term:erase({dspex_opt_bad_plugins, mode}).

selection_filters_by_capability() ->
    {ok, _, #{candidates := C1, excluded := E1}} =
        dspex_opt:select_algorithm(#{space => discrete, dims => 3, budget => 100, seed => 1}),
    ?assertNot(lists:member(cmaes, C1)),
    ?assertEqual({space, discrete}, maps:get(spsa_adam, E1)),
    {ok, _, #{candidates := C2, excluded := E2}} =
        dspex_opt:select_algorithm(#{space => continuous, dims => 30, budget => 100, noisy => true, seed => 1}),
    ?assertEqual(noisy, maps:get(sa, E2)),
    ?assertEqual({dims, 30}, maps:get(bo, E2)),
    ?assert(lists:member(spsa_adam, C2)),
    {ok, A, _} = dspex_opt:select_algorithm(#{space => mixed, dims => 2, budget => 5, seed => 1}),
    ?assert(lists:member(A, [random])),
    ?assertEqual({error, {invalid_argument, task_class}}, dspex_opt:select_algorithm(#{space => odd})),
    ?assertEqual({error, {invalid_argument, priorities}},
                 dspex_opt:select_algorithm(#{space => mixed, dims => 2, budget => 50,
                                              priorities => #{quality => -1}})).

%% A task class of its own: after GA reaches regret 0 on 20 runs and the
%% others 0.8, Thompson sampling picks GA for (nearly) every seed.
selection_learns_from_performance() ->
    Budget = 700 + erlang:unique_integer([positive]) rem 200, % in the 1000 bucket, but a class no other test uses
    Class = #{space => discrete, dims => 7, budget => Budget, noisy => false},
    [ok = dspex_opt:record_performance(A, Class, case A of ga -> 0.0; _ -> 0.8 end)
     || A <- [random, sa, ga, tpe], _ <- lists:seq(1, 20)],
    ?assertEqual({error, {invalid_argument, regret}}, dspex_opt:record_performance(ga, Class, 1.5)),
    ?assertEqual({error, {unknown_algorithm, nope}}, dspex_opt:record_performance(nope, Class, 0.5)),
    Picks = [element(2, dspex_opt:select_algorithm(Class#{seed => Seed})) || Seed <- lists:seq(1, 50)],
    ?assert(length([ga || ga <- Picks]) >= 45),
    {ok, ga, #{scores := #{ga := #{runs := 20, mean_regret := 0.0}}}} =
        dspex_opt:select_algorithm(Class#{seed => 1}),
    %% speed priority only: the cheapest (random search, constant cost) wins
    {ok, random, _} = dspex_opt:select_algorithm(Class#{seed => 1, priorities => #{quality => 0, speed => 1}}).

finished_runs_feed_selection() ->
    S = session(),
    Req = #{space => continuous, dims => 1, budget => 13, noisy => false},
    Runs = fun() -> {ok, _, #{scores := #{random := #{runs := N}}}} = dspex_opt:select_algorithm(Req), N end,
    N0 = Runs(),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => random, budget => 13, optimum => 0.0}),
    {ok, _} = dspex_opt:run(R, fun(#{<<"x">> := V}) -> V * V end),
    {ok, _} = dspex_opt:stop(R, #{}),
    ?assertEqual(N0 + 1, Runs()).

bad_options() ->
    S = session(),
    ?assertEqual({error, {unknown_algorithm, nope}}, dspex_opt:start(S, [x], #{algorithm => nope})),
    ?assertEqual({error, {invalid_argument, budget}}, dspex_opt:start(S, [x], #{budget => 0})),
    ?assertEqual({error, {invalid_argument, direction}}, dspex_opt:start(S, [x], #{direction => up})),
    ?assertEqual({error, {invalid_argument, seed}}, dspex_opt:start(S, [x], #{seed => -1})),
    ?assertEqual({error, {invalid_argument, options}}, dspex_opt:start(S, [x], nope)),
    {ok, R} = dspex_opt:start(S, [x], #{}),
    ?assertEqual({error, {invalid_argument, run}}, dspex_opt:run(R, not_a_fun)),
    {ok, _} = dspex_opt:stop(R, #{}),
    {Dead, DRef} = spawn_monitor(fun() -> ok end),
    receive {'DOWN', DRef, process, Dead, _} -> ok end,
    ?assertEqual({error, run_not_found}, dspex_opt:best(Dead)),
    %% the NIF refuses malformed input with badarg, bad history with an error
    ?assertError(badarg, dspex_nif:opt_ask(nope, [0], [], [], 1, 0, 10, undefined)),
    ?assertError(badarg, dspex_nif:opt_ask(tpe, [1], [], [], 1, 0, 10, undefined)),
    ?assertError(badarg, dspex_nif:opt_ask(tpe, [0], [{0, [0.5, 1], 1.0}], [], 1, 0, 10, undefined)),
    ?assertError(badarg, dspex_nif:opt_ask(tpe, [0], [], [], 1, 0, 0, undefined)),
    ?assertEqual({error, {invalid_argument, history}}, dspex_nif:opt_ask(tpe, [0], [{0, [1.5], 1.0}], [], 1, 0, 10, undefined)),
    ?assertEqual({error, {invalid_argument, history}}, dspex_nif:opt_ask(tpe, [3], [], [[3]], 1, 0, 10, undefined)),
    ?assertError(badarg, dspex_nif:opt_ask(bo, [0], [], [], 1, 0, 10, [1.0])),   % d + 2 values
    ?assertError(badarg, dspex_nif:opt_ask(bo, [0], [], [], 1, 0, 10, other)),
    {ok, [_], undefined} = dspex_nif:opt_ask(bo, [0], [], [], 1, 0, 10, undefined),
    Told = [{I, [I / 10], (I / 10 - 0.3) * (I / 10 - 0.3)} || I <- lists:seq(0, 9)],
    {ok, [_], [_, _, _] = Fitted} = dspex_nif:opt_ask(bo, [0], Told, [], 1, 10, 20, undefined),
    {ok, [_], [_, _, _]} = dspex_nif:opt_ask(bo, [0], Told, [], 1, 10, 20, Fitted),
    %% CMA-ES: its state (a binary) resumes the replay, with the same ask as the whole replay
    {ok, _, State} = dspex_nif:opt_ask(cmaes, [0], lists:sublist(Told, 6), [], 1, 6, 20, undefined),
    ?assert(is_binary(State)),
    {ok, P10, _} = dspex_nif:opt_ask(cmaes, [0], Told, [], 1, 10, 20, undefined),
    ?assertMatch({ok, P10, _}, dspex_nif:opt_ask(cmaes, [0], Told, [], 1, 10, 20, State)),
    ?assertError(badarg, dspex_nif:opt_ask(cmaes, [0], Told, [], 1, 10, 20, <<1, 2, 3>>)),
    ?assertError(badarg, dspex_nif:opt_ask(cmaes, [0], Told, [], 1, 10, 20, [1.0, 2.0, 3.0])).


%% The kernels take at most 64 free dimensions and 4096 categories in one: more is refused by start/3
%% (the first ask crashed the run with a NIF badarg).
spaces_past_the_kernels_bounds_refused_at_start() ->
    S = session(),
    Names = [iolist_to_binary(["v", integer_to_list(I)]) || I <- lists:seq(1, 65)],
    [{ok, _} = dspex_store:register(S, N, float, 0.5, #{constraints => #{min => 0.0, max => 1.0}}) || N <- Names],
    Runs0 = length(dspex_opt_sup:runs()),
    ?assertEqual({error, {too_many_dimensions, 65, 64}}, dspex_opt:start(S, Names, #{algorithm => random})),
    {ok, R64} = dspex_opt:start(S, tl(Names), #{algorithm => random}),
    {ok, _, P64} = dspex_opt:ask(R64),
    ?assertEqual(64, map_size(P64)),
    {ok, _} = dspex_opt:stop(R64, #{}),
    Cs = [integer_to_binary(I) || I <- lists:seq(1, 4097)],
    {ok, _} = dspex_store:register(S, wide, choice, <<"1">>, #{constraints => #{choices => Cs}}),
    ?assertEqual({error, {too_many_choices, <<"wide">>, 4096}}, dspex_opt:start(S, [wide], #{algorithm => tpe})),
    ?assertEqual(Runs0, length(dspex_opt_sup:runs())),
    %% nothing locked by the refused starts
    {ok, #{locked := false}} = dspex_locks:status(S, wide),
    {ok, #{locked := false}} = dspex_locks:status(S, hd(Names)).

%% Bounds near the float range's ends (Hi - Lo overflows) and scores that are no float (a bignum past the
%% float range) used to crash the run process; a huge but finite score stays a score.
extreme_bounds_and_scores() ->
    S = session(),
    {ok, _} = dspex_store:register(S, big, float, 0.0, #{constraints => #{min => -1.0e308, max => 1.0e308}}),
    {ok, R} = dspex_opt:start(S, [big], #{algorithm => random, budget => 20}),
    Vs = [begin {ok, I, #{<<"big">> := V}} = dspex_opt:ask(R), ok = dspex_opt:tell(R, I, 1.0e308), V end
          || _ <- lists:seq(1, 5)],
    ?assert(lists:all(fun(V) -> is_float(V) andalso V >= -1.0e308 andalso V =< 1.0e308 end, Vs)),
    ?assert(length(lists:usort(Vs)) > 1),
    {ok, I6, _} = dspex_opt:ask(R),
    ?assertEqual({error, {invalid_argument, score}}, dspex_opt:tell(R, I6, 1 bsl 1100)),
    %% the run is alive, the trial still pending, the history kept
    ok = dspex_opt:tell(R, I6, 1 bsl 1000),
    {ok, #{told := 6}} = dspex_opt:info(R),
    {ok, _} = dspex_opt:stop(R, #{}),
    {ok, R2} = dspex_opt:start(S, [x], #{algorithm => random, budget => 3}),
    C = counters:new(1, []),
    First = fun(_) -> counters:add(C, 1, 1), case counters:get(C, 1) of 1 -> 1 bsl 1100; _ -> 1.0 end end,
    {ok, #{score := 1.0}} = dspex_opt:run(R2, First),
    Ts = dspex_opt:trials(R2),
    ?assertEqual(3, length(Ts)),
    ?assertEqual([{not_a_score, 1 bsl 1100}], [Re || #{state := failed, reason := Re} <- Ts]),
    {ok, _} = dspex_opt:stop(R2, #{}).

%% The best score ever seen on a problem is kept per direction: a maximising run's (negated) best made the
%% regret of a later minimising run of the same variables wrong.
regret_is_kept_per_direction() ->
    S = session(),
    Scores = [float(I) || I <- lists:seq(1, 9)],
    Run = fun(Dir) ->
                  {ok, R} = dspex_opt:start(S, [x], #{algorithm => random, direction => Dir, budget => 9}),
                  [begin {ok, I, _} = dspex_opt:ask(R), ok = dspex_opt:tell(R, I, Y) end || Y <- Scores],
                  {ok, _} = dspex_opt:stop(R, #{})
          end,
    Key = fun(Dir) -> {{S, [<<"x">>]}, Dir} end,
    Run(minimize),
    ?assertEqual(0.0, dspex_opt_registry:problem_regret(Key(minimize), 1.0, Scores)),
    Run(maximize),
    Run(minimize),
    %% the minimising runs' best (1.0) is still the problem's best known value: regret 0
    ?assertEqual(0.0, dspex_opt_registry:problem_regret(Key(minimize), 1.0, Scores)),
    ?assertEqual(0.0, dspex_opt_registry:problem_regret(Key(maximize), -9.0, [-Y || Y <- Scores])).

%% A principal that does not parse raises badarg in the caller (as every call that takes one does); it
%% crashed the run process and was reported as run_not_found.
bad_principal_raises_in_the_caller() ->
    S = session(),
    Runs0 = dspex_opt_sup:runs(),
    ?assertError(badarg, dspex_opt:start(S, [x], #{as => "other"})),
    ?assertError(badarg, dspex_opt:start(S, [x], #{context => foo})),
    ?assertError(badarg, dspex_opt:start(S, [x], #{lock => #{as => "other"}})),
    ?assertEqual(Runs0, dspex_opt_sup:runs()),
    {ok, R} = dspex_opt:start(S, [x], #{}),
    ?assertEqual({error, {invalid_argument, options}}, dspex_opt:stop(R, foo)),
    ?assertEqual({error, {invalid_argument, options}}, dspex_opt:run(R, fun(_) -> 1.0 end, foo)),
    {ok, _} = dspex_opt:stop(R, #{}).

%% run/3's `timeout' bounds a fun's evaluation too (it applied to pools only): the evaluation is killed
%% and its trial fails with `timeout'.
run_timeout_bounds_a_fun_evaluation() ->
    S = session(),
    {ok, R} = dspex_opt:start(S, [x], #{algorithm => random, budget => 3}),
    Self = self(),
    Hang = fun(_) -> Self ! {evaluating, self()}, receive never -> 1.0 end end,
    ?assertEqual({error, no_trials}, dspex_opt:run(R, Hang, #{timeout => 20, parallel => 2})),
    Ts = dspex_opt:trials(R),
    ?assertEqual([failed, failed, failed], [St || #{state := St} <- Ts]),
    ?assertEqual([timeout, timeout, timeout], [Re || #{reason := Re} <- Ts]),
    %% every evaluation process was killed (by this process, which run/3 runs in: its exit signals are
    %% delivered before is_process_alive/1 looks)
    Pids = [receive {evaluating, P} -> P end || _ <- Ts],
    ?assertEqual([false, false, false], [is_process_alive(P) || P <- Pids]),
    ?assertEqual({error, {invalid_argument, run}}, dspex_opt:run(R, Hang, #{timeout => 1 bsl 32})),
    {ok, _} = dspex_opt:stop(R, #{}).

registry_arguments_checked() ->
    Req = #{space => continuous, dims => 2, budget => 10},
    ?assertEqual({error, {invalid_argument, seed}}, dspex_opt:select_algorithm(Req#{seed => foo})),
    ?assertEqual({error, {invalid_argument, seed}}, dspex_opt:select_algorithm(Req#{seed => 1.5})),
    {ok, _, _} = dspex_opt:select_algorithm(Req#{seed => 3}),
    ?assertEqual({error, {invalid_argument, priorities}}, dspex_opt:select_algorithm(Req#{priorities => foo})),
    ?assertEqual({error, {invalid_argument, capabilities}},
                 dspex_opt:register_algorithm(#{id => capfoo, module => dspex_opt_test_plugin, capabilities => foo})),
    ?assertEqual({error, {invalid_argument, capabilities}},
                 dspex_opt:register_algorithm(#{id => capfoo, module => dspex_opt_test_plugin,
                                                capabilities => #{max_dims => foo, noisy => 7, spaces => foo}})),
    ?assertEqual({error, {invalid_argument, capabilities}},
                 dspex_opt:register_algorithm(#{id => capfoo, module => dspex_opt_test_plugin,
                                                capabilities => #{spaces => [continuous, nope]}})),
    ?assertEqual(error, dspex_opt_registry:lookup(capfoo)),
    ?assertEqual({error, {invalid_argument, task_class}}, dspex_opt:record_performance(tpe, {foo, -5, 0, true}, 0.2)),
    ?assertEqual({error, {invalid_argument, task_class}}, dspex_opt:record_performance(tpe, {continuous, 3, 7, false}, 0.2)),
    ok = dspex_opt:record_performance(tpe, {continuous, 5, 50, false}, 0.2).

%% Deleting the session takes the run's locks: the run ends with them, and
%% every later call says so instead of asking on for nothing.
run_ends_when_its_session_is_deleted() ->
    S = session(),
    {ok, Run} = dspex_opt:start(S, [x], #{budget => 5}),
    MRef = monitor(process, Run),
    ok = dspex_store:delete_session(S),
    receive {'DOWN', MRef, process, Run, normal} -> ok end,
    ?assertEqual({error, run_not_found}, dspex_opt:ask(Run)),
    ?assertEqual({error, run_not_found}, dspex_opt:stop(Run, #{apply_best => true})).

%% A run started `as' a principal applies its best as that principal: with
%% only `optimize' nothing is written.
apply_best_needs_write_for_a_principal() ->
    S = session(),
    P = <<"opt_bot">>,
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => P, permissions => [optimize]}]),
    {ok, Run} = dspex_opt:start(S, [x], #{as => P, budget => 3, seed => 1, algorithm => random}),
    [begin {ok, Id, _} = dspex_opt:ask(Run), ok = dspex_opt:tell(Run, Id, 1.0) end || _ <- [1, 2, 3]],
    ?assertMatch({ok, #{applied := false, apply_errors := [access_denied]}}, dspex_opt:stop(Run, #{apply_best => true})),
    ?assertEqual({ok, 0.0}, dspex_store:get_value(S, x)).
