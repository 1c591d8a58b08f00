%% @doc The debug console: a web page for operators served by the node at
%% `http://127.0.0.1:9570/' (OTP inets httpd), with JSON endpoints under
%% `/api/' and live updates as Server-Sent Events (`/api/events').
%%
%% The pages (plain HTML, CSS and JavaScript in `priv/www', the chart library
%% uPlot pinned by version and checksum in `priv/www/vendor', installed by
%% `make console-vendor') call only the public diagnostics functions:
%% `dspex_store:diagnostics/1', `dspex_graph:to_svg/1', `dspex_metrics:detailed/3',
%% `dspex_locks:active/0' and the other public APIs (see `dspex_console_http').
%%
%% Application environment: `console_enabled' (default `true'), `console_port'
%% (default 9570; 0 picks a free port, see `port/0'), `console_bind' (default
%% `{127,0,0,1}'), `console_token' (a bearer token, string or binary;
%% default none), `console_write' (default `false': read-only),
%% `console_certfile' and `console_keyfile' (PEM files: the console then
%% speaks HTTPS only, through OTP `ssl', TLS 1.2 and 1.3),
%% `console_allowed_hosts' (extra names the `Host' header may carry).
%% At most 200 connections; an idle keep-alive one is closed after 5 s.
%%
%% Security: without a token an `/api/' request must name the console in
%% its `Host' header (`127.0.0.1', `localhost', `[::1]', the bind address or
%% a name of `console_allowed_hosts', with or without the port), else 403
%% `host_not_allowed': a page of another site whose name was rebound to
%% 127.0.0.1 (DNS rebinding) sends its own name. With a token the header is
%% checked only when `console_allowed_hosts' names some.
%% Any bind address other than a loopback one requires
%% `console_token' (without it the console does not start: the error is
%% logged). When a token is configured every `/api/' request must carry
%% `Authorization: Bearer Token' (else 401). Writes (the rollback of a
%% variable) need `console_write => true' (else 403 `read_only'), a configured
%% token presented by the request (else 401), and the header
%% `X-DSPex-CSRF' equal to this node's CSRF token, which `GET /api/config'
%% returns (else 403 `csrf'). Every response carries a
%% Content-Security-Policy that forbids inline scripts and any other origin,
%% inets' own error pages too.
-module(dspex_console).
-behaviour(gen_server).

-export([start_link/0, port/0, config/0, check_config/2, allowed_hosts/3]).
-export([init/1, handle_call/3, handle_cast/2, terminate/2]).

-type config() :: #{token := binary() | undefined, write := boolean(), csrf := binary(),
                    bind := term(), www := file:filename(), hosts := [string()] | any}.
-export_type([config/0]).

%% @doc Starts the console, or `ignore' when disabled (or when its
%% configuration is refused or its port cannot be bound: logged, a port in
%% use by another listener as a warning).
-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    case application:get_env(dspex_bridge, console_enabled, true) of
        true -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []);
        false -> ignore
    end.

%% @doc The TCP port the console listens on, or `{error, not_running}'.
-spec port() -> inet:port_number() | {error, not_running}.
port() ->
    try gen_server:call(?MODULE, port)
    catch exit:{noproc, _} -> {error, not_running}
    end.

%% @doc The running console's security settings (read by the request
%% handlers from a persistent term, never from a server).
-spec config() -> config().
config() -> persistent_term:get(?MODULE).

%% @doc The start-up policy: a loopback bind needs nothing; any other
%% address needs a non-empty token. `ok' or `{error, token_required}'.
-spec check_config(term(), binary() | undefined) -> ok | {error, token_required}.
check_config(Bind, Token) ->
    case loopback(Bind) orelse (is_binary(Token) andalso Token =/= <<>>) of
        true -> ok;
        false -> {error, token_required}
    end.

loopback({127, _, _, _}) -> true;
loopback({0, 0, 0, 0, 0, 0, 0, 1}) -> true;
loopback(localhost) -> true;
loopback("localhost") -> true;
loopback(S) when is_list(S) ->
    case inet:parse_address(S) of
        {ok, A} -> loopback(A);
        _ -> false
    end;
loopback(_) -> false.

%% @doc The `Host' names a request may carry (lower case, without the port),
%% or `any': without a token, the loopback names and the bind address, plus
%% `Extra' (`console_allowed_hosts'); with a token, `any' unless `Extra' names
%% some (the token is what stops another site's page then).
-spec allowed_hosts(term(), binary() | undefined, [string() | binary()]) -> [string()] | any.
allowed_hosts(_Bind, Token, []) when Token =/= undefined -> any;
allowed_hosts(Bind, _Token, Extra) ->
    Own = case Bind of
              {_, _, _, _} -> [inet:ntoa(Bind)];
              {_, _, _, _, _, _, _, _} -> ["[" ++ inet:ntoa(Bind) ++ "]"];
              _ when is_atom(Bind) -> [atom_to_list(Bind)];
              _ when is_list(Bind) -> [Bind];
              _ -> []
          end,
    %% names that are not text are left out
    lists:usort([string:lowercase(L) || H <- ["127.0.0.1", "localhost", "[::1]" | Own] ++ list(Extra),
                                        L <- [catch unicode:characters_to_list(H)], is_list(L), L =/= ""]).

list(L) when is_list(L) -> L;
list(_) -> [].

%%% server: owns the httpd instance -------------------------------------------

%% @private
-spec init([]) -> {ok, map()} | ignore.
init([]) ->
    process_flag(trap_exit, true),
    Port = application:get_env(dspex_bridge, console_port, 9570),
    Bind = application:get_env(dspex_bridge, console_bind, {127, 0, 0, 1}),
    Token = case application:get_env(dspex_bridge, console_token, undefined) of
                T when is_list(T), T =/= [] -> unicode:characters_to_binary(T);
                T when is_binary(T), T =/= <<>> -> T;
                _ -> undefined
            end,
    case check_config(Bind, Token) of
        {error, token_required} ->
            logger:error("dspex_console: bind address ~p is not loopback and no console_token is configured; "
                         "console disabled", [Bind]),
            ignore;
        ok ->
            case port_free(Bind, Port) of
                true -> serve(Bind, Port, Token);
                false ->
                    %% a default-on extra must not disturb a node that shares
                    %% the machine with another: a warning, not a crash report
                    logger:warning("dspex_console: port ~p on ~p is in use; the node runs without the console "
                                   "(set console_port, 0 = any free port)", [Port, Bind]),
                    ignore
            end
    end.

%% Probes the port first, so that a busy port is not a crash report of
%% inets' own supervisors (a port taken in between still fails below, logged).
port_free(_Bind, 0) -> true;
port_free(Bind, Port) ->
    Ip = case Bind of
             T when is_tuple(T) -> [{ip, T}];
             _ -> []
         end,
    case gen_tcp:listen(Port, [{reuseaddr, true} | Ip]) of
        {ok, S} -> gen_tcp:close(S), true;
        {error, eaddrinuse} -> false;
        {error, _} -> true     % inets reports it
    end.

serve(Bind, Port, Token) ->
    persistent_term:put(?MODULE, #{token => Token,
                                   write => application:get_env(dspex_bridge, console_write, false) =:= true,
                                   csrf => base64url(crypto_bytes(24)), bind => Bind,
                                   www => filename:join(code:priv_dir(dspex_bridge), "www"),
                                   hosts => allowed_hosts(Bind, Token,
                                                          application:get_env(dspex_bridge, console_allowed_hosts, []))}),
    Root = code:lib_dir(dspex_bridge),
    %% an idle keep-alive connection holds one of the max_clients slots: a
    %% short timeout keeps idle clients from locking the console out for long
    Conf = [{port, Port}, {bind_address, Bind}, {server_name, "dspex_console"},
            {server_root, Root}, {document_root, Root}, {modules, [dspex_console_http]},
            {customize, dspex_console_http},
            {keep_alive_timeout, 5}, {max_clients, 200} | tls()],
    case inets:start(httpd, Conf) of
        {ok, Pid} ->
            [{port, Actual}] = httpd:info(Pid, [port]),
            {ok, #{httpd => Pid, port => Actual}};
        {error, Reason} ->
            logger:error("dspex_console: cannot serve on ~p:~p: ~p; console disabled", [Bind, Port, Reason]),
            ignore
    end.

%% HTTPS (OTP ssl) when `console_certfile' is configured; the key is in
%% `console_keyfile' (default: the certificate file).
tls() ->
    case application:get_env(dspex_bridge, console_certfile, undefined) of
        undefined -> [];
        Cert ->
            {ok, _} = application:ensure_all_started(ssl),
            Key = application:get_env(dspex_bridge, console_keyfile, Cert),
            [{socket_type, {ssl, [{certfile, Cert}, {keyfile, Key}, {versions, ['tlsv1.3', 'tlsv1.2']}]}}]
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

crypto_bytes(N) -> crypto:strong_rand_bytes(N).

base64url(B) -> binary:replace(binary:replace(base64:encode(B), <<"+">>, <<"-">>, [global]), <<"/">>, <<"_">>, [global]).
