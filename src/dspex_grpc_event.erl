%% @doc An event of the log (`dspex_events') as the gRPC `EventRecord' map
%% that `GetEvents' and `WatchEvents' send: data and metadata as JSON terms
%% (`dspex_events:json_term/1'), the type as text.
%%
%% The data of `variable_updated' and `variable_rolled_back' (`value',
%% `old_value', `previous', ... as the store logs them) names no type, and
%% its values stop describing themselves once they are JSON: a float's NaN
%% and infinities become the strings `"NaN"', `"Infinity"', `"-Infinity"',
%% which a string variable may hold too. Their JSON therefore gets one key
%% more, `value_type': the type of the values, read off the logged Erlang
%% terms, which tell them apart (`float' for a float or `nan' /
%% `infinity' / `neg_infinity', `integer', `boolean', `string' for a
%% binary (string, choice and module variables alike: one JSON form),
%% `embedding' for a list, `tensor' for a `#{shape, data}' map). The stored
%% event is not changed, nor any key it has; data without a `value', or
%% with a `value_type' of its own, is sent as it is.
-module(dspex_grpc_event).

-export([to_pb/1, value_type/1]).

%% the events whose data is a variable's value change without its type
-define(VALUE_EVENTS, [variable_updated, variable_rolled_back,
                       <<"variable_updated">>, <<"variable_rolled_back">>]).

-type value_type() :: float | integer | boolean | string | embedding | tensor.
-export_type([value_type/0]).

%% @doc The `EventRecord' map of an event (see the module doc).
-spec to_pb(dspex_events:event()) -> map().
to_pb(#{id := Id, type := T, session := S, sequence := Seq, position := P, timestamp := Ts,
        data := D, metadata := M}) ->
    #{id => Id, type => if is_atom(T) -> atom_to_binary(T, utf8); true -> T end, session_id => S,
      sequence => Seq, position => P, timestamp => Ts,
      data_json => dspex_events:json_term(with_value_type(T, D)),
      metadata_json => dspex_events:json_term(M)}.

with_value_type(T, #{value := V} = D) when not is_map_key(value_type, D) ->
    case lists:member(T, ?VALUE_EVENTS) andalso value_type(V) of
        false -> D;
        undefined -> D;
        VT -> D#{value_type => VT}
    end;
with_value_type(_, D) ->
    D.

%% @doc The store type of a value as the store hands it over (see the
%% module doc); `undefined' for a term no store value has.
-spec value_type(term()) -> value_type() | undefined.
value_type(V) when is_float(V); V =:= nan; V =:= infinity; V =:= neg_infinity -> float;
value_type(V) when is_integer(V) -> integer;
value_type(V) when is_boolean(V) -> boolean;
value_type(V) when is_binary(V) -> string;
value_type(V) when is_list(V) -> embedding;
value_type(#{shape := Shape, data := Data}) when is_list(Shape), is_list(Data) -> tensor;
value_type(_) -> undefined.
