%% @private
%% @doc Archive files of the event log's retention: one file per session and
%% UTC day, `<archive_dir>/<hex(session)>/<YYYY-MM-DD>.ndjson.gz', each line a
%% JSON object with the event's `id', `type', `session', `sequence',
%% `position', `timestamp' (readable) and `etf' (base64 of the whole event in
%% external term format, so reading it back gives the event exactly).
%% A file is rewritten whole (to a temporary file, then renamed), so a crash
%% leaves either the old or the new file.
-module(dspex_events_archive).
-export([write/2, read/3, file_of/2]).

%% @doc Archives every event the page function returns (called with the next
%% position, returning `{ok, Events}' in position order; `[]' ends).
-spec write(file:filename(), fun((non_neg_integer()) -> {ok, [map()]} | {error, term()})) ->
          {ok, non_neg_integer()} | {error, term()}.
write(Dir, Page) -> write(Dir, Page, 0, 0).

write(Dir, Page, Pos, N) ->
    case Page(Pos) of
        {ok, []} -> {ok, N};
        {ok, Evs} ->
            Groups = lists:foldr(fun(E, Acc) ->
                                         maps:update_with(file_of(Dir, E), fun(L) -> [E | L] end, [E], Acc)
                                 end, #{}, Evs),
            case maps:fold(fun(File, Es, ok) -> append(File, Es); (_, _, Err) -> Err end, ok, Groups) of
                ok ->
                    #{position := Last} = lists:last(Evs),
                    write(Dir, Page, Last + 1, N + length(Evs));
                Error -> Error
            end;
        Error -> Error
    end.

%% @doc The archive file of an event.
-spec file_of(file:filename(), map()) -> file:filename().
file_of(Dir, #{session := S, timestamp := Ts}) ->
    {{Y, M, D}, _} = calendar:system_time_to_universal_time(Ts, microsecond),
    Day = io_lib:format("~4..0B-~2..0B-~2..0B.ndjson.gz", [Y, M, D]),
    filename:join([Dir, binary_to_list(binary:encode_hex(S)), lists:flatten(Day)]).

append(File, Es) ->
    Old = case file:read_file(File) of
              {ok, Z} -> zlib:gunzip(Z);
              {error, enoent} -> <<>>
          end,
    Lines = [[line(E), $\n] || E <- Es],
    Tmp = filename:flatten([File, ".tmp"]),
    ok = filelib:ensure_dir(File),
    case file:write_file(Tmp, zlib:gzip([Old | Lines]), [sync]) of
        ok -> file:rename(Tmp, File);
        Error -> Error
    end.

line(#{id := Id, type := T, session := S, sequence := Seq, position := P, timestamp := Ts} = E) ->
    Type = if is_atom(T) -> atom_to_binary(T); true -> T end,
    {ok, J} = dspex_json:encode(#{id => Id, type => Type, session => binary:encode_hex(S), sequence => Seq,
                                  position => P, timestamp => Ts,
                                  etf => base64:encode(term_to_binary(E))}),
    J.

%% @doc The archived events of a session (or `all'), filtered like
%% `dspex_events:read/2' (since/until, types), in position order.
-spec read(file:filename(), binary() | all, map()) -> [map()].
read(Dir, Session, Opts) ->
    Dirs = case Session of
               all -> filelib:wildcard(filename:join(Dir, "*"));
               S -> [filename:join(Dir, binary_to_list(binary:encode_hex(S)))]
           end,
    Files = lists:append([filelib:wildcard(filename:join(D, "*.ndjson.gz")) || D <- Dirs]),
    Evs = lists:append([decode(F) || F <- Files]),
    Types = maps:get(types, Opts, undefined),
    lists:sort(fun(A, B) -> maps:get(position, A) =< maps:get(position, B) end,
               [E || E <- Evs, keep(E, Opts, Types)]).

decode(File) ->
    {ok, Z} = file:read_file(File),
    [begin
         {ok, #{<<"etf">> := B}} = dspex_json:decode(L),
         binary_to_term(base64:decode(B), [safe])
     end || L <- binary:split(zlib:gunzip(Z), <<"\n">>, [global, trim_all])].

keep(E, Opts, Types) ->
    (Types =:= undefined orelse lists:member(maps:get(type, E), Types))
        andalso in(since, maps:get(since, Opts, undefined), E)
        andalso in(until, maps:get(until, Opts, undefined), E).

in(_, undefined, _) -> true;
in(W, {sequence, N}, #{sequence := S}) -> cmp(W, S, N);
in(W, {position, N}, #{position := P}) -> cmp(W, P, N);
in(W, {time, T}, #{timestamp := Ts}) -> cmp(W, Ts, T);
in(W, T, E) when is_integer(T) -> in(W, {time, T}, E).

cmp(since, V, B) -> V >= B;
cmp(until, V, B) -> V =< B.
