%% EUnit + PropEr tests of dspex_acl: rules, isolation, conditions, globs, limits, audit.
-module(dspex_acl_tests).
-include_lib("eunit/include/eunit.hrl").

-define(FORALL(X, G, P), proper:forall(G, fun(X) -> P end)).

sid(P) -> iolist_to_binary([P, integer_to_list(erlang:unique_integer([positive]))]).

owned(Rules) ->
    S = sid("owner_"),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ok = dspex_acl:set_permissions(S, x, Rules),
    S.

acl_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [fun reference_examples/0, fun conditions_must_all_match/0, fun rule_validation/0,
      fun only_owner_sets_permissions/0, fun glob_patterns_are_literal/0, fun list_and_filter/0,
      fun watch_and_locks_need_their_permission/0, fun rate_limiting/0, fun audit_trail/0,
      fun principal_that_does_not_parse_raises_badarg/0, fun delete_checks_access_with_the_delete/0,
      fun bad_rate_limits_and_audit_filters_are_errors/0, fun audit_records_variables_by_name/0,
      fun session_level_calls_refuse_other_principals/0, fun rate_limit_covers_what_it_says/0,
      fun session_permissions_list_the_variables_with_rules/0,
      {timeout, 120, fun isolation_property/0}]}.

%% session_permissions/1: the rules of each variable that has some, as
%% get_permissions/2 gives them, also for a session of more variables than
%% a normal scheduler walks (a dirty one then); cleared rules drop out.
session_permissions_list_the_variables_with_rules() ->
    S = owned([#{session_pattern => any, permissions => [read]}]),
    {ok, _} = dspex_store:register(S, y, integer, 1),
    {ok, Rx} = dspex_acl:get_permissions(S, x),
    ?assertEqual({ok, #{<<"x">> => Rx}}, dspex_acl:session_permissions(S)),
    [{ok, _} = dspex_store:register(S, integer_to_binary(I), integer, I) || I <- lists:seq(1, 2100)],
    ok = dspex_acl:set_permissions(S, <<"2000">>, [#{session_pattern => <<"team_*">>, permissions => [write]}]),
    {ok, R2000} = dspex_acl:get_permissions(S, <<"2000">>),
    ?assertEqual({ok, #{<<"x">> => Rx, <<"2000">> => R2000}}, dspex_acl:session_permissions(S)),
    ok = dspex_acl:set_permissions(S, x, []),
    ?assertEqual({ok, #{<<"2000">> => R2000}}, dspex_acl:session_permissions(S)),
    ?assertEqual({error, session_not_found}, dspex_acl:session_permissions(sid("missing_"))),
    ?assertEqual({error, {invalid_argument, session}}, dspex_acl:session_permissions(not_a_session)),
    ok = dspex_store:delete_session(S).

%% The reference examples: the owner has all permissions; `any' may read but
%% not write; `admin_*' may write and optimize.
reference_examples() ->
    S = owned([#{session_pattern => any, permissions => [read]},
               #{session_pattern => <<"admin_*">>, permissions => [write, optimize]}]),
    {ok, 1} = dspex_store:set(S, x, 0.6), %% the owner
    {ok, #{value := 0.6}} = dspex_store:get(S, x, #{as => <<"someone">>}),
    ?assertEqual({error, access_denied}, dspex_store:set(S, x, 0.7, #{as => <<"someone">>})),
    ?assertEqual({error, access_denied}, dspex_store:delete(S, x, #{as => <<"someone">>})),
    {ok, 2} = dspex_store:set(S, x, 0.7, #{as => <<"admin_1">>}),
    ?assertEqual(ok, dspex_acl:check_access(S, x, <<"admin_1">>, optimize, #{})),
    ?assertEqual({error, access_denied}, dspex_acl:check_access(S, x, <<"someone">>, optimize, #{})),
    ?assertEqual(ok, dspex_acl:check_access(S, x, S, write, #{})), %% the owner, by name
    ?assertEqual({error, access_denied}, dspex_acl:check_access(S, x, <<"admin_1">>, observe, #{})),
    {ok, [#{session_pattern := any}, #{session_pattern := <<"admin_*">>}]} = dspex_acl:get_permissions(S, x),
    {ok, [_, _]} = dspex_store:history(S, x, all, #{as => <<"someone">>}),
    {ok, _} = dspex_store:register(S, secret, integer, 1),
    {ok, #{found := #{x := _}, denied := [secret], missing := [nope]}} =
        dspex_store:get_many(S, [x, secret, nope], #{as => <<"someone">>}),
    ?assertEqual({error, access_denied}, dspex_store:history(S, secret, all, #{as => <<"someone">>})).

conditions_must_all_match() ->
    S = owned([#{session_pattern => any, permissions => [read, write],
                 conditions => #{role => optimizer, env => <<"prod">>}}]),
    Ctx = #{role => optimizer, env => <<"prod">>, extra => 1},
    {ok, _} = dspex_store:get(S, x, #{as => <<"p">>, context => Ctx}),
    {ok, 1} = dspex_store:set(S, x, 0.1, #{as => <<"p">>, context => Ctx}),
    ?assertEqual({error, access_denied}, dspex_store:get(S, x, #{as => <<"p">>, context => #{role => optimizer}})),
    ?assertEqual({error, access_denied}, dspex_store:get(S, x, #{as => <<"p">>, context => Ctx#{env => <<"dev">>}})),
    ?assertEqual({error, access_denied}, dspex_store:get(S, x, #{as => <<"p">>})).

rule_validation() ->
    ?assertEqual(ok, dspex_acl:validate_rules([#{session_pattern => any, permissions => [read]}])),
    ?assertMatch({error, {invalid_rule, 1, <<"a permission must be", _/binary>>}},
                 dspex_acl:validate_rules([#{session_pattern => any, permissions => [read]},
                                           #{session_pattern => any, permissions => [admin]}])),
    ?assertMatch({error, {invalid_rule, 0, _}}, dspex_acl:validate_rules([#{permissions => [read]}])),
    ?assertMatch({error, {invalid_rule, 0, _}},
                 dspex_acl:validate_rules([#{session_pattern => "list", permissions => [read]}])),
    ?assertMatch({error, {invalid_rule, 0, _}},
                 dspex_acl:validate_rules([#{session_pattern => any, permissions => [read], extra => 1}])),
    ?assertMatch({error, {invalid_rule, 0, _}},
                 dspex_acl:validate_rules([#{session_pattern => binary:copy(<<"a">>, 2000), permissions => [read]}])),
    ?assertMatch({error, {invalid_argument, rules}}, dspex_acl:validate_rules(not_a_list)),
    %% a bad rule set changes nothing
    S = owned([#{session_pattern => any, permissions => [read]}]),
    {error, {invalid_rule, 0, _}} = dspex_acl:set_permissions(S, x, [#{}]),
    {ok, [#{session_pattern := any}]} = dspex_acl:get_permissions(S, x).

only_owner_sets_permissions() ->
    S = owned([#{session_pattern => any, permissions => [read, write]}]),
    ?assertEqual({error, access_denied},
                 dspex_acl:set_permissions(S, x, [#{session_pattern => any, permissions => [optimize]}],
                                           #{as => <<"intruder">>})),
    ok = dspex_acl:set_permissions(S, x, [], #{as => S}),
    ?assertEqual({error, access_denied}, dspex_store:get(S, x, #{as => <<"anyone">>})).

%% '*' and '?' are the only wildcards: regex and escape characters are literal.
glob_patterns_are_literal() ->
    Cases = [{<<"admin.*">>, <<"adminX1">>, false}, {<<"admin.*">>, <<"admin.1">>, true},
             {<<"(a|b)">>, <<"a">>, false}, {<<"(a|b)">>, <<"(a|b)">>, true},
             {<<"[ab]">>, <<"a">>, false}, {<<"[ab]">>, <<"[ab]">>, true},
             {<<"a\\Eb">>, <<"a\\Eb">>, true}, {<<"a\\*">>, <<"a\\zzz">>, true}, {<<"a\\*">>, <<"az">>, false},
             {<<"****">>, <<"anything">>, true}, {<<"?">>, <<"é"/utf8>>, true}, {<<"?">>, <<"ab">>, false}],
    [begin
         S = owned([#{session_pattern => Pat, permissions => [read]}]),
         Expect = case Allowed of true -> ok; false -> {error, access_denied} end,
         ?assertEqual({Pat, Who, Expect}, {Pat, Who, dspex_acl:check_access(S, x, Who, read, #{})})
     end || {Pat, Who, Allowed} <- Cases],
    %% a pathological pattern against a long principal stays linear
    S2 = owned([#{session_pattern => iolist_to_binary(lists:duplicate(50, "*a")), permissions => [read]}]),
    ?assertEqual({error, access_denied}, dspex_acl:check_access(S2, x, binary:copy(<<"a">>, 40), read, #{})).

list_and_filter() ->
    S = sid("lf_"),
    {ok, _} = dspex_store:create_session(S),
    [{ok, _} = dspex_store:register(S, N, integer, 1) || N <- [a, b, c]],
    ok = dspex_acl:set_permissions(S, a, [#{session_pattern => <<"team_*">>, permissions => [read]}]),
    ok = dspex_acl:set_permissions(S, c, [#{session_pattern => any, permissions => [read, write]}]),
    {ok, L} = dspex_store:list(S, all, #{as => <<"team_x">>}),
    ?assertEqual([<<"a">>, <<"c">>], [maps:get(name, V) || V <- L]),
    ?assertEqual({ok, [<<"a">>, <<"c">>]}, dspex_acl:filter_accessible(S, <<"team_x">>, read)),
    ?assertEqual({ok, [<<"c">>]}, dspex_acl:filter_accessible(S, <<"team_x">>, write)),
    ?assertEqual({ok, [<<"a">>, <<"b">>, <<"c">>]}, dspex_acl:filter_accessible(S, S, optimize)).

watch_and_locks_need_their_permission() ->
    S = owned([#{session_pattern => <<"obs">>, permissions => [observe]},
               #{session_pattern => <<"opt">>, permissions => [optimize, write]}]),
    ?assertEqual({error, access_denied}, dspex_store:watch(S, [x], self(), #{as => <<"opt">>})),
    Ref = dspex_store:watch(S, [x], self(), #{as => <<"obs">>}),
    ?assert(is_reference(Ref)),
    ?assertEqual({error, access_denied}, dspex_locks:acquire(S, x, o1, #{as => <<"obs">>})),
    {ok, L} = dspex_locks:acquire(S, x, o2, #{as => <<"opt">>}),
    {ok, _} = dspex_store:set(S, x, 0.9, #{lock => L, as => <<"opt">>}),
    receive {dspex_variable, Ref, _, _, _, 0.9, _} -> ok after 1000 -> ?assert(false) end,
    ok = dspex_locks:release(L),
    ok = dspex_store:unwatch(Ref).

rate_limiting() ->
    S = sid("rl_"),
    {ok, _} = dspex_store:create_session(S, #{rate_limit => #{rate => 0.001, burst => 3}}),
    %% the registration used the first token
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {ok, _} = dspex_store:get(S, x),
    {ok, _} = dspex_store:set(S, x, 1),
    ?assertEqual({error, rate_limited}, dspex_store:get(S, x)),
    ?assertEqual({error, rate_limited}, dspex_store:set(S, x, 2)),
    %% readable: the configured rate and burst, and the tokens left now (the
    %% bucket is empty: 3 operations took the burst of 3)
    {ok, #{rate := 0.001, burst := 3.0, tokens := T}} = dspex_acl:get_rate_limit(S),
    ?assert(T >= 0.0 andalso T < 1.0),
    ok = dspex_acl:set_rate_limit(S, 0, 1), %% off
    ?assertMatch({ok, #{rate := 0.0, burst := 1.0}}, dspex_acl:get_rate_limit(S)),
    [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 100)],
    ok = dspex_acl:set_rate_limit(S, 1.0e9, 5), %% a bucket refilling faster than a tight loop can drain it
    ?assertMatch({ok, #{rate := 1.0e9, burst := 5.0, tokens := 5.0}}, dspex_acl:get_rate_limit(S)),
    [{ok, _} = dspex_store:get(S, x) || _ <- lists:seq(1, 100)],
    %% a session created without a limit has it off
    S2 = sid("rl_"),
    {ok, _} = dspex_store:create_session(S2),
    ?assertMatch({ok, #{rate := 0.0}}, dspex_acl:get_rate_limit(S2)),
    ?assertEqual({error, session_not_found}, dspex_acl:get_rate_limit(sid("nope_"))),
    ?assertError(badarg, dspex_acl:get_rate_limit(not_a_binary)).

audit_trail() ->
    S = owned([#{session_pattern => any, permissions => [read]}]),
    Self = self(),
    ok = dspex_telemetry:attach({?MODULE, Self}, [dspex, acl, denied], fun(_, _, M, P) -> P ! {denied, M} end, Self),
    {error, access_denied} = dspex_store:set(S, x, 0.1, #{as => <<"mallory">>}),
    receive {denied, #{session := S, principal := <<"mallory">>, permission := write}} -> ok
    after 1000 -> ?assert(false) end,
    ok = dspex_telemetry:detach({?MODULE, Self}),
    Log = dspex_acl:audit_log(#{session => S}),
    ?assertMatch([#{event := permissions_changed, outcome := ok},
                  #{event := denied, principal := <<"mallory">>, outcome := access_denied}], Log),
    ?assertMatch([#{event := denied}], dspex_acl:audit_log(#{session => S, limit => 1})).

%% Random sessions, rules and operations: an operation on another session's
%% variable succeeds exactly when a rule allows it (checked against a model).
isolation_property() ->
    Prop = ?FORALL(Case, case_gen(), isolation_holds(Case)),
    ?assertEqual(true, proper:quickcheck(Prop, [{numtests, 300}, {to_file, user}])).

principal_gen() -> proper_types:elements([<<"alice">>, <<"bob">>, <<"admin_1">>, <<"team.x">>]).
perm_gen() -> proper_types:elements([read, write, observe, optimize]).

rule_gen() ->
    proper_types:tuple([proper_types:elements([any, <<"admin_*">>, <<"team.?">>, <<"bob">>, <<"*o*">>]),
                        proper_types:non_empty(proper_types:list(perm_gen())),
                        proper_types:elements([none, #{k => 1}])]).

case_gen() ->
    proper_types:tuple([proper_types:list(rule_gen()),
                        proper_types:list(proper_types:tuple([principal_gen(),
                                                              proper_types:elements([get, set, check]),
                                                              perm_gen(),
                                                              proper_types:elements([#{}, #{k => 1}, #{k => 2}])]))]).

isolation_holds({Rules0, Ops}) ->
    Rules = [maps:merge(#{session_pattern => P, permissions => Ps}, case C of none -> #{}; _ -> #{conditions => C} end)
             || {P, Ps, C} <- Rules0],
    S = owned(Rules),
    Results = [{Op, Who, Perm, Ctx, run(S, Op, Who, Perm, Ctx), allowed(Rules, Who, op_perm(Op, Perm), Ctx)}
               || {Who, Op, Perm, Ctx} <- Ops],
    ok = dspex_store:delete_session(S),
    Bad = [R || {_, _, _, _, Got, Allowed} = R <- Results, (Got =:= ok) =/= Allowed],
    Bad =:= [] orelse io:format("rules ~p~nmismatches ~p~n", [Rules, Bad]),
    Bad =:= [].

op_perm(get, _) -> read;
op_perm(set, _) -> write;
op_perm(check, P) -> P.

run(S, get, Who, _, Ctx) -> ok_or(dspex_store:get(S, x, #{as => Who, context => Ctx}));
run(S, set, Who, _, Ctx) -> ok_or(dspex_store:set(S, x, 0.5, #{as => Who, context => Ctx}));
run(S, check, Who, P, Ctx) -> ok_or(dspex_acl:check_access(S, x, Who, P, Ctx)).

ok_or(ok) -> ok;
ok_or({ok, _}) -> ok;
ok_or({error, access_denied}) -> denied.

%% The model: a rule matches by pattern, permission and every condition.
allowed(Rules, Who, Perm, Ctx) ->
    lists:any(fun(#{session_pattern := P, permissions := Ps} = R) ->
                      lists:member(Perm, Ps) andalso glob(P, Who) andalso
                          maps:fold(fun(K, V, Acc) -> Acc andalso maps:get(K, Ctx, undefined) =:= V end,
                                    true, maps:get(conditions, R, #{}))
              end, Rules).

glob(any, _) -> true;
glob(P, S) -> glob_l(binary_to_list(P), binary_to_list(S)).
glob_l([], []) -> true;
glob_l([$* | P], S) -> glob_l(P, S) orelse (S =/= [] andalso glob_l([$* | P], tl(S)));
glob_l([$? | P], [_ | S]) -> glob_l(P, S);
glob_l([C | P], [C | S]) -> glob_l(P, S);
glob_l(_, _) -> false.

%% A principal is a binary (or undefined: the session itself). Anything else,
%% or a context that is not a map, is badarg from every call that takes one,
%% never "no principal" (which would act as the owner). set/4 used to answer
%% {error, {invalid_argument, as}} and the lock NIF ignored it.
principal_that_does_not_parse_raises_badarg() ->
    S = owned([#{session_pattern => <<"team_*">>, permissions => [read]}]),
    {ok, 1} = dspex_store:set(S, x, 0.6),
    Bad = [#{as => "team_a"}, #{as => team_a}, #{as => [<<"team_a">>]}, #{as => 1},
           #{as => <<"team_a">>, context => [{k, v}]}],
    Calls = [fun(O) -> dspex_store:get(S, x, O) end,
             fun(O) -> dspex_store:get_many(S, [x], O) end,
             fun(O) -> dspex_store:list(S, all, O) end,
             fun(O) -> dspex_store:history(S, x, all, O) end,
             fun(O) -> dspex_store:set(S, x, 0.7, O) end,
             fun(O) -> dspex_store:set_many(S, [{x, 0.7}], O) end,
             fun(O) -> dspex_store:set_many(S, [{x, 0.7}], O#{atomic => true}) end,
             fun(O) -> dspex_store:rollback(S, x, 0, O) end,
             fun(O) -> dspex_store:delete(S, x, O) end,
             fun(O) -> dspex_store:watch(S, [x], self(), O) end,
             fun(O) -> dspex_locks:acquire(S, x, o, O) end,
             fun(O) -> dspex_acl:set_permissions(S, x, [], O) end],
    [?assertError(badarg, Call(O)) || Call <- Calls, O <- Bad],
    ?assertError(badarg, dspex_acl:check_access(S, x, "team_a", read, #{})),
    ?assertError(badarg, dspex_acl:filter_accessible(S, team_a, read)),
    %% nothing changed, and undefined is the owner
    {ok, #{version := 1}} = dspex_store:get(S, x),
    {ok, 2} = dspex_store:set(S, x, 0.8, #{as => undefined}),
    {ok, [#{session_pattern := <<"team_*">>}]} = dspex_acl:get_permissions(S, x).

%% The delete's access check runs in the store's critical section, on the
%% variable deleted: denied leaves it, allowed removes it (audit recorded).
delete_checks_access_with_the_delete() ->
    S = owned([#{session_pattern => <<"w">>, permissions => [write]}]),
    ?assertEqual({error, access_denied}, dspex_store:delete(S, x, #{as => <<"r">>})),
    {ok, _} = dspex_store:get(S, x),
    ok = dspex_store:delete(S, x, #{as => <<"w">>}),
    ?assertEqual({error, {not_found, x}}, dspex_store:get(S, x)),
    ?assertEqual({error, {not_found, x}}, dspex_store:delete(S, x, #{as => <<"w">>})).

%% set_rate_limit/3 takes what create_session/2's rate_limit takes; anything
%% else is an error and the bucket stays as it was.
bad_rate_limits_and_audit_filters_are_errors() ->
    S = owned([]),
    ok = dspex_acl:set_rate_limit(S, 5, 2),
    {ok, Before} = dspex_acl:get_rate_limit(S),
    [?assertEqual({Rate, Burst, {error, {invalid_argument, rate_limit}}},
                  {Rate, Burst, dspex_acl:set_rate_limit(S, Rate, Burst)})
     || {Rate, Burst} <- [{-1, 5}, {1, 0}, {1 bsl 2000, 5}, {1, 1 bsl 2000}, {one, 1}, {1, "1"}]],
    {ok, After} = dspex_acl:get_rate_limit(S),
    ?assertEqual(maps:with([rate, burst], Before), maps:with([rate, burst], After)),
    ?assertEqual({error, {invalid_argument, rate_limit}},
                 dspex_store:create_session(sid("rl_"), #{rate_limit => #{rate => 1 bsl 2000, burst => 1}})),
    ?assertEqual({error, {invalid_argument, limit}}, dspex_acl:audit_log(#{limit => -1})),
    ?assertEqual({error, {invalid_argument, limit}}, dspex_acl:audit_log(#{limit => many})),
    ?assertEqual({error, {invalid_argument, filter}}, dspex_acl:audit_log(foo)),
    ?assertEqual([], dspex_acl:audit_log(#{limit => 0})),
    ok = dspex_acl:set_rate_limit(S, 0, 1).

%% Every audit entry names its variable by its name as a binary, whichever
%% way the call named it (an atom here) and whichever check refused it.
audit_records_variables_by_name() ->
    S = owned([]),
    P = <<"auditee">>,
    {error, access_denied} = dspex_store:get(S, x, #{as => P}),
    {error, access_denied} = dspex_store:set(S, x, 0.1, #{as => P}),
    {error, access_denied} = dspex_locks:acquire(S, x, bot, #{as => P, conflict => abort}),
    ok = dspex_acl:set_permissions(S, x, []),
    ok = gen_server:call(dspex_acl_audit, sync),   %% the NIF's reports are in
    Es = dspex_acl:audit_log(#{session => S}),
    ?assertEqual(5, length(Es)),   %% two permission changes (owned/1 and here), three denials
    ?assertEqual([<<"x">>], lists:usort([V || #{variable := V} <- Es])).

%% Operations on the session as a whole know no per-variable rule: only the
%% session itself passes check_owner/2, and the refusal is audited.
session_level_calls_refuse_other_principals() ->
    S = owned([#{session_pattern => any, permissions => [read, write, observe, optimize]}]),
    ?assertEqual(ok, dspex_acl:check_owner(S, #{})),
    ?assertEqual(ok, dspex_acl:check_owner(S, #{as => S})),
    ?assertEqual(ok, dspex_acl:check_owner(S, #{as => undefined})),
    ?assertEqual({error, access_denied}, dspex_acl:check_owner(S, #{as => <<"x">>})),
    ?assertEqual({error, access_denied}, dspex_acl:check_owner(all, #{as => S})),
    ?assertError(badarg, dspex_acl:check_owner(S, #{as => "x"})),
    ?assertError(badarg, dspex_acl:check_owner(S, #{context => 1})),
    ?assertMatch([#{principal := <<"x">>, permission := session}],
                 dspex_acl:audit_log(#{session => S, principal => <<"x">>})).

%% An empty bucket refuses every metered operation with {error, rate_limited}
%% (watches, graph reads and writes, the event log, access queries included)
%% and lets keep-alive, deletion and the owner's administration through.
rate_limit_covers_what_it_says() ->
    S = owned([#{session_pattern => any, permissions => [read]}]),
    {ok, _} = dspex_store:register(S, w, float, 0.5),
    ok = dspex_graph:add_dependency(S, x, w),
    ok = dspex_acl:set_rate_limit(S, 0.001, 1),
    _ = dspex_store:get(S, x),   %% the one token of the burst
    {error, rate_limited} = dspex_store:get(S, x),
    Metered = [{watch, fun() -> dspex_store:watch(S, [x], self()) end},
               {watch_as, fun() -> dspex_store:watch(S, [x], self(), #{as => <<"o">>}) end},
               {add_dependency, fun() -> dspex_graph:add_dependency(S, w, x) end},
               {remove_dependency, fun() -> dspex_graph:remove_dependency(S, x, w) end},
               {dependencies, fun() -> dspex_graph:dependencies(S, w) end},
               {dependents, fun() -> dspex_graph:dependents(S, x) end},
               {all_dependents, fun() -> dspex_graph:all_dependents(S, x) end},
               {update_order, fun() -> dspex_graph:update_order(S, x) end},
               {to_map, fun() -> dspex_graph:to_map(S) end},
               {check_access, fun() -> dspex_acl:check_access(S, x, <<"o">>, read, #{}) end},
               {filter_accessible, fun() -> dspex_acl:filter_accessible(S, <<"o">>, read) end}]
        ++ [{events, fun() -> dspex_events:read(S, #{}) end} || dspex_events:enabled()],
    [?assertEqual({Name, {error, rate_limited}}, {Name, F()}) || {Name, F} <- Metered],
    {ok, #{edges := [_]}} = dspex_graph:to_map_here(S),   %% nothing changed
    Free = [{touch, fun() -> dspex_store:touch(S) end},
            {get_session, fun() -> element(1, dspex_store:get_session(S)) end},
            {get_permissions, fun() -> element(1, dspex_acl:get_permissions(S, x)) end},
            {set_permissions, fun() -> dspex_acl:set_permissions(S, x, []) end},
            {get_rate_limit, fun() -> element(1, dspex_acl:get_rate_limit(S)) end},
            {export_session, fun() -> element(1, dspex_store:export_session(S)) end},
            {set_rate_limit, fun() -> dspex_acl:set_rate_limit(S, 0, 1) end}],
    [?assertEqual({Name, ok}, {Name, F()}) || {Name, F} <- Free],
    %% lifted: the metered calls work again
    {ok, [<<"x">>]} = dspex_graph:dependencies(S, w),
    ok = dspex_store:delete_session(S).
