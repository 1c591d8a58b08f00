/*
 * Dependency graph with incremental cycle detection (Pearce & Kelly, "A
 * Dynamic Topological Sort Algorithm for Directed Acyclic Graphs", 2006).
 *
 * Every node carries an order key `ord`; the invariant is ord[u] < ord[v] for
 * every edge u->v. Keys only need to be distinct, not contiguous, so removed
 * nodes simply leave gaps. Inserting x->y with ord[x] > ord[y] explores only
 * the nodes whose keys lie between ord[y] and ord[x] and permutes their keys.
 *
 * Storage:
 *  - nodes[]: slots indexed by node id, freed slots chained in a free list;
 *  - edges[]: edge records indexed by edge id, likewise recycled;
 *  - per node, out/in arrays of (neighbour, edge id); each edge remembers its
 *    position in both arrays so removal is O(1) by swap-with-last;
 *  - two open-addressing tables (linear probing, backward-shift deletion so no
 *    tombstones accumulate under churn): name -> node id, (from,to) -> edge id.
 *
 * add_edge does every allocation it may need before changing anything, so a
 * failure at any point leaves the graph exactly as it was.
 */
#include "graph.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NONE UINT32_MAX
/* Ids are uint32 with NONE reserved as the empty marker. */
#define MAX_IDS ((size_t)UINT32_MAX - 1u)
#define MIN_TAB 16u

typedef struct { uint32_t node, edge; } adj_ent;
typedef struct { adj_ent *v; uint32_t len, cap; } adj_vec;

typedef struct {
    char *name;          /* NULL marks a free slot */
    size_t len;
    uint64_t hash;       /* cached so rehashing and probing avoid rereading names */
    adj_vec out, in;
    uint32_t next_free;
} gnode;

/* The fields every search step reads for each neighbour, kept in a dense
 * array parallel to nodes[]: a quarter of a cache line per node instead of a
 * whole gnode, which matters once the searched region leaves the cache. */
typedef struct {
    uint64_t ord;        /* topological key */
    uint32_t mark;       /* DFS visited stamp (mutation path only) */
    uint32_t unused;
} ghot;

typedef struct {
    uint32_t from, to;   /* from == NONE marks a free record; `to` then links the free list */
    int type;
    uint32_t out_pos, in_pos;
} gedge;

typedef struct { uint32_t node, pos; } frame;
typedef struct { uint64_t ord; uint32_t id; } opair;

struct dx_graph {
    gnode *nodes;
    ghot *hot;
    size_t nodes_len, nodes_cap, hot_cap, node_free_n, node_count;
    uint32_t node_free;
    uint32_t *ntab;
    size_t ntab_cap;

    gedge *edges;
    size_t edges_len, edges_cap, edge_free_n, edge_count;
    uint32_t edge_free;
    uint32_t *etab;
    size_t etab_cap;

    /* New sources take keys below everything, new sinks above everything, so
     * an edge touching a fresh node never needs reordering. 64 bits: cannot
     * run out in practice. */
    uint64_t ord_lo, ord_hi;
    uint64_t seed;
    uint32_t epoch;

    /* Scratch for add_edge, reused between calls (mutations are serialised). */
    frame *stk;
    size_t stk_cap, stk_len;
    opair *fwd, *bwd;
    size_t fwd_len, fwd_cap, bwd_len, bwd_cap;
    uint64_t *ords;
    size_t ords_cap;
};

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */

/* Returns a buffer with room for `need` elements (possibly moved), or NULL on
 * failure with the old buffer untouched. */
static void *grow_buf(void *p, size_t *cap, size_t need, size_t elem)
{
    size_t nc;
    void *np;
    if (need == 0)
        need = 1;
    if (need <= *cap)
        return p;
    nc = *cap ? *cap : 8;
    while (nc < need) {
        if (nc > SIZE_MAX / 2)
            return NULL;
        nc *= 2;
    }
    if (nc > SIZE_MAX / elem)
        return NULL;
    np = realloc(p, nc * elem);
    if (!np)
        return NULL;
    *cap = nc;
    return np;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* Seeded so that colliding name sets cannot be precomputed. */
static uint64_t name_hash(uint64_t seed, const char *p, size_t n)
{
    uint64_t h = seed ^ mix64((uint64_t)n + 0x9e3779b97f4a7c15ULL);
    uint64_t k;
    while (n >= 8) {
        memcpy(&k, p, 8);
        h = (h ^ mix64(k)) * 0x9e3779b97f4a7c15ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    k = 0;
    if (n)
        memcpy(&k, p, n);
    h = (h ^ mix64(k + 1)) * 0x9e3779b97f4a7c15ULL;
    return mix64(h);
}

static int names_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

static dx_gname view(const gnode *x)
{
    dx_gname v;
    v.ptr = x->name;
    v.len = x->len;
    return v;
}

static int bad_name(const char *p, size_t n)
{
    return p == NULL && n != 0;
}

/* ------------------------------------------------------------------------ */
/* open-addressing id tables                                                 */

typedef uint64_t (*home_fn)(const dx_graph *g, uint32_t id);

static uint64_t node_home(const dx_graph *g, uint32_t id)
{
    return g->nodes[id].hash;
}

static uint64_t edge_key_hash(const dx_graph *g, uint32_t from, uint32_t to)
{
    return mix64((((uint64_t)from << 32) | to) ^ g->seed);
}

static uint64_t edge_home(const dx_graph *g, uint32_t id)
{
    return edge_key_hash(g, g->edges[id].from, g->edges[id].to);
}

static void tab_put(const dx_graph *g, uint32_t *tab, size_t cap, home_fn home, uint32_t id)
{
    size_t mask = cap - 1, i = (size_t)home(g, id) & mask;
    while (tab[i] != NONE)
        i = (i + 1) & mask;
    tab[i] = id;
}

/* Rebuilds into `ncap` slots; on allocation failure the old table stays. */
static int tab_rehash(const dx_graph *g, uint32_t **tab, size_t *cap, home_fn home, size_t ncap)
{
    uint32_t *nt;
    size_t i;
    if (ncap > SIZE_MAX / sizeof *nt)
        return -1;
    nt = malloc(ncap * sizeof *nt);
    if (!nt)
        return -1;
    memset(nt, 0xff, ncap * sizeof *nt);
    for (i = 0; i < *cap; i++)
        if ((*tab)[i] != NONE)
            tab_put(g, nt, ncap, home, (*tab)[i]);
    free(*tab);
    *tab = nt;
    *cap = ncap;
    return 0;
}

/* Keeps the load factor <= 1/2 for `count` entries. */
static int tab_reserve(const dx_graph *g, uint32_t **tab, size_t *cap, home_fn home, size_t count)
{
    size_t ncap;
    if (count <= *cap / 2)
        return 0;
    ncap = *cap ? *cap : MIN_TAB;
    while (ncap / 2 < count) {
        if (ncap > SIZE_MAX / 2)
            return -1;
        ncap *= 2;
    }
    return tab_rehash(g, tab, cap, home, ncap);
}

/* Gives memory back after mass removal; failure is harmless. */
static void tab_maybe_shrink(const dx_graph *g, uint32_t **tab, size_t *cap, home_fn home, size_t count)
{
    if (*cap > MIN_TAB && count < *cap / 8)
        (void)tab_rehash(g, tab, cap, home, *cap / 2);
}

static void tab_del(const dx_graph *g, uint32_t *tab, size_t cap, home_fn home, uint32_t id)
{
    size_t mask = cap - 1, i = (size_t)home(g, id) & mask, j;
    while (tab[i] != id) {
        if (tab[i] == NONE)
            return; /* not present: cannot happen, but never loop forever */
        i = (i + 1) & mask;
    }
    /* Backward shift: pull later members of the probe run into the hole when
     * their home slot does not lie cyclically between the hole and them. */
    j = i;
    for (;;) {
        size_t k;
        j = (j + 1) & mask;
        if (tab[j] == NONE)
            break;
        k = (size_t)home(g, tab[j]) & mask;
        if (((j - k) & mask) >= ((j - i) & mask)) {
            tab[i] = tab[j];
            i = j;
        }
    }
    tab[i] = NONE;
}

static uint32_t node_find(const dx_graph *g, const char *p, size_t n, uint64_t h)
{
    size_t mask, i;
    if (!g->ntab_cap)
        return NONE;
    mask = g->ntab_cap - 1;
    for (i = (size_t)h & mask;; i = (i + 1) & mask) {
        uint32_t id = g->ntab[i];
        const gnode *x;
        if (id == NONE)
            return NONE;
        x = &g->nodes[id];
        if (x->hash == h && names_equal(x->name, x->len, p, n))
            return id;
    }
}

static uint32_t node_lookup(const dx_graph *g, const char *p, size_t n)
{
    return node_find(g, p, n, name_hash(g->seed, p, n));
}

static uint32_t edge_find(const dx_graph *g, uint32_t from, uint32_t to)
{
    size_t mask, i;
    if (!g->etab_cap)
        return NONE;
    mask = g->etab_cap - 1;
    for (i = (size_t)edge_key_hash(g, from, to) & mask;; i = (i + 1) & mask) {
        uint32_t id = g->etab[i];
        if (id == NONE)
            return NONE;
        if (g->edges[id].from == from && g->edges[id].to == to)
            return id;
    }
}

/* ------------------------------------------------------------------------ */
/* adjacency arrays                                                          */

static int adj_reserve1(adj_vec *a)
{
    uint32_t nc;
    size_t bytes;
    adj_ent *nv;
    if (a->len < a->cap)
        return 0;
    if (a->cap == UINT32_MAX)
        return -1;
    nc = a->cap == 0 ? 4 : (a->cap > UINT32_MAX / 2 ? UINT32_MAX : a->cap * 2);
    if (__builtin_mul_overflow((size_t)nc, sizeof *nv, &bytes)) /* only possible with 32-bit size_t */
        return -1;
    nv = realloc(a->v, bytes);
    if (!nv)
        return -1;
    a->v = nv;
    a->cap = nc;
    return 0;
}

/* Releases memory of hub nodes that lost most of their edges. */
static void adj_maybe_shrink(adj_vec *a)
{
    if (a->cap > 8 && a->len < a->cap / 4) {
        adj_ent *nv = realloc(a->v, (size_t)(a->cap / 2) * sizeof *nv);
        if (nv) {
            a->v = nv;
            a->cap /= 2;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* lifecycle                                                                 */

static void reset_fields(dx_graph *g)
{
    uint64_t seed = g->seed;
    memset(g, 0, sizeof *g);
    g->seed = seed;
    g->node_free = NONE;
    g->edge_free = NONE;
    g->ord_lo = (UINT64_C(1) << 63) - 1;
    g->ord_hi = UINT64_C(1) << 63;
}

dx_graph *dx_graph_new(void)
{
    dx_graph *g = calloc(1, sizeof *g);
    uintptr_t a;
    if (!g)
        return NULL;
    a = (uintptr_t)g;
    g->seed = mix64((uint64_t)a ^ ((uint64_t)(uintptr_t)&a << 17) ^ 0x2545f4914f6cdd1dULL);
    reset_fields(g);
    return g;
}

void dx_graph_clear(dx_graph *g)
{
    size_t i;
    if (!g)
        return;
    for (i = 0; i < g->nodes_len; i++) {
        gnode *x = &g->nodes[i];
        if (x->name) {
            free(x->name);
            free(x->out.v);
            free(x->in.v);
        }
    }
    free(g->nodes);
    free(g->hot);
    free(g->ntab);
    free(g->edges);
    free(g->etab);
    free(g->stk);
    free(g->fwd);
    free(g->bwd);
    free(g->ords);
    reset_fields(g);
}

void dx_graph_free(dx_graph *g)
{
    if (!g)
        return;
    dx_graph_clear(g);
    free(g);
}

size_t dx_graph_node_count(const dx_graph *g)
{
    return g ? g->node_count : 0;
}

size_t dx_graph_edge_count(const dx_graph *g)
{
    return g ? g->edge_count : 0;
}

int dx_graph_has_node(const dx_graph *g, const char *name, size_t len)
{
    if (!g || bad_name(name, len))
        return 0;
    return node_lookup(g, name, len) != NONE;
}

int dx_graph_edge_type(const dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen)
{
    if (!g || bad_name(from, flen) || bad_name(to, tlen))
        return -1;
    uint32_t f = node_lookup(g, from, flen), t = node_lookup(g, to, tlen);
    uint32_t e = f != NONE && t != NONE ? edge_find(g, f, t) : NONE;
    return e == NONE ? -1 : g->edges[e].type;
}

/* ------------------------------------------------------------------------ */
/* Pearce-Kelly                                                              */

static void next_epoch(dx_graph *g)
{
    if (++g->epoch == 0) {
        /* Stamps would become ambiguous after wrap-around: reset them. */
        size_t i;
        for (i = 0; i < g->nodes_len; i++)
            g->hot[i].mark = 0;
        g->epoch = 1;
    }
}

static int push_frame(dx_graph *g, uint32_t id)
{
    frame *s = grow_buf(g->stk, &g->stk_cap, g->stk_len + 1, sizeof *s);
    if (!s)
        return -1;
    g->stk = s;
    g->stk[g->stk_len].node = id;
    g->stk[g->stk_len].pos = 0;
    g->stk_len++;
    return 0;
}

static int push_pair(opair **arr, size_t *len, size_t *cap, uint64_t ord, uint32_t id)
{
    opair *a = grow_buf(*arr, cap, *len + 1, sizeof *a);
    if (!a)
        return -1;
    *arr = a;
    a[*len].ord = ord;
    a[*len].id = id;
    (*len)++;
    return 0;
}

/*
 * For a new edge x->y with ord[x] > ord[y]: collects into fwd the nodes
 * reachable from y with ord < ord[x] and into bwd the nodes reaching x with
 * ord > ord[y]. If the forward search meets x the edge closes a cycle: *cycle
 * is set and stk[0..stk_len) holds the path y ~> (predecessor of x).
 * Only writes scratch buffers and visit stamps, never the graph's structure.
 */
static int pk_search(dx_graph *g, uint32_t x, uint32_t y, int *cycle)
{
    uint64_t lb = g->hot[y].ord, ub = g->hot[x].ord;
    uint32_t ep;

    *cycle = 0;
    /* One stamp serves both searches: their sets are disjoint unless y
     * reaches x, and then the backward search never runs. */
    next_epoch(g);
    ep = g->epoch;
    g->stk_len = 0;
    g->fwd_len = 0;
    g->bwd_len = 0;

    /* Iterative DFS: the frame stack is exactly the current path from y,
     * which is what the cycle report needs. */
    if (push_frame(g, y) || push_pair(&g->fwd, &g->fwd_len, &g->fwd_cap, lb, y))
        return DX_G_NOMEM;
    g->hot[y].mark = ep;
    while (g->stk_len) {
        frame *f = &g->stk[g->stk_len - 1];
        const gnode *u = &g->nodes[f->node];
        uint32_t w;
        ghot *wn;
        if (f->pos == u->out.len) {
            g->stk_len--;
            continue;
        }
        w = u->out.v[f->pos++].node;
        if (w == x) {
            *cycle = 1;
            return DX_G_OK;
        }
        wn = &g->hot[w];
        if (wn->mark == ep || wn->ord > ub)
            continue;
        if (push_frame(g, w) || push_pair(&g->fwd, &g->fwd_len, &g->fwd_cap, wn->ord, w))
            return DX_G_NOMEM;
        wn->mark = ep;
    }

    g->stk_len = 0;
    if (push_frame(g, x) || push_pair(&g->bwd, &g->bwd_len, &g->bwd_cap, ub, x))
        return DX_G_NOMEM;
    g->hot[x].mark = ep;
    while (g->stk_len) {
        frame *f = &g->stk[g->stk_len - 1];
        const gnode *u = &g->nodes[f->node];
        uint32_t w;
        ghot *wn;
        if (f->pos == u->in.len) {
            g->stk_len--;
            continue;
        }
        w = u->in.v[f->pos++].node;
        wn = &g->hot[w];
        if (wn->mark == ep || wn->ord < lb)
            continue;
        if (push_frame(g, w) || push_pair(&g->bwd, &g->bwd_len, &g->bwd_cap, wn->ord, w))
            return DX_G_NOMEM;
        wn->mark = ep;
    }

    /* Reserve the merge buffer now so the later reorder cannot fail. */
    {
        uint64_t *o = grow_buf(g->ords, &g->ords_cap, g->fwd_len + g->bwd_len, sizeof *o);
        if (!o)
            return DX_G_NOMEM;
        g->ords = o;
    }
    return DX_G_OK;
}

static int cmp_opair(const void *a, const void *b)
{
    uint64_t x = ((const opair *)a)->ord, y = ((const opair *)b)->ord;
    return (x > y) - (x < y);
}

/* Hands the pooled keys of both sets back out, backward set first, each set
 * keeping its internal relative order. Cannot fail. */
static void pk_reorder(dx_graph *g)
{
    size_t i = 0, j = 0, k = 0;
    qsort(g->fwd, g->fwd_len, sizeof *g->fwd, cmp_opair);
    qsort(g->bwd, g->bwd_len, sizeof *g->bwd, cmp_opair);
    while (i < g->bwd_len || j < g->fwd_len) {
        if (j == g->fwd_len || (i < g->bwd_len && g->bwd[i].ord < g->fwd[j].ord))
            g->ords[k++] = g->bwd[i++].ord;
        else
            g->ords[k++] = g->fwd[j++].ord;
    }
    k = 0;
    for (i = 0; i < g->bwd_len; i++)
        g->hot[g->bwd[i].id].ord = g->ords[k++];
    for (j = 0; j < g->fwd_len; j++)
        g->hot[g->fwd[j].id].ord = g->ords[k++];
}

/* ------------------------------------------------------------------------ */
/* mutation                                                                  */

static int self_loop_path(const char *p, size_t n, dx_gname **cycle, size_t *cycle_len)
{
    dx_gname *a;
    char *copy;
    /* The name may not exist in the graph yet: store a copy in the array
     * itself so the caller's single free() releases everything. */
    if (n > SIZE_MAX - 2 * sizeof *a)
        return DX_G_NOMEM;
    a = malloc(2 * sizeof *a + n);
    if (!a)
        return DX_G_NOMEM;
    copy = (char *)(a + 2);
    if (n)
        memcpy(copy, p, n);
    a[0].ptr = a[1].ptr = copy;
    a[0].len = a[1].len = n;
    *cycle = a;
    *cycle_len = 2;
    return DX_G_CYCLE;
}

static int cycle_path(const dx_graph *g, uint32_t x, dx_gname **cycle, size_t *cycle_len)
{
    size_t n = g->stk_len + 2, i;
    dx_gname *a = malloc(n * sizeof *a);
    if (!a)
        return DX_G_NOMEM;
    a[0] = view(&g->nodes[x]);
    for (i = 0; i < g->stk_len; i++)
        a[i + 1] = view(&g->nodes[g->stk[i].node]);
    a[n - 1] = a[0];
    *cycle = a;
    *cycle_len = n;
    return DX_G_CYCLE;
}

static int node_slots_reserve(dx_graph *g, size_t k)
{
    gnode *nn;
    ghot *nh;
    size_t need;
    if (g->node_free_n >= k)
        return 0;
    need = g->nodes_len + (k - g->node_free_n);
    /* If the second grow fails the first one is merely spare capacity. */
    nn = grow_buf(g->nodes, &g->nodes_cap, need, sizeof *nn);
    if (!nn)
        return -1;
    g->nodes = nn;
    nh = grow_buf(g->hot, &g->hot_cap, need, sizeof *nh);
    if (!nh)
        return -1;
    g->hot = nh;
    return 0;
}

static int edge_slot_reserve(dx_graph *g)
{
    gedge *ne;
    if (g->edge_free_n > 0)
        return 0;
    ne = grow_buf(g->edges, &g->edges_cap, g->edges_len + 1, sizeof *ne);
    if (!ne)
        return -1;
    g->edges = ne;
    return 0;
}

/* Takes ownership of `name` and of a preallocated adjacency buffer. */
static uint32_t node_commit(dx_graph *g, char *name, size_t len, uint64_t h, uint64_t ord,
                            adj_ent *outbuf, adj_ent *inbuf)
{
    uint32_t id;
    gnode *x;
    if (g->node_free != NONE) {
        id = g->node_free;
        g->node_free = g->nodes[id].next_free;
        g->node_free_n--;
    } else {
        id = (uint32_t)g->nodes_len++;
    }
    x = &g->nodes[id];
    memset(x, 0, sizeof *x);
    x->name = name;
    x->len = len;
    x->hash = h;
    g->hot[id].ord = ord;
    g->hot[id].mark = 0;
    x->out.v = outbuf;
    x->out.cap = outbuf ? 1 : 0;
    x->in.v = inbuf;
    x->in.cap = inbuf ? 1 : 0;
    x->next_free = NONE;
    tab_put(g, g->ntab, g->ntab_cap, node_home, id);
    g->node_count++;
    return id;
}

static void edge_commit(dx_graph *g, uint32_t f, uint32_t t, int type)
{
    uint32_t e;
    gedge *ed;
    gnode *fn = &g->nodes[f], *tn = &g->nodes[t];
    if (g->edge_free != NONE) {
        e = g->edge_free;
        g->edge_free = g->edges[e].to;
        g->edge_free_n--;
    } else {
        e = (uint32_t)g->edges_len++;
    }
    ed = &g->edges[e];
    ed->from = f;
    ed->to = t;
    ed->type = type;
    ed->out_pos = fn->out.len;
    ed->in_pos = tn->in.len;
    fn->out.v[fn->out.len].node = t;
    fn->out.v[fn->out.len].edge = e;
    fn->out.len++;
    tn->in.v[tn->in.len].node = f;
    tn->in.v[tn->in.len].edge = e;
    tn->in.len++;
    tab_put(g, g->etab, g->etab_cap, edge_home, e);
    g->edge_count++;
}

/* Removes edge e everywhere; `dying` is a node about to be freed whose
 * arrays need no shrinking. */
static void edge_unlink(dx_graph *g, uint32_t e, uint32_t dying)
{
    gedge *ed = &g->edges[e];
    adj_vec *o = &g->nodes[ed->from].out, *in = &g->nodes[ed->to].in;
    uint32_t p, last;

    p = ed->out_pos;
    last = --o->len;
    if (p != last) {
        o->v[p] = o->v[last];
        g->edges[o->v[p].edge].out_pos = p;
    }
    p = ed->in_pos;
    last = --in->len;
    if (p != last) {
        in->v[p] = in->v[last];
        g->edges[in->v[p].edge].in_pos = p;
    }
    if (ed->from != dying)
        adj_maybe_shrink(o);
    if (ed->to != dying)
        adj_maybe_shrink(in);

    tab_del(g, g->etab, g->etab_cap, edge_home, e);
    ed->from = NONE;
    ed->to = g->edge_free;
    g->edge_free = e;
    g->edge_free_n++;
    g->edge_count--;
}

int dx_graph_add_edge(dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen, int type,
                      dx_gname **cycle, size_t *cycle_len)
{
    int want_path = cycle != NULL && cycle_len != NULL;
    int reorder = 0, rc;
    uint64_t fh, th;
    uint32_t f, t;
    size_t new_nodes;
    char *fname = NULL, *tname = NULL;
    adj_ent *fout = NULL, *tin = NULL;

    if (cycle)
        *cycle = NULL;
    if (cycle_len)
        *cycle_len = 0;
    if (!g || bad_name(from, flen) || bad_name(to, tlen))
        return DX_G_LIMIT;

    if (names_equal(from, flen, to, tlen))
        return want_path ? self_loop_path(from, flen, cycle, cycle_len) : DX_G_CYCLE;

    fh = name_hash(g->seed, from, flen);
    th = name_hash(g->seed, to, tlen);
    f = node_find(g, from, flen, fh);
    t = node_find(g, to, tlen, th);

    /* A fresh node has no edges, so only an edge between two existing nodes
     * can be a duplicate or close a cycle. */
    if (f != NONE && t != NONE) {
        uint32_t e = edge_find(g, f, t);
        if (e != NONE) {
            g->edges[e].type = type;
            return DX_G_EXISTS;
        }
        if (g->hot[f].ord > g->hot[t].ord) {
            int cyc;
            rc = pk_search(g, f, t, &cyc);
            if (rc != DX_G_OK)
                return rc;
            if (cyc)
                return want_path ? cycle_path(g, f, cycle, cycle_len) : DX_G_CYCLE;
            reorder = 1;
        }
    }

    /* Reserve everything; nothing observable changes until the commit below. */
    new_nodes = (size_t)(f == NONE) + (size_t)(t == NONE);
    if (g->node_count + new_nodes > MAX_IDS || g->edge_count + 1 > MAX_IDS)
        return DX_G_LIMIT;
    if (new_nodes) {
        if (node_slots_reserve(g, new_nodes) ||
            tab_reserve(g, &g->ntab, &g->ntab_cap, node_home, g->node_count + new_nodes))
            return DX_G_NOMEM;
    }
    if (edge_slot_reserve(g) || tab_reserve(g, &g->etab, &g->etab_cap, edge_home, g->edge_count + 1))
        return DX_G_NOMEM;
    if (f != NONE && adj_reserve1(&g->nodes[f].out))
        return DX_G_NOMEM;
    if (t != NONE && adj_reserve1(&g->nodes[t].in))
        return DX_G_NOMEM;
    if (f == NONE) {
        fname = malloc(flen ? flen : 1);
        fout = malloc(sizeof *fout);
        if (!fname || !fout)
            goto nomem;
        if (flen)
            memcpy(fname, from, flen);
    }
    if (t == NONE) {
        tname = malloc(tlen ? tlen : 1);
        tin = malloc(sizeof *tin);
        if (!tname || !tin)
            goto nomem;
        if (tlen)
            memcpy(tname, to, tlen);
    }

    /* Commit: nothing below can fail. */
    if (reorder)
        pk_reorder(g);
    if (f == NONE)
        f = node_commit(g, fname, flen, fh, g->ord_lo--, fout, NULL);
    if (t == NONE)
        t = node_commit(g, tname, tlen, th, g->ord_hi++, NULL, tin);
    edge_commit(g, f, t, type);
    return DX_G_OK;

nomem:
    free(fname);
    free(fout);
    free(tname);
    free(tin);
    return DX_G_NOMEM;
}

int dx_graph_remove_edge(dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen)
{
    uint32_t f, t, e;
    if (!g || bad_name(from, flen) || bad_name(to, tlen))
        return DX_G_LIMIT;
    f = node_lookup(g, from, flen);
    t = node_lookup(g, to, tlen);
    if (f == NONE || t == NONE)
        return DX_G_NOT_FOUND;
    e = edge_find(g, f, t);
    if (e == NONE)
        return DX_G_NOT_FOUND;
    /* Deleting an edge never invalidates the topological order. */
    edge_unlink(g, e, NONE);
    tab_maybe_shrink(g, &g->etab, &g->etab_cap, edge_home, g->edge_count);
    return DX_G_OK;
}

int dx_graph_remove_node(dx_graph *g, const char *name, size_t len)
{
    uint32_t id;
    gnode *x;
    if (!g || bad_name(name, len))
        return DX_G_LIMIT;
    id = node_lookup(g, name, len);
    if (id == NONE)
        return DX_G_NOT_FOUND;
    x = &g->nodes[id];
    while (x->out.len)
        edge_unlink(g, x->out.v[x->out.len - 1].edge, id);
    while (x->in.len)
        edge_unlink(g, x->in.v[x->in.len - 1].edge, id);
    tab_del(g, g->ntab, g->ntab_cap, node_home, id);
    free(x->name);
    free(x->out.v);
    free(x->in.v);
    memset(x, 0, sizeof *x);
    x->next_free = g->node_free;
    g->node_free = id;
    g->node_free_n++;
    g->node_count--;
    tab_maybe_shrink(g, &g->etab, &g->etab_cap, edge_home, g->edge_count);
    tab_maybe_shrink(g, &g->ntab, &g->ntab_cap, node_home, g->node_count);
    return DX_G_OK;
}

/* ------------------------------------------------------------------------ */
/* queries (read-only: safe to run concurrently with each other)             */

static int neighbours(const dx_graph *g, const char *name, size_t len, dx_gname **out, int **types,
                      size_t *n, int outgoing)
{
    uint32_t id;
    const adj_vec *a;
    dx_gname *o;
    int *ty = NULL;
    uint32_t i;

    if (out)
        *out = NULL;
    if (types)
        *types = NULL;
    if (n)
        *n = 0;
    if (!g || bad_name(name, len) || !out || !n)
        return DX_G_LIMIT;
    id = node_lookup(g, name, len);
    if (id == NONE)
        return DX_G_NOT_FOUND;
    a = outgoing ? &g->nodes[id].out : &g->nodes[id].in;
    if (a->len == 0)
        return DX_G_OK;
    o = malloc((size_t)a->len * sizeof *o);
    if (types)
        ty = malloc((size_t)a->len * sizeof *ty);
    if (!o || (types && !ty)) {
        free(o);
        free(ty);
        return DX_G_NOMEM;
    }
    for (i = 0; i < a->len; i++) {
        o[i] = view(&g->nodes[a->v[i].node]);
        if (ty)
            ty[i] = g->edges[a->v[i].edge].type;
    }
    *out = o;
    if (types)
        *types = ty;
    *n = a->len;
    return DX_G_OK;
}

int dx_graph_dependencies(const dx_graph *g, const char *name, size_t len, dx_gname **out, int **types, size_t *n)
{
    return neighbours(g, name, len, out, types, n, 0);
}

int dx_graph_dependents(const dx_graph *g, const char *name, size_t len, dx_gname **out, int **types, size_t *n)
{
    return neighbours(g, name, len, out, types, n, 1);
}

/* Private visited set: the per-node stamps cannot be used here because
 * concurrent readers would race on them. */
typedef struct { uint32_t *s; size_t cap, count; } idset;

static int idset_add(idset *st, uint32_t id)
{
    size_t mask, i;
    if ((st->count + 1) * 2 > st->cap) {
        size_t ncap = st->cap ? st->cap * 2 : 64, k;
        uint32_t *ns;
        if (ncap > SIZE_MAX / sizeof *ns)
            return -1;
        ns = malloc(ncap * sizeof *ns);
        if (!ns)
            return -1;
        memset(ns, 0xff, ncap * sizeof *ns);
        for (k = 0; k < st->cap; k++) {
            if (st->s[k] != NONE) {
                size_t j = (size_t)mix64(st->s[k]) & (ncap - 1);
                while (ns[j] != NONE)
                    j = (j + 1) & (ncap - 1);
                ns[j] = st->s[k];
            }
        }
        free(st->s);
        st->s = ns;
        st->cap = ncap;
    }
    mask = st->cap - 1;
    for (i = (size_t)mix64(id) & mask; st->s[i] != NONE; i = (i + 1) & mask)
        if (st->s[i] == id)
            return 0;
    st->s[i] = id;
    st->count++;
    return 1;
}

/* Reachable set from the node, sorted by key: a valid topological order of
 * it since every edge goes from a smaller to a larger key. */
static int reachable(const dx_graph *g, const char *name, size_t len, int include_self, dx_gname **out, size_t *n)
{
    uint32_t s;
    idset seen = { NULL, 0, 0 };
    opair *list = NULL;
    size_t cap = 0, cnt = 0, i, skip;
    dx_gname *o = NULL;
    int rc = DX_G_NOMEM;

    if (out)
        *out = NULL;
    if (n)
        *n = 0;
    if (!g || bad_name(name, len) || !out || !n)
        return DX_G_LIMIT;
    s = node_lookup(g, name, len);
    if (s == NONE)
        return DX_G_NOT_FOUND;

    /* `list` doubles as the BFS work queue. */
    if (idset_add(&seen, s) < 0 || push_pair(&list, &cnt, &cap, g->hot[s].ord, s))
        goto done;
    for (i = 0; i < cnt; i++) {
        const adj_vec *a = &g->nodes[list[i].id].out;
        uint32_t k;
        for (k = 0; k < a->len; k++) {
            uint32_t w = a->v[k].node;
            int added = idset_add(&seen, w);
            if (added < 0)
                goto done;
            if (added && push_pair(&list, &cnt, &cap, g->hot[w].ord, w))
                goto done;
        }
    }
    qsort(list, cnt, sizeof *list, cmp_opair);
    /* The start node has the smallest key of its reachable set. */
    skip = include_self ? 0 : 1;
    if (cnt > skip) {
        o = malloc((cnt - skip) * sizeof *o);
        if (!o)
            goto done;
        for (i = skip; i < cnt; i++)
            o[i - skip] = view(&g->nodes[list[i].id]);
        *out = o;
        *n = cnt - skip;
    }
    rc = DX_G_OK;
done:
    free(seen.s);
    free(list);
    return rc;
}

int dx_graph_all_dependents(const dx_graph *g, const char *name, size_t len, dx_gname **out, size_t *n)
{
    return reachable(g, name, len, 0, out, n);
}

int dx_graph_update_order(const dx_graph *g, const char *name, size_t len, dx_gname **out, size_t *n)
{
    return reachable(g, name, len, 1, out, n);
}

void dx_graph_foreach_node(const dx_graph *g, int (*fn)(void *ctx, dx_gname node), void *ctx)
{
    size_t i;
    if (!g || !fn)
        return;
    for (i = 0; i < g->nodes_len; i++)
        if (g->nodes[i].name && fn(ctx, view(&g->nodes[i])))
            return;
}

void dx_graph_foreach_edge(const dx_graph *g, int (*fn)(void *ctx, dx_gname from, dx_gname to, int type), void *ctx)
{
    size_t i;
    uint32_t k;
    if (!g || !fn)
        return;
    for (i = 0; i < g->nodes_len; i++) {
        const gnode *x = &g->nodes[i];
        if (!x->name)
            continue;
        for (k = 0; k < x->out.len; k++)
            if (fn(ctx, view(x), view(&g->nodes[x->out.v[k].node]), g->edges[x->out.v[k].edge].type))
                return;
    }
}
