%% @doc Values on the gRPC wire: `google.protobuf.Any' maps (as the port
%% program hands them over, the JSON body already parsed) and the raw
%% little-endian `binary_value' format, to and from store values.
%%
%% Any: `#{type_url => <<"type.googleapis.com/snakepit.", Type/binary>>, value
%% => Json}' where Json uses `<<"NaN">>', `<<"Infinity">>', `<<"-Infinity">>'
%% for non-finite floats. Binary: the flat row-major elements as little-endian
%% float32 or float64, the Any's JSON then `#{<<"dtype">>, <<"shape">>}'.
%% Nothing here creates atoms from wire data or decodes Erlang terms.
-module(dspex_grpc_value).

-export([type_of/1, decode/3, encode/2, encode/3, to_json/1, type_url/1]).

-define(PREFIX, "type.googleapis.com/snakepit.").
-define(TYPES, [<<"float">>, <<"integer">>, <<"string">>, <<"boolean">>, <<"choice">>, <<"module">>,
                <<"embedding">>, <<"tensor">>]).

%% @doc The store type named by a type string (`<<"float">>', ...) or an Any's
%% type_url; `{error, {unknown_type, Text}}' otherwise.
-spec type_of(binary()) -> {ok, dspex_store:var_type()} | {error, {unknown_type, binary()}}.
type_of(<<?PREFIX, Rest/binary>>) ->
    type_of(strip_binary_suffix(Rest));
type_of(T) when is_binary(T) ->
    case lists:member(T, ?TYPES) of
        true -> {ok, binary_to_existing_atom(T, utf8)};
        false -> {error, {unknown_type, T}}
    end.

strip_binary_suffix(T) ->
    case binary:split(T, <<".binary">>) of
        [Base, <<>>] -> Base;
        _ -> T
    end.

%% @doc The type_url of a store type.
-spec type_url(dspex_store:var_type()) -> binary().
type_url(Type) -> <<?PREFIX, (atom_to_binary(Type, utf8))/binary>>.

%% @doc A store value from an Any map (or `undefined') and binary bytes (or
%% `<<>>'). `Type' is the variable's type when known (`undefined': taken from
%% the type_url). Binary bytes win over the JSON body.
-spec decode(dspex_store:var_type() | undefined, map() | undefined, binary()) ->
          {ok, dspex_store:value()} | {error, {invalid_value, binary()} | {unknown_type, binary()}}.
decode(Type0, Any, Bin) ->
    case resolve_type(Type0, Any) of
        {ok, Type} when Bin =/= <<>> -> decode_binary(Type, json_of(Any), Bin);
        {ok, Type} ->
            case json_of(Any) of
                null -> {error, {invalid_value, <<"no value given">>}};
                Json -> from_json(Type, Json)
            end;
        Error -> Error
    end.

resolve_type(Type, _) when is_atom(Type), Type =/= undefined -> {ok, Type};
resolve_type(undefined, #{type_url := Url}) when Url =/= <<>> -> type_of(Url);
resolve_type(undefined, _) -> {error, {invalid_value, <<"the value's type is unknown (no type_url)">>}}.

json_of(#{value := V}) -> V;
json_of(_) -> null.

from_json(float, V) -> number(V);
from_json(integer, V) when is_integer(V) -> {ok, V};
from_json(integer, V) when is_float(V) -> {ok, V}; %% the store accepts whole floats
from_json(T, V) when (T =:= string orelse T =:= choice orelse T =:= module), is_binary(V) -> {ok, V};
from_json(boolean, V) when is_boolean(V) -> {ok, V};
from_json(embedding, V) when is_list(V) -> numbers(V);
from_json(tensor, #{<<"shape">> := Shape, <<"data">> := Data}) when is_list(Shape), is_list(Data) ->
    case numbers(flatten(Data)) of
        {ok, D} -> {ok, #{shape => Shape, data => D}};
        E -> E
    end;
from_json(T, _) -> invalid(<<"value does not match type ", (atom_to_binary(T, utf8))/binary>>).

number(V) when is_number(V) -> {ok, V};
number(<<"NaN">>) -> {ok, nan};
number(<<"Infinity">>) -> {ok, infinity};
number(<<"-Infinity">>) -> {ok, neg_infinity};
number(nan) -> {ok, nan};
number(infinity) -> {ok, infinity};
number(neg_infinity) -> {ok, neg_infinity};
number(_) -> invalid(<<"expected a number">>).

numbers(L) -> numbers(L, []).
numbers([], Acc) -> {ok, lists:reverse(Acc)};
numbers([H | T], Acc) ->
    case number(H) of
        {ok, N} -> numbers(T, [N | Acc]);
        E -> E
    end.

%% nested lists (a tensor given as nested arrays) are flattened row-major
flatten(L) -> lists:flatten(L).

invalid(Msg) -> {error, {invalid_value, Msg}}.

decode_binary(Type, Meta, Bin) when Type =:= embedding; Type =:= tensor ->
    case binary_meta(Meta) of
        {ok, Size, Shape} ->
            Count = shape_count(Shape, byte_size(Bin) div Size),
            if
                Count =:= too_big ->
                    %% the shape's own numbers may be huge: never multiplied out nor printed
                    invalid(iolist_to_binary(io_lib:format("binary_value has ~b bytes, which a shape of ~b "
                                                           "dimensions of ~s (one over ~b) does not match",
                                                           [byte_size(Bin), length(Shape), dtype_name(Size),
                                                            byte_size(Bin) div Size])));
                byte_size(Bin) =/= Count * Size ->
                    invalid(iolist_to_binary(io_lib:format("binary_value has ~b bytes, shape ~w of ~s needs ~b",
                                                           [byte_size(Bin), Shape, dtype_name(Size), Count * Size])));
                Type =:= embedding, length(Shape) =/= 1 -> invalid(<<"an embedding's shape has one dimension">>);
                Type =:= embedding -> {ok, floats(Size, Bin)};
                true -> {ok, #{shape => Shape, data => floats(Size, Bin)}}
            end;
        Error -> Error
    end;
decode_binary(Type, _, _) ->
    invalid(<<"binary_value is only for embedding and tensor, not ", (atom_to_binary(Type, utf8))/binary>>).

%% The element count of a shape, or `too_big' once a dimension or the running
%% product passes `Max' (the elements the bytes given hold: the bytes cannot
%% match). Bounded before each multiplication, so a thousand 4300-digit
%% dimensions cost a thousand comparisons, not one enormous product.
shape_count(Shape, Max) -> shape_count(Shape, Max, 1).

shape_count([], _Max, N) -> N;
shape_count([D | _], Max, N) when D > Max; N * D > Max -> too_big;
shape_count([D | T], Max, N) -> shape_count(T, Max, N * D).

binary_meta(#{} = M) ->
    Fmt = maps:get(<<"binary_format">>, M, <<"raw_le">>),
    Size = case maps:get(<<"dtype">>, M, <<"float64">>) of
               <<"float32">> -> 4;
               <<"float64">> -> 8;
               _ -> bad
           end,
    Shape = maps:get(<<"shape">>, M, undefined),
    ShapeOk = is_list(Shape) andalso lists:all(fun(D) -> is_integer(D) andalso D >= 0 end, Shape),
    if
        Fmt =/= <<"raw_le">> -> invalid(<<"binary_format must be raw_le">>);
        Size =:= bad -> invalid(<<"dtype must be float32 or float64">>);
        not ShapeOk -> invalid(<<"shape must be a list of non-negative integers">>);
        true -> {ok, Size, Shape}
    end;
binary_meta(_) -> invalid(<<"binary_value needs {\"dtype\", \"shape\"} in the Any's JSON">>).

dtype_name(4) -> "float32";
dtype_name(8) -> "float64".

%% The bit syntax does not match NaN or infinities: those are decoded by hand.
floats(4, Bin) -> [f32(X) || <<X:4/binary>> <= Bin];
floats(8, Bin) -> [f64(X) || <<X:8/binary>> <= Bin].

f32(<<F:32/little-float>>) -> F;
f32(B) -> special(B, 23).
f64(<<F:64/little-float>>) -> F;
f64(B) -> special(B, 52).

special(B, MantBits) ->
    Bits = byte_size(B) * 8,
    <<I:Bits/little-unsigned>> = B,
    Mant = I band ((1 bsl MantBits) - 1),
    Sign = I bsr (Bits - 1),
    case {Mant, Sign} of
        {0, 0} -> infinity;
        {0, 1} -> neg_infinity;
        _ -> nan
    end.

%% @equiv encode(Type, Value, threshold())
-spec encode(dspex_store:var_type(), dspex_store:value()) -> {map(), binary()}.
encode(Type, Value) ->
    encode(Type, Value, application:get_env(dspex_bridge, grpc_binary_threshold, 1280)).

%% @doc The Any map and binary bytes for a value: embeddings and tensors with
%% more than `Threshold' elements go as float64 binary, everything else as JSON.
-spec encode(dspex_store:var_type(), dspex_store:value(), non_neg_integer()) -> {map(), binary()}.
encode(embedding, L, Threshold) when is_list(L), length(L) > Threshold ->
    {#{type_url => type_url(embedding),
       value => #{<<"dtype">> => <<"float64">>, <<"shape">> => [length(L)], <<"binary_format">> => <<"raw_le">>}},
     to_f64(L)};
encode(tensor, #{shape := S, data := D}, Threshold) when length(D) > Threshold ->
    {#{type_url => type_url(tensor),
       value => #{<<"dtype">> => <<"float64">>, <<"shape">> => S, <<"binary_format">> => <<"raw_le">>}},
     to_f64(D)};
encode(Type, V, _) ->
    {#{type_url => type_url(Type), value => to_json(V)}, <<>>}.

to_f64(L) -> << <<(f64_bytes(X))/binary>> || X <- L >>.

f64_bytes(X) when is_number(X) -> <<X:64/little-float>>;
f64_bytes(nan) -> <<0, 0, 0, 0, 0, 0, 16#F8, 16#7F>>;
f64_bytes(infinity) -> <<0, 0, 0, 0, 0, 0, 16#F0, 16#7F>>;
f64_bytes(neg_infinity) -> <<0, 0, 0, 0, 0, 0, 16#F0, 16#FF>>.

%% @doc A store value as a JSON term for the port (tensors become
%% `{"shape", "data"}' objects; `nan' and the infinities stay atoms, which the
%% port writes as the strings "NaN", "Infinity", "-Infinity").
-spec to_json(term()) -> term().
to_json(#{shape := S, data := D}) -> #{<<"shape">> => S, <<"data">> => D};
to_json(V) -> V.
