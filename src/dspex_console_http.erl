%% @doc The debug console's request handler (an inets httpd module): static
%% files of `priv/www', JSON endpoints under `/api/', Server-Sent Events at
%% `/api/events', and the security policy of `dspex_console'.
%%
%% Endpoints (all `GET' unless said; JSON answers; errors are
%% `{"error": Reason}' with a 4xx status):
%% <ul>
%% <li>`/api/config': `write' (writes enabled), `token_required', `csrf',
%%     `node', `absent' (the parts of the bridge this build does not have).</li>
%% <li>`/api/overview': node, cluster (`dspex_cluster:cluster_status/0' or
%%     `not_clustered'), sessions, the dashboard, breakers, and the last 60 s
%%     of store operations per second, p50/p95/p99 latency and errors
%%     (`dspex_metrics:detailed/3').</li>
%% <li>`/api/sessions?q=&amp;offset=&amp;limit=': sessions whose id contains `q',
%%     sorted, one page (`limit' at most 500) with their info, and `total'.</li>
%% <li>`/api/session?id=&amp;offset=&amp;limit=': `dspex_store:diagnostics_page/3':
%%     the session's diagnostics and one page of the variables by name (type, value, version,
%%     updated_at, derived, error, lock holder; `limit' default 500, at most
%%     1000) with `total', the diagnostics' per-variable maps and the graph
%%     cut to the page.</li>
%% <li>`/api/history?id=&amp;var=': the variable's archived versions.</li>
%% <li>`/api/graph.svg?id=': `dspex_graph:to_svg/1' (`image/svg+xml').</li>
%% <li>`/api/timeline?id=&amp;before=&amp;type=&amp;limit=': a page of the
%%     event log newest first (`dspex_events:read/2'): the session's, or every
%%     session's without `id'; `before' a global position (the last event's
%%     position gives the next page), `type' one event type, `limit' at most
%%     200 (default 50). Answers `events', `more', `last_sequence' (the
%%     session's newest event's sequence) and `enabled'; only
%%     `{"enabled": false}' when the event log is off. It includes every
%%     change committed before the request (`dspex_events:await/0' first).</li>
%% <li>`/api/state_at?id=&amp;seq=': the session's variables (name, type,
%%     value, version, updated_at, changed_by) after its event `seq'
%%     (`dspex_events:state_at/2'); 404 `not_found' before the session
%%     existed.</li>
%% <li>`/api/models': `models' (`dspex_models:list_models(all)'),
%%     `aliases' (`#{name, alias, model}'), `tests': every A/B test and
%%     rollout, running or finished, as `dspex_models:results/1' gives it in
%%     the JSON form of `dspex_events:json_term/1' (tuples as lists: a CI is
%%     `[Lo, Hi]', `arm_summary' a list of `[ModelId, Stats]', a decision
%%     `"continue"' or `["winner", ModelId]'); `absent' when the build has no
%%     `dspex_models'.</li>
%% <li>`/api/optimizations': `dspex_locks:active/0' with each lock's status,
%%     and `runs': every `dspex_opt' run holding locks on this node (found by
%%     its locks' optimizer `{dspex_opt, Algorithm, RunPid}') with
%%     `dspex_opt:info/1', every trial (`trials/1') and `best/1'.</li>
%% <li>`/api/access?id=': the audit log of denials (newest 200), rate-limit
%%     and denial counts of the last hour, the session's rules and rate limit
%%     (`dspex_acl:get_rate_limit/1'), and `rate_limits': every session
%%     whose limit is on (500 at most, by id).</li>
%% <li>`/api/regions': this node's region (`dspex_region:topology/0' made
%%     JSON-safe): `configured' (`true'), `region', `coords' (`[Lat, Lon]'),
%%     `gateway_port', `transport', `replication' (the mode), `sessions',
%%     `backup_sessions', `fenced' (`dspex_region:fenced/0': `true' or
%%     `false') with `reachable' (the regions of the fenced minority, else
%%     `null'), and `peers': one object per peer region sorted by name:
%%     `name', `status', `since' and `last_check_at' (system time in ms),
%%     `last_error' (printed), `gateway' (`"host:port"'), `coords', `sessions',
%%     `rtt' (`ewma_ms', `p50_ms', `p99_ms', `last_ms', `samples') and
%%     `replication' (`lag_versions', `lag_ms', ...). Only
%%     `{"configured": false}' when no region runs on this node.</li>
%% <li>`POST /api/rollback' (`id', `var', `version' as a form or query):
%%     `dspex_store:rollback/4' with `changed_by => console'.</li>
%% <li>`/api/events?id=&amp;overview=1&amp;optimizations=1&amp;models=1&amp;regions=1': a
%%     `text/event-stream': `overview', `optimizations', `models' and `regions' (as their endpoints
%%     answer) every second when asked for,
%%     and with `id' a `variable' event per committed change of the session
%%     (a watch) and `session' when its variables change in number.</li>
%% </ul>
%% Every answer has `Server-Timing: app;dur=Ms' (the time spent building it).
%% A parameter an endpoint needs and did not get is 400
%% `{missing_parameter, Name}'; an empty `id' of `timeline' or `state_at'
%% 400 `{invalid_argument, _}'. `HEAD' answers as `GET' without the body.
-module(dspex_console_http).

-include_lib("inets/include/httpd.hrl").

-export([do/1, authorize/4, jsonable/1]).
-export([response_default_headers/0]).

-define(CSP, "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'").
-define(PAGES, ["/", "/sessions", "/session", "/optimizations", "/access", "/models", "/regions", "/events"]).
%% Parts of the bridge that land with other issues: `{Module, Issue, What}'.
-define(PARTS, [{dspex_events, 11, <<"event timeline and time travel">>},
                {dspex_opt, 14, <<"optimizer runs, trials and convergence">>},
                {dspex_models, 15, <<"models, experiments and rollouts">>},
                {dspex_region, 13, <<"regions, links and lag">>}]).
-define(SSE_MAX_MS, 600000).
%% The parameters each endpoint needs: `{Method, Path, Names}'.
-define(REQUIRED, [{"GET", "/api/session", [id]}, {"GET", "/api/history", [id, var]},
                   {"GET", "/api/graph.svg", [id]}, {"GET", "/api/state_at", [id, seq]},
                   {"POST", "/api/rollback", [id, var, version]}]).
%% /api/session: variables per page, by default and at most.
-define(VARS_PAGE, 500).
-define(VARS_PAGE_MAX, 1000).

%% @private httpd callback.
-spec do(#mod{}) -> {proceed, list()}.
do(#mod{method = Method0, request_uri = Uri, parsed_header = Headers, entity_body = Body} = Mod) ->
    T0 = erlang:monotonic_time(microsecond),
    {Path, Query} = split_uri(Uri),
    Conf = dspex_console:config(),
    %% HEAD is answered as GET, without the body (see below)
    Method = case Method0 of
                 "HEAD" -> "GET";
                 _ -> Method0
             end,
    R = case Path of
            "/api/events" when Method0 =:= "HEAD" -> json(405, #{error => method_not_allowed}, [{"allow", "GET"}]);
            "/api/" ++ _ ->
                case authorize(Method0, Path, Headers, Conf) of
                    ok -> api(Method, Path, params(Query, Method, Headers, Body), Mod);
                    {deny, Status, Reason} -> json(Status, #{error => Reason})
                end;
            _ when Method =:= "GET" -> static(Path, Conf);
            _ -> json(405, #{error => method_not_allowed})
        end,
    case R of
        already_sent -> {proceed, [{response, {already_sent, 200, 0}} | Mod#mod.data]};
        {Code, Type, Extra, Resp} ->
            Dur = (erlang:monotonic_time(microsecond) - T0) / 1000,
            Bin = iolist_to_binary(Resp),
            Head = [{code, Code}, {content_type, Type}, {content_length, integer_to_list(byte_size(Bin))},
                    {"server-timing", "app;dur=" ++ float_to_list(Dur, [{decimals, 3}])}
                    | security_headers() ++ Extra],
            %% HEAD: the GET's headers (its length included), no body
            Out = case Method0 of
                      "HEAD" -> [];
                      _ -> [Bin]
                  end,
            {proceed, [{response, {response, Head, Out}} | Mod#mod.data]}
    end.

%% @private httpd_custom callback: the security headers also on the answers
%% inets makes itself (its error pages: a malformed request, a URI too long).
-spec response_default_headers() -> [{string(), string()}].
response_default_headers() ->
    [{case K of cache_control -> "cache-control"; _ -> K end, V} || {K, V} <- security_headers()].

security_headers() ->
    [{"content-security-policy", ?CSP}, {"x-content-type-options", "nosniff"},
     {"referrer-policy", "no-referrer"}, {"x-frame-options", "DENY"}, {cache_control, "no-store"}].

%% @doc The request policy (see `dspex_console'): `ok' or `{deny, Status,
%% Reason}'. `Headers' are the lower-case request headers. The `Host' header
%% is checked first (when the configuration's `hosts' is a list): a page of
%% another site whose name was rebound to 127.0.0.1 (DNS rebinding) sends its
%% own name, and is refused with 403 `host_not_allowed'.
-spec authorize(string(), string(), [{string(), string()}], dspex_console:config()) ->
          ok | {deny, 401 | 403, atom()}.
authorize(Method, Path, Headers, #{token := Token, write := Write, csrf := Csrf, hosts := Hosts} = Conf) ->
    Bearer = case lists:keyfind("authorization", 1, Headers) of
                 {_, "Bearer " ++ T} -> list_to_binary(T);
                 _ -> undefined
             end,
    Authenticated = Token =/= undefined andalso is_binary(Bearer) andalso equal(Bearer, Token),
    IsWrite = Method =/= "GET" andalso Method =/= "HEAD",
    if
        Hosts =/= any ->
            case host_allowed(lists:keyfind("host", 1, Headers), Hosts) of
                true -> authorize(Method, Path, Headers, Conf#{hosts := any});
                false -> {deny, 403, host_not_allowed}
            end;
        Token =/= undefined, not Authenticated -> {deny, 401, unauthorized};
        not IsWrite -> ok;
        Path =/= "/api/rollback" -> {deny, 403, method_not_allowed};
        not Write -> {deny, 403, read_only};
        Token =:= undefined -> {deny, 401, token_not_configured};
        true ->
            case lists:keyfind("x-dspex-csrf", 1, Headers) of
                {_, C} -> case equal(list_to_binary(C), Csrf) of
                              true -> ok;
                              false -> {deny, 403, csrf}
                          end;
                false -> {deny, 403, csrf}
            end
    end.

%% `Host: Name' or `Host: Name:Port' (`[v6]:Port' for IPv6), Name one of
%% `Hosts' (lower case); no Host header (no browser sends none) is refused.
host_allowed({_, Value}, Hosts) ->
    V = string:lowercase(Value),
    Name = case V of
               "[" ++ _ ->
                   case string:split(V, "]") of
                       [H, Rest] -> port_suffix(H ++ "]", Rest);
                       _ -> error
                   end;
               _ ->
                   case string:split(V, ":") of
                       [H] -> H;
                       [H, P] -> port_suffix(H, ":" ++ P);
                       _ -> error
                   end
           end,
    lists:member(Name, Hosts);
host_allowed(false, _) -> false.

port_suffix(Host, "") -> Host;
port_suffix(Host, ":" ++ Port) when Port =/= "" ->
    case lists:all(fun(C) -> C >= $0 andalso C =< $9 end, Port) of
        true -> Host;
        false -> error
    end;
port_suffix(_, _) -> error.

%% constant time in the length of the secret
equal(A, B) when byte_size(A) =:= byte_size(B) -> crypto:hash_equals(A, B);
equal(_, _) -> false.

%%% static files ---------------------------------------------------------------

static(Path, #{www := Www}) ->
    File = case lists:member(Path, ?PAGES) of
               true -> "index.html";
               false -> safe_file(Path)
           end,
    case File of
        error -> text(404, "not found\n");
        _ ->
            case file:read_file(filename:join(Www, File)) of
                {ok, Bin} -> {200, mime(filename:extension(File)), [], Bin};
                {error, _} -> text(404, "not found\n")
            end
    end.

%% /static/<name> and /vendor/<name> only: one path segment of plain characters.
safe_file("/static/" ++ Name) -> plain(Name, "static/" ++ Name);
safe_file("/vendor/" ++ Name) -> plain(Name, "vendor/" ++ Name);
safe_file(_) -> error.

plain(Name, File) ->
    case Name =/= "" andalso hd(Name) =/= $. andalso
        lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z) orelse
                                (C >= $0 andalso C =< $9) orelse C =:= $. orelse C =:= $- orelse C =:= $_ end, Name) of
        true -> File;
        false -> error
    end.

mime(".html") -> "text/html; charset=utf-8";
mime(".js") -> "text/javascript; charset=utf-8";
mime(".css") -> "text/css; charset=utf-8";
mime(".svg") -> "image/svg+xml";
mime(_) -> "application/octet-stream".

%%% API ------------------------------------------------------------------------

api("GET", "/api/config", _P, _Mod) ->
    #{write := W, token := T, csrf := C} = dspex_console:config(),
    json(200, #{write => W, token_required => T =/= undefined, csrf => C, node => node(),
                absent => [#{module => M, issue => I, what => What} || {M, I, What} <- ?PARTS, absent(M)]});
api("GET", "/api/overview", _P, _Mod) -> json(200, overview());
api("GET", "/api/sessions", P, _Mod) -> json(200, sessions(P));
api("GET", "/api/session", #{<<"id">> := S} = P, _Mod) ->
    case session(S, P) of
        {ok, M} -> json(200, M);
        {error, R} -> json(404, #{error => R})
    end;
api("GET", "/api/history", #{<<"id">> := S, <<"var">> := V}, _Mod) ->
    case dspex_store:history(S, V, all) of
        {ok, H} -> json(200, #{session => S, variable => V, history => H});
        {error, R} -> json(404, #{error => R})
    end;
api("GET", "/api/graph.svg", #{<<"id">> := S}, _Mod) ->
    case dspex_graph:to_svg(S) of
        {ok, Svg} -> {200, "image/svg+xml", [], Svg};
        {error, session_not_found} -> json(404, #{error => session_not_found});
        {error, R} -> json(503, #{error => R})
    end;
api("GET", "/api/timeline", #{<<"id">> := <<>>}, _Mod) -> json(400, #{error => {invalid_argument, id}});
api("GET", "/api/timeline", P, _Mod) ->
    case timeline(P) of
        {ok, M} -> json(200, M);
        {error, R} -> json(400, #{error => R})
    end;
api("GET", "/api/state_at", #{<<"id">> := S, <<"seq">> := Seq}, _Mod) ->
    case {dspex_events:enabled(), int(Seq, 0)} of
        {false, _} -> json(200, #{enabled => false});
        {true, 0} -> json(400, #{error => {invalid_argument, seq}});
        {true, N} ->
            _ = dspex_events:await(),
            case dspex_events:state_at(S, {sequence, N}) of
                {ok, #{variables := Vars}} ->
                    json(200, #{enabled => true, session => S, sequence => N,
                                variables => [maps:with([name, type, value, version, updated_at, changed_by], V)
                                              || V <- Vars]});
                {error, {invalid_argument, _} = R} -> json(400, #{error => R});
                {error, R} -> json(404, #{error => R})
            end
    end;
api("GET", "/api/models", _P, _Mod) -> json(200, models());
api("GET", "/api/optimizations", _P, _Mod) -> json(200, optimizations());
api("GET", "/api/regions", _P, _Mod) -> json(200, regions());
api("GET", "/api/access", P, _Mod) -> json(200, access(maps:get(<<"id">>, P, undefined)));
api("POST", "/api/rollback", #{<<"id">> := S, <<"var">> := V, <<"version">> := Ver}, _Mod) ->
    case string:to_integer(Ver) of
        {N, <<>>} when N >= 0 ->
            case dspex_store:rollback(S, V, N, #{changed_by => console}) of
                {ok, New} -> json(200, #{version => New});
                {error, {invalid_argument, _} = R} -> json(400, #{error => R});
                {error, R} -> json(409, #{error => R})
            end;
        _ -> json(400, #{error => {invalid_argument, version}})
    end;
api("GET", "/api/events", P, Mod) ->
    Feeds = [F || {K, F} <- [{<<"overview">>, overview}, {<<"optimizations">>, optimizations},
                             {<<"models">>, models}, {<<"regions">>, regions}], maps:is_key(K, P)],
    sse(Mod, maps:get(<<"id">>, P, undefined), Feeds);
api(Method, Path, P, _Mod) ->
    %% a known endpoint without a parameter it needs is a bad request
    case [K || {M, Pa, Ks} <- ?REQUIRED, M =:= Method, Pa =:= Path, K <- Ks, not maps:is_key(atom_to_binary(K), P)] of
        [K | _] -> json(400, #{error => {missing_parameter, K}});
        [] -> json(404, #{error => not_found})
    end.

absent(M) -> code:which(M) =:= non_existing.

overview() ->
    Now = dspex_metrics:clock(),
    Ops = detailed(dspex_store_duration_us, Now - 59, Now),
    Errors = detailed({dspex_store_duration_us, #{result => error}}, Now - 59, Now),
    Stats = dspex_nif:stats(),
    #{node => node(), otp => list_to_binary(erlang:system_info(otp_release)),
      uptime_s => element(1, erlang:statistics(wall_clock)) div 1000,
      connected => nodes(),
      cluster => case dspex_cluster:cluster_status() of
                     {error, not_clustered} -> not_clustered;
                     C -> C
                 end,
      sessions => maps:get(sessions, Stats, 0),
      dashboard => dspex_metrics:dashboard(),
      breakers => breakers(),
      series => #{t => [T || #{t := T} <- Ops],
                  ops => [C || #{count := C} <- Ops],
                  p50 => [P || #{p50 := P} <- Ops], p95 => [P || #{p95 := P} <- Ops],
                  p99 => [P || #{p99 := P} <- Ops],
                  errors => [C || #{count := C} <- Errors]}}.

detailed(Metric, From, To) ->
    case dspex_metrics:detailed(Metric, From, To) of
        {ok, #{points := Ps}} -> Ps;
        {error, _} -> []
    end.

breakers() ->
    [#{name => N, status => S} || N <- dspex_breaker:names(), {ok, S} <- [dspex_breaker:status(N)]].

sessions(P) ->
    Q = maps:get(<<"q">>, P, <<>>),
    Offset = int(maps:get(<<"offset">>, P, <<"0">>), 0),
    Limit = min(500, max(1, int(maps:get(<<"limit">>, P, <<"50">>), 50))),
    All = lists:sort([S || S <- dspex_store:list_sessions(), Q =:= <<>> orelse binary:match(S, Q) =/= nomatch]),
    Page = lists:sublist(All, Offset + 1, Limit),
    #{total => length(All), offset => Offset, limit => Limit,
      items => [I || S <- Page, {ok, I} <- [dspex_nif:session_get(S)]]}.

int(B, Default) ->
    case string:to_integer(B) of
        {N, <<>>} when N >= 0 -> N;
        _ -> Default
    end.

%% One page of the session's variables (sorted by name; `offset', `limit'
%% at most ?VARS_PAGE_MAX, default ?VARS_PAGE) with `total', and the
%% diagnostics and graph cut to that page's variables: the answer's size is
%% bounded whatever the session's, and so is its cost
%% (`dspex_store:diagnostics_page/3' copies the page's values only).
session(S, P) ->
    Offset = int(maps:get(<<"offset">>, P, <<"0">>), 0),
    Limit = min(?VARS_PAGE_MAX, max(1, int(maps:get(<<"limit">>, P, <<"500">>), ?VARS_PAGE))),
    case dspex_store:diagnostics_page(S, Offset, Limit) of
        {ok, #{diagnostics := D, variables := Page, edges := Edges}} ->
            Holders = maps:from_list([{N, #{optimizer => O, token => T}}
                                      || #{variable := N, optimizer := O, token := T} <- maps:get(locks, D)]),
            {ok, #{diagnostics => D, graph => #{nodes => [N || #{name := N} <- Page], edges => Edges},
                   total => maps:get(variables, D), offset => Offset, limit => Limit,
                   variables => [(maps:with([id, name, type, value, version, updated_at, created_at, metadata,
                                             constraints, derived, error], V))#{lock => maps:get(N, Holders, null)}
                                 || #{name := N} = V <- Page]}};
        {error, _} = Error -> Error
    end.

%% The `dspex_opt' runs on this node: the holders of locks whose optimizer is
%% `{dspex_opt, Algorithm, RunPid}' (how `dspex_opt:start/3' takes them), each
%% with `dspex_opt:info/1', `trials/1' and `best/1'. A run that ends meanwhile
%% is left out.
opt_runs(Locks) ->
    Runs = lists:usort([Pid || #{optimizer := {dspex_opt, _, Pid}} <- Locks, is_pid(Pid)]),
    [#{run => Pid, info => Info, trials => Trials,
       best => case run_call(fun dspex_opt:best/1, Pid) of
                   {ok, B} -> B;
                   {error, _} -> null
               end}
     || Pid <- Runs, {ok, Info} <- [run_call(fun dspex_opt:info/1, Pid)],
        Trials <- [run_call(fun dspex_opt:trials/1, Pid)], is_list(Trials)].

%% A run that exits during the call (for any reason) is a run that ended.
run_call(F, Pid) ->
    try F(Pid)
    catch exit:_ -> {error, run_not_found}
    end.

%% The model registry (every version, its aliases) and every experiment and
%% rollout with its current results (`dspex_models:results/1', in the JSON
%% form of `dspex_events:json_term/1': tuples are lists), oldest id first.
models() ->
    case absent(dspex_models) of
        true -> #{absent => true};
        false ->
            {ok, Models} = dspex_models:list_models(all),
            Names = lists:usort([N || #{name := N} <- Models]),
            %% the experiments' server restarting: none listed this time
            Tests = try lists:sort(maps:to_list(dspex_models:list_tests()))
                    catch exit:_ -> []
                    end,
            #{absent => false,
              models => Models,
              aliases => [#{name => N, alias => A, model => Id}
                          || N <- Names, {A, Id} <- lists:sort(maps:to_list(dspex_models:aliases(N)))],
              tests => [dspex_events:json_term(maps:without([started], R))
                        || {Id, _} <- Tests, {ok, R} <- [catch dspex_models:results(Id)]]}
    end.

%% This node's region: `dspex_region:topology/0' with tuples made JSON
%% (coordinates `[Lat, Lon]', a gateway `"host:port"'), the peers a list
%% sorted by name, and `dspex_region:fenced/0'. `#{configured => false}'
%% when no region runs here (no `region' configured, or a build without it).
regions() ->
    Topology = case absent(dspex_region) of
                   true -> {error, not_running};
                   false -> dspex_region:topology()
               end,
    case Topology of
        {error, not_running} -> #{configured => false};
        #{peers := Peers, coords := Coords} = T ->
            {Fenced, Reachable} = case dspex_region:fenced() of
                                      false -> {false, null};
                                      {true, R} -> {true, R}
                                  end,
            (maps:with([region, gateway_port, transport, sessions, replication, backup_sessions], T))#{
              configured => true, coords => coords(Coords), fenced => Fenced, reachable => Reachable,
              peers => [(maps:without([coords, gateway], P))#{name => N, coords => coords(maps:get(coords, P, undefined)),
                                                              gateway => gateway(maps:get(gateway, P, undefined))}
                        || {N, P} <- lists:sort(maps:to_list(Peers))]}
    end.

coords({Lat, Lon}) -> [Lat, Lon];
coords(Other) -> Other.

gateway({Host, Port}) when is_integer(Port) ->
    H = case Host of
            _ when is_tuple(Host) -> inet:ntoa(Host);
            _ -> Host
        end,
    case unicode:characters_to_binary([H, ":", integer_to_list(Port)]) of
        B when is_binary(B) -> B;
        _ -> printed(Host)
    end;
gateway(Other) -> Other.

%% A page of the event log, newest first: the session's (`id') or every
%% session's, before the global position `before', of one type or all. It
%% first waits for the events queued so far to be durable: the page shows
%% every change committed before the request.
timeline(P) ->
    case dspex_events:enabled() of
        false -> {ok, #{enabled => false}};
        true ->
            _ = dspex_events:await(),
            Session = maps:get(<<"id">>, P, all),
            Limit = min(200, max(1, int(maps:get(<<"limit">>, P, <<"50">>), 50))),
            Before = int(maps:get(<<"before">>, P, <<"0">>), 0),
            Type = maps:get(<<"type">>, P, <<>>),
            Opts = maps:from_list([{direction, backward}, {limit, Limit + 1}]
                                  ++ [{until, {position, Before - 1}} || Before > 1]
                                  ++ [{types, [event_type(Type)]} || Type =/= <<>>]),
            Last = case Session of
                       all -> null;
                       _ -> case dspex_events:read(Session, #{direction => backward, limit => 1}) of
                                {ok, [#{sequence := L}]} -> L;
                                _ -> 0
                            end
                   end,
            case Before =:= 1 orelse dspex_events:read(Session, Opts) of
                true -> {ok, #{enabled => true, events => [], more => false, last_sequence => Last}};
                {ok, Evs} ->
                    Page = lists:sublist(Evs, Limit),
                    {ok, #{enabled => true, events => Page, more => length(Evs) > Limit,
                           last_sequence => Last}};
                {error, _} = E -> E
            end
    end.

%% An event type named by the page: a known type is an atom, any other
%% (an application's own) stays a binary.
event_type(T) ->
    try binary_to_existing_atom(T, utf8)
    catch error:badarg -> T
    end.

optimizations() ->
    Locks = try dspex_locks:active() catch exit:_ -> [] end,
    Now = dspex_metrics:clock(),
    #{time => Now,
      locks => [case dspex_locks:status(S, N) of
                    {ok, St} -> maps:merge(L, maps:with([waiters, best, iterations], St));
                    _ -> L
                end || #{session := S, variable := N} = L <- Locks],
      success => detailed(dspex_optimization_success, Now - 3599, Now),
      runs => opt_runs(Locks),
      absent => [#{module => M, issue => I, what => W} || {M, I, W} <- ?PARTS, M =:= dspex_opt, absent(M)]}.

access(S) ->
    Now = dspex_metrics:clock(),
    Denied = [E || #{event := denied} = E <- dspex_acl:audit_log(#{limit => 1000})],
    Count = fun(Ev) ->
                    case dspex_metrics:query({dspex_events_total, #{event => Ev}}, Now - 3599, Now, count) of
                        {ok, N} -> N;
                        _ -> 0
                    end
            end,
    Rules = case S of
                undefined -> #{};
                %% the rules only: no value of the session is read
                _ -> case dspex_acl:session_permissions(S) of
                         {ok, R} -> R;
                         _ -> #{}
                     end
            end,
    Limit = fun(Id) ->
                    case dspex_acl:get_rate_limit(Id) of
                        {ok, L} -> L#{session => Id};
                        {error, _} -> null
                    end
            end,
    %% every session with a limit on (rate > 0), 500 at most
    Limited = lists:sublist([L || Id <- lists:sort(dspex_store:list_sessions()),
                                  #{rate := R} = L <- [Limit(Id)], R > 0], 500),
    #{denied => lists:sublist(lists:reverse(Denied), 200),
      last_hour => #{denied => Count(<<"acl.denied">>), rate_limited => Count(<<"rate_limit.exceeded">>)},
      session => S, rules => Rules,
      rate_limit => case S of
                        undefined -> null;
                        _ -> Limit(S)
                    end,
      rate_limits => Limited}.

%%% Server-Sent Events ---------------------------------------------------------

sse(Mod, Session, Feeds) ->
    Head = [{content_type, "text/event-stream"}, {cache_control, "no-cache"}, {transfer_encoding, "chunked"}
            | lists:keydelete(cache_control, 1, security_headers())],
    httpd_response:send_header(Mod, 200, Head),
    Watch = watch(Session),
    Deadline = erlang:monotonic_time(millisecond) + ?SSE_MAX_MS,
    self() ! tick,
    try sse_loop(Mod, Session, Feeds, Watch, Deadline)
    after
        case Watch of
            {Ref, _} -> dspex_store:unwatch(Ref);
            _ -> ok
        end,
        %% httpd may reuse this process for the connection's next request:
        %% leave no timer and no message of the stream behind
        case erase(dspex_console_tick) of
            undefined -> ok;
            T -> _ = erlang:cancel_timer(T), ok
        end,
        flush_stream()
    end,
    already_sent.

flush_stream() ->
    receive
        tick -> flush_stream();
        {dspex_variable, _, _, _, _, _, _} -> flush_stream();
        {dspex_watch_lost, _, _} -> flush_stream()
    after 0 -> ok
    end.

watch(undefined) -> none;
watch(S) ->
    case dspex_store:list(S) of
        {ok, [_ | _] = Vars} ->
            Names = [N || #{name := N} <- Vars],
            case dspex_store:watch(S, Names, self()) of
                {error, _} -> none;
                Ref -> {Ref, length(Names)}
            end;
        _ -> none
    end.

sse_loop(Mod, Session, Feeds, Watch, Deadline) ->
    case erlang:monotonic_time(millisecond) > Deadline of
        true -> httpd_response:send_chunk(Mod, [], true);
        false ->
            receive
                tick ->
                    put(dspex_console_tick, erlang:send_after(1000, self(), tick)),
                    R1 = case Feeds of
                             [] -> send_raw(Mod, ": keep-alive\n\n");
                             _ -> worst([send(Mod, F, feed(F)) || F <- Feeds])
                         end,
                    R2 = check_count(Mod, Session, Watch),
                    continue([R1, R2], Mod, Session, Feeds, Watch, Deadline);
                {dspex_variable, _Ref, Session, Name, _Old, New, Meta} ->
                    R = send(Mod, variable, #{session => Session, name => Name, value => New,
                                              version => maps:get(version, Meta, null),
                                              updated_at => maps:get(updated_at, Meta, null),
                                              changed_by => maps:get(changed_by, Meta, null)}),
                    continue([R], Mod, Session, Feeds, Watch, Deadline);
                {dspex_watch_lost, _, _} ->
                    R = send(Mod, session, #{session => Session, reason => watch_lost}),
                    continue([R], Mod, Session, Feeds, Watch, Deadline);
                {dspex_variable, _, _, _, _, _, _} -> sse_loop(Mod, Session, Feeds, Watch, Deadline)
            end
    end.

continue(Results, Mod, Session, Feeds, Watch, Deadline) ->
    case lists:all(fun(R) -> R =:= ok end, Results) of
        true -> sse_loop(Mod, Session, Feeds, Watch, Deadline);
        false -> closed
    end.

feed(overview) -> overview();
feed(optimizations) -> optimizations();
feed(models) -> models();
feed(regions) -> regions().

worst(Results) ->
    case lists:all(fun(R) -> R =:= ok end, Results) of
        true -> ok;
        false -> closed
    end.

%% Variables registered or deleted since the watch began: the page reloads.
check_count(_Mod, undefined, _) -> ok;
check_count(Mod, Session, Watch) ->
    Known = case Watch of
                {_, N} -> N;
                none -> 0
            end,
    case dspex_nif:session_get(Session) of
        {ok, #{variable_count := Known}} -> ok;
        {ok, #{variable_count := N2}} -> send(Mod, session, #{session => Session, variables => N2});
        {error, _} -> send(Mod, session, #{session => Session, reason => session_not_found})
    end.

send(Mod, Event, Term) ->
    {ok, Json} = dspex_json:encode(jsonable(Term)),
    send_raw(Mod, ["event: ", atom_to_list(Event), "\ndata: ", Json, "\n\n"]).

send_raw(Mod, Data) ->
    case httpd_response:send_chunk(Mod, Data, false) of
        ok -> ok;
        _ -> closed
    end.

%%% JSON -------------------------------------------------------------------------

json(Code, Term) -> json(Code, Term, []).

json(Code, Term, Extra) ->
    {ok, Json} = dspex_json:encode(jsonable(Term)),
    {Code, "application/json", Extra, Json}.

text(Code, Text) -> {Code, "text/plain; charset=utf-8", [], Text}.

%% @doc Any term as a term `dspex_json:encode/1' accepts: `undefined' is
%% `null', pids, references, ports, funs and tuples are their printed text
%% (`{error, R}' reasons included), a binary that is not UTF-8 is its
%% printed text, map keys that are not atoms, binaries or integers are
%% printed too, and every key is a binary: of two keys with the same text
%% (`5' and `<<"5">>') the later in term order is printed (`<<"5">>').
-spec jsonable(term()) -> term().
jsonable(undefined) -> null;
jsonable(A) when is_atom(A) -> A;
jsonable(N) when is_number(N) -> N;
jsonable(B) when is_binary(B) ->
    case unicode:characters_to_binary(B) of
        B -> B;
        _ -> printed(B)
    end;
jsonable(L) when is_list(L) ->
    try [jsonable(X) || X <- L]
    catch error:_ -> printed(L)     % an improper list
    end;
jsonable(M) when is_map(M) ->
    %% keys in term order (numbers, atoms, ..., binaries): the first key of
    %% a text is that text, a later one that prints the same (5 and <<"5">>,
    %% a and <<"a">>) its printed term, so no JSON object has a key twice
    {L, _} = lists:foldl(fun({K, V}, {Acc, Seen}) ->
                                 Text = unique_key(key(K), K, Seen, 0),
                                 {[{Text, jsonable(V)} | Acc], Seen#{Text => true}}
                         end, {[], #{}}, lists:sort(maps:to_list(M))),
    maps:from_list(L);
jsonable(T) -> printed(T).

key(K) when is_atom(K) -> atom_to_binary(K);
key(K) when is_integer(K) -> integer_to_binary(K);
key(K) when is_binary(K) -> jsonable(K);
key(K) -> printed(K).

unique_key(Text, K, Seen, N) ->
    case maps:is_key(Text, Seen) of
        false -> Text;
        true when N =:= 0 -> unique_key(printed(K), K, Seen, 1);
        true -> unique_key(<<(printed(K))/binary, "#", (integer_to_binary(N))/binary>>, K, Seen, N + 1)
    end.

printed(T) -> unicode:characters_to_binary(io_lib:format("~0tp", [T])).

%%% requests ---------------------------------------------------------------------

split_uri(Uri) ->
    case string:split(Uri, "?") of
        [P, Q] -> {P, Q};
        [P] -> {P, ""}
    end.

params(Query, Method, Headers, Body) ->
    FromQuery = decode_query(Query),
    case Method of
        "POST" ->
            case lists:keyfind("content-type", 1, Headers) of
                {_, "application/x-www-form-urlencoded" ++ _} -> maps:merge(FromQuery, decode_query(Body));
                _ -> FromQuery
            end;
        _ -> FromQuery
    end.

decode_query("") -> #{};
decode_query(Q) ->
    case uri_string:dissect_query(Q) of
        L when is_list(L) ->
            %% a parameter that is not UTF-8 is dropped
            maps:from_list([{KB, VB} || {K, V} <- L, is_list(K) orelse is_binary(K), is_list(V) orelse is_binary(V),
                                        KB <- [unicode:characters_to_binary(K)], is_binary(KB),
                                        VB <- [unicode:characters_to_binary(V)], is_binary(VB)]);
        _ -> #{}
    end.
