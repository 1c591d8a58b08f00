%% @doc The reference design the store replaces: a gen_server holding a map of
%% sessions; every get and set is a call. It validates the float range too.
-module(dspex_bench_map_store).
-behaviour(gen_server).
-export([init/1, handle_call/3, handle_cast/2]).

init(State) -> {ok, State}.

handle_call({get, S, Name}, _From, State) ->
    #{S := #{Name := Var}} = State,
    {reply, {ok, Var}, State};
handle_call({set, S, Name, V}, _From, State) when is_float(V), V >= 0.0, V =< 1.0 ->
    #{S := Vars} = State,
    #{Name := #{version := Ver, history := H} = Var} = Vars,
    New = Var#{value := V, version := Ver + 1, history := lists:sublist([Var | H], 50)},
    {reply, {ok, Ver + 1}, State#{S := Vars#{Name := New}}}.

handle_cast(_, State) -> {noreply, State}.
