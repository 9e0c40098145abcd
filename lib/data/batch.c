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

bool batch_step_at(const struct batches *b, int64_t step, int64_t *epoch, int64_t *index)
{
    MOAI_ASSERT(step >= 0);
    if (!b->lengths) {
        *epoch = step / b->steps_per_epoch;
        *index = step % b->steps_per_epoch;
        return *index == b->steps_per_epoch - 1;
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
    return step == b->epoch_start[lo + 1] - 1;
}

/* ---- packed rows for the training loop -------------------------------------------------- */

static void write_rows(const struct packing *p, int64_t r0, int64_t n,
                       const struct pack_source *src, int32_t *tokens, int32_t *labels,
                       int32_t *positions, int32_t *lengths, int32_t *examples)
{
    int64_t T = src->T;
    for (int64_t i = 0; i < n; i++) {
        lengths[i] = (int32_t) pack_row_fill(p, r0 + i, src, tokens + i * T, labels + i * T,
                                             positions + i * T);
        examples[i] = (int32_t) (p->first[r0 + i + 1] - p->first[r0 + i]);
    }
}

int batch_packer_init(struct batch_packer *k, const struct batches *b,
                      const struct pack_source *src, struct moai_err *err)
{
    MOAI_ASSERT(b->lengths != NULL && src->T == b->T);
    memset(k, 0, sizeof(*k));
    k->b = b;
    k->src = *src;
    k->epoch = -1;
    k->held[0] = k->held[1] = -1;
    size_t rows = (size_t) (2 * b->batch_size), T = (size_t) b->T;
    k->order = malloc(sizeof(int64_t) * (size_t) (b->n_train + 1));
    k->scratch = malloc(sizeof(int64_t) * (size_t) (2 * b->n_train + 2));
    k->tokens = malloc(sizeof(int32_t) * rows * T);
    k->labels = malloc(sizeof(int32_t) * rows * T);
    k->positions = malloc(sizeof(int32_t) * rows * T);
    k->lengths = malloc(sizeof(int32_t) * rows);
    k->examples = malloc(sizeof(int32_t) * rows);
    int rc = 0;
    if (!k->order || !k->scratch || !k->tokens || !k->labels || !k->positions || !k->lengths ||
        !k->examples)
        rc = moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
    /* the training packing's arrays at their largest (every record), then the validation's */
    if (rc == 0 && (rc = pack_rows(&k->p, b->train, b->n_train, b->lengths, b->T, err)) == 0) {
        struct packing v;
        if ((rc = batch_val_packing(b, &v, err)) == 0) {
            size_t vr = (size_t) v.nrows + 1;
            k->val_rows = v.nrows;
            k->val_tokens = malloc(sizeof(int32_t) * vr * T);
            k->val_labels = malloc(sizeof(int32_t) * vr * T);
            k->val_positions = malloc(sizeof(int32_t) * vr * T);
            k->val_lengths = malloc(sizeof(int32_t) * vr);
            k->val_examples = malloc(sizeof(int32_t) * vr);
            if (!k->val_tokens || !k->val_labels || !k->val_positions || !k->val_lengths ||
                !k->val_examples)
                rc = moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
            else
                write_rows(&v, 0, v.nrows, src, k->val_tokens, k->val_labels, k->val_positions,
                           k->val_lengths, k->val_examples);
            pack_release(&v);
        }
    }
    if (rc < 0) {
        batch_packer_release(k);
        return rc;
    }
    pthread_mutex_init(&k->lock, NULL);
    k->lock_ready = true;
    return 0;
}

void batch_packer_release(struct batch_packer *k)
{
    if (k->lock_ready)
        pthread_mutex_destroy(&k->lock);
    pack_release(&k->p);
    free(k->order);
    free(k->scratch);
    free(k->tokens);
    free(k->labels);
    free(k->positions);
    free(k->lengths);
    free(k->examples);
    free(k->val_tokens);
    free(k->val_labels);
    free(k->val_positions);
    free(k->val_lengths);
    free(k->val_examples);
    memset(k, 0, sizeof(*k));
}

void batch_packer_rows(struct batch_packer *k, int64_t epoch, int64_t index, int64_t *rows)
{
    const struct batches *b = k->b;
    int64_t B = b->batch_size, step = batch_steps_of_epochs(b, epoch) + index;
    MOAI_ASSERT(index >= 0 && index < batch_epoch_steps(b, epoch));
    pthread_mutex_lock(&k->lock);
    int half = k->held[0] == step ? 0 : k->held[1] == step ? 1 : -1;
    if (half < 0) {
        if (k->epoch != epoch) {
            batch_epoch_order(b, epoch, k->order);
            int rc =
                pack_rows_reuse(&k->p, k->scratch, k->order, b->n_train, b->lengths, b->T, NULL);
            MOAI_ASSERT(rc == 0); /* the lengths were checked when the epochs were counted */
            k->epoch = epoch;
        }
        half = k->next;
        k->next ^= 1;
        k->held[half] = step;
        int64_t o = half * B, T = b->T;
        write_rows(&k->p, index * B, B, &k->src, k->tokens + o * T, k->labels + o * T,
                   k->positions + o * T, k->lengths + o, k->examples + o);
    }
    for (int64_t i = 0; i < B; i++)
        rows[i] = half * B + i;
    pthread_mutex_unlock(&k->lock);
}
