%% @private
-module(dspex_bridge_app).
-behaviour(application).
-export([start/2, stop/1]).

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    case application:get_env(dspex_bridge, limits, #{}) of
        Limits when map_size(Limits) > 0 -> ok = dspex_store:set_limits(Limits);
        _ -> ok
    end,
    ok = dspex_store:refresh_fast_path(), %% e.g. the telemetry application is loaded
    dspex_bridge_sup:start_link().

-spec stop(term()) -> ok.
stop(_State) -> ok.
