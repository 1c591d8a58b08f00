%% The debug console's Session page (`/api/session') on a session of 100,000
%% variables (half floats, half 32-dimension embeddings): one page of 500 by
%% `dspex_store:diagnostics_page/3', next to the whole copies the console
%% used to take for it (`diagnostics/1' + `list/1' + `dspex_graph:to_map/1').
%% Per page, the median of 5 at three offsets: wall time, the heap the call
%% allocated (the words the garbage collector reclaimed during it plus the
%% calling process's heap at its end; binaries apart) and the rise of the
%% node's memory, sampled every millisecond.
%% The node runs without the console, gRPC, Prometheus and the event log: no
%% fixed port is taken.
-module(dspex_console_page_bench).
-export([main/0]).

-define(VARS, 100000).
-define(PAGE, 500).

main() ->
    application:load(dspex_bridge),
    [application:set_env(dspex_bridge, K, V) || {K, V} <- [{console_enabled, false}, {grpc_enabled, false},
                                                           {prometheus_enabled, false}, {event_log, false}]],
    {ok, _} = application:ensure_all_started(dspex_bridge),
    S = <<"console_page_bench">>,
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    Emb = [float(I) / 7 || I <- lists:seq(1, 32)],
    [{ok, _} = case I rem 2 of
                   0 -> dspex_store:register(S, name(I), float, I / 3);
                   1 -> dspex_store:register(S, name(I), embedding, Emb)
               end || I <- lists:seq(1, ?VARS)],
    io:format("console Session page, ~b variables, pages of ~b (median of 5)~n", [?VARS, ?PAGE]),
    io:format("~-34s ~8s ~11s ~13s ~13s~n", ["", "offset", "time ms", "heap MB", "memory +MB"]),
    [report(What, Offset, fun() -> F(S, Offset) end)
     || Offset <- [0, ?VARS div 2, ?VARS - ?PAGE],
        {What, F} <- [{"diagnostics_page/3", fun page/2}, {"whole copies (before)", fun copies/2}]],
    ok = dspex_store:delete_session(S).

name(I) -> iolist_to_binary(io_lib:format("var_~6..0b", [I])).

page(S, Offset) ->
    {ok, #{variables := P}} = dspex_store:diagnostics_page(S, Offset, ?PAGE),
    length(P).

copies(S, Offset) ->
    {ok, _} = dspex_store:diagnostics(S),
    {ok, Vars} = dspex_store:list(S),
    {ok, _} = dspex_graph:to_map(S),
    length(lists:sublist(Vars, Offset + 1, ?PAGE)).

report(What, Offset, F) ->
    Runs = [measure(F) || _ <- lists:seq(1, 5)],
    Med = fun(I) -> lists:nth(3, lists:sort([element(I, R) || R <- Runs])) end,
    io:format("~-34s ~8b ~11.1f ~13.1f ~13.1f~n", [What, Offset, Med(1), Med(2), Med(3)]).

%% {Ms, HeapMB, PeakRiseMB} of one call, run in a fresh process.
measure(F) ->
    erlang:garbage_collect(),
    Base = erlang:memory(total),
    Sampler = spawn_link(fun() -> sample(Base) end),
    {_, W0, _} = erlang:statistics(garbage_collection),
    {Pid, Ref} = spawn_monitor(fun() ->
                                       {T, _} = timer:tc(F),
                                       {total_heap_size, H} = process_info(self(), total_heap_size),
                                       exit({done, T, H})
                               end),
    {Us, Heap} = receive {'DOWN', Ref, process, Pid, {done, T, H}} -> {T, H} end,
    {_, W1, _} = erlang:statistics(garbage_collection),
    Sampler ! {stop, self()},
    Peak = receive {peak, P} -> P end,
    {Us / 1000, (W1 - W0 + Heap) * erlang:system_info(wordsize) / 1048576, (Peak - Base) / 1048576}.

sample(Peak) ->
    receive {stop, To} -> To ! {peak, max(Peak, erlang:memory(total))}
    after 1 -> sample(max(Peak, erlang:memory(total)))
    end.
