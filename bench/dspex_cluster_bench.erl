%% @doc `make bench' (cluster part): write throughput of a 3-node cluster with
%% sync replication (R = 1) against a single node without a cluster, in the
%% same run: on the owner with 1, 4 and 16 writers, on sessions of their own
%% or on one session, with the first writer's p50/p99 latency, the replica
%% lag sampled while the writers run (versions) and how long the replica
%% takes to catch up once they stop (ms), and the batches of the link
%% (records per batch, issue #21); forwarded from another node; and failover time (owner killed with kill -9 -> first successful
%% write from another node; also with the new owner's membership lagging
%% 300 ms). Three `peer' nodes on this machine. Also the
%% routed graph, access-control, lock and watch calls made on the session's
%% owner against the same calls made on another node (forwarded). The writes
%% part reports the CPU time per write of the owner's and the replica's node
%% (`erlang:statistics(runtime)': independent of other load on the machine);
%% `replica_apply/0' measures a replica's apply step alone.
-module(dspex_cluster_bench).

-export([main/0, main/1, start/1, writers/3, writers/4, owned_writers/4, failover_probe/2, routed_ops/2]).
-export([start/2, stop/1, replica_apply/0, replica_apply_on/4]).

-define(SECONDS, 2).
-define(LAG_MS, 300).
%% the peers share the 2 cores with this node and with each other: schedulers
%% that spin while idle would take the CPU the others need
-define(PEER_ARGS, ["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"]).

main() -> main(all).

%% `main(writes)': the write throughput part only (no routed calls, no failover).
main(Parts) ->
    io:format("~n== dspex_cluster: sync replication (R = 1, 3 peer nodes on this host) ==~n", []),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    Single1 = writers(<<"single">>, 1, ?SECONDS),
    Single4 = writers(<<"single4">>, 4, ?SECONDS),
    Counts = [1, 4, 16],
    SingleN = [{N, Same, writers(iolist_to_binary(io_lib:format("sgl~b~s", [N, Same])), N, ?SECONDS, Same)}
               || N <- Counts, Same <- [diff, same], not (N =:= 1 andalso Same =:= same)],
    application:stop(dspex_bridge),
    Peers = start("dspex_bench"),
    [{_, PA} | _] = Peers,
    {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [<<"c1_0">>]),
    POwner = proplists:get_value(Owner, Peers),
    [{_, POther} | _] = [X || {N, _} = X <- Peers, N =/= Owner],
    OnOwner1 = peer:call(POwner, ?MODULE, writers, [<<"c1">>, 1, ?SECONDS], 60000),
    OwnedN = [{N, Same, peer:call(POwner, ?MODULE, owned_writers,
                                  [iolist_to_binary(io_lib:format("own~b~s", [N, Same])), N, ?SECONDS, Same], 120000)}
              || N <- Counts, Same <- [diff, same], not (N =:= 1 andalso Same =:= same)],
    Remote1 = peer:call(POther, ?MODULE, writers, [<<"c2">>, 1, ?SECONDS], 60000),
    Remote4 = peer:call(POther, ?MODULE, writers, [<<"c3">>, 4, ?SECONDS], 60000),
    RS = <<"c1_0">>,   % owned by Owner
    {ok, _} = peer:call(PA, dspex_store, register, [RS, y, integer, 0]),
    ok = peer:call(PA, dspex_graph, add_dependency, [RS, x, y]),
    ok = peer:call(PA, dspex_acl, set_permissions, [RS, x, [#{session_pattern => <<"other*">>, permissions => [read]}]]),
    OwnerOps = peer:call(POwner, ?MODULE, routed_ops, [RS, 1], 60000),
    OtherOps = peer:call(POther, ?MODULE, routed_ops, [RS, 1], 60000),
    stop(Peers),
    Row = fun(Name, R, Base) -> io:format("  ~-48s ~12b writes/s  (~.3fx single node)~n", [Name, round(R), R / Base]) end,
    io:format("  ~-48s ~12b writes/s~n", ["single node, no cluster, 1 writer", round(Single1)]),
    io:format("  ~-48s ~12b writes/s~n", ["single node, no cluster, 4 writers", round(Single4)]),
    Row("cluster, 1 writer on the owner", OnOwner1, Single1),
    io:format("  sync writes on the owner (sessions owned by it) vs single node, same writers:~n", []),
    [begin
         #{rate := R} = M = proplists:get_value({N, Same}, [{{A, B}, C} || {A, B, C} <- OwnedN]),
         Base = proplists:get_value({N, Same}, [{{A, B}, C} || {A, B, C} <- SingleN]),
         io:format("  ~2b writer(s), ~-14s ~9b writes/s  single node ~9b/s  (~.3fx)  p50 ~b us  p99 ~b us"
                   "  replica lag mean ~.2f max ~b versions, drain ~b ms, ~s"
                   "  CPU per write: owner ~.1f us, replica ~.1f us, fast path ~b%~n",
                   [N, case Same of diff -> "own sessions"; same -> "one session" end, round(R), round(Base),
                    R / Base, maps:get(p50, M), maps:get(p99, M), maps:get(lag_mean, M), maps:get(lag_max, M),
                    maps:get(drain_ms, M), maps:get(link, M), maps:get(cpu_owner_us, M), maps:get(cpu_replica_us, M),
                    maps:get(fast_pct, M)])
     end || {N, Same, _} <- OwnedN],
    Row("cluster, 1 writer on another node (forwarded)", Remote1, Single1),
    Row("cluster, 4 writers on another node, 4 sessions", Remote4, Single4),
    io:format("  routed calls, on the owner vs on another node (forwarded), 1 caller:~n", []),
    [io:format("  ~-48s ~9b ops/s on the owner, ~9b ops/s forwarded  (~.3fx)~n",
               [K, round(V), round(proplists:get_value(K, OtherOps)), proplists:get_value(K, OtherOps) / V])
     || {K, V} <- OwnerOps],
    other_modes(),
    Parts =:= all andalso failovers(),
    Parts =:= all andalso replica_apply(),
    ok.

%% 16 writers on the owner (own sessions, then one session) with two
%% replicas (sync) and with async replication (R = 1), a cluster each: the
%% owner's fast path covers both (issue #21).
other_modes() ->
    io:format("  16 writers on the owner, other replication modes (a cluster each):~n", []),
    [begin
         Peers = start("dspex_bench_" ++ Name, Conf),
         [{_, PA} | _] = Peers,
         {ok, Owner} = peer:call(PA, dspex_cluster, owner_of, [<<"m_0">>]),
         POwner = proplists:get_value(Owner, Peers),
         [begin
              M = peer:call(POwner, ?MODULE, owned_writers,
                            [iolist_to_binary(io_lib:format("~s~s", [Name, Same])), 16, ?SECONDS, Same], 120000),
              io:format("  ~-10s 16 writers, ~-14s ~9b writes/s  p50 ~b us  p99 ~b us  replica drain ~b ms"
                        "  CPU per write: owner ~.1f us, replica ~.1f us, fast path ~b%~n",
                        [Tag, case Same of diff -> "own sessions"; same -> "one session" end, round(maps:get(rate, M)),
                         maps:get(p50, M), maps:get(p99, M), maps:get(drain_ms, M), maps:get(cpu_owner_us, M),
                         maps:get(cpu_replica_us, M), maps:get(fast_pct, M)])
          end || Same <- [diff, same]],
         stop(Peers)
     end || {Name, Tag, Conf} <- [{"r2", "sync R=2", #{replicas => 2}}, {"async", "async R=1", #{replication => async}}]],
    ok.

%% `replica_apply()': what applying sync batches costs a replica, the
%% replica's step alone (issue #21): batches of replayed sets of one session,
%% as the owner ships them (event log on), are handed to the replica pool
%% process serving the session, as its receiver would, and the node's CPU
%% time per record is measured: with runs of sets applied by one NIF call
%% (`dspex_nif:replica_apply_batch/3') and, in the same run, one record at a
%% time through `dspex_store:set/4' (records carrying an option the NIF path
%% leaves to the per-record path, which `set' ignores).
replica_apply() ->
    io:format("~n== dspex_cluster: a replica applying batches of sets (event log on) ==~n", []),
    Peers = start("dspex_rapply"),
    [{_, PA} | _] = Peers,
    S = <<"rapply">>,
    {ok, _} = peer:call(PA, dspex_store, create_session, [S]),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {_, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    PR = proplists:get_value(Rep, Peers),
    [begin
         R = peer:call(PR, ?MODULE, replica_apply_on, [S, Size, 20000, How], 300000),
         io:format("  batches of ~4b sets, ~-24s ~6.2f us CPU per record on the node, the pool process's step "
                   "~5.2f us per record (median batch; ~b records/s)~n",
                   [Size, case How of nif -> "one NIF call per batch:"; each -> "one set/4 per record:" end,
                    maps:get(cpu_us, R), maps:get(step_us, R), round(maps:get(rate, R))])
     end || Size <- [1, 4, 16, 64], How <- [nif, each, nif, each]],
    stop(Peers),
    ok.

%% Runs on the replica: `Total' records in batches of `Size', CPU per record.
replica_apply_on(S, Size, Total, How) ->
    Pool = dspex_cluster_replica:name(S),
    T0 = erlang:monotonic_time(),
    C0 = cpu_ms(node()),
    Steps = apply_batches(S, Pool, Size, Total div Size, How, []),
    ok = dspex_events:await(),
    C1 = cpu_ms(node()),
    Secs = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond) / 1.0e6,
    N = Size * (Total div Size),
    Step = lists:nth(length(Steps) div 2 + 1, lists:sort(Steps)),
    #{cpu_us => (C1 - C0) * 1000 / N, rate => N / Secs, step_us => Step / Size}.

%% Returns the time each batch took the pool process (us, from the hand-over
%% to its answer: the apply step, without the event log's writer thread).
apply_batches(_, _, _, 0, _, Acc) -> Acc;
apply_batches(S, Pool, Size, K, How, Acc) ->
    {S, E, Seq0, Owner, _, _, _} = dspex_cluster_replica:row(S),
    {ok, #{version := Ver0}} = dspex_cluster:local_apply(get, [S, x]),
    Pre0 = dspex_events:last_sequence(S),
    Extra = case How of nif -> #{}; each -> #{bench_per_record => true} end,
    Recs = [{I, S, E, Seq0 + I, {ev, Pre0 + I - 1, Pre0 + I,
                                 {op, set, [S, x, I, Extra#{expected_version => Ver0 + I - 1}], {ok, Ver0 + I}}, []}}
            || I <- lists:seq(1, Size)],
    Ref = make_ref(),
    T0 = erlang:monotonic_time(),
    Pool ! {apply_batch, self(), Ref, Owner, Recs},
    receive
        {applied, Ref, []} ->
            Us = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, nanosecond) / 1000,
            apply_batches(S, Pool, Size, K - 1, How, [Us | Acc])
    end.

failovers() ->
    Times = [failover_once("dspex_fo" ++ integer_to_list(I), 0) || I <- lists:seq(1, 3)],
    io:format("  failover (owner kill -9 -> first acknowledged write), 3 runs: ~w ms, median ~w ms~n",
              [Times, lists:nth(2, lists:sort(Times))]),
    %% the property the cluster suite no longer asserts as a time: routing
    %% converges within ms of the last lagging view catching up (it used to
    %% wait for the 8 s routing deadline when the new owner's view lagged)
    Lagged = [failover_once("dspex_fl" ++ integer_to_list(I), ?LAG_MS) || I <- lists:seq(1, 3)],
    io:format("  failover, the new owner's membership ~b ms late, 3 runs: ~w ms, median ~w ms "
              "(~b ms is the lag itself)~n", [?LAG_MS, Lagged, lists:nth(2, lists:sort(Lagged)), ?LAG_MS]),
    ok.

%% N processes, each writing its own session for Secs seconds; writes/s in total.
writers(Prefix, N, Secs) -> writers(Prefix, N, Secs, diff).

%% As writers/3; `same': the N processes write one session (each its own variable).
writers(Prefix, N, Secs, Same) ->
    Ss = sessions(Prefix, N, Same, fun(_) -> true end),
    element(1, run(Ss, Secs, false, fun() -> ok end)).

%% Runs on a cluster node: like writers/4 on sessions this node owns (so every
%% write is committed here and replicated), plus the latency percentiles of
%% the first writer (us) and the replica lag sampled every 10 ms while the
%% writers run (versions of the first session behind the owner), and how long
%% the replica takes to catch up once they stop (ms).
owned_writers(Prefix, N, Secs, Same) ->
    Ss = sessions(Prefix, N, Same, fun(S) -> element(1, dspex_cluster_writer:owners(S, dspex_cluster_members:view())) =:= node() end),
    [{S0, _} | _] = Ss,
    %% the lag and CPU of the first replica (R = 2: the other one does the same work)
    {_, [Rep | _]} = dspex_cluster_writer:owners(S0, dspex_cluster_members:view()),
    Lag = fun() -> element(3, dspex_cluster_replica:current_row(S0)) - element(3, erpc:call(Rep, dspex_cluster_replica, row, [S0])) end,
    Link0 = link_stats(Rep),
    Parent = self(),
    Cpu0 = {cpu_ms(node()), cpu_ms(Rep)},
    Fast0 = fast_sets(),
    Sampler = spawn_link(fun() -> Parent ! {lag, sample(Lag, [])} end),
    {Rate, Lats} = run(Ss, Secs, true, fun() -> Sampler ! stop end),
    Lags = receive {lag, L} -> L end,
    T0 = erlang:monotonic_time(millisecond),
    catch_up(Lag),
    Drain = erlang:monotonic_time(millisecond) - T0,
    %% CPU time of each node's emulator over the run and the replica's catch-up
    %% (including this node's lag sampler), per write: independent of the load
    %% other programs put on the machine
    Writes = max(1, round(Rate * Secs)),
    CpuOwner = (cpu_ms(node()) - element(1, Cpu0)) * 1000 / Writes,
    CpuRep = (cpu_ms(Rep) - element(2, Cpu0)) * 1000 / Writes,
    %% the share of the writes the owner's fast path took (issue #21: the set
    %% NIF queued their replication record, no writer hop)
    FastPct = round(100 * (fast_sets() - Fast0) / Writes),
    Link = case {Link0, link_stats(Rep)} of
               {#{batches := B0, records := R0}, #{batches := B1, records := R1, max_batch := MaxB}} when B1 > B0 ->
                   io_lib:format("~.1f records/batch (largest ~b)", [(R1 - R0) / (B1 - B0), MaxB]);
               _ -> "no batches (one call per write)"
           end,
    Sorted = list_to_tuple(lists:sort(Lats)),
    Pct = fun(P) -> element(max(1, round(P * tuple_size(Sorted))), Sorted) end,
    #{rate => Rate, p50 => Pct(0.50), p99 => Pct(0.99), lag_mean => lists:sum(Lags) / max(1, length(Lags)),
      lag_max => lists:max([0 | Lags]), drain_ms => Drain, link => Link,
      cpu_owner_us => CpuOwner, cpu_replica_us => CpuRep, fast_pct => FastPct}.

%% Sets the owner's fast path took so far (0 on code without it).
fast_sets() ->
    try element(1, dspex_nif:repl_stats()) catch error:undef -> 0 end.

%% The CPU time (user and system, every scheduler and thread) the emulator of
%% `Node' used so far, ms.
cpu_ms(Node) when Node =:= node() -> element(1, erlang:statistics(runtime));
cpu_ms(Node) -> element(1, erpc:call(Node, erlang, statistics, [runtime])).

link_stats(Rep) -> catch dspex_cluster_shipper:stats(Rep).

sessions(Prefix, N, Same, Pick) ->
    Ss = pick(Prefix, 0, case Same of same -> 1; diff -> N end, Pick),
    [begin {ok, _} = dspex_store:create_session(S),
           [{ok, _} = dspex_store:register(S, var(I), integer, 0) || I <- lists:seq(0, N - 1)]
     end || S <- Ss],
    case Same of
        same -> [{hd(Ss), var(I)} || I <- lists:seq(0, N - 1)];
        diff -> [{S, var(0)} || S <- Ss]
    end.

var(0) -> x;
var(I) -> list_to_atom("x" ++ integer_to_list(I)).

pick(_, _, 0, _) -> [];
pick(Prefix, I, K, Pick) ->
    S = <<Prefix/binary, "_", (integer_to_binary(I))/binary>>,
    case Pick(S) of
        true -> [S | pick(Prefix, I + 1, K - 1, Pick)];
        false -> pick(Prefix, I + 1, K, Pick)
    end.

run(SKs, Secs, Timed, Stop) ->
    Parent = self(),
    Until = erlang:monotonic_time(millisecond) + Secs * 1000,
    Pids = [spawn_link(fun() -> Parent ! {done, self(), loop(S, K, 0, Until, Timed andalso I =:= 1, [])} end)
            || {I, {S, K}} <- lists:zip(lists:seq(1, length(SKs)), SKs)],
    Res = [receive {done, P, C} -> C end || P <- Pids],
    Stop(),
    Total = lists:sum([C || {C, _} <- Res]),
    {Total / Secs, lists:append([L || {_, L} <- Res])}.

loop(S, K, C, Until, Timed, Lats) ->
    case C rem 64 =:= 0 andalso erlang:monotonic_time(millisecond) >= Until of
        true when Timed -> {C, Lats};
        true -> {C, []};
        false when Timed ->
            T0 = erlang:monotonic_time(),
            {ok, _} = dspex_store:set(S, K, C),
            Us = erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond),
            loop(S, K, C + 1, Until, Timed, [Us | Lats]);
        false ->
            {ok, _} = dspex_store:set(S, K, C),
            loop(S, K, C + 1, Until, Timed, Lats)
    end.

sample(Lag, Acc) ->
    receive stop -> Acc
    after 10 -> sample(Lag, [Lag() | Acc])
    end.

catch_up(Lag) ->
    case Lag() =< 0 of
        true -> ok;
        false -> receive after 1 -> catch_up(Lag) end
    end.

%% Runs on a peer: calls per second of each routed operation on session S
%% (variables x -> y, a read rule on x), one caller, Secs seconds each.
routed_ops(S, Secs) ->
    _ = dspex_store:watch(S, [x], self()),
    Ops = [{"dspex_graph:dependencies/2", fun() -> {ok, _} = dspex_graph:dependencies(S, y) end},
           {"dspex_acl:check_access/5", fun() -> ok = dspex_acl:check_access(S, x, <<"other_1">>, read, #{}) end},
           {"dspex_locks:acquire/4 + release/1", fun() ->
                                                      {ok, L} = dspex_locks:acquire(S, y, bench, #{}),
                                                      ok = dspex_locks:release(L)
                                                  end},
           {"set + its watch message back", fun() ->
                                                  {ok, _} = dspex_store:set(S, x, erlang:unique_integer([positive])),
                                                  receive {dspex_variable, _, S, <<"x">>, _, _, _} -> ok end
                                              end}],
    %% one call of each first, untimed: the first write after the lock loop
    %% copies that loop's events (lock_acquired/released: tens of thousands,
    %% not replicated with a change) into the replica's log, about a second
    %% (see README, "Cluster writes and the event log"), which is not the
    %% steady rate of the call
    [{K, begin F(), rate(F, erlang:monotonic_time(millisecond) + Secs * 1000, 0) / Secs end} || {K, F} <- Ops].

rate(F, Until, C) ->
    case C rem 16 =:= 0 andalso erlang:monotonic_time(millisecond) >= Until of
        true -> C;
        false -> F(), rate(F, Until, C + 1)
    end.

owner(P, S) ->
    {ok, _} = peer:call(P, dspex_store, create_session, [S]),
    {ok, O} = peer:call(P, dspex_cluster, owner_of, [S]),
    O.

%% Runs on a surviving node: writes until one is acknowledged after `Killed'
%% left; returns the ms from `T0' (the kill) to that write.
failover_probe(S, T0) ->
    case dspex_store:set(S, x, 1) of
        {ok, _} -> erlang:convert_time_unit(erlang:system_time() - T0, native, millisecond);
        {error, _} -> failover_probe(S, T0)
    end.

%% The client runs on the node that is neither owner nor replica (its writes
%% are forwarded before and after the failover). With `LagMs' > 0 the
%% replica (the owner-to-be) has its membership server suspended before the
%% kill and resumed `LagMs' after it: its view names the dead owner meanwhile.
failover_once(Base, LagMs) ->
    Peers = start(Base),
    [{_, PA} | _] = Peers,
    S = <<"fo">>,
    Owner = owner(PA, S),
    {ok, _} = peer:call(PA, dspex_store, register, [S, x, integer, 0]),
    {Owner, [Rep]} = dspex_cluster_writer:owners(S, peer:call(PA, dspex_cluster_members, view, [])),
    [{_, POther}] = [X || {N, _} = X <- Peers, not lists:member(N, [Owner, Rep])],
    PRep = proplists:get_value(Rep, Peers),
    LagMs > 0 andalso peer:call(PRep, sys, suspend, [dspex_cluster_members]),
    OsPid = peer:call(proplists:get_value(Owner, Peers), os, getpid, []),
    T0 = erlang:system_time(),
    [] = os:cmd("kill -9 " ++ OsPid),
    LagMs > 0 andalso peer:call(PRep, timer, apply_after, [LagMs, sys, resume, [dspex_cluster_members]]),
    Ms = peer:call(POther, ?MODULE, failover_probe, [S, T0], 60000),
    stop(Peers),
    Ms.

start(Base) -> start(Base, #{}).

%% Three peer nodes in one cluster (sync, one replica, unless `Extra' says
%% otherwise) whose configuration also holds `Extra' (say a `cache' map), with their event logs in a
%% temporary directory stop/1 removes.
start(Base, Extra) ->
    Host = hd(string:split(net_adm:localhost(), ".")),
    Paths = lists:append([["-pa", D] || D <- code:get_path(), string:find(D, "_build") =/= nomatch]),
    Peers = [begin
                 {ok, P, Node} = peer:start(#{name => Base ++ "_" ++ X, host => Host, connection => standard_io,
                                              args => ["-setcookie", "dspex_bench", "-connect_all", "false" | ?PEER_ARGS ++ Paths]}),
                 {Node, P}
             end || X <- ["a", "b", "c"]],
    Nodes = [N || {N, _} <- Peers],
    %% event logs in a temporary directory stop/1 removes
    Root = filename:join(os:getenv("TMPDIR", "/tmp"), "dspex_cluster_bench_" ++ os:getpid() ++ "_" ++ Base),
    ok = filelib:ensure_path(Root),
    put({?MODULE, root}, Root),
    [begin
         ok = peer:call(P, application, load, [dspex_bridge]),
         ok = peer:call(P, application, set_env, [dspex_bridge, event_dir, filename:join(Root, atom_to_list(N))]),
         %% no listening ports: a node run on this machine keeps its own
         [ok = peer:call(P, application, set_env, [dspex_bridge, K, V])
          || {K, V} <- [{prometheus_port, 0}, {grpc_enabled, false}, {console_enabled, false}]]
     end || {N, P} <- Peers],
    %% `Extra' may set replicas and replication too
    Conf = (maps:merge(#{replicas => 1, replication => sync}, Extra))#{nodes => Nodes},
    [ok = peer:call(P, application, set_env, [dspex_bridge, cluster, Conf]) || {_, P} <- Peers],
    [{ok, _} = peer:call(P, application, ensure_all_started, [dspex_bridge]) || {_, P} <- Peers],
    wait_live(Peers, Nodes, erlang:monotonic_time(millisecond) + 20000),
    Peers.

wait_live(Peers, Nodes, Deadline) ->
    Ok = lists:all(fun({_, P}) -> maps:get(live, peer:call(P, dspex_cluster, cluster_status, [])) =:= Nodes end, Peers),
    case Ok orelse erlang:monotonic_time(millisecond) > Deadline of
        true -> ok;
        false -> receive after 20 -> ok end, wait_live(Peers, Nodes, Deadline)
    end.

stop(Peers) ->
    [catch peer:stop(P) || {_, P} <- Peers],
    case erase({?MODULE, root}) of
        undefined -> ok;
        Root -> _ = file:del_dir_r(Root), ok
    end.
