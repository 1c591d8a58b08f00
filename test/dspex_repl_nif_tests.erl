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
     [fun descriptors/0, fun link_queue/0, fun fast_set/0, fun bad_arguments/0]}.

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
    {queued, Pid, 2, 6, {ok, 1}} = dspex_nif:repl_set(S, x, 1, 7, From, 11),
    {queued, Pid, 2, 7, {ok, 2}} = dspex_nif:repl_set(S, x, 2, 7, From, 12),
    {ok, #{value := 2, version := 2}} = dspex_store:get(S, x),
    {2, 7} = dspex_nif:repl_announced(S),
    %% a failed set: its error, nothing queued, the announcement withdrawn
    {done, 2, {error, _}} = dspex_nif:repl_set(S, x, <<"not an integer">>, 7, From, 13),
    {done, 2, {error, {not_found, y}}} = dspex_nif:repl_set(S, y, 1, 7, From, 13),
    {2, 7} = dspex_nif:repl_announced(S),
    Post = fun(N) -> case dspex_events:enabled() of true -> N; false -> 0 end end,
    [{From, S, x, 1, 1, 2, 6, 11, P1}, {From, S, x, 2, 2, 2, 7, 12, P2}] = drain(Pid, Id),
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
