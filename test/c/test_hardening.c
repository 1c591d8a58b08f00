/* Unit tests of the hardening of issue #14 in c_src/core/store.c: a checked
 * delete acts on exactly the variable it checked (dx_var_delete_checked), the
 * lock token accessor, and limits read as one consistent set while another
 * thread replaces them (sequence lock). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "ebr.h"
#include "store.h"

static dx_str S(const char *s) { return (dx_str){s, strlen(s)}; }

static int setup(void **st) {
    (void)st;
    return dx_store_init();
}
static int teardown(void **st) {
    (void)st;
    dx_store_shutdown();
    return 0;
}

static dx_var *reg(dx_session *s, const char *name, int64_t value) {
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value val = {.type = DX_T_INTEGER, .u.i = value};
    dx_var_spec sp = {.name = S(name), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
    dx_var *v = NULL;
    int limit = 0;
    assert_int_equal(dx_var_register(s, &sp, 1000000, &v, &limit), DX_OK);
    return v;
}

static dx_session *session(const char *id) {
    dx_session *s = NULL;
    int created = 0, limit = 0;
    assert_int_equal(dx_session_create(S(id), NULL, 0, -1, 1000000, 1000, &s, &created, &limit), DX_OK);
    return s;
}

static int deny(void *ctx, const dx_var *v, void *acl) {
    (void)v;
    (void)acl;
    ++*(int *)ctx;
    return 0;
}

/* The NIF used to check access on one lookup and delete by name on a second:
 * a variable deleted and registered again in between was deleted unchecked.
 * The checked delete acts on the variable it was given, and only while it is
 * live; the check runs under the shard mutex. */
static void test_delete_checked_acts_on_the_checked_variable(void **st) {
    (void)st;
    dx_ebr_enter();
    dx_session *s = session("del");
    dx_var *v1 = reg(s, "x", 1);
    assert_int_equal(dx_var_delete(s, S("x")), DX_OK);
    dx_var *v2 = reg(s, "x", 2);
    assert_ptr_not_equal(v1, v2);
    /* v1 is the variable a caller checked before the re-registration */
    assert_int_equal(dx_var_delete_checked(s, v1, NULL), DX_E_NOT_FOUND);
    assert_ptr_equal(dx_var_find(s, S("x")), v2);
    /* a refusing check: nothing is deleted, and the check ran once */
    int calls = 0;
    dx_set_opts o = {.acl_check = deny, .acl_ctx = &calls};
    assert_int_equal(dx_var_delete_checked(s, v2, &o), DX_E_DENIED);
    assert_int_equal(calls, 1);
    assert_ptr_equal(dx_var_find(s, S("x")), v2);
    /* a locked variable is refused, the lock token is readable, then it goes */
    uint64_t tok = 0;
    assert_int_equal(dx_var_lock(s, v2, 0, NULL, 0, &tok, NULL), DX_OK);
    assert_int_equal(dx_var_lock_current(s, v2), tok);
    assert_int_equal(dx_var_delete_checked(s, v2, NULL), DX_E_LOCKED);
    assert_int_equal(dx_var_unlock(s, v2, tok), DX_OK);
    assert_int_equal(dx_var_lock_current(s, v2), 0);
    assert_int_equal(dx_var_delete_checked(s, v2, NULL), DX_OK);
    assert_null(dx_var_find(s, S("x")));
    assert_int_equal(dx_var_delete_checked(s, v2, NULL), DX_E_NOT_FOUND);
    assert_int_equal(dx_var_lock_current(s, v2), 0);
    assert_int_equal(dx_session_nvars(s), 0);
    dx_ebr_exit();
    dx_session_delete(S("del"));
}

/* Two limit sets that differ in every field; a reader must see one or the other. */
static const dx_limits LA = {1000, 2000, 3000, 100, 400, 40};
static const dx_limits LB = {9000, 8000, 7000, 200, 900, 90};
static _Atomic int g_stop;

static int same(const dx_limits *a, const dx_limits *b) {
    return a->max_sessions == b->max_sessions && a->max_vars == b->max_vars && a->max_value_bytes == b->max_value_bytes &&
           a->max_name_len == b->max_name_len && a->max_history == b->max_history &&
           a->default_history == b->default_history;
}

static void *limits_reader(void *arg) {
    long *torn = arg;
    while (!atomic_load(&g_stop)) {
        dx_limits l = dx_store_limits();
        if (!same(&l, &LA) && !same(&l, &LB)) ++*torn;
    }
    return NULL;
}

static void test_limits_are_read_as_one_set(void **st) {
    (void)st;
    dx_limits saved = dx_store_limits();
    dx_store_set_limits(&LA);
    long torn[2] = {0, 0};
    pthread_t r[2];
    atomic_store(&g_stop, 0);
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&r[i], NULL, limits_reader, &torn[i]), 0);
    int n = getenv("DX_TEST_SCALE") ? 2000 : 10000000; /* the torn-read window is a few ns: many writes */
    for (int i = 0; i < n; i++) dx_store_set_limits(i % 2 ? &LA : &LB);
    atomic_store(&g_stop, 1);
    for (int i = 0; i < 2; i++) pthread_join(r[i], NULL);
    assert_int_equal(torn[0] + torn[1], 0);
    dx_store_set_limits(&saved);
    dx_limits back = dx_store_limits();
    assert_true(same(&back, &saved));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_delete_checked_acts_on_the_checked_variable),
        cmocka_unit_test(test_limits_are_read_as_one_set),
    };
    return cmocka_run_group_tests_name("hardening", tests, setup, teardown);
}
