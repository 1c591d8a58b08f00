%% @doc High availability across a BEAM cluster: every session has one owner
%% node and `replicas' replica nodes; calls on any node reach the owner.
%%
%% Configured with the application environment `dspex_bridge' / `cluster':
%% ```
%% #{nodes => ['a@host', 'b@host', 'c@host'],   % the cluster (quorum is a majority of it)
%%   replicas => 1,                             % R (default 1)
%%   replication => sync | async,               % default sync
%%   backend => static | etcd,                  % ownership backend (default static)
%%   keepalive_ms => 5000,                      % replica TTL refresh / expiry period
%%   read => any | majority,                    % reads without a quorum: served marked stale, or refused
%%   route_deadline_ms => 8000,                 % how long routing retries a call
%%   replica_timeout_ms => 5000,                % sync: a replica slower than this fails writes (replica_slow)
%%   etcd => #{endpoint => "http://127.0.0.1:2379", ttl => 2}}
%% '''
%% Without it (the default) nothing here runs and `dspex_store', `dspex_graph',
%% `dspex_acl' and `dspex_locks' work on the local node exactly as before (one
%% `persistent_term' read per call).
%%
%% == Routing ==
%% `dspex_store', `dspex_graph' and `dspex_acl' call `route/4' for every call
%% on a session; each operation has a class (`class/2'):
%% <ul>
%% <li>`write' (`dspex_store' writes; `dspex_graph:add_dependency',
%% `remove_dependency', `clear'; `dspex_acl:set_permissions',
%% `set_rate_limit'): runs in the owner's `dspex_cluster_writer' and is
%% replicated before it is acknowledged (`sync'). Store writes and
%% `set_rate_limit' are replayed on the replicas; a graph or access-rule
%% change ships the whole session (export/import carries the dependencies, the
%% rules and the derive functions): simple, and these changes are rare.</li>
%% <li>`read' (every other call on a session): runs on the owner, through
%% `erpc' from other nodes, on its copy once settled; a node without a quorum
%% serves its copy marked stale (`last_read/0'), or refuses with `{error,
%% no_quorum}' in `majority' read mode (`read_mode/1', or `read' in the
%% configuration).</li>
%% <li>`call' (`dspex_graph:define_derived', watches): runs on the owner node
%% with routing still on, so the writes it makes go through the writer (the
%% propagator of a session lives on its owner).</li>
%% </ul>
%% `dspex_locks' sends its requests to the owner's lock server with
%% `call_server/3' (locks are not replicated; the holder is the calling
%% process wherever it runs, monitored across nodes), and `dspex_store:watch/4'
%% goes through `dspex_cluster_watch' (a relay on the owner; the watcher is
%% told `{dspex_watch_lost, Ref, Session}' when ownership moves).
%%
%% == Errors ==
%% `{error, no_quorum}' (this side of a partition has no majority; nothing was
%% written), `{error, {retry, Why}}' with `Why' one of `owner_down',
%% `replica_unavailable', `replica_slow' (a replica did not confirm within
%% `replica_timeout_ms', see `dspex_cluster_shipper'), `fenced', `timeout' (the write may or may not have
%% been committed: retry it, with `expected_version' to make the retry
%% idempotent), `{error, {unavailable, Why}}' (no owner reachable before the
%% routing deadline, `route_deadline_ms'; nothing was written; `Why'
%% `owner_no_quorum' when this node has a quorum but the owner it names kept
%% answering that it has none, as while the owner's view lags a heal). Redirects
%% between nodes whose views differ for a moment, and takeovers that collide,
%% are retried inside `route/4' (each hop emits `[dspex, cluster, route,
%% retry]') and are never seen by callers. A redirect to a node this node
%% already saw leave (the redirecting node's view lags) is routed again by
%% this node's view, so routing converges as soon as the lagging view catches
%% up. Every call is bounded (see `call_server/3' for the one exception: a lock
%% acquire asked to wait without limit).
-module(dspex_cluster).

-export([settle_replicas_of/1,
         route/4, class/2, local_apply/2, local_apply/3, owner_read/4, owner_call/4, call_server/3, is_owner/1,
         owner_of/1, cluster_status/0, migrate_session/2, drain/1,
         await_drained/2, undrain/1, last_write/0, last_read/0, read_mode/1, read_status/1, served/0,
         owned_sessions/0, handoff_all/0, enabled/0]).

-define(STORE_WRITES, [create_session, delete_session, register, set, set_many, delete, rollback, import_session,
                       register_derived, set_derived]).
-define(CALL_TIMEOUT, 10000).
%% how long a read on the owner waits for the changes it saw to be confirmed
%% (past replica_timeout_ms the shipper has failed them anyway)
-define(COMMIT_WAIT_MS, 6000).

-type op() :: atom() | {module(), atom()}.
-type read_mode() :: any | majority.
-type read_status() :: #{status := current | stale, node := node(), epoch := non_neg_integer(), reason => term()}.
-export_type([op/0, read_mode/0, read_status/0]).

%% @doc Whether this node runs as a cluster member.
-spec enabled() -> boolean().
enabled() -> persistent_term:get(dspex_cluster_routing, false).

%% @doc How `Module:Op' on a session is routed: `write' (in the owner's
%% writer, replicated), `read' (on the owner) or `call' (on the owner node,
%% routing still on).
-spec class(module(), atom()) -> write | read | call.
class(dspex_store, Op) ->
    case lists:member(Op, ?STORE_WRITES) of
        true -> write;
        false -> read
    end;
class(dspex_graph, Op) when Op =:= add_dependency; Op =:= remove_dependency; Op =:= clear -> write;
class(dspex_graph, define_derived) -> call;
class(dspex_acl, Op) when Op =:= set_permissions; Op =:= set_rate_limit -> write;
class(dspex_cluster_watch, _) -> call;
class(dspex_events, append) -> call;   % into the session's log, on its owner
class(dspex_region, _) -> call;        % a session's region decision, made on its owner
class(_, _) -> read.

%% @doc Runs a call on session `S' where the session lives (see the module
%% doc). `Op' is `{Module, Function}' (an atom alone means `dspex_store');
%% `Local' performs it on this node.
-spec route(binary(), op(), list(), fun(() -> term())) -> term().
route(S, Op, Args, Local) when is_atom(Op) -> route(S, {dspex_store, Op}, Args, Local);
route(S, {M, F} = Op, Args, Local) ->
    case get(dspex_cluster_local) of
        true -> Local();
        _ when not is_binary(S) -> Local();   % a type error raises badarg as before
        _ ->
            Deadline = deadline(),
            case class(M, F) of
                write ->
                    %% in a region that is not the session's primary: refused
                    case dspex_region:writable(S) of
                        ok -> write(S, Op, Args, Deadline, undefined);
                        {error, _} = E -> E
                    end;
                read -> read(S, Op, Args, Local, Deadline, undefined);
                call -> call(S, Op, Args, Local, Deadline, undefined)
            end
    end.

%% @equiv local_apply(dspex_store, Op, Args)
-spec local_apply(atom(), list()) -> term().
local_apply(Op, Args) -> local_apply(dspex_store, Op, Args).

%% @doc Runs `Module:Op(Args)' on this node without routing (used by other
%% nodes, and for what must stay local such as a propagator's own watches).
-spec local_apply(module(), atom(), list()) -> term().
local_apply(M, Op, Args) ->
    Was = put(dspex_cluster_local, true),
    try erlang:apply(M, Op, Args)
    after
        case Was of
            true -> ok;
            _ -> erase(dspex_cluster_local)
        end
    end.

%% @doc A read sent by another node, run here if this node may serve it (see
%% `read_mode/1'): `{dspex_cluster_read, Status, Result}' with `Result' of
%% `M:F(Args)' run on this node's copy once it is settled (a takeover when the
%% view changed since its epoch began) and `Status' what it was served from
%% (`last_read/0'); `{dspex_cluster_redirect, Node}' when this node's view
%% names another owner; `{dspex_cluster_retry, Why}' (`majority' only: the
%% copy could not be settled yet; in any mode `starting': this node's
%% membership server has not published a view yet, while the node starts
%% and other nodes may already see it live); `{dspex_cluster_refused, Error}'
%% (`majority' only: no quorum here).
-spec owner_read(binary(), op(), list(), read_mode()) ->
          {dspex_cluster_read, read_status(), term()} | {dspex_cluster_redirect, node()}
          | {dspex_cluster_retry, term()} | {dspex_cluster_refused, term()}.
owner_read(S, Op, Args, Mode) when is_atom(Op) -> owner_read(S, {dspex_store, Op}, Args, Mode);
owner_read(S, {M, F}, Args, Mode) ->
    case dspex_cluster_members:published_view() of
        undefined -> {dspex_cluster_retry, starting};   % nothing read: the caller routes again
        V ->
            case read_here(S, V, Mode) of
                {serve, Status} ->
                    case committed(S, V, Status, fun() -> local_apply(M, F, Args) end,
                                   erlang:monotonic_time(millisecond) + ?COMMIT_WAIT_MS) of
                        {ok, Result} -> {dspex_cluster_read, Status, Result};
                        Retry -> Retry
                    end;
                Other -> Other
            end
    end.

%% A current read returns only what is committed. It runs, then waits until
%% every change it could have seen (applied here, possibly still waiting for
%% its replicas: sync group commit) is resolved, and is answered only if this
%% node is still the settled owner: a change whose replication failed (this
%% node fenced by a takeover that did not see it, a replica gone) makes the
%% read route again, so it never returns a value the next owner's copy may
%% lack. See dspex_cluster_shipper:shipped_table/0. A stale read (served
%% without settling, marked so) is answered as it is.
committed(_S, _V, #{status := current, epoch := 0}, Read, _Until) ->
    %% a session no live member holds: nothing committed to wait for
    {ok, Read()};
committed(S, #{gen := Gen}, #{status := current, epoch := E}, Read, Until) ->
    Result = Read(),
    case dspex_cluster_shipper:await_committed(S, Until) of
        ok ->
            case dspex_cluster_replica:row(S) of
                {S, E, _, Me, _, Gen, F} when Me =:= node(), F =< E -> {ok, Result};
                _ -> {dspex_cluster_retry, unacked}
            end;
        timeout -> {dspex_cluster_retry, unacked}
    end;
committed(_S, _V, _Status, Read, _Until) ->
    {ok, Read()}.

%% Whether this node may serve a read of `S' under view `V', and from what.
read_here(S, V, Mode) ->
    case owner(S, V) of
        none -> stale_or_refuse(S, Mode, no_owner, {dspex_cluster_refused, {unavailable, no_owner}});
        Me when Me =:= node() ->
            case settle(S, V) of
                {ok, Epoch} -> {serve, #{status => current, node => node(), epoch => Epoch}};
                %% no live member holds it (see dspex_cluster_writer:ensure/3):
                %% served here, as current, without taking it over (epoch 0)
                {error, session_not_found} -> {serve, #{status => current, node => node(), epoch => 0}};
                {error, {not_owner, Next}} -> {dspex_cluster_redirect, Next};
                {error, no_quorum} -> stale_or_refuse(S, Mode, no_quorum, {dspex_cluster_refused, no_quorum});
                {error, {retry, Why}} -> stale_or_refuse(S, Mode, Why, {dspex_cluster_retry, Why});
                {error, Why} -> stale_or_refuse(S, Mode, Why, {dspex_cluster_retry, Why})
            end;
        Other -> {dspex_cluster_redirect, Other}
    end.

stale_or_refuse(_S, majority, _Why, Refusal) -> Refusal;
stale_or_refuse(S, any, Why, _) ->
    {serve, #{status => stale, node => node(), epoch => element(2, dspex_cluster_replica:row(S)), reason => Why}}.

%% @doc An owner call sent by another node: `{dspex_cluster_redirect, Node}'
%% when this node's view names another owner, `{dspex_cluster_retry,
%% starting}' (nothing run) while this node has no view yet, else
%% `{dspex_cluster_done, Result}' of `M:F(Args)' run here with routing on.
-spec owner_call(binary(), module(), atom(), list()) ->
          {dspex_cluster_redirect, node()} | {dspex_cluster_retry, starting} | {dspex_cluster_done, term()}.
owner_call(S, M, F, Args) ->
    case dspex_cluster_members:published_view() of
        undefined -> {dspex_cluster_retry, starting};
        V -> owner_call(S, M, F, Args, V)
    end.

owner_call(S, M, F, Args, V) ->
    case owner(S, V) of
        none -> {dspex_cluster_done, erlang:apply(M, F, Args)};
        Me when Me =:= node() ->
            _ = settle(S, V),
            {dspex_cluster_done, erlang:apply(M, F, Args)};
        Other -> {dspex_cluster_redirect, Other}
    end.

%% @doc A call to the registered server `Name' (`dspex_locks') of the node
%% owning `S' (this node's without a cluster). Bounded: a call the server does
%% not answer within 10 s is `{error, {retry, timeout}}' (its outcome is
%% unknown), except a waiting `acquire' (`conflict' `wait' or `preempt'),
%% bounded by its own `timeout' option plus 10 s, and not at all when that
%% option is `infinity' (the caller asked to wait until granted; the call
%% still ends if the server or its node goes away). A call cut by the owner's
%% death is `{error, {retry, owner_down}}'.
-spec call_server(term(), atom(), term()) -> term().
call_server(S, Name, Msg) ->
    case enabled() andalso get(dspex_cluster_local) =/= true andalso is_binary(S) of
        false -> server_call(Name, Msg);
        true -> server(S, Name, Msg, deadline(), undefined)
    end.

server(S, Name, Msg, Deadline, _) ->
    V = dspex_cluster_members:view(),
    case owner(S, V) of
        none -> server_call(Name, Msg);
        Me when Me =:= node() ->
            _ = settle(S, V),
            server_call(Name, Msg);
        Owner ->
            case lists:member(Owner, nodes()) of
                false -> wait_view(S, Name, Msg, Deadline, V, owner_down, fun server/5);
                true ->
                    try server_call({Name, Owner}, Msg)
                    catch
                        exit:{{nodedown, _}, _} -> {error, {retry, owner_down}};
                        exit:{noproc, _} -> wait_view(S, Name, Msg, Deadline, V, owner_down, fun server/5)
                    end
            end
    end.

server_call(Dest, Msg) ->
    try gen_server:call(Dest, Msg, server_timeout(Msg))
    catch exit:{timeout, _} -> {error, {retry, timeout}}
    end.

%% A lock request that waits in the server for its turn is bounded by its own wait.
server_timeout({acquire, _, _, _, #{conflict := C, timeout := infinity}}) when C =/= abort -> infinity;
server_timeout({acquire, _, _, _, #{conflict := C, timeout := T}}) when C =/= abort, is_integer(T) ->
    T + ?CALL_TIMEOUT;
server_timeout(_) -> ?CALL_TIMEOUT.

%% @doc Whether this node holds `Session' as its established owner (always
%% true without a cluster): a session's propagator acts only there.
-spec is_owner(binary()) -> boolean().
is_owner(S) ->
    case enabled() of
        false -> true;
        true ->
            case dspex_cluster_replica:row(S) of
                {S, E, _, Me, _, _, F} when Me =:= node(), F =< E -> true;
                _ -> false
            end
    end.

%% @doc `{Epoch, Owner}' of the calling process's last write routed by the
%% cluster, or `undefined': which owner accepted it and under which epoch.
-spec last_write() -> {non_neg_integer(), node()} | undefined.
last_write() -> get(dspex_cluster_last_write).

%% @doc What the calling process's last read routed by the cluster was served
%% from, or `undefined': `#{status => current, node, epoch}' when the node
%% serving it held the session as its established owner with a quorum (it has
%% every write acknowledged before the read began, as far as that node's view
%% is current), or `#{status => stale, node, epoch, reason}' when it was served
%% from a copy that may miss acknowledged writes: `reason' `no_quorum' (the
%% node is cut off from the majority, which may have taken the session over),
%% `no_owner' (no eligible node) or why the copy could not be settled (such as
%% `contended', `replica_unavailable', `timeout'). `epoch' is the epoch of the
%% copy read.
-spec last_read() -> read_status() | undefined.
last_read() -> get(dspex_cluster_last_read).

%% @doc How a read of `Session' made now by the calling process would be
%% served, without reading anything: routed like a read (in the process's
%% read mode, so `majority' may answer `{error, no_quorum}'), and `{ok,
%% Status}' as `last_read/0' then returns it.
-spec read_status(binary()) -> {ok, read_status()} | {error, term()}.
read_status(S) when is_binary(S) ->
    case enabled() of
        false -> {error, not_clustered};
        true ->
            case route(S, {?MODULE, served}, [], fun served/0) of
                served -> {ok, last_read()};
                {error, _} = Error -> Error
            end
    end.

%% @doc The read that `read_status/1' routes: it reads nothing.
-spec served() -> served.
served() -> served.

%% @doc Sets the read mode of the calling process (`default' goes back to the
%% cluster configuration's `read', itself `any' by default) and returns the
%% previous setting. `any': a read is served from the copy of the node it
%% reaches even when that node has no quorum (marked `stale', see
%% `last_read/0'); `majority': such a read is refused with `{error,
%% no_quorum}', and a copy that cannot be settled yet is retried inside the
%% routing (`{error, {unavailable, Why}}' at the deadline).
-spec read_mode(read_mode() | default) -> read_mode() | default.
read_mode(default) -> was(erase(dspex_cluster_read_mode));
read_mode(Mode) when Mode =:= any; Mode =:= majority -> was(put(dspex_cluster_read_mode, Mode)).

was(undefined) -> default;
was(Mode) -> Mode.

mode(V) ->
    case get(dspex_cluster_read_mode) of
        undefined -> maps:get(read, V, any);
        Mode -> Mode
    end.

target(S, V, undefined) -> owner(S, V);
target(_S, _V, Target) -> Target.

%% The target is not connected to this node. If this node's view named it, the
%% view lags: wait for its next change. If another node's redirect named it,
%% that node's view lags (it has not seen the target leave, and this node's
%% view already moved on, so waiting for a change here would wait for one that
%% happened): route again by this node's view after a short back-off; the
%% lagging node answers as soon as its view catches up.
unreachable(S, Op, Args, D, V, undefined, Fun) -> wait_view(S, Op, Args, D, V, owner_down, Fun);
unreachable(S, Op, Args, D, _V, Redirected, Fun) -> again(S, Op, Args, D, undefined, {stale_redirect, Redirected}, Fun).

write(S, Op, Args, Deadline, Target0) ->
    V = dspex_cluster_members:view(),
    case target(S, V, Target0) of
        %% no eligible node: without a quorum, or every live node draining
        none ->
            case quorum_here(V) of
                true -> {error, {unavailable, draining}};
                false -> {error, no_quorum}
            end;
        Owner ->
            case Owner =:= node() orelse lists:member(Owner, nodes()) of
                false -> unreachable(S, Op, Args, Deadline, V, Target0, fun write/5);
                true ->
                    try call_writer(S, Op, Args, Owner, V) of
                        {{error, {not_owner, Next}}, _, _} ->
                            again(S, Op, Args, Deadline, Next, redirect, fun write/5);
                        {{error, {retry, contended}}, _, _} ->
                            again(S, Op, Args, Deadline, undefined, contended, fun write/5);
                        {{error, {retry, {copy_failed, _, _}}}, _, _} ->
                            again(S, Op, Args, Deadline, undefined, copy_failed, fun write/5);
                        {{error, {retry, replica_unavailable}}, 0, _} ->
                            %% failed during takeover: nothing committed yet
                            again(S, Op, Args, Deadline, undefined, replica_unavailable, fun write/5);
                        {{error, no_quorum}, 0, By} when By =/= node() ->
                            %% the owner's view has no quorum while this one has:
                            %% its view lags a heal (or this one lags a partition,
                            %% and the owner drops out of it soon); nothing was
                            %% written either way
                            case quorum_here(V) of
                                true -> again(S, Op, Args, Deadline, undefined, owner_no_quorum, fun write/5);
                                false -> {error, no_quorum}
                            end;
                        {{dspex_cluster_raise, Class, Reason}, _, _} ->
                            erlang:raise(Class, Reason, []);
                        {Result, Epoch, By} ->
                            put(dspex_cluster_last_write, {Epoch, By}),
                            %% read-your-writes: this node's cached copy is behind now
                            ok = dspex_cache:wrote(S),
                            Result
                    catch
                        exit:{noproc, _} -> wait_view(S, Op, Args, Deadline, V, owner_down, fun write/5);
                        exit:{{nodedown, _}, _} -> {error, {retry, owner_down}};
                        exit:{timeout, _} -> {error, {retry, timeout}};
                        exit:{_, {gen_server, call, _}} -> {error, {retry, owner_down}}
                    end
            end
    end.

%% A write on the owner: a plain set of a session this node owns settled
%% takes the fast path (the set NIF commits and queues its replication record,
%% see dspex_cluster_writer:fast_set/4); anything else, or a session not
%% settled, goes through the session's writer; so does every set while a
%% telemetry handler other than the native analytics listens to
%% `[dspex, store, set, stop]' (the writer's set emits it, the fast path does not).
call_writer(S, {dspex_store, set} = Op, [S, K, Val, Opts] = Args, Owner, #{gen := Gen})
  when Owner =:= node(), Opts =:= #{} ->
    case persistent_term:get(dspex_store_set_observed, true) orelse dspex_cluster_writer:fast_set(S, K, Val, Gen) of
        Slow when Slow =:= true; Slow =:= slow ->
            gen_server:call(dspex_cluster_writer:name(S), {write, S, Op, Args}, ?CALL_TIMEOUT);
        Reply -> Reply
    end;
call_writer(S, Op, Args, Owner, _V) ->
    gen_server:call({dspex_cluster_writer:name(S), Owner}, {write, S, Op, Args}, ?CALL_TIMEOUT).

read(S, Op, Args, Local, Deadline, Target0) ->
    V = dspex_cluster_members:view(),
    Mode = mode(V),
    Retry = fun(S1, Op1, Args1, D1, Next) -> read(S1, Op1, Args1, Local, D1, Next) end,
    Next = fun({dspex_cluster_redirect, N}) -> again(S, Op, Args, Deadline, N, redirect, Retry);
              ({dspex_cluster_retry, Why}) -> again(S, Op, Args, Deadline, undefined, Why, Retry);
              ({dspex_cluster_refused, Error}) -> {error, Error}
           end,
    Target = target(S, V, Target0),
    case Target =:= none orelse Target =:= node() of
        true ->
            case read_here(S, V, Mode) of
                {serve, Status} ->
                    {route, Until, _} = Deadline,
                    case committed(S, V, Status, Local, Until) of
                        {ok, Result} ->
                            put(dspex_cluster_last_read, Status),
                            Result;
                        NotYet -> Next(NotYet)
                    end;
                Other -> Next(Other)
            end;
        false ->
            case lists:member(Target, nodes()) of
                false -> unreachable(S, Op, Args, Deadline, V, Target0, Retry);
                true ->
                    try erpc:call(Target, ?MODULE, owner_read, [S, Op, Args, Mode], ?CALL_TIMEOUT) of
                        {dspex_cluster_read, #{epoch := Epoch} = Status, Result} ->
                            put(dspex_cluster_last_read, Status),
                            %% read repair: a cached copy of an older epoch is dropped
                            ok = dspex_cache:seen(S, Epoch),
                            Result;
                        {dspex_cluster_refused, no_quorum} = Refused ->
                            %% as for a write: the owner's view lags this one's
                            case quorum_here(V) of
                                true -> again(S, Op, Args, Deadline, undefined, owner_no_quorum, Retry);
                                false -> Next(Refused)
                            end;
                        Other -> Next(Other)
                    catch
                        error:{exception, Reason, _} -> erlang:error(Reason);   % the caller's badarg
                        exit:{exception, Reason} -> exit(Reason);
                        error:{erpc, _} = Why -> wait_view(S, Op, Args, Deadline, V, Why, Retry)
                    end
            end
    end.

call(S, {M, F} = Op, Args, Local, Deadline, Target0) ->
    V = dspex_cluster_members:view(),
    Retry = fun(S1, Op1, Args1, D1, Next) -> call(S1, Op1, Args1, Local, D1, Next) end,
    case target(S, V, Target0) of
        none -> Local();
        Me when Me =:= node() ->
            _ = settle(S, V),
            Local();
        Owner ->
            case lists:member(Owner, nodes()) of
                false -> unreachable(S, Op, Args, Deadline, V, Target0, Retry);
                true ->
                    try erpc:call(Owner, ?MODULE, owner_call, [S, M, F, Args], ?CALL_TIMEOUT) of
                        {dspex_cluster_redirect, Next} -> again(S, Op, Args, Deadline, Next, redirect, Retry);
                        {dspex_cluster_retry, Why} -> again(S, Op, Args, Deadline, undefined, Why, Retry);
                        {dspex_cluster_done, Result} -> Result
                    catch
                        error:{exception, Reason, _} -> erlang:error(Reason);   % the caller's badarg
                        exit:{exception, Reason} -> exit(Reason);
                        error:{erpc, noconnection} -> {error, {retry, owner_down}};
                        error:{erpc, timeout} -> {error, {retry, timeout}};
                        error:{erpc, _} = Why -> wait_view(S, Op, Args, Deadline, V, Why, Retry)
                    end
            end
    end.

%% Before serving a call as owner, re-establish ownership if the view changed
%% (the newest copy may be on another node): `{ok, Epoch}' of the copy here,
%% or why it could not be (`no_quorum', `{not_owner, Node}', `{retry, Why}'),
%% or `session_not_found' when no live member ever held a copy: checked here
%% in the caller first, so that reads of unknown ids (any client can send
%% them) take no writer's time and leave nothing behind; the writer checks
%% again (dspex_cluster_writer:ensure/3) before taking anything over.
settle(S, #{gen := Gen, live := Live} = V) ->
    case dspex_cluster_replica:row(S) of
        {S, E, _, Me, _, Gen, F} when Me =:= node(), F =< E -> {ok, E};
        {S, E, Seq, _, _, _, F} ->
            Here = {E, Seq, F, element(1, dspex_nif:session_get(S)) =:= ok},
            case dspex_cluster_replica:never_held(Here) andalso quorum_here(V)
                andalso not held_anywhere(S, Live -- [node()]) of
                true -> {error, session_not_found};
                false -> ensure_here(S)
            end
    end.

ensure_here(S) ->
    try gen_server:call(dspex_cluster_writer:name(S), {ensure, S}, ?CALL_TIMEOUT) of
        {ok, #{epoch := E}} -> {ok, E};
        {error, _} = Err -> Err
    catch exit:{timeout, _} -> {error, {retry, timeout}};
          exit:{Why, _} -> {error, {retry, {writer_down, Why}}}
    end.

%% The routing state of one call: until when it may be retried (the view's
%% `route_deadline_ms' from now) and how many hops it made.
deadline() ->
    Ms = maps:get(route_deadline_ms, dspex_cluster_members:view(), 8000),
    {route, erlang:monotonic_time(millisecond) + Ms, 0}.

again(S, Op, Args, {route, Until, Hops}, Next, Why, Fun) ->
    case erlang:monotonic_time(millisecond) < Until of
        true ->
            retried(S, Op, Why, Next, Hops),
            %% views differ for a moment: back off a little before the next hop
            %% (1, 2, 4 ... 32 ms: a lagging view is caught up within ms of its change)
            receive after backoff(Hops) -> ok end,
            Fun(S, Op, Args, {route, Until, Hops + 1}, Next);
        false -> {error, {unavailable, gave_up(Why)}}
    end.

gave_up(redirect) -> redirect_loop;
gave_up({stale_redirect, _}) -> owner_down;
gave_up(Why) -> Why.

backoff(Hops) -> 1 bsl min(Hops, 5).

%% The owner is gone but the view does not say so yet: wait for the next view.
wait_view(S, Op, Args, {route, Until, Hops} = D, #{gen := Gen}, Why, Fun) ->
    case erlang:monotonic_time(millisecond) < Until of
        false -> {error, {unavailable, Why}};
        true ->
            case maps:get(gen, dspex_cluster_members:view()) of
                Gen -> receive after 10 -> ok end,
                       wait_view(S, Op, Args, D, #{gen => Gen}, Why, Fun);
                _ ->
                    retried(S, Op, Why, undefined, Hops),
                    Fun(S, Op, Args, {route, Until, Hops + 1}, undefined)
            end
    end.

%% `[dspex, cluster, route, retry]': a routed call makes another hop.
retried(S, Op, Why, Next, Hops) ->
    dspex_telemetry:execute([dspex, cluster, route, retry], #{count => 1, hops => Hops + 1},
                            #{session => S, op => Op, reason => Why, node => Next}).

%% Whether this node has a quorum now (the ownership backend's own test: a
%% majority of the nodes live, or a live etcd lease).
quorum_here(#{backend := Backend} = V) -> Backend:quorum(V).

owner(S, V) ->
    case dspex_cluster_writer:owners_memo(S, V) of
        none -> none;
        {O, _} -> O
    end.

%%% operations -------------------------------------------------------------------

%% @doc The node owning `Session' under this node's view.
-spec owner_of(binary()) -> {ok, node()} | {error, no_owner | not_clustered}.
owner_of(S) when is_binary(S) ->
    case enabled() of
        false -> {error, not_clustered};
        true ->
            case owner(S, dspex_cluster_members:view()) of
                none -> {error, no_owner};
                O -> {ok, O}
            end
    end.

%% @doc This node's view of the cluster and what it holds: `node', `nodes'
%% (configured), `live', `draining', `quorum', `gen' (view generation),
%% `replicas', `replication', `backend', `owned' (sessions this node owns) and
%% `replicated' (sessions it holds as a replica).
-spec cluster_status() -> map() | {error, not_clustered}.
cluster_status() ->
    case enabled() of
        false -> {error, not_clustered};
        true ->
            V = dspex_cluster_members:view(),
            Rows = ets:tab2list(dspex_cluster_replica:table()),
            Owned = [S || {S, _, _, O, _, _, _} <- Rows, O =:= node()],
            Held = [S || {S, _, _, O, _, _, _} <- Rows, O =/= node(), O =/= undefined,
                         element(1, dspex_nif:session_get(S)) =:= ok],
            (maps:with([nodes, live, draining, quorum, gen, replicas, replication, backend], V))#{
                node => node(), owned => length(Owned), replicated => length(Held)}
    end.

%% @doc Moves `Session' to `Node': pins it there on every live member, then
%% has `Node' take over (it fences the old owner, copies the newest state and
%% pushes it to its replicas) and returns the epoch and sequence number it
%% took over at. Writes meanwhile are redirected to the new owner by
%% `route/4'; a write in flight at the switch may see `{error, {retry, fenced}}'.
%% A session no live member holds is `{error, session_not_found}', with
%% nothing pinned.
-spec migrate_session(binary(), node()) -> {ok, #{epoch := pos_integer(), seq := non_neg_integer()}} | {error, term()}.
migrate_session(S, Node) when is_binary(S), is_atom(Node) ->
    dspex_telemetry:span([dspex, cluster, migrate], #{session => S, node => Node}, fun() ->
        R = case enabled() andalso dspex_cluster_members:view() of
                false -> {error, not_clustered};
                #{eligible := El, live := Live} ->
                    case lists:member(Node, El) of
                        false -> {error, {not_eligible, Node}};
                        true ->
                            case held_anywhere(S, Live) of
                                false -> {error, session_not_found};
                                true ->
                                    _ = erpc:multicall(Live, dspex_cluster_members, set_override, [S, Node], ?CALL_TIMEOUT),
                                    case ensure_on(Node, S) of
                                        {error, session_not_found} = NotFound ->
                                            %% gone meanwhile: the pin goes too
                                            _ = erpc:multicall(Live, dspex_cluster_members, set_override,
                                                               [S, undefined], ?CALL_TIMEOUT),
                                            NotFound;
                                        Other -> Other
                                    end
                            end
                    end
            end,
        {R, #{session => S, node => Node, result => R}}
    end).

%% Whether a live member may hold (or have held) a copy of `S': false only
%% when every one answered that it never did.
held_anywhere(S, Live) ->
    Answers = erpc:multicall(Live, dspex_cluster_replica, state, [S], ?CALL_TIMEOUT),
    not lists:all(fun({ok, {_, _, _, _} = St}) -> dspex_cluster_replica:never_held(St);
                     (_) -> false
                  end, Answers).

ensure_on(Node, S) ->
    try gen_server:call({dspex_cluster_writer:name(S), Node}, {ensure, S}, ?CALL_TIMEOUT)
    catch exit:Why -> {error, {unavailable, Why}}
    end.

%% @doc Drains `Node': marks it draining on every live member (it owns and
%% replicates nothing from then on) and has it hand each session it owns to
%% the session's new owner. `{ok, Moved}' with the number of sessions moved.
%% Refused with nothing changed: `{error, not_clustered}', `{error,
%% {not_live, Node}}', `{error, no_other_owner}' (no other live node that is
%% not draining could own its sessions: every write would be refused). A
%% handoff that fails midway (`{error, Reason}' of the first session that
%% could not move) leaves `Node' draining: the sessions moved so far stay
%% moved, the others move on their next access or on a repeated `drain/1';
%% `undrain/1' ends the drain.
-spec drain(node()) -> {ok, non_neg_integer()} | {error, term()}.
drain(Node) when is_atom(Node) ->
    dspex_telemetry:span([dspex, cluster, drain], #{node => Node}, fun() ->
        R = case enabled() andalso dspex_cluster_members:view() of
                false -> {error, not_clustered};
                #{live := Live, eligible := El} ->
                    case {lists:member(Node, Live), El -- [Node]} of
                        {false, _} -> {error, {not_live, Node}};
                        {true, []} -> {error, no_other_owner};
                        {true, _} ->
                            _ = erpc:multicall(Live, dspex_cluster_members, set_draining, [Node, true], ?CALL_TIMEOUT),
                            Moved = try erpc:call(Node, ?MODULE, handoff_all, [], 60000)
                                    catch error:Why -> {error, {unavailable, Why}}
                                    end,
                            %% the sessions it replicated get a new replica now, not on
                            %% their next access (the node may be stopped before that)
                            _ = erpc:multicall(Live -- [Node], ?MODULE, settle_replicas_of, [Node], 60000),
                            Moved
                    end
            end,
        {R, #{node => Node, result => R}}
    end).

%% @doc Waits until `Node' owns no session (polling it, bounded by `Timeout' ms).
-spec await_drained(node(), non_neg_integer()) -> ok | {error, timeout}.
await_drained(Node, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    await_drained_loop(Node, Deadline).

await_drained_loop(Node, Deadline) ->
    case catch erpc:call(Node, ?MODULE, owned_sessions, [], 5000) of
        [] -> ok;
        _ ->
            case erlang:monotonic_time(millisecond) < Deadline of
                true -> receive after 20 -> ok end, await_drained_loop(Node, Deadline);
                false -> {error, timeout}
            end
    end.

%% @doc Ends the drain of `Node' on every live member; sessions whose
%% rendezvous owner it is move back on their next access.
-spec undrain(node()) -> ok | {error, not_clustered}.
undrain(Node) when is_atom(Node) ->
    case enabled() of
        false -> {error, not_clustered};
        true ->
            #{live := Live} = dspex_cluster_members:view(),
            _ = erpc:multicall(Live, dspex_cluster_members, set_draining, [Node, false], ?CALL_TIMEOUT),
            dspex_telemetry:execute([dspex, cluster, undrain, stop], #{count => 1}, #{node => Node}),
            ok
    end.

%% @doc Re-establishes ownership (new replica set, the copy on `Node' dropped)
%% of every session this node owns that `Node' replicates.
-spec settle_replicas_of(node()) -> ok.
settle_replicas_of(Node) ->
    [catch gen_server:call(dspex_cluster_writer:name(S), {ensure, S}, ?CALL_TIMEOUT)
     || {S, E, _, O, Reps, _, F} <- ets:tab2list(dspex_cluster_replica:table()),
        O =:= node(), F =< E, lists:member(Node, Reps)],
    ok.

%% @doc Sessions this node owns (an epoch of theirs began here and was not taken over).
-spec owned_sessions() -> [binary()].
owned_sessions() ->
    [S || {S, E, _, O, _, _, F} <- ets:tab2list(dspex_cluster_replica:table()), O =:= node(), F =< E].

%% @doc Hands every session this node owns to its owner under the current view.
-spec handoff_all() -> {ok, non_neg_integer()} | {error, term()}.
handoff_all() ->
    V = dspex_cluster_members:view(),
    Results = [case dspex_cluster_writer:owners(S, V) of
                   none -> {error, no_owner};
                   {Node, _} when Node =:= node() -> {error, still_owner};
                   {Node, _} -> ensure_on(Node, S)
               end || S <- owned_sessions()],
    case [E || {error, _} = E <- Results] of
        [] -> {ok, length(Results)};
        [E | _] -> E
    end.
