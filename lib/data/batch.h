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
 * Ownership: struct batches owns its index arrays (batch_release). Thread-safety: after
 * batch_init every function only reads it.
 *
 *     struct batches b;
 *     batch_init(&b, ds.n, 16, 0.1, true, 42, &err);
 *     int64_t rows[16]; batch_rows(&b, epoch, step, rows);
 */
#ifndef MOAI_BATCH_H
#define MOAI_BATCH_H

#include <stdbool.h>
#include <stdint.h>

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

#endif
