%% EUnit tests of dspex_locks: optimizer locks, waiters, preemption, leases, progress.
-module(dspex_locks_tests).
-include_lib("eunit/include/eunit.hrl").

sid() -> iolist_to_binary(["l_", integer_to_list(erlang:unique_integer([positive]))]).

session() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    S.

locks_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun waiters_are_granted_fifo/0, fun killed_holder_frees_lock/0, fun abort_and_timeout/0,
      fun only_holder_releases/0, fun tokens_strictly_increase/0, fun writes_need_the_current_token/0,
      fun preemption/0, fun preemption_respects_min_iterations/0, fun lease_expires_unless_renewed/0,
      fun progress_and_apply_best/0, fun racing_acquirers_never_overlap/0, fun bad_options/0,
      fun principal_that_does_not_parse_is_refused/0, fun acquire_cut_by_a_call_timeout_is_withdrawn/0,
      fun lock_goes_with_its_deleted_session/0,
      fun lock_goes_with_its_expired_session/0, fun lock_goes_when_its_expired_session_is_made_again/0, fun longest_timeout_waits/0,
      fun apply_best_writes_as_the_locks_principal/0]}.

%% Each test kills the lock server (the supervisor allows 5 restarts in 10 s):
%% a fresh application per test.
lock_server_crash_test_() ->
    {foreach,
     fun() -> _ = application:stop(dspex_bridge), {ok, _} = application:ensure_all_started(dspex_bridge) end,
     fun(_) -> ok end,
     [fun waiter_of_a_killed_server_gets_an_error/0,
      fun killed_server_keeps_holders_and_frees_dead_ones/0,
      {timeout, 120, fun server_killed_under_load_leaves_no_lock_stuck/0}]}.

%% A process that acquires and reports each grant to the test process.
waiter(S, Id, Opts) ->
    Parent = self(),
    spawn(fun() ->
              R = dspex_locks:acquire(S, x, Id, Opts),
              Parent ! {granted, Id, R},
              receive release -> {ok, Lock} = R, ok = dspex_locks:release(Lock) end
          end).

%% Waits (by asking the server, never sleeping) until N waiters are queued.
await_waiters(S, N) ->
    {ok, #{waiters := W}} = dspex_locks:status(S, x),
    case W >= N of
        true -> ok;
        false -> erlang:yield(), await_waiters(S, N)
    end.

waiters_are_granted_fifo() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{}),
    Pids = [begin P = waiter(S, Id, #{}), await_waiters(S, N), {Id, P} end
            || {N, Id} <- [{1, b}, {2, c}, {3, d}]],
    ok = dspex_locks:release(L),
    %% take whichever grant comes first: only FIFO order gives [b, c, d]
    Order = [receive {granted, G, {ok, _}} -> element(2, lists:keyfind(G, 1, Pids)) ! release, G end
             || _ <- Pids],
    ?assertEqual([b, c, d], Order).

%% The hand-off latency is a number of `make bench' (locks); here the outcome
%% and its order: the holder's death alone frees the lock, the waiter gets it
%% with a higher token, and the dead holder's token is refused from then on.
killed_holder_frees_lock() ->
    S = session(),
    Holder = spawn(fun() -> receive never -> ok end end),
    {ok, #{token := T0} = Dead} = dspex_locks:acquire(S, x, h, #{pid => Holder}),
    W = waiter(S, w, #{}),
    await_waiters(S, 1),
    receive {granted, w, _} -> ?assert(false) after 0 -> ok end,
    exit(Holder, kill),
    receive {granted, w, {ok, #{optimizer := w, token := T1}}} -> ?assert(T1 > T0) end,
    {ok, #{locked := true, optimizer := w, waiters := 0}} = dspex_locks:status(S, x),
    ?assertEqual({error, stale_lock}, dspex_store:set(S, x, 0.1, #{lock => Dead})),
    W ! release.

abort_and_timeout() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{}),
    ?assertEqual({error, {lock_held_by, a}}, dspex_locks:acquire(S, x, b, #{conflict => abort})),
    ?assertEqual({error, timeout}, dspex_locks:acquire(S, x, b, #{timeout => 20})),
    {ok, #{waiters := 0, locked := true, optimizer := a}} = dspex_locks:status(S, x),
    ok = dspex_locks:release(L),
    {ok, #{locked := false}} = dspex_locks:status(S, x),
    ?assertEqual({error, {not_found, nope}}, dspex_locks:acquire(S, nope, a, #{})).

only_holder_releases() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{}),
    Parent = self(),
    spawn(fun() -> Parent ! {other, dspex_locks:release(L)} end),
    receive {other, R} -> ?assertEqual({error, not_lock_owner}, R) end,
    ?assertEqual({error, not_lock_owner}, dspex_locks:release(L#{token := maps:get(token, L) + 1000})),
    ok = dspex_locks:release(L),
    ?assertEqual({error, not_lock_owner}, dspex_locks:release(L)).

tokens_strictly_increase() ->
    S = session(),
    Tokens = [begin {ok, #{token := T} = L} = dspex_locks:acquire(S, x, a, #{}),
                    ok = dspex_locks:release(L), T end || _ <- lists:seq(1, 20)],
    ?assertEqual(Tokens, lists:usort(Tokens)).

writes_need_the_current_token() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, {opt, 1}, #{}),
    ?assertEqual({error, {locked, {opt, 1}}}, dspex_store:set(S, x, 0.1)),
    ?assertEqual({error, {locked, {opt, 1}}}, dspex_store:delete(S, x)),
    ?assertMatch({error, {batch_failed, #{x := {locked, {opt, 1}}}}},
                 dspex_store:set_many(S, [{x, 0.1}], #{atomic => true})),
    {ok, 1} = dspex_store:set(S, x, 0.2, #{lock => L}),
    {ok, 2} = dspex_store:set(S, x, 0.3, #{lock => maps:get(token, L)}),
    ok = dspex_locks:release(L),
    ?assertEqual({error, stale_lock}, dspex_store:set(S, x, 0.4, #{lock => L})),
    {ok, 3} = dspex_store:set(S, x, 0.4),
    ?assertEqual({error, {invalid_argument, lock}}, dspex_store:set(S, x, 0.4, #{lock => nope})),
    %% an outdated token while another optimizer holds the lock is stale too
    %% (the Errors table): {locked, Holder} is only for a write without token
    {ok, L2} = dspex_locks:acquire(S, x, {opt, 2}, #{}),
    ?assertEqual({error, stale_lock}, dspex_store:set(S, x, 0.5, #{lock => L})),
    ?assertMatch({error, {batch_failed, #{x := stale_lock}}},
                 dspex_store:set_many(S, [{x, 0.5, #{lock => L}}], #{atomic => true})),
    ?assertEqual({error, stale_lock}, dspex_store:rollback(S, x, 2, #{lock => L})),
    ?assertEqual({error, {locked, {opt, 2}}}, dspex_store:set(S, x, 0.5)),
    {ok, 4} = dspex_store:set(S, x, 0.5, #{lock => L2}),
    ok = dspex_locks:release(L2).

preemption() ->
    S = session(),
    Parent = self(),
    Low = spawn(fun() ->
                    {ok, L} = dspex_locks:acquire(S, x, low, #{priority => 1}),
                    Parent ! {low_has, L},
                    receive {dspex_preempted, S, <<"x">>, T} -> Parent ! {preempted, T, L} end,
                    Parent ! {late_write, dspex_store:set(S, x, 0.9, #{lock => L})}
                end),
    LowLock = receive {low_has, L0} -> L0 end,
    {ok, High} = dspex_locks:acquire(S, x, high, #{conflict => preempt, priority => 5}),
    receive {preempted, T, _} -> ?assertEqual(maps:get(token, LowLock), T) after 1000 -> ?assert(false) end,
    receive {late_write, W} -> ?assertEqual({error, stale_lock}, W) after 1000 -> ?assert(false) end,
    ?assert(maps:get(token, High) > maps:get(token, LowLock)),
    %% a lower priority does not preempt: it waits (here, until its timeout)
    ?assertEqual({error, timeout}, dspex_locks:acquire(S, x, lower, #{conflict => preempt, priority => 0,
                                                                       timeout => 20})),
    ok = dspex_locks:release(High),
    exit(Low, kill).

preemption_respects_min_iterations() ->
    S = session(),
    ok = application:set_env(dspex_bridge, min_iterations_before_preempt, 3),
    ok = supervisor:terminate_child(dspex_core_sup, dspex_locks),
    {ok, _} = supervisor:restart_child(dspex_core_sup, dspex_locks),
    try
        {ok, L} = dspex_locks:acquire(S, x, low, #{priority => 1}),
        ?assertEqual({error, timeout},
                     dspex_locks:acquire(S, x, high, #{conflict => preempt, priority => 9, timeout => 20})),
        [ok = dspex_locks:report_progress(L, I, 0.5, #{}) || I <- [1, 2, 3]],
        {ok, H} = dspex_locks:acquire(S, x, high, #{conflict => preempt, priority => 9, timeout => 1000}),
        receive {dspex_preempted, S, <<"x">>, _} -> ok after 1000 -> ?assert(false) end,
        ok = dspex_locks:release(H)
    after
        ok = application:set_env(dspex_bridge, min_iterations_before_preempt, 0),
        ok = supervisor:terminate_child(dspex_core_sup, dspex_locks),
        {ok, _} = supervisor:restart_child(dspex_core_sup, dspex_locks)
    end.

lease_expires_unless_renewed() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{lease => 200}),
    ok = dspex_locks:renew(L),
    {ok, #{locked := true}} = dspex_locks:status(S, x),
    T = maps:get(token, L),
    receive {dspex_lock_expired, S, <<"x">>, T} -> ok after 2000 -> ?assert(false) end,
    {ok, #{locked := false}} = dspex_locks:status(S, x),
    ?assertEqual({error, stale_lock}, dspex_store:set(S, x, 0.1, #{lock => L})),
    ?assertEqual({error, not_lock_owner}, dspex_locks:renew(L)).

progress_and_apply_best() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{objective => maximize, metric => accuracy}),
    [ok = dspex_locks:report_progress(L, I, V, #{accuracy => A})
     || {I, V, A} <- [{1, 0.1, 0.50}, {2, 0.7, 0.91}, {3, 0.3, 0.80}]],
    {ok, #{iterations := 3, best := #{value := 0.7, score := 0.91, iteration := 2}}} = dspex_locks:status(S, x),
    [#{variable := <<"x">>, optimizer := a} | _] = [A || A = #{session := S1} <- dspex_locks:active(), S1 =:= S],
    {ok, #{applied := true, best := #{value := 0.7}}} = dspex_locks:stop(L, #{apply_best => true}),
    {ok, #{value := 0.7, version := 1}} = dspex_store:get(S, x),
    {ok, #{locked := false}} = dspex_locks:status(S, x),
    {ok, L2} = dspex_locks:acquire(S, x, b, #{}),
    {ok, #{applied := false, best := undefined}} = dspex_locks:stop(L2, #{apply_best => true}).

%% 100 processes race for one lock; a collector records every grant and
%% release in the order they happen: holders never overlap, everyone gets the
%% lock once, and tokens grow in grant order.
racing_acquirers_never_overlap() ->
    S = session(),
    Collector = self(),
    Pids = [spawn_link(fun() ->
                           {ok, L} = dspex_locks:acquire(S, x, I, #{}),
                           Collector ! {in, I, maps:get(token, L)},
                           {ok, _} = dspex_store:set(S, x, 0.5, #{lock => L}),
                           Collector ! {out, I},
                           ok = dspex_locks:release(L)
                       end) || I <- lists:seq(1, 100)],
    History = [receive M -> M end || _ <- lists:seq(1, 200)],
    ?assertEqual(100, length(Pids)),
    check_history(History, none, 0),
    Tokens = [T || {in, _, T} <- History],
    ?assertEqual(Tokens, lists:usort(Tokens)),
    ?assertEqual(lists:seq(1, 100), lists:sort([I || {in, I, _} <- History])).

check_history([], none, _) -> ok;
check_history([{in, I, _} | Rest], none, N) -> check_history(Rest, I, N + 1);
check_history([{out, I} | Rest], I, N) -> check_history(Rest, none, N);
check_history([Ev | _], Holder, _) -> erlang:error({overlap, Ev, held_by, Holder}).

bad_options() ->
    S = session(),
    ?assertEqual({error, {invalid_argument, conflict}}, dspex_locks:acquire(S, x, a, #{conflict => maybe})),
    ?assertEqual({error, {invalid_argument, timeout}}, dspex_locks:acquire(S, x, a, #{timeout => -1})),
    ?assertEqual({error, {invalid_argument, objective}}, dspex_locks:acquire(S, x, a, #{objective => best})),
    %% past what a timer takes (the server would crash on it)
    ?assertEqual({error, {invalid_argument, timeout}}, dspex_locks:acquire(S, x, a, #{timeout => 16#100000000})),
    ?assertEqual({error, {invalid_argument, lease}}, dspex_locks:acquire(S, x, a, #{lease => 16#100000000})),
    ?assertMatch({ok, #{locked := false}}, dspex_locks:status(S, x)).

%% A principal that does not parse (a charlist, an atom, ...) never acts as
%% anyone: `#{as => "intruder"}' used to be ignored by the NIF and got the
%% lock that `#{as => <<"intruder">>}' is refused. badarg, raised in the caller.
principal_that_does_not_parse_is_refused() ->
    S = session(),
    ?assertEqual({error, access_denied}, dspex_locks:acquire(S, x, o, #{as => <<"intruder">>})),
    [?assertError(badarg, dspex_locks:acquire(S, x, o, Opts))
     || Opts <- [#{as => "intruder"}, #{as => intruder}, #{as => 42}, #{as => {<<"intruder">>}},
                 #{as => <<"intruder">>, context => []}]],
    %% nothing was granted, and the server is still the same one
    {ok, #{locked := false}} = dspex_locks:status(S, x),
    %% the NIF refuses it too, whoever calls it
    ?assertError(badarg, dspex_nif:var_lock(S, x, o, 0, #{as => "intruder"})),
    ?assertError(badarg, dspex_nif:var_lock(S, x, o, 0, #{as => "intruder"}, #{})),
    {ok, #{locked := false}} = dspex_locks:status(S, x).

%% Restarts the lock server by killing it; returns once its successor runs.
kill_server() ->
    Old = whereis(dspex_locks),
    Mon = monitor(process, Old),
    exit(Old, kill),
    receive {'DOWN', Mon, process, Old, killed} -> ok end,
    await_new_server(Old, 5000).

await_new_server(_Old, 0) -> erlang:error(lock_server_not_restarted);
await_new_server(Old, N) ->
    case whereis(dspex_locks) of
        P when is_pid(P), P =/= Old -> _ = sys:get_state(P), P;
        _ -> timer:sleep(1), await_new_server(Old, N - 1)
    end.

waiter_of_a_killed_server_gets_an_error() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{}),
    W = waiter(S, w, #{timeout => infinity}),
    await_waiters(S, 1),
    kill_server(),
    receive {granted, w, R} -> ?assertEqual({error, {lock_server, down}}, R) end,
    exit(W, kill),
    %% the holder kept its lock across the restart, and still releases it
    {ok, #{locked := true, optimizer := a, waiters := 0}} = dspex_locks:status(S, x),
    ?assertEqual({error, {locked, a}}, dspex_store:set(S, x, 0.1)),
    {ok, _} = dspex_store:set(S, x, 0.1, #{lock => L}),
    ok = dspex_locks:release(L),
    {ok, _} = dspex_store:set(S, x, 0.2).

%% The lock table survives the server: live holders are monitored again (their
%% death frees the lock), locks of holders that died while no server watched
%% are freed, tokens keep rising, leases keep running.
killed_server_keeps_holders_and_frees_dead_ones() ->
    S = session(),
    {ok, _} = dspex_store:register(S, y, float, 0.5),
    {ok, _} = dspex_store:register(S, z, float, 0.5),
    Live = spawn(fun() -> receive never -> ok end end),
    Doomed = spawn(fun() -> receive never -> ok end end),
    Self = self(),
    {ok, #{token := TX}} = dspex_locks:acquire(S, x, live, #{pid => Live}),
    {ok, #{token := TY}} = dspex_locks:acquire(S, y, doomed, #{pid => Doomed}),
    {ok, #{token := TZ}} = dspex_locks:acquire(S, z, leased, #{lease => 100}),
    %% stop the server from seeing the death: kill it, then the holder
    OldServer = whereis(dspex_locks),
    ok = sys:suspend(OldServer),
    exit(Doomed, kill),
    exit(OldServer, kill),
    await_new_server(OldServer, 5000),
    {ok, #{locked := true, optimizer := live, token := TX}} = dspex_locks:status(S, x),
    ?assertEqual({error, {locked, live}}, dspex_store:set(S, x, 0.1)),
    %% the dead holder's lock is free (the monitor's noproc), so y is writable
    await_unlocked(S, y, 5000),
    {ok, _} = dspex_store:set(S, y, 0.1),
    %% the adopted lease still expires and tells the holder (this process)
    receive {dspex_lock_expired, S, <<"z">>, TZ} -> ok end,
    {ok, _} = dspex_store:set(S, z, 0.1),
    %% the live holder's death frees its lock through the new server's monitor
    exit(Live, kill),
    await_unlocked(S, x, 5000),
    {ok, #{token := T2} = L2} = dspex_locks:acquire(S, x, next, #{}),
    ?assert(T2 > lists:max([TX, TY, TZ])),
    ok = dspex_locks:release(L2),
    Self ! done.

await_unlocked(S, Var, 0) -> erlang:error({still_locked, S, Var});
await_unlocked(S, Var, N) ->
    case dspex_locks:status(S, Var) of
        {ok, #{locked := false}} -> ok;
        _ -> timer:sleep(1), await_unlocked(S, Var, N - 1)
    end.

%% 12 optimizers loop on 4 variables (acquire, a write with the token,
%% release; some die holding the lock) while the server is killed 4 times.
%% Afterwards, with the load stopped: every lock the store holds belongs to a
%% live process the server knows; once those are gone every variable is
%% writable without a token and can be locked again, with a higher token.
server_killed_under_load_leaves_no_lock_stuck() ->
    S = session(),
    Vars = [x, y, z, w],
    [{ok, _} = dspex_store:register(S, V, float, 0.5) || V <- Vars -- [x]],
    Parent = self(),
    Opt = fun Loop(I, N) ->
                  V = lists:nth(rand:uniform(4), Vars),
                  case dspex_locks:acquire(S, V, {opt, I}, #{timeout => 200}) of
                      {ok, L} ->
                          case dspex_store:set(S, V, 0.5, #{lock => L}) of
                              {ok, _} -> ok;
                              {error, stale_lock} -> ok;          % lease/restart raced: allowed
                              {error, {locked, _}} -> ok
                          end,
                          %% one grant in 20 dies holding its lock
                          case rand:uniform(20) of
                              1 -> exit(died_holding);
                              _ -> _ = dspex_locks:release(L)
                          end;
                      {error, timeout} -> ok;
                      {error, {lock_server, _}} -> ok
                  end,
                  receive stop -> Parent ! {stopped, self(), N} after 0 -> Loop(I, N + 1) end
          end,
    Spawn = fun(I) -> spawn(fun() -> Opt(I, 0) end) end,
    Pids0 = [Spawn(I) || I <- lists:seq(1, 12)],
    Kill = fun K(0, Pids) -> Pids;
               K(N, Pids) ->
                   %% let some work happen (bounded: by counting grants in the store)
                   await_progress(S, Vars, 20),
                   kill_server(),
                   %% replace the optimizers that died holding a lock
                   Alive = [P || P <- Pids, is_process_alive(P)],
                   K(N - 1, Alive ++ [Spawn(100 + N * 20 + I) || I <- lists:seq(1, 12 - length(Alive))])
           end,
    Pids = Kill(4, Pids0),
    %% stop the optimizers; one may still die holding in its last round
    Mons = [{monitor(process, P), P} || P <- Pids],
    [P ! stop || P <- Pids],
    [receive {'DOWN', M, process, P, _} -> ok end || {M, P} <- Mons],
    flush_stopped(),
    %% the load did run: hundreds of locked writes
    ?assert(total_version(S, Vars) >= 4 * 20),
    %% every optimizer is gone: each lock still in the store must be freed
    %% (through a monitor of the current server), none may stay stuck
    await_no_lock(S, 5000),
    [] = [A || A = #{session := S1} <- dspex_locks:active(), S1 =:= S],
    [{ok, #{locked := false}} = dspex_locks:status(S, V) || V <- Vars],
    [{ok, _} = dspex_store:set(S, V, 0.25) || V <- Vars],
    [begin {ok, #{token := T} = L} = dspex_locks:acquire(S, V, final, #{timeout => 1000}),
           ?assert(T > MaxSeen),
           ok = dspex_locks:release(L) end || V <- Vars, MaxSeen <- [max_token_seen()]],
    ok.

flush_stopped() ->
    receive {stopped, _, _} -> flush_stopped() after 0 -> ok end.

await_no_lock(S, 0) -> erlang:error({locks_stuck, [L || L = {S1, _, _, _, _} <- dspex_nif:lock_list(), S1 =:= S]});
await_no_lock(S, N) ->
    case [L || L = {S1, _, _, _, _} <- dspex_nif:lock_list(), S1 =:= S] of
        [] -> ok;
        _ -> timer:sleep(1), await_no_lock(S, N - 1)
    end.

%% The token counter now: a throw-away lock's token (released at once).
max_token_seen() ->
    S = session(),
    {ok, #{token := T} = L} = dspex_locks:acquire(S, x, probe, #{}),
    ok = dspex_locks:release(L),
    T.

%% Waits until the variables' versions moved by at least N in total (work
%% done), polling the store.
await_progress(S, Vars, N) ->
    V0 = total_version(S, Vars),
    await_progress(S, Vars, V0 + N, 20000).
await_progress(_S, _Vars, _Target, 0) -> erlang:error(no_progress);
await_progress(S, Vars, Target, Left) ->
    case total_version(S, Vars) >= Target of
        true -> ok;
        false -> timer:sleep(1), await_progress(S, Vars, Target, Left - 1)
    end.

total_version(S, Vars) ->
    lists:sum([begin {ok, #{version := V}} = dspex_store:get(S, Var), V end || Var <- Vars]).

%% A call the server does not answer in time is {error, {lock_server, timeout}};
%% an acquire cut so is withdrawn: the lock the (slow) server grants it
%% afterwards is released at once, never left to a holder that does not know.
acquire_cut_by_a_call_timeout_is_withdrawn() ->
    S = session(),
    ok = application:set_env(dspex_bridge, lock_call_timeout_ms, 50),
    Server = whereis(dspex_locks),
    try
        ok = sys:suspend(Server),
        ?assertEqual({error, {lock_server, timeout}}, dspex_locks:status(S, x)),
        ?assertEqual({error, {lock_server, timeout}}, dspex_locks:acquire(S, x, late, #{timeout => 0})),
        ok = sys:resume(Server),
        %% the server took the acquire, then its withdrawal (same sender: in order)
        ?assertEqual({ok, #{locked => false, waiters => 0}}, dspex_locks:status(S, x)),
        {ok, _} = dspex_store:set(S, x, 0.1)
    after
        _ = (catch sys:resume(Server)),
        application:unset_env(dspex_bridge, lock_call_timeout_ms)
    end.

%% A holder in its own process: reports its lock, then every message it gets.
holder(S, Var) ->
    Parent = self(),
    Pid = spawn_link(fun() ->
                             Parent ! {held, self(), dspex_locks:acquire(S, Var, old_holder, #{})},
                             holder_loop(Parent)
                     end),
    {ok, Lock} = next(held, Pid),
    {Pid, Lock}.

holder_loop(Parent) ->
    receive
        stop -> ok;
        M -> Parent ! {holder_got, self(), M}, holder_loop(Parent)
    end.

%% A waiter in its own process, queued (by the server's count) before returning.
queued_waiter(S, Var) ->
    Parent = self(),
    Pid = spawn_link(fun() -> Parent ! {waited, self(), dspex_locks:acquire(S, Var, waiter, #{})} end),
    await_queued(S, Var, Pid),
    Pid.

%% Polls the server until the waiter is queued; fails if it was answered instead.
await_queued(S, Var, Pid) ->
    receive {waited, Pid, R} -> erlang:error({not_queued, R})
    after 0 ->
            case dspex_locks:status(S, Var) of
                {ok, #{waiters := N}} when N >= 1 -> ok;
                _ -> erlang:yield(), await_queued(S, Var, Pid)
            end
    end.

%% The next `{Tag, Pid, Msg}'; 2 s without one is a failure, not a hang.
next(Tag, Pid) ->
    receive {Tag, Pid, M} -> M
    after 2000 -> erlang:error({no_message, Tag})
    end.

%% A deleted session's lock does not survive it: the holder is told, the
%% waiter answered, and a session of the same id starts unlocked.
lock_goes_with_its_deleted_session() ->
    S = session(),
    {H, #{token := T} = Lock} = holder(S, x),
    W = queued_waiter(S, x),
    ok = dspex_store:delete_session(S),
    ?assertEqual({dspex_lock_lost, S, <<"x">>, T, session_deleted}, next(holder_got, H)),
    ?assertEqual({error, session_not_found}, next(waited, W)),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ?assertEqual({ok, #{locked => false, waiters => 0}}, dspex_locks:status(S, x)),
    {ok, New} = dspex_locks:acquire(S, x, new_holder, #{conflict => abort}),
    %% the old lock is nobody's now: no release, renewal or write with it
    ?assertEqual({error, not_lock_owner}, dspex_locks:release(Lock)),
    ?assertEqual({error, not_lock_owner}, dspex_locks:renew(Lock)),
    ?assertEqual({error, stale_lock}, dspex_store:set(S, x, 0.7, #{lock => Lock})),
    ok = dspex_locks:release(New),
    H ! stop.

lock_goes_with_its_expired_session() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 1}),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {H, #{token := T}} = holder(S, x),
    ok = dspex_test_hooks:enable(),
    ok = dspex_nif:advance_clock(5000),
    ?assert(dspex_session_sweeper:sweep_now() >= 1),
    ?assertEqual({dspex_lock_lost, S, <<"x">>, T, session_expired}, next(holder_got, H)),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ?assertEqual({ok, #{locked => false, waiters => 0}}, dspex_locks:status(S, x)),
    H ! stop.

%% Expired and made again before the sweeper came by (it is suspended here):
%% creating the new session tells the lock server, the old lock goes as
%% expired, and the new variable of that name is free.
lock_goes_when_its_expired_session_is_made_again() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 1}),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {H, #{token := T}} = holder(S, x),
    ok = dspex_test_hooks:enable(),
    ok = sys:suspend(dspex_session_sweeper),
    try
        ok = dspex_nif:advance_clock(5000),
        {ok, _} = dspex_store:create_session(S),
        ?assertEqual({dspex_lock_lost, S, <<"x">>, T, session_expired}, next(holder_got, H)),
        {ok, _} = dspex_store:register(S, x, float, 0.5),
        ?assertEqual({ok, #{locked => false, waiters => 0}}, dspex_locks:status(S, x))
    after
        ok = sys:resume(dspex_session_sweeper)
    end,
    H ! stop.

%% The longest wait the option takes is a wait, not an error: the call's own
%% bound (the wait plus a margin) is capped at what gen_server takes.
longest_timeout_waits() ->
    S = session(),
    {ok, L} = dspex_locks:acquire(S, x, a, #{}),
    Parent = self(),
    %% the waiter's lock is freed by its death, once it reported it
    W = spawn_link(fun() -> Parent ! {waited, self(), dspex_locks:acquire(S, x, b, #{timeout => 4294962296})} end),
    await_queued(S, x, W),
    ok = dspex_locks:release(L),
    ?assertMatch({ok, #{optimizer := b}}, next(waited, W)).

%% apply_best is a write by the lock's holder: a principal allowed only to
%% optimize cannot write through it (the lock is released all the same);
%% with write permission too, it applies.
apply_best_writes_as_the_locks_principal() ->
    S = session(),
    P = <<"opt_bot">>,
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => P, permissions => [optimize]}]),
    {ok, L} = dspex_locks:acquire(S, x, bot, #{as => P, conflict => abort}),
    ?assertEqual({error, access_denied}, dspex_store:set(S, x, 0.9, #{as => P, lock => L})),
    ok = dspex_locks:report_progress(L, 1, 0.99, #{}),
    ?assertMatch({ok, #{applied := false, apply_error := access_denied}}, dspex_locks:stop(L, #{apply_best => true})),
    ?assertEqual({ok, 0.5}, dspex_store:get_value(S, x)),
    ?assertEqual({ok, #{locked => false, waiters => 0}}, dspex_locks:status(S, x)),
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => P, permissions => [optimize, write]}]),
    {ok, L2} = dspex_locks:acquire(S, x, bot, #{as => P, conflict => abort}),
    ok = dspex_locks:report_progress(L2, 1, 0.75, #{}),
    ?assertMatch({ok, #{applied := true}}, dspex_locks:stop(L2, #{apply_best => true})),
    ?assertEqual({ok, 0.75}, dspex_store:get_value(S, x)).
