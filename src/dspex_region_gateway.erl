%% @doc The region's gateway: listens on the configured `listen' address and
%% answers the links of peer regions. Each connection gets its own process
%% that answers `hello' with this region's name and coordinates and echoes
%% every probe at once. Frames are `{packet, 4}' (at most 64 KiB) holding
%% `term_to_binary({dspex_region, 1, Msg})'; a frame that does not decode with
%% `binary_to_term(B, [safe])', has another version or an unknown message
%% closes that connection (logged), nothing else.
-module(dspex_region_gateway).
-behaviour(gen_server).

-export([start_link/1, port/0, encode/1, decode/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).
-export([acceptor/2, handler/2]).

-define(VSN, 1).
-define(MAX_FRAME, 65536).

%% @private
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(C) -> gen_server:start_link({local, ?MODULE}, ?MODULE, C, []).

%% @doc The port the gateway listens on, or `{error, not_running}'.
-spec port() -> inet:port_number() | {error, not_running}.
port() ->
    try gen_server:call(?MODULE, port)
    catch exit:{noproc, _} -> {error, not_running}
    end.

%% @doc A frame's payload for `Msg'.
-spec encode(term()) -> binary().
encode(Msg) -> term_to_binary({dspex_region, ?VSN, Msg}).

%% @doc The message of a frame's payload, or `{error, bad_frame | {version, V}}'.
-spec decode(binary()) -> {ok, term()} | {error, bad_frame | {version, term()}}.
decode(B) ->
    try binary_to_term(B, [safe]) of
        {dspex_region, ?VSN, Msg} -> {ok, Msg};
        {dspex_region, V, _} -> {error, {version, V}};
        _ -> {error, bad_frame}
    catch error:badarg -> {error, bad_frame}
    end.

%%% server ---------------------------------------------------------------------

%% @private
-spec init(map()) -> {ok, map()} | {stop, term()}.
init(#{listen := {IP, Port}} = C) ->
    process_flag(trap_exit, true),
    case gen_tcp:listen(Port, [binary, {ip, IP}, {packet, 4}, {packet_size, ?MAX_FRAME}, {active, false},
                               {reuseaddr, true}, {nodelay, true}, {backlog, 64},
                               {send_timeout, 5000}, {send_timeout_close, true}]) of
        {ok, L} ->
            {ok, P} = inet:port(L),
            Acc = proc_lib:spawn_link(?MODULE, acceptor, [self(), L]),
            {ok, #{listen => L, port => P, acceptor => Acc, name => maps:get(name, C), coords => maps:get(coords, C)}};
        {error, E} -> {stop, {gateway_listen, E}}
    end.

%% @private
-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(port, _From, #{port := P} = St) -> {reply, P, St};
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

%% @private
-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

%% @private
-spec handle_info(term(), map()) -> {noreply, map()} | {stop, term(), map()}.
handle_info({accepted, S}, #{name := N, coords := Co} = St) ->
    %% the socket is ours (the acceptor handed it over); pass it to its handler
    H = proc_lib:spawn_link(?MODULE, handler, [S, {N, Co}]),
    case gen_tcp:controlling_process(S, H) of
        ok -> H ! go;
        {error, _} -> gen_tcp:close(S), exit(H, kill)
    end,
    {noreply, St};
handle_info({'EXIT', Acc, Why}, #{acceptor := Acc} = St) -> {stop, {acceptor, Why}, St};
handle_info({'EXIT', _Handler, _}, St) -> {noreply, St};
handle_info(_, St) -> {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_, #{listen := L}) -> _ = gen_tcp:close(L), ok.

%% @private Accepts connections and hands each to the gateway.
-spec acceptor(pid(), gen_tcp:socket()) -> no_return().
acceptor(Gw, L) ->
    case gen_tcp:accept(L) of
        {ok, S} ->
            case gen_tcp:controlling_process(S, Gw) of
                ok -> Gw ! {accepted, S};
                {error, _} -> gen_tcp:close(S)
            end,
            acceptor(Gw, L);
        {error, E} -> exit({accept, E})
    end.

%% @private One inbound link: hello, then probes echoed.
-spec handler(gen_tcp:socket(), {binary(), dspex_region:coords()}) -> ok.
handler(S, Me) ->
    receive go -> ok end,
    loop(S, Me, undefined).

loop(S, {Name, Coords} = Me, From) ->
    ok = case inet:setopts(S, [{active, once}]) of ok -> ok; {error, _} -> ok end,
    receive
        {tcp, S, B} ->
            case decode(B) of
                {ok, {hello, Peer, _PeerCoords}} when is_binary(Peer) ->
                    send(S, {welcome, Name, Coords}),
                    loop(S, Me, Peer);
                {ok, {ping, _Seq, _T0} = Ping} when From =/= undefined ->
                    %% echoed as is: the link measures with its own clock
                    send(S, setelement(1, Ping, pong)),
                    loop(S, Me, From);
                Bad ->
                    logger:warning("dspex_region gateway: closing the link of ~p: ~p", [From, Bad]),
                    gen_tcp:close(S)
            end;
        {tcp_closed, S} -> ok;
        {tcp_error, S, _} -> gen_tcp:close(S)
    end.

send(S, Msg) -> _ = gen_tcp:send(S, encode(Msg)), ok.
