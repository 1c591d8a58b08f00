%% @doc Dependencies between the variables of a session, and derived variables.
%%
%% An edge `From -> To' means To depends on From: when From commits, To is
%% recomputed (if it is derived). Each session has one graph, kept in C
%% (`c_src/core/graph.c') with an incremental topological order
%% (Pearce–Kelly): adding an edge visits only the region between its ends, so
%% cycle checks stay cheap on large graphs. The graph goes with its session, and
%% deleting a variable removes its edges.
%%
%% Variables may be named by name (binary or ASCII atom) or id; results name
%% variables by their name (a binary).
%%
%% With a cluster (`dspex_cluster') every call runs on the session's owner:
%% edge changes through its writer (the replicas receive the whole session),
%% queries there, and `define_derived/6' on the owner node, whose propagator
%% recomputes the derived variables (a replica's propagator stays idle until
%% its node takes the session over). A derive function given as a fun must be
%% loadable on every node (its module's code); `{M, F}' is the safer form.
-module(dspex_graph).

-include("dspex_routing.hrl").

-export([add_dependency/3, add_dependency/4, remove_dependency/3, dependencies/2, dependents/2,
         all_dependents/2, update_order/2, clear/1, to_dot/1, to_map/1,
         define_derived/5, define_derived/6]).
-export([to_svg/1, to_svg/2]).
-export([to_map_here/1]).

-type session_id() :: dspex_store:session_id().
-type var_key() :: dspex_store:var_key().
-type derive_fun() :: {module(), atom()} | fun((#{var_key() => dspex_store:value()}) -> dspex_store:value()).
-export_type([derive_fun/0]).

%% @equiv add_dependency(Session, From, To, data)
-spec add_dependency(session_id(), var_key(), var_key()) -> ok | {error, term()}.
add_dependency(Session, From, To) -> add_dependency(Session, From, To, data).

%% @doc Adds `From -> To' with an edge type (an atom such as `data' or
%% `control'; at most 64 distinct types per node). Adding an existing edge again
%% is `ok' (its type is updated; the event log records a `dependency_added'
%% only when the edge is new or its type changed). A self-loop or an edge closing a cycle is
%% `{error, {would_create_cycle, Path}}' where Path is `[From, To, ..., From]'
%% (the new edge followed by the existing path back); nothing changes then.
%% Unknown variables: `{error, {not_found, Key}}'.
-spec add_dependency(session_id(), var_key(), var_key(), atom()) -> ok | {error, term()}.
add_dependency(Session, From, To, Type) when is_atom(Type) ->
    ?ROUTED(Session, add_dependency, [Session, From, To, Type], add_dependency_here(Session, From, To, Type)).

add_dependency_here(Session, From, To, Type) ->
    metered(Session, fun() -> add_dependency_timed(Session, From, To, Type) end).

add_dependency_timed(Session, From, To, Type) ->
    timed(add_dependency, #{session => Session, from => From, to => To, type => Type},
          fun() ->
                  case dspex_nif:graph_add(Session, From, To, Type) of
                      %% the same edge with the same type: nothing changed, nothing logged
                      unchanged -> ok;
                      R -> dspex_events:recorded(R, Session, dependency_added, %% event log
                                                 #{from => From, to => To, type => Type})
                  end
          end).

%% @doc Removes the edge; `{error, {not_found, {From, To}}}' if there is none.
-spec remove_dependency(session_id(), var_key(), var_key()) -> ok | {error, term()}.
remove_dependency(Session, From, To) ->
    ?ROUTED(Session, remove_dependency, [Session, From, To], remove_dependency_here(Session, From, To)).

remove_dependency_here(Session, From, To) ->
    metered(Session, fun() -> remove_dependency_timed(Session, From, To) end).

remove_dependency_timed(Session, From, To) ->
    timed(remove_dependency, #{session => Session, from => From, to => To},
          fun() -> dspex_events:recorded(dspex_nif:graph_remove(Session, From, To), Session, dependency_removed, %% event log
                                         #{from => From, to => To}) end).

%% One token of the session's rate limit (dspex_acl:set_rate_limit/3) per
%% graph operation, taken on the owner before it runs.
metered(Session, Op) ->
    case dspex_nif:session_take(Session) of
        ok -> Op();
        Error -> Error
    end.

query(Session, Var, What) -> metered(Session, fun() -> dspex_nif:graph_query(Session, Var, What) end).

%% `[dspex, graph, Op, stop]' with the duration and `result => ok | error'.
timed(Op, Meta, Call) ->
    case dspex_telemetry:handlers([dspex, graph, Op, stop]) of
        [] -> Call();
        Hs ->
            T0 = erlang:monotonic_time(),
            R = Call(),
            M = case R of
                    {error, Reason} -> Meta#{result => error, error => Reason};
                    _ -> Meta#{result => ok}
                end,
            dspex_telemetry:emit(Hs, [dspex, graph, Op, stop], #{duration => erlang:monotonic_time() - T0}, M),
            R
    end.

%% @doc What the variable depends on directly (its predecessors).
-spec dependencies(session_id(), var_key()) -> {ok, [binary()]} | {error, term()}.
dependencies(Session, Var) -> ?ROUTED(Session, dependencies, [Session, Var], query(Session, Var, dependencies)).

%% @doc What depends on the variable directly (its successors).
-spec dependents(session_id(), var_key()) -> {ok, [binary()]} | {error, term()}.
dependents(Session, Var) -> ?ROUTED(Session, dependents, [Session, Var], query(Session, Var, dependents)).

%% @doc Every transitive dependent, in topological order.
-spec all_dependents(session_id(), var_key()) -> {ok, [binary()]} | {error, term()}.
all_dependents(Session, Var) -> ?ROUTED(Session, all_dependents, [Session, Var], query(Session, Var, all_dependents)).

%% @doc The variable followed by all its transitive dependents, in an order in
%% which every variable comes after everything it depends on.
-spec update_order(session_id(), var_key()) -> {ok, [binary()]} | {error, term()}.
update_order(Session, Var) -> ?ROUTED(Session, update_order, [Session, Var], query(Session, Var, update_order)).

%% @doc Removes every edge of the session (variables stay).
-spec clear(session_id()) -> ok | {error, session_not_found}.
clear(Session) -> ?ROUTED(Session, clear, [Session], dspex_nif:graph_clear(Session)).

%% @doc The graph as JSON-friendly data: `#{nodes => [Name], edges =>
%% [#{from => Name, to => Name, type => Type}]}', both sorted.
-spec to_map(session_id()) -> {ok, #{nodes := [binary()], edges := [map()]}} | {error, term()}.
to_map(Session) -> ?ROUTED(Session, to_map, [Session], metered(Session, fun() -> to_map_here(Session) end)).

%% @private `to_map/1' without taking a token: for `dspex_store:export_session/1',
%% on the owner.
-spec to_map_here(session_id()) -> {ok, #{nodes := [binary()], edges := [map()]}} | {error, term()}.
to_map_here(Session) ->
    case dspex_nif:graph_edges(Session) of
        {ok, Nodes, Edges} ->
            {ok, #{nodes => lists:sort(Nodes),
                   edges => [#{from => F, to => T, type => Ty} || {F, T, Ty} <- lists:sort(Edges)]}};
        Error -> Error
    end.

%% @doc The graph in Graphviz DOT text.
-spec to_dot(session_id()) -> {ok, binary()} | {error, term()}.
to_dot(Session) ->
    case to_map(Session) of
        {ok, #{nodes := Nodes, edges := Edges}} ->
            Lines = [["  ", quote(N), ";\n"] || N <- Nodes] ++
                    [["  ", quote(F), " -> ", quote(T), " [label=", quote(atom_to_binary(Ty)), "];\n"]
                     || #{from := F, to := T, type := Ty} <- Edges],
            {ok, iolist_to_binary(["digraph ", quote(Session), " {\n", Lines, "}\n"])};
        Error -> Error
    end.

%% A DOT string: `\\' and `"' escaped, and `&' as `&amp;' (Graphviz reads
%% `&name;' in a string as an HTML entity: `a&amp;b' would be drawn `a&b').
quote(Bin) ->
    Escaped = lists:foldl(fun({From, To}, B) -> binary:replace(B, From, To, [global]) end, Bin,
                          [{<<"\\">>, <<"\\\\">>}, {<<"\"">>, <<"\\\"">>}, {<<"&">>, <<"&amp;">>}]),
    [$", Escaped, $"].

%% @equiv define_derived(Session, Name, Type, Inputs, Fun, #{})
-spec define_derived(session_id(), var_key(), dspex_store:var_type(), [var_key()], derive_fun()) ->
          {ok, binary()} | {error, term()}.
define_derived(Session, Name, Type, Inputs, Fun) ->
    define_derived(Session, Name, Type, Inputs, Fun, #{}).

%% @doc Registers `Name' as a variable computed from `Inputs' by `Fun' (`{M, F}'
%% called as `M:F(Values)', or a fun of one argument), where `Values' maps each
%% input key, as given, to its current value. The variable gets an edge from
%% every input and its initial value from `Fun'; `Opts' are those of
%% `dspex_store:register/5'. When an input commits, the session's propagator
%% recomputes every derived dependent once, in topological order, through the
%% store (versions, history and watches apply). Setting a derived variable
%% directly is `{error, derived_variable}'. A `Fun' that crashes or returns an
%% invalid value leaves the value unchanged and records the error, shown as
%% `error' by `dspex_store:get/2' (cleared by the next success); a telemetry
%% event `[dspex, graph, propagation, error]' is emitted. Needs the
%% `dspex_bridge' application running.
-spec define_derived(session_id(), var_key(), dspex_store:var_type(), [var_key()], derive_fun(), map()) ->
          {ok, binary()} | {error, term()}.
define_derived(Session, Name, Type, Inputs, Fun, Opts) when is_list(Inputs), Inputs =/= [], is_map(Opts) ->
    case valid_fun(Fun) of
        false -> {error, {invalid_argument, function}};
        true ->
            ?ROUTED(Session, define_derived, [Session, Name, Type, Inputs, Fun, Opts],
                    dspex_propagator:define(Session, Name, Type, Inputs, Fun, Opts))
    end;
define_derived(_Session, _Name, _Type, _Inputs, _Fun, _Opts) ->
    {error, {invalid_argument, inputs}}.

valid_fun({M, F}) when is_atom(M), is_atom(F) -> true;
valid_fun(F) when is_function(F, 1) -> true;
valid_fun(_) -> false.

%%% SVG rendering (debug console, issue #20) ---------------------------------

%% @equiv to_svg(Session, #{})
-spec to_svg(session_id()) -> {ok, binary()} | {error, term()}.
to_svg(Session) -> to_svg(Session, #{}).

%% @doc The graph drawn as SVG by Graphviz `dot' (Debian package
%% `graphviz'), from `to_dot/1' (names escaped there, and escaped again as
%% XML text by Graphviz). Each variable is an SVG `<g class="node">' whose
%% `<title>' is its name. `dot' runs as an OS process through a port, so
%% no scheduler waits for it; it is killed when it takes longer than
%% `timeout' ms (option; default the application environment
%% `graphviz_timeout_ms', 5000) or writes more than `max_bytes' (option,
%% default 16 MiB). Errors: those of `to_dot/1', and `{error, {graphviz,
%% not_installed | timeout | too_large | {exit_status, N}}}'.
-spec to_svg(session_id(), #{timeout => pos_integer(), max_bytes => pos_integer()}) ->
          {ok, binary()} | {error, term()}.
to_svg(Session, Opts) when is_map(Opts) ->
    Timeout = maps:get(timeout, Opts, application:get_env(dspex_bridge, graphviz_timeout_ms, 5000)),
    Max = maps:get(max_bytes, Opts, 16 bsl 20),
    case to_dot(Session) of
        {ok, Dot} ->
            case os:find_executable("dot") of
                false -> {error, {graphviz, not_installed}};
                Exe -> run_dot(Exe, Dot, Timeout, Max)
            end;
        Error -> Error
    end.

%% The DOT text goes through a private temporary file: a port cannot close
%% the child's stdin and still read its stdout.
run_dot(Exe, Dot, Timeout, Max) ->
    Dir = case os:getenv("TMPDIR") of
              false -> "/tmp";
              "" -> "/tmp";
              D -> D
          end,
    File = filename:join(Dir, "dspex_graph_" ++ os:getpid() ++ "_"
                         ++ integer_to_list(erlang:unique_integer([positive])) ++ ".dot"),
    ok = file:write_file(File, Dot),
    try
        Port = open_port({spawn_executable, Exe}, [{args, ["-Tsvg", File]}, binary, exit_status, use_stdio, hide]),
        Deadline = erlang:monotonic_time(millisecond) + Timeout,
        collect_svg(Port, Deadline, Max, 0, [])
    after
        _ = file:delete(File)
    end.

collect_svg(Port, Deadline, Max, Size, Acc) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, Data}} when Size + byte_size(Data) > Max -> kill_port(Port), {error, {graphviz, too_large}};
        {Port, {data, Data}} -> collect_svg(Port, Deadline, Max, Size + byte_size(Data), [Acc, Data]);
        {Port, {exit_status, 0}} -> {ok, iolist_to_binary(Acc)};
        {Port, {exit_status, N}} -> {error, {graphviz, {exit_status, N}}}
    after Left ->
        kill_port(Port),
        {error, {graphviz, timeout}}
    end.

kill_port(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, Pid} -> _ = os:cmd("kill -9 " ++ integer_to_list(Pid));
        undefined -> ok
    end,
    catch port_close(Port),
    receive {Port, {exit_status, _}} -> ok after 0 -> ok end,
    flush_port(Port).

flush_port(Port) ->
    receive {Port, _} -> flush_port(Port) after 0 -> ok end.
