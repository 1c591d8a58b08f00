/* cmocka tests of the port's pure cores: the JSON reader/writer, the bounded
 * external-term decoder, the ei encoder round trip and the protobuf walker.
 * The random-input tests feed mutated and random bytes to both decoders
 * (DSPEX_FUZZ_ITERS iterations, default 20000); under ASan/valgrind they prove
 * that bad input only ever fails. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dterm.h"
#include "dterm_ei.h"
#include "pbterm.h"
#include "snakepit_bridge.pb-c.h"

static int parse(const char *s, dterm *t) {
    const char *err = NULL;
    return dt_parse_json(s, strlen(s), t, &err);
}

static char *roundtrip(const char *s) {
    dterm t;
    dt_buf b = {0};
    const char *err = NULL;
    if (parse(s, &t)) return NULL;
    if (dt_write_json(&t, &b, &err)) { dt_free(&t); return NULL; }
    dt_free(&t);
    return b.p;
}

static void json_scalars(void **state) {
    dterm t;
    (void)state;
    assert_int_equal(parse("42", &t), 0);
    assert_int_equal(t.kind, DT_INT);
    assert_int_equal(t.u.i, 42);
    assert_int_equal(parse(" -9223372036854775808 ", &t), 0);
    assert_true(t.u.i == INT64_MIN);
    assert_int_equal(parse("9223372036854775808", &t), 0); /* beyond int64: exact, never a float */
    assert_int_equal(t.kind, DT_BIG);
    assert_string_equal(t.u.s.p, "9223372036854775808");
    dt_free(&t);
    assert_int_equal(parse("0.5e1", &t), 0);
    assert_int_equal(t.kind, DT_FLOAT);
    assert_true(t.u.f == 5.0);
    assert_int_equal(parse("1e999", &t), 0);
    assert_true(dt_is_atom(&t, "infinity"));
    dt_free(&t);
    assert_int_equal(parse("-1e999", &t), 0);
    assert_true(dt_is_atom(&t, "neg_infinity"));
    dt_free(&t);
    assert_int_equal(parse("true", &t), 0);
    assert_true(dt_is_atom(&t, "true"));
    dt_free(&t);
    assert_int_equal(parse("null", &t), 0);
    assert_true(dt_is_atom(&t, "null"));
    dt_free(&t);
    assert_int_equal(parse("\"a\\u00e9\\ud83d\\ude00\\n\"", &t), 0);
    assert_int_equal(t.kind, DT_BIN);
    assert_int_equal(t.u.s.n, 1 + 2 + 4 + 1);
    assert_memory_equal(t.u.s.p, "a\xc3\xa9\xf0\x9f\x98\x80\n", 8);
    dt_free(&t);
}

static void json_rejects(void **state) {
    const char *bad[] = {"", " ", "01", "1.", ".5", "-", "1e", "+1", "[1,]", "{\"a\":}", "{\"a\" 1}", "{a:1}",
                         "[1 2]", "tru", "nul", "\"abc", "\"\\x\"", "\"\\ud800\"", "\"\\udc00\"",
                         "\"\\ud800\\u0041\"", "\"\x01\"", "\"\xff\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"",
                         "1 2", "[]]", "{}}", "NaN", "Infinity", "[\"a\"", "\"\\u12\""};
    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        dterm t;
        const char *err = NULL;
        if (dt_parse_json(bad[i], strlen(bad[i]), &t, &err) != -1) fail_msg("accepted: %s", bad[i]);
        assert_non_null(err);
    }
}

static void json_depth_limit(void **state) {
    char deep[2 * (DT_MAX_DEPTH + 10) + 1];
    dterm t;
    size_t n = DT_MAX_DEPTH + 10;
    (void)state;
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    deep[2 * n] = 0;
    assert_int_equal(parse(deep, &t), -1);
    n = DT_MAX_DEPTH - 1;
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    deep[2 * n] = 0;
    assert_int_equal(parse(deep, &t), 0);
    dt_free(&t);
}

/* Wraps *t in `levels' one-entry maps {"w": ...}, as a reply wraps a value. */
static void wrap(dterm *t, int levels) {
    for (int i = 0; i < levels; i++) {
        dterm m;
        assert_int_equal(dt_map(&m, 1), 0);
        assert_int_equal(dt_bin(&m.u.map.k[0], "w", 1), 0);
        m.u.map.v[0] = *t;
        *t = m;
    }
}

/* The deepest JSON the reader accepts, inside a reply's own nesting, still
 * decodes from the BEAM and writes back as JSON (a conditions_json 99 deep
 * was accepted, then every read of the session failed INTERNAL). */
static void accepted_json_can_be_sent_back(void **state) {
    char deep[2 * (DT_MAX_DEPTH + 1) + 1];
    size_t n = DT_MAX_DEPTH + 1; /* depths 0 .. DT_MAX_DEPTH */
    dterm t, back;
    dt_buf b = {0};
    const char *err = NULL;
    ei_x_buff x;
    (void)state;
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    deep[2 * n] = 0;
    assert_int_equal(parse(deep, &t), 0);
    wrap(&t, DT_REPLY_NESTING);
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(dt_encode_ei(&x, &t), 0);
    assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &back), 0);
    dt_free(&back);
    ei_x_free(&x);
    dt_buf_free(&b);
    /* still bounded: one level more is refused by both */
    wrap(&t, 1);
    assert_int_equal(dt_write_json(&t, &b, &err), -1);
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(dt_encode_ei(&x, &t), 0);
    assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &back), -1);
    ei_x_free(&x);
    dt_buf_free(&b);
    dt_free(&t);
}

static void json_objects_dedupe_last_wins(void **state) {
    dterm t;
    const dterm *v;
    (void)state;
    assert_int_equal(parse("{\"b\":1,\"a\":2,\"b\":3}", &t), 0);
    assert_int_equal(t.kind, DT_MAP);
    assert_int_equal(t.u.map.n, 2);
    v = dt_map_get(&t, "b");
    assert_non_null(v);
    assert_int_equal(v->u.i, 3);
    dt_free(&t);
}

static void json_writer(void **state) {
    char *s;
    dterm t, k;
    dt_buf b = {0};
    const char *err = NULL;
    (void)state;
    s = roundtrip("{\"shape\":[2,3],\"data\":[1.5,-0.25,1e+300,3]}");
    assert_non_null(s);
    assert_string_equal(s, "{\"data\":[1.5,-0.25,1e+300,3],\"shape\":[2,3]}");
    free(s);
    s = roundtrip("\"q\\\"\\\\\\u0001\"");
    assert_string_equal(s, "\"q\\\"\\\\\\u0001\"");
    free(s);
    /* floats stay floats; non-finite values become the protocol's strings */
    dt_float(&t, 2.0);
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_string_equal(b.p, "2.0");
    dt_buf_free(&b);
    dt_float(&t, 0.1);
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_string_equal(b.p, "0.1");
    dt_buf_free(&b);
    dt_float(&t, NAN);
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_string_equal(b.p, "\"NaN\"");
    dt_buf_free(&b);
    assert_int_equal(dt_atom(&t, "neg_infinity"), 0);
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_string_equal(b.p, "\"-Infinity\"");
    dt_buf_free(&b);
    dt_free(&t);
    /* invalid UTF-8 and non-string keys are refused, leaving nothing behind */
    assert_int_equal(dt_bin(&t, "\xff", 1), 0);
    assert_int_equal(dt_write_json(&t, &b, &err), -1);
    assert_true(b.n == 0);
    dt_free(&t);
    assert_int_equal(dt_map(&t, 1), 0);
    assert_int_equal(dt_seq(&k, DT_LIST, 0), 0);
    t.u.map.k[0] = k;
    assert_int_equal(dt_write_json(&t, &b, &err), -1);
    dt_free(&t);
    dt_buf_free(&b);
}

/* Significant digits of the shortest %g text that reads back to d. */
static int shortest_digits(double d) {
    for (int prec = 1; prec < 17; prec++) {
        char t[40];
        snprintf(t, sizeof t, "%.*g", prec, d);
        if (strtod(t, NULL) == d) return prec;
    }
    return 17;
}

/* Significant digits of a number's text: first to last nonzero mantissa digit. */
static int digits_of(const char *s) {
    int first = -1, last = -1, pos = 0;
    for (; *s && *s != 'e' && *s != 'E'; s++) {
        if (*s < '0' || *s > '9') continue;
        if (*s != '0') {
            if (first < 0) first = pos;
            last = pos;
        }
        pos++;
    }
    return first < 0 ? 1 : last - first + 1;
}

/* Floats are written as the shortest text that reads back exactly (checked
 * against a digit-by-digit search), over fixed cases and random bit patterns. */
static void json_float_shortest(void **state) {
    static const double fixed[] = {0.7, 0.1, 1.5, 2.0, -0.0, 1e300, 5e-324, 2.2250738585072014e-308,
                                   0.30000000000000004, 123456789012345680.0, 1.0 / 3.0, 9007199254740993.0};
    uint64_t x = 0x9e3779b97f4a7c15ull;
    dterm t;
    (void)state;
    for (int i = 0; i < 20000 + (int)(sizeof fixed / sizeof fixed[0]); i++) {
        double d;
        dt_buf b = {0};
        const char *err;
        if (i < (int)(sizeof fixed / sizeof fixed[0])) d = fixed[i];
        else {
            uint64_t bits;
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            bits = x;
            memcpy(&d, &bits, sizeof d);
            if (!isfinite(d)) continue;
            if (i % 2) d = (double)(int64_t)(x % 2000001) / 1000.0 - 1000.0; /* decimal-ish values too */
        }
        dt_float(&t, d);
        assert_int_equal(dt_write_json(&t, &b, &err), 0);
        assert_true(strtod(b.p, NULL) == d);
        assert_int_equal(digits_of(b.p), shortest_digits(d));
        dt_buf_free(&b);
    }
}

/* ---------------------------------------------------------------- ETF */

static void etf_roundtrip_via_ei(void **state) {
    dterm t, back;
    ei_x_buff x;
    (void)state;
    assert_int_equal(parse("{\"k\":[1,-2,3.5,\"s\",true,null,{\"n\":[]}],\"big\":9007199254740993}", &t), 0);
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(dt_encode_ei(&x, &t), 0);
    assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &back), 0);
    assert_int_equal(dt_compare(&t, &back), 0);
    /* every truncation fails cleanly */
    for (int n = 0; n < x.index; n++) {
        dterm u;
        assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)n, &u), -1);
    }
    ei_x_free(&x);
    dt_free(&t);
    dt_free(&back);
}

static void etf_known_bytes(void **state) {
    /* {reply, 7, #{a => <<"x">>}} as term_to_binary writes it */
    static const unsigned char ok[] = {131, 104, 3, 100, 0, 5, 'r', 'e', 'p', 'l', 'y', 97, 7, 116, 0, 0, 0, 1,
                                       100, 0, 1, 'a', 109, 0, 0, 0, 1, 'x'};
    /* a list claiming 2^32-1 items in 10 bytes */
    static const unsigned char liar[] = {131, 108, 255, 255, 255, 255, 97, 1, 106};
    /* improper list [1|2] */
    static const unsigned char improper[] = {131, 108, 0, 0, 0, 1, 97, 1, 97, 2};
    /* a pid: never expected */
    static const unsigned char pid[] = {131, 88, 100, 0, 0};
    /* big integer beyond 64 bits: 0x090807060504030201 */
    static const unsigned char big[] = {131, 110, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
    dterm t;
    (void)state;
    assert_int_equal(dt_decode_etf(ok, sizeof ok, &t), 0);
    assert_int_equal(t.kind, DT_TUPLE);
    assert_true(dt_is_atom(&t.u.seq.v[0], "reply"));
    assert_int_equal(t.u.seq.v[1].u.i, 7);
    assert_int_equal(dt_map_get(&t.u.seq.v[2], "a")->u.s.n, 1);
    dt_free(&t);
    assert_int_equal(dt_decode_etf(liar, sizeof liar, &t), -1);
    assert_int_equal(dt_decode_etf(improper, sizeof improper, &t), -1);
    assert_int_equal(dt_decode_etf(pid, sizeof pid, &t), -1);
    assert_int_equal(dt_decode_etf(big, sizeof big, &t), 0);
    assert_int_equal(t.kind, DT_BIG);
    assert_string_equal(t.u.s.p, "166599134359138271745");
    dt_free(&t);
}

/* Integers beyond int64 stay exact both ways (a tool returning 2^64 once
 * made the port drop the whole reply), within DT_BIG_MAX_DIGITS. */
static void big_integers_exact(void **state) {
    /* -(1 bsl 64) and 1 bsl 63 as term_to_binary writes them */
    static const unsigned char neg64[] = {131, 110, 9, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    static const unsigned char pos63[] = {131, 110, 8, 0, 0, 0, 0, 0, 0, 0, 0, 128};
    static const unsigned char min63[] = {131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128};
    static const unsigned char padded[] = {131, 110, 9, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0};
    const char *err = NULL;
    char *json, *long_int;
    dterm t, back;
    ei_x_buff x;
    dt_buf b = {0};
    (void)state;
    assert_int_equal(dt_decode_etf(neg64, sizeof neg64, &t), 0);
    assert_string_equal(t.u.s.p, "-18446744073709551616");
    assert_int_equal(dt_write_json(&t, &b, &err), 0);
    assert_string_equal(b.p, "-18446744073709551616");
    dt_buf_free(&b);
    /* and back to the very bytes the BEAM wrote */
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(dt_encode_ei(&x, &t), 0);
    assert_int_equal(x.index, sizeof neg64);
    assert_memory_equal(x.buff, neg64, sizeof neg64);
    ei_x_free(&x);
    dt_free(&t);
    assert_int_equal(dt_decode_etf(pos63, sizeof pos63, &t), 0);
    assert_int_equal(t.kind, DT_BIG);
    assert_string_equal(t.u.s.p, "9223372036854775808");
    dt_free(&t);
    assert_int_equal(dt_decode_etf(min63, sizeof min63, &t), 0);
    assert_int_equal(t.kind, DT_INT);
    assert_true(t.u.i == INT64_MIN);
    assert_int_equal(dt_decode_etf(padded, sizeof padded, &t), 0); /* zero-padded: still a small int */
    assert_int_equal(t.kind, DT_INT);
    assert_int_equal(t.u.i, 5);

    /* JSON -> ETF -> JSON, small and large bignum headers, map keys */
    json = roundtrip("[18446744073709551617,-99999999999999999999999999999999999999,{\"k\":1}]");
    assert_string_equal(json, "[18446744073709551617,-99999999999999999999999999999999999999,{\"k\":1}]");
    free(json);
    long_int = malloc(DT_BIG_MAX_DIGITS + 2);
    for (int i = 0; i < DT_BIG_MAX_DIGITS; i++) long_int[i] = (char)('1' + i % 9);
    long_int[DT_BIG_MAX_DIGITS] = 0;
    assert_int_equal(parse(long_int, &t), 0);
    assert_int_equal(ei_x_new_with_version(&x), 0);
    assert_int_equal(dt_encode_ei(&x, &t), 0);
    assert_int_equal((unsigned char)x.buff[1], 111); /* LARGE_BIG_EXT */
    assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &back), 0);
    assert_int_equal(back.kind, DT_BIG);
    assert_string_equal(back.u.s.p, long_int);
    assert_int_equal(dt_compare(&t, &back), 0);
    ei_x_free(&x);
    dt_free(&t);
    dt_free(&back);
    long_int[DT_BIG_MAX_DIGITS] = '7'; /* one digit too many: refused, not rounded */
    long_int[DT_BIG_MAX_DIGITS + 1] = 0;
    assert_int_equal(dt_parse_json(long_int, strlen(long_int), &t, &err), -1);
    assert_string_equal(err, "integer has too many digits");
    free(long_int);
    /* numeric order for dedupe */
    assert_int_equal(parse("-100000000000000000000", &t), 0);
    assert_int_equal(parse("-99999999999999999999", &back), 0);
    assert_int_equal(dt_compare(&t, &back), -1);
    dt_free(&t);
    dt_free(&back);
}

/* A reply the port cannot decode still names its call, so the call is failed
 * rather than left hanging until its deadline. */
static void undecodable_frame_names_its_call(void **state) {
    /* {error, 123456789, 13, <<>>} with a pid appended as a fifth element */
    static const unsigned char err_call[] = {131, 104, 5, 100, 0, 5, 'e', 'r', 'r', 'o', 'r', 98, 7, 91, 205, 21,
                                             97, 13, 109, 0, 0, 0, 0, 88, 100, 0, 0};
    static const unsigned char small_id[] = {131, 104, 2, 119, 5, 'r', 'e', 'p', 'l', 'y', 97, 7};
    static const unsigned char big_id[] = {131, 104, 2, 100, 0, 1, 'x', 110, 5, 0, 0, 0, 0, 0, 1};
    static const unsigned char no_id[] = {131, 104, 2, 100, 0, 1, 'x', 100, 0, 1, 'y'};
    static const unsigned char neg_id[] = {131, 104, 2, 100, 0, 1, 'x', 98, 255, 255, 255, 255};
    uint64_t id = 0;
    dterm t;
    (void)state;
    assert_int_equal(dt_decode_etf(err_call, sizeof err_call, &t), -1);
    assert_int_equal(dt_etf_peek_call_id(err_call, sizeof err_call, &id), 0);
    assert_int_equal(id, 123456789);
    assert_int_equal(dt_etf_peek_call_id(small_id, sizeof small_id, &id), 0);
    assert_int_equal(id, 7);
    assert_int_equal(dt_etf_peek_call_id(big_id, sizeof big_id, &id), 0);
    assert_true(id == 1ull << 32);
    assert_int_equal(dt_etf_peek_call_id(no_id, sizeof no_id, &id), -1);
    assert_int_equal(dt_etf_peek_call_id(neg_id, sizeof neg_id, &id), -1);
    for (size_t n = 0; n < sizeof small_id; n++) /* every truncation fails cleanly */
        assert_int_equal(dt_etf_peek_call_id(small_id, n, &id), -1);
}

/* ---------------------------------------------------------------- protobuf walker */

static void pb_request_to_term(void **state) {
    Snakepit__Bridge__SetVariableRequest req = SNAKEPIT__BRIDGE__SET_VARIABLE_REQUEST__INIT;
    Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
    Snakepit__Bridge__SetVariableRequest__MetadataEntry e1 = SNAKEPIT__BRIDGE__SET_VARIABLE_REQUEST__METADATA_ENTRY__INIT;
    Snakepit__Bridge__SetVariableRequest__MetadataEntry *es[1] = {&e1};
    uint8_t buf[512];
    size_t n;
    ProtobufCMessage *back;
    dterm t;
    char err[128];
    const dterm *v;
    (void)state;
    any.type_url = "type.googleapis.com/snakepit.float";
    any.value.data = (uint8_t *)"\"NaN\"";
    any.value.len = 5;
    req.session_id = "s1";
    req.variable_identifier = "temp";
    req.value = &any;
    req.expected_version = 3;
    e1.key = "who";
    e1.value = "me";
    req.n_metadata = 1;
    req.metadata = es;
    n = protobuf_c_message_pack(&req.base, buf);
    back = pb_unpack(&snakepit__bridge__set_variable_request__descriptor, n, buf);
    assert_non_null(back);
    assert_int_equal(pb_to_term(back, &t, err, sizeof err), 0);
    pb_free_unpacked(back);
    assert_int_equal(dt_map_get(&t, "expected_version")->u.i, 3);
    assert_true(dt_is_atom(dt_map_get(&t, "expect_version_zero"), "false"));
    v = dt_map_get(&t, "value");
    assert_string_equal(dt_map_get(v, "type_url")->u.s.p, "type.googleapis.com/snakepit.float");
    assert_string_equal(dt_map_get(v, "value")->u.s.p, "NaN");
    assert_string_equal(dt_map_get(dt_map_get(&t, "metadata"), "who")->u.s.p, "me");
    assert_int_equal(dt_map_get(&t, "binary_value")->u.s.n, 0);
    dt_free(&t);

    /* bad JSON inside the Any is an error naming the field */
    any.value.data = (uint8_t *)"{oops";
    any.value.len = 5;
    n = protobuf_c_message_pack(&req.base, buf);
    back = pb_unpack(&snakepit__bridge__set_variable_request__descriptor, n, buf);
    assert_int_equal(pb_to_term(back, &t, err, sizeof err), -1);
    assert_non_null(strstr(err, "value"));
    pb_free_unpacked(back);
}

/* Packs req with every '#' of its strings turned into a NUL on the wire
 * (protobuf-c itself packs C strings), then reads it back. */
static int nul_request(Snakepit__Bridge__RegisterVariableRequest *req, dterm *t, char *err, size_t errlen) {
    unsigned char buf[512], *w;
    ProtobufCMessage *back;
    size_t n = protobuf_c_message_pack(&req->base, buf);
    int rc;
    while ((w = memchr(buf, '#', n))) *w = 0;
    back = pb_unpack(&snakepit__bridge__register_variable_request__descriptor, n, buf);
    assert_non_null(back);
    rc = pb_to_term(back, t, err, errlen);
    pb_free_unpacked(back);
    return rc;
}

/* A string holding a NUL byte is refused naming its field, not cut short at
 * it (protobuf-c keeps no length: name "a\0b" registered "a"); a reply could
 * not carry it back. In plain fields, map entries, the Any's type_url and
 * *_json fields alike; the shared empty default still reads as "". */
static void pb_strings_with_nul_bytes_refused(void **state) {
    Snakepit__Bridge__RegisterVariableRequest req = SNAKEPIT__BRIDGE__REGISTER_VARIABLE_REQUEST__INIT;
    Snakepit__Bridge__RegisterVariableRequest__MetadataEntry e1 =
        SNAKEPIT__BRIDGE__REGISTER_VARIABLE_REQUEST__METADATA_ENTRY__INIT;
    Snakepit__Bridge__RegisterVariableRequest__MetadataEntry *es[1] = {&e1};
    Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
    dterm t;
    char err[256];
    struct { const char **slot, *bad, *field; } cases[] = {
        {(const char **)&req.name, "a#b", "name"},
        {(const char **)&req.name, "ab#", "name"},
        {(const char **)&any.type_url, "t#u", "initial_value"},
        {(const char **)&e1.key, "k#", "key"},
        {(const char **)&e1.value, "#v", "value"},
        {(const char **)&req.constraints_json, "{}#", "constraints_json"},
    };
    (void)state;
    req.session_id = "s";
    req.name = "ab";
    req.type = "float";
    any.type_url = "tu";
    any.value.data = (uint8_t *)"1";
    any.value.len = 1;
    req.initial_value = &any;
    e1.key = "k";
    e1.value = "v";
    req.n_metadata = 1;
    req.metadata = es;
    assert_int_equal(nul_request(&req, &t, err, sizeof err), 0);
    assert_int_equal(dt_map_get(&t, "name")->u.s.n, 2);
    assert_int_equal(dt_map_get(&t, "session_id")->u.s.n, 1);
    assert_true(dt_is_atom(dt_map_get(&t, "constraints_json"), "undefined"));
    assert_int_equal(dt_map_get(&t, "initial_binary_value")->u.s.n, 0);
    dt_free(&t);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *good = *cases[i].slot;
        *cases[i].slot = cases[i].bad;
        if (nul_request(&req, &t, err, sizeof err) != -1) fail_msg("accepted %s with a NUL", cases[i].field);
        if (!strstr(err, cases[i].field)) fail_msg("error \"%s\" does not name %s", err, cases[i].field);
        *cases[i].slot = good;
    }
}

/* A Timestamp from the wire is checked against the range the protobuf spec
 * allows (0001-01-01 .. 9999-12-31, nanos 0..999999999) before it is scaled
 * to microseconds: nanos out of range once overflowed int64 here. */
static void pb_timestamp_range_checked(void **state) {
    static const struct { int64_t secs; int32_t nanos; int ok; int64_t us; } cases[] = {
        {0, 0, 1, 0},
        {-2, 499999000, 1, -1500001},
        {253402300799LL, 999999999, 1, 253402300799999999LL},
        {-62135596800LL, 0, 1, -62135596800000000LL},
        {253402300800LL, 0, 0, 0},
        {-62135596801LL, 0, 0, 0},
        {0, -1, 0, 0},
        {0, 1000000000, 0, 0},
        {INT64_MAX / 1000000 - 1, INT32_MAX, 0, 0}, /* overflowed secs * 10^6 + nanos / 1000 */
        {INT64_MIN / 1000000 + 1, INT32_MIN, 0, 0},
        {INT64_MAX, 0, 0, 0},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        Snakepit__Bridge__HeartbeatRequest req = SNAKEPIT__BRIDGE__HEARTBEAT_REQUEST__INIT;
        Google__Protobuf__Timestamp ts = GOOGLE__PROTOBUF__TIMESTAMP__INIT;
        uint8_t buf[128];
        size_t n;
        ProtobufCMessage *back;
        dterm t;
        char err[128] = "";
        int rc;
        ts.seconds = cases[i].secs;
        ts.nanos = cases[i].nanos;
        req.session_id = "s";
        req.client_time = &ts;
        n = protobuf_c_message_pack(&req.base, buf);
        back = pb_unpack(&snakepit__bridge__heartbeat_request__descriptor, n, buf);
        assert_non_null(back);
        rc = pb_to_term(back, &t, err, sizeof err);
        pb_free_unpacked(back);
        if (cases[i].ok) {
            assert_int_equal(rc, 0);
            assert_true(dt_map_get(&t, "client_time")->u.i == cases[i].us);
            dt_free(&t);
        } else {
            if (rc != -1) fail_msg("accepted timestamp %lld.%d", (long long)cases[i].secs, (int)cases[i].nanos);
            assert_non_null(strstr(err, "client_time"));
            assert_non_null(strstr(err, "out of range"));
        }
    }
}

static void pb_reply_from_term(void **state) {
    const char *json = "{\"variable\":{\"id\":\"var_x_1\",\"name\":\"x\",\"type\":\"tensor\","
                       "\"value\":{\"type_url\":\"type.googleapis.com/snakepit.tensor\",\"value\":{\"shape\":[1]}},"
                       "\"constraints_json\":{\"min\":0},\"metadata\":{\"a\":\"b\"},\"source\":\"PYTHON\","
                       "\"last_updated_at\":-1500001,\"version\":7,\"binary_value\":\"xyz\","
                       "\"optimization_status\":\"undefined\"},\"from_cache\":false}";
    dterm t, back_t;
    ProtobufCMessage *m;
    Snakepit__Bridge__GetVariableResponse *r;
    char err[128];
    uint8_t buf[1024];
    size_t n;
    (void)state;
    assert_int_equal(parse(json, &t), 0);
    /* JSON gives binaries where replies use atoms: turn the two enum/bool/undefined spots into atoms */
    {
        dterm *var = (dterm *)dt_map_get(&t, "variable");
        dterm *src = (dterm *)dt_map_get(var, "source");
        dterm *opt = (dterm *)dt_map_get(var, "optimization_status");
        dt_free(src);
        assert_int_equal(dt_atom(src, "PYTHON"), 0);
        dt_free(opt);
        assert_int_equal(dt_atom(opt, "undefined"), 0);
    }
    assert_int_equal(pb_from_term(&snakepit__bridge__get_variable_response__descriptor, &t, &m, err, sizeof err), 0);
    r = (Snakepit__Bridge__GetVariableResponse *)m;
    assert_string_equal(r->variable->name, "x");
    assert_int_equal(r->variable->version, 7);
    assert_string_equal(r->variable->constraints_json, "{\"min\":0}");
    assert_string_equal((char *)r->variable->value->value.data, "{\"shape\":[1]}");
    assert_int_equal(r->variable->last_updated_at->seconds, -2); /* floor division */
    assert_int_equal(r->variable->last_updated_at->nanos, 499999000);
    assert_null(r->variable->optimization_status);
    assert_int_equal(r->variable->binary_value.len, 3);
    n = protobuf_c_message_pack(m, buf);
    protobuf_c_message_free_unpacked(m, NULL);
    m = pb_unpack(&snakepit__bridge__get_variable_response__descriptor, n, buf);
    assert_int_equal(pb_to_term(m, &back_t, err, sizeof err), 0);
    assert_int_equal(dt_map_get(dt_map_get(&back_t, "variable"), "last_updated_at")->u.i, -1500001);
    pb_free_unpacked(m);
    dt_free(&back_t);
    dt_free(&t);
}

static void pb_reply_errors_free_everything(void **state) {
    const char *bad[] = {
        "{\"nope\":1}",
        "{\"variable\":{\"version\":\"seven\"}}",
        "{\"variable\":{\"version\":4294967296}}",
        "{\"variable\":{\"metadata\":{\"a\":1}}}",
        "{\"variable\":{\"name\":\"ok\",\"metadata\":{\"a\":\"b\",\"c\":2}}}",
        "{\"variable\":{\"value\":{\"type_url\":\"t\"}}}",
        "{\"variable\":{\"name\":\"a\\u0000b\"}}",
        "{\"variable\":{\"source\":\"MARS\"}}",
        "{\"variable\":7}",
        "[1]",
    };
    (void)state;
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        dterm t;
        ProtobufCMessage *m = NULL;
        char err[128] = "";
        assert_int_equal(parse(bad[i], &t), 0);
        if (pb_from_term(&snakepit__bridge__get_variable_response__descriptor, &t, &m, err, sizeof err) != -1)
            fail_msg("accepted: %s", bad[i]);
        assert_null(m);
        assert_true(err[0] != 0);
        dt_free(&t);
    }
}

static void pb_repeated_and_maps(void **state) {
    const char *json = "{\"success\":true,\"errors\":{\"a\":\"bad\",\"b\":\"worse\"},\"new_versions\":{\"c\":3}}";
    dterm t;
    ProtobufCMessage *m;
    Snakepit__Bridge__BatchSetVariablesResponse *r;
    char err[128];
    (void)state;
    assert_int_equal(parse(json, &t), 0);
    {
        dterm *s = (dterm *)dt_map_get(&t, "success");
        assert_true(dt_is_atom(s, "true"));
    }
    assert_int_equal(pb_from_term(&snakepit__bridge__batch_set_variables_response__descriptor, &t, &m, err, sizeof err), 0);
    r = (Snakepit__Bridge__BatchSetVariablesResponse *)m;
    assert_int_equal(r->n_errors, 2);
    assert_int_equal(r->n_new_versions, 1);
    assert_int_equal(r->new_versions[0]->value, 3);
    assert_true(r->success);
    protobuf_c_message_free_unpacked(m, NULL);
    dt_free(&t);
}

/* ---------------------------------------------------------------- random input */

static uint64_t rng = 88172645463325252ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static long iters(void) {
    const char *e = getenv("DSPEX_FUZZ_ITERS");
    return e ? atol(e) : 20000;
}

static void random_json_and_etf_never_crash(void **state) {
    static const char *seeds[] = {"{\"a\":[1,2.5,\"x\\u00e9\",true,null,{\"b\":-3e7}]}", "[[[]],{},\"\\ud83d\\ude00\"]",
                                  "{\"shape\":[2,2],\"data\":[1,2,3,4]}"};
    unsigned char buf[256];
    long n = iters();
    (void)state;
    for (long i = 0; i < n; i++) {
        const char *seed = seeds[i % 3];
        size_t len = strlen(seed);
        dterm t;
        const char *err;
        ei_x_buff x;
        memcpy(buf, seed, len);
        /* mutate a few bytes, sometimes truncate */
        for (int k = 0; k < 1 + (int)(next_rand() % 4); k++) buf[next_rand() % len] = (unsigned char)next_rand();
        if (next_rand() % 4 == 0) len = next_rand() % len;
        if (dt_parse_json((char *)buf, len, &t, &err) == 0) {
            dt_buf b = {0};
            if (dt_write_json(&t, &b, &err) == 0) {
                dterm again;
                /* what we write we can read back, identically */
                assert_int_equal(dt_parse_json(b.p, b.n, &again, &err), 0);
                dt_free(&again);
            }
            dt_buf_free(&b);
            /* and its term form survives the ETF round trip, then mutation */
            if (ei_x_new_with_version(&x) == 0) {
                if (dt_encode_ei(&x, &t) == 0) {
                    dterm u;
                    assert_int_equal(dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &u), 0);
                    dt_free(&u);
                    if (x.index > 1) {
                        x.buff[1 + next_rand() % (size_t)(x.index - 1)] = (char)next_rand();
                        if (dt_decode_etf((unsigned char *)x.buff, (size_t)x.index, &u) == 0) dt_free(&u);
                    }
                }
                ei_x_free(&x);
            }
            dt_free(&t);
        }
        /* pure noise after the version byte */
        buf[0] = 131;
        len = 1 + next_rand() % 64;
        for (size_t k = 1; k < len; k++) buf[k] = (unsigned char)next_rand();
        if (dt_decode_etf(buf, len, &t) == 0) dt_free(&t);
    }
}

static void random_protobuf_never_crashes(void **state) {
    unsigned char buf[128];
    long n = iters() / 4;
    (void)state;
    for (long i = 0; i < n; i++) {
        size_t len = next_rand() % sizeof buf;
        ProtobufCMessage *m;
        for (size_t k = 0; k < len; k++) buf[k] = (unsigned char)next_rand();
        m = pb_unpack(&snakepit__bridge__register_variable_request__descriptor, len, buf);
        if (m) {
            dterm t;
            char err[128];
            if (pb_to_term(m, &t, err, sizeof err) == 0) dt_free(&t);
            pb_free_unpacked(m);
        }
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(json_scalars),
        cmocka_unit_test(json_rejects),
        cmocka_unit_test(json_depth_limit),
        cmocka_unit_test(accepted_json_can_be_sent_back),
        cmocka_unit_test(pb_strings_with_nul_bytes_refused),
        cmocka_unit_test(json_objects_dedupe_last_wins),
        cmocka_unit_test(json_writer),
        cmocka_unit_test(json_float_shortest),
        cmocka_unit_test(etf_roundtrip_via_ei),
        cmocka_unit_test(etf_known_bytes),
        cmocka_unit_test(big_integers_exact),
        cmocka_unit_test(undecodable_frame_names_its_call),
        cmocka_unit_test(pb_request_to_term),
        cmocka_unit_test(pb_timestamp_range_checked),
        cmocka_unit_test(pb_reply_from_term),
        cmocka_unit_test(pb_reply_errors_free_everything),
        cmocka_unit_test(pb_repeated_and_maps),
        cmocka_unit_test(random_json_and_etf_never_crash),
        cmocka_unit_test(random_protobuf_never_crashes),
    };
    ei_init();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
