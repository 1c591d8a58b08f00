%% @doc Supervisor of the worker pools (`dspex_workers_pool'), one child per
%% pool started with `dspex_workers:start_pool/2'. Each pool supervises its
%% own Python workers (restarts with backoff), so a crashing worker never
%% reaches this supervisor; a crashed pool is restarted with its options.
%%
%% It also owns the registry of running pools (name to pid, written by each
%% pool as it starts): callers address a pool through it, never through
%% `whereis/1', so naming some other registered process (this supervisor,
%% say) as a pool reaches nothing.
-module(dspex_workers_sup).
-behaviour(supervisor).

-export([start_link/0, start_pool/2, stop_pool/1, init/1]).
-export([register_pool/1, unregister_pool/1, pool/1]).

-define(REG, dspex_workers_pools).

%% @doc Starts the supervisor (registered as `dspex_workers_sup').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @doc Starts a pool child.
-spec start_pool(atom(), map()) -> {ok, pid()} | {error, term()}.
start_pool(Name, Opts) ->
    supervisor:start_child(?MODULE, #{id => Name, start => {dspex_workers_pool, start_link, [Name, Opts]},
                                      restart => transient, shutdown => 10000}).

%% @doc Stops a pool (its workers are stopped and killed first) and forgets it.
-spec stop_pool(atom()) -> ok | {error, not_found}.
stop_pool(Name) ->
    case supervisor:terminate_child(?MODULE, Name) of
        ok -> _ = supervisor:delete_child(?MODULE, Name), ok;
        {error, not_found} -> {error, not_found}
    end.

%% @doc Records the calling process as the pool `Name' (its `init/1' does).
-spec register_pool(atom()) -> ok.
register_pool(Name) ->
    true = ets:insert(?REG, {Name, self()}),
    ok.

%% @doc Forgets the calling process as the pool `Name' (a successor's entry
%% stays).
-spec unregister_pool(atom()) -> ok.
unregister_pool(Name) ->
    _ = (catch ets:delete_object(?REG, {Name, self()})),
    ok.

%% @doc The pid of the pool `Name', or `error' when no pool has that name.
%% The pid may have died meanwhile (a call to it then fails with `noproc').
-spec pool(term()) -> {ok, pid()} | error.
pool(Name) ->
    try ets:lookup(?REG, Name) of
        [{_, Pid}] -> {ok, Pid};
        [] -> error
    catch error:badarg -> error     % the application is not running
    end.

%% @private The registry lives and dies with the pools it names.
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    ?REG = ets:new(?REG, [named_table, public, set, {read_concurrency, true}]),
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, []}}.
