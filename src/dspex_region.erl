%% @doc Multi-region, first layer: this node's region, its gateway, one
%% long-lived link per peer region with measured round-trip times, session
%% routing and the topology.
%%
%% A region is one BEAM cluster. Regions are linked by gateways, never by
%% Erlang distribution: each peer region gets one outbound TCP link
%% (`dspex_region_link') to that region's gateway (`dspex_region_gateway'),
%% carrying length-prefixed frames (`{packet, 4}') of
%% `term_to_binary({dspex_region, 1, Msg})', decoded with
%% `binary_to_term(B, [safe])'. With `tls => #{certfile, keyfile, cacertfile}'
%% the gateway and the links speak TLS (OTP `ssl', 1.2/1.3) with mutual
%% authentication: each side must present a certificate signed by
%% `cacertfile'. Without `tls' plain TCP is only allowed between loopback
%% addresses: a non-loopback listen or gateway address is refused at start
%% with `{error, {invalid_argument, {Key, not_loopback}}}'.
%%
%% Configuration (application environment `dspex_bridge' / `region'; off when
%% absent):
%% ```
%% #{name => <<"eu">>, coords => {Lat, Lon},
%%   listen => {{127,0,0,1}, Port},            % Port 0 picks one: gateway_port/0
%%   peers => [#{name => <<"us">>, gateway => {Host, Port}, coords => {Lat, Lon}}],
%%   weights => #{<<"us">> => 2.0},            % cost multiplier per region, 0.001..1000 (default 1.0)
%%   tls => #{certfile => F, keyfile => F, cacertfile => F},   % mutual TLS (optional)
%%   probe_ms => 1000,                         % one RTT probe per link per period
%%   window => 64,                             % samples for p50/p99
%%   ewma_alpha => 0.2,
%%   down_after_ms => max(1000, 3 * probe_ms), % a probe unanswered this long: link down
%%   backoff_min_ms => 100, backoff_max_ms => 5000,
%%   replication => async_primary_backup,      % or sync_all (see dspex_region_shipper)
%%   sync_timeout_ms => 5000,                  % sync_all: {error, {region_timeout, Regions}} after
%%   repl_window => 32,                        % batches in flight per backup region
%%   repl_batch_max => 1000,                   % records per batch
%%   repl_max_pending => 100000,               % records queued per backup region
%%   region_failover_ms => 0}                  % a primary's link down this long: failover
%% '''
%%
%% Cross-region replication (`dspex_region_shipper', `dspex_region_receiver')
%% ships the committed changes of each session whose recorded primary is this
%% region to its backup regions; it needs this region's `dspex_cluster' (a
%% one-node cluster for a one-node region): the cluster's writer hands it the
%% changes. Reads in a backup region: `get/3'.
%%
%% Failover: a backup region takes a session over once its primary region
%% has been unreachable for `region_failover_ms' (with a majority of the
%% regions reachable, and the primary silent); the decision names the old
%% primary's last change it had (`taken_at'). A primary region without a
%% majority for `region_failover_ms div 2' fences itself (`fenced/0'): its
%% clients' writes of the sessions it replicates are refused with
%% `{error, {region_fenced, Reachable}}'. The old primary, reachable again,
%% becomes the session's last backup (a full copy, then the changes).
%%
%% This module's process owns two public ETS tables: the links' state (each
%% link writes its own row after every probe; readers never call a process)
%% and the routing decisions.
%%
%% A region of several nodes (its cluster has more than one node): each
%% session's decision is made by the session's owner in the region's cluster
%% (`route_session/2' and `move_session/2' are routed there) and every node of
%% the region holds every decision (given to the other live nodes before the
%% call is answered; a node that starts or reconnects asks the others for
%% theirs), as it holds the rows of the sessions replicated into the region
%% (`dspex_region_receiver', sent by the node whose gateway received them). A
%% session's failover is decided by its owner in the region.
-module(dspex_region).
-behaviour(gen_server).

-export([config/0, route_session/2, forget_session/1, topology/0, gateway_port/0, prometheus/0,
         haversine_km/2, get/3, set_replication/1, replication/0]).
-export([decision/1, adopt/2, moved/1, moving/1, move_session/2, writable/1, fenced/0]).
-export([pending_moves/0, moves_copied/2]).
-export([route_owned/2, move_owned/2, rows_changed/1, region_nodes/0]).
-export([start_link/1, links_table/0, link_update/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([region/0, coords/0, decision/0]).

-type region() :: binary().
-type coords() :: {number(), number()}.
-type decision() :: #{primary_region := region(), backup_regions := [region()],
                      policy := nearest | lowest_rtt | moved | failover, decided_at := integer(),
                      region_epoch => non_neg_integer(), taken_at => non_neg_integer(),
                      revision => non_neg_integer()}.

-define(LINKS, dspex_region_links).
-define(SESSIONS, dspex_region_sessions).
%% Every *_ms setting is used as an Erlang timer or call timeout: below 2^32.
-define(MAX_MS, 4294967295).
%% The range of a weight (cost multiplier).
-define(MIN_WEIGHT, 0.001).
-define(MAX_WEIGHT, 1000).
%% A score that does not fit a float sorts as this (after every finite one).
-define(MAX_COST, 1.0e300).

%%% configuration ------------------------------------------------------------

%% @doc The normalised configuration, `undefined' when none is set, or
%% `{error, {invalid_argument, Detail}}'.
-spec config() -> map() | undefined | {error, {invalid_argument, term()}}.
config() ->
    case application:get_env(dspex_bridge, region) of
        undefined -> undefined;
        {ok, C} when is_map(C) ->
            try normalise(C)
            catch throw:Detail -> {error, {invalid_argument, Detail}}
            end;
        {ok, _} -> {error, {invalid_argument, region}}
    end.

normalise(C) ->
    Tls = case maps:get(tls, C, undefined) of
              undefined -> undefined;
              #{certfile := _, keyfile := _, cacertfile := _} = T ->
                  maps:from_list([{K, file_option(K, maps:get(K, T))} || K <- [certfile, keyfile, cacertfile]]);
              _ -> throw({tls, bad_options})
          end,
    Name = name(maps:get(name, C, undefined), name),
    Coords = coords(maps:get(coords, C, undefined), coords),
    Listen = case maps:get(listen, C, undefined) of
                 {IP, Port} when is_tuple(IP), is_integer(Port), Port >= 0, Port < 65536 ->
                     address(IP, listen),
                     Tls =/= undefined orelse loopback(IP, listen) orelse throw({listen, not_loopback}),
                     {IP, Port};
                 _ -> throw({listen, bad_address})
             end,
    Peers = case maps:get(peers, C, []) of
                L when is_list(L) -> [peer(P, Tls) || P <- L];
                _ -> throw({peers, not_a_list})
            end,
    Names = [Name | [N || #{name := N} <- Peers]],
    length(lists:usort(Names)) =:= length(Names) orelse throw({peers, duplicate_name}),
    Weights = case maps:get(weights, C, #{}) of
                  W when is_map(W) ->
                      maps:foreach(fun(K, V) when is_binary(K), is_number(V), V >= ?MIN_WEIGHT, V =< ?MAX_WEIGHT -> ok;
                                      (K, _) -> throw({weights, K})
                                   end, W),
                      W;
                  _ -> throw({weights, not_a_map})
              end,
    Probe = ms(maps:get(probe_ms, C, 1000), probe_ms),
    Window = pos_int(maps:get(window, C, 64), window),
    Alpha = case maps:get(ewma_alpha, C, 0.2) of
                A when is_number(A), A > 0, A =< 1 -> A;
                _ -> throw(ewma_alpha)
            end,
    Down = ms(maps:get(down_after_ms, C, min(?MAX_MS, max(1000, 3 * Probe))), down_after_ms),
    BMin = ms(maps:get(backoff_min_ms, C, 100), backoff_min_ms),
    BMax = ms(maps:get(backoff_max_ms, C, 5000), backoff_max_ms),
    BMax >= BMin orelse throw(backoff_max_ms),
    Repl = case maps:get(replication, C, async_primary_backup) of
               M when M =:= async_primary_backup; M =:= sync_all -> M;
               _ -> throw(replication)
           end,
    #{replication => Repl, sync_timeout_ms => ms(maps:get(sync_timeout_ms, C, 5000), sync_timeout_ms),
      repl_window => pos_int(maps:get(repl_window, C, 32), repl_window),
      repl_batch_max => pos_int(maps:get(repl_batch_max, C, 1000), repl_batch_max),
      repl_max_pending => pos_int(maps:get(repl_max_pending, C, 100000), repl_max_pending),
      region_failover_ms => case maps:get(region_failover_ms, C, 0) of
                                F when is_integer(F), F >= 0, F =< ?MAX_MS -> F;
                                _ -> throw(region_failover_ms)
                            end,
      name => Name, coords => Coords, listen => Listen, peers => Peers, weights => Weights, tls => Tls,
      probe_ms => Probe, window => Window, ewma_alpha => Alpha, down_after_ms => Down,
      backoff_min_ms => BMin, backoff_max_ms => BMax}.

peer(#{} = P, Tls) ->
    Name = name(maps:get(name, P, undefined), {peer, name}),
    Gateway = case maps:get(gateway, P, undefined) of
                  {Host, Port} when is_integer(Port), Port > 0, Port < 65536 ->
                      address(Host, {peer, Name}),
                      Tls =/= undefined orelse loopback(Host, {peer, Name}) orelse throw({{peer, Name}, not_loopback}),
                      {Host, Port};
                  _ -> throw({{peer, Name}, bad_gateway})
              end,
    #{name => Name, gateway => Gateway, coords => coords(maps:get(coords, P, undefined), {peer, Name})};
peer(_, _) -> throw({peers, not_a_map}).

file_option(K, F) when is_list(F); is_binary(F) ->
    filelib:is_regular(F) orelse throw({tls, {no_file, K}}),
    unicode:characters_to_list(F);
file_option(K, _) -> throw({tls, {no_file, K}}).

%% Printable UTF-8: a name is a label value of the Prometheus exposition
%% and a field of log lines.
name(N, Key) when is_binary(N), byte_size(N) > 0, byte_size(N) =< 255 ->
    case unicode:characters_to_list(N, utf8) of
        L when is_list(L) ->
            lists:all(fun(Ch) -> Ch >= 32 andalso not (Ch >= 127 andalso Ch < 160) end, L)
                orelse throw({Key, bad_name}),
            N;
        _ -> throw({Key, bad_name})
    end;
name(_, Key) -> throw({Key, bad_name}).

coords({Lat, Lon}, _) when is_number(Lat), is_number(Lon), Lat >= -90, Lat =< 90, Lon >= -180, Lon =< 180 ->
    {Lat, Lon};
coords(_, Key) -> throw({Key, bad_coords}).

pos_int(N, _) when is_integer(N), N > 0 -> N;
pos_int(_, Key) -> throw(Key).

%% A period or timeout: a timer (send_after) or call takes at most ?MAX_MS.
ms(N, _) when is_integer(N), N > 0, N =< ?MAX_MS -> N;
ms(_, Key) -> throw(Key).

%% An address tuple of integer octets (words for IPv6) in range, which
%% loopback/2 and the socket options take as given; names and strings as is.
address(T, Key) when is_tuple(T) ->
    Max = case tuple_size(T) of
              4 -> 255;
              8 -> 65535;
              _ -> throw({Key, bad_address})
          end,
    lists:all(fun(X) -> is_integer(X) andalso X >= 0 andalso X =< Max end, tuple_to_list(T))
        orelse throw({Key, bad_address}),
    ok;
address(_, _) -> ok.

%% Plain TCP is for loopback only: a host name must resolve to a loopback address.
loopback({127, _, _, _}, _) -> true;
loopback({0, 0, 0, 0, 0, 0, 0, 1}, _) -> true;
loopback(T, _) when is_tuple(T) -> false;
loopback(Host, Key) when is_list(Host); is_atom(Host) ->
    case inet:getaddr(Host, inet) of
        {ok, IP} -> loopback(IP, Key);
        {error, _} -> throw({Key, unresolvable})
    end;
loopback(Host, Key) when is_binary(Host) -> loopback(binary_to_list(Host), Key);
loopback(_, Key) -> throw({Key, bad_address}).

%%% API ----------------------------------------------------------------------

%% @doc Routes `Session' to a region. With `client_location => {Lat, Lon}' the
%% policy is `nearest': healthy regions ordered by haversine distance from the
%% client; without it `lowest_rtt': ordered by the EWMA of the RTT measured
%% from this region (this region costs 0). Each cost is multiplied by the
%% region's weight. A region is healthy when it is this region or its link is
%% up. The first region is the primary, the other healthy ones the backups.
%%
%% The decision is recorded in this region (not agreed with the peer regions)
%% and returned unchanged on later calls for the same session while its
%% primary region stays healthy; once the primary is unhealthy the session
%% is routed again (telemetry `[dspex, region, route]' with `reason => failover').
%% In a region of several nodes (its `dspex_cluster' configured with more
%% than one node) a session not decided here yet is routed to its owner in
%% the region's cluster (`dspex_cluster' routing), which decides, one call at
%% a time, and gives the decision to every other live node of the region
%% before answering: every node answers the same, and the decision survives
%% the loss of the node that made it (the session's next owner holds it).
%% A session not decided yet whose owner cannot be reached: the routing's
%% `{error, {unavailable, Why}}' or `{error, {retry, Why}}' (see dspex_cluster).
%% `{error, not_running}' when no region is configured. A session not
%% decided yet whose id the store refuses: the store's error
%% (`dspex_store:check_session_id/1'), nothing recorded.
-spec route_session(binary(), #{client_location => coords()}) -> decision() | {error, term()}.
route_session(Session, Opts) when is_binary(Session), is_map(Opts) ->
    case maps:get(client_location, Opts, none) of
        none -> route(Session, Opts);
        Loc -> try coords(Loc, client_location) of
                   _ -> route(Session, Opts)
               catch throw:D -> {error, {invalid_argument, D}}
               end
    end;
route_session(_, _) -> {error, {invalid_argument, session}}.

route(Session, Opts) ->
    case recorded(Session) of
        {ok, D} -> D;
        none ->
            %% no decision for an id the store would refuse (never cleaned up)
            case dspex_store:check_session_id(Session) of
                ok -> route_new(Session, Opts);
                {error, _} = E -> E
            end;
        unhealthy -> route_new(Session, Opts);
        {error, _} = E -> E
    end.

%% in a region of several nodes the session's owner in the region's
%% cluster decides (dspex_cluster routing, class call)
route_new(Session, Opts) ->
    case multi_node() of
        true -> dspex_cluster:route(Session, {?MODULE, route_owned}, [Session, Opts],
                                    fun() -> route_owned(Session, Opts) end);
        false -> decide_here(Session, Opts)
    end.

decide_here(Session, Opts) ->
    try gen_server:call(?MODULE, {route, Session, Opts})
    catch exit:{noproc, _} -> {error, not_running}
    end.

%% @private route_session/2 on the node owning `Session' in this region's
%% cluster (where dspex_cluster routes it): decided by this node's router,
%% one call at a time, and given to every other live node of the region
%% before it is answered (so it survives the loss of this node).
-spec route_owned(binary(), map()) -> decision() | {error, term()}.
route_owned(Session, Opts) ->
    case decide_here(Session, Opts) of
        #{} = D -> share(Session), D;
        Other -> Other
    end.

%% A region of more than one node: its cluster is configured with others.
multi_node() ->
    dspex_cluster:enabled() andalso
        case dspex_cluster_members:published_view() of
            #{nodes := [_, _ | _]} -> true;
            _ -> false
        end.

%% @private The other live nodes of this region (its cluster's members).
-spec region_nodes() -> [node()].
region_nodes() ->
    case dspex_cluster:enabled() andalso dspex_cluster_members:published_view() of
        #{live := Live} -> Live -- [node()];
        _ -> []
    end.

%% The decision of `Session' recorded here (and its move, if any) given to
%% the region's other live nodes, waiting for their answers (bounded); they
%% keep it unless they hold a newer region epoch. Called by the process that
%% asked for the change, never by this module's server (which only casts:
%% two servers never wait for each other).
share(Session) ->
    case region_nodes() of
        [] -> ok;
        Nodes ->
            _ = gen_server:multi_call(Nodes, ?MODULE, shared(Session), 5000),
            ok
    end.

%% From this module's server: the same, without waiting (casts to one peer
%% server arrive in the order sent).
announce(Session) ->
    _ = [gen_server:abcast(Nodes, ?MODULE, shared(Session)) || Nodes <- [region_nodes()], Nodes =/= []],
    ok.

%% What the region's other nodes are given of `Session': its decision, the
%% region it was moved to, and that move's copy not yet acknowledged
%% (`{Region, RegionEpoch}') or `none'.
shared(Session) ->
    {shared, Session, decision(Session), moved(Session), pending(Session)}.

%% @private The rows of `dspex_region_receiver' (sessions replicated into
%% this region, by the node whose gateway received them) given to the
%% region's other live nodes, so that the node owning a session, which
%% decides its failover, and reads there (get/3) see them. Times are sent as
%% ages (each node has its own monotonic clock).
-spec rows_changed([{term(), term()}]) -> ok.
rows_changed([]) -> ok;
rows_changed(Rows) ->
    case region_nodes() of
        [] -> ok;
        Nodes ->
            _ = gen_server:abcast(Nodes, ?MODULE, {rows, erlang:monotonic_time(millisecond), Rows}),
            ok
    end.

%% A recorded decision whose primary is still healthy.
recorded(Session) ->
    try ets:lookup(?SESSIONS, Session) of
        [{_, #{primary_region := R} = D}] ->
            case healthy(R) orelse not failed(R) of
                true -> {ok, D};
                false -> unhealthy
            end;
        [] -> none
    catch error:badarg -> {error, not_running}
    end.

%% A region whose link has been down for region_failover_ms.
failed(R) ->
    case ets:lookup(?LINKS, R) of
        [{_, #{status := up}}] -> false;
        [{_, #{since := Since}}] ->
            C = persistent_term:get({?MODULE, config}),
            erlang:system_time(millisecond) - Since >= maps:get(region_failover_ms, C, 0);
        _ -> true
    end.

healthy(R) ->
    case persistent_term:get({?MODULE, name}, undefined) of
        R -> true;
        _ -> case ets:lookup(?LINKS, R) of
                 [{_, #{status := up}}] -> true;
                 _ -> false
             end
    end.

%% @doc Drops the recorded decision of `Session' (its next route_session/2 decides afresh),
%% and a move of it still pending (`moving/1'): its copy is sent no more.
-spec forget_session(binary()) -> ok | {error, not_running}.
forget_session(Session) ->
    try gen_server:call(?MODULE, {forget, Session})
    catch exit:{noproc, _} -> {error, not_running}
    end.

%% @doc This region, every peer region with its link status and the RTT
%% measured on the link (`ewma_ms', `p50_ms', `p99_ms' over the last `window'
%% samples, `samples' since start, `last_ms'), `last_check_at' (system time in
%% ms of the last answered probe, `undefined' before the first), `since' (when
%% the status last changed), and the sessions routed to each region
%% (decisions recorded on this node), and the `transport' of the links and
%% the gateway (`tcp' or `tls'). Replication: each peer's `replication' (as a
%% backup region of this one: `lag_versions', `lag_ms', `in_flight',
%% `batches', `records', `full_copies', see `dspex_region_shipper:stats/0'),
%% the mode (`replication') and `backup_sessions' (sessions of other
%% regions replicated here). `{error, not_running}' without a region.
-spec topology() -> map() | {error, not_running}.
topology() ->
    try
        Me = persistent_term:get({?MODULE, name}),
        C = persistent_term:get({?MODULE, config}),
        Counts = ets:foldl(fun({_, #{primary_region := R}}, Acc) -> maps:update_with(R, fun(N) -> N + 1 end, 1, Acc) end,
                           #{}, ?SESSIONS),
        Links = maps:from_list(ets:tab2list(?LINKS)),
        Repl = dspex_region_shipper:stats(),
        Peers = maps:from_list(
                  [{N, begin
                           L = maps:get(N, Links, #{status => down}),
                           #{coords => Co, gateway => G, status => maps:get(status, L),
                             since => maps:get(since, L, undefined),
                             last_error => maps:get(last_error, L, undefined),
                             last_check_at => maps:get(last_check_at, L, undefined),
                             rtt => rtt_ms(L), sessions => maps:get(N, Counts, 0),
                             replication => maps:get(N, Repl, #{lag_versions => 0, lag_ms => 0})}
                       end} || #{name := N, coords := Co, gateway := G} <- maps:get(peers, C)]),
        #{region => Me, coords => maps:get(coords, C), gateway_port => gateway_port(),
          transport => case maps:get(tls, C) of undefined -> tcp; _ -> tls end,
          sessions => maps:get(Me, Counts, 0), peers => Peers,
          replication => replication(),
          backup_sessions => map_size(dspex_region_receiver:sessions())}
    catch error:badarg -> {error, not_running}
    end.

rtt_ms(L) ->
    Ms = fun(undefined) -> undefined; (Us) -> Us / 1000 end,
    #{ewma_ms => Ms(maps:get(ewma_us, L, undefined)), p50_ms => Ms(maps:get(p50_us, L, undefined)),
      p99_ms => Ms(maps:get(p99_us, L, undefined)), last_ms => Ms(maps:get(last_us, L, undefined)),
      samples => maps:get(samples, L, 0)}.

%% @doc The replication mode in force: `async_primary_backup' or `sync_all'
%% (`{error, not_running}' without a region).
-spec replication() -> async_primary_backup | sync_all | {error, not_running}.
replication() ->
    case persistent_term:get({?MODULE, replication}, undefined) of
        undefined -> {error, not_running};
        M -> M
    end.

%% @doc Switches the replication mode of this node's writes from now on (the
%% configuration's `replication' at start). Writes already waiting keep theirs.
-spec set_replication(async_primary_backup | sync_all) -> ok | {error, not_running | {invalid_argument, replication}}.
set_replication(M) when M =:= async_primary_backup; M =:= sync_all ->
    case replication() of
        {error, _} = E -> E;
        _ -> persistent_term:put({?MODULE, replication}, M)
    end;
set_replication(_) -> {error, {invalid_argument, replication}}.

%% @doc Reads variable `Key' of `Session' in this region with the lag of the
%% copy it was read from: `{ok, Variable, #{region, primary_region,
%% lag_versions, lag_ms}}' (see `dspex_region_receiver:lag/1').
%% `read => local' (default) serves it from this region (the primary's own
%% copy has no lag; a session not replicated into this region is read as
%% this region's own); `read => primary' forwards it over the link to the
%% session's primary region when that is another one, and answers with that
%% region's copy (lag 0), or `{error, {region_unavailable, Region}}' (link
%% down) or `{error, {region_timeout, [Region]}}' (no answer within
%% `sync_timeout_ms').
-spec get(binary(), term(), #{read => local | primary}) -> {ok, map(), map()} | {error, term()}.
get(Session, Key, Opts) when is_binary(Session), is_map(Opts) ->
    case persistent_term:get({?MODULE, name}, undefined) of
        undefined -> {error, not_running};
        Me ->
            Primary = case decision(Session) of
                          #{primary_region := P} -> P;
                          undefined -> Me
                      end,
            case maps:get(read, Opts, local) of
                local ->
                    case moved(Session) of
                        undefined -> dspex_region_receiver:read_local(Session, Key, Me);
                        To -> {error, {region_moved, To}}
                    end;
                primary when Primary =:= Me -> dspex_region_receiver:read_local(Session, Key, Me);
                primary ->
                    Timeout = maps:get(sync_timeout_ms, persistent_term:get({?MODULE, config})),
                    case ets:lookup(?LINKS, Primary) of
                        [{_, #{status := up, pid := Link}}] ->
                            try gen_server:call(Link, {read, Session, Key}, Timeout)
                            catch exit:{timeout, _} -> {error, {region_timeout, [Primary]}};
                                  exit:_ -> {error, {region_unavailable, Primary}}
                            end;
                        _ -> {error, {region_unavailable, Primary}}
                    end;
                _ -> {error, {invalid_argument, read}}
            end
    end;
get(_, _, _) -> {error, {invalid_argument, session}}.

%% @doc Moves the primary of a live `Session' from this region (it must be
%% its primary here) to the peer region `Region': from the call on this
%% region refuses the session's writes with `{error, {region_moved, Region}}'
%% (reads here too: `get/3' with `read => local'; `read => primary' forwards to
%% `Region'), and ships the whole session (its writer's export, after every
%% write it committed) to `Region' with the new decision: primary `Region', the
%% other backups unchanged, this region none, `policy => moved' and a higher
%% `region_epoch'. `Region' installs it, becomes the primary (its
%% `route_session/2' answers so) and sends each backup a full copy, which a
%% backup accepts only at the higher region epoch: changes of the old
%% primary arriving later are ignored and counted (`fenced' in
%% `dspex_region_receiver:row/1'). `ok' once `Region' acknowledged the copy;
%% `{error, {region_timeout, [Region]}}' after `sync_timeout_ms' (the move is
%% under way: the copy is sent again until it is through, writes stay
%% refused here); `{error, {not_primary, Region}}', `{error, {not_routed,
%% Session}}', `{error, {region_unavailable, Region}}' (link down, or this
%% region: nothing recorded; or the shipper died during the call: the move
%% is recorded and under way as after a timeout), `{error, not_running}'.
%%
%% A move is driven to completion: until `Region' acknowledged a copy at the
%% move's region epoch, the move is pending (`moving/1'), held next to the
%% decision by this module's process (which outlives the shipper) and by the
%% region's other nodes; the shipper of the session's owner in this region
%% sends the copy again after a link flap, after it restarts (its start
%% queues a copy of every pending move of a session owned here) and, should
%% none be on its way, at each failover check (`pending_moves/0'). Once
%% acknowledged the move is no longer pending and nothing is sent again.
-spec move_session(binary(), region()) -> ok | {error, term()}.
move_session(Session, Region) when is_binary(Session), is_binary(Region) ->
    case multi_node() of
        true -> dspex_cluster:route(Session, {?MODULE, move_owned}, [Session, Region],
                                    fun() -> move_owned(Session, Region) end);
        false -> move_owned(Session, Region)
    end;
move_session(_, _) -> {error, {invalid_argument, session}}.

%% @private move_session/2 on the node owning `Session' in this region's
%% cluster (its writer takes the export the move ships); the new decision
%% and the move reach the region's other live nodes before the copy leaves.
-spec move_owned(binary(), region()) -> ok | {error, term()}.
move_owned(Session, Region) ->
    %% read before the move is recorded: a call that cannot wait for the
    %% copy must not leave the session unwritable here
    case persistent_term:get({?MODULE, config}, undefined) of
        #{sync_timeout_ms := Timeout} when is_integer(Timeout), Timeout > 0, Timeout =< ?MAX_MS ->
            try gen_server:call(?MODULE, {move, Session, Region}) of
                {ok, _New} ->
                    share(Session),
                    dspex_region_shipper:move(Session, Region, Timeout);
                {error, _} = E -> E
            catch exit:{noproc, _} -> {error, not_running}
            end;
        undefined -> {error, not_running};
        _ -> {error, {invalid_argument, sync_timeout_ms}}
    end.

%% @private The region `Session' was moved to from this one, or `undefined'.
-spec moved(binary()) -> region() | undefined.
moved(Session) ->
    try ets:lookup(dspex_region_moved, Session) of
        [{_, R}] -> R;
        [] -> undefined
    catch error:badarg -> undefined
    end.

%% @private The region `Session' is being moved to from this one, whose copy
%% it has not acknowledged yet, or `undefined' (not moved, or acknowledged).
-spec moving(binary()) -> region() | undefined.
moving(Session) ->
    case pending(Session) of
        {R, _} -> R;
        none -> undefined
    end.

pending(Session) ->
    try ets:lookup(dspex_region_moving, Session) of
        [{_, R, E}] -> {R, E};
        [] -> none
    catch error:badarg -> none
    end.

%% @private The pending moves (`moving/1') of the sessions this node owns in
%% the region's cluster (every one in a one-node region): `[{Session,
%% Region}]', each a copy its shipper must get through to `Region'.
-spec pending_moves() -> [{binary(), region()}].
pending_moves() ->
    try ets:tab2list(dspex_region_moving) of
        Rows -> [{S, R} || {S, R, _} <- Rows, owns(S)]
    catch error:badarg -> []
    end.

%% @private Full copies of sessions that `Region' acknowledged, each with the
%% region epoch it was taken at (from the shipper): a pending move of one of
%% them to `Region', at that epoch or below, is done.
-spec moves_copied(region(), [{binary(), non_neg_integer()}]) -> ok.
moves_copied(Region, Copies) ->
    case [SE || {S, RE} = SE <- Copies, {R, E} <- [pending(S)], R =:= Region, RE >= E] of
        [] -> ok;
        Done -> gen_server:cast(?MODULE, {move_copied, Region, Done})
    end.

region_epoch(#{region_epoch := E}) -> E;
region_epoch(_) -> 0.

%% Decisions ordered: by region epoch, then by revision within it (the
%% primary of an epoch revises its decision, say adding the old primary back
%% as a backup; a peer's answer can still carry the earlier revision, which
%% must not replace the later one).
order(undefined) -> {-1, 0};
order(D) -> {region_epoch(D), maps:get(revision, D, 0)}.

%% @private Whether a write of `Session' may be made in this region (checked
%% by `dspex_cluster' before it routes a write): `ok' without regions, for a
%% session this node has no decision for, or whose primary is this region;
%% `{error, {region_moved, R}}' for a session moved away from here;
%% `{error, {not_primary_region, P}}' in a backup region (the change would
%% diverge from its primary's and be overwritten by its next full copy). The
%% backup's own replay of the primary's changes (dspex_region_receiver) passes.
%% A session replicated from here (its decision has backup regions) is
%% refused with `{error, {region_fenced, Reachable}}' while this region is
%% fenced (`fenced/0'): a backup may be about to take it over.
-spec writable(term()) -> ok | {error, {region_moved | not_primary_region, binary()}}
                              | {error, {region_fenced, [region()]}}.
writable(Session) ->
    case persistent_term:get({?MODULE, name}, undefined) of
        undefined -> ok;
        Me ->
            case get(dspex_region_replay) of
                true -> ok;
                _ ->
                    case decision(Session) of
                        #{primary_region := Me, backup_regions := [_ | _]} ->
                            case fenced() of
                                false -> ok;
                                {true, Reachable} -> {error, {region_fenced, Reachable}}
                            end;
                        #{primary_region := Me} -> ok;
                        #{primary_region := P} ->
                            case moved(Session) of
                                undefined -> {error, {not_primary_region, P}};
                                R -> {error, {region_moved, R}}
                            end;
                        undefined -> ok
                    end
            end
    end.

%% @doc Whether this region fences itself: `{true, Reachable}' once it has
%% not reached a strict majority of all the regions (itself and the peers
%% whose link is up, the rule a backup's takeover needs) for
%% `region_failover_ms div 2' ms, else `false' (also without a region).
%% While fenced, the sessions it is the primary of and that have backup
%% regions refuse their clients' writes with `{error, {region_fenced,
%% Reachable}}' (`Reachable': this region and the peers whose link is up,
%% sorted); reads are served. A backup takes such a session over only after
%% its own link to this region has been down for `region_failover_ms', so
%% this region stops writing about `region_failover_ms div 2' before (each
%% side measures from its own link going down, after `down_after_ms' without
%% an answer, on its own clock: only durations are compared, and the half
%% is the margin for the two detections and the takeover check's period).
%% Computed on each call from the links' rows: the majority was lost when
%% the last link it needed went down (the `since' of that link's row).
-spec fenced() -> false | {true, [region()]}.
fenced() ->
    case persistent_term:get({?MODULE, config}, undefined) of
        #{name := Me, peers := [_ | _] = Peers, region_failover_ms := F} ->
            Rows = [{N, case ets:lookup(?LINKS, N) of [{_, Row}] -> Row; [] -> #{status => down, since => 0} end}
                    || #{name := N} <- Peers],
            Up = [N || {N, #{status := up}} <- Rows],
            %% peers needed up for a strict majority, this region counted
            Need = (length(Peers) + 1) div 2,
            case Need - length(Up) of
                Short when Short =< 0 -> false;
                Short ->
                    %% the majority held until the Short-th most recent link down
                    Downs = lists:reverse(lists:sort([maps:get(since, Row, 0) || {_, Row} <- Rows,
                                                                                maps:get(status, Row) =/= up])),
                    LostAt = lists:nth(Short, Downs),
                    case erlang:system_time(millisecond) - LostAt >= F div 2 of
                        true -> {true, lists:sort([Me | Up])};
                        false -> false
                    end
            end;
        _ -> false
    end.

%% @private The recorded decision of `Session', or `undefined'.
-spec decision(binary()) -> decision() | undefined.
decision(Session) ->
    try ets:lookup(?SESSIONS, Session) of
        [{_, D}] -> D;
        [] -> undefined
    catch error:badarg -> undefined
    end.

%% @private Records the decision a primary region made for `Session' (its
%% records carry it, see dspex_region_receiver).
-spec adopt(binary(), decision()) -> ok | stale.
adopt(Session, D) ->
    case decision(Session) of
        D -> ok;
        _ ->
            case gen_server:call(?MODULE, {adopt, Session, D}) of
                ok -> share(Session), ok;
                Stale -> Stale
            end
    end.

%% @doc The port the gateway listens on, or `{error, not_running}'.
-spec gateway_port() -> inet:port_number() | {error, not_running}.
gateway_port() -> dspex_region_gateway:port().

%% @doc Prometheus exposition of the links: `dspex_region_rtt_seconds'
%% (summary over the window: quantiles 0.5 and 0.99, `_sum' and `_count'
%% since start) and `dspex_region_link_up' (gauge, 1 or 0), labelled
%% `region' (this one) and `peer'. Empty when no region runs.
-spec prometheus() -> iodata().
prometheus() ->
    case catch ets:tab2list(?LINKS) of
        Rows when is_list(Rows) ->
            Me = dspex_prometheus:escape(persistent_term:get({?MODULE, name}, <<>>)),
            Repl = dspex_region_shipper:stats(),
            %% names are checked printable at start; escaped all the same
            Lab = fun(P) -> ["region=\"", Me, "\",peer=\"", dspex_prometheus:escape(P), "\""] end,
            S = fun(undefined) -> "NaN"; (Us) -> float_to_list(Us / 1.0e6, [short]) end,
            ["# HELP dspex_region_rtt_seconds Round-trip time measured on each link to a peer region.\n",
             "# TYPE dspex_region_rtt_seconds summary\n",
             [[[["dspex_region_rtt_seconds{", Lab(P), ",quantile=\"", Q, "\"} ", S(maps:get(K, L, undefined)), "\n"]
                || {K, Q} <- [{p50_us, "0.5"}, {p99_us, "0.99"}]],
               "dspex_region_rtt_seconds_sum{", Lab(P), "} ", S(maps:get(sum_us, L, 0)), "\n",
               "dspex_region_rtt_seconds_count{", Lab(P), "} ", integer_to_list(maps:get(samples, L, 0)), "\n"]
              || {P, L} <- lists:sort(Rows)],
             "# HELP dspex_region_link_up 1 when the link to the peer region is up.\n",
             "# TYPE dspex_region_link_up gauge\n",
             [["dspex_region_link_up{", Lab(P), "} ", case maps:get(status, L) of up -> "1"; _ -> "0" end, "\n"]
              || {P, L} <- lists:sort(Rows)],
             "# HELP dspex_region_replication_lag_versions Changes not yet acknowledged by each backup region.\n",
             "# TYPE dspex_region_replication_lag_versions gauge\n",
             [["dspex_region_replication_lag_versions{", Lab(P), "} ", integer_to_list(V), "\n"]
              || {P, #{lag_versions := V}} <- lists:sort(maps:to_list(Repl))],
             "# HELP dspex_region_replication_lag_seconds Age of the oldest change not yet acknowledged by each backup region.\n",
             "# TYPE dspex_region_replication_lag_seconds gauge\n",
             [["dspex_region_replication_lag_seconds{", Lab(P), "} ", float_to_list(Ms / 1000, [short]), "\n"]
              || {P, #{lag_ms := Ms}} <- lists:sort(maps:to_list(Repl))]];
        _ -> []
    end.

%% @doc Great-circle distance in km between two `{Lat, Lon}' in degrees.
-spec haversine_km(coords(), coords()) -> float().
haversine_km({Lat1, Lon1}, {Lat2, Lon2}) ->
    Rad = math:pi() / 180,
    DLat = (Lat2 - Lat1) * Rad,
    DLon = (Lon2 - Lon1) * Rad,
    A = math:pow(math:sin(DLat / 2), 2) + math:cos(Lat1 * Rad) * math:cos(Lat2 * Rad) * math:pow(math:sin(DLon / 2), 2),
    2 * 6371.0088 * math:asin(min(1.0, math:sqrt(A))).

%%% for the links ---------------------------------------------------------------

%% @private
-spec links_table() -> atom().
links_table() -> ?LINKS.

%% @private A link's row (its own process is the only writer).
-spec link_update(region(), map()) -> true.
link_update(Peer, Row) -> ets:insert(?LINKS, {Peer, Row}).

%%% server: owns the tables, decides routes --------------------------------------

%% @private
-spec start_link(map() | {error, term()}) -> {ok, pid()} | {error, term()}.
start_link({error, _} = E) -> E;
start_link(C) -> gen_server:start_link({local, ?MODULE}, ?MODULE, C, []).

%% @private
-spec init(map()) -> {ok, map()}.
init(#{name := Me, peers := Peers} = C) ->
    process_flag(trap_exit, true),
    _ = ets:new(?LINKS, [named_table, public, set, {read_concurrency, true}]),
    _ = ets:new(?SESSIONS, [named_table, protected, set, {read_concurrency, true}]),
    %% written by the gateway's connections (dspex_region_receiver)
    _ = ets:new(dspex_region_applied, [named_table, public, set, {read_concurrency, true}]),
    %% sessions moved from this region to another: {Session, Region}
    _ = ets:new(dspex_region_moved, [named_table, protected, set, {read_concurrency, true}]),
    %% those moves whose copy Region has not acknowledged yet (sent again
    %% until it has, also by a restarted shipper): {Session, Region, RegionEpoch}
    _ = ets:new(dspex_region_moving, [named_table, protected, set, {read_concurrency, true}]),
    %% sessions taken over here whose old primary is not a backup yet: {Session, OldPrimary}
    _ = ets:new(dspex_region_rejoin, [named_table, protected, set]),
    persistent_term:put({?MODULE, replication}, maps:get(replication, C)),
    _ = Peers =/= [] andalso erlang:send_after(failover_tick_ms(C), self(), failover_tick),
    [ets:insert(?LINKS, {N, #{status => down, since => erlang:system_time(millisecond), samples => 0}})
     || #{name := N} <- Peers],
    persistent_term:put({?MODULE, name}, Me),
    persistent_term:put({?MODULE, config}, C),
    %% the decisions and rows of the region's other nodes, for a node that
    %% (re)joins: asked at start from the nodes connected, and from each
    %% node that connects later
    _ = catch net_kernel:monitor_nodes(true),
    _ = [pull(N) || N <- nodes()],
    {ok, C}.

pull(N) -> gen_server:cast({?MODULE, N}, {pull, node()}).

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({route, Session, Opts}, _From, C) ->
    %% decided here, one at a time: two callers racing get the same decision
    case recorded(Session) of
        {ok, D} -> {reply, D, C};
        none -> {reply, record(Session, decide(Opts, C), new), C};
        unhealthy -> {reply, failover(Session, Opts, C), C}
    end;
handle_call({adopt, Session, D}, _From, #{name := Me} = C) ->
    %% a decision of an older region epoch (or an earlier revision of the
    %% same epoch's) never replaces a newer one
    case order(decision(Session)) =< order(D) of
        true ->
            ets:insert(?SESSIONS, {Session, D}),
            %% moved back here: writable again
            _ = maps:get(primary_region, D) =:= Me andalso unmove(Session),
            superseded(Session, D),
            ok = announce(Session),
            {reply, ok, C};
        false -> {reply, stale, C}
    end;
handle_call({move, Session, Region}, _From, #{name := Me} = C) ->
    case decision(Session) of
        #{primary_region := Me, backup_regions := Backups} = D ->
            case healthy(Region) andalso Region =/= Me of
                true ->
                    %% from now on this region takes no write of the session
                    %% (dspex_region_shipper:admit/2), and names the new primary
                    %% in a higher region epoch; the old primary is no backup
                    New = #{primary_region => Region, backup_regions => Backups -- [Region], policy => moved,
                            decided_at => erlang:system_time(millisecond), region_epoch => region_epoch(D) + 1},
                    ets:insert(dspex_region_moved, {Session, Region}),
                    %% pending until Region acknowledged a copy at this epoch
                    ets:insert(dspex_region_moving, {Session, Region, maps:get(region_epoch, New)}),
                    ets:insert(?SESSIONS, {Session, New}),
                    ok = announce(Session),
                    dspex_telemetry:execute([dspex, region, route], #{count => 1},
                                            #{session => Session, primary_region => Region, policy => moved,
                                              reason => moved}),
                    {reply, {ok, New}, C};
                false -> {reply, {error, {region_unavailable, Region}}, C}
            end;
        #{primary_region := Other} -> {reply, {error, {not_primary, Other}}, C};
        undefined -> {reply, {error, {not_routed, Session}}, C}
    end;
handle_call({forget, Session}, _From, C) ->
    ets:delete(?SESSIONS, Session),
    %% (a copy is taken with the decision it names: none left to send)
    ets:delete(dspex_region_moving, Session),
    _ = [gen_server:abcast(Nodes, ?MODULE, {forgotten, Session}) || Nodes <- [region_nodes()], Nodes =/= []],
    {reply, ok, C};
handle_call({shared, Session, D, Moved, Pending}, _From, C) ->
    take_shared(Session, D, Moved, Pending, C),
    {reply, ok, C};
handle_call({shared, Session, D, Moved}, _From, C) ->
    %% a node of the previous release (rolling upgrade): no pending state
    take_shared(Session, D, Moved, keep, C),
    {reply, ok, C};
handle_call(_, _From, C) -> {reply, {error, unknown_call}, C}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({shared, Session, D, Moved, Pending}, C) ->
    take_shared(Session, D, Moved, Pending, C),
    {noreply, C};
handle_cast({shared, Session, D, Moved}, C) ->
    take_shared(Session, D, Moved, keep, C),
    {noreply, C};
handle_cast({move_copied, Region, Done}, C) ->
    %% checked again here, where the table is written: the move is still the
    %% one that copy was taken for; the region's other nodes learn it is done
    _ = [begin ets:delete(dspex_region_moving, S), announce(S) end
         || {S, RE} <- Done, {R, E} <- [pending(S)], R =:= Region, RE >= E],
    {noreply, C};
handle_cast({forgotten, Session}, C) ->
    ets:delete(?SESSIONS, Session),
    ets:delete(dspex_region_moving, Session),
    {noreply, C};
handle_cast({rows, Then, Rows}, C) ->
    %% another node's receiver rows, its times made ages, then times here
    Now = erlang:monotonic_time(millisecond),
    Here = fun(T) when is_integer(T) -> Now - (Then - T); (T) -> T end,
    _ = [ets:insert(dspex_region_applied, {K, merge_row(K, R, Here)})
         || {K, R} <- Rows, (is_binary(K) andalso is_map(R))
                                orelse (is_tuple(K) andalso element(1, K) =:= heard andalso is_integer(R))],
    {noreply, C};
handle_cast({pull, From}, C) when is_atom(From) ->
    case lists:member(From, region_nodes()) orelse lists:member(From, configured_nodes()) of
        true ->
            gen_server:cast({?MODULE, From}, {merge, erlang:monotonic_time(millisecond), ets:tab2list(?SESSIONS),
                                              ets:tab2list(dspex_region_moved), ets:tab2list(dspex_region_applied),
                                              ets:tab2list(dspex_region_moving)});
        false -> ok
    end,
    {noreply, C};
handle_cast({merge, Then, Decisions, Moved, Rows, Pending}, C) ->
    %% a move another node holds as pending is pending here too; one it does
    %% not hold as pending leaves this node's as it is (at worst the copy is
    %% sent once more, and acknowledged as a repeat)
    P = maps:from_list([{S, {R, E}} || {S, R, E} <- Pending]),
    _ = [take_shared(S, D, proplists:get_value(S, Moved), maps:get(S, P, keep), C) || {S, D} <- Decisions],
    %% rows this node has not got (its own are as new as any)
    handle_cast({rows, Then, [R || {K, _} = R <- Rows, not ets:member(dspex_region_applied, K)]}, C);
handle_cast({merge, Then, Decisions, Moved, Rows}, C) ->
    %% from a node of the previous release: it holds no pending moves
    handle_cast({merge, Then, Decisions, Moved, Rows, []}, C);
handle_cast(_, C) -> {noreply, C}.

%% A row (or heard time) from another node against this node's: the one
%% that applied more of the session wins, a region epoch never goes back (a
%% takeover here raised it), a primary last heard is the latest heard.
merge_row({heard, _} = K, T, Here) ->
    case ets:lookup(dspex_region_applied, K) of
        [{_, Mine}] when is_integer(Mine) -> max(Mine, Here(T));
        _ -> Here(T)
    end;
merge_row(S, R0, Here) when is_map(R0) ->
    R = R0#{current_at => Here(maps:get(current_at, R0, undefined))},
    case ets:lookup(dspex_region_applied, S) of
        [{_, #{seq := MySeq} = Mine}] ->
            Keep = case MySeq > maps:get(seq, R, 0) of
                       true -> Mine;
                       false -> R
                   end,
            Keep#{region_epoch => max(region_epoch(Mine), region_epoch(R))};
        _ -> R
    end.

%% A decision (and move) another node of this region recorded: kept unless
%% this node holds a newer region epoch; a session whose primary is this
%% region again is writable again. `Pending': the move's copy not yet
%% acknowledged (`{Region, RegionEpoch}'), acknowledged (`none'), or not
%% said (`keep').
take_shared(Session, D, Moved, Pending, #{name := Me}) when is_binary(Session), is_map(D) ->
    case order(decision(Session)) =< order(D) of
        true ->
            ets:insert(?SESSIONS, {Session, D}),
            case {maps:get(primary_region, D, undefined), Moved} of
                {Me, _} -> unmove(Session);
                {_, R} when is_binary(R) ->
                    ets:insert(dspex_region_moved, {Session, R}),
                    case Pending of
                        {R, E} when is_integer(E) -> ets:insert(dspex_region_moving, {Session, R, E});
                        none -> ets:delete(dspex_region_moving, Session);
                        _ -> true
                    end;
                _ -> true
            end,
            superseded(Session, D);
        false -> false
    end;
take_shared(_, _, _, _, _) -> false.

%% the session's primary is this region again: writable, nothing to ship
unmove(Session) ->
    ets:delete(dspex_region_moved, Session),
    ets:delete(dspex_region_moving, Session).

%% A decision of a higher region epoch than a pending move's replaced it
%% (the session went on from the new primary): that move's copy is sent no
%% more (it would name a decision that is no longer the move's).
superseded(Session, D) ->
    RE = region_epoch(D),
    case pending(Session) of
        {_, E} when E < RE -> ets:delete(dspex_region_moving, Session);
        _ -> true
    end.

%% the nodes of this region's cluster, as configured
configured_nodes() ->
    case dspex_cluster:enabled() andalso dspex_cluster_members:published_view() of
        #{nodes := Ns} -> Ns;
        _ -> []
    end.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(failover_tick, #{name := Me} = C) ->
    %% sessions replicated into this region whose primary region has been
    %% unreachable for region_failover_ms, and whose first healthy backup is
    %% this region: taken over here
    %% (only with a majority of the regions reachable from here, this one
    %% counted: two backups cut off from each other cannot both take over)
    _ = [failover(S, #{}, C)
         || majority(C), S <- maps:keys(dspex_region_receiver:sessions()),
            #{primary_region := P, backup_regions := Bs} <- [decision(S)],
            P =/= Me, not healthy(P), failed(P), silent(P, C),
            lists:member(Me, Bs), hd([B || B <- Bs, healthy(B)]) =:= Me, owns(S)],
    %% old primaries of sessions taken over here that are reachable again
    _ = [rejoin(S, P, C) || {S, P} <- ets:tab2list(dspex_region_rejoin), healthy(P)],
    %% moves whose copy is not acknowledged yet: this node's shipper sends
    %% it should none be on its way (say this node became the session's
    %% owner, or got the move from another node after its own restart)
    _ = [dspex_region_shipper:resync_to(S, [R]) || {S, R} <- pending_moves()],
    erlang:send_after(failover_tick_ms(C), self(), failover_tick),
    {noreply, C};
handle_info({nodeup, N}, C) ->
    _ = lists:member(N, configured_nodes()) andalso pull(N),
    {noreply, C};
handle_info(_, C) -> {noreply, C}.

%% In a region of several nodes a session's failover is decided by the node
%% owning it in the region's cluster (the others' ticks leave it alone).
owns(S) ->
    case dspex_cluster:owner_of(S) of
        {ok, N} -> N =:= node();
        {error, not_clustered} -> true;
        {error, _} -> false
    end.

failover_tick_ms(#{region_failover_ms := F}) -> max(100, F div 4).

resume_ttl(Session) ->
    case dspex_region_receiver:resume_ttl(Session) of
        ok -> ok;
        {error, Why} ->
            logger:warning("dspex_region: the TTL of ~p taken over here not resumed: ~p", [Session, Why])
    end.

%% The old primary P of a session taken over here is reachable again: it
%% becomes the session's last backup (same region epoch), and gets a full
%% copy, then the session's changes. It adopts the decision from that copy's
%% batch (or earlier, from the refusal of its own late changes), so its
%% clients' writes are refused there from then on, and its copy converges
%% to this region's history.
rejoin(S, P, #{name := Me}) ->
    ets:delete(dspex_region_rejoin, S),
    case decision(S) of
        #{primary_region := Me, backup_regions := Bs} = D when P =/= Me ->
            case lists:member(P, Bs) of
                true -> ok;
                false ->
                    %% the copy is queued first: a change committed once the
                    %% decision names P follows it in P's queue (the copy is
                    %% taken when it leaves, with every change before)
                    ok = dspex_region_shipper:resync_to(S, [P]),
                    _ = record(S, D#{backup_regions => Bs ++ [P], revision => maps:get(revision, D, 0) + 1},
                               rejoin),
                    ok
            end;
        _ -> ok
    end.

%% Nothing (batch or probe) came in from region R for down_after_ms: this
%% node's own link to R can be down (in its reconnect backoff, or one way
%% cut) while R's link to this region still delivers, and a primary heard
%% from is alive: no takeover then.
silent(R, #{down_after_ms := Down}) ->
    case dspex_region_receiver:silent_ms(R) of
        infinity -> true;
        Ms -> Ms >= Down
    end.

%% A strict majority of all the regions (this one and its peers) is this
%% one plus the peers whose link is up, held for region_failover_ms: a
%% region that has just regained a majority (a heal reconnects its links
%% one by one) does not take over a primary the others may have reached all
%% along; its link to that primary comes back meanwhile. Counted from the
%% time the links that make the majority were up together (the latest
%% `since' among the earliest up ones it needs).
majority(#{peers := Peers, region_failover_ms := F}) ->
    Need = (length(Peers) + 1) div 2,
    Ups = lists:sort([maps:get(since, Row, 0) || #{name := N} <- Peers,
                                                 {_, #{status := up} = Row} <- ets:lookup(?LINKS, N)]),
    length(Ups) >= Need andalso
        (Need =:= 0 orelse erlang:system_time(millisecond) - lists:nth(Need, Ups) >= F).

record(Session, D, Reason) ->
    ets:insert(?SESSIONS, {Session, D}),
    ok = announce(Session),
    dspex_telemetry:execute([dspex, region, route], #{count => 1},
                            #{session => Session, primary_region => maps:get(primary_region, D),
                              policy => maps:get(policy, D), reason => Reason}),
    D.

%% The primary of a session is unreachable (for region_failover_ms): its
%% first healthy backup region takes over, in a higher region epoch (the
%% old primary's later changes are refused by the backups, see
%% dspex_region_receiver); a session without backups is routed afresh.
failover(Session, Opts, #{name := Me} = C) ->
    Old = decision(Session),
    D0 = case Old of
             #{backup_regions := Bs} ->
                 case [B || B <- Bs, healthy(B)] of
                     [New | Rest] ->
                         Old#{primary_region => New, backup_regions => Rest, policy => failover, revision => 0,
                              decided_at => erlang:system_time(millisecond), region_epoch => region_epoch(Old) + 1};
                     [] -> (decide(Opts, C))#{region_epoch => region_epoch(Old) + 1}
                 end;
             _ -> decide(Opts, C)
         end,
    %% taking over a session replicated here needs a majority of the regions
    %% (this one counted) reachable from here and the primary silent here;
    %% else the decision stays (the primary may be alive on the other side of
    %% a partition, or reach this region while this node's link to it is down)
    %% taken over here: the decision names the old primary's last change
    %% this region had (its numbering), so that every region can tell that
    %% primary's late writes (refused and reported) from repeats of changes
    %% the new primary has (ignored; see dspex_region_receiver)
    D1 = case maps:get(primary_region, D0) =:= Me andalso ets:lookup(dspex_region_applied, Session) of
             [{_, #{seq := TakenAt}}] when is_map(Old) -> D0#{taken_at => TakenAt};
             _ -> D0
         end,
    D = case is_map(Old) andalso maps:get(primary_region, D0) =:= Me andalso ets:member(dspex_region_applied, Session)
             andalso not (majority(C) andalso silent(maps:get(primary_region, Old), C)) of
            true -> Old;
            false -> D1
        end,
    %% taken over here: this region's copy expires on its own clock from now
    %% on (a backup's copy has no expiry, dspex_region_receiver); done before
    %% the decision names this region, so that nothing of it is shipped
    _ = D =/= Old andalso maps:get(primary_region, D) =:= Me andalso is_map(Old)
        andalso resume_ttl(Session),
    _ = D =/= Old andalso record(Session, D, failover),
    %% the old primary, once reachable again, follows this region (rejoin/3)
    _ = case {Old, D} of
            {#{primary_region := OldP}, #{primary_region := Me, backup_regions := NewBs}}
              when D =/= Old, OldP =/= Me ->
                not lists:member(OldP, NewBs) andalso ets:insert(dspex_region_rejoin, {Session, OldP});
            _ -> false
        end,
    %% this region's copy is at the new region epoch: the old primary's later
    %% changes are refused here too
    _ = maps:get(primary_region, D) =:= Me andalso dspex_region_receiver:took_over(Session, region_epoch(D)),
    %% primary here of a session replicated here: its backups get a full copy
    %% at the new region epoch
    _ = maps:get(primary_region, D) =:= Me andalso ets:member(dspex_region_applied, Session)
        andalso dspex_region_shipper:resync(Session),
    D.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_, _) ->
    _ = persistent_term:erase({?MODULE, name}),
    _ = persistent_term:erase({?MODULE, config}),
    _ = persistent_term:erase({?MODULE, replication}),
    ok.

decide(Opts, #{name := Me, coords := MyCoords, peers := Peers, weights := W}) ->
    Healthy = [{Me, MyCoords} | [{N, Co} || #{name := N, coords := Co} <- Peers, healthy(N)]],
    {Policy, Cost} =
        case maps:get(client_location, Opts, none) of
            none ->
                {lowest_rtt, fun({R, _}) when R =:= Me -> 0.0;
                                ({R, _}) -> case ets:lookup(?LINKS, R) of
                                                %% up, but no probe answered yet: unmeasured
                                                [{_, #{ewma_us := E}}] when is_number(E) -> E / 1000;
                                                _ -> infinity
                                            end
                             end};
            Loc -> {nearest, fun({_, Co}) -> haversine_km(Loc, Co) end}
        end,
    Scored = lists:sort([{weighted(Cost(R), maps:get(N, W, 1.0)), N} || {N, _} = R <- Healthy]),
    [Primary | Backups] = [N || {_, N} <- Scored],
    #{primary_region => Primary, backup_regions => Backups, policy => Policy,
      decided_at => erlang:system_time(millisecond)}.

%% regions without a measurement yet sort after every measured one; a
%% product too large for a float sorts as the largest cost, never raises
weighted(infinity, _) -> {1, 0};
weighted(X, Weight) ->
    try {0, min(X * Weight, ?MAX_COST)}
    catch error:badarith -> {0, ?MAX_COST}
    end.
