%% @private
%% @doc The NIF library stub. Only `-on_load' and `nif_error' bodies live here;
%% callers use {@link dspex_store}, which validates and documents.
-module(dspex_nif).
-on_load(init/0).

-export([session_create/3, session_get/1, session_list/0, session_touch/1, session_delete/1,
         sweep/0, reclaim/0, advance_clock/1, set_limits/1, get_limits/0, stats/0,
         var_register/9, var_get/2, var_get/3, var_get_value/2, var_exists/2, var_set/4, var_delete/2, var_delete/3,
         var_list/2, var_list/3, var_get_many/2, var_get_many/3, var_set_many/3, var_history/3, var_history/4, var_rollback/4,
         watch/3, watch/4, unwatch/1, var_info/2, export_session/1, import_session/1,
         graph_add/4, graph_remove/3, graph_query/3, graph_clear/1, graph_edges/1, var_set_error/3,
         var_lock/4, var_lock/5, var_unlock/3,
         acl_set/4, acl_get/2, acl_check/5, acl_filter/4, acl_rules/1, acl_validate/1, session_set_rate/3, session_get_rate/1, session_take/1,
         metrics_series_new/1, metrics_record/3, metrics_query/4, metrics_totals/1, metrics_series_memory/1,
         metrics_sketch_stats/1, metrics_sketch_quantile/2, metrics_sketch_to_binary/1,
         metrics_sketch_from_binary/1, metrics_sketch_merge/1, metrics_now/0,
         metrics_native_bind/4, metrics_native_flush/0, metrics_dropped/0,
         metrics_set_clock/1]).
-export([replica_apply_batch/3]).
-export([repl_link_open/1, repl_link_id/1, repl_drain/1, repl_push/2, repl_publish/5, repl_publish/6, repl_unsettle/1,
         repl_forget/1, repl_info/1, repl_announced/1, repl_stats/0, repl_set/6]).
-export([lock_token_floor/1, var_lock/6, lock_list/0]).
-export([events_open/1, events_close/0, events_append/4, events_await/0, events_backpressure/0, events_read/1,
         events_stats/0, events_put_snapshot/4, events_latest_snapshot/3, events_expire/4, events_session_seq/1,
         events_seed/1, events_append/5, events_session_delete/2, events_reseed/1,
         events_replay/6, events_replay/7, events_put_snapshots/1]).
-export([sched_stats/0, rawbuf_debug/1]).
-export([session_page/3]).
-export([opt_ask/8]).
-export([var_get_here/2, var_get_here/3, var_get_value_here/2, var_set_here/4, store_fast_path/2]).
-export([var_set_derived/4]).
-export([cache_get/3, cache_get_value/3, cache_arm/4, cache_take_ref/1, cache_clock/0, cache_gen/1, cache_hits/1,
         cache_config/2, cache_info/1]).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% The library keeps its state (sessions, variables, locks) in C: loading
%% this module again (`code:load_file/1') maps the same library, and its
%% `upgrade' callback hands that state to the new code; purging the old code
%% does not free it. Test hooks (`advance_clock/1') answer
%% `{error, test_hooks_disabled}' unless the application environment has
%% `{test_hooks, true}' or the OS environment `DSPEX_TEST_HOOKS=1' when the
%% module is loaded.
-spec init() -> ok | {error, {atom(), string()}}.
init() ->
    %% DSPEX_NIF_PATH lets `make test' load a sanitizer build of the library
    Path = case os:getenv("DSPEX_NIF_PATH") of
               false ->
                   Dir = case code:priv_dir(dspex_bridge) of
                             {error, bad_name} ->
                                 filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
                             D -> D
                         end,
                   filename:join(Dir, "dspex_nif");
               P -> P
           end,
    Hooks = application:get_env(dspex_bridge, test_hooks, false) =:= true orelse
            os:getenv("DSPEX_TEST_HOOKS") =:= "1",
    erlang:load_nif(Path, #{test_hooks => Hooks}).

session_create(_Id, _Meta, _Ttl) -> ?NOT_LOADED.
session_get(_Id) -> ?NOT_LOADED.
session_list() -> ?NOT_LOADED.
session_touch(_Id) -> ?NOT_LOADED.
session_delete(_Id) -> ?NOT_LOADED.
sweep() -> ?NOT_LOADED.
reclaim() -> ?NOT_LOADED.
advance_clock(_Ms) -> ?NOT_LOADED.
set_limits(_Map) -> ?NOT_LOADED.
get_limits() -> ?NOT_LOADED.
stats() -> ?NOT_LOADED.
var_register(_S, _Name, _Type, _Value, _Cons, _Meta, _HistoryLimit, _By, _Derived) -> ?NOT_LOADED.
var_get(_S, _Key) -> ?NOT_LOADED.
var_get_value(_S, _Key) -> ?NOT_LOADED.
var_exists(_S, _Key) -> ?NOT_LOADED.
var_set(_S, _Key, _Value, _Opts) -> ?NOT_LOADED.
%% `var_set_here/4' that may write a derived variable: dspex_store:set_derived/4
%% (the propagator) only; no option of the public writes grants that.
-spec var_set_derived(binary(), term(), term(), map()) -> {ok, non_neg_integer()} | {error, term()}.
var_set_derived(_S, _Key, _Value, _Opts) -> ?NOT_LOADED.
var_delete(_S, _Key) -> ?NOT_LOADED.
var_list(_S, _Pattern) -> ?NOT_LOADED.
var_get_many(_S, _Keys) -> ?NOT_LOADED.
var_set_many(_S, _Updates, _Atomic) -> ?NOT_LOADED.
var_history(_S, _Key, _Limit) -> ?NOT_LOADED.
var_rollback(_S, _Key, _Version, _Opts) -> ?NOT_LOADED.
watch(_S, _Keys, _Pid) -> ?NOT_LOADED.
unwatch(_Ref) -> ?NOT_LOADED.
var_info(_S, _Key) -> ?NOT_LOADED.
export_session(_S) -> ?NOT_LOADED.
%% One page of a session's variables by name (ranks [Offset, Offset + Limit);
%% an integer beyond 64 bits counts as past the end), with the session-wide
%% figures of `dspex_store:diagnostics/1' and the graph edges touching the
%% page (unsorted, an edge between two page variables twice). One token of
%% the session's rate limit. badarg: a session id that is not a binary, an
%% Offset or Limit that is not an integer >= 0.
-spec session_page(binary(), non_neg_integer(), non_neg_integer()) ->
          {ok, #{total := non_neg_integer(), bytes := non_neg_integer(), history_entries := non_neg_integer(),
                 watchers := non_neg_integer(), last_writes := [map()], variables := [map()],
                 watched := #{binary() => pos_integer()}, changed_by := #{binary() => term()},
                 edges := [{binary(), binary(), atom()}]}}
          | {error, session_not_found | rate_limited | enomem}.
session_page(_S, _Offset, _Limit) -> ?NOT_LOADED.
import_session(_Term) -> ?NOT_LOADED.
graph_add(_S, _From, _To, _Type) -> ?NOT_LOADED.
graph_remove(_S, _From, _To) -> ?NOT_LOADED.
graph_query(_S, _Var, _What) -> ?NOT_LOADED.
graph_clear(_S) -> ?NOT_LOADED.
graph_edges(_S) -> ?NOT_LOADED.
var_set_error(_S, _Var, _Error) -> ?NOT_LOADED.
var_lock(_S, _Key, _Holder, _Expect) -> ?NOT_LOADED.
var_unlock(_S, _Key, _Token) -> ?NOT_LOADED.
acl_set(_S, _Var, _Rules, _Opts) -> ?NOT_LOADED.
acl_get(_S, _Var) -> ?NOT_LOADED.
acl_check(_S, _Var, _Principal, _Perm, _Context) -> ?NOT_LOADED.
acl_filter(_S, _Principal, _Perm, _Context) -> ?NOT_LOADED.
%% The rules of every variable of the session that has some: `{ok, #{Name
%% => Rules}}' (no value is copied; many variables: a dirty scheduler),
%% `{error, session_not_found}'; badarg for a session id that is no binary.
-spec acl_rules(binary()) -> {ok, #{binary() => list()}} | {error, session_not_found | enomem}.
acl_rules(_S) -> ?NOT_LOADED.
acl_validate(_Rules) -> ?NOT_LOADED.
session_set_rate(_S, _Rate, _Burst) -> ?NOT_LOADED.
session_get_rate(_S) -> ?NOT_LOADED.
session_take(_S) -> ?NOT_LOADED.
var_get(_S, _Key, _Opts) -> ?NOT_LOADED.
var_delete(_S, _Key, _Opts) -> ?NOT_LOADED.
var_list(_S, _Pattern, _Opts) -> ?NOT_LOADED.
watch(_S, _Keys, _Pid, _Opts) -> ?NOT_LOADED.
var_lock(_S, _Key, _Holder, _Expect, _Opts) -> ?NOT_LOADED.
var_get_many(_S, _Keys, _Opts) -> ?NOT_LOADED.
var_history(_S, _Key, _Limit, _Opts) -> ?NOT_LOADED.
metrics_series_new(_RetentionHours) -> ?NOT_LOADED.
metrics_record(_Series, _Value, _Time) -> ?NOT_LOADED.
metrics_query(_SeriesList, _From, _To, _Now) -> ?NOT_LOADED.
metrics_totals(_Series) -> ?NOT_LOADED.
metrics_series_memory(_Series) -> ?NOT_LOADED.
metrics_sketch_stats(_Sketch) -> ?NOT_LOADED.
metrics_sketch_quantile(_Sketch, _Q) -> ?NOT_LOADED.
metrics_sketch_to_binary(_Sketch) -> ?NOT_LOADED.
metrics_sketch_from_binary(_Bin) -> ?NOT_LOADED.
metrics_sketch_merge(_Sketches) -> ?NOT_LOADED.
metrics_now() -> ?NOT_LOADED.
metrics_native_bind(_Op, _Ok, _Miss, _Err) -> ?NOT_LOADED.
metrics_native_flush() -> ?NOT_LOADED.
metrics_dropped() -> ?NOT_LOADED.
%% Testing only: freezes the metrics clock (`dspex_metrics:clock/0', `now'
%% in records, natively timed samples, the bound on future times) at
%% Seconds (|Seconds| =< 2^40); `now' returns to the OS clock.
-spec metrics_set_clock(integer() | now) -> ok.
metrics_set_clock(_SecondsOrNow) -> ?NOT_LOADED.
lock_token_floor(_Floor) -> ?NOT_LOADED.
%% A replica applies a batch of its owner's sets of one session (dspex_cluster_replica).
-spec replica_apply_batch(binary(), {non_neg_integer(), non_neg_integer(), non_neg_integer()},
                          [{pos_integer(), pos_integer(), term(), term(), map(), pos_integer()}]) ->
          {{non_neg_integer(), non_neg_integer(), non_neg_integer()},
           [ok | {error, need_full | {stale_epoch, non_neg_integer()}}]}.
replica_apply_batch(_Session, _State, _Sets) -> ?NOT_LOADED.

%% The owner's replication fast path (issue #21, c_src/nif/repl_nif.c; see
%% dspex_cluster_shipper and dspex_cluster_writer).
%% The caller becomes the shipper of the link to Node: its id and the records
%% queued for a previous shipper (more than 2048 copied on a dirty scheduler).
-spec repl_link_open(node()) -> {ok, non_neg_integer(), [tuple()]} | {error, too_many_links}.
repl_link_open(_Node) -> ?NOT_LOADED.
-spec repl_link_id(node()) -> non_neg_integer() | undefined.
repl_link_id(_Node) -> ?NOT_LOADED.
%% The link's queued records, in append order (more than 2048 copied on a
%% dirty scheduler).
-spec repl_drain(non_neg_integer()) -> [tuple()].
repl_drain(_Link) -> ?NOT_LOADED.
-spec repl_push(non_neg_integer(), tuple()) -> ok | full | down.
repl_push(_Link, _Rec) -> ?NOT_LOADED.
%% Session settled at {Epoch, Seq} under view generation Gen, replicated
%% over Links (a link id, or a list of 1..16 distinct ones), sync.
-spec repl_publish(binary(), pos_integer(), non_neg_integer(), non_neg_integer(),
                   non_neg_integer() | [non_neg_integer()]) -> ok | {error, enomem}.
repl_publish(_S, _Epoch, _Seq, _Gen, _Links) -> ?NOT_LOADED.
%% repl_publish/5 with the replication mode (async: repl_set/6 answers at once).
-spec repl_publish(binary(), pos_integer(), non_neg_integer(), non_neg_integer(),
                   non_neg_integer() | [non_neg_integer()], sync | async) -> ok | {error, enomem}.
repl_publish(_S, _Epoch, _Seq, _Gen, _Links, _Mode) -> ?NOT_LOADED.
-spec repl_unsettle(binary()) -> {non_neg_integer(), non_neg_integer()} | none.
repl_unsettle(_S) -> ?NOT_LOADED.
-spec repl_forget(binary()) -> ok.
repl_forget(_S) -> ?NOT_LOADED.
-spec repl_info(binary()) ->
          none | {boolean(), non_neg_integer(), non_neg_integer(), {non_neg_integer(), non_neg_integer()}}.
repl_info(_S) -> ?NOT_LOADED.
-spec repl_announced(binary()) -> {non_neg_integer(), non_neg_integer()} | none.
repl_announced(_S) -> ?NOT_LOADED.
%% {sets taken by the fast path, sets refused for a full link queue} since the library loaded.
-spec repl_stats() -> {non_neg_integer(), non_neg_integer()}.
repl_stats() -> ?NOT_LOADED.
-spec repl_set(binary(), term(), term(), non_neg_integer(), {reference(), reference()}, integer()) ->
          slow | {queued, [pid()], pos_integer(), pos_integer(), {ok, pos_integer()}} | {done, non_neg_integer(), term()}
          | {wait, non_neg_integer()}.
repl_set(_S, _Key, _Value, _Gen, _From, _T0) -> ?NOT_LOADED.
%% var_lock/5 that also records Meta with the lock in the NIF's lock registry.
-spec var_lock(binary(), term(), term(), non_neg_integer(), map(), term()) -> {ok, pos_integer()} | {error, term()}.
var_lock(_S, _Key, _Holder, _Expect, _Opts, _Meta) -> ?NOT_LOADED.
%% Every registered lock the store still holds: `[{Session, Name, Token, Holder, Meta}]'.
-spec lock_list() -> [{binary(), binary(), pos_integer(), term(), term()}].
lock_list() -> ?NOT_LOADED.
var_get_here(_S, _Key) -> ?NOT_LOADED.
var_get_here(_S, _Key, _Opts) -> ?NOT_LOADED.
var_get_value_here(_S, _Key) -> ?NOT_LOADED.
var_set_here(_S, _Key, _Value, _Opts) -> ?NOT_LOADED.
store_fast_path(_Op, _Fast) -> ?NOT_LOADED.
%% Cached copies of other nodes' sessions (dspex_cache; c_src/core/cache.h).
-spec cache_get(binary(), term(), non_neg_integer() | strong) -> term().
cache_get(_S, _Key, _MaxStale) -> ?NOT_LOADED.
-spec cache_get_value(binary(), term(), non_neg_integer() | strong) -> term().
cache_get_value(_S, _Key, _MaxStale) -> ?NOT_LOADED.
-spec cache_arm(binary(), integer(), non_neg_integer(), integer()) -> ok | {error, session_not_found}.
cache_arm(_Id, _FillNs, _Gen, _LeaseNs) -> ?NOT_LOADED.
-spec cache_take_ref(binary()) -> boolean() | {error, session_not_found}.
cache_take_ref(_Id) -> ?NOT_LOADED.
-spec cache_clock() -> integer().
cache_clock() -> ?NOT_LOADED.
-spec cache_gen(current | bump) -> pos_integer().
cache_gen(_What) -> ?NOT_LOADED.
-spec cache_hits(boolean()) -> non_neg_integer().
cache_hits(_Reset) -> ?NOT_LOADED.
-spec cache_config(off | strong | non_neg_integer(), boolean()) -> ok.
cache_config(_Default, _HitEvent) -> ?NOT_LOADED.
-spec cache_info(binary()) -> {integer(), non_neg_integer(), integer(), 0 | 1} | {error, session_not_found}.
cache_info(_Id) -> ?NOT_LOADED.
events_open(_Config) -> ?NOT_LOADED.
events_close() -> ?NOT_LOADED.
events_append(_Session, _Type, _Data, _Meta) -> ?NOT_LOADED.
events_await() -> ?NOT_LOADED.
events_backpressure() -> ?NOT_LOADED.
events_read(_Query) -> ?NOT_LOADED.
events_stats() -> ?NOT_LOADED.
events_put_snapshot(_Session, _Seq, _TsUs, _Term) -> ?NOT_LOADED.
events_latest_snapshot(_Session, _MaxSeq, _MaxTs) -> ?NOT_LOADED.
%% Snapshots in one transaction where the backend can (SQLite; PostgreSQL one each), at most 1,000.
-spec events_put_snapshots([{binary(), non_neg_integer(), integer(), term()}]) -> ok | {error, term()}.
events_put_snapshots(_Snapshots) -> ?NOT_LOADED.
events_expire(_TsUs, _PosFrom, _PosTo, _Archived) -> ?NOT_LOADED.
events_session_seq(_Session) -> ?NOT_LOADED.
events_seed(_Session) -> ?NOT_LOADED.
events_append(_Session, _Type, _Data, _Meta, _As) -> ?NOT_LOADED.
events_session_delete(_Session, _Reason) -> ?NOT_LOADED.
events_reseed(_Session) -> ?NOT_LOADED.
-spec events_replay(binary(), non_neg_integer(), non_neg_integer(), non_neg_integer(), pos_integer(),
                    non_neg_integer()) ->
          {ok, [{pos_integer(), integer(), atom() | binary(), term()}], non_neg_integer(), non_neg_integer()}
          | {error, {event_store, term()}}.
events_replay(_Session, _SeqFrom, _SeqTo, _TsTo, _Limit, _Mark) -> ?NOT_LOADED.
%% The same with the runs of one variable's updates folded into one
%% `{Seq, Ts, {updates, Count, Previous}, LastData}' (Previous: the last
%% min(Count, history_limit) `previous' entries, newest first); `Limits' are
%% the `{Name, HistoryLimit}' of the variables the caller's state has.
-spec events_replay(binary(), non_neg_integer(), non_neg_integer(), non_neg_integer(), pos_integer(),
                    non_neg_integer(), [{term(), non_neg_integer()}]) ->
          {ok, [{pos_integer(), integer(), atom() | binary() | {updates, pos_integer(), [map()]}, term()}],
           non_neg_integer(), non_neg_integer()}
          | {error, {event_store, term()}}.
events_replay(_Session, _SeqFrom, _SeqTo, _TsTo, _Limit, _Mark, _Limits) -> ?NOT_LOADED.
sched_stats() -> ?NOT_LOADED.
rawbuf_debug(_FailNth) -> ?NOT_LOADED.

%% optimizer kernels (c_src/nif/opt_nif.c), used by dspex_opt
opt_ask(_Alg, _Dims, _Told, _Pending, _Seed, _Trial, _Budget, _Warm) -> ?NOT_LOADED.
