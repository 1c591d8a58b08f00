#include "pbterm.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z */
#define PB_TS_MIN_SECONDS (-62135596800LL)
#define PB_TS_MAX_SECONDS 253402300799LL

#define MEMBER(T, msg, off) (*(T *)((char *)(msg) + (off)))
#define CMEMBER(T, msg, off) (*(const T *)((const char *)(msg) + (off)))

/* protobuf-c unpacks a string into a NUL-terminated copy and keeps no length,
 * so "a\0b" read as "a". Each of its string copies is one allocation
 * of exactly length + 1 bytes: pb_unpack's allocator records every size in a
 * header before the block, and pb_str_len reads the real length back. */
typedef union { size_t n; max_align_t align; } pb_hdr;

static void *pb_alloc(void *data, size_t size) {
    pb_hdr *h;
    (void)data;
    if (size > SIZE_MAX - sizeof *h || !(h = malloc(sizeof *h + size))) return NULL;
    h->n = size;
    return h + 1;
}

static void pb_dealloc(void *data, void *p) {
    (void)data;
    if (p) free((pb_hdr *)p - 1);
}

static ProtobufCAllocator pb_allocator = {pb_alloc, pb_dealloc, NULL};

ProtobufCMessage *pb_unpack(const ProtobufCMessageDescriptor *d, size_t len, const uint8_t *data) {
    return protobuf_c_message_unpack(d, &pb_allocator, len, data);
}

void pb_free_unpacked(ProtobufCMessage *m) {
    if (m) protobuf_c_message_free_unpacked(m, &pb_allocator);
}

/* The length of string field f's value s in a message from pb_unpack: the
 * shared defaults were not allocated (and hold no NUL), every other string was. */
static size_t pb_str_len(const ProtobufCFieldDescriptor *f, const char *s) {
    if (s == protobuf_c_empty_string || s == f->default_value) return strlen(s);
    return ((const pb_hdr *)s - 1)->n - 1;
}

static int ferr(char *err, size_t errlen, const char *field, const char *what) {
    snprintf(err, errlen, "%s: %s", field, what);
    return -1;
}

static int is_full_name(const ProtobufCMessageDescriptor *d, const char *n) {
    return d && strcmp(d->name, n) == 0;
}

static int is_map_entry(const ProtobufCMessageDescriptor *d) {
    size_t len = strlen(d->short_name);
    return d->n_fields == 2 && len > 5 && strcmp(d->short_name + len - 5, "Entry") == 0 &&
           strcmp(d->fields[0].name, "key") == 0 && strcmp(d->fields[1].name, "value") == 0;
}

static int is_json_field(const ProtobufCFieldDescriptor *f) {
    size_t n = strlen(f->name);
    return f->type == PROTOBUF_C_TYPE_STRING && n > 5 && strcmp(f->name + n - 5, "_json") == 0;
}

static size_t elem_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        return 8;
    case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
    }
    return 0;
}

/* ------------------------------------------------------------ message -> term */

static int msg_to_term(const ProtobufCMessage *m, dterm *t, char *err, size_t errlen);

static int json_to_term(const char *field, const char *s, size_t n, dterm *t, char *err, size_t errlen) {
    const char *jerr;
    if (dt_parse_json(s, n, t, &jerr)) {
        snprintf(err, errlen, "%s: invalid JSON (%s)", field, jerr);
        return -1;
    }
    return 0;
}

static int value_to_term(const ProtobufCFieldDescriptor *f, const void *p, dterm *t, char *err, size_t errlen) {
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        dt_int(t, *(const int32_t *)p); return 0;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        dt_int(t, *(const uint32_t *)p); return 0;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
        dt_int(t, *(const int64_t *)p); return 0;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: {
        uint64_t u = *(const uint64_t *)p;
        if (u > INT64_MAX) dt_float(t, (double)u); else dt_int(t, (int64_t)u);
        return 0;
    }
    case PROTOBUF_C_TYPE_FLOAT: dt_float(t, *(const float *)p); return 0;
    case PROTOBUF_C_TYPE_DOUBLE: dt_float(t, *(const double *)p); return 0;
    case PROTOBUF_C_TYPE_BOOL:
        return dt_atom(t, *(const protobuf_c_boolean *)p ? "true" : "false") ? ferr(err, errlen, f->name, "out of memory") : 0;
    case PROTOBUF_C_TYPE_ENUM: {
        int v = *(const int *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        if (ev) return dt_atom(t, ev->name) ? ferr(err, errlen, f->name, "out of memory") : 0;
        dt_int(t, v);
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;
        size_t n = s ? pb_str_len(f, s) : 0;
        if (!s) s = "";
        /* a reply cannot carry it back (protobuf-c packs C strings), so a
         * string holding a NUL would be cut short or make what it names unreadable */
        if (memchr(s, 0, n)) return ferr(err, errlen, f->name, "string holds a NUL byte");
        if (is_json_field(f)) {
            if (n == 0) return dt_atom(t, "undefined") ? ferr(err, errlen, f->name, "out of memory") : 0;
            return json_to_term(f->name, s, n, t, err, errlen);
        }
        return dt_bin(t, s, n) ? ferr(err, errlen, f->name, "out of memory") : 0;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = p;
        return dt_bin(t, b->data, b->len) ? ferr(err, errlen, f->name, "out of memory") : 0;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sm = *(ProtobufCMessage *const *)p;
        const ProtobufCMessageDescriptor *d = f->descriptor;
        if (!sm) return dt_atom(t, "undefined") ? ferr(err, errlen, f->name, "out of memory") : 0;
        if (is_full_name(d, "google.protobuf.Any")) {
            const char *url = CMEMBER(char *, sm, d->fields[0].offset);
            const ProtobufCBinaryData *body = &CMEMBER(ProtobufCBinaryData, sm, d->fields[1].offset);
            if (strcmp(d->fields[0].name, "type_url") || strcmp(d->fields[1].name, "value"))
                return ferr(err, errlen, f->name, "unexpected Any layout");
            if (url && memchr(url, 0, pb_str_len(&d->fields[0], url)))
                return ferr(err, errlen, f->name, "type_url holds a NUL byte");
            if (dt_map(t, 2)) return ferr(err, errlen, f->name, "out of memory");
            if (dt_atom(&t->u.map.k[0], "type_url") || dt_atom(&t->u.map.k[1], "value") ||
                dt_bin(&t->u.map.v[0], url ? url : "", url ? pb_str_len(&d->fields[0], url) : 0))
                return ferr(err, errlen, f->name, "out of memory");
            if (body->len == 0) return dt_atom(&t->u.map.v[1], "null") ? ferr(err, errlen, f->name, "out of memory") : 0;
            return json_to_term(f->name, (const char *)body->data, body->len, &t->u.map.v[1], err, errlen);
        }
        if (is_full_name(d, "google.protobuf.Timestamp")) {
            int64_t secs = CMEMBER(int64_t, sm, d->fields[0].offset);
            int32_t nanos = CMEMBER(int32_t, sm, d->fields[1].offset);
            /* the range google/protobuf/timestamp.proto allows; inside it the
             * microseconds always fit int64 */
            if (secs < PB_TS_MIN_SECONDS || secs > PB_TS_MAX_SECONDS || nanos < 0 || nanos > 999999999)
                return ferr(err, errlen, f->name, "timestamp out of range");
            dt_int(t, secs * 1000000 + nanos / 1000);
            return 0;
        }
        return msg_to_term(sm, t, err, errlen);
    }
    }
    return ferr(err, errlen, f->name, "unsupported field type");
}

static int field_to_term(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f, dterm *t,
                         char *err, size_t errlen) {
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t n = CMEMBER(size_t, m, f->quantifier_offset), es = elem_size(f->type);
        const char *arr = CMEMBER(char *, m, f->offset);
        if (f->type == PROTOBUF_C_TYPE_MESSAGE && is_map_entry(f->descriptor)) {
            const ProtobufCMessageDescriptor *ed = f->descriptor;
            if (dt_map(t, n)) return ferr(err, errlen, f->name, "out of memory");
            for (size_t i = 0; i < n; i++) {
                const ProtobufCMessage *e = ((ProtobufCMessage *const *)arr)[i];
                if (value_to_term(&ed->fields[0], (const char *)e + ed->fields[0].offset, &t->u.map.k[i], err, errlen) ||
                    value_to_term(&ed->fields[1], (const char *)e + ed->fields[1].offset, &t->u.map.v[i], err, errlen))
                    return -1;
            }
            dt_map_dedupe(t);
            return 0;
        }
        if (dt_seq(t, DT_LIST, n)) return ferr(err, errlen, f->name, "out of memory");
        for (size_t i = 0; i < n; i++)
            if (value_to_term(f, arr + i * es, &t->u.seq.v[i], err, errlen)) return -1;
        return 0;
    }
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset && f->type != PROTOBUF_C_TYPE_MESSAGE &&
        f->type != PROTOBUF_C_TYPE_STRING && !CMEMBER(protobuf_c_boolean, m, f->quantifier_offset))
        return dt_atom(t, "undefined") ? ferr(err, errlen, f->name, "out of memory") : 0;
    return value_to_term(f, (const char *)m + f->offset, t, err, errlen);
}

static int msg_to_term(const ProtobufCMessage *m, dterm *t, char *err, size_t errlen) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    if (dt_map(t, d->n_fields)) return ferr(err, errlen, d->short_name, "out of memory");
    for (unsigned i = 0; i < d->n_fields; i++) {
        if (dt_atom(&t->u.map.k[i], d->fields[i].name)) return ferr(err, errlen, d->short_name, "out of memory");
        if (field_to_term(m, &d->fields[i], &t->u.map.v[i], err, errlen)) return -1;
    }
    return 0;
}

int pb_to_term(const ProtobufCMessage *m, dterm *out, char *err, size_t errlen) {
    dt_int(out, 0);
    if (msg_to_term(m, out, err, errlen)) { dt_free(out); return -1; }
    return 0;
}

/* ------------------------------------------------------------ term -> message */

static int build(const ProtobufCMessageDescriptor *d, const dterm *t, ProtobufCMessage **out, char *err, size_t errlen);

static int get_int(const dterm *t, int64_t lo, int64_t hi, int64_t *v) {
    if (t->kind != DT_INT || t->u.i < lo || t->u.i > hi) return -1;
    *v = t->u.i;
    return 0;
}

static int get_double(const dterm *t, double *v) {
    if (t->kind == DT_FLOAT) { *v = t->u.f; return 0; }
    if (t->kind == DT_INT) { *v = (double)t->u.i; return 0; }
    if (t->kind == DT_BIG) { *v = strtod(t->u.s.p, NULL); return 0; } /* nearest, or +-inf */
    if (dt_is_atom(t, "nan")) { *v = NAN; return 0; }
    if (dt_is_atom(t, "infinity")) { *v = INFINITY; return 0; }
    if (dt_is_atom(t, "neg_infinity")) { *v = -INFINITY; return 0; }
    return -1;
}

static char *dup_str(const dterm *t) {
    char *s;
    if (t->kind != DT_BIN && t->kind != DT_ATOM) return NULL;
    if (memchr(t->u.s.p, 0, t->u.s.n)) return NULL; /* protobuf-c strings are C strings */
    s = malloc(t->u.s.n + 1);
    if (s) { memcpy(s, t->u.s.p, t->u.s.n); s[t->u.s.n] = 0; }
    return s;
}

static char *json_text(const dterm *t, const char **jerr) {
    dt_buf b = {0};
    if (dt_write_json(t, &b, jerr)) { dt_buf_free(&b); return NULL; }
    return b.p;
}

/* Writes one value into storage p (a fresh, default-initialised slot). */
static int term_to_value(const ProtobufCFieldDescriptor *f, const dterm *t, void *p, char *err, size_t errlen) {
    int64_t v;
    double dv;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        if (get_int(t, INT32_MIN, INT32_MAX, &v)) return ferr(err, errlen, f->name, "expected a 32-bit integer");
        *(int32_t *)p = (int32_t)v; return 0;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        if (get_int(t, 0, UINT32_MAX, &v)) return ferr(err, errlen, f->name, "expected an unsigned 32-bit integer");
        *(uint32_t *)p = (uint32_t)v; return 0;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
        if (get_int(t, INT64_MIN, INT64_MAX, &v)) return ferr(err, errlen, f->name, "expected a 64-bit integer");
        *(int64_t *)p = v; return 0;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        if (get_int(t, 0, INT64_MAX, &v)) return ferr(err, errlen, f->name, "expected an unsigned integer");
        *(uint64_t *)p = (uint64_t)v; return 0;
    case PROTOBUF_C_TYPE_FLOAT:
        if (get_double(t, &dv)) return ferr(err, errlen, f->name, "expected a number");
        *(float *)p = (float)dv; return 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        if (get_double(t, &dv)) return ferr(err, errlen, f->name, "expected a number");
        *(double *)p = dv; return 0;
    case PROTOBUF_C_TYPE_BOOL:
        if (dt_is_atom(t, "true")) *(protobuf_c_boolean *)p = 1;
        else if (dt_is_atom(t, "false")) *(protobuf_c_boolean *)p = 0;
        else return ferr(err, errlen, f->name, "expected a boolean");
        return 0;
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumValue *ev = NULL;
        if (t->kind == DT_ATOM) ev = protobuf_c_enum_descriptor_get_value_by_name(f->descriptor, t->u.s.p);
        else if (t->kind == DT_INT && t->u.i >= INT32_MIN && t->u.i <= INT32_MAX)
            ev = protobuf_c_enum_descriptor_get_value(f->descriptor, (int)t->u.i);
        if (!ev) return ferr(err, errlen, f->name, "unknown enum value");
        *(int *)p = ev->value;
        return 0;
    }
    case PROTOBUF_C_TYPE_STRING: {
        char *s;
        if (is_json_field(f)) {
            const char *jerr = NULL;
            if (!(s = json_text(t, &jerr))) return ferr(err, errlen, f->name, jerr ? jerr : "cannot encode JSON");
        } else if (!(s = dup_str(t))) {
            return ferr(err, errlen, f->name, "expected a binary without NUL bytes");
        }
        *(char **)p = s;
        return 0;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        ProtobufCBinaryData *b = p;
        if (t->kind != DT_BIN) return ferr(err, errlen, f->name, "expected a binary");
        b->len = t->u.s.n;
        b->data = malloc(t->u.s.n ? t->u.s.n : 1);
        if (!b->data) return ferr(err, errlen, f->name, "out of memory");
        if (t->u.s.n) memcpy(b->data, t->u.s.p, t->u.s.n);
        return 0;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessageDescriptor *d = f->descriptor;
        ProtobufCMessage *sm;
        if (is_full_name(d, "google.protobuf.Any")) {
            const dterm *url = dt_map_get(t, "type_url"), *val = dt_map_get(t, "value");
            const char *jerr = NULL;
            char *u, *body;
            if (!url || !val) return ferr(err, errlen, f->name, "expected #{type_url, value}");
            if (!(u = dup_str(url))) return ferr(err, errlen, f->name, "bad type_url");
            if (!(body = json_text(val, &jerr))) { free(u); return ferr(err, errlen, f->name, jerr ? jerr : "bad value"); }
            sm = calloc(1, d->sizeof_message);
            if (!sm) { free(u); free(body); return ferr(err, errlen, f->name, "out of memory"); }
            d->message_init(sm);
            MEMBER(char *, sm, d->fields[0].offset) = u;
            MEMBER(ProtobufCBinaryData, sm, d->fields[1].offset).data = (uint8_t *)body;
            MEMBER(ProtobufCBinaryData, sm, d->fields[1].offset).len = strlen(body);
            *(ProtobufCMessage **)p = sm;
            return 0;
        }
        if (is_full_name(d, "google.protobuf.Timestamp")) {
            int64_t us, secs, rem;
            if (get_int(t, INT64_MIN, INT64_MAX, &us)) return ferr(err, errlen, f->name, "expected integer microseconds");
            secs = us / 1000000;
            rem = us % 1000000;
            if (rem < 0) { rem += 1000000; secs--; }
            sm = calloc(1, d->sizeof_message);
            if (!sm) return ferr(err, errlen, f->name, "out of memory");
            d->message_init(sm);
            MEMBER(int64_t, sm, d->fields[0].offset) = secs;
            MEMBER(int32_t, sm, d->fields[1].offset) = (int32_t)(rem * 1000);
            *(ProtobufCMessage **)p = sm;
            return 0;
        }
        if (build(d, t, &sm, err, errlen)) return -1;
        *(ProtobufCMessage **)p = sm;
        return 0;
    }
    }
    return ferr(err, errlen, f->name, "unsupported field type");
}

static int set_field(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f, const dterm *t, char *err, size_t errlen) {
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t es = elem_size(f->type), n;
        char *arr;
        size_t *count = &MEMBER(size_t, m, f->quantifier_offset);
        int map = f->type == PROTOBUF_C_TYPE_MESSAGE && is_map_entry(f->descriptor);
        if (map ? t->kind != DT_MAP : t->kind != DT_LIST)
            return ferr(err, errlen, f->name, map ? "expected a map" : "expected a list");
        n = map ? t->u.map.n : t->u.seq.n;
        if (!n) return 0;
        arr = calloc(n, es);
        if (!arr) return ferr(err, errlen, f->name, "out of memory");
        MEMBER(char *, m, f->offset) = arr;
        *count = 0; /* grows with each complete element, so a failure frees cleanly */
        for (size_t i = 0; i < n; i++) {
            if (map) {
                const ProtobufCMessageDescriptor *ed = f->descriptor;
                ProtobufCMessage *e = calloc(1, ed->sizeof_message);
                if (!e) return ferr(err, errlen, f->name, "out of memory");
                ed->message_init(e);
                ((ProtobufCMessage **)arr)[i] = e;
                (*count)++;
                if (term_to_value(&ed->fields[0], &t->u.map.k[i], (char *)e + ed->fields[0].offset, err, errlen) ||
                    term_to_value(&ed->fields[1], &t->u.map.v[i], (char *)e + ed->fields[1].offset, err, errlen))
                    return -1;
            } else {
                if (term_to_value(f, &t->u.seq.v[i], arr + i * es, err, errlen)) {
                    /* a half-set slot holds nothing that needs freeing */
                    return -1;
                }
                (*count)++;
            }
        }
        return 0;
    }
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset && f->type != PROTOBUF_C_TYPE_MESSAGE &&
        f->type != PROTOBUF_C_TYPE_STRING)
        MEMBER(protobuf_c_boolean, m, f->quantifier_offset) = 1;
    return term_to_value(f, t, (char *)m + f->offset, err, errlen);
}

static int build(const ProtobufCMessageDescriptor *d, const dterm *t, ProtobufCMessage **out, char *err, size_t errlen) {
    ProtobufCMessage *m;
    char name[256];
    unsigned char *seen;
    *out = NULL;
    if (t->kind != DT_MAP) return ferr(err, errlen, d->short_name, "expected a map");
    m = calloc(1, d->sizeof_message);
    seen = calloc(d->n_fields + 1, 1);
    if (!m || !seen) { free(m); free(seen); return ferr(err, errlen, d->short_name, "out of memory"); }
    d->message_init(m);
    for (size_t i = 0; i < t->u.map.n; i++) {
        const dterm *k = &t->u.map.k[i], *v = &t->u.map.v[i];
        const ProtobufCFieldDescriptor *f;
        if ((k->kind != DT_ATOM && k->kind != DT_BIN) || k->u.s.n >= sizeof name) {
            protobuf_c_message_free_unpacked(m, NULL);
            free(seen);
            return ferr(err, errlen, d->short_name, "field names must be atoms");
        }
        memcpy(name, k->u.s.p, k->u.s.n);
        name[k->u.s.n] = 0;
        if (!(f = protobuf_c_message_descriptor_get_field_by_name(d, name))) {
            snprintf(err, errlen, "%s: unknown field %s", d->short_name, name);
            protobuf_c_message_free_unpacked(m, NULL);
            free(seen);
            return -1;
        }
        if (dt_is_atom(v, "undefined")) continue;
        /* the same field named twice (atom and binary key) would leak the first value */
        if (seen[f - d->fields]++ || set_field(m, f, v, err, errlen)) {
            if (seen[f - d->fields] > 1) snprintf(err, errlen, "%s: field %s given twice", d->short_name, name);
            protobuf_c_message_free_unpacked(m, NULL);
            free(seen);
            return -1;
        }
    }
    free(seen);
    *out = m;
    return 0;
}

int pb_from_term(const ProtobufCMessageDescriptor *d, const dterm *t, ProtobufCMessage **out,
                 char *err, size_t errlen) {
    return build(d, t, out, err, errlen);
}
