%% @private
%% Supervises the optimization runs of `dspex_opt': one temporary child per
%% run (a run that crashes or ends is not restarted: its caller sees
%% `{error, run_not_found}' and its locks are freed by `dspex_locks', which
%% monitors the run as their holder). A run's own crash takes nothing else
%% down: neither the other runs nor this supervisor's siblings.
-module(dspex_opt_sup).
-behaviour(supervisor).
-export([start_link/0, start_run/1, runs/0, init/1]).

%% @doc Starts the supervisor, registered as `dspex_opt_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Starts a run process (`dspex_opt:start_link/1' with `Args').
-spec start_run(term()) -> {ok, pid()} | {error, term()}.
start_run(Args) ->
    case supervisor:start_child(?MODULE, [Args]) of
        {ok, Pid} -> {ok, Pid};
        {ok, Pid, _} -> {ok, Pid};
        {error, _} = E -> E
    end.

%% @doc The run processes alive.
-spec runs() -> [pid()].
runs() -> [P || {_, P, _, _} <- supervisor:which_children(?MODULE), is_pid(P)].

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    {ok, {#{strategy => simple_one_for_one, intensity => 10, period => 10},
          [#{id => dspex_opt, start => {dspex_opt, start_link, []}, restart => temporary,
             shutdown => 5000}]}}.
