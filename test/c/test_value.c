/* Unit tests of typed values and constraints (c_src/core/value.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <string.h>
#include "value.h"

static dx_raw rint_(int64_t i) { return (dx_raw){.kind = DX_RAW_INT, .i = i}; }
static dx_raw rflt(double f) { return (dx_raw){.kind = DX_RAW_FLOAT, .f = f}; }
static dx_raw rstr(const char *s) { return (dx_raw){.kind = DX_RAW_BYTES, .s = {s, strlen(s)}}; }

static void add(dx_constraints *c, dx_type t, const char *k, dx_raw v) {
    char err[DX_ERRLEN];
    assert_int_equal(dx_constraints_add(c, t, k, strlen(k), &v, err, sizeof err), DX_OK);
}

static void test_float_bounds_and_message(void **st) {
    dx_constraints c;
    dx_constraints_init(&c);
    add(&c, DX_T_FLOAT, "min", rint_(0));
    add(&c, DX_T_FLOAT, "max", rflt(1.0));
    char err[DX_ERRLEN];
    assert_int_equal(dx_constraints_finish(&c, DX_T_FLOAT, err, sizeof err), DX_OK);
    dx_value v;
    dx_raw r = rflt(1.5);
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "value 1.5 is above maximum 1.0");
    r = rflt(-0.25);
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "value -0.25 is below minimum 0.0");
    r = rint_(1); /* integer for a float is stored as float */
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_OK);
    assert_true(v.u.f == 1.0);
    r = rflt(NAN); /* NaN cannot satisfy bounds */
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    dx_constraints_free(&c);
}

static void test_float_specials_without_bounds(void **st) {
    dx_constraints c;
    dx_constraints_init(&c);
    char err[DX_ERRLEN];
    dx_value v;
    dx_raw r = rflt(INFINITY);
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_OK);
    assert_true(isinf(v.u.f));
    r = rflt(NAN);
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_OK);
    assert_true(isnan(v.u.f));
    r = rstr("0.5");
    assert_int_equal(dx_value_check(DX_T_FLOAT, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "expected a float, got a string");
}

static void test_integer_coercion(void **st) {
    dx_constraints c;
    dx_constraints_init(&c);
    add(&c, DX_T_INTEGER, "max", rflt(10.0)); /* a whole float bound is an integer bound */
    char err[DX_ERRLEN];
    dx_value v;
    dx_raw r = rflt(3.0);
    assert_int_equal(dx_value_check(DX_T_INTEGER, &c, &r, &v, err, sizeof err), DX_OK);
    assert_int_equal(v.u.i, 3);
    r = rflt(3.5);
    assert_int_equal(dx_value_check(DX_T_INTEGER, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "value 3.5 is not a whole number");
    r = rint_(11);
    assert_int_equal(dx_value_check(DX_T_INTEGER, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "value 11 is above maximum 10");
    r = (dx_raw){.kind = DX_RAW_BIGINT};
    assert_int_equal(dx_value_check(DX_T_INTEGER, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    r = rflt(1e300);
    assert_int_equal(dx_value_check(DX_T_INTEGER, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    /* a fractional bound for an integer is refused */
    dx_raw half = rflt(0.5);
    assert_int_equal(dx_constraints_add(&c, DX_T_INTEGER, "min", 3, &half, err, sizeof err), DX_E_INVALID);
    dx_constraints_free(&c);
}

static void test_string_constraints(void **st) {
    dx_constraints c;
    dx_constraints_init(&c);
    add(&c, DX_T_STRING, "min_length", rint_(2));
    add(&c, DX_T_STRING, "max_length", rint_(4));
    add(&c, DX_T_STRING, "pattern", rstr("^[a-z]+$"));
    char err[DX_ERRLEN];
    dx_value v;
    dx_raw r = rstr("abc");
    assert_int_equal(dx_value_check(DX_T_STRING, &c, &r, &v, err, sizeof err), DX_OK);
    r = rstr("a");
    assert_int_equal(dx_value_check(DX_T_STRING, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "string length 1 is below min_length 2");
    r = rstr("abcde");
    assert_int_equal(dx_value_check(DX_T_STRING, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    r = rstr("AB");
    assert_int_equal(dx_value_check(DX_T_STRING, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "string does not match pattern ^[a-z]+$");
    /* length counts code points: "éé" is 2 characters in 4 bytes */
    dx_constraints c2;
    dx_constraints_init(&c2);
    add(&c2, DX_T_STRING, "max_length", rint_(2));
    r = rstr("\xc3\xa9\xc3\xa9");
    assert_int_equal(dx_value_check(DX_T_STRING, &c2, &r, &v, err, sizeof err), DX_OK);
    r = rstr("\xc3\x28"); /* invalid UTF-8 */
    assert_int_equal(dx_value_check(DX_T_STRING, &c2, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "string is not valid UTF-8");
    dx_constraints_free(&c);
    dx_constraints_free(&c2);
}

static void test_bad_pattern_and_inapplicable(void **st) {
    dx_constraints c;
    dx_constraints_init(&c);
    char err[DX_ERRLEN];
    dx_raw p = rstr("(unclosed");
    assert_int_equal(dx_constraints_add(&c, DX_T_STRING, "pattern", 7, &p, err, sizeof err), DX_E_INVALID);
    assert_non_null(strstr(err, "not a valid POSIX extended regex"));
    /* back-references are refused (exponential matching); a backslash-digit
     * inside a bracket expression is an ordinary character */
    p = rstr("^(a*)*\\1$");
    assert_int_equal(dx_constraints_add(&c, DX_T_STRING, "pattern", 7, &p, err, sizeof err), DX_E_INVALID);
    assert_non_null(strstr(err, "back-reference"));
    p = rstr("^[[:alpha:]\\1]+\\.x$");
    add(&c, DX_T_STRING, "pattern", p);
    dx_raw one = rint_(1);
    assert_int_equal(dx_constraints_add(&c, DX_T_STRING, "min", 3, &one, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "constraint \"min\" does not apply to type string");
    assert_int_equal(dx_constraints_add(&c, DX_T_FLOAT, "bogus", 5, &one, err, sizeof err), DX_E_INVALID);
    add(&c, DX_T_FLOAT, "min", rint_(5));
    add(&c, DX_T_FLOAT, "max", rint_(1));
    assert_int_equal(dx_constraints_finish(&c, DX_T_FLOAT, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "constraint min 5.0 is greater than max 1.0");
    dx_constraints_free(&c);
}

static void test_choice_module_enum(void **st) {
    dx_str items[2] = {{"fast", 4}, {"slow", 4}};
    dx_raw list = {.kind = DX_RAW_STRLIST, .strs = items, .nstrs = 2};
    dx_constraints c;
    dx_constraints_init(&c);
    char err[DX_ERRLEN];
    /* a choice variable must have choices */
    assert_int_equal(dx_constraints_finish(&c, DX_T_CHOICE, err, sizeof err), DX_E_INVALID);
    add(&c, DX_T_CHOICE, "choices", list);
    assert_int_equal(dx_constraints_finish(&c, DX_T_CHOICE, err, sizeof err), DX_OK);
    dx_value v;
    dx_raw r = rstr("fast");
    assert_int_equal(dx_value_check(DX_T_CHOICE, &c, &r, &v, err, sizeof err), DX_OK);
    r = rstr("medium");
    assert_int_equal(dx_value_check(DX_T_CHOICE, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "value \"medium\" is not one of the choices: fast, slow");
    dx_constraints m;
    dx_constraints_init(&m);
    dx_str mods[1] = {{"ChainOfThought", 14}};
    add(&m, DX_T_MODULE, "allowed_modules", (dx_raw){.kind = DX_RAW_STRLIST, .strs = mods, .nstrs = 1});
    r = rstr("Predict");
    assert_int_equal(dx_value_check(DX_T_MODULE, &m, &r, &v, err, sizeof err), DX_E_INVALID);
    r = rstr("ChainOfThought");
    assert_int_equal(dx_value_check(DX_T_MODULE, &m, &r, &v, err, sizeof err), DX_OK);
    dx_constraints e;
    dx_constraints_init(&e);
    add(&e, DX_T_STRING, "enum", list);
    r = rstr("slow");
    assert_int_equal(dx_value_check(DX_T_STRING, &e, &r, &v, err, sizeof err), DX_OK);
    r = rstr("slower");
    assert_int_equal(dx_value_check(DX_T_STRING, &e, &r, &v, err, sizeof err), DX_E_INVALID);
    dx_constraints copy;
    assert_int_equal(dx_constraints_copy(&copy, &c), DX_OK);
    r = rstr("slow");
    assert_int_equal(dx_value_check(DX_T_CHOICE, &copy, &r, &v, err, sizeof err), DX_OK);
    dx_constraints_free(&copy);
    dx_constraints_free(&c);
    dx_constraints_free(&m);
    dx_constraints_free(&e);
}

static void test_embedding_and_tensor(void **st) {
    double d[6] = {1, 2, 3, 4, 5, 6};
    int64_t shape[2] = {2, 3}, bad_shape[2] = {3, 3}, cshape[2] = {2, 3};
    dx_constraints c;
    dx_constraints_init(&c);
    add(&c, DX_T_EMBEDDING, "dimensions", rint_(3));
    char err[DX_ERRLEN];
    dx_value v;
    dx_raw r = {.kind = DX_RAW_NUMLIST, .nums = d, .n = 4};
    assert_int_equal(dx_value_check(DX_T_EMBEDDING, &c, &r, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "embedding has 4 dimensions, expected 3");
    r.n = 3;
    assert_int_equal(dx_value_check(DX_T_EMBEDDING, &c, &r, &v, err, sizeof err), DX_OK);
    dx_constraints t;
    dx_constraints_init(&t);
    double cs[2] = {(double)cshape[0], (double)cshape[1]};
    add(&t, DX_T_TENSOR, "shape", (dx_raw){.kind = DX_RAW_NUMLIST, .nums = cs, .n = 2});
    dx_raw tr = {.kind = DX_RAW_TENSOR, .nums = d, .n = 6, .shape = shape, .ndim = 2};
    assert_int_equal(dx_value_check(DX_T_TENSOR, &t, &tr, &v, err, sizeof err), DX_OK);
    tr.n = 5;
    assert_int_equal(dx_value_check(DX_T_TENSOR, &t, &tr, &v, err, sizeof err), DX_E_INVALID);
    assert_string_equal(err, "tensor data has 5 elements, shape [2,3] needs 6");
    dx_raw tr2 = {.kind = DX_RAW_TENSOR, .nums = d, .n = 6, .shape = bad_shape, .ndim = 2};
    tr2.n = 6;
    assert_int_equal(dx_value_check(DX_T_TENSOR, &t, &tr2, &v, err, sizeof err), DX_E_INVALID);
    /* huge shapes must not overflow the product */
    int64_t huge[3] = {INT64_MAX, INT64_MAX, 2};
    dx_raw th = {.kind = DX_RAW_TENSOR, .nums = d, .n = 6, .shape = huge, .ndim = 3};
    assert_int_equal(dx_value_check(DX_T_TENSOR, &t, &th, &v, err, sizeof err), DX_E_INVALID);
    /* copy into a buffer keeps the data */
    tr.n = 6;
    assert_int_equal(dx_value_check(DX_T_TENSOR, &t, &tr, &v, err, sizeof err), DX_OK);
    size_t sz = dx_value_payload_size(&v);
    assert_int_equal(sz, 6 * sizeof(double) + 2 * sizeof(int64_t));
    _Alignas(8) char buf[128];
    dx_value cp;
    dx_value_copy_into(&cp, &v, buf);
    assert_true(cp.u.v.data[5] == 6.0 && cp.u.v.shape[1] == 3);
    dx_constraints_free(&c);
    dx_constraints_free(&t);
}

static void test_format_double(void **st) {
    char b[40];
    dx_format_double(1.0, b, sizeof b);
    assert_string_equal(b, "1.0");
    dx_format_double(0.1, b, sizeof b);
    assert_string_equal(b, "0.1");
    dx_format_double(1e20, b, sizeof b);
    assert_string_equal(b, "1.0e20");
    dx_format_double(-2.5e-7, b, sizeof b);
    assert_string_equal(b, "-2.5e-7");
    dx_format_double(-INFINITY, b, sizeof b);
    assert_string_equal(b, "neg_infinity");
}

/* n little-endian digits of sum of 2^e for each e in exps (distinct). */
static size_t pow2_sum(uint8_t *dig, size_t cap, const int *exps, size_t k) {
    memset(dig, 0, cap);
    size_t n = 0;
    for (size_t i = 0; i < k; i++) {
        dig[exps[i] / 8] |= (uint8_t)(1u << (exps[i] % 8));
        if ((size_t)exps[i] / 8 + 1 > n) n = (size_t)exps[i] / 8 + 1;
    }
    return n;
}

/* Rounded once, to nearest, ties to even (as erlang:float/1): truncating to
 * the top 64 bits first rounded 2^71 + 2^18 + 1 down (a tie, then even). */
static void test_bignum_to_double_rounds_once(void **st) {
    uint8_t d[160];
    size_t n;
    n = pow2_sum(d, sizeof d, (int[]){71, 18, 0}, 3); /* above the half ulp (2^18) */
    assert_true(dx_bigmag_to_double(d, n) == ldexp(1, 71) + ldexp(1, 19));
    n = pow2_sum(d, sizeof d, (int[]){71, 18}, 2); /* a tie: to even, down */
    assert_true(dx_bigmag_to_double(d, n) == ldexp(1, 71));
    n = pow2_sum(d, sizeof d, (int[]){71, 19, 18}, 3); /* a tie with an odd mantissa: up */
    assert_true(dx_bigmag_to_double(d, n) == ldexp(1, 71) + ldexp(1, 20));
    n = pow2_sum(d, sizeof d, (int[]){200, 147, 0}, 3); /* the sticky bit 140 digits below */
    assert_true(dx_bigmag_to_double(d, n) == ldexp(1, 200) + ldexp(1, 148));
    n = pow2_sum(d, sizeof d, (int[]){200, 147}, 2);
    assert_true(dx_bigmag_to_double(d, n) == ldexp(1, 200));
    /* 2^64 - 1 fits the top word: one rounding, up to 2^64 */
    memset(d, 0xff, 8);
    assert_true(dx_bigmag_to_double(d, 8) == ldexp(1, 64));
    /* the top of the range: 2^1024 - 2^970 - 1 is below the tie (DBL_MAX),
     * 2^1024 - 2^970 a tie (to even: out of range), 2^1024 and beyond inf */
    memset(d, 0, sizeof d);
    memset(d, 0xff, 128);
    for (int b = 0; b < 970; b++) d[b / 8] &= (uint8_t)~(1u << (b % 8));
    assert_true(isinf(dx_bigmag_to_double(d, 128)));
    for (int b = 0; b < 970; b++) d[b / 8] |= (uint8_t)(1u << (b % 8));
    d[970 / 8] &= (uint8_t)~(1u << (970 % 8)); /* 2^1024 - 2^970 - 1: bits 0..969 set, 970 clear */
    assert_true(dx_bigmag_to_double(d, 128) == 0x1.fffffffffffffp+1023);
    n = pow2_sum(d, sizeof d, (int[]){1024}, 1);
    assert_true(isinf(dx_bigmag_to_double(d, n)));
    /* leading zero digits change nothing */
    n = pow2_sum(d, sizeof d, (int[]){71, 18, 0}, 3);
    assert_true(dx_bigmag_to_double(d, n + 5) == ldexp(1, 71) + ldexp(1, 19));
}

static void test_type_names(void **st) {
    dx_type t;
    for (int i = 0; i < DX_T_COUNT; i++) {
        const char *n = dx_type_name((dx_type)i);
        assert_int_equal(dx_type_parse(n, strlen(n), &t), 0);
        assert_int_equal(t, i);
    }
    assert_int_equal(dx_type_parse("widget", 6, &t), -1);
    assert_int_equal(dx_type_parse("floa", 4, &t), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_float_bounds_and_message), cmocka_unit_test(test_float_specials_without_bounds),
        cmocka_unit_test(test_integer_coercion),         cmocka_unit_test(test_string_constraints),
        cmocka_unit_test(test_bad_pattern_and_inapplicable), cmocka_unit_test(test_choice_module_enum),
        cmocka_unit_test(test_embedding_and_tensor),     cmocka_unit_test(test_format_double),
        cmocka_unit_test(test_type_names),               cmocka_unit_test(test_bignum_to_double_rounds_once),
    };
    return cmocka_run_group_tests_name("value", tests, NULL, NULL);
}
