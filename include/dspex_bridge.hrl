%% Public header of dspex_bridge: what a user process may receive from the
%% bridge, and the names of the telemetry events it emits.
%%
%%   -include_lib("dspex_bridge/include/dspex_bridge.hrl").
%%
%% Messages are declared as records. An Erlang record is a tuple whose first
%% element is the record's name, so `#dspex_variable{}' IS the message
%% `{dspex_variable, Ref, Session, Name, OldValue, NewValue, Meta}': match it
%% either way. From Elixir:
%%
%%   require Record
%%   Record.defrecord(:dspex_variable,
%%     Record.extract(:dspex_variable, from_lib: "dspex_bridge/include/dspex_bridge.hrl"))
%%
%% Telemetry event names are macros; `?DSPEX_EVENTS' lists every event the
%% bridge emits (for `dspex_telemetry:attach_many/4' or `telemetry'), and a
%% test checks that every event built in src/ is in it.
-ifndef(DSPEX_BRIDGE_HRL).
-define(DSPEX_BRIDGE_HRL, true).

%%% Messages ------------------------------------------------------------------

%% `dspex_store:watch/3,4': one per commit of a watched variable, in commit
%% order. `meta' has `version', `previous_version', `updated_at' (µs since the
%% Unix epoch), `changed_by' and `metadata'.
-record(dspex_variable, {ref :: reference(),
                         session :: binary(),
                         name :: binary(),
                         old_value :: term(),
                         new_value :: term(),
                         meta :: map()}).

%% With a cluster: the watch `ref' is over (its session moved, or its owner
%% went away); watch again and read the variables for changes in between.
-record(dspex_watch_lost, {ref :: reference(), session :: binary()}).

%% `dspex_locks': the holder's lock on `variable' was taken by an optimizer
%% of higher priority (`conflict => preempt'); `token' is the holder's.
-record(dspex_preempted, {session :: binary(), variable :: binary(), token :: integer()}).

%% `dspex_locks': the holder's lease ran out before `dspex_locks:renew/1'.
-record(dspex_lock_expired, {session :: binary(), variable :: binary(), token :: integer()}).

%% `dspex_locks': the holder's lock went with its variable or session;
%% `reason' is `variable_deleted', `session_deleted' or `session_expired'.
-record(dspex_lock_lost, {session :: binary(), variable :: binary(), token :: integer(),
                          reason :: variable_deleted | session_deleted | session_expired}).

%%% Telemetry events (see the README's table for measurements and metadata) ---

%% Op: register | get | get_value | get_many | set | batch | delete | rollback | watch
-define(DSPEX_STORE_STOP(Op), [dspex, store, Op, stop]).
%% Op: add_dependency | remove_dependency
-define(DSPEX_GRAPH_STOP(Op), [dspex, graph, Op, stop]).
-define(DSPEX_PROPAGATION_STOP, [dspex, graph, propagation, stop]).
-define(DSPEX_PROPAGATION_ERROR, [dspex, graph, propagation, error]).
-define(DSPEX_PROPAGATION_TIMEOUT, [dspex, graph, propagation, timeout]).
%% Ev: acquired | released | waited | preempted | expired | progress
-define(DSPEX_LOCKS(Ev), [dspex, locks, Ev]).
-define(DSPEX_ACL_CHECK, [dspex, acl, check]).
-define(DSPEX_ACL_DENIED, [dspex, acl, denied]).
-define(DSPEX_ACL_PERMISSIONS_CHANGED, [dspex, acl, permissions_changed]).
-define(DSPEX_RATE_LIMIT_EXCEEDED, [dspex, rate_limit, exceeded]).
-define(DSPEX_BREAKER_STATE_CHANGE, [dspex, breaker, state_change]).
%% Op: call | melt | reset | install
-define(DSPEX_BREAKER_STOP(Op), [dspex, breaker, Op, stop]).
%% Op: call | start_pool | stop_pool
-define(DSPEX_WORKERS_STOP(Op), [dspex, workers, Op, stop]).
%% Ev: start | exit | restart
-define(DSPEX_WORKER(Ev), [dspex, workers, worker, Ev]).
-define(DSPEX_RETRY_STOP, [dspex, retry, run, stop]).
-define(DSPEX_CLUSTER_WRITE_STOP, [dspex, cluster, write, stop]).
-define(DSPEX_CLUSTER_WATCH_LOST, [dspex, cluster, watch, lost]).
-define(DSPEX_CLUSTER_TAKEOVER_STOP, [dspex, cluster, takeover, stop]).
%% spans: Prefix ++ [start | stop | exception]
-define(DSPEX_CLUSTER_MIGRATE, [dspex, cluster, migrate]).
-define(DSPEX_CLUSTER_DRAIN, [dspex, cluster, drain]).
-define(DSPEX_CLUSTER_UNDRAIN_STOP, [dspex, cluster, undrain, stop]).
-define(DSPEX_CLUSTER_VIEW_CHANGE, [dspex, cluster, view, change]).
-define(DSPEX_CLUSTER_LEASE_LOST, [dspex, cluster, lease, lost]).
-define(DSPEX_CLUSTER_ROUTE_RETRY, [dspex, cluster, route, retry]).
%% a batch of sync replication records answered by a replica node (dspex_cluster_shipper)
-define(DSPEX_CLUSTER_BATCH_STOP, [dspex, cluster, batch, stop]).
%% Ev: waiting (tombstones kept while configured nodes are away) | removed
%% (a reaper ended), dspex_cluster_keeper
-define(DSPEX_CLUSTER_TOMBSTONES(Ev), [dspex, cluster, tombstones, Ev]).
%% Ev: hit | miss | stale | fill | evict | conflict (dspex_cache)
-define(DSPEX_CACHE(Ev), [dspex, cache, Ev]).
%% Ev: sent (by an owner, count = nodes) | received (delay_ns: owner commit to drop here)
-define(DSPEX_CACHE_INVALIDATION(Ev), [dspex, cache, invalidation, Ev]).
-define(DSPEX_GRPC_RPC_STOP, [dspex, grpc, rpc, stop]).
-define(DSPEX_GRPC_CANCELLED, [dspex, grpc, cancelled]).
-define(DSPEX_GRPC_OVERLOAD, [dspex, grpc, overload]).
%% Ev: start | exit | give_up
-define(DSPEX_GRPC_PORT(Ev), [dspex, grpc, port, Ev]).
%% Ev: written (a batch reached the backend) | error (the backend refused it)
-define(DSPEX_EVENTS_LOG(Ev), [dspex, events, Ev]).
%% Ev: register | archive | alias | start (an A/B test) | decision
-define(DSPEX_MODELS(Ev), [dspex, models, Ev]).
%% Ev: step | complete | rollback
-define(DSPEX_MODELS_ROLLOUT(Ev), [dspex, models, rollout, Ev]).
%% Ev: start | ask | tell | stop (dspex_opt runs)
-define(DSPEX_OPT(Ev), [dspex, opt, Ev]).
%% Ev: up | down (a link to a peer region, dspex_region_link)
-define(DSPEX_REGION_LINK(Ev), [dspex, region, link, Ev]).
%% one measured RTT probe on a link to a peer region (measurement rtt_us)
-define(DSPEX_REGION_PROBE, [dspex, region, probe]).
%% a session routed to a region (dspex_region:route_session/2)
-define(DSPEX_REGION_ROUTE, [dspex, region, route]).
%% Ev: batch (a batch of changes shipped to a backup region: records, bytes)
%% | ack (a backup region acknowledged a batch: records; need_full in metadata)
%% | fenced (a backup refused a change of a primary the session was moved from)
-define(DSPEX_REGION_REPLICATION(Ev), [dspex, region, replication, Ev]).

%% Every event above, each operation spelt out.
-define(DSPEX_EVENTS,
        [?DSPEX_STORE_STOP(Op__) || Op__ <- [register, get, get_value, get_many, set, batch,
                                             delete, rollback, watch]]
        ++ [?DSPEX_GRAPH_STOP(add_dependency), ?DSPEX_GRAPH_STOP(remove_dependency),
            ?DSPEX_PROPAGATION_STOP, ?DSPEX_PROPAGATION_ERROR, ?DSPEX_PROPAGATION_TIMEOUT]
        ++ [?DSPEX_LOCKS(Ev__) || Ev__ <- [acquired, released, waited, preempted, expired, progress]]
        ++ [?DSPEX_ACL_CHECK, ?DSPEX_ACL_DENIED, ?DSPEX_ACL_PERMISSIONS_CHANGED,
            ?DSPEX_RATE_LIMIT_EXCEEDED, ?DSPEX_BREAKER_STATE_CHANGE]
        ++ [?DSPEX_BREAKER_STOP(Op__) || Op__ <- [call, melt, reset, install]]
        ++ [?DSPEX_WORKERS_STOP(Op__) || Op__ <- [call, start_pool, stop_pool]]
        ++ [?DSPEX_WORKER(start), ?DSPEX_WORKER(exit), ?DSPEX_WORKER(restart), ?DSPEX_RETRY_STOP,
            ?DSPEX_CLUSTER_WRITE_STOP, ?DSPEX_CLUSTER_WATCH_LOST, ?DSPEX_CLUSTER_TAKEOVER_STOP]
        ++ [Span__ ++ [Ev__] || Span__ <- [?DSPEX_CLUSTER_MIGRATE, ?DSPEX_CLUSTER_DRAIN],
                                Ev__ <- [start, stop, exception]]
        ++ [?DSPEX_CLUSTER_UNDRAIN_STOP, ?DSPEX_CLUSTER_VIEW_CHANGE, ?DSPEX_CLUSTER_LEASE_LOST,
            ?DSPEX_CLUSTER_ROUTE_RETRY, ?DSPEX_CLUSTER_BATCH_STOP,
            ?DSPEX_CLUSTER_TOMBSTONES(waiting), ?DSPEX_CLUSTER_TOMBSTONES(removed),
            ?DSPEX_GRPC_RPC_STOP, ?DSPEX_GRPC_CANCELLED, ?DSPEX_GRPC_OVERLOAD,
            ?DSPEX_GRPC_PORT(start), ?DSPEX_GRPC_PORT(exit), ?DSPEX_GRPC_PORT(give_up),
            ?DSPEX_EVENTS_LOG(written), ?DSPEX_EVENTS_LOG(error)]
        ++ [?DSPEX_CACHE(Ev__) || Ev__ <- [hit, miss, stale, fill, evict, conflict]]
        ++ [?DSPEX_CACHE_INVALIDATION(sent), ?DSPEX_CACHE_INVALIDATION(received)]
        ++ [?DSPEX_MODELS(Ev__) || Ev__ <- [register, archive, alias, start, decision]]
        ++ [?DSPEX_MODELS_ROLLOUT(Ev__) || Ev__ <- [step, complete, rollback]]
        ++ [?DSPEX_OPT(Ev__) || Ev__ <- [start, ask, tell, stop]]
        ++ [?DSPEX_REGION_LINK(up), ?DSPEX_REGION_LINK(down), ?DSPEX_REGION_PROBE, ?DSPEX_REGION_ROUTE,
            ?DSPEX_REGION_REPLICATION(batch), ?DSPEX_REGION_REPLICATION(ack),
            ?DSPEX_REGION_REPLICATION(fenced)]).

-endif.
