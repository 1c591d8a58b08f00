%% @doc The replica side of a session: applies the owner's committed changes in
%% order, and answers takeovers (state, fence, export, install, drop).
%%
%% A pool of processes; a session always maps to the same one, so the changes
%% of one session are applied in the order its owner sent them, and a fence is
%% ordered with them. Every call to the pool is bounded (4 s): a process that
%% does not answer in time gives `{error, timeout}' (the caller treats the
%% replica as unavailable). Per-session facts live in the public ETS table
%% `dspex_cluster_sessions': `{Session, Epoch, Seq, Owner, Replicas, Gen, Fence}'
%% where `Seq' counts the replicated changes of the epoch's history and
%% `Fence' is the highest epoch announced by a takeover: changes from a lower
%% epoch are refused with `{error, {stale_epoch, Fence}}'.
%%
%% Sync replication arrives in batches (`dspex_cluster_receiver' splits
%% each one by pool process; a part is applied in one pass with the rules of
%% `apply_change/5'); async replication and takeovers use the calls and casts
%% below. Within a part, the records of each session are taken in order; a
%% run of consecutive replayed sets of one epoch (with the event log on:
%% each logging just its own event, right after the previous one's, and the
%% local log at the first one's `Pre') is applied by ONE NIF call,
%% `dspex_nif:replica_apply_batch/3', which applies the rules itself and
%% answers per record; every other record (full copies, deletions, batches,
%% rollbacks, sets with other options, a log that must catch up first) goes
%% through `apply_change/5''s path one by one. Replayed sets applied in a
%% run do not pass through `dspex_store:set/4', so they emit no
%% `[dspex, store, set, stop]' telemetry and are not counted by the native
%% store analytics on the replica (they log the same events as before).
%%
%% With the event log on, this node's log of a replicated session follows
%% the owner's (`{ev, Pre, Post, Payload, Kept}' changes: the owner's last
%% sequences before and after the change and the events it logged outside its
%% store's commits; `dspex_events:follow/3' after installs); copies are
%% replaced without logging, and a dropped copy logs `session_deleted' with
%% reason `migrated'.
%%
%% A change for a session this node has no row of is `{error, need_full}'
%% (a full copy too): every legitimate sender fenced or installed the node
%% first (a takeover fences every live member), so a change arriving at a
%% node without a row is either from an owner whose sessions table here was
%% lost (it then installs a copy through `install/5', after the writer checked
%% it still owns the session) or a straggler of a deleted session whose rows
%% were removed (`forget/1'): applying it would bring the session back.
%%
%% Deleted sessions leave no rows (see `dspex_cluster_keeper'): `bury/2' and
%% `forget/1' are the two phases of their removal on each node.
%%
%% Watches made on this node while it owned a session (`dspex_cluster_watch')
%% are told they are lost when another node takes the session over (fence),
%% or this copy is replaced or dropped.
-module(dspex_cluster_replica).
-behaviour(gen_server).

-export([start_link/1, name/1, apply_change/5, state/1, fence/2, export/1, install/5, drop/4,
         row/1, current_row/1, put_row/1, table/0, replace/2, never_held/1, bury/2, forget/1, known/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(POOL, 8).
-define(TAB, dspex_cluster_sessions).
%% below the writer's 5 s RPC timeout, so that a remote caller gets this
%% module's `{error, timeout}' rather than its own erpc timeout
-define(CALL_TIMEOUT, 4000).

-type payload() :: {op, atom() | {module(), atom()}, list(), term()} | {full, map() | absent} | delete_session
                 | {ev, non_neg_integer() | undefined, non_neg_integer(), payload(), [dspex_events:event()]}.
-export_type([payload/0]).

%% @doc Starts replica process `I' of the pool.
-spec start_link(non_neg_integer()) -> {ok, pid()} | {error, term()}.
start_link(I) -> gen_server:start_link({local, pname(I)}, ?MODULE, [], []).

%% @doc The registered name of the pool process serving `Session'.
-spec name(binary()) -> atom().
name(S) -> pname(erlang:phash2(S, ?POOL)).

pname(I) -> list_to_atom("dspex_cluster_replica_" ++ integer_to_list(I)).

%% @doc Creates the sessions table (called once by the cluster supervisor's table owner).
-spec table() -> atom().
table() -> ?TAB.

%% @doc The row of `Session', with defaults when unknown.
-spec row(binary()) -> tuple().
row(S) ->
    case ets:lookup(?TAB, S) of
        [R] -> R;
        [] -> {S, 0, 0, undefined, [], 0, 0}
    end.

%% @doc `row/1', with the seq this node's fast-path sets of the session
%% reached when it owns it (`dspex_cluster_writer:fast_set/4' keeps it in the
%% NIF's descriptor; the row catches up when the writer next acts): the
%% session's version as of now, for what reports or labels it.
-spec current_row(binary()) -> tuple().
current_row(S) ->
    {S, E, Seq, O, R, G, F} = Row = row(S),
    case O =:= node() andalso dspex_nif:repl_info(S) of
        {_, E, N, _} when N > Seq -> {S, E, N, O, R, G, F};
        _ -> Row
    end.

forget_fast(S, Owner) when Owner =/= node() -> dspex_nif:repl_forget(S);
forget_fast(_, _) -> ok.

%% @doc Replaces the row of a session.
-spec put_row(tuple()) -> true.
put_row({S, E, Seq, O, _, _, _} = R) ->
    %% the version vector of the copy follows its {epoch, seq} (dspex_cache)
    ok = dspex_cache:advance_vv(S, E, O, Seq),
    ets:insert(?TAB, R).

%% @doc Applies one change sent by the owner at `Epoch'; `Seq' must follow the
%% last applied one (else `{error, need_full}').
-spec apply_change(binary(), pos_integer(), pos_integer(), node(), payload()) ->
          ok | {error, need_full | {stale_epoch, non_neg_integer()} | timeout}.
apply_change(S, Epoch, Seq, Owner, P) -> call(S, {apply, S, Epoch, Seq, Owner, P}).

%% @doc `{Epoch, Seq, Fence, Present}' of the session here.
-spec state(binary()) -> {non_neg_integer(), non_neg_integer(), non_neg_integer(), boolean()} | {error, timeout}.
state(S) -> call(S, {state, S}).

%% @doc Whether a `state/1' answer is that of a node that never held a copy
%% of the session (a fence alone, from a takeover, leaves epoch and seq at 0;
%% a deletion replicated here has seq > 0).
-spec never_held({non_neg_integer(), non_neg_integer(), non_neg_integer(), boolean()}) -> boolean().
never_held({0, 0, _, false}) -> true;
never_held({_, _, _, _}) -> false.

%% The seq this owner's fast-path sets reached (dspex_cluster_writer), when
%% ahead of the row's.
fast_seq({_, E, N, _}, E, Seq) when N > Seq -> N;
fast_seq(_, _, Seq) -> Seq.

%% @doc Refuses every later change from an epoch below `Epoch'; returns the state.
-spec fence(binary(), pos_integer()) ->
          {ok, {non_neg_integer(), non_neg_integer(), boolean()}} | {error, {stale_epoch, non_neg_integer()} | timeout}.
fence(S, Epoch) -> call(S, {fence, S, Epoch}).

%% @doc The session's export here, or `absent'.
-spec export(binary()) -> {ok, map() | absent, non_neg_integer(), non_neg_integer()} | {error, timeout}.
export(S) -> call(S, {export, S}).

%% @doc Replaces the local copy with `Export' (or removes it) as of `{Epoch, Seq}'.
-spec install(binary(), pos_integer(), non_neg_integer(), node(), map() | absent) ->
          ok | {error, term()}.
install(S, Epoch, Seq, Owner, Export) -> call(S, {install, S, Epoch, Seq, Owner, Export}).

%% @doc Forgets the local copy (this node is neither owner nor replica at
%% `Epoch'). `Mark': the sequence of the owner's `session_migrated' event (or
%% `undefined'): the local log follows the owner's up to the event before it,
%% then logs `session_deleted' (reason `migrated') under that sequence.
-spec drop(binary(), pos_integer(), node(), pos_integer() | undefined) -> ok | {error, term()}.
drop(S, Epoch, Owner, Mark) -> call(S, {drop, S, Epoch, Owner, Mark}).

%% @doc Phase one of removing deleted sessions (the owner's keeper, see
%% `dspex_cluster_keeper'): `Tombs' are `{Session, Epoch, Seq}', each deleted
%% by `Owner' at `{Epoch, Seq}'. For each session this node knows nothing
%% newer of (no epoch or fence above `Epoch', no later seq in it), any copy
%% held here is dropped without logging (an old copy of a node that was cut
%% off or down during the deletion), and a row is made a tombstone at
%% `{Epoch, Seq}' fenced at `Epoch'; a node without a row gets none. Returns
%% the sessions that are so (the others are left as they are: a newer
%% epoch began, say the id was created again).
-spec bury([{binary(), pos_integer(), pos_integer()}], node()) -> [binary()].
bury(Tombs, Owner) -> per_process(Tombs, fun(Part) -> {bury, Part, Owner} end).

%% @doc Phase two, once every configured node buried them: removes every row
%% of the sessions `Tombs' (as for `bury/2') still a tombstone at their
%% `{Epoch, Seq}' with no copy here: the sessions table's, the read index's
%% (`dspex_cluster_shipper'), the version vector and cache registrations
%% (`dspex_cache'), the fast path's descriptor, and a pin. Returns the
%% sessions with no row left here.
-spec forget([{binary(), pos_integer(), pos_integer()}]) -> [binary()].
forget(Tombs) -> per_process(Tombs, fun(Part) -> {forget, Part} end).

%% @doc The sessions of `Sessions' this node has a row of.
-spec known([binary()]) -> [binary()].
known(Ss) -> [S || S <- Ss, ets:member(?TAB, S)].

%% The sessions of each pool process in one call to it (ordered with the
%% session's other changes); a process that does not answer in time counts
%% as having done none of its part.
per_process(Tombs, Msg) ->
    Parts = maps:groups_from_list(fun({S, _, _}) -> name(S) end, Tombs),
    lists:append([try gen_server:call(P, Msg(Part), ?CALL_TIMEOUT)
                  catch exit:_ -> []
                  end || {P, Part} <- maps:to_list(Parts)]).

call(S, Msg) ->
    try gen_server:call(name(S), Msg, ?CALL_TIMEOUT)
    catch exit:{timeout, _} -> {error, timeout}
    end.

%%% server ----------------------------------------------------------------------

-spec init([]) -> {ok, #{}}.
init([]) ->
    put(dspex_cluster_local, true),
    {ok, #{}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({state, S}, _From, St) ->
    {S, E, Seq, _, _, _, F} = row(S),
    {reply, {E, fast_seq(dspex_nif:repl_info(S), E, Seq), F, present(S)}, St};
handle_call({fence, S, Epoch}, _From, St) ->
    %% this node as the owner: no more fast-path sets (dspex_cluster_writer),
    %% and the seq they reached counts
    Fast = dspex_nif:repl_unsettle(S),
    {S, E, Seq0, O, R, G, F} = row(S),
    Seq = unsettled_seq(Fast, E, Seq0),
    case Epoch < max(E, F) of
        true -> {reply, {error, {stale_epoch, max(E, F)}}, St};
        false ->
            put_row({S, E, Seq, O, R, G, Epoch}),
            %% another node is taking over: watches made here while owner end
            dspex_cluster_watch:lost(S, lost),
            {reply, {ok, {E, Seq, present(S)}}, St}
    end;
handle_call({export, S}, _From, St) ->
    %% this node as the owner: the fast path stops, the seq it reached counts
    Fast = dspex_nif:repl_unsettle(S),
    {S, E, Seq0, _, _, _, _} = row(S),
    Seq = unsettled_seq(Fast, E, Seq0),
    Exp = case dspex_store:export_session(S) of
              {ok, X} -> X#{dspex_vv => dspex_cache:vv(S)};   % its lineage travels with it
              {error, _} -> absent
          end,
    {reply, {ok, Exp, E, Seq}, St};
handle_call({install, S, Epoch, Seq, Owner, Export}, _From, St) ->
    {S, E, _, _, _, _, F} = row(S),
    case Epoch < max(E, F) of
        true -> {reply, {error, {stale_epoch, max(E, F)}}, St};
        false ->
            %% the row says which {epoch, seq} this node holds (a takeover
            %% picks the newest, absent or not): only once the copy is here
            Res = case replace(S, Export) of
                      %% the copy's log: the owner's, up to the export's last
                      %% event (dspex_log_seq) or its last event
                      ok -> dspex_events:follow(S, Owner, log_upto(Export));
                      Err -> Err
                  end,
            _ = Res =:= ok andalso put_row({S, Epoch, Seq, Owner, [], 0, Epoch}),
            %% another node owns it now: this node's fast-path descriptor goes
            ok = forget_fast(S, Owner),
            {reply, Res, St}
    end;
handle_call({drop, S, Epoch, Owner, Mark}, _From, St) ->
    {S, E, _, _, _, _, F} = row(S),
    case Epoch < max(E, F) of
        true -> {reply, {error, {stale_epoch, max(E, F)}}, St};
        false ->
            dspex_cluster_watch:lost(S, lost),
            %% the session moved to other nodes: session_deleted, reason
            %% migrated, under the sequence of the owner's session_migrated
            Reason = case is_integer(Mark) andalso present(S) andalso dspex_events:follow(S, Owner, Mark - 1) =:= ok
                         andalso dspex_events:last_sequence(S) =:= Mark - 1 of
                         true -> migrated;
                         false -> silent
                     end,
            _ = dspex_events:delete_copy(S, Reason),
            ok = dspex_events:forget_kept(S),
            put_row({S, Epoch, 0, Owner, [], 0, Epoch}),
            ok = forget_fast(S, Owner),
            {reply, ok, St}
    end;
handle_call({apply, S, Epoch, Seq, Owner, P}, _From, St) ->
    {reply, apply_one(S, Epoch, Seq, Owner, P), St};
handle_call({bury, Tombs, Owner}, _From, St) ->
    {reply, [S || {S, E, Seq} <- Tombs, bury_one(S, E, Seq, Owner)], St};
handle_call({forget, Tombs}, _From, St) ->
    {reply, [S || {S, E, Seq} <- Tombs, forget_one(S, E, Seq)], St}.

bury_one(S, E, Seq, Owner) ->
    case ets:lookup(?TAB, S) of
        [{S, Ex, SeqX, _, _, _, Fx}] when Fx > E; Ex > E; Ex =:= E, SeqX > Seq -> false;
        Found ->
            %% this node's fast-path descriptor (it may have owned the copy) goes first
            _ = dspex_nif:repl_unsettle(S),
            ok = dspex_nif:repl_forget(S),
            _ = present(S) andalso replace(S, absent),
            _ = Found =/= [] andalso ets:insert(?TAB, {S, E, Seq, Owner, [], 0, E}),
            true
    end.

forget_one(S, E, Seq) ->
    case ets:lookup(?TAB, S) of
        [] -> true;
        [{S, E, Seq, _, _, _, F} = Row] when F =< E ->
            %% compared whole: a takeover of the id that began meanwhile
            %% (it writes the row first) keeps it
            not present(S) andalso ets:delete_object(?TAB, Row) andalso forgotten(S, E);
        _ -> false
    end.

%% What else keys on a forgotten session here: only what belongs to epochs up
%% to `E' (a new epoch of the id, begun since, keeps its own).
forgotten(S, E) ->
    _ = ets:select_delete(dspex_cluster_shipper:shipped_table(),
                          [{{S, {'$1', '_'}, '_'}, [{'=<', '$1', E}], [true]}]),
    ok = dspex_cache:forget_deleted(S, E),
    _ = dspex_nif:repl_unsettle(S),
    ok = dspex_nif:repl_forget(S),
    _ = case dspex_cluster_members:published_view() of
            #{overrides := #{S := _}} -> dspex_cluster_members:set_override(S, undefined);
            _ -> ok
        end,
    true.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({apply, S, Epoch, Seq, Owner, P, Notify}, St) ->
    %% asynchronous replication: the owner's writer is told when a full copy is needed
    case apply_one(S, Epoch, Seq, Owner, P) of
        {error, need_full} -> Notify ! {need_full, S, node()};
        _ -> ok
    end,
    {noreply, St};
handle_cast({install, S, Epoch, Seq, Owner, Export}, St) ->
    {S, E, Seq0, _, _, _, F} = row(S),
    %% (no row: see the module doc; the owner's next change finds the gap)
    case not ets:member(?TAB, S) orelse Epoch < max(E, F) orelse (Epoch =:= E andalso Seq =< Seq0) of
        true -> ok;
        false ->
            _ = replace(S, Export) =:= ok andalso dspex_events:follow(S, Owner, log_upto(Export)) =:= ok
                andalso put_row({S, Epoch, Seq, Owner, [], 0, Epoch})
    end,
    {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({apply_batch, Receiver, Key, Owner, Recs}, St) ->
    %% this process's part of a batch (see dspex_cluster_receiver), in order
    %% per session; the answer lists the records not applied
    Fails = lists:append([case ets:member(?TAB, S) of
                              true -> apply_session(S, SRecs, Owner, []);
                              false -> [{I, {error, need_full}} || {I, _, _, _, _} <- SRecs]   % no row: see the module doc
                          end || {S, SRecs} <- by_session(Recs)]),
    Receiver ! {applied, Key, Fails},
    {noreply, St};
handle_info(_, St) -> {noreply, St}.

%% A change of a session with a row here (see the module doc).
apply_one(S, Epoch, Seq, Owner, P) ->
    case ets:member(?TAB, S) of
        true -> do_apply(S, Epoch, Seq, Owner, P);
        false -> {error, need_full}
    end.

%% A change with the owner's event sequence before (`Pre') and after (`Post')
%% it: the replica's log is brought to `Pre' first (events the owner logged
%% between changes), then the change is applied (a replayed change logs the
%% same events as the owner's commit, numbered from `Pre' + 1), then the log
%% is brought to `Post' (a full copy logs nothing itself: its events are
%% copied). `Pre' undefined: the change's own events are copied too.
do_apply(S, Epoch, Seq, Owner, {ev, Pre, Post, P, Kept}) ->
    {S, E, Seq0, _, _, _, F} = row(S),
    Full = is_tuple(P) andalso element(1, P) =:= full,
    %% a stale, repeated or out-of-order change is refused (or ignored) as
    %% below before anything is copied from its owner's log
    Known = max(E, F),
    Skip = Epoch < Known orelse (Epoch =:= E andalso Seq =< Seq0)
        orelse (not Full andalso (Epoch =/= E orelse Seq =/= Seq0 + 1)),
    Check = case Skip of
                true -> skip;
                false -> before_change(S, Owner, Pre, Kept)
            end,
    case Check of
        skip -> do_apply(S, Epoch, Seq, Owner, P);
        ok ->
            case do_apply(S, Epoch, Seq, Owner, mute_if(Pre, P)) of
                ok ->
                    _ = dspex_events:catch_up(S, Owner, Post, Kept),
                    ok;
                Err -> Err
            end;
        _ -> {error, need_full}
    end;
do_apply(S, Epoch, Seq, Owner, P) ->
    {S, E, Seq0, _, _, _, F} = row(S),
    Known = max(E, F),
    if
        Epoch < Known -> {error, {stale_epoch, Known}};
        Epoch =:= E, Seq =< Seq0 -> ok;   % a repeat (async resend after a full copy)
        true ->
            case P of
                {full, Export} ->
                    case replace(S, Export) of
                        ok -> put_row({S, Epoch, Seq, Owner, [], 0, max(F, Epoch)}), ok;
                        Err -> Err
                    end;
                _ when Epoch =/= E; Seq =/= Seq0 + 1 -> {error, need_full};
                _ when P =:= delete_session; P =:= silent_delete_session ->
                    dspex_cluster_watch:lost(S, ended),
                    _ = case P of
                            delete_session -> dspex_store:delete_session(S);
                            _ -> dspex_events:delete_copy(S, silent)
                        end,
                    put_row({S, Epoch, Seq, Owner, [], 0, max(F, Epoch)}),
                    ok;
                {op, Op, Args, Expect} ->
                    {Mod, Fun} = case Op of
                                     {_, _} -> Op;
                                     _ -> {dspex_store, Op}
                                 end,
                    case catch erlang:apply(Mod, Fun, Args) of
                        Expect ->
                            put_row({S, Epoch, Seq, Owner, [], 0, max(F, Epoch)}),
                            ok;
                        _Other ->
                            {error, need_full}
                    end
            end
    end.

%% The records of a batch part grouped by session, each group in the batch's
%% order (sessions are independent; a session's order is its commit order).
by_session(Recs) ->
    {Order, Groups} = lists:foldl(fun({_, S, _, _, _} = R, {O, G}) ->
                                          case G of
                                              #{S := L} -> {O, G#{S := [R | L]}};
                                              _ -> {[S | O], G#{S => [R]}}
                                          end
                                  end, {[], #{}}, Recs),
    [{S, lists:reverse(maps:get(S, Groups))} || S <- lists:reverse(Order)].

%% A session's records: each run of consecutive sets that one NIF call can
%% replay (`run/1') is applied by `dspex_nif:replica_apply_batch/3' with the
%% rules of `do_apply/5' (an older epoch refused, a repeat ignored, a gap
%% `need_full'); anything else, or a run whose first change the local event
%% log is not ready for, goes through `do_apply/5' one record at a time.
%% Returns the failures, `[{Index, {error, Why}}]'.
apply_session(_S, [], _Owner, Fails) -> lists:reverse(Fails);
apply_session(S, [{I, S, E, Seq, P} | Rest] = Recs, Owner, Fails) ->
    case run(Recs) of
        {[_ | _] = Run, Left} ->
            case ready(S, Run) of
                true -> apply_session(S, Left, Owner, lists:reverse(apply_run(S, Run, Owner), Fails));
                false -> apply_session(S, Rest, Owner, one(I, do_apply(S, E, Seq, Owner, P), Fails))
            end;
        {[], _} -> apply_session(S, Rest, Owner, one(I, do_apply(S, E, Seq, Owner, P), Fails))
    end.

one(_, ok, Fails) -> Fails;
one(I, Err, Fails) -> [{I, Err} | Fails].

%% The longest prefix of records that are plain replayed sets of one epoch,
%% with consecutive sequence numbers, and (event log on) each logging exactly
%% the one event of its set right after the previous one's (`Pre' of each is
%% `Post' of the one before, nothing kept): `{[{I, Epoch, Seq, Set, Events}], Rest}'.
run(Recs) -> run(Recs, undefined, []).

run([{I, _, E, Seq, P} | Rest] = Recs, Prev, Acc) ->
    case {plain_set(P), Prev} of
        {false, _} -> {lists:reverse(Acc), Recs};
        {{Set, Ev}, undefined} -> run(Rest, {E, Seq, Ev}, [{I, E, Seq, Set, Ev} | Acc]);
        {{Set, Ev}, {E, PSeq, PEv}} when Seq =:= PSeq + 1 ->
            case chained(PEv, Ev) of
                true -> run(Rest, {E, Seq, Ev}, [{I, E, Seq, Set, Ev} | Acc]);
                false -> {lists:reverse(Acc), Recs}
            end;
        _ -> {lists:reverse(Acc), Recs}
    end;
run([], _, Acc) -> {lists:reverse(Acc), []}.

chained(none, none) -> true;
chained({_, Post}, {Pre, _}) -> Pre =:= Post;
chained(_, _) -> false.

%% `{{Key, Value, Opts, Version}, Events}' of a replayed set the NIF makes as
%% `dspex_store:set/4' would (the options the owner's payload carries), or
%% false. `Events': `none' (log off at the owner) or `{Pre, Post}'.
plain_set({op, set, [_, K, V, Opts], {ok, Ver}}) when is_map(Opts), is_integer(Ver) ->
    case maps:size(maps:without([expected_version, metadata, changed_by, as, context], Opts)) of
        0 -> {{K, V, Opts, Ver}, none};
        _ -> false
    end;
plain_set({ev, Pre, Post, P, []}) when is_integer(Pre), Post =:= Pre + 1 ->
    case plain_set(P) of
        {Set, none} -> {Set, {Pre, Post}};
        false -> false
    end;
plain_set(_) -> false.

%% The local log is where the run's first replay must log its event (the
%% owner's `Pre'), or off here.
ready(_S, [{_, _, _, _, none} | _]) -> true;
ready(S, [{_, _, _, _, {Pre, _}} | _]) ->
    case dspex_events:last_sequence(S) of
        undefined -> true;
        L -> L =:= Pre
    end.

%% One NIF call for the run; the row follows what it applied (as do_apply/5
%% writes it after each change), then the log is brought to the last applied
%% change's `Post' (a no-op when every replay logged its one event).
apply_run(S, Run, Owner) ->
    {S, E0, Seq0, _, _, _, F0} = row(S),
    Sets = [{E, Seq, K, V, O, Ver} || {_, E, Seq, {K, V, O, Ver}, _} <- Run],
    {{E1, Seq1, F1}, Res} = dspex_nif:replica_apply_batch(S, {E0, Seq0, F0}, Sets),
    _ = Seq1 =/= Seq0 andalso put_row({S, E1, Seq1, Owner, [], 0, F1}),
    Applied = [Ev || {{_, E, Seq, _, Ev}, ok} <- lists:zip(Run, Res), E =:= E1, Seq =< Seq1, Seq > Seq0],
    _ = case lists:reverse(Applied) of
            [{_, Post} | _] -> dspex_events:catch_up(S, Owner, Post, []);
            _ -> ok
        end,
    [{I, R} || {{I, _, _, _, _}, R} <- lists:zip(Run, Res), R =/= ok].

%% The replica's log must be at the owner's `Pre' for its replay to number
%% the change's events as the owner did.
before_change(_S, _Owner, undefined, _Kept) -> ok;
before_change(S, Owner, Pre, Kept) ->
    case dspex_events:last_sequence(S) of
        undefined -> ok;
        Pre -> ok;
        L when L < Pre ->
            case dspex_events:catch_up(S, Owner, Pre, Kept) of
                ok -> before_change(S, Owner, Pre, []);
                Err -> Err
            end;
        _ ->
            %% this log holds events the owner's lacks (the unreplicated tail
            %% of an owner that died, which this node was): it cannot follow
            %% the owner's numbering; the change is applied and logged here
            %% under this log's own next sequences. With one database for
            %% every node those numbers are the owner's: a full copy instead
            %% (it logs nothing)
            case dspex_events:shared_backend() of
                true -> {error, ahead};
                false -> ok
            end
    end.

%% The row's seq, or the one the fast path reached in the row's epoch
%% (`dspex_nif:repl_unsettle/1''s answer) when it got further.
unsettled_seq({E, N}, E, Seq0) when N > Seq0 -> N;
unsettled_seq(_, _, Seq0) -> Seq0.

%% How far an installed copy's log follows its owner's: up to the event of
%% the export's last change when the owner said (an owner that goes on
%% committing meanwhile, see dspex_cluster_writer's export_for), else all of it.
log_upto(#{dspex_log_seq := N}) when is_integer(N) -> N;
log_upto(_) -> latest.

mute_if(undefined, delete_session) -> silent_delete_session;
mute_if(_, P) -> P.

present(S) -> element(1, dspex_store:get_session(S)) =:= ok.

%% @doc Replaces this node's copy of session S with an export of it (or drops
%% it for `absent'); watches made on the old copy are told they are lost.
-spec replace(binary(), map() | absent) -> ok | {error, {import_failed, term()}}.
%% Neither the deletion nor the import logs events: the copy's log follows
%% the owner's (dspex_events:follow/3).
replace(S, absent) ->
    dspex_cluster_watch:lost(S, lost),
    ok = dspex_events:forget_kept(S),
    _ = dspex_events:delete_copy(S, silent),
    ok;
replace(S, Export) ->
    dspex_cluster_watch:lost(S, lost),
    ok = dspex_events:forget_kept(S),
    _ = dspex_events:delete_copy(S, silent),
    Mute = put(dspex_events_mute, true),
    try dspex_store:import_session(maps:without([dspex_vv, dspex_log_seq], Export)) of
        ok ->
            %% the copy's lineage is its source's (dspex_cache version vectors)
            ok = dspex_cache:set_vv(S, maps:get(dspex_vv, Export, #{})),
            ok;
        {error, R} -> {error, {import_failed, R}}
    catch _:Why -> {error, {import_failed, Why}}
    after put(dspex_events_mute, Mute)
    end.
