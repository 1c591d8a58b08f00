%% EUnit tests of the NIF library's lifecycle (issue #14): reloading
%% dspex_nif under load (the `upgrade' callback shares the state with the new
%% module instance; purging the old code runs `unload', which must not free
%% it), and the test hook `advance_clock/1' refused unless enabled at load.
-module(dspex_nif_lifecycle_tests).
-include_lib("eunit/include/eunit.hrl").

lifecycle_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     [{timeout, 120, fun reload_under_load_keeps_state_and_calls_working/0},
      fun advance_clock_needs_test_hooks/0]}.

%% 4 processes do get/set with expected_version in a loop on their own
%% variable while dspex_nif is reloaded 20 times (each time the previous old
%% code purged, as soon as no process runs it). No call fails or crashes, the
%% sessions survive, and each variable's version equals its writer's count of
%% successful sets (no write lost, none applied twice).
reload_under_load_keeps_state_and_calls_working() ->
    S = iolist_to_binary(["reload_", integer_to_list(erlang:unique_integer([positive]))]),
    {ok, _} = dspex_store:create_session(S),
    Keep = iolist_to_binary([S, "_untouched"]),
    {ok, _} = dspex_store:create_session(Keep),
    {ok, _} = dspex_store:register(Keep, k, integer, 7),
    Parent = self(),
    Workers = [begin
                   Var = list_to_atom("w" ++ integer_to_list(I)),
                   {ok, _} = dspex_store:register(S, Var, integer, 0),
                   spawn_link(fun() -> work(Parent, S, Var, 0) end)
               end || I <- lists:seq(1, 4)],
    Loads = [begin
                 ok = dspex_test_hooks:reload_nif(),
                 true = erlang:check_old_code(dspex_nif),
                 %% every worker made progress since the last reload
                 [await_calls(W) || W <- Workers],
                 ok
             end || _ <- lists:seq(1, 20)],
    ?assertEqual(20, length(Loads)),
    [W ! stop || W <- Workers],
    Done = [receive {done, W, Var, N, Errors} -> {Var, N, Errors} end || W <- Workers],
    [?assertEqual({Var, []}, {Var, Errors}) || {Var, _, Errors} <- Done],
    [?assertMatch({ok, #{version := N, value := N}}, dspex_store:get(S, Var)) || {Var, N, _} <- Done],
    ?assert(lists:all(fun({_, N, _}) -> N > 0 end, Done)),
    {ok, #{value := 7}} = dspex_store:get(Keep, k),
    %% purge the last old code: the state is still there (only the last instance frees it)
    ok = dspex_test_hooks:reload_nif(),
    true = code:soft_purge(dspex_nif) orelse wait_purge(),
    {ok, #{value := 7}} = dspex_store:get(Keep, k),
    ok = dspex_store:delete_session(S),
    ok = dspex_store:delete_session(Keep).

wait_purge() -> erlang:yield(), code:soft_purge(dspex_nif) orelse wait_purge().

work(Parent, S, Var, N) ->
    receive
        {calls, From} -> From ! {calls, self(), N}, work(Parent, S, Var, N);
        stop -> Parent ! {done, self(), Var, N, []}
    after 0 ->
        R = try
                {ok, #{version := N}} = dspex_store:get(S, Var),
                {ok, _} = dspex_store:set(S, Var, N + 1, #{expected_version => N}),
                ok
            catch C:E -> {C, E}
            end,
        case R of
            ok -> work(Parent, S, Var, N + 1);
            Err -> receive stop -> Parent ! {done, self(), Var, N, [Err]} end
        end
    end.

%% Asks the worker for its count twice: the second answer is larger (it works).
await_calls(W) ->
    N0 = calls(W),
    await_calls(W, N0).
await_calls(W, N0) ->
    case calls(W) of
        N when N > N0 -> ok;
        _ -> erlang:yield(), await_calls(W, N0)
    end.

calls(W) ->
    W ! {calls, self()},
    receive {calls, W, N} -> N after 5000 -> erlang:error({worker_stuck, W}) end.

advance_clock_needs_test_hooks() ->
    Env = application:get_env(dspex_bridge, test_hooks),
    try
        ok = application:set_env(dspex_bridge, test_hooks, false),
        ok = dspex_test_hooks:reload_nif(),
        ?assertEqual({error, test_hooks_disabled}, dspex_nif:advance_clock(0)),
        ?assertEqual({error, test_hooks_disabled}, dspex_nif:advance_clock(3600000)),
        ?assertError(badarg, dspex_nif:advance_clock(-1)),
        ok = application:set_env(dspex_bridge, test_hooks, true),
        ok = dspex_test_hooks:reload_nif(),
        ?assertEqual(ok, dspex_nif:advance_clock(0))
    after
        case Env of
            undefined -> application:unset_env(dspex_bridge, test_hooks);
            {ok, V} -> application:set_env(dspex_bridge, test_hooks, V)
        end
    end.
