%% @doc Cluster membership: which configured nodes are live, which are draining,
%% which sessions are pinned to a node, and the resulting view.
%%
%% Discovery is an OTP `pg' scope (`dspex_cluster'): every node running the
%% cluster joins the group `members', and `pg:monitor_scope/1' reports joins
%% and leaves; `net_kernel:monitor_nodes/1' reports connections. A node is live
%% when it is in the configured list and has a member in the group. The view is
%% published in `persistent_term' (changes are rare; readers never call this
%% server) and carries a generation number that grows on every change, so
%% owners notice that they must re-establish ownership.
-module(dspex_cluster_members).
-behaviour(gen_server).

-export([start_link/1, view/0, published_view/0, set_draining/2, set_override/2, config/0, bump/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(SCOPE, dspex_cluster).
-define(VIEW, {dspex_cluster, view}).
-define(RECONNECT_MS, 300).

-type view() :: #{gen := pos_integer(), nodes := [node()], live := [node()], eligible := [node()],
                  draining := [node()], overrides := #{binary() => node()}, quorum := boolean(),
                  replicas := non_neg_integer(), replication := sync | async, backend := module(),
                  read := any | majority, route_deadline_ms := pos_integer()}.
-export_type([view/0]).

%% @doc Starts the membership server with the normalised cluster configuration.
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(Config) -> gen_server:start_link({local, ?MODULE}, ?MODULE, Config, []).

%% @doc The current view (no server call).
-spec view() -> view().
view() -> persistent_term:get(?VIEW).

%% @doc The current view, or `undefined' while this node's membership server
%% has not published one yet (it starts after the writers and replicas, which
%% other nodes may already be calling).
-spec published_view() -> view() | undefined.
published_view() -> persistent_term:get(?VIEW, undefined).

%% @doc The configuration the cluster was started with.
-spec config() -> map().
config() -> gen_server:call(?MODULE, config).

%% @doc Marks `Node' as draining (owns nothing, replicates nothing) or not, on this node.
-spec set_draining(node(), boolean()) -> ok.
set_draining(Node, Flag) -> gen_server:call(?MODULE, {draining, Node, Flag}).

%% @doc Pins `Session' to `Node' (`undefined' unpins), on this node.
-spec set_override(binary(), node() | undefined) -> ok.
set_override(Session, Node) -> gen_server:call(?MODULE, {override, Session, Node}).

%% @doc Publishes a new view generation (the ownership backend lost its
%% standing, e.g. an etcd lease): every owner re-establishes ownership.
-spec bump() -> ok.
bump() -> gen_server:call(?MODULE, bump).

%%% server ----------------------------------------------------------------------

-spec init(map()) -> {ok, map()}.
init(Config) ->
    process_flag(trap_exit, true),
    ok = pg:join(?SCOPE, members, self()),
    {Ref, Groups} = pg:monitor_scope(?SCOPE),
    ok = net_kernel:monitor_nodes(true),
    Pids = maps:get(members, Groups, []),
    St = #{config => Config, ref => Ref, pids => Pids, draining => [], overrides => #{}, gen => 0},
    erlang:send_after(?RECONNECT_MS, self(), reconnect),
    [Node =/= node() andalso net_kernel:connect_node(Node) || Node <- maps:get(nodes, Config)],
    St1 = publish(St),
    persistent_term:put(dspex_cluster_routing, true),
    ok = dspex_store:refresh_fast_path(),
    {ok, St1}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(config, _From, #{config := C} = St) ->
    {reply, C, St};
handle_call(bump, _From, St) ->
    {reply, ok, publish(St, true)};
handle_call({draining, Node, Flag}, _From, #{draining := D} = St) ->
    D1 = case Flag of
             true -> lists:usort([Node | D]);
             false -> lists:delete(Node, D)
         end,
    {reply, ok, publish(St#{draining := D1})};
handle_call({override, S, undefined}, _From, #{overrides := O} = St) ->
    {reply, ok, publish(St#{overrides := maps:remove(S, O)})};
handle_call({override, S, Node}, _From, #{overrides := O} = St) ->
    {reply, ok, publish(St#{overrides := O#{S => Node}})}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({state_from_peer, D, O}, #{draining := D0, overrides := O0} = St) ->
    %% a node that comes back learns drains and pins made while it was away
    {noreply, publish(St#{draining := lists:usort(D0 ++ D), overrides := maps:merge(O, O0)})};
handle_cast(_, St) ->
    {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({Ref, join, members, New}, #{ref := Ref, pids := P, draining := D, overrides := O} = St) ->
    [gen_server:cast(Pid, {state_from_peer, D, O}) || Pid <- New, node(Pid) =/= node()],
    {noreply, publish(St#{pids := lists:usort(P ++ New)})};
handle_info({Ref, leave, members, Gone}, #{ref := Ref, pids := P} = St) ->
    {noreply, publish(St#{pids := P -- Gone})};
handle_info({Ref, _, _, _}, #{ref := Ref} = St) ->
    {noreply, St};
handle_info({nodedown, Node}, #{pids := P} = St) ->
    %% pg reports the leave too; dropping the node here at once shortens failover
    {noreply, publish(St#{pids := [Pid || Pid <- P, node(Pid) =/= Node]})};
handle_info({nodeup, _}, St) ->
    {noreply, St};
handle_info(reconnect, #{config := #{nodes := Nodes}} = St) ->
    Connected = nodes(),
    [spawn(net_kernel, connect_node, [N]) || N <- Nodes, N =/= node(), not lists:member(N, Connected)],
    erlang:send_after(?RECONNECT_MS, self(), reconnect),
    {noreply, St};
handle_info(_, St) ->
    {noreply, St}.

-spec terminate(term(), map()) -> ok.
terminate(_, _) ->
    persistent_term:put(dspex_cluster_routing, false),
    ok = dspex_store:refresh_fast_path(),
    ok.

publish(St) -> publish(St, false).

publish(#{config := C, pids := P, draining := D, overrides := O, gen := G} = St, Force) ->
    Nodes = maps:get(nodes, C),
    Up = lists:usort([node() | [node(Pid) || Pid <- P]]),
    Live = [N || N <- Nodes, lists:member(N, Up)],
    Backend = maps:get(backend, C),
    V0 = #{gen => G + 1, nodes => Nodes, live => Live, eligible => Live -- D, draining => D,
           overrides => O, replicas => maps:get(replicas, C), replication => maps:get(replication, C),
           backend => Backend, read => maps:get(read, C, any),
           route_deadline_ms => maps:get(route_deadline_ms, C, 8000)},
    Old = persistent_term:get(?VIEW, undefined),
    V = V0#{quorum => Backend:quorum(V0)},
    case not Force andalso Old =/= undefined andalso maps:remove(gen, Old) =:= maps:remove(gen, V) of
        true -> St;
        false ->
            persistent_term:put(?VIEW, V),
            %% cached copies (dspex_cache) answer only under the view they were filled in
            _ = dspex_nif:cache_gen(bump),
            %% nodes joined (a partition healed, a node came back): settle the
            %% ownership of the sessions this node believes it owns now, not on
            %% their next access (see dspex_cluster_keeper)
            case Old =/= undefined andalso Live -- maps:get(live, Old) of
                [_ | _] -> gen_server:cast(dspex_cluster_keeper, reconcile);
                _ -> ok
            end,
            dspex_telemetry:execute([dspex, cluster, view, change], #{count => length(Live)},
                                    #{gen => G + 1, live => Live, draining => D, quorum => maps:get(quorum, V)}),
            St#{gen := G + 1}
    end.
