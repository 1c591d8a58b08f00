%% EUnit tests of dspex_store behaviour, one test per documented rule.
-module(dspex_store_tests).
-include_lib("eunit/include/eunit.hrl").

%% A fresh session per test: tests never share state.
sid() -> iolist_to_binary(["t_", integer_to_list(erlang:unique_integer([positive]))]).

new() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{}),
    S.

%%% sessions ---------------------------------------------------------------

create_session_is_idempotent_test() ->
    S = sid(),
    {ok, #{id := S, ttl := 60, metadata := #{k := 1}, variable_count := 0}} =
        dspex_store:create_session(S, #{ttl => 60, metadata => #{k => 1}}),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    %% creating again returns the existing session, variables intact
    {ok, #{id := S, ttl := 60, variable_count := 1}} = dspex_store:create_session(S, #{ttl => 5}),
    ?assert(lists:member(S, dspex_store:list_sessions())),
    ok = dspex_store:touch(S),
    ok = dspex_store:delete_session(S).

unknown_session_errors_test() ->
    S = sid(),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    ?assertEqual({error, session_not_found}, dspex_store:touch(S)),
    ?assertEqual({error, session_not_found}, dspex_store:delete_session(S)),
    ?assertEqual({error, session_not_found}, dspex_store:get(S, x)),
    ?assertEqual({error, session_not_found}, dspex_store:set(S, x, 1)),
    ?assertEqual({error, session_not_found}, dspex_store:register(S, x, integer, 1)),
    ?assertEqual({error, session_not_found}, dspex_store:list(S)),
    ?assertEqual(false, dspex_store:exists(S, x)),
    ?assertEqual(dflt, dspex_store:get_value(S, x, dflt)).

delete_session_frees_variables_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    ok = dspex_store:delete_session(S),
    {ok, #{variable_count := 0}} = dspex_store:create_session(S),
    ?assertEqual({error, {not_found, x}}, dspex_store:get(S, x)).

invalid_session_options_test() ->
    ?assertEqual({error, {invalid_argument, ttl}}, dspex_store:create_session(sid(), #{ttl => -1})),
    %% a ttl past the largest one (2^40 - 1 s) is a bad value, never badarg
    [?assertEqual({error, {invalid_argument, ttl}}, dspex_store:create_session(sid(), #{ttl => T}))
     || T <- [1 bsl 40, 1 bsl 63, 1 bsl 64, 1 bsl 200]],
    Max = sid(),
    ?assertMatch({ok, #{ttl := T}} when T =:= (1 bsl 40) - 1, dspex_store:create_session(Max, #{ttl => (1 bsl 40) - 1})),
    ok = dspex_store:delete_session(Max),
    ?assertEqual({error, {invalid_argument, metadata}}, dspex_store:create_session(sid(), #{metadata => x})),
    ?assertError(badarg, dspex_store:create_session("not a binary", #{})).

%% history_limit beyond 64 bits is over the limit like any other too big one.
huge_history_limit_is_limit_exceeded_test() ->
    S = new(),
    [?assertEqual({error, {limit_exceeded, history_limit}},
                  dspex_store:register(S, z, float, 0.0, #{history_limit => HL}))
     || HL <- [1 bsl 32, (1 bsl 63) - 1, 1 bsl 63, 1 bsl 64, 1 bsl 100]],
    ?assertNot(dspex_store:exists(S, z)).

%%% types and conversions ----------------------------------------------------

float_conversions_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, f, float, 1),
    ?assertEqual({ok, 1.0}, dspex_store:get_value(S, f)),
    [begin {ok, _} = dspex_store:set(S, f, V), ?assertEqual({ok, V}, dspex_store:get_value(S, f)) end
     || V <- [nan, infinity, neg_infinity, -2.5]],
    ?assertMatch({error, {invalid_value, <<"expected a float, got a string">>}},
                 dspex_store:set(S, f, <<"1.0">>)).

integer_conversions_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, i, integer, 3.0),
    ?assertEqual({ok, 3}, dspex_store:get_value(S, i)),
    ?assertEqual({error, {invalid_value, <<"value 3.5 is not a whole number">>}}, dspex_store:set(S, i, 3.5)),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, i, 1 bsl 70)),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, i, nan)),
    {ok, 1} = dspex_store:set(S, i, -(1 bsl 63)),
    ?assertEqual({ok, -(1 bsl 63)}, dspex_store:get_value(S, i)).

constraint_messages_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, t, float, 0.7, #{constraints => #{min => 0.0, max => 1.0}}),
    ?assertEqual({error, {invalid_value, <<"value 1.5 is above maximum 1.0">>}}, dspex_store:set(S, t, 1.5)),
    ?assertEqual({error, {invalid_value, <<"value -1.0 is below minimum 0.0">>}}, dspex_store:set(S, t, -1)),
    ?assertEqual({ok, 0.7}, dspex_store:get_value(S, t)),
    {ok, #{constraints := #{min := 0.0, max := 1.0}, version := 0}} = dspex_store:get(S, t),
    ?assertMatch({error, {invalid_value, _}},
                 dspex_store:register(S, t2, float, 2.0, #{constraints => #{max => 1}})),
    ?assertMatch({error, {invalid_constraints, <<"constraint \"min_length\" does not apply to type float">>}},
                 dspex_store:register(S, t3, float, 0.0, #{constraints => #{min_length => 1}})),
    ?assertMatch({error, {invalid_constraints, _}},
                 dspex_store:register(S, t4, float, 0.0, #{constraints => #{min => 2, max => 1}})).

string_constraints_test() ->
    S = new(),
    Cons = #{min_length => 2, max_length => 5, pattern => <<"^[a-z]+$">>},
    {ok, _} = dspex_store:register(S, s, string, <<"abc">>, #{constraints => Cons}),
    ?assertEqual({error, {invalid_value, <<"string length 6 is above max_length 5">>}},
                 dspex_store:set(S, s, <<"abcdef">>)),
    ?assertEqual({error, {invalid_value, <<"string does not match pattern ^[a-z]+$">>}},
                 dspex_store:set(S, s, <<"ABC">>)),
    {ok, _} = dspex_store:register(S, e, string, <<"a">>, #{constraints => #{enum => [<<"a">>, <<"b">>]}}),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, e, <<"c">>)),
    ?assertMatch({error, {invalid_constraints, _}},
                 dspex_store:register(S, p, string, <<"a">>, #{constraints => #{pattern => <<"(">>}})).

choice_module_boolean_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, c, choice, <<"fast">>, #{constraints => #{choices => [<<"fast">>, slow]}}),
    {ok, 1} = dspex_store:set(S, c, slow),
    ?assertEqual({ok, <<"slow">>}, dspex_store:get_value(S, c)),
    ?assertEqual({error, {invalid_value, <<"value \"mid\" is not one of the choices: fast, slow">>}},
                 dspex_store:set(S, c, <<"mid">>)),
    ?assertMatch({error, {invalid_constraints, _}}, dspex_store:register(S, c2, choice, <<"x">>)),
    {ok, _} = dspex_store:register(S, m, module, 'ChainOfThought',
                                   #{constraints => #{allowed_modules => [<<"ChainOfThought">>, <<"Predict">>]}}),
    ?assertEqual({ok, <<"ChainOfThought">>}, dspex_store:get_value(S, m)),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, m, <<"ReAct">>)),
    {ok, _} = dspex_store:register(S, b, boolean, true),
    ?assertMatch({error, {invalid_value, <<"expected a boolean, got an integer">>}}, dspex_store:set(S, b, 1)).

embedding_and_tensor_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, e, embedding, [1, 2.5, 3], #{constraints => #{dimensions => 3}}),
    ?assertEqual({ok, [1.0, 2.5, 3.0]}, dspex_store:get_value(S, e)),
    ?assertEqual({error, {invalid_value, <<"embedding has 2 dimensions, expected 3">>}},
                 dspex_store:set(S, e, [1, 2])),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, e, [1, a, 2])),
    T = #{shape => [2, 3], data => lists:seq(1, 6)},
    {ok, _} = dspex_store:register(S, t, tensor, T),
    {ok, #{shape := [2, 3], data := [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}} = dspex_store:get_value(S, t),
    ?assertEqual({error, {invalid_value, <<"tensor data has 5 elements, shape [2,3] needs 6">>}},
                 dspex_store:set(S, t, #{shape => [2, 3], data => lists:seq(1, 5)})).

unknown_type_and_duplicates_test() ->
    S = new(),
    ?assertEqual({error, {unknown_type, widget}}, dspex_store:register(S, x, widget, 1)),
    {ok, _} = dspex_store:register(S, <<"x">>, integer, 1),
    ?assertEqual({error, {already_exists, <<"x">>}}, dspex_store:register(S, x, integer, 2)).

%%% access by id, list, delete --------------------------------------------------

get_by_id_and_name_test() ->
    S = new(),
    {ok, Id} = dspex_store:register(S, <<"temperature">>, float, 0.5),
    ?assertMatch(<<"var_temperature_", _/binary>>, Id),
    {ok, V1} = dspex_store:get(S, Id),
    {ok, V2} = dspex_store:get(S, temperature),
    ?assertEqual(V1, V2),
    ?assertMatch(#{id := Id, name := <<"temperature">>, type := float, value := 0.5, version := 0,
                   metadata := #{}, constraints := #{}, created_at := C, updated_at := C}
                   when is_integer(C), V1),
    {ok, 1} = dspex_store:set(S, Id, 0.25),
    ?assertEqual({ok, 0.25}, dspex_store:get_value(S, temperature)),
    ?assert(dspex_store:exists(S, Id)),
    ?assertNot(dspex_store:exists(S, <<"var_temperature_0">>)).

list_sorted_and_glob_test() ->
    S = new(),
    [{ok, _} = dspex_store:register(S, N, integer, 1)
     || N <- [<<"temp_b">>, <<"temp_a">>, <<"other">>, <<"temp.x">>, <<"tempXa">>]],
    {ok, All} = dspex_store:list(S),
    ?assertEqual([<<"other">>, <<"temp.x">>, <<"tempXa">>, <<"temp_a">>, <<"temp_b">>],
                 [maps:get(name, V) || V <- All]),
    {ok, T} = dspex_store:list(S, <<"temp_*">>),
    ?assertEqual([<<"temp_a">>, <<"temp_b">>], [maps:get(name, V) || V <- T]),
    {ok, Dot} = dspex_store:list(S, <<"temp.?">>), %% '.' is literal, never a regex
    ?assertEqual([<<"temp.x">>], [maps:get(name, V) || V <- Dot]),
    ?assertEqual({ok, []}, dspex_store:list(S, <<"[a-z]*">>)).

delete_variable_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    ok = dspex_store:delete(S, x),
    ?assertEqual({error, {not_found, x}}, dspex_store:delete(S, x)),
    ?assertEqual({error, {not_found, x}}, dspex_store:set(S, x, 2)),
    {ok, _} = dspex_store:register(S, x, integer, 5), %% the name is free again, version restarts
    {ok, #{version := 0, value := 5}} = dspex_store:get(S, x).

%%% versions, optimistic locking, history, rollback -------------------------------

versions_and_expected_version_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {ok, 1} = dspex_store:set(S, x, 1),
    {ok, 2} = dspex_store:set(S, x, 2, #{expected_version => 1}),
    ?assertEqual({error, {version_mismatch, 2}}, dspex_store:set(S, x, 9, #{expected_version => 1})),
    ?assertEqual({ok, 2}, dspex_store:get_value(S, x)),
    ?assertEqual({error, {invalid_argument, expected_version}},
                 dspex_store:set(S, x, 3, #{expected_version => -1})),
    %% a failed validation does not consume a version
    {error, {invalid_value, _}} = dspex_store:set(S, x, <<"no">>),
    {ok, 3} = dspex_store:set(S, x, 3).

metadata_merge_and_changed_by_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{metadata => #{a => 1}, description => <<"d">>}),
    {ok, 1} = dspex_store:set(S, x, 1, #{metadata => #{b => 2}, changed_by => optimizer_7}),
    {ok, #{metadata := #{a := 1, b := 2, description := <<"d">>}}} = dspex_store:get(S, x),
    {ok, [#{version := 0, value := 0, metadata := #{a := 1}, changed_by := undefined}]} =
        dspex_store:history(S, x),
    {ok, 2} = dspex_store:set(S, x, 2),
    {ok, [#{version := 1, changed_by := optimizer_7} | _]} = dspex_store:history(S, x).

history_bounded_newest_first_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 3}),
    [{ok, V} = dspex_store:set(S, x, V * 10) || V <- lists:seq(1, 6)],
    {ok, H} = dspex_store:history(S, x),
    ?assertEqual([{5, 50}, {4, 40}, {3, 30}], [{maps:get(version, E), maps:get(value, E)} || E <- H]),
    {ok, [#{version := 5}]} = dspex_store:history(S, x, 1),
    {ok, #{history_size := 3, history_limit := 3}} = dspex_store:info(S, x).

%% The current version keeps who wrote it (as history entries do): info/2
%% and diagnostics/1 show it.
current_version_keeps_changed_by_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{changed_by => reg}),
    ?assertMatch({ok, #{version := 0, changed_by := reg}}, dspex_store:info(S, x)),
    {ok, 1} = dspex_store:set(S, x, 1, #{changed_by => {user, <<"alice">>}}),
    ?assertMatch({ok, #{version := 1, changed_by := {user, <<"alice">>}}}, dspex_store:info(S, x)),
    {ok, 2} = dspex_store:set(S, x, 2),
    ?assertMatch({ok, #{version := 2, changed_by := undefined}}, dspex_store:info(S, x)),
    {ok, 3} = dspex_store:rollback(S, x, 1, #{changed_by => console}),
    ?assertMatch({ok, #{version := 3, changed_by := console}}, dspex_store:info(S, x)),
    %% the archived versions still have theirs
    {ok, [#{version := 2, changed_by := undefined}, #{version := 1, changed_by := {user, <<"alice">>}} | _]} =
        dspex_store:history(S, x),
    {ok, _} = dspex_store:register(S, y, integer, 0, #{changed_by => bob}),
    {ok, D} = dspex_store:diagnostics(S),
    ?assertEqual(#{<<"x">> => console, <<"y">> => bob}, maps:get(changed_by, D)),
    ?assertEqual([{<<"y">>, bob}, {<<"x">>, console}],
                 [{N, By} || #{name := N, changed_by := By} <- maps:get(last_writes, D)]).

default_history_limit_is_50_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    [{ok, _} = dspex_store:set(S, x, V) || V <- lists:seq(1, 60)],
    {ok, H} = dspex_store:history(S, x),
    ?assertEqual(50, length(H)).

rollback_creates_new_version_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 2}),
    [{ok, _} = dspex_store:set(S, x, V) || V <- [1, 2, 3]],
    ?assertEqual({error, {version_not_found, 0}}, dspex_store:rollback(S, x, 0)), %% pruned
    ?assertEqual({error, {version_not_found, 42}}, dspex_store:rollback(S, x, 42)),
    {ok, 4} = dspex_store:rollback(S, x, 2),
    {ok, #{value := 2, version := 4}} = dspex_store:get(S, x),
    ?assertEqual({error, {version_mismatch, 4}}, dspex_store:rollback(S, x, 3, #{expected_version => 1})).

%% versions are below 2^63: a rollback to a negative version or one at 2^63,
%% 2^64 or 10^23 is version_not_found (the NIF raised badarg from 2^64 on)
rollback_to_a_version_out_of_range_is_version_not_found_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    [?assertEqual({error, {version_not_found, V}}, dspex_store:rollback(S, x, V))
     || V <- [-1, 1 bsl 63, 1 bsl 64, 100000000000000000000000]],
    ?assertMatch({ok, #{value := 0, version := 0}}, dspex_store:get(S, x)).

%%% batches ---------------------------------------------------------------------------

get_many_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, a, integer, 1),
    {ok, _} = dspex_store:register(S, <<"b">>, integer, 2),
    {ok, #{found := F, missing := [zz, <<"yy">>]}} = dspex_store:get_many(S, [a, zz, <<"b">>, <<"yy">>]),
    ?assertMatch(#{a := #{value := 1}, <<"b">> := #{value := 2}}, F).

set_many_atomic_all_or_nothing_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, a, integer, 1),
    {ok, _} = dspex_store:register(S, f, float, 0.5, #{constraints => #{max => 1.0}}),
    {error, {batch_failed, Errs}} =
        dspex_store:set_many(S, [{a, 2}, {f, 5.0}, {nope, 1}, {a_v, 1}], #{atomic => true}),
    ?assertMatch(#{f := {invalid_value, _}, nope := {not_found, nope}, a_v := {not_found, a_v}}, Errs),
    ?assertNot(maps:is_key(a, Errs)),
    ?assertEqual({ok, 1}, dspex_store:get_value(S, a)), %% nothing committed
    {error, {batch_failed, #{a := {version_mismatch, 0}}}} =
        dspex_store:set_many(S, [{a, 2, #{expected_version => 7}}, {f, 0.1}], #{atomic => true}),
    ?assertEqual({ok, 0.5}, dspex_store:get_value(S, f)),
    ?assertEqual({ok, #{a => 1, f => 1}}, dspex_store:set_many(S, #{a => 2, f => 0.1}, #{atomic => true})).

set_many_non_atomic_applies_valid_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, a, integer, 1),
    {ok, _} = dspex_store:register(S, b, integer, 1),
    {ok, #{updated := #{a := 1}, errors := #{b := {invalid_value, _}, c := {not_found, c}}}} =
        dspex_store:set_many(S, [{a, 5}, {b, <<"x">>}, {c, 1}]),
    ?assertEqual({ok, 5}, dspex_store:get_value(S, a)),
    ?assertEqual({error, {duplicate_variable, a}}, dspex_store:set_many(S, [{a, 1}, {a, 2}])),
    ?assertEqual({ok, 5}, dspex_store:get_value(S, a)).

%%% watch --------------------------------------------------------------------------------

watch_delivers_changes_in_order_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    Ref = dspex_store:watch(S, [x, x], self()),
    [{ok, _} = dspex_store:set(S, x, V, #{changed_by => me}) || V <- [1, 2, 3]],
    Got = [receive {dspex_variable, Ref, S, <<"x">>, Old, New, #{version := Ver, previous_version := P, changed_by := me}} ->
                       {Old, New, P, Ver}
           after 1000 -> timeout end || _ <- [1, 2, 3]],
    ?assertEqual([{0, 1, 0, 1}, {1, 2, 1, 2}, {2, 3, 2, 3}], Got),
    %% named twice, watched once: no duplicate messages are waiting
    ok = dspex_store:unwatch(Ref),
    ok = dspex_store:unwatch(Ref),
    {ok, 4} = dspex_store:set(S, x, 4),
    Ref2 = dspex_store:watch(S, [x], self()),
    {ok, 5} = dspex_store:set(S, x, 5),
    receive {dspex_variable, R, _, _, _, _, _} -> ?assertEqual(Ref2, R) after 1000 -> ?assert(false) end,
    ok = dspex_store:unwatch(Ref2).

watch_errors_test() ->
    S = new(),
    ?assertEqual({error, {not_found, nope}}, dspex_store:watch(S, [nope], self())),
    ?assertEqual({error, {invalid_argument, variables}}, dspex_store:watch(S, [], self())),
    ?assertEqual({error, session_not_found}, dspex_store:watch(sid(), [x], self())).

dead_watcher_is_removed_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {Pid, MRef} = spawn_monitor(fun() -> receive stop -> ok end end),
    _Ref = dspex_store:watch(S, [x], Pid),
    {ok, #{watchers := 1}} = dspex_store:info(S, x),
    Pid ! stop,
    receive {'DOWN', MRef, process, Pid, _} -> ok end,
    %% the monitor's down callback detaches the watch; await it without sleeping blindly
    ?assertEqual(ok, wait_until(fun() -> {ok, #{watchers := W}} = dspex_store:info(S, x), W =:= 0 end)),
    {ok, 1} = dspex_store:set(S, x, 1).

%% The down callback runs right after the DOWN signal on another scheduler; poll
%% with yields for a bounded time (there is no message to await from a NIF).
wait_until(F) -> wait_until(F, 10000).
wait_until(_F, 0) -> timeout;
wait_until(F, N) ->
    case F() of
        true -> ok;
        false -> erlang:yield(), wait_until(F, N - 1)
    end.

%%% export / import --------------------------------------------------------------

export_import_roundtrip_test() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 120, metadata => #{owner => <<"me">>}}),
    {ok, _} = dspex_store:register(S, f, float, 0.5, #{constraints => #{min => 0, max => 1}, history_limit => 2}),
    {ok, _} = dspex_store:register(S, t, tensor, #{shape => [1, 2], data => [1, 2]}, #{metadata => #{k => v}}),
    {ok, _} = dspex_store:register(S, c, choice, <<"a">>, #{constraints => #{choices => [a, b]}}),
    [{ok, _} = dspex_store:set(S, f, V, #{changed_by => {opt, 1}}) || V <- [0.1, 0.2, 0.3]],
    {ok, E} = dspex_store:export_session(S),
    ?assertEqual({error, {already_exists, S}}, dspex_store:import_session(E)),
    ok = dspex_store:delete_session(S),
    ok = dspex_store:import_session(E),
    {ok, E2} = dspex_store:export_session(S),
    ?assertEqual(E, E2),
    {ok, #{version := 3, value := 0.3}} = dspex_store:get(S, f),
    {ok, 4} = dspex_store:set(S, f, 0.4), %% versions continue
    {ok, #{ttl := 120, metadata := #{owner := <<"me">>}}} = dspex_store:get_session(S).

import_validates_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, f, float, 0.5, #{constraints => #{max => 1}}),
    {ok, E = #{variables := [V]}} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    Bad = E#{variables := [V#{value := 7.0}]},
    ?assertMatch({error, {invalid_export, <<"value 7.0 is above maximum 1.0">>}}, dspex_store:import_session(Bad)),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    ?assertMatch({error, {invalid_export, _}}, dspex_store:import_session(#{format => other})).

%% Malformed extras are refused before the session is created: no session,
%% no propagator (a bad derived function used to crash one).
import_checks_extras_before_creating_test() ->
    S = sid(),
    E = #{format => dspex_session_v1, id => S, created_at => 1, ttl => infinity, metadata => #{}, variables => []},
    [begin
         ?assertMatch({error, {invalid_export, Msg}} when is_binary(Msg), dspex_store:import_session(E#{K => V})),
         ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
         ?assertEqual(undefined, dspex_propagator:whereis_session(S))
     end || {K, V} <- [{dependencies, foo}, {dependencies, [foo]}, {dependencies, [{a, b, data}]},
                       {permissions, [a]}, {permissions, #{a => []}}, {derived_functions, [foo]},
                       {derived_functions, foo}, {rate_limit, foo}, {rate_limit, #{rate => -1, burst => 2}}]],
    %% a function for a variable that is not derived is refused too
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, Good} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    ?assertMatch({error, {invalid_export, _}},
                 dspex_store:import_session(Good#{derived_functions => [{<<"a">>, [a], fun(_) -> 1.0 end}]})),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    ok = dspex_store:import_session(Good),
    ok = dspex_store:delete_session(S).

%% The export carries the rate limit; an export without one (older, or of a
%% session without a limit) imports without one.
export_import_keeps_the_rate_limit_test() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{rate_limit => #{rate => 1, burst => 2}}),
    {ok, E} = dspex_store:export_session(S),
    ?assertEqual(#{rate => 1.0, burst => 2.0}, maps:get(rate_limit, E)),
    ok = dspex_store:delete_session(S),
    ok = dspex_store:import_session(E),
    ?assertMatch({ok, #{rate := 1.0, burst := 2.0}}, dspex_acl:get_rate_limit(S)),
    ok = dspex_store:delete_session(S),
    ok = dspex_store:import_session(maps:remove(rate_limit, E)),
    ?assertMatch({ok, #{rate := 0.0}}, dspex_acl:get_rate_limit(S)),
    {ok, E2} = dspex_store:export_session(S),
    ?assertNot(maps:is_key(rate_limit, E2)),
    ok = dspex_store:delete_session(S).

create_session_checks_the_rate_limit_first_test() ->
    [begin
         S = sid(),
         ?assertEqual({error, {invalid_argument, rate_limit}}, dspex_store:create_session(S, #{rate_limit => R})),
         ?assertEqual({error, session_not_found}, dspex_store:get_session(S))
     end || R <- [#{rate => -1, burst => 2}, #{rate => nan, burst => 2}, #{rate => 1, burst => 0},
                  #{rate => 1 bsl 1100, burst => 2}, #{rate => 1}, foo]].


%% An import is held to the checks of create_session and register (with
%% their errors), and to what the copy must satisfy: a variable id an id lookup
%% finds (`var_<Name>_<Digits>', which also keeps ids distinct) and versions
%% below 2^63. A refused import creates nothing.
import_refuses_what_create_and_register_would_test() ->
    S = new(),
    {ok, Id} = dspex_store:register(S, f, float, 0.5),
    {ok, _} = dspex_store:register(S, g, float, 0.5),
    {ok, E = #{variables := [V, W]}} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    Refused = fun(Bad, Why) ->
                      ?assertMatch({Why, {error, _}}, {Why, dspex_store:import_session(Bad)}),
                      ?assertEqual({Why, {error, session_not_found}}, {Why, dspex_store:get_session(maps:get(id, Bad))})
              end,
    %% the session id: as create_session answers
    ?assertEqual({error, {limit_exceeded, name_length}}, dspex_store:import_session(E#{id := <<>>})),
    ?assertEqual({error, {invalid_argument, name}}, dspex_store:import_session(E#{id := <<255>>})),
    Refused(E#{id := <<>>}, empty_id),
    %% a variable name: as register answers
    ?assertEqual({error, {invalid_argument, name}},
                 dspex_store:import_session(E#{variables := [V#{name := <<255, 1>>, id := <<"var_", 255, 1, "_1">>}, W]})),
    Refused(E#{variables := [V#{name := <<255, 1>>, id := <<"var_", 255, 1, "_1">>}, W]}, bad_name),
    %% ids an id lookup cannot find, or shared
    [?assertEqual({Bad, {error, {invalid_export, <<"a variable id must be var_<name>_<digits>">>}}},
                  {Bad, dspex_store:import_session(E#{variables := [V#{id := Bad}, W]})})
     || Bad <- [<<"whatever">>, <<"var_g_1">>, <<"var_f_">>, <<"var_f_1x">>, maps:get(id, W)]],
    %% versions: below 2^63, so that a set never wraps
    ?assertEqual({error, {invalid_export, <<"a version must be below 2^63">>}},
                 dspex_store:import_session(E#{variables := [V#{version := (1 bsl 64) - 1}, W]})),
    ?assertEqual({error, {invalid_export, <<"a version must be below 2^63">>}},
                 dspex_store:import_session(E#{variables := [V#{version := 1 bsl 63}, W]})),
    Refused(E#{variables := [V#{version := 1 bsl 63}, W]}, version),
    %% history_limit past 64 bits is over the limit (never the default)
    ?assertEqual({error, {limit_exceeded, history_limit}},
                 dspex_store:import_session(E#{variables := [V#{history_limit := (1 bsl 64) - 1}, W]})),
    %% the highest version imports, found by its id; the next set is refused, not wrapped
    Top = (1 bsl 63) - 1,
    ok = dspex_store:import_session(E#{variables := [V#{version := Top}, W]}),
    ?assertMatch({ok, #{version := Top}}, dspex_store:get(S, Id)),
    ?assertEqual({error, {limit_exceeded, version}}, dspex_store:set(S, f, 0.7)),
    ?assertEqual({error, {limit_exceeded, version}}, dspex_store:rollback(S, f, Top)),
    ?assertMatch({ok, #{errors := #{f := {limit_exceeded, version}}}}, dspex_store:set_many(S, [{f, 0.7}])),
    ?assertMatch({ok, #{version := Top, value := 0.5}}, dspex_store:get(S, f)),
    ok = dspex_store:delete_session(S).

%%% limits and bad input --------------------------------------------------------------

limits_test_() ->
    {setup, fun() -> dspex_store:limits() end, fun(L) -> ok = dspex_store:set_limits(L) end,
     fun(_) ->
             [fun() ->
                      S = new(),
                      ok = dspex_store:set_limits(#{max_name_length => 8, max_value_bytes => 16, max_variables => 2}),
                      ?assertEqual({error, {limit_exceeded, name_length}},
                                   dspex_store:register(S, <<"123456789">>, integer, 1)),
                      ?assertEqual({error, {limit_exceeded, value_size}},
                                   dspex_store:register(S, s, string, binary:copy(<<"x">>, 17))),
                      {ok, _} = dspex_store:register(S, a, integer, 1),
                      {ok, _} = dspex_store:register(S, b, integer, 1),
                      ?assertEqual({error, {limit_exceeded, variables}}, dspex_store:register(S, c, integer, 1)),
                      ?assertEqual({error, {limit_exceeded, value_size}},
                                   dspex_store:register(S, e, embedding, lists:seq(1, 3)))
              end]
     end}.

names_must_be_utf8_and_bounded_test() ->
    S = new(),
    ?assertEqual({error, {invalid_argument, name}}, dspex_store:register(S, <<16#ff, 16#fe>>, integer, 1)),
    ?assertEqual({error, {invalid_argument, name}}, dspex_store:create_session(<<"bad", 16#c0, 16#80>>)),
    ?assertEqual({error, {limit_exceeded, name_length}}, dspex_store:create_session(<<>>)),
    {ok, _} = dspex_store:register(S, <<"température"/utf8>>, float, 1.0),
    ?assertEqual({ok, 1.0}, dspex_store:get_value(S, <<"température"/utf8>>)).

%% <<0, "cache:", _>> names the cache's copies (dspex_cache:cache_id/1): a
%% client's session so named would be hidden and deleted at the cache's start
cache_copy_ids_are_reserved_test() ->
    S = <<0, "cache:t_reserved">>,
    Bad = {error, {invalid_argument, name}},
    ?assertEqual(Bad, dspex_store:create_session(S)),
    ?assertEqual(Bad, dspex_store:create_session(S, #{ttl => 5})),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    %% an import under such an id, from an export of a real session
    Src = new(),
    {ok, _} = dspex_store:register(Src, x, integer, 1),
    {ok, Export} = dspex_store:export_session(Src),
    ?assertEqual(Bad, dspex_store:import_session(Export#{id => S})),
    ?assertEqual({error, session_not_found}, dspex_store:get_session(S)),
    ?assertEqual(Bad, dspex_store:check_session_id(S)),
    %% the NUL byte alone, or the prefix elsewhere, is an ordinary name
    Ok = <<0, "cachex:t_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    ?assertEqual(ok, dspex_store:check_session_id(Ok)),
    {ok, _} = dspex_store:create_session(Ok),
    ok = dspex_store:delete_session(Ok),
    ok = dspex_store:delete_session(Src).

check_session_id_answers_as_create_session_test() ->
    Max = maps:get(max_name_length, dspex_store:limits()),
    [?assertEqual(dspex_store:create_session(Id), dspex_store:check_session_id(Id))
     || Id <- [<<>>, <<255, 254>>, <<"bad", 16#c0, 16#80>>, binary:copy(<<"a">>, Max + 1)]],
    ?assertEqual(ok, dspex_store:check_session_id(binary:copy(<<"a">>, Max))),
    ?assertEqual({error, {invalid_argument, name}}, dspex_store:check_session_id(not_a_binary)).

type_errors_raise_badarg_test() ->
    S = new(),
    ?assertError(badarg, dspex_store:get(S, 42)),
    ?assertError(badarg, dspex_store:get(not_a_binary, x)),
    ?assertError(badarg, dspex_store:set(S, x, 1, not_a_map)),
    ?assertError(badarg, dspex_store:get(S, 'caf\x{e9}')). %% non-ASCII atom text is refused, never guessed

%%% scheduling: where the work runs ------------------------------------------------
%% dspex_nif:sched_stats/0 counts the calls moved to a dirty scheduler per NIF
%% and the watch notifications delivered on normal / dirty schedulers; the
%% tests assert on the counters' deltas (EUnit runs this module's tests one
%% at a time).

stats_delta(F) ->
    S0 = dspex_nif:sched_stats(),
    R = F(),
    S1 = dspex_nif:sched_stats(),
    {R, maps:map(fun(K, V) -> V - maps:get(K, S0) end, S1)}.

big_values_run_on_dirty_schedulers_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        Big = [float(I) || I <- lists:seq(1, 500000)],
        {{ok, _}, #{var_register := 1}} = stats_delta(fun() -> dspex_store:register(S, e, embedding, Big) end),
        {R, #{var_get_value := 1}} = stats_delta(fun() -> dspex_store:get_value(S, e) end),
        ?assertEqual({ok, Big}, R),
        T = #{shape => [1000, 500], data => Big},
        {ok, _} = dspex_store:register(S, t, tensor, T),
        {{ok, 1}, #{var_set := 1}} = stats_delta(fun() -> dspex_store:set(S, t, T) end),
        {{ok, #{value := T}}, #{var_get := 1}} = stats_delta(fun() -> dspex_store:get(S, t) end),
        %% a small variable stays on the normal scheduler
        {ok, _} = dspex_store:register(S, small, float, 0.5),
        {{ok, 1}, #{var_set := 0, var_get := 0}} =
            stats_delta(fun() -> {ok, 1} = dspex_store:set(S, small, 0.25), {ok, _} = dspex_store:get(S, small),
                                 {ok, 1} end)
    end}.

%% msacc: the time of a big read is spent on a dirty CPU scheduler, not a normal one.
big_read_time_is_spent_on_dirty_scheduler_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        Big = [float(I) || I <- lists:seq(1, 500000)],
        {ok, _} = dspex_store:register(S, e, embedding, Big),
        Old = erlang:system_flag(microstate_accounting, true),
        erlang:system_flag(microstate_accounting, reset),
        {ok, _} = dspex_store:get_value(S, e),
        {ok, _} = dspex_store:get_value(S, e),
        Msacc = erlang:statistics(microstate_accounting),
        erlang:system_flag(microstate_accounting, Old),
        %% time running code (NIFs count as emulator; `nif' with extended
        %% msacc); `other' on a normal scheduler includes waiting for the dirty job
        Busy = fun(Type) -> lists:sum([T || #{type := Ty, counters := C} <- Msacc, Ty =:= Type,
                                            {State, T} <- maps:to_list(C), State =:= emulator orelse State =:= nif])
               end,
        ?assert(Busy(dirty_cpu_scheduler) > Busy(scheduler))
    end}.

%% A small set on a variable whose OLD value is big, with many watchers: the
%% commit is cheap, the notification is not; it is delivered from a dirty
%% scheduler, still to every watcher and in order.
big_notification_is_delivered_from_dirty_scheduler_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        Old = [float(I) || I <- lists:seq(1, 30000)],
        {ok, _} = dspex_store:register(S, e, embedding, Old),
        Self = self(),
        Watchers = [spawn_link(fun() -> watcher(Self, []) end) || _ <- lists:seq(1, 20)],
        [_ = dspex_store:watch(S, [e], W) || W <- Watchers],
        New = [1.0 || _ <- lists:seq(1, 100)],
        {{ok, 1}, D} = stats_delta(fun() -> dspex_store:set(S, e, New) end),
        ?assertMatch(#{var_set := 0, notify_rescheduled := 1, notify_dirty := 1, notify_normal := 0}, D),
        {{ok, 2}, D2} = stats_delta(fun() -> dspex_store:set(S, e, New) end),
        %% 100 floats old and new, 20 watchers: small enough for the normal scheduler
        ?assertMatch(#{notify_rescheduled := 0, notify_dirty := 0, notify_normal := 1}, D2),
        Got = [begin W ! {report, self()}, receive {got, W, L} -> L end end || W <- Watchers],
        [?assertEqual([{Old, New, 0, 1}, {New, New, 1, 2}], L) || L <- Got]
    end}.

watcher(Parent, Acc) ->
    receive
        {dspex_variable, _Ref, _S, _Name, Old, New, #{version := V, previous_version := P}} ->
            watcher(Parent, [{Old, New, P, V} | Acc]);
        {report, To} ->
            %% the two messages are sent before the second set returned
            To ! {got, self(), lists:reverse(Acc)}
    end.

%% Writers of one watched variable on several schedulers: each commit's message
%% is delivered once, in commit order, though a writer may deliver another's.
concurrent_writers_notifications_in_commit_order_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        {ok, _} = dspex_store:register(S, x, integer, 0),
        Ref = dspex_store:watch(S, [x], self()),
        N = 2000,
        Writers = [spawn_monitor(fun() -> [{ok, _} = dspex_store:set(S, x, I) || I <- lists:seq(1, N)] end)
                   || _ <- [1, 2, 3]],
        [receive {'DOWN', M, process, P, normal} -> ok end || {P, M} <- Writers],
        Got = [receive {dspex_variable, Ref, S, <<"x">>, _, _, #{version := V, previous_version := Pv}} -> {Pv, V}
               after 5000 -> timeout end || _ <- lists:seq(1, 3 * N)],
        ?assertEqual([{V - 1, V} || V <- lists:seq(1, 3 * N)], Got),
        ok = dspex_store:unwatch(Ref)
    end}.

%% Deleting a variable while its notifications are being delivered on a dirty
%% scheduler: the queue and the snapshots outlive the variable.
delete_during_dirty_notification_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        Big = [float(I) || I <- lists:seq(1, 100000)],
        {ok, _} = dspex_store:register(S, e, embedding, Big),
        Ref = dspex_store:watch(S, [e], self()),
        Self = self(),
        {P, M} = spawn_monitor(fun() -> [dspex_store:set(S, e, Big) || _ <- lists:seq(1, 5)], Self ! sets_done end),
        _ = dspex_store:delete(S, e),
        receive {'DOWN', M, process, P, normal} -> ok end,
        Msgs = flush_watch(Ref, []),
        %% whatever committed before the delete arrives whole and in order
        ?assertEqual(lists:seq(1, length(Msgs)), [V || {_, V} <- Msgs]),
        [?assertEqual(Big, New) || {New, _} <- Msgs],
        _ = dspex_nif:reclaim()
    end}.

flush_watch(Ref, Acc) ->
    receive
        {dspex_variable, Ref, _, _, _, New, #{version := V}} -> flush_watch(Ref, [{New, V} | Acc])
    after 0 -> lists:reverse(Acc)
    end.

%% Reads whose reply is big run dirty, decided on the real size (values,
%% history, variable count), not only on the request.
big_replies_run_on_dirty_schedulers_test_() ->
    {timeout, 60, fun() ->
        S = new(),
        Big = [float(I) || I <- lists:seq(1, 40000)],
        Names = [list_to_atom("b" ++ integer_to_list(I)) || I <- lists:seq(1, 10)],
        [{ok, _} = dspex_store:register(S, Nm, embedding, Big) || Nm <- Names],
        {{ok, #{found := F}}, #{var_get_many := 1}} = stats_delta(fun() -> dspex_store:get_many(S, Names) end),
        ?assertEqual(10, map_size(F)),
        {{ok, L}, #{var_list := 1}} = stats_delta(fun() -> dspex_store:list(S) end),
        ?assertEqual(10, length(L)),
        [{ok, _} = dspex_store:set(S, b1, [float(V) | tl(Big)]) || V <- lists:seq(1, 10)],
        {{ok, H}, #{var_history := 1}} = stats_delta(fun() -> dspex_store:history(S, b1) end),
        ?assertEqual(10, length(H)),
        {{ok, 11}, #{var_rollback := 1}} = stats_delta(fun() -> dspex_store:rollback(S, b1, 0) end),
        ?assertEqual({ok, Big}, dspex_store:get_value(S, b1)),
        %% the same calls on small values stay on the normal scheduler
        S2 = new(),
        [{ok, _} = dspex_store:register(S2, Nm, float, 1.0) || Nm <- Names],
        {_, D} = stats_delta(fun() ->
                                     {ok, _} = dspex_store:get_many(S2, Names), {ok, _} = dspex_store:list(S2),
                                     {ok, 1} = dspex_store:set(S2, b1, 2.0), {ok, _} = dspex_store:history(S2, b1),
                                     {ok, 2} = dspex_store:rollback(S2, b1, 0)
                             end),
        ?assertMatch(#{var_get_many := 0, var_list := 0, var_history := 0, var_rollback := 0}, D)
    end}.

%% A conversion that runs out of memory half way (a list of 40 atoms: the
%% string table is allocated, then its atom text is not) leaks nothing, in
%% An integer beyond 64 bits is stored as the nearest float (ties to even):
%% rounding its top 64 bits first and then the rest rounded 2^71 + 2^18 + 1
%% down, to a float that is not float/1's. float/1 is no oracle beyond two
%% 64-bit words (it rounds word by word: float(2^200 + 2^147 + 1) is 2^200),
%% so the expected floats come from nearest/1, exact integer arithmetic.
%% Float bounds convert the same way.
bignum_floats_are_the_nearest_float_test() ->
    S = new(),
    rand:seed(exsss, {7, 11, 13}),
    Tricky = [(1 bsl 71) + (1 bsl 18) + 1, (1 bsl 71) + (1 bsl 18), (1 bsl 71) + (3 bsl 18),
              (1 bsl 200) + (1 bsl 147) + 1, ((1 bsl 63) + (1 bsl 10)) * 256 + 1, (1 bsl 64) - 1,
              (1 bsl 1024) - (1 bsl 970) - 1],
    %% near-ties: a 53-bit mantissa, half an ulp, and a little more (or not) far below
    Random = [(M bsl K) + (1 bsl (K - 1)) + Extra
              || _ <- lists:seq(1, 200),
                 M <- [(1 bsl 52) + rand:uniform(1 bsl 52) - 1],
                 K <- [rand:uniform(900) + 12],
                 Extra <- [rand:uniform(2) - 1]],
    Ns = Tricky ++ [-N || N <- Tricky] ++ Random,
    {ok, _} = dspex_store:register(S, f, float, 0.0),
    [?assertEqual({N, {ok, nearest(N)}}, {N, begin {ok, _} = dspex_store:set(S, f, N), dspex_store:get_value(S, f) end})
     || N <- Ns],
    N1 = hd(Tricky),
    ?assertEqual(float(N1), nearest(N1)),
    {ok, _} = dspex_store:register(S, g, float, N1),
    ?assertEqual({ok, float(N1)}, dspex_store:get_value(S, g)),
    %% a bound given as that integer admits exactly float(N1)
    {ok, _} = dspex_store:register(S, b, float, float(N1), #{constraints => #{max => N1, min => N1}}),
    ?assertMatch({ok, #{constraints := #{max := Max, min := Max}}} when Max =:= float(N1), dspex_store:get(S, b)).

%% The float nearest to integer N (ties to even), by integer arithmetic:
%% float/1 is only applied to integers it represents exactly.
nearest(N) when N < 0 -> -nearest(-N);
nearest(N) ->
    case bit_size(binary:encode_unsigned(N)) - length(lists:takewhile(fun(B) -> B =:= 0 end, bits_of(N))) of
        L when L =< 53 -> float(N);
        L ->
            Shift = L - 53,
            M = N bsr Shift,
            R = N band ((1 bsl Shift) - 1),
            Half = 1 bsl (Shift - 1),
            M2 = case R > Half orelse (R =:= Half andalso M band 1 =:= 1) of
                     true -> M + 1;
                     false -> M
                 end,
            float(M2 bsl Shift)
    end.

bits_of(N) -> [B || <<B:1>> <= binary:encode_unsigned(N)].

%% Embeddings and tensors take any integer, converted as for a float variable.
bignums_in_embeddings_and_tensors_test() ->
    S = new(),
    N = (1 bsl 71) + (1 bsl 18) + 1,
    {ok, _} = dspex_store:register(S, e, embedding, [1 bsl 64, N, -N, 1.5]),
    ?assertEqual({ok, [float(1 bsl 64), float(N), float(-N), 1.5]}, dspex_store:get_value(S, e)),
    {ok, 1} = dspex_store:set(S, e, [1, 1 bsl 100]),
    ?assertEqual({ok, [1.0, float(1 bsl 100)]}, dspex_store:get_value(S, e)),
    ?assertMatch({ok, #{updated := #{e := 2}}}, dspex_store:set_many(S, [{e, [N]}])),
    ?assertEqual({ok, [float(N)]}, dspex_store:get_value(S, e)),
    {ok, _} = dspex_store:register(S, t, tensor, #{shape => [2], data => [1 bsl 64, 2]}),
    ?assertEqual({ok, #{shape => [2], data => [float(1 bsl 64), 2.0]}}, dspex_store:get_value(S, t)),
    %% beyond the float range: refused as for a float variable, nothing changed
    ?assertEqual({error, {invalid_value, <<"expected a list of numbers, got a list containing an integer too large to store as a float">>}},
                 dspex_store:set(S, e, [1.0, 1 bsl 1100])),
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, t, #{shape => [1], data => [1 bsl 1100]})),
    ?assertEqual({ok, [float(N)]}, dspex_store:get_value(S, e)),
    ?assertEqual({error, {invalid_value, <<"expected a list of numbers, got a list containing a non-number">>}},
                 dspex_store:set(S, e, [1.0, x])).

%% set/3 as in set_many/2 and register. Run under ASan by test-nif-asan.
failed_conversion_frees_its_buffers_test() ->
    S = new(),
    {ok, _} = dspex_store:register(S, e, embedding, [1.0]),
    Atoms = [list_to_atom("a" ++ integer_to_list(I)) || I <- lists:seq(1, 40)],
    Live = dspex_nif:rawbuf_debug(0),
    _ = dspex_nif:rawbuf_debug(2),
    ?assertEqual({error, enomem}, dspex_store:set(S, e, Atoms)),
    ?assertEqual(Live, dspex_nif:rawbuf_debug(0)),
    _ = dspex_nif:rawbuf_debug(2),
    ?assertMatch({ok, #{errors := #{e := enomem}}}, dspex_store:set_many(S, [{e, Atoms}])),
    ?assertEqual(Live, dspex_nif:rawbuf_debug(0)),
    _ = dspex_nif:rawbuf_debug(2),
    ?assertEqual({error, enomem}, dspex_store:register(S, e2, embedding, Atoms)),
    ?assertEqual(Live, dspex_nif:rawbuf_debug(0)),
    %% and the ordinary refusal of such a value frees its buffers too
    ?assertMatch({error, {invalid_value, _}}, dspex_store:set(S, e, Atoms)),
    ?assertEqual(Live, dspex_nif:rawbuf_debug(0)),
    ?assertEqual({ok, [1.0]}, dspex_store:get_value(S, e)).

ttl_expiry_by_sweeper_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     fun() ->
             S = sid(),
             {ok, _} = dspex_store:create_session(S, #{ttl => 1}),
             {ok, _} = dspex_store:register(S, x, integer, 1),
             Keep = new(), %% default ttl 3600 s
             ok = dspex_test_hooks:enable(),
             %% the TTL clock, not the wall clock: past ttl + the 1 s touch granularity
             ok = dspex_nif:advance_clock(2100),
             ?assertEqual({error, session_not_found}, dspex_store:get(S, x)),
             ?assert(dspex_session_sweeper:sweep_now() >= 1),
             ?assertNot(lists:member(S, dspex_store:list_sessions())),
             ?assertMatch({ok, _}, dspex_store:get_session(Keep))
     end}.

%% The probe's case: ttl 1 s and a set every 600 ms (of the TTL clock). An
%% access less than a second after the last recorded one is not recorded, yet
%% each access keeps the session for a full ttl (and it goes within ttl + 1 s).
%% Only the TTL clock is advanced by the test; the real clock moves as well, so
%% a run in which 700 ms or more of real time passed (a stalled scheduler)
%% proves nothing either way and is made again, at most 5 times.
ttl_counts_from_the_last_access_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     fun() -> ok = dspex_test_hooks:enable(), ttl_every_600ms(5) end}.

ttl_every_600ms(0) -> erlang:error(every_run_stalled);
ttl_every_600ms(Tries) ->
    S = sid(),
    T0 = erlang:monotonic_time(millisecond),
    {ok, _} = dspex_store:create_session(S, #{ttl => 1}),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    ok = dspex_nif:advance_clock(600),
    R1 = dspex_store:set(S, x, 1),
    ok = dspex_nif:advance_clock(600),
    R2 = dspex_store:set(S, x, 2),
    case erlang:monotonic_time(millisecond) - T0 < 700 of
        true ->
            ?assertEqual({ok, 1}, R1),
            ?assertEqual({ok, 2}, R2),
            %% gone once ttl + the granularity passed without an access
            ok = dspex_nif:advance_clock(2001),
            ?assertEqual({error, session_not_found}, dspex_store:set(S, x, 3));
        false ->
            _ = dspex_store:delete_session(S),
            ttl_every_600ms(Tries - 1)
    end.

%% The call's principal applies to every update of a batch: an update's own
%% `as' cannot lift it (here: back to the session itself).
set_many_call_principal_wins_test() ->
    application:ensure_all_started(dspex_bridge),
    S = new(),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => any, permissions => [read]}]),
    As = #{as => <<"other">>},
    ?assertMatch({ok, #{updated := Up, errors := #{x := access_denied}}} when map_size(Up) =:= 0,
                 dspex_store:set_many(S, [{x, 0.72, #{as => undefined}}], As)),
    ?assertMatch({error, {batch_failed, #{x := access_denied}}},
                 dspex_store:set_many(S, [{x, 0.72, #{as => S}}], As#{atomic => true})),
    ?assertEqual({ok, 0.5}, dspex_store:get_value(S, x)),
    %% no principal in the call: an update may still restrict itself
    ?assertMatch({ok, #{errors := #{x := access_denied}}}, dspex_store:set_many(S, [{x, 0.6, As}], #{})).
