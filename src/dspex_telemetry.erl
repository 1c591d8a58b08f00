%% @doc Telemetry events with the API of the `telemetry' library: when that
%% library is loaded, events go through it; otherwise through this module's own
%% handler table. Readers never call a server: handlers are kept in
%% `persistent_term' and read per event. A handler that crashes is detached and
%% the detachment is reported with `logger'.
%%
%% Besides the full handler list, each event name has its own
%% `persistent_term' entry with the handlers attached to it, so emitting is one
%% lookup whatever the number of handlers. That entry is keyed by an atom
%% (`key/1', e.g. `'dspex_telemetry/dspex.store.get.stop'') because hashing an atom is several
%% times cheaper than hashing the event list. Hot paths (the store) call
%% `handlers_at/1' with that atom first, measure the duration only when
%% someone listens, then call `emit/4'. `execute/3' finds an event's handlers
%% in one map of all attached events (a lookup by the event list, with no
%% atom made or exception raised for events nobody attached to). Handlers
%% attached while `telemetry' was not loaded stay in this table even if it is
%% loaded later.
-module(dspex_telemetry).

-export([attach/4, attach_many/4, detach/1, execute/3, span/3, list_handlers/1,
         handlers/1, handlers_at/1, key/1, emit/4]).

-type event_name() :: [atom(), ...].
-type handler_id() :: term().
-type handler_fun() :: fun((event_name(), map(), map(), term()) -> any()).
-export_type([event_name/0, handler_id/0]).

-define(KEY, {?MODULE, handlers}).
%% #{Event => handlers}: what execute/3 reads (no atom to make per event)
-define(BY_EVENT, {?MODULE, by_event}).
-define(EVKEY(Event), key(Event)).

%% @doc Calls `Fun(Event, Measurements, Metadata, Config)' for every execution
%% of `Event'. `{error, already_exists}' if the id is taken; `{error,
%% {invalid_event, Event}}' unless `Event' is a non-empty list of atoms
%% (nothing is attached then).
-spec attach(handler_id(), event_name(), handler_fun(), term()) ->
          ok | {error, already_exists | {invalid_event, term()}}.
attach(Id, Event, Fun, Config) -> attach_many(Id, [Event], Fun, Config).

%% @doc `attach/4' for several events with one handler id; every event is
%% checked before anything is attached.
-spec attach_many(handler_id(), [event_name()], handler_fun(), term()) ->
          ok | {error, already_exists | {invalid_event, term()}}.
attach_many(Id, Events, Fun, Config) when is_list(Events), is_function(Fun, 4) ->
    case [E || E <- Events, not valid_event(E)] of
        [] -> fast_path_changed(attach_many_(Id, Events, Fun, Config));
        [Bad | _] -> {error, {invalid_event, Bad}}
    end.

%% What key/1 and list_handlers/1 need of an event: a stored handler with
%% any other event would make them raise for every later caller.
valid_event([_ | _] = E) -> lists:all(fun erlang:is_atom/1, E);
valid_event(_) -> false.

attach_many_(Id, Events, Fun, Config) ->
    case telemetry_loaded() of
        true -> telemetry:attach_many(Id, Events, Fun, Config);
        false ->
            global:trans({?KEY, self()}, fun() ->
                Hs = handlers(),
                case lists:keymember(Id, 1, Hs) of
                    true -> {error, already_exists};
                    false ->
                        New = [{Id, Events, Fun, Config} | Hs],
                        PerEvent = [{?EVKEY(E), by_event(E, New)} || E <- lists:usort(Events)],
                        persistent_term:put(?KEY, New),
                        [persistent_term:put(K, L) || {K, L} <- PerEvent],
                        put_by_event(New)
                end
            end, [node()])
    end.

%% @doc Removes a handler from every event it was attached to.
-spec detach(handler_id()) -> ok | {error, not_found}.
detach(Id) -> fast_path_changed(detach_(Id)).

detach_(Id) ->
    case telemetry_loaded() of
        true -> telemetry:detach(Id);
        false ->
            global:trans({?KEY, self()}, fun() ->
                Hs = handlers(),
                case lists:keytake(Id, 1, Hs) of
                    {value, {_, Events, _, _}, Rest} ->
                        persistent_term:put(?KEY, Rest),
                        [case by_event(E, Rest) of
                             [] -> persistent_term:erase(?EVKEY(E));
                             L -> persistent_term:put(?EVKEY(E), L)
                         end || E <- lists:usort(Events)],
                        put_by_event(Rest);
                    false -> {error, not_found}
                end
            end, [node()])
    end.

%% The store's hottest calls skip the event machinery while nothing but the
%% native analytics listens: tell it whenever the handler set changes.
fast_path_changed(Result) ->
    ok = dspex_store:refresh_fast_path(),
    Result.

%% @doc Emits an event to every handler attached to it.
-spec execute(event_name(), map(), map()) -> ok.
execute(Event, Measurements, Metadata) -> emit(handlers(Event), Event, Measurements, Metadata).

%% @doc What `emit/4' needs to deliver `Event': `[]' when nobody listens (the
%% caller can then skip measuring), the handlers of this module's table, or
%% `telemetry' when the `telemetry' library is loaded (it looks its own
%% handlers up).
-spec handlers(event_name()) -> [{handler_id(), handler_fun(), term()}] | telemetry.
handlers(Event) ->
    case own_handlers(Event) of
        [] -> via_telemetry();
        Hs -> Hs
    end.

%% @doc `handlers/1' by the event's key (see `key/1'), for hot paths that
%% have the key as a literal.
-spec handlers_at(atom()) -> [{handler_id(), handler_fun(), term()}] | telemetry.
handlers_at(Key) ->
    case persistent_term:get(Key, []) of
        [] -> via_telemetry();
        Hs -> Hs
    end.

%% @doc The key of an event's handler entry: `dspex_telemetry/' and its names
%% joined with dots, as an atom (`[dspex, store, get, stop]' is
%% `'dspex_telemetry/dspex.store.get.stop'').
-spec key(event_name()) -> atom().
key(Event) -> binary_to_atom(key_text(Event)).

key_text(Event) -> iolist_to_binary(["dspex_telemetry/" | lists:join($., [atom_to_binary(A) || A <- Event])]).

via_telemetry() ->
    case telemetry_loaded() of
        true -> telemetry;
        false -> []
    end.

own_handlers(Event) -> maps:get(Event, persistent_term:get(?BY_EVENT, #{}), []).

put_by_event(Hs) ->
    Events = lists:usort([E || {_, Es, _, _} <- Hs, E <- Es]),
    persistent_term:put(?BY_EVENT, maps:from_list([{E, by_event(E, Hs)} || E <- Events])).

%% @doc Delivers an event to handlers obtained from `handlers/1' (same
%% semantics as `execute/3', without a second lookup).
-spec emit([{handler_id(), handler_fun(), term()}] | telemetry, event_name(), map(), map()) -> ok.
emit(telemetry, Event, Measurements, Metadata) ->
    telemetry:execute(Event, Measurements, Metadata);
emit([], _Event, _Measurements, _Metadata) ->
    ok;
emit([{Id, Fun, Config} | Rest], Event, Measurements, Metadata) ->
    try Fun(Event, Measurements, Metadata, Config)
    catch Class:Reason:Stack ->
            _ = detach(Id),
            logger:error("dspex_telemetry: handler ~p for ~p failed and was detached: ~p",
                         [Id, Event, {Class, Reason, Stack}])
    end,
    emit(Rest, Event, Measurements, Metadata).

%% @doc Runs `Fun' between `Prefix ++ [start]' and `Prefix ++ [stop]' (or
%% `[exception]') events, like `telemetry:span/3'; `Fun' returns
%% `{Result, StopMetadata}'. Durations are in native time units.
-spec span(event_name(), map(), fun(() -> {term(), map()})) -> term().
span(Prefix, Meta, Fun) ->
    Start = erlang:monotonic_time(),
    execute(Prefix ++ [start], #{monotonic_time => Start, system_time => erlang:system_time()}, Meta),
    try Fun() of
        {Result, StopMeta} ->
            Stop = erlang:monotonic_time(),
            execute(Prefix ++ [stop], #{duration => Stop - Start, monotonic_time => Stop}, StopMeta),
            Result
    catch Class:Reason:Stack ->
            Stop = erlang:monotonic_time(),
            execute(Prefix ++ [exception], #{duration => Stop - Start, monotonic_time => Stop},
                    Meta#{kind => Class, reason => Reason, stacktrace => Stack}),
            erlang:raise(Class, Reason, Stack)
    end.

%% @doc Handlers whose event starts with `Prefix', as `telemetry' reports them.
-spec list_handlers(event_name() | []) -> [map()].
list_handlers(Prefix) ->
    case telemetry_loaded() of
        true -> telemetry:list_handlers(Prefix);
        false ->
            [#{id => Id, event_name => E, function => F, config => C}
             || {Id, Events, F, C} <- handlers(), E <- Events, lists:prefix(Prefix, E)]
    end.

handlers() -> persistent_term:get(?KEY, []).

%% Handlers of one event, oldest attachment first (the order of execution).
by_event(Event, Hs) ->
    lists:reverse([{Id, F, C} || {Id, Events, F, C} <- Hs, lists:member(Event, Events)]).

telemetry_loaded() -> erlang:function_exported(telemetry, execute, 3).
