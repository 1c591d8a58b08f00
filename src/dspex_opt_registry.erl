%% @doc The algorithm registry of `dspex_opt': built-in algorithms and their
%% capabilities, plugins (`register/1'), performance records and the learned
%% selection (`select/1'). State is in two public ETS tables owned by
%% `dspex_bridge_sup' (`new_tables/0'), read without a server call.
-module(dspex_opt_registry).

-export([new_tables/0, builtin/0, lookup/1, register/1, record_performance/3, select/1, task_class/1,
         problem_regret/3, regret/3, all/0]).

-define(ALGS, dspex_opt_algorithms).
-define(PERF, dspex_opt_performance).
%% rows kept per task class (the oldest go first)
-define(MAX_ROWS, 1000).

-type class() :: {continuous | discrete | mixed, pos_integer(), pos_integer(), boolean()}.
-export_type([class/0]).

%% @private Creates the tables (called once by the supervisor, which owns them).
-spec new_tables() -> ok.
new_tables() ->
    _ = [ets:new(T, [named_table, public, Type, {read_concurrency, true}, {write_concurrency, true}])
         || {T, Type} <- [{?ALGS, set}, {?PERF, duplicate_bag}], ets:info(T) =:= undefined],
    ok.

%% @doc The built-in algorithms.
-spec builtin() -> [atom()].
builtin() -> [random, sa, ga, cmaes, tpe, bo, spsa_momentum, spsa_adam].

%% Capabilities of the built-in algorithms: which spaces they handle well,
%% whether they tolerate noisy objectives, dimension and budget ranges, and
%% their per-ask cost class (BO fits a GP, O(n^3)).
caps(random) -> #{spaces => [continuous, discrete, mixed], noisy => true, max_dims => 64, min_budget => 1,
                  max_budget => infinity, cost => constant};
caps(sa) -> #{spaces => [continuous, discrete, mixed], noisy => false, max_dims => 64, min_budget => 20,
              max_budget => infinity, cost => linear};
caps(ga) -> #{spaces => [continuous, discrete, mixed], noisy => true, max_dims => 64, min_budget => 40,
              max_budget => infinity, cost => linear};
caps(cmaes) -> #{spaces => [continuous, mixed], noisy => true, max_dims => 64, min_budget => 30,
                 max_budget => infinity, cost => linear};
caps(tpe) -> #{spaces => [continuous, discrete, mixed], noisy => true, max_dims => 64, min_budget => 15,
               max_budget => infinity, cost => linear};
caps(bo) -> #{spaces => [continuous, discrete, mixed], noisy => true, max_dims => 20, min_budget => 8,
              max_budget => 500, cost => cubic};
caps(spsa_momentum) -> #{spaces => [continuous], noisy => true, max_dims => 64, min_budget => 20,
                         max_budget => infinity, cost => linear};
caps(spsa_adam) -> #{spaces => [continuous], noisy => true, max_dims => 64, min_budget => 20,
                     max_budget => infinity, cost => linear}.

%% @doc `{builtin, Caps}', `{plugin, Module, Caps}' or `error'.
-spec lookup(term()) -> {builtin, map()} | {plugin, module(), map()} | error.
lookup(Id) ->
    case lists:member(Id, builtin()) of
        true -> {builtin, caps(Id)};
        false ->
            case ets:lookup(?ALGS, {plugin, Id}) of
                [{_, Mod, Caps}] -> {plugin, Mod, Caps};
                [] -> error
            end
    end.

%% @doc Every algorithm id with its capabilities.
-spec all() -> [{term(), map()}].
all() ->
    [{A, caps(A)} || A <- builtin()] ++ lists:sort([{Id, C} || {{plugin, Id}, _, C} <- ets:tab2list(?ALGS)]).

%% @doc Registers a plugin: `#{id => Id, module => Module, capabilities =>
%% Caps}' (Caps as in `all/0'; defaults: every space, not noisy, 64 dims, any
%% budget). The module implements `dspex_algorithm'; it is first run on a small
%% mixed problem (20 trials, in a separate process, 5 s at most) and refused
%% when it crashes, returns a malformed value or proposes a point outside the
%% space: `{error, {invalid_plugin, Why}}'.
-spec register(map()) -> ok | {error, term()}.
register(#{id := Id, module := Mod} = Spec) when is_atom(Mod) ->
    Given = maps:get(capabilities, Spec, #{}),
    Caps = case is_map(Given) of
               true -> maps:merge(#{spaces => [continuous, discrete, mixed], noisy => false, max_dims => 64,
                                    min_budget => 1, max_budget => infinity, cost => linear}, Given);
               false -> Given
           end,
    case check_caps(Caps) =:= ok andalso lookup(Id) of
        false -> {error, {invalid_argument, capabilities}};
        error ->
            case validate_plugin(Mod) of
                ok ->
                    case ets:insert_new(?ALGS, {{plugin, Id}, Mod, Caps}) of
                        true -> ok;
                        false -> {error, {already_exists, Id}}
                    end;
                Error -> Error
            end;
        _ -> {error, {already_exists, Id}}
    end;
register(_) ->
    {error, {invalid_argument, spec}}.

%% Capabilities that selection can read (why_not/5, speed/2): a row it could not compare would make every
%% later select/1 fail.
check_caps(#{spaces := Sps, noisy := N, max_dims := MD, min_budget := MinB, max_budget := MaxB, cost := Cost})
  when is_list(Sps), Sps =/= [], is_boolean(N), is_integer(MD), MD >= 1, is_integer(MinB), MinB >= 1,
       MaxB =:= infinity orelse (is_integer(MaxB) andalso MaxB >= MinB),
       is_atom(Cost) ->
    case Sps -- [continuous, discrete, mixed] of
        [] -> ok;
        _ -> error
    end;
check_caps(_) -> error.

validate_plugin(Mod) ->
    _ = code:ensure_loaded(Mod),
    case [F || {F, A} <- [{init, 2}, {ask, 2}, {tell, 4}], not erlang:function_exported(Mod, F, A)] of
        [] ->
            {Pid, MRef} = spawn_monitor(fun() -> exit({result, trial_run(Mod)}) end),
            receive
                {'DOWN', MRef, process, Pid, {result, R}} -> R;
                {'DOWN', MRef, process, Pid, Reason} -> {error, {invalid_plugin, {crashed, Reason}}}
            after 5000 ->
                    exit(Pid, kill),
                    receive {'DOWN', MRef, process, Pid, _} -> ok end,
                    {error, {invalid_plugin, timeout}}
            end;
        Missing -> {error, {invalid_plugin, {missing_callbacks, Missing}}}
    end.

%% The registration problem: two numeric dimensions and one with 3 categories.
trial_run(Mod) ->
    Dims = [0, 0, 3],
    Space = [#{name => <<"a">>, type => float, min => 0.0, max => 1.0, scale => linear},
             #{name => <<"b">>, type => float, min => 0.0, max => 1.0, scale => linear},
             #{name => <<"c">>, type => choice, choices => [0, 1, 2]}],
    F = fun([A, B, C]) -> (A - 0.3) * (A - 0.3) + (B - 0.7) * (B - 0.7) + abs(C - 1) end,
    try Mod:init(Dims, #{seed => 1, budget => 20}) of
        {ok, S0} -> trial_loop(Mod, Space, F, S0, 0);
        Other -> {error, {invalid_plugin, {bad_return, init, Other}}}
    catch C:R -> {error, {invalid_plugin, {crashed, {C, R}}}}
    end.

trial_loop(_Mod, _Space, _F, _S, 20) -> ok;
trial_loop(Mod, Space, F, S, T) ->
    try Mod:ask(S, T) of
        {ok, P, S1} ->
            case dspex_opt_space:check_point(Space, P) of
                true ->
                    case Mod:tell(S1, T, P, float(F(P))) of
                        {ok, S2} -> trial_loop(Mod, Space, F, S2, T + 1);
                        Other -> {error, {invalid_plugin, {bad_return, tell, Other}}}
                    end;
                false -> {error, {invalid_plugin, {out_of_bounds, P}}}
            end;
        Other -> {error, {invalid_plugin, {bad_return, ask, Other}}}
    catch C:R -> {error, {invalid_plugin, {crashed, {C, R}}}}
    end.

%% @doc The task class of a request (`select/1''s map) or a class itself:
%% `{Space, DimsBucket, BudgetBucket, Noisy}', buckets being the upper bounds
%% 2, 5, 10, 20, 64 (dims) and 50, 200, 1000, 100000 (budget).
-spec task_class(map() | class()) -> {ok, class()} | {error, term()}.
task_class({Sp, D, B, N} = C)
  when (Sp =:= continuous orelse Sp =:= discrete orelse Sp =:= mixed), is_integer(D), is_integer(B), is_boolean(N) ->
    %% a class is what a request maps to (its buckets): any other tuple could never be selected from
    case task_class(#{space => Sp, dims => D, budget => B, noisy => N}) of
        {ok, C} -> {ok, C};
        _ -> {error, {invalid_argument, task_class}}
    end;
task_class(#{space := Sp, dims := D, budget := B} = Req)
  when (Sp =:= continuous orelse Sp =:= discrete orelse Sp =:= mixed), is_integer(D), D >= 1,
       is_integer(B), B >= 1 ->
    case maps:get(noisy, Req, false) of
        N when is_boolean(N) -> {ok, {Sp, bucket(D, [2, 5, 10, 20, 64]), bucket(B, [50, 200, 1000, 100000]), N}};
        _ -> {error, {invalid_argument, noisy}}
    end;
task_class(_) ->
    {error, {invalid_argument, task_class}}.

bucket(V, [B]) -> max(V, B);
bucket(V, [B | _]) when V =< B -> B;
bucket(V, [_ | Bs]) -> bucket(V, Bs).

%% @doc Records the normalised final regret (0 = optimum reached, 1 = worst)
%% of algorithm `Alg' on a task of class `Class' (a class or a request map);
%% `Regret' may also be `#{regret => R, ask_us => Microseconds}'.
-spec record_performance(term(), map() | class(), number() | map()) -> ok | {error, term()}.
record_performance(Alg, Class0, Perf) ->
    {Regret, AskUs} = case Perf of
                          #{regret := R} -> {R, maps:get(ask_us, Perf, undefined)};
                          R -> {R, undefined}
                      end,
    case {task_class(Class0), lookup(Alg)} of
        {{error, _} = E, _} -> E;
        {_, error} -> {error, {unknown_algorithm, Alg}};
        {{ok, Class}, _} when is_number(Regret), Regret >= 0, Regret =< 1 ->
            true = ets:insert(?PERF, {Class, Alg, float(Regret), AskUs}),
            trim(Class),
            ok;
        _ -> {error, {invalid_argument, regret}}
    end.

trim(Class) ->
    case ets:lookup(?PERF, Class) of
        Rows when length(Rows) > ?MAX_ROWS -> ets:delete_object(?PERF, hd(Rows)), ok;
        _ -> ok
    end.

%% @doc The regret of a run on problem `Key', normalised: `(Best - Lo) /
%% (Median - Lo)' clamped to `[0, 1]', where `Lo' is the best score ever seen
%% on that problem (this run's included) and `Median' the median of this run's
%% `Scores' (all minimised). 0: the run found the best known value.
-spec problem_regret(term(), float(), [float()]) -> float().
problem_regret(Key, Best, Scores) ->
    Lo = case ets:lookup(?ALGS, {problem, Key}) of
             [{_, L}] -> lists:min([L, Best | Scores]);
             [] -> lists:min([Best | Scores])
         end,
    true = ets:insert(?ALGS, {{problem, Key}, Lo}),
    regret(Best, Lo, Scores).

%% @doc `(Best - Opt) / (Median(Scores) - Opt)' clamped to `[0, 1]'.
-spec regret(float(), float(), [float()]) -> float().
regret(_Best, _Opt, []) -> 0.0;
regret(Best, Opt, Scores) ->
    Med = lists:nth((length(Scores) + 1) div 2, lists:sort(Scores)),
    case Med > Opt of
        true -> min(1.0, max(0.0, (Best - Opt) / (Med - Opt)));
        false -> 0.0
    end.

%% @doc Picks an algorithm for a task: `#{space, dims, budget, noisy,
%% priorities => #{quality => Q, speed => S}, seed}'. Candidates are filtered by
%% capability; each gets a Thompson sample of its success rate (1 - regret) on
%% past runs of the same task class (Beta posterior, uniform prior), mixed with
%% its speed (from measured ask times, else its cost class) by the priorities;
%% the highest wins. Returns `{ok, Id, Why}' with `Why' =
%% `#{class, candidates, excluded, scores, rule}'.
-spec select(map()) -> {ok, term(), map()} | {error, term()}.
select(Req) when is_map(Req) ->
    case task_class(Req) of
        {ok, {Sp, _, _, Noisy} = Class} ->
            D = maps:get(dims, Req),
            B = maps:get(budget, Req),
            Pri = maps:get(priorities, Req, #{}),
            {Q, S} = case is_map(Pri) of
                         true -> {maps:get(quality, Pri, 1.0), maps:get(speed, Pri, 0.0)};
                         false -> {bad, bad}
                     end,
            Seed = maps:get(seed, Req, undefined),
            case is_number(Q) andalso is_number(S) andalso Q >= 0 andalso S >= 0 andalso Q + S > 0 of
                false -> {error, {invalid_argument, priorities}};
                true when Seed =/= undefined, not is_integer(Seed) -> {error, {invalid_argument, seed}};
                true ->
                    Rand0 = case Seed of
                                undefined -> rand:seed_s(exsss);
                                _ -> rand:seed_s(exsss, Seed)
                            end,
                    {Cands, Excl} = lists:foldr(
                                      fun({Id, C}, {In, Out}) ->
                                              case why_not(C, Sp, D, B, Noisy) of
                                                  ok -> {[Id | In], Out};
                                                  Why -> {In, Out#{Id => Why}}
                                              end
                                      end, {[], #{}}, all()),
                    case Cands of
                        [] -> {error, {no_algorithm, Excl}};
                        _ -> choose(Class, Cands, Excl, Q, S, Rand0)
                    end
            end;
        Error -> Error
    end;
select(_) ->
    {error, {invalid_argument, request}}.

why_not(C, Sp, D, B, Noisy) ->
    #{spaces := Sps, noisy := N, max_dims := MD, min_budget := MinB, max_budget := MaxB} = C,
    if not is_list(Sps) -> {space, Sp};
       true ->
           case lists:member(Sp, Sps) of
               false -> {space, Sp};
               true when Noisy, not N -> noisy;
               true when D > MD -> {dims, D};
               true when B < MinB -> {budget, B};
               true when MaxB =/= infinity, B > MaxB -> {budget, B};
               true -> ok
           end
    end.

choose(Class, Cands, Excl, Q, S, Rand0) ->
    Rows = ets:lookup(?PERF, Class),
    {Scored, _} = lists:mapfoldl(
                    fun(Id, R0) ->
                            Mine = [{Rg, Us} || {_, A, Rg, Us} <- Rows, A =:= Id],
                            N = length(Mine),
                            Succ = lists:sum([1.0 - Rg || {Rg, _} <- Mine]),
                            {Theta, R1} = beta(1.0 + Succ, 1.0 + N - Succ, R0),
                            Speed = speed(Id, [Us || {_, Us} <- Mine, is_number(Us)]),
                            Score = (Q * Theta + S * Speed) / (Q + S),
                            {{Score, Id, #{runs => N, mean_regret => case N of 0 -> undefined;
                                                                                 _ -> 1.0 - Succ / N end,
                                           sample => Theta, speed => Speed, score => Score}}, R1}
                    end, Rand0, Cands),
    {_, Best, _} = lists:foldl(fun({Sc, _, _} = X, {BSc, _, _}) when Sc > BSc -> X;
                                  (_, Acc) -> Acc
                               end, hd(Scored), tl(Scored)),
    {ok, Best, #{class => Class, candidates => Cands, excluded => Excl,
                 scores => maps:from_list([{Id, M} || {_, Id, M} <- Scored]),
                 rule => <<"Thompson sampling: the highest of quality * Beta(1 + successes, 1 + failures) sample "
                           "+ speed * speed score, successes = sum of (1 - normalised final regret) of past runs "
                           "of this task class">>}}.

%% Speed in (0, 1]: from the measured mean ask time, else the cost class.
speed(_Id, [_ | _] = Us) ->
    Mean = lists:sum(Us) / length(Us),
    1.0 / (1.0 + max(0.0, math:log10(max(Mean, 1.0) / 100.0)));
speed(Id, []) ->
    Cost = case lookup(Id) of
               {builtin, #{cost := C}} -> C;
               {plugin, _, #{cost := C}} -> C;
               _ -> linear
           end,
    case Cost of
        constant -> 1.0;
        linear -> 0.8;
        _ -> 0.3
    end.

%% Beta(A, B) from two Gamma samples.
beta(A, B, R0) ->
    {X, R1} = gamma(A, R0),
    {Y, R2} = gamma(B, R1),
    {X / (X + Y), R2}.

%% Marsaglia-Tsang (shape >= 1; all our shapes are).
gamma(A, R0) ->
    D = A - 1.0 / 3.0,
    C = 1.0 / math:sqrt(9.0 * D),
    {Z, R1} = rand:normal_s(R0),
    V0 = 1.0 + C * Z,
    {U, R2} = rand:uniform_s(R1),
    case V0 > 0 of
        false -> gamma(A, R2);
        true ->
            V = V0 * V0 * V0,
            case math:log(U) < 0.5 * Z * Z + D - D * V + D * math:log(V) of
                true -> {D * V, R2};
                false -> gamma(A, R2)
            end
    end.
