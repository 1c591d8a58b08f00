/* The event log's NIF layer (issue #15): the store's event hook, the writer's
 * callbacks and the dspex_nif:events_* functions (see events_nif.c). */
#ifndef DX_EVENTS_NIF_H
#define DX_EVENTS_NIF_H
#include "nif.h"

int dx_events_init(ErlNifEnv *env);
void dx_events_unload(void);
/* The principal of the write the calling thread is about to commit (len 0: the
 * owner); recorded by the event hook. Cleared with (dx_str){0}. */
void dx_events_principal(dx_str id);
/* The durability of the write the calling NIF has just committed (see events_nif.c): result, or
 * {event_wait, sync | backpressure, result, Wait} for dspex_events:settle/3. */
ERL_NIF_TERM dx_events_settle(ErlNifEnv *env, ERL_NIF_TERM opts, ERL_NIF_TERM result);
/* The session sequence of the last event the calling thread queued (0: none, or the log is off), cleared. */
uint64_t dx_events_take_pushed(void);
/* 1: the log is off or knows the session's last sequence; 0: its next event would need seeding first. */
int dx_events_known(const char *session, size_t len);

DX_NIF(nif_events_open); DX_NIF(nif_events_close); DX_NIF(nif_events_append); DX_NIF(nif_events_await);
DX_NIF(nif_events_read); DX_NIF(nif_events_stats); DX_NIF(nif_events_put_snapshot);
DX_NIF(nif_events_latest_snapshot); DX_NIF(nif_events_expire); DX_NIF(nif_events_session_seq);
DX_NIF(nif_events_backpressure); DX_NIF(nif_events_seed); DX_NIF(nif_events_append_as);
DX_NIF(nif_events_session_delete); DX_NIF(nif_events_replay); DX_NIF(nif_events_put_snapshots);
ERL_NIF_TERM events_reseed_dirty(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[]);

#define DX_EVENTS_FUNCS                                                              \
    {"events_open", 1, nif_events_open, ERL_NIF_DIRTY_JOB_IO_BOUND},                 \
    {"events_close", 0, nif_events_close, ERL_NIF_DIRTY_JOB_IO_BOUND},               \
    {"events_append", 4, nif_events_append, 0},                                      \
    {"events_await", 0, nif_events_await, 0},                                        \
    {"events_backpressure", 0, nif_events_backpressure, 0},                          \
    {"events_read", 1, nif_events_read, ERL_NIF_DIRTY_JOB_IO_BOUND},                 \
    {"events_replay", 6, nif_events_replay, ERL_NIF_DIRTY_JOB_IO_BOUND},             \
    {"events_replay", 7, nif_events_replay, ERL_NIF_DIRTY_JOB_IO_BOUND},             \
    {"events_stats", 0, nif_events_stats, 0},                                        \
    {"events_put_snapshot", 4, nif_events_put_snapshot, ERL_NIF_DIRTY_JOB_IO_BOUND}, \
    {"events_put_snapshots", 1, nif_events_put_snapshots, ERL_NIF_DIRTY_JOB_IO_BOUND}, \
    {"events_latest_snapshot", 3, nif_events_latest_snapshot, ERL_NIF_DIRTY_JOB_IO_BOUND}, \
    {"events_expire", 4, nif_events_expire, ERL_NIF_DIRTY_JOB_IO_BOUND},             \
    {"events_session_seq", 1, nif_events_session_seq, 0},                            \
    {"events_append", 5, nif_events_append_as, 0},                                   \
    {"events_session_delete", 2, nif_events_session_delete, 0},                      \
    {"events_reseed", 1, events_reseed_dirty, ERL_NIF_DIRTY_JOB_IO_BOUND},           \
    {"events_seed", 1, nif_events_seed, 0}
#endif
