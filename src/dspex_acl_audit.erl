%% @private
%% Owns the access-control audit table and records the denials and rate-limit
%% refusals the NIF reports (it sends them here, off the caller's path).
-module(dspex_acl_audit).
-behaviour(gen_server).
-export([start_link/0, init/1, handle_call/3, handle_cast/2, handle_info/2]).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec init([]) -> {ok, #{}}.
init([]) ->
    ok = dspex_acl:init_audit(),
    {ok, #{}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, ok, map()}.
handle_call(sync, _From, St) -> {reply, ok, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({dspex_denied, Session, Var, Principal, Permission}, St) ->
    dspex_acl:denied(Session, Var, Principal, Permission),
    {noreply, St};
handle_info({dspex_rate_limited, Session, Var, Principal}, St) ->
    dspex_telemetry:execute([dspex, rate_limit, exceeded], #{count => 1},
                            #{session => Session, variable => Var, principal => Principal}),
    dspex_acl:record(#{event => rate_limited, session => Session, variable => Var, principal => Principal,
                       outcome => rate_limited}),
    {noreply, St};
handle_info(_Other, St) -> {noreply, St}.
