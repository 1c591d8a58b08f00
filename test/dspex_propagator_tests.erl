%% EUnit tests of dspex_propagator's bounded calls: a propagator held up by a
%% derive function that does not return answers its callers `{error, timeout}'
%% instead of blocking them for ever, and catches up once it is released.
-module(dspex_propagator_tests).
-include_lib("eunit/include/eunit.hrl").
-include("dspex_bridge.hrl").
-export([handle_event/4]).

-define(RELEASE, dspex_propagator_tests_release).

sid() -> iolist_to_binary(["p_", integer_to_list(erlang:unique_integer([positive]))]).

propagator_test_() ->
    {setup,
     fun() ->
             %% any free ports: other nodes may serve the defaults on this machine
             _ = application:load(dspex_bridge),
             [ok = application:set_env(dspex_bridge, K, V) || {K, V} <- [{grpc_listen, "127.0.0.1:0"}, {prometheus_port, 0}],
                                                               application:get_env(dspex_bridge, K) =:= {ok, default(K)}],
             {ok, _} = application:ensure_all_started(dspex_bridge),
             Old = application:get_env(dspex_bridge, propagation_timeout_ms),
             ok = application:set_env(dspex_bridge, propagation_timeout_ms, 300),
             Old
     end,
     fun(undefined) -> application:unset_env(dspex_bridge, propagation_timeout_ms);
        ({ok, T}) -> application:set_env(dspex_bridge, propagation_timeout_ms, T)
     end,
     [fun timeout_is_configured/0,
      fun held_up_propagator_times_out_callers/0,
      fun sync_of_a_stopped_propagator_is_ok/0,
      fun deleted_derived_variable_loses_its_definition/0,
      fun deleted_input_is_watched_again/0]}.

default(grpc_listen) -> "127.0.0.1:50051";
default(prometheus_port) -> 9568.

timeout_is_configured() ->
    ?assertEqual(300, dspex_propagator:timeout()).

handle_event(Event, Measurements, Meta, Pid) -> Pid ! {event, Event, Measurements, Meta}.

%% `b = 2 * a', but computing it for a = 1.0 waits for ?RELEASE: the
%% propagator is stuck inside the derive function.
held_up_propagator_times_out_callers() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 0.0),
    Fun = fun(#{a := 1.0}) -> receive ?RELEASE -> 2.0 end;
             (#{a := A}) -> 2 * A
          end,
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], Fun),
    Prop = dspex_propagator:whereis_session(S),
    true = is_pid(Prop),
    Handler = {?MODULE, self()},
    ok = dspex_telemetry:attach(Handler, ?DSPEX_PROPAGATION_TIMEOUT, fun ?MODULE:handle_event/4, self()),
    try
        {ok, 1} = dspex_store:set(S, a, 1.0),
        %% the propagator is (or soon will be) inside the function: a bounded sync
        ?assertEqual({error, timeout}, dspex_propagator:sync(S, 50)),
        receive {event, ?DSPEX_PROPAGATION_TIMEOUT, #{count := 1}, #{session := S, timeout := 50}} -> ok
        after 5000 -> ?assert(false)
        end,
        %% the reply that did not come in time is not left in our mailbox
        ?assertEqual([], [M || {_, _} = M <- element(2, process_info(self(), messages))]),
        %% a synchronous write is committed and answered, not blocked
        ?assertEqual({ok, 2}, dspex_store:set(S, a, 3.0, #{propagate => sync})),
        %% a definition waits at most propagation_timeout_ms
        ?assertEqual({error, timeout},
                     dspex_graph:define_derived(S, c, float, [a], fun(#{a := A}) -> A + 1 end)),
        Prop ! ?RELEASE,
        ?assertEqual(ok, dspex_propagator:sync(S, 5000)),
        %% it caught up: the change to 3.0 was propagated after the release
        ?assertEqual({ok, 6.0}, dspex_store:get_value(S, b)),
        ?assertEqual(Prop, dspex_propagator:whereis_session(S))
    after
        dspex_telemetry:detach(Handler),
        Prop ! ?RELEASE
    end,
    ok = dspex_store:delete_session(S).

%% Waiting on a propagator that ends normally (its session was deleted) is
%% not an error: nothing is left to propagate.
sync_of_a_stopped_propagator_is_ok() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 0.0),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A end),
    Prop = dspex_propagator:whereis_session(S),
    Mon = monitor(process, Prop),
    ok = dspex_store:delete_session(S),
    receive {'DOWN', Mon, process, Prop, normal} -> ok end,
    ?assertEqual(ok, dspex_propagator:sync(S, 1000)).

%% A derived variable deleted and registered again as a plain one is plain:
%% the propagator never writes it, may watch it as an input, and the export
%% lists no function for it.
deleted_derived_variable_loses_its_definition() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, _} = dspex_graph:define_derived(S, d, float, [a], fun(#{a := A}) -> A * 2 end),
    ok = dspex_store:delete(S, d),
    {ok, _} = dspex_store:register(S, d, float, 1000.0),
    ok = dspex_graph:add_dependency(S, a, d),
    {ok, _} = dspex_store:set(S, a, 6.0, #{propagate => sync}),
    ?assertMatch({ok, #{value := 1000.0, version := 0}}, dspex_store:get(S, d)),
    {ok, _} = dspex_graph:define_derived(S, e, float, [d], fun(#{d := D}) -> D + 1 end),
    {ok, _} = dspex_store:set(S, d, 10.0, #{propagate => sync}),
    ?assertEqual({ok, 11.0}, dspex_store:get_value(S, e)),
    {ok, #{derived_functions := Defs}} = dspex_store:export_session(S),
    ?assertEqual([<<"e">>], [N || {N, _, _} <- Defs]),
    ?assertEqual([<<"e">>], [N || {N, _, _} <- dspex_propagator:definitions(S)]),
    ok = dspex_store:delete_session(S).

%% The deletion of an input ends the propagator's watch on it: an input
%% registered again under the name is watched for the next definition.
deleted_input_is_watched_again() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A end),
    ok = dspex_store:delete(S, b),
    ok = dspex_store:delete(S, a),
    {ok, _} = dspex_store:register(S, a, float, 2.0),
    {ok, _} = dspex_graph:define_derived(S, c, float, [a], fun(#{a := A}) -> A * 3 end),
    {ok, _} = dspex_store:set(S, a, 5.0, #{propagate => sync}),
    ?assertEqual({ok, 15.0}, dspex_store:get_value(S, c)),
    ok = dspex_store:delete_session(S).
