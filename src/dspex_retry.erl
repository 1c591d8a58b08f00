%% @doc Bounded retries with exponential backoff and full jitter, optionally
%% through a circuit breaker, with an optional fallback to the last known
%% value for reads.
%%
%% Only idempotent work is retried: without `idempotent => true' the fun runs
%% once. Attempt `n' (n >= 1) that fails with a retryable result is followed
%% by a sleep drawn uniformly from `[0, min(max_ms, base_ms * 2^(n-1))]',
%% at most `attempts' runs in all. With `fallback => Key', every `{ok, V}' is
%% remembered under `Key', and when all attempts fail the last remembered
%% value is returned as `{stale, V, LastError}' (`LastError' unchanged when
%% there is none). Exceptions raised by the fun are not caught.
%%
%% Telemetry: `[dspex, retry, run, stop]' (`#{duration, attempts}',
%% `#{result => ok | error | stale, key}').
-module(dspex_retry).

-export([run/2, get/3, last_known/1, forget/1]).

-type result() :: {ok, term()} | {error, term()} | term().
-type opts() :: #{idempotent => boolean(), attempts => pos_integer(), base_ms => non_neg_integer(),
                  max_ms => non_neg_integer(), retry_on => fun((term()) -> boolean()),
                  breaker => dspex_breaker:name(), fallback => term(),
                  sleep => fun((non_neg_integer()) -> any())}.
-export_type([opts/0]).

-define(T, dspex_retry).

%% @doc Runs `Fun' with retries. Options (defaults): `idempotent' (false: one
%% attempt), `attempts' (3), `base_ms' (50), `max_ms' (2000), `retry_on'
%% (transient errors: `timeout', `overloaded', `flood', `no_pool',
%% `pool_stopped', `busy', `{worker_exit, _}', `{bad_reply, _}'; not
%% `circuit_open': an open breaker fails fast), `breaker' (each attempt runs
%% through `dspex_breaker:call/2'), `fallback' (a key, see the module doc),
%% `sleep' (how to wait; tests pass their own). `badarg' for bad options.
-spec run(fun(() -> result()), opts()) -> result() | {stale, term(), term()}.
run(Fun, Opts) when is_function(Fun, 0), is_map(Opts) ->
    O = options(Opts),
    Start = erlang:monotonic_time(),
    Attempt = case O of
                  #{breaker := B} -> fun() -> dspex_breaker:call(B, Fun) end;
                  _ -> Fun
              end,
    Max = case O of #{idempotent := true, attempts := A} -> A; _ -> 1 end,
    {Result, N} = attempt(Attempt, 1, Max, O),
    Final = case {Result, O} of
                {{ok, V}, #{fallback := Key}} ->
                    true = ets:insert(?T, {Key, V, erlang:system_time(millisecond)}),
                    Result;
                {{ok, _}, _} -> Result;
                {_, #{fallback := Key}} ->
                    case ets:lookup(?T, Key) of
                        [{_, V, _}] -> {stale, V, Result};
                        [] -> Result
                    end;
                _ -> Result
            end,
    dspex_telemetry:execute([dspex, retry, run, stop],
                            #{duration => erlang:monotonic_time() - Start, attempts => N},
                            #{result => tag(Final), key => maps:get(fallback, O, undefined)}),
    Final.

%% @doc `dspex_store:get/2' as an idempotent read, with `fallback' on by
%% default (key `{dspex_store, Session, Key}'): when the store cannot answer
%% (say the session is gone after a restart) the last value read is returned
%% as `{stale, Var, Error}'. Options as for `run/2'; store errors other than
%% `busy' are not retried unless `retry_on' says so.
-spec get(dspex_store:session_id(), dspex_store:var_key(), opts()) ->
          {ok, map()} | {error, term()} | {stale, map(), term()}.
get(Session, Key, Opts) ->
    Defaults = #{idempotent => true, fallback => {dspex_store, Session, Key}},
    run(fun() -> dspex_store:get(Session, Key) end, maps:merge(Defaults, Opts)).

%% @doc The value remembered under a fallback key, with the system time (ms)
%% it was stored at.
-spec last_known(term()) -> {ok, term(), integer()} | {error, not_found}.
last_known(Key) ->
    case ets:lookup(?T, Key) of
        [{_, V, At}] -> {ok, V, At};
        [] -> {error, not_found}
    end.

%% @doc Forgets the value remembered under a fallback key.
-spec forget(term()) -> ok.
forget(Key) -> true = ets:delete(?T, Key), ok.

%%% Internals ----------------------------------------------------------------------

attempt(Fun, N, Max, O) ->
    R = Fun(),
    case N < Max andalso (maps:get(retry_on, O))(R) of
        false -> {R, N};
        true ->
            (maps:get(sleep, O))(delay(N, O)),
            attempt(Fun, N + 1, Max, O)
    end.

%% Full jitter: uniform in [0, cap].
delay(N, #{base_ms := Base, max_ms := MaxMs}) ->
    Cap = min(MaxMs, Base * (1 bsl min(N - 1, 40))),
    rand:uniform(Cap + 1) - 1.

options(Opts) ->
    O = maps:merge(#{idempotent => false, attempts => 3, base_ms => 50, max_ms => 2000,
                     retry_on => fun transient/1, sleep => fun timer:sleep/1}, Opts),
    lists:all(fun valid/1, maps:to_list(O)) orelse error(badarg, [Opts]),
    O.

valid({idempotent, V}) -> is_boolean(V);
valid({attempts, V}) -> is_integer(V) andalso V > 0;
valid({K, V}) when K =:= base_ms; K =:= max_ms -> is_integer(V) andalso V >= 0;
valid({K, V}) when K =:= retry_on; K =:= sleep -> is_function(V, 1);
valid({breaker, _}) -> true;
valid({fallback, _}) -> true;
valid(_) -> false.

transient({error, E}) when E =:= timeout; E =:= overloaded; E =:= flood; E =:= no_pool;
                           E =:= pool_stopped; E =:= busy -> true;
transient({error, {worker_exit, _}}) -> true;
transient({error, {bad_reply, _}}) -> true;
transient(_) -> false.

tag({ok, _}) -> ok;
tag({stale, _, _}) -> stale;
tag(_) -> error.
