%% Test helper: the running application's cluster supervisor restarted as a
%% one-node cluster (this node, not distributed, `replicas => 0'), for EUnit
%% modules that need the cluster layer without peer nodes.
-module(dspex_one_node_cluster).
-export([with/2, restart/0, wait_until/2]).

%% @doc Runs F with the cluster configuration `Extra' merged into a one-node
%% one, once routing is on and the membership server published its first
%% view; the cluster supervisor is restarted without a cluster afterwards.
-spec with(map(), fun(() -> T)) -> T.
with(Extra, F) ->
    application:set_env(dspex_bridge, cluster, Extra#{nodes => [node()], replicas => 0}),
    try
        restart(),
        true = persistent_term:get(dspex_cluster_routing, false),
        ok = wait_until(fun() -> dspex_cluster_members:published_view() =/= undefined end, 5000),
        F()
    after
        application:unset_env(dspex_bridge, cluster),
        restart()
    end.

%% @doc Restarts the cluster supervisor under the application's (with the
%% current `cluster' environment).
-spec restart() -> ok.
restart() ->
    ok = supervisor:terminate_child(dspex_bridge_sup, dspex_cluster_sup),
    {ok, _} = supervisor:restart_child(dspex_bridge_sup, dspex_cluster_sup),
    ok.

%% @doc `ok' once F() is true (polled every 5 ms), `timeout' if it is not
%% within TimeoutMs.
-spec wait_until(fun(() -> boolean()), non_neg_integer()) -> ok | timeout.
wait_until(F, TimeoutMs) -> wait_loop(F, erlang:monotonic_time(millisecond) + TimeoutMs).

wait_loop(F, Deadline) ->
    case F() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) < Deadline of
                true -> receive after 5 -> ok end, wait_loop(F, Deadline);
                false -> timeout
            end
    end.
