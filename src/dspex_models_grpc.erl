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

%% @doc `RecordInference': `{reply, #{}}' or `{error, {invalid_argument, F}}'.
-spec record_inference(map()) -> {reply, map()} | {error, term()}.
record_inference(#{model_id := Id, latency_ms := L, success := S} = Req)
  when is_binary(Id), Id =/= <<>>, is_number(L), L > 0, is_boolean(S) ->
    Meta0 = maps:fold(fun(K, V, Acc) when is_number(V) ->
                              Key = try binary_to_existing_atom(K, utf8) catch error:badarg -> K end,
                              Acc#{Key => V};
                         (_, _, Acc) -> Acc
                      end, #{}, maps:get(custom, Req, #{})),
    Meta = case maps:get(experiment, Req, <<>>) of
               <<>> -> Meta0;
               E -> Meta0#{experiment => E}
           end,
    case lists:all(fun(V) -> V >= -1000 andalso V =< 1000 end, maps:values(Meta0)) of
        true ->
            ok = dspex_models:record_inference(Id, L, S, Meta),
            {reply, #{}};
        false -> {error, {invalid_argument, custom}}
    end;
record_inference(#{model_id := Id}) when not is_binary(Id); Id =:= <<>> -> {error, {invalid_argument, model_id}};
record_inference(_) -> {error, {invalid_argument, latency_ms}}.
