%% @doc etcd ownership backend: owners hold a lease in an etcd cluster (3.4,
%% its v3 JSON gateway, over OTP `httpc').
%%
%% This process grants the node's lease (`ttl' seconds, default 2) and keeps it
%% alive every third of the TTL. A node may own sessions while its lease is
%% known to be alive (the last keepalive answered less than TTL minus a margin
%% ago): that is the quorum of this backend. Owning a session is the key
%% `Prefix ++ "owner/" ++ Session' attached to the lease, taken with a
%% transaction that compares its `create_revision' with 0 (nobody holds it) or,
%% when this node holds it already, its `mod_revision' (nobody changed it);
%% the revision of that transaction is the epoch, so epochs grow with etcd's
%% revision counter across every node. When the owner dies its lease expires
%% after the TTL and the key disappears: that bounds failover. When a lease is
%% lost (keepalives failed past the TTL) a new one is granted and the view
%% generation is bumped so that every session is claimed again.
-module(dspex_owner_etcd).
-behaviour(dspex_cluster_owner).
-behaviour(gen_server).

-export([child_specs/1, quorum/1, claim/3, release/1, start_link/1, lease/0, request/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(LEASE, {?MODULE, lease}).
-define(HTTP_TIMEOUT, 1000).
-define(MARGIN_MS, 300).

%% @doc The lease keeper.
-spec child_specs(map()) -> [supervisor:child_spec()].
child_specs(Config) -> [#{id => ?MODULE, start => {?MODULE, start_link, [maps:get(etcd, Config, #{})]}}].

%% @doc Starts the lease keeper; it grants the lease before returning.
-spec start_link(map()) -> {ok, pid()} | {error, term()}.
start_link(Conf) -> gen_server:start_link({local, ?MODULE}, ?MODULE, Conf, []).

%% @doc `{LeaseId, Endpoint, Prefix}', or `undefined' while no live lease is known.
-spec lease() -> {integer(), string(), binary()} | undefined.
lease() ->
    case persistent_term:get(?LEASE, undefined) of
        {Id, Until, Ep, Prefix} ->
            case erlang:monotonic_time(millisecond) < atomics:get(Until, 1) of
                true -> {Id, Ep, Prefix};
                false -> undefined
            end;
        undefined -> undefined
    end.

%% @doc The node's lease is alive.
-spec quorum(dspex_cluster_members:view()) -> boolean().
quorum(_View) -> lease() =/= undefined.

%% @doc Takes (or renews) the session's owner key; the epoch is the revision
%% of the transaction. `{error, {held_by, Node}}' while another node holds it.
-spec claim(binary(), pos_integer(), dspex_cluster_members:view()) -> {ok, pos_integer()} | {error, term()}.
claim(S, Proposed, _View) ->
    case lease() of
        undefined -> {error, no_quorum};
        {Lease, Ep, Prefix} ->
            Key = base64:encode(<<Prefix/binary, "owner/", S/binary>>),
            Me = base64:encode(atom_to_binary(node())),
            Put = #{request_put => #{key => Key, value => Me, lease => integer_to_binary(Lease)}},
            Txn = #{compare => [#{key => Key, target => 'CREATE', create_revision => <<"0">>}],
                    success => [Put], failure => [#{request_range => #{key => Key}}]},
            case request(Ep, {"/v3/kv/txn", Txn}) of
                {ok, #{<<"succeeded">> := true} = R} -> epoch(R, Proposed);
                {ok, #{<<"responses">> := [#{<<"response_range">> := #{<<"kvs">> := [KV]}}]}} ->
                    case KV of
                        #{<<"value">> := Me, <<"mod_revision">> := Mod} ->
                            Again = #{compare => [#{key => Key, target => 'MOD', mod_revision => Mod}],
                                      success => [Put], failure => []},
                            case request(Ep, {"/v3/kv/txn", Again}) of
                                {ok, #{<<"succeeded">> := true} = R2} -> epoch(R2, Proposed);
                                {ok, _} -> {error, {retry, contended}};
                                {error, _} -> {error, no_quorum}
                            end;
                        #{<<"value">> := Other} -> {error, {held_by, holder(Other)}}
                    end;
                {ok, _} -> {error, {retry, contended}};
                {error, _} -> {error, no_quorum}
            end
    end.

%% The node named in a key (a node of this cluster, so its atom exists).
holder(B64) ->
    try binary_to_existing_atom(base64:decode(B64))
    catch error:_ -> unknown
    end.

epoch(#{<<"header">> := #{<<"revision">> := Rev}}, Proposed) ->
    case binary_to_integer(Rev) of
        E when E >= Proposed -> {ok, E};
        E -> {error, {stale_revision, E, Proposed}}
    end.

%% @doc Deletes the session's owner key if this node holds it.
-spec release(binary()) -> ok.
release(S) ->
    case lease() of
        undefined -> ok;
        {_, Ep, Prefix} ->
            Key = base64:encode(<<Prefix/binary, "owner/", S/binary>>),
            Me = base64:encode(atom_to_binary(node())),
            Txn = #{compare => [#{key => Key, target => 'VALUE', value => Me}],
                    success => [#{request_delete_range => #{key => Key}}], failure => []},
            _ = request(Ep, {"/v3/kv/txn", Txn}),
            ok
    end.

%% @doc One POST to the gateway; the decoded JSON answer.
-spec request(string(), {string(), map()}) -> {ok, map()} | {error, term()}.
request(Ep, {Path, Body}) ->
    {ok, Json} = dspex_json:encode(Body),
    Req = {Ep ++ Path, [], "application/json", Json},
    case httpc:request(post, Req, [{timeout, ?HTTP_TIMEOUT}, {connect_timeout, ?HTTP_TIMEOUT}],
                       [{body_format, binary}], dspex_etcd) of
        {ok, {{_, 200, _}, _, Resp}} -> dspex_json:decode(Resp);
        {ok, {{_, Code, _}, _, Resp}} -> {error, {http, Code, Resp}};
        {error, _} = E -> E
    end.

%%% lease keeper ------------------------------------------------------------------

-spec init(map()) -> {ok, map()} | {stop, term()}.
init(Conf) ->
    {ok, _} = application:ensure_all_started(inets),
    _ = inets:start(httpc, [{profile, dspex_etcd}]),
    St = #{ep => maps:get(endpoint, Conf, "http://127.0.0.1:2379"), ttl => maps:get(ttl, Conf, 2),
           prefix => iolist_to_binary(maps:get(prefix, Conf, <<"/dspex/">>)), id => undefined},
    self() ! keepalive,
    case grant(St) of
        {ok, St1} -> {ok, St1};
        {error, Why} -> {stop, {etcd_unavailable, Why}}
    end.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(_, _From, St) -> {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_, St) -> {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info(keepalive, #{ttl := Ttl} = St) ->
    erlang:send_after(Ttl * 1000 div 3, self(), keepalive),
    {noreply, keepalive(St)};
handle_info(_, St) -> {noreply, St}.

grant(#{ep := Ep, ttl := Ttl} = St) ->
    Sent = erlang:monotonic_time(millisecond),
    case request(Ep, {"/v3/lease/grant", #{'TTL' => Ttl}}) of
        {ok, #{<<"ID">> := Id}} ->
            St1 = St#{id := binary_to_integer(Id)},
            publish(St1, Sent),
            {ok, St1};
        {ok, Other} -> {error, Other};
        {error, _} = E -> E
    end.

keepalive(#{ep := Ep, id := Id} = St) ->
    Sent = erlang:monotonic_time(millisecond),
    case request(Ep, {"/v3/lease/keepalive", #{'ID' => integer_to_binary(Id)}}) of
        {ok, #{<<"result">> := #{<<"TTL">> := _}}} ->
            publish(St, Sent),
            St;
        _ ->
            case lease() of
                undefined ->
                    %% the lease is gone: a new one, and every session is claimed anew
                    logger:warning("dspex_owner_etcd: lease ~p lost, granting a new one", [Id]),
                    case grant(St) of
                        {ok, St1} ->
                            dspex_telemetry:execute([dspex, cluster, lease, lost], #{count => 1}, #{lease => Id}),
                            catch dspex_cluster_members:bump(),
                            St1;
                        {error, _} -> St
                    end;
                _ -> St   % still valid: try again at the next tick
            end
    end.

%% The validity is an atomic (renewed every keepalive); persistent_term
%% changes only with the lease id.
publish(#{id := Id, ttl := Ttl, ep := Ep, prefix := P}, Sent) ->
    Until = case persistent_term:get(?LEASE, undefined) of
                {Id, A, _, _} -> A;
                _ ->
                    A = atomics:new(1, [{signed, true}]),
                    persistent_term:put(?LEASE, {Id, A, Ep, P}),
                    A
            end,
    atomics:put(Until, 1, Sent + Ttl * 1000 - ?MARGIN_MS).
