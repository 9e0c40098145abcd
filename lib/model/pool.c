/* pool.c - a fixed pool of worker threads running numbered tasks (see pool.h). */
#include "model/pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

/* Polls of the job counter before a worker (or the waiting caller) sleeps: about 0.2 ms (a
 * PAUSE costs tens of cycles), longer than the serial gaps between a step's jobs. */
#define POOL_SPIN 8000

struct pool {
    int nthreads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t wake;      /* workers sleep here between jobs */
    pthread_cond_t done;      /* the caller sleeps here until the workers finish */
    atomic_uint_fast64_t gen; /* job number; a change tells workers a job is posted */
    atomic_int_fast64_t next; /* the next unclaimed task of the current job */
    atomic_int busy;          /* workers that have not finished the current job */
    int sleepers;             /* workers blocked on wake (under mu) */
    bool caller_sleeping;     /* under mu */
    bool stop;                /* under mu */
    /* The current job: written by the caller before gen is bumped. */
    void (*fn)(void *arg, int64_t task, int thread);
    void *arg;
    int64_t ntasks;
};

struct pool_worker {
    struct pool *pool;
    int thread;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void run_tasks(struct pool *p, int thread)
{
    for (;;) {
        int64_t t = atomic_fetch_add_explicit(&p->next, 1, memory_order_relaxed);
        if (t >= p->ntasks)
            return;
        p->fn(p->arg, t, thread);
    }
}

static void *worker_main(void *argp)
{
    struct pool_worker *w = argp;
    struct pool *p = w->pool;
    int thread = w->thread;
    uint64_t seen = 0;

    free(w);
    for (;;) {
        uint64_t g = atomic_load_explicit(&p->gen, memory_order_acquire);
        for (int spin = 0; g == seen && spin < POOL_SPIN; spin++) {
            cpu_relax();
            g = atomic_load_explicit(&p->gen, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load_explicit(&p->gen, memory_order_acquire)) == seen && !p->stop) {
                p->sleepers++;
                pthread_cond_wait(&p->wake, &p->mu);
                p->sleepers--;
            }
            bool stop = p->stop;
            pthread_mutex_unlock(&p->mu);
            if (stop)
                return NULL;
        }
        seen = g;
        run_tasks(p, thread);
        if (atomic_fetch_sub_explicit(&p->busy, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->mu);
            if (p->caller_sleeping)
                pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

struct pool *pool_create(int nthreads)
{
    struct pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    if (nthreads < 1)
        nthreads = 1;
    p->nthreads = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->gen, 0);
    atomic_init(&p->next, 0);
    atomic_init(&p->busy, 0);
    p->threads = calloc((size_t) nthreads, sizeof(pthread_t));
    if (!p->threads)
        goto out_free;
    for (int i = 1; i < nthreads; i++) {
        struct pool_worker *w = malloc(sizeof(*w));
        if (!w)
            goto out_free;
        w->pool = p;
        w->thread = i;
        if (pthread_create(&p->threads[i], NULL, worker_main, w) != 0) {
            free(w);
            goto out_free;
        }
        p->nthreads = i + 1;
    }
    return p;

out_free:
    pool_free(p);
    return NULL;
}

void pool_free(struct pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p);
}

int pool_threads(const struct pool *p)
{
    return p ? p->nthreads : 1;
}

void pool_run(struct pool *p, int64_t ntasks, void (*fn)(void *arg, int64_t task, int thread),
              void *arg)
{
    if (ntasks <= 0)
        return;
    if (!p || p->nthreads == 1 || ntasks == 1) {
        for (int64_t t = 0; t < ntasks; t++)
            fn(arg, t, 0);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    p->ntasks = ntasks;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->busy, p->nthreads - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
    pthread_mutex_lock(&p->mu);
    if (p->sleepers)
        pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    run_tasks(p, 0);

    for (int spin = 0; spin < POOL_SPIN; spin++) {
        if (atomic_load_explicit(&p->busy, memory_order_acquire) == 0)
            return;
        cpu_relax();
    }
    pthread_mutex_lock(&p->mu);
    p->caller_sleeping = true;
    while (atomic_load_explicit(&p->busy, memory_order_acquire) != 0)
        pthread_cond_wait(&p->done, &p->mu);
    p->caller_sleeping = false;
    pthread_mutex_unlock(&p->mu);
}
