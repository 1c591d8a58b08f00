%% @doc Cross-region replication, primary side: ships each committed change
%% of a session whose primary is this region to the session's backup regions,
%% in commit order, over the links (`dspex_region_link').
%%
%% The hook is `committed/5', called by the session's writer
%% (`dspex_cluster_writer') after each committed change with the change's
%% replication record (the payload the cluster ships to its replicas) and its
%% `{Epoch, Seq}'. It is a no-op (one `persistent_term' read) when no region
%% runs, and does nothing for a session without a recorded decision
%% (`dspex_region:route_session/2') whose primary is this region or without
%% backup regions. Otherwise the record goes to this process (a message: the
%% writer never waits for it).
%%
%% Per backup region, records queue in commit order and leave in batches: a
%% batch takes every queued record (at most `repl_batch_max'), is encoded once
%% and sent as one frame, or, past 64 KiB, as consecutive frames of at most
%% 64 KiB that the peer's gateway reassembles. At most `repl_window' batches
%% are in flight per region; records arriving meanwhile wait and travel
%% together in the next batch (group commit). The peer applies a batch in
%% order and acknowledges it with the sessions it could not apply (a gap):
%% those get a full copy (the writer's export of the session at its current
%% `{Epoch, Seq}', taken when the copy is sent). A link that goes down puts
%% its unacknowledged batches back at the head of the queue; they are sent
%% again when it is up (the peer ignores what it already applied).
%% Back-pressure: a region's queue holds at most `repl_max_pending' records;
%% past that the queued records are dropped and each of their sessions gets
%% one full copy instead (memory stays bounded while a region is away).
%%
%% Modes (`replication' in the region configuration, or
%% `dspex_region:set_replication/1'): `async_primary_backup' (default) answers
%% the caller after the local commit; `sync_all' answers only once every
%% backup region acknowledged the change, else after `sync_timeout_ms' with
%% `{error, {region_timeout, Regions}}' (the regions that did not acknowledge;
%% the change is committed in this region and still shipped).
%%
%% Lag per backup region: `lag_versions' is the number of records committed
%% and not yet acknowledged by it: handed to this process (counted by
%% `committed/5' before the writer answers its caller, while the message
%% still waits in this process's mailbox), queued or in flight; `lag_ms' the
%% age of the oldest record queued or in flight (0 when none), in
%% `dspex_region:topology/0' and Prometheus. So a change acknowledged to its
%% writer is counted in `lag_versions' until its backup region applied it.
-module(dspex_region_shipper).
-behaviour(gen_server).

-export([committed/5, admit/2, stats/0, stats_table/0]).
-export([move/3, resync/1, resync_to/2]).
-export([start_link/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(STATS, dspex_region_repl_stats).
%% payload bytes per frame: a frame is at most 64 KiB with its envelope
-define(CHUNK, (65536 - 512)).

%%% the hook --------------------------------------------------------------------

%% @doc Called by the session's writer after committing change `Seq' of
%% `Session' in `Epoch' with replication record `Payload', for a caller
%% `From'. Returns the `From' the writer must answer: `From' itself (nothing to
%% wait for), or, in `sync_all', a reply address of this process, which
%% answers `From' once every backup region acknowledged the change.
-spec committed(binary(), non_neg_integer(), non_neg_integer(), term(), gen_server:from() | none) ->
          gen_server:from() | none.
committed(Session, Epoch, Seq, Payload, From) ->
    case persistent_term:get({dspex_region, name}, undefined) of
        undefined -> From;
        Me ->
            case dspex_region:decision(Session) of
                #{primary_region := Me, backup_regions := [_ | _] = Backups} = D ->
                    %% the record carries the region epoch it was committed in
                    RE = maps:get(region_epoch, D, 0),
                    case whereis(?MODULE) of
                        undefined -> From;
                        Pid ->
                            At = erlang:monotonic_time(millisecond),
                            %% counted in the lag from now on, before the
                            %% writer acknowledges it (see handed/2)
                            handed(Backups, 1),
                            case persistent_term:get({dspex_region, replication}, async_primary_backup) of
                                sync_all when From =/= none ->
                                    Ref = make_ref(),
                                    Pid ! {rec, {Session, Epoch, Seq, wire(Payload), RE}, At, Backups, {Ref, From}},
                                    {Pid, {dspex_region_ack, Ref}};
                                _ ->
                                    Pid ! {rec, {Session, Epoch, Seq, wire(Payload), RE}, At, Backups, none},
                                    From
                            end
                    end;
                _ -> From
            end
    end.

%% Records handed to this process and not yet taken into its queues, per
%% backup region: counted in `lag_versions' (stats/0) so that a change
%% acknowledged to its writer is in the measured lag from that moment on,
%% even while its message waits in this process's mailbox.
handed(Backups, N) ->
    case persistent_term:get({?MODULE, handed}, undefined) of
        {Ref, Ix} -> [counters:add(Ref, I, N) || B <- Backups, #{B := I} <- [Ix]], ok;
        undefined -> ok
    end.

handed_count(P) ->
    case persistent_term:get({?MODULE, handed}, undefined) of
        {Ref, #{P := I}} -> max(0, counters:get(Ref, I));
        _ -> 0
    end.

%% What crosses to another region: no events (each region's log is its own:
%% the replay logs the changes there) and no version vector (it names this
%% region's nodes, atoms the peer does not know and would refuse to decode).
wire({ev, _, _, P, _}) -> wire(P);
wire({full, Export}) -> {full, strip(Export)};
wire(P) -> P.

strip(Export) when is_map(Export) -> maps:remove(dspex_vv, Export);
strip(Other) -> Other.

%% @doc Called by the session's writer before a write, with the result of
%% its ownership check: a session this region moved to another one
%% (`dspex_region:move_session/2') is `{error, {region_moved, Region}}'.
%% Without a region: `Owned' itself, after one `persistent_term' read.
-spec admit(binary(), T) -> T | {error, {region_moved, binary()}}.
admit(Session, {ok, _} = Owned) ->
    case persistent_term:get({dspex_region, name}, undefined) of
        undefined -> Owned;
        _ ->
            case dspex_region:moved(Session) of
                undefined -> Owned;
                Region -> {error, {region_moved, Region}}
            end
    end;
admit(_, Other) -> Other.

%% @private A full copy of `Session' to `Region', its new primary (the
%% session's decision here already names it, and `dspex_region:moving/1'):
%% answered `ok' once `Region' acknowledged it, else `{error,
%% {region_timeout, [Region]}}' after `sync_timeout_ms' (the copy stays
%% queued until it is through); `{error, {region_unavailable, Region}}' when
%% the shipper died during the call: the copy went with it, and the shipper
%% started again queues it again (the move is still pending, see init/1).
-spec move(binary(), binary(), timeout()) -> ok | {error, term()}.
move(Session, Region, Timeout) ->
    try gen_server:call(?MODULE, {move, Session, Region}, Timeout)
    catch exit:{timeout, _} -> {error, {region_timeout, [Region]}};
          exit:{noproc, _} -> {error, not_running};
          %% the shipper died with the copy: an error, never the caller's crash
          exit:{_, {gen_server, call, _}} -> {error, {region_unavailable, Region}}
    end.

%% @private One full copy of `Session' to each of its backup regions (this
%% region just became its primary).
%% In a region of several nodes it goes to the shipper of the node owning
%% the session in the region's cluster (its writer takes the copy).
-spec resync(binary()) -> ok.
resync(Session) ->
    Owner = case dspex_cluster:owner_of(Session) of
                {ok, N} -> N;
                {error, _} -> node()
            end,
    gen_server:cast({?MODULE, Owner}, {resync, Session}).

%% @private One full copy of `Session' to each of `Regions' (backup regions
%% just added to the session's decision here, its primary).
-spec resync_to(binary(), [binary()]) -> ok.
resync_to(Session, Regions) -> gen_server:cast(?MODULE, {resync, Session, Regions}).

%% @doc Replication per backup region: `lag_versions' (records queued or in
%% flight), `lag_ms' (age of the oldest, 0 when none), `in_flight' (batches),
%% `batches', `records' and `full_copies' sent since start, `link' (up | down).
-spec stats() -> #{binary() => map()}.
stats() ->
    Now = erlang:monotonic_time(millisecond),
    try maps:from_list([{P, view(P, Row, Now)} || {P, Row} <- ets:tab2list(?STATS)])
    catch error:badarg -> #{}
    end.

view(P, #{oldest_at := O, lag_versions := L} = Row, Now) ->
    (maps:remove(oldest_at, Row))#{lag_versions => L + handed_count(P),
                                   lag_ms => case O of undefined -> 0; _ -> max(0, Now - O) end}.

%% @private
-spec stats_table() -> atom().
stats_table() -> ?STATS.

%%% server ----------------------------------------------------------------------

%% @private
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(C) -> gen_server:start_link({local, ?MODULE}, ?MODULE, C, []).

%% @private
-spec init(map()) -> {ok, map()}.
init(#{name := Me, peers := Peers} = C) ->
    _ = ets:new(?STATS, [named_table, protected, set, {read_concurrency, true}]),
    Names = [N || #{name := N} <- Peers],
    persistent_term:put({?MODULE, handed},
                        {counters:new(max(1, length(Names)), [write_concurrency]),
                         maps:from_list(lists:zip(Names, lists:seq(1, length(Names))))}),
    St = #{me => Me, conf => C, next_id => 1, waits => #{},
           peers => maps:from_list([{N, peer_state()} || #{name := N} <- Peers])},
    [publish(N, St) || #{name := N} <- Peers],
    %% the copies of the moves not acknowledged yet went with the shipper
    %% before this one (if any): queued again first thing
    self() ! resume_moves,
    {ok, St}.

peer_state() ->
    #{link => undefined, queue => queue:new(), qlen => 0, inflight => [], heads => #{},
      resyncing => #{}, resync_waits => #{}, batches => 0, records => 0, full_copies => 0}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({move, S, Region}, From, #{peers := Ps} = St) when is_map_key(Region, Ps) ->
    Ref = make_ref(),
    T = erlang:send_after(maps:get(sync_timeout_ms, maps:get(conf, St)), self(), {wait_timeout, Ref}),
    W = #{from => From, reply => {value, ok}, pending => [Region], timer => T, epoch => 0, plain => true},
    St1 = St#{waits => maps:put(Ref, W, maps:get(waits, St))},
    %% (marked on its way: the failover check's resync_to/2 of the pending
    %% move adds no second copy)
    St2 = update_peer(Region, fun(#{queue := Q, qlen := N, resyncing := R} = PS) ->
                                      PS#{queue => queue:in({full, S, erlang:monotonic_time(millisecond), [Ref]}, Q),
                                          qlen => N + 1, resyncing => R#{S => true}}
                              end, St1),
    {noreply, pump(Region, St2)};
handle_call({move, _, Region}, _From, St) -> {reply, {error, {invalid_argument, {region, Region}}}, St};
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({resync, S}, #{peers := Ps} = St) ->
    Backups = case dspex_region:decision(S) of
                  #{backup_regions := B} -> [R || R <- B, is_map_key(R, Ps)];
                  _ -> []
              end,
    St1 = lists:foldl(fun(R, A) -> update_peer(R, fun(PS) -> resync(S, PS) end, A) end, St, Backups),
    {noreply, lists:foldl(fun pump/2, St1, Backups)};
handle_cast({resync, S, Regions}, #{peers := Ps} = St) ->
    Rs = [R || R <- Regions, is_map_key(R, Ps)],
    St1 = lists:foldl(fun(R, A) -> update_peer(R, fun(PS) -> resync(S, PS) end, A) end, St, Rs),
    {noreply, lists:foldl(fun pump/2, St1, Rs)};
handle_cast(_, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(resume_moves, #{peers := Ps} = St) ->
    %% one copy (unless one is on its way) per move pending for a session
    %% owned here; sent once the link to its region is up
    Moves = [M || {_, R} = M <- dspex_region:pending_moves(), is_map_key(R, Ps)],
    St1 = lists:foldl(fun({S, R}, A) -> update_peer(R, fun(PS) -> resync(S, PS) end, A) end, St, Moves),
    {noreply, lists:foldl(fun pump/2, St1, lists:usort([R || {_, R} <- Moves]))};
handle_info({rec, {S, _, Seq, _, _} = Rec, At, Backups, Wait}, #{peers := Ps} = St) ->
    Targets = [B || B <- Backups, is_map_key(B, Ps)],
    St1 = case Wait of
              none -> St;
              {Ref, From} ->
                  T = erlang:send_after(maps:get(sync_timeout_ms, maps:get(conf, St)), self(), {wait_timeout, Ref}),
                  W = #{from => From, reply => undefined, pending => Targets, timer => T, epoch => element(2, Rec)},
                  St#{waits => maps:put(Ref, W, maps:get(waits, St))}
          end,
    Item = {rec, Rec, At, case Wait of none -> []; {R, _} -> [R] end},
    St2 = lists:foldl(fun(P, Acc) -> enqueue(P, S, Seq, Item, Acc) end, St1, Targets),
    St3 = lists:foldl(fun pump/2, St2, Targets),
    %% queued and published (pump/2): no longer counted as handed
    handed(Backups, -1),
    {noreply, St3};
handle_info({{dspex_region_ack, Ref}, Reply}, St) ->
    %% the writer's (or the cluster shipper's) answer to a sync_all write
    {noreply, local_reply(Ref, Reply, St)};
handle_info({wait_timeout, Ref}, #{waits := Ws} = St) ->
    case Ws of
        #{Ref := #{from := From, pending := Pending, epoch := E} = W} ->
            Err = {error, {region_timeout, lists:sort(Pending)}},
            gen_server:reply(From, case W of #{plain := true} -> Err; _ -> {Err, E, node()} end),
            {noreply, St#{waits => maps:remove(Ref, Ws)}};
        _ -> {noreply, St}
    end;
handle_info({link_up, P, Pid}, St) ->
    {noreply, pump(P, update_peer(P, fun(PS) -> PS#{link => Pid} end, St))};
handle_info({link_down, P}, St) ->
    {noreply, publish(P, requeue(P, all, update_peer(P, fun(PS) -> PS#{link => undefined} end, St)))};
handle_info({ship_failed, P, Id}, St) ->
    {noreply, publish(P, requeue(P, Id, St))};
handle_info({repl_ack, P, Id, #{need_full := NF} = Res}, St) ->
    %% sessions the peer took over from this region meanwhile (it refused
    %% their changes): their newer decision is adopted here, so this region
    %% takes no more writes of them (dspex_region:writable/1)
    _ = [dspex_region:adopt(S, D) || {S, D} <- maps:to_list(maps:get(decisions, Res, #{})), is_binary(S), is_map(D)],
    {noreply, pump(P, acked(P, Id, NF, St))};
handle_info(_, St) -> {noreply, St}.

%%% queues ----------------------------------------------------------------------

update_peer(P, F, #{peers := Ps} = St) ->
    case Ps of
        #{P := PS} -> St#{peers => Ps#{P => F(PS)}};
        _ -> St
    end.

enqueue(P, S, Seq, Item, #{peers := Ps, conf := C} = St) ->
    #{queue := Q, qlen := N, heads := H} = PS = maps:get(P, Ps),
    PS1 = PS#{queue => queue:in(Item, Q), qlen => N + 1, heads => H#{S => Seq}},
    PS2 = case N + 1 > maps:get(repl_max_pending, C) of
              true -> overflow(PS1);
              false -> PS1
          end,
    St#{peers => Ps#{P => PS2}}.

%% The queue is full: its records make way for one full copy per session.
overflow(#{queue := Q, resyncing := R, resync_waits := RW} = PS) ->
    Items = queue:to_list(Q),
    Sessions = lists:usort([S || {rec, {S, _, _, _, _}, _, _} <- Items] ++ [S || {full, S, _, _} <- Items]),
    RW1 = lists:foldl(fun({rec, {S, _, _, _, _}, _, Ws}, Acc) -> add_waits(S, Ws, Acc);
                         ({full, S, _, Ws}, Acc) -> add_waits(S, Ws, Acc)
                      end, RW, Items),
    At = erlang:monotonic_time(millisecond),
    Q1 = queue:from_list([{full, S, At, []} || S <- Sessions]),
    PS#{queue => Q1, qlen => length(Sessions), resyncing => maps:merge(R, maps:from_keys(Sessions, true)),
        resync_waits => RW1}.

add_waits(_, [], Acc) -> Acc;
add_waits(S, Ws, Acc) -> maps:update_with(S, fun(L) -> Ws ++ L end, Ws, Acc).

%% Sends batches while the link is up and the window has room.
pump(P, #{peers := Ps, conf := C} = St) ->
    case Ps of
        #{P := #{link := Link, qlen := N, inflight := In} = PS}
          when Link =/= undefined, N > 0 ->
            case length(In) < maps:get(repl_window, C) of
                true -> pump(P, send_batch(P, Link, PS, St));
                false -> publish(P, St)
            end;
        _ -> publish(P, St)
    end.

send_batch(P, Link, #{queue := Q, qlen := N, heads := H, resyncing := R} = PS, #{next_id := Id, conf := C, me := Me} = St) ->
    Take = min(N, maps:get(repl_batch_max, C)),
    {Taken, Rest} = queue:split(Take, Q),
    Items0 = [materialise(P, I) || I <- queue:to_list(Taken)],
    Items = [I || {rec, _, _, _} = I <- Items0],
    %% a copy this node can no longer take (not the owner any more) is dropped
    R1 = maps:without([S || {skip, S} <- Items0], R),
    Recs = [Rec || {rec, Rec, _, _} <- Items],
    Sessions = lists:usort([S || {S, _, _, _, _} <- Recs]),
    Batch = #{from => Me, recs => Recs,
              heads => maps:with(Sessions, H),
              decisions => maps:from_list([{S, D} || S <- Sessions, #{} = D <- [dspex_region:decision(S)]])},
    Bin = term_to_binary(Batch),
    Link ! {ship, Id, chunks(Bin)},
    Full = length([x || {rec, {_, _, _, {region_full, _}, _}, _, _} <- Items]),
    dspex_telemetry:execute([dspex, region, replication, batch],
                            #{records => length(Recs), bytes => byte_size(Bin)},
                            #{region => Me, peer => P, id => Id}),
    PS1 = PS#{queue => Rest, qlen => N - Take, inflight => maps:get(inflight, PS) ++ [{Id, Items}], resyncing => R1,
              batches => maps:get(batches, PS) + 1, records => maps:get(records, PS) + length(Recs),
              full_copies => maps:get(full_copies, PS) + Full},
    St#{next_id => Id + 1, peers => (maps:get(peers, St))#{P => PS1}}.

%% A full copy to region P is taken when it leaves: the session as of the
%% writer's current {Epoch, Seq} (later records follow it in the queue), in
%% the region epoch of the session's decision; none once this region is no
%% longer the session's primary, except the copy of a move to P not yet
%% acknowledged (dspex_region:moving/1).
materialise(P, {full, S, At, Ws}) ->
    Me = persistent_term:get({dspex_region, name}, undefined),
    D = dspex_region:decision(S),
    Mine = case D of
               #{primary_region := Me} -> true;
               #{} -> dspex_region:moving(S) =:= P;
               _ -> false
           end,
    case Mine andalso catch gen_server:call(dspex_cluster_writer:name(S), {export_for, S}, 5000) of
        {ok, E, Seq, Export} ->
            {rec, {S, E, Seq, {region_full, strip(Export)}, maps:get(region_epoch, D, 0)}, At, Ws};
        _ -> {skip, S}
    end;
materialise(_, I) -> I.

chunks(Bin) when byte_size(Bin) =< ?CHUNK -> [{true, Bin}];
chunks(<<Part:?CHUNK/binary, Rest/binary>>) -> [{false, Part} | chunks(Rest)].

%% Unacknowledged batches back at the head of the queue, in their order.
requeue(P, Which, St) ->
    update_peer(P, fun(#{inflight := In, queue := Q, qlen := N} = PS) ->
                           {Back, Keep} = lists:partition(fun({Id, _}) -> Which =:= all orelse Id =:= Which end, In),
                           Items = lists:append([back(Is) || {_, Is} <- Back]),
                           PS#{inflight => Keep, queue => queue:join(queue:from_list(Items), Q), qlen => N + length(Items)}
                   end, St).

%% a full copy sent again is taken again
back(Items) -> [case I of {rec, {S, _, _, {region_full, _}, _}, At, Ws} -> {full, S, At, Ws}; _ -> I end || I <- Items].

acked(P, Id, NF, #{peers := Ps} = St) ->
    case Ps of
        #{P := #{inflight := In} = PS} ->
            case lists:keytake(Id, 1, In) of
                {value, {Id, Items}, In1} ->
                    Need = maps:from_keys(NF, true),
                    {PS1, Done} = lists:foldl(fun(I, Acc) -> acked_item(I, Need, Acc) end, {PS#{inflight => In1}, []}, Items),
                    %% sessions the peer could not follow get one full copy each
                    PS2 = lists:foldl(fun(S, A) -> resync(S, A) end, PS1, NF),
                    %% the copies it took: a move to it is done once it has one
                    %% at the move's region epoch (dspex_region forgets it)
                    ok = dspex_region:moves_copied(P, [{S, RE} || {rec, {S, _, _, {region_full, _}, RE}, _, _} <- Items,
                                                                 not is_map_key(S, Need)]),
                    St1 = St#{peers => Ps#{P => PS2}},
                    dspex_telemetry:execute([dspex, region, replication, ack], #{records => length(Items)},
                                            #{region => maps:get(me, St), peer => P, id => Id, need_full => NF}),
                    region_acked(P, Done, St1);
                false -> St
            end;
        _ -> St
    end.

acked_item({rec, {S, _, Seq, P, _}, _, Ws}, Need, {#{heads := H, resyncing := R, resync_waits := RW} = PS, Done}) ->
    H1 = case H of #{S := Seq} -> maps:remove(S, H); _ -> H end,
    case {P, Need} of
        {{region_full, _}, #{S := _}} ->
            %% the copy was not installed: no longer on its way, so that
            %% acked/4 sends another (its waits go with the next one)
            {PS#{heads => H1, resyncing => maps:remove(S, R), resync_waits => add_waits(S, Ws, RW)}, Done};
        {{region_full, _}, _} ->
            %% the copy is in: so is every change it holds
            {PS#{heads => H1, resyncing => maps:remove(S, R), resync_waits => maps:remove(S, RW)},
             Ws ++ maps:get(S, RW, []) ++ Done};
        {_, #{S := _}} -> {PS#{heads => H1, resync_waits => add_waits(S, Ws, RW)}, Done};
        _ -> {PS#{heads => H1}, Ws ++ Done}
    end.

resync(S, #{resyncing := R} = PS) when is_map_key(S, R) -> PS;   % a copy is on its way
resync(S, #{resyncing := R, queue := Q, qlen := N} = PS) ->
    PS#{resyncing => R#{S => true}, queue => queue:in({full, S, erlang:monotonic_time(millisecond), []}, Q),
        qlen => N + 1}.

%%% sync_all waits ---------------------------------------------------------------

region_acked(P, Refs, St) ->
    lists:foldl(fun(Ref, #{waits := Ws} = A) ->
                        case Ws of
                            #{Ref := #{pending := Pend} = W} -> maybe_reply(Ref, W#{pending => Pend -- [P]}, A);
                            _ -> A
                        end
                end, St, Refs).

local_reply(Ref, Reply, #{waits := Ws} = St) ->
    case Ws of
        #{Ref := #{from := From} = W} ->
            case Reply of
                {{error, _}, _, _} ->
                    %% not committed here (or fenced): the caller learns it now
                    gen_server:reply(From, Reply),
                    cancel(Ref, W, St);
                _ -> maybe_reply(Ref, W#{reply => {value, Reply}}, St)
            end;
        _ -> St
    end.

maybe_reply(Ref, #{pending := [], reply := {value, Reply}, from := From} = W, St) ->
    gen_server:reply(From, Reply),
    cancel(Ref, W, St);
maybe_reply(Ref, W, #{waits := Ws} = St) -> St#{waits => Ws#{Ref => W}}.

cancel(Ref, #{timer := T}, #{waits := Ws} = St) ->
    _ = erlang:cancel_timer(T),
    St#{waits => maps:remove(Ref, Ws)}.

%%% statistics -------------------------------------------------------------------

publish(P, #{peers := Ps} = St) ->
    case Ps of
        #{P := #{queue := Q, qlen := N, inflight := In, link := L} = PS} ->
            InRecs = lists:sum([length(Is) || {_, Is} <- In]),
            Oldest = case {In, queue:peek(Q)} of
                         {[{_, [First | _]} | _], _} -> item_at(First);
                         {_, {value, Head}} -> item_at(Head);
                         _ -> undefined
                     end,
            ets:insert(?STATS, {P, #{lag_versions => N + InRecs, oldest_at => Oldest, in_flight => length(In),
                                     batches => maps:get(batches, PS), records => maps:get(records, PS),
                                     full_copies => maps:get(full_copies, PS),
                                     link => case L of undefined -> down; _ -> up end}}),
            St;
        _ -> St
    end.

item_at({rec, _, At, _}) -> At;
item_at({full, _, At, _}) -> At.
