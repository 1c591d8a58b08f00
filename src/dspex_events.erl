%% @doc The event log (issue #15): every committed change as an immutable,
%% durable event; reads, streaming folds, subscriptions, time travel
%% (`state_at/2'), audit trails and retention with archives.
%%
%% == Where events come from ==
%% The store's commit path appends them itself (C, in the same critical
%% section as the commit, so the log order is the commit order):
%% `session_created', `session_deleted' (`reason': `deleted' | `expired' |
%% `migrated'), `variable_registered', `variable_updated', `variable_deleted',
%% `variable_rolled_back' and `batch_committed' (one per atomic `set_many',
%% listing its members; each member also has its `variable_updated').
%% The Erlang modules that own locks, graphs and access rules append theirs
%% with {@link emit/4}; applications use {@link append/4}.
%%
%% In a cluster, a replica's log of a session follows its owner's: the same
%% events under the same sequences (see `follow/3' and the README, "In a
%% cluster"); a takeover that drops other nodes' copies logs
%% `session_migrated' on the new owner, and each dropped copy logs
%% `session_deleted' (reason `migrated') under that sequence.
%%
%% == Event ==
%% `#{id, type, session, sequence, position, data, metadata, timestamp}':
%% `id' a UUIDv7 (time-sortable), `sequence' per session from 1, gapless in
%% commit order, `position' the global order in this store, `timestamp'
%% microseconds since the epoch, `metadata' at least `node', `principal',
%% `request_id' and `changed_by'.
%%
%% == Durability ==
%% `async' (the default, app env `event_durability'): a write is acknowledged
%% once its event is queued; the writer thread gathers what is queued for up
%% to `event_flush_interval_ms' (default 5, as issue #15 specifies) after the first event of a batch
%% (unless a caller waits for durability or a batch of `event_max_batch' is
%% full) and writes it in one transaction, so an async event is durable within
%% that interval plus one batch write (see README). `sync' (per call: `#{durability => sync}' in the
%% options of `dspex_store:set/4', `set_many/3' or in `append/4''s metadata):
%% the call returns only after the event is fsynced (group commit: callers
%% waiting together share one fsync). When the last commit acknowledged two or
%% more waiting callers and fewer wait now, the writer waits for as many as
%% last time before it starts the next transaction, at most half the mean
%% commit time (capped at 5 ms; app env `event_gather_us': 0 this adaptive
%% bound, N > 0 at most N µs, -1 never); a caller alone never waits. A failed write under `sync' returns
%% `{error, {event_store, Reason}}' (the change itself is committed and its event
%% stays queued; the writer retries it, never drops it). Under `async', a full
%% queue (`event_queue_capacity', default 65,536 events) makes writers wait
%% until it is down to half (back-pressure).
%%
%% == Subscriptions ==
%% `subscribe(Filter, Pid, #{from => Position | live})' sends
%% `{dspex_event, Ref, Event}' for every durable event with position >= Position
%% (catch-up from the log) and then every new one, in position order, without
%% gap or duplicate at the switch-over (both come from the log, by position).
%% A subscriber whose mailbox holds more than `max_queue' (default 10,000)
%% messages gets `{dspex_event_overflow, Ref, LastPosition}' and is dropped;
%% it resumes with `subscribe(Filter, Pid, #{from => LastPosition + 1})'.
-module(dspex_events).
-behaviour(gen_server).

-export([start_link/0, seed/1, append/4, emit/4, recorded/4, lock_event/3, read/2, fold/4, subscribe/3, unsubscribe/1, state_at/2, state_at/3,
         audit_trail/1, await/0, durable/2, settle/3, stats/0, expire_now/0, expire_before/1, expire_before/2, enabled/0,
         archive_dir/0, snapshots_sync/0, prometheus/0, json_term/1]).
-export([last_sequence/1, owner_events/4, follow/3, catch_up/4, copy_events/1, delete_copy/2, shared_backend/0,
         mark_migrated/2, take_kept/2, forget_kept/1, reseed/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([event/0, event_type/0]).

-include("dspex_routing.hrl").

-type event_type() :: session_created | session_deleted | variable_registered | variable_updated
                    | variable_deleted | variable_rolled_back | batch_committed | dependency_added
                    | dependency_removed | derived_recomputed | lock_acquired | lock_released
                    | lock_preempted | lock_expired | acl_rule_set | access_denied
                    | optimization_progress | session_migrated | cache_conflict | atom() | binary().
-type event() :: #{id := binary(), type := event_type(), session := binary(),
                   sequence := pos_integer(), position := pos_integer(), data := term(),
                   metadata := map(), timestamp := integer()}.
-type point() :: integer() | {time, integer()} | {sequence, non_neg_integer()}
               | {position, non_neg_integer()}.

-define(PAGE, 1000).
%% events this node logged outside its store's commits on sessions it owns
%% with replicas, kept until the session's next replicated change takes them
-define(KEPT, dspex_events_kept).
-define(KEPT_MAX, 100000).
-define(KEPT_MAX_WORDS, 8388608). % 64 MiB
-define(SUB_PAGE, 500).
%% the types of the store's own changes (see append/4)
-define(STORE_TYPES, [session_created, session_deleted, variable_registered, variable_updated, variable_deleted,
                      variable_rolled_back, batch_committed]).

%%% API ---------------------------------------------------------------------

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Whether the event log is open on this node.
-spec enabled() -> boolean().
enabled() -> persistent_term:get({?MODULE, enabled}, false).

%% @doc Appends an application event (in a cluster, on the session's owner,
%% like a write). `Meta' may carry `principal' (binary),
%% `changed_by', `variable', `request_id' and `durability' (`sync' | `async').
%% Returns the event's id once it is queued (`async') or fsynced (`sync').
%% The types the store logs for its own changes (`session_created',
%% `session_deleted', `variable_registered', `variable_updated',
%% `variable_deleted', `variable_rolled_back', `batch_committed', as atoms or
%% binaries) are `{error, {reserved_type, Type}}', nothing appended: `state_at/2'
%% and the snapshots replay them, so only the store may log them.
-spec append(binary(), atom() | binary(), term(), map()) ->
          {ok, binary()} | {error, {event_store, term()} | {invalid_argument, atom()} | {reserved_type, atom() | binary()}}.
append(Session, Type, Data, Meta) when is_binary(Session), byte_size(Session) > 0, is_map(Meta),
                                       (is_atom(Type) orelse is_binary(Type)) ->
    case {reserved_type(Type), type_ok(Type), meta_error(Meta)} of
        {true, _, _} -> {error, {reserved_type, Type}};
        {false, false, _} -> {error, {invalid_argument, type}};
        {false, true, {error, _} = Bad} -> Bad;
        %% in a cluster, on the session's owner: its log holds the session's sequence
        {false, true, ok} -> ?ROUTED(Session, append, [Session, Type, Data, Meta], append_here(Session, Type, Data, Meta))
    end;
append(_, _, _, _) -> {error, {invalid_argument, append}}.

%% The metadata keys the log indexes or acts on, checked before anything is queued.
meta_error(#{principal := P}) when P =/= undefined, not is_binary(P) -> {error, {invalid_argument, principal}};
meta_error(#{variable := V}) when V =/= undefined, not is_atom(V), not is_binary(V) ->
    {error, {invalid_argument, variable}};
meta_error(#{durability := D}) when D =/= sync, D =/= async -> {error, {invalid_argument, durability}};
meta_error(_) -> ok.

%% An event type the log can store: a name of 1 to 255 bytes (an atom's in Latin-1, as the log writes it).
type_ok(T) ->
    case type_text(T) of
        {ok, _} -> true;
        error -> false
    end.

%% A type, principal or variable filter as the log stores it: a binary of 1 to 255 bytes, or an atom (its
%% Latin-1 name, as the log writes an atom type; a variable named by an atom is stored by its name).
type_text(T) when is_binary(T), byte_size(T) >= 1, byte_size(T) =< 255 -> {ok, T};
type_text(T) when is_atom(T) ->
    try atom_to_binary(T, latin1) of
        B -> type_text(B)
    catch error:badarg -> error
    end;
type_text(_) -> error.

reserved_type(T) when is_binary(T) ->
    %% an existing atom only: a binary naming none is no store type (and makes no atom)
    try binary_to_existing_atom(T) of
        A -> lists:member(A, ?STORE_TYPES)
    catch error:badarg -> false
    end;
reserved_type(T) -> lists:member(T, ?STORE_TYPES).

append_here(Session, Type, Data, Meta) ->
    {Durability, Meta1} = case maps:take(durability, Meta) of
                              {D, M} -> {D, M};
                              error -> {default_durability(), Meta}
                          end,
    _ = seed(Session),
    case log_event(Session, Type, Data, Meta1) of
        {ok, Id} ->
            case wait_durable(Durability) of
                ok -> {ok, Id};
                Error -> Error
            end;
        Error -> Error
    end.

%% Appends an event; on a session this node owns with replicas (dspex_cluster)
%% the event is also kept for them: the session's next replicated change
%% carries it (`take_kept/2'), so a replica's log need not ask for it.
log_event(Session, Type, Data, Meta) ->
    %% everything else was checked (append/4): the log refuses only a variable name it cannot take
    case try dspex_nif:events_append(Session, Type, Data, Meta, #{})
         catch error:badarg -> {error, {invalid_argument, variable}}
         end of
        {ok, Id, Seq, Ts} ->
            _ = owns_replicated(Session) andalso keep(Session, Seq, #{id => Id, type => Type, session => Session,
                                                                    sequence => Seq, data => Data, timestamp => Ts,
                                                                    metadata => Meta#{node => atom_to_binary(node())}}),
            {ok, Id};
        Error -> Error
    end.

owns_replicated(S) ->
    case ets:whereis(dspex_cluster_sessions) of
        undefined -> false;
        _ ->
            Me = node(),
            case ets:lookup(dspex_cluster_sessions, S) of
                [{_, _, _, Me, [_ | _], _, _}] -> true;
                _ -> false
            end
    end.

%% bounded (100,000 events, 64 MiB): past that the replicas read them from
%% this node's log
keep(S, Seq, Ev) ->
    try ets:info(?KEPT, size) < ?KEPT_MAX andalso ets:info(?KEPT, memory) < ?KEPT_MAX_WORDS
            andalso ets:insert(?KEPT, {{S, Seq}, Ev})
    catch error:badarg -> false
    end.

%% @doc The kept events of `Session' up to sequence `Upto', in order, removed
%% from the table (see `log_event/4'); `[]' when none or the log is off.
-spec take_kept(binary(), non_neg_integer()) -> [event()].
take_kept(Session, Upto) ->
    %% most changes find nothing kept: one ordered step to the session's first
    %% key says so, without compiling and running a match spec per change
    try ets:next(?KEPT, {Session, -1}) of
        {Session, N} when N =< Upto -> take_kept_(Session, Upto);
        _ -> []
    catch error:badarg -> []
    end.

take_kept_(Session, Upto) ->
    Ms = [{{{Session, '$1'}, '$2'}, [{'=<', '$1', Upto}], ['$2']}],
    try ets:select(?KEPT, Ms) of
        [] -> [];
        Evs ->
            _ = ets:select_delete(?KEPT, [{{{Session, '$1'}, '_'}, [{'=<', '$1', Upto}], [true]}]),
            Evs
    catch error:badarg -> []
    end.

%% @doc Forgets the kept events of a session (this node no longer owns it).
-spec forget_kept(binary()) -> ok.
forget_kept(Session) ->
    _ = (catch ets:match_delete(?KEPT, {{Session, '_'}, '_'})),
    ok.

%% @doc Makes the log know `Session''s last sequence before the session's first
%% event on this node (the store calls it before creating or importing a
%% session; `append/4' before appending): the backend is asked here, on a
%% dirty I/O scheduler, never on the commit path, which holds the store's
%% locks. `ok' when known already or when the log is off; an error when the
%% backend cannot answer (the first event then asks again).
-spec seed(binary()) -> ok | {error, {event_store, term()}}.
seed(Session) when is_binary(Session), Session =/= <<>> ->
    case enabled() of
        true -> dspex_nif:events_seed(Session);
        false -> ok
    end;
seed(_) -> ok.

%% @doc Appends an event on behalf of a module of this application (locks,
%% graph, access control): never fails the caller; a log that is not open
%% ignores it.
-spec emit(binary(), event_type(), term(), map()) -> ok.
emit(Session, Type, Data, Meta) when is_binary(Session) ->
    %% a replica installing a copy: its log takes the owner's events instead
    _ = enabled() andalso get(dspex_events_mute) =/= true andalso begin
                              _ = seed(Session),
                              log_event(Session, Type, Data, indexable(Meta))
                          end,
    ok;
emit(_, _, _, _) -> ok.

%% @doc `emit/4' when `Result' is a success (`ok' or `{ok, _}'); returns
%% `Result'. For one-line hooks in the modules that own the state.
-spec recorded(R, binary(), event_type(), map()) -> R when R :: term().
recorded(Result, Session, Type, Data) when Result =:= ok; element(1, Result) =:= ok ->
    ok = emit(Session, Type, Data, maps:with([variable, principal], Data)),
    Result;
recorded(Result, _, _, _) -> Result.

%% @doc The event of a `dspex_locks' telemetry event (`acquired', `released',
%% `preempted', `expired', `progress'); others are not logged.
-spec lock_event(atom(), {binary(), term()}, map()) -> ok.
lock_event(Name, {S, Var}, Meta) ->
    Type = case Name of
               acquired -> lock_acquired;
               released -> lock_released;
               preempted -> lock_preempted;
               expired -> lock_expired;
               progress -> optimization_progress;
               _ -> undefined
           end,
    _ = Type =/= undefined andalso emit(S, Type, Meta#{variable => Var}, #{variable => Var}),
    ok.

%% The indexed metadata columns take a binary principal and a binary or atom
%% variable name; anything else stays in the event's data only.
indexable(Meta) ->
    maps:filter(fun(principal, P) -> is_binary(P);
                   (variable, V) -> is_binary(V) orelse is_atom(V);
                   (_, _) -> true
                end, Meta).

%% @doc Waits until every event queued so far is durable.
-spec await() -> ok | {error, {event_store, term()}}.
await() ->
    case enabled() of
        false -> ok;
        true -> receive_durable(dspex_nif:events_await())
    end.

%% @private Applies the durability of a store write to its result.
-spec durable(Result, map()) -> Result | {error, {event_store, term()}} when Result :: term().
durable(R, Opts) when R =:= ok; element(1, R) =:= ok ->
    case enabled() andalso maps:get(durability, Opts, default) of
        false -> R;
        default ->
            case default_durability() of
                async -> backpressure(R);
                sync -> durable_sync(R)
            end;
        sync -> durable_sync(R);
        _ -> backpressure(R)
    end;
durable(R, _) -> R.

%% @private The wait the store's commit NIF asked for after a write (the fast path of `dspex_store:set/4'
%% decides the durability in the same NIF call as the commit, see `dx_events_settle'): `sync' returns the
%% write's result once its event is durable, or `{error, {event_store, Reason}}'; `backpressure' (async, the
%% queue at its capacity) returns it once the queue is down to half its capacity.
-spec settle(sync | backpressure, Result, ok | {wait, reference()} | {error, term()}) ->
          Result | {error, {event_store, term()}} when Result :: term().
settle(sync, R, Wait) ->
    case receive_durable(Wait) of
        ok -> R;
        Error -> Error
    end;
settle(backpressure, R, Wait) ->
    _ = receive_durable(Wait),
    R.

durable_sync(R) ->
    case await() of
        ok -> R;
        Error -> Error
    end.

backpressure(R) ->
    case dspex_nif:events_backpressure() of
        ok -> R;
        W -> _ = receive_durable(W), R
    end.

%%% A replicated session's log (dspex_cluster) ---------------------------------
%% A replica's log of a session follows its owner's: the same events with the
%% same sequences, so that after a failover or a migration the new owner's log
%% continues the session's sequence unchanged. A replica's replayed change
%% logs the same events as the owner's commit did (same types, versions,
%% values, numbered by the replica's counter, which equals the owner's before
%% the change); everything else (a full copy, events the owner logged outside
%% replicated changes: locks, access denials, appends) is copied from the
%% owner's log by sequence with `follow/3' (same id, time, node, data).

%% @doc The last sequence of `Session' in this node's log (0: none); `undefined'
%% when the log is off.
-spec last_sequence(binary()) -> non_neg_integer() | undefined.
last_sequence(Session) ->
    case enabled() andalso dspex_nif:events_session_seq(Session) of
        N when is_integer(N) -> N;
        _ -> undefined
    end.

%% @doc Owner side of `follow/3': at most `Limit' of the session's events from
%% sequence `From' to `To' (`latest': to the last), once every event queued
%% so far is durable.
-spec owner_events(binary(), pos_integer(), pos_integer() | latest, pos_integer()) ->
          {ok, [event()]} | {error, term()}.
owner_events(Session, From, To, Limit) ->
    case await() of
        ok ->
            Q = maps:from_list([{session, Session}, {seq_from, From}, {limit, min(Limit, ?PAGE)}]
                               ++ [{seq_to, To} || is_integer(To)]),
            dspex_nif:events_read(Q);
        Error -> Error
    end.

%% @doc Brings this node's log of `Session' up to sequence `Upto' (`latest':
%% up to the owner's last) with copies of the events it lacks from `Owner''s
%% log, a page of 1,000 per call. `ok' when the log is off or already there.
-spec follow(binary(), node(), non_neg_integer() | latest) -> ok | {error, term()}.
follow(_Session, Owner, _Upto) when Owner =:= node() -> ok;
follow(Session, Owner, Upto) ->
    case last_sequence(Session) of
        undefined -> ok;
        L when is_integer(Upto), L >= Upto -> ok;
        L ->
            case catch erpc:call(Owner, ?MODULE, owner_events, [Session, L + 1, Upto, ?PAGE], 10000) of
                {ok, []} -> ok;
                {ok, Evs} ->
                    case copy_events(Evs) of
                        ok when length(Evs) < ?PAGE -> ok;
                        ok -> follow(Session, Owner, Upto);
                        Error -> Error
                    end;
                {error, _} = Error -> Error;
                Other -> {error, {event_store, {follow, Owner, Other}}}
            end
    end.

%% @doc `follow/3' with `Kept' first: the owner's events carried by a
%% replicated change (in order); those continuing this log are copied from
%% there, the rest up to `Upto' is read from the owner's log.
-spec catch_up(binary(), node(), non_neg_integer(), [event()]) -> ok | {error, term()}.
catch_up(Session, Owner, Upto, Kept) ->
    case last_sequence(Session) of
        undefined -> ok;
        L when L >= Upto -> ok;
        L ->
            Next = contiguous([E || #{sequence := N} = E <- Kept, N > L, N =< Upto], L + 1),
            case copy_events(Next) of
                ok when L + length(Next) >= Upto -> ok;
                ok -> follow(Session, Owner, Upto);
                Error -> Error
            end
    end.

contiguous([#{sequence := N} = E | Rest], N) -> [E | contiguous(Rest, N + 1)];
contiguous(_, _) -> [].

%% @doc Appends copies of another node's events (in sequence order; each must
%% be its session's next: `{error, {sequence_gap, Last}}' otherwise).
-spec copy_events([event()]) -> ok | {error, term()}.
copy_events([]) -> ok;
copy_events([#{id := Id, type := T, session := S, sequence := N, data := D, metadata := M, timestamp := Ts} | Rest]) ->
    As = #{sequence => N, id => Id, timestamp => Ts, node => node_bin(maps:get(node, M, undefined))},
    Meta = maps:without([node], M),
    case dspex_nif:events_append(S, T, D, indexable(Meta), As) of
        {ok, _, _, _} -> copy_events(Rest);
        Error -> Error
    end.

node_bin(B) when is_binary(B) -> B;
node_bin(_) -> atom_to_binary(node()).

%% @doc Deletes this node's copy of a session: `migrated' (the session moved
%% to other nodes: logged as `session_deleted' with that reason in this node's
%% log, unless the backend is shared, see `shared_backend/0') or `silent' (a
%% replica replacing its copy: its log follows the owner's, which has no
%% such event).
-spec delete_copy(binary(), migrated | silent) -> ok | {error, session_not_found}.
delete_copy(Session, Reason) ->
    R = case Reason =:= migrated andalso not shared_backend() of
            true -> migrated;
            false -> silent
        end,
    Result = dspex_nif:events_session_delete(Session, R),
    ok = dspex_propagator:stop(Session),
    Result.

%% @doc The new owner of a session whose copies on other nodes are dropped
%% logs `session_migrated' (`Data': `to', `epoch', `dropped' nodes); its
%% sequence, under which each dropped copy logs its `session_deleted'
%% (reason `migrated'). `undefined' when the log is off or failed.
-spec mark_migrated(binary(), map()) -> pos_integer() | undefined.
mark_migrated(Session, Data) ->
    case enabled() andalso seed(Session) =:= ok andalso
        dspex_nif:events_append(Session, session_migrated, Data, #{}, #{}) of
        {ok, _, Seq, _} -> Seq;
        _ -> undefined
    end.

%% @doc A node taking `Session' over whose log is shared with the other nodes
%% (`shared_backend/0'): its counter goes up to the database's last sequence
%% of the session (events the old owner stored after its last replicated
%% change), so that its own next events do not take those numbers (the
%% inserts would skip them). `ok' with a log of its own or off.
-spec reseed(binary()) -> ok | {error, {event_store, term()}}.
reseed(Session) ->
    case enabled() andalso shared_backend() of
        true -> dspex_nif:events_reseed(Session);
        false -> ok
    end.

%% @doc Whether every node of a cluster appends to one log (PostgreSQL): there a
%% session that moves keeps one history, and a node dropping its copy logs
%% nothing (a `migrated' event would take the sequence number the new owner
%% uses next).
-spec shared_backend() -> boolean().
shared_backend() ->
    case application:get_env(dspex_bridge, event_backend, sqlite) of
        {postgres, _} -> true;
        _ -> false
    end.

%% @doc Reads a session's events (or every session's with `all').
%% Options: `since' / `until' (inclusive): a time in microseconds,
%% `{time, Us}', `{sequence, N}' or `{position, N}'; `types' (list);
%% `principal'; `variable'; `limit' (default 1000, at most 100,000);
%% `direction' (`forward' | `backward'); `include_archive' (also read archive
%% files of retention, first); `as' / `context': the log is the session's
%% own (it holds every value written, the rules and the denials, which no
%% per-variable rule can split), so a principal other than the session is
%% `{error, access_denied}' (`dspex_acl:check_owner/2'), and `all' is
%% refused to every principal. The same holds for `fold/4', `subscribe/3',
%% `state_at/3' and `audit_trail/1'. `principal' is not `as': it filters
%% the events by who caused them.
-spec read(binary() | all, map()) -> {ok, [event()]} | {error, term()}.
read(Session, Opts) when is_map(Opts) ->
    case owner_query(Session, Opts) of
        {ok, Q} ->
            ok = visible(),
            Limit = maps:get(limit, Opts, ?PAGE),
            Live = dspex_nif:events_read(Q#{limit => Limit}),
            case {maps:get(include_archive, Opts, false), Live} of
                {true, {ok, Evs}} ->
                    %% the same query as the log's: every filter applies to archived events alike
                    Arch = dspex_events_archive:read(archive_dir(), Session, Q),
                    Ids = maps:from_list([{maps:get(id, E), true} || E <- Evs]),
                    All = [E || E <- Arch, not maps:is_key(maps:get(id, E), Ids)] ++ Evs,
                    Sorted = case maps:get(direction, Opts, forward) of
                                 backward -> lists:reverse(sort_events(All));
                                 _ -> sort_events(All)
                             end,
                    {ok, lists:sublist(Sorted, Limit)};
                _ -> Live
            end;
        Error -> Error
    end.

%% Read-your-writes: a read (read/2, fold/4, audit_trail/1, state_at/2) sees
%% every event queued before it, durable or not yet (an async event waits up
%% to event_flush_interval_ms for its batch): it first waits until what is
%% queued now is written, which makes the writer thread write at once (a
%% waiter cuts its linger short). Nothing queued: no wait. A failing backend
%% answers the wait with its error; the read then returns what is stored.
visible() ->
    case enabled() andalso dspex_nif:events_await() of
        {wait, Ref} -> receive {dspex_events_durable, Ref, _} -> ok end;
        _ -> ok
    end.

sort_events(Evs) -> lists:sort(fun(A, B) -> key(A) =< key(B) end, Evs).
key(#{session := S, sequence := N, position := P}) -> {P, S, N}.

%% @doc Folds over a session's events in order, reading pages of 1,000 (the
%% whole log is never in memory). Options as `read/2' (`limit' is ignored).
-spec fold(binary() | all, fun((event(), Acc) -> Acc), Acc, map()) -> {ok, Acc} | {error, term()}.
fold(Session, Fun, Acc, Opts) when is_function(Fun, 2), is_map(Opts) ->
    case owner_query(Session, maps:remove(limit, Opts)) of
        {ok, Q} ->
            ok = visible(),
            fold_pages(Q, Fun, Acc, maps:get(direction, Opts, forward));
        Error -> Error
    end.

fold_pages(Q, Fun, Acc, Dir) ->
    case dspex_nif:events_read(Q#{limit => ?PAGE}) of
        {ok, []} -> {ok, Acc};
        {ok, Evs} ->
            Acc1 = lists:foldl(Fun, Acc, Evs),
            #{position := Last} = lists:last(Evs),
            case length(Evs) < ?PAGE of
                true -> {ok, Acc1};
                false when Dir =:= backward -> fold_pages(Q#{pos_to => Last - 1}, Fun, Acc1, Dir);
                false -> fold_pages(Q#{pos_from => Last + 1}, Fun, Acc1, Dir)
            end;
        Error -> Error
    end.

%% @doc Subscribes `Pid' to the events matching `Filter' (`all' or a map with
%% `session' and/or `types'). See the module documentation for the messages.
%% `as' / `context' in `Opts': as `read/2' (only the session itself).
-spec subscribe(all | map(), pid(), #{from => pos_integer() | live, max_queue => pos_integer(),
                                      as => binary() | undefined, context => map()}) ->
          {ok, reference()} | {error, term()}.
subscribe(Filter, Pid, Opts) when is_pid(Pid), is_map(Opts), (Filter =:= all orelse is_map(Filter)) ->
    %% checked here: the server reads the log with the filter for every page it delivers
    Session = case Filter of
                  #{session := S} -> S;
                  _ -> all
              end,
    case dspex_acl:check_owner(Session, Opts) of
        ok ->
            case metered(Session) of
                ok -> subscribe_checked(sub_filter(Filter), Pid, Opts);
                Limited -> Limited
            end;
        Denied -> Denied
    end;
subscribe(_, _, _) -> {error, {invalid_argument, subscribe}}.

subscribe_checked({ok, F}, Pid, Opts) ->
    case {maps:get(from, Opts, live), maps:get(max_queue, Opts, 1)} of
        {From, _} when From =/= live, not (is_integer(From) andalso From >= 1) ->
            {error, {invalid_argument, from}};
        {_, M} when not (is_integer(M) andalso M >= 1) -> {error, {invalid_argument, max_queue}};
        _ -> gen_server:call(?MODULE, {subscribe, F, Pid, Opts}, infinity)
    end;
subscribe_checked(Error, _Pid, _Opts) -> Error.

sub_filter(all) -> {ok, all};
sub_filter(F) ->
    case maps:get(session, F, all) of
        S when S =:= all; is_binary(S) ->
            case query(S, maps:with([types], F)) of
                {ok, Q} -> {ok, maps:with([session, types], Q)};
                Error -> Error
            end;
        _ -> {error, {invalid_argument, session}}
    end.

-spec unsubscribe(reference()) -> ok.
unsubscribe(Ref) -> gen_server:call(?MODULE, {unsubscribe, Ref}, infinity).

%% @doc The session's state at a time (microseconds, or `{time, Us}') or
%% after its event `{sequence, N}': equal to `dspex_nif:export_session/1' at
%% that point (`format', `id', `metadata', `ttl', `created_at', `variables'
%% with values, versions and histories; the Erlang-side extras of
%% `dspex_store:export_session/1' are not part of it). Built from the latest
%% snapshot at or before the point plus the events after it, read with the
%% lean `dspex_nif:events_replay/7' (only the events that change the state,
%% a run of one variable's updates folded into one). A session id that is
%% not a non-empty binary is `{error, {invalid_argument, session}}'.
-spec state_at(binary(), point()) -> {ok, map()} | {error, not_found | term()}.
state_at(Session, Point) -> state_at(Session, Point, #{}).

%% @doc `state_at/2' with `as' / `context' (only the session itself, as
%% `read/2': a state holds every variable's value).
-spec state_at(binary(), point(), map()) -> {ok, map()} | {error, not_found | access_denied | term()}.
state_at(<<>>, _, _) -> {error, {invalid_argument, session}};   % no session has the empty id
state_at(Session, Point, Opts) when is_binary(Session), is_map(Opts) ->
    case dspex_acl:check_owner(Session, Opts) =:= ok andalso metered(Session) of
        false -> {error, access_denied};
        ok -> state_at_(Session, Point);
        Limited -> Limited
    end;
state_at(_, _, _) -> {error, {invalid_argument, session}}.

state_at_(Session, Point) ->
    case point(Point) of
        {ok, P} ->
            case replay_to(Session, P) of
                {ok, State} -> {ok, to_export(State)};
                Error -> Error
            end;
        error -> {error, {invalid_argument, point}}
    end.

%% {MaxSeq, MaxTs}: a time at or before the epoch is before every event (not found)
point({sequence, N}) when is_integer(N), N >= 0 -> {ok, {cap(N), 0}};
point({time, T}) when is_integer(T) -> {ok, {0, cap(max(T, 0))}};
point(T) when is_integer(T) -> point({time, T});
point(_) -> error.

cap(N) -> min(N, 16#7FFFFFFFFFFFFFFF).

replay_to(Session, {MaxSeq, MaxTs}) ->
    case MaxSeq =:= 0 andalso MaxTs =:= 0 of
        true -> {error, not_found};
        false ->
            ok = visible(),
            case dspex_nif:events_latest_snapshot(Session, MaxSeq, MaxTs) of
                {ok, SSeq, _, Snap} -> replay(Session, Snap, SSeq, MaxSeq, MaxTs);
                none -> replay(Session, undefined, 0, MaxSeq, MaxTs);
                Error -> Error
            end
    end.

replay(Session, Snap, FromSeq, MaxSeq, MaxTs) ->
    case replay_pages(Session, FromSeq + 1, MaxSeq, MaxTs, 0, {from_state(Snap), none}, fun(_, _, _, A) -> A end) of
        {ok, {undefined, _}} -> {error, not_found};
        {ok, {deleted, _}} -> {error, not_found};
        {ok, {State, _}} -> {ok, to_state(State)};
        Error -> Error
    end.

%% Applies the session's events from sequence `From' (to `To' and time `TsTo'
%% when not 0) to the replay state, a page of ?PAGE rows per read of the lean
%% `events_replay' (only the events that change the state, undecoded metadata
%% never built); `After(Seq, Ts, State, Acc)' sees the state after each of
%% them, and after every other event whose sequence is a multiple of `Mark'
%% (> 0), and returns the new `Acc'. Returns `{ok, {State, Acc}}'.
replay_pages(Session, From, To, TsTo, Mark, {State0, _} = St0, After) ->
    case dspex_nif:events_replay(Session, From, To, TsTo, ?PAGE, Mark, history_limits(State0)) of
        {ok, Evs, Scanned, Last} ->
            St1 = lists:foldl(fun({Seq, Ts, _, _} = E, {St, Acc}) ->
                                      St2 = apply_event(Session, E, St),
                                      {St2, After(Seq, Ts, St2, Acc)}
                              end, St0, Evs),
            case Scanned < ?PAGE of
                true -> {ok, St1};
                false -> replay_pages(Session, Last + 1, To, TsTo, Mark, St1, After)
            end;
        Error -> Error
    end.

%% The replay state: #{session := Export-without-variables, vars := #{Name => {VarMap, Count, RevHistory}}}
%% (or undefined before session_created, deleted after session_deleted). A
%% variable's history is kept newest first with its length: an update adds
%% one element at the head (O(1)), and the list is cut to the last
%% `history_limit' when it reaches twice that plus 8 (O(1) amortised), where
%% `H ++ [Previous]' and two `length/1' copied and walked the whole history
%% every update. `to_state/1' gives the stored form (`history' oldest first,
%% the last `history_limit' entries: exactly what trimming after every update
%% left), which is what snapshots hold and `state_at/2' exports.
apply_event(S, {_, _, session_created, D}, _) when is_map(D) ->
    #{session => #{format => dspex_session_v1, id => S, metadata => maps:get(metadata, D, #{}),
                   ttl => maps:get(ttl, D, infinity), created_at => maps:get(created_at, D, 0)},
      vars => #{}};
apply_event(_, {_, _, session_deleted, #{reason := migrated}}, St) ->
    %% this node's copy was dropped; the session lives on (see dspex_cluster)
    St;
apply_event(_, {_, _, session_deleted, _}, _) -> deleted;
apply_event(_, _, St) when not is_map(St) -> St;
apply_event(_, {_, _, variable_registered, #{name := N, history := H} = V}, #{vars := Vs} = St) when is_list(H) ->
    St#{vars := Vs#{N => from_var(V)}};
apply_event(_, {_, _, T, #{name := N, previous := P} = D}, #{vars := Vs} = St)
  when T =:= variable_updated; T =:= variable_rolled_back ->
    case {Vs, updated(D)} of
        {#{N := {V, C, R}}, #{} = U} -> St#{vars := Vs#{N := cut({maps:merge(V, U), C + 1, [P | R]})}};
        _ -> St
    end;
apply_event(_, {_, _, {updates, Count, Prevs}, #{name := N} = D}, #{vars := Vs} = St) ->
    %% a run of Count updates of one variable (events_replay/7): the last one's
    %% fields, and the run's `previous' entries, of which the NIF kept the last
    %% history_limit (the whole history then) or all
    case {Vs, updated(D)} of
        {#{N := {V, C, R}}, #{} = U} ->
            V1 = maps:merge(V, U),
            Kept = length(Prevs),
            St#{vars := Vs#{N := case Kept < Count of
                                     true -> {V1, Kept, Prevs};
                                     false -> cut({V1, C + Count, Prevs ++ R})
                                 end}};
        _ -> St
    end;
apply_event(_, {_, _, variable_deleted, #{name := N}}, #{vars := Vs} = St) ->
    St#{vars := maps:remove(N, Vs)};
%% anything else, and a state event without the fields the store gives it
%% (which append/4 no longer lets an application log), changes nothing
apply_event(_, _, St) -> St.

%% The fields an update sets, when its data has them all (the store's events do).
updated(#{value := _, version := _, updated_at := _, metadata := _, changed_by := _} = D) ->
    maps:with([value, version, updated_at, metadata, changed_by], D);
updated(_) -> none.

%% The variables' history limits for events_replay/7.
history_limits(#{vars := Vs}) ->
    maps:fold(fun(N, {#{history_limit := L}, _, _}, Acc) when is_integer(L), L >= 0 -> [{N, L} | Acc];
                 (_, _, Acc) -> Acc
              end, [], Vs);
history_limits(_) -> [].

cut({#{history_limit := L} = V, C, R}) when is_integer(L), C >= 2 * L + 8 -> {V, L, lists:sublist(R, L)};
cut(X) -> X.

from_var(#{history := H} = V) -> {V, length(H), lists:reverse(H)}.

to_var({V, C, R}) ->
    L = maps:get(history_limit, V, C),
    V#{history := lists:reverse(case is_integer(L) andalso C > L of
                                    true -> lists:sublist(R, max(L, 0));
                                    false -> R
                                end)}.

%% stored form <-> replay state
from_state(#{vars := Vs} = St) -> St#{vars := maps:map(fun(_, V) -> from_var(V) end, Vs)};
from_state(St) -> St.

to_state(#{vars := Vs} = St) -> St#{vars := maps:map(fun(_, V) -> to_var(V) end, Vs)};
to_state(St) -> St.

to_export(#{session := S, vars := Vs}) ->
    S#{variables => [V || {_, V} <- lists:sort(maps:to_list(Vs))]}.

%% @doc An audit trail. Filters: `period' `{FromUs, ToUs}' (inclusive;
%% `undefined' ends are open), `session', `principal', `types', `variable',
%% `limit' (events listed, default 10,000; the summary counts all), `as' /
%% `context' (as `read/2': only the session itself, never with `all').
%% Returns `#{period, events, summary}' where summary has `count', `by_type',
%% `by_principal', `denied' (access_denied events) and `writes_by_changed_by'.
-spec audit_trail(map()) -> {ok, #{period := {integer() | undefined, integer() | undefined},
                                   events := [event()], summary := map()}} | {error, term()}.
audit_trail(Filters) when is_map(Filters) ->
    case {maps:get(period, Filters, {undefined, undefined}), maps:get(limit, Filters, 10000)} of
        {{From, To}, Limit} when (From =:= undefined orelse is_integer(From)),
                                 (To =:= undefined orelse is_integer(To)) ->
            case is_integer(Limit) andalso Limit >= 0 of
                true -> audit_trail(Filters, From, To, Limit);
                false -> {error, {invalid_argument, limit}}
            end;
        _ -> {error, {invalid_argument, period}}
    end.

audit_trail(Filters, From, To, Limit) ->
    Opts = maps:from_list([{since, {time, From}} || is_integer(From)] ++ [{until, {time, To}} || is_integer(To)]
                          ++ [{K, V} || K <- [types, principal, variable, as, context], {ok, V} <- [maps:find(K, Filters)]]),
    Session = maps:get(session, Filters, all),
    Fun = fun(E, {N, Es, Sum}) -> {N + 1, case N < Limit of true -> [E | Es]; false -> Es end, summarize(E, Sum)} end,
    Sum0 = #{count => 0, by_type => #{}, by_principal => #{}, denied => 0, writes_by_changed_by => #{}},
    case fold(Session, Fun, {0, [], Sum0}, Opts) of
        {ok, {_, Es, Sum}} -> {ok, #{period => {From, To}, events => lists:reverse(Es), summary => Sum}};
        Error -> Error
    end.

summarize(#{type := T, metadata := M}, #{count := C, by_type := BT, by_principal := BP, denied := D,
                                         writes_by_changed_by := W} = S) ->
    P = maps:get(principal, M, undefined),
    By = maps:get(changed_by, M, undefined),
    Write = lists:member(T, [variable_updated, variable_rolled_back, variable_registered, variable_deleted]),
    S#{count := C + 1, by_type := incr(T, BT), by_principal := incr(P, BP),
       denied := D + case T of access_denied -> 1; _ -> 0 end,
       writes_by_changed_by := case Write of true -> incr(By, W); false -> W end}.

incr(K, M) -> maps:update_with(K, fun(N) -> N + 1 end, 1, M).

%% @doc Queue and writer counters: `pushed', `done' (durable), `depth',
%% `max_depth', `bytes', `batches', `written', `errors', `lag_us' (age of
%% the oldest queued event), `last_position', `last_error', `lost', `full',
%% `spooled' (events in the PostgreSQL spool, waiting for the database),
%% `commit_seeds' (sessions whose last sequence a committing thread had to ask
%% the backend for, because `seed/1' had not run: 0 in normal operation),
%% `provisional' (sessions whose last stored sequence was unknown when their
%% first event here came, the backend being down: their events are numbered
%% provisionally and renumbered after the backend's last one of the session
%% before any of them is stored); group commit: `acked_batches' and `acked'
%% (transactions that acknowledged waiting callers, and how many callers),
%% `gathers' and `gather_timeouts' (waits for more callers before a
%% transaction, and those that ended at the bound), `commit_avg_us' (mean
%% wall time of the recent commits); the writer thread's CPU time in µs:
%% `writer_cpu_us' in all, `write_cpu_us' in the backend's batch writes,
%% `encode_cpu_us' encoding, and `write_us' the wall time of the batch writes.
-spec stats() -> map() | {error, term()}.
stats() -> dspex_nif:events_stats().

%% @doc Runs retention now: events older than the retention period move to
%% archive files. Returns how many were archived. Runs as `expire_before/1'
%% does (beside the server, one pass at a time, the same errors).
-spec expire_now() -> {ok, non_neg_integer()} | {error, term()}.
expire_now() -> gen_server:call(?MODULE, expire_now, infinity).

%% @doc Archives and deletes every event older than `TsUs'. A page of up to
%% 1,000 such events is archived (and synced), then exactly those are deleted
%% (by position range, checked by count): an event committed meanwhile, also
%% a late one (a replica's copy with its owner's older time), is never deleted
%% unarchived; it stays in the log for the next run.
%%
%% The pass runs in a process of its own beside the server (see
%% `dspex_events_retention'): subscriptions are served and calls answered
%% while it works. One pass runs at a time: a call made while one runs (also
%% the hourly retention's) waits for it, then runs its own pass with its own
%% cutoff. Errors: the backend's or the archive's (`{error, {event_store, _}}',
%% a file error, `{error, {archive, {Class, Reason}}}' for an exception);
%% `{error, {archive, {exit, Reason}}}' when the pass process died; `{error,
%% {archive, stopped}}' when the server stopped (the application, or the log
%% closing) before the pass ended. In every case the events not yet deleted
%% stay in the log, and the next pass archives them.
-spec expire_before(integer()) -> {ok, non_neg_integer()} | {error, term()}.
expire_before(TsUs) when is_integer(TsUs) -> expire_before(TsUs, #{}).

%% @private `expire_before/1' with a test hook: `after_archive' is called
%% with each page once it is archived and before its events are deleted (in
%% the pass's process).
-spec expire_before(integer(), #{after_archive => fun(([map()]) -> term())}) ->
          {ok, non_neg_integer()} | {error, term()}.
expire_before(TsUs, Hooks) when is_integer(TsUs), is_map(Hooks) ->
    gen_server:call(?MODULE, {expire_before, TsUs, Hooks}, infinity).

%% @doc Returns once the snapshots due so far are stored (for tests and benchmarks).
-spec snapshots_sync() -> ok.
snapshots_sync() ->
    #{snapshotter := P} = sys:get_state(?MODULE),
    Mon = erlang:monitor(process, P),
    P ! {snapshots_sync, self(), Mon},
    receive
        {Mon, ok} -> erlang:demonitor(Mon, [flush]), ok;
        %% it died (dspex_events starts another, which takes the notices from then on)
        {'DOWN', Mon, process, P, _} -> ok
    end.

%% @doc The event log's Prometheus gauges and counters (part of
%% `dspex_prometheus:render/0'); empty when the log is not open.
-spec prometheus() -> iodata().
prometheus() ->
    case dspex_nif:events_stats() of
        #{depth := D, lag_us := Lag, errors := E, written := W, lost := L, batches := B, full := F, spooled := Sp} ->
            [metric("dspex_events_queue_depth", gauge, "Events queued, not yet durable.", D),
             metric("dspex_events_lag_seconds", gauge, "Age of the oldest queued event.", Lag / 1.0e6),
             metric("dspex_events_queue_full", gauge, "1 while writers are held back (queue at capacity).",
                    case F of true -> 1; false -> 0 end),
             metric("dspex_events_errors_total", counter, "Failed batch writes (each retried).", E),
             metric("dspex_events_written_total", counter, "Events made durable.", W),
             metric("dspex_events_batches_total", counter, "Batches (transactions) written.", B),
             metric("dspex_events_lost_total", counter, "Events not queued for lack of memory.", L),
             metric("dspex_events_spooled", gauge,
                    "Events in the spool while PostgreSQL is unreachable (durable, not yet in the database).", Sp)];
        _ -> []
    end.

metric(Name, Type, Help, V) ->
    ["# HELP ", Name, " ", Help, "\n# TYPE ", Name, " ", atom_to_list(Type), "\n", Name, " ",
     if is_float(V) -> float_to_list(V, [short]); true -> integer_to_list(V) end, "\n"].

-spec archive_dir() -> file:filename().
archive_dir() ->
    case application:get_env(dspex_bridge, archive_dir) of
        {ok, D} -> D;
        undefined -> filename:join(event_dir(), "archive")
    end.

%% @doc A term with a JSON form (`dspex_json:encode/1' accepts it) made from an
%% event's data, metadata or a `state_at/2' state, for the gRPC messages:
%% atoms stay (`true', `false', `null'; `undefined' becomes `null'; others
%% are encoded as strings), tuples become lists, a binary that is not UTF-8
%% becomes `#{<<"$base64">> => Base64}', an integer outside int64 its decimal
%% string, a pid, port, reference or fun its printed text, and a map key that
%% is not a binary, atom or integer its printed text.
-spec json_term(term()) -> dspex_json:json() | atom().
json_term(undefined) -> null;
json_term(A) when is_atom(A) -> A;
json_term(I) when is_integer(I), I >= -(1 bsl 63), I < 1 bsl 63 -> I;
json_term(I) when is_integer(I) -> integer_to_binary(I);
json_term(F) when is_float(F) -> F;
json_term(B) when is_binary(B) ->
    case unicode:characters_to_binary(B, utf8, utf8) of
        B -> B;
        _ -> #{<<"$base64">> => base64:encode(B)}
    end;
json_term(T) when is_tuple(T) -> [json_term(X) || X <- tuple_to_list(T)];
json_term(M) when is_map(M) -> maps:from_list([{json_key(K), json_term(V)} || {K, V} <- maps:to_list(M)]);
json_term(L) when is_list(L) ->
    try [json_term(X) || X <- L]
    catch error:_ -> printed(L) %% an improper list
    end;
json_term(Other) -> printed(Other).

json_key(K) when is_atom(K) -> K;
json_key(K) when is_integer(K) -> integer_to_binary(K);
json_key(K) when is_binary(K) ->
    case unicode:characters_to_binary(K, utf8, utf8) of
        K -> K;
        _ -> printed(K)
    end;
json_key(K) -> printed(K).

printed(T) -> unicode:characters_to_binary(io_lib:format("~0tp", [T])).

%%% internals -----------------------------------------------------------------

durable_position() ->
    case dspex_nif:events_stats() of
        #{last_position := P} -> P;
        _ -> 0
    end.

default_durability() -> persistent_term:get({?MODULE, durability}, async).

wait_durable(sync) -> await();
wait_durable(_) -> ok.

receive_durable(ok) -> ok;
receive_durable({wait, Ref}) ->
    receive {dspex_events_durable, Ref, R} -> R end;
receive_durable({error, _} = E) -> E.

%% One log per node: nodes started in the same directory (a cluster's peers on
%% one machine, test nodes) never share a file, whose sequences and positions
%% are each node's own. A named node's log is durable in data/events/<node>.
%% An unnamed node (nonode@nohost) has no identity to find its log by after a
%% restart, so its log lives for the VM's life only: a private directory under
%% the system temp dir, removed when the log stops, and swept at the next start
%% of any unnamed node if the VM died without stopping it. Name the node, or
%% set `event_dir', for a log that outlives the VM.
event_dir() ->
    case application:get_env(dspex_bridge, event_dir) of
        {ok, Dir} -> Dir;
        undefined ->
            case node() of
                'nonode@nohost' -> ephemeral_dir(os:getpid());
                N -> filename:join("data/events", atom_to_list(N))
            end
    end.

ephemeral_root() ->
    Tmp = case os:getenv("TMPDIR") of
              T when is_list(T), T =/= "" -> T;
              _ -> "/tmp"
          end,
    filename:join(Tmp, "dspex_events").

ephemeral_dir(OsPid) -> filename:join(ephemeral_root(), "vm-" ++ OsPid).

ephemeral(Dir) -> Dir =:= ephemeral_dir(os:getpid()).

%% Removes the logs of unnamed VMs that are gone (killed before they could
%% remove their own). A VM is gone when /proc has no such process; where there
%% is no /proc nothing is removed.
sweep_ephemeral() ->
    case filelib:is_dir("/proc/self") of
        false -> ok;
        true ->
            Root = ephemeral_root(),
            Mine = "vm-" ++ os:getpid(),
            lists:foreach(
              fun("vm-" ++ Pid = Name) when Name =/= Mine ->
                      filelib:is_dir(filename:join("/proc", Pid))
                          orelse file:del_dir_r(filename:join(Root, Name));
                 (_) -> ok
              end, case file:list_dir(Root) of {ok, L} -> L; _ -> [] end)
    end.

%% `query/2' of a read acting as the session itself (see read/2).
owner_query(Session, _Opts) when Session =/= all, not is_binary(Session) ->
    {error, {invalid_argument, session}};
owner_query(Session, Opts) ->
    case dspex_acl:check_owner(Session, Opts) of
        ok ->
            case metered(Session) of
                ok -> query(Session, Opts);
                Limited -> Limited
            end;
        Denied -> Denied
    end.

%% A read of a session's log takes a token of its rate limit (dspex_acl:set_rate_limit/3);
%% the log outlives its session, whose gone bucket limits nothing.
metered(Session) when is_binary(Session) ->
    case dspex_nif:session_take(Session) of
        {error, rate_limited} = Limited -> Limited;
        _ -> ok
    end;
metered(_) -> ok.

query(Session, Opts) ->
    try
        %% the callers let only `all' and binaries through
        Q0 = case Session of
                 all -> #{};
                 S when is_binary(S) -> #{session => S}
             end,
        Q1 = bound(since, maps:get(since, Opts, undefined), Q0),
        Q2 = bound(until, maps:get(until, Opts, undefined), Q1),
        Q3 = filters(maps:with([types, principal, variable], Opts), Q2),
        Desc = case maps:get(direction, Opts, forward) of
                   forward -> false;
                   backward -> true;
                   _ -> throw(direction)
               end,
        _ = case maps:get(limit, Opts, 1) of
                L when is_integer(L), L >= 1 -> ok;
                _ -> throw(limit)
            end,
        {ok, Q3#{descending => Desc}}
    catch throw:Bad -> {error, {invalid_argument, Bad}}
    end.

%% The filters a read or a subscription passes to the log, checked: `types' a list of at most 64 type names
%% (as append/4 takes them), `principal' and `variable' one name each. A filter the log could not apply is
%% an error, never a read of everything.
filters(F, Q) ->
    maps:fold(fun(types, Ts, Acc) when is_list(Ts), length(Ts) =< 64 ->
                      Acc#{types => [case type_text(T) of {ok, B} -> B; error -> throw(types) end || T <- Ts]};
                 (types, _, _) -> throw(types);
                 (K, V, Acc) ->
                      case type_text(V) of
                          {ok, B} -> Acc#{K => B};
                          error -> throw(K)
                      end
              end, Q, F).

%% (a bound past what the log can number, 2^63 - 1, is that: nothing is after it)
bound(_, undefined, Q) -> Q;
bound(since, {sequence, N}, Q) when is_integer(N), N >= 0 -> Q#{seq_from => cap(N)};
bound(until, {sequence, N}, Q) when is_integer(N), N > 0 -> Q#{seq_to => cap(N)};
bound(since, {position, N}, Q) when is_integer(N), N >= 0 -> Q#{pos_from => cap(N)};
bound(until, {position, N}, Q) when is_integer(N), N > 0 -> Q#{pos_to => cap(N)};
bound(since, {time, T}, Q) when is_integer(T), T >= 0 -> Q#{ts_from => cap(T)};
bound(until, {time, T}, Q) when is_integer(T), T > 0 -> Q#{ts_to => cap(T)};
bound(W, T, Q) when is_integer(T) -> bound(W, {time, T}, Q);
bound(W, _, _) -> throw(W).

%%% gen_server ----------------------------------------------------------------

-record(sub, {ref, pid, mon, filter, pos, max_queue}).

%% @private
init([]) ->
    process_flag(trap_exit, true),
    Env = fun(K, D) -> application:get_env(dspex_bridge, K, D) end,
    Dir = event_dir(),
    Ephemeral = ephemeral(Dir),
    _ = Ephemeral andalso sweep_ephemeral(),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    {Backend, Target, Spool} = case Env(event_backend, sqlite) of
                                   sqlite -> {sqlite, filename:join(Dir, "events.db"), #{}};
                                   %% PostgreSQL down: batches go to an embedded spool, moved back in order
                                   {postgres, Conninfo} ->
                                       {postgres, Conninfo, #{spool => filename:join(Dir, "pg_spool.db")}}
                               end,
    Every = Env(snapshot_every, 100),
    Cfg = Spool#{backend => Backend, target => Target, node => atom_to_binary(node()), listener => self(),
                 durability => Env(event_durability, async),
                 capacity => Env(event_queue_capacity, 65536), snapshot_every => Every,
                 max_batch => Env(event_max_batch, 8192),
                 linger_us => 1000 * Env(event_flush_interval_ms, 5),
                 %% group-commit gather: 0 adaptive (half the mean commit, at most 5 ms), -1 off, N > 0 at most N µs
                 gather_us => Env(event_gather_us, 0)},
    %% a pass of a server killed without terminate/2 must not outlive it into the new log
    ok = dspex_events_retention:stop_stale(),
    _ = dspex_nif:events_close(),
    case dspex_nif:events_open(Cfg) of
        ok ->
            persistent_term:put({?MODULE, durability}, Env(event_durability, async)),
            _ = ets:whereis(?KEPT) =:= undefined andalso
                ets:new(?KEPT, [ordered_set, public, named_table, {write_concurrency, true}]),
            persistent_term:put({?MODULE, enabled}, true),
            #{last_position := Last} = dspex_nif:events_stats(),
            Retention = Env(event_retention, {days, 90}),
            erlang:send_after(60000, self(), retention),
            Snapshotter = spawn_link(fun() -> snapshotter(Every) end),
            {ok, #{subs => #{}, last => Last, retention => Retention, snapshotter => Snapshotter, every => Every,
                   failures => 0, dir => Dir, ephemeral => Ephemeral, passes => dspex_events_retention:new()}};
        {error, Reason} -> {stop, Reason}
    end.

%% @private
handle_call({subscribe, Filter, Pid, Opts}, _From, #{subs := Subs, last := Last} = St) ->
    Ref = make_ref(),
    Pos = case maps:get(from, Opts, live) of
              %% everything durable now, also a batch whose notice is still on its way here
              live -> max(Last, durable_position());
              P when is_integer(P), P >= 1 -> P - 1
          end,
    Sub = #sub{ref = Ref, pid = Pid, mon = erlang:monitor(process, Pid), filter = Filter, pos = Pos,
               max_queue = maps:get(max_queue, Opts, 10000)},
    St1 = St#{subs := Subs#{Ref => Sub}},
    {reply, {ok, Ref}, deliver(Ref, St1)};
handle_call({unsubscribe, Ref}, _From, #{subs := Subs} = St) ->
    case Subs of
        #{Ref := #sub{mon = M}} -> erlang:demonitor(M, [flush]);
        _ -> ok
    end,
    {reply, ok, St#{subs := maps:remove(Ref, Subs)}};
%% retention runs beside the server (dspex_events_retention): the caller is answered when its pass ends
handle_call(expire_now, From, #{retention := {days, D}} = St) ->
    {noreply, retention(retention_cutoff(D), fun no_hook/1, From, St)};
handle_call({expire_before, Ts, Hooks}, From, St) ->
    {noreply, retention(Ts, maps:get(after_archive, Hooks, fun no_hook/1), From, St)};
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
handle_cast(_, St) -> {noreply, St}.

%% @private
handle_info({dspex_events_written, Pos, N}, #{subs := Subs} = St) ->
    dspex_telemetry:execute([dspex, events, written], #{count => N}, #{position => Pos}),
    St1 = St#{last := max(Pos, maps:get(last, St))},
    {noreply, lists:foldl(fun deliver/2, St1, maps:keys(Subs))};
handle_info({dspex_events_failed, Reason}, #{failures := F} = St) ->
    dspex_telemetry:execute([dspex, events, error], #{count => 1}, #{reason => Reason}),
    {noreply, St#{failures := F + 1}};
handle_info({dspex_events_snapshot_due, _} = Due, #{snapshotter := P} = St) ->
    P ! Due,
    {noreply, St};
handle_info({continue, Ref}, St) -> {noreply, deliver(Ref, St)};
handle_info({'DOWN', M, process, _, _}, #{subs := Subs} = St) ->
    {noreply, St#{subs := maps:filter(fun(_, #sub{mon = M1}) -> M1 =/= M end, Subs)}};
handle_info(retention, #{retention := {days, D}} = St) ->
    erlang:send_after(3600000, self(), retention),
    {noreply, retention(retention_cutoff(D), fun no_hook/1, timer, St)};
handle_info({dspex_events_retention, Pid, Result}, #{passes := Ps} = St) ->
    {noreply, St#{passes := dspex_events_retention:finished(Pid, Result, Ps)}};
handle_info({'EXIT', P, Reason}, #{snapshotter := P, every := Every} = St) ->
    %% a session it could not snapshot is skipped (take_snapshots_safe/4): this is
    %% anything else; a new one takes the next notices, and each replays from its
    %% session's latest snapshot, so no multiple is left without one
    logger:error("dspex_events: the snapshotter stopped: ~tp; started again", [Reason]),
    {noreply, St#{snapshotter := spawn_link(fun() -> snapshotter(Every) end)}};
handle_info({'EXIT', P, Reason}, #{passes := Ps} = St) ->
    %% a retention pass that died before it answered (one that answered is no longer running)
    {noreply, St#{passes := dspex_events_retention:exited(P, Reason, Ps)}};
handle_info(_, St) -> {noreply, St}.

%% @private
terminate(Why, St) ->
    persistent_term:put({?MODULE, enabled}, false),
    %% the pass is gone before the log closes: none of its steps runs on a closed or reopened log
    ok = dspex_events_retention:stop(maps:get(passes, St, dspex_events_retention:new())),
    R = dspex_nif:events_close(),
    %% an unnamed VM's log goes with a clean stop only: after a crash the
    %% restarted server reopens it
    case {Why, St} of
        {W, #{ephemeral := true, dir := Dir}} when W =:= shutdown; W =:= normal; element(1, W) =:= shutdown ->
            _ = file:del_dir_r(Dir);
        _ -> ok
    end,
    R.

%% Sends the subscriber its next page (from the log, by position); schedules the
%% next page when there is more, drops it when its mailbox is over the bound.
deliver(Ref, #{subs := Subs, last := Last} = St) ->
    case Subs of
        #{Ref := #sub{pos = Pos} = Sub} when Pos < Last ->
            case erlang:process_info(Sub#sub.pid, message_queue_len) of
                {message_queue_len, Q} when Q > Sub#sub.max_queue ->
                    Sub#sub.pid ! {dspex_event_overflow, Ref, Pos},
                    erlang:demonitor(Sub#sub.mon, [flush]),
                    St#{subs := maps:remove(Ref, Subs)};
                undefined -> St#{subs := maps:remove(Ref, Subs)};
                _ ->
                    Q0 = maps:merge(#{pos_from => Pos + 1, pos_to => Last, limit => ?SUB_PAGE},
                                    case Sub#sub.filter of
                                        all -> #{};
                                        F -> maps:with([session, types], F)
                                    end),
                    case dspex_nif:events_read(Q0) of
                        {ok, Evs} ->
                            [Sub#sub.pid ! {dspex_event, Ref, E} || E <- Evs],
                            NewPos = case length(Evs) < ?SUB_PAGE of
                                         true -> Last;
                                         false -> maps:get(position, lists:last(Evs))
                                     end,
                            NewPos < Last andalso (self() ! {continue, Ref}),
                            St#{subs := Subs#{Ref := Sub#sub{pos = NewPos}}};
                        {error, _} ->
                            %% the backend cannot be read now (PostgreSQL down): the same page later
                            erlang:send_after(200, self(), {continue, Ref}),
                            St
                    end
            end;
        _ -> St
    end.

%% The snapshot process: for every session that reached a multiple of
%% snapshot_every, replays from its latest snapshot and stores a snapshot at
%% every multiple on the way (notices that arrive while it works are merged).
%% The replay reads only the events that change the state, plus those on a
%% multiple of snapshot_every without their data (see `replay_pages/7'), and
%% keeps histories newest first (see `apply_event/3'); a snapshot holds the
%% stored form (`to_state/1'), the same term as before these were made lean.
%%
%% It keeps the replay state of the last snapshot it stored for each of the
%% `snapshot_cache_sessions' (default 1,000) sessions it stored one for most
%% recently (least recently stored evicted first): the next snapshot of such a
%% session starts from it instead of reading and decoding the stored one. The
%% log is append-only by sequence, so the kept state is the stored snapshot's
%% (the same `to_state/1'); a session not kept (evicted, or the process
%% restarted with the log) reads its latest snapshot as before.
snapshotter(Every) ->
    snapshotter(Every, #{max => 0, tick => 0, states => #{}, lru => gb_trees:empty()}).

snapshotter(Every, Cache) ->
    receive
        {dspex_events_snapshot_due, Due} ->
            D = merge_due(lists:foldl(fun({S, Seq}, Acc) -> due(S, Seq, Acc) end, #{}, Due)),
            Max = application:get_env(dspex_bridge, snapshot_cache_sessions, 1000),
            #{states := States, lru := Lru} = Cache,
            {States1, Lru1} = evict(Max, States, Lru),
            snapshotter(Every, maps:fold(fun(S, Seq, C) -> take_snapshots_safe(S, Seq, Every, C) end,
                                         Cache#{max := Max, states := States1, lru := Lru1}, D));
        {snapshots_sync, From, Tag} ->
            From ! {Tag, ok},
            snapshotter(Every, Cache)
    end.

due(S, Seq, Acc) -> maps:update_with(S, fun(O) -> max(O, Seq) end, Seq, Acc).

merge_due(D) ->
    receive {dspex_events_snapshot_due, Due} -> merge_due(lists:foldl(fun({S, Seq}, Acc) -> due(S, Seq, Acc) end, D, Due))
    after 0 -> D
    end.

%% One session's failure (its log unreadable now, an event the replay cannot
%% take) is logged and leaves the other sessions' snapshots to be taken; the
%% session's next notice tries again from its latest snapshot.
take_snapshots_safe(Session, Due, Every, Cache) ->
    try take_snapshots(Session, Due, Every, Cache)
    catch C:R:Stack ->
            logger:error("dspex_events: snapshots of ~ts up to ~b failed: ~tp", [Session, Due, {C, R, Stack}]),
            #{states := States, lru := Lru} = Cache,
            case States of
                #{Session := {_, _, T}} -> Cache#{states := maps:remove(Session, States), lru := gb_trees:delete(T, Lru)};
                _ -> Cache
            end
    end.

take_snapshots(Session, Due, Every, #{states := States} = Cache) ->
    {From, State0} = case States of
                         #{Session := {KSeq, KState, _}} when KSeq =< Due -> {KSeq, KState};
                         _ ->
                             case dspex_nif:events_latest_snapshot(Session, Due, 0) of
                                 {ok, Seq, _, Snap} -> {Seq, from_state(Snap)};
                                 _ -> {0, undefined}
                             end
                     end,
    %% the snapshots go in transactions of up to 64 (one per snapshot cost more than the snapshot's
    %% encoding); Acc: {the last one with its replay state, those not stored yet}
    Put = fun(N, Ts, St, {Last, Pending}) ->
                  case N rem Every =:= 0 andalso is_map(St) of
                      true ->
                          P1 = [{Session, N, Ts, to_state(St)} | Pending],
                          {{N, St}, case length(P1) >= 64 of
                                        true -> put_snapshots(P1);
                                        false -> P1
                                    end};
                      false -> {Last, Pending}
                  end
          end,
    Stored = case From < Due of
                 true ->
                     case replay_pages(Session, From + 1, Due, 0, Every, {State0, {none, []}}, Put) of
                         {ok, {_, {Last, Pending}}} ->
                             [] = put_snapshots(Pending),
                             Last;
                         _ -> none
                     end;
                 false -> none
             end,
    case Stored of
        {N, St} -> keep(Session, N, St, Cache);
        none -> Cache
    end.

put_snapshots(Pending) ->
    _ = dspex_nif:events_put_snapshots(lists:reverse(Pending)),
    [].

%% The snapshotter's kept states: at most `max' sessions, the least recently stored evicted.
keep(Session, Seq, St, #{max := Max, tick := T, states := States, lru := Lru} = Cache) when Max > 0 ->
    Lru1 = case States of
               #{Session := {_, _, OldT}} -> gb_trees:delete(OldT, Lru);
               _ -> Lru
           end,
    {States2, Lru2} = evict(Max - 1, maps:remove(Session, States), Lru1),
    Cache#{tick := T + 1, states := States2#{Session => {Seq, St, T}}, lru := gb_trees:insert(T, Session, Lru2)};
keep(_, _, _, Cache) -> Cache.

evict(Max, States, Lru) ->
    case gb_trees:size(Lru) > Max of
        true ->
            {_, Old, Lru1} = gb_trees:take_smallest(Lru),
            evict(Max, maps:remove(Old, States), Lru1);
        false -> {States, Lru}
    end.

retention(Ts, Hook, Who, #{passes := Ps} = St) ->
    St#{passes := dspex_events_retention:request(Ts, Hook, Who, Ps)}.

retention_cutoff(Days) -> erlang:system_time(microsecond) - Days * 86400000000.

no_hook(_) -> ok.
