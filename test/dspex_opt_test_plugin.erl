%% A dspex_algorithm plugin used by dspex_opt_tests: seeded random search that
%% moves around the best told point (a real, if simple, optimizer).
-module(dspex_opt_test_plugin).
-behaviour(dspex_algorithm).
-export([init/2, ask/2, tell/4]).

init(Dims, #{seed := Seed}) -> {ok, #{dims => Dims, seed => Seed, best => undefined}}.

ask(#{dims := Dims, seed := Seed, best := Best} = S, Trial) ->
    R0 = rand:seed_s(exsss, {Seed, Trial, 17}),
    {P, _} = lists:mapfoldl(
               fun({0, B}, R) when B =/= undefined ->
                       {Z, R1} = rand:normal_s(R),
                       {min(1.0, max(0.0, B + 0.1 * Z)), R1};
                  ({0, _}, R) -> rand:uniform_s(R);
                  ({K, _}, R) -> {V, R1} = rand:uniform_s(K, R), {V - 1, R1}
               end, R0, lists:zip(Dims, case Best of undefined -> [undefined || _ <- Dims];
                                                      {_, BP} -> BP end)),
    {ok, P, S}.

tell(S, _Trial, _Point, failed) -> {ok, S};
tell(#{best := undefined} = S, _Trial, Point, Y) -> {ok, S#{best := {Y, Point}}};
tell(#{best := {BY, _}} = S, _Trial, Point, Y) when Y < BY -> {ok, S#{best := {Y, Point}}};
tell(S, _Trial, _Point, _Y) -> {ok, S}.
