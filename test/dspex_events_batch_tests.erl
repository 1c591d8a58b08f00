%% EUnit: the event hook's atomic batches (c_src/nif/events_nif.c) when the
%% log closes in the middle of one. The hook collects an atomic set_many's
%% events per scheduler thread between the batch's begin and its
%% batch_committed and pushes them together; a log closed in between must
%% not leave that thread collecting, else every later event of the thread is
%% held back and never logged. Drives the NIF's log directly (the
%% application's own log is off here).
-module(dspex_events_batch_tests).
-include_lib("eunit/include/eunit.hrl").

batch_test_() ->
    {setup, fun start/0, fun stop/1,
     fun({Dir, _}) ->
             [{"a log closed during an atomic batch keeps logging the thread's events",
               {timeout, 120, fun() -> closed_during_a_batch(Dir) end}}]
     end}.

start() ->
    _ = application:stop(dspex_bridge),
    _ = application:load(dspex_bridge),
    Keys = [event_log, grpc_enabled, prometheus_enabled],
    Saved = [{K, application:get_env(dspex_bridge, K)} || K <- Keys],
    [application:set_env(dspex_bridge, K, false) || K <- Keys],
    {ok, _} = application:ensure_all_started(dspex_bridge),
    Dir = "/tmp/dspex_events_batch_eunit_" ++ os:getpid(),
    _ = os:cmd("rm -rf " ++ Dir),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    {Dir, Saved}.

stop({Dir, Saved}) ->
    _ = dspex_nif:events_close(),
    _ = application:stop(dspex_bridge),
    _ = os:cmd("rm -rf " ++ Dir),
    [case V of
         {ok, X} -> application:set_env(dspex_bridge, K, X);
         undefined -> application:unset_env(dspex_bridge, K)
     end || {K, V} <- Saved],
    ok.

open(Dir) ->
    ok = dspex_nif:events_open(#{backend => sqlite, target => filename:join(Dir, "events.db")}).

%% Runs F in a process bound to scheduler 1 (the batcher's thread) and
%% returns its result.
on_batcher_thread(F) ->
    Self = self(),
    Ref = make_ref(),
    {_, Mon} = spawn_opt(fun() -> Self ! {Ref, F()} end, [{scheduler, 1}, monitor]),
    receive
        {Ref, R} -> demonitor(Mon, [flush]), R;
        {'DOWN', Mon, _, _, Why} -> error(Why)
    end.

%% Atomic batches of 100 updates (small enough to stay on the normal
%% scheduler) back to back on scheduler 1, until told to stop.
batcher(Parent, S, Names) ->
    spawn_opt(fun() -> batches(Parent, S, Names, 0) end, [{scheduler, 1}, link]).

batches(Parent, S, Names, N) ->
    _ = dspex_nif:var_set_many(S, [{K, N, #{}} || K <- Names], true),
    N =:= 0 andalso (Parent ! {batching, self()}),
    receive
        {stop, From} -> From ! {stopped, self()}
    after 0 -> batches(Parent, S, Names, N + 1)
    end.

stop_batcher(Pid) ->
    Pid ! {stop, self()},
    receive {stopped, Pid} -> ok end.

%% The session_created event of a session made on the batcher's thread is
%% logged (and durable once awaited).
logged_on_batcher_thread() ->
    on_batcher_thread(
      fun() ->
              P = iolist_to_binary(["evbatch_probe_", integer_to_list(erlang:unique_integer([positive]))]),
              {ok, _, true} = dspex_nif:session_create(P, #{}, infinity),
              ok = case dspex_nif:events_await() of
                       ok -> ok;
                       {wait, Ref} -> receive {dspex_events_durable, Ref, R} -> R end
                   end,
              {ok, Evs} = dspex_nif:events_read(#{session => P}),
              _ = dspex_nif:session_delete(P),
              [T || #{type := T} <- Evs]
      end).

%% Each round closes the log while the batcher runs (the close often lands
%% between a batch's begin and its batch_committed), stops the batcher,
%% reopens the log and checks that an event made on the batcher's thread is
%% logged. Before the fix a close inside a batch left the thread collecting:
%% the probe's event was held back (not queued, never logged).
closed_during_a_batch(Dir) ->
    open(Dir),
    S = <<"evbatch_session">>,
    _ = dspex_nif:session_delete(S),
    {ok, _} = dspex_store:create_session(S),
    Names = [iolist_to_binary(["v", integer_to_list(I)]) || I <- lists:seq(1, 100)],
    [{ok, _} = dspex_store:register(S, K, integer, 0) || K <- Names],
    [session_created] = logged_on_batcher_thread(),
    Rounds = [begin
                  B = batcher(self(), S, Names),
                  receive {batching, B} -> ok end,
                  ok = dspex_nif:events_close(),
                  stop_batcher(B),
                  open(Dir),
                  logged_on_batcher_thread()
              end || _ <- lists:seq(1, 60)],
    ?assertEqual([[session_created] || _ <- Rounds], Rounds),
    ok = dspex_nif:events_close().
