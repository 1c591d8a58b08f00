%% @doc The clock of `dspex_breaker' (and anything else whose time tests must
%% control): a module with `now_ms/0'. This module is the default one,
%% monotonic milliseconds; tests pass their own (e.g. `dspex_manual_clock').
-module(dspex_clock).

-export([now_ms/0]).

-callback now_ms() -> integer().

%% @doc Monotonic time in milliseconds (never goes back; not wall time).
-spec now_ms() -> integer().
now_ms() -> erlang:monotonic_time(millisecond).
