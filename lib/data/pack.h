/* pack.h - sequence packing: whole examples into rows of T tokens, and what a packed row holds.
 *
 * Rule (deterministic: a pure function of the order and the lengths, so a resumed run packs
 * the same rows). The examples are taken in the given order (an epoch's); each goes into the
 * first of the open rows that still has room for all of it (first fit), or else opens a new
 * row at the end. At most PACK_OPEN_ROWS rows are open at a time: opening one more closes the
 * oldest, and a row left with no room is closed at once. Rows are numbered in the order they
 * were opened, so row r's first example comes before row r+1's in the order, and a row's
 * examples are in the order they were placed. An example is never split: one longer than T
 * has been truncated to T by tokenization and fills a row of its own.
 *
 * A packed row (pack_row_fill): the examples' tokens back to back, then padding to T; labels
 * the examples' own labels except the first of each example, which is -100 (it would be the
 * label of the previous example's last token: no label crosses a boundary); positions restart
 * at 0 at each example's first token and count up within it (the model's rotary positions and
 * its block-diagonal causal mask are derived from them: llama.h, struct llama_batch); the
 * padding's positions count up from 0 again. Every example's loss in a packed row is then the
 * loss it has alone.
 *
 * Ownership: struct packing owns its arrays (pack_release). Thread-safety: after pack_rows
 * every function only reads it.
 *
 *     struct packing p;
 *     if (pack_rows(&p, order, n, lengths, 256, &err) < 0) ...
 *     for (int64_t r = 0; r < p.nrows; r++)
 *         real += pack_row_fill(&p, r, &src, tokens, labels, positions);
 */
#ifndef MOAI_PACK_H
#define MOAI_PACK_H

#include <stdint.h>

#include "err.h"

/* The most rows open for more examples at once (first fit looks through these). Measured on
 * the shipped dataset at block size 256 (mean 133.5 tokens): next fit (1 open row) fills
 * 75.7% of the tokens, 16 rows 90.0%, 64 rows 91.3%, 256 rows 91.9%. */
#define PACK_OPEN_ROWS 64

struct packing {
    int64_t nrows;
    int64_t nitems; /* the examples packed: n of pack_rows */
    int64_t *first; /* (nrows + 1): row r holds items[first[r] .. first[r + 1]) */
    int64_t *items; /* (nitems) example indices, row by row */
    int64_t tokens; /* real tokens of all rows */
};

/* The examples a packed row is filled from: n rows of T tokens, right-padded. */
struct pack_source {
    int64_t T;
    const int32_t *tokens;  /* (n, T) */
    const int32_t *labels;  /* (n, T), -100 where not scored */
    const int32_t *lengths; /* (n) real tokens, 1..T */
    int32_t pad_id;         /* the token that fills a packed row's tail */
};

/* Packs the n examples order[0..n) (indices into lengths; each length in [1, T]) by the rule
 * above. Returns 0, or MOAI_ENOMEM / MOAI_EUSAGE (a length outside [1, T]) with err filled;
 * p is then empty. */
int pack_rows(struct packing *p, const int64_t *order, int64_t n, const int32_t *lengths, int64_t T,
              struct moai_err *err);
void pack_release(struct packing *p);

/* The same into a packing that pack_rows made of at least n examples, with scratch of
 * 2 (n + 1) entries: allocates nothing (for a loop that must not fail). */
int pack_rows_reuse(struct packing *p, int64_t *scratch, const int64_t *order, int64_t n,
                    const int32_t *lengths, int64_t T, struct moai_err *err);

/* Fills row r of p from src into tokens, labels and positions (T entries each). Returns the
 * row's real tokens (its attention mask's ones: the examples' tokens). */
int64_t pack_row_fill(const struct packing *p, int64_t r, const struct pack_source *src,
                      int32_t *tokens, int32_t *labels, int32_t *positions);

/* The attention cost of p's rows against one example filling each: the mean over rows of
 * the sum of their examples' squared lengths, over T^2 (1 when p has no rows). The planner's
 * cost model scales a row's attention core by it (plan/cost.h). */
double pack_attention_fraction(const struct packing *p, const int32_t *lengths, int64_t T);

#endif
