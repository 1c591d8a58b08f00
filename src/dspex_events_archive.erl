%% @private
%% @doc Archive files of the event log's retention: one file per session and
%% UTC day, `<archive_dir>/<hex(session)>/<YYYY-MM-DD>.ndjson.gz', each line a
%% JSON object with the event's `id', `type', `session', `sequence',
%% `position', `timestamp' (readable) and `etf' (base64 of the whole event in
%% external term format, so reading it back gives the event exactly).
%%
%% A file is a series of gzip members (RFC 1952 allows several; `zcat' and
%% `zlib:gunzip/1' read them as one stream), one appended per page archived,
%% so archiving costs the size of what is archived, not of the file so far.
%% Each member carries its own length in a gzip extra field (subfield `DX',
%% as BGZF does with `BC'): a member torn by a crash during its append is
%% found by walking the lengths, dropped by the reader, and cut off before the
%% next append (its events were not deleted from the log: the delete follows
%% the synced append). A file of an older build (one member without the
%% field) is rewritten once as one such member (temporary file, then rename)
%% before the first append to it.
-module(dspex_events_archive).

-include_lib("kernel/include/file.hrl").
-export([write_page/2, read/3, file_of/2]).

-define(XLEN, 12). % the extra field: "DX", its length (8), the member's length (64 bits)

%% @doc Archives a page of events (position order): appends one member to the
%% file of each session and day in it, synced before this returns `ok'.
-spec write_page(file:filename(), [map()]) -> ok | {error, term()}.
write_page(Dir, Evs) ->
    Groups = lists:foldr(fun(E, Acc) -> maps:update_with(file_of(Dir, E), fun(L) -> [E | L] end, [E], Acc) end,
                         #{}, Evs),
    maps:fold(fun(File, Es, ok) -> append(File, Es); (_, _, Err) -> Err end, ok, Groups).

%% @doc The archive file of an event.
-spec file_of(file:filename(), map()) -> file:filename().
file_of(Dir, #{session := S, timestamp := Ts}) ->
    {{Y, M, D}, _} = calendar:system_time_to_universal_time(Ts, microsecond),
    Day = io_lib:format("~4..0B-~2..0B-~2..0B.ndjson.gz", [Y, M, D]),
    filename:join([Dir, binary_to_list(binary:encode_hex(S)), lists:flatten(Day)]).

append(File, Es) ->
    ok = filelib:ensure_dir(File),
    case valid_end(File) of
        {ok, End} ->
            Member = member([[line(E), $\n] || E <- Es]),
            case file:open(File, [read, write, raw, binary]) of
                {ok, F} ->
                    %% at the valid end: a torn member of an earlier crash is overwritten
                    R = case file:pwrite(F, End, Member) of
                            ok ->
                                case truncate_at(F, End + byte_size(Member)) of
                                    ok -> file:datasync(F);
                                    E1 -> E1
                                end;
                            E2 -> E2
                        end,
                    _ = R =/= ok andalso truncate_at(F, End),
                    ok = file:close(F),
                    R;
                Error -> Error
            end;
        Error -> Error
    end.

truncate_at(F, End) ->
    _ = file:position(F, End),
    file:truncate(F).

%% The end of the file's last complete member; an older build's file is
%% rewritten as one member first.
valid_end(File) ->
    case file:read_file_info(File) of
        {error, enoent} -> {ok, 0};
        {ok, #file_info{size = 0}} -> {ok, 0};
        {ok, _} ->
            {ok, Z} = file:read_file(File),
            case walk(Z, 0, []) of
                {legacy, _} -> rewrite_legacy(File, Z);
                {_Members, End} -> {ok, End}
            end;
        Error -> Error
    end.

rewrite_legacy(File, Z) ->
    M = member(zlib:gunzip(Z)),
    Tmp = filename:flatten([File, ".tmp"]),
    case file:write_file(Tmp, M, [sync]) of
        ok ->
            case file:rename(Tmp, File) of
                ok -> {ok, byte_size(M)};
                Error -> Error
            end;
        Error -> Error
    end.

%% {Members, EndOfLastComplete} | {legacy, 0}: the members carrying their
%% length, up to the first torn one (or anything else: nothing we wrote).
walk(Z, Off, Acc) when Off =:= byte_size(Z) -> {lists:reverse(Acc), Off};
walk(Z, Off, Acc) ->
    case Z of
        <<_:Off/binary, 16#1f, 16#8b, 8, Flg, _:6/binary, ?XLEN:16/little, "DX", 8:16/little, Len:64/little,
          _/binary>> when Flg band 4 =:= 4, Len >= 32, Off + Len =< byte_size(Z) ->
            walk(Z, Off + Len, [binary:part(Z, Off, Len) | Acc]);
        <<16#1f, 16#8b, _/binary>> when Off =:= 0 -> {legacy, 0};
        _ -> {lists:reverse(Acc), Off}
    end.

%% One gzip member with its length in the extra field.
member(Data) ->
    Z = zlib:open(),
    try
        ok = zlib:deflateInit(Z, default, deflated, -15, 8, default),
        Raw = iolist_to_binary(zlib:deflate(Z, Data, finish)),
        ok = zlib:deflateEnd(Z),
        Len = 10 + 2 + ?XLEN + byte_size(Raw) + 8,
        <<16#1f, 16#8b, 8, 4, 0:32, 0, 255, ?XLEN:16/little, "DX", 8:16/little, Len:64/little, Raw/binary,
          (erlang:crc32(Data)):32/little, (iolist_size(Data) band 16#ffffffff):32/little>>
    after
        zlib:close(Z)
    end.

line(#{id := Id, type := T, session := S, sequence := Seq, position := P, timestamp := Ts} = E) ->
    Type = if is_atom(T) -> atom_to_binary(T); true -> T end,
    {ok, J} = dspex_json:encode(#{id => Id, type => Type, session => binary:encode_hex(S), sequence => Seq,
                                  position => P, timestamp => Ts,
                                  etf => base64:encode(term_to_binary(E))}),
    J.

%% @doc The archived events of a session (or `all') that match a log query
%% (the map `dspex_events' passes to the log: `seq_from'/`seq_to',
%% `pos_from'/`pos_to', `ts_from'/`ts_to', `types', `principal' and
%% `variable' as binaries), in position order, each once (a page archived
%% again after its delete failed is read once).
-spec read(file:filename(), binary() | all, map()) -> [map()].
read(Dir, Session, Q) ->
    Dirs = case Session of
               all -> filelib:wildcard(filename:join(Dir, "*"));
               S -> [filename:join(Dir, binary_to_list(binary:encode_hex(S)))]
           end,
    Files = lists:append([filelib:wildcard(filename:join(D, "*.ndjson.gz")) || D <- Dirs]),
    {Evs, _} = lists:foldl(fun(E = #{id := Id}, {Acc, Seen}) ->
                                   case maps:is_key(Id, Seen) orelse not match(E, Q) of
                                       true -> {Acc, Seen};
                                       false -> {[E | Acc], Seen#{Id => true}}
                                   end
                           end, {[], #{}}, lists:append([decode(F) || F <- Files])),
    lists:sort(fun(A, B) -> maps:get(position, A) =< maps:get(position, B) end, Evs).

decode(File) ->
    {ok, Z} = file:read_file(File),
    Text = case walk(Z, 0, []) of
               {legacy, _} -> zlib:gunzip(Z);
               {Members, _} -> [zlib:gunzip(M) || M <- Members]
           end,
    [begin
         {ok, #{<<"etf">> := B}} = dspex_json:decode(L),
         binary_to_term(base64:decode(B), [safe])
     end || L <- binary:split(iolist_to_binary(Text), <<"\n">>, [global, trim_all])].

%% The log's filters, applied as the backends apply them.
match(E = #{sequence := Seq, position := P, timestamp := Ts}, Q) ->
    Meta = maps:get(metadata, E, #{}),
    in(Seq, seq_from, seq_to, Q) andalso in(P, pos_from, pos_to, Q) andalso in(Ts, ts_from, ts_to, Q)
        andalso (not is_map_key(session, Q) orelse maps:get(session, Q) =:= maps:get(session, E))
        andalso (not is_map_key(types, Q) orelse lists:member(text(maps:get(type, E)), maps:get(types, Q)))
        andalso meta(principal, Meta, Q) andalso meta(variable, Meta, Q).

%% an indexed column holds a binary principal, a binary or atom variable name (dspex_events:indexable/1)
meta(K, Meta, Q) ->
    case {Q, Meta} of
        {#{K := Want}, #{K := V}} when is_binary(V); is_atom(V), K =:= variable -> text(V) =:= Want;
        {#{K := _}, _} -> false;
        _ -> true
    end.

in(V, From, To, Q) -> V >= maps:get(From, Q, V) andalso V =< maps:get(To, Q, V).

text(B) when is_binary(B) -> B;
text(A) when is_atom(A) -> atom_to_binary(A);
text(_) -> none.
