%% @doc Owner of the breaker table and the one writer of breaker state
%% changes (see `dspex_breaker'). Readers go to the table directly. Also owns
%% `dspex_retry''s table of last known values (so it outlives callers).
-module(dspex_breaker_server).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(T, dspex_breaker).

%% @doc Starts the server (registered as `dspex_breaker_server').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @private
init([]) ->
    ?T = ets:new(?T, [named_table, public, set, {read_concurrency, true}, {write_concurrency, true}]),
    dspex_retry = ets:new(dspex_retry, [named_table, public, set, {read_concurrency, true},
                                        {write_concurrency, true}]),
    {ok, #{}}.

%% @private
handle_call({install, Name, Opts}, _From, S) ->
    Gen = case ets:lookup(?T, Name) of
              [Old] -> element(3, Old) + 1;
              [] -> 0
          end,
    From = case ets:lookup(?T, Name) of
               [Row] -> state_of(Row);
               [] -> closed
           end,
    true = ets:insert(?T, dspex_breaker:row(Name, Gen, Opts)),
    From =/= closed andalso dspex_breaker:emit_change(Name, From, closed),
    {reply, ok, S};
handle_call({remove, Name}, _From, S) ->
    case ets:member(?T, Name) of
        true -> ets:delete(?T, Name), {reply, ok, S};
        false -> {reply, {error, not_found}, S}
    end;
handle_call({reset, Name}, _From, S) ->
    case ets:lookup(?T, Name) of
        [] -> {reply, {error, not_found}, S};
        [{_, closed, _, _, _, _, [], _}] -> {reply, ok, S};
        [{_, _, Gen, _, _, _, _, Opts} = Row] ->
            From = state_of(Row),
            true = ets:insert(?T, dspex_breaker:row(Name, Gen + 1, Opts)),
            From =/= closed andalso dspex_breaker:emit_change(Name, From, closed),
            {reply, ok, S}
    end;
handle_call({failure, Name, Gen}, _From, S) ->
    case ets:lookup(?T, Name) of
        [] -> {reply, {error, not_found}, S};
        [{_, closed, Gen, Since, _, _, Fs, #{threshold := N, window_ms := W, clock := C} = O}] ->
            Now = C:now_ms(),
            Recent = [Now | [T || T <- Fs, Now - T < W]],
            case length(Recent) >= N of
                true -> open(Name, Gen, O, closed);
                false -> true = ets:insert(?T, {Name, closed, Gen, Since, 0, 0, lists:sublist(Recent, N), O})
            end,
            {reply, ok, S};
        [{_, open, Gen, _, Issued, _, _, O}] when Issued > 0 ->
            open(Name, Gen, O, half_open),
            {reply, ok, S};
        [_] ->
            {reply, ok, S}
    end;
handle_call({success, Name, Gen}, _From, S) ->
    case ets:lookup(?T, Name) of
        [{_, open, Gen, _, Issued, Oks, _, #{probes := K} = O}] when Issued > 0 ->
            case Oks + 1 >= K of
                true ->
                    true = ets:insert(?T, dspex_breaker:row(Name, Gen + 1, O)),
                    dspex_breaker:emit_change(Name, half_open, closed);
                false ->
                    %% only the one field: callers bump Issued concurrently
                    true = ets:update_element(?T, Name, {6, Oks + 1})
            end,
            {reply, ok, S};
        [] -> {reply, {error, not_found}, S};
        [_] -> {reply, ok, S}
    end;
handle_call(_Other, _From, S) ->
    {reply, {error, unknown_call}, S}.

%% @private
handle_cast(_Msg, S) -> {noreply, S}.

%% @private
handle_info(_Msg, S) -> {noreply, S}.

open(Name, Gen, #{clock := C} = O, From) ->
    true = ets:insert(?T, {Name, open, Gen + 1, C:now_ms(), 0, 0, [], O}),
    dspex_breaker:emit_change(Name, From, open).

state_of({_, closed, _, _, _, _, _, _}) -> closed;
state_of({_, open, _, _, 0, _, _, _}) -> open;
state_of({_, open, _, _, _, _, _, _}) -> half_open.
