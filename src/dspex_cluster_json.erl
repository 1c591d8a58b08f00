%% @doc The small JSON codec the etcd backend needs (OTP 25 has none):
%% objects are maps with binary keys, arrays lists, strings binaries, numbers
%% integers or floats, `true', `false', `null'.
-module(dspex_cluster_json).

-export([encode/1, decode/1]).

%% @doc Encodes a term: maps (atom or binary keys), lists, binaries, atoms
%% (`true', `false', `null', other atoms as strings), integers, floats.
-spec encode(term()) -> iodata().
encode(M) when is_map(M) ->
    ["{", lists:join(",", [[encode(key(K)), ":", encode(V)] || {K, V} <- maps:to_list(M)]), "}"];
encode(L) when is_list(L) -> ["[", lists:join(",", [encode(X) || X <- L]), "]"];
encode(true) -> "true";
encode(false) -> "false";
encode(null) -> "null";
encode(A) when is_atom(A) -> encode(atom_to_binary(A));
encode(I) when is_integer(I) -> integer_to_list(I);
encode(F) when is_float(F) -> float_to_list(F, [short]);
encode(B) when is_binary(B) -> [$", escape(B), $"].

key(K) when is_atom(K) -> atom_to_binary(K);
key(K) when is_binary(K) -> K.

escape(B) ->
    [case C of
         $" -> "\\\"";
         $\\ -> "\\\\";
         _ when C < 32 -> io_lib:format("\\u~4.16.0b", [C]);
         _ -> C
     end || <<C>> <= B].

%% @doc Decodes a JSON text; `{error, invalid_json}' when it is not one.
-spec decode(binary()) -> {ok, term()} | {error, invalid_json}.
decode(B) when is_binary(B) ->
    try value(ws(B)) of
        {V, Rest} ->
            case ws(Rest) of
                <<>> -> {ok, V};
                _ -> {error, invalid_json}
            end
    catch error:_ -> {error, invalid_json}
    end.

ws(<<C, R/binary>>) when C =:= $\s; C =:= $\t; C =:= $\n; C =:= $\r -> ws(R);
ws(B) -> B.

value(<<${, R/binary>>) -> object(ws(R), #{});
value(<<$[, R/binary>>) -> array(ws(R), []);
value(<<$", R/binary>>) -> string(R, []);
value(<<"true", R/binary>>) -> {true, R};
value(<<"false", R/binary>>) -> {false, R};
value(<<"null", R/binary>>) -> {null, R};
value(B) -> number(B).

object(<<$}, R/binary>>, M) -> {M, R};
object(<<$", R/binary>>, M) ->
    {K, R1} = string(R, []),
    <<$:, R2/binary>> = ws(R1),
    {V, R3} = value(ws(R2)),
    case ws(R3) of
        <<$,, R4/binary>> -> object(ws(R4), M#{K => V});
        <<$}, R4/binary>> -> {M#{K => V}, R4}
    end.

array(<<$], R/binary>>, Acc) -> {lists:reverse(Acc), R};
array(B, Acc) ->
    {V, R} = value(B),
    case ws(R) of
        <<$,, R1/binary>> -> array(ws(R1), [V | Acc]);
        <<$], R1/binary>> -> {lists:reverse([V | Acc]), R1}
    end.

string(<<$", R/binary>>, Acc) -> {unicode:characters_to_binary(lists:reverse(Acc)), R};
string(<<$\\, E, R/binary>>, Acc) ->
    case E of
        $u -> <<H:4/binary, R1/binary>> = R, string(R1, [binary_to_integer(H, 16) | Acc]);
        $n -> string(R, [$\n | Acc]);
        $t -> string(R, [$\t | Acc]);
        $r -> string(R, [$\r | Acc]);
        $b -> string(R, [$\b | Acc]);
        $f -> string(R, [$\f | Acc]);
        _ -> string(R, [E | Acc])
    end;
string(<<C/utf8, R/binary>>, Acc) -> string(R, [C | Acc]).

number(B) ->
    {Num, R} = take_num(B, []),
    S = lists:reverse(Num),
    V = case lists:any(fun(C) -> C =:= $. orelse C =:= $e orelse C =:= $E end, S) of
            true -> list_to_float(S);
            false -> list_to_integer(S)
        end,
    {V, R}.

take_num(<<C, R/binary>>, Acc) when (C >= $0 andalso C =< $9); C =:= $-; C =:= $+; C =:= $.; C =:= $e; C =:= $E ->
    take_num(R, [C | Acc]);
take_num(R, Acc) when Acc =/= [] -> {Acc, R}.
