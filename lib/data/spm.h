/* spm.h - the SentencePiece shim: a C interface over sentencepiece::SentencePieceProcessor.
 *
 * The one C++ file of the project (spm.cc) wraps the processor so that every other module
 * stays C. A handle is created by spm_load and freed by spm_free; it owns the loaded model.
 * Encoding adds no BOS/EOS (the caller places them). Ids are int32_t.
 *
 * Errors: spm_load returns NULL and fills err ("cannot load tokenizer 'x': <status>");
 * spm_encode/spm_decode return 0 or a negative MOAI_E* code and fill err.
 * Thread-safety: a loaded handle may be used for encoding and decoding from several threads
 * at once (the processor's Encode is const); spm_free only when no thread uses it.
 *
 *     struct spm *sp = spm_load("models/tiny-llama/tokenizer.model", &err);
 *     int32_t *ids; size_t n; spm_encode(sp, text, strlen(text), &ids, &n, &err);
 *     free(ids); spm_free(sp);
 */
#ifndef MOAI_SPM_H
#define MOAI_SPM_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#ifdef __cplusplus
extern "C" {
#endif

struct spm; /* opaque */

/* Loads a SentencePiece model file. Returns NULL and fills err when it cannot be read or
 * parsed. */
struct spm *spm_load(const char *path, struct moai_err *err);
void spm_free(struct spm *sp);

/* Encodes len bytes of text (need not be NUL-terminated) into a new malloc'd array *ids of
 * *n ids; the caller frees it. Returns 0, or MOAI_EIO / MOAI_ENOMEM with err filled. */
int spm_encode(const struct spm *sp, const char *text, size_t len, int32_t **ids, size_t *n,
               struct moai_err *err);

/* Encodes into a caller buffer of cap ids; *n receives the full count even when it exceeds
 * cap (then only the first cap ids are written). Returns 0 or a negative code. */
int spm_encode_into(const struct spm *sp, const char *text, size_t len, int32_t *ids, size_t cap,
                    size_t *n, struct moai_err *err);

/* Like spm_encode_into, and *n_before receives the number of leading pieces that start
 * before byte offset boundary of text (a piece straddling the boundary counts). Offsets come
 * from a per-piece table of surface lengths, checked against len, with spm_encode_offsets as
 * the fallback, so the result always equals SentencePiece's own offsets. */
int spm_encode_split(const struct spm *sp, const char *text, size_t len, size_t boundary,
                     int32_t *ids, size_t cap, size_t *n, size_t *n_before, struct moai_err *err);

/* Encodes with SentencePiece's own byte offsets: begins[i] is where piece i starts in text.
 * The exact but slower path behind spm_encode_split; exposed for tests. */
int spm_encode_offsets(const struct spm *sp, const char *text, size_t len, int32_t *ids,
                       uint32_t *begins, size_t cap, size_t *n, struct moai_err *err);

/* Decodes n ids into a new malloc'd NUL-terminated string *text; the caller frees it.
 * Ids outside [0, vocab) are an error. Returns 0 or a negative code. */
int spm_decode(const struct spm *sp, const int32_t *ids, size_t n, char **text,
               struct moai_err *err);

int32_t spm_bos_id(const struct spm *sp);
int32_t spm_eos_id(const struct spm *sp);
int32_t spm_pad_id(const struct spm *sp); /* -1 when the model has none */
int32_t spm_unk_id(const struct spm *sp);
int32_t spm_vocab_size(const struct spm *sp);
/* The piece of id (NUL-terminated, owned by the model), NULL when id is out of range. */
const char *spm_piece(const struct spm *sp, int32_t id);
/* The id of a piece (e.g. "[SUMMARIZE]"), or the unk id when the piece is unknown. */
int32_t spm_piece_id(const struct spm *sp, const char *piece);

#ifdef __cplusplus
}
#endif

#endif
