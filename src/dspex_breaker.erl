%% @doc Circuit breakers around external workers or services.
%%
%% A breaker is `closed' (calls go through), `open' (calls are refused at once
%% with `{error, circuit_open}') or `half_open' (a few probe calls go through).
%% `closed → open' after `threshold' failures within `window_ms';
%% `open → half_open' at the first `ask' after `reset_ms' (that caller holds
%% the first of `probes' probe permits; no timer); `half_open → closed' after
%% `probes' successful probes; `half_open → open' at a failed probe.
%% Failures reported while `open' (before the first probe) change nothing; a
%% result reported for an earlier episode (the breaker moved on meanwhile) is
%% ignored.
%%
%% A probe permit taken is always given back: `call/2,3' reports the outcome
%% whatever `Fun' or `is_failure' do (an exception in either counts as a
%% failure and is re-raised), and the server monitors every permit's holder:
%% a holder that dies before reporting (killed, say, while its call ran)
%% counts as a failed probe, since the call it probed did not come back. So a
%% half-open breaker never stays stuck with all its permits taken. Report a
%% permit from `ask/1' (`success/1', `melt/1') from the process that asked.
%%
%% Readers never call a server in the common cases: `ask/1' and `status/1'
%% read the breaker's row in a public ETS table, and only taking a half-open
%% probe permit is a server call (so the server can watch its holder). State
%% changes (failures, probe results, reset, install) are serialised by
%% `dspex_breaker_server', which owns the table.
%%
%% Time comes from the breaker's `clock' module (`now_ms/0', default
%% `dspex_clock'), so tests move it by hand. `install/2' calls it once and
%% refuses one that raises or answers anything but an integer; a clock that
%% fails later fails only that breaker's calls (`{error, {clock_failed,
%% Why}}'), never the server or other breakers.
%%
%% Telemetry: `[dspex, breaker, state_change]' (`#{system_time}',
%% `#{name, from, to}') on every state change; `[dspex, breaker, call, stop]'
%% (`#{duration}', `#{name, result => ok | failure | rejected}');
%% `[dspex, breaker, melt, stop]', `[dspex, breaker, reset, stop]',
%% `[dspex, breaker, install, stop]' (`#{duration}', `#{name}').
-module(dspex_breaker).

-export([install/2, remove/1, ask/1, call/2, call/3, melt/1, success/1, reset/1, status/1]).
-export([names/0, check_opts/1]).
%% for dspex_breaker_server
-export([emit_change/3, row/3, clock_ms/1]).

-type name() :: term().
-type state() :: closed | open | half_open.
-type opts() :: #{threshold => pos_integer(), window_ms => pos_integer(), reset_ms => non_neg_integer(),
                  probes => pos_integer(), clock => module()}.
-type call_opts() :: #{is_failure => fun((term()) -> boolean())}.
-type clock_error() :: {clock_failed, term()}.
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
%% to close; `clock' `dspex_clock' (called once here: it must answer an
%% integer). `{error, {invalid_option, Key}}' for a bad value (nothing
%% changes).
-spec install(name(), opts()) -> ok | {error, {invalid_option, atom()} | clock_error()}.
install(Name, Opts) when is_map(Opts) ->
    span(install, Name, fun() ->
        case validate(Opts) of
            {ok, Full} -> gen_server:call(?SERVER, {install, Name, Full});
            Error -> Error
        end
    end).

%% @doc Checks breaker options as `install/2' does, installing nothing.
-spec check_opts(term()) -> ok | {error, {invalid_option, atom()}}.
check_opts(Opts) when is_map(Opts) ->
    case validate(Opts) of
        {ok, _} -> ok;
        Error -> Error
    end;
check_opts(_) -> {error, {invalid_option, breaker}}.

%% @doc Forgets the breaker. `{error, not_found}' if there is none.
-spec remove(name()) -> ok | {error, not_found}.
remove(Name) -> gen_server:call(?SERVER, {remove, Name}).

%% @doc `ok' when a call may go through now, `{error, circuit_open}' when not,
%% `{error, not_found}' for an unknown breaker. In `half_open' an `ok' is a
%% probe permit: report its result with `success/1' or `melt/1' from this
%% process (`call/2,3' does both for you); if this process dies first, the
%% probe counts as failed. No server call, except to take a probe permit.
-spec ask(name()) -> ok | {error, circuit_open | not_found | clock_error()}.
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
-spec call(name(), fun(() -> Result)) -> Result | {error, circuit_open | not_found | clock_error()}.
call(Name, Fun) -> call(Name, Fun, #{}).

%% @doc Runs `Fun' if the breaker lets it through and reports the outcome: a
%% failure is a result for which `is_failure' is true (default: `error' and
%% `{error, _}') or an exception (re-raised after it is counted). An
%% `is_failure' that raises, or answers anything but a boolean, also counts
%% as a failure and raises (`error({bad_is_failure, Answer})' for a
%% non-boolean): the outcome is reported in every case. Refused:
%% `{error, circuit_open}' at once.
-spec call(name(), fun(() -> Result), call_opts()) ->
          Result | {error, circuit_open | not_found | clock_error()}.
call(Name, Fun, Opts) when is_function(Fun, 0), is_map(Opts) ->
    IsFailure = maps:get(is_failure, Opts, fun default_failure/1),
    Start = erlang:monotonic_time(),
    case permit(Name) of
        {ok, Mode, Gen} -> run_permitted(Name, Mode, Gen, Fun, IsFailure, Start);
        {error, circuit_open} = E ->
            stop_event(call, Name, Start, #{result => rejected}),
            E;
        E -> E
    end.

%% Reports exactly once whatever happens in this process; the server covers
%% the one case left, this process dying meanwhile.
run_permitted(Name, Mode, Gen, Fun, IsFailure, Start) ->
    Done = fun(Outcome) ->
                   report(Name, Mode, Gen, Outcome),
                   stop_event(call, Name, Start, #{result => Outcome})
           end,
    Result = try Fun()
             catch Class:Reason:Stack ->
                     Done(failure),
                     erlang:raise(Class, Reason, Stack)
             end,
    try IsFailure(Result) of
        false -> Done(ok), Result;
        true -> Done(failure), Result;
        Other -> Done(failure), erlang:error({bad_is_failure, Other})
    catch Class2:Reason2:Stack2 ->
            Done(failure),
            erlang:raise(Class2, Reason2, Stack2)
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
-spec status(name()) -> {ok, #{state := state(), atom() => term()}} | {error, not_found | clock_error()}.
status(Name) ->
    try status_(Name)
    catch throw:{clock_failed, _} = Why -> {error, Why}
    end.

status_(Name) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, closed, _, _, _, _, Fs, #{window_ms := W, clock := C} = O}] ->
            Now = clock_ms(C),
            {ok, #{state => closed, failures => length([T || T <- Fs, Now - T < W]), opts => O}};
        [{_, open, _, Since, 0, _, _, #{reset_ms := R, clock := C} = O}] ->
            {ok, #{state => open, retry_in_ms => max(0, Since + R - clock_ms(C)), opts => O}};
        [{_, open, _, _, Issued, Oks, _, #{probes := K} = O}] ->
            {ok, #{state => half_open, probes_taken => min(Issued, K), probes_ok => Oks, opts => O}}
    end.

%%% Internals ------------------------------------------------------------------

%% {ok, closed | half_open, Gen} | {error, circuit_open | not_found | clock_error()}
permit(Name) ->
    try permit_(Name)
    catch throw:{clock_failed, _} = Why -> {error, Why}
    end.

permit_(Name) ->
    try ets:lookup_element(?T, Name, 2) of
        closed ->
            %% Gen may already be a later episode's: a failure reported
            %% against it counts in that episode, which is as good
            {ok, closed, ets:lookup_element(?T, Name, ?GEN)};
        open -> permit_open(Name)
    catch error:badarg -> {error, not_found}
    end.

%% Refusals are read from the table; a permit that may be free is asked of
%% the server, which hands it out and monitors its holder.
permit_open(Name) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, closed, Gen, _, _, _, _, _}] -> {ok, closed, Gen};
        [{_, open, _, _, Issued, _, _, #{probes := K}}] when Issued >= K -> {error, circuit_open};
        [{_, open, _, Since, _, _, _, #{reset_ms := R, clock := C}}] ->
            case clock_ms(C) - Since >= R of
                false -> {error, circuit_open};
                true ->
                    try gen_server:call(?SERVER, {probe, Name})
                    catch exit:{noproc, _} -> {error, not_found}
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
row(Name, Gen, #{clock := C} = Opts) -> {Name, closed, Gen, clock_ms(C), 0, 0, [], Opts}.

%% @private The clock's time. Throws `{clock_failed, Why}' when the clock
%% raises or answers anything but an integer: it is the caller's module, and
%% must fail only the call that used it.
-spec clock_ms(module()) -> integer().
clock_ms(C) ->
    try C:now_ms() of
        T when is_integer(T) -> T;
        Other -> throw({clock_failed, {not_integer, Other}})
    catch Class:Reason -> throw({clock_failed, {Class, Reason}})
    end.

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
                       andalso erlang:function_exported(V, now_ms, 0)
                       %% called once now, so a broken clock is refused here
                       andalso (try is_integer(clock_ms(V)) catch throw:{clock_failed, _} -> false end);
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
