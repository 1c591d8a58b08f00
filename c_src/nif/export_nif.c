/* export_session/1 and import_session/1: a session as one plain term (every
 * variable with its version and history), used for backup and migration.
 * Both run on dirty CPU schedulers: a big session takes far more than 1 ms. */
#include "nif.h"
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    ErlNifEnv *env;
    ERL_NIF_TERM list;
    int oom;
} export_ctx;

static ERL_NIF_TERM by_term(ErlNifEnv *env, const dx_snap *s) { return dx_blob_to_term(env, s->by, s->by_len, ATOM_undefined); }

static int export_var(void *ctx, dx_var *v) {
    export_ctx *c = ctx;
    ErlNifEnv *env = c->env;
    dx_snap *cur = dx_var_current(v);
    dx_snap **hist = enif_alloc((v->hist_n ? v->hist_n : 1) * sizeof *hist);
    if (!hist) { c->oom = 1; return 1; }
    size_t n = dx_var_history_locked(v, hist, v->hist_n);
    ERL_NIF_TERM hl = enif_make_list(env, 0);
    for (size_t i = n; i > 0; i--) hl = enif_make_list_cell(env, dx_snap_to_term(env, hist[i - 1]), hl);
    enif_free(hist);
    ERL_NIF_TERM keys[13] = {ATOM_id, ATOM_name, ATOM_type, ATOM_value, ATOM_constraints, ATOM_metadata, ATOM_version,
                             ATOM_created_at, ATOM_updated_at, ATOM_changed_by, ATOM_history_limit, ATOM_history,
                             ATOM_derived};
    ERL_NIF_TERM vals[13] = {dx_make_bin(env, v->id, v->id_len),
                             dx_make_bin(env, v->name, v->name_len),
                             dx_type_atom(v->type),
                             dx_value_to_term(env, &cur->value),
                             dx_constraints_to_term(env, v->type, v->cons),
                             dx_blob_to_term(env, cur->meta, cur->meta_len, enif_make_new_map(env)),
                             enif_make_uint64(env, cur->version),
                             enif_make_int64(env, v->created_at),
                             enif_make_int64(env, cur->updated_at),
                             by_term(env, cur),
                             enif_make_uint64(env, v->history_limit),
                             hl,
                             v->derived ? ATOM_true : ATOM_false};
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 13, &m);
    c->list = enif_make_list_cell(env, m, c->list);
    return 0;
}

DX_NIF(nif_export_session) {
    ErlNifBinary sid;
    if (!enif_inspect_binary(env, argv[0], &sid)) return enif_make_badarg(env);
    dx_ebr_enter();
    dx_session *s = dx_session_find((dx_str){(const char *)sid.data, sid.size}, dx_now_ms());
    if (!s) {
        dx_ebr_exit();
        return dx_error(env, ATOM_session_not_found);
    }
    export_ctx c = {env, enif_make_list(env, 0), 0};
    /* All shards held: the export is one consistent cut of the session. */
    dx_session_lock_all(s);
    size_t n = 0;
    dx_var **vars = dx_session_vars_sorted(s, &n);
    if (!vars && n) c.oom = 1;
    /* built back to front so the list comes out sorted by name */
    for (size_t i = n; vars && i > 0 && !c.oom; i--) export_var(&c, vars[i - 1]);
    free(vars);
    dx_session_unlock_all(s);
    ERL_NIF_TERM keys[6] = {ATOM_format, ATOM_id, ATOM_metadata, ATOM_ttl, ATOM_created_at, ATOM_variables};
    ERL_NIF_TERM vals[6] = {ATOM_dspex_session_v1, dx_make_bin(env, s->id, s->id_len),
                            dx_blob_to_term(env, s->meta, s->meta_len, enif_make_new_map(env)),
                            s->ttl_ms < 0 ? ATOM_infinity : enif_make_int64(env, s->ttl_ms / 1000),
                            enif_make_int64(env, s->created_at), c.list};
    dx_ebr_exit();
    if (c.oom) return dx_error(env, ATOM_enomem);
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 6, &m);
    return enif_make_tuple2(env, ATOM_ok, m);
}

/* ---- import -------------------------------------------------------------------- */

typedef struct {
    ErlNifEnv *env;
    char err[DX_ERRLEN];
} imp;

static ERL_NIF_TERM invalid(ErlNifEnv *env, const char *msg) {
    return dx_error_msg(env, ATOM_invalid_export, msg);
}

static int get_i64(ErlNifEnv *env, ERL_NIF_TERM m, ERL_NIF_TERM k, int64_t *out) {
    ERL_NIF_TERM v;
    ErlNifSInt64 i;
    if (!enif_get_map_value(env, m, k, &v) || !enif_get_int64(env, v, &i)) return 0;
    *out = i;
    return 1;
}

static int get_blob(ErlNifEnv *env, ERL_NIF_TERM m, ERL_NIF_TERM k, int must_be_map, ErlNifBinary *b, int *have) {
    ERL_NIF_TERM v;
    *have = 0;
    if (!enif_get_map_value(env, m, k, &v)) return !must_be_map;
    if (must_be_map) {
        size_t sz;
        if (!enif_get_map_size(env, v, &sz)) return 0;
        if (sz == 0) return 1;
    } else if (enif_is_identical(v, ATOM_undefined)) {
        return 1;
    }
    if (dx_term_to_blob(env, v, b)) return 0;
    *have = 1;
    return 1;
}

/* Converts and validates one value against the variable's type and constraints. */
static int import_value(ErlNifEnv *env, dx_type t, const dx_constraints *c, ERL_NIF_TERM term, dx_rawbuf *b, dx_value *out,
                        char *err) {
    if (dx_term_to_raw(env, term, b, dx_store_limits().max_value_bytes)) {
        snprintf(err, DX_ERRLEN, "out of memory");
        return -1;
    }
    if (b->too_big) {
        snprintf(err, DX_ERRLEN, "a value exceeds the value size limit");
        return -1;
    }
    return dx_value_check(t, c, &b->raw, out, err, DX_ERRLEN) ? -1 : 0;
}

/* Adds one exported variable to the detached session. NULL or an error term. */
static ERL_NIF_TERM import_var(ErlNifEnv *env, dx_session *s, ERL_NIF_TERM m) {
    ERL_NIF_TERM t, hlist, h;
    ErlNifBinary idb, nameb;
    dx_type type;
    ErlNifUInt64 version, hlimit;
    int64_t created, updated;
    char err[DX_ERRLEN] = "";
    if (!enif_is_map(env, m) || !enif_get_map_value(env, m, ATOM_id, &t) || !enif_inspect_binary(env, t, &idb) ||
        !enif_get_map_value(env, m, ATOM_name, &t) || !enif_inspect_binary(env, t, &nameb) ||
        !enif_get_map_value(env, m, ATOM_type, &t) || !dx_term_to_type(env, t, &type) ||
        !enif_get_map_value(env, m, ATOM_version, &t) || !enif_get_uint64(env, t, &version) ||
        !enif_get_map_value(env, m, ATOM_history_limit, &t) || !enif_get_uint64(env, t, &hlimit) ||
        !get_i64(env, m, ATOM_created_at, &created) || !get_i64(env, m, ATOM_updated_at, &updated) ||
        !enif_get_map_value(env, m, ATOM_history, &hlist) || !enif_is_list(env, hlist))
        return invalid(env, "a variable entry lacks id, name, type, version, history_limit, created_at, updated_at or history");
    dx_constraints cons;
    dx_constraints_init(&cons);
    ERL_NIF_TERM ct = enif_make_new_map(env);
    enif_get_map_value(env, m, ATOM_constraints, &ct);
    int rc = dx_term_to_constraints(env, ct, type, &cons, err, sizeof err);
    if (rc) {
        dx_constraints_free(&cons);
        return invalid(env, rc < 0 ? "constraints must be a map" : err);
    }
    unsigned nh = 0;
    if (!enif_get_list_length(env, hlist, &nh)) {
        /* an improper list: never walk cells the buffers were not sized for */
        dx_constraints_free(&cons);
        return invalid(env, "history must be a proper list");
    }
    dx_rawbuf *bufs = enif_alloc((nh + 1) * sizeof *bufs);
    dx_import_hist *hist = enif_alloc((nh ? nh : 1) * sizeof *hist);
    ErlNifBinary *blobs = enif_alloc((2 * nh + 2) * sizeof *blobs);
    int *have = enif_alloc((2 * nh + 2) * sizeof(int));
    size_t nbufs = 0, nblobs = 0;
    ERL_NIF_TERM r = 0;
    if (!bufs || !hist || !blobs || !have) {
        r = dx_error(env, ATOM_enomem);
        goto out;
    }
    memset(have, 0, (2 * nh + 2) * sizeof(int));
    dx_value val;
    if (!enif_get_map_value(env, m, ATOM_value, &t) || import_value(env, type, &cons, t, &bufs[nbufs++], &val, err)) {
        r = invalid(env, err[0] ? err : "a variable entry lacks its value");
        goto out;
    }
    if (!get_blob(env, m, ATOM_metadata, 1, &blobs[0], &have[0]) || !get_blob(env, m, ATOM_changed_by, 0, &blobs[1], &have[1])) {
        r = invalid(env, "metadata must be a map");
        goto out;
    }
    nblobs = 2;
    uint64_t prev = 0;
    for (unsigned i = 0; enif_get_list_cell(env, hlist, &h, &hlist); i++) {
        ErlNifUInt64 hv;
        int64_t hu;
        if (!enif_is_map(env, h) || !enif_get_map_value(env, h, ATOM_version, &t) || !enif_get_uint64(env, t, &hv) ||
            !get_i64(env, h, ATOM_updated_at, &hu) || !enif_get_map_value(env, h, ATOM_value, &t)) {
            r = invalid(env, "a history entry lacks version, value or updated_at");
            goto out;
        }
        if ((i > 0 && hv <= prev) || hv >= version) {
            r = invalid(env, "history versions must increase and stay below the current version");
            goto out;
        }
        prev = hv;
        if (import_value(env, type, &cons, t, &bufs[nbufs++], &hist[i].value, err)) {
            r = invalid(env, err);
            goto out;
        }
        if (!get_blob(env, h, ATOM_metadata, 1, &blobs[nblobs], &have[nblobs]) ||
            !get_blob(env, h, ATOM_changed_by, 0, &blobs[nblobs + 1], &have[nblobs + 1])) {
            nblobs += 2;
            r = invalid(env, "history metadata must be a map");
            goto out;
        }
        hist[i].version = hv;
        hist[i].updated_at = hu;
        hist[i].meta = have[nblobs] ? blobs[nblobs].data : NULL;
        hist[i].meta_len = have[nblobs] ? blobs[nblobs].size : 0;
        hist[i].by = have[nblobs + 1] ? blobs[nblobs + 1].data : NULL;
        hist[i].by_len = have[nblobs + 1] ? blobs[nblobs + 1].size : 0;
        nblobs += 2;
    }
    dx_str name = {(const char *)nameb.data, nameb.size}, id = {(const char *)idb.data, idb.size};
    /* ids are what register makes: dx_var_find resolves an id through its name */
    if (name.len && name.len <= dx_store_limits().max_name_len && !dx_var_id_valid(name, id)) {
        r = invalid(env, "a variable id must be var_<name>_<digits>");
        goto out;
    }
    if (version > DX_VERSION_MAX) {
        r = invalid(env, "a version must be below 2^63");
        goto out;
    }
    ERL_NIF_TERM dv;
    bool derived = enif_get_map_value(env, m, ATOM_derived, &dv) && enif_is_identical(dv, ATOM_true);
    dx_import_var iv = {
        .id = id,
        .spec = {name, type, &cons, &val, have[0] ? blobs[0].data : NULL,
                 have[0] ? blobs[0].size : 0, have[1] ? blobs[1].data : NULL, have[1] ? blobs[1].size : 0,
                 /* past uint32 is past every max_history (never cast to a negative "default") */
                 hlimit > UINT32_MAX ? (int64_t)UINT32_MAX + 1 : (int64_t)hlimit, derived},
        .version = version,
        .created_at = created,
        .updated_at = updated,
    };
    int limit = 0;
    rc = dx_import_var_add(s, &iv, hist, nh, &limit);
    if (rc == DX_E_EXISTS) r = invalid(env, "two variables share a name");
    else if (rc == DX_E_INVALID) r = invalid(env, "a variable id or version the store cannot hold");
    else if (rc) r = dx_rc_error(env, rc, ATOM_undefined, 0, limit, NULL);
out:
    for (size_t i = 0; i < nbufs; i++) dx_rawbuf_free(&bufs[i]);
    for (size_t i = 0; have && i < nblobs; i++)
        if (have[i]) enif_release_binary(&blobs[i]);
    if (bufs) enif_free(bufs);
    if (hist) enif_free(hist);
    if (blobs) enif_free(blobs);
    if (have) enif_free(have);
    dx_constraints_free(&cons);
    return r;
}

DX_NIF(nif_import_session) {
    ERL_NIF_TERM m = argv[0], t, vars, h;
    ErlNifBinary idb, meta = {0};
    int64_t created, ttl = -1;
    if (!enif_is_map(env, m)) return enif_make_badarg(env);
    if (!enif_get_map_value(env, m, ATOM_format, &t) || !enif_is_identical(t, ATOM_dspex_session_v1))
        return invalid(env, "format must be dspex_session_v1");
    if (!enif_get_map_value(env, m, ATOM_id, &t) || !enif_inspect_binary(env, t, &idb) ||
        !get_i64(env, m, ATOM_created_at, &created) || !enif_get_map_value(env, m, ATOM_variables, &vars) ||
        !enif_is_list(env, vars) || !enif_get_map_value(env, m, ATOM_ttl, &t))
        return invalid(env, "the export lacks id, created_at, ttl or variables");
    if (!enif_is_identical(t, ATOM_infinity)) {
        ErlNifSInt64 tt;
        if (!enif_get_int64(env, t, &tt) || tt < 0 || tt >= (1LL << 40)) return invalid(env, "ttl must be seconds or infinity");
        ttl = tt * 1000;
    }
    /* the id checks of create_session, with its errors */
    int limit = 0;
    int crc = dx_session_id_check((dx_str){(const char *)idb.data, idb.size}, &limit);
    if (crc) return dx_rc_error(env, crc, ATOM_undefined, 0, limit, NULL);
    int have_meta = 0;
    if (!get_blob(env, m, ATOM_metadata, 1, &meta, &have_meta)) return invalid(env, "metadata must be a map");
    dx_session *s = dx_import_begin((dx_str){(const char *)idb.data, idb.size}, have_meta ? meta.data : NULL,
                                    have_meta ? meta.size : 0, ttl, created, dx_now_ms());
    if (have_meta) enif_release_binary(&meta);
    if (!s) return dx_error(env, ATOM_enomem);
    unsigned nvars;
    if (!enif_get_list_length(env, vars, &nvars)) {
        dx_import_abort(s);
        return invalid(env, "variables must be a proper list");
    }
    while (enif_get_list_cell(env, vars, &h, &vars)) {
        ERL_NIF_TERM e = import_var(env, s, h);
        if (e) {
            dx_import_abort(s);
            return e;
        }
    }
    int rc = dx_import_commit(s, &limit);
    if (rc == DX_E_EXISTS) return dx_error2(env, ATOM_already_exists, argv[0] == 0 ? ATOM_undefined : dx_make_bin(env, (const char *)idb.data, idb.size));
    if (rc) return dx_rc_error(env, rc, ATOM_undefined, 0, limit, NULL);
    return ATOM_ok;
}
