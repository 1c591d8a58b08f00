%% @doc `make bench' part for model versions (issue #19), each against the
%% obvious alternative in the same run, on one scheduler (one process):
%%   * dspex_models:select_model/2 under an A/B split (persistent_term read +
%%     phash2 + tuple element) against a gen_server call answering from the
%%     same table;
%%   * dspex_models:record_inference/4 (counters:add of count, success,
%%     log-latency moments and histogram bucket) against one
%%     ets:update_counter/3 of two counters (count, successes) per sample.
%% Ratios are "alternative time / ours": above 1.0 means ours is faster.
-module(dspex_models_bench).
-export([main/0]).
-export([init/1, handle_call/3, handle_cast/2]).

-define(N, 2000000).

%% @doc Runs the benchmarks and prints the results and ratios.
-spec main() -> ok.
main() ->
    _ = application:load(dspex_bridge),
    ok = application:set_env(dspex_bridge, grpc_enabled, false),
    ok = application:set_env(dspex_bridge, prometheus_enabled, false),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    io:format("~ndspex_models benchmark (one process)~n"),
    Name = <<"bench", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    {ok, A} = dspex_models:register_model(#{name => Name, version => <<"a">>}),
    {ok, B} = dspex_models:register_model(#{name => Name, version => <<"b">>}),
    ok = dspex_models:set_alias(Name, production, A),
    {ok, T} = dspex_models:start_ab_test(#{model => Name, variants => [{A, 50}, {B, 50}],
                                           min_samples => 1000000000}),
    Ctxs = list_to_tuple([#{user_id => U} || U <- lists:seq(1, 1024)]),
    {ok, Srv} = gen_server:start(?MODULE, Name, []),
    TSel = best(fun() -> sel_loop(Name, Ctxs, ?N) end),
    TSrv = best(fun() -> srv_loop(Srv, Ctxs, ?N div 10) end) * 10,
    TNop = best(fun() -> nop_loop(Name, Ctxs, ?N) end),
    CSel = best_cpu(fun() -> sel_loop(Name, Ctxs, ?N) end),
    io:format("select_model/2: ~.1f ns/op = ~.2f M calls/s; gen_server call ~.1f ns/op = ~.2f M calls/s; "
              "the loop alone ~.1f ns/op~n",
              [1.0e3 * TSel / ?N, ?N / TSel, 1.0e3 * TSrv / ?N, ?N / TSrv, 1.0e3 * TNop / ?N]),
    io:format("select_model/2 by CPU time of the VM (less sensitive to other load): ~.2f M calls per CPU second~n",
              [?N / CSel]),
    Tab = ets:new(bench, [public, set, {write_concurrency, true}]),
    ets:insert(Tab, {A, 0, 0}),
    TRec = best(fun() -> rec_loop(A, ?N) end),
    TEts = best(fun() -> ets_loop(Tab, A, ?N) end),
    io:format("record_inference/4: ~.1f ns/op = ~.2f M/s; ets:update_counter ~.1f ns/op = ~.2f M/s~n",
              [1.0e3 * TRec / ?N, ?N / TRec, 1.0e3 * TEts / ?N, ?N / TEts]),
    ok = dspex_models:stop_test(T),
    gen_server:stop(Srv),
    io:format("~nsummary (alternative time / ours; above 1 = ours faster):~n"),
    [io:format("  ~-58s ~9.2fx~n", [L, R])
     || {L, R} <- [{"select_model/2 vs gen_server call", TSrv / TSel},
                   {"record_inference/4 vs ets:update_counter (2 counters)", TEts / TRec}]],
    ok.

sel_loop(_, _, 0) -> ok;
sel_loop(Name, Ctxs, N) ->
    {ok, _} = dspex_models:select_model(Name, element((N band 1023) + 1, Ctxs)),
    sel_loop(Name, Ctxs, N - 1).

srv_loop(_, _, 0) -> ok;
srv_loop(Srv, Ctxs, N) ->
    {ok, _} = gen_server:call(Srv, {select, element((N band 1023) + 1, Ctxs)}),
    srv_loop(Srv, Ctxs, N - 1).

nop_loop(_, _, 0) -> ok;
nop_loop(Name, Ctxs, N) ->
    {ok, _} = nop(Name, element((N band 1023) + 1, Ctxs)),
    nop_loop(Name, Ctxs, N - 1).

nop(Name, _) -> {ok, Name}.

rec_loop(_, 0) -> ok;
rec_loop(M, N) ->
    ok = dspex_models:record_inference(M, 12.5, N band 15 =/= 0, #{}),
    rec_loop(M, N - 1).

ets_loop(_, _, 0) -> ok;
ets_loop(Tab, M, N) ->
    _ = ets:update_counter(Tab, M, [{2, 1}, {3, case N band 15 of 0 -> 0; _ -> 1 end}]),
    ets_loop(Tab, M, N - 1).

%% best of 3, CPU time of the whole VM in microseconds (the other schedulers
%% are idle; busy-waiting is switched off by `make bench''s +sbwt none)
best_cpu(F) ->
    lists:min([begin
                   {C0, _} = erlang:statistics(runtime),
                   F(),
                   {C1, _} = erlang:statistics(runtime),
                   max(1, C1 - C0) * 1000
               end || _ <- [1, 2, 3]]).

%% best of 3, in microseconds
best(F) ->
    lists:min([element(1, timer:tc(F)) || _ <- [1, 2, 3]]).

%% the alternative: the same routing answered by a server
%% @private
init(Name) -> {ok, Name}.
%% @private
handle_call({select, Ctx}, _From, Name) -> {reply, dspex_models:select_model(Name, Ctx), Name}.
%% @private
handle_cast(_, S) -> {noreply, S}.
