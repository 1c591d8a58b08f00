%% @private
-module(dspex_bridge_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% the metric series outlive a crash of dspex_metrics_server: this process owns their table
    ok = dspex_metrics_server:new_table(),
    %% tools exposed to Python outlive a crash of any child: this process owns their table
    ok = dspex_tools:new_table(),
    %% the optimizer registry (plugins, performance records) likewise
    ok = dspex_opt_registry:new_tables(),
    Interval = application:get_env(dspex_bridge, sweep_interval_ms, 1000),
    Children = [#{id => dspex_acl_audit, start => {dspex_acl_audit, start_link, []}},
                #{id => dspex_session_sweeper,
                  start => {dspex_session_sweeper, start_link, [Interval]}},
                #{id => dspex_locks, start => {dspex_locks, start_link, []}},
                #{id => dspex_breaker_server, start => {dspex_breaker_server, start_link, []}},
                #{id => dspex_workers_sup, type => supervisor, shutdown => infinity,
                  start => {dspex_workers_sup, start_link, []}},
                #{id => dspex_propagator_sup, type => supervisor,
                  start => {dspex_propagator_sup, start_link, []}},
                #{id => dspex_metrics_server, start => {dspex_metrics_server, start_link, []}},
                #{id => dspex_prometheus, start => {dspex_prometheus, start_link, []}},
                #{id => dspex_cluster_sup, type => supervisor,
                  start => {dspex_cluster_sup, start_link, []}}]
        ++ [#{id => dspex_grpc_sup, type => supervisor, start => {dspex_grpc_sup, start_link, []}}
            || application:get_env(dspex_bridge, grpc_enabled, true)],
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Children}}.
