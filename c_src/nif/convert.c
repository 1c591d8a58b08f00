#include "convert.h"
#include <math.h>
#include <string.h>

ERL_NIF_TERM dx_make_bin(ErlNifEnv *env, const char *p, size_t len) {
    ERL_NIF_TERM t;
    unsigned char *d = enif_make_new_binary(env, len, &t);
    if (len) memcpy(d, p, len);
    return t;
}

/* OTP 25 hands atom text out as Latin-1; only ASCII is the same in UTF-8. */
static int ascii(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] >= 0x80) return 0;
    return 1;
}

int dx_get_name(ErlNifEnv *env, ERL_NIF_TERM t, dx_str *out, char *buf, size_t buflen) {
    ErlNifBinary b;
    if (enif_inspect_binary(env, t, &b)) {
        *out = (dx_str){(const char *)b.data, b.size};
        return 1;
    }
    int n = enif_get_atom(env, t, buf, (unsigned)buflen, ERL_NIF_LATIN1);
    if (n > 0 && ascii(buf, (size_t)n - 1)) {
        *out = (dx_str){buf, (size_t)n - 1};
        return 1;
    }
    return 0;
}

static double bignum_to_double(ErlNifEnv *env, ERL_NIF_TERM t);

/* 1: a number (any integer, as the nearest double, as for float variables),
 * 2: an integer too large for a double, 0: not a number. */
static int get_number(ErlNifEnv *env, ERL_NIF_TERM t, double *d) {
    ErlNifSInt64 i;
    if (enif_get_double(env, t, d)) return 1;
    if (enif_get_int64(env, t, &i)) { *d = (double)i; return 1; }
    if (enif_is_number(env, t)) {
        *d = bignum_to_double(env, t);
        return isfinite(*d) ? 1 : 2;
    }
    if (enif_is_identical(t, ATOM_nan)) { *d = NAN; return 1; }
    if (enif_is_identical(t, ATOM_infinity)) { *d = INFINITY; return 1; }
    if (enif_is_identical(t, ATOM_neg_infinity)) { *d = -INFINITY; return 1; }
    return 0;
}

int dx_list_longer_than(ErlNifEnv *env, ERL_NIF_TERM t, size_t limit) {
    ERL_NIF_TERM h;
    size_t n = 0;
    while (enif_get_list_cell(env, t, &h, &t))
        if (++n > limit) return 1;
    return 0;
}

static const char *describe(ErlNifEnv *env, ERL_NIF_TERM t) {
    switch (enif_term_type(env, t)) {
    case ERL_NIF_TERM_TYPE_ATOM: return "an atom";
    case ERL_NIF_TERM_TYPE_BITSTRING: return "a bitstring";
    case ERL_NIF_TERM_TYPE_FUN: return "a fun";
    case ERL_NIF_TERM_TYPE_LIST: return "a list";
    case ERL_NIF_TERM_TYPE_MAP: return "a map";
    case ERL_NIF_TERM_TYPE_PID: return "a pid";
    case ERL_NIF_TERM_TYPE_PORT: return "a port";
    case ERL_NIF_TERM_TYPE_REFERENCE: return "a reference";
    case ERL_NIF_TERM_TYPE_TUPLE: return "a tuple";
    default: return "an unsupported term";
    }
}

/* Heap blocks behind dx_rawbufs: counted, and failed on demand by a test hook
 * (dx_rawbuf_debug), so the tests can prove that no path leaks them. */
static _Atomic long g_raw_live, g_raw_fail_nth;

static void *raw_alloc(size_t n) {
    if (atomic_load_explicit(&g_raw_fail_nth, memory_order_relaxed) > 0 && atomic_fetch_sub(&g_raw_fail_nth, 1) == 1)
        return NULL;
    void *p = enif_alloc(n);
    if (p) atomic_fetch_add_explicit(&g_raw_live, 1, memory_order_relaxed);
    return p;
}

static void raw_free(void *p) {
    if (!p) return;
    enif_free(p);
    atomic_fetch_sub_explicit(&g_raw_live, 1, memory_order_relaxed);
}

long dx_rawbuf_debug(long fail_nth) {
    if (fail_nth >= 0) atomic_store(&g_raw_fail_nth, fail_nth);
    return atomic_load(&g_raw_live);
}

/* A list of numbers into doubles; 0 ok, 1 not all numbers, -1 nomem, 2 too big,
 * 3 an integer beyond the double range. */
static int get_numlist(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b, size_t max_bytes, double **out, size_t *n) {
    unsigned len;
    if (!enif_get_list_length(env, t, &len)) return 1;
    if ((size_t)len * sizeof(double) > max_bytes) return 2;
    double *d = b->nums_stack;
    if (len > DX_STACK_NUMS) {
        if (b->nums_heap) return 1; /* only one big list per input */
        d = b->nums_heap = raw_alloc(len * sizeof(double));
        if (!d) return -1;
    }
    ERL_NIF_TERM h;
    for (unsigned i = 0; enif_get_list_cell(env, t, &h, &t); i++) {
        int k = get_number(env, h, &d[i]);
        if (k != 1) return k ? 3 : 1;
    }
    *out = d;
    *n = len;
    return 0;
}

/* A list of strings (binaries or atoms) for constraint lists. */
static int get_strlist(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b) {
    unsigned len;
    if (!enif_get_list_length(env, t, &len) || len == 0) return 1;
    dx_str *s = b->strs_stack;
    if (len > DX_STACK_STRS) {
        s = b->strs_heap = raw_alloc(len * sizeof(dx_str));
        if (!s) return -1;
    }
    /* Atom texts need storage that outlives this call: one block sized generously. */
    size_t atom_bytes = 0;
    ERL_NIF_TERM h, l = t;
    while (enif_get_list_cell(env, l, &h, &l)) {
        unsigned alen;
        if (enif_get_atom_length(env, h, &alen, ERL_NIF_LATIN1)) atom_bytes += (size_t)alen * 2 + 1;
    }
    char *abuf = NULL;
    if (atom_bytes) {
        abuf = b->atoms_heap = raw_alloc(atom_bytes);
        if (!abuf) return -1;
    }
    for (unsigned i = 0; enif_get_list_cell(env, t, &h, &t); i++) {
        ErlNifBinary bin;
        if (enif_inspect_binary(env, h, &bin)) {
            s[i] = (dx_str){(const char *)bin.data, bin.size};
        } else {
            int n = enif_get_atom(env, h, abuf, (unsigned)atom_bytes, ERL_NIF_LATIN1);
            if (n <= 0 || !ascii(abuf, (size_t)n - 1)) return 1;
            s[i] = (dx_str){abuf, (size_t)n - 1};
            abuf += n;
            atom_bytes -= (size_t)n;
        }
    }
    b->raw.kind = DX_RAW_STRLIST;
    b->raw.strs = s;
    b->raw.nstrs = len;
    return 0;
}

static int map_get2(ErlNifEnv *env, ERL_NIF_TERM m, ERL_NIF_TERM atom, const char *name, ERL_NIF_TERM *v) {
    if (enif_get_map_value(env, m, atom, v)) return 1;
    ERL_NIF_TERM k;
    size_t n = strlen(name);
    memcpy(enif_make_new_binary(env, n, &k), name, n);
    return enif_get_map_value(env, m, k, v);
}

/* A bignum as the nearest double (inf when beyond the double range), read from
 * its external format (little-endian base-256 magnitude). */
static double bignum_to_double(ErlNifEnv *env, ERL_NIF_TERM t) {
    ErlNifBinary ext;
    double d = INFINITY;
    if (!enif_term_to_binary(env, t, &ext)) return d;
    const unsigned char *p = ext.data;
    size_t n = 0, off = 0;
    if (ext.size >= 4 && p[1] == 110) { n = p[2]; off = 3; }            /* SMALL_BIG_EXT */
    else if (ext.size >= 7 && p[1] == 111) {                            /* LARGE_BIG_EXT */
        n = ((size_t)p[2] << 24) | ((size_t)p[3] << 16) | ((size_t)p[4] << 8) | p[5];
        off = 6;
    }
    if (off && off + 1 + n <= ext.size && n > 0) {
        int neg = p[off];
        const unsigned char *dig = p + off + 1; /* little-endian base-256 digits */
        d = dx_bigmag_to_double(dig, n);
        if (neg) d = -d;
    }
    enif_release_binary(&ext);
    return d;
}

static int term_to_raw(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b, size_t max_bytes);

int dx_term_to_raw(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b, size_t max_bytes) {
    int rc = term_to_raw(env, t, b, max_bytes);
    if (rc) dx_rawbuf_free(b); /* a failed conversion leaves nothing to free */
    return rc;
}

static int term_to_raw(ErlNifEnv *env, ERL_NIF_TERM t, dx_rawbuf *b, size_t max_bytes) {
    memset(&b->raw, 0, sizeof b->raw);
    b->too_big = 0;
    b->nums_heap = NULL;
    b->strs_heap = NULL;
    b->atoms_heap = NULL;
    dx_raw *r = &b->raw;
    ErlNifSInt64 i;
    ErlNifBinary bin;
    r->kind = DX_RAW_OTHER;
    if (enif_get_int64(env, t, &i)) { r->kind = DX_RAW_INT; r->i = i; return 0; }
    if (enif_get_double(env, t, &r->f)) { r->kind = DX_RAW_FLOAT; return 0; }
    if (enif_is_number(env, t)) {
        r->kind = DX_RAW_BIGINT;
        r->f = bignum_to_double(env, t);
        return 0;
    }
    if (enif_is_atom(env, t)) {
        /* Atom text is accepted where a string is expected (string, choice,
         * module), also for atoms that mean something else elsewhere. */
        int n = enif_get_atom(env, t, b->atom_text, sizeof b->atom_text, ERL_NIF_LATIN1);
        if (n > 0 && ascii(b->atom_text, (size_t)n - 1)) {
            r->atom = true;
            r->s = (dx_str){b->atom_text, (size_t)n - 1};
        }
        r->desc = "an atom";
    }
    if (enif_is_identical(t, ATOM_true) || enif_is_identical(t, ATOM_false)) {
        r->kind = DX_RAW_BOOL;
        r->b = enif_is_identical(t, ATOM_true);
        return 0;
    }
    if (get_number(env, t, &r->f)) { r->kind = DX_RAW_FLOAT; return 0; }
    if (enif_inspect_binary(env, t, &bin)) {
        if (bin.size > max_bytes) { b->too_big = 1; return 0; }
        r->kind = DX_RAW_BYTES;
        r->s = (dx_str){(const char *)bin.data, bin.size};
        return 0;
    }
    if (enif_is_atom(env, t)) return 0;
    if (enif_is_list(env, t)) {
        double *d;
        size_t n;
        int rc = get_numlist(env, t, b, max_bytes, &d, &n);
        if (rc == -1) return -1;
        if (rc == 2) { b->too_big = 1; return 0; }
        if (rc == 0) {
            r->kind = DX_RAW_NUMLIST;
            r->nums = d;
            r->n = n;
            return 0;
        }
        if (rc == 3) {
            r->desc = "a list containing an integer too large to store as a float";
            return 0;
        }
        rc = get_strlist(env, t, b);
        if (rc == -1) return -1;
        if (rc == 1) r->desc = "a list containing a non-number";
        return 0;
    }
    r->desc = describe(env, t); /* only reached for lists, maps and other kinds */
    if (enif_is_map(env, t)) {
        ERL_NIF_TERM shape, data, h;
        size_t msize;
        enif_get_map_size(env, t, &msize);
        if (msize == 2 && map_get2(env, t, ATOM_shape, "shape", &shape) && map_get2(env, t, ATOM_data, "data", &data)) {
            unsigned nd;
            r->desc = "a tensor map with an invalid shape or data";
            if (!enif_get_list_length(env, shape, &nd) || nd > DX_MAX_TENSOR_DIMS) return 0;
            for (unsigned k = 0; enif_get_list_cell(env, shape, &h, &shape); k++)
                if (!enif_get_int64(env, h, &i)) return 0;
                else b->shape_stack[k] = i;
            double *d;
            size_t n;
            int rc = get_numlist(env, data, b, max_bytes, &d, &n);
            if (rc == -1) return -1;
            if (rc == 2) { b->too_big = 1; return 0; }
            if (rc == 3) r->desc = "a tensor whose data holds an integer too large to store as a float";
            if (rc) return 0;
            r->kind = DX_RAW_TENSOR;
            r->nums = d;
            r->n = n;
            r->shape = b->shape_stack;
            r->ndim = nd;
        }
        return 0;
    }
    return 0;
}

void dx_rawbuf_free(dx_rawbuf *b) {
    raw_free(b->nums_heap);
    raw_free(b->strs_heap);
    raw_free(b->atoms_heap);
    b->nums_heap = NULL;
    b->strs_heap = NULL;
    b->atoms_heap = NULL;
}

static ERL_NIF_TERM make_double(ErlNifEnv *env, double d) {
    if (isnan(d)) return ATOM_nan;
    if (isinf(d)) return d > 0 ? ATOM_infinity : ATOM_neg_infinity;
    return enif_make_double(env, d);
}

static ERL_NIF_TERM make_doubles(ErlNifEnv *env, const double *d, size_t n) {
    ERL_NIF_TERM l = enif_make_list(env, 0);
    for (size_t i = n; i > 0; i--) l = enif_make_list_cell(env, make_double(env, d[i - 1]), l);
    return l;
}

ERL_NIF_TERM dx_value_to_term(ErlNifEnv *env, const dx_value *v) {
    switch (v->type) {
    case DX_T_FLOAT: return make_double(env, v->u.f);
    case DX_T_INTEGER: return enif_make_int64(env, v->u.i);
    case DX_T_BOOLEAN: return v->u.b ? ATOM_true : ATOM_false;
    case DX_T_STRING:
    case DX_T_CHOICE:
    case DX_T_MODULE: return dx_make_bin(env, v->u.s.ptr, v->u.s.len);
    case DX_T_EMBEDDING: return make_doubles(env, v->u.v.data, v->u.v.n);
    case DX_T_TENSOR: {
        ERL_NIF_TERM shape = enif_make_list(env, 0);
        for (size_t i = v->u.v.ndim; i > 0; i--)
            shape = enif_make_list_cell(env, enif_make_int64(env, v->u.v.shape[i - 1]), shape);
        ERL_NIF_TERM keys[2] = {ATOM_shape, ATOM_data};
        ERL_NIF_TERM vals[2] = {shape, make_doubles(env, v->u.v.data, v->u.v.n)};
        ERL_NIF_TERM m;
        enif_make_map_from_arrays(env, keys, vals, 2, &m);
        return m;
    }
    default: return ATOM_undefined;
    }
}

static ERL_NIF_TERM strlist_term(ErlNifEnv *env, const dx_strlist *l) {
    ERL_NIF_TERM r = enif_make_list(env, 0);
    for (size_t i = l->n; i > 0; i--) r = enif_make_list_cell(env, dx_make_bin(env, l->items[i - 1].ptr, l->items[i - 1].len), r);
    return r;
}

ERL_NIF_TERM dx_constraints_to_term(ErlNifEnv *env, dx_type t, const dx_constraints *c) {
    ERL_NIF_TERM keys[10], vals[10], m;
    unsigned n = 0;
    /* emitted in term order of the key atoms (see dx_var_to_term) */
    if (c->flags & DX_C_ALLOWED_MODULES) { keys[n] = ATOM_allowed_modules; vals[n++] = strlist_term(env, &c->allowed_modules); }
    if (c->flags & DX_C_CHOICES) { keys[n] = ATOM_choices; vals[n++] = strlist_term(env, &c->choices); }
    if (c->flags & DX_C_DIMENSIONS) { keys[n] = ATOM_dimensions; vals[n++] = enif_make_uint64(env, c->dimensions); }
    if (c->flags & DX_C_ENUM) { keys[n] = ATOM_enum; vals[n++] = strlist_term(env, &c->enum_values); }
    if (c->flags & DX_C_MAX) { keys[n] = ATOM_max; vals[n++] = t == DX_T_FLOAT ? make_double(env, c->max_f) : enif_make_int64(env, c->max_i); }
    if (c->flags & DX_C_MAX_LENGTH) { keys[n] = ATOM_max_length; vals[n++] = enif_make_uint64(env, c->max_length); }
    if (c->flags & DX_C_MIN) { keys[n] = ATOM_min; vals[n++] = t == DX_T_FLOAT ? make_double(env, c->min_f) : enif_make_int64(env, c->min_i); }
    if (c->flags & DX_C_MIN_LENGTH) { keys[n] = ATOM_min_length; vals[n++] = enif_make_uint64(env, c->min_length); }
    if (c->flags & DX_C_PATTERN) { keys[n] = ATOM_pattern; vals[n++] = dx_make_bin(env, c->pattern, strlen(c->pattern)); }
    if (c->flags & DX_C_SHAPE) {
        ERL_NIF_TERM s = enif_make_list(env, 0);
        for (size_t i = c->ndim; i > 0; i--) s = enif_make_list_cell(env, enif_make_int64(env, c->shape[i - 1]), s);
        keys[n] = ATOM_shape;
        vals[n++] = s;
    }
    if (n == 0) return enif_make_new_map(env);
    enif_make_map_from_arrays(env, keys, vals, n, &m);
    return m;
}

int dx_term_to_constraints(ErlNifEnv *env, ERL_NIF_TERM m, dx_type t, dx_constraints *c, char *err, size_t errlen) {
    if (!enif_is_map(env, m)) return -1;
    ErlNifMapIterator it;
    if (!enif_map_iterator_create(env, m, &it, ERL_NIF_MAP_ITERATOR_FIRST)) return -1;
    ERL_NIF_TERM k, v;
    int rc = DX_OK;
    while (rc == DX_OK && enif_map_iterator_get_pair(env, &it, &k, &v)) {
        char kbuf[64];
        dx_str key;
        if (!dx_get_name(env, k, &key, kbuf, sizeof kbuf)) {
            snprintf(err, errlen, "constraint keys must be atoms or strings");
            rc = DX_E_INVALID;
            break;
        }
        dx_rawbuf *b = enif_alloc(sizeof *b);
        if (!b) { rc = DX_E_NOMEM; break; }
        if (dx_term_to_raw(env, v, b, (size_t)1 << 20) < 0) rc = DX_E_NOMEM;
        else if (b->too_big) { snprintf(err, errlen, "constraint value is too large"); rc = DX_E_INVALID; }
        else rc = dx_constraints_add(c, t, key.ptr, key.len, &b->raw, err, errlen);
        dx_rawbuf_free(b);
        enif_free(b);
        enif_map_iterator_next(env, &it);
    }
    enif_map_iterator_destroy(env, &it);
    if (rc == DX_OK) rc = dx_constraints_finish(c, t, err, errlen);
    return rc;
}

ERL_NIF_TERM dx_blob_to_term(ErlNifEnv *env, const uint8_t *p, size_t len, ERL_NIF_TERM dflt) {
    ERL_NIF_TERM t;
    if (!len) return dflt;
    if (!enif_binary_to_term(env, p, len, &t, ERL_NIF_BIN2TERM_SAFE)) return dflt;
    return t;
}

int dx_term_to_blob(ErlNifEnv *env, ERL_NIF_TERM t, ErlNifBinary *out) {
    return enif_term_to_binary(env, t, out) ? 0 : -1;
}

ERL_NIF_TERM dx_type_atom(dx_type t) {
    static ERL_NIF_TERM *const tab[DX_T_COUNT] = {&ATOM_float, &ATOM_integer, &ATOM_string, &ATOM_boolean,
                                                  &ATOM_choice, &ATOM_module, &ATOM_embedding, &ATOM_tensor};
    return t < DX_T_COUNT ? *tab[t] : ATOM_undefined;
}

int dx_term_to_type(ErlNifEnv *env, ERL_NIF_TERM t, dx_type *out) {
    char buf[32];
    dx_str s;
    if (!dx_get_name(env, t, &s, buf, sizeof buf)) return 0;
    return dx_type_parse(s.ptr, s.len, out) == 0;
}

ERL_NIF_TERM dx_var_to_term(ErlNifEnv *env, const dx_var *v, const dx_snap *s) {
    return dx_var_to_term_named(env, v, s, NULL);
}

/* The nine fields of a variable in Erlang term order of their key atoms
 * (constraints, created_at, id, metadata, name, type, updated_at, value,
 * version), so a flatmap of them needs one linear check instead of a sort.
 * name: the caller's own binary when it asked by name (one allocation less).
 * bounds_tuple: numeric bounds as {min_max, Min, Max} (see dx_var_to_flat). */
static void var_fields(ErlNifEnv *env, const dx_var *v, const dx_snap *s, const ERL_NIF_TERM *name, int bounds_tuple,
                       ERL_NIF_TERM f[9]) {
    /* The snapshot is usually a cache miss: start loading it now and build the
     * terms that only need the variable while it arrives. */
    __builtin_prefetch(s);
    ERL_NIF_TERM empty = enif_make_new_map(env); /* immutable: one term serves both fields */
    if (bounds_tuple && v->cons->flags == (DX_C_MIN | DX_C_MAX))
        f[0] = v->type == DX_T_FLOAT
                   ? enif_make_tuple3(env, ATOM_min_max, make_double(env, v->cons->min_f), make_double(env, v->cons->max_f))
                   : enif_make_tuple3(env, ATOM_min_max, enif_make_int64(env, v->cons->min_i),
                                      enif_make_int64(env, v->cons->max_i));
    else
        f[0] = v->cons->flags ? dx_constraints_to_term(env, v->type, v->cons) : empty;
    f[1] = enif_make_int64(env, v->created_at);
    f[2] = dx_make_bin(env, v->id, v->id_len);
    f[4] = name ? *name : dx_make_bin(env, v->name, v->name_len);
    f[5] = dx_type_atom(v->type);
    f[3] = s->meta_len ? dx_blob_to_term(env, s->meta, s->meta_len, empty) : empty;
    f[6] = enif_make_int64(env, s->updated_at);
    f[7] = dx_value_to_term(env, &s->value);
    f[8] = enif_make_uint64(env, s->version);
}

ERL_NIF_TERM dx_var_to_term_named(ErlNifEnv *env, const dx_var *v, const dx_snap *s, const ERL_NIF_TERM *name) {
    ERL_NIF_TERM keys[9] = {ATOM_constraints, ATOM_created_at, ATOM_id, ATOM_metadata, ATOM_name,
                            ATOM_type, ATOM_updated_at, ATOM_value, ATOM_version};
    ERL_NIF_TERM vals[9];
    var_fields(env, v, s, name, 0, vals);
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 9, &m);
    if (v->derived) {
        /* only derived variables carry these keys: plain gets stay as they are */
        dx_blob *e = atomic_load_explicit(&((dx_var *)v)->error, memory_order_acquire);
        enif_make_map_put(env, m, ATOM_derived, ATOM_true, &m);
        enif_make_map_put(env, m, ATOM_error, e ? dx_blob_to_term(env, e->data, e->len, ATOM_undefined) : ATOM_undefined, &m);
    }
    return m;
}

/* The fields of dx_var_to_term as a 10-tuple {var, Constraints, CreatedAt, Id,
 * Metadata, Name, Type, UpdatedAt, Value, Version} for plain variables
 * (Constraints may be {min_max, Min, Max}, the commonest case): the Erlang side
 * makes the map with a literal-key expression, whose key tuple is a shared
 * literal (enif_make_map_from_arrays allocates and sorts one per call). Only
 * for plain variables: derived ones carry two more keys. */
ERL_NIF_TERM dx_var_to_flat(ErlNifEnv *env, const dx_var *v, const dx_snap *s, const ERL_NIF_TERM *name) {
    ERL_NIF_TERM t[10];
    t[0] = ATOM_var;
    var_fields(env, v, s, name, 1, t + 1);
    return enif_make_tuple_from_array(env, t, 10);
}

ERL_NIF_TERM dx_snap_to_term(ErlNifEnv *env, const dx_snap *s) {
    ERL_NIF_TERM keys[5] = {ATOM_changed_by, ATOM_metadata, ATOM_updated_at, ATOM_value, ATOM_version};
    ERL_NIF_TERM vals[5] = {
        dx_blob_to_term(env, s->by, s->by_len, ATOM_undefined),
        dx_blob_to_term(env, s->meta, s->meta_len, enif_make_new_map(env)),
        enif_make_int64(env, s->updated_at),
        dx_value_to_term(env, &s->value),
        enif_make_uint64(env, s->version),
    };
    ERL_NIF_TERM m;
    enif_make_map_from_arrays(env, keys, vals, 5, &m);
    return m;
}
