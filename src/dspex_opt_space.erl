%% @doc Search spaces of `dspex_opt' runs, built from a session's variables.
%%
%% Supported variables: `float' and `integer' with both `min' and `max'
%% constraints (log scale when the variable's metadata has `scale => log', then
%% `min' must be positive), `choice' (its `choices') and `boolean'. Any other
%% type is refused with `{error, {unsupported_type, Name, Type}}'; a float or
%% integer without both bounds with `{error, {unbounded, Name}}'; log scale with
%% `min =< 0' with `{error, {invalid_log_scale, Name}}'.
%%
%% The optimizer kernels work in a normalised space: a numeric dimension is the
%% unit interval, a categorical one (`choice', `boolean') the index of a
%% category. `decode/2' maps such a point to parameter values, which always
%% satisfy the variables' constraints (integers rounded and clamped into
%% `[min, max]'), `encode/2' maps values back (what the kernels learn from).
%% A dimension with a single possible value (`min =:= max', one choice) is
%% fixed: it is not searched.
-module(dspex_opt_space).

-export([from_variables/2, dims/1, decode/2, encode/2, names/1, kind/1, check_point/2]).
-export_type([space/0, dim/0, point/0]).

-type dim() :: #{name := binary(), type := float | integer | choice | boolean,
                 min => number(), max => number(), scale => linear | log, choices => [term()],
                 fixed => term()}.
-type space() :: [dim()].
%% a point of the normalised space: one number per free dimension
-type point() :: [number()].

%% @doc The space of variables `Vars' (names or ids) of `Session', in order.
-spec from_variables(dspex_store:session_id(), [dspex_store:var_key()]) -> {ok, space()} | {error, term()}.
from_variables(_Session, []) ->
    {error, {invalid_argument, variables}};
from_variables(Session, Vars) when is_list(Vars) ->
    build(Session, Vars, [], #{});
from_variables(_Session, _) ->
    {error, {invalid_argument, variables}}.

build(_S, [], Acc, _Seen) ->
    Space = lists:reverse(Acc),
    case [D || D <- Space, not maps:is_key(fixed, D)] of
        [] -> {error, {invalid_argument, no_free_variable}};
        _ -> {ok, Space}
    end;
build(S, [V | Vs], Acc, Seen) ->
    case dspex_store:get(S, V) of
        {ok, #{name := Name}} when is_map_key(Name, Seen) -> {error, {duplicate_variable, Name}};
        {ok, #{name := Name, type := Type, constraints := C, metadata := M}} ->
            case dim(Name, Type, C, M) of
                {ok, D} -> build(S, Vs, [D | Acc], Seen#{Name => true});
                Error -> Error
            end;
        {error, _} = E -> E
    end.

dim(Name, Type, C, M) when Type =:= float; Type =:= integer ->
    Scale = case maps:get(scale, M, maps:get(<<"scale">>, M, linear)) of
                log -> log;
                <<"log">> -> log;
                _ -> linear
            end,
    case C of
        #{min := Min, max := Max} when is_number(Min), is_number(Max), Min =< Max ->
            if Scale =:= log, Min =< 0 -> {error, {invalid_log_scale, Name}};
               Type =:= integer, ceil(Min) > floor(Max) -> {error, {unbounded, Name}};
               true ->
                   {Lo, Hi} = case Type of
                                  integer -> {ceil(Min), floor(Max)};
                                  float -> {float(Min), float(Max)}
                              end,
                   D = #{name => Name, type => Type, min => Lo, max => Hi, scale => Scale},
                   {ok, case Lo == Hi of true -> D#{fixed => Lo}; false -> D end}
            end;
        _ -> {error, {unbounded, Name}}
    end;
dim(Name, choice, #{choices := [One]}, _M) ->
    {ok, #{name => Name, type => choice, choices => [One], fixed => One}};
dim(Name, choice, #{choices := Cs}, _M) when is_list(Cs), length(Cs) >= 2 ->
    {ok, #{name => Name, type => choice, choices => Cs}};
dim(Name, boolean, _C, _M) ->
    {ok, #{name => Name, type => boolean, choices => [false, true]}};
dim(Name, Type, _C, _M) ->
    {error, {unsupported_type, Name, Type}}.

%% @doc The dimensions for the kernels: `0' numeric, `N' categorical with N
%% categories (free dimensions only).
-spec dims(space()) -> [non_neg_integer()].
dims(Space) -> [ncat(D) || D <- Space, not maps:is_key(fixed, D)].

ncat(#{choices := Cs}) -> length(Cs);
ncat(_) -> 0.

%% @doc The variable names, in order.
-spec names(space()) -> [binary()].
names(Space) -> [N || #{name := N} <- Space].

%% @doc `continuous' (every free dimension a float), `discrete' (integers and
%% categories only) or `mixed'.
-spec kind(space()) -> continuous | discrete | mixed.
kind(Space) ->
    Free = [D || D <- Space, not maps:is_key(fixed, D)],
    case {lists:all(fun(#{type := T}) -> T =:= float end, Free),
          lists:any(fun(#{type := T}) -> T =:= float end, Free)} of
        {true, _} -> continuous;
        {false, false} -> discrete;
        {false, true} -> mixed
    end.

%% @doc True when `Point' is a valid normalised point of the space.
-spec check_point(space(), term()) -> boolean().
check_point(Space, Point) when is_list(Point) ->
    Dims = dims(Space),
    length(Point) =:= length(Dims) andalso
        lists:all(fun({0, V}) -> is_number(V) andalso V >= 0 andalso V =< 1;
                     ({K, V}) -> is_integer(V) andalso V >= 0 andalso V < K
                                     orelse is_float(V) andalso V >= 0 andalso V < K andalso V == trunc(V)
                  end, lists:zip(Dims, Point));
check_point(_, _) -> false.

%% @doc Parameter values (`#{Name => Value}') of a normalised point.
-spec decode(space(), point()) -> #{binary() => term()}.
decode(Space, Point) -> decode(Space, Point, #{}).

decode([], _, Acc) -> Acc;
decode([#{name := N, fixed := V} | Ds], P, Acc) -> decode(Ds, P, Acc#{N => V});
decode([#{name := N, choices := Cs} | Ds], [I | P], Acc) ->
    decode(Ds, P, Acc#{N => lists:nth(clamp(round(I), 0, length(Cs) - 1) + 1, Cs)});
decode([#{name := N, type := T, min := Lo, max := Hi, scale := Sc} | Ds], [U0 | P], Acc) ->
    U = clamp(float(U0), 0.0, 1.0),
    X = case Sc of
            _ when U =:= 0.0 -> Lo;
            _ when U =:= 1.0 -> Hi;
            linear when Hi / 2 - Lo / 2 < 8.0e307 -> Lo + U * (Hi - Lo);
            %% Hi - Lo would overflow (bounds near the float range's ends): a convex combination
            linear -> Lo * (1.0 - U) + Hi * U;
            log -> math:exp(math:log(Lo) + U * (math:log(Hi) - math:log(Lo)))
        end,
    V = case T of
            integer -> clamp(round(X), Lo, Hi);
            float -> clamp(X, Lo, Hi)
        end,
    decode(Ds, P, Acc#{N => V}).

%% @doc The normalised point of parameter values (the inverse of `decode/2'
%% on the values it produces).
-spec encode(space(), #{binary() => term()}) -> point().
encode(Space, Params) ->
    [enc(D, maps:get(N, Params)) || #{name := N} = D <- Space, not maps:is_key(fixed, D)].

enc(#{choices := Cs}, V) -> index(V, Cs, 0);
%% halves: V - Lo and Hi - Lo overflow for bounds near the float range's ends
enc(#{min := Lo, max := Hi, scale := linear}, V) -> clamp((V / 2 - Lo / 2) / (Hi / 2 - Lo / 2), 0.0, 1.0);
enc(#{min := Lo, max := Hi, scale := log}, V) ->
    clamp((math:log(V) - math:log(Lo)) / (math:log(Hi) - math:log(Lo)), 0.0, 1.0).

index(V, [C | _], I) when C =:= V -> I;
index(V, [_ | Cs], I) -> index(V, Cs, I + 1).

clamp(V, Lo, _Hi) when V < Lo -> Lo;
clamp(V, _Lo, Hi) when V > Hi -> Hi;
clamp(V, _, _) -> V.
