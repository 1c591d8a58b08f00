/* Metrics: per-series resources around the pure C sketches (core/sketch.c). */
#ifndef DX_METRICS_NIF_H
#define DX_METRICS_NIF_H
#include <erl_nif.h>

/* Opens the resource types and makes the atoms; 0 ok, -1 on failure. */
int dx_metrics_init(ErlNifEnv *env);

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
    {"metrics_now", 0, nif_metrics_now, 0}
#endif
