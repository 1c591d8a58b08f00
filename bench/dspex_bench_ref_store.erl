%% @doc A model of the reference design (snakepit 0.4's SessionStore), used only
%% as a benchmark baseline: one gen_server; sessions live in a protected ETS table
%% as `{Id, {LastAccessed, Ttl, Session}}' where Session holds every variable;
%% each variable read or write looks the whole session up, touches it, and
%% inserts it back, then replies.
-module(dspex_bench_ref_store).
-behaviour(gen_server).
-export([start/1, init/1, handle_call/3, handle_cast/2]).

start(Sessions) -> gen_server:start(?MODULE, Sessions, []).

init(Sessions) ->
    T = ets:new(ref_sessions, [set, protected, {read_concurrency, true}, {write_concurrency, true}]),
    Now = erlang:monotonic_time(second),
    [ets:insert(T, {Id, {Now, 3600, #{id => Id, last_accessed => Now, variables => Vars}}})
     || {Id, Vars} <- maps:to_list(Sessions)],
    {ok, T}.

handle_call({get, S, Name}, _From, T) ->
    [{S, {_, Ttl, Session}}] = ets:lookup(T, S),
    #{variables := #{Name := Var}} = Session,
    touch(T, S, Ttl, Session),
    {reply, {ok, Var}, T};
handle_call({set, S, Name, V}, _From, T) when is_float(V) ->
    [{S, {_, Ttl, Session}}] = ets:lookup(T, S),
    #{variables := #{Name := Var} = Vars} = Session,
    #{constraints := #{min := Min, max := Max}, version := Ver} = Var,
    case V >= Min andalso V =< Max of
        true ->
            %% no history kept here: the baseline is kept as cheap as it can be
            New = Var#{value := V, version := Ver + 1, updated_at := erlang:system_time(microsecond)},
            touch(T, S, Ttl, Session#{variables := Vars#{Name := New}}),
            {reply, {ok, Ver + 1}, T};
        false ->
            {reply, {error, invalid_value}, T}
    end.

handle_cast(_, T) -> {noreply, T}.

touch(T, S, Ttl, Session) ->
    Now = erlang:monotonic_time(second),
    ets:insert(T, {S, {Now, Ttl, Session#{last_accessed := Now}}}).
