%% @doc `make bench' part for metrics: ingest rate against `ets:insert' into
%% an `ordered_set', p95 of 1M samples against `lists:sort' + `lists:nth', and
%% the overhead of telemetry with the analytics handlers on `dspex_store:get/2'.
-module(dspex_metrics_bench).
-export([main/0]).

-define(INGEST, 500000).
-define(P95_N, 1000000).
-define(GETS, 400000).

%% @doc Runs the three measures and prints them with their ratios.
-spec main() -> ok.
main() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    io:format("~ndspex_metrics benchmark~n"),
    {IngestNif, IngestApi} = ingest(),
    P95 = p95(),
    full_query(),
    Overhead = overhead(),
    io:format("~nmetrics summary:~n"),
    io:format("  ~-58s ~9.2fx  (report)~n", ["ingest, NIF record vs ets:insert ordered_set", IngestNif]),
    io:format("  ~-58s ~9.2fx  (report)~n", ["ingest, dspex_metrics:record/3 vs ets:insert ordered_set", IngestApi]),
    io:format("  ~-58s ~9.1fx  (target >= 50x)~n", ["p95 of 1M samples, sketch vs lists:sort + nth", P95]),
    io:format("  ~-58s ~8.1f%  (target < 25%)~n", ["telemetry + analytics handlers on get/2", Overhead]),
    ok.

%%% ingest ---------------------------------------------------------------------

ingest() ->
    Vals = list_to_tuple([rand:uniform() * 1000.0 || _ <- lists:seq(1, 1024)]),
    {ok, Ref} = dspex_metrics:series_ref(bench_ingest_nif, #{}),
    TNif = best(fun() -> nif_loop(Ref, Vals, ?INGEST) end),
    TApi = best(fun() -> api_loop(Vals, ?INGEST) end),
    TEts = best(fun() ->
                        T = ets:new(b, [ordered_set, public]),
                        ets_loop(T, Vals, ?INGEST),
                        ets:delete(T)
                end),
    io:format("  ingest of ~p samples: NIF ~.1f/s, record/3 ~.1f/s, ets:insert ordered_set ~.1f/s~n",
              [?INGEST, rate(TNif), rate(TApi), rate(TEts)]),
    {TEts / TNif, TEts / TApi}.

nif_loop(_, _, 0) -> ok;
nif_loop(Ref, Vals, N) ->
    ok = dspex_nif:metrics_record(Ref, element(N band 1023 + 1, Vals), now),
    nif_loop(Ref, Vals, N - 1).

api_loop(_, 0) -> ok;
api_loop(Vals, N) ->
    ok = dspex_metrics:record(bench_ingest_api, element(N band 1023 + 1, Vals), #{}),
    api_loop(Vals, N - 1).

%% the obvious alternative keeps every sample, keyed to stay unique
ets_loop(_, _, 0) -> ok;
ets_loop(T, Vals, N) ->
    true = ets:insert(T, {{element(N band 1023 + 1, Vals), N}}),
    ets_loop(T, Vals, N - 1).

rate(Us) -> ?INGEST / (Us / 1.0e6).

%%% p95 --------------------------------------------------------------------------

p95() ->
    Now = dspex_metrics:clock(),
    %% skewed latency-like data: log-normal
    Samples = [math:exp(rand:normal(5.0, 1.0)) || _ <- lists:seq(1, ?P95_N)],
    {ok, Ref} = dspex_metrics:series_ref(bench_p95, #{}),
    [ok = dspex_nif:metrics_record(Ref, V, Now) || V <- Samples],
    {TSketch, {ok, Est}} = timer:tc(fun() -> dspex_metrics:query(bench_p95, Now - 59, Now, p95, #{now => Now}) end),
    TSketchBest = best(fun() -> {ok, _} = dspex_metrics:query(bench_p95, Now - 59, Now, p95, #{now => Now}) end),
    {TSort, Exact} = timer:tc(fun() ->
                                      Sorted = lists:sort(Samples),
                                      lists:nth(trunc(0.95 * (?P95_N - 1)) + 1, Sorted)
                              end),
    io:format("  p95 of ~p samples: sketch ~p us (first ~p us) = ~.3f, lists:sort+nth ~p us = ~.3f (rel err ~.4f)~n",
              [?P95_N, TSketchBest, TSketch, Est, TSort, Exact, abs(Est - Exact) / Exact]),
    TSort / max(1, TSketchBest).

%% A query over a full day of a series touches every slot (60 seconds, 60
%% minutes, 24 hours); it holds the series mutex that long, so a recorder on
%% a normal scheduler can wait up to that much.
full_query() ->
    Now = dspex_metrics:clock(),
    {ok, Ref} = dspex_metrics:series_ref(bench_full_day, #{}),
    [ok = dspex_nif:metrics_record(Ref, math:exp(rand:normal(5.0, 2.0)), T)
     || T <- lists:seq(Now - 24 * 3600, Now, 5)],
    [ok = dspex_nif:metrics_record(Ref, math:exp(rand:normal(5.0, 2.0)), T)
     || T <- lists:seq(Now - 3599, Now), _ <- [1, 2, 3, 4, 5]],
    Us = best(fun() -> {ok, _} = dspex_nif:metrics_query([Ref], Now - 24 * 3600, Now, Now) end),
    io:format("  query of a full 24 h series (all 146 slots filled): ~p us, series memory ~p KiB~n",
              [Us, dspex_nif:metrics_series_memory(Ref) div 1024]).

%%% telemetry overhead on get ------------------------------------------------------

overhead() ->
    S = <<"metrics_bench">>,
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S, #{ttl => infinity}),
    {ok, _} = dspex_store:register(S, <<"p">>, float, 0.5, #{constraints => #{min => 0.0, max => 1.0}}),
    %% Telemetry handlers are attached once per configuration, then measured
    %% with the best of 5 after a warm-up run: rewriting persistent_terms makes
    %% every process scan its heap once, which is not the steady-state cost.
    Bare = fun() ->
                   %% nothing attached: the store emits nothing and measures nothing
                   ok = dspex_metrics_handler:detach_native(),
                   [ok = dspex_telemetry:detach(Id) || #{id := Id} <- dspex_telemetry:list_handlers([dspex, store, get])]
           end,
    Analytics = fun() -> _ = dspex_metrics_handler:attach(), ok end,
    %% alternate the configurations, best of each: the machine's noise hits both
    Rounds = [begin
                  Bare(),
                  TB = best(fun() -> get_loop(S, ?GETS) end),
                  ok = dspex_telemetry:attach(bench_noop, [dspex, store, get, stop], fun(_, _, _, _) -> ok end, []),
                  TN = best(fun() -> get_loop(S, ?GETS) end),
                  ok = dspex_telemetry:detach(bench_noop),
                  Analytics(),
                  TA = best(fun() -> get_loop(S, ?GETS) end),
                  {TB, TN, TA}
              end || _ <- lists:seq(1, 3)],
    TBare = lists:min([B || {B, _, _} <- Rounds]),
    TNoop = lists:min([N || {_, N, _} <- Rounds]),
    THandled = lists:min([A || {_, _, A} <- Rounds]),
    ok = dspex_store:delete_session(S),
    io:format("  get/2 x ~p: nothing attached ~.1f ns, a no-op telemetry handler ~.1f ns, "
              "analytics attached (timed in the NIF) ~.1f ns~n",
              [?GETS, TBare * 1000 / ?GETS, TNoop * 1000 / ?GETS, THandled * 1000 / ?GETS]),
    (THandled - TBare) * 100 / TBare.

get_loop(_, 0) -> ok;
get_loop(S, N) ->
    {ok, _} = dspex_store:get(S, <<"p">>),
    get_loop(S, N - 1).

best(F) -> lists:min([element(1, timer:tc(F)) || _ <- lists:seq(1, 5)]).
