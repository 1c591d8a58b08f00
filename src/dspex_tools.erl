%% @doc Tools the BEAM application offers to Python: the Elixir side of the
%% `snakepit.bridge' tool bridge (`GetExposedElixirTools',
%% `ExecuteElixirTool'; Python `ctx.call_elixir_tool(name, **kwargs)').
%%
%% A tool is a fun of one argument (the arguments, a map of binary names to
%% JSON values: numbers, binaries, booleans, `null', lists, maps with binary
%% keys) or of two (the arguments and a call context `#{session, principal,
%% metadata}'). It returns `{ok, Result}', `{error, Reason}' or a bare
%% result; results must have a JSON form (as above, atoms other than `true',
%% `false' and `null' travel as strings).
%%
%% Every call runs in a process of its own, monitored and killed when its
%% deadline passes, so a tool that hangs or crashes harms nothing else.
%%
%% Access: option `allow' lists glob patterns (`*' any run, `?' one
%% character; see `glob/2'; at most 1024 bytes each) matched against the
%% caller's principal: the `dspex-principal'
%% request metadata, or the session id when there is none (as for
%% variables). Default `[<<"*">>]' (every principal). A tool a principal may
%% not call is also absent from the list it is shown.
%%
%% Python tools (the other direction of the bridge): a Python worker pool
%% (`dspex_workers') offers functions of its module as tools of a session
%% (`register_python/3', gRPC `RegisterTools' with the pool's name as
%% `worker_id'); `call_python/4' and `stream_python/5' (gRPC `ExecuteTool',
%% `ExecuteStreamingTool') run them as `Fn(**Args)' on a free worker of the
%% pool, through the pool's circuit breaker, within the caller's deadline. A
%% Python tool may be called by its own session, or by principals matching
%% its `allow' globs (default: none). Their errors: `{tool_not_found, Name}',
%% `access_denied', `{tool_error, <<"Type: message">>}' (the function raised)
%% and the pool's errors (`timeout', `circuit_open', `overloaded',
%% `{worker_exit, _}', `no_pool', ...; see `dspex_workers').
%%
%% Errors of `call/3': `{tool_not_found, Name}', `access_denied', `timeout',
%% `{invalid_argument, What}', `{tool_error, Reason}' (the tool returned
%% `{error, Reason}'), `{tool_crashed, Reason}' (it raised), `{bad_result,
%% Term}' (no JSON form).
-module(dspex_tools).

-export([new_table/0, expose/2, expose/3, unexpose/1, list/0, list/1, lookup/1, call/3, glob/2]).
-export([register_python/3, unregister_python/2, list_python/2, call_python/4, stream_python/5]).

-define(TAB, dspex_tools).
-define(DEFAULT_TIMEOUT, 30000).
%% a caller's `timeout' option (absent is `infinity')
-define(VALID_TIMEOUT(T), (T =:= infinity orelse (is_integer(T) andalso T >= 0))).

-type name() :: binary().
-type tool_fun() :: fun((map()) -> term()) | fun((map(), map()) -> term()).
-type param() :: #{name := binary(), type => binary(), description => binary(), required => boolean()}.
-type opts() :: #{description => binary(), parameters => [param()], allow => [binary()],
                  timeout => pos_integer(), metadata => #{binary() => binary()}}.
-type spec() :: #{name := name(), description := binary(), parameters := [param()],
                  metadata := #{binary() => binary()}}.
-export_type([name/0, tool_fun/0, opts/0, spec/0]).

%% @doc Creates the registry table, owned by the calling process (the top
%% supervisor calls it in `init/1', so tools outlive any child's crash);
%% `ok' if it exists already.
-spec new_table() -> ok.
new_table() ->
    case ets:whereis(?TAB) of
        undefined -> _ = ets:new(?TAB, [named_table, public, set, {read_concurrency, true}]), ok;
        _ -> ok
    end.

%% @equiv expose(Name, Fun, #{})
-spec expose(name() | atom(), tool_fun()) -> ok | {error, term()}.
expose(Name, Fun) -> expose(Name, Fun, #{}).

%% @doc Offers `Fun' to Python as tool `Name' (a non-empty binary or an atom;
%% exposing a name again replaces the tool). Options: `description',
%% `parameters' (shown to callers as the protocol's ParameterSpec: `name',
%% `type', `description', `required'), `allow' (principal patterns),
%% `timeout' (ms, when the caller sets no deadline; default 30000),
%% `metadata' (binary to binary).
-spec expose(name() | atom(), tool_fun(), opts()) -> ok | {error, {invalid_argument, atom()}}.
expose(Name0, Fun, Opts) ->
    case validate(Name0, Fun, Opts) of
        {ok, Name, Tool} -> true = ets:insert(table(), {Name, Tool}), ok;
        Error -> Error
    end.

%% @doc Withdraws a tool; `{error, {tool_not_found, Name}}' if there is none.
-spec unexpose(name() | atom()) -> ok | {error, {tool_not_found, name()}}.
unexpose(Name0) ->
    Name = to_name(Name0),
    case ets:take(table(), Name) of
        [_] -> ok;
        [] -> {error, {tool_not_found, Name}}
    end.

%% @doc Every exposed tool, sorted by name.
-spec list() -> [spec()].
list() -> [spec(T) || {_, T} <- lists:sort(ets:tab2list(table()))].

%% @doc The tools `Principal' may call, sorted by name.
-spec list(binary()) -> [spec()].
list(Principal) when is_binary(Principal) ->
    [spec(T) || {_, T} <- lists:sort(ets:tab2list(table())), allowed(T, Principal)].

%% @doc One tool's description.
-spec lookup(name() | atom()) -> {ok, spec()} | {error, {tool_not_found, name()}}.
lookup(Name0) ->
    Name = to_name(Name0),
    case ets:lookup(table(), Name) of
        [{_, T}] -> {ok, spec(T)};
        [] -> {error, {tool_not_found, Name}}
    end.

%% @doc Runs tool `Name' with `Args' (a map with binary keys). Options:
%% `principal' (who calls; checked against `allow'), `session',
%% `metadata', `timeout' (ms or `infinity' for the tool's own timeout; any
%% other value is `{error, {invalid_argument, timeout}}', and nothing runs).
%% The tool's process never outlives the call: it is killed at the
%% deadline, and also when the caller dies first (say a cancelled RPC).
-spec call(name() | atom(), map(), #{principal => binary(), session => binary(), metadata => map(),
                                     timeout => non_neg_integer() | infinity}) ->
          {ok, term()} | {error, term()}.
call(Name0, Args, Opts) when is_map(Args), is_map(Opts) ->
    Name = to_name(Name0),
    TimeoutOpt = maps:get(timeout, Opts, infinity),
    case ets:lookup(table(), Name) of
        [] -> {error, {tool_not_found, Name}};
        [_] when not ?VALID_TIMEOUT(TimeoutOpt) -> {error, {invalid_argument, timeout}};
        [{_, T}] ->
            Principal = maps:get(principal, Opts, maps:get(session, Opts, <<>>)),
            case allowed(T, Principal) of
                false -> {error, access_denied};
                true ->
                    Timeout = case TimeoutOpt of
                                  infinity -> maps:get(timeout, T);
                                  Ms -> Ms
                              end,
                    Ctx = #{session => maps:get(session, Opts, <<>>), principal => Principal,
                            metadata => maps:get(metadata, Opts, #{})},
                    run(maps:get(function, T), Args, Ctx, Timeout)
            end
    end;
call(_, _, _) -> {error, {invalid_argument, parameters}}.

%%% internals -----------------------------------------------------------------

table() ->
    case ets:whereis(?TAB) of
        undefined -> erlang:error(not_started);
        T -> T
    end.

%% The tool runs in its own process: a crash is reported, a deadline kills it.
run(Fun, Args, Ctx, Timeout) ->
    Caller = self(),
    Tag = make_ref(),
    {Pid, MRef} = spawn_monitor(fun() -> tool(Caller, Tag, Fun, Args, Ctx) end),
    %% however the wait ends (an answer, the deadline, an exception here),
    %% the tool process does not outlive it
    try await(Pid, MRef, Tag, Timeout)
    after
        exit(Pid, kill),
        erlang:demonitor(MRef, [flush])
    end.

await(Pid, MRef, Tag, Timeout) ->
    receive
        {Tag, {'$crashed', {_, Reason, _}}} -> {error, {tool_crashed, Reason}};
        {Tag, R} -> result(R);
        {'DOWN', MRef, process, Pid, Reason} -> {error, {tool_crashed, Reason}}
    after Timeout ->
            exit(Pid, kill),
            receive {Tag, _} -> ok after 0 -> ok end,
            {error, timeout}
    end.

tool(Caller, Tag, Fun, Args, Ctx) ->
    Self = self(),
    %% the caller cannot kill the tool once it is dead itself: a watcher
    %% does (monitoring a process already gone fires at once, so no window)
    _ = spawn(fun() -> reap_with(Caller, Self) end),
    R = try case erlang:fun_info(Fun, arity) of
                {arity, 1} -> Fun(Args);
                {arity, 2} -> Fun(Args, Ctx)
            end
        catch Class:Reason:Stack -> {'$crashed', {Class, Reason, Stack}}
        end,
    Caller ! {Tag, R}.

reap_with(Caller, Tool) ->
    MC = erlang:monitor(process, Caller),
    MT = erlang:monitor(process, Tool),
    receive
        {'DOWN', MC, process, _, _} -> exit(Tool, kill);
        {'DOWN', MT, process, _, _} -> ok
    end.

result({ok, V}) -> json_result(V);
result({error, Reason}) -> {error, {tool_error, Reason}};
result(V) -> json_result(V).

json_result(V) ->
    case json_form(V) of
        {ok, J} -> {ok, J};
        error -> {error, {bad_result, V}}
    end.

%% The JSON form of a result, or error: maps need binary or atom keys.
%% Integers go exact at any size up to 4300 digits (the port's limit, and
%% Python's default int parsing limit): a longer one has no JSON form a
%% client could read.
json_form(V) when is_integer(V), (V > 16#7FFFFFFFFFFFFFFF orelse V < -16#8000000000000000) ->
    case byte_size(integer_to_binary(abs(V))) =< 4300 of
        true -> {ok, V};
        false -> error
    end;
json_form(V) when is_binary(V); is_number(V); is_boolean(V); V =:= null -> {ok, V};
json_form(V) when is_atom(V) -> {ok, atom_to_binary(V, utf8)};
json_form(L) when is_list(L) ->
    Items = [json_form(X) || X <- L],
    case lists:member(error, Items) of
        true -> error;
        false -> {ok, [X || {ok, X} <- Items]}
    end;
json_form(M) when is_map(M) ->
    maps:fold(fun(_, _, error) -> error;
                 (K, V, {ok, Acc}) when is_binary(K); is_atom(K) ->
                      case json_form(V) of
                          {ok, J} -> {ok, Acc#{key(K) => J}};
                          error -> error
                      end;
                 (_, _, _) -> error
              end, {ok, #{}}, M);
json_form(_) -> error.

key(K) when is_atom(K) -> atom_to_binary(K, utf8);
key(K) -> K.

validate(Name0, Fun, Opts) when is_map(Opts) ->
    Name = to_name(Name0),
    Checks = [{name, is_binary(Name) andalso Name =/= <<>>},
              {function, is_function(Fun, 1) orelse is_function(Fun, 2)},
              {description, is_binary(maps:get(description, Opts, <<>>))},
              {parameters, valid_params(maps:get(parameters, Opts, []))},
              {allow, valid_allow(maps:get(allow, Opts, [<<"*">>]))},
              {timeout, valid_timeout(maps:get(timeout, Opts, ?DEFAULT_TIMEOUT))},
              {metadata, valid_meta(maps:get(metadata, Opts, #{}))}],
    case [W || {W, false} <- Checks] ++ [K || K <- maps:keys(Opts), not lists:member(K, known())] of
        [] -> {ok, Name, #{name => Name, function => Fun,
                           description => maps:get(description, Opts, <<>>),
                           parameters => [param(P) || P <- maps:get(parameters, Opts, [])],
                           allow => maps:get(allow, Opts, [<<"*">>]),
                           timeout => maps:get(timeout, Opts, ?DEFAULT_TIMEOUT),
                           metadata => maps:get(metadata, Opts, #{})}};
        [What | _] when is_atom(What) -> {error, {invalid_argument, What}};
        [_ | _] -> {error, {invalid_argument, options}}
    end;
validate(_, _, _) -> {error, {invalid_argument, options}}.

known() -> [description, parameters, allow, timeout, metadata].

to_name(A) when is_atom(A) -> atom_to_binary(A, utf8);
to_name(B) -> B.

valid_params(L) when is_list(L) ->
    lists:all(fun(#{name := N} = P) when is_binary(N), N =/= <<>> ->
                      is_binary(maps:get(type, P, <<>>)) andalso is_binary(maps:get(description, P, <<>>))
                          andalso is_boolean(maps:get(required, P, false));
                 (_) -> false
              end, L);
valid_params(_) -> false.

param(P) ->
    #{name => maps:get(name, P), type => maps:get(type, P, <<>>),
      description => maps:get(description, P, <<>>), required => maps:get(required, P, false)}.

%% the bound of c_src/core/glob.c: matching costs pattern length times
%% principal length, and patterns may come from clients (RegisterTools)
valid_allow(L) when is_list(L) ->
    lists:all(fun(P) -> is_binary(P) andalso P =/= <<>> andalso byte_size(P) =< 1024 end, L);
valid_allow(_) -> false.

valid_timeout(T) -> is_integer(T) andalso T > 0.

valid_meta(M) when is_map(M) -> lists:all(fun({K, V}) -> is_binary(K) andalso is_binary(V) end, maps:to_list(M));
valid_meta(_) -> false.

spec(#{name := N, description := D, parameters := P, metadata := M}) ->
    #{name => N, description => D, parameters => P, metadata => M}.

allowed(#{allow := Patterns}, Principal) ->
    lists:any(fun(P) -> glob(P, Principal) end, Patterns).

%% @doc Whether `Subject' matches the glob `Pattern': `*' matches any run
%% of characters (also empty), `?' exactly one character, anything else
%% itself. Characters are UTF-8 code points; a byte that is not part of
%% valid UTF-8 is one character of its own (never equal to a code point), as
%% in `c_src/core/glob.c'. Time is at most proportional to the pattern's
%% length times the subject's, whatever the stars.
-spec glob(binary(), binary()) -> boolean().
glob(Pattern, Subject) when is_binary(Pattern), is_binary(Subject) ->
    match(pattern(Pattern), chars(Subject), none).

%% Greedy, with one backtrack point: the last star seen. When a later star
%% matched, every choice made for the earlier ones is final (anything they
%% could still absorb, the later star absorbs too), so one point suffices and
%% nothing is retried exponentially.
match([star], _, _) -> true;
match([star | P], S, _) -> match(P, S, {P, S});
match([any | P], [_ | S], Back) -> match(P, S, Back);
match([C | P], [C | S], Back) -> match(P, S, Back);
match([], [], _) -> true;
match(_, _, {P, [_ | S]}) -> match(P, S, {P, S});
match(_, _, _) -> false.

pattern(<<"*", Rest/binary>>) ->
    case pattern(Rest) of
        [star | _] = P -> P;    % a run of stars is one star
        P -> [star | P]
    end;
pattern(<<"?", Rest/binary>>) -> [any | pattern(Rest)];
pattern(B) ->
    case B of
        <<>> -> [];
        <<C/utf8, Rest/binary>> -> [C | pattern(Rest)];
        <<Byte, Rest/binary>> -> [{byte, Byte} | pattern(Rest)]
    end.

chars(<<C/utf8, Rest/binary>>) -> [C | chars(Rest)];
chars(<<Byte, Rest/binary>>) -> [{byte, Byte} | chars(Rest)];
chars(<<>>) -> [].

%%% Python tools ----------------------------------------------------------------

%% @doc Offers functions of pool `Pool''s module as tools of `Session'
%% (registering a name again replaces it). Each spec: `name' (the function),
%% `description', `parameters', `supports_streaming' (default false), `allow'
%% (principal globs besides the session itself, default `[]'),
%% `metadata'. Returns each tool's id (`<<"Session/Name">>').
-spec register_python(binary(), atom(), [map()]) -> {ok, #{name() => binary()}} | {error, term()}.
register_python(Session, Pool, Specs) when is_binary(Session), Session =/= <<>>, is_atom(Pool), is_list(Specs) ->
    %% only a running worker pool (not merely some process of that name)
    case dspex_workers:status(Pool) of
        {ok, _} ->
            case lists:foldr(fun(Spec, {ok, Acc}) ->
                                     case py_tool(Session, Pool, Spec) of
                                         {ok, T} -> {ok, [T | Acc]};
                                         E -> E
                                     end;
                                (_, E) -> E
                             end, {ok, []}, Specs) of
                {ok, Tools} ->
                    true = ets:insert(table(), [{{py, Session, N}, T} || #{name := N} = T <- Tools]),
                    {ok, maps:from_list([{N, <<Session/binary, "/", N/binary>>} || #{name := N} <- Tools])};
                E -> E
            end;
        _ -> {error, {unknown_pool, Pool}}
    end;
register_python(_, _, _) -> {error, {invalid_argument, tools}}.

py_tool(Session, Pool, Spec) when is_map(Spec) ->
    Name = to_name(maps:get(name, Spec, <<>>)),
    Checks = [{name, is_binary(Name) andalso Name =/= <<>>},
              {description, is_binary(maps:get(description, Spec, <<>>))},
              {parameters, valid_params(maps:get(parameters, Spec, []))},
              {supports_streaming, is_boolean(maps:get(supports_streaming, Spec, false))},
              {allow, valid_allow(maps:get(allow, Spec, []))},
              {metadata, valid_meta(maps:get(metadata, Spec, #{}))}],
    case [W || {W, false} <- Checks] of
        [] -> {ok, #{name => Name, session => Session, pool => Pool,
                     description => maps:get(description, Spec, <<>>),
                     parameters => [param(P) || P <- maps:get(parameters, Spec, [])],
                     supports_streaming => maps:get(supports_streaming, Spec, false),
                     allow => maps:get(allow, Spec, []), metadata => maps:get(metadata, Spec, #{})}};
        [What | _] -> {error, {invalid_argument, What}}
    end;
py_tool(_, _, _) -> {error, {invalid_argument, tools}}.

%% @doc Withdraws a Python tool of `Session'.
-spec unregister_python(binary(), name() | atom()) -> ok | {error, {tool_not_found, name()}}.
unregister_python(Session, Name0) ->
    Name = to_name(Name0),
    case ets:take(table(), {py, Session, Name}) of
        [_] -> ok;
        [] -> {error, {tool_not_found, Name}}
    end.

%% @doc The Python tools of `Session' that `Principal' may call, by name
%% (each a spec as `list/0' gives, plus `pool' and `supports_streaming').
-spec list_python(binary(), binary()) -> [map()].
list_python(Session, Principal) ->
    Tools = ets:select(table(), [{{{py, Session, '_'}, '$1'}, [], ['$1']}]),
    lists:sort(fun(#{name := A}, #{name := B}) -> A =< B end,
               [maps:with([name, description, parameters, metadata, pool, supports_streaming], T)
                || T <- Tools, py_allowed(T, Principal)]).

%% @doc Runs Python tool `Name' of `Session' with keyword arguments `Args'
%% (binary keys, JSON values). Options: `principal' (default the session),
%% `timeout' (ms; default 30000; any other value than a non-negative integer
%% or `infinity' is `{error, {invalid_argument, timeout}}').
-spec call_python(binary(), name() | atom(), map(), map()) -> {ok, term()} | {error, term()}.
call_python(Session, Name, Args, Opts) ->
    with_py_tool(Session, Name, Opts, fun(#{pool := Pool}, Timeout) ->
        py_result(dspex_workers:call(Pool, {to_name(Name), [], Args}, Timeout))
    end).

%% @doc Runs Python tool `Name' of `Session' streamed: each item the
%% function yields goes to `Sink = {Pid, Tag}' as `{Tag, {chunk, Json}}';
%% returns `{ok, #{<<"chunks">> => N}}' or an error once the stream ended.
-spec stream_python(binary(), name() | atom(), map(), {pid(), term()}, map()) -> {ok, term()} | {error, term()}.
stream_python(Session, Name, Args, Sink, Opts) ->
    with_py_tool(Session, Name, Opts, fun(#{pool := Pool}, Timeout) ->
        py_result(dspex_workers:stream(Pool, {to_name(Name), [], Args}, Timeout, Sink))
    end).

with_py_tool(Session, Name0, Opts, Run) when is_binary(Session) ->
    Name = to_name(Name0),
    case ets:lookup(table(), {py, Session, Name}) of
        [] -> {error, {tool_not_found, Name}};
        [{_, T}] ->
            case py_allowed(T, maps:get(principal, Opts, Session)) of
                false -> {error, access_denied};
                true ->
                    case maps:get(timeout, Opts, infinity) of
                        infinity -> Run(T, ?DEFAULT_TIMEOUT);
                        Ms when ?VALID_TIMEOUT(Ms) -> Run(T, Ms);
                        _ -> {error, {invalid_argument, timeout}}
                    end
            end
    end.

py_allowed(#{session := S}, S) -> true;
py_allowed(#{allow := Patterns}, Principal) -> lists:any(fun(P) -> glob(P, Principal) end, Patterns).

py_result({error, {python, Type, Msg}}) -> {error, {tool_error, <<Type/binary, ": ", Msg/binary>>}};
py_result(R) -> R.
