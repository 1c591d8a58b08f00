%% @doc EUnit and PropEr tests of `dspex_json' (RFC 8259).
-module(dspex_json_tests).

-include_lib("eunit/include/eunit.hrl").
%% Debian's erlang-proper ships without proper.hrl.
-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(PLET(X, Gen, Body), proper_types:bind(Gen, fun(X) -> Body end, false)).
-define(LAZY(Gen), proper_types:lazy(fun() -> Gen end)).
-define(SIZED(S, Gen), proper_types:sized(fun(S) -> Gen end)).
-import(proper_types, [oneof/1, frequency/1, list/1, int/0, float/0, range/2, binary/0]).

dec(S) -> dspex_json:decode(iolist_to_binary(S)).
enc(T) -> {ok, B} = dspex_json:encode(T), B.

valid_test_() ->
    Cases = [{"true", true}, {"false", false}, {"null", null}, {" 0 ", 0}, {"-0", 0},
             {"123", 123}, {"-17", -17}, {"12345678901234567890123", 12345678901234567890123},
             {"1.5", 1.5}, {"-0.25", -0.25}, {"1e3", 1.0e3}, {"1E-2", 0.01}, {"2.5e+1", 25.0},
             {"\"\"", <<>>}, {"\"abc\"", <<"abc">>},
             {"\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"", <<"a\"b\\c/d\b\f\n\r\t">>},
             {"\"\\u00e9\\u0041\"", <<"é"/utf8, "A">>},
             {"\"\\ud83d\\ude00\"", <<"😀"/utf8>>},
             {<<"\"é😀\""/utf8>>, <<"é😀"/utf8>>},
             {"[]", []}, {"[ 1 , [2, []], {} ]", [1, [2, []], #{}]},
             {"{}", #{}}, {"{\"a\": {\"b\": [null]}, \"c\": 1}", #{<<"a">> => #{<<"b">> => [null]}, <<"c">> => 1}},
             {"\t\r\n[1]\n", [1]}],
    [{lists:flatten(io_lib:format("~p", [S])), ?_assertEqual({ok, V}, dec(S))} || {S, V} <- Cases].

invalid_test_() ->
    Cases = ["", " ", "tru", "nul", "01", "-", "1.", ".5", "1e", "1e+", "+1", "[1,]", "[,1]", "[1 2]",
             "{\"a\":1,}", "{a:1}", "{\"a\" 1}", "{\"a\":}", "\"abc", "\"a\nb\"", "\"\\x\"",
             "\"\\u12\"", "\"\\ud83d\"", "\"\\ude00\"", "\"\\ud83d\\u0041\"", "[1] x", "{} {}",
             <<"\"", 16#ff, "\"">>, <<"\"", 16#c3, "\"">>, "NaN", "Infinity", "[", "{", "1e999"],
    [{lists:flatten(io_lib:format("~p", [S])), ?_assertMatch({error, {syntax, _}}, dec(S))} || S <- Cases].

error_offset_test() ->
    ?assertEqual({error, {syntax, 4}}, dec("[1, x]")).

depth_test() ->
    Deep = fun(N) -> iolist_to_binary([lists:duplicate(N, $[), lists:duplicate(N, $])]) end,
    ?assertMatch({ok, _}, dspex_json:decode(Deep(500))),
    ?assertEqual({error, too_deep}, dspex_json:decode(Deep(600))).

encode_test_() ->
    [?_assertEqual(<<"{\"a\":[1,2.5,\"x\",true,null],\"b\":{}}">>,
                   enc(#{a => [1, 2.5, <<"x">>, true, null], <<"b">> => #{}})),
     ?_assertEqual(<<"\"a\\\"\\\\\\n\\u0001\\u001f é\""/utf8>>, enc(<<"a\"\\\n", 1, 31, " é"/utf8>>)),
     ?_assertEqual(<<"\"ok\"">>, enc(ok)),
     ?_assertEqual(<<"{\"1\":2}">>, enc(#{1 => 2})),
     ?_assertEqual(<<"0.1">>, enc(0.1)),
     ?_assertEqual({error, {not_json, {1, 2}}}, dspex_json:encode([{1, 2}])),
     ?_assertEqual({error, {not_json, <<255>>}}, dspex_json:encode(<<255>>)),
     ?_assertMatch({error, {not_json, _}}, dspex_json:encode([1 | 2])),
     ?_assertMatch({error, {not_json, _}}, dspex_json:encode(#{{a} => 1}))].

%% Python's json module reads what we write and writes what we read.
python_agrees_test() ->
    T = #{<<"s">> => <<"é\"\\\n\t😀"/utf8>>, <<"l">> => [1, -2, 0.5, 1.0e100, null, true, false],
          <<"o">> => #{<<"k">> => []}},
    Dir = filename:basedir(user_cache, "dspex_json_tests"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    File = filename:join(Dir, "in.json"),
    ok = file:write_file(File, enc(T)),
    Out = os:cmd("/usr/bin/python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])), "
                 "ensure_ascii=True))' " ++ File),
    ?assertEqual({ok, T}, dspex_json:decode(unicode:characters_to_binary(string:trim(Out)))).

%%% Properties -------------------------------------------------------------------

json_term(0) -> oneof([null, true, false, int(), proper_types:integer(-(1 bsl 80), 1 bsl 80), float(), utf8_bin()]);
json_term(N) ->
    frequency([{3, json_term(0)},
               {1, ?LAZY(list(json_term(N div 3)))},
               {1, ?LAZY(?PLET(L, list({utf8_bin(), json_term(N div 3)}), maps:from_list(L)))}]).

utf8_bin() -> ?PLET(S, list(oneof([range(0, 127), range(128, 16#D7FF), range(16#E000, 16#10FFFF)])),
                   unicode:characters_to_binary(S)).

prop_roundtrip() ->
    ?FORALL(T, ?SIZED(S, json_term(S)), dspex_json:decode(enc(T)) =:= {ok, T}).

%% Random bytes never crash the decoder.
prop_garbage_is_error_or_value() ->
    ?FORALL(B, binary(), case dspex_json:decode(B) of {ok, _} -> true; {error, _} -> true end).

props_test_() ->
    [{timeout, 120, ?_assert(proper:quickcheck(P, [{numtests, 500}, {max_size, 40}, {to_file, user}]))}
     || P <- [prop_roundtrip(), prop_garbage_is_error_or_value()]].
