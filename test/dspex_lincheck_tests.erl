%% @doc EUnit and PropEr tests of `dspex_lincheck': small histories whose
%% answer is known by hand, generated histories that respect a
%% linearization (always `ok'), the same with one read corrupted (always a
%% violation), and the work done on a long history counted in explored
%% configurations (not in time).
%%
%% DSPEX_PROP_LINCHECK_N: number of generated histories per property (default 300).
-module(dspex_lincheck_tests).

-include_lib("eunit/include/eunit.hrl").

%% Debian's erlang-proper ships without proper.hrl: the few macros used
-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(BIND(X, Gen, In), proper_types:bind(Gen, fun(X) -> In end, false)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).
-import(proper_types, [choose/2, vector/2, frequency/1, oneof/1]).

-export([prop_linearizable_histories_pass/0, prop_corrupted_read_is_found/0, prop_agrees_with_brute_force/0]).
-export([build/2, long_steps/2, corrupt_stale/2]).

%% operations: a read of V, a write of V, a write whose outcome is unknown
r(P, V, I, R) -> {P, read, undefined, {ok, V}, I, R}.
w(P, V, I, R) -> {P, write, V, ok, I, R}.
wu(P, V, I) -> {P, write, V, unknown, I, infinity}.
rfail(P, I, R) -> {P, read, undefined, fail, I, R}.

check(Ops) -> dspex_lincheck:check(0, Ops).

%%% known answers ------------------------------------------------------------------

empty_and_initial_reads_test() ->
    ?assertEqual(ok, check([])),
    ?assertEqual(ok, check([r(a, 0, 0, 10), r(b, 0, 5, 20)])).

sequential_write_then_read_test() ->
    ?assertEqual(ok, check([w(a, 1, 0, 10), r(b, 1, 20, 30), w(a, 2, 40, 50), r(b, 2, 60, 70)])).

stale_read_after_a_completed_write_is_a_violation_test() ->
    {violation, Info} = check([w(a, 1, 0, 10), w(a, 2, 20, 30), r(b, 1, 40, 50)]),
    ?assertMatch(#{reason := not_linearizable, value := 2}, Info),
    %% the read that cannot be placed is shown with its times and value
    ?assertMatch([#{proc := b, op := read, value := 1, invoke := 40, return := 50}], maps:get(blocking, Info)),
    ?assertMatch([#{op := write, value := 1, invoke := 0, return := 10}], maps:get(writes_of_values_read, Info)),
    %% reading the initial value once a write completed is stale too
    ?assertMatch({violation, _}, check([w(a, 1, 0, 10), r(b, 0, 20, 30)])).

two_readers_seeing_contradicting_orders_is_a_violation_test() ->
    Writes = [w(a, 1, 0, 100), w(b, 2, 0, 100)],
    ?assertMatch({violation, #{reason := not_linearizable}},
                 check(Writes ++ [r(c, 1, 10, 20), r(c, 2, 30, 40), r(d, 2, 10, 20), r(d, 1, 30, 40)])),
    %% both readers seeing the same order is fine
    ?assertEqual(ok, check(Writes ++ [r(c, 1, 10, 20), r(c, 2, 30, 40), r(d, 1, 10, 20), r(d, 2, 30, 40)])).

overlapping_operations_may_take_effect_in_any_order_test() ->
    %% reads overlapping a write see the old or the new value
    ?assertEqual(ok, check([w(a, 1, 0, 100), r(b, 0, 10, 20), r(c, 1, 10, 20)])),
    ?assertEqual(ok, check([w(a, 1, 0, 100), r(b, 1, 10, 20), r(c, 0, 10, 20)])),
    %% two overlapping writes, readers after both agree on the last one
    ?assertEqual(ok, check([w(a, 1, 0, 100), w(b, 2, 50, 150), r(c, 1, 200, 210), r(d, 1, 220, 230)])),
    ?assertEqual(ok, check([w(a, 1, 0, 100), w(b, 2, 50, 150), r(c, 2, 200, 210)])),
    %% but once a read saw the new value, a later read cannot see the old one
    ?assertMatch({violation, _}, check([w(a, 1, 0, 100), r(b, 1, 10, 20), r(c, 0, 30, 40)])),
    %% equal times count as overlapping
    ?assertEqual(ok, check([w(a, 1, 0, 10), r(b, 0, 10, 20)])).

unknown_writes_may_or_may_not_take_effect_test() ->
    %% took effect (a read saw it), or did not (no read did)
    ?assertEqual(ok, check([wu(a, 5, 0), r(b, 5, 100, 110)])),
    ?assertEqual(ok, check([wu(a, 5, 0), r(b, 0, 100, 110)])),
    %% it may take effect long after the error came back
    ?assertEqual(ok, check([{a, write, 2, unknown, 0, 10}, w(b, 1, 20, 30), r(c, 1, 35, 38), r(c, 2, 40, 50)])),
    %% but only once: seen, then the value before it again, is a violation
    ?assertMatch({violation, _}, check([wu(a, 5, 0), r(b, 5, 100, 110), r(b, 0, 120, 130)])),
    ?assertMatch({violation, _},
                 check([w(a, 1, 0, 10), wu(b, 2, 5), r(c, 1, 20, 30), r(c, 2, 40, 50), r(c, 1, 60, 70)])),
    %% never before its invocation
    ?assertMatch({violation, _}, check([r(b, 5, 0, 10), wu(a, 5, 20)])),
    %% a value written twice, once by an unknown write: the unknown one may
    %% be the one a late read sees
    ?assertEqual(ok, check([w(a, 1, 0, 10), wu(b, 1, 5), w(c, 2, 20, 30), r(d, 1, 40, 50)])),
    ?assertMatch({violation, _}, check([w(a, 1, 0, 10), w(b, 1, 5, 8), w(c, 2, 20, 30), r(d, 1, 40, 50)])).

failed_reads_are_dropped_test() ->
    ?assertEqual(ok, check([w(a, 1, 0, 10), rfail(b, 20, 30), r(b, 1, 40, 50)])).

a_value_no_write_holds_is_reported_before_any_search_test() ->
    {violation, Info} = check([w(a, 1, 0, 10), r(b, 7, 20, 30)]),
    ?assertMatch(#{reason := value_never_written, reads := [#{proc := b, value := 7, invoke := 20}]}, Info).

malformed_operations_are_refused_test() ->
    ?assertError({badarg, {bad_op, _}}, check([{a, read, undefined, {ok, 1}, 10, 5}])),
    ?assertError({badarg, {bad_op, _}}, check([{a, cas, 1, ok, 0, 1}])),
    ?assertError({badarg, {bad_op, _}}, check([{a, write, 1, ok, 0, infinity}])),
    ?assertError({badarg, max_states}, dspex_lincheck:check(0, [], #{max_states => 0})).

%% Twelve concurrent writes, then a read of a value none can leave: every
%% subset of them is explored (with memoization: 2^12 sets x values) before
%% the answer; a small budget gives up instead, saying how far it got.
the_work_is_bounded_test() ->
    Ops = [w(P, P, 0, 100) || P <- lists:seq(1, 12)] ++ [r(x, 0, 200, 210)],
    ?assertMatch({gave_up, #{states := 1000, max_states := 1000}}, dspex_lincheck:check(0, Ops, #{max_states => 1000})),
    Ops2 = [w(P, P, 0, 100) || P <- lists:seq(1, 12)] ++ [r(x, 3, 200, 210), r(y, 4, 220, 230)],
    ?assertMatch({violation, #{reason := not_linearizable}}, dspex_lincheck:check(0, Ops2)).

summary_counts_the_history_test() ->
    S = dspex_lincheck:summary([w(a, 1, 0, 100), r(b, 1, 10, 20), r(b, 0, 30, 40), rfail(c, 0, 5),
                                wu(d, 9, 50), r(a, 1, 200, 210)]),
    ?assertMatch(#{ops := 6, reads_ok := 3, reads_failed := 1, writes_ok := 1, writes_unknown := 1, procs := 4,
                   reads_of_writer := #{a := 1}}, S),
    %% a-w1 with b-r, b-r, c-fail, d-wu; b-r(30) with d? no (d starts at 50);
    %% d-wu (never returns) with a's last read
    ?assertEqual(5, maps:get(overlaps, S)).

%% A long history: 10 processes, 4000 operations with overlaps, checked
%% with a budget of twice as many configurations as operations (a
%% configuration costs about 5 us here: 18 ms for this history, 47 ms
%% for the stale read, said for scale only).
long_history_work_is_linear_in_its_length_test() ->
    Ops = build(long_steps(4000, 10), 0),
    ?assertEqual(4000, length(Ops)),
    ?assert(maps:get(overlaps, dspex_lincheck:summary(Ops)) > 4000),
    ?assertEqual(ok, dspex_lincheck:check(0, Ops, #{max_states => 2 * length(Ops)})),
    %% a stale read near the end is found within three times as many (the
    %% search must first rule out every order of the writes before it)
    ?assertMatch({violation, #{reason := not_linearizable, linearized := L}} when L > 3000,
                 dspex_lincheck:check(0, corrupt_stale(Ops, 3500), #{max_states => 3 * length(Ops)})).

long_steps(N, Procs) ->
    rand:seed(exsss, {1, 2, 3}),
    [{rand:uniform(Procs), case rand:uniform(10) of 1 -> write_unknown; K when K =< 4 -> write; _ -> read end,
      rand:uniform(400) - 1, rand:uniform(400) - 1} || _ <- lists:seq(1, N)].

%%% generated histories ------------------------------------------------------------

numtests() ->
    case os:getenv("DSPEX_PROP_LINCHECK_N") of
        false -> 300;
        S -> list_to_integer(S)
    end.

linearizable_histories_pass_test_() ->
    {timeout, 120, fun() ->
        ?assertEqual(true, proper:quickcheck(prop_linearizable_histories_pass(),
                                             [{numtests, numtests()}, {to_file, user}]))
    end}.

corrupted_read_is_found_test_() ->
    {timeout, 120, fun() ->
        ?assertEqual(true, proper:quickcheck(prop_corrupted_read_is_found(),
                                             [{numtests, numtests()}, {to_file, user}]))
    end}.

agrees_with_brute_force_test_() ->
    {timeout, 120, fun() ->
        ?assertEqual(true, proper:quickcheck(prop_agrees_with_brute_force(),
                                             [{numtests, 3 * numtests()}, {to_file, user}]))
    end}.

%% Up to 7 operations with random times, values from a small set (written
%% twice, equal to the initial value), unknown writes and failed reads: the
%% answer (ok or not) is the one found by trying every order of every
%% subset of the unknown writes.
-spec prop_agrees_with_brute_force() -> proper:test().
prop_agrees_with_brute_force() ->
    Op = ?BIND({P, I, D}, {choose(1, 4), choose(0, 60), choose(0, 40)},
               frequency([{4, {P, read, undefined, {ok, choose(0, 3)}, I, I + D}},
                          {1, {P, read, undefined, fail, I, I + D}},
                          {4, {P, write, choose(0, 3), ok, I, I + D}},
                          {2, {P, write, choose(0, 3), unknown, I, oneof([I + D, infinity])}}])),
    ?FORALL(Ops, ?BIND(N, choose(0, 7), vector(N, Op)),
            begin
                Res = dspex_lincheck:check(0, Ops),
                Brute = brute(0, Ops),
                ?WHENFAIL(io:format("~p~nchecker ~p~nbrute force ~p~n", [Ops, Res, Brute]),
                          proper:collect(Brute, (Res =:= ok) =:= Brute andalso
                                                    (Brute orelse element(1, Res) =:= violation)))
            end).

%% Is there an order of the operations (failed reads left out, each unknown
%% write in or out, with no return) that respects real time and in which
%% every read returns the last value written?
brute(Init, Ops) ->
    Known = [O || {_, F, _, R, _, _} = O <- Ops, R =/= fail, not (F =:= write andalso R =:= unknown)],
    Unknown = [{P, write, V, unknown, I, infinity} || {P, write, V, unknown, I, _} <- Ops],
    lists:any(fun(Sub) -> lists:any(fun(Perm) -> legal(Init, Perm) end, perms(Known ++ Sub)) end, subsets(Unknown)).

subsets([]) -> [[]];
subsets([X | Xs]) -> [S1 || S <- subsets(Xs), S1 <- [S, [X | S]]].

perms([]) -> [[]];
perms(L) -> [[X | P] || X <- L, P <- perms(L -- [X])].

legal(Init, Perm) ->
    InOrder = lists:all(fun({K, A}) -> lists:all(fun(B) -> not before(B, A) end, lists:nthtail(K, Perm)) end,
                        lists:zip(lists:seq(1, length(Perm)), Perm)),
    InOrder andalso register_ok(Init, Perm).

%% B returned before A was invoked
before({_, _, _, _, _, infinity}, _) -> false;
before({_, _, _, _, _, RB}, {_, _, _, _, IA, _}) -> RB < IA.

register_ok(_, []) -> true;
register_ok(S, [{_, read, _, {ok, S}, _, _} | T]) -> register_ok(S, T);
register_ok(_, [{_, read, _, _, _, _} | _]) -> false;
register_ok(_, [{_, write, V, _, _, _} | T]) -> register_ok(V, T).

%% 8 to 60 steps in linearization order: {Proc, Kind, Before, After}, the operation
%% taking effect at 100 x its position, invoked up to `Before' earlier and
%% returning up to `After' later (so each overlaps up to a few others).
steps() ->
    ?BIND({Procs, N}, {choose(1, 8), choose(8, 60)},
         vector(N, {choose(1, Procs),
               frequency([{5, read}, {4, write}, {1, write_unknown}, {1, write_lost}, {1, read_fail}]),
               choose(0, 350), choose(0, 350)})).

-spec prop_linearizable_histories_pass() -> proper:test().
prop_linearizable_histories_pass() ->
    ?FORALL(Steps, steps(),
            begin
                Ops = build(Steps, 0),
                Res = dspex_lincheck:check(0, shuffle(Ops, length(Steps))),
                ?WHENFAIL(io:format("~p~n~p~n", [Ops, Res]), Res =:= ok)
            end).

%% One read corrupted, either to a value no write holds or to the value of
%% a write that a later write overwrote before the read was invoked.
-spec prop_corrupted_read_is_found() -> proper:test().
prop_corrupted_read_is_found() ->
    ?FORALL({Steps, Pick, Kind}, {steps(), choose(0, 1000), oneof([never_written, stale])},
            begin
                Ops = build(Steps, 0),
                case corrupt(Kind, Ops, Pick) of
                    none -> proper:collect(nothing_to_corrupt, true);
                    Bad ->
                        Res = dspex_lincheck:check(0, Bad),
                        Expect = case Kind of never_written -> value_never_written; stale -> not_linearizable end,
                        ?WHENFAIL(io:format("~p~n~p~n", [Bad, Res]),
                                  proper:collect(Kind, case Res of
                                                    {violation, #{reason := Expect}} -> true;
                                                    _ -> false
                                                end))
                end
            end).

%% A history that a sequential register gives when step K takes effect at
%% 100 (K + 1): each process's operations one after the other, each within
%% its invocation and return.
build(Steps, Init) ->
    Indexed = lists:zip(lists:seq(1, length(Steps)), Steps),
    %% for each step, when the next step of the same process takes effect
    NextOf = next_points(lists:reverse(Indexed), #{}, #{}),
    {Ops, _, _} =
        lists:foldl(
          fun({K, {P, Kind, Before, After}}, {Acc, State, LastRet}) ->
                  T = 100 * K,
                  Inv = max(maps:get(P, LastRet, -1000000) + 1, T - Before),
                  Ret = case maps:find(K, NextOf) of
                            {ok, Next} -> min(T + After, Next - 1);
                            error -> T + After
                        end,
                  Last = LastRet#{P => Ret},
                  case Kind of
                      read -> {[{P, read, undefined, {ok, State}, Inv, Ret} | Acc], State, Last};
                      read_fail -> {[{P, read, undefined, fail, Inv, Ret} | Acc], State, Last};
                      write -> {[{P, write, K, ok, Inv, Ret} | Acc], K, Last};
                      write_unknown -> {[{P, write, K, unknown, Inv, Ret} | Acc], K, Last};
                      write_lost -> {[{P, write, -K, unknown, Inv, Ret} | Acc], State, Last}
                  end
          end, {[], Init, #{}}, Indexed),
    lists:reverse(Ops).

next_points([], _Seen, Acc) -> Acc;
next_points([{K, {P, _, _, _}} | Rest], Seen, Acc) ->
    Acc2 = case maps:find(P, Seen) of
               {ok, Next} -> Acc#{K => 100 * Next};
               error -> Acc
           end,
    next_points(Rest, Seen#{P => K}, Acc2).

shuffle(L, Seed) ->
    rand:seed(exsss, {Seed, 7, 11}),
    [X || {_, X} <- lists:sort([{rand:uniform(), X} || X <- L])].

corrupt(_, [], _) -> none;
corrupt(never_written, Ops, Pick) ->
    case [I || {I, {_, read, _, {ok, _}, _, _}} <- lists:zip(lists:seq(1, length(Ops)), Ops)] of
        [] -> none;
        Is ->
            I = lists:nth(1 + Pick rem length(Is), Is),
            {P, read, undefined, _, Inv, Ret} = lists:nth(I, Ops),
            replace(I, {P, read, undefined, {ok, never_written}, Inv, Ret}, Ops)
    end;
corrupt(stale, Ops, Pick) ->
    case stale_targets(Ops) of
        [] -> none;
        Ts ->
            {I, V} = lists:nth(1 + Pick rem length(Ts), Ts),
            {P, read, undefined, _, Inv, Ret} = lists:nth(I, Ops),
            replace(I, {P, read, undefined, {ok, V}, Inv, Ret}, Ops)
    end.

%% {Index of a read, a value it cannot return}: the value of an
%% acknowledged write W1 followed (W1 returned before W2 was invoked) by an
%% acknowledged write W2 that returned before the read was invoked.
stale_targets(Ops) -> stale_targets(Ops, 0).

%% (only the reads from index From on; the first W2 candidates are those
%% returned before the read: the latest invoked of them bounds W1's return)
stale_targets(Ops, From) ->
    Indexed = lists:zip(lists:seq(1, length(Ops)), Ops),
    Writes = [{V, I, R} || {_, {_, write, V, ok, I, R}} <- Indexed],
    [{K, V1} || {K, {_, read, _, {ok, Seen}, RInv, _}} <- Indexed, K >= From,
                M <- [lists:max([-1 | [I2 || {_, I2, R2} <- Writes, R2 < RInv]])],
                {V1, _, R1} <- Writes, V1 =/= Seen, R1 < M].

corrupt_stale(Ops, Near) ->
    [{K, V} | _] = stale_targets(Ops, Near),
    {P, read, undefined, _, Inv, Ret} = lists:nth(K, Ops),
    replace(K, {P, read, undefined, {ok, V}, Inv, Ret}, Ops).

replace(I, X, L) ->
    {A, [_ | B]} = lists:split(I - 1, L),
    A ++ [X | B].
