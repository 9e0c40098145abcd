/* test_pack.c - sequence packing: which examples go in which row, what a row holds, epochs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "data/batch.h"
#include "data/pack.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

/* Row r of p as a list of example indices. */
static void assert_row(const struct packing *p, int64_t r, const int64_t *want, int64_t n)
{
    assert_int_equal(p->first[r + 1] - p->first[r], n);
    for (int64_t k = 0; k < n; k++)
        assert_int_equal(p->items[p->first[r] + k], want[k]);
}

static void test_pack_first_fit(void **state)
{
    (void) state;
    /* T = 10: 6 opens row 0; 5 does not fit there, opens row 1; 4 fills row 0 (closed); 3 goes
     * to row 1; 7 opens row 2; 1 goes to row 1, the first with room */
    const int32_t lengths[6] = {6, 5, 4, 3, 7, 1};
    const int64_t order[6] = {0, 1, 2, 3, 4, 5};
    struct packing p;
    struct moai_err err = {0};
    assert_int_equal(pack_rows(&p, order, 6, lengths, 10, &err), 0);
    assert_int_equal(p.nrows, 3);
    assert_int_equal(p.nitems, 6);
    assert_int_equal(p.tokens, 26);
    assert_row(&p, 0, (const int64_t[]){0, 2}, 2);
    assert_row(&p, 1, (const int64_t[]){1, 3, 5}, 3);
    assert_row(&p, 2, (const int64_t[]){4}, 1);
    /* attention: (36 + 16) + (25 + 9 + 1) + 49 of 3 x 100 products */
    assert_float_equal(pack_attention_fraction(&p, lengths, 10), 136.0 / 300.0, 1e-12);
    pack_release(&p);

    /* another order of the same examples packs other rows: the order is followed */
    const int64_t rev[6] = {5, 4, 3, 2, 1, 0};
    assert_int_equal(pack_rows(&p, rev, 6, lengths, 10, &err), 0);
    /* 1, 7 -> row 0 (8); 3 -> row 1; 4 -> row 1 (7); 5 -> row 2; 6 -> row 3 */
    assert_int_equal(p.nrows, 4);
    assert_row(&p, 0, (const int64_t[]){5, 4}, 2);
    assert_row(&p, 1, (const int64_t[]){3, 2}, 2);
    assert_row(&p, 2, (const int64_t[]){1}, 1);
    assert_row(&p, 3, (const int64_t[]){0}, 1);
    pack_release(&p);
}

static void test_pack_window_closes_oldest(void **state)
{
    (void) state;
    /* PACK_OPEN_ROWS examples of 9 tokens (T = 10) leave as many rows open with room for 1;
     * one more opens a row and closes row 0, so the final 1-token example goes to row 1 */
    enum { W = PACK_OPEN_ROWS, N = W + 2 };
    int32_t lengths[N];
    int64_t order[N];
    for (int i = 0; i < N; i++) {
        lengths[i] = i == N - 1 ? 1 : 9;
        order[i] = i;
    }
    struct packing p;
    struct moai_err err = {0};
    assert_int_equal(pack_rows(&p, order, N, lengths, 10, &err), 0);
    assert_int_equal(p.nrows, W + 1);
    assert_row(&p, 0, (const int64_t[]){0}, 1);
    assert_row(&p, 1, (const int64_t[]){1, N - 1}, 2);
    assert_row(&p, W, (const int64_t[]){W}, 1);
    pack_release(&p);
}

static void test_pack_every_example_once(void **state)
{
    (void) state;
    enum { N = 3000, T = 64 };
    static int32_t lengths[N];
    static int64_t order[N];
    uint64_t s = 7;
    for (int i = 0; i < N; i++) {
        lengths[i] = 1 + (int32_t) (batch_splitmix64(&s) % T);
        order[i] = (i * 7) % N; /* 7 is prime to 3000: a permutation */
    }
    struct packing p, q;
    struct moai_err err = {0};
    assert_int_equal(pack_rows(&p, order, N, lengths, T, &err), 0);
    assert_int_equal(pack_rows(&q, order, N, lengths, T, &err), 0);
    /* deterministic */
    assert_int_equal(p.nrows, q.nrows);
    assert_memory_equal(p.items, q.items, sizeof(int64_t) * N);
    static char seen[N];
    memset(seen, 0, sizeof(seen));
    int64_t tokens = 0, prev_first = -1;
    for (int64_t r = 0; r < p.nrows; r++) {
        int64_t used = 0;
        assert_true(p.first[r + 1] > p.first[r]); /* no empty row */
        for (int64_t k = p.first[r]; k < p.first[r + 1]; k++) {
            seen[p.items[k]]++;
            used += lengths[p.items[k]];
        }
        assert_true(used <= T);
        tokens += used;
        /* rows in the order they were opened: their first examples in the given order */
        int64_t pos = 0;
        while (order[pos] != p.items[p.first[r]])
            pos++;
        assert_true(pos > prev_first);
        prev_first = pos;
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(seen[i], 1);
    assert_int_equal(tokens, p.tokens);
    /* first fit over 64 open rows packs uniform lengths tightly: above 90% of the tokens */
    assert_true((double) p.tokens / (double) (p.nrows * T) > 0.9);
    pack_release(&p);
    pack_release(&q);
}

static void test_pack_row_fill(void **state)
{
    (void) state;
    /* three examples of T = 8, right-padded with 0; the second has a masked prompt token */
    const int32_t tokens[3 * 8] = {1, 11, 12, 2,  0, 0, 0, 0, /* */
                                   1, 21, 22, 23, 2, 0, 0, 0, /* */
                                   1, 31, 2,  0,  0, 0, 0, 0};
    const int32_t labels[3 * 8] = {1,    11,   12, 2,    -100, -100, -100, -100, /* */
                                   -100, -100, 22, 23,   2,    -100, -100, -100, /* */
                                   1,    31,   2,  -100, -100, -100, -100, -100};
    const int32_t lengths[3] = {4, 5, 3};
    const int64_t order[3] = {0, 1, 2};
    struct pack_source src = {8, tokens, labels, lengths, 9};
    struct packing p;
    struct moai_err err = {0};
    assert_int_equal(pack_rows(&p, order, 3, lengths, 8, &err), 0);
    assert_int_equal(p.nrows, 2); /* 4 + 3 in row 0, 5 in row 1 */
    int32_t t[8], l[8], pos[8];
    assert_int_equal(pack_row_fill(&p, 0, &src, t, l, pos), 7);
    assert_memory_equal(t, ((const int32_t[]){1, 11, 12, 2, 1, 31, 2, 9}), sizeof(t));
    /* each example's first label is -100: no label crosses from one example to the next */
    assert_memory_equal(l, ((const int32_t[]){-100, 11, 12, 2, -100, 31, 2, -100}), sizeof(l));
    assert_memory_equal(pos, ((const int32_t[]){0, 1, 2, 3, 0, 1, 2, 0}), sizeof(pos));
    assert_int_equal(pack_row_fill(&p, 1, &src, t, l, pos), 5);
    assert_memory_equal(t, ((const int32_t[]){1, 21, 22, 23, 2, 9, 9, 9}), sizeof(t));
    assert_memory_equal(l, ((const int32_t[]){-100, -100, 22, 23, 2, -100, -100, -100}), sizeof(l));
    assert_memory_equal(pos, ((const int32_t[]){0, 1, 2, 3, 4, 0, 1, 2}), sizeof(pos));
    pack_release(&p);
}

static void test_pack_bad_length(void **state)
{
    (void) state;
    const int32_t lengths[2] = {3, 9};
    const int64_t order[2] = {0, 1};
    struct packing p;
    struct moai_err err = {0};
    assert_int_equal(pack_rows(&p, order, 2, lengths, 8, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "packing: example 1 has 9 tokens, outside [1, 8]");
    assert_null(p.items);
}

static void test_pack_epochs(void **state)
{
    (void) state;
    enum { N = 400, T = 32, B = 4 };
    static int32_t lengths[N];
    uint64_t s = 3;
    for (int i = 0; i < N; i++)
        lengths[i] = 1 + (int32_t) (batch_splitmix64(&s) % 24);
    struct batches b;
    struct moai_err err = {0};
    assert_int_equal(batch_init(&b, N, B, 0.1, true, 42, &err), 0);
    /* at least 3 epochs and 100 steps */
    assert_int_equal(batch_set_packing(&b, lengths, T, 3, 100, &err), 0);
    assert_true(b.nepochs >= 3);
    assert_true(batch_steps_of_epochs(&b, b.nepochs) >= 100);
    int64_t step = 0;
    for (int64_t e = 0; e < b.nepochs; e++) {
        struct packing p, q;
        assert_int_equal(batch_epoch_packing(&b, e, &p, &err), 0);
        assert_int_equal(batch_epoch_packing(&b, e, &q, &err), 0); /* a resumed run's */
        assert_memory_equal(p.items, q.items, sizeof(int64_t) * (size_t) p.nitems);
        assert_int_equal(p.nitems, b.n_train);
        /* the epoch's steps: its rows in whole batches */
        assert_int_equal(batch_epoch_steps(&b, e), p.nrows / B);
        if (e == 0)
            assert_int_equal(b.steps_per_epoch, p.nrows / B);
        for (int64_t i = 0; i < batch_epoch_steps(&b, e); i++, step++) {
            int64_t ee, ii;
            batch_step_at(&b, step, &ee, &ii);
            assert_int_equal(ee, e);
            assert_int_equal(ii, i);
        }
        pack_release(&p);
        pack_release(&q);
    }
    assert_int_equal(step, batch_steps_of_epochs(&b, b.nepochs));
    /* the validation set: packed in ascending file order */
    struct packing v;
    assert_int_equal(batch_val_packing(&b, &v, &err), 0);
    assert_int_equal(v.nitems, b.n_val);
    assert_int_equal(v.items[0], b.val[0]);
    pack_release(&v);
    batch_release(&b);

    /* too few rows for one batch: 8 records of 8 tokens fill 2 rows of 32 */
    const int32_t eights[8] = {8, 8, 8, 8, 8, 8, 8, 8};
    assert_int_equal(batch_init(&b, 8, 4, 0.0, false, 1, &err), 0);
    assert_int_equal(batch_set_packing(&b, eights, T, 1, 0, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "dataset has 8 training records, which pack into 2 rows of 32 "
                                 "tokens, fewer than one batch of 4");
    batch_release(&b);
}

static void test_pack_packer_rows(void **state)
{
    (void) state;
    enum { N = 120, T = 16, B = 3 };
    static int32_t tokens[N * T], labels[N * T], lengths[N];
    uint64_t s = 11;
    for (int e = 0; e < N; e++) {
        lengths[e] = 1 + (int32_t) (batch_splitmix64(&s) % 12);
        for (int t = 0; t < T; t++) {
            tokens[e * T + t] = t < lengths[e] ? 100 * e + t : 0;
            labels[e * T + t] = t < lengths[e] ? 100 * e + t : -100;
        }
    }
    struct batches b;
    struct batch_packer k;
    struct moai_err err = {0};
    struct pack_source src = {T, tokens, labels, lengths, 0};
    assert_int_equal(batch_init(&b, N, B, 0.25, true, 5, &err), 0);
    assert_int_equal(batch_set_packing(&b, lengths, T, 2, 0, &err), 0);
    assert_int_equal(batch_packer_init(&k, &b, &src, &err), 0);
    int32_t want_t[T], want_l[T], want_p[T];
    int64_t rows[B];
    /* steps of both epochs, each twice, and a step asked for again after the next one */
    const int64_t asks[][2] = {{0, 0}, {0, 0}, {0, 1}, {0, 0}, {0, 2}, {1, 0}, {1, 1}, {1, 1}};
    for (size_t a = 0; a < sizeof(asks) / sizeof(asks[0]); a++) {
        int64_t e = asks[a][0], i = asks[a][1];
        struct packing p;
        assert_int_equal(batch_epoch_packing(&b, e, &p, &err), 0);
        batch_packer_rows(&k, e, i, rows);
        for (int64_t r = 0; r < B; r++) {
            int64_t real = pack_row_fill(&p, i * B + r, &src, want_t, want_l, want_p);
            assert_int_equal(k.lengths[rows[r]], real);
            assert_int_equal(k.examples[rows[r]], p.first[i * B + r + 1] - p.first[i * B + r]);
            assert_memory_equal(k.tokens + rows[r] * T, want_t, sizeof(want_t));
            assert_memory_equal(k.labels + rows[r] * T, want_l, sizeof(want_l));
            assert_memory_equal(k.positions + rows[r] * T, want_p, sizeof(want_p));
        }
        pack_release(&p);
    }
    /* a step's rows stay in place while the next step's are written */
    int64_t first[B];
    batch_packer_rows(&k, 0, 1, first);
    int32_t kept[B * T];
    memcpy(kept, k.tokens + first[0] * T, sizeof(kept));
    batch_packer_rows(&k, 0, 2, rows);
    assert_true(rows[0] != first[0]);
    assert_memory_equal(kept, k.tokens + first[0] * T, sizeof(kept));
    /* the validation set, packed once */
    struct packing v;
    assert_int_equal(batch_val_packing(&b, &v, &err), 0);
    assert_int_equal(k.val_rows, v.nrows);
    assert_int_equal(pack_row_fill(&v, 0, &src, want_t, want_l, want_p), k.val_lengths[0]);
    assert_memory_equal(k.val_positions, want_p, sizeof(want_p));
    pack_release(&v);
    /* steps placed in their epochs, the last of each said */
    int64_t e, i;
    assert_true(batch_step_at(&b, batch_epoch_steps(&b, 0) - 1, &e, &i));
    assert_false(batch_step_at(&b, batch_epoch_steps(&b, 0), &e, &i));
    assert_int_equal(e, 1);
    assert_int_equal(i, 0);
    batch_packer_release(&k);
    batch_release(&b);
}

int main(void)
{
    log_set_level(LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_first_fit),
        cmocka_unit_test(test_pack_window_closes_oldest),
        cmocka_unit_test(test_pack_every_example_once),
        cmocka_unit_test(test_pack_row_fill),
        cmocka_unit_test(test_pack_bad_length),
        cmocka_unit_test(test_pack_epochs),
        cmocka_unit_test(test_pack_packer_rows),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
