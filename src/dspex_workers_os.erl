%% @doc The OS side of a Python worker: who it is and how to kill it without
%% ever signalling another process.
%%
%% A worker's OS process is a child of the BEAM's `erl_child_setup', which
%% reaps it as soon as it exits; its pid is then free, and the next process
%% the kernel starts may get it. So a pid alone does not name a worker: this
%% module names it by `{OsPid, StartTime}', the start time (clock ticks since
%% boot, field 22 of `/proc/Pid/stat') read while the process was known to be
%% ours (just after it was spawned). `kill/1' sends SIGKILL only if the pid
%% still has that start time, checked and signalled by one shell builtin
%% sequence (no fork between check and `kill'): a reused pid would have to
%% be taken by a process started in the same clock tick, after a full wrap of
%% the pid space, between two instructions of that shell. `alive/1' tells
%% whether the worker still runs (a zombie or a reused pid is not it).
-module(dspex_workers_os).

-export([identity/1, alive/1, kill/1, await_gone/2]).
-export([kill_checked/2]).

-type identity() :: {OsPid :: pos_integer(), StartTime :: non_neg_integer()}.
-export_type([identity/0]).

%% the shell whose builtin kill is used (/bin/kill may not be installed)
-define(SH, "/bin/sh").

%% Kills $1 if field 22 of its stat line is $2. Everything after the last
%% ") " is fields 3.. (the command name may hold spaces and parentheses).
-define(KILL_SCRIPT,
        "exec 2>/dev/null; pid=$1; want=$2; "
        "IFS= read -r line < /proc/$pid/stat || exit 3; "
        "set -- ${line##*) }; "
        "[ \"${20}\" = \"$want\" ] || exit 4; "
        "kill -KILL $pid").

%% @doc The identity of the running process `OsPid', or `gone' if there is
%% no such process (or only its zombie).
-spec identity(pos_integer()) -> {ok, identity()} | gone.
identity(OsPid) when is_integer(OsPid), OsPid > 0 ->
    case stat(OsPid) of
        {ok, State, Start} when State =/= $Z -> {ok, {OsPid, Start}};
        _ -> gone
    end.

%% @doc Whether the process named by `Identity' still runs (not a zombie,
%% and its pid not taken by another process).
-spec alive(identity()) -> boolean().
alive({OsPid, Start}) ->
    case stat(OsPid) of
        {ok, State, Start} -> State =/= $Z;
        _ -> false
    end.

%% @doc SIGKILLs the process named by `Identity' if it still runs:
%% `killed' (the signal was sent), `gone' (it is not there any more: its pid
%% is free or another process's; nothing was signalled), or `{error,
%% Reason}' (the shell could not be run).
-spec kill(identity()) -> killed | gone | {error, term()}.
kill({OsPid, Start} = Identity) when is_integer(OsPid), OsPid > 0, is_integer(Start), Start >= 0 ->
    %% no shell to start for a process already gone (the usual case after
    %% an exit): the shell checks again before it signals
    case alive(Identity) of
        false -> gone;
        true -> kill_checked(OsPid, Start)
    end.

%% @private The shell step of `kill/1' (exported for its test): checks the
%% start time and signals in one shell.
-spec kill_checked(pos_integer(), non_neg_integer()) -> killed | gone | {error, term()}.
kill_checked(OsPid, Start) ->
    try open_port({spawn_executable, ?SH},
                  [{args, ["-c", ?KILL_SCRIPT, "dspex-kill", integer_to_list(OsPid), integer_to_list(Start)]},
                   exit_status, hide, in]) of
        Port ->
            receive
                {Port, {exit_status, 0}} -> killed;
                {Port, {exit_status, _}} -> gone
            after 10000 ->
                    catch port_close(Port),
                    {error, kill_timeout}
            end
    catch error:Why -> {error, Why}
    end.

%% @doc Waits (polling `/proc' every 5 ms) until the process is no longer
%% running, for at most `Ms' ms: `true' if it is gone.
-spec await_gone(identity(), non_neg_integer()) -> boolean().
await_gone(Identity, Ms) ->
    await_gone_until(Identity, erlang:monotonic_time(millisecond) + Ms).

await_gone_until(Identity, Deadline) ->
    case alive(Identity) of
        false -> true;
        true ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> false;
                false -> receive after 5 -> await_gone_until(Identity, Deadline) end
            end
    end.

%% {ok, StateChar, StartTime} from /proc/Pid/stat.
stat(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Line} ->
            case string:split(Line, ") ", trailing) of
                [_, Rest] ->
                    case string:lexemes(Rest, " \n") of
                        [<<State>> | Fields] when length(Fields) >= 19 ->
                            {ok, State, binary_to_integer(lists:nth(19, Fields))};
                        _ -> error
                    end;
                _ -> error
            end;
        {error, _} -> error
    end.
