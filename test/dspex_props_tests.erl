%% @doc EUnit entry points for the PropEr properties of the variable store:
%% the state-machine model (`prop_store_statem'), its parallel variant, and
%% the NIF fuzzer (`prop_nif_fuzz'); plus one small deterministic check per
%% discrepancy the properties found between the documentation of
%% `dspex_store' and the implementation (the minimal counterexamples).
%%
%% Environment knobs (no editing needed):
%%   DSPEX_PROP_STATEM_N, DSPEX_PROP_PARALLEL_N, DSPEX_PROP_FUZZ_N: test counts;
%%   DSPEX_FUZZ_EXCLUDE=kind1,kind2: leave out some of the damage done to
%%     exports given to import_session (prop_nif_fuzz:export_mutations/0), to
%%     look past a known crash;
%%   DSPEX_PROP_EMULATE=all | bug1,bug2: make the state-machine model emulate
%%     known discrepancies (see prop_store_statem:known_bugs/0), to look for
%%     other problems while those are not fixed yet. Default: none, i.e. the
%%     model checks the documented behaviour.
-module(dspex_props_tests).

-include_lib("eunit/include/eunit.hrl").

numtests(Var, Default) ->
    case os:getenv(Var) of
        false -> Default;
        S -> list_to_integer(S)
    end.

emulated_bugs() ->
    case os:getenv("DSPEX_PROP_EMULATE") of
        false -> [];
        "" -> [];
        "all" -> prop_store_statem:known_bugs();
        S -> [list_to_existing_atom(B) || B <- string:lexemes(S, ",")]
    end.

excluded_mutations() ->
    case os:getenv("DSPEX_FUZZ_EXCLUDE") of
        false -> [];
        S -> [list_to_existing_atom(K) || K <- string:lexemes(S, ",")]
    end.

check(Prop, N) ->
    proper:quickcheck(Prop, [{numtests, N}, {to_file, user}]).

%%% Properties ----------------------------------------------------------------

store_statem_test_() ->
    {timeout, 600,
     fun() ->
             prop_store_statem:set_known_bugs(emulated_bugs()),
             try
                 ?assertEqual(true, check(prop_store_statem:prop_store(),
                                          numtests("DSPEX_PROP_STATEM_N", 2000)))
             after
                 prop_store_statem:set_known_bugs([]),
                 prop_store_statem:cleanup()
             end
     end}.

store_parallel_cas_test_() ->
    {timeout, 600,
     fun() ->
             ?assertEqual(true, check(prop_store_statem:prop_parallel_cas(),
                                      numtests("DSPEX_PROP_PARALLEL_N", 1000)))
     end}.

nif_fuzz_test_() ->
    {timeout, 600,
     fun() ->
             prop_nif_fuzz:set_excluded(excluded_mutations()),
             try
                 ?assertEqual(true, check(prop_nif_fuzz:prop_nif_fuzz(),
                                          numtests("DSPEX_PROP_FUZZ_N", 2000)))
             after
                 prop_nif_fuzz:stop_peer()
             end
     end}.

%% import_session/1 of an export whose variable has a history given as an
%% improper list ([H1, H2 | foo]) must answer {error, _}; it crashed the VM
%% (run in the fuzzer's peer node, so a crash fails this test only).
import_improper_history_test_() ->
    {timeout, 120,
     fun() ->
             Call = {import_session, [{'$export_mut', improper_history, 0, foo}]},
             try
                 ?assertMatch({results, [{import_session, {ok, {error, _}}}], ok},
                              prop_nif_fuzz:run([Call]))
             after
                 prop_nif_fuzz:stop_peer()
             end
     end}.

%%% The discrepancies, one minimal case each (documented behaviour asserted) --

-define(S, <<"dspex_props_tests_edge">>).

edge_cases_test_() ->
    {foreach,
     fun() ->
             _ = dspex_store:delete_session(?S),
             {ok, _} = dspex_store:create_session(?S, #{ttl => infinity})
     end,
     fun(_) -> _ = dspex_store:delete_session(?S) end,
     [{"atomic set_many lists every failing update", fun atomic_batch_lists_every_failure/0},
      {"rollback/4 accepts the metadata option of set/4", fun rollback_merges_metadata/0},
      {"an integer outside int64 is stored as a float", fun float_takes_big_integers/0},
      {"an ASCII atom is accepted as a module name", fun module_takes_any_ascii_atom/0},
      {"a tensor's data length is the product of its shape", fun tensor_zero_dimension/0},
      {"set_many refuses a batch naming a variable twice", fun set_many_duplicate_after_failure/0}]}.

%% doc: "failure {error, {batch_failed, #{Key => Reason}}} listing every
%% failing update"
atomic_batch_lists_every_failure() ->
    {ok, _} = dspex_store:register(?S, <<"f">>, float, 1.0, #{constraints => #{max => 10}}),
    {ok, _} = dspex_store:register(?S, <<"i">>, integer, 1),
    ?assertMatch({error, {batch_failed, #{<<"f">> := {invalid_value, _},
                                          <<"i">> := {version_mismatch, 0}}}},
                 dspex_store:set_many(?S, [{<<"f">>, 100}, {<<"i">>, 2, #{expected_version => 5}}],
                                      #{atomic => true})).

%% doc: rollback "Accepts the options of set/4" (metadata: "a map merged into
%% the variable's metadata")
rollback_merges_metadata() ->
    {ok, _} = dspex_store:register(?S, <<"v">>, integer, 1),
    {ok, 1} = dspex_store:rollback(?S, <<"v">>, 0, #{metadata => #{tag => x}}),
    {ok, #{metadata := Meta}} = dspex_store:get(?S, <<"v">>),
    ?assertEqual(#{tag => x}, Meta).

%% doc: "float (integers are stored as floats ...)"
float_takes_big_integers() ->
    ?assertMatch({ok, _}, dspex_store:register(?S, <<"f">>, float, 1 bsl 64)),
    ?assertEqual({ok, float(1 bsl 64)}, dspex_store:get_value(?S, <<"f">>)).

%% doc: "module (a module name as a string, an ASCII atom is accepted)"
module_takes_any_ascii_atom() ->
    ?assertMatch({ok, _}, dspex_store:register(?S, <<"m">>, module, infinity)),
    ?assertEqual({ok, <<"infinity">>}, dspex_store:get_value(?S, <<"m">>)).

%% doc: "tensor (#{shape => [N], data => [Number]}, data length equal to the
%% product of the shape)": here the product is 0
tensor_zero_dimension() ->
    T = #{shape => [1 bsl 62, 4, 0], data => []},
    ?assertMatch({ok, _}, dspex_store:register(?S, <<"t">>, tensor, T)).

%% doc: "A variable named twice (by name, atom or id) refuses the whole batch:
%% {error, {duplicate_variable, Key}}"
set_many_duplicate_after_failure() ->
    {ok, _} = dspex_store:register(?S, <<"i">>, integer, 1),
    ?assertEqual({error, {duplicate_variable, i}},
                 dspex_store:set_many(?S, [{<<"i">>, <<"not an integer">>}, {i, 2}])),
    ?assertEqual({ok, 1}, dspex_store:get_value(?S, <<"i">>)).
