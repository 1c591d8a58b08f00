%% @doc Supervises the cluster processes when `dspex_bridge' / `cluster' is
%% configured: the `pg' scope, the replica pool, the batch receiver, a
%% shipper per other node (sync replication), the writer pool, the watch relay
%% table and guards, the ownership
%% backend's processes, then the membership server (which turns routing on).
%% Without configuration it has no children and routing stays off.
-module(dspex_cluster_sup).
-behaviour(supervisor).

-export([start_link/0, init/1, config/0, config_of/1]).

-define(POOL, 8).

%% @doc Starts the supervisor.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc The normalised configuration, or `undefined' when none is set.
-spec config() -> map() | undefined | {error, term()}.
config() ->
    case application:get_env(dspex_bridge, cluster) of
        undefined -> undefined;
        {ok, C} -> config_of(C)
    end.

%% @doc The cluster configuration `C' (the application environment's
%% `cluster') with its defaults, or `{error, {invalid_argument, Key}}'.
-spec config_of(term()) -> map() | {error, {invalid_argument, term()}}.
config_of(C) ->
    case is_map(C) of
        true ->
            Nodes = lists:usort(maps:get(nodes, C, [node()])),
            Backend = case maps:get(backend, C, static) of
                          static -> dspex_owner_static;
                          etcd -> dspex_owner_etcd;
                          M -> M
                      end,
            R = maps:get(replicas, C, 1),
            Mode = maps:get(replication, C, sync),
            Read = maps:get(read, C, any),
            Deadline = maps:get(route_deadline_ms, C, 8000),
            RTimeout = maps:get(replica_timeout_ms, C, 5000),
            CacheOk = cache_config(maps:get(cache, C, #{})),
            if
                not is_integer(R) orelse R < 0 -> {error, {invalid_argument, replicas}};
                Mode =/= sync andalso Mode =/= async -> {error, {invalid_argument, replication}};
                Read =/= any andalso Read =/= majority -> {error, {invalid_argument, read}};
                not is_integer(Deadline) orelse Deadline < 1 -> {error, {invalid_argument, route_deadline_ms}};
                not is_integer(RTimeout) orelse RTimeout < 1 -> {error, {invalid_argument, replica_timeout_ms}};
                CacheOk =/= ok -> CacheOk;
                true -> C#{nodes => Nodes, backend => Backend, replicas => R, replication => Mode, read => Read,
                           route_deadline_ms => Deadline, replica_timeout_ms => RTimeout}
            end;
        false -> {error, {invalid_argument, cluster}}
    end.

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    case config() of
        undefined -> {ok, {#{strategy => one_for_all}, []}};
        {error, _} = E -> E;
        #{backend := Backend} = C ->
            %% the sessions table lives as long as this supervisor
            _ = ets:new(dspex_cluster_replica:table(), [named_table, public, set, {read_concurrency, true}]),
            %% sync writes waiting for their replicas (dspex_cluster_shipper)
            _ = ets:new(dspex_cluster_shipper:pending_table(), [named_table, public, set, {write_concurrency, true}]),
            %% changes applied here, not yet confirmed by their replicas (read index)
            _ = ets:new(dspex_cluster_shipper:shipped_table(), [named_table, public, set, {write_concurrency, true}]),
            %% the cache's copies here and the nodes caching this node's sessions (dspex_cache)
            _ = [ets:new(Tab, [named_table, public, Type, {read_concurrency, true}])
                 || {Tab, Type} <- dspex_cache:tables()],
            Pool = fun(Mod) -> [#{id => {Mod, I}, start => {Mod, start_link, [I]}} || I <- lists:seq(0, ?POOL - 1)] end,
            Children = [#{id => pg, start => {pg, start_link, [dspex_cluster]}}]
                ++ Pool(dspex_cluster_replica)
                ++ [#{id => dspex_cluster_receiver, start => {dspex_cluster_receiver, start_link, []}}]
                ++ [#{id => {dspex_cluster_shipper, N}, start => {dspex_cluster_shipper, start_link, [N, maps:get(replica_timeout_ms, C)]}}
                    || N <- maps:get(nodes, C), N =/= node()]
                ++ [#{id => dspex_cache, start => {dspex_cache, start_link, []}}]
                ++ Pool(dspex_cluster_writer)
                ++ [#{id => dspex_cluster_watch, start => {dspex_cluster_watch, start_link, []}}]
                ++ Backend:child_specs(C)
                ++ [#{id => dspex_cluster_keeper, start => {dspex_cluster_keeper, start_link, [C]}}]
                ++ [#{id => dspex_cluster_members, start => {dspex_cluster_members, start_link, [C]}}],
            {ok, {#{strategy => one_for_all, intensity => 5, period => 10}, Children}}
    end.

%% The `cache' map of the configuration (see dspex_cache), with the
%% application environment's `cache_max_bytes'.
cache_config(Cache) when is_map(Cache) ->
    Mode = maps:get(mode, Cache, owner),
    Stale = maps:get(max_staleness_ms, Cache, 100),
    Strong = maps:get(strong, Cache, false),
    ValueMax = maps:get(value_max_bytes, Cache, 1024),
    Limit = dspex_cache:max_staleness_limit(),
    if
        Mode =/= owner, Mode =/= cached, Mode =/= strong -> {error, {invalid_argument, {cache, mode}}};
        not is_boolean(Strong) -> {error, {invalid_argument, {cache, strong}}};
        not is_integer(Stale) orelse Stale < 0 orelse Stale > Limit ->
            {error, {invalid_argument, {cache, max_staleness_ms}}};
        not is_integer(ValueMax) orelse ValueMax < 0 -> {error, {invalid_argument, {cache, value_max_bytes}}};
        true ->
            case dspex_cache:max_bytes_config(Cache) of
                {ok, _} -> ok;
                {error, _} = E -> E
            end
    end;
cache_config(_) -> {error, {invalid_argument, cache}}.
