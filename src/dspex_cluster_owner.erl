%% @doc The ownership behaviour: who may own sessions, and the epoch an owner
%% holds. `dspex_owner_static' (default) decides by a majority of the
%% configured node list; `dspex_owner_etcd' by leases in an etcd cluster.
%%
%% `quorum/1' is asked on every view change and must not block; `claim/3' is
%% asked when a node takes ownership of a session and returns the epoch, which
%% must be greater than every epoch the session had before (`Proposed' is the
%% highest the live members know plus one), or `{error, {held_by, Node}}'
%% when another node holds the session (it is then asked to let it go).
-module(dspex_cluster_owner).

-callback child_specs(Config :: map()) -> [supervisor:child_spec()].
-callback quorum(dspex_cluster_members:view()) -> boolean().
-callback claim(Session :: binary(), Proposed :: pos_integer(), dspex_cluster_members:view()) ->
    {ok, pos_integer()} | {error, term()}.
-callback release(Session :: binary()) -> ok.
