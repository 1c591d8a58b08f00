%% @doc JSON (RFC 8259) for the worker protocol: OTP 25 has no `json' module.
%%
%% Terms: objects are maps (decoded keys are binaries; atom, binary and
%% integer keys are encoded), arrays are lists, strings are UTF-8 binaries,
%% numbers are integers or floats, `true', `false' and `null' are atoms (other
%% atoms are encoded as strings). Decoding is strict: no trailing commas, no
%% leading zeros, no unescaped control characters, no lone surrogates, no
%% trailing data; nesting is limited to 512 levels.
-module(dspex_json).

-export([encode/1, decode/1]).

-type json() :: null | boolean() | number() | binary() | [json()] | #{binary() => json()}.
-export_type([json/0]).

-define(MAX_DEPTH, 512).

%%% Encoding -----------------------------------------------------------------

%% @doc The JSON text of a term, as a binary. `{error, {not_json, Term}}' for
%% a term with no JSON form (a pid, a tuple, a string binary that is not
%% UTF-8, a non-finite number cannot occur in Erlang).
-spec encode(term()) -> {ok, binary()} | {error, {not_json, term()}}.
encode(Term) ->
    try {ok, iolist_to_binary(enc(Term))}
    catch throw:{not_json, Bad} -> {error, {not_json, Bad}}
    end.

enc(true) -> <<"true">>;
enc(false) -> <<"false">>;
enc(null) -> <<"null">>;
enc(A) when is_atom(A) -> enc_string(atom_to_binary(A, utf8));
enc(B) when is_binary(B) -> enc_string(B);
enc(I) when is_integer(I) -> integer_to_binary(I);
enc(F) when is_float(F) -> float_to_binary(F, [short]);
enc(L) when is_list(L) -> enc_list(L, []);
enc(M) when is_map(M) ->
    Pairs = [[enc_string(key(K)), $:, enc(V)] || {K, V} <- lists:sort(maps:to_list(M))],
    [${, lists:join($,, Pairs), $}];
enc(Other) -> throw({not_json, Other}).

enc_list([], Acc) -> [$[, lists:join($,, lists:reverse(Acc)), $]];
enc_list([H | T], Acc) -> enc_list(T, [enc(H) | Acc]);
enc_list(Improper, _) -> throw({not_json, Improper}).

key(K) when is_binary(K) -> K;
key(K) when is_atom(K) -> atom_to_binary(K, utf8);
key(K) when is_integer(K) -> integer_to_binary(K);
key(K) -> throw({not_json, K}).

enc_string(B) ->
    case unicode:characters_to_binary(B, utf8, utf8) of
        B -> [$", escape(B, 0, 0, []), $"];
        _ -> throw({not_json, B})
    end.

%% Copies runs of safe bytes as sub-binaries; escapes ", \ and controls.
%% I is the current index, S the start of the current safe run.
escape(B, I, S, Acc) when I =:= byte_size(B) -> lists:reverse([binary:part(B, S, I - S) | Acc]);
escape(B, I, S, Acc) ->
    case binary:at(B, I) of
        C when C < 16#20; C =:= $"; C =:= $\\ ->
            escape(B, I + 1, I + 1, [esc(C), binary:part(B, S, I - S) | Acc]);
        _ -> escape(B, I + 1, S, Acc)
    end.

esc($") -> <<"\\\"">>;
esc($\\) -> <<"\\\\">>;
esc($\n) -> <<"\\n">>;
esc($\r) -> <<"\\r">>;
esc($\t) -> <<"\\t">>;
esc($\b) -> <<"\\b">>;
esc($\f) -> <<"\\f">>;
esc(C) -> io_lib:format("\\u~4.16.0b", [C]).

%%% Decoding -----------------------------------------------------------------

%% @doc The term of a JSON text. `{error, {syntax, Offset}}' at the first byte
%% that is not valid JSON, `{error, too_deep}' beyond 512 nested levels.
-spec decode(binary()) -> {ok, json()} | {error, {syntax, non_neg_integer()} | too_deep}.
decode(Bin) when is_binary(Bin) ->
    try
        {V, Rest} = value(ws(Bin), Bin, 0),
        case ws(Rest) of
            <<>> -> {ok, V};
            R -> throw({syntax, byte_size(Bin) - byte_size(R)})
        end
    catch throw:{syntax, Off} -> {error, {syntax, Off}};
          throw:too_deep -> {error, too_deep}
    end.

ws(<<C, R/binary>>) when C =:= $\s; C =:= $\t; C =:= $\n; C =:= $\r -> ws(R);
ws(B) -> B.

fail(Rest, Orig) -> throw({syntax, byte_size(Orig) - byte_size(Rest)}).

value(_, _, D) when D > ?MAX_DEPTH -> throw(too_deep);
value(<<"true", R/binary>>, _, _) -> {true, R};
value(<<"false", R/binary>>, _, _) -> {false, R};
value(<<"null", R/binary>>, _, _) -> {null, R};
value(<<$", R/binary>>, O, _) -> string(R, O, []);
value(<<${, R/binary>>, O, D) -> object(ws(R), O, D + 1);
value(<<$[, R/binary>>, O, D) -> array(ws(R), O, D + 1);
value(<<C, _/binary>> = B, O, _) when C =:= $-; C >= $0, C =< $9 -> number(B, O);
value(B, O, _) -> fail(B, O).

array(<<$], R/binary>>, _, _) -> {[], R};
array(B, O, D) -> array_items(B, O, D, []).

array_items(B, O, D, Acc) ->
    {V, R} = value(B, O, D),
    case ws(R) of
        <<$,, R2/binary>> -> array_items(ws(R2), O, D, [V | Acc]);
        <<$], R2/binary>> -> {lists:reverse([V | Acc]), R2};
        R2 -> fail(R2, O)
    end.

object(<<$}, R/binary>>, _, _) -> {#{}, R};
object(B, O, D) -> members(B, O, D, #{}).

members(<<$", R/binary>>, O, D, Acc) ->
    {K, R1} = string(R, O, []),
    case ws(R1) of
        <<$:, R2/binary>> ->
            {V, R3} = value(ws(R2), O, D),
            Acc1 = Acc#{K => V},
            case ws(R3) of
                <<$,, R4/binary>> -> members(ws(R4), O, D, Acc1);
                <<$}, R4/binary>> -> {Acc1, R4};
                R4 -> fail(R4, O)
            end;
        R2 -> fail(R2, O)
    end;
members(B, O, _, _) -> fail(B, O).

%% Accumulates runs of plain bytes as sub-binaries (validated as UTF-8 at the end).
string(B, O, Acc) ->
    N = plain(B, 0),
    <<Run:N/binary, R/binary>> = B,
    case R of
        <<$", R2/binary>> ->
            Str = iolist_to_binary(lists:reverse([Run | Acc])),
            case unicode:characters_to_binary(Str, utf8, utf8) of
                Str -> {Str, R2};
                _ -> fail(B, O)
            end;
        <<$\\, C, R2/binary>> ->
            {Bytes, R3} = unescape(C, R2, O),
            string(R3, O, [Bytes, Run | Acc]);
        _ -> fail(R, O)
    end.

plain(B, N) ->
    case B of
        <<_:N/binary, C, _/binary>> when C >= 16#20, C =/= $", C =/= $\\ -> plain(B, N + 1);
        _ -> N
    end.

unescape($", R, _) -> {<<$">>, R};
unescape($\\, R, _) -> {<<$\\>>, R};
unescape($/, R, _) -> {<<$/>>, R};
unescape($b, R, _) -> {<<$\b>>, R};
unescape($f, R, _) -> {<<$\f>>, R};
unescape($n, R, _) -> {<<$\n>>, R};
unescape($r, R, _) -> {<<$\r>>, R};
unescape($t, R, _) -> {<<$\t>>, R};
unescape($u, R, O) ->
    {Hi, R1} = hex4(R, O),
    if
        Hi >= 16#D800, Hi =< 16#DBFF ->
            case R1 of
                <<$\\, $u, R2/binary>> ->
                    {Lo, R3} = hex4(R2, O),
                    case Lo >= 16#DC00 andalso Lo =< 16#DFFF of
                        true -> {<<(16#10000 + ((Hi - 16#D800) bsl 10) + (Lo - 16#DC00))/utf8>>, R3};
                        false -> fail(R2, O)
                    end;
                _ -> fail(R1, O)
            end;
        Hi >= 16#DC00, Hi =< 16#DFFF -> fail(R, O);
        true -> {<<Hi/utf8>>, R1}
    end;
unescape(_, R, O) -> fail(R, O).

hex4(<<A, B, C, D, R/binary>> = Bin, O) ->
    try {list_to_integer([A, B, C, D], 16), R}
    catch error:badarg -> fail(Bin, O)
    end;
hex4(B, O) -> fail(B, O).

%% -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
number(B, O) ->
    {Sign, B1} = case B of <<$-, R/binary>> -> {<<"-">>, R}; _ -> {<<>>, B} end,
    {Int, B2} = case B1 of
                    <<$0, R0/binary>> -> {<<"0">>, R0};
                    <<C, _/binary>> when C >= $1, C =< $9 -> digits(B1);
                    _ -> fail(B1, O)
                end,
    {Frac, B3} = case B2 of
                     <<$., R1/binary>> ->
                         case digits(R1) of
                             {<<>>, _} -> fail(R1, O);
                             {F, R2} -> {F, R2}
                         end;
                     _ -> {none, B2}
                 end,
    {Exp, B4} = case B3 of
                    <<E, R3/binary>> when E =:= $e; E =:= $E ->
                        {ESign, R4} = case R3 of
                                          <<$-, X/binary>> -> {<<"-">>, X};
                                          <<$+, X/binary>> -> {<<>>, X};
                                          _ -> {<<>>, R3}
                                      end,
                        case digits(R4) of
                            {<<>>, _} -> fail(R4, O);
                            {Ds, R5} -> {<<ESign/binary, Ds/binary>>, R5}
                        end;
                    _ -> {none, B3}
                end,
    V = case {Frac, Exp} of
            {none, none} -> binary_to_integer(<<Sign/binary, Int/binary>>);
            _ -> to_float(Sign, Int, Frac, Exp, B, O)
        end,
    {V, B4}.

to_float(Sign, Int, Frac, Exp, B, O) ->
    F = case Frac of none -> <<"0">>; _ -> Frac end,
    E = case Exp of none -> <<"0">>; _ -> Exp end,
    try binary_to_float(<<Sign/binary, Int/binary, $., F/binary, $e, E/binary>>)
    catch error:badarg ->
            %% out of double range: JSON allows it, Erlang floats cannot hold it
            fail(B, O)
    end.

digits(B) -> digits(B, 0).
digits(B, N) ->
    case B of
        <<_:N/binary, C, _/binary>> when C >= $0, C =< $9 -> digits(B, N + 1);
        <<Ds:N/binary, R/binary>> -> {Ds, R}
    end.
