/* Shared declarations of the NIF layer. */
#ifndef DX_NIF_H
#define DX_NIF_H
#include "convert.h"
#include "ebr.h"
#include "store.h"

extern ErlNifResourceType *dx_watch_type;
int dx_watch_init(ErlNifEnv *env);
void dx_watch_release(void *w);
/* Watch notifications (watch_nif.c). A writer passes dx_watch_notify and a
 * dx_notify_ctx to the core's commit; the hook, under the shard mutex, only
 * queues references. After the commit the writer returns
 * dx_watch_finish(env, &ctx, Reply): it builds and sends the queued messages
 * (commit order per variable), or moves that work to a dirty scheduler when it
 * exceeds DX_NOTIFY_BUDGET bytes on a normal one, and answers Reply. */
#define DX_NOTIFY_BUDGET (256u << 10)
typedef struct {
    ErlNifEnv *env;
    void **q; /* queues this call drains */
    size_t n, cap;
    void *inline_q[4];
} dx_notify_ctx;
void dx_notify_ctx_init(dx_notify_ctx *nc, ErlNifEnv *env, size_t nvars);
void dx_watch_notify(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur);
ERL_NIF_TERM dx_watch_finish(ErlNifEnv *env, dx_notify_ctx *nc, ERL_NIF_TERM reply);
/* Test and bench counters: commits delivered on a normal / dirty scheduler,
 * drains moved to a dirty scheduler, notifications dropped (out of memory). */
enum { DX_NOTIFY_NORMAL, DX_NOTIFY_DIRTY, DX_NOTIFY_RESCHEDULED, DX_NOTIFY_DROPPED, DX_NOTIFY_STATS };
extern _Atomic uint64_t dx_notify_stats[DX_NOTIFY_STATS];

/* The session named by a binary term (NULL if not a binary, unknown or
 * expired; *sid gets its id when given). Inside an EBR section. */
dx_session *dx_nif_session(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *sid);
/* True on a dirty scheduler, where long work may run. */
int dx_on_dirty(void);

int64_t dx_now_us(void);
int64_t dx_now_ms(void);
int64_t dx_now_ns(void);

ERL_NIF_TERM dx_error(ErlNifEnv *env, ERL_NIF_TERM reason);
ERL_NIF_TERM dx_error2(ErlNifEnv *env, ERL_NIF_TERM tag, ERL_NIF_TERM detail);
ERL_NIF_TERM dx_error_msg(ErlNifEnv *env, ERL_NIF_TERM tag, const char *msg);
ERL_NIF_TERM dx_limit_error(ErlNifEnv *env, int limit);
/* Maps a core result code (not OK) to its error term; key names the variable. */
ERL_NIF_TERM dx_rc_error(ErlNifEnv *env, int rc, ERL_NIF_TERM key, uint64_t version, int limit, const char *msg);

/* The graph edges touching a page of variables (graph_nif.c, for session_page/3). */
ERL_NIF_TERM dx_graph_page_edges(ErlNifEnv *env, dx_session *s, const dx_var_stat *page, size_t n, int *oom);

/* Test hooks (advance_clock) are served only when the library was loaded
 * with them enabled (load info #{test_hooks => true}). */
extern _Atomic int dx_test_hooks;

/* The lock registry (lock_nif.c): every lock granted by var_lock/6 with its
 * session, variable name, holder and meta, so that a restarted dspex_locks
 * can rebuild its state. put: 0 or -1 (out of memory). */
int dx_lockreg_put(uint64_t token, dx_str sid, dx_str name, const uint8_t *holder, size_t hlen, const uint8_t *meta,
                   size_t mlen);
void dx_lockreg_drop(uint64_t token);
void dx_lockreg_clear(void);

#define DX_NIF(name) ERL_NIF_TERM name(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
DX_NIF(nif_session_create); DX_NIF(nif_session_get); DX_NIF(nif_session_list); DX_NIF(nif_session_touch);
DX_NIF(nif_session_delete); DX_NIF(nif_sweep); DX_NIF(nif_reclaim); DX_NIF(nif_advance_clock);
DX_NIF(nif_set_limits); DX_NIF(nif_get_limits); DX_NIF(nif_stats);
DX_NIF(nif_var_register); DX_NIF(nif_var_get); DX_NIF(nif_var_get_value); DX_NIF(nif_var_exists);
DX_NIF(nif_var_get_here); DX_NIF(nif_var_get_value_here); DX_NIF(nif_var_set_here); DX_NIF(nif_store_fast_path);
DX_NIF(nif_var_set); DX_NIF(nif_var_set_derived); DX_NIF(nif_var_delete); DX_NIF(nif_var_list); DX_NIF(nif_var_get_many);
DX_NIF(nif_var_set_many); DX_NIF(nif_var_history); DX_NIF(nif_var_rollback);
DX_NIF(nif_watch); DX_NIF(nif_var_info); DX_NIF(nif_unwatch);
DX_NIF(nif_export_session); DX_NIF(nif_import_session); DX_NIF(nif_session_page);
DX_NIF(nif_graph_add); DX_NIF(nif_graph_remove); DX_NIF(nif_graph_query); DX_NIF(nif_graph_clear);
DX_NIF(nif_graph_edges); DX_NIF(nif_var_set_error); DX_NIF(nif_var_lock); DX_NIF(nif_var_unlock);
DX_NIF(nif_lock_token_floor); DX_NIF(nif_replica_apply_batch); DX_NIF(nif_lock_list);
DX_NIF(nif_acl_set); DX_NIF(nif_acl_get); DX_NIF(nif_acl_check); DX_NIF(nif_acl_filter); DX_NIF(nif_acl_rules); DX_NIF(nif_acl_validate);
DX_NIF(nif_session_set_rate);
DX_NIF(nif_session_get_rate);
DX_NIF(nif_session_take);
DX_NIF(nif_sched_stats); DX_NIF(nif_rawbuf_debug);
DX_NIF(nif_cache_get); DX_NIF(nif_cache_get_value); DX_NIF(nif_cache_arm); DX_NIF(nif_cache_take_ref);
DX_NIF(nif_cache_clock); DX_NIF(nif_cache_gen); DX_NIF(nif_cache_hits); DX_NIF(nif_cache_config); DX_NIF(nif_cache_info);
/* replication fast path (repl_nif.c; the set itself in store_nif.c) */
DX_NIF(nif_repl_link_open); DX_NIF(nif_repl_link_id); DX_NIF(nif_repl_drain); DX_NIF(nif_repl_publish);
DX_NIF(nif_repl_unsettle); DX_NIF(nif_repl_forget); DX_NIF(nif_repl_info); DX_NIF(nif_repl_announced);
DX_NIF(nif_repl_stats); DX_NIF(nif_repl_set); DX_NIF(nif_repl_push);
int dx_set_plain_big(ErlNifEnv *env, ERL_NIF_TERM value);
ERL_NIF_TERM dx_set_plain(ErlNifEnv *env, ERL_NIF_TERM sidt, ERL_NIF_TERM keyt, ERL_NIF_TERM valt, dx_notify_ctx *nc);
/* optimizer kernels (opt_nif.c) */
DX_NIF(nif_opt_ask);
#endif
