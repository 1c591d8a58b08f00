%% @doc Linearizability checker for a single register (test support).
%%
%% `check(Init, Ops)' decides whether a recorded concurrent history of reads
%% and writes of one register, initially `Init', is linearizable: whether
%% each operation can be given a point in time between its invocation and
%% its return such that, in the order of those points, every read returns
%% the value of the last write before it (or `Init').
%%
%% An operation is
%% ```
%% {Proc, read, undefined, {ok, V} | fail, InvokeNs, ReturnNs}
%% {Proc, write, V, ok | unknown, InvokeNs, ReturnNs | infinity}
%% '''
%% with times from `os:perf_counter(nanosecond)' (CLOCK_MONOTONIC on Linux,
%% so histories recorded by several OS processes of one machine compare).
%% A read that failed took no effect and is dropped. A write whose outcome
%% is unknown (a timeout, a crash, a `{retry, _}' answer) may or may not
%% have taken effect, at any time after its invocation: its return time is
%% taken as `infinity' whatever is given. Two operations whose times are
%% equal count as concurrent.
%%
%% The search is Wing and Gong's, with Lowe's memoization: depth first, it
%% linearizes one of the operations that may come next (invoked before the
%% earliest return among the operations not yet linearized), remembering
%% every configuration (set of linearized operations, register value) it has
%% explored so that none is explored twice. A configuration is the index of
%% the first operation (by invocation) not yet linearized, a bit set of the
%% linearized operations after it (usually a few bits: the concurrency) and
%% the register's value. Partial order reduction: a read that may come next
%% and returns the current value is linearized at once without trying the
%% other orders (moving such a read earlier keeps any linearization valid).
%% Unknown writes whose value no read returns are dropped (taking effect
%% could only change the value where nobody looks); the others are
%% linearized like the rest: one that did not take effect is as well placed
%% last, after every operation (nothing has to follow it: it never
%% returned), where it changes no read.
%%
%% The work is bounded: past `max_states' explored configurations (option
%% of `check/3', default 1 000 000) the answer is `{gave_up, Info}'.
%%
%% A violation's `Info' says where the search got stuck, for a human:
%% `reason' (`value_never_written' when a read returns a value that no write
%% and not `Init' holds, found before any search; else `not_linearizable'),
%% the longest partial linearization the search found (`linearized': how
%% many operations, `tail': its last 8 operations in linearization order,
%% `value': the register value after them), `blocking': the operation that
%% had to come next (the earliest to return among those not linearized),
%% `candidates': every operation that could have come next with the value
%% the register held, none of which fits, and `writes_of_values_read': the
%% writes of the values those reads returned. Operations are shown as maps (`proc', `op', `value',
%% `result', `invoke', `return', and `t0'-relative `at' = {Invoke, Return}
%% in microseconds for reading).
-module(dspex_lincheck).

-export([check/2, check/3, summary/1]).

-export_type([op/0, result/0]).

-type time() :: integer().
-type op() :: {Proc :: term(), read, undefined, {ok, term()} | fail, time(), time()}
            | {Proc :: term(), write, term(), ok | unknown, time(), time() | infinity}.
-type info() :: #{atom() => term()}.
-type result() :: ok | {violation, info()} | {gave_up, info()}.

-define(DEFAULT_MAX_STATES, 1000000).

%% One operation after preparation: f is read | write, ret is an integer or
%% `infinity' (above every integer in term order).
-record(o, {proc, f, v, res, inv, ret, orig}).

%% @doc Checks `Ops' against a register initially holding `Init', with the
%% default bound of explored configurations.
-spec check(term(), [op()]) -> result().
check(Init, Ops) ->
    check(Init, Ops, #{}).

%% @doc As `check/2'; option `max_states' (a positive integer): how many
%% configurations the search may explore before giving up.
-spec check(term(), [op()], #{max_states => pos_integer()}) -> result().
check(Init, Ops, Opts) when is_list(Ops), is_map(Opts) ->
    Max = maps:get(max_states, Opts, ?DEFAULT_MAX_STATES),
    (is_integer(Max) andalso Max > 0) orelse error({badarg, max_states}),
    Valid = [validate(Op) || Op <- Ops],
    T0 = t0(Valid),
    Reads = [O || O = #o{f = read} <- prepare(Valid)],
    Writes = [O || O = #o{f = write} <- prepare(Valid)],
    case never_written(Init, Reads, Writes) of
        [] -> search(Init, Reads, Writes, Max, T0);
        Bad -> {violation, #{reason => value_never_written, reads => [show(O, T0) || O <- Bad]}}
    end.

%% @doc Counts of a history, for reports and for asserting that a history
%% is not trivial: operations by kind and outcome, processes, pairs of
%% overlapping operations of different processes (`overlaps'), and for each
%% writing process how many reads of other processes returned one of its
%% values (`reads_of_writer', unique values assumed).
-spec summary([op()]) -> #{atom() => term()}.
summary(Ops) ->
    Valid = [validate(Op) || Op <- Ops],
    Count = fun(P) -> length([Op || Op <- Valid, P(Op)]) end,
    WriterOf = maps:from_list([{V, P} || {P, write, V, _, _, _} <- Valid]),
    ReadsOf = lists:foldl(fun({RP, read, _, {ok, V}, _, _}, M) ->
                                  case maps:find(V, WriterOf) of
                                      {ok, WP} when WP =/= RP -> maps:update_with(WP, fun(N) -> N + 1 end, 1, M);
                                      _ -> M
                                  end;
                             (_, M) -> M
                          end, maps:from_list([{P, 0} || {P, write, _, ok, _, _} <- Valid]), Valid),
    #{ops => length(Valid),
      reads_ok => Count(fun(Op) -> element(2, Op) =:= read andalso element(4, Op) =/= fail end),
      reads_failed => Count(fun(Op) -> element(2, Op) =:= read andalso element(4, Op) =:= fail end),
      writes_ok => Count(fun(Op) -> element(2, Op) =:= write andalso element(4, Op) =:= ok end),
      writes_unknown => Count(fun(Op) -> element(2, Op) =:= write andalso element(4, Op) =:= unknown end),
      procs => length(lists:usort([element(1, Op) || Op <- Valid])),
      overlaps => overlaps(Valid),
      reads_of_writer => ReadsOf}.

%%% preparation -------------------------------------------------------------------

validate({_Proc, read, undefined, Res, I, R} = Op)
  when is_integer(I), is_integer(R), I =< R, (Res =:= fail orelse (tuple_size(Res) =:= 2 andalso element(1, Res) =:= ok)) ->
    Op;
validate({_Proc, write, _V, ok, I, R} = Op) when is_integer(I), is_integer(R), I =< R ->
    Op;
validate({_Proc, write, _V, unknown, I, R} = Op) when is_integer(I), R =:= infinity orelse (is_integer(R) andalso I =< R) ->
    Op;
validate(Op) ->
    error({badarg, {bad_op, Op}}).

t0([]) -> 0;
t0(Ops) -> lists:min([element(5, Op) || Op <- Ops]).

prepare(Ops) ->
    [case Op of
         {P, read, _, {ok, V}, I, R} -> #o{proc = P, f = read, v = V, res = ok, inv = I, ret = R, orig = Op};
         {P, write, V, ok, I, R} -> #o{proc = P, f = write, v = V, res = ok, inv = I, ret = R, orig = Op};
         {P, write, V, unknown, I, _} -> #o{proc = P, f = write, v = V, res = unknown, inv = I, ret = infinity, orig = Op}
     end || Op <- Ops, element(4, Op) =/= fail].

never_written(Init, Reads, Writes) ->
    Written = maps:from_list([{V, true} || #o{v = V} <- Writes]),
    [R || #o{v = V} = R <- Reads, V =/= Init, not maps:is_key(V, Written)].

overlaps(Ops) ->
    Sorted = lists:keysort(5, Ops),
    overlaps(Sorted, 0).

overlaps([], N) -> N;
overlaps([{P, _, _, _, _, R} | Rest], N) ->
    %% (R may be `infinity', above every integer)
    Concurrent = lists:takewhile(fun(Op) -> element(5, Op) =< R end, Rest),
    overlaps(Rest, N + length([x || Op <- Concurrent, element(1, Op) =/= P])).

%%% search ----------------------------------------------------------------------

%% The operations to linearize in a tuple sorted by invocation.
search(Init, Reads, Writes, Max, T0) ->
    ReadVals = maps:from_list([{V, true} || #o{v = V} <- Reads]),
    Kept = [W || #o{res = Res, v = V} = W <- Writes, Res =:= ok orelse maps:is_key(V, ReadVals)],
    Main = list_to_tuple(sort_ops(Reads ++ Kept)),
    St0 = #{main => Main, n => tuple_size(Main), max => Max, seen => #{}, states => 0,
            deepest => {-1, undefined}},
    try dfs(0, 0, Init, {0, []}, St0) of
        {true, _} -> ok;
        {false, St} -> {violation, violation_info(St, T0)}
    catch
        throw:{gave_up, St} ->
            {Depth, _} = maps:get(deepest, St),
            {gave_up, #{states => maps:get(states, St), max_states => Max, ops => tuple_size(Main),
                        linearized => Depth}}
    end.

sort_ops(Os) ->
    lists:sort(fun(#o{inv = A, ret = RA}, #o{inv = B, ret = RB}) -> {A, RA} =< {B, RB} end, Os).

%% P: every main operation before index P (0-based) is linearized; Bits: bit
%% K set = main operation P + K linearized (bit 0 is never set: canonical);
%% S: the register's value; Path: {how many, the operations linearized,
%% last first}.
dfs(P, _Bits, _S, _Path, #{n := N} = St) when P =:= N ->
    {true, St};
dfs(P, Bits, S, Path, #{seen := Seen, states := Count, max := Max} = St0) ->
    Key = {P, Bits, S},
    case maps:is_key(Key, Seen) of
        true -> {false, St0};
        false when Count >= Max -> throw({gave_up, St0});
        false ->
            St1 = St0#{seen := Seen#{Key => true}, states := Count + 1},
            Cands = candidates(P, Bits, St1),
            St = deepest(S, Path, Cands, St1),
            case [C || {_, #o{f = read, v = V}} = C <- Cands, V =:= S] of
                [{K, Read} | _] ->
                    %% a read that may come next and sees the current value:
                    %% taking it first is as good as any other order
                    {P2, Bits2} = lin(P, Bits, K),
                    dfs(P2, Bits2, S, push(Read, Path), St);
                [] ->
                    try_writes([C || {_, #o{f = write}} = C <- Cands], P, Bits, Path, St)
            end
    end.

try_writes([], _P, _Bits, _Path, St) ->
    {false, St};
try_writes([{K, #o{v = V} = W} | Rest], P, Bits, Path, St0) ->
    {P2, Bits2} = lin(P, Bits, K),
    case dfs(P2, Bits2, V, push(W, Path), St0) of
        {true, _} = Found -> Found;
        {false, St} -> try_writes(Rest, P, Bits, Path, St)
    end.

push(Op, {D, Ops}) -> {D + 1, [Op | Ops]}.

%% Linearizes main operation P + K and makes the configuration canonical.
lin(P, Bits, K) ->
    canon(P, Bits bor (1 bsl K)).

canon(P, Bits) when Bits band 1 =:= 1 -> canon(P + 1, Bits bsr 1);
canon(P, Bits) -> {P, Bits}.

%% The operations not linearized that may come next (invoked before the
%% earliest return among those not linearized), as {K, Op} (index P + K).
%% Scanning in invocation order stops at the first operation invoked after
%% that return: every later one is invoked (and returns) later still.
candidates(P, Bits, #{main := Main, n := N}) ->
    scan(P, 0, Bits, N, Main, infinity, []).

scan(J, _K, _Bits, N, _Main, Min, Acc) when J >= N ->
    [C || {_, #o{inv = I}} = C <- lists:reverse(Acc), I =< Min];
scan(J, K, Bits, N, Main, Min, Acc) ->
    #o{inv = I, ret = R} = Op = element(J + 1, Main),
    case I =< Min of
        false ->
            [C || {_, #o{inv = CI}} = C <- lists:reverse(Acc), CI =< Min];
        true when Bits band (1 bsl K) =/= 0 ->
            scan(J + 1, K + 1, Bits, N, Main, Min, Acc);
        true ->
            scan(J + 1, K + 1, Bits, N, Main, min(Min, R), [{K, Op} | Acc])
    end.

%% Remembers the configuration with the most operations linearized.
deepest(S, {Depth, Ops}, Cands, #{deepest := {Best, _}} = St) ->
    case Depth > Best of
        true -> St#{deepest := {Depth, {S, Ops, Cands}}};
        false -> St
    end.

%%% reporting -------------------------------------------------------------------

violation_info(#{deepest := {Depth, {S, Path, Cands}}, main := Main,
                 states := States}, T0) ->
    Tail = lists:reverse(lists:sublist(Path, 8)),
    Pending = [Op || {_, Op} <- Cands],
    Blocking = case Pending of
                   [] -> [];
                   [C | Cs] -> [lists:foldl(fun(#o{ret = R} = O, #o{ret = BR}) when R < BR -> O; (_, B) -> B end, C, Cs)]
               end,
    Writers = [show(W, T0) || #o{f = write, v = V} = W <- tuple_to_list(Main),
                              lists:member(V, [RV || #o{f = read, v = RV} <- Pending])],
    #{reason => not_linearizable,
      linearized => Depth,
      of_ops => tuple_size(Main),
      value => S,
      tail => [show(O, T0) || O <- Tail],
      blocking => [show(O, T0) || O <- Blocking],
      candidates => [show(O, T0) || O <- Pending],
      writes_of_values_read => Writers,
      states => States}.

show(#o{proc = P, f = F, v = V, res = Res, orig = {_, _, _, _, I, R}}, T0) ->
    Rel = fun(infinity) -> infinity; (T) -> (T - T0) div 1000 end,
    #{proc => P, op => F, value => V, result => Res, invoke => I, return => R, at => {Rel(I), Rel(R)}}.
