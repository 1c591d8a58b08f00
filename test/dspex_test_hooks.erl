%% Test helper: makes sure the NIF serves its test hooks (advance_clock/1),
%% reloading dspex_nif with `{test_hooks, true}' if it was loaded without.
-module(dspex_test_hooks).
-export([enable/0, reload_nif/0]).

-spec enable() -> ok.
enable() ->
    case dspex_nif:advance_clock(0) of
        ok -> ok;
        {error, test_hooks_disabled} ->
            ok = application:set_env(dspex_bridge, test_hooks, true),
            ok = reload_nif(),
            ok = dspex_nif:advance_clock(0)
    end.

%% Loads dspex_nif again (the NIF upgrade path), first purging old code once
%% no process runs it (bounded polling: a process may be inside a NIF call).
-spec reload_nif() -> ok.
reload_nif() ->
    ok = soft_purge(2000),
    {module, dspex_nif} = code:load_file(dspex_nif),
    ok.

soft_purge(0) -> erlang:error(old_code_in_use);
soft_purge(N) ->
    case code:soft_purge(dspex_nif) of
        true -> ok;
        false -> erlang:yield(), timer:sleep(1), soft_purge(N - 1)
    end.
