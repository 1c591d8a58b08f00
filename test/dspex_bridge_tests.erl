%% EUnit tests of the application's shape: the supervision tree restarts what
%% depends on a crashed part and nothing else (see dspex_bridge_sup), and the
%% public header include/dspex_bridge.hrl matches what the bridge sends.
-module(dspex_bridge_tests).
-include_lib("eunit/include/eunit.hrl").
-include("dspex_bridge.hrl").

-define(CORE, [dspex_events, dspex_metrics_server, dspex_acl_audit, dspex_session_sweeper, dspex_locks,
               dspex_breaker_server, dspex_workers_sup, dspex_propagator_sup, dspex_opt_sup, dspex_prometheus, dspex_console]).

setup() ->
    %% the whole tree, whatever an earlier module in this VM left configured
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    ok = application:set_env(dspex_bridge, grpc_enabled, true),
    ok = application:set_env(dspex_bridge, prometheus_enabled, true),
    %% any free ports: other nodes may serve the defaults on this machine
    [ok = application:set_env(dspex_bridge, K, V)
     || {K, V, Default} <- [{grpc_listen, "127.0.0.1:0", "127.0.0.1:50051"}, {prometheus_port, 0, 9568}, {console_port, 0, 9570}],
        application:get_env(dspex_bridge, K) =:= {ok, Default}],
    {ok, _} = application:ensure_all_started(dspex_bridge),
    ok.

sup_test_() ->
    {setup, fun setup/0, fun(_) -> ok end,
     %% restarts are awaited by bounded polling (30 s each), longer than
     %% EUnit's default 5 s per test on a loaded machine
     {inorder, [{timeout, 120, F} || F <- [fun tree_shape/0,
                                           fun core_child_restarts_alone/0,
                                           fun grpc_restarts_alone/0,
                                           fun cluster_restart_restarts_grpc_not_core/0,
                                           fun core_restart_restarts_everything_after_it/0]]}}.

header_test_() ->
    {setup, fun setup/0, fun(_) -> ok end,
     [fun watch_message_is_the_record/0, fun preempted_message_is_the_record/0,
      fun every_event_in_src_is_in_the_header/0]}.

%%% supervision ---------------------------------------------------------------

tree_shape() ->
    ?assertEqual([dspex_core_sup, dspex_cluster_sup, dspex_region_sup, dspex_models_server, dspex_grpc_sup],
                 [Id || {Id, _, _, _} <- lists:reverse(supervisor:which_children(dspex_bridge_sup))]),
    ?assertEqual(lists:sort(?CORE), lists:sort([Id || {Id, _, _, _} <- supervisor:which_children(dspex_core_sup)])).

%% A snapshot of every process whose restart (or not) the design fixes.
pids() ->
    maps:from_list([{N, whereis(N)} || N <- [dspex_core_sup, dspex_cluster_sup, dspex_models_server, dspex_grpc_sup,
                                             dspex_grpc, dspex_grpc_opt | ?CORE]]
                   ++ [{grpc_os_pid, grpc_os_pid()}]).

grpc_os_pid() ->
    {ok, _} = dspex_grpc:await_listening(30000),
    {ok, OsPid} = dspex_grpc:os_pid(),
    OsPid.

%% Kills Name, waits for it to be replaced, and returns the processes that
%% were replaced (by name), everything else having stayed.
kill_and_await(Name) ->
    crash_and_await(Name, fun() -> kill(Name) end).

%% Crashes a supervisor the way it crashes by itself: one of its children
%% keeps dying until the supervisor's restart intensity is exceeded, so it
%% stops its children and exits. (A supervisor killed with `kill' leaves its
%% children to die asynchronously, and a registered one may not have died yet
%% when the supervisor is started again: not a failure the tree can meet.)
escalate_and_await(Sup, Child) ->
    crash_and_await(Sup, fun() -> escalate(Sup, Child, 20) end).

escalate(Sup, _Child, 0) -> error({not_escalated, Sup});
escalate(Sup, Child, N) ->
    Old = whereis(Sup),
    kill(Child),
    case await_replaced(Child, undefined, 3000) =/= undefined andalso whereis(Sup) =:= Old of
        true -> escalate(Sup, Child, N - 1);
        false -> ok
    end.

kill(Name) ->
    Old = whereis(Name),
    Mon = monitor(process, Old),
    exit(Old, kill),
    receive {'DOWN', Mon, process, Old, _} -> ok end.

crash_and_await(Name, Crash) ->
    Before = pids(),
    Old = whereis(Name),
    Crash(),
    New = await_replaced(Name, Old, 3000),
    ?assert(is_pid(New)),
    await_tree(),
    After = pids(),
    lists:sort([K || {K, V} <- maps:to_list(Before), maps:get(K, After) =/= V]).

%% Bounded polling (30 s): the supervisor restarts asynchronously.
await_replaced(_Name, _Old, 0) -> undefined;
await_replaced(Name, Old, N) ->
    case whereis(Name) of
        P when is_pid(P), P =/= Old -> P;
        _ -> timer:sleep(10), await_replaced(Name, Old, N - 1)
    end.

%% Every registered process of the tree is back (a rest_for_one restart
%% restarts the later children one after the other).
await_tree() -> await_tree(3000).
await_tree(0) -> ?assert(false);
await_tree(N) ->
    case lists:all(fun(Name) -> is_pid(whereis(Name)) end,
                   [dspex_core_sup, dspex_cluster_sup, dspex_grpc_sup, dspex_grpc, dspex_grpc_opt | ?CORE]) of
        true -> ok;
        false -> timer:sleep(10), await_tree(N - 1)
    end.

%% A derived variable: its propagator (and the derive function only it holds)
%% must survive every restart but the core's.
derived_session() ->
    S = iolist_to_binary(["sup_", integer_to_list(erlang:unique_integer([positive]))]),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, float, 1.0),
    {ok, _} = dspex_graph:define_derived(S, b, float, [a], fun(#{a := A}) -> A * 10 end),
    S.

still_derives(S, V) ->
    {ok, _} = dspex_store:set(S, a, V, #{propagate => sync}),
    ?assertEqual({ok, V * 10}, dspex_store:get_value(S, b)).

core_child_restarts_alone() ->
    S = derived_session(),
    Prop = dspex_propagator:whereis_session(S),
    ?assertEqual([dspex_locks], kill_and_await(dspex_locks)),
    ?assertEqual(Prop, dspex_propagator:whereis_session(S)),
    still_derives(S, 2.0),
    ?assertEqual([dspex_session_sweeper], kill_and_await(dspex_session_sweeper)).

grpc_restarts_alone() ->
    ?assertEqual([dspex_grpc, dspex_grpc_opt, dspex_grpc_sup, grpc_os_pid],
                 escalate_and_await(dspex_grpc_sup, dspex_grpc_opt)).

cluster_restart_restarts_grpc_not_core() ->
    S = derived_session(),
    Prop = dspex_propagator:whereis_session(S),
    %% without a cluster configured it has no child to make it escalate:
    %% stop it as an escalating supervisor stops (children first, then itself)
    ?assertEqual([dspex_cluster_sup, dspex_grpc, dspex_grpc_opt, dspex_grpc_sup, dspex_models_server, grpc_os_pid],
                 crash_and_await(dspex_cluster_sup, fun() -> sys:terminate(dspex_cluster_sup, crashed) end)),
    ?assertEqual(Prop, dspex_propagator:whereis_session(S)),
    still_derives(S, 3.0),
    {ok, _} = dspex_grpc:await_listening(10000).

core_restart_restarts_everything_after_it() ->
    S = derived_session(),
    Replaced = escalate_and_await(dspex_core_sup, dspex_session_sweeper),
    ?assertEqual(lists:sort([dspex_core_sup, dspex_cluster_sup, dspex_grpc, dspex_grpc_opt, dspex_grpc_sup,
                             dspex_models_server, grpc_os_pid | ?CORE]), Replaced),
    %% the store itself lives in the NIF: the session and its values stay
    ?assertEqual({ok, 10.0}, dspex_store:get_value(S, b)),
    {ok, _} = dspex_grpc:await_listening(10000).

%%% header --------------------------------------------------------------------

watch_message_is_the_record() ->
    S = <<"hdr_watch">>,
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 1),
    Ref = dspex_store:watch(S, [x], self()),
    {ok, 1} = dspex_store:set(S, x, 2, #{changed_by => me}),
    receive
        #dspex_variable{ref = Ref, session = S, name = <<"x">>, old_value = 1, new_value = 2,
                        meta = #{version := 1, previous_version := 0, changed_by := me}} -> ok
    after 5000 -> ?assert(false)
    end,
    ok = dspex_store:delete_session(S).

preempted_message_is_the_record() ->
    S = <<"hdr_locks">>,
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, t, float, 0.5),
    {ok, _Low} = dspex_locks:acquire(S, t, low, #{conflict => abort, priority => 1}),
    Me = self(),
    Other = spawn(fun() ->
                          Me ! {self(), dspex_locks:acquire(S, t, high, #{conflict => preempt, priority => 9})},
                          receive stop -> ok end
                  end),
    receive {Other, {ok, _}} -> ok after 5000 -> ?assert(false) end,
    receive #dspex_preempted{session = S, variable = <<"t">>, token = T} -> ?assert(is_integer(T))
    after 5000 -> ?assert(false)
    end,
    Other ! stop,
    ok = dspex_store:delete_session(S).

%% Every event list `[dspex, ...]' written in src/ (a variable stands for
%% any atom; a span prefix for its start/stop/exception events) is an event
%% of ?DSPEX_EVENTS, and every event of ?DSPEX_EVENTS is built somewhere.
every_event_in_src_is_in_the_header() ->
    Src = filename:join(code:lib_dir(dspex_bridge), "src"),
    Files = filelib:wildcard(filename:join(Src, "*.erl")),
    ?assert(length(Files) > 10),
    Patterns = lists:usort(lists:append([event_patterns(F) || F <- Files])),
    Events = ?DSPEX_EVENTS,
    Unknown = [P || P <- Patterns, not lists:any(fun(E) -> covers(P, E) end, Events)],
    ?assertEqual([], Unknown),
    Unused = [E || E <- Events, not lists:any(fun(P) -> covers(P, E) end, Patterns)],
    ?assertEqual([], Unused).

covers(P, E) when length(P) =:= length(E) -> lists:all(fun({'_', _}) -> true; ({A, A}) -> true; (_) -> false end,
                                                      lists:zip(P, E));
covers(P, E) when length(P) + 1 =:= length(E) ->
    lists:member(lists:last(E), [start, stop, exception]) andalso covers(P, lists:droplast(E));
covers(_, _) -> false.

%% Event lists in the preprocessed forms (so macros of the header count).
event_patterns(File) ->
    Dir = code:lib_dir(dspex_bridge),
    {ok, Forms} = epp:parse_file(File, [{includes, [filename:join(Dir, "include"), filename:join(Dir, "src")]}]),
    patterns(Forms, []).

patterns({cons, _, {atom, _, dspex}, Tail} = Cons, Acc) ->
    case elements(Tail, [dspex]) of
        {ok, P} when length(P) >= 3 -> [P | Acc];
        _ -> patterns(tuple_to_list(Cons), Acc)
    end;
patterns(T, Acc) when is_tuple(T) -> patterns(tuple_to_list(T), Acc);
patterns(L, Acc) when is_list(L) -> lists:foldl(fun patterns/2, Acc, L);
patterns(_, Acc) -> Acc.

elements({nil, _}, Acc) -> {ok, lists:reverse(Acc)};
elements({cons, _, {atom, _, A}, Tail}, Acc) -> elements(Tail, [A | Acc]);
elements({cons, _, {var, _, _}, Tail}, Acc) -> elements(Tail, ['_' | Acc]);
elements(_, _) -> no.
