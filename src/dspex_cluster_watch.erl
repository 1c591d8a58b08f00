%% @doc Watches in a cluster: a watch is registered on the session's owner, and
%% the watcher, on any node, receives the owner's change messages.
%%
%% The store's native watch can only send to a local process, so on the owner
%% a relay process holds the native watch and forwards each
%% `{dspex_variable, NativeRef, Session, Name, Old, New, Meta}' as
%% `{dspex_variable, Ref, Session, Name, Old, New, Meta}' to the watcher, in
%% the order the store sent them. `Ref' is made by the relay (`node(Ref)' is
%% the owner node at watch time); `unwatch/1' finds the relay through it.
%%
%% A watch follows one owner's copy of the session. When it can no longer
%% deliver, the watcher receives `{dspex_watch_lost, Ref, Session}' once and
%% the watch is over (watch again: the new watch goes to the current owner):
%% when the owner node dies or is cut off from the watcher's node (this
%% module's server on the watcher's node monitors the relay), when another
%% node takes the session over (migration, drain, failover after a partition:
%% the old owner is fenced), or when the owner's copy is replaced by a newer
%% one. Changes committed between the loss and the new watch are not sent:
%% read the variables after watching again. A deleted session ends its
%% watches without a message, as a deleted variable does in the store.
%%
%% The server also owns the relay table (`{Ref, Session, RelayPid}').
-module(dspex_cluster_watch).
-behaviour(gen_server).

-export([start_link/0, watch/5, unwatch/1, unwatch_here/1, relay/4, lost/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(TAB, dspex_cluster_watches).
-define(CALL_TIMEOUT, 10000).

%% @doc Starts the server (one per node, under `dspex_cluster_sup').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc `dspex_store:watch/4' with a cluster: registers the watch on the
%% session's owner (`Local' registers it here without routing, as inside
%% cluster processes) and returns its `Ref'.
-spec watch(term(), list(), pid(), map(), fun(() -> term())) -> reference() | {error, term()}.
watch(S, Keys, Pid, Opts, Local) ->
    case get(dspex_cluster_local) of
        true -> Local();
        _ when not is_binary(S) -> Local();   % a type error raises badarg as before
        _ ->
            Args = [S, Keys, Pid, Opts],
            case dspex_cluster:route(S, {?MODULE, relay}, Args, fun() -> relay(S, Keys, Pid, Opts) end) of
                {ok, Ref, Relay} ->
                    guard(Relay, Ref, S, Pid),
                    Ref;
                Error -> Error
            end
    end.

%% The relay is on another node than the watcher: the server on the
%% watcher's node monitors it and tells the watcher if it goes away.
guard(Relay, _Ref, _S, Pid) when node(Relay) =:= node(Pid) -> ok;
guard(Relay, Ref, S, Pid) ->
    Msg = {guard, Relay, Ref, S, Pid},
    try gen_server:call({?MODULE, node(Pid)}, Msg, ?CALL_TIMEOUT)
    catch exit:_ -> gen_server:call(?MODULE, Msg, ?CALL_TIMEOUT)
    end.

%% @doc Ends a watch made with a cluster (idempotent). A watch made without
%% routing (a native reference) is ended too.
-spec unwatch(reference()) -> ok.
unwatch(Ref) when is_reference(Ref), node(Ref) =/= node() ->
    try erpc:call(node(Ref), ?MODULE, unwatch_here, [Ref], ?CALL_TIMEOUT)
    catch error:{erpc, _} -> ok   % its node is gone, and the watch with it
    end;
unwatch(Ref) ->
    unwatch_here(Ref).

%% @doc Ends a watch registered on this node. A relay that does not end its
%% watch within 10 s (stuck sending to a watcher behind a busy connection) is
%% killed: the store drops the watch of a dead process, and the relay's row
%% is removed here.
-spec unwatch_here(reference()) -> ok.
unwatch_here(Ref) ->
    case ets:lookup(?TAB, Ref) of
        [{Ref, _, Relay}] ->
            Mon = monitor(process, Relay),
            Relay ! {unwatch, self(), Mon},
            receive
                {Mon, ok} -> demonitor(Mon, [flush]), ok;
                {'DOWN', Mon, _, _, _} -> ok
            after ?CALL_TIMEOUT ->
                exit(Relay, kill),
                receive {'DOWN', Mon, _, _, _} -> ok end,
                ets:delete(?TAB, Ref),
                ok
            end;
        [] ->
            %% a native watch, or one already over (a plain reference)
            try dspex_nif:unwatch(Ref)
            catch error:badarg when is_reference(Ref) -> ok
            end
    end.

%% @doc Tells the relays of `Session' on this node that their watch is over:
%% `lost' (the watcher is sent `{dspex_watch_lost, Ref, Session}') or `ended'
%% (the session was deleted: no message).
-spec lost(binary(), lost | ended) -> ok.
lost(S, Why) ->
    try ets:match(?TAB, {'_', S, '$1'}) of
        Relays -> [R ! {Why, S} || [R] <- Relays], ok
    catch error:badarg -> ok
    end.

%% @doc Runs on the owner: starts a relay holding a native watch for `Pid';
%% `{ok, Ref, Relay}' or the store's error (a type error is raised).
-spec relay(binary(), list(), pid(), map()) -> {ok, reference(), pid()} | {error, term()}.
relay(S, Keys, Pid, Opts) ->
    Caller = self(),
    {Relay, Mon} = spawn_monitor(fun() -> relay_init(Caller, S, Keys, Pid, Opts) end),
    receive
        {Relay, {ok, Ref}} -> demonitor(Mon, [flush]), {ok, Ref, Relay};
        {Relay, {raise, Class, Reason}} -> demonitor(Mon, [flush]), erlang:raise(Class, Reason, []);
        {Relay, Error} -> demonitor(Mon, [flush]), Error;
        {'DOWN', Mon, _, _, Why} -> {error, {relay_failed, Why}}
    end.

relay_init(Caller, S, Keys, Pid, Opts) ->
    Native = try dspex_cluster:local_apply(dspex_store, watch, [S, Keys, self(), Opts])
             catch Class:Reason -> {raise, Class, Reason}
             end,
    case Native of
        N when is_reference(N) ->
            Ref = make_ref(),
            Mon = monitor(process, Pid),
            true = ets:insert(?TAB, {Ref, S, self()}),
            %% ownership may have moved since the caller checked it (a fence
            %% between that check and the insert above sent this relay
            %% nothing); the relay then tells the watcher at once
            _ = dspex_cluster:is_owner(S) orelse (self() ! {lost, S}),
            Caller ! {self(), {ok, Ref}},
            relay_loop(#{native => N, ref => Ref, s => S, pid => Pid, mon => Mon});
        Other ->
            Caller ! {self(), Other}
    end.

relay_loop(#{native := N, ref := Ref, s := S, pid := Pid, mon := Mon} = St) ->
    receive
        {dspex_variable, N, S, Name, Old, New, Meta} ->
            Pid ! {dspex_variable, Ref, S, Name, Old, New, Meta},
            relay_loop(St);
        {'DOWN', Mon, process, _, _} ->
            finish(St);
        {lost, S} ->
            Pid ! {dspex_watch_lost, Ref, S},
            told(S, moved),
            finish(St);
        {ended, S} ->
            finish(St);
        {unwatch, From, Tag} ->
            finish(St),
            From ! {Tag, ok};
        _ ->
            relay_loop(St)
    end.

told(S, Why) ->
    dspex_telemetry:execute([dspex, cluster, watch, lost], #{count => 1}, #{session => S, reason => Why}).

finish(#{native := N, ref := Ref}) ->
    ok = dspex_nif:unwatch(N),
    ets:delete(?TAB, Ref),
    ok.

%%% server: the relay table, and the guards of this node's watchers -------------

-spec init([]) -> {ok, #{}}.
init([]) ->
    _ = ets:new(?TAB, [named_table, public, set, {read_concurrency, true}]),
    {ok, #{}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, ok, map()}.
handle_call({guard, Relay, Ref, S, Pid}, _From, St) ->
    {reply, ok, St#{monitor(process, Relay) => {Ref, S, Pid}}}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({'DOWN', Mon, process, _, Why}, St) ->
    case maps:take(Mon, St) of
        {{Ref, S, Pid}, St1} ->
            %% a relay ends normally after telling the watcher (or because the
            %% watcher died or unwatched); anything else, the owner node's
            %% death or a cut connection included, loses the watch
            _ = Why =:= normal orelse Why =:= noproc orelse begin
                                                                Pid ! {dspex_watch_lost, Ref, S},
                                                                told(S, Why)
                                                            end,
            {noreply, St1};
        error -> {noreply, St}
    end;
handle_info(_, St) -> {noreply, St}.
