%% @doc Supervisor of the worker pools (`dspex_workers_pool'), one child per
%% pool started with `dspex_workers:start_pool/2'. Each pool supervises its
%% own Python workers (restarts with backoff), so a crashing worker never
%% reaches this supervisor; a crashed pool is restarted with its options.
-module(dspex_workers_sup).
-behaviour(supervisor).

-export([start_link/0, start_pool/2, stop_pool/1, init/1]).

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

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) -> {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, []}}.
