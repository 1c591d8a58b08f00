%% @doc The one process that removes expired sessions and frees memory the
%% store retired. Both run as dirty NIFs, so a large sweep never holds up a
%% normal scheduler.
-module(dspex_session_sweeper).
-behaviour(gen_server).
-export([start_link/1, sweep_now/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-spec start_link(pos_integer()) -> {ok, pid()} | {error, term()}.
start_link(IntervalMs) -> gen_server:start_link({local, ?MODULE}, ?MODULE, IntervalMs, []).

%% @doc Sweeps at once and returns how many sessions expired.
-spec sweep_now() -> non_neg_integer().
sweep_now() -> gen_server:call(?MODULE, sweep_now).

-spec init(pos_integer()) -> {ok, pos_integer()}.
init(Interval) ->
    erlang:send_after(Interval, self(), sweep),
    {ok, Interval}.

-spec handle_call(sweep_now, gen_server:from(), pos_integer()) -> {reply, non_neg_integer(), pos_integer()}.
handle_call(sweep_now, _From, Interval) -> {reply, sweep(), Interval}.

-spec handle_cast(term(), pos_integer()) -> {noreply, pos_integer()}.
handle_cast(_Msg, Interval) -> {noreply, Interval}.

-spec handle_info(term(), pos_integer()) -> {noreply, pos_integer()}.
handle_info(sweep, Interval) ->
    _ = sweep(),
    erlang:send_after(Interval, self(), sweep),
    {noreply, Interval};
handle_info(_Other, Interval) -> {noreply, Interval}.

%% The lock server keeps no lock of an expired session (the store tells no
%% process of an expiry).
sweep() ->
    N = dspex_nif:sweep(),
    _ = N > 0 andalso dspex_locks:swept(),
    N.
