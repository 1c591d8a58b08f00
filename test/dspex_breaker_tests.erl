%% @doc EUnit tests of `dspex_breaker' (manual clock) and the entry point of
%% its PropEr state machine `prop_breaker'.
%%
%% DSPEX_PROP_BREAKER_N: number of command sequences (default 1000).
-module(dspex_breaker_tests).

-include_lib("eunit/include/eunit.hrl").

%% this module is also a clock that breaks on demand (see now_ms/0)
-export([now_ms/0]).

-define(B, dspex_breaker_tests_b).
-define(CLOCK, {?MODULE, clock}).

numtests() ->
    case os:getenv("DSPEX_PROP_BREAKER_N") of
        false -> 1000;
        S -> list_to_integer(S)
    end.

setup() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    dspex_manual_clock:set(0),
    ok = dspex_breaker:install(?B, #{threshold => 3, window_ms => 100, reset_ms => 50, probes => 2,
                                     clock => dspex_manual_clock}).

cleanup(_) ->
    persistent_term:erase(?CLOCK),
    _ = dspex_breaker:remove({?B, 2}),
    dspex_breaker:remove(?B).

%% The manual clock, until a test makes it raise or answer a float.
now_ms() ->
    case persistent_term:get(?CLOCK, fine) of
        fine -> dspex_manual_clock:now_ms();
        raise -> error(clock_broke);
        float -> 1.5
    end.

breaker_test_() ->
    {foreach, fun setup/0, fun cleanup/1,
     [{"opens after N failures within the window", fun opens_at_threshold/0},
      {"failures older than the window do not count", fun window_slides/0},
      {"open refuses at once, half-open after the reset timeout", fun open_then_half_open/0},
      {"half-open closes after K successful probes", fun half_open_closes/0},
      {"half-open reopens on a failed probe", fun half_open_reopens/0},
      {"exceptions count as failures and are re-raised", fun exceptions/0},
      {"is_failure decides what a failure is", fun custom_failure/0},
      {"reset closes; melt while open changes nothing", fun reset_and_melt/0},
      {"telemetry on every state change", fun telemetry_events/0},
      {"concurrent askers get exactly K probe permits", fun concurrent_probes/0},
      {"ask/1 and status/1 make no server call", fun no_server_call/0},
      {"a probe whose holder dies counts as a failed probe", fun dead_probe_holder_fails_the_probe/0},
      {"a raising or non-boolean is_failure still reports the probe", fun bad_is_failure_reports/0},
      {"install refuses a clock that raises or answers a non-integer", fun install_refuses_broken_clock/0},
      {"a clock failing later fails that breaker's calls, not the server", fun failing_clock_spares_server/0}]}.

fail_call() -> dspex_breaker:call(?B, fun() -> {error, nope} end).

opens_at_threshold() ->
    ?assertEqual({error, nope}, fail_call()),
    ?assertEqual({error, nope}, fail_call()),
    ?assertMatch({ok, #{state := closed, failures := 2}}, dspex_breaker:status(?B)),
    ?assertEqual(ok, dspex_breaker:ask(?B)),
    ?assertEqual({error, nope}, fail_call()),
    ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)),
    ?assertEqual({error, circuit_open}, dspex_breaker:ask(?B)),
    Self = self(),
    ?assertEqual({error, circuit_open}, dspex_breaker:call(?B, fun() -> Self ! ran, ok end)),
    receive ran -> ?assert(false) after 0 -> ok end.

window_slides() ->
    fail_call(), fail_call(),
    dspex_manual_clock:advance(100),
    fail_call(),
    ?assertMatch({ok, #{state := closed, failures := 1}}, dspex_breaker:status(?B)),
    fail_call(), fail_call(),
    ?assertMatch({ok, #{state := open}}, dspex_breaker:status(?B)).

trip() -> fail_call(), fail_call(), fail_call(), {ok, #{state := open}} = dspex_breaker:status(?B), ok.

open_then_half_open() ->
    trip(),
    dspex_manual_clock:advance(49),
    ?assertEqual({error, circuit_open}, dspex_breaker:ask(?B)),
    ?assertMatch({ok, #{state := open, retry_in_ms := 1}}, dspex_breaker:status(?B)),
    dspex_manual_clock:advance(1),
    ?assertEqual(ok, dspex_breaker:ask(?B)),
    ?assertEqual(ok, dspex_breaker:ask(?B)),
    ?assertEqual({error, circuit_open}, dspex_breaker:ask(?B)),
    ?assertMatch({ok, #{state := half_open, probes_taken := 2, probes_ok := 0}}, dspex_breaker:status(?B)).

half_open_closes() ->
    trip(),
    dspex_manual_clock:advance(50),
    ?assertEqual(ok, dspex_breaker:call(?B, fun() -> ok end)),
    ?assertMatch({ok, #{state := half_open, probes_ok := 1}}, dspex_breaker:status(?B)),
    ?assertEqual(ok, dspex_breaker:call(?B, fun() -> ok end)),
    ?assertMatch({ok, #{state := closed, failures := 0}}, dspex_breaker:status(?B)).

half_open_reopens() ->
    trip(),
    dspex_manual_clock:advance(50),
    ?assertEqual(ok, dspex_breaker:call(?B, fun() -> ok end)),
    ?assertEqual({error, nope}, fail_call()),
    ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)).

exceptions() ->
    [?assertError(boom, dspex_breaker:call(?B, fun() -> error(boom) end)) || _ <- [1, 2]],
    ?assertThrow(x, dspex_breaker:call(?B, fun() -> throw(x) end)),
    ?assertMatch({ok, #{state := open}}, dspex_breaker:status(?B)).

custom_failure() ->
    F = fun() -> dspex_breaker:call(?B, fun() -> {error, soft} end,
                                    #{is_failure => fun(R) -> R =:= {error, hard} end})
        end,
    [?assertEqual({error, soft}, F()) || _ <- lists:seq(1, 5)],
    ?assertMatch({ok, #{state := closed, failures := 0}}, dspex_breaker:status(?B)),
    [dspex_breaker:call(?B, fun() -> weird end, #{is_failure => fun(R) -> R =:= weird end}) || _ <- [1, 2, 3]],
    ?assertMatch({ok, #{state := open}}, dspex_breaker:status(?B)).

reset_and_melt() ->
    trip(),
    ?assertEqual(ok, dspex_breaker:melt(?B)),
    ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)),
    ?assertEqual(ok, dspex_breaker:reset(?B)),
    ?assertMatch({ok, #{state := closed, failures := 0}}, dspex_breaker:status(?B)),
    ?assertEqual(ok, dspex_breaker:melt(?B)),
    ?assertMatch({ok, #{state := closed, failures := 1}}, dspex_breaker:status(?B)),
    ?assertEqual({error, not_found}, dspex_breaker:ask(nope_no_breaker)),
    ?assertEqual({error, not_found}, dspex_breaker:melt(nope_no_breaker)),
    ?assertEqual({error, not_found}, dspex_breaker:status(nope_no_breaker)),
    ?assertEqual({error, {invalid_option, threshold}}, dspex_breaker:install(?B, #{threshold => 0})),
    ?assertEqual({error, {invalid_option, clock}}, dspex_breaker:install(?B, #{clock => no_such_module})),
    ?assertEqual({error, {invalid_option, colour}}, dspex_breaker:install(?B, #{colour => red})),
    ?assertMatch({ok, #{state := closed, failures := 1}}, dspex_breaker:status(?B)).

telemetry_events() ->
    Self = self(),
    Id = {?MODULE, telemetry},
    ok = dspex_telemetry:attach(Id, [dspex, breaker, state_change],
                                fun(_, #{system_time := _}, #{name := N, from := F, to := T}, _) when N =:= ?B ->
                                        Self ! {change, F, T};
                                   (_, _, _, _) -> ok
                                end, []),
    try
        trip(),
        dspex_manual_clock:advance(50),
        ok = dspex_breaker:call(?B, fun() -> ok end),
        fail_call(),
        dspex_manual_clock:advance(50),
        ok = dspex_breaker:call(?B, fun() -> ok end),
        ok = dspex_breaker:call(?B, fun() -> ok end),
        trip(),
        ok = dspex_breaker:reset(?B),
        ?assertEqual([{closed, open}, {open, half_open}, {half_open, open}, {open, half_open},
                      {half_open, closed}, {closed, open}, {open, closed}], changes())
    after dspex_telemetry:detach(Id)
    end.

changes() -> receive {change, F, T} -> [{F, T} | changes()] after 0 -> [] end.

concurrent_probes() ->
    trip(),
    dspex_manual_clock:advance(50),
    Self = self(),
    %% the askers live until every one asked: a permit holder that dies unreported fails its probe (and
    %% reopens the breaker), which would cut the count short
    Pids = [spawn_monitor(fun() -> Self ! {asked, dspex_breaker:ask(?B)}, receive done -> ok end end)
            || _ <- lists:seq(1, 50)],
    Answers = [receive {asked, A} -> A end || _ <- Pids],
    [P ! done || {P, _} <- Pids],
    [receive {'DOWN', R, process, P, normal} -> ok end || {P, R} <- Pids],
    ?assertEqual(2, length([ok || ok <- Answers])),
    ?assertEqual(48, length([x || {error, circuit_open} <- Answers])).

no_server_call() ->
    Server = whereis(dspex_breaker_server),
    ok = sys:suspend(Server),
    try
        ?assertEqual(ok, dspex_breaker:ask(?B)),
        ?assertMatch({ok, #{state := closed}}, dspex_breaker:status(?B)),
        ?assertEqual(ok, dspex_breaker:call(?B, fun() -> ok end))
    after sys:resume(Server)
    end.

%%% Property ---------------------------------------------------------------------

breaker_property_test_() ->
    {timeout, 300,
     fun() ->
             {ok, _} = application:ensure_all_started(dspex_bridge),
             ?assert(proper:quickcheck(prop_breaker:prop_breaker(), [{numtests, numtests()}, {to_file, user}]))
     end}.

%% Each planted model fault must be found: the property can fail.
property_can_fail_test_() ->
    {timeout, 300,
     [{atom_to_list(F),
       fun() ->
               {ok, _} = application:ensure_all_started(dspex_bridge),
               ?assertNot(proper:quickcheck(prop_breaker:prop_breaker(F),
                                            [{numtests, 500}, quiet, noshrink]))
       end} || F <- [reset_strict, extra_probe, no_window, reset_on_success]]}.

%%% A probe permit is never lost; a breaker's clock never crashes the server

%% Forwards this breaker's state changes to the calling process.
watch_changes(Name) ->
    Self = self(),
    Id = {?MODULE, watch, make_ref()},
    ok = dspex_telemetry:attach(Id, [dspex, breaker, state_change],
                                fun(_, _, #{name := N, from := F, to := T}, _) when N =:= Name ->
                                        Self ! {change, F, T};
                                   (_, _, _, _) -> ok
                                end, []),
    Id.

await_change(F, T) ->
    receive {change, F, T} -> ok
    after 5000 -> error({no_state_change, F, T})
    end.

%% A process holding a probe: it runs `call/2' and never returns.
hung_probe() ->
    Self = self(),
    {Pid, MRef} = spawn_monitor(fun() ->
                                        dspex_breaker:call(?B, fun() -> Self ! {probing, self()},
                                                                        receive never -> ok end
                                                               end)
                                end),
    receive {probing, Pid} -> {Pid, MRef} end.

dead_probe_holder_fails_the_probe() ->
    trip(),
    dspex_manual_clock:advance(50),
    Id = watch_changes(?B),
    try
        {P1, M1} = hung_probe(),
        {_P2, _} = hung_probe(),
        ?assertMatch({ok, #{state := half_open, probes_taken := 2}}, dspex_breaker:status(?B)),
        ?assertEqual({error, circuit_open}, dspex_breaker:ask(?B)),
        exit(P1, kill),
        receive {'DOWN', M1, process, P1, killed} -> ok end,
        %% the server saw the holder die: the probe failed, the breaker reopened
        await_change(half_open, open),
        ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)),
        %% and probes are let through again after the reset timeout
        dspex_manual_clock:advance(50),
        ?assertEqual(ok, dspex_breaker:call(?B, fun() -> ok end)),
        ?assertMatch({ok, #{state := half_open, probes_ok := 1}}, dspex_breaker:status(?B))
    after dspex_telemetry:detach(Id)
    end.

bad_is_failure_reports() ->
    trip(),
    dspex_manual_clock:advance(50),
    ?assertError(oops, dspex_breaker:call(?B, fun() -> ok end, #{is_failure => fun(_) -> error(oops) end})),
    ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)),
    dspex_manual_clock:advance(50),
    ?assertError({bad_is_failure, maybe},
                 dspex_breaker:call(?B, fun() -> ok end, #{is_failure => fun(_) -> maybe end})),
    ?assertMatch({ok, #{state := open, retry_in_ms := 50}}, dspex_breaker:status(?B)),
    %% not stuck: the next probes close it
    dspex_manual_clock:advance(50),
    ok = dspex_breaker:call(?B, fun() -> ok end),
    ok = dspex_breaker:call(?B, fun() -> ok end),
    ?assertMatch({ok, #{state := closed}}, dspex_breaker:status(?B)).

install_refuses_broken_clock() ->
    Server = whereis(dspex_breaker_server),
    persistent_term:put(?CLOCK, raise),
    ?assertEqual({error, {invalid_option, clock}}, dspex_breaker:install({?B, 2}, #{clock => ?MODULE})),
    persistent_term:put(?CLOCK, float),
    ?assertEqual({error, {invalid_option, clock}}, dspex_breaker:install({?B, 2}, #{clock => ?MODULE})),
    ?assertEqual({error, not_found}, dspex_breaker:status({?B, 2})),
    ?assertEqual(Server, whereis(dspex_breaker_server)),
    ?assertMatch({ok, #{state := closed}}, dspex_breaker:status(?B)).

failing_clock_spares_server() ->
    Server = whereis(dspex_breaker_server),
    B2 = {?B, 2},
    ok = dspex_breaker:install(B2, #{threshold => 2, clock => ?MODULE}),
    ok = dspex_breaker:melt(B2),
    ok = dspex_breaker:melt(?B),
    ok = dspex_retry:forget(dspex_breaker_tests_key),
    {ok, 1} = dspex_retry:run(fun() -> {ok, 1} end, #{fallback => dspex_breaker_tests_key}),
    persistent_term:put(?CLOCK, raise),
    ?assertMatch({error, {clock_failed, {error, clock_broke}}}, dspex_breaker:melt(B2)),
    ?assertMatch({error, {clock_failed, _}}, dspex_breaker:status(B2)),
    ?assertMatch({error, {clock_failed, _}}, dspex_breaker:reset(B2)),
    %% a closed breaker lets the call run; the failure it reports is lost
    ?assertEqual({error, x}, dspex_breaker:call(B2, fun() -> {error, x} end)),
    persistent_term:put(?CLOCK, float),
    ?assertMatch({error, {clock_failed, {not_integer, 1.5}}}, dspex_breaker:melt(B2)),
    %% the server, the other breakers and the retry values all live on
    ?assertEqual(Server, whereis(dspex_breaker_server)),
    ?assertMatch({ok, #{state := closed, failures := 1}}, dspex_breaker:status(?B)),
    ?assertMatch({ok, 1, _}, dspex_retry:last_known(dspex_breaker_tests_key)),
    %% a mended clock mends the breaker, which changed nothing meanwhile
    persistent_term:erase(?CLOCK),
    ?assertMatch({ok, #{state := closed, failures := 1}}, dspex_breaker:status(B2)),
    ok = dspex_retry:forget(dspex_breaker_tests_key).
