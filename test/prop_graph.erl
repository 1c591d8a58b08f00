%% @doc PropEr property of `dspex_graph' against OTP's `digraph' created with
%% `[acyclic]', used as the model.
%%
%% `prop_graph/0': random sequences over 12 variables of one fresh session
%% (deleted afterwards) of add_dependency/4 (random pairs, self-loops
%% included, edge type `data' or `control'; and pairs chosen to close a
%% cycle: To an ancestor of From), remove_dependency/3 (random pairs and
%% existing edges), and occasionally dspex_store:delete/2 of a variable
%% (alone, or followed at once by dspex_store:register/4 of its name),
%% registering a deleted variable again (or a live one: `already_exists'), and
%% dspex_graph:clear/1. Variables are named by name, ASCII atom or current id
%% (a stale id after a delete).
%% Checked at every step:
%%  - each call's result is the model's: `ok' exactly when the digraph accepts
%%    the edge; otherwise `{error, {would_create_cycle, Path}}' where Path
%%    starts with [From, To], ends with From and every consecutive pair after
%%    the first is an edge of the graph; `not_found' errors, with the key as
%%    given, for missing variables and edges; `already_exists' on registering
%%    a live name;
%%  - then, for every variable: dependencies/2 and dependents/2 equal
%%    digraph:in_neighbours/2 and out_neighbours/2 as sets (no duplicates);
%%    update_order/2 starts with the variable, holds no duplicate, is exactly
%%    the set digraph_utils:reachable/2 gives, and every edge between two of
%%    its members goes forward; all_dependents/2 likewise without the variable;
%%    a deleted variable answers `{error, {not_found, Name}}' to all four;
%%  - to_map/1: the edges with their types are the model's, edges and nodes
%%    sorted, nodes without duplicates, covering every edge's ends and only
%%    live variables.
%%
%% `run/2' takes a fault: a fun applied to every result before it is checked,
%% with which the tests make sure each check can fail.
%%
%% Debian's erlang-proper ships without proper.hrl, so the few macros used are
%% defined here.
-module(prop_graph).

-export([prop_graph/0, commands/0, run/1, run/2, names/0]).
-export([check_path/4, check_order/4, check_neighbours/2, check_map/2]).

-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(SIZED(S, Gen), proper_types:sized(fun(S) -> Gen end)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).

-define(NAMES, {<<"a">>, <<"b">>, <<"c">>, <<"ab">>, <<"abc">>, <<"x_1">>, <<"x_10">>,
                <<"node">>, <<"Node">>, <<"node_2">>, <<"a_rather_long_variable_name_0">>,
                <<"a_rather_long_variable_name_1">>}).
-define(NVARS, tuple_size(?NAMES)).

names() -> tuple_to_list(?NAMES).

%%% Property --------------------------------------------------------------------

prop_graph() ->
    ?FORALL(Cmds, commands(),
            begin
                Result = run(Cmds),
                ?WHENFAIL(io:format(user, "~ncommands:~n~p~nfailure:~n~p~n", [Cmds, Result]),
                          Result =:= ok)
            end).

commands() ->
    ?SIZED(Size, proper_types:resize(3 * Size + 6, proper_types:list(command()))).

command() ->
    Var = proper_types:range(1, ?NVARS),
    Form = proper_types:elements([name, name, name, atom, id]),
    Nat = proper_types:non_neg_integer(),
    proper_types:frequency(
      [{12, {add, Var, Var, proper_types:elements([data, data, control]), Form, Form}},
       {4, {add_cycle, Nat, Nat}},
       {2, {remove, Var, Var, Form, Form}},
       {3, {remove_edge, Nat}},
       {1, {delete, Var, Form}},
       {1, {recreate, Var, Form}},
       {2, {register, Nat}},
       {1, clear}]).

%%% Running a sequence ---------------------------------------------------------

%% ok | {fail, Step, Command, Why}
run(Cmds) -> run(Cmds, fun(_Kind, R) -> R end).

run(Cmds, Fault) ->
    S = <<"prop_graph_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    {ok, _} = application:ensure_all_started(dspex_bridge),
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    G = digraph:new([acyclic]),
    try
        Ids = maps:from_list([begin
                                  {ok, Id} = dspex_store:register(S, name(I), integer, 0),
                                  digraph:add_vertex(G, name(I)),
                                  {I, Id}
                              end || I <- lists:seq(1, ?NVARS)]),
        Ctx = #{s => S, g => G, fault => Fault},
        case check_state(Ctx) of
            ok -> steps(Ctx, Cmds, 1, Ids);
            {fail, Why} -> {fail, 0, initial, Why}
        end
    after
        digraph:delete(G),
        ok = dspex_store:delete_session(S)
    end.

steps(_Ctx, [], _N, _Ids) -> ok;
steps(Ctx, [Cmd | Cmds], N, Ids) ->
    case step(Ctx, Cmd, Ids) of
        {ok, Ids1} ->
            case check_state(Ctx) of
                ok -> steps(Ctx, Cmds, N + 1, Ids1);
                {fail, Why} -> {fail, N, Cmd, Why}
            end;
        {fail, Why} ->
            {fail, N, Cmd, Why}
    end.

name(I) -> element(I, ?NAMES).

key(I, name, _Ids) -> name(I);
key(I, atom, _Ids) -> binary_to_atom(name(I));
key(I, id, Ids) -> maps:get(I, Ids).

live(G, Name) -> digraph:vertex(G, Name) =/= false.

observe(#{fault := F}, Kind, Result) -> F(Kind, Result).

%% One command: its result against the model's, then the model follows.
step(Ctx, {add, I, J, Type, FI, FJ}, Ids) ->
    add(Ctx, name(I), name(J), key(I, FI, Ids), key(J, FJ, Ids), Type, Ids);
step(#{g := G} = Ctx, {add_cycle, K, L}, Ids) ->
    %% To: a live variable with dependents; From: one of them
    case [V || V <- lists:sort(digraph:vertices(G)), digraph:out_degree(G, V) > 0] of
        [] ->
            {ok, Ids};
        Tos ->
            To = lists:nth(K rem length(Tos) + 1, Tos),
            Desc = lists:sort(digraph_utils:reachable_neighbours([To], G)),
            From = lists:nth(L rem length(Desc) + 1, Desc),
            add(Ctx, From, To, From, To, data, Ids)
    end;
step(Ctx, {remove, I, J, FI, FJ}, Ids) ->
    remove(Ctx, name(I), name(J), key(I, FI, Ids), key(J, FJ, Ids), Ids);
step(#{g := G} = Ctx, {remove_edge, K}, Ids) ->
    case lists:sort(digraph:edges(G)) of
        [] -> {ok, Ids};
        Es ->
            {F, T} = lists:nth(K rem length(Es) + 1, Es),
            remove(Ctx, F, T, F, T, Ids)
    end;
step(#{s := S, g := G} = Ctx, {delete, I, FI}, Ids) ->
    Key = key(I, FI, Ids),
    Actual = observe(Ctx, delete, dspex_store:delete(S, Key)),
    case live(G, name(I)) of
        true ->
            true = digraph:del_vertex(G, name(I)),
            expect(ok, Actual, Ids);
        false ->
            expect({error, {not_found, Key}}, Actual, Ids)
    end;
step(Ctx, {recreate, I, FI}, Ids) ->
    %% delete, then register the name again: a new id and no edges
    case step(Ctx, {delete, I, FI}, Ids) of
        {ok, Ids1} -> register(Ctx, I, Ids1);
        Fail -> Fail
    end;
step(#{g := G} = Ctx, {register, K}, Ids) ->
    %% a variable deleted before, if any; else a live one (already_exists)
    case [I || I <- lists:seq(1, ?NVARS), not live(G, name(I))] of
        [] -> register(Ctx, K rem ?NVARS + 1, Ids);
        Dead -> register(Ctx, lists:nth(K rem length(Dead) + 1, Dead), Ids)
    end;
step(#{s := S, g := G} = Ctx, clear, Ids) ->
    Actual = observe(Ctx, clear, dspex_graph:clear(S)),
    true = digraph:del_edges(G, digraph:edges(G)),
    expect(ok, Actual, Ids).

register(#{s := S, g := G} = Ctx, I, Ids) ->
    Actual = observe(Ctx, register, dspex_store:register(S, name(I), integer, 0)),
    case {live(G, name(I)), Actual} of
        {true, _} ->
            expect({error, {already_exists, name(I)}}, Actual, Ids);
        {false, {ok, Id}} when is_binary(Id) ->
            digraph:add_vertex(G, name(I)),
            {ok, Ids#{I := Id}};
        {false, _} ->
            {fail, {register, {expected, {ok, id}}, {got, Actual}}}
    end.

add(#{s := S, g := G} = Ctx, F, T, KF, KT, Type, Ids) ->
    Actual = observe(Ctx, add, dspex_graph:add_dependency(S, KF, KT, Type)),
    case {live(G, F), live(G, T)} of
        {false, _} -> expect({error, {not_found, KF}}, Actual, Ids);
        {_, false} -> expect({error, {not_found, KT}}, Actual, Ids);
        {true, true} ->
            %% the path is checked against the graph before the model changes
            case {digraph:add_edge(G, {F, T}, F, T, Type), Actual} of
                {{F, T}, ok} ->
                    {ok, Ids};
                {{error, {bad_edge, _}}, {error, {would_create_cycle, Path}}} ->
                    case check_path(G, F, T, Path) of
                        ok -> {ok, Ids};
                        Fail -> Fail
                    end;
                {{F, T}, _} ->
                    digraph:del_edge(G, {F, T}),
                    {fail, {add, F, T, {digraph, accepts}, {got, Actual}}};
                {{error, {bad_edge, DP}}, _} ->
                    {fail, {add, F, T, {digraph, {bad_edge, DP}}, {got, Actual}}}
            end
    end.

remove(#{s := S, g := G} = Ctx, F, T, KF, KT, Ids) ->
    Actual = observe(Ctx, remove, dspex_graph:remove_dependency(S, KF, KT)),
    case live(G, F) andalso live(G, T) andalso digraph:edge(G, {F, T}) =/= false of
        true ->
            true = digraph:del_edge(G, {F, T}),
            expect(ok, Actual, Ids);
        false ->
            expect({error, {not_found, {KF, KT}}}, Actual, Ids)
    end.

expect(Same, Same, Ids) -> {ok, Ids};
expect(Expected, Actual, _Ids) -> {fail, {expected, Expected, got, Actual}}.

%%% State checks --------------------------------------------------------------------

check_state(#{g := G} = Ctx) ->
    all([fun() -> check_var(Ctx, name(I), live(G, name(I))) end || I <- lists:seq(1, ?NVARS)]
        ++ [fun() -> check_map(G, observe(Ctx, to_map, dspex_graph:to_map(maps:get(s, Ctx)))) end]).

check_var(#{s := S, g := G} = Ctx, V, true) ->
    Q = fun(Kind) -> observe(Ctx, Kind, dspex_graph:Kind(S, V)) end,
    all([fun() -> tag({dependencies, V}, check_neighbours(digraph:in_neighbours(G, V), Q(dependencies))) end,
         fun() -> tag({dependents, V}, check_neighbours(digraph:out_neighbours(G, V), Q(dependents))) end,
         fun() -> tag({update_order, V}, check_order(G, V, Q(update_order), true)) end,
         fun() -> tag({all_dependents, V}, check_order(G, V, Q(all_dependents), false)) end]);
check_var(#{s := S} = Ctx, V, false) ->
    all([fun() ->
                 case observe(Ctx, Kind, dspex_graph:Kind(S, V)) of
                     {error, {not_found, V}} -> ok;
                     Other -> {fail, {Kind, V, deleted, {got, Other}}}
                 end
         end || Kind <- [dependencies, dependents, update_order, all_dependents]]).

all([]) -> ok;
all([F | Fs]) ->
    case F() of
        ok -> all(Fs);
        Fail -> Fail
    end.

tag(_What, ok) -> ok;
tag(What, {fail, Why}) -> {fail, {What, Why}}.

%% The first failure whose condition holds, else ok.
first([]) -> ok;
first([{true, Why} | _]) -> {fail, Why};
first([{false, _} | Rest]) -> first(Rest).

%% A cycle report for the proposed edge From -> To.
check_path(G, From, To, [_, _ | _] = Path) ->
    Missing = [{A, B} || {A, B} <- pairs(tl(Path)), digraph:edge(G, {A, B}) =:= false],
    first([{lists:sublist(Path, 2) =/= [From, To], {cycle_path_start, From, To, Path}},
           {lists:last(Path) =/= From, {cycle_path_end, From, To, Path}},
           {Missing =/= [], {cycle_path_not_edges, Missing, Path}}]);
check_path(_G, From, To, Path) ->
    {fail, {cycle_path, From, To, Path}}.

pairs([A, B | Rest]) -> [{A, B} | pairs([B | Rest])];
pairs(_) -> [].

%% {ok, Names} equal, as a set without duplicates, to Expected.
check_neighbours(Expected, {ok, L}) when is_list(L) ->
    first([{lists:sort(L) =/= lists:sort(Expected), {expected, lists:sort(Expected), got, L}}]);
check_neighbours(_Expected, Other) ->
    {fail, {expected_ok_list, Other}}.

%% update_order (WithSelf) or all_dependents: exactly the reachable set, each
%% name once, V first (or absent), every edge among the members forward.
check_order(G, V, {ok, L}, WithSelf) when is_list(L) ->
    Reach = digraph_utils:reachable([V], G),
    Expected = lists:sort(case WithSelf of true -> Reach; false -> Reach -- [V] end),
    Pos = maps:from_list(lists:zip(L, lists:seq(1, length(L)))),
    Backward = [{U, W} || U <- L, W <- digraph:out_neighbours(G, U),
                          maps:is_key(W, Pos), maps:get(W, Pos) =< maps:get(U, Pos)],
    first([{map_size(Pos) =/= length(L), {duplicates, L}},
           {WithSelf andalso lists:sublist(L, 1) =/= [V], {not_first, V, L}},
           {lists:sort(L) =/= Expected, {reachable, Expected, got, L}},
           {Backward =/= [], {backward_edges, Backward, L}}]);
check_order(_G, _V, Other, _WithSelf) ->
    {fail, {expected_ok_list, Other}}.

%% to_map/1 against the model.
check_map(G, {ok, #{nodes := Nodes, edges := Edges}}) when is_list(Nodes), is_list(Edges) ->
    Expected = lists:sort([#{from => F, to => T, type => Ty}
                           || E <- digraph:edges(G), {_, F, T, Ty} <- [digraph:edge(G, E)]]),
    Ends = lists:usort(lists:append([[F, T] || #{from := F, to := T} <- Expected])),
    first([{Edges =/= Expected, {to_map_edges, Expected, got, Edges}},
           {Nodes =/= lists:usort(Nodes), {to_map_nodes_unsorted_or_repeated, Nodes}},
           {Ends -- Nodes =/= [], {to_map_nodes_missing, Ends -- Nodes, Nodes}},
           {[N || N <- Nodes, not live(G, N)] =/= [], {to_map_nodes_not_live, Nodes}}]);
check_map(_G, Other) ->
    {fail, {to_map, Other}}.
