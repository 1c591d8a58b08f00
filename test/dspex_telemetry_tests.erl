%% EUnit tests of dspex_telemetry: the telemetry-compatible API (attach,
%% detach, execute, span, list_handlers, failing handlers) and the events every
%% area of the bridge emits, with their metadata.
-module(dspex_telemetry_tests).
-include_lib("eunit/include/eunit.hrl").

-export([log/2]).

sid() -> iolist_to_binary(["t_", integer_to_list(erlang:unique_integer([positive]))]).

%% Attaches a handler forwarding every listed event to the test process.
listen(Events) ->
    Id = {test_listener, make_ref()},
    Self = self(),
    ok = dspex_telemetry:attach_many(Id, Events, fun(E, M, Meta, Cfg) -> Self ! {event, Cfg, E, M, Meta} end, Id),
    Id.

%% The next event of this listener, or a failure after 2 s.
next(Id) ->
    receive {event, Id, E, M, Meta} -> {E, M, Meta}
    after 2000 -> error(no_event)
    end.

%% The next event of this listener with this name (others are skipped).
next(Id, Event) ->
    receive {event, Id, Event, M, Meta} -> {M, Meta}
    after 2000 -> error({no_event, Event})
    end.

no_more(Id) ->
    receive {event, Id, E, _, _} -> error({unexpected_event, E}) after 0 -> ok end.

api_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun attach_execute_detach/0, fun attach_many_and_list_handlers/0, fun span_events/0,
      fun bad_event_names_attach_nothing/0,
      fun crashing_handler_is_detached_and_reported/0, fun handlers_lookup/0]}.

attach_execute_detach() ->
    Id = listen([[t, one]]),
    ?assertEqual({error, already_exists}, dspex_telemetry:attach(Id, [t, two], fun(_, _, _, _) -> ok end, x)),
    ok = dspex_telemetry:execute([t, one], #{n => 1}, #{k => v}),
    ?assertEqual({[t, one], #{n => 1}, #{k => v}}, next(Id)),
    ok = dspex_telemetry:execute([t, other], #{}, #{}),
    no_more(Id),
    ok = dspex_telemetry:detach(Id),
    ?assertEqual({error, not_found}, dspex_telemetry:detach(Id)),
    ok = dspex_telemetry:execute([t, one], #{n => 2}, #{}),
    no_more(Id).

attach_many_and_list_handlers() ->
    Id = listen([[t, many, a], [t, many, b]]),
    Other = listen([[t, many, a]]),
    ok = dspex_telemetry:execute([t, many, b], #{}, #{}),
    ?assertMatch({[t, many, b], _, _}, next(Id)),
    no_more(Other),
    ok = dspex_telemetry:execute([t, many, a], #{}, #{}),
    ?assertMatch({[t, many, a], _, _}, next(Id)),
    ?assertMatch({[t, many, a], _, _}, next(Other)),
    Listed = dspex_telemetry:list_handlers([t, many]),
    ?assertEqual(lists:sort([{Id, [t, many, a]}, {Id, [t, many, b]}, {Other, [t, many, a]}]),
                 lists:sort([{I, E} || #{id := I, event_name := E} <- Listed])),
    ?assertEqual([Id], [I || #{id := I} <- dspex_telemetry:list_handlers([t, many, b])]),
    ok = dspex_telemetry:detach(Id),
    %% the other handler of the shared event stays attached
    ok = dspex_telemetry:execute([t, many, a], #{}, #{}),
    ?assertMatch({[t, many, a], _, _}, next(Other)),
    no_more(Id),
    ok = dspex_telemetry:detach(Other),
    ?assertEqual([], dspex_telemetry:list_handlers([t, many])).

%% An event that is not a list of atoms is refused before anything is
%% stored: no half-attached handler, nothing that breaks later callers.
bad_event_names_attach_nothing() ->
    F = fun(_, _, _, _) -> ok end,
    Before = dspex_telemetry:list_handlers([]),
    ?assertEqual({error, {invalid_event, [a, <<"b">>]}}, dspex_telemetry:attach(bad_ev, [a, <<"b">>], F, [])),
    ?assertEqual({error, {invalid_event, foo}}, dspex_telemetry:attach(bad_ev, foo, F, [])),
    ?assertEqual({error, {invalid_event, []}}, dspex_telemetry:attach_many(bad_ev, [[t, ok], []], F, [])),
    ?assertEqual(Before, dspex_telemetry:list_handlers([])),
    ?assertEqual({error, not_found}, dspex_telemetry:detach(bad_ev)),
    %% the id is still free
    ok = dspex_telemetry:attach(bad_ev, [t, fine], F, []),
    ok = dspex_telemetry:detach(bad_ev).

span_events() ->
    Id = listen([[t, span, start], [t, span, stop], [t, span, exception]]),
    ?assertEqual(42, dspex_telemetry:span([t, span], #{a => 1}, fun() -> {42, #{b => 2}} end)),
    {[t, span, start], #{monotonic_time := _}, #{a := 1}} = next(Id),
    {[t, span, stop], #{duration := D}, #{b := 2}} = next(Id),
    ?assert(is_integer(D) andalso D >= 0),
    ?assertError(boom, dspex_telemetry:span([t, span], #{a => 1}, fun() -> error(boom) end)),
    {[t, span, start], _, _} = next(Id),
    {[t, span, exception], #{duration := _}, #{kind := error, reason := boom}} = next(Id),
    ok = dspex_telemetry:detach(Id).

%% logger handler callback: forwards log events to the test process
log(#{msg := Msg}, #{config := #{pid := Pid}}) -> Pid ! {logged, Msg}.

crashing_handler_is_detached_and_reported() ->
    ok = logger:add_handler(telemetry_test_log, ?MODULE, #{config => #{pid => self()}, level => error}),
    try
        Good = listen([[t, crash]]),
        ok = dspex_telemetry:attach(bad, [t, crash], fun(_, _, _, _) -> error(handler_bug) end, none),
        ok = dspex_telemetry:execute([t, crash], #{}, #{}),
        %% the good handler still runs, the bad one is gone and reported
        ?assertMatch({[t, crash], _, _}, next(Good)),
        ?assertEqual([Good], [I || #{id := I} <- dspex_telemetry:list_handlers([t, crash])]),
        receive {logged, {Fmt, Args}} ->
                ?assertMatch("dspex_telemetry: handler" ++ _, Fmt),
                ?assertMatch([bad, [t, crash], {error, handler_bug, _}], Args)
        after 2000 -> error(not_logged)
        end,
        ok = dspex_telemetry:execute([t, crash], #{}, #{}),
        ?assertMatch({[t, crash], _, _}, next(Good)),
        ok = dspex_telemetry:detach(Good)
    after
        logger:remove_handler(telemetry_test_log)
    end.

handlers_lookup() ->
    ?assertEqual('dspex_telemetry/dspex.store.get.stop', dspex_telemetry:key([dspex, store, get, stop])),
    ?assertEqual([], dspex_telemetry:handlers([t, nobody, listens])),
    Id = listen([[t, looked, up]]),
    [{Id, F, Id}] = dspex_telemetry:handlers([t, looked, up]),
    ?assert(is_function(F, 4)),
    ?assertEqual(dspex_telemetry:handlers([t, looked, up]),
                 dspex_telemetry:handlers_at(dspex_telemetry:key([t, looked, up]))),
    ok = dspex_telemetry:emit(dspex_telemetry:handlers([t, looked, up]), [t, looked, up], #{x => 1}, #{}),
    ?assertEqual({[t, looked, up], #{x => 1}, #{}}, next(Id)),
    ok = dspex_telemetry:detach(Id),
    ?assertEqual([], dspex_telemetry:handlers([t, looked, up])).

%%% every area emits its events ------------------------------------------------

events_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun store_events/0, fun graph_events/0, fun lock_events/0, fun acl_events/0, fun rate_limit_events/0]}.

store_events() ->
    Ops = [register, get, get_value, get_many, set, batch, delete, rollback, watch],
    Id = listen([[dspex, store, Op, stop] || Op <- Ops]),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, VarId} = dspex_store:register(S, x, float, 0.5),
    {#{duration := D}, #{session := S, variable := x, result := ok}} = next(Id, [dspex, store, register, stop]),
    ?assert(is_integer(D) andalso D >= 0),
    {ok, _} = dspex_store:get(S, VarId),
    {_, #{session := S, variable := VarId, result := ok}} = next(Id, [dspex, store, get, stop]),
    {error, _} = dspex_store:get(S, nope),
    {_, #{session := S, variable := nope, result := error, error := {not_found, nope}}} =
        next(Id, [dspex, store, get, stop]),
    {ok, 0.5} = dspex_store:get_value(S, x),
    {_, #{session := S, variable := x, result := ok}} = next(Id, [dspex, store, get_value, stop]),
    {ok, _} = dspex_store:get_many(S, [x, nope]),
    {_, #{session := S, variables := [x, nope], result := ok}} = next(Id, [dspex, store, get_many, stop]),
    {ok, 1} = dspex_store:set(S, x, 0.7),
    {_, #{session := S, variable := x, result := ok}} = next(Id, [dspex, store, set, stop]),
    {error, _} = dspex_store:set(S, x, <<"not a float">>),
    {_, #{session := S, variable := x, result := error, error := {invalid_value, _}}} =
        next(Id, [dspex, store, set, stop]),
    {ok, _} = dspex_store:set_many(S, #{x => 0.8}, #{atomic => true}),
    {_, #{session := S, variables := [x], atomic := true, result := ok}} = next(Id, [dspex, store, batch, stop]),
    {ok, 3} = dspex_store:rollback(S, x, 0),
    {_, #{session := S, variable := x, to_version := 0, result := ok}} = next(Id, [dspex, store, rollback, stop]),
    Ref = dspex_store:watch(S, [x], self()),
    {_, #{session := S, variables := [x], result := ok}} = next(Id, [dspex, store, watch, stop]),
    dspex_store:unwatch(Ref),
    ok = dspex_store:delete(S, x),
    {_, #{session := S, variable := x, result := ok}} = next(Id, [dspex, store, delete, stop]),
    {error, session_not_found} = dspex_store:get(<<"no_such_session">>, x),
    {_, #{result := error, error := session_not_found}} = next(Id, [dspex, store, get, stop]),
    ok = dspex_telemetry:detach(Id).

graph_events() ->
    Id = listen([[dspex, graph, add_dependency, stop], [dspex, graph, remove_dependency, stop],
                 [dspex, graph, propagation, stop], [dspex, graph, propagation, error]]),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, _} = dspex_store:register(S, b, float, 1.0),
    ok = dspex_graph:add_dependency(S, a, b),
    {#{duration := _}, #{session := S, from := a, to := b, type := data, result := ok}} =
        next(Id, [dspex, graph, add_dependency, stop]),
    {error, {would_create_cycle, _}} = dspex_graph:add_dependency(S, b, a),
    {_, #{result := error, error := {would_create_cycle, _}}} = next(Id, [dspex, graph, add_dependency, stop]),
    ok = dspex_graph:remove_dependency(S, a, b),
    {_, #{session := S, from := a, to := b, result := ok}} = next(Id, [dspex, graph, remove_dependency, stop]),
    {ok, _} = dspex_graph:define_derived(S, <<"double">>, float, [a],
                                         fun(#{a := A}) when A < 100 -> 2 * A end),
    {ok, _} = dspex_store:set(S, a, 3.0, #{propagate => sync}),
    {#{duration := _}, #{session := S, variable := <<"a">>, dependents := [<<"double">>]}} =
        next(Id, [dspex, graph, propagation, stop]),
    {ok, _} = dspex_store:set(S, a, 500.0, #{propagate => sync}),
    {_, #{session := S, variable := <<"double">>, reason := _}} = next(Id, [dspex, graph, propagation, error]),
    ok = dspex_telemetry:detach(Id).

lock_events() ->
    Id = listen([[dspex, locks, E] || E <- [acquired, released, waited, preempted, progress]]),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {ok, L} = dspex_locks:acquire(S, x, opt_a, #{}),
    {_, #{session := S, variable := <<"x">>, optimizer := opt_a, token := _}} = next(Id, [dspex, locks, acquired]),
    ok = dspex_locks:report_progress(L, 1, 0.4, #{accuracy => 0.9}),
    {_, #{session := S, variable := <<"x">>, iteration := 1, metrics := #{accuracy := 0.9}}} =
        next(Id, [dspex, locks, progress]),
    Parent = self(),
    W = spawn(fun() -> Parent ! {waiter, dspex_locks:acquire(S, x, opt_b, #{timeout => 5000})},
                       receive stop -> ok end end),
    {_, #{session := S, variable := <<"x">>, optimizer := opt_b}} = next(Id, [dspex, locks, waited]),
    ok = dspex_locks:release(L),
    {_, #{session := S, variable := <<"x">>}} = next(Id, [dspex, locks, released]),
    receive {waiter, {ok, _}} -> ok after 2000 -> error(not_granted) end,
    {_, #{optimizer := opt_b}} = next(Id, [dspex, locks, acquired]),
    %% a higher priority takes the lock from opt_b
    {ok, High} = dspex_locks:acquire(S, x, opt_c, #{conflict => preempt, priority => 9}),
    {_, #{session := S, variable := <<"x">>, preempted := opt_b, by := opt_c}} = next(Id, [dspex, locks, preempted]),
    {ok, _} = dspex_locks:stop(High, #{}),
    {_, #{session := S, variable := <<"x">>, applied := false}} = next(Id, [dspex, locks, released]),
    W ! stop,
    ok = dspex_telemetry:detach(Id),
    %% a lease that is not renewed expires
    Exp = listen([[dspex, locks, expired]]),
    {ok, #{token := T}} = dspex_locks:acquire(S, x, opt_d, #{lease => 30}),
    {_, #{session := S, variable := <<"x">>, token := T}} = next(Exp, [dspex, locks, expired]),
    ok = dspex_telemetry:detach(Exp).

acl_events() ->
    Id = listen([[dspex, acl, check], [dspex, acl, denied], [dspex, acl, permissions_changed]]),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => <<"reader_*">>, permissions => [read]}]),
    {_, #{session := S, variable := x, result := ok}} = next(Id, [dspex, acl, permissions_changed]),
    ok = dspex_acl:check_access(S, x, <<"reader_1">>, read, #{}),
    {_, #{session := S, variable := x, principal := <<"reader_1">>, permission := read, result := ok}} =
        next(Id, [dspex, acl, check]),
    {error, access_denied} = dspex_acl:check_access(S, x, <<"reader_1">>, write, #{}),
    {_, #{principal := <<"reader_1">>, permission := write, result := access_denied}} = next(Id, [dspex, acl, check]),
    %% every denial is also reported on its own
    {_, #{principal := <<"reader_1">>, permission := write}} = next(Id, [dspex, acl, denied]),
    {error, access_denied} = dspex_store:set(S, x, 0.1, #{as => <<"stranger">>}),
    {_, #{session := S, principal := <<"stranger">>, permission := write}} = next(Id, [dspex, acl, denied]),
    ok = dspex_telemetry:detach(Id).

rate_limit_events() ->
    Id = listen([[dspex, rate_limit, exceeded]]),
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{rate_limit => #{rate => 0.001, burst => 1}}),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {error, rate_limited} = dspex_store:get(S, x),
    {_, #{session := S, variable := x}} = next(Id, [dspex, rate_limit, exceeded]),
    ok = dspex_telemetry:detach(Id).
