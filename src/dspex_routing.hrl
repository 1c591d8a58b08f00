%% Cluster routing (see `dspex_cluster'): with no cluster configured (the
%% default) this is one persistent_term read and the call runs here as before;
%% otherwise `Op' of this module runs where the session lives.
-define(ROUTED(Session, Op, Args, Local),
        case persistent_term:get(dspex_cluster_routing, false) of
            false -> Local;
            true -> dspex_cluster:route(Session, {?MODULE, Op}, Args, fun() -> Local end)
        end).
