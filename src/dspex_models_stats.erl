%% @doc Statistics of model experiments: ingest counters, always-valid
%% sequential tests, fixed-horizon reference tests, sample-ratio mismatch and
%% sample sizes. Pure functions except `new_counters/1', `ingest/5' and
%% `snapshot/2' (which touch a `counters' array).
%%
%% <b>Sequential test (mSPRT).</b> For a difference of means `Delta' (a
%% difference of proportions for `success', of log-latency means for
%% `latency', of means for a custom metric) with estimated variance
%% `V = s1^2/n1 + s0^2/n0', the normal-mixture SPRT of Johari, Pekelis and
%% Walsh ("Always valid inference", 2017; also Robbins 1970) with mixing
%% distribution `N(0, Tau^2)' has the likelihood ratio
%% `Lambda = sqrt(V/(V+Tau^2)) * exp(Tau^2 Delta^2 / (2 V (V+Tau^2)))'.
%% Its always-valid p-value is the running minimum of `1/Lambda' over every
%% look, and `{theta : Lambda(Delta - theta) < 1/alpha}' is a confidence
%% sequence: `Delta +- sqrt(2 V (V+Tau^2)/Tau^2 * (ln(1/alpha) +
%% ln((V+Tau^2)/V)/2))'. Both stay valid however often and whenever the
%% results are looked at (the variance is a plug-in estimate, so validity is
%% asymptotic in the sample size, as in the paper; a proportion's variance
%% uses `p = (successes + 0.5)/(n + 1)' so that it is never 0). `Tau' is the
%% minimum detectable effect (`mde'), where the test has most power. A
%% zero estimated variance (e.g. a custom metric that is constant in both
%% arms) gives no evidence (`p = 1', unbounded interval) rather than an
%% infinitely confident one; an estimate within the reach of the fixed-point
%% rounding of the sums, `(0.5 + |mean|) * 1e-6 * n/(n-1)', counts as zero. The mixture is exact for Gaussian data with a
%% fixed split between the arms; when the split changes (rollout ramps) it is
%% an approximation.
-module(dspex_models_stats).

-export([new_counters/1, ingest/5, snapshot/2, slots/0, counts/2, from_counts/2,
         counts_layout/0, upgrade_counts/2]).
-export([arm/2, msprt/4, compare/4, evaluate/3, srm/2,
         z_test_proportions/4, z_test_means/2, normal_sf/1, normal_quantile/1,
         chi2_sf/2, required_samples/1, quantile/2, exceedance/4]).

-export_type([arm/0, spec/0]).

%% counters slots of one arm (1-based offsets from Base). Each sum is two
%% slots, `Lo' (the fixed-point value's remainder mod ?SCALE, or any value
%% read from a layout-1 checkpoint) and `Hi' (its quotient): a sample adds
%% at most ?SCALE to either, so no realistic count wraps the 64-bit counters
%% (|custom| =< 1000 put up to 1e12 per sample into one slot: wrapped after
%% 9.2M samples).
-define(N, 1).
-define(SUCC, 2).
-define(LSUM, 3).
-define(LSQ, 4).
-define(CN, 5).
-define(CSUM, 6).
-define(CSQ, 7).
-define(HIST, 8).
-define(HBUCKETS, 256).         % 8 per octave from 2^-7 ms to 2^25 ms
-define(LSUM_HI, (?HIST + ?HBUCKETS)).
-define(LSQ_HI, (?LSUM_HI + 1)).
-define(CSUM_HI, (?LSUM_HI + 2)).
-define(CSQ_HI, (?LSUM_HI + 3)).
-define(SLOTS, (11 + ?HBUCKETS)).
%% layout 1 (checkpoints written before the Hi slots): 263 slots per arm,
%% the same offsets 1..263
-define(SLOTS_V1, (7 + ?HBUCKETS)).
-define(LAYOUT, 2).
-define(SCALE, 1000000).

-type arm() :: #{n := non_neg_integer(), successes := non_neg_integer(),
                 lat_sum := float(), lat_sumsq := float(),
                 custom_n := non_neg_integer(), custom_sum := float(), custom_sumsq := float(),
                 hist := tuple()}.
-type spec() :: #{metric := success | latency | {custom, term()}, alpha := float(),
                  mde := float(), min_samples := pos_integer(),
                  direction => higher | lower, max_samples => pos_integer() | infinity}.

%%% ------------------------------------------------------------------
%%% Ingest
%%% ------------------------------------------------------------------

%% @doc Counter slots per arm.
-spec slots() -> pos_integer().
slots() -> ?SLOTS.

%% @doc A counters array for `Arms' arms (write concurrency: recorders on
%% different schedulers do not contend on one cache line).
-spec new_counters(pos_integer()) -> counters:counters_ref().
new_counters(Arms) -> counters:new(Arms * ?SLOTS, [write_concurrency]).

%% @doc Adds one inference to the arm starting at `Base' (0-based arm index
%% times `slots()'): count, success, ln(latency) and its square (fixed point,
%% 1e-6), a log-scale latency histogram bucket (8 per octave, for quantiles
%% within 4.4%), and the custom value when given (the caller keeps it
%% within [-1000, 1000]). Each sum is split over two 64-bit slots, so an arm
%% takes more than 9e12 samples before any slot could wrap.
-spec ingest(counters:counters_ref(), non_neg_integer(), number(), boolean(), number() | undefined) -> ok.
ingest(Ref, Base, LatencyMs, Success, Custom) ->
    X = math:log(LatencyMs),
    counters:add(Ref, Base + ?N, 1),
    Success andalso counters:add(Ref, Base + ?SUCC, 1),
    add_fixed(Ref, Base + ?LSUM, Base + ?LSUM_HI, round(X * ?SCALE)),
    add_fixed(Ref, Base + ?LSQ, Base + ?LSQ_HI, round(X * X * ?SCALE)),
    H = min(?HBUCKETS - 1, max(0, trunc((X / 0.6931471805599453 + 7) * 8))),
    counters:add(Ref, Base + ?HIST + H, 1),
    case Custom of
        undefined -> ok;
        C ->
            counters:add(Ref, Base + ?CN, 1),
            add_fixed(Ref, Base + ?CSUM, Base + ?CSUM_HI, round(C * ?SCALE)),
            add_fixed(Ref, Base + ?CSQ, Base + ?CSQ_HI, round(C * C * ?SCALE)),
            ok
    end.

%% V = Hi * ?SCALE + Lo, |Lo| < ?SCALE (rem keeps V's sign); a zero part
%% costs no add
add_fixed(Ref, LoSlot, HiSlot, V) ->
    case V rem ?SCALE of
        0 -> ok;
        Lo -> counters:add(Ref, LoSlot, Lo)
    end,
    case V div ?SCALE of
        0 -> ok;
        Hi -> counters:add(Ref, HiSlot, Hi)
    end.

%% @doc The arm's totals (not atomic across slots: a concurrent record may be
%% half counted, which moves a count by one at most).
-spec snapshot(counters:counters_ref(), non_neg_integer()) -> arm().
snapshot(Ref, Base) -> arm_of(fun(I) -> counters:get(Ref, Base + I) end).

%% the sums are exact integers (Hi * ?SCALE + Lo, bignums if need be) until
%% the one division
arm_of(G) ->
    Sum = fun(Lo, Hi) -> (G(Hi) * ?SCALE + G(Lo)) / ?SCALE end,
    #{n => G(?N), successes => G(?SUCC),
      lat_sum => Sum(?LSUM, ?LSUM_HI), lat_sumsq => Sum(?LSQ, ?LSQ_HI),
      custom_n => G(?CN), custom_sum => Sum(?CSUM, ?CSUM_HI),
      custom_sumsq => Sum(?CSQ, ?CSQ_HI),
      hist => list_to_tuple([G(?HIST + I) || I <- lists:seq(0, ?HBUCKETS - 1)])}.

%% @doc Every slot of a counters array of `Arms' arms as a tuple (slot `I'
%% is element `I'): the raw, additive counts, which `from_counts/2' reads
%% like `snapshot/2' reads the array. Counts of several nodes (or of a
%% checkpoint and the live array) add up slot by slot.
-spec counts(counters:counters_ref(), pos_integer()) -> tuple().
counts(Ref, Arms) -> list_to_tuple([counters:get(Ref, I) || I <- lists:seq(1, Arms * ?SLOTS)]).

%% @doc `snapshot/2' of a tuple of counts (see `counts/2').
-spec from_counts(tuple(), non_neg_integer()) -> arm().
from_counts(T, Base) -> arm_of(fun(I) -> element(Base + I, T) end).

%% @doc The layout of `counts/2' that checkpoints record (`layout' in their
%% metadata; a checkpoint without it is layout 1).
-spec counts_layout() -> pos_integer().
counts_layout() -> ?LAYOUT.

%% @doc A checkpoint's sparse counts (`[{Slot, Count}]', slots of `counts/2')
%% in the current layout. Layout 1 had 263 slots per arm with the same
%% offsets and each sum whole in its (now Lo) slot, which stays exact: only
%% the arm's stride changes.
-spec upgrade_counts(pos_integer(), [{pos_integer(), integer()}]) -> [{pos_integer(), integer()}].
upgrade_counts(?LAYOUT, Sparse) -> Sparse;
upgrade_counts(1, Sparse) ->
    [{(I - 1) div ?SLOTS_V1 * ?SLOTS + (I - 1) rem ?SLOTS_V1 + 1, C} || {I, C} <- Sparse].

%% @doc The latency quantile `Q' of an arm from its histogram (the geometric
%% middle of the bucket holding rank `ceil(Q n)'), or `undefined' if empty.
-spec quantile(arm(), float()) -> float() | undefined.
quantile(#{n := 0}, _) -> undefined;
quantile(#{hist := H}, Q) ->
    Total = lists:sum(tuple_to_list(H)),
    Rank = max(1, ceil(Q * Total)),
    quantile(H, 1, 0, Rank).

quantile(H, I, Acc, Rank) when I =< tuple_size(H) ->
    Acc1 = Acc + element(I, H),
    if Acc1 >= Rank -> math:pow(2, (I - 1 + 0.5) / 8 - 7);
       true -> quantile(H, I + 1, Acc1, Rank)
    end;
quantile(_, _, _, _) -> undefined.

%% @doc How many of `New''s latencies exceed `Factor' times `Base''s
%% quantile `Q' (both from the histograms): the threshold is the upper edge
%% of the bucket holding `Base''s quantile times `Factor', and a sample of
%% `New' counts when its whole bucket lies above it (so the histogram's
%% resolution never counts against `New').
-spec exceedance(arm(), arm(), float(), float()) ->
          #{exceed := non_neg_integer(), n := non_neg_integer(),
            threshold_ms := float() | undefined, p95_baseline_ms := float() | undefined}.
exceedance(#{hist := HB} = Base, #{hist := HN}, Q, Factor) ->
    N = lists:sum(tuple_to_list(HN)),
    case bucket_of_quantile(HB, Q) of
        undefined ->
            #{exceed => 0, n => N, threshold_ms => undefined, p95_baseline_ms => undefined};
        I ->
            Thr = math:pow(2, (I + 1) / 8 - 7) * Factor,
            %% a threshold above the top bucket (a large Factor): none exceed
            First = min(?HBUCKETS, max(0, ceil((math:log2(Thr) + 7) * 8))),
            X = lists:sum([element(J + 1, HN) || J <- lists:seq(First, ?HBUCKETS - 1)]),
            #{exceed => X, n => N, threshold_ms => Thr, p95_baseline_ms => quantile(Base, Q)}
    end.

bucket_of_quantile(H, Q) ->
    Total = lists:sum(tuple_to_list(H)),
    case Total of
        0 -> undefined;
        _ -> bucket_walk(H, 1, 0, max(1, ceil(Q * Total)))
    end.

bucket_walk(H, I, Acc, Rank) ->
    Acc1 = Acc + element(I, H),
    if Acc1 >= Rank -> I - 1;
       true -> bucket_walk(H, I + 1, Acc1, Rank)
    end.

%%% ------------------------------------------------------------------
%%% Arms and the sequential test
%%% ------------------------------------------------------------------

%% @doc `{N, Mean, Variance}' of an arm for a metric (variance of one
%% observation; see the module doc for proportions).
-spec arm(arm(), success | latency | {custom, term()}) -> {non_neg_integer(), float(), float()}.
arm(#{n := N, successes := S}, success) ->
    Mean = if N > 0 -> S / N; true -> 0.0 end,
    P = (S + 0.5) / (N + 1),
    {N, Mean, P * (1 - P)};
arm(#{n := N, lat_sum := Sum, lat_sumsq := Sq}, latency) -> moments(N, Sum, Sq);
arm(#{custom_n := N, custom_sum := Sum, custom_sumsq := Sq}, {custom, _}) -> moments(N, Sum, Sq).

moments(0, _, _) -> {0, 0.0, 0.0};
moments(1, Sum, _) -> {1, float(Sum), 0.0};
moments(N, Sum, Sq) ->
    Mean = Sum / N,
    Var = (Sq - Sum * Sum / N) / (N - 1),
    %% x and x^2 are rounded to 1e-6 separately, which moves this estimate
    %% by up to (0.5 + |mean|) * 1e-6 * N/(N-1): below that it cannot be told
    %% from 0 (a constant latency left ~3e-7 and looked infinitely precise)
    Resolution = (0.5 + abs(Mean)) / ?SCALE * N / (N - 1),
    {N, Mean, if Var =< Resolution -> 0.0; true -> Var end}.

%% @doc The mixture SPRT at one look: `Delta' (estimate), `V' (its variance),
%% `Tau' (mixing standard deviation), `Alpha'. Returns the likelihood ratio's
%% log, `1/Lambda' (capped at 1) and the confidence-sequence interval.
%% Total: inputs whose terms leave the float range (a `Tau' whose square
%% underflows, say) give no evidence rather than an exception.
-spec msprt(float(), float(), float(), float()) ->
          #{log_lambda := float(), p := float(), ci := {float(), float()}}.
msprt(Delta, V0, Tau, Alpha) when V0 > 0, Tau > 0, Alpha > 0, Alpha < 1 ->
    try
        T2 = Tau * Tau,
        true = T2 > 0,
        %% a floor far below any real variance keeps every term finite
        V = max(V0, T2 * 1.0e-12),
        LogL = 0.5 * (math:log(V) - math:log(V + T2)) + T2 * Delta * Delta / (2 * V * (V + T2)),
        %% -ln(alpha), not ln(1/alpha): 1/alpha overflows for a subnormal alpha
        Half = math:sqrt(2 * V * (V + T2) / T2 * (-math:log(Alpha) + 0.5 * math:log((V + T2) / V))),
        #{log_lambda => LogL, p => min(1.0, math:exp(-LogL)), ci => {Delta - Half, Delta + Half}}
    catch
        error:badarith -> no_evidence(Delta);
        error:{badmatch, false} -> no_evidence(Delta)
    end;
msprt(Delta, _V, _Tau, _Alpha) -> no_evidence(Delta).

no_evidence(Delta) ->
    #{log_lambda => 0.0, p => 1.0, ci => {Delta - 1.0e300, Delta + 1.0e300}}.

%% @doc Treatment against control for a metric: `effect' (treatment minus
%% control; for latency the difference of log means, with `ratio' = the ratio
%% of geometric means and its interval), `ci' (always-valid, level
%% 1 - Alpha), `p' (1/Lambda at this look; the caller keeps the running minimum).
-spec compare(arm(), arm(), success | latency | {custom, term()}, #{alpha := float(), tau := float()}) -> map().
compare(Control, Treatment, Metric, #{alpha := Alpha, tau := Tau}) ->
    {N0, M0, V0} = arm(Control, Metric),
    {N1, M1, V1} = arm(Treatment, Metric),
    Delta = M1 - M0,
    V = if N0 > 0, N1 > 0 -> V0 / N0 + V1 / N1; true -> 0.0 end,
    #{p := P, ci := {Lo, Hi}} = msprt(Delta, V, Tau, Alpha),
    R = #{n_control => N0, n_treatment => N1, control_mean => M0, treatment_mean => M1,
          effect => Delta, ci => {Lo, Hi}, p => P},
    case Metric of
        latency -> R#{ratio => math:exp(Delta), ratio_ci => {safe_exp(Lo), safe_exp(Hi)}};
        _ -> R
    end.

safe_exp(X) when X > 700 -> infinity;
safe_exp(X) when X < -700 -> 0.0;
safe_exp(X) -> math:exp(X).

%% @doc One look at an experiment. `Arms' = `[{Id, arm()}]', control first;
%% `Spec' (see `spec()'; `weights' = the planned split, for the SRM check;
%% `srm_alpha' default 0.001); `Prev' = the previous look's result or `#{}'
%% (carries the running minimum p-values). Returns `#{decision, p_value,
%% comparisons, srm}' where `decision' is `continue | {winner, Id} |
%% no_difference | {stopped, srm}'. Rules: SRM (p < `srm_alpha') stops the
%% test once `min_samples' units were counted in all and every arm expects
%% at least 5; nothing else is decided before every arm has `min_samples'; each treatment is compared with the
%% control at `alpha/(k-1)' (Bonferroni); a treatment whose always-valid
%% p-value reaches it and is better (`direction', default `higher', `lower'
%% for latency) wins (the best such one); if every treatment is
%% significantly worse, the control wins; if every interval lies inside
%% `(-mde, mde)' (latency: `(-ln(1+mde), ln(1+mde))') there is no difference;
%% once every arm reached `max_samples' without a winner, also `no_difference'.
-spec evaluate([{term(), arm()}], map(), map()) -> map().
evaluate([{CId, Control} | Treatments] = Arms, Spec, Prev) ->
    Metric = maps:get(metric, Spec),
    K = length(Arms),
    Alpha = maps:get(alpha, Spec) / max(1, K - 1),
    Tau = tau(Metric, maps:get(mde, Spec)),
    Dir = maps:get(direction, Spec, case Metric of latency -> lower; _ -> higher end),
    PrevMin = maps:get(pmin, Prev, #{}),
    Comps = [begin
                 C = compare(Control, T, Metric, #{alpha => Alpha, tau => Tau}),
                 PMin = min(maps:get(Id, PrevMin, 1.0), maps:get(p, C)),
                 {Id, C#{p_value => PMin}}
             end || {Id, T} <- Treatments],
    Ns = [maps:get(n, A) || {_, A} <- Arms],
    Srm = case maps:get(weights, Spec, undefined) of
              undefined -> #{p => 1.0, chi2 => 0.0};
              Ws -> srm(Ns, Ws)
          end,
    MinS = maps:get(min_samples, Spec, 100),
    MaxS = maps:get(max_samples, Spec, infinity),
    MNs = [element(1, arm(A, Metric)) || {_, A} <- Arms],
    Enough = lists:all(fun(N) -> N >= MinS end, MNs),
    Better = [{Id, maps:get(effect, C)} || {Id, C} <- Comps, maps:get(p_value, C) =< Alpha,
                                           improves(maps:get(effect, C), Dir)],
    Worse = [Id || {Id, C} <- Comps, maps:get(p_value, C) =< Alpha,
                   not improves(maps:get(effect, C), Dir)],
    Equiv = lists:all(fun({_, #{ci := {Lo, Hi}}}) -> Lo > -Tau andalso Hi < Tau end, Comps),
    Horizon = MaxS =/= infinity andalso lists:all(fun(N) -> N >= MaxS end, MNs),
    SrmAlpha = maps:get(srm_alpha, Spec, 0.001),
    %% the split is checked once there are min_samples units in all and every
    %% arm expects 5 (the chi-square's validity), even if an arm gets none
    Total = lists:sum(Ns),
    PlanW = maps:get(weights, Spec, [1]),
    SrmReady = Total >= MinS andalso lists:all(fun(W) -> Total * W / lists:sum(PlanW) >= 5 end, PlanW),
    Decision =
        if
            map_get(p, Srm) < SrmAlpha, SrmReady -> {stopped, srm};
            not Enough -> continue;
            Better =/= [] ->
                {Best, _} = hd(lists:sort(fun({_, A}, {_, B}) -> better(A, B, Dir) end, Better)),
                {winner, Best};
            length(Worse) =:= length(Comps) -> {winner, CId};
            Equiv -> no_difference;
            Horizon -> no_difference;
            true -> continue
        end,
    #{decision => Decision, comparisons => maps:from_list(Comps), srm => Srm,
      alpha_per_comparison => Alpha, tau => Tau,
      p_value => lists:min([1.0 | [maps:get(p_value, C) || {_, C} <- Comps]]),
      pmin => maps:from_list([{Id, maps:get(p_value, C)} || {Id, C} <- Comps])}.

improves(E, higher) -> E > 0;
improves(E, lower) -> E < 0.

better(A, B, higher) -> A >= B;
better(A, B, lower) -> A =< B.

tau(latency, Mde) -> math:log(1 + Mde);
tau(_, Mde) -> Mde.

%% @doc Sample-ratio mismatch: Pearson's chi-square of the arms' counts
%% against the planned weights, with its p-value (k-1 degrees of freedom).
-spec srm([non_neg_integer()], [number()]) -> #{chi2 := float(), p := float()}.
srm(Ns, Ws) ->
    Total = lists:sum(Ns),
    WSum = lists:sum(Ws),
    case Total of
        0 -> #{chi2 => 0.0, p => 1.0};
        _ ->
            Chi2 = lists:sum([begin E = Total * W / WSum, (N - E) * (N - E) / E end
                              || {N, W} <- lists:zip(Ns, Ws), W > 0]),
            #{chi2 => Chi2, p => chi2_sf(Chi2, length(Ns) - 1)}
    end.

%%% ------------------------------------------------------------------
%%% Fixed-horizon references (what statsmodels computes)
%%% ------------------------------------------------------------------

%% @doc Two-sided two-proportion z-test (pooled variance, as
%% `statsmodels.stats.proportion.proportions_ztest') of `X1/N1' against
%% `X0/N0', with the 95% Wald interval of `p1 - p0' (unpooled, as
%% `confint_proportions_2indep(method="wald")'): `ci95'.
-spec z_test_proportions(non_neg_integer(), pos_integer(), non_neg_integer(), pos_integer()) ->
          #{z := float(), p := float(), diff := float(), ci95 := {float(), float()}}.
z_test_proportions(X1, N1, X0, N0) ->
    P1 = X1 / N1, P0 = X0 / N0,
    P = (X1 + X0) / (N1 + N0),
    Se = math:sqrt(P * (1 - P) * (1 / N1 + 1 / N0)),
    Z = (P1 - P0) / Se,
    SeU = math:sqrt(P1 * (1 - P1) / N1 + P0 * (1 - P0) / N0),
    Q = normal_quantile(0.975),
    #{z => Z, p => 2 * normal_sf(abs(Z)), diff => P1 - P0,
      ci95 => {P1 - P0 - Q * SeU, P1 - P0 + Q * SeU}}.

%% @doc Two-sided z-test of a difference of means with unequal variances
%% (`statsmodels CompareMeans.ztest_ind(usevar="unequal")' and
%% `zconfint_diff'), treatment first: `{N, Mean, Var}' each.
-spec z_test_means({pos_integer(), float(), float()}, {pos_integer(), float(), float()}) ->
          #{z := float(), p := float(), diff := float(), ci95 := {float(), float()}}.
z_test_means({N1, M1, V1}, {N0, M0, V0}) ->
    Se = math:sqrt(V1 / N1 + V0 / N0),
    Z = (M1 - M0) / Se,
    Q = normal_quantile(0.975),
    #{z => Z, p => 2 * normal_sf(abs(Z)), diff => M1 - M0,
      ci95 => {M1 - M0 - Q * Se, M1 - M0 + Q * Se}}.

%% @doc `P(Z > X)' for a standard normal `Z'.
-spec normal_sf(float()) -> float().
normal_sf(X) -> 0.5 * math:erfc(X / math:sqrt(2)).

%% @doc The standard normal quantile (Acklam's rational approximation, then
%% two Halley steps on `erfc': accurate to ~1e-15). Total on (0, 1): beyond
%% |x| = 37.4 (P below 1e-300) the refinement would overflow and Acklam's
%% value (relative error 1.2e-9) is returned.
-spec normal_quantile(float()) -> float().
normal_quantile(P) when P > 0, P < 1 ->
    X0 = acklam(P),
    newton(newton(X0, P), P).

newton(X, _P) when X * X / 2 > 700 -> X;
newton(X, P) ->
    %% the CDF as erfc(-x/sqrt 2)/2 keeps its relative precision in the
    %% lower tail (1 - sf(x) is 0 below x = -8.3)
    E = 0.5 * math:erfc(-X / math:sqrt(2)) - P,
    U = E * math:sqrt(2 * math:pi()) * math:exp(X * X / 2),
    X - U / (1 + X * U / 2).

acklam(P) ->
    A = [-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
         1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00],
    B = [-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
         6.680131188771972e+01, -1.328068155288572e+01],
    C = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
         -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00],
    D = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
         3.754408661907416e+00],
    Low = 0.02425,
    if
        P < Low ->
            Q = math:sqrt(-2 * math:log(P)),
            horner(C, Q) / (horner(D, Q) * Q + 1);
        P > 1 - Low ->
            Q = math:sqrt(-2 * math:log(1 - P)),
            -horner(C, Q) / (horner(D, Q) * Q + 1);
        true ->
            Q = P - 0.5, R = Q * Q,
            horner(A, R) * Q / (horner(B, R) * R + 1)
    end.

horner(Cs, X) -> lists:foldl(fun(C, Acc) -> Acc * X + C end, 0.0, Cs).

%% @doc `P(X > Chi2)' for a chi-square variable with `K' degrees of freedom
%% (the regularised upper incomplete gamma `Q(K/2, Chi2/2)': series below
%% `a + 1', Lentz's continued fraction above).
-spec chi2_sf(float(), pos_integer()) -> float().
chi2_sf(Chi2, _K) when Chi2 =< 0 -> 1.0;
chi2_sf(Chi2, K) when K >= 1 -> gamma_q(K / 2, Chi2 / 2).

gamma_q(A, X) when X < A + 1 -> 1 - gamma_p_series(A, X);
gamma_q(A, X) -> gamma_q_cf(A, X).

gamma_p_series(A, X) ->
    Sum = series(A, X, 1 / A, 1 / A, 1),
    Sum * math:exp(-X + A * math:log(X) - lgamma(A)).

series(_A, _X, _Term, Sum, I) when I > 1000 -> Sum;
series(A, X, Term, Sum, I) ->
    T = Term * X / (A + I),
    if abs(T) < abs(Sum) * 1.0e-16 -> Sum + T;
       true -> series(A, X, T, Sum + T, I + 1)
    end.

gamma_q_cf(A, X) ->
    Tiny = 1.0e-300,
    B = X + 1 - A,
    C = 1 / Tiny,
    D = 1 / B,
    H = cf(A, X, B, C, D, D, 1, Tiny),
    math:exp(-X + A * math:log(X) - lgamma(A)) * H.

cf(_A, _X, _B, _C, _D, H, I, _Tiny) when I > 1000 -> H;
cf(A, X, B0, C0, D0, H0, I, Tiny) ->
    An = -I * (I - A),
    B = B0 + 2,
    D1 = An * D0 + B,
    D = 1 / (if abs(D1) < Tiny -> Tiny; true -> D1 end),
    C1 = B + An / C0,
    C = if abs(C1) < Tiny -> Tiny; true -> C1 end,
    Del = D * C,
    H = H0 * Del,
    if abs(Del - 1) < 1.0e-16 -> H;
       true -> cf(A, X, B, C, D, H, I + 1, Tiny)
    end.

%% ln Gamma(x), Lanczos (g = 7, n = 9), x > 0
lgamma(X) when X < 0.5 ->
    math:log(math:pi() / abs(math:sin(math:pi() * X))) - lgamma(1 - X);
lgamma(X0) ->
    G = [0.99999999999980993, 676.5203681218851, -1259.1392167224028,
         771.32342877765313, -176.61502916214059, 12.507343278686905,
         -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7],
    X = X0 - 1,
    {A, _} = lists:foldl(fun(C, {Acc, I}) -> {Acc + C / (X + I), I + 1} end,
                         {hd(G), 1}, tl(G)),
    T = X + 7.5,
    0.5 * math:log(2 * math:pi()) + (X + 0.5) * math:log(T) - T + math:log(A).

%%% ------------------------------------------------------------------
%%% Planning
%%% ------------------------------------------------------------------

%% @doc Samples per arm for the sequential success test to detect a change
%% from `baseline' by `mde' (absolute) with probability `power' at level
%% `alpha' (two arms; `k' arms divide alpha by k-1): the smallest `n' with
%% `mde/sqrt(V(n)) >= b(n) + z(power)', where `b(n)' is the mSPRT's
%% boundary for the z statistic at `n' (Tau = mde). It counts only the last
%% look, so the real power (earlier crossings count too) is at least `power'.
%% Total for `alpha' and `power' in (0, 1): an `n' whose terms leave the
%% float range (an `mde' so small that its square underflows) counts as too
%% small, and the answer is capped at 2^50 (what an undetectable effect gets).
-spec required_samples(#{baseline := float(), mde := float(), alpha => float(),
                         power => float(), k => pos_integer()}) -> pos_integer().
required_samples(#{baseline := P0, mde := Mde} = Spec) ->
    Alpha = maps:get(alpha, Spec, 0.05) / max(1, maps:get(k, Spec, 2) - 1),
    Power = maps:get(power, Spec, 0.8),
    P1 = max(0.0, min(1.0, P0 - Mde)),
    Var = P0 * (1 - P0) + P1 * (1 - P1),
    Zp = normal_quantile(Power),
    Ok = fun(N) ->
                 try
                     V = Var / N, T2 = Mde * Mde,
                     B = math:sqrt(2 * (1 + V / T2) * (-math:log(Alpha) + 0.5 * math:log(1 + T2 / V))),
                     Mde / math:sqrt(V) >= B + Zp
                 catch error:badarith -> false
                 end
         end,
    Hi = grow(Ok, 16),
    bisect(Ok, Hi div 2, Hi).

-define(MAX_SAMPLES, (1 bsl 50)).

grow(_Ok, N) when N >= ?MAX_SAMPLES -> ?MAX_SAMPLES;
grow(Ok, N) -> case Ok(N) of true -> N; false -> grow(Ok, N * 2) end.

bisect(_Ok, Lo, Hi) when Hi - Lo =< 1 -> Hi;
bisect(Ok, Lo, Hi) ->
    Mid = (Lo + Hi) div 2,
    case Ok(Mid) of true -> bisect(Ok, Lo, Mid); false -> bisect(Ok, Mid, Hi) end.
