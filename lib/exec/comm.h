/* comm.h - collective and point-to-point communication between the devices of a plan.
 *
 * A communicator connects the `size` ranks of one group (a data-parallel group, a pipeline,
 * a tensor-parallel group). Every collective is called by every rank of the group with the
 * same count. Reductions add the ranks' values in rank order 0, 1, ..., size-1, whatever the
 * timing, so a run is bit-for-bit reproducible, and the two transports below give the same
 * bits.
 *
 * Two transports sit behind one interface (struct comm_ops, struct comm_world_ops):
 *   - shared memory between the threads of one process, the virtual devices (this file's
 *     comm_group_* and comm_world_create, comm.c);
 *   - Open MPI between processes and machines (comm_world_create_mpi, comm_mpi.c), each
 *     process running one or more of the devices.
 * Training code sees only struct comm and struct comm_world and cannot tell them apart.
 *
 *     struct comm_group *g;  comm_group_create(&g, 4, &err);       (once, by the owner)
 *     struct comm c;         comm_init(&c, g, rank);               (in each device thread)
 *     comm_allreduce_sum(&c, grads, n);                            (every rank)
 *     comm_group_free(g);                                          (after the threads end)
 *
 * Thread-safety: one struct comm per rank and thread; a group is shared by its ranks.
 * Errors: calls return 0 or a negative MOAI_E* code (out of memory growing the scratch, a
 * failed MPI call).
 */
#ifndef MOAI_COMM_H
#define MOAI_COMM_H

#include "err.h"

#include <stdbool.h>
#include <stddef.h>

struct comm_group;
struct comm;

/* One transport's implementation of the calls below (see their comments). */
struct comm_ops {
    void (*barrier)(struct comm *c);
    int (*allreduce_sum)(struct comm *c, float *buf, size_t n);
    int (*reduce_scatter_sum)(struct comm *c, const float *in, float *out, size_t n);
    int (*allgather)(struct comm *c, const float *in, float *out, size_t n);
    int (*send)(struct comm *c, int dst, const void *buf, size_t bytes);
    int (*recv)(struct comm *c, int src, void *buf, size_t bytes);
    int (*sendrecv)(struct comm *c, int dst, const void *sbuf, size_t sbytes, int src, void *rbuf,
                    size_t rbytes);
    double (*allreduce_scalar)(struct comm *c, double x);
};

struct comm {
    const struct comm_ops *ops;
    struct comm_group *group; /* shared memory: the group; other transports: their state */
    void *impl;               /* per-rank state of other transports */
    int rank;
    int size;
};

/* Creates the shared state of a group of n ranks. Returns 0 or MOAI_ENOMEM. */
int comm_group_create(struct comm_group **g, int n, struct moai_err *err);
void comm_group_free(struct comm_group *g);

/* Binds c to rank of g (the shared-memory transport). */
void comm_init(struct comm *c, struct comm_group *g, int rank);

/* Waits until every rank of the group has arrived. */
void comm_barrier(struct comm *c);

/* buf (n) on every rank <- the sum over ranks, added in rank order. */
int comm_allreduce_sum(struct comm *c, float *buf, size_t n);

/* in (n * size) on every rank -> out (n) on rank r: the sum over ranks of in[r*n .. r*n+n),
 * added in rank order. in and out may not overlap. */
int comm_reduce_scatter_sum(struct comm *c, const float *in, float *out, size_t n);

/* in (n) on every rank -> out (n * size) on every rank: rank r's in at out[r*n]. */
int comm_allgather(struct comm *c, const float *in, float *out, size_t n);

/* Sends bytes from buf to rank dst, returning once dst has received it (a rendezvous, as a
 * large MPI_Send). */
int comm_send(struct comm *c, int dst, const void *buf, size_t bytes);

/* Receives bytes from rank src into buf. The sizes of matching send and recv must agree. */
int comm_recv(struct comm *c, int src, void *buf, size_t bytes);

/* Sends sbuf to dst and receives rbuf from src at once, as MPI_Sendrecv: two ranks that
 * exchange with each other this way never deadlock. */
int comm_sendrecv(struct comm *c, int dst, const void *sbuf, size_t sbytes, int src, void *rbuf,
                  size_t rbytes);

/* Sum of one double over the ranks (losses, norms), in rank order. */
double comm_allreduce_scalar(struct comm *c, double x);

/*
 * The world: every device of a run, from which the groups of a plan are split as
 * MPI_Comm_split does. Each device calls comm_world_split with a color and a key; devices of
 * the same color form one group, ranked by key. Collective over all devices of the world.
 *
 *     struct comm_world *w; comm_world_create(&w, ndev, &err);      (owner, before threads)
 *     comm_world_split(w, dev, dp_index, tp_rank, &tp_comm);        (each device thread)
 *     comm_world_free(w);                                           (owner, after threads)
 */
struct comm_world;

struct comm_world_ops {
    void (*all)(struct comm_world *w, int dev, struct comm *out);
    int (*split)(struct comm_world *w, int dev, int color, int key, struct comm *out);
    bool (*agree)(struct comm_world *w, bool ok);
    void (*bcast)(struct comm_world *w, void *buf, size_t bytes);
    void (*free)(struct comm_world *w);
};

/* The devices of this process are [first_dev, first_dev + nlocal) of ndev; with shared
 * memory all of them. */
struct comm_world {
    const struct comm_world_ops *ops;
    int ndev, first_dev, nlocal;
};

/* The shared-memory world of ndev device threads. */
int comm_world_create(struct comm_world **w, int ndev, struct moai_err *err);
void comm_world_free(struct comm_world *w);

/* The communicator of all devices, for device dev. */
void comm_world_all(struct comm_world *w, int dev, struct comm *out);

/* Splits the world: out becomes dev's rank in the group of its color. Returns 0 or
 * MOAI_ENOMEM (on every device alike). */
int comm_world_split(struct comm_world *w, int dev, int color, int key, struct comm *out);

/* Whether every process of the world says ok: called once by each process (not by device
 * threads) at the same point, e.g. after loading, so that a process that failed alone does
 * not leave the others waiting at their first collective. One process: ok. */
bool comm_world_agree(struct comm_world *w, bool ok);

/* buf (bytes) of process 0 on every process; called by every process at the same point. */
void comm_world_bcast(struct comm_world *w, void *buf, size_t bytes);

/*
 * Open MPI (comm_mpi.c). Under `mpirun -n W` a run's ndev devices are shared out over the W
 * processes in order (ndev must be a multiple of W): process p runs devices
 * [p ndev / W, (p + 1) ndev / W) as threads, and every communicator between devices goes
 * through MPI with the shared-memory transport's summation order, so results are the same
 * bits. MPI runs with MPI_THREAD_MULTIPLE; a failed MPI call ends the job.
 *
 *     if (comm_mpi_launched()) comm_mpi_init(&err);                  (once, in main)
 *     comm_world_create_mpi(&w, ndev, &err);  ... w->first_dev, w->nlocal ...
 *     comm_mpi_finalize();                                          (at exit)
 */

/* True when this process was started by mpirun (from its environment; MPI not touched). */
bool comm_mpi_launched(void);
/* Initializes MPI with MPI_THREAD_MULTIPLE (once; later calls return 0). Returns 0 or
 * MOAI_EIO when MPI cannot start or lacks the thread support. */
int comm_mpi_init(struct moai_err *err);
void comm_mpi_finalize(void);
/* This process's rank and the number of processes (MPI initialized). */
int comm_mpi_rank(void);
int comm_mpi_size(void);

/* The world of ndev devices over the MPI processes. Returns 0, or MOAI_EUSAGE when ndev is not
 * a multiple of the process count ("16 devices cannot be shared out over 3 MPI ranks ..."),
 * or MOAI_ENOMEM. */
int comm_world_create_mpi(struct comm_world **w, int ndev, struct moai_err *err);

#endif
