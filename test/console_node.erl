%% A bridge node for the console's browser tests and benchmark: starts the
%% application (configured on the command line), seeds sessions, prints
%% `READY <console port>' and then obeys commands read from stdin, one per
%% line, answering `OK ...' or `ERR ...':
%%   set <session> <variable> <float>   dspex_store:set/4 (changed_by => test)
%%   deny <session> <variable> <as>    a read as another session (denied)
%%   optimize <session> <var> <iters>  a process takes the lock of var and
%%                                       reports <iters> iterations (scores 0.1 ..)
%%   progress <session> <var> <score>   that process reports one more iteration
%%   seed <n> <vars>                     n sessions bench_<i>, and one session
%%                                       "big" of <vars> variables with edges
%%   quit                                halts
%% Stdin closing halts the node too, so it never outlives its test.
%% With `-console_region_peer Port' the node is region "eu" (gateway on a free
%% loopback port) with one peer region "us" whose gateway is 127.0.0.1:Port
%% (the Regions page; the command line cannot carry a map for `region').
-module(console_node).
-export([main/0, copy_x/1]).

-spec main() -> no_return().
main() ->
    case init:get_argument(console_region_peer) of
        {ok, [[PeerPort]]} ->
            application:set_env(dspex_bridge, region,
                                #{name => <<"eu">>, coords => {50.11, 8.68}, listen => {{127, 0, 0, 1}, 0},
                                  peers => [#{name => <<"us">>, gateway => {{127, 0, 0, 1}, list_to_integer(PeerPort)},
                                              coords => {40.71, -74.01}}]});
        _ -> ok
    end,
    {ok, _} = application:ensure_all_started(dspex_bridge),
    S = <<"demo">>,
    {ok, _} = dspex_store:create_session(S, #{metadata => #{<<"note">> => <<"<script>alert(2)</script>">>}}),
    {ok, _} = dspex_store:register(S, <<"<img src=x onerror=alert(1)>">>, string, <<"<b>bold?</b>">>),
    {ok, _} = dspex_store:register(S, <<"x">>, float, 1.0),
    {ok, _} = dspex_store:register(S, <<"temperature">>, float, 0.7),
    {ok, _} = dspex_graph:define_derived(S, <<"y">>, float, [<<"x">>], {?MODULE, copy_x}),
    ok = dspex_graph:add_dependency(S, <<"temperature">>, <<"<img src=x onerror=alert(1)>">>),
    {ok, _} = dspex_store:set(S, <<"x">>, 2.0, #{changed_by => seed, propagate => sync}),
    [{ok, _} = dspex_store:create_session(iolist_to_binary(io_lib:format("sess_~4..0b", [I])), #{})
     || I <- lists:seq(1, 120)],
    seed_history(<<"travel">>),
    seed_models(),
    seed_opt_run(),
    %% a session with a rate limit (the access page shows it)
    {ok, _} = dspex_store:create_session(<<"limited">>, #{rate_limit => #{rate => 12.5, burst => 40}}),
    Port = case dspex_console:port() of
               P when is_integer(P) -> integer_to_list(P);
               {error, R} -> atom_to_list(R)
           end,
    io:format("READY ~s~n", [Port]),
    loop().

%% The derive function of y: y = x.
-spec copy_x(map()) -> float().
copy_x(Inputs) -> maps:get(<<"x">>, Inputs, maps:get(x, Inputs, 0.0)).

loop() ->
    case io:get_line("") of
        eof -> halt(0);
        {error, _} -> halt(0);
        Line ->
            case string:lexemes(string:trim(Line), " ") of
                ["quit"] -> halt(0);
                ["set", S, V, X] ->
                    R = dspex_store:set(list_to_binary(S), list_to_binary(V), list_to_float(X),
                                        #{changed_by => test, propagate => sync}),
                    io:format("~s ~0p~n", [case R of {ok, _} -> "OK"; _ -> "ERR" end, R]);
                ["deny", S, V, As] ->
                    R = dspex_store:get(list_to_binary(S), list_to_binary(V), #{as => list_to_binary(As)}),
                    io:format("~s ~0p~n", [case R of {error, access_denied} -> "OK"; _ -> "ERR" end, R]);
                ["optimize", S, V, Iters] ->
                    Me = self(),
                    spawn(fun() -> optimize(Me, list_to_binary(S), list_to_binary(V), list_to_integer(Iters)) end),
                    receive {optimizing, R} -> io:format("~s ~0p~n", [case R of ok -> "OK"; _ -> "ERR" end, R]) end;
                ["progress", S, V, Score] ->
                    optimizer ! {progress, list_to_binary(S), list_to_binary(V), list_to_float(Score), self()},
                    receive progressed -> io:format("OK progressed~n") end;
                ["seed", N, Vars] -> seed(list_to_integer(N), list_to_integer(Vars));
                Other -> io:format("ERR ~0p~n", [Other])
            end,
            loop()
    end.

optimize(Parent, S, V, Iters) ->
    register(optimizer, self()),
    case dspex_locks:acquire(S, V, test_optimizer, #{objective => maximize}) of
        {ok, Lock} ->
            [ok = dspex_locks:report_progress(Lock, I, 0.1 * I, #{}) || I <- lists:seq(1, Iters)],
            Parent ! {optimizing, ok},
            optimizing(Lock, Iters);
        Error -> Parent ! {optimizing, Error}
    end.

optimizing(Lock, I) ->
    receive
        {progress, _S, _V, Score, From} ->
            ok = dspex_locks:report_progress(Lock, I + 1, Score, #{}),
            From ! progressed,
            optimizing(Lock, I + 1)
    end.

%% A session with a known event history (sequences): 1 session_created,
%% 2 register a = 1.0, 3 register b = 10.0, 4 set a = 2.0 (by alice),
%% 5 set b = 20.0 (by bob), 6 set a = 3.0 (by carol); durable before READY.
seed_history(S) ->
    {ok, _} = dspex_store:create_session(S, #{}),
    {ok, _} = dspex_store:register(S, <<"a">>, float, 1.0),
    {ok, _} = dspex_store:register(S, <<"b">>, float, 10.0),
    {ok, _} = dspex_store:set(S, <<"a">>, 2.0, #{changed_by => alice}),
    {ok, _} = dspex_store:set(S, <<"b">>, 20.0, #{changed_by => bob}),
    {ok, _} = dspex_store:set(S, <<"a">>, 3.0, #{changed_by => carol}),
    case dspex_events:enabled() of
        true -> ok = dspex_events:await();
        false -> ok
    end.

%% Models: "ranker" 1 and 2 (production, staging; 1's metadata an XSS
%% attempt) in a running A/B test, 50/50, of 400 users (8 of 10 succeed on
%% ranker@1, 9 of 10 on ranker@2); "summ" 1 (production) rolling out 2 in
%% steps 10, 50, 100 % with two gates, 400 users; "old" 1 and 2 in an A/B
%% test stopped by hand. Salted: the same split on every run.
seed_models() ->
    Xss = <<"<img src=x onerror=alert(1)>">>,
    {ok, A} = dspex_models:register_model(#{name => <<"ranker">>, version => <<"1">>,
                                            metadata => #{<<"note">> => Xss}}),
    {ok, B} = dspex_models:register_model(#{name => <<"ranker">>, version => <<"2">>}),
    ok = dspex_models:set_alias(<<"ranker">>, production, A),
    ok = dspex_models:set_alias(<<"ranker">>, staging, B),
    {ok, _} = dspex_models:start_ab_test(#{model => <<"ranker">>, variants => [{A, 50}, {B, 50}],
                                           salt => console}),
    Rate = fun(M) when M =:= A -> 8; (_) -> 9 end,
    [begin
         {ok, M} = dspex_models:select_model(<<"ranker">>, #{user_id => U}),
         ok = dspex_models:record_inference(M, 20, U rem 10 < Rate(M), #{})
     end || U <- lists:seq(1, 400)],
    {ok, C} = dspex_models:register_model(#{name => <<"summ">>, version => <<"1">>}),
    {ok, D} = dspex_models:register_model(#{name => <<"summ">>, version => <<"2">>}),
    ok = dspex_models:set_alias(<<"summ">>, production, C),
    {ok, _} = dspex_models:start_rollout(<<"summ">>, D,
                                         #{steps => [10, 50, 100], step_duration => 3600000, salt => console,
                                           gates => [#{metric => error_rate, max_degradation => 0.02},
                                                     #{metric => latency, max_degradation => 0.1}]}),
    [begin
         {ok, M} = dspex_models:select_model(<<"summ">>, #{user_id => U}),
         ok = dspex_models:record_inference(M, 20, true, #{})
     end || U <- lists:seq(1, 400)],
    {ok, E} = dspex_models:register_model(#{name => <<"old">>, version => <<"1">>}),
    {ok, F} = dspex_models:register_model(#{name => <<"old">>, version => <<"2">>}),
    ok = dspex_models:set_alias(<<"old">>, production, E),
    {ok, T} = dspex_models:start_ab_test(#{model => <<"old">>, variants => [{E, 1}, {F, 3}]}),
    ok = dspex_models:stop_test(T).

%% A finished dspex_opt run that stays (its owner lives, its locks are held):
%% session "opt", lr in [0, 1] and depth in [1, 10], maximizing
%% -(lr - 0.3)^2 - 0.01 (depth - 4)^2 with TPE, 12 trials, seed 7.
seed_opt_run() ->
    S = <<"opt">>,
    {ok, _} = dspex_store:create_session(S, #{}),
    {ok, _} = dspex_store:register(S, <<"lr">>, float, 0.5, #{constraints => #{min => 0.0, max => 1.0}}),
    {ok, _} = dspex_store:register(S, <<"depth">>, integer, 5, #{constraints => #{min => 1, max => 10}}),
    Me = self(),
    spawn(fun() ->
                  {ok, Run} = dspex_opt:start(S, [<<"lr">>, <<"depth">>],
                                              #{algorithm => tpe, direction => maximize, budget => 12, seed => 7}),
                  Objective = fun(#{<<"lr">> := L, <<"depth">> := D}) -> -(L - 0.3) * (L - 0.3) - 0.01 * (D - 4) * (D - 4) end,
                  {ok, _} = dspex_opt:run(Run, Objective),
                  Me ! {opt_run, Run},
                  receive never -> ok end
          end),
    receive {opt_run, _} -> ok end.

seed(N, Vars) ->
    dspex_store:set_limits(#{max_sessions => N + 1000}),
    [{ok, _} = dspex_store:create_session(iolist_to_binary(io_lib:format("bench_~6..0b", [I])), #{})
     || I <- lists:seq(1, N)],
    B = <<"big">>,
    {ok, _} = dspex_store:create_session(B, #{}),
    [{ok, _} = dspex_store:register(B, integer_to_binary(I), float, float(I)) || I <- lists:seq(1, Vars)],
    %% a chain of 1 in 10 variables (100 edges for 1,000 variables)
    [ok = dspex_graph:add_dependency(B, integer_to_binary(I), integer_to_binary(I + 10))
     || I <- lists:seq(1, Vars - 10, 10)],
    _ = dspex_events:enabled() andalso dspex_events:await(),
    io:format("OK seeded~n").
