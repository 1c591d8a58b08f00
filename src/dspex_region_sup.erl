%% @doc Supervises the multi-region processes when `dspex_bridge' / `region'
%% is configured (see `dspex_region'): the table owner and router
%% (`dspex_region'), the replication shipper (`dspex_region_shipper'), the gateway (`dspex_region_gateway') and one link per
%% peer region (`dspex_region_link'). `rest_for_one': the links write into
%% the router's tables, so a restart of the router restarts them. Without
%% configuration it has no children; a configuration that does not validate
%% fails its first child's start with `{error, {invalid_argument, Detail}}'
%% (so the application does not start and says why).
-module(dspex_region_sup).
-behaviour(supervisor).

-export([start_link/0, init/1]).

%% @doc Starts the supervisor, registered as `dspex_region_sup'.
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> supervisor:start_link({local, ?MODULE}, ?MODULE, []).

%% @private
-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    case dspex_region:config() of
        undefined -> {ok, {#{strategy => rest_for_one}, []}};
        {error, _} = E -> {ok, {#{strategy => rest_for_one, intensity => 0},
                                [#{id => dspex_region, start => {dspex_region, start_link, [E]}}]}};
        #{peers := Peers} = C ->
            Children = [#{id => dspex_region, start => {dspex_region, start_link, [C]}},
                        #{id => dspex_region_shipper, start => {dspex_region_shipper, start_link, [C]}},
                        #{id => dspex_region_gateway, start => {dspex_region_gateway, start_link, [C]}}]
                ++ [#{id => {dspex_region_link, N}, start => {dspex_region_link, start_link, [P, C]}}
                    || #{name := N} = P <- Peers],
            {ok, {#{strategy => rest_for_one, intensity => 10, period => 10}, Children}}
    end.
