%% EUnit: dspex_region's configuration checks, distance and percentile, the
%% gateway's protocol (a bad frame closes that connection only) and routing
%% of a region without peers. The three-region tests are dspex_region_SUITE.
-module(dspex_region_tests).
-include_lib("eunit/include/eunit.hrl").

base() ->
    #{name => <<"eu">>, coords => {50.0, 8.0}, listen => {{127, 0, 0, 1}, 0},
      peers => [#{name => <<"us">>, gateway => {"localhost", 4000}, coords => {40.0, -75.0}}]}.

with_env(C, F) ->
    Old = application:get_env(dspex_bridge, region),
    application:set_env(dspex_bridge, region, C),
    try F()
    after
        case Old of
            undefined -> application:unset_env(dspex_bridge, region);
            {ok, V} -> application:set_env(dspex_bridge, region, V)
        end
    end.

config_test_() ->
    B = base(),
    Err = fun(C) -> with_env(C, fun dspex_region:config/0) end,
    [?_assertEqual(undefined, begin application:unset_env(dspex_bridge, region), dspex_region:config() end),
     ?_assertMatch(#{name := <<"eu">>, probe_ms := 1000, window := 64, down_after_ms := 3000,
                     peers := [#{name := <<"us">>}]}, Err(B)),
     %% plain TCP only between loopback addresses
     ?_assertEqual({error, {invalid_argument, {listen, not_loopback}}}, Err(B#{listen => {{10, 0, 0, 1}, 0}})),
     ?_assertEqual({error, {invalid_argument, {{peer, <<"us">>}, not_loopback}}},
                   Err(B#{peers => [#{name => <<"us">>, gateway => {{192, 168, 1, 9}, 4000}, coords => {0, 0}}]})),
     ?_assertEqual({error, {invalid_argument, {tls, {no_file, certfile}}}},
                   Err(B#{tls => #{certfile => "/nonexistent/c", keyfile => "k", cacertfile => "ca"}})),
     ?_assertEqual({error, {invalid_argument, {tls, bad_options}}}, Err(B#{tls => #{certfile => "c"}})),
     ?_assertEqual({error, {invalid_argument, {peers, duplicate_name}}},
                   Err(B#{peers => [#{name => <<"eu">>, gateway => {"localhost", 1}, coords => {0, 0}}]})),
     ?_assertEqual({error, {invalid_argument, {coords, bad_coords}}}, Err(B#{coords => {91, 0}})),
     ?_assertEqual({error, {invalid_argument, {weights, <<"us">>}}}, Err(B#{weights => #{<<"us">> => 0}})),
     ?_assertEqual({error, {invalid_argument, probe_ms}}, Err(B#{probe_ms => 0})),
     %% fast probes still give a slow link a second before it is called down
     ?_assertMatch(#{down_after_ms := 1000}, Err(B#{probe_ms => 10})),
     ?_assertEqual({error, {invalid_argument, region}}, Err(not_a_map)),
     %% the supervisor refuses to start, saying why
     ?_assertMatch({error, {shutdown, {failed_to_start_child, dspex_region, {invalid_argument, {listen, not_loopback}}}}},
                   with_env(B#{listen => {{10, 0, 0, 1}, 0}}, fun() ->
                       %% unregistered: the application (started by other test modules) may run its own
                       process_flag(trap_exit, true), supervisor:start_link(dspex_region_sup, []) end))].

%% every value config/0 accepts must be one the processes can use: octets,
%% timers below 2^32 ms, bounded weights, printable names
config_bounds_test_() ->
    B = base(),
    Err = fun(C) -> with_env(C, fun dspex_region:config/0) end,
    Peer = fun(GW) -> B#{peers => [#{name => <<"us">>, gateway => GW, coords => {0, 0}}]} end,
    Big = 1 bsl 32,
    [?_assertEqual({error, {invalid_argument, {listen, bad_address}}}, Err(B#{listen => {{127, a, b, c}, 0}})),
     ?_assertEqual({error, {invalid_argument, {listen, bad_address}}}, Err(B#{listen => {{127, 0, 0, 256}, 0}})),
     ?_assertEqual({error, {invalid_argument, {listen, bad_address}}}, Err(B#{listen => {{127, 0, 0}, 0}})),
     ?_assertEqual({error, {invalid_argument, {{peer, <<"us">>}, bad_address}}}, Err(Peer({{127, 999, 0, 1}, 4000}))),
     ?_assertEqual({error, {invalid_argument, {{peer, <<"us">>}, bad_address}}}, Err(Peer({{127, a, b, c}, 4000}))),
     ?_assertEqual({error, {invalid_argument, {{peer, <<"us">>}, bad_address}}},
                   Err(Peer({{0, 0, 0, 0, 0, 0, 0, 1 bsl 16}, 4000}))),
     ?_assertMatch(#{peers := [#{gateway := {{0, 0, 0, 0, 0, 0, 0, 1}, 4000}}]}, Err(Peer({{0, 0, 0, 0, 0, 0, 0, 1}, 4000}))),
     ?_assertMatch(#{listen := {{127, 255, 255, 255}, 0}}, Err(B#{listen => {{127, 255, 255, 255}, 0}})),
     [?_assertEqual({error, {invalid_argument, K}}, Err(B#{K => Big}))
      || K <- [probe_ms, down_after_ms, backoff_max_ms, sync_timeout_ms, region_failover_ms]],
     ?_assertEqual({error, {invalid_argument, backoff_min_ms}}, Err(B#{backoff_min_ms => Big, backoff_max_ms => Big})),
     ?_assertEqual({error, {invalid_argument, sync_timeout_ms}}, Err(B#{sync_timeout_ms => 5000000000})),
     ?_assertMatch(#{sync_timeout_ms := 4294967295, region_failover_ms := 4294967295, probe_ms := 4294967295,
                     down_after_ms := 4294967295},
                   Err(B#{sync_timeout_ms => Big - 1, region_failover_ms => Big - 1, probe_ms => Big - 1})),
     %% weights: a cost multiplier in [0.001, 1000]
     ?_assertEqual({error, {invalid_argument, {weights, <<"eu">>}}}, Err(B#{weights => #{<<"eu">> => 1.0e306}})),
     ?_assertEqual({error, {invalid_argument, {weights, <<"us">>}}}, Err(B#{weights => #{<<"us">> => 1000.5}})),
     ?_assertEqual({error, {invalid_argument, {weights, <<"us">>}}}, Err(B#{weights => #{<<"us">> => 0.0001}})),
     ?_assertMatch(#{weights := #{<<"us">> := 1000, <<"eu">> := 0.001}},
                   Err(B#{weights => #{<<"us">> => 1000, <<"eu">> => 0.001}})),
     %% names: printable UTF-8 (label values of /metrics)
     [?_assertEqual({error, {invalid_argument, {name, bad_name}}}, Err(B#{name => N}))
      || N <- [<<"eu\"} 1\nfake_metric{x=\"">>, <<"eu\n">>, <<255>>, <<"eu", 0>>, <<"eu", 16#c2, 16#85>>]],
     ?_assertEqual({error, {invalid_argument, {{peer, name}, bad_name}}},
                   Err(B#{peers => [#{name => <<"us\r">>, gateway => {"localhost", 1}, coords => {0, 0}}]})),
     ?_assertMatch(#{name := <<"eu-west \"1\" \\ é"/utf8>>}, Err(B#{name => <<"eu-west \"1\" \\ é"/utf8>>}))].

haversine_test() ->
    %% Paris - London, about 344 km
    D = dspex_region:haversine_km({48.8566, 2.3522}, {51.5074, -0.1278}),
    ?assert(D > 340 andalso D < 347, D),
    ?assertEqual(0.0, dspex_region:haversine_km({10, 10}, {10, 10})).

percentile_test() ->
    L = lists:seq(1, 100),
    ?assertEqual(50, dspex_region_link:percentile(L, 0.5)),
    ?assertEqual(99, dspex_region_link:percentile(L, 0.99)),
    ?assertEqual(7, dspex_region_link:percentile([7], 0.99)).

%% a region without peers, its tables and gateway only
standalone(F) ->
    process_flag(trap_exit, true),
    C = with_env((base())#{peers => []}, fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C),
    {ok, G} = dspex_region_gateway:start_link(C),
    try F(C)
    after
        [begin exit(P, shutdown), receive {'EXIT', P, _} -> ok after 5000 -> ok end end || P <- [G, R]],
        ok
    end.

%% A stand-in for a session writer registered as `Name': answers every
%% export_for with an empty session at epoch 1, seq 7, until sent `stop'.
fake_writer(Name) ->
    P = spawn(fun Loop() ->
                      receive
                          {'$gen_call', F, {export_for, S}} ->
                              gen_server:reply(F, {ok, 1, 7, #{id => S, variables => []}}),
                              Loop();
                          stop -> ok
                      end
              end),
    true = register(Name, P),
    P.

%% The export of an empty session `S' (a full copy's payload); `S' is not
%% left in the store.
empty_export(S) ->
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, Export} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    Export.

%% A full copy of session S holding the integer variable <<"k">> = V (the
%% session itself removed again).
k_export(S, V) ->
    _ = dspex_store:delete_session(S),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, <<"k">>, integer, V, #{}),
    {ok, Export} = dspex_store:export_session(S),
    ok = dspex_store:delete_session(S),
    Export.

connect() ->
    {ok, S} = gen_tcp:connect({127, 0, 0, 1}, dspex_region_gateway:port(), [binary, {packet, 4}, {active, false}]),
    S.

call(S, Msg) ->
    ok = gen_tcp:send(S, dspex_region_gateway:encode(Msg)),
    case gen_tcp:recv(S, 0, 5000) of
        {ok, B} -> dspex_region_gateway:decode(B);
        E -> E
    end.

gateway_protocol_test() ->
    standalone(fun(_) ->
        S = connect(),
        ?assertEqual({ok, {welcome, <<"eu">>, {50.0, 8.0}}}, call(S, {hello, <<"us">>, {1, 2}})),
        ?assertEqual({ok, {pong, 1, 12345}}, call(S, {ping, 1, 12345})),
        %% a frame that is not a term, another version, a probe before hello: that connection closes
        Bad = connect(),
        ok = gen_tcp:send(Bad, <<131, 255, 0>>),
        ?assertEqual({error, closed}, gen_tcp:recv(Bad, 0, 5000)),
        V2 = connect(),
        ok = gen_tcp:send(V2, term_to_binary({dspex_region, 2, {hello, <<"x">>, {0, 0}}})),
        ?assertEqual({error, closed}, gen_tcp:recv(V2, 0, 5000)),
        Early = connect(),
        ?assertEqual({error, closed}, call(Early, {ping, 1, 1})),
        %% the first connection and the gateway are unaffected
        ?assertEqual({ok, {pong, 2, 7}}, call(S, {ping, 2, 7})),
        ?assertEqual({ok, {welcome, <<"eu">>, {50.0, 8.0}}}, call(connect(), {hello, <<"us">>, {1, 2}}))
    end).

decode_is_safe_test() ->
    %% an atom this node does not know is refused, not created
    Unknown = <<131, 100, 0, 20, "dspex_no_such_atom_q">>,
    ?assertEqual({error, bad_frame}, dspex_region_gateway:decode(Unknown)).

routing_without_peers_test() ->
    ?assertEqual({error, not_running}, dspex_region:route_session(<<"s">>, #{})),
    standalone(fun(_) ->
        #{primary_region := <<"eu">>, backup_regions := [], policy := lowest_rtt} = D =
            dspex_region:route_session(<<"s">>, #{}),
        ?assertEqual(D, dspex_region:route_session(<<"s">>, #{client_location => {0, 0}})),
        ok = dspex_region:forget_session(<<"s">>),
        ?assertMatch(#{policy := nearest}, dspex_region:route_session(<<"s">>, #{client_location => {0, 0}})),
        ?assertEqual({error, {invalid_argument, session}}, dspex_region:route_session(s, #{})),
        ?assertMatch(#{region := <<"eu">>, sessions := 1, peers := #{}}, dspex_region:topology())
    end),
    ?assertEqual({error, not_running}, dspex_region:topology()).

%% a cost times a weight that overflows a float (only a configuration
%% given to start_link/1 as is can hold such a weight): sorted last, the
%% router lives on with its decisions
routing_survives_an_overflowing_score_test() ->
    process_flag(trap_exit, true),
    C0 = with_env((base())#{peers => []}, fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C0#{weights => #{<<"eu">> => 1.0e306}}),
    try
        #{primary_region := <<"eu">>} = D = dspex_region:route_session(<<"a">>, #{}),
        ?assertMatch(#{primary_region := <<"eu">>, policy := nearest},
                     dspex_region:route_session(<<"c">>, #{client_location => {-50.0, -170.0}})),
        ?assert(is_process_alive(R)),
        ?assertEqual(D, dspex_region:decision(<<"a">>))
    after
        exit(R, shutdown),
        receive {'EXIT', R, _} -> ok after 5000 -> ok end
    end.

%% no decision is recorded for a session id the store refuses
route_session_checks_the_session_id_test() ->
    standalone(fun(_) ->
        Max = maps:get(max_name_length, dspex_store:limits()),
        [?assertEqual(dspex_store:create_session(Id), dspex_region:route_session(Id, #{}))
         || Id <- [<<>>, <<255, 254>>, binary:copy(<<"a">>, 100000), binary:copy(<<"a">>, Max + 1)]],
        ?assertEqual({error, {invalid_argument, name}}, dspex_region:route_session(<<0, "cache:s">>, #{})),
        [?assertEqual(undefined, dspex_region:decision(Id)) || Id <- [<<>>, <<255, 254>>, <<0, "cache:s">>]],
        ?assertMatch(#{sessions := 0}, dspex_region:topology()),
        ?assertMatch(#{primary_region := <<"eu">>}, dspex_region:route_session(binary:copy(<<"a">>, Max), #{}))
    end).

%% the exposition escapes the names it is given, whatever their source
prometheus_escapes_region_names_test() ->
    process_flag(trap_exit, true),
    C0 = with_env(base(), fun dspex_region:config/0),
    Me = <<"eu\"} 1\nfake_metric{x=\"">>,
    {ok, R} = dspex_region:start_link(C0#{name => Me,
                                          peers => [#{name => <<"us\\west\n">>, gateway => {"localhost", 4000},
                                                      coords => {40.0, -75.0}}]}),
    try
        Lines = [L || L <- binary:split(iolist_to_binary(dspex_region:prometheus()), <<"\n">>, [global]), L =/= <<>>],
        %% every line a comment or one of the series, none injected
        [?assert(binary:match(L, [<<"# ">>, <<"dspex_region_">>]) =:= {0, 2} orelse
                 binary:longest_common_prefix([L, <<"dspex_region_">>]) =:= 13, L) || L <- Lines],
        ?assert(lists:member(<<"dspex_region_link_up{region=\"eu\\\"} 1\\nfake_metric{x=\\\"\",peer=\"us\\\\west\\n\"} 0">>,
                             Lines), Lines)
    after
        exit(R, shutdown),
        receive {'EXIT', R, _} -> ok after 5000 -> ok end
    end.

%% a move whose shipper call cannot wait (a timeout no timer takes) is
%% refused before it is recorded: the session stays writable here
move_with_an_unusable_timeout_records_nothing_test() ->
    process_flag(trap_exit, true),
    C0 = with_env(base(), fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C0#{sync_timeout_ms => 5000000000}),
    try
        #{primary_region := <<"eu">>} = dspex_region:route_session(<<"m">>, #{client_location => {50.0, 8.0}}),
        true = dspex_region:link_update(<<"us">>, #{status => up, since => erlang:system_time(millisecond),
                                                    samples => 0, pid => self()}),
        ?assertEqual({error, {invalid_argument, sync_timeout_ms}}, dspex_region:move_session(<<"m">>, <<"us">>)),
        ?assertEqual(undefined, dspex_region:moved(<<"m">>)),
        ?assertMatch(#{primary_region := <<"eu">>}, dspex_region:decision(<<"m">>))
    after
        exit(R, shutdown),
        receive {'EXIT', R, _} -> ok after 5000 -> ok end
    end.

%% the shipper dying during a move's call: an error, not the caller's crash
shipper_crash_during_a_move_is_an_error_test() ->
    P = spawn(fun() -> receive {'$gen_call', _, {move, _, _}} -> exit(crashed) end end),
    true = register(dspex_region_shipper, P),
    ?assertEqual({error, {region_unavailable, <<"us">>}}, dspex_region_shipper:move(<<"s">>, <<"us">>, 5000)).

%% the primary of an epoch revises its decision (the old primary rejoins as
%% its last backup): a peer's answer still carrying the earlier revision of
%% that epoch does not replace it; a newer epoch replaces any revision
decision_revisions_are_ordered_within_an_epoch_test() ->
    standalone(fun(_) ->
        S = <<"rev_s">>,
        D0 = #{primary_region => <<"us">>, backup_regions => [<<"ap">>], policy => failover, decided_at => 1,
               region_epoch => 1, taken_at => 7},
        D1 = D0#{backup_regions => [<<"ap">>, <<"eu">>], revision => 1},
        ok = dspex_region:adopt(S, D0),
        ok = dspex_region:adopt(S, D1),
        ?assertEqual(stale, dspex_region:adopt(S, D0)),
        ?assertEqual(D1, dspex_region:decision(S)),
        D2 = #{primary_region => <<"ap">>, backup_regions => [], policy => moved, decided_at => 2, region_epoch => 2},
        ok = dspex_region:adopt(S, D2),
        ?assertEqual(stale, dspex_region:adopt(S, D1)),
        ?assertEqual(D2, dspex_region:decision(S))
    end).

%% a peer whose gateway refuses connections: its link is down, says why, and retries
unreachable_peer_test() ->
    process_flag(trap_exit, true),
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    ok = gen_tcp:close(L),
    C = with_env((base())#{peers => [#{name => <<"us">>, gateway => {{127, 0, 0, 1}, Port}, coords => {40.0, -75.0}}],
                           backoff_min_ms => 10, backoff_max_ms => 40}, fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C),
    {ok, G} = dspex_region_gateway:start_link(C),
    [P] = maps:get(peers, C),
    {ok, Link} = dspex_region_link:start_link(P, C),
    try
        Wait = fun W(0) -> timeout;
                   W(N) -> case maps:get(<<"us">>, maps:get(peers, dspex_region:topology())) of
                               #{status := down, last_error := {connect, econnrefused}} = T -> T;
                               _ -> receive after 10 -> W(N - 1) end
                           end
               end,
        ?assertMatch(#{status := down, rtt := #{samples := 0}}, Wait(500)),
        %% the session goes to the only healthy region, this one
        ?assertMatch(#{primary_region := <<"eu">>, backup_regions := []},
                     dspex_region:route_session(<<"s">>, #{client_location => {40.0, -75.0}})),
        ?assertEqual(<<"dspex_region_link_up{region=\"eu\",peer=\"us\"} 0">>,
                     hd([Line || Line <- binary:split(iolist_to_binary(dspex_region:prometheus()), <<"\n">>, [global]),
                                 binary:match(Line, <<"dspex_region_link_up{">>) =/= nomatch]))
    after
        [begin exit(X, shutdown), receive {'EXIT', X, _} -> ok after 5000 -> ok end end || X <- [Link, G, R]]
    end.

%%% mutual TLS -------------------------------------------------------------------

%% A CA, a region certificate it signed (for 127.0.0.1), and one from another CA.
certs(Dir) ->
    Run = fun(Cmd) ->
                  Out = os:cmd("cd " ++ Dir ++ " && " ++ Cmd ++ " >/dev/null 2>&1; echo $?"),
                  ?assertEqual("0\n", Out, Cmd)
          end,
    ok = file:write_file(filename:join(Dir, "ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
    [begin
         Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 "
             "-keyout " ++ CA ++ ".key -out " ++ CA ++ ".pem -subj /CN=" ++ CA),
         Run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
             "-keyout " ++ R ++ ".key -out " ++ R ++ ".csr -subj /CN=" ++ R),
         Run("openssl x509 -req -in " ++ R ++ ".csr -CA " ++ CA ++ ".pem -CAkey " ++ CA ++ ".key "
             "-CAcreateserial -days 2 -extfile ext -out " ++ R ++ ".pem")
     end || {CA, R} <- [{"ca", "region"}, {"other_ca", "stranger"}]],
    F = fun(N) -> filename:join(Dir, N) end,
    {#{certfile => F("region.pem"), keyfile => F("region.key"), cacertfile => F("ca.pem")},
     #{certfile => F("stranger.pem"), keyfile => F("stranger.key"), cacertfile => F("ca.pem")}}.

with_tls(F) ->
    Dir = filename:join(os:getenv("TMPDIR", "/tmp"), "dspex_region_tls_" ++ os:getpid() ++ "_" ++
                            integer_to_list(erlang:unique_integer([positive]))),
    ok = filelib:ensure_path(Dir),
    try F(certs(Dir))
    after file:del_dir_r(Dir)
    end.

tls_call(Tls, Msg) ->
    Base = [binary, {packet, 4}, {active, false}],
    Opts1 = case Tls of
                none -> [{verify, verify_none} | Base];
                _ -> [{server_name_indication, disable} | Base] ++ dspex_region_gateway:tls_options(client, Tls)
            end,
    case ssl:connect({127, 0, 0, 1}, dspex_region_gateway:port(), Opts1, 5000) of
        {ok, S} ->
            R = case ssl:send(S, dspex_region_gateway:encode(Msg)) of
                    ok -> case ssl:recv(S, 0, 5000) of
                              {ok, B} -> dspex_region_gateway:decode(B);
                              E -> E
                          end;
                    E -> E
                end,
            _ = ssl:close(S),
            R;
        E -> E
    end.

mutual_tls_test_() ->
    {timeout, 60, fun() -> with_tls(fun mutual_tls/1) end}.

mutual_tls({Tls, Stranger}) ->
    process_flag(trap_exit, true),
    {ok, _} = application:ensure_all_started(ssl),
    %% with TLS, a non-loopback address is accepted
    ?assertMatch(#{listen := {{0, 0, 0, 0}, 0}}, with_env((base())#{tls => Tls, listen => {{0, 0, 0, 0}, 0}},
                                                          fun dspex_region:config/0)),
    C = with_env((base())#{peers => [], tls => Tls, probe_ms => 10}, fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C),
    {ok, G} = dspex_region_gateway:start_link(C),
    %% a link over TLS to this region's own gateway (the configuration refuses a
    %% peer named like the region; the link itself does not care)
    {ok, Link} = dspex_region_link:start_link(#{name => <<"eu">>, gateway => {{127, 0, 0, 1}, dspex_region_gateway:port()},
                                                coords => {50.0, 8.0}}, C),
    try
        ?assertEqual({ok, {welcome, <<"eu">>, {50.0, 8.0}}}, tls_call(Tls, {hello, <<"us">>, {1, 2}})),
        %% no client certificate, one from another CA, plain TCP: no answer
        ?assertMatch({error, _}, tls_call(none, {hello, <<"us">>, {1, 2}})),
        ?assertMatch({error, _}, tls_call(Stranger, {hello, <<"us">>, {1, 2}})),
        {ok, S} = gen_tcp:connect({127, 0, 0, 1}, dspex_region_gateway:port(), [binary, {packet, 4}, {active, false}]),
        ok = gen_tcp:send(S, dspex_region_gateway:encode({hello, <<"us">>, {1, 2}})),
        ?assertMatch({error, _}, gen_tcp:recv(S, 0, 5000)),
        %% the link comes up over TLS and measures
        Wait = fun W(0) -> timeout;
                   W(N) -> case ets:lookup(dspex_region:links_table(), <<"eu">>) of
                               [{_, #{status := up, samples := K}}] when K >= 5 -> ok;
                               _ -> receive after 20 -> W(N - 1) end
                           end
               end,
        ?assertEqual(ok, Wait(500))
    after
        [begin exit(X, shutdown), receive {'EXIT', X, _} -> ok after 5000 -> ok end end || X <- [Link, G, R]]
    end.

%%% replication -------------------------------------------------------------------

replication_config_test() ->
    B = base(),
    ?assertMatch(#{replication := async_primary_backup, sync_timeout_ms := 5000, repl_window := 32,
                   repl_batch_max := 1000, repl_max_pending := 100000},
                 with_env(B, fun dspex_region:config/0)),
    ?assertMatch(#{replication := sync_all}, with_env(B#{replication => sync_all}, fun dspex_region:config/0)),
    ?assertEqual({error, {invalid_argument, replication}},
                 with_env(B#{replication => sometimes}, fun dspex_region:config/0)),
    ?assertEqual({error, {invalid_argument, repl_window}}, with_env(B#{repl_window => 0}, fun dspex_region:config/0)),
    %% no region: the hook hands back the caller, nothing else
    From = {self(), make_ref()},
    ?assertEqual(From, dspex_region_shipper:committed(<<"s">>, 1, 1, delete_session, From)),
    ?assertEqual({error, not_running}, dspex_region:get(<<"s">>, <<"k">>, #{})).

%% A backup region away: its queue is bounded by repl_max_pending; past it the
%% queued records make way for one full copy per session, sent (taken from
%% the session's writer when it leaves) once the link is up; a sync_all write
%% among the dropped records is answered once its session's copy is acknowledged.
shipper_back_pressure_test() ->
    standalone(fun(_) -> shipper_back_pressure() end).

shipper_back_pressure() ->
    Us = <<"us">>,
    C = #{name => <<"eu">>, peers => [#{name => Us}], repl_max_pending => 100, repl_window => 2,
          repl_batch_max => 1000, sync_timeout_ms => 60000},
    Sessions = [<<"bp_", (integer_to_binary(I))/binary>> || I <- [1, 2, 3]],
    %% stand-ins for the sessions' writers: each answers export_for at seq 7
    Writers = lists:usort([dspex_cluster_writer:name(S) || S <- Sessions]),
    Fakes = [fake_writer(N) || N <- Writers],
    %% this region (eu) is their primary
    [ok = dspex_region:adopt(S, #{primary_region => <<"eu">>, backup_regions => [Us], policy => lowest_rtt,
                                  decided_at => 0}) || S <- Sessions],
    {ok, Sh} = dspex_region_shipper:start_link(C),
    try
        At = erlang:monotonic_time(millisecond),
        Tag = make_ref(),
        [Sh ! {rec, {lists:nth(1 + I rem 3, Sessions), 1, I, {op, delete, [x, y], ok}, 0}, At, [Us], none}
         || I <- lists:seq(1, 500)],
        Sh ! {rec, {hd(Sessions), 1, 501, delete_session, 0}, At, [Us], {wait1, {self(), Tag}}},
        [Sh ! {rec, {lists:nth(1 + I rem 3, Sessions), 1, I, {op, delete, [x, y], ok}, 0}, At, [Us], none}
         || I <- lists:seq(502, 700)],
        %% the writer's own answer to the sync write
        Sh ! {{dspex_region_ack, wait1}, {ok, 1, node()}},
        %% bounded: one full copy per session is all that is left
        #{Us := #{lag_versions := Lag, link := down}} = dspex_region_shipper:stats(),
        ?assert(Lag =< 100),
        %% the link comes up: the copies leave
        Sh ! {link_up, Us, self()},
        Recs = collect(Sh, Us, []),
        %% first the copies, then the records queued after the last overflow
        {Copies, Later} = lists:split(3, Recs),
        ?assert(lists:all(fun({_, 1, 7, {region_full, #{}}, 0}) -> true; (_) -> false end, Copies)),
        ?assertEqual(Sessions, lists:usort([S || {S, _, _, _, _} <- Copies])),
        ?assert(length(Recs) =< 100),
        ?assertEqual([700], lists:usort([lists:max([Seq || {_, _, Seq, _, _} <- Later])])),
        ?assertMatch(#{Us := #{lag_versions := 0}}, dspex_region_shipper:stats()),
        %% the sync write is answered once its session's copy was acknowledged
        ?assertEqual({ok, 1, node()}, receive {Tag, R} -> R after 5000 -> timeout end)
    after
        unlink(Sh),
        exit(Sh, kill),
        [P ! stop || P <- Fakes]
    end.

%% every batch the shipper sends, acknowledged, until nothing is left
collect(Sh, Us, Acc) ->
    receive
        {ship, Id, Chunks} ->
            #{recs := Recs} = binary_to_term(iolist_to_binary([B || {_, B} <- Chunks])),
            Sh ! {repl_ack, Us, Id, #{need_full => []}},
            collect(Sh, Us, Acc ++ Recs)
    after 500 -> Acc
    end.

%% The backup side alone: a primary's records applied by {Epoch, Seq}:
%% repeats ignored, a gap or a diverged history reported for a full copy, a
%% replay that does not reach the primary's version reported too, a full copy
%% installed whatever was there.
receiver_applies_by_version_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        S = <<"recv_s">>,
        Apply = fun(Recs) -> dspex_region_receiver:apply_batch(<<"us">>, #{recs => Recs, heads => #{}, decisions => #{}}) end,
        Export = empty_export(S),
        Set = fun(V, Ver) -> {op, set, [S, <<"k">>, V, #{expected_version => Ver - 1}], {ok, Ver}} end,
        %% created by a full copy (create_session's record), then registered
        ?assertEqual(#{need_full => []}, Apply([{S, 1, 1, {full, Export}}])),
        {ok, _} = dspex_store:register(S, <<"k">>, integer, 0, #{}),   % stands for seq 2
        ets:insert(dspex_region_applied, {S, (dspex_region_receiver:row(S))#{seq => 2}}),
        ?assertEqual(#{need_full => []}, Apply([{S, 1, 3, Set(10, 1)}, {S, 1, 4, Set(11, 2)}])),
        %% the same batch again (an ack lost on a flap): nothing applied twice
        ?assertEqual(#{need_full => []}, Apply([{S, 1, 3, Set(10, 1)}, {S, 1, 4, Set(11, 2)}])),
        ?assertMatch(#{seq := 4, applies := 3}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, #{value := 11, version := 2}}, dspex_store:get(S, <<"k">>)),
        %% a gap: not applied, a full copy asked
        ?assertEqual(#{need_full => [S]}, Apply([{S, 1, 6, Set(13, 4)}])),
        %% seq 4 again from a newer epoch: another history
        ?assertEqual(#{need_full => [S]}, Apply([{S, 2, 4, Set(99, 2)}])),
        %% the next seq, but the replay does not end at the primary's version
        ?assertEqual(#{need_full => [S]}, Apply([{S, 1, 5, Set(12, 7)}])),
        ?assertMatch({ok, #{value := 11, version := 2}}, dspex_store:get(S, <<"k">>)),
        %% a replay that raises: reported, the batch goes on
        ?assertEqual(#{need_full => [S]}, Apply([{S, 1, 5, {op, set, [S, {bad}, 1, #{expected_version => 2}], {ok, 3}}}])),
        %% the full copy replaces the session and sets the sequence
        ?assertEqual(#{need_full => []}, Apply([{S, 2, 9, {region_full, Export}}])),
        ?assertMatch(#{seq := 9, epoch := 2, full_copies := 1}, dspex_region_receiver:row(S)),
        ?assertEqual({error, {not_found, <<"k">>}}, dspex_store:get(S, <<"k">>)),
        %% moved to another primary (region epoch 1): its numbering starts with
        %% a full copy; the old primary's late changes are refused and counted
        Moved = #{primary_region => <<"mx">>, backup_regions => [<<"eu">>], policy => moved, decided_at => 0,
                  region_epoch => 1},
        Old = #{primary_region => <<"us">>, backup_regions => [<<"eu">>], policy => lowest_rtt, decided_at => 0},
        ApplyD = fun(D, Recs) -> dspex_region_receiver:apply_batch(<<"us">>, #{recs => Recs, heads => #{}, decisions => #{S => D}}) end,
        ?assertEqual(#{need_full => [S]}, ApplyD(Moved, [{S, 5, 2, delete_session}])),
        ?assertEqual(#{need_full => []}, ApplyD(Moved, [{S, 5, 2, {region_full, Export}}])),
        ?assertMatch(#{region_epoch := 1, seq := 2, epoch := 5}, dspex_region_receiver:row(S)),
        %% (the answer names the newer decision, for the old primary to adopt)
        ?assertMatch(#{need_full := [], decisions := #{S := #{primary_region := <<"mx">>, region_epoch := 1}}},
                     ApplyD(Old, [{S, 2, 10, delete_session}])),
        ?assertMatch(#{region_epoch := 1, seq := 2, fenced := 1}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, _}, dspex_store:get_session(S)),
        %% and the older decision does not replace the newer one
        ?assertMatch(#{primary_region := <<"mx">>}, dspex_region:decision(S)),
        ok = dspex_store:delete_session(S)
    end).

%% A change acknowledged to its writer is in the measured lag at once, even
%% while its record still waits in the shipper's mailbox (the lost suffix of
%% an async primary killed at that moment is bounded by that lag).
shipper_counts_handed_records_in_the_lag_test() ->
    standalone(fun(_) ->
        Us = <<"us">>,
        C = #{name => <<"eu">>, peers => [#{name => Us}], repl_max_pending => 100, repl_window => 2,
              repl_batch_max => 1000, sync_timeout_ms => 60000},
        S = <<"handed_s">>,
        ok = dspex_region:adopt(S, #{primary_region => <<"eu">>, backup_regions => [Us], policy => lowest_rtt,
                                     decided_at => 0}),
        {ok, Sh} = dspex_region_shipper:start_link(C),
        try
            ok = sys:suspend(Sh),
            [none = dspex_region_shipper:committed(S, 1, I, {op, delete, [S, <<"k">>], ok}, none) || I <- [1, 2, 3]],
            %% three records in the mailbox, none taken in yet
            ?assertMatch(#{Us := #{lag_versions := 3}}, dspex_region_shipper:stats()),
            ok = sys:resume(Sh),
            %% taken into the queue (the link is down): still three, not six
            _ = sys:get_state(Sh),
            ?assertMatch(#{Us := #{lag_versions := 3, link := down}}, dspex_region_shipper:stats())
        after
            unlink(Sh),
            exit(Sh, kill),
            _ = dspex_region:forget_session(S)
        end
    end).

%% A full copy installed in the batch that also held the gap it answers
%% (records queued before the copy left): the copy covers the gap, the
%% session is not reported again, and the next change applies on top.
receiver_a_full_copy_covers_a_gap_in_its_batch_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        S = <<"recv_gap_s">>,
        Export = k_export(S, 0),
        Set = {op, set, [S, <<"k">>, 1, #{expected_version => 0}], {ok, 1}},
        ?assertEqual(#{need_full => []},
                     dspex_region_receiver:apply_batch(<<"us">>, #{recs => [{S, 1, 3, delete_session},
                                                                           {S, 1, 5, {region_full, Export}},
                                                                           {S, 1, 6, Set}],
                                                                  heads => #{}, decisions => #{}})),
        ?assertMatch(#{seq := 6, full_copies := 1}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, #{value := 1, version := 1}}, dspex_store:get(S, <<"k">>)),
        ok = dspex_store:delete_session(S)
    end).

%% The same full copy sent again (its acknowledgement lost on a flap) is not
%% installed and counted twice; sent again after the copy here was lost, or
%% from another epoch at the same sequence, it is installed.
receiver_installs_a_repeated_full_copy_once_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        S = <<"recv_repeat_s">>,
        Export = k_export(S, 7),
        Apply = fun(Recs) -> dspex_region_receiver:apply_batch(<<"us">>, #{recs => Recs, heads => #{}, decisions => #{}}) end,
        Copy = {S, 1, 4, {region_full, Export}},
        ?assertEqual(#{need_full => []}, Apply([Copy])),
        ?assertMatch(#{seq := 4, full_copies := 1, applies := 1}, dspex_region_receiver:row(S)),
        %% again, after a change reported in the same batch at a sequence it covers
        ?assertEqual(#{need_full => []}, Apply([{S, 1, 3, delete_session}, Copy])),
        ?assertMatch(#{seq := 4, full_copies := 1, applies := 1}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, #{value := 7}}, dspex_store:get(S, <<"k">>)),
        %% the copy here is gone: the same copy is installed again
        ok = dspex_store:delete_session(S),
        ?assertEqual(#{need_full => []}, Apply([Copy])),
        ?assertMatch(#{seq := 4, full_copies := 2}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, #{value := 7}}, dspex_store:get(S, <<"k">>)),
        %% the same sequence from a newer epoch of the primary's cluster: another history, installed
        ?assertEqual(#{need_full => []}, Apply([{S, 2, 4, {region_full, Export}}])),
        ?assertMatch(#{seq := 4, epoch := 2, full_copies := 3}, dspex_region_receiver:row(S)),
        ok = dspex_store:delete_session(S)
    end).

%% A full copy the backup answers with need_full (it could not install it)
%% is sent again: the session is not left marked as "copy on its way".
shipper_sends_a_refused_full_copy_again_test() ->
    standalone(fun(_) ->
        Us = <<"us">>,
        C = #{name => <<"eu">>, peers => [#{name => Us}], repl_max_pending => 100, repl_window => 2,
              repl_batch_max => 1000, sync_timeout_ms => 60000},
        S = <<"refused_copy_s">>,
        W = fake_writer(dspex_cluster_writer:name(S)),
        ok = dspex_region:adopt(S, #{primary_region => <<"eu">>, backup_regions => [Us], policy => lowest_rtt,
                                     decided_at => 0}),
        {ok, Sh} = dspex_region_shipper:start_link(C),
        try
            Sh ! {link_up, Us, self()},
            ok = dspex_region_shipper:resync(S),
            Copy = fun() ->
                           receive
                               {ship, Id, Chunks} ->
                                   #{recs := [{S, 1, 7, {region_full, _}, 0}]} =
                                       binary_to_term(iolist_to_binary([B || {_, B} <- Chunks])),
                                   Id
                           after 2000 -> none
                           end
                   end,
            Id1 = Copy(),
            ?assert(is_integer(Id1)),
            Sh ! {repl_ack, Us, Id1, #{need_full => [S]}},
            %% sent again
            Id2 = Copy(),
            ?assert(is_integer(Id2)),
            Sh ! {repl_ack, Us, Id2, #{need_full => []}},
            _ = sys:get_state(Sh),
            ?assertMatch(#{Us := #{lag_versions := 0}}, dspex_region_shipper:stats())
        after
            unlink(Sh),
            exit(Sh, kill),
            W ! stop,
            _ = dspex_region:forget_session(S)
        end
    end).

%% A batch from a session's old primary whose decision names this region the
%% primary: with the session's full copy in it (a move), this region becomes
%% the primary and sends its backups a copy; without one (the old primary's
%% late change, sent after it adopted the decision from a refusal's answer:
%% refused here) nothing changes and no copy leaves again (one did, to every
%% backup: the rejoined old primary got two, a CI flake of
%% an_unreachable_primary_region_fails_over_to_its_first_backup).
receiver_resyncs_only_a_session_whose_copy_the_batch_brought_in_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        Us = <<"us">>,
        C = #{name => <<"eu">>, peers => [#{name => Us}], repl_max_pending => 100, repl_window => 2,
              repl_batch_max => 1000, sync_timeout_ms => 60000},
        S = <<"moved_in_s">>,
        Export = empty_export(S),
        %% the session's writer here, for the copies this region sends
        W = fake_writer(dspex_cluster_writer:name(S)),
        {ok, Sh} = dspex_region_shipper:start_link(C),
        try
            Sh ! {link_up, Us, self()},
            %% the copies this region's shipper sent (resync is a cast: the
            %% call after it returns once it was handled)
            Sent = fun() ->
                           _ = sys:get_state(Sh),
                           receive
                               {ship, Id, Chunks} ->
                                   #{recs := Recs} = binary_to_term(iolist_to_binary([B || {_, B} <- Chunks])),
                                   Sh ! {repl_ack, Us, Id, #{need_full => []}},
                                   _ = sys:get_state(Sh),
                                   [Sx || {Sx, _, _, {region_full, _}, _} <- Recs]
                           after 0 -> []
                           end
                   end,
            Moved = #{primary_region => <<"eu">>, backup_regions => [Us], policy => moved, decided_at => 0,
                      region_epoch => 1},
            Batch = fun(Recs) -> dspex_region_receiver:apply_batch(Us, #{recs => Recs, heads => #{}, decisions => #{S => Moved}}) end,
            %% moved here: the copy is in, this region is the primary, its backup gets a copy
            ?assertEqual(#{need_full => []}, Batch([{S, 3, 4, {region_full, Export}, 1}])),
            ?assertEqual(Moved, dspex_region:decision(S)),
            ?assertEqual([S], Sent()),
            %% the old primary's late change (region epoch 0), its batch naming
            %% this region the primary: refused, answered with the decision, no copy
            ?assertEqual(#{need_full => [], decisions => #{S => Moved}}, Batch([{S, 1, 9, delete_session, 0}])),
            ?assertMatch(#{region_epoch := 1, fenced := 1, full_copies := 1}, dspex_region_receiver:row(S)),
            ?assertEqual([], Sent()),
            ?assertEqual(Moved, dspex_region:decision(S))
        after
            unlink(Sh),
            exit(Sh, kill),
            W ! stop,
            _ = dspex_store:delete_session(S)
        end
    end).

%% The batch that moved a session here is sent again (the link went down
%% before its acknowledgement reached the old primary, which sends it again
%% until it is through): this region is the session's primary since the
%% first one, and its copy is not installed again over the writes this
%% region took meanwhile.
receiver_a_move_sent_again_does_not_replace_the_new_primary_s_writes_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        Us = <<"us">>,
        S = <<"moved_twice_s">>,
        Export = empty_export(S),
        Moved = #{primary_region => <<"eu">>, backup_regions => [], policy => moved, decided_at => 0,
                  region_epoch => 1},
        Batch = #{recs => [{S, 3, 4, {region_full, Export}, 1}], heads => #{}, decisions => #{S => Moved}},
        ?assertEqual(#{need_full => []}, dspex_region_receiver:apply_batch(Us, Batch)),
        ?assertEqual(Moved, dspex_region:decision(S)),
        %% the primary here takes a client's write
        {ok, _} = dspex_store:register(S, <<"k">>, integer, 5, #{}),
        %% the same batch again: a repeat
        ?assertEqual(#{need_full => []}, dspex_region_receiver:apply_batch(Us, Batch)),
        ?assertMatch({ok, #{value := 5}}, dspex_store:get(S, <<"k">>)),
        ?assertMatch(#{full_copies := 1}, dspex_region_receiver:row(S)),
        ok = dspex_store:delete_session(S)
    end).

%% A new primary's first batch of a session (it took the session over, a
%% higher region epoch): a change of its numbering that this region cannot
%% apply yet (that primary's copy is not in), then the copy. The copy covers
%% the change: the batch asks for no other copy (before, it asked for one
%% more; for a session moved here, that also left it not adopted).
receiver_a_new_primarys_copy_covers_the_changes_before_it_in_its_batch_test() ->
    {ok, _} = application:ensure_all_started(dspex_bridge),
    standalone(fun(_) ->
        Us = <<"us">>,
        S = <<"covered_s">>,
        Export = empty_export(S),
        D = #{primary_region => Us, backup_regions => [<<"eu">>], policy => failover, decided_at => 0,
              region_epoch => 1},
        Batch = #{recs => [{S, 3, 5, {op, delete, [S, x], ok}, 1}, {S, 3, 6, {region_full, Export}, 1}],
                  heads => #{}, decisions => #{S => D}},
        ?assertEqual(#{need_full => []}, dspex_region_receiver:apply_batch(Us, Batch)),
        ?assertMatch(#{seq := 6, region_epoch := 1, full_copies := 1}, dspex_region_receiver:row(S)),
        ?assertMatch({ok, _}, dspex_store:export_session(S)),
        ?assertEqual(D, dspex_region:decision(S)),
        ok = dspex_store:delete_session(S)
    end).

%% F() true within Ms milliseconds (bounded polling), else fails naming What.
until(F, Ms, What) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    Loop = fun L() ->
                   case F() of
                       true -> ok;
                       false ->
                           case erlang:monotonic_time(millisecond) >= Deadline of
                               true -> error({timeout, What});
                               false -> receive after 5 -> L() end
                           end
                   end
           end,
    Loop().

%% A region (eu) with one peer (us) whose link is up, this process standing
%% for it, and a writer for session S; F(Config, Start) gets a function that
%% starts a shipper (unlinked: the test kills it, as a crash would).
moving(S, F) ->
    process_flag(trap_exit, true),
    %% (an address: no name to resolve)
    C = with_env((base())#{peers => [#{name => <<"us">>, gateway => {{127, 0, 0, 1}, 4000}, coords => {40.0, -75.0}}]},
                 fun dspex_region:config/0),
    {ok, R} = dspex_region:start_link(C),
    W = fake_writer(dspex_cluster_writer:name(S)),
    Shippers = ets:new(shippers, [public, bag]),
    Start = fun() ->
                    {ok, Sh} = dspex_region_shipper:start_link(C),
                    unlink(Sh),
                    ets:insert(Shippers, {sh, Sh}),
                    Sh
            end,
    try
        %% eu the primary (nearest), then us reachable
        #{primary_region := <<"eu">>} = dspex_region:route_session(S, #{client_location => {50.0, 8.0}}),
        true = dspex_region:link_update(<<"us">>, #{status => up, since => erlang:system_time(millisecond),
                                                    samples => 0, pid => self()}),
        F(C, Start)
    after
        [exit(Sh, kill) || {_, Sh} <- ets:tab2list(Shippers)],
        W ! stop,
        exit(R, shutdown),
        receive {'EXIT', R, _} -> ok after 5000 -> ok end
    end.

%% the first batch this process (the link) gets: its id and records
shipped() ->
    receive
        {ship, Id, Chunks} ->
            #{recs := Recs, decisions := Ds} = binary_to_term(iolist_to_binary([B || {_, B} <- Chunks])),
            {Id, Recs, Ds}
    after 5000 -> error(nothing_shipped)
    end.

%% The shipper dies while a move's copy waits in its queue for the link to
%% the new primary (the caller gets region_unavailable): the shipper started
%% again sends that copy once the link is up (before, the move stayed
%% recorded, writes refused here, and the copy was never sent: the new
%% primary never had the session). Once acknowledged, the move is no longer
%% pending, writes stay refused, and a shipper started later sends nothing.
a_move_s_copy_is_sent_again_by_a_restarted_shipper_test_() ->
    %% (waits bounded at 5 s each: more than eunit's default for a whole test)
    {timeout, 60, fun a_move_s_copy_is_sent_again_by_a_restarted_shipper/0}.

a_move_s_copy_is_sent_again_by_a_restarted_shipper() ->
    Us = <<"us">>,
    S = <<"move_restart_s">>,
    moving(S, fun(_, Start) ->
        Sh1 = Start(),
        {Caller, Ref} = spawn_monitor(fun() -> exit({moved, dspex_region:move_session(S, Us)}) end),
        %% the copy is queued (the shipper has no link to us)
        ok = until(fun() -> case dspex_region_shipper:stats() of
                                #{Us := #{lag_versions := 1, link := down}} -> true;
                                _ -> false
                            end
                   end, 5000, copy_queued),
        kill(Sh1),
        ?assertEqual({moved, {error, {region_unavailable, Us}}},
                     receive {'DOWN', Ref, process, Caller, Why} -> Why after 5000 -> timeout end),
        ?assertEqual(Us, dspex_region:moved(S)),
        ?assertEqual(Us, dspex_region:moving(S)),
        %% started again (as by its supervisor), then the link comes up
        Sh2 = Start(),
        Sh2 ! {link_up, Us, self()},
        {Id, Recs, Ds} = shipped(),
        ?assertMatch([{S, 1, 7, {region_full, #{}}, 1}], Recs),
        ?assertMatch(#{S := #{primary_region := Us, policy := moved, region_epoch := 1}}, Ds),
        %% still pending until us acknowledged it
        ?assertEqual(Us, dspex_region:moving(S)),
        Sh2 ! {repl_ack, Us, Id, #{need_full => []}},
        ok = until(fun() -> dspex_region:moving(S) =:= undefined end, 5000, move_done),
        ?assertEqual(Us, dspex_region:moved(S)),
        ?assertEqual({error, {region_moved, Us}}, dspex_region_shipper:admit(S, {ok, owned})),
        kill(Sh2),
        flush_shipped(),
        %% a shipper started after the acknowledgement has nothing to send again
        Sh3 = Start(),
        Sh3 ! {link_up, Us, self()},
        _ = sys:get_state(Sh3),
        ?assertEqual(none, receive {ship, _, _} = M -> M after 0 -> none end),
        ?assertMatch(#{Us := #{lag_versions := 0, link := up}}, dspex_region_shipper:stats())
    end).

kill(P) ->
    Ref = monitor(process, P),
    exit(P, kill),
    receive {'DOWN', Ref, process, P, _} -> ok end.

flush_shipped() ->
    receive {ship, _, _} -> flush_shipped() after 0 -> ok end.

%% A move pending on another node of the region (its decision, the move and
%% the copy not yet acknowledged), merged here (this node's dspex_region
%% started again and asked the others): this node, owning the session, has
%% its running shipper send the copy (the failover check); the owner's word
%% that the move is done (`none') ends it here too, as does a decision of a
%% higher region epoch, or forget_session/1.
a_move_pending_on_another_node_is_resumed_by_the_owner_here_test_() ->
    %% (waits bounded at 5 s each: more than eunit's default for a whole test)
    {timeout, 60, fun a_move_pending_on_another_node_is_resumed_by_the_owner_here/0}.

a_move_pending_on_another_node_is_resumed_by_the_owner_here() ->
    Us = <<"us">>,
    S = <<"move_merged_s">>,
    moving(S, fun(_, Start) ->
        Sh = Start(),
        Sh ! {link_up, Us, self()},
        _ = sys:get_state(Sh),
        D = (dspex_region:decision(S))#{primary_region => Us, backup_regions => [], policy => moved,
                                        region_epoch => 1},
        gen_server:cast(dspex_region, {merge, erlang:monotonic_time(millisecond), [{S, D}], [{S, Us}], [],
                                       [{S, Us, 1}]}),
        {_, Recs, _} = shipped(),
        ?assertMatch([{S, 1, 7, {region_full, #{}}, 1}], Recs),
        ?assertEqual(Us, dspex_region:moving(S)),
        gen_server:cast(dspex_region, {shared, S, D, Us, none}),
        ok = until(fun() -> dspex_region:moving(S) =:= undefined end, 5000, move_done),
        ?assertEqual(Us, dspex_region:moved(S)),
        %% pending again; then a decision of a higher region epoch (the new
        %% primary moved the session on): the move's copy is sent no more
        gen_server:cast(dspex_region, {shared, S, D, Us, {Us, 1}}),
        ok = until(fun() -> dspex_region:moving(S) =:= Us end, 5000, pending_again),
        ok = dspex_region:adopt(S, D#{primary_region => <<"ap">>, region_epoch => 2}),
        ?assertEqual(undefined, dspex_region:moving(S)),
        %% and a forgotten decision takes its pending move with it
        gen_server:cast(dspex_region, {shared, S, D#{region_epoch => 3}, Us, {Us, 3}}),
        ok = until(fun() -> dspex_region:moving(S) =:= Us end, 5000, pending_once_more),
        ok = dspex_region:forget_session(S),
        ?assertEqual(undefined, dspex_region:moving(S)),
        %% a node of the previous release (rolling upgrade) shares decisions
        %% without the pending state: they are still taken
        gen_server:cast(dspex_region, {shared, S, D#{region_epoch => 4}, Us}),
        Epoch = fun() -> case dspex_region:decision(S) of #{region_epoch := E} -> E; _ -> none end end,
        ok = until(fun() -> Epoch() =:= 4 end, 5000, old_shared_cast),
        ok = gen_server:call(dspex_region, {shared, S, D#{region_epoch => 5}, Us}),
        ?assertMatch(#{region_epoch := 5}, dspex_region:decision(S)),
        gen_server:cast(dspex_region, {merge, erlang:monotonic_time(millisecond), [{S, D#{region_epoch => 6}}],
                                       [{S, Us}], []}),
        ok = until(fun() -> Epoch() =:= 6 end, 5000, old_merge),
        ?assertEqual(Us, dspex_region:moved(S)),
        ?assertEqual(undefined, dspex_region:moving(S))
    end).
