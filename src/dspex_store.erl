%% @doc The per-session variable store.
%%
%% Sessions hold typed variables with constraints, versions, bounded history,
%% optimistic locking and watches. Every call here is one NIF call from the
%% calling process on a sharded native table: there is no server process on the
%% read or write path. Reads never take a lock another reader holds.
%%
%% == Identifiers ==
%% A session id is a binary. A variable is named by a binary (an ASCII atom is
%% accepted and means its text); `register/5' returns its id
%% `<<"var_", Name/binary, "_", N/binary>>'. Every function taking a `var_key()'
%% accepts the name or the id (the name wins if both could match).
%%
%% == Values ==
%% `float' (integers are stored as floats; `nan', `infinity', `neg_infinity'
%% allowed), `integer' (64-bit; a whole float is stored as an integer),
%% `string', `boolean', `choice' (one of `choices'), `module' (a module name as
%% a string), `embedding' (list of numbers, stored as floats), `tensor' (`#{shape => [N], data => [Number]}', data length equal to
%% the product of the shape). For `string', `choice' and `module' an ASCII atom
%% is accepted and means its text (`true' is then `<<"true">>'). An integer beyond
%% 64 bits given for a float, or in an embedding or tensor, is stored as the
%% nearest float (ties to even; beyond the float range it is refused).
%%
%% == Cluster ==
%% When a cluster is configured (see `dspex_cluster'), every call taking a
%% session id runs on the session's owner node and writes are replicated;
%% `watch/4' registers on the owner and delivers its changes to the watcher
%% on any node (see `dspex_cluster_watch': the watcher is told
%% `{dspex_watch_lost, Ref, Session}' when the owner goes away);
%% `list_sessions/0' stays local. Without configuration nothing changes.
%%
%% == Errors ==
%% All runtime failures are `{error, Reason}' with the reasons documented on
%% each function and in the README; a failed write changes nothing. A caller's
%% type error (a session id that is not a binary, options that are not a map)
%% raises `badarg'.
-module(dspex_store).

-export([refresh_fast_path/0]).
-export([create_session/1, create_session/2, get_session/1, list_sessions/0, touch/1,
         delete_session/1,
         register/4, register/5, get/2, get/3, get_value/2, get_value/3, exists/2, delete/2, delete/3,
         list/1, list/2, list/3, set/3, set/4, get_many/2, get_many/3, set_many/2, set_many/3,
         history/2, history/3, history/4, rollback/3, rollback/4, watch/3, watch/4, unwatch/1, info/2,
         export_session/1, import_session/1, limits/0, set_limits/1, types/0]).
-export([diagnostics/1, diagnostics_page/3]).
-export([get_value_mode/4, check_session_id/1, rate_limit/1]).
%% the propagator's writes of derived variables (dspex_propagator only)
-export([register_derived/5, set_derived/4]).

-export_type([session_id/0, var_key/0, var_type/0, value/0, var/0, session_info/0,
              set_opts/0, error_reason/0, cluster_error/0, history_entry/0]).

-type session_id() :: binary().
-type var_key() :: binary() | atom().
-type var_type() :: float | integer | string | boolean | choice | module | embedding | tensor.
-type value() :: number() | nan | infinity | neg_infinity | binary() | boolean() | atom()
               | [number()] | #{shape := [non_neg_integer()], data := [number()]}.
-type var() :: #{id := binary(), name := binary(), type := var_type(), value := value(),
                 constraints := map(), metadata := map(), version := non_neg_integer(),
                 created_at := integer(), updated_at := integer(),
                 derived => true, error => term()}.
%% `created_at'/`updated_at' are microseconds since the Unix epoch
%% (`erlang:system_time(microsecond)'). Derived variables (see
%% `dspex_graph:define_derived/6') also carry `derived => true' and `error'
%% (the last propagation error, or `undefined').
-type session_info() :: #{id := session_id(), metadata := map(),
                          ttl := non_neg_integer() | infinity, created_at := integer(),
                          last_accessed_at := integer(), variable_count := non_neg_integer()}.
-type set_opts() :: #{expected_version => non_neg_integer(), metadata => map(),
                      changed_by => term(), atom() => term()}.
-type history_entry() :: #{version := non_neg_integer(), value := value(),
                           updated_at := integer(), metadata := map(), changed_by := term()}.
-type limit() :: sessions | variables | value_size | name_length | history_limit | version.
-type error_reason() :: session_not_found
                      | {not_found, var_key()}
                      | {already_exists, binary()}
                      | {unknown_type, term()}
                      | {invalid_value, binary()}
                      | {invalid_constraints, binary()}
                      | {invalid_argument, atom()}
                      | {version_mismatch, non_neg_integer()}
                      | {version_not_found, integer()}
                      | {limit_exceeded, limit()}
                      | {duplicate_variable, var_key()}
                      | derived_variable
                      | {locked, term()}
                      | stale_lock
                      | access_denied
                      | rate_limited
                      | enomem
                      | cluster_error().
%% With a cluster (see `dspex_cluster'), any call on a session may also fail so.
-type cluster_error() :: no_quorum | {retry, atom()} | {unavailable, atom()}.

-include("dspex_routing.hrl").

%% versions stop at 2^63 - 1
-define(MAX_VERSION, 16#8000000000000000).
-define(TYPES, [float, integer, string, boolean, choice, module, embedding, tensor]).

%% Emits `[dspex, store, Op, stop]' around Call with `duration' (native
%% units) and `Meta' plus `result => ok | error' (and `error => Reason'),
%% measuring only when a handler listens. The handler entry is looked up by
%% its atom key `Key' (`dspex_telemetry:key([dspex, store, Op, stop])'), and the clock is
%% `os:perf_counter/0' (converted to native units): on Linux it costs a third
%% of `erlang:monotonic_time/0'. One use per function clause (the macro's
%% variables are not hygienic).
-define(TIMED(Op, Key, Meta, Call),
        case dspex_telemetry:handlers_at(Key) of
            [] -> Call;
            Hs__ -> ?TIMED_EMIT(Op, Hs__, Meta, Call)
        end).
%% Runs Call between two clock reads and emits its stop event to Hs.
-define(TIMED_EMIT(Op, Hs, Meta, Call),
        begin
            T0__ = os:perf_counter(),
            R__ = Call,
            D__ = erlang:convert_time_unit(os:perf_counter() - T0__, perf_counter, native),
            dspex_telemetry:emit(Hs, [dspex, store, Op, stop], #{duration => D__}, result_meta(R__, Meta)),
            R__
        end).

%% Inlined from dspex_telemetry:handlers_at/1 for the hottest calls.
-define(TELEMETRY_LOADED, erlang:function_exported(telemetry, execute, 3)).
%% The handler list of an event the native analytics alone listen to.
-define(ANALYTICS_ONLY, [{{dspex_metrics, _}, _, _}]).

%% get, get_value and set are timed inside the NIF for the analytics (see
%% dspex_metrics_handler): when theirs is the only handler nothing is done
%% here, and events sent for other handlers say `native_metrics => true' so
%% the analytics handler does not count them twice.
-define(TIMED_NATIVE(Op, Key, Meta, Call),
        case persistent_term:get(Key, []) of
            ?ANALYTICS_ONLY -> Call;
            [] -> case ?TELEMETRY_LOADED of
                      false -> Call;
                      true -> ?TIMED_EMIT(Op, telemetry, (Meta)#{native_metrics => true}, Call)
                  end;
            Hs0__ -> ?TIMED_EMIT(Op, Hs0__, (Meta)#{native_metrics => true}, Call)
        end).

%% @private
%% @doc Recomputes whether get, get_value and set may take their fast path: a
%% bare NIF call, with the native analytics as their only instrumentation. Not
%% when the calls must be routed to a session's owner (a cluster is
%% configured), or when a telemetry handler other than the analytics listens
%% to their events (or the `telemetry' application handles events). Called
%% whenever either changes (`dspex_telemetry' attach/detach, cluster
%% membership start/stop, application start).
-spec refresh_fast_path() -> ok.
refresh_fast_path() ->
    Routing = persistent_term:get(dspex_cluster_routing, false),
    Telemetry = ?TELEMETRY_LOADED,
    Only = fun(Key) ->
                   case persistent_term:get(Key, []) of
                       [] -> true;
                       ?ANALYTICS_ONLY -> true;
                       _ -> false
                   end
           end,
    [ok = dspex_nif:store_fast_path(Op, not Routing andalso not Telemetry andalso Only(Key))
     || {Op, Key} <- [{get, 'dspex_telemetry/dspex.store.get.stop'},
                      {get_value, 'dspex_telemetry/dspex.store.get_value.stop'},
                      {set, 'dspex_telemetry/dspex.store.set.stop'}]],
    %% the cluster's replication fast path (dspex_cluster_writer:fast_set/4) emits
    %% no set event of its own: it is taken only while nothing but the analytics listens
    Observed = Telemetry orelse not Only('dspex_telemetry/dspex.store.set.stop'),
    _ = persistent_term:get(dspex_store_set_observed, undefined) =:= Observed orelse
        persistent_term:put(dspex_store_set_observed, Observed),
    %% with a cluster whose default read is cached (dspex_cache), get/2 and
    %% get_value/2 answer from a fresh cached copy in the same NIF call
    Default = case {Routing, dspex_cache:read_defaults()} of
                  {true, {cached, Max}} -> Max;
                  {true, {strong, _}} -> strong;
                  _ -> off
              end,
    HitEvent = Telemetry orelse persistent_term:get('dspex_telemetry/dspex.cache.hit', []) =/= [],
    ok = dspex_nif:cache_config(Default, HitEvent).

%%% Sessions ----------------------------------------------------------------

%% @equiv create_session(Id, #{})
-spec create_session(session_id()) -> {ok, session_info()} | {error, error_reason()}.
create_session(Id) -> create_session(Id, #{}).

%% @doc Creates a session, or returns the existing one with that id (idempotent;
%% the options of an existing session are not changed).
%% Options: `ttl' seconds (default 3600, below 2^40 (else `{error,
%% {invalid_argument, ttl}}'), or `infinity'): a session not accessed
%% for that long is removed by the sweeper; every access refreshes it. It is
%% never removed earlier than `ttl' after its last access, and may live up to
%% about a second longer (accesses are recorded at most once a second).
%% `metadata': a map. `rate_limit => #{rate => PerSecond, burst => N}': see
%% `dspex_acl:set_rate_limit/3' (`Rate' >= 0, `Burst' >= 1, both numbers a
%% float can hold; else `{error, {invalid_argument, rate_limit}}'). A bad
%% option creates nothing. An id beginning with `<<0, "cache:">>' (the
%% cache's copies, `dspex_cache:cache_id/1') is `{error, {invalid_argument, name}}'.
-spec create_session(session_id(), #{ttl => non_neg_integer() | infinity, metadata => map(),
                                    rate_limit => #{rate := number(), burst := number()}}) ->
          {ok, session_info()} | {error, error_reason()}.
create_session(Id, Opts) when is_map(Opts) ->
    case dspex_cache:is_cache_id(Id) of
        %% the cache's private ids: such a session would be hidden and deleted
        true -> {error, {invalid_argument, name}};
        false -> dspex_events:durable(?ROUTED(Id, create_session, [Id, Opts], create_session_here(Id, Opts)),
                                      Opts) %% event log durability
    end.

create_session_here(Id, Opts) ->
    Ttl = maps:get(ttl, Opts, 3600),
    Meta = maps:get(metadata, Opts, #{}),
    Rate = maps:get(rate_limit, Opts, none),
    RateOk = Rate =:= none orelse is_tuple(rate_limit(Rate)),
    if
        not (Ttl =:= infinity orelse (is_integer(Ttl) andalso Ttl >= 0)) ->
            {error, {invalid_argument, ttl}};
        not is_map(Meta) ->
            {error, {invalid_argument, metadata}};
        not RateOk ->
            {error, {invalid_argument, rate_limit}};
        true ->
            _ = is_binary(Id) andalso dspex_events:seed(Id),
            case dspex_nif:session_create(Id, Meta, Ttl) of
                {ok, Info, New} when New =/= false ->
                    %% a new session under this id: whatever the propagator kept
                    %% of an earlier one belongs to that one; the lock server is
                    %% told only when the new one replaced an expired session not
                    %% yet swept (a deleted or swept one was announced then), so
                    %% creating a session costs it no scan of its locks
                    ok = dspex_propagator:stop(Id),
                    _ = New =:= replaced andalso dspex_locks:session_gone(Id, session_expired),
                    case Rate of
                        none -> {ok, Info};
                        _ ->
                            {R, B} = rate_limit(Rate),
                            case dspex_acl:set_rate_limit(Id, R, B) of
                                ok -> {ok, Info};
                                Error ->
                                    _ = delete_session(Id),
                                    Error
                            end
                    end;
                {ok, Info, false} -> {ok, Info};
                Error -> Error
            end
    end.

%% @doc Whether `Id' can name a new session, checked as `create_session/2'
%% does: `{error, {limit_exceeded, name_length}}' when empty or longer than
%% `max_name_length', `{error, {invalid_argument, name}}' when not UTF-8 or
%% a cache copy's private id (`dspex_cache:cache_id/1'). For callers that
%% record something per session id before any session exists.
-spec check_session_id(term()) -> ok | {error, {limit_exceeded, name_length} | {invalid_argument, name}}.
check_session_id(Id) when is_binary(Id) ->
    Max = maps:get(max_name_length, dspex_nif:get_limits()),
    case byte_size(Id) of
        N when N =:= 0; N > Max -> {error, {limit_exceeded, name_length}};
        _ ->
            case unicode:characters_to_binary(Id, utf8, utf8) =:= Id andalso not dspex_cache:is_cache_id(Id) of
                true -> ok;
                false -> {error, {invalid_argument, name}}
            end
    end;
check_session_id(_) -> {error, {invalid_argument, name}}.

%% @private `{Rate, Burst}' of a valid `rate_limit' (what dspex_acl:set_rate_limit/3
%% takes, as numbers a C double holds), else `error'.
-spec rate_limit(term()) -> {number(), number()} | error.
rate_limit(#{rate := R, burst := B} = M) when map_size(M) =:= 2, is_number(R), R >= 0, is_number(B), B >= 1 ->
    try {float(R), float(B)} of
        _ -> {R, B}
    catch error:badarg -> error
    end;
rate_limit(_) -> error.

%% @doc The session's information, or `{error, session_not_found}'.
%% `last_accessed_at' has one-second resolution (accesses refresh it at most
%% once a second, which keeps readers on different cores from contending).
-spec get_session(session_id()) -> {ok, session_info()} | {error, session_not_found | cluster_error()}.
get_session(Id) -> ?ROUTED(Id, get_session, [Id], dspex_nif:session_get(Id)).

%% @doc Ids of all live sessions (unordered).
-spec list_sessions() -> [session_id()].
list_sessions() -> [S || S <- dspex_nif:session_list(), not dspex_cache:is_cache_id(S)].

%% @doc Refreshes the session's TTL.
-spec touch(session_id()) -> ok | {error, session_not_found}.
touch(Id) -> ?ROUTED(Id, touch, [Id], dspex_nif:session_touch(Id)).

%% @doc Deletes the session and frees all its variables.
-spec delete_session(session_id()) -> ok | {error, session_not_found | cluster_error()}.
delete_session(Id) ->
    dspex_events:durable(?ROUTED(Id, delete_session, [Id], delete_session_here(Id)), #{}). %% the default durability

delete_session_here(Id) ->
    Result = dspex_nif:session_delete(Id),
    ok = dspex_propagator:stop(Id),
    _ = Result =:= ok andalso dspex_locks:session_gone(Id, session_deleted),
    Result.

%%% Variables ---------------------------------------------------------------

%% @equiv register(Session, Name, Type, Value, #{})
-spec register(session_id(), var_key(), var_type(), value()) -> {ok, binary()} | {error, error_reason()}.
register(Session, Name, Type, Value) -> register(Session, Name, Type, Value, #{}).

%% @doc Registers a new variable at version 0.
%% Options: `constraints' (map; per type: float/integer `min', `max'; string
%% `min_length', `max_length', `pattern' (POSIX extended regex, no back-references), `enum'; choice
%% `choices' (required); module `allowed_modules'; embedding `dimensions';
%% tensor `shape'), `metadata' (map), `description' (binary, kept in metadata),
%% `history_limit' (archived versions kept, default 50), `changed_by' (any term).
%% Errors: `{already_exists, Name}', `{unknown_type, T}', `{invalid_value, Msg}',
%% `{invalid_constraints, Msg}', `{limit_exceeded, L}', `session_not_found'.
%% Other keys are ignored (`derived' too: a derived variable is made by
%% `dspex_graph:define_derived/6' only, with the function that writes it).
-spec register(session_id(), var_key(), var_type(), value(), map()) ->
          {ok, binary()} | {error, error_reason()}.
register(Session, Name, Type, Value, Opts) when is_map(Opts) ->
    dspex_events:durable(?ROUTED(Session, register, [Session, Name, Type, Value, Opts],
                                 register_here(Session, Name, Type, Value, Opts, false)),
                         Opts). %% event log durability

%% @private `register/5' of a derived variable, which only `set_derived/4'
%% writes: for `dspex_propagator' (`dspex_graph:define_derived/6') only.
-spec register_derived(session_id(), var_key(), var_type(), value(), map()) ->
          {ok, binary()} | {error, error_reason()}.
register_derived(Session, Name, Type, Value, Opts) when is_map(Opts) ->
    dspex_events:durable(?ROUTED(Session, register_derived, [Session, Name, Type, Value, Opts],
                                 register_here(Session, Name, Type, Value, Opts, true)),
                         Opts). %% event log durability

register_here(Session, Name, Type, Value, Opts, Derived) ->
    Cons = maps:get(constraints, Opts, #{}),
    Meta0 = maps:get(metadata, Opts, #{}),
    HL = maps:get(history_limit, Opts, undefined),
    By = maps:get(changed_by, Opts, undefined),
    if
        not is_map(Cons) -> {error, {invalid_argument, constraints}};
        not is_map(Meta0) -> {error, {invalid_argument, metadata}};
        not (HL =:= undefined orelse (is_integer(HL) andalso HL >= 0)) ->
            {error, {invalid_argument, history_limit}};
        true ->
            Meta = case Opts of
                       #{description := D} -> Meta0#{description => D};
                       _ -> Meta0
                   end,
            ?TIMED(register, 'dspex_telemetry/dspex.store.register.stop', #{session => Session, variable => Name, type => Type},
                   dspex_nif:var_register(Session, Name, Type, Value, Cons, Meta, HL, By, Derived))
    end.

%% @doc The variable as a map (see `var()').
-spec get(session_id(), var_key()) -> {ok, var()} | {error, error_reason()}.
get(Session, Key) ->
    case dspex_nif:var_get(Session, Key) of
        slow ->
            case dspex_cache:read_defaults() of
                {owner, _} -> owner_get(Session, Key);
                {cached, Max} -> cached_get(Session, Key, Max);
                {strong, _} -> cached_get(Session, Key, strong)
            end;
        R -> var_map(R)
    end.

owner_get(Session, Key) ->
    ?ROUTED(Session, get, [Session, Key],
            ?TIMED_NATIVE(get, 'dspex_telemetry/dspex.store.get.stop', #{session => Session, variable => Key},
                          var_map(dspex_nif:var_get_here(Session, Key)))).

%% A read of this node's cached copy (see `dspex_cache'), or routed: one NIF
%% call answers from a fresh copy; `miss', `stale' or `copy' take
%% dspex_cache's slow path (fill, renewal, hit event).
cached_get(Session, Key, MaxStale) ->
    case dspex_nif:cache_get(Session, Key, MaxStale) of
        R when is_atom(R) ->
            dspex_cache:read(Session, MaxStale, R, fun(Id) -> var_map(dspex_nif:var_get_here(Id, Key)) end,
                             fun() -> owner_get(Session, Key) end);
        R -> var_map(R)
    end.

owner_get_value(Session, Key) ->
    ?ROUTED(Session, get_value, [Session, Key],
            ?TIMED_NATIVE(get_value, 'dspex_telemetry/dspex.store.get_value.stop', #{session => Session, variable => Key},
                          dspex_nif:var_get_value_here(Session, Key))).

%% `read' and `max_staleness_ms' taken out of the options of a read.
read_opts(Opts0) ->
    {Mode, O1} = case maps:take(read, Opts0) of
                     error -> {dspex_cache:mode(), Opts0};
                     T -> T
                 end,
    {Max, O2} = case maps:take(max_staleness_ms, O1) of
                    error -> {dspex_cache:max_staleness_ms(), O1};
                    T2 -> T2
                end,
    {Mode, Max, O2}.

%% @doc `get/2' on behalf of another session: `#{as => Principal, context =>
%% Map}' (see `dspex_acl'); `{error, access_denied}' without a `read' rule.
%% With a cluster, `read => owner | cached | strong' (default: the cluster's
%% `cache' `mode', itself `owner' by default) and `max_staleness_ms' (default
%% 100) choose how the read is served (see `dspex_cache'): `owner' routes it to
%% the session's owner; `cached' reads this node's cached copy of the session,
%% at most `max_staleness_ms' old; `strong' reads the copy only under a lease
%% from the owner (linearizable; only when strong reads are enabled). A read
%% with `as' is always routed: access rules are checked on the owner. A bad
%% `read' (or `strong' while disabled, with `as' too) is `{error,
%% {invalid_argument, read}}'; `max_staleness_ms' outside 0..86 400 000
%% (`dspex_cache:max_staleness_limit/0') `{error, {invalid_argument,
%% max_staleness_ms}}'.
-spec get(session_id(), var_key(), map()) -> {ok, var()} | {error, error_reason()}.
get(Session, Key, Opts0) when is_map_key(read, Opts0); is_map_key(max_staleness_ms, Opts0) ->
    Limit = dspex_cache:max_staleness_limit(),
    case read_opts(Opts0) of
        {Mode, _, _} when Mode =/= owner, Mode =/= cached, Mode =/= strong -> {error, {invalid_argument, read}};
        %% with `as' too: a disabled mode is refused, not read another way
        {strong, _, _} = R0 -> strong_get(Session, Key, R0, Limit);
        {_, Max, _} when not is_integer(Max); Max < 0; Max > Limit -> {error, {invalid_argument, max_staleness_ms}};
        {cached, Max, Opts} when map_size(Opts) =:= 0 -> mode_get(Session, Key, Max);
        {owner, _, Opts} when map_size(Opts) =:= 0 -> mode_get(Session, Key, owner);
        {_, _, Opts} -> get(Session, Key, Opts)
    end;
get(Session, Key, #{as := As} = Opts) when is_binary(As), map_size(Opts) =:= 1 ->
    %% the common case goes as a bare binary: the NIF skips the map lookups
    case dspex_nif:var_get(Session, Key, As) of
        slow -> ?ROUTED(Session, get, [Session, Key, Opts], get_here(Session, Key, Opts));
        R -> var_map(R)
    end;
get(Session, Key, Opts) ->
    case dspex_nif:var_get(Session, Key, Opts) of
        slow -> ?ROUTED(Session, get, [Session, Key, Opts], get_here(Session, Key, Opts));
        R -> var_map(R)
    end.

%% `read => strong': only when enabled; a read with `as' is routed (no copy).
strong_get(Session, Key, {strong, Max, Opts}, Limit) ->
    case dspex_cache:strong_enabled() of
        false -> {error, {invalid_argument, read}};
        true when not is_integer(Max); Max < 0; Max > Limit -> {error, {invalid_argument, max_staleness_ms}};
        true when map_size(Opts) =:= 0 -> mode_get(Session, Key, strong);
        true -> get(Session, Key, Opts)
    end.

%% A read in an explicit mode: without a cluster a local read (the NIF's own
%% fast path), else cached (at most `Max' ms old, or strong) or routed.
mode_get(Session, Key, Mode) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> get(Session, Key);
        true when Mode =:= owner -> owner_get(Session, Key);
        true -> cached_get(Session, Key, Mode)
    end.

get_here(Session, Key, #{as := As} = Opts) when is_binary(As), map_size(Opts) =:= 1 ->
    ?TIMED_NATIVE(get, 'dspex_telemetry/dspex.store.get.stop', #{session => Session, variable => Key, as => As},
           var_map(dspex_nif:var_get_here(Session, Key, As)));
get_here(Session, Key, Opts) ->
    ?TIMED_NATIVE(get, 'dspex_telemetry/dspex.store.get.stop', #{session => Session, variable => Key, as => maps:get(as, Opts, Session)},
           var_map(dspex_nif:var_get_here(Session, Key, Opts))).

%% The NIF answers a plain variable with a flat tagged tuple: this literal-key
%% map expression shares its key tuple, which the NIF cannot (it would allocate
%% and sort one per call). Derived variables come as `{ok, Map}' already.
var_map({var, Cons0, Created, Id, Meta, Name, Type, Updated, Value, Version}) ->
    Cons = case Cons0 of
               {min_max, Min, Max} -> #{min => Min, max => Max};
               _ -> Cons0
           end,
    {ok, #{id => Id, name => Name, type => Type, value => Value, constraints => Cons,
           metadata => Meta, version => Version, created_at => Created, updated_at => Updated}};
var_map(Other) ->
    Other.

%% @doc Only the current value.
-spec get_value(session_id(), var_key()) -> {ok, value()} | {error, error_reason()}.
get_value(Session, Key) ->
    case dspex_nif:var_get_value(Session, Key) of
        slow ->
            case dspex_cache:read_defaults() of
                {owner, _} -> owner_get_value(Session, Key);
                {cached, Max} -> cached_get_value(Session, Key, Max);
                {strong, _} -> cached_get_value(Session, Key, strong)
            end;
        R -> R
    end.

%% @private `get_value/2' in an explicit read mode (`dspex_cache:get_value/3').
-spec get_value_mode(session_id(), var_key(), owner | cached, non_neg_integer() | strong) -> {ok, value()} | {error, error_reason()}.
get_value_mode(Session, Key, Mode, MaxStale) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> get_value(Session, Key);   % no cluster: a local read
        true when Mode =:= cached -> cached_get_value(Session, Key, MaxStale);
        true -> owner_get_value(Session, Key)
    end.

cached_get_value(Session, Key, MaxStale) ->
    case dspex_nif:cache_get_value(Session, Key, MaxStale) of
        R when is_atom(R) ->
            dspex_cache:read(Session, MaxStale, R, fun(Id) -> dspex_nif:var_get_value_here(Id, Key) end,
                             fun() -> owner_get_value(Session, Key) end);
        R -> R
    end.

%% @doc The current value, or `Default' when the session or variable is missing.
-spec get_value(session_id(), var_key(), Default) -> value() | Default.
get_value(Session, Key, Default) ->
    case get_value(Session, Key) of
        {ok, V} -> V;
        {error, _} -> Default
    end.

%% @doc Whether the variable exists (false also for an unknown session).
-spec exists(session_id(), var_key()) -> boolean().
exists(Session, Key) ->
    case ?ROUTED(Session, exists, [Session, Key], dspex_nif:var_exists(Session, Key)) of
        {error, session_not_found} -> false;
        B -> B
    end.

%% @doc Deletes the variable, its history and its watches; with it goes its
%% derive function (a derived variable). A variable locked by an optimizer is
%% not deleted (`{error, {locked, Holder}}').
-spec delete(session_id(), var_key()) -> ok | {error, error_reason()}.
delete(Session, Key) ->
    dspex_events:durable(?ROUTED(Session, delete, [Session, Key],
                                 deleted(Session, Key,
                                         ?TIMED(delete, 'dspex_telemetry/dspex.store.delete.stop',
                                                #{session => Session, variable => Key},
                                                dspex_nif:var_delete(Session, Key)))),
                         #{}). %% the default durability

%% @doc `delete/2' on behalf of another session (`write' permission).
-spec delete(session_id(), var_key(), map()) -> ok | {error, error_reason()}.
delete(Session, Key, Opts) ->
    dspex_events:durable(?ROUTED(Session, delete, [Session, Key, Opts],
                                 deleted(Session, Key,
                                         ?TIMED(delete, 'dspex_telemetry/dspex.store.delete.stop',
                                                #{session => Session, variable => Key, as => maps:get(as, Opts, Session)},
                                                dspex_nif:var_delete(Session, Key, Opts)))),
                         Opts). %% event log durability

%% The store tells no process of a deletion (it ends the variable's watches
%% silently): the propagator of this node (the owner's) is told here, so that
%% no definition outlives its variable. A locked variable is never deleted.
deleted(Session, Key, ok) ->
    ok = dspex_propagator:deleted(Session, Key),
    ok;
deleted(_Session, _Key, Result) -> Result.

%% @doc All variables of the session, sorted by name.
-spec list(session_id()) -> {ok, [var()]} | {error, error_reason()}.
list(Session) -> ?ROUTED(Session, list, [Session], dspex_nif:var_list(Session, all)).

%% @doc Variables whose name matches a glob: `*' any run, `?' one character,
%% everything else literal.
-spec list(session_id(), binary()) -> {ok, [var()]} | {error, error_reason()}.
list(Session, Pattern) when is_binary(Pattern) ->
    ?ROUTED(Session, list, [Session, Pattern], dspex_nif:var_list(Session, Pattern)).

%% @doc `list/2' (Pattern `all' or a glob) on behalf of another session: only
%% the variables it may `read' are listed.
-spec list(session_id(), binary() | all, map()) -> {ok, [var()]} | {error, error_reason()}.
list(Session, Pattern, Opts) when is_binary(Pattern); Pattern =:= all ->
    ?ROUTED(Session, list, [Session, Pattern, Opts], dspex_nif:var_list(Session, Pattern, Opts)).

%% @equiv set(Session, Key, Value, #{})
-spec set(session_id(), var_key(), value()) -> {ok, non_neg_integer()} | {error, error_reason()}.
set(Session, Key, Value) -> set(Session, Key, Value, #{}).

%% @doc Commits a new value as version current+1.
%% Options: `expected_version' (optimistic locking: a mismatch returns
%% `{error, {version_mismatch, Current}}'), `metadata' (a map merged into the
%% variable's metadata), `changed_by' (recorded in history and watch events).
%% `lock => Lock' (from `dspex_locks:acquire/4'): required while the variable
%% is locked by an optimizer; a write without token is
%% `{error, {locked, Holder}}', one with a token that is not the current one
%% (released, expired or preempted) `{error, stale_lock}', also while another
%% optimizer holds the variable.
%% `propagate => sync': return only after derived dependents were recomputed
%% (see `dspex_graph:define_derived/6'; default: they are recomputed
%% asynchronously). Setting a derived variable is `{error, derived_variable}'
%% whatever the options (only its propagator writes it).
%% `durability => sync | async' (default: app env `event_durability', `async'):
%% with `sync' the call returns only once the change's event is fsynced in the
%% event log (`{error, {event_store, Reason}}' if that write failed; the change
%% itself is committed), see `dspex_events'.
%% Other keys are ignored; a bad option value is `{error, {invalid_argument, Key}}'.
%% Validation, the version check and the commit happen in one critical
%% section; a failed set changes nothing. Versions stop at 2^63 - 1: a set of
%% a variable there is `{error, {limit_exceeded, version}}' (never wraps).
-spec set(session_id(), var_key(), value(), set_opts()) ->
          {ok, non_neg_integer()} | {error, error_reason()}.
set(Session, Key, Value, #{propagate := sync} = Opts) -> set_routed(Session, Key, Value, Opts);
set(Session, Key, Value, Opts) ->
    %% the fast path's NIF also decides the event log's durability (dspex_events:settle/3): a write with
    %% nothing to wait for is done in one call
    case dspex_nif:var_set(Session, Key, Value, Opts) of
        slow -> dspex_events:durable(set_routed(Session, Key, Value, Opts), Opts); %% event log durability
        {event_wait, Mode, R, Wait} -> dspex_events:settle(Mode, R, Wait);
        R -> R
    end.

set_routed(Session, Key, Value, Opts) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> set_here(Session, Key, Value, Opts);
        true ->
            Result = dspex_cluster:route(Session, {?MODULE, set}, [Session, Key, Value, Opts],
                                         fun() -> set_here(Session, Key, Value, Opts) end),
            %% the owner's writer commits without waiting for the propagator
            %% (which writes through that writer); the caller waits here
            case {Result, Opts, get(dspex_cluster_local)} of
                {{ok, _}, #{propagate := sync}, Local} when is_binary(Session), Local =/= true ->
                    %% bounded: a late propagation is reported by its own event
                    _ = dspex_cluster:route(Session, {dspex_propagator, sync}, [Session],
                                            fun() -> dspex_propagator:sync(Session) end),
                    Result;
                _ -> Result
            end
    end.

set_here(Session, Key, Value, #{propagate := sync} = Opts) ->
    case set_timed(Session, Key, Value, Opts) of
        {ok, _} = Ok ->
            _ = get(dspex_cluster_local) =:= true orelse dspex_propagator:sync(Session),
            Ok;
        Error -> Error
    end;
set_here(Session, Key, Value, Opts) -> set_timed(Session, Key, Value, Opts).

set_timed(Session, Key, Value, Opts) ->
    ?TIMED_NATIVE(set, 'dspex_telemetry/dspex.store.set.stop', #{session => Session, variable => Key}, dspex_nif:var_set_here(Session, Key, Value, Opts)).

%% @private `set/4' of a derived variable, the one write it accepts: for
%% `dspex_propagator' only (a separate entry, so that no option of the public
%% writes lets a client write a derived variable). Routed, replicated and
%% timed as a set; `propagate' does not apply.
-spec set_derived(session_id(), var_key(), value(), set_opts()) ->
          {ok, non_neg_integer()} | {error, error_reason()}.
set_derived(Session, Key, Value, Opts) when is_map(Opts) ->
    dspex_events:durable(?ROUTED(Session, set_derived, [Session, Key, Value, Opts],
                                 ?TIMED_NATIVE(set, 'dspex_telemetry/dspex.store.set.stop',
                                               #{session => Session, variable => Key},
                                               dspex_nif:var_set_derived(Session, Key, Value, Opts))),
                         Opts). %% event log durability

%% @doc Several variables at once: `found' maps each found key (as given) to its
%% variable; `missing' lists the others in the order given.
-spec get_many(session_id(), [var_key()]) ->
          {ok, #{found := #{var_key() => var()}, missing := [var_key()]}} | {error, error_reason()}.
get_many(Session, Keys) when is_list(Keys) ->
    ?ROUTED(Session, get_many, [Session, Keys],
            ?TIMED(get_many, 'dspex_telemetry/dspex.store.get_many.stop', #{session => Session, variables => Keys},
                   dspex_nif:var_get_many(Session, Keys))).

%% @doc `get_many/2' on behalf of another session (`#{as, context}'): keys the
%% principal may not `read' are listed under `denied'.
-spec get_many(session_id(), [var_key()], map()) -> {ok, map()} | {error, error_reason()}.
get_many(Session, Keys, Opts) when is_list(Keys), is_map(Opts) ->
    ?ROUTED(Session, get_many, [Session, Keys, Opts],
            ?TIMED(get_many, 'dspex_telemetry/dspex.store.get_many.stop', #{session => Session, variables => Keys, as => maps:get(as, Opts, Session)},
                   dspex_nif:var_get_many(Session, Keys, Opts))).

%% @equiv set_many(Session, Updates, #{atomic => false})
-spec set_many(session_id(), map() | list()) -> {ok, map()} | {error, term()}.
set_many(Session, Updates) -> set_many(Session, Updates, #{}).

%% @doc Sets several variables. `Updates' is a map `Key => Value' or a list of
%% `{Key, Value}' / `{Key, Value, SetOpts}'. A variable named twice (by name,
%% atom or id) refuses the whole batch: `{error, {duplicate_variable, Key}}'.
%%
%% The call's `as' / `context' apply to every update, over any an update's
%% `SetOpts' give (an update's own apply only when the call gives none).
%%
%% `#{atomic => true}': all or nothing. Success is `{ok, #{Key => NewVersion}}';
%% failure `{error, {batch_failed, #{Key => Reason}}}' listing every failing
%% update, and nothing is committed.
%%
%% `#{atomic => false}' (default): each valid update commits;
%% `{ok, #{updated => #{Key => NewVersion}, errors => #{Key => Reason}}}'.
%% Readers may observe an atomic batch while it commits (no snapshot isolation
%% across variables); writers cannot interleave with it.
-spec set_many(session_id(), map() | list(), #{atomic => boolean()}) -> {ok, map()} | {error, term()}.
set_many(Session, Updates, Opts) when is_map(Opts) ->
    dspex_events:durable(?ROUTED(Session, set_many, [Session, Updates, Opts], set_many_here(Session, Updates, Opts)),
                         Opts). %% event log durability

set_many_here(Session, Updates, Opts) ->
    Atomic = maps:get(atomic, Opts, false) =:= true,
    %% `as' and `context' of the call apply to every update and win over an
    %% update's own: an update cannot act as someone the call does not
    Who = maps:with([as, context], Opts),
    Norm = [{K, V, maps:merge(O, Who)} || {K, V, O} <- normalize_updates(Updates)],
    ?TIMED(batch, 'dspex_telemetry/dspex.store.batch.stop', #{session => Session, variables => [K || {K, _, _} <- Norm], atomic => Atomic},
           dspex_nif:var_set_many(Session, Norm, Atomic)).

normalize_updates(M) when is_map(M) -> [{K, V, #{}} || {K, V} <- maps:to_list(M)];
normalize_updates(L) when is_list(L) ->
    [case U of
         {K, V} -> {K, V, #{}};
         {_, _, _} -> U;
         _ -> erlang:error(badarg)
     end || U <- L].

%% @equiv history(Session, Key, all)
-spec history(session_id(), var_key()) -> {ok, [history_entry()]} | {error, error_reason()}.
history(Session, Key) -> history(Session, Key, all).

%% @doc Archived versions (not the current one), newest first, at most `Limit'.
%% Each set archives the version it replaces; at most `history_limit' are kept.
-spec history(session_id(), var_key(), non_neg_integer() | all) ->
          {ok, [history_entry()]} | {error, error_reason()}.
history(Session, Key, Limit) ->
    ?ROUTED(Session, history, [Session, Key, Limit], dspex_nif:var_history(Session, Key, Limit)).

%% @doc `history/3' on behalf of another session (`read' permission).
-spec history(session_id(), var_key(), non_neg_integer() | all, map()) ->
          {ok, [history_entry()]} | {error, error_reason()}.
history(Session, Key, Limit, Opts) ->
    ?ROUTED(Session, history, [Session, Key, Limit, Opts], dspex_nif:var_history(Session, Key, Limit, Opts)).

%% @equiv rollback(Session, Key, Version, #{})
-spec rollback(session_id(), var_key(), integer()) ->
          {ok, non_neg_integer()} | {error, error_reason()}.
rollback(Session, Key, Version) -> rollback(Session, Key, Version, #{}).

%% @doc Makes the value (and metadata) of an earlier version current again, as a
%% NEW version. A version no longer (or never) in history is `{error,
%% {version_not_found, V}}', also any integer below 0 or at 2^63 and above.
%% Accepts the options of `set/4'; a `metadata' option is merged into the
%% metadata of the version brought back. Rolling back to the current version
%% commits its value again as a new version.
-spec rollback(session_id(), var_key(), integer(), set_opts()) ->
          {ok, non_neg_integer()} | {error, error_reason()}.
rollback(_Session, _Key, Version, _Opts) when is_integer(Version), (Version < 0 orelse Version >= ?MAX_VERSION) ->
    %% no version is negative or at 2^63 and above: never in history (the NIF
    %% takes only unsigned 64-bit integers)
    {error, {version_not_found, Version}};
rollback(Session, Key, Version, Opts) ->
    dspex_events:durable(?ROUTED(Session, rollback, [Session, Key, Version, Opts],
                                 ?TIMED(rollback, 'dspex_telemetry/dspex.store.rollback.stop',
                                        #{session => Session, variable => Key, to_version => Version},
                                        dspex_nif:var_rollback(Session, Key, Version, Opts))),
                         Opts). %% event log durability

%% @equiv watch(Session, Keys, Pid, #{})
-spec watch(session_id(), [var_key()], pid()) -> reference() | {error, error_reason()}.
watch(Session, Keys, Pid) -> watch(Session, Keys, Pid, #{}).

%% @doc Subscribes `Pid' to every committed change of the variables. Each commit
%% sends `{dspex_variable, Ref, Session, Name, OldValue, NewValue, Meta}' where
%% `Meta' is `#{version, previous_version, updated_at, changed_by, metadata}'.
%% Messages of one variable arrive in commit order. They are built and sent
%% after the commit, outside its lock (from a dirty scheduler when big): when
%% two processes write the variable at once, the message of one write may be
%% sent by the other writer just after the first `set' returned, and a
%% message already queued when `unwatch/1' runs may still arrive. The watch ends with
%% `unwatch/1', when `Pid' dies, or when the variable is deleted. Returns `Ref'
%% (an opaque reference-like term). A variable named twice is watched once; an
%% empty list is `{error, {invalid_argument, variables}}'. With a cluster the
%% watch is made on the session's owner and may also end with
%% `{dspex_watch_lost, Ref, Session}' (see `dspex_cluster_watch').
-spec watch(session_id(), [var_key()], pid(), map()) -> reference() | {error, error_reason()}.
watch(_Session, [], _Pid, _Opts) ->
    {error, {invalid_argument, variables}};
watch(Session, Keys, Pid, Opts) when is_list(Keys), is_pid(Pid), is_map(Opts) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> watch_here(Session, Keys, Pid, Opts);
        true -> dspex_cluster_watch:watch(Session, Keys, Pid, Opts, fun() -> watch_here(Session, Keys, Pid, Opts) end)
    end.

watch_here(Session, Keys, Pid, Opts) ->
    case ?TIMED(watch, 'dspex_telemetry/dspex.store.watch.stop', #{session => Session, variables => Keys, pid => Pid},
                dspex_nif:watch(Session, Keys, Pid, Opts)) of
        {ok, Ref} -> Ref;
        Error -> Error
    end.

%% @doc Operational facts about a variable: `watchers' (active watches),
%% `history_size' (archived versions held), `history_limit', and the current
%% version's `version' and `changed_by' (who wrote it: the `changed_by' of
%% that write, `undefined' when it gave none).
-spec info(session_id(), var_key()) ->
          {ok, #{watchers := non_neg_integer(), history_size := non_neg_integer(),
                 history_limit := non_neg_integer(), version := non_neg_integer(),
                 changed_by := term()}} | {error, error_reason()}.
info(Session, Key) -> ?ROUTED(Session, info, [Session, Key], dspex_nif:var_info(Session, Key)).

%% @doc Ends a watch (idempotent).
-spec unwatch(reference()) -> ok.
unwatch(Ref) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> dspex_nif:unwatch(Ref);
        true -> dspex_cluster_watch:unwatch(Ref)
    end.

%% @doc The whole session as one term: every variable with its value,
%% constraints, metadata, version, timestamps and history (format
%% `dspex_session_v1'), with the session's `dependencies', `permissions',
%% `derived_functions' and, when one is set, its `rate_limit'
%% (`#{rate, burst}'). Taken under all the session's shard locks, so it is a
%% consistent cut. Runs on a dirty scheduler.
-spec export_session(session_id()) -> {ok, map()} | {error, error_reason()}.
export_session(Id) -> ?ROUTED(Id, export_session, [Id], export_session_here(Id)).

export_session_here(Id) ->
    case dspex_nif:export_session(Id) of
        {ok, #{variables := Vars} = E} ->
            %% the graph, the access rules, the derive functions and the rate limit travel too
            {ok, #{edges := Edges}} = dspex_graph:to_map_here(Id),
            Perms = maps:from_list([{N, R} || #{name := N} <- Vars,
                                              {ok, R} <- [dspex_acl:get_permissions(Id, N)], R =/= []]),
            %% only functions of variables of the cut that are derived: a
            %% definition the propagator has not dropped yet is not exported
            Derived = [N || #{name := N, derived := true} <- Vars],
            Defs = [D || {N, _, _} = D <- dspex_propagator:definitions(Id), lists:member(N, Derived)],
            E1 = E#{dependencies => [{F, T, Ty} || #{from := F, to := T, type := Ty} <- Edges],
                    permissions => Perms,
                    derived_functions => Defs},
            case dspex_nif:session_get_rate(Id) of
                {ok, #{rate := R, burst := B}} when R > 0 -> {ok, E1#{rate_limit => #{rate => R, burst => B}}};
                _ -> {ok, E1}
            end;
        Error -> Error
    end.

%% @doc Recreates an exported session exactly (ids, versions, history,
%% dependencies, access rules, derived variables and their functions, rate
%% limit: the token bucket starts full). Every value is validated again, the
%% session id and variable names as `create_session/2' and `register/5' check
%% them (with their errors), and the extras (`dependencies', `permissions',
%% `derived_functions', `rate_limit', each optional) before anything is
%% created. A variable id must be `var_<Name>_<Digits>' for its name (what
%% `register/5' gives; an id lookup resolves the name from it) and versions
%% below 2^63. A malformed or invalid export is `{error, {invalid_export,
%% Message}}' and leaves no session. `{error, {already_exists, Id}}' if the id
%% is taken.
-spec import_session(map()) -> ok | {error, term()}.
import_session(#{id := Id} = Export) ->
    case dspex_cache:is_cache_id(Id) of
        true -> {error, {invalid_argument, name}};   % as create_session/2
        false -> ?ROUTED(Id, import_session, [Export], import_session_here(Id, Export))
    end;
import_session(Export) when is_map(Export) -> dspex_nif:import_session(Export).

import_session_here(Id, Export) ->
    case check_extras(Export) of
        ok ->
            _ = is_binary(Id) andalso dspex_events:seed(Id),
            case dspex_nif:import_session(Export) of
                ok ->
                    %% a new session under this id (see create_session_here/2)
                    ok = dspex_propagator:stop(Id),
                    ok = dspex_locks:session_gone(Id, session_deleted),
                    restore_extras(Id, Export);
                Error -> Error
            end;
        {error, Msg} -> {error, {invalid_export, Msg}}
    end.

%% The extras the NIF does not import, checked before it does: their shape,
%% and that they name variables of the export. What only the restore can
%% tell (a cycle, a rule the store refuses) still deletes the session again.
check_extras(Export) ->
    Vars = case maps:get(variables, Export, []) of
               L when is_list(L) -> L;
               _ -> []
           end,
    Names = [N || #{name := N} <- Vars],
    Known = fun(K) -> lists:member(key_bin(K), Names) orelse
                          lists:any(fun(#{id := I}) -> I =:= K; (_) -> false end, Vars)
            end,
    Derived = [N || #{name := N, derived := true} <- Vars],
    Checks = [{<<"dependencies must be a list of {From, To, Type} of variables of the export">>,
               fun() -> all(fun({F, T, Ty}) -> Known(F) andalso Known(T) andalso is_atom(Ty);
                               (_) -> false
                            end, maps:get(dependencies, Export, []))
               end},
              {<<"permissions must map variables of the export to valid rules">>,
               fun() -> case maps:get(permissions, Export, #{}) of
                            P when is_map(P) ->
                                lists:all(fun({N, R}) -> Known(N) andalso dspex_acl:validate_rules(R) =:= ok end,
                                          maps:to_list(P));
                            _ -> false
                        end
               end},
              {<<"derived_functions must be a list of {Name, Inputs, Fun} of derived variables of the export">>,
               fun() -> all(fun(D) -> dspex_propagator:valid_definition(D) andalso
                                          lists:member(key_bin(element(1, D)), Derived)
                            end, maps:get(derived_functions, Export, []))
               end},
              {<<"rate_limit must be #{rate => Rate >= 0, burst => Burst >= 1}">>,
               fun() -> case maps:get(rate_limit, Export, none) of
                            none -> true;
                            RL -> is_tuple(rate_limit(RL))
                        end
               end}],
    case [Msg || {Msg, Check} <- Checks, not Check()] of
        [] -> ok;
        [Msg | _] -> {error, Msg}
    end.

%% lists:all/2 of a proper list; false for anything else.
all(Pred, [H | T]) -> Pred(H) andalso all(Pred, T);
all(_, []) -> true;
all(_, _) -> false.

key_bin(K) when is_binary(K) -> K;
key_bin(K) when is_atom(K) -> atom_to_binary(K, utf8);
key_bin(_) -> undefined.

%% Edges, rules, derive functions and the rate limit, on the freshly
%% imported session; a failure deletes it again.
restore_extras(Id, Export) ->
    Rate = case maps:get(rate_limit, Export, none) of
               none -> [];
               RL -> {R, B} = rate_limit(RL), [dspex_acl:set_rate_limit(Id, R, B)]
           end,
    Steps = [dspex_graph:add_dependency(Id, F, T, Ty) || {F, T, Ty} <- maps:get(dependencies, Export, [])]
        ++ [dspex_acl:set_permissions(Id, N, R) || {N, R} <- maps:to_list(maps:get(permissions, Export, #{}))]
        ++ [dspex_propagator:adopt(Id, maps:get(derived_functions, Export, []))]
        ++ Rate,
    case [E || {error, _} = E <- Steps] of
        [] -> ok;
        [First | _] ->
            _ = delete_session(Id),
            {error, {invalid_export, First}}
    end.

%% @doc The limits in force: `max_sessions', `max_variables' (per session),
%% `max_value_bytes' (payload of one value, default 16 MiB), `max_name_length'
%% (bytes, for names and session ids), `max_history', `default_history'.
-spec limits() -> #{atom() => non_neg_integer()}.
limits() -> dspex_nif:get_limits().

%% @doc Changes limits (keys as in `limits/0'); applies to later operations.
-spec set_limits(#{atom() => non_neg_integer()}) -> ok.
set_limits(Map) when is_map(Map) -> dspex_nif:set_limits(Map).

result_meta({error, Reason}, Meta) -> Meta#{result => error, error => Reason};
result_meta(_, Meta) -> Meta#{result => ok}.

%% @doc The variable types.
-spec types() -> [var_type()].
types() -> ?TYPES.

%%% diagnostics (debug console, issue #20) -----------------------------------

%% @doc Operational facts about a session, for operators and the debug
%% console (`dspex_console'). Read-only: it does not refresh the TTL.
%% Returns `{ok, Map}' with:
%% `session' (the id), `metadata', `variables' (count), `bytes' (the
%% external-term size of the current values: the payload held, not native
%% memory), `history_entries' (archived versions held), `watchers' (active
%% watches summed over the variables), `watched' (`#{Name => Count}' of the
%% watched variables), `locks' (this node's held locks on the session:
%% `dspex_locks:active/0' rows), `rules' (`#{Name => Rules}' of the
%% variables that have access rules), `last_writes' (the ten most recently
%% updated variables, newest first: `#{name, version, updated_at,
%% changed_by}'), `changed_by' (`#{Name => ChangedBy}': who wrote each
%% variable's current version, see `info/2'), `errors' (`#{Name => Reason}' of derived variables whose
%% last propagation failed), `ttl' (seconds or `infinity'), `ttl_left_ms'
%% (or `infinity'), `created_at', `last_accessed_at' and `cluster':
%% `not_clustered', or `#{owner => Node | none, replicas => N, replication
%% => Mode, node => ThisNode}' (the owner under this node's view and the
%% configured replica count). `{error, session_not_found}' for an unknown
%% session.
-spec diagnostics(session_id()) -> {ok, map()} | {error, error_reason()}.
diagnostics(Session) when is_binary(Session) ->
    case dspex_nif:session_get(Session) of
        {ok, Info} ->
            case dspex_nif:var_list(Session, all) of
                {ok, Vars} -> {ok, diagnostics_of(Session, Info, Vars)};
                Error -> Error
            end;
        Error -> Error
    end.

diagnostics_of(Session, Info, Vars) ->
    Infos = [{N, I} || #{name := N} <- Vars, {ok, I} <- [dspex_nif:var_info(Session, N)]],
    Watched = [{N, W} || {N, #{watchers := W}} <- Infos, W > 0],
    Latest = lists:sublist(lists:reverse(lists:keysort(2, [{V, maps:get(updated_at, V)} || V <- Vars])), 10),
    session_diagnostics(Session, Info, Vars,
                        #{variables => length(Vars),
                          bytes => lists:sum([erlang:external_size(maps:get(value, V)) || V <- Vars]),
                          history_entries => lists:sum([H || {_, #{history_size := H}} <- Infos]),
                          watchers => lists:sum([W || {_, W} <- Watched]),
                          watched => maps:from_list(Watched),
                          last_writes => [(maps:with([name, version, updated_at], V))#{changed_by => changed_by(N, Infos)}
                                          || {#{name := N} = V, _} <- Latest],
                          changed_by => maps:from_list([{N, By} || {N, #{changed_by := By}} <- Infos])}).

%% The diagnostics map: Figures (the counts, `watched', `last_writes' and
%% `changed_by') with the session's facts, and the `rules' and `errors' of Vars.
session_diagnostics(Session, Info, Vars, Figures) ->
    Rules = maps:from_list([{N, R} || #{name := N} <- Vars,
                                      {ok, R} <- [dspex_acl:get_permissions(Session, N)], R =/= []]),
    Locks = try [L || #{session := S} = L <- dspex_locks:active(), S =:= Session]
            catch exit:_ -> []
            end,
    #{ttl := Ttl, last_accessed_at := Last} = Info,
    Now = erlang:system_time(microsecond),
    TtlLeft = case Ttl of
                  infinity -> infinity;
                  _ -> max(0, Ttl * 1000 - (Now - Last) div 1000)
              end,
    Figures#{session => Session,
             metadata => maps:get(metadata, Info, #{}),
             locks => Locks,
             rules => Rules,
             errors => maps:from_list([{N, E} || #{name := N, derived := true, error := E} <- Vars, E =/= undefined]),
             ttl => Ttl, ttl_left_ms => TtlLeft,
             created_at => maps:get(created_at, Info), last_accessed_at => Last,
             cluster => cluster_diagnostics(Session)}.

%% @doc `diagnostics/1' for one page of the session's variables: those of
%% ranks `[Offset, Offset + Limit)' by name (the order of `list/1'), for the
%% debug console. `diagnostics' has every key of `diagnostics/1' with the
%% same session-wide figures (`variables', `bytes', `history_entries',
%% `watchers', `last_writes', `locks', ...) while its per-variable maps
%% (`watched', `changed_by', `rules', `errors') hold the page's variables
%% only; `variables' is the page as `list/1' gives it; `edges' the graph's
%% edges with an end in the page, as `dspex_graph:to_map/1' gives them
%% (sorted). The cost follows the page: the rest of the session is walked
%% without copying a value (`list/1' and `diagnostics/1' copy every one).
%% An `Offset' at or past the end is an empty page. Takes one token of the
%% session's rate limit (`{error, rate_limited}'); `{error,
%% session_not_found}'. Runs on this node, as `diagnostics/1'.
-spec diagnostics_page(session_id(), non_neg_integer(), non_neg_integer()) ->
          {ok, #{diagnostics := map(), variables := [var()], edges := [map()]}} | {error, error_reason()}.
diagnostics_page(Session, Offset, Limit)
  when is_binary(Session), is_integer(Offset), Offset >= 0, is_integer(Limit), Limit >= 0 ->
    case dspex_nif:session_get(Session) of
        {ok, Info} ->
            case dspex_nif:session_page(Session, Offset, Limit) of
                {ok, #{variables := Page, edges := Edges} = P} ->
                    D = session_diagnostics(Session, Info, Page,
                                            (maps:with([bytes, history_entries, watchers, watched, last_writes,
                                                        changed_by], P))#{variables => maps:get(total, P)}),
                    {ok, #{diagnostics => D, variables => Page,
                           edges => [#{from => F, to => T, type => Ty} || {F, T, Ty} <- lists:usort(Edges)]}};
                Error -> Error
            end;
        Error -> Error
    end.

changed_by(Name, Infos) ->
    case lists:keyfind(Name, 1, Infos) of
        {_, #{changed_by := By}} -> By;
        false -> undefined
    end.

cluster_diagnostics(Session) ->
    case dspex_cluster:enabled() of
        false -> not_clustered;
        true ->
            Owner = case dspex_cluster:owner_of(Session) of
                        {ok, O} -> O;
                        {error, _} -> none
                    end,
            Status = case dspex_cluster:cluster_status() of
                         #{} = M -> M;
                         _ -> #{}
                     end,
            #{owner => Owner, node => node(), replicas => maps:get(replicas, Status, 0),
              replication => maps:get(replication, Status, undefined)}
    end.
