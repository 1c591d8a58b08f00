%% @doc The process behind `dspex_models' experiments and rollouts. It
%% evaluates them every `models_check_interval_ms' (application env, default
%% 1000) and on `results/1', and publishes the routing tables read by
%% `dspex_models:select_model/2' and the ingest sinks read by
%% `dspex_models:record_inference/4' in `persistent_term' (rewritten only
%% when a split changes: a test starts or ends, a rollout step, an alias move;
%% a `production' move made on another node of a cluster is picked up at the
%% next evaluation, which re-reads the aliases).
%% Samples go straight from the recording process into each test's
%% `counters' array; this process only reads them.
%%
%% <b>Persistence.</b> Every test and rollout lives in the registry's store
%% session (`dspex_models:registry_session/0', replicated and failed over
%% like any session): the variable `test:Id' holds its whole definition and
%% state (status, decision, step, step start, the running minimum p-value
%% and the last results) in its metadata, its value is the status. The
%% variable `counts:Id:Node' holds the counts each node recorded for it (a
%% checkpoint, written at each evaluation when they changed). One node runs
%% the tests: the owner of the registry session (any node without a
%% cluster). Every call that changes or evaluates a test goes to that node's
%% server (`dspex_cluster:call_server/3'); it writes `test:Id' with a
%% compare-and-set on its version, so a stale owner cannot overwrite a newer
%% decision. Its evaluation adds its live counters to the other nodes'
%% checkpoints. Every other node re-reads the `test:*' variables at each tick
%% (and around each call it forwards), publishes the same routing (so a unit
%% gets the same model on every node) and checkpoints its own counts. A
%% restarted server (a crash, or the node that becomes owner after a
%% failover) reloads everything from the store, publishes the routing again
%% and restarts each test's counters of its node from that node's checkpoint:
%% what is lost is what was recorded on the node since its last checkpoint
%% (at most one check interval) and, after a node's death, the counts of
%% that node since its last checkpoint.
%%
%% <b>Events.</b> Each change of a test is also appended to the event log
%% of the registry session (`dspex_events:append/4', after the `test:Id'
%% write that records it): `model_test_started', `model_decision' (an A/B
%% decision, or a test or rollout stopped by hand: `data' has `decision'),
%% `rollout_started', `rollout_step' (`step', `percent'),
%% `rollout_rolled_back' (`reason': `{gate, Metric}' or `manual'),
%% `rollout_paused', `rollout_resumed' and `rollout_completed', with
%% `changed_by' (`dspex_models_server' for automatic ones, the caller's
%% `changed_by' (default `manual') for calls) and the caller's `principal'.
%%
%% Time comes from the `models_clock' module (env, default `dspex_clock').
-module(dspex_models_server).
-behaviour(gen_server).

-export([start_link/0, start_ab_test/1, start_rollout/3, results/1, stop_test/1, stop_test/2,
         list_tests/0, pause/1, pause/2, resume/1, resume/2, rollback/1, rollback/2,
         evaluate/0, republish/1, sync/0, archive/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, handle_continue/2]).

-define(ROUTE(Name), {dspex_models_route, Name}).
-define(INGEST(Model), {dspex_models_ingest, Model}).
-define(BUCKETS, 10000).
-define(SYNC_TIMEOUT, 60000).
%% ranges of the specs' numbers (README, "A/B tests" and "Rollouts")
-define(MAX_WEIGHT, 1.0e6).
-define(MIN_ALPHA, 1.0e-9).
-define(MAX_ALPHA, 0.5).
-define(MIN_POWER, 0.01).
-define(MAX_POWER, 0.9999).
-define(MIN_MDE, 1.0e-6).
-define(MAX_MDE, 1.0e6).
-define(MAX_DEGRADATION, 1.0e6).

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
%% name at a time (`{error, {busy, Id}}'). `principal' and `changed_by' go
%% into the metadata of its `model_test_started' event. Ranges: weights in
%% (0, 1e6], `alpha' a float in [1e-9, 0.5], `power' a float in
%% [0.01, 0.9999], `mde' in [1e-6, 1e6], `baseline' in (0, 1); the metric
%% `{custom, experiment}' is refused (`experiment' names the test in
%% `record_inference/4''s Meta). Errors: `{invalid_argument, Key}',
%% `{not_found, ModelId}', `{archived, ModelId}', `{internal, Reason}' (a
%% failure inside the server, logged; nothing changed).
-spec start_ab_test(map()) -> {ok, binary()} | {error, term()}.
start_ab_test(Spec) when is_map(Spec) -> owner_call({start_ab, Spec}).

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
%% moves `production' to `New' and ends the rollout (`completed'); a first
%% step of 100 is reached at once (completed at the first evaluation). A
%% move refused for good (`New' archived behind the server's back) rolls
%% back: `{rolled_back, {promote_failed, Reason}}'. `max_degradation' is in
%% (0, 1e6], `alpha' a float in [1e-9, 0.5].
%% `principal' and `changed_by' go into the metadata of its
%% `rollout_started' event.
-spec start_rollout(binary(), binary(), map()) -> {ok, binary()} | {error, term()}.
start_rollout(Name, New, Opts) when is_binary(Name), is_binary(New), is_map(Opts) ->
    owner_call({start_rollout, Name, New, Opts}).

%% @doc Evaluates the test or rollout now and returns its state:
%% `#{id, kind, name, status, decision, ...}' (tests: `p_value',
%% `comparisons' (per treatment `effect', `ci', `p_value', ...), `srm',
%% `arms'; rollouts: `step', `percent', `gates').
-spec results(binary()) -> {ok, map()} | {error, term()}.
results(Id) -> owner_call({results, Id}).

%% @doc Stops a test or rollout by hand (`{stopped, manual}'; a rollout's
%% traffic goes back to the baseline).
-spec stop_test(binary()) -> ok | {error, term()}.
stop_test(Id) -> stop_test(Id, #{}).

%% @doc `stop_test/1' on behalf of someone: `#{principal => binary(),
%% changed_by => term()}' go into the metadata of its event (the same
%% options for `pause/2', `resume/2', `rollback/2').
-spec stop_test(binary(), map()) -> ok | {error, term()}.
stop_test(Id, By) when is_map(By) -> owner_call({stop, Id, by(By)}).

%% @doc Id → `#{kind, name, status, decision}' of every test and rollout.
-spec list_tests() -> #{binary() => map()}.
list_tests() ->
    case owner_call(list) of
        Ts when is_map(Ts) -> Ts;
        {error, _} -> #{}
    end.

%% @doc Pauses a running rollout.
-spec pause(binary()) -> ok | {error, term()}.
pause(Id) -> pause(Id, #{}).

%% @doc `pause/1' on behalf of someone (see `stop_test/2').
-spec pause(binary(), map()) -> ok | {error, term()}.
pause(Id, By) when is_map(By) -> owner_call({pause, Id, by(By)}).

%% @doc Resumes a paused rollout (its step time restarts).
-spec resume(binary()) -> ok | {error, term()}.
resume(Id) -> resume(Id, #{}).

%% @doc `resume/1' on behalf of someone (see `stop_test/2').
-spec resume(binary(), map()) -> ok | {error, term()}.
resume(Id, By) when is_map(By) -> owner_call({resume, Id, by(By)}).

%% @doc Rolls a rollout back by hand.
-spec rollback(binary()) -> ok | {error, term()}.
rollback(Id) -> rollback(Id, #{}).

%% @doc `rollback/1' on behalf of someone (see `stop_test/2').
-spec rollback(binary(), map()) -> ok | {error, term()}.
rollback(Id, By) when is_map(By) -> owner_call({rollback, Id, by(By)}).

%% @doc Evaluates everything running now (on the node running the tests,
%% after this node's checkpoint) and returns when this node's routing
%% reflects the outcome. `{error, {retry, _}}' while that node cannot be
%% reached (a failover in progress, see `dspex_cluster:call_server/3').
-spec evaluate() -> ok | {error, term()}.
evaluate() -> owner_call(evaluate).

%% @doc Archives a model unless a running or paused test or rollout uses it
%% (`{error, {in_use, TestId}}'): decided on the node running the tests, in
%% the same process that starts them, so no test can start with a model
%% being archived. `dspex_models:archive_model/1' calls it.
-spec archive(binary()) -> ok | {error, term()}.
archive(ModelId) when is_binary(ModelId) -> owner_call({archive, ModelId}).

%% @doc Republishes the routing of `Name' (after a `production' move).
-spec republish(binary()) -> ok.
republish(Name) -> gen_server:cast(?MODULE, {republish, Name}).

%% @doc This node's part, now: checkpoints its counts and, unless it runs
%% the tests, re-reads them from the store and republishes their routing.
-spec sync() -> ok.
sync() -> gen_server:call(?MODULE, sync, ?SYNC_TIMEOUT).

%% A call for the node running the tests. A node that does not run them
%% checkpoints its counts first (so that the evaluation sees them) and
%% re-reads the outcome after.
owner_call(Msg) ->
    Follower = follower(),
    Follower andalso sync(),
    R = dspex_cluster:call_server(dspex_models:registry_session(), ?MODULE, Msg),
    Follower andalso sync(),
    R.

follower() ->
    dspex_cluster:enabled() andalso not dspex_cluster:is_owner(dspex_models:registry_session()).

by(Opts) ->
    maps:merge(#{changed_by => manual},
               maps:filter(fun(principal, P) -> is_binary(P);
                              (changed_by, _) -> true;
                              (_, _) -> false
                           end, Opts)).

%%% ------------------------------------------------------------------

%% @private
-spec init([]) -> {ok, map(), {continue, load}}.
init([]) ->
    %% the routing is rebuilt from the store (handle_continue, before any
    %% call: the store may be on another node)
    [persistent_term:erase(K) || {K, _} <- persistent_term:get(),
                                 is_tuple(K), tuple_size(K) =:= 2,
                                 element(1, K) =:= dspex_models_route
                                     orelse element(1, K) =:= dspex_models_ingest],
    schedule(),
    {ok, #{tests => #{}, sinks => #{}, vsns => #{}, ckpt => #{}, owner => false}, {continue, load}}.

%% @private
-spec handle_continue(load, map()) -> {noreply, map()}.
handle_continue(load, S) ->
    S1 = load_tests(S),
    refresh_production(S1),
    {noreply, S1}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(sync, _From, S) ->
    S1 = checkpoint_all(S),
    S2 = case follower() of
             true -> load_tests(S1#{owner => false});
             false -> S1
         end,
    refresh_production(S2),
    {reply, ok, S2};
handle_call(Msg, From, S) ->
    %% a bug reached by one call's input (statistics on extreme numbers, say)
    %% fails that call, not the process holding every test's live counters
    try owner_handle(Msg, From, as_owner(S))
    catch Class:Reason:Stack ->
            logger:error("dspex_models: call ~P failed: ~p", [Msg, 20, {Class, Reason, Stack}]),
            {reply, {error, {internal, Reason}}, S}
    end.

owner_handle({start_ab, Spec}, _From, S) ->
    case new_ab(Spec, S) of
        {ok, T} -> started(T, by(Spec), S);
        {error, _} = E -> {reply, E, S}
    end;
owner_handle({start_rollout, Name, New, Opts}, _From, S) ->
    case new_rollout(Name, New, Opts, S) of
        {ok, T} -> started(T, by(Opts), S);
        {error, _} = E -> {reply, E, S}
    end;
owner_handle({results, Id}, _From, S) ->
    case S of
        #{tests := #{Id := _}} ->
            S1 = eval_one(Id, S),
            case S1 of
                #{tests := #{Id := T}} -> {reply, {ok, view(T)}, S1};
                _ -> {reply, {error, not_found}, S1}
            end;
        _ -> {reply, {error, not_found}, S}
    end;
owner_handle({stop, Id, By}, _From, S) ->
    with_test(Id, By, S, fun(#{status := St} = T) when St =:= running; St =:= paused ->
                                 emit_decision(T, {stopped, manual}),
                                 {ok, T#{status => finished, decision => {stopped, manual}}};
                            (_) -> {error, finished}
                         end);
owner_handle({pause, Id, By}, _From, S) ->
    with_test(Id, By, S, fun(#{kind := rollout, status := running} = T) -> {ok, T#{status => paused}};
                            (#{kind := rollout}) -> {error, not_running};
                            (_) -> {error, not_a_rollout}
                         end);
owner_handle({resume, Id, By}, _From, S) ->
    with_test(Id, By, S, fun(#{kind := rollout, status := paused} = T) ->
                                 {ok, T#{status => running, step_started => now_ms()}};
                            (#{kind := rollout}) -> {error, not_paused};
                            (_) -> {error, not_a_rollout}
                         end);
owner_handle({rollback, Id, By}, _From, S) ->
    with_test(Id, By, S, fun(#{kind := rollout, status := St} = T) when St =:= running; St =:= paused ->
                                 {ok, do_rollback(T, manual, #{})};
                            (#{kind := rollout}) -> {error, finished};
                            (_) -> {error, not_a_rollout}
                         end);
owner_handle(list, _From, #{tests := Ts} = S) ->
    {reply, maps:map(fun(_, T) -> maps:with([kind, name, status, decision], T) end, Ts), S};
owner_handle({archive, Model}, _From, #{tests := Ts} = S) ->
    case [Id || {Id, #{models := Ms, status := St}} <- maps:to_list(Ts), St =/= finished,
                lists:member(Model, Ms)] of
        [] -> {reply, dspex_models:archive_unchecked(Model), S};
        [Id | _] -> {reply, {error, {in_use, Id}}, S}
    end;
owner_handle(evaluate, _From, S) ->
    S1 = eval_all(S),
    refresh_production(S1),
    {reply, ok, S1};
owner_handle(_, _From, S) ->
    {reply, {error, unknown_call}, S}.

%% This node runs the tests now: after a failover (or a call that reached
%% it while it thought it did not own the session) it reloads them first.
as_owner(#{owner := true} = S) -> S;
as_owner(S) -> load_tests(S#{owner => true}).

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
    S1 = case follower() of
             true -> load_tests(checkpoint_all(S#{owner => false}));
             false -> eval_all(as_owner(S))
         end,
    refresh_production(S1),
    {noreply, S1};
handle_info(_, S) -> {noreply, S}.

%%% ------------------------------------------------------------------
%%% Creation
%%% ------------------------------------------------------------------

started(#{id := Id, name := Name} = T, By, S) ->
    case commit(undefined, T, By, S) of
        {ok, S1} ->
            dspex_telemetry:execute([dspex, models, start], #{count => 1},
                                    #{id => Id, name => Name, kind => maps:get(kind, T)}),
            {reply, {ok, Id}, S1};
        {error, E, S1} -> {reply, {error, E}, S1}
    end.

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
                lists:all(fun({M, W}) -> is_binary(M) andalso valid_weight(W);
                             (_) -> false end, Variants)
                andalso length(lists:usort([M || {M, _} <- Variants])) =:= length(Variants)},
           %% `experiment' in record_inference's Meta names the test, so it
           %% cannot also be a custom metric's key
           {metric, Metric =:= success orelse Metric =:= latency
                orelse (is_tuple(Metric) andalso tuple_size(Metric) =:= 2 andalso element(1, Metric) =:= custom
                        andalso element(2, Metric) =/= experiment)},
           {alpha, valid_alpha(Alpha)},
           {power, is_float(Power) andalso Power >= ?MIN_POWER andalso Power =< ?MAX_POWER},
           {mde, is_number(Mde) andalso Mde >= ?MIN_MDE andalso Mde =< ?MAX_MDE},
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
                                  lists:member(M, [error_rate, latency, latency_p95]) andalso is_number(D)
                                      andalso D > 0 andalso D =< ?MAX_DEGRADATION;
                             (_) -> false end, Gates)},
           {alpha, valid_alpha(Alpha)},
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

%% The documented ranges: every statistic stays a finite float inside them.
%% Weights: only their ratios matter; the bound keeps the routing table's
%% arithmetic far from overflow.
valid_weight(W) -> is_number(W) andalso W > 0 andalso W =< ?MAX_WEIGHT.

valid_alpha(A) -> is_float(A) andalso A >= ?MIN_ALPHA andalso A =< ?MAX_ALPHA.

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

with_test(Id, By, #{tests := Ts} = S, Fun) ->
    case Ts of
        #{Id := T} ->
            case Fun(T) of
                {ok, T1} ->
                    case commit(T, T1, By, S) of
                        {ok, S1} -> {reply, ok, S1};
                        {error, E, S1} -> {reply, {error, E}, S1}
                    end;
                {error, _} = E -> {reply, E, S}
            end;
        _ -> {reply, {error, not_found}, S}
    end.

%%% ------------------------------------------------------------------
%%% Evaluation
%%% ------------------------------------------------------------------

eval_all(#{tests := Ts} = S) ->
    lists:foldl(fun eval_one/2, S, maps:keys(Ts)).

eval_one(Id, S0) ->
    S = checkpoint_one(Id, S0),
    T = maps:get(Id, maps:get(tests, S)),
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

apply_change(Old, New, S) ->
    case commit(Old, New, #{changed_by => ?MODULE}, S) of
        {ok, S1} -> S1;
        {error, _, S1} -> S1
    end.

%% each arm: this node's live counters plus the other nodes' checkpoints
arms(#{models := Models} = T) ->
    Counts = counts(T),
    Slots = dspex_models_stats:slots(),
    [{M, dspex_models_stats:from_counts(Counts, I * Slots)} || {I, M} <- lists:enumerate(0, Models)].

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
    AtFull = lists:nth(Step, Steps) == 100,
    case Failed of
        [G | _] -> do_rollback(T1, {gate, maps:get(metric, G)}, G);
        %% a step at 100 (only a first one, `steps => [100]', is ever
        %% current: later ones complete when reached): everyone is on the new
        %% model already, the baseline gets no traffic for a gate to pass on,
        %% and 100% is reached: complete
        [] when AtFull -> complete(T1, Step);
        [] when AllPass ->
            NewN = new_n(T),
            case now_ms() - SS >= Dur andalso NewN - maps:get(step_base_n, T, 0) >= maps:get(min_samples, T) of
                false -> T1;
                true ->
                    %% the last step is 100, and a step at 100 completes
                    %% when it is reached, so Step is never the last here
                    Next = Step + 1,
                    Pct = lists:nth(Next, Steps),
                    case Pct == 100 of
                        true -> complete(T1, Next);
                        false ->
                            dspex_telemetry:execute([dspex, models, rollout, step], #{count => 1},
                                                    #{id => Id, name => Name, step => Next, percent => Pct}),
                            T1#{step => Next, step_started => now_ms(), step_base_n => NewN}
                    end
            end;
        [] -> T1
    end.

%% 100% reached: `production' moves to the new model, then the rollout is
%% `completed'. A move refused for good (the model was archived or removed
%% meanwhile) rolls back (`{rolled_back, {promote_failed, Reason}}'); any
%% other failure (the store unreachable) leaves the rollout where it is,
%% for the next evaluation to retry.
complete(#{id := Id, name := Name, models := [_, New], step := Step} = T, Next) ->
    case dspex_models:set_alias(Name, production, New) of
        ok ->
            Next =/= Step andalso
                dspex_telemetry:execute([dspex, models, rollout, step], #{count => 1},
                                        #{id => Id, name => Name, step => Next, percent => 100}),
            dspex_telemetry:execute([dspex, models, rollout, complete], #{count => 1},
                                    #{id => Id, name => Name, model => New, result => ok}),
            T#{step => Next, status => finished, decision => completed};
        {error, {Why, _} = Reason} when Why =:= archived; Why =:= not_found; Why =:= invalid_argument ->
            logger:warning("dspex_models: rollout ~ts cannot promote ~ts: ~p", [Id, New, Reason]),
            do_rollback(T, {promote_failed, Reason}, #{});
        {error, Reason} ->
            logger:warning("dspex_models: rollout ~ts: promoting ~ts failed, retried at the next "
                           "evaluation: ~p", [Id, New, Reason]),
            T
    end.

new_n(T) -> element(dspex_models_stats:slots() + 1, counts(T)).

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
                [T] ->
                    %% load_tests/1 finishes a test whose split cannot be
                    %% built; this is the last guard of a shared process
                    try split(T)
                    catch Class:Reason ->
                            logger:error("dspex_models: no split for ~ts: ~p",
                                         [maps:get(id, T), {Class, Reason}]),
                            production(Name)
                    end;
                [] -> production(Name)
            end,
    put_changed(?ROUTE(Name), Route).

production(Name) ->
    case dspex_models:get_alias(Name, production) of
        {ok, Id} -> {single, Id};
        {error, _} -> undefined
    end.

split(#{kind := ab, salt := Salt, unit := U, models := Ms, weights := Ws}) ->
    {split, U, Salt, table(lists:zip(Ms, Ws))};
split(#{kind := rollout, salt := Salt, unit := U, models := [Base, New]} = T) ->
    Cut = round(percent(T) * ?BUCKETS / 100),
    {split, U, Salt, list_to_tuple(lists:duplicate(Cut, New) ++
                                       lists:duplicate(?BUCKETS - Cut, Base))}.

%% Bucket boundaries at the rounded cumulative shares. Integer weights use
%% exact integer arithmetic (no size limit); float weights above the
%% documented 1e6 (a test stored by an older release) are first divided by
%% the largest, so no sum overflows; within it the float formula of earlier
%% releases is kept, so their tests keep their splits.
table(Weighted) ->
    Ws = [W || {_, W} <- Weighted],
    Scaled = case lists:all(fun is_integer/1, Ws) of
                 true -> Weighted;
                 false ->
                     case lists:max(Ws) of
                         Max when Max =< ?MAX_WEIGHT -> Weighted;
                         Max -> [{M, W / Max} || {M, W} <- Weighted]
                     end
             end,
    Total = lists:sum([W || {_, W} <- Scaled]),
    {L, _, _} = lists:foldl(
                  fun({M, W}, {Acc, CumW, Used}) ->
                          Upto = upto(CumW + W, Total),
                          {[lists:duplicate(Upto - Used, M) | Acc], CumW + W, Upto}
                  end, {[], 0, 0}, Scaled),
    list_to_tuple(lists:append(lists:reverse(L))).

%% round(Cum * ?BUCKETS / Total), half up, exactly for integers
upto(Cum, Total) when is_integer(Cum), is_integer(Total) ->
    (2 * Cum * ?BUCKETS + Total) div (2 * Total);
upto(Cum, Total) -> round(Cum * ?BUCKETS / Total).

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

%%% ------------------------------------------------------------------
%%% Persistence (the registry's store session)
%%% ------------------------------------------------------------------

session() -> dspex_models:registry_session().

test_var(Id) -> <<"test:", Id/binary>>.

counts_prefix(Id) -> <<"counts:", Id/binary, ":">>.

counts_var(Id, Node) -> <<(counts_prefix(Id))/binary, (atom_to_binary(Node))/binary>>.

%% what is stored of a test: all but this node's counters
stored(T) -> maps:remove(ref, T).

%% Records a change of a test (`Old' is `undefined' for a new one) in the
%% store, then in this process, the routing and the event log. The write is a
%% compare-and-set on the version this node last read or wrote: if another
%% node wrote since (a stale owner), nothing changes here but a reload.
commit(Old, #{id := Id} = New, By, #{tests := Ts, vsns := Vs} = S) ->
    case Old =/= undefined andalso stored(Old) =:= stored(New) of
        true -> {ok, S};
        false ->
            case write_test(New, maps:get(Id, Vs, undefined)) of
                {ok, V} ->
                    S1 = S#{tests => Ts#{Id => New}, vsns => Vs#{Id => V}},
                    log_events(Old, New, By),
                    Split = fun(undefined) -> undefined;
                               (T) -> maps:with([status, step], T)
                            end,
                    case Split(Old) =:= Split(New) of
                        true -> {ok, S1};
                        false ->
                            S2 = publish_sinks(S1),
                            publish(maps:get(name, New), S2),
                            {ok, S2}
                    end;
                {error, {version_mismatch, _}} ->
                    %% another node wrote it since: take its version
                    logger:warning("dspex_models: ~ts was changed elsewhere; reloading", [Id]),
                    {error, {conflict, Id}, load_tests(S)};
                {error, Reason} ->
                    logger:warning("dspex_models: writing ~ts failed: ~p", [Id, Reason]),
                    {error, Reason, S}
            end
    end.

write_test(#{id := Id, status := St} = T, undefined) ->
    ok = dspex_models:ensure_session(),
    case dspex_store:register(session(), test_var(Id), string, atom_to_binary(St),
                              #{metadata => #{test => stored(T)}, history_limit => 4}) of
        {ok, _} -> {ok, 0};
        {error, _} = E -> E
    end;
write_test(#{id := Id, status := St} = T, V) ->
    dspex_store:set(session(), test_var(Id), atom_to_binary(St),
                    #{metadata => #{test => stored(T)}, expected_version => V}).

%% Every test of the store, each with this node's counters (kept, or
%% restored from this node's checkpoint); the routing of every name
%% concerned republished. A store that cannot be read keeps things as
%% they are (the next tick retries).
load_tests(#{tests := Old} = S) ->
    case dspex_store:list(session(), <<"test:*">>) of
        {ok, Vars} ->
            {Ts, Vs, Ck} =
                lists:foldl(
                  fun(#{metadata := #{test := #{id := Id, models := Ms} = T0}, version := V}, {TA, VA, CA}) ->
                          {Ref, CA1} = case Old of
                                           #{Id := #{ref := R}} -> {R, CA};
                                           _ -> restore(Id, length(Ms), CA)
                                       end,
                          T1 = publishable(T0#{ref => Ref}, maps:get(Id, Old, undefined)),
                          {TA#{Id => T1}, VA#{Id => V}, CA1};
                     (_, Acc) -> Acc
                  end, {#{}, #{}, maps:get(ckpt, S)}, Vars),
            S1 = publish_sinks(S#{tests => Ts, vsns => Vs, ckpt => maps:with(maps:keys(Ts), Ck)}),
            Names = lists:usort([N || #{name := N} <- maps:values(Ts) ++ maps:values(Old)]),
            [publish(N, S1) || N <- Names],
            S1;
        {error, session_not_found} -> S;
        {error, Reason} ->
            logger:warning("dspex_models: reading the tests failed: ~p", [Reason]),
            S
    end.

%% A stored test whose split cannot be built (written by an older release
%% without today's checks: weights of 1.0e308 made every load crash, so the
%% supervisor gave up and the application stopped, for the VM's life) is
%% taken as finished, `{stopped, invalid}', with a warning; the store keeps
%% the record as it was.
publishable(#{status := finished} = T, _Old) -> T;
publishable(T, Old) ->
    try split(T) of
        _ -> T
    catch Class:Reason ->
            case Old of
                #{decision := {stopped, invalid}} -> ok;
                _ -> logger:warning("dspex_models: stored test ~ts cannot be routed (~p); "
                                    "taken as finished, {stopped, invalid}",
                                    [maps:get(id, T, undefined), {Class, Reason}])
            end,
            T#{status => finished, decision => {stopped, invalid}}
    end.

%% counters of a test on this node, from this node's checkpoint
restore(Id, Arms, Ckpt) ->
    Ref = dspex_models_stats:new_counters(Arms),
    case dspex_store:get(session(), counts_var(Id, node())) of
        {ok, #{metadata := #{counts := _} = M}} ->
            Sparse = ckpt_counts(M),
            [counters:add(Ref, I, C) || {I, C} <- Sparse],
            {Ref, Ckpt#{Id => Sparse}};
        _ -> {Ref, Ckpt}
    end.

checkpoint_all(#{tests := Ts} = S) ->
    lists:foldl(fun checkpoint_one/2, S, maps:keys(Ts)).

%% writes this node's counts of a test when they changed since the last
%% checkpoint (`counts:Id:Node', only this node writes it)
checkpoint_one(Id, #{tests := Ts, ckpt := Ck} = S) ->
    case Ts of
        #{Id := #{ref := Ref, models := Ms}} ->
            Sparse = sparse(dspex_models_stats:counts(Ref, length(Ms))),
            case maps:get(Id, Ck, []) of
                Sparse -> S;
                _ ->
                    Var = counts_var(Id, node()),
                    Opts = #{metadata => #{counts => Sparse,
                                           layout => dspex_models_stats:counts_layout()}},
                    R = case dspex_store:set(session(), Var, atom_to_binary(node()), Opts) of
                            {error, {not_found, _}} ->
                                dspex_store:register(session(), Var, string, atom_to_binary(node()),
                                                     Opts#{history_limit => 0});
                            R0 -> R0
                        end,
                    case R of
                        {ok, _} -> S#{ckpt => Ck#{Id => Sparse}};
                        {error, Reason} ->
                            logger:warning("dspex_models: checkpoint of ~ts failed: ~p", [Id, Reason]),
                            S
                    end
            end;
        _ -> S
    end.

%% a checkpoint's counts in the current layout (one written before the
%% layout was recorded is layout 1)
ckpt_counts(#{counts := Sparse} = M) ->
    dspex_models_stats:upgrade_counts(maps:get(layout, M, 1), Sparse).

sparse(Counts) ->
    [{I, C} || {I, C} <- lists:enumerate(tuple_to_list(Counts)), C =/= 0].

%% this node's live counts plus the other nodes' checkpoints
counts(#{id := Id, ref := Ref, models := Ms}) ->
    Own = dspex_models_stats:counts(Ref, length(Ms)),
    Prefix = counts_prefix(Id),
    Mine = counts_var(Id, node()),
    case dspex_store:list(session(), <<Prefix/binary, "*">>) of
        {ok, Vars} ->
            lists:foldl(fun(#{name := N, metadata := #{counts := _} = M}, Acc) when N =/= Mine ->
                                lists:foldl(fun({I, C}, A) -> setelement(I, A, element(I, A) + C) end,
                                            Acc, ckpt_counts(M));
                           (_, Acc) -> Acc
                        end, Own, Vars);
        {error, _} -> Own
    end.

%% the event log records of a change (after the store has it)
log_events(Old, #{id := Id, name := Name, kind := Kind} = New, By) ->
    Data = #{id => Id, name => Name, kind => Kind, status => maps:get(status, New),
             decision => maps:get(decision, New)},
    Evs = case {Old, New} of
              {undefined, #{kind := ab}} -> [{model_test_started, #{models => maps:get(models, New)}}];
              {undefined, #{kind := rollout}} ->
                  [{rollout_started, #{models => maps:get(models, New), percent => percent(New)}}];
              _ -> change_events(Old, New)
          end,
    Meta = maps:merge(#{variable => test_var(Id)}, By),
    lists:foreach(
      fun({Type, More}) ->
              case dspex_events:enabled() of
                  false -> ok;
                  true ->
                      case dspex_events:append(session(), Type, maps:merge(Data, More), Meta) of
                          {ok, _} -> ok;
                          {error, Reason} ->
                              logger:warning("dspex_models: event ~p of ~ts not logged: ~p",
                                             [Type, Id, Reason])
                      end
              end
      end, Evs).

change_events(#{step := S0, steps := Steps} = Old, #{kind := rollout, step := S1} = New) ->
    [{rollout_step, #{step => S, percent => lists:nth(S, Steps)}} || S <- lists:seq(S0 + 1, S1)]
        ++ case {maps:get(status, Old), maps:get(status, New), maps:get(decision, New)} of
               {running, paused, _} -> [{rollout_paused, #{step => S1}}];
               {paused, running, _} -> [{rollout_resumed, #{step => S1}}];
               {St, finished, completed} when St =/= finished -> [{rollout_completed, #{step => S1}}];
               {St, finished, {rolled_back, R}} when St =/= finished ->
                   [{rollout_rolled_back, #{step => S1, reason => R}}];
               {St, finished, D} when St =/= finished -> [{model_decision, #{step => S1, decision => D}}];
               _ -> []
           end;
change_events(#{status := St}, #{kind := ab, status := finished} = New) when St =/= finished ->
    Last = maps:get(last, New, #{}),
    [{model_decision, #{p_value => maps:get(p_value, Last, undefined), srm => maps:get(srm, Last, undefined)}}];
change_events(_, _) -> [].
