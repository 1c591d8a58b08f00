%% @doc Benchmark of `dspex_graph' (C, incremental Pearce-Kelly order) against
%% OTP's `digraph' created with `[acyclic]', on random DAGs of 1k, 10k and 100k
%% vertices with 2 edges per vertex. Ratios are "digraph time / dspex_graph
%% time": above 1 means dspex_graph is faster.
%%
%% The DAGs: vertices get the positions of a random permutation; every edge
%% goes from a lower to a higher position (so the graph is acyclic), its lower
%% end uniform and its length log-uniform in [1, N]; edges are distinct and
%% are added to dspex_graph one by one in random order (that build is timed
%% per call and reported, no ratio). With both ends uniform instead, reachable
%% sets stay at a few dozen vertices whatever N is: no vertex would have 1k
%% dependents and neither side would have anything to search. The same graph
%% is built in the digraph, untimed, in the order of the positions of the
%% edges' sources, which keeps its acyclic checks trivial while building.
%%
%% Measured, per operation, after the build:
%%  - accepted add_edge: new edges consistent with the permutation. dspex: one
%%    batch, one run (removing the edges again does not give back the order
%%    they made the graph take, so a rerun would be cheaper); digraph:
%%    `digraph:add_edge/5' of the first edges of the same batch, time-boxed,
%%    deleted again after each run, best of the runs the budget allows;
%%  - rejected add_edge: From is the end of a random walk of 1..8 edges from
%%    To, so the edge closes a cycle: `{error, {would_create_cycle, _}}' vs
%%    `{error, {bad_edge, _}}'; best of ?RUNS on both sides;
%%  - update_order/2 from vertices with at least 1000 transitive dependents
%%    (on the 1k graph: at least 100, reported as such) vs
%%    `digraph_utils:reachable/2' + `digraph_utils:subgraph/3' + `topsort/1',
%%    each start vertex timed alone on both sides. The subgraph is made with
%%    `{type, []}': `subgraph/2' inherits `[acyclic]' and re-checks every copied
%%    edge for a cycle, which is quadratic (about 1.2 s for 3k vertices); its
%%    cost is shown once, on the 1k graph, and no ratio uses it. Deleting the
%%    subgraph is not timed.
%% The digraph loops are time-boxed (`budget/1'): on the 100k graph a single
%% digraph op takes seconds, so only a few are timed. Each side is reported
%% over all its ops and over exactly the ops the digraph managed; the summary
%% takes the smaller of the two ratios. Digraph ops are timed in chunks (one
%% `timer:tc' per chunk, chunks doubling while under 2 ms).
%%
%% `main/0' runs the three sizes and prints a summary; `main(Sizes)' runs other
%% sizes (e.g. `main([1000, 10000])', much faster: the random-order build of
%% the 100k graph alone takes over a minute); `run/0' and `run/1' print the
%% details and return the summary rows `{Label, Ratio, Target}'.
-module(dspex_graph_bench).
-export([main/0, main/1, run/0, run/1]).

-define(SIZES, [1000, 10000, 100000]).
-define(RUNS, 3).             % dspex: best of this many runs
-define(UPD_VERTICES, 8).     % start vertices for update_order
-define(MIN_DEPENDENTS, 1000).

main() -> main(?SIZES).

main([]) -> main(?SIZES);
main(Sizes) ->
    T0 = erlang:monotonic_time(millisecond),
    Rows = run(Sizes),
    io:format("~nsummary (digraph time / dspex_graph time; above 1 = dspex_graph faster):~n"),
    [io:format("  ~-56s ~11.1fx  (target ~s)~n", [L, R, T]) || {L, R, T} <- Rows],
    io:format("(graph bench took ~.1f s)~n", [(erlang:monotonic_time(millisecond) - T0) / 1000]),
    ok.

run() -> run(?SIZES).

run(Sizes) ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    io:format("dspex_graph vs digraph [acyclic] (~p schedulers, OTP ~s)~n"
              "random DAGs, 2 edges per vertex, edge lengths log-uniform; ns per op~n",
              [erlang:system_info(schedulers_online), erlang:system_info(otp_release)]),
    lists:append([graph(N) || N <- Sizes]).

%% dspex ops per accepted / rejected batch.
batch(1000) -> 500;
batch(100000) -> 300;
batch(_) -> 1000.

%% Digraph time budget per measurement (microseconds).
budget(1000) -> 300000;
budget(10000) -> 1500000;
budget(_) -> 4500000.

%%% One graph size ---------------------------------------------------------------

graph(N) ->
    rand:seed(exsss, {N, 17, 29}),
    Order = list_to_tuple(shuffle(lists:seq(1, N))),          % position -> vertex
    Pos = positions(Order, N),                                % vertex -> position
    Edges = dag_edges(N, Order, 2 * N),                       % random insertion order
    EdgeSet = maps:from_list([{E, true} || E <- Edges]),
    Names = list_to_tuple([name(I) || I <- lists:seq(1, N)]),
    S = iolist_to_binary(["graph_bench_", integer_to_list(N)]),
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    [{ok, _} = dspex_store:register(S, element(I, Names), integer, 0) || I <- lists:seq(1, N)],
    Lat = [element(1, timer:tc(fun() -> ok = dspex_graph:add_dependency(S, element(U, Names), element(V, Names)) end))
           || {U, V} <- Edges],
    G = digraph:new([acyclic]),
    [digraph:add_vertex(G, V) || V <- lists:seq(1, N)],
    [['$e' | _] = digraph:add_edge(G, U, V)
     || {_, U, V} <- lists:sort([{element(U, Pos), U, V} || {U, V} <- Edges])],
    Out = out_lists(N, Edges),
    Sorted = lists:sort(Lat),
    io:format("~n-- ~b vertices, ~b edges~n"
              "  dspex_graph built edge by edge in random order: ~.2f s, mean ~.1f us, "
              "p99 ~b us, max ~b us per add_dependency~n",
              [N, length(Edges), lists:sum(Lat) / 1.0e6, lists:sum(Lat) / length(Lat),
               lists:nth(max(1, length(Sorted) * 99 div 100), Sorted), lists:last(Sorted)]),
    try
        accepted(N, S, Names, G, Order, EdgeSet) ++
            rejected(N, S, Names, G, Out) ++
            update_order(N, S, Names, G, Order)
    after
        digraph:delete(G),
        ok = dspex_store:delete_session(S)
    end.

%%% Accepted edges ---------------------------------------------------------------

accepted(N, S, Names, G, Order, EdgeSet) ->
    K = batch(N),
    Batch = new_edges(K, N, Order, EdgeSet),
    %% digraph: the first edges of the batch, added and deleted again each run
    Add = fun({U, V}) -> {U, V} = digraph:add_edge(G, {U, V}, U, V, []) end,
    Undo = fun(Done) -> [true = digraph:del_edge(G, E) || E <- Done] end,
    {Dg, C, DgRuns} = dg_best(Add, Undo, Batch, budget(N)),
    %% dspex: one run. Removing the edges again would not restore the order
    %% they made the graph take, so a second run on any permutation-consistent
    %% edges would find less to reorder. The digraph's edges are timed apart,
    %% for a paired ratio.
    {Prefix, Rest} = lists:split(C, Batch),
    erlang:garbage_collect(),
    {TP, ok} = timer:tc(fun() -> add_all(S, Names, Prefix) end),
    {TR, ok} = timer:tc(fun() -> add_all(S, Names, Rest) end),
    remove_all(S, Names, Batch),
    Ds = (TP + TR) * 1000 / K,
    Paired = TP * 1000 / C,
    line("dspex_graph:add_dependency, accepted", Ds, K, 1),
    line("  the same edges as digraph below", Paired, C, 1),
    line("digraph:add_edge/5 [acyclic], accepted", Dg, C, DgRuns),
    [{"add_edge accepted, " ++ size_label(N), ratios(Dg, Paired, Ds), target(N, 100)}].

%%% Rejected edges (cycles) -------------------------------------------------------

rejected(N, S, Names, G, Out) ->
    K = batch(N),
    Cycles = cycle_edges(K, N, Out),
    AvgLen = lists:sum([L || {_, _, L} <- Cycles]) / K,
    Pairs = [{F, T} || {F, T, _} <- Cycles],
    Rej = fun({F, T}) -> {error, {bad_edge, _}} = digraph:add_edge(G, F, T) end,
    {Dg, C, DgRuns} = dg_best(Rej, fun(_) -> ok end, Pairs, budget(N)),
    erlang:garbage_collect(),
    Ds = best(fun() -> reject_all(S, Names, Pairs) end) * 1000 / K,
    Prefix = lists:sublist(Pairs, C),
    Reps = max(1, K div C),
    Paired = best(fun() -> [reject_all(S, Names, Prefix) || _ <- lists:seq(1, Reps)], ok end)
        * 1000 / (C * Reps),
    io:format("  (cycle edges: To reaches From by a path of ~.1f edges on average)~n", [AvgLen]),
    line("dspex_graph:add_dependency, rejected (cycle)", Ds, K, ?RUNS),
    line("  the same edges as digraph below", Paired, C, ?RUNS),
    line("digraph:add_edge/3 [acyclic], rejected (bad_edge)", Dg, C, DgRuns),
    [{"add_edge rejected (cycle), " ++ size_label(N), ratios(Dg, Paired, Ds), target(N, 100)}].

%%% update_order -------------------------------------------------------------------

update_order(N, S, Names, G, Order) ->
    Min = min(?MIN_DEPENDENTS, N div 10),
    Starts = start_vertices(N, G, Order, Min),
    Counts = [Cnt || {_, Cnt} <- Starts],
    Vs = [V || {V, _} <- Starts],
    M = length(Vs),
    %% the same answer, untimed: V first, then exactly its reachable set
    [begin
         {ok, [First | _] = L} = dspex_graph:update_order(S, element(V, Names)),
         First = element(V, Names),
         Expect = lists:sort([element(W, Names) || W <- digraph_utils:reachable([V], G)]),
         Expect = lists:sort(L)
     end || V <- Vs],
    Topo = fun(V) ->
                   {T, SG} = timer:tc(fun() ->
                                              R = digraph_utils:reachable([V], G),
                                              SG = digraph_utils:subgraph(G, R, [{type, []}]),
                                              [_ | _] = digraph_utils:topsort(SG),
                                              SG
                                      end),
                   digraph:delete(SG),
                   T
           end,
    {Dg, C, DgRuns} = dg_best_each(Topo, Vs, budget(N)),
    %% dspex: every start vertex timed alone, the same way; best of the passes
    Passes = [[element(1, timer:tc(fun() -> {ok, _} = dspex_graph:update_order(S, element(V, Names)) end))
               || V <- Vs]
              || _ <- lists:seq(1, ?RUNS + 1)],
    Ds = lists:min([lists:sum(P) || P <- Passes]) * 1000 / M,
    Paired = lists:min([lists:sum(lists:sublist(P, C)) || P <- Passes]) * 1000 / C,
    io:format("  (update_order from ~b vertices with ~b..~b transitive dependents, mean ~b)~n",
              [M, lists:min(Counts), lists:max(Counts), lists:sum(Counts) div M]),
    line("dspex_graph:update_order", Ds, M, ?RUNS + 1),
    line("  the same start vertices as digraph below", Paired, C, ?RUNS + 1),
    line("digraph reachable + subgraph (unchecked) + topsort", Dg, C, DgRuns),
    R = ratios(Dg, Paired, Ds),
    case N of
        1000 -> literal_subgraph(G, hd(Vs), lists:min([hd(P) || P <- Passes]) * 1000);
        _ -> ok
    end,
    {Label, Target} = case Min < ?MIN_DEPENDENTS of
                          true -> {"update_order (>= " ++ integer_to_list(Min) ++ " deps), ", "(none below 1k deps)"};
                          false -> {"update_order (>= 1k deps), ", ">= 10x"}
                      end,
    [{Label ++ size_label(N), R, Target}].

%% Prints both ratios; the summary gets the smaller one.
ratios(Dg, Paired, Ds) ->
    io:format("  ratio ~.1fx on the same ops, ~.1fx against all dspex ops~n", [Dg / Paired, Dg / Ds]),
    min(Dg / Paired, Dg / Ds).

%% The literal digraph_utils:subgraph/2 (inherits [acyclic]), once, small graph.
literal_subgraph(G, V, DsNs) ->
    T = lists:min([begin
                       {T1, SG} = timer:tc(fun() ->
                                                   R = digraph_utils:reachable([V], G),
                                                   SG = digraph_utils:subgraph(G, R),
                                                   [_ | _] = digraph_utils:topsort(SG),
                                                   SG
                                           end),
                       digraph:delete(SG),
                       T1
                   end || _ <- lists:seq(1, ?RUNS)]),
    io:format("  ~-58s ~14.1f ns/op  (~.1fx dspex; one start vertex, not in the summary)~n",
              ["digraph, subgraph/2 (inherits [acyclic]), reference", T * 1000.0, T * 1000 / DsNs]).

start_vertices(N, G, Order, Min) ->
    %% vertices early in the permutation have the most dependents
    Cands = [element(rand:uniform(max(1, N div 2)), Order) || _ <- lists:seq(1, 200)],
    Found = lists:foldl(
              fun(_V, Acc) when length(Acc) >= ?UPD_VERTICES -> Acc;
                 (V, Acc) ->
                      case lists:keymember(V, 1, Acc) of
                          true -> Acc;
                          false ->
                              C = length(digraph_utils:reachable([V], G)) - 1,
                              if C >= Min -> [{V, C} | Acc]; true -> Acc end
                      end
              end, [], Cands),
    [_ | _] = Found,
    lists:reverse(Found).

%%% digraph timing ---------------------------------------------------------------

%% Runs Op over a prefix of Items until Budget/?RUNS is spent (at least one op),
%% then repeats on that same prefix while the budget lasts. Undo(Done) restores
%% the graph after each run. Returns {best ns/op, ops per run, runs}.
dg_best(Op, Undo, Items, Budget) ->
    {T1, Done} = boxed(Op, Items, Budget div ?RUNS),
    Undo(Done),
    C = length(Done),
    More = more_runs(fun() ->
                             {T, Done} = boxed(Op, Done, infinity),
                             Undo(Done),
                             T
                     end, Budget - T1, T1, ?RUNS - 1),
    {lists:min([T1 | More]) * 1000 / C, C, 1 + length(More)}.

%% Like dg_best/4 for an Op that times itself and returns microseconds.
dg_best_each(Op, Items, Budget) ->
    {T1, C} = self_timed(Op, Items, Budget div ?RUNS, 0, 0),
    Prefix = lists:sublist(Items, C),
    More = more_runs(fun() -> lists:sum([Op(V) || V <- Prefix]) end, Budget - T1, T1, ?RUNS - 1),
    {lists:min([T1 | More]) * 1000 / C, C, 1 + length(More)}.

self_timed(_Op, [], _Budget, T, C) -> {T, C};
self_timed(_Op, _Items, Budget, T, C) when C > 0, T >= Budget -> {T, C};
self_timed(Op, [V | Vs], Budget, T, C) -> self_timed(Op, Vs, Budget, T + Op(V), C + 1).

more_runs(_Run, _Left, _Last, 0) -> [];
more_runs(_Run, Left, Last, _K) when Left < Last -> [];
more_runs(Run, Left, _Last, K) ->
    T = Run(),
    [T | more_runs(Run, Left - T, T, K - 1)].

%% Applies Op to Items in chunks, each chunk timed by one timer:tc, until the
%% time spent reaches Budget (microseconds). Returns {Time, ItemsDone}.
boxed(Op, Items, Budget) -> boxed(Op, Items, Budget, 1, 0, []).

boxed(_Op, [], _Budget, _Chunk, T, Done) -> {T, lists:reverse(Done)};
boxed(_Op, _Items, Budget, _Chunk, T, Done) when Budget =/= infinity, T >= Budget ->
    {T, lists:reverse(Done)};
boxed(Op, Items, Budget, Chunk, T, Done) ->
    {This, Rest} = split(Chunk, Items),
    {DT, ok} = timer:tc(fun() -> lists:foreach(Op, This), ok end),
    Next = if DT < 2000 -> min(Chunk * 2, 1024); true -> Chunk end,
    boxed(Op, Rest, Budget, Next, T + DT, lists:reverse(This, Done)).

split(K, L) when length(L) =< K -> {L, []};
split(K, L) -> lists:split(K, L).

%%% dspex loops -----------------------------------------------------------------

add_all(_S, _Names, []) -> ok;
add_all(S, Names, [{U, V} | Es]) ->
    ok = dspex_graph:add_dependency(S, element(U, Names), element(V, Names)),
    add_all(S, Names, Es).

remove_all(S, Names, Es) ->
    [ok = dspex_graph:remove_dependency(S, element(U, Names), element(V, Names)) || {U, V} <- Es],
    ok.

reject_all(_S, _Names, []) -> ok;
reject_all(S, Names, [{F, T} | Es]) ->
    {error, {would_create_cycle, _}} = dspex_graph:add_dependency(S, element(F, Names), element(T, Names)),
    reject_all(S, Names, Es).

%% Best of ?RUNS after one warm-up, in microseconds.
best(F) ->
    F(),
    lists:min([element(1, timer:tc(F)) || _ <- lists:seq(1, ?RUNS)]).

%%% Graph generation --------------------------------------------------------------

name(I) -> <<"v", (integer_to_binary(I))/binary>>.

shuffle(L) -> [X || {_, X} <- lists:sort([{rand:uniform(), X} || X <- L])].

positions(Order, N) ->
    list_to_tuple([P || {_, P} <- lists:sort([{element(P, Order), P} || P <- lists:seq(1, N)])]).

%% M distinct edges {From, To}, in the order they were drawn.
dag_edges(N, Order, M) -> dag_edges(N, Order, M, #{}, []).

dag_edges(_N, _Order, 0, _Seen, Acc) -> lists:reverse(Acc);
dag_edges(N, Order, M, Seen, Acc) ->
    {A, B} = position_pair(N),
    E = {element(A, Order), element(B, Order)},
    case Seen of
        #{E := _} -> dag_edges(N, Order, M, Seen, Acc);
        _ -> dag_edges(N, Order, M - 1, Seen#{E => true}, [E | Acc])
    end.

%% Lower end uniform, length log-uniform in [1, N], upper end within the graph.
position_pair(N) ->
    A = rand:uniform(N),
    B = A + floor(math:exp(rand:uniform() * math:log(N))),
    if B =< N -> {A, B}; true -> position_pair(N) end.

%% K distinct permutation-consistent edges that are not in the graph.
new_edges(K, N, Order, EdgeSet) -> new_edges(K, N, Order, EdgeSet, []).

new_edges(0, _N, _Order, _Set, Acc) -> lists:reverse(Acc);
new_edges(K, N, Order, Set, Acc) ->
    {A, B} = position_pair(N),
    E = {element(A, Order), element(B, Order)},
    case Set of
        #{E := _} -> new_edges(K, N, Order, Set, Acc);
        _ -> new_edges(K - 1, N, Order, Set#{E => true}, [E | Acc])
    end.

out_lists(N, Edges) ->
    M = lists:foldl(fun({U, V}, Acc) -> maps:update_with(U, fun(L) -> [V | L] end, [V], Acc) end,
                    #{}, Edges),
    list_to_tuple([maps:get(I, M, []) || I <- lists:seq(1, N)]).

%% K edges {From, To, PathLength} where To reaches From by a random walk.
cycle_edges(K, N, Out) -> cycle_edges(K, N, Out, []).

cycle_edges(0, _N, _Out, Acc) -> Acc;
cycle_edges(K, N, Out, Acc) ->
    To = rand:uniform(N),
    case walk(To, rand:uniform(8), Out, 0) of
        {_, 0} -> cycle_edges(K, N, Out, Acc);
        {From, L} -> cycle_edges(K - 1, N, Out, [{From, To, L} | Acc])
    end.

walk(V, 0, _Out, L) -> {V, L};
walk(V, Steps, Out, L) ->
    case element(V, Out) of
        [] -> {V, L};
        Ws -> walk(lists:nth(rand:uniform(length(Ws)), Ws), Steps - 1, Out, L + 1)
    end.

%%% Output ------------------------------------------------------------------------

line(Label, NsPerOp, Ops, Runs) ->
    io:format("  ~-58s ~14.1f ns/op  (~b ops, best of ~b)~n", [Label, NsPerOp, Ops, Runs]).

size_label(1000) -> "1k";
size_label(10000) -> "10k";
size_label(100000) -> "100k";
size_label(N) -> integer_to_list(N).

target(100000, X) -> ">= " ++ integer_to_list(X) ++ "x";
target(_, _) -> "(none below 100k)".
