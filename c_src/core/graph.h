/*
 * Directed dependency graph with incremental cycle detection.
 *
 * An edge From->To means "To depends on From": when From changes, To must be
 * recomputed. The graph keeps a dynamic topological order (Pearce-Kelly 2006)
 * so that adding an edge only inspects the part of the graph whose order is
 * affected, and a cycle is refused before anything changes.
 *
 * Names are byte strings with an explicit length (any bytes, NUL included).
 * Not thread-safe: the caller serialises mutations. Functions taking a
 * `const dx_graph *` never write to the graph and may run concurrently with
 * each other (e.g. under a read lock).
 *
 * Arrays returned through out-parameters are malloc'd and freed by the caller
 * with free(); when the result is empty they are NULL with a count of 0.
 * Invalid arguments (NULL graph, NULL name with a nonzero length, NULL
 * mandatory out-pointer) never crash: they give DX_G_LIMIT (0 for has_node).
 */
#ifndef DX_GRAPH_H
#define DX_GRAPH_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dx_graph dx_graph;

/* Borrowed view into graph-owned memory: valid until the next mutation. */
typedef struct { const char *ptr; size_t len; } dx_gname;

enum {
    DX_G_OK = 0,
    DX_G_EXISTS = 1,    /* edge already present (its type was updated) */
    DX_G_CYCLE = 2,     /* edge refused: it would close a cycle */
    DX_G_NOT_FOUND = 3,
    DX_G_NOMEM = 4,     /* allocation failed; the graph is unchanged */
    DX_G_LIMIT = 5      /* id space exhausted (~4e9 nodes/edges) or invalid argument */
};

dx_graph *dx_graph_new(void);                     /* NULL on allocation failure */
void dx_graph_free(dx_graph *g);                  /* NULL is fine */
void dx_graph_clear(dx_graph *g);                 /* removes all nodes and edges */
size_t dx_graph_node_count(const dx_graph *g);
size_t dx_graph_edge_count(const dx_graph *g);

/* Adds From->To with a caller-chosen type. Missing nodes are created.
 * DX_G_OK, DX_G_EXISTS (type updated), DX_G_CYCLE, DX_G_NOMEM, DX_G_LIMIT.
 * On DX_G_CYCLE, if both cycle and cycle_len are non-NULL, *cycle receives a
 * malloc'd array [From, To, ..., From]: the new edge followed by the existing
 * path To ~> From (a self-loop gives [X, X]; its names are copies stored inside
 * the array itself, so they live until the array is freed; otherwise they
 * are views valid until the next mutation). On every other result *cycle is
 * set to NULL and *cycle_len to 0. Any result other than OK/EXISTS leaves the
 * graph exactly as it was. */
int dx_graph_add_edge(dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen, int type,
                      dx_gname **cycle, size_t *cycle_len);
int dx_graph_remove_edge(dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen); /* OK / NOT_FOUND */
int dx_graph_remove_node(dx_graph *g, const char *name, size_t len);   /* node + all its edges; OK / NOT_FOUND */
int dx_graph_has_node(const dx_graph *g, const char *name, size_t len); /* 1 / 0 */
/* The type of the edge from -> to, or -1 when there is none. */
int dx_graph_edge_type(const dx_graph *g, const char *from, size_t flen, const char *to, size_t tlen);

/* Direct neighbours: dependencies = X with X->name, dependents = X with name->X.
 * `types` may be NULL when the edge types are not wanted. NOT_FOUND if no such node. */
int dx_graph_dependencies(const dx_graph *g, const char *name, size_t len, dx_gname **out, int **types, size_t *n);
int dx_graph_dependents(const dx_graph *g, const char *name, size_t len, dx_gname **out, int **types, size_t *n);
/* All transitive dependents (the node itself excluded), in topological order. */
int dx_graph_all_dependents(const dx_graph *g, const char *name, size_t len, dx_gname **out, size_t *n);
/* The node followed by all its transitive dependents, in topological order.
 * Costs O(k log k) for k reachable nodes, independent of the graph size. */
int dx_graph_update_order(const dx_graph *g, const char *name, size_t len, dx_gname **out, size_t *n);

/* Visit every node / every edge, in no particular order. The callback returns
 * 0 to continue, anything else to stop. It must not mutate the graph. */
void dx_graph_foreach_node(const dx_graph *g, int (*fn)(void *ctx, dx_gname node), void *ctx);
void dx_graph_foreach_edge(const dx_graph *g, int (*fn)(void *ctx, dx_gname from, dx_gname to, int type), void *ctx);

#ifdef __cplusplus
}
#endif

#endif /* DX_GRAPH_H */
