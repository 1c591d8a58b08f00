/* Shared declarations of the NIF layer. */
#ifndef DX_NIF_H
#define DX_NIF_H
#include "convert.h"
#include "ebr.h"
#include "store.h"

extern ErlNifResourceType *dx_watch_type;
int dx_watch_init(ErlNifEnv *env);
void dx_watch_release(void *w);
/* Sends a watch message to every active watcher of v (under its shard mutex). */
void dx_watch_notify(void *ctx, dx_session *s, dx_var *v, const dx_snap *old, const dx_snap *cur);

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

#define DX_NIF(name) ERL_NIF_TERM name(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
DX_NIF(nif_session_create); DX_NIF(nif_session_get); DX_NIF(nif_session_list); DX_NIF(nif_session_touch);
DX_NIF(nif_session_delete); DX_NIF(nif_sweep); DX_NIF(nif_reclaim); DX_NIF(nif_advance_clock);
DX_NIF(nif_set_limits); DX_NIF(nif_get_limits); DX_NIF(nif_stats);
DX_NIF(nif_var_register); DX_NIF(nif_var_get); DX_NIF(nif_var_get_value); DX_NIF(nif_var_exists);
DX_NIF(nif_var_get_here); DX_NIF(nif_var_get_value_here); DX_NIF(nif_var_set_here); DX_NIF(nif_store_fast_path);
DX_NIF(nif_var_set); DX_NIF(nif_var_delete); DX_NIF(nif_var_list); DX_NIF(nif_var_get_many);
DX_NIF(nif_var_set_many); DX_NIF(nif_var_history); DX_NIF(nif_var_rollback);
DX_NIF(nif_watch); DX_NIF(nif_var_info); DX_NIF(nif_unwatch);
DX_NIF(nif_export_session); DX_NIF(nif_import_session);
DX_NIF(nif_graph_add); DX_NIF(nif_graph_remove); DX_NIF(nif_graph_query); DX_NIF(nif_graph_clear);
DX_NIF(nif_graph_edges); DX_NIF(nif_var_set_error); DX_NIF(nif_var_lock); DX_NIF(nif_var_unlock);
DX_NIF(nif_lock_token_floor);
DX_NIF(nif_acl_set); DX_NIF(nif_acl_get); DX_NIF(nif_acl_check); DX_NIF(nif_acl_filter); DX_NIF(nif_acl_validate);
DX_NIF(nif_session_set_rate);
/* optimizer kernels (opt_nif.c) */
DX_NIF(nif_opt_ask);
#endif
