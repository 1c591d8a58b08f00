%% EUnit: the NIF side of the owner's replication fast path (issue #21;
%% c_src/nif/repl_nif.c) without a cluster: descriptors (publish, unsettle,
%% announced, forget), a link's native queue (one wake message per empty ->
%% non-empty, drain in append order, the writer's records and the fast
%% path's in one order, the 65536 bound, a new shipper taking the records of
%% the previous one), repl_set/6 (commit and append in one call; `slow' when
%% not settled, under another view generation or for a big value; a failed
%% set ships nothing and withdraws its announcement) and bad arguments.
-module(dspex_repl_nif_tests).
-include_lib("eunit/include/eunit.hrl").

repl_nif_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end,
     fun(_) -> ok end,
     [fun descriptors/0, fun link_queue/0, fun fast_set/0, fun multi_link_set/0, fun async_set/0,
      {timeout, 60, fun many_records_are_handed_over_off_the_normal_scheduler/0},
      fun bad_arguments/0]}.

session(S) ->
    _ = dspex_nif:session_delete(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    S.

%% A link whose shipper is a fresh process that forwards what it receives.
open_link(Node) ->
    Self = self(),
    Pid = spawn_link(fun() ->
                             {ok, Id, Old} = dspex_nif:repl_link_open(Node),
                             Self ! {opened, Id, Old},
                             forward(Self)
                     end),
    receive {opened, Id, Old} -> {Id, Old, Pid} end.

forward(To) ->
    receive
        stop -> ok;
        {drain, Id} -> To ! {drained, dspex_nif:repl_drain(Id)}, forward(To);
        M -> To ! {shipper, M}, forward(To)
    end.

drain(Pid, Id) ->
    Pid ! {drain, Id},
    receive {drained, L} -> L end.

%% The wake messages the shipper got so far (it forwards in order: the echo
%% comes after every earlier one).
wakes(Pid) ->
    Pid ! echo,
    count_wakes().

count_wakes() ->
    receive
        {shipper, dspex_repl_wake} -> 1 + count_wakes();
        {shipper, echo} -> 0
    end.

descriptors() ->
    S = <<"replnif_desc">>,
    none = dspex_nif:repl_info(S),
    none = dspex_nif:repl_announced(S),
    none = dspex_nif:repl_unsettle(S),
    {Id, _, Pid} = open_link('replnif_desc@nowhere'),
    ok = dspex_nif:repl_publish(S, 3, 10, 7, Id),
    {true, 3, 10, {3, 10}} = dspex_nif:repl_info(S),
    {3, 10} = dspex_nif:repl_announced(S),
    {3, 10} = dspex_nif:repl_unsettle(S),
    {false, 3, 10, {3, 10}} = dspex_nif:repl_info(S),
    %% published again at a later seq, then a new epoch
    ok = dspex_nif:repl_publish(S, 3, 12, 7, Id),
    {true, 3, 12, {3, 12}} = dspex_nif:repl_info(S),
    ok = dspex_nif:repl_publish(S, 4, 0, 8, Id),
    {true, 4, 0, {4, 0}} = dspex_nif:repl_info(S),
    ok = dspex_nif:repl_forget(S),
    none = dspex_nif:repl_info(S),
    ok = dspex_nif:repl_forget(S),
    Pid ! stop.

link_queue() ->
    Node = 'replnif_queue@nowhere',
    undefined = dspex_nif:repl_link_id('replnif_never@nowhere'),
    {Id, [], Pid} = open_link(Node),
    Id = dspex_nif:repl_link_id(Node),
    [] = drain(Pid, Id),
    %% one wake per empty -> non-empty
    [ok = dspex_nif:repl_push(Id, {r, I}) || I <- lists:seq(1, 100)],
    Recs = drain(Pid, Id),
    ?assertEqual([{r, I} || I <- lists:seq(1, 100)], Recs),
    ?assertEqual(1, wakes(Pid)),
    ok = dspex_nif:repl_push(Id, {r, 101}),
    [{r, 101}] = drain(Pid, Id),
    ?assertEqual(1, wakes(Pid)),
    %% bounded: 65536 queued, then full (nothing queued); a drain of that many
    %% runs on a dirty scheduler
    [ok = dspex_nif:repl_push(Id, {r, I}) || I <- lists:seq(1, 65536)],
    full = dspex_nif:repl_push(Id, {r, extra}),
    Big = drain(Pid, Id),
    ?assertEqual(65536, length(Big)),
    ?assertEqual({r, 65536}, lists:last(Big)),
    ?assertEqual(1, wakes(Pid)),
    %% a new shipper gets what the previous one left
    [ok = dspex_nif:repl_push(Id, {r, I}) || I <- [1, 2, 3]],
    ?assertEqual(1, wakes(Pid)),
    Pid ! stop,
    {Id, Left, Pid2} = open_link(Node),
    ?assertEqual([{r, 1}, {r, 2}, {r, 3}], Left),
    %% the shipper gone: down, nothing queued
    unlink(Pid2),
    Mon = monitor(process, Pid2),
    Pid2 ! stop,
    receive {'DOWN', Mon, _, _, _} -> ok end,
    down = dspex_nif:repl_push(Id, {r, 4}),
    {Id, [], Pid3} = open_link(Node),
    Pid3 ! stop.

%% A new shipper takes the records the previous one left with repl_link_open/1;
%% copying many of them (65536 here, 15-50 ms) runs on a dirty scheduler, not
%% on the opener's normal one: a process bound to the opener's scheduler runs
%% before the copy ends. Both bound to scheduler 1; the opener yields first (a
%% fresh time slice), lets the probe go and calls, and its heap holds the
%% records (no garbage collection after the call, which a large heap's would
%% run on a dirty scheduler and let the probe in): on a normal scheduler
%% nothing but the end of the call lets the probe run. It ran after the call
%% before the fix, some 10 us after its start since.
many_records_are_handed_over_off_the_normal_scheduler() ->
    Node = 'replnif_many@nowhere',
    {Id, [], Pid} = open_link(Node),
    Rec = {r, lists:seq(1, 20)},
    [ok = dspex_nif:repl_push(Id, Rec) || _ <- lists:seq(1, 65536)],
    unlink(Pid),
    Mon = monitor(process, Pid),
    Pid ! stop,
    receive {'DOWN', Mon, _, _, _} -> ok end,
    Self = self(),
    Probe = spawn_opt(fun() -> receive go -> Self ! {probe, erlang:monotonic_time()} end end, [{scheduler, 1}]),
    Opener = spawn_opt(fun() ->
                               erlang:yield(),
                               Probe ! go,
                               {ok, Id, Old} = dspex_nif:repl_link_open(Node),
                               Self ! {opened, erlang:monotonic_time(), length(Old), lists:last(Old)},
                               receive stop -> ok end
                       end, [{scheduler, 1}, {min_heap_size, 4000000}]),
    TProbe = receive {probe, T1} -> T1 end,
    {TOpened, N, Last} = receive {opened, T2, N0, L0} -> {T2, N0, L0} end,
    ?assertEqual({65536, Rec}, {N, Last}),
    ?assert(TProbe < TOpened),
    Opener ! stop.

fast_set() ->
    S = session(<<"replnif_set">>),
    Node = 'replnif_set@nowhere',
    {Id, _, Pid} = open_link(Node),
    Alias = alias(),
    From = {Alias, Alias},
    %% no descriptor: slow, nothing done
    slow = dspex_nif:repl_set(S, x, 1, 7, From, 0),
    {ok, #{version := 0}} = dspex_store:get(S, x),
    ok = dspex_nif:repl_publish(S, 2, 5, 7, Id),
    %% another view generation, a big value: slow
    slow = dspex_nif:repl_set(S, x, 1, 8, From, 0),
    slow = dspex_nif:repl_set(S, x, binary:copy(<<"a">>, (1 bsl 20) + 1), 7, From, 0),
    {queued, [Pid], 2, 6, {ok, 1}} = dspex_nif:repl_set(S, x, 1, 7, From, 11),
    {queued, [Pid], 2, 7, {ok, 2}} = dspex_nif:repl_set(S, x, 2, 7, From, 12),
    {ok, #{value := 2, version := 2}} = dspex_store:get(S, x),
    {2, 7} = dspex_nif:repl_announced(S),
    %% a failed set: its error, nothing queued, the announcement withdrawn
    {done, 2, {error, _}} = dspex_nif:repl_set(S, x, <<"not an integer">>, 7, From, 13),
    {done, 2, {error, {not_found, y}}} = dspex_nif:repl_set(S, y, 1, 7, From, 13),
    {2, 7} = dspex_nif:repl_announced(S),
    Post = fun(N) -> case dspex_events:enabled() of true -> N; false -> 0 end end,
    [{From, S, x, 1, 1, 2, 6, 11, P1, 1}, {From, S, x, 2, 2, 2, 7, 12, P2, 1}] = drain(Pid, Id),
    ?assertEqual({P1 =:= 0, P2 =:= 0}, {Post(1) =:= 0, Post(1) =:= 0}),
    ?assert(P1 =:= 0 orelse P2 =:= P1 + 1),
    ?assertEqual(1, wakes(Pid)),
    %% unsettled: slow, and the seq the sets reached
    {2, 7} = dspex_nif:repl_unsettle(S),
    slow = dspex_nif:repl_set(S, x, 3, 7, From, 0),
    {ok, #{version := 2}} = dspex_store:get(S, x),
    %% a full link queue: replica_slow with nothing committed
    ok = dspex_nif:repl_publish(S, 2, 7, 7, Id),
    [ok = dspex_nif:repl_push(Id, {r, I}) || I <- lists:seq(1, 65536)],
    {done, 2, {error, {retry, replica_slow}}} = dspex_nif:repl_set(S, x, 3, 7, From, 0),
    {ok, #{version := 2}} = dspex_store:get(S, x),
    65536 = length(drain(Pid, Id)),
    _ = wakes(Pid),
    %% the shipper gone: slow
    unlink(Pid),
    Mon = monitor(process, Pid),
    Pid ! stop,
    receive {'DOWN', Mon, _, _, _} -> ok end,
    slow = dspex_nif:repl_set(S, x, 3, 7, From, 0),
    unalias(Alias),
    ok = dspex_nif:repl_forget(S),
    ok = dspex_store:delete_session(S).

%% Several replica links: the record goes to every link's queue, in commit
%% order on each, with the count of links the caller waits for; the caller
%% gets every link's shipper to monitor. One full queue: replica_slow,
%% nothing committed and nothing queued on any link (all or nothing). One
%% link without its shipper: slow.
multi_link_set() ->
    S = session(<<"replnif_multi">>),
    {IdA, _, PidA} = open_link('replnif_multi_a@nowhere'),
    {IdB, _, PidB} = open_link('replnif_multi_b@nowhere'),
    {IdC, _, PidC} = open_link('replnif_multi_c@nowhere'),
    Alias = alias(),
    From = {Alias, Alias},
    %% the order of the list does not matter
    ok = dspex_nif:repl_publish(S, 5, 0, 9, [IdC, IdA, IdB]),
    {true, 5, 0, {5, 0}} = dspex_nif:repl_info(S),
    {queued, Pids, 5, 1, {ok, 1}} = dspex_nif:repl_set(S, x, 10, 9, From, 1),
    ?assertEqual(lists:sort([PidA, PidB, PidC]), lists:sort(Pids)),
    {queued, _, 5, 2, {ok, 2}} = dspex_nif:repl_set(S, x, 20, 9, From, 2),
    {5, 2} = dspex_nif:repl_announced(S),
    [?assertMatch([{From, S, x, 10, 1, 5, 1, 1, _, 3}, {From, S, x, 20, 2, 5, 2, 2, _, 3}], drain(P, Id))
     || {Id, P} <- [{IdA, PidA}, {IdB, PidB}, {IdC, PidC}]],
    %% one wake per link (the forwarders share this mailbox: counted together)
    ?assertEqual(3, lists:sum([wakes(P) || P <- [PidA, PidB, PidC]])),
    %% one link full: nothing committed, nothing queued anywhere
    [ok = dspex_nif:repl_push(IdB, {r, I}) || I <- lists:seq(1, 65536)],
    {done, 5, {error, {retry, replica_slow}}} = dspex_nif:repl_set(S, x, 30, 9, From, 3),
    {ok, #{value := 20, version := 2}} = dspex_store:get(S, x),
    {5, 2} = dspex_nif:repl_announced(S),
    {true, 5, 2, _} = dspex_nif:repl_info(S),
    [] = drain(PidA, IdA),
    [] = drain(PidC, IdC),
    65536 = length(drain(PidB, IdB)),
    _ = wakes(PidB),
    %% room again: the next set reaches all three with the next seq
    {queued, _, 5, 3, {ok, 3}} = dspex_nif:repl_set(S, x, 30, 9, From, 4),
    [?assertMatch([{From, S, x, 30, 3, 5, 3, 4, _, 3}], drain(P, Id)) || {Id, P} <- [{IdA, PidA}, {IdB, PidB}, {IdC, PidC}]],
    %% one shipper gone: slow, nothing committed
    unlink(PidC),
    Mon = monitor(process, PidC),
    PidC ! stop,
    receive {'DOWN', Mon, _, _, _} -> ok end,
    slow = dspex_nif:repl_set(S, x, 40, 9, From, 5),
    {ok, #{version := 3}} = dspex_store:get(S, x),
    unalias(Alias),
    PidA ! stop,
    PidB ! stop,
    ok = dspex_nif:repl_forget(S),
    ok = dspex_store:delete_session(S).

%% Async: answered once committed and queued ({done, Epoch, {ok, Version}}),
%% the record's count 0 (nobody waits), nothing announced for reads; a full
%% queue is `wait' (the caller waits for room) with nothing committed.
async_set() ->
    S = session(<<"replnif_async">>),
    {IdA, _, PidA} = open_link('replnif_async_a@nowhere'),
    {IdB, _, PidB} = open_link('replnif_async_b@nowhere'),
    Alias = alias(),
    From = {Alias, Alias},
    ok = dspex_nif:repl_publish(S, 2, 4, 3, [IdA, IdB], async),
    {true, 2, 4, {0, 0}} = dspex_nif:repl_info(S),
    {done, 2, {ok, 1}} = dspex_nif:repl_set(S, x, 1, 3, From, 1),
    {done, 2, {ok, 2}} = dspex_nif:repl_set(S, x, 2, 3, From, 2),
    {0, 0} = dspex_nif:repl_announced(S),
    {true, 2, 6, _} = dspex_nif:repl_info(S),
    [?assertMatch([{From, S, x, 1, 1, 2, 5, 1, _, 0}, {From, S, x, 2, 2, 2, 6, 2, _, 0}], drain(P, Id))
     || {Id, P} <- [{IdA, PidA}, {IdB, PidB}]],
    [ok = dspex_nif:repl_push(IdA, {r, I}) || I <- lists:seq(1, 65536)],
    {wait, 2} = dspex_nif:repl_set(S, x, 3, 3, From, 3),
    {ok, #{version := 2}} = dspex_store:get(S, x),
    [] = drain(PidB, IdB),
    65536 = length(drain(PidA, IdA)),
    %% published sync again: announces again
    ok = dspex_nif:repl_publish(S, 2, 6, 3, [IdA, IdB], sync),
    {2, 6} = dspex_nif:repl_announced(S),
    unalias(Alias),
    PidA ! stop,
    PidB ! stop,
    ok = dspex_nif:repl_forget(S),
    ok = dspex_store:delete_session(S).

bad_arguments() ->
    Bad = fun(F) -> ?assertError(badarg, F()) end,
    Bad(fun() -> dspex_nif:repl_link_open(<<"n">>) end),
    Bad(fun() -> dspex_nif:repl_link_id(1) end),
    Bad(fun() -> dspex_nif:repl_drain(-1) end),
    Bad(fun() -> dspex_nif:repl_drain(1 bsl 20) end),
    Bad(fun() -> dspex_nif:repl_push(x, {r}) end),
    Bad(fun() -> dspex_nif:repl_publish(s, 1, 1, 1, 0) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, -1, 1, 1, 0) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, 1 bsl 20) end),
    %% links: a non-empty list of at most 16 distinct open links; the mode sync or async
    {L0, _, P0} = open_link('replnif_bad@nowhere'),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, []) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, [L0, L0]) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, [L0, 1 bsl 20]) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, [L0 | L0]) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, lists:duplicate(17, L0)) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, L0, maybe) end),
    Bad(fun() -> dspex_nif:repl_publish(<<"s">>, 1, 1, 1, [L0], "sync") end),
    none = dspex_nif:repl_info(<<"s">>),
    P0 ! stop,
    Bad(fun() -> dspex_nif:repl_unsettle(s) end),
    Bad(fun() -> dspex_nif:repl_forget(s) end),
    Bad(fun() -> dspex_nif:repl_info(s) end),
    Bad(fun() -> dspex_nif:repl_announced(s) end),
    Ref = make_ref(),
    Bad(fun() -> dspex_nif:repl_set(s, x, 1, 1, {Ref, Ref}, 0) end),
    Bad(fun() -> dspex_nif:repl_set(<<"s">>, x, 1, -1, {Ref, Ref}, 0) end),
    Bad(fun() -> dspex_nif:repl_set(<<"s">>, x, 1, 1, {Ref, not_a_ref}, 0) end),
    Bad(fun() -> dspex_nif:repl_set(<<"s">>, x, 1, 1, {Ref, Ref}, t0) end),
    %% a bad key is the writer's to refuse
    slow = dspex_nif:repl_set(<<"s">>, {not_a_key}, 1, 1, {Ref, Ref}, 0).
