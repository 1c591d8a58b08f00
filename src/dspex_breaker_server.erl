%% @doc Owner of the breaker table and the one writer of breaker state
%% changes (see `dspex_breaker'). Readers go to the table directly. Also owns
%% `dspex_retry''s table of last known values (so it outlives callers).
%%
%% It hands out half-open probe permits and monitors their holders: a holder
%% that dies before reporting its probe counts as a failed probe, so no
%% permit is ever lost. A breaker's clock is its owner's code: a clock that
%% fails makes that request answer `{error, {clock_failed, Why}}' and
%% changes nothing, and never stops this server (whose tables every breaker
%% and every retry fallback value live in).
-module(dspex_breaker_server).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(T, dspex_breaker).
-define(ISSUED, 5).

%% @doc Starts the server (registered as `dspex_breaker_server').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @private
init([]) ->
    ?T = ets:new(?T, [named_table, public, set, {read_concurrency, true}, {write_concurrency, true}]),
    dspex_retry = ets:new(dspex_retry, [named_table, public, set, {read_concurrency, true},
                                        {write_concurrency, true}]),
    %% probes: monitor ref => {Name, Gen, Holder} for every probe permit out
    {ok, #{probes => #{}}}.

%% @private Every clock call comes before any write, so a failing clock
%% leaves the table as it was.
handle_call(Req, From, S) ->
    try handle(Req, From, S)
    catch throw:{clock_failed, _} = Why -> {reply, {error, Why}, S}
    end.

handle({install, Name, Opts}, _From, S) ->
    Gen = case ets:lookup(?T, Name) of
              [Old] -> element(3, Old) + 1;
              [] -> 0
          end,
    From = case ets:lookup(?T, Name) of
               [Row] -> state_of(Row);
               [] -> closed
           end,
    New = dspex_breaker:row(Name, Gen, Opts),
    true = ets:insert(?T, New),
    From =/= closed andalso dspex_breaker:emit_change(Name, From, closed),
    {reply, ok, forget_probes(Name, S)};
handle({remove, Name}, _From, S) ->
    case ets:member(?T, Name) of
        %% its probes go too: a breaker installed again under this name
        %% starts its generations anew, and must not see the old holders
        true -> ets:delete(?T, Name), {reply, ok, forget_probes(Name, S)};
        false -> {reply, {error, not_found}, S}
    end;
handle({reset, Name}, _From, S) ->
    case ets:lookup(?T, Name) of
        [] -> {reply, {error, not_found}, S};
        [{_, closed, _, _, _, _, [], _}] -> {reply, ok, S};
        [{_, _, Gen, _, _, _, _, Opts} = Row] ->
            From = state_of(Row),
            true = ets:insert(?T, dspex_breaker:row(Name, Gen + 1, Opts)),
            From =/= closed andalso dspex_breaker:emit_change(Name, From, closed),
            {reply, ok, forget_probes(Name, S)}
    end;
handle({probe, Name}, {Holder, _}, #{probes := P} = S) ->
    case ets:lookup(?T, Name) of
        [] -> {reply, {error, not_found}, S};
        [{_, closed, Gen, _, _, _, _, _}] -> {reply, {ok, closed, Gen}, S};
        [{_, open, Gen, Since, Issued, _, _, #{reset_ms := R, probes := K, clock := C}}] ->
            case Issued < K andalso dspex_breaker:clock_ms(C) - Since >= R of
                false -> {reply, {error, circuit_open}, S};
                true ->
                    true = ets:update_element(?T, Name, {?ISSUED, Issued + 1}),
                    Issued =:= 0 andalso dspex_breaker:emit_change(Name, open, half_open),
                    %% a holder already dead is reported at once
                    MRef = erlang:monitor(process, Holder),
                    {reply, {ok, half_open, Gen}, S#{probes := P#{MRef => {Name, Gen, Holder}}}}
            end
    end;
handle({failure, Name, Gen}, {Holder, _}, S) ->
    {reply, failure(Name, Gen), reported(Name, Gen, Holder, S)};
handle({success, Name, Gen}, {Holder, _}, S) ->
    R = case ets:lookup(?T, Name) of
            [{_, open, Gen, _, Issued, Oks, _, #{probes := K} = O}] when Issued > 0 ->
                case Oks + 1 >= K of
                    true ->
                        true = ets:insert(?T, dspex_breaker:row(Name, Gen + 1, O)),
                        dspex_breaker:emit_change(Name, half_open, closed);
                    false ->
                        true = ets:update_element(?T, Name, {6, Oks + 1})
                end,
                ok;
            [] -> {error, not_found};
            [_] -> ok
        end,
    {reply, R, reported(Name, Gen, Holder, S)};
handle(_Other, _From, S) ->
    {reply, {error, unknown_call}, S}.

%% @private
handle_cast(_Msg, S) -> {noreply, S}.

%% @private A probe's holder died before reporting: the probe failed.
handle_info({'DOWN', MRef, process, _, _}, #{probes := P} = S) ->
    case maps:take(MRef, P) of
        {{Name, Gen, _}, P1} ->
            _ = try failure(Name, Gen) catch throw:{clock_failed, _} -> ok end,
            {noreply, S#{probes := P1}};
        error -> {noreply, S}
    end;
handle_info(_Msg, S) -> {noreply, S}.

failure(Name, Gen) ->
    case ets:lookup(?T, Name) of
        [] -> {error, not_found};
        [{_, closed, Gen, Since, _, _, Fs, #{threshold := N, window_ms := W, clock := C} = O}] ->
            Now = dspex_breaker:clock_ms(C),
            Recent = [Now | [T || T <- Fs, Now - T < W]],
            case length(Recent) >= N of
                true -> open(Name, Gen, O, closed);
                false -> true = ets:insert(?T, {Name, closed, Gen, Since, 0, 0, lists:sublist(Recent, N), O})
            end,
            ok;
        [{_, open, Gen, _, Issued, _, _, O}] when Issued > 0 ->
            open(Name, Gen, O, half_open),
            ok;
        [_] ->
            ok
    end.

%% The holder reported a probe of `Name': stop watching it (the permit of
%% this episode if it holds one, else any it holds for `Name').
reported(Name, Gen, Holder, #{probes := P} = S) ->
    Held = [{G =:= Gen, R} || {R, {N, G, H}} <- maps:to_list(P), N =:= Name, H =:= Holder],
    case lists:reverse(lists:sort(Held)) of
        [{_, R} | _] ->
            erlang:demonitor(R, [flush]),
            S#{probes := maps:remove(R, P)};
        [] -> S
    end.

forget_probes(Name, #{probes := P} = S) ->
    {Gone, Kept} = maps:fold(fun(R, {N, _, _}, {G, K}) when N =:= Name -> {[R | G], K};
                                (R, V, {G, K}) -> {G, K#{R => V}}
                             end, {[], #{}}, P),
    [erlang:demonitor(R, [flush]) || R <- Gone],
    S#{probes := Kept}.

open(Name, Gen, #{clock := C} = O, From) ->
    Now = dspex_breaker:clock_ms(C),
    true = ets:insert(?T, {Name, open, Gen + 1, Now, 0, 0, [], O}),
    dspex_breaker:emit_change(Name, From, open).

state_of({_, closed, _, _, _, _, _, _}) -> closed;
state_of({_, open, _, _, 0, _, _, _}) -> open;
state_of({_, open, _, _, _, _, _, _}) -> half_open.
