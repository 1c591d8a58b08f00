%% @doc Entry point of `make run': starts the application and prints what the
%% node serves.
-module(dspex_bridge).
-export([start/0]).

-spec start() -> ok.
start() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    {ok, Vsn} = application:get_key(dspex_bridge, vsn),
    Limits = dspex_store:limits(),
    io:format("~ndspex_bridge ~s running on node ~p~n"
              "  variable store : native (NIF), ~b sessions, limits ~p~n"
              "  session sweeper: every ~b ms~n"
              "  gRPC           : ~s~n"
              "  Prometheus     : ~s~n"
              "  cluster        : ~s~n"
              "  try            : dspex_store:create_session(<<\"demo\">>).~n~n",
              [Vsn, node(), length(dspex_store:list_sessions()), Limits,
               application:get_env(dspex_bridge, sweep_interval_ms, 1000),
               grpc(), prometheus(), cluster()]),
    ok.

grpc() ->
    case whereis(dspex_grpc) of
        undefined -> "off (grpc_enabled = false)";
        _ ->
            case dspex_grpc:await_listening(5000) of
                {ok, Port} -> io_lib:format("snakepit.bridge.BridgeService on ~s (port ~b)", [dspex_grpc:address(), Port]);
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
