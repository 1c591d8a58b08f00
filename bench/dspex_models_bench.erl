%% @doc `make bench' part for model versions (issue #19), each against the
%% obvious alternative in the same run, in one process (so on one scheduler
%% at a time):
%%   * dspex_models:select_model/2 under an A/B split (persistent_term read +
%%     phash2 + tuple element), under a rollout and without a test (the
%%     `production' alias, `{single, Id}'), against a gen_server call
%%     answering from the same table;
%%   * dspex_models:record_inference/4 (counters:add of count, success,
%%     log-latency moments and histogram bucket) against one
%%     ets:update_counter/3 of two counters (count, successes) per sample.
%% Each figure is measured three ways while only the measuring process runs
%% (`make bench' starts the VM with scheduler busy-waiting off, so idle
%% schedulers cost nothing; the gen_server alternative is two processes, its
%% CPU time is both): by wall clock; by the CPU time the OS charged to the
%% whole VM (`erlang:statistics(runtime)' deltas, user + system, 1 ms
%% resolution); and by the time the VM's normal scheduler threads spent on a
%% CPU (Linux `/proc/self/task/TID/schedstat', nanoseconds; other VM threads,
%% such as the event log's writer or dirty schedulers, are left out), which
%% is the measuring process's own CPU time. Wall time includes the time other
%% OS processes take the core from us; CPU time does not, which makes it the
%% figure to read on a loaded machine. Best of 3.
%% Ratios are "alternative time / ours": above 1.0 means ours is faster.
-module(dspex_models_bench).
-export([main/0]).
-export([init/1, handle_call/3, handle_cast/2]).

-define(N, 2000000).
-define(GOAL, 5.0).  % M select_model calls/s on one scheduler

%% @doc Runs the benchmarks and prints the results and ratios.
-spec main() -> ok.
main() ->
    _ = application:load(dspex_bridge),
    ok = application:set_env(dspex_bridge, grpc_enabled, false),
    ok = application:set_env(dspex_bridge, prometheus_enabled, false),
    ok = application:set_env(dspex_bridge, console_enabled, false),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    io:format("~ndspex_models benchmark (one process; ~b calls a run, best of 3)~n", [?N]),
    U = integer_to_binary(erlang:unique_integer([positive])),
    Name = <<"bench", U/binary>>,
    {ok, A} = dspex_models:register_model(#{name => Name, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => Name, version => <<"b">>}),
    ok = dspex_models:set_alias(Name, production, A),
    {ok, T} = dspex_models:start_ab_test(#{model => Name, variants => [{A, 50}, {B, 50}],
                                           min_samples => 1000000000}),
    RName = <<"benchr", U/binary>>,
    {ok, RA} = dspex_models:register_model(#{name => RName, version => <<"a">>}),
    {ok, RB} = dspex_models:register_model(#{name => RName, version => <<"b">>}),
    ok = dspex_models:set_alias(RName, production, RA),
    {ok, R} = dspex_models:start_rollout(RName, RB, #{steps => [25, 100], min_samples => 1000000000}),
    PName = <<"benchp", U/binary>>,
    {ok, PA} = dspex_models:register_model(#{name => PName, version => <<"a">>}),
    ok = dspex_models:set_alias(PName, production, PA),
    ok = dspex_models:evaluate(),
    Ctxs = list_to_tuple([#{user_id => I} || I <- lists:seq(1, 1024)]),
    {ok, Srv} = gen_server:start(?MODULE, Name, []),
    Sel = measure(fun() -> sel_loop(Name, Ctxs, ?N) end, ?N),
    SelR = measure(fun() -> sel_loop(RName, Ctxs, ?N) end, ?N),
    SelP = measure(fun() -> sel_loop(PName, Ctxs, ?N) end, ?N),
    Srv1 = measure(fun() -> srv_loop(Srv, Ctxs, ?N div 10) end, ?N div 10),
    Nop = measure(fun() -> nop_loop(Name, Ctxs, ?N) end, ?N),
    line("select_model/2, A/B split", Sel),
    line("select_model/2, rollout", SelR),
    line("select_model/2, production only", SelP),
    line("gen_server:call answering the same", Srv1),
    line("the loop alone (context pick, match)", Nop),
    Tab = ets:new(bench, [public, set, {write_concurrency, true}]),
    ets:insert(Tab, {A, 0, 0}),
    Rec = measure(fun() -> rec_loop(A, ?N) end, ?N),
    Ets = measure(fun() -> ets_loop(Tab, A, ?N) end, ?N),
    line("record_inference/4 (A/B arm)", Rec),
    line("ets:update_counter/3, 2 counters", Ets),
    ok = dspex_models:stop_test(T),
    ok = dspex_models:rollback(R),
    gen_server:stop(Srv),
    %% the process's own CPU time where the scheduler threads' is readable
    Own = fun(#{sched_ns := undefined, cpu_ns := C}) -> C; (#{sched_ns := Sc}) -> Sc end,
    Rate = fun(X) -> 1.0e3 / Own(X) end,
    io:format("~nselect_model/2 on one scheduler: ~.2f M calls per CPU second (A/B split; "
              "~.2f M/s by the wall clock), goal ~.1f M: ~s~n",
              [Rate(Sel), 1.0e3 / maps:get(wall_ns, Sel), ?GOAL,
               case Rate(Sel) >= ?GOAL of true -> "met"; false -> "NOT met" end]),
    io:format("~nsummary (alternative time / ours; above 1 = ours faster; wall | CPU):~n"),
    [io:format("  ~-54s ~8.2fx | ~8.2fx~n", [L, maps:get(wall_ns, X) / maps:get(wall_ns, Y),
                                           Own(X) / Own(Y)])
     || {L, X, Y} <- [{"select_model/2 vs gen_server call", Srv1, Sel},
                      {"record_inference/4 vs ets:update_counter (2 counters)", Ets, Rec}]],
    _ = application:stop(dspex_bridge),
    ok.

line(Label, #{wall_ns := W, cpu_ns := C, sched_ns := Sc}) ->
    io:format("  ~-38s wall ~7.1f ns = ~6.2f M/s | VM CPU ~7.1f ns = ~6.2f M/s | scheduler CPU ~s~n",
              [Label, W, 1.0e3 / W, C, 1.0e3 / C,
               case Sc of
                   undefined -> "n/a";
                   _ -> io_lib:format("~7.1f ns = ~6.2f M/s", [Sc, 1.0e3 / Sc])
               end]).

%% best of 3 by wall clock and, separately, by the VM's CPU time and the
%% scheduler threads' CPU time (ns per op)
measure(F, N) ->
    Scheds = scheduler_threads(),
    Runs = [begin
                garbage_collect(),
                {C0, _} = erlang:statistics(runtime),
                S0 = on_cpu_ns(Scheds),
                T0 = erlang:monotonic_time(nanosecond),
                F(),
                T1 = erlang:monotonic_time(nanosecond),
                S1 = on_cpu_ns(Scheds),
                {C1, _} = erlang:statistics(runtime),
                {T1 - T0, max(1, C1 - C0) * 1000000,
                 case {S0, S1} of
                     {undefined, _} -> undefined;
                     {_, undefined} -> undefined;
                     _ -> S1 - S0
                 end}
            end || _ <- [1, 2, 3]],
    #{wall_ns => lists:min([W || {W, _, _} <- Runs]) / N,
      cpu_ns => lists:min([C || {_, C, _} <- Runs]) / N,
      sched_ns => case [S || {_, _, S} <- Runs, S =/= undefined] of
                      [] -> undefined;
                      Ss -> lists:min(Ss) / N
                  end}.

%% the schedstat files of the normal scheduler threads ("1_scheduler", ...)
scheduler_threads() ->
    [filename:join(T, "schedstat")
     || T <- filelib:wildcard("/proc/self/task/*"),
        case file:read_file(filename:join(T, "comm")) of
            {ok, Comm} -> binary:match(Comm, <<"_scheduler">>) =/= nomatch;
            _ -> false
        end].

%% their time on a CPU so far, in nanoseconds (undefined without schedstat)
on_cpu_ns([]) -> undefined;
on_cpu_ns(Files) ->
    try lists:sum([begin
                       {ok, B} = file:read_file(F),
                       binary_to_integer(hd(binary:split(B, <<" ">>)))
                   end || F <- Files])
    catch _:_ -> undefined
    end.

sel_loop(_, _, 0) -> ok;
sel_loop(Name, Ctxs, N) ->
    {ok, _} = dspex_models:select_model(Name, element((N band 1023) + 1, Ctxs)),
    sel_loop(Name, Ctxs, N - 1).

srv_loop(_, _, 0) -> ok;
srv_loop(Srv, Ctxs, N) ->
    {ok, _} = gen_server:call(Srv, {select, element((N band 1023) + 1, Ctxs)}),
    srv_loop(Srv, Ctxs, N - 1).

nop_loop(_, _, 0) -> ok;
nop_loop(Name, Ctxs, N) ->
    {ok, _} = nop(Name, element((N band 1023) + 1, Ctxs)),
    nop_loop(Name, Ctxs, N - 1).

nop(Name, _) -> {ok, Name}.

rec_loop(_, 0) -> ok;
rec_loop(M, N) ->
    ok = dspex_models:record_inference(M, 12.5, N band 15 =/= 0, #{}),
    rec_loop(M, N - 1).

ets_loop(_, _, 0) -> ok;
ets_loop(Tab, M, N) ->
    _ = ets:update_counter(Tab, M, [{2, 1}, {3, case N band 15 of 0 -> 0; _ -> 1 end}]),
    ets_loop(Tab, M, N - 1).

%% the alternative: the same routing answered by a server
%% @private
init(Name) -> {ok, Name}.
%% @private
handle_call({select, Ctx}, _From, Name) -> {reply, dspex_models:select_model(Name, Ctx), Name}.
%% @private
handle_cast(_, S) -> {noreply, S}.
