%% @doc The gRPC side of `dspex_opt' (RPCs `StartStudy', `AskTrial',
%% `TellTrial', `GetStudy', `StopStudy', called from `dspex_grpc_handler'):
%% request maps as the port program shapes them, replies as maps.
%%
%% A study is a `dspex_opt' run started with `owner => none' (a gRPC client
%% is no process) and an idle timeout (`idle_timeout_ms', default 10
%% minutes): it holds its variables' optimizer locks until `StopStudy' or
%% until no RPC reached it for that long. It is named by its run id
%% (`dspex_opt:info/1''s `id', unguessable); only the session that started
%% it, acting as the same principal (`dspex-principal'), may use it: to
%% anyone else it does not exist (`{error, run_not_found}', NOT_FOUND).
%% Parameters travel as a JSON object (`params_json').
-module(dspex_opt_grpc).

-export([start_study/2, ask_trial/2, tell_trial/2, get_study/2, stop_study/2]).

-define(IDLE_MS, 600000).

%% @doc `StartStudy': `{reply, #{study_id, space}}' or `{error, Reason}'
%% (those of `dspex_opt:start/3').
-spec start_study(map(), map()) -> {reply, map()} | {error, term()}.
start_study(#{session_id := S, variables := Vars, algorithm := A, direction := D, budget := B, seed := Seed,
              idle_timeout_ms := Idle, lock_timeout_ms := LockT}, Opts) ->
    case {algorithm(A), direction(D)} of
        {{ok, Alg}, {ok, Dir}} when B >= 0, Idle >= 0, LockT >= 0 ->
            StartOpts = maps:merge(maps:with([as, context], Opts),
                                   #{algorithm => Alg, direction => Dir, seed => Seed,
                                     budget => case B of 0 -> 100; _ -> B end,
                                     owner => none, idle_timeout => case Idle of 0 -> ?IDLE_MS; _ -> Idle end,
                                     lock => #{conflict => wait, timeout => case LockT of 0 -> 5000; _ -> LockT end}}),
            case dspex_opt:start(S, Vars, StartOpts) of
                {ok, Run} ->
                    case dspex_opt:info(Run) of
                        {ok, #{id := Id, space := Space}} ->
                            {reply, #{study_id => Id, space => atom_to_binary(Space)}};
                        {error, _} = E -> E     % ended already (a lock preempted)
                    end;
                {error, _} = E -> E
            end;
        {{error, _} = E, _} -> E;
        {_, {error, _} = E} -> E;
        _ when B < 0 -> {error, {invalid_argument, budget}};
        _ when Idle < 0 -> {error, {invalid_argument, idle_timeout_ms}};
        _ -> {error, {invalid_argument, lock_timeout_ms}}
    end.

%% @doc `AskTrial': `{reply, #{trial_id, params_json}}'; `{error,
%% budget_exhausted}' after `budget' asks.
-spec ask_trial(map(), map()) -> {reply, map()} | {error, term()}.
ask_trial(Req, Opts) ->
    with_run(Req, Opts, fun(Run, _) ->
                                case dspex_opt:ask(Run) of
                                    {ok, Id, Params} -> {reply, #{trial_id => Id, params_json => Params}};
                                    {error, _} = E -> E
                                end
                        end).

%% @doc `TellTrial': a score, or `failed' with a reason.
-spec tell_trial(map(), map()) -> {reply, map()} | {error, term()}.
tell_trial(#{trial_id := T, failed := Failed, score := Score} = Req, Opts) ->
    Result = case Failed of
                 true -> {failed, maps:get(reason, Req, <<>>)};
                 false -> Score
             end,
    with_run(Req, Opts, fun(Run, _) ->
                                case dspex_opt:tell(Run, T, Result) of
                                    ok -> {reply, #{}};
                                    {error, _} = E -> E
                                end
                        end).

%% @doc `GetStudy': the study's settings, counts, best trial and (with
%% `include_trials') every trial.
-spec get_study(map(), map()) -> {reply, map()} | {error, term()}.
get_study(Req, Opts) ->
    with_run(Req, Opts,
             fun(Run, #{id := Id, algorithm := A, direction := D, budget := B, asked := N, told := NT, pending := P,
                        variables := Vars, space := Space}) ->
                     Trials = case maps:get(include_trials, Req, false) of
                                  true ->
                                      case dspex_opt:trials(Run) of
                                          All when is_list(All) -> {ok, [trial(T) || T <- All]};
                                          {error, _} = TE -> TE
                                      end;
                                  false -> {ok, []}
                              end,
                     case {Trials, dspex_opt:best(Run)} of
                         {{error, _} = E, _} -> E;
                         {_, {error, R}} when R =/= no_trials -> {error, R};
                         {{ok, Ts}, Best} ->
                             {reply, maps:merge(#{study_id => Id, algorithm => text(A), direction => text(D),
                                                  budget => B, asked => N, told => NT, pending => P,
                                                  variables => Vars, space => text(Space), trials => Ts},
                                                best(Best))}
                     end
             end).

%% @doc `StopStudy': ends the study (optionally writing the best parameters).
-spec stop_study(map(), map()) -> {reply, map()} | {error, term()}.
stop_study(#{apply_best := Apply} = Req, Opts) ->
    with_run(Req, Opts, fun(Run, _) ->
                                case dspex_opt:stop(Run, #{apply_best => Apply}) of
                                    {ok, #{applied := Applied, trials := N, best := B} = R} ->
                                        Best = case B of undefined -> {error, no_trials}; _ -> {ok, B} end,
                                        {reply, maps:merge(#{applied => Applied, trials => N,
                                                             apply_errors => [text(E) || E <- maps:get(apply_errors, R, [])]},
                                                           best(Best))};
                                    {error, _} = E -> E
                                end
                        end).

%%% internals ---------------------------------------------------------------------

%% The study of the request, if the caller's session and principal started it.
with_run(#{session_id := S, study_id := Id}, Opts, F) ->
    case dspex_opt:lookup(Id) of
        {ok, Run} ->
            case dspex_opt:info(Run) of
                {ok, #{session := S} = Info} ->
                    case maps:get(principal, Info, undefined) =:= maps:get(as, Opts, undefined) of
                        true -> F(Run, Info);
                        false -> {error, run_not_found}
                    end;
                {ok, _} -> {error, run_not_found};
                {error, _} = E -> E
            end;
        {error, _} = E -> E
    end.

algorithm(<<>>) -> {ok, tpe};
algorithm(A) ->
    case [Id || {Id, _} <- dspex_opt:algorithms(), text(Id) =:= A] of
        [Id | _] -> {ok, Id};
        [] -> {error, {unknown_algorithm, A}}
    end.

direction(<<>>) -> {ok, minimize};
direction(<<"minimize">>) -> {ok, minimize};
direction(<<"maximize">>) -> {ok, maximize};
direction(_) -> {error, {invalid_argument, direction}}.

best({ok, #{trial := T, params := P, score := Sc}}) ->
    #{has_best => true, best => #{trial_id => T, params_json => P, state => <<"complete">>, score => Sc}};
best({error, no_trials}) -> #{has_best => false}.

trial(#{id := Id, params := P, state := St} = T) ->
    Base = #{trial_id => Id, params_json => P, state => atom_to_binary(St)},
    case St of
        complete -> Base#{score => maps:get(score, T)};
        failed -> Base#{reason => text(maps:get(reason, T, <<>>))};
        pending -> Base
    end.

text(B) when is_binary(B) -> B;
text(A) when is_atom(A) -> atom_to_binary(A);
text(T) -> iolist_to_binary(io_lib:format("~0p", [T])).
