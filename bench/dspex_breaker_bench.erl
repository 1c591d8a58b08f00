%% @doc `make bench' part for breakers and workers, each against the obvious
%% alternative in the same run. Ratios are "alternative time / our time":
%% above 1.0 means ours is faster.
%%   * dspex_breaker:ask/1 (ETS read, no server) against a breaker whose state
%%     lives in a gen_server (ask = gen_server:call), 1 and 4 concurrent askers;
%%   * dspex_breaker:call/2 around a trivial fun against calling it directly
%%     (the cost of the breaker on a closed circuit);
%%   * dspex_workers:call/3 round trip to a pooled Python worker against
%%     starting a Python process per call.
-module(dspex_breaker_bench).
-export([main/0]).
-export([init/1, handle_call/3, handle_cast/2]).

-define(ASKS, 1000000).

%% @doc Runs the benchmarks and prints the results and ratios.
-spec main() -> ok.
main() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    io:format("~ndspex_breaker / dspex_workers benchmark (~p schedulers)~n",
              [erlang:system_info(schedulers_online)]),
    ok = dspex_breaker:install(bench_breaker, #{}),
    {ok, Srv} = gen_server:start(?MODULE, [], []),
    Rows = lists:append([asks(P, Srv) || P <- [1, 4]]) ++ overhead() ++ workers(),
    io:format("~nsummary (alternative time / ours; above 1 = ours faster):~n"),
    [io:format("  ~-58s ~9.2fx~n", [L, R]) || {L, R} <- Rows],
    gen_server:stop(Srv),
    dspex_breaker:remove(bench_breaker),
    ok.

asks(Procs, Srv) ->
    N = ?ASKS div Procs,
    TOurs = par(Procs, fun() -> ask_loop(N) end),
    TSrv = par(Procs, fun() -> srv_loop(Srv, N div 10) end) * 10,
    io:format("~b asker(s): dspex_breaker:ask/1 ~.1f ns/op, gen_server breaker ~.1f ns/op~n",
              [Procs, TOurs / ?ASKS, TSrv / ?ASKS]),
    [{lists:flatten(io_lib:format("ask/1 vs gen_server breaker, ~b asker(s)", [Procs])), TSrv / TOurs}].

ask_loop(0) -> ok;
ask_loop(N) -> ok = dspex_breaker:ask(bench_breaker), ask_loop(N - 1).

srv_loop(_, 0) -> ok;
srv_loop(Srv, N) -> ok = gen_server:call(Srv, ask), srv_loop(Srv, N - 1).

overhead() ->
    F = fun() -> ok end,
    N = ?ASKS,
    TDirect = best(fun() -> direct_loop(F, N) end),
    TCall = best(fun() -> call_loop(F, N) end),
    io:format("closed circuit: call/2 ~.1f ns/op, the fun alone ~.1f ns/op~n", [TCall / N, TDirect / N]),
    [{"call/2 vs the bare fun (below 1: the breaker's cost)", TDirect / TCall}].

direct_loop(_, 0) -> ok;
direct_loop(F, N) -> ok = F(), direct_loop(F, N - 1).

call_loop(_, 0) -> ok;
call_loop(F, N) -> ok = dspex_breaker:call(bench_breaker, F), call_loop(F, N - 1).

workers() ->
    Module = filename:absname("test/python_workers/chaos.py"),
    case filelib:is_regular(Module) of
        false -> io:format("(no test/python_workers/chaos.py: worker bench skipped)~n"), [];
        true ->
            {ok, _} = dspex_workers:start_pool(bench_pool, #{module => Module, size => 2}),
            wait_ready(bench_pool, 200),
            Calls = 2000,
            Lat = [element(1, timer:tc(fun() -> {ok, 1} = dspex_workers:call(bench_pool, {work, [1]}, 5000) end))
                   || _ <- lists:seq(1, Calls)],
            S = lists:sort(Lat),
            Mean = lists:sum(Lat) / Calls,
            Spawns = 10,
            TSpawn = lists:sum([element(1, timer:tc(fun() -> spawn_python() end)) || _ <- lists:seq(1, Spawns)]) / Spawns,
            io:format("worker round trip: mean ~.1f us, p50 ~b us, p99 ~b us; a python process per call: ~.1f us~n",
                      [Mean, lists:nth(Calls div 2, S), lists:nth(round(Calls * 0.99), S), TSpawn]),
            ok = dspex_workers:stop_pool(bench_pool),
            [{"pooled worker call vs a python process per call", TSpawn / Mean}]
    end.

wait_ready(_, 0) -> error(pool_not_ready);
wait_ready(Pool, N) ->
    case dspex_workers:status(Pool) of
        {ok, #{idle := 2}} -> ok;
        _ -> receive after 50 -> wait_ready(Pool, N - 1) end
    end.

spawn_python() ->
    P = open_port({spawn_executable, "/usr/bin/python3"},
                  [{args, ["-c", "import json,sys; print(json.dumps(1))"]}, exit_status, binary]),
    collect(P).

collect(P) ->
    receive
        {P, {data, _}} -> collect(P);
        {P, {exit_status, 0}} -> ok
    end.

par(N, F) ->
    Self = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() -> F(), Self ! {done, self()} end) || _ <- lists:seq(1, N)],
    [receive {done, P} -> ok end || P <- Pids],
    erlang:monotonic_time(nanosecond) - T0.

best(F) ->
    lists:min([begin T0 = erlang:monotonic_time(nanosecond), F(), erlang:monotonic_time(nanosecond) - T0 end
               || _ <- [1, 2, 3]]).

%% The alternative: breaker state in a gen_server.
%% @private
init([]) -> {ok, #{state => closed, failures => 0}}.
%% @private
handle_call(ask, _From, #{state := closed} = S) -> {reply, ok, S};
handle_call(ask, _From, S) -> {reply, {error, circuit_open}, S}.
%% @private
handle_cast(_, S) -> {noreply, S}.
