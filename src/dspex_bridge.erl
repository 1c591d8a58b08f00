%% @doc Starting a node that serves the bridge: `make run' (`bin/dspex_bridge')
%% boots with `boot/0', which starts the application and prints what the node
%% serves, where, and how to attach to it and stop it. `start/0' does the
%% same from any shell or script. An application embedding the bridge needs
%% neither: it lists `dspex_bridge' among its applications.
-module(dspex_bridge).
-export([start/0, boot/0]).

%% @doc Starts the application (and the applications it needs) and prints
%% the banner; `{error, Reason}' if the application does not start.
-spec start() -> ok | {error, term()}.
start() ->
    case application:ensure_all_started(dspex_bridge) of
        {ok, _} -> banner();
        {error, _} = E -> E
    end.

%% @doc The boot step of `bin/dspex_bridge': runs before the node finishes
%% booting (so before a shell prints its prompt). The node stops with exit
%% status 1 if the application cannot start.
-spec boot() -> ok.
boot() ->
    case start() of
        ok -> ok;
        {error, Reason} ->
            io:format(standard_error, "dspex_bridge: cannot start: ~p~n", [Reason]),
            erlang:halt(1)
    end.

banner() ->
    {ok, Vsn} = application:get_key(dspex_bridge, vsn),
    Limits = dspex_store:limits(),
    io:format(
              "~ndspex_bridge ~s running on node ~s (OS pid ~s)~n"
              "  variable store : native (NIF), ~b sessions~n"
              "  limits         : ~s~n"
              "  session sweeper: every ~b ms~n"
              "  gRPC           : ~s~n"
              "  Prometheus     : ~s~n"
              "  cluster        : ~s~n"
              "  attach         : ~s~n"
              "  stop           : ~s~n"
              "~s~n",
              [Vsn, node(), os:getpid(), length(dspex_store:list_sessions()),
               lists:join(", ", [io_lib:format("~s ~b", [K, V]) || {K, V} <- lists:sort(maps:to_list(Limits))]),
               application:get_env(dspex_bridge, sweep_interval_ms, 1000),
               grpc(), prometheus(), cluster(), attach(), stop(), try_line()]),
    ok.

headless() ->
    init:get_argument(noinput) =/= error orelse init:get_argument(noshell) =/= error.

attach() ->
    case node() of
        nonode@nohost -> "not distributed (start erl with -sname to attach)";
        Node ->
            [Name, _] = string:split(atom_to_list(Node), "@"),
            io_lib:format("make remsh NODE=~s   (erl -sname x -remsh ~s)", [Name, Node])
    end.

stop() ->
    Remote = case node() of
                 nonode@nohost -> "";
                 Node ->
                     [Name, _] = string:split(atom_to_list(Node), "@"),
                     io_lib:format(", make stop NODE=~s", [Name])
             end,
    case headless() of
        true -> io_lib:format("kill -TERM ~s (or SIGINT)~s", [os:getpid(), Remote]);
        false -> io_lib:format("q(). in this shell~s", [Remote])
    end.

try_line() ->
    case headless() of
        true -> "";
        false -> "  try            : dspex_store:create_session(<<\"demo\">>).\n"
    end.

grpc() ->
    case whereis(dspex_grpc) of
        undefined -> "off (grpc_enabled = false)";
        _ ->
            case dspex_grpc:await_listening(5000) of
                {ok, Port} ->
                    %% the configured address may name port 0: show the one bound
                    Addr = unicode:characters_to_list(dspex_grpc:address()),
                    [Host | _] = string:split(Addr, ":", trailing),
                    io_lib:format("snakepit.bridge.BridgeService on ~s:~b", [Host, Port]);
                {error, not_listening} -> io_lib:format("NOT listening on ~s (see the log)", [dspex_grpc:address()])
            end
    end.

prometheus() ->
    case dspex_prometheus:port() of
        {error, not_running} -> "off";
        Port ->
            Bind = case application:get_env(dspex_bridge, prometheus_bind, {127, 0, 0, 1}) of
                       T when is_tuple(T) -> inet:ntoa(T);
                       Other -> Other
                   end,
            io_lib:format("http://~s:~b/metrics", [Bind, Port])
    end.

cluster() ->
    case application:get_env(dspex_bridge, cluster) of
        undefined -> "single node (no cluster configured)";
        {ok, Conf} -> io_lib:format("~p", [Conf])
    end.
