%% @private
%% Supervises the optimization runs of `dspex_opt': one temporary child per
%% run (a run that crashes or ends is not restarted: its caller sees
%% `{error, run_not_found}' and its locks are freed by `dspex_locks', which
%% monitors the run as their holder). A run's own crash takes nothing else
%% down: neither the other runs nor this supervisor's siblings.
-module(dspex_opt_sup).
-behaviour(supervisor).
-export([start_link/0, start_run/1, runs/0, register_run/2, unregister_run/1, lookup_run/1, init/1]).

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

%% @doc Records the id of a run (called by the run itself).
-spec register_run(binary(), pid()) -> true.
register_run(RunId, Pid) -> ets:insert(?MODULE, {RunId, Pid}).

%% @doc Forgets the id of a run (called by the run when it ends).
-spec unregister_run(binary()) -> ok.
unregister_run(RunId) ->
    _ = ets:delete(?MODULE, RunId),
    ok.

%% @doc The run of an id. A run killed without running its terminate/2 left
%% its entry: it is removed here.
-spec lookup_run(binary()) -> {ok, pid()} | {error, run_not_found}.
lookup_run(RunId) when is_binary(RunId) ->
    case ets:lookup(?MODULE, RunId) of
        [{_, Pid}] ->
            case is_process_alive(Pid) of
                true -> {ok, Pid};
                false -> ets:delete_object(?MODULE, {RunId, Pid}), {error, run_not_found}
            end;
        [] -> {error, run_not_found}
    end;
lookup_run(_) -> {error, run_not_found}.

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% run id -> pid, owned by this supervisor (its runs die with it)
    _ = ets:new(?MODULE, [named_table, public, set, {read_concurrency, true}]),
    {ok, {#{strategy => simple_one_for_one, intensity => 10, period => 10},
          [#{id => dspex_opt, start => {dspex_opt, start_link, []}, restart => temporary,
             shutdown => 5000}]}}.
