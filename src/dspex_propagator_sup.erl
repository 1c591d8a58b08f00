%% @private
%% Supervises the per-session propagators and owns their registry table.
-module(dspex_propagator_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    _ = ets:new(dspex_propagators, [named_table, public, set, {read_concurrency, true}]),
    {ok, {#{strategy => simple_one_for_one, intensity => 10, period => 10},
          [#{id => dspex_propagator, start => {dspex_propagator, start_link, []}, restart => temporary}]}}.
