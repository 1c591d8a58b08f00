%% @private
%% @doc Retention passes of the event log, each in a process of its own beside
%% the `dspex_events' server, so that a long pass (tens of seconds for millions
%% of events) never holds up the server's subscribers and calls.
%%
%% The server keeps a `passes()' value and calls `request/4' for each pass it
%% is asked for (`expire_now/0', `expire_before/1,2', the hourly timer). One
%% pass runs at a time: two passes over the same pages would archive them
%% twice and race each other's deletes. A request made while a pass runs
%% waits for it; the requests run one after another in the order they came,
%% each with its own cutoff, and each caller gets its own pass's result. A
%% timer request is dropped when a timer request is already waiting.
%%
%% The pass process is linked to the server and registered as
%% `dspex_events_retention'. It sends `{dspex_events_retention, Pid, Result}'
%% and exits normally. When it dies before (killed, crashed), the server's
%% `{'EXIT', Pid, Reason}' ends the pass with `{error, {archive, {exit,
%% Reason}}}' and the next request starts. When the server stops, `stop/1'
%% kills the pass and waits for it before the log is closed, and every caller
%% gets `{error, {archive, stopped}}'. A killed pass is safe at any point: a
%% page is deleted only after its archive append was synced (`run/3'), and an
%% append torn by the kill is cut off by the next one
%% (`dspex_events_archive').
-module(dspex_events_retention).

-export([new/0, request/4, finished/3, exited/3, stop/1, stop_stale/0]).
-export_type([passes/0, hook/0]).

-define(PAGE, 1000).

-type hook() :: fun(([map()]) -> term()).
%% who asked: a caller to answer, or the retention timer
-type who() :: gen_server:from() | timer.
-opaque passes() :: #{running := undefined | {pid(), who()},
                      waiting := queue:queue({integer(), hook(), who()})}.

%% @doc No pass running or waiting.
-spec new() -> passes().
new() -> #{running => undefined, waiting => queue:new()}.

%% @doc Asks for a pass archiving and deleting the events older than `Ts'
%% (microseconds): started now when none runs, else queued. `Who' is
%% answered with the pass's result (`gen_server:reply/2').
-spec request(integer(), hook(), who(), passes()) -> passes().
request(Ts, Hook, Who, #{running := undefined} = P) -> P#{running := {start(Ts, Hook), Who}};
request(Ts, Hook, Who, #{waiting := W} = P) ->
    case Who =:= timer andalso lists:any(fun({_, _, X}) -> X =:= timer end, queue:to_list(W)) of
        true -> P;
        false -> P#{waiting := queue:in({Ts, Hook, Who}, W)}
    end.

%% @doc The server got `{dspex_events_retention, Pid, Result}': answers the
%% pass's caller and starts the next waiting pass.
-spec finished(pid(), {ok, non_neg_integer()} | {error, term()}, passes()) -> passes().
finished(Pid, Result, #{running := {Pid, Who}} = P) ->
    answer(Who, Result),
    next(P#{running := undefined});
finished(_, _, P) -> P.

%% @doc The server got `{'EXIT', Pid, Reason}'. For the running pass it died
%% before it answered (a pass that answered is no longer running): its caller
%% gets `{error, {archive, {exit, Reason}}}'. Any other pid: nothing changes.
-spec exited(pid(), term(), passes()) -> passes().
exited(Pid, Reason, #{running := {Pid, Who}} = P) ->
    logger:error("dspex_events: a retention pass stopped: ~tp", [Reason]),
    answer(Who, {error, {archive, {exit, Reason}}}),
    next(P#{running := undefined});
exited(_, _, P) -> P.

%% @doc Ends the running pass and returns once it is gone (none of its steps
%% can follow, so the log can be closed); every caller, running or waiting,
%% gets `{error, {archive, stopped}}'.
-spec stop(passes()) -> ok.
stop(#{running := R, waiting := W}) ->
    case R of
        {Pid, Who} ->
            kill(Pid),
            answer(Who, {error, {archive, stopped}});
        undefined -> ok
    end,
    [answer(Who, {error, {archive, stopped}}) || {_, _, Who} <- queue:to_list(W)],
    ok.

%% @doc Kills a pass left by a server that died without `stop/1' (killed):
%% its link kills it too, but not necessarily before the new server opens
%% the log. Returns once none is left.
-spec stop_stale() -> ok.
stop_stale() ->
    case whereis(?MODULE) of
        undefined -> ok;
        Pid -> kill(Pid)
    end.

kill(Pid) ->
    M = erlang:monitor(process, Pid),
    exit(Pid, kill),
    receive {'DOWN', M, process, Pid, _} -> ok end.

answer(timer, {ok, _}) -> ok;
answer(timer, {error, {archive, {exit, _}}}) -> ok; % logged by exited/3
answer(timer, Error) -> logger:error("dspex_events: the retention pass failed: ~tp", [Error]);
answer(From, Result) -> gen_server:reply(From, Result).

next(#{waiting := W} = P) ->
    case queue:out(W) of
        {{value, {Ts, Hook, Who}}, W1} -> P#{running := {start(Ts, Hook), Who}, waiting := W1};
        {empty, _} -> P
    end.

%% Runs in the server: the pass is linked to it, so it dies with it.
start(Ts, Hook) ->
    Server = self(),
    Dir = dspex_events:archive_dir(),
    spawn_link(fun() ->
                       %% the name is free: the last pass let it go before it answered, or was
                       %% waited for (stop/1, stop_stale/0)
                       true = register(?MODULE, self()),
                       Result = run(Dir, Ts, Hook),
                       %% before the answer, which may start the next pass at once (this process
                       %% may not have exited yet)
                       true = unregister(?MODULE),
                       Server ! {?MODULE, self(), Result}
               end).

%% One pass: archives and deletes every event older than `Ts', a page
%% at a time; `Hook' is called with each page once it is archived and before
%% its events are deleted. `{ok, Deleted}' or the first error.
-spec run(file:filename(), integer(), hook()) -> {ok, non_neg_integer()} | {error, term()}.
run(Dir, Ts, Hook) ->
    try run_(Dir, Ts, Hook, 0, 0)
    catch C:R -> {error, {archive, {C, R}}}
    end.

%% One page at a time: archive it (synced), then delete exactly its events.
%% The delete is bounded by the page's position range and refused when that
%% range holds more old events than the page (positions become visible in
%% order, so none can appear inside a range already read): nothing is
%% deleted that was not archived, whatever commits between the two steps.
%% A failed delete leaves the page in both (the archive reader drops the copy).
run_(Dir, Ts, Hook, Pos, N) ->
    case dspex_nif:events_read(#{ts_to => Ts - 1, pos_from => Pos, limit => ?PAGE}) of
        {ok, []} -> {ok, N};
        {ok, Evs} ->
            #{position := First} = hd(Evs),
            #{position := Last} = lists:last(Evs),
            case dspex_events_archive:write_page(Dir, Evs) of
                ok ->
                    _ = Hook(Evs),
                    case dspex_nif:events_expire(Ts, First, Last, length(Evs)) of
                        {ok, D} -> run_(Dir, Ts, Hook, Last + 1, N + D);
                        Error -> Error
                    end;
                Error -> Error
            end;
        Error -> Error
    end.
