/* dspex_grpc_port: the gRPC server of dspex_bridge, run by the BEAM as a port
 * program ({packet,4} external terms on stdin/stdout).
 *
 * gRPC core (C API) accepts calls on several completion-queue threads; each
 * request is unpacked with protobuf-c, turned into a term (maps, see pbterm.h)
 * and sent to the BEAM as
 *     {call, Id, Method, Request, Metadata, DeadlineMs | infinity}
 * The BEAM answers with
 *     {reply, Id, Map}              unary answer (status OK)
 *     {stream, Id, Map}             one streamed message (sent in order)
 *     {close, Id}                   end of a stream (status OK)
 *     {error, Id, Code, Message}    final status (after queued stream messages)
 *     {error, Id, Code, Message, Trailers}   the same with trailing metadata
 *                                   (a map of binaries, e.g. dspex-error)
 * and is told {cancelled, Id} when the client cancels or the deadline passes,
 * and {listening, Port} once the server is up. If the address cannot be
 * served it sends {listen_error, Reason} (eaddrinuse, eacces, eaddrnotavail,
 * bad_address, ... or unknown) and exits with status 2. SO_REUSEPORT is off:
 * a port another process (another node) listens on is an error, never a
 * second listener that the kernel would split the clients with. On stdin
 * EOF every call still open ends UNAVAILABLE and the program exits 0.
 *
 * Usage: dspex_grpc_port --listen HOST:PORT [--threads N]
 *            [--max-message-bytes N] [--stream-queue N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>

#include <ei.h>

#include "dterm.h"
#include "dterm_ei.h"
#include "pbterm.h"
#include "snakepit_bridge.pb-c.h"

/* Calls of each method requested ahead per completion-queue thread (more
 * arrivals wait in the server's queue until a request is re-posted). */
#define REQUESTS_PER_METHOD 8
#define TABLE_BUCKETS 1024

/* ------------------------------------------------------------ configuration */

static const char *g_listen = "127.0.0.1:50051";
static int g_nthreads = 2;
static long g_max_msg = 64L * 1024 * 1024;
static size_t g_stream_queue = 10000;

/* ------------------------------------------------------------ state */

enum tag_kind { T_NEW, T_CLOSE, T_SEND, T_FINISH, T_SHUTDOWN };

/* A call's own batches (T_CLOSE, T_SEND, T_FINISH) complete on a callback
 * queue: gRPC runs the functor in the thread that completed the operation,
 * usually the one that started it, so a reply costs no wake-up of a
 * completion-queue thread. Only new calls (T_NEW) come through the polled
 * queues. Callbacks may run inside grpc_call_start_batch, so no call mutex
 * is ever held across it (see batch_t). */
struct call;
typedef struct tag {
    grpc_completion_queue_functor f; /* first: gRPC hands back its address */
    enum tag_kind kind;
    struct call *c;
} tag_t;

/* A batch decided under a call's mutex and started after it is released. */
typedef struct batch {
    grpc_op ops[3];
    size_t n;
    tag_t *t;
} batch_t;

typedef struct outmsg { grpc_byte_buffer *buf; struct outmsg *next; } outmsg;

typedef struct call {
    tag_t t_new, t_close, t_send, t_finish;
    grpc_call *call;
    grpc_call_details details; /* unregistered (unknown) methods */
    gpr_timespec deadline;     /* registered methods */
    grpc_metadata_array req_md;
    int cq_index;
    grpc_byte_buffer *recv_buf;
    int close_cancelled;
    int method;                 /* index into the service's methods, -1 unknown */
    uint64_t id;
    atomic_int refs;            /* one per batch in flight, one for the table */
    pthread_mutex_t mu;
    /* under mu */
    int md_sent, finishing, finish_started, send_busy, in_table;
    int announced, closed; /* {call} sent to the BEAM; T_CLOSE seen */
    outmsg *qh, *qt;
    size_t qlen;
    grpc_status_code fin_code;
    char *fin_msg;
    grpc_byte_buffer *send_buf, *fin_buf;
    grpc_slice fin_details;
    int fin_details_set;
    grpc_metadata *fin_md;      /* trailing metadata of the status, owned */
    size_t fin_md_n;
    struct call *hnext;
} call_t;

static grpc_server *g_server;
static grpc_completion_queue **g_cqs;
static grpc_completion_queue *g_call_cq; /* callback queue of calls' own batches */
static void **g_methods;                 /* registered method handles, by index */
static pthread_t *g_threads;
static atomic_int g_shutdown;
static atomic_uint_fast64_t g_next_id = 1;

static pthread_mutex_t g_out_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_out_broken;

static pthread_mutex_t g_tab_mu = PTHREAD_MUTEX_INITIALIZER;
static call_t *g_table[TABLE_BUCKETS];

static pthread_mutex_t g_sd_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sd_cv = PTHREAD_COND_INITIALIZER;
static int g_sd_done;       /* SD_SERVER | SD_CALL_CQ once each has shut down */
#define SD_SERVER 1
#define SD_CALL_CQ 2
static tag_t g_shutdown_tag = {{NULL, 0, 0, NULL}, T_SHUTDOWN, NULL};

static const ProtobufCServiceDescriptor *g_svc = &snakepit__bridge__bridge_service__descriptor;

static int method_streams(int m) {
    return m >= 0 && (strcmp(g_svc->methods[m].name, "WatchVariables") == 0 ||
                      strcmp(g_svc->methods[m].name, "ExecuteStreamingTool") == 0 ||
                      strcmp(g_svc->methods[m].name, "WatchEvents") == 0);
}

/* ------------------------------------------------------------ output to the BEAM */

static int write_all(const char *p, size_t n) {
    while (n) {
        ssize_t w = write(STDOUT_FILENO, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One {packet,4} frame; header and body in one writev, as one syscall is
 * the common case for a small term. */
static int send_packet(const ei_x_buff *x) {
    unsigned char hdr[4];
    int rc = -1;
    uint32_t n = (uint32_t)x->index;
    struct iovec iov[2];
    hdr[0] = n >> 24; hdr[1] = n >> 16; hdr[2] = n >> 8; hdr[3] = n;
    iov[0].iov_base = hdr;
    iov[0].iov_len = 4;
    iov[1].iov_base = x->buff;
    iov[1].iov_len = (size_t)x->index;
    pthread_mutex_lock(&g_out_mu);
    if (!g_out_broken) {
        ssize_t w;
        do w = writev(STDOUT_FILENO, iov, 2); while (w < 0 && errno == EINTR);
        if (w == (ssize_t)(4 + n)) rc = 0;
        else if (w >= 0 && w < 4 && write_all((const char *)hdr + w, (size_t)(4 - w)) == 0 &&
                 write_all(x->buff, n) == 0) rc = 0;
        else if (w >= 4 && write_all(x->buff + (w - 4), n - (size_t)(w - 4)) == 0) rc = 0;
        if (rc) g_out_broken = 1;
    }
    pthread_mutex_unlock(&g_out_mu);
    return rc;
}

static void send_simple(const char *what, uint64_t id) {
    ei_x_buff x;
    if (ei_x_new_with_version(&x)) return;
    if (ei_x_encode_tuple_header(&x, 2) == 0 && ei_x_encode_atom(&x, what) == 0 &&
        ei_x_encode_ulonglong(&x, id) == 0)
        (void)send_packet(&x);
    ei_x_free(&x);
}

/* ------------------------------------------------------------ call table */

static void table_put(call_t *c) {
    size_t b = c->id % TABLE_BUCKETS;
    pthread_mutex_lock(&g_tab_mu);
    c->hnext = g_table[b];
    g_table[b] = c;
    c->in_table = 1;
    atomic_fetch_add(&c->refs, 1);
    pthread_mutex_unlock(&g_tab_mu);
}

static void call_unref(call_t *c);

/* Takes a reference for the caller. */
static call_t *table_get(uint64_t id) {
    call_t *c;
    pthread_mutex_lock(&g_tab_mu);
    for (c = g_table[id % TABLE_BUCKETS]; c; c = c->hnext)
        if (c->id == id) { atomic_fetch_add(&c->refs, 1); break; }
    pthread_mutex_unlock(&g_tab_mu);
    return c;
}

static void table_remove(call_t *c) {
    call_t **pp;
    int found = 0;
    pthread_mutex_lock(&g_tab_mu);
    if (c->in_table) {
        for (pp = &g_table[c->id % TABLE_BUCKETS]; *pp; pp = &(*pp)->hnext)
            if (*pp == c) { *pp = c->hnext; found = 1; break; }
        c->in_table = 0;
    }
    pthread_mutex_unlock(&g_tab_mu);
    if (found) call_unref(c);
}

/* ------------------------------------------------------------ call lifecycle */

static void on_event(tag_t *t, int ok);

static void on_callback(grpc_completion_queue_functor *f, int ok) { on_event((tag_t *)f, ok); }

static call_t *call_new(int cq_index, int method) {
    call_t *c = calloc(1, sizeof *c);
    /* inlineable: the handlers only take short locks and start batches */
    const grpc_completion_queue_functor cb = {on_callback, 1, 0, NULL};
    if (!c) return NULL;
    c->t_new = (tag_t){{NULL, 0, 0, NULL}, T_NEW, c};
    c->t_close = (tag_t){cb, T_CLOSE, c};
    c->t_send = (tag_t){cb, T_SEND, c};
    c->t_finish = (tag_t){cb, T_FINISH, c};
    c->cq_index = cq_index;
    c->method = method;
    atomic_init(&c->refs, 1); /* the pending request */
    pthread_mutex_init(&c->mu, NULL);
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->req_md);
    return c;
}

static void drop_queue(call_t *c) {
    while (c->qh) {
        outmsg *m = c->qh;
        c->qh = m->next;
        grpc_byte_buffer_destroy(m->buf);
        free(m);
    }
    c->qt = NULL;
    c->qlen = 0;
}

static void free_metadata(grpc_metadata *md, size_t n) {
    for (size_t i = 0; i < n; i++) {
        grpc_slice_unref(md[i].key);
        grpc_slice_unref(md[i].value);
    }
    free(md);
}

static void call_unref(call_t *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    drop_queue(c);
    if (c->recv_buf) grpc_byte_buffer_destroy(c->recv_buf);
    if (c->send_buf) grpc_byte_buffer_destroy(c->send_buf);
    if (c->fin_buf) grpc_byte_buffer_destroy(c->fin_buf);
    if (c->fin_details_set) grpc_slice_unref(c->fin_details);
    free_metadata(c->fin_md, c->fin_md_n);
    free(c->fin_msg);
    if (c->call) grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->req_md);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* method: index of a registered method, or -1 for the unregistered rest
 * (unknown methods, answered UNIMPLEMENTED). A registered call arrives with
 * its request message already read. */
static void request_one(int cq_index, int method) {
    call_t *c;
    grpc_call_error e;
    if (atomic_load(&g_shutdown)) return;
    if (!(c = call_new(cq_index, method))) { fprintf(stderr, "dspex_grpc_port: out of memory\n"); return; }
    if (method >= 0)
        e = grpc_server_request_registered_call(g_server, g_methods[method], &c->call, &c->deadline, &c->req_md,
                                                &c->recv_buf, g_call_cq, g_cqs[cq_index], &c->t_new);
    else
        e = grpc_server_request_call(g_server, &c->call, &c->details, &c->req_md, g_call_cq, g_cqs[cq_index],
                                     &c->t_new);
    if (e != GRPC_CALL_OK) call_unref(c);
}

static int start_batch(call_t *c, grpc_op *ops, size_t n, tag_t *t) {
    atomic_fetch_add(&c->refs, 1);
    if (grpc_call_start_batch(c->call, ops, n, t, NULL) != GRPC_CALL_OK) {
        atomic_fetch_sub(&c->refs, 1); /* never below 1 here: the caller holds one */
        return -1;
    }
    return 0;
}

/* The final status (and initial metadata if none went yet). mu held. */
static void prepare_finish(call_t *c, batch_t *b) {
    size_t n = 0;
    memset(b, 0, sizeof *b);
    c->finish_started = 1;
    if (!c->md_sent) {
        b->ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->md_sent = 1;
    }
    if (c->fin_buf) {
        b->ops[n].op = GRPC_OP_SEND_MESSAGE;
        b->ops[n].data.send_message.send_message = c->fin_buf;
        n++;
    }
    c->fin_details = grpc_slice_from_copied_string(c->fin_msg ? c->fin_msg : "");
    c->fin_details_set = 1;
    b->ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    b->ops[n].data.send_status_from_server.status = c->fin_code;
    b->ops[n].data.send_status_from_server.status_details = &c->fin_details;
    b->ops[n].data.send_status_from_server.trailing_metadata_count = c->fin_md_n;
    b->ops[n].data.send_status_from_server.trailing_metadata = c->fin_md;
    n++;
    b->n = n;
    b->t = &c->t_finish;
}

/* Decides the final status; it goes out once queued stream messages have.
 * mu held; *b gets the batch to start after unlocking, if any. Takes
 * ownership of last and md. */
static void finish_md_locked(call_t *c, grpc_status_code code, const char *msg, grpc_byte_buffer *last,
                             grpc_metadata *md, size_t nmd, batch_t *b) {
    if (c->finishing) {
        if (last) grpc_byte_buffer_destroy(last);
        free_metadata(md, nmd);
        return;
    }
    c->finishing = 1;
    c->fin_md = md;
    c->fin_md_n = nmd;
    c->fin_code = code;
    c->fin_msg = strdup(msg ? msg : "");
    c->fin_buf = last;
    if (!c->send_busy) prepare_finish(c, b);
}

static void finish_locked(call_t *c, grpc_status_code code, const char *msg, grpc_byte_buffer *last, batch_t *b) {
    finish_md_locked(c, code, msg, last, NULL, 0, b);
}

/* The head of the stream queue. mu held. */
static void prepare_send(call_t *c, batch_t *b) {
    size_t n = 0;
    outmsg *m = c->qh;
    memset(b, 0, sizeof *b);
    c->qh = m->next;
    if (!c->qh) c->qt = NULL;
    c->qlen--;
    c->send_buf = m->buf;
    free(m);
    if (!c->md_sent) {
        b->ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->md_sent = 1;
    }
    b->ops[n].op = GRPC_OP_SEND_MESSAGE;
    b->ops[n].data.send_message.send_message = c->send_buf;
    n++;
    b->n = n;
    b->t = &c->t_send;
    c->send_busy = 1;
}

/* Starts a prepared batch (mu not held: its callback may run right here). */
static void start_prepared(call_t *c, batch_t *b) {
    while (b->n) {
        tag_t *t = b->t;
        if (start_batch(c, b->ops, b->n, t) == 0) return;
        b->n = 0;
        if (t->kind == T_FINISH) {
            fprintf(stderr, "dspex_grpc_port: cannot send status of call %llu\n", (unsigned long long)c->id);
            return;
        }
        /* a send that cannot start: the stream is over, the status may go */
        pthread_mutex_lock(&c->mu);
        c->send_busy = 0;
        grpc_byte_buffer_destroy(c->send_buf);
        c->send_buf = NULL;
        drop_queue(c);
        if (c->finishing && !c->finish_started) prepare_finish(c, b);
        pthread_mutex_unlock(&c->mu);
    }
}

static void finish(call_t *c, grpc_status_code code, const char *msg) {
    batch_t b = {.n = 0};
    pthread_mutex_lock(&c->mu);
    finish_locked(c, code, msg, NULL, &b);
    pthread_mutex_unlock(&c->mu);
    start_prepared(c, &b);
}

/* ------------------------------------------------------------ request in */

/* Request metadata as a map of binaries; the "dspex-context" header (the
 * access-control context, a JSON object) arrives parsed. Returns 0, -1 (no
 * memory) or -2 (bad dspex-context JSON). */
static int metadata_term(const grpc_metadata_array *md, dterm *t) {
    static const char ctx_key[] = "dspex-context";
    if (dt_map(t, md->count)) return -1;
    for (size_t i = 0; i < md->count; i++) {
        const grpc_metadata *m = &md->metadata[i];
        size_t kn = GRPC_SLICE_LENGTH(m->key), vn = GRPC_SLICE_LENGTH(m->value);
        const char *v = (const char *)GRPC_SLICE_START_PTR(m->value);
        if (dt_bin(&t->u.map.k[i], GRPC_SLICE_START_PTR(m->key), kn)) return -1;
        if (kn == sizeof ctx_key - 1 && memcmp(GRPC_SLICE_START_PTR(m->key), ctx_key, kn) == 0) {
            const char *jerr;
            if (dt_parse_json(v, vn, &t->u.map.v[i], &jerr) || t->u.map.v[i].kind != DT_MAP) return -2;
        } else if (dt_bin(&t->u.map.v[i], v, vn)) {
            return -1;
        }
    }
    dt_map_dedupe(t);
    return 0;
}

static int encode_deadline(ei_x_buff *x, gpr_timespec dl) {
    gpr_timespec now, mono;
    if (gpr_time_cmp(dl, gpr_inf_future(dl.clock_type)) >= 0) return ei_x_encode_atom(x, "infinity");
    mono = gpr_convert_clock_type(dl, GPR_CLOCK_MONOTONIC);
    now = gpr_now(GPR_CLOCK_MONOTONIC);
    if (gpr_time_cmp(mono, now) <= 0) return ei_x_encode_long(x, 0);
    return ei_x_encode_longlong(x, (long long)gpr_time_to_millis(gpr_time_sub(mono, now)));
}

/* The close notice is armed before the call is announced (it must be, to
 * see every cancel), so it may complete first: {cancelled, Id} then waits for
 * {call, Id}, else the BEAM ignores it and the late call's handler (a watch
 * loop) runs forever. Whichever of the two comes second under c->mu sends it. */
static void mark_announced(call_t *c) {
    int tell;
    pthread_mutex_lock(&c->mu);
    c->announced = 1;
    tell = c->closed && c->close_cancelled;
    pthread_mutex_unlock(&c->mu);
    if (tell) send_simple("cancelled", c->id);
}

static void on_request(call_t *c) {
    grpc_byte_buffer_reader rdr;
    grpc_slice s;
    ProtobufCMessage *req;
    const ProtobufCMessageDescriptor *d = g_svc->methods[c->method].input;
    dterm term, md;
    char err[256];
    ei_x_buff x;
    int ok;

    if (grpc_byte_buffer_reader_init(&rdr, c->recv_buf) == 0) { finish(c, GRPC_STATUS_INTERNAL, "cannot read request"); return; }
    s = grpc_byte_buffer_reader_readall(&rdr);
    grpc_byte_buffer_reader_destroy(&rdr);
    grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = NULL;
    req = pb_unpack(d, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!req) { finish(c, GRPC_STATUS_INVALID_ARGUMENT, "malformed request message"); return; }
    ok = pb_to_term(req, &term, err, sizeof err) == 0;
    pb_free_unpacked(req);
    if (!ok) { finish(c, GRPC_STATUS_INVALID_ARGUMENT, err); return; }
    if ((ok = metadata_term(&c->req_md, &md)) != 0) {
        dt_free(&term);
        dt_free(&md);
        if (ok == -2) finish(c, GRPC_STATUS_INVALID_ARGUMENT, "dspex-context metadata must be a JSON object");
        else finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    ok = ei_x_new_with_version(&x) == 0;
    ok = ok && ei_x_encode_tuple_header(&x, 6) == 0 && ei_x_encode_atom(&x, "call") == 0 &&
         ei_x_encode_ulonglong(&x, c->id) == 0 && ei_x_encode_atom(&x, g_svc->methods[c->method].name) == 0 &&
         dt_encode_ei(&x, &term) == 0 && dt_encode_ei(&x, &md) == 0 && encode_deadline(&x, c->method >= 0 ? c->deadline : c->details.deadline) == 0;
    dt_free(&term);
    dt_free(&md);
    if (!ok) { ei_x_free(&x); finish(c, GRPC_STATUS_INVALID_ARGUMENT, "request cannot be represented"); return; }
    if (atomic_load(&g_shutdown) || send_packet(&x) != 0)
        finish(c, GRPC_STATUS_UNAVAILABLE, "dspex bridge is shutting down");
    else
        mark_announced(c);
    ei_x_free(&x);
}

static void on_new_call(call_t *c) {
    grpc_op op;
    request_one(c->cq_index, c->method); /* keep REQUESTS_PER_METHOD requests pending */
    c->id = atomic_fetch_add(&g_next_id, 1);
    table_put(c);
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->close_cancelled;
    if (start_batch(c, &op, 1, &c->t_close) != 0) {
        table_remove(c);
        return;
    }
    if (c->method < 0) {
        finish(c, GRPC_STATUS_UNIMPLEMENTED, "unknown method");
        return;
    }
    if (atomic_load(&g_shutdown)) {
        finish(c, GRPC_STATUS_UNAVAILABLE, "dspex bridge is shutting down");
        return;
    }
    if (c->recv_buf) on_request(c);
    else finish(c, GRPC_STATUS_INVALID_ARGUMENT, "no request message");
}

/* ------------------------------------------------------------ completion-queue threads */

static void on_event(tag_t *t, int ok) {
    call_t *c = t->c;
    batch_t b = {.n = 0};
    switch (t->kind) {
    case T_SHUTDOWN:
        pthread_mutex_lock(&g_sd_mu);
        g_sd_done |= SD_SERVER;
        pthread_cond_broadcast(&g_sd_cv);
        pthread_mutex_unlock(&g_sd_mu);
        return;
    case T_NEW:
        if (ok) on_new_call(c);
        call_unref(c); /* the request's reference */
        return;
    case T_CLOSE: {
        int tell;
        pthread_mutex_lock(&c->mu);
        if (c->close_cancelled && !c->finish_started) {
            c->finishing = 1; /* nothing more goes out */
            drop_queue(c);
        }
        c->closed = 1;
        tell = c->close_cancelled && c->announced; /* else mark_announced() tells */
        pthread_mutex_unlock(&c->mu);
        if (tell) send_simple("cancelled", c->id);
        table_remove(c);
        break;
    }
    case T_SEND:
        pthread_mutex_lock(&c->mu);
        grpc_byte_buffer_destroy(c->send_buf);
        c->send_buf = NULL;
        c->send_busy = 0;
        if (!ok) drop_queue(c); /* the call is gone; T_CLOSE reports it */
        if (ok && c->qh) prepare_send(c, &b);
        else if (c->finishing && !c->finish_started) prepare_finish(c, &b);
        pthread_mutex_unlock(&c->mu);
        start_prepared(c, &b);
        break;
    case T_FINISH:
        table_remove(c);
        break;
    }
    call_unref(c); /* the batch's reference */
}

static void *cq_thread(void *arg) {
    int i = (int)(intptr_t)arg;
    for (int k = 0; k < REQUESTS_PER_METHOD; k++) {
        request_one(i, -1);
        for (unsigned m = 0; m < g_svc->n_methods; m++) request_one(i, (int)m);
    }
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(g_cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type == GRPC_OP_COMPLETE) on_event((tag_t *)ev.tag, ev.success);
    }
    return NULL;
}

/* ------------------------------------------------------------ input from the BEAM */

/* NULL on failure, with *code INTERNAL (a reply that does not fit the
 * message) or RESOURCE_EXHAUSTED (over the maximum message size). */
static grpc_byte_buffer *pack_reply(int method, const dterm *map, char *err, size_t errlen, grpc_status_code *code) {
    ProtobufCMessage *m;
    size_t n;
    grpc_slice s;
    grpc_byte_buffer *bb;
    *code = GRPC_STATUS_INTERNAL;
    if (pb_from_term(g_svc->methods[method].output, map, &m, err, errlen)) return NULL;
    n = protobuf_c_message_get_packed_size(m);
    if (n > (size_t)g_max_msg) {
        protobuf_c_message_free_unpacked(m, NULL);
        snprintf(err, errlen, "reply of %zu bytes exceeds the maximum message size", n);
        *code = GRPC_STATUS_RESOURCE_EXHAUSTED;
        return NULL;
    }
    s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    protobuf_c_message_free_unpacked(m, NULL);
    bb = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return bb;
}

/* Trailing metadata of an error status: a map of at most 16 header names
 * (lowercase letters, digits, - _ ., not grpc-*, not *-bin) to printable
 * ASCII values of at most 1 KiB. 0 with *md NULL for an empty map; -1 for
 * anything else (the status then goes without trailers). */
#define MAX_TRAILERS 16
static int trailers_from_term(const dterm *t, grpc_metadata **md, size_t *n) {
    *md = NULL;
    *n = 0;
    if (t->kind != DT_MAP || t->u.map.n > MAX_TRAILERS) return -1;
    for (size_t i = 0; i < t->u.map.n; i++) {
        const dterm *k = &t->u.map.k[i], *v = &t->u.map.v[i];
        if ((k->kind != DT_BIN && k->kind != DT_ATOM) || v->kind != DT_BIN || k->u.s.n == 0 || k->u.s.n > 64 ||
            v->u.s.n > 1024 || strspn(k->u.s.p, "abcdefghijklmnopqrstuvwxyz0123456789-_.") != k->u.s.n ||
            strncmp(k->u.s.p, "grpc-", 5) == 0 || (k->u.s.n >= 4 && strcmp(k->u.s.p + k->u.s.n - 4, "-bin") == 0))
            return -1;
        for (size_t j = 0; j < v->u.s.n; j++)
            if ((unsigned char)v->u.s.p[j] < 0x20 || (unsigned char)v->u.s.p[j] > 0x7e) return -1;
    }
    if (!t->u.map.n) return 0;
    if (!(*md = calloc(t->u.map.n, sizeof **md))) return -1;
    for (size_t i = 0; i < t->u.map.n; i++) {
        (*md)[i].key = grpc_slice_from_copied_buffer(t->u.map.k[i].u.s.p, t->u.map.k[i].u.s.n);
        (*md)[i].value = grpc_slice_from_copied_buffer(t->u.map.v[i].u.s.p, t->u.map.v[i].u.s.n);
    }
    *n = t->u.map.n;
    return 0;
}

/* Trailers of a status decided here rather than by the BEAM: dspex-error
 * (and dspex-limit), as dspex_grpc_status:trailers/1 makes them. NULL (no
 * trailers) if out of memory. */
static grpc_metadata *reason_md(const char *reason, const char *limit, size_t *n) {
    grpc_metadata *md = calloc(2, sizeof *md);
    *n = 0;
    if (!md) return NULL;
    md[0].key = grpc_slice_from_static_string("dspex-error");
    md[0].value = grpc_slice_from_static_string(reason);
    *n = 1;
    if (limit) {
        md[1].key = grpc_slice_from_static_string("dspex-limit");
        md[1].value = grpc_slice_from_static_string(limit);
        *n = 2;
    }
    return md;
}

/* A reply that cannot be packed: over the maximum message size (a limit,
 * RESOURCE_EXHAUSTED) or not fitting the message (INTERNAL). mu held. */
static void finish_unpackable(call_t *c, grpc_status_code code, const char *err, batch_t *b) {
    size_t n;
    grpc_metadata *md = code == GRPC_STATUS_RESOURCE_EXHAUSTED ? reason_md("limit_exceeded", "message_size", &n)
                                                               : reason_md("internal", NULL, &n);
    finish_md_locked(c, code, err, NULL, md, n, b);
}

static int term_id(const dterm *t, uint64_t *id) {
    if (t->kind != DT_INT || t->u.i < 0) return -1;
    *id = (uint64_t)t->u.i;
    return 0;
}

/* One command from the BEAM. Malformed commands are reported and skipped. */
static void dispatch(const dterm *t) {
    const dterm *v;
    call_t *c;
    uint64_t id;
    char err[256];
    grpc_status_code code;
    batch_t b = {.n = 0};
    if (t->kind != DT_TUPLE || t->u.seq.n < 2 || t->u.seq.v[0].kind != DT_ATOM || term_id(&t->u.seq.v[1], &id)) {
        fprintf(stderr, "dspex_grpc_port: malformed command ignored\n");
        return;
    }
    v = t->u.seq.v;
    if (!(c = table_get(id))) return; /* finished or cancelled meanwhile */
    if (dt_is_atom(&v[0], "reply") && t->u.seq.n == 3 && c->method >= 0) {
        grpc_byte_buffer *bb = pack_reply(c->method, &v[2], err, sizeof err, &code);
        pthread_mutex_lock(&c->mu);
        if (bb) finish_locked(c, GRPC_STATUS_OK, "", bb, &b);
        else {
            fprintf(stderr, "dspex_grpc_port: bad reply for %s: %s\n", g_svc->methods[c->method].name, err);
            finish_unpackable(c, code, err, &b);
        }
        pthread_mutex_unlock(&c->mu);
    } else if (dt_is_atom(&v[0], "stream") && t->u.seq.n == 3 && method_streams(c->method)) {
        grpc_byte_buffer *bb = pack_reply(c->method, &v[2], err, sizeof err, &code);
        pthread_mutex_lock(&c->mu);
        if (c->finishing) {
            if (bb) grpc_byte_buffer_destroy(bb);
        } else if (!bb) {
            fprintf(stderr, "dspex_grpc_port: bad stream message for %s: %s\n", g_svc->methods[c->method].name, err);
            finish_unpackable(c, code, err, &b);
        } else if (c->qlen >= g_stream_queue) {
            /* a reader too slow for its stream: end it rather than grow without bound */
            size_t nmd;
            grpc_metadata *md = reason_md("slow_consumer", NULL, &nmd);
            grpc_byte_buffer_destroy(bb);
            drop_queue(c);
            finish_md_locked(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "stream consumer too slow", NULL, md, nmd, &b);
            pthread_mutex_unlock(&c->mu);
            start_prepared(c, &b);
            send_simple("cancelled", c->id);
            call_unref(c);
            return;
        } else {
            outmsg *m = malloc(sizeof *m);
            if (!m) {
                grpc_byte_buffer_destroy(bb);
                finish_locked(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL, &b);
            } else {
                m->buf = bb;
                m->next = NULL;
                if (c->qt) c->qt->next = m; else c->qh = m;
                c->qt = m;
                c->qlen++;
                if (!c->send_busy) prepare_send(c, &b);
            }
        }
        pthread_mutex_unlock(&c->mu);
    } else if (dt_is_atom(&v[0], "close") && t->u.seq.n == 2) {
        finish(c, GRPC_STATUS_OK, "");
    } else if (dt_is_atom(&v[0], "error") && (t->u.seq.n == 4 || t->u.seq.n == 5) && v[2].kind == DT_INT &&
               v[2].u.i >= 1 && v[2].u.i <= 16 && v[3].kind == DT_BIN && !memchr(v[3].u.s.p, 0, v[3].u.s.n)) {
        grpc_metadata *md = NULL;
        size_t nmd = 0;
        if (t->u.seq.n == 5 && trailers_from_term(&v[4], &md, &nmd))
            fprintf(stderr, "dspex_grpc_port: bad trailers for call %llu ignored\n", (unsigned long long)id);
        pthread_mutex_lock(&c->mu);
        finish_md_locked(c, (grpc_status_code)v[2].u.i, v[3].u.s.p, NULL, md, nmd, &b);
        pthread_mutex_unlock(&c->mu);
    } else {
        fprintf(stderr, "dspex_grpc_port: malformed command for call %llu ignored\n", (unsigned long long)id);
    }
    start_prepared(c, &b);
    call_unref(c);
}

/* A command that does not decode (a term the port cannot represent) but names
 * its call: the call ends INTERNAL at once instead of waiting, unanswered, for
 * its deadline (or forever without one), and the BEAM is told, as for a
 * cancel, so a streaming handler stops. */
static void fail_undecodable(const unsigned char *frame, size_t n) {
    uint64_t id;
    call_t *c;
    batch_t b = {.n = 0};
    if (dt_etf_peek_call_id(frame, n, &id) || !(c = table_get(id))) {
        fprintf(stderr, "dspex_grpc_port: undecodable command ignored\n");
        return;
    }
    fprintf(stderr, "dspex_grpc_port: undecodable command for call %llu: call failed\n", (unsigned long long)id);
    pthread_mutex_lock(&c->mu);
    if (!c->finishing) {
        drop_queue(c);
        finish_unpackable(c, GRPC_STATUS_INTERNAL, "reply could not be encoded (a term with no protobuf/JSON form)", &b);
    }
    pthread_mutex_unlock(&c->mu);
    start_prepared(c, &b);
    send_simple("cancelled", c->id);
    call_unref(c);
}

/* Commands are read in big chunks: under load one read() brings several. */
static void read_loop(void) {
    /* a reply can carry a max-size message plus term overhead */
    size_t max = (size_t)g_max_msg * 2 + (1u << 20), cap = 1u << 16, len = 0, off = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) return;
    for (;;) {
        ssize_t r;
        /* every whole {packet,4} frame in the buffer */
        while (len - off >= 4) {
            const unsigned char *h = buf + off;
            uint32_t n = ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3];
            dterm t;
            if (n > max) { fprintf(stderr, "dspex_grpc_port: oversized command (%u bytes)\n", n); goto out; }
            if (len - off - 4 < n) {
                if (4 + (size_t)n > cap) { /* grow to hold this frame whole */
                    unsigned char *nb;
                    size_t ncap = cap;
                    while (ncap < 4 + (size_t)n) ncap *= 2;
                    memmove(buf, buf + off, len - off);
                    len -= off;
                    off = 0;
                    if (!(nb = realloc(buf, ncap))) goto out;
                    buf = nb;
                    cap = ncap;
                }
                break;
            }
            if (dt_decode_etf(buf + off + 4, n, &t) == 0) {
                dispatch(&t);
                dt_free(&t);
            } else {
                fail_undecodable(buf + off + 4, n);
            }
            off += 4 + (size_t)n;
        }
        if (off == len) off = len = 0;
        else if (cap - len < 4096 || off > cap / 2) { /* keep room to read into */
            memmove(buf, buf + off, len - off);
            len -= off;
            off = 0;
        }
        do r = read(STDIN_FILENO, buf + len, cap - len); while (r < 0 && errno == EINTR);
        if (r <= 0) break;
        len += (size_t)r;
    }
out:
    free(buf);
}

/* ------------------------------------------------------------ shutdown */

static void end_open_calls(void) {
    size_t n = 0, cap = 64;
    call_t **open = malloc(cap * sizeof *open);
    if (!open) return;
    pthread_mutex_lock(&g_tab_mu);
    for (size_t b = 0; b < TABLE_BUCKETS; b++)
        for (call_t *c = g_table[b]; c; c = c->hnext) {
            if (n == cap) {
                call_t **no = realloc(open, cap * 2 * sizeof *open);
                if (!no) break;
                open = no;
                cap *= 2;
            }
            atomic_fetch_add(&c->refs, 1);
            open[n++] = c;
        }
    pthread_mutex_unlock(&g_tab_mu);
    for (size_t i = 0; i < n; i++) {
        batch_t b = {.n = 0};
        pthread_mutex_lock(&open[i]->mu);
        drop_queue(open[i]); /* no point streaming more: the source is gone */
        finish_locked(open[i], GRPC_STATUS_UNAVAILABLE, "dspex bridge closed (BEAM side went away)", NULL, &b);
        pthread_mutex_unlock(&open[i]->mu);
        start_prepared(open[i], &b);
        call_unref(open[i]);
    }
    free(open);
}

/* The callback queue reports its own shutdown once its last batch is done. */
static void call_cq_down(grpc_completion_queue_functor *f, int ok) {
    (void)f;
    (void)ok;
    pthread_mutex_lock(&g_sd_mu);
    g_sd_done |= SD_CALL_CQ;
    pthread_cond_broadcast(&g_sd_cv);
    pthread_mutex_unlock(&g_sd_mu);
}
static grpc_completion_queue_functor g_call_cq_down = {call_cq_down, 0, 0, NULL};

/* Waits up to `seconds` for the shutdown flag `what`; nonzero once it is set. */
static int wait_shutdown(int what, int seconds) {
    struct timespec ts;
    int done;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += seconds;
    pthread_mutex_lock(&g_sd_mu);
    while (!(g_sd_done & what))
        if (pthread_cond_timedwait(&g_sd_cv, &g_sd_mu, &ts) == ETIMEDOUT) break;
    done = g_sd_done & what;
    pthread_mutex_unlock(&g_sd_mu);
    return done;
}

/* ------------------------------------------------------------ listen address */

/* Why `addr` (HOST:PORT or [HOST]:PORT) cannot be listened on: a bind of
 * every address it resolves to, as gRPC core does it (SO_REUSEADDR, no
 * SO_REUSEPORT, dual-stack for the IPv6 wildcard), tells the errno. Returns
 * the reason as an Erlang-style atom name, or NULL when every address binds
 * (or the form is one gRPC resolves itself, e.g. unix:PATH, or port 0). A
 * host that resolves to several addresses (localhost) fails as a whole if any
 * of them is taken, where gRPC core would serve the free ones only. */
static const char *listen_failure(const char *addr) {
    char host[256], port[16];
    const char *colon, *h = addr;
    size_t hn;
    struct addrinfo hints, *res = NULL, *ai;
    const char *why = NULL, *unusable = "unknown";
    int rc, usable = 0;
    if (addr[0] == '[') {
        const char *e = strchr(addr, ']');
        if (!e || e[1] != ':') return NULL;
        h = addr + 1;
        hn = (size_t)(e - h);
        colon = e + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || strchr(addr, ':') != colon) return NULL;
        hn = (size_t)(colon - addr);
    }
    if (hn >= sizeof host || strlen(colon + 1) >= sizeof port || !colon[1] ||
        strspn(colon + 1, "0123456789") != strlen(colon + 1))
        return NULL;
    memcpy(host, h, hn);
    host[hn] = 0;
    strcpy(port, colon + 1);
    if (atoi(port) == 0) return NULL; /* any free port */
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    if ((rc = getaddrinfo(hn ? host : NULL, port, &hints, &res)) != 0) return "bad_address";
    /* an address this host cannot have (::1 with IPv6 off) is skipped, as
     * gRPC skips it; a taken or forbidden one fails the whole address */
    for (ai = res; ai && !why; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol), one = 1, zero = 0;
        if (fd < 0) { unusable = "eafnosupport"; continue; }
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (ai->ai_family == AF_INET6 &&
            IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr))
            (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0) usable++;
        else if (errno == EADDRINUSE) why = "eaddrinuse";
        else if (errno == EACCES) why = "eacces";
        else if (errno == EADDRNOTAVAIL || errno == EAFNOSUPPORT)
            unusable = errno == EADDRNOTAVAIL ? "eaddrnotavail" : "eafnosupport";
        else why = "unknown";
        close(fd);
    }
    freeaddrinfo(res);
    return why ? why : usable ? NULL : unusable;
}

static void send_listen_error(const char *why) {
    ei_x_buff x;
    if (ei_x_new_with_version(&x)) return;
    if (ei_x_encode_tuple_header(&x, 2) == 0 && ei_x_encode_atom(&x, "listen_error") == 0 &&
        ei_x_encode_atom(&x, why) == 0)
        (void)send_packet(&x);
    ei_x_free(&x);
}

/* ------------------------------------------------------------ main */

static int parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end;
        long n;
        if (!v) return -1;
        if (!strcmp(a, "--listen")) { g_listen = v; i++; continue; }
        n = strtol(v, &end, 10);
        if (*end || n <= 0) return -1;
        if (!strcmp(a, "--threads") && n <= 64) g_nthreads = (int)n;
        /* at most 512 MiB: a request's term (up to ~2.5x its protobuf size)
         * must stay under the 2 GiB an ei_x_buff index can count */
        else if (!strcmp(a, "--max-message-bytes") && n <= (1L << 29)) g_max_msg = n;
        else if (!strcmp(a, "--stream-queue")) g_stream_queue = (size_t)n;
        else return -1;
        i++;
    }
    return 0;
}

int main(int argc, char **argv) {
    grpc_arg args[3];
    const char *why;
    grpc_channel_args cargs;
    grpc_server_credentials *creds;
    int port;
    ei_x_buff x;

    signal(SIGPIPE, SIG_IGN);
    if (parse_args(argc, argv)) {
        fprintf(stderr, "usage: %s --listen HOST:PORT [--threads N] [--max-message-bytes N] [--stream-queue N]\n", argv[0]);
        return 64;
    }
    ei_init();
    grpc_init();

    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[0].value.integer = (int)g_max_msg;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[1].value.integer = (int)g_max_msg;
    /* gRPC core sets SO_REUSEPORT by default: a second node on the same
     * port would then listen too, and clients would be split between two
     * unrelated stores */
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_ALLOW_REUSEPORT;
    args[2].value.integer = 0;
    cargs.num_args = 3;
    cargs.args = args;
    g_server = grpc_server_create(&cargs, NULL);
    g_cqs = calloc((size_t)g_nthreads, sizeof *g_cqs);
    g_threads = calloc((size_t)g_nthreads, sizeof *g_threads);
    g_methods = calloc(g_svc->n_methods, sizeof *g_methods);
    if (!g_cqs || !g_threads || !g_methods) return 70;
    /* Every method of the service is registered, so its request message
     * arrives with the call (no separate receive). */
    for (unsigned m = 0; m < g_svc->n_methods; m++) {
        char path[160];
        snprintf(path, sizeof path, "/%s/%s", g_svc->name, g_svc->methods[m].name);
        g_methods[m] = grpc_server_register_method(g_server, path, NULL, GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
        if (!g_methods[m]) { fprintf(stderr, "dspex_grpc_port: cannot register %s\n", path); return 70; }
    }
    g_call_cq = grpc_completion_queue_create_for_callback(&g_call_cq_down, NULL);
    for (int i = 0; i < g_nthreads; i++) {
        g_cqs[i] = grpc_completion_queue_create_for_next(NULL);
        grpc_server_register_completion_queue(g_server, g_cqs[i], NULL);
    }
    creds = grpc_insecure_server_credentials_create();
    why = listen_failure(g_listen);
    port = why ? 0 : grpc_server_add_http2_port(g_server, g_listen, creds);
    grpc_server_credentials_release(creds);
    if (port <= 0) {
        /* taken between the probe and gRPC's bind: ask again */
        if (!why && !(why = listen_failure(g_listen))) why = "unknown";
        /* the BEAM logs it (once, not once per restart attempt) */
        send_listen_error(why);
        grpc_server_destroy(g_server);
        for (int i = 0; i < g_nthreads; i++) grpc_completion_queue_destroy(g_cqs[i]);
        grpc_completion_queue_shutdown(g_call_cq);
        grpc_completion_queue_destroy(g_call_cq);
        free(g_cqs);
        free(g_threads);
        free(g_methods);
        grpc_shutdown();
        return 2;
    }
    grpc_server_start(g_server);
    for (int i = 0; i < g_nthreads; i++) pthread_create(&g_threads[i], NULL, cq_thread, (void *)(intptr_t)i);

    if (ei_x_new_with_version(&x) == 0) {
        if (ei_x_encode_tuple_header(&x, 2) == 0 && ei_x_encode_atom(&x, "listening") == 0 &&
            ei_x_encode_long(&x, port) == 0)
            (void)send_packet(&x);
        ei_x_free(&x);
    }

    read_loop();

    /* stdin closed: the BEAM is gone or closed the port */
    atomic_store(&g_shutdown, 1);
    end_open_calls();
    grpc_server_shutdown_and_notify(g_server, g_cqs[0], &g_shutdown_tag);
    if (!wait_shutdown(SD_SERVER, 2)) {
        grpc_server_cancel_all_calls(g_server);
        (void)wait_shutdown(SD_SERVER, 30);
    }
    grpc_server_destroy(g_server);
    for (int i = 0; i < g_nthreads; i++) grpc_completion_queue_shutdown(g_cqs[i]);
    for (int i = 0; i < g_nthreads; i++) pthread_join(g_threads[i], NULL);
    for (int i = 0; i < g_nthreads; i++) grpc_completion_queue_destroy(g_cqs[i]);
    grpc_completion_queue_shutdown(g_call_cq);
    if (!wait_shutdown(SD_CALL_CQ, 30)) fprintf(stderr, "dspex_grpc_port: calls still open at exit\n");
    grpc_completion_queue_destroy(g_call_cq);
    free(g_cqs);
    free(g_threads);
    free(g_methods);
    grpc_shutdown();
    return 0;
}
