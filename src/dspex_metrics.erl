%% @doc Native metrics: per metric name and tag set, a series of mergeable
%% quantile sketches (`c_src/core/sketch.c') in 1-second buckets rolled up into
%% minute and hour windows, kept for `metrics_retention_hours' (default 24).
%%
%% Counts, sums, minimum, maximum and mean are exact; quantiles are within 1%
%% relative error of the true sample at the same rank, also after `merge/2'
%% of sketches from several nodes. Recording is one ETS lookup plus one NIF
%% call that takes the series' own mutex; queries run on dirty schedulers.
%%
%% Times are whole seconds since the Unix epoch (`now' by default: the OS
%% clock, see `clock/0'). Tests and replays pass explicit times (`record/4',
%% `query/5'); a sample may be at most 5 seconds ahead of `clock/0'.
%%
%% Names and tags are checked for the Prometheus text format when a series
%% is created, and tags are normalised: keys and values become binaries
%% (atoms by name, numbers by their shortest text), so `#{r => a}' and
%% `#{r => <<"a">>}' are one series.
%%
%% Errors: `{error, {invalid_argument, What}}' (`metric', `tags', `value',
%% `time' (also: more than 5 s ahead of `clock/0'), `range', `aggregation'),
%% `{error, {name_conflict, Other}}' (a summary's `_sum'/`_count' sample name
%% would equal metric `Other''s name or vice versa),
%% `{error, {limit_exceeded, series}}'
%% (more than `metrics_max_series' distinct series, default 10 000),
%% `{error, rejected}' (a time older than every window retains as of
%% `clock/0' or the series' latest sample, whichever is later),
%% `{error, not_started}' (the application is not running),
%% `{error, invalid_sketch}', `{error, incompatible}' (merge).
-module(dspex_metrics).

-export([record/3, record/4, query/4, query/5, dashboard/0, dashboard/1,
         merge/2, summary/1, series/0, series/1, memory/0, clock/0, series_ref/2, all_series/0,
         dropped_samples/0, is_counter/1]).
-export([detailed/3, detailed/4]).

-type metric() :: atom() | binary() | [atom() | binary()].
-type tags() :: #{atom() | binary() => atom() | binary() | number()}.
-type sum() :: float() | infinity | neg_infinity.
-type time() :: integer() | now.
-type aggregation() :: count | sum | min | max | mean | p50 | p90 | p95 | p99
                     | {quantile, float()} | summary | sketch.
-type summary() :: #{count := non_neg_integer(), sum := sum(), min := float() | undefined,
                     max := float() | undefined, mean := float() | undefined,
                     p50 := float() | undefined, p90 := float() | undefined,
                     p95 := float() | undefined, p99 := float() | undefined}.
-export_type([metric/0, tags/0, aggregation/0, summary/0, sum/0]).

-define(TAB, dspex_metrics_series).
%% Which metric owns each sample name it exposes (see claim/1).
-define(NAMES, dspex_metrics_names).
%% The bridge's own series; every other `dspex_' name is reserved for the
%% exporter's built-in families (gauges, counters of the event log, regions,
%% the cache, ...).
-define(OWN, [<<"dspex_store_duration_us">>, <<"dspex_graph_duration_us">>, <<"dspex_events_total">>,
              <<"dspex_optimization_success">>]).
-define(INT64(I), (I >= -16#8000000000000000 andalso I =< 16#7fffffffffffffff)).

%% @equiv record(Metric, Value, Tags, #{})
-spec record(metric(), number(), tags()) -> ok | {error, term()}.
record(Metric, Value, Tags) -> record(Metric, Value, Tags, #{}).

%% @doc Records one sample of `Metric' with tag set `Tags'. Option `time':
%% the second it belongs to (default: now). A late sample goes into every
%% window that still retains its time; one older than all of them is
%% `{error, rejected}', one more than 5 s ahead of `clock/0'
%% `{error, {invalid_argument, time}}'. An integer value beyond 64 bits is
%% recorded as the nearest float.
-spec record(metric(), number(), tags(), #{time => time()}) -> ok | {error, term()}.
record(Metric, Value0, Tags, Opts) when is_map(Opts) ->
    Time = maps:get(time, Opts, now),
    case {value(Value0), Time =:= now orelse is_integer(Time)} of
        {error, _} -> {error, {invalid_argument, value}};
        {_, false} -> {error, {invalid_argument, time}};
        {{ok, Value}, true} ->
            case series_ref(Metric, Tags) of
                {ok, Ref} -> dspex_nif:metrics_record(Ref, Value, Time);
                Error -> Error
            end
    end.

%% The NIF takes floats and 64-bit integers.
value(V) when is_float(V) -> {ok, V};
value(V) when is_integer(V), ?INT64(V) -> {ok, V};
value(V) when is_integer(V) ->
    try {ok, float(V)} catch error:badarg -> error end; %% beyond the float range
value(_) -> error.

%% @equiv query(Metric, From, To, Aggregation, #{})
-spec query(metric() | {metric(), tags()}, integer(), integer(), aggregation()) ->
          {ok, term()} | {error, term()}.
query(Metric, From, To, Aggregation) -> query(Metric, From, To, Aggregation, #{}).

%% @doc Aggregates every sample of the inclusive second range `[From, To]'.
%% `Metric' alone merges all its tag sets; `{Metric, Tags}' only the series
%% whose tags include `Tags'. Each second is answered from the finest window
%% that still holds it (seconds for the last minute, minutes for the last
%% hour, hours up to the retention); a minute or hour bucket partly inside
%% the range counts in full. `now' (option, default the OS clock) moves the
%% windows forward as if that time had been reached.
%%
%% `count' is an integer; `sum', `min', `max', `mean', `p50'..`p99' and
%% `{quantile, Q}' floats (`undefined' when there is no sample); `summary'
%% all of them in a map; `sketch' the serialised sketch for `merge/2'.
-spec query(metric() | {metric(), tags()}, integer(), integer(), aggregation(), #{now => integer()}) ->
          {ok, term()} | {error, term()}.
query(Metric, From, To, Aggregation, Opts) when is_map(Opts) ->
    Now = maps:get(now, Opts, now),
    {Name0, Filter} = case Metric of
                          {N, F} when is_map(F) -> {N, F};
                          N -> {N, #{}}
                      end,
    case {metric_name(Name0), valid_aggregation(Aggregation)} of
        {error, _} -> {error, {invalid_argument, metric}};
        {_, false} -> {error, {invalid_argument, aggregation}};
        _ when not (is_integer(From) andalso is_integer(To) andalso From =< To) ->
            {error, {invalid_argument, range}};
        _ when not (Now =:= now orelse (is_integer(Now) andalso abs(Now) =< 1 bsl 62)) ->
            {error, {invalid_argument, time}};
        {{ok, Name}, true} ->
            case refs(Name, Filter) of
                error -> {error, {invalid_argument, tags}};
                Refs ->
                    case dspex_nif:metrics_query(Refs, From, To, Now) of
                        {ok, Sketch} -> {ok, aggregate(Sketch, Aggregation)};
                        {error, bad_range} -> {error, {invalid_argument, range}};
                        Error -> Error
                    end
            end
    end.

%% @equiv dashboard(#{})
-spec dashboard() -> map().
dashboard() -> dashboard(#{}).

%% @doc Operator figures (see {@link dspex_metrics_dashboard}); option `now'.
-spec dashboard(#{now => integer()}) -> map().
dashboard(Opts) when is_map(Opts) -> dspex_metrics_dashboard:build(Opts).

%% @doc Merges two serialised sketches (from `query(..., sketch)', possibly
%% of other nodes) into one: the sketch of the union of their samples, with
%% the same error bound. `{error, invalid_sketch}' for a malformed binary,
%% `{error, incompatible}' for different accuracies.
-spec merge(binary(), binary()) -> {ok, binary()} | {error, invalid_sketch | incompatible | enomem}.
merge(A, B) when is_binary(A), is_binary(B) ->
    case {dspex_nif:metrics_sketch_from_binary(A), dspex_nif:metrics_sketch_from_binary(B)} of
        {{ok, SA}, {ok, SB}} ->
            case dspex_nif:metrics_sketch_merge([SA, SB]) of
                {ok, S} -> {ok, dspex_nif:metrics_sketch_to_binary(S)};
                Error -> Error
            end;
        _ -> {error, invalid_sketch}
    end.

%% @doc The summary (count, sum, min, max, mean, p50, p90, p95, p99) of a
%% serialised sketch.
-spec summary(binary()) -> {ok, summary()} | {error, invalid_sketch}.
summary(Bin) when is_binary(Bin) ->
    case dspex_nif:metrics_sketch_from_binary(Bin) of
        {ok, S} -> {ok, dspex_nif:metrics_sketch_stats(S)};
        Error -> Error
    end.

%% @doc Every series as `{Name, Tags}' (`Name' and the tags are the
%% normalised binaries).
-spec series() -> [{binary(), #{binary() => binary()}}].
series() -> [K || {K, _} <- entries()].

%% @doc The series of one metric with their native handles (for exporters;
%% tags normalised).
-spec series(metric()) -> [{#{binary() => binary()}, term()}].
series(Metric) ->
    case metric_name(Metric) of
        {ok, Name} -> of_name(Name);
        error -> []
    end.

%% @doc Every series with its native handle, grouped by name (for exporters:
%% one pass over the table).
-spec all_series() -> [{binary(), [{#{binary() => binary()}, term()}]}].
all_series() ->
    Groups = lists:foldl(fun({{N, T}, R}, Acc) -> maps:update_with(N, fun(L) -> [{T, R} | L] end, [{T, R}], Acc) end,
                         #{}, entries()),
    lists:sort([{N, lists:sort(L)} || {N, L} <- maps:to_list(Groups)]).

%% @doc Bytes of native memory held by all series.
-spec memory() -> non_neg_integer().
memory() -> lists:sum([dspex_nif:metrics_series_memory(R) || {_, R} <- entries()]).

%% @doc Samples lost since the NIF was loaded, that nobody was told about:
%% a natively timed call or a handler's sample (time `now') that its series
%% refused, or that could not be buffered for lack of memory. A caller of
%% `record/3,4' is told with `{error, rejected}' instead and is not counted.
%% Also on the dashboard and as `dspex_metrics_dropped_samples_total'.
-spec dropped_samples() -> non_neg_integer().
dropped_samples() -> dspex_nif:metrics_dropped().

%% @doc The clock `now' means, in seconds since the epoch (the OS clock;
%% tests may freeze it with `dspex_nif:metrics_set_clock/1').
-spec clock() -> integer().
clock() -> dspex_nif:metrics_now().

%%% internals -----------------------------------------------------------------

%% @doc The native series of a name and tag set, created on first use (for
%% handlers that keep it and record with `dspex_nif:metrics_record/3'). Creation
%% races are settled by `ets:insert_new' (the loser uses the winner's series).
%% Tags are normalised first (see the module doc).
-spec series_ref(metric(), tags()) -> {ok, term()} | {error, term()}.
series_ref(Metric, Tags0) ->
    case {metric_name(Metric), norm_tags(Tags0)} of
        {error, _} -> {error, {invalid_argument, metric}};
        {_, error} -> {error, {invalid_argument, tags}};
        {{ok, Name}, {ok, Tags}} ->
            Key = {Name, Tags},
            try ets:lookup(?TAB, Key) of
                [{_, Ref}] -> {ok, Ref};
                [] -> create(Key)
            catch error:badarg -> {error, not_started}
            end
    end.

create({Name, _} = Key) ->
    Max = application:get_env(dspex_bridge, metrics_max_series, 10000),
    case ets:info(?TAB, size) >= Max of
        true -> {error, {limit_exceeded, series}};
        false ->
            case claim(Name) of
                ok ->
                    Hours = application:get_env(dspex_bridge, metrics_retention_hours, 24),
                    Ref = dspex_nif:metrics_series_new(Hours),
                    case ets:insert_new(?TAB, {Key, Ref}) of
                        true -> {ok, Ref};
                        false -> [{_, Won}] = ets:lookup(?TAB, Key), {ok, Won}
                    end;
                Error -> Error
            end
    end.

%% A summary `X' is exposed as the samples `X', `X_sum' and `X_count', a
%% counter (`_total') as itself: no two metrics may expose one sample name,
%% or the exposition would mix their samples. The names a metric exposes
%% are claimed together and atomically (`insert_new' of a list), so two
%% racing creators of `lat' and `lat_count' cannot both win.
claim(Name) ->
    case ets:lookup(?NAMES, Name) of
        [{_, Name}] -> ok;
        _ ->
            Exposed = exposed(Name),
            case ets:insert_new(?NAMES, [{E, Name} || E <- Exposed]) of
                true -> ok;
                false ->
                    case [O || E <- Exposed, {_, O} <- ets:lookup(?NAMES, E), O =/= Name] of
                        [] -> ok; %% a racing creator of the same name
                        [Other | _] -> {error, {name_conflict, Other}}
                    end
            end
    end.

exposed(Name) ->
    case is_counter(Name) of
        true -> [Name];
        false -> [Name, <<Name/binary, "_sum">>, <<Name/binary, "_count">>]
    end.

%% @doc Whether the exposition renders `Name' as a counter (its name ends in
%% `_total') rather than a summary.
-spec is_counter(binary()) -> boolean().
is_counter(Name) -> binary:longest_common_suffix([Name, <<"_total">>]) =:= 6.

entries() ->
    try ets:tab2list(?TAB) catch error:badarg -> [] end.

refs(Name, Filter0) ->
    case norm_tags(Filter0) of
        {ok, Filter} -> [R || {T, R} <- of_name(Name), maps:with(maps:keys(Filter), T) =:= Filter];
        error -> error
    end.

%% The set table cannot look up by half a key, but select copies out only
%% the matching series.
of_name(Name) ->
    try ets:select(?TAB, [{{{Name, '$1'}, '$2'}, [], [{{'$1', '$2'}}]}])
    catch error:badarg -> []
    end.

%% Names are normalised to one binary: `[dspex, store]' and `dspex_store'
%% are the same metric. Prometheus' name rule applies, and `dspex_' names
%% other than the bridge's own series are reserved for its built-in families.
metric_name(M) when is_atom(M) -> check_name(atom_to_binary(M));
metric_name(M) when is_binary(M) -> check_name(M);
metric_name([_ | _] = L) ->
    case lists:all(fun(P) -> is_atom(P) orelse is_binary(P) end, L) of
        true -> check_name(iolist_to_binary(lists:join(<<"_">>, [part(P) || P <- L])));
        false -> error
    end;
metric_name(_) -> error.

part(P) when is_atom(P) -> atom_to_binary(P);
part(P) -> P.

check_name(<<"dspex_", _/binary>> = B) ->
    case lists:member(B, ?OWN) of
        true -> {ok, B};
        false -> error
    end;
check_name(<<C, Rest/binary>> = B) when C =:= $_; C =:= $:; C >= $a, C =< $z; C >= $A, C =< $Z ->
    case name_chars(Rest, true) of
        true -> {ok, B};
        false -> error
    end;
check_name(_) -> error.

%% Colon is allowed in metric names only.
name_chars(<<>>, _) -> true;
name_chars(<<C, R/binary>>, Colon) when C =:= $_; C >= $a, C =< $z; C >= $A, C =< $Z; C >= $0, C =< $9 ->
    name_chars(R, Colon);
name_chars(<<$:, R/binary>>, true) -> name_chars(R, true);
name_chars(_, _) -> false.

%% Tags as the exposition will print them: binary keys that are valid label
%% names (not `__'-prefixed, which Prometheus reserves, and not `quantile',
%% which the summary adds) and UTF-8 binary values. Two keys that print the
%% same (`r' and `<<"r">>') are an error, not a silent merge.
norm_tags(T) when is_map(T), map_size(T) =< 16 ->
    try maps:fold(fun(K0, V0, Acc) ->
                          K = label_name(K0),
                          is_map_key(K, Acc) andalso throw(duplicate),
                          Acc#{K => label_value(V0)}
                  end, #{}, T) of
        Norm -> {ok, Norm}
    catch throw:_ -> error
    end;
norm_tags(_) -> error.

label_name(K) when is_atom(K) -> label_name(atom_to_binary(K));
label_name(<<"__", _/binary>>) -> throw(reserved);
label_name(<<"quantile">>) -> throw(reserved);
label_name(<<C, Rest/binary>> = K) when C =:= $_; C >= $a, C =< $z; C >= $A, C =< $Z ->
    case name_chars(Rest, false) of
        true -> K;
        false -> throw(label_name)
    end;
label_name(_) -> throw(label_name).

label_value(V) when is_atom(V) -> atom_to_binary(V);
label_value(V) when is_integer(V) -> integer_to_binary(V);
label_value(V) when is_float(V) -> float_to_binary(V, [short]);
label_value(V) when is_binary(V) ->
    case unicode:characters_to_binary(V) of
        V -> V;
        _ -> throw(utf8)
    end;
label_value(_) -> throw(label_value).

valid_aggregation(A) when A =:= count; A =:= sum; A =:= min; A =:= max; A =:= mean; A =:= p50;
                          A =:= p90; A =:= p95; A =:= p99; A =:= summary; A =:= sketch -> true;
valid_aggregation({quantile, Q}) when is_number(Q), Q >= 0, Q =< 1 -> true;
valid_aggregation(_) -> false.

aggregate(S, sketch) -> dspex_nif:metrics_sketch_to_binary(S);
aggregate(S, summary) -> dspex_nif:metrics_sketch_stats(S);
aggregate(S, {quantile, Q}) -> dspex_nif:metrics_sketch_quantile(S, Q);
aggregate(S, A) -> maps:get(A, dspex_nif:metrics_sketch_stats(S)).

%%% per-point series (debug console, issue #20) ------------------------------

%% @equiv detailed(Metric, From, To, #{})
-spec detailed(metric() | {metric(), tags()}, integer(), integer()) ->
          {ok, #{step := pos_integer(), points := [map()]}} | {error, term()}.
detailed(Metric, From, To) -> detailed(Metric, From, To, #{}).

%% @doc The series of `Metric' (or `{Metric, TagSubset}') over the inclusive
%% second range `[From, To]' as points for plotting: `#{step => Step, points
%% => [Point]}', one `Point' per `Step' seconds from `From' rounded down to a
%% multiple of `Step'; each is the `summary' aggregation (`count', `sum',
%% `min', `max', `mean', `p50', `p90', `p95', `p99') of its `Step' seconds
%% plus `t' (its first second). `Step' is the finest resolution the windows
%% still hold for `From': 1 within the last minute, 60 within the last hour,
%% 3600 beyond (a coarser bucket is never split into fake seconds). At most
%% 3600 points; a longer range is `{error, {invalid_argument, range}}'.
%% Option `now' as in `query/5'. Other errors as in `query/5'.
-spec detailed(metric() | {metric(), tags()}, integer(), integer(), #{now => integer()}) ->
          {ok, #{step := pos_integer(), points := [map()]}} | {error, term()}.
detailed(Metric, From, To, Opts) when is_map(Opts) ->
    Now = case maps:get(now, Opts, now) of
              now -> clock();
              N -> N
          end,
    {Name0, Filter} = case Metric of
                          {M, F} when is_map(F) -> {M, F};
                          M -> {M, #{}}
                      end,
    if
        not (is_integer(From) andalso is_integer(To) andalso From =< To) -> {error, {invalid_argument, range}};
        not (is_integer(Now) andalso abs(Now) =< 1 bsl 62) -> {error, {invalid_argument, time}};
        true ->
            Step = if Now - From < 60 -> 1; Now - From < 3600 -> 60; true -> 3600 end,
            Start = From - (From rem Step),
            case {metric_name(Name0), (To - Start) div Step + 1} of
                {error, _} -> {error, {invalid_argument, metric}};
                {_, Count} when Count > 3600 -> {error, {invalid_argument, range}};
                {{ok, Name}, Count} ->
                    case refs(Name, Filter) of
                        error -> {error, {invalid_argument, tags}};
                        Refs -> detailed_points(Refs, Start, Step, Count, Now)
                    end
            end
    end.

detailed_points(Refs, Start, Step, Count, Now) ->
    try [case dspex_nif:metrics_query(Refs, T, T + Step - 1, Now) of
                  {ok, S} -> (dspex_nif:metrics_sketch_stats(S))#{t => T};
                  {error, _} = E -> throw(E)
              end || T <- lists:seq(Start, Start + (Count - 1) * Step, Step)] of
        Points -> {ok, #{step => Step, points => Points}}
    catch
        throw:{error, bad_range} -> {error, {invalid_argument, range}};
        throw:{error, _} = E -> E
    end.
