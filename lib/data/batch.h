/* batch.h - the order in which records are batched: validation split, per-epoch shuffle.
 *
 * Rules (deterministic and portable, so a resumed run sees the same batches):
 * - PRNG: splitmix64 (Steele, Lea, Flood 2014): state += 0x9E3779B97F4A7C15, then the
 *   mixing finalizer. A uniform draw below m uses rejection (no modulo bias).
 * - Shuffle: Fisher-Yates from the last index down: for i = n-1 .. 1, swap i with a draw in
 *   [0, i].
 * - Validation split: permute 0..n-1 with the state seeded by seed ^ 0x5EEDBA7C45A11D00;
 *   the last round(n * validation_fraction) entries are the validation records; both sets
 *   are then kept in ascending file order. Fixed for the whole run.
 * - Epoch order: with shuffle, the training records (in file order) are permuted with the
 *   state seeded by seed + 0x9E3779B97F4A7C15 * (epoch + 1); without shuffle, file order.
 * - Steps per epoch = floor(training records / batch size): the last partial batch is
 *   dropped. Step `index` of an epoch takes entries index*B .. index*B+B-1 of its order.
 *
 * - Packing (batch_set_packing, dataset.packing): each epoch's order is packed into rows of T
 *   tokens (pack.h), and the epoch's steps are floor(rows / batch size), the last partial
 *   batch of rows dropped. How many rows an order packs into depends on the order, so epochs
 *   may differ by a step or two: the steps of every epoch the run can reach are counted once,
 *   and a global step is placed by them (batch_step_at). The validation records are packed
 *   once, in ascending file order.
 *
 * Ownership: struct batches owns its index arrays (batch_release). Thread-safety: after
 * batch_init and batch_set_packing every function only reads it.
 *
 *     struct batches b;
 *     batch_init(&b, ds.n, 16, 0.1, true, 42, &err);
 *     int64_t rows[16]; batch_rows(&b, epoch, step, rows);
 */
#ifndef MOAI_BATCH_H
#define MOAI_BATCH_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "data/pack.h"
#include "err.h"

struct batches {
    int64_t n;               /* records in the dataset */
    int64_t batch_size;      /* sequences per step */
    int64_t n_train, n_val;  /* n_train + n_val = n */
    int64_t *train;          /* (n_train) training record indices, ascending */
    int64_t *val;            /* (n_val) validation record indices, ascending */
    int64_t steps_per_epoch; /* floor(n_train / batch_size), at least 1 */
    bool shuffle;
    uint64_t seed;
    /* packing (batch_set_packing): packed rows instead of records */
    const int32_t *lengths; /* (n) every record's real tokens, borrowed; NULL: no packing */
    int64_t T;              /* tokens per row */
    int64_t nepochs;        /* epochs counted */
    int64_t *epoch_start;   /* (nepochs + 1) the first step (from 0) of each epoch, then the end */
};

/* One splitmix64 step: advances *state and returns the next 64-bit value. */
uint64_t batch_splitmix64(uint64_t *state);

/* Fails (MOAI_EUSAGE) when validation_fraction is outside [0, 1) or fewer training records
 * remain than one batch. Returns 0 or a negative code with err filled. */
int batch_init(struct batches *b, int64_t n, int64_t batch_size, double validation_fraction,
               bool shuffle, uint64_t seed, struct moai_err *err);
void batch_release(struct batches *b);

/* The full training order of an epoch: n_train record indices into order. */
void batch_epoch_order(const struct batches *b, int64_t epoch, int64_t *order);

/* The batch_size record indices of step index (0 .. steps_per_epoch-1) of epoch epoch.
 * A pure function of its arguments (it recomputes the epoch's order: O(n_train)). */
void batch_rows(const struct batches *b, int64_t epoch, int64_t index, int64_t *rows);

/* Switches b to packing: the steps of epochs 0, 1, ... are counted (steps_per_epoch becomes
 * epoch 0's) until at least `epochs` epochs and `steps` steps are covered. lengths (n entries,
 * each in [1, T]) must outlive b. Fails (MOAI_EUSAGE) when an epoch's records pack into fewer
 * rows than one batch, MOAI_ENOMEM. Returns 0 or a negative code with err filled. */
int batch_set_packing(struct batches *b, const int32_t *lengths, int64_t T, int64_t epochs,
                      int64_t steps, struct moai_err *err);

/* The packing of epoch `epoch`'s order (row k of step `index` is row index * batch_size + k).
 * Returns 0 or a negative code (MOAI_ENOMEM) with err filled. */
int batch_epoch_packing(const struct batches *b, int64_t epoch, struct packing *p,
                        struct moai_err *err);

/* The validation records packed, in ascending file order. */
int batch_val_packing(const struct batches *b, struct packing *p, struct moai_err *err);

/* The steps of epoch `epoch` (packing: counted by batch_set_packing; else steps_per_epoch). */
int64_t batch_epoch_steps(const struct batches *b, int64_t epoch);

/* The steps of epochs [0, epochs). */
int64_t batch_steps_of_epochs(const struct batches *b, int64_t epochs);

/* Where global step `step` (from 0) falls: *epoch and *index within it; returns whether it is
 * the epoch's last step. Under packing the step must lie in the epochs counted. */
bool batch_step_at(const struct batches *b, int64_t step, int64_t *epoch, int64_t *index);

/*
 * Packed rows for a training loop that asks for one step's rows at a time, from several
 * threads (batch_packer_rows). The epoch's packing is redone in place when a step of another
 * epoch is asked for, and the step's batch_size rows are written into one of two halves of a
 * buffer of 2 batch_size rows, so the rows of a step stay in place while the next step's are
 * written. Everything is allocated by batch_packer_init: asking for rows cannot fail. The
 * validation records are packed and written once (val_*, val_rows of them).
 */
struct batch_packer {
    const struct batches *b;
    struct pack_source src; /* every record (b->lengths are theirs) */
    pthread_mutex_t lock;
    bool lock_ready;
    int64_t epoch; /* whose packing p is; -1: none */
    struct packing p;
    int64_t *order, *scratch; /* (n_train), (2 n_train + 2) */
    int64_t held[2];          /* the global step whose rows each half holds; -1: none */
    int next;                 /* the half written next */
    /* (2 batch_size) rows: T tokens, labels and positions each; real tokens, examples */
    int32_t *tokens, *labels, *positions, *lengths, *examples;
    int64_t val_rows; /* the validation set packed, rows of the same arrays as above: */
    int32_t *val_tokens, *val_labels, *val_positions, *val_lengths, *val_examples;
};

/* Sets k up over b (batch_set_packing done) and the records src. Returns 0, or MOAI_ENOMEM
 * with err filled (k then holds nothing). */
int batch_packer_init(struct batch_packer *k, const struct batches *b,
                      const struct pack_source *src, struct moai_err *err);
void batch_packer_release(struct batch_packer *k);

/* The batch_size rows of step `index` of epoch `epoch`, written into the buffer: their
 * indices into it (rows of tokens, labels...). */
void batch_packer_rows(struct batch_packer *k, int64_t epoch, int64_t index, int64_t *rows);

#endif
