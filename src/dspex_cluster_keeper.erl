%% @doc Keeps replica copies in step with their owner's session lifetime.
%%
%% Reads refresh a session's TTL only on its owner, and the sweeper runs on
%% every node. Every `keepalive_ms' (default 5000) this process touches, on
%% the replicas, every session this node owns; and for every owned session the
%% owner no longer holds (expired by the sweeper) it asks the session's writer
%% to replicate the deletion, in order with the session's writes.
%%
%% When nodes join the view (a partition healed, a node came back) the
%% membership server casts `reconcile': every session this node believes it
%% owns is then re-established under the new view by its owner under that view
%% (`dspex_cluster_writer' `{reconcile, S, 0}'): this node's writer (a takeover
%% that fences the other members and installs the newest copy), or the new
%% owner's, whose takeover fences this node. So after a heal no session stays
%% listed by `dspex_cluster:owned_sessions/0' on two nodes until its next
%% access: the side that owned it during the partition and the side that
%% owned it before both hand it to its one owner.
%%
%% Deleted sessions leave no rows. A session this node owned and deleted
%% (`dspex_store:delete_session/1' through its writer, then the next tick's
%% step above, or expired: its row says `expired' at `{Epoch, Seq}', the
%% replicated deletion's) is a tombstone until every configured node has
%% acknowledged the deletion; then its rows go on every node. On each tick,
%% when every configured node is live, a process of its own (one at a time)
%% takes up to 10000 tombstones whose deletion is resolved (no change of the
%% session still waits for its replicas) and:
%% <ol>
%% <li>has every other configured node bury them
%% (`dspex_cluster_replica:bury/2': a node that knows no newer epoch of the
%% session drops any copy it holds, such as the old copy of a node that was
%% cut off during the deletion, and keeps a tombstone row); a session is
%% buried when every node answered that it was;</li>
%% <li>has every other node forget the buried ones
%% (`dspex_cluster_replica:forget/1': each row still that tombstone, and
%% what else keys on the session, goes), then forgets them here, last, and
%% only those every other node forgot: a tombstone left anywhere stays here
%% too, and the next tick tries again; the backend's hold of each forgotten
%% session is released (`etcd': its owner key).</li>
%% </ol>
%% A deletion whose owner died before removing its tombstones leaves them on
%% the other nodes, with no owner to remove them: when nodes join the view,
%% and on each tick while every configured node is live (in the reaper's
%% process), each node has the sessions it holds such a tombstone of, whose
%% owner is back without a row of them, settled by their owner under the view
%% (a takeover: the deletion, newest, wins), which then removes them as above.
%%
%% `[dspex, cluster, tombstones, waiting]' (`count'; `missing', the nodes
%% away) is emitted on a tick that finds tombstones it cannot remove yet, and
%% `[dspex, cluster, tombstones, removed]' (`count', `kept') when a reaper ends.
%%
%% Why no resurrection: a session comes back only from a copy, and when the
%% last tombstone goes no node holds one (each configured node dropped its
%% copy in step 1; a node that restarts comes back empty); a change still in
%% flight from before is refused by a node without a row (`need_full', see
%% `dspex_cluster_replica'), and a takeover that began meanwhile writes its
%% rows first, which keeps them (the id's next epoch).
-module(dspex_cluster_keeper).
-behaviour(gen_server).

-export([start_link/1, touch_local/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% tombstones one reaper takes
-define(REAP_MAX, 10000).
%% a replica pool process answers within 4 s; eight of them per node
-define(REAP_TIMEOUT, 40000).

%% @doc Starts the keeper with the cluster configuration.
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(Config) -> gen_server:start_link({local, ?MODULE}, ?MODULE, Config, []).

%% @doc Refreshes the TTL of the local copies of `Sessions' (on a replica).
-spec touch_local([binary()]) -> ok.
touch_local(Sessions) ->
    [_ = dspex_nif:session_touch(S) || S <- Sessions],
    ok.

-type state() :: #{ms := pos_integer(), reaper := pid() | undefined}.

-spec init(map()) -> {ok, state()}.
init(Config) ->
    Ms = maps:get(keepalive_ms, Config, 5000),
    erlang:send_after(Ms, self(), tick),
    {ok, #{ms => Ms, reaper => undefined}}.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, {error, unknown_call}, state()}.
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(reconcile, St) ->
    V = dspex_cluster_members:view(),
    [gen_server:cast({dspex_cluster_writer:name(S), Owner}, {reconcile, S, 0})
     || S <- dspex_cluster:owned_sessions(), {Owner, _} <- [dspex_cluster_writer:owners(S, V)]],
    _ = spawn(fun() ->
                      Here = sets:from_list(dspex_nif:session_list(), [{version, 2}]),
                      orphans(orphaned(ets:tab2list(dspex_cluster_replica:table()), Here, V), V)
              end),
    {noreply, St};
handle_cast(_, St) -> {noreply, St}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info(tick, #{ms := Ms} = St) ->
    Me = node(),
    Rows = ets:tab2list(dspex_cluster_replica:table()),
    Owned = [{S, Reps} || {S, E, _, O, Reps, _, F} <- Rows, O =:= Me, F =< E],
    %% listing does not refresh TTLs (a lookup would keep every session alive)
    Here = sets:from_list(dspex_nif:session_list(), [{version, 2}]),
    ByNode = lists:foldl(
               fun({S, Reps}, Acc) ->
                       case sets:is_element(S, Here) of
                           true -> lists:foldl(fun(N, A) -> maps:update_with(N, fun(L) -> [S | L] end, [S], A) end,
                                                  Acc, Reps);
                           false ->
                               gen_server:cast(dspex_cluster_writer:name(S), {expired, S}),
                               Acc
                       end
               end, #{}, Owned),
    [erpc:cast(N, ?MODULE, touch_local, [Ss]) || {N, Ss} <- maps:to_list(ByNode)],
    erlang:send_after(Ms, self(), tick),
    {noreply, reap(Rows, Here, St)};
handle_info({'DOWN', _, process, Pid, _}, #{reaper := Pid} = St) ->
    {noreply, St#{reaper := undefined}};
handle_info(_, St) -> {noreply, St}.

%%% removing deleted sessions (see the module doc) ------------------------------------

%% Starts a reaper of this node's tombstones when none runs and every
%% configured node is live (only they can acknowledge a deletion).
%% The same process then looks for tombstones of other owners that died
%% (`orphans/2'): after a join, a first attempt may not finish (the owner
%% still starting, a takeover that could not), so every tick tries again.
reap(_Rows, _Here, #{reaper := Pid} = St) when is_pid(Pid) -> St;
reap(Rows, Here, St) ->
    {Nodes, Live, V} = case dspex_cluster_members:published_view() of
                           #{nodes := N, live := L} = V0 -> {N, L, V0};
                           undefined -> {[node()], [], undefined}   % starting: no view yet
                       end,
    Tombs = lists:sublist([{S, E, Seq} || {S, E, Seq, expired, _, _, F} <- Rows, F =< E,
                                          not sets:is_element(S, Here), resolved(S)], ?REAP_MAX),
    Orphaned = case Nodes -- Live of
                   [] -> orphaned(Rows, Here, V);
                   _ -> #{}
               end,
    case {Tombs, Nodes -- Live} of
        {[], _} when Orphaned =:= #{} -> St;
        {_, []} ->
            {Pid, _} = spawn_monitor(fun() ->
                                             _ = Tombs =/= [] andalso reap(Tombs, Nodes -- [node()]),
                                             orphans(Orphaned, V)
                                     end),
            St#{reaper := Pid};
        {_, Missing} ->
            dspex_telemetry:execute([dspex, cluster, tombstones, waiting], #{count => length(Tombs)},
                                    #{missing => Missing}),
            St
    end.

%% No change of `S' announced here still waits for its replicas.
resolved(S) ->
    case ets:lookup(dspex_cluster_shipper:shipped_table(), S) of
        [{S, A, R}] -> R >= A;
        [] -> true
    end.

reap(Tombs, Others) ->
    Buried = everywhere(Others, bury, [Tombs, node()], [S || {S, _, _} <- Tombs]),
    Forget = [T || {S, _, _} = T <- Tombs, sets:is_element(S, Buried)],
    Forgot = everywhere(Others, forget, [Forget], [S || {S, _, _} <- Forget]),
    Gone = dspex_cluster_replica:forget([T || {S, _, _} = T <- Forget, sets:is_element(S, Forgot)]),
    %% the backend's hold too (etcd: the owner key, left by the deletion)
    #{backend := Backend} = dspex_cluster_members:view(),
    _ = [Backend:release(S) || S <- Gone],
    dspex_telemetry:execute([dspex, cluster, tombstones, removed],
                            #{count => length(Gone), kept => length(Tombs) - length(Gone)}, #{}),
    ok.

%% Tombstones whose owner died before removing them (see the module doc):
%% rows here of a deletion applied here (seq above 0, no copy) whose owner
%% node is live and has no row of the session (it restarted empty) are
%% settled by the session's owner under the view, which takes the deletion
%% over and so removes it as its own. (A copy that only expired here, whose
%% owner restarted, is settled early the same way: the newest copy wins.)
%% `orphaned/3' lists the candidates of `Rows' by owner node, `orphans/2'
%% asks each owner which it has no row of and settles those.
orphaned(Rows, Here, #{live := Live}) ->
    maps:groups_from_list(
      fun({_, O}) -> O end, fun({S, _}) -> S end,
      lists:sublist([{S, O} || {S, _, Seq, O, _, _, _} <- Rows, Seq > 0, O =/= node(), lists:member(O, Live),
                               not sets:is_element(S, Here)], ?REAP_MAX)).

orphans(ByOwner, V) ->
    [gen_server:cast({dspex_cluster_writer:name(S), Owner}, {reconcile, S, 0})
     || {O, Ss} <- maps:to_list(ByOwner),
        Known <- [try sets:from_list(erpc:call(O, dspex_cluster_replica, known, [Ss], ?REAP_TIMEOUT), [{version, 2}])
                  catch _:_ -> sets:from_list(Ss, [{version, 2}])   % no answer: nothing is settled
                  end],
        S <- Ss, not sets:is_element(S, Known), {Owner, _} <- [dspex_cluster_writer:owners(S, V)]],
    ok.

%% The sessions of `All' that every node of `Others' returned from
%% `dspex_cluster_replica:F(Args)' (none when a node did not answer).
everywhere(Others, F, Args, All) ->
    Answers = erpc:multicall(Others, dspex_cluster_replica, F, Args, ?REAP_TIMEOUT),
    lists:foldl(fun({ok, Ss}, Acc) when is_list(Ss) -> sets:intersection(Acc, sets:from_list(Ss, [{version, 2}]));
                   (_, _) -> sets:new([{version, 2}])
                end, sets:from_list(All, [{version, 2}]), Answers).
