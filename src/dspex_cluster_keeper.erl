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
-module(dspex_cluster_keeper).
-behaviour(gen_server).

-export([start_link/1, touch_local/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% @doc Starts the keeper with the cluster configuration.
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(Config) -> gen_server:start_link({local, ?MODULE}, ?MODULE, Config, []).

%% @doc Refreshes the TTL of the local copies of `Sessions' (on a replica).
-spec touch_local([binary()]) -> ok.
touch_local(Sessions) ->
    [_ = dspex_nif:session_touch(S) || S <- Sessions],
    ok.

-spec init(map()) -> {ok, pos_integer()}.
init(Config) ->
    Ms = maps:get(keepalive_ms, Config, 5000),
    erlang:send_after(Ms, self(), tick),
    {ok, Ms}.

-spec handle_call(term(), gen_server:from(), pos_integer()) -> {reply, {error, unknown_call}, pos_integer()}.
handle_call(_, _From, Ms) -> {reply, {error, unknown_call}, Ms}.

-spec handle_cast(term(), pos_integer()) -> {noreply, pos_integer()}.
handle_cast(reconcile, Ms) ->
    V = dspex_cluster_members:view(),
    [gen_server:cast({dspex_cluster_writer:name(S), Owner}, {reconcile, S, 0})
     || S <- dspex_cluster:owned_sessions(), {Owner, _} <- [dspex_cluster_writer:owners(S, V)]],
    {noreply, Ms};
handle_cast(_, Ms) -> {noreply, Ms}.

-spec handle_info(term(), pos_integer()) -> {noreply, pos_integer()}.
handle_info(tick, Ms) ->
    Me = node(),
    Owned = [{S, Reps} || {S, E, _, O, Reps, _, F} <- ets:tab2list(dspex_cluster_replica:table()), O =:= Me, F =< E],
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
    {noreply, Ms};
handle_info(_, Ms) -> {noreply, Ms}.
