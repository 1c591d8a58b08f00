%% @doc The analytics handlers: telemetry events of the bridge recorded into
%% native metric series. Each event has its own handler whose config already
%% holds the native series it writes to, so the hot path is one tuple
%% `element/2' and one NIF call: no message, no table lookup, no map built.
%%
%% Series (all values of duration series in microseconds):
%% <ul>
%% <li>`dspex_store_duration_us' `#{op, kind, result}': every store event;
%%   `kind' is `read' (get, get_value, get_many), `write' (register, set,
%%   batch, delete, rollback) or `watch'; `result' is `ok', `miss' (a read of
%%   a variable or session that does not exist) or `error'.</li>
%% <li>`dspex_graph_duration_us' `#{op, result}': add_dependency,
%%   remove_dependency, propagation.</li>
%% <li>`dspex_events_total' `#{event}' (value 1 per event): locks, access control,
%%   rate limits, propagation errors; `acl.check' also has `result'.</li>
%% <li>`dspex_optimization_success' (1 or 0 per ended optimization): 1 when
%%   the optimizer released its lock itself (`release/1', `stop/2'); 0 when it
%%   was preempted, its lease expired or its process died.</li>
%% </ul>
-module(dspex_metrics_handler).

-export([attach/0, attach_native/0, detach_native/0, store_event/4, graph_event/4, count_event/4, events/0]).

-define(READS, [get, get_value, get_many]).
%% Timed inside the NIF: a telemetry handler would cost more than the read
%% itself. Their handlers here still count events from other emitters; the
%% store's own events say `native_metrics => true' and are skipped (the store
%% emits nothing at all when this is the only handler).
-define(NATIVE, [get, get_value, set]).
-define(WRITES, [register, set, batch, delete, rollback]).
-define(COUNTED, [[dspex, locks, acquired], [dspex, locks, released], [dspex, locks, waited],
                  [dspex, locks, preempted], [dspex, locks, expired], [dspex, locks, progress],
                  [dspex, acl, check], [dspex, acl, denied], [dspex, acl, permissions_changed],
                  [dspex, rate_limit, exceeded], [dspex, graph, propagation, error]]).

%% @doc Every event the analytics handlers listen to.
-spec events() -> [dspex_telemetry:event_name()].
events() ->
    [[dspex, store, Op, stop] || Op <- ?READS ++ ?WRITES ++ [watch]]
        ++ [[dspex, graph, Op, stop] || Op <- [add_dependency, remove_dependency, propagation]]
        ++ ?COUNTED.

%% @doc Attaches one handler per event (ids `{dspex_metrics, Event}'), creating
%% the series they write to; returns the ids attached. `get' and `get_value'
%% calls are also timed by the NIF, which records into the same series
%% itself (`dspex_nif:metrics_native_bind/4').
-spec attach() -> [term()].
attach() ->
    Scale = 1.0e6 / erlang:convert_time_unit(1, second, native),
    ok = attach_native(),
    Store = [{[dspex, store, Op, stop], fun ?MODULE:store_event/4, store_config(Op, Scale)}
             || Op <- ?READS ++ ?WRITES ++ [watch]],
    Graph = [{[dspex, graph, Op, stop], fun ?MODULE:graph_event/4,
              {ref(dspex_graph_duration_us, #{op => Op, result => ok}),
               ref(dspex_graph_duration_us, #{op => Op, result => error}), Scale}}
             || Op <- [add_dependency, remove_dependency, propagation]],
    Counted = [{E, fun ?MODULE:count_event/4, count_config(E)} || E <- ?COUNTED],
    lists:map(fun({Event, Fun, Config}) ->
                      Id = {dspex_metrics, Event},
                      %% a restarted server replaces the handlers of its predecessor
                      _ = dspex_telemetry:detach(Id),
                      ok = dspex_telemetry:attach(Id, Event, Fun, Config),
                      Id
              end, Store ++ Graph ++ Counted).

store_config(Op, Scale) ->
    Kind = case lists:member(Op, ?READS) of
               true -> read;
               false when Op =:= watch -> watch;
               false -> write
           end,
    Ok = ref(dspex_store_duration_us, #{op => Op, kind => Kind, result => ok}),
    Err = ref(dspex_store_duration_us, #{op => Op, kind => Kind, result => error}),
    Miss = case Kind of
               read -> ref(dspex_store_duration_us, #{op => Op, kind => Kind, result => miss});
               _ -> Err
           end,
    {Ok, Miss, Err, Scale}.

count_config([dspex, acl, check] = E) ->
    Name = event_tag(E),
    {acl_check, ref(dspex_events_total, #{event => Name, result => ok}),
     ref(dspex_events_total, #{event => Name, result => error})};
count_config([dspex, locks, Ev] = E) when Ev =:= released; Ev =:= preempted; Ev =:= expired ->
    {optimization, ref(dspex_events_total, #{event => event_tag(E)}),
     ref(dspex_optimization_success, #{})};
count_config(E) ->
    {plain, ref(dspex_events_total, #{event => event_tag(E)})}.

event_tag([dspex | Rest]) -> iolist_to_binary(lists:join(<<".">>, [atom_to_binary(A) || A <- Rest])).

%% The handlers' own series are fixed and few: failing to create one is a bug.
ref(Name, Tags) ->
    case dspex_metrics:series_ref(Name, Tags) of
        {ok, Ref} -> Ref;
        Error -> erlang:error({metric_series, Name, Tags, Error})
    end.

%% @doc (Re)starts the native timing of `get', `get_value' and `set' into
%% their series (part of `attach/0'; no telemetry handler is touched).
-spec attach_native() -> ok.
attach_native() ->
    Scale = 1.0e6 / erlang:convert_time_unit(1, second, native),
    [begin
         {Ok, Miss, Err, _} = store_config(Op, Scale),
         ok = dspex_nif:metrics_native_bind(Op, Ok, Miss, Err)
     end || Op <- ?NATIVE],
    ok.

%% @doc Stops the native timing of `get', `get_value' and `set' (see `attach/0').
-spec detach_native() -> ok.
detach_native() ->
    [ok = dspex_nif:metrics_native_bind(Op, undefined, undefined, undefined) || Op <- ?NATIVE],
    ok.

%% @doc Handler of `[dspex, store, Op, stop]'.
-spec store_event(list(), map(), map(), tuple()) -> ok | {error, rejected}.
store_event(_Event, _M, #{native_metrics := true}, _Config) ->
    ok; %% the NIF has recorded this call already
store_event(_Event, #{duration := D}, #{result := ok}, {Ok, _, _, Scale}) ->
    dspex_nif:metrics_record(Ok, D * Scale, now);
store_event(_Event, #{duration := D}, #{error := Reason}, {_, Miss, Err, Scale}) ->
    Ref = case Reason of
              {not_found, _} -> Miss;
              session_not_found -> Miss;
              _ -> Err
          end,
    dspex_nif:metrics_record(Ref, D * Scale, now).

%% @doc Handler of `[dspex, graph, Op, stop]'.
-spec graph_event(list(), map(), map(), tuple()) -> ok | {error, rejected}.
graph_event(_Event, #{duration := D}, #{result := error}, {_, Err, Scale}) ->
    dspex_nif:metrics_record(Err, D * Scale, now);
graph_event(_Event, #{duration := D}, _Meta, {Ok, _, Scale}) ->
    dspex_nif:metrics_record(Ok, D * Scale, now).

%% @doc Handler of the counted events (locks, access control, rate limits).
-spec count_event(list(), map(), map(), tuple()) -> ok | {error, rejected}.
count_event(_Event, _M, _Meta, {plain, Ref}) ->
    dspex_nif:metrics_record(Ref, 1, now);
count_event(_Event, _M, Meta, {acl_check, Ok, Err}) ->
    dspex_nif:metrics_record(case Meta of #{result := ok} -> Ok; _ -> Err end, 1, now);
count_event([dspex, locks, Ev], _M, Meta, {optimization, Count, Success}) ->
    %% a refused sample is counted by the NIF (dropped_samples); crashing
    %% here would detach the handler and lose every later event
    _ = dspex_nif:metrics_record(Count, 1, now),
    Outcome = case {Ev, Meta} of
                  {released, #{reason := _}} -> 0;
                  {released, _} -> 1;
                  _ -> 0
              end,
    dspex_nif:metrics_record(Success, Outcome, now).
