/* Unit tests of c_src/core/cache.c: the freshness check of cached session
 * copies (issue #16), the view generation, the second-chance bit, the striped
 * hit counter and the copy id; and that a copy session of the store starts
 * never fresh. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <pthread.h>
#include <string.h>
#include "cache.h"
#include "ebr.h"
#include "store.h"

#define MS 1000000LL

static void test_unarmed_copy_is_never_fresh(void **st) {
    (void)st;
    dx_cache_meta m = {0};
    assert_int_equal(dx_cache_check(&m, 5 * MS, dx_cache_gen(), 100 * MS), DX_CACHE_STALE);
    assert_int_equal(dx_cache_check(&m, 5 * MS, dx_cache_gen(), DX_CACHE_STRONG), DX_CACHE_STALE);
    /* even with an unbounded staleness or generation 0 */
    assert_int_equal(dx_cache_check(&m, 5 * MS, 0, INT64_MAX), DX_CACHE_STALE);
    assert_int_equal(dx_cache_take_ref(&m), 0);
}

static void test_cached_read_is_bounded_by_age_and_view(void **st) {
    (void)st;
    dx_cache_meta m = {0};
    uint64_t g = dx_cache_gen();
    assert_true(g >= 1);
    dx_cache_arm(&m, 1000 * MS, g, 0);
    /* younger than max_staleness: hit; at or past it: stale */
    assert_int_equal(dx_cache_check(&m, 1099 * MS, g, 100 * MS), DX_CACHE_HIT);
    assert_int_equal(dx_cache_check(&m, 1100 * MS, g, 100 * MS), DX_CACHE_STALE);
    assert_int_equal(dx_cache_check(&m, 1000 * MS, g, 0), DX_CACHE_STALE);
    /* a view change makes it stale whatever its age */
    uint64_t g2 = dx_cache_gen_bump();
    assert_int_equal(g2, g + 1);
    assert_int_equal(dx_cache_gen(), g2);
    assert_int_equal(dx_cache_check(&m, 1001 * MS, g2, 100 * MS), DX_CACHE_STALE);
    /* no strong lease was granted: strong reads refused */
    assert_int_equal(dx_cache_check(&m, 1001 * MS, g, DX_CACHE_STRONG), DX_CACHE_STALE);
    /* a renewal under the new view */
    dx_cache_arm(&m, 1200 * MS, g2, 0);
    assert_int_equal(dx_cache_check(&m, 1250 * MS, g2, 100 * MS), DX_CACHE_HIT);
}

static void test_renewals_only_move_forward(void **st) {
    (void)st;
    dx_cache_meta m = {0};
    uint64_t g = dx_cache_gen();
    dx_cache_arm(&m, 500 * MS, g, 600 * MS);
    /* an older renewal (its request left before) changes neither time */
    dx_cache_arm(&m, 400 * MS, g, 450 * MS);
    assert_int_equal(atomic_load(&m.fill_ns), 500 * MS);
    assert_int_equal(atomic_load(&m.lease_ns), 600 * MS);
    /* 0 leaves a field */
    dx_cache_arm(&m, 0, 0, 0);
    assert_int_equal(atomic_load(&m.fill_ns), 500 * MS);
    assert_int_equal(atomic_load(&m.gen), g);
    dx_cache_arm(&m, 700 * MS, g, 800 * MS);
    assert_int_equal(atomic_load(&m.fill_ns), 700 * MS);
    assert_int_equal(atomic_load(&m.lease_ns), 800 * MS);
}

static void test_strong_read_needs_an_unexpired_lease(void **st) {
    (void)st;
    dx_cache_meta m = {0};
    uint64_t g = dx_cache_gen();
    dx_cache_arm(&m, 100 * MS, g, 120 * MS);
    assert_int_equal(dx_cache_check(&m, 119 * MS, g, DX_CACHE_STRONG), DX_CACHE_HIT);
    assert_int_equal(dx_cache_check(&m, 120 * MS, g, DX_CACHE_STRONG), DX_CACHE_STALE);
    /* the lease, not the view, decides a strong read (a takeover waits the
     * lease out before its first write) */
    assert_int_equal(dx_cache_check(&m, 110 * MS, g + 7, DX_CACHE_STRONG), DX_CACHE_HIT);
}

static void test_second_chance_bit(void **st) {
    (void)st;
    dx_cache_meta m = {0};
    uint64_t g = dx_cache_gen();
    dx_cache_arm(&m, 10 * MS, g, 0);
    assert_int_equal(dx_cache_take_ref(&m), 0);
    /* a stale check does not mark the copy read */
    assert_int_equal(dx_cache_check(&m, 500 * MS, g, 100 * MS), DX_CACHE_STALE);
    assert_int_equal(dx_cache_take_ref(&m), 0);
    assert_int_equal(dx_cache_check(&m, 20 * MS, g, 100 * MS), DX_CACHE_HIT);
    assert_int_equal(dx_cache_check(&m, 21 * MS, g, 100 * MS), DX_CACHE_HIT);
    assert_int_equal(dx_cache_take_ref(&m), 1);
    assert_int_equal(dx_cache_take_ref(&m), 0);
}

#define THREADS 4
#define PER 100000
static void *hitter(void *arg) {
    (void)arg;
    for (int i = 0; i < PER; i++) dx_cache_count_hit();
    return NULL;
}

static void test_hit_counter_counts_every_thread(void **st) {
    (void)st;
    dx_cache_reset_hits();
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) assert_int_equal(pthread_create(&t[i], NULL, hitter, NULL), 0);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    dx_cache_count_hit();
    assert_int_equal(dx_cache_hits(), (uint64_t)THREADS * PER + 1);
    dx_cache_reset_hits();
    assert_int_equal(dx_cache_hits(), 0);
}

static void test_copy_id(void **st) {
    (void)st;
    char buf[16];
    size_t n = dx_cache_id(buf, sizeof buf, "abc", 3);
    assert_int_equal(n, 10);
    assert_memory_equal(buf, "\0cache:abc", 10);
    /* exactly full, then too long */
    assert_int_equal(dx_cache_id(buf, sizeof buf, "123456789", 9), 16);
    assert_int_equal(dx_cache_id(buf, sizeof buf, "1234567890", 10), 0);
    assert_int_equal(dx_cache_id(buf, 4, "", 0), 0);
}

static void test_store_sessions_start_never_fresh(void **st) {
    (void)st;
    assert_int_equal(dx_store_init(), 0);
    dx_ebr_enter();
    dx_session *s = NULL;
    int created = 0, limit = 0;
    dx_str id = {"\0cache:s", 8};
    assert_int_equal(dx_session_create(id, NULL, 0, -1, 1000000, 1000, &s, &created, &limit), DX_OK);
    assert_int_equal(dx_cache_check(&s->cache, dx_cache_now_ns(), dx_cache_gen(), INT64_MAX / 2), DX_CACHE_STALE);
    dx_cache_arm(&s->cache, dx_cache_now_ns(), dx_cache_gen(), 0);
    assert_int_equal(dx_cache_check(&s->cache, dx_cache_now_ns(), dx_cache_gen(), INT64_MAX / 2), DX_CACHE_HIT);
    dx_ebr_exit();
    assert_int_equal(dx_session_delete(id), DX_OK);
    dx_store_shutdown();
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unarmed_copy_is_never_fresh),
        cmocka_unit_test(test_cached_read_is_bounded_by_age_and_view),
        cmocka_unit_test(test_renewals_only_move_forward),
        cmocka_unit_test(test_strong_read_needs_an_unexpired_lease),
        cmocka_unit_test(test_second_chance_bit),
        cmocka_unit_test(test_hit_counter_counts_every_thread),
        cmocka_unit_test(test_copy_id),
        cmocka_unit_test(test_store_sessions_start_never_fresh),
    };
    return cmocka_run_group_tests_name("cache", tests, NULL, NULL);
}
