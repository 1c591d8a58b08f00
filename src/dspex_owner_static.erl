%% @doc Static ownership backend (the default): a node may own sessions while
%% it sees a strict majority of the configured node list (itself included);
%% the epoch of a takeover is one more than the highest any live member knows.
%% Owners are fenced by the replicas (an apply from a lower epoch is refused),
%% so two nodes cannot both acknowledge writes while the majority rule holds;
%% it is not a consensus protocol: see the README for what `etcd' adds.
-module(dspex_owner_static).
-behaviour(dspex_cluster_owner).

-export([child_specs/1, quorum/1, claim/3, release/1]).

%% @doc No processes.
-spec child_specs(map()) -> [supervisor:child_spec()].
child_specs(_) -> [].

%% @doc A strict majority of the configured nodes is live.
-spec quorum(dspex_cluster_members:view()) -> boolean().
quorum(#{nodes := Nodes, live := Live}) -> 2 * length(Live) > length(Nodes).

%% @doc The proposed epoch, if this node still has a quorum.
-spec claim(binary(), pos_integer(), dspex_cluster_members:view()) -> {ok, pos_integer()} | {error, no_quorum}.
claim(_Session, Proposed, View) ->
    case quorum(View) of
        true -> {ok, Proposed};
        false -> {error, no_quorum}
    end.

%% @doc Nothing to release.
-spec release(binary()) -> ok.
release(_) -> ok.
