%% @doc One pool of Python workers: starts `size' workers (`dspex_worker'),
%% hands each call to a free, ready worker, queues callers up to `max_queue'
%% (then `{error, overloaded}' at once, so no mailbox grows without bound),
%% answers queued callers whose deadline passes with `{error, timeout}', and
%% restarts a slot whose worker ended after `backoff_min_ms', doubling up to
%% `backoff_max_ms' while the slot keeps failing (reset by a successful call
%% or ping). Stopping the pool stops every worker and its OS process first.
%%
%% The pool is started once a worker reported ready (`await_started'
%% answers `ok'); a worker that fails before that fails the start with its
%% reason (`dspex_workers:start_pool/2' then stops the pool). A worker that
%% cannot start at all (`{load_error, Type, Message}': its module did not
%% load; `{spawn_failed, Why}': the interpreter could not be run) puts the
%% pool in a start-failure episode, logged once when it begins and once when
%% it ends: while no worker is ready, callers (queued or new) are answered
%% with that error at once instead of waiting for their deadline; the slots
%% keep restarting with the usual backoff, so fixing the module heals the
%% pool. A worker process that dies without stopping itself (say it was
%% killed) has its OS process SIGKILLed by identity (`dspex_workers_os') so
%% nothing is left running, and its caller answered `{error, {worker_exit,
%% Reason}}'; a worker's own failure reason is never wrapped twice.
-module(dspex_workers_pool).
-behaviour(gen_server).

-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% @doc Starts the pool, registered locally as `Name'. `Opts' are complete
%% (see `dspex_workers:start_pool/2').
-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) -> gen_server:start_link({local, Name}, ?MODULE, {Name, Opts}, []).

%% @private
init({Name, Opts}) ->
    process_flag(trap_exit, true),
    ok = dspex_workers_sup:register_pool(Name),
    Size = maps:get(size, Opts),
    S0 = #{name => Name, opts => Opts, slots => #{}, pids => #{}, idle => [],
           queue => queue:new(), waiting => #{}, restarts => 0,
           started => false, start_error => none, start_waiters => [], load_error => none},
    {ok, lists:foldl(fun start_slot/2, S0, lists:seq(1, Size))}.

%% @private
handle_call({call, Fn, Args, Deadline}, From, S) ->
    case now_ms() >= Deadline of
        true -> {reply, {error, timeout}, S};
        false -> {noreply, dispatch_or_queue(From, Fn, Args, Deadline, S)}
    end;
handle_call(await_started, _From, #{started := true} = S) ->
    {reply, ok, S};
handle_call(await_started, _From, #{start_error := {error, _} = E} = S) ->
    {reply, E, S};
handle_call(await_started, From, #{start_waiters := Ws} = S) ->
    {noreply, S#{start_waiters := [From | Ws]}};
handle_call(status, _From, #{slots := Slots, waiting := W, restarts := R, opts := O, load_error := LE} = S) ->
    Workers = [maps:merge(#{slot => Slot}, maps:with([status, os_pid, failures], Info))
               || {Slot, Info} <- lists:sort(maps:to_list(Slots))],
    Count = fun(St) -> length([x || #{status := X} <- Workers, X =:= St]) end,
    {reply, #{size => maps:get(size, O), idle => Count(idle), busy => Count(busy), starting => Count(starting),
              down => Count(down), queued => map_size(W), restarts => R, workers => Workers,
              load_error => LE}, S};
handle_call(_Msg, _From, S) -> {reply, {error, unknown_call}, S}.

%% @private
handle_cast(_Msg, S) -> {noreply, S}.

%% @private
handle_info({worker_os, Pid, OsPid, Os}, S) ->
    case slot_of(Pid, S) of
        {ok, Slot} -> {noreply, update_slot(Slot, #{os_pid => OsPid, os => Os}, S)};
        error -> {noreply, S}
    end;
handle_info({worker_ready, Pid, OsPid}, S) ->
    case slot_of(Pid, S) of
        {ok, Slot} -> {noreply, free(Pid, started(update_slot(Slot, #{os_pid => OsPid}, S)))};
        error -> {noreply, S}
    end;
handle_info({worker_idle, Pid, ok}, S) ->
    case slot_of(Pid, S) of
        {ok, Slot} -> {noreply, free(Pid, update_slot(Slot, #{failures => 0}, S))};
        error -> {noreply, S}
    end;
handle_info({worker_healthy, Pid}, S) ->
    case slot_of(Pid, S) of
        {ok, Slot} -> {noreply, update_slot(Slot, #{failures => 0}, S)};
        error -> {noreply, S}
    end;
handle_info({'EXIT', Pid, Reason}, #{pids := Pids} = S) ->
    case maps:take(Pid, Pids) of
        {Slot, Pids1} -> {noreply, worker_down(Slot, Pid, Reason, S#{pids := Pids1})};
        error -> {noreply, S}   % e.g. a stale link
    end;
handle_info({restart, Slot}, S) ->
    {noreply, start_slot(Slot, S)};
handle_info({expire, Ref}, #{waiting := W} = S) ->
    case maps:take(Ref, W) of
        {{From, _, _, _}, W1} ->
            gen_server:reply(From, {error, timeout}),
            {noreply, S#{waiting := W1}};
        error -> {noreply, S}
    end;
handle_info(_Msg, S) -> {noreply, S}.

%% @private Every worker stops (and kills its OS process) in parallel; the
%% pool waits for all of them.
terminate(_Reason, #{pids := Pids, waiting := W, name := Name}) ->
    ok = dspex_workers_sup:unregister_pool(Name),
    [gen_server:reply(From, {error, pool_stopped}) || {From, _, _, _} <- maps:values(W)],
    [exit(Pid, shutdown) || Pid <- maps:keys(Pids)],
    Deadline = now_ms() + 10000,
    [receive {'EXIT', Pid, _} -> ok
     after max(0, Deadline - now_ms()) -> exit(Pid, kill)
     end || Pid <- maps:keys(Pids)],
    ok.

%%% Internals ----------------------------------------------------------------------

dispatch_or_queue(From, Fn, Args, Deadline, #{idle := [Pid | Idle]} = S) ->
    busy(Pid, From, Fn, Args, Deadline, S#{idle := Idle});
dispatch_or_queue(From, Fn, Args, Deadline, #{load_error := Error} = S) when Error =/= none ->
    case ready_workers(S) of
        0 ->
            gen_server:reply(From, {error, Error}),
            S;
        _ -> queue_call(From, Fn, Args, Deadline, S)
    end;
dispatch_or_queue(From, Fn, Args, Deadline, S) ->
    queue_call(From, Fn, Args, Deadline, S).

queue_call(From, Fn, Args, Deadline, #{waiting := W, queue := Q, opts := O} = S) ->
    case map_size(W) >= maps:get(max_queue, O) of
        true ->
            gen_server:reply(From, {error, overloaded}),
            S;
        false ->
            Ref = make_ref(),
            _ = erlang:send_after(Deadline, self(), {expire, Ref}, [{abs, true}]),
            S#{waiting := W#{Ref => {From, Fn, Args, Deadline}}, queue := queue:in(Ref, Q)}
    end.

busy(Pid, From, Fn, Args, Deadline, S) ->
    {ok, Slot} = slot_of(Pid, S),
    dspex_worker:run(Pid, From, Fn, Args, Deadline),
    update_slot(Slot, #{status => busy, from => From}, S).

%% A worker is free: give it the oldest queued call still waiting.
free(Pid, #{queue := Q, waiting := W} = S) ->
    case queue:out(Q) of
        {empty, _} ->
            {ok, Slot} = slot_of(Pid, S),
            S1 = update_slot(Slot, #{status => idle, from => none}, S),
            %% first in, first out: calls spread over the workers
            S1#{idle := lists:delete(Pid, maps:get(idle, S1)) ++ [Pid]};
        {{value, Ref}, Q1} ->
            case maps:take(Ref, W) of
                {{From, Fn, Args, Deadline}, W1} ->
                    busy(Pid, From, Fn, Args, Deadline, S#{queue := Q1, waiting := W1});
                error ->
                    free(Pid, S#{queue := Q1})    % expired meanwhile
            end
    end.

worker_down(Slot, Pid, Reason, #{slots := Slots, idle := Idle, restarts := R, opts := O} = S) ->
    #{failures := F} = Info = maps:get(Slot, Slots),
    Error = call_error(Reason),
    %% a worker that did not stop itself (killed, or a bug) never ran its
    %% terminate: its OS process may live on (hung in C, it would not even
    %% see stdin close)
    case {Reason, Info} of
        {{shutdown, _}, _} -> ok;
        {_, #{os := {_, _} = Os}} -> _ = dspex_workers_os:kill(Os), ok;
        _ -> ok
    end,
    %% normally the worker answered its caller before it ended (then this
    %% second answer is dropped); if not, the caller is not left waiting
    case Info of
        #{status := busy, from := From} when From =/= none -> gen_server:reply(From, {error, Error});
        _ -> ok
    end,
    Delay = backoff(F + 1, O),
    %% the event first: a restart follows it by at least Delay
    restart_event(Slot, F + 1, Delay, Error, S),
    _ = erlang:send_after(Delay, self(), {restart, Slot}),
    S1 = S#{slots := Slots#{Slot := Info#{status := down, pid := none, from => none, failures := F + 1,
                                          os => gone}},
            idle := lists:delete(Pid, Idle), restarts := R + 1},
    start_failure(Error, not_started(Error, S1)).

%% The error a caller gets for a worker that ended with `Reason': the
%% worker's own reason when it stopped itself (already an error of
%% `dspex_workers:call/3'), else `{worker_exit, Reason}'.
call_error({shutdown, R}) -> R;
call_error(R) -> {worker_exit, R}.

%% A worker ended before any was ready: the start failed.
not_started(Error, #{started := false, start_error := none, start_waiters := Ws} = S) ->
    [gen_server:reply(W, {error, Error}) || W <- Ws],
    S#{start_error := {error, Error}, start_waiters := []};
not_started(_Error, S) -> S.

%% A worker is ready: the pool is started, and a start-failure episode over.
started(#{start_waiters := Ws, load_error := LE, name := Name} = S) ->
    [gen_server:reply(W, ok) || W <- Ws],
    case LE of
        none -> ok;
        _ -> logger:notice("dspex_workers pool ~p: workers start again", [Name],
                           #{domain => [dspex, workers], pool => Name})
    end,
    S#{started := true, start_waiters := [], load_error := none}.

%% A worker could not start at all: begins (and logs, once) a start-failure
%% episode; while no worker is ready, the queued callers get the error now.
start_failure(Error, #{load_error := LE, name := Name, opts := O} = S) ->
    case startup_error(Error) of
        false -> S;
        true ->
            LE =:= none andalso
                logger:error("dspex_workers pool ~p: workers cannot start: ~0p; calls get this error "
                             "while no worker is ready, slots restart with backoff (up to ~b ms)",
                             [Name, Error, maps:get(backoff_max_ms, O)],
                             #{domain => [dspex, workers], pool => Name}),
            reject_queued(S#{load_error := Error})
    end.

startup_error({load_error, _, _}) -> true;
startup_error({spawn_failed, _}) -> true;
startup_error(_) -> false.

%% No worker ready and the workers cannot start: queued callers get the
%% start error rather than their deadline.
reject_queued(#{load_error := none} = S) -> S;
reject_queued(#{load_error := Error, waiting := W} = S) ->
    case ready_workers(S) of
        0 ->
            [gen_server:reply(From, {error, Error}) || {From, _, _, _} <- maps:values(W)],
            S#{waiting := #{}, queue := queue:new()};
        _ -> S
    end.

ready_workers(#{slots := Slots}) ->
    length([x || #{status := St} <- maps:values(Slots), St =:= idle orelse St =:= busy]).

restart_event(Slot, Failures, Delay, Error, #{name := Name}) ->
    dspex_telemetry:execute([dspex, workers, worker, restart], #{delay_ms => Delay},
                            #{pool => Name, slot => Slot, failures => Failures, reason => Error}).

%% backoff_min_ms * 2^(F-1), at most backoff_max_ms, with up to 10% jitter
%% so slots failing together do not restart in lockstep. The jitter goes up
%% from the base while that stays within backoff_max_ms, else down from
%% backoff_max_ms (never below backoff_min_ms): both bounds are promises.
backoff(F, #{backoff_min_ms := Min, backoff_max_ms := Max}) ->
    Base = min(Max, Min * (1 bsl min(F - 1, 30))),
    Jitter = rand:uniform(max(1, Base div 10)) - 1,
    case Base + Jitter =< Max of
        true -> Base + Jitter;
        false -> max(min(Min, Max), Max - Jitter)
    end.

start_slot(Slot, #{opts := O, slots := Slots, pids := Pids} = S) ->
    Failures = case Slots of
                   #{Slot := #{failures := F}} -> F;
                   _ -> 0
               end,
    case dspex_worker:start_link(self(), Slot, O) of
        {ok, Pid} ->
            S#{slots := Slots#{Slot => #{status => starting, pid => Pid, os_pid => undefined, os => gone,
                                         failures => Failures, from => none}},
               pids := Pids#{Pid => Slot}};
        {error, Reason} ->
            Error = call_error(Reason),
            Delay = backoff(Failures + 1, O),
            restart_event(Slot, Failures + 1, Delay, Error, S),
            _ = erlang:send_after(Delay, self(), {restart, Slot}),
            S1 = S#{slots := Slots#{Slot => #{status => down, pid => none, os_pid => undefined, os => gone,
                                              failures => Failures + 1, from => none}}},
            start_failure(Error, not_started(Error, S1))
    end.

slot_of(Pid, #{pids := Pids}) -> maps:find(Pid, Pids).

update_slot(Slot, Changes, #{slots := Slots} = S) ->
    S#{slots := Slots#{Slot := maps:merge(maps:get(Slot, Slots), Changes)}}.

now_ms() -> erlang:monotonic_time(millisecond).
