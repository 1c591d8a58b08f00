%% @doc Access control, session isolation and abuse limits.
%%
%% Every variable is owned by the session that registered it; the owner has
%% every permission. Another session (a principal) needs a matching rule:
%% `#{session_pattern => any | Glob, permissions => [read | write | observe |
%% optimize], conditions => #{Key => Value}}' (conditions optional: each must
%% equal the request context's value). No matching rule: denied. Globs use `*'
%% and `?' only; every other character is literal and no regex is built.
%%
%% Store operations take `#{as => Principal, context => Map}': `read' for
%% `dspex_store:get/3' and `list/3' (unreadable variables are left out),
%% `write' for `set/4', `set_many/3', `rollback/4' and `delete/3', `observe'
%% for `watch/4', `optimize' for `dspex_locks:acquire/4'. The check runs in the
%% NIF: for writes, deletes and lock grants in the same critical section as the
%% write (a delete acts on exactly the variable it checked). Without `as' (or
%% with `as => undefined') the caller acts as the session itself. A principal
%% is a binary: any other `as' (a charlist, an atom, ...), or a `context' that
%% is not a map, raises `badarg' from every call that takes one, here
%% (`check_access/5', `filter_accessible/3,4', `set_permissions/4') as in
%% `dspex_store' and `dspex_locks': it never acts as anyone.
%%
%% Operations on the session as a whole (register a variable, delete the
%% session, add or remove a dependency, read the graph, read or watch the
%% event log, `dspex_events:state_at/3') have no per-variable rule: only the
%% session itself may do them. The Erlang calls that take `as' refuse any
%% other principal with `{error, access_denied}' (`check_owner/2', recorded
%% as a denial with permission `session'); gRPC refuses such RPCs with
%% PERMISSION_DENIED when `dspex-principal' names another session.
%%
%% Denials and permission changes are kept in a bounded in-memory audit log
%% (`audit_log/1', default 10 000 entries, application env `audit_log_size')
%% and emitted as telemetry (`[dspex, acl, denied]',
%% `[dspex, acl, permissions_changed]', `[dspex, acl, check]',
%% `[dspex, rate_limit, exceeded]').
%%
%% With a cluster (`dspex_cluster') every call on a session runs on its owner:
%% `set_permissions' and `set_rate_limit' through its writer (rules reach the
%% replicas with the whole session; the rate limit is replayed), the queries
%% there. Audit entries and telemetry are recorded on the owner node.
-module(dspex_acl).

-include("dspex_routing.hrl").

-export([set_permissions/3, set_permissions/4, get_permissions/2, session_permissions/1, check_access/5, validate_rules/1,
         filter_accessible/3, filter_accessible/4, set_rate_limit/3, get_rate_limit/1, audit_log/0, audit_log/1,
         record/1, init_audit/0, denied/4, check_owner/2]).

-type permission() :: read | write | observe | optimize.
-type rule() :: #{session_pattern := any | binary(), permissions := [permission()], conditions => map()}.
-export_type([permission/0, rule/0]).

-define(TAB, dspex_acl_audit).

%% @equiv set_permissions(Session, Var, Rules, #{})
-spec set_permissions(dspex_store:session_id(), dspex_store:var_key(), [rule()]) -> ok | {error, term()}.
set_permissions(Session, Var, Rules) -> set_permissions(Session, Var, Rules, #{}).

%% @doc Replaces the variable's rules. Only the owner may (`#{as => P}' with P
%% another session is `{error, access_denied}'). A bad rule is
%% `{error, {invalid_rule, Index, Message}}' (0-based) and changes nothing.
-spec set_permissions(dspex_store:session_id(), dspex_store:var_key(), [rule()], map()) -> ok | {error, term()}.
set_permissions(Session, Var, Rules, Opts) when is_map(Opts) ->
    ?ROUTED(Session, set_permissions, [Session, Var, Rules, Opts], set_permissions_here(Session, Var, Rules, Opts)).

set_permissions_here(Session, Var, Rules, Opts) ->
    Who = maps:get(as, Opts, Session),
    Result = dspex_events:recorded(dspex_nif:acl_set(Session, Var, Rules, Opts), Session, acl_rule_set, %% event log
                                   #{variable => Var, principal => Who, rules => Rules}),
    record(#{event => permissions_changed, session => Session, variable => Var, principal => Who,
             outcome => outcome(Result), rules => Rules}),
    dspex_telemetry:execute([dspex, acl, permissions_changed], #{count => 1},
                            #{session => Session, variable => Var, principal => Who, result => outcome(Result)}),
    Result.

%% @doc The variable's rules (`[]': owner only).
-spec get_permissions(dspex_store:session_id(), dspex_store:var_key()) -> {ok, [rule()]} | {error, term()}.
get_permissions(Session, Var) -> ?ROUTED(Session, get_permissions, [Session, Var], dspex_nif:acl_get(Session, Var)).

%% @doc The rules of every variable of the session that has some, by name
%% (`#{Name => Rules}'; a variable without rules, owner only, is not listed).
%% Reads no value (the debug console's access view of a big session).
-spec session_permissions(dspex_store:session_id()) -> {ok, #{binary() => [rule()]}} | {error, term()}.
session_permissions(Session) when is_binary(Session) ->
    ?ROUTED(Session, session_permissions, [Session], dspex_nif:acl_rules(Session));
session_permissions(_) -> {error, {invalid_argument, session}}.

%% @doc Whether `Principal' may use `Permission' on the variable.
-spec check_access(dspex_store:session_id(), dspex_store:var_key(), binary(), permission(), map()) ->
          ok | {error, term()}.
check_access(Session, Var, Principal, Permission, Context) when is_map(Context) ->
    ?ROUTED(Session, check_access, [Session, Var, Principal, Permission, Context],
            check_access_here(Session, Var, Principal, Permission, Context)).

check_access_here(Session, Var, Principal, Permission, Context) ->
    %% a denial is also recorded in the audit log by the NIF's report
    Result = case dspex_nif:session_take(Session) of
                 ok -> dspex_nif:acl_check(Session, Var, Principal, Permission, Context);
                 Limited -> Limited
             end,
    dspex_telemetry:execute([dspex, acl, check], #{count => 1},
                            #{session => Session, variable => Var, principal => Principal,
                              permission => Permission, result => outcome(Result)}),
    Result.

%% @doc `ok' or the first problem: `{error, {invalid_rule, Index, Message}}'.
-spec validate_rules(term()) -> ok | {error, term()}.
validate_rules(Rules) -> dspex_nif:acl_validate(Rules).

%% @equiv filter_accessible(Session, Principal, Permission, #{})
-spec filter_accessible(dspex_store:session_id(), binary(), permission()) -> {ok, [binary()]} | {error, term()}.
filter_accessible(Session, Principal, Permission) -> filter_accessible(Session, Principal, Permission, #{}).

%% @doc Names of the session's variables `Principal' may use for `Permission'.
-spec filter_accessible(dspex_store:session_id(), binary(), permission(), map()) -> {ok, [binary()]} | {error, term()}.
filter_accessible(Session, Principal, Permission, Context) ->
    ?ROUTED(Session, filter_accessible, [Session, Principal, Permission, Context],
            case dspex_nif:session_take(Session) of
                ok -> dspex_nif:acl_filter(Session, Principal, Permission, Context);
                Limited -> Limited
            end).

%% @doc A token bucket on the session's operations: `Rate' operations per
%% second on average, bursts up to `Burst'; past it `{error, rate_limited}'.
%% `Rate' 0 turns limiting off (the default; it then costs nothing). What
%% counts: every data read and write (`dspex_store' get/set/list/history/
%% rollback/delete/register/watch), lock grants, graph reads and writes
%% (`dspex_graph'), reads of the session's event log (`dspex_events'
%% read/fold/state_at/subscribe/audit_trail) and access queries
%% (`check_access/5', `filter_accessible/3,4'). What does not: keeping the
%% session alive or looking at it (`touch/1', `get_session/1', gRPC
%% Heartbeat: a limited session must not expire for being limited), deleting
%% it, the owner's administration (`set_permissions', `get_permissions',
%% `set_rate_limit', `get_rate_limit': the owner can always lift a limit),
%% and `dspex_store:export_session/1' (replication and region fail-over take
%% their full copies with it: a limit must never stop a copy), and the
%% recomputation of derived variables a metered write triggers.
%% Values as `create_session/2''s `rate_limit' option takes them: `Rate' a
%% number >= 0, `Burst' a number >= 1, both within a C double; anything else
%% is `{error, {invalid_argument, rate_limit}}' and changes nothing.
-spec set_rate_limit(dspex_store:session_id(), number(), number()) -> ok | {error, term()}.
set_rate_limit(Session, Rate, Burst) ->
    case dspex_store:rate_limit(#{rate => Rate, burst => Burst}) of
        {_, _} ->
            ?ROUTED(Session, set_rate_limit, [Session, Rate, Burst], dspex_nif:session_set_rate(Session, Rate, Burst));
        error -> {error, {invalid_argument, rate_limit}}
    end.

%% @doc The session's token bucket: `{ok, #{rate, burst, tokens}}' (floats:
%% `rate' operations per second, `0.0' when limiting is off; `burst'; `tokens'
%% the operations it would allow at once now), or `{error,
%% session_not_found}'. Reading it takes no token. A session id that is not a
%% binary raises `badarg'.
-spec get_rate_limit(dspex_store:session_id()) ->
          {ok, #{rate := float(), burst := float(), tokens := float()}} | {error, session_not_found}.
get_rate_limit(Session) ->
    ?ROUTED(Session, get_rate_limit, [Session], dspex_nif:session_get_rate(Session)).

%% @equiv audit_log(#{})
-spec audit_log() -> [map()].
audit_log() -> audit_log(#{}).

%% @doc Audit entries, oldest first: `#{at, event, session, variable,
%% principal, outcome, ...}'. `variable' is a binary: the variable's name
%% (an atom key is recorded by its name; a variable named by its id, by that
%% id), `undefined' for a session-level denial. Filters: `session',
%% `principal', `event', `since' (µs), `limit' (the newest N, an integer >=
%% 0). A filter that is not a map or a bad `limit' is
%% `{error, {invalid_argument, filter | limit}}'.
-spec audit_log(map()) -> [map()] | {error, {invalid_argument, filter | limit}}.
audit_log(Filter) when not is_map(Filter) -> {error, {invalid_argument, filter}};
audit_log(#{limit := N}) when not (is_integer(N) andalso N >= 0) -> {error, {invalid_argument, limit}};
audit_log(Filter) ->
    Entries = try ets:tab2list(?TAB) catch error:badarg -> [] end,
    Match = [E || {_, E} <- Entries,
                  lists:all(fun({K, V}) when K =:= session; K =:= principal; K =:= event -> maps:get(K, E, undefined) =:= V;
                               ({since, T}) -> maps:get(at, E) >= T;
                               (_) -> true
                            end, maps:to_list(Filter))],
    case Filter of
        #{limit := N} -> lists:nthtail(max(0, length(Match) - N), Match);
        _ -> Match
    end.

%% @private Appends to the bounded audit log (a no-op if the application is not running).
-spec record(map()) -> ok.
record(Entry0) ->
    %% one shape for every entry: the variable as a binary
    Entry = case Entry0 of
                #{variable := V} when is_atom(V), V =/= undefined -> Entry0#{variable := atom_to_binary(V, utf8)};
                _ -> Entry0
            end,
    Seq = erlang:unique_integer([monotonic, positive]),
    try
        ets:insert(?TAB, {Seq, Entry#{at => erlang:system_time(microsecond)}}),
        Max = application:get_env(dspex_bridge, audit_log_size, 10000),
        case ets:info(?TAB, size) > Max of
            true -> ets:delete(?TAB, ets:first(?TAB));
            false -> true
        end,
        ok
    catch error:badarg -> ok
    end.

%% @private Creates the audit table (owned by dspex_acl_audit).
-spec init_audit() -> ok.
init_audit() ->
    _ = ets:new(?TAB, [ordered_set, public, named_table, {write_concurrency, true}]),
    ok.

outcome(ok) -> ok;
outcome({ok, _}) -> ok;
outcome({error, R}) -> R.

%% @doc `ok' when `Opts' act as `Session' itself (no `as', `as =>
%% undefined' or `as => Session'); another principal is
%% `{error, access_denied}', recorded as a denial (permission `session',
%% variable `undefined'). For operations on the session as a whole, which no
%% per-variable rule covers. `Session' `all' (every session's log) is
%% refused to any principal. An `as' that is not a binary, or a `context'
%% that is not a map, raises `badarg' (as everywhere a principal is taken).
-spec check_owner(dspex_store:session_id() | all, map()) -> ok | {error, access_denied}.
check_owner(Session, Opts) when is_map(Opts) ->
    case Opts of
        #{context := C} when not is_map(C) -> erlang:error(badarg);
        _ -> ok
    end,
    case maps:get(as, Opts, undefined) of
        undefined -> ok;
        Session when is_binary(Session) -> ok;
        P when is_binary(P) ->
            %% the session's event log records it only when there is a session to log it in
            Exists = is_binary(Session) andalso element(1, dspex_nif:session_get(Session)) =:= ok,
            _ = Exists andalso dspex_events:emit(Session, access_denied,
                                                 #{variable => undefined, principal => P, permission => session},
                                                 #{principal => P}), %% event log
            audit_denied(Session, undefined, P, session),
            {error, access_denied};
        _ -> erlang:error(badarg)
    end.

%% @private Records a denial seen by a store operation.
-spec denied(dspex_store:session_id() | all, term(), term(), permission() | session) -> ok.
denied(Session, Var0, Principal, Permission) ->
    Var = case Var0 of
              V when is_atom(V), V =/= undefined -> atom_to_binary(V, utf8);
              V -> V
          end,
    ok = dspex_events:emit(Session, access_denied, #{variable => Var, principal => Principal, permission => Permission},
                           #{variable => Var, principal => Principal}), %% event log
    audit_denied(Session, Var, Principal, Permission).

audit_denied(Session, Var, Principal, Permission) ->
    record(#{event => denied, session => Session, variable => Var, principal => Principal,
             permission => Permission, outcome => access_denied}),
    dspex_telemetry:execute([dspex, acl, denied], #{count => 1},
                            #{session => Session, variable => Var, principal => Principal, permission => Permission}).
