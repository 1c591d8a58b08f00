%% @doc PropEr state machine of `dspex_breaker' with the manual clock
%% (`dspex_manual_clock'): random sequences of ask, call (succeeding, failing,
%% raising), melt, success, reset, status and clock moves, against a model of
%% the documented transitions. Every command also returns the
%% `[dspex, breaker, state_change]' events it caused, which must be exactly
%% the model's transitions, in order.
%%
%% `fault/1' plants a wrong rule in the model, so the tests can check that the
%% property notices (each fault must make it fail).
%%
%% Debian's erlang-proper ships without proper.hrl: the macros are defined here.
-module(prop_breaker).

-export([prop_breaker/0, prop_breaker/1]).
-export([initial_state/0, command/1, precondition/2, next_state/3, postcondition/3]).
-export([ask/0, run/1, melt/0, success/0, reset/0, status/0, advance/1]).

-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).
-define(NAME, prop_breaker_under_test).

%%% Property -------------------------------------------------------------------

%% @doc The property with the model as documented.
prop_breaker() -> prop_breaker(none).

%% @doc The property with a planted model fault (`none' for the real one).
prop_breaker(Fault) ->
    ?FORALL(Opts, opts(),
            ?FORALL(Cmds, proper_statem:commands(?MODULE, model(Opts, Fault)),
                    begin
                        dspex_manual_clock:set(1000),
                        ok = dspex_breaker:install(?NAME, Opts#{clock => dspex_manual_clock}),
                        Self = self(),
                        ok = dspex_telemetry:attach({?MODULE, Self}, [dspex, breaker, state_change],
                                                    fun handle_event/4, Self),
                        {H, S, R} = try proper_statem:run_commands(?MODULE, Cmds)
                                    after dspex_telemetry:detach({?MODULE, Self}),
                                          dspex_breaker:remove(?NAME)
                                    end,
                        ?WHENFAIL(Fault =:= none andalso io:format(user, "opts ~p~nhistory ~p~nstate ~p~nresult ~p~n", [Opts, H, S, R]),
                                  R =:= ok)
                    end)).

opts() ->
    proper_types:bind(proper_types:fixed_list([proper_types:range(1, 4), proper_types:range(5, 60),
                                               proper_types:range(0, 40), proper_types:range(1, 3)]),
                      fun([N, W, R, K]) -> #{threshold => N, window_ms => W, reset_ms => R, probes => K} end,
                      false).

handle_event(_Event, _M, #{name := ?NAME, from := F, to := T}, Pid) -> Pid ! {breaker_change, F, T};
handle_event(_, _, _, _) -> ok.

%%% Commands (each returns {Result, Changes}) ----------------------------------

%% @private
ask() -> with_changes(fun() -> dspex_breaker:ask(?NAME) end).
%% @private
run(Outcome) ->
    with_changes(fun() ->
                         try dspex_breaker:call(?NAME, fun() -> outcome(Outcome) end)
                         catch error:boom -> raised
                         end
                 end).
%% @private
melt() -> with_changes(fun() -> dspex_breaker:melt(?NAME) end).
%% @private
success() -> with_changes(fun() -> dspex_breaker:success(?NAME) end).
%% @private
reset() -> with_changes(fun() -> dspex_breaker:reset(?NAME) end).
%% @private
status() ->
    with_changes(fun() ->
                         {ok, St} = dspex_breaker:status(?NAME),
                         maps:without([opts], St)
                 end).
%% @private
advance(Ms) -> with_changes(fun() -> dspex_manual_clock:advance(Ms), ok end).

outcome(ok) -> ok;
outcome(error) -> {error, failed};
outcome(raise) -> error(boom).

%% Events from the server come before its reply; the caller's own are sent
%% synchronously: all are in the mailbox when Fun returns.
with_changes(Fun) ->
    R = Fun(),
    {R, drain()}.

drain() ->
    receive {breaker_change, F, T} -> [{F, T} | drain()]
    after 0 -> []
    end.

%%% Model ----------------------------------------------------------------------

model(Opts, Fault) ->
    maps:merge(Opts, #{st => closed, fails => [], since => 1000, issued => 0, oks => 0, now => 1000,
                       fault => Fault}).

%% @private
initial_state() -> model(#{threshold => 1, window_ms => 10, reset_ms => 10, probes => 1}, none).

%% @private
command(#{window_ms := W, reset_ms := R}) ->
    proper_types:frequency(
      [{4, {call, ?MODULE, ask, []}},
       {6, {call, ?MODULE, run, [proper_types:oneof([ok, error, error, raise])]}},
       {3, {call, ?MODULE, melt, []}},
       {2, {call, ?MODULE, success, []}},
       {1, {call, ?MODULE, reset, []}},
       {3, {call, ?MODULE, status, []}},
       {4, {call, ?MODULE, advance, [proper_types:oneof([1, W div 2, W, R, R + 1, proper_types:range(0, 2 * R + 1)])]}}]).

%% @private
precondition(_, _) -> true.

%% @private
next_state(S, _V, {call, _, F, Args}) -> element(2, step(S, F, Args)).

%% @private
postcondition(S, {call, _, F, Args}, {Result, Changes}) ->
    {{Expected, ExpChanges}, _} = step(S, F, Args),
    Result =:= Expected andalso Changes =:= ExpChanges.

%% step(State, Command, Args) -> {{Result, Changes}, State'}
step(S, ask, []) ->
    case permit(S) of
        {ok, S1, Ch} -> {{ok, Ch}, S1};
        {refused, S1} -> {{{error, circuit_open}, []}, S1}
    end;
step(S, run, [Outcome]) ->
    case permit(S) of
        {refused, S1} -> {{{error, circuit_open}, []}, S1};
        {ok, S1, Ch} ->
            Result = case Outcome of ok -> ok; error -> {error, failed}; raise -> raised end,
            {S2, Ch2} = case Outcome of ok -> succeed(S1); _ -> fail(S1) end,
            {{Result, Ch ++ Ch2}, S2}
    end;
step(S, melt, []) -> {S1, Ch} = fail(S), {{ok, Ch}, S1};
step(S, success, []) -> {S1, Ch} = succeed(S), {{ok, Ch}, S1};
step(#{st := St, now := Now} = S, reset, []) ->
    Ch = case St of closed -> []; _ -> [{St, closed}] end,
    {{ok, Ch}, closed(S, Now)};
step(#{st := closed, fails := Fs, now := Now, window_ms := W} = S, status, []) ->
    {{#{state => closed, failures => length([T || T <- Fs, Now - T < W])}, []}, S};
step(#{st := open, since := Since, reset_ms := R, now := Now} = S, status, []) ->
    {{#{state => open, retry_in_ms => max(0, Since + R - Now)}, []}, S};
step(#{st := half_open, issued := I, oks := Oks} = S, status, []) ->
    {{#{state => half_open, probes_taken => I, probes_ok => Oks}, []}, S};
step(#{now := Now} = S, advance, [Ms]) -> {{ok, []}, S#{now := Now + Ms}}.

permit(#{st := closed} = S) -> {ok, S, []};
permit(#{st := open, since := Since, reset_ms := R, now := Now, fault := Fault} = S) ->
    Elapsed = case Fault of reset_strict -> Now - Since > R; _ -> Now - Since >= R end,
    case Elapsed of
        true -> {ok, S#{st := half_open, issued := 1}, [{open, half_open}]};
        false -> {refused, S}
    end;
permit(#{st := half_open, issued := I, probes := K, fault := Fault} = S) ->
    Limit = case Fault of extra_probe -> K + 1; _ -> K end,
    case I < Limit of
        true -> {ok, S#{issued := I + 1}, []};
        false -> {refused, S}
    end.

fail(#{st := closed, fails := Fs, now := Now, window_ms := W, threshold := N, fault := Fault} = S) ->
    Recent = [Now | [T || T <- Fs, Now - T < W orelse Fault =:= no_window]],
    case length(Recent) >= N of
        true -> {open(S, Now), [{closed, open}]};
        false -> {S#{fails := lists:sublist(Recent, N)}, []}
    end;
fail(#{st := half_open, now := Now} = S) -> {open(S, Now), [{half_open, open}]};
fail(#{st := open} = S) -> {S, []}.

succeed(#{st := half_open, oks := Oks, probes := K, now := Now} = S) ->
    case Oks + 1 >= K of
        true -> {closed(S, Now), [{half_open, closed}]};
        false -> {S#{oks := Oks + 1}, []}
    end;
succeed(#{st := closed, fault := reset_on_success} = S) -> {S#{fails := []}, []};
succeed(S) -> {S, []}.

open(S, Now) -> S#{st := open, since := Now, issued := 0, oks := 0, fails := []}.
closed(S, Now) -> S#{st := closed, since := Now, issued := 0, oks := 0, fails := []}.
