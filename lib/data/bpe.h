/* bpe.h - BPE tokenizers: Hugging Face tokenizer.json (byte-level and SentencePiece-style)
 * and tiktoken rank files (Meta's Llama 3 tokenizer.model).
 *
 * A struct bpe holds a vocabulary of byte strings, a table of merges keyed by the ids of the
 * two parts (rank, merged id), the pre-tokenizer's regexes (PCRE2, UTF + UCP, JIT when the
 * library has it), the added tokens, and the BOS / EOS / pad ids. Encoding is:
 *
 *   1. added tokens: the text is cut at every occurrence of an added token (longest first);
 *      each becomes its id, whole (only inside the byte ranges the caller allows: special tokens come from templates, never from a record's text);
 *   2. normalization of each remaining segment: none (byte-level), or SentencePiece style:
 *      ' ' becomes U+2581 and U+2581 is prepended (normalizer Prepend + Replace, or the
 *      Metaspace pre-tokenizer);
 *   3. pre-tokenization: each Split regex cuts every piece into matches and the gaps between
 *      them ("Isolated"); Metaspace with split cuts before each U+2581;
 *   4. BPE of each piece: a piece that is a token is that token when merges are ignored
 *      (tiktoken, "ignore_merges"); otherwise it starts as one symbol per byte (byte-level)
 *      or per character (byte fallback to <0xXX> tokens, else unk), and the adjacent pair of
 *      lowest rank is merged, leftmost first, until no pair has a rank.
 *
 * tokenizer.json is read with jansson. The parts read, and every check made before a value is
 * trusted:
 *     model          {type: "BPE", vocab: {token: id}, merges: ["a b"] or [["a", "b"]],
 *                    byte_fallback, unk_token, fuse_unk, ignore_merges}; dropout,
 *                    continuing_subword_prefix and end_of_word_suffix must be null or "";
 *                    ids are unique and in [0, 2^24); both parts of a merge and their
 *                    concatenation are tokens
 *     normalizer     null, Prepend("\u2581"), Replace(" " -> "\u2581"), or a Sequence of them
 *     pre_tokenizer  null, Split({Regex}, "Isolated", invert false), ByteLevel
 *                    (add_prefix_space false), Digits, Metaspace("\u2581"), or a Sequence
 *                    of them
 *     added_tokens   [{id, content, single_word/lstrip/rstrip false, special}]
 *     post_processor null, TemplateProcessing (a special token before $A is the BOS, after it
 *                    the EOS), ByteLevel, or a Sequence of them
 * Anything else is an error naming the construct. tokenizer_config.json beside the file, when
 * present, sets bos_token, eos_token, pad_token (strings or {"content"}), add_bos_token and
 * add_eos_token.
 *
 * A tiktoken file is one "<base64 token> <rank>" a line; ranks are unique. Its pattern and
 * special tokens are Llama 3's: 256 special tokens from rank n (the number of lines), BOS
 * <|begin_of_text|>, EOS <|end_of_text|>.
 *
 * Ownership: bpe_load_* return a handle freed by bpe_free. Thread-safety: encoding from
 * several threads at once is safe (match data are per call). Errors: loaders return NULL and
 * fill err with one line naming the file and the key or line; bpe_encode returns a negative
 * code (invalid UTF-8, out of memory).
 *
 *     struct bpe *b = bpe_load_file("tokenizer.json", &err);
 *     bpe_encode(b, text, len, NULL, 0, SIZE_MAX, ids, cap, &n, &before, &err);
 *     bpe_free(b);
 */
#ifndef MOAI_BPE_H
#define MOAI_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct bpe; /* opaque */

/* Loads a tokenizer.json, or a tiktoken file (told apart by the first byte: '{' is JSON).
 * tokenizer_config.json beside it is read when present. Returns NULL with err filled. */
struct bpe *bpe_load_file(const char *path, struct moai_err *err);

/* The same over memory: json is the tokenizer.json text, config the tokenizer_config.json
 * text (NULL when none); name is used in messages. Entry points of the fuzzers. */
struct bpe *bpe_load_json_mem(const char *name, const char *json, size_t size, const char *config,
                              size_t config_size, struct moai_err *err);
struct bpe *bpe_load_tiktoken_mem(const char *name, const char *data, size_t size,
                                  struct moai_err *err);
void bpe_free(struct bpe *b);

/* True when data looks like a tiktoken file: its first line is base64, a space, digits. */
int bpe_is_tiktoken(const char *data, size_t size);

/* Encodes len bytes of UTF-8 text. Added tokens are matched only inside the nspec byte
 * ranges [spec[2k], spec[2k + 1]) (ascending; spec NULL: everywhere). *n receives the full count of ids, of which
 * the first cap are written; *n_before the number that start before byte offset boundary
 * (SIZE_MAX: all). Returns 0, or MOAI_EIO with err filled ("invalid UTF-8 at byte 17"). */
int bpe_encode(const struct bpe *b, const char *text, size_t len, const size_t *spec, size_t nspec,
               size_t boundary, int32_t *ids, size_t cap, size_t *n, size_t *n_before,
               struct moai_err *err);

/* bpe_encode that also writes where each of the first cap ids starts in text (starts[i]). */
int bpe_encode_starts(const struct bpe *b, const char *text, size_t len, const size_t *spec,
                      size_t nspec, size_t boundary, int32_t *ids, uint32_t *starts, size_t cap,
                      size_t *n, size_t *n_before, struct moai_err *err);

int32_t bpe_bos_id(const struct bpe *b);     /* -1 when none is added */
int32_t bpe_eos_id(const struct bpe *b);     /* -1 when none */
int32_t bpe_pad_id(const struct bpe *b);     /* the pad token, else the EOS */
int32_t bpe_vocab_size(const struct bpe *b); /* the largest id + 1 */
/* The id of a token (added tokens first, then the vocabulary, as raw bytes); -1 when none. */
int32_t bpe_token_id(const struct bpe *b, const char *token);
/* The raw bytes of token id (length in *len), NULL when id is not a token. */
const char *bpe_token_bytes(const struct bpe *b, int32_t id, size_t *len);
/* "tokenizer.json BPE (byte-level)", "tokenizer.json BPE (SentencePiece-style)", "tiktoken" */
const char *bpe_kind(const struct bpe *b);

#endif
