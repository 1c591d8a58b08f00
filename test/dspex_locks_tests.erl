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
     [fun waiters_are_granted_fifo/0, fun killed_holder_frees_lock_quickly/0, fun abort_and_timeout/0,
      fun only_holder_releases/0, fun tokens_strictly_increase/0, fun writes_need_the_current_token/0,
      fun preemption/0, fun preemption_respects_min_iterations/0, fun lease_expires_unless_renewed/0,
      fun progress_and_apply_best/0, fun racing_acquirers_never_overlap/0, fun bad_options/0]}.

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

killed_holder_frees_lock_quickly() ->
    S = session(),
    Holder = spawn(fun() -> receive never -> ok end end),
    {ok, _} = dspex_locks:acquire(S, x, h, #{pid => Holder}),
    W = waiter(S, w, #{}),
    await_waiters(S, 1),
    T0 = erlang:monotonic_time(microsecond),
    exit(Holder, kill),
    receive {granted, w, {ok, #{optimizer := w}}} -> ok after 1000 -> ?assert(false) end,
    Elapsed = erlang:monotonic_time(microsecond) - T0,
    ?assert(Elapsed < 50000),
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
    ?assertEqual({error, {invalid_argument, lock}}, dspex_store:set(S, x, 0.4, #{lock => nope})).

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
    receive {late_write, W} -> ?assertEqual({error, {locked, high}}, W) after 1000 -> ?assert(false) end,
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
    ?assertEqual({error, {invalid_argument, objective}}, dspex_locks:acquire(S, x, a, #{objective => best})).
