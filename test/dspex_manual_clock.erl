%% @doc A `dspex_clock' whose time only moves when a test says so: one
%% atomics counter kept in `persistent_term', so any process reads it.
-module(dspex_manual_clock).
-behaviour(dspex_clock).

-export([now_ms/0, set/1, advance/1]).

-define(KEY, {?MODULE, counter}).

%% @doc The current manual time (0 until set).
-spec now_ms() -> integer().
now_ms() -> atomics:get(counter(), 1).

%% @doc Sets the time.
-spec set(integer()) -> ok.
set(Ms) -> atomics:put(counter(), 1, Ms).

%% @doc Moves the time forward by `Ms'.
-spec advance(non_neg_integer()) -> integer().
advance(Ms) when Ms >= 0 -> atomics:add_get(counter(), 1, Ms).

counter() ->
    case persistent_term:get(?KEY, undefined) of
        undefined ->
            Ref = atomics:new(1, [{signed, true}]),
            %% two first callers may race: the first stored counter wins
            global:trans({?KEY, self()}, fun() ->
                case persistent_term:get(?KEY, undefined) of
                    undefined -> persistent_term:put(?KEY, Ref), Ref;
                    Other -> Other
                end
            end, [node()]);
        Ref -> Ref
    end.
