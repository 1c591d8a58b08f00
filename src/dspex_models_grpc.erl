%% @doc The gRPC side of `dspex_models' (RPCs `SelectModel' and
%% `RecordInference', called from `dspex_grpc_handler'): request maps as the
%% port program shapes them, replies as maps.
%%
%% A gRPC unit is a string: `SelectModel' selects with
%% `#{UnitKey => Unit}' where `Unit' is a binary and `UnitKey' the atom
%% named by `unit_key' (default `user_id'; a key that is no existing atom is
%% used as a binary). Erlang callers that must agree with Python clients on
%% a unit's model pass the unit as the same binary.
-module(dspex_models_grpc).

-export([select_model/1, record_inference/1]).

%% @doc `SelectModel': `{reply, #{model_id}}' or `{error, Reason}'.
-spec select_model(map()) -> {reply, map()} | {error, term()}.
select_model(#{name := <<>>}) -> {error, {invalid_argument, name}};
select_model(#{name := Name} = Req) ->
    Key = case maps:get(unit_key, Req, <<>>) of
              <<>> -> user_id;
              K -> try binary_to_existing_atom(K, utf8) catch error:badarg -> K end
          end,
    Ctx = case maps:get(unit, Req, <<>>) of
              <<>> -> #{};
              U -> #{Key => U}
          end,
    case dspex_models:select_model(Name, Ctx) of
        {ok, Id} -> {reply, #{model_id => Id}};
        {error, _} = E -> E
    end;
select_model(_) -> {error, {invalid_argument, name}}.

%% @doc `RecordInference': `{reply, #{}}' or `{error, {invalid_argument, F}}'
%% with `F' the first bad field of `model_id', `latency_ms', `success',
%% `custom'. The `experiment' field alone restricts the inference to a test:
%% a `custom' entry named `experiment' is ignored (no test's metric can have
%% that name). `custom' values are checked as `dspex_models:record_inference/4'
%% checks them: only a value a running test would record must be within
%% [-1000, 1000]; other entries are not looked at.
-spec record_inference(map()) -> {reply, map()} | {error, term()}.
record_inference(Req) when is_map(Req) ->
    Id = maps:get(model_id, Req, undefined),
    L = maps:get(latency_ms, Req, undefined),
    S = maps:get(success, Req, undefined),
    Custom = maps:get(custom, Req, #{}),
    if
        not is_binary(Id); Id =:= <<>> -> {error, {invalid_argument, model_id}};
        not is_number(L) -> {error, {invalid_argument, latency_ms}};
        L =< 0 -> {error, {invalid_argument, latency_ms}};
        not is_boolean(S) -> {error, {invalid_argument, success}};
        not is_map(Custom) -> {error, {invalid_argument, custom}};
        true ->
            Meta0 = maps:fold(fun(K, V, Acc) when is_number(V) ->
                                      case custom_key(K) of
                                          experiment -> Acc;
                                          Key -> Acc#{Key => V}
                                      end;
                                 (_, _, Acc) -> Acc
                              end, #{}, Custom),
            Meta = case maps:get(experiment, Req, <<>>) of
                       <<>> -> Meta0;
                       E -> Meta0#{experiment => E}
                   end,
            %% with the other fields checked, badarg is a custom value out of range
            try dspex_models:record_inference(Id, L, S, Meta) of
                ok -> {reply, #{}}
            catch error:badarg -> {error, {invalid_argument, custom}}
            end
    end;
record_inference(_) -> {error, {invalid_argument, model_id}}.

custom_key(K) when is_binary(K) ->
    try binary_to_existing_atom(K, utf8) catch error:badarg -> K end;
custom_key(K) -> K.
