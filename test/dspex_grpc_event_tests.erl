%% Tests of dspex_grpc_event: events as EventRecord maps, the value changes'
%% data with the value_type their JSON needs to be decoded.
-module(dspex_grpc_event_tests).

-include_lib("eunit/include/eunit.hrl").

event(Type, Data) ->
    #{id => <<"0190-id">>, type => Type, session => <<"s1">>, sequence => 3, position => 17,
      timestamp => 1700000000000000, data => Data, metadata => #{node => nonode@nohost, principal => undefined}}.

%% A variable_updated's data as the store logs it (keys of the commit path).
updated(V, Old) ->
    #{id => <<"var_x_1">>, name => <<"x">>, value => V, old_value => Old, version => 2,
      previous_version => 1, updated_at => 1700000000000000, metadata => #{}, changed_by => undefined,
      previous => #{value => Old, version => 1, updated_at => 1, metadata => #{}, changed_by => undefined}}.

data_of(Pb) -> maps:get(data_json, Pb).

the_record_carries_every_field_test() ->
    Pb = dspex_grpc_event:to_pb(event(session_created, #{ttl => 60})),
    ?assertEqual(#{id => <<"0190-id">>, type => <<"session_created">>, session_id => <<"s1">>, sequence => 3,
                   position => 17, timestamp => 1700000000000000, data_json => #{ttl => 60},
                   metadata_json => #{node => nonode@nohost, principal => null}}, Pb).

value_changes_name_the_type_of_their_values_test_() ->
    Inf = infinity,
    Cases = [{float, 0.5, 1.0}, {float, nan, Inf}, {float, neg_infinity, 2.0},
             {integer, 3, -7}, {boolean, true, false},
             {string, <<"NaN">>, <<"Infinity">>},      % a string's "NaN" is no float
             {embedding, [1.0, nan], [infinity]},
             {tensor, #{shape => [2], data => [neg_infinity, 2.0]}, #{shape => [1], data => [0.0]}}],
    [{lists:flatten(io_lib:format("~p ~p", [T, Ev])),
      fun() ->
              Data = updated(V, Old),
              Json = data_of(dspex_grpc_event:to_pb(event(Ev, Data))),
              ?assertEqual(T, maps:get(value_type, Json)),
              %% every key the store logged is there, unchanged
              ?assertEqual(dspex_events:json_term(Data), maps:remove(value_type, Json))
      end}
     || {T, V, Old} <- Cases, Ev <- [variable_updated, variable_rolled_back, <<"variable_updated">>]].

other_events_and_odd_data_are_sent_as_they_are_test() ->
    Same = fun(Type, Data) ->
                   ?assertEqual(dspex_events:json_term(Data), data_of(dspex_grpc_event:to_pb(event(Type, Data))))
           end,
    %% variable_registered names its type already; an application's event is its own
    Same(variable_registered, #{name => <<"x">>, type => float, value => nan, history => []}),
    Same(checkpoint, #{value => 1.5}),
    Same(<<"my_event">>, #{value => <<"NaN">>}),
    %% data without a value (an earlier build's), not a map, or naming its own value_type
    Same(variable_updated, #{name => <<"x">>}),
    Same(variable_updated, [1, 2]),
    Same(variable_updated, #{value => 1.5, value_type => <<"mine">>}),
    Same(variable_updated, #{value => {not_a, store_value}}).

value_type_of_store_values_test() ->
    ?assertEqual(float, dspex_grpc_event:value_type(-0.0)),
    ?assertEqual(float, dspex_grpc_event:value_type(infinity)),
    ?assertEqual(integer, dspex_grpc_event:value_type(1 bsl 70)),
    ?assertEqual(embedding, dspex_grpc_event:value_type([])),
    ?assertEqual(string, dspex_grpc_event:value_type(<<>>)),
    ?assertEqual(undefined, dspex_grpc_event:value_type(undefined)),
    ?assertEqual(undefined, dspex_grpc_event:value_type(#{shape => 2, data => []})),
    ?assertEqual(undefined, dspex_grpc_event:value_type(self())).
