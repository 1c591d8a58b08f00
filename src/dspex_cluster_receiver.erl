%% @doc Group commit and pipelining of sync replication, replica side: one
%% receiver per node takes the batches of every owner's
%% `dspex_cluster_shipper' (one message per batch).
%%
%% A batch is split by replica pool process (`dspex_cluster_replica:name/1',
%% the process every other change of the session goes through: fences,
%% installs, takeovers), keeping the batch order; each pool process applies
%% its part in one pass, in order per session, with the rules of a single
%% change (an older epoch is refused with `{stale_epoch, Fence}', a repeat is
%% ignored, a gap is `need_full'): each run of consecutive replayed sets of a
%% session in one NIF call (`dspex_nif:replica_apply_batch/3'), any other
%% record by itself (see `dspex_cluster_replica'), and answers here; once every part is back
%% the shipper gets one answer for the batch: the records that failed and why.
%% A pool process that is not registered (it is restarting) fails its part
%% (`replica_unavailable') rather than this process. Async replication
%% travels the same way (nobody waits for its answer).
-module(dspex_cluster_receiver).
-behaviour(gen_server).

-export([start_link/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% @doc Starts the receiver (registered `dspex_cluster_receiver').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec init([]) -> {ok, map()}.
init([]) -> {ok, #{}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(_, _From, St) -> {reply, {error, badarg}, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({batch, Shipper, No, Owner, Recs}, St) ->
    Parts = split(Recs, 1, #{}),
    Key = {Shipper, No},
    %% a pool process not registered (restarting) fails its records
    %% (replica_unavailable at the owner) instead of this process
    {Sent, Failed} = maps:fold(fun(Pool, Rev, {N, F}) ->
                                       Part = lists:reverse(Rev),
                                       try Pool ! {apply_batch, self(), Key, Owner, Part} of
                                           _ -> {N + 1, F}
                                       catch error:badarg ->
                                               {N, [{I, {error, replica_unavailable}} || {I, _, _, _, _} <- Part] ++ F}
                                       end
                               end, {0, []}, Parts),
    case Sent of
        0 ->
            Shipper ! {batch_done, No, Failed},
            {noreply, St};
        _ -> {noreply, St#{Key => {Sent, Failed}}}
    end;
handle_info({applied, {Shipper, No} = Key, Fails}, St) ->
    case St of
        #{Key := {1, Acc}} ->
            Shipper ! {batch_done, No, Fails ++ Acc},
            {noreply, maps:remove(Key, St)};
        #{Key := {N, Acc}} ->
            {noreply, St#{Key := {N - 1, Fails ++ Acc}}};
        _ -> {noreply, St}
    end;
handle_info(_, St) -> {noreply, St}.

%% #{Pool => [{Index, Session, Epoch, Seq, Payload}]} (each list reversed)
split([], _, Acc) -> Acc;
split([{S, E, Seq, P} | T], I, Acc) ->
    Pool = dspex_cluster_replica:name(S),
    split(T, I + 1, Acc#{Pool => [{I, S, E, Seq, P} | maps:get(Pool, Acc, [])]}).
