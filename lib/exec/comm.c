/* comm.c - shared-memory collectives between device threads, in a fixed order (see comm.h). */
#include "exec/comm.h"
#include "model/simd.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One mailbox per ordered pair of ranks for send/recv. */
struct comm_mailbox {
    const void *buf; /* the sender's buffer, NULL when empty */
    size_t bytes;
    bool taken; /* the receiver has copied it */
};

struct comm_group {
    int n;
    pthread_barrier_t barrier;
    /* Collectives: each rank publishes its buffers here between barriers. */
    const float **in; /* n: each rank's input */
    float **out;      /* n: each rank's output */
    double *scalars;  /* n */
    float *scratch;   /* the reduced values, grown by rank 0 between barriers */
    size_t scratch_len;
    int scratch_failed;
    /* Point to point. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct comm_mailbox *mail; /* n * n, [src * n + dst] */
};

int comm_group_create(struct comm_group **out, int n, struct moai_err *err)
{
    struct comm_group *g = calloc(1, sizeof(*g));
    *out = NULL;
    if (!g)
        goto nomem;
    g->n = n;
    g->in = calloc((size_t) n, sizeof(*g->in));
    g->out = calloc((size_t) n, sizeof(*g->out));
    g->scalars = calloc((size_t) n, sizeof(*g->scalars));
    g->mail = calloc((size_t) n * (size_t) n, sizeof(*g->mail));
    if (!g->in || !g->out || !g->scalars || !g->mail)
        goto nomem;
    pthread_barrier_init(&g->barrier, NULL, (unsigned) n);
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    *out = g;
    return 0;

nomem:
    if (g) {
        free(g->in);
        free(g->out);
        free(g->scalars);
        free(g->mail);
        free(g);
    }
    return moai_err_set(err, MOAI_ENOMEM, "out of memory creating a communicator of %d ranks", n);
}

void comm_group_free(struct comm_group *g)
{
    if (!g)
        return;
    pthread_barrier_destroy(&g->barrier);
    pthread_mutex_destroy(&g->lock);
    pthread_cond_destroy(&g->cond);
    free(g->in);
    free(g->out);
    free(g->scalars);
    free(g->mail);
    free(g->scratch);
    free(g);
}

static const struct comm_ops thr_ops;

void comm_init(struct comm *c, struct comm_group *g, int rank)
{
    c->ops = &thr_ops;
    c->impl = NULL;
    c->group = g;
    c->rank = rank;
    c->size = g->n;
}

static void thr_barrier(struct comm *c)
{
    if (c->size > 1)
        pthread_barrier_wait(&c->group->barrier);
}

/* Rank 0 grows the scratch to n floats; every rank learns whether that worked. */
static int grow_scratch(struct comm *c, size_t n)
{
    struct comm_group *g = c->group;
    if (c->rank == 0) {
        g->scratch_failed = 0;
        if (g->scratch_len < n) {
            float *s = realloc(g->scratch, n * sizeof(float));
            if (s) {
                g->scratch = s;
                g->scratch_len = n;
            } else {
                g->scratch_failed = 1;
            }
        }
    }
    thr_barrier(c);
    if (!g->scratch_failed)
        return 0;   /* the caller's later barriers keep rank 0 from resetting it too soon */
    thr_barrier(c); /* every rank has read the failure before the next call resets it */
    return MOAI_ENOMEM;
}

/* The share [*lo, *hi) of n elements that rank r reduces. */
static void chunk(size_t n, int size, int r, size_t *lo, size_t *hi)
{
    size_t per = (n + (size_t) size - 1) / (size_t) size;
    *lo = per * (size_t) r < n ? per * (size_t) r : n;
    *hi = *lo + per < n ? *lo + per : n;
}

/* scratch[lo, hi) = sum over ranks of in[rank][off + lo, off + hi), in rank order. */
static void reduce_range(struct comm_group *g, size_t off, size_t lo, size_t hi)
{
    float *dst = g->scratch;
    memcpy(dst + lo, g->in[0] + off + lo, (hi - lo) * sizeof(float));
    for (int r = 1; r < g->n; r++) {
        const float *src = g->in[r] + off;
        for (size_t i = lo; i < hi; i++)
            dst[i] += src[i];
    }
}

SIMD_INLINE void add_block(float *o, const float *a)
{
    for (int j = 0; j < SIMD_KB; j++)
        o[j] += a[j];
}

/* o[i] += a[i] (elementwise: vectorized, the same sums) */
SIMD_CLONES static void add_floats(float *o, const float *a, size_t n)
{
    size_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        add_block(o + i, a + i);
    for (; i < n; i++)
        o[i] += a[i];
}

/* Rank r sums its share of every rank's buffer in rank order and writes the sum into each,
 * a block at a time so that the copies read it from the cache: no scratch, and each element
 * is read and written once per rank. Nobody else touches that share meanwhile. */
static int thr_allreduce_sum(struct comm *c, float *buf, size_t n)
{
    enum { BLOCK = 4096 };
    struct comm_group *g = c->group;
    size_t lo, hi;

    if (c->size == 1)
        return 0;
    g->in[c->rank] = buf;
    thr_barrier(c); /* every buffer is published */
    chunk(n, c->size, c->rank, &lo, &hi);
    float *sum = (float *) g->in[0];
    for (size_t b = lo; b < hi; b += BLOCK) {
        size_t e = b + BLOCK < hi ? b + BLOCK : hi;
        for (int r = 1; r < g->n; r++)
            add_floats(sum + b, g->in[r] + b, e - b);
        for (int r = 1; r < g->n; r++)
            memcpy((float *) g->in[r] + b, sum + b, (e - b) * sizeof(float));
    }
    thr_barrier(c); /* every share is summed before anyone reads its buffer */
    return 0;
}

static int thr_reduce_scatter_sum(struct comm *c, const float *in, float *out, size_t n)
{
    struct comm_group *g = c->group;
    int rc;

    if (c->size == 1) {
        if (n)
            memcpy(out, in, n * sizeof(float));
        return 0;
    }
    g->in[c->rank] = in;
    if ((rc = grow_scratch(c, n * (size_t) c->size)) < 0)
        return rc;
    /* Rank r reduces the slice that ends up on rank r: no second copy through others. */
    if (n) {
        reduce_range(g, 0, (size_t) c->rank * n, (size_t) c->rank * n + n);
        memcpy(out, g->scratch + (size_t) c->rank * n, n * sizeof(float));
    }
    thr_barrier(c);
    return 0;
}

static int thr_allgather(struct comm *c, const float *in, float *out, size_t n)
{
    struct comm_group *g = c->group;

    if (c->size == 1) {
        if (out != in && n)
            memmove(out, in, n * sizeof(float));
        return 0;
    }
    g->in[c->rank] = in;
    thr_barrier(c);
    for (int r = 0; r < c->size && n; r++)
        if (g->in[r] != out + (size_t) r * n)
            memcpy(out + (size_t) r * n, g->in[r], n * sizeof(float));
    thr_barrier(c);
    return 0;
}

static double thr_allreduce_scalar(struct comm *c, double x)
{
    struct comm_group *g = c->group;
    double sum = 0.0;

    if (c->size == 1)
        return x;
    g->scalars[c->rank] = x;
    thr_barrier(c);
    for (int r = 0; r < c->size; r++)
        sum += g->scalars[r];
    thr_barrier(c);
    return sum;
}

static int thr_send(struct comm *c, int dst, const void *buf, size_t bytes)
{
    struct comm_group *g = c->group;
    struct comm_mailbox *m = &g->mail[(size_t) c->rank * (size_t) g->n + (size_t) dst];

    pthread_mutex_lock(&g->lock);
    while (m->buf) /* a previous message still waits to be taken */
        pthread_cond_wait(&g->cond, &g->lock);
    m->buf = buf;
    m->bytes = bytes;
    m->taken = false;
    pthread_cond_broadcast(&g->cond);
    while (!m->taken)
        pthread_cond_wait(&g->cond, &g->lock);
    m->buf = NULL;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static int thr_recv(struct comm *c, int src, void *buf, size_t bytes)
{
    struct comm_group *g = c->group;
    struct comm_mailbox *m = &g->mail[(size_t) src * (size_t) g->n + (size_t) c->rank];

    pthread_mutex_lock(&g->lock);
    while (!m->buf || m->taken)
        pthread_cond_wait(&g->cond, &g->lock);
    MOAI_ASSERT(m->bytes == bytes);
    memcpy(buf, m->buf, bytes);
    m->taken = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

/* Posts the message, receives, then waits for the message to be taken: an exchange between
 * two ranks cannot deadlock. */
static int thr_sendrecv(struct comm *c, int dst, const void *sbuf, size_t sbytes, int src,
                        void *rbuf, size_t rbytes)
{
    struct comm_group *g = c->group;
    struct comm_mailbox *out = &g->mail[(size_t) c->rank * (size_t) g->n + (size_t) dst];
    struct comm_mailbox *in = &g->mail[(size_t) src * (size_t) g->n + (size_t) c->rank];

    pthread_mutex_lock(&g->lock);
    while (out->buf)
        pthread_cond_wait(&g->cond, &g->lock);
    out->buf = sbuf;
    out->bytes = sbytes;
    out->taken = false;
    pthread_cond_broadcast(&g->cond);
    while (!in->buf || in->taken)
        pthread_cond_wait(&g->cond, &g->lock);
    MOAI_ASSERT(in->bytes == rbytes);
    memcpy(rbuf, in->buf, rbytes);
    in->taken = true;
    pthread_cond_broadcast(&g->cond);
    while (!out->taken)
        pthread_cond_wait(&g->cond, &g->lock);
    out->buf = NULL;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
    return 0;
}

static const struct comm_ops thr_ops = {
    .barrier = thr_barrier,
    .allreduce_sum = thr_allreduce_sum,
    .reduce_scatter_sum = thr_reduce_scatter_sum,
    .allgather = thr_allgather,
    .send = thr_send,
    .recv = thr_recv,
    .sendrecv = thr_sendrecv,
    .allreduce_scalar = thr_allreduce_scalar,
};

/* ---- the interface: dispatch to the communicator's transport -------------------------- */

void comm_barrier(struct comm *c)
{
    c->ops->barrier(c);
}

int comm_allreduce_sum(struct comm *c, float *buf, size_t n)
{
    return c->ops->allreduce_sum(c, buf, n);
}

int comm_reduce_scatter_sum(struct comm *c, const float *in, float *out, size_t n)
{
    return c->ops->reduce_scatter_sum(c, in, out, n);
}

int comm_allgather(struct comm *c, const float *in, float *out, size_t n)
{
    return c->ops->allgather(c, in, out, n);
}

int comm_send(struct comm *c, int dst, const void *buf, size_t bytes)
{
    return c->ops->send(c, dst, buf, bytes);
}

int comm_recv(struct comm *c, int src, void *buf, size_t bytes)
{
    return c->ops->recv(c, src, buf, bytes);
}

int comm_sendrecv(struct comm *c, int dst, const void *sbuf, size_t sbytes, int src, void *rbuf,
                  size_t rbytes)
{
    return c->ops->sendrecv(c, dst, sbuf, sbytes, src, rbuf, rbytes);
}

double comm_allreduce_scalar(struct comm *c, double x)
{
    return c->ops->allreduce_scalar(c, x);
}

void comm_world_all(struct comm_world *w, int dev, struct comm *out)
{
    w->ops->all(w, dev, out);
}

int comm_world_split(struct comm_world *w, int dev, int color, int key, struct comm *out)
{
    return w->ops->split(w, dev, color, key, out);
}

bool comm_world_agree(struct comm_world *w, bool ok)
{
    return w->ops->agree(w, ok);
}

void comm_world_bcast(struct comm_world *w, void *buf, size_t bytes)
{
    w->ops->bcast(w, buf, bytes);
}

void comm_world_free(struct comm_world *w)
{
    if (w)
        w->ops->free(w);
}

/* ---- the shared-memory world ---------------------------------------------------------- */

/* Groups split from a world are kept until the world is freed. */
struct thr_world {
    struct comm_world base; /* first: a struct comm_world * points here */
    int ndev;
    struct comm_group *all;
    int *color, *key;          /* ndev: this split's requests */
    struct comm_group **made;  /* ndev: the group made for each device in this split */
    struct comm_group **owned; /* every group made, to free */
    int nowned, capowned;
    int failed;
};

static void thr_world_free(struct comm_world *base);
static void thr_world_all(struct comm_world *base, int dev, struct comm *out);
static int thr_world_split(struct comm_world *base, int dev, int color, int key, struct comm *out);

/* One process: it agrees with itself. */
static bool thr_world_agree(struct comm_world *base, bool ok)
{
    (void) base;
    return ok;
}

/* One process: it holds process 0's data already. */
static void thr_world_bcast(struct comm_world *base, void *buf, size_t bytes)
{
    (void) base;
    (void) buf;
    (void) bytes;
}

static const struct comm_world_ops thr_world_ops = {.all = thr_world_all,
                                                    .split = thr_world_split,
                                                    .agree = thr_world_agree,
                                                    .bcast = thr_world_bcast,
                                                    .free = thr_world_free};

int comm_world_create(struct comm_world **out, int ndev, struct moai_err *err)
{
    struct thr_world *w = calloc(1, sizeof(*w));
    *out = NULL;
    if (!w)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory creating %d devices' world", ndev);
    w->base = (struct comm_world){.ops = &thr_world_ops, .ndev = ndev, .nlocal = ndev};
    w->ndev = ndev;
    w->color = calloc((size_t) ndev, sizeof(int));
    w->key = calloc((size_t) ndev, sizeof(int));
    w->made = calloc((size_t) ndev, sizeof(*w->made));
    if (!w->color || !w->key || !w->made || comm_group_create(&w->all, ndev, err) < 0) {
        thr_world_free(&w->base);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory creating %d devices' world", ndev);
    }
    *out = &w->base;
    return 0;
}

static void thr_world_free(struct comm_world *base)
{
    struct thr_world *w = (struct thr_world *) base;
    for (int i = 0; i < w->nowned; i++)
        comm_group_free(w->owned[i]);
    free(w->owned);
    comm_group_free(w->all);
    free(w->color);
    free(w->key);
    free(w->made);
    free(w);
}

static void thr_world_all(struct comm_world *base, int dev, struct comm *out)
{
    struct thr_world *w = (struct thr_world *) base;
    comm_init(out, w->all, dev);
}

static int thr_world_split(struct comm_world *base, int dev, int color, int key, struct comm *out)
{
    struct thr_world *w = (struct thr_world *) base;
    struct comm all;
    comm_init(&all, w->all, dev);
    w->color[dev] = color;
    w->key[dev] = key;
    thr_barrier(&all);
    if (dev == 0) {
        /* One thread makes every group: the first device of each color in device order. */
        w->failed = 0;
        for (int d = 0; d < w->ndev; d++) {
            int first = d;
            for (int e = 0; e < d; e++)
                if (w->color[e] == w->color[d]) {
                    first = e;
                    break;
                }
            if (first != d) {
                w->made[d] = w->made[first];
                continue;
            }
            int n = 0;
            for (int e = 0; e < w->ndev; e++)
                n += w->color[e] == w->color[d];
            struct comm_group *g = NULL;
            if (w->nowned == w->capowned) {
                int cap = w->capowned ? 2 * w->capowned : 16;
                struct comm_group **o = realloc(w->owned, (size_t) cap * sizeof(*o));
                if (!o) {
                    w->failed = 1;
                    break;
                }
                w->owned = o;
                w->capowned = cap;
            }
            if (comm_group_create(&g, n, NULL) < 0) {
                w->failed = 1;
                break;
            }
            w->owned[w->nowned++] = g;
            w->made[d] = g;
        }
    }
    thr_barrier(&all);
    if (w->failed)
        return MOAI_ENOMEM;
    /* The rank: how many of the same color order before this device by (key, device). */
    int rank = 0;
    for (int e = 0; e < w->ndev; e++)
        if (w->color[e] == color && (w->key[e] < key || (w->key[e] == key && e < dev)))
            rank++;
    comm_init(out, w->made[dev], rank);
    thr_barrier(&all); /* the tables are reused by the next split */
    return 0;
}
