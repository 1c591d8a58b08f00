/* cmocka unit tests for c_src/core/graph.c (dependency graph with
 * incremental cycle detection). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph.h"

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

/* Size multiplier for the heavy tests. As elsewhere in the project, a set
 * DX_TEST_SCALE (the Makefile sets it for valgrind) means "reduced run";
 * a value strictly between 0 and 1 gives the factor explicitly, and "0"
 * forces the full size. Running under valgrind also reduces by default. */
static double test_scale(void)
{
    const char *s = getenv("DX_TEST_SCALE");
    if (s && *s) {
        double v = strtod(s, NULL);
        if (v > 0 && v < 1)
            return v;
        return strcmp(s, "0") == 0 ? 1.0 : 0.2;
    }
    return RUNNING_ON_VALGRIND ? 0.2 : 1.0;
}

/* ---- helpers ------------------------------------------------------------ */

#define S(lit) (lit), (sizeof(lit) - 1)

static int add(dx_graph *g, const char *a, const char *b)
{
    return dx_graph_add_edge(g, a, strlen(a), b, strlen(b), 0, NULL, NULL);
}

static int is(dx_gname n, const char *s)
{
    return n.len == strlen(s) && memcmp(n.ptr, s, n.len) == 0;
}

static long find_name(const dx_gname *v, size_t n, const char *s)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (is(v[i], s))
            return (long)i;
    return -1;
}

/* Asserts update_order(start) lists exactly `expect` (any order) and that
 * every edge among the listed nodes points forward in the list. */
static void check_order(dx_graph *g, const char *start, const char *const *expect, size_t nexp)
{
    dx_gname *o = NULL;
    size_t n = 0, i, j;
    assert_int_equal(dx_graph_update_order(g, start, strlen(start), &o, &n), DX_G_OK);
    assert_int_equal(n, nexp);
    assert_true(is(o[0], start));
    for (i = 0; i < nexp; i++)
        assert_true(find_name(o, n, expect[i]) >= 0);
    for (i = 0; i < n; i++) {
        dx_gname *d = NULL;
        size_t nd = 0;
        assert_int_equal(dx_graph_dependents(g, o[i].ptr, o[i].len, &d, NULL, &nd), DX_G_OK);
        for (j = 0; j < nd; j++) {
            size_t k;
            int found = 0;
            for (k = 0; k < n; k++) {
                if (o[k].len == d[j].len && memcmp(o[k].ptr, d[j].ptr, d[j].len) == 0) {
                    assert_true(k > i);
                    found = 1;
                }
            }
            assert_true(found);
        }
        free(d);
    }
    free(o);
}

/* ---- basic behaviour ---------------------------------------------------- */

static void test_empty_and_invalid(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o = (dx_gname *)&o;
    int *ty = (int *)&ty;
    size_t n = 99;
    dx_gname *cyc = (dx_gname *)&cyc;
    size_t clen = 7;

    assert_non_null(g);
    assert_int_equal(dx_graph_node_count(g), 0);
    assert_int_equal(dx_graph_edge_count(g), 0);
    assert_false(dx_graph_has_node(g, S("a")));
    assert_int_equal(dx_graph_dependencies(g, S("a"), &o, &ty, &n), DX_G_NOT_FOUND);
    assert_null(o);
    assert_null(ty);
    assert_int_equal(n, 0);
    assert_int_equal(dx_graph_dependents(g, S("a"), &o, &ty, &n), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_all_dependents(g, S("a"), &o, &n), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_update_order(g, S("a"), &o, &n), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_remove_edge(g, S("a"), S("b")), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_remove_node(g, S("a")), DX_G_NOT_FOUND);

    /* Invalid arguments must be refused, not crash. */
    assert_int_equal(dx_graph_add_edge(NULL, S("a"), S("b"), 0, &cyc, &clen), DX_G_LIMIT);
    assert_null(cyc);
    assert_int_equal(clen, 0);
    assert_int_equal(dx_graph_add_edge(g, NULL, 3, S("b"), 0, NULL, NULL), DX_G_LIMIT);
    assert_int_equal(dx_graph_add_edge(g, S("a"), NULL, 1, 0, NULL, NULL), DX_G_LIMIT);
    assert_int_equal(dx_graph_remove_edge(g, NULL, 1, S("b")), DX_G_LIMIT);
    assert_int_equal(dx_graph_remove_node(NULL, S("a")), DX_G_LIMIT);
    assert_false(dx_graph_has_node(NULL, S("a")));
    assert_false(dx_graph_has_node(g, NULL, 4));
    assert_int_equal(dx_graph_dependencies(g, S("a"), NULL, NULL, &n), DX_G_LIMIT);
    assert_int_equal(dx_graph_update_order(g, S("a"), &o, NULL), DX_G_LIMIT);
    assert_int_equal(dx_graph_node_count(NULL), 0);
    dx_graph_foreach_node(NULL, NULL, NULL);
    dx_graph_foreach_edge(g, NULL, NULL);
    dx_graph_clear(NULL);
    dx_graph_free(NULL);
    assert_int_equal(dx_graph_node_count(g), 0);
    dx_graph_free(g);
}

static void test_chain(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o;
    size_t n;
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "c"), DX_G_OK);
    assert_int_equal(add(g, "c", "d"), DX_G_OK);
    assert_int_equal(dx_graph_node_count(g), 4);
    assert_int_equal(dx_graph_edge_count(g), 3);

    assert_int_equal(dx_graph_update_order(g, S("a"), &o, &n), DX_G_OK);
    assert_int_equal(n, 4);
    assert_true(is(o[0], "a") && is(o[1], "b") && is(o[2], "c") && is(o[3], "d"));
    free(o);

    assert_int_equal(dx_graph_all_dependents(g, S("b"), &o, &n), DX_G_OK);
    assert_int_equal(n, 2);
    assert_true(is(o[0], "c") && is(o[1], "d"));
    free(o);

    assert_int_equal(dx_graph_all_dependents(g, S("d"), &o, &n), DX_G_OK);
    assert_int_equal(n, 0);
    assert_null(o);
    assert_int_equal(dx_graph_update_order(g, S("d"), &o, &n), DX_G_OK);
    assert_int_equal(n, 1);
    assert_true(is(o[0], "d"));
    free(o);
    dx_graph_free(g);
}

/* Nodes created so that their initial order is the reverse of the chain:
 * every chain edge then needs a Pearce-Kelly reordering. */
static void test_chain_needs_reorder(void **state)
{
    dx_graph *g = dx_graph_new();
    static const char *const all[] = { "a", "b", "c", "d", "wa", "wb", "wc", "wd" };
    dx_gname *o;
    size_t n;
    dx_gname *cyc;
    size_t clen;

    /* New sources are placed first, so d < c < b < a afterwards. */
    assert_int_equal(add(g, "a", "wa"), DX_G_OK);
    assert_int_equal(add(g, "b", "wb"), DX_G_OK);
    assert_int_equal(add(g, "c", "wc"), DX_G_OK);
    assert_int_equal(add(g, "d", "wd"), DX_G_OK);
    assert_int_equal(add(g, "c", "d"), DX_G_OK);
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "c"), DX_G_OK);
    check_order(g, "a", all, 8);

    assert_int_equal(dx_graph_update_order(g, S("a"), &o, &n), DX_G_OK);
    assert_true(find_name(o, n, "a") < find_name(o, n, "b"));
    assert_true(find_name(o, n, "b") < find_name(o, n, "c"));
    assert_true(find_name(o, n, "c") < find_name(o, n, "d"));
    assert_true(find_name(o, n, "d") < find_name(o, n, "wd"));
    free(o);

    /* Path a ~> wd must be a, b, c, d, wd (the stubs wa/wb/wc are dead ends). */
    assert_int_equal(dx_graph_add_edge(g, S("wd"), S("a"), 0, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 6);
    assert_true(is(cyc[0], "wd"));
    assert_true(is(cyc[1], "a"));
    assert_true(is(cyc[2], "b"));
    assert_true(is(cyc[3], "c"));
    assert_true(is(cyc[4], "d"));
    assert_true(is(cyc[5], "wd"));
    assert_int_equal(dx_graph_edge_count(g), 7);
    free(cyc);
    dx_graph_free(g);
}

static void test_diamond(void **state)
{
    dx_graph *g = dx_graph_new();
    static const char *const all[] = { "a", "b", "c", "d" };
    dx_gname *o;
    size_t n;
    /* Inserted bottom-up so that reordering is exercised too. */
    assert_int_equal(add(g, "c", "d"), DX_G_OK);
    assert_int_equal(add(g, "b", "d"), DX_G_OK);
    assert_int_equal(add(g, "a", "c"), DX_G_OK);
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(dx_graph_update_order(g, S("a"), &o, &n), DX_G_OK);
    assert_int_equal(n, 4);
    assert_true(is(o[0], "a"));
    assert_true(is(o[3], "d"));
    assert_true((is(o[1], "b") && is(o[2], "c")) || (is(o[1], "c") && is(o[2], "b")));
    free(o);
    check_order(g, "a", all, 4);

    assert_int_equal(dx_graph_all_dependents(g, S("b"), &o, &n), DX_G_OK);
    assert_int_equal(n, 1);
    assert_true(is(o[0], "d"));
    free(o);
    dx_graph_free(g);
}

static void test_self_loop(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *cyc = NULL;
    size_t clen = 0;

    /* On a node that does not exist yet: refused, nothing created. */
    assert_int_equal(dx_graph_add_edge(g, S("x"), S("x"), 0, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 2);
    assert_true(is(cyc[0], "x") && is(cyc[1], "x"));
    free(cyc);
    assert_int_equal(dx_graph_node_count(g), 0);
    assert_false(dx_graph_has_node(g, S("x")));

    assert_int_equal(add(g, "x", "y"), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("x"), S("x"), 0, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 2);
    assert_true(is(cyc[0], "x") && is(cyc[1], "x"));
    free(cyc);
    assert_int_equal(dx_graph_add_edge(g, S("y"), S("y"), 0, NULL, NULL), DX_G_CYCLE);
    assert_int_equal(dx_graph_edge_count(g), 1);
    assert_int_equal(dx_graph_node_count(g), 2);
    dx_graph_free(g);
}

static void test_three_cycle(void **state)
{
    dx_graph *g = dx_graph_new();
    static const char *const abc[] = { "a", "b", "c" };
    dx_gname *cyc = NULL, *o;
    size_t clen = 0, n;

    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "c"), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("c"), S("a"), 5, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 4);
    assert_true(is(cyc[0], "c") && is(cyc[1], "a") && is(cyc[2], "b") && is(cyc[3], "c"));
    free(cyc);

    /* Unchanged: counts, neighbours and a valid order. */
    assert_int_equal(dx_graph_edge_count(g), 2);
    assert_int_equal(dx_graph_node_count(g), 3);
    assert_int_equal(dx_graph_dependents(g, S("c"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 0);
    assert_int_equal(dx_graph_dependencies(g, S("a"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 0);
    check_order(g, "a", abc, 3);

    /* Still usable afterwards, including an edge that needs reordering. */
    assert_int_equal(add(g, "z", "a"), DX_G_OK);
    assert_int_equal(add(g, "c", "q"), DX_G_OK);
    assert_int_equal(add(g, "q", "z"), DX_G_CYCLE);
    assert_int_equal(add(g, "b", "q"), DX_G_OK);
    {
        static const char *const zall[] = { "z", "a", "b", "c", "q" };
        check_order(g, "z", zall, 5);
    }
    /* Without a path buffer the answer is the same. */
    assert_int_equal(dx_graph_add_edge(g, S("c"), S("a"), 0, &cyc, NULL), DX_G_CYCLE);
    assert_null(cyc);
    dx_graph_free(g);
}

static void test_duplicate_edge(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o;
    int *ty;
    size_t n;
    assert_int_equal(dx_graph_add_edge(g, S("a"), S("b"), 1, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_edge_type(g, S("a"), S("b")), 1);
    assert_int_equal(dx_graph_add_edge(g, S("a"), S("b"), 7, NULL, NULL), DX_G_EXISTS);
    assert_int_equal(dx_graph_edge_type(g, S("a"), S("b")), 7);
    assert_int_equal(dx_graph_edge_type(g, S("b"), S("a")), -1);  /* the other direction: none */
    assert_int_equal(dx_graph_edge_type(g, S("a"), S("zz")), -1); /* an unknown node */
    assert_int_equal(dx_graph_edge_count(g), 1);
    assert_int_equal(dx_graph_dependents(g, S("a"), &o, &ty, &n), DX_G_OK);
    assert_int_equal(n, 1);
    assert_true(is(o[0], "b"));
    assert_int_equal(ty[0], 7);
    free(o);
    free(ty);
    dx_graph_free(g);
}

static void test_remove_edge_then_reverse(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o;
    size_t n;
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "a"), DX_G_CYCLE);
    assert_int_equal(dx_graph_remove_edge(g, S("a"), S("b")), DX_G_OK);
    assert_int_equal(dx_graph_remove_edge(g, S("a"), S("b")), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_remove_edge(g, S("a"), S("zz")), DX_G_NOT_FOUND);
    assert_int_equal(dx_graph_edge_count(g), 0);
    assert_int_equal(dx_graph_node_count(g), 2); /* nodes outlive their edges */
    assert_int_equal(add(g, "b", "a"), DX_G_OK);
    assert_int_equal(dx_graph_update_order(g, S("b"), &o, &n), DX_G_OK);
    assert_int_equal(n, 2);
    assert_true(is(o[0], "b") && is(o[1], "a"));
    free(o);
    assert_int_equal(add(g, "a", "b"), DX_G_CYCLE);
    dx_graph_free(g);
}

static void test_remove_node(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o;
    size_t n;
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "c"), DX_G_OK);
    assert_int_equal(add(g, "x", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "y"), DX_G_OK);
    assert_int_equal(add(g, "a", "y"), DX_G_OK);
    assert_int_equal(add(g, "c", "a"), DX_G_CYCLE);

    assert_int_equal(dx_graph_remove_node(g, S("b")), DX_G_OK);
    assert_int_equal(dx_graph_remove_node(g, S("b")), DX_G_NOT_FOUND);
    assert_false(dx_graph_has_node(g, S("b")));
    assert_int_equal(dx_graph_node_count(g), 4);
    assert_int_equal(dx_graph_edge_count(g), 1);
    assert_int_equal(dx_graph_dependents(g, S("a"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 1);
    assert_true(is(o[0], "y"));
    free(o);
    assert_int_equal(dx_graph_dependencies(g, S("c"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 0);
    assert_int_equal(dx_graph_dependents(g, S("x"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 0);
    /* The path through b is gone. */
    assert_int_equal(add(g, "c", "a"), DX_G_OK);
    /* A recreated b starts with no edges. */
    assert_int_equal(add(g, "b", "q"), DX_G_OK);
    assert_int_equal(dx_graph_dependencies(g, S("b"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 0);
    dx_graph_free(g);
}

static void test_neighbours(void **state)
{
    dx_graph *g = dx_graph_new();
    dx_gname *o;
    int *ty;
    size_t n;
    long i;
    assert_int_equal(dx_graph_add_edge(g, S("a"), S("c"), 1, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("b"), S("c"), 2, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("c"), S("d"), 3, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("c"), S("e"), 4, NULL, NULL), DX_G_OK);

    assert_int_equal(dx_graph_dependencies(g, S("c"), &o, &ty, &n), DX_G_OK);
    assert_int_equal(n, 2);
    i = find_name(o, n, "a");
    assert_true(i >= 0);
    assert_int_equal(ty[i], 1);
    i = find_name(o, n, "b");
    assert_true(i >= 0);
    assert_int_equal(ty[i], 2);
    free(o);
    free(ty);

    assert_int_equal(dx_graph_dependents(g, S("c"), &o, &ty, &n), DX_G_OK);
    assert_int_equal(n, 2);
    i = find_name(o, n, "d");
    assert_true(i >= 0);
    assert_int_equal(ty[i], 3);
    i = find_name(o, n, "e");
    assert_true(i >= 0);
    assert_int_equal(ty[i], 4);
    free(o);
    free(ty);

    assert_int_equal(dx_graph_dependencies(g, S("a"), &o, &ty, &n), DX_G_OK);
    assert_int_equal(n, 0);
    assert_null(o);
    assert_null(ty);
    assert_int_equal(dx_graph_dependents(g, S("a"), &o, NULL, &n), DX_G_OK);
    assert_int_equal(n, 1);
    assert_true(is(o[0], "c"));
    free(o);
    dx_graph_free(g);
}

static void test_clear(void **state)
{
    dx_graph *g = dx_graph_new();
    assert_int_equal(add(g, "a", "b"), DX_G_OK);
    assert_int_equal(add(g, "b", "c"), DX_G_OK);
    dx_graph_clear(g);
    assert_int_equal(dx_graph_node_count(g), 0);
    assert_int_equal(dx_graph_edge_count(g), 0);
    assert_false(dx_graph_has_node(g, S("a")));
    /* Formerly cyclic edge is fine now. */
    assert_int_equal(add(g, "c", "a"), DX_G_OK);
    assert_int_equal(add(g, "a", "c"), DX_G_CYCLE);
    assert_int_equal(dx_graph_node_count(g), 2);
    dx_graph_clear(g);
    dx_graph_clear(g);
    assert_int_equal(dx_graph_node_count(g), 0);
    dx_graph_free(g);
}

static void test_binary_names(void **state)
{
    dx_graph *g = dx_graph_new();
    static const char ab[] = { 'a', 0, 'b' }, ac[] = { 'a', 0, 'c' }, a0[] = { 'a', 0 };
    dx_gname *o, *cyc;
    size_t n, clen;

    assert_int_equal(dx_graph_add_edge(g, ab, 3, ac, 3, 0, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, "a", 1, ab, 3, 0, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, "", 0, "a", 1, 0, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, NULL, 0, a0, 2, 0, NULL, NULL), DX_G_OK); /* empty name again */
    assert_int_equal(dx_graph_node_count(g), 5);
    assert_true(dx_graph_has_node(g, ab, 3));
    assert_true(dx_graph_has_node(g, a0, 2));
    assert_true(dx_graph_has_node(g, "", 0));
    assert_true(dx_graph_has_node(g, ab, 2)); /* prefix "a\0" is the node a0 */
    assert_false(dx_graph_has_node(g, "b", 1));
    assert_false(dx_graph_has_node(g, "a\0bx", 4));

    assert_int_equal(dx_graph_add_edge(g, ac, 3, "", 0, 0, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 5);
    assert_int_equal(cyc[0].len, 3);
    assert_memory_equal(cyc[0].ptr, ac, 3);
    assert_int_equal(cyc[1].len, 0);
    assert_int_equal(cyc[2].len, 1);
    assert_memory_equal(cyc[3].ptr, ab, 3);
    assert_memory_equal(cyc[4].ptr, ac, 3);
    free(cyc);

    assert_int_equal(dx_graph_add_edge(g, a0, 2, a0, 2, 0, &cyc, &clen), DX_G_CYCLE);
    assert_int_equal(clen, 2);
    assert_int_equal(cyc[1].len, 2);
    assert_memory_equal(cyc[1].ptr, a0, 2);
    free(cyc);

    assert_int_equal(dx_graph_update_order(g, "a", 1, &o, &n), DX_G_OK);
    assert_int_equal(n, 3);
    assert_true(is(o[0], "a"));
    assert_int_equal(o[1].len, 3);
    assert_memory_equal(o[1].ptr, ab, 3);
    assert_memory_equal(o[2].ptr, ac, 3);
    free(o);

    assert_int_equal(dx_graph_remove_node(g, ab, 3), DX_G_OK);
    assert_true(dx_graph_has_node(g, ac, 3));
    assert_false(dx_graph_has_node(g, ab, 3));
    assert_int_equal(dx_graph_edge_count(g), 2);
    dx_graph_free(g);
}

struct counter { size_t nodes, edges, stop_after; int typesum; };

static int count_node(void *ctx, dx_gname node)
{
    struct counter *c = ctx;
    c->nodes++;
    return c->stop_after && c->nodes >= c->stop_after;
}

static int count_edge(void *ctx, dx_gname from, dx_gname to, int type)
{
    struct counter *c = ctx;
    c->edges++;
    c->typesum += type;
    if (is(from, "a"))
        assert_true(is(to, "b") || is(to, "c"));
    return c->stop_after && c->edges >= c->stop_after;
}

static void test_foreach(void **state)
{
    dx_graph *g = dx_graph_new();
    struct counter c = { 0, 0, 0, 0 };
    assert_int_equal(dx_graph_add_edge(g, S("a"), S("b"), 1, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("a"), S("c"), 10, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("b"), S("c"), 100, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_add_edge(g, S("d"), S("e"), 1000, NULL, NULL), DX_G_OK);
    assert_int_equal(dx_graph_remove_node(g, S("d")), DX_G_OK);
    dx_graph_foreach_node(g, count_node, &c);
    dx_graph_foreach_edge(g, count_edge, &c);
    assert_int_equal(c.nodes, 4);
    assert_int_equal(c.edges, 3);
    assert_int_equal(c.typesum, 111);
    c.nodes = c.edges = 0;
    c.stop_after = 1;
    dx_graph_foreach_node(g, count_node, &c);
    dx_graph_foreach_edge(g, count_edge, &c);
    assert_int_equal(c.nodes, 1);
    assert_int_equal(c.edges, 1);
    dx_graph_free(g);
}

/* Add/remove churn with ever-new names: everything must go back to empty and
 * recycled ids must not leak state between nodes. */
static void test_churn(void **state)
{
    dx_graph *g = dx_graph_new();
    char a[32], b[32];
    int round, i;
    for (round = 0; round < 30; round++) {
        for (i = 0; i < 300; i++) {
            snprintf(a, sizeof a, "r%d_%d", round, i);
            snprintf(b, sizeof b, "r%d_%d", round, i + 1);
            assert_int_equal(add(g, b, a), DX_G_OK); /* reversed chain: reorders nothing, new sources */
        }
        snprintf(a, sizeof a, "r%d_%d", round, 0);
        snprintf(b, sizeof b, "r%d_%d", round, 300);
        assert_int_equal(add(g, a, b), DX_G_CYCLE);
        assert_int_equal(dx_graph_node_count(g), 301);
        for (i = 0; i <= 300; i += 2) {
            snprintf(a, sizeof a, "r%d_%d", round, i);
            assert_int_equal(dx_graph_remove_node(g, a, strlen(a)), DX_G_OK);
        }
        assert_int_equal(dx_graph_edge_count(g), 0);
        for (i = 1; i <= 300; i += 2) {
            snprintf(a, sizeof a, "r%d_%d", round, i);
            assert_int_equal(dx_graph_remove_node(g, a, strlen(a)), DX_G_OK);
        }
        assert_int_equal(dx_graph_node_count(g), 0);
    }
    /* Recycled slots behave as fresh nodes. */
    assert_int_equal(add(g, "p", "q"), DX_G_OK);
    assert_int_equal(add(g, "q", "p"), DX_G_CYCLE);
    dx_graph_free(g);
}

/* ---- randomized comparison with a reference model ----------------------- */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic and independent of libc. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static uint32_t rnd_below(uint32_t n)
{
    return (uint32_t)((rnd() >> 32) % n);
}

static void seed_rng(uint64_t dflt)
{
    const char *s = getenv("DX_TEST_SEED");
    rng_state = (s && *s) ? strtoull(s, NULL, 0) : dflt;
    if (!rng_state)
        rng_state = 1;
}

#define RN 50

struct ref {
    int exists[RN];
    int has[RN][RN];
    int type[RN][RN];
    uint64_t adj[RN]; /* bitmask of direct successors */
    size_t edges;
};

static uint64_t ref_reach(const struct ref *r, int s)
{
    uint64_t seen = 1ULL << s, frontier = seen;
    while (frontier) {
        uint64_t next = 0;
        int u;
        for (u = 0; u < RN; u++)
            if (frontier & (1ULL << u))
                next |= r->adj[u];
        frontier = next & ~seen;
        seen |= next;
    }
    return seen;
}

static int rname_id(dx_gname n)
{
    char buf[16];
    assert_true(n.len >= 2 && n.len < sizeof buf && n.ptr[0] == 'n');
    memcpy(buf, n.ptr + 1, n.len - 1);
    buf[n.len - 1] = 0;
    return atoi(buf);
}

static void rname(char *buf, int i)
{
    snprintf(buf, 8, "n%d", i);
}

static void ref_check_all(dx_graph *g, const struct ref *r)
{
    int s, i;
    size_t nodes = 0;
    for (s = 0; s < RN; s++)
        nodes += (size_t)r->exists[s];
    assert_int_equal(dx_graph_node_count(g), nodes);
    assert_int_equal(dx_graph_edge_count(g), r->edges);

    for (s = 0; s < RN; s++) {
        char nm[8];
        dx_gname *o;
        size_t n, k;
        int pos[RN];
        uint64_t reach, got = 0;
        rname(nm, s);
        if (!r->exists[s]) {
            assert_false(dx_graph_has_node(g, nm, strlen(nm)));
            assert_int_equal(dx_graph_update_order(g, nm, strlen(nm), &o, &n), DX_G_NOT_FOUND);
            continue;
        }
        assert_int_equal(dx_graph_update_order(g, nm, strlen(nm), &o, &n), DX_G_OK);
        reach = ref_reach(r, s);
        assert_int_equal(n, (size_t)__builtin_popcountll(reach));
        for (i = 0; i < RN; i++)
            pos[i] = -1;
        for (k = 0; k < n; k++) {
            int id = rname_id(o[k]);
            assert_true(id >= 0 && id < RN);
            assert_true(reach & (1ULL << id));
            assert_false(got & (1ULL << id));
            got |= 1ULL << id;
            pos[id] = (int)k;
        }
        assert_int_equal(pos[s], 0);
        /* Every edge inside the set points forward. */
        for (k = 0; k < n; k++) {
            int u = rname_id(o[k]), v;
            for (v = 0; v < RN; v++)
                if (r->has[u][v])
                    assert_true(pos[v] > pos[u]);
        }
        free(o);
    }
}

static void ref_check_neighbours(dx_graph *g, const struct ref *r, int s)
{
    char nm[8];
    dx_gname *o;
    int *ty;
    size_t n, k;
    int v, cnt;
    rname(nm, s);
    if (!r->exists[s]) {
        assert_int_equal(dx_graph_dependents(g, nm, strlen(nm), &o, &ty, &n), DX_G_NOT_FOUND);
        return;
    }
    assert_int_equal(dx_graph_dependents(g, nm, strlen(nm), &o, &ty, &n), DX_G_OK);
    for (v = 0, cnt = 0; v < RN; v++)
        cnt += r->has[s][v];
    assert_int_equal(n, (size_t)cnt);
    for (k = 0; k < n; k++) {
        int id = rname_id(o[k]);
        assert_true(r->has[s][id]);
        assert_int_equal(ty[k], r->type[s][id]);
    }
    free(o);
    free(ty);
    assert_int_equal(dx_graph_dependencies(g, nm, strlen(nm), &o, &ty, &n), DX_G_OK);
    for (v = 0, cnt = 0; v < RN; v++)
        cnt += r->has[v][s];
    assert_int_equal(n, (size_t)cnt);
    for (k = 0; k < n; k++) {
        int id = rname_id(o[k]);
        assert_true(r->has[id][s]);
        assert_int_equal(ty[k], r->type[id][s]);
    }
    free(o);
    free(ty);
    /* all_dependents = update_order minus the node itself */
    {
        dx_gname *a, *u;
        size_t na, nu;
        assert_int_equal(dx_graph_all_dependents(g, nm, strlen(nm), &a, &na), DX_G_OK);
        assert_int_equal(dx_graph_update_order(g, nm, strlen(nm), &u, &nu), DX_G_OK);
        assert_int_equal(na + 1, nu);
        for (k = 0; k < na; k++)
            assert_int_equal(rname_id(a[k]), rname_id(u[k + 1]));
        free(a);
        free(u);
    }
}

static void test_randomized_vs_reference(void **state)
{
    static struct ref r;
    dx_graph *g = dx_graph_new();
    long steps = (long)(20000 * test_scale()), step;
    size_t accepted = 0, cycles = 0, removed = 0, node_removals = 0;
    if (steps < 500)
        steps = 500;
    memset(&r, 0, sizeof r);
    seed_rng(0x5eed1234abcdULL);

    for (step = 0; step < steps; step++) {
        uint32_t op = rnd_below(100);
        int u = (int)rnd_below(RN), v = (int)rnd_below(RN);
        char un[8], vn[8];
        if (rnd_below(50) == 0)
            v = u; /* some self-loops */
        rname(un, u);
        rname(vn, v);
        if (op < 55) {
            int type = (int)rnd_below(1000), expect, rc;
            dx_gname *cyc = NULL;
            size_t clen = 0;
            if (u == v)
                expect = DX_G_CYCLE;
            else if (r.has[u][v])
                expect = DX_G_EXISTS;
            else if (r.exists[u] && r.exists[v] && (ref_reach(&r, v) & (1ULL << u)))
                expect = DX_G_CYCLE;
            else
                expect = DX_G_OK;
            rc = dx_graph_add_edge(g, un, strlen(un), vn, strlen(vn), type, &cyc, &clen);
            assert_int_equal(rc, expect);
            if (rc == DX_G_CYCLE) {
                size_t k;
                cycles++;
                assert_true(clen >= 2);
                assert_int_equal(rname_id(cyc[0]), u);
                assert_int_equal(rname_id(cyc[1]), v);
                assert_int_equal(rname_id(cyc[clen - 1]), u);
                /* The rest is an existing path v ~> u. */
                for (k = 1; k + 1 < clen; k++)
                    assert_true(r.has[rname_id(cyc[k])][rname_id(cyc[k + 1])]);
                free(cyc);
            } else {
                assert_null(cyc);
                if (rc == DX_G_OK) {
                    accepted++;
                    r.has[u][v] = 1;
                    r.adj[u] |= 1ULL << v;
                    r.edges++;
                    r.exists[u] = r.exists[v] = 1;
                }
                r.type[u][v] = type;
            }
        } else if (op < 88) {
            int expect;
            /* Mostly pick an existing edge so that removals actually happen. */
            if (rnd_below(4) != 0 && r.adj[u]) {
                do
                    v = (int)rnd_below(RN);
                while (!r.has[u][v]);
                rname(vn, v);
            }
            expect = r.has[u][v] ? DX_G_OK : DX_G_NOT_FOUND;
            assert_int_equal(dx_graph_remove_edge(g, un, strlen(un), vn, strlen(vn)), expect);
            if (expect == DX_G_OK) {
                removed++;
                r.has[u][v] = 0;
                r.adj[u] &= ~(1ULL << v);
                r.edges--;
            }
        } else if (op < 90) {
            int expect = r.exists[u] ? DX_G_OK : DX_G_NOT_FOUND, w;
            assert_int_equal(dx_graph_remove_node(g, un, strlen(un)), expect);
            if (expect == DX_G_OK) {
                node_removals++;
                for (w = 0; w < RN; w++) {
                    r.edges -= (size_t)(r.has[u][w] + r.has[w][u]);
                    r.has[u][w] = r.has[w][u] = 0;
                    r.adj[w] &= ~(1ULL << u);
                }
                r.adj[u] = 0;
                r.exists[u] = 0;
            }
        } else {
            ref_check_neighbours(g, &r, u);
        }
        ref_check_all(g, &r);
    }
    print_message("randomized: %ld steps, %zu accepted, %zu cycles refused, %zu edge removals, "
                  "%zu node removals, final edges %zu\n",
                  steps, accepted, cycles, removed, node_removals, r.edges);
    /* The run must have exercised every outcome. */
    assert_true(accepted > 100 && cycles > 100 && removed > 100 && node_removals > 10);
    dx_graph_free(g);
}

/* ---- scale -------------------------------------------------------------- */

static double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t vname_id(dx_gname n)
{
    char buf[16];
    assert_true(n.len >= 2 && n.len < sizeof buf && n.ptr[0] == 'v');
    memcpy(buf, n.ptr + 1, n.len - 1);
    buf[n.len - 1] = 0;
    return (uint32_t)strtoul(buf, NULL, 10);
}

static void test_scale_random_dag(void **state)
{
    uint32_t N = (uint32_t)(100000 * test_scale()), i, k;
    size_t E, ok = 0, dup = 0;
    uint32_t *rank, *ef, *et;
    long *pos;
    dx_graph *g = dx_graph_new();
    double t0, dt;
    char a[16], b[16];

    if (N < 1000)
        N = 1000;
    E = (size_t)N * 2;
    seed_rng(0xdecafbadULL);
    rank = malloc(N * sizeof *rank);
    ef = malloc(E * sizeof *ef);
    et = malloc(E * sizeof *et);
    pos = malloc(N * sizeof *pos);
    assert_non_null(rank);
    assert_non_null(ef);
    assert_non_null(et);
    assert_non_null(pos);
    for (i = 0; i < N; i++) {
        rank[i] = i;
        pos[i] = -1;
    }
    for (i = N - 1; i > 0; i--) {
        uint32_t j = rnd_below(i + 1), t = rank[i];
        rank[i] = rank[j];
        rank[j] = t;
    }
    /* Two edges per node, oriented from lower to higher rank: acyclic. */
    for (k = 0; k < E; k++) {
        uint32_t x = (uint32_t)(k / 2), y;
        do
            y = rnd_below(N);
        while (y == x);
        if (rank[x] < rank[y]) {
            ef[k] = x;
            et[k] = y;
        } else {
            ef[k] = y;
            et[k] = x;
        }
    }
    for (k = (uint32_t)E - 1; k > 0; k--) {
        uint32_t j = rnd_below(k + 1), t;
        t = ef[k]; ef[k] = ef[j]; ef[j] = t;
        t = et[k]; et[k] = et[j]; et[j] = t;
    }

    t0 = now_sec();
    for (k = 0; k < E; k++) {
        int rc;
        snprintf(a, sizeof a, "v%u", ef[k]);
        snprintf(b, sizeof b, "v%u", et[k]);
        rc = dx_graph_add_edge(g, a, strlen(a), b, strlen(b), 0, NULL, NULL);
        if (rc == DX_G_OK)
            ok++;
        else if (rc == DX_G_EXISTS)
            dup++;
        else
            fail_msg("edge %zu (%s -> %s) gave %d", (size_t)k, a, b, rc);
    }
    dt = now_sec() - t0;
    print_message("scale: %u nodes, %zu edges inserted (%zu duplicates) in %.3f s, %.3f us/edge\n",
                  N, ok, dup, dt, dt * 1e6 / (double)E);
    assert_int_equal(dx_graph_node_count(g), N);
    assert_int_equal(dx_graph_edge_count(g), ok);

    /* Spot-check update orders against the edges. */
    for (k = 0; k < 20; k++) {
        uint32_t s = rnd_below(N), m;
        dx_gname *o;
        size_t n;
        snprintf(a, sizeof a, "v%u", s);
        assert_int_equal(dx_graph_update_order(g, a, strlen(a), &o, &n), DX_G_OK);
        assert_int_equal(vname_id(o[0]), s);
        for (m = 0; m < n; m++)
            pos[vname_id(o[m])] = (long)m;
        for (m = 0; m < n; m++) {
            dx_gname *d;
            size_t nd, j;
            assert_int_equal(dx_graph_dependents(g, o[m].ptr, o[m].len, &d, NULL, &nd), DX_G_OK);
            for (j = 0; j < nd; j++)
                assert_true(pos[vname_id(d[j])] > (long)m);
            free(d);
        }
        for (m = 0; m < n; m++)
            pos[vname_id(o[m])] = -1;
        free(o);
    }

    /* Close a long cycle: from the farthest dependent of some node back to it. */
    {
        uint32_t s = N, r;
        dx_gname *o = NULL, *cyc = NULL;
        size_t n = 0, clen = 0, before = dx_graph_edge_count(g), j;
        char last[16];
        /* Pick, among the lowest-ranked nodes, the one with the most
         * transitive dependents, so the refused edge needs a long search. */
        uint32_t *inv = malloc(N * sizeof *inv);
        size_t best = 0;
        assert_non_null(inv);
        for (i = 0; i < N; i++)
            inv[rank[i]] = i;
        for (r = 0; r < N && r < 500; r++) {
            snprintf(a, sizeof a, "v%u", inv[r]);
            assert_int_equal(dx_graph_all_dependents(g, a, strlen(a), &o, &n), DX_G_OK);
            if (n > best) {
                best = n;
                s = inv[r];
                snprintf(last, sizeof last, "v%u", vname_id(o[n - 1]));
            }
            free(o);
        }
        free(inv);
        n = best;
        assert_true(n >= 3);
        snprintf(a, sizeof a, "v%u", s);
        assert_true(s < N);
        t0 = now_sec();
        assert_int_equal(dx_graph_add_edge(g, last, strlen(last), a, strlen(a), 0, &cyc, &clen), DX_G_CYCLE);
        dt = now_sec() - t0;
        assert_true(clen >= 3);
        assert_true(is(cyc[0], last));
        assert_true(is(cyc[1], a));
        assert_true(is(cyc[clen - 1], last));
        for (j = 1; j + 1 < clen; j++) {
            dx_gname *d;
            size_t nd;
            char nx[16];
            /* edges only go up in rank, and each step is a real edge */
            assert_true(rank[vname_id(cyc[j])] < rank[vname_id(cyc[j + 1])]);
            assert_int_equal(dx_graph_dependents(g, cyc[j].ptr, cyc[j].len, &d, NULL, &nd), DX_G_OK);
            snprintf(nx, sizeof nx, "v%u", vname_id(cyc[j + 1]));
            assert_true(find_name(d, nd, nx) >= 0);
            free(d);
        }
        print_message("scale: %zu transitive dependents of v%u; closing cycle of length %zu refused in %.3f ms\n",
                      n, s, clen - 1, dt * 1e3);
        free(cyc);
        assert_int_equal(dx_graph_edge_count(g), before);
        assert_false(dx_graph_has_node(g, S("v-none")));
    }

    /* Tear down half the nodes one by one, then the rest with clear. */
    for (i = 0; i < N; i += 2) {
        snprintf(a, sizeof a, "v%u", i);
        assert_int_equal(dx_graph_remove_node(g, a, strlen(a)), DX_G_OK);
    }
    assert_int_equal(dx_graph_node_count(g), N - (N + 1) / 2);
    dx_graph_clear(g);
    assert_int_equal(dx_graph_edge_count(g), 0);

    free(rank);
    free(ef);
    free(et);
    free(pos);
    dx_graph_free(g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty_and_invalid),
        cmocka_unit_test(test_chain),
        cmocka_unit_test(test_chain_needs_reorder),
        cmocka_unit_test(test_diamond),
        cmocka_unit_test(test_self_loop),
        cmocka_unit_test(test_three_cycle),
        cmocka_unit_test(test_duplicate_edge),
        cmocka_unit_test(test_remove_edge_then_reverse),
        cmocka_unit_test(test_remove_node),
        cmocka_unit_test(test_neighbours),
        cmocka_unit_test(test_clear),
        cmocka_unit_test(test_binary_names),
        cmocka_unit_test(test_foreach),
        cmocka_unit_test(test_churn),
        cmocka_unit_test(test_randomized_vs_reference),
        cmocka_unit_test(test_scale_random_dag),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
