%% Broken dspex_algorithm plugins that registration must refuse (used by
%% dspex_opt_tests): `out_of_bounds' proposes 1.5 in a unit dimension,
%% `crashes' raises on its third ask, `bad_return' returns a malformed value.
-module(dspex_opt_bad_plugins).
-export([init/2, ask/2, tell/4]).

init(Dims, _Opts) -> {ok, #{dims => Dims, mode => persistent_term:get({?MODULE, mode})}}.

ask(#{mode := out_of_bounds, dims := Dims} = S, _T) -> {ok, [case K of 0 -> 1.5; _ -> 0 end || K <- Dims], S};
ask(#{mode := crashes}, 2) -> error(boom);
ask(#{mode := crashes, dims := Dims} = S, _T) -> {ok, [0 || _ <- Dims], S};
ask(#{mode := bad_return}, _T) -> not_a_point.

tell(S, _T, _P, _Y) -> {ok, S}.
