%% @doc PropEr state-machine tests of the whole `dspex_store' API against a
%% pure Erlang model (maps).
%%
%% `prop_store/0': random command sequences over two sessions, a handful of
%% variable names (keys given as binaries, atoms, current and stale ids) and
%% every variable type, some with a history_limit of 0, 1 or 3. Commands:
%% create/delete/get/touch/list sessions, register (valid, invalid and
%% duplicate values, bad constraints, unknown types), get, get_value/2,3,
%% exists, set (with right, wrong and bad expected_version, metadata,
%% changed_by), delete, list with and without a glob, get_many, set_many
%% (list and map forms, atomic or not, failing items, duplicates), history
%% with a limit, rollback to current, archived, pruned and unknown versions,
%% export + delete + import round trips, import over a live session, watches
%% (to this process and to a collector process, whose messages are checked per
%% watch and variable in commit order), unwatch, info, and any of the writes
%% with lowered limits (value size, variable count, name length, history).
%% The model predicts each result exactly: versions, values after coercion,
%% error terms, history newest-first and bounded, list order, batch results.
%% Only what the API cannot promise is matched loosely: timestamps, the
%% numeric part of variable ids, the text of `invalid_value' and
%% `invalid_constraints' messages. Where several errors apply to one call and
%% the documentation does not say which wins, the model follows the
%% implementation's order (e.g. register: type, constraints, value, session,
%% name, then existence), and it accepts an ASCII atom as the text of a
%% `string' or `choice' value as the implementation does (documented only for
%% `module').
%%
%% `prop_parallel_cas/0': `set/4' with `expected_version' (and reads, plain
%% sets, single- and two-variable batches, atomic or not, with expected
%% versions, bounded history, rollbacks) on two integer variables from two
%% processes at once; PropEr checks that some linearization satisfies every
%% postcondition (a check-then-set that is not atomic fails it).
%%
%% The model encodes the DOCUMENTED behaviour. Where the implementation was
%% found to differ, the difference has a name (see `known_bugs/0'); a test run
%% can ask the model to emulate it (`set_known_bugs/1') to look past it, which
%% is how every other part of the model is kept honest. The default is to
%% emulate nothing, so those properties fail until the store is fixed.
%%
%% Debian's erlang-proper ships without proper.hrl, so the few macros used are
%% defined here.
-module(prop_store_statem).

-export([prop_store/0, prop_parallel_cas/0, long_commands/0]).
-export([initial_state/0, command/1, precondition/2, postcondition/3, next_state/3]).
-export([session_listed/1, watched_set/5, limited/4, watch_collector/2, drain/0,
         export_roundtrip/1, import_existing/1, par_read/2]).
-export([cleanup/0, known_bugs/0, set_known_bugs/1, model_result/3]).

-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(LET(X, Gen, Body), proper_types:bind(Gen, fun(X) -> Body end, false)).
-define(LAZY(X), proper_types:lazy(fun() -> X end)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).

-define(S1, <<"prop_statem_s1">>).
-define(S2, <<"prop_statem_s2">>).
-define(SIDS, [?S1, ?S2]).
-define(SPAR, <<"prop_statem_par">>).
-define(PVARS, [<<"counter">>, <<"other">>]).
-define(PAR_HL, 3).
-define(NAMES, [<<"a">>, <<"ab">>, <<"abc">>, <<"b">>, <<"x_1">>]).
-define(PATTERNS, [<<"*">>, <<"a*">>, <<"?">>, <<"a?">>, <<"*b*">>, <<"*c">>, <<"x_?">>, <<>>,
                   <<"b">>, <<"??*">>, <<"a*c">>, <<"*_*">>, <<"ab">>, <<"?b*">>]).
-define(TYPES, [float, integer, string, boolean, choice, module, embedding, tensor]).
-define(INT64_MIN, -(1 bsl 63)).
-define(INT64_END, (1 bsl 63)). % exclusive
-define(MISMATCH_KEY, {?MODULE, last_mismatch}).
-define(BUGS_KEY, {?MODULE, known_bugs}).
-define(BIG(Type, Stored, Lim), (payload(Type, Stored) > map_get(max_value_bytes, Lim))).

%%% ------------------------------------------------------------------------
%%% Known discrepancies (documented behaviour vs implementation)
%%% ------------------------------------------------------------------------

%% @doc Every discrepancy the model knows how to emulate.
%%  atomic_batch_errors: an atomic `set_many' whose batch fails validation
%%     lists only the validation failures, not the version mismatches of the
%%     other updates (doc: "listing every failing update").
%%  rollback_metadata: `rollback/4' ignores the `metadata' option (doc:
%%     "Accepts the options of set/4", where metadata is merged).
%%  float_bigint: an integer outside int64 given for a `float' variable is
%%     rejected (doc: "integers are stored as floats").
%%  module_atoms: the atoms true, false, nan, infinity and neg_infinity are
%%     rejected as module names (doc: "an ASCII atom is accepted").
%%  tensor_zero_overflow: a tensor whose shape contains 0 is rejected when
%%     the product of the dimensions before the 0 overflows 64 bits (doc:
%%     "data length equal to the product of the shape", which is 0).
%%  duplicate_after_failed_item: `set_many' does not refuse a batch naming a
%%     variable twice when the earlier update of it failed validation (doc:
%%     "A variable named twice (by name, atom or id) refuses the whole batch").
known_bugs() ->
    [atomic_batch_errors, rollback_metadata, float_bigint, module_atoms, tensor_zero_overflow,
     duplicate_after_failed_item].

%% @doc Which discrepancies the model emulates (default: none).
set_known_bugs(List) when is_list(List) -> persistent_term:put(?BUGS_KEY, List).

bug(Name) -> lists:member(Name, persistent_term:get(?BUGS_KEY, [])).

%%% ------------------------------------------------------------------------
%%% Properties
%%% ------------------------------------------------------------------------

prop_store() ->
    ?FORALL(Cmds, long_commands(),
            begin
                cleanup(),
                erase(?MISMATCH_KEY),
                start_collector(),
                {History, State, Result} = proper_statem:run_commands(?MODULE, Cmds),
                stop_collector(),
                cleanup(),
                flush_mailbox(),
                ?WHENFAIL(report(Cmds, History, State, Result),
                          proper:aggregate([F || {_, F, _} <- proper_statem:command_names(Cmds)],
                                           Result =:= ok))
            end).

%% proper_statem:commands/1 with sequences about four times as long. (In
%% PropEr 1.2 neither more_commands/2 nor resize/2 reaches the size that
%% commands/1 reads, so sequences stay short: ~11 commands on average, at most
%% the max_size of 42.) Same construction: generated under the model's
%% preconditions, shrunk by dropping commands while the rest stays valid.
long_commands() ->
    ?LET(Init, ?LAZY(initial_state()),
         proper_types:add_constraint(
           ?LET(List, proper_types:sized(fun(Size) -> proper_types:noshrink(cmds(4 * Size + 8, Init, 1)) end),
                proper_types:shrink_list(List)),
           fun(Cmds) -> proper_statem:is_valid(?MODULE, Init, Cmds, []) end,
           true)).

cmds(Size, St, N) ->
    ?LAZY(frequency(
            [{1, []},
             {Size, ?LET(Call, proper_types:add_constraint(command(St), fun(C) -> precondition(St, C) end, true),
                         begin
                             Var = {var, N},
                             ?LET(Rest, cmds(Size - 1, next_state(St, Var, Call), N + 1),
                                  [{set, Var, Call} | Rest])
                         end)}])).

prop_parallel_cas() ->
    ?FORALL(Cmds, proper_statem:parallel_commands(?MODULE, par_initial()),
            begin
                par_setup(),
                {Seq, Par, Result} = proper_statem:run_parallel_commands(?MODULE, Cmds),
                _ = dspex_store:delete_session(?SPAR),
                ?WHENFAIL(io:format(user, "~nSequential: ~p~nParallel: ~p~nResult: ~p~n",
                                    [Seq, Par, Result]),
                          Result =:= ok)
            end).

report(Cmds, History, State, Result) ->
    io:format(user, "~n==== prop_store failed: ~p~nCommands:~n", [Result]),
    [io:format(user, "  ~p~n", [C]) || C <- Cmds],
    io:format(user, "Results:~n", []),
    [io:format(user, "  ~p~n", [R]) || {_, R} <- History],
    io:format(user, "Model state before the failing step:~n  ~p~n", [State]),
    case get(?MISMATCH_KEY) of
        undefined -> ok;
        {Call, Expected, Actual} ->
            io:format(user, "Failing call: ~p~n  expected: ~p~n  actual:   ~p~n",
                      [Call, Expected, Actual])
    end.

cleanup() ->
    _ = [dspex_store:delete_session(S) || S <- ?SIDS],
    ok.

flush_mailbox() ->
    receive _ -> flush_mailbox() after 0 -> ok end.

%%% ------------------------------------------------------------------------
%%% Wrappers used as commands
%%% ------------------------------------------------------------------------

session_listed(S) -> lists:member(S, dspex_store:list_sessions()).

%% Watches WKeys, sets Key, returns what the watch delivered.
watched_set(S, WKeys, Key, Value, Opts) ->
    W = dspex_store:watch(S, WKeys, self()),
    R = dspex_store:set(S, Key, Value, Opts),
    Msgs = collect(W, 0),
    case W of
        {error, _} -> ok;
        _ -> ok = dspex_store:unwatch(W)
    end,
    {W, R, Msgs ++ collect(W, 0)}.

collect(W, Timeout) ->
    receive
        {dspex_variable, W, _, _, _, _, _} = M -> [M | collect(W, 0)]
    after Timeout -> []
    end.

%% The collector: a process that keeps every watch message it receives.
-define(COLLECTOR, prop_store_statem_collector).

start_collector() ->
    stop_collector(),
    Pid = spawn(fun() -> collector([]) end),
    register(?COLLECTOR, Pid),
    ok.

stop_collector() ->
    case whereis(?COLLECTOR) of
        undefined -> ok;
        Pid ->
            unregister(?COLLECTOR),
            Ref = monitor(process, Pid),
            exit(Pid, kill),
            receive {'DOWN', Ref, _, _, _} -> ok end
    end.

collector(Acc) ->
    receive
        {drain, From} ->
            From ! {drained, lists:reverse(Acc)},
            collector([]);
        Msg -> collector([Msg | Acc])
    end.

watch_collector(S, Keys) -> dspex_store:watch(S, Keys, whereis(?COLLECTOR)).

%% What the collector received since the last drain. The watch messages of a
%% commit are sent by the committing process (this one) before the commit
%% returns, so they are ahead of the drain request.
drain() ->
    ?COLLECTOR ! {drain, self()},
    receive {drained, Msgs} -> Msgs end.

%% Runs one call with some limits changed, then restores the limits.
limited(Patch, M, F, A) ->
    Old = dspex_store:limits(),
    ok = dspex_store:set_limits(maps:merge(Old, Patch)),
    try apply(M, F, A)
    after ok = dspex_store:set_limits(Old)
    end.

%% Export, delete, import the export, export again.
export_roundtrip(S) ->
    case dspex_store:export_session(S) of
        {ok, E} ->
            D = dspex_store:delete_session(S),
            I = dspex_store:import_session(E),
            {ok, E, D, I, dspex_store:export_session(S)};
        Other -> Other
    end.

%% Importing an export of a live session must be refused.
import_existing(S) ->
    case dspex_store:export_session(S) of
        {ok, E} -> dspex_store:import_session(E);
        Other -> Other
    end.

par_read(S, Name) ->
    case dspex_store:get(S, Name) of
        {ok, #{version := V, value := X}} -> {V, X};
        Other -> Other
    end.

%%% ------------------------------------------------------------------------
%%% proper_statem callbacks (dispatch: map = main model, {par, _} = parallel)
%%% ------------------------------------------------------------------------

initial_state() ->
    #{sessions => #{}, ids => [], watches => [], refs => [], events => [],
      lim => maps:with([max_value_bytes, max_variables, max_name_length, max_history,
                        default_history], dspex_store:limits())}.

command({par, _} = St) -> par_command(St);
command(St) ->
    Live = maps:keys(sessions(St)),
    ?LET(S, frequency([{1, elements(?SIDS)}, {case Live of [] -> 0; _ -> 5 end, ?LAZY(elements(Live))}]),
         session_command(St, S)).

precondition({par, _}, _Call) -> true;
precondition(#{refs := Refs}, {call, dspex_store, unwatch, [Ref]}) -> lists:member(Ref, Refs);
precondition(#{ids := Ids}, {call, _, _, Args}) ->
    %% A symbolic variable id is usable only while it names a registration the
    %% model saw succeed (matters when shrinking removes commands).
    lists:all(fun(I) -> lists:member(I, Ids) end, symbolic_ids(Args, [])).

postcondition(St, Call, Res) ->
    {Expected, _} = model_result(St, Call, Res),
    case match(Expected, Res) of
        true -> true;
        false ->
            put(?MISMATCH_KEY, {Call, Expected, Res}),
            false
    end.

next_state(St, Res, Call) ->
    {_, St2} = model_result(St, Call, Res),
    St2.

symbolic_ids({call, erlang, element, [2, {var, _}]} = I, Acc) -> [I | Acc];
symbolic_ids(T, Acc) when is_tuple(T) -> symbolic_ids(tuple_to_list(T), Acc);
symbolic_ids([H | T], Acc) -> symbolic_ids(T, symbolic_ids(H, Acc));
symbolic_ids(M, Acc) when is_map(M) -> symbolic_ids(maps:to_list(M), Acc);
symbolic_ids(_, Acc) -> Acc.

%%% ------------------------------------------------------------------------
%%% Generators (main model)
%%% ------------------------------------------------------------------------

elements(L) -> proper_types:elements(L).
oneof(L) -> proper_types:oneof(L).
frequency(L) -> proper_types:frequency([P || {W, _} = P <- L, W > 0]).
choose(A, B) -> proper_types:choose(A, B).
vector(N, G) -> proper_types:vector(N, G).
boolean() -> proper_types:boolean().
fixed_list(L) -> proper_types:fixed_list(L).

session_command(St, S) ->
    Live = maps:is_key(S, maps:get(sessions, St)),
    K = ?LAZY(key(St, S)),
    frequency(
      [{case Live of true -> 1; false -> 20 end, {call, dspex_store, create_session, [S]}},
       {case Live of true -> 1; false -> 12 end,
        ?LET(O, session_opts(), {call, dspex_store, create_session, [S, O]})},
       {1, {call, dspex_store, delete_session, [S]}},
       {2, {call, dspex_store, get_session, [S]}},
       {1, {call, dspex_store, touch, [S]}},
       {1, {call, ?MODULE, session_listed, [S]}},
       {12, register_cmd(S)},
       {4, ?LET(Key, K, {call, dspex_store, get, [S, Key]})},
       {3, ?LET(Key, K, {call, dspex_store, get_value, [S, Key]})},
       {1, ?LET(Key, K, {call, dspex_store, get_value, [S, Key, '$default']})},
       {2, ?LET(Key, K, {call, dspex_store, exists, [S, Key]})},
       {16, set_cmd(St, S)},
       {3, ?LET(Key, K, {call, dspex_store, delete, [S, Key]})},
       {2, {call, dspex_store, list, [S]}},
       {3, ?LET(P, elements(?PATTERNS), {call, dspex_store, list, [S, P]})},
       {3, ?LET(N, choose(0, 5), ?LET(Ks, vector(N, K), {call, dspex_store, get_many, [S, Ks]}))},
       {7, set_many_cmd(St, S)},
       {2, ?LET(Key, K, {call, dspex_store, history, [S, Key]})},
       {4, ?LET({Key, L}, {K, elements([0, 1, 2, 3, 10, all])},
                {call, dspex_store, history, [S, Key, L]})},
       {8, rollback_cmd(St, S)},
       {2, {call, ?MODULE, export_roundtrip, [S]}},
       {1, {call, ?MODULE, import_existing, [S]}},
       {3, watched_set_cmd(St, S)},
       {4, limited_cmd(St, S)},
       {case maps:size(vars(St, S)) of 0 -> 1; _ -> 10 end,
        ?LET(N, frequency([{1, 0}, {6, 1}, {3, 2}, {1, 3}]),
                ?LET(Ks, vector(N, watch_key(St, S)), {call, ?MODULE, watch_collector, [S, Ks]}))},
       {case maps:get(refs, St) of [] -> 0; _ -> 2 end,
        ?LAZY({call, dspex_store, unwatch, [elements(maps:get(refs, St))]})},
       {case maps:get(watches, St) of [] -> 1; _ -> 4 end, {call, ?MODULE, drain, []}},
       {3, ?LET(Key, K, {call, dspex_store, info, [S, Key]})}]).

limited_cmd(St, S) ->
    ?LET({Patch, {call, M, F, A}},
         {elements([#{max_value_bytes => 16}, #{max_value_bytes => 0}, #{max_value_bytes => 40},
                    #{max_variables => 1}, #{max_variables => 3}, #{max_name_length => 2},
                    #{max_history => 2, default_history => 2}, #{default_history => 1},
                    #{default_history => 0}]),
          frequency([{4, register_cmd(S)}, {3, set_cmd(St, S)}, {2, set_many_cmd(St, S)},
                     {2, rollback_cmd(St, S)}, {1, {call, dspex_store, create_session, [S]}}])},
         {call, ?MODULE, limited, [Patch, M, F, A]}).

%% Mostly keys of existing variables, so that watches get created.
watch_key(St, S) ->
    case maps:keys(vars(St, S)) of
        [] -> key(St, S);
        Names -> frequency([{6, elements(Names)}, {1, key(St, S)}])
    end.

session_opts() ->
    elements([#{}, #{ttl => infinity}, #{ttl => 7200, metadata => #{team => <<"x">>}},
              #{metadata => #{n => 1}}, #{ttl => infinity, metadata => #{}},
              #{ttl => 86400},
              #{ttl => -5}, #{ttl => 1.5}, #{metadata => [not_a_map]}]).

name_key() ->
    frequency([{3, elements(?NAMES)},
               {1, ?LET(N, elements(?NAMES), binary_to_atom(N, utf8))}]).

%% A key for session S: a name (binary or atom), a current id, a stale id, or
%% something that names nothing.
key(St, S) ->
    Vars = vars(St, S),
    Ids = [maps:get(id, V) || V <- maps:values(Vars)],
    Stale = maps:get(ids, St) -- Ids,
    Names = maps:keys(Vars),
    frequency([{2, name_key()},
               {case Names of [] -> 0; _ -> 12 end,
                ?LAZY(?LET({N, Atom}, {elements(Names), frequency([{3, false}, {1, true}])},
                           case Atom of
                               true -> binary_to_atom(N, utf8);
                               false -> N
                           end))},
               {case Ids of [] -> 0; _ -> 4 end, ?LAZY(elements(Ids))},
               {case Stale of [] -> 0; _ -> 1 end, ?LAZY(elements(Stale))},
               {1, elements([<<"nope">>, <<"var_a_0">>, <<"var_zz_1">>, nope])}]).

%% {Type, constraints as given, constraints as stored} of valid registrations
type_specs() ->
    [{float, #{min => -10, max => 10}, #{min => -10.0, max => 10.0}},
     {float, #{}, #{}},
     {float, #{min => -1.5}, #{min => -1.5}},
     {integer, #{min => 0, max => 100}, #{min => 0, max => 100}},
     {integer, #{}, #{}},
     {string, #{max_length => 5}, #{max_length => 5}},
     {string, #{}, #{}},
     {string, #{pattern => <<"^[a-z]+$">>, min_length => 1},
      #{pattern => <<"^[a-z]+$">>, min_length => 1}},
     {string, #{enum => [<<"x">>, <<"yy">>]}, #{enum => [<<"x">>, <<"yy">>]}},
     {boolean, #{}, #{}},
     {choice, #{choices => [<<"red">>, <<"green">>, <<"blue">>]},
      #{choices => [<<"red">>, <<"green">>, <<"blue">>]}},
     {embedding, #{dimensions => 3}, #{dimensions => 3}},
     {embedding, #{}, #{}},
     {tensor, #{shape => [2, 2]}, #{shape => [2, 2]}},
     {tensor, #{}, #{}},
     {module, #{allowed_modules => [<<"lists">>, <<"maps">>]},
      #{allowed_modules => [<<"lists">>, <<"maps">>]}},
     {module, #{}, #{}}].

bad_constraint_specs() ->
    [{float, #{min => 5, max => 1}},
     {string, #{min_length => 4, max_length => 2}},
     {choice, #{}},
     {choice, #{choices => []}},
     {embedding, #{dimensions => 0}},
     {integer, #{max_length => 3}},
     {tensor, #{shape => []}},
     {integer, #{min => 1.5}}].

unknown_types() -> [bogus, flt, 'Float', 42, {float}, <<"nope">>].

register_cmd(S) ->
    ?LET({Name, Spec, Opts0},
         {name_key(),
          frequency([{12, ?LET({T, In, _}, elements(type_specs()), {T, In})},
                     {2, elements(bad_constraint_specs())},
                     {1, ?LET(T, elements(unknown_types()), {T, #{}})}]),
          register_opts()},
         begin
             {Type, InCons} = Spec,
             ?LET({V, WithCons, Arity},
                  {value_for(Type, gen_cons(Type, InCons)), boolean(),
                   frequency([{1, 4}, {5, 5}])},
                  case {Arity, InCons =:= #{}} of
                      {4, true} -> {call, dspex_store, register, [S, Name, Type, V]};
                      _ ->
                          Opts = case WithCons orelse InCons =/= #{} of
                                     true -> Opts0#{constraints => InCons};
                                     false -> Opts0
                                 end,
                          {call, dspex_store, register, [S, Name, Type, V, Opts]}
                  end)
         end).

gen_cons(Type, In) ->
    case model_cons(Type, In) of
        {ok, C} -> C;
        error -> #{}
    end.

register_opts() ->
    ?LET({HL, Desc, Meta, By},
         {frequency([{5, {history_limit, 3}}, {1, {history_limit, 0}}, {1, {history_limit, 1}},
                     {3, none}]),
          frequency([{1, {description, <<"desc">>}}, {3, none}]),
          frequency([{1, {metadata, #{owner => <<"me">>, n => 1}}}, {3, none}]),
          frequency([{1, {changed_by, creator}}, {3, none}])},
         maps:from_list([P || P <- [HL, Desc, Meta, By], P =/= none])).

set_cmd(St, S) ->
    ?LET(Key, key(St, S),
         begin
             Var = var_for_key(St, S, Key),
             ?LET({V, O}, {value_for_var(Var), set_opts(Var)},
                  case O of
                      none -> {call, dspex_store, set, [S, Key, V]};
                      _ -> {call, dspex_store, set, [S, Key, V, O]}
                  end)
         end).

watched_set_cmd(St, S) ->
    ?LET({Key, Extra}, {key(St, S), frequency([{4, []}, {2, [key(St, S)]}, {1, [key(St, S), key(St, S)]}])},
         begin
             Var = var_for_key(St, S, Key),
             ?LET({V, O, Order}, {value_for_var(Var), set_opts(Var), elements([first, last, first, none])},
                  begin
                      WKeys = case Order of
                                  first -> [Key | Extra];
                                  last -> Extra ++ [Key];
                                  none -> Extra
                              end,
                      {call, ?MODULE, watched_set,
                       [S, WKeys, Key, V, case O of none -> #{}; _ -> O end]}
                  end)
         end).

set_opts(Var) ->
    frequency([{12, good_set_opts(Var)},
               {1, elements([#{expected_version => -1}, #{expected_version => 1.5},
                             #{expected_version => <<"0">>, changed_by => x},
                             #{metadata => not_a_map}, #{metadata => [{a, 1}], changed_by => y}])}]).

good_set_opts(Var) ->
    ?LET({EV, Meta, By, Junk},
         {frequency([{4, none}, {3, {expected_version, ev(Var)}}]),
          frequency([{1, {metadata, meta_patch()}}, {3, none}]),
          frequency([{1, {changed_by, changer()}}, {3, none}]),
          frequency([{1, {ignored_key, 1}}, {8, none}])},
         case [P || P <- [EV, Meta, By, Junk], P =/= none] of
             [] -> none;
             Ps -> maps:from_list(Ps)
         end).

ev(undefined) -> choose(0, 3);
ev(Var) ->
    Cur = cur_version(Var),
    frequency([{6, Cur}, {1, Cur + 1}, {1, max(Cur - 1, 0)}, {1, 1000}]).

meta_patch() -> elements([#{tag => <<"x">>}, #{n => 2}, #{tag => <<"y">>, extra => [1, 2]}, #{}]).
changer() -> elements([alice, <<"bob">>, {user, 7}, 42]).

set_many_cmd(St, S) ->
    ?LET({Sel, Nope},
         {vector(length(?NAMES), frequency([{2, false}, {1, true}])),
          frequency([{5, []}, {1, [<<"nope">>]}])},
         begin
             Names = [N || {N, true} <- lists:zip(?NAMES, Sel)] ++ Nope,
             Existing = [N || N <- Names, maps:is_key(N, vars(St, S))],
             Dups = case Existing of
                        [] -> [];
                        _ -> [frequency([{8, none}, {1, ?LAZY(elements(Existing))}])]
                    end,
             ?LET({Items, Dup, Form},
                  {fixed_list([sm_item(St, S, N) || N <- Names]),
                   ?LET(Ds, fixed_list(Dups),
                        fixed_list([sm_item(St, S, D) || D <- Ds, D =/= none])),
                   elements([default, atomic, nonatomic, atomic, map_atomic, map_default])},
                  ?LET(Pos, choose(0, length(Items)),
                       sm_call(S, insert_at(Pos, Dup, Items), Form)))
         end).

insert_at(Pos, X, L) ->
    {A, B} = lists:split(Pos, L),
    A ++ X ++ B.

sm_item(St, S, Name) ->
    Var = maps:get(Name, vars(St, S), undefined),
    KeyGen = case Var of
                 undefined -> name_key_for(Name);
                 #{id := Id} -> frequency([{3, name_key_for(Name)}, {1, Id}])
             end,
    ?LET({K, V, O}, {KeyGen, value_for_var(Var), frequency([{2, none}, {1, set_opts(Var)}])},
         case O of
             none -> {K, V};
             _ -> {K, V, O}
         end).

name_key_for(Name) -> frequency([{3, Name}, {1, binary_to_atom(Name, utf8)}]).

sm_call(S, Items, Form) ->
    Plain = lists:all(fun(I) -> tuple_size(I) =:= 2 end, Items),
    case Form of
        default -> {call, dspex_store, set_many, [S, Items]};
        atomic -> {call, dspex_store, set_many, [S, Items, #{atomic => true}]};
        nonatomic -> {call, dspex_store, set_many, [S, Items, #{atomic => false}]};
        map_atomic when Plain ->
            {call, dspex_store, set_many, [S, maps:from_list(Items), #{atomic => true}]};
        map_default when Plain -> {call, dspex_store, set_many, [S, maps:from_list(Items)]};
        _ -> {call, dspex_store, set_many, [S, Items, #{atomic => true}]}
    end.

rollback_cmd(St, S) ->
    ?LET(Key, key(St, S),
         begin
             Var = var_for_key(St, S, Key),
             ?LET({T, O}, {rb_target(Var), rb_opts(Var)},
                  case O of
                      none -> {call, dspex_store, rollback, [S, Key, T]};
                      _ -> {call, dspex_store, rollback, [S, Key, T, O]}
                  end)
         end).

rb_target(undefined) -> choose(0, 6);
rb_target(#{cur := #{version := Cur}, hist := Hist}) ->
    Kept = [V || #{version := V} <- Hist],
    Pruned = lists:seq(0, Cur - 1) -- Kept,
    frequency([{2, Cur},
               {case Kept of [] -> 0; _ -> 6 end, ?LAZY(elements(Kept))},
               {case Pruned of [] -> 0; _ -> 3 end, ?LAZY(elements(Pruned))},
               {1, Cur + 1}, {1, Cur + 7}]).

rb_opts(Var) ->
    frequency([{5, none},
               {2, ?LET(EV, ev(Var), #{expected_version => EV})},
               {1, ?LET(B, changer(), #{changed_by => B})},
               {1, ?LET(P, meta_patch(), #{metadata => P})}]).

%%% Values ------------------------------------------------------------------

value_for_var(undefined) -> any_value();
value_for_var(#{type := T, cons := C}) -> value_for(T, C).

value_for(T, C) ->
    frequency([{6, valid_value(T, C)}, {4, value_for_type(T, C)}, {1, any_value()}]).

%% Values that satisfy the constraints of type_specs() (mostly: the model
%% decides).
valid_value(float, #{min := Min, max := Max}) ->
    oneof([proper_types:float(Min, Max), choose(trunc(Min), trunc(Max))]);
valid_value(float, #{min := Min}) ->
    oneof([proper_types:float(Min, 1.0e6), choose(trunc(Min), 1000), infinity]);
valid_value(float, _) ->
    oneof([proper_types:float(), choose(-1000, 1000), elements([nan, infinity, neg_infinity])]);
valid_value(integer, #{min := Min, max := Max}) ->
    oneof([choose(Min, Max), ?LET(I, choose(Min, Max), float(I))]);
valid_value(integer, _) ->
    oneof([choose(-1000, 1000), proper_types:integer(),
           elements([(1 bsl 63) - 1, -(1 bsl 63), 1.0e18, -7.0])]);
valid_value(string, #{enum := E}) -> elements(E);
valid_value(string, C) ->
    Max = maps:get(max_length, C, 12),
    oneof([?LET(N, choose(0, Max), ?LET(L, vector(N, choose($a, $z)), list_to_binary(L))),
           ?LET(N, choose(0, Max), unicode:characters_to_binary(lists:duplicate(N, $é)))]);
valid_value(boolean, _) -> boolean();
valid_value(choice, #{choices := Cs}) -> elements(Cs);
valid_value(module, #{allowed_modules := Ms}) ->
    ?LET({M, Atom}, {elements(Ms), boolean()},
         case Atom of
             true -> binary_to_atom(M, utf8);
             false -> M
         end);
valid_value(module, _) -> elements([lists, <<"maps">>, gen_server, <<"my_mod">>, 'Elixir.Foo']);
valid_value(embedding, #{dimensions := D}) -> vector(D, number());
valid_value(embedding, _) -> ?LET(N, choose(0, 5), vector(N, number()));
valid_value(tensor, #{shape := Shape}) ->
    ?LET(D, vector(lists:foldl(fun(X, A) -> X * A end, 1, Shape), number()),
         #{shape => Shape, data => D});
valid_value(tensor, _) ->
    ?LET(N, choose(0, 3),
         ?LET(Shape, vector(N, choose(0, 3)),
              ?LET(D, vector(lists:foldl(fun(X, A) -> X * A end, 1, Shape), number()),
                   #{shape => Shape, data => D})));
valid_value(T, _) -> value_for_type(T, #{}).

any_value() ->
    ?LAZY(oneof([value_for_type(T, #{}) || T <- ?TYPES])).

value_for_type(float, _) ->
    frequency([{3, elements([0, 1, -3, 10, 11, -10, -11, 0.0, 2.5, -9.75, 10.0, 10.000001, -10.5,
                             -1.5, -1.6, 1.0e300, -1.0e-300, nan, infinity, neg_infinity,
                             9223372036854775807, -9223372036854775808])},
               {2, proper_types:float()},
               {3, proper_types:float(-12.0, 12.0)},
               {2, choose(-12, 12)},
               {1, elements([1 bsl 63, 1 bsl 70, -(1 bsl 64)])},
               {1, elements([<<"1.0">>, true, [1.0], #{}, undefined])}]);
value_for_type(integer, _) ->
    frequency([{4, choose(-5, 105)},
               {3, elements([0, 100, 101, -1, 3.0, 100.0, 101.0, 2.5, -0.5, 1.0e19,
                             -9.223372036854775808e18, 9.3e18, (1 bsl 63) - 1, -(1 bsl 63),
                             1 bsl 63, -(1 bsl 63) - 1, 1 bsl 100, nan, infinity])},
               {1, elements([<<"7">>, false, [7], seven])}]);
value_for_type(string, _) ->
    frequency([{4, ?LET(N, choose(0, 7), ?LET(L, vector(N, choose($a, $z)), list_to_binary(L)))},
               {3, elements([<<>>, <<"hello">>, <<"hello!">>, <<"ééééé"/utf8>>,
                             <<"éééééé"/utf8>>, <<255>>, <<"ab", 128>>, <<"a", 0, "b">>])},
               {1, elements([42, true, [<<"a">>], 1.5])}]);
value_for_type(boolean, _) ->
    elements([true, false, true, false, 1, 0, <<"true">>, nil, undefined]);
value_for_type(choice, _) ->
    elements([<<"red">>, <<"green">>, <<"blue">>, <<"red">>, <<"pink">>, <<"Red">>, <<>>, 7,
              [<<"red">>]]);
value_for_type(module, _) ->
    frequency([{6, elements([lists, maps, <<"lists">>, <<"maps">>, <<"ets">>, ets,
                             <<"my_mod">>, 'modülé', 42, [lists]])},
               {1, elements([true, false, nan, infinity, neg_infinity])}]);
value_for_type(embedding, _) ->
    frequency([{5, ?LET(N, frequency([{3, 3}, {1, 2}, {1, 4}, {1, 0}]), vector(N, number()))},
               {1, elements([[1, a], proper_types:exactly([1.0 | 2.0]), <<1, 2, 3>>, [[1]], #{}, 5])}]);
value_for_type(tensor, _) ->
    frequency([{4, ?LET(D, vector(4, number()), #{shape => [2, 2], data => D})},
               {2, ?LET(D, vector(3, number()), #{shape => [3], data => D})},
               {2, elements([#{shape => [], data => [5]}, #{shape => [0], data => []},
                             #{shape => [2, 0, 3], data => []},
                             #{shape => [2, 2], data => [1, 2, 3]},
                             #{shape => [-1], data => []},
                             #{shape => [2], data => [1, 2], extra => x},
                             #{shape => [2.0], data => [1, 2]},
                             #{data => [1]},
                             #{shape => [1 bsl 32, 1 bsl 32], data => []},
                             [1, 2, 3, 4]])},
               {1, elements([#{shape => [1 bsl 62, 4, 0], data => []}])}]);
value_for_type(_Unknown, _) -> any_value().

number() ->
    frequency([{3, choose(-5, 5)}, {3, proper_types:float(-2.0, 2.0)},
               {1, elements([nan, infinity, neg_infinity])}]).

%%% ------------------------------------------------------------------------
%%% The model
%%% ------------------------------------------------------------------------

%% Model state:
%%   #{sessions => #{Sid => #{meta, ttl, vars => #{Name => Var}}},
%%     ids => [every id ever returned], lim => the limits in force,
%%     watches => [#{ref, s, names}] (watches delivering to the collector),
%%     refs => [every watch reference ever returned],
%%     events => [watch messages the collector should have received, in order]}
%% Var: #{id, type, cons, hl, cur => Snap, hist => [Snap] (newest first)}
%% Snap: #{version, value, meta, by}
%%
%% model_result(State, Call, Result) -> {Expected, NextState}. Expected is a
%% term for match/2 (see there); Result is only used for what no model can
%% know (the id a registration returns, the reference a watch returns).

sessions(St) -> maps:get(sessions, St).
session(St, S) -> maps:get(S, sessions(St), undefined).
vars(St, S) ->
    case session(St, S) of
        undefined -> #{};
        #{vars := V} -> V
    end.
put_session(St, S, Sess) -> St#{sessions := (sessions(St))#{S => Sess}}.
put_var(St, S, Name, Var) ->
    Sess = #{vars := Vars} = session(St, S),
    put_session(St, S, Sess#{vars := Vars#{Name => Var}}).

to_bin(K) when is_atom(K) -> atom_to_binary(K, utf8);
to_bin(K) -> K.

%% The name a key resolves to in a session's vars (the name wins over ids).
resolve(Vars, Key) ->
    K = to_bin(Key),
    case is_binary(K) andalso maps:is_key(K, Vars) of
        true -> {ok, K};
        false ->
            case [N || {N, #{id := Id}} <- maps:to_list(Vars), Id =:= K] of
                [N | _] -> {ok, N};
                [] -> error
            end
    end.

var_for_key(St, S, Key) ->
    Vars = vars(St, S),
    case resolve(Vars, Key) of
        {ok, N} -> maps:get(N, Vars);
        error -> undefined
    end.

lookup(St, S, Key) ->
    case session(St, S) of
        undefined -> no_session;
        #{vars := Vars} ->
            case resolve(Vars, Key) of
                {ok, N} -> {ok, N, maps:get(N, Vars)};
                error -> not_found
            end
    end.

cur_version(#{cur := #{version := V}}) -> V.

err(no_session, _Key) -> {error, session_not_found};
err(not_found, Key) -> {error, {not_found, Key}}.

invalid() -> {error, {invalid_value, '$bin'}}.

limit(L) -> {error, {limit_exceeded, L}}.

%% Bytes a stored value occupies (strings: bytes; numbers of embeddings and
%% tensors, and tensor dimensions: 8 bytes each)
payload(T, V) when T =:= string; T =:= choice; T =:= module -> byte_size(V);
payload(embedding, L) -> 8 * length(L);
payload(tensor, #{shape := S, data := D}) -> 8 * (length(S) + length(D));
payload(_, _) -> 0.

%% Input refused for its size before it is even validated: a binary, a list
%% or a tensor's data list of more than max_value_bytes (8 bytes a number).
raw_too_big(V, Lim) ->
    Max = map_get(max_value_bytes, Lim),
    case V of
        _ when is_binary(V) -> byte_size(V) > Max;
        _ when is_list(V) ->
            case proper_length(V) of
                N when is_integer(N) -> 8 * N > Max;
                _ -> false
            end;
        #{shape := Shape, data := Data} when map_size(V) =:= 2, is_list(Shape), is_list(Data) ->
            is_integer(proper_length(Shape)) andalso length(Shape) =< 32 andalso
                lists:all(fun(D) -> is_integer(D) andalso D >= ?INT64_MIN andalso D < ?INT64_END end,
                          Shape) andalso
                is_integer(proper_length(Data)) andalso 8 * length(Data) > Max;
        _ -> false
    end.

proper_length(L) ->
    try length(L)
    catch error:badarg -> improper
    end.

%% Runs Fun(Name, Var) when the key resolves, else the documented error.
with_var(St, S, Key, Fun) ->
    case lookup(St, S, Key) of
        {ok, N, Var} -> Fun(N, Var);
        Miss -> {err(Miss, Key), St}
    end.

var_view(Name, #{id := Id, type := T, cons := C, cur := #{version := Ver, value := V, meta := M}}) ->
    {'$var', #{id => Id, name => Name, type => T, value => V, version => Ver, metadata => M,
               constraints => C}}.

hist_view(#{version := Ver, value := V, meta := M, by := By}) ->
    {'$hist', #{version => Ver, value => V, metadata => M, changed_by => By}}.

info_view(S, #{meta := M, ttl := T, vars := Vars}) ->
    {'$info', #{id => S, metadata => M, ttl => T, variable_count => maps:size(Vars)}}.

%% Commits a new current snapshot.
commit(Var = #{cur := Cur = #{version := V}, hist := Hist, hl := HL}, Value, Meta, By) ->
    Var#{cur := #{version => V + 1, value => Value, meta => Meta, by => By},
         hist := lists:sublist([Cur | Hist], HL)}.

%% Commits in the model: the new snapshot, and a watch event for every
%% collector watch of the variable.
commit_in(St, S, N, Var = #{cur := #{version := V, value := Old}}, Value, Meta, By) ->
    Var2 = commit(Var, Value, Meta, By),
    Ev = [{dspex_variable, Ref, S, N, Old, Value,
           {'$wmeta', #{version => V + 1, previous_version => V, changed_by => By, metadata => Meta}}}
          || #{ref := Ref, s := S0, names := Ns} <- maps:get(watches, St), S0 =:= S,
             lists:member(N, Ns)],
    St2 = put_var(St, S, N, Var2),
    {V + 1, St2#{events := maps:get(events, St2) ++ Ev}}.

%% Variables that go away take their watches with them.
unwatch_vars(St, S, Names) ->
    St#{watches := [case W of
                        #{s := S} when Names =:= all -> W#{names := []};
                        #{s := S, names := Ns} -> W#{names := Ns -- Names};
                        _ -> W
                    end || W <- maps:get(watches, St)]}.

merged_meta(#{cur := #{meta := M}}, #{metadata := P}) -> maps:merge(M, P);
merged_meta(#{cur := #{meta := M}}, _) -> M.

by(Opts) -> maps:get(changed_by, Opts, undefined).

%% The option a set/rollback refuses ({error, {invalid_argument, Key}}).
bad_option(#{expected_version := EV}) when not (is_integer(EV) andalso EV >= 0) -> expected_version;
bad_option(#{metadata := M}) when not is_map(M) -> metadata;
bad_option(_) -> none.

ev_check(Var, Opts) ->
    Cur = cur_version(Var),
    case Opts of
        #{expected_version := EV} when EV =/= Cur -> {mismatch, Cur};
        _ -> ok
    end.

model_result(St = {par, _}, Call, _) -> par_model(St, Call);
model_result(St, {call, dspex_store, create_session, [S]}, _) -> create(St, S, #{});
model_result(St, {call, dspex_store, create_session, [S, O]}, _) -> create(St, S, O);
model_result(St, {call, dspex_store, delete_session, [S]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        _ -> {ok, unwatch_vars(St#{sessions := maps:remove(S, sessions(St))}, S, all)}
    end;
model_result(St, {call, dspex_store, get_session, [S]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        Sess -> {{ok, info_view(S, Sess)}, St}
    end;
model_result(St, {call, dspex_store, touch, [S]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        _ -> {ok, St}
    end;
model_result(St, {call, ?MODULE, session_listed, [S]}, _) ->
    {session(St, S) =/= undefined, St};
model_result(St, {call, dspex_store, register, [S, Name, T, V]}, R) ->
    register(St, S, Name, T, V, #{}, R);
model_result(St, {call, dspex_store, register, [S, Name, T, V, O]}, R) ->
    register(St, S, Name, T, V, O, R);
model_result(St, {call, dspex_store, get, [S, K]}, _) ->
    with_var(St, S, K, fun(N, Var) -> {{ok, var_view(N, Var)}, St} end);
model_result(St, {call, dspex_store, get_value, [S, K]}, _) ->
    with_var(St, S, K, fun(_, #{cur := #{value := V}}) -> {{ok, V}, St} end);
model_result(St, {call, dspex_store, get_value, [S, K, D]}, _) ->
    case lookup(St, S, K) of
        {ok, _, #{cur := #{value := V}}} -> {V, St};
        _ -> {D, St}
    end;
model_result(St, {call, dspex_store, exists, [S, K]}, _) ->
    {case lookup(St, S, K) of {ok, _, _} -> true; _ -> false end, St};
model_result(St, {call, dspex_store, set, [S, K, V]}, _) -> set(St, S, K, V, #{});
model_result(St, {call, dspex_store, set, [S, K, V, O]}, _) -> set(St, S, K, V, O);
model_result(St, {call, dspex_store, delete, [S, K]}, _) ->
    with_var(St, S, K, fun(N, _) ->
                               Sess = #{vars := Vars} = session(St, S),
                               St2 = put_session(St, S, Sess#{vars := maps:remove(N, Vars)}),
                               {ok, unwatch_vars(St2, S, [N])}
                       end);
model_result(St, {call, dspex_store, list, [S]}, _) -> list(St, S, fun(_) -> true end);
model_result(St, {call, dspex_store, list, [S, P]}, _) ->
    list(St, S, fun(N) -> glob(P, N) end);
model_result(St, {call, dspex_store, get_many, [S, Keys]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        _ ->
            Found = maps:from_list([{K, var_view(N, Var)} || K <- Keys,
                                                             {ok, N, Var} <- [lookup(St, S, K)]]),
            Missing = [K || K <- Keys, lookup(St, S, K) =:= not_found],
            {{ok, #{found => Found, missing => Missing}}, St}
    end;
model_result(St, {call, dspex_store, set_many, [S, U]}, _) -> set_many(St, S, U, false);
model_result(St, {call, dspex_store, set_many, [S, U, O]}, _) ->
    set_many(St, S, U, maps:get(atomic, O, false) =:= true);
model_result(St, {call, dspex_store, history, [S, K]}, _) -> history(St, S, K, all);
model_result(St, {call, dspex_store, history, [S, K, L]}, _) -> history(St, S, K, L);
model_result(St, {call, dspex_store, rollback, [S, K, T]}, _) -> rollback(St, S, K, T, #{});
model_result(St, {call, dspex_store, rollback, [S, K, T, O]}, _) -> rollback(St, S, K, T, O);
model_result(St, {call, ?MODULE, export_roundtrip, [S]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        Sess ->
            E = export_view(S, Sess),
            %% the imported variables are new ones: no watches
            {{'$roundtrip', E}, unwatch_vars(St, S, all)}
    end;
model_result(St, {call, ?MODULE, limited, [Patch, M, F, A]}, Res) ->
    Lim = maps:get(lim, St),
    {Exp, St2} = model_result(St#{lim := maps:merge(Lim, Patch)}, {call, M, F, A}, Res),
    {Exp, St2#{lim := Lim}};
model_result(St, {call, ?MODULE, watch_collector, [S, Keys]}, Res) ->
    Missing = [K || K <- Keys, not is_tuple(lookup(St, S, K))],
    case {Keys, session(St, S), Missing} of
        {[], _, _} -> {{error, {invalid_argument, variables}}, St};
        {_, undefined, _} -> {{error, session_not_found}, St};
        {_, _, [M | _]} -> {{error, {not_found, M}}, St};
        _ ->
            Names = lists:usort([N || K <- Keys, {ok, N, _} <- [lookup(St, S, K)]]),
            {'$ref', St#{watches := maps:get(watches, St) ++ [#{ref => Res, s => S, names => Names}],
                         refs := maps:get(refs, St) ++ [Res]}}
    end;
model_result(St, {call, dspex_store, unwatch, [Ref]}, _) ->
    {ok, St#{watches := [W || W = #{ref := R} <- maps:get(watches, St), R =/= Ref]}};
model_result(St, {call, ?MODULE, drain, []}, _) ->
    {{'$drain', maps:get(events, St)}, St#{events := []}};
model_result(St, {call, dspex_store, info, [S, K]}, _) ->
    with_var(St, S, K,
             fun(N, #{hist := H, hl := HL, cur := #{version := V, by := By}}) ->
                     Watchers = length([W || W = #{s := S0, names := Ns} <- maps:get(watches, St),
                                             S0 =:= S, lists:member(N, Ns), is_map(W)]),
                     %% the current version and who wrote it
                     {{ok, #{watchers => Watchers, history_size => length(H), history_limit => HL,
                             version => V, changed_by => By}}, St}
             end);
model_result(St, {call, ?MODULE, import_existing, [S]}, _) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        _ -> {{error, {already_exists, S}}, St}
    end;
model_result(St, {call, ?MODULE, watched_set, [S, WKeys, K, V, O]}, Res) ->
    W = case Res of
            {W0, _, _} -> W0;
            _ -> undefined
        end,
    {SetExp, St2} = set(St, S, K, V, O),
    Watched = [N || WK <- WKeys, {ok, N, _} <- [lookup(St, S, WK)]],
    Missing = [WK || WK <- WKeys, not is_tuple(lookup(St, S, WK))],
    case {WKeys, session(St, S), Missing} of
        {[], _, _} -> {{{error, {invalid_argument, variables}}, SetExp, []}, St2};
        {_, undefined, _} -> {{{error, session_not_found}, SetExp, []}, St2};
        {_, _, [Miss | _]} -> {{{error, {not_found, Miss}}, SetExp, []}, St2};
        _ ->
            Msgs = case {SetExp, lookup(St, S, K)} of
                       {{ok, NewV}, {ok, N, Var}} ->
                           #{cur := #{value := NewVal, meta := M, by := By}} =
                               maps:get(N, vars(St2, S)),
                           case lists:member(N, Watched) of
                               true ->
                                   [{dspex_variable, W, S, N, maps:get(value, maps:get(cur, Var)),
                                     NewVal,
                                     {'$wmeta', #{version => NewV, previous_version => NewV - 1,
                                                  changed_by => By, metadata => M}}}];
                               false -> []
                           end;
                       _ -> []
                   end,
            {{'$ref', SetExp, Msgs}, St2}
    end.

create(St, S, O) ->
    Ttl = maps:get(ttl, O, 3600),
    Meta = maps:get(metadata, O, #{}),
    case {Ttl =:= infinity orelse (is_integer(Ttl) andalso Ttl >= 0), is_map(Meta)} of
        {false, _} -> {{error, {invalid_argument, ttl}}, St};
        {_, false} -> {{error, {invalid_argument, metadata}}, St};
        _ when byte_size(S) > map_get(max_name_length, map_get(lim, St)) ->
            {limit(name_length), St};
        _ ->
            case session(St, S) of
                undefined ->
                    Sess = #{meta => Meta, ttl => Ttl, vars => #{}},
                    {{ok, info_view(S, Sess)}, put_session(St, S, Sess)};
                Sess -> {{ok, info_view(S, Sess)}, St}
            end
    end.

register(St, S, Name0, Type, Value, Opts, Res) ->
    Name = to_bin(Name0),
    InCons = maps:get(constraints, Opts, #{}),
    Meta0 = maps:get(metadata, Opts, #{}),
    Meta = case Opts of
               #{description := D} -> Meta0#{description => D};
               _ -> Meta0
           end,
    Lim = maps:get(lim, St),
    HL = maps:get(history_limit, Opts, maps:get(default_history, Lim)),
    %% Order of checks where several apply: type, constraints, value, session,
    %% name (the documentation does not fix one; this is the implementation's).
    case lists:member(Type, ?TYPES) of
        false -> {{error, {unknown_type, Type}}, St};
        true ->
            case model_cons(Type, InCons) of
                error -> {{error, {invalid_constraints, '$bin'}}, St};
                {ok, Cons} ->
                    case raw_too_big(Value, Lim) orelse coerce(Type, Cons, Value) of
                        true -> {limit(value_size), St};
                        error -> {invalid(), St};
                        {ok, Stored} ->
                            NameLen = byte_size(Name),
                            case session(St, S) of
                                undefined -> {{error, session_not_found}, St};
                                _ when NameLen =:= 0;
                                       NameLen > map_get(max_name_length, Lim) ->
                                    {limit(name_length), St};
                                Sess ->
                                    register_in(St, S, Sess, Name, Type, Cons, Stored, Meta, HL,
                                                Opts, Res)
                            end
                    end
            end
    end.

register_in(St, S, #{vars := Vars}, Name, Type, Cons, Stored, Meta, HL, Opts, Res) ->
    Lim = maps:get(lim, St),
    case {payload(Type, Stored) > map_get(max_value_bytes, Lim),
          HL > map_get(max_history, Lim),
          maps:is_key(Name, Vars),
          maps:size(Vars) >= map_get(max_variables, Lim)} of
        {true, _, _, _} -> {limit(value_size), St};
        {_, true, _, _} -> {limit(history_limit), St};
        {_, _, true, _} -> {{error, {already_exists, Name}}, St};
        {_, _, _, true} -> {limit(variables), St};
        _ ->
                                    Id = {call, erlang, element, [2, Res]},
                                    Var = #{id => Id, type => Type, cons => Cons, hl => HL,
                                            cur => #{version => 0, value => Stored, meta => Meta,
                                                     by => maps:get(changed_by, Opts, undefined)},
                                            hist => []},
                                    St2 = put_var(St, S, Name, Var),
                                    {{ok, {'$id', Name}}, St2#{ids := maps:get(ids, St2) ++ [Id]}}
    end.

set(St, S, K, V, O) ->
    case bad_option(O) of
        none -> set1(St, S, K, V, O);
        Bad -> {{error, {invalid_argument, Bad}}, St}
    end.

set1(St, S, K, V, O) ->
    with_var(St, S, K,
             fun(N, Var = #{type := T, cons := C}) ->
                     Lim = maps:get(lim, St),
                     case raw_too_big(V, Lim) orelse coerce(T, C, V) of
                         true -> {limit(value_size), St};
                         error -> {invalid(), St};
                         {ok, Stored} ->
                             case {ev_check(Var, O), ?BIG(T, Stored, Lim)} of
                                 {{mismatch, Cur}, _} -> {{error, {version_mismatch, Cur}}, St};
                                 {ok, true} -> {limit(value_size), St};
                                 {ok, false} ->
                                     {NewV, St2} = commit_in(St, S, N, Var, Stored,
                                                             merged_meta(Var, O), by(O)),
                                     {{ok, NewV}, St2}
                             end
                     end
             end).

rollback(St, S, K, T, O) ->
    case bad_option(O) of
        none -> rollback1(St, S, K, T, O);
        Bad -> {{error, {invalid_argument, Bad}}, St}
    end.

rollback1(St, S, K, T, O) ->
    with_var(St, S, K,
             fun(N, Var = #{cur := Cur, hist := Hist}) ->
                     case [Sn || Sn = #{version := V} <- [Cur | Hist], V =:= T] of
                         [] -> {{error, {version_not_found, T}}, St};
                         [#{value := Val, meta := M}] ->
                             case {ev_check(Var, O),
                                   ?BIG(maps:get(type, Var), Val, maps:get(lim, St))} of
                                 {{mismatch, C}, _} -> {{error, {version_mismatch, C}}, St};
                                 {ok, true} -> {limit(value_size), St};
                                 {ok, false} ->
                                     Meta = case {O, bug(rollback_metadata)} of
                                                {#{metadata := P}, false} -> maps:merge(M, P);
                                                _ -> M
                                            end,
                                     {NewV, St2} = commit_in(St, S, N, Var, Val, Meta, by(O)),
                                     {{ok, NewV}, St2}
                             end
                     end
             end).

history(St, S, K, Limit) ->
    with_var(St, S, K,
             fun(_, #{hist := Hist}) ->
                     L = case Limit of
                             all -> Hist;
                             _ -> lists:sublist(Hist, Limit)
                         end,
                     {{ok, [hist_view(H) || H <- L]}, St}
             end).

list(St, S, Filter) ->
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        #{vars := Vars} ->
            {{ok, [var_view(N, V) || {N, V} <- lists:sort(maps:to_list(Vars)), Filter(N)]}, St}
    end.

set_many(St, S, Updates, Atomic) ->
    Items = case Updates of
                M when is_map(M) -> [{K, V, #{}} || {K, V} <- maps:to_list(M)];
                L -> [case U of {K, V} -> {K, V, #{}}; {_, _, _} -> U end || U <- L]
            end,
    case session(St, S) of
        undefined -> {{error, session_not_found}, St};
        _ ->
            case duplicate(St, S, Items) of
                none -> set_many1(St, S, Items, Atomic);
                Dup -> {{error, {duplicate_variable, Dup}}, St}
            end
    end.

%% The key of the first update naming a variable an earlier update named.
duplicate(St, S, Items) ->
    duplicate(St, S, Items, []).

duplicate(_, _, [], _) -> none;
duplicate(St, S, [{K, V, O} | Rest], Seen) ->
    %% emulated bug: an update with a bad option is not checked, and only
    %% earlier updates that passed validation count
    Emulate = bug(duplicate_after_failed_item),
    case lookup(St, S, K) of
        {ok, N, #{type := T, cons := C}} ->
            OptsOk = bad_option(O) =:= none,
            case lists:member(N, Seen) andalso (OptsOk orelse not Emulate) of
                true -> K;
                false ->
                    Counts = not Emulate orelse
                        (OptsOk andalso not raw_too_big(V, maps:get(lim, St)) andalso
                         coerce(T, C, V) =/= error),
                    duplicate(St, S, Rest, case Counts of true -> [N | Seen]; false -> Seen end)
            end;
        _ -> duplicate(St, S, Rest, Seen)
    end.

set_many1(St, S, Items, Atomic) ->
            Pre = [{K, pre_item(St, S, K, V, O)} || {K, V, O} <- Items],
            PreErrors = [{K, R} || {K, {error, R}} <- Pre],
            Checked = [case P of
                           {K, {ok, N, Var, Stored, O}} ->
                               case {ev_check(Var, O),
                                     ?BIG(maps:get(type, Var), Stored, maps:get(lim, St))} of
                                   {ok, true} -> {K, {error, {limit_exceeded, value_size}}};
                                   {ok, false} -> {K, {ok, N, Var, Stored, O}};
                                   {{mismatch, Cur}, _} -> {K, {error, {version_mismatch, Cur}}}
                               end;
                           _ -> P
                       end || P <- Pre],
            AllErrors = [{K, R} || {K, {error, R}} <- Checked],
            Good = [{K, N, Var, Stored, O} || {K, {ok, N, Var, Stored, O}} <- Checked],
            Apply = fun() ->
                            lists:foldl(
                              fun({K, N, Var, Stored, O}, {Acc, StAcc}) ->
                                      {NewV, StAcc2} = commit_in(StAcc, S, N, Var, Stored,
                                                                 merged_meta(Var, O), by(O)),
                                      {Acc#{K => NewV}, StAcc2}
                              end, {#{}, St}, Good)
                    end,
            case Atomic of
                true when AllErrors =:= [] ->
                    {Versions, St2} = Apply(),
                    {{ok, Versions}, St2};
                true ->
                    Reported = case PreErrors =/= [] andalso bug(atomic_batch_errors) of
                                   true -> PreErrors;
                                   false -> AllErrors
                               end,
                    {{error, {batch_failed, maps:from_list(Reported)}}, St};
                false ->
                    {Versions, St2} = Apply(),
                    {{ok, #{updated => Versions, errors => maps:from_list(AllErrors)}}, St2}
            end.

pre_item(St, S, K, V, O) ->
    case bad_option(O) of
        none -> pre_item1(St, S, K, V, O);
        Bad -> {error, {invalid_argument, Bad}}
    end.

pre_item1(St, S, K, V, O) ->
    case lookup(St, S, K) of
        {ok, N, Var = #{type := T, cons := C}} ->
            case raw_too_big(V, maps:get(lim, St)) orelse coerce(T, C, V) of
                true -> {error, {limit_exceeded, value_size}};
                {ok, Stored} -> {ok, N, Var, Stored, O};
                error -> {error, {invalid_value, '$bin'}}
            end;
        not_found -> {error, {not_found, K}}
    end.

export_view(S, #{meta := M, ttl := T, vars := Vars}) ->
    VarViews = [begin
                    #{id := Id, type := Ty, cons := C, hl := HL,
                      cur := #{version := Ver, value := V, meta := VM, by := By}, hist := H} = Var,
                    #{id => Id, name => N, type => Ty, value => V, constraints => C,
                      metadata => VM, version => Ver, changed_by => By, history_limit => HL,
                      history => [element(2, hist_view(E)) || E <- lists:reverse(H)], derived => false}
                end || {N, Var} <- lists:sort(maps:to_list(Vars))],
    %% the model uses no graph, rules or derived variables: those parts are empty
    #{format => dspex_session_v1, id => S, metadata => M, ttl => T, variables => VarViews,
      dependencies => [], permissions => #{}, derived_functions => []}.

%%% Constraints and values (documented rules) -------------------------------

model_cons(Type, In) ->
    try
        C = maps:map(fun(K, V) -> cons_value(Type, K, V) end, In),
        ok = cons_finish(Type, C),
        {ok, C}
    catch throw:invalid -> error
    end.

cons_value(float, K, V) when (K =:= min orelse K =:= max), is_number(V) -> float(V);
cons_value(integer, K, V) when (K =:= min orelse K =:= max), is_integer(V) -> V;
cons_value(string, K, V) when (K =:= min_length orelse K =:= max_length),
                              is_integer(V), V >= 0 -> V;
cons_value(string, pattern, V) when is_binary(V) -> V;
cons_value(string, enum, V) when is_list(V) ->
    [throw(invalid) || X <- V, not is_binary(X)],
    V;
cons_value(choice, choices, V) when is_list(V) ->
    [throw(invalid) || X <- V, not is_binary(X)],
    V;
cons_value(module, allowed_modules, V) when is_list(V), V =/= [] -> V;
cons_value(embedding, dimensions, V) when is_integer(V), V > 0 -> V;
cons_value(tensor, shape, V) when is_list(V), V =/= [], length(V) =< 32 ->
    [throw(invalid) || X <- V, not (is_integer(X) andalso X >= 0)],
    V;
cons_value(_, _, _) -> throw(invalid).

cons_finish(choice, #{choices := [_ | _]}) -> ok;
cons_finish(choice, _) -> throw(invalid);
cons_finish(_, #{min := Min, max := Max}) when Min > Max -> throw(invalid);
cons_finish(_, #{min_length := Min, max_length := Max}) when Min > Max -> throw(invalid);
cons_finish(_, _) -> ok.

coerce(float, C, V) ->
    case to_float(V) of
        error -> error;
        {ok, F} ->
            case maps:is_key(min, C) orelse maps:is_key(max, C) of
                true when F =:= nan -> error;
                _ ->
                    case num_ge(F, maps:get(min, C, neg_infinity)) andalso
                        num_ge(maps:get(max, C, infinity), F) of
                        true -> {ok, F};
                        false -> error
                    end
            end
    end;
coerce(integer, C, V) ->
    I = if
            is_integer(V), V >= ?INT64_MIN, V < ?INT64_END -> V;
            is_float(V), V >= ?INT64_MIN, V < ?INT64_END ->
                case V == float(trunc(V)) of
                    true -> trunc(V);
                    false -> error
                end;
            true -> error
        end,
    case I of
        error -> error;
        _ ->
            case I >= maps:get(min, C, I) andalso I =< maps:get(max, C, I) of
                true -> {ok, I};
                false -> error
            end
    end;
coerce(string, C, V) when is_atom(V) ->
    case atom_text(V) of
        error -> error;
        Text -> coerce(string, C, Text)
    end;
coerce(string, C, V) when is_binary(V) ->
    case utf8_length(V) of
        error -> error;
        N ->
            case N >= maps:get(min_length, C, 0) andalso N =< maps:get(max_length, C, N) andalso
                pattern_ok(V, C) andalso lists:member(V, maps:get(enum, C, [V])) of
                true -> {ok, V};
                false -> error
            end
    end;
coerce(boolean, _, V) when is_boolean(V) -> {ok, V};
coerce(choice, C, V) when is_atom(V) ->
    case atom_text(V) of
        error -> error;
        Text -> coerce(choice, C, Text)
    end;
coerce(choice, #{choices := Cs}, V) when is_binary(V) ->
    case lists:member(V, Cs) of
        true -> {ok, V};
        false -> error
    end;
coerce(module, C, V) ->
    Text = if
               is_binary(V) -> V;
               is_atom(V) ->
                   case lists:member(V, [true, false, nan, infinity, neg_infinity])
                       andalso bug(module_atoms) of
                       true -> error;
                       false -> ascii_text(V)
                   end;
               true -> error
           end,
    case Text of
        error -> error;
        <<>> -> error;
        _ ->
            case utf8_length(Text) =/= error andalso
                lists:member(Text, maps:get(allowed_modules, C, [Text])) of
                true -> {ok, Text};
                false -> error
            end
    end;
coerce(embedding, C, V) ->
    case num_list(V) of
        error -> error;
        L ->
            case length(L) =:= maps:get(dimensions, C, length(L)) of
                true -> {ok, L};
                false -> error
            end
    end;
coerce(tensor, C, #{shape := Shape, data := Data} = V) when map_size(V) =:= 2, is_list(Shape) ->
    ShapeOk = lists:all(fun(D) -> is_integer(D) andalso D >= 0 andalso D < ?INT64_END end, Shape)
        andalso length(Shape) =< 32,
    case ShapeOk andalso num_list(Data) of
        false -> error;
        error -> error;
        L ->
            Product = lists:foldl(fun(D, Acc) -> D * Acc end, 1, Shape),
            Overflow = bug(tensor_zero_overflow) andalso prefix_overflows(Shape),
            case Product =:= length(L) andalso not Overflow andalso
                Shape =:= maps:get(shape, C, Shape) of
                true -> {ok, #{shape => Shape, data => L}};
                false -> error
            end
    end;
coerce(_, _, _) -> error.

%% The text of an ASCII atom: documented for string, choice and module, and
%% it includes atoms that are values of other types (true, nan, ...).
atom_text(V) -> ascii_text(V).

ascii_text(V) ->
    L = atom_to_list(V),
    case lists:all(fun(Ch) -> Ch < 128 end, L) of
        true -> list_to_binary(L);
        false -> error
    end.

%% (the patterns used are read the same by POSIX ERE and by re)
pattern_ok(V, #{pattern := P}) ->
    binary:match(V, <<0>>) =:= nomatch andalso re:run(V, P, [{capture, none}]) =:= match;
pattern_ok(_, _) -> true.

prefix_overflows(Shape) ->
    {_, Over} = lists:foldl(fun(_, {P, true}) -> {P, true};
                               (0, {_, false}) -> {0, false};
                               (D, {P, false}) -> {P * D, P * D >= (1 bsl 64)}
                            end, {1, false}, Shape),
    Over.

to_float(V) when is_integer(V) ->
    case bug(float_bigint) andalso not (V >= ?INT64_MIN andalso V < ?INT64_END) of
        true -> error;
        false ->
            try {ok, float(V)}
            catch error:badarg -> error
            end
    end;
to_float(V) when is_float(V) -> {ok, V};
to_float(V) when V =:= nan; V =:= infinity; V =:= neg_infinity -> {ok, V};
to_float(_) -> error.

%% Numbers of an embedding or tensor (integers within 64 bits, floats, the
%% three special atoms), as stored: floats.
num_list(L) when is_list(L) ->
    try
        [case X of
             _ when is_integer(X), X >= ?INT64_MIN, X < ?INT64_END -> float(X);
             _ when is_float(X) -> X;
             nan -> nan;
             infinity -> infinity;
             neg_infinity -> neg_infinity;
             _ -> throw(error)
         end || X <- L]
    catch
        throw:error -> error;
        error:_ -> error % improper list
    end;
num_list(_) -> error.

%% A >= B over floats and the infinities (nan never gets here)
num_ge(_, neg_infinity) -> true;
num_ge(infinity, _) -> true;
num_ge(neg_infinity, _) -> false;
num_ge(_, infinity) -> false;
num_ge(A, B) -> A >= B.

utf8_length(B) ->
    case unicode:characters_to_list(B, utf8) of
        L when is_list(L) -> length(L);
        _ -> error
    end.

%% '*' any run, '?' one character, anything else literal (names are ASCII).
glob(<<>>, <<>>) -> true;
glob(<<$*, P/binary>>, S) -> glob(P, S) orelse (S =/= <<>> andalso glob(<<$*, P/binary>>, tl1(S)));
glob(<<$?, P/binary>>, <<_, S/binary>>) -> glob(P, S);
glob(<<C, P/binary>>, <<C, S/binary>>) -> glob(P, S);
glob(_, _) -> false.

tl1(<<_, S/binary>>) -> S.

%%% ------------------------------------------------------------------------
%%% Matching actual results against the model's expectations
%%% ------------------------------------------------------------------------

%% '$bin' any binary; {'$id', Name} an id <<"var_", Name, "_", Digits>>;
%% {'$var', View}/{'$hist', View}/{'$info', View}: the map without its
%% timestamps equals View, the timestamps are integers;
%% {'$roundtrip', Export}: see export_roundtrip/1; {'$ref', Set, Msgs}: the
%% result of watched_set/5 with a reference for a watch.
match('$bin', A) -> is_binary(A);
match('$ref', A) -> is_reference(A);
match({'$drain', Expected}, Actual) when is_list(Actual) ->
    %% per watch and variable, in commit order (what the API promises)
    Group = fun(Msgs) ->
                    lists:foldl(fun(M, Acc) when tuple_size(M) =:= 7 ->
                                        maps:update_with({element(2, M), element(4, M)},
                                                         fun(L) -> L ++ [M] end, [M], Acc);
                                   (M, Acc) -> Acc#{bad => [M]}
                                end, #{}, Msgs)
            end,
    match(Group(Expected), Group(Actual));
match({'$id', Name}, A) ->
    Size = byte_size(Name),
    case A of
        <<"var_", Name:Size/binary, "_", Digits/binary>> when Digits =/= <<>> ->
            lists:all(fun(C) -> C >= $0 andalso C =< $9 end, binary_to_list(Digits));
        _ -> false
    end;
match({'$var', View}, A) when is_map(A) ->
    case A of
        #{created_at := C, updated_at := U} when is_integer(C), is_integer(U), U >= C ->
            match(View, maps:without([created_at, updated_at], A));
        _ -> false
    end;
match({'$hist', View}, A) when is_map(A) ->
    case A of
        #{updated_at := U} when is_integer(U) -> match(View, maps:remove(updated_at, A));
        _ -> false
    end;
match({'$info', View}, A) when is_map(A) ->
    case A of
        #{created_at := C, last_accessed_at := L} when is_integer(C), is_integer(L) ->
            match(View, maps:without([created_at, last_accessed_at], A));
        _ -> false
    end;
match({'$wmeta', View}, A) when is_map(A) ->
    case A of
        #{updated_at := U} when is_integer(U) -> match(View, maps:remove(updated_at, A));
        _ -> false
    end;
match({'$ref', SetExp, Msgs}, {W, R, AMsgs}) ->
    is_reference(W) andalso match(SetExp, R) andalso match(Msgs, AMsgs);
match({'$roundtrip', E}, {ok, Exported, ok, ok, {ok, Again}}) ->
    match_export(E, Exported) andalso Again =:= Exported;
match(E, A) when is_tuple(E), is_tuple(A), tuple_size(E) =:= tuple_size(A) ->
    match(tuple_to_list(E), tuple_to_list(A));
match([E | Es], [A | As]) -> match(E, A) andalso match(Es, As);
match(E, A) when is_map(E), is_map(A), map_size(E) =:= map_size(A) ->
    lists:all(fun({K, V}) -> maps:is_key(K, A) andalso match(V, maps:get(K, A)) end,
              maps:to_list(E));
match(E, A) -> E =:= A.

match_export(E = #{variables := EVars}, A = #{variables := AVars}) when is_list(AVars) ->
    Strip = fun(V) when is_map(V) ->
                    H = [maps:remove(updated_at, X) || X <- maps:get(history, V, []), is_map(X)],
                    Ok = is_integer(maps:get(created_at, V, x)) andalso
                        is_integer(maps:get(updated_at, V, x)) andalso
                        lists:all(fun(X) -> is_integer(maps:get(updated_at, X, x)) end,
                                  maps:get(history, V, [])),
                    {Ok, (maps:without([created_at, updated_at], V))#{history => H}};
               (V) -> {false, V}
            end,
    Stripped = [Strip(V) || V <- AVars],
    lists:all(fun({Ok, _}) -> Ok end, Stripped) andalso
        is_integer(maps:get(created_at, A, x)) andalso
        match(maps:remove(variables, E), maps:without([variables, created_at], A)) andalso
        match(EVars, lists:sort(fun(X, Y) -> maps:get(name, X) =< maps:get(name, Y) end,
                                [V || {_, V} <- Stripped]));
match_export(_, _) -> false.

%%% ------------------------------------------------------------------------
%%% Parallel model: one integer variable, optimistic locking
%%% ------------------------------------------------------------------------

%% {par, #{Name => {Version, Value, History [{Version, Value}] newest first}}}
par_initial() -> {par, maps:from_list([{N, {0, 0, []}} || N <- ?PVARS])}.

par_setup() ->
    _ = dspex_store:delete_session(?SPAR),
    {ok, _} = dspex_store:create_session(?SPAR, #{ttl => infinity}),
    [{ok, _} = dspex_store:register(?SPAR, N, integer, 0, #{history_limit => ?PAR_HL})
     || N <- ?PVARS],
    ok.

par_command({par, Vars}) ->
    EV = fun(N) ->
                 {Ver, _, _} = maps:get(N, Vars),
                 frequency([{3, Ver}, {1, Ver + 1}, {1, max(Ver - 1, 0)}])
         end,
    Val = choose(1, 1000000),
    ?LET(N, elements(?PVARS),
         frequency(
           [{3, {call, ?MODULE, par_read, [?SPAR, N]}},
            {6, ?LET({E, V}, {EV(N), Val},
                     {call, dspex_store, set, [?SPAR, N, V, #{expected_version => E}]})},
            {1, ?LET(V, Val, {call, dspex_store, set, [?SPAR, N, V]})},
            {2, ?LET({E, V}, {EV(N), Val},
                     {call, dspex_store, set_many,
                      [?SPAR, [{N, V, #{expected_version => E}}], #{atomic => true}]})},
            {3, ?LET({{E1, V1}, {E2, V2}, Atomic}, {{EV(hd(?PVARS)), Val}, {EV(lists:last(?PVARS)), Val},
                                                    frequency([{3, true}, {1, false}])},
                     {call, dspex_store, set_many,
                      [?SPAR, [{hd(?PVARS), V1, #{expected_version => E1}},
                               {lists:last(?PVARS), V2, #{expected_version => E2}}],
                       #{atomic => Atomic}]})},
            {1, {call, dspex_store, history, [?SPAR, N, 2]}},
            {1, ?LET(T, begin
                            {Ver, _, Hist} = maps:get(N, Vars),
                            elements([Ver | [V || {V, _} <- Hist]])
                        end,
                     {call, dspex_store, rollback, [?SPAR, N, T]})}])).

par_model(St = {par, Vars}, {call, _, F, Args}) ->
    Commit = fun(N, X, Vs) ->
                     {Ver, Val, Hist} = maps:get(N, Vs),
                     Vs#{N := {Ver + 1, X, lists:sublist([{Ver, Val} | Hist], ?PAR_HL)}}
             end,
    Ver = fun(N) -> element(1, maps:get(N, Vars)) end,
    case {F, Args} of
        {par_read, [_, N]} ->
            {V, X, _} = maps:get(N, Vars),
            {{V, X}, St};
        {set, [_, N, X, #{expected_version := E}]} ->
            case Ver(N) of
                E -> {{ok, E + 1}, {par, Commit(N, X, Vars)}};
                Cur -> {{error, {version_mismatch, Cur}}, St}
            end;
        {set, [_, N, X]} -> {{ok, Ver(N) + 1}, {par, Commit(N, X, Vars)}};
        {set_many, [_, Items, #{atomic := Atomic}]} ->
            Bad = [{N, {version_mismatch, Ver(N)}} || {N, _, #{expected_version := E}} <- Items,
                                                     E =/= Ver(N)],
            Good = [{N, X} || {N, X, #{expected_version := E}} <- Items, E =:= Ver(N)],
            case {Atomic, Bad} of
                {true, [_ | _]} -> {{error, {batch_failed, maps:from_list(Bad)}}, St};
                _ ->
                    Vars2 = lists:foldl(fun({N, X}, Acc) -> Commit(N, X, Acc) end, Vars, Good),
                    Updated = maps:from_list([{N, Ver(N) + 1} || {N, _} <- Good]),
                    Res = case Atomic of
                              true -> {ok, Updated};
                              false -> {ok, #{updated => Updated, errors => maps:from_list(Bad)}}
                          end,
                    {Res, {par, Vars2}}
            end;
        {history, [_, N, L]} ->
            {_, _, Hist} = maps:get(N, Vars),
            {{ok, [{'$hist', #{version => V, value => X, metadata => #{}, changed_by => undefined}}
                   || {V, X} <- lists:sublist(Hist, L)]}, St};
        {rollback, [_, N, T]} ->
            {V, Val, Hist} = maps:get(N, Vars),
            case lists:keyfind(T, 1, [{V, Val} | Hist]) of
                {T, X} -> {{ok, V + 1}, {par, Commit(N, X, Vars)}};
                false -> {{error, {version_not_found, T}}, St}
            end
    end.
