%% @doc Ask/tell optimization runs over a session's variables.
%%
%% ```
%% {ok, Run} = dspex_opt:start(S, [temperature, max_tokens, style],
%%                             #{algorithm => tpe, direction => maximize, budget => 60, seed => 7}),
%% {ok, Id, Params} = dspex_opt:ask(Run),          % #{<<"temperature">> => 0.42, ...}
%% ok = dspex_opt:tell(Run, Id, 0.87),             % or {failed, Reason}
%% {ok, #{params := Best}} = dspex_opt:best(Run),
%% {ok, _} = dspex_opt:stop(Run, #{apply_best => true}).
%% '''
%% A run is a process that holds the optimizer lock (`dspex_locks') of every
%% variable of the run, so no one else writes them meanwhile; it reports each
%% told trial through the locks' progress API and, on `stop/2' with
%% `apply_best', writes the best parameters under the locks (as the run's
%% principal: with `as', that principal needs `write' too, else the run
%% stops with `applied => false' and `apply_errors => [access_denied]'). The
%% run ends (locks released) on `stop/2', when the process that started it
%% exits, or when it loses a lock (preempted, lease expired, or its session
%% deleted or expired: `{dspex_lock_lost, ...}'); calls on an ended run are
%% `{error, run_not_found}'.
%% Runs are temporary children of `dspex_opt_sup': one that crashes is not
%% restarted, its locks are freed by `dspex_locks' (it is their holder), and
%% nothing else goes down with it. The locks are taken in the run's process
%% once the supervisor started it, so waiting for one blocks no other start.
%%
%% The search space comes from the variables (`dspex_opt_space'). Candidates
%% come from a built-in algorithm (numeric kernels in C,
%% `c_src/core/opt_*.c': `random', `sa', `ga', `cmaes', `tpe', `bo',
%% `spsa_momentum', `spsa_adam') or a plugin (`register_algorithm/1'). Runs
%% are deterministic: the same seed and the same scores told in the same order
%% give the same asks. Several asks may be outstanding (`run/3' with
%% `parallel'); BO and TPE then treat pending trials as constant liars.
%% Costs at 100 observations (Hartmann6, CPU time of one `ask/1', see the
%% README's optimizer bench): BO about 3 ms (its refit from scratch every
%% 10th ask works on a subset), TPE under 0.5 ms. A BO ask's scratch memory
%% (up to about 6 MB) goes back to a pool of at most 16 blocks for later
%% asks, freed when the NIF library is unloaded.
-module(dspex_opt).
-behaviour(gen_server).

-export([start/3, ask/1, tell/3, best/1, trials/1, stop/2, run/2, run/3, info/1, lookup/1]).
-export([register_algorithm/1, select_algorithm/1, record_performance/3, algorithms/0]).
-export([start_link/1]).
-export([init/1, handle_continue/2, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% the built-in kernels' bounds (c_src/core/opt.h: DX_OPT_MAX_DIMS, DX_OPT_MAX_CATS)
-define(MAX_DIMS, 64).
-define(MAX_CATS, 4096).

-type run() :: pid().
-type trial_id() :: non_neg_integer().
-type params() :: #{binary() => term()}.
-type start_opts() :: #{algorithm => atom(), direction => minimize | maximize, budget => pos_integer(),
                        seed => non_neg_integer(), as => term(), context => term(), lock => map(),
                        owner => pid() | none, idle_timeout => pos_integer() | infinity,
                        noisy => boolean(), optimum => number(), problem => term()}.
-type objective() :: fun((params()) -> number() | {failed, term()})
                   | {workers, dspex_workers:pool(), binary() | atom()}.
-export_type([run/0, trial_id/0, params/0, objective/0]).

%%% API -------------------------------------------------------------------------

%% @doc Starts a run optimizing `Vars' (names or ids) of `Session'. Options:
%% `algorithm' (default `tpe'), `direction' (`minimize', the default, or
%% `maximize'), `budget' (number of trials, default 100), `seed' (default 0),
%% `as' / `context' (act for another session: `optimize' permission), `lock'
%% (options of `dspex_locks:acquire/4'; default `#{conflict => wait, timeout
%% => 5000}'), `noisy' (the objective is noisy: its task class for selection),
%% `optimum' (the known optimum, for the normalised regret recorded when the
%% run stops), `problem' (what runs of the same problem share for that regret;
%% default the session and the variable names), `owner' (the process whose
%% exit ends the run: default the caller; `none': no owner, give an
%% `idle_timeout'), `idle_timeout' (ms, default `infinity': the run ends,
%% locks released, when no call reached it for that long). Errors: those of
%% `dspex_opt_space:from_variables/2', `{unknown_algorithm, A}',
%% `{invalid_argument, Opt}', and those of `dspex_locks:acquire/4'.
-spec start(dspex_store:session_id(), [dspex_store:var_key()], start_opts()) -> {ok, run()} | {error, term()}.
start(Session, Vars, Opts) when is_map(Opts) ->
    %% a principal that does not parse raises here, in the caller, as every call taking one does
    check_principal(Opts),
    case check_opts(Opts) of
        {ok, Cfg} ->
            case space(Session, Vars, maps:get(algorithm, Cfg)) of
                {ok, Space} ->
                    case dspex_opt_sup:start_run({Session, Space, Cfg, maps:get(owner, Cfg)}) of
                        {ok, Pid} ->
                            %% the locks are taken after the supervisor's start
                            %% returned (a run waiting for a lock must not block
                            %% it): this call returns once they are held or not
                            case call(Pid, started) of
                                ok -> {ok, Pid};
                                {error, _} = E -> E
                            end;
                        {error, _} = E -> E
                    end;
                Error -> Error
            end;
        Error -> Error
    end;
start(_, _, _) ->
    {error, {invalid_argument, options}}.

%% @doc The next candidate: `{ok, TrialId, Params}'; `{error,
%% budget_exhausted}' once `budget' trials were asked.
-spec ask(run()) -> {ok, trial_id(), params()} | {error, term()}.
ask(Run) -> call(Run, ask).

%% @doc The result of a trial: a score (a finite number) or `{failed, Reason}'.
%% Errors: `{unknown_trial, Id}', `{already_told, Id}', `{invalid_argument, score}'.
-spec tell(run(), trial_id(), number() | {failed, term()}) -> ok | {error, term()}.
tell(Run, TrialId, Result) -> call(Run, {tell, TrialId, Result}).

%% @doc The best complete trial: `{ok, #{trial, params, score}}' or `{error, no_trials}'.
-spec best(run()) -> {ok, map()} | {error, term()}.
best(Run) -> call(Run, best).

%% @doc Every trial so far, by id: `#{id, params, state => pending | complete |
%% failed, score, reason}'.
-spec trials(run()) -> [map()] | {error, term()}.
trials(Run) ->
    case call(Run, trials) of
        {ok, Ts} -> Ts;
        {error, _} = E -> E
    end.

%% @doc The run's settings and counts (`id', `session', `principal' (its
%% `as' or `undefined'), `variables', `space', `algorithm', `direction',
%% `budget', `seed', `asked', `told', `pending').
-spec info(run()) -> {ok, map()} | {error, term()}.
info(Run) -> call(Run, info).

%% @doc The run of an id (`info/1''s `id', unguessable; how gRPC clients name
%% their runs).
-spec lookup(binary()) -> {ok, run()} | {error, run_not_found}.
lookup(RunId) -> dspex_opt_sup:lookup_run(RunId).

%% @doc Ends the run: with `#{apply_best => true}' writes the best parameters
%% to the variables under the locks (`dspex_locks:stop/2'), then releases the
%% locks and records the run's normalised regret for `select_algorithm/1'.
%% Returns `{ok, #{best => Best | undefined, applied => boolean(), trials => N}}'.
-spec stop(run(), #{apply_best => boolean()}) -> {ok, map()} | {error, term()}.
stop(Run, Opts) when is_map(Opts) -> call(Run, {stop, maps:get(apply_best, Opts, false) =:= true});
stop(_Run, _Opts) -> {error, {invalid_argument, options}}.

%% @doc `run(Run, Objective, #{})'.
-spec run(run(), objective()) -> {ok, map()} | {error, term()}.
run(Run, Objective) -> run(Run, Objective, #{}).

%% @doc Drives the run to the end of its budget: asks, evaluates `Objective'
%% (a fun of the parameters returning a score or `{failed, Reason}'; an
%% exception is a failed trial; or `{workers, Pool, Fn}': `dspex_workers:call/3'
%% of `Fn' with the parameters, the JSON number it returns being the score),
%% tells. Options: `parallel' (evaluations in flight, default 1), `timeout'
%% (ms per evaluation, default 60000, below 2^32: a fun's evaluation still
%% running then is killed and its trial failed with reason `timeout'; a pool's
%% call is bounded by it). A score that is no float (an integer past the float
%% range) fails its trial with `{not_a_score, S}'. Returns `best/1''s result.
%%
%% Every told trial (by `run/3' or `tell/3') emits `[dspex, opt, tell]', is
%% reported to the locks' progress and, when the event log is on, appended to
%% the session's log as an `optimization_trial' event (data: `run' (the id of
%% `info/1'), `algorithm', `trial', `told' (its rank in tell order), `params',
%% `state', `score' or `reason', `best_trial').
-spec run(run(), objective(), #{parallel => pos_integer(), timeout => pos_integer()}) ->
          {ok, map()} | {error, term()}.
run(Run, Objective, Opts) when is_map(Opts) ->
    P = maps:get(parallel, Opts, 1),
    T = maps:get(timeout, Opts, 60000),
    case is_integer(P) andalso P >= 1 andalso is_integer(T) andalso T > 0 andalso T < 1 bsl 32
        andalso valid_objective(Objective) of
        false -> {error, {invalid_argument, run}};
        %% a fun's evaluation is bounded here (its process killed at `timeout'); a pool's by its call
        true -> drive(Run, eval_fun(Objective, T), P, #{}, false, case is_function(Objective) of true -> T; false -> infinity end)
    end;
run(_Run, _Objective, _Opts) ->
    {error, {invalid_argument, options}}.

%% @doc Registers a plugin algorithm; see `dspex_opt_registry:register/1'.
-spec register_algorithm(map()) -> ok | {error, term()}.
register_algorithm(Spec) -> dspex_opt_registry:register(Spec).

%% @doc Chooses an algorithm for a task; see `dspex_opt_registry:select/1'.
-spec select_algorithm(map()) -> {ok, term(), map()} | {error, term()}.
select_algorithm(Req) -> dspex_opt_registry:select(Req).

%% @doc Records a run's normalised final regret; see
%% `dspex_opt_registry:record_performance/3'.
-spec record_performance(term(), map() | tuple(), number() | map()) -> ok | {error, term()}.
record_performance(Alg, Class, Regret) -> dspex_opt_registry:record_performance(Alg, Class, Regret).

%% @doc Every algorithm with its capabilities.
-spec algorithms() -> [{term(), map()}].
algorithms() -> dspex_opt_registry:all().

%%% internals of the API ---------------------------------------------------------

%% A principal (`as', also inside `lock') that is not a binary, or a `context' that is not a map: badarg,
%% raised before the run process exists (in it, dspex_locks:acquire/4 would crash the run instead).
check_principal(Opts) ->
    Ok = fun(O) -> (not is_map_key(as, O) orelse is_binary(map_get(as, O)))
                       andalso (not is_map_key(context, O) orelse is_map(map_get(context, O)))
         end,
    case Ok(Opts) andalso (not is_map(maps:get(lock, Opts, #{})) orelse Ok(maps:get(lock, Opts, #{}))) of
        true -> ok;
        false -> erlang:error(badarg)
    end.

%% The search space, within what a built-in kernel takes (dspex_nif:opt_ask/8 refuses more than
%% ?MAX_DIMS free dimensions or ?MAX_CATS categories in one: refused here, before any lock is taken).
space(Session, Vars, Alg) ->
    case dspex_opt_space:from_variables(Session, Vars) of
        {ok, Space} ->
            Builtin = element(1, dspex_opt_registry:lookup(Alg)) =:= builtin,
            Dims = dspex_opt_space:dims(Space),
            Wide = [N || #{name := N, choices := Cs} = D <- Space, not is_map_key(fixed, D), length(Cs) > ?MAX_CATS],
            if Builtin, length(Dims) > ?MAX_DIMS -> {error, {too_many_dimensions, length(Dims), ?MAX_DIMS}};
               Builtin, Wide =/= [] -> {error, {too_many_choices, hd(Wide), ?MAX_CATS}};
               true -> {ok, Space}
            end;
        Error -> Error
    end.

call(Run, Msg) when is_pid(Run) ->
    try gen_server:call(Run, Msg, infinity)
    catch exit:{noproc, _} -> {error, run_not_found};
          exit:{normal, _} -> {error, run_not_found}
    end;
call(_, _) ->
    {error, run_not_found}.

check_opts(Opts) ->
    Cfg = #{algorithm => maps:get(algorithm, Opts, tpe), direction => maps:get(direction, Opts, minimize),
            budget => maps:get(budget, Opts, 100), seed => maps:get(seed, Opts, 0),
            lock => maps:get(lock, Opts, #{}), noisy => maps:get(noisy, Opts, false),
            optimum => maps:get(optimum, Opts, undefined), problem => maps:get(problem, Opts, undefined),
            acl => maps:with([as, context], Opts), owner => maps:get(owner, Opts, self()),
            idle_timeout => maps:get(idle_timeout, Opts, infinity)},
    Checks = [{direction, lists:member(maps:get(direction, Cfg), [minimize, maximize])},
              {budget, is_integer(maps:get(budget, Cfg)) andalso maps:get(budget, Cfg) >= 1
                   andalso maps:get(budget, Cfg) =< 100000},
              {seed, is_integer(maps:get(seed, Cfg)) andalso maps:get(seed, Cfg) >= 0
                   andalso maps:get(seed, Cfg) < 1 bsl 64},
              {lock, is_map(maps:get(lock, Cfg))},
              {noisy, is_boolean(maps:get(noisy, Cfg))},
              {optimum, maps:get(optimum, Cfg) =:= undefined orelse is_number(maps:get(optimum, Cfg))},
              {owner, is_pid(maps:get(owner, Cfg)) orelse maps:get(owner, Cfg) =:= none},
              {idle_timeout, maps:get(idle_timeout, Cfg) =:= infinity
                   orelse (is_integer(maps:get(idle_timeout, Cfg)) andalso maps:get(idle_timeout, Cfg) > 0
                           andalso maps:get(idle_timeout, Cfg) < 1 bsl 32)}],
    case [K || {K, false} <- Checks] of
        [] ->
            case dspex_opt_registry:lookup(maps:get(algorithm, Cfg)) of
                error -> {error, {unknown_algorithm, maps:get(algorithm, Cfg)}};
                _ -> {ok, Cfg}
            end;
        [K | _] -> {error, {invalid_argument, K}}
    end.

valid_objective(F) when is_function(F, 1) -> true;
valid_objective({workers, Pool, Fn}) when is_atom(Pool), is_atom(Fn) orelse is_binary(Fn) -> true;
valid_objective(_) -> false.

eval_fun(F, _T) when is_function(F, 1) -> F;
eval_fun({workers, Pool, Fn}, T) ->
    fun(Params) ->
            case dspex_workers:call(Pool, {Fn, [Params]}, T) of
                {ok, Score} when is_number(Score) ->
                    case score(Score) of
                        {ok, _} -> Score;
                        error -> {failed, {not_a_score, Score}}
                    end;
                {ok, Other} -> {failed, {not_a_score, Other}};
                {error, Reason} -> {failed, Reason}
            end
    end.

%% Keeps up to P evaluations in flight; each in its own monitored process, killed (a failed trial,
%% `timeout') when it outlives Limit ms.
drive(Run, F, P, InFlight, Done, Limit) when not Done, map_size(InFlight) < P ->
    case ask(Run) of
        {ok, Id, Params} ->
            Self = self(),
            {Pid, MRef} = spawn_monitor(fun() -> Self ! {self(), dspex_opt_eval, evaluate(F, Params)} end),
            TRef = case Limit of
                       infinity -> undefined;
                       _ -> erlang:start_timer(Limit, self(), {dspex_opt_eval_timeout, Pid})
                   end,
            drive(Run, F, P, InFlight#{Pid => {MRef, Id, TRef}}, false, Limit);
        {error, budget_exhausted} -> drive(Run, F, P, InFlight, true, Limit);
        {error, _} = E -> abandon(InFlight), E
    end;
drive(Run, _F, _P, InFlight, true, _Limit) when map_size(InFlight) =:= 0 ->
    best(Run);
drive(Run, F, P, InFlight, Done, Limit) ->
    {Id, Result, Rest} =
        receive
            {Pid, dspex_opt_eval, R} when is_map_key(Pid, InFlight) ->
                {{MRef, I, TRef}, Rest0} = maps:take(Pid, InFlight),
                erlang:demonitor(MRef, [flush]),
                cancel_timer(TRef),
                {I, R, Rest0};
            {'DOWN', MRef, process, Pid, Reason} when is_map_key(Pid, InFlight) ->
                {{MRef, I, TRef}, Rest0} = maps:take(Pid, InFlight),
                cancel_timer(TRef),
                {I, {failed, {evaluator_down, Reason}}, Rest0};
            {timeout, TRef, {dspex_opt_eval_timeout, Pid}} when is_map_key(Pid, InFlight) ->
                {{MRef, I, TRef}, Rest0} = maps:take(Pid, InFlight),
                erlang:demonitor(MRef, [flush]),
                exit(Pid, kill),
                {I, {failed, timeout}, Rest0}
        end,
    case tell(Run, Id, Result) of
        ok -> drive(Run, F, P, Rest, Done, Limit);
        {error, _} = E -> abandon(Rest), E
    end.

cancel_timer(undefined) -> ok;
cancel_timer(TRef) ->
    %% a timeout already sent is taken out of the mailbox
    _ = erlang:cancel_timer(TRef, [{async, false}, {info, false}]),
    receive {timeout, TRef, _} -> ok after 0 -> ok end.

abandon(InFlight) ->
    _ = [begin erlang:demonitor(M, [flush]), cancel_timer(T), exit(Pid, kill) end
         || {Pid, {M, _, T}} <- maps:to_list(InFlight)],
    ok.

evaluate(F, Params) ->
    try F(Params) of
        S when is_number(S) ->
            case score(S) of
                {ok, _} -> S;
                error -> {failed, {not_a_score, S}}
            end;
        {failed, _} = Failed -> Failed;
        Other -> {failed, {not_a_score, Other}}
    catch C:R -> {failed, {C, R}}
    end.

%%% the run process --------------------------------------------------------------

%% @private
%% @doc Starts a run process; called by `dspex_opt_sup' (use `start/3').
-spec start_link({dspex_store:session_id(), dspex_opt_space:space(), map(), pid()}) -> {ok, pid()} | {error, term()}.
start_link(Args) -> gen_server:start_link(?MODULE, Args, []).

%% @private
-spec init({dspex_store:session_id(), dspex_opt_space:space(), map(), pid()}) -> {ok, map(), {continue, start}}.
init({Session, Space, Cfg, Owner}) ->
    %% a supervisor shutdown runs terminate/2 (locks released at once)
    process_flag(trap_exit, true),
    %% unguessable: a gRPC client names its run by this id
    RunId = string:lowercase(binary:encode_hex(crypto:strong_rand_bytes(12))),
    true = dspex_opt_sup:register_run(RunId, self()),
    St = #{session => Session, space => Space, cfg => Cfg, locks => #{}, starting => ok, id => RunId,
           owner => case Owner of none -> none; _ -> erlang:monitor(process, Owner) end, idle_timer => undefined},
    {ok, rearm(St), {continue, start}}.

%% @private
-spec handle_continue(start, map()) -> {noreply, map()}.
handle_continue(start, #{session := Session, space := Space, cfg := Cfg} = St0) ->
    #{algorithm := Alg, direction := Dir, lock := LockOpts0, acl := Acl, seed := Seed, budget := Budget} = Cfg,
    LockOpts = maps:merge(maps:merge(#{conflict => wait, timeout => 5000}, LockOpts0),
                          Acl#{objective => Dir, metric => score, pid => self()}),
    Names = dspex_opt_space:names(Space),
    case acquire(Session, lists:sort(Names), {dspex_opt, Alg, self()}, LockOpts, #{}) of
        {ok, Locks} ->
            Impl = case dspex_opt_registry:lookup(Alg) of
                       {builtin, _} -> {builtin, Alg, undefined};
                       {plugin, Mod, _} -> {plugin, Mod, undefined}
                   end,
            Dims = dspex_opt_space:dims(Space),
            case init_impl(Impl, Dims, Seed, Budget) of
                {ok, Impl1} ->
                    St = St0#{dims => Dims, impl => Impl1, locks := Locks, next => 0, trials => #{}, told => [],
                              ntold => 0, pending => #{}, best => undefined, ask_us => 0},
                    event(start, #{count => 1}, St, #{variables => Names, budget => Budget}),
                    {noreply, St};
                {error, R} ->
                    release_all(Locks),
                    {noreply, St0#{starting := {error, R}}}
            end;
        {error, R} -> {noreply, St0#{starting := {error, R}}}
    end.

acquire(_S, [], _Id, _Opts, Acc) -> {ok, Acc};
acquire(S, [N | Ns], Id, Opts, Acc) ->
    case dspex_locks:acquire(S, N, Id, Opts) of
        {ok, L} -> acquire(S, Ns, Id, Opts, Acc#{N => L});
        {error, _} = E -> release_all(Acc), E
    end.

release_all(Locks) -> _ = [dspex_locks:release(L) || L <- maps:values(Locks)], ok.

init_impl({builtin, _, _} = I, _Dims, _Seed, _Budget) -> {ok, I};
init_impl({plugin, Mod, _}, Dims, Seed, Budget) ->
    try Mod:init(Dims, #{seed => Seed, budget => Budget}) of
        {ok, PS} -> {ok, {plugin, Mod, PS}};
        {error, R} -> {error, {algorithm_failed, R}};
        Other -> {error, {algorithm_failed, {bad_return, Other}}}
    catch C:R -> {error, {algorithm_failed, {C, R}}}
    end.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()} | {stop, normal, term(), map()}.
handle_call(Msg, From, St) -> do_call(Msg, From, rearm(St)).

%% The idle timer (option `idle_timeout'): restarted by every call.
rearm(#{cfg := #{idle_timeout := infinity}} = St) -> St;
rearm(#{cfg := #{idle_timeout := Ms}, idle_timer := T} = St) ->
    _ = T =/= undefined andalso erlang:cancel_timer(T, [{async, true}, {info, false}]),
    St#{idle_timer := erlang:start_timer(Ms, self(), idle)}.

do_call(started, _From, #{starting := ok} = St) ->
    {reply, ok, St};
do_call(started, _From, #{starting := Error} = St) ->
    {stop, normal, Error, St};
do_call(ask, _From, #{next := N, cfg := #{budget := B}} = St) when N >= B ->
    {reply, {error, budget_exhausted}, St};
do_call(ask, _From, #{next := N, space := Space} = St) ->
    T0 = erlang:monotonic_time(),
    case propose(N, St) of
        {ok, Point0, St1} ->
            Us = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond),
            Params = dspex_opt_space:decode(Space, Point0),
            Point = dspex_opt_space:encode(Space, Params),
            #{trials := Ts, pending := Pend, ask_us := AU} = St1,
            St2 = St1#{next := N + 1, trials := Ts#{N => #{id => N, params => Params, point => Point,
                                                            state => pending}},
                       pending := Pend#{N => Point}, ask_us := AU + Us},
            event(ask, #{duration => erlang:monotonic_time() - T0}, St2, #{trial => N}),
            {reply, {ok, N, Params}, St2};
        {error, _} = E -> {reply, E, St}
    end;
do_call({tell, Id, Result}, _From, #{trials := Ts} = St) ->
    case Ts of
        #{Id := #{state := pending} = T} ->
            case result(Result) of
                {ok, Y, Score, Reason} -> {reply, ok, record(Id, T, Y, Score, Reason, St)};
                error -> {reply, {error, {invalid_argument, score}}, St}
            end;
        #{Id := _} -> {reply, {error, {already_told, Id}}, St};
        _ -> {reply, {error, {unknown_trial, Id}}, St}
    end;
do_call(best, _From, St) ->
    {reply, best_of(St), St};
do_call(trials, _From, #{trials := Ts} = St) ->
    {reply, {ok, [maps:without([point], T) || {_, T} <- lists:sort(maps:to_list(Ts))]}, St};
do_call(info, _From, #{session := S, space := Sp, cfg := Cfg, next := N, ntold := NT, pending := P} = St) ->
    {reply, {ok, #{id => maps:get(id, St), session => S, variables => dspex_opt_space:names(Sp), space => dspex_opt_space:kind(Sp),
                   algorithm => maps:get(algorithm, Cfg), direction => maps:get(direction, Cfg),
                   budget => maps:get(budget, Cfg), seed => maps:get(seed, Cfg), asked => N, told => NT,
                   principal => maps:get(as, maps:get(acl, Cfg), undefined),
                   pending => map_size(P)}}, St};
do_call({stop, Apply}, _From, #{locks := Locks} = St) ->
    Results = [dspex_locks:stop(L, #{apply_best => Apply}) || L <- maps:values(Locks)],
    Applied = Apply andalso best_of(St) =/= {error, no_trials}
        andalso lists:all(fun({ok, #{applied := A}}) -> A; (_) -> false end, Results),
    Errors = [E || {ok, #{apply_error := E}} <- Results] ++ [E || {error, E} <- Results],
    feed_performance(St),
    Best = case best_of(St) of {ok, B} -> B; _ -> undefined end,
    event(stop, #{count => 1}, St, #{applied => Applied, trials => maps:get(ntold, St)}),
    Reply = #{best => Best, applied => Applied, trials => maps:get(ntold, St)},
    {stop, normal, {ok, case Errors of [] -> Reply; _ -> Reply#{apply_errors => Errors} end},
     St#{locks := #{}}}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()} | {stop, term(), map()}.
handle_info({'DOWN', MRef, process, _, _}, #{owner := MRef} = St) ->
    {stop, normal, St};
handle_info({timeout, T, idle}, #{idle_timer := T} = St) ->
    %% nobody called for `idle_timeout' ms: the run is abandoned
    {stop, normal, St};
handle_info({dspex_preempted, _, _, _}, St) ->
    {stop, normal, St};
handle_info({dspex_lock_expired, _, _, _}, St) ->
    {stop, normal, St};
handle_info({dspex_lock_lost, _, _, _, _}, St) ->
    %% the session was deleted or expired: nothing left to optimize or apply
    {stop, normal, St};
handle_info(_Msg, St) ->
    {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{locks := Locks, id := RunId}) ->
    dspex_opt_sup:unregister_run(RunId),
    release_all(Locks).

%% The candidate of trial N: from the C kernels, or the plugin.
%% (BO: the GP hyperparameters fitted by one ask start the next one's fit; CMA-ES: the state after
%% one ask's complete generations starts the next one's replay.)
propose(N, #{impl := {builtin, Alg, Warm}, dims := Dims, told := Told, pending := Pend,
             cfg := #{seed := Seed, budget := B}} = St) ->
    %% start/3 keeps spaces within the kernels' bounds; a refusal all the same fails this ask, not the run
    case catch_badarg(fun() -> dspex_nif:opt_ask(Alg, Dims, lists:reverse(Told), maps:values(Pend), Seed, N, B, Warm) end) of
        {ok, Point, Fitted} ->
            Warm1 = case Fitted of undefined -> Warm; _ -> Fitted end,
            {ok, [case K of 0 -> U; _ -> round(U) end || {K, U} <- lists:zip(Dims, Point)],
             St#{impl := {builtin, Alg, Warm1}}};
        {error, _} = E -> E
    end;
propose(N, #{impl := {plugin, Mod, PS}, space := Space} = St) ->
    try Mod:ask(PS, N) of
        {ok, Point, PS1} ->
            case dspex_opt_space:check_point(Space, Point) of
                true -> {ok, [case is_float(U) andalso K > 0 of true -> round(U); false -> U end
                              || {K, U} <- lists:zip(maps:get(dims, St), Point)], St#{impl := {plugin, Mod, PS1}}};
                false -> {error, {algorithm_failed, {out_of_bounds, Point}}}
            end;
        Other -> {error, {algorithm_failed, {bad_return, Other}}}
    catch C:R -> {error, {algorithm_failed, {C, R}}}
    end.

catch_badarg(F) ->
    try F()
    catch error:badarg -> {error, {algorithm_failed, badarg}}
    end.

result({failed, Reason}) -> {ok, failed, undefined, Reason};
result(S) ->
    case score(S) of
        {ok, F} -> {ok, F, F, undefined};
        error -> error
    end.

%% A score as a float: every Erlang float is finite, but an integer past the float range (a bignum of
%% over 1024 bits) has none and is no score.
score(S) when is_float(S) -> {ok, S};
score(S) when is_integer(S) ->
    try {ok, float(S)}
    catch error:badarg -> error
    end;
score(_) -> error.

record(Id, T, Y0, Score, Reason, #{cfg := #{direction := Dir}, told := Told, ntold := NT, pending := Pend,
                                   trials := Ts, locks := Locks} = St) ->
    Point = maps:get(point, T),
    Y = case {Y0, Dir} of
            {failed, _} -> failed;
            {_, minimize} -> Y0;
            {_, maximize} -> -Y0
        end,
    T1 = case Y of
             failed -> T#{state := failed, reason => Reason};
             _ -> T#{state := complete, score => Score}
         end,
    St1 = tell_impl(Id, Point, Y, St),
    Best = case {Y, maps:get(best, St)} of
               {failed, B} -> B;
               {_, undefined} -> {Id, Y};
               {_, {_, BY}} when Y < BY -> {Id, Y};
               {_, B} -> B
           end,
    Params = maps:get(params, T),
    Metrics = case Y of failed -> #{failed => Reason}; _ -> #{score => Score} end,
    _ = [dspex_locks:report_progress(L, NT + 1, maps:get(N, Params), Metrics) || {N, L} <- maps:to_list(Locks)],
    St2 = St1#{told := [{Id, Point, Y} | Told], ntold := NT + 1, pending := maps:remove(Id, Pend),
               trials := Ts#{Id := T1}, best := Best},
    event(tell, #{count => 1}, St2, #{trial => Id, result => case Y of failed -> failed; _ -> ok end}),
    trial_event(Id, T1, St2),
    St2.

%% One `optimization_trial' event per told trial in the session's event log
%% (when the log is on; never fails the run).
trial_event(Id, T, #{session := S, id := RunId, cfg := #{algorithm := A, acl := Acl}, ntold := NT,
                     best := {BestId, _}}) ->
    Data = maps:merge(maps:with([params, state, score, reason], T),
                      #{run => RunId, algorithm => A, trial => Id, told => NT, best_trial => BestId}),
    dspex_events:emit(S, optimization_trial, Data, maps:with([principal], #{principal => maps:get(as, Acl, undefined)}));
trial_event(Id, T, #{best := undefined} = St) ->
    trial_event(Id, T, St#{best := {undefined, undefined}}).

tell_impl(_Id, _Point, _Y, #{impl := {builtin, _, _}} = St) -> St;
tell_impl(Id, Point, Y, #{impl := {plugin, Mod, PS}} = St) ->
    try Mod:tell(PS, Id, Point, Y) of
        {ok, PS1} -> St#{impl := {plugin, Mod, PS1}};
        _ -> St
    catch _:_ -> St
    end.

best_of(#{best := undefined}) -> {error, no_trials};
best_of(#{best := {Id, _}, trials := Ts}) ->
    #{params := P, score := S} = maps:get(Id, Ts),
    {ok, #{trial => Id, params => P, score => S}}.

%% Records the run's normalised final regret for the learned selection.
feed_performance(#{best := undefined}) -> ok;
feed_performance(#{best := {_, Best}, told := Told, cfg := Cfg, space := Space, session := S, dims := Dims,
                   ntold := NT, ask_us := AU, next := N}) ->
    Ys = [Y || {_, _, Y} <- Told, Y =/= failed],
    Regret = case maps:get(optimum, Cfg) of
                 undefined ->
                     Key = case maps:get(problem, Cfg) of
                               undefined -> {S, lists:sort(dspex_opt_space:names(Space))};
                               K -> K
                           end,
                     %% the best is kept minimised (a maximising run's negated): runs of the same
                     %% problem in the other direction have another best
                     dspex_opt_registry:problem_regret({Key, maps:get(direction, Cfg)}, Best, Ys);
                 Opt0 ->
                     Opt = case maps:get(direction, Cfg) of minimize -> Opt0; maximize -> -Opt0 end,
                     dspex_opt_registry:regret(Best, Opt, Ys)
             end,
    Req = #{space => dspex_opt_space:kind(Space), dims => length(Dims), budget => maps:get(budget, Cfg),
            noisy => maps:get(noisy, Cfg)},
    _ = NT,
    _ = dspex_opt_registry:record_performance(maps:get(algorithm, Cfg), Req,
                                              #{regret => Regret, ask_us => AU / max(N, 1)}),
    ok.

event(Name, Measurements, #{session := S, cfg := #{algorithm := A}}, Meta) ->
    dspex_telemetry:execute([dspex, opt, Name], Measurements,
                            Meta#{session => S, run => self(), algorithm => A}).
