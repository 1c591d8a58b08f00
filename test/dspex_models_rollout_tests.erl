%% @doc EUnit tests of experiments and rollouts end to end: traffic through
%% `select_model/2' and `record_inference/4' (seeded), decisions through
%% `evaluate/0' / `results/1', telemetry, routing after each decision.
-module(dspex_models_rollout_tests).

-include_lib("eunit/include/eunit.hrl").

-import(dspex_models_registry_tests, [uniq/1]).
%% a name with two registered versions, the first in production (also for dspex_models_persist_tests)
-export([setup_name/1]).

models_test_() ->
    {setup, fun dspex_models_registry_tests:start/0, fun(_) -> ok end,
     [{"A/B: the better variant wins, with a decision event; routing reverts", fun ab_winner/0},
      {"A/B on latency: the faster variant wins", fun ab_latency/0},
      {"A/B on a custom metric", fun ab_custom/0},
      {"A/B: a broken split is stopped by the SRM check", fun ab_srm/0},
      {"A/B: max_duration stops the test", fun ab_max_duration/0},
      {"rollout: a degrading model is rolled back within its first step", fun rollout_degrading/0},
      {"rollout: a slower model is rolled back by the latency gate", fun rollout_slower/0},
      {"rollout: a model with the same median but a heavier tail is rolled back by the p95 gate",
       fun rollout_tail/0},
      {"rollout: a good model reaches 100% and becomes production; units stay put across ramps",
       fun rollout_good/0},
      {"rollout: a step lasts at least step_duration", fun rollout_step_duration/0},
      {"rollout: pause, resume, rollback by hand", fun rollout_manual/0},
      {"rollout: steps [100] moves everyone and completes at its first evaluation", fun rollout_all_at_once/0},
      {"rollout: a p95 gate with a huge max_degradation passes", fun rollout_p95_huge/0},
      {"archiving a model of a running test or rollout is refused", fun archive_in_use/0},
      {"rollout: a new model archived behind the server's back is not promoted", fun rollout_archived_new/0},
      {"A/B on a constant latency: no evidence, no winner", fun ab_constant_latency/0}]}.

setup_name(Prefix) ->
    N = uniq(Prefix),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"1">>}),
    {ok, B} = dspex_models:register_model(#{name => N, version => <<"2">>}),
    ok = dspex_models:set_alias(N, production, A),
    {N, A, B}.

%% telemetry of dspex_models to this process
listen(Events) ->
    Self = self(),
    Id = {?MODULE, make_ref()},
    ok = dspex_telemetry:attach_many(Id, Events, fun(E, M, Md, _) -> Self ! {tel, E, M, Md} end, undefined),
    Id.

%% Users From..To make one request each; Profile(Model) -> {SuccessProb, MedianMs}
traffic(N, Users, Profile, Rand0) ->
    lists:foldl(
      fun(U, R0) ->
              {ok, M} = dspex_models:select_model(N, #{user_id => U}),
              {P, Med, Sigma} = case Profile(M) of
                                    {P0, Med0} -> {P0, Med0, 0.3};
                                    Full -> Full
                                end,
              {U1, R1} = rand:uniform_s(R0),
              {G, R2} = rand:normal_s(R1),
              {G2, R3} = rand:normal_s(R2),
              ok = dspex_models:record_inference(M, Med * math:exp(Sigma * G), U1 < P, #{score => P + 0.2 * G2}),
              R3
      end, Rand0, Users).

ab_winner() ->
    {N, A, B} = setup_name(<<"abw">>),
    H = listen([[dspex, models, decision]]),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 50}, {B, 50}], mde => 0.05}),
    Profile = fun(M) when M =:= A -> {0.80, 20}; (_) -> {0.90, 20} end,
    decide(N, T, Profile, rand:seed_s(exsss, {19, 1, 1}), 1, 40),
    {ok, #{decision := D, status := finished, comparisons := #{B := C}, p_value := P}} = dspex_models:results(T),
    ?assertEqual({winner, B}, D),
    ?assert(P =< 0.05),
    #{effect := E, ci := {Lo, Hi}} = C,
    ?assert(Lo > 0 andalso Lo < E andalso E < Hi),
    receive {tel, [dspex, models, decision], _, #{id := T, decision := {winner, B}}} -> ok
    after 5000 -> erlang:error(no_decision_event)
    end,
    dspex_telemetry:detach(H),
    %% the split is over: production for everyone
    ?assertEqual([{ok, A}], lists:usort([dspex_models:select_model(N, #{user_id => U}) || U <- lists:seq(1, 200)])).

%% rounds of 2,000 users until the test decides (at most MaxRounds)
decide(N, T, Profile, Rand, Round, MaxRounds) when Round =< MaxRounds ->
    Users = lists:seq(Round * 2000, Round * 2000 + 1999),
    R1 = traffic(N, Users, Profile, Rand),
    ok = dspex_models:evaluate(),
    case dspex_models:results(T) of
        {ok, #{status := finished}} -> Round;
        {ok, _} -> decide(N, T, Profile, R1, Round + 1, MaxRounds)
    end;
decide(_, T, _, _, _, _) ->
    erlang:error({undecided, dspex_models:results(T)}).

ab_latency() ->
    {N, A, B} = setup_name(<<"abl">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], metric => latency, mde => 0.05}),
    decide(N, T, fun(M) when M =:= A -> {0.9, 30}; (_) -> {0.9, 25} end, rand:seed_s(exsss, {19, 1, 2}), 1, 20),
    {ok, #{decision := {winner, B}, comparisons := #{B := #{ratio := Ratio, ratio_ci := {RLo, RHi}}}}} =
        dspex_models:results(T),
    ?assert(RLo < Ratio andalso Ratio < RHi andalso RHi < 1.0),
    ?assert(abs(Ratio - 25 / 30) < 0.05).

ab_custom() ->
    {N, A, B} = setup_name(<<"abc">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], metric => {custom, score},
                                           mde => 0.02}),
    %% score = the profile's success probability plus N(0, 0.2^2) noise
    decide(N, T, fun(M) when M =:= A -> {0.5, 10}; (_) -> {0.6, 10} end, rand:seed_s(exsss, {19, 1, 3}), 1, 5),
    {ok, #{decision := {winner, B}}} = dspex_models:results(T).

ab_srm() ->
    {N, A, B} = setup_name(<<"srm">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], min_samples => 100}),
    %% a broken split: A's inferences are logged twice as often (e.g. a retry loop)
    R = traffic(N, lists:seq(1, 2000), fun(_) -> {0.9, 20} end, rand:seed_s(exsss, {19, 1, 4})),
    _ = R,
    [ok = dspex_models:record_inference(A, 20, true, #{}) || _ <- lists:seq(1, 600)],
    {ok, #{decision := {stopped, srm}, srm := #{p := P}}} = dspex_models:results(T),
    ?assert(P < 0.001),
    %% nothing of B was lost: it is still counted in the frozen arms
    {ok, #{arm_summary := [{A, #{n := NA}}, {B, #{n := NB}}]}} = dspex_models:results(T),
    ?assert(NA > NB).

ab_max_duration() ->
    {N, A, B} = setup_name(<<"dur">>),
    Now = dspex_manual_clock:now_ms(),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], max_duration => 60000}),
    ok = dspex_models:evaluate(),
    {ok, #{decision := continue}} = dspex_models:results(T),
    dspex_manual_clock:set(Now + 60000),
    {ok, #{decision := {stopped, max_duration}, status := finished}} = dspex_models:results(T).

rollout_degrading() ->
    {N, A, B} = setup_name(<<"deg">>),
    H = listen([[dspex, models, rollout, rollback], [dspex, models, rollout, step]]),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [5, 25, 50, 100], step_duration => 0,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02}]}),
    %% the new model fails 20% of requests, the baseline 2%
    Profile = fun(M) when M =:= A -> {0.98, 20}; (_) -> {0.80, 20} end,
    _ = traffic(N, lists:seq(1, 20000), Profile, rand:seed_s(exsss, {19, 2, 1})),
    ok = dspex_models:evaluate(),
    {ok, #{decision := {rolled_back, {gate, error_rate}}, step := 1, percent := 0,
           gates := [#{verdict := fail, ci := {Lo, _}}]}} = dspex_models:results(R),
    ?assert(Lo > 0.02),
    receive {tel, [dspex, models, rollout, rollback], _, #{id := R, reason := {gate, error_rate}, step := 1}} -> ok
    after 5000 -> erlang:error(no_rollback_alert)
    end,
    receive {tel, [dspex, models, rollout, step], _, _} = Step -> erlang:error({advanced, Step})
    after 0 -> ok
    end,
    dspex_telemetry:detach(H),
    ?assertEqual([{ok, A}], lists:usort([dspex_models:select_model(N, #{user_id => U}) || U <- lists:seq(1, 500)])),
    ?assertEqual({ok, A}, dspex_models:get_alias(N, production)).

rollout_slower() ->
    {N, A, B} = setup_name(<<"slow">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [10, 100], step_duration => 0,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02},
                                                            #{metric => latency, max_degradation => 0.10}]}),
    Profile = fun(M) when M =:= A -> {0.98, 20}; (_) -> {0.98, 30} end,
    _ = traffic(N, lists:seq(1, 20000), Profile, rand:seed_s(exsss, {19, 2, 2})),
    ok = dspex_models:evaluate(),
    {ok, #{decision := {rolled_back, {gate, latency}}, step := 1}} = dspex_models:results(R).

rollout_tail() ->
    {N, A, B} = setup_name(<<"tail">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [10, 100], step_duration => 0,
                                                  gates => [#{metric => latency, max_degradation => 0.10},
                                                            #{metric => latency_p95, max_degradation => 0.20}]}),
    %% same median (20 ms), p95 about 33 ms for the baseline and 75 ms for the new model
    Profile = fun(M) when M =:= A -> {0.98, 20, 0.3}; (_) -> {0.98, 20, 0.8} end,
    _ = traffic(N, lists:seq(1, 20000), Profile, rand:seed_s(exsss, {19, 2, 7})),
    ok = dspex_models:evaluate(),
    {ok, #{decision := {rolled_back, {gate, latency_p95}}, step := 1,
           gates := [#{metric := latency, verdict := LatVerdict},
                     #{metric := latency_p95, verdict := fail, exceed_rate := Rate,
                       p95_baseline_ms := PB, p95_new_ms := PN}]}} = dspex_models:results(R),
    ?assertNotEqual(fail, LatVerdict),
    ?assert(Rate > 0.1),
    ?assert(abs(PB - 32.8) / 32.8 < 0.1),
    ?assert(abs(PN - 74.6) / 74.6 < 0.15).

rollout_good() ->
    {N, A, B} = setup_name(<<"good">>),
    H = listen([[dspex, models, rollout, step], [dspex, models, rollout, complete]]),
    Steps = [5, 20, 50, 100],
    %% steps advance only when this test moves the manual clock (a periodic
    %% evaluation in between cannot skip one)
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => Steps, step_duration => 1000,
                                                  gates => [#{metric => error_rate, max_degradation => 0.02},
                                                            #{metric => latency_p95, max_degradation => 0.20}]}),
    Profile = fun(_) -> {0.98, 20} end,
    Users = lists:seq(1, 20000),
    OnNew = fun() -> [U || U <- Users, dspex_models:select_model(N, #{user_id => U}) =:= {ok, B}] end,
    Seen = ramp(N, R, Profile, Users, OnNew, rand:seed_s(exsss, {19, 2, 3}), 1, 30, []),
    %% every step was visited in order, each at its share of units
    ?assertEqual([5, 20, 50], [P || {P, _} <- Seen]),
    lists:foreach(fun({P, Us}) ->
                          Share = length(Us) / length(Users),
                          ?assert(abs(Share - P / 100) < 0.02)
                  end, Seen),
    %% stickiness: a unit on the new model stays there when the share grows
    Sets = [sets:from_list(Us) || {_, Us} <- Seen],
    lists:foreach(fun({S1, S2}) -> ?assert(sets:is_subset(S1, S2)) end,
                  lists:zip(lists:droplast(Sets), tl(Sets))),
    {ok, #{decision := completed, percent := 100}} = dspex_models:results(R),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, production)),
    ?assertEqual(length(Users), length(OnNew())),
    receive {tel, [dspex, models, rollout, complete], _, #{id := R, model := B}} -> ok
    after 5000 -> erlang:error(no_complete_event)
    end,
    dspex_telemetry:detach(H),
    _ = A.

%% traffic rounds until the rollout ends; records who is on the new model at
%% each step reached
ramp(N, R, Profile, Users, OnNew, Rand, Round, Max, Seen) when Round =< Max ->
    {ok, #{percent := P0}} = dspex_models:results(R),
    Seen1 = case Seen of
                [{P0, _} | _] -> Seen;
                _ -> [{P0, OnNew()} | Seen]
            end,
    R1 = traffic(N, Users, Profile, Rand),
    _ = dspex_manual_clock:advance(1000),
    ok = dspex_models:evaluate(),
    case dspex_models:results(R) of
        {ok, #{status := finished, decision := completed}} -> lists:reverse(Seen1);
        {ok, #{status := finished} = Res} -> erlang:error({ended, Res});
        {ok, _} -> ramp(N, R, Profile, Users, OnNew, R1, Round + 1, Max, Seen1)
    end;
ramp(_, R, _, _, _, _, _, _, _) -> erlang:error({not_finished, dspex_models:results(R)}).

rollout_step_duration() ->
    {N, _A, B} = setup_name(<<"sd">>),
    T0 = dspex_manual_clock:now_ms(),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [10, 50, 100], step_duration => 60000,
                                                  gates => [#{metric => error_rate, max_degradation => 0.05}]}),
    _ = traffic(N, lists:seq(1, 20000), fun(_) -> {0.99, 20} end, rand:seed_s(exsss, {19, 2, 5})),
    ok = dspex_models:evaluate(),
    {ok, #{step := 1, gates := [#{verdict := pass}]}} = dspex_models:results(R),
    dspex_manual_clock:set(T0 + 59999),
    {ok, #{step := 1}} = dspex_models:results(R),
    dspex_manual_clock:set(T0 + 60000),
    {ok, #{step := 2, percent := 50}} = dspex_models:results(R),
    %% the next step needs its own time and its own samples of the new model
    dspex_manual_clock:set(T0 + 120000),
    {ok, #{step := 2}} = dspex_models:results(R),
    _ = traffic(N, lists:seq(1, 2000), fun(_) -> {0.99, 20} end, rand:seed_s(exsss, {19, 2, 6})),
    {ok, #{status := finished, decision := completed}} = dspex_models:results(R).

rollout_manual() ->
    {N, A, B} = setup_name(<<"man">>),
    H = listen([[dspex, models, rollout, rollback]]),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [10, 100], step_duration => 0,
                                                  gates => [#{metric => error_rate, max_degradation => 0.05}]}),
    ok = dspex_models:pause(R),
    ?assertEqual({error, not_running}, dspex_models:pause(R)),
    %% paused: even a clearly good model does not advance
    _ = traffic(N, lists:seq(1, 20000), fun(_) -> {0.99, 20} end, rand:seed_s(exsss, {19, 2, 4})),
    ok = dspex_models:evaluate(),
    {ok, #{status := paused, step := 1, percent := 10, gates := [#{verdict := pass}]}} = dspex_models:results(R),
    OnB = length([U || U <- lists:seq(1, 5000), dspex_models:select_model(N, #{user_id => U}) =:= {ok, B}]),
    ?assert(OnB > 300 andalso OnB < 700),
    ok = dspex_models:resume(R),
    ok = dspex_models:rollback(R),
    {ok, #{decision := {rolled_back, manual}, percent := 0}} = dspex_models:results(R),
    receive {tel, [dspex, models, rollout, rollback], _, #{id := R, reason := manual}} -> ok
    after 5000 -> erlang:error(no_rollback_event)
    end,
    dspex_telemetry:detach(H),
    ?assertEqual({error, finished}, dspex_models:rollback(R)),
    ?assertEqual([{ok, A}], lists:usort([dspex_models:select_model(N, #{user_id => U}) || U <- lists:seq(1, 500)])),
    %% errors
    ?assertEqual({error, {already_production, A}}, dspex_models:start_rollout(N, A, #{})),
    ?assertEqual({error, {invalid_argument, steps}}, dspex_models:start_rollout(N, B, #{steps => [50, 10]})),
    ?assertEqual({error, {no_production, <<"nobody">>}}, dspex_models:start_rollout(<<"nobody">>, B, #{})).

rollout_all_at_once() ->
    {N, _A, B} = setup_name(<<"all">>),
    H = listen([[dspex, models, rollout, complete]]),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [100], step_duration => 0, min_samples => 10}),
    ?assertEqual([{ok, B}], lists:usort([dspex_models:select_model(N, #{user_id => U}) || U <- lists:seq(1, 200)])),
    ok = dspex_models:evaluate(),
    {ok, #{status := finished, decision := completed, percent := 100, step := 1}} = dspex_models:results(R),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, production)),
    receive {tel, [dspex, models, rollout, complete], _, #{id := R, model := B}} -> ok
    after 5000 -> erlang:error(no_complete_event)
    end,
    dspex_telemetry:detach(H).

rollout_p95_huge() ->
    {N, _A, B} = setup_name(<<"p95h">>),
    ?assertEqual({error, {invalid_argument, gates}},
                 dspex_models:start_rollout(N, B, #{gates => [#{metric => latency_p95, max_degradation => 1.0e7}]})),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [50, 100], step_duration => 0, min_samples => 10,
                                                  gates => [#{metric => latency_p95, max_degradation => 1.0e6}]}),
    _ = traffic(N, lists:seq(1, 2000), fun(_) -> {0.99, 20} end, rand:seed_s(exsss, {19, 2, 8})),
    ok = dspex_models:evaluate(),
    %% a threshold of 1e6 times the baseline's p95 is above every bucket: none exceed
    {ok, #{status := finished, decision := completed, gates := [#{verdict := pass, exceed_rate := 0.0}]}} =
        dspex_models:results(R),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, production)).

archive_in_use() ->
    {N, A, B} = setup_name(<<"arch">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}]}),
    ?assertEqual({error, {in_use, T}}, dspex_models:archive_model(B)),
    ?assertEqual({error, {in_use, T}}, dspex_models:archive_model(A)),
    {ok, #{status := active}} = dspex_models:get_model(B),
    ok = dspex_models:stop_test(T),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [50, 100], step_duration => 0}),
    ?assertEqual({error, {in_use, R}}, dspex_models:archive_model(B)),
    ok = dspex_models:pause(R),
    ?assertEqual({error, {in_use, R}}, dspex_models:archive_model(B)),
    ok = dspex_models:rollback(R),
    ok = dspex_models:archive_model(B),
    {ok, #{status := archived}} = dspex_models:get_model(B),
    ?assertEqual({error, {archived, B}}, dspex_models:start_rollout(N, B, #{})).

rollout_archived_new() ->
    {N, A, B} = setup_name(<<"parch">>),
    {ok, R} = dspex_models:start_rollout(N, B, #{steps => [50, 100], step_duration => 0,
                                                  gates => [#{metric => error_rate, max_degradation => 0.05}]}),
    %% archived by a write that did not go through the server (an older node)
    {ok, _} = dspex_store:set(dspex_models:registry_session(), <<"model:", B/binary>>, B,
                              #{metadata => #{status => archived}}),
    _ = traffic(N, lists:seq(1, 20000), fun(_) -> {0.99, 20} end, rand:seed_s(exsss, {19, 2, 9})),
    ok = dspex_models:evaluate(),
    %% it was `completed' with production left on A
    {ok, #{status := finished, decision := {rolled_back, {promote_failed, {archived, B}}}, percent := 0}} =
        dspex_models:results(R),
    ?assertEqual({ok, A}, dspex_models:get_alias(N, production)),
    ?assertEqual([{ok, A}], lists:usort([dspex_models:select_model(N, #{user_id => U}) || U <- lists:seq(1, 500)])).

ab_constant_latency() ->
    {N, A, B} = setup_name(<<"cl">>),
    {ok, T} = dspex_models:start_ab_test(#{model => N, variants => [{A, 1}, {B, 1}], metric => latency,
                                           min_samples => 100}),
    [ok = dspex_models:record_inference(A, 10, true, #{}) || _ <- lists:seq(1, 200)],
    [ok = dspex_models:record_inference(B, 11, true, #{}) || _ <- lists:seq(1, 200)],
    %% was p 0.0 and {winner, A}
    {ok, #{status := running, decision := continue, p_value := 1.0}} = dspex_models:results(T),
    ok = dspex_models:stop_test(T).
