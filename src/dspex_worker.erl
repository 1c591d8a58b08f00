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
%% deadline, missed ping or exit ends this process after the OS process is
%% SIGKILLed and reaped; the pool starts a new one.
-module(dspex_worker).
-behaviour(gen_server).

-export([start_link/3, run/5]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% the shell's builtin kill: /bin/kill (procps) may not be installed
-define(SH, "/bin/sh").

%% @doc Starts a worker for slot `Slot' of `Pool' (linked to the caller, the
%% pool). `Opts' are the pool's (see `dspex_workers:start_pool/2').
-spec start_link(pid(), pos_integer(), map()) -> {ok, pid()} | {error, term()}.
start_link(Pool, Slot, Opts) -> gen_server:start_link(?MODULE, {Pool, Slot, Opts}, []).

%% @doc Asks the worker to run `Fn(Args...)' and reply to `From' (a
%% `gen_server' caller) by `Deadline' (monotonic ms); the pool only sends this
%% to a worker that said it is free.
-spec run(pid(), gen_server:from(), binary(), list(), integer()) -> ok.
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
            "--worker-id", integer_to_list(Slot)],
    PortEnv = [{"DSPEX_BRIDGE_ADDRESS", Address}, {"DSPEX_SESSION_ID", Session},
               {"DSPEX_WORKER_ID", integer_to_list(Slot)}, {"PYTHONUNBUFFERED", "1"} | Env],
    try open_port({spawn_executable, Python},
                  [binary, stream, exit_status, use_stdio, hide, {args, Args}, {env, PortEnv}]) of
        Port ->
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            TRef = erlang:start_timer(ReadyMs, self(), ready_timeout),
            telemetry(start, #{pool => maps:get(name, Opts), slot => Slot, os_pid => OsPid}),
            {ok, #{pool => Pool, slot => Slot, opts => Opts, port => Port, os_pid => OsPid,
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
    fail({worker_exit, Status}, S#{port := closed});
handle_info({run, From, Fn, Args, Deadline}, #{phase := idle} = S) ->
    start_call(From, Fn, Args, Deadline, S);
handle_info({run, From, _, _, _}, S) ->
    %% the pool never does this; answer rather than leave the caller waiting
    gen_server:reply(From, {error, worker_busy}),
    {noreply, S};
handle_info({timeout, _, ready_timeout}, #{phase := {starting, _}} = S) ->
    fail(not_ready, S);
handle_info({timeout, _, {call_timeout, Id}}, #{call := {_, Id, _}} = S) ->
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

%% @private The OS process must be gone (SIGKILLed if need be, and reaped)
%% before this process is.
terminate(_Reason, #{port := closed}) -> ok;
terminate(_Reason, #{port := Port, os_pid := OsPid, opts := O} = S) ->
    _ = (catch port_command(Port, frame(#{type => stop}))),
    case await_exit(Port, maps:get(stop_grace_ms, O)) of
        true -> ok;
        false ->
            kill(OsPid),
            _ = await_exit(Port, 5000),
            ok
    end,
    catch port_close(Port),
    %% a call in flight is answered once its worker is gone
    case S of
        #{call := {From, _, _}} -> gen_server:reply(From, {error, pool_stopped});
        _ -> ok
    end,
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
message(<<"reply">>, #{<<"id">> := Id} = Msg, #{call := {From, Id, TRef}, pool := Pool} = S) ->
    _ = erlang:cancel_timer(TRef),
    Reply = case Msg of
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

start_call(From, Fn, Args, Deadline, #{next_id := Id} = S) ->
    case dspex_json:encode(#{type => call, id => Id, fn => Fn, args => Args}) of
        {ok, Json} ->
            send_raw(Json, S),
            TRef = erlang:start_timer(Deadline, self(), {call_timeout, Id}, [{abs, true}]),
            {noreply, S#{phase := busy, call := {From, Id, TRef}, next_id := Id + 1}};
        {error, Why} ->
            gen_server:reply(From, {error, Why}),
            maps:get(pool, S) ! {worker_idle, self(), ok},
            {noreply, S}
    end.

send_frame(Map, S) ->
    {ok, Json} = dspex_json:encode(Map),
    send_raw(Json, S).

send_raw(Json, #{port := Port}) ->
    %% the port may have closed already: its exit_status message follows
    _ = (catch port_command(Port, [<<(byte_size(Json)):32>>, Json])),
    ok.

frame(Map) ->
    {ok, Json} = dspex_json:encode(Map),
    [<<(byte_size(Json)):32>>, Json].

%%% Failure ------------------------------------------------------------------------

%% Kills and reaps the OS process, then answers the call in flight with
%% the reason (so a caller told of a failure finds the process gone) and
%% stops (the pool restarts the slot).
fail(Reason, #{call := Call} = S) ->
    case S of
        #{port := closed} -> ok;
        #{port := Port, os_pid := OsPid} ->
            kill(OsPid),
            _ = await_exit(Port, 5000),
            catch port_close(Port)
    end,
    telemetry(exit, #{pool => maps:get(name, maps:get(opts, S)), slot => maps:get(slot, S),
                      os_pid => maps:get(os_pid, S), reason => Reason}),
    case Call of
        {From, _, TRef} ->
            _ = erlang:cancel_timer(TRef),
            gen_server:reply(From, {error, Reason});
        none -> ok
    end,
    {stop, {shutdown, Reason}, S#{call := none, port := closed}}.

kill(OsPid) ->
    try open_port({spawn_executable, ?SH}, [{args, ["-c", "kill -KILL " ++ integer_to_list(OsPid)]},
                                             exit_status, hide]) of
        P -> receive {P, {exit_status, _}} -> ok after 5000 -> catch port_close(P) end
    catch error:_ -> ok
    end.

%% Drops the port's output while waiting for its exit status.
await_exit(Port, Ms) ->
    Deadline = now_ms() + Ms,
    await_exit_until(Port, Deadline).

await_exit_until(Port, Deadline) ->
    receive
        {Port, {exit_status, _}} -> true;
        {Port, {data, _}} -> await_exit_until(Port, Deadline)
    after max(0, Deadline - now_ms()) -> false
    end.

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
