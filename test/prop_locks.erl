%% @doc PropEr property of the optimizer-lock coordinator `dspex_locks' (and
%% the fencing tokens the store checks in its write path).
%%
%% `prop_locks/0': a random scenario over 1-3 float variables of a fresh
%% session (deleted afterwards): 2..100 optimizer processes, each on one
%% variable with a conflict mode (wait | abort | preempt), a priority 0..3, an
%% optional wait timeout, an optional lease (renewed at every iteration or
%% not), 1..4 iterations with a candidate value each, a short hold per
%% iteration (0..2 ms, only to make holders overlap with waiters) and a
%% behaviour once it holds the lock:
%%   release    - iterate, release, then write once more with the old lock;
%%   die        - iterate, then exit(self(), kill) while holding;
%%   stop_apply - iterate with report_progress/4, then stop/2 with apply_best;
%%   progress   - iterate with report_progress/4, compare status/2 with the
%%                expected iterations and best candidate, then release;
%%   overstay   - iterate, then hold past its (short) lease and wait for
%%                {dspex_lock_expired, ...} (or a preemption);
%%   killed     - like release, but a killer process kills it after 0..20 ms,
%%                whatever it is doing (waiting, holding, done).
%% While holding, an optimizer watches for {dspex_preempted, ...} and
%% {dspex_lock_expired, ...} (one in four is heedless and only learns it when
%% release/stop is refused, so it goes on writing with a token the server
%% already took back); once it learns it lost the lock it writes once more
%% with the old lock and tries release/1 (both must be refused).
%%
%% Everything goes to one collector process, in the order it happens:
%% the optimizers' records (granted, write_start/write with the result,
%% released (sent BEFORE calling release/stop, so it precedes the server's
%% decision), release_result, died (sent before dying), preempted, expired,
%% progress, renew, status, stop_result, aborted, timeout, killing (sent by the
%% killer before the kill)) and, through a dspex_telemetry handler, the lock
%% server's own decisions ({srv, acquired | released | expired | preempted |
%% waited, Var, Meta}) in the server's order. Completion is awaited with
%% monitors; nothing sleeps to synchronise.
%%
%% Checked on the history (`check/2'; each failure is {Tag, Detail}):
%%  overlap / token_order - optimizer view: for two holders of a variable with
%%    tokens Tlo < Thi, unless the Tlo holder lost the lock (preempted or
%%    expired), Thi's grant is recorded after Tlo's release/death (and not
%%    before Tlo's grant); no token granted twice (duplicate_token);
%%  srv_overlap / srv_token_order / srv_bad_preemption / srv_bad_expiry /
%%    srv_release_without_holder / srv_expired_not_holder / srv_wait_while_free
%%    / srv_held_at_end / srv_not_fifo - server view: a grant only when free (or
%%    a preemption by a `preempt' optimizer of higher priority), tokens
%%    strictly increasing in grant order, expiry only of leased locks, waiters
%%    granted in the order they queued;
%%  grant_without_srv / srv_grant_unclaimed - both views agree;
%%  current_write_refused - every write of a holder that did not lose its lock
%%    succeeded; lost_lock_regained - after one refused write, none succeeds;
%%  stale_write_accepted / bad_rejection / wrong_holder_in_rejection - every
%%    write after the lock was lost or released (by the optimizer's knowledge,
%%    or because the server had already freed it when the write started) is
%%    refused with {locked, NewerHolder} or stale_lock; two of these have their
%%    own tags because they are known bugs: expired_write_accepted (accepted
%%    after the expiry notice, before the server freed the lock) and
%%    locked_undefined (refused as {locked, undefined});
%%  history_mismatch / fencing_order / history_versions - the variable's
%%    history holds exactly the accepted writes and applied stops, at the
%%    versions returned, with tokens never going back;
%%  progress_refused / renew_refused / status_wrong / stop_wrong /
%%    release_refused / late_release_accepted / released_after_loss /
%%    notice_mismatch / missing_notice / no_expiry / bad_notice / unended;
%%  waiter_starved - wait/preempt optimizers without timeout, not killed,
%%    all get the lock; abort_when_free / abort_mode - an abort only while
%%    another optimizer holds the lock; timeout_early / timeout_when_free;
%%  outcome / acquire_error / optimizer_crashed / stuck;
%%  final_status / final_write_refused - at the end status/2 is unlocked with
%%    0 waiters (asked again, without sleeping, for up to 2 s: the server may
%%    not have had the 'DOWN' of a killed optimizer yet) and a write without
%%    lock succeeds.
%%
%% DSPEX_PROP_LOCKS_TOLERATE=tag1,tag2 makes the property ignore those tags.
%%
%% Debian's erlang-proper ships without proper.hrl: the macros are defined here.
-module(prop_locks).

-export([prop_locks/0, scenario/0, run/1, run_scenario/1, check/2, check/3, specs/1, var_name/1]).
-export([handle_event/4]).

-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(LET(X, Gen, Body), proper_types:bind(Gen, fun(X) -> Body end, false)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).

-define(DEADLINE_MS, 30000).      % a scenario that has not finished by then is stuck
-define(OVERSTAY_MAX_MS, 5000).   % an overstaying holder must hear of its expiry by then
-define(STATUS_WAIT_MS, 2000).  % bound on the wait for the final status/2 to be unlocked

%%% Property --------------------------------------------------------------------

prop_locks() ->
    ?FORALL(Sc, scenario(),
            begin
                {Result, Run} = run(Sc),
                ?WHENFAIL(report(Sc, Result, Run), Result =:= ok)
            end).

report(Sc, Result, Run) ->
    Evs = maps:get(events, Run, []),
    io:format(user, "~nscenario:~n~p~nfailures:~n~p~n", [Sc, Result]),
    case length(Evs) =< 400 of
        true -> io:format(user, "history:~n~p~nfinal:~n~p~n", [lists:zip(lists:seq(1, length(Evs)), Evs),
                                                             maps:get(final, Run, [])]);
        false -> io:format(user, "(history of ~p events not shown)~n", [length(Evs)])
    end.

%%% Generators ------------------------------------------------------------------

scenario() ->
    ?LET({NVars, Max}, {proper_types:range(1, 3),
                        proper_types:frequency([{5, 10}, {3, 40}, {2, 98}])},
         ?LET({A, B, Rest}, {opt(NVars), opt(NVars), proper_types:resize(Max, proper_types:list(opt(NVars)))},
              #{nvars => NVars, opts => lists:sublist([A, B | Rest], 100)})).

opt(NVars) ->
    R = fun proper_types:range/2,
    ?LET({Var, Conflict, Prio, Timeout, Lease, Renew, Values, Behaviour, Hold, Delay, Obj, {KillAfter, Heed}},
         {R(1, NVars),
          proper_types:elements([wait, wait, abort, preempt]),
          R(0, 3),
          proper_types:frequency([{3, infinity}, {1, R(0, 30)}]),
          proper_types:frequency([{3, infinity}, {1, R(1, 20)}]),
          proper_types:bool(),
          ?LET(N, R(1, 4), proper_types:vector(N, proper_types:float(0.0, 1.0))),
          proper_types:frequency([{4, release}, {1, die}, {1, stop_apply}, {2, progress},
                                  {1, overstay}, {1, killed}]),
          proper_types:frequency([{3, 0}, {2, 1}, {1, 2}]),
          proper_types:frequency([{3, 0}, {1, R(1, 3)}]),
          proper_types:elements([minimize, maximize]),
          {R(0, 20), proper_types:frequency([{3, true}, {1, false}])}},
         begin
             Lease1 = case {Behaviour, Lease} of
                          {overstay, infinity} -> 5;
                          _ -> Lease
                      end,
             Base = #{var => Var, conflict => Conflict, priority => Prio, timeout => Timeout,
                      lease => Lease1, values => Values, behaviour => Behaviour, hold => Hold,
                      delay => Delay, objective => Obj, heed => Heed},
             B1 = case Lease1 =/= infinity andalso Behaviour =/= overstay of
                      true -> Base#{renew => Renew};
                      false -> Base
                  end,
             case Behaviour of
                 killed -> B1#{kill_after => KillAfter};
                 _ -> B1
             end
         end).

%% [{Id, Spec}] with Spec#{id => Id}; ids are positions, 1..N.
specs(#{opts := Opts}) ->
    [{Id, Spec#{id => Id}} || {Id, Spec} <- lists:zip(lists:seq(1, length(Opts)), Opts)].

var_name(V) -> <<"v", (integer_to_binary(V))/binary>>.

var_index(<<"v", N/binary>>) -> binary_to_integer(N).

%%% Running a scenario ----------------------------------------------------------

%% {ok | {fail, [{Tag, Detail}]}, Run}
run(Sc) ->
    Run = run_scenario(Sc),
    {check(Sc, Run, tolerated()), Run}.

%% #{events => [Event] (arrival order), exits => #{Id => Reason},
%%   final => [final records], stuck => [{{opt | killer, Id}, StatusOfEachVar}]}
run_scenario(#{nvars := NVars} = Sc) ->
    S = iolist_to_binary(["prop_locks_", integer_to_list(erlang:unique_integer([positive]))]),
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    [{ok, _} = dspex_store:register(S, var_name(V), float, 0.0, #{history_limit => 10000})
     || V <- lists:seq(1, NVars)],
    C = spawn_opt(fun() -> collector([]) end, [{message_queue_data, on_heap}]),
    HId = {?MODULE, S},
    ok = dspex_telemetry:attach_many(HId, [[dspex, locks, E] || E <- [acquired, released, expired, preempted, waited]],
                                     fun ?MODULE:handle_event/4, {S, C}),
    Ctx = #{s => S, c => C},
    Self = self(),
    Specs = specs(Sc),
    Procs = lists:flatmap(
              fun({Id, Spec}) ->
                      {P, R} = spawn_monitor(fun() -> optimizer(Ctx, Spec) end),
                      Killer = case Spec of
                                   #{behaviour := killed, kill_after := K} ->
                                       {KP, KR} = spawn_monitor(fun() -> killer(Ctx, Spec, P, K) end),
                                       [{KR, KP, {killer, Id}}];
                                   _ -> []
                               end,
                      [{R, P, {opt, Id}} | Killer]
              end, Specs),
    try
        [P ! {go, Self} || {_, P, _} <- Procs],
        Deadline = erlang:monotonic_time(millisecond) + ?DEADLINE_MS,
        {Exits, Stuck} = await(maps:from_list([{R, {P, W}} || {R, P, W} <- Procs]), Deadline, #{}),
        StuckStatus = [{V, dspex_locks:status(S, var_name(V))} || Stuck =/= [], V <- lists:seq(1, NVars)],
        [exit(P, kill) || {R, P, _} <- Procs, lists:member(R, [R1 || {R1, _} <- Stuck])],
        _ = [receive {'DOWN', R, process, _, _} -> ok after 5000 -> ok end || {R, _} <- Stuck],
        Final = lists:flatmap(fun(V) -> final(S, V) end, lists:seq(1, NVars)),
        C ! {collect, self()},
        Events = receive {history, C, Evs} -> Evs after 10000 -> [collector_lost] end,
        #{events => Events, exits => Exits, final => Final,
          stuck => [{W, StuckStatus} || {_, W} <- Stuck]}
    after
        _ = dspex_telemetry:detach(HId),
        [exit(P, kill) || {_, P, _} <- Procs],
        exit(C, kill),
        _ = dspex_store:delete_session(S)
    end.

await(Pending, _Deadline, Exits) when map_size(Pending) =:= 0 ->
    {Exits, []};
await(Pending, Deadline, Exits) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {'DOWN', R, process, _, Reason} when is_map_key(R, Pending) ->
            {{_, W}, P1} = maps:take(R, Pending),
            Exits1 = case W of
                         {opt, Id} -> Exits#{Id => Reason};
                         {killer, _} -> Exits
                     end,
            await(P1, Deadline, Exits1)
    after Left ->
            {Exits, [{R, W} || {R, {_, W}} <- maps:to_list(Pending)]}
    end.

%% status/2 after every process ended. The lock server is not told before the
%% test process that an optimizer died: its 'DOWN' is a separate signal, which
%% on a loaded machine was seen to come more than 1000 status/2 round trips
%% later (the dying process is descheduled between sending the two). So the
%% server is asked again, without sleeping, for up to ?STATUS_WAIT_MS.
final(S, V) ->
    Name = var_name(V),
    {Status, Tries} = final_status(S, Name, 0),
    Diag = case Status of
               {ok, #{locked := false, waiters := 0}} -> [];
               _ -> [{final_diagnosis, V, diagnose(S, Name)}]
           end,
    W = dspex_store:set(S, Name, -1.0, #{changed_by => final}),
    H = dspex_store:history(S, Name),
    [{final_status, V, Status, Tries}, {final_write, V, W}, {final_history, V, H} | Diag].

%% What the lock server holds for a variable still locked at the end (read
%% only): its queue, the holder's monitor and whether the server knows it.
diagnose(S, Name) ->
    Queued = case whereis(dspex_locks) of
                 Srv when is_pid(Srv) ->
                     case erlang:process_info(Srv, messages) of
                         {messages, Ms} -> [M || M <- Ms, element(1, M) =/= '$gen_call'];
                         _ -> undefined
                     end;
                 undefined -> no_lock_server
             end,
    State = try sys:get_state(dspex_locks, 1000) catch _:E -> {no_state, E} end,
    Entry = case State of
                #{locks := L} -> maps:get({S, Name}, L, none);
                _ -> State
            end,
    Mons = case {State, Entry} of
               {#{mons := M}, #{holder := #{mon := HM, pid := HP}}} ->
                   #{holder_mon_known => maps:get(HM, M, missing), holder_alive => is_process_alive(HP)};
               _ -> #{}
           end,
    T0 = erlang:monotonic_time(millisecond),
    Later = later_status(S, Name, T0 + 200),
    #{queued_non_calls => Queued, entry => Entry, mons => Mons,
      status_after => Later, ms_after => erlang:monotonic_time(millisecond) - T0}.

%% Diagnosis only (the check already failed): does it ever become free?
later_status(S, Name, Until) ->
    R = dspex_locks:status(S, Name),
    case R of
        {ok, #{locked := false}} -> R;
        _ ->
            case erlang:monotonic_time(millisecond) > Until of
                true -> R;
                false -> receive after 1 -> later_status(S, Name, Until) end
            end
    end.

final_status(S, Name, N) ->
    final_status(S, Name, N, erlang:monotonic_time(millisecond) + ?STATUS_WAIT_MS).

final_status(S, Name, N, Until) ->
    R = dspex_locks:status(S, Name),
    case R of
        {ok, #{locked := false, waiters := 0}} -> {R, N};
        _ ->
            case erlang:monotonic_time(millisecond) > Until of
                true -> {R, N};
                false -> erlang:yield(), final_status(S, Name, N + 1, Until)
            end
    end.

collector(Acc) ->
    receive
        {collect, From} -> From ! {history, self(), lists:reverse(Acc)};
        M -> collector([M | Acc])
    end.

%% Telemetry handler: runs in the lock server, so these arrive in its order.
handle_event([dspex, locks, Name], _Measurements, #{session := S, variable := VarName} = Meta, {S, C}) ->
    C ! {srv, Name, var_index(VarName), maps:without([session, variable], Meta)},
    ok;
handle_event(_, _, _, _) ->
    ok.

%%% Optimizers -----------------------------------------------------------------

killer(#{c := C}, #{id := Id, var := V}, Victim, After) ->
    receive {go, _} -> ok end,
    receive after After -> ok end,
    C ! {killing, V, Id},
    exit(Victim, kill).

optimizer(#{s := S, c := C} = Ctx, #{id := Id, var := V} = Spec) ->
    receive {go, _} -> ok end,
    case maps:get(delay, Spec) of
        0 -> ok;
        D -> receive after D -> ok end
    end,
    Opts0 = maps:with([conflict, priority, timeout, lease, objective], Spec),
    C ! {acquiring, V, Id},
    T0 = erlang:monotonic_time(microsecond),
    R = dspex_locks:acquire(S, var_name(V), Id, Opts0),
    Elapsed = erlang:monotonic_time(microsecond) - T0,
    case R of
        {ok, #{token := T} = L} ->
            C ! {granted, V, Id, T, erlang:monotonic_time()},
            holding(Ctx, Spec, L, T);
        {error, {lock_held_by, H}} -> C ! {aborted, V, Id, H};
        {error, timeout} -> C ! {timeout, V, Id, Elapsed};
        Other -> C ! {acquire_error, V, Id, Other}
    end.

holding(Ctx, #{values := Values} = Spec, L, T) ->
    iterate(Ctx, Spec, L, T, lists:zip(lists:seq(1, length(Values)), Values)).

iterate(Ctx, Spec, L, T, []) ->
    finish(Ctx, Spec, L, T);
iterate(#{c := C} = Ctx, #{id := Id, var := V, behaviour := B} = Spec, L, T, [{I, Val} | Rest]) ->
    case heed_loss(Ctx, Spec, T, 0) of
        {lost, Kind} -> lost(Ctx, Spec, L, T, Kind);
        none ->
            case lists:member(B, [progress, stop_apply]) of
                true -> C ! {progress, V, Id, T, I, dspex_locks:report_progress(L, I, Val, #{})};
                false -> ok
            end,
            case maps:get(renew, Spec, false) of
                true -> C ! {renew, V, Id, T, dspex_locks:renew(L)};
                false -> ok
            end,
            write(Ctx, Spec, L, T, holding, Val),
            case heed_loss(Ctx, Spec, T, maps:get(hold, Spec)) of
                {lost, Kind} -> lost(Ctx, Spec, L, T, Kind);
                none -> iterate(Ctx, Spec, L, T, Rest)
            end
    end.

%% A heedless optimizer (heed => false) does not look for news of a lost lock
%% while it iterates: it keeps writing with its old token.
heed_loss(_Ctx, #{heed := false}, _T, Ms) ->
    receive after Ms -> none end;
heed_loss(Ctx, Spec, T, Ms) ->
    poll_loss(Ctx, Spec, T, Ms).

%% Waits up to Ms for news of a lost lock.
poll_loss(#{s := S, c := C}, #{id := Id, var := V}, T, Ms) ->
    Name = var_name(V),
    receive
        {dspex_preempted, S, Name, T} -> {lost, preempted};
        {dspex_lock_expired, S, Name, T} -> {lost, expired};
        {Tag, _, _, _} = M when Tag =:= dspex_preempted; Tag =:= dspex_lock_expired ->
            C ! {bad_notice, V, Id, T, M},
            none
    after Ms -> none
    end.

lost(#{c := C} = Ctx, #{id := Id, var := V} = Spec, L, T, Kind) ->
    C ! {Kind, V, Id, T},
    write(Ctx, Spec, L, T, after_loss, 0.25),
    C ! {late_release, V, Id, T, dspex_locks:release(L)}.

write(#{s := S, c := C}, #{id := Id, var := V}, L, T, Phase, Val) ->
    C ! {write_start, V, Id, T, Phase},
    R = dspex_store:set(S, var_name(V), Val, #{lock => L, changed_by => {opt, Id, T}}),
    C ! {write, V, Id, T, Phase, R}.

finish(#{c := C}, #{id := Id, var := V, behaviour := die}, _L, T) ->
    C ! {died, V, Id, T},
    exit(self(), kill);
finish(#{c := C} = Ctx, #{id := Id, var := V, behaviour := stop_apply} = Spec, L, T) ->
    C ! {released, V, Id, T},
    R = dspex_locks:stop(L, #{apply_best => true}),
    C ! {stop_result, V, Id, T, R, expected_best(Spec)},
    after_release(Ctx, Spec, L, T, R);
finish(#{s := S, c := C} = Ctx, #{id := Id, var := V, behaviour := progress, values := Vals} = Spec, L, T) ->
    C ! {status, V, Id, T, dspex_locks:status(S, var_name(V)),
         #{iterations => length(Vals), best => expected_best(Spec)}},
    release(Ctx, Spec, L, T);
finish(#{c := C} = Ctx, #{id := Id, var := V, behaviour := overstay} = Spec, L, T) ->
    case poll_loss(Ctx, Spec, T, ?OVERSTAY_MAX_MS) of
        {lost, Kind} -> lost(Ctx, Spec, L, T, Kind);
        none ->
            C ! {no_expiry, V, Id, T},
            release(Ctx, Spec, L, T)
    end;
finish(Ctx, Spec, L, T) ->
    release(Ctx, Spec, L, T).

release(#{c := C} = Ctx, #{id := Id, var := V} = Spec, L, T) ->
    C ! {released, V, Id, T},
    R = dspex_locks:release(L),
    C ! {release_result, V, Id, T, R},
    after_release(Ctx, Spec, L, T, R).

%% After a successful release: one more write with the old lock. After a
%% refused one: the lock was lost, and the server sent the notice before it
%% answered, so it is already in the mailbox.
after_release(Ctx, Spec, L, T, R) when R =:= ok; element(1, R) =:= ok ->
    write(Ctx, Spec, L, T, after_release, 0.75);
after_release(#{c := C} = Ctx, #{id := Id, var := V} = Spec, L, T, _) ->
    case poll_loss(Ctx, Spec, T, 0) of
        {lost, Kind} ->
            C ! {Kind, V, Id, T},
            write(Ctx, Spec, L, T, after_loss, 0.25);
        none ->
            C ! {missing_notice, V, Id, T}
    end.

%% The best candidate by the objective on the value itself: the first
%% occurrence of the extreme value.
expected_best(#{values := Vals, objective := Obj}) ->
    lists:foldl(fun({I, X}, undefined) -> #{value => X, score => X, iteration => I};
                   ({I, X}, #{score := B} = Best) ->
                        case (Obj =:= minimize andalso X < B) orelse (Obj =:= maximize andalso X > B) of
                            true -> #{value => X, score => X, iteration => I};
                            false -> Best
                        end
                end, undefined, lists:zip(lists:seq(1, length(Vals)), Vals)).

%%% Checking a history -----------------------------------------------------------

%% ok | {fail, [{Tag, Detail}]}
check(Sc, Run) -> check(Sc, Run, []).

%% Failures tagged with one of Tolerated are left out.
check(Sc, Run, Tolerated) ->
    case [F || {Tag, _} = F <- check_all(Sc, Run), not lists:member(Tag, Tolerated)] of
        [] -> ok;
        Fs -> {fail, Fs}
    end.

%% DSPEX_PROP_LOCKS_TOLERATE=tag1,tag2: failure tags the property ignores, to
%% look past a known bug (e.g. locked_undefined) for others. Default: none.
tolerated() ->
    case os:getenv("DSPEX_PROP_LOCKS_TOLERATE") of
        false -> [];
        S -> [list_to_atom(T) || T <- string:lexemes(S, ",")]
    end.

check_all(#{nvars := NVars} = Sc, Run) ->
    Specs = maps:from_list(specs(Sc)),
    Events = maps:get(events, Run),
    Exits = maps:get(exits, Run),
    Final = maps:get(final, Run),
    Evs = lists:zip(lists:seq(1, length(Events)), Events),
    ByOpt = lists:foldr(fun({P, E}, Acc) when is_tuple(E), tuple_size(E) >= 3, element(1, E) =/= srv ->
                                maps:update_with(element(3, E), fun(L) -> [{P, E} | L] end, [{P, E}], Acc);
                           (_, Acc) -> Acc
                        end, #{}, Evs),
    Srv = [{P, Name, V, Meta} || {P, {srv, Name, V, Meta}} <- Evs],
    {Ten, SrvFails} = srv_pass(Specs, Srv, NVars),
    Killed = maps:from_list([{Id, true} || {Id, killed} <- maps:to_list(Exits),
                                           maps:get(behaviour, maps:get(Id, Specs)) =:= killed]),
    Ivs = intervals(Specs, ByOpt, Killed),
    Ctx = #{specs => Specs, byopt => ByOpt, ten => Ten, ivs => Ivs, killed => Killed, exits => Exits,
            nvars => NVars},
    lists:append([[{stuck, W} || W <- maps:get(stuck, Run, [])],
                  [{collector_lost, x} || collector_lost <- Events],
                  SrvFails,
                  check_overlap(Ctx),
                  check_views_agree(Ctx),
                  check_writes(Ctx),
                  check_history(Ctx, Final),
                  check_holder_calls(Ctx),
                  check_outcomes(Ctx),
                  check_exits(Ctx),
                  check_final(Final)]).

%%% Server view: the telemetry stream of the lock server.
%% Returns {#{{V, T} => #{id, acq, 'end', kind}}, Failures}.
srv_pass(Specs, Srv, NVars) ->
    lists:foldl(fun(V, {Ten, Fs}) ->
                        St = lists:foldl(fun(E, St) -> srv_step(V, E, St, Specs) end,
                                         #{holder => none, last => 0, ten => #{}, fails => [], pending => none,
                                           waited => #{}, wseq => 0, last_w => 0},
                                         [{P, N, M} || {P, N, V1, M} <- Srv, V1 =:= V]),
                        St1 = case St of
                                  #{pending := none} -> St;
                                  #{pending := Pend} -> fail(St, srv_overlap, {V, Pend})
                              end,
                        St2 = case St1 of
                                  #{holder := none} -> St1;
                                  #{holder := H} -> fail(St1, srv_held_at_end, {V, H})
                              end,
                        {maps:merge(Ten, maps:get(ten, St2)), Fs ++ lists:reverse(maps:get(fails, St2))}
                end, {#{}, []}, lists:seq(1, NVars)).

fail(#{fails := Fs} = St, Tag, Detail) -> St#{fails := [{Tag, Detail} | Fs]}.

srv_step(V, {P, Name, M}, #{pending := Pend} = St, Specs) when Pend =/= none, Name =/= preempted ->
    srv_step(V, {P, Name, M}, fail(St#{pending := none}, srv_overlap, #{var => V, grant => Pend, next => {P, Name, M}}),
             Specs);
srv_step(V, {P, acquired, #{optimizer := Id, token := T}}, St, _Specs) ->
    #{holder := H, last := Last, ten := Ten} = St,
    St1 = case T > Last of
              true -> St;
              false -> fail(St, srv_token_order, #{var => V, token => T, previous => Last, pos => P})
          end,
    St2 = fifo(V, Id, P, St1),
    Ten1 = Ten#{{V, T} => #{id => Id, acq => P, 'end' => undefined, kind => held}},
    case H of
        none -> St2#{holder := {Id, T}, last := max(T, Last), ten := Ten1};
        {Id0, T0} ->
            St2#{holder := {Id, T}, last := max(T, Last), ten := end_tenure({V, T0}, P, preempted, Ten1),
                 pending := {Id0, T0, Id, T, P}}
    end;
srv_step(V, {P, preempted, #{preempted := Id0, by := Id}}, #{pending := Pend} = St, Specs) ->
    case Pend of
        {Id0, T0, Id, T, _} ->
            #{conflict := Conflict, priority := Prio} = maps:get(Id, Specs),
            #{priority := Prio0} = maps:get(Id0, Specs),
            St1 = St#{pending := none},
            case Conflict =:= preempt andalso Prio > Prio0 of
                true -> St1;
                false -> fail(St1, srv_bad_preemption, #{var => V, holder => {Id0, T0}, by => {Id, T}, pos => P})
            end;
        _ -> fail(St, srv_preempted_unexpected, #{var => V, preempted => Id0, by => Id, pos => P})
    end;
srv_step(V, {P, released, _M}, #{holder := H, ten := Ten} = St, _Specs) ->
    case H of
        none -> fail(St, srv_release_without_holder, #{var => V, pos => P});
        {_, T} -> St#{holder := none, ten := end_tenure({V, T}, P, released, Ten)}
    end;
srv_step(V, {P, expired, #{token := T}}, #{holder := H, ten := Ten} = St, Specs) ->
    case H of
        {Id, T} ->
            St1 = St#{holder := none, ten := end_tenure({V, T}, P, expired, Ten)},
            case maps:get(lease, maps:get(Id, Specs)) of
                infinity -> fail(St1, srv_bad_expiry, #{var => V, id => Id, token => T, pos => P});
                _ -> St1
            end;
        _ -> fail(St, srv_expired_not_holder, #{var => V, token => T, holder => H, pos => P})
    end;
srv_step(V, {P, waited, #{optimizer := Id}}, #{holder := H, waited := W, wseq := Q} = St, _Specs) ->
    St1 = St#{waited := W#{Id => Q + 1}, wseq := Q + 1},
    case H of
        none -> fail(St1, srv_wait_while_free, #{var => V, id => Id, pos => P});
        _ -> St1
    end;
srv_step(_V, _, St, _Specs) ->
    St.

end_tenure(Key, P, Kind, Ten) ->
    maps:update_with(Key, fun(Tn) -> Tn#{'end' := P, kind := Kind} end, Ten).

%% Waiters are granted in the order they queued (FIFO).
fifo(V, Id, P, #{waited := W, last_w := LastW} = St) ->
    case maps:take(Id, W) of
        {Q, W1} when Q > LastW -> St#{waited := W1, last_w := Q};
        {Q, W1} -> fail(St#{waited := W1}, srv_not_fifo, #{var => V, id => Id, queued => Q, after_queued => LastW,
                                                            pos => P});
        error -> St
    end.

tenure(#{var := V, token := T}, #{ten := Ten}) -> maps:get({V, T}, Ten, undefined).

lost_at_server(Iv, Ctx) ->
    case tenure(Iv, Ctx) of
        #{kind := K} when K =:= preempted; K =:= expired -> true;
        _ -> false
    end.

%%% Optimizer view: one interval per optimizer that was granted the lock.
%% #{Id => #{id, var, token, g, end_type, end_pos, lost_kind, recs, writes}}
intervals(_Specs, ByOpt, Killed) ->
    maps:from_list(
      [{Id, interval(Id, G, V, T, [R || {P, _} = R <- Recs, P > G], Recs, Killed)}
       || {Id, Recs} <- maps:to_list(ByOpt), {G, {granted, V, _, T, _}} <- Recs]).

interval(Id, G, V, T, After, Recs, Killed) ->
    Lost = [{P, K} || {P, {K, _, _, _}} <- After, K =:= preempted orelse K =:= expired],
    Died = [P || {P, {died, _, _, _}} <- After],
    Released = [P || {P, {released, _, _, _}} <- After],
    ReleasedOk = [ok || {_, {release_result, _, _, _, ok}} <- After] ++
        [ok || {_, {stop_result, _, _, _, {ok, _}, _}} <- After],
    LastPos = lists:max([P || {P, _} <- Recs]),
    Killing = [P || {P, {killing, _, _}} <- Recs],
    {Type, End, Kind} =
        if
            Lost =/= [] -> {lost, element(1, hd(Lost)), element(2, hd(Lost))};
            Died =/= [] -> {normal, hd(Died), died};
            Released =/= [], ReleasedOk =/= [] -> {normal, hd(Released), released};
            Released =/= [], is_map_key(Id, Killed) -> {killed, hd(Released), killed};
            is_map_key(Id, Killed) -> {killed, lists:max([LastPos | Killing]), killed};
            true -> {unended, undefined, undefined}
        end,
    #{id => Id, var => V, token => T, g => G, end_type => Type, end_pos => End, lost_kind => Kind,
      recs => After, writes => pair_writes(After, none)}.

pair_writes([], _) -> [];
pair_writes([{P, {write_start, _, _, _, Phase}} | Rest], _) -> pair_writes(Rest, {P, Phase});
pair_writes([{P, {write, _, _, _, Phase, R}} | Rest], Start) ->
    S = case Start of
            {SP, Phase} -> SP;
            _ -> P
        end,
    [#{start => S, pos => P, phase => Phase, result => R} | pair_writes(Rest, none)];
pair_writes([_ | Rest], Start) -> pair_writes(Rest, Start).

%% For two holders of a variable with tokens Tlo < Thi: unless the Tlo holder
%% lost the lock (preempted or expired), the Thi grant is recorded after the
%% Tlo release/death.
check_overlap(#{ivs := Ivs, nvars := NVars} = Ctx) ->
    lists:flatmap(
      fun(V) ->
              Sorted = lists:keysort(1, [{T, Iv} || #{var := V1, token := T} = Iv <- maps:values(Ivs), V1 =:= V]),
              Dups = [{duplicate_token, #{var => V, token => T}} || {T, _} <- Sorted,
                                                                    length([x || {T1, _} <- Sorted, T1 =:= T]) > 1],
              Pairs = [{Lo, Hi} || {I, {Tlo, Lo}} <- lists:zip(lists:seq(1, length(Sorted)), Sorted),
                                   {Thi, Hi} <- lists:nthtail(I, Sorted), Tlo < Thi],
              lists:usort(Dups) ++
                  [case GHi < GLo of
                       true ->
                           {token_order, #{var => V, first => {IdHi, THi, GHi}, then => {IdLo, TLo, GLo}}};
                       false ->
                           {overlap, #{var => V, holder => {IdLo, TLo, granted_at, GLo, ended_at, ELo},
                                       granted => {IdHi, THi, GHi}}}
                   end
                   || {#{id := IdLo, token := TLo, g := GLo, end_type := Type, end_pos := ELo} = Lo,
                       #{id := IdHi, token := THi, g := GHi}} <- Pairs,
                      Type =/= lost, not lost_at_server(Lo, Ctx),
                      ELo =:= undefined orelse GHi < ELo]
      end, lists:seq(1, NVars)).

%% Both views agree: every grant the optimizers saw was decided by the server
%% before, and every server grant reached its optimizer unless it was killed.
check_views_agree(#{ivs := Ivs, ten := Ten, killed := Killed} = Ctx) ->
    [{grant_without_srv, #{id => Id, var => V, token => T, srv => Tn}}
     || #{id := Id, var := V, token := T, g := G} = Iv <- maps:values(Ivs),
        Tn <- [tenure(Iv, Ctx)],
        not (is_map(Tn) andalso maps:get(id, Tn) =:= Id andalso maps:get(acq, Tn) < G)] ++
        [{srv_grant_unclaimed, #{var => V, token => T, id => Id}}
         || {{V, T}, #{id := Id}} <- maps:to_list(Ten),
            not is_map_key(Id, Killed),
            case maps:get(Id, Ivs, undefined) of
                #{token := T} -> false;
                _ -> true
            end] ++
        lists:flatmap(
          fun(#{id := Id, var := V, token := T, end_type := Type, lost_kind := LK} = Iv) ->
                  SrvKind = case tenure(Iv, Ctx) of
                                #{kind := K} -> K;
                                undefined -> undefined
                            end,
                  [{notice_mismatch, #{id => Id, var => V, token => T, notice => LK, server => SrvKind}}
                   || Type =:= lost, LK =/= SrvKind] ++
                      [{released_after_loss, #{id => Id, var => V, token => T, server => SrvKind}}
                       || Type =:= normal, LK =:= released,
                          SrvKind =:= preempted orelse SrvKind =:= expired]
          end, maps:values(Ivs)).

check_writes(#{ivs := Ivs} = Ctx) ->
    lists:flatmap(fun(Iv) -> check_iv_writes(Iv, Ctx) end, maps:values(Ivs)).

check_iv_writes(#{id := Id, var := V, token := T, writes := Ws, end_type := Type, lost_kind := LK} = Iv, Ctx) ->
    Lost = Type =:= lost orelse lost_at_server(Iv, Ctx),
    SrvEnd = case tenure(Iv, Ctx) of
                 #{'end' := E} when is_integer(E) -> E;
                 _ -> infinity
             end,
    Who = #{id => Id, var => V, token => T},
    Holding = [W || #{phase := holding} = W <- Ws],
    Refused = [W || #{phase := holding, result := {error, _}} = W <- Ws],
    [{current_write_refused, Who#{write => W}} || not Lost, #{result := R} = W <- Holding, not is_ok(R)] ++
        case Refused of
            [] -> [];
            [#{pos := P0} | _] ->
                [{lost_lock_regained, Who#{write => W}} || #{pos := P, result := {ok, _}} = W <- Holding, P > P0]
        end ++
        [{case Ph =:= after_loss andalso LK =:= expired andalso S < SrvEnd of
              true -> expired_write_accepted;   % told it expired, but the server had not freed it yet
              false -> stale_write_accepted
          end, Who#{write => W, lost => LK}}
         || #{phase := Ph, start := S, result := R} = W <- Ws,
            Ph =/= holding orelse S > SrvEnd, is_ok(R)] ++
        [{bad_rejection, Who#{write => W}}
         || #{result := {error, Why}} = W <- Ws, not rejection(Why)] ++
        [{locked_undefined, Who#{write => W}}
         || #{result := {error, {locked, undefined}}} = W <- Ws] ++
        [{wrong_holder_in_rejection, Who#{write => W}}
         || #{result := {error, {locked, H}}} = W <- Ws, H =/= undefined, not newer_holder(H, V, T, Ctx)].

is_ok({ok, _}) -> true;
is_ok(_) -> false.

rejection({locked, _}) -> true;
rejection(stale_lock) -> true;
rejection(_) -> false.

%% {locked, H}: H took the variable after token T.
newer_holder(H, V, T, #{ten := Ten}) ->
    lists:any(fun({{V1, T1}, #{id := Id}}) -> V1 =:= V andalso T1 > T andalso Id =:= H end, maps:to_list(Ten)).

%% The variable's history: exactly the accepted writes (at their versions) and
%% the applied stops, with tokens that never go back.
check_history(#{ivs := Ivs, nvars := NVars}, Final) ->
    lists:flatmap(
      fun(V) ->
              Entries = case lists:keyfind(V, 2, [F || {final_history, _, _} = F <- Final]) of
                            {final_history, V, {ok, Es}} -> lists:sort(fun(A, B) -> maps:get(version, A) =< maps:get(version, B) end, Es);
                            Other -> {no_history, Other}
                        end,
              VIvs = [Iv || #{var := V1} = Iv <- maps:values(Ivs), V1 =:= V],
              FinalWrite = [R || {final_write, V1, R} <- Final, V1 =:= V],
              case Entries of
                  {no_history, O} -> [{history_versions, #{var => V, history => O}}];
                  %% the last accepted write is then the current version, not in
                  %% the history: final_write_refused says what went wrong
                  _ when FinalWrite =/= [], not is_tuple(hd(FinalWrite)) orelse element(1, hd(FinalWrite)) =/= ok -> [];
                  _ -> history_of_var(V, Entries, VIvs)
              end
      end, lists:seq(1, NVars)).

history_of_var(V, Entries, VIvs) ->
    Versions = [maps:get(version, E) || E <- Entries],
    Accepted = lists:sort([{Vsn, Id, T} || #{id := Id, token := T, writes := Ws} <- VIvs,
                                           #{result := {ok, Vsn}} <- Ws]),
    Applied = lists:sort([{Id, maps:get(value, maps:get(best, R))}
                          || #{id := Id, recs := Recs} <- VIvs,
                             {_, {stop_result, _, _, _, {ok, #{applied := true} = R}, _}} <- Recs]),
    InHist = lists:sort([{Vsn, Id, T} || #{version := Vsn, changed_by := {opt, Id, T}} <- Entries]),
    StopsInHist = lists:sort([{Id, X} || #{changed_by := {optimizer, Id}, value := X} <- Entries]),
    Unknown = [E || #{changed_by := By} = E <- Entries, By =/= undefined,
                    not (is_tuple(By) andalso (element(1, By) =:= opt orelse element(1, By) =:= optimizer))],
    TokenOf = maps:from_list([{Id, T} || #{id := Id, token := T} <- VIvs]),
    Tokens = [case By of
                  {opt, _, T} -> T;
                  {optimizer, Id} -> maps:get(Id, TokenOf, undefined)
              end || #{changed_by := By} <- Entries, is_tuple(By)],
    [{history_versions, #{var => V, versions => Versions}} || Versions =/= lists:seq(0, length(Versions) - 1)] ++
        [{history_mismatch, #{var => V, accepted_writes => Accepted -- InHist, in_history => InHist -- Accepted}}
         || Accepted =/= InHist] ++
        [{history_mismatch, #{var => V, applied_stops => Applied, in_history => StopsInHist}}
         || Applied =/= StopsInHist] ++
        [{history_mismatch, #{var => V, unknown_writers => Unknown}} || Unknown =/= []] ++
        [{fencing_order, #{var => V, tokens_by_version => Tokens}} || not nondecreasing(Tokens)].

nondecreasing([A, B | R]) when is_integer(A), is_integer(B) -> A =< B andalso nondecreasing([B | R]);
nondecreasing([_, B | _]) when not is_integer(B) -> false;
nondecreasing([A | _]) when not is_integer(A) -> false;
nondecreasing(_) -> true.

%% Calls a holder makes: refused only when the lock was lost.
check_holder_calls(#{ivs := Ivs, byopt := ByOpt} = Ctx) ->
    lists:flatmap(
      fun(#{id := Id, var := V, token := T, recs := Recs, end_type := Type} = Iv) ->
              Lost = Type =:= lost orelse lost_at_server(Iv, Ctx),
              Who = #{id => Id, var => V, token => T},
              NotOwner = fun(R) -> R =:= {error, not_lock_owner} andalso Lost end,
              [{progress_refused, Who#{result => R}}
               || {_, {progress, _, _, _, _, R}} <- Recs, R =/= ok, not NotOwner(R)] ++
                  [{renew_refused, Who#{result => R}}
                   || {_, {renew, _, _, _, R}} <- Recs, R =/= ok, not NotOwner(R)] ++
                  [{release_refused, Who#{result => R}}
                   || {_, {release_result, _, _, _, R}} <- Recs, R =/= ok, not NotOwner(R)] ++
                  [{late_release_accepted, Who#{result => R}}
                   || {_, {late_release, _, _, _, R}} <- Recs, R =/= {error, not_lock_owner}] ++
                  [{stop_wrong, Who#{result => R, expected_best => Exp}}
                   || {_, {stop_result, _, _, _, R, Exp}} <- Recs,
                      not (NotOwner(R) orelse
                           (is_tuple(R) andalso element(1, R) =:= ok andalso
                            maps:get(applied, element(2, R), x) =:= true andalso
                            maps:get(best, element(2, R), x) =:= Exp))] ++
                  lists:flatmap(fun({_, {status, _, _, _, R, Exp}}) -> check_status(Who, R, Exp, Lost);
                                   (_) -> []
                                end, Recs) ++
                  [{unended, Who} || Type =:= unended]
      end, maps:values(Ivs)) ++
        [{Tag, E} || {_, Recs} <- maps:to_list(ByOpt), {_, E} <- Recs,
                     Tag <- [element(1, E)], lists:member(Tag, [missing_notice, no_expiry, bad_notice])].

check_status(Who = #{id := Id, token := T}, R, #{iterations := N, best := Best}, Lost) ->
    case R of
        {ok, #{locked := true, token := T} = St} ->
            case St of
                #{optimizer := Id, iterations := N, best := Best} -> [];
                _ -> [{status_wrong, Who#{status => St, expected_iterations => N, expected_best => Best}}]
            end;
        _ when Lost -> [];
        _ -> [{status_wrong, Who#{status => R, expected => held}}]
    end.

%% How each acquire ended.
check_outcomes(#{specs := Specs, byopt := ByOpt, killed := Killed, ten := Ten}) ->
    lists:flatmap(
      fun({Id, #{var := V, conflict := Conflict, timeout := Timeout}}) ->
              Recs = maps:get(Id, ByOpt, []),
              Outs = [E || {_, E} <- Recs, lists:member(element(1, E), [granted, aborted, timeout, acquire_error])],
              IsKilled = is_map_key(Id, Killed),
              Acq = case [P || {P, {acquiring, _, _}} <- Recs] of
                        [A | _] -> A;
                        [] -> 0
                    end,
              HeldBy = fun(Pred, At) ->
                               [x || {{V1, _}, #{id := H, acq := A1, 'end' := E1}} <- maps:to_list(Ten),
                                     V1 =:= V, Pred(H), A1 < At, E1 =:= undefined orelse E1 > Acq] =/= []
                       end,
              [{outcome, #{id => Id, outcomes => Outs}}
               || length(Outs) > 1 orelse (Outs =:= [] andalso not IsKilled)] ++
                  [{acquire_error, #{id => Id, result => R}} || {acquire_error, _, _, R} <- Outs] ++
                  [{waiter_starved, #{id => Id, var => V, conflict => Conflict, outcomes => Outs}}
                   || Conflict =/= abort, Timeout =:= infinity, not IsKilled,
                      [g || {granted, _, _, _, _} <- Outs] =:= []] ++
                  [{abort_mode, #{id => Id, conflict => Conflict}}
                   || {aborted, _, _, _} <- Outs, Conflict =/= abort] ++
                  [{abort_when_free, #{id => Id, var => V, held_by => H, pos => P}}
                   || {P, {aborted, _, _, H}} <- Recs, not HeldBy(fun(X) -> X =:= H end, P)] ++
                  [{timeout_early, #{id => Id, timeout => Timeout, elapsed_us => E}}
                   || {timeout, _, _, E} <- Outs,
                      Conflict =:= abort orelse Timeout =:= infinity orelse E < Timeout * 1000] ++
                  [{timeout_when_free, #{id => Id, var => V, pos => P}}
                   || {P, {timeout, _, _, _}} <- Recs, not HeldBy(fun(X) -> X =/= Id end, P)]
      end, lists:sort(maps:to_list(Specs))).

%% An optimizer ends normally; killed when it died on purpose or by its killer.
check_exits(#{specs := Specs, exits := Exits, byopt := ByOpt}) ->
    [{optimizer_crashed, #{id => Id, behaviour => B, reason => R}}
     || {Id, #{behaviour := B}} <- lists:sort(maps:to_list(Specs)),
        R <- [maps:get(Id, Exits, no_exit)],
        Died <- [[d || {_, {died, _, _, _}} <- maps:get(Id, ByOpt, [])] =/= []],
        not (R =:= normal andalso not Died orelse R =:= killed andalso (Died orelse B =:= killed))].

check_final(Final) ->
    [{final_status, #{var => V, status => R, retries => N}}
     || {final_status, V, R, N} <- Final, not is_unlocked(R)] ++
        [{final_write_refused, #{var => V, result => R}} || {final_write, V, R} <- Final, not is_ok(R)].

is_unlocked({ok, #{locked := false, waiters := 0}}) -> true;
is_unlocked(_) -> false.
