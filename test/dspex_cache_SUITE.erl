%% Common Test: the node-local cache (`dspex_cache', `read => cached') across
%% three `peer' nodes, with the cluster suite's helpers: hits without a remote
%% call, invalidations sent only to the caching nodes, bounded staleness when
%% an invalidation is lost, eviction under the byte bound, owner failover, and
%% the staleness bound of every read under concurrent writes.
-module(dspex_cache_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([a_second_read_is_a_hit_without_a_remote_call/1, invalidations_reach_only_caching_nodes/1,
         a_write_is_seen_by_the_next_read_once_invalidated/1,
         a_lost_invalidation_is_bounded_by_max_staleness/1, eviction_keeps_the_byte_bound/1,
         owner_kill_drops_copies_and_the_new_owner_refills_them/1,
         every_stale_read_is_within_max_staleness_of_its_superseding_write/1,
         default_mode_is_owner_and_config_is_validated/1,
         a_strong_write_is_acknowledged_only_after_the_copy_is_dropped_or_its_lease_expired/1,
         a_new_owner_waits_out_the_leases_of_the_old_one/1,
         strong_histories_are_linearizable/1, strong_histories_are_linearizable_across_an_owner_kill/1,
         strong_histories_are_linearizable_across_a_caching_node_kill/1,
         writes_lost_on_the_losing_side_of_a_partition_are_reported_after_the_heal/1,
         a_migrated_session_is_refilled_from_its_new_owner/1,
         a_hit_is_one_nif_call_and_a_view_change_or_expiry_sends_it_to_the_owner/1,
         a_small_write_travels_with_its_invalidation_and_is_applied_in_place/1]).
%% run on the peers
-export([read_until/4, reads_for/3, writes/3, strong_reader/4, strong_writer/4]).

-define(C, dspex_cluster_SUITE).

all() ->
    [a_second_read_is_a_hit_without_a_remote_call, invalidations_reach_only_caching_nodes,
     a_write_is_seen_by_the_next_read_once_invalidated, a_lost_invalidation_is_bounded_by_max_staleness,
     eviction_keeps_the_byte_bound, owner_kill_drops_copies_and_the_new_owner_refills_them,
     every_stale_read_is_within_max_staleness_of_its_superseding_write,
     default_mode_is_owner_and_config_is_validated,
     a_strong_write_is_acknowledged_only_after_the_copy_is_dropped_or_its_lease_expired,
     a_new_owner_waits_out_the_leases_of_the_old_one, strong_histories_are_linearizable,
     strong_histories_are_linearizable_across_an_owner_kill,
     strong_histories_are_linearizable_across_a_caching_node_kill,
     writes_lost_on_the_losing_side_of_a_partition_are_reported_after_the_heal,
     a_migrated_session_is_refilled_from_its_new_owner,
     a_hit_is_one_nif_call_and_a_view_change_or_expiry_sends_it_to_the_owner,
     a_small_write_travels_with_its_invalidation_and_is_applied_in_place].

init_per_testcase(_, Config) -> Config.

end_per_testcase(Case, Config) -> dspex_cluster_SUITE:end_per_testcase(Case, Config).   % stops the peers the case recorded

%%% helpers -----------------------------------------------------------------------

cluster(Base, Cache) ->
    Peers = ?C:start_cluster(Base, #{replicas => 1, replication => sync, cache => Cache}),
    put(peers, Peers),
    Peers.

%% Session S with x = 0 created on the first node: {Owner, Replica, Other} as
%% {Node, Peer} pairs (Other neither owns nor replicates S).
roles(Peers, S) ->
    [{_, PA} | _] = Peers,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    [Other] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    {{Owner, pr(Owner, Peers)}, {Rep, pr(Rep, Peers)}, {Other, pr(Other, Peers)}}.

pr(N, Peers) -> proplists:get_value(N, Peers).

stats(P) -> peer:call(P, dspex_cache, stats, []).
stat(P, K) -> maps:get(K, stats(P)).

await_stat(P, K, AtLeast) ->
    ok = ?C:wait_until(fun() -> stat(P, K) >= AtLeast end, 10000, {P, K, AtLeast}).

regs(P, S) -> [N || {_, N} <- peer:call(P, ets, lookup, [dspex_cache_regs, S])].

%%% cases -------------------------------------------------------------------------

%% The first cached read on a non-owner fills the copy (one miss, one fill);
%% the next reads are hits answered here: the owner serves no read meanwhile
%% (its fills and its routed reads do not move) and the values are right.
a_second_read_is_a_hit_without_a_remote_call(_Config) ->
    Peers = cluster("dspex_cache_hit", #{mode => cached, max_staleness_ms => 60000}),
    S = <<"hit_s">>,
    {{_, PO}, _, {C, PC}} = roles(Peers, S),
    ok = peer:call(PC, dspex_cache, reset_stats, []),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{misses := 1, fills := 1, hits := 0} = stats(PC),
    ?assertEqual([C], regs(PO, S)),
    {ok, #{value := 0, version := 0}} = peer:call(PC, dspex_store, get, [S, x]),
    %% 100 reads: all hits, no further fill or miss
    [{ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]) || _ <- lists:seq(1, 100)],
    #{misses := 1, fills := 1, hits := 101} = stats(PC),
    {error, {not_found, <<"nope">>}} = peer:call(PC, dspex_store, get_value, [S, <<"nope">>]),
    %% the copy is not a session of this node's store
    ?assertNot(lists:member(dspex_cache:cache_id(S), peer:call(PC, dspex_store, list_sessions, []))),
    %% read => owner per call is routed (a miss neither counted nor filled)
    {ok, #{value := 0}} = peer:call(PC, dspex_store, get, [S, x, #{read => owner}]),
    #{misses := 1, fills := 1, hits := 102} = stats(PC),
    {error, {invalid_argument, read}} = peer:call(PC, dspex_store, get, [S, x, #{read => bogus}]),
    %% on the owner a cached read is a local read: no miss, no fill, no copy
    ok = peer:call(PO, dspex_cache, reset_stats, []),
    [{ok, 0} = peer:call(PO, dspex_store, get_value, [S, x]) || _ <- lists:seq(1, 10)],
    #{misses := 0, fills := 0, hits := 0, sessions := 0} = stats(PO).

%% A write on the owner invalidates the nodes caching the session and no other
%% (the replica, which did not read, gets nothing); no invalidation is sent
%% for a session nobody caches.
invalidations_reach_only_caching_nodes(_Config) ->
    Peers = cluster("dspex_cache_only", #{mode => cached, max_staleness_ms => 60000}),
    S = <<"only_s">>,
    {{_, PO}, {_, PR}, {C, PC}} = roles(Peers, S),
    [ok = peer:call(P, dspex_cache, reset_stats, []) || {_, P} <- Peers],
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    {ok, 1} = peer:call(PO, dspex_store, set, [S, x, 1]),
    await_stat(PC, invalidations_received, 1),
    #{invalidations_sent := 1} = stats(PO),
    #{invalidations_received := 0, invalidations_sent := 0} = stats(PR),
    ?assertEqual([C], regs(PO, S)),
    %% an uncached session: no invalidation at all
    S2 = <<"only_s2">>,
    {{_, PO2}, _, _} = roles(Peers, S2),
    Sent = stat(PO2, invalidations_sent),
    {ok, 1} = peer:call(PO2, dspex_store, set, [S2, x, 1]),
    ?assertEqual(Sent, stat(PO2, invalidations_sent)),
    ?assertEqual([], regs(PO2, S2)).

%% With a lease far longer than the test, the next cached read after the
%% invalidation arrived sees the write (the invalidation, not the lease, made
%% it fresh); a write made by the caching node itself is seen at once
%% (read-your-writes); the delay stats are filled.
a_write_is_seen_by_the_next_read_once_invalidated(_Config) ->
    Peers = cluster("dspex_cache_inv", #{mode => cached, max_staleness_ms => 600000}),
    S = <<"inv_s">>,
    {{_, PO}, _, {_, PC}} = roles(Peers, S),
    ok = peer:call(PC, dspex_cache, reset_stats, []),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    [begin
         {ok, V} = peer:call(PO, dspex_store, set, [S, x, V]),
         await_stat(PC, invalidations_received, V),
         {ok, V} = peer:call(PC, dspex_store, get_value, [S, x]),
         {ok, #{value := V, version := V}} = peer:call(PC, dspex_store, get, [S, x])
     end || V <- lists:seq(1, 20)],
    {ok, 21} = peer:call(PC, dspex_store, set, [S, x, 21]),
    {ok, 21} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{invalidation_delay_p50_us := P50, invalidation_delay_p99_us := P99} = St = stats(PC),
    ct:pal("invalidation delay p50 ~p us, p99 ~p us; ~p", [P50, P99, St]),
    ?assert(is_number(P50) andalso is_number(P99) andalso P50 =< P99).

%% The owner forgets the caching node (its invalidations are lost): the
%% cached reads keep the old value only while the copy's lease lasts, never
%% after max_staleness_ms from the write's acknowledgement, then see it.
a_lost_invalidation_is_bounded_by_max_staleness(_Config) ->
    Max = 300,
    Peers = cluster("dspex_cache_lost", #{mode => cached, max_staleness_ms => Max}),
    S = <<"lost_s">>,
    {{_, PO}, _, {C, PC}} = roles(Peers, S),
    ok = peer:call(PC, dspex_cache, reset_stats, []),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    true = peer:call(PO, ets, delete_object, [dspex_cache_regs, {S, C}]),
    {ok, 1} = peer:call(PO, dspex_store, set, [S, x, 1]),
    Ack = os:perf_counter(nanosecond),
    Reads = peer:call(PC, ?MODULE, read_until, [S, x, 1, 20000]),
    {Stale, [{_, 1} | _]} = lists:splitwith(fun({_, V}) -> V =:= 0 end, Reads),
    ct:pal("~p stale reads after the lost invalidation; first fresh ~p ms after the ack",
           [length(Stale), (element(1, lists:last(Reads)) - Ack) / 1.0e6]),
    [?assert(T - Ack < Max * 1000000) || {T, 0} <- Stale],
    ?assertEqual(0, stat(PC, invalidations_received)),
    ?assert(stat(PC, stale_refused) >= 1).

%% Cached reads of many sessions keep the copies' bytes under max_bytes:
%% the clock evicts, the owners are told to forget the evicted copies, and
%% every read answers the right value.
eviction_keeps_the_byte_bound(_Config) ->
    Max = 6000,
    Peers = cluster("dspex_cache_evict", #{mode => cached, max_staleness_ms => 60000, max_bytes => Max}),
    [{_, PA} | _] = Peers,
    Ss = [<<"ev_", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 24)],
    Big = binary:copy(<<"v">>, 1000),
    [begin
         {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
         {ok, _} = peer:call(PA, dspex_store, register, [S, s, string, <<Big/binary, S/binary>>])
     end || S <- Ss],
    %% the node caching: the one owning the fewest of these sessions
    View = peer:call(PA, dspex_cluster_members, view, []),
    Owned = fun(N) -> [S || S <- Ss, element(1, dspex_cluster_writer:owners(S, View)) =:= N] end,
    {_, C} = lists:min([{length(Owned(N)), N} || {N, _} <- Peers]),
    PC = pr(C, Peers),
    Remote = Ss -- Owned(C),
    [begin
         {ok, V} = peer:call(PC, dspex_store, get_value, [S, s]),
         ?assertEqual(<<Big/binary, S/binary>>, V),
         #{bytes := B} = stats(PC),
         ?assert(B =< Max)
     end || _ <- [1, 2], S <- Remote],
    #{evictions := Ev, sessions := N, bytes := B} = stats(PC),
    ct:pal("~p remote sessions read twice: ~p evictions, ~p cached, ~p bytes", [length(Remote), Ev, N, B]),
    ?assert(Ev > 0),
    ?assert(N < length(Remote)),
    Cached = peer:call(PC, dspex_cache, cached_sessions, []),
    %% every owner forgets the evicted copies (told by a message: awaited)
    ok = ?C:wait_until(
           fun() ->
                   lists:all(fun(S) ->
                                     {O, _} = dspex_cluster_writer:owners(S, View),
                                     lists:member(C, regs(pr(O, Peers), S)) =:= lists:member(S, Cached)
                             end, Remote)
           end, 10000, owners_forget_evicted).

%% The owner of a cached session is killed: the caching node drops its copy
%% (nodedown), the next cached read refills it from the new owner (a higher
%% epoch) with the last acknowledged value, and the new owner's writes
%% invalidate it.
owner_kill_drops_copies_and_the_new_owner_refills_them(_Config) ->
    Peers = cluster("dspex_cache_kill", #{mode => cached, max_staleness_ms => 600000}),
    S = <<"kill_s">>,
    {{O, PO}, {R, PR}, {C, PC}} = roles(Peers, S),
    {ok, _} = peer:call(PO, dspex_store, set, [S, x, 7]),
    {ok, 7} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{epoch := E0, owner := O} = peer:call(PC, dspex_cache, entry, [S]),
    ok = ?C:kill_node(O, Peers),
    ok = ?C:wait_until(fun() -> peer:call(PC, dspex_cache, cached_sessions, []) =:= [] end, 20000, copy_dropped),
    {ok, 7} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{epoch := E1, owner := R} = peer:call(PC, dspex_cache, entry, [S]),
    ?assert(E1 > E0),
    ?assertEqual([C], regs(PR, S)),
    Got = stat(PC, invalidations_received),
    {ok, _} = peer:call(PR, dspex_store, set, [S, x, 8]),
    await_stat(PC, invalidations_received, Got + 1),
    {ok, 8} = peer:call(PC, dspex_store, get_value, [S, x]).

%% A writer on the owner and cached readers on the two other nodes, the owner
%% forgetting the readers now and then (lost invalidations): every read
%% returns a written value, and a read returning value V that began after
%% write V+1 was acknowledged began less than max_staleness_ms after it.
every_stale_read_is_within_max_staleness_of_its_superseding_write(_Config) ->
    Max = 100,
    Peers = cluster("dspex_cache_bound", #{mode => cached, max_staleness_ms => Max}),
    S = <<"bound_s">>,
    {{_, PO}, {_, PR}, {_, PC}} = roles(Peers, S),
    N = 300,
    Self = self(),
    Readers = [spawn_link(fun() -> Self ! {reads, P, peer:call(P, ?MODULE, reads_for, [S, x, 4000], 60000)} end)
               || P <- [PR, PC]],
    Acks = peer:call(PO, ?MODULE, writes, [S, x, N], 60000),
    Got = [receive {reads, P, Rs} -> Rs end || P <- [PR, PC]],
    Reads = lists:append([Rs || {_, Rs} <- Got]),
    Count = lists:sum([C || {C, _} <- Got]),
    _ = Readers,
    AckOf = maps:from_list(Acks),
    Stale = [{T, V, T - maps:get(V + 1, AckOf)} || {T, V} <- Reads, V < N,
                                                   maps:get(V + 1, AckOf) < T],
    ?assert(lists:all(fun({_, V}) -> V >= 0 andalso V =< N end, Reads)),
    Worst = lists:max([0 | [D || {_, _, D} <- Stale]]),
    ct:pal("~p reads, ~p writes, ~p values read stale, worst ~p us after the superseding ack",
           [Count, N, length(Stale), Worst div 1000]),
    ?assert(Worst < Max * 1000000),
    ?assert(Count > 0).

%% Without a `cache' entry reads are routed as before (no copy, no stats);
%% a bad `cache' configuration is refused.
default_mode_is_owner_and_config_is_validated(_Config) ->
    Peers = ?C:start_cluster("dspex_cache_def", #{replicas => 1}),
    put(peers, Peers),
    S = <<"def_s">>,
    {_, _, {_, PC}} = roles(Peers, S),
    owner = peer:call(PC, dspex_cache, mode, []),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{misses := 0, fills := 0, sessions := 0} = stats(PC),
    %% per call
    {ok, 0} = peer:call(PC, dspex_cache, get_value, [S, x, #{read => cached}]),
    #{misses := 1, fills := 1, sessions := 1} = stats(PC),
    {ok, #{epoch := _, seq := _}} = peer:call(PC, dspex_cache, warm, [S]),
    [?assertMatch({error, {invalid_argument, {cache, _}}},
                  peer:call(PC, dspex_cluster_sup, config_of, [#{cache => Bad}]))
     || Bad <- [#{mode => fast}, #{max_staleness_ms => -1}, #{max_bytes => big}]],
    ?assertEqual({error, {invalid_argument, cache}},
                 peer:call(PC, dspex_cluster_sup, config_of, [#{cache => []}])).

%% Strong mode: a write returns only after the caching node dropped its copy
%% (checked right after the acknowledgement, without waiting); with the
%% caching node's cache server suspended (it cannot answer the revocation)
%% the write returns only after the lease it holds expired, and the next
%% strong read there sees the write.
a_strong_write_is_acknowledged_only_after_the_copy_is_dropped_or_its_lease_expired(_Config) ->
    Peers = cluster("dspex_cache_strong", #{mode => strong, max_staleness_ms => 1500}),
    S = <<"strong_s">>,
    {{_, PO}, _, {_, PC}} = roles(Peers, S),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{lease_until := L1} = peer:call(PC, dspex_cache, entry, [S]),
    ?assert(L1 > peer:call(PC, dspex_cache, clock, [])),
    {ok, 1} = peer:call(PO, dspex_store, set, [S, x, 1]),
    ?assertEqual([], peer:call(PC, dspex_cache, cached_sessions, [])),
    {ok, 1} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{lease_until := L2} = peer:call(PC, dspex_cache, entry, [S]),
    ok = peer:call(PC, sys, suspend, [dspex_cache]),
    {ok, 2} = peer:call(PO, dspex_store, set, [S, x, 2]),
    Ack = peer:call(PO, dspex_cache, clock, []),
    ok = peer:call(PC, sys, resume, [dspex_cache]),
    ct:pal("write acknowledged ~p ms after the unanswered lease's expiry", [(Ack - L2) / 1.0e6]),
    ?assert(Ack >= L2),
    {ok, 2} = peer:call(PC, dspex_store, get_value, [S, x]),
    %% cached reads are still allowed (bounded staleness) and strong per call
    {ok, #{value := 2}} = peer:call(PC, dspex_store, get, [S, x, #{read => strong}]),
    {ok, #{value := 2}} = peer:call(PC, dspex_store, get, [S, x, #{read => cached}]).

%% The owner holding the session is killed while another node holds a
%% strong lease from it: the new owner acknowledges its first write of the
%% session only after that lease expired.
a_new_owner_waits_out_the_leases_of_the_old_one(_Config) ->
    Peers = cluster("dspex_cache_fence", #{mode => strong, max_staleness_ms => 1500}),
    S = <<"fence_s">>,
    {{O, _}, {R, PR}, {_, PC}} = roles(Peers, S),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{owner := O, lease_until := Lease} = peer:call(PC, dspex_cache, entry, [S]),
    ok = ?C:kill_node(O, Peers),
    ok = ?C:wait_until(fun() -> {ok, R} =:= peer:call(PR, dspex_cluster, owner_of, [S]) end, 20000, new_owner),
    {ok, 1} = peer:call(PR, dspex_store, set, [S, x, 1]),
    Ack = peer:call(PR, dspex_cache, clock, []),
    ct:pal("first write on the new owner acknowledged ~p ms after the old lease's expiry", [(Ack - Lease) / 1.0e6]),
    ?assert(Ack >= Lease),
    {ok, 1} = peer:call(PC, dspex_store, get_value, [S, x]).

%% Two writers (on the owner and on another node) and strong readers on
%% the two other nodes, with short leases: the recorded history is
%% linearizable (dspex_lincheck, Wing and Gong). Skipped where the checker
%% is not built (it comes with another branch).
strong_histories_are_linearizable(_Config) ->
    lin_case("dspex_cache_lin", fun({{_, PO}, {_, PR}, {_, PC}}) ->
        {[{PO, strong_writer, [1000000, 250]}, {PC, strong_writer, [2000000, 250]},
          {PC, strong_reader, [{c, 1}, 1000]}, {PC, strong_reader, [{c, 2}, 1000]},
          {PR, strong_reader, [{r, 1}, 1000]}, {PR, strong_reader, [{r, 2}, 1000]}], none}
    end).

%% As above, the owner killed (kill -9) once 50 writes were made: the
%% clients run on the two other nodes, the new owner waits out the old
%% owner's leases.
strong_histories_are_linearizable_across_an_owner_kill(_Config) ->
    lin_case("dspex_cache_link", fun({{O, _}, {_, PR}, {_, PC}}) ->
        {[{PC, strong_writer, [1000000, 250]}, {PR, strong_writer, [2000000, 250]},
          {PC, strong_reader, [{c, 1}, 1000]}, {PC, strong_reader, [{c, 2}, 1000]},
          {PR, strong_reader, [{r, 1}, 1000]}, {PR, strong_reader, [{r, 2}, 1000]}], {O, PR}}
    end).

%% As above, a caching node killed once 50 writes were made (its readers'
%% histories are lost with it): the owner's writes wait out its lease and go
%% on; the other node's readers' history with the writes is linearizable.
strong_histories_are_linearizable_across_a_caching_node_kill(_Config) ->
    lin_case("dspex_cache_linc", fun({{_, PO}, {_, PR}, {C, PC}}) ->
        {[{PO, strong_writer, [1000000, 250]}, {PR, strong_writer, [2000000, 250]},
          {PC, strong_reader, [{c, 1}, 1000]},
          {PR, strong_reader, [{r, 1}, 1000]}, {PR, strong_reader, [{r, 2}, 1000]}], {C, PR}}
    end).

%% Runs the jobs {Peer, Fun, Args} made by Setup(roles) on session x of a
%% strong cluster with 20 ms leases, kills the node of Victim (after 50
%% writes, watched from Watch) unless `none', and checks the history of the
%% jobs that survived. Skipped where the checker is not built (it comes with
%% another branch).
lin_case(Base, Setup) ->
    case code:which(dspex_lincheck) of
        non_existing -> {skip, no_dspex_lincheck};
        _ ->
            Peers = cluster(Base, #{mode => strong, max_staleness_ms => 20}),
            S = <<"lin_s">>,
            {Jobs, Kill} = Setup(roles(Peers, S)),
            Self = self(),
            [spawn(fun() -> Self ! {ops, J, catch peer:call(P, ?MODULE, F, [S, x | A], 120000)} end)
             || {P, F, A} = J <- Jobs],
            Victim = case Kill of
                         none -> none;
                         {V, Watch} ->
                             ok = ?C:wait_until(fun() -> writes_made(Watch, S) >= 50 end, 30000, fifty_writes),
                             ok = ?C:kill_node(V, Peers),
                             proplists:get_value(V, Peers)
                     end,
            Ops = lists:append([receive {ops, J, O} -> O end || {P, _, _} = J <- Jobs, P =/= Victim]),
            [receive {ops, J, _} -> ok end || {P, _, _} = J <- Jobs, P =:= Victim],
            Reads = [V || {_, read, _, {ok, V}, _, _} <- Ops],
            Unknown = length([x || {_, write, _, unknown, _, _} <- Ops]),
            Hits = lists:sum([maps:get(hits, stats(P)) || {_, P} <- Peers, P =/= Victim]),
            ct:pal("~p ops, ~p reads (~p distinct values), ~p writes of unknown outcome, ~p cache hits",
                   [length(Ops), length(Reads), length(lists:usort(Reads)), Unknown, Hits]),
            ?assert(Hits > 0),
            ?assertEqual(ok, dspex_lincheck:check(0, Ops))
    end.

%% Writes made so far (the variable's version), asked through node P.
writes_made(P, S) ->
    case peer:call(P, dspex_store, get, [S, x, #{read => owner}]) of
        {ok, #{version := V}} -> V;
        _ -> 0
    end.

%% Async replication, the replica missing three acknowledged writes (its
%% replica process unreachable by name meanwhile); the owner is then cut off,
%% the majority takes the session over from the replica's older copy and
%% writes; after the heal the higher epoch's copy wins and the three writes
%% of the old owner's epoch are reported by `dspex_cache:conflicts/1' (from
%% any node), with the variable's lost value, never merged.
writes_lost_on_the_losing_side_of_a_partition_are_reported_after_the_heal(_Config) ->
    Peers0 = ?C:start_cluster("dspex_cache_vv", #{replicas => 1, replication => async}),
    put(peers, Peers0),
    S = <<"vv_s">>,
    {{O, PO}, {R, PR}, {C, PC}} = roles(Peers0, S),
    Peers = [{R, PR}, {C, PC}, {O, PO}],   % the owner third: partition_third cuts it off
    Seq = fun(P) -> element(3, peer:call(P, dspex_cluster_replica, row, [S])) end,
    ok = ?C:wait_until(fun() -> Seq(PR) =:= Seq(PO) end, 10000, replica_caught_up),
    Seq0 = Seq(PR),
    Name = dspex_cluster_replica:name(S),
    Pid = peer:call(PR, erlang, whereis, [Name]),
    true = peer:call(PR, erlang, unregister, [Name]),
    [{ok, _} = peer:call(PO, dspex_store, set, [S, x, V]) || V <- [1, 2, 3]],
    {ok, 3} = peer:call(PO, dspex_store, get_value, [S, x]),
    ok = ?C:partition_third(Peers),
    %% back under its name only once the owner is cut off: before, the owner's
    %% shipper could send the three writes again and the replica catch up (then
    %% the takeover below started from all of them, and nothing was lost)
    true = peer:call(PR, erlang, register, [Name, Pid]),
    ?assertEqual(Seq0, Seq(PR)),
    {ok, _} = peer:call(PC, dspex_store, set, [S, x, 10]),
    ?assertEqual([], peer:call(PC, dspex_cache, conflicts, [S])),
    ok = ?C:restore_cookies(Peers),
    ok = ?C:wait_until(fun() -> peer:call(PC, dspex_cache, conflicts, [S]) =/= [] end, 30000, conflict_reported),
    [#{node := O, lost := [{1, O, From, To}], variables := Vars}] = peer:call(PC, dspex_cache, conflicts, [S]),
    ?assertEqual(3, To - From),
    [#{name := <<"x">>, lost_value := 3, value := 10}] = Vars,
    [{ok, 10} = peer:call(P, dspex_store, get_value, [S, x]) || {_, P} <- Peers],
    %% the session's event log has it too: one cache_conflict event for the
    %% losing copy, with its lost writes, on the new owner's log
    {ok, New} = peer:call(PC, dspex_cluster, owner_of, [S]),
    PN = pr(New, Peers),
    ReadConflicts = fun() ->
                            {ok, Evs} = peer:call(PN, dspex_events, read, [S, #{types => [cache_conflict]}]),
                            Evs
                    end,
    ok = ?C:wait_until(fun() -> ReadConflicts() =/= [] end, 10000, conflict_event),
    [#{type := cache_conflict, data := #{node := O, epoch := Ep, lost := [{1, O, From, To}],
                                         variables := [#{name := <<"x">>, lost_value := 3, value := 10}]}}] =
        ReadConflicts(),
    ?assert(Ep > 1).

%% The session migrates to its replica while another node caches it (a
%% lease far longer than the test): the view change makes that node's next
%% cached read ask the new owner, which has taken over at a higher epoch, so
%% the copy is filled again from it; the new owner's writes invalidate it and
%% the old owner sends nothing.
a_migrated_session_is_refilled_from_its_new_owner(_Config) ->
    Peers = cluster("dspex_cache_mig", #{mode => cached, max_staleness_ms => 600000}),
    S = <<"mig_s">>,
    {{O, PO}, {R, PR}, {C, PC}} = roles(Peers, S),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{epoch := E0, owner := O} = peer:call(PC, dspex_cache, entry, [S]),
    {ok, #{epoch := E1}} = peer:call(PO, dspex_cluster, migrate_session, [S, R]),
    ?assert(E1 > E0),
    ok = ?C:wait_until(fun() -> peer:call(PC, dspex_cluster, owner_of, [S]) =:= {ok, R} end, 10000, view_moved),
    Fills = stat(PC, fills),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),
    #{epoch := E1, owner := R} = peer:call(PC, dspex_cache, entry, [S]),
    ?assertEqual(Fills + 1, stat(PC, fills)),
    ?assertEqual([C], regs(PR, S)),
    SentByOld = stat(PO, invalidations_sent),
    Got = stat(PC, invalidations_received),
    {ok, _} = peer:call(PR, dspex_store, set, [S, x, 5]),
    await_stat(PC, invalidations_received, Got + 1),
    {ok, 5} = peer:call(PC, dspex_store, get_value, [S, x]),
    ?assertEqual(SentByOld, stat(PO, invalidations_sent)).

%%% run on the peers --------------------------------------------------------------

%% Cached reads of K until it is Want (at most Timeout ms): [{InvokeNs, Value}].
read_until(S, K, Want, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    read_until(S, K, Want, Deadline, []).

read_until(S, K, Want, Deadline, Acc) ->
    T = os:perf_counter(nanosecond),
    {ok, V} = dspex_store:get_value(S, K),
    Acc1 = [{T, V} | Acc],
    case V =:= Want orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> lists:reverse(Acc1);
        false -> read_until(S, K, Want, Deadline, Acc1)
    end.

%% Cached reads for Ms milliseconds: {Count, [{LastInvokeNs, Value}]}, the
%% invocation time of the last read returning each value (the one that
%% matters for its staleness), so that little travels back.
reads_for(S, K, Ms) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    reads_loop(S, K, Deadline, 0, #{}).

reads_loop(S, K, Deadline, N, Acc) ->
    case erlang:monotonic_time(millisecond) > Deadline of
        true -> {N, [{T, V} || {V, T} <- maps:to_list(Acc)]};
        false ->
            T = os:perf_counter(nanosecond),
            {ok, V} = dspex_store:get_value(S, K),
            reads_loop(S, K, Deadline, N + 1, Acc#{V => T})
    end.

%% Writes K = 1..N; every 50th write first makes this owner forget the nodes
%% caching S (that write's invalidation is lost). [{Value, AckNs}].
writes(S, K, N) ->
    [begin
         _ = I rem 50 =:= 0 andalso ets:delete(dspex_cache_regs, S),
         {ok, I} = dspex_store:set(S, K, I),
         {I, os:perf_counter(nanosecond)}
     end || I <- lists:seq(1, N)].

%% N strong reads (a pause of 1 ms every 4): lincheck read operations.
strong_reader(S, K, Proc, N) ->
    [begin
         T0 = os:perf_counter(nanosecond),
         R = case dspex_store:get_value(S, K) of
                 {ok, V} -> {ok, V};
                 _ -> fail
             end,
         T1 = os:perf_counter(nanosecond),
         _ = I rem 4 =:= 0 andalso receive after 1 -> ok end,
         {Proc, read, undefined, R, T0, T1}
     end || I <- lists:seq(1, N)].

%% N writes of Base + 1 .. Base + N: lincheck write operations (an error is
%% an unknown outcome).
strong_writer(S, K, Base, N) ->
    [begin
         V = Base + I,
         T0 = os:perf_counter(nanosecond),
         case dspex_store:set(S, K, V) of
             {ok, _} -> {{w, Base}, write, V, ok, T0, os:perf_counter(nanosecond)};
             _ -> {{w, Base}, write, V, unknown, T0, infinity}
         end
     end || I <- lists:seq(1, N)].

%% The hit path is inside the NIF: with a fresh copy, the NIF's own
%% var_get/2 and var_get_value/2 (the first call of dspex_store:get/2) answer
%% the read themselves, counted as a hit, with no `slow'; the copy's second-
%% chance bit is set by that read. A view change (the NIF's generation is
%% bumped) makes the copy answer `slow' until the next read renewed it from
%% the owner under the new view; so does an expired lease (`max_staleness_ms'
%% per call); a strong read finds no lease in cached mode and answers `stale'.
a_hit_is_one_nif_call_and_a_view_change_or_expiry_sends_it_to_the_owner(_Config) ->
    Peers = cluster("dspex_cache_nif", #{mode => cached, max_staleness_ms => 600000}),
    S = <<"nif_s">>,
    {{_, PO}, _, {_, PC}} = roles(Peers, S),
    {ok, 1} = peer:call(PO, dspex_store, set, [S, x, 5]),
    ok = peer:call(PC, dspex_cache, reset_stats, []),
    slow = peer:call(PC, dspex_nif, var_get_value, [S, x]),   % no copy yet
    {ok, 5} = peer:call(PC, dspex_store, get_value, [S, x]),   % fills it
    #{referenced := false} = peer:call(PC, dspex_cache, entry, [S]),
    {ok, 5} = peer:call(PC, dspex_nif, var_get_value, [S, x]),
    {var, _, _, _, _, <<"x">>, integer, _, 5, 1} = peer:call(PC, dspex_nif, var_get, [S, <<"x">>]),
    {error, {not_found, <<"y">>}} = peer:call(PC, dspex_nif, var_get_value, [S, <<"y">>]),
    #{hits := 3, misses := 1, fills := 1} = stats(PC),
    #{referenced := true} = peer:call(PC, dspex_cache, entry, [S]),
    %% explicit modes: a cached read of at most 600 s hits; 0 ms is stale;
    %% strong finds no lease
    {ok, 5} = peer:call(PC, dspex_nif, cache_get_value, [S, x, 600000]),
    stale = peer:call(PC, dspex_nif, cache_get_value, [S, x, 0]),
    stale = peer:call(PC, dspex_nif, cache_get_value, [S, x, strong]),
    miss = peer:call(PC, dspex_nif, cache_get_value, [<<"other">>, x, 100]),
    %% a view change: not fresh any more, the next read renews under the new view
    #{view := G0} = peer:call(PC, dspex_cache, entry, [S]),
    ok = peer:call(PC, dspex_cluster_members, bump, []),
    slow = peer:call(PC, dspex_nif, var_get_value, [S, x]),
    Renewals = stat(PC, renewals),
    {ok, 5} = peer:call(PC, dspex_store, get_value, [S, x]),
    ?assertEqual(Renewals + 1, stat(PC, renewals)),
    #{view := G1} = peer:call(PC, dspex_cache, entry, [S]),
    ?assert(G1 > G0),
    {ok, 5} = peer:call(PC, dspex_nif, var_get_value, [S, x]),
    %% an expired lease (a per-call bound of 0 ms) is asked of the owner
    Stale = stat(PC, stale_refused),
    {ok, #{value := 5}} = peer:call(PC, dspex_store, get, [S, x, #{max_staleness_ms => 0}]),
    ?assertEqual(Stale + 1, stat(PC, stale_refused)),
    %% bad arguments are badarg, not a crash
    [?assertMatch({'EXIT', _}, catch peer:call(PC, dspex_nif, cache_get, Args))
     || Args <- [[S, x, -1], [S, x, soon], [S, {1}, 1]]],
    {ok, 5} = peer:call(PC, dspex_nif, var_get_value, [S, x]).

%% A set whose change is at most value_max_bytes (1024 by default) travels
%% with its invalidation: the caching node applies it to its copy in place
%% (the copy was exactly one change behind), so the next cached read shows
%% the new value, version and metadata with no fill, miss or renewal. The
%% copy logs no event of its own. A larger change is an invalidation (the
%% copy is dropped and filled again), and a change the copy is not exactly one
%% change behind of drops it.
a_small_write_travels_with_its_invalidation_and_is_applied_in_place(_Config) ->
    Peers = cluster("dspex_cache_upd", #{mode => cached, max_staleness_ms => 600000}),
    S = <<"upd_s">>,
    {{_, PO}, _, {_, PC}} = roles(Peers, S),
    {ok, _} = peer:call(PO, dspex_store, register, [S, big, string, <<"a">>]),
    {ok, 0} = peer:call(PC, dspex_store, get_value, [S, x]),   % the fill
    #{fills := F0, misses := M0, stale_refused := St0, renewals := Rn0, updates_applied := A0,
      invalidations_received := R0} = stats(PC),
    #{seq := Seq0} = peer:call(PC, dspex_cache, entry, [S]),
    [begin
         {ok, V} = peer:call(PO, dspex_store, set, [S, x, V * 10, #{metadata => #{step => V}, changed_by => <<"opt">>}]),
         await_stat(PC, invalidations_received, R0 + V),
         {ok, #{value := Val, version := V, metadata := #{step := V}}} = peer:call(PC, dspex_store, get, [S, x]),
         ?assertEqual(V * 10, Val)
     end || V <- lists:seq(1, 5)],
    #{fills := F0, misses := M0, stale_refused := St0, renewals := Rn0, updates_applied := A5} = stats(PC),
    ?assertEqual(A0 + 5, A5),
    #{seq := Seq5} = peer:call(PC, dspex_cache, entry, [S]),
    ?assertEqual(Seq0 + 5, Seq5),
    ok = peer:call(PC, dspex_events, await, []),
    ?assertEqual({ok, []}, peer:call(PC, dspex_events, read, [dspex_cache:cache_id(S), #{}])),
    %% above value_max_bytes: dropped, then filled again
    Big = binary:copy(<<"b">>, 2000),
    {ok, 1} = peer:call(PO, dspex_store, set, [S, big, Big]),
    await_stat(PC, invalidations_received, R0 + 6),
    ?assertEqual([], peer:call(PC, dspex_cache, cached_sessions, [])),
    {ok, Big} = peer:call(PC, dspex_store, get_value, [S, big]),
    #{fills := F1, updates_applied := A5} = stats(PC),
    ?assertEqual(F0 + 1, F1),
    %% a change two ahead of the copy: dropped, not applied
    #{epoch := E, seq := Seq, owner := O} = peer:call(PC, dspex_cache, entry, [S]),
    peer:call(PC, erlang, send, [dspex_cache, {dspex_cache_update, S, E, Seq + 2, O, 0, {set, <<"x">>, 99, #{}, 99}}]),
    ok = ?C:wait_until(fun() -> peer:call(PC, dspex_cache, cached_sessions, []) =:= [] end, 10000, dropped),
    {ok, 50} = peer:call(PC, dspex_store, get_value, [S, x]).
