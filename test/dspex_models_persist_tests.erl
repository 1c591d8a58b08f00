%% @doc EUnit tests of what keeps experiments and rollouts alive: their
%% state in the registry's store session (a killed `dspex_models_server' is
%% restarted by its supervisor and resumes them: same routing, same counts,
%% same step and status) and the event log records of every change, read
%% back in order with `dspex_events:read/2'.
-module(dspex_models_persist_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dspex_models_rollout_tests, [setup_name/1]).

persist_test_() ->
    {setup, fun dspex_models_registry_tests:start/0, fun(_) -> ok end,
     [{"an A/B test survives a crash of its server: routing, counts, running p-value; it then decides",
       fun ab_survives_crash/0},
      {"a paused rollout survives a crash at its second step, then resumes to 100%",
       fun rollout_survives_crash/0},
      {"counts recorded after the last checkpoint are the only loss", fun checkpoint_bound/0},
      {"a stored test with overflowing or broken weights never crash-loops the server",
       fun poisoned_stored_test/0},
      {"checkpoints written before the sums were split (layout 1) still count", fun layout1_checkpoints/0},
      {"a call failing on a broken stored record fails alone: the server and its state live on",
       fun call_fails_alone/0},
      {"an application restart (the store lives in the NIF) resumes a rollout", fun app_restart/0},
      {"the event log records an A/B test's start and decision", fun events_ab/0},
      {"the event log records a rollout's steps, pause, resume and completion in order",
       fun events_rollout/0},
      {"the event log records automatic and manual rollbacks and a manual stop",
       fun events_rollback/0}]}.

%% one request per user; Profile(Model) -> {SuccessProb, MedianMs}
traffic(N, Users, Profile, Rand0) ->
    lists:foldl(
      fun(U, R0) ->
              {ok, M} = dspex_models:select_model(N, #{user_id => U}),
              {P, Med} = Profile(M),
              {U1, R1} = rand:uniform_s(R0),
              {G, R2} = rand:normal_s(R1),
              ok = dspex_models:record_inference(M, Med * math:exp(0.3 * G), U1 < P, #{}),
              R2
      end, Rand0, Users).

routing(N, Users) -> [dspex_models:select_model(N, #{user_id => U}) || U <- Users].

%% kills the server and waits for the supervisor's new one to have loaded
%% the tests (its first call is served after the load)
crash_server() ->
    Old = whereis(dspex_models_server),
    MRef = monitor(process, Old),
    exit(Old, kill),
    receive {'DOWN', MRef, process, Old, _} -> ok end,
    New = wait_new(Old, 1000),
    _ = dspex_models:list_tests(),
    New.

%% a new server that loads everything from the store, as after a crash,
%% without counting towards the supervisor's restart intensity (the other
%% tests' kills use it up)
reload_server() ->
    ok = supervisor:terminate_child(dspex_bridge_sup, dspex_models_server),
    {ok, _} = supervisor:restart_child(dspex_bridge_sup, dspex_models_server),
    _ = dspex_models:list_tests(),
    ok.

wait_new(Old, Tries) when Tries > 0 ->
    case whereis(dspex_models_server) of
        P when is_pid(P), P =/= Old -> P;
        _ -> receive after 5 -> wait_new(Old, Tries - 1) end
    end.

arm_ns(T) ->
    {ok, #{arm_summary := Arms}} = dspex_models:results(T),
    [{M, maps:get(n, A), maps:get(successes, A)} || {M, #{n := _} = A} <- Arms].

ab_survives_crash() ->
    {N, A, B} = setup_name(<<"pab">>),
    {ok, T} = dspex_models:start_ab_test(#{salt => <<"p1">>, model => N, variants => [{A, 50}, {B, 50}], mde => 0.05}),
    Profile = fun(M) when M =:= A -> {0.80, 20}; (_) -> {0.90, 20} end,
    R1 = traffic(N, lists:seq(1, 300), Profile, rand:seed_s(exsss, {19, 5, 1})),
    ok = dspex_models:evaluate(),
    {ok, #{status := running, decision := continue, p_value := P0}} = dspex_models:results(T),
    Before = arm_ns(T),
    Users = lists:seq(1, 2000),
    Route = routing(N, Users),
    ?assertEqual([{ok, A}, {ok, B}], lists:usort(Route)),
    crash_server(),
    %% the same split, the same counts, the same running p-value
    ?assertEqual(Route, routing(N, Users)),
    ?assertEqual(Before, arm_ns(T)),
    {ok, #{status := running, p_value := P1}} = dspex_models:results(T),
    ?assert(P1 =< P0),
    ?assertMatch(#{T := #{status := running}}, dspex_models:list_tests()),
    %% ingest goes on into the restored counters, and the test decides
    decide(N, T, Profile, R1, 1, 30),
    {ok, #{decision := {winner, B}, status := finished}} = dspex_models:results(T),
    [{A, NA, _}, {B, NB, _}] = arm_ns(T),
    [{A, NA0, _}, {B, NB0, _}] = Before,
    ?assert(NA > NA0 andalso NB > NB0),
    %% a finished test stays finished after another crash
    crash_server(),
    {ok, #{decision := {winner, B}, status := finished}} = dspex_models:results(T),
    ?assertEqual([{ok, A}], lists:usort(routing(N, lists:seq(1, 200)))).

decide(N, T, Profile, Rand, Round, Max) when Round =< Max ->
    R1 = traffic(N, lists:seq(Round * 2000, Round * 2000 + 1999), Profile, Rand),
    ok = dspex_models:evaluate(),
    case dspex_models:results(T) of
        {ok, #{status := finished}} -> ok;
        {ok, _} -> decide(N, T, Profile, R1, Round + 1, Max)
    end;
decide(_, T, _, _, _, _) -> erlang:error({undecided, dspex_models:results(T)}).

rollout_survives_crash() ->
    {N, _A, B} = setup_name(<<"pro">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{salt => <<"pr6">>, steps => [5, 20, 50, 100], step_duration => 1000,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02}]}),
    Users = lists:seq(1, 20000),
    Good = fun(_) -> {0.98, 20} end,
    R1 = to_step(N, R, 2, Users, Good, rand:seed_s(exsss, {19, 5, 2}), 10),
    {ok, #{step := 2, percent := 20, status := running}} = dspex_models:results(R),
    ok = dspex_models:pause(R, #{principal => <<"ops">>}),
    Route = routing(N, Users),
    Before = arm_ns(R),
    crash_server(),
    {ok, #{step := 2, percent := 20, status := paused, decision := continue}} = dspex_models:results(R),
    ?assertEqual(Route, routing(N, Users)),
    ?assertEqual(Before, arm_ns(R)),
    %% still paused: time and good traffic do not move it
    R2 = traffic(N, Users, Good, R1),
    _ = dspex_manual_clock:advance(1000),
    ok = dspex_models:evaluate(),
    {ok, #{step := 2, status := paused}} = dspex_models:results(R),
    ok = dspex_models:resume(R),
    ramp(N, R, Users, Good, R2, 10),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, production)),
    crash_server(),
    {ok, #{decision := completed, percent := 100}} = dspex_models:results(R),
    ?assertEqual([{ok, B}], lists:usort(routing(N, lists:seq(1, 500)))).

%% traffic rounds until the rollout is at step Step
to_step(N, R, Step, Users, Profile, Rand, Max) when Max > 0 ->
    case dspex_models:results(R) of
        {ok, #{step := Step, status := running}} -> Rand;
        {ok, #{status := running}} ->
            R1 = traffic(N, Users, Profile, Rand),
            _ = dspex_manual_clock:advance(1000),
            ok = dspex_models:evaluate(),
            to_step(N, R, Step, Users, Profile, R1, Max - 1);
        Other -> erlang:error({not_at_step, Step, Other})
    end;
to_step(_, R, Step, _, _, _, _) -> erlang:error({not_at_step, Step, dspex_models:results(R)}).

ramp(N, R, Users, Profile, Rand, Max) when Max > 0 ->
    R1 = traffic(N, Users, Profile, Rand),
    _ = dspex_manual_clock:advance(1000),
    ok = dspex_models:evaluate(),
    case dspex_models:results(R) of
        {ok, #{status := finished, decision := completed}} -> ok;
        {ok, #{status := finished} = Res} -> erlang:error({ended, Res});
        {ok, _} -> ramp(N, R, Users, Profile, R1, Max - 1)
    end;
ramp(_, R, _, _, _, _) -> erlang:error({not_finished, dspex_models:results(R)}).

checkpoint_bound() ->
    {N, A, B} = setup_name(<<"pck">>),
    {ok, T} = dspex_models:start_ab_test(#{salt => <<"p2">>, model => N, variants => [{A, 1}, {B, 1}]}),
    [ok = dspex_models:record_inference(A, 10, true, #{}) || _ <- lists:seq(1, 30)],
    %% results/1 evaluates, and an evaluation checkpoints
    [{A, 30, 30}, {B, 0, 0}] = arm_ns(T),
    [ok = dspex_models:record_inference(A, 10, false, #{}) || _ <- lists:seq(1, 7)],
    [ok = dspex_models:record_inference(B, 10, true, #{}) || _ <- lists:seq(1, 5)],
    crash_server(),
    %% the 12 inferences recorded after the checkpoint are gone, no more
    ?assertEqual([{A, 30, 30}, {B, 0, 0}], arm_ns(T)),
    ok = dspex_models:stop_test(T).

app_restart() ->
    {N, _A, B} = setup_name(<<"pap">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{salt => <<"pr7">>, steps => [5, 20, 50, 100], step_duration => 1000,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02}]}),
    Users = lists:seq(1, 20000),
    Good = fun(_) -> {0.98, 20} end,
    R1 = to_step(N, R, 2, Users, Good, rand:seed_s(exsss, {19, 5, 7}), 10),
    Route = routing(N, Users),
    Before = arm_ns(R),
    ok = application:stop(dspex_bridge),
    ok = dspex_models_registry_tests:start(),
    {ok, #{step := 2, percent := 20, status := running}} = dspex_models:results(R),
    ?assertEqual(Route, routing(N, Users)),
    ?assertEqual(Before, arm_ns(R)),
    ramp(N, R, Users, Good, R1, 10),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, production)).

%% this test's records in the models session, in log order
events(Id, Types) ->
    ok = dspex_events:await(),
    Opts = #{variable => <<"test:", Id/binary>>, limit => 100},
    {ok, Evs} = dspex_events:read(dspex_models:registry_session(),
                                  case Types of
                                      all -> Opts;
                                      _ -> Opts#{types => Types}
                                  end),
    Evs.

summary(Evs) ->
    [{Type, maps:with([step, percent, decision, reason], Data)} || #{type := Type, data := Data} <- Evs].

events_ab() ->
    {N, A, B} = setup_name(<<"pea">>),
    {ok, T} = dspex_models:start_ab_test(#{salt => <<"p3">>, model => N, variants => [{A, 50}, {B, 50}], mde => 0.05,
                                           principal => <<"ann">>}),
    decide(N, T, fun(M) when M =:= A -> {0.80, 20}; (_) -> {0.90, 20} end,
           rand:seed_s(exsss, {19, 5, 3}), 1, 30),
    [Start, Decision] = events(T, [model_test_started, model_decision]),
    ?assertMatch(#{type := model_test_started, data := #{id := T, name := N, models := [A, B]},
                   metadata := #{principal := <<"ann">>}}, Start),
    ?assertMatch(#{type := model_decision, data := #{decision := {winner, B}, p_value := P}}
                   when P =< 0.05, Decision),
    ?assertMatch(#{metadata := #{changed_by := dspex_models_server}}, Decision),
    ?assert(maps:get(sequence, Start) < maps:get(sequence, Decision)).

events_rollout() ->
    {N, _A, B} = setup_name(<<"per">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{salt => <<"pr8">>, steps => [10, 50, 100], step_duration => 1000,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02}]}),
    Users = lists:seq(1, 20000),
    Good = fun(_) -> {0.98, 20} end,
    R1 = traffic(N, Users, Good, rand:seed_s(exsss, {19, 5, 4})),
    ok = dspex_models:pause(R, #{principal => <<"bob">>, changed_by => pager}),
    ok = dspex_models:resume(R, #{principal => <<"bob">>}),
    ramp(N, R, Users, Good, R1, 10),
    Evs = events(R, all),
    ?assertEqual([{rollout_started, #{percent => 10, decision => continue}},
                  {rollout_paused, #{step => 1, decision => continue}},
                  {rollout_resumed, #{step => 1, decision => continue}},
                  {rollout_step, #{step => 2, percent => 50, decision => continue}},
                  {rollout_step, #{step => 3, percent => 100, decision => completed}},
                  {rollout_completed, #{step => 3, decision => completed}}],
                 [E || {Type, _} = E <- summary(Evs), Type =/= variable_updated,
                       Type =/= variable_registered]),
    [Paused, Resumed] = [E || #{type := Ty} = E <- Evs, Ty =:= rollout_paused orelse Ty =:= rollout_resumed],
    ?assertMatch(#{metadata := #{principal := <<"bob">>, changed_by := pager}}, Paused),
    ?assertMatch(#{metadata := #{principal := <<"bob">>, changed_by := manual}}, Resumed),
    [Completed] = [E || #{type := rollout_completed} = E <- Evs],
    ?assertMatch(#{metadata := #{changed_by := dspex_models_server}}, Completed).

events_rollback() ->
    {N, A, B} = setup_name(<<"peb">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{salt => <<"pr9">>, steps => [5, 100], step_duration => 0,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02}]}),
    _ = traffic(N, lists:seq(1, 20000), fun(M) when M =:= A -> {0.98, 20}; (_) -> {0.80, 20} end,
                rand:seed_s(exsss, {19, 5, 5})),
    ok = dspex_models:evaluate(),
    ?assertEqual([{rollout_started, #{percent => 5, decision => continue}},
                  {rollout_rolled_back, #{step => 1, reason => {gate, error_rate},
                                          decision => {rolled_back, {gate, error_rate}}}}],
                 summary(events(R, [rollout_started, rollout_rolled_back, rollout_step]))),
    {ok, R2} = dspex_models:start_rollout(N, B, #{salt => <<"pr10">>, steps => [5, 100]}),
    ok = dspex_models:rollback(R2, #{principal => <<"cy">>}),
    [#{data := #{reason := manual}, metadata := #{principal := <<"cy">>, changed_by := manual}}] =
        events(R2, [rollout_rolled_back]),
    {ok, T} = dspex_models:start_ab_test(#{salt => <<"p4">>, model => N, variants => [{A, 1}, {B, 1}]}),
    ok = dspex_models:stop_test(T, #{principal => <<"dee">>}),
    [#{data := #{decision := {stopped, manual}}, metadata := #{principal := <<"dee">>}}] =
        events(T, [model_decision]),
    %% an SRM stop is a decision too
    {ok, T2} = dspex_models:start_ab_test(#{salt => <<"p5">>, model => N, variants => [{A, 1}, {B, 1}], min_samples => 100}),
    _ = traffic(N, lists:seq(1, 2000), fun(_) -> {0.9, 20} end, rand:seed_s(exsss, {19, 5, 6})),
    [ok = dspex_models:record_inference(A, 20, true, #{}) || _ <- lists:seq(1, 600)],
    {ok, #{decision := {stopped, srm}}} = dspex_models:results(T2),
    [#{data := #{decision := {stopped, srm}, srm := #{p := P}}}] = events(T2, [model_decision]),
    ?assert(P < 0.001),
    %% no_difference: both arms at max_samples without a winner
    {ok, T3} = dspex_models:start_ab_test(#{salt => <<"p6">>, model => N, variants => [{A, 1}, {B, 1}],
                                            min_samples => 100, max_samples => 150}),
    _ = traffic(N, lists:seq(1, 600), fun(_) -> {0.9, 20} end, rand:seed_s(exsss, {19, 5, 8})),
    {ok, #{decision := no_difference}} = dspex_models:results(T3),
    [#{data := #{decision := no_difference}, metadata := #{changed_by := dspex_models_server}}] =
        events(T3, [model_decision]),
    %% max_duration
    Now = dspex_manual_clock:now_ms(),
    {ok, T4} = dspex_models:start_ab_test(#{salt => <<"p7">>, model => N, variants => [{A, 1}, {B, 1}],
                                            max_duration => 5000}),
    dspex_manual_clock:set(Now + 5000),
    {ok, #{decision := {stopped, max_duration}}} = dspex_models:results(T4),
    [#{data := #{decision := {stopped, max_duration}}}] = events(T4, [model_decision]).

poisoned_stored_test() ->
    {N, A, B} = setup_name(<<"poi">>),
    {N2, C, D} = setup_name(<<"poi2">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    {ok, T2} = dspex_models:start_ab_test(#{model => N2, variants => [{C, 1}, {D, 1}]}),
    [ok = dspex_models:record_inference(C, 10, true, #{}) || _ <- lists:seq(1, 20)],
    ok = dspex_models:evaluate(),
    Session = dspex_models:registry_session(),
    Var = <<"test:", T/binary>>,
    {ok, #{metadata := #{test := Stored}}} = dspex_store:get(Session, Var),
    Poison = fun(Ws) ->
                     {ok, _} = dspex_store:set(Session, Var, <<"running">>,
                                               #{metadata => #{test => Stored#{weights => Ws}}}),
                     reload_server()
             end,
    %% what an older release stored: weights whose sum overflows (each load
    %% crashed, the supervisor gave up and the application stopped). The
    %% split only needs their ratio: it runs.
    Poison([1.0e308, 1.0e308]),
    ?assertMatch(#{T := #{status := running}, T2 := #{status := running}}, dspex_models:list_tests()),
    ?assertEqual([{ok, A}, {ok, B}], lists:usort(routing(N, lists:seq(1, 200)))),
    %% weights no split can be built from: finished, the name back on production
    Poison([1 bsl 1100, 0.5]),
    ?assertMatch(#{T := #{status := finished, decision := {stopped, invalid}}, T2 := #{status := running}},
                 dspex_models:list_tests()),
    ?assertEqual([{ok, A}], lists:usort(routing(N, lists:seq(1, 200)))),
    [{C, 20, 20}, {D, 0, 0}] = arm_ns(T2),
    {ok, T3} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    ok = dspex_models:stop_test(T3),
    ok = dspex_models:stop_test(T2),
    %% later tests' crashes need not log it again
    ok = dspex_store:delete(Session, Var).

layout1_checkpoints() ->
    {N, A, B} = setup_name(<<"pl1">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], min_samples => 1000}),
    [ok = dspex_models:record_inference(B, 10, true, #{}) || _ <- lists:seq(1, 3)],
    [{A, 0, 0}, {B, 3, 3}] = arm_ns(T),
    %% another node's checkpoint as an older release wrote it: 263 slots an
    %% arm, no `layout'; slot 264 is the second arm's count
    Session = dspex_models:registry_session(),
    Old = [{1, 7}, {2, 5}, {263 + 1, 4}, {263 + 2, 4}, {263 + 3, 9210340}],
    {ok, _} = dspex_store:register(Session, <<"counts:", T/binary, ":old@host">>, string, <<"old@host">>,
                                   #{metadata => #{counts => Old}, history_limit => 0}),
    [{A, 7, 5}, {B, 7, 7}] = arm_ns(T),
    %% and this node's own, restored after a crash
    Mine = <<"counts:", T/binary, ":", (atom_to_binary(node()))/binary>>,
    ok = dspex_store:delete(Session, Mine),
    {ok, _} = dspex_store:register(Session, Mine, string, atom_to_binary(node()),
                                   #{metadata => #{counts => [{263 + 1, 3}, {263 + 2, 3}]}, history_limit => 0}),
    reload_server(),
    [{A, 7, 5}, {B, 7, 7}] = arm_ns(T),
    ok = dspex_models:stop_test(T).

call_fails_alone() ->
    {N, A, B} = setup_name(<<"pcf">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    Session = dspex_models:registry_session(),
    Var = <<"test:", T/binary>>,
    {ok, #{metadata := #{test := Stored}}} = dspex_store:get(Session, Var),
    %% routable, but without the statistics' spec and last look
    {ok, _} = dspex_store:set(Session, Var, <<"running">>,
                              #{metadata => #{test => maps:without([spec, last], Stored)}}),
    reload_server(),
    Pid = whereis(dspex_models_server),
    [ok = dspex_models:record_inference(A, 10, true, #{}) || _ <- lists:seq(1, 5)],
    ?assertMatch({error, {internal, _}}, dspex_models:results(T)),
    ?assertEqual(Pid, whereis(dspex_models_server)),
    %% its live counts were not lost with a process
    {ok, #{metadata := #{counts := [{1, 5}, {2, 5} | _]}}} =
        dspex_store:get(Session, <<"counts:", T/binary, ":", (atom_to_binary(node()))/binary>>),
    ok = dspex_models:stop_test(T),
    ok = dspex_store:delete(Session, Var).
