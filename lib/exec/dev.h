/* dev.h - virtual devices: one worker thread each, with a memory budget and a peak record.
 *
 * A flavor's devices run on this machine as threads. Each device has a capacity (the
 * flavor's memory per device); every buffer a device holds comes from dev_alloc, which fails
 * with MOAI_EOOM past the capacity instead of crashing, and records the peak. The planner's
 * memory model is checked against these peaks.
 *
 *     struct dev_set ds;
 *     dev_set_init(&ds, 4, 64 << 20, &err);
 *     dev_set_run(&ds, worker, arg, &err);     (worker(dev, arg) on 4 threads, joined)
 *     ... ds.devs[i].peak_bytes ...
 *     dev_set_release(&ds);
 *
 * Thread-safety: a struct dev belongs to its worker thread; dev_alloc/dev_free on one device
 * from one thread at a time.
 */
#ifndef MOAI_DEV_H
#define MOAI_DEV_H

#include "err.h"

#include <stdint.h>

struct dev {
    int id;
    int64_t capacity_bytes;
    int64_t used_bytes;
    int64_t peak_bytes;
    int64_t oom_requested_bytes; /* in use + asked for, at the allocation that failed */
    struct moai_err err;         /* the worker's error, when it fails */
    int rc;                      /* the worker's return code */
};

struct dev_set {
    int n;
    struct dev *devs;
};

/* Sets up n devices of capacity_bytes each. Returns 0 or MOAI_ENOMEM. */
int dev_set_init(struct dev_set *ds, int n, int64_t capacity_bytes, struct moai_err *err);
void dev_set_release(struct dev_set *ds);

/* Runs worker(dev, arg) on one thread per device and joins them. Sets OpenBLAS to
 * max(1, cores / n) threads meanwhile, so device threads and BLAS threads do not
 * oversubscribe the cores. Returns 0, or the first failing device's code with its message
 * copied into err (prefixed "device N"). */
int dev_set_run(struct dev_set *ds, int (*worker)(struct dev *d, void *arg), void *arg,
                struct moai_err *err);

/* 64-byte aligned, zeroed memory of bytes on d, or NULL with d->err set to the
 * OUT_OF_MEMORY message (MOAI_EOOM) when the capacity would be exceeded. */
void *dev_alloc(struct dev *d, int64_t bytes, const char *what);

/* Counts bytes of memory that another allocator (the model's arenas) holds for d against its
 * capacity. Returns 0, or MOAI_EOOM with d->err set like dev_alloc. */
int dev_reserve(struct dev *d, int64_t bytes, const char *what);
void dev_unreserve(struct dev *d, int64_t bytes);

/* Frees p (of bytes, as allocated) on d. p may be NULL. */
void dev_free(struct dev *d, void *p, int64_t bytes);

/* The number of cores this process may use. */
int dev_cores(void);

#endif
