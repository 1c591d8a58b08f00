%% @doc EUnit entry point for `prop_graph' (dspex_graph against digraph
%% [acyclic]), and checks that each of its assertions can fail: a fixed
%% sequence is run with one kind of result corrupted at a time and must be
%% refused for the expected reason.
%%
%% DSPEX_PROP_GRAPH_N: number of sequences (default 1000).
-module(dspex_graph_props_tests).

-include_lib("eunit/include/eunit.hrl").

numtests() ->
    case os:getenv("DSPEX_PROP_GRAPH_N") of
        false -> 1000;
        S -> list_to_integer(S)
    end.

graph_model_test_() ->
    {timeout, 300,
     fun() ->
             ?assertEqual(true, proper:quickcheck(prop_graph:prop_graph(),
                                                  [{numtests, numtests()}, {to_file, user}]))
     end}.

%%% Every check can fail --------------------------------------------------------------

%% Touches every command and every query, with chains, a cycle of three, a
%% self-loop, a re-typed edge, misses, a delete, a stale id, registers of a
%% deleted and of a live name, a delete + register.
sequence() ->
    [{add, 1, 2, data, name, name},        % a -> b
     {add, 2, 3, control, atom, id},       % b -> c
     {add, 3, 1, data, name, name},        % c -> a: cycle [c, a, b, c]
     {add, 4, 4, data, name, name},        % self-loop
     {add, 2, 3, data, name, name},        % existing edge, new type
     {add_cycle, 0, 1},
     {remove, 1, 3, name, name},           % no such edge
     {remove_edge, 0},                     % a -> b
     {add, 1, 2, data, id, atom},
     {delete, 3, name},                    % c, and b -> c with it
     {add, 3, 1, data, name, name},        % c is gone
     {remove, 2, 3, name, name},
     {delete, 3, id},                      % stale id
     {register, 0},                        % c, the only deleted one
     {recreate, 1, atom},                  % a: delete and register
     {register, 5},                        % none deleted: a live one
     {add, 2, 3, data, name, id},          % c's new id
     clear,
     {add, 5, 6, data, name, name}].

sequence_passes_test() ->
    ?assertEqual(ok, prop_graph:run(sequence())),
    ?assertEqual(ok, prop_graph:run([])).

%% {Name, Tag the failure must contain, Fault}
faults() ->
    Cycle = fun(F) -> fun(add, {error, {would_create_cycle, P}}) -> {error, {would_create_cycle, F(P)}};
                         (_, R) -> R
                      end
            end,
    Query = fun(Kind, F) -> fun(K, {ok, L}) when K =:= Kind -> {ok, F(L)};
                               (_, R) -> R
                            end
            end,
    Map = fun(F) -> fun(to_map, {ok, M}) -> {ok, F(M)}; (_, R) -> R end end,
    [{"accepted edge reported as a cycle", accepts,
      fun(add, ok) -> {error, {would_create_cycle, [x]}}; (_, R) -> R end},
     {"cycle accepted", bad_edge,
      fun(add, {error, {would_create_cycle, _}}) -> ok; (_, R) -> R end},
     {"cycle path not a list", cycle_path, Cycle(fun(_) -> foo end)},
     {"cycle path without From first", cycle_path_start, Cycle(fun tl/1)},
     {"cycle path with another second", cycle_path_start,
      Cycle(fun([F, _ | R]) -> [F, <<"node_2">> | R] end)},
     {"cycle path not back to From", cycle_path_end,
      Cycle(fun(P) -> lists:droplast(P) ++ [<<"node_2">>] end)},
     {"cycle path through a missing edge", cycle_path_not_edges,
      Cycle(fun([F, T | R]) -> [F, T, T | R] end)},
     {"add to a missing variable accepted", expected,
      fun(add, {error, {not_found, _}}) -> ok; (_, R) -> R end},
     {"remove of a missing edge accepted", expected,
      fun(remove, {error, {not_found, _}}) -> ok; (_, R) -> R end},
     {"remove of an edge refused", expected,
      fun(remove, ok) -> {error, {not_found, x}}; (_, R) -> R end},
     {"delete refused", expected, fun(delete, ok) -> {error, x}; (_, R) -> R end},
     {"delete of a missing variable accepted", expected,
      fun(delete, {error, _}) -> ok; (_, R) -> R end},
     {"register refused", register, fun(register, {ok, _}) -> {error, x}; (_, R) -> R end},
     {"register over a live name accepted", expected,
      fun(register, {error, _}) -> {ok, <<"var_x_9">>}; (_, R) -> R end},
     {"clear refused", expected, fun(clear, ok) -> {error, x}; (_, R) -> R end},
     {"dependencies missing one", dependencies, Query(dependencies, fun([_ | T]) -> T; (L) -> L end)},
     {"dependencies with one extra", dependencies, Query(dependencies, fun(L) -> [<<"c">> | L] end)},
     {"dependents with a duplicate", dependents, Query(dependents, fun([H | _] = L) -> [H | L]; (L) -> L end)},
     {"dependents not ok", expected_ok_list, fun(dependents, _) -> error; (_, R) -> R end},
     {"update_order with a duplicate", duplicates, Query(update_order, fun(L) -> L ++ [hd(L)] end)},
     {"update_order not starting with the variable", not_first,
      Query(update_order, fun([H, X | T]) -> [X, H | T]; (L) -> L end)},
     {"update_order missing a dependent", reachable,
      Query(update_order, fun([H | T = [_ | _]]) -> [H | lists:droplast(T)]; (L) -> L end)},
     {"update_order with an extra vertex", reachable,
      Query(update_order, fun(L) -> L ++ [<<"nobody">>] end)},
     {"update_order against an edge", backward_edges,
      Query(update_order, fun([H | T]) -> [H | lists:reverse(T)] end)},
     {"all_dependents with an extra vertex", reachable,
      Query(all_dependents, fun(L) -> L ++ [<<"nobody">>] end)},
     {"all_dependents against an edge", backward_edges, Query(all_dependents, fun lists:reverse/1)},
     {"query on a deleted variable answers", deleted,
      fun(update_order, {error, {not_found, _}}) -> {ok, []}; (_, R) -> R end},
     {"to_map missing an edge", to_map_edges, Map(fun(#{edges := [_ | E]} = M) -> M#{edges := E}; (M) -> M end)},
     {"to_map with a wrong type", to_map_edges,
      Map(fun(#{edges := [E | Es]} = M) -> M#{edges := [E#{type := other} | Es]}; (M) -> M end)},
     {"to_map nodes unsorted", to_map_nodes_unsorted_or_repeated,
      Map(fun(#{nodes := N} = M) -> M#{nodes := lists:reverse(N)} end)},
     {"to_map missing an edge's end", to_map_nodes_missing,
      Map(fun(#{nodes := N, edges := [#{from := F} | _]} = M) -> M#{nodes := N -- [F]}; (M) -> M end)},
     {"to_map with a dead node", to_map_nodes_not_live,
      Map(fun(#{nodes := N} = M) -> M#{nodes := N ++ [<<"zzz">>]} end)},
     {"to_map not ok", to_map, fun(to_map, _) -> error; (_, R) -> R end}].

checks_can_fail_test_() ->
    [{Name, fun() -> expect_failure(Tag, prop_graph:run(sequence(), Fault)) end}
     || {Name, Tag, Fault} <- faults()].

expect_failure(Tag, Result) ->
    ?assertMatch({fail, _, _, _}, Result),
    ?assert(contains(Tag, Result)).

contains(X, X) -> true;
contains(X, T) when is_tuple(T) -> contains(X, tuple_to_list(T));
contains(X, [H | T]) -> contains(X, H) orelse contains(X, T);
contains(_, _) -> false.
