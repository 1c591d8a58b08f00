%% @doc One process per session that has derived variables: it recomputes them
%% when their inputs commit. Writers never wait for it (unless they ask with
%% `#{propagate => sync}'); it learns of commits through store watches, whose
%% messages arrive in commit order.
%%
%% For each committed change of a non-derived variable it takes
%% `dspex_graph:update_order/2' of that variable and recomputes every derived
%% variable in it once, in that order, through the store.
%%
%% With a cluster the propagator of the owner node recomputes (its writes go
%% through the owner's writer and are replicated); the propagators that
%% replicas start when they import the session keep the definitions and their
%% own local watches but stay idle until their node owns the session.
%%
%% A definition goes with its variable: `dspex_store:delete/2,3' tells the
%% propagator (the store sends no message of a deletion), and recomputed
%% values are written by the variable's id, so a variable registered again
%% under the name (a plain one, say) is never written as if derived. The
%% definitions are also kept in the registry table, so that exporting a
%% session (done by cluster processes while this process may be waiting for
%% them) never calls this process.
%%
%% == Timeouts ==
%% Every call to the propagator is bounded: by the application environment
%% `propagation_timeout_ms' (default 5000), or by the `Timeout' given to
%% `sync/2'. A derive function runs inside the propagator, so one that hangs
%% holds up the session's later propagation; callers are then answered
%% `{error, timeout}' instead of waiting for ever:
%% <ul>
%% <li>`sync/1,2': `{error, timeout}', and the event
%%     `[dspex, graph, propagation, timeout]' (`#{count => 1}'; `session',
%%     `timeout') is emitted. `dspex_store:set/4' with `propagate => sync'
%%     still answers `{ok, Version}' then (the write itself is committed), so
%%     this event is how such a late propagation is seen.</li>
%% <li>`define/6' (`dspex_graph:define_derived/5,6'): `{error, timeout}'; the
%%     definition may still complete afterwards (check with
%%     `dspex_store:exists/2').</li>
%% <li>`adopt/2' (an import): `{error, timeout}', so the import fails.</li>
%% </ul>
%% A propagator that exits while a caller waits answers
%% `{error, {propagator_exit, Reason}}' (`sync' answers `ok' when it ended
%% normally: the session is gone, nothing is left to propagate).
-module(dspex_propagator).
-behaviour(gen_server).

-include("dspex_bridge.hrl").

-export([start_link/1, define/6, sync/1, sync/2, stop/1, whereis_session/1, definitions/1, adopt/2,
         timeout/0, deleted/2, valid_definition/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(TAB, dspex_propagators).
-define(CHECK_MS, 60000).
-define(DEFAULT_TIMEOUT_MS, 5000).

%% @private
-spec start_link(dspex_store:session_id()) -> {ok, pid()} | {error, term()}.
start_link(Session) -> gen_server:start_link(?MODULE, Session, []).

%% @doc The propagator of a session, if it has one.
-spec whereis_session(dspex_store:session_id()) -> pid() | undefined.
whereis_session(Session) ->
    try ets:lookup(?TAB, Session) of
        [{_, Pid}] -> Pid;
        [] -> undefined
    catch error:badarg -> undefined
    end.

%% @doc The bound of every call to a propagator, in milliseconds: the
%% application environment `propagation_timeout_ms' (default 5000).
-spec timeout() -> non_neg_integer().
timeout() ->
    case application:get_env(dspex_bridge, propagation_timeout_ms, ?DEFAULT_TIMEOUT_MS) of
        T when is_integer(T), T >= 0 -> T;
        _ -> ?DEFAULT_TIMEOUT_MS
    end.

%% @equiv sync(Session, timeout())
-spec sync(dspex_store:session_id()) -> ok | {error, timeout | {propagator_exit, term()}}.
sync(Session) -> sync(Session, timeout()).

%% @doc Waits until every change committed before this call has propagated,
%% at most `Timeout' milliseconds: `{error, timeout}' then (see the module
%% documentation), with the event `[dspex, graph, propagation, timeout]'.
-spec sync(dspex_store:session_id(), non_neg_integer()) ->
          ok | {error, timeout | {propagator_exit, term()}}.
sync(Session, Timeout) when is_integer(Timeout), Timeout >= 0 ->
    case whereis_session(Session) of
        undefined -> ok;
        Pid ->
            case call(Pid, sync, Timeout) of
                {error, timeout} = E ->
                    dspex_telemetry:execute(?DSPEX_PROPAGATION_TIMEOUT, #{count => 1},
                                            #{session => Session, timeout => Timeout}),
                    E;
                {error, {propagator_exit, R}} when R =:= normal; R =:= noproc; R =:= shutdown -> ok;
                Other -> Other
            end
    end.

%% A bounded gen_server call: an exit of the propagator or the timeout is an
%% error value, never an exception in the caller (OTP's call uses an alias,
%% so a reply arriving after the timeout is dropped, not left in the mailbox).
call(Pid, Req, Timeout) ->
    try gen_server:call(Pid, Req, Timeout)
    catch
        exit:{timeout, _} -> {error, timeout};
        exit:{R, {gen_server, call, _}} -> {error, {propagator_exit, R}}
    end.

%% @doc Stops the session's propagator (the session was deleted).
-spec stop(dspex_store:session_id()) -> ok.
stop(Session) ->
    case whereis_session(Session) of
        undefined -> ok;
        Pid ->
            %% unregister first: a new propagator for a new session of the same
            %% id must not find this one
            _ = ets:delete_object(?TAB, {Session, Pid}),
            gen_server:cast(Pid, stop)
    end.

%% @private Called by `dspex_store:delete/2,3' once `Key' (a name or an id)
%% was deleted: the session's propagator drops the definition of that
%% variable, and forgets its watch on it (the deletion ended it).
-spec deleted(dspex_store:session_id(), dspex_store:var_key()) -> ok.
deleted(Session, Key) ->
    case whereis_session(Session) of
        undefined -> ok;
        Pid -> gen_server:cast(Pid, {deleted, Key})
    end.

%% @doc Whether a term is a definition as `definitions/1' lists it (and
%% `adopt/2' takes it): `{Name, Inputs, Fun}', a name, a proper list of
%% variable keys, a fun of arity 1 or `{Module, Function}'.
-spec valid_definition(term()) -> boolean().
valid_definition({N, Inputs, Fun}) when is_binary(N); is_atom(N) ->
    keys(Inputs) andalso (is_function(Fun, 1) orelse
                          (is_tuple(Fun) andalso tuple_size(Fun) =:= 2 andalso
                           is_atom(element(1, Fun)) andalso is_atom(element(2, Fun))));
valid_definition(_) -> false.

keys([K | T]) when is_binary(K); is_atom(K) -> keys(T);
keys([]) -> true;
keys(_) -> false.

%% @doc The derived variables of a session with their inputs and functions
%% (for export).
-spec definitions(dspex_store:session_id()) -> [{binary(), [dspex_store:var_key()], dspex_graph:derive_fun()}].
definitions(Session) ->
    case whereis_session(Session) of
        undefined -> [];
        Pid ->
            try ets:lookup(?TAB, {defs, Session}) of
                [{_, Pid, Defs}] -> Defs;
                _ -> []
            catch error:badarg -> []
            end
    end.

%% @doc Takes over exported definitions for variables that already exist (an
%% import): no registration, no recomputation until an input changes. A
%% definition of a variable that is not derived (or missing) is skipped.
%% `{error, {invalid_argument, derived_functions}}' unless every element is a
%% `valid_definition/1' (nothing is adopted then); `{error, timeout}' after
%% `timeout/0' milliseconds.
-spec adopt(dspex_store:session_id(), list()) -> ok | {error, term()}.
adopt(_Session, []) -> ok;
adopt(Session, Defs) ->
    case is_list(Defs) andalso lists:all(fun valid_definition/1, Defs) of
        false -> {error, {invalid_argument, derived_functions}};
        true ->
            case ensure(Session) of
                {ok, Pid} -> call(Pid, {adopt, Defs}, timeout());
                Error -> Error
            end
    end.

%% @private See dspex_graph:define_derived/6. `{error, timeout}' after
%% `timeout/0' milliseconds (the definition may still complete).
-spec define(dspex_store:session_id(), dspex_store:var_key(), dspex_store:var_type(),
             [dspex_store:var_key()], dspex_graph:derive_fun(), map()) -> {ok, binary()} | {error, term()}.
define(Session, Name, Type, Inputs, Fun, Opts) ->
    case ensure(Session) of
        {ok, Pid} ->
            case compute(Session, Inputs, Fun) of
                {ok, Value} ->
                    call(Pid, {define, Name, Type, Value, Inputs, Fun, Opts}, timeout());
                {error, _} = E -> E
            end;
        Error -> Error
    end.

ensure(Session) ->
    case whereis_session(Session) of
        Dead when is_pid(Dead), node(Dead) =:= node() ->
            case is_process_alive(Dead) of
                true -> {ok, Dead};
                false -> _ = ets:delete_object(?TAB, {Session, Dead}), ensure(Session)
            end;
        undefined ->
            case dspex_store:get_session(Session) of
                {ok, _} ->
                    try supervisor:start_child(dspex_propagator_sup, [Session]) of
                        {ok, Pid} -> {ok, Pid};
                        {error, {already_registered, Pid}} -> {ok, Pid};
                        Other -> {error, Other}
                    catch exit:{noproc, _} -> {error, {not_started, dspex_bridge}}
                    end;
                Error -> Error
            end
    end.

%% Reads the inputs and runs the function; never raises.
compute(Session, Inputs, Fun) ->
    case dspex_store:get_many(Session, Inputs) of
        {ok, #{found := Found, missing := []}} ->
            Values = maps:map(fun(_, #{value := V}) -> V end, Found),
            try {ok, apply_fun(Fun, Values)}
            catch Class:Reason -> {error, {derive_failed, {Class, Reason}}}
            end;
        {ok, #{missing := [M | _]}} -> {error, {not_found, M}};
        Error -> Error
    end.

apply_fun({M, F}, Values) -> M:F(Values);
apply_fun(F, Values) -> F(Values).

%%% gen_server ---------------------------------------------------------------

-spec init(dspex_store:session_id()) -> {ok, map()} | {stop, term()}.
init(Session) ->
    case ets:insert_new(?TAB, {Session, self()}) of
        true ->
            erlang:send_after(?CHECK_MS, self(), check_session),
            %% derived: Name => {Inputs, Fun}; ids: Name => the derived
            %% variable's id; watched: input name => the watched variable's id
            {ok, #{session => Session, derived => #{}, ids => #{}, watched => #{}}};
        false ->
            [{_, Pid}] = ets:lookup(?TAB, Session),
            {stop, {already_registered, Pid}}
    end.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call({define, Name, Type, Value, Inputs, Fun, Opts}, _From, #{session := S} = St) ->
    %% published before the writes, so that the copies they ship carry it
    Tentative = case Name of
                    _ when is_binary(Name) -> Name;
                    _ when is_atom(Name) -> atom_to_binary(Name, utf8);
                    _ -> undefined
                end,
    publish(maps:put(Tentative, {Inputs, Fun}, maps:get(derived, St)), St),
    case dspex_store:register_derived(S, Name, Type, Value, Opts) of
        {ok, Id} ->
            {ok, #{name := NameBin}} = dspex_store:get(S, Id),
            case add_edges(S, Inputs, NameBin) of
                ok ->
                    St1 = watch_inputs(Inputs, publish(St#{derived := (maps:get(derived, St))#{NameBin => {Inputs, Fun}},
                                                           ids := (maps:get(ids, St))#{NameBin => Id}})),
                    %% an input may have committed between the first computation
                    %% and the watch: catch up, writing only if the value moved
                    St2 = case compute(S, Inputs, Fun) of
                              {ok, Value} -> St1;
                              _ -> recompute(NameBin, St1)
                          end,
                    {reply, {ok, Id}, St2};
                Error ->
                    _ = dspex_store:delete(S, Id),
                    {reply, Error, publish(St)}
            end;
        Error ->
            {reply, Error, publish(St)}
    end;
handle_call(definitions, _From, #{derived := D} = St) ->
    {reply, [{N, I, F} || {N, {I, F}} <- lists:sort(maps:to_list(D))], St};
handle_call({adopt, Defs}, _From, #{session := S} = St) ->
    St1 = lists:foldl(fun({N, Inputs, Fun}, Acc = #{derived := D, ids := Ids}) ->
                              case var_of(S, N) of
                                  {ok, Name, Id, true} ->
                                      watch_inputs(Inputs, Acc#{derived := D#{Name => {Inputs, Fun}}, ids := Ids#{Name => Id}});
                                  _ -> Acc
                              end
                      end, St, Defs),
    {reply, ok, publish(St1)};
handle_call(sync, _From, St) ->
    %% every watch message sent before the caller's request is already handled
    {reply, ok, St}.

-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{session := S}) ->
    _ = ets:delete_object(?TAB, {S, self()}),
    _ = ets:match_delete(?TAB, {{defs, S}, self(), '_'}),
    ok.

%% The definitions as `definitions/1' returns them.
publish(#{derived := D} = St) -> publish(D, St), St.

publish(D, #{session := S}) ->
    ets:insert(?TAB, {{defs, S}, self(), [{N, I, F} || {N, {I, F}} <- lists:sort(maps:to_list(D)), N =/= undefined]}).

-spec handle_cast(term(), map()) -> {noreply, map()} | {stop, normal, map()}.
handle_cast(stop, St) -> {stop, normal, St};
handle_cast({deleted, Key}, #{session := S, derived := D, ids := Ids, watched := W} = St) ->
    %% Key named the variable deleted (by name or id); an entry of that name
    %% whose variable still has the recorded id was not it
    Bin = key_bin(Key),
    Gone = fun(N, Id) -> (N =:= Bin orelse Id =:= Key) andalso
                             case var_of(S, N) of
                                 {ok, _, Id, _} -> false;
                                 _ -> true
                             end
           end,
    GoneDefs = [N || {N, Id} <- maps:to_list(Ids), Gone(N, Id)],
    GoneWatches = [N || {N, Id} <- maps:to_list(W), Gone(N, Id)],
    St1 = St#{watched := maps:without(GoneWatches, W)},
    case GoneDefs of
        [] -> {noreply, St1};
        _ -> {noreply, publish(St1#{derived := maps:without(GoneDefs, D), ids := maps:without(GoneDefs, Ids)})}
    end.

-spec handle_info(term(), map()) -> {noreply, map()} | {stop, normal, map()}.
handle_info(#dspex_variable{session = S, name = Name}, #{session := S, derived := D} = St) ->
    case maps:is_key(Name, D) orelse not dspex_cluster:is_owner(S) of
        true -> {noreply, St}; %% our own write, or a replica's copy
        false ->
            %% the write that triggers this paid its token: the graph read is not metered again
            case dspex_nif:graph_query(S, Name, update_order) of
                {ok, [_ | Order]} ->
                    T0 = erlang:monotonic_time(),
                    St1 = lists:foldl(fun recompute/2, St, Order),
                    dspex_telemetry:execute(?DSPEX_PROPAGATION_STOP,
                                            #{duration => erlang:monotonic_time() - T0},
                                            #{session => S, variable => Name, dependents => Order}),
                    {noreply, St1};
                {error, session_not_found} -> {stop, normal, St};
                {error, _} -> {noreply, St}
            end
    end;
handle_info(check_session, #{session := S} = St) ->
    case dspex_store:get_session(S) of
        {ok, _} ->
            erlang:send_after(?CHECK_MS, self(), check_session),
            {noreply, St};
        {error, session_not_found} -> {stop, normal, St}
    end;
handle_info(_Other, St) -> {noreply, St}.

add_edges(_S, [], _To) -> ok;
add_edges(S, [I | Is], To) ->
    case dspex_graph:add_dependency(S, I, To, derived) of
        ok -> add_edges(S, Is, To);
        Error -> Error
    end.

%% Watches on this node's copy (a replica's propagator must not watch the
%% owner's, nor wait for it while the owner's writer waits for the replica).
watch_inputs(Inputs, #{session := S, derived := D} = St) ->
    lists:foldl(fun(I, Acc = #{watched := W}) ->
                        case var_of(S, I) of
                            {ok, N, Id, _} when not is_map_key(N, W), not is_map_key(N, D) ->
                                case dspex_cluster:local_apply(dspex_store, watch, [S, [Id], self()]) of
                                    {error, _} -> Acc;
                                    _Ref -> Acc#{watched := W#{N => Id}}
                                end;
                            _ -> Acc
                        end
                end, St, Inputs).

%% This node's copy of a variable: `{ok, Name, Id, Derived}'.
var_of(S, Key) ->
    case dspex_cluster:local_apply(dspex_store, get, [S, Key]) of
        {ok, #{name := N, id := Id} = V} -> {ok, N, Id, maps:get(derived, V, false) =:= true};
        {error, _} = E -> E
    end.

key_bin(K) when is_binary(K) -> K;
key_bin(K) when is_atom(K) -> atom_to_binary(K, utf8);
key_bin(K) -> K.

%% Recomputes one derived variable (a no-op for variables that are not ours).
%% Written by id: a variable that took the name since is not ours.
recompute(Name, #{session := S, derived := D, ids := Ids} = St) when is_map_key(Name, D) ->
    {Inputs, Fun} = maps:get(Name, D),
    Key = maps:get(Name, Ids, Name),
    Result = case compute(S, Inputs, Fun) of
                 {ok, V} ->
                     case dspex_store:set_derived(S, Key, V, #{changed_by => propagation}) of
                         {ok, Ver} -> dspex_events:emit(S, derived_recomputed, #{variable => Name, version => Ver}, #{variable => Name}); %% event log
                         {error, {not_found, _}} -> gone;
                         {error, R} -> {error, R}
                     end;
                 {error, {not_found, Name}} -> gone;
                 {error, R} -> {error, R}
             end,
    case Result of
        ok ->
            _ = clear_error(S, Key),
            St;
        gone ->
            publish(St#{derived := maps:remove(Name, D), ids := maps:remove(Name, Ids)});
        {error, Reason} ->
            _ = dspex_nif:var_set_error(S, Key, Reason),
            dspex_telemetry:execute(?DSPEX_PROPAGATION_ERROR, #{count => 1},
                                    #{session => S, variable => Name, reason => Reason}),
            St
    end;
recompute(_Name, St) -> St.

clear_error(S, Name) ->
    case dspex_store:get(S, Name) of
        {ok, #{error := undefined}} -> ok;
        {ok, _} -> dspex_nif:var_set_error(S, Name, undefined);
        _ -> ok
    end.
