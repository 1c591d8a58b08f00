%% @doc `make bench' part for the optimizers (issue #18): runs our built-in
%% algorithms through `dspex_opt' (real runs: session variables, locks, the C
%% kernels) on standard test functions with known optima, 20 seeds each, and
%% writes every run's best-so-far regret per trial to
%% `_build/bench/opt_ours.csv'; measures `ask' at 100 observations (BO, TPE)
%% into `_build/bench/opt_ask_overhead.csv'. `bench/opt_validate.py' then
%% runs Optuna (TPE, CMA-ES) and SciPy (differential_evolution,
%% dual_annealing) at the same budgets and writes the regret table and plots.
%% `OPT_BENCH_SEEDS' (default 20) sets the number of seeds.
-module(dspex_opt_bench).
-export([main/0, overhead/0, problems/0, f/2]).

-define(OUT, "_build/bench").

%% @doc The problems: `{Name, Dims ([{Lo, Hi}] numeric or {choice, N}), Budget, Optimum}'.
-spec problems() -> [{atom(), [{number(), number()} | {choice, pos_integer()}], pos_integer(), float()}].
problems() ->
    [{branin, [{-5.0, 10.0}, {0.0, 15.0}], 50, 0.397887357729739},
     {hartmann6, [{0.0, 1.0} || _ <- lists:seq(1, 6)], 50, -3.32236801141551},
     {rosenbrock5, [{-2.048, 2.048} || _ <- lists:seq(1, 5)], 100, 0.0},
     {rastrigin10, [{-5.12, 5.12} || _ <- lists:seq(1, 10)], 200, 0.0},
     {ackley5, [{-32.768, 32.768} || _ <- lists:seq(1, 5)], 100, 0.0},
     {mixed, [{choice, 4}, {choice, 3}, {-5.0, 10.0}, {0.0, 15.0}], 100, 0.0}].

algorithms(rastrigin10) -> [random, sa, ga, cmaes, tpe, spsa_adam];
algorithms(mixed) -> [random, sa, ga, cmaes, tpe, bo];
algorithms(_) -> [random, sa, ga, cmaes, tpe, bo, spsa_adam].

%% @doc The test functions (the same definitions as in opt_validate.py).
-spec f(atom(), [number()]) -> float().
f(branin, [X1, X2]) ->
    A = X2 - 5.1 / (4 * math:pi() * math:pi()) * X1 * X1 + 5 / math:pi() * X1 - 6,
    A * A + 10 * (1 - 1 / (8 * math:pi())) * math:cos(X1) + 10;
f(hartmann6, X) ->
    Alpha = [1.0, 1.2, 3.0, 3.2],
    A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]],
    P = [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]],
    -lists:sum([Al * math:exp(-lists:sum([Aij * (Xj - Pij / 10000) * (Xj - Pij / 10000)
                                           || {Aij, Pij, Xj} <- lists:zip3(Ai, Pi, X)]))
                || {Al, Ai, Pi} <- lists:zip3(Alpha, A, P)]);
f(rosenbrock5, X) ->
    lists:sum([100 * (B - A * A) * (B - A * A) + (1 - A) * (1 - A)
               || {A, B} <- lists:zip(lists:droplast(X), tl(X))]);
f(rastrigin10, X) ->
    10 * length(X) + lists:sum([Xi * Xi - 10 * math:cos(2 * math:pi() * Xi) || Xi <- X]);
f(ackley5, X) ->
    N = length(X),
    -20 * math:exp(-0.2 * math:sqrt(lists:sum([Xi * Xi || Xi <- X]) / N))
        - math:exp(lists:sum([math:cos(2 * math:pi() * Xi) || Xi <- X]) / N) + 20 + math:exp(1);
f(mixed, [C1, C2, X1, X2]) ->
    element(C1 + 1, {2.0, 0.0, 1.0, 3.0}) + element(C2 + 1, {1.0, 0.5, 0.0}) +
        (f(branin, [X1, X2]) - 0.397887357729739) / 10.

%% @doc Runs everything and writes the CSV files.
-spec main() -> ok.
main() ->
    _ = application:load(dspex_bridge),
    %% no listeners: the bench needs neither, and their ports may be taken
    application:set_env(dspex_bridge, grpc_enabled, false),
    application:set_env(dspex_bridge, prometheus_enabled, false),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    Seeds = case os:getenv("OPT_BENCH_SEEDS") of false -> 20; S -> list_to_integer(S) end,
    ok = filelib:ensure_dir(?OUT ++ "/x"),
    {ok, Csv} = file:open(?OUT ++ "/opt_ours.csv", [write]),
    io:format(Csv, "problem,algorithm,seed,trial,regret~n", []),
    io:format("~noptimizer bench: our algorithms, ~b seeds (Optuna/SciPy: bench/opt_validate.py)~n", [Seeds]),
    [begin
         T0 = erlang:monotonic_time(millisecond),
         Finals = [run_one(Csv, P, Alg, Seed) || Seed <- lists:seq(0, Seeds - 1)],
         io:format("  ~-12s ~-14s budget ~4b: median final regret ~.4g (~b ms)~n",
                   [Name, Alg, Budget, median(Finals), erlang:monotonic_time(millisecond) - T0])
     end || {Name, _, Budget, _} = P <- problems(), Alg <- algorithms(Name)],
    ok = file:close(Csv),
    overhead(),
    ok.

run_one(Csv, {Name, Dims, Budget, Opt}, Alg, Seed) ->
    S = iolist_to_binary(io_lib:format("bench_~s_~s_~b", [Name, Alg, Seed])),
    {ok, _} = dspex_store:create_session(S),
    Vars = register_vars(S, Dims),
    {ok, R} = dspex_opt:start(S, Vars, #{algorithm => Alg, budget => Budget, seed => Seed, optimum => Opt}),
    F = fun(Params) -> f(Name, values(Vars, Params)) end,
    {ok, _} = dspex_opt:run(R, F),
    Scores = [Sc || #{score := Sc} <- dspex_opt:trials(R)],
    {ok, _} = dspex_opt:stop(R, #{}),
    ok = dspex_store:delete_session(S),
    {_, Final} = lists:foldl(fun(Sc, {I, B}) ->
                                     B1 = min(B, Sc - Opt),
                                     io:format(Csv, "~s,~s,~b,~b,~.10g~n", [Name, Alg, Seed, I, B1]),
                                     {I + 1, B1}
                             end, {1, infinity}, Scores),
    Final.

register_vars(S, Dims) ->
    [begin
         V = iolist_to_binary(io_lib:format("x~b", [I])),
         {ok, _} = case D of
                       {choice, N} ->
                           Cs = [integer_to_binary(C) || C <- lists:seq(0, N - 1)],
                           dspex_store:register(S, V, choice, hd(Cs), #{constraints => #{choices => Cs}});
                       {Lo, Hi} ->
                           dspex_store:register(S, V, float, Lo, #{constraints => #{min => Lo, max => Hi}})
                   end,
         V
     end || {I, D} <- lists:zip(lists:seq(1, length(Dims)), Dims)].

%% @doc The time of dspex_opt:ask/1 (gen_server call + NIF on a dirty scheduler)
%% once 100 trials are told (BO, TPE) on Hartmann6: each of 10 seeds runs
%% 100 trials of the algorithm itself, then one more ask is timed: wall time,
%% and CPU time (the honest figure on a loaded machine): what the VM's
%% scheduler threads (normal and dirty CPU, where the gen_server and the NIF
%% run) spent during the call, from /proc/self/task/*/schedstat, less the
%% cost of reading those files (the least of 5 empty measurements).
-spec overhead() -> ok | {error, term()}.
overhead() ->
    ok = filelib:ensure_dir(?OUT ++ "/x"),
    {ok, Csv} = file:open(?OUT ++ "/opt_ask_overhead.csv", [write]),
    io:format(Csv, "algorithm,observations,median_ms,p90_ms,cpu_median_ms,cpu_p90_ms~n", []),
    {hartmann6, Dims, _, _} = lists:keyfind(hartmann6, 1, problems()),
    [begin
         Ms = [ask_after(Alg, Dims, 100, Seed) || Seed <- lists:seq(1, 10)],
         Ts = lists:sort([T || {T, _} <- Ms]),
         Med = lists:nth(5, Ts) / 1000,
         P90 = lists:nth(9, Ts) / 1000,
         {CMed, CP90} = case lists:sort([C || {_, C} <- Ms, C =/= undefined]) of
                            [_, _, _, _, _, _, _, _, _, _] = Cs -> {lists:nth(5, Cs) / 1.0e6, lists:nth(9, Cs) / 1.0e6};
                            _ -> {undefined, undefined}
                        end,
         io:format(Csv, "~s,100,~.4f,~.4f,~s,~s~n", [Alg, Med, P90, num(CMed), num(CP90)]),
         io:format("  ask overhead at 100 observations, hartmann6: ~-6s wall median ~.3f ms, p90 ~.3f ms; "
                   "CPU median ~s ms, p90 ~s ms~n", [Alg, Med, P90, num(CMed), num(CP90)])
     end || Alg <- [tpe, bo]],
    file:close(Csv).

num(undefined) -> "nan";
num(X) -> io_lib:format("~.3f", [X]).

ask_after(Alg, Dims, N, Seed) ->
    S = iolist_to_binary(io_lib:format("bench_overhead_~s_~b", [Alg, Seed])),
    {ok, _} = dspex_store:create_session(S),
    Vars = register_vars(S, Dims),
    {ok, R} = dspex_opt:start(S, Vars, #{algorithm => Alg, budget => N + 1, seed => Seed}),
    [begin
         {ok, Id, P} = dspex_opt:ask(R),
         ok = dspex_opt:tell(R, Id, f(hartmann6, values(Vars, P)))
     end || _ <- lists:seq(1, N)],
    Tids = sched_tids(),
    Base = lists:min([begin A = cpu_ns(Tids), B = cpu_ns(Tids), sub(B, A) end || _ <- lists:seq(1, 5)]),
    C0 = cpu_ns(Tids),
    T0 = erlang:monotonic_time(microsecond),
    {ok, _, _} = dspex_opt:ask(R),
    T = erlang:monotonic_time(microsecond) - T0,
    C = case {sub(cpu_ns(Tids), C0), Base} of
            {undefined, _} -> undefined;
            {D, undefined} -> D;
            {D, B0} -> max(0, D - B0)
        end,
    {ok, _} = dspex_opt:stop(R, #{}),
    ok = dspex_store:delete_session(S),
    {T, C}.

%% The VM's scheduler threads (normal and dirty CPU) by name; [] without /proc.
sched_tids() ->
    case file:list_dir("/proc/self/task") of
        {ok, Ts} ->
            [T || T <- Ts,
                  case file:read_file("/proc/self/task/" ++ T ++ "/comm") of
                      {ok, <<_/binary>> = Name} ->
                          binary:match(Name, [<<"_scheduler">>, <<"_dirty_cpu_sch">>]) =/= nomatch;
                      _ -> false
                  end];
        _ -> []
    end.

%% Their CPU time in ns (the first field of schedstat); undefined if unreadable.
cpu_ns([]) -> undefined;
cpu_ns(Tids) ->
    try lists:sum([begin
                       {ok, B} = file:read_file("/proc/self/task/" ++ T ++ "/schedstat"),
                       [Ns | _] = binary:split(B, <<" ">>),
                       binary_to_integer(Ns)
                   end || T <- Tids])
    catch _:_ -> undefined
    end.

sub(undefined, _) -> undefined;
sub(_, undefined) -> undefined;
sub(A, B) -> A - B.

%% the function's arguments: numbers, categories (binaries "0", "1", ...) as integers
values(Vars, Params) ->
    [case maps:get(V, Params) of B when is_binary(B) -> binary_to_integer(B); X -> X end || V <- Vars].

median(L) -> lists:nth((length(L) + 1) div 2, lists:sort(L)).
