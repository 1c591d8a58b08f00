%% @private
%% @doc Keeps the analytics handlers attached while it runs. The table of
%% metric series (name and tags to native series), and the table of the
%% sample names each metric claimed (see `dspex_metrics'), are made by `new_table/0'
%% in the top supervisor, which outlives this server: a crash of the server
%% loses no series, and its replacement attaches the handlers to the same
%% series again. Recording and queries never call it: they read the public
%% table directly.
-module(dspex_metrics_server).
-behaviour(gen_server).

-export([start_link/0, new_table/0, init/1, handle_call/3, handle_cast/2, terminate/2]).

-define(TAB, dspex_metrics_series).
-define(NAMES, dspex_metrics_names).

%% @doc Starts the owner (registered as `dspex_metrics_server').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Creates the series and names tables, owned by the calling process
%% (the top supervisor calls it in its `init/1'); `ok' if they exist already.
-spec new_table() -> ok.
new_table() ->
    [case ets:whereis(T) of
         undefined -> _ = ets:new(T, [named_table, public, set, {read_concurrency, true}]);
         _ -> ok
     end || T <- [?TAB, ?NAMES]],
    ok.

%% @private
-spec init([]) -> {ok, map()}.
init([]) ->
    process_flag(trap_exit, true), %% so terminate/2 detaches the handlers
    ok = new_table(), %% started alone (without the supervisor) it owns the table itself
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
