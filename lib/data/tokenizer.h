/* tokenizer.h - one interface in front of every tokenizer a Llama-family checkpoint ships.
 *
 * tokenizer_load takes a file or a directory. A directory means its tokenizer.json when
 * present, else its tokenizer.model. A file is told apart by content: '{' starts a Hugging
 * Face tokenizer.json, a first line "<base64> <rank>" a tiktoken file (Meta's Llama 3
 * tokenizer.model), anything else must be a SentencePiece model. A file that is none of these
 * is one error line that says so (never SentencePiece's internal parse message).
 *
 * Encoding adds no BOS/EOS (the caller places them; bos_id is -1 when the tokenizer adds
 * none). Special tokens (SentencePiece user-defined symbols, tokenizer.json added tokens) are
 * produced only inside the byte range the caller allows: templates name them, records do not.
 *
 * Ownership: tokenizer_load returns a handle freed by tokenizer_free. Thread-safety: encoding
 * from several threads at once is safe. Errors: NULL or a negative MOAI_E* code with err set.
 *
 *     struct tokenizer *tk = tokenizer_load("models/tiny-llama", &err);
 *     tokenizer_encode(tk, text, len, NULL, 0, SIZE_MAX, ids, cap, &n, NULL, &err);
 *     tokenizer_free(tk);
 */
#ifndef MOAI_TOKENIZER_H
#define MOAI_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

struct tokenizer; /* opaque */

/* Resolves path (file or directory) to the tokenizer file it means, into buf. Returns 0, or
 * MOAI_EIO when a directory holds neither tokenizer.json nor tokenizer.model. */
int tokenizer_resolve(char *buf, size_t size, const char *path, struct moai_err *err);

/* Loads the tokenizer at path (file or directory). Returns NULL with err filled. */
struct tokenizer *tokenizer_load(const char *path, struct moai_err *err);
void tokenizer_free(struct tokenizer *tk);

/* Encodes len bytes of text; special tokens only inside the nspec ranges [spec[2k],
 * spec[2k + 1]) (spec NULL: everywhere; SentencePiece matches its symbols everywhere). *n receives
 * the full count, of which the first cap ids are written; *n_before (may be NULL) the number
 * of ids that start before byte offset boundary (SIZE_MAX: no boundary). Returns 0 or a
 * negative code with err filled. */
int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len, const size_t *spec,
                     size_t nspec, size_t boundary, int32_t *ids, size_t cap, size_t *n,
                     size_t *n_before, struct moai_err *err);

/* tokenizer_encode that writes where each of the first cap ids starts in text. */
int tokenizer_encode_starts(const struct tokenizer *tk, const char *text, size_t len,
                            const size_t *spec, size_t nspec, int32_t *ids, uint32_t *starts,
                            size_t cap, size_t *n, struct moai_err *err);

int32_t tokenizer_bos_id(const struct tokenizer *tk); /* -1 when none is added */
int32_t tokenizer_eos_id(const struct tokenizer *tk); /* -1 when none */
int32_t tokenizer_pad_id(const struct tokenizer *tk); /* the EOS when there is no pad */
int32_t tokenizer_vocab_size(const struct tokenizer *tk);
/* The id of a token ("<|eot_id|>", "[SUMMARIZE]"); -1 when it is not one. */
int32_t tokenizer_token_id(const struct tokenizer *tk, const char *token);
/* "sentencepiece", "tiktoken", "tokenizer.json BPE (byte-level)", ... */
const char *tokenizer_kind(const struct tokenizer *tk);
/* The file that was loaded (after resolving a directory). */
const char *tokenizer_path(const struct tokenizer *tk);

/* What a checkpoint keeps of the tokenizer at path: *file_name is the name its file takes
 * there ("tokenizer.json", or "tokenizer.model" for SentencePiece and tiktoken), *resolved the
 * file to copy (a new string), *config a new tokenizer_config.json object: the one beside a
 * tokenizer.json when present, with bos_token, eos_token, pad_token, add_bos_token,
 * add_eos_token (false: moai-finetune's EOS ends examples, not every encoding) and
 * tokenizer_class set from the tokenizer as loaded. Returns 0 or a negative code. */
struct json_t;
int tokenizer_checkpoint_files(const char *path, const char **file_name, char **resolved,
                               struct json_t **config, struct moai_err *err);

/* Loads the tokenizer at path and checks it against a model's vocabulary of vocab_size ids
 * (every id, BOS, EOS and pad below it). Returns 0, or MOAI_EUSAGE:
 *     tokenizer 'x/tokenizer.json' has 128256 ids, more than the model's vocabulary of 32000 */
int tokenizer_check_vocab(const char *path, int64_t vocab_size, struct moai_err *err);

#endif
