%% Common Test: the store across three `peer' nodes (OS processes on this
%% machine): failover after kill -9, partitions, migration and draining under
%% load, lock fencing across failover. The test node itself is not distributed:
%% peers are controlled over their standard I/O, so the only distribution
%% links are the cluster's own.
-module(dspex_cluster_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([kill_owner_sync_loses_no_acknowledged_write/1, calls_wait_for_an_owner_whose_view_lags_the_heal/1,
         a_write_fenced_while_replicating_is_not_acknowledged/1, a_read_returns_a_change_only_once_its_replicas_confirmed_it/1, minority_refuses_writes_and_heals/1,
         migrate_and_drain_under_load/1, locks_released_and_old_token_rejected_after_failover/1,
         async_replication_converges/1, rendezvous_is_stable_and_spreads/1,
         no_configuration_means_no_routing/1, replica_copies_live_and_expire_with_the_owner/1,
         graph_acl_locks_and_watches_reach_the_owner/1, watch_is_lost_once_when_the_session_migrates/1,
         failover_converges_when_the_new_owner_lags/1, stuck_servers_end_calls_with_documented_errors/1,
         configuration_is_validated_and_read_mode_is_per_process/1,
         concurrent_writes_are_batched_and_every_replica_converges/1,
         a_stuck_replica_bounds_the_window_and_fails_writes_as_replica_slow/1,
         a_replica_that_diverged_gets_a_full_copy_before_the_ack/1,
         a_replica_node_dying_fails_its_batches_in_flight/1,
         a_replica_applies_a_run_of_sets_in_one_nif_call/1, a_write_ranks_the_nodes_once_per_view/1,
         event_sequence_continues_on_the_new_owner_after_failover/1,
         event_sequence_follows_a_migration_and_the_dropped_copy_logs_migrated/1,
         event_sequence_on_one_postgres_database_across_failover/1,
         a_drain_that_would_leave_no_owner_is_refused/1, unknown_sessions_leave_no_row_on_any_node/1,
         deleted_sessions_leave_no_rows_on_any_node/1, a_session_deleted_while_a_node_was_cut_off_stays_deleted/1,
         tombstones_of_an_owner_that_died_are_removed_when_it_returns/1]).
-export([churn/2, session_rows/1]).
%% run on the peers
-export([sum_values/1, holder_start/1, holder_stop/1, run_as/4, holder_take/2, spawn_call/4, await_result/2, has_result/1]).
-export([client_start/2, client_start/3, client_start/5, client_more/1, client_more/2, client_loop/1, client_count/0,
         client_count/1, client_stop/0, client_stop/1, node_state/2, catch_apply/3]).
-export([collector_start/1, collected/1, spawn_to/5, runs_start/0, runs_get/0, counted_writes/3]).
-export([events_start/2, events_get/1, forward_event/4, read_as/4, parallel_sets/1]).
-export([fast_path_sets_of_one_session_reach_the_replica_in_commit_order/1,
         a_fast_path_write_is_acknowledged_only_after_the_replica_applied_it/1,
         a_migration_unsettles_the_fast_path_without_losing_or_repeating_versions/1,
         fast_path_writes_acknowledged_before_a_kill_of_their_owner_survive_it/1,
         fast_path_sets_are_counted_and_give_way_to_a_telemetry_handler/1, native_set_count/0,
         fast_path_sets_with_two_replicas_reach_both_in_commit_order/1,
         a_fast_path_write_with_two_replicas_is_acknowledged_only_after_both_applied_it/1,
         async_fast_path_sets_converge_and_a_missed_record_is_fixed_by_a_full_copy/1, rewind_row/1,
         async_writers_wait_for_a_slow_replica_instead_of_failing/1,
         a_shipper_that_stops_or_is_killed_leaves_no_write_waiting/1, counting_sets/3,
         sets_checking_the_replica/4, set_and_last_write/3, fast_writers_start/3]).
-export([start_cluster/2, stop_cluster/1, wait_until/3, kill_node/2, restart_node/2, partition_third/1, restore_cookies/1,
         check_history/1, run_kill_test/2]).

all() ->
    [kill_owner_sync_loses_no_acknowledged_write, minority_refuses_writes_and_heals,
     migrate_and_drain_under_load, locks_released_and_old_token_rejected_after_failover,
     async_replication_converges, rendezvous_is_stable_and_spreads,
     no_configuration_means_no_routing, replica_copies_live_and_expire_with_the_owner,
     graph_acl_locks_and_watches_reach_the_owner, watch_is_lost_once_when_the_session_migrates,
     failover_converges_when_the_new_owner_lags, calls_wait_for_an_owner_whose_view_lags_the_heal,
     a_write_fenced_while_replicating_is_not_acknowledged,
     a_read_returns_a_change_only_once_its_replicas_confirmed_it,
     stuck_servers_end_calls_with_documented_errors,
     configuration_is_validated_and_read_mode_is_per_process,
     concurrent_writes_are_batched_and_every_replica_converges,
     a_stuck_replica_bounds_the_window_and_fails_writes_as_replica_slow,
     a_replica_that_diverged_gets_a_full_copy_before_the_ack,
     a_replica_node_dying_fails_its_batches_in_flight,
     a_replica_applies_a_run_of_sets_in_one_nif_call, a_write_ranks_the_nodes_once_per_view,
     fast_path_sets_of_one_session_reach_the_replica_in_commit_order,
     a_fast_path_write_is_acknowledged_only_after_the_replica_applied_it,
     a_migration_unsettles_the_fast_path_without_losing_or_repeating_versions,
     fast_path_writes_acknowledged_before_a_kill_of_their_owner_survive_it,
     fast_path_sets_are_counted_and_give_way_to_a_telemetry_handler,
     fast_path_sets_with_two_replicas_reach_both_in_commit_order,
     a_fast_path_write_with_two_replicas_is_acknowledged_only_after_both_applied_it,
     async_fast_path_sets_converge_and_a_missed_record_is_fixed_by_a_full_copy,
     async_writers_wait_for_a_slow_replica_instead_of_failing,
     a_shipper_that_stops_or_is_killed_leaves_no_write_waiting,
     event_sequence_continues_on_the_new_owner_after_failover,
     event_sequence_follows_a_migration_and_the_dropped_copy_logs_migrated,
     event_sequence_on_one_postgres_database_across_failover,
     a_drain_that_would_leave_no_owner_is_refused, unknown_sessions_leave_no_row_on_any_node,
     deleted_sessions_leave_no_rows_on_any_node, a_session_deleted_while_a_node_was_cut_off_stays_deleted,
     tombstones_of_an_owner_that_died_are_removed_when_it_returns].

init_per_testcase(_, Config) -> Config.

end_per_testcase(_, _Config) ->
    %% the test case process recorded its peers (same process as this hook)
    case get(peers) of
        undefined -> ok;
        Peers -> stop_cluster(Peers)
    end,
    ok.

%%% cluster helpers (also used by the etcd suite and the benchmark) --------------

host() -> hd(string:split(net_adm:localhost(), ".")).

%% Starts three peers named after `Base' with `ClusterConf' merged into the
%% cluster configuration; returns [{Node, Peer}] once every node sees all three.
%% Their event logs live in a temporary directory that stop_cluster/1 removes
%% (a restarted node finds its log there, as a restarted node would).
start_cluster(Base, ClusterConf) ->
    Root = filename:join(os:getenv("TMPDIR", "/tmp"), "dspex_cluster_ct_" ++ os:getpid() ++ "_" ++
                             integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Root),
    put(ct_event_root, Root),
    Host = host(),
    %% fixed names: which node owns which session follows from the names, so
    %% the same names give every run the same placement (a name with the OS
    %% pid made the models suite's data, hence its decisions, vary by run)
    Names = [Base ++ "_" ++ X || X <- ["a", "b", "c"]],
    Nodes = [list_to_atom(N ++ "@" ++ Host) || N <- Names],
    Peers = [start_peer(N, Host) || N <- Names],
    Nodes = [N || {N, _} <- Peers],
    [configure(N, P, ClusterConf#{nodes => Nodes}) || {N, P} <- Peers],
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> live(P) =:= Nodes end, Peers) end, 20000, all_live),
    Peers.

start_peer(Name, Host) ->
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    {ok, P, Node} = peer:start(#{name => Name, host => Host, connection => standard_io,
                                 %% (no busy-waiting schedulers: three nodes share this machine's cores)
                                 args => ["-setcookie", "dspex_ct", "-connect_all", "false",
                                          "-kernel", "prevent_overlapping_partitions", "false",
                                          "+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none" | Paths]}),
    {Node, P}.

configure(Node, P, Conf) ->
    ok = peer:call(P, application, load, [dspex_bridge]),
    _ = [ok = peer:call(P, application, set_env, [dspex_bridge, event_dir, filename:join(Root, atom_to_list(Node))])
         || Root <- [get(ct_event_root)], Root =/= undefined],
    ok = peer:call(P, application, set_env, [dspex_bridge, cluster, Conf]),
    %% more application environment for the nodes of a test case (ct_app_env)
    _ = [ok = peer:call(P, application, set_env, [dspex_bridge, K, V]) || {K, V} <- get_env_list()],
    {ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge]),
    ok.

get_env_list() ->
    case get(ct_app_env) of
        undefined -> [];
        L -> L
    end.

%% Starts a node again under the name of one that was killed, with the same
%% configuration (an empty store): it rejoins and resyncs.
restart_node(Node, Peers) ->
    [Name, Host] = string:split(atom_to_list(Node), "@"),
    {Node, P} = start_peer(Name, Host),
    [{_, Other} | _] = [X || {N, _} = X <- Peers, N =/= Node],
    configure(Node, P, peer:call(Other, dspex_cluster_members, config, [])),
    lists:keyreplace(Node, 1, Peers, {Node, P}).

stop_cluster(Peers) ->
    [catch peer:stop(P) || {_, P} <- Peers],
    case erase(ct_event_root) of
        undefined -> ok;
        Root -> _ = file:del_dir_r(Root), ok
    end.

live(P) ->
    case catch peer:call(P, dspex_cluster, cluster_status, []) of
        #{live := L} -> L;
        _ -> undefined
    end.

%% Bounded polling, for states with no event to wait for (another node's view).
wait_until(F, Timeout, What) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    wait_loop(F, Deadline, What).

wait_loop(F, Deadline, What) ->
    case catch F() of
        true -> ok;
        _ ->
            case erlang:monotonic_time(millisecond) < Deadline of
                true -> receive after 20 -> ok end, wait_loop(F, Deadline, What);
                false -> ct:fail({timeout_waiting_for, What})
            end
    end.

peer_of(Node, Peers) -> proplists:get_value(Node, Peers).

%% kill -9 of the node's OS process
kill_node(Node, Peers) ->
    P = peer_of(Node, Peers),
    OsPid = peer:call(P, os, getpid, []),
    [] = os:cmd("kill -9 " ++ OsPid),
    ok.

%% Session S with an integer variable x = 0, created through PA: {Owner, Replica}.
session_with_x(PA, S) ->
    ok = create_with_x(PA, S),
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    {Owner, Rep}.

%% 16 sessions (Prefix followed by 0, 1, ...) that share one owner and one
%% replica set, each with x = 0, created through PA: {Owner, Replicas, Sessions}.
sessions_on_one_link(PA, Prefix) ->
    View = peer:call(PA, dspex_cluster_members, view, []),
    {Owner, Reps} = OR = dspex_cluster_writer:owners(<<Prefix/binary, "0">>, View),
    Ss = same_owners(Prefix, 0, 16, OR, View),
    [ok = create_with_x(PA, S) || S <- Ss],
    {Owner, Reps, Ss}.

create_with_x(PA, S) ->
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    ok.

%% Cuts the third node C off from A and B and keeps it apart (two different
%% wrong cookies: with the same one on both sides the handshake would
%% succeed); returns once every node's view shows the partition.
partition_third([{A, PA}, {B, PB}, {C, PC}]) ->
    [peer:call(PC, erlang, set_cookie, [N, junk_c]) || N <- [A, B]],
    [peer:call(P, erlang, set_cookie, [C, junk_ab]) || P <- [PA, PB]],
    peer:call(PC, erlang, disconnect_node, [A]), peer:call(PC, erlang, disconnect_node, [B]),
    peer:call(PA, erlang, disconnect_node, [C]), peer:call(PB, erlang, disconnect_node, [C]),
    wait_until(fun() -> live(PC) =:= [C] andalso live(PA) =:= [A, B] andalso live(PB) =:= [A, B] end,
               10000, partitioned).

%% Undoes partition_third/1's cookies: the nodes reconnect by themselves.
restore_cookies([{A, PA}, {B, PB}, {C, PC}]) ->
    [peer:call(P, erlang, set_cookie, [N, dspex_ct]) || {P, N} <- [{PC, A}, {PC, B}, {PA, C}, {PB, C}]],
    ok.

%%% the client, running on a peer -------------------------------------------------

%% Writes 1, 2, 3... to `x' of `S', each with the version it last saw as
%% `expected_version', and records what happened.
client_start(S, Ver) -> client_start(S, Ver, infinity).

%% At most `Budget' acknowledged writes (raised by client_more/1), so that
%% every version stays within the variable's history.
client_start(S, Ver, Budget) -> client_start(ct_client, S, <<"x">>, Ver, Budget).

%% A client registered as `Name' writing variable `Key' of `S' (several
%% clients run side by side, each on its own variable).
client_start(Name, S, Key, Ver, Budget) ->
    Pid = spawn(?MODULE, client_loop, [#{s => S, k => Key, i => 1, ver => Ver, log => [], acked => 0, budget => Budget}]),
    register(Name, Pid),
    ok.

%% (the client answers between two writes; one write may wait for the
%% routing deadline, so the bound here is generous, and reaching it fails
%% rather than returning an atom that compares above every number)
client_count() -> client_count(ct_client).

client_count(Name) ->
    Name ! {count, self()},
    receive {count, N} -> N after 60000 -> exit(client_not_answering) end.

client_more(N) -> client_more(ct_client, N).

client_more(Name, N) ->
    Name ! {more, N},
    ok.

client_stop() -> client_stop(ct_client).

client_stop(Name) ->
    Ref = monitor(process, Name),
    Name ! {stop, self()},
    receive {log, L} -> demonitor(Ref, [flush]), L;
            {'DOWN', Ref, _, _, Why} -> {client_died, Why}
    end.

client_loop(#{s := S, k := K, i := I, ver := Ver, log := Log, acked := A, budget := B} = St) ->
    Wait = case A >= B of
               true -> infinity;
               false -> 0
           end,
    receive
        {stop, From} -> From ! {log, lists:reverse(Log)}, exit(normal);
        {count, From} -> From ! {count, A}, client_loop(St);
        {more, N} -> client_loop(St#{budget := B + N})
    after Wait ->
        T = erlang:monotonic_time(microsecond),
        case dspex_store:set(S, K, I, #{expected_version => Ver}) of
            {ok, V} ->
                client_loop(St#{i := I + 1, ver := V, acked := A + 1,
                                log := [{ok, I, V, dspex_cluster:last_write(), T} | Log]});
            {error, {version_mismatch, Cur}} ->
                %% an earlier ambiguous write may have landed: read to know
                client_loop(resolve(St, Cur, T));
            {error, Why} ->
                client_loop(St#{log := [{error, I, Why, T} | Log]})
        end
    end.

resolve(#{s := S, k := K, i := I, ver := Ver, log := Log, acked := A} = St, Cur, T) ->
    case dspex_store:get(S, K) of
        {ok, #{value := I, version := Cur}} when Cur =:= Ver + 1 ->
            St#{i := I + 1, ver := Cur, acked := A + 1, log := [{late, I, Cur, undefined, T} | Log]};
        {ok, #{version := V}} when V < Ver ->
            St#{ver := V, log := [{lost, Ver, V, T} | Log]};
        {ok, #{version := V}} ->
            St#{ver := V, log := [{mismatch, I, Ver, V, T} | Log]};
        Other ->
            St#{log := [{read_error, Other, T} | Log]}
    end.

%% A read in read mode `Mode' and what it was served from (peer:call runs it
%% in a process of its own, so the mode is this call's only).
read_as(Mode, M, F, A) ->
    _ = dspex_cluster:read_mode(Mode),
    R = (catch erlang:apply(M, F, A)),
    {R, dspex_cluster:last_read()}.

%% A registered process on a peer that collects the telemetry events named.
events_start(Name, Events) ->
    Pid = spawn(fun() -> events_loop([]) end),
    register(Name, Pid),
    ok = dspex_telemetry:attach_many({ct_events, Name}, Events, fun ?MODULE:forward_event/4, Pid),
    ok.

forward_event(Event, Measurements, Meta, Pid) ->
    Pid ! {event, Event, Measurements, Meta},
    ok.

events_loop(Acc) ->
    receive
        {event, E, M, Meta} -> events_loop([{E, M, Meta} | Acc]);
        {get, From} -> From ! {events, lists:reverse(Acc)}, events_loop(Acc)
    end.

%% The events collected so far, in order.
events_get(Name) ->
    Name ! {get, self()},
    receive {events, L} -> L end.

catch_apply(M, F, A) ->
    try erlang:apply(M, F, A) catch Class:Reason -> {caught, Class, Reason} end.

%% What a node holds of variable x: {Value, Version} or the error.
node_state(S, Key) ->
    case dspex_cluster:local_apply(get, [S, Key]) of
        {ok, #{value := V, version := Ver}} -> {V, Ver};
        E -> E
    end.

%% Versions continuous, nothing lost, one owner per epoch, epochs never go back.
check_history(Log) ->
    ?assertEqual([], [L || {lost, _, _, _} = L <- Log]),
    ?assertEqual([], [L || {mismatch, _, _, _, _} = L <- Log]),
    Acked = [{I, V, W} || {K, I, V, W, _} <- Log, K =:= ok orelse K =:= late],
    Vs = [V || {_, V, _} <- Acked],
    Is = [I || {I, _, _} <- Acked],
    ?assertEqual(lists:seq(hd(Vs), hd(Vs) + length(Vs) - 1), Vs),
    ?assertEqual(lists:seq(1, length(Is)), Is),
    Ws = [W || {_, _, W} <- Acked, W =/= undefined],
    ByEpoch = lists:foldl(fun({E, N}, M) -> maps:update_with(E, fun(S) -> lists:usort([N | S]) end, [N], M) end,
                          #{}, Ws),
    ?assertEqual([], [{E, Ns} || {E, Ns} <- maps:to_list(ByEpoch), length(Ns) > 1]),
    Es = [E || {E, _} <- Ws],
    ?assertEqual(Es, lists:sort(Es)),
    Acked.

%% Longest pause between two acknowledged writes, in ms.
max_gap(Log) ->
    Ts = [T || {K, _, _, _, T} <- Log, K =:= ok],
    lists:max([0 | [(B - A) div 1000 || {A, B} <- lists:zip(lists:droplast(Ts), tl(Ts))]]).

%%% tests -----------------------------------------------------------------------

kill_owner_sync_loses_no_acknowledged_write(Config) ->
    Peers = start_cluster("dspex_kill", #{replicas => 1, replication => sync}),
    run_kill_test(Peers, [{peers, Peers} | Config]).

%% exported for the etcd suite through check_history/1 and this shape.
%% 16 clients write at once (issue #21: concurrent writes are batched to the
%% replica): 8 on variables x0..x7 of one session and 8 on sessions of their
%% own, all owned by the node killed and replicated to the same node; every
%% client's history is checked.
run_kill_test(Peers, _Config) ->
    put(peers, Peers),
    S = <<"kill_s">>,
    [{N1, P1} | _] = Peers,
    {ok, _} = peer:call(P1, dspex_store, create_session, [S]),
    {ok, Owner} = peer:call(P1, dspex_cluster, owner_of, [S]),
    ct:pal("owner ~p", [Owner]),
    View = peer:call(P1, dspex_cluster_members, view, []),
    {Owner, Reps} = dspex_cluster_writer:owners(S, View),
    Others = same_owners(<<"kill_s_">>, 1, 8, {Owner, Reps}, View),
    Clients = [{client_name(I), S, <<"x", (integer_to_binary(I))/binary>>} || I <- lists:seq(0, 7)]
        ++ [{client_name(8 + J), OS, <<"x">>} || {J, OS} <- lists:zip(lists:seq(0, 7), Others)],
    [{ok, _} = peer:call(P1, dspex_store, create_session, [OS]) || OS <- Others],
    [{ok, _} = peer:call(P1, dspex_store, register, [CS, K, integer, 0, #{history_limit => 10000}])
     || {_, CS, K} <- Clients],
    %% the clients run on the node that is neither owner nor replica, so their
    %% writes are forwarded before and after the failover
    [{ClientNode, CP} | _] = [X || {N, _} = X <- Peers, not lists:member(N, [Owner | Reps])],
    %% 1500 writes each at most until the restart (history_limit 10000 keeps them all)
    [ok = peer:call(CP, ?MODULE, client_start, [Name, CS, K, 0, 1500]) || {Name, CS, K} <- Clients],
    Counts = fun() -> [peer:call(CP, ?MODULE, client_count, [Name]) || {Name, _, _} <- Clients] end,
    ok = wait_until(fun() -> lists:min(Counts()) >= 60 end, 30000, acks_before_kill),
    Before = Counts(),
    ok = kill_node(Owner, Peers),
    ok = wait_until(fun() -> lists:all(fun({B, C}) -> C >= min(B + 60, 1500) end, lists:zip(Before, Counts())) end,
                    30000, acks_after_kill),
    {ok, NewOwner} = peer:call(CP, dspex_cluster, owner_of, [S]),
    ?assertNotEqual(Owner, NewOwner),
    %% the killed node comes back empty: it rejoins, and where it is the
    %% sessions' owner again it first resyncs from the others
    Peers2 = restart_node(Owner, Peers),
    put(peers, Peers2),
    Nodes = [N || {N, _} <- Peers2],
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> live(P) =:= Nodes end, Peers2) end, 20000, rejoined),
    After = Counts(),
    [ok = peer:call(CP, ?MODULE, client_more, [Name, 300]) || {Name, _, _} <- Clients],
    ok = wait_until(fun() -> lists:all(fun({A, C}) -> C >= A + 30 end, lists:zip(After, Counts())) end, 30000,
                    acks_after_rejoin),
    Logs = [peer:call(CP, ?MODULE, client_stop, [Name]) || {Name, _, _} <- Clients],
    {ok, CurOwner} = peer:call(CP, dspex_cluster, owner_of, [S]),
    Results = [check_client(CP, Peers2, CS, K, Log) || {{_, CS, K}, Log} <- lists:zip(Clients, Logs)],
    ct:pal("kill test: 16 clients, ~p acknowledged writes (per client ~p), owners ~p -> ~p -> (after the restart) ~p, "
           "longest pause ~p ms, client errors ~p (~p acks at the kill, ~p at the restart)",
           [lists:sum([A || {A, _, _} <- Results]), [A || {A, _, _} <- Results], Owner, NewOwner, CurOwner,
            lists:max([G || {_, G, _} <- Results]), lists:append([E || {_, _, E} <- Results]),
            lists:sum(Before), lists:sum(After)]),
    _ = ClientNode, _ = N1,
    {comment, io_lib:format("16 clients, failover pause ~p ms, ~p acked",
                            [lists:max([G || {_, G, _} <- Results]), lists:sum([A || {A, _, _} <- Results])])}.

client_name(I) -> list_to_atom("ct_client_" ++ integer_to_list(I)).

%% `N' sessions `Prefix'I with the same owner and replicas as `OwnerReps'.
same_owners(_, _, 0, _, _) -> [];
same_owners(Prefix, I, N, OwnerReps, View) ->
    S = <<Prefix/binary, (integer_to_binary(I))/binary>>,
    case dspex_cluster_writer:owners(S, View) of
        OwnerReps -> [S | same_owners(Prefix, I + 1, N - 1, OwnerReps, View)];
        _ -> same_owners(Prefix, I + 1, N, OwnerReps, View)
    end.

%% One kill-test client's log: the history is consistent, and every
%% acknowledged write is on the session's current owner: the last as current
%% value, the others in its history with the same version. Returns
%% {acknowledged, longest pause in ms, errors}.
check_client(CP, Peers, S, K, Log) ->
    Acked = check_history(Log),
    {LastI, LastV, _} = lists:last(Acked),
    {ok, CurOwner} = peer:call(CP, dspex_cluster, owner_of, [S]),
    NP = peer_of(CurOwner, Peers),
    ?assertEqual({LastI, LastV}, peer:call(NP, ?MODULE, node_state, [S, K])),
    {ok, H} = peer:call(NP, dspex_cluster, local_apply, [history, [S, K, all]]),
    Hist = maps:from_list([{V, Val} || #{version := V, value := Val} <- H]),
    ?assertEqual([], [{I, V} || {I, V, _} <- Acked, V =/= LastV, maps:get(V, Hist, missing) =/= I]),
    Epochs = lists:usort([E || {ok, _, _, {E, _}, _} <- Log]),
    ?assert(length(Epochs) >= 2),
    Errors = [Why || {error, _, Why, _} <- Log],
    %% only documented retry errors while the owner died, and no write ran
    %% into the routing deadline (`{unavailable, _}': routing that did not
    %% converge). How long the pause was is measured by `make bench'
    %% (dspex_cluster_bench), not asserted here: it depends on the machine's load.
    ?assertEqual([], [E || E <- Errors, not is_retry(E)]),
    ?assertEqual([], [E || {unavailable, _} = E <- Errors]),
    {length(Acked), max_gap(Log), Errors}.

dedup([X, X | T]) -> dedup([X | T]);
dedup([X | T]) -> [X | dedup(T)];
dedup([]) -> [].

is_retry({retry, _}) -> true;
is_retry({unavailable, _}) -> true;
is_retry(_) -> false.

minority_refuses_writes_and_heals(Config) ->
    Peers = start_cluster("dspex_part", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{A, PA}, {B, PB}, {C, PC}] = Peers,
    Ss = [<<"part_", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 12)],
    [begin
         {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
         {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 1])
     end || S <- Ss],
    %% a client on A keeps writing a session owned by C through the partition
    %% and the healing
    [Load | _] = [X || I <- lists:seq(1, 1000), X <- [<<"part_load", (integer_to_binary(I))/binary>>],
                       peer:call(PA, dspex_cluster, owner_of, [X]) =:= {ok, C}],
    {ok, _} = peer:call(PA, dspex_store, create_session, [Load]),
    {ok, _} = peer:call(PA, dspex_store, register, [Load, x, integer, 0, #{history_limit => 10000}]),
    %% a session owned by C that the majority deletes during the partition
    [Del | _] = [X || I <- lists:seq(1, 1000), X <- [<<"part_del", (integer_to_binary(I))/binary>>],
                      peer:call(PA, dspex_cluster, owner_of, [X]) =:= {ok, C}],
    {ok, _} = peer:call(PA, dspex_store, create_session, [Del]),
    {ok, _} = peer:call(PA, dspex_store, register, [Del, x, integer, 0]),
    ok = peer:call(PA, ?MODULE, client_start, [Load, 0]),
    Count = fun() -> peer:call(PA, ?MODULE, client_count, []) end,
    ok = wait_until(fun() -> Count() >= 200 end, 30000, load_before_partition),
    %% partition C from A and B
    ok = partition_third(Peers),
    %% the minority refuses every write, the majority accepts every write
    [?assertEqual({error, no_quorum}, peer:call(PC, dspex_store, set, [S, x, 100])) || S <- Ss],
    [?assertMatch({ok, 1}, peer:call(PA, dspex_store, set, [S, x, 2])) || S <- Ss],
    ?assertEqual({error, no_quorum}, peer:call(PC, dspex_store, create_session, [<<"part_new">>])),
    %% reads: the minority serves its copy marked stale, or refuses in majority
    %% mode; the majority serves the current value
    HeldByC = [S || S <- Ss, peer:call(PC, ?MODULE, node_state, [S, <<"x">>]) =:= {1, 0}],
    ?assertNotEqual([], HeldByC),
    [begin
         ?assertMatch({{ok, 1}, #{status := stale, node := C, reason := no_quorum}},
                      peer:call(PC, ?MODULE, read_as, [any, dspex_store, get_value, [S, x]])),
         ?assertMatch({{error, no_quorum}, _}, peer:call(PC, ?MODULE, read_as, [majority, dspex_store, get_value, [S, x]])),
         ?assertMatch({{error, no_quorum}, _}, peer:call(PC, ?MODULE, read_as, [majority, dspex_graph, dependencies, [S, x]]))
     end || S <- HeldByC],
    [?assertMatch({{ok, 2}, #{status := current}},
                  peer:call(PB, ?MODULE, read_as, [majority, dspex_store, get_value, [S, x]])) || S <- Ss],
    [?assertMatch({ok, #{status := stale, node := C, reason := no_quorum}}, peer:call(PC, dspex_cluster, read_status, [S]))
     || S <- Ss],
    [?assertMatch({ok, #{status := current}}, peer:call(PA, dspex_cluster, read_status, [S])) || S <- Ss],
    ?assertMatch({{error, no_quorum}, _}, peer:call(PC, ?MODULE, read_as, [majority, dspex_cluster, read_status, [hd(Ss)]])),
    ?assertEqual(ok, peer:call(PA, dspex_store, delete_session, [Del])),
    ?assertMatch({ok, _}, peer:call(PC, dspex_cluster, local_apply, [get_session, [Del]])),
    N1 = Count(),
    ok = wait_until(fun() -> Count() >= N1 + 200 end, 30000, load_during_partition),
    %% heal
    ok = restore_cookies(Peers),
    Nodes = [A, B, C],
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> live(P) =:= Nodes end, Peers) end, 20000, healed),
    %% ownership settles on the heal, not on access: no session (the Ss are not
    %% touched here) stays listed as owned on two nodes
    All = lists:sort([Load | Ss]),
    Listed = fun() -> lists:sort([X || {_, P} <- Peers, X <- peer:call(P, dspex_cluster, owned_sessions, []),
                                       lists:member(X, All)]) end,
    ok = wait_until(fun() -> Listed() =:= All end, 20000, one_owner_listed_per_session),
    %% the deletion made by the majority is newer than C's copy: settling the
    %% ownership does not bring the session back
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> peer:call(P, dspex_cluster, local_apply, [get_session, [Del]])
                                                          =:= {error, session_not_found} end, Peers) end,
                    20000, deleted_session_stays_deleted),
    ?assertEqual({error, session_not_found}, peer:call(PC, dspex_store, get_session, [Del])),
    N2 = Count(),
    ok = wait_until(fun() -> Count() >= N2 + 200 end, 30000, load_after_heal),
    Log = peer:call(PA, ?MODULE, client_stop, []),
    Acked = check_history(Log),
    LoadOwners = [N || {ok, _, _, {_, N}, _} <- Log],
    %% C owned it, the majority took over, C took it back after healing
    ?assertEqual(C, hd(LoadOwners)),
    ?assertEqual(C, lists:last(LoadOwners)),
    ?assert(lists:member(A, LoadOwners) orelse lists:member(B, LoadOwners)),
    Errors = [Why || {error, _, Why, _} <- Log],
    ct:pal("partition under load: ~p acked, owners in order ~p, client errors ~p, longest pause ~p ms",
           [length(Acked), dedup(LoadOwners), Errors, max_gap(Log)]),
    ?assertEqual([], [E || E <- Errors, not is_retry(E)]),
    {LastI, LastV, _} = lists:last(Acked),
    ?assertEqual({LastI, LastV}, peer:call(PC, ?MODULE, node_state, [Load, <<"x">>])),
    %% one owner for each session, every node agrees; writes from the old
    %% minority work; owner and replica converge on the majority's data
    [begin
         Owners = lists:usort([peer:call(P, dspex_cluster, owner_of, [S]) || {_, P} <- Peers]),
         ?assertMatch([{ok, _}], Owners),
         ?assertEqual({ok, 2}, peer:call(PB, dspex_store, get_value, [S, x])),
         ?assertEqual({ok, 2}, peer:call(PC, dspex_store, set, [S, x, 3])),
         [{ok, Owner}] = Owners,
         View = peer:call(peer_of(Owner, Peers), dspex_cluster_members, view, []),
         {Owner, Reps} = dspex_cluster_writer:owners(S, View),
         [?assertEqual({3, 2}, peer:call(peer_of(N, Peers), ?MODULE, node_state, [S, <<"x">>])) || N <- [Owner | Reps]]
     end || S <- Ss],
    Config.

migrate_and_drain_under_load(Config) ->
    Peers = start_cluster("dspex_mig", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{_A, PA} | _] = Peers,
    S = <<"mig_s">>,
    Others = [<<"mig_", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 10)],
    [begin
         {ok, _} = peer:call(PA, dspex_store, create_session, [X]),
         {ok, _} = peer:call(PA, dspex_store, register, [X, x, integer, 7])
     end || X <- Others],
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0, #{history_limit => 10000}]),
    {ok, Owner0} = peer:call(PA, dspex_cluster, owner_of, [S]),
    [{_, CP} | _] = Peers,
    ok = peer:call(CP, ?MODULE, client_start, [S, 0]),
    Count = fun() -> peer:call(CP, ?MODULE, client_count, []) end,
    ok = wait_until(fun() -> Count() >= 100 end, 30000, acks_1),
    %% migrate to a node that is not the owner
    [Target | _] = [N || {N, _} <- Peers, N =/= Owner0],
    {ok, #{epoch := _}} = peer:call(PA, dspex_cluster, migrate_session, [S, Target]),
    [?assertEqual({ok, Target}, peer:call(P, dspex_cluster, owner_of, [S])) || {_, P} <- Peers],
    N1 = Count(),
    ok = wait_until(fun() -> Count() >= N1 + 100 end, 30000, acks_2),
    %% drain the new owner: it must own nothing afterwards
    {ok, _} = peer:call(PA, dspex_cluster, drain, [Target]),
    ok = peer:call(PA, dspex_cluster, await_drained, [Target, 10000]),
    ?assertEqual([], peer:call(peer_of(Target, Peers), dspex_cluster, owned_sessions, [])),
    %% nor does it hold any copy: it can be stopped at once
    ?assertEqual([], peer:call(peer_of(Target, Peers), dspex_store, list_sessions, [])),
    [?assertNotEqual({ok, Target}, peer:call(P, dspex_cluster, owner_of, [X])) || {_, P} <- Peers, X <- [S | Others]],
    N2 = Count(),
    ok = wait_until(fun() -> Count() >= N2 + 100 end, 30000, acks_3),
    ok = peer:call(PA, dspex_cluster, undrain, [Target]),
    N3 = Count(),
    ok = wait_until(fun() -> Count() >= N3 + 50 end, 30000, acks_4),
    Log = peer:call(CP, ?MODULE, client_stop, []),
    Acked = check_history(Log),
    Errors = [Why || {error, _, Why, _} <- Log],
    ct:pal("migration/drain: ~p acked, client errors ~p, longest pause ~p ms", [length(Acked), Errors, max_gap(Log)]),
    ?assertEqual([], [E || E <- Errors, not is_retry(E)]),
    %% the other sessions kept their data through the drain
    [?assertEqual({ok, 7}, peer:call(P, dspex_store, get_value, [X, x])) || {_, P} <- Peers, X <- Others],
    Config.

locks_released_and_old_token_rejected_after_failover(Config) ->
    Peers = start_cluster("dspex_lock", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"lock_s">>,
    {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [S]),
    PO = peer_of(Owner, Peers),
    %% the future owner (S's replica) grants a lock first, on a session it owns:
    %% its token counter starts from an earlier clock than the old owner's, so
    %% without raising it at takeover its next token would be lower
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PR = peer_of(Rep, Peers),
    [S2 | _] = [X || I <- lists:seq(1, 1000), X <- [<<"lock_r", (integer_to_binary(I))/binary>>],
                     peer:call(PA, dspex_cluster, owner_of, [X]) =:= {ok, Rep}],
    {ok, _} = peer:call(PA, dspex_store, create_session, [S2]),
    {ok, _} = peer:call(PA, dspex_store, register, [S2, y, integer, 0]),
    {ok, Early} = peer:call(PR, dspex_locks, acquire, [S2, y, opt0, #{pid => peer:call(PR, erlang, whereis, [init])}]),
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    %% the lock is held by a process on the owner node
    {ok, Lock} = peer:call(PO, dspex_locks, acquire, [S, x, opt1, #{pid => peer:call(PO, erlang, whereis, [init])}]),
    ?assertEqual({ok, 1}, peer:call(PO, dspex_store, set, [S, x, 1, #{lock => Lock}])),
    [{_, PC} | _] = [X || {N, _} = X <- Peers, N =/= Owner],
    ?assertMatch({error, {locked, _}}, peer:call(PC, dspex_store, set, [S, x, 2])),
    ok = kill_node(Owner, Peers),
    ok = wait_until(fun() -> not lists:member(Owner, live(PC)) end, 10000, owner_gone),
    %% the pre-failover token is refused; the lock itself is gone
    ?assertEqual({error, stale_lock}, peer:call(PC, dspex_store, set, [S, x, 2, #{lock => Lock}])),
    ?assertEqual({ok, 2}, peer:call(PC, dspex_store, set, [S, x, 2])),
    {ok, NewOwner} = peer:call(PC, dspex_cluster, owner_of, [S]),
    PN = peer_of(NewOwner, Peers),
    {ok, Lock2} = peer:call(PN, dspex_locks, acquire, [S, x, opt2, #{pid => peer:call(PN, erlang, whereis, [init])}]),
    ?assert(maps:get(token, Early) < maps:get(token, Lock)),
    ?assert(maps:get(token, Lock2) > maps:get(token, Lock)),
    %% a write with the old token while the new lock is held is stale too
    ?assertEqual({error, stale_lock}, peer:call(PN, dspex_store, set, [S, x, 3, #{lock => Lock}])),
    ?assertEqual({ok, 3}, peer:call(PN, dspex_store, set, [S, x, 3, #{lock => Lock2}])),
    Config.

async_replication_converges(Config) ->
    Peers = start_cluster("dspex_async", #{replicas => 2, replication => async}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"async_s">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    [?assertEqual({ok, I}, peer:call(PA, dspex_store, set, [S, x, I])) || I <- lists:seq(1, 200)],
    %% with R = 2 every node holds a copy; async copies catch up
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> peer:call(P, ?MODULE, node_state, [S, <<"x">>]) =:= {200, 200} end,
                                       Peers) end, 10000, async_converged),
    %% a caller's type error raises badarg in the caller, on the owner or
    %% forwarded, and leaves the cluster processes running
    Writers = [peer:call(P, erlang, whereis, [dspex_cluster_writer:name(S)]) || {_, P} <- Peers],
    [begin
         ?assertEqual({caught, error, badarg}, peer:call(P, ?MODULE, catch_apply, [dspex_store, set, [S, x, 1, not_a_map]])),
         ?assertEqual({caught, error, badarg}, peer:call(P, ?MODULE, catch_apply, [dspex_store, get, [S, 42]]))
     end || {_, P} <- Peers],
    ?assertEqual(Writers, [peer:call(P, erlang, whereis, [dspex_cluster_writer:name(S)]) || {_, P} <- Peers]),
    ?assertEqual({ok, 201}, peer:call(PA, dspex_store, set, [S, x, 201])),
    Config.

%% Local (no peers): removing a node moves only the sessions it owned (to
%% their replica), ownership spreads over the nodes, pins win while eligible.
rendezvous_is_stable_and_spreads(_Config) ->
    V = #{eligible => [a@h, b@h, c@h], overrides => #{}, replicas => 1},
    Ss = [integer_to_binary(I) || I <- lists:seq(1, 3000)],
    Before = [{S, dspex_cluster_writer:owners(S, V)} || S <- Ss],
    Counts = lists:foldl(fun({_, {O, _}}, M) -> maps:update_with(O, fun(C) -> C + 1 end, 1, M) end, #{}, Before),
    [?assert(C > 800) || C <- maps:values(Counts)],
    [?assertNotEqual(O, R) || {_, {O, [R]}} <- Before],
    V2 = V#{eligible := [a@h, c@h]},
    [?assertEqual(case O of b@h -> R; _ -> O end, element(1, dspex_cluster_writer:owners(S, V2)))
     || {S, {O, [R]}} <- Before],
    ?assertEqual({c@h, [a@h]}, dspex_cluster_writer:owners(<<"1">>, V2#{overrides := #{<<"1">> => c@h}})),
    ?assertEqual(element(1, dspex_cluster_writer:owners(<<"1">>, V2)),
                 element(1, dspex_cluster_writer:owners(<<"1">>, V2#{overrides := #{<<"1">> => b@h}}))),
    ?assertEqual(none, dspex_cluster_writer:owners(<<"1">>, V#{eligible := []})).

%% Without configuration the store runs locally and the cluster API says so.
no_configuration_means_no_routing(_Config) ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    try
        ?assertEqual(false, dspex_cluster:enabled()),
        ?assertEqual({error, not_clustered}, dspex_cluster:owner_of(<<"s">>)),
        ?assertEqual({error, not_clustered}, dspex_cluster:cluster_status()),
        ?assertEqual([], supervisor:which_children(dspex_cluster_sup)),
        {ok, _} = dspex_store:create_session(<<"nocluster">>),
        {ok, _} = dspex_store:register(<<"nocluster">>, x, integer, 1),
        ?assertEqual({ok, 1}, dspex_store:set(<<"nocluster">>, x, 2)),
        ?assertEqual(undefined, dspex_cluster:last_write())
    after
        application:stop(dspex_bridge)
    end.

%% A session only read (on its owner) outlives its TTL on the replica too, and
%% when the owner's sweeper expires it the replica's copy goes as well.
replica_copies_live_and_expire_with_the_owner(_Config) ->
    Peers = start_cluster("dspex_ttl", #{replicas => 1, replication => sync, keepalive_ms => 300}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"ttl_s">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S, #{ttl => 2}]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 5]),
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    ?assertEqual({5, 0}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    %% reads on the owner for twice the TTL: time passing is what is tested here
    [begin {ok, 5} = peer:call(PO, dspex_store, get_value, [S, x]), timer:sleep(200) end || _ <- lists:seq(1, 20)],
    ?assertEqual({5, 0}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    %% no more reads: the owner expires it, and the replica's copy follows
    %% (listing sessions does not refresh them; reading would)
    Held = fun(P) -> lists:member(S, peer:call(P, dspex_store, list_sessions, [])) end,
    ok = wait_until(fun() -> not Held(PR) end, 15000, replica_copy_expired),
    ?assertNot(Held(PO)),
    ?assertEqual({error, session_not_found}, peer:call(PA, dspex_store, get_session, [S])).

%%% forwarded graph, access control, locks and watches -----------------------------

%% The derive function of the test's derived variable.
sum_values(Values) -> lists:sum(maps:values(Values)).

%% A long-lived process on a peer (peer:call runs each call in a process of
%% its own): it runs calls as itself and keeps the watch messages it gets.
holder_start(Name) ->
    Pid = spawn(fun holder_loop/0),
    register(Name, Pid),
    Pid.

holder_loop() ->
    receive
        {run, From, M, F, A} ->
            From ! {self(), catch erlang:apply(M, F, A)},
            holder_loop();
        {take, From, Timeout} ->
            Msg = receive
                      {dspex_variable, _, _, _, _, _, _} = V -> V;
                      {dspex_watch_lost, _, _} = L -> L
                  after Timeout -> timeout
                  end,
            From ! {self(), Msg},
            holder_loop()
    end.

holder_stop(Name) ->
    Pid = whereis(Name),
    Ref = monitor(process, Pid),
    exit(Pid, kill),
    receive {'DOWN', Ref, _, _, _} -> ok end.

run_as(Name, M, F, A) ->
    Pid = whereis(Name),
    Pid ! {run, self(), M, F, A},
    receive {Pid, R} -> R end.

%% Runs M:F(A) in a new process registered as Tag, which keeps the result
%% for await_result/2 (a call that blocks, such as a waiting acquire).
%% A process collecting every message sent to `Name' (see collected/1).
collector_start(Name) ->
    register(Name, spawn(fun() -> collector_loop([]) end)),
    ok.

collector_loop(Acc) ->
    receive
        {collected, From} -> From ! {self(), lists:reverse(Acc)}, collector_loop(Acc);
        M -> collector_loop([M | Acc])
    end.

collected(Name) ->
    Pid = whereis(Name),
    Pid ! {collected, self()},
    receive {Pid, L} -> L end.

%% M:F(A) in a new process, its result sent to `Name' as `{Tag, Result}'.
spawn_to(Name, Tag, M, F, A) ->
    _ = spawn(fun() -> Name ! {Tag, catch erlang:apply(M, F, A)} end),
    ok.

spawn_call(Tag, M, F, A) ->
    Pid = spawn(fun() ->
                        R = (catch erlang:apply(M, F, A)),
                        put(dspex_ct_result_ready, true),
                        receive {result, From} -> From ! {self(), R} end
                end),
    register(Tag, Pid),
    ok.

%% Whether the process spawn_call/4 registered as `Tag' has its result.
has_result(Tag) ->
    {dictionary, D} = process_info(whereis(Tag), dictionary),
    proplists:get_value(dspex_ct_result_ready, D, false).

await_result(Tag, Timeout) ->
    Pid = whereis(Tag),
    Pid ! {result, self()},
    receive {Pid, R} -> R after Timeout -> timeout end.

%% The next watch message the holder got (waiting at most Timeout ms).
holder_take(Name, Timeout) ->
    Pid = whereis(Name),
    Pid ! {take, self(), Timeout},
    receive {Pid, R} -> R end.

%% Everything is called on the node that is neither owner nor replica of the
%% session: graph changes, a derived variable, access rules, a lock (held by a
%% process of that node) and watches reach the owner; after the owner is
%% killed the new owner has the dependencies, rules and derive function, and
%% the watcher is told its watch was lost.
graph_acl_locks_and_watches_reach_the_owner(Config) ->
    Peers = start_cluster("dspex_fwd", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fwd_s">>,
    [{_, PA} | _] = Peers,
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    [{C, PC}] = [X || {N, _} = X <- Peers, not lists:member(N, [Owner, Rep])],
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    Call = fun(M, F, A) -> peer:call(PC, M, F, A) end,
    Here = fun(P, M, F, A) -> peer:call(P, dspex_cluster, local_apply, [M, F, A]) end,
    {ok, _} = Call(dspex_store, create_session, [S]),
    {ok, _} = Call(dspex_store, register, [S, x, integer, 1]),
    {ok, _} = Call(dspex_store, register, [S, y, integer, 2]),
    %% graph: the edge is on the owner and its replica, never on C
    ?assertEqual(ok, Call(dspex_graph, add_dependency, [S, x, y])),
    ?assertEqual({ok, [<<"x">>]}, Call(dspex_graph, dependencies, [S, y])),
    ?assertEqual({ok, [<<"x">>]}, Here(PO, dspex_graph, dependencies, [S, y])),
    ?assertEqual({ok, [<<"x">>]}, Here(PR, dspex_graph, dependencies, [S, y])),
    ?assertEqual({error, session_not_found}, Here(PC, dspex_graph, dependencies, [S, y])),
    ?assertMatch({error, {would_create_cycle, _}}, Call(dspex_graph, add_dependency, [S, y, x])),
    %% a derived variable defined from C is computed by the owner's propagator
    {ok, _} = Call(dspex_graph, define_derived, [S, z, integer, [x, y], {?MODULE, sum_values}]),
    ?assertEqual({ok, 3}, Call(dspex_store, get_value, [S, z])),
    ?assert(is_pid(peer:call(PO, dspex_propagator, whereis_session, [S]))),
    ?assertEqual(undefined, peer:call(PC, dspex_propagator, whereis_session, [S])),
    ?assertMatch({ok, _}, Call(dspex_store, set, [S, x, 10, #{propagate => sync}])),
    ?assertEqual({ok, 12}, Call(dspex_store, get_value, [S, z])),
    %% recomputed once, by the owner only (the replica's propagator is idle),
    %% and the recomputation is replicated
    ?assertEqual({12, 1}, peer:call(PO, ?MODULE, node_state, [S, <<"z">>])),
    ?assertEqual({12, 1}, peer:call(PR, ?MODULE, node_state, [S, <<"z">>])),
    %% access rules
    Rule = #{session_pattern => <<"other*">>, permissions => [read]},
    ?assertEqual(ok, Call(dspex_acl, set_permissions, [S, x, [Rule]])),
    ?assertMatch({ok, [#{session_pattern := <<"other*">>}]}, Call(dspex_acl, get_permissions, [S, x])),
    ?assertMatch({ok, [_]}, Here(PR, dspex_acl, get_permissions, [S, x])),
    ?assertEqual(ok, Call(dspex_acl, check_access, [S, x, <<"other_1">>, read, #{}])),
    ?assertEqual({error, access_denied}, Call(dspex_acl, check_access, [S, x, <<"other_1">>, write, #{}])),
    ?assertEqual({ok, [<<"x">>]}, Call(dspex_acl, filter_accessible, [S, <<"other_1">>, read])),
    ?assertMatch({ok, #{value := 10}}, Call(dspex_store, get, [S, x, #{as => <<"other_1">>}])),
    %% locks: held by a process on C, kept by the owner's lock server
    H1 = peer:call(PC, ?MODULE, holder_start, [h1]),
    H2 = peer:call(PC, ?MODULE, holder_start, [h2]),
    {ok, L1} = peer:call(PC, ?MODULE, run_as, [h1, dspex_locks, acquire, [S, x, opt1, #{}]]),
    ?assertEqual(H1, maps:get(pid, L1)),
    ?assertMatch([#{optimizer := opt1}], [A || #{session := AS} = A <- peer:call(PO, dspex_locks, active, []), AS =:= S]),
    ?assertEqual([], peer:call(PC, dspex_locks, active, [])),
    ?assertEqual({error, {locked, opt1}}, Call(dspex_store, set, [S, x, 20])),
    ?assertEqual({ok, 2}, Call(dspex_store, set, [S, x, 20, #{lock => L1}])),
    ?assertMatch({ok, #{locked := true, optimizer := opt1}}, Call(dspex_locks, status, [S, x])),
    ?assertEqual(ok, peer:call(PC, ?MODULE, run_as, [h1, dspex_locks, report_progress, [L1, 1, 21, #{}]])),
    ?assertEqual({error, not_lock_owner}, Call(dspex_locks, release, [L1])),
    ?assertEqual(ok, peer:call(PC, ?MODULE, run_as, [h1, dspex_locks, release, [L1]])),
    ?assertMatch({ok, #{locked := false}}, Call(dspex_locks, status, [S, x])),
    %% the holder's death on C frees the lock on the owner: a waiter is granted
    {ok, L2} = peer:call(PC, ?MODULE, run_as, [h1, dspex_locks, acquire, [S, x, opt2, #{}]]),
    ok = peer:call(PC, ?MODULE, holder_stop, [h1]),
    {ok, L3} = peer:call(PC, ?MODULE, run_as, [h2, dspex_locks, acquire, [S, x, opt3, #{timeout => 5000}]]),
    ?assert(maps:get(token, L3) > maps:get(token, L2)),
    ?assertEqual(ok, peer:call(PC, ?MODULE, run_as, [h2, dspex_locks, release, [L3]])),
    %% watches from C deliver the owner's commits; unwatch reaches the owner
    Ref = Call(dspex_store, watch, [S, [x], H2]),
    ?assert(is_reference(Ref)),
    RefY = Call(dspex_store, watch, [S, [y], H2]),
    {ok, #{watchers := WY}} = Here(PO, dspex_store, info, [S, y]),
    ?assertEqual(ok, Call(dspex_store, unwatch, [RefY])),
    ?assertMatch({ok, #{watchers := W}} when W =:= WY - 1, Here(PO, dspex_store, info, [S, y])),
    {ok, V30} = peer:call(PO, dspex_store, set, [S, x, 30]),
    ?assertMatch({dspex_variable, Ref, S, <<"x">>, 20, 30, #{version := V30}}, peer:call(PC, ?MODULE, holder_take, [h2, 30000], 40000)),
    {ok, _} = peer:call(PO, dspex_store, set, [S, y, 5]),
    {ok, V31} = Call(dspex_store, set, [S, x, 31]),
    ?assertMatch({dspex_variable, Ref, S, <<"x">>, 30, 31, #{version := V31}}, peer:call(PC, ?MODULE, holder_take, [h2, 30000], 40000)),
    %% a lock waiter on C whose owner dies is told to retry
    {ok, _} = peer:call(PC, ?MODULE, run_as, [h2, dspex_locks, acquire, [S, y, opt4, #{}]]),
    ok = peer:call(PC, ?MODULE, spawn_call, [w4, dspex_locks, acquire, [S, y, opt5, #{}]]),
    ok = wait_until(fun() -> maps:get(waiters, element(2, Call(dspex_locks, status, [S, y]))) =:= 1 end, 5000, lock_waiter),
    %% the owner dies: the watcher is told, the new owner has everything
    ok = kill_node(Owner, Peers),
    ?assertEqual({error, {retry, owner_down}}, peer:call(PC, ?MODULE, await_result, [w4, 30000], 40000)),
    ?assertEqual({dspex_watch_lost, Ref, S}, peer:call(PC, ?MODULE, holder_take, [h2, 30000], 40000)),
    ok = wait_until(fun() -> not lists:member(Owner, live(PC)) end, 10000, owner_gone),
    {ok, NewOwner} = Call(dspex_cluster, owner_of, [S]),
    ?assertEqual(Rep, NewOwner),
    ?assertEqual({ok, [<<"x">>]}, Call(dspex_graph, dependencies, [S, y])),
    {ok, ZDeps} = Call(dspex_graph, dependencies, [S, z]),
    ?assertEqual([<<"x">>, <<"y">>], lists:sort(ZDeps)),
    ?assertMatch({ok, [#{session_pattern := <<"other*">>}]}, Call(dspex_acl, get_permissions, [S, x])),
    ?assertEqual({error, access_denied}, Call(dspex_acl, check_access, [S, x, <<"other_1">>, write, #{}])),
    ?assertMatch({ok, [_]}, Here(PR, dspex_acl, get_permissions, [S, x])),
    %% the derive function came along: the new owner recomputes
    ?assertMatch({ok, _}, Call(dspex_store, set, [S, x, 40, #{propagate => sync}])),
    ?assertEqual({ok, 45}, Call(dspex_store, get_value, [S, z])),
    %% watching again goes to the new owner
    Ref2 = Call(dspex_store, watch, [S, [x], H2]),
    {ok, V41} = peer:call(PR, dspex_store, set, [S, x, 41]),
    ?assertMatch({dspex_variable, Ref2, S, <<"x">>, 40, 41, #{version := V41}}, peer:call(PC, ?MODULE, holder_take, [h2, 30000], 40000)),
    _ = C,
    Config.

%% Ownership moving without a node dying (a migration fences the old owner):
%% the watcher is told once, and a new watch follows the new owner; unwatch
%% from another node removes the owner's watch.
watch_is_lost_once_when_the_session_migrates(Config) ->
    Peers = start_cluster("dspex_wmig", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"wmig_s">>,
    [{_, PA} | _] = Peers,
    {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [S]),
    [{W, PW} | _] = [X || {N, _} = X <- Peers, N =/= Owner],
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    H = peer:call(PW, ?MODULE, holder_start, [hw]),
    Ref = peer:call(PW, dspex_store, watch, [S, [x], H]),
    {ok, 1} = peer:call(PA, dspex_store, set, [S, x, 1]),
    ?assertMatch({dspex_variable, Ref, S, <<"x">>, 0, 1, #{version := 1}}, peer:call(PW, ?MODULE, holder_take, [hw, 30000], 40000)),
    %% the watcher's own node takes the session over
    {ok, _} = peer:call(PA, dspex_cluster, migrate_session, [S, W]),
    ?assertEqual({dspex_watch_lost, Ref, S}, peer:call(PW, ?MODULE, holder_take, [hw, 30000], 40000)),
    Ref2 = peer:call(PW, dspex_store, watch, [S, [x], H]),
    ?assertEqual(W, node(Ref2)),
    {ok, 2} = peer:call(peer_of(Owner, Peers), dspex_store, set, [S, x, 2]),
    %% the next message is the change, not a second loss notice
    ?assertMatch({dspex_variable, Ref2, S, <<"x">>, 1, 2, #{version := 2}}, peer:call(PW, ?MODULE, holder_take, [hw, 30000], 40000)),
    %% a watch from the old owner's node on the new owner, ended from there
    Ref3 = peer:call(peer_of(Owner, Peers), dspex_store, watch, [S, [x], H]),
    {ok, #{watchers := N}} = peer:call(PW, dspex_cluster, local_apply, [info, [S, x]]),
    ?assertEqual(ok, peer:call(peer_of(Owner, Peers), dspex_store, unwatch, [Ref3])),
    ?assertMatch({ok, #{watchers := M}} when M =:= N - 1, peer:call(PW, dspex_cluster, local_apply, [info, [S, x]])),
    ?assertEqual(ok, peer:call(PA, dspex_store, unwatch, [Ref3])),   % idempotent
    Config.

%% Issue #14: the replica that is to become the owner learns of the owner's
%% death after the client's node does (its membership server is suspended):
%% meanwhile it answers that the dead node is the owner. The routing must not
%% wait for a view change of its own that already happened (it used to, until
%% the deadline: 8 s, then `{unavailable, owner_down}'): with a routing
%% deadline of 3 s, the first write after the kill succeeds once the lagging
%% view catches up. (The deadline covers the test's own polling before it
%% resumes the lagging server, tens of ms, and the takeover after it, under
%% 0.3 s on a loaded machine: 3 s leaves room for load, and without the fix
%% the write fails at whatever the deadline is.)
failover_converges_when_the_new_owner_lags(Config) ->
    Peers = start_cluster("dspex_lag", #{replicas => 1, replication => sync, route_deadline_ms => 3000}),
    put(peers, Peers),
    S = <<"lag_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    [{_, PC}] = [X || {N, _} = X <- Peers, not lists:member(N, [Owner, Rep])],
    PR = peer_of(Rep, Peers),
    ?assertEqual({ok, 1}, peer:call(PC, dspex_store, set, [S, x, 1])),
    ok = peer:call(PC, ?MODULE, events_start, [ct_route, [[dspex, cluster, route, retry]]]),
    ok = peer:call(PR, sys, suspend, [dspex_cluster_members]),
    ok = kill_node(Owner, Peers),
    %% the client's node knows; the replica's view still names the dead owner
    ok = wait_until(fun() -> not lists:member(Owner, live(PC)) end, 10000, client_view_updated),
    ?assert(lists:member(Owner, live(PR))),
    ok = peer:call(PC, ?MODULE, spawn_call, [lag_w, dspex_store, set, [S, x, 2]]),
    ok = peer:call(PC, ?MODULE, spawn_call, [lag_r, ?MODULE, read_as, [majority, dspex_store, get_value, [S, x]]]),
    %% the write was sent back toward the dead node at least once ...
    ok = wait_until(fun() -> [] =/= [M || {_, _, #{reason := redirect, node := N} = M}
                                                <- peer:call(PC, ?MODULE, events_get, [ct_route]), N =:= Owner]
                    end, 10000, redirected_to_the_dead_owner),
    %% ... then the replica's view catches up
    ok = peer:call(PR, sys, resume, [dspex_cluster_members]),
    ?assertEqual({ok, 2}, peer:call(PC, ?MODULE, await_result, [lag_w, 30000], 40000)),
    %% a read meanwhile converges the same way (before or after the write)
    {{ok, X}, #{status := current, node := Rep}} = peer:call(PC, ?MODULE, await_result, [lag_r, 30000], 40000),
    ?assert(lists:member(X, [1, 2])),
    ?assertEqual({ok, Rep}, peer:call(PC, dspex_cluster, owner_of, [S])),
    ?assertEqual({2, 2}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    Hops = length(peer:call(PC, ?MODULE, events_get, [ct_route])),
    ct:pal("first write after the kill: ~p routing retries", [Hops]),
    Config.

%% A partition heals, and the old minority node that owns a session again
%% under the majority's view has not seen the heal yet (its membership server
%% suspended: its view still lacks a quorum). A write and a `majority' read
%% from the majority are retried inside the routing (it used to hand the
%% owner's `{error, no_quorum}' to the caller, although nothing was wrong on
%% the caller's side) and succeed once the owner's view catches up.
calls_wait_for_an_owner_whose_view_lags_the_heal(Config) ->
    Peers = start_cluster("dspex_heal", #{replicas => 1, replication => sync, route_deadline_ms => 30000}),
    put(peers, Peers),
    [{A, PA}, {B, PB}, {C, PC}] = Peers,
    [S | _] = [X || I <- lists:seq(1, 1000), X <- [<<"heal_", (integer_to_binary(I))/binary>>],
                    peer:call(PA, dspex_cluster, owner_of, [X]) =:= {ok, C}],
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    ok = partition_third(Peers),
    ?assertMatch({ok, 1}, peer:call(PA, dspex_store, set, [S, x, 1])),
    %% C's view stays without a quorum through the heal
    ok = peer:call(PC, sys, suspend, [dspex_cluster_members]),
    ok = restore_cookies(Peers),
    ok = wait_until(fun() -> live(PA) =:= [A, B, C] andalso live(PB) =:= [A, B, C] end, 20000, majority_sees_c),
    ?assertEqual([C], live(PC)),
    ok = peer:call(PA, ?MODULE, events_start, [ct_heal, [[dspex, cluster, route, retry]]]),
    ok = peer:call(PA, ?MODULE, spawn_call, [heal_w, dspex_store, set, [S, x, 2]]),
    ok = peer:call(PA, ?MODULE, spawn_call, [heal_r, ?MODULE, read_as, [majority, dspex_store, get_value, [S, x]]]),
    %% both were sent to C and told no_quorum at least once ...
    Told = fun() -> [M || {_, _, #{reason := owner_no_quorum} = M} <- peer:call(PA, ?MODULE, events_get, [ct_heal])] end,
    ok = wait_until(fun() -> length(lists:usort([Op || #{op := Op} <- Told()])) =:= 2 end, 20000, told_no_quorum),
    %% ... then C's view catches up, and both succeed
    ok = peer:call(PC, sys, resume, [dspex_cluster_members]),
    ?assertEqual({ok, 2}, peer:call(PA, ?MODULE, await_result, [heal_w, 40000], 50000)),
    {{ok, X}, #{status := current, node := C}} = peer:call(PA, ?MODULE, await_result, [heal_r, 40000], 50000),
    ?assert(lists:member(X, [1, 2])),
    ?assertEqual({2, 2}, peer:call(PC, ?MODULE, node_state, [S, <<"x">>])),
    Config.

%% A takeover fences the old owner's node as well as the replicas, then
%% copies the newest copy. A write the old owner's writer was already making
%% (applied there, waiting for a replica that the takeover did not fence,
%% e.g. one missing from the new owner's view) may land after that copy was
%% taken: it must not be acknowledged. Here the replica is held (its process
%% suspended) while the owner's node is fenced; the write then reports
%% `{retry, fenced}' (it used to be `{ok, 1}', a write the new owner's copy
%% could lack: the minority test saw one such acknowledged write lost).
a_write_fenced_while_replicating_is_not_acknowledged(Config) ->
    %% the held replica must not count as a slow one, however loaded the machine
    Peers = start_cluster("dspex_fence", #{replicas => 1, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    S = <<"fence_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    RName = dspex_cluster_replica:name(S),
    ok = peer:call(PR, sys, suspend, [RName]),
    ok = peer:call(PO, ?MODULE, spawn_call, [fence_w, dspex_store, set, [S, x, 1]]),
    %% applied on the owner, the writer now waits for the replica
    ok = wait_until(fun() -> peer:call(PO, ?MODULE, node_state, [S, <<"x">>]) =:= {1, 1} end, 4000, applied_on_owner),
    {S, E, _, Owner, _, _, _} = peer:call(PO, dspex_cluster_replica, row, [S]),
    ?assertMatch({ok, {E, _, true}}, peer:call(PO, dspex_cluster_replica, fence, [S, E + 1])),
    ok = peer:call(PR, sys, resume, [RName]),
    ?assertEqual({error, {retry, fenced}}, peer:call(PO, ?MODULE, await_result, [fence_w, 20000], 30000)),
    %% the next write re-establishes ownership (a takeover above the fence)
    %% and finds the change that was not acknowledged
    ?assertEqual({ok, 2}, peer:call(PA, dspex_store, set, [S, x, 2])),
    ?assertEqual({2, 2}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    Config.

%% A sync write is applied on the owner before its replica confirms it, and
%% that can still fail (the owner fenced by a takeover that did not see it):
%% a read that returned it then would have returned a value the next owner's
%% copy may lack (a dirty read; a rare failure of the partition test, once in
%% about 20 runs, fits it: its client read a version and then found its
%% session one version older). A read on the
%% owner, or routed to it, waits until what it saw is confirmed. With the
%% replica held, neither read answers (on the old code both returned 1 at
%% once); released, the write is acknowledged and both reads return 1.
a_read_returns_a_change_only_once_its_replicas_confirmed_it(Config) ->
    Peers = start_cluster("dspex_dirty", #{replicas => 1, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    S = <<"dirty_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    [PT] = [P || {N, P} <- Peers, N =/= Owner, N =/= Rep],
    ok = peer:call(PO, ?MODULE, collector_start, [dirty_c]),
    ok = peer:call(PT, ?MODULE, collector_start, [dirty_c]),
    RName = dspex_cluster_replica:name(S),
    ok = peer:call(PR, sys, suspend, [RName]),
    {Fast0, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ok = peer:call(PO, ?MODULE, spawn_to, [dirty_c, write, dspex_store, set, [S, x, 1]]),
    ok = wait_until(fun() -> peer:call(PO, ?MODULE, node_state, [S, <<"x">>]) =:= {1, 1} end, 4000, applied_on_owner),
    ok = peer:call(PO, ?MODULE, spawn_to, [dirty_c, read, dspex_store, get_value, [S, x]]),
    ok = peer:call(PT, ?MODULE, spawn_to, [dirty_c, read, dspex_store, get_value, [S, x]]),
    %% the absence of an answer while the replica is held (a loaded machine
    %% can only make this pass on the old code, never fail on the new)
    timer:sleep(500),
    ?assertEqual([], peer:call(PO, ?MODULE, collected, [dirty_c])),
    ?assertEqual([], peer:call(PT, ?MODULE, collected, [dirty_c])),
    ok = peer:call(PR, sys, resume, [RName]),
    ok = wait_until(fun() -> length(peer:call(PO, ?MODULE, collected, [dirty_c])) =:= 2 end, 20000, owner_answers),
    ?assertEqual([{read, {ok, 1}}, {write, {ok, 1}}], lists:sort(peer:call(PO, ?MODULE, collected, [dirty_c]))),
    ok = wait_until(fun() -> peer:call(PT, ?MODULE, collected, [dirty_c]) =/= [] end, 20000, routed_answer),
    ?assertEqual([{read, {ok, 1}}], peer:call(PT, ?MODULE, collected, [dirty_c])),
    %% the write took the owner's fast path (issue #21: the set NIF queued its
    %% record; the read index counted its announcement)
    ?assertMatch({F, _} when F =:= Fast0 + 1, peer:call(PO, dspex_nif, repl_stats, [])),
    Config.

%% Issue #14: no call of the cluster waits forever on a server that does not
%% answer. The owner's lock server suspended: a lock call from another node is
%% `{error, {retry, timeout}}' (it used to wait with `infinity'). The owner's
%% own replica process suspended while a write makes it take over: the write
%% ends with `{error, {unavailable, replica_unavailable}}' at the routing
%% deadline, and the owner's writer is free again (it used to wait forever).
stuck_servers_end_calls_with_documented_errors(Config) ->
    Peers = start_cluster("dspex_stuck", #{replicas => 1, replication => sync, route_deadline_ms => 2000}),
    put(peers, Peers),
    S = <<"stuck_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    [{_, PC}] = [X || {N, _} = X <- Peers, not lists:member(N, [Owner, Rep])],
    PO = peer_of(Owner, Peers),
    %% the lock server
    ok = peer:call(PO, sys, suspend, [dspex_locks]),
    ok = peer:call(PC, ?MODULE, spawn_call, [stuck_lock, dspex_locks, status, [S, x]]),
    ?assertEqual({error, {retry, timeout}}, peer:call(PC, ?MODULE, await_result, [stuck_lock, 60000], 70000)),
    ok = peer:call(PO, sys, resume, [dspex_locks]),
    ?assertMatch({ok, #{locked := false}}, peer:call(PC, dspex_locks, status, [S, x])),
    %% the owner's replica process, asked first by a takeover (a new view
    %% generation on the owner makes the next write take over)
    RName = dspex_cluster_replica:name(S),
    ok = peer:call(PO, sys, suspend, [RName]),
    ok = peer:call(PO, dspex_cluster_members, bump, []),
    ok = peer:call(PC, ?MODULE, spawn_call, [stuck_w, dspex_store, set, [S, x, 1]]),
    ?assertEqual({error, {unavailable, replica_unavailable}},
                 peer:call(PC, ?MODULE, await_result, [stuck_w, 60000], 70000)),
    ?assertMatch({status, _, _, _}, peer:call(PO, sys, get_status, [dspex_cluster_writer:name(S), 5000])),
    ok = peer:call(PO, sys, resume, [RName]),
    ?assertEqual({ok, 1}, peer:call(PC, dspex_store, set, [S, x, 1])),
    ?assertEqual({1, 1}, peer:call(peer_of(Rep, Peers), ?MODULE, node_state, [S, <<"x">>])),
    Config.

%% Local (no peers): the new options are checked and normalised; the read
%% mode is the calling process's own and returns the previous setting.
configuration_is_validated_and_read_mode_is_per_process(_Config) ->
    Conf = fun(C) -> ok = application:set_env(dspex_bridge, cluster, C), dspex_cluster_sup:config() end,
    try
        ?assertMatch(#{read := any, route_deadline_ms := 8000}, Conf(#{nodes => [node()]})),
        ?assertMatch(#{read := majority, route_deadline_ms := 500},
                     Conf(#{nodes => [node()], read => majority, route_deadline_ms => 500})),
        ?assertEqual({error, {invalid_argument, read}}, Conf(#{read => sometimes})),
        ?assertEqual({error, {invalid_argument, route_deadline_ms}}, Conf(#{route_deadline_ms => 0})),
        ?assertEqual({error, {invalid_argument, route_deadline_ms}}, Conf(#{route_deadline_ms => infinity})),
        ?assertMatch(#{replica_timeout_ms := 5000}, Conf(#{nodes => [node()]})),
        ?assertMatch(#{replica_timeout_ms := 250}, Conf(#{nodes => [node()], replica_timeout_ms => 250})),
        ?assertEqual({error, {invalid_argument, replica_timeout_ms}}, Conf(#{replica_timeout_ms => 0}))
    after
        application:unset_env(dspex_bridge, cluster)
    end,
    ?assertEqual(default, dspex_cluster:read_mode(majority)),
    ?assertEqual(majority, dspex_cluster:read_mode(any)),
    ?assertEqual(any, dspex_cluster:read_mode(default)),
    ?assertEqual(default, dspex_cluster:read_mode(default)),
    ?assertError(function_clause, dspex_cluster:read_mode(sometimes)),
    Parent = self(),
    _ = dspex_cluster:read_mode(majority),
    spawn(fun() -> Parent ! {mode, dspex_cluster:read_mode(default)} end),
    ?assertEqual(default, receive {mode, M} -> M end),
    ?assertEqual(undefined, dspex_cluster:last_read()),
    ?assertEqual({error, not_clustered}, dspex_cluster:read_status(<<"s">>)).

%% Runs on a peer: one process per `{Session, Key, Values}', each setting the
%% values in order; the results of every process, in the order given.
parallel_sets(Jobs) ->
    Parent = self(),
    Pids = [spawn_link(fun() -> Parent ! {self(), [dspex_store:set(S, K, V) || V <- Vs]} end) || {S, K, Vs} <- Jobs],
    [receive {P, R} -> R end || P <- Pids].

%% Issue #21: the shipper of a link from the owner's node to a replica node
%% sends the records of every writer (any session) as one batch per round
%% trip. Deterministic part: one replica node's receiver held while 16
%% processes write 16 sessions: the window fills, the other records queue,
%% and once the receiver resumes they travel in batches of more than one
%% record (the `[dspex, cluster, batch, stop]' events say so). Load part:
%% 16 processes x 100 writes; every write acknowledged, and both replicas
%% (R = 2: a write waits for both links) hold the owner's state.
concurrent_writes_are_batched_and_every_replica_converges(Config) ->
    %% the hold below must not look like a slow replica, however loaded the machine
    Peers = start_cluster("dspex_batch", #{replicas => 2, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    {Owner, [R1, R2], Ss} = sessions_on_one_link(PA, <<"batch_">>),
    PO = peer_of(Owner, Peers),
    ok = peer:call(PO, ?MODULE, events_start, [ct_batch, [[dspex, cluster, batch, stop]]]),
    PR1 = peer_of(R1, Peers),
    Stats = fun() -> peer:call(PO, dspex_cluster_shipper, stats, [R1]) end,
    #{records := Base} = Stats(),
    ok = peer:call(PR1, sys, suspend, [dspex_cluster_receiver]),
    ok = peer:call(PO, ?MODULE, spawn_call, [ct_held, ?MODULE, parallel_sets, [[{S, x, [1]} || S <- Ss]]]),
    %% every record handed to the shipper of R1: at most 4 batches in flight, the rest queued
    ok = wait_until(fun() -> #{records := Sent, queued := Q} = Stats(), Sent - Base + Q >= 16 end, 4000, all_shipped),
    ?assertMatch(#{inflight := InFlight} when InFlight =< 4, Stats()),
    ok = peer:call(PR1, sys, resume, [dspex_cluster_receiver]),
    ?assertEqual([[{ok, 1}] || _ <- Ss], peer:call(PO, ?MODULE, await_result, [ct_held, 20000], 30000)),
    Sizes = [maps:get(records, M) || {_, M, #{replica := R}} <- peer:call(PO, ?MODULE, events_get, [ct_batch]), R =:= R1],
    ct:pal("batch sizes to ~p after the hold: ~p", [R1, Sizes]),
    ?assert(lists:max(Sizes) > 1),
    %% under load
    Results = peer:call(PO, ?MODULE, parallel_sets, [[{S, x, lists:seq(2, 101)} || S <- Ss]], 60000),
    ?assertEqual([[{ok, V} || V <- lists:seq(2, 101)] || _ <- Ss], Results),
    #{batches := B, records := Rs, max_batch := Max} = Stats(),
    ct:pal("link ~p -> ~p: ~p records in ~p batches, largest ~p", [Owner, R1, Rs, B, Max]),
    %% acknowledged means applied on both replicas
    [?assertEqual({101, 101}, peer:call(peer_of(N, Peers), ?MODULE, node_state, [S, <<"x">>]))
     || S <- Ss, N <- [Owner, R1, R2]],
    Config.

%% Issue #21, the owner's fast path: a plain set of a session its owner holds
%% settled is committed and queued for the replica by the set NIF in one
%% critical section, without the writer's hop. 16 processes on the owner set
%% one session at once (8 on x, 8 on a variable each): every set is
%% acknowledged, each process sees its versions rise, x gets 1600 distinct
%% versions, every set took the fast path (dspex_nif:repl_stats/0), and once
%% the writers stop the replica holds exactly the owner's values and versions
%% and the owner's event log (gapless, same sequences, types and values).
fast_path_sets_of_one_session_reach_the_replica_in_commit_order(Config) ->
    Peers = start_cluster("dspex_fast", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fast_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    Keys = [list_to_atom("k" ++ integer_to_list(I)) || I <- lists:seq(1, 8)],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0]) || K <- Keys],
    Results = fast_path_burst(PO, S, Keys, 1),
    [?assertEqual([{ok, V} || V <- lists:seq(1, 200)], Rs) || Rs <- lists:nthtail(8, Results)],
    State = fun(P) -> [peer:call(P, ?MODULE, node_state, [S, atom_to_binary(K)]) || K <- [x | Keys]] end,
    ?assertEqual(State(PO), State(PR)),
    ?assertEqual({200, 1600}, hd(State(PR))),
    %% the replica's event log follows the owner's (the records carry the sets' sequences)
    OwnerLog = node_events(PO, S),
    assert_gapless(OwnerLog),
    ?assertEqual(same_events(OwnerLog), same_events(node_events(PR, S))),
    Config.

%% 16 processes on the owner `PO' set session `S' at once, 200 sets each: 8
%% on x, one on each variable of `Keys'. Every set succeeds and took the
%% fast path, each process saw its versions increase, and x got the 1,600
%% versions from `First' on, each once. Returns each process's results.
fast_path_burst(PO, S, Keys, First) ->
    {F0, _} = peer:call(PO, dspex_nif, repl_stats, []),
    Jobs = [{S, x, lists:seq(1, 200)} || _ <- lists:seq(1, 8)] ++ [{S, K, lists:seq(1, 200)} || K <- Keys],
    Results = peer:call(PO, ?MODULE, parallel_sets, [Jobs], 120000),
    ?assertEqual([], [R || Rs <- Results, R <- Rs, element(1, R) =/= ok]),
    [?assertEqual(lists:sort(Vs), Vs) || Rs <- Results, Vs <- [[V || {ok, V} <- Rs]]],
    ?assertEqual(lists:seq(First, First + 1599),
                 lists:sort(lists:append([[V || {ok, V} <- Rs] || Rs <- lists:sublist(Results, 8)]))),
    {F1, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ?assertEqual(3200, F1 - F0),
    Results.

%% Issue #21, the fast path with several replicas: R = 2, 16 processes on
%% the owner set one session at once (8 on x, 8 on a variable each). The set
%% NIF appends each record to both links' queues in the commit's critical
%% section: every set is acknowledged and took the fast path, x gets 1600
%% distinct versions, both replicas end with the owner's values, versions
%% and event log, and no write is left in the pending table.
fast_path_sets_with_two_replicas_reach_both_in_commit_order(Config) ->
    Peers = start_cluster("dspex_fast2", #{replicas => 2, replication => sync}),
    put(peers, Peers),
    S = <<"fast2_s">>,
    [{_, PA} | _] = Peers,
    ok = create_with_x(PA, S),
    {Owner, [R1, R2]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PO = peer_of(Owner, Peers),
    Keys = [list_to_atom("k" ++ integer_to_list(I)) || I <- lists:seq(1, 8)],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0]) || K <- Keys],
    _ = fast_path_burst(PO, S, Keys, 1),
    ?assertEqual(0, peer:call(PO, ets, info, [dspex_cluster_shipper:pending_table(), size])),
    State = fun(P) -> [peer:call(P, ?MODULE, node_state, [S, atom_to_binary(K)]) || K <- [x | Keys]] end,
    OwnerState = State(PO),
    ?assertEqual({200, 1600}, hd(OwnerState)),
    OwnerLog = node_events(PO, S),
    assert_gapless(OwnerLog),
    [begin
         ?assertEqual(OwnerState, State(peer_of(R, Peers))),
         ?assertEqual(same_events(OwnerLog), same_events(node_events(peer_of(R, Peers), S)))
     end || R <- [R1, R2]],
    Config.

%% Issue #21: with R = 2 a fast-path set is acknowledged only once BOTH
%% replicas applied it, and a read on the owner returns it only then (the
%% read index resolves a change when all its replicas answered). The second
%% replica's receiver held: the first applies the set and its shipper has
%% the answer, yet neither the write nor the read is answered; resumed, both
%% are, and the second replica has the version.
a_fast_path_write_with_two_replicas_is_acknowledged_only_after_both_applied_it(Config) ->
    Peers = start_cluster("dspex_fast2ack", #{replicas => 2, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    S = <<"fast2ack_s">>,
    [{_, PA} | _] = Peers,
    ok = create_with_x(PA, S),
    {Owner, [R1, R2]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    {PO, PR1, PR2} = {peer_of(Owner, Peers), peer_of(R1, Peers), peer_of(R2, Peers)},
    %% a first write publishes the descriptor
    ?assertEqual({ok, 1}, peer:call(PO, dspex_store, set, [S, x, 1])),
    ?assertMatch({true, _, _, _}, peer:call(PO, dspex_nif, repl_info, [S])),
    {F0, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ok = peer:call(PO, ?MODULE, collector_start, [fast2_c]),
    ok = peer:call(PR2, sys, suspend, [dspex_cluster_receiver]),
    ok = peer:call(PO, ?MODULE, spawn_to, [fast2_c, write, dspex_store, set, [S, x, 2]]),
    ok = wait_until(fun() -> peer:call(PR1, ?MODULE, node_state, [S, <<"x">>]) =:= {2, 2} end, 10000, first_applied),
    %% the first replica's answer reached its shipper
    ok = wait_until(fun() -> maps:get(inflight, peer:call(PO, dspex_cluster_shipper, stats, [R1])) =:= 0 end, 10000,
                    first_answered),
    ok = peer:call(PO, ?MODULE, spawn_to, [fast2_c, read, dspex_store, get_value, [S, x]]),
    %% the absence of an answer while the second replica is held (a loaded
    %% machine can only make this pass on a wrong implementation, never fail here)
    timer:sleep(300),
    ?assertEqual([], peer:call(PO, ?MODULE, collected, [fast2_c])),
    ?assertEqual({1, 1}, peer:call(PR2, ?MODULE, node_state, [S, <<"x">>])),
    ok = peer:call(PR2, sys, resume, [dspex_cluster_receiver]),
    ok = wait_until(fun() -> length(peer:call(PO, ?MODULE, collected, [fast2_c])) =:= 2 end, 20000, answered),
    ?assertEqual([{read, {ok, 2}}, {write, {ok, 2}}], lists:sort(peer:call(PO, ?MODULE, collected, [fast2_c]))),
    ?assertEqual({2, 2}, peer:call(PR2, ?MODULE, node_state, [S, <<"x">>])),
    ?assertMatch({F, _} when F =:= F0 + 1, peer:call(PO, dspex_nif, repl_stats, [])),
    ?assertEqual(0, peer:call(PO, ets, info, [dspex_cluster_shipper:pending_table(), size])),
    Config.

%% Issue #21: a shipper that stops takes no write with it. R = 2, the second
%% replica's receiver held: a fast-path set (its entry counts both links) and
%% a writer's register (its own entry) wait in the owner's pending table for
%% the second link. Its shipper is then stopped, once through its terminate
%% (sys:terminate/2, as a crash in a callback or the supervisor's shutdown
%% would), once killed (no terminate: its successor's init finds the lost
%% changes). Each time both callers are answered with a retry error, the
%% pending table is empty and the session's read index is resolved (a
%% current read would otherwise wait for changes nobody will settle) before
%% the receiver resumes; then reads and writes of the session succeed and
%% the three copies converge.
a_shipper_that_stops_or_is_killed_leaves_no_write_waiting(Config) ->
    Peers = start_cluster("dspex_shipdown", #{replicas => 2, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    S = <<"shipdown_s">>,
    [{_, PA} | _] = Peers,
    ok = create_with_x(PA, S),
    {Owner, [R1, R2]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    {PO, PR2} = {peer_of(Owner, Peers), peer_of(R2, Peers)},
    Pending = fun() -> peer:call(PO, ets, info, [dspex_cluster_shipper:pending_table(), size]) end,
    Shipper = fun() -> peer:call(PO, erlang, whereis, [dspex_cluster_shipper:name(R2)]) end,
    Round = fun(Stop, Tag, V, SlowWhy) ->
                    %% a write first publishes the descriptor (the fast path)
                    {ok, _} = peer:call(PO, dspex_store, set, [S, x, V - 1]),
                    ok = wait_until(fun() -> element(1, peer:call(PO, dspex_nif, repl_info, [S])) =:= true end,
                                    10000, {settled, Tag}),
                    Old = Shipper(),
                    ok = peer:call(PR2, sys, suspend, [dspex_cluster_receiver]),
                    ok = peer:call(PO, ?MODULE, collector_start, [Tag]),
                    ok = peer:call(PO, ?MODULE, spawn_to, [Tag, fast, dspex_store, set, [S, x, V]]),
                    ok = wait_until(fun() -> Pending() =:= 1 end, 10000, {fast_pending, Tag}),
                    K = list_to_atom("z" ++ integer_to_list(V)),
                    ok = peer:call(PO, ?MODULE, spawn_to, [Tag, slow, dspex_store, register, [S, K, integer, 0]]),
                    ok = wait_until(fun() -> Pending() =:= 2 end, 10000, {slow_pending, Tag}),
                    %% the first replica answered both: the entries wait for the second link only
                    ok = wait_until(fun() -> maps:get(inflight, peer:call(PO, dspex_cluster_shipper, stats, [R1])) =:= 0 end,
                                    10000, {first_answered, Tag}),
                    Stop(Old),
                    ok = wait_until(fun() -> length(peer:call(PO, ?MODULE, collected, [Tag])) =:= 2 end, 20000,
                                    {answered, Tag}),
                    ?assertEqual({Tag, [{fast, {error, {retry, replica_unavailable}}}, {slow, {error, {retry, SlowWhy}}}]},
                                 {Tag, lists:sort(peer:call(PO, ?MODULE, collected, [Tag]))}),
                    ok = wait_until(fun() -> Pending() =:= 0 end, 10000, {pending_empty, Tag}),
                    Deadline = fun() -> erlang:monotonic_time(millisecond) + 2000 end,
                    ?assertEqual(ok, peer:call(PO, dspex_cluster_shipper, await_committed, [S, Deadline()])),
                    ok = wait_until(fun() -> is_pid(Shipper()) andalso Shipper() =/= Old end, 10000, {restarted, Tag}),
                    ok = peer:call(PR2, sys, resume, [dspex_cluster_receiver]),
                    %% the session works again: a current read, a write, and the copies converge
                    ?assertMatch({ok, _}, peer:call(PO, dspex_store, get_value, [S, x])),
                    {ok, _} = peer:call(PO, dspex_store, set, [S, x, V + 1]),
                    ?assertEqual({ok, V + 1}, peer:call(PO, dspex_store, get_value, [S, x])),
                    Want = peer:call(PO, ?MODULE, node_state, [S, <<"x">>]),
                    ok = wait_until(fun() -> lists:all(fun({_, P}) -> peer:call(P, ?MODULE, node_state, [S, <<"x">>]) =:= Want end,
                                                       Peers) end, 20000, {converged, Tag}),
                    ?assertEqual(0, Pending())
            end,
    %% (the shipper's death restarts the node's cluster layer, one_for_all:
    %% killed, it cannot answer first, and the writer's caller sees its writer
    %% stop, owner_down; the fast-path caller sees the shipper go down)
    Round(fun(P) -> ok = peer:call(PO, sys, terminate, [P, crash]) end, shipdown_t, 10, replica_unavailable),
    Round(fun(P) -> true = peer:call(PO, erlang, exit, [P, kill]) end, shipdown_k, 20, owner_down),
    Config.

%% Issue #21, the fast path of `async' sessions: the caller is answered once
%% the set NIF committed and queued the record. 16 processes on the owner
%% set one session (every set on the fast path); once the writers stopped,
%% the replica catches up (polled) with the owner's values, versions and
%% event log. Then the replica's row is set one change back (as if it had
%% missed a record): its next record is `need_full', the shipper installs a
%% full copy, and the copies end equal again (values, versions and event
%% log: the copy's log follows the owner's only up to the export's last
%% event, so the changes after it are not logged twice). Then the replica's
%% receiver is held past replica_timeout_ms: the sets are answered at once,
%% the shipper fails (counts) their records, the writes go on, and once the
%% receiver resumes the copies end equal again.
async_fast_path_sets_converge_and_a_missed_record_is_fixed_by_a_full_copy(Config) ->
    Peers = start_cluster("dspex_fastasync", #{replicas => 1, replication => async, replica_timeout_ms => 2000}),
    put(peers, Peers),
    S = <<"fastasync_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    {PO, PR} = {peer_of(Owner, Peers), peer_of(Rep, Peers)},
    Keys = [list_to_atom("k" ++ integer_to_list(I)) || I <- lists:seq(1, 8)],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0]) || K <- Keys],
    %% a first write through the writer publishes the descriptor
    ?assertEqual({ok, 1}, peer:call(PO, dspex_store, set, [S, x, 1])),
    ?assertMatch({true, _, _, {0, 0}}, peer:call(PO, dspex_nif, repl_info, [S])),
    _ = fast_path_burst(PO, S, Keys, 2),
    State = fun(P) -> [peer:call(P, ?MODULE, node_state, [S, atom_to_binary(K)]) || K <- [x | Keys]] end,
    ?assertEqual({200, 1601}, hd(State(PO))),
    ok = wait_until(fun() -> State(PR) =:= State(PO) end, 30000, async_caught_up),
    OwnerLog = node_events(PO, S),
    assert_gapless(OwnerLog),
    ok = wait_until(fun() -> same_events(node_events(PR, S)) =:= same_events(OwnerLog) end, 30000, async_log_caught_up),
    %% a missed record: the next one is need_full, fixed by a full copy
    ok = peer:call(PR, ?MODULE, rewind_row, [S]),
    ?assertEqual([{ok, V} || V <- lists:seq(1602, 1621)], [peer:call(PO, dspex_store, set, [S, x, V]) || V <- lists:seq(1, 20)]),
    ok = wait_until(fun() -> State(PR) =:= State(PO) end, 30000, full_copy_installed),
    ?assertEqual({20, 1621}, hd(State(PR))),
    ok = wait_until(fun() -> same_events(node_events(PR, S)) =:= same_events(node_events(PO, S)) end, 30000,
                    log_after_full_copy),
    %% the fast path goes on once the writer published the session again
    ?assertEqual({ok, 1622}, peer:call(PO, dspex_store, set, [S, x, 21])),
    {F2, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ?assertEqual({ok, 1623}, peer:call(PO, dspex_store, set, [S, x, 22])),
    ?assertMatch({F, _} when F =:= F2 + 1, peer:call(PO, dspex_nif, repl_stats, [])),
    ok = wait_until(fun() -> State(PR) =:= State(PO) end, 30000, caught_up_again),
    %% a failure: the replica's receiver held past replica_timeout_ms; the
    %% callers are answered at once all the same, the shipper fails (counts)
    %% the records, and the writes go on; the copies end equal (the held
    %% batches applied late, or a gap fixed by a full copy)
    #{failed := Failed0} = peer:call(PO, dspex_cluster_shipper, stats, [Rep]),
    ok = peer:call(PR, sys, suspend, [dspex_cluster_receiver]),
    ?assertEqual([{ok, V} || V <- lists:seq(1624, 1643)], [peer:call(PO, dspex_store, set, [S, x, V]) || V <- lists:seq(1, 20)]),
    ok = wait_until(fun() -> maps:get(failed, peer:call(PO, dspex_cluster_shipper, stats, [Rep])) > Failed0 end, 30000,
                    records_failed),
    ok = peer:call(PR, sys, resume, [dspex_cluster_receiver]),
    ?assertEqual([{ok, V} || V <- lists:seq(1644, 1653)], [peer:call(PO, dspex_store, set, [S, x, V]) || V <- lists:seq(1, 10)]),
    ok = wait_until(fun() -> State(PR) =:= State(PO) end, 30000, caught_up_after_failure),
    ?assertEqual({10, 1653}, hd(State(PR))),
    ok = wait_until(fun() -> same_events(node_events(PR, S)) =:= same_events(node_events(PO, S)) end, 30000,
                    log_after_failure),
    Config.

%% Issue #21, back-pressure for async: async callers do not wait for their
%% replicas, so they can outrun one. The replica's receiver held: 4 batches
%% in flight, the shipper's queue and the link's native queue (65536) fill,
%% then the writer waits for room (the set NIF refuses with nothing
%% committed, counted) instead of failing with replica_slow; resumed, it
%% goes on, every set is acknowledged with consecutive versions, and the
%% replica ends equal to the owner. The shipper stops draining the native
%% queue once its own holds 65536 records, but a drain takes all the native
%% queue holds, so its own can reach 131071: with 4 x 1024 in flight the
%% link holds at most 200703 records before a set is refused, and the
%% writer makes more sets than that (with 160000 it finished without ever
%% waiting in a run where the shipper, slowed by a loaded machine, drained
%% late).
async_writers_wait_for_a_slow_replica_instead_of_failing(Config) ->
    Peers = start_cluster("dspex_asyncbp", #{replicas => 1, replication => async, replica_timeout_ms => 60000}),
    put(peers, Peers),
    S = <<"asyncbp_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    {PO, PR} = {peer_of(Owner, Peers), peer_of(Rep, Peers)},
    ?assertEqual({ok, 1}, peer:call(PO, dspex_store, set, [S, x, 1])),
    {F0, Full0} = peer:call(PO, dspex_nif, repl_stats, []),
    ok = peer:call(PR, sys, suspend, [dspex_cluster_receiver]),
    N = 4 * 1024 + 2 * 65536 - 1 + 65536 + 40000,
    ok = peer:call(PO, ?MODULE, spawn_call, [asyncbp_w, ?MODULE, counting_sets, [S, x, N]]),
    %% the writer waits: refused for a full queue, and not finished (a writer
    %% that finished first, or is still going after a minute, fails the case
    %% with what it and the link were doing)
    Full = fun() -> element(2, peer:call(PO, dspex_nif, repl_stats, [])) > Full0 end,
    _ = wait_until(fun() -> Full() orelse peer:call(PO, ?MODULE, has_result, [asyncbp_w]) end, 60000, queue_full),
    Full() orelse ct:fail({queue_not_full, #{writer => case peer:call(PO, ?MODULE, has_result, [asyncbp_w]) of
                                                          true -> peer:call(PO, ?MODULE, await_result, [asyncbp_w, 1000]);
                                                          false -> running
                                                      end,
                                             repl_stats => peer:call(PO, dspex_nif, repl_stats, []),
                                             repl_info => peer:call(PO, dspex_nif, repl_info, [S]),
                                             shipper => peer:call(PO, dspex_cluster_shipper, stats, [Rep]),
                                             x => peer:call(PO, ?MODULE, node_state, [S, <<"x">>])}}),
    {_, Ver} = peer:call(PO, ?MODULE, node_state, [S, <<"x">>]),
    ?assert(Ver < N + 1),
    ok = peer:call(PR, sys, resume, [dspex_cluster_receiver]),
    ?assertEqual({ok, N}, peer:call(PO, ?MODULE, await_result, [asyncbp_w, 120000], 130000)),
    {F1, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ?assertEqual(N, F1 - F0),
    ?assertEqual({N, N + 1}, peer:call(PO, ?MODULE, node_state, [S, <<"x">>])),
    ok = wait_until(fun() -> peer:call(PR, ?MODULE, node_state, [S, <<"x">>]) =:= {N, N + 1} end, 60000,
                    replica_caught_up),
    Config.

%% Sets S.K to 1..N (from this process); `{ok, N}' when each was acknowledged
%% with the version after the previous one, else the first unexpected answer.
counting_sets(S, K, N) ->
    {ok, V0} = dspex_store:set(S, K, 1),
    counting_sets(S, K, 2, N, V0).

counting_sets(_S, _K, I, N, _V) when I > N -> {ok, N};
counting_sets(S, K, I, N, V) ->
    case dspex_store:set(S, K, I) of
        {ok, V1} when V1 =:= V + 1 -> counting_sets(S, K, I + 1, N, V1);
        Other -> {I, Other}
    end.

%% Runs on a replica: its row of S one change back (a missed record).
rewind_row(S) ->
    {S, E, Seq, O, R, G, F} = dspex_cluster_replica:row(S),
    dspex_cluster_replica:put_row({S, E, Seq - 1, O, R, G, F}),
    ok.

%% Issue #21: a fast-path set is acknowledged only once the replica applied
%% it: after each acknowledgement the replica already has that version.
a_fast_path_write_is_acknowledged_only_after_the_replica_applied_it(Config) ->
    Peers = start_cluster("dspex_fastack", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fastack_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    {F0, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ?assertEqual([{V, V} || V <- lists:seq(1, 50)], peer:call(PO, ?MODULE, sets_checking_the_replica, [S, x, Rep, 50])),
    ?assertMatch({F, _} when F =:= F0 + 50, peer:call(PO, dspex_nif, repl_stats, [])),
    Config.

%% Issue #21: the fast path keeps the owner's instrumentation. Its sets are
%% counted by the native analytics like any set (the owner's dashboards and
%% Prometheus see them); while a telemetry handler other than the analytics
%% listens to [dspex, store, set, stop] on the owner, plain sets go through
%% the writer, which emits the event, and take the fast path again once it is
%% detached.
fast_path_sets_are_counted_and_give_way_to_a_telemetry_handler(Config) ->
    Peers = start_cluster("dspex_fasttel", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fasttel_s">>,
    [{_, PA} | _] = Peers,
    {Owner, _Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    Fast = fun() -> element(1, peer:call(PO, dspex_nif, repl_stats, [])) end,
    Sets = fun(From, To) -> [{ok, _} = peer:call(PO, dspex_store, set, [S, x, I]) || I <- lists:seq(From, To)], ok end,
    C0 = peer:call(PO, ?MODULE, native_set_count, []),
    F0 = Fast(),
    ok = Sets(1, 20),
    ?assertEqual(F0 + 20, Fast()),
    %% the native samples reach their series in the background: bounded polling
    ?assertEqual(C0 + 20, wait_for(fun() -> peer:call(PO, ?MODULE, native_set_count, []) end, C0 + 20, 250)),
    ok = peer:call(PO, ?MODULE, events_start, [fasttel_events, [[dspex, store, set, stop]]]),
    ok = Sets(21, 30),
    ?assertEqual(F0 + 20, Fast()),
    Seen = [I || {[dspex, store, set, stop], _, #{session := Se, variable := x, result := ok}} <-
                     peer:call(PO, ?MODULE, events_get, [fasttel_events]), Se =:= S, I <- [1]],
    ?assertEqual(10, length(Seen)),
    ok = peer:call(PO, dspex_telemetry, detach, [{ct_events, fasttel_events}]),
    ok = Sets(31, 35),
    ?assertEqual(F0 + 25, Fast()),
    Config.

%% The owner's count of successful sets in its native analytics (the last hour).
native_set_count() ->
    Now = erlang:system_time(second),
    {ok, N} = dspex_metrics:query({dspex_store_duration_us, #{op => set, result => ok}}, Now - 3600, Now + 60, count),
    N.

%% F() polled every 20 ms until it returns Want, at most Tries times; its last value.
wait_for(F, Want, Tries) ->
    case F() of
        Want -> Want;
        _ when Tries =< 1 -> F();
        _ -> timer:sleep(20), wait_for(F, Want, Tries - 1)
    end.

%% Sets S.K to 1..N; after each acknowledgement, the replica's version of it.
sets_checking_the_replica(S, K, Rep, N) ->
    [begin
         {ok, V} = dspex_store:set(S, K, I),
         {_, RV} = erpc:call(Rep, ?MODULE, node_state, [S, atom_to_binary(K)]),
         {V, RV}
     end || I <- lists:seq(1, N)].

%% Issue #21: a migration unsettles the old owner's fast path (the takeover
%% fences it): a write made on the old owner afterwards goes through the new
%% owner, and the versions go on with none lost or repeated; the new owner
%% takes the fast path for its own writes.
a_migration_unsettles_the_fast_path_without_losing_or_repeating_versions(Config) ->
    Peers = start_cluster("dspex_fastmig", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fastmig_s">>,
    [{_, PA} | _] = Peers,
    {Owner, _Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    ?assertEqual([{ok, V} || V <- lists:seq(1, 20)], [peer:call(PO, dspex_store, set, [S, x, V]) || V <- lists:seq(1, 20)]),
    ?assertMatch({true, _, _, _}, peer:call(PO, dspex_nif, repl_info, [S])),
    [Target | _] = [N || {N, _} <- Peers, N =/= Owner],
    PT = peer_of(Target, Peers),
    {ok, #{epoch := Epoch}} = peer:call(PA, dspex_cluster, migrate_session, [S, Target]),
    %% unsettled by the fence (or gone: the old owner holds a copy of the new owner's now)
    ?assertNotMatch({true, _, _, _}, peer:call(PO, dspex_nif, repl_info, [S])),
    ?assertEqual({{ok, 21}, {Epoch, Target}}, peer:call(PO, ?MODULE, set_and_last_write, [S, x, 21])),
    {FT0, _} = peer:call(PT, dspex_nif, repl_stats, []),
    Acks = lists:append([[peer:call(PO, dspex_store, set, [S, x, V]), peer:call(PT, dspex_store, set, [S, x, V + 1])]
                         || V <- lists:seq(22, 60, 2)]),
    ?assertEqual([{ok, V} || V <- lists:seq(22, 61)], Acks),
    {FT1, _} = peer:call(PT, dspex_nif, repl_stats, []),
    ?assert(FT1 - FT0 >= 19),
    {ok, [NewRep]} = {ok, element(2, dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])))},
    [?assertEqual({61, 61}, peer:call(peer_of(N, Peers), ?MODULE, node_state, [S, <<"x">>])) || N <- [Target, NewRep]],
    Config.

%% Issue #21: the kill -9 test for the fast path. 16 processes on the owner
%% set 16 variables of one session (every set on the fast path) and report
%% each acknowledgement to a collector on another node; the owner is killed.
%% Every version acknowledged before the kill is on the new owner (nothing
%% acknowledged is lost), and writes go on there from the next version.
fast_path_writes_acknowledged_before_a_kill_of_their_owner_survive_it(Config) ->
    Peers = start_cluster("dspex_fastkill", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"fastkill_s">>,
    [{_, PA} | _] = Peers,
    {Owner, _Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    [{Watcher, PW} | _] = [X || {N, _} = X <- Peers, N =/= Owner],
    Keys = [list_to_atom("k" ++ integer_to_list(I)) || I <- lists:seq(1, 16)],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0]) || K <- Keys],
    ok = peer:call(PW, ?MODULE, collector_start, [fastkill_c]),
    {F0, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ok = peer:call(PO, ?MODULE, fast_writers_start, [S, Keys, {fastkill_c, Watcher}]),
    ok = wait_until(fun() -> length(peer:call(PW, ?MODULE, collected, [fastkill_c])) >= 16 * 30 end, 30000,
                    acks_before_kill),
    {F1, _} = peer:call(PO, dspex_nif, repl_stats, []),
    ?assert(F1 - F0 >= 16 * 30),
    ok = kill_node(Owner, Peers),
    ok = wait_until(fun() -> not lists:member(Owner, live(PW)) end, 10000, owner_gone),
    Acked = peer:call(PW, ?MODULE, collected, [fastkill_c]),
    ?assertEqual([], [E || {err, _, _} = E <- Acked]),
    MaxAcked = lists:foldl(fun({acked, K, V}, M) -> maps:update_with(K, fun(W) -> max(V, W) end, V, M) end, #{},
                           Acked),
    ?assertEqual(16, map_size(MaxAcked)),
    Now = maps:from_list([{K, V} || K <- Keys,
                                    {ok, #{version := V}} <- [peer:call(PW, dspex_store, get, [S, K])]]),
    ct:pal("fast-path kill: ~p acknowledged before the kill; highest acked ~p; on the new owner ~p",
           [length(Acked), MaxAcked, Now]),
    ?assertEqual([], [{K, A, maps:get(K, Now, none)} || {K, A} <- maps:to_list(MaxAcked),
                                                         not (maps:get(K, Now, 0) >= A)]),
    [?assertEqual({ok, maps:get(K, Now) + 1}, peer:call(PW, dspex_store, set, [S, K, -1])) || K <- Keys],
    Config.

%% 16 processes on this node setting S.K (one key each) 1, 2, ... until an
%% error, each acknowledgement sent to `To' (`{acked, K, Version}').
fast_writers_start(S, Keys, To) ->
    [spawn(fun() -> fast_writer(S, K, 1, To) end) || K <- Keys],
    ok.

fast_writer(S, K, V, To) ->
    case dspex_store:set(S, K, V) of
        {ok, Ver} -> To ! {acked, K, Ver}, fast_writer(S, K, V + 1, To);
        E -> To ! {err, K, E}
    end.

set_and_last_write(S, K, V) ->
    R = dspex_store:set(S, K, V),
    {R, dspex_cluster:last_write()}.

%% Issue #21: a replica applies the consecutive sets of a session that a
%% batch brings in one NIF call (dspex_nif:replica_apply_batch/3), not one
%% dspex_store:set/4 per record. The replica's receiver is held while 8
%% processes write 8 variables of one session: at most 4 batches are in
%% flight, so at least 4 records wait and travel together once it resumes.
%% The replica ends with the owner's values and versions, and its event log
%% is the owner's (same sequences, types and values).
a_replica_applies_a_run_of_sets_in_one_nif_call(Config) ->
    Peers = start_cluster("dspex_rbatch", #{replicas => 1, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"rbatch_s">>,
    {Owner, Rep} = session_with_x(PA, S),
    Keys = [x | [list_to_atom("x" ++ integer_to_list(I)) || I <- lists:seq(1, 7)]],
    [{ok, _} = peer:call(PA, dspex_store, register, [S, K, integer, 0]) || K <- tl(Keys)],
    {PO, PR} = {peer_of(Owner, Peers), peer_of(Rep, Peers)},
    ok = peer:call(PR, ?MODULE, runs_start, []),
    Stats = fun() -> peer:call(PO, dspex_cluster_shipper, stats, [Rep]) end,
    #{records := Base} = Stats(),
    ok = peer:call(PR, sys, suspend, [dspex_cluster_receiver]),
    ok = peer:call(PO, ?MODULE, spawn_call, [ct_rbatch, ?MODULE, parallel_sets, [[{S, K, [1, 2, 3]} || K <- Keys]]]),
    ok = wait_until(fun() -> #{records := Sent, queued := Q} = Stats(), Sent - Base + Q >= 8 end, 4000, all_shipped),
    ok = peer:call(PR, sys, resume, [dspex_cluster_receiver]),
    ?assertEqual([[{ok, 1}, {ok, 2}, {ok, 3}] || _ <- Keys], peer:call(PO, ?MODULE, await_result, [ct_rbatch, 20000], 30000)),
    {Runs, Sets} = peer:call(PR, ?MODULE, runs_get, []),
    ct:pal("runs applied by one NIF call on the replica: ~w; dspex_store:set/4 calls there: ~w", [Runs, Sets]),
    %% every record went through a run, at least 4 of them in one call
    ?assertEqual(24, lists:sum(Runs)),
    ?assert(lists:max(Runs) >= 4),
    ?assertEqual(0, Sets),
    [?assertEqual({3, 3}, peer:call(PR, ?MODULE, node_state, [S, atom_to_binary(K)])) || K <- Keys],
    OwnerLog = node_events(PO, S),
    assert_gapless(OwnerLog),
    ?assertEqual(same_events(OwnerLog), same_events(node_events(PR, S))),
    Config.

%% Issue #21, the owner's per-write work: the caller (routing) and the
%% session's writer (ensure) each rank the nodes of a session once per view
%% (dspex_cluster_writer:owners_memo/2), not on every write. A view change
%% (here a drain of the third node, then undrain) ranks again, and the
%% writes go on succeeding with the owner of the new view.
a_write_ranks_the_nodes_once_per_view(Config) ->
    Peers = start_cluster("dspex_rank", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"rank_s">>,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    [Third] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    %% a process on the owner: one write, then 100 counted (a few calls of
    %% background work may land in the window; without the memo: 200)
    {100, C1} = peer:call(PO, ?MODULE, counted_writes, [S, 1, 100]),
    ?assert(C1 < 10),
    {ok, _} = peer:call(PO, dspex_cluster, drain, [Third]),
    %% a new view: ranked again, once in the caller and once in the writer
    {100, C2} = peer:call(PO, ?MODULE, counted_writes, [S, 0, 100]),
    ct:pal("owners/2 calls in 100 writes: ~b, after a view change ~b", [C1, C2]),
    ?assert(C2 >= 2 andalso C2 < 10),
    ok = peer:call(PO, dspex_cluster, undrain, [Third]),
    ?assertMatch({ok, _}, peer:call(PA, dspex_store, set, [S, x, -1])),
    Config.

%% Runs on a peer: `Warm' writes of x on S, then `N' more while the calls of
%% dspex_cluster_writer:owners/2 are counted: {acknowledged, calls}.
counted_writes(S, Warm, N) ->
    [{ok, _} = dspex_store:set(S, x, I) || I <- lists:seq(1, Warm)],
    MFA = {dspex_cluster_writer, owners, 2},
    1 = erlang:trace_pattern(MFA, true, [call_count]),
    Ok = length([ok || I <- lists:seq(1, N), {ok, _} <- [dspex_store:set(S, x, I)]]),
    {call_count, C} = erlang:trace_info(MFA, call_count),
    1 = erlang:trace_pattern(MFA, false, [call_count]),
    {Ok, C}.

%% Runs on a replica: records the length of each run its pool processes
%% apply in one NIF call, and counts dspex_store:set/4 calls.
runs_start() ->
    Pid = spawn(fun() -> runs_loop([]) end),
    register(ct_runs, Pid),
    1 = erlang:trace_pattern({dspex_store, set, 4}, true, [call_count]),
    1 = erlang:trace_pattern({dspex_cluster_replica, apply_run, 3}, true, [local]),
    _ = [erlang:trace(whereis(dspex_cluster_replica:name(<<I>>)), true, [call, {tracer, Pid}]) || I <- lists:seq(0, 255)],
    ok.

runs_loop(Acc) ->
    receive
        {trace, _, call, {dspex_cluster_replica, apply_run, [_, Run, _]}} -> runs_loop([length(Run) | Acc]);
        {get, From} -> From ! {runs, lists:reverse(Acc)}, runs_loop(Acc)
    end.

runs_get() ->
    ct_runs ! {get, self()},
    Runs = receive {runs, L} -> L end,
    {call_count, Sets} = erlang:trace_info({dspex_store, set, 4}, call_count),
    {Runs, Sets}.

%% Issue #21, back-pressure: a replica node whose receiver does not answer
%% (suspended) holds at most 4 batches of the link; the writes wait, then
%% fail with `{error, {retry, replica_slow}}' after `replica_timeout_ms' (2 s here):
%% none is acknowledged, and nothing piles up beyond the writers' records.
%% Once it answers again, the next writes take the sessions over again and
%% succeed, and the replica converges to the owner.
a_stuck_replica_bounds_the_window_and_fails_writes_as_replica_slow(Config) ->
    Peers = start_cluster("dspex_slow", #{replicas => 1, replication => sync, replica_timeout_ms => 2000}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    {Owner, [Rep], Ss} = sessions_on_one_link(PA, <<"slow_">>),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    Stats = fun() -> peer:call(PO, dspex_cluster_shipper, stats, [Rep]) end,
    #{records := Base} = Stats(),
    ok = peer:call(PR, sys, suspend, [dspex_cluster_receiver]),
    ok = peer:call(PO, ?MODULE, spawn_call, [ct_stuck, ?MODULE, parallel_sets, [[{S, x, [1, 2]} || S <- Ss]]]),
    ok = wait_until(fun() -> #{records := Sent, queued := Q} = Stats(), Sent - Base + Q >= 16 end, 4000, all_shipped),
    #{inflight := InFlight, queued := Queued} = Stats(),
    ?assert(InFlight =< 4),
    ?assert(Queued =< 16),
    %% each process's first write fails after the timeout; its second write
    %% takes the session over, which needs the replica's pool (not held), and
    %% then waits for the receiver again
    Res = peer:call(PO, ?MODULE, await_result, [ct_stuck, 30000], 40000),
    ?assertEqual([[{error, {retry, replica_slow}}, {error, {retry, replica_slow}}] || _ <- Ss], Res),
    #{inflight := InFlight2, queued := Queued2, failed := Failed} = Stats(),
    ?assertEqual({0, 0}, {InFlight2, Queued2}),
    ?assertEqual(32, Failed),
    ok = peer:call(PR, sys, resume, [dspex_cluster_receiver]),
    Res2 = peer:call(PO, ?MODULE, parallel_sets, [[{S, x, [3]} || S <- Ss]], 30000),
    ?assertEqual([[{ok, 3}] || _ <- Ss], Res2),
    [?assertEqual({3, 3}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])) || S <- Ss],
    Config.

%% Issue #21: a record of a batch that the replica cannot replay (its copy
%% differs: here changed behind the cluster's back, so the version the owner
%% reached is not the one the replica reaches) is answered `need_full'; the
%% write is acknowledged only after the owner installed its whole session
%% there, and the replica then holds the owner's state. A gap in the sequence
%% (a change the replica never got) is handled the same way.
a_replica_that_diverged_gets_a_full_copy_before_the_ack(Config) ->
    Peers = start_cluster("dspex_full", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    S = <<"full_s">>,
    [{_, PA} | _] = Peers,
    {Owner, Rep} = session_with_x(PA, S),
    PO = peer_of(Owner, Peers),
    PR = peer_of(Rep, Peers),
    ?assertEqual({ok, 1}, peer:call(PO, dspex_store, set, [S, x, 1])),
    %% the replica's copy moves on by itself: version 2 there, 1 on the owner
    ?assertEqual({ok, 2}, peer:call(PR, dspex_cluster, local_apply, [set, [S, x, 99]])),
    ?assertEqual({ok, 2}, peer:call(PO, dspex_store, set, [S, x, 2])),
    ?assertEqual({2, 2}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    %% a gap: the replica's row says it missed the last change
    {S, E, Seq, O, R, G, F} = peer:call(PR, dspex_cluster_replica, row, [S]),
    true = peer:call(PR, dspex_cluster_replica, put_row, [{S, E, Seq - 1, O, R, G, F}]),
    ?assertEqual({ok, 3}, peer:call(PO, dspex_store, set, [S, x, 3])),
    ?assertEqual({3, 3}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    ?assertEqual(element(3, peer:call(PO, dspex_cluster_replica, row, [S])),
                 element(3, peer:call(PR, dspex_cluster_replica, row, [S]))),
    %% and the link goes on replaying single changes
    ?assertEqual({ok, 4}, peer:call(PO, dspex_store, set, [S, x, 4])),
    ?assertEqual({4, 4}, peer:call(PR, ?MODULE, node_state, [S, <<"x">>])),
    #{failed := 0} = peer:call(PO, dspex_cluster_shipper, stats, [Rep]),
    Config.

%% Issue #21: the replica node dies (kill -9) while batches of the link are
%% in flight (its receiver held): every write in them fails with `{error,
%% {retry, replica_unavailable}}' (none is acknowledged), and the sessions'
%% next writes establish ownership again under the new view (the third node
%% becomes the replica, with the owner's copy).
a_replica_node_dying_fails_its_batches_in_flight(Config) ->
    Peers = start_cluster("dspex_rdie", #{replicas => 1, replication => sync, replica_timeout_ms => 60000}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    {Owner, [Rep], Ss} = sessions_on_one_link(PA, <<"rdie_">>),
    [Third] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    PO = peer_of(Owner, Peers),
    Stats = fun() -> peer:call(PO, dspex_cluster_shipper, stats, [Rep]) end,
    #{records := Base} = Stats(),
    ok = peer:call(peer_of(Rep, Peers), sys, suspend, [dspex_cluster_receiver]),
    ok = peer:call(PO, ?MODULE, spawn_call, [ct_rdie, ?MODULE, parallel_sets, [[{S, x, [1]} || S <- Ss]]]),
    ok = wait_until(fun() -> #{records := Sent, queued := Q} = Stats(), Sent - Base + Q >= 16 end, 10000, all_shipped),
    ok = kill_node(Rep, Peers),
    ?assertEqual([[{error, {retry, replica_unavailable}}] || _ <- Ss],
                 peer:call(PO, ?MODULE, await_result, [ct_rdie, 30000], 40000)),
    ?assertMatch(#{inflight := 0, queued := 0}, Stats()),
    ok = wait_until(fun() -> live(PO) =:= lists:sort([Owner, Third]) end, 20000, replica_gone),
    %% the failed writes were committed on the owner (outcome unknown to the
    %% callers); the next ones take over and find them
    ?assertEqual([[{ok, 2}] || _ <- Ss], peer:call(PO, ?MODULE, parallel_sets, [[{S, x, [2]} || S <- Ss]], 30000)),
    [?assertEqual({2, 2}, peer:call(peer_of(Third, Peers), ?MODULE, node_state, [S, <<"x">>])) || S <- Ss],
    Config.

%%% event log sequences travel with the session (issue #15) ------------------------

%% The log of node P for session S, once everything queued there is durable.
node_events(P, S) ->
    ok = peer:call(P, dspex_events, await, []),
    {ok, Evs} = peer:call(P, dspex_events, read, [S, #{limit => 10000}]),
    Evs.

%% What a replica's log must share with its owner's: sequence, type and the
%% event's values (a replayed change has its own commit time, id and node).
same_events(Evs) ->
    [{N, T, maps:get(principal, M, undefined),
      maps:with([name, value, old_value, version, previous_version, members, reason, step, from, to], D)}
     || #{sequence := N, type := T, data := D, metadata := M} <- Evs].

assert_gapless(Evs) ->
    ?assertEqual(lists:seq(1, length(Evs)), [N || #{sequence := N} <- Evs]).

%% The variables of a state_at/2 result as name -> {value, version}.
state_vars({ok, #{variables := Vs}}) -> lists:sort([{N, V, Ver} || #{name := N, value := V, version := Ver} <- Vs]).

%% Writes of every kind on a session with x: replayed changes (set, atomic
%% set_many, rollback, delete), changes the replicas copy (register, a
%% non-atomic set_many, a dependency), and events logged outside replicated
%% changes (append/4 on the owner, a lock), each followed by a replicated change.
varied_writes(PA, PO, PN, S) ->
    {ok, _} = peer:call(PA, dspex_store, register, [S, y, string, <<"a">>]),
    [{ok, _} = peer:call(PA, dspex_store, set, [S, x, I]) || I <- lists:seq(1, 4)],
    {ok, _} = peer:call(PA, dspex_store, set_many, [S, #{x => 10, y => <<"b">>}, #{atomic => true}]),
    {ok, _} = peer:call(PA, dspex_store, set_many, [S, #{x => 11}, #{}]),
    {ok, _} = peer:call(PA, dspex_store, rollback, [S, x, 2]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, z, integer, 0]),
    ok = peer:call(PA, dspex_graph, add_dependency, [S, x, z]),
    ok = peer:call(PA, dspex_acl, set_permissions, [S, z, [#{session_pattern => <<"alice">>, permissions => [read, write]}]]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, z, 3, #{as => <<"alice">>}]),
    {ok, _} = peer:call(PO, dspex_events, append, [S, checkpoint, #{step => 1}, #{}]),
    %% an append on another node goes into the owner's log
    {ok, _} = peer:call(PN, dspex_events, append, [S, checkpoint, #{step => 2}, #{}]),
    ok = peer:call(PA, dspex_store, delete, [S, y]),
    {ok, Lock} = peer:call(PO, dspex_locks, acquire, [S, x, opt1, #{pid => peer:call(PO, erlang, whereis, [init])}]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, x, 12, #{lock => Lock}]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, z, 5]),
    ok.

event_sequence_continues_on_the_new_owner_after_failover(Config) ->
    Peers = start_cluster("dspex_evf", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"evf_s">>,
    {Owner, Rep} = session_with_x(PA, S),
    [Third] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    {PO, PR, PT} = {peer_of(Owner, Peers), peer_of(Rep, Peers), peer_of(Third, Peers)},
    ok = varied_writes(PA, PO, PT, S),
    Old0 = node_events(PO, S),
    ?assertEqual([1, 2], [St || #{type := checkpoint, data := #{step := St}} <- Old0]),
    assert_gapless(Old0),
    Types = [T || #{type := T} <- Old0],
    [?assert(lists:member(T, Types)) || T <- [session_created, variable_registered, variable_updated,
                                              batch_committed, variable_rolled_back, variable_deleted,
                                              dependency_added, acl_rule_set, checkpoint, lock_acquired]],
    ?assertMatch([_], [E || #{type := variable_updated, metadata := #{principal := <<"alice">>}} = E <- Old0]),
    %% the replica logged the same events with the same sequences
    ?assertEqual(same_events(Old0), same_events(node_events(PR, S))),
    %% events copied from the owner's log are the owner's own (id, time, node)
    Copied = [maps:with([id, sequence, timestamp, metadata], E) || #{type := T} = E <- Old0,
                                                                   T =:= checkpoint orelse T =:= lock_acquired],
    ?assertEqual(Copied, [maps:with([id, sequence, timestamp, metadata], E)
                          || #{type := T} = E <- node_events(PR, S), T =:= checkpoint orelse T =:= lock_acquired]),
    %% events logged outside replicated changes travel with the next change:
    %% the replica does not read them from the owner's log
    %% and changes whose replay logs what the owner logged (a set as a
    %% principal, a batch that is not atomic) are not shipped as full copies
    Count = {dspex_events, owner_events, 4},
    Exports = {dspex_store, export_session, 1},
    1 = peer:call(PO, erlang, trace_pattern, [Count, true, [call_count]]),
    1 = peer:call(PO, erlang, trace_pattern, [Exports, true, [call_count]]),
    {ok, _} = peer:call(PO, dspex_events, append, [S, checkpoint, #{step => 3}, #{}]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, z, 6]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, z, 7, #{as => <<"alice">>}]),
    {ok, _} = peer:call(PA, dspex_store, set_many, [S, #{x => 13, z => 8}, #{}]),
    ?assertEqual({call_count, 0}, peer:call(PO, erlang, trace_info, [Count, call_count])),
    ?assertEqual({call_count, 0}, peer:call(PO, erlang, trace_info, [Exports, call_count])),
    _ = [peer:call(PO, erlang, trace_pattern, [C, false, [call_count]]) || C <- [Count, Exports]],
    Old = node_events(PO, S),
    Mid = length(Old) div 2,
    OldState = peer:call(PO, dspex_events, state_at, [S, {sequence, Mid}]),
    ok = kill_node(Owner, Peers),
    %% the writing node's view too: a write sent to the dead owner before its
    %% node learnt of the death is `{retry, owner_down}' (its outcome unknown)
    ok = wait_until(fun() -> not lists:member(Owner, live(PR) ++ live(PT)) end, 10000, owner_gone),
    {ok, _} = peer:call(PT, dspex_store, set, [S, x, 30]),
    {ok, _} = peer:call(PT, dspex_store, set, [S, x, 31]),
    ?assertEqual({ok, Rep}, peer:call(PR, dspex_cluster, owner_of, [S])),
    New = node_events(PR, S),
    assert_gapless(New),
    N = length(Old),
    ?assertEqual(N + 2, length(New)),
    ?assertEqual(same_events(Old), same_events(lists:sublist(New, N))),
    ?assertMatch([#{type := variable_updated, data := #{value := 30}}, #{type := variable_updated, data := #{value := 31}}],
                 lists:nthtail(N, New)),
    %% time travel to a point the old owner logged works on the new owner
    ?assertEqual(state_vars(OldState), state_vars(peer:call(PR, dspex_events, state_at, [S, {sequence, Mid}]))),
    %% the new replica got the log with its copy at the takeover
    ?assertEqual(same_events(New), same_events(node_events(PT, S))),
    Config.

event_sequence_follows_a_migration_and_the_dropped_copy_logs_migrated(Config) ->
    Peers = start_cluster("dspex_evm", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"evm_s">>,
    {Owner, Rep} = session_with_x(PA, S),
    [Target] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    PT = peer_of(Target, Peers),
    ok = varied_writes(PA, peer_of(Owner, Peers), PT, S),
    Old = node_events(peer_of(Owner, Peers), S),
    N = length(Old),
    %% the target held no copy: it takes the session over with the log, and
    %% logs the move under the sequence the dropped copy's deletion gets
    {ok, _} = peer:call(PA, dspex_cluster, migrate_session, [S, Target]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, x, 40]),
    {Target, [NewRep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    New = node_events(PT, S),
    assert_gapless(New),
    ?assertEqual(same_events(Old), same_events(lists:sublist(New, N))),
    [Dropped] = [X || X <- [Owner, Rep], X =/= NewRep],
    ?assertMatch([#{type := session_migrated, data := #{to := Target, dropped := [Dropped]}},
                  #{type := variable_updated, data := #{value := 40}}], lists:nthtail(N, New)),
    ?assertEqual(same_events(New), same_events(node_events(peer_of(NewRep, Peers), S))),
    %% the node that is neither owner nor replica any more dropped its copy
    PD = peer_of(Dropped, Peers),
    DEvs = node_events(PD, S),
    ?assertMatch(#{sequence := Mark, type := session_deleted, data := #{reason := migrated}} when Mark =:= N + 1,
                 lists:last(DEvs)),
    ?assertEqual(same_events(Old), same_events(lists:droplast(DEvs))),
    ?assertEqual({error, session_not_found}, peer:call(PD, dspex_cluster, local_apply, [get_session, [S]])),
    %% the session comes back to the dropped node: its log continues in step
    {ok, _} = peer:call(PA, dspex_cluster, migrate_session, [S, Dropped]),
    {ok, _} = peer:call(PA, dspex_store, set, [S, x, 41]),
    Back = node_events(PD, S),
    assert_gapless(Back),
    Last = length(Back),
    ?assertEqual(same_events(lists:nthtail(N + 1, New)), same_events(lists:sublist(Back, N + 2, length(New) - N - 1))),
    ?assertMatch(#{type := variable_updated, data := #{value := 41}}, lists:last(Back)),
    %% time travel across the dropped copy's deletion gives the live session
    {ok, Live} = peer:call(PD, dspex_nif, export_session, [S]),
    ?assertEqual(state_vars({ok, Live}), state_vars(peer:call(PD, dspex_events, state_at, [S, {sequence, Last}]))),
    Config.

%% Every node appends to one PostgreSQL database (DX_EVENTS_PG_URL, set by
%% `make test-events-pg'): a session's events are stored once per sequence,
%% gapless across a failover, and the new owner continues after an event the
%% old owner stored after its last replicated change (it reads the
%% database's last sequence at the takeover; else its next event took that
%% number and the insert skipped it).
event_sequence_on_one_postgres_database_across_failover(Config) ->
    case os:getenv("DX_EVENTS_PG_URL") of
        Url when is_list(Url), Url =/= "" -> pg_failover(Url, Config);
        _ -> {skip, "no PostgreSQL server: make test-events-pg runs this case"}
    end.

pg_failover(Url, Config) ->
    put(ct_app_env, [{event_backend, {postgres, Url}}]),
    Peers = start_cluster("dspex_evpg", #{replicas => 1, replication => sync}),
    erase(ct_app_env),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    S = <<"evpg_", (integer_to_binary(erlang:system_time()))/binary>>,
    {Owner, Rep} = session_with_x(PA, S),
    [Third] = [N || {N, _} <- Peers, N =/= Owner, N =/= Rep],
    {PO, PR, PT} = {peer_of(Owner, Peers), peer_of(Rep, Peers), peer_of(Third, Peers)},
    ok = varied_writes(PA, PO, PT, S),
    {ok, _} = peer:call(PO, dspex_events, append, [S, checkpoint, #{step => 9}, #{durability => sync}]),
    Old = node_events(PO, S),
    assert_gapless(Old),
    ?assertMatch(#{type := checkpoint, data := #{step := 9}}, lists:last(Old)),
    ok = kill_node(Owner, Peers),
    %% the writing node's view too: a write sent to the dead owner before its
    %% node learnt of the death is `{retry, owner_down}' (its outcome unknown)
    ok = wait_until(fun() -> not lists:member(Owner, live(PR) ++ live(PT)) end, 10000, owner_gone),
    {ok, _} = peer:call(PT, dspex_store, set, [S, x, 30]),
    New = node_events(PR, S),
    assert_gapless(New),
    N = length(Old),
    ?assertEqual(same_events(Old), same_events(lists:sublist(New, N))),
    ?assertMatch([#{type := variable_updated, data := #{value := 30}}], lists:nthtail(N, New)),
    %% the events copied by the replica are the owner's rows (same id)
    ?assertEqual([Id || #{type := checkpoint, id := Id} <- Old], [Id || #{type := checkpoint, id := Id} <- New]),
    Config.

%% Two nodes drained, the third is the only owner left: its drain is refused
%% with nothing changed (it used to mark it draining everywhere, then fail
%% with no_owner, and every write of the cluster was no_quorum until undrain).
a_drain_that_would_leave_no_owner_is_refused(Config) ->
    Peers = start_cluster("dspex_drain1", #{replicas => 1, replication => sync}),
    put(peers, Peers),
    [{A, PA}, {B, _}, {C, _}] = Peers,
    S = <<"drain1_s">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {ok, _} = peer:call(PA, dspex_cluster, drain, [B]),
    {ok, _} = peer:call(PA, dspex_cluster, drain, [C]),
    ?assertEqual({error, no_other_owner}, peer:call(PA, dspex_cluster, drain, [A])),
    [?assertMatch(#{draining := [_, _], quorum := true}, peer:call(P, dspex_cluster, cluster_status, []))
     || {_, P} <- Peers],
    [?assertEqual(lists:sort([B, C]), maps:get(draining, peer:call(P, dspex_cluster, cluster_status, [])))
     || {_, P} <- Peers],
    %% A owns everything and takes writes from every node
    [?assertMatch({ok, _}, peer:call(P, dspex_store, set, [S, x, 1])) || {_, P} <- Peers],
    ?assertEqual({ok, A}, peer:call(PA, dspex_cluster, owner_of, [S])),
    [ok = peer:call(PA, dspex_cluster, undrain, [N]) || N <- [B, C]],
    Config.

%% Reads, exists, read_status, writes and migrations of sessions that do not
%% exist, made on every node of a three-node cluster (R = 2: every node is a
%% replica of everything), leave no row on any node and take nothing over;
%% a session that exists is served as before, also after its owner died
%% (only its replicas hold it then).
unknown_sessions_leave_no_row_on_any_node(Config) ->
    Peers = start_cluster("dspex_ghost", #{replicas => 2, replication => sync}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    Tab = dspex_cluster_replica:table(),
    S = <<"ghost_real">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 5]),
    Rows = fun() -> [peer:call(P, ets, info, [Tab, size]) || {_, P} <- Peers] end,
    Rows0 = Rows(),
    Ids = [<<"ghost_", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 100)],
    [begin
         ?assertEqual({error, session_not_found}, peer:call(P, dspex_store, get, [G, x])),
         ?assertEqual(false, peer:call(P, dspex_store, exists, [G, x])),
         ?assertMatch({ok, #{status := current, epoch := 0}}, peer:call(P, dspex_cluster, read_status, [G])),
         ?assertEqual({error, session_not_found}, peer:call(P, dspex_store, set, [G, x, 1]))
     end || {_, P} <- Peers, G <- Ids],
    [?assertEqual({error, session_not_found}, peer:call(P, dspex_cluster, migrate_session, [hd(Ids), N]))
     || {N, P} <- Peers],
    ?assertEqual(Rows0, Rows()),
    [?assertEqual(#{}, maps:get(overrides, peer:call(P, dspex_cluster_members, view, []))) || {_, P} <- Peers],
    %% the real session, from every node
    [?assertEqual({ok, 5}, peer:call(P, dspex_store, get_value, [S, x])) || {_, P} <- Peers],
    %% its owner killed: a replica takes over on the first read
    {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [S]),
    [{_, PR} | _] = Rest = [NP || {N, _} = NP <- Peers, N =/= Owner],
    ok = kill_node(Owner, Peers),
    ok = wait_until(fun() -> peer:call(PR, dspex_cluster, owner_of, [S]) =/= {ok, Owner} end, 20000, view_moved),
    [?assertEqual({ok, 5}, peer:call(P, dspex_store, get_value, [S, x])) || {_, P} <- Rest],
    ?assertEqual({error, session_not_found}, peer:call(PR, dspex_store, get, [hd(Ids), x])),
    Config.

%%% deleted sessions leave no rows -----------------------------------------------

%% On a peer: creates, writes and deletes sessions Prefix1 .. PrefixN, as a
%% client would (a `{retry, _}' error is retried; a retried call may find
%% its first attempt committed). Returns the retries made.
churn(Prefix, N) ->
    lists:sum([begin
                   S = <<Prefix/binary, (integer_to_binary(I))/binary>>,
                   churn_call(fun() -> dspex_store:create_session(S) end, [already_exists], 0)
                       + churn_call(fun() -> dspex_store:register(S, x, integer, 1) end, [already_exists], 0)
                       + churn_call(fun() -> dspex_store:delete_session(S) end, [session_not_found], 0)
               end || I <- lists:seq(1, N)]).

churn_call(F, AfterRetry, Retries) ->
    case F() of
        ok -> Retries;
        {ok, _} -> Retries;
        {error, {retry, _}} when Retries < 10 -> churn_call(F, AfterRetry, Retries + 1);
        {error, {R, _}} = E when Retries > 0 -> true = lists:member(R, AfterRetry) orelse E, Retries;
        {error, R} = E when Retries > 0 -> true = lists:member(R, AfterRetry) orelse E, Retries
    end.

%% On a peer: per table keyed by session id, {Table, rows whose id starts
%% with Prefix, rows, bytes}.
session_rows(Prefix) ->
    L = byte_size(Prefix),
    [{T, length([K || K <- ets:select(T, [{Pat, [], ['$1']}]), is_binary(K), binary:longest_common_prefix([K, Prefix]) =:= L]),
      ets:info(T, size), ets:info(T, memory) * erlang:system_info(wordsize)}
     || {T, Pat} <- [{dspex_cluster_replica:table(), {'$1', '_', '_', '_', '_', '_', '_'}},
                     {dspex_cluster_shipper:shipped_table(), {'$1', '_', '_'}},
                     {dspex_cache_vv, {'$1', '_'}}, {dspex_cache_regs, {'$1', '_'}}]].

prefixed_rows(P, Prefix) -> lists:sum([N || {_, N, _, _} <- peer:call(P, ?MODULE, session_rows, [Prefix])]).

%% Create-and-delete churn through one node of three (R = 1, sync): once the
%% owners' keepers reaped the tombstones, no table keyed by session id holds
%% a row of them on any node; the ids read as not found and can be created again.
deleted_sessions_leave_no_rows_on_any_node(Config) ->
    Peers = start_cluster("dspex_rows", #{replicas => 1, replication => sync, keepalive_ms => 200}),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    N = list_to_integer(os:getenv("DSPEX_ROWS_N", "300")),
    Prefix = <<"rows_">>,
    Before = [{Node, peer:call(P, ?MODULE, session_rows, [Prefix])} || {Node, P} <- Peers],
    T0 = erlang:monotonic_time(millisecond),
    Retries = peer:call(PA, ?MODULE, churn, [Prefix, N], 600000),
    T1 = erlang:monotonic_time(millisecond),
    After = [{Node, peer:call(P, ?MODULE, session_rows, [Prefix])} || {Node, P} <- Peers],
    ct:pal("~p sessions created and deleted in ~p ms (~p calls retried)~n{Table, rows of them, rows, bytes} "
           "before ~p~nright after ~p", [N, T1 - T0, Retries, Before, After]),
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> prefixed_rows(P, Prefix) =:= 0 end, Peers) end,
                    60000, rows_reaped),
    T2 = erlang:monotonic_time(millisecond),
    Reaped = [{Node, peer:call(P, ?MODULE, session_rows, [Prefix])} || {Node, P} <- Peers],
    ct:pal("rows reaped ~p ms after the churn: ~p", [T2 - T1, Reaped]),
    S1 = <<Prefix/binary, "1">>,
    [?assertEqual({error, session_not_found}, peer:call(P, dspex_store, get, [S1, x])) || {_, P} <- Peers],
    [?assertEqual(0, prefixed_rows(P, Prefix)) || {_, P} <- Peers],
    ok = create_with_x(PA, S1),
    [?assertEqual({ok, 0}, peer:call(P, dspex_store, get_value, [S1, x])) || {_, P} <- Peers],
    Config.

%% Sessions deleted by the majority while the third node C was cut off,
%% one owned by C and one C replicated: C's old copies do not bring them back
%% when it returns (reads say not found everywhere, no node owns them), and
%% their rows go from every node once C acknowledged the deletion (not
%% before: C's copy must be dropped first).
a_session_deleted_while_a_node_was_cut_off_stays_deleted(Config) ->
    Peers = start_cluster("dspex_tomb", #{replicas => 1, replication => sync, keepalive_ms => 200}),
    put(peers, Peers),
    [{A, PA}, {B, _}, {C, PC}] = Peers,
    View = peer:call(PA, dspex_cluster_members, view, []),
    Pick = fun(Want) -> hd([X || I <- lists:seq(1, 1000), X <- [<<"tomb_", (integer_to_binary(I))/binary>>],
                                 Want(dspex_cluster_writer:owners(X, View))]) end,
    OwnedByC = Pick(fun({O, _}) -> O =:= C end),
    ReplicaC = Pick(fun({O, Reps}) -> O =/= C andalso lists:member(C, Reps) end),
    Del = [OwnedByC, ReplicaC],
    [ok = create_with_x(PA, S) || S <- Del],
    [?assertEqual({0, 0}, peer:call(PC, ?MODULE, node_state, [S, <<"x">>])) || S <- Del],
    Majority = [PA, peer_of(B, Peers)],
    [ok = peer:call(P, ?MODULE, events_start, [ct_tomb, [[dspex, cluster, tombstones, waiting]]]) || P <- Majority],
    ok = partition_third(Peers),
    [?assertEqual(ok, peer:call(PA, dspex_store, delete_session, [S])) || S <- Del],
    %% the majority keeps its tombstones while C, which holds copies, is
    %% away: a keeper tick saw both (marked expired, the step before their
    %% removal) and left them, waiting for C
    Waiting = fun() -> lists:sum([case [M || {_, M, #{missing := [Mi]}} <- peer:call(P, ?MODULE, events_get, [ct_tomb]),
                                            Mi =:= C] of
                                      [] -> 0;
                                      Ms -> maps:get(count, lists:last(Ms))
                                  end || P <- Majority]) end,
    ok = wait_until(fun() -> Waiting() >= 2 end, 20000, tombstones_waiting_for_c),
    [?assertMatch({0, 0}, peer:call(PC, ?MODULE, node_state, [S, <<"x">>])) || S <- Del],
    [?assert(is_expired_somewhere(S, Majority)) || S <- Del],
    [?assertNotEqual([], [P || P <- Majority, prefixed_rows(P, S) > 0]) || S <- Del],
    ok = restore_cookies(Peers),
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> live(P) =:= [A, B, C] end, Peers) end, 20000, healed),
    Gone = fun() -> lists:all(fun({_, P}) -> lists:all(fun(S) -> prefixed_rows(P, S) =:= 0 end, Del) end, Peers) end,
    ok = wait_until(Gone, 30000, rows_reaped_after_heal),
    [begin
         ?assertEqual({error, session_not_found}, peer:call(P, dspex_cluster, local_apply, [get_session, [S]])),
         ?assertEqual({error, session_not_found}, peer:call(P, dspex_store, get_session, [S])),
         ?assertEqual(false, lists:member(S, peer:call(P, dspex_cluster, owned_sessions, [])))
     end || {_, P} <- Peers, S <- Del],
    %% the reads above took nothing over
    ?assert(Gone()),
    Config.

is_expired_somewhere(S, Ps) ->
    lists:any(fun(P) -> element(4, peer:call(P, dspex_cluster_replica, row, [S])) =:= expired end, Ps).

%% The owner of a deleted session is killed before its keeper removed the
%% tombstones (its keeper held suspended from before the deletion): the
%% replica's tombstone has no owner to remove it. Once the owner is back
%% (restarted, empty), the session is settled by its owner under the view,
%% which removes the tombstones as its own: no row is left on any node, and
%% the session reads as not found everywhere.
tombstones_of_an_owner_that_died_are_removed_when_it_returns(Config) ->
    Peers = start_cluster("dspex_orph", #{replicas => 1, replication => sync, keepalive_ms => 200}),
    put(peers, Peers),
    [{A, PA}, {B, PB}, {C, _}] = Peers,
    View = peer:call(PB, dspex_cluster_members, view, []),
    [S | _] = [X || I <- lists:seq(1, 1000), X <- [<<"orph_", (integer_to_binary(I))/binary>>],
                    element(1, dspex_cluster_writer:owners(X, View)) =:= A],
    {A, [Rep]} = dspex_cluster_writer:owners(S, View),
    ok = create_with_x(PB, S),
    ok = peer:call(PA, sys, suspend, [dspex_cluster_keeper]),
    ?assertEqual(ok, peer:call(PB, dspex_store, delete_session, [S])),
    %% the replica applied the deletion: its tombstone
    ?assertMatch({S, _, Seq, A, _, _, _} when Seq > 0, peer:call(peer_of(Rep, Peers), dspex_cluster_replica, row, [S])),
    ok = kill_node(A, Peers),
    ok = wait_until(fun() -> live(PB) =:= [B, C] end, 20000, owner_gone),
    Peers1 = restart_node(A, Peers),
    put(peers, Peers1),
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> live(P) =:= [A, B, C] end, Peers1) end, 30000, owner_back),
    ok = wait_until(fun() -> lists:all(fun({_, P}) -> prefixed_rows(P, S) =:= 0 end, Peers1) end, 30000,
                    tombstones_removed),
    [begin
         ?assertEqual({error, session_not_found}, peer:call(P, dspex_store, get_session, [S])),
         ?assertEqual(false, lists:member(S, peer:call(P, dspex_cluster, owned_sessions, [])))
     end || {_, P} <- Peers1],
    ?assert(lists:all(fun({_, P}) -> prefixed_rows(P, S) =:= 0 end, Peers1)),
    Config.
