%% @doc The region's gateway: listens on the configured `listen' address and
%% answers the links of peer regions, over TLS with a client certificate of
%% the configured CA required when `tls' is set (the handshake runs in the
%% connection's own process, never in the acceptor), else plain TCP on a
%% loopback address. Each connection gets its own process that answers `hello' with this region's name and coordinates, echoes
%% every probe at once, applies the replication batches the peer (a primary
%% region) sends and acknowledges each (`dspex_region_receiver'), and answers
%% reads it forwards (`read => primary'). Frames are `{packet, 4}' (at most 64 KiB) holding
%% `term_to_binary({dspex_region, 1, Msg})'; a frame that does not decode with
%% `binary_to_term(B, [safe])', has another version or an unknown message
%% closes that connection (logged), nothing else.
-module(dspex_region_gateway).
-behaviour(gen_server).

-export([start_link/1, port/0, encode/1, decode/1]).
-export([tls_options/2, setopts/2, controlling_process/2, close/1, transport/1]).
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
    Tls = maps:get(tls, C, undefined),
    Opts = [binary, {ip, IP}, {packet, 4}, {packet_size, ?MAX_FRAME}, {active, false},
            {reuseaddr, true}, {nodelay, true}, {backlog, 64}, {send_timeout, 5000}, {send_timeout_close, true}],
    Listen = case Tls of
                 undefined -> gen_tcp:listen(Port, Opts);
                 _ -> {ok, _} = application:ensure_all_started(ssl),
                      ssl:listen(Port, Opts ++ tls_options(server, Tls))
             end,
    case Listen of
        {ok, L} ->
            {ok, {_, P}} = case Tls of undefined -> inet:sockname(L); _ -> ssl:sockname(L) end,
            Acc = proc_lib:spawn_link(?MODULE, acceptor, [self(), L]),
            {ok, #{listen => L, port => P, acceptor => Acc, name => maps:get(name, C), coords => maps:get(coords, C)}};
        {error, E} -> {stop, {gateway_listen, E}}
    end.

%% @private The `ssl' options of either end: mutual authentication against
%% the configured CA, TLS 1.2 or 1.3.
-spec tls_options(server | client, map()) -> [ssl:tls_option()].
tls_options(Role, #{certfile := Cert, keyfile := Key, cacertfile := CA}) ->
    [{certfile, Cert}, {keyfile, Key}, {cacertfile, CA}, {verify, verify_peer},
     {versions, ['tlsv1.3', 'tlsv1.2']}]
        ++ case Role of
               server -> [{fail_if_no_peer_cert, true}];
               client -> []
           end.

%% @private
-spec transport(term()) -> gen_tcp | ssl.
transport(S) when is_port(S) -> gen_tcp;
transport(_) -> ssl.

%% @private
-spec setopts(term(), list()) -> ok | {error, term()}.
setopts(S, O) when is_port(S) -> inet:setopts(S, O);
setopts(S, O) -> ssl:setopts(S, O).

%% @private
-spec controlling_process(term(), pid()) -> ok | {error, term()}.
controlling_process(S, P) when is_port(S) -> gen_tcp:controlling_process(S, P);
controlling_process(S, P) -> ssl:controlling_process(S, P).

%% @private
-spec close(term()) -> ok.
close(S) when is_port(S) -> gen_tcp:close(S);
close(S) -> _ = ssl:close(S), ok.

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
    case controlling_process(S, H) of
        ok -> H ! go;
        {error, _} -> close(S), exit(H, kill)
    end,
    {noreply, St};
handle_info({'EXIT', Acc, Why}, #{acceptor := Acc} = St) -> {stop, {acceptor, Why}, St};
handle_info({'EXIT', _Handler, _}, St) -> {noreply, St};
handle_info(_, St) -> {noreply, St}.

%% @private
-spec terminate(term(), map()) -> ok.
terminate(_, #{listen := L}) -> close(L).

%% @private Accepts connections and hands each to the gateway.
-spec acceptor(pid(), term()) -> no_return().
acceptor(Gw, L) ->
    Accepted = case transport(L) of
                   gen_tcp -> gen_tcp:accept(L);
                   ssl -> ssl:transport_accept(L)
               end,
    case Accepted of
        {ok, S} ->
            case controlling_process(S, Gw) of
                ok -> Gw ! {accepted, S};
                {error, _} -> close(S)
            end,
            acceptor(Gw, L);
        {error, E} -> exit({accept, E})
    end.

%% @private One inbound link: hello, then probes echoed.
-spec handler(term(), {binary(), dspex_region:coords()}) -> ok.
handler(S, Me) ->
    receive go -> ok end,
    case transport(S) of
        gen_tcp -> loop(S, Me, undefined, []);
        ssl ->
            %% a peer without a certificate of our CA ends here
            case ssl:handshake(S, 5000) of
                {ok, S1} -> loop(S1, Me, undefined, []);
                {error, E} -> logger:warning("dspex_region gateway: TLS handshake refused: ~p", [E]), close(S)
            end
    end.

%% Parts: the frames received so far of a batch sent in several (newest first).
loop(S, {Name, Coords} = Me, From, Parts) ->
    _ = setopts(S, [{active, once}]),
    receive
        {T, S, B} when T =:= tcp; T =:= ssl ->
            case decode(B) of
                {ok, {hello, Peer, _PeerCoords}} when is_binary(Peer) ->
                    send(S, {welcome, Name, Coords}),
                    loop(S, Me, Peer, []);
                {ok, {ping, _Seq, _T0} = Ping} when From =/= undefined ->
                    %% echoed as is: the link measures with its own clock
                    send(S, setelement(1, Ping, pong)),
                    _ = dspex_region_receiver:heard(From),
                    loop(S, Me, From, Parts);
                {ok, {repl, _Id, false, Part}} when From =/= undefined, is_binary(Part) ->
                    loop(S, Me, From, [Part | Parts]);
                {ok, {repl, Id, true, Part}} when From =/= undefined, is_binary(Part) ->
                    %% a whole batch: applied here, in the order the primary sent it
                    Res = try binary_to_term(iolist_to_binary(lists:reverse([Part | Parts])), [safe]) of
                              Batch -> dspex_region_receiver:apply_batch(From, Batch)
                          catch error:badarg -> bad_frame
                          end,
                    case Res of
                        bad_frame ->
                            logger:warning("dspex_region gateway: closing the link of ~p: bad batch ~p", [From, Id]),
                            close(S);
                        _ ->
                            send(S, {repl_ack, Id, Res}),
                            loop(S, Me, From, [])
                    end;
                {ok, {read, Ref, Session, Key}} when From =/= undefined, is_binary(Session) ->
                    %% read => primary from a backup region
                    send(S, {read_reply, Ref, dspex_region_receiver:read_local(Session, Key, Name)}),
                    loop(S, Me, From, Parts);
                Bad ->
                    logger:warning("dspex_region gateway: closing the link of ~p: ~p", [From, Bad]),
                    close(S)
            end;
        {T, S} when T =:= tcp_closed; T =:= ssl_closed -> ok;
        {T, S, _} when T =:= tcp_error; T =:= ssl_error -> close(S)
    end.

send(S, Msg) -> _ = (transport(S)):send(S, encode(Msg)), ok.
