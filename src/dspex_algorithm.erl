%% @doc The behaviour of optimizer plugins (`dspex_opt:register_algorithm/1').
%%
%% A plugin works in the normalised space of `dspex_opt_space': `Dims' has one
%% entry per searched dimension, `0' for a numeric one (values in `[0, 1]'),
%% `N >= 2' for a categorical one with N categories (values the integers
%% `0 .. N-1'). Scores are always minimised (`dspex_opt' negates them for
%% `maximize' runs); a failed trial is told as `failed'.
%%
%% The state is owned by the run: `ask/2' and `tell/4' return the new one. To
%% keep runs deterministic, draw randomness only from `Opts' `seed' (for
%% example with `rand:seed_s/2'), never from the process dictionary or clocks.
%% Registration runs the plugin on a small problem and refuses it when it
%% crashes, returns a malformed value or a point outside the space.
-module(dspex_algorithm).

-type dims() :: [non_neg_integer()].
-type point() :: [number()].
-type state() :: term().
-export_type([dims/0, point/0, state/0]).

%% Starts a run. `Opts' has `seed' (integer) and `budget' (positive integer).
-callback init(Dims :: dims(), Opts :: #{seed := integer(), budget := pos_integer()}) ->
    {ok, state()} | {error, term()}.
%% The candidate of trial `TrialId' (0, 1, ...; several may be outstanding).
-callback ask(State :: state(), TrialId :: non_neg_integer()) -> {ok, point(), state()}.
%% The result of trial `TrialId', asked at `Point'.
-callback tell(State :: state(), TrialId :: non_neg_integer(), Point :: point(), Score :: float() | failed) ->
    {ok, state()}.
