%% @doc The node-local cache of sessions owned by other nodes (cluster only):
%% cached reads answered by the same NIF read as a local `get', with directed
%% invalidation from the owner and a bounded staleness.
%%
%% == Design ==
%% A cached session is a read-only copy of the owner's session imported into
%% this node's NIF table under a private id (`cache_id/1': a `0' byte, `cache:'
%% and the session id; `dspex_store:list_sessions/0' does not list it), without
%% history (`history_limit' 0), with the owner's variable versions. A cached
%% `dspex_store:get/2,3' or `get_value/2' is one NIF call: the copy's session
%% carries its fill time, strong lease deadline (`clock/0', CLOCK_MONOTONIC
%% ns), the view generation it is valid under (bumped in the NIF on every
%% view change) and a second-chance bit (`c_src/core/cache.c'); the NIF checks
%% them and reads the variable (`dspex_nif:var_get/2' under the default mode,
%% `dspex_nif:cache_get/3' for an explicit one). Only a miss, a stale copy or
%% a `copy' answer come here (`read/5'). The ETS entry (`{S, Id, Epoch, Seq,
%% Owner, Bytes}') is the cache server's bookkeeping, read on the slow path
%% only. The unit of caching, invalidation and
%% eviction is the session: a fill (first read, or `warm/1') copies the whole
%% session in one consistent cut from the owner; an invalidation drops it.
%%
%% A session's version is its owner's `{Epoch, Seq}' (`Seq' counts the
%% session's committed changes of that epoch, see `dspex_cluster_replica').
%%
%% == Coherence ==
%% <ul>
%% <li>Registration: the owner registers the caching node before it reads the
%% version and cuts the copy, so every commit not in the copy finds the node
%% registered and invalidates it.</li>
%% <li>Directed invalidation: on every commit of a session its owner sends
%% `{dspex_cache_inval, S, Epoch, Seq, Owner, CommitNs}' to the registered
%% nodes only (no broadcast). A node drops its copy if it is older than that
%% version. A `set' whose change is at most `value_max_bytes' (1024) travels
%% with it (`{dspex_cache_update, ...}', see `committed/4'); a copy exactly one
%% change behind applies it in place instead of dropping. A node that drops a copy by eviction tells the owner to forget it
%% (`dspex_cache_forget'); an invalidation for a session a node does not
%% cache (and is not filling) is answered the same way; the owner forgets
%% every registration of a node that goes down.</li>
%% <li>Leases: an entry serves hits for `max_staleness_ms' after its fill or
%% renewal; then the next read asks the owner for the version (a renewal when
%% unchanged, a new fill otherwise), so a read is at most
%% `max_staleness_ms' stale even if an invalidation is lost.</li>
%% <li>Read repair: an invalidation, a routed read (its epoch) or a routed
%% write of this node (read-your-writes) drops a copy that is behind before
%% the caller gets its answer.</li>
%% <li>Owner change: an entry is valid only under the view generation it was
%% filled or renewed in; after any view change (node down or up, migration,
%% drain) its next read asks the owner under the new view, and a copy from
%% another owner or epoch is dropped and filled again from the new owner (which
%% has no registrations until then).</li>
%% <li>Replicas: a replica node does not serve reads from its replica copy in
%% `cached' mode (that copy is not covered by the owner's invalidations); it
%% caches like any other node.</li>
%% </ul>
%%
%% == Strong reads ==
%% `read => strong' (Gray and Cheriton leases; on when `mode' is `strong' or
%% `strong => true'): a fill or renewal for a strong read also gets a lease of
%% `max_staleness_ms' from the owner unless a write of the session is being
%% prepared; a strong read answers from a copy only while its lease runs.
%% Before applying a write the owner's writer marks the session pending (no
%% lease granted), revokes every unexpired lease and waits for each holder's
%% drop or the lease's expiry (`before_commit/2'), then commits
%% (`after_commit/1'). A node that took a session over waits out the previous
%% owner's leases before its first write of it (`took_over/1').
%%
%% == Version vectors and conflicts ==
%% Every copy of a session has a version vector `#{Epoch => {Owner, Seq}}'
%% (`vv/1'), advanced by commits and applied changes and carried by full
%% copies. A takeover compares the copies' vectors with the winner's before it
%% replaces them (`find_conflicts/2'); writes a losing copy holds and the
%% winner lacks are recorded on the new owner (`record_conflicts/4',
%% `conflicts/1', telemetry `[dspex, cache, conflict]', a `cache_conflict'
%% event in the session's event log), never merged.
%%
%% == Configuration ==
%% In the cluster configuration: `cache => #{mode => owner | cached | strong,
%% max_staleness_ms => 100, strong => false, value_max_bytes => 1024,
%% max_bytes => 64 MiB}' (`mode' default `owner': every read routed to the
%% owner, as without a cache; `max_staleness_ms' at most 86 400 000,
%% `max_staleness_limit/0').
%% `max_bytes' (or the application environment `cache_max_bytes') bounds the
%% cached copies of a node, measured as the external size of the copies
%% imported; past it sessions are evicted by a clock (second-chance) sweep.
%% Per call: `dspex_store:get/3' with `read => cached | owner | strong' and
%% `max_staleness_ms'; `get/3' and `get_value/3' here.
%%
%% == Observability ==
%% `stats/0'; telemetry `[dspex, cache, hit | miss | stale | fill | evict]'
%% and `[dspex, cache, invalidation, sent | received]' (received carries
%% `delay_ns', commit on the owner to drop here, both clocks
%% `os:perf_counter/1' of one machine); Prometheus `dspex_cache_*' series.
-module(dspex_cache).
-behaviour(gen_server).

-export([start_link/0, get/3, get_value/3, read/5, warm/1, stats/0, reset_stats/0, mode/0, max_staleness_ms/0, read_defaults/0,
         max_staleness_limit/0, max_bytes_config/1,
         cache_id/1, is_cache_id/1, committed/3, fill_here/3, version_here/3, seen/2, wrote/1,
         drop/1, cached_sessions/0, entry/1, clock/0, prometheus/0, tables/0, strong_enabled/0,
         committed/4, before_commit/2, after_commit/1, took_over/1,
         vv/1, set_vv/2, advance_vv/4, find_conflicts/2, record_conflicts/4, conflicts/1, conflicts_here/1,
         forget_deleted/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(TAB, dspex_cache_entries).
-define(REGS, dspex_cache_regs).
-define(LEASES, dspex_cache_leases).
-define(PENDING, dspex_cache_pending).
-define(FENCE, dspex_cache_fence).
-define(STRONG, dspex_cache_strong).
-define(VV, dspex_cache_vv).
-define(CONFLICTS, dspex_cache_conflicts).
-define(CONF, dspex_cache_config).
-define(MODE, dspex_cache_mode).
-define(TICKS, dspex_cache_ticks_per_ms).
-define(CTRS, dspex_cache_counters).
-define(PREFIX, "\0cache:").
-define(SAMPLES, 4096).
-define(CALL_TIMEOUT, 10000).
%% The largest `max_staleness_ms' (one day): its ns (lease deadlines, the
%% NIF's freshness check) and perf_counter ticks stay far inside 64 bits, and
%% its ms inside an Erlang timeout.
-define(MAX_STALENESS_MS, 86400000).

%% counter indexes
-define(HIT, 1).   % unused: hits are counted by the NIF (dspex_nif:cache_hits/1)
-define(MISS, 2).
-define(SENT, 3).
-define(RECEIVED, 4).
-define(STALE, 5).
-define(EVICT, 6).
-define(FILL, 7).
-define(RENEW, 8).
-define(REPAIR, 9).
-define(APPLIED, 10).
-define(NCTRS, 10).

-type mode() :: owner | cached | strong.
-type opts() :: #{read => mode(), max_staleness_ms => non_neg_integer(), as => binary(), context => map()}.
-export_type([mode/0, opts/0]).

%%% configuration -------------------------------------------------------------

%% @doc The ETS tables (created by `dspex_cluster_sup', living as long as it),
%% with their type: the copies here, the nodes caching this node's sessions,
%% the strong leases this node granted as owner, the sessions with a write
%% being prepared, and the sessions whose first writes wait out the leases of
%% a previous owner.
-spec tables() -> [{atom(), set | bag}].
tables() -> [{?TAB, set}, {?REGS, bag}, {?LEASES, set}, {?PENDING, set}, {?FENCE, set}, {?VV, set},
              {?CONFLICTS, bag}].

%% @doc Whether `read => strong' (leases) is on: the configured `mode' is
%% `strong', or `strong => true' in the `cache' configuration.
-spec strong_enabled() -> boolean().
strong_enabled() -> persistent_term:get(?STRONG, false).

%% The length of a strong lease (`max_staleness_ms'), in perf_counter ticks
%% (the owner's record of the leases it granted).
lease_ticks() -> max_staleness_ms() * persistent_term:get(?TICKS).

%% The same in ns of `dspex_nif:cache_clock/0' (the holder's lease, checked by the NIF).
lease_ns() -> max_staleness_ms() * 1000000.

%% @doc The default read mode (`owner' without a cluster or configuration).
-spec mode() -> mode().
mode() -> element(1, persistent_term:get(?MODE, {owner, 100})).

%% @doc `{mode(), max_staleness_ms()}' in one lookup (the read path).
-spec read_defaults() -> {mode(), non_neg_integer()}.
read_defaults() -> persistent_term:get(?MODE, {owner, 100}).

%% @doc The default `max_staleness_ms' of cached reads (100 unless configured).
-spec max_staleness_ms() -> non_neg_integer().
max_staleness_ms() -> element(2, persistent_term:get(?MODE, {owner, 100})).

%% @doc The largest `max_staleness_ms' accepted, configured or per call
%% (86 400 000, one day); above it `{invalid_argument, max_staleness_ms}'.
-spec max_staleness_limit() -> pos_integer().
max_staleness_limit() -> ?MAX_STALENESS_MS.

%% @doc The byte bound of the copies from the `cache' map of the cluster
%% configuration: its `max_bytes', else the application environment
%% `cache_max_bytes', else 64 MiB. `{error, {invalid_argument, Key}}' when
%% the one set is not a non-negative integer (the environment is checked
%% whenever it is set).
-spec max_bytes_config(map()) -> {ok, non_neg_integer()} | {error, {invalid_argument, term()}}.
max_bytes_config(C) ->
    Env = application:get_env(dspex_bridge, cache_max_bytes, 64 * 1024 * 1024),
    case maps:get(max_bytes, C, Env) of
        _ when not is_integer(Env); Env < 0 -> {error, {invalid_argument, cache_max_bytes}};
        Max when is_integer(Max), Max >= 0 -> {ok, Max};
        _ -> {error, {invalid_argument, {cache, max_bytes}}}
    end.

%% @doc The NIF session id of the cached copy of `Session'.
-spec cache_id(binary()) -> binary().
cache_id(S) -> <<?PREFIX, S/binary>>.

%% @doc Whether a NIF session id is a cached copy's.
-spec is_cache_id(term()) -> boolean().
is_cache_id(<<?PREFIX, _/binary>>) -> true;
is_cache_id(_) -> false.

%%% reads -----------------------------------------------------------------------

%% @doc `dspex_store:get/3' with a read mode: `read => owner | cached'
%% (default: the configured `mode'), `max_staleness_ms' (default: configured, 100).
-spec get(binary(), dspex_store:var_key(), opts()) -> {ok, dspex_store:var()} | {error, term()}.
get(S, K, Opts) when is_map(Opts) ->
    dspex_store:get(S, K, Opts#{read => maps:get(read, Opts, mode())}).

%% @doc `dspex_store:get_value/2' with a read mode and the other options of
%% `dspex_store:get/3' (as `get/3'): with `as' or `context' it is that read
%% (access rules checked on the owner), its value only.
-spec get_value(binary(), dspex_store:var_key(), opts()) -> {ok, dspex_store:value()} | {error, term()}.
get_value(S, K, Opts) when is_map(Opts) ->
    case maps:without([read, max_staleness_ms], Opts) of
        Rest when map_size(Rest) > 0 ->
            case get(S, K, Opts) of
                {ok, #{value := V}} -> {ok, V};
                Other -> Other
            end;
        _ -> mode_get_value(S, K, maps:get(read, Opts, mode()), maps:get(max_staleness_ms, Opts, max_staleness_ms()))
    end.

mode_get_value(S, K, strong, Max) ->
    case strong_enabled() of
        false -> {error, {invalid_argument, read}};
        true when is_integer(Max), Max >= 0, Max =< ?MAX_STALENESS_MS -> dspex_store:get_value_mode(S, K, cached, strong);
        true -> {error, {invalid_argument, max_staleness_ms}}
    end;
mode_get_value(_S, _K, M, _Max) when M =/= owner, M =/= cached -> {error, {invalid_argument, read}};
mode_get_value(S, K, M, Max) when is_integer(Max), Max >= 0, Max =< ?MAX_STALENESS_MS ->
    dspex_store:get_value_mode(S, K, M, Max);
mode_get_value(_, _, _, _) -> {error, {invalid_argument, max_staleness_ms}}.

%% @doc The slow path of a cached read of session `S' (the hit path is one
%% NIF call, `dspex_nif:cache_get/3', made by `dspex_store'): `Why' is what
%% that call answered. `copy' (the copy is fresh, read it here): `Hit(CacheId)'.
%% `stale' (the lease expired or the view changed) or `miss' (no copy): the
%% copy is renewed or filled from the owner, then `Hit(CacheId)'; `Routed()'
%% when there is none (this node owns `S', the owner could not be asked, or
%% the copy changed under the read). `MaxStaleMs' `strong': only a copy
%% holding an unexpired lease granted by the owner answers.
-spec read(binary(), non_neg_integer() | strong, miss | stale | copy, fun((binary()) -> term()), fun(() -> term())) ->
          term().
read(S, _MaxStale, copy, Hit, Routed) ->
    event(hit, S),
    answer(Hit(cache_id(S)), Routed);
read(S, MaxStale, Why, Hit, Routed) ->
    case slow_entry(S, Why) of
        routed -> Routed();
        Why1 ->
            try refresh(S, Why1, MaxStale =:= strong) of
                {ok, Id} -> answer(Hit(Id), Routed);
                routed -> Routed();
                {error, _} = Err -> Err
            catch
                %% the cache server is restarting with the cluster: routed
                exit:{_, {gen_server, call, [?MODULE | _]}} -> Routed()
            end
    end.

%% The copy was dropped between the check and the read.
answer({error, session_not_found}, Routed) -> Routed();
answer(R, _) -> R.

%% Counts a read the NIF could not answer from a fresh copy.
slow_entry(S, stale) ->
    case persistent_term:get(?CTRS, undefined) of
        undefined -> routed;   % no cluster
        C ->
            counters:add(C, ?STALE, 1),
            event(stale, S),
            {expired, S}
    end;
slow_entry(S, miss) ->
    case persistent_term:get(?CTRS, undefined) =/= undefined andalso ets:whereis(?TAB) =/= undefined of
        false -> routed;   % no cluster
        true ->
            case owned(S) of
                true -> routed;   % this node owns S: read here, nothing to cache
                false ->
                    counters:add(persistent_term:get(?CTRS), ?MISS, 1),
                    event(miss, S),
                    miss
            end
    end.

event(What, S) ->
    case dspex_telemetry:handlers([dspex, cache, What]) of
        [] -> ok;
        Hs -> dspex_telemetry:emit(Hs, [dspex, cache, What], #{count => 1}, #{session => S})
    end.

%% An expired entry: renewed if the owner's version did not change; else (or
%% on a miss) a new fill.
refresh(S, {expired, S}, Strong) ->
    case ets:lookup(?TAB, S) of
        [{S, _Id, E, Seq, Owner, _}] ->
            Gen = dspex_nif:cache_gen(current),
            Token = gen_server:call(?MODULE, {filling, S}, ?CALL_TIMEOUT),
            T0 = dspex_nif:cache_clock(),
            try route(S, version_here, Strong) of
                {version, E, Seq, Owner, Lease} when Lease orelse not Strong ->
                    case gen_server:call(?MODULE, {renew, S, E, Seq, Gen, T0, Lease, Token}, ?CALL_TIMEOUT) of
                        {ok, Id} -> {ok, Id};
                        stale -> fill(S, Strong)
                    end;
                {version, E, Seq, Owner, false} -> routed;   % strong: a write is under way, ask the owner
                {version, _, _, _, _} -> fill(S, Strong);
                {error, _} = Err -> drop(S), Err;
                _ -> drop(S), routed   % this node owns S now, or the owner changed under the call
            after
                gen_server:cast(?MODULE, {done_filling, S})
            end;
        [] -> fill(S, Strong)
    end;
refresh(S, miss, Strong) -> fill(S, Strong).

%% @doc Fills (or refreshes) the cached copy of `S' from its owner now.
%% `{ok, #{epoch, seq, bytes}}', or `{error, owner}' when this node owns it
%% (nothing to cache), `{error, Reason}' when the owner could not serve it.
-spec warm(binary()) -> {ok, #{epoch := non_neg_integer(), seq := non_neg_integer()}} | {error, term()}.
warm(S) when is_binary(S) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> {error, not_clustered};
        true ->
            case fill(S, strong_enabled()) of
                {ok, _} ->
                    case ets:lookup(?TAB, S) of
                        [{S, _, E, Seq, _, _}] -> {ok, #{epoch => E, seq => Seq}};
                        [] -> {error, evicted}
                    end;
                routed -> {error, owner};
                {error, _} = Err -> Err
            end
    end.

fill(S, Strong) ->
    %% the token says which revocations of S this node had seen: a lease
    %% revoked after it is not installed
    Token = gen_server:call(?MODULE, {filling, S}, ?CALL_TIMEOUT),
    Gen = dspex_nif:cache_gen(current),
    %% the lease runs from before the owner cut the copy
    T0 = dspex_nif:cache_clock(),
    try route(S, fill_here, Strong) of
        {filled, E, Seq, Owner, Export, Lease} ->
            case dspex_cluster:last_read() of
                #{status := current} ->
                    case gen_server:call(?MODULE, {install, S, E, Seq, Owner, Gen, T0, Export, Lease, Token},
                                         ?CALL_TIMEOUT) of
                        %% strong without a lease: the copy was cut during
                        %% this read, so it may answer this read only
                        {ok, Id} -> {ok, Id};
                        _ -> routed
                    end;
                _ -> routed   % served by a node that may miss writes: not cached
            end;
        {error, {unavailable, _}} = Err -> Err;
        {error, no_quorum} = Err -> Err;
        _ -> routed
    after
        gen_server:cast(?MODULE, {done_filling, S})
    end.

%% A call on the owner of S, routed as a read; `here' when this node is it.
route(S, F, Strong) ->
    dspex_cluster:route(S, {?MODULE, F}, [S, node(), Strong], fun() -> here end).

%%% owner side ------------------------------------------------------------------

%% @doc On the owner (a routed read): registers `Node' as caching `S' (with a
%% strong lease if `Strong' and no write of `S' is being prepared) and
%% returns the session's version, a copy cut after it and whether the lease
%% was granted.
-spec fill_here(binary(), node(), boolean()) ->
          {filled, non_neg_integer(), non_neg_integer(), node(), map(), boolean()} | not_owner | {error, term()}.
fill_here(S, Node, Strong) ->
    case owned(S) of
        false -> not_owner;
        true ->
            true = ets:insert(?REGS, {S, Node}),
            Lease = grant(S, Node, Strong),
            %% the version first, then the cut: the cut holds every commit up
            %% to it, and every later commit finds Node registered
            {S, E, Seq, _, _, _, _} = dspex_cluster_replica:current_row(S),
            case dspex_nif:export_session(S) of
                {ok, Export} -> {filled, E, Seq, node(), Export, Lease};
                {error, _} = Err ->
                    ets:delete_object(?REGS, {S, Node}),
                    Err
            end
    end.

%% @doc On the owner (a routed read): the session's version (a lease renewal
%% of `Node', registered again; a strong lease as in `fill_here/3').
-spec version_here(binary(), node(), boolean()) ->
          {version, non_neg_integer(), non_neg_integer(), node(), boolean()} | not_owner.
version_here(S, Node, Strong) ->
    case owned(S) of
        false -> not_owner;
        true ->
            true = ets:insert(?REGS, {S, Node}),
            Lease = grant(S, Node, Strong),
            {S, E, Seq, _, _, _, _} = dspex_cluster_replica:current_row(S),
            {version, E, Seq, node(), Lease}
    end.

%% A strong lease for Node on S, unless a write of S is being prepared. The
%% lease is recorded before the pending flag is read, and the writer sets the
%% flag before it reads the leases: either the writer revokes this lease, or
%% this call sees the flag and grants none.
grant(S, Node, true) ->
    case strong_enabled() of
        false -> false;
        true ->
            true = ets:insert(?LEASES, {{S, Node}, os:perf_counter() + lease_ticks()}),
            case ets:member(?PENDING, S) of
                false -> true;
                true ->
                    ets:delete(?LEASES, {S, Node}),
                    false
            end
    end;
grant(_, _, false) -> false.

%% @doc Called by the owner's writer before it applies a write of `S' (strong
%% mode on): marks the write pending (no lease is granted until
%% `after_commit/1'), waits out the leases of a previous owner (after a
%% takeover, `took_over/1') and revokes every unexpired lease of `S': returns
%% once each holder confirmed it dropped its copy, or its lease expired.
-spec before_commit(binary(), pid()) -> ok.
before_commit(S, Self) ->
    case strong_enabled() of
        false -> ok;
        true ->
            true = ets:insert(?PENDING, {S, true}),
            case ets:lookup(?FENCE, S) of
                [{S, Until}] ->
                    wait_until(Until),
                    ets:delete(?FENCE, S);
                [] -> ok
            end,
            Now = os:perf_counter(),
            Held = [{N, Exp} || {{_, N}, Exp} <- ets:match_object(?LEASES, {{S, '_'}, '_'}), Exp > Now],
            ets:match_delete(?LEASES, {{S, '_'}, '_'}),
            case Held of
                [] -> ok;
                _ ->
                    Ref = make_ref(),
                    [erlang:send({?MODULE, N}, {dspex_cache_revoke, S, Self, Ref}, [noconnect]) || {N, _} <- Held],
                    revoked(Ref, Held)
            end
    end.

%% Until every holder answered or its lease expired.
revoked(_Ref, []) -> ok;
revoked(Ref, Held) ->
    Next = lists:min([E || {_, E} <- Held]),
    Ms = max(0, ceil_ms(Next - os:perf_counter())),
    receive
        {dspex_cache_revoked, Ref, N} -> revoked(Ref, lists:keydelete(N, 1, Held))
    after Ms ->
        Now = os:perf_counter(),
        revoked(Ref, [H || {_, E} = H <- Held, E > Now])
    end.

wait_until(Until) ->
    case Until - os:perf_counter() of
        D when D > 0 -> receive after ceil_ms(D) -> wait_until(Until) end;
        _ -> ok
    end.

ceil_ms(Ticks) ->
    T = persistent_term:get(?TICKS),
    (Ticks + T - 1) div T.

%% @doc Called by the owner's writer once the write of `S' is applied: leases
%% may be granted again.
-spec after_commit(binary()) -> ok.
after_commit(S) ->
    case strong_enabled() of
        false -> ok;
        true -> true = ets:delete(?PENDING, S), ok
    end.

%% @doc Called by the writer when this node took `S' over: leases granted by
%% the previous owner may still run for up to a lease length; the first write
%% of `S' waits them out (strong mode on).
-spec took_over(binary()) -> ok.
took_over(S) ->
    case strong_enabled() of
        false -> ok;
        true ->
            %% 1 ms beyond the lease for the rounding of the holders' clocks
            true = ets:insert(?FENCE, {S, os:perf_counter() + lease_ticks() + persistent_term:get(?TICKS)}),
            ok
    end.

owned(S) ->
    case dspex_cluster_replica:row(S) of
        {S, E, _, Me, _, _, F} when Me =:= node(), F =< E -> true;
        _ -> false
    end.

%% @equiv committed(S, Epoch, Seq, none)
-spec committed(binary(), non_neg_integer(), non_neg_integer()) -> ok.
committed(S, Epoch, Seq) -> committed(S, Epoch, Seq, none).

%% @doc Called by the owner's writer after it committed change `Seq' of `S'
%% at `Epoch' (`Change': the writer's replication payload of it): sends the
%% nodes caching `S', only them, an invalidation; when the change is a `set'
%% whose external size is at most `value_max_bytes' (default 1024; 0: never),
%% the change itself (`{dspex_cache_update, ...}'), which a copy exactly one
%% change behind applies in place instead of dropping.
-spec committed(binary(), non_neg_integer(), non_neg_integer(), term()) -> ok.
committed(S, Epoch, Seq, Change) ->
    ok = advance_vv(S, Epoch, node(), Seq),
    case ets:lookup(?REGS, S) of
        [] -> ok;
        Regs ->
            T = os:perf_counter(nanosecond),
            Msg = case carried(Change) of
                      none -> {dspex_cache_inval, S, Epoch, Seq, node(), T};
                      C -> {dspex_cache_update, S, Epoch, Seq, node(), T, C}
                  end,
            Sent = length([erlang:send({?MODULE, N}, Msg, [noconnect]) || {_, N} <- Regs]),
            counters:add(persistent_term:get(?CTRS), ?SENT, Sent),
            dspex_telemetry:execute([dspex, cache, invalidation, sent], #{count => Sent},
                                    #{session => S, epoch => Epoch, seq => Seq}),
            ok
    end.

%% The change a small invalidation carries: a set of one variable (its key,
%% value, metadata patch and changed_by, the version it made), or `none'.
carried({ev, _, _, P, _}) -> carried(P);
carried({op, set, [_, K, V, O], {ok, Ver}}) when is_map(O), is_integer(Ver) ->
    C = {set, K, V, maps:with([metadata, changed_by], O), Ver},
    case erlang:external_size(C) =< maps:get(value_max_bytes, persistent_term:get(?CONF, #{}), 1024) of
        true -> C;
        false -> none
    end;
carried(_) -> none.

%%% version vectors and conflicts -------------------------------------------------

%% @doc The version vector of this node's copy of `S': `#{Epoch => {Owner,
%% Seq}}', the sequence number its lineage reached in each epoch (each epoch
%% has one owner node, so this is a node -> counter vector keyed by owner
%% tenure). `#{}' when unknown.
-spec vv(binary()) -> #{non_neg_integer() => {node(), non_neg_integer()}}.
vv(S) ->
    case ets:whereis(?VV) =/= undefined andalso ets:lookup(?VV, S) of
        [{S, V}] -> V;
        _ -> #{}
    end.

%% @doc Replaces the vector of `S' (a full copy installed here carries its source's).
-spec set_vv(binary(), map()) -> ok.
set_vv(S, V) when is_map(V) ->
    _ = ets:whereis(?VV) =/= undefined andalso ets:insert(?VV, {S, V}),
    ok.

%% @doc The copy of `S' here reached `Seq' of `Epoch' (owned by `Owner').
-spec advance_vv(binary(), non_neg_integer(), node(), non_neg_integer()) -> ok.
advance_vv(S, Epoch, Owner, Seq) when is_atom(Owner), Owner =/= undefined, Owner =/= expired ->
    V = vv(S),
    case V of
        #{Epoch := {_, Old}} when Old >= Seq -> ok;
        _ -> set_vv(S, V#{Epoch => {Owner, Seq}})
    end;
advance_vv(_, _, _, _) -> ok.

%% @doc The rows of deleted session `S' went (`dspex_cluster_replica:forget/1',
%% epochs up to `Epoch'): its version vector, recorded conflicts and the
%% registrations of nodes caching it go too, unless a newer epoch of the id
%% began here meanwhile (its vector names that epoch, or the sessions table
%% has a row again).
-spec forget_deleted(binary(), non_neg_integer()) -> ok.
forget_deleted(S, Epoch) ->
    case ets:whereis(?VV) =/= undefined andalso ets:lookup(?VV, S) of
        [{S, V} = Obj] ->
            _ = lists:all(fun(E) -> E =< Epoch end, maps:keys(V)) andalso ets:delete_object(?VV, Obj),
            ok;
        _ -> ok
    end,
    _ = not ets:member(dspex_cluster_replica:table(), S) andalso ets:whereis(?REGS) =/= undefined
        andalso ets:delete(?REGS, S) andalso ets:delete(?CONFLICTS, S),
    ok.

%% @doc At a takeover, before the newest copy replaces the others: the copies
%% (`{{Epoch, Seq}, Present, Node}' as the writer ranks them) whose lineage
%% holds changes the winner's (the newest copy's) does not: a write made by an
%% owner whose epoch the winner's lineage left before that write (two sides of
%% a partition, or an acknowledged async write that no replica had). Returns
%% one map per such copy: `node', `lost' (`[{Epoch, Owner, FromSeq, ToSeq}]':
%% changes FromSeq+1..ToSeq of that epoch) and `export' (the losing copy, read
%% now, before it is replaced).
-spec find_conflicts(binary(), [{{non_neg_integer(), non_neg_integer()}, boolean(), node()}]) -> [map()].
find_conflicts(S, Copies) ->
    %% copies of one epoch are prefixes of one history: nothing to ask then
    case lists:usort([E || {{E, _}, _, _} <- Copies]) of
        [_, _ | _] -> find_conflicts1(S, Copies);
        _ -> []
    end.

find_conflicts1(S, Copies) ->
    [{_, _, Winner} | _] = lists:reverse(lists:sort(Copies)),
    Nodes = lists:usort([N || {_, _, N} <- Copies]),
    Vecs = maps:from_list([{N, V} || {N, {ok, V}} <- lists:zip(Nodes, erpc:multicall(Nodes, ?MODULE, vv, [S], 5000)),
                                     is_map(V)]),
    VB = maps:get(Winner, Vecs, #{}),
    lists:filtermap(
      fun(N) ->
              case lost(maps:get(N, Vecs, #{}), VB) of
                  [] -> false;
                  Lost ->
                      Exp = case catch erpc:call(N, dspex_cluster_replica, export, [S], 5000) of
                                {ok, X, _, _} -> X;
                                _ -> absent
                            end,
                      {true, #{node => N, lost => Lost, export => Exp, winner => Winner}}
              end
      end, Nodes -- [Winner]).

%% The changes of the losing lineage VL the winning one VB lacks.
lost(VL, VB) ->
    Starts = starts(VL),
    [{E, O, max(maps:get(E, Starts), seq_in(E, VB)), SL}
     || {E, {O, SL}} <- lists:sort(maps:to_list(VL)), SL > max(maps:get(E, Starts), seq_in(E, VB))].

seq_in(E, V) ->
    case V of
        #{E := {_, Seq}} -> Seq;
        _ -> 0
    end.

%% The sequence number each epoch of a lineage started at (the end of the
%% previous one, as a takeover starts from the newest copy).
starts(V) ->
    {M, _} = lists:foldl(fun({E, {_, Seq}}, {Acc, Prev}) -> {Acc#{E => min(Prev, Seq)}, Seq} end,
                         {#{}, 0}, lists:sort(maps:to_list(V))),
    M.

%% @doc After a takeover at `Epoch' succeeded: records the conflicts found
%% (`find_conflicts/2') with the variables whose value differs between each
%% losing copy and the copy installed here (`variables': `[#{name, lost_value,
%% lost_version, value, version}]', `value'/`version' `undefined' for a
%% variable the winner lacks), emits `[dspex, cache, conflict]' per losing copy
%% and appends a `cache_conflict' event per losing copy to the session's event
%% log (data: the record without `session': `epoch', `node', `winner', `lost',
%% `variables', `at').
-spec record_conflicts(binary(), pos_integer(), [map()], map() | absent) -> ok.
record_conflicts(_S, _Epoch, [], _Winner) -> ok;
record_conflicts(S, Epoch, Conflicts, Winner) ->
    WVars = maps:from_list([{N, V} || #{name := N} = V <- vars(Winner)]),
    [begin
         Diff = [#{name => Name, lost_value => LV, lost_version => LVer,
                   value => maps:get(value, maps:get(Name, WVars, #{}), undefined),
                   version => maps:get(version, maps:get(Name, WVars, #{}), undefined)}
                 || #{name := Name, value := LV, version := LVer} <- vars(Exp),
                    maps:get(version, maps:get(Name, WVars, #{}), undefined) =/= LVer orelse
                        maps:get(value, maps:get(Name, WVars, #{})) =/= LV],
         Rec = #{session => S, epoch => Epoch, node => N, winner => W, lost => Lost, variables => Diff,
                 at => erlang:system_time(microsecond)},
         true = ets:insert(?CONFLICTS, {S, Rec}),
         %% in the session's event log too (once per losing copy)
         ok = dspex_events:emit(S, cache_conflict, maps:without([session], Rec), #{}),
         dspex_telemetry:execute([dspex, cache, conflict],
                                 #{count => 1, writes => lists:sum([To - From || {_, _, From, To} <- Lost])},
                                 maps:without([variables], Rec))
     end || #{node := N, lost := Lost, export := Exp, winner := W} <- Conflicts],
    ok.

vars(#{variables := Vs}) -> Vs;
vars(_) -> [].

%% @doc The conflicts recorded for `Session' by its owner (routed there): one
%% map per losing copy of a takeover (see `record_conflicts/4'), oldest first.
-spec conflicts(binary()) -> [map()] | {error, term()}.
conflicts(S) when is_binary(S) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> {error, not_clustered};
        true -> dspex_cluster:route(S, {?MODULE, conflicts_here}, [S], fun() -> conflicts_here(S) end)
    end.

%% @doc The conflicts recorded on this node for `Session'.
-spec conflicts_here(binary()) -> [map()].
conflicts_here(S) -> [C || {_, C} <- ets:lookup(?CONFLICTS, S)].

%%% read repair -------------------------------------------------------------------

%% @doc A routed read of `S' was served at `Epoch': drops the copy if it is older.
-spec seen(binary(), non_neg_integer()) -> ok.
seen(S, Epoch) ->
    case ets:whereis(?TAB) =/= undefined andalso ets:lookup(?TAB, S) of
        [{S, _, E, _, _, _}] when E < Epoch ->
            counters:add(persistent_term:get(?CTRS), ?REPAIR, 1),
            drop(S);
        _ -> ok
    end.

%% @doc This node's process wrote `S' through the owner: drops the copy, so
%% that the process's next cached read sees its write.
-spec wrote(binary()) -> ok.
wrote(S) ->
    case ets:whereis(?TAB) =/= undefined andalso ets:member(?TAB, S) of
        true -> drop(S);
        false -> ok
    end.

%% @doc Drops the cached copy of `S' (if any).
-spec drop(binary()) -> ok.
drop(S) ->
    try gen_server:call(?MODULE, {drop, S}, ?CALL_TIMEOUT)
    catch exit:{noproc, _} -> ok   % no cache server: no copy either
    end.

%% @doc Sessions cached on this node (`{error, not_clustered}' without a
%% cluster, as `stats/0').
-spec cached_sessions() -> [binary()] | {error, not_clustered}.
cached_sessions() ->
    case ets:whereis(?TAB) of
        undefined -> {error, not_clustered};
        _ -> [S || {S, _, _, _, _, _} <- ets:tab2list(?TAB)]
    end.

%% @doc This node's cached copy of `S': its owner's version (`epoch', `seq'),
%% `owner', `bytes', and its freshness as the NIF checks it: `filled_at' (fill
%% or last renewal), `lease_until' (strong lease deadline, 0: none), both in
%% `clock/0' nanoseconds, `view' (the view generation it is valid under) and
%% `referenced' (read since the eviction hand last passed). `undefined' when
%% there is none.
-spec entry(binary()) -> map() | undefined.
entry(S) ->
    case ets:whereis(?TAB) =/= undefined andalso ets:lookup(?TAB, S) of
        [{S, Id, E, Seq, Owner, Bytes}] ->
            case dspex_nif:cache_info(Id) of
                {Fill, Gen, Lease, Ref} ->
                    #{epoch => E, seq => Seq, owner => Owner, bytes => Bytes, filled_at => Fill,
                      lease_until => Lease, view => Gen, referenced => Ref =:= 1};
                {error, _} -> undefined
            end;
        _ -> undefined
    end.

%% @doc The clock of cached copies' times (`CLOCK_MONOTONIC' nanoseconds, the
%% same in the NIF's freshness check; comparable across the nodes of one machine).
-spec clock() -> integer().
clock() -> dspex_nif:cache_clock().

%%% stats -------------------------------------------------------------------------

%% @doc Counters since start (or `reset_stats/0'): `hits', `misses',
%% `stale_refused' (reads that found their entry's lease expired or its view
%% changed, and asked the owner), `fills', `renewals', `evictions',
%% `read_repairs', `invalidations_sent', `invalidations_received',
%% `invalidation_delay_p50_us' / `_p99_us' (over the last 4096 received
%% invalidations, commit on the owner to drop here; `undefined' before the
%% first), `bytes' (cached now), `max_bytes', `sessions' (cached now),
%% `registrations' (node-session pairs this node as owner invalidates).
-spec stats() -> map() | {error, not_clustered}.
stats() ->
    try gen_server:call(?MODULE, stats, ?CALL_TIMEOUT)
    catch exit:{noproc, _} -> {error, not_clustered}
    end.

%% @doc Zeroes the counters and delay samples (`{error, not_clustered}'
%% without a cluster, as `stats/0').
-spec reset_stats() -> ok | {error, not_clustered}.
reset_stats() ->
    try gen_server:call(?MODULE, reset_stats, ?CALL_TIMEOUT)
    catch exit:{noproc, _} -> {error, not_clustered}
    end.

%% @doc The Prometheus exposition of `stats/0' (empty without a cluster).
-spec prometheus() -> iodata().
prometheus() ->
    case whereis(?MODULE) of
        undefined -> [];
        _ ->
            try stats() of
                {error, _} -> [];
                St ->
                    C = [{hits, "Cached reads served from this node's copy."},
                         {misses, "Cached reads with no copy here (filled from the owner)."},
                         {stale_refused, "Cached reads whose copy's lease had expired (asked the owner)."},
                         {fills, "Copies filled from the owner."},
                         {evictions, "Copies evicted by the byte bound."},
                         {invalidations_sent, "Invalidations this node sent as owner."},
                         {invalidations_received, "Invalidations this node received."},
                         {updates_applied, "Small changes applied in place to a copy (no refill)."}],
                    G = [{bytes, "Bytes of cached copies on this node."},
                         {sessions, "Sessions cached on this node."},
                         {invalidation_delay_p50_us, "Median delay, owner commit to cache drop (microseconds)."},
                         {invalidation_delay_p99_us, "99th percentile delay, owner commit to cache drop (microseconds)."}],
                    [metric("dspex_cache_" ++ atom_to_list(K) ++ "_total", counter, H, maps:get(K, St)) || {K, H} <- C]
                    ++ [metric("dspex_cache_" ++ atom_to_list(K), gauge, H, maps:get(K, St))
                        || {K, H} <- G, is_number(maps:get(K, St))]
            catch exit:_ -> []
            end
    end.

metric(Name, Type, Help, V) ->
    ["# HELP ", Name, " ", Help, "\n# TYPE ", Name, " ", atom_to_list(Type), "\n", Name, " ",
     if is_float(V) -> float_to_list(V, [short]); true -> integer_to_list(V) end, "\n"].

%%% server ------------------------------------------------------------------------

%% @doc Starts the cache server (a child of `dspex_cluster_sup').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec init([]) -> {ok, map()}.
init([]) ->
    %% terminate/2 drops the copies when the cluster stops
    process_flag(trap_exit, true),
    C = case application:get_env(dspex_bridge, cluster) of
            {ok, #{cache := M}} when is_map(M) -> M;
            _ -> #{}
        end,
    %% checked by dspex_cluster_sup before this server starts
    {ok, Max} = max_bytes_config(C),
    persistent_term:put(?CONF, #{mode => maps:get(mode, C, owner),
                                 max_staleness_ms => maps:get(max_staleness_ms, C, 100),
                                 max_bytes => Max, value_max_bytes => maps:get(value_max_bytes, C, 1024)}),
    persistent_term:put(?TICKS, erlang:convert_time_unit(1, millisecond, perf_counter)),
    persistent_term:put(?STRONG, maps:get(mode, C, owner) =:= strong orelse maps:get(strong, C, false) =:= true),
    persistent_term:put(?MODE, {maps:get(mode, C, owner), maps:get(max_staleness_ms, C, 100)}),
    case persistent_term:get(?CTRS, undefined) of
        undefined -> persistent_term:put(?CTRS, counters:new(?NCTRS, [write_concurrency]));
        _ -> ok
    end,
    ok = net_kernel:monitor_nodes(true),
    %% copies left by a previous incarnation are not covered any more
    [_ = dspex_nif:session_delete(Id) || Id <- dspex_nif:session_list(), is_cache_id(Id)],
    %% the read mode the NIF's get/get_value try first (dspex_store)
    ok = dspex_store:refresh_fast_path(),
    {ok, #{max => Max, bytes => 0, clock => queue:new(), inq => #{}, filling => #{}, seen => #{}, revokes => #{},
           delays => {0, []}}}.

%% @doc Drops every copy (the cluster stops: nothing invalidates them any more).
-spec terminate(term(), map()) -> ok.
terminate(_, _) ->
    [_ = dspex_nif:session_delete(Id) || Id <- dspex_nif:session_list(), is_cache_id(Id)],
    ok.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({install, S, E, Seq, Owner, Gen, T0, Export, Lease0, Token}, _From, St) ->
    %% a lease revoked since the fill began is not installed
    Lease = Lease0 andalso maps:get(S, maps:get(revokes, St), 0) =:= Token,
    case {maps:get(S, maps:get(seen, St), {0, 0}), ets:lookup(?TAB, S)} of
        {Seen, _} when {E, Seq} < Seen -> {reply, stale, St};   % invalidated while in flight
        {_, _} when Lease0, not Lease -> {reply, stale, St};
        {_, [{S, Id, E0, Seq0, _, _}]} when {E0, Seq0} >= {E, Seq} ->
            {reply, {ok, Id}, St};   % as new already
        _ ->
            St1 = remove(S, St),
            Id = cache_id(S),
            Vars = [V#{history => [], history_limit => 0} || V <- maps:get(variables, Export, [])],
            Copy = Export#{id => Id, ttl => infinity, variables => Vars, metadata => #{}},
            case dspex_nif:import_session(Copy) of
                ok ->
                    Bytes = erlang:external_size(Copy),
                    LeaseUntil = case Lease of
                                     true -> T0 + lease_ns();
                                     false -> 0
                                 end,
                    %% the copy answers reads (NIF) from here on
                    ok = dspex_nif:cache_arm(Id, T0, Gen, LeaseUntil),
                    true = ets:insert(?TAB, {S, Id, E, Seq, Owner, Bytes}),
                    %% a later invalidation of this copy records its version again
                    St1a = St1#{seen := maps:remove(S, maps:get(seen, St1))},
                    counters:add(persistent_term:get(?CTRS), ?FILL, 1),
                    dspex_telemetry:execute([dspex, cache, fill], #{count => 1, bytes => Bytes},
                                            #{session => S, epoch => E, seq => Seq, owner => Owner}),
                    St2 = evict(enqueue(S, St1a#{bytes := maps:get(bytes, St1a) + Bytes})),
                    case ets:member(?TAB, S) of
                        true -> {reply, {ok, Id}, St2};
                        false -> {reply, stale, St2}   % larger than the whole bound
                    end;
                {error, _} = Err -> {reply, Err, St1}
            end
    end;
handle_call({renew, S, E, Seq, Gen, T0, Lease, Token}, _From, St) ->
    Revoked = maps:get(S, maps:get(revokes, St), 0) =/= Token,
    case ets:lookup(?TAB, S) of
        [{S, Id, E, Seq, _, _}] when not (Lease andalso Revoked) ->
            %% fill time and lease only move forward (in the NIF)
            L = case Lease of
                    true -> T0 + lease_ns();
                    false -> 0
                end,
            ok = dspex_nif:cache_arm(Id, T0, Gen, L),
            counters:add(persistent_term:get(?CTRS), ?RENEW, 1),
            {reply, {ok, Id}, St};
        _ -> {reply, stale, St}
    end;
handle_call({filling, S}, _From, #{filling := F} = St) ->
    {reply, maps:get(S, maps:get(revokes, St), 0), St#{filling := F#{S => maps:get(S, F, 0) + 1}}};
handle_call({drop, S}, _From, St) ->
    {reply, ok, remove(S, St)};
handle_call(stats, _From, #{delays := {_, Ds}} = St) ->
    C = persistent_term:get(?CTRS),
    G = fun(I) -> counters:get(C, I) end,
    Sorted = lists:sort(Ds),
    {reply, #{hits => dspex_nif:cache_hits(false), misses => G(?MISS), invalidations_sent => G(?SENT),
              invalidations_received => G(?RECEIVED), stale_refused => G(?STALE),
              evictions => G(?EVICT), fills => G(?FILL), renewals => G(?RENEW), read_repairs => G(?REPAIR),
              updates_applied => G(?APPLIED),
              invalidation_delay_p50_us => pct(Sorted, 0.50), invalidation_delay_p99_us => pct(Sorted, 0.99),
              bytes => maps:get(bytes, St), max_bytes => maps:get(max, St), sessions => ets:info(?TAB, size),
              registrations => ets:info(?REGS, size)}, St};
handle_call(reset_stats, _From, St) ->
    C = persistent_term:get(?CTRS),
    [counters:put(C, I, 0) || I <- lists:seq(1, ?NCTRS)],
    _ = dspex_nif:cache_hits(true),
    {reply, ok, St#{delays := {0, []}}}.

pct([], _) -> undefined;
pct(Sorted, P) ->
    N = length(Sorted),
    lists:nth(max(1, min(N, round(P * N + 0.5))), Sorted) / 1000.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({done_filling, S}, St) -> {noreply, done_filling(S, St)};
handle_cast(_, St) -> {noreply, St}.

done_filling(S, #{filling := F} = St) ->
    N = maps:get(S, F, 0) - 1,
    St#{filling := case N > 0 of true -> F#{S => N}; false -> maps:remove(S, F) end}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({dspex_cache_inval, S, E, Seq, Owner, T}, #{seen := Seen} = St) ->
    St1 = St#{seen := Seen#{S => max(maps:get(S, Seen, {0, 0}), {E, Seq})}},
    St2 = case ets:lookup(?TAB, S) of
              [{S, _, E0, Seq0, _, _}] when {E0, Seq0} < {E, Seq} -> remove(S, St1);
              [_] -> St1;
              [] ->
                  %% nothing cached and no fill under way: the owner may forget us
                  _ = maps:is_key(S, maps:get(filling, St1)) orelse forget(S, Owner),
                  St1
          end,
    Delay = os:perf_counter(nanosecond) - T,
    %% counted once handled: a reader that saw the count sees its effect
    counters:add(persistent_term:get(?CTRS), ?RECEIVED, 1),
    dspex_telemetry:execute([dspex, cache, invalidation, received], #{count => 1, delay_ns => Delay},
                            #{session => S, epoch => E, seq => Seq, owner => Owner}),
    {noreply, sample(Delay, St2)};
handle_info({dspex_cache_update, S, E, Seq, Owner, T, {set, K, V, O, Ver}}, #{seen := Seen} = St) ->
    %% a small change: applied in place to a copy exactly one change behind
    %% (same epoch), else handled as an invalidation
    St1 = St#{seen := Seen#{S => max(maps:get(S, Seen, {0, 0}), {E, Seq})}},
    {St2, Applied} =
        case ets:lookup(?TAB, S) of
            [{S, Id, E, Seq0, _, Bytes}] when Seq0 =:= Seq - 1 ->
                Old = dspex_nif:var_get_value_here(Id, K),
                case dspex_nif:var_set_here(Id, K, V, O#{expected_version => Ver - 1}) of
                    {ok, Ver} ->
                        Delta = case Old of
                                    {ok, OldV} -> erlang:external_size(V) - erlang:external_size(OldV);
                                    _ -> 0
                                end,
                        true = ets:update_element(?TAB, S, [{4, Seq}, {6, Bytes + Delta}]),
                        counters:add(persistent_term:get(?CTRS), ?APPLIED, 1),
                        {evict(St1#{bytes := maps:get(bytes, St1) + Delta}), true};
                    _ -> {remove(S, St1), false}   % not as the owner's: refill
                end;
            [{S, _, E0, Seq0, _, _}] when {E0, Seq0} < {E, Seq} -> {remove(S, St1), false};
            [_] -> {St1, false};
            [] ->
                _ = maps:is_key(S, maps:get(filling, St1)) orelse forget(S, Owner),
                {St1, false}
        end,
    Delay = os:perf_counter(nanosecond) - T,
    counters:add(persistent_term:get(?CTRS), ?RECEIVED, 1),
    dspex_telemetry:execute([dspex, cache, invalidation, received],
                            #{count => 1, delay_ns => Delay, applied => case Applied of true -> 1; false -> 0 end},
                            #{session => S, epoch => E, seq => Seq, owner => Owner}),
    {noreply, sample(Delay, St2)};
handle_info({dspex_cache_revoke, S, From, Ref}, #{revokes := Rv} = St) ->
    %% strong: a write of S waits for this drop before it commits
    St1 = remove(S, St#{revokes := Rv#{S => maps:get(S, Rv, 0) + 1}}),
    From ! {dspex_cache_revoked, Ref, node()},
    {noreply, St1};
handle_info({dspex_cache_forget, S, Node}, St) ->
    ets:delete_object(?REGS, {S, Node}),
    {noreply, St};
handle_info({nodedown, Node}, St) ->
    ets:match_delete(?REGS, {'_', Node}),
    %% its leases need no revocation: it holds no copy any more once it is
    %% back (a restarted node starts empty), and a write already waits out
    %% the leases of an unreachable holder
    ets:match_delete(?LEASES, {{'_', Node}, '_'}),
    %% copies from that owner: their next read asks the new owner
    St1 = lists:foldl(fun(S, Acc) -> remove(S, Acc) end, St,
                      [S || {S, _, _, _, O, _} <- ets:tab2list(?TAB), O =:= Node]),
    {noreply, St1};
handle_info(_, St) -> {noreply, St}.

sample(D, #{delays := {N, Ds}} = St) when N < ?SAMPLES -> St#{delays := {N + 1, [D | Ds]}};
sample(D, #{delays := {N, Ds}} = St) -> St#{delays := {N, [D | lists:droplast(Ds)]}}.

forget(S, Owner) ->
    _ = erlang:send({?MODULE, Owner}, {dspex_cache_forget, S, node()}, [noconnect]),
    ok.

%% Drops the copy of S (the NIF session, the entry, its bytes).
remove(S, #{bytes := B} = St) ->
    case ets:take(?TAB, S) of
        [{S, Id, _, _, _, Bytes}] ->
            _ = dspex_nif:session_delete(Id),
            St#{bytes := B - Bytes};
        [] -> St
    end.

%% The clock holds each cached session once.
enqueue(S, #{clock := Q, inq := In} = St) ->
    case maps:is_key(S, In) of
        true -> St;
        false -> St#{clock := queue:in(S, Q), inq := In#{S => true}}
    end.

%% Clock sweep until the copies fit the bound: a copy read since the hand
%% last passed gets a second chance.
evict(#{bytes := B, max := Max} = St) when B =< Max -> St;
evict(#{clock := Q} = St) ->
    case queue:out(Q) of
        {empty, _} -> St;
        {{value, S}, Q1} ->
            case ets:lookup(?TAB, S) of
                [] -> evict(St#{clock := Q1, inq := maps:remove(S, maps:get(inq, St))});
                [{S, Id, _, _, Owner, _}] ->
                    case dspex_nif:cache_take_ref(Id) of
                        true -> evict(St#{clock := queue:in(S, Q1)});   % read since: second chance
                        _ -> evict_one(S, Owner, Q1, St)
                    end
            end
    end.

evict_one(S, Owner, Q1, St) ->
    counters:add(persistent_term:get(?CTRS), ?EVICT, 1),
    dspex_telemetry:execute([dspex, cache, evict], #{count => 1}, #{session => S}),
    forget(S, Owner),
    evict((remove(S, St))#{clock := Q1, inq := maps:remove(S, maps:get(inq, St))}).


