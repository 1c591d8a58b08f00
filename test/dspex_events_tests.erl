%% EUnit + PropEr: the event log (dspex_events) against the store.
-module(dspex_events_tests).
-include_lib("eunit/include/eunit.hrl").
%% Debian's erlang-proper ships without proper.hrl: the one macro used
-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-import(proper_types, [oneof/1, elements/1, integer/2, non_empty/1, list/1]).

-define(T(Name), {atom_to_list(Name), {timeout, 120, fun Name/0}}).

events_test_() ->
    {setup, fun start/0, fun stop/1,
     [?T(the_configured_backend_is_used),
      ?T(every_store_change_is_one_event_in_commit_order),
      ?T(session_deleted_reasons),
      ?T(sequences_gapless_under_8_writers_and_atomic_batches),
      ?T(sync_write_returns_after_its_event_is_durable),
      ?T(append_read_filters_and_directions),
      ?T(fold_streams_pages_in_order),
      ?T(subscribe_switch_over_no_gap_no_duplicate),
      ?T(slow_subscriber_is_told_and_dropped),
      ?T(state_at_equals_export_for_random_histories),
      ?T(state_at_by_time_and_snapshots),
      ?T(snapshot_at_every_multiple_equals_export),
      ?T(snapshotter_starts_from_the_state_it_kept),
      ?T(state_event_types_are_the_stores_and_a_malformed_one_is_ignored),
      ?T(take_kept_takes_a_sessions_events_up_to_a_sequence),
      ?T(replay_folds_runs_of_updates),
      ?T(put_snapshots_stores_each),
      ?T(state_at_equals_export_for_runs_of_updates),
      ?T(await_returns_after_the_listener_was_told),
      ?T(replay_decodes_data_as_binary_to_term),
      ?T(audit_trail_summary),
      ?T(archive_round_trip),
      ?T(expire_never_deletes_an_event_it_did_not_archive),
      ?T(archive_reads_apply_every_filter_as_the_log),
      ?T(archive_file_is_gzip_members_readable_as_one_stream),
      ?T(retention_pass_runs_beside_the_server),
      ?T(a_retention_pass_that_dies_deletes_nothing_it_did_not_archive),
      ?T(queued_retention_passes_each_run),
      ?T(writes_made_as_a_principal_name_it_in_their_events),
      ?T(erlang_side_events),
      ?T(same_edge_again_logs_nothing),
      ?T(ids_grow_with_positions),
      ?T(bad_arguments_are_errors),
      ?T(a_big_append_runs_off_the_normal_scheduler),
      ?T(json_term_of_any_term),
      ?T(prometheus_and_telemetry),
      ?T(first_events_never_ask_the_backend_on_the_commit_path),
      ?T(copies_of_another_nodes_events_and_copy_deletions),
      ?T(updated_event_data_for_every_value_kind),
      ?T(only_the_session_reads_its_log),
      ?T(reading_the_log_takes_a_token)]
     %% PostgreSQL only (make test-events-pg): the server is stopped mid-run
     ++ [T || pg_ctl() =/= false, T <- [?T(postgres_down_spools_then_catches_up_in_order),
                                        ?T(postgres_down_at_a_sessions_first_event_loses_nothing)]]}.

%% An unnamed node's log lives for the VM's life: in the temp dir, removed at
%% a clean stop, and a dead VM's leftover is swept at the next start.
unnamed_node_log_is_ephemeral_test_() ->
    {timeout, 60, fun unnamed_node_log_is_ephemeral/0}.

unnamed_node_log_is_ephemeral() ->
    ?assertEqual(nonode@nohost, node()),
    Root = filename:join(case os:getenv("TMPDIR") of
                             T when is_list(T), T =/= "" -> T;
                             _ -> "/tmp"
                         end, "dspex_events"),
    Mine = filename:join(Root, "vm-" ++ os:getpid()),
    %% a VM that died without stopping: a pid that cannot be alive
    Dead = filename:join(Root, "vm-999999999"),
    ok = filelib:ensure_dir(filename:join(Dead, "events.db")),
    ok = file:write_file(filename:join(Dead, "events.db"), <<"left over">>),
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    Saved = [{K, application:get_env(dspex_bridge, K)} || K <- [event_dir, event_backend, grpc_enabled, prometheus_enabled]],
    application:unset_env(dspex_bridge, event_dir),
    application:unset_env(dspex_bridge, event_backend),
    application:set_env(dspex_bridge, grpc_enabled, false),
    application:set_env(dspex_bridge, prometheus_enabled, false),
    try
        {ok, _} = application:ensure_all_started(dspex_bridge),
        ?assertNot(filelib:is_dir(Dead)),
        S = sid(),
        {ok, _} = dspex_store:create_session(S),
        {ok, _} = dspex_store:register(S, a, integer, 1),
        ok = dspex_events:await(),
        ?assert(filelib:is_regular(filename:join(Mine, "events.db"))),
        ?assertMatch({ok, [#{type := session_created}, #{type := variable_registered}]},
                     dspex_events:read(S, #{})),
        ok = application:stop(dspex_bridge),
        ?assertNot(filelib:is_dir(Mine))
    after
        _ = application:stop(dspex_bridge),
        _ = file:del_dir_r(Dead),
        [case V of
             {ok, X} -> application:set_env(dspex_bridge, K, X);
             undefined -> application:unset_env(dspex_bridge, K)
         end || {K, V} <- Saved]
    end.

%% dspex_store:set/3,4 decides the event log's durability in the commit's NIF
%% call (dx_events_settle): the guarantees of dspex_events:durable/2 hold. The
%% writer lingers 10 s here, so only a caller's wait makes it write: an
%% event is durable when a set returns only if that set waited for it.
commit_settles_durability_test_() ->
    {timeout, 120, fun commit_settles_durability/0}.

commit_settles_durability() ->
    Cap = 8,
    Env = #{event_queue_capacity => Cap, event_flush_interval_ms => 10000}, %% the longest linger
    with_log(Env#{event_durability => async},
             fun() ->
                     S = sid(),
                     {ok, _} = dspex_store:create_session(S),
                     {ok, _} = dspex_store:register(S, x, integer, 0),
                     ok = dspex_events:await(),
                     %% async: back-pressure past the high-water mark. Without it the
                     %% queue would hold all 40 events (nothing else makes the writer write)
                     Depths = [begin
                                   {ok, _} = dspex_store:set(S, x, N),
                                   maps:get(depth, dspex_events:stats())
                               end || N <- lists:seq(1, 5 * Cap)],
                     ?assert(lists:max(Depths) < Cap),
                     ?assert(lists:member(Cap - 1, Depths)),          %% async below the mark: no wait
                     ?assert(lists:any(fun(D) -> D =< Cap div 2 end, Depths)), %% waited down to the low mark
                     %% sync per call: returns once its event is durable
                     {ok, _} = dspex_store:set(S, x, 100),
                     ?assertMatch(#{depth := D} when D > 0, dspex_events:stats()),
                     {ok, V} = dspex_store:set(S, x, 101, #{durability => sync}),
                     ?assertMatch(#{depth := 0}, dspex_events:stats()),
                     ?assertMatch({ok, [#{type := variable_updated, data := #{value := 101, version := V}}]},
                                  dspex_events:read(S, #{since => {sequence, V + 2}})),
                     %% a big value goes to a dirty scheduler: the durability goes with it
                     {ok, _} = dspex_store:register(S, big, string, <<>>),
                     {ok, _} = dspex_store:set(S, x, 102),
                     #{var_set := R0} = dspex_nif:sched_stats(),
                     Big = binary:copy(<<"b">>, (1 bsl 20) + 1),
                     {ok, _} = dspex_store:set(S, big, Big, #{durability => sync}),
                     ?assertMatch(#{var_set := R1} when R1 =:= R0 + 1, dspex_nif:sched_stats()),
                     ?assertMatch(#{depth := 0}, dspex_events:stats()),
                     %% watch messages too many for a normal scheduler: their drain
                     %% goes on on a dirty scheduler (enif_schedule_nif), with the
                     %% settled answer (settling the rescheduled call's return
                     %% value instead crashed the VM)
                     {ok, _} = dspex_store:register(S, e, embedding, [float(I) || I <- lists:seq(1, 30000)]),
                     Self = self(),
                     Ws = [spawn_link(fun() -> receive {dspex_variable, _, _, _, _, N, _} -> Self ! {seen, self(), N} end end)
                           || _ <- lists:seq(1, 20)],
                     [true = is_reference(dspex_store:watch(S, [e], W)) || W <- Ws],
                     #{notify_rescheduled := N0} = dspex_nif:sched_stats(),
                     {ok, EV} = dspex_store:set(S, e, [1.0, 2.0], #{durability => sync}),
                     ?assertMatch(#{notify_rescheduled := N1} when N1 =:= N0 + 1, dspex_nif:sched_stats()),
                     ?assertMatch(#{depth := 0}, dspex_events:stats()),
                     [receive {seen, W, New} -> ?assertEqual([1.0, 2.0], New) end || W <- Ws],
                     {ok, _} = dspex_store:set(S, x, 103, #{durability => async}),
                     ?assertMatch({ok, #{version := EV}}, dspex_store:get(S, e)),
                     %% a failed write waits for nothing
                     ?assertMatch({error, _}, dspex_store:set(S, nope, 1, #{durability => sync})),
                     ?assertMatch(#{depth := 1}, dspex_events:stats())
             end),
    %% the log's default durability, sync: set/3 returns once its event is durable
    with_log(Env#{event_durability => sync},
             fun() ->
                     S = sid(),
                     {ok, _} = dspex_store:create_session(S),
                     {ok, _} = dspex_store:register(S, x, integer, 0),
                     [begin
                          {ok, _} = dspex_store:set(S, x, N),
                          ?assertMatch(#{depth := 0}, dspex_events:stats())
                      end || N <- lists:seq(1, 5)],
                     %% async per call under a sync default: no wait
                     {ok, _} = dspex_store:set(S, x, 6, #{durability => async}),
                     ?assertMatch(#{depth := 1}, dspex_events:stats())
             end).

%% Read-your-writes: the writer lingers 10 s here, so an async event is not
%% written by the time the read comes; the read, fold, audit trail and
%% state_at still see every event queued before them (they make the writer
%% write first).
reads_see_the_events_queued_before_them_test_() ->
    {timeout, 60, fun reads_see_the_events_queued_before_them/0}.

reads_see_the_events_queued_before_them() ->
    with_log(#{event_flush_interval_ms => 10000, event_durability => async},
             fun() ->
                     S = sid(),
                     {ok, _} = dspex_store:create_session(S),
                     {ok, _} = dspex_store:register(S, x, integer, 0),
                     {ok, 1} = dspex_store:set(S, x, 7),
                     ?assertMatch(#{depth := D} when D > 0, dspex_events:stats()),
                     {ok, Evs} = dspex_events:read(S, #{}),
                     ?assertEqual([session_created, variable_registered, variable_updated],
                                  [T || #{type := T} <- Evs]),
                     ?assertMatch(#{depth := 0}, dspex_events:stats()),
                     {ok, 2} = dspex_store:set(S, x, 8),
                     ?assertEqual({ok, 4}, dspex_events:fold(S, fun(_, N) -> N + 1 end, 0, #{})),
                     {ok, 3} = dspex_store:set(S, x, 9),
                     {ok, #{summary := #{by_type := #{variable_updated := 3}}}} =
                         dspex_events:audit_trail(#{session => S}),
                     {ok, 4} = dspex_store:set(S, x, 10),
                     {ok, Export} = dspex_store:export_session(S),
                     {ok, At} = dspex_events:state_at(S, {sequence, 6}),
                     ?assertEqual(maps:get(variables, Export), maps:get(variables, At))
             end).

%% Runs F with the application started on a fresh log with Env, then restores the env.
with_log(Env, F) ->
    Dir = "/tmp/dspex_events_eunit_settle_" ++ os:getpid(),
    _ = os:cmd("rm -rf " ++ Dir),
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    All = Env#{event_dir => Dir, grpc_enabled => false, prometheus_enabled => false},
    Saved = [{K, application:get_env(dspex_bridge, K)} || K <- maps:keys(All)],
    maps:foreach(fun(K, V) -> application:set_env(dspex_bridge, K, V) end, All),
    try
        {ok, _} = application:ensure_all_started(dspex_bridge),
        F()
    after
        _ = application:stop(dspex_bridge),
        _ = os:cmd("rm -rf " ++ Dir),
        [case V of
             {ok, X} -> application:set_env(dspex_bridge, K, X);
             undefined -> application:unset_env(dspex_bridge, K)
         end || {K, V} <- Saved]
    end.

pg_ctl() ->
    case {os:getenv("DX_EVENTS_PG_URL"), os:getenv("DX_PG_CTL")} of
        {U, C} when is_list(U), U =/= "", is_list(C), C =/= "" -> C;
        _ -> false
    end.

%% Writes with durability sync, the log's batches left to wait ten seconds (the longest linger): each
%% event is in the backend (read without read/2's wait) when its write returns.
sync_durability_per_call_test_() ->
    {setup, fun() -> start(#{event_flush_interval_ms => 10000}) end, fun stop/1,
     [?T(every_write_with_sync_returns_after_its_event_is_durable)]}.

sync_durability_default_test_() ->
    {setup, fun() -> start(#{event_flush_interval_ms => 10000, event_durability => sync}) end, fun stop/1,
     [?T(every_write_returns_after_its_event_is_durable_when_sync_is_the_default)]}.

start() -> start(#{}).

start(Env) ->
    Dir = "/tmp/dspex_events_eunit_" ++ os:getpid(),
    _ = os:cmd("rm -rf " ++ Dir),
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    application:set_env(dspex_bridge, event_dir, Dir),
    %% DX_EVENTS_PG_URL (set by `make test-events-pg', which starts a throwaway
    %% server with test/pg/pg_ctl.sh): the same suite against PostgreSQL
    case os:getenv("DX_EVENTS_PG_URL") of
        Url when is_list(Url), Url =/= "" ->
            application:set_env(dspex_bridge, event_backend, {postgres, Url});
        _ -> application:unset_env(dspex_bridge, event_backend)
    end,
    application:set_env(dspex_bridge, grpc_enabled, false),
    application:set_env(dspex_bridge, prometheus_enabled, false),
    application:set_env(dspex_bridge, snapshot_every, 10),
    %% the hourly retention (first 60 s after the start) never takes the old-dated
    %% events of the tests that run their own passes
    application:set_env(dspex_bridge, event_retention, {days, 36500}),
    maps:foreach(fun(K, V) -> application:set_env(dspex_bridge, K, V) end, Env),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    Dir.

stop(Dir) ->
    application:stop(dspex_bridge),
    application:unset_env(dspex_bridge, event_flush_interval_ms),
    application:unset_env(dspex_bridge, event_durability),
    application:set_env(dspex_bridge, snapshot_every, 100),
    application:set_env(dspex_bridge, event_retention, {days, 90}),
    application:unset_env(dspex_bridge, event_dir),
    application:unset_env(dspex_bridge, event_backend),
    application:set_env(dspex_bridge, grpc_enabled, true),
    application:set_env(dspex_bridge, prometheus_enabled, true),
    _ = os:cmd("rm -rf " ++ Dir),
    ok.

sid() -> iolist_to_binary(["ev_", integer_to_list(erlang:unique_integer([positive]))]).

%% Everything committed so far is durable and delivered to the server.
settle() ->
    ok = dspex_events:await(),
    %% the listener messages of those batches are handled before this call returns
    _ = sys:get_state(dspex_events),
    dspex_events:snapshots_sync().

events(S) ->
    settle(),
    {ok, Evs} = dspex_events:read(S, #{limit => 100000}),
    Evs.

types(S) -> [T || #{type := T} <- events(S)].

%% An application event's data and metadata are encoded and copied in the
%% append's NIF call: for a big one (16 MiB here, tens of ms) on a dirty
%% scheduler, not on the caller's normal one. The appender and a probe are
%% bound to scheduler 1; the appender yields first (a fresh time slice), lets
%% the probe go and appends. Before, the probe ran only once the append had
%% returned; now it runs while the dirty scheduler encodes.
a_big_append_runs_off_the_normal_scheduler() ->
    Big = binary:copy(<<"x">>, 16 bsl 20),
    S = sid(),
    Self = self(),
    Probe = spawn_opt(fun() -> receive go -> Self ! {probe, erlang:monotonic_time()} end end, [{scheduler, 1}]),
    _ = spawn_opt(fun() ->
                          erlang:yield(),
                          Probe ! go,
                          R = dspex_nif:events_append(S, big_app_event, Big, #{}),
                          Self ! {appended, erlang:monotonic_time(), R}
                  end, [{scheduler, 1}]),
    TProbe = receive {probe, T1} -> T1 end,
    {TAppended, R} = receive {appended, T2, R0} -> {T2, R0} end,
    ?assertMatch({ok, _, 1}, R),
    ?assert(TProbe < TAppended),
    %% small ones stay on the caller's scheduler; both are logged
    {ok, _, 2} = dspex_nif:events_append(S, small_app_event, #{n => 1}, #{}),
    ?assertMatch([#{type := big_app_event, data := Big}, #{type := small_app_event}], events(S)).

%% Under DX_EVENTS_PG_URL the events go to PostgreSQL: no SQLite file is created.
the_configured_backend_is_used() ->
    {ok, _} = dspex_events:append(sid(), e, x, #{durability => sync}),
    {ok, Dir} = application:get_env(dspex_bridge, event_dir),
    Sqlite = filelib:is_regular(filename:join(Dir, "events.db")),
    case application:get_env(dspex_bridge, event_backend) of
        {ok, {postgres, _}} -> ?assertNot(Sqlite);
        undefined -> ?assert(Sqlite)
    end.

every_store_change_is_one_event_in_commit_order() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:create_session(S), %% idempotent: no second event
    {ok, _} = dspex_store:register(S, a, integer, 1, #{changed_by => alice}),
    {ok, _} = dspex_store:register(S, b, float, 0.5),
    {ok, 1} = dspex_store:set(S, a, 2, #{changed_by => bob}),
    {error, _} = dspex_store:set(S, a, <<"x">>), %% refused: no event
    {ok, _} = dspex_store:set_many(S, #{a => 3, b => 1.5}, #{atomic => true}),
    {error, _} = dspex_store:set_many(S, #{a => 4, b => <<"bad">>}, #{atomic => true}),
    {ok, _} = dspex_store:set_many(S, #{a => 5}, #{atomic => false}),
    {ok, _} = dspex_store:rollback(S, a, 1),
    ok = dspex_store:delete(S, b),
    ok = dspex_store:delete_session(S),
    Evs = events(S),
    ?assertEqual([session_created, variable_registered, variable_registered, variable_updated,
                  variable_updated, variable_updated, batch_committed, variable_updated,
                  variable_rolled_back, variable_deleted, session_deleted],
                 [T || #{type := T} <- Evs]),
    ?assertEqual(lists:seq(1, 11), [N || #{sequence := N} <- Evs]),
    Ps = [P || #{position := P} <- Evs],
    ?assertEqual(lists:sort(Ps), Ps),
    [_, _, _, Upd | _] = Evs,
    ?assertMatch(#{data := #{name := <<"a">>, old_value := 1, value := 2, version := 1, previous_version := 0},
                   metadata := #{changed_by := bob, node := _, principal := undefined, request_id := undefined}},
                 Upd),
    #{data := #{members := Members}} = lists:nth(7, Evs),
    ?assertEqual([#{name => <<"a">>, version => 2}, #{name => <<"b">>, version => 1}], lists:sort(Members)),
    ?assertMatch(#{data := #{reason := deleted}}, lists:last(Evs)),
    %% ids are UUIDv7 and sort like positions
    Ids = [Id || #{id := Id} <- Evs],
    ?assertEqual(lists:sort(Ids), Ids),
    [?assertMatch(<<_:8/binary, "-", _:4/binary, "-7", _/binary>>, Id) || Id <- Ids].

session_deleted_reasons() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S, #{ttl => 1}),
    ok = dspex_test_hooks:enable(),
    ok = dspex_nif:advance_clock(5000),
    _ = dspex_nif:sweep(),
    ?assertMatch([#{type := session_created}, #{type := session_deleted, data := #{reason := expired}}], events(S)),
    %% the same id again continues the sequence
    {ok, _} = dspex_store:create_session(S),
    ?assertEqual([1, 2, 3], [N || #{sequence := N} <- events(S)]).

%% A replica's copies of its owner's events (dspex_cluster): the owner's
%% sequence (which must continue the session's), id, time and node; a copy
%% deleted without an event, or with reason migrated (and state_at goes on).
copies_of_another_nodes_events_and_copy_deletions() ->
    S = sid(),
    Id = <<"0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b">>,
    ?assertEqual({error, {sequence_gap, 0}},
                 dspex_nif:events_append(S, checkpoint, #{n => 0}, #{}, #{sequence => 2})),
    {ok, Id, 1, 1700000000000000} =
        dspex_nif:events_append(S, checkpoint, #{n => 1}, #{principal => <<"p">>},
                                #{sequence => 1, id => Id, timestamp => 1700000000000000, node => <<"owner@h">>}),
    ?assertEqual({error, {sequence_gap, 1}}, dspex_nif:events_append(S, checkpoint, #{}, #{}, #{sequence => 3})),
    {ok, _, 2, _} = dspex_nif:events_append(S, checkpoint, #{n => 2}, #{}, #{}),
    [?assertError(badarg, dspex_nif:events_append(S, checkpoint, #{}, #{}, As))
     || As <- [#{sequence => 0}, #{id => <<"short">>}, #{timestamp => -1}, #{node => 7}, not_a_map]],
    ?assertMatch([#{id := Id, sequence := 1, timestamp := 1700000000000000, data := #{n := 1},
                    metadata := #{node := <<"owner@h">>, principal := <<"p">>}},
                  #{sequence := 2}], events(S)),
    %% copies of the events read back are equal to them (a second log)
    S2 = sid(),
    Evs = [E#{session := S2} || E <- events(S)],
    ok = dspex_events:copy_events(Evs),
    ?assertEqual([maps:without([session, position], E) || E <- Evs],
                 [maps:without([session, position], E) || E <- events(S2)]),
    %% deletions of a copy
    S3 = sid(),
    {ok, _} = dspex_store:create_session(S3),
    {ok, _} = dspex_store:register(S3, x, integer, 1),
    ok = dspex_events:delete_copy(S3, silent),
    ?assertEqual([session_created, variable_registered], types(S3)),
    {ok, _} = dspex_store:create_session(S3),
    ok = dspex_events:delete_copy(S3, migrated),
    case dspex_events:shared_backend() of
        true ->
            %% one database for every node: the session's history goes on there
            ?assertMatch([_, _, #{type := session_created}], events(S3));
        false ->
            ?assertMatch([_, _, #{type := session_created},
                          #{type := session_deleted, data := #{reason := migrated}}], events(S3)),
            %% a migrated deletion does not end the session for time travel
            ?assertMatch({ok, #{variables := []}}, dspex_events:state_at(S3, {sequence, 4}))
    end,
    ?assertEqual({error, session_not_found}, dspex_events:delete_copy(S3, migrated)),
    ?assertError(badarg, dspex_nif:events_session_delete(S3, other)),
    {ok, _} = dspex_store:create_session(S3),
    ok = dspex_nif:events_session_delete(S3, migrated),
    ?assertMatch(#{type := session_deleted, data := #{reason := migrated}}, lists:last(events(S3))),
    ?assertEqual({error, not_found}, dspex_events:state_at(sid(), {sequence, 1})),
    %% the empty id is no session (the replay NIF raised badarg for it)
    ?assertEqual({error, {invalid_argument, session}}, dspex_events:state_at(<<>>, {sequence, 1})),
    ?assertEqual({error, {invalid_argument, session}}, dspex_events:state_at(<<>>, {time, 1}, #{})).

sequences_gapless_under_8_writers_and_atomic_batches() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    [{ok, _} = dspex_store:register(S, integer_to_binary(I), integer, 0) || I <- lists:seq(1, 8)],
    pmap(8, fun(I) ->
                    K = integer_to_binary(I),
                    [case N rem 5 of
                         0 -> {ok, _} = dspex_store:set_many(S, #{K => N, integer_to_binary(I rem 8 + 1) => N},
                                                             #{atomic => true});
                         _ -> {ok, _} = dspex_store:set(S, K, N)
                     end || N <- lists:seq(1, 200)]
            end),
    Evs = events(S),
    ?assertEqual(lists:seq(1, length(Evs)), [N || #{sequence := N} <- Evs]),
    %% every batch_committed directly follows its members' updates
    check_batches(Evs),
    %% every committed version appears once per variable, in version order
    ByVar = lists:foldl(fun(#{type := variable_updated, data := #{name := N, version := V}}, M) ->
                                maps:update_with(N, fun(L) -> [V | L] end, [V], M);
                           (_, M) -> M
                        end, #{}, Evs),
    maps:foreach(fun(Name, Vs) ->
                         {ok, #{version := Cur}} = dspex_store:get(S, Name),
                         ?assertEqual(lists:seq(1, Cur), lists:reverse(Vs))
                 end, ByVar).

check_batches([]) -> ok;
check_batches([#{type := variable_updated}, #{type := variable_updated}, #{type := batch_committed} | T]) ->
    check_batches(T);
check_batches([#{type := batch_committed} = B | _]) -> erlang:error({batch_not_after_members, B});
check_batches([_ | T]) -> check_batches(T).

pmap(N, F) ->
    Refs = [element(2, spawn_monitor(fun() -> F(I) end)) || I <- lists:seq(1, N)],
    [receive {'DOWN', R, process, _, Why} -> ?assertEqual(normal, Why) end || R <- Refs],
    ok.

%% variable_updated / variable_rolled_back data is written to external term format directly (not through
%% built terms): for every scalar value kind, integers of every encoding size, floats, metadata and
%% changed_by of any term, the stored map is exact (=:=), and each event's `previous' is the event
%% before it. Embeddings take the term path: the same checks hold.
updated_event_data_for_every_value_kind() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    Big = 1 bsl 62,
    Cases = [{i, integer, 0, [255, 256, -1, -129, 1 bsl 31 - 1, 1 bsl 31, -(1 bsl 31), -(1 bsl 31) - 1,
                              Big, -Big, 9223372036854775807, -9223372036854775808]},
             {f, float, 0.0, [1.5, -0.0, 1.0e300, -2.5e-300, 3.0]},
             {b, boolean, false, [true, false]},
             {s, string, <<>>, [<<"h\xc3\xa9llo">>, <<0, 1, 127>>, binary:copy(<<"x">>, 70000)]},
             {e, embedding, [0.0, 0.0], [[1.0, 2.0], [-1.5, 1.0e10]]}],
    Bys = [undefined, opt1, <<"run-7">>, {trial, 3}, [a, "b"]],
    [begin
         {ok, _} = dspex_store:register(S, K, T, V0),
         lists:foldl(fun(V, I) ->
                             By = lists:nth(I rem length(Bys) + 1, Bys),
                             {ok, _} = dspex_store:set(S, K, V, #{changed_by => By, metadata => #{step => I, tag => {x, I}}}),
                             I + 1
                     end, 1, Vs)
     end || {K, T, V0, Vs} <- Cases],
    {ok, RbV} = dspex_store:rollback(S, i, 2, #{changed_by => rb}),
    ok = dspex_events:await(),
    {ok, Evs} = dspex_events:read(S, #{types => [variable_updated, variable_rolled_back]}),
    [begin
         Name = atom_to_binary(K),
         Mine = [D || #{data := #{name := N} = D} <- Evs, N =:= Name],
         Expected = Vs ++ case K of i -> [256]; _ -> [] end,  %% register is version 0: version 2 held 256
         ?assertEqual(length(Expected), length(Mine)),
         [?assertEqual({K, V}, {K, maps:get(value, D)}) || {V, D} <- lists:zip(Expected, Mine)],
         check_chain(V0, Mine)
     end || {K, _, V0, Vs} <- Cases],
    [#{data := Rb}] = [E || #{type := variable_rolled_back} = E <- Evs],
    ?assertMatch(#{changed_by := rb, value := 256, old_value := -9223372036854775808}, Rb),
    ?assertEqual(RbV, maps:get(version, Rb)).

check_chain(V0, [D1 | _] = Ds) ->
    ?assert(V0 =:= maps:get(old_value, D1)),
    ?assert(V0 =:= maps:get(value, maps:get(previous, D1))),
    lists:foldl(fun(D, Prev) ->
                        #{id := Id, name := Name, version := V, previous_version := PV, updated_at := U,
                          metadata := M, changed_by := _, previous := P, old_value := Old} = D,
                        ?assert(is_binary(Id) andalso is_binary(Name) andalso is_integer(U) andalso is_map(M)),
                        ?assertEqual(V, PV + 1),
                        ?assertEqual(lists:sort([changed_by, metadata, updated_at, value, version]),
                                     lists:sort(maps:keys(P))),
                        ?assertEqual(10, map_size(D)),
                        case Prev of
                            none -> ok;
                            #{} ->
                                ?assert(maps:get(value, Prev) =:= Old),
                                ?assert(maps:with([changed_by, metadata, updated_at, value, version], Prev) =:= P)
                        end,
                        case maps:get(metadata, D) of
                            #{step := I} -> ?assertEqual({x, I}, maps:get(tag, M));
                            _ -> ok
                        end,
                        D
                end, none, Ds),
    ok.

sync_write_returns_after_its_event_is_durable() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    pmap(16, fun(I) ->
                     [begin
                          {ok, V} = dspex_store:set(S, x, I * 1000 + N, #{durability => sync}),
                          %% its event is already in the log (reads see only committed, fsynced rows)
                          {ok, Recent} = dspex_events:read(S, #{variable => <<"x">>, limit => 100000}),
                          true = lists:any(fun(#{data := #{version := V1}}) -> V1 =:= V end, Recent)
                      end || N <- lists:seq(1, 20)]
             end),
    {ok, Id} = dspex_events:append(S, custom, #{}, #{durability => sync}),
    {ok, [#{id := Id}]} = dspex_events:read(S, #{direction => backward, limit => 1}),
    ?assertEqual(16 * 20 + 3, length(events(S))).

append_read_filters_and_directions() ->
    S = sid(),
    %% each event in a microsecond of its own (a session's times never go
    %% back but can repeat): the time filters below tell them apart
    {ok, Id1} = dspex_events:append(S, my_event, #{n => 1}, #{principal => <<"alice">>, request_id => <<"r1">>}),
    ok = clock_past(os:system_time(microsecond)),
    {ok, _} = dspex_events:append(S, <<"other_type_not_an_atom">>, #{n => 2}, #{principal => <<"bob">>, variable => v}),
    ok = clock_past(os:system_time(microsecond)),
    {ok, _} = dspex_events:append(S, my_event, #{n => 3}, #{changed_by => {opt, 7}}),
    settle(),
    {ok, [E1, E2, E3]} = dspex_events:read(S, #{}),
    ?assertMatch(#{id := Id1, type := my_event, data := #{n := 1}, sequence := 1,
                   metadata := #{principal := <<"alice">>, request_id := <<"r1">>}}, E1),
    ?assertMatch(#{type := <<"other_type_not_an_atom">>, metadata := #{variable := <<"v">>}}, E2),
    ?assertMatch(#{metadata := #{changed_by := {opt, 7}}}, E3),
    ?assertMatch({ok, [#{sequence := 1}, #{sequence := 3}]}, dspex_events:read(S, #{types => [my_event]})),
    ?assertMatch({ok, [#{sequence := 2}]}, dspex_events:read(S, #{principal => <<"bob">>})),
    ?assertMatch({ok, [#{sequence := 2}]}, dspex_events:read(S, #{variable => <<"v">>})),
    ?assertMatch({ok, [#{sequence := 2}, #{sequence := 3}]}, dspex_events:read(S, #{since => {sequence, 2}})),
    ?assertMatch({ok, [#{sequence := 3}, #{sequence := 2}]},
                 dspex_events:read(S, #{since => {sequence, 2}, direction => backward})),
    ?assertMatch({ok, [#{sequence := 3}]}, dspex_events:read(S, #{direction => backward, limit => 1})),
    #{timestamp := T2} = E2,
    ?assertMatch({ok, [#{sequence := 1}, #{sequence := 2}]}, dspex_events:read(S, #{until => T2})),
    ?assertMatch({ok, [#{sequence := 2}, #{sequence := 3}]}, dspex_events:read(S, #{since => {time, T2}})).

fold_streams_pages_in_order() ->
    S = sid(),
    [{ok, _} = dspex_events:append(S, e, N, #{}) || N <- lists:seq(1, 2500)],
    settle(),
    {ok, L} = dspex_events:fold(S, fun(#{data := N}, Acc) -> [N | Acc] end, [], #{}),
    ?assertEqual(lists:seq(2500, 1, -1), L),
    {ok, L2} = dspex_events:fold(S, fun(#{data := N}, Acc) -> [N | Acc] end, [], #{direction => backward}),
    ?assertEqual(lists:seq(1, 2500), L2).

subscribe_switch_over_no_gap_no_duplicate() ->
    S = sid(),
    [{ok, _} = dspex_events:append(S, e, N, #{}) || N <- lists:seq(1, 700)],
    settle(),
    Self = self(),
    {ok, [#{position := First}]} = dspex_events:read(S, #{limit => 1}),
    {ok, Ref} = dspex_events:subscribe(#{session => S}, Self, #{from => First}),
    %% live writes while the catch-up runs
    pmap(4, fun(I) -> [{ok, _} = dspex_events:append(S, e, 1000 * I + N, #{}) || N <- lists:seq(1, 100)] end),
    settle(),
    Got = collect(Ref, 1100),
    ?assertEqual(lists:seq(1, 1100), [N || #{sequence := N} <- Got]),
    {ok, All} = dspex_events:read(S, #{limit => 100000}),
    ?assertEqual([P || #{position := P} <- All], [P || #{position := P} <- Got]),
    ok = dspex_events:unsubscribe(Ref),
    %% live only: nothing from before
    {ok, Ref2} = dspex_events:subscribe(#{session => S, types => [live]}, Self, #{from => live}),
    {ok, _} = dspex_events:append(S, e, x, #{}),
    {ok, _} = dspex_events:append(S, live, y, #{}),
    settle(),
    ?assertMatch([#{data := y, sequence := 1102}], collect(Ref2, 1)),
    ok = dspex_events:unsubscribe(Ref2).

collect(_, 0) -> [];
collect(Ref, N) ->
    receive {dspex_event, Ref, E} -> [E | collect(Ref, N - 1)]
    after 30000 -> erlang:error({missing_events, N})
    end.

slow_subscriber_is_told_and_dropped() ->
    S = sid(),
    Self = self(),
    Slow = spawn_link(fun() -> receive go -> ok end,
                               Self ! {slow_got, drain([])} end),
    {ok, Ref} = dspex_events:subscribe(#{session => S}, Slow, #{from => live, max_queue => 50}),
    [{ok, _} = dspex_events:append(S, e, N, #{}) || N <- lists:seq(1, 2000)],
    settle(),
    Slow ! go,
    receive {slow_got, Msgs} ->
            {Events, Overflow} = lists:partition(fun(M) -> element(1, M) =:= dspex_event end, Msgs),
            ?assertMatch([{dspex_event_overflow, Ref, _}], Overflow),
            [{_, _, Last}] = Overflow,
            Ps = [P || {dspex_event, _, #{position := P}} <- Events],
            ?assertEqual(lists:max(Ps), Last),
            ?assert(length(Events) < 2000),
            %% resuming from Last + 1 gives the rest with no gap
            {ok, Ref2} = dspex_events:subscribe(#{session => S}, self(), #{from => Last + 1}),
            Rest = collect(Ref2, 2000 - length(Events)),
            ?assertEqual(lists:seq(1, 2000), [N || {dspex_event, _, #{sequence := N}} <- Events]
                                                 ++ [N || #{sequence := N} <- Rest]),
            ok = dspex_events:unsubscribe(Ref2)
    end.

drain(Acc) ->
    receive M -> drain([M | Acc]) after 500 -> lists:reverse(Acc) end.

%% PropEr: for random histories, state_at({sequence, N}) equals the store's
%% export taken right after the change that produced event N.
state_at_equals_export_for_random_histories() ->
    ?assert(proper:quickcheck(prop_state_at(), [{numtests, list_to_integer(os:getenv("DSPEX_PROP_EVENTS_N", "40"))},
                                                {to_file, user}])).

op() ->
    oneof([{register, elements([a, b, c, d]), elements([integer, float, string])},
           {set, elements([a, b, c, d]), integer(-5, 5)},
           {many, elements([a, b, c, d]), elements([a, b, c, d]), integer(0, 9)},
           {rollback, elements([a, b, c, d]), integer(0, 3)},
           {delete, elements([a, b, c, d])}]).

prop_state_at() ->
    ?FORALL(Ops, non_empty(list(op())),
            begin
                S = sid(),
                {ok, _} = dspex_store:create_session(S),
                Exports = [begin
                               _ = apply_op(S, Op),
                               {ok, E} = dspex_nif:export_session(S),
                               {dspex_nif:events_session_seq(S), E}
                           end || Op <- Ops],
                states_at_equal_exports(S, Exports)
            end).

%% Once the log has everything: state_at/2 at each {Sequence, Export} taken
%% right after that sequence's change equals the export (false, and the
%% first difference printed, otherwise).
states_at_equal_exports(S, Exports) ->
    settle(),
    lists:all(fun({Seq, E}) ->
                      case dspex_events:state_at(S, {sequence, Seq}) of
                          {ok, E} -> true;
                          Other -> io:format("seq ~p:~n~p~n~p~n", [Seq, E, Other]), false
                      end
              end, Exports).

apply_op(S, {register, K, T}) ->
    dspex_store:register(S, K, T, case T of integer -> 1; float -> 1.5; string -> <<"s">> end,
                         #{history_limit => 2});
apply_op(S, {set, K, V}) -> dspex_store:set(S, K, V, #{changed_by => prop});
apply_op(S, {many, K1, K2, V}) -> dspex_store:set_many(S, #{K1 => V, K2 => V}, #{atomic => true});
apply_op(S, {rollback, K, V}) -> dspex_store:rollback(S, K, V);
apply_op(S, {delete, K}) -> dspex_store:delete(S, K).

state_at_by_time_and_snapshots() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    [{ok, _} = dspex_store:set(S, x, N) || N <- lists:seq(1, 55)],
    settle(),
    {ok, E1} = dspex_nif:export_session(S),
    settle(),
    %% the events' times are the OS clock's (CLOCK_REALTIME at the commit),
    %% which erlang:system_time/1 can be ahead of (time correction): T is
    %% read from the OS clock, and the next set's commit comes after it
    T = os:system_time(microsecond),
    ok = clock_past(T),
    {ok, _} = dspex_store:set(S, x, 99),
    settle(),
    %% snapshots every 10 events (this suite's snapshot_every) exist
    ?assertMatch({ok, 50, _, _}, dspex_nif:events_latest_snapshot(S, 55, 0)),
    ?assertEqual({ok, E1}, dspex_events:state_at(S, T)),
    ?assertEqual({ok, E1}, dspex_events:state_at(S, {time, T})),
    ?assertEqual({error, not_found}, dspex_events:state_at(<<"no_such_session">>, {sequence, 3})).

%% Returns once the OS clock reads more than T (microseconds).
clock_past(T) ->
    case os:system_time(microsecond) > T of
        true -> ok;
        false -> clock_past(T)
    end.

%% dspex_events:await/0 returns only once the listener has been told of the
%% batches it waited for: await + a call to the listener + snapshots_sync
%% finds the snapshot due at each multiple of snapshot_every (10 here).
%% The durability wait used to answer from the queue's own count, which the
%% writer thread moves before it tells the listener: this missed a snapshot
%% about once in a few thousand rounds (once in a full CI run).
await_returns_after_the_listener_was_told() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    Missing = lists:filtermap(
                fun(I) ->
                        Seq0 = dspex_nif:events_session_seq(S),
                        [{ok, _} = dspex_store:set(S, x, I * 100 + J) || J <- lists:seq(1, 10 - Seq0 rem 10)],
                        K = dspex_nif:events_session_seq(S),
                        ok = dspex_events:await(),
                        _ = sys:get_state(dspex_events),
                        ok = dspex_events:snapshots_sync(),
                        case dspex_nif:events_latest_snapshot(S, K, 0) of
                            {ok, K, _, _} -> false;
                            Other -> {true, {K, Other}}
                        end
                end, lists:seq(1, 300)),
    ?assertEqual([], Missing).

%% Every multiple of snapshot_every (10 here) gets a snapshot, also where the
%% event there does not change the state (an application's event), and each
%% equals the export taken right after that event, with histories cut to
%% their limit many times over (history_limit 3, 60 updates of one variable).
snapshot_at_every_multiple_equals_export() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 3}),
    {ok, _} = dspex_store:register(S, y, string, <<"a">>, #{history_limit => 0}),
    Seq = fun() -> dspex_nif:events_session_seq(S) end,
    Step = fun(I) ->
                   %% the event before a multiple of 10 is followed by an application's event
                   case (Seq() + 1) rem 10 of
                       0 -> {ok, _} = dspex_events:append(S, note, #{i => I}, #{});
                       _ when I rem 3 =:= 0 -> {ok, _} = dspex_store:set(S, y, integer_to_binary(I));
                       _ -> {ok, _} = dspex_store:set(S, x, I, #{changed_by => {step, I}})
                   end,
                   {ok, E} = dspex_nif:export_session(S),
                   {Seq(), E}
           end,
    Exports = [Step(I) || I <- lists:seq(1, 90)],
    settle(),
    Last = Seq(),
    {ok, Evs} = dspex_events:read(S, #{limit => 1000}),
    Ts = maps:from_list([{N, T} || #{sequence := N, timestamp := T} <- Evs]),
    Notes = [N || #{sequence := N, type := note} <- Evs],
    ?assert(length(Notes) >= 5),
    ?assert(lists:all(fun(N) -> N rem 10 =:= 0 end, Notes)),
    Multiples = [K || K <- lists:seq(10, Last, 10)],
    ?assertEqual(Last div 10, length(Multiples)),
    lists:foreach(
      fun(K) ->
              {ok, K, TsK, Snap} = dspex_nif:events_latest_snapshot(S, K, 0),
              ?assertEqual(maps:get(K, Ts), TsK),
              #{session := Sess, vars := Vs} = Snap,
              Export = Sess#{variables => [V || {_, V} <- lists:sort(maps:to_list(Vs))]},
              {K, Expected} = lists:keyfind(K, 1, Exports),
              ?assertEqual({K, Expected}, {K, Export}),
              ?assertEqual({ok, Expected}, dspex_events:state_at(S, {sequence, K}))
      end, [K || K <- Multiples, lists:keymember(K, 1, Exports)]),
    %% the last variable state went through many cuts of its history
    {ok, #{variables := [#{name := <<"x">>, history := HX}, #{name := <<"y">>, history := []}]}} =
        dspex_events:state_at(S, {sequence, Last}),
    ?assertEqual(3, length(HX)).

%% events_replay/7 lists a run of updates of one variable as one
%% {Seq, Ts, {updates, Count, Previous}, Data}: the last event's sequence,
%% time and data, and the `previous' of its last history_limit events
%% (newest first); a run ends at another variable's update, at an event that
%% changes the state otherwise, at a multiple of Mark (other events between
%% its updates do not end it); a variable the caller
%% did not give a limit for (and that was not registered in the call) is not
%% folded; an update whose data is not the writer's map is listed alone.
replay_folds_runs_of_updates() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 3}),   % 2
    {ok, _} = dspex_store:register(S, y, integer, 0, #{history_limit => 0}),   % 3
    [{ok, _} = dspex_store:set(S, x, I) || I <- lists:seq(1, 12)],             % 4..15
    {ok, _} = dspex_events:append(S, note, 1, #{}),                            % 16
    [{ok, _} = dspex_store:set(S, x, I) || I <- lists:seq(13, 14)],            % 17, 18
    [{ok, _} = dspex_store:set(S, y, I) || I <- lists:seq(1, 4)],              % 19..22
    {ok, _} = dspex_store:rollback(S, x, 13),                                  % 23
    {ok, _} = dspex_store:set(S, x, 100),                                      % 24
    %% not the writer's map (an extra key): listed alone (written as a log of an earlier build could hold
    %% it: append/4 refuses the store's types)
    {ok, _, _, _} = dspex_nif:events_append(S, variable_updated, #{name => <<"x">>, value => 7, old_value => 100, version => 99,
                                                         previous_version => 98, updated_at => 1, metadata => #{},
                                                         changed_by => app, previous => #{value => 0}, id => <<>>,
                                                         extra => 1}, #{}, #{}), % 25
    {ok, _} = dspex_store:set(S, x, 101),                                      % 26
    settle(),
    {ok, All, 26, 26} = dspex_nif:events_replay(S, 1, 0, 0, 1000, 10, []),
    Shape = [case T of
                 {updates, N, Ps} -> {Seq, updates, N, [V || #{value := V} <- Ps]};
                 _ -> {Seq, T}
             end || {Seq, _, T, _} <- All],
    ?assertEqual([{1, session_created}, {2, variable_registered}, {3, variable_registered},
                  {10, updates, 7, [6, 5, 4]}, {18, updates, 7, [13, 12, 11]}, {20, updates, 2, []}, {22, updates, 2, []},
                  {24, updates, 2, [13, 14]}, {25, variable_updated}, {26, variable_updated}], Shape),
    %% the last event's data, as events_replay/6 gives it
    {ok, Plain, 26, 26} = dspex_nif:events_replay(S, 1, 0, 0, 1000, 10),
    [?assertEqual(lists:keyfind(Seq, 1, Plain), {Seq, Ts, variable_updated, D}) || {Seq, Ts, {updates, _, _}, D} <- All],
    ?assertMatch(#{previous := #{value := 1}}, element(4, lists:keyfind(5, 1, Plain))),
    %% from the middle: the caller's limits; without them nothing is folded
    {ok, Mid, _, 26} = dspex_nif:events_replay(S, 5, 0, 0, 1000, 0, [{<<"x">>, 1}]),
    ?assertMatch([{18, _, {updates, 13, [#{value := 13}]}, #{value := 14}}, {19, _, variable_updated, _} | _], Mid),
    {ok, Unfolded, _, 26} = dspex_nif:events_replay(S, 5, 0, 0, 1000, 0, []),
    ?assertEqual(0, length([T || {_, _, {updates, _, _} = T, _} <- Unfolded])),
    ?assertError(badarg, dspex_nif:events_replay(S, 1, 0, 0, 10, 0, [{<<"x">>, -1}])),
    ?assertError(badarg, dspex_nif:events_replay(S, 1, 0, 0, 10, 0, nope)).

%% events_put_snapshots/1 (the snapshotter's, one transaction) stores each
%% snapshot as events_put_snapshot/4 does.
put_snapshots_stores_each() ->
    [A, B] = [sid(), sid()],
    ?assertEqual(ok, dspex_nif:events_put_snapshots([{A, 10, 5, #{n => 10}}, {A, 20, 6, #{n => 20}},
                                                     {B, 10, 7, [b]}])),
    ?assertEqual({ok, 10, 5, #{n => 10}}, dspex_nif:events_latest_snapshot(A, 19, 0)),
    ?assertEqual({ok, 20, 6, #{n => 20}}, dspex_nif:events_latest_snapshot(A, 0, 0)),
    ?assertEqual({ok, 10, 7, [b]}, dspex_nif:events_latest_snapshot(B, 0, 0)),
    ?assertEqual(ok, dspex_nif:events_put_snapshots([])),
    ?assertError(badarg, dspex_nif:events_put_snapshots([{A, -1, 0, x}])),
    ?assertError(badarg, dspex_nif:events_put_snapshots([{A, 1, 0}])),
    ?assertError(badarg, dspex_nif:events_put_snapshots(nope)),
    ?assertError(badarg, dspex_nif:events_put_snapshots([{A, I, 0, x} || I <- lists:seq(1, 1001)])),
    %% nothing of a bad list was stored
    ?assertEqual({ok, 20, 6, #{n => 20}}, dspex_nif:events_latest_snapshot(A, 0, 0)).

%% state_at equals the export for random histories made of runs of one
%% variable's updates (history limits 0-3, re-registered on the way, deleted,
%% rolled back, other events between them), from snapshots every 10 events.
state_at_equals_export_for_runs_of_updates() ->
    Op = proper_types:frequency([{12, {set, a, integer(-5, 5)}}, {3, {set, b, integer(-5, 5)}},
                                 {1, {register, elements([a, b]), integer(0, 3)}}, {1, {delete, elements([a, b])}},
                                 {1, {rollback, elements([a, b]), integer(0, 3)}}, {1, note}]),
    ?assert(proper:quickcheck(
              ?FORALL(Ops, non_empty(list(Op)),
                      begin
                          S = sid(),
                          {ok, _} = dspex_store:create_session(S),
                          Exports = [begin
                                         _ = case O of
                                                 {register, K, L} -> dspex_store:register(S, K, integer, 0, #{history_limit => L});
                                                 note -> dspex_events:append(S, note, 1, #{});
                                                 _ -> apply_op(S, O)
                                             end,
                                         {ok, E} = dspex_nif:export_session(S),
                                         {dspex_nif:events_session_seq(S), E}
                                     end || O <- [{register, a, 2}, {register, b, 1} | Ops]],
                          states_at_equal_exports(S, Exports)
                      end), [{numtests, list_to_integer(os:getenv("DSPEX_PROP_EVENTS_N", "40"))}, {to_file, user}])).

%% The snapshotter keeps the state of the last snapshot it stored for each
%% session (at most snapshot_cache_sessions, least recently stored evicted):
%% the next snapshots of a kept session start from it without reading the
%% stored one (events_latest_snapshot/3, call-traced in the snapshotter), a
%% session evicted reads it; every snapshot equals the export taken then.
snapshotter_starts_from_the_state_it_kept() ->
    #{snapshotter := P} = sys:get_state(dspex_events),
    erlang:trace_pattern({dspex_nif, events_latest_snapshot, 3}, true, [local]),
    erlang:trace(P, true, [call, {tracer, self()}]),
    Reads = fun() ->
                    settle(),
                    length(drain_traces(P, []))
            end,
    [A, B] = [sid(), sid()],
    Exports = fun(S, N) ->
                      [begin
                           {ok, _} = dspex_store:set(S, x, I, #{changed_by => {k, I}}),
                           {ok, E} = dspex_nif:export_session(S),
                           {dspex_nif:events_session_seq(S), E}
                       end || I <- lists:seq(1, N)]
              end,
    try
        [begin {ok, _} = dspex_store:create_session(S), {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 4}) end
         || S <- [A, B]],
        E0 = Exports(A, 18),
        ?assertEqual(1, Reads()),
        %% A kept: four more snapshots without a read
        E1 = Exports(A, 40),
        ?assertEqual(0, Reads()),
        %% one session kept: A and B take turns, each evicts the other
        application:set_env(dspex_bridge, snapshot_cache_sessions, 1),
        E2 = lists:append([begin E = Exports(S, 10), settle(), E end || _ <- [1, 2, 3], S <- [B, A]]),
        ?assertEqual(6, Reads()),
        application:set_env(dspex_bridge, snapshot_cache_sessions, 0),
        E3 = lists:append([begin E = Exports(A, 10), settle(), E end || _ <- [1, 2]]),
        ?assertEqual(2, Reads()),
        Snaps = [{K, E} || {K, E} <- E0 ++ E1 ++ E2 ++ E3, K rem 10 =:= 0],
        ?assertEqual(14, length(Snaps)),
        [begin
             #{id := Id} = E,
             {ok, K, _, #{session := Sess, vars := Vs}} = dspex_nif:events_latest_snapshot(Id, K, 0),
             ?assertEqual({K, E}, {K, Sess#{variables => [V || {_, V} <- lists:sort(maps:to_list(Vs))]}})
         end || {K, E} <- Snaps]
    after
        erlang:trace(P, false, [call]),
        erlang:trace_pattern({dspex_nif, events_latest_snapshot, 3}, false, [local]),
        application:unset_env(dspex_bridge, snapshot_cache_sessions)
    end.

%% append/4 refuses the types the store logs for its own changes (what
%% state_at/2 and the snapshots replay): an application's event of such a
%% type would make them differ from the store, or stop the snapshotter. A
%% malformed event of such a type already in a log (written before the
%% refusal, or by hand) is ignored by the replays, and every snapshot after it
%% is still stored and equals the export.
state_event_types_are_the_stores_and_a_malformed_one_is_ignored() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0, #{history_limit => 2}),
    Seq = fun() -> dspex_nif:events_session_seq(S) end,
    Before = Seq(),
    [?assertEqual({error, {reserved_type, T}}, dspex_events:append(S, T, #{name => <<"x">>}, #{}))
     || T <- [session_created, session_deleted, variable_registered, variable_updated, variable_deleted,
              variable_rolled_back, batch_committed, <<"variable_updated">>, <<"session_deleted">>]],
    ?assertEqual(Before, Seq()),
    %% what an earlier build let through: an update without its fields, a registration without a
    %% history, a creation whose data is not a map, each right before a multiple of snapshot_every
    Bad = [{variable_updated, #{name => <<"x">>}}, {variable_registered, #{name => <<"y">>}},
           {session_created, not_a_map}, {variable_deleted, no_name}],
    Step = fun(I) ->
                   case (Seq() + 1) rem 10 of
                       9 when I =< 40 ->
                           {T, D} = lists:nth(I rem length(Bad) + 1, Bad),
                           {ok, _, _, _} = dspex_nif:events_append(S, T, D, #{}, #{});
                       _ -> ok
                   end,
                   {ok, _} = dspex_store:set(S, x, I),
                   {ok, E} = dspex_nif:export_session(S),
                   {Seq(), E}
           end,
    Exports = [Step(I) || I <- lists:seq(1, 60)],
    settle(),
    Multiples = [K || K <- lists:seq(10, Seq(), 10), lists:keymember(K, 1, Exports)],
    ?assert(length(Multiples) >= 4),
    lists:foreach(fun(K) ->
                          {K, Expected} = lists:keyfind(K, 1, Exports),
                          {ok, K, _, #{session := Sess, vars := Vs}} = dspex_nif:events_latest_snapshot(S, K, 0),
                          ?assertEqual({K, Expected},
                                       {K, Sess#{variables => [V || {_, V} <- lists:sort(maps:to_list(Vs))]}}),
                          ?assertEqual({ok, Expected}, dspex_events:state_at(S, {sequence, K}))
                  end, Multiples),
    {Last, LastExport} = lists:last(Exports),
    ?assertEqual({ok, LastExport}, dspex_events:state_at(S, {sequence, Last})).

%% The events kept for a session's next replicated change (take_kept/2):
%% that session's only (not those of a session whose id it is a prefix of, or
%% that sorts next to it), up to the given sequence, in order, each once.
take_kept_takes_a_sessions_events_up_to_a_sequence() ->
    T = dspex_events_kept,
    [A, AB, B] = [<<"kept_a">>, <<"kept_ab">>, <<"kept_b">>],
    true = ets:insert(T, [{{AB, 1}, ab1}, {{AB, 2}, ab2}, {{B, 5}, b5}, {{A, 3}, a3}, {{A, 4}, a4}, {{A, 9}, a9}]),
    try
        ?assertEqual([], dspex_events:take_kept(A, 2)),
        ?assertEqual([a3, a4], dspex_events:take_kept(A, 4)),
        ?assertEqual([], dspex_events:take_kept(A, 8)),
        ?assertEqual([], dspex_events:take_kept(<<"kept_">>, 100)),
        ?assertEqual([a9], dspex_events:take_kept(A, 100)),
        ?assertEqual([], dspex_events:take_kept(A, 100)),
        ?assertEqual([ab1, ab2], dspex_events:take_kept(AB, 2)),
        ?assertEqual([b5], dspex_events:take_kept(B, 5)),
        %% taken ones are gone
        ?assertEqual([], [K || {{S, _} = K, _} <- ets:tab2list(T), lists:member(S, [A, AB, B])])
    after
        [ets:match_delete(T, {{S, '_'}, '_'}) || S <- [A, AB, B]]
    end.

drain_traces(P, Acc) ->
    receive {trace, P, call, {dspex_nif, events_latest_snapshot, _}} = T -> drain_traces(P, [T | Acc])
    after 0 -> Acc
    end.

%% The NIF's own decoder of the event data (the replay's, and read/2's data
%% and metadata) gives what binary_to_term/1 gives, for every kind of term (those it leaves to the VM included: pids,
%% references, funs, bit strings, big integers beyond 64 bits, non-ASCII
%% atoms, deep nesting).
replay_decodes_data_as_binary_to_term() ->
    S = sid(),
    Deep = lists:foldl(fun(_, A) -> [A] end, x, lists:seq(1, 100)),
    Fixed = [0, 255, 256, -1, 1 bsl 31, -(1 bsl 31), 1 bsl 32, (1 bsl 63) - 1, -(1 bsl 63), 1 bsl 63, (1 bsl 64) - 1,
             1 bsl 64, -(1 bsl 64), 1 bsl 200, 0.0, -0.0, 1.5, -2.5e300, <<>>, <<"abc">>, <<1:3>>, [], "abc",
             [1 | 2], {}, {a, b}, list_to_tuple(lists:seq(1, 300)), #{}, #{a => 1, <<"b">> => [c]},
             maps:from_list([{I, I} || I <- lists:seq(1, 40)]), true, false, undefined, 'ä', 'a b', self(),
             make_ref(), fun() -> ok end, fun lists:map/2, Deep, lists:seq(1, 1000), #{value => 1, version => 2,
             previous => #{changed_by => undefined, metadata => #{}, updated_at => 1, value => 0, version => 1}}],
    [{ok, _, _, _} = dspex_nif:events_append(S, variable_updated, T, #{}, #{}) || T <- Fixed],
    settle(),
    {ok, Rows, Scanned, LastSeq} = dspex_nif:events_replay(S, 1, 0, 0, 100000, 0),
    ?assertEqual(length(Fixed), Scanned),
    ?assertEqual(length(Fixed), LastSeq),
    lists:foreach(fun({T, {_, _, variable_updated, D}}) -> ?assertEqual(T, D), ?assert(T =:= D) end,
                  lists:zip(Fixed, Rows)),
    ?assert(proper:quickcheck(
              ?FORALL(T, proper_types:any(),
                      begin
                          S1 = sid(),
                          {ok, _, _, _} = dspex_nif:events_append(S1, variable_registered, T, #{}, #{}),
                          {ok, _} = dspex_events:append(S1, note, T, #{extra => T}),
                          settle(),
                          %% read/2 decodes data and metadata the same way
                          {ok, [#{data := RD, metadata := #{extra := RM}}]} = dspex_events:read(S1, #{types => [note]}),
                          %% the other type is listed at a multiple of Mark only, without its data
                          {ok, R1, 2, 2} = dspex_nif:events_replay(S1, 1, 0, 0, 10, 0),
                          {ok, R2, 2, 2} = dspex_nif:events_replay(S1, 1, 0, 0, 10, 2),
                          [{1, _, variable_registered, D1}] = R1,
                          [{1, _, variable_registered, D1}, {2, _, note, undefined}] = R2,
                          D1 =:= T andalso RD =:= T andalso RM =:= T
                      end), [{numtests, 200}, {to_file, user}])).

audit_trail_summary() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {ok, _} = dspex_store:set(S, x, 1, #{changed_by => alice}),
    {ok, _} = dspex_store:set(S, x, 2, #{changed_by => alice}),
    {ok, _} = dspex_store:set(S, x, 3, #{changed_by => bob}),
    ok = dspex_events:emit(S, access_denied, #{variable => x}, #{principal => <<"mallory">>}),
    settle(),
    {ok, #{events := Evs, summary := Sum, period := {undefined, undefined}}} =
        dspex_events:audit_trail(#{session => S}),
    ?assertEqual(6, length(Evs)),
    ?assertMatch(#{count := 6, denied := 1,
                   by_type := #{variable_updated := 3, session_created := 1, access_denied := 1},
                   by_principal := #{<<"mallory">> := 1},
                   writes_by_changed_by := #{alice := 2, bob := 1}}, Sum),
    {ok, #{summary := #{count := 3}}} = dspex_events:audit_trail(#{session => S, types => [variable_updated]}).

archive_round_trip() ->
    S = sid(),
    [{ok, _} = dspex_events:append(S, e, #{n => N, t => {tuple, [N]}}, #{}) || N <- lists:seq(1, 30)],
    settle(),
    {ok, Before} = dspex_events:read(S, #{}),
    %% (the OS clock, as the events' times: see state_at_by_time_and_snapshots)
    {ok, N} = dspex_events:expire_before(os:system_time(microsecond) + 1),
    ?assert(N >= 30),
    ?assertEqual({ok, []}, dspex_events:read(S, #{})),
    ?assertEqual({ok, Before}, dspex_events:read(S, #{include_archive => true, limit => 100})),
    ?assertEqual({ok, lists:sublist(Before, 5, 3)},
                 dspex_events:read(S, #{include_archive => true, since => {sequence, 5}, until => {sequence, 7}})),
    [File] = filelib:wildcard(filename:join([dspex_events:archive_dir(), binary_to_list(binary:encode_hex(S)), "*.ndjson.gz"])),
    {ok, Z} = file:read_file(File),
    Lines = binary:split(zlib:gunzip(Z), <<"\n">>, [global, trim_all]),
    ?assertEqual(30, length(Lines)),
    {ok, #{<<"type">> := <<"e">>, <<"sequence">> := 1}} = dspex_json:decode(hd(Lines)),
    %% new events continue after the archived ones
    {ok, _} = dspex_events:append(S, e, 31, #{}),
    ?assertMatch([#{sequence := 31}], events(S)).

%% Retention archives a page, then deletes exactly that page: events that
%% commit between the two (a sync write, a late copy with an older time) stay
%% in the log for the next page; every event ends in log or archive, once.
expire_never_deletes_an_event_it_did_not_archive() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, integer, 0),
    [{ok, _} = dspex_store:set(S, a, I, #{durability => sync}) || I <- lists:seq(1, 5)],
    settle(),
    Late = sid(),
    Cut = os:system_time(microsecond) + 1000000, % after every event written by the hook too
    Once = counters:new(1, []),
    Test = self(),
    Hook = fun(_Page) ->
                   case counters:get(Once, 1) of
                       0 ->
                           counters:add(Once, 1, 1),
                           %% (a writer of its own, beside the pass that runs the hook)
                           {Pid, Ref} = spawn_monitor(
                                          fun() ->
                                                  {ok, 6} = dspex_store:set(S, a, 6, #{durability => sync}),
                                                  {ok, _, 1, _} = dspex_nif:events_append(
                                                                    Late, checkpoint, #{}, #{},
                                                                    #{sequence => 1, timestamp => Cut - 60000000}),
                                                  ok = dspex_events:await()
                                          end),
                           receive {'DOWN', Ref, process, Pid, Why} -> Test ! {hook, Why} end;
                       _ -> ok
                   end
           end,
    {ok, _} = dspex_events:expire_before(Cut, #{after_archive => Hook}),
    receive {hook, Why} -> ?assertEqual(normal, Why) after 0 -> ?assert(false) end,
    {ok, All} = dspex_events:read(S, #{include_archive => true, limit => 100000}),
    ?assertEqual(lists:seq(1, 8), [Q || #{sequence := Q} <- All]),
    ?assertMatch({ok, [#{sequence := 1, type := checkpoint}]},
                 dspex_events:read(Late, #{include_archive => true, limit => 100000})).

%% read/2 with include_archive answers the same before and after retention
%% moved the events (all, or the older half) to the archive, for every filter.
archive_reads_apply_every_filter_as_the_log() ->
    S = sid(),
    T0 = 1500000000000000 + erlang:unique_integer([positive]) * 1000000, % older than every other test's events
    Evs = [{mark, #{principal => <<"alice">>, variable => b}}, {<<"bin_t">>, #{principal => <<"bob">>}},
           {variable_updated, #{variable => <<"a">>}}, {mark, #{}}, {<<"bin_t">>, #{variable => a}},
           {mark, #{principal => <<"bob">>, variable => <<"b">>}}, {other, #{}}, {mark, #{principal => <<"alice">>}}],
    [{ok, _, N, _} = dspex_nif:events_append(S, T, #{n => N}, M, #{sequence => N, timestamp => T0 + N * 1000})
     || {N, {T, M}} <- lists:zip(lists:seq(1, length(Evs)), Evs)],
    settle(),
    {ok, [_, _, #{position := P3} | _]} = dspex_events:read(S, #{}),
    Opts = [#{}, #{types => [mark]}, #{types => [<<"mark">>]}, #{types => [<<"bin_t">>, other]},
            #{types => [variable_updated]}, #{principal => <<"alice">>}, #{principal => <<"bob">>},
            #{variable => b}, #{variable => <<"b">>}, #{variable => <<"a">>},
            #{direction => backward, limit => 3}, #{limit => 3}, #{limit => 5, types => [mark]},
            #{since => {sequence, 4}, until => {sequence, 6}}, #{since => {sequence, 3}, direction => backward, limit => 2},
            #{since => {time, T0 + 3000}}, #{until => T0 + 5000}, #{since => {position, P3}},
            #{until => {position, P3}, principal => <<"alice">>}, #{principal => <<"bob">>, types => [mark]}],
    Live = [{O, dspex_events:read(S, O)} || O <- Opts],
    Check = fun() -> [?assertEqual({O, R}, {O, dspex_events:read(S, O#{include_archive => true})}) || {O, R} <- Live] end,
    {ok, 4} = dspex_events:expire_before(T0 + 4500),   % sequences 1-4 archived, 5-8 live
    ?assertMatch({ok, [#{sequence := 5} | _]}, dspex_events:read(S, #{})),
    Check(),
    {ok, 4} = dspex_events:expire_before(T0 + 100000), % all archived
    ?assertEqual({ok, []}, dspex_events:read(S, #{})),
    Check().

%% One gzip member per page archived: the file stays one NDJSON stream for
%% zlib:gunzip/1 (and zcat), and archiving a day costs its size once.
archive_file_is_gzip_members_readable_as_one_stream() ->
    S = sid(),
    T0 = 1400000000000000 + erlang:unique_integer([positive]) * 1000000,
    N = 2500, % three pages
    [{ok, _, I, _} = dspex_nif:events_append(S, e, #{i => I}, #{}, #{sequence => I, timestamp => T0 + I})
     || I <- lists:seq(1, N)],
    settle(),
    {ok, Before} = dspex_events:read(S, #{limit => N}),
    {ok, N} = dspex_events:expire_before(T0 + N + 1),
    [File] = filelib:wildcard(filename:join([dspex_events:archive_dir(), binary_to_list(binary:encode_hex(S)),
                                             "*.ndjson.gz"])),
    {ok, Z} = file:read_file(File),
    Lines = binary:split(zlib:gunzip(Z), <<"\n">>, [global, trim_all]),
    ?assertEqual(lists:seq(1, N), [Q || L <- Lines, {ok, #{<<"sequence">> := Q}} <- [dspex_json:decode(L)]]),
    ?assertEqual({ok, Before}, dspex_events:read(S, #{include_archive => true, limit => N})),
    %% a member torn by a crash mid-append: dropped by the reader, cut off by the next append
    ok = file:write_file(File, [Z, binary:part(Z, 0, 40)]),
    ?assertEqual({ok, Before}, dspex_events:read(S, #{include_archive => true, limit => N})),
    {ok, _, _, _} = dspex_nif:events_append(S, e, #{i => N + 1}, #{}, #{sequence => N + 1, timestamp => T0 + N + 1}),
    settle(),
    {ok, 1} = dspex_events:expire_before(T0 + N + 2),
    {ok, Z2} = file:read_file(File),
    ?assertEqual(N + 1, length(binary:split(zlib:gunzip(Z2), <<"\n">>, [global, trim_all]))).

%% While a retention pass holds a page (blocked in after_archive), the server
%% serves its subscribers and calls: a live event reaches its subscriber and
%% subscribe/3 answers. A second pass asked for meanwhile waits for the first:
%% it starts after the first deleted the page, so it finds nothing.
retention_pass_runs_beside_the_server() ->
    S = sid(),
    Live = sid(),
    T0 = old_time(),
    {ok, _, 1, _} = dspex_nif:events_append(S, e, #{}, #{}, #{sequence => 1, timestamp => T0}),
    settle(),
    Self = self(),
    {ok, Ref} = dspex_events:subscribe(#{session => Live}, Self, #{from => live}),
    ReqA = gen_server:send_request(dspex_events, {expire_before, T0 + 1, #{after_archive => holding_hook(Self)}}),
    Pass = holding(S),
    try
        {ok, _} = dspex_events:append(Live, e, meanwhile, #{durability => sync}),
        receive {dspex_event, Ref, E} -> ?assertMatch(#{session := Live, data := meanwhile}, E)
        after 10000 -> erlang:error(live_event_held_up_by_the_retention_pass)
        end,
        ?assertMatch({ok, _}, within(10000, fun() -> dspex_events:subscribe(#{session => Live}, self(), #{from => live}) end)),
        ReqB = gen_server:send_request(dspex_events, {expire_before, T0 + 1,
                                                      #{after_archive => fun(_) -> Self ! {second_pass_page, self()} end}}),
        _ = sys:get_state(dspex_events), % (ReqB is in: the same sender's messages come in order)
        Pass ! go,
        ?assertEqual({reply, {ok, 1}}, gen_server:receive_response(ReqA, 30000)),
        ?assertEqual({reply, {ok, 0}}, gen_server:receive_response(ReqB, 30000)),
        receive {second_pass_page, _} -> erlang:error(second_pass_ran_beside_the_first) after 0 -> ok end,
        ?assertMatch({ok, [#{sequence := 1}]}, dspex_events:read(S, #{include_archive => true}))
    after
        Pass ! go,
        ok = dspex_events:unsubscribe(Ref),
        %% (a delivery the failing case made late must not reach the next test)
        receive {dspex_event, Ref, _} -> ok after 0 -> ok end
    end.

%% Passes asked for together run one after another, each to its end: a pass
%% started right after the one before it answered finds the pass's name free
%% (that process may not have exited yet).
queued_retention_passes_each_run() ->
    Before = old_time(),
    Reqs = [gen_server:send_request(dspex_events, {expire_before, Before, #{}}) || _ <- lists:seq(1, 200)],
    ?assertEqual([], [R || Req <- Reqs, {reply, R} <- [gen_server:receive_response(Req, 30000)], R =/= {ok, 0}]).

%% A pass that dies (killed while it holds an archived page, or an exception
%% in it) answers its caller with an error; the server goes on, the page's
%% events stay in the log, and the next pass archives and deletes them: each
%% event once in the archive.
a_retention_pass_that_dies_deletes_nothing_it_did_not_archive() ->
    S = sid(),
    T0 = old_time(),
    {ok, _, 1, _} = dspex_nif:events_append(S, e, #{}, #{}, #{sequence => 1, timestamp => T0}),
    settle(),
    Server = whereis(dspex_events),
    Req = gen_server:send_request(dspex_events, {expire_before, T0 + 1, #{after_archive => holding_hook(self())}}),
    Pass = holding(S),
    %% (the pass in the server itself: killing it would end the log of every test after this one)
    released_if_fails(Pass, fun() -> ?assertNotEqual(Server, Pass) end),
    exit(Pass, kill),
    ?assertEqual({reply, {error, {archive, {exit, killed}}}}, gen_server:receive_response(Req, 30000)),
    ?assertEqual(Server, whereis(dspex_events)),
    ?assertMatch({ok, [#{sequence := 1}]}, dspex_events:read(S, #{})),
    ?assertEqual({error, {archive, {error, boom}}}, dspex_events:expire_before(T0 + 1, #{after_archive => fun(_) -> error(boom) end})),
    ?assertMatch({ok, [#{sequence := 1}]}, dspex_events:read(S, #{})),
    ?assertEqual({ok, 1}, dspex_events:expire_before(T0 + 1)),
    ?assertEqual({ok, []}, dspex_events:read(S, #{})),
    ?assertMatch({ok, [#{sequence := 1}]}, dspex_events:read(S, #{include_archive => true})).

%% Stopping the server (the log closes) while a pass holds a page ends the
%% pass first: its caller gets {error, {archive, stopped}}, the page's events
%% are still in the reopened log, and the next pass takes them. The hourly
%% timer's message runs a pass too (one a day old here), which a call made
%% after it waits for.
retention_pass_stops_with_the_server_test_() ->
    {timeout, 120, fun retention_pass_stops_with_the_server/0}.

retention_pass_stops_with_the_server() ->
    with_log(#{event_retention => {days, 1}},
             fun() ->
                     S = sid(),
                     T0 = old_time(),
                     [{ok, _, N, _} = dspex_nif:events_append(S, e, #{}, #{}, #{sequence => N, timestamp => T0 + N})
                      || N <- [1, 2]],
                     ok = dspex_events:await(),
                     Req = gen_server:send_request(dspex_events,
                                                   {expire_before, T0 + 3, #{after_archive => holding_hook(self())}}),
                     Pass = holding(S),
                     %% (else the stop below would wait 30 s for it)
                     released_if_fails(Pass, fun() -> ?assertNotEqual(whereis(dspex_events), Pass) end),
                     ok = supervisor:terminate_child(dspex_core_sup, dspex_events),
                     ?assertNot(is_process_alive(Pass)),
                     ?assertEqual({reply, {error, {archive, stopped}}}, gen_server:receive_response(Req, 30000)),
                     {ok, _} = supervisor:restart_child(dspex_core_sup, dspex_events),
                     ?assertMatch({ok, [#{sequence := 1}, #{sequence := 2}]}, dspex_events:read(S, #{})),
                     dspex_events ! retention,
                     ?assertEqual({ok, 0}, dspex_events:expire_before(T0 + 3)),
                     ?assertEqual({ok, []}, dspex_events:read(S, #{})),
                     ?assertMatch({ok, [#{sequence := 1}, #{sequence := 2}]},
                                  dspex_events:read(S, #{include_archive => true}))
             end).

%% A time older than every other test's events (2011), distinct per call.
old_time() -> 1300000000000000 + erlang:unique_integer([positive]) * 1000000.

%% An after_archive hook that tells Test which page it holds, then waits for
%% `go' (bounded: a failing test must not leave a pass held for ever).
holding_hook(Test) ->
    fun(Page) ->
            Test ! {holding, self(), Page},
            receive go -> ok after 60000 -> ok end
    end.

%% Check(), releasing the held Pass only when it fails (a held pass must stay
%% held until the test ends it: released, it would go on and delete its page).
released_if_fails(Pass, Check) ->
    try Check()
    catch C:R:St ->
            Pass ! go,
            erlang:raise(C, R, St)
    end.

%% The pass (its process) holding the page of session S's events.
holding(S) ->
    receive {holding, Pass, [#{session := S} | _]} -> Pass
    after 30000 -> erlang:error(no_pass_holds_a_page)
    end.

%% F() in a process of its own: its result within Ms, else `blocked' (a call
%% that blocks fails the test, not the whole run).
within(Ms, F) ->
    Self = self(),
    {Pid, Mon} = spawn_monitor(fun() -> Self ! {within, self(), F()} end),
    receive
        {within, Pid, R} -> erlang:demonitor(Mon, [flush]), R;
        {'DOWN', Mon, process, Pid, Why} -> {crashed, Why}
    after Ms -> erlang:demonitor(Mon, [flush]), blocked
    end.

%% Every write made `as' another principal names it in its event (set,
%% set_many atomic or not, per update, rollback, delete), and the audit
%% trail counts it.
writes_made_as_a_principal_name_it_in_their_events() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {ok, _} = dspex_store:register(S, y, integer, 0),
    [ok = dspex_acl:set_permissions(S, V, [#{session_pattern => <<"bob">>, permissions => [read, write]}])
     || V <- [x, y]],
    settle(),
    {ok, [#{sequence := Seq0}]} = dspex_events:read(S, #{direction => backward, limit => 1}),
    As = #{as => <<"bob">>},
    {ok, 1} = dspex_store:set(S, x, 1, As),
    {ok, _} = dspex_store:set_many(S, #{x => 2, y => 2}, As#{atomic => true}),
    {ok, #{updated := #{x := 3}}} = dspex_store:set_many(S, #{x => 3}, As),
    {ok, #{updated := #{x := 4}}} = dspex_store:set_many(S, [{x, 4, As}]),
    {ok, _} = dspex_store:rollback(S, x, 1, As),
    ok = dspex_store:delete(S, y, As),
    Mine = [E || E = #{sequence := Q} <- events(S), Q > Seq0],
    ?assertEqual([variable_updated, variable_updated, variable_updated, batch_committed, variable_updated,
                  variable_updated, variable_rolled_back, variable_deleted], [T || #{type := T} <- Mine]),
    ?assertEqual([<<"bob">>], lists:usort([maps:get(principal, M, undefined) || #{metadata := M} <- Mine])),
    {ok, Bob} = dspex_events:read(S, #{principal => <<"bob">>}),
    ?assertEqual(length(Mine), length(Bob)),
    {ok, #{summary := #{by_principal := ByP}}} = dspex_events:audit_trail(#{session => S}),
    ?assertEqual(length(Mine), maps:get(<<"bob">>, ByP)).

%% In the backend now: read without read/2's wait for queued events.
durable_types(S) ->
    {ok, Evs} = dspex_nif:events_read(#{session => S, limit => 1000}),
    [T || #{type := T} <- Evs].

every_write_with_sync_returns_after_its_event_is_durable() ->
    S = sid(),
    Sync = #{durability => sync},
    {ok, _} = dspex_store:create_session(S, Sync),
    ?assertEqual([session_created], durable_types(S)),
    {ok, _} = dspex_store:register(S, a, integer, 0, Sync),
    {ok, 1} = dspex_store:set(S, a, 1, Sync),
    {ok, _} = dspex_store:set_many(S, #{a => 2}, Sync),
    {ok, 3} = dspex_store:rollback(S, a, 1, Sync),
    ?assertEqual([session_created, variable_registered, variable_updated, variable_updated, variable_rolled_back],
                 durable_types(S)),
    ok = dspex_store:delete(S, a, Sync),
    ?assertEqual(variable_deleted, lists:last(durable_types(S))),
    %% async (the default here) is not waited for: the ten seconds' linger holds it
    {ok, _} = dspex_store:register(S, b, integer, 0),
    ?assertEqual(variable_deleted, lists:last(durable_types(S))),
    ok = dspex_events:await().

every_write_returns_after_its_event_is_durable_when_sync_is_the_default() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    ?assertEqual([session_created], durable_types(S)),
    {ok, _} = dspex_store:register(S, a, integer, 0),
    {ok, 1} = dspex_store:set(S, a, 1),
    {ok, _} = dspex_store:set_many(S, #{a => 2}),
    {ok, 3} = dspex_store:rollback(S, a, 1),
    ok = dspex_store:delete(S, a),
    ?assertEqual([session_created, variable_registered, variable_updated, variable_updated, variable_rolled_back,
                  variable_deleted], durable_types(S)),
    ok = dspex_store:delete_session(S),
    ?assertEqual(session_deleted, lists:last(durable_types(S))).

%% A new session with two integer variables, a and b (0).
session_ab() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, integer, 0),
    {ok, _} = dspex_store:register(S, b, integer, 0),
    S.

erlang_side_events() ->
    S = session_ab(),
    ok = dspex_graph:add_dependency(S, a, b),
    ok = dspex_graph:remove_dependency(S, a, b),
    {ok, Lock} = dspex_locks:acquire(S, a, opt1, #{}),
    ok = dspex_locks:report_progress(Lock, 1, 0.5, #{}),
    ok = dspex_locks:release(Lock),
    ok = dspex_acl:set_permissions(S, a, [#{session_pattern => any, permissions => [read]}], #{}),
    Types = types(S),
    [?assert(lists:member(T, Types)) || T <- [dependency_added, dependency_removed, lock_acquired,
                                               optimization_progress, lock_released, acl_rule_set]],
    ?assertEqual(lists:seq(1, length(Types)), [N || #{sequence := N} <- events(S)]).

%% An edge added again with the same type changes nothing: no second dependency_added (a consumer
%% counting adds and removes would think it still there after one remove); another type is a change.
same_edge_again_logs_nothing() ->
    S = session_ab(),
    ok = dspex_graph:add_dependency(S, a, b),
    ok = dspex_graph:add_dependency(S, a, b),
    ok = dspex_graph:add_dependency(S, a, b, control),
    ok = dspex_graph:remove_dependency(S, a, b),
    ?assertEqual([data, control], [T || #{type := dependency_added, data := #{type := T}} <- events(S)]),
    ?assertEqual(1, length([x || dependency_removed <- types(S)])).

%% Ids grow with positions, append/4's (made when it is queued, to be returned) and the commit path's
%% (made by the writer) alike, also with writers on other processes.
ids_grow_with_positions() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    Self = self(),
    Ws = [spawn_link(fun() ->
                             [case I rem 2 of
                                  0 -> {ok, _} = dspex_store:set(S, x, I);
                                  1 -> {ok, _} = dspex_events:append(S, mark, I, #{})
                              end || I <- lists:seq(1, 200)],
                             Self ! {done, self()}
                     end) || _ <- [1, 2, 3]],
    [receive {done, W} -> ok end || W <- Ws],
    Evs = events(S),
    ?assertEqual(2 + 600, length(Evs)),
    Ids = [Id || #{id := Id} <- Evs],
    ?assertEqual(Ids, lists:usort(Ids)).

bad_arguments_are_errors() ->
    ?assertEqual({error, {invalid_argument, append}}, dspex_events:append(not_a_binary, t, x, #{})),
    ?assertError(badarg, dspex_nif:events_append(<<"s">>, <<>>, x, #{})),
    ?assertEqual({error, {invalid_argument, since}}, dspex_events:read(<<"s">>, #{since => {bad, 1}})),
    ?assertError(badarg, dspex_nif:events_read(#{types => [{not_a_type}]})),
    ?assertError(badarg, dspex_nif:events_replay(<<>>, 1, 0, 0, 10, 0)),
    ?assertError(badarg, dspex_nif:events_replay(<<"s">>, 1, 0, 0, 0, 0)),
    ?assertError(badarg, dspex_nif:events_replay(<<"s">>, 1, 0, -1, 10, 0)),
    ?assertError(badarg, dspex_nif:events_replay(<<"s">>, 1, 0, 0, 100001, 0)),
    ?assertError(badarg, dspex_nif:events_replay(<<"s">>, -1, 0, 0, 10, 0)),
    ?assertMatch({error, {event_store, already_open}},
                 dspex_nif:events_open(#{backend => sqlite, target => <<"/tmp/x.db">>})),
    ?assertMatch({error, {event_store, {backend, nope}}},
                 dspex_nif:events_open(#{backend => nope, target => <<"/tmp/x.db">>})),
    %% what a caller (a gRPC client) can send is checked before the log or the server sees it: an error,
    %% never an exception, a crash of the events server or a read of everything
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    {ok, _} = dspex_store:register(S, <<"y">>, integer, 0),
    {ok, _} = dspex_store:set(S, <<"y">>, 1),
    Long = binary:copy(<<"t">>, 256),
    [?assertEqual({error, {invalid_argument, type}}, dspex_events:append(S, T, x, #{})) || T <- [<<>>, Long, 'é中']],
    ?assertEqual({error, {invalid_argument, append}}, dspex_events:append(<<>>, t, x, #{})),
    ?assertEqual({error, {invalid_argument, principal}}, dspex_events:append(S, t, x, #{principal => 1})),
    ?assertEqual({error, {invalid_argument, variable}}, dspex_events:append(S, t, x, #{variable => 1})),
    ?assertEqual({error, {invalid_argument, durability}}, dspex_events:append(S, t, x, #{durability => soon})),
    {ok, _} = dspex_events:append(S, binary:copy(<<"t">>, 255), x, #{variable => x, principal => <<"p">>}),
    [?assertEqual({error, {invalid_argument, types}}, dspex_events:read(S, #{types => Ts}))
     || Ts <- [[<<>>], [Long], [1], foo, lists:duplicate(65, t)]],
    [?assertEqual({error, {invalid_argument, K}}, dspex_events:read(S, #{K => V}))
     || {K, V} <- [{variable, 1}, {principal, 1}, {principal, <<>>}, {direction, sideways}, {limit, 0}]],
    ?assertEqual({error, {invalid_argument, session}}, dspex_events:read(1, #{})),
    ?assertEqual({error, {invalid_argument, types}}, dspex_events:fold(S, fun(_, A) -> A end, 0, #{types => [<<>>]})),
    ?assertEqual({error, {invalid_argument, types}}, dspex_events:audit_trail(#{types => [Long]})),
    [?assertEqual({error, {invalid_argument, K}}, dspex_events:audit_trail(F))
     || {K, F} <- [{period, #{period => foo}}, {period, #{period => {x, 1}}}, {limit, #{limit => -1}},
                   {session, #{session => 1}}]],
    %% a variable named by an atom filters on its name, as a binary does
    {ok, ByAtom} = dspex_events:read(S, #{variable => x}),
    ?assertEqual([variable_registered, binary:copy(<<"t">>, 255)], [T || #{type := T} <- ByAtom]),
    ?assertEqual({ok, ByAtom}, dspex_events:read(S, #{variable => <<"x">>})),
    Server = whereis(dspex_events),
    [?assertEqual({error, {invalid_argument, K}}, dspex_events:subscribe(F, self(), O))
     || {K, F, O} <- [{from, all, #{from => 0}}, {from, all, #{from => x}}, {max_queue, all, #{max_queue => x}},
                      {session, #{session => 1}, #{}}, {types, #{session => S, types => [<<>>]}, #{from => 1}},
                      {types, #{types => [Long]}, #{}}]],
    ?assertEqual(Server, whereis(dspex_events)),
    [?assertEqual({error, {invalid_argument, point}}, dspex_events:state_at(S, P))
     || P <- [{sequence, -1}, {sequence, x}, foo, {time, 1.5}]],
    ?assertEqual({error, {invalid_argument, session}}, dspex_events:state_at(1, {sequence, 1})),
    ?assertEqual({error, not_found}, dspex_events:state_at(S, {time, -5})),
    %% past what the log numbers (2^63 - 1): after every event, not an exception
    Huge = 1 bsl 80,
    {ok, Now} = dspex_events:state_at(S, {sequence, 5}),
    ?assertEqual({ok, Now}, dspex_events:state_at(S, {sequence, Huge})),
    ?assertEqual({ok, Now}, dspex_events:state_at(S, {time, Huge})),
    ?assertEqual({ok, []}, dspex_events:read(S, #{since => {sequence, Huge}})),
    ?assertEqual({ok, []}, dspex_events:read(S, #{since => {time, Huge}})),
    ?assertMatch({ok, [_ | _]}, dspex_events:read(S, #{until => {position, Huge}})),
    ok = dspex_store:delete_session(S).

prometheus_and_telemetry() ->
    Self = self(),
    H = make_ref(),
    ok = dspex_telemetry:attach(H, [dspex, events, written], fun(_, M, Meta, _) -> Self ! {H, M, Meta} end, undefined),
    {ok, _} = dspex_events:append(sid(), e, x, #{durability => sync}),
    receive {H, #{count := N}, #{position := P}} -> ?assert(N >= 1 andalso P >= 1) end,
    dspex_telemetry:detach(H),
    Text = iolist_to_binary(dspex_prometheus:render()),
    [?assertMatch({_, _}, binary:match(Text, G)) || G <- [<<"dspex_events_queue_depth ">>, <<"dspex_events_lag_seconds ">>,
                                                       <<"dspex_events_errors_total ">>]].

%% The JSON form of event data for the gRPC messages (dspex_events:json_term/1).
json_term_of_any_term() ->
    Big = 1 bsl 70,
    T = #{a => {opt, 7}, <<"b">> => [1, 2.5, undefined, true, null, nan], 3 => <<255, 0>>, {k} => Big,
          p => self(), l => [1 | 2], u => <<"é"/utf8>>, Big => x},
    J = dspex_events:json_term(T),
    {ok, Text} = dspex_json:encode(J),
    {ok, D} = dspex_json:decode(Text),
    ?assertMatch(#{<<"a">> := [<<"opt">>, 7], <<"b">> := [1, 2.5, null, true, null, <<"nan">>],
                   <<"3">> := #{<<"$base64">> := <<"/wA=">>}, <<"{k}">> := <<"1180591620717411303424">>,
                   <<"l">> := <<"[1|2]">>, <<"u">> := <<"é"/utf8>>, <<"1180591620717411303424">> := <<"x">>}, D),
    ?assertMatch(<<"<", _/binary>>, maps:get(<<"p">>, D)).

%% PostgreSQL stopped mid-run (test/pg/pg_ctl.sh down), writes go on (sync ones
%% are acknowledged once spooled to the embedded spool, durable), the server
%% comes back: every event is in PostgreSQL, in order, with no gap, and a
%% subscriber gets them all in order.
postgres_down_spools_then_catches_up_in_order() ->
    Ctl = pg_ctl(),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    [{ok, _} = dspex_store:set(S, x, N) || N <- lists:seq(1, 50)],
    settle(),
    {ok, Ref} = dspex_events:subscribe(#{session => S}, self(), #{from => live}),
    pg(Ctl, "down"),
    try
        [{ok, _} = dspex_store:set(S, x, N, #{durability => sync}) || N <- lists:seq(51, 100)],
        {ok, _} = dspex_store:set_many(S, #{x => 101}, #{atomic => true, durability => sync}),
        [{ok, _} = dspex_store:set(S, x, N) || N <- lists:seq(102, 300)],
        ok = dspex_events:await(),
        %% 51..101 with the batch_committed of 101, then 102..300: all spooled
        ?assertMatch(#{spooled := 251}, dspex_events:stats())
    after
        pg(Ctl, "start")
    end,
    ok = wait_until(fun() -> maps:get(spooled, dspex_events:stats()) =:= 0 end, 1200),
    Evs = events(S),
    ?assertEqual(lists:seq(1, 2 + 300 + 1), [N || #{sequence := N} <- Evs]),
    ?assertEqual(lists:seq(1, 300), [V || #{type := variable_updated, data := #{value := V}} <- Evs]),
    Ps = [P || #{position := P} <- Evs],
    ?assertEqual(lists:usort(Ps), Ps),
    Live = collect(Ref, 251),
    ?assertEqual(lists:seq(53, 303), [N || #{sequence := N} <- Live]),
    ok = dspex_events:unsubscribe(Ref).

%% A session with events in the database whose first event on this node
%% (since its log started again) comes while the database is down: its last
%% sequence is unknown, so its events are numbered provisionally and
%% renumbered after the database's last one once it answers (they used to
%% collide with the stored ones, and the inserts skipped them).
postgres_down_at_a_sessions_first_event_loses_nothing() ->
    Ctl = pg_ctl(),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, integer, 0),
    [{ok, _} = dspex_store:set(S, x, N) || N <- lists:seq(1, 20)],
    settle(),
    %% the node's log starts again: S is new to it
    [Sup] = [P || {_, P, supervisor, _} <- supervisor:which_children(dspex_bridge_sup),
                  lists:keymember(dspex_events, 1, supervisor:which_children(P))],
    ok = supervisor:terminate_child(Sup, dspex_events),
    {ok, _} = supervisor:restart_child(Sup, dspex_events),
    pg(Ctl, "down"),
    try
        [{ok, _} = dspex_store:set(S, x, N) || N <- lists:seq(21, 40)],
        {ok, _} = dspex_store:set(S, x, 41, #{durability => sync}),
        ?assertMatch(#{spooled := 21}, dspex_events:stats())
    after
        pg(Ctl, "start")
    end,
    {ok, _} = dspex_store:set(S, x, 42),
    ok = wait_until(fun() -> maps:get(spooled, dspex_events:stats()) =:= 0 end, 1200),
    Evs = events(S),
    ?assertEqual(lists:seq(1, 2 + 42), [N || #{sequence := N} <- Evs]),
    ?assertEqual(lists:seq(1, 42), [V || #{type := variable_updated, data := #{value := V}} <- Evs]),
    ?assertMatch(#{provisional := 0}, dspex_events:stats()).

pg(Ctl, Cmd) ->
    %% the server never inherits a sanitizer runtime preloaded into this VM (test-nif-asan)
    Out = os:cmd("env -u LD_PRELOAD " ++ Ctl ++ " " ++ Cmd ++ " 2>&1; echo \"rc=$?\""),
    ?assertMatch({match, _}, re:run(Out, "rc=0\n$"), Out).

%% Bounded polling (50 ms steps, at most N of them).
wait_until(F, N) ->
    case F() of
        true -> ok;
        false when N > 0 -> timer:sleep(50), wait_until(F, N - 1);
        false -> {error, timeout}
    end.

%% A new session's, an imported session's and an appended-to session's first
%% events find their last sequence known already (dspex_events:seed/1 ran on
%% a dirty scheduler): no committing thread asks the backend.
first_events_never_ask_the_backend_on_the_commit_path() ->
    #{commit_seeds := C0} = dspex_events:stats(),
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, a, integer, 1),
    {ok, Export} = dspex_store:export_session(S),
    S2 = sid(),
    ok = dspex_store:import_session(Export#{id := S2}),
    {ok, _} = dspex_events:append(sid(), app_event, #{n => 1}, #{}),
    ok = dspex_events:emit(sid(), app_event, #{n => 2}, #{}),
    settle(),
    ?assertMatch(#{commit_seeds := C0}, dspex_events:stats()),
    %% and the sequences still continue what the backend holds
    ?assertMatch([#{sequence := 1}, #{sequence := 2} | _], events(S)),
    %% without seed/1, the first event asks on the commit path (counted)
    S3 = sid(),
    {ok, _, 1} = dspex_nif:events_append(S3, raw, x, #{}),
    ?assertMatch(#{commit_seeds := C1} when C1 =:= C0 + 1, dspex_events:stats()),
    %% events_reseed/1 (dspex_events:reseed/1 on a shared PostgreSQL log) of a
    %% session the queue does not know yet (a new owner taking it over) reads
    %% the backend once, off the queue's mutex: it asked again under the mutex
    %% (counted), every commit of the node waiting for that round trip
    #{commit_seeds := C2} = dspex_events:stats(),
    S4 = sid(),
    ok = dspex_nif:events_reseed(S4),
    ?assertMatch(#{commit_seeds := C2}, dspex_events:stats()),
    %% and it is known from then on: its first event asks nothing either
    {ok, _, 1} = dspex_nif:events_append(S4, raw, y, #{}),
    ?assertMatch(#{commit_seeds := C2}, dspex_events:stats()).

%% The log holds every value written: a principal other than the session
%% (`as') reads, folds, watches and replays none of it, and every call says
%% so as data; the session itself (`as' itself or `undefined') still reads.
only_the_session_reads_its_log() ->
    S = sid(),
    P = <<"ev_mallory">>,
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, secret, string, <<"hunter2">>),
    {ok, 1} = dspex_store:set(S, secret, <<"s3cr3t">>),
    As = #{as => P},
    ?assertEqual({error, access_denied}, dspex_events:read(S, As)),
    ?assertEqual({error, access_denied}, dspex_events:read(S, As#{context => #{role => admin}})),
    ?assertEqual({error, access_denied}, dspex_events:read(all, As)),
    ?assertEqual({error, access_denied}, dspex_events:fold(S, fun(E, A) -> [E | A] end, [], As)),
    ?assertEqual({error, access_denied}, dspex_events:subscribe(#{session => S}, self(), As#{from => 1})),
    ?assertEqual({error, access_denied}, dspex_events:subscribe(all, self(), As)),
    ?assertEqual({error, access_denied}, dspex_events:state_at(S, {sequence, 100}, As)),
    ?assertEqual({error, access_denied}, dspex_events:audit_trail(#{session => S, as => P})),
    %% nothing was delivered to the refused subscriber
    ?assertEqual([], [M || {dspex_event, _, _} = M <- flush_all()]),
    %% the refusals are recorded as denials of the session as a whole
    ?assertMatch([#{principal := P, permission := session, variable := undefined} | _],
                 lists:reverse(dspex_acl:audit_log(#{session => S, principal => P}))),
    ?assertError(badarg, dspex_events:read(S, #{as => "ev_mallory"})),
    %% the session itself
    {ok, [_ | _]} = dspex_events:read(S, #{as => S}),
    {ok, [_ | _]} = dspex_events:read(S, #{as => undefined}),
    {ok, #{variables := [#{value := <<"s3cr3t">>}]}} = dspex_events:state_at(S, {sequence, 100}, #{as => S}).

flush_all() ->
    receive M -> [M | flush_all()] after 0 -> [] end.

%% The session's rate limit covers its log: read, fold, subscribe, state_at
%% and audit_trail each take a token; the log of a deleted session has no
%% bucket left and reads.
reading_the_log_takes_a_token() ->
    S = sid(),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    ok = dspex_acl:set_rate_limit(S, 0.001, 1),
    {ok, [_ | _]} = dspex_events:read(S, #{}),   %% the one token of the burst
    ?assertEqual({error, rate_limited}, dspex_events:read(S, #{})),
    ?assertEqual({error, rate_limited}, dspex_events:fold(S, fun(E, A) -> [E | A] end, [], #{})),
    ?assertEqual({error, rate_limited}, dspex_events:subscribe(#{session => S}, self(), #{from => 1})),
    ?assertEqual({error, rate_limited}, dspex_events:state_at(S, {sequence, 100})),
    ?assertEqual({error, rate_limited}, dspex_events:audit_trail(#{session => S})),
    ok = dspex_store:delete_session(S),
    {ok, [_ | _]} = dspex_events:read(S, #{}).
