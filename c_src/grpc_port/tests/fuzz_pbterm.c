/* Fuzz driver of the port's request decoder: protobuf wire bytes -> protobuf-c
 * message -> term (pbterm.c, with the JSON reader for Any bodies and *_json
 * fields) -> external term format and back, then the reverse walker.
 *
 * One input = one request: byte 0 picks the method (its input message type),
 * the rest is that message's wire encoding. Built two ways:
 *   - with clang -fsanitize=fuzzer,address,undefined, LLVMFuzzerTestOneInput is
 *     the libFuzzer entry point (make -C c_src/grpc_port fuzz);
 *   - with -DFUZZ_MAIN (gcc or clang, ASan+UBSan, run by `make test-asan`) a
 *     deterministic driver generates requests from the message descriptors
 *     (every field type, boundary numbers such as INT64_MAX / 10^6 + k, nested
 *     messages, JSON bodies) and mutates their bytes, for DSPEX_FUZZ_ITERS
 *     inputs or DSPEX_FUZZ_SECONDS seconds, whichever ends first.
 * Bad input must only ever fail: any sanitizer report or failed check aborts. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <ei.h>

#include "dterm.h"
#include "dterm_ei.h"
#include "pbterm.h"
#include "snakepit_bridge.pb-c.h"

static const ProtobufCServiceDescriptor *svc = &snakepit__bridge__bridge_service__descriptor;

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "fuzz_pbterm: check failed: %s (line %d)\n", #c, __LINE__); abort(); } } while (0)

/* ETF of a term, then decode and encode again: the same bytes. */
static void etf_roundtrip(const dterm *t) {
    ei_x_buff x, y;
    dterm back;
    if (ei_x_new_with_version(&x)) return;
    if (dt_encode_ei(&x, t) == 0) {
        CHECK(dt_decode_etf((const unsigned char *)x.buff, (size_t)x.index, &back) == 0);
        CHECK(ei_x_new_with_version(&y) == 0);
        CHECK(dt_encode_ei(&y, &back) == 0);
        CHECK(y.index == x.index && memcmp(x.buff, y.buff, (size_t)x.index) == 0);
        ei_x_free(&y);
        dt_free(&back);
    }
    ei_x_free(&x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const ProtobufCMessageDescriptor *d;
    ProtobufCMessage *m, *again;
    dterm t, t2;
    char err[256];
    static int ei_ready;
    if (!ei_ready) { ei_init(); ei_ready = 1; }
    if (size < 1) return 0;
    d = svc->methods[data[0] % svc->n_methods].input;
    m = pb_unpack(d, size - 1, data + 1);
    if (!m) return 0;
    if (pb_to_term(m, &t, err, sizeof err) == 0) {
        etf_roundtrip(&t);
        /* what the walker produced it takes back; packing and reading that
         * again gives a message the walker accepts */
        if (pb_from_term(d, &t, &again, err, sizeof err) == 0) {
            size_t n = protobuf_c_message_get_packed_size(again);
            uint8_t *buf = malloc(n ? n : 1);
            CHECK(buf);
            CHECK(protobuf_c_message_pack(again, buf) == n);
            protobuf_c_message_free_unpacked(again, NULL);
            again = pb_unpack(d, n, buf);
            CHECK(again);
            if (pb_to_term(again, &t2, err, sizeof err) == 0) dt_free(&t2);
            pb_free_unpacked(again);
            free(buf);
        } else {
            CHECK(err[0]);
        }
        dt_free(&t);
    } else {
        CHECK(err[0]);
    }
    pb_free_unpacked(m);
    return 0;
}

#ifdef FUZZ_MAIN
/* ------------------------------------------------------------ generator */

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint64_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

typedef struct { uint8_t *p; size_t n, cap; } wbuf;

static void put(wbuf *b, const void *p, size_t n) {
    if (!n) return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n) cap *= 2;
        b->p = realloc(b->p, cap);
        CHECK(b->p);
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void put_varint(wbuf *b, uint64_t v) {
    uint8_t tmp[10];
    size_t n = 0;
    do {
        tmp[n] = (uint8_t)(v & 0x7f);
        v >>= 7;
        if (v) tmp[n] |= 0x80;
        n++;
    } while (v);
    put(b, tmp, n);
}

/* Numbers at the edges where conversions break, by width: the type limits,
 * and for 64-bit fields also the limits divided by the decimal scales of
 * time units (10^3, 10^6, 10^9); each +-1; sometimes anything. */
static int64_t interesting(int wide) {
    static const int64_t narrow[] = {0, 1, -1, 127, 128, 65535, INT32_MAX, INT32_MIN, 999999999};
    static const int64_t broad[] = {0, 1, -1, INT64_MAX, INT64_MIN, INT32_MAX, 253402300799LL, -62135596800LL};
    static const int64_t scale[] = {1, 1000, 1000000, 1000000000};
    int64_t v;
    if (!below(8)) return (int64_t)rnd();
    if (wide) v = broad[below(sizeof broad / sizeof *broad)] / scale[below(4)];
    else v = narrow[below(sizeof narrow / sizeof *narrow)];
    if (v != INT64_MAX && v != INT64_MIN && (wide || (v != INT32_MAX && v != INT32_MIN))) v += (int64_t)below(3) - 1;
    else v -= (int64_t)below(2) * (v > 0 ? 1 : -1);
    return v;
}

static const char *const json_seeds[] = {
    "0.7", "-3", "\"NaN\"", "\"Infinity\"", "true", "null", "\"text \\u00e9\"", "[1,2.5,-3e7]",
    "{\"shape\":[2,2],\"data\":[1,2,3,4]}", "{\"dtype\":\"float32\",\"shape\":[3]}", "{\"min\":0,\"max\":1}",
    "{\"a\":{\"b\":[[],{}]}}", "1e999", "9223372036854775808", "[[[[[[[[[[1]]]]]]]]]]",
};

static void gen_json(wbuf *b) {
    const char *s = json_seeds[below(sizeof json_seeds / sizeof *json_seeds)];
    size_t n = strlen(s);
    uint8_t tmp[64];
    memcpy(tmp, s, n);
    if (!below(3)) tmp[below(n)] = (uint8_t)rnd(); /* sometimes broken */
    put(b, tmp, n);
}

static void gen_message(wbuf *b, const ProtobufCMessageDescriptor *d, int depth);

static void gen_value(wbuf *b, const ProtobufCFieldDescriptor *f, int depth) {
    int wide = f->type == PROTOBUF_C_TYPE_INT64 || f->type == PROTOBUF_C_TYPE_UINT64 || f->type == PROTOBUF_C_TYPE_SINT64 ||
               f->type == PROTOBUF_C_TYPE_FIXED64 || f->type == PROTOBUF_C_TYPE_SFIXED64 || f->type == PROTOBUF_C_TYPE_DOUBLE;
    int64_t v = interesting(wide);
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_ENUM:
        put_varint(b, (uint64_t)v);
        return;
    case PROTOBUF_C_TYPE_BOOL:
        put_varint(b, below(3));
        return;
    case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SINT64:
        put_varint(b, ((uint64_t)v << 1) ^ (uint64_t)(v >> 63));
        return;
    case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FLOAT: {
        uint32_t u = (uint32_t)v;
        put(b, &u, 4);
        return;
    }
    case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_DOUBLE: {
        uint64_t u = (uint64_t)v;
        put(b, &u, 8);
        return;
    }
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES: {
        wbuf s = {0};
        size_t len = strlen(f->name);
        if (f->type == PROTOBUF_C_TYPE_STRING && len > 5 && !strcmp(f->name + len - 5, "_json")) gen_json(&s);
        else {
            size_t n = below(4) ? below(12) : below(300);
            for (size_t i = 0; i < n; i++) {
                uint8_t c = below(8) ? (uint8_t)('a' + below(26)) : (uint8_t)rnd();
                put(&s, &c, 1);
            }
        }
        put_varint(b, s.n);
        if (s.n) put(b, s.p, s.n);
        free(s.p);
        return;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        wbuf s = {0};
        const ProtobufCMessageDescriptor *sd = f->descriptor;
        if (!strcmp(sd->name, "google.protobuf.Any")) {
            wbuf j = {0};
            static const char *const urls[] = {"type.googleapis.com/snakepit.float", "type.googleapis.com/snakepit.tensor",
                                               "type.googleapis.com/snakepit.embedding.binary", ""};
            const char *u = urls[below(4)];
            put_varint(&s, (1 << 3) | 2);
            put_varint(&s, strlen(u));
            put(&s, u, strlen(u));
            gen_json(&j);
            put_varint(&s, (2 << 3) | 2);
            put_varint(&s, j.n);
            put(&s, j.p, j.n);
            free(j.p);
        } else if (depth < 6) {
            gen_message(&s, sd, depth + 1);
        }
        put_varint(b, s.n);
        if (s.n) put(b, s.p, s.n);
        free(s.p);
        return;
    }
    }
}

static unsigned wire_type(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_FIXED32: case PROTOBUF_C_TYPE_SFIXED32: case PROTOBUF_C_TYPE_FLOAT: return 5;
    case PROTOBUF_C_TYPE_FIXED64: case PROTOBUF_C_TYPE_SFIXED64: case PROTOBUF_C_TYPE_DOUBLE: return 1;
    case PROTOBUF_C_TYPE_STRING: case PROTOBUF_C_TYPE_BYTES: case PROTOBUF_C_TYPE_MESSAGE: return 2;
    default: return 0;
    }
}

static void gen_message(wbuf *b, const ProtobufCMessageDescriptor *d, int depth) {
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        unsigned reps = f->label == PROTOBUF_C_LABEL_REPEATED ? (unsigned)below(4) : (below(4) ? 1 : 0);
        for (unsigned r = 0; r < reps; r++) {
            put_varint(b, ((uint64_t)f->id << 3) | wire_type(f->type));
            gen_value(b, f, depth);
        }
    }
}

/* Byte-level damage: flips, inserts, deletions, duplications, truncation. */
static void mutate(wbuf *b) {
    int k = 1 + (int)below(4);
    while (k--) {
        uint8_t c = (uint8_t)rnd();
        size_t at = below(b->n + 1);
        switch (below(5)) {
        case 0: if (b->n) b->p[below(b->n)] ^= (uint8_t)(1u << below(8)); break;
        case 1: put(b, &c, 1); memmove(b->p + at + 1, b->p + at, b->n - 1 - at); b->p[at] = c; break;
        case 2: if (at < b->n) { size_t n = 1 + below(b->n - at); memmove(b->p + at, b->p + at + n, b->n - at - n); b->n -= n; } break;
        case 3: if (at < b->n) { size_t n = 1 + below(b->n - at < 16 ? b->n - at : 16); uint8_t tmp[16];
                                  memcpy(tmp, b->p + at, n); put(b, tmp, n); } break;
        case 4: b->n = below(b->n + 1); break;
        }
    }
}

int main(void) {
    const char *ei_env = getenv("DSPEX_FUZZ_ITERS"), *sec_env = getenv("DSPEX_FUZZ_SECONDS");
    long iters = ei_env ? atol(ei_env) : 20000, done = 0, decoded = 0;
    double secs = sec_env ? atof(sec_env) : 60;
    time_t start = time(NULL);
    for (; done < iters; done++) {
        wbuf b = {0};
        uint8_t m = (uint8_t)below(svc->n_methods);
        ProtobufCMessage *probe;
        if ((done & 1023) == 0 && difftime(time(NULL), start) > secs) break;
        put(&b, &m, 1);
        gen_message(&b, svc->methods[m].input, 0);
        if (!below(4)) {
            /* mutate the message, never the method byte */
            wbuf body = {0};
            put(&body, b.p + 1, b.n - 1);
            mutate(&body);
            b.n = 1;
            if (body.n) put(&b, body.p, body.n);
            free(body.p);
        }
        probe = protobuf_c_message_unpack(svc->methods[m].input, NULL, b.n - 1, b.p + 1);
        if (probe) { decoded++; protobuf_c_message_free_unpacked(probe, NULL); }
        LLVMFuzzerTestOneInput(b.p, b.n);
        free(b.p);
    }
    printf("fuzz_pbterm: %ld requests over %u methods (%ld decodable) in %.0f s, no failure\n", done,
           svc->n_methods, decoded, difftime(time(NULL), start));
    return 0;
}
#endif
