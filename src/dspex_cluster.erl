%% @doc High availability across a BEAM cluster: every session has one owner
%% node and `replicas' replica nodes; calls on any node reach the owner.
%%
%% Configured with the application environment `dspex_bridge' / `cluster':
%% ```
%% #{nodes => ['a@host', 'b@host', 'c@host'],   % the cluster (quorum is a majority of it)
%%   replicas => 1,                             % R (default 1)
%%   replication => sync | async,               % default sync
%%   backend => static | etcd,                  % ownership backend (default static)
%%   etcd => #{endpoint => "http://127.0.0.1:2379", ttl => 2}}
%% '''
%% Without it (the default) nothing here runs and `dspex_store' works on the
%% local node exactly as before.
%%
%% `dspex_store' calls `route/4' for every session call. Reads run on the
%% owner; writes run in the owner's `dspex_cluster_writer' and are replicated
%% before they are acknowledged (`sync'). Errors added by the cluster:
%% `{error, no_quorum}' (this side of a partition has no majority; nothing was
%% written), `{error, {retry, Why}}' with `Why' one of `owner_down',
%% `replica_unavailable', `fenced', `timeout' (the write may or may not have
%% been committed: retry it, with `expected_version' to make the retry
%% idempotent), `{error, {unavailable, Why}}' (no owner reachable before the
%% routing deadline; nothing was written). Redirects between nodes whose views
%% differ for a moment, and takeovers that collide, are retried inside
%% `route/4' and are never seen by callers.
-module(dspex_cluster).

-export([settle_replicas_of/1,
         route/4, local_apply/2, owner_read/3, owner_of/1, cluster_status/0, migrate_session/2, drain/1,
         await_drained/2, undrain/1, last_write/0, owned_sessions/0, handoff_all/0, enabled/0]).

-define(WRITES, [create_session, delete_session, register, set, set_many, delete, rollback, import_session]).
-define(CALL_TIMEOUT, 10000).
-define(ROUTE_DEADLINE_MS, 8000).

%% @doc Whether this node runs as a cluster member.
-spec enabled() -> boolean().
enabled() -> persistent_term:get(dspex_cluster_routing, false).

%% @doc Runs a `dspex_store' call where the session lives (see the module doc).
%% `Local' performs it on this node.
-spec route(binary(), atom(), list(), fun(() -> term())) -> term().
route(S, Op, Args, Local) ->
    case get(dspex_cluster_local) of
        true -> Local();
        _ when not is_binary(S) -> Local();   % a type error raises badarg as before
        _ ->
            Deadline = erlang:monotonic_time(millisecond) + ?ROUTE_DEADLINE_MS,
            case lists:member(Op, ?WRITES) of
                true -> write(S, Op, Args, Deadline, undefined);
                false -> read(S, Op, Args, Local, Deadline)
            end
    end.

%% @doc Runs a store call on this node without routing (used by other nodes).
-spec local_apply(atom(), list()) -> term().
local_apply(Op, Args) ->
    put(dspex_cluster_local, true),
    try erlang:apply(dspex_store, Op, Args)
    after erase(dspex_cluster_local)
    end.

%% @doc A read sent by another node: served here after making sure this node's
%% copy is the newest (a takeover when the view changed since its epoch began).
-spec owner_read(binary(), atom(), list()) -> term().
owner_read(S, Op, Args) ->
    V = dspex_cluster_members:view(),
    case owner(S, V) of
        Me when Me =:= node() -> ok = settle(S, V);
        _ -> ok
    end,
    local_apply(Op, Args).

%% @doc `{Epoch, Owner}' of the calling process's last write routed by the
%% cluster, or `undefined': which owner accepted it and under which epoch.
-spec last_write() -> {non_neg_integer(), node()} | undefined.
last_write() -> get(dspex_cluster_last_write).

write(S, Op, Args, Deadline, Target0) ->
    V = dspex_cluster_members:view(),
    Target = case Target0 of
                 undefined -> owner(S, V);
                 _ -> Target0
             end,
    case Target of
        none -> {error, no_quorum};
        Owner ->
            case Owner =:= node() orelse lists:member(Owner, nodes()) of
                false -> wait_view(S, Op, Args, Deadline, V, owner_down, fun write/5);
                true ->
                    try gen_server:call({dspex_cluster_writer:name(S), Owner}, {write, S, Op, Args}, ?CALL_TIMEOUT) of
                        {{error, {not_owner, Next}}, _, _} ->
                            again(S, Op, Args, Deadline, Next, fun write/5);
                        {{error, {retry, contended}}, _, _} ->
                            again(S, Op, Args, Deadline, undefined, fun write/5);
                        {{error, {retry, {copy_failed, _, _}}}, _, _} ->
                            again(S, Op, Args, Deadline, undefined, fun write/5);
                        {{error, {retry, replica_unavailable}}, 0, _} ->
                            %% failed during takeover: nothing committed yet
                            again(S, Op, Args, Deadline, undefined, fun write/5);
                        {{dspex_cluster_raise, Class, Reason}, _, _} ->
                            erlang:raise(Class, Reason, []);
                        {Result, Epoch, By} ->
                            put(dspex_cluster_last_write, {Epoch, By}),
                            Result
                    catch
                        exit:{noproc, _} -> wait_view(S, Op, Args, Deadline, V, owner_down, fun write/5);
                        exit:{{nodedown, _}, _} -> {error, {retry, owner_down}};
                        exit:{timeout, _} -> {error, {retry, timeout}};
                        exit:{_, {gen_server, call, _}} -> {error, {retry, owner_down}}
                    end
            end
    end.

read(S, Op, Args, Local, Deadline) ->
    V = dspex_cluster_members:view(),
    case owner(S, V) of
        none -> Local();
        Owner when Owner =:= node() ->
            ok = settle(S, V),
            Local();
        Owner ->
            try erpc:call(Owner, ?MODULE, owner_read, [S, Op, Args], ?CALL_TIMEOUT)
            catch
                error:{exception, Reason, _} -> erlang:error(Reason);   % the caller's badarg
                exit:{exception, Reason} -> exit(Reason);
                error:{erpc, _} = Why ->
                    Retry = fun(S1, Op1, Args1, D1, _) -> read(S1, Op1, Args1, Local, D1) end,
                    wait_view(S, Op, Args, Deadline, V, Why, Retry)
            end
    end.

%% Before serving a read as owner, re-establish ownership if the view changed
%% (the newest copy may be on another node).
settle(S, #{gen := Gen}) ->
    case dspex_cluster_replica:row(S) of
        {S, E, _, Me, _, Gen, F} when Me =:= node(), F =< E -> ok;
        _ ->
            _ = gen_server:call(dspex_cluster_writer:name(S), {ensure, S}, ?CALL_TIMEOUT),
            ok
    end.

again(S, Op, Args, Deadline, Next, Fun) ->
    case erlang:monotonic_time(millisecond) < Deadline of
        true ->
            %% views differ for a moment: back off a little before the next hop
            receive after 5 -> ok end,
            Fun(S, Op, Args, Deadline, Next);
        false -> {error, {unavailable, redirect_loop}}
    end.

%% The owner is gone but the view does not say so yet: wait for the next view.
wait_view(S, Op, Args, Deadline, #{gen := Gen}, Why, Fun) ->
    case erlang:monotonic_time(millisecond) < Deadline of
        false -> {error, {unavailable, Why}};
        true ->
            case maps:get(gen, dspex_cluster_members:view()) of
                Gen -> receive after 10 -> ok end,
                       wait_view(S, Op, Args, Deadline, #{gen => Gen}, Why, Fun);
                _ -> Fun(S, Op, Args, Deadline, undefined)
            end
    end.

owner(S, V) ->
    case dspex_cluster_writer:owners(S, V) of
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
-spec migrate_session(binary(), node()) -> {ok, #{epoch := pos_integer(), seq := non_neg_integer()}} | {error, term()}.
migrate_session(S, Node) when is_binary(S), is_atom(Node) ->
    dspex_telemetry:span([dspex, cluster, migrate], #{session => S, node => Node}, fun() ->
        R = case enabled() andalso dspex_cluster_members:view() of
                false -> {error, not_clustered};
                #{eligible := El, live := Live} ->
                    case lists:member(Node, El) of
                        false -> {error, {not_eligible, Node}};
                        true ->
                            _ = erpc:multicall(Live, dspex_cluster_members, set_override, [S, Node], ?CALL_TIMEOUT),
                            ensure_on(Node, S)
                    end
            end,
        {R, #{session => S, node => Node, result => R}}
    end).

ensure_on(Node, S) ->
    try gen_server:call({dspex_cluster_writer:name(S), Node}, {ensure, S}, ?CALL_TIMEOUT)
    catch exit:Why -> {error, {unavailable, Why}}
    end.

%% @doc Drains `Node': marks it draining on every live member (it owns and
%% replicates nothing from then on) and has it hand each session it owns to
%% the session's new owner. `{ok, Moved}' with the number of sessions moved.
-spec drain(node()) -> {ok, non_neg_integer()} | {error, term()}.
drain(Node) when is_atom(Node) ->
    dspex_telemetry:span([dspex, cluster, drain], #{node => Node}, fun() ->
        R = case enabled() andalso dspex_cluster_members:view() of
                false -> {error, not_clustered};
                #{live := Live} ->
                    case lists:member(Node, Live) of
                        false -> {error, {not_live, Node}};
                        true ->
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
