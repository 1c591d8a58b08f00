/* Metrics: per-series resources around the pure C sketches (core/sketch.c). */
#ifndef DX_METRICS_NIF_H
#define DX_METRICS_NIF_H
#include <erl_nif.h>
#include <stdint.h>

/* Opens the resource types and makes the atoms; 0 ok, -1 on failure. */
int dx_metrics_init(ErlNifEnv *env);
/* upgrade: takes the resource types over for the new module instance (the
 * state, atoms and calibration of this library copy are kept). */
int dx_metrics_takeover(ErlNifEnv *env);

#define DX_METRICS_NIF(name) ERL_NIF_TERM name(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
DX_METRICS_NIF(nif_metrics_series_new);
DX_METRICS_NIF(nif_metrics_record);
DX_METRICS_NIF(nif_metrics_query);
DX_METRICS_NIF(nif_metrics_totals);
DX_METRICS_NIF(nif_metrics_series_memory);
DX_METRICS_NIF(nif_metrics_sketch_stats);
DX_METRICS_NIF(nif_metrics_sketch_quantile);
DX_METRICS_NIF(nif_metrics_sketch_to_binary);
DX_METRICS_NIF(nif_metrics_sketch_from_binary);
DX_METRICS_NIF(nif_metrics_sketch_merge);
DX_METRICS_NIF(nif_metrics_now);
DX_METRICS_NIF(nif_metrics_native_bind);
DX_METRICS_NIF(nif_metrics_native_flush);
DX_METRICS_NIF(nif_metrics_dropped);
DX_METRICS_NIF(nif_metrics_set_clock);

/* Native timing of store reads and sets (see metrics_nif.c): a NIF that serves op
 * takes t0 = dx_native_ticks() when dx_native_enabled[op] is set, and calls
 * dx_native_record(op, result, t0) before it returns. */
enum { DX_NATIVE_GET, DX_NATIVE_GET_VALUE, DX_NATIVE_SET, DX_NATIVE_OPS };
enum { DX_NATIVE_OK, DX_NATIVE_MISS, DX_NATIVE_ERROR, DX_NATIVE_RESULTS };
extern _Atomic int dx_native_enabled[DX_NATIVE_OPS];
uint64_t dx_native_ticks(void);
void dx_native_record(int op, int result, uint64_t t0);
void dx_metrics_unload(void);

/* The entries of the function table (spliced into dspex_nif.c's funcs[]). */
#define DX_METRICS_FUNCS                                                          \
    {"metrics_series_new", 1, nif_metrics_series_new, 0},                         \
    {"metrics_record", 3, nif_metrics_record, 0},                                 \
    {"metrics_query", 4, nif_metrics_query, ERL_NIF_DIRTY_JOB_CPU_BOUND},         \
    {"metrics_totals", 1, nif_metrics_totals, 0},                                 \
    {"metrics_series_memory", 1, nif_metrics_series_memory, 0},                   \
    {"metrics_sketch_stats", 1, nif_metrics_sketch_stats, 0},                     \
    {"metrics_sketch_quantile", 2, nif_metrics_sketch_quantile, 0},               \
    {"metrics_sketch_to_binary", 1, nif_metrics_sketch_to_binary, 0},             \
    {"metrics_sketch_from_binary", 1, nif_metrics_sketch_from_binary, ERL_NIF_DIRTY_JOB_CPU_BOUND}, \
    {"metrics_sketch_merge", 1, nif_metrics_sketch_merge, ERL_NIF_DIRTY_JOB_CPU_BOUND}, \
    {"metrics_now", 0, nif_metrics_now, 0},                                       \
    {"metrics_native_bind", 4, nif_metrics_native_bind, 0},                       \
    {"metrics_native_flush", 0, nif_metrics_native_flush, ERL_NIF_DIRTY_JOB_CPU_BOUND}, \
    {"metrics_dropped", 0, nif_metrics_dropped, 0},                               \
    {"metrics_set_clock", 1, nif_metrics_set_clock, 0}
#endif
