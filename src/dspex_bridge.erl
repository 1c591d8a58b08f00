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
              "  try            : dspex_store:create_session(<<\"demo\">>).~n~n",
              [Vsn, node(), length(dspex_store:list_sessions()), Limits,
               application:get_env(dspex_bridge, sweep_interval_ms, 1000)]),
    ok.
