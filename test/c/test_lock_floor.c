/* Unit test of dx_lock_tokens_raise (c_src/core/store.c): a new cluster owner
 * raises the lock token counter so that tokens keep rising across failover. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
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

static void test_tokens_rise_above_floor_and_never_fall(void **st) {
    (void)st;
    dx_ebr_enter();
    dx_session *s = NULL;
    int created = 0, limit = 0;
    assert_int_equal(dx_session_create(S("floor"), NULL, 0, -1, 1000000, 1000, &s, &created, &limit), DX_OK);
    dx_constraints c;
    dx_constraints_init(&c);
    dx_value val = {.type = DX_T_INTEGER, .u.i = 0};
    dx_var_spec sp = {.name = S("x"), .type = DX_T_INTEGER, .cons = &c, .value = &val, .history_limit = -1};
    dx_var *v = NULL;
    assert_int_equal(dx_var_register(s, &sp, 1000000, &v, &limit), DX_OK);
    uint64_t t1 = 0, t2 = 0;
    assert_int_equal(dx_var_lock(s, v, 0, NULL, 0, &t1, NULL), DX_OK);
    assert_int_equal(dx_var_unlock(s, v, t1), DX_OK);
    /* a floor far above the clock-seeded counter: the next token exceeds it */
    uint64_t floor = t1 + (1ull << 40);
    assert_int_equal(dx_lock_tokens_raise(floor), floor);
    assert_int_equal(dx_var_lock(s, v, 0, NULL, 0, &t2, NULL), DX_OK);
    assert_true(t2 > floor);
    /* a lower floor changes nothing */
    assert_true(dx_lock_tokens_raise(5) >= t2);
    /* the old token is refused for writes and unlocks */
    assert_int_equal(dx_var_unlock(s, v, t1), DX_E_STALE_LOCK);
    assert_int_equal(dx_var_unlock(s, v, t2), DX_OK);
    dx_ebr_exit();
    dx_session_delete(S("floor"));
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_tokens_rise_above_floor_and_never_fall)};
    return cmocka_run_group_tests_name("lock_floor", tests, setup, teardown);
}
