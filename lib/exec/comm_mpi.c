/* comm_mpi.c - the communicator over Open MPI: devices shared out over processes (see comm.h).
 *
 * Each MPI process runs k = ndev / nproc devices as threads; device d lives on process d / k
 * as its local device d % k. A group may hold devices of one process and of others, so groups
 * are not MPI communicators of processes: every split duplicates MPI_COMM_WORLD once, and two
 * devices of a group talk point to point on that communicator, process to process, with the
 * tag sender_local * k + receiver_local. MPI matches messages in order per (source, tag,
 * communicator), so each ordered pair of devices has its own ordered channel, whatever the
 * other threads do (MPI_THREAD_MULTIPLE).
 *
 * The collectives are built from those channels and add in rank order exactly as the
 * shared-memory transport does (comm.c), so both give the same bits: an all-reduce sends
 * rank j the j-th slice of every rank's buffer, rank j adds the slices in rank order, then
 * every rank gathers the reduced slices. A failed MPI call ends the job (MPI's default error
 * handler): there is no sensible way to go on with a partner gone.
 */
#include "exec/comm.h"

#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* One device's view of one group. */
struct mpi_member {
    MPI_Comm comm;
    int k;                   /* devices per process */
    int my_local;            /* this device's local index */
    int *proc;               /* (size) each rank's process */
    int *local;              /* (size) each rank's local index */
    float *tmp;              /* scratch of the collectives, grown on demand */
    size_t ntmp;             /* floats */
    double *dtmp;            /* (size) the scalars */
    struct mpi_member *next; /* the world's list, to free */
};

struct mpi_world {
    struct comm_world base; /* first: a struct comm_world * points here */
    int nproc, rank, k;
    MPI_Comm all;              /* every device, ranked by id */
    pthread_barrier_t barrier; /* the k local device threads */
    pthread_mutex_t lock;
    int *color, *key;    /* (k) this process's devices' requests of the current split */
    int *all_req;        /* (2 ndev) every device's (color, key) */
    MPI_Comm split_comm; /* the current split's communicator */
    MPI_Comm *comms;     /* every duplicated communicator, to free */
    int ncomms, capcomms;
    struct mpi_member *members;
    int failed;
};

bool comm_mpi_launched(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK");
}

int comm_mpi_init(struct moai_err *err)
{
    int inited = 0, provided = 0;
    MPI_Initialized(&inited);
    if (inited)
        return 0;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS)
        return moai_err_set(err, MOAI_EIO, "MPI_Init_thread failed");
    if (provided < MPI_THREAD_MULTIPLE) {
        MPI_Finalize();
        return moai_err_set(err, MOAI_EIO,
                            "this Open MPI does not support MPI_THREAD_MULTIPLE, which running "
                            "several devices' threads per rank needs");
    }
    return 0;
}

void comm_mpi_finalize(void)
{
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized)
        MPI_Finalize();
}

int comm_mpi_rank(void)
{
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int comm_mpi_size(void)
{
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

/* ---- point to point between the devices of a group ------------------------------------- */

static struct mpi_member *member(struct comm *c)
{
    return c->impl;
}

static int tag_to(const struct mpi_member *m, int dst)
{
    return m->my_local * m->k + m->local[dst];
}

static int tag_from(const struct mpi_member *m, int src)
{
    return m->local[src] * m->k + m->my_local;
}

/* Completes requests without spinning a core: Open MPI's MPI_Wait polls, and with more device
 * threads than cores a polling waiter takes the core its partner needs. Test, then nap from
 * 10 us up to 250 us (a helper measured 1.00 s of CPU per waiting second with MPI_Waitall,
 * 0.07 s this way). */
static void wait_all(int n, MPI_Request *req)
{
    int done = 0;
    for (long nap = 10000; MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE) == MPI_SUCCESS && !done;
         nap = nap < 250000 ? 2 * nap : 250000) {
        struct timespec ts = {0, nap};
        nanosleep(&ts, NULL);
    }
}

/* Largest piece of one message: MPI counts are ints. */
#define PIECE ((size_t) 1 << 30)

static void isend_bytes(struct mpi_member *m, int dst, const void *buf, size_t bytes,
                        MPI_Request *req)
{
    MPI_Isend(buf, (int) bytes, MPI_BYTE, m->proc[dst], tag_to(m, dst), m->comm, req);
}

static void irecv_bytes(struct mpi_member *m, int src, void *buf, size_t bytes, MPI_Request *req)
{
    MPI_Irecv(buf, (int) bytes, MPI_BYTE, m->proc[src], tag_from(m, src), m->comm, req);
}

static int mpi_send(struct comm *c, int dst, const void *buf, size_t bytes)
{
    struct mpi_member *m = member(c);
    const char *p = buf;
    do {
        size_t n = bytes < PIECE ? bytes : PIECE;
        MPI_Request req;
        MPI_Issend(p, (int) n, MPI_BYTE, m->proc[dst], tag_to(m, dst), m->comm, &req);
        wait_all(1, &req);
        p += n;
        bytes -= n;
    } while (bytes > 0);
    return 0;
}

static int mpi_recv(struct comm *c, int src, void *buf, size_t bytes)
{
    struct mpi_member *m = member(c);
    char *p = buf;
    do {
        size_t n = bytes < PIECE ? bytes : PIECE;
        MPI_Request req;
        MPI_Irecv(p, (int) n, MPI_BYTE, m->proc[src], tag_from(m, src), m->comm, &req);
        wait_all(1, &req);
        p += n;
        bytes -= n;
    } while (bytes > 0);
    return 0;
}

static int mpi_sendrecv(struct comm *c, int dst, const void *sbuf, size_t sbytes, int src,
                        void *rbuf, size_t rbytes)
{
    struct mpi_member *m = member(c);
    const char *s = sbuf;
    char *r = rbuf;
    while (sbytes > 0 || rbytes > 0) {
        size_t ns = sbytes < PIECE ? sbytes : PIECE, nr = rbytes < PIECE ? rbytes : PIECE;
        MPI_Request req[2];
        isend_bytes(m, dst, s, ns, &req[0]);
        irecv_bytes(m, src, r, nr, &req[1]);
        wait_all(2, req);
        s += ns;
        r += nr;
        sbytes -= ns;
        rbytes -= nr;
    }
    return 0;
}

/* ---- collectives ------------------------------------------------------------------------ */

/* n (>= 1) elements of each bytes: the small per-call tables of the collectives. Their
 * failure is out of memory for a few pointers; like a failed MPI call it ends the job. */
static void *table(int n, size_t each)
{
    void *p = calloc(n > 0 ? (size_t) n : 1, each);
    MOAI_ASSERT(p);
    return p;
}

static int grow(struct mpi_member *m, size_t floats)
{
    if (m->ntmp >= floats)
        return 0;
    float *t = realloc(m->tmp, floats * sizeof(float));
    if (!t)
        return MOAI_ENOMEM;
    m->tmp = t;
    m->ntmp = floats;
    return 0;
}

/* Every rank j sends send[j] (cnt floats, NULL: nothing) and receives from every rank j into
 * recv[j]; the own slice is not sent. */
static void exchange(struct comm *c, const float *const *send, float *const *recv, size_t cnt)
{
    struct mpi_member *m = member(c);
    MPI_Request *req = table(2 * c->size, sizeof(MPI_Request));
    int n = 0;
    MOAI_ASSERT(cnt * sizeof(float) <= (size_t) INT_MAX);
    for (int j = 0; j < c->size; j++) {
        if (j == c->rank)
            continue;
        if (recv[j])
            irecv_bytes(m, j, recv[j], cnt * sizeof(float), &req[n++]);
        if (send[j])
            isend_bytes(m, j, send[j], cnt * sizeof(float), &req[n++]);
    }
    wait_all(n, req);
    free(req);
}

/* slices[0..size) (cnt floats each) -> dst = slices[0] + slices[1] + ..., in rank order as
 * comm.c adds. */
static void sum_in_order(float *dst, float *const *slices, int size, size_t cnt)
{
    memcpy(dst, slices[0], cnt * sizeof(float));
    for (int r = 1; r < size; r++)
        for (size_t i = 0; i < cnt; i++)
            dst[i] += slices[r][i];
}

/* Floats of one block of a collective: its messages stay under MPI's int count of bytes.
 * Every element is added in rank order whatever the blocks, so blocking changes no bit. */
#define BLOCK ((size_t) 1 << 28)

static int mpi_reduce_scatter_sum(struct comm *c, const float *in, float *out, size_t n)
{
    struct mpi_member *m = member(c);
    int size = c->size, me = c->rank;
    if (size == 1) {
        memcpy(out, in, n * sizeof(float));
        return 0;
    }
    size_t blk = n < BLOCK ? n : BLOCK;
    if (grow(m, blk * (size_t) size) < 0)
        return MOAI_ENOMEM;
    const float **send = table(size, sizeof(*send));
    float **recv = table(size, sizeof(*recv));
    for (size_t i0 = 0; i0 < n; i0 += blk) {
        size_t cnt = n - i0 < blk ? n - i0 : blk;
        for (int j = 0; j < size; j++) {
            send[j] = in + (size_t) j * n + i0;
            recv[j] = j == me ? (float *) in + (size_t) me * n + i0 : m->tmp + (size_t) j * blk;
        }
        exchange(c, send, recv, cnt);
        sum_in_order(out + i0, recv, size, cnt);
    }
    free(send);
    free(recv);
    return 0;
}

/* The share [*lo, *lo + *cnt) of n elements that rank r reduces: as comm.c's chunks. */
static void share(size_t n, int size, int r, size_t *lo, size_t *cnt)
{
    size_t per = (n + (size_t) size - 1) / (size_t) size;
    size_t a = per * (size_t) r < n ? per * (size_t) r : n;
    size_t b = a + per < n ? a + per : n;
    *lo = a;
    *cnt = b - a;
}

static int allreduce_block(struct comm *c, float *buf, size_t n);

static int mpi_allreduce_sum(struct comm *c, float *buf, size_t n)
{
    if (c->size == 1)
        return 0;
    for (size_t i0 = 0; i0 < n; i0 += BLOCK) {
        int rc = allreduce_block(c, buf + i0, n - i0 < BLOCK ? n - i0 : BLOCK);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* One block: rank j reduces share j of every rank's block, then all gather the shares. */
static int allreduce_block(struct comm *c, float *buf, size_t n)
{
    struct mpi_member *m = member(c);
    int size = c->size, me = c->rank, nreq = 0;
    size_t per = (n + (size_t) size - 1) / (size_t) size, lo, cnt;
    if (grow(m, per * (size_t) (size + 1)) < 0)
        return MOAI_ENOMEM;
    share(n, size, me, &lo, &cnt);
    float **part = table(size, sizeof(*part));
    MPI_Request *req = table(2 * size, sizeof(MPI_Request));
    float *sum = m->tmp + (size_t) size * per;

    /* 1: every rank's share `me` arrives; added in rank order (the own from buf) */
    for (int j = 0; j < size; j++) {
        size_t jlo, jcnt;
        share(n, size, j, &jlo, &jcnt);
        part[j] = j == me ? buf + lo : m->tmp + (size_t) j * per;
        if (j == me)
            continue;
        irecv_bytes(m, j, part[j], cnt * sizeof(float), &req[nreq++]);
        isend_bytes(m, j, buf + jlo, jcnt * sizeof(float), &req[nreq++]);
    }
    wait_all(nreq, req);
    if (cnt > 0)
        sum_in_order(sum, part, size, cnt);
    /* 2: every rank gathers the reduced shares */
    nreq = 0;
    for (int j = 0; j < size; j++) {
        size_t jlo, jcnt;
        if (j == me)
            continue;
        share(n, size, j, &jlo, &jcnt);
        irecv_bytes(m, j, buf + jlo, jcnt * sizeof(float), &req[nreq++]);
        isend_bytes(m, j, sum, cnt * sizeof(float), &req[nreq++]);
    }
    wait_all(nreq, req);
    memcpy(buf + lo, sum, cnt * sizeof(float));
    free(req);
    free(part);
    return 0;
}

static int mpi_allgather(struct comm *c, const float *in, float *out, size_t n)
{
    int size = c->size, me = c->rank;
    if (out + (size_t) me * n != in)
        memmove(out + (size_t) me * n, in, n * sizeof(float));
    if (size == 1)
        return 0;
    const float **send = table(size, sizeof(*send));
    float **recv = table(size, sizeof(*recv));
    for (size_t i0 = 0; i0 < n; i0 += BLOCK) {
        for (int j = 0; j < size; j++) {
            send[j] = out + (size_t) me * n + i0;
            recv[j] = out + (size_t) j * n + i0;
        }
        exchange(c, send, recv, n - i0 < BLOCK ? n - i0 : BLOCK);
    }
    free(send);
    free(recv);
    return 0;
}

static double mpi_allreduce_scalar(struct comm *c, double x)
{
    struct mpi_member *m = member(c);
    int size = c->size, me = c->rank, n = 0;
    if (size == 1)
        return x;
    MPI_Request *req = table(2 * size, sizeof(MPI_Request));
    m->dtmp[me] = x;
    for (int j = 0; j < size; j++) {
        if (j == me)
            continue;
        irecv_bytes(m, j, &m->dtmp[j], sizeof(double), &req[n++]);
        isend_bytes(m, j, &m->dtmp[me], sizeof(double), &req[n++]);
    }
    wait_all(n, req);
    free(req);
    double sum = 0.0; /* as comm.c: from 0, in rank order */
    for (int j = 0; j < size; j++)
        sum += m->dtmp[j];
    return sum;
}

static void mpi_barrier(struct comm *c)
{
    mpi_allreduce_scalar(c, 0.0);
}

static const struct comm_ops mpi_ops = {
    .barrier = mpi_barrier,
    .allreduce_sum = mpi_allreduce_sum,
    .reduce_scatter_sum = mpi_reduce_scatter_sum,
    .allgather = mpi_allgather,
    .send = mpi_send,
    .recv = mpi_recv,
    .sendrecv = mpi_sendrecv,
    .allreduce_scalar = mpi_allreduce_scalar,
};

/* ---- the world ------------------------------------------------------------------------- */

/* A member for device dev of the group of devices ids[0..n) (in rank order), on comm. */
static int member_make(struct mpi_world *w, int dev, const int *ids, int n, MPI_Comm comm,
                       struct comm *out)
{
    struct mpi_member *m = calloc(1, sizeof(*m));
    int rank = -1;
    if (!m)
        return MOAI_ENOMEM;
    m->comm = comm;
    m->k = w->k;
    m->my_local = dev % w->k;
    m->proc = calloc(n > 0 ? (size_t) n : 1, sizeof(int));
    m->local = calloc(n > 0 ? (size_t) n : 1, sizeof(int));
    m->dtmp = calloc(n > 0 ? (size_t) n : 1, sizeof(double));
    if (!m->proc || !m->local || !m->dtmp) {
        free(m->proc);
        free(m->local);
        free(m->dtmp);
        free(m);
        return MOAI_ENOMEM;
    }
    for (int i = 0; i < n; i++) {
        m->proc[i] = ids[i] / w->k;
        m->local[i] = ids[i] % w->k;
        if (ids[i] == dev)
            rank = i;
    }
    pthread_mutex_lock(&w->lock);
    m->next = w->members;
    w->members = m;
    pthread_mutex_unlock(&w->lock);
    *out = (struct comm){.ops = &mpi_ops, .group = NULL, .impl = m, .rank = rank, .size = n};
    return 0;
}

static void mpi_world_all(struct comm_world *base, int dev, struct comm *out)
{
    struct mpi_world *w = (struct mpi_world *) base;
    int *ids = table(w->base.ndev, sizeof(int));
    for (int i = 0; i < w->base.ndev; i++)
        ids[i] = i;
    int rc = member_make(w, dev, ids, w->base.ndev, w->all, out);
    MOAI_ASSERT(rc == 0);
    free(ids);
}

static int mpi_world_split(struct comm_world *base, int dev, int color, int key, struct comm *out)
{
    struct mpi_world *w = (struct mpi_world *) base;
    int local = dev - w->base.first_dev, ndev = w->base.ndev;

    w->color[local] = color;
    w->key[local] = key;
    pthread_barrier_wait(&w->barrier);
    if (local == 0) {
        /* one thread per process: every device's request, and the split's communicator */
        int *mine = table(2 * w->k, sizeof(int));
        for (int i = 0; i < w->k; i++) {
            mine[2 * i] = w->color[i];
            mine[2 * i + 1] = w->key[i];
        }
        MPI_Allgather(mine, 2 * w->k, MPI_INT, w->all_req, 2 * w->k, MPI_INT, MPI_COMM_WORLD);
        free(mine);
        w->failed = 0;
        if (w->ncomms == w->capcomms) {
            int cap = w->capcomms ? 2 * w->capcomms : 16;
            MPI_Comm *c = realloc(w->comms, sizeof(*c) * (size_t) cap);
            if (c) {
                w->comms = c;
                w->capcomms = cap;
            }
        }
        MPI_Comm_dup(MPI_COMM_WORLD, &w->split_comm);
        if (w->ncomms < w->capcomms)
            w->comms[w->ncomms++] = w->split_comm;
        else
            w->failed = 1; /* the communicator leaks; the run stops anyway */
    }
    pthread_barrier_wait(&w->barrier);
    /* the group: devices of this color, by (key, device) */
    int *ids = table(ndev, sizeof(int)), n = 0, rc = MOAI_ENOMEM;
    if (ids && !w->failed) {
        for (int d = 0; d < ndev; d++)
            if (w->all_req[2 * d] == color)
                ids[n++] = d;
        for (int i = 1; i < n; i++) /* insertion sort by (key, device): small groups */
            for (int j = i; j > 0; j--) {
                int a = ids[j - 1], b = ids[j];
                int ka = w->all_req[2 * a + 1], kb = w->all_req[2 * b + 1];
                if (ka < kb || (ka == kb && a < b))
                    break;
                ids[j - 1] = b;
                ids[j] = a;
            }
        rc = member_make(w, dev, ids, n, w->split_comm, out);
    }
    free(ids);
    pthread_barrier_wait(&w->barrier); /* the tables are reused by the next split */
    return rc;
}

static void mpi_world_free(struct comm_world *base)
{
    struct mpi_world *w = (struct mpi_world *) base;
    for (struct mpi_member *m = w->members, *next; m; m = next) {
        next = m->next;
        free(m->proc);
        free(m->local);
        free(m->dtmp);
        free(m->tmp);
        free(m);
    }
    for (int i = 0; i < w->ncomms; i++)
        MPI_Comm_free(&w->comms[i]);
    if (w->all != MPI_COMM_NULL)
        MPI_Comm_free(&w->all);
    free(w->comms);
    free(w->color);
    free(w->key);
    free(w->all_req);
    pthread_barrier_destroy(&w->barrier);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

static bool mpi_world_agree(struct comm_world *base, bool ok)
{
    int mine = ok, all = 0;
    (void) base;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return all != 0;
}

static void mpi_world_bcast(struct comm_world *base, void *buf, size_t bytes)
{
    char *p = buf;
    (void) base;
    while (bytes > 0) {
        size_t n = bytes < PIECE ? bytes : PIECE;
        MPI_Bcast(p, (int) n, MPI_BYTE, 0, MPI_COMM_WORLD);
        p += n;
        bytes -= n;
    }
}

static const struct comm_world_ops mpi_world_ops = {.all = mpi_world_all,
                                                    .split = mpi_world_split,
                                                    .agree = mpi_world_agree,
                                                    .bcast = mpi_world_bcast,
                                                    .free = mpi_world_free};

int comm_world_create_mpi(struct comm_world **out, int ndev, struct moai_err *err)
{
    int nproc = comm_mpi_size(), rank = comm_mpi_rank();
    *out = NULL;
    if (ndev % nproc != 0)
        return moai_err_set(err, MOAI_EUSAGE,
                            "%d devices cannot be shared out over %d MPI ranks: the device "
                            "count must be a multiple of the rank count",
                            ndev, nproc);
    struct mpi_world *w = calloc(1, sizeof(*w));
    if (!w)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory creating the MPI world");
    w->nproc = nproc;
    w->rank = rank;
    w->k = ndev / nproc;
    w->base = (struct comm_world){
        .ops = &mpi_world_ops, .ndev = ndev, .first_dev = rank * w->k, .nlocal = w->k};
    w->all = MPI_COMM_NULL;
    w->color = calloc((size_t) w->k, sizeof(int));
    w->key = calloc((size_t) w->k, sizeof(int));
    w->all_req = calloc((size_t) ndev * 2, sizeof(int));
    pthread_barrier_init(&w->barrier, NULL, (unsigned) w->k);
    pthread_mutex_init(&w->lock, NULL);
    if (!w->color || !w->key || !w->all_req) {
        mpi_world_free(&w->base);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory creating the MPI world");
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &w->all);
    *out = &w->base;
    return 0;
}
