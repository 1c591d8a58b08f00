%% @doc gRPC status codes and the mapping of bridge errors to them.
%%
%% | error | status |
%% |---|---|
%% | `session_not_found', `{not_found, _}', `{version_not_found, _}' | NOT_FOUND (5) |
%% | `{invalid_value, _}', `{invalid_constraints, _}', `{invalid_argument, _}', `{unknown_type, _}', `{duplicate_variable, _}', `{invalid_rule, _, _}', `{batch_failed, _}' | INVALID_ARGUMENT (3) |
%% | `{limit_exceeded, L}' for `L' = `value_size', `name_length', `history_limit' (the request itself is over a limit: retrying cannot help) | INVALID_ARGUMENT (3), "limit exceeded: L (...)" |
%% | `{already_exists, _}' | ALREADY_EXISTS (6) |
%% | `{version_mismatch, Current}' | ABORTED (10), "version mismatch: current version is N" |
%% | `{locked, _}', `stale_lock', `{lock_held_by, _}', `not_lock_owner', `derived_variable', `{would_create_cycle, _}', `not_optimizing' | FAILED_PRECONDITION (9) |
%% | `{tool_not_found, _}' | NOT_FOUND (5) |
%% | `{unknown_pool, _}', `{not_json, _}' | INVALID_ARGUMENT (3) |
%% | `{too_large, Bytes}' (a Python tool's arguments or result over the worker frame limit) | RESOURCE_EXHAUSTED (8) |
%% | `circuit_open', `overloaded', `no_pool', `pool_stopped', `flood', `{worker_exit, _}', `{bad_reply, _}', `{load_error, _, _}', `{spawn_failed, _}' (a Python tool's pool) | UNAVAILABLE (14) |
%% | `run_not_found', `{unknown_trial, _}' (optimization studies) | NOT_FOUND (5) |
%% | `{already_told, _}' | FAILED_PRECONDITION (9) |
%% | `budget_exhausted' | OUT_OF_RANGE (11) |
%% | `{unknown_algorithm, _}', `{unsupported_type, _, _}', `{unbounded, _}', `{invalid_log_scale, _}', `{too_many_dimensions, _, _}', `{too_many_choices, _, _}' | INVALID_ARGUMENT (3) |
%% | `access_denied' | PERMISSION_DENIED (7) |
%% | `{limit_exceeded, L}' for `L' = `sessions', `variables', `version' (a capacity is used up) | RESOURCE_EXHAUSTED (8), "limit exceeded: L (...)" |
%% | `rate_limited' (the session's token bucket is empty: retry later), `enomem' | RESOURCE_EXHAUSTED (8) |
%% | `overload', `unavailable' | UNAVAILABLE (14) |
%% | `timeout' | DEADLINE_EXCEEDED (4) |
%% | `unimplemented' | UNIMPLEMENTED (12) |
%% | anything else | INTERNAL (13) |
%%
%% Every error status also carries trailing metadata (`trailers/1'):
%% `dspex-error' is the reason's tag (`not_found', `session_not_found',
%% `version_mismatch', `limit_exceeded', `rate_limited', `locked', ...;
%% `internal' for an unexpected one), so clients tell errors apart without
%% parsing messages; `dspex-limit' names the limit of a `limit_exceeded'
%% (`value_size', ...) and `dspex-current-version' the version of a
%% `version_mismatch'.
-module(dspex_grpc_status).

-export([code/1, name/1, of_error/1, trailers/1]).

%% @doc The numeric code of a status name.
-spec code(atom()) -> 0..16.
code(ok) -> 0;
code(cancelled) -> 1;
code(unknown) -> 2;
code(invalid_argument) -> 3;
code(deadline_exceeded) -> 4;
code(not_found) -> 5;
code(already_exists) -> 6;
code(permission_denied) -> 7;
code(resource_exhausted) -> 8;
code(failed_precondition) -> 9;
code(aborted) -> 10;
code(out_of_range) -> 11;
code(unimplemented) -> 12;
code(internal) -> 13;
code(unavailable) -> 14;
code(data_loss) -> 15;
code(unauthenticated) -> 16.

%% @doc The status name of a numeric code.
-spec name(0..16) -> atom().
name(N) ->
    element(N + 1, {ok, cancelled, unknown, invalid_argument, deadline_exceeded, not_found, already_exists,
                    permission_denied, resource_exhausted, failed_precondition, aborted, out_of_range,
                    unimplemented, internal, unavailable, data_loss, unauthenticated}).

%% @doc The status name and message for an error reason.
-spec of_error(term()) -> {atom(), binary()}.
of_error(session_not_found) -> {not_found, <<"session not found">>};
of_error({session_not_found, S}) -> {not_found, fmt("session not found: ~ts", [S])};
of_error({not_found, {From, To}}) -> {not_found, fmt("dependency not found: ~ts -> ~ts", [txt(From), txt(To)])};
of_error({not_found, K}) -> {not_found, fmt("variable not found: ~ts", [txt(K)])};
of_error({version_not_found, V}) -> {not_found, fmt("version ~p of the variable is not in its history", [V])};
of_error({invalid_value, M}) -> {invalid_argument, fmt("invalid value: ~ts", [txt(M)])};
of_error({invalid_constraints, M}) -> {invalid_argument, fmt("invalid constraints: ~ts", [txt(M)])};
of_error({invalid_argument, A}) -> {invalid_argument, fmt("invalid argument: ~ts", [txt(A)])};
of_error({unknown_type, T}) -> {invalid_argument, fmt("unknown variable type: ~ts", [txt(T)])};
of_error({duplicate_variable, K}) -> {invalid_argument, fmt("variable named twice: ~ts", [txt(K)])};
of_error({invalid_rule, I, M}) -> {invalid_argument, fmt("invalid access rule ~p: ~ts", [I, txt(M)])};
of_error({batch_failed, Errs}) when is_map(Errs) ->
    {invalid_argument, fmt("batch failed, nothing written: ~ts",
                           [lists:join(", ", [[txt(K), ": ", element(2, of_error(R))] || {K, R} <- maps:to_list(Errs)])])};
of_error({already_exists, N}) -> {already_exists, fmt("already exists: ~ts", [txt(N)])};
of_error({version_mismatch, Cur}) -> {aborted, fmt("version mismatch: current version is ~p", [Cur])};
of_error({locked, H}) -> {failed_precondition, fmt("variable is locked by optimizer ~ts", [holder(H)])};
of_error(stale_lock) -> {failed_precondition, <<"stale optimizer lock token">>};
of_error({lock_held_by, H}) -> {failed_precondition, fmt("variable is locked by optimizer ~ts", [holder(H)])};
of_error(not_lock_owner) -> {failed_precondition, <<"not the optimizer holding the lock">>};
of_error(not_optimizing) -> {failed_precondition, <<"no optimization runs on the variable">>};
of_error(derived_variable) -> {failed_precondition, <<"derived variables cannot be written directly">>};
of_error({would_create_cycle, Path}) ->
    {failed_precondition, fmt("dependency would create a cycle: ~ts", [lists:join(" -> ", [txt(P) || P <- Path])])};
of_error({no_model, N}) -> {not_found, fmt("no model to serve for name: ~ts", [txt(N)])};
of_error({tool_not_found, N}) -> {not_found, fmt("tool not found: ~ts", [txt(N)])};
of_error(access_denied) -> {permission_denied, <<"access denied">>};
of_error(rate_limited) -> {resource_exhausted, <<"rate limited">>};
of_error({limit_exceeded, L}) ->
    Status = case L of
                 sessions -> resource_exhausted;
                 variables -> resource_exhausted;
                 version -> resource_exhausted;   % the variable's versions are used up
                 _ -> invalid_argument
             end,
    {Status, fmt("limit exceeded: ~ts~ts", [txt(L), limit_text(L)])};
of_error(enomem) -> {resource_exhausted, <<"out of memory">>};
of_error(overload) -> {unavailable, <<"server overloaded, retry later">>};
of_error(unavailable) -> {unavailable, <<"unavailable">>};
of_error(timeout) -> {deadline_exceeded, <<"timed out">>};
of_error(unimplemented) -> {unimplemented, <<"not implemented by dspex_bridge">>};
%% a Python tool's worker pool (dspex_workers): the pool is unable now, retry later
of_error(circuit_open) -> {unavailable, <<"worker pool circuit breaker is open, retry later">>};
of_error(overloaded) -> {unavailable, <<"worker pool queue is full, retry later">>};
of_error(no_pool) -> {unavailable, <<"worker pool is not running">>};
of_error(pool_stopped) -> {unavailable, <<"worker pool stopped">>};
of_error(flood) -> {unavailable, <<"worker flooded the bridge and was restarted">>};
of_error({worker_exit, R}) -> {unavailable, fmt("worker exited: ~0p", [R])};
of_error({bad_reply, _}) -> {unavailable, <<"worker broke the protocol and was restarted">>};
of_error({load_error, T, M}) -> {unavailable, fmt("worker module does not load: ~ts: ~ts", [txt(T), txt(M)])};
of_error({spawn_failed, R}) -> {unavailable, fmt("worker could not start: ~0p", [R])};
of_error({unknown_pool, P}) -> {invalid_argument, fmt("unknown worker pool: ~ts", [txt(P)])};
of_error({not_json, _}) -> {invalid_argument, <<"tool arguments have no JSON form">>};
of_error({too_large, N}) -> {resource_exhausted, fmt("a frame of ~b bytes is over the worker frame limit", [N])};
%% optimization studies (dspex_opt)
of_error(run_not_found) -> {not_found, <<"optimization study not found">>};
of_error({unknown_trial, Id}) -> {not_found, fmt("trial not found: ~p", [Id])};
of_error({already_told, Id}) -> {failed_precondition, fmt("trial ~p was already told", [Id])};
of_error(budget_exhausted) -> {out_of_range, <<"the study's budget of trials is exhausted">>};
of_error({unknown_algorithm, A}) -> {invalid_argument, fmt("unknown algorithm: ~ts", [txt(A)])};
of_error({unsupported_type, N, T}) ->
    {invalid_argument, fmt("variable ~ts of type ~ts cannot be optimized", [txt(N), txt(T)])};
of_error({unbounded, N}) -> {invalid_argument, fmt("variable ~ts needs both min and max to be optimized", [txt(N)])};
of_error({invalid_log_scale, N}) -> {invalid_argument, fmt("variable ~ts: log scale needs min > 0", [txt(N)])};
of_error({too_many_dimensions, N, Max}) ->
    {invalid_argument, fmt("~b variables to optimize: the built-in algorithms take at most ~b", [N, Max])};
of_error({too_many_choices, N, Max}) ->
    {invalid_argument, fmt("variable ~ts has more than ~b choices: the built-in algorithms take at most ~b", [txt(N), Max, Max])};
of_error(Other) -> {internal, fmt("internal error: ~0P", [Other, 30])}.

%% @doc Trailing metadata of an error status (see the module doc).
-spec trailers(term()) -> #{binary() => binary()}.
trailers(R) ->
    Tag = case of_error(R) of
              {internal, _} -> internal;
              _ when is_atom(R) -> R;
              _ -> element(1, R)
          end,
    Base = #{<<"dspex-error">> => atom_to_binary(Tag, utf8)},
    case R of
        {limit_exceeded, L} when is_atom(L) -> Base#{<<"dspex-limit">> => atom_to_binary(L, utf8)};
        {version_mismatch, V} when is_integer(V) -> Base#{<<"dspex-current-version">> => integer_to_binary(V)};
        _ -> Base
    end.

%% The configured limit, so the message says what the bound is.
limit_text(L) ->
    Key = case L of
              value_size -> max_value_bytes;
              name_length -> max_name_length;
              history_limit -> max_history;
              sessions -> max_sessions;
              variables -> max_variables;
              _ -> undefined
          end,
    case catch maps:get(Key, dspex_store:limits()) of
        N when is_integer(N) -> io_lib:format(" (~ts = ~b)", [Key, N]);
        _ -> ""
    end.

%% A lock holder as a client can read it: a study's holder is its algorithm
%% (the study's process id means nothing outside the node).
holder({dspex_opt, Alg, Pid}) when is_pid(Pid) -> ["study (", txt(Alg), ")"];
holder(H) -> txt(H).

txt(B) when is_binary(B) -> B;
txt(A) when is_atom(A) -> atom_to_binary(A, utf8);
txt(T) -> io_lib:format("~0p", [T]).

fmt(F, A) -> unicode:characters_to_binary(io_lib:format(F, A)).
