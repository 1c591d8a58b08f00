%% PropEr property (issue #14): for every store, lock and access-control call
%% that takes a principal, a random principal term never gets more than the
%% binary principal it denotes. `#{as => "intruder"}' (a charlist) used to get
%% the optimizer lock that `#{as => <<"intruder">>}' was refused, because the
%% NIF ignored a principal it could not parse and acted as the owner.
%%
%% Each case builds two identical sessions (a variable `x' with rules for
%% <<"reader">>, <<"writer">> and <<"optimizer">>), runs the call with the
%% random term on one and with the binary it denotes (its text for a charlist,
%% an iolist or an atom; `undefined' denotes the session itself; other terms
%% denote nobody) on the other, and compares: allowed > denied > refused
%% (badarg). The documented rule is stronger and checked too: a principal that
%% is neither a binary nor `undefined' (or a `context' that is not a map) is
%% refused, always. (dspex_graph calls take no principal.)
-module(prop_principal).
-include_lib("eunit/include/eunit.hrl").

%% Debian's erlang-proper ships without proper.hrl: the macros are defined here.
-define(FORALL(X, Gen, Prop), proper:forall(Gen, fun(X) -> Prop end)).
-define(WHENFAIL(Action, Prop), proper:whenfail(fun() -> Action end, fun() -> Prop end)).

-export([prop_principal/0]).

numtests() ->
    case os:getenv("DSPEX_PROP_PRINCIPAL_N") of
        false -> 300;
        N -> list_to_integer(N)
    end.

principal_property_test_() ->
    {setup, fun() -> application:ensure_all_started(dspex_bridge) end, fun(_) -> ok end,
     {timeout, 300,
      fun() -> ?assert(proper:quickcheck(prop_principal(), [{numtests, numtests()}, {to_file, user}]) =:= true) end}}.

-define(OPS, [get, get_many, list, history, set, set_many, rollback, delete, watch, lock,
              check_access, filter_accessible, set_permissions]).

names() -> [<<"reader">>, <<"writer">>, <<"optimizer">>, <<"intruder">>, owner].

name() -> proper_types:elements(names()).

%% A principal term, mostly ones that look like a name.
principal() ->
    ?LET(N, name(),
         proper_types:oneof([{bin, N}, {chars, N}, {atom, N}, {iolist, N}, {wrapped, N}, {list_of_bin, N},
                             {other, proper_types:oneof([proper_types:integer(), proper_types:float(), undefined,
                                                         {}, #{}, ref, pid])}])).

context() ->
    proper_types:frequency([{6, none}, {3, {ok, #{}}},
                            {1, {bad, proper_types:elements([[], ok, 1, <<"ctx">>])}}]).

prop_principal() ->
    ?FORALL({Op, P, Ctx}, {proper_types:elements(?OPS), principal(), context()},
            try check(Op, P, Ctx)
            catch C:E:St ->
                    %% (this PropEr cannot report an exception itself)
                    io:format("~p ~p ~p: ~p:~p~n~p~n", [Op, P, Ctx, C, E, St]),
                    false
            end).

check(Op, P, Ctx) ->
            begin
                {SA, SB} = {session(), session()},
                Term = make(P, SA),
                Denoted = denote(P, SB),
                R = run(Op, SA, Term, Ctx),
                RD = case Denoted of
                         nobody -> refused;
                         D -> run(Op, SB, D, Ctx)
                     end,
                cleanup([SA, SB]),
                Strict = case {Term, Ctx} of
                             {_, {bad, _}} -> R =:= refused;
                             {T, _} when is_binary(T); T =:= undefined -> true;
                             _ -> R =:= refused
                         end,
                ?WHENFAIL(io:format("~p as ~p (ctx ~p): ~p; as ~p: ~p~n", [Op, Term, Ctx, R, Denoted, RD]),
                          rank(R) =< rank(RD) andalso Strict)
            end.

rank(allowed) -> 2;
rank(denied) -> 1;
rank(refused) -> 0.

%% The term given as principal (the owner is the session id itself).
make({bin, N}, S) -> text(N, S);
make({chars, N}, S) -> binary_to_list(text(N, S));
make({atom, N}, S) -> binary_to_atom(text(N, S));
make({iolist, N}, S) -> {A, B} = split_binary(text(N, S), 2), [A, binary_to_list(B)];
make({wrapped, N}, S) -> {text(N, S)};
make({list_of_bin, N}, S) -> [text(N, S)];
make({other, ref}, _) -> make_ref();
make({other, pid}, _) -> self();
make({other, T}, _) -> T.

%% The binary a term denotes, in the twin session.
denote({other, undefined}, S) -> S;
denote({other, _}, _) -> nobody;
denote({wrapped, _}, _) -> nobody;
denote({_, N}, S) -> text(N, S).

text(owner, S) -> S;
text(N, _) -> N.

session() ->
    S = iolist_to_binary(["pp_", integer_to_list(erlang:unique_integer([positive]))]),
    {ok, _} = dspex_store:create_session(S),
    {ok, _} = dspex_store:register(S, x, float, 0.5),
    {ok, 1} = dspex_store:set(S, x, 0.6),
    ok = dspex_acl:set_permissions(S, x, [#{session_pattern => <<"reader">>, permissions => [read]},
                                          #{session_pattern => <<"writer">>, permissions => [read, write]},
                                          #{session_pattern => <<"optimizer">>, permissions => [optimize, observe]}]),
    S.

cleanup(Ss) -> [dspex_store:delete_session(S) || S <- Ss].

opts(P, none) -> #{as => P};
opts(P, {_, C}) -> #{as => P, context => C}.

ctx(none) -> #{};
ctx({_, C}) -> C.

%% allowed | denied | refused
run(Op, S, P, Ctx) ->
    try classify(Op, call(Op, S, P, Ctx))
    catch
        error:badarg -> refused;
        error:function_clause -> refused % a type error caught by the API's guards
    end.

call(get, S, P, C) -> dspex_store:get(S, x, opts(P, C));
call(get_many, S, P, C) -> dspex_store:get_many(S, [x], opts(P, C));
call(list, S, P, C) -> dspex_store:list(S, all, opts(P, C));
call(history, S, P, C) -> dspex_store:history(S, x, all, opts(P, C));
call(set, S, P, C) -> dspex_store:set(S, x, 0.9, opts(P, C));
call(set_many, S, P, C) -> dspex_store:set_many(S, [{x, 0.9}], (opts(P, C))#{atomic => true});
call(rollback, S, P, C) -> dspex_store:rollback(S, x, 0, opts(P, C));
call(delete, S, P, C) -> dspex_store:delete(S, x, opts(P, C));
call(watch, S, P, C) ->
    case dspex_store:watch(S, [x], self(), opts(P, C)) of
        Ref when is_reference(Ref) -> dspex_store:unwatch(Ref), ok;
        Other -> Other
    end;
call(lock, S, P, C) ->
    case dspex_locks:acquire(S, x, prop, (opts(P, C))#{conflict => abort}) of
        {ok, L} -> ok = dspex_locks:release(L), ok;
        Other -> Other
    end;
call(check_access, S, P, C) -> dspex_acl:check_access(S, x, P, read, ctx_arg(C));
call(filter_accessible, S, P, C) -> dspex_acl:filter_accessible(S, P, read, ctx_arg(C));
call(set_permissions, S, P, C) -> dspex_acl:set_permissions(S, x, [], opts(P, C)).

%% check_access/filter_accessible take the context as an argument: a bad one
%% is passed through as is
ctx_arg(C) -> ctx(C).

classify(_, ok) -> allowed;
classify(get_many, {ok, #{found := F}}) -> case maps:is_key(x, F) of true -> allowed; false -> denied end;
classify(Op, {ok, L}) when Op =:= list; Op =:= filter_accessible ->
    case [V || V <- L, V =:= <<"x">> orelse (is_map(V) andalso maps:get(name, V, none) =:= <<"x">>)] of
        [] -> denied;
        _ -> allowed
    end;
classify(_, {ok, _}) -> allowed;
classify(_, {error, access_denied}) -> denied;
classify(set_many, {error, {batch_failed, #{x := access_denied}}}) -> denied;
classify(Op, Other) -> erlang:error({unexpected, Op, Other}).
