%% Common Test: the store under concurrency, and the application around it.
-module(dspex_store_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([cas_increments_are_exact/1, watch_order_under_concurrent_writers/1,
         readers_never_see_torn_or_freed_state/1, atomic_batches_never_interleave/1,
         concurrent_register_same_name_one_wins/1, application_restart_keeps_store/1,
         delete_session_while_in_use/1]).

all() ->
    [cas_increments_are_exact, watch_order_under_concurrent_writers,
     readers_never_see_torn_or_freed_state, atomic_batches_never_interleave,
     concurrent_register_same_name_one_wins, application_restart_keeps_store,
     delete_session_while_in_use].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    Config.

end_per_suite(_Config) ->
    application:stop(dspex_bridge).

sid() -> iolist_to_binary(["ct_", integer_to_list(erlang:unique_integer([positive]))]).

%% Runs F(I) in N processes and waits for all of them (by monitor, no sleeps).
pmap(N, F) ->
    Parent = self(),
    Refs = [begin
                {Pid, Ref} = spawn_monitor(fun() -> Parent ! {self(), F(I)} end),
                {Pid, Ref}
            end || I <- lists:seq(1, N)],
    [receive {Pid, R} -> receive {'DOWN', Ref, process, Pid, normal} -> R end;
             {'DOWN', Ref, process, Pid, Why} -> ct:fail({worker_died, Why})
     end || {Pid, Ref} <- Refs].

cas_increment(S, N) ->
    {ok, #{value := V, version := Ver}} = dspex_store:get(S, counter),
    case dspex_store:set(S, counter, V + 1, #{expected_version => Ver}) of
        {ok, _} -> N + 1;
        {error, {version_mismatch, _}} -> cas_increment(S, N)
    end.

%% 16 processes x 1000 compare-and-set increments with retry end at exactly 16000.
cas_increments_are_exact(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, counter, integer, 0),
    Done = pmap(16, fun(_) -> lists:foldl(fun(_, Acc) -> cas_increment(S, Acc) end, 0, lists:seq(1, 1000)) end),
    ?assertEqual(lists:duplicate(16, 1000), Done),
    {ok, #{value := 16000, version := 16000}} = dspex_store:get(S, counter).

%% Four writers race on one variable; the watcher sees every version once, in order.
watch_order_under_concurrent_writers(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    Ref = dspex_store:watch(S, [x], self()),
    _ = pmap(4, fun(W) -> [{ok, _} = dspex_store:set(S, x, W * 100000 + I) || I <- lists:seq(1, 500)] end),
    Seen = collect(Ref, 2000),
    ?assertEqual(lists:seq(1, 2000), [V || {V, _, _} <- Seen]),
    %% each message's Old is the previous message's New
    News = [New || {_, _, New} <- Seen],
    Olds = [Old || {_, Old, _} <- Seen],
    ?assertEqual([0 | lists:droplast(News)], Olds),
    ok = dspex_store:unwatch(Ref).

collect(_Ref, 0) -> [];
collect(Ref, N) ->
    receive {dspex_variable, Ref, _, <<"x">>, Old, New, #{version := V}} -> [{V, Old, New} | collect(Ref, N - 1)]
    after 5000 -> ct:fail({missing_messages, N})
    end.

%% Readers run while writers replace values and delete / re-register variables:
%% every read is a consistent snapshot (value equals 3 * version).
readers_never_see_torn_or_freed_state(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    Names = [list_to_binary("v" ++ integer_to_list(I)) || I <- lists:seq(1, 20)],
    [{ok, _} = dspex_store:register(S, N, integer, 0) || N <- Names],
    Stop = atomics:new(1, []),
    Readers = [spawn_monitor(fun() -> read_loop(S, Names, Stop, 0) end) || _ <- [1, 2]],
    _ = pmap(2, fun(_) ->
                    [begin
                         N = lists:nth(rand:uniform(20), Names),
                         case rand:uniform(10) of
                             1 -> _ = dspex_store:delete(S, N),
                                  _ = dspex_store:register(S, N, integer, 0);
                             _ -> set_consistent(S, N)
                         end
                     end || _ <- lists:seq(1, 20000)]
                end),
    atomics:put(Stop, 1, 1),
    Reads = [receive {'DOWN', Ref, process, Pid, {reads, R}} -> R end || {Pid, Ref} <- Readers],
    ct:pal("reads per reader: ~p", [Reads]),
    ?assert(lists:all(fun(R) -> R > 0 end, Reads)).

set_consistent(S, N) ->
    case dspex_store:get(S, N) of
        {ok, #{version := V}} -> _ = dspex_store:set(S, N, 3 * (V + 1), #{expected_version => V});
        {error, _} -> ok
    end.

read_loop(S, Names, Stop, Count) ->
    case atomics:get(Stop, 1) of
        1 -> exit({reads, Count});
        0 ->
            N = lists:nth(rand:uniform(length(Names)), Names),
            case dspex_store:get(S, N) of
                {ok, #{value := Val, version := Ver}} when Val =:= 3 * Ver; Ver =:= 0 -> ok;
                {ok, Bad} -> exit({torn, Bad});
                {error, {not_found, _}} -> ok
            end,
            read_loop(S, Names, Stop, Count + 1)
    end.

%% Atomic batches that each move value between two variables keep the sum.
atomic_batches_never_interleave(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, integer, 1000),
    {ok, _} = dspex_store:register(S, b, integer, 1000),
    Moves = pmap(8, fun(_) -> transfer_loop(S, 300, 0) end),
    {ok, A} = dspex_store:get_value(S, a),
    {ok, B} = dspex_store:get_value(S, b),
    ?assertEqual(2000, A + B),
    {ok, #{version := VA}} = dspex_store:get(S, a),
    ?assertEqual(lists:sum(Moves), VA).

transfer_loop(_S, 0, Done) -> Done;
transfer_loop(S, N, Done) ->
    {ok, #{found := #{a := #{value := A, version := VA}, b := #{value := B, version := VB}}}} =
        dspex_store:get_many(S, [a, b]),
    Updates = [{a, A - 1, #{expected_version => VA}}, {b, B + 1, #{expected_version => VB}}],
    case dspex_store:set_many(S, Updates, #{atomic => true}) of
        {ok, _} -> transfer_loop(S, N - 1, Done + 1);
        {error, {batch_failed, _}} -> transfer_loop(S, N, Done)
    end.

concurrent_register_same_name_one_wins(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    Results = pmap(16, fun(I) -> dspex_store:register(S, same, integer, I) end),
    ?assertEqual(1, length([ok || {ok, _} <- Results])),
    ?assertEqual(15, length([e || {error, {already_exists, <<"same">>}} <- Results])).

%% The store is native state: restarting the application does not lose it.
application_restart_keeps_store(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 7),
    ok = application:stop(dspex_bridge),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    {ok, 7} = dspex_store:get_value(S, x),
    ?assert(is_pid(whereis(dspex_session_sweeper))).

%% Deleting a session while other processes use it never crashes them: each
%% keeps writing until it sees session_not_found.
delete_session_while_in_use(_Config) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    Keys = [list_to_binary([$v, $0 + I]) || I <- lists:seq(0, 9)],
    [{ok, _} = dspex_store:register(S, K, integer, 0) || K <- Keys],
    Parent = self(),
    Users = [spawn_monitor(fun() -> use_until_gone(S, Keys, Parent, 0) end) || _ <- [1, 2, 3, 4]],
    [receive {running, Pid} -> ok end || {Pid, _} <- Users],
    ok = dspex_store:delete_session(S),
    Exits = [receive {'DOWN', Ref, process, Pid, Why} -> Why end || {Pid, Ref} <- Users],
    WroteThenSawDeletion = fun({gone_after, N}) -> N > 0; (_) -> false end,
    ?assertEqual([true, true, true, true], lists:map(WroteThenSawDeletion, Exits)),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)).

use_until_gone(S, Keys, Parent, N) ->
    N =:= 10 andalso (Parent ! {running, self()}),
    K = lists:nth(N rem length(Keys) + 1, Keys),
    case dspex_store:set(S, K, N) of
        {ok, _} -> use_until_gone(S, Keys, Parent, N + 1);
        {error, session_not_found} -> exit({gone_after, N})
    end.
