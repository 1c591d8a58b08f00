%% @doc EUnit tests of the `dspex_models' registry and aliases.
-module(dspex_models_registry_tests).

-include_lib("eunit/include/eunit.hrl").

-export([start/0, uniq/1]).

%% @doc Starts the application without network listeners (shared by the
%% other dspex_models_* tests).
start() ->
    _ = application:load(dspex_bridge),
    ok = application:set_env(dspex_bridge, grpc_enabled, false),
    ok = application:set_env(dspex_bridge, prometheus_enabled, false),
    ok = application:set_env(dspex_bridge, models_clock, dspex_manual_clock),
    ok = application:set_env(dspex_bridge, models_check_interval_ms, 3600000),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    ok.

uniq(Prefix) ->
    <<Prefix/binary, (integer_to_binary(erlang:unique_integer([positive])))/binary>>.

registry_test_() ->
    {setup, fun start/0, fun(_) -> ok end,
     [{"register, get, list; name+version unique", fun register_get_list/0},
      {"invalid fields are refused", fun invalid/0},
      {"list_models and aliases take a name, not a store wildcard", fun no_wildcards/0},
      {"a registered model is immutable; archive only changes its status", fun immutable_archive/0},
      {"aliases move in one write, with compare-and-set", fun aliases/0},
      {"the registry is a store session: its history is the audit trail", fun audit/0},
      {"select_model serves production without an experiment", fun select_production/0}]}.

register_get_list() ->
    N = uniq(<<"clf">>),
    {ok, Id1} = dspex_models:register_model(#{name => N, version => <<"1">>,
                                              artifact => <<"s3://b/clf/1">>,
                                              params => #{depth => 4}, metadata => #{owner => <<"ann">>}}),
    ?assertEqual(<<N/binary, "@1">>, Id1),
    {ok, Id2} = dspex_models:register_model(#{name => N, version => <<"2">>}),
    ?assertEqual({error, {already_exists, Id1}},
                 dspex_models:register_model(#{name => N, version => <<"1">>})),
    {ok, M1} = dspex_models:get_model(Id1),
    ?assertMatch(#{id := Id1, name := N, version := <<"1">>, artifact := <<"s3://b/clf/1">>,
                   params := #{depth := 4}, metadata := #{owner := <<"ann">>}, status := active}, M1),
    {ok, L} = dspex_models:list_models(N),
    ?assertEqual([Id1, Id2], [maps:get(id, M) || M <- L]),
    %% another name with a common prefix is not listed
    {ok, _} = dspex_models:register_model(#{name => <<N/binary, "x">>, version => <<"1">>}),
    {ok, L2} = dspex_models:list_models(N),
    ?assertEqual(2, length(L2)),
    ?assertEqual({error, {not_found, <<N/binary, "@9">>}}, dspex_models:get_model(<<N/binary, "@9">>)).

invalid() ->
    ?assertEqual({error, {invalid_argument, name}}, dspex_models:register_model(#{name => <<"a@b">>, version => <<"1">>})),
    ?assertEqual({error, {invalid_argument, name}}, dspex_models:register_model(#{name => <<>>, version => <<"1">>})),
    ?assertEqual({error, {invalid_argument, version}}, dspex_models:register_model(#{name => <<"a">>, version => <<"*">>})),
    ?assertEqual({error, {invalid_argument, params}},
                 dspex_models:register_model(#{name => <<"a">>, version => <<"1">>, params => [x]})),
    ?assertEqual({error, {invalid_argument, name}}, dspex_models:register_model(#{})),
    %% the missing or bad field is the one named
    ?assertEqual({error, {invalid_argument, version}}, dspex_models:register_model(#{name => <<"x">>})),
    ?assertEqual({error, {invalid_argument, version}},
                 dspex_models:register_model(#{name => <<"x">>, version => 1})),
    ?assertEqual({error, {invalid_argument, name}}, dspex_models:register_model(#{version => <<"1">>})).

immutable_archive() ->
    N = uniq(<<"imm">>),
    {ok, Id} = dspex_models:register_model(#{name => N, version => <<"1">>, params => #{a => 1}}),
    ?assertMatch({error, {already_exists, _}},
                 dspex_models:register_model(#{name => N, version => <<"1">>, params => #{a => 2}})),
    {ok, #{params := #{a := 1}}} = dspex_models:get_model(Id),
    ok = dspex_models:archive_model(Id),
    ok = dspex_models:archive_model(Id),
    {ok, #{status := archived, params := #{a := 1}}} = dspex_models:get_model(Id),
    ?assertEqual({error, {archived, Id}}, dspex_models:set_alias(N, staging, Id)).

aliases() ->
    N = uniq(<<"al">>),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => N, version => <<"b">>}),
    {ok, Other} = dspex_models:register_model(#{name => uniq(<<"other">>), version => <<"1">>}),
    ok = dspex_models:set_alias(N, champion, A),
    ok = dspex_models:set_alias(N, <<"my-alias">>, B),
    ?assertEqual({ok, A}, dspex_models:get_alias(N, champion)),
    ?assertEqual(#{<<"champion">> => A, <<"my-alias">> => B}, dspex_models:aliases(N)),
    %% a model of another name cannot be this name's alias target
    ?assertEqual({error, {invalid_argument, name}}, dspex_models:set_alias(N, champion, Other)),
    %% compare-and-set
    ?assertEqual({error, {alias_moved, A}}, dspex_models:set_alias(N, champion, B, #{expected => B})),
    ok = dspex_models:set_alias(N, champion, B, #{expected => A}),
    ?assertEqual({ok, B}, dspex_models:get_alias(N, champion)),
    ?assertEqual({error, {alias_moved, undefined}}, dspex_models:set_alias(N, staging, B, #{expected => A})),
    %% concurrent movers with the same expectation: exactly one wins
    Self = self(),
    Pids = [spawn(fun() -> Self ! {self(), dspex_models:set_alias(N, champion, T, #{expected => B})} end)
            || T <- [A, A, A, A]],
    Results = [receive {P, R} -> R end || P <- Pids],
    ?assertEqual(1, length([ok || ok <- Results])).

audit() ->
    N = uniq(<<"aud">>),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => N, version => <<"b">>}),
    ok = dspex_models:set_alias(N, production, A),
    ok = dspex_models:set_alias(N, production, B),
    {ok, H} = dspex_store:history(dspex_models:registry_session(), <<"alias:", N/binary, ":production">>),
    ?assertEqual([A], [maps:get(value, E) || E <- H]),
    {ok, #{value := B}} = dspex_store:get(dspex_models:registry_session(), <<"alias:", N/binary, ":production">>).

select_production() ->
    N = uniq(<<"sel">>),
    ?assertEqual({error, {no_model, N}}, dspex_models:select_model(N, #{user_id => 1})),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => N, version => <<"b">>}),
    ok = dspex_models:set_alias(N, production, A),
    ok = dspex_models:evaluate(),       % the republish cast is handled before this call
    ?assertEqual({ok, A}, dspex_models:select_model(N, #{user_id => 1})),
    ok = dspex_models:set_alias(N, production, B),
    ok = dspex_models:evaluate(),
    ?assertEqual({ok, B}, dspex_models:select_model(N, #{user_id => 1})),
    ?assertEqual({single, B}, persistent_term:get({dspex_models_route, N})),
    %% a move written by another node (straight into the shared store) is
    %% picked up at the next evaluation
    {ok, _} = dspex_store:set(dspex_models:registry_session(), <<"alias:", N/binary, ":production">>, A),
    ?assertEqual({ok, B}, dspex_models:select_model(N, #{user_id => 1})),
    ok = dspex_models:evaluate(),
    ?assertEqual({ok, A}, dspex_models:select_model(N, #{user_id => 1})).

no_wildcards() ->
    N = uniq(<<"wc">>),
    {ok, A} = dspex_models:register_model(#{name => N, version => <<"1">>}),
    ok = dspex_models:set_alias(N, champion, A),
    [?assertEqual({error, {invalid_argument, name}}, dspex_models:list_models(Bad))
     || Bad <- [<<"*">>, <<"wc*">>, <<N/binary, "?">>, <<>>, <<"a:b">>, 5]],
    ?assertEqual(#{}, dspex_models:aliases(<<"*">>)),
    ?assertEqual(#{}, dspex_models:aliases(<<"wc*">>)),
    ?assertEqual(#{<<"champion">> => A}, dspex_models:aliases(N)),
    {ok, [#{id := A}]} = dspex_models:list_models(N).
