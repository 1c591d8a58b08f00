%% @doc Circuit breakers around external workers or services.
%%
%% A breaker is `closed' (calls go through), `open' (calls are refused at once
%% with `{error, circuit_open}') or `half_open' (a few probe calls go through).
%% `closed → open' after `threshold' failures within `window_ms';
%% `open → half_open' at the first `ask' after `reset_ms' (that caller holds
%% the first of `probes' probe permits; no timer, no server); `half_open →
%% closed' after `probes' successful probes; `half_open → open' at a failed
%% probe. Failures reported while `open' (before the first probe) change
%% nothing; a result reported for an earlier episode (the breaker moved on
%% meanwhile) is ignored.
%%
%% Readers never call a server: `ask/1' and `status/1' read the breaker's row
%% in a public ETS table; taking a probe permit is one `ets:update_counter'.
%% State changes (failures, probe results, reset, install) are serialised by
%% `dspex_breaker_server', which owns the table.
%%
%% Time comes from the breaker's `clock' module (`now_ms/0', default
%% `dspex_clock'), so tests move it by hand.
%%
%% Telemetry: `[dspex, breaker, state_change]' (`#{system_time}',
%% `#{name, from, to}') on every state change; `[dspex, breaker, call, stop]'
%% (`#{duration}', `#{name, result => ok | failure | rejected}');
%% `[dspex, breaker, melt, stop]', `[dspex, breaker, reset, stop]',
%% `[dspex, breaker, install, stop]' (`#{duration}', `#{name}').
-module(dspex_breaker).

-export([install/2, remove/1, ask/1, call/2, call/3, melt/1, success/1, reset/1, status/1]).
-export([names/0]).
%% for dspex_breaker_server
-export([emit_change/3, row/3]).

-type name() :: term().
-type state() :: closed | open | half_open.
-type opts() :: #{threshold => pos_integer(), window_ms => pos_integer(), reset_ms => non_neg_integer(),
                  probes => pos_integer(), clock => module()}.
-type call_opts() :: #{is_failure => fun((term()) -> boolean())}.
-export_type([name/0, state/0, opts/0]).

-define(T, dspex_breaker).
-define(SERVER, dspex_breaker_server).
%% row: {Name, closed | open, Gen, Since, Issued, Oks, Failures, Opts}
%%  Gen     bumped at every entry into closed or open (an "episode")
%%  Since   clock time of that entry
%%  Issued  probe permits taken in this open episode (half_open iff > 0)
%%  Oks     successful probes
%%  Failures clock times of recent failures while closed, newest first
-define(ISSUED, 5).
-define(GEN, 3).

%% @doc Creates (or replaces, closed) the breaker `Name'. Options, with their
%% defaults: `threshold' 5 failures within `window_ms' 10000 open it;
%% `reset_ms' 30000 until probes are let through; `probes' 1 success needed
%% to close; `clock' `dspex_clock'. `{error, {invalid_option, Key}}' for a bad
%% value (nothing changes).
-spec install(name(), opts()) -> ok | {error, {invalid_option, atom()}}.
install(Name, Opts) when is_map(Opts) ->
    span(install, Name, fun() ->
        case validate(Opts) of
            {ok, Full} -> gen_server:call(?SERVER, {install, Name, Full});
            Error -> Error
        end
    end).

%% @doc Forgets the breaker. `{error, not_found}' if there is none.
-spec remove(name()) -> ok | {error, not_found}.
remove(Name) -> gen_server:call(?SERVER, {remove, Name}).

%% @doc `ok' when a call may go through now, `{error, circuit_open}' when not,
%% `{error, not_found}' for an unknown breaker. In `half_open' an `ok' is a
%% probe permit: report its result with `success/1' or `melt/1' (`call/2,3'
%% does both for you). No server call.
-spec ask(name()) -> ok | {error, circuit_open | not_found}.
ask(Name) ->
    %% closed: one small read (the state atom), nothing copied
    try ets:lookup_element(?T, Name, 2) of
        closed -> ok;
        open ->
            case permit(Name) of
                {ok, _, _} -> ok;
                Error -> Error
            end
    catch error:badarg -> {error, not_found}
    end.

%% @doc `call(Name, Fun, #{})'.
-spec call(name(), fun(() -> Result)) -> Result | {error, circuit_open | not_found}.
call(Name, Fun) -> call(Name, Fun, #{}).

%% @doc Runs `Fun' if the breaker lets it through and reports the outcome: a
%% failure is a result for which `is_failure' is true (default: `error' and
%% `{error, _}') or an exception (re-raised after it is counted). Refused:
%% `{error, circuit_open}' at once.
-spec call(name(), fun(() -> Result), call_opts()) -> Result | {error, circuit_open | not_found}.
call(Name, Fun, Opts) when is_function(Fun, 0), is_map(Opts) ->
    IsFailure = maps:get(is_failure, Opts, fun default_failure/1),
    Start = erlang:monotonic_time(),
    case permit(Name) of
        {ok, Mode, Gen} ->
            Result = try Fun()
                     catch Class:Reason:Stack ->
                             report(Name, Mode, Gen, failure),
                             stop_event(call, Name, Start, #{result => failure}),
                             erlang:raise(Class, Reason, Stack)
                     end,
            Outcome = case IsFailure(Result) of true -> failure; false -> ok end,
            report(Name, Mode, Gen, Outcome),
            stop_event(call, Name, Start, #{result => Outcome}),
            Result;
        {error, circuit_open} = E ->
            stop_event(call, Name, Start, #{result => rejected}),
            E;
        E -> E
    end.

%% @doc Reports a failure: counts it while closed (opening the breaker at the
%% threshold), reopens a half-open breaker, does nothing while open.
-spec melt(name()) -> ok | {error, not_found}.
melt(Name) ->
    span(melt, Name, fun() ->
        case ets:lookup(?T, Name) of
            [] -> {error, not_found};
            [Row] -> gen_server:call(?SERVER, {failure, Name, element(?GEN, Row)})
        end
    end).

%% @doc Reports a successful probe (needed only with `ask/1'; ignored unless
%% half-open).
-spec success(name()) -> ok | {error, not_found}.
success(Name) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, open, Gen, _, Issued, _, _, _}] when Issued > 0 -> gen_server:call(?SERVER, {success, Name, Gen});
        [_] -> ok
    end.

%% @doc Closes the breaker and forgets its failures.
-spec reset(name()) -> ok | {error, not_found}.
reset(Name) -> span(reset, Name, fun() -> gen_server:call(?SERVER, {reset, Name}) end).

%% @doc The breaker's state, failures counted in the window (closed),
%% probes taken and succeeded (half-open), and `retry_in_ms' (open: time left
%% before probes are let through). No server call.
-spec status(name()) -> {ok, #{state := state(), atom() => term()}} | {error, not_found}.
status(Name) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, closed, _, _, _, _, Fs, #{window_ms := W, clock := C} = O}] ->
            Now = C:now_ms(),
            {ok, #{state => closed, failures => length([T || T <- Fs, Now - T < W]), opts => O}};
        [{_, open, _, Since, 0, _, _, #{reset_ms := R, clock := C} = O}] ->
            {ok, #{state => open, retry_in_ms => max(0, Since + R - C:now_ms()), opts => O}};
        [{_, open, _, _, Issued, Oks, _, #{probes := K} = O}] ->
            {ok, #{state => half_open, probes_taken => min(Issued, K), probes_ok => Oks, opts => O}}
    end.

%%% Internals ------------------------------------------------------------------

%% {ok, closed | half_open, Gen} | {error, circuit_open | not_found}
permit(Name) ->
    try ets:lookup_element(?T, Name, 2) of
        closed ->
            %% Gen may already be a later episode's: a failure reported
            %% against it counts in that episode, which is as good
            {ok, closed, ets:lookup_element(?T, Name, ?GEN)};
        open -> permit_open(Name)
    catch error:badarg -> {error, not_found}
    end.

permit_open(Name) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, closed, Gen, _, _, _, _, _}] -> {ok, closed, Gen};
        [{_, open, Gen, Since, _, _, _, #{reset_ms := R, probes := K, clock := C}}] ->
            case C:now_ms() - Since >= R of
                false -> {error, circuit_open};
                true ->
                    try ets:update_counter(?T, Name, [{?ISSUED, 1, K, K + 1}, {?GEN, 0}]) of
                        [I, Gen] when I =< K ->
                            I =:= 1 andalso emit_change(Name, open, half_open),
                            {ok, half_open, Gen};
                        [_, Gen] -> {error, circuit_open};
                        [_, _] ->
                            %% the row moved on between the read and the
                            %% update: give the permit back and look again
                            _ = (catch ets:update_counter(?T, Name, {?ISSUED, -1, 0, 0})),
                            permit(Name)
                    catch error:badarg -> {error, not_found}
                    end
            end
    end.

%% A success while closed needs no server; a probe's result and every
%% failure do.
report(_Name, closed, _Gen, ok) -> ok;
report(Name, half_open, Gen, ok) -> gen_server:call(?SERVER, {success, Name, Gen});
report(Name, _Mode, Gen, failure) -> gen_server:call(?SERVER, {failure, Name, Gen}).

default_failure(error) -> true;
default_failure({error, _}) -> true;
default_failure(_) -> false.

%% @private
-spec emit_change(name(), state(), state()) -> ok.
emit_change(Name, From, To) ->
    dspex_telemetry:execute([dspex, breaker, state_change], #{system_time => erlang:system_time()},
                            #{name => Name, from => From, to => To}).

%% @private A fresh closed row.
-spec row(name(), non_neg_integer(), map()) -> tuple().
row(Name, Gen, #{clock := C} = Opts) -> {Name, closed, Gen, C:now_ms(), 0, 0, [], Opts}.

-spec validate(map()) -> {ok, map()} | {error, {invalid_option, atom()}}.
validate(Opts) ->
    Full = maps:merge(#{threshold => 5, window_ms => 10000, reset_ms => 30000, probes => 1,
                        clock => dspex_clock}, Opts),
    Bad = [K || {K, V} <- maps:to_list(Full), not valid(K, V)],
    case Bad of
        [] -> {ok, Full};
        [K | _] -> {error, {invalid_option, K}}
    end.

valid(threshold, V) -> is_integer(V) andalso V > 0;
valid(window_ms, V) -> is_integer(V) andalso V > 0;
valid(reset_ms, V) -> is_integer(V) andalso V >= 0;
valid(probes, V) -> is_integer(V) andalso V > 0;
valid(clock, V) -> is_atom(V) andalso (code:ensure_loaded(V) =:= {module, V})
                       andalso erlang:function_exported(V, now_ms, 0);
valid(_, _) -> false.

span(Op, Name, Fun) ->
    Start = erlang:monotonic_time(),
    R = Fun(),
    stop_event(Op, Name, Start, #{}),
    R.

stop_event(Op, Name, Start, Meta) ->
    dspex_telemetry:execute([dspex, breaker, Op, stop], #{duration => erlang:monotonic_time() - Start},
                            Meta#{name => Name}).

%%% listing (debug console, issue #20) ---------------------------------------

%% @doc The names of every installed breaker (no server call).
-spec names() -> [name()].
names() ->
    try ets:select(?T, [{{'$1', '_', '_', '_', '_', '_', '_', '_'}, [], ['$1']}])
    catch error:badarg -> []
    end.
