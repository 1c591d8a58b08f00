%% @doc The process behind `dspex_models' experiments and rollouts. It owns
%% their definitions and decisions, evaluates them every
%% `models_check_interval_ms' (application env, default 1000) and on
%% `results/1', and publishes the routing tables read by
%% `dspex_models:select_model/2' and the ingest sinks read by
%% `dspex_models:record_inference/4' in `persistent_term' (rewritten only
%% when a split changes: a test starts or ends, a rollout step, an alias move;
%% a `production' move made on another node of a cluster is picked up at the
%% next evaluation, which re-reads the aliases).
%% Samples go straight from the recording process into each test's
%% `counters' array; this process only reads them.
%%
%% Time comes from the `models_clock' module (env, default `dspex_clock').
%% Experiments and rollouts are node-local: they live in this process (a
%% restart or a failover of the node loses the running ones; the registry and
%% aliases, in the store, survive).
-module(dspex_models_server).
-behaviour(gen_server).

-export([start_link/0, start_ab_test/1, start_rollout/3, results/1, stop_test/1,
         list_tests/0, pause/1, resume/1, rollback/1, evaluate/0, republish/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(ROUTE(Name), {dspex_models_route, Name}).
-define(INGEST(Model), {dspex_models_ingest, Model}).
-define(BUCKETS, 10000).

%% @doc Starts the server (registered as `dspex_models_server').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Starts an A/B test on the models of one name:
%% `#{model := Name, variants := [{ModelId, Weight}] (control first, at
%% least two), metric => success | latency | {custom, Key} (default
%% success), alpha => 0.05, power => 0.8, mde => 0.02 (absolute for success
%% and custom, relative for latency: 0.1 = 10%), min_samples => 100 (per
%% arm, before any decision), max_duration => Ms | infinity, baseline =>
%% ExpectedSuccessRate (for success: sets `max_samples' to
%% `dspex_models_stats:required_samples/1'), max_samples => N | infinity,
%% unit => user_id, direction => higher | lower, salt => term() (default:
%% the test id; nodes running the same test with the same salt assign every
%% unit alike)}'. The hash salt is `erlang:phash2(Salt)' (an integer:
%% cheaper to hash on every select than the id). One test or rollout per
%% name at a time (`{error, {busy, Id}}'). Errors: `{invalid_argument, Key}',
%% `{not_found, ModelId}', `{archived, ModelId}'.
-spec start_ab_test(map()) -> {ok, binary()} | {error, term()}.
start_ab_test(Spec) when is_map(Spec) -> gen_server:call(?MODULE, {start_ab, Spec}).

%% @doc Starts a rollout of `New' for `Name' against the model `production'
%% points at: `#{steps => [1, 5, 25, 50, 100] (percent of units on `New'),
%% step_duration => Ms (least time per step, default 60000), gates =>
%% [#{metric => error_rate | latency | latency_p95, max_degradation => D}]
%% (error_rate: D in absolute points of failure rate; latency: relative, on
%% the geometric mean latency; latency_p95: relative, on the p95: the gate
%% fails when more than 5% of the new model's requests are, with confidence,
%% slower than (1 + D) times the baseline's p95 from its histogram, and
%% passes when fewer are), alpha => 0.05, min_samples => 100 (of each model, before a
%% gate can pass or fail, and of `New' within each step before it
%% advances), unit => user_id, salt => term() (as for A/B tests)}'. A step advances when its time is over,
%% `New' served `min_samples' inferences in it, and every gate passes with
%% confidence (the always-valid interval of the degradation, over all the
%% rollout's samples, lies below D); it rolls back (all units to the
%% baseline, telemetry `[dspex, models, rollout, rollback]') as soon as one
%% gate fails with confidence (the interval lies above D). Reaching 100%
%% moves `production' to `New' and ends the rollout (`completed').
-spec start_rollout(binary(), binary(), map()) -> {ok, binary()} | {error, term()}.
start_rollout(Name, New, Opts) when is_binary(Name), is_binary(New), is_map(Opts) ->
    gen_server:call(?MODULE, {start_rollout, Name, New, Opts}).

%% @doc Evaluates the test or rollout now and returns its state:
%% `#{id, kind, name, status, decision, ...}' (tests: `p_value',
%% `comparisons' (per treatment `effect', `ci', `p_value', ...), `srm',
%% `arms'; rollouts: `step', `percent', `gates').
-spec results(binary()) -> {ok, map()} | {error, not_found}.
results(Id) -> gen_server:call(?MODULE, {results, Id}).

%% @doc Stops a test or rollout by hand (`{stopped, manual}'; a rollout's
%% traffic goes back to the baseline).
-spec stop_test(binary()) -> ok | {error, term()}.
stop_test(Id) -> gen_server:call(?MODULE, {stop, Id}).

%% @doc Id → `#{kind, name, status, decision}' of every test and rollout.
-spec list_tests() -> #{binary() => map()}.
list_tests() -> gen_server:call(?MODULE, list).

%% @doc Pauses a running rollout.
-spec pause(binary()) -> ok | {error, term()}.
pause(Id) -> gen_server:call(?MODULE, {pause, Id}).

%% @doc Resumes a paused rollout (its step time restarts).
-spec resume(binary()) -> ok | {error, term()}.
resume(Id) -> gen_server:call(?MODULE, {resume, Id}).

%% @doc Rolls a rollout back by hand.
-spec rollback(binary()) -> ok | {error, term()}.
rollback(Id) -> gen_server:call(?MODULE, {rollback, Id}).

%% @doc Evaluates everything running now.
-spec evaluate() -> ok.
evaluate() -> gen_server:call(?MODULE, evaluate).

%% @doc Republishes the routing of `Name' (after a `production' move).
-spec republish(binary()) -> ok.
republish(Name) -> gen_server:cast(?MODULE, {republish, Name}).

%%% ------------------------------------------------------------------

%% @private
-spec init([]) -> {ok, map()}.
init([]) ->
    %% a restarted server forgets the old splits: start from the aliases
    [persistent_term:erase(K) || {K, _} <- persistent_term:get(),
                                 is_tuple(K), tuple_size(K) =:= 2,
                                 element(1, K) =:= dspex_models_route
                                     orelse element(1, K) =:= dspex_models_ingest],
    S0 = #{tests => #{}, sinks => #{}},
    refresh_production(S0),
    schedule(),
    {ok, S0}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({start_ab, Spec}, _From, S) ->
    case new_ab(Spec, S) of
        {ok, T} -> started(T, S);
        {error, _} = E -> {reply, E, S}
    end;
handle_call({start_rollout, Name, New, Opts}, _From, S) ->
    case new_rollout(Name, New, Opts, S) of
        {ok, T} -> started(T, S);
        {error, _} = E -> {reply, E, S}
    end;
handle_call({results, Id}, _From, S) ->
    case S of
        #{tests := #{Id := _}} ->
            S1 = eval_one(Id, S),
            {reply, {ok, view(maps:get(Id, maps:get(tests, S1)))}, S1};
        _ -> {reply, {error, not_found}, S}
    end;
handle_call({stop, Id}, _From, S) ->
    with_test(Id, S, fun(#{status := St} = T) when St =:= running; St =:= paused ->
                             emit_decision(T, {stopped, manual}),
                             {ok, T#{status => finished, decision => {stopped, manual}}};
                        (_) -> {error, finished}
                     end);
handle_call({pause, Id}, _From, S) ->
    with_test(Id, S, fun(#{kind := rollout, status := running} = T) -> {ok, T#{status => paused}};
                        (#{kind := rollout}) -> {error, not_running};
                        (_) -> {error, not_a_rollout}
                     end);
handle_call({resume, Id}, _From, S) ->
    with_test(Id, S, fun(#{kind := rollout, status := paused} = T) ->
                             {ok, T#{status => running, step_started => now_ms()}};
                        (#{kind := rollout}) -> {error, not_paused};
                        (_) -> {error, not_a_rollout}
                     end);
handle_call({rollback, Id}, _From, S) ->
    with_test(Id, S, fun(#{kind := rollout, status := St} = T) when St =:= running; St =:= paused ->
                             {ok, do_rollback(T, manual, #{})};
                        (#{kind := rollout}) -> {error, finished};
                        (_) -> {error, not_a_rollout}
                     end);
handle_call(list, _From, #{tests := Ts} = S) ->
    {reply, maps:map(fun(_, T) -> maps:with([kind, name, status, decision], T) end, Ts), S};
handle_call(evaluate, _From, S) ->
    S1 = eval_all(S),
    refresh_production(S1),
    {reply, ok, S1};
handle_call(_, _From, S) ->
    {reply, {error, unknown_call}, S}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({republish, Name}, S) ->
    publish(Name, S),
    {noreply, S};
handle_cast(_, S) -> {noreply, S}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(tick, S) ->
    schedule(),
    S1 = eval_all(S),
    refresh_production(S1),
    {noreply, S1};
handle_info(_, S) -> {noreply, S}.

%%% ------------------------------------------------------------------
%%% Creation
%%% ------------------------------------------------------------------

started(#{id := Id, name := Name} = T, #{tests := Ts} = S) ->
    S1 = S#{tests => Ts#{Id => T}},
    S2 = publish_sinks(S1),
    publish(Name, S2),
    dspex_telemetry:execute([dspex, models, start], #{count => 1},
                            #{id => Id, name => Name, kind => maps:get(kind, T)}),
    {reply, {ok, Id}, S2}.

new_ab(Spec, S) ->
    Metric = maps:get(metric, Spec, success),
    Alpha = maps:get(alpha, Spec, 0.05),
    Power = maps:get(power, Spec, 0.8),
    Mde = maps:get(mde, Spec, 0.02),
    MinS = maps:get(min_samples, Spec, 100),
    MaxD = maps:get(max_duration, Spec, infinity),
    Unit = maps:get(unit, Spec, user_id),
    Variants = maps:get(variants, Spec, undefined),
    Name = maps:get(model, Spec, undefined),
    check([{model, is_binary(Name)},
           {variants, is_list(Variants) andalso length(Variants) >= 2 andalso
                lists:all(fun({M, W}) -> is_binary(M) andalso is_number(W) andalso W > 0;
                             (_) -> false end, Variants)
                andalso length(lists:usort([M || {M, _} <- Variants])) =:= length(Variants)},
           {metric, Metric =:= success orelse Metric =:= latency
                orelse (is_tuple(Metric) andalso tuple_size(Metric) =:= 2 andalso element(1, Metric) =:= custom)},
           {alpha, is_float(Alpha) andalso Alpha > 0 andalso Alpha < 1},
           {power, is_float(Power) andalso Power > 0 andalso Power < 1},
           {mde, is_number(Mde) andalso Mde > 0},
           {min_samples, is_integer(MinS) andalso MinS >= 2},
           {max_duration, MaxD =:= infinity orelse (is_integer(MaxD) andalso MaxD > 0)},
           {max_samples, case maps:get(max_samples, Spec, infinity) of
                             infinity -> true;
                             MS0 -> is_integer(MS0) andalso MS0 > 0
                         end},
           {baseline, case maps:get(baseline, Spec, 0.5) of
                          B0 -> is_number(B0) andalso B0 > 0 andalso B0 < 1
                      end},
           {direction, lists:member(maps:get(direction, Spec, higher), [higher, lower])}],
          fun() ->
                  Models = [M || {M, _} <- Variants],
                  maybe_busy(Name, S, fun() ->
                      check_models(Name, Models, fun() ->
                          Id = new_id(<<"ab">>, Name),
                          MaxS = case Spec of
                                     #{max_samples := MS} -> MS;
                                     #{baseline := B} when Metric =:= success ->
                                         dspex_models_stats:required_samples(
                                           #{baseline => B, mde => Mde, alpha => Alpha,
                                             power => Power, k => length(Variants)});
                                     _ -> infinity
                                 end,
                          StatSpec = #{metric => Metric, alpha => Alpha, mde => float(Mde),
                                       min_samples => MinS, max_samples => MaxS,
                                       weights => [W || {_, W} <- Variants],
                                       direction => maps:get(direction, Spec,
                                                             case Metric of latency -> lower; _ -> higher end)},
                          {ok, #{id => Id, kind => ab, name => Name, unit => Unit,
                                 salt => erlang:phash2(maps:get(salt, Spec, Id)),
                                 models => Models, weights => [W || {_, W} <- Variants],
                                 spec => StatSpec, max_duration => MaxD,
                                 ref => dspex_models_stats:new_counters(length(Models)),
                                 custom => case Metric of {custom, K} -> K; _ -> undefined end,
                                 started => now_ms(), status => running, decision => continue,
                                 last => #{}}}
                      end)
                  end)
          end).

new_rollout(Name, New, Opts, S) ->
    Steps = maps:get(steps, Opts, [1, 5, 25, 50, 100]),
    Dur = maps:get(step_duration, Opts, 60000),
    Gates = maps:get(gates, Opts, [#{metric => error_rate, max_degradation => 0.01}]),
    Alpha = maps:get(alpha, Opts, 0.05),
    MinS = maps:get(min_samples, Opts, 100),
    check([{steps, is_list(Steps) andalso Steps =/= [] andalso
                lists:all(fun(P) -> is_number(P) andalso P > 0 andalso P =< 100 end, Steps)
                andalso lists:sort(Steps) =:= Steps andalso lists:last(Steps) == 100},
           {step_duration, is_integer(Dur) andalso Dur >= 0},
           {gates, is_list(Gates) andalso Gates =/= [] andalso
                lists:all(fun(#{metric := M, max_degradation := D}) ->
                                  lists:member(M, [error_rate, latency, latency_p95]) andalso is_number(D) andalso D > 0;
                             (_) -> false end, Gates)},
           {alpha, is_float(Alpha) andalso Alpha > 0 andalso Alpha < 1},
           {min_samples, is_integer(MinS) andalso MinS >= 2}],
          fun() ->
                  case dspex_models:get_alias(Name, production) of
                      {error, _} -> {error, {no_production, Name}};
                      {ok, New} -> {error, {already_production, New}};
                      {ok, Base} ->
                          maybe_busy(Name, S, fun() ->
                              check_models(Name, [Base, New], fun() ->
                                  Id = new_id(<<"rollout">>, Name),
                                  {ok, #{id => Id, kind => rollout, name => Name,
                                         unit => maps:get(unit, Opts, user_id),
                                         salt => erlang:phash2(maps:get(salt, Opts, Id)),
                                         models => [Base, New], steps => Steps, step => 1,
                                         step_duration => Dur, gates => Gates, alpha => Alpha,
                                         min_samples => MinS,
                                         ref => dspex_models_stats:new_counters(2),
                                         custom => undefined,
                                         started => now_ms(), step_started => now_ms(),
                                         status => running, decision => continue,
                                         gate_results => []}}
                              end)
                          end)
                  end
          end).

check([], Then) -> Then();
check([{_, true} | Rest], Then) -> check(Rest, Then);
check([{Key, _} | _], _) -> {error, {invalid_argument, Key}}.

maybe_busy(Name, #{tests := Ts}, Then) ->
    case [Id || {Id, #{name := N, status := St}} <- maps:to_list(Ts), N =:= Name,
                St =/= finished] of
        [] -> Then();
        [Id | _] -> {error, {busy, Id}}
    end.

check_models(_Name, [], Then) -> Then();
check_models(Name, [M | Rest], Then) ->
    case dspex_models:get_model(M) of
        {ok, #{name := Name, status := active}} -> check_models(Name, Rest, Then);
        {ok, #{name := Name}} -> {error, {archived, M}};
        {ok, _} -> {error, {invalid_argument, variants}};
        {error, _} = E -> E
    end.

new_id(Kind, Name) ->
    N = erlang:unique_integer([positive, monotonic]),
    <<Kind/binary, "-", Name/binary, "-", (integer_to_binary(erlang:system_time(millisecond)))/binary,
      "-", (integer_to_binary(N))/binary>>.

with_test(Id, #{tests := Ts} = S, Fun) ->
    case Ts of
        #{Id := T} ->
            case Fun(T) of
                {ok, T1} ->
                    S1 = publish_sinks(S#{tests => Ts#{Id => T1}}),
                    publish(maps:get(name, T1), S1),
                    {reply, ok, S1};
                {error, _} = E -> {reply, E, S}
            end;
        _ -> {reply, {error, not_found}, S}
    end.

%%% ------------------------------------------------------------------
%%% Evaluation
%%% ------------------------------------------------------------------

eval_all(#{tests := Ts} = S) ->
    lists:foldl(fun eval_one/2, S, maps:keys(Ts)).

eval_one(Id, #{tests := Ts} = S) ->
    T = maps:get(Id, Ts),
    %% a failing evaluation of one test must not take the others down with
    %% this process: it is logged and the test stays as it was
    try
        case T of
            #{status := finished} -> S;
            #{kind := ab} -> apply_change(T, eval_ab(T), S);
            #{kind := rollout} -> apply_change(T, eval_rollout(T), S)
        end
    catch Class:Reason:Stack ->
            logger:error("dspex_models: evaluating ~ts failed: ~p", [Id, {Class, Reason, Stack}]),
            S
    end.

apply_change(Old, New, #{tests := Ts} = S) ->
    S1 = S#{tests => Ts#{maps:get(id, New) => New}},
    Split = fun(T) -> maps:with([status, step], T) end,
    case Split(Old) =:= Split(New) of
        true -> S1;
        false ->
            S2 = publish_sinks(S1),
            publish(maps:get(name, New), S2),
            S2
    end.

arms(#{ref := Ref, models := Models}) ->
    Slots = dspex_models_stats:slots(),
    [{M, dspex_models_stats:snapshot(Ref, I * Slots)} || {I, M} <- lists:enumerate(0, Models)].

eval_ab(#{spec := Spec, last := Last, started := Started, max_duration := MaxD} = T) ->
    Arms = arms(T),
    R = dspex_models_stats:evaluate(Arms, Spec, Last),
    D0 = maps:get(decision, R),
    D = case D0 of
            continue when MaxD =/= infinity ->
                case now_ms() - Started >= MaxD of
                    true -> {stopped, max_duration};
                    false -> continue
                end;
            _ -> D0
        end,
    T1 = T#{last => R, decision => D},
    case D of
        continue -> T1;
        _ ->
            emit_decision(T1, D),
            T1#{status => finished}
    end.

arm_view(A) ->
    #{n => maps:get(n, A), successes => maps:get(successes, A),
      success_rate => case maps:get(n, A) of 0 -> undefined; N -> maps:get(successes, A) / N end,
      latency_p50_ms => dspex_models_stats:quantile(A, 0.5),
      latency_p95_ms => dspex_models_stats:quantile(A, 0.95)}.

emit_decision(#{id := Id, name := Name} = T, D) ->
    Last = maps:get(last, T, #{}),
    dspex_telemetry:execute([dspex, models, decision], #{count => 1},
                            #{id => Id, name => Name, kind => maps:get(kind, T), decision => D,
                              p_value => maps:get(p_value, Last, undefined)}).

eval_rollout(#{status := paused} = T) ->
    T#{gate_results => gate_results(T)};
eval_rollout(#{status := running, step := Step, steps := Steps, step_started := SS,
               step_duration := Dur, name := Name, id := Id} = T) ->
    Gs = gate_results(T),
    T1 = T#{gate_results => Gs},
    Failed = [G || #{verdict := fail} = G <- Gs],
    AllPass = lists:all(fun(#{verdict := V}) -> V =:= pass end, Gs),
    case Failed of
        [G | _] -> do_rollback(T1, {gate, maps:get(metric, G)}, G);
        [] when AllPass ->
            NewN = new_n(T),
            case now_ms() - SS >= Dur andalso NewN - maps:get(step_base_n, T, 0) >= maps:get(min_samples, T) of
                false -> T1;
                true ->
                    Next = Step + 1,
                    Pct = lists:nth(Next, Steps),
                    dspex_telemetry:execute([dspex, models, rollout, step], #{count => 1},
                                            #{id => Id, name => Name, step => Next, percent => Pct}),
                    case Pct == 100 of
                        true ->
                            [_, New] = maps:get(models, T),
                            Promote = dspex_models:set_alias(Name, production, New),
                            dspex_telemetry:execute([dspex, models, rollout, complete], #{count => 1},
                                                    #{id => Id, name => Name, model => New,
                                                      result => Promote}),
                            T1#{step => Next, status => finished, decision => completed};
                        false ->
                            T1#{step => Next, step_started => now_ms(), step_base_n => NewN}
                    end
            end;
        [] -> T1
    end.

new_n(#{ref := Ref}) -> counters:get(Ref, dspex_models_stats:slots() + 1).

gate_results(#{alpha := Alpha, gates := Gates, min_samples := MinS} = T) ->
    [{_, Base}, {_, New}] = arms(T),
    GAlpha = Alpha / length(Gates),
    [gate(G, Base, New, GAlpha, MinS) || G <- Gates].

%% p95: the share of the new model's requests slower than (1 + D) times the
%% baseline's p95 (from the histograms); more than 5% of them, with
%% confidence, means its p95 is worse than that
gate(#{metric := latency_p95, max_degradation := D} = G, Base, New, GAlpha, MinS) ->
    #{exceed := X, n := N, threshold_ms := ThrMs, p95_baseline_ms := PB} =
        dspex_models_stats:exceedance(Base, New, 0.95, 1 + D),
    P = (X + 0.5) / (N + 1),
    Rate = if N > 0 -> X / N; true -> 0.0 end,
    #{ci := {Lo, Hi}} = dspex_models_stats:msprt(Rate - 0.05, P * (1 - P) / max(1, N), 0.05, GAlpha),
    Enough = maps:get(n, Base) >= MinS andalso N >= MinS,
    Verdict = if not Enough -> pending;
                 Lo > 0 -> fail;
                 Hi < 0 -> pass;
                 true -> pending
              end,
    G#{verdict => Verdict, degradation => Rate - 0.05, ci => {Lo, Hi}, threshold => 0.0,
       exceed_rate => Rate, threshold_ms => ThrMs, p95_baseline_ms => PB,
       p95_new_ms => dspex_models_stats:quantile(New, 0.95),
       n_baseline => maps:get(n, Base), n_new => N};
gate(#{metric := M, max_degradation := D} = G, Base, New, GAlpha, MinS) ->
         {Metric, Thr} = case M of
                             error_rate -> {success, float(D)};
                             latency -> {latency, math:log(1 + D)}
                         end,
         C = dspex_models_stats:compare(Base, New, Metric, #{alpha => GAlpha, tau => Thr}),
         {Lo, Hi} = maps:get(ci, C),
         %% degradation: failure-rate increase, or log-latency increase
         {DEst, DLo, DHi} = case Metric of
                                success -> {-maps:get(effect, C), -Hi, -Lo};
                                latency -> {maps:get(effect, C), Lo, Hi}
                            end,
         Enough = maps:get(n_control, C) >= MinS andalso maps:get(n_treatment, C) >= MinS,
         Verdict = if not Enough -> pending;
                      DLo > Thr -> fail;
                      DHi < Thr -> pass;
                      true -> pending
                   end,
         G#{verdict => Verdict, degradation => DEst, ci => {DLo, DHi}, threshold => Thr,
            n_baseline => maps:get(n_control, C), n_new => maps:get(n_treatment, C)}.

do_rollback(#{id := Id, name := Name} = T, Reason, Detail) ->
    dspex_telemetry:execute([dspex, models, rollout, rollback], #{count => 1},
                            #{id => Id, name => Name, reason => Reason,
                              step => maps:get(step, T), detail => Detail}),
    T#{status => finished, decision => {rolled_back, Reason}}.

view(T) ->
    Base = (maps:with([id, kind, name, status, decision, models, started], T))#{
             arm_summary => [{M, arm_view(A)} || {M, A} <- arms(T)]},
    V = case T of
        #{kind := ab, last := Last} ->
            Base#{p_value => maps:get(p_value, Last, 1.0),
                  comparisons => maps:get(comparisons, Last, #{}),
                  srm => maps:get(srm, Last, undefined),
                  weights => maps:get(weights, T),
                  spec => maps:get(spec, T)};
        #{kind := rollout, step := Step, steps := Steps} ->
            Base#{step => Step, percent => percent(T), steps => Steps,
                  gates => maps:get(gate_results, T)}
        end,
    V#{decision => maps:get(decision, T)}.

percent(#{status := finished, decision := completed}) -> 100;
percent(#{status := finished}) -> 0;
percent(#{step := Step, steps := Steps}) -> lists:nth(Step, Steps).

%%% ------------------------------------------------------------------
%%% Publication
%%% ------------------------------------------------------------------

%% `production' may move on another node (the registry is shared in a
%% cluster): every tick re-reads the aliases and republishes what changed
refresh_production(S) ->
    case dspex_store:list(dspex_models:registry_session(), <<"alias:*:production">>) of
        {ok, Vars} -> [publish(binary:part(N, 6, byte_size(N) - 17), S) || #{name := N} <- Vars];
        {error, _} -> []
    end,
    ok.

publish(Name, #{tests := Ts}) ->
    Active = [T || {_, #{name := N, status := St} = T} <- maps:to_list(Ts), N =:= Name,
                   St =/= finished],
    Route = case Active of
                [#{kind := ab, salt := Salt, unit := U, models := Ms, weights := Ws}] ->
                    {split, U, Salt, table(lists:zip(Ms, Ws))};
                [#{kind := rollout, salt := Salt, unit := U, models := [Base, New]} = T] ->
                    Cut = round(percent(T) * ?BUCKETS / 100),
                    {split, U, Salt, list_to_tuple(lists:duplicate(Cut, New) ++
                                                     lists:duplicate(?BUCKETS - Cut, Base))};
                [] ->
                    case dspex_models:get_alias(Name, production) of
                        {ok, Id} -> {single, Id};
                        {error, _} -> undefined
                    end
            end,
    put_changed(?ROUTE(Name), Route).

table(Weighted) ->
    Total = lists:sum([W || {_, W} <- Weighted]),
    {L, _, _} = lists:foldl(
                  fun({M, W}, {Acc, CumW, Used}) ->
                          Upto = round((CumW + W) * ?BUCKETS / Total),
                          {[lists:duplicate(Upto - Used, M) | Acc], CumW + W, Upto}
                  end, {[], 0, 0}, Weighted),
    list_to_tuple(lists:append(lists:reverse(L))).

publish_sinks(#{tests := Ts, sinks := Old} = S) ->
    Slots = dspex_models_stats:slots(),
    New = lists:foldl(
            fun(#{id := Id, ref := Ref, models := Ms, custom := C}, Acc) ->
                    lists:foldl(fun({I, M}, A) ->
                                        maps:update_with(M, fun(L) -> [{Id, Ref, I * Slots, C} | L] end,
                                                         [{Id, Ref, I * Slots, C}], A)
                                end, Acc, lists:enumerate(0, Ms))
            end, #{}, [T || T <- maps:values(Ts), maps:get(status, T) =/= finished]),
    [persistent_term:erase(?INGEST(M)) || M <- maps:keys(Old), not maps:is_key(M, New)],
    maps:foreach(fun(M, Sinks) -> put_changed(?INGEST(M), lists:sort(Sinks)) end, New),
    S#{sinks => New}.

put_changed(Key, undefined) -> persistent_term:erase(Key), ok;
put_changed(Key, Value) ->
    case persistent_term:get(Key, '$none') of
        Value -> ok;
        _ -> persistent_term:put(Key, Value)
    end.

schedule() ->
    erlang:send_after(application:get_env(dspex_bridge, models_check_interval_ms, 1000), self(), tick).

now_ms() ->
    (application:get_env(dspex_bridge, models_clock, dspex_clock)):now_ms().
