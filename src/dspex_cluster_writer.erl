%% @doc The owner side of a session: every write to a session this node owns
%% runs here, in the pool process the session maps to, so that commits and
%% their replication are in one order per session.
%%
%% A write first makes sure this node owns the session under the current view
%% (`ensure'): if the view changed since the session's epoch began, it takes
%% over again: it asks the live members for their state, claims a higher epoch
%% from the ownership backend, fences every live member at that epoch (they
%% refuse changes from older epochs from then on), installs the newest copy
%% (the highest `{Epoch, Seq}' any member holds), pushes it to the replicas and
%% drops the copies of the other nodes. Then it commits locally and ships the
%% change. `sync': the change goes to the `dspex_cluster_shipper' of each
%% replica node (group commit: the changes of every session of this node
%% travel to a replica node in batches, pipelined), and the writer goes on
%% with its next write at once; the caller is answered when every replica
%% applied the change (and the owner was not fenced meanwhile), or gets the
%% shipper's error. `async': the change goes to the same shippers with nobody
%% to answer, the caller is answered at once (a replica that missed changes
%% gets a full copy from the shipper).
%%
%% The fast path (issue #21): once a write left the session settled here
%% (sync or async, any number of replicas up to 16, no strong reads, no
%% regions), the writer publishes a native descriptor of it, and a plain `dspex_store:set' made on this node
%% runs the set NIF itself, which commits and queues the replication record
%% in one critical section (`fast_set/4'); before the writer does anything
%% for the session it unsettles the descriptor (`hold/1'), so its own writes
%% and the fast path's never interleave.
%%
%% A write is `{Module, Function}' with its arguments (see
%% `dspex_cluster:class/2'): `dspex_store' writes are replayed on the replicas
%% (`set' and friends with the version they reached), `dspex_acl:set_rate_limit'
%% is replayed, and `dspex_graph'/`dspex_acl' rule changes ship the whole
%% session (its export carries dependencies, rules and derive functions).
-module(dspex_cluster_writer).
-behaviour(gen_server).

-export([start_link/1, name/1, owners/2, owners_memo/2, fast_set/4]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(POOL, 8).
-define(RPC_TIMEOUT, 5000).
-define(RECONCILE_ATTEMPTS, 6).
-define(RECONCILE_BACKOFF_MS, 50).
%% sessions whose owners/2 a process remembers for the current view
-define(OWNERS_MEMO, 256).

%% @doc Starts writer `I' of the pool.
-spec start_link(non_neg_integer()) -> {ok, pid()} | {error, term()}.
start_link(I) -> gen_server:start_link({local, pname(I)}, ?MODULE, [], []).

%% @doc The registered name of the pool process serving `Session'.
-spec name(binary()) -> atom().
name(S) -> pname(erlang:phash2(S, ?POOL)).

pname(I) -> list_to_atom("dspex_cluster_writer_" ++ integer_to_list(I)).

%% @doc `{Owner, Replicas}' of a session under a view (`none' without eligible
%% nodes): a pinned node if eligible, else rendezvous hashing over the
%% eligible nodes; the replicas are the next `replicas' of the ranking.
-spec owners(binary(), dspex_cluster_members:view()) -> {node(), [node()]} | none.
owners(S, #{eligible := El, overrides := O, replicas := R}) ->
    Ranked = case O of
                 #{S := T} -> case lists:member(T, El) of
                                  true -> [T | rank(S, El -- [T])];
                                  false -> rank(S, El)
                              end;
                 _ -> rank(S, El)
             end,
    case Ranked of
        [] -> none;
        [Owner | Rest] -> {Owner, lists:sublist(Rest, R)}
    end.

%% @doc `owners/2', remembered by the calling process for the view it was
%% computed under (the process dictionary, at most 256 sessions; another view,
%% or a full memo, starts afresh): a write ranks the nodes of its session once
%% per view and process, not once in the caller and once in the writer. The
%% view is compared whole (a `persistent_term' value: the same view is the
%% same term), so a memo never outlives the view it was computed under.
-spec owners_memo(binary(), dspex_cluster_members:view()) -> {node(), [node()]} | none.
owners_memo(S, V) ->
    case get(dspex_cluster_owners) of
        {V, #{S := R}} -> R;
        {V, M} when map_size(M) < ?OWNERS_MEMO ->
            R = owners(S, V),
            put(dspex_cluster_owners, {V, M#{S => R}}),
            R;
        _ ->
            R = owners(S, V),
            put(dspex_cluster_owners, {V, #{S => R}}),
            R
    end.

rank(S, Nodes) ->
    [N || {_, N} <- lists:sort([{-erlang:phash2({S, N}, 4294967296), N} || N <- Nodes])].

%%% server ----------------------------------------------------------------------

-spec init([]) -> {ok, #{}}.
init([]) ->
    %% store calls made here run locally instead of being routed again
    put(dspex_cluster_local, true),
    %% a previous writer of these sessions that crashed between announcing a
    %% change and shipping it left it announced forever: reads of the
    %% session would wait for it (see dspex_cluster_shipper:shipped_table/0)
    {registered_name, Me} = process_info(self(), registered_name),
    %% (announced, never applied or shipped: the session's seq did not move)
    _ = [dspex_cluster_shipper:withdraw(S, E, RowSeq)
         || {S, {E, Seq}, R} <- ets:tab2list(dspex_cluster_shipper:shipped_table()), R < {E, Seq}, name(S) =:= Me,
            {_, E1, RowSeq, _, _, _, _} <- [dspex_cluster_replica:row(S)], E1 =:= E, Seq =:= RowSeq + 1],
    {ok, #{}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()} | {noreply, map()}.
handle_call(Msg, From, St) ->
    %% no fast-path set of the session runs while its writer works on it
    hold(case Msg of
             {_, S0} -> S0;
             {_, S0, _, _} -> S0;
             _ -> none
         end),
    Reply = call(Msg, From, St),
    _ = case {Msg, dspex_cluster_members:published_view()} of
            {{write, S, _, _}, #{} = V} -> publish(S, V);
            _ -> ok
        end,
    Reply.

call({write, S, Op, Args}, From, St) ->
    case dspex_cluster_members:published_view() of
        undefined ->
            %% this node is starting: nothing written, the caller routes again
            {reply, {{error, {retry, replica_unavailable}}, 0, node()}, St};
        V ->
            %% a session moved to another region (dspex_region:move_session/2) takes no writes here
            case dspex_region_shipper:admit(S, ensure(S, V, need(Op))) of
                {ok, Own} ->
                    case write(S, Op, Args, Own, V, From) of
                        shipped -> {noreply, St};   % answered once the replicas confirmed it
                        Reply -> {reply, Reply, St}
                    end;
                {error, _} = E -> {reply, {E, 0, node()}, St}
            end
    end;
call({export_for, S}, _From, St) ->
    %% a replica missed changes of S (dspex_cluster_shipper): the session as
    %% of this owner's current {epoch, seq}
    case dspex_cluster_replica:row(S) of
        {S, E, Seq, Me, _, _, F} when Me =:= node(), F =< E -> {reply, {ok, E, Seq, log_mark(S, local_export(S))}, St};
        _ -> {reply, {error, not_owner}, St}
    end;
call({ensure, S}, _From, St) ->
    case dspex_cluster_members:published_view() of
        undefined -> {reply, {error, {retry, replica_unavailable}}, St};
        V -> {reply, ensure_reply(S, V), St}
    end.

ensure_reply(S, V) ->
    case ensure(S, V, existing) of
        {ok, {E, Seq, _}} -> {ok, #{epoch => E, seq => Seq}};
        {error, _} = Err -> Err
    end.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({_, S} = Msg, St) when is_binary(S) ->
    hold(S),
    cast(Msg, St);
handle_cast({_, S, _} = Msg, St) when is_binary(S) ->
    hold(S),
    cast(Msg, St);
handle_cast(_, St) -> {noreply, St}.

cast({release_if_not_owner, S}, St) ->
    %% ensure releases the backend's hold when this node is not the owner
    _ = case dspex_cluster_members:published_view() of
            undefined -> ok;
            V -> ensure(S, V, existing)
        end,
    {noreply, St};
cast({expired, S}, St) ->
    %% the sweeper removed a session this node owns: replicate the deletion,
    %% then stop owning it (the next access takes over again)
    case dspex_cluster_replica:row(S) of
        {S, E, Seq, Me, Reps, G, F} when Me =:= node(), F =< E ->
            case lists:member(S, dspex_nif:session_list()) of
                false ->
                    #{replication := Mode} = dspex_cluster_members:view(),
                    %% the replicas copy the owner's session_deleted (reason expired)
                    P = case dspex_events:last_sequence(S) of
                            undefined -> delete_session;
                            Post -> {ev, undefined, Post, delete_session, []}
                        end,
                    _ = replicate(S, E, Seq + 1, P, Reps, Mode),
                    %% and to the backup regions, in order after its last change
                    _ = dspex_region_shipper:committed(S, E, Seq + 1, P, none),
                    ok = dspex_cache:committed(S, E, Seq + 1),
                    dspex_cluster_watch:lost(S, ended),
                    dspex_cluster_replica:put_row({S, E, Seq + 1, expired, Reps, G, F}),
                    ok = dspex_nif:repl_forget(S);
                true -> ok
            end;
        _ -> ok
    end,
    {noreply, St};
cast({reconcile, S, Attempt}, St) ->
    reconcile(S, Attempt),
    {noreply, St};
cast(_, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({reconcile, S, Attempt}, St) ->
    hold(S),
    reconcile(S, Attempt),
    {noreply, St};
handle_info({need_full, S, Node}, St) ->
    hold(S),
    %% an async replica missed a change: send it the whole session
    case dspex_cluster_replica:row(S) of
        {S, E, Seq, Me, Reps, _, _} when Me =:= node() ->
            case lists:member(Node, Reps) of
                true ->
                    case dspex_cluster_replica:export(S) of
                        {ok, Exp, _, _} ->
                            gen_server:cast({dspex_cluster_replica:name(S), Node}, {install, S, E, Seq, node(), Exp});
                        {error, timeout} -> ok   % the replica asks again after the next change
                    end;
                false -> ok
            end;
        _ -> ok
    end,
    {noreply, St};
handle_info(_, St) -> {noreply, St}.

%%% the fast path (issue #21) -------------------------------------------------------

%% @doc `dspex_store:set(S, K, V)' (no options) made by the caller itself on
%% this node, the session's owner, when its writer published it as settled
%% under view generation `Gen' (`publish/2'): the set NIF commits and appends
%% the replication record to the native queue of every replica link of the
%% session in one critical section (`dspex_nif:repl_set/6'). `sync': the
%% caller waits for the shippers' answer (one answer: the write's, once every
%% replica applied it, or the first failure), as it waits for the writer
%% otherwise: `{Reply, Epoch, node()}' like a write call, or `slow' (nothing
%% done: go through the writer). A shipper going down is `{retry,
%% replica_unavailable}'; no answer within 10 s `{retry, timeout}'. `async':
%% answered once committed and queued; while a link's queue is full (65536
%% records: the replica is that far behind) the caller waits for room,
%% nothing committed, and gets `{retry, replica_slow}' after 10 s
%% (back-pressure: memory stays bounded, writers slow down to the replica's
%% pace instead of failing).
-spec fast_set(binary(), term(), term(), non_neg_integer()) -> slow | {term(), non_neg_integer(), node()}.
fast_set(S, K, V, Gen) ->
    fast_set(S, K, V, Gen, erlang:monotonic_time(millisecond) + ?RPC_TIMEOUT * 2, 0).

fast_set(S, K, V, Gen, Deadline, Waited) ->
    Alias = alias(),
    case dspex_nif:repl_set(S, K, V, Gen, {Alias, Alias}, erlang:monotonic_time()) of
        {queued, Shippers, E, _Seq, _} ->
            Mons = maps:from_list([{erlang:monitor(process, P), P} || P <- Shippers]),
            Done = fun() ->
                           _ = [erlang:demonitor(M, [flush]) || M <- maps:keys(Mons)],
                           unalias(Alias)
                   end,
            receive
                {Alias, Reply} ->
                    Done(),
                    Reply;
                {'DOWN', Mon, process, _, _} when is_map_key(Mon, Mons) ->
                    Done(),
                    {{error, {retry, replica_unavailable}}, E, node()}
            after ?RPC_TIMEOUT * 2 ->
                Done(),
                %% an answer that came in meanwhile is dropped, later ones are never delivered
                receive {Alias, _} -> ok after 0 -> ok end,
                {{error, {retry, timeout}}, E, node()}
            end;
        {done, E, R} ->
            unalias(Alias),
            {R, E, node()};
        {wait, E} ->
            %% async, a link queue full (nothing committed): back-pressure,
            %% the caller waits for room (polled: the shipper drains the
            %% queue a batch at a time), at most the write timeout
            unalias(Alias),
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> {{error, {retry, replica_slow}}, E, node()};
                false ->
                    _ = Waited < 100 andalso erlang:yield(),
                    _ = Waited >= 100 andalso timer:sleep(1),
                    fast_set(S, K, V, Gen, Deadline, Waited + 1)
            end;
        slow ->
            unalias(Alias),
            slow
    end.

%% Before the writer does anything for `S': no fast-path set of it runs from
%% now on (one in flight has committed and queued its record when this
%% returns), and the row's seq catches up with the fast path's.
hold(S) when is_binary(S) ->
    case dspex_nif:repl_unsettle(S) of
        none -> ok;
        {E, NSeq} ->
            case dspex_cluster_replica:row(S) of
                {S, E, Seq, _, _, _, _} when Seq < NSeq ->
                    true = ets:update_element(dspex_cluster_replica:table(), S, {3, NSeq}),
                    ok;
                _ -> ok
            end
    end;
hold(_) -> ok.

%% After a write: `S' takes the fast path (`fast_set/4') from now on when this
%% node owns it settled under view `V', with sync or async replication to
%% replicas whose shippers run (at most 16; the record goes to each), and
%% nothing the set NIF cannot do alone is configured:
%% no strong reads (leases to revoke before a commit), no regions (a backup
%% region gets every change from the writer), and the static ownership
%% backend (its quorum follows from the view, whose generation the fast path
%% checks; etcd's depends on a lease that can lapse at any time, which only
%% the writer's checks see). With the event log on, the
%% record carries the sequence of the set's event (the replicas' logs follow).
publish(S, #{gen := Gen, replication := Mode, backend := dspex_owner_static}) ->
    case dspex_cluster_replica:row(S) of
        {S, E, Seq, Me, [_ | _] = Reps, Gen, F} = Row when Me =:= node(), F =< E, length(Reps) =< 16 ->
            %% (a deleted session is not published again)
            Links = fast_allowed() andalso element(1, dspex_nif:session_get(S)) =:= ok
                andalso [dspex_cluster_shipper:link(Rep) || Rep <- Reps],
            case is_list(Links) andalso lists:all(fun is_integer/1, Links) of
                true ->
                    %% the event log numbers the session's next event without its backend
                    _ = dspex_events:last_sequence(S),
                    ok = dspex_nif:repl_publish(S, E, Seq, Gen, Links, Mode),
                    %% a fence (dspex_cluster_replica) or a failed record (the
                    %% shipper) changes the row, then unsettles: if it changed
                    %% before the publication, unsettle here
                    case dspex_cluster_replica:row(S) of
                        Row -> ok;
                        _ -> _ = dspex_nif:repl_unsettle(S), ok
                    end;
                false -> ok
            end;
        _ -> ok
    end;
publish(_, _) -> ok.

fast_allowed() ->
    not dspex_cache:strong_enabled()
        andalso persistent_term:get({dspex_region, name}, undefined) =:= undefined.

%%% ownership ---------------------------------------------------------------------

%% After nodes joined (see dspex_cluster_keeper): re-establish the session
%% here if this node owns it under the current view. A takeover that cannot
%% finish yet (this node's view still lacks a quorum, a member did not
%% answer) is tried again a few times, 50 ms, 100 ms ... 1.6 s later; past
%% that the next access settles it.
reconcile(S, Attempt) ->
    case dspex_cluster_members:published_view() of
        %% starting: asked by another node (its keeper settles the tombstones
        %% of a deletion this node owned before it restarted, see
        %% dspex_cluster_keeper), tried again as a takeover that cannot finish
        undefined when Attempt < ?RECONCILE_ATTEMPTS ->
            erlang:send_after(?RECONCILE_BACKOFF_MS bsl Attempt, self(), {reconcile, S, Attempt + 1}),
            ok;
        undefined -> ok;
        V -> reconcile(S, Attempt, V)
    end.

reconcile(S, Attempt, V) ->
    case ensure(S, V, existing) of
        {error, Why} when Attempt < ?RECONCILE_ATTEMPTS, Why =:= no_quorum orelse element(1, Why) =:= retry ->
            erlang:send_after(?RECONCILE_BACKOFF_MS bsl Attempt, self(), {reconcile, S, Attempt + 1}),
            ok;
        _ -> ok
    end.

%% Only a write that creates the session (`create'; `need/1') takes over a
%% session no live member knows: anything else (`existing': reads, owner
%% calls, other writes, migrations) answers `{error, session_not_found}'
%% then, so that requests naming unknown sessions (any client can send
%% ids) leave no row, fence or pin behind on any node.
ensure(S, #{gen := Gen, backend := Backend} = V, Need) ->
    case Backend:quorum(V) andalso owners_memo(S, V) of
        false -> {error, no_quorum};
        %% a quorum but no eligible node: every live node is draining
        none -> {error, {unavailable, draining}};
        {Owner, _} when Owner =/= node() ->
            case dspex_cluster_replica:row(S) of
                {S, _, _, Me, _, _, _} when Me =:= node() -> ok = Backend:release(S);
                _ -> ok
            end,
            {error, {not_owner, Owner}};
        {_, Reps} ->
            case dspex_cluster_replica:row(S) of
                {S, E, Seq, Me, Reps, Gen, F} when Me =:= node(), F =< E -> {ok, {E, Seq, Reps}};
                _ -> takeover(S, Reps, V, Need)
            end
    end.

%% What a write needs: the session created by it, or existing already.
need({dspex_store, Op}) -> need(Op);
need(Op) when Op =:= create_session; Op =:= import_session -> create;
need(_) -> existing.

takeover(S, Reps, #{live := Live} = V, Need) ->
    case dspex_cluster_replica:state(S) of
        {error, timeout} -> {error, {retry, replica_unavailable}};
        Here -> takeover(S, Reps, V, Here, Live -- [node()], Need)
    end.

takeover(S, Reps, #{gen := Gen, backend := Backend} = V, {E0, Seq0, F0, Present0} = Here, Others, Need) ->
    T0 = erlang:monotonic_time(),
    Answers = erpc:multicall(Others, dspex_cluster_replica, state, [S], ?RPC_TIMEOUT),
    States = [St || {ok, {_, _, _, _} = St} <- Answers],
    Proposed = 1 + lists:max([E0, F0 | [max(E, F) || {E, _, F, _} <- States]]),
    %% every live member (a majority: this node has a quorum) answered that
    %% it never held a copy: the session does not exist, and a takeover would
    %% only install an empty one
    Unknown = Need =:= existing andalso length(States) =:= length(Others)
        andalso lists:all(fun dspex_cluster_replica:never_held/1, [Here | States]),
    case Unknown orelse Backend:claim(S, Proposed, V) of
        true -> {error, session_not_found};
        {ok, Epoch} ->
            Fenced = lists:zip(Others, erpc:multicall(Others, dspex_cluster_replica, fence, [S, Epoch], ?RPC_TIMEOUT)),
            Unfenced = [N || {N, R} <- Fenced, not is_fenced(R)],
            case [N || {N, {ok, {error, {stale_epoch, _}}}} <- Fenced] of
                [_ | _] -> {error, {retry, contended}};
                [] when Unfenced =/= [] ->
                    %% a live member did not confirm the fence (no answer in
                    %% time, or the connection is gone while the view still
                    %% lists it): it might hold the newest copy, or still take
                    %% the old owner's changes; retried until it answers or
                    %% the view drops it
                    {error, {retry, replica_unavailable}};
                [] ->
                    %% this node's own replica role must refuse the old owner too
                    dspex_cluster_replica:put_row(setelement(7, dspex_cluster_replica:row(S), Epoch)),
                    %% a deletion counts as a copy (a session deleted at a
                    %% newer {epoch, seq} than any copy stays deleted); a
                    %% deletion is replicated with its own seq (> 0), while a
                    %% node dropped at a takeover, or that never held the
                    %% session, has seq 0 there and counts for nothing
                    Copies = [{{E, Seq}, P, N} || {N, {ok, {ok, {E, Seq, P}}}} <- Fenced, P orelse Seq > 0]
                        ++ [{{E0, Seq0}, Present0, node()} || Present0 orelse Seq0 > 0],
                    finish_takeover(S, Reps, Epoch, Gen, Copies, Others, T0)
            end;
        {error, {held_by, Holder}} ->
            %% the backend says another node still holds it (etcd): ask it to
            %% let go if it is no longer the owner in its view; asynchronously,
            %% so that two nodes asking each other cannot deadlock
            gen_server:cast({name(S), Holder}, {release_if_not_owner, S}),
            {error, {retry, contended}};
        {error, _} = Err -> Err
    end.

is_fenced({ok, {ok, {_, _, _}}}) -> true;
is_fenced(_) -> false.

finish_takeover(S, Reps, Epoch, Gen, Copies, Others, T0) ->
    %% copies holding writes the newest one lacks (dspex_cache), read before
    %% they are replaced
    Conflicts = dspex_cache:find_conflicts(S, Copies),
    %% the newest {epoch, seq}; at equal ones a present copy wins over a
    %% deletion (a replica's copy may have expired locally)
    {Seq, Got} = case lists:reverse(lists:sort(Copies)) of
                     [] -> {0, ok};
                     [{{_, BestSeq}, _, Me} | _] when Me =:= node() -> {BestSeq, ok};
                     [{{_, BestSeq}, false, _} | _] -> {BestSeq, replace_local(S, absent)};
                     [{{_, BestSeq}, true, Best} | _] ->
                         case catch erpc:call(Best, dspex_cluster_replica, export, [S], ?RPC_TIMEOUT) of
                             {ok, Exp, _, _} ->
                                 %% the copy's log too: the events Best has and this node lacks
                                 Got0 = case replace_local(S, Exp) of
                                            ok -> follow(S, Best);
                                            Err0 -> Err0
                                        end,
                                 {BestSeq, Got0};
                             Other -> {BestSeq, {error, {retry, {copy_failed, Best, Other}}}}
                         end
                 end,
    case Got of
        ok ->
            Export = local_export(S),
            Pushed = erpc:multicall(Reps, dspex_cluster_replica, install, [S, Epoch, Seq, node(), Export], ?RPC_TIMEOUT),
            case [R || R <- Pushed, R =/= {ok, ok}] of
                [] ->
                    %% nodes holding a copy they must drop log session_deleted
                    %% (reason migrated) under the sequence this node's log
                    %% gives the move (session_migrated), so that the logs stay
                    %% aligned if one of them holds the session again
                    Dropping = [N || {_, true, N} <- Copies, N =/= node(), not lists:member(N, Reps)],
                    Mark = case Dropping of
                               [] -> undefined;
                               _ -> dspex_events:mark_migrated(S, #{to => node(), epoch => Epoch, dropped => Dropping})
                           end,
                    _ = erpc:multicall(Others -- Reps, dspex_cluster_replica, drop, [S, Epoch, node(), Mark], ?RPC_TIMEOUT),
                    %% one database for every node: continue after what it holds
                    _ = dspex_events:reseed(S),
                    dspex_cluster_replica:put_row({S, Epoch, Seq, node(), Reps, Gen, Epoch}),
                    true = dspex_cluster_shipper:settled_at(S, Epoch, Seq),
                    ok = dspex_cache:record_conflicts(S, Epoch, Conflicts, Export),
                    %% strong reads: leases the previous owner granted are
                    %% waited out (none can exist if no member held S)
                    _ = Copies =/= [] andalso dspex_cache:took_over(S),
                    %% locks do not travel: the old owner's are gone with it, and
                    %% tokens granted here from now on are above any it granted
                    %% (its counter started from its clock, at an earlier time)
                    _ = dspex_nif:lock_token_floor(erlang:system_time(microsecond)),
                    dspex_telemetry:execute([dspex, cluster, takeover, stop],
                                            #{duration => erlang:monotonic_time() - T0},
                                            #{session => S, epoch => Epoch, seq => Seq, replicas => Reps}),
                    {ok, {Epoch, Seq, Reps}};
                _ -> {error, {retry, replica_unavailable}}
            end;
        {error, _} = Err -> Err
    end.

%% An export the shipper installs on a replica while this node goes on
%% committing: the copy's log must follow this node's only up to the event
%% of the export's last change (dspex_cluster_replica:install/5), not to
%% whatever this log holds by then, or the changes after the export would
%% find their events already copied and log them a second time.
log_mark(_S, absent) -> absent;
log_mark(S, Exp) ->
    case dspex_events:last_sequence(S) of
        undefined -> Exp;
        N -> Exp#{dspex_log_seq => N}
    end.

local_export(S) ->
    case dspex_store:export_session(S) of
        {ok, X} -> X#{dspex_vv => dspex_cache:vv(S)};   % its lineage travels with it
        {error, _} -> absent
    end.

follow(S, Node) ->
    case dspex_events:follow(S, Node, latest) of
        ok -> ok;
        {error, R} -> {error, {retry, {copy_failed, Node, R}}}
    end.

%% The local copy is replaced by a newer one (see dspex_cluster_replica:replace/2).
replace_local(S, Export) ->
    case dspex_cluster_replica:replace(S, Export) of
        ok -> ok;
        {error, R} -> {error, {retry, R}}
    end.

%%% writes -----------------------------------------------------------------------

write(S, Op, Args, Own, V, From) when is_atom(Op) -> write(S, {dspex_store, Op}, Args, Own, V, From);
write(S, {M, F} = Op, Args, {Epoch, Seq, Reps}, #{replication := Mode}, From) ->
    T0 = erlang:monotonic_time(),
    %% strong reads (dspex_cache): every lease of S revoked or expired first
    ok = dspex_cache:before_commit(S, self()),
    %% group commit: announced before it is applied, so that a read that can
    %% see it waits for its replicas (see dspex_cluster_shipper:shipped_table/0)
    Group = Mode =:= sync andalso Reps =/= [],
    _ = Group andalso dspex_cluster_shipper:announce(S, Epoch, Seq + 1),
    %% the session's event sequence before and after the change: the replicas' logs follow it
    Pre = dspex_events:last_sequence(S),
    %% a caller's type error is raised again in the caller, not here
    Result = try erlang:apply(M, F, Args)
             catch Class:Reason -> {dspex_cluster_raise, Class, Reason}
             after dspex_cache:after_commit(S)
             end,
    Post = dspex_events:last_sequence(S),
    _ = Op =:= {dspex_store, delete_session} andalso Result =:= ok andalso dspex_cluster_watch:lost(S, ended),
    %% a deleted session's fast-path descriptor goes (its writer holds it: no set in flight)
    _ = Op =:= {dspex_store, delete_session} andalso Result =:= ok andalso dspex_nif:repl_forget(S),
    Meta = #{session => S, op => F, module => M, replicas => Reps, mode => Mode},
    case with_events(S, Args, payload(Op, Args, Result), Pre, Post) of
        P when P =/= none, Mode =:= sync, Reps =/= [] ->
            %% group commit: the record goes to the shipper of every replica
            %% node; the caller is answered when all of them confirmed it
            Seq1 = Seq + 1,
            ets:update_element(dspex_cluster_replica:table(), S, {3, Seq1}),
            ok = dspex_cache:committed(S, Epoch, Seq1, P),
            %% backup regions (dspex_region_shipper); in sync_all the caller
            %% is answered once they acknowledged it too
            From1 = dspex_region_shipper:committed(S, Epoch, Seq1, P, From),
            AckMeta = Meta#{seq => Seq1},
            Ack = case Reps of
                      [_] -> {one, From1, Result, T0, AckMeta};
                      _ ->
                          Id = make_ref(),
                          dspex_cluster_shipper:register_write(Id, length(Reps), From1, S, Epoch, Result, T0, AckMeta),
                          {many, Id}
                  end,
            Rec = {Ack, S, Epoch, Seq1, P},
            [dspex_cluster_shipper:ship(R, Rec) || R <- Reps],
            shipped;
        P ->
            _ = Group andalso dspex_cluster_shipper:withdraw(S, Epoch, Seq),
            Reply = case P of
                        none -> Result;
                        _ ->
                            Seq1 = Seq + 1,
                            ets:update_element(dspex_cluster_replica:table(), S, {3, Seq1}),
                            ok = dspex_cache:committed(S, Epoch, Seq1, P),
                            ok = replicate(S, Epoch, Seq1, P, Reps, Mode),
                            %% see dspex_cluster_shipper: not acknowledged when
                            %% a takeover fenced this node meanwhile
                            case fenced(S, Epoch) of
                                false -> Result;
                                true -> {error, {retry, fenced}}
                            end
                    end,
            dspex_telemetry:execute([dspex, cluster, write, stop], #{duration => erlang:monotonic_time() - T0},
                                    Meta#{epoch => Epoch}),
            %% backup regions (dspex_region_shipper): in sync_all the caller
            %% is answered once they acknowledged it too
            From1 = case P of
                        none -> From;
                        _ -> dspex_region_shipper:committed(S, Epoch, Seq + 1, P, From)
                    end,
            case From1 of
                From -> {Reply, Epoch, node()};
                _ -> gen_server:reply(From1, {Reply, Epoch, node()}), shipped
            end
    end.

fenced(S, Epoch) ->
    case dspex_cluster_replica:row(S) of
        {S, Epoch, _, Me, _, _, F} when Me =:= node(), F =< Epoch -> false;
        _ -> true
    end.

full(S, full) -> {full, local_export(S)};
full(_, P) -> P.

%% The payload with the session's event sequence before and after the change
%% (see dspex_cluster_replica:do_apply/5): a replayed change must log exactly
%% the events the owner's commit logged, as many and with no principal (the
%% replay does not act as one); else the replica gets the session's export
%% and copies the owner's events. The log off: the payload alone.
with_events(S, _Args, P, Pre, Post) when P =:= none; Pre =:= undefined; Post =:= undefined ->
    full(S, P);
with_events(S, _Args, P, Pre, Post) ->
    %% the events this node logged on the session outside its store's commits
    %% (locks, appends, ...; also the graph's and rules' own) travel with it
    Kept = dspex_events:take_kept(S, Post),
    case P of
        full -> {ev, Pre, Post, full(S, P), Kept};
        delete_session when Post - Pre =:= 1 -> {ev, Pre, Post, P, Kept};
        delete_session -> {ev, undefined, Post, P, Kept};
        {op, _, _, _} ->
            case Post - Pre =:= replayed_events(P) of
                true -> {ev, Pre, Post, P, Kept};
                false -> {ev, Pre, Post, {full, local_export(S)}, Kept}
            end
    end.

%% How many events the replica's replay of a change logs.
replayed_events({op, Op, _, _}) when Op =:= set; Op =:= set_derived; Op =:= rollback; Op =:= delete -> 1;
replayed_events({op, set_many, [_, Ups, #{atomic := true}], _}) -> length(Ups) + 1;
replayed_events({op, set_many, [_, Ups, #{atomic := false}], _}) -> length(Ups);
replayed_events({op, {dspex_acl, set_rate_limit}, _, _}) -> 0;
replayed_events(_) -> -1.


%% Without waiting: async, or sync without a caller: through the shippers,
%% like a sync write, with nobody to answer (the fast path's async sets join
%% the same link queues, so a replica gets a session's changes in commit
%% order; a record a replica misses changes for is fixed by a full copy).
%% A failed sync record makes the session re-establish ownership; a failed
%% async one is only counted (the replica gets a full copy at its next
%% change, see dspex_cluster_shipper).
replicate(_S, _E, _Seq, _P, [], _Mode) ->
    ok;
replicate(S, E, Seq, P, Reps, async) ->
    [dspex_cluster_shipper:ship(R, {async, S, E, Seq, P}) || R <- Reps],
    ok;
replicate(S, E, Seq, P, Reps, sync) ->
    [dspex_cluster_shipper:ship(R, {none, S, E, Seq, P}) || R <- Reps],
    ok.

%% What the replicas must do to follow a successful write.
payload({dspex_store, Op}, Args, Result) ->
    payload(Op, Args, Result);
payload({dspex_acl, set_rate_limit} = Op, Args, ok) ->
    {op, Op, Args, ok};
payload({M, _}, _Args, ok) when M =:= dspex_graph; M =:= dspex_acl ->
    %% dependencies and rules travel with the session's export
    full;
payload({_, _}, _Args, _) ->
    none;
payload(Op, _Args, Result) when Op =:= create_session; Op =:= register; Op =:= register_derived;
                                Op =:= import_session ->
    case Result of
        ok -> full;
        {ok, _} -> full;
        _ -> none
    end;
payload(delete_session, _, ok) ->
    delete_session;
payload(Op, [S, K, V, O], {ok, Ver}) when Op =:= set; Op =:= set_derived ->
    %% a derived variable's replay takes the propagator's entry on the replica too
    {op, Op, [S, K, V, (strip_set(O))#{expected_version => Ver - 1}], {ok, Ver}};
payload(rollback, [S, K, To, O], {ok, Ver}) ->
    {op, rollback, [S, K, To, (strip(O))#{expected_version => Ver - 1}], {ok, Ver}};
payload(delete, [S, K | _], ok) ->
    {op, delete, [S, K], ok};
payload(set_many, [S, Updates, Opts], {ok, Res}) ->
    Done = case maps:get(atomic, Opts, false) of
               true -> Res;
               _ -> maps:get(updated, Res, #{})
           end,
    Ups = [{K, V, (strip(O))#{expected_version => maps:get(K, Done) - 1}}
           || {K, V, O} <- norm(Updates), maps:is_key(K, Done)],
    case Ups of
        [] -> none;
        _ ->
            case maps:get(atomic, Opts, false) =/= true andalso dspex_events:enabled() of
                %% with the event log on, a batch that was not atomic is not
                %% replayed as one: the replay logs the same events (no
                %% batch_committed); all of its updates succeed, as here
                true -> {op, set_many, [S, Ups, #{atomic => false}], {ok, #{updated => Done, errors => #{}}}};
                false -> {op, set_many, [S, Ups, #{atomic => true}], {ok, Done}}
            end
    end;
payload(_, _, _) ->
    none.

%% The owner already checked locks, access rules and versions.
strip(O) -> maps:without([lock, as, context, propagate, expected_version], O).

%% A set's event records its principal (`as'): with the event log on, the
%% replay acts as it too, so that the replica logs the same event (the access
%% check runs again there, on the same rules; a replay it refuses, say for a
%% rate limit, gets a full copy).
strip_set(O) ->
    case dspex_events:enabled() of
        true -> maps:without([lock, propagate, expected_version], O);
        false -> strip(O)
    end.

norm(M) when is_map(M) -> [{K, V, #{}} || {K, V} <- maps:to_list(M)];
norm(L) -> [case U of {K, V} -> {K, V, #{}}; {_, _, _} -> U end || U <- L].
