/* batch.c - validation split, per-epoch Fisher-Yates shuffle with splitmix64, batches. */
#include "data/batch.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN     0x9E3779B97F4A7C15ull
#define SPLIT_SALT 0x5EEDBA7C45A11D00ull

uint64_t batch_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += GOLDEN);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, m), m >= 1, by rejection of the top partial range. */
static uint64_t draw_below(uint64_t *state, uint64_t m)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % m;
    uint64_t r;
    do
        r = batch_splitmix64(state);
    while (r >= limit);
    return r % m;
}

static void fisher_yates(int64_t *a, int64_t n, uint64_t state)
{
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t) draw_below(&state, (uint64_t) i + 1);
        int64_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *) x, b = *(const int64_t *) y;
    return (a > b) - (a < b);
}

int batch_init(struct batches *b, int64_t n, int64_t batch_size, double validation_fraction,
               bool shuffle, uint64_t seed, struct moai_err *err)
{
    memset(b, 0, sizeof(*b));
    if (!(validation_fraction >= 0.0 && validation_fraction < 1.0))
        return moai_err_set(err, MOAI_EUSAGE, "validation_fraction %g is outside [0, 1)",
                            validation_fraction);
    if (batch_size < 1)
        return moai_err_set(err, MOAI_EUSAGE, "batch size %" PRId64 " is not positive", batch_size);
    int64_t n_val = (int64_t) llround((double) n * validation_fraction);
    if (n - n_val < batch_size)
        return moai_err_set(err, MOAI_EUSAGE,
                            "dataset has %" PRId64
                            " training records, fewer than one batch of %" PRId64,
                            n - n_val, batch_size);
    int64_t *perm = malloc(sizeof(int64_t) * (size_t) n);
    if (!perm)
        return moai_err_set(err, MOAI_ENOMEM, "batching: out of memory");
    for (int64_t i = 0; i < n; i++)
        perm[i] = i;
    if (n_val > 0)
        fisher_yates(perm, n, seed ^ SPLIT_SALT);
    b->n = n;
    b->batch_size = batch_size;
    b->n_train = n - n_val;
    b->n_val = n_val;
    b->train = perm;
    b->val = malloc(sizeof(int64_t) * (size_t) (n_val > 0 ? n_val : 1));
    if (!b->val) {
        batch_release(b);
        return moai_err_set(err, MOAI_ENOMEM, "batching: out of memory");
    }
    memcpy(b->val, perm + b->n_train, sizeof(int64_t) * (size_t) n_val);
    qsort(b->train, (size_t) b->n_train, sizeof(int64_t), cmp_i64);
    qsort(b->val, (size_t) n_val, sizeof(int64_t), cmp_i64);
    b->steps_per_epoch = b->n_train / batch_size;
    b->shuffle = shuffle;
    b->seed = seed;
    return 0;
}

void batch_release(struct batches *b)
{
    free(b->train);
    free(b->val);
    free(b->epoch_start);
    memset(b, 0, sizeof(*b));
}

void batch_epoch_order(const struct batches *b, int64_t epoch, int64_t *order)
{
    memcpy(order, b->train, sizeof(int64_t) * (size_t) b->n_train);
    if (b->shuffle)
        fisher_yates(order, b->n_train, b->seed + GOLDEN * (uint64_t) (epoch + 1));
}

void batch_rows(const struct batches *b, int64_t epoch, int64_t index, int64_t *rows)
{
    MOAI_ASSERT(index >= 0 && index < b->steps_per_epoch);
    if (!b->shuffle) {
        memcpy(rows, b->train + index * b->batch_size, sizeof(int64_t) * (size_t) b->batch_size);
        return;
    }
    int64_t *order = malloc(sizeof(int64_t) * (size_t) b->n_train);
    MOAI_ASSERT(order != NULL);
    batch_epoch_order(b, epoch, order);
    memcpy(rows, order + index * b->batch_size, sizeof(int64_t) * (size_t) b->batch_size);
    free(order);
}

/* ---- packing ---------------------------------------------------------------------------- */

int batch_epoch_packing(const struct batches *b, int64_t epoch, struct packing *p,
                        struct moai_err *err)
{
    MOAI_ASSERT(b->lengths != NULL);
    int64_t *order = malloc(sizeof(int64_t) * (size_t) (b->n_train + 1));
    if (!order) {
        memset(p, 0, sizeof(*p));
        return moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
    }
    batch_epoch_order(b, epoch, order);
    int rc = pack_rows(p, order, b->n_train, b->lengths, b->T, err);
    free(order);
    return rc;
}

int batch_val_packing(const struct batches *b, struct packing *p, struct moai_err *err)
{
    MOAI_ASSERT(b->lengths != NULL);
    return pack_rows(p, b->val, b->n_val, b->lengths, b->T, err);
}

int batch_set_packing(struct batches *b, const int32_t *lengths, int64_t T, int64_t epochs,
                      int64_t steps, struct moai_err *err)
{
    int64_t cap = 8, n = 0;
    int64_t *start = malloc(sizeof(int64_t) * (size_t) (cap + 1));
    if (!start)
        return moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
    start[0] = 0;
    b->lengths = lengths;
    b->T = T;
    while (n < epochs || start[n] < steps) {
        struct packing p;
        int rc = batch_epoch_packing(b, n, &p, err);
        if (rc < 0) {
            free(start);
            b->lengths = NULL;
            return rc;
        }
        int64_t rows = p.nrows;
        pack_release(&p);
        if (rows < b->batch_size) {
            free(start);
            b->lengths = NULL;
            return moai_err_set(err, MOAI_EUSAGE,
                                "dataset has %" PRId64 " training records, which pack into %" PRId64
                                " rows of %" PRId64 " tokens, fewer than one batch of %" PRId64,
                                b->n_train, rows, T, b->batch_size);
        }
        if (n == cap) {
            int64_t *grown = realloc(start, sizeof(int64_t) * (size_t) (2 * cap + 1));
            if (!grown) {
                free(start);
                b->lengths = NULL;
                return moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
            }
            start = grown;
            cap *= 2;
        }
        start[n + 1] = start[n] + rows / b->batch_size;
        n++;
    }
    free(b->epoch_start);
    b->epoch_start = start;
    b->nepochs = n;
    b->steps_per_epoch = start[1] - start[0];
    return 0;
}

int64_t batch_epoch_steps(const struct batches *b, int64_t epoch)
{
    if (!b->lengths)
        return b->steps_per_epoch;
    MOAI_ASSERT(epoch >= 0 && epoch < b->nepochs);
    return b->epoch_start[epoch + 1] - b->epoch_start[epoch];
}

int64_t batch_steps_of_epochs(const struct batches *b, int64_t epochs)
{
    if (!b->lengths)
        return b->steps_per_epoch * epochs;
    MOAI_ASSERT(epochs >= 0 && epochs <= b->nepochs);
    return b->epoch_start[epochs];
}

void batch_step_at(const struct batches *b, int64_t step, int64_t *epoch, int64_t *index)
{
    MOAI_ASSERT(step >= 0);
    if (!b->lengths) {
        *epoch = step / b->steps_per_epoch;
        *index = step % b->steps_per_epoch;
        return;
    }
    MOAI_ASSERT(step < b->epoch_start[b->nepochs]);
    int64_t lo = 0, hi = b->nepochs - 1; /* the last epoch whose start is <= step */
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (b->epoch_start[mid] <= step)
            lo = mid;
        else
            hi = mid - 1;
    }
    *epoch = lo;
    *index = step - b->epoch_start[lo];
}
