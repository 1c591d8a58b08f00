%% @doc Model versions: a registry with aliases, deterministic sticky
%% selection on the hot path, A/B tests with always-valid sequential
%% statistics, and gradual rollouts with automatic rollback (issue #19).
%%
%% <b>Registry.</b> The registry lives in the `dspex_store' session
%% `"__dspex_models__"' (no TTL), so it is replicated, routed and failed over
%% like any other session when a cluster is configured, and every change is a
%% new version in the store's history of that variable (the audit trail). A
%% model `Name' at `Version' is the variable `model:Name@Version' (its
%% value is the model id `<<"Name@Version">>', its metadata the model's
%% description); an alias is the variable `alias:Name:Alias' whose value is a
%% model id. Registering an existing name+version fails
%% (`{error, {already_exists, ModelId}}'); a model's description never
%% changes afterwards (`archive_model/1' only sets its status). An alias move
%% is one variable write: readers see the old or the new target, never a mix.
%%
%% <b>Selection.</b> `select_model/2' reads the routing table of the name from
%% `persistent_term' (published by `dspex_models_server' when an alias,
%% experiment or rollout changes) and never calls a server. See
%% `dspex_models_server' for experiments and rollouts (kept in the same
%% store session: they survive a restart of their server and a failover, and
%% each decision and rollout change is an event-log record), `dspex_models_stats'
%% for the statistics.
-module(dspex_models).

-export([register_model/1, get_model/1, list_models/1, archive_model/1,
         set_alias/3, set_alias/4, get_alias/2, aliases/1]).
-export([select_model/2, record_inference/4, bucket/2]).
-export([start_ab_test/1, results/1, stop_test/1, stop_test/2, list_tests/0,
         start_rollout/3, rollout_status/1, pause/1, pause/2, resume/1, resume/2,
         rollback/1, rollback/2, evaluate/0]).
-export([registry_session/0, model_id/2, ensure_session/0, archive_unchecked/1]).

-export_type([model_id/0, model/0]).

-type model_id() :: binary().
-type model() :: #{id := model_id(), name := binary(), version := binary(),
                   artifact := binary() | undefined, params := map(), metadata := map(),
                   status := active | archived, registered_at := integer()}.

-define(SESSION, <<"__dspex_models__">>).
-define(ROUTE(Name), {dspex_models_route, Name}).
-define(INGEST(Model), {dspex_models_ingest, Model}).
-define(BUCKETS, 10000).

%%% ------------------------------------------------------------------
%%% Registry
%%% ------------------------------------------------------------------

%% @doc The store session holding the registry.
-spec registry_session() -> binary().
registry_session() -> ?SESSION.

%% @doc The id of `Name' at `Version': `<<"Name@Version">>'.
-spec model_id(binary(), binary()) -> model_id().
model_id(Name, Version) -> <<Name/binary, "@", Version/binary>>.

%% @doc Registers a model version: `#{name := binary(), version := binary(),
%% artifact => URI binary, params => map(), metadata => map()}' →
%% `{ok, ModelId}'. Names and versions are non-empty UTF-8 binaries without
%% `@', `:', `*' or `?'. Errors: `{already_exists, ModelId}',
%% `{invalid_argument, Field}' (the first of `name', `version', `artifact',
%% `params', `metadata' that is missing or bad; `name' for a non-map).
-spec register_model(map()) -> {ok, model_id()} | {error, term()}.
register_model(Spec) when is_map(Spec) ->
    Name = maps:get(name, Spec, undefined),
    Version = maps:get(version, Spec, undefined),
    Artifact = maps:get(artifact, Spec, undefined),
    Params = maps:get(params, Spec, #{}),
    Meta = maps:get(metadata, Spec, #{}),
    case {valid_part(Name), valid_part(Version)} of
        {false, _} -> {error, {invalid_argument, name}};
        {_, false} -> {error, {invalid_argument, version}};
        _ when not (Artifact =:= undefined orelse is_binary(Artifact)) ->
            {error, {invalid_argument, artifact}};
        _ when not is_map(Params) -> {error, {invalid_argument, params}};
        _ when not is_map(Meta) -> {error, {invalid_argument, metadata}};
        _ ->
            ok = ensure_session(),
            Id = model_id(Name, Version),
            Desc = #{name => Name, version => Version, artifact => Artifact,
                     params => Params, user_metadata => Meta, status => active,
                     registered_at => erlang:system_time(microsecond)},
            case dspex_store:register(?SESSION, model_var(Id), string, Id,
                                      #{metadata => Desc, history_limit => 16}) of
                {ok, _} ->
                    event(register, #{model => Id, name => Name}),
                    {ok, Id};
                {error, {already_exists, _}} -> {error, {already_exists, Id}};
                {error, _} = E -> E
            end
    end;
register_model(_) -> {error, {invalid_argument, name}}.

%% @doc The model's description, or `{error, {not_found, ModelId}}'.
-spec get_model(model_id()) -> {ok, model()} | {error, term()}.
get_model(Id) when is_binary(Id) ->
    case dspex_store:get(?SESSION, model_var(Id)) of
        {ok, Var} -> {ok, to_model(Var)};
        {error, session_not_found} -> {error, {not_found, Id}};
        {error, {not_found, _}} -> {error, {not_found, Id}};
        {error, _} = E -> E
    end.

%% @doc Every version of `Name' (or of every name with `all'), oldest id
%% first, archived ones included (see `status'). A `Name' that no model can
%% have (see `register_model/1': `*' or `?' would be store wildcards) is
%% `{error, {invalid_argument, name}}'.
-spec list_models(binary() | all) -> {ok, [model()]} | {error, {invalid_argument, name}}.
list_models(Name) ->
    case Name =:= all orelse valid_part(Name) of
        true ->
            Pattern = case Name of
                          all -> <<"model:*">>;
                          _ -> <<"model:", Name/binary, "@*">>
                      end,
            case dspex_store:list(?SESSION, Pattern) of
                {ok, Vars} -> {ok, lists:sort(fun(A, B) -> maps:get(id, A) =< maps:get(id, B) end,
                                              [to_model(V) || V <- Vars])};
                {error, session_not_found} -> {ok, []}
            end;
        false -> {error, {invalid_argument, name}}
    end.

%% @doc Marks a model archived: it stays readable, but it can no longer be the
%% target of an alias, an experiment variant or a rollout. Idempotent.
%% Refused while a running or paused test or rollout has it as a variant,
%% baseline or new model: `{error, {in_use, TestId}}' (stop it, or let it
%% end, first). Aliases already pointing at it stay where they are.
-spec archive_model(model_id()) -> ok | {error, term()}.
archive_model(Id) when is_binary(Id) ->
    case get_model(Id) of
        {ok, #{status := archived}} -> ok;
        {ok, _} -> dspex_models_server:archive(Id);
        {error, _} = E -> E
    end.

%% @private The store write of `archive_model/1', once the server has
%% checked that no test uses the model.
-spec archive_unchecked(model_id()) -> ok | {error, term()}.
archive_unchecked(Id) ->
    case get_model(Id) of
        {ok, #{status := archived}} -> ok;
        {ok, _} ->
            case dspex_store:set(?SESSION, model_var(Id), Id, #{metadata => #{status => archived}}) of
                {ok, _} -> event(archive, #{model => Id}), ok;
                {error, _} = E -> E
            end;
        {error, _} = E -> E
    end.

%% @doc Points alias `Alias' (`production', `staging', `champion' or any
%% atom/binary) of `Name' at `ModelId', in one write. The model must be a
%% registered, active version of `Name'. Moving `production' republishes the
%% name's routing table.
-spec set_alias(binary(), atom() | binary(), model_id()) -> ok | {error, term()}.
set_alias(Name, Alias, ModelId) -> set_alias(Name, Alias, ModelId, #{}).

%% @doc Like `set_alias/3'; `#{expected => ModelId | undefined}' moves the
%% alias only if it still points there (`{error, {alias_moved, Current}}'
%% otherwise): a compare-and-set for concurrent promoters.
-spec set_alias(binary(), atom() | binary(), model_id(), map()) -> ok | {error, term()}.
set_alias(Name, Alias0, ModelId, Opts) when is_binary(Name), is_binary(ModelId), is_map(Opts) ->
    Alias = alias_bin(Alias0),
    case get_model(ModelId) of
        {ok, #{name := Name, status := active}} ->
            Var = alias_var(Name, Alias),
            Result = case dspex_store:get(?SESSION, Var) of
                         {ok, #{value := Cur, version := V}} ->
                             case Opts of
                                 #{expected := Exp} when Exp =/= Cur -> {error, {alias_moved, Cur}};
                                 _ -> cas_set(Var, ModelId, V)
                             end;
                         {error, {not_found, _}} ->
                             case Opts of
                                 #{expected := Exp} when Exp =/= undefined -> {error, {alias_moved, undefined}};
                                 _ ->
                                     case dspex_store:register(?SESSION, Var, string, ModelId,
                                                               #{history_limit => 64}) of
                                         {ok, _} -> ok;
                                         {error, {already_exists, _}} -> {error, {alias_moved, concurrent}};
                                         {error, _} = E -> E
                                     end
                             end;
                         {error, _} = E -> E
                     end,
            case Result of
                ok ->
                    event(alias, #{name => Name, alias => Alias, model => ModelId}),
                    Alias =:= <<"production">> andalso dspex_models_server:republish(Name),
                    ok;
                _ -> Result
            end;
        {ok, #{status := archived}} -> {error, {archived, ModelId}};
        {ok, _} -> {error, {invalid_argument, name}};
        {error, _} = E -> E
    end.

cas_set(Var, ModelId, V) ->
    case dspex_store:set(?SESSION, Var, ModelId, #{expected_version => V}) of
        {ok, _} -> ok;
        {error, {version_mismatch, _}} -> {error, {alias_moved, concurrent}};
        {error, _} = E -> E
    end.

%% @doc The model an alias points at.
-spec get_alias(binary(), atom() | binary()) -> {ok, model_id()} | {error, {not_found, binary()}}.
get_alias(Name, Alias0) ->
    Alias = alias_bin(Alias0),
    case dspex_store:get_value(?SESSION, alias_var(Name, Alias)) of
        {ok, Id} -> {ok, Id};
        {error, _} -> {error, {not_found, Alias}}
    end.

%% @doc Every alias of `Name' → model id (none for a name no model can
%% have: its `*' or `?' would be store wildcards).
-spec aliases(binary()) -> #{binary() => model_id()}.
aliases(Name) ->
    case valid_part(Name) of
        true ->
            Prefix = <<"alias:", Name/binary, ":">>,
            case dspex_store:list(?SESSION, <<Prefix/binary, "*">>) of
                {ok, Vars} ->
                    maps:from_list([{binary:part(N, byte_size(Prefix), byte_size(N) - byte_size(Prefix)), V}
                                    || #{name := N, value := V} <- Vars]);
                {error, _} -> #{}
            end;
        false -> #{}
    end.

%%% ------------------------------------------------------------------
%%% Hot path
%%% ------------------------------------------------------------------

%% @doc The model serving `Context' for `Name': `{ok, ModelId}'. No server
%% call: one `persistent_term' read, one `erlang:phash2/2' of
%% `{Salt, Unit}' into 10,000 buckets and one tuple element. `Context' is a
%% map holding the unit key of the routing (default `user_id'; an experiment
%% may name another with `unit'), or the unit itself (a binary or integer).
%% The same unit gets the same model on every call and every node that has
%% the same routing; a context without the unit key gets a uniformly random
%% bucket (not sticky). Without an experiment or rollout the `production'
%% alias is served. `{error, {no_model, Name}}' when there is nothing to serve.
-spec select_model(binary(), map() | binary() | integer()) -> {ok, model_id()} | {error, term()}.
select_model(Name, Context) ->
    case persistent_term:get(?ROUTE(Name), undefined) of
        {single, Id} -> {ok, Id};
        {split, UnitKey, Salt, Table} ->
            {ok, element(bucket_of(UnitKey, Salt, Context) + 1, Table)};
        undefined ->
            case get_alias(Name, <<"production">>) of
                {ok, _} = Ok -> Ok;
                {error, _} -> {error, {no_model, Name}}
            end
    end.

bucket_of(UnitKey, Salt, Context) when is_map(Context) ->
    case Context of
        #{UnitKey := Unit} -> erlang:phash2({Salt, Unit}, ?BUCKETS);
        _ -> rand:uniform(?BUCKETS) - 1
    end;
bucket_of(_UnitKey, Salt, Unit) -> erlang:phash2({Salt, Unit}, ?BUCKETS).

%% @doc The bucket (0..9999) of a unit under a salt: `erlang:phash2({Salt,
%% Unit}, 10000)', the same on every node and OTP release. A test's salt is
%% `erlang:phash2(S)' of its `salt' option (default: its id).
-spec bucket(term(), term()) -> 0..9999.
bucket(Salt, Unit) -> erlang:phash2({Salt, Unit}, ?BUCKETS).

%% @doc Records one inference of `ModelId' for the experiments and rollouts
%% it takes part in: `LatencyMs' (a positive number), `Success' (boolean),
%% `Meta' (`#{experiment => TestId}' restricts it to one test; a custom
%% metric's value is `Meta''s entry under its name, a number within
%% [-1000, 1000] (sums are fixed point at 1e-6); a value outside that range
%% for a metric of a test that would record this inference is `badarg', and
%% then no test records it; values under other keys are not looked at. No
%% message, no server: a `persistent_term' read and a few `counters:add/3'
%% on the test's own counters (write-concurrency). A model in no running
%% test is ignored: `ok'.
-spec record_inference(model_id(), number(), boolean(), map()) -> ok.
record_inference(ModelId, LatencyMs, Success, Meta)
  when is_number(LatencyMs), LatencyMs > 0, is_boolean(Success), is_map(Meta) ->
    case persistent_term:get(?INGEST(ModelId), []) of
        [] -> ok;
        Sinks ->
            Only = maps:get(experiment, Meta, any),
            %% every value is checked before the first add: bad input records nothing
            Adds = [{Ref, Base, custom_value(Custom, Meta)}
                    || {TestId, Ref, Base, Custom} <- Sinks, Only =:= any orelse Only =:= TestId],
            lists:foreach(fun({Ref, Base, C}) ->
                                  dspex_models_stats:ingest(Ref, Base, LatencyMs, Success, C)
                          end, Adds)
    end;
record_inference(_, _, _, _) -> erlang:error(badarg).

custom_value(undefined, _) -> undefined;
custom_value(Name, Meta) ->
    case Meta of
        #{Name := V} when is_number(V), V >= -1000, V =< 1000 -> V;
        #{Name := V} when is_number(V) -> erlang:error(badarg);
        _ -> undefined
    end.

%%% ------------------------------------------------------------------
%%% Experiments and rollouts (dspex_models_server)
%%% ------------------------------------------------------------------

%% @doc Starts an A/B test; see `dspex_models_server:start_ab_test/1'.
-spec start_ab_test(map()) -> {ok, binary()} | {error, term()}.
start_ab_test(Spec) -> dspex_models_server:start_ab_test(Spec).

%% @doc The current statistics and decision of a test or rollout.
-spec results(binary()) -> {ok, map()} | {error, term()}.
results(Id) -> dspex_models_server:results(Id).

%% @doc Stops a test by hand (decision `stopped', reason `manual').
-spec stop_test(binary()) -> ok | {error, term()}.
stop_test(Id) -> dspex_models_server:stop_test(Id).

%% @doc `stop_test/1' on behalf of `#{principal => binary(), changed_by =>
%% term()}' (recorded in the metadata of its event-log record; likewise for
%% `pause/2', `resume/2', `rollback/2').
-spec stop_test(binary(), map()) -> ok | {error, term()}.
stop_test(Id, By) -> dspex_models_server:stop_test(Id, By).

%% @doc Every test and rollout: id → status.
-spec list_tests() -> #{binary() => map()}.
list_tests() -> dspex_models_server:list_tests().

%% @doc Starts a gradual rollout of `NewModelId' for `Name' against its
%% `production' model; see `dspex_models_server:start_rollout/3'.
-spec start_rollout(binary(), model_id(), map()) -> {ok, binary()} | {error, term()}.
start_rollout(Name, New, Opts) -> dspex_models_server:start_rollout(Name, New, Opts).

%% @doc A rollout's state (`results/1' works too).
-spec rollout_status(binary()) -> {ok, map()} | {error, term()}.
rollout_status(Id) -> dspex_models_server:results(Id).

%% @doc Pauses a rollout: its traffic split stays, it neither advances nor
%% rolls back automatically.
-spec pause(binary()) -> ok | {error, term()}.
pause(Id) -> dspex_models_server:pause(Id).

%% @doc `pause/1' on behalf of someone (see `stop_test/2').
-spec pause(binary(), map()) -> ok | {error, term()}.
pause(Id, By) -> dspex_models_server:pause(Id, By).

%% @doc Resumes a paused rollout.
-spec resume(binary()) -> ok | {error, term()}.
resume(Id) -> dspex_models_server:resume(Id).

%% @doc `resume/1' on behalf of someone (see `stop_test/2').
-spec resume(binary(), map()) -> ok | {error, term()}.
resume(Id, By) -> dspex_models_server:resume(Id, By).

%% @doc Rolls a rollout back by hand: all traffic to the baseline.
-spec rollback(binary()) -> ok | {error, term()}.
rollback(Id) -> dspex_models_server:rollback(Id).

%% @doc `rollback/1' on behalf of someone (see `stop_test/2').
-spec rollback(binary(), map()) -> ok | {error, term()}.
rollback(Id, By) -> dspex_models_server:rollback(Id, By).

%% @doc Evaluates every running test and rollout now (otherwise done every
%% `models_check_interval_ms', default 1000) and returns when done;
%% `{error, {retry, _}}' while the node running the tests cannot be reached.
-spec evaluate() -> ok | {error, term()}.
evaluate() -> dspex_models_server:evaluate().

%%% ------------------------------------------------------------------

%% @doc Creates the registry's store session if it does not exist yet.
-spec ensure_session() -> ok.
ensure_session() ->
    case dspex_store:get_session(?SESSION) of
        {ok, _} -> ok;
        {error, session_not_found} ->
            {ok, _} = dspex_store:create_session(?SESSION, #{ttl => infinity}),
            ok
    end.

valid_part(B) when is_binary(B), byte_size(B) > 0, byte_size(B) =< 200 ->
    binary:match(B, [<<"@">>, <<":">>, <<"*">>, <<"?">>]) =:= nomatch
        andalso unicode:characters_to_binary(B) =:= B;
valid_part(_) -> false.

alias_bin(A) when is_atom(A) -> atom_to_binary(A);
alias_bin(A) when is_binary(A), byte_size(A) > 0 -> A;
alias_bin(_) -> erlang:error(badarg).

model_var(Id) -> <<"model:", Id/binary>>.
alias_var(Name, Alias) -> <<"alias:", Name/binary, ":", Alias/binary>>.

to_model(#{value := Id, metadata := M}) ->
    #{id => Id, name => maps:get(name, M), version => maps:get(version, M),
      artifact => maps:get(artifact, M, undefined), params => maps:get(params, M, #{}),
      metadata => maps:get(user_metadata, M, #{}), status => maps:get(status, M, active),
      registered_at => maps:get(registered_at, M, 0)}.

event(Op, Meta) ->
    dspex_telemetry:execute([dspex, models, Op], #{count => 1}, Meta).
