%% @doc Group commit and pipelining of sync replication, owner side: one
%% shipper per (this node -> replica node) link.
%%
%% The writers (`dspex_cluster_writer', any session) commit a change locally
%% and hand its replication record `{Ack, Session, Epoch, Seq, Payload}' to
%% the shipper of every replica node of the session (`ship/2': the link's
%% native queue, `dspex_nif:repl_push/2'; by message when the link has none),
%% then go on with the next write. A plain set made on the owner of a settled
%% session appends its record to the same queue from the set NIF itself, in
%% the commit's critical section (the fast path, see
%% `dspex_cluster_writer:fast_set/4'), and its caller waits for this shipper's
%% answer. The first record of an empty queue wakes the shipper
%% (`dspex_repl_wake'); it drains the queue with one NIF call, in order: the caller's answer waits in the
%% record (one replica) or in the pending table (several: `register_write/8'). The shipper sends what it collected as ONE
%% message (a batch) to the replica node's `dspex_cluster_receiver'; while a
%% batch is in flight the next one fills. At most `?WINDOW' batches are in
%% flight and a batch carries at most `?MAX_BATCH' records; the records of
%% one session are in the order the session's writer committed them (one
%% writer process per session, FIFO messages, batches in order), so a replica
%% applies them in commit order.
%%
%% When the replica node answers a batch (per record: applied, or why not),
%% each record is settled: a write is acknowledged to its caller once every
%% replica its session has confirmed it and the owner was not fenced
%% meanwhile (`{retry, fenced}' otherwise, as a write that replicated without
%% batching). A record the replica could not apply because it misses earlier
%% changes (`need_full') is fixed first: the session's writer exports the
%% session and the shipper installs it on the replica (one call), then the
%% record counts as applied.
%%
%% Failures, each failing the write with the documented error and marking the
%% session (row generation 0) so that its next write establishes ownership
%% again (a takeover: fence, newest copy, install on the replicas):
%% <ul>
%% <li>the replica node is not connected, or its receiver is gone: every
%% batch in flight and every queued record fails, `{retry, replica_unavailable}';</li>
%% <li>the oldest batch in flight is not answered within `replica_timeout_ms'
%% (cluster configuration, 5000 by default)
%% (the replica is slow or stuck): every batch in flight and every queued
%% record fails with `{retry, replica_slow}'; answers that come later for
%% those batches are ignored (a record a replica applied late is a write whose
%% outcome was unknown to its caller, as for any retry error);</li>
%% <li>a record refused for a stale epoch (a takeover fenced the replica):
%% `{retry, fenced}'; any other refusal: `{retry, replica_unavailable}'.</li>
%% <li>this shipper stops: `terminate/2' fails what it holds,
%% `{retry, replica_unavailable}'; killed, its successor fails the changes
%% it took with it (`recover/1'), and a periodic sweep fails pending entries
%% whose callers gave up long ago (`sweep/1').</li>
%% </ul>
%% Back-pressure: a slow replica fills the window, records wait in the queue
%% (and their callers wait, at most the timeout above); past `?MAX_QUEUE'
%% records in this queue the shipper leaves the link's native queue alone
%% until batches leave, and once that one holds 65536 records too a new sync
%% record fails at once with `{retry, replica_slow}' while an async set waits
%% for room (`dspex_cluster_writer:fast_set/4'), so memory stays bounded.
%%
%% Every answered batch emits `[dspex, cluster, batch, stop]' (measurements
%% `duration' (native units, send to answer) and `records'; metadata
%% `replica', `failed').
-module(dspex_cluster_shipper).
-behaviour(gen_server).

-export([start_link/2, name/1, ship/2, link/1, register_write/8, stats/1, pending_table/0]).
-export([shipped_table/0, announce/3, withdraw/3, settled_at/3, await_committed/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(WINDOW, 4).
-define(MAX_BATCH, 1024).
-define(MAX_QUEUE, 65536).
-define(TICK_MS, 100).
%% how often the pending table is swept of abandoned writes (see sweep/1)
-define(SWEEP_MS, 5000).
-define(RPC_TIMEOUT, 5000).
-define(PENDING, dspex_cluster_pending).
-define(SHIPPED, dspex_cluster_shipped).
-define(RECEIVER, dspex_cluster_receiver).

%% `Ack': who is answered once the replicas confirmed: `{one, From, Result,
%% T0, Meta}' (a session with one replica: the caller directly), `{many, Id}'
%% (several replicas: the entry `Id' of the pending table counts them), `none'
%% (no caller: a replicated expiry).
%% `{all, Id}' (a fast-path set with several replicas: every link's record
%% counts in the pending table's entry `Id', see `settle/2').
%% `async': an async change (the writer's or the fast path's); nobody waits,
%% and a failure only counts (the replica misses it and gets a full copy at
%% its next change, as async replication always did).
-type ack() :: {one, gen_server:from(), term(), integer(), map()} | {many, reference()} | {all, reference()} | none
             | async.
-type record() :: {ack(), binary(), pos_integer(), pos_integer(), dspex_cluster_replica:payload()}.
-export_type([record/0]).

%% @doc Starts the shipper of the link to `Node'; a batch not answered within
%% `TimeoutMs' fails its writes with `{retry, replica_slow}'.
-spec start_link(node(), pos_integer()) -> {ok, pid()} | {error, term()}.
start_link(Node, TimeoutMs) -> gen_server:start_link({local, name(Node)}, ?MODULE, {Node, TimeoutMs}, []).

%% @doc The registered name of the shipper to `Node'.
-spec name(node()) -> atom().
name(Node) -> list_to_atom("dspex_cluster_shipper_" ++ atom_to_list(Node)).

%% @doc The table of writes waiting for their replicas (created by the cluster supervisor).
-spec pending_table() -> atom().
pending_table() -> ?PENDING.

%% @doc The table of changes applied on this owner and not yet confirmed by
%% their replicas: `{Session, Announced, Resolved}', both `{Epoch, Seq}'
%% (created by the cluster supervisor).
%%
%% Why: a sync write is applied here before its replicas confirm it, and
%% that confirmation can still fail (the owner fenced by a takeover that did
%% not see it, a replica gone). A read served from this copy in between would
%% return a value that may never be committed (a dirty read: the next owner's
%% copy may lack it). So the writer announces a change before it applies it,
%% the shipper resolves it when its caller is answered (either way), and a
%% current read waits until every change it could have seen is resolved
%% (`await_committed/2'), like a Raft leader's read index.
-spec shipped_table() -> atom().
shipped_table() -> ?SHIPPED.

%% @doc Writer, before applying change `Seq' of epoch `Epoch' of `S' that it
%% will ship to replicas.
-spec announce(binary(), pos_integer(), pos_integer()) -> true.
announce(S, Epoch, Seq) ->
    ets:update_element(?SHIPPED, S, {2, {Epoch, Seq}})
        orelse ets:insert(?SHIPPED, {S, {Epoch, Seq}, {Epoch, Seq - 1}}).

%% @doc Writer: the announced change made nothing to ship (an error, or no
%% change): the announcement goes back to `Seq' (the session's last change).
-spec withdraw(binary(), pos_integer(), non_neg_integer()) -> true.
withdraw(S, Epoch, Seq) -> ets:update_element(?SHIPPED, S, {2, {Epoch, Seq}}).

%% @doc `S' was (re)established here at `{Epoch, Seq}': nothing of this epoch
%% is pending (the copy installed is the committed state).
-spec settled_at(binary(), pos_integer(), non_neg_integer()) -> true.
settled_at(S, Epoch, Seq) -> ets:insert(?SHIPPED, {S, {Epoch, Seq}, {Epoch, Seq}}).

%% the caller of change {Epoch, Seq} of S was answered: resolved (in order per
%% session; an older answer never moves it back)
resolve(S, Epoch, Seq) ->
    At = {Epoch, Seq},
    _ = ets:select_replace(?SHIPPED, [{{S, '$1', '$2'}, [{'<', '$2', {const, At}}], [{{{const, S}, '$1', {const, At}}}]}]),
    ok.

%% @doc Waits until every change of `S' announced here so far is resolved:
%% `ok', or `timeout' at `Deadline' (monotonic ms).
-spec await_committed(binary(), integer()) -> ok | timeout.
await_committed(S, Deadline) ->
    case ets:lookup(?SHIPPED, S) of
        [{_, A0, R}] ->
            A = announced(S, A0),
            case R < A of
                true -> await_committed(S, A, Deadline, 0);
                false -> ok
            end;
        _ -> ok
    end.

%% The announced change: the writer's (the table), or the fast path's
%% (dspex_nif:repl_set/6 announces in the commit's critical section), the later.
announced(S, A) ->
    case dspex_nif:repl_announced(S) of
        none -> A;
        N -> max(A, N)
    end.

await_committed(S, Target, Deadline, N) ->
    case ets:lookup(?SHIPPED, S) of
        %% a withdrawn announcement lowers the target
        [{_, A0, R}] when R < Target ->
            case R < announced(S, A0) of
                false -> ok;
                true -> await_more(S, Target, Deadline, N)
            end;
        _ -> ok
    end.

await_more(S, Target, Deadline, N) ->
    case erlang:monotonic_time(millisecond) >= Deadline of
        true -> timeout;
        false when N < 200 -> erlang:yield(), await_committed(S, Target, Deadline, N + 1);
        false -> timer:sleep(1), await_committed(S, Target, Deadline, N + 1)
    end.

%% @doc Records a write whose caller `From' is answered once `Count' replicas
%% confirmed it: `{Result, Epoch, node()}', or an error (see the module doc).
-spec register_write(reference(), pos_integer(), gen_server:from(), binary(), pos_integer(), term(),
                     integer(), map()) -> true.
register_write(Id, Count, From, S, Epoch, Result, T0, Meta) ->
    ets:insert(?PENDING, {Id, Count, From, S, Epoch, Result, T0, Meta}).

%% @doc Hands a replication record to the shipper of `Node' (never blocks).
%% The record joins the link's native queue (`dspex_nif:repl_push/2'), where
%% the fast path's records (`dspex_nif:repl_set/6') join too: one order per
%% link, the commit order of each session.
-spec ship(node(), record()) -> ok.
ship(Node, Rec) ->
    Link = case get({?MODULE, Node}) of
               undefined ->
                   case dspex_nif:repl_link_id(Node) of
                       undefined -> undefined;
                       L -> put({?MODULE, Node}, L), L   % a link's id never changes
                   end;
               L -> L
           end,
    case Link =/= undefined andalso push(Link, Rec) of
        ok -> ok;
        full -> _ = settle(Rec, {error, replica_slow}), ok;
        false ->
            %% no native queue for the link (its shipper could not open one,
            %% or none runs): the shipper's mailbox, as before the fast path
            try name(Node) ! {rec, Rec}, ok
            catch error:badarg -> _ = settle(Rec, {error, replica_unavailable}), ok
            end;
        _ -> _ = settle(Rec, {error, replica_unavailable}), ok
    end.

push(Link, Rec) ->
    try dspex_nif:repl_push(Link, Rec)
    catch error:badarg -> down   % the library was reloaded: no such link there
    end.

%% @doc The link id of the shipper to `Node' (`undefined' while none runs):
%% what the session's writer publishes for the fast path.
-spec link(node()) -> non_neg_integer() | undefined.
link(Node) -> dspex_nif:repl_link_id(Node).

%% @doc Counters of the link to `Node': `inflight' (batches), `queued'
%% (records), `batches', `records' (sent), `max_batch' (records in the largest
%% batch), `failed' (records).
-spec stats(node()) -> map().
stats(Node) -> gen_server:call(name(Node), stats).

%%% server ----------------------------------------------------------------------

-spec init({node(), pos_integer()}) -> {ok, map()}.
init({Node, TimeoutMs}) ->
    put(dspex_cluster_local, true),
    %% terminate/2 runs on the supervisor's shutdown too: the writes held
    %% here are answered, not left waiting
    process_flag(trap_exit, true),
    %% records queued for a previous shipper of the link fail (their writers
    %% are answered; a fast-path caller already saw that shipper go down)
    Link = case dspex_nif:repl_link_open(Node) of
               {ok, L, Old} ->
                   _ = [settle(record(Node, R), {error, replica_unavailable}) || R <- Old],
                   L;
               {error, _} -> undefined   % records come by message, no fast path on this link
           end,
    ok = recover(Node),
    erlang:send_after(?SWEEP_MS, self(), sweep),
    {ok, #{node => Node, link => Link, timeout => TimeoutMs, queue => queue:new(), qlen => 0, inflight => #{}, next => 1, posted => false,
           wake => false,
           mon => undefined, tick => false,
           batches => 0, records => 0, max_batch => 0, failed => 0}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(stats, _From, #{qlen := Q, inflight := I} = St) ->
    {reply, (maps:with([batches, records, max_batch, failed], St))#{queued => Q, inflight => map_size(I)}, St};
handle_call(_, _From, St) ->
    {reply, {error, badarg}, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({rec, Rec}, St) ->
    {noreply, post(enqueue(Rec, St))};
handle_info(dspex_repl_wake, #{link := Link} = St) when Link =/= undefined ->
    {noreply, post(drain_native(St#{wake := true}))};
handle_info(flush, St) ->
    {noreply, send_batches(St#{posted := false})};
handle_info({batch_done, No, Fails}, #{inflight := I, node := Node} = St) ->
    case maps:take(No, I) of
        error -> {noreply, St};   % a batch already failed
        {{Sent, Recs}, I1} ->
            Failed = settle_batch(Node, Recs, Fails),
            dspex_telemetry:execute([dspex, cluster, batch, stop],
                                    #{duration => erlang:monotonic_time() - Sent, records => length(Recs)},
                                    #{replica => Node, failed => Failed}),
            {noreply, post(drain_native(send_batches(bump(failed, Failed, St#{inflight := I1}))))}
    end;
handle_info({'DOWN', Mon, process, _, _}, #{mon := Mon} = St) ->
    {noreply, post(drain_native(fail_all(replica_unavailable, St#{mon := undefined})))};
handle_info(tick, #{inflight := I} = St) when map_size(I) =:= 0 ->
    {noreply, St#{tick := false}};
handle_info(tick, #{inflight := I, timeout := Timeout} = St) ->
    {Sent, _} = maps:get(lists:min(maps:keys(I)), I),
    Age = erlang:convert_time_unit(erlang:monotonic_time() - Sent, native, millisecond),
    St1 = case Age >= Timeout of
              true -> post(drain_native(fail_all(replica_slow, St)));
              false -> St
          end,
    erlang:send_after(?TICK_MS, self(), tick),
    {noreply, St1};
handle_info(sweep, #{timeout := Timeout} = St) ->
    ok = sweep(max(3 * ?RPC_TIMEOUT, 2 * Timeout)),
    erlang:send_after(?SWEEP_MS, self(), sweep),
    {noreply, St};
handle_info(_, St) -> {noreply, St}.

%% @private Stopped (the supervisor's shutdown, or a crash in a callback):
%% every write held here fails `{retry, replica_unavailable}' now, with the
%% failure's usual effects (the session unsettled, its read index resolved),
%% instead of being lost with this process. The records left in the link's
%% native queue are failed by the next shipper of the link (init/1), or here
%% when none follows.
-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{node := Node, link := Link} = St) ->
    try
        _ = fail_all(replica_unavailable, St),
        _ = Link =/= undefined
            andalso [settle(record(Node, R), {error, replica_unavailable}) || R <- dspex_nif:repl_drain(Link)],
        ok
    catch _:_ -> ok   % the cluster's tables already gone (the node stopping)
    end;
terminate(_, _) -> ok.

%%% writes lost with a killed shipper -------------------------------------------

%% A previous shipper of this link killed (no terminate/2) took the records it
%% held with it: their callers got its 'DOWN' (the fast path) or time out,
%% but the sessions stay settled with those changes announced and never
%% resolved, so every current read of them would wait and route again until
%% the next write, and their pending entries (several replicas) would stay.
%% Each session replicated to `Node' from here with a change announced and
%% not resolved is failed as a lost record is: unsettled (its next write or
%% read establishes ownership again, installing the owner's copy on the
%% replicas), its read index resolved, its pending writes answered
%% `{retry, replica_unavailable}'. A change in flight on another link of
%% such a session is one whose write also went to this link: it cannot be
%% acknowledged either.
recover(Node) ->
    Me = node(),
    Shipped = try ets:tab2list(?SHIPPED) catch error:badarg -> [] end,
    Lost = maps:from_list(
             [{S, A} || {S, A0, R} <- Shipped, A <- [announced(S, A0)], R < A,
                        {_, _, _, Owner, Reps, _, _} <- [dspex_cluster_replica:row(S)],
                        Owner =:= Me, lists:member(Node, Reps)]),
    case map_size(Lost) of
        0 -> ok;
        N ->
            logger:warning("dspex_cluster_shipper: the link to ~p restarted; ~b sessions had writes in flight "
                           "there, failed", [Node, N]),
            Entries = ets:foldl(fun(E, Acc) when is_map_key(element(4, E), Lost) -> [E | Acc];
                                   (_, Acc) -> Acc
                                end, [], ?PENDING),
            _ = [abandon(E) || E <- Entries],
            maps:foreach(fun(S, {E, Seq}) -> lost(S, E, Seq) end, Lost)
    end.

%% Pending entries older than `MaxAgeMs': their callers gave up long ago (a
%% fast-path caller waits 2 * ?RPC_TIMEOUT, a batch fails after the link's
%% timeout), and only a record lost with a killed shipper leaves one behind.
%% Each is failed as above, so that the table never grows without bound.
sweep(MaxAgeMs) ->
    case ets:info(?PENDING, size) of
        N when not is_integer(N); N =:= 0 -> ok;
        _ ->
            Before = erlang:monotonic_time() - erlang:convert_time_unit(MaxAgeMs, millisecond, native),
            Old = ets:select(?PENDING, [{{'_', '_', '_', '_', '_', '_', '$1', '_'}, [{'<', '$1', Before}], ['$_']},
                                        {{'_', '_', '_', '_', '_', '_', '$1', '_', '_'}, [{'<', '$1', Before}], ['$_']}]),
            _ = [begin
                     abandon(E),
                     %% (session at 4, epoch at 5, meta at 8 in both shapes)
                     case element(8, E) of
                         #{seq := Seq} -> lost(element(4, E), element(5, E), Seq);
                         _ -> ok
                     end
                 end || E <- Old],
            ok
    end.

%% A pending write whose record is lost: taken out of the table and, unless a
%% failure answered it already, answered {retry, replica_unavailable}.
abandon(Entry) ->
    Id = element(1, Entry),
    case ets:take(?PENDING, Id) of
        [{Id, _, From, _, E, _, T0, Meta}] -> reply(From, {error, {retry, replica_unavailable}}, E, T0, Meta);
        [{Id, _, From, _, E, _, T0, Meta, 0}] -> reply(From, {error, {retry, replica_unavailable}}, E, T0, Meta);
        _ -> ok
    end.

%% Change `Seq' of epoch `E' of `S' will never be acknowledged: the session
%% unsettled, its read index past the change.
lost(S, E, Seq) ->
    unsettle(S, E),
    resolve(S, E, Seq).

%% As a failed record does: no more fast path, and the next write of the
%% session establishes ownership again.
unsettle(S, E) ->
    _ = dspex_nif:repl_unsettle(S),
    case dspex_cluster_replica:row(S) of
        {S, E, _, _, _, _, _} -> ets:update_element(dspex_cluster_replica:table(), S, {6, 0});
        _ -> ok
    end.

%%% batches ---------------------------------------------------------------------

%% The link's native queue went non-empty (`wake'): everything in it, in
%% order, unless this queue is full: then the records wait there (the next
%% append finds it full: a sync write fails at once with replica_slow, an
%% async one waits for room, see dspex_cluster_writer:fast_set/4) until
%% batches leave this queue. At most ?MAX_QUEUE records here plus what the
%% native queue holds (65536): bounded either way.
drain_native(#{wake := false} = St) -> St;
drain_native(#{qlen := Q} = St) when Q >= ?MAX_QUEUE -> St;
drain_native(#{link := Link, node := Node} = St) ->
    lists:foldl(fun(R, #{queue := Qu, qlen := Q} = Acc) -> Acc#{queue := queue:in(record(Node, R), Qu), qlen := Q + 1} end,
                St#{wake := false}, dspex_nif:repl_drain(Link)).

enqueue(Rec, #{qlen := Q} = St) when Q >= ?MAX_QUEUE ->
    _ = settle(Rec, {error, replica_slow}),
    bump(failed, 1, St);
enqueue(Rec, #{queue := Qu, qlen := Q} = St) ->
    St#{queue := queue:in(Rec, Qu), qlen := Q + 1}.

%% the records still arriving meanwhile join these in the next batch
post(#{posted := true} = St) -> St;
post(#{inflight := I} = St) when map_size(I) >= ?WINDOW -> St;
post(#{qlen := 0} = St) -> St;
post(St) -> self() ! flush, St#{posted := true}.

%% A record of the native queue: the writer's, or a set of the fast path
%% (`dspex_nif:repl_set/6'), whose payload is made here, as the writer makes
%% it, and whose change the nodes caching the session hear of here (the
%% writer tells them itself, `dspex_cache:committed/4'; for a session with
%% several replicas, the shipper of the first one, so once and in order).
%% `Count': the replicas its caller waits for; 1: answered from this record;
%% more: the records of the other links count in the pending table too (the
%% first shipper to see the record inserts the entry, see `settle/2'); 0:
%% async, nobody waits (`async' ack).
record(_Node, {_, _, _, _, _} = Rec) -> Rec;
record(Node, {From, S, K, V, Ver, E, Seq, T0, Post, Count}) ->
    Op = {op, set, [S, K, V, #{expected_version => Ver - 1}], {ok, Ver}},
    %% with the event log on: the set logged event Post of the session, right
    %% after Post - 1 (see dspex_cluster_writer:with_events/5); the events
    %% logged outside the store's commits up to it travel with it (with
    %% several replicas, in the record of the shipper that takes them first:
    %% the other replicas read them from this node's log, as when the kept
    %% events overflow)
    P = case Post of
            0 -> Op;
            _ -> {ev, Post - 1, Post, Op, dspex_events:take_kept(S, Post)}
        end,
    Reps = case dspex_cluster_replica:row(S) of
               {S, _, _, _, [_ | _] = Rs, _, _} -> Rs;
               _ -> [Node]
           end,
    %% (a link that is not among the row's other replicas tells them too: the
    %% row may have changed since the set)
    _ = lists:member(Node, tl(Reps)) orelse dspex_cache:committed(S, E, Seq, P),
    Mode = case Count of
               0 -> async;
               _ -> sync
           end,
    Meta = #{session => S, op => set, module => dspex_store, replicas => Reps, mode => Mode, seq => Seq},
    Ack = case Count of
              0 -> async;
              1 -> {one, From, {ok, Ver}, T0, Meta};
              _ ->
                  {Id, _} = From,
                  _ = ets:insert_new(?PENDING, {Id, Count, From, S, E, {ok, Ver}, T0, Meta, 0}),
                  {all, Id}
          end,
    {Ack, S, E, Seq, P}.

send_batches(#{qlen := 0} = St) -> St;
send_batches(#{inflight := I} = St) when map_size(I) >= ?WINDOW -> St;
send_batches(#{node := Node, queue := Qu, qlen := Q, next := No, inflight := I} = St) ->
    N = min(Q, ?MAX_BATCH),
    {Taken, Rest} = queue:split(N, Qu),
    Recs = queue:to_list(Taken),
    St1 = monitor_receiver(St#{queue := Rest, qlen := Q - N}),
    Wire = [{S, E, Seq, P} || {_, S, E, Seq, P} <- Recs],
    %% never a new connection from here: membership decides about those
    case St1 of
        #{mon := undefined} -> Sent = noconnect;
        _ -> Sent = erlang:send({?RECEIVER, Node}, {batch, self(), No, node(), Wire}, [noconnect])
    end,
    case Sent of
        noconnect ->
            [settle(R, {error, replica_unavailable}) || R <- Recs],
            send_batches(bump(failed, N, St1));
        _ ->
            St2 = St1#{next := No + 1, inflight := I#{No => {erlang:monotonic_time(), Recs}},
                       batches := maps:get(batches, St1) + 1, records := maps:get(records, St1) + N,
                       max_batch := max(N, maps:get(max_batch, St1))},
            send_batches(arm_tick(St2))
    end.

monitor_receiver(#{mon := undefined, node := Node} = St) ->
    case lists:member(Node, nodes()) of
        true -> St#{mon := erlang:monitor(process, {?RECEIVER, Node})};
        false -> St
    end;
monitor_receiver(St) -> St.

arm_tick(#{tick := true} = St) -> St;
arm_tick(St) ->
    erlang:send_after(?TICK_MS, self(), tick),
    St#{tick := true}.

%% Every batch in flight and every queued record fails (the link is reset: a
%% later answer to one of these batches is ignored).
fail_all(Why, #{inflight := I, queue := Qu} = St) ->
    Recs = lists:append([Rs || {_, {_, Rs}} <- lists:sort(maps:to_list(I))]) ++ queue:to_list(Qu),
    [settle(R, {error, Why}) || R <- Recs],
    bump(failed, length(Recs), St#{inflight := #{}, queue := queue:new(), qlen := 0}).

bump(K, N, St) -> St#{K := maps:get(K, St) + N}.

%% Settles the records of an answered batch; returns how many failed.
settle_batch(_Node, Recs, []) ->
    length([x || R <- Recs, settle(R, ok) =/= ok]);
settle_batch(Node, Recs, Fails) ->
    FailMap = maps:from_list(Fails),
    Indexed = lists:zip(lists:seq(1, length(Recs)), Recs),
    %% one full copy per session that needs one, covering its records
    Full = lists:usort([{S, E} || {Ix, {_, S, E, _, _}} <- Indexed, maps:get(Ix, FailMap, ok) =:= {error, need_full}]),
    Fixed = maps:from_list([{SE, install_full(Node, SE)} || SE <- Full]),
    length([x || {Ix, {_, S, E, _, _} = R} <- Indexed,
                 Res <- [case maps:get(Ix, FailMap, ok) of
                             ok -> ok;
                             {error, need_full} -> maps:get({S, E}, Fixed);
                             {error, {stale_epoch, _}} -> {error, fenced};
                             {error, _} -> {error, replica_unavailable}
                         end],
                 settle(R, Res) =/= ok]).

%% The replica misses changes of S: its writer exports the session as of its
%% current {epoch, seq} (it made every change up to there), which is installed
%% on the replica; the copy covers every record of the epoch shipped so far.
install_full(Node, {S, E}) ->
    case catch gen_server:call(dspex_cluster_writer:name(S), {export_for, S}, ?RPC_TIMEOUT) of
        {ok, E, Seq, Exp} ->
            case catch erpc:call(Node, dspex_cluster_replica, install, [S, E, Seq, node(), Exp], ?RPC_TIMEOUT) of
                ok -> ok;
                {error, {stale_epoch, _}} -> {error, fenced};
                _ -> {error, replica_unavailable}
            end;
        {ok, _, _, _} -> {error, fenced};   % ownership moved on since
        _ -> {error, replica_unavailable}
    end.

%% One replica's answer for one record. Returns ok when nothing failed.
%% An async change that failed is only counted: the replica misses it, sees
%% the gap at the session's next change and gets a full copy then (async
%% writes go on while a replica is away, as before the fast path).
%% `{all, Id}' (a fast-path set with several replicas): the pending entry
%% `{Id, Left, From, S, E, Result, T0, Meta, Failed}' counts the answers of
%% every link; the first failure answers the caller, the last answer
%% acknowledges it if none failed, and removes the entry.
settle({async, _, _, _, _}, {error, _}) ->
    error;
settle({async, _, _, _, _}, ok) ->
    ok;
settle({Ack, S, E, _, _}, {error, Why}) ->
    %% not acknowledged; the next write of the session re-establishes ownership
    %% (through its writer: no more fast path until it does)
    unsettle(S, E),
    case Ack of
        {one, From, _, T0, Meta} -> reply(From, {error, {retry, Why}}, E, T0, Meta);
        {many, Id} ->
            case ets:take(?PENDING, Id) of
                [{Id, _, From, S, E, _, T0, Meta}] -> reply(From, {error, {retry, Why}}, E, T0, Meta);
                [] -> ok   % failed by another replica already
            end;
        {all, Id} ->
            %% read before this answer counts: the entry stays until every link answered
            Entry = ets:lookup(?PENDING, Id),
            case {catch ets:update_counter(?PENDING, Id, [{2, -1}, {9, 1}]), Entry} of
                {[Left, 1], [{Id, _, From, S, E, _, T0, Meta, _}]} ->
                    reply(From, {error, {retry, Why}}, E, T0, Meta),
                    Left =:= 0 andalso ets:delete(?PENDING, Id);
                {[0, _], _} -> ets:delete(?PENDING, Id);
                _ -> ok
            end;
        none -> ok
    end,
    error;
settle({none, _, _, _, _}, ok) ->
    ok;
settle({{one, From, Result, T0, Meta}, S, E, _, _}, ok) ->
    acknowledge(From, S, E, Result, T0, Meta);
settle({{many, Id}, _, _, _, _}, ok) ->
    case catch ets:update_counter(?PENDING, Id, {2, -1}) of
        0 ->
            case ets:take(?PENDING, Id) of
                [{Id, _, From, S, E, Result, T0, Meta}] -> acknowledge(From, S, E, Result, T0, Meta);
                [] -> ok
            end;
        _ -> ok   % other replicas still to confirm, or already failed by one
    end;
settle({{all, Id}, _, _, _, _}, ok) ->
    case catch ets:update_counter(?PENDING, Id, {2, -1}) of
        0 ->
            case ets:take(?PENDING, Id) of
                [{Id, _, From, S, E, Result, T0, Meta, 0}] -> acknowledge(From, S, E, Result, T0, Meta);
                _ -> ok   % a failure answered it
            end;
        _ -> ok   % other replicas still to answer
    end.

%% Every replica confirmed the write. A takeover that fenced this node
%% meanwhile may have copied the session from here before the change landed
%% (the fence stops the replicas, not the owner's writer): then the change is
%% not acknowledged.
acknowledge(From, S, E, Result, T0, Meta) ->
    case fenced(S, E) of
        false -> reply(From, Result, E, T0, Meta), ok;
        true -> reply(From, {error, {retry, fenced}}, E, T0, Meta), error
    end.

reply(From, Reply, Epoch, T0, Meta) ->
    _ = case Meta of
            #{session := S, seq := Seq} -> resolve(S, Epoch, Seq);
            _ -> ok
        end,
    gen_server:reply(From, {Reply, Epoch, node()}),
    dspex_telemetry:execute([dspex, cluster, write, stop], #{duration => erlang:monotonic_time() - T0},
                            Meta#{epoch => Epoch}).

fenced(S, Epoch) ->
    case dspex_cluster_replica:row(S) of
        {S, Epoch, _, Me, _, _, F} when Me =:= node(), F =< Epoch -> false;
        _ -> true
    end.
