%% @doc Optimizations started over gRPC. A gRPC client is not a process, so
%% each running optimization gets one here: a runner that takes the
%% `dspex_locks' lock (and so is its holder), reports progress and stops it.
%% This server keeps the registry (an ETS table read without calls:
%% `lookup/2') and watches the runners.
-module(dspex_grpc_opt).
-behaviour(gen_server).

-export([start_link/0, start/5, lookup/2, progress/7, stop/6, best_metrics/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, runner/6]).

-define(TAB, dspex_grpc_opt).

%% @doc Starts the registry.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Starts an optimization of variable `Name' (already resolved) by
%% `OptimizerId' with lock options `LockOpts' (see `dspex_locks:acquire/4');
%% waits for the lock up to `Timeout' ms.
-spec start(dspex_store:session_id(), binary(), binary(), map(), timeout()) ->
          {ok, #{token := pos_integer(), started_at := integer()}} | {error, term()}.
start(Session, Name, OptimizerId, LockOpts, Timeout) ->
    Pid = gen_server:call(?MODULE, {spawn, Session, Name, OptimizerId, LockOpts, self()}),
    MRef = erlang:monitor(process, Pid),
    receive
        {Pid, Result} -> erlang:demonitor(MRef, [flush]), Result;
        {'DOWN', MRef, process, Pid, Reason} -> {error, {optimizer_failed, Reason}}
    after Timeout ->
            exit(Pid, kill),
            erlang:demonitor(MRef, [flush]),
            {error, timeout}
    end.

%% @doc The running optimization of a variable (by name), if any.
-spec lookup(dspex_store:session_id(), binary()) -> {ok, map()} | error.
lookup(Session, Name) ->
    case ets:lookup(?TAB, {Session, Name}) of
        [{_, Info}] -> {ok, Info};
        [] -> error
    end.

%% @doc Records an iteration of the running optimization by the caller acting
%% as `Acl' (`as' / `context', as the lock takes them); `OptimizerId' must be
%% the one running it, or empty (see `stop/6' for who may leave it empty).
%% The caller's permissions are the caller's to check (`dspex_grpc_handler').
-spec progress(dspex_store:session_id(), binary(), binary(), non_neg_integer(), dspex_store:value(), map(), map()) ->
          ok | {error, term()}.
progress(Session, Name, OptimizerId, Iter, Value, Metrics, Acl) ->
    with_runner(Session, Name, OptimizerId, false, Acl, {progress, Iter, Value, Metrics}).

%% @doc Stops the running optimization, optionally writing the best candidate.
%% Only `OptimizerId''s; `Force' or an empty `OptimizerId' reach any
%% optimizer's, but only for the session itself or the principal that started
%% it (`Acl''s `as'): another principal gets `{error, access_denied}'.
-spec stop(dspex_store:session_id(), binary(), binary(), boolean(), boolean(), map()) ->
          {ok, map()} | {error, term()}.
stop(Session, Name, OptimizerId, Force, ApplyBest, Acl) ->
    with_runner(Session, Name, OptimizerId, Force, Acl, {stop, ApplyBest}).

%% @doc The metrics reported with the best candidate so far (`#{}' if none).
-spec best_metrics(dspex_store:session_id(), binary()) -> map().
best_metrics(Session, Name) ->
    case lookup(Session, Name) of
        {ok, #{pid := Pid, token := T}} ->
            try gen_server:call(Pid, metrics, 5000) of
                Ms when is_map(Ms) ->
                    case dspex_locks:status(Session, Name) of
                        {ok, #{token := T, best := #{iteration := I}}} -> maps:get(I, Ms, #{});
                        _ -> #{}
                    end
            catch exit:_ -> #{}
            end;
        error -> #{}
    end.

with_runner(Session, Name, OptimizerId, Force, Acl, Msg) ->
    Caller = maps:get(as, Acl, Session),
    case lookup(Session, Name) of
        {ok, #{pid := Pid, optimizer_id := Id} = Info} ->
            Bypass = Force orelse OptimizerId =:= <<>>,
            %% naming no optimizer (or forcing) reaches whoever runs it: only
            %% the session and the optimization's own principal may do that
            Starter = maps:get(principal, Info, Session),
            if
                OptimizerId =:= Id; Bypass andalso (Caller =:= Session orelse Caller =:= Starter) ->
                    try gen_server:call(Pid, Msg, infinity)
                    catch exit:_ -> {error, not_optimizing}
                    end;
                Bypass -> {error, access_denied};
                true -> {error, {lock_held_by, Id}}
            end;
        error -> {error, not_optimizing}
    end.

%%% registry -----------------------------------------------------------------

%% @private
-spec init([]) -> {ok, map()}.
init([]) ->
    _ = ets:new(?TAB, [named_table, protected, {read_concurrency, true}]),
    {ok, #{}}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({spawn, S, N, Id, Opts, Caller}, _From, Mons) ->
    {Pid, MRef} = spawn_monitor(?MODULE, runner, [S, N, Id, Opts, Caller, self()]),
    {reply, Pid, Mons#{MRef => none}};
handle_call({register, Key, Info}, {Pid, _}, Mons) ->
    true = ets:insert(?TAB, {Key, Info#{pid => Pid}}),
    {reply, ok, Mons#{key_of(Pid) => Key}};
handle_call({unregister, Key}, {Pid, _}, Mons) ->
    ets:select_delete(?TAB, [{{Key, #{pid => Pid}}, [], [true]}]),
    {reply, ok, Mons}.

key_of(Pid) -> {pid, Pid}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({'DOWN', MRef, process, Pid, _}, Mons) ->
    Mons1 = maps:remove(MRef, Mons),
    case maps:take(key_of(Pid), Mons1) of
        {Key, Mons2} ->
            ets:select_delete(?TAB, [{{Key, #{pid => Pid}}, [], [true]}]),
            {noreply, Mons2};
        error -> {noreply, Mons1}
    end;
handle_info(_Msg, St) -> {noreply, St}.

%%% runner -------------------------------------------------------------------

%% @private
-spec runner(binary(), binary(), binary(), map(), pid(), pid()) -> ok.
runner(S, N, Id, Opts, Caller, Registry) ->
    CRef = erlang:monitor(process, Caller),
    case dspex_locks:acquire(S, N, Id, Opts#{pid => self()}) of
        {ok, Lock} ->
            receive
                {'DOWN', CRef, process, Caller, _} -> %% nobody waits for it: give it back
                    _ = dspex_locks:release(Lock),
                    ok
            after 0 ->
                    erlang:demonitor(CRef, [flush]),
                    Started = erlang:system_time(microsecond),
                    #{token := T} = Lock,
                    ok = gen_server:call(Registry, {register, {S, N}, #{optimizer_id => Id, token => T,
                                                                       started_at => Started,
                                                                       principal => maps:get(as, Opts, S)}}),
                    Caller ! {self(), {ok, #{token => T, started_at => Started}}},
                    loop(#{lock => Lock, key => {S, N}, registry => Registry, metrics => #{}})
            end;
        Error ->
            Caller ! {self(), Error},
            ok
    end.

loop(#{lock := Lock, key := Key, registry := Reg, metrics := Ms} = St) ->
    receive
        {'$gen_call', From, {progress, Iter, Value, Metrics}} ->
            R = dspex_locks:report_progress(Lock, Iter, Value, Metrics),
            gen_server:reply(From, R),
            loop(St#{metrics := keep_best(Key, Ms#{Iter => Metrics})});
        {'$gen_call', From, {stop, Apply}} ->
            R = dspex_locks:stop(Lock, #{apply_best => Apply}),
            ok = gen_server:call(Reg, {unregister, Key}),
            gen_server:reply(From, case R of
                                       {ok, #{best := #{iteration := I}} = Res} -> {ok, Res#{metrics => maps:get(I, Ms, #{})}};
                                       _ -> R
                                   end),
            ok;
        {'$gen_call', From, metrics} ->
            gen_server:reply(From, Ms),
            loop(St);
        {dspex_preempted, _, _, _} -> ok;
        {dspex_lock_expired, _, _, _} -> ok;
        _ -> loop(St)
    end.

%% only the metrics of the best iteration are worth keeping
keep_best({S, N}, Ms) ->
    case dspex_locks:status(S, N) of
        {ok, #{best := #{iteration := I}}} -> maps:with([I], Ms);
        _ -> Ms
    end.
