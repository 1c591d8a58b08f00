%% @private
%% @doc The supervision tree of the application. Two supervisors live in
%% this module: the top one (`dspex_bridge_sup') and the core services
%% (`dspex_core_sup').
%%
%% ```
%% dspex_bridge_sup          rest_for_one: a restart restarts what was started after it
%% ├── dspex_core_sup        one_for_one: services that do not depend on each other
%% │   ├── dspex_events           the event log (first: it records what the others cause)
%% │   ├── dspex_metrics_server   analytics handlers, series table
%% │   ├── dspex_acl_audit        audit table; receives the NIF's denials
%% │   ├── dspex_session_sweeper  TTL sweeps, memory reclamation
%% │   ├── dspex_locks            optimizer locks (rebuilt from the NIF on restart)
%% │   ├── dspex_breaker_server   breaker and retry tables
%% │   ├── dspex_workers_sup      Python worker pools
%% │   ├── dspex_propagator_sup   per-session propagators, derive functions
%% │   ├── dspex_opt_sup          optimization runs (dspex_opt), temporary children
%% │   ├── dspex_prometheus       /metrics endpoint
%% │   └── dspex_console          debug console (web page, /api/)
%% ├── dspex_cluster_sup     routing, ownership, replication, watch relays
%% ├── dspex_region_sup      region gateway, links to peer regions, session routing
%% ├── dspex_models_server   model experiments and rollouts (after the cluster: their registry is a session)
%% └── dspex_grpc_sup        the gRPC port and its handlers (last: the front door)
%% '''
%%
%% Why this shape. The variable store has no owner process: its tables live
%% in the NIF, so no process restart loses them and nothing has to restart
%% "with the store". What other processes hold is their own: each core
%% service keeps state only in the NIF or in a table it owns, and none holds
%% state derived from another's, so a crash of one restarts that one alone (a
%% restart of the propagator supervisor would lose every derive function, so
%% nothing else may drag it down). The cluster routes calls to the services
%% of the owner node, feeds the propagators with the derive functions it
%% replicates and holds the watch relays of remote watchers: it starts after
%% the core and restarts with it. The gRPC side calls everything above, and
%% its watch streams hang on the cluster's relays: it starts last, stops
%% first (no call is accepted while the services behind it stop), and
%% restarts whenever the cluster or the core restarts, which ends its streams
%% and in-flight calls `UNAVAILABLE' so clients retry against the new state.
-module(dspex_bridge_sup).
-behaviour(supervisor).
-export([start_link/0, start_link/1, init/1]).

%% @doc Starts the top supervisor, registered as `dspex_bridge_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, top).

%% @doc Starts the core services' supervisor, registered as `dspex_core_sup'.
-spec start_link(core) -> {ok, pid()} | {error, term()}.
start_link(core) -> supervisor:start_link({local, dspex_core_sup}, ?MODULE, core).

-spec init(top | core) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init(top) ->
    %% tables that must outlive a crash of any child are owned by this process:
    %% the metric series (dspex_metrics_server) and the tools exposed to Python
    ok = dspex_metrics_server:new_table(),
    ok = dspex_tools:new_table(),
    %% the optimizer registry (plugins, performance records) likewise
    ok = dspex_opt_registry:new_tables(),
    Children = [#{id => dspex_core_sup, type => supervisor, shutdown => infinity,
                  start => {?MODULE, start_link, [core]}},
                #{id => dspex_cluster_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_cluster_sup, start_link, []}},
                %% multi-region: gateway, links to the peer regions, routing (off without `region')
                #{id => dspex_region_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_region_sup, start_link, []}},
                %% model experiments and rollouts (their registry is a replicated store session)
                #{id => dspex_models_server, start => {dspex_models_server, start_link, []}}]
        ++ [#{id => dspex_grpc_sup, type => supervisor, shutdown => infinity,
              start => {dspex_grpc_sup, start_link, []}}
            || application:get_env(dspex_bridge, grpc_enabled, true)],
    {ok, {#{strategy => rest_for_one, intensity => 5, period => 10}, Children}};
init(core) ->
    Interval = application:get_env(dspex_bridge, sweep_interval_ms, 1000),
    %% the event log first: it records every change the other children cause
    Children = [#{id => dspex_events, start => {dspex_events, start_link, []}, shutdown => 30000}
                || application:get_env(dspex_bridge, event_log, true)]
        ++ [#{id => dspex_metrics_server, start => {dspex_metrics_server, start_link, []}},
                #{id => dspex_acl_audit, start => {dspex_acl_audit, start_link, []}},
                #{id => dspex_session_sweeper,
                  start => {dspex_session_sweeper, start_link, [Interval]}},
                #{id => dspex_locks, start => {dspex_locks, start_link, []}},
                #{id => dspex_breaker_server, start => {dspex_breaker_server, start_link, []}},
                #{id => dspex_workers_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_workers_sup, start_link, []}},
                #{id => dspex_propagator_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_propagator_sup, start_link, []}},
                #{id => dspex_opt_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_opt_sup, start_link, []}},
                #{id => dspex_prometheus, start => {dspex_prometheus, start_link, []}},
                #{id => dspex_console, start => {dspex_console, start_link, []}}],
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Children}}.
