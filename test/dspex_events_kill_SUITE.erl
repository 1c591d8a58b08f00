%% Common Test: the event log survives kill -9 of the node.
%%
%% A node runs as an OS process (`erl') with the application and its event log
%% in a fresh directory; 8 writer processes set variables and print an ACK line
%% for every write once it returned. After enough ACKs the OS process is killed
%% with SIGKILL; this node then opens the same directory and checks the log.
%% `sync': every acknowledged write's event is present, the session's
%% sequences are 1..N without a gap, and each variable's versions appear in
%% order. `async': what is present is a gapless prefix in order (the lost tail
%% is at most what was queued, see the dspex_events docs).
-module(dspex_events_kill_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_testcase/2, end_per_testcase/2]).
-export([sync_acked_writes_survive_kill_9/1, async_log_is_a_gapless_prefix_after_kill_9/1]).

all() -> [sync_acked_writes_survive_kill_9, async_log_is_a_gapless_prefix_after_kill_9].

init_per_testcase(Name, Config) ->
    Dir = filename:join(?config(priv_dir, Config), atom_to_list(Name)),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    [{dir, Dir} | Config].

end_per_testcase(_, _Config) ->
    _ = application:stop(dspex_bridge),
    application:unset_env(dspex_bridge, event_dir),
    ok.

sync_acked_writes_survive_kill_9(Config) ->
    Dir = ?config(dir, Config),
    Acks = run_and_kill(Dir, sync, 400),
    Evs = reopen_and_read(Dir),
    check_gapless(Evs),
    Present = maps:from_list([{{N, V}, true} || #{type := variable_updated, data := #{name := N, version := V}} <- Evs]),
    Missing = [A || A <- Acks, not maps:is_key(A, Present)],
    ?assertEqual([], Missing),
    ct:pal("~p acknowledged sync writes before kill -9, ~p events after restart", [length(Acks), length(Evs)]).

async_log_is_a_gapless_prefix_after_kill_9(Config) ->
    Dir = ?config(dir, Config),
    Acks = run_and_kill(Dir, async, 2000),
    Evs = reopen_and_read(Dir),
    check_gapless(Evs),
    ct:pal("~p acknowledged async writes before kill -9, ~p events after restart", [length(Acks), length(Evs)]).

%% Every variable's versions appear in increasing order, and the session's
%% sequences are exactly 1..N.
check_gapless(Evs) ->
    ?assertEqual(lists:seq(1, length(Evs)), [S || #{sequence := S} <- Evs]),
    ByVar = lists:foldl(fun(#{type := variable_updated, data := #{name := N, version := V}}, M) ->
                                maps:update_with(N, fun(L) -> [V | L] end, [V], M);
                           (_, M) -> M
                        end, #{}, Evs),
    maps:foreach(fun(_, Vs) -> ?assertEqual(lists:seq(1, length(Vs)), lists:reverse(Vs)) end, ByVar).

reopen_and_read(Dir) ->
    _ = application:load(dspex_bridge),
    application:set_env(dspex_bridge, event_dir, Dir),
    application:set_env(dspex_bridge, grpc_enabled, false),
    application:set_env(dspex_bridge, prometheus_enabled, false),
    {ok, _} = application:ensure_all_started(dspex_bridge),
    {ok, Evs} = dspex_events:read(<<"k9">>, #{limit => 100000}),
    Evs.

%% Starts the node, waits for MinAcks ACK lines, kills it with SIGKILL while
%% the writers keep going, and returns every {Var, Version} acknowledged.
run_and_kill(Dir, Durability, MinAcks) ->
    Ebin = [filename:dirname(code:which(M)) || M <- [dspex_events]],
    Script = lists:flatten(io_lib:format(
        "application:load(dspex_bridge),"
        "application:set_env(dspex_bridge, event_dir, ~p),"
        "application:set_env(dspex_bridge, grpc_enabled, false),"
        "application:set_env(dspex_bridge, prometheus_enabled, false),"
        "{ok, _} = application:ensure_all_started(dspex_bridge),"
        "{ok, _} = dspex_store:create_session(<<\"k9\">>, #{ttl => infinity}),"
        "[{ok, _} = dspex_store:register(<<\"k9\">>, integer_to_binary(I), integer, 0) || I <- lists:seq(1, 8)],"
        "io:format(\"READY~~n\"),"
        "W = fun W(K, N) -> {ok, V} = dspex_store:set(<<\"k9\">>, K, N, #{durability => ~p}),"
        "                   io:format(\"ACK ~~s ~~b~~n\", [K, V]), W(K, N + 1) end,"
        "[spawn(fun() -> W(integer_to_binary(I), 1) end) || I <- lists:seq(1, 8)],"
        "receive after infinity -> ok end.", [Dir, Durability])),
    Erl = os:find_executable("erl"),
    Port = open_port({spawn_executable, Erl},
                     [{args, ["-noshell", "-noinput", "-pa" | Ebin] ++ ["-eval", Script]},
                      {line, 4096}, exit_status, use_stdio, stderr_to_stdout]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    wait_line(Port, <<"READY">>),
    Acks = collect_acks(Port, MinAcks, []),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    drain(Port, Acks).

wait_line(Port, Want) ->
    receive
        {Port, {data, {eol, Line}}} ->
            case list_to_binary(Line) of
                Want -> ok;
                Other -> ct:pal("node: ~s", [Other]), wait_line(Port, Want)
            end;
        {Port, {exit_status, S}} -> ct:fail({node_exited, S})
    after 60000 -> ct:fail(no_ready)
    end.

collect_acks(_Port, 0, Acc) -> Acc;
collect_acks(Port, N, Acc) ->
    receive
        {Port, {data, {eol, "ACK " ++ Rest}}} -> collect_acks(Port, N - 1, [ack(Rest) | Acc]);
        {Port, {data, _}} -> collect_acks(Port, N, Acc);
        {Port, {exit_status, S}} -> ct:fail({node_exited, S})
    after 60000 -> ct:fail({acks_missing, N})
    end.

%% ACK lines printed before the kill may still be in the pipe: read until the
%% port reports the exit.
drain(Port, Acc) ->
    receive
        {Port, {data, {eol, "ACK " ++ Rest}}} -> drain(Port, [ack(Rest) | Acc]);
        {Port, {data, _}} -> drain(Port, Acc);
        {Port, {exit_status, _}} -> Acc
    after 60000 -> ct:fail(no_exit)
    end.

ack(Rest) ->
    [K, V] = string:split(Rest, " "),
    {list_to_binary(K), list_to_integer(V)}.
