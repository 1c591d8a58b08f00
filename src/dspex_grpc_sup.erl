%% @private
%% @doc Supervises the gRPC side: the watch process groups, the
%% optimization registry, then the port owner.
-module(dspex_grpc_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% watch streams join a process group per variable to learn of deletions
    Children = [#{id => dspex_grpc_watch, start => {pg, start_link, [dspex_grpc_watch]}},
                #{id => dspex_grpc_opt, start => {dspex_grpc_opt, start_link, []}},
                #{id => dspex_grpc, start => {dspex_grpc, start_link, []}, shutdown => 5000}],
    {ok, {#{strategy => rest_for_one, intensity => 5, period => 10}, Children}}.
