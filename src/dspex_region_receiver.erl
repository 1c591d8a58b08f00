%% @doc Cross-region replication, backup side: applies the batches a primary
%% region ships (see `dspex_region_shipper'), and serves reads with the lag
%% of the copy attached.
%%
%% A batch is applied by the gateway connection it arrived on (one per peer
%% region: a primary's batches are applied one at a time, in the order sent),
%% record by record, idempotently by the session's `{Epoch, Seq}': a record at
%% or below the sequence applied here is a repeat and is ignored (unless its
%% epoch is newer than the one applied: the primary's cluster went on from
%% an older copy, and the session is reported for a full copy); the next
%% sequence is replayed through `dspex_store' (so it reaches the session's
%% owner in this region and its in-region replicas, like any write), and the
%% replay must reach the version the primary reached (`expected_version'), else
%% the session is reported for a full copy; a later sequence (a gap) is
%% reported for a full copy too. A full copy replaces the session
%% (`delete_session' then `import_session' of the primary's export) and sets
%% the applied sequence to the copy's. Each session's row counts its applies,
%% so tests can see that nothing was applied twice.
%%
%% A change of an older region epoch is refused and reported (telemetry
%% `[dspex, region, replication, fenced]', `fenced' in the row), unless the
%% decision of a takeover says the new primary had it (`taken_at'): then it
%% is a repeat, ignored. The answer names the newer decision.
%%
%% A copy installed here for a session whose primary is another region has
%% no expiry (`ttl => infinity'): the primary ships its deletion when its own
%% copy expires; the TTL is kept aside and `resume_ttl/1' restores it when
%% this region takes the session over.
%%
%% The primary's routing decision of each session travels with its records and
%% is recorded here (`dspex_region:adopt/2'), so that `route_session/2' in this
%% region answers the same primary, and this region's writers do not ship the
%% replayed changes anywhere.
-module(dspex_region_receiver).

-export([apply_batch/2, heard/1, silent_ms/1, lag/1, read_local/3, sessions/0, row/1, took_over/2]).
-export([resume_ttl/1]).

-define(APPLIED, dspex_region_applied).

%% @doc Applies a batch from region `From'; the sessions that need a full
%% copy, and (`decisions') this region's newer decision of each session whose
%% changes were refused for an older region epoch.
-spec apply_batch(binary(), map()) -> #{need_full := [binary()], decisions => #{binary() => map()}}.
apply_batch(From, Batch) ->
    %% the writes below replay the primary's changes: dspex_region:writable/1
    %% lets them through in a backup region (a client's write is refused there)
    Was = put(dspex_region_replay, true),
    try apply_batch1(From, Batch)
    after
        _ = erase(dspex_region_primary_here),
        case Was of
            undefined -> erase(dspex_region_replay);
            _ -> put(dspex_region_replay, Was)
        end
    end.

apply_batch1(From, #{recs := Recs, heads := Heads, decisions := Ds0}) when is_list(Recs), is_map(Heads), is_map(Ds0) ->
    Me = persistent_term:get({dspex_region, name}, undefined),
    Ds = maps:filter(fun(S, D) -> is_binary(S) andalso is_map(D) end, Ds0),
    %% a session moved here: this region is its primary once its copy is in
    %% (see below)
    {Here, There} = maps:fold(fun(S, #{primary_region := P} = D, {H, T}) when P =:= Me -> {[{S, D} | H], T};
                                 (S, D, {H, T}) -> {H, [{S, D} | T]}
                              end, {[], []}, Ds),
    _ = [dspex_region:adopt(S, D) || {S, D} <- There],
    %% a copy installed for a session moved here keeps its TTL (install/2)
    _ = put(dspex_region_primary_here, [S || {S, _} <- Here]),
    Copies = fun() -> [{S, maps:get(full_copies, row(S))} || {S, _} <- Here] end,
    Before = Copies(),
    %% each record in the region epoch it was committed in (the batch's
    %% decision gives it for records that do not say)
    %% (and the sessions whose changes were refused for an older region epoch)
    Step = fun(S, Rec, RE, {NF0, Refused}) ->
                   case apply_rec(From, Rec, RE, NF0) of
                       {refused, NF1} -> {NF1, [S | Refused]};
                       NF1 -> {NF1, Refused}
                   end
           end,
    {NF, RefusedIn} = lists:foldl(fun({S, E, Seq, P, RE}, Acc) when is_binary(S), is_integer(RE) ->
                                          Step(S, {S, E, Seq, P}, RE, Acc);
                                     ({S, _, _, _} = Rec, Acc) when is_binary(S) ->
                                          Step(S, Rec, region_epoch(maps:get(S, Ds, undefined)), Acc);
                                     (_, Acc) -> Acc
                                  end, {[], []}, Recs),
    %% moved here: the batch brought the session's copy in (a full copy
    %% installed from it), this region is the primary and sends its backups a
    %% copy. A batch naming this region the primary without the copy changes
    %% nothing: the old primary's late changes, sent once it adopted the
    %% decision from a refusal's answer (refused above), or its changes queued
    %% before the move (applied above as a backup's, the copy follows them).
    %% Adopted on those, the decision made this region the primary before its
    %% copy was in, or, already adopted, sent every backup another full copy.
    CopiedIn = [S || {{S, N}, {S, N0}} <- lists:zip(Copies(), Before), N > N0],
    [case dspex_region:adopt(S, D) of
         ok -> dspex_region_shipper:resync(S);
         stale -> ok
     end || {S, D} <- Here, lists:member(S, CopiedIn), not lists:member(S, NF)],
    Now = erlang:monotonic_time(millisecond),
    Touched = lists:usort([element(1, R) || R <- Recs, is_tuple(R), tuple_size(R) >= 4] ++ maps:keys(Heads)),
    [begin
         #{seq := Seq, head := H0} = Row = row(S),
         %% the newest sequences announced by this primary, in its numbering
         H = case region_epoch(Row) =:= region_epoch(maps:get(S, Ds, undefined)) of
                 true -> max(H0, maps:get(S, Heads, 0));
                 false -> H0
             end,
         Row1 = Row#{head => max(H, Seq)},
         ets:insert(?APPLIED, {S, case Seq >= H of true -> Row1#{current_at => Now}; false -> Row1 end})
     end || S <- Touched, is_binary(S)],
    %% the region's other nodes get the rows (the session's owner there
    %% decides its failover)
    ok = dspex_region:rows_changed([{S, row(S)} || S <- Touched, is_binary(S)]),
    heard(From),
    %% changes refused for an older region epoch: their sender is an old
    %% primary that has not learned the newer decision; the answer carries it
    Newer = lists:usort(RefusedIn),
    case [{S, D} || S <- Newer, D <- [dspex_region:decision(S)], is_map(D)] of
        [] -> #{need_full => lists:usort(NF)};
        Decisions -> #{need_full => lists:usort(NF), decisions => maps:from_list(Decisions)}
    end;
apply_batch1(_, _) -> #{need_full => []}.

%% @doc The applied row of `Session' (zeros when none).
-spec row(binary()) -> map().
row(S) ->
    case ets:lookup(?APPLIED, S) of
        [{_, R}] -> R;
        [] -> #{epoch => 0, seq => 0, head => 0, applies => 0, full_copies => 0, current_at => undefined,
                primary => undefined, region_epoch => 0, fenced => 0}
    end.

%% @doc This region took `Session' over at region epoch `RE' (failover):
%% changes of older region epochs are refused from now on.
-spec took_over(binary(), non_neg_integer()) -> true | false.
took_over(S, RE) ->
    case ets:lookup(?APPLIED, S) of
        [{_, Row}] ->
            ets:insert(?APPLIED, {S, Row#{region_epoch => RE}}),
            ok = dspex_region:rows_changed([{S, Row#{region_epoch => RE}}]),
            true;
        [] -> false
    end.

%% @doc This region becomes the primary of `Session' (a takeover): its copy,
%% installed without expiry as a backup's (the primary's deletion removes
%% it), gets the primary's TTL back (counted from now): exported and
%% installed again with it, as a replay (not shipped: called before the
%% decision names this region). `ok' when there is nothing to resume.
-spec resume_ttl(binary()) -> ok | {error, term()}.
resume_ttl(S) ->
    case ets:lookup(?APPLIED, {ttl, S}) of
        [{_, Ttl}] ->
            Was = put(dspex_region_replay, true),
            try
                case Ttl =:= infinity orelse dspex_store:export_session(S) of
                    true -> ets:delete(?APPLIED, {ttl, S}), ok;
                    {ok, Export} ->
                        _ = dspex_store:delete_session(S),
                        case dspex_store:import_session(maps:remove(dspex_vv, Export#{id => S, ttl => Ttl})) of
                            ok -> ets:delete(?APPLIED, {ttl, S}), ok;
                            {error, _} = E -> E
                        end;
                    {error, _} = E -> E
                end
            after
                case Was of
                    undefined -> erase(dspex_region_replay);
                    _ -> put(dspex_region_replay, Was)
                end
            end;
        [] -> ok
    end.

%% @doc Sessions replicated into this region: `Session => row'.
-spec sessions() -> #{binary() => map()}.
sessions() -> maps:from_list([{S, R} || {S, R} <- ets:tab2list(?APPLIED), is_binary(S)]).

%% @doc Milliseconds since a frame from region `From' (a batch or a probe)
%% last arrived here, `infinity' if none did.
-spec silent_ms(binary()) -> non_neg_integer() | infinity.
silent_ms(From) ->
    try ets:lookup(?APPLIED, {heard, From}) of
        [{_, T}] -> erlang:monotonic_time(millisecond) - T;
        [] -> infinity
    catch error:badarg -> infinity
    end.

%% @doc Notes a frame from region `From' (a batch or a probe).
-spec heard(binary()) -> true.
heard(From) ->
    Now = erlang:monotonic_time(millisecond),
    %% and, at most every 100 ms, on the region's other nodes
    _ = case ets:lookup(?APPLIED, {heard_shared, From}) of
            [{_, T}] when Now - T < 100 -> ok;
            _ -> ets:insert(?APPLIED, {{heard_shared, From}, Now}),
                 dspex_region:rows_changed([{{heard, From}, Now}])
        end,
    ets:insert(?APPLIED, {{heard, From}, Now}).

apply_rec(From, {S, E, Seq, P} = Rec, RE, NF) when is_binary(S), is_integer(E), is_integer(Seq) ->
    case is_tuple(P) andalso element(1, P) =:= region_full andalso primary_here(S, RE) of
        %% the copy that moved the session here, sent again (the link went
        %% down before the old primary had the acknowledgement): this region
        %% has been the primary since the first one and took writes, the
        %% copy is not installed over them (acknowledged: the move's wait ends)
        true -> NF;
        false -> apply_rec1(From, Rec, RE, NF, row(S))
    end;
apply_rec(_, _, _, NF) -> NF.

%% this region is the primary of S at region epoch RE
primary_here(S, RE) ->
    Me = persistent_term:get({dspex_region, name}, undefined),
    case dspex_region:decision(S) of
        #{primary_region := Me, region_epoch := RE} when Me =/= undefined -> true;
        _ -> false
    end.

apply_rec1(From, {S, E, Seq, P} = Rec, RE, NF, Row) ->
    case region_epoch(Row) of
        RE -> apply_seq(From, Rec, Row, NF);
        Newer when Newer > RE, Newer =:= RE + 1, is_integer(Seq) ->
            case dspex_region:decision(S) of
                #{region_epoch := Newer, taken_at := TakenAt} when Seq =< TakenAt ->
                    %% a change the new primary had when it took over (say
                    %% a batch sent again after a flap): a repeat, ignored;
                    %% the answer still names the newer decision
                    {refused, NF};
                _ -> fence(From, S, Seq, RE, Newer, Row, NF)
            end;
        Newer when Newer > RE -> fence(From, S, Seq, RE, Newer, Row, NF);
        _Older ->
            %% a new primary: its numbering starts with a full copy
            case P of
                {region_full, Export} ->
                    install_full(From, S, Export, Row#{epoch => E, seq => Seq, head => Seq, region_epoch => RE}, NF);
                _ -> [S | NF]
            end
    end.

%% A change of an older region epoch (the session was moved away from its
%% sender, or taken over from it): refused and reported, never merged.
fence(From, S, Seq, RE, Newer, Row, NF) ->
    logger:warning("dspex_region: change ~p of ~p from ~s refused: region epoch ~p, the session is at ~p",
                   [Seq, S, From, RE, Newer]),
    dspex_telemetry:execute([dspex, region, replication, fenced], #{count => 1},
                            #{session => S, peer => From, seq => Seq, region_epoch => RE}),
    ets:insert(?APPLIED, {S, Row#{fenced => maps:get(fenced, Row, 0) + 1}}),
    {refused, NF}.

apply_seq(From, {S, E, Seq, P}, Row, NF) ->
    #{seq := Have, epoch := HaveE} = Row,
    case P of
        {region_full, Export} when Seq =:= Have, E =:= HaveE ->
            case has_copy(S, Export) of
                %% the copy this region installed last, sent again (its ack was
                %% lost on a flap): the same state, not installed twice; it
                %% covers what was reported before it in this batch
                true -> [X || X <- NF, X =/= S];
                false -> install_full(From, S, Export, Row#{epoch => E, seq => Seq}, NF)
            end;
        {region_full, Export} when Seq >= Have -> install_full(From, S, Export, Row#{epoch => E, seq => Seq}, NF);
        %% a sequence already applied, from a newer epoch of the primary's
        %% cluster: its new owner went on from an older copy (an async
        %% in-region replica missed changes): the histories differ
        _ when Seq =< Have, E > HaveE -> [S | NF];
        _ when Seq =< Have -> NF;   % a repeat (or a late record of an older epoch)
        _ when Seq =:= Have + 1 ->
            case lists:member(S, NF) of
                true -> NF;   % behind already: the full copy brings it
                false ->
                    case replay(S, P) of
                        ok -> done(S, Row#{epoch => E, seq => Seq}, From), NF;
                        {error, Why} ->
                            logger:notice("dspex_region: change ~p of ~p from ~s not replayed (~p): full copy asked",
                                          [Seq, S, From, Why]),
                            [S | NF]
                    end
            end;
        _ -> [S | NF]   % a gap
    end.

%% A full copy replaces the session; Row is its row as the copy leaves it
%% (the copy's epoch and sequence; a new primary's region epoch).
install_full(From, S, Export, Row, NF) ->
    case replay(S, {full, Export}) of
        ok ->
            done(S, Row#{full_copies => maps:get(full_copies, Row) + 1}, From),
            %% the copy covers what was reported before it in this batch
            [X || X <- NF, X =/= S];
        {error, Why} ->
            logger:warning("dspex_region: full copy of ~p from ~s not installed: ~p", [S, From, Why]),
            [S | NF]
    end.

%% The session is here as the copy says (present, or absent for a deleted one).
has_copy(S, Export) when is_map(Export) -> element(1, dspex_store:get_session(S)) =:= ok;
has_copy(S, absent) -> element(1, dspex_store:get_session(S)) =/= ok;
has_copy(_, _) -> false.

region_epoch(#{region_epoch := E}) -> E;
region_epoch(_) -> 0.

done(S, Row, From) ->
    ets:insert(?APPLIED, {S, Row#{applies => maps:get(applies, Row) + 1, primary => From}}).

install(S, skip) -> _ = S, ok;
install(S, absent) -> deleted(dspex_store:delete_session(S));
install(S, Export) when is_map(Export) ->
    _ = dspex_store:delete_session(S),
    %% a backup's copy does not expire on this region's clock: the primary
    %% ships its deletion when its own copy expires (the TTL is kept aside
    %% and resumed if this region takes the session over, resume_ttl/1); a
    %% copy of a session moved here is the primary's: its TTL as it is
    Mine = lists:member(S, case get(dspex_region_primary_here) of L when is_list(L) -> L; _ -> [] end),
    Ttl = maps:get(ttl, Export, infinity),
    Copy = case Mine of
               true -> Export#{id => S};
               false -> Export#{id => S, ttl => infinity}
           end,
    case dspex_store:import_session(maps:remove(dspex_vv, Copy)) of
        ok ->
            _ = case Mine of
                    true -> ets:delete(?APPLIED, {ttl, S});
                    false -> ets:insert(?APPLIED, {{ttl, S}, Ttl})
                end,
            ok;
        {error, _} = E -> E
    end;
install(_, _) -> {error, bad_copy}.

deleted(ok) -> ok;
deleted({error, session_not_found}) -> ok;
deleted(E) -> E.

%% A change replayed here must end where the primary's ended. A replay that
%% raises (say a caller's type error the primary raised too) is reported
%% for a full copy: the connection that applies the batches goes on.
replay(S, P) ->
    try replay1(S, P)
    catch Class:Reason -> {error, {Class, Reason}}
    end.

replay1(S, {ev, _, _, P, _}) -> replay1(S, P);
replay1(S, {full, Export}) -> install(S, Export);
replay1(S, delete_session) ->
    %% (the primary's deletion, by a client or by its TTL)
    _ = ets:delete(?APPLIED, {ttl, S}),
    deleted(dspex_store:delete_session(S));
replay1(S, {op, Op, [S | _] = Args, Expected}) ->
    Got = case Op of
              set -> apply(dspex_store, set, Args);
              set_derived -> apply(dspex_store, set_derived, Args);
              rollback -> apply(dspex_store, rollback, Args);
              delete -> apply(dspex_store, delete, Args);
              set_many -> apply(dspex_store, set_many, Args);
              {dspex_acl, set_rate_limit} -> apply(dspex_acl, set_rate_limit, Args);
              _ -> {error, {unknown_op, Op}}
          end,
    case same(Op, Got, Expected) of
        true -> ok;
        false -> {error, {diverged, Got}}
    end;
replay1(_, P) -> {error, {unknown_payload, P}}.

same(set_many, {ok, #{updated := U}}, {ok, #{updated := U}}) -> true;
same(_, X, X) -> true;
same(_, _, _) -> false.

%% @doc The lag of this region's copy of `Session': `lag_versions' (the
%% primary's newest sequence it announced minus the one applied here) and
%% `lag_ms': 0 while the copy is current and the primary was heard within
%% `down_after_ms'; else the time since the copy was last known current (or
%% since the primary was last heard). `undefined' when the session is not
%% replicated into this region.
-spec lag(binary()) -> #{lag_versions := non_neg_integer(), lag_ms := non_neg_integer(), primary_region := binary()}
                       | undefined.
lag(S) ->
    case ets:lookup(?APPLIED, S) of
        [{_, #{seq := Seq, head := H, current_at := Cur, primary := P}}] ->
            Now = erlang:monotonic_time(millisecond),
            Heard = case ets:lookup(?APPLIED, {heard, P}) of [{_, T}] -> T; [] -> Cur end,
            Down = maps:get(down_after_ms, persistent_term:get({dspex_region, config})),
            Ms = if H > Seq, Cur =:= undefined -> 0;
                    H > Seq -> Now - Cur;
                    Now - Heard > Down -> Now - Heard;
                    true -> 0
                 end,
            #{lag_versions => max(0, H - Seq), lag_ms => max(0, Ms), primary_region => P};
        [] -> undefined
    end.

%% @doc A read of this region's copy, with its lag (see `dspex_region:get/3').
-spec read_local(binary(), term(), binary()) -> {ok, map(), map()} | {error, term()}.
read_local(S, K, Me) ->
    Lag = case dspex_region:decision(S) =/= undefined andalso maps:get(primary_region, dspex_region:decision(S)) =/= Me
              andalso lag(S) of
              L when is_map(L) -> L;
              _ -> #{lag_versions => 0, lag_ms => 0, primary_region => Me}
          end,
    case dspex_store:get(S, K) of
        {ok, V} -> {ok, V, Lag#{region => Me}};
        {error, _} = E -> E
    end.
