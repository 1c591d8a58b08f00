%% @doc One Python worker OS process, owned by this process through a port
%% (stdin/stdout, 4-byte big-endian length-prefixed JSON frames; see
%% `priv/python/dspex_bridge/worker.py'). Started and watched by its pool
%% (`dspex_workers_pool'), which it tells when it is ready and when it is free.
%%
%% Whatever the OS process does, this process stays bounded: frames are
%% parsed here with a size limit (so a bogus length cannot make the BEAM
%% buffer gigabytes, which `{packet, 4}' would), unsolicited frames are rate
%% limited and a worker exceeding the limit or filling this process's mailbox
%% is killed (ports have no `{active, once}' for their output, so the flow is
%% bounded by stopping the producer). Any protocol violation, missed
%% deadline, missed ping or port exit (an exit status, or the port closing
%% without one, e.g. `epipe') ends this process after the OS process is
%% SIGKILLed and gone; the pool starts a new one. The OS process is only
%% ever signalled by identity (`dspex_workers_os': pid and start time, read
%% at spawn), so a pid reaped and reused meanwhile is left alone. A call in
%% flight is answered with the failure once the process is gone, but never
%% after its deadline (a timeout is answered before the kill).
%%
%% A `load_error' frame instead of `ready' (the module did not load) ends
%% the worker with `{load_error, Type, Message}'.
%%
%% Frame limits: a request whose frame is over 64 MiB (what worker.py reads)
%% is answered `{error, {too_large, Bytes}}' without being sent; the worker
%% is told `max_frame' (`DSPEX_WORKER_MAX_FRAME') and answers a call whose
%% reply or chunk would exceed it with `too_large' too, instead of sending a
%% frame that would get it killed. Either way the worker lives on.
-module(dspex_worker).
-behaviour(gen_server).

-export([start_link/3, run/5]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% how long a SIGKILLed OS process may take to be gone, and how often /proc
%% is looked at meanwhile
-define(REAP_MS, 5000).
-define(POLL_MS, 5).
%% the largest frame worker.py reads (its MAX_FRAME): a larger one would
%% make it exit, so such a request is refused here instead
-define(MAX_REQUEST, 64 * 1024 * 1024).

%% @doc Starts a worker for slot `Slot' of `Pool' (linked to the caller, the
%% pool). `Opts' are the pool's (see `dspex_workers:start_pool/2').
-spec start_link(pid(), pos_integer(), map()) -> {ok, pid()} | {error, term()}.
start_link(Pool, Slot, Opts) -> gen_server:start_link(?MODULE, {Pool, Slot, Opts}, []).

%% @doc Asks the worker to run `Fn(Args...)' and reply to `From' (a
%% `gen_server' caller) by `Deadline' (monotonic ms); the pool only sends this
%% to a worker that said it is free.
-spec run(pid(), gen_server:from(), binary(), list() | map(), integer()) -> ok.
run(Worker, From, Fn, Args, Deadline) ->
    Worker ! {run, From, Fn, Args, Deadline},
    ok.

%%% gen_server -------------------------------------------------------------------

%% @private
init({Pool, Slot, Opts}) ->
    process_flag(trap_exit, true),
    #{python := Python, script := Script, module := Module, address := Address,
      session := Session0, env := Env, ready_timeout_ms := ReadyMs, name := Name} = Opts,
    Session = case Session0 of
                  default -> atom_to_list(Name) ++ "_" ++ integer_to_list(Slot);
                  _ -> Session0
              end,
    Args = [Script, "--module", Module, "--address", Address, "--session", Session,
            "--worker-id", integer_to_list(Slot), "--pool", atom_to_list(Name)],
    PortEnv = [{"DSPEX_BRIDGE_ADDRESS", Address}, {"DSPEX_SESSION_ID", Session},
               {"DSPEX_WORKER_ID", integer_to_list(Slot)}, {"DSPEX_WORKER_POOL", atom_to_list(Name)},
               {"PYTHONUNBUFFERED", "1"},
               %% the worker refuses replies this process would kill it for
               {"DSPEX_WORKER_MAX_FRAME", integer_to_list(maps:get(max_frame, Opts))} | Env],
    try open_port({spawn_executable, Python},
                  [binary, stream, exit_status, use_stdio, hide, {args, Args}, {env, PortEnv}]) of
        Port ->
            OsPid = case erlang:port_info(Port, os_pid) of
                        {os_pid, P} -> P;
                        undefined -> undefined
                    end,
            %% read now, while the pid can only be this worker's: from here
            %% on it is killed by this identity, never by its pid alone
            Os = case is_integer(OsPid) andalso dspex_workers_os:identity(OsPid) of
                     {ok, Identity} -> Identity;
                     _ -> gone
                 end,
            Pool ! {worker_os, self(), OsPid, Os},
            TRef = erlang:start_timer(ReadyMs, self(), ready_timeout),
            telemetry(start, #{pool => maps:get(name, Opts), slot => Slot, os_pid => OsPid}),
            {ok, #{pool => Pool, slot => Slot, opts => Opts, port => Port, os_pid => OsPid, os => Os,
                   buf => <<>>, phase => {starting, TRef}, call => none, ping => none, next_id => 1,
                   flood => {now_ms(), 0}}}
    catch error:Why ->
            {stop, {shutdown, {spawn_failed, Why}}}
    end.

%% @private
handle_call(status, _From, #{os_pid := OsPid, phase := Phase} = S) ->
    {reply, #{os_pid => OsPid, phase => phase_name(Phase)}, S};
handle_call(_Msg, _From, S) -> {reply, {error, unknown_call}, S}.

%% @private
handle_cast(_Msg, S) -> {noreply, S}.

%% @private
handle_info({Port, {data, Data}}, #{port := Port, buf := Buf} = S) ->
    case process_info(self(), message_queue_len) of
        {message_queue_len, N} when N > map_get(max_mailbox, map_get(opts, S)) ->
            fail(flood, S);
        _ -> frames(<<Buf/binary, Data/binary>>, S)
    end;
handle_info({Port, {exit_status, Status}}, #{port := Port} = S) ->
    %% reaped: its pid is free now, so it is never signalled again
    fail({worker_exit, Status}, S#{port := closed, os := gone});
handle_info({'EXIT', Port, Reason}, #{port := Port} = S) ->
    %% the port closed without an exit status (say epipe: the process died
    %% and a write to its stdin failed); none will come now
    fail({worker_exit, Reason}, S#{port := closed});
handle_info({run, From, Fn, Args, Deadline}, #{phase := idle} = S) ->
    start_call(From, Fn, Args, Deadline, S);
handle_info({run, From, _, _, _}, S) ->
    %% the pool never does this; answer rather than leave the caller waiting
    gen_server:reply(From, {error, worker_busy}),
    {noreply, S};
handle_info({timeout, _, ready_timeout}, #{phase := {starting, _}} = S) ->
    fail(not_ready, S);
handle_info({timeout, _, {call_timeout, Id}}, #{call := {_, Id, _, _}} = S) ->
    fail(timeout, S);
handle_info({timeout, _, health}, #{phase := idle, ping := none, next_id := Id, opts := O} = S) ->
    send_frame(#{type => ping, id => Id}, S),
    TRef = erlang:start_timer(maps:get(ping_timeout_ms, O), self(), {ping_timeout, Id}),
    {noreply, S#{ping := {Id, TRef}, next_id := Id + 1}};
handle_info({timeout, _, health}, S) ->
    {noreply, schedule_health(S)};
handle_info({timeout, _, {ping_timeout, Id}}, #{ping := {Id, _}} = S) ->
    fail(ping_timeout, S);
handle_info({'EXIT', Pool, Reason}, #{pool := Pool} = S) ->
    {stop, Reason, S};
handle_info(_Stale, S) ->
    {noreply, S}.

%% @private The OS process must be gone (asked to stop, SIGKILLed after
%% `stop_grace_ms', and reaped) before this process is.
terminate(_Reason, #{port := closed} = S) ->
    _ = answer(pool_stopped, S),
    ok;
terminate(_Reason, #{port := Port, opts := O} = S) ->
    _ = (catch port_command(Port, frame(#{type => stop}))),
    S1 = reap(S, now_ms() + maps:get(stop_grace_ms, O), pool_stopped),
    S2 = end_os_process(S1, pool_stopped),
    %% a call in flight is answered once its worker is gone
    _ = answer(pool_stopped, S2),
    ok.

%%% Frames -------------------------------------------------------------------------

frames(<<Len:32, Rest/binary>> = Buf, #{opts := #{max_frame := Max}} = S) ->
    if
        Len > Max -> fail({bad_reply, {frame_too_large, Len}}, S);
        byte_size(Rest) >= Len ->
            <<Body:Len/binary, Tail/binary>> = Rest,
            case frame_in(Body, S) of
                {ok, S1} -> frames(Tail, S1);
                Stop -> Stop
            end;
        true -> {noreply, S#{buf := Buf}}
    end;
frames(Buf, S) -> {noreply, S#{buf := Buf}}.

frame_in(Body, S) ->
    case dspex_json:decode(Body) of
        {ok, #{<<"type">> := Type} = Msg} -> message(Type, Msg, S);
        {ok, Other} -> fail({bad_reply, {unexpected, sample(Other)}}, S);
        {error, Why} -> fail({bad_reply, {invalid_json, Why, sample(Body)}}, S)
    end.

message(<<"ready">>, _Msg, #{phase := {starting, TRef}, pool := Pool, os_pid := OsPid} = S) ->
    _ = erlang:cancel_timer(TRef),
    Pool ! {worker_ready, self(), OsPid},
    {ok, schedule_health(S#{phase := idle})};
message(<<"load_error">>, Msg, #{phase := {starting, _}} = S) ->
    %% the module did not load: the same will happen to any worker of this
    %% pool until it is fixed, which the pool reports (once)
    case Msg of
        #{<<"error">> := #{<<"type">> := T, <<"message">> := M}} when is_binary(T), is_binary(M) ->
            fail({load_error, T, M}, S);
        _ -> fail({bad_reply, {unexpected, sample(Msg)}}, S)
    end;
message(<<"reply">>, #{<<"id">> := Id} = Msg, #{call := {From, Id, TRef, _}, pool := Pool} = S) ->
    _ = erlang:cancel_timer(TRef),
    Reply = case Msg of
                #{<<"too_large">> := N} when is_integer(N) -> {error, {too_large, N}};
                #{<<"ok">> := V} -> {ok, V};
                #{<<"error">> := #{<<"type">> := T, <<"message">> := M}} -> {error, {python, T, M}};
                _ -> bad
            end,
    case Reply of
        bad -> fail({bad_reply, {unexpected, sample(Msg)}}, S);
        _ ->
            gen_server:reply(From, Reply),
            Pool ! {worker_idle, self(), ok},
            {ok, S#{phase := idle, call := none}}
    end;
message(<<"chunk">>, #{<<"id">> := Id, <<"data">> := Data}, #{call := {_, Id, _, _}, sink := {Pid, Tag}} = S) ->
    %% a streamed call's item, passed on at once (bounded by the call's deadline)
    Pid ! {Tag, {chunk, Data}},
    {ok, S};
message(<<"pong">>, #{<<"id">> := Id}, #{ping := {Id, TRef}, pool := Pool} = S) ->
    _ = erlang:cancel_timer(TRef),
    Pool ! {worker_healthy, self()},
    {ok, schedule_health(S#{ping := none})};
message(<<"log">>, Msg, S) ->
    case unsolicited(S) of
        {ok, S1, N} ->
            N =< 3 andalso logger:notice("dspex worker ~p/~p: ~ts",
                                          [maps:get(name, maps:get(opts, S)), maps:get(slot, S),
                                           sample(maps:get(<<"message">>, Msg, <<>>))]),
            {ok, S1};
        Stop -> Stop
    end;
message(_Type, Msg, S) ->
    fail({bad_reply, {unexpected, sample(Msg)}}, S).

%% Unsolicited frames in the current one-second window, killing past the limit.
unsolicited(#{flood := {Start, N}, opts := #{flood_limit := Limit}} = S) ->
    Now = now_ms(),
    {Start1, N1} = case Now - Start >= 1000 of
                       true -> {Now, 1};
                       false -> {Start, N + 1}
                   end,
    case N1 > Limit of
        true -> fail(flood, S);
        false -> {ok, S#{flood := {Start1, N1}}, N1}
    end.

%% Args: a list (positional), or `#{args, kwargs, sink}' from
%% `dspex_workers:call/3' with keyword arguments or `stream/4' (chunks go to
%% the sink `{Pid, Tag}' as `{Tag, {chunk, Data}}').
start_call(From, Fn, Args, Deadline, #{next_id := Id} = S) ->
    {Msg, Sink} = case Args of
                      #{args := A, kwargs := K, sink := Sk} ->
                          {#{type => call, id => Id, fn => Fn, args => A, kwargs => K, stream => Sk =/= none}, Sk};
                      _ -> {#{type => call, id => Id, fn => Fn, args => Args}, none}
                  end,
    case dspex_json:encode(Msg) of
        {ok, Json} when byte_size(Json) > ?MAX_REQUEST ->
            %% the caller's mistake: answered, and the worker stays
            gen_server:reply(From, {error, {too_large, byte_size(Json)}}),
            maps:get(pool, S) ! {worker_idle, self(), ok},
            {noreply, S};
        {ok, Json} ->
            send_raw(Json, S),
            TRef = erlang:start_timer(Deadline, self(), {call_timeout, Id}, [{abs, true}]),
            {noreply, S#{phase := busy, call := {From, Id, TRef, Deadline}, sink => Sink, next_id := Id + 1}};
        {error, Why} ->
            gen_server:reply(From, {error, Why}),
            maps:get(pool, S) ! {worker_idle, self(), ok},
            {noreply, S}
    end.

send_frame(Map, S) ->
    {ok, Json} = dspex_json:encode(Map),
    send_raw(Json, S).

send_raw(Json, #{port := Port}) ->
    %% the port may have closed already (say epipe: the process is dead);
    %% its exit_status or 'EXIT' message follows
    _ = (catch port_command(Port, [<<(byte_size(Json)):32>>, Json])),
    ok.

frame(Map) ->
    {ok, Json} = dspex_json:encode(Map),
    [<<(byte_size(Json)):32>>, Json].

%%% Failure ------------------------------------------------------------------------

%% Ends the OS process (SIGKILL, reaped), answers the call in flight with
%% the reason and stops (the pool restarts the slot). The caller is answered
%% after the OS process is gone, so a caller told of a failure finds it gone,
%% but never after its deadline: a timeout is answered first, and any other
%% failure at the call's deadline if the process is not gone by then.
fail(Reason, S0) ->
    S1 = case Reason of
             timeout -> answer(timeout, S0);
             _ -> S0
         end,
    S2 = end_os_process(S1, Reason),
    telemetry(exit, #{pool => maps:get(name, maps:get(opts, S2)), slot => maps:get(slot, S2),
                      os_pid => maps:get(os_pid, S2), reason => Reason}),
    S3 = answer(Reason, S2),
    {stop, {shutdown, Reason}, S3#{port := closed, os := gone}}.

%% SIGKILLs the OS process if it still runs (by identity: a pid already
%% reaped may be another process's by now) and waits for it to be gone.
end_os_process(#{port := closed, os := gone} = S, _Reason) -> S;
end_os_process(#{os := Os} = S, Reason) ->
    case Os of
        gone -> ok;
        _ -> _ = dspex_workers_os:kill(Os)
    end,
    case reap(S, now_ms() + ?REAP_MS, Reason) of
        #{os := gone} = S1 -> S1;
        S1 ->
            logger:warning("dspex worker ~p/~p: OS process ~p still runs ~p ms after SIGKILL",
                           [maps:get(name, maps:get(opts, S1)), maps:get(slot, S1),
                            maps:get(os_pid, S1), ?REAP_MS],
                           #{domain => [dspex, workers]}),
            close_port(S1)
    end.

%% Waits until `Until' for the OS process to be gone: its exit status
%% (reaped), or /proc says it no longer runs (a port that closed without a
%% status, or a process whose stdout a child of its own still holds, never
%% gives one); then the port is closed and `os' is `gone'. Meanwhile the
%% call in flight is answered with `Reason' at its deadline.
reap(#{port := closed, os := gone} = S, _Until, _Reason) -> S;
reap(S0, Until, Reason) ->
    S = answer_due(Reason, S0),
    Port = maps:get(port, S),
    Now = now_ms(),
    receive
        {P, {exit_status, _}} when P =:= Port -> S#{port := closed, os := gone};
        {P, {data, _}} when P =:= Port ->
            %% dropped; a process that keeps writing must not keep us here
            case Now >= Until of
                true -> S;
                false -> reap(S, Until, Reason)
            end;
        {'EXIT', P, _} when P =:= Port -> reap(S#{port := closed}, Until, Reason)
    after min(?POLL_MS, max(0, Until - Now)) ->
            case maps:get(os, S) =/= gone andalso dspex_workers_os:alive(maps:get(os, S)) of
                false -> close_port(S#{os := gone});
                true when Now >= Until -> S;
                true -> reap(S, Until, Reason)
            end
    end.

close_port(#{port := closed} = S) -> S;
close_port(#{port := Port} = S) ->
    catch port_close(Port),
    S#{port := closed}.

%% Answers the call in flight (if any) with {error, Reason}.
answer(Reason, #{call := {From, _, TRef, _}} = S) ->
    _ = erlang:cancel_timer(TRef),
    gen_server:reply(From, {error, Reason}),
    S#{call := none};
answer(_Reason, S) -> S.

answer_due(Reason, #{call := {_, _, _, Deadline}} = S) ->
    case now_ms() >= Deadline of
        true -> answer(Reason, S);
        false -> S
    end;
answer_due(_Reason, S) -> S.

schedule_health(#{opts := #{health_interval_ms := infinity}} = S) -> S;
schedule_health(#{opts := #{health_interval_ms := Ms}} = S) ->
    _ = erlang:start_timer(Ms, self(), health),
    S.

phase_name({starting, _}) -> starting;
phase_name(P) -> P.

sample(Term) when is_binary(Term), byte_size(Term) > 64 -> <<(binary:part(Term, 0, 64))/binary, "...">>;
sample(Term) when is_binary(Term) -> Term;
sample(Term) ->
    case dspex_json:encode(Term) of
        {ok, B} -> sample(B);
        _ -> <<"?">>
    end.

now_ms() -> erlang:monotonic_time(millisecond).

telemetry(Event, Meta) ->
    dspex_telemetry:execute([dspex, workers, worker, Event], #{system_time => erlang:system_time()}, Meta).
