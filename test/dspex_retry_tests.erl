%% @doc EUnit tests of `dspex_retry': attempts, backoff bounds and jitter,
%% idempotence, retryable results, breaker, fallback to the last known value.
-module(dspex_retry_tests).

-include_lib("eunit/include/eunit.hrl").

setup() -> {ok, _} = application:ensure_all_started(dspex_bridge).

retry_test_() ->
    {setup, fun setup/0, fun(_) -> ok end,
     [{"a non-idempotent call runs once", fun once_unless_idempotent/0},
      {"retries until success, at most `attempts' runs", fun retries_bounded/0},
      {"backoff: full jitter under an exponential cap", fun backoff_bounds/0},
      {"only retryable results are retried", fun retry_on/0},
      {"fallback to the last known value", fun fallback/0},
      {"through a breaker: failures open it, open fails fast", fun with_breaker/0},
      {"store reads fall back when the session is gone", fun store_get/0},
      {"bad options raise badarg", fun bad_options/0}]}.

%% A fun answering the given results in turn, counting its runs.
script(Results) ->
    Ref = atomics:new(1, []),
    T = list_to_tuple(Results),
    {fun() -> N = atomics:add_get(Ref, 1, 1), element(min(N, tuple_size(T)), T) end,
     fun() -> atomics:get(Ref, 1) end}.

nosleep() -> fun(Ms) -> self() ! {slept, Ms} end.

slept() -> receive {slept, Ms} -> [Ms | slept()] after 0 -> [] end.

once_unless_idempotent() ->
    {F, Runs} = script([{error, timeout}, {ok, 1}]),
    ?assertEqual({error, timeout}, dspex_retry:run(F, #{sleep => nosleep()})),
    ?assertEqual(1, Runs()),
    ?assertEqual([], slept()).

retries_bounded() ->
    {F, Runs} = script([{error, timeout}, {error, overloaded}, {ok, 3}]),
    ?assertEqual({ok, 3}, dspex_retry:run(F, #{idempotent => true, sleep => nosleep()})),
    ?assertEqual(3, Runs()),
    ?assertEqual(2, length(slept())),
    {G, RunsG} = script([{error, timeout}]),
    ?assertEqual({error, timeout}, dspex_retry:run(G, #{idempotent => true, attempts => 5, sleep => nosleep()})),
    ?assertEqual(5, RunsG()),
    ?assertEqual(4, length(slept())).

backoff_bounds() ->
    Runs = [begin
                {F, _} = script([{error, timeout}]),
                dspex_retry:run(F, #{idempotent => true, attempts => 6, base_ms => 10, max_ms => 100,
                                     sleep => nosleep()}),
                slept()
            end || _ <- lists:seq(1, 300)],
    Caps = [10, 20, 40, 80, 100],
    [?assert(D >= 0 andalso D =< Cap) || Delays <- Runs, {D, Cap} <- lists:zip(Delays, Caps)],
    %% jitter: the delays of one attempt spread over [0, cap]
    Fifth = [lists:nth(5, Ds) || Ds <- Runs],
    ?assert(lists:min(Fifth) < 20),
    ?assert(lists:max(Fifth) > 80),
    ?assert(length(lists:usort(Fifth)) > 30).

retry_on() ->
    {F, Runs} = script([{error, session_not_found}, {ok, 1}]),
    ?assertEqual({error, session_not_found}, dspex_retry:run(F, #{idempotent => true, sleep => nosleep()})),
    ?assertEqual(1, Runs()),
    {G, RunsG} = script([{error, session_not_found}, {ok, 1}]),
    ?assertEqual({ok, 1}, dspex_retry:run(G, #{idempotent => true, sleep => nosleep(),
                                               retry_on => fun({error, _}) -> true; (_) -> false end})),
    ?assertEqual(2, RunsG()),
    {H, RunsH} = script([{error, circuit_open}, {ok, 1}]),
    ?assertEqual({error, circuit_open}, dspex_retry:run(H, #{idempotent => true, sleep => nosleep()})),
    ?assertEqual(1, RunsH()).

fallback() ->
    Key = {?MODULE, fallback, make_ref()},
    Opts = #{idempotent => true, fallback => Key, sleep => nosleep()},
    ?assertEqual({error, timeout}, dspex_retry:run(fun() -> {error, timeout} end, Opts)),
    ?assertEqual({ok, 41}, dspex_retry:run(fun() -> {ok, 41} end, Opts)),
    ?assertEqual({ok, 42}, dspex_retry:run(fun() -> {ok, 42} end, Opts)),
    ?assertEqual({stale, 42, {error, timeout}}, dspex_retry:run(fun() -> {error, timeout} end, Opts)),
    ?assertEqual({stale, 42, {error, gone}}, dspex_retry:run(fun() -> {error, gone} end, Opts)),
    ?assertMatch({ok, 42, _}, dspex_retry:last_known(Key)),
    ok = dspex_retry:forget(Key),
    ?assertEqual({error, gone}, dspex_retry:run(fun() -> {error, gone} end, Opts)).

with_breaker() ->
    B = {?MODULE, breaker},
    ok = dspex_breaker:install(B, #{threshold => 3, window_ms => 60000, reset_ms => 60000}),
    try
        {F, Runs} = script([{error, timeout}]),
        Opts = #{idempotent => true, attempts => 5, breaker => B, sleep => nosleep()},
        %% 3 failures open the breaker; the 4th attempt is refused at once
        %% and circuit_open is not retried
        ?assertEqual({error, circuit_open}, dspex_retry:run(F, Opts)),
        ?assertEqual(3, Runs()),
        ?assertMatch({ok, #{state := open}}, dspex_breaker:status(B))
    after dspex_breaker:remove(B)
    end.

store_get() ->
    S = <<"dspex_retry_tests">>,
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    {ok, _} = dspex_store:register(S, x, integer, 7),
    {ok, #{value := 7}} = dspex_retry:get(S, x, #{}),
    ok = dspex_store:delete_session(S),
    ?assertMatch({stale, #{value := 7}, {error, session_not_found}}, dspex_retry:get(S, x, #{})),
    ?assertEqual({error, session_not_found}, dspex_retry:get(S, x, #{fallback => {other, key}})).

bad_options() ->
    F = fun() -> ok end,
    ?assertError(badarg, dspex_retry:run(F, #{attempts => 0})),
    ?assertError(badarg, dspex_retry:run(F, #{idempotent => yes})),
    ?assertError(badarg, dspex_retry:run(F, #{colour => red})).
