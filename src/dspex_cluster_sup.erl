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
%% the keys of the configuration (see dspex_cluster's module doc and the README)
-define(KEYS, [nodes, replicas, replication, backend, keepalive_ms, read, route_deadline_ms,
               replica_timeout_ms, etcd, cache]).
-define(MAX_MS, 4294967295).

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
%% `cluster') with its defaults, or `{error, {invalid_argument, Key}}' (the
%% cluster does not start): every key is checked here, so that a bad value
%% is this error at start rather than a crash in the process that first uses
%% it, or a cluster that starts and refuses every write (`nodes' without this
%% node); a key this module does not know is `{invalid_argument, {unknown_key,
%% Key}}' (a typo such as `replicaz' would otherwise be ignored silently).
-spec config_of(term()) -> map() | {error, {invalid_argument, term()}}.
config_of(C) when is_map(C) ->
    case [K || K <- maps:keys(C), not lists:member(K, ?KEYS)] of
        [] -> checked(C);
        [K | _] -> {error, {invalid_argument, {unknown_key, K}}}
    end;
config_of(_) -> {error, {invalid_argument, cluster}}.

checked(C) ->
    Nodes0 = maps:get(nodes, C, [node()]),
    Backend = case maps:get(backend, C, static) of
                  static -> dspex_owner_static;
                  etcd -> dspex_owner_etcd;
                  M -> M
              end,
    R = maps:get(replicas, C, 1),
    Mode = maps:get(replication, C, sync),
    Read = maps:get(read, C, any),
    Keepalive = maps:get(keepalive_ms, C, 5000),
    Deadline = maps:get(route_deadline_ms, C, 8000),
    RTimeout = maps:get(replica_timeout_ms, C, 5000),
    Etcd = maps:get(etcd, C, #{}),
    CacheOk = cache_config(maps:get(cache, C, #{})),
    if
        %% this node among them: a node outside its own list never counts
        %% itself live, so it would have no quorum and refuse every write
        not is_list(Nodes0) orelse Nodes0 =:= [] -> {error, {invalid_argument, nodes}};
        true ->
            case atoms(Nodes0) andalso lists:member(node(), Nodes0) of
                false -> {error, {invalid_argument, nodes}};
                true when not is_integer(R) orelse R < 0 -> {error, {invalid_argument, replicas}};
                true when Mode =/= sync, Mode =/= async -> {error, {invalid_argument, replication}};
                true when Read =/= any, Read =/= majority -> {error, {invalid_argument, read}};
                true ->
                    case backend_ok(Backend) of
                        false -> {error, {invalid_argument, backend}};
                        %% erlang:send_after/3 takes at most 2^32 - 1 ms
                        true when not is_integer(Keepalive) orelse Keepalive < 1 orelse Keepalive > ?MAX_MS ->
                            {error, {invalid_argument, keepalive_ms}};
                        true when not is_integer(Deadline) orelse Deadline < 1 ->
                            {error, {invalid_argument, route_deadline_ms}};
                        true when not is_integer(RTimeout) orelse RTimeout < 1 ->
                            {error, {invalid_argument, replica_timeout_ms}};
                        true when not is_map(Etcd) ->
                            {error, {invalid_argument, etcd}};
                        true when CacheOk =/= ok -> CacheOk;
                        true ->
                            C#{nodes => lists:usort(Nodes0), backend => Backend, replicas => R,
                               replication => Mode, read => Read, keepalive_ms => Keepalive,
                               route_deadline_ms => Deadline, replica_timeout_ms => RTimeout}
                    end
            end
    end.

%% A proper list of atoms.
atoms([N | T]) when is_atom(N) -> atoms(T);
atoms(L) -> L =:= [].

%% `static', `etcd', or a loadable module implementing the
%% dspex_cluster_owner behaviour (the supervisor calls its child_specs/1).
backend_ok(M) when is_atom(M) ->
    case code:ensure_loaded(M) of
        {module, M} ->
            lists:all(fun({F, A}) -> erlang:function_exported(M, F, A) end,
                      [{child_specs, 1}, {quorum, 1}, {claim, 3}, {release, 1}]);
        _ -> false
    end;
backend_ok(_) -> false.

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
