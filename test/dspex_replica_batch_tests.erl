%% EUnit tests of dspex_nif:replica_apply_batch/3: a replica applies a batch of
%% its owner's sets of one session in one NIF call, with the rules of one
%% change (dspex_cluster_replica, issue #21).
-module(dspex_replica_batch_tests).
-include_lib("eunit/include/eunit.hrl").

new(Vars) ->
    S = iolist_to_binary(["rb_", integer_to_list(erlang:unique_integer([positive]))]),
    {ok, _} = dspex_store:create_session(S, #{}),
    [{ok, _} = dspex_store:register(S, V, integer, 0) || V <- Vars],
    S.

val(S, K) -> {ok, V} = dspex_store:get_value(S, K), V.
ver(S, K) -> {ok, #{version := V}} = dspex_store:get(S, K), V.

%% {Epoch, Seq, Key, Value, Opts, Version}: the owner's set reached Version
set(E, Seq, K, V, Ver) -> {E, Seq, K, V, #{expected_version => Ver - 1}, Ver}.

rules_in_order_test() ->
    S = new([x, y]),
    Recs = [set(2, 4, x, 99, 1),    % a repeat: ignored
            set(2, 5, x, 10, 1),
            set(2, 6, y, 20, 1),
            set(1, 7, x, 98, 2),    % an older epoch: refused
            set(2, 9, x, 97, 2)],   % a gap
    ?assertEqual({{2, 6, 2}, [ok, ok, ok, {error, {stale_epoch, 2}}, {error, need_full}]},
                 dspex_nif:replica_apply_batch(S, {2, 4, 1}, Recs)),
    ?assertEqual({10, 20}, {val(S, x), val(S, y)}),
    ?assertEqual({1, 1}, {ver(S, x), ver(S, y)}).

fenced_replica_refuses_the_old_epoch_test() ->
    S = new([x]),
    ?assertEqual({{2, 3, 5}, [{error, {stale_epoch, 5}}, {error, {stale_epoch, 5}}]},
                 dspex_nif:replica_apply_batch(S, {2, 3, 5}, [set(2, 4, x, 1, 1), set(4, 1, x, 2, 2)])),
    ?assertEqual(0, val(S, x)).

a_new_epoch_is_a_gap_test() ->
    S = new([x]),
    ?assertEqual({{2, 3, 2}, [{error, need_full}]},
                 dspex_nif:replica_apply_batch(S, {2, 3, 2}, [set(3, 1, x, 1, 1)])).

a_replay_missing_the_owners_version_stops_the_batch_test() ->
    S = new([x, y]),
    {ok, 1} = dspex_store:set(S, y, 5),   % this copy diverged: y is at version 1
    Recs = [set(1, 1, x, 1, 1), set(1, 2, y, 2, 1), set(1, 3, x, 3, 2)],
    ?assertEqual({{1, 1, 1}, [ok, {error, need_full}, {error, need_full}]},
                 dspex_nif:replica_apply_batch(S, {1, 0, 1}, Recs)),
    ?assertEqual({1, 5}, {val(S, x), val(S, y)}).

an_invalid_value_or_unknown_variable_is_need_full_test() ->
    S = new([x]),
    ?assertEqual({{1, 0, 1}, [{error, need_full}]},
                 dspex_nif:replica_apply_batch(S, {1, 0, 1}, [set(1, 1, x, <<"not an integer">>, 1)])),
    ?assertEqual({{1, 0, 1}, [{error, need_full}]},
                 dspex_nif:replica_apply_batch(S, {1, 0, 1}, [set(1, 1, nope, 1, 1)])),
    ?assertEqual(0, ver(S, x)).

unknown_session_is_need_full_test() ->
    ?assertEqual({{1, 0, 1}, [{error, need_full}, {error, need_full}]},
                 dspex_nif:replica_apply_batch(<<"rb_absent">>, {1, 0, 1}, [set(1, 1, x, 1, 1), set(1, 2, x, 2, 2)])).

options_are_those_of_set_test() ->
    S = new([x]),
    Rec = {1, 1, <<"x">>, 7, #{expected_version => 0, metadata => #{m => 1}, changed_by => <<"owner">>}, 1},
    ?assertMatch({{1, 1, 1}, [ok]}, dspex_nif:replica_apply_batch(S, {1, 0, 1}, [Rec])),
    {ok, #{value := 7, version := 1, metadata := Meta}} = dspex_store:get(S, x),
    ?assertMatch(#{m := 1}, Meta).

empty_batch_test() ->
    S = new([]),
    ?assertEqual({{3, 7, 4}, []}, dspex_nif:replica_apply_batch(S, {3, 7, 4}, [])).

bad_input_is_badarg_and_changes_nothing_test() ->
    S = new([x]),
    Good = set(1, 1, x, 1, 1),
    [?assertError(badarg, dspex_nif:replica_apply_batch(S, St, L))
     || {St, L} <- [{{1, 0, 1}, [Good, {1, 2, x, 2}]},             % a record of the wrong shape
                    {{1, 0, 1}, [Good, {1, 2, x, 2, not_a_map, 2}]},
                    {{1, 0, 1}, [Good, {-1, 2, x, 2, #{}, 2}]},
                    {{1, 0, 1}, [Good, {1, 2, x, 2, #{}, undefined}]},
                    {{1, 0, 1}, [Good | improper]},
                    {{1, 0}, [Good]},
                    {{1, 0, 1}, not_a_list}]],
    ?assertError(badarg, dspex_nif:replica_apply_batch(not_a_session, {1, 0, 1}, [Good])),
    ?assertEqual(0, ver(S, x)).

large_batches_run_on_a_dirty_scheduler_test() ->
    S = new([x]),
    N = 500,
    Recs = [set(1, I, x, I, I) || I <- lists:seq(1, N)],
    #{replica_apply_batch := D0} = dspex_nif:sched_stats(),
    {{1, Last, 1}, Res} = dspex_nif:replica_apply_batch(S, {1, 0, 1}, Recs),
    ?assertEqual(N, Last),
    #{replica_apply_batch := D1} = dspex_nif:sched_stats(),
    ?assertEqual(lists:duplicate(N, ok), Res),
    ?assertEqual(1, D1 - D0),
    ?assertEqual({N, N}, {val(S, x), ver(S, x)}),
    %% a small one stays on the normal scheduler
    ?assertEqual({{1, N + 1, 1}, [ok]}, dspex_nif:replica_apply_batch(S, {1, N, 1}, [set(1, N + 1, x, 0, N + 1)])),
    #{replica_apply_batch := D2} = dspex_nif:sched_stats(),
    ?assertEqual(D1, D2).

watchers_get_each_replayed_change_in_order_test() ->
    S = new([x]),
    Ref = dspex_store:watch(S, [x], self()),
    {{1, 3, 1}, [ok, ok, ok]} = dspex_nif:replica_apply_batch(S, {1, 0, 1}, [set(1, I, x, I * 10, I) || I <- [1, 2, 3]]),
    Got = [receive {dspex_variable, Ref, S, _, Old, New, _} -> {Old, New} after 5000 -> timeout end || _ <- [1, 2, 3]],
    ?assertEqual([{0, 10}, {10, 20}, {20, 30}], Got),
    ok = dspex_store:unwatch(Ref).
