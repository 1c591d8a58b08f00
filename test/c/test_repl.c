/* cmocka unit tests for c_src/core/repl.c (dx_repl_*): the rules by which a
 * replica applies a batch of its owner's changes. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "repl.h"

/* The callback: records which changes it was asked to apply, fails the ones
 * listed in `fail'. */
typedef struct {
    size_t calls[16];
    size_t ncalls;
    int fail[16];
} fake;

static int fake_apply(void *ctx, size_t i) {
    fake *f = ctx;
    f->calls[f->ncalls++] = i;
    return f->fail[i];
}

static void check_rules(void **state) {
    (void)state;
    dx_repl_state st = {.epoch = 3, .seq = 10, .fence = 3};
    assert_int_equal(dx_repl_check(&st, 3, 11), DX_REPL_APPLIED);
    assert_int_equal(dx_repl_check(&st, 3, 10), DX_REPL_REPEAT);
    assert_int_equal(dx_repl_check(&st, 3, 1), DX_REPL_REPEAT);
    assert_int_equal(dx_repl_check(&st, 3, 12), DX_REPL_GAP);
    assert_int_equal(dx_repl_check(&st, 4, 1), DX_REPL_GAP);   /* a newer epoch: needs its copy */
    assert_int_equal(dx_repl_check(&st, 2, 11), DX_REPL_STALE);
    /* a takeover fenced the replica at 5: epoch 3 and 4 are refused */
    st.fence = 5;
    assert_int_equal(dx_repl_check(&st, 3, 11), DX_REPL_STALE);
    assert_int_equal(dx_repl_check(&st, 4, 11), DX_REPL_STALE);
    assert_int_equal(dx_repl_check(&st, 5, 1), DX_REPL_GAP);
}

static void batch_in_order(void **state) {
    (void)state;
    dx_repl_state st = {.epoch = 2, .seq = 4, .fence = 1};
    dx_repl_rec r[] = {{2, 3}, {2, 5}, {2, 6}, {1, 7}, {2, 7}};
    dx_repl_outcome out[5];
    fake f = {0};
    assert_int_equal(dx_repl_apply_batch(&st, r, 5, fake_apply, &f, out), 3);
    assert_int_equal(out[0].verdict, DX_REPL_REPEAT);
    assert_int_equal(out[1].verdict, DX_REPL_APPLIED);
    assert_int_equal(out[2].verdict, DX_REPL_APPLIED);
    assert_int_equal(out[3].verdict, DX_REPL_STALE);
    assert_int_equal(out[3].known, 2);
    assert_int_equal(out[4].verdict, DX_REPL_APPLIED);
    /* applied in order, the repeat and the stale one never */
    assert_int_equal(f.ncalls, 3);
    assert_int_equal(f.calls[0], 1);
    assert_int_equal(f.calls[1], 2);
    assert_int_equal(f.calls[2], 4);
    assert_int_equal(st.epoch, 2);
    assert_int_equal(st.seq, 7);
    assert_int_equal(st.fence, 2); /* raised to the epoch of what was applied */
}

static void failure_is_a_gap_for_the_rest(void **state) {
    (void)state;
    dx_repl_state st = {.epoch = 1, .seq = 0, .fence = 1};
    dx_repl_rec r[] = {{1, 1}, {1, 2}, {1, 3}, {1, 4}};
    dx_repl_outcome out[4];
    fake f = {0};
    f.fail[1] = 1; /* the replay of change 2 did not reach the owner's version */
    assert_int_equal(dx_repl_apply_batch(&st, r, 4, fake_apply, &f, out), 1);
    assert_int_equal(out[0].verdict, DX_REPL_APPLIED);
    assert_int_equal(out[1].verdict, DX_REPL_GAP);
    assert_int_equal(out[2].verdict, DX_REPL_GAP);
    assert_int_equal(out[3].verdict, DX_REPL_GAP);
    assert_int_equal(f.ncalls, 2); /* nothing after the failure is tried */
    assert_int_equal(st.seq, 1);
}

static void gap_first(void **state) {
    (void)state;
    dx_repl_state st = {.epoch = 1, .seq = 5, .fence = 1};
    dx_repl_rec r[] = {{1, 7}, {1, 8}};
    dx_repl_outcome out[2];
    fake f = {0};
    assert_int_equal(dx_repl_apply_batch(&st, r, 2, fake_apply, &f, out), 0);
    assert_int_equal(out[0].verdict, DX_REPL_GAP);
    assert_int_equal(out[1].verdict, DX_REPL_GAP);
    assert_int_equal(f.ncalls, 0);
    assert_int_equal(st.seq, 5);
}

static void empty_batch(void **state) {
    (void)state;
    dx_repl_state st = {.epoch = 1, .seq = 5, .fence = 3};
    fake f = {0};
    assert_int_equal(dx_repl_apply_batch(&st, NULL, 0, fake_apply, &f, NULL), 0);
    assert_int_equal(st.seq, 5);
    assert_int_equal(st.fence, 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(check_rules),
        cmocka_unit_test(batch_in_order),
        cmocka_unit_test(failure_is_a_gap_for_the_rest),
        cmocka_unit_test(gap_first),
        cmocka_unit_test(empty_batch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
