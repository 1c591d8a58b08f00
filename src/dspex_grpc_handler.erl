%% @doc One process per gRPC call: runs the RPC against the store, graph,
%% locks and access control, answers through `dspex_grpc', maps errors to
%% statuses (`dspex_grpc_status') and emits `[dspex, grpc, rpc, stop]'
%% (measurement `duration' in native units; metadata `rpc', `status',
%% `session_id').
%%
%% Requests and replies are maps shaped by the port program (field-name atom
%% keys, Any values as `#{type_url, value}' with the JSON parsed, timestamps
%% in microseconds, `*_json' fields parsed). Request metadata
%% `dspex-principal' acts as another session (`as'), `dspex-context' is the
%% access-control context. Every RPC has one of three principal rules
%% (`principal_rule/1'): `rules' (the principal goes to the store, locks,
%% runs or tools, whose per-variable or per-tool rules decide), `owner'
%% (the session as a whole: only the session itself, any other principal is
%% PERMISSION_DENIED before anything runs; for node-wide views, which name
%% no session, any principal is) or `none' (no session data: Ping and the
%% model router).
%%
%% The event log RPCs (`GetEvents', `WatchEvents', `GetStateAt') read
%% `dspex_events'; event data, metadata and states travel as JSON made by
%% `dspex_events:json_term/1' (events through `dspex_grpc_event:to_pb/1',
%% which adds `value_type' to a value change's data). `WatchEvents'
%% subscribes the handler process (catch-up from a position or sequence,
%% then live) and resumes a subscription dropped for overflow right after
%% its last event.
-module(dspex_grpc_handler).

-export([run/5, handle/4, var_to_pb/3, principal_rule/1]).

%% The type_url of a tool result: JSON text, as snakepit clients expect it.
-define(TOOL_RESULT_URL, <<"type.googleapis.com/google.protobuf.StringValue">>).
-define(PERMISSIONS, [<<"read">>, <<"write">>, <<"observe">>, <<"optimize">>]).

%% @doc Entry point of a handler process (spawned by `dspex_grpc').
-spec run(dspex_grpc:ctx(), atom(), map(), map(), non_neg_integer() | infinity) -> ok.
run(Ctx, Method, Req, Meta, Deadline) ->
    %% measured only when someone listens
    Handlers = dspex_telemetry:handlers([dspex, grpc, rpc, stop]),
    Start = Handlers =/= [] andalso erlang:monotonic_time(),
    Call = #{ctx => Ctx, meta => Meta, deadline => Deadline, opts => acl_opts(Meta)},
    Result = try handle(Method, Req, Call, Ctx)
             catch Class:Reason:Stack ->
                     logger:error("dspex_grpc: ~p failed: ~p", [Method, {Class, Reason, Stack}]),
                     {error, {crash, Reason}}
             end,
    Status = case Result of
                 {reply, Map} -> dspex_grpc:reply(Ctx, Map), ok;
                 streamed -> ok;
                 {error, R} ->
                     {S, Msg} = dspex_grpc_status:of_error(R),
                     dspex_grpc:fail(Ctx, S, Msg, dspex_grpc_status:trailers(R)),
                     S
             end,
    Handlers =/= [] andalso
        dspex_telemetry:emit(Handlers, [dspex, grpc, rpc, stop], #{duration => erlang:monotonic_time() - Start},
                             #{rpc => Method, status => Status, session_id => maps:get(session_id, Req, undefined)}),
    ok.

acl_opts(Meta) ->
    As = case maps:get(<<"dspex-principal">>, Meta, <<>>) of
             <<>> -> #{};
             P -> #{as => P}
         end,
    case maps:get(<<"dspex-context">>, Meta, undefined) of
        C when is_map(C) -> As#{context => C};
        _ -> As
    end.

%% @doc How an RPC treats `dspex-principal': `rules' (passed as `as' /
%% `context' to calls whose access rules decide), `owner' (only the session
%% itself: register, cleanup, session info and heartbeat, dependencies and
%% the graph, tool registration, the dashboard, the event log, access checks;
%% node-wide `ListSessions' and the node dashboard: no principal at all) or
%% `none' (touches no session). An unknown method is `rules' (it is answered
%% INVALID_ARGUMENT anyway).
-spec principal_rule(atom()) -> rules | owner | none.
principal_rule(M) when M =:= 'Ping'; M =:= 'SelectModel'; M =:= 'RecordInference' -> none;
principal_rule(M) when M =:= 'InitializeSession'; M =:= 'CleanupSession'; M =:= 'GetSession';
                       M =:= 'Heartbeat'; M =:= 'ListSessions'; M =:= 'RegisterVariable';
                       M =:= 'AddDependency'; M =:= 'RemoveDependency'; M =:= 'GetDependencies';
                       M =:= 'GetDependents'; M =:= 'GetUpdateOrder'; M =:= 'CheckVariableAccess';
                       M =:= 'RegisterTools'; M =:= 'GetDashboard'; M =:= 'GetEvents';
                       M =:= 'WatchEvents'; M =:= 'GetStateAt' -> owner;
principal_rule(_) -> rules.

%% @doc Runs one RPC: `{reply, Map}', `streamed' (WatchVariables, which sent
%% its messages itself) or `{error, Reason}'.
-spec handle(atom(), map(), map(), dspex_grpc:ctx()) -> {reply, map()} | streamed | {error, term()}.
handle(M, Req, Call, Ctx) ->
    %% default deny: a principal never reaches an `owner' RPC of another session
    case principal_rule(M) of
        owner ->
            %% no session (node-wide views): no principal may act as it
            case dspex_acl:check_owner(case maps:get(session_id, Req, <<>>) of <<>> -> all; S -> S end,
                                       maps:get(opts, Call, #{})) of
                ok -> handle_(M, Req, Call, Ctx);
                Denied -> Denied
            end;
        _ -> handle_(M, Req, Call, Ctx)
    end.

handle_('Ping', #{message := Msg}, _Call, _Ctx) ->
    %% the reference server's answer, which snakepit clients know
    {reply, #{message => <<"pong: ", Msg/binary>>, server_time => now_us()}};
handle_('ListSessions', #{pattern := P, limit := L}, _Call, _Ctx) when L >= 0 ->
    Ids = lists:sort([S || S <- dspex_store:list_sessions(), P =:= <<>> orelse dspex_tools:glob(P, S)]),
    Shown = case L of 0 -> Ids; _ -> lists:sublist(Ids, L) end,
    {reply, #{total => length(Ids),
              sessions => [#{session_id => S, variable_count => N, created_at => C}
                           || S <- Shown, {ok, #{variable_count := N, created_at := C}} <- [dspex_store:get_session(S)]]}};
handle_('ListSessions', _Req, _Call, _Ctx) ->
    {error, {invalid_argument, limit}};
handle_('SelectModel', Req, _Call, _Ctx) -> dspex_models_grpc:select_model(Req);
handle_('RecordInference', Req, _Call, _Ctx) -> dspex_models_grpc:record_inference(Req);
handle_(M, #{session_id := <<>>}, _Call, _Ctx) when M =/= 'GetDashboard' ->
    {error, {invalid_argument, session_id}};
handle_(M, Req, Call, Ctx) ->
    rpc(M, Req, Call, Ctx).

%%% sessions -----------------------------------------------------------------

rpc('InitializeSession', #{session_id := S, metadata := Meta}, _Call, _Ctx) ->
    case dspex_store:create_session(S, #{metadata => Meta}) of
        {ok, _} ->
            {ok, Vars} = dspex_store:list(S),
            {reply, #{success => true, available_tools => #{},
                      initial_variables => maps:from_list([{N, var_to_pb(S, V, false)} || #{name := N} = V <- Vars])}};
        Error -> Error
    end;
rpc('CleanupSession', #{session_id := S}, _Call, _Ctx) ->
    case dspex_store:get_session(S) of
        {ok, #{variable_count := N}} ->
            Names = case dspex_store:list(S) of
                        {ok, Vs} -> [Name || #{name := Name} <- Vs];
                        _ -> []
                    end,
            case dspex_store:delete_session(S) of
                ok ->
                    [deleted(S, Name) || Name <- Names],
                    {reply, #{success => true, resources_cleaned => N}};
                {error, session_not_found} -> {reply, #{success => true, resources_cleaned => 0}};
                Error -> Error
            end;
        %% idempotent, as in the reference server: cleaning up a gone session is fine
        {error, session_not_found} -> {reply, #{success => true, resources_cleaned => 0}};
        Error -> Error
    end;
rpc('GetSession', #{session_id := S}, _Call, _Ctx) ->
    case dspex_store:get_session(S) of
        {ok, #{metadata := Meta, created_at := C, variable_count := N}} ->
            {reply, #{session_id => S, metadata => strmap(Meta), created_at => C, variable_count => N,
                      tool_count => 0}};
        Error -> Error
    end;
rpc('Heartbeat', #{session_id := S}, _Call, _Ctx) ->
    {reply, #{server_time => now_us(), session_valid => dspex_store:touch(S) =:= ok}};

%%% variables ----------------------------------------------------------------

rpc('RegisterVariable', #{name := <<>>}, _Call, _Ctx) ->
    %% a required field left out, not a name over the length limit
    {error, {invalid_argument, <<"name must not be empty">>}};
rpc('RegisterVariable', #{session_id := S, name := Name, type := TypeText, initial_value := Any,
                          constraints_json := Cons0, metadata := Meta, initial_binary_value := Bin},
    #{opts := Opts}, _Ctx) ->
    Cons = case Cons0 of undefined -> #{}; null -> #{}; _ -> Cons0 end,
    steps([fun() -> dspex_grpc_value:type_of(TypeText) end,
           fun(Type) -> with(dspex_grpc_value:decode(Type, Any, Bin), Type) end,
           fun({V, Type}) when is_map(Cons) ->
                   case dspex_store:register(S, Name, Type, V, #{constraints => Cons, metadata => Meta,
                                                                 changed_by => by(Opts)}) of
                       {ok, Id} -> {ok, {reply, #{success => true, variable_id => Id}}};
                       E -> E
                   end;
              (_) -> {error, {invalid_constraints, <<"constraints_json must be a JSON object">>}}
           end]);
rpc('GetVariable', #{session_id := S, variable_identifier := K}, #{opts := Opts}, _Ctx) ->
    case dspex_store:get(S, K, Opts) of
        {ok, V} -> {reply, #{variable => var_to_pb(S, V, true), from_cache => false}};
        Error -> Error
    end;
%% numbers from the wire are checked here, not trusted to mean "unset"
rpc('SetVariable', #{expected_version := EV}, _Call, _Ctx) when EV < 0 ->
    {error, {invalid_argument, <<"expected_version must be >= 0">>}};
rpc('SetVariable', #{session_id := S, variable_identifier := K, value := Any, metadata := Meta,
                     expected_version := EV, expect_version_zero := EZ, binary_value := Bin},
    #{opts := Opts}, _Ctx) ->
    steps([fun() -> value_for(S, K, Any, Bin, Opts) end,
           fun(V) ->
                   SetOpts0 = Opts#{metadata => Meta, changed_by => by(Opts)},
                   SetOpts1 = if EV > 0 -> SetOpts0#{expected_version => EV};
                                 EZ -> SetOpts0#{expected_version => 0};
                                 true -> SetOpts0
                              end,
                   case dspex_store:set(S, K, V, with_lock(S, K, Meta, SetOpts1)) of
                       {ok, NewV} -> {ok, {reply, #{success => true, new_version => NewV}}};
                       E -> E
                   end
           end]);
rpc('GetVariables', #{session_id := S, variable_identifiers := Keys}, #{opts := Opts}, _Ctx) ->
    case dspex_store:get_many(S, Keys, Opts) of
        {ok, #{found := Found, missing := Missing} = R} ->
            {reply, #{variables => maps:map(fun(_, V) -> var_to_pb(S, V, true) end, Found),
                      missing_variables => Missing ++ maps:get(denied, R, [])}};
        Error -> Error
    end;
rpc('SetVariables', #{session_id := S, updates := Ups, binary_updates := BinUps, metadata := Meta, atomic := Atomic},
    #{opts := Opts}, _Ctx) ->
    Keys = lists:usort(maps:keys(Ups) ++ maps:keys(BinUps)),
    Decoded = [{K, value_for(S, K, maps:get(K, Ups, undefined), maps:get(K, BinUps, <<>>), Opts)} || K <- Keys],
    Bad = maps:from_list([{K, R} || {K, {error, R}} <- Decoded]),
    Good = [{K, V, #{metadata => Meta, changed_by => by(Opts)}} || {K, {ok, V}} <- Decoded],
    if
        Atomic, map_size(Bad) > 0 -> {reply, batch_reply(false, Bad, #{})};
        true ->
            case dspex_store:set_many(S, Good, Opts#{atomic => Atomic}) of
                {ok, #{updated := Up, errors := Errs}} ->
                    All = maps:merge(Bad, Errs),
                    {reply, batch_reply(map_size(All) =:= 0, All, Up)};
                {ok, Versions} when Atomic -> {reply, batch_reply(true, #{}, Versions)};
                {error, {batch_failed, Errs}} -> {reply, batch_reply(false, Errs, #{})};
                Error -> Error
            end
    end;
rpc('ListVariables', #{session_id := S, pattern := P}, #{opts := Opts}, _Ctx) ->
    case dspex_store:list(S, case P of <<>> -> all; _ -> P end, Opts) of
        {ok, Vars} -> {reply, #{variables => [var_to_pb(S, V, true) || V <- Vars]}};
        Error -> Error
    end;
rpc('DeleteVariable', #{session_id := S, variable_identifier := K}, #{opts := Opts}, _Ctx) ->
    case name_of(S, K, Opts) of
        {ok, Name} ->
            case dspex_store:delete(S, K, Opts) of
                ok ->
                    deleted(S, Name),
                    {reply, #{success => true}};
                Error -> Error
            end;
        Error -> Error
    end;
rpc('WatchVariables', Req, Call, Ctx) ->
    watch(Req, Call, Ctx);

%%% history -------------------------------------------------------------------

rpc('GetVariableHistory', #{limit := L}, _Call, _Ctx) when L < 0 ->
    {error, {invalid_argument, <<"limit must be >= 0 (0: all kept versions)">>}};
rpc('GetVariableHistory', #{session_id := S, variable_identifier := K, limit := L}, #{opts := Opts}, _Ctx) ->
    steps([fun() -> dspex_store:get(S, K, Opts) end,
           fun(#{type := Type}) ->
                   case dspex_store:history(S, K, if L > 0 -> L; true -> all end, Opts) of
                       {ok, Es} -> {ok, {reply, #{entries => [history_to_pb(Type, E) || E <- Es]}}};
                       E -> E
                   end
           end]);
rpc('RollbackVariable', #{target_version := V}, _Call, _Ctx) when V < 0 ->
    {error, {invalid_argument, <<"target_version must be >= 0">>}};
rpc('RollbackVariable', #{session_id := S, variable_identifier := K, target_version := V}, #{opts := Opts}, _Ctx) ->
    steps([fun() -> dspex_store:rollback(S, K, V, Opts#{changed_by => by(Opts)}) end,
           fun(_) -> dspex_store:get(S, K, Opts) end,
           fun(Var) -> {ok, {reply, #{success => true, variable => var_to_pb(S, Var, true)}}} end]);

%%% dependencies ---------------------------------------------------------------

rpc('AddDependency', #{session_id := S, from_variable := F, to_variable := T, dependency_type := Ty}, _Call, _Ctx) ->
    case edge_type(Ty) of
        {ok, Type} ->
            case dspex_graph:add_dependency(S, F, T, Type) of
                ok -> {reply, #{success => true}};
                Error -> Error
            end;
        Error -> Error
    end;
rpc('RemoveDependency', #{session_id := S, from_variable := F, to_variable := T}, _Call, _Ctx) ->
    case dspex_graph:remove_dependency(S, F, T) of
        ok -> {reply, #{success => true}};
        Error -> Error
    end;
rpc('GetDependencies', #{session_id := S, variable_identifier := K}, _Call, _Ctx) ->
    names(dspex_graph:dependencies(S, K));
rpc('GetDependents', #{session_id := S, variable_identifier := K, transitive := true}, _Call, _Ctx) ->
    names(dspex_graph:all_dependents(S, K));
rpc('GetDependents', #{session_id := S, variable_identifier := K}, _Call, _Ctx) ->
    names(dspex_graph:dependents(S, K));
rpc('GetUpdateOrder', #{session_id := S, variable_identifier := K}, _Call, _Ctx) ->
    names(dspex_graph:update_order(S, K));

%%% optimization -----------------------------------------------------------------

rpc('StartOptimization', #{session_id := S, variable_identifier := K, optimizer_id := Id, optimizer_config := Cfg},
    #{opts := Opts, deadline := Deadline}, _Ctx) ->
    steps([fun() -> optimizer_opts(Cfg) end,
           fun(LockOpts) -> with(name_of(S, K, Opts), LockOpts) end,
           fun({Name, LockOpts}) ->
                   Wait = case {maps:get(timeout, LockOpts, infinity), Deadline} of
                              {infinity, D} -> D;
                              {T, infinity} -> T + 1000;
                              {T, D} -> min(T + 1000, D)
                          end,
                   case dspex_grpc_opt:start(S, Name, Id, maps:merge(LockOpts, Opts), Wait) of
                       {ok, #{token := Token}} ->
                           {ok, {reply, #{success => true,
                                          optimization_id => <<Id/binary, ":", (integer_to_binary(Token))/binary>>}}};
                       E -> E
                   end
           end]);
rpc('StopOptimization', #{session_id := S, variable_identifier := K, force := Force, optimizer_id := Id,
                          apply_best := Apply}, #{opts := Opts}, _Ctx) ->
    steps([fun() -> name_of(S, K, Opts) end,
           fun(Name) -> principal_may(S, Name, Opts, [optimize | [write || Apply]], Name) end,
           fun(Name) -> with(dspex_grpc_opt:stop(S, Name, Id, Force, Apply, Opts), Name) end,
           fun({#{applied := Applied} = R, _Name}) ->
                   case dspex_store:get(S, K, Opts) of
                       {ok, #{type := Type, value := V}} ->
                           {Any, _} = dspex_grpc_value:encode(Type, V, infinity_threshold()),
                           {ok, {reply, #{success => true, final_value => Any, applied => Applied,
                                          error_message => apply_error(R)}}};
                       E -> E
                   end
           end]);
rpc('GetOptimizationStatus', #{session_id := S, variable_identifier := K}, #{opts := Opts}, _Ctx) ->
    steps([fun() -> dspex_store:get(S, K, Opts) end,
           fun(#{name := Name, type := Type}) ->
                   with(dspex_locks:status(S, Name), {Name, Type})
           end,
           fun({St, {Name, Type}}) -> {ok, {reply, opt_status(S, Name, Type, St)}} end]);
rpc('ReportOptimizationProgress', #{session_id := S, variable_identifier := K, optimizer_id := Id, iteration := I,
                                    value := Any, metrics_json := Metrics0, binary_value := Bin},
    #{opts := Opts}, _Ctx) ->
    Metrics = case Metrics0 of undefined -> #{}; _ -> Metrics0 end,
    steps([fun() -> dspex_store:get(S, K, Opts) end,
           fun(#{name := Name, type := Type}) when is_map(Metrics), I >= 0 ->
                   with(dspex_grpc_value:decode(Type, Any, Bin), Name);
              (_) -> {error, {invalid_argument, <<"metrics_json must be a JSON object and iteration >= 0">>}}
           end,
           fun({_, Name} = VN) -> principal_may(S, Name, Opts, [optimize], VN) end,
           fun({V, Name}) ->
                   case dspex_grpc_opt:progress(S, Name, Id, I, V, Metrics, Opts) of
                       ok -> {ok, {reply, #{success => true}}};
                       E -> E
                   end
           end]);

%%% optimization studies (dspex_opt) -------------------------------------------

rpc('StartStudy', Req, #{opts := Opts}, _Ctx) -> dspex_opt_grpc:start_study(Req, Opts);
rpc('AskTrial', Req, #{opts := Opts}, _Ctx) -> dspex_opt_grpc:ask_trial(Req, Opts);
rpc('TellTrial', Req, #{opts := Opts}, _Ctx) -> dspex_opt_grpc:tell_trial(Req, Opts);
rpc('GetStudy', Req, #{opts := Opts}, _Ctx) -> dspex_opt_grpc:get_study(Req, Opts);
rpc('StopStudy', Req, #{opts := Opts}, _Ctx) -> dspex_opt_grpc:stop_study(Req, Opts);

%%% access control -------------------------------------------------------------

rpc('SetVariablePermissions', #{session_id := S, variable_identifier := K, rules := Rules0}, #{opts := Opts}, _Ctx) ->
    case rules(Rules0, []) of
        {ok, Rules} ->
            case dspex_acl:set_permissions(S, K, Rules, Opts) of
                ok -> {reply, #{success => true}};
                Error -> Error
            end;
        Error -> Error
    end;
rpc('CheckVariableAccess', #{session_id := S, variable_identifier := K, principal := P, permission := Perm,
                             context_json := Ctx0}, _Call, _Ctx) ->
    Context = case Ctx0 of undefined -> #{}; _ -> Ctx0 end,
    case permission(Perm) of
        {ok, A} when is_map(Context), P =/= <<>> ->
            case dspex_acl:check_access(S, K, P, A, Context) of
                ok -> {reply, #{allowed => true}};
                {error, access_denied} ->
                    {reply, #{allowed => false,
                              reason => <<"no rule grants ", Perm/binary, " to ", P/binary>>}};
                Error -> Error
            end;
        {ok, _} -> {error, {invalid_argument, <<"principal and a JSON object context are required">>}};
        Error -> Error
    end;

%%% dashboard -------------------------------------------------------------------

%%% tools the BEAM offers to Python (dspex_tools) ---------------------------------

rpc('GetExposedElixirTools', #{session_id := S}, #{opts := Opts}, _Ctx) ->
    {reply, #{tools => [tool_spec(T) || T <- dspex_tools:list(maps:get(as, Opts, S))]}};
rpc('ExecuteElixirTool', #{session_id := S, tool_name := Name} = Req, #{opts := Opts, deadline := Deadline}, _Ctx) ->
    Args = tool_args(Req),
    T0 = erlang:monotonic_time(millisecond),
    Result = dspex_tools:call(Name, Args, #{session => S, principal => maps:get(as, Opts, S),
                                           metadata => maps:get(metadata, Req, #{}), timeout => Deadline}),
    Ms = erlang:monotonic_time(millisecond) - T0,
    case Result of
        {ok, V} ->
            {reply, #{success => true, result => #{type_url => ?TOOL_RESULT_URL, value => V},
                      execution_time_ms => Ms, metadata => #{}}};
        %% the tool ran and failed: an answer (snakepit clients read error_message), not a status
        {error, {Kind, Reason}} when Kind =:= tool_error; Kind =:= tool_crashed; Kind =:= bad_result ->
            {reply, #{success => false, error_message => tool_failure(Kind, Reason),
                      execution_time_ms => Ms, metadata => #{<<"error_kind">> => atom_to_binary(Kind)}}};
        {error, _} = E -> E
    end;
%%% tools Python worker pools offer (dspex_tools:register_python/3) ------------------

rpc('RegisterTools', #{session_id := S, worker_id := W} = Req, _Call, _Ctx) ->
    %% worker_id names the worker's pool: "pool" or "pool/anything" (DSPEX_WORKER_POOL)
    [PoolText | _] = binary:split(W, <<"/">>),
    Specs = [#{name => N, description => maps:get(description, T, <<>>),
               parameters => [maps:with([name, type, description, required], P) || P <- maps:get(parameters, T, [])],
               supports_streaming => maps:get(supports_streaming, T, false),
               metadata => maps:get(metadata, T, #{}),
               allow => allow_of(maps:get(metadata, T, #{}))}
             || #{name := N} = T <- maps:get(tools, Req, [])],
    case pool_of(PoolText) of
        {ok, Pool} ->
            case dspex_tools:register_python(S, Pool, Specs) of
                {ok, Ids} -> {reply, #{success => true, tool_ids => Ids}};
                E -> E
            end;
        E -> E
    end;
rpc('ExecuteTool', #{session_id := S, tool_name := Name} = Req, #{opts := Opts, deadline := Deadline}, _Ctx) ->
    T0 = erlang:monotonic_time(millisecond),
    R = dspex_tools:call_python(S, Name, tool_args(Req), #{principal => maps:get(as, Opts, S), timeout => Deadline}),
    Ms = erlang:monotonic_time(millisecond) - T0,
    case R of
        {ok, V} -> {reply, #{success => true, result => #{type_url => ?TOOL_RESULT_URL, value => V},
                             execution_time_ms => Ms, metadata => #{}}};
        {error, {tool_error, Msg}} ->
            {reply, #{success => false, error_message => Msg, execution_time_ms => Ms,
                      metadata => #{<<"error_kind">> => <<"python_error">>}}};
        {error, _} = E -> E
    end;
rpc('ExecuteStreamingTool', #{session_id := S, tool_name := Name} = Req, #{opts := Opts, deadline := Deadline}, Ctx) ->
    %% the call runs in a helper process; its chunks reach this process, which
    %% streams each at once and then the final chunk (or the error status)
    Self = self(),
    Tag = make_ref(),
    Args = tool_args(Req),
    {Pid, MRef} = spawn_monitor(fun() ->
                                        Self ! {Tag, {done, dspex_tools:stream_python(S, Name, Args, {Self, Tag},
                                                                                       #{principal => maps:get(as, Opts, S),
                                                                                         timeout => Deadline})}}
                                end),
    stream_tool(Ctx, Tag, Pid, MRef, 0);
rpc('GetDashboard', #{session_id := S}, _Call, _Ctx) ->
    dashboard(S);


%%% event log (dspex_events) ------------------------------------------------------

rpc(M, Req, Call, Ctx) when M =:= 'GetEvents'; M =:= 'WatchEvents'; M =:= 'GetStateAt' ->
    case dspex_events:enabled() of
        %% the principal goes to dspex_events too, which applies the same rule
        true -> events_rpc(M, Req, maps:with([as, context], maps:get(opts, Call, #{})), Ctx);
        false -> {error, unavailable}
    end;

rpc(M, _Req, _Call, _Ctx) ->
    {error, {invalid_argument, <<"unsupported request for ", (atom_to_binary(M, utf8))/binary>>}}.

%%% event log ----------------------------------------------------------------------

events_rpc('GetEvents', #{since_sequence := From, until_sequence := To, limit := L}, _Acl, _Ctx)
  when From < 0; To < 0; L < 0; L > 100000 ->
    {error, {invalid_argument, <<"since_sequence and until_sequence must be >= 0, limit 0..100000">>}};
events_rpc('GetEvents', #{since_sequence := From, until_sequence := To, since_time := T0, until_time := T1}, _Acl, _Ctx)
  when From > 0, is_integer(T0); To > 0, is_integer(T1) ->
    {error, {invalid_argument, <<"a bound is a sequence or a time, not both">>}};
events_rpc('GetEvents', #{session_id := S, since_sequence := From, until_sequence := To, since_time := T0,
                          until_time := T1, types := Types, limit := L, descending := Desc,
                          include_archive := Arch}, Acl, _Ctx) ->
    Opts = maps:merge(Acl, maps:from_list([{since, {sequence, From}} || From > 0] ++ [{until, {sequence, To}} || To > 0]
                          ++ [{since, {time, T0}} || is_integer(T0)] ++ [{until, {time, T1}} || is_integer(T1)]
                          ++ [{types, Types} || Types =/= []]
                          ++ [{limit, case L of 0 -> 1000; _ -> L end},
                              {direction, case Desc of true -> backward; false -> forward end},
                              {include_archive, Arch}])),
    case dspex_events:read(S, Opts) of
        {ok, Evs} -> {reply, #{events => [dspex_grpc_event:to_pb(E) || E <- Evs]}};
        Error -> Error
    end;
events_rpc('GetStateAt', #{sequence := N}, _Acl, _Ctx) when N < 0 ->
    {error, {invalid_argument, <<"sequence must be >= 0">>}};
events_rpc('GetStateAt', #{session_id := S, sequence := N, time := T}, Acl, _Ctx) ->
    Point = if N > 0 -> {ok, {sequence, N}};
               is_integer(T), T > 0 -> {ok, {time, T}};
               true -> {error, {invalid_argument, <<"a sequence (> 0) or a time is required">>}}
            end,
    case Point of
        {ok, P} ->
            case dspex_events:state_at(S, P, Acl) of
                {ok, State} -> {reply, #{state_json => dspex_events:json_term(State)}};
                {error, not_found} -> {error, {session_not_found, S}};
                Error -> Error
            end;
        Error -> Error
    end;
events_rpc('WatchEvents', #{from_position := P, from_sequence := N}, _Acl, _Ctx) when P < 0; N < 0 ->
    {error, {invalid_argument, <<"from_position and from_sequence must be >= 0">>}};
events_rpc('WatchEvents', #{session_id := S, types := Types, from_position := P, from_sequence := N}, Acl,
           {Port, _} = Ctx) ->
    _ = is_port(Port) andalso erlang:monitor(port, Port),
    Filter = maps:from_list([{session, S}] ++ [{types, Types} || Types =/= []]),
    case watch_events_from(S, P, N, Acl) of
        {ok, From} ->
            case dspex_events:subscribe(Filter, self(), Acl#{from => From}) of
                {ok, Ref} -> watch_events_loop(Filter, Ref, N, Ctx);
                Error -> Error
            end;
        Error -> Error
    end.

%% The position to subscribe from. From a sequence: that event's position when
%% it is stored; else the position after the session's last stored event (any
%% event with a higher sequence comes later), events below the sequence skipped.
watch_events_from(_S, P, _N, _Acl) when P > 0 -> {ok, P};
watch_events_from(_S, 0, 0, _Acl) -> {ok, live};
watch_events_from(S, 0, N, Acl) ->
    case dspex_events:read(S, Acl#{since => {sequence, N}, limit => 1}) of
        {ok, [#{position := P}]} -> {ok, P};
        {ok, []} ->
            case dspex_events:read(S, Acl#{direction => backward, limit => 1}) of
                {ok, [#{position := Last}]} -> {ok, Last + 1};
                {ok, []} -> {ok, 1};
                Error -> Error
            end;
        Error -> Error
    end.

%% Streams every event; a subscription dropped for falling behind (the port
%% could not keep up) is resumed right after the last event sent, so the
%% stream has no gap and no duplicate. Ends when the call is cancelled (the
%% handler is killed) or its port goes away.
watch_events_loop(Filter, Ref, MinSeq, Ctx) ->
    receive
        {dspex_event, Ref, #{sequence := Seq}} when Seq < MinSeq ->
            watch_events_loop(Filter, Ref, MinSeq, Ctx);
        {dspex_event, Ref, E} ->
            dspex_grpc:stream(Ctx, dspex_grpc_event:to_pb(E)),
            watch_events_loop(Filter, Ref, MinSeq, Ctx);
        {dspex_event_overflow, Ref, Last} ->
            case dspex_events:subscribe(Filter, self(), #{from => Last + 1}) of
                {ok, Ref1} -> watch_events_loop(Filter, Ref1, MinSeq, Ctx);
                Error -> Error
            end;
        {'DOWN', _, port, _, _} ->
            dspex_events:unsubscribe(Ref),
            streamed;
        _Other ->
            watch_events_loop(Filter, Ref, MinSeq, Ctx)
    end.

%%% watch --------------------------------------------------------------------------

%% Subscribes first, then reads the initial values: a change racing the read
%% is either in the initial value or streamed (versions at or below the
%% initial one are skipped), never lost.
watch(#{session_id := S, variable_identifiers := Keys, include_initial_values := Init}, #{opts := Opts},
      {Port, _} = Ctx) ->
    %% a stream outliving its port (the owner itself died) would never be cancelled
    _ = is_port(Port) andalso erlang:monitor(port, Port),
    case dspex_store:watch(S, Keys, self(), Opts) of
        {error, _} = E -> E;
        Ref ->
            case dspex_store:get_many(S, Keys, Opts) of
                {ok, #{found := Found}} ->
                    Vars = maps:from_list([{N, V} || #{name := N} = V <- maps:values(Found)]),
                    [ok = pg:join(dspex_grpc_watch, {S, N}, self()) || N <- maps:keys(Vars)],
                    Init andalso [dspex_grpc:stream(Ctx, update(S, V, <<"initial_value">>, <<>>, #{}))
                                  || V <- lists:sort(fun(A, B) -> maps:get(name, A) =< maps:get(name, B) end,
                                                     maps:values(Vars))],
                    watch_loop(S, Ref, Vars, Ctx);
                Error ->
                    dspex_store:unwatch(Ref),
                    Error
            end
    end.

watch_loop(S, Ref, Vars, Ctx) ->
    receive
        {dspex_variable, Ref, S, Name, _Old, New, #{version := Ver} = M} ->
            case maps:get(Name, Vars, undefined) of
                #{version := Seen} when Ver =< Seen -> watch_loop(S, Ref, Vars, Ctx);
                Var0 ->
                    Base = case Var0 of undefined -> fetch(S, Name); _ -> Var0 end,
                    Var = Base#{value => New, version => Ver, updated_at => maps:get(updated_at, M, now_us()),
                                metadata => maps:merge(maps:get(metadata, Base, #{}), maps:get(metadata, M, #{}))},
                    dspex_grpc:stream(Ctx, update(S, Var, <<"value_change">>, maps:get(changed_by, M, undefined),
                                                  maps:get(metadata, M, #{}))),
                    watch_loop(S, Ref, Vars#{Name => Var}, Ctx)
            end;
        {dspex_grpc_deleted, S, Name} when is_map_key(Name, Vars) ->
            #{Name := Var} = Vars,
            dspex_grpc:stream(Ctx, update(S, Var#{updated_at => now_us()}, <<"deleted">>, undefined, #{})),
            Left = maps:remove(Name, Vars),
            case map_size(Left) of
                0 -> dspex_grpc:close(Ctx), streamed; %% nothing left to watch
                _ -> watch_loop(S, Ref, Left, Ctx)
            end;
        {'DOWN', _, port, _, _} ->
            dspex_store:unwatch(Ref),
            streamed;
        {dspex_watch_lost, Ref, S} ->
            %% cluster: the session's owner went away or the session moved;
            %% UNAVAILABLE tells the client to watch again (on the new owner)
            {error, unavailable};
        _Other ->
            watch_loop(S, Ref, Vars, Ctx)
    end.

%% Deletions are told to the watch streams of the variable (the store ends a
%% deleted variable's watches without a message).
deleted(S, Name) ->
    [P ! {dspex_grpc_deleted, S, Name} || P <- pg:get_members(dspex_grpc_watch, {S, Name})],
    ok.

fetch(S, Name) ->
    case dspex_store:get(S, Name) of
        {ok, V} -> V;
        _ -> #{name => Name, id => Name, type => string, constraints => #{}, metadata => #{}}
    end.

update(S, #{id := Id, updated_at := At} = V, Type, By, Meta) ->
    #{variable_id => Id, variable => var_to_pb(S, V, true), update_source => text(By),
      update_metadata => strmap(Meta), timestamp => At, update_type => Type}.

%%% conversions -------------------------------------------------------------------

%% @doc A store variable as a `Variable' message map. `Full' adds the access
%% rules and the optimization status (one NIF call and one ETS read).
-spec var_to_pb(dspex_store:session_id(), dspex_store:var(), boolean()) -> map().
var_to_pb(S, #{id := Id, name := Name, type := Type, value := Value, version := Ver} = V, Full) ->
    {Any, Bin} = dspex_grpc_value:encode(Type, Value),
    Meta = maps:get(metadata, V, #{}),
    Base = #{id => Id, name => Name, type => atom_to_binary(Type, utf8), value => Any,
             constraints_json => maps:get(constraints, V, #{}), metadata => strmap(Meta),
             source => source(Meta), last_updated_at => maps:get(updated_at, V, undefined),
             version => Ver, binary_value => Bin},
    case Full of
        false -> Base;
        true ->
            Rules = case dspex_acl:get_permissions(S, Name) of
                        {ok, [_ | _] = R} -> [rule_json(X) || X <- R];
                        _ -> undefined
                    end,
            Opt = case dspex_grpc_opt:lookup(S, Name) of
                      {ok, #{optimizer_id := OId, started_at := At}} ->
                          #{optimizing => true, optimizer_id => OId, started_at => At};
                      error -> undefined
                  end,
            Base#{access_control_json => Rules, optimization_status => Opt}
    end.

source(#{source := <<"elixir">>}) -> 'ELIXIR';
source(#{<<"source">> := <<"elixir">>}) -> 'ELIXIR';
source(_) -> 'PYTHON'.

rule_json(R) ->
    #{session_pattern => maps:get(session_pattern, R), permissions => maps:get(permissions, R),
      conditions => maps:get(conditions, R, #{})}.

history_to_pb(Type, #{version := V, value := Val} = E) ->
    {Any, Bin} = dspex_grpc_value:encode(Type, Val),
    #{version => V, value => Any, binary_value => Bin, timestamp => maps:get(updated_at, E, undefined),
      changed_by => text(maps:get(changed_by, E, undefined)), metadata => strmap(maps:get(metadata, E, #{}))}.

opt_status(S, Name, Type, St) ->
    case St of
        #{locked := true, optimizer := OId, token := T} ->
            Started = case dspex_grpc_opt:lookup(S, Name) of
                          {ok, #{started_at := At}} -> At;
                          error -> undefined
                      end,
            {BestAny, BestBin, BestIter, BestMetrics} =
                case maps:get(best, St, undefined) of
                    #{value := BV, iteration := BI} ->
                        {A, B} = dspex_grpc_value:encode(Type, BV),
                        {A, B, BI, dspex_grpc_opt:best_metrics(S, Name)};
                    _ -> {undefined, <<>>, 0, undefined}
                end,
            #{status => #{optimizing => true, optimizer_id => text(OId), started_at => Started},
              fencing_token => T, priority => maps:get(priority, St, 0), iterations => maps:get(iterations, St, 0),
              waiters => maps:get(waiters, St, 0), best_value => BestAny, best_binary_value => BestBin,
              best_iteration => BestIter, best_metrics_json => BestMetrics};
        _ ->
            #{status => #{optimizing => false}, waiters => maps:get(waiters, St, 0)}
    end.

batch_reply(Success, Errors, Versions) ->
    #{success => Success,
      errors => maps:map(fun(_, R) -> element(2, dspex_grpc_status:of_error(R)) end, Errors),
      new_versions => Versions}.

apply_error(#{apply_error := R}) -> element(2, dspex_grpc_status:of_error(R));
apply_error(_) -> <<>>.

%% The value of a write: the variable's own type decides (an Any's type_url
%% is only needed when the variable is unknown, which then fails anyway).
value_for(_S, _K, undefined, <<>>, _Opts) -> {error, {invalid_value, <<"no value given">>}};
value_for(S, K, Any, Bin, Opts) ->
    case typed_url(Any) of
        {ok, Type} when Bin =:= <<>> -> dspex_grpc_value:decode(Type, Any, Bin);
        _ ->
            case dspex_store:get(S, K, Opts) of
                {ok, #{type := Type}} -> dspex_grpc_value:decode(Type, Any, Bin);
                Error -> Error
            end
    end.

typed_url(#{type_url := U}) when U =/= <<>> -> dspex_grpc_value:type_of(U);
typed_url(_) -> error.

%% A write that names the running optimizer (metadata optimizer_id) passes its
%% lock, when it comes from the principal that started the optimization (or
%% the session itself): the optimizer id travels in clear, so naming it is no
%% proof of being that optimizer; another principal's write stays locked out.
with_lock(S, K, #{<<"optimizer_id">> := Id}, Opts) ->
    Caller = maps:get(as, Opts, S),
    case name_of(S, K, #{}) of
        {ok, Name} ->
            case dspex_grpc_opt:lookup(S, Name) of
                {ok, #{optimizer_id := Id, token := T} = Info} ->
                    case Caller =:= S orelse Caller =:= maps:get(principal, Info, S) of
                        true -> Opts#{lock => T};
                        false -> Opts
                    end;
                _ -> Opts
            end;
        _ -> Opts
    end;
with_lock(_, _, _, Opts) -> Opts.

%% A principal steering an optimization needs what starting one needs
%% (`optimize', which the lock checks at grant) and, to apply its best, `write'
%% of its own: the write itself runs as the lock's principal, who may be the
%% session. The session itself needs nothing. `{ok, Pass}' when allowed.
principal_may(S, Name, Opts, Perms, Pass) ->
    case maps:get(as, Opts, S) of
        S -> {ok, Pass};
        P ->
            Ctx = maps:get(context, Opts, #{}),
            case [E || Perm <- Perms, {error, _} = E <- [dspex_acl:check_access(S, Name, P, Perm, Ctx)]] of
                [] -> {ok, Pass};
                [E | _] -> E
            end
    end.

name_of(S, K, Opts) ->
    case dspex_store:get(S, K, Opts) of
        {ok, #{name := N}} -> {ok, N};
        Error -> Error
    end.

names({ok, L}) -> {reply, #{variables => L}};
names(Error) -> Error.

edge_type(<<>>) -> {ok, data};
edge_type(T) ->
    try {ok, binary_to_existing_atom(T, utf8)}
    catch error:badarg -> {error, {invalid_argument, <<"unknown dependency_type ", T/binary>>}}
    end.

permission(P) ->
    case lists:member(P, ?PERMISSIONS) of
        true -> {ok, binary_to_existing_atom(P, utf8)};
        false -> {error, {invalid_argument, <<"permission must be read, write, observe or optimize">>}}
    end.

rules([], Acc) -> {ok, lists:reverse(Acc)};
rules([#{session_pattern := P, permissions := Ps, conditions_json := C} | T], Acc) ->
    Perms = [permission(X) || X <- Ps],
    case [E || {error, _} = E <- Perms] of
        [E | _] -> E;
        [] when C =:= undefined; is_map(C) ->
            Rule = #{session_pattern => case P of <<"*">> -> any; _ -> P end,
                     permissions => [A || {ok, A} <- Perms]},
            rules(T, [case C of undefined -> Rule; _ -> Rule#{conditions => C} end | Acc]);
        [] -> {error, {invalid_argument, <<"conditions_json must be a JSON object">>}}
    end.

optimizer_opts(Cfg) ->
    maps:fold(fun(_, _, {error, _} = E) -> E;
                 (K, V, {ok, Acc}) ->
                      case opt(K, V) of
                          {ok, Key, Val} -> {ok, Acc#{Key => Val}};
                          error -> {error, {invalid_argument, <<"optimizer_config ", K/binary, "=", V/binary>>}}
                      end
              end, {ok, #{conflict => abort}}, Cfg).

opt(<<"conflict">>, V) when V =:= <<"wait">>; V =:= <<"abort">>; V =:= <<"preempt">> ->
    {ok, conflict, binary_to_existing_atom(V, utf8)};
opt(<<"objective">>, V) when V =:= <<"minimize">>; V =:= <<"maximize">> ->
    {ok, objective, binary_to_existing_atom(V, utf8)};
opt(<<"metric">>, V) -> {ok, metric, V};
opt(K, V) when (K =:= <<"priority">> orelse K =:= <<"lease_ms">> orelse K =:= <<"timeout_ms">>),
               byte_size(V) =< 20 -> %% an int64 at most: no bignum parsed from the wire
    try binary_to_integer(V) of
        N when N < -16#8000000000000000; N > 16#7FFFFFFFFFFFFFFF -> error;
        N when K =:= <<"priority">> -> {ok, priority, N};
        N when N >= 0, K =:= <<"lease_ms">> -> {ok, lease, max(N, 1)};
        N when N >= 0 -> {ok, timeout, N};
        _ -> error
    catch error:badarg -> error
    end;
opt(_, _) -> error.

infinity_threshold() -> 16#7FFFFFFF.

%% map<string, string> wants binaries both sides
strmap(M) when is_map(M) -> maps:fold(fun(K, V, A) -> A#{text(K) => text(V)} end, #{}, M);
strmap(_) -> #{}.

text(undefined) -> <<>>;
text(B) when is_binary(B) -> B;
text(A) when is_atom(A) -> atom_to_binary(A, utf8);
text(I) when is_integer(I) -> integer_to_binary(I);
text(F) when is_float(F) -> float_to_binary(F, [short]);
text(T) -> unicode:characters_to_binary(io_lib:format("~0p", [T])).

now_us() -> erlang:system_time(microsecond).

stream_tool(Ctx, Tag, Pid, MRef, N) ->
    receive
        {Tag, {chunk, Data}} ->
            Chunk = #{chunk_id => integer_to_binary(N + 1), data => json_bytes(Data), is_final => false, metadata => #{}},
            dspex_grpc:stream(Ctx, Chunk),
            stream_tool(Ctx, Tag, Pid, MRef, N + 1);
        {Tag, {done, R}} ->
            erlang:demonitor(MRef, [flush]),
            case R of
                {ok, _} ->
                    dspex_grpc:stream(Ctx, #{chunk_id => integer_to_binary(N + 1), data => <<>>, is_final => true,
                                             metadata => #{<<"chunks">> => integer_to_binary(N)}}),
                    streamed;
                {error, {tool_error, Msg}} ->
                    %% the function raised mid-stream: the final chunk says so (chunks sent stay sent)
                    dspex_grpc:stream(Ctx, #{chunk_id => integer_to_binary(N + 1), data => <<>>, is_final => true,
                                             metadata => #{<<"chunks">> => integer_to_binary(N),
                                                           <<"error">> => Msg, <<"error_kind">> => <<"python_error">>}}),
                    streamed;
                {error, _} = E -> E
            end;
        {'DOWN', MRef, process, Pid, Reason} ->
            {error, {crash, Reason}}
    end.

json_bytes(Data) ->
    case dspex_json:encode(Data) of
        {ok, J} -> iolist_to_binary(J);
        {error, _} -> <<"null">>
    end.

tool_args(Req) -> maps:map(fun(_, Any) -> tool_arg(Any) end, maps:get(parameters, Req, #{})).

%% "allow" in a registration's metadata: comma-separated principal globs.
allow_of(#{<<"allow">> := A}) -> [P || P <- binary:split(A, <<",">>, [global, trim_all]), P =/= <<>>];
allow_of(_) -> [].

pool_of(Text) ->
    try binary_to_existing_atom(Text, utf8) of
        Pool -> {ok, Pool}
    catch error:badarg -> {error, {unknown_pool, Text}}
    end.

tool_spec(#{name := N, description := D, parameters := Ps, metadata := M}) ->
    #{name => N, description => D, metadata => M, supports_streaming => false, required_variables => [],
      parameters => [#{name => PN, type => PT, description => PD, required => PR}
                     || #{name := PN, type := PT, description := PD, required := PR} <- Ps]}.

%% An argument's Any: its JSON body, already parsed by the port (snakepit
%% clients send JSON text under a StringValue type_url).
tool_arg(#{value := V}) -> V;
tool_arg(_) -> null.

tool_failure(tool_error, R) when is_binary(R) -> R;
tool_failure(tool_error, R) -> text(R);
tool_failure(tool_crashed, R) -> <<"tool crashed: ", (text(R))/binary>>;
tool_failure(bad_result, R) -> <<"tool result has no JSON form: ", (text(R))/binary>>.

by(#{as := P}) -> P;
by(_) -> <<"grpc">>.

with({ok, V}, X) -> {ok, {V, X}};
with(Error, _) -> Error.

%% Runs steps, each taking the previous result; the last returns {ok, Reply}.
steps([F | Fs]) -> steps(Fs, F()).
steps(_, {error, _} = E) -> E;
steps([], {ok, R}) -> R;
steps([F | Fs], {ok, V}) -> steps(Fs, F(V));
steps(_, Other) -> {error, Other}.

%%% dashboard --------------------------------------------------------------------------

dashboard(S) ->
    %% the node's own figures, plus the analytics of dspex_metrics when it runs
    Own = own_dashboard(S),
    Json = json_safe(case catch dspex_metrics:dashboard() of
                         #{} = M -> Own#{metrics => M};
                         _ -> Own
                     end),
    Sessions = dspex_store:list_sessions(),
    Active = dspex_locks:active(),
    VarCount = lists:sum([N || Id <- Sessions, {ok, #{variable_count := N}} <- [dspex_store:get_session(Id)]]),
    {reply, #{dashboard_json => Json, generated_at => now_us(), session_count => length(Sessions),
              variable_count => VarCount, active_optimizations => length(Active)}}.

%% What the node knows besides the metrics: sessions, optimizations, gRPC, limits.
own_dashboard(S) ->
    Sessions = dspex_store:list_sessions(),
    Base = #{node => node(), sessions => length(Sessions),
             optimizations => [maps:without([pid], A) || A <- dspex_locks:active()],
             grpc => #{in_flight => catch dspex_grpc:in_flight(), address => list_to_binary(dspex_grpc:address())},
             limits => dspex_store:limits(),
             memory_bytes => erlang:memory(total)},
    case S of
        <<>> -> Base;
        _ ->
            case dspex_store:list(S) of
                {ok, Vars} ->
                    Base#{session => S,
                          variables => [#{name => N, type => T, version => V} || #{name := N, type := T, version := V} <- Vars]};
                _ -> Base#{session => S, variables => []}
            end
    end.

json_safe(M) when is_map(M) -> maps:fold(fun(K, V, A) -> A#{json_key(K) => json_safe(V)} end, #{}, M);
json_safe(L) when is_list(L) ->
    case io_lib:printable_unicode_list(L) andalso L =/= [] of
        true -> unicode:characters_to_binary(L);
        false -> [json_safe(X) || X <- L]
    end;
json_safe(T) when is_tuple(T) -> [json_safe(X) || X <- tuple_to_list(T)];
json_safe(B) when is_binary(B) ->
    case unicode:characters_to_binary(B) of
        B -> B;
        _ -> base64:encode(B)
    end;
json_safe(X) when is_number(X); is_atom(X) -> X;
json_safe(X) -> text(X).

json_key(K) when is_binary(K); is_atom(K) -> K;
json_key(K) -> text(K).
