%% @doc The operator dashboard, computed from the analytics series (see
%% {@link dspex_metrics_handler}). Latencies are in microseconds; rates are
%% fractions in [0, 1], `undefined' when there was nothing to divide.
%%
%% `last_minute' (the 60 seconds ending now):
%% <ul>
%% <li>`reads', `writes': store reads (get, get_value, get_many) and writes
%%   (register, set, batch, delete, rollback);</li>
%% <li>`avg_read_latency_us', `avg_write_latency_us': their exact means;</li>
%% <li>`cache_hit_rate': the store is the variable cache of the Python
%%   workers, so a hit is a read that found its variable and a miss a read of a
%%   variable or session that does not exist: hits / (hits + misses);</li>
%% <li>`error_rate': store operations that returned any other error / all
%%   store operations.</li>
%% </ul>
%% `last_hour' (the 3600 seconds ending now; edge minutes count in full):
%% <ul>
%% <li>`operations': store operations; `p95_latency_us': their 95th percentile
%%   (1% relative error);</li>
%% <li>`active_sessions': live sessions now;</li>
%% <li>`optimization_success_rate': optimizations that ended by their own
%%   release or stop / all that ended (also preempted, expired, holder died).</li>
%% </ul>
%% `dropped_samples': samples the analytics lost since start (see
%% {@link dspex_metrics:dropped_samples/0}); non-zero means the figures above
%% undercount.
-module(dspex_metrics_dashboard).

-export([build/1]).

-define(STORE, dspex_store_duration_us).

%% @doc The dashboard map; option `now' (seconds since the epoch).
-spec build(#{now => integer()}) -> #{last_minute := map(), last_hour := map(),
                                      dropped_samples := non_neg_integer()}.
build(Opts) ->
    Now = case Opts of
              #{now := N} when is_integer(N) -> N;
              _ -> dspex_metrics:clock()
          end,
    Min = fun(Metric, Agg) -> q(Metric, Now - 59, Now, Agg) end,
    Hour = fun(Metric, Agg) -> q(Metric, Now - 3599, Now, Agg) end,
    Reads = Min({?STORE, #{kind => read}}, count),
    Hits = Min({?STORE, #{kind => read, result => ok}}, count),
    Misses = Min({?STORE, #{kind => read, result => miss}}, count),
    AllMin = Min(?STORE, count),
    ErrorsMin = Min({?STORE, #{result => error}}, count),
    #{last_minute =>
          #{reads => Reads,
            writes => Min({?STORE, #{kind => write}}, count),
            avg_read_latency_us => Min({?STORE, #{kind => read}}, mean),
            avg_write_latency_us => Min({?STORE, #{kind => write}}, mean),
            cache_hit_rate => ratio(Hits, Hits + Misses),
            error_rate => ratio(ErrorsMin, AllMin)},
      last_hour =>
          #{operations => Hour(?STORE, count),
            p95_latency_us => Hour(?STORE, p95),
            active_sessions => maps:get(sessions, dspex_nif:stats()),
            optimization_success_rate => Hour(dspex_optimization_success, mean)},
      dropped_samples => dspex_metrics:dropped_samples()}.

q(Metric, From, To, Agg) ->
    {ok, V} = dspex_metrics:query(Metric, From, To, Agg, #{now => To}),
    V.

ratio(_, 0) -> undefined;
ratio(A, B) -> A / B.
