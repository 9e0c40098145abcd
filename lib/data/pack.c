/* pack.c - first-fit packing of examples into rows over a window of open rows (see pack.h). */
#include "data/pack.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define IGNORE_LABEL (-100)

/* Packs into p's arrays (room for n items and n + 1 rows) with scratch row_of and room (n
 * each); allocates nothing. The lengths are checked by the caller. */
static void pack_into(struct packing *p, const int64_t *order, int64_t n, const int32_t *lengths,
                      int64_t T, int64_t *row_of, int64_t *room)
{
    /* open[0..nopen): the open rows, oldest first */
    int64_t open[PACK_OPEN_ROWS], nopen = 0, nrows = 0;
    p->tokens = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t len = lengths[order[i]], k = 0;
        while (k < nopen && room[open[k]] < len)
            k++;
        if (k == nopen) { /* a new row, the oldest closed when the window is full */
            if (nopen == PACK_OPEN_ROWS) {
                memmove(open, open + 1, sizeof(int64_t) * (size_t) (nopen - 1));
                k = --nopen;
            }
            room[nrows] = T;
            open[nopen++] = nrows++;
        }
        int64_t r = open[k];
        row_of[i] = r;
        room[r] -= len;
        p->tokens += len;
        if (room[r] == 0) { /* full: closed at once */
            memmove(open + k, open + k + 1, sizeof(int64_t) * (size_t) (nopen - k - 1));
            nopen--;
        }
    }
    /* items grouped by row, each row's in the order placed (a counting sort by row) */
    memset(p->first, 0, sizeof(int64_t) * (size_t) (nrows + 1));
    for (int64_t i = 0; i < n; i++)
        p->first[row_of[i] + 1]++;
    for (int64_t r = 0; r < nrows; r++)
        p->first[r + 1] += p->first[r];
    for (int64_t i = 0; i < n; i++)
        p->items[p->first[row_of[i]]++] = order[i];
    for (int64_t r = nrows; r > 0; r--) /* back from row ends to row starts */
        p->first[r] = p->first[r - 1];
    p->first[0] = 0;
    p->nrows = nrows;
    p->nitems = n;
}

static int check_lengths(const int64_t *order, int64_t n, const int32_t *lengths, int64_t T,
                         struct moai_err *err)
{
    for (int64_t i = 0; i < n; i++)
        if (lengths[order[i]] < 1 || lengths[order[i]] > T)
            return moai_err_set(err, MOAI_EUSAGE,
                                "packing: example %" PRId64 " has %d tokens, outside [1, %" PRId64
                                "]",
                                order[i], lengths[order[i]], T);
    return 0;
}

int pack_rows(struct packing *p, const int64_t *order, int64_t n, const int32_t *lengths, int64_t T,
              struct moai_err *err)
{
    memset(p, 0, sizeof(*p));
    int rc = check_lengths(order, n, lengths, T, err);
    if (rc < 0)
        return rc;
    int64_t *row_of = malloc(sizeof(int64_t) * (size_t) (n + 1));
    int64_t *room = malloc(sizeof(int64_t) * (size_t) (n + 1));
    p->first = calloc((size_t) (n + 2), sizeof(int64_t));
    p->items = malloc(sizeof(int64_t) * (size_t) (n + 1));
    if (!row_of || !room || !p->first || !p->items) {
        free(row_of);
        free(room);
        pack_release(p);
        return moai_err_set(err, MOAI_ENOMEM, "packing: out of memory");
    }
    pack_into(p, order, n, lengths, T, row_of, room);
    free(row_of);
    free(room);
    return 0;
}

int pack_rows_reuse(struct packing *p, int64_t *scratch, const int64_t *order, int64_t n,
                    const int32_t *lengths, int64_t T, struct moai_err *err)
{
    int rc = check_lengths(order, n, lengths, T, err);
    if (rc < 0)
        return rc;
    pack_into(p, order, n, lengths, T, scratch, scratch + n + 1);
    return 0;
}

void pack_release(struct packing *p)
{
    free(p->first);
    free(p->items);
    memset(p, 0, sizeof(*p));
}

int64_t pack_row_fill(const struct packing *p, int64_t r, const struct pack_source *src,
                      int32_t *tokens, int32_t *labels, int32_t *positions)
{
    int64_t T = src->T, t = 0;
    MOAI_ASSERT(r >= 0 && r < p->nrows);
    for (int64_t k = p->first[r]; k < p->first[r + 1]; k++) {
        int64_t e = p->items[k], len = src->lengths[e];
        MOAI_ASSERT(t + len <= T);
        memcpy(tokens + t, src->tokens + e * T, sizeof(int32_t) * (size_t) len);
        memcpy(labels + t, src->labels + e * T, sizeof(int32_t) * (size_t) len);
        labels[t] = IGNORE_LABEL;
        for (int64_t i = 0; i < len; i++)
            positions[t + i] = (int32_t) i;
        t += len;
    }
    int64_t real = t;
    for (; t < T; t++) {
        tokens[t] = src->pad_id;
        labels[t] = IGNORE_LABEL;
        positions[t] = (int32_t) (t - real);
    }
    return real;
}

double pack_attention_fraction(const struct packing *p, const int32_t *lengths, int64_t T)
{
    double squares = 0.0;
    if (p->nrows == 0)
        return 1.0;
    for (int64_t k = 0; k < p->nitems; k++)
        squares += (double) lengths[p->items[k]] * (double) lengths[p->items[k]];
    return squares / ((double) p->nrows * (double) T * (double) T);
}
