/* pool.h - a fixed pool of worker threads that runs numbered tasks: the model's parallelism.
 *
 * The model and the optimizer split their work into numbered tasks and never let two tasks
 * write the same element, so results do not depend on which thread runs which task. The
 * calling thread takes part as thread 0; workers are 1..n-1. Between jobs a worker spins
 * briefly (about 0.2 ms: a job usually follows within microseconds), then sleeps on a
 * condition variable, so an idle pool costs no CPU.
 *
 * Ownership: pool_create returns a pool the caller frees with pool_free. Thread-safety: one
 * thread at a time may call pool_run on a pool, and task functions must not call pool_run on
 * the same pool. A NULL pool runs every task on the calling thread.
 *
 *     struct pool *p = pool_create(2);
 *     pool_run(p, ntasks, scale_rows, &args);   // scale_rows(&args, task, thread) per task
 *     pool_free(p);
 */
#ifndef MOAI_POOL_H
#define MOAI_POOL_H

#include <stdint.h>

struct pool;

/* Starts nthreads - 1 workers (nthreads >= 1). Returns NULL when threads cannot be made. */
struct pool *pool_create(int nthreads);

/* Stops and joins the workers and frees the pool. NULL is a no-op. */
void pool_free(struct pool *pool);

/* Threads of the pool, the caller included; 1 for NULL. */
int pool_threads(const struct pool *pool);

/* Runs fn(arg, task, thread) once for each task in [0, ntasks), thread in [0, nthreads), and
 * returns when all are done. Tasks are claimed in increasing order by whichever thread is
 * free. */
void pool_run(struct pool *pool, int64_t ntasks, void (*fn)(void *arg, int64_t task, int thread),
              void *arg);

#endif
