/* dev.c - virtual devices: worker threads with a memory budget (see dev.h). */
#include "exec/dev.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dev_set_init(struct dev_set *ds, int n, int64_t capacity_bytes, struct moai_err *err)
{
    ds->n = n;
    ds->devs = calloc((size_t) n, sizeof(*ds->devs));
    if (!ds->devs)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory setting up %d devices", n);
    for (int i = 0; i < n; i++) {
        ds->devs[i].id = i;
        ds->devs[i].capacity_bytes = capacity_bytes;
    }
    return 0;
}

void dev_set_release(struct dev_set *ds)
{
    free(ds->devs);
    ds->devs = NULL;
    ds->n = 0;
}

int dev_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
    return 1;
}

/* The threads wait here until every one of them has started: workers meet at collectives,
 * so none may begin while a thread that failed to start leaves them waiting for it. */
struct dev_gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state; /* 0 closed, 1 open (run), -1 cancelled (return at once) */
};

struct dev_job {
    struct dev *d;
    int (*worker)(struct dev *d, void *arg);
    void *arg;
    struct dev_gate *gate;
};

static void *dev_thread(void *p)
{
    struct dev_job *job = p;
    pthread_mutex_lock(&job->gate->lock);
    while (job->gate->state == 0)
        pthread_cond_wait(&job->gate->cond, &job->gate->lock);
    int go = job->gate->state > 0;
    pthread_mutex_unlock(&job->gate->lock);
    job->d->rc = go ? job->worker(job->d, job->arg) : 0;
    return NULL;
}

static void gate_set(struct dev_gate *g, int state)
{
    pthread_mutex_lock(&g->lock);
    g->state = state;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

int dev_set_run(struct dev_set *ds, int (*worker)(struct dev *d, void *arg), void *arg,
                struct moai_err *err)
{
    struct dev_job *jobs = calloc((size_t) ds->n, sizeof(*jobs));
    pthread_t *threads = calloc((size_t) ds->n, sizeof(*threads));
    int blas_before = openblas_get_num_threads();
    int per = dev_cores() / ds->n;
    int started = 0, rc = 0;
    struct dev_gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};

    if (!jobs || !threads) {
        free(jobs);
        free(threads);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory starting %d devices", ds->n);
    }
    openblas_set_num_threads(per > 1 ? per : 1);
    for (int i = 0; i < ds->n; i++) {
        jobs[i] = (struct dev_job){.d = &ds->devs[i], .worker = worker, .arg = arg, .gate = &gate};
        ds->devs[i].rc = 0;
        if (ds->n == 1) {
            gate.state = 1;
            dev_thread(&jobs[i]);
            continue;
        }
        if (pthread_create(&threads[i], NULL, dev_thread, &jobs[i]) != 0) {
            rc = moai_err_set(err, MOAI_ENOMEM, "cannot start the thread of device %d", i);
            break;
        }
        started++;
    }
    if (ds->n > 1)
        gate_set(&gate, rc < 0 ? -1 : 1);
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    openblas_set_num_threads(blas_before);
    for (int i = 0; rc == 0 && i < ds->n; i++) {
        if (ds->devs[i].rc < 0) {
            rc = ds->devs[i].rc;
            if (err) {
                *err = ds->devs[i].err;
                err->code = rc;
            }
        }
    }
    free(jobs);
    free(threads);
    return rc;
}

int dev_reserve(struct dev *d, int64_t bytes, const char *what)
{
    if (d->used_bytes + bytes > d->capacity_bytes) {
        d->oom_requested_bytes = d->used_bytes + bytes;
        return moai_err_set(&d->err, MOAI_EOOM,
                            "device %d is out of memory allocating %s: %lld bytes requested "
                            "with %lld of %lld in use",
                            d->id, what, (long long) bytes, (long long) d->used_bytes,
                            (long long) d->capacity_bytes);
    }
    d->used_bytes += bytes;
    if (d->used_bytes > d->peak_bytes)
        d->peak_bytes = d->used_bytes;
    return 0;
}

void dev_unreserve(struct dev *d, int64_t bytes)
{
    d->used_bytes -= bytes;
}

void *dev_alloc(struct dev *d, int64_t bytes, const char *what)
{
    if (bytes <= 0)
        bytes = 1;
    if (d->used_bytes + bytes > d->capacity_bytes) {
        dev_reserve(d, bytes, what);
        return NULL;
    }
    size_t size = ((size_t) bytes + 63) & ~(size_t) 63;
    void *p = aligned_alloc(64, size);
    if (!p) {
        moai_err_set(&d->err, MOAI_ENOMEM, "device %d: the host is out of memory allocating %s",
                     d->id, what);
        return NULL;
    }
    memset(p, 0, size);
    d->used_bytes += bytes;
    if (d->used_bytes > d->peak_bytes)
        d->peak_bytes = d->used_bytes;
    return p;
}

void dev_free(struct dev *d, void *p, int64_t bytes)
{
    if (!p)
        return;
    free(p);
    d->used_bytes -= bytes <= 0 ? 1 : bytes;
}
