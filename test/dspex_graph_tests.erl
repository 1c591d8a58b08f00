%% EUnit tests of dspex_graph: the graph API and derived-variable propagation.
-module(dspex_graph_tests).
-include_lib("eunit/include/eunit.hrl").
-export([square/1]).

sid() -> iolist_to_binary(["g_", integer_to_list(erlang:unique_integer([positive]))]).

session(Vars) ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    [{ok, _} = dspex_store:register(S, V, float, 1.0) || V <- Vars],
    S.

graph_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun edges_and_neighbours/0, fun cycles_are_rejected_with_path/0, fun unknown_variables/0,
      fun delete_variable_removes_edges/0, fun export_formats/0,
      fun diamond_recomputes_once_in_order/0, fun chain_propagates/0, fun derived_cannot_be_set/0,
      fun failing_fun_keeps_value_and_records_error/0, fun mf_form_and_sync/0,
      fun deleted_input_records_error/0, fun delete_session_stops_propagator/0,
      fun export_import_keeps_graph_rules_and_derivations/0, fun register_cannot_make_a_derived_variable/0]}.

%% A migrated session keeps its edges, access rules and derived functions.
export_import_keeps_graph_rules_and_derivations() ->
    S = session([a, b]),
    ok = dspex_graph:add_dependency(S, a, b, control),
    {ok, _} = dspex_graph:define_derived(S, twice, float, [a], fun(#{a := A}) -> 2 * A end),
    ok = dspex_acl:set_permissions(S, b, [#{session_pattern => any, permissions => [read]}]),
    {ok, E} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    ok = dspex_store:import_session(E),
    ?assertEqual({ok, [<<"b">>, <<"twice">>]}, sorted(dspex_graph:dependents(S, a))),
    {ok, [#{session_pattern := any}]} = dspex_acl:get_permissions(S, b),
    ?assertEqual({error, derived_variable}, dspex_store:set(S, twice, 1.0)),
    {ok, _} = dspex_store:set(S, a, 21.0, #{propagate => sync}),
    ?assertEqual({ok, 42.0}, dspex_store:get_value(S, twice)),
    {ok, E2} = dspex_store:export_session(S),
    ?assertEqual(maps:without([variables, derived_functions], E), maps:without([variables, derived_functions], E2)).

edges_and_neighbours() ->
    S = session([a, b, c, d]),
    [ok = dspex_graph:add_dependency(S, F, T) || {F, T} <- [{a, b}, {a, c}, {b, d}, {c, d}]],
    ok = dspex_graph:add_dependency(S, a, b, control), %% again: ok, type updated
    ?assertEqual({ok, [<<"b">>, <<"c">>]}, sorted(dspex_graph:dependents(S, a))),
    ?assertEqual({ok, [<<"b">>, <<"c">>]}, sorted(dspex_graph:dependencies(S, d))),
    ?assertEqual({ok, [<<"b">>, <<"c">>, <<"d">>]}, sorted(dspex_graph:all_dependents(S, a))),
    {ok, [<<"a">>, X, Y, <<"d">>]} = dspex_graph:update_order(S, a),
    ?assertEqual([<<"b">>, <<"c">>], lists:sort([X, Y])),
    ?assertEqual({ok, [<<"d">>]}, dspex_graph:update_order(S, d)),
    ok = dspex_graph:remove_dependency(S, a, b),
    ?assertEqual({error, {not_found, {a, b}}}, dspex_graph:remove_dependency(S, a, b)),
    ?assertEqual({ok, [<<"a">>, <<"c">>, <<"d">>]}, dspex_graph:update_order(S, a)),
    ok = dspex_graph:clear(S),
    ?assertEqual({ok, []}, dspex_graph:dependents(S, a)).

cycles_are_rejected_with_path() ->
    S = session([a, b, c]),
    ok = dspex_graph:add_dependency(S, a, b),
    ok = dspex_graph:add_dependency(S, b, c),
    ?assertEqual({error, {would_create_cycle, [<<"c">>, <<"a">>, <<"b">>, <<"c">>]}},
                 dspex_graph:add_dependency(S, c, a)),
    ?assertEqual({error, {would_create_cycle, [<<"b">>, <<"b">>]}}, dspex_graph:add_dependency(S, b, b)),
    %% nothing changed
    ?assertEqual({ok, [<<"a">>, <<"b">>, <<"c">>]}, dspex_graph:update_order(S, a)),
    ?assertEqual({ok, []}, dspex_graph:dependents(S, c)).

unknown_variables() ->
    S = session([a]),
    ?assertEqual({error, {not_found, zz}}, dspex_graph:add_dependency(S, a, zz)),
    ?assertEqual({error, {not_found, zz}}, dspex_graph:dependents(S, zz)),
    ?assertEqual({error, session_not_found}, dspex_graph:add_dependency(sid(), a, b)),
    ?assertEqual({ok, []}, dspex_graph:dependencies(S, a)).

delete_variable_removes_edges() ->
    S = session([a, b, c]),
    ok = dspex_graph:add_dependency(S, a, b),
    ok = dspex_graph:add_dependency(S, b, c),
    ok = dspex_store:delete(S, b),
    ?assertEqual({ok, []}, dspex_graph:dependents(S, a)),
    ?assertEqual({ok, []}, dspex_graph:dependencies(S, c)),
    {ok, _} = dspex_store:register(S, b, float, 0.0), %% a new b starts without edges
    ?assertEqual({ok, []}, dspex_graph:dependencies(S, b)).

export_formats() ->
    S = session([<<"a">>, <<"b \"q\"">>]),
    ok = dspex_graph:add_dependency(S, <<"a">>, <<"b \"q\"">>, data),
    {ok, M} = dspex_graph:to_map(S),
    ?assertEqual(#{nodes => [<<"a">>, <<"b \"q\"">>],
                   edges => [#{from => <<"a">>, to => <<"b \"q\"">>, type => data}]}, M),
    {ok, Dot} = dspex_graph:to_dot(S),
    ?assertMatch({_, _}, binary:match(Dot, <<"\"a\" -> \"b \\\"q\\\"\" [label=\"data\"];">>)),
    ?assertMatch(<<"digraph ", _/binary>>, Dot).

sorted({ok, L}) -> {ok, lists:sort(L)}.

%%% propagation ---------------------------------------------------------------

%% a -> b, a -> c, b -> d, c -> d: one change of a recomputes d exactly once,
%% after b and c (so d sees both new values).
diamond_recomputes_once_in_order() ->
    S = session([a]),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A * 2 end),
    {ok, _} = dspex_graph:define_derived(S, c, float, [a], fun(#{a := A}) -> A + 1 end),
    {ok, _} = dspex_graph:define_derived(S, d, float, [b, c], fun(#{b := B, c := C}) -> B + C end),
    ?assertEqual({ok, 2.0 + 2.0}, dspex_store:get_value(S, d)),
    Ref = dspex_store:watch(S, [d], self()),
    {ok, _} = dspex_store:set(S, a, 10.0, #{propagate => sync}),
    {ok, _} = dspex_store:set(S, a, 20.0, #{propagate => sync}),
    Got = collect(Ref),
    ?assertEqual([{4.0, 31.0}, {31.0, 61.0}], Got), %% once per change, never with a stale b or c
    {ok, D} = dspex_store:get(S, d),
    ?assertMatch(#{derived := true, error := undefined, value := 61.0}, D).

collect(Ref) ->
    receive {dspex_variable, Ref, _, _, Old, New, _} -> [{Old, New} | collect(Ref)]
    after 0 -> []
    end.

chain_propagates() ->
    S = session([x]),
    {ok, _} = dspex_graph:define_derived(S, y, float, [x], fun(#{x := X}) -> X + 1 end),
    {ok, _} = dspex_graph:define_derived(S, z, float, [y], fun(#{y := Y}) -> Y * 10 end),
    {ok, _} = dspex_store:set(S, x, 5.0, #{propagate => sync}),
    ?assertEqual({ok, 60.0}, dspex_store:get_value(S, z)),
    {ok, #{version := V}} = dspex_store:get(S, z),
    {ok, _} = dspex_store:set(S, x, 6.0, #{propagate => sync}),
    {ok, #{version := V2, value := 70.0}} = dspex_store:get(S, z),
    ?assertEqual(V + 1, V2).

derived_cannot_be_set() ->
    S = session([a]),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A end),
    ?assertEqual({error, derived_variable}, dspex_store:set(S, b, 3.0)),
    ?assertEqual({error, {batch_failed, #{b => derived_variable}}},
                 dspex_store:set_many(S, [{b, 3.0}], #{atomic => true})),
    ?assertEqual({error, derived_variable}, dspex_store:rollback(S, b, 0)),
    %% nor with the propagator's old internal option: only its own entry
    %% (dspex_store:set_derived/4) writes a derived variable
    P = #{propagation => true},
    ?assertEqual({error, derived_variable}, dspex_store:set(S, b, 100.0, P)),
    ?assertEqual({error, derived_variable}, dspex_store:set(S, b, 100.0, P#{propagate => sync})),
    ?assertMatch({ok, #{errors := #{b := derived_variable}, updated := #{}}},
                 dspex_store:set_many(S, [{b, 100.0, P}])),
    ?assertEqual({error, {batch_failed, #{b => derived_variable}}},
                 dspex_store:set_many(S, [{b, 100.0, P}], #{atomic => true})),
    ?assertEqual({error, derived_variable}, dspex_store:rollback(S, b, 0, P)),
    ?assertMatch({ok, #{value := 1.0, version := 0}}, dspex_store:get(S, b)),
    %% the propagator still writes it
    {ok, 1} = dspex_store:set(S, a, 5.0, #{propagate => sync}),
    ?assertMatch({ok, #{value := 5.0, version := 1}}, dspex_store:get(S, b)).

%% `derived' is no option of register/5: only define_derived makes a derived
%% variable (one with a function to write it); the flag is ignored, as any
%% unknown option, and the variable is a plain one.
register_cannot_make_a_derived_variable() ->
    S = session([]),
    {ok, _} = dspex_store:register(S, v, float, 1.0, #{derived => true}),
    {ok, V} = dspex_store:get(S, v),
    ?assertNot(maps:is_key(derived, V)),
    ?assertEqual({ok, 1}, dspex_store:set(S, v, 2.0)).

failing_fun_keeps_value_and_records_error() ->
    S = session([a]),
    Self = self(),
    ok = dspex_telemetry:attach({?MODULE, Self}, [dspex, graph, propagation, error],
                                fun(E, M, Meta, P) -> P ! {event, E, M, Meta} end, Self),
    {ok, _} = dspex_graph:define_derived(S, bad, float, [a],
                                         fun(#{a := A}) when A < 50 -> A; (_) -> error(too_big) end),
    {ok, _} = dspex_graph:define_derived(S, neg, float, [a], fun(#{a := A}) -> -A end),
    {ok, _} = dspex_graph:define_derived(S, wrong_type, float, [a],
                                         fun(#{a := A}) when A < 50 -> A; (_) -> <<"not a float">> end),
    {ok, _} = dspex_store:set(S, a, 100.0, #{propagate => sync}),
    {ok, #{value := 1.0, error := {derive_failed, {error, too_big}}}} = dspex_store:get(S, bad),
    {ok, #{value := 1.0, error := {invalid_value, _}}} = dspex_store:get(S, wrong_type),
    ?assertEqual({ok, -100.0}, dspex_store:get_value(S, neg)), %% the unrelated branch went on
    receive {event, [dspex, graph, propagation, error], #{count := 1}, #{session := S, variable := <<"bad">>}} -> ok
    after 1000 -> ?assert(false)
    end,
    %% the next success clears the error
    {ok, _} = dspex_store:set(S, a, 3.0, #{propagate => sync}),
    {ok, #{value := 3.0, error := undefined}} = dspex_store:get(S, bad),
    ok = dspex_telemetry:detach({?MODULE, Self}).

mf_form_and_sync() ->
    S = session([a]),
    {ok, _} = dspex_graph:define_derived(S, <<"sq">>, float, [a], {?MODULE, square}),
    {ok, _} = dspex_store:set(S, a, 3.0, #{propagate => sync}),
    ?assertEqual({ok, 9.0}, dspex_store:get_value(S, <<"sq">>)),
    ?assertEqual({error, {invalid_argument, function}}, dspex_graph:define_derived(S, x, float, [a], not_a_fun)),
    ?assertEqual({error, {not_found, zz}}, dspex_graph:define_derived(S, x, float, [zz], {?MODULE, square})),
    ?assertMatch({error, {derive_failed, _}}, dspex_graph:define_derived(S, x, float, [a], fun(_) -> error(x) end)),
    ?assertEqual({error, {already_exists, <<"sq">>}}, dspex_graph:define_derived(S, <<"sq">>, float, [a], {?MODULE, square})).

square(#{a := A}) -> A * A.

deleted_input_records_error() ->
    S = session([a, b]),
    {ok, _} = dspex_graph:define_derived(S, s, float, [a, b], fun(#{a := A, b := B}) -> A + B end),
    ok = dspex_store:delete(S, b),
    {ok, _} = dspex_store:set(S, a, 5.0, #{propagate => sync}),
    %% s still depends on a, but its input b is gone: value kept, error recorded
    {ok, #{value := 2.0, error := {not_found, b}}} = dspex_store:get(S, s).

delete_session_stops_propagator() ->
    S = session([a]),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A end),
    Pid = dspex_propagator:whereis_session(S),
    ?assert(is_pid(Pid)),
    MRef = monitor(process, Pid),
    ok = dspex_store:delete_session(S),
    receive {'DOWN', MRef, process, Pid, normal} -> ok after 5000 -> ?assert(false) end.
