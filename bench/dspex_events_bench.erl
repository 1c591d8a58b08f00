%% @doc `make bench': the event log (issue #15), in one run, on this disk.
%%   1. the disk's fsync rate (1-byte write + fsync, one file): the floor of
%%      a one-transaction-per-event log;
%%   2. `sync' acknowledged writes (dspex_store:set/4 with durability sync),
%%      16 concurrent writers, group commit vs one transaction per event
%%      (the same SQLite backend with event_max_batch = 1);
%%   3. `async' sustained ingest (events/s from the commit path, until durable);
%%   4. set/3 with the log on vs off (one process, below saturation: bursts of
%%      1,000 sets, each followed by an untimed wait for the log);
%%   5. state_at of a session with 1,000,000 events (snapshots every 100);
%%   6. the whole VM's CPU time per event (the OS process's, every thread:
%%      schedulers, dirty schedulers, the writer and checkpointer threads; see
%%      cpu_ms/0) of 300,000 set/3 with snapshots every 100 events and without
%%      (snapshot_every 1e9): what the snapshotter costs.
-module(dspex_events_bench).
-export([main/0, pg/0]).

-define(SID, <<"evbench">>).

main() ->
    Root = "_build/bench/events",
    %% DX_EVENTS_BENCH=sync,async,append,set,state_at,snapshots runs only those parts (default: all)
    Parts = case os:getenv("DX_EVENTS_BENCH") of
                false -> [sync, async, append, set, state_at, snapshots];
                P -> [list_to_atom(X) || X <- string:lexemes(P, ",")]
            end,
    io:format("~ndspex_events benchmark (~p schedulers, dir ~s)~n", [erlang:system_info(schedulers_online), Root]),
    [run(Part, Root) || Part <- Parts],
    _ = os:cmd("rm -rf " ++ Root),
    ok.

run(sync, Root) ->
    Fsync0 = fsync_rate(Root),
    sync_ratio(Root, #{}),
    Fsync = (Fsync0 + fsync_rate(Root)) / 2,
    io:format("  disk fsync rate (before and after the sync runs, mean): ~.1f fsyncs/s~n", [Fsync]);
run(async, Root) ->
    {Async, S} = with_log(Root, "async", #{}, fun() -> async_ingest(4, 100000) end),
    io:format("  async ingest (set/3 from 4 processes until durable): ~.1f events/s (goal >= 300000)~n    ~s~n",
              [Async, cpu_stats(S)]);
run(append, Root) ->
    {Append, S} = with_log(Root, "append", #{}, fun() -> append_ingest(4, 100000) end),
    io:format("  async ingest (append/4 from 4 processes until durable): ~.1f events/s~n    ~s~n", [Append, cpu_stats(S)]);
run(set, Root) ->
    %% three rounds, on and off in turn, compared within each round: this machine's speed drifts from one
    %% run to the next (the same log-off loop ran at 3.0 M/s and 5.2 M/s a few seconds apart), and two runs
    %% next to each other drift least; the median of the rounds' ratios is the result
    Rounds = [{with_log(Root, "on", #{}, fun() -> set_rate(100000) end),
               with_log(Root, "off", #{event_log => false}, fun() -> set_rate(100000) end)} || _ <- [1, 2, 3]],
    Pairs = [{On, Off, OnCpu, OffCpu} || {{{On, OnCpu}, _}, {{Off, OffCpu}, _}} <- Rounds],
    io:format("  set/3 one process, log on / off in 3 rounds: ~s; median ratio ~.2f (goal >= 0.6)~n",
              [lists:join(", ", [io_lib:format("~b / ~b = ~.2f", [round(On), round(Off), On / Off]) || {On, Off, _, _} <- Pairs]),
               median([On / Off || {On, Off, _, _} <- Pairs])]),
    io:format("    CPU of the calling scheduler thread per set/3, log on / off: ~s ns; median ratio off / on ~.2f~n",
              [lists:join(", ", [io_lib:format("~.1f / ~.1f", [C1, C0]) || {_, _, C1, C0} <- Pairs]),
               median([C0 / C1 || {_, _, C1, C0} <- Pairs])]);
run(state_at, Root) ->
    {{Build, Worst, Avg}, _} = with_log(Root, "state_at", #{}, fun() -> state_at_bench(1000000) end),
    io:format("  state_at on 1,000,000 events (built in ~.1f s): worst ~.1f ms, mean ~.1f ms over 50 points "
              "(goal <= 100 ms)~n", [Build, Worst, Avg]);
run(snapshots, Root) ->
    {With, _} = with_log(Root, "snap100", #{snapshot_every => 100}, fun() -> snapshot_cpu(300) end),
    {Without, _} = with_log(Root, "snapoff", #{snapshot_every => 1000000000}, fun() -> snapshot_cpu(300) end),
    io:format("  VM CPU per set/3 event, 300,000 in chunks of 1,000 (each awaited): snapshots every 100 ~.2f us, "
              "none ~.2f us: the snapshotter ~.2f us per event~n", [With, Without, With - Without]).

%% `make bench-events-pg': the same sync comparison on PostgreSQL (synchronous_commit = on), conninfo in
%% DX_EVENTS_PG_URL; the server's own fsyncs are its business (the throwaway server's data is on this disk).
pg() ->
    Url = os:getenv("DX_EVENTS_PG_URL"),
    true = is_list(Url) andalso Url =/= "",
    Root = "_build/bench/events_pg",
    io:format("~ndspex_events benchmark on PostgreSQL (~p schedulers)~n", [erlang:system_info(schedulers_online)]),
    Fsync = fsync_rate(Root),
    sync_ratio(Root, #{event_backend => {postgres, Url}}),
    io:format("  disk fsync rate (this process, same disk): ~.1f fsyncs/s~n", [Fsync]),
    _ = os:cmd("rm -rf " ++ Root),
    ok.

%% 16 sync writers: group commit (with and without the gather) against one transaction per event.
sync_ratio(Root, Env) ->
    %% three rounds, group commit and one transaction per event in turn, compared within each round (the
    %% disk's speed drifts); the median of the rounds' ratios is the result, the details are the median round's
    Rounds = [{with_log(Root, "group", Env, fun() -> sync_writers(16, 2000) end),
               with_log(Root, "single", Env#{event_max_batch => 1}, fun() -> sync_writers(16, 300) end)}
              || _ <- [1, 2, 3]],
    Ratio = fun({{{G, _}, _}, {{S, _}, _}}) -> G / S end,
    Median = median([Ratio(R) || R <- Rounds]),
    [{{{Group, GCpu}, GS}, {{_, SCpu}, _}} | _] = [R || R <- Rounds, Ratio(R) =:= Median],
    {{NoGather, _}, NS} = with_log(Root, "nogather", Env#{event_gather_us => -1}, fun() -> sync_writers(16, 2000) end),
    io:format("  sync acked writes, 16 writers, group commit / one transaction per event in 3 rounds: ~s;~n"
              "    median ratio ~.1fx (goal >= 10x), its round: ~.1f acked writes/s (goal >= 20000/s)~n",
              [lists:join(", ", [io_lib:format("~b / ~b = ~.1fx", [round(G), round(S), G / S])
                                 || {{{G, _}, _}, {{S, _}, _}} <- Rounds]), Median, Group]),
    %% with 16 writers a transaction carries at most 16 acks: the ratio is 16 x (one event's transaction time /
    %% a group's cycle), and the part of the cycle that is not the commit is CPU (waking the 16 callers, their
    %% next set, the inserts) shared by this machine's cores
    io:format("    the whole VM's CPU per acked write (the OS process's, every thread): group commit ~.1f us, one transaction "
              "per event ~.1f us; ~b schedulers~n", [GCpu, SCpu, erlang:system_info(schedulers_online)]),
    io:format("    group commit: ~s~n    without the gather (event_gather_us = -1): ~.1f/s, ~s~n",
              [sync_stats(GS), NoGather, sync_stats(NS)]).

median(Xs) -> lists:nth((length(Xs) + 1) div 2, lists:sort(Xs)).

%% What a group commit carried: acknowledged writes per transaction, gathers, the commits' time.
sync_stats(#{acked := A, acked_batches := B, gathers := G, gather_timeouts := T, commit_avg_us := C,
             write_us := W, batches := NB}) ->
    io_lib:format("~.1f acked writes per transaction (~b transactions), ~b gathers (~b ended at the bound), "
                  "commit ~b us (mean of the last ones), ~b us per transaction in write_batch",
                  [A / max(B, 1), B, G, T, C, W div max(NB, 1)]).

%% The writer thread's CPU time per event: in all, in the backend's write_batch, encoding.
cpu_stats(#{writer_cpu_us := C, write_cpu_us := W, encode_cpu_us := E, written := N, batches := B}) ->
    io_lib:format("writer thread CPU per event: ~.2f us (write_batch ~.2f us, encoding ~.2f us), "
                  "~b events in ~b transactions", [C / N, W / N, E / N, N, B]).

%% Runs F with the application started on a fresh event directory.
with_log(Root, Name, Env, F) ->
    Dir = filename:join(Root, Name),
    _ = os:cmd("rm -rf " ++ Dir),
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    Defaults = #{event_dir => Dir, event_log => true, event_max_batch => 8192, event_gather_us => 0, snapshot_every => 100,
                 event_backend => sqlite, grpc_enabled => false,
                 prometheus_enabled => false, metrics_handlers => false},
    maps:foreach(fun(K, V) -> application:set_env(dspex_bridge, K, V) end, maps:merge(Defaults, Env)),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    _ = dspex_store:delete_session(?SID),
    {ok, _} = dspex_store:create_session(?SID, #{ttl => infinity}),
    try
        R = F(),
        {R, case event_log_on(Env) of true -> dspex_events:stats(); false -> #{} end}
    after
        application:stop(dspex_bridge),
        _ = os:cmd("rm -rf " ++ Dir)
    end.

event_log_on(Env) -> maps:get(event_log, Env, true).

fsync_rate(Root) ->
    ok = filelib:ensure_dir(filename:join(Root, "x")),
    File = filename:join(Root, "fsync_probe"),
    {ok, Fd} = file:open(File, [write, raw, binary]),
    T0 = erlang:monotonic_time(),
    N = fsync_loop(Fd, T0, 0),
    Secs = secs(T0),
    ok = file:close(Fd),
    _ = file:delete(File),
    N / Secs.

fsync_loop(Fd, T0, N) ->
    case secs(T0) > 2.0 of
        true -> N;
        false ->
            ok = file:write(Fd, <<"x">>),
            ok = file:sync(Fd),
            fsync_loop(Fd, T0, N + 1)
    end.

%% The CPU time (user + system) the OS process used so far, ms: every thread, the event log's writer and
%% checkpointer threads too, which erlang:statistics(runtime) leaves out (it counts the emulator's own
%% threads: 11 us per acked sync write where the process used 19). /proc/self/stat, in clock ticks.
cpu_ms() ->
    {ok, B} = file:read_file("/proc/self/stat"),
    %% the fields after the command name's closing parenthesis (the name may hold spaces): utime, stime are
    %% the 12th and 13th of them
    [_, Rest] = binary:split(B, <<") ">>),
    Fs = binary:split(Rest, <<" ">>, [global]),
    Ticks = binary_to_integer(lists:nth(12, Fs)) + binary_to_integer(lists:nth(13, Fs)),
    Ticks * 1000 div clock_ticks().

clock_ticks() ->
    case get(clock_ticks) of
        undefined ->
            T = list_to_integer(string:trim(os:cmd("getconf CLK_TCK"))),
            put(clock_ticks, T),
            T;
        T -> T
    end.

secs(T0) -> erlang:convert_time_unit(erlang:monotonic_time() - T0, native, microsecond) / 1.0e6.

%% W writers, each Per sync sets of its own variable; {acked writes/s, the whole VM's CPU us per write}.
sync_writers(W, Per) ->
    [{ok, _} = dspex_store:register(?SID, integer_to_binary(I), integer, 0) || I <- lists:seq(1, W)],
    R0 = cpu_ms(),
    T0 = erlang:monotonic_time(),
    pmap(W, fun(I) ->
                    K = integer_to_binary(I),
                    [{ok, _} = dspex_store:set(?SID, K, N, #{durability => sync}) || N <- lists:seq(1, Per)]
            end),
    Rate = W * Per / secs(T0),
    R1 = cpu_ms(),
    {Rate, (R1 - R0) * 1000 / (W * Per)}.

%% P processes, each Per async sets; events/s until every event is durable.
async_ingest(P, Per) ->
    [{ok, _} = dspex_store:register(?SID, integer_to_binary(I), integer, 0) || I <- lists:seq(1, P)],
    R0 = cpu_ms(),
    T0 = erlang:monotonic_time(),
    pmap(P, fun(I) -> K = integer_to_binary(I), set_loop(K, Per) end),
    Pushed = secs(T0),
    ok = dspex_events:await(),
    Total = secs(T0),
    R1 = cpu_ms(),
    %% the snapshotter may still be storing the last batches' snapshots: its CPU counted too, until it is done
    _ = sys:get_state(dspex_events),
    ok = dspex_events:snapshots_sync(),
    R2 = cpu_ms(),
    io:format("    (the writes returned after ~.2f s, all durable after ~.2f s; the whole VM's CPU "
              "(the OS process's, every thread): ~.2f us per event, "
              "~.2f us until every snapshot due was stored)~n",
              [Pushed, Total, (R1 - R0) * 1000 / (P * Per), (R2 - R0) * 1000 / (P * Per)]),
    P * Per / Total.

set_loop(_, 0) -> ok;
set_loop(K, N) -> {ok, _} = dspex_store:set(?SID, K, N), set_loop(K, N - 1).

append_ingest(P, Per) ->
    T0 = erlang:monotonic_time(),
    pmap(P, fun(_) -> append_loop(Per) end),
    ok = dspex_events:await(),
    P * Per / secs(T0).

append_loop(0) -> ok;
append_loop(N) -> {ok, _} = dspex_events:append(?SID, bench, N, #{}), append_loop(N - 1).

%% One process; sets/s below saturation: bursts of 1,000 sets, timed, each
%% followed by an untimed wait until the log has written them (so the queue
%% never backs up; the writer still runs while the next burst starts). Also
%% the CPU time per set of the scheduler thread that ran the burst (its
%% schedstat; a burst whose process moved to another scheduler is left out):
%% less noisy than the rate on a shared machine, where the other threads of
%% the log (writer, snapshotter) and other programs compete for the cores.
set_rate(N) ->
    {ok, _} = dspex_store:register(?SID, x, integer, 0),
    set_loop(x, 20000),
    _ = dspex_events:await(),
    %% what reading the clock itself costs the thread, taken off each burst's CPU time
    Probe = lists:min([begin
                           S = erlang:system_info(scheduler_id),
                           C0 = thread_cpu_ns(S),
                           thread_cpu_ns(S) - C0
                       end || _ <- lists:seq(1, 20)]),
    {Time, Cpu, Bursts} =
        lists:foldl(fun(_, {T, C, B}) ->
                            Sched = erlang:system_info(scheduler_id),
                            C0 = thread_cpu_ns(Sched),
                            T0 = erlang:monotonic_time(),
                            set_loop(x, 1000),
                            S = secs(T0),
                            Same = erlang:system_info(scheduler_id) =:= Sched,
                            C1 = thread_cpu_ns(Sched),
                            ok = dspex_events:await(),
                            case Same of
                                true -> {T + S, C + C1 - C0 - Probe, B + 1};
                                false -> {T + S, C, B}
                            end
                    end, {0.0, 0, 0}, lists:seq(1, N div 1000)),
    {N / Time, Cpu / max(Bursts * 1000, 1)}.

%% Time on a CPU (ns) of scheduler thread Sched (/proc/self/task/Tid/schedstat).
thread_cpu_ns(Sched) ->
    Path = case get({?MODULE, schedstat, Sched}) of
               undefined ->
                   Name = integer_to_list(Sched) ++ "_scheduler",
                   {ok, Tasks} = file:list_dir("/proc/self/task"),
                   [Tid] = [T || T <- Tasks,
                                 {ok, C} <- [file:read_file("/proc/self/task/" ++ T ++ "/comm")],
                                 string:trim(binary_to_list(C)) =:= Name],
                   P = "/proc/self/task/" ++ Tid ++ "/schedstat",
                   put({?MODULE, schedstat, Sched}, P),
                   P;
               P -> P
           end,
    {ok, B} = file:read_file(Path),
    [X | _] = binary:split(B, <<" ">>),
    binary_to_integer(X).

%% 1,000,000 events in one session (sets of 10 variables), then state_at at 50
%% random sequences; each result is checked against the replay from the start
%% for the last point (equal to the export taken then).
%% CPU time of the whole VM per event: Chunks x 1,000 set/3 of one variable, each chunk awaited
%% (durable), then every snapshot due stored.
snapshot_cpu(Chunks) ->
    {ok, _} = dspex_store:register(?SID, x, integer, 0),
    R0 = cpu_ms(),
    [begin set_loop(x, 1000), ok = dspex_events:await() end || _ <- lists:seq(1, Chunks)],
    _ = sys:get_state(dspex_events),
    ok = dspex_events:snapshots_sync(),
    R1 = cpu_ms(),
    (R1 - R0) * 1000 / (Chunks * 1000).

state_at_bench(N) ->
    Vars = [integer_to_binary(I) || I <- lists:seq(1, 10)],
    [{ok, _} = dspex_store:register(?SID, K, integer, 0, #{history_limit => 5}) || K <- Vars],
    T0 = erlang:monotonic_time(),
    pmap(2, fun(I) -> [set_loop(K, N div 20) || K <- lists:sublist(Vars, 5 * (I - 1) + 1, 5)] end),
    ok = dspex_events:await(),
    _ = sys:get_state(dspex_events),
    ok = dspex_events:snapshots_sync(),
    Build = secs(T0),
    {ok, Export} = dspex_nif:export_session(?SID),
    Max = dspex_nif:events_session_seq(?SID),
    {ok, Export} = dspex_events:state_at(?SID, {sequence, Max}),
    Times = [begin
                 Seq = rand:uniform(Max),
                 T1 = erlang:monotonic_time(),
                 {ok, _} = dspex_events:state_at(?SID, {sequence, Seq}),
                 secs(T1) * 1000
             end || _ <- lists:seq(1, 50)],
    {Build, lists:max(Times), lists:sum(Times) / length(Times)}.

pmap(N, F) ->
    Refs = [element(2, spawn_monitor(fun() -> F(I) end)) || I <- lists:seq(1, N)],
    [receive {'DOWN', R, process, _, normal} -> ok; {'DOWN', R, process, _, Why} -> error(Why) end || R <- Refs],
    ok.
