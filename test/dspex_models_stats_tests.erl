%% @doc EUnit tests of `dspex_models_stats': simulations with fixed seeds
%% (A/A false-positive rate under continuous monitoring, the same for a
%% peeked fixed-horizon z-test, power at the documented sample size, SRM) and
%% agreement with python3-statsmodels/scipy (test/python_models/check_stats.py).
-module(dspex_models_stats_tests).

-include_lib("eunit/include/eunit.hrl").

-define(ALPHA, 0.05).

stats_test_() ->
    [{"normal quantile and chi-square tail", fun special_functions/0},
     {"mSPRT: p = 1/Lambda, interval holds exactly the thetas it does not reject", fun msprt_duality/0},
     {"min_samples, winner direction, equivalence, horizon", fun decisions/0},
     {"SRM: a broken split stops the test, a fair one does not", fun srm/0},
     {timeout, 120, {"1,000 A/A tests peeked every 100 samples: mSPRT keeps alpha, "
                     "a peeked z-test does not", fun aa_simulation/0}},
     {timeout, 120, {"power >= 80% for 90% -> 88% within required_samples/1", fun power_simulation/0}},
     {timeout, 120, {"the confidence sequence covers the true effect at every look", fun coverage_simulation/0}},
     {timeout, 120, {"400 A/A latency tests peeked every 100 samples keep alpha", fun aa_latency_simulation/0}},
     {timeout, 60, {"fixed-horizon figures and the mixture match statsmodels/scipy", fun python_agreement/0}},
     {"extreme alpha, power and mde: every function returns a finite answer", fun extreme_inputs/0},
     {"the normal quantile keeps its precision in the lower tail", fun lower_tail_quantile/0},
     {"a constant latency is no evidence although its log is rounded", fun constant_latency/0},
     {timeout, 120, {"9.3M custom values of +-1000 in one arm: the sums do not wrap", fun custom_sums_no_wrap/0}},
     {"a layout-1 checkpoint's counts read as they were written", fun layout1_counts/0},
     {"the p95 exceedance of a threshold above the top bucket is 0", fun exceedance_huge_factor/0}].

special_functions() ->
    ?assert(abs(dspex_models_stats:normal_quantile(0.975) - 1.959963984540054) < 1.0e-12),
    ?assert(abs(dspex_models_stats:normal_quantile(0.8) - 0.8416212335729143) < 1.0e-12),
    ?assert(abs(dspex_models_stats:normal_quantile(1.0e-6) + 4.753424308822899) < 1.0e-9),
    %% chi2 sf, values from scipy.stats.chi2.sf
    ?assert(abs(dspex_models_stats:chi2_sf(3.841458820694124, 1) - 0.05) < 1.0e-12),
    ?assert(abs(dspex_models_stats:chi2_sf(5.991464547107979, 2) - 0.05) < 1.0e-12),
    ?assert(abs(dspex_models_stats:chi2_sf(1.0, 5) - 0.9625657732472964) < 1.0e-12),
    ?assert(abs(dspex_models_stats:chi2_sf(40.0, 3) - 1.065509033425585e-08) < 1.0e-20).

msprt_duality() ->
    Alpha = 0.05, Tau = 0.02, V = 1.0e-4,
    #{p := P, ci := {Lo, Hi}, log_lambda := L} = dspex_models_stats:msprt(0.03, V, Tau, Alpha),
    ?assert(abs(P - math:exp(-L)) < 1.0e-15),
    %% theta on the interval's edge: the shifted statistic has Lambda = 1/alpha
    #{p := PEdge} = dspex_models_stats:msprt(0.03 - Lo, V, Tau, Alpha),
    #{p := PEdge2} = dspex_models_stats:msprt(0.03 - Hi, V, Tau, Alpha),
    ?assert(abs(PEdge - Alpha) < 1.0e-12),
    ?assert(abs(PEdge2 - Alpha) < 1.0e-12),
    %% 0 is outside the interval exactly when p =< alpha
    ?assertEqual(P =< Alpha, Lo > 0 orelse Hi < 0),
    %% degenerate variances stay finite (no badarith in the server)
    #{p := P0} = dspex_models_stats:msprt(2000.0, 1.0e-320, 1.0e-3, 0.05),
    ?assertEqual(0.0, P0),
    #{p := 1.0} = dspex_models_stats:msprt(0.0, 1.0e-320, 1.0e-3, 0.05).

arm(N, S) -> #{n => N, successes => S}.

spec() -> #{metric => success, alpha => ?ALPHA, mde => 0.02, min_samples => 100}.

decisions() ->
    %% a large effect but below min_samples: continue
    #{decision := continue} = dspex_models_stats:evaluate([{a, arm(50, 45)}, {b, arm(50, 10)}], spec(), #{}),
    %% higher is better for success
    #{decision := {winner, a}} = dspex_models_stats:evaluate([{a, arm(2000, 1800)}, {b, arm(2000, 1500)}], spec(), #{}),
    #{decision := {winner, b}} = dspex_models_stats:evaluate([{a, arm(2000, 1500)}, {b, arm(2000, 1800)}], spec(), #{}),
    %% lower is better when asked
    #{decision := {winner, a}} = dspex_models_stats:evaluate([{a, arm(2000, 1500)}, {b, arm(2000, 1800)}],
                                                             (spec())#{direction => lower}, #{}),
    %% three arms: the best significant treatment wins
    #{decision := {winner, c}} = dspex_models_stats:evaluate(
                                   [{a, arm(3000, 2400)}, {b, arm(3000, 2550)}, {c, arm(3000, 2700)}], spec(), #{}),
    %% equivalence: the interval inside (-mde, mde) with a huge sample
    #{decision := no_difference} = dspex_models_stats:evaluate([{a, arm(400000, 360000)}, {b, arm(400000, 360100)}],
                                                               spec(), #{}),
    %% the horizon reached without a winner
    #{decision := continue} = dspex_models_stats:evaluate([{a, arm(1000, 900)}, {b, arm(1000, 905)}], spec(), #{}),
    #{decision := no_difference} = dspex_models_stats:evaluate([{a, arm(1000, 900)}, {b, arm(1000, 905)}],
                                                               (spec())#{max_samples => 1000}, #{}),
    %% zero estimated variance (a constant custom metric) is no evidence, not infinite evidence
    Const = fun(N, V) -> #{n => N, successes => 0, custom_n => N, custom_sum => N * V,
                           custom_sumsq => N * V * V} end,
    #{decision := continue, p_value := 1.0} =
        dspex_models_stats:evaluate([{a, Const(500, 0.5)}, {b, Const(500, 0.75)}],
                                    (spec())#{metric => {custom, score}}, #{}),
    %% the always-valid p-value is the running minimum
    R1 = dspex_models_stats:evaluate([{a, arm(1000, 900)}, {b, arm(1000, 880)}], spec(), #{}),
    R2 = dspex_models_stats:evaluate([{a, arm(1100, 990)}, {b, arm(1100, 990)}], spec(), R1),
    ?assertEqual(maps:get(p_value, R1), maps:get(p_value, R2)),
    ?assert(maps:get(p_value, R1) < 1.0).

srm() ->
    W = #{weights => [1, 1]},
    #{decision := {stopped, srm}} = dspex_models_stats:evaluate([{a, arm(5500, 4950)}, {b, arm(4500, 4050)}],
                                                                maps:merge(spec(), W), #{}),
    #{decision := D, srm := #{p := P}} =
        dspex_models_stats:evaluate([{a, arm(5050, 4545)}, {b, arm(4950, 4455)}], maps:merge(spec(), W), #{}),
    ?assert(P > 0.3),
    ?assertNotEqual({stopped, srm}, D),
    %% an arm that gets no traffic at all is a broken split too
    #{decision := {stopped, srm}} = dspex_models_stats:evaluate([{a, arm(300, 270)}, {b, arm(0, 0)}],
                                                                maps:merge(spec(), W), #{}),
    #{decision := continue} = dspex_models_stats:evaluate([{a, arm(6, 5)}, {b, arm(0, 0)}],
                                                          maps:merge(spec(), W), #{}),
    %% weighted split 90/10 honoured
    #{srm := #{p := P2}} = dspex_models_stats:evaluate([{a, arm(9010, 8100)}, {b, arm(990, 890)}],
                                                       maps:merge(spec(), #{weights => [90, 10]}), #{}),
    ?assert(P2 > 0.3).

%%% ------------------------------------------------------------------
%%% Simulations
%%% ------------------------------------------------------------------

%% one test: per sample a fair coin picks the arm, success with prob P0 or
%% P1; every Batch samples both tests look. Returns {MsprtRejected,
%% ZRejected, Samples} where Samples is the per-arm count at the mSPRT's
%% first rejection (or at the end).
run_test(Rand0, P0, P1, Batch, Horizon, Spec) ->
    loop(Rand0, P0, P1, Batch, Horizon, Spec, {0, 0, 0, 0}, #{}, false, false, 0).

loop(Rand, _P0, _P1, _Batch, Left, _Spec, _C, _Prev, M, Z, _Done) when Left =< 0 ->
    {M, Z, Rand};
loop(Rand0, P0, P1, Batch, Left, Spec, C0, Prev0, M0, Z0, _) ->
    {C, Rand} = draw(Batch, P0, P1, C0, Rand0),
    {N0, S0, N1, S1} = C,
    R = dspex_models_stats:evaluate([{c, arm(N0, S0)}, {t, arm(N1, S1)}], Spec, Prev0),
    M = M0 orelse is_winner(maps:get(decision, R)),
    Z = Z0 orelse (N0 >= 100 andalso N1 >= 100 andalso
                   maps:get(p, dspex_models_stats:z_test_proportions(S1, N1, S0, N0)) =< ?ALPHA),
    case M andalso Z of
        true -> {M, Z, Rand};
        false -> loop(Rand, P0, P1, Batch, Left - Batch, Spec, C, R, M, Z, false)
    end.

draw(0, _, _, C, Rand) -> {C, Rand};
draw(K, P0, P1, {N0, S0, N1, S1}, Rand0) ->
    {U1, Rand1} = rand:uniform_s(Rand0),
    {U2, Rand2} = rand:uniform_s(Rand1),
    C = case U1 < 0.5 of
            true -> {N0 + 1, S0 + ok(U2 < P0), N1, S1};
            false -> {N0, S0, N1 + 1, S1 + ok(U2 < P1)}
        end,
    draw(K - 1, P0, P1, C, Rand2).

is_winner({winner, _}) -> true;
is_winner(_) -> false.

ok(true) -> 1;
ok(false) -> 0.

aa_simulation() ->
    Runs = 1000,
    Rand0 = rand:seed_s(exsss, {19, 2026, 1}),
    {Ms, Zs, _} = lists:foldl(
                    fun(_, {M, Z, R0}) ->
                            {RM, RZ, R1} = run_test(R0, 0.9, 0.9, 100, 10000, spec()),
                            {M + ok(RM), Z + ok(RZ), R1}
                    end, {0, 0, Rand0}, lists:seq(1, Runs)),
    %% upper end of the 95% binomial interval around alpha: 50 + 1.96 sd
    Upper = Runs * ?ALPHA + 1.96 * math:sqrt(Runs * ?ALPHA * (1 - ?ALPHA)),
    ?debugFmt("A/A, 1000 tests x 100 looks: mSPRT rejected ~b, peeked z-test ~b (bound ~.1f)", [Ms, Zs, Upper]),
    ?assert(Ms =< Upper),
    ?assert(Zs > Upper).

power_simulation() ->
    N = dspex_models_stats:required_samples(#{baseline => 0.9, mde => 0.02, alpha => ?ALPHA, power => 0.8}),
    Runs = 300,
    Rand0 = rand:seed_s(exsss, {19, 2026, 2}),
    Spec = (spec())#{max_samples => N},
    %% horizon: 2N samples in all, i.e. about N per arm
    {Hits, _} = lists:foldl(
                  fun(_, {H, R0}) ->
                          {RM, _, R1} = run_test(R0, 0.9, 0.88, 100, 2 * N, Spec),
                          {H + ok(RM), R1}
                  end, {0, Rand0}, lists:seq(1, Runs)),
    ?debugFmt("power 90% -> 88% at ~b per arm: ~b of ~b detected", [N, Hits, Runs]),
    ?assert(Hits / Runs >= 0.8).

%% 500 tests of 90% vs 88%, looked at every 100 samples up to 10,000: the
%% share of tests whose interval missed -0.02 at some look (after
%% min_samples) stays within alpha's binomial bound
coverage_simulation() ->
    Runs = 500,
    Spec = spec(),
    {Missed, _} = lists:foldl(
                    fun(_, {M, R0}) ->
                            {Miss, R1} = cover_loop(R0, 100, 10000, Spec, {0, 0, 0, 0}, false),
                            {M + ok(Miss), R1}
                    end, {0, rand:seed_s(exsss, {19, 2026, 3})}, lists:seq(1, Runs)),
    Upper = Runs * ?ALPHA + 1.96 * math:sqrt(Runs * ?ALPHA * (1 - ?ALPHA)),
    ?debugFmt("coverage: ~b of ~b tests missed the true effect at some look (bound ~.1f)", [Missed, Runs, Upper]),
    ?assert(Missed =< Upper).

cover_loop(Rand, _Batch, Left, _Spec, _C, Miss) when Left =< 0; Miss -> {Miss, Rand};
cover_loop(Rand0, Batch, Left, Spec, C0, false) ->
    {C, Rand} = draw(Batch, 0.9, 0.88, C0, Rand0),
    {N0, S0, N1, S1} = C,
    Miss = N0 >= 100 andalso N1 >= 100 andalso
        begin
            #{ci := {Lo, Hi}} = dspex_models_stats:compare(arm(N0, S0), arm(N1, S1), success,
                                                           #{alpha => ?ALPHA, tau => 0.02}),
            Lo > -0.02 orelse Hi < -0.02
        end,
    cover_loop(Rand, Batch, Left - Batch, Spec, C, Miss).

%% log-normal latencies (median 20 ms, sigma 0.6) in both arms
aa_latency_simulation() ->
    Runs = 400,
    Spec = (spec())#{metric => latency, mde => 0.05},
    {Rejected, _} = lists:foldl(
                      fun(_, {K, R0}) ->
                              {Rej, R1} = lat_loop(R0, 5000, Spec, {lat_arm(), lat_arm()}, #{}),
                              {K + ok(Rej), R1}
                      end, {0, rand:seed_s(exsss, {19, 2026, 4})}, lists:seq(1, Runs)),
    Upper = Runs * ?ALPHA + 1.96 * math:sqrt(Runs * ?ALPHA * (1 - ?ALPHA)),
    ?debugFmt("A/A latency: ~b of ~b rejected (bound ~.1f)", [Rejected, Runs, Upper]),
    ?assert(Rejected =< Upper).

lat_arm() -> #{n => 0, successes => 0, lat_sum => 0.0, lat_sumsq => 0.0}.

lat_loop(Rand, Left, _Spec, _Arms, _Prev) when Left =< 0 -> {false, Rand};
lat_loop(Rand0, Left, Spec, Arms0, Prev) ->
    {Arms, Rand} = lat_draw(100, Arms0, Rand0),
    R = dspex_models_stats:evaluate([{c, element(1, Arms)}, {t, element(2, Arms)}], Spec, Prev),
    case is_winner(maps:get(decision, R)) of
        true -> {true, Rand};
        false -> lat_loop(Rand, Left - 100, Spec, Arms, R)
    end.

lat_draw(0, Arms, Rand) -> {Arms, Rand};
lat_draw(K, Arms, Rand0) ->
    {U, Rand1} = rand:uniform_s(Rand0),
    {G, Rand2} = rand:normal_s(Rand1),
    X = math:log(20) + 0.6 * G,
    I = case U < 0.5 of true -> 1; false -> 2 end,
    #{n := N, lat_sum := S, lat_sumsq := Q} = A = element(I, Arms),
    lat_draw(K - 1, setelement(I, Arms, A#{n := N + 1, lat_sum := S + X, lat_sumsq := Q + X * X}), Rand2).

%%% ------------------------------------------------------------------
%%% Agreement with statsmodels / scipy
%%% ------------------------------------------------------------------

python_agreement() ->
    Script = filename:join([root(), "test", "python_models", "check_stats.py"]),
    Props = [{1800, 2000, 1760, 2000}, {45, 500, 60, 480}, {9010, 10000, 8890, 10000}, {3, 40, 9, 41}],
    Means = [{{400, 3.1, 0.25}, {380, 3.0, 0.30}}, {{50, 10.0, 4.0}, {70, 11.5, 9.0}}],
    Chi = [{[5050, 4950], [1, 1]}, {[5500, 4500], [1, 1]}, {[900, 80, 20], [90, 8, 2]}, {[30, 40, 50], [1, 1, 1]}],
    Mix = [{0.03, 1.0e-4, 0.02}, {-0.01, 4.0e-5, 0.02}, {0.2, 0.01, 0.05}],
    Input = #{<<"proportions">> => [[X1, N1, X0, N0] || {X1, N1, X0, N0} <- Props],
              <<"means">> => [[[N1, M1, V1], [N0, M0, V0]] || {{N1, M1, V1}, {N0, M0, V0}} <- Means],
              <<"chisquare">> => [[Ns, Ws] || {Ns, Ws} <- Chi],
              <<"mixture">> => [[D, V, T] || {D, V, T} <- Mix]},
    {ok, Json} = dspex_json:encode(Input),
    In = filename:join(root(), "_build/test/models_stats_in.json"),
    ok = filelib:ensure_dir(In),
    ok = file:write_file(In, Json),
    Out = os:cmd("/usr/bin/python3 " ++ Script ++ " " ++ In ++ " 2>&1"),
    {ok, #{<<"proportions">> := PR, <<"means">> := MR, <<"chisquare">> := CR, <<"mixture">> := XR}} =
        case dspex_json:decode(list_to_binary(Out)) of
            {ok, _} = Ok -> Ok;
            _ -> erlang:error({python_failed, Out})
        end,
    lists:foreach(
      fun({{X1, N1, X0, N0}, #{<<"z">> := Z, <<"p">> := P, <<"ci">> := [Lo, Hi]}}) ->
              #{z := EZ, p := EP, ci95 := {ELo, EHi}} = dspex_models_stats:z_test_proportions(X1, N1, X0, N0),
              close(Z, EZ), close(P, EP), close(Lo, ELo), close(Hi, EHi)
      end, lists:zip(Props, PR)),
    lists:foreach(
      fun({{T, C}, #{<<"z">> := Z, <<"p">> := P, <<"ci">> := [Lo, Hi]}}) ->
              #{z := EZ, p := EP, ci95 := {ELo, EHi}} = dspex_models_stats:z_test_means(T, C),
              close(Z, EZ), close(P, EP), close(Lo, ELo), close(Hi, EHi)
      end, lists:zip(Means, MR)),
    lists:foreach(
      fun({{Ns, Ws}, #{<<"chi2">> := X2, <<"p">> := P}}) ->
              #{chi2 := EX2, p := EP} = dspex_models_stats:srm(Ns, Ws),
              close(X2, EX2), close(P, EP)
      end, lists:zip(Chi, CR)),
    lists:foreach(
      fun({{D, V, T}, #{<<"lambda">> := L}}) ->
              #{log_lambda := EL} = dspex_models_stats:msprt(D, V, T, 0.05),
              close(L, math:exp(EL))
      end, lists:zip(Mix, XR)).

close(Py, Erl) ->
    ?assert(abs(Py - Erl) =< 1.0e-9 * max(1.0, abs(Py))
            orelse (abs(Py) < 1.0e-300 andalso abs(Erl) < 1.0e-300)
            orelse erlang:error({mismatch, Py, Erl})).

root() ->
    %% rebar3 runs eunit from the project root
    {ok, Cwd} = file:get_cwd(),
    Cwd.

%%% ------------------------------------------------------------------
%%% Extreme inputs and counter ranges
%%% ------------------------------------------------------------------

%% each of these raised badarith inside dspex_models_server (no try there)
extreme_inputs() ->
    Req = fun(M) -> dspex_models_stats:required_samples(maps:merge(#{baseline => 0.5, mde => 0.02}, M)) end,
    %% mde^2 underflows to 0: no sample size detects it, the cap is returned
    ?assertEqual(1 bsl 50, Req(#{mde => 1.0e-200})),
    %% 1/alpha overflowed; -ln(alpha) = 744.4 does not
    NA = Req(#{alpha => 5.0e-324}),
    ?assert(is_integer(NA) andalso NA > Req(#{})),
    %% the quantile of a subnormal power overflowed in its refinement
    ?assert(is_integer(Req(#{power => 5.0e-324}))),
    ?assertEqual(7438, dspex_models_stats:required_samples(#{baseline => 0.9, mde => 0.02})),
    Q = dspex_models_stats:normal_quantile(5.0e-324),
    ?assert(Q < -38.4 andalso Q > -38.6),
    %% the mixture: a tau whose square underflows, a subnormal alpha
    ?assertMatch(#{p := 1.0}, dspex_models_stats:msprt(0.1, 1.0e-4, 1.0e-200, 0.05)),
    #{p := P, ci := {Lo, Hi}} = dspex_models_stats:msprt(0.1, 1.0e-4, 0.02, 5.0e-324),
    ?assert(is_float(P) andalso Lo < 0.1 andalso Hi > 0.1),
    %% a whole evaluation with such an mde: continue, not an exception
    Arm = fun(N, S) -> #{n => N, successes => S} end,
    #{decision := continue, p_value := 1.0} =
        dspex_models_stats:evaluate([{a, Arm(50, 50)}, {b, Arm(50, 0)}],
                                    #{metric => success, alpha => 0.05, mde => 1.0e-200, min_samples => 10}, #{}).

lower_tail_quantile() ->
    %% Python's statistics.NormalDist().inv_cdf (Wichura AS241); 1 - sf(x) is
    %% 0 below -8.3, so the refinement on it moved these to -9.147 and worse
    [?assert(abs(dspex_models_stats:normal_quantile(P) - X) < 1.0e-12 * abs(X))
     || {P, X} <- [{1.0e-20, -9.262340089798405}, {1.0e-100, -21.27345356096532},
                   {1.0e-300, -37.0470962993612}]].

%% one arm of N inferences at LatencyMs, through the ingest path
latency_arm(N, LatencyMs) ->
    Ref = dspex_models_stats:new_counters(1),
    [dspex_models_stats:ingest(Ref, 0, LatencyMs, true, undefined) || _ <- lists:seq(1, N)],
    dspex_models_stats:snapshot(Ref, 0).

constant_latency() ->
    A = latency_arm(200, 10), B = latency_arm(200, 11),
    %% ln 10 and ln^2 10 rounded apart left a variance of ~3e-7
    ?assertMatch({200, _, 0.0}, dspex_models_stats:arm(A, latency)),
    #{decision := continue, p_value := 1.0} =
        dspex_models_stats:evaluate([{a, A}, {b, B}], #{metric => latency, alpha => 0.05, mde => 0.02,
                                                        min_samples => 100}, #{}),
    %% a real spread is kept: 10 and 11 ms alternating
    Ref = dspex_models_stats:new_counters(1),
    [dspex_models_stats:ingest(Ref, 0, 10 + I rem 2, true, undefined) || I <- lists:seq(1, 200)],
    {200, _, V} = dspex_models_stats:arm(dspex_models_stats:snapshot(Ref, 0), latency),
    Expected = math:pow(math:log(1.1) / 2, 2) * 200 / 199,
    ?assert(abs(V - Expected) / Expected < 1.0e-3).

%% 1e12 per sample went into one 64-bit slot for |custom| = 1000: it wrapped
%% after 9.2M samples and the variance became negative (clamped to 0)
custom_sums_no_wrap() ->
    Ref = dspex_models_stats:new_counters(1),
    Procs = max(2, erlang:system_info(schedulers_online)),
    Each = 9300000 div Procs div 2,
    Self = self(),
    Pids = [spawn_link(fun() -> ingest_pairs(Ref, Each), Self ! {done, self()} end)
            || _ <- lists:seq(1, Procs)],
    [receive {done, P} -> ok end || P <- Pids],
    N = Procs * Each * 2,
    Arm = dspex_models_stats:snapshot(Ref, 0),
    #{custom_n := N, custom_sum := Sum, custom_sumsq := Sq} = Arm,
    ?assert(N > 9223372),
    ?assertEqual(0.0, Sum),
    ?assertEqual(N * 1.0e6, Sq),
    {N, Mean, Var} = dspex_models_stats:arm(Arm, {custom, score}),
    ?assertEqual(0.0, Mean),
    ?assert(abs(Var - 1.0e6 * N / (N - 1)) < 1.0e-3),
    %% and from the tuple a checkpoint holds
    ?assertEqual(Arm, dspex_models_stats:from_counts(dspex_models_stats:counts(Ref, 1), 0)).

ingest_pairs(_, 0) -> ok;
ingest_pairs(Ref, K) ->
    dspex_models_stats:ingest(Ref, 0, 10, true, 1000),
    dspex_models_stats:ingest(Ref, 0, 10, true, -1000),
    ingest_pairs(Ref, K - 1).

%% a checkpoint written before the sums were split (263 slots per arm, no
%% `layout'): its slots move to the same offsets of the wider arms
layout1_counts() ->
    Old = [{1, 40}, {2, 30}, {3, 92103404}, {7, 5000000}, {5, 2}, {263 + 1, 5}, {263 + 3, 11512925}],
    Sparse = dspex_models_stats:upgrade_counts(1, Old),
    Slots = dspex_models_stats:slots(),
    Counts = lists:foldl(fun({I, C}, T) -> setelement(I, T, C) end,
                         erlang:make_tuple(2 * Slots, 0), Sparse),
    A = dspex_models_stats:from_counts(Counts, 0),
    B = dspex_models_stats:from_counts(Counts, Slots),
    ?assertMatch(#{n := 40, successes := 30, custom_n := 2}, A),
    ?assertEqual(92.103404, maps:get(lat_sum, A)),
    ?assertEqual(5.0, maps:get(custom_sumsq, A)),
    ?assertMatch(#{n := 5, successes := 0}, B),
    ?assertEqual(11.512925, maps:get(lat_sum, B)),
    ?assertEqual(Sparse, dspex_models_stats:upgrade_counts(dspex_models_stats:counts_layout(), Sparse)).

exceedance_huge_factor() ->
    Base = latency_arm(100, 100), New = latency_arm(100, 100),
    %% lists:seq(First, 255) raised for First > 256 (max_degradation 1e6)
    ?assertMatch(#{exceed := 0, n := 100}, dspex_models_stats:exceedance(Base, New, 0.95, 1.0e6 + 1)),
    ?assertMatch(#{exceed := 100}, dspex_models_stats:exceedance(Base, latency_arm(100, 1.0e9), 0.95, 1.2)).
