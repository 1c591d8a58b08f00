%% Common Test: the cluster's reads and writes of one variable are
%% linearizable (issue #16's history checker, `dspex_lincheck', run against
%% the cluster of today: every read and write of a session runs on its
%% owner, with sync replication). Three `peer' nodes (lin_a, lin_b, lin_c),
%% on each two writers (unique integer values) and two readers (one in the
%% default read mode `any', one in `majority'), all on the same variable;
%% every operation's invocation and return is recorded with
%% `os:perf_counter(nanosecond)' (CLOCK_MONOTONIC, one clock for the
%% machine), then the history is checked: in a steady state; with the
%% owner's node killed (kill -9) mid-run, then started again; with the
%% replica's node killed; with the session migrated twice, then drained
%% and undrained; with the owner's node partitioned away, then healed. A
%% negative control (reads of a lagging replica copy) shows the harness
%% finds a violation, and one case is the regression test of the bug the
%% restart found (calls routed to a node that has no view yet).
%%
%% Recording: a collector process on a node that is not killed holds the
%% history (in the partition case, one per node, merged at the end). A client announces each operation to it and waits for its
%% answer before invoking it, so an operation of a node that dies is known
%% (a write then counts as unknown, a read as failed). Outcomes, by the
%% README's table of errors: `{ok, _}' is done; a write's `{error, {retry,
%% _}}', any other error or exception is unknown (may have taken effect, at
%% any time); `{error, {unavailable, _}}' and `{error, no_quorum}' mean
%% "nothing written": such writes are left out of the history (a read of
%% their value would then be a violation); a read's error is a failed read.
%% A read served from a copy its node marks `stale' (`dspex_cluster:last_read/0')
%% claims no linearizability: it is counted, and left out.
-module(dspex_lincheck_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([steady_state_history_is_linearizable/1, owner_killed_mid_run_history_is_linearizable/1,
         migrations_and_a_drain_mid_run_history_is_linearizable/1, reads_of_a_lagging_replica_copy_are_a_violation/1,
         calls_routed_to_a_node_without_a_view_yet_are_routed_again/1,
         replica_killed_mid_run_history_is_linearizable/1,
         owner_partitioned_away_mid_run_history_is_linearizable/1]).
%% run on the peers
-export([collector_start/0, collector_count/0, collector_stop/1, collector_loop/1,
         clients_start/6, writer_loop/4, reader_loop/4]).

-define(COLLECTOR, dspex_lincheck_collector).

-spec all() -> [atom()].
all() ->
    [steady_state_history_is_linearizable, owner_killed_mid_run_history_is_linearizable,
     replica_killed_mid_run_history_is_linearizable, migrations_and_a_drain_mid_run_history_is_linearizable,
     owner_partitioned_away_mid_run_history_is_linearizable, reads_of_a_lagging_replica_copy_are_a_violation,
     calls_routed_to_a_node_without_a_view_yet_are_routed_again].

-spec init_per_testcase(atom(), list()) -> list().
init_per_testcase(_, Config) -> Config.

-spec end_per_testcase(atom(), list()) -> ok.
end_per_testcase(Case, Config) -> dspex_cluster_SUITE:end_per_testcase(Case, Config).   % stops the peers the case recorded

%%% tests -----------------------------------------------------------------------

%% Nothing happens to the cluster: 12 clients on 3 nodes.
-spec steady_state_history_is_linearizable(list()) -> {comment, iolist()}.
steady_state_history_is_linearizable(Config) ->
    {Peers, S, Owner} = setup(<<"lin_steady">>),
    PColl = peer_of(other_than(Owner, Peers), Peers),
    start_clients(Peers, S, PColl),
    ok = await_ops(PColl, #{ops => 3000, writes => 600}),
    Ops = stop_clients(PColl),
    Sum = check(Config, Ops, #{ops => 3000, writes => 600, procs => 12}),
    {comment, comment(Sum)}.

%% The owner's node is killed with kill -9 while every client runs; the
%% clients of the two other nodes go on through the failover. Then the
%% node is started again (empty) under its name: it rejoins, is the
%% session's owner again (same name, same rendezvous order), resyncs and
%% takes the session back, while the clients run, with two new writers and
%% two new readers on it.
-spec owner_killed_mid_run_history_is_linearizable(list()) -> {comment, iolist()}.
owner_killed_mid_run_history_is_linearizable(Config) ->
    {Peers, S, Owner} = setup(<<"lin_kill">>),
    Survivor = other_than(Owner, Peers),
    PColl = peer_of(Survivor, Peers),
    start_clients(Peers, S, PColl),
    ok = await_ops(PColl, #{ops => 1500, writes => 300}),
    #{ops := Before, writes := WBefore} = count(PColl),
    At = os:perf_counter(nanosecond),
    ok = dspex_cluster_SUITE:kill_node(Owner, Peers),
    %% writes acknowledged after the kill, by the survivors' clients
    ok = await_ops(PColl, #{ops => Before + 1500, writes => WBefore + 300}),
    {ok, NewOwner} = peer:call(PColl, dspex_cluster, owner_of, [S]),
    ?assertNotEqual(Owner, NewOwner),
    Peers2 = dspex_cluster_SUITE:restart_node(Owner, Peers),
    put(peers, Peers2),
    Nodes = [N || {N, _} <- Peers2],
    ok = dspex_cluster_SUITE:wait_until(
           fun() -> lists:all(fun({_, P}) -> peer:call(P, dspex_cluster_members, view, []) =/= undefined andalso
                                                 maps:get(live, peer:call(P, dspex_cluster, cluster_status, []))
                                                 =:= Nodes end, Peers2) end, 20000, rejoined),
    Back = os:perf_counter(nanosecond),
    ok = peer:call(peer_of(Owner, Peers2), ?MODULE, clients_start,
                   [peer:call(PColl, erlang, node, []), S, node_index(Owner, Peers2), 2, [any, majority], 2]),
    ok = dspex_cluster_SUITE:wait_until(fun() -> peer:call(PColl, dspex_cluster, owner_of, [S]) =:= {ok, Owner} end,
                                        20000, owner_again),
    #{ops := AtBack, writes := WAtBack} = count(PColl),
    ok = await_ops(PColl, #{ops => AtBack + 1500, writes => WAtBack + 300}),
    Ops = stop_clients(PColl),
    ct:pal("after the restart, per client: ~p", [per_client([Op || Op <- Ops, element(5, Op) > Back])]),
    Sum = check(Config, Ops, #{ops => 4500, writes => 900, procs => 16, writers => 8}),
    ?assert(length([x || {{N, _, _}, write, _, ok, I, _} <- Ops, N =:= Owner, I > Back]) > 0),
    %% operations on both sides of the kill, of the survivors' clients
    Survivors = [N || {N, _} <- Peers, N =/= Owner],
    ?assert(length([x || {{N, _, _}, write, _, ok, I, _} <- Ops, lists:member(N, Survivors), I > At]) >= 300),
    ?assert(length([x || {{N, _, _}, read, _, {ok, _}, I, _} <- Ops, lists:member(N, Survivors), I > At]) >= 300),
    ?assert(length([x || {{N, _, _}, _, _, _, I, _} <- Ops, N =:= Owner, I < At]) > 0),
    ct:pal("owner ~p killed, new owner ~p, then ~p back", [Owner, NewOwner, Owner]),
    {comment, comment(Sum)}.

%% The replica's node is killed with kill -9 while every client runs: writes
%% waiting for it end `{retry, replica_unavailable}', the next ones make the
%% third node the replica; the owner keeps serving.
-spec replica_killed_mid_run_history_is_linearizable(list()) -> {comment, iolist()}.
replica_killed_mid_run_history_is_linearizable(Config) ->
    {Peers, S, Owner} = setup(<<"lin_rkill">>),
    [{_, PA} | _] = Peers,
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PColl = peer_of(Owner, Peers),
    start_clients(Peers, S, PColl),
    ok = await_ops(PColl, #{ops => 1500, writes => 300}),
    #{ops := Before, writes := WBefore} = count(PColl),
    At = os:perf_counter(nanosecond),
    ok = dspex_cluster_SUITE:kill_node(Rep, Peers),
    ok = await_ops(PColl, #{ops => Before + 1500, writes => WBefore + 300}),
    Ops = stop_clients(PColl),
    Sum = check(Config, Ops, #{ops => 3000, writes => 600, procs => 12}),
    ?assert(length([x || {_, write, _, ok, I, _} <- Ops, I > At]) >= 300),
    ?assertEqual({ok, Owner}, peer:call(PColl, dspex_cluster, owner_of, [S])),
    {comment, comment(Sum)}.

%% The session migrates to another node, then to the third, then that node
%% is drained (the session moves on) and undrained (it comes back, pinned
%% there, on a client's next access), while every client runs (a write in
%% flight at a switch may be `{retry, fenced}').
-spec migrations_and_a_drain_mid_run_history_is_linearizable(list()) -> {comment, iolist()}.
migrations_and_a_drain_mid_run_history_is_linearizable(Config) ->
    {Peers, S, Owner} = setup(<<"lin_mig">>),
    [T1, T2] = [N || {N, _} <- Peers, N =/= Owner],
    PColl = peer_of(T1, Peers),
    start_clients(Peers, S, PColl),
    Step = fun(Target, Need) ->
                   ok = await_ops(PColl, Need),
                   {ok, #{epoch := _}} = peer:call(PColl, dspex_cluster, migrate_session, [S, Target]),
                   [?assertEqual({ok, Target}, peer:call(P, dspex_cluster, owner_of, [S])) || {_, P} <- Peers],
                   count(PColl)
           end,
    #{ops := O1, writes := W1} = Step(T1, #{ops => 1000, writes => 200}),
    #{ops := O2, writes := W2} = Step(T2, #{ops => O1 + 1000, writes => W1 + 200}),
    %% T2 drained: the session moves on at once; undrained: it comes back
    %% (pinned there) on its next access, made by a client
    ok = await_ops(PColl, #{ops => O2 + 1000, writes => W2 + 200}),
    {ok, _} = peer:call(PColl, dspex_cluster, drain, [T2]),
    ok = peer:call(PColl, dspex_cluster, await_drained, [T2, 20000]),
    {ok, Drained} = peer:call(PColl, dspex_cluster, owner_of, [S]),
    ?assertNotEqual(T2, Drained),
    #{ops := O3, writes := W3} = count(PColl),
    ok = await_ops(PColl, #{ops => O3 + 1000, writes => W3 + 200}),
    ok = peer:call(PColl, dspex_cluster, undrain, [T2]),
    #{ops := O4, writes := W4} = count(PColl),
    ok = await_ops(PColl, #{ops => O4 + 1000, writes => W4 + 200}),
    ?assertEqual([T2], lists:usort([N || {_, P} <- Peers, {ok, N} <- [peer:call(P, dspex_cluster, owner_of, [S])]])),
    ?assert(lists:member(S, peer:call(peer_of(T2, Peers), dspex_cluster, owned_sessions, []))),
    Ops = stop_clients(PColl),
    Sum = check(Config, Ops, #{ops => 5000, writes => 1000, procs => 12}),
    ct:pal("migrated ~p -> ~p -> ~p, drained to ~p, back to ~p", [Owner, T1, T2, Drained, T2]),
    {comment, comment(Sum)}.

%% The owner's node is cut off from the two others (a cookie change, as in
%% the cluster suite) while every client runs, then the partition heals.
%% No node dies, so each node records its own clients (a collector per
%% node: the cut-off node's clients go on recording), and the three
%% histories are merged. During the partition the majority takes the
%% session over; the cut-off node refuses writes (`no_quorum': nothing
%% written) and serves reads marked stale (left out) or refuses them in
%% `majority' mode; after the heal the node owns the session again.
-spec owner_partitioned_away_mid_run_history_is_linearizable(list()) -> {comment, iolist()}.
owner_partitioned_away_mid_run_history_is_linearizable(Config) ->
    {Peers, S, Owner} = setup(<<"lin_part">>),
    Others = [X || {N, _} = X <- Peers, N =/= Owner],
    Ordered = Others ++ [{Owner, peer_of(Owner, Peers)}],  % partition_third/1 cuts off the third
    Colls = [P || {_, P} <- Peers],
    [begin
         ok = peer:call(P, ?MODULE, collector_start, []),
         ok = peer:call(P, ?MODULE, clients_start, [N, S, node_index(N, Peers), 2, [any, majority], 0])
     end || {N, P} <- Peers],
    ok = await_ops(Colls, #{ops => 1000, writes => 200}),
    ok = dspex_cluster_SUITE:partition_third(Ordered),
    Cut = os:perf_counter(nanosecond),
    #{ops := O1, writes := W1} = count(Colls),
    ok = await_ops(Colls, #{ops => O1 + 1000, writes => W1 + 200}),
    {ok, During} = peer:call(element(2, hd(Others)), dspex_cluster, owner_of, [S]),
    ?assertNotEqual(Owner, During),
    ok = dspex_cluster_SUITE:restore_cookies(Ordered),
    Nodes = [N || {N, _} <- Peers],
    ok = dspex_cluster_SUITE:wait_until(
           fun() -> lists:all(fun({_, P}) -> maps:get(live, peer:call(P, dspex_cluster, cluster_status, [])) =:= Nodes
                              end, Peers) end, 20000, healed),
    Healed = os:perf_counter(nanosecond),
    ok = dspex_cluster_SUITE:wait_until(fun() -> lists:all(fun({_, P}) -> peer:call(P, dspex_cluster, owner_of, [S])
                                                                           =:= {ok, Owner} end, Peers) end,
                                        20000, owner_again),
    #{ops := O2, writes := W2} = count(Colls),
    ok = await_ops(Colls, #{ops => O2 + 1000, writes => W2 + 200}),
    {Ops, Notes} = stop_collectors(Colls),
    Sum = check(Config, Ops, #{ops => 3000, writes => 600, procs => 12}),
    %% the cut-off node's clients ran during the partition: writes refused,
    %% reads stale or refused; the majority's wrote
    ?assert(lists:any(fun({{N, w, _}, nothing_written, no_quorum}) -> N =:= Owner; (_) -> false end, Notes)),
    ?assert(length([x || {{N, _, _}, write, _, ok, I, R} <- Ops, N =/= Owner, I > Cut, R < Healed]) >= 200),
    %% for the log: the reads served marked stale, if they counted
    Stale = [Op || {_, stale_read, _, Op} <- Notes],
    WithStale = dspex_lincheck:check(0, Ops ++ Stale),
    ct:pal("owner ~p cut off, ~p owned the session meanwhile; ~p reads served marked stale (left out); "
           "with them the history would be ~P", [Owner, During, length(Stale), WithStale, 30]),
    {comment, comment(Sum)}.

%% The harness can fail: with async replication and the replica's pool
%% process suspended (its copy frozen at 0), readers on the replica node
%% that read the local copy (`dspex_cluster:local_apply/2', not routed to
%% the owner) return 0 after writes were acknowledged. The checker must
%% find it and point at such a read.
-spec reads_of_a_lagging_replica_copy_are_a_violation(list()) -> ok.
reads_of_a_lagging_replica_copy_are_a_violation(_Config) ->
    Peers = dspex_cluster_SUITE:start_cluster("lin", #{replicas => 1, replication => async}),
    put(peers, Peers),
    S = <<"lin_lag">>,
    [{_, PA} | _] = Peers,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PRep = peer_of(Rep, Peers),
    ok = dspex_cluster_SUITE:wait_until(fun() -> peer:call(PRep, dspex_cluster, local_apply, [get_value, [S, x]])
                                                     =:= {ok, 0} end, 10000, replica_copy),
    ok = peer:call(PRep, sys, suspend, [dspex_cluster_replica:name(S)]),
    PColl = peer_of(Owner, Peers),
    start_clients(Peers, S, PColl, fun(N) when N =:= Rep -> [local, local]; (_) -> [any, majority] end),
    ok = await_ops(PColl, #{ops => 1000, writes => 200}),
    Ops = stop_clients(PColl),
    ok = peer:call(PRep, sys, resume, [dspex_cluster_replica:name(S)]),
    %% a read of the frozen copy invoked after a write was acknowledged
    FirstAck = lists:min([R || {_, write, _, ok, _, R} <- Ops]),
    ?assert(lists:any(fun({{N, r, _}, read, _, {ok, 0}, I, _}) -> N =:= Rep andalso I > FirstAck; (_) -> false end,
                      Ops)),
    {violation, Info} = dspex_lincheck:check(0, Ops),
    ct:pal("~p", [Info]),
    ?assertMatch(#{reason := not_linearizable}, Info),
    ?assertMatch([#{proc := {Rep, r, _}, op := read, value := 0}], maps:get(blocking, Info)),
    ok.

%% Found by the kill test's restart: a node that starts again joins the
%% membership group (other nodes see it live and, as the session's owner,
%% route reads to it) before its membership server has published its first
%% view; a read or owner call arriving then crashed on the missing view, and
%% the caller raised `badarg' as if its own arguments were wrong (41 reads
%% in one run). Here the owner's view is removed, as it is while the node
%% starts: a read and a watch from the third node are routed again
%% (`[dspex, cluster, route, retry]' with reason `starting') and succeed once
%% the view is there.
-spec calls_routed_to_a_node_without_a_view_yet_are_routed_again(list()) -> ok.
calls_routed_to_a_node_without_a_view_yet_are_routed_again(_Config) ->
    %% (the calls retry until the view is back: however loaded the machine,
    %% well within this deadline)
    {Peers, S, Owner} = setup(<<"lin_start">>, #{route_deadline_ms => 60000}),
    [{_, PA} | _] = Peers,
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    [{_, PT}] = [X || {N, _} = X <- Peers, N =/= Owner, N =/= Rep],
    PO = peer_of(Owner, Peers),
    ok = peer:call(PT, dspex_cluster_SUITE, events_start, [lin_retry, [[dspex, cluster, route, retry]]]),
    true = peer:call(PO, persistent_term, erase, [{dspex_cluster, view}]),
    Watcher = peer:call(PT, erlang, whereis, [init]),
    ok = peer:call(PT, dspex_cluster_SUITE, spawn_call, [lin_read, dspex_store, get_value, [S, x]]),
    ok = peer:call(PT, dspex_cluster_SUITE, spawn_call, [lin_watch, dspex_store, watch, [S, [x], Watcher]]),
    Starting = fun() -> lists:usort([Op || {_, _, #{reason := starting, op := Op}}
                                               <- peer:call(PT, dspex_cluster_SUITE, events_get, [lin_retry])]) end,
    ok = dspex_cluster_SUITE:wait_until(fun() -> length(Starting()) =:= 2 end, 5000, both_routed_again),
    ok = peer:call(PO, dspex_cluster_members, bump, []),
    ?assertEqual({ok, 0}, peer:call(PT, dspex_cluster_SUITE, await_result, [lin_read, 20000], 30000)),
    ?assert(is_reference(peer:call(PT, dspex_cluster_SUITE, await_result, [lin_watch, 20000], 30000))),
    ct:pal("routed again while the owner had no view: ~p", [Starting()]),
    ok.

%%% helpers -----------------------------------------------------------------------

%% Three peers lin_a, lin_b, lin_c (sync, R = 1, and Conf), session S with x = 0.
setup(S) -> setup(S, #{}).

setup(S, Conf) ->
    Peers = dspex_cluster_SUITE:start_cluster("lin", maps:merge(#{replicas => 1, replication => sync}, Conf)),
    put(peers, Peers),
    [{_, PA} | _] = Peers,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [S]),
    {Peers, S, Owner}.

peer_of(Node, Peers) -> proplists:get_value(Node, Peers).

other_than(Node, Peers) -> hd([N || {N, _} <- Peers, N =/= Node]).

start_clients(Peers, S, PColl) ->
    start_clients(Peers, S, PColl, fun(_) -> [any, majority] end).

%% ReadModes(Node): the read modes of the node's readers.
start_clients(Peers, S, PColl, ReadModes) ->
    CollNode = peer:call(PColl, erlang, node, []),
    ok = peer:call(PColl, ?MODULE, collector_start, []),
    [ok = peer:call(P, ?MODULE, clients_start, [CollNode, S, node_index(N, Peers), 2, ReadModes(N), 0])
     || {N, P} <- Peers],
    ok.

node_index(Node, Peers) ->
    length(lists:takewhile(fun({N, _}) -> N =/= Node end, Peers)) + 1.

%% The counts of one collector, or the sum of several.
count(Colls) when is_list(Colls) ->
    lists:foldl(fun(P, #{ops := O, writes := W}) -> #{ops := O1, writes := W1} = count(P),
                                                    #{ops => O + O1, writes => W + W1} end,
                #{ops => 0, writes => 0}, Colls);
count(PColl) -> peer:call(PColl, ?MODULE, collector_count, []).

%% Bounded polling of the collector's counts (operations returned, writes
%% acknowledged).
await_ops(PColl, #{ops := N, writes := W}) ->
    dspex_cluster_SUITE:wait_until(fun() -> #{ops := O, writes := OW} = count(PColl), O >= N andalso OW >= W end,
                                   60000, {ops, N, writes, W}).

stop_clients(PColl) ->
    {Ops, _} = stop_collectors([PColl]),
    Ops.

%% Stops the clients of every collector given: their histories merged, and
%% the notes (outcomes left out or unknown); none unexpected.
stop_collectors(Colls) ->
    Stopped = [peer:call(P, ?MODULE, collector_stop, [60000], 70000) || P <- Colls],
    Ops = lists:append([O || {O, _} <- Stopped]),
    Notes = lists:append([N || {_, N} <- Stopped]),
    ct:pal("client notes (outcomes left out of the history or taken as unknown): ~p", [Notes]),
    ?assertEqual([], [N || {_, unexpected, _} = N <- Notes]),
    {Ops, Notes}.

%% Checks the history and that it is not trivial: at least `ops' operations
%% and `writes' acknowledged writes, every client took part, operations of
%% different clients overlapped, and every writer's values were read by
%% other clients. On a violation the history is kept in priv_dir.
check(Config, Ops, #{ops := MinOps, writes := MinWrites, procs := Procs} = Need) ->
    Sum = dspex_lincheck:summary(Ops),
    ct:pal("history: ~p", [Sum]),
    {Micros, Res} = timer:tc(fun() -> dspex_lincheck:check(0, Ops) end),
    ct:pal("checked in ~p ms: ~P", [Micros div 1000, Res, 60]),
    case Res of
        ok -> ok;
        _ ->
            File = filename:join(?config(priv_dir, Config), "history.etf"),
            ok = file:write_file(File, term_to_binary(Ops)),
            ct:pal("history kept in ~s (binary_to_term, then dspex_lincheck:check(0, Ops))", [File])
    end,
    ?assertEqual(ok, Res),
    #{ops := N, writes_ok := W, procs := P, overlaps := Ov, reads_of_writer := RW} = Sum,
    ?assert(N >= MinOps),
    ?assert(W >= MinWrites),
    ?assertEqual(Procs, P),
    ?assert(Ov >= N div 2),
    ?assertEqual([], [Wr || {Wr, 0} <- maps:to_list(RW)]),
    ?assertEqual(maps:get(writers, Need, 6), map_size(RW)),
    %% reads on every node saw written values
    ?assertEqual(3, length(lists:usort([Node || {{Node, r, _}, read, _, {ok, V}, _, _} <- Ops, V =/= 0]))),
    Sum.

%% {Proc, operations done, reads of a written value (not the initial 0)}
per_client(Ops) ->
    lists:sort(maps:to_list(lists:foldl(fun(Op, M) ->
                                                 K = element(1, Op),
                                                 {A, B} = maps:get(K, M, {0, 0}),
                                                 Seen = case Op of {_, read, _, {ok, V}, _, _} when V =/= 0 -> 1; _ -> 0 end,
                                                 M#{K => {A + 1, B + Seen}}
                                         end, #{}, Ops))).

comment(#{ops := N, writes_ok := W, writes_unknown := U, overlaps := Ov}) ->
    io_lib:format("~p ops, ~p writes acknowledged, ~p unknown, ~p overlapping pairs: linearizable", [N, W, U, Ov]).

%%% the collector, on a peer ------------------------------------------------------

-spec collector_start() -> ok.
collector_start() ->
    Pid = spawn(?MODULE, collector_loop, [#{clients => #{}, pending => #{}, ops => [], notes => [],
                                            count => 0, writes => 0}]),
    register(?COLLECTOR, Pid),
    ok.

-spec collector_count() -> #{ops := non_neg_integer(), writes := non_neg_integer()}.
collector_count() ->
    ?COLLECTOR ! {count, self()},
    receive {?COLLECTOR, C} -> C after 30000 -> exit(collector_not_answering) end.

%% Stops every client (each ends its operation first), waits for them (or
%% their death), and returns {Ops, Notes}: a write still pending (its node
%% died) is unknown, a read still pending is dropped.
-spec collector_stop(non_neg_integer()) -> {[dspex_lincheck:op()], [tuple()]}.
collector_stop(Timeout) ->
    ?COLLECTOR ! {stop, self(), Timeout},
    receive {?COLLECTOR, R} -> R after Timeout + 5000 -> exit(collector_not_answering) end.

-spec collector_loop(map()) -> term().
collector_loop(#{clients := Cs, pending := Pend, ops := Ops, notes := Notes, count := N, writes := W} = St) ->
    receive
        {hello, Pid, Proc} ->
            monitor(process, Pid),
            collector_loop(St#{clients := Cs#{Pid => Proc}});
        {invoke, Pid, F, V} ->
            %% an operation whose return never comes was invoked after this
            T = os:perf_counter(nanosecond),
            Pid ! {?COLLECTOR, go},
            collector_loop(St#{pending := Pend#{Pid => {F, V, T}}});
        {return, Pid, Op, Note} ->
            Notes2 = case Note of
                         none -> Notes;
                         _ -> [Note | Notes]
                     end,
            {N2, W2} = case Op of
                           none -> {N, W};
                           {_, write, _, ok, _, _} -> {N + 1, W + 1};
                           _ -> {N + 1, W}
                       end,
            Ops2 = case Op of
                       none -> Ops;
                       _ -> [Op | Ops]
                   end,
            collector_loop(St#{pending := maps:remove(Pid, Pend), ops := Ops2, notes := Notes2,
                               count := N2, writes := W2});
        {count, From} ->
            From ! {?COLLECTOR, #{ops => N, writes => W}},
            collector_loop(St);
        {stop, From, Timeout} ->
            [Pid ! stop || Pid <- maps:keys(Cs)],
            Deadline = erlang:monotonic_time(millisecond) + Timeout,
            St2 = collect_rest(maps:keys(Cs), Deadline, St),
            #{pending := Left, ops := Ops3, notes := Notes3} = St2,
            Unknown = [{maps:get(Pid, Cs), write, V, unknown, T, infinity}
                       || {Pid, {write, V, T}} <- maps:to_list(Left)],
            From ! {?COLLECTOR, {lists:reverse(Ops3, Unknown),
                                 [{maps:get(Pid, Cs), pending_at_stop, F} || {Pid, {F, _, _}} <- maps:to_list(Left)]
                                 ++ lists:reverse(Notes3)}}
    end.

%% Receives the last returns, until each client said `done' or went down.
collect_rest([], _Deadline, St) -> St;
collect_rest(Live, Deadline, #{pending := Pend, ops := Ops, notes := Notes} = St) ->
    Wait = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {invoke, Pid, F, V} ->
            T = os:perf_counter(nanosecond),
            Pid ! {?COLLECTOR, go},
            collect_rest(Live, Deadline, St#{pending := Pend#{Pid => {F, V, T}}});
        {return, Pid, Op, Note} ->
            collect_rest(Live, Deadline,
                         St#{pending := maps:remove(Pid, Pend),
                             ops := case Op of none -> Ops; _ -> [Op | Ops] end,
                             notes := case Note of none -> Notes; _ -> [Note | Notes] end});
        {done, Pid} -> collect_rest(Live -- [Pid], Deadline, St);
        {'DOWN', _, process, Pid, _} -> collect_rest(Live -- [Pid], Deadline, St)
    after Wait ->
        exit({clients_not_stopping, Live})
    end.

%%% the clients, on each peer ---------------------------------------------------

%% Writers and readers of `x' of `S' on this node: process names
%% {node(), w | r, K}; writer values NodeIdx * 10^8 + K * 10^7 + 1, 2, ...;
%% a reader per read mode given (`any', `majority', or `local': the node's
%% own copy, not routed). K counts from Base + 1 (clients started again on
%% a restarted node take new names and values).
-spec clients_start(node(), binary(), pos_integer(), non_neg_integer(), [any | majority | local], non_neg_integer()) -> ok.
clients_start(CollNode, S, NodeIdx, Writers, ReadModes, Base) ->
    Coll = {?COLLECTOR, CollNode},
    [spawn(?MODULE, writer_loop, [Coll, S, {node(), w, K}, NodeIdx * 100000000 + K * 10000000 + 1])
     || K <- lists:seq(Base + 1, Base + Writers)],
    [spawn(?MODULE, reader_loop, [Coll, S, {node(), r, K}, Mode])
     || {K, Mode} <- lists:zip(lists:seq(Base + 1, Base + length(ReadModes)), ReadModes)],
    ok.

-spec writer_loop({atom(), node()}, binary(), tuple(), integer()) -> term().
writer_loop(Coll, S, Proc, V) ->
    Coll ! {hello, self(), Proc},
    writer_loop(Coll, S, Proc, V, 0).

%% (a write refused at once, `no_quorum' on a cut-off node, is followed by
%% a pause of 1 ms rather than thousands of refusals)
writer_loop(Coll, S, Proc, V, Pause) ->
    receive
        stop -> Coll ! {done, self()}
    after Pause ->
        invoke(Coll, write, V),
        I = os:perf_counter(nanosecond),
        Res = (catch dspex_store:set(S, x, V)),
        R = os:perf_counter(nanosecond),
        {Op, Note} = case Res of
                         {ok, _} -> {{Proc, write, V, ok, I, R}, none};
                         {error, {retry, _} = Why} -> {{Proc, write, V, unknown, I, infinity}, {Proc, unknown, Why}};
                         {error, {unavailable, _} = Why} -> {none, {Proc, nothing_written, Why}};
                         {error, no_quorum} -> {none, {Proc, nothing_written, no_quorum}};
                         Other -> {{Proc, write, V, unknown, I, infinity}, {Proc, unexpected, Other}}
                     end,
        Coll ! {return, self(), Op, Note},
        writer_loop(Coll, S, Proc, V + 1, case Op of none -> 1; _ -> 0 end)
    end.

-spec reader_loop({atom(), node()}, binary(), tuple(), any | majority | local) -> term().
reader_loop(Coll, S, Proc, Mode) ->
    _ = Mode =/= local andalso dspex_cluster:read_mode(Mode),
    Coll ! {hello, self(), Proc},
    reader_loop(Coll, S, Proc, Mode, go).

reader_loop(Coll, S, Proc, Mode, go) ->
    receive
        stop -> Coll ! {done, self()}
    after 1 ->
        %% (1 ms between reads: readers on the owner would otherwise flood
        %% the history with local reads)
        invoke(Coll, read, undefined),
        I = os:perf_counter(nanosecond),
        Res = case Mode of
                  local -> (catch dspex_cluster:local_apply(get_value, [S, x]));
                  _ -> (catch dspex_store:get_value(S, x))
              end,
        R = os:perf_counter(nanosecond),
        Status = case Mode of
                     local -> #{status => current};
                     _ -> dspex_cluster:last_read()
                 end,
        {Op, Note} = case {Res, Status} of
                         {{ok, V}, #{status := current}} -> {{Proc, read, undefined, {ok, V}, I, R}, none};
                         {{ok, V}, #{status := stale} = St} ->
                             {none, {Proc, stale_read, St, {Proc, read, undefined, {ok, V}, I, R}}};
                         {{error, _} = E, _} -> {{Proc, read, undefined, fail, I, R}, {Proc, failed_read, E}};
                         {Other, _} -> {{Proc, read, undefined, fail, I, R}, {Proc, unexpected, Other}}
                     end,
        Coll ! {return, self(), Op, Note},
        reader_loop(Coll, S, Proc, Mode, go)
    end.

invoke(Coll, F, V) ->
    Coll ! {invoke, self(), F, V},
    receive {?COLLECTOR, go} -> ok after 30000 -> exit(collector_not_answering) end.
