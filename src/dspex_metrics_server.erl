%% @private
%% @doc Owns the table of metric series (name and tags to native series) and
%% keeps the analytics handlers attached while it runs. Recording and queries
%% never call it: they read the public table directly.
-module(dspex_metrics_server).
-behaviour(gen_server).

-export([start_link/0, init/1, handle_call/3, handle_cast/2, terminate/2]).

-define(TAB, dspex_metrics_series).

%% @doc Starts the owner (registered as `dspex_metrics_server').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @private
-spec init([]) -> {ok, map()}.
init([]) ->
    process_flag(trap_exit, true), %% so terminate/2 detaches the handlers
    _ = ets:new(?TAB, [named_table, public, set, {read_concurrency, true}]),
    Attached = case application:get_env(dspex_bridge, metrics_handlers, true) of
                   true -> dspex_metrics_handler:attach();
                   false -> []
               end,
    {ok, #{handlers => Attached}}.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(_Req, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{handlers := Ids}) ->
    [dspex_telemetry:detach(Id) || Id <- Ids],
    _ = Ids =/= [] andalso dspex_metrics_handler:detach_native() =:= ok,
    ok.
