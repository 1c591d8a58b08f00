%% @doc Optimizer coordination: at most one optimizer tunes a variable at a time.
%%
%% A lock is taken with `acquire/4' and carries a fencing token that only grows
%% (per variable and across restarts). While a variable is locked, the store
%% refuses any write without the current token (`{error, {locked, Holder}}'),
%% checked inside the write's critical section in the NIF; a write with a token
%% that is no longer current is `{error, stale_lock}', whether or not another
%% optimizer holds the variable now. Writes made by the holder pass the
%% lock: `dspex_store:set(S, Var, V, #{lock => Lock})'.
%%
%% This server serialises lock decisions and watches holders and waiters: when
%% a holder dies its lock is freed and the next waiter granted; leases expire
%% unless renewed. It is never on the path of reads or writes.
%%
%% With a cluster (`dspex_cluster') the requests on a session go to the
%% `dspex_locks' server of its owner node, from any node: the holder is the
%% calling process (or `pid') wherever it runs, monitored across nodes (its
%% death, or its node's, frees the lock), and its token is accepted by writes
%% forwarded to the owner. Locks are not replicated: when the owner's node
%% dies they are gone (see `dspex_cluster'); a request cut by that death is
%% `{error, {retry, owner_down}}'. `active/0' lists the locks of this node's
%% server only.
%%
%% The server's state survives its own crash: every lock it grants is also
%% recorded in the NIF (`dspex_nif:var_lock/6', with the holder pid, priority,
%% lease, objective and metric), and a restarted server rebuilds its table
%% from there: it monitors each holder again (a holder that died meanwhile is
%% freed at once, by the monitor's `noproc'), restarts each lease, and keeps
%% the tokens (they keep rising: the counter lives in the store). Reported
%% progress and waiters are lost with the dead server: a caller waiting in
%% `acquire/4' gets `{error, {lock_server, down}}', and a lock the dead
%% server may have granted to that very request is released by the new
%% server; any other call cut so is made again to the new server (so a
%% release lost with the dead server still happens). A server stopped by its supervisor (`shutdown') or by
%% `application:stop/1' releases every lock instead.
%%
%% Calls are bounded: a call the server does not answer within 5 s (or, for
%% a waiting `acquire/4', 5 s after its `timeout'; application env
%% `lock_call_timeout_ms') returns
%% `{error, {lock_server, timeout}}' (a waiting acquire is withdrawn then;
%% `active/0' exits instead, as `gen_server:call/3'). The one call without a
%% bound of its own is an acquire that asked to wait forever (`timeout' is
%% `infinity', the default): it still ends with `{error, {lock_server, down}}'
%% if the server dies.
%% `as' must be a binary (or `undefined'), `context' a map: any other
%% principal raises `badarg' in the caller, as in `dspex_store'.
%%
%% A lock goes with its session. A locked variable cannot be deleted
%% (`{error, {locked, Holder}}'), but when its session is deleted or expires
%% (or a new session of that id is created or imported over an expired one)
%% the lock is freed, its holder receives
%% `{dspex_lock_lost, Session, Var, Token, Reason}' (`Reason':
%% `session_deleted' or `session_expired'), every waiter gets
%% `{error, session_not_found}', and the event `released' carries that
%% `reason'. The store tells the server (`dspex_store:delete_session/1', a
%% created or imported session; the sweeper after expiring sessions), as it
%% tells no process itself. A lock found on a variable that is no longer the
%% one it was granted on (seen by a later `acquire/4' or `status/2' of the
%% name) is dropped so too, with `Reason' `variable_deleted' and waiters
%% answered `{error, {not_found, Var}}'. A variable registered again under the
%% name starts unlocked, and the old lock is no longer its holder's
%% (`release/1', `renew/1', ... answer `{error, not_lock_owner}').
-module(dspex_locks).
-behaviour(gen_server).

-export([start_link/0, acquire/4, release/1, renew/1, report_progress/4, status/2, active/0, stop/2]).
-export([session_gone/2, swept/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% How long a call may wait for the server beyond its own waiting time (ms):
%% application env `lock_call_timeout_ms', default 5000.
-define(CALL_MARGIN, application:get_env(dspex_bridge, lock_call_timeout_ms, 5000)).
%% The longest timer and call timeout the runtime takes (ms, about 49.7 days):
%% the bound of the `timeout' and `lease' options.
-define(MAX_MS, 16#FFFFFFFF).

-type lock() :: #{session := dspex_store:session_id(), variable := binary(), optimizer := term(),
                  token := pos_integer(), pid := pid()}.
-type acquire_opts() :: #{conflict => wait | abort | preempt, timeout => timeout(), priority => integer(),
                          pid => pid(), lease => pos_integer() | infinity,
                          objective => minimize | maximize, metric => term()}.
-export_type([lock/0]).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() -> gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Takes the lock on `Var' for optimizer `OptimizerId'.
%% Options: `conflict' (`wait', the default: FIFO queue per variable; `abort':
%% `{error, {lock_held_by, Holder}}' at once; `preempt': if `priority' is higher
%% than the holder's and the holder reported at least
%% `min_iterations_before_preempt' iterations (application env, default 0) the
%% holder receives `{dspex_preempted, Session, Var, Token}' and loses the lock,
%% otherwise it waits), `timeout' ms for waiting (`{error, timeout}', the waiter
%% is gone; default `infinity': as long as it takes; at most 4294967295),
%% `priority' (integer, default 0), `pid' (the holder, default the
%% caller), `lease' ms (at most 4294967295; expires unless `renew/1'd; the holder then receives
%% `{dspex_lock_expired, Session, Var, Token}'), `objective' (`minimize' or
%% `maximize') and `metric' (the key of the metrics map that
%% `report_progress/4' ranks by; default: the reported value itself), and
%% `as' / `context' to act for another session (`optimize' permission, checked
%% when the lock is granted; `{error, access_denied}').
-spec acquire(dspex_store:session_id(), dspex_store:var_key(), term(), acquire_opts()) ->
          {ok, lock()} | {error, term()}.
acquire(Session, Var, OptimizerId, Opts) when is_map(Opts) ->
    check_principal(Opts),
    case check_opts(Opts) of
        {ok, Cfg} ->
            %% the request's reference travels with the lock (into the NIF's
            %% registry too): a request cut off by a timeout or by the death of
            %% the server is withdrawn by it, granted or not
            Req = make_ref(),
            %% capped: gen_server takes no longer timeout (a longer one
            %% would exit at once, as if the server were down)
            Wait = case maps:get(timeout, Cfg) of
                       infinity -> infinity;
                       T -> min(T + ?CALL_MARGIN, ?MAX_MS)
                   end,
            case call(Session, {acquire, Session, Var, OptimizerId, Cfg#{req => Req}}, Wait) of
                {error, {lock_server, _}} = E ->
                    abandon(Session, Req),
                    E;
                R -> R
            end;
        Error -> Error
    end.

%% A principal that does not parse never acts as anyone: badarg, as in the store.
check_principal(Opts) ->
    case maps:get(as, Opts, undefined) of
        As when is_binary(As); As =:= undefined -> ok;
        _ -> erlang:error(badarg)
    end,
    case Opts of
        #{context := C} when not is_map(C) -> erlang:error(badarg);
        _ -> ok
    end.

check_opts(Opts) ->
    Cfg = #{conflict => maps:get(conflict, Opts, wait), timeout => maps:get(timeout, Opts, infinity),
            priority => maps:get(priority, Opts, 0), pid => maps:get(pid, Opts, self()),
            lease => maps:get(lease, Opts, infinity), objective => maps:get(objective, Opts, minimize),
            metric => maps:get(metric, Opts, undefined), acl => maps:with([as, context], Opts)},
    Checks = [{conflict, lists:member(maps:get(conflict, Cfg), [wait, abort, preempt])},
              {timeout, valid_ms(maps:get(timeout, Cfg))},
              {priority, is_integer(maps:get(priority, Cfg))},
              {pid, is_pid(maps:get(pid, Cfg))},
              {lease, valid_ms(maps:get(lease, Cfg))},
              {objective, lists:member(maps:get(objective, Cfg), [minimize, maximize])}],
    case [K || {K, false} <- Checks] of
        [] -> {ok, Cfg};
        [K | _] -> {error, {invalid_argument, K}}
    end.

%% Bounded by what erlang:send_after/3 takes: a longer timer would crash the server.
valid_ms(infinity) -> true;
valid_ms(N) -> is_integer(N) andalso N >= 0 andalso N =< ?MAX_MS.

%% @doc Releases the lock; only its holder process may (`{error, not_lock_owner}').
%% The next waiter is granted at once.
-spec release(lock()) -> ok | {error, term()}.
release(Lock) -> call(session_of(Lock), {release, Lock, self()}).

%% @doc Restarts the lease of a held lock.
-spec renew(lock()) -> ok | {error, term()}.
renew(Lock) -> call(session_of(Lock), {renew, Lock}).

%% @doc Records an iteration of the holder: `Value' is the candidate value of
%% the variable, `Metrics' a map. The best candidate by the lock's objective and
%% metric is kept (`status/2', `stop/2').
-spec report_progress(lock(), non_neg_integer(), dspex_store:value(), map()) -> ok | {error, term()}.
report_progress(Lock, Iteration, Value, Metrics) when is_integer(Iteration), Iteration >= 0, is_map(Metrics) ->
    call(session_of(Lock), {progress, Lock, Iteration, Value, Metrics}).

%% @doc The lock state of a variable: `locked', and when locked `optimizer',
%% `token', `priority', `iterations', `best' (`#{value, score, iteration}' or
%% `undefined'), `waiters'.
-spec status(dspex_store:session_id(), dspex_store:var_key()) -> {ok, map()} | {error, term()}.
status(Session, Var) ->
    case var_of(Session, Var) of
        {ok, Name, Id} -> call(Session, {status, {Session, Name}, Id});
        Error -> Error
    end.

%% @doc Every held lock. Exits (as `gen_server:call/3') if the server does
%% not answer within 5 s.
-spec active() -> [map()].
active() -> gen_server:call(?MODULE, active, ?CALL_MARGIN).

%% @doc Ends an optimization: with `#{apply_best => true}' writes the best
%% reported value (under the lock), then releases.
%% Returns `{ok, #{best => Best, applied => boolean()}}'. The write acts as
%% the lock's principal (the `as' / `context' it was acquired with), so it
%% needs `write' as any write does: a principal with only `optimize' gets
%% `applied => false, apply_error => access_denied' (the lock is released
%% all the same).
-spec stop(lock(), #{apply_best => boolean()}) -> {ok, map()} | {error, term()}.
stop(Lock, Opts) when is_map(Opts) ->
    call(session_of(Lock), {stop, Lock, self(), maps:get(apply_best, Opts, false) =:= true}).

%% This node's server, or with a cluster the session owner's. A call cut by
%% the death of the local server is made once more to its successor (once
%% the supervisor restarted it, waiting boundedly): a release lost with the
%% dead server would otherwise leave the (adopted) lock to a holder that
%% believes it released it. Every such call is idempotent on the lock token.
call(Session, Msg) ->
    case call(Session, Msg, ?CALL_MARGIN) of
        {error, {lock_server, down}} = E ->
            case await_server(200) of
                ok -> call(Session, Msg, ?CALL_MARGIN);
                error -> E
            end;
        R -> R
    end.

await_server(0) -> error;
await_server(N) ->
    case whereis(?MODULE) of
        undefined -> timer:sleep(10), await_server(N - 1);
        _ -> ok
    end.

call(Session, Msg, Timeout) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        false -> bounded_call(?MODULE, Msg, Timeout);
        true -> dspex_cluster:call_server(Session, ?MODULE, Msg)
    end.

%% A call that ends in an answer or `{error, {lock_server, timeout | down}}'.
bounded_call(Server, Msg, Timeout) ->
    try gen_server:call(Server, Msg, Timeout)
    catch
        exit:{timeout, _} -> {error, {lock_server, timeout}};
        exit:{_, {gen_server, call, _}} -> {error, {lock_server, down}}
    end.

%% Withdraws an acquire request whose answer was lost: a waiter is dropped, a
%% lock granted to it released. After the death of the server the request
%% goes to its successor (waiting, boundedly, for the supervisor to restart it).
abandon(Session, Req) ->
    case persistent_term:get(dspex_cluster_routing, false) of
        true -> ok;
        false -> abandon_local(Session, Req, 200)
    end.

abandon_local(_Session, Req, _N) ->
    case await_server(200) of
        ok -> gen_server:cast(?MODULE, {abandon, Req});
        error -> ok
    end.

session_of(#{session := S}) -> S;
session_of(_) -> undefined.

%% The variable's name and id (the id tells a variable registered again
%% under the name from the one a lock was granted on).
var_of(Session, Var) ->
    case dspex_store:get(Session, Var) of
        {ok, #{name := Name, id := Id}} -> {ok, Name, Id};
        {error, _} = E -> E
    end.

%% @private The session was deleted, expired (`Reason' `session_expired') or
%% created anew under its id: its locks go (see the module documentation).
%% Called by the store on the node that ran the change.
-spec session_gone(dspex_store:session_id(), session_deleted | session_expired) -> ok.
session_gone(Session, Reason) -> gen_server:cast(?MODULE, {session_gone, Session, Reason}).

%% @private The sweeper expired sessions: the locks of sessions no longer
%% here go.
-spec swept() -> ok.
swept() -> gen_server:cast(?MODULE, swept).

%%% server ----------------------------------------------------------------------
%% locks: {Session, Name} => #{holder => Holder | none, waiters => queue()}
%% mons: MonitorRef => {holder, Key} | {waiter, Key, WaiterRef}

-spec init([]) -> {ok, map()}.
init([]) ->
    St = #{locks => #{}, mons => #{},
           min_iter => application:get_env(dspex_bridge, min_iterations_before_preempt, 0)},
    %% locks granted by a predecessor that died without releasing them
    {ok, lists:foldl(fun adopt/2, St, dspex_nif:lock_list())}.

%% Takes over a lock found in the NIF's registry: the holder is monitored
%% again (a dead one is freed by the `noproc' DOWN), its lease restarts.
adopt({S, N, Token, Id, #{pid := Pid, priority := P, lease := Lease, objective := Obj, metric := Metric} = Meta},
      #{locks := L, mons := M} = St) when is_pid(Pid), is_integer(P) ->
    Key = {S, N},
    Mon = monitor(process, Pid),
    H = arm_lease(Key, #{optimizer => Id, pid => Pid, mon => Mon, token => Token, priority => P, lease => Lease,
                         lease_timer => undefined, iterations => 0, best => undefined,
                         objective => Obj, metric => Metric, req => maps:get(req, Meta, undefined),
                         var_id => maps:get(var_id, Meta, undefined), acl => maps:get(acl, Meta, #{})}),
    St#{locks := L#{Key => #{holder => H, waiters => queue:new()}}, mons := M#{Mon => {holder, Key}}};
adopt({S, N, Token, _, _}, St) ->
    %% not one of ours (a lock taken with another meta): nobody could release it
    _ = dspex_nif:var_unlock(S, N, Token),
    St.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()} | {noreply, map()}.
handle_call({acquire, S, Var, Id, Cfg}, From, St) ->
    case var_of(S, Var) of
        {ok, Name, VarId} -> acquire_named({S, Name}, Id, Cfg#{var_id => VarId}, From, drop_ghost({S, Name}, VarId, St));
        Error -> {reply, Error, St}
    end;
handle_call({release, Lock, Caller}, _From, St) ->
    case holder_of(Lock, St) of
        {ok, Key, #{pid := Caller}} ->
            St1 = free(Key, St),
            event(released, Key, #{}),
            {reply, ok, grant_next(Key, St1)};
        _ -> {reply, {error, not_lock_owner}, St}
    end;
handle_call({renew, Lock}, _From, St) ->
    case holder_of(Lock, St) of
        {ok, Key, H} -> {reply, ok, set_holder(Key, arm_lease(Key, H), St)};
        _ -> {reply, {error, not_lock_owner}, St}
    end;
handle_call({progress, Lock, Iter, Value, Metrics}, _From, St) ->
    case holder_of(Lock, St) of
        {ok, Key, H} ->
            H1 = track(H, Iter, Value, Metrics),
            event(progress, Key, #{iteration => Iter, metrics => Metrics}),
            {reply, ok, set_holder(Key, H1, St)};
        _ -> {reply, {error, not_lock_owner}, St}
    end;
handle_call({status, Key, VarId}, _From, St0) ->
    #{locks := L} = St = drop_ghost(Key, VarId, St0),
    Reply = case maps:get(Key, L, undefined) of
                #{holder := #{} = H, waiters := Q} ->
                    maps:merge(#{locked => true, waiters => queue:len(Q)},
                               maps:with([optimizer, token, priority, iterations, best], H));
                _ -> #{locked => false, waiters => 0}
            end,
    {reply, {ok, Reply}, St};
handle_call(active, _From, #{locks := L} = St) ->
    {reply, [maps:merge(#{session => S, variable => N}, maps:with([optimizer, token, priority, iterations, pid], H))
             || {{S, N}, #{holder := #{} = H}} <- maps:to_list(L)], St};
handle_call({stop, Lock, Caller, Apply}, _From, St) ->
    case holder_of(Lock, St) of
        {ok, {S, N} = Key, #{pid := Caller, token := T, best := Best, optimizer := Id} = H} ->
            %% the lock is released whatever the write says; a refused write
            %% (the best value no longer fits, say) is reported, not raised.
            %% It is the holder's write: its principal needs `write' (the
            %% lock itself only took `optimize').
            Acl = maps:get(acl, H, #{}),
            {Applied, Extra} = case {Apply, Best} of
                                   {true, #{value := V}} ->
                                       case dspex_store:set(S, N, V, Acl#{lock => T, changed_by => {optimizer, Id}}) of
                                           {ok, _} -> {true, #{}};
                                           {error, R} -> {false, #{apply_error => R}}
                                       end;
                                   _ -> {false, #{}}
                               end,
            St1 = free(Key, St),
            event(released, Key, #{applied => Applied}),
            {reply, {ok, Extra#{best => Best, applied => Applied}}, grant_next(Key, St1)};
        _ -> {reply, {error, not_lock_owner}, St}
    end.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast({abandon, Req}, #{locks := L} = St) ->
    %% the request is either waiting or holding (or long gone)
    Waiting = [{Key, W} || {Key, #{waiters := Q}} <- maps:to_list(L), W = #{req := R} <- queue:to_list(Q), R =:= Req],
    Holding = [Key || {Key, #{holder := #{req := R}}} <- maps:to_list(L), R =:= Req],
    St1 = lists:foldl(fun({Key, #{ref := WRef}}, Acc) ->
                              case take_waiter(Key, WRef, Acc) of
                                  {#{mon := Mon}, Acc1} ->
                                      demonitor(Mon, [flush]),
                                      Acc1#{mons := maps:remove(Mon, maps:get(mons, Acc1))};
                                  {none, Acc1} -> Acc1
                              end
                      end, St, Waiting),
    St2 = lists:foldl(fun(Key, Acc) ->
                              Acc1 = free(Key, Acc),
                              event(released, Key, #{reason => abandoned}),
                              grant_next(Key, Acc1)
                      end, St1, Holding),
    {noreply, St2};
handle_cast({session_gone, S, Reason}, #{locks := L} = St) ->
    %% this notice is a cast: another process may have made the session again and taken a lock on its new
    %% variable before it arrived; such a lock (its variable still the current one) stays
    Gone = [K || {S1, _} = K <- maps:keys(L), S1 =:= S, not live(K, maps:get(K, L))],
    {noreply, lists:foldl(fun(Key, Acc) -> drop(Key, Reason, Acc) end, St, Gone)};
handle_cast(swept, #{locks := L} = St) ->
    %% listing does not refresh TTLs (looking each session up would)
    Here = sets:from_list(dspex_nif:session_list(), [{version, 2}]),
    Gone = [K || {S, _} = K <- maps:keys(L), not sets:is_element(S, Here)],
    {noreply, lists:foldl(fun(Key, Acc) -> drop(Key, session_expired, Acc) end, St, Gone)};
handle_cast(_Msg, St) -> {noreply, St}.

live(Key, #{holder := #{var_id := VarId}}) -> current(Key, VarId);
live(_Key, _Lock) -> false.

%% Whether the variable `Key' names is still the one of id `VarId'.
current({S, N}, VarId) ->
    VarId =/= undefined andalso
        case dspex_nif:var_get_here(S, N) of
            {ok, #{id := VarId}} -> true;
            V when is_tuple(V), element(1, V) =:= var -> element(4, V) =:= VarId;
            _ -> false
        end.

%% A lock whose variable is no longer `VarId' (the current variable of the
%% name) was granted on a deleted one: it goes before the request is served.
drop_ghost({_, _} = Key, VarId, #{locks := L} = St) ->
    case maps:get(Key, L, undefined) of
        #{holder := #{var_id := Old}} when Old =/= undefined, Old =/= VarId -> drop(Key, variable_deleted, St);
        _ -> St
    end.

%% Frees a lock whose variable or session is gone: the holder is told, the
%% waiters get the error a new acquire would.
drop({S, N} = Key, Reason, St0) ->
    case maps:get(Key, maps:get(locks, St0), undefined) of
        undefined -> St0;
        #{holder := H, waiters := Q} ->
            St1 = case H of
                      #{token := T, pid := Pid} ->
                          %% unlocked in the store (if it still holds it) before the notice
                          St = free(Key, St0),
                          Pid ! {dspex_lock_lost, S, N, T, Reason},
                          event(released, Key, #{reason => Reason, token => T}),
                          St;
                      none -> St0
                  end,
            Err = case Reason of
                      variable_deleted -> {not_found, N};
                      _ -> session_not_found
                  end,
            #{locks := L, mons := M} = St1,
            M1 = lists:foldl(fun(#{from := From, mon := Mon, timer := Timer}, Acc) ->
                                     cancel_timer(Timer),
                                     demonitor(Mon, [flush]),
                                     gen_server:reply(From, {error, Err}),
                                     maps:remove(Mon, Acc)
                             end, M, queue:to_list(Q)),
            St1#{locks := maps:remove(Key, L), mons := M1}
    end.

%% Stopped on purpose (the supervisor's shutdown, application:stop), the
%% server releases every lock it granted. After a crash it leaves them: its
%% successor adopts them from the NIF's registry (see init/1).
-spec terminate(term(), map()) -> ok.
terminate(Reason, #{locks := L}) when Reason =:= normal; Reason =:= shutdown; element(1, Reason) =:= shutdown ->
    [dspex_nif:var_unlock(S, N, T) || {{S, N}, #{holder := #{token := T}}} <- maps:to_list(L)],
    ok;
terminate(_Crash, _St) ->
    ok.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({'DOWN', MRef, process, _Pid, _Why}, #{mons := M} = St) ->
    case maps:take(MRef, M) of
        {{holder, Key}, M1} ->
            St1 = free(Key, St#{mons := M1}),
            event(released, Key, #{reason => holder_down}),
            {noreply, grant_next(Key, St1)};
        {{waiter, Key, WRef}, M1} ->
            {_, St1} = take_waiter(Key, WRef, St#{mons := M1}),
            {noreply, St1};
        error -> {noreply, St}
    end;
handle_info({wait_timeout, Key, WRef}, St) ->
    case take_waiter(Key, WRef, St) of
        {#{from := From, mon := Mon}, St1} ->
            demonitor(Mon, [flush]),
            gen_server:reply(From, {error, timeout}),
            {noreply, St1#{mons := maps:remove(Mon, maps:get(mons, St1))}};
        {none, St1} -> {noreply, St1}
    end;
handle_info({lease_expired, Key, Token}, #{locks := L} = St) ->
    case maps:get(Key, L, undefined) of
        #{holder := #{token := Token, pid := Pid}} ->
            {S, N} = Key,
            %% unlock in the store before telling the holder: a write it makes
            %% after the notice must be refused
            St1 = free(Key, St),
            Pid ! {dspex_lock_expired, S, N, Token},
            event(expired, Key, #{token => Token}),
            {noreply, grant_next(Key, St1)};
        _ -> {noreply, St}
    end;
handle_info(_Other, St) -> {noreply, St}.

acquire_named(Key, Id, Cfg, From, #{locks := L, min_iter := MinIter} = St) ->
    case maps:get(Key, L, #{holder => none, waiters => queue:new()}) of
        #{holder := none} = E ->
            case grant(Key, Id, Cfg, 0, E, St) of
                {ok, Lock, St1} -> {reply, {ok, Lock}, St1};
                {error, _} = Err -> {reply, Err, St}
            end;
        #{holder := H} = E ->
            #{priority := HP, iterations := HI, optimizer := HId, token := HT, pid := HPid, mon := HMon} = H,
            case maps:get(conflict, Cfg) of
                abort ->
                    {reply, {error, {lock_held_by, HId}}, St};
                preempt when map_get(priority, Cfg) > HP, HI >= MinIter ->
                    {S, N} = Key,
                    %% take the lock first: if the store refuses (access
                    %% control, say) the holder keeps its monitor and lease
                    case grant(Key, Id, Cfg, HT, E#{holder := none}, St) of
                        {ok, Lock, St1} ->
                            demonitor(HMon, [flush]),
                            cancel_lease(H),
                            St2 = St1#{mons := maps:remove(HMon, maps:get(mons, St1))},
                            HPid ! {dspex_preempted, S, N, HT},
                            event(preempted, Key, #{preempted => HId, by => Id}),
                            {reply, {ok, Lock}, St2};
                        {error, _} = Err ->
                            {reply, Err, St}
                    end;
                _ ->
                    {noreply, enqueue(Key, Id, Cfg, From, E, St)}
            end
    end.

grant({S, N} = Key, Id, Cfg, Expect, Entry, #{locks := L, mons := M} = St) ->
    Pid = maps:get(pid, Cfg),
    %% what a successor needs to adopt the lock (see init/1)
    Meta = #{pid => Pid, priority => maps:get(priority, Cfg), lease => maps:get(lease, Cfg),
             objective => maps:get(objective, Cfg), metric => maps:get(metric, Cfg),
             req => maps:get(req, Cfg, undefined), var_id => maps:get(var_id, Cfg, undefined),
             acl => maps:get(acl, Cfg, #{})},
    case dspex_nif:var_lock(S, N, Id, Expect, maps:get(acl, Cfg, #{}), Meta) of
        {ok, Token} ->
            Mon = monitor(process, Pid),
            H = arm_lease(Key, #{optimizer => Id, pid => Pid, mon => Mon, token => Token,
                                 priority => maps:get(priority, Cfg), lease => maps:get(lease, Cfg),
                                 lease_timer => undefined, iterations => 0, best => undefined,
                                 objective => maps:get(objective, Cfg), metric => maps:get(metric, Cfg),
                                 req => maps:get(req, Cfg, undefined), var_id => maps:get(var_id, Cfg, undefined),
                                 acl => maps:get(acl, Cfg, #{})}),
            event(acquired, Key, #{optimizer => Id, token => Token}),
            {ok, #{session => S, variable => N, optimizer => Id, token => Token, pid => Pid},
             St#{locks := L#{Key => Entry#{holder := H}}, mons := M#{Mon => {holder, Key}}}};
        {error, _} = Err -> Err
    end.

enqueue(Key, Id, Cfg, From, Entry, #{locks := L, mons := M} = St) ->
    WRef = make_ref(),
    Mon = monitor(process, maps:get(pid, Cfg)),
    Timer = case maps:get(timeout, Cfg) of
                infinity -> undefined;
                T -> erlang:send_after(T, self(), {wait_timeout, Key, WRef})
            end,
    W = #{ref => WRef, from => From, optimizer => Id, cfg => Cfg, mon => Mon, timer => Timer,
          req => maps:get(req, Cfg, undefined)},
    event(waited, Key, #{optimizer => Id}),
    St#{locks := L#{Key => Entry#{waiters := queue:in(W, maps:get(waiters, Entry))}},
        mons := M#{Mon => {waiter, Key, WRef}}}.

take_waiter(Key, WRef, #{locks := L} = St) ->
    case maps:get(Key, L, undefined) of
        #{waiters := Q} = E ->
            {Match, Rest} = lists:partition(fun(#{ref := R}) -> R =:= WRef end, queue:to_list(Q)),
            St1 = St#{locks := L#{Key => E#{waiters := queue:from_list(Rest)}}},
            case Match of
                [W = #{timer := T}] -> cancel_timer(T), {W, St1};
                [] -> {none, St1}
            end;
        undefined -> {none, St}
    end.

%% Grants the lock to the first waiter still alive (FIFO).
grant_next(Key, #{locks := L} = St) ->
    case maps:get(Key, L, undefined) of
        #{holder := none, waiters := Q} = E ->
            case queue:out(Q) of
                {empty, _} -> St#{locks := maps:remove(Key, L)};
                {{value, #{from := From, optimizer := Id, cfg := Cfg, mon := Mon, timer := T}}, Q1} ->
                    cancel_timer(T),
                    demonitor(Mon, [flush]),
                    St1 = St#{mons := maps:remove(Mon, maps:get(mons, St))},
                    %% a waiter asked for the variable it resolved, not for
                    %% one registered under the name since
                    Granted = case current(Key, maps:get(var_id, Cfg, undefined)) of
                                  true -> grant(Key, Id, Cfg, 0, E#{waiters := Q1}, St1);
                                  false -> {error, {not_found, element(2, Key)}}
                              end,
                    case Granted of
                        {ok, Lock, St2} ->
                            gen_server:reply(From, {ok, Lock}),
                            St2;
                        {error, _} = Err ->
                            %% the variable went away: every waiter gets the error
                            gen_server:reply(From, Err),
                            grant_next(Key, St1#{locks := (maps:get(locks, St1))#{Key => E#{waiters := Q1}}})
                    end
            end;
        _ -> St
    end.

%% Frees the holder's lock in the store and forgets the holder.
free({S, N} = Key, #{locks := L, mons := M} = St) ->
    case maps:get(Key, L, undefined) of
        #{holder := #{token := T, mon := Mon} = H} = E ->
            _ = dspex_nif:var_unlock(S, N, T),
            demonitor(Mon, [flush]),
            cancel_lease(H),
            St#{locks := L#{Key => E#{holder := none}}, mons := maps:remove(Mon, M)};
        _ -> St
    end.

holder_of(#{session := S, variable := N, token := T}, #{locks := L}) ->
    case maps:get({S, N}, L, undefined) of
        #{holder := #{token := T} = H} -> {ok, {S, N}, H};
        _ -> error
    end;
holder_of(_, _) -> error.

set_holder(Key, H, #{locks := L} = St) ->
    St#{locks := maps:update_with(Key, fun(E) -> E#{holder := H} end, L)}.

arm_lease(Key, #{lease := Lease, token := T} = H) ->
    cancel_lease(H),
    case Lease of
        infinity -> H#{lease_timer := undefined};
        Ms -> H#{lease_timer := erlang:send_after(Ms, self(), {lease_expired, Key, T})}
    end.

cancel_lease(#{lease_timer := T}) -> cancel_timer(T);
cancel_lease(_) -> ok.

cancel_timer(undefined) -> ok;
cancel_timer(T) -> _ = erlang:cancel_timer(T), ok.

%% Keeps the best candidate by the objective on the chosen metric.
track(#{iterations := I, best := Best, objective := Obj, metric := Metric} = H, Iter, Value, Metrics) ->
    Score = case Metric of
                undefined -> Value;
                _ -> maps:get(Metric, Metrics, undefined)
            end,
    Better = is_number(Score) andalso
             (Best =:= undefined orelse
              (Obj =:= minimize andalso Score < maps:get(score, Best)) orelse
              (Obj =:= maximize andalso Score > maps:get(score, Best))),
    H#{iterations := max(I, Iter),
       best := case Better of
                   true -> #{value => Value, score => Score, iteration => Iter};
                   false -> Best
               end}.

event(Name, {S, N}, Meta) ->
    ok = dspex_events:lock_event(Name, {S, N}, Meta), %% event log
    dspex_telemetry:execute([dspex, locks, Name], #{count => 1}, Meta#{session => S, variable => N}).
