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
     ?_assertEqual({error, {invalid_argument, {tls, not_supported}}},
                   Err(B#{tls => #{certfile => "c", keyfile => "k", cacertfile => "ca"}})),
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
                       process_flag(trap_exit, true), dspex_region_sup:start_link() end))].

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
