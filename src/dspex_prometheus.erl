%% @doc Prometheus text exposition (format 0.0.4) of every metric series at
%% `http://127.0.0.1:9568/metrics', served by OTP's inets httpd.
%%
%% Each series is a `summary': `Name{Tags,quantile="0.5|0.9|0.95|0.99"}' over
%% the last 60 seconds (`NaN' when that window is empty), and `Name_sum' /
%% `Name_count' since the series was created (monotonic, as Prometheus
%% expects). A metric whose name ends in `_total' is a `counter' instead: only
%% its number of samples since creation. `dspex_active_sessions' is a gauge.
%%
%% Application environment: `prometheus_enabled' (default `true'; `false'
%% starts nothing), `prometheus_port' (default 9568; 0 picks a free port, see
%% `port/0'), `prometheus_bind' (default `{127,0,0,1}'; any address tuple or
%% string inets accepts). If the port cannot be bound the error is logged and
%% the bridge runs without the endpoint.
-module(dspex_prometheus).
-behaviour(gen_server).

-include_lib("inets/include/httpd.hrl").

-export([start_link/0, port/0, render/0, do/1, escape/1]).
-export([init/1, handle_call/3, handle_cast/2, terminate/2]).

-define(QUANTILES, [{p50, "0.5"}, {p90, "0.9"}, {p95, "0.95"}, {p99, "0.99"}]).

%% @doc Starts the HTTP endpoint, or `ignore' when disabled.
-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    case application:get_env(dspex_bridge, prometheus_enabled, true) of
        true -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []);
        false -> ignore
    end.

%% @doc The TCP port the endpoint listens on, or `{error, not_running}'.
-spec port() -> inet:port_number() | {error, not_running}.
port() ->
    try gen_server:call(?MODULE, port)
    catch exit:{noproc, _} -> {error, not_running}
    end.

%% @doc The exposition text of every series (what `GET /metrics' returns).
-spec render() -> iodata().
render() ->
    Now = dspex_metrics:clock(),
    [[family(Name, Series, Now) || {Name, Series} <- dspex_metrics:all_series()],
     "# HELP dspex_active_sessions Live sessions of the variable store.\n",
     "# TYPE dspex_active_sessions gauge\n",
     "dspex_active_sessions ", integer_to_list(maps:get(sessions, dspex_nif:stats())), "\n",
     "# HELP dspex_metrics_dropped_samples_total Samples the analytics lost (refused or out of memory).\n",
     "# TYPE dspex_metrics_dropped_samples_total counter\n",
     "dspex_metrics_dropped_samples_total ", integer_to_list(dspex_metrics:dropped_samples()), "\n",
     dspex_events:prometheus(),
     dspex_region:prometheus(),
     dspex_cache:prometheus()].

%% @private httpd callback: answers `GET /metrics'; anything else is 404.
-spec do(#mod{}) -> {proceed, list()}.
do(#mod{method = "GET", request_uri = "/metrics" ++ Query} = Mod) when Query =:= ""; hd(Query) =:= $? ->
    Body = iolist_to_binary(render()),
    Head = [{code, 200}, {content_type, "text/plain; version=0.0.4; charset=utf-8"},
            {content_length, integer_to_list(byte_size(Body))}],
    {proceed, [{response, {response, Head, [Body]}} | Mod#mod.data]};
do(#mod{data = Data}) ->
    Body = <<"not found: the metrics are at /metrics\n">>,
    Head = [{code, 404}, {content_type, "text/plain"}, {content_length, integer_to_list(byte_size(Body))}],
    {proceed, [{response, {response, Head, [Body]}} | Data]}.

%%% server: owns the httpd instance ---------------------------------------

%% @private
-spec init([]) -> {ok, map()} | ignore.
init([]) ->
    process_flag(trap_exit, true),
    Port = application:get_env(dspex_bridge, prometheus_port, 9568),
    Bind = application:get_env(dspex_bridge, prometheus_bind, {127, 0, 0, 1}),
    Root = code:lib_dir(dspex_bridge),
    Conf = [{port, Port}, {bind_address, Bind}, {server_name, "dspex_metrics"},
            {server_root, Root}, {document_root, Root}, {modules, [?MODULE]}],
    case inets:start(httpd, Conf) of
        {ok, Pid} ->
            [{port, Actual}] = httpd:info(Pid, [port]),
            {ok, #{httpd => Pid, port => Actual}};
        {error, Reason} ->
            logger:error("dspex_prometheus: cannot serve on ~p:~p: ~p; metrics endpoint disabled",
                         [Bind, Port, Reason]),
            ignore
    end.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(port, _From, #{port := P} = St) -> {reply, P, St};
handle_call(_Req, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_Reason, #{httpd := Pid}) ->
    _ = inets:stop(httpd, Pid),
    ok.

%%% rendering ----------------------------------------------------------------

%% Names and tags were checked when each series was created (dspex_metrics):
%% valid, unique label names, UTF-8 values, no name shared by two families.
family(Name, Series, Now) ->
    case dspex_metrics:is_counter(Name) of
        true -> counter(Name, Series);
        false -> summary(Name, Series, Now)
    end.

counter(Name, Series) ->
    ["# HELP ", Name, " dspex counter ", Name, ".\n",
     "# TYPE ", Name, " counter\n",
     [begin
          {Count, _} = dspex_nif:metrics_totals(Ref),
          [Name, braces(labels(Tags)), " ", integer_to_list(Count), "\n"]
      end || {Tags, Ref} <- Series]].

summary(Name, Series, Now) ->
    ["# HELP ", Name, " dspex metric ", Name, " (quantiles over the last 60 s).\n",
     "# TYPE ", Name, " summary\n",
     [sample(Name, Tags, Ref, Now) || {Tags, Ref} <- Series]].

sample(Name, Tags, Ref, Now) ->
    {ok, Sketch} = dspex_nif:metrics_query([Ref], Now - 59, Now, Now),
    Stats = dspex_nif:metrics_sketch_stats(Sketch),
    {Count, Sum} = dspex_nif:metrics_totals(Ref),
    Labels = labels(Tags),
    [[[Name, "{", lists:join(",", Labels ++ [["quantile=\"", Q, "\""]]), "} ", number(maps:get(K, Stats)), "\n"]
      || {K, Q} <- ?QUANTILES],
     Name, "_sum", braces(Labels), " ", number(Sum), "\n",
     Name, "_count", braces(Labels), " ", integer_to_list(Count), "\n"].

labels(Tags) ->
    [[label_name(K), "=\"", escape(label_value(V)), "\""] || {K, V} <- lists:sort(maps:to_list(Tags))].

braces([]) -> [];
braces(Labels) -> ["{", lists:join(",", Labels), "}"].

label_name(K) when is_atom(K) -> atom_to_binary(K);
label_name(K) -> K.

label_value(V) when is_atom(V) -> atom_to_binary(V);
label_value(V) when is_binary(V) -> V;
label_value(V) when is_integer(V) -> integer_to_binary(V);
label_value(V) when is_float(V) -> float_to_binary(V, [short]).

%% @doc A label value escaped for the text exposition format (backslash,
%% double quote and newline), so that no value can end its label or line.
-spec escape(binary()) -> binary().
escape(B) -> binary:replace(binary:replace(binary:replace(B, <<"\\">>, <<"\\\\">>, [global]),
                                           <<"\"">>, <<"\\\"">>, [global]),
                            <<"\n">>, <<"\\n">>, [global]).

number(undefined) -> "NaN";
number(infinity) -> "+Inf"; %% a sum beyond the float range
number(neg_infinity) -> "-Inf";
number(F) when is_float(F) -> float_to_list(F, [short]);
number(I) when is_integer(I) -> integer_to_list(I).
