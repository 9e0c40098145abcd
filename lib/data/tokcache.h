/* tokcache.h - the token cache: tokenized datasets stored zstd-compressed, keyed by a hash.
 *
 * tokcache_prepare is the trainer's one call: it hashes everything the arrays depend on (the
 * dataset file's bytes, the tokenizer file's bytes, the template, response_start, the block
 * size, the record limit and TOKCACHE_VERSION) into a 64-bit key, and loads
 * <cache_dir>/<key as 16 hex digits>.tok.zst when it is there and whole; otherwise it
 * tokenizes the dataset and stores the file. A cache file that fails any check is rebuilt
 * after one warning, never trusted.
 *
 * File layout (integers little-endian, as written by the host; the byte-order mark rejects a
 * file from a machine of the other order):
 *     0   8  magic "MOAITOK\0"
 *     8   4  format version (TOKCACHE_VERSION)
 *     12  4  byte-order mark 0x01020304
 *     16  8  key (the hash that names the file)
 *     24  8  n: sequences
 *     32  8  T: block size
 *     40  8  truncated sequences
 *     48  8  payload bytes (uncompressed)
 *     56  8  payload checksum (tokcache_hash of the uncompressed payload)
 *     64  8  header checksum (tokcache_hash of bytes 0..63)
 *     72  ..  one zstd frame of the payload: tokens (n*T int32), lengths (n int64),
 *             masked (n int64), mask (n*T bytes, 0 or 1); labels are rebuilt from these
 *             (tokenized_fill_labels)
 * Writes go to a temporary file in cache_dir, synced and renamed over the target
 * (atomicfile.h), so a reader never sees a partial file.
 *
 * Thread-safety: none shared. Errors: 0 or a negative code with err filled; a cache that
 * cannot be written is only a warning.
 *
 *     struct tokenized ds;
 *     if (tokcache_prepare(&ds, "data.jsonl.zst", "tokenizer.model", tmpl, NULL, 1024, -1,
 *                      cache_dir, &err) < 0) ...
 *     tokenized_release(&ds);
 */
#ifndef MOAI_TOKCACHE_H
#define MOAI_TOKCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "data/tokenize.h"
#include "err.h"

#define TOKCACHE_VERSION   2u
#define TOKCACHE_HASH_INIT 0xcbf29ce484222325ull /* FNV-1a 64 offset basis */

/* Adds size bytes to a running 64-bit hash h (FNV-1a over 8-byte little-endian words, then
 * the tail bytes, with a final mix in tokcache_hash_final) and returns it. */
uint64_t tokcache_hash(uint64_t h, const void *data, size_t size);
uint64_t tokcache_hash_final(uint64_t h);

/* The cache key of a dataset preparation (hashes both files' bytes). Returns 0 or a negative
 * code (a file that cannot be read). response_start may be NULL; limit -1 means all. */
int tokcache_key(uint64_t *key, const char *dataset_path, const char *tokenizer_path,
                 const char *tmpl, const char *response_start, int64_t T, int64_t limit,
                 struct moai_err *err);

/* The cache file's path for key: "<dir>/<16 hex digits>.tok.zst". */
void tokcache_path(char *buf, size_t size, const char *cache_dir, uint64_t key);

/* Loads a cache file. Returns 0, or MOAI_EIO with a reason in err when the file is missing,
 * truncated or fails any check (the caller rebuilds). */
int tokcache_load(struct tokenized *out, const char *path, uint64_t key, struct moai_err *err);

/* Stores ds under path atomically, creating the directory (and its parents). */
int tokcache_store(const struct tokenized *ds, const char *path, uint64_t key,
                   struct moai_err *err);

/* How records become text, beyond the template (recipe keys dataset.format,
 * dataset.chat_template, dataset.train_on). */
struct data_recipe {
    const char *format;        /* "text" (NULL too), "messages", "alpaca" */
    const char *chat_template; /* llama3, llama2, mistral, chatml; NULL: from the tokenizer */
    bool train_all;            /* loss on every token, not only the answers */
};

/* tokcache_key that also hashes dr (may be NULL) and a tokenizer_config.json beside the
 * tokenizer. */
int tokcache_key_format(uint64_t *key, const char *dataset_path, const char *tokenizer_path,
                        const char *tmpl, const char *response_start, const struct data_recipe *dr,
                        int64_t T, int64_t limit, struct moai_err *err);

/* tokcache_prepare for any dataset format; dr NULL is format text. The chat template, when not
 * named, follows the tokenizer's special tokens (llama3, chatml, mistral), and an error says
 * so when none fits. */
int tokcache_prepare_format(struct tokenized *out, const char *dataset_path,
                            const char *tokenizer_path, const char *tmpl,
                            const char *response_start, const struct data_recipe *dr, int64_t T,
                            int64_t limit, const char *cache_dir, struct moai_err *err);

/* Loads from the cache or tokenizes (2 threads) and stores. cache_dir NULL: no cache. */
int tokcache_prepare(struct tokenized *out, const char *dataset_path, const char *tokenizer_path,
                     const char *tmpl, const char *response_start, int64_t T, int64_t limit,
                     const char *cache_dir, struct moai_err *err);

#endif
