/* tokenize.h - records to fixed-length training sequences: tokens, labels, lengths.
 *
 * Each record's filled text becomes [BOS] + encode(text) + [EOS] (no BOS when the tokenizer
 * adds none, as Qwen2's), truncated to T tokens (the
 * EOS is lost only when the text itself is too long; such records are counted as truncated)
 * and padded to T with the pad id. Labels equal the tokens except -100 at padding and, when
 * the template has a response_start, at the prompt: the BOS and every token of the one
 * encoding of the whole text that starts before the end of response_start (SentencePiece's
 * byte offsets; a piece straddling that boundary is masked). The EOS is never masked.
 * lengths[i] is the number of real tokens (the attention mask's ones); the model finds
 * padding from it, never by comparing ids.
 *
 * Ownership: struct tokenized owns its arrays (release with tokenized_release).
 * Thread-safety: tokenize_texts runs nthreads worker threads over contiguous record ranges and
 * returns the same arrays for any thread count.
 *
 *     struct tokenized ds;
 *     if (tokenize_texts(&ds, &texts, tk, 1024, 2, &err) < 0) ...
 *     row i: ds.tokens + i * ds.T, ds.labels + i * ds.T, ds.lengths[i] real tokens
 */
#ifndef MOAI_TOKENIZE_H
#define MOAI_TOKENIZE_H

#include <stdint.h>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "err.h"

#define DATA_IGNORE_INDEX (-100)

struct tokenized {
    int64_t n;                      /* sequences */
    int64_t T;                      /* block size: tokens per sequence */
    int32_t *tokens;                /* (n, T) input ids, pad id after lengths[i] */
    int32_t *labels;                /* (n, T) tokens, or -100 at padding and the masked prompt */
    int64_t *lengths;               /* (n) real tokens, 1..T */
    int64_t *masked;                /* (n) leading tokens masked (response_start; 0 when none) */
    uint8_t *mask;                  /* (n, T) 1 where the label is masked: the prompt, the turns not
                        * learned (formats messages, alpaca); padding is found by lengths */
    int64_t truncated;              /* sequences cut to T (their EOS lost) */
    int32_t bos_id, eos_id, pad_id; /* bos_id -1: the tokenizer adds no BOS */
};

/* Tokenizes every text with nthreads threads (1 or more). Fails with MOAI_EUSAGE when
 * T < 2 or the tokenizer has no EOS. Returns 0 or a negative code. */
int tokenize_texts(struct tokenized *out, const struct dataset_texts *texts,
                   const struct tokenizer *tk, int64_t T, int nthreads, struct moai_err *err);

/* Rebuilds labels from tokens, lengths and mask (after loading a cache). */
void tokenized_fill_labels(struct tokenized *ds);

/* Logs examples, truncated examples (a warning above 5%), mean real tokens, padding. */
void tokenized_log_stats(const struct tokenized *ds);

/* The examples with no label counted in the loss (all masked or padding past position 0). */
int64_t tokenized_count_unscored(const struct tokenized *ds);

void tokenized_release(struct tokenized *ds);

#endif
