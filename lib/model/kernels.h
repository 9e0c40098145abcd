/* kernels.h - the Llama layers as fp32 forward/backward kernel pairs, following Hugging Face.
 *
 * Each layer is a pair <op>_forward / <op>_backward with outputs first and sizes last, and a
 * shape comment. N is a number of token rows (B sequences x T positions), D the hidden size,
 * F the MLP width, V the vocabulary, H query heads, KV key/value heads (H % KV == 0), hd the
 * head size. Weight matrices are in Hugging Face's (out, in) row-major layout. Backward
 * kernels ACCUMULATE (+=) into weight gradients; what they do to input gradients is stated
 * per kernel. The kernels are serial and reentrant: the model (llama.c) runs them on row
 * ranges, sequences or head ranges in parallel, so every kernel works on any such slice.
 * Matrix products are the model's own (llama.c cuts them over its thread pool and calls
 * cblas_sgemm), not kernels of this file.
 *
 * Exponentials use kern_expf: a Cephes-style polynomial with relative error below 3e-7 on
 * [-87.3, 88], clamped outside (exp(-inf..-87.3) ~ 1e-38, exp(88..inf) = exp(88)), written so
 * that the compiler vectorizes it; on x86-64 the hot kernels are built for AVX-512, AVX2 and
 * baseline and picked at load time.
 *
 *     rmsnorm_forward(ln, rstd, x, w, 1e-5f, N, D);
 *     swiglu_forward(h, gu, N, F);
 *     rmsnorm_backward(dx, dw, dln, x, w, rstd, N, D);
 */
#ifndef MOAI_MODEL_KERNELS_H
#define MOAI_MODEL_KERNELS_H

#include "model/config.h"

#include <stdbool.h>
#include <stdint.h>

/* Rows of a causal attention block: the causal mask is applied by skipping whole blocks
 * above the diagonal, so this is also the granularity of the skipped work. */
#define KERN_ATT_BLOCK 64

/* exp(x) to ~2 ulp, branch-free (see the header comment). */
float kern_expf(float x);

/* tokens (N) -> out (N, D) = rows of emb (V, D). Ids must be in [0, V). */
void embedding_forward(float *out, const int32_t *tokens, const float *emb, int64_t N, int64_t D);
/* demb (V, D) += dout (N, D) scattered by tokens; tokens equal to pad_id get no gradient
 * (torch.nn.Embedding's padding_idx; -1 for none). */
void embedding_backward(float *demb, const float *dout, const int32_t *tokens, int64_t pad_id,
                        int64_t N, int64_t D);

/* inp (N, D) -> out (N, D) = weight * (inp * rstd); rstd (N) = 1/sqrt(mean(inp^2) + eps)
 * saved for backward. out may not alias inp. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, float eps,
                     int64_t N, int64_t D);
/* dout (N, D) -> dinp (N, D) += gradient, dweight (D) += gradient. */
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                      const float *weight, const float *rstd, int64_t N, int64_t D);

/* Inverse frequencies (hd/2) of rotary embeddings with base theta, including Llama 3's
 * rope_scaling (transformers' _compute_llama3_parameters), in fp32 as Hugging Face does. */
void rope_inv_freq(float *inv_freq, int64_t hd, double theta, const struct rope_scaling *scaling);
/* cos, sin (T, hd/2) for positions 0..T-1: angle = float(t) * inv_freq (fp32, as HF). */
void rope_tables(float *cos, float *sin, const float *inv_freq, int64_t T, int64_t hd);
/* Rotates, in place, nh heads of T rows, row t at x + t*ld (heads contiguous, hd each), by
 * the angles of cos/sin row t, in the rotate_half convention: x = x*cos + rotate_half(x)*sin. */
void rope_forward(float *x, const float *cos, const float *sin, int64_t T, int64_t nh, int64_t hd,
                  int64_t ld);
/* dx (same layout) -> dx: the inverse rotation, in place (RoPE is orthogonal). */
void rope_backward(float *dx, const float *cos, const float *sin, int64_t T, int64_t nh, int64_t hd,
                   int64_t ld);
/* The same two with row t rotated by the angles of position pos[t] (T entries, each below the
 * tables' rows; NULL: t), as a packed example's tokens are, counting from its own start. */
void rope_forward_at(float *x, const float *cos, const float *sin, const int32_t *pos, int64_t T,
                     int64_t nh, int64_t hd, int64_t ld);
void rope_backward_at(float *dx, const float *cos, const float *sin, const int32_t *pos, int64_t T,
                      int64_t nh, int64_t hd, int64_t ld);

/* One sequence of grouped-query causal attention for the key/value heads [kv0, kv1) and
 * their query heads. qkv (T, (H + 2 KV) hd): per row the H query heads, then KV key heads,
 * then KV value heads, q and k already rotated. Query t attends keys j <= t with j < len
 * (len = real tokens, right padding; a query past len attends the real tokens; len < 1 counts
 * as 1). Scores are scaled by 1/sqrt(hd).
 * -> out (T, H hd) for those heads; probs (H, T, T) softmax rows kept for backward (entries
 * past a row's last key inside its causal block are zero, the rest are never read). */
void attention_forward(float *out, float *probs, const float *qkv, int64_t len, int64_t T,
                       int64_t H, int64_t KV, int64_t hd, int64_t kv0, int64_t kv1);
/* dout (T, H hd) -> dqkv (T, (H + 2 KV) hd): overwrites the query columns of those query heads
 * and the key and value columns of kv heads [kv0, kv1). scratch (T, T) floats. */
void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *probs, int64_t len, int64_t T, int64_t H, int64_t KV,
                        int64_t hd, int64_t kv0, int64_t kv1);

/* The same for a packed row (several examples back to back, then padding): pos (T) each
 * token's position in its example, 0 where an example starts (positions count up by 1 within
 * one). Attention is block-diagonal and causal: query t < len attends keys t - pos[t] .. t,
 * the earlier tokens of its own example only; queries past len (padding) attend nothing, their
 * output rows are zero. Each example runs as its own causal attention in KERN_ATT_BLOCK row
 * blocks, so the masked blocks between examples cost nothing: a row of examples of n_1 .. n_k
 * tokens costs about sum n_i^2 / 2 query-key products per head, not T^2 / 2. probs (H, T, T):
 * example rows [s, s + n) use the diagonal block [s, s + n) x [s, s + n) (entries past a row's
 * last key inside its causal block are zero, the rest are never read). */
void attention_forward_packed(float *out, float *probs, const float *qkv, const int32_t *pos,
                              int64_t len, int64_t T, int64_t H, int64_t KV, int64_t hd,
                              int64_t kv0, int64_t kv1);
/* dout (T, H hd) -> dqkv as attention_backward (the padding's rows zero). */
void attention_backward_packed(float *dqkv, float *scratch, const float *dout, const float *qkv,
                               const float *probs, const int32_t *pos, int64_t len, int64_t T,
                               int64_t H, int64_t KV, int64_t hd, int64_t kv0, int64_t kv1);

/* gu (N, 2F) = [gate | up] per row -> h (N, F) = silu(gate) * up. */
void swiglu_forward(float *h, const float *gu, int64_t N, int64_t F);
/* dh (N, F) -> dgu (N, 2F), overwritten. */
void swiglu_backward(float *dgu, const float *dh, const float *gu, int64_t N, int64_t F);

/* Label value that takes no part in the loss (PyTorch's ignore_index). */
#define KERN_IGNORE_INDEX (-100)

/* logits (N, V), targets (N) -> losses (N) = logsumexp - logit[target] (0 where the target is
 * KERN_IGNORE_INDEX), lse (N) saved for backward. */
void crossentropy_forward(float *losses, float *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V);
/* Both at once for training: losses (N) as crossentropy_forward, and logits (N, V) replaced
 * in place by dloss * (softmax - onehot) (0 on ignored rows), dloss being the gradient of the
 * total loss w.r.t. each row's loss (1/count for a mean). One exponential per element. */
void crossentropy_fused(float *losses, float *logits, const int32_t *targets, float dloss,
                        int64_t N, int64_t V);

/* Vocabulary-parallel cross-entropy on the shard of vocabulary rows [v0, v0 + V) (logits
 * (N, V) of that shard): lse (N) the shard's log-sum-exp per row, tlogit (N) the target's
 * logit where the shard holds it, else 0. Joining the shards' lse gives the whole one. */
void crossentropy_shard_lse(float *lse, float *tlogit, const float *logits, const int32_t *targets,
                            int64_t v0, int64_t N, int64_t V);
/* logits (N, V) replaced by dloss * (softmax - onehot) given the whole log-sum-exp lse (N);
 * rows whose target is KERN_IGNORE_INDEX are never passed (only scored rows reach lm_head). */
void crossentropy_shard_backward(float *logits, const float *lse, const int32_t *targets,
                                 int64_t v0, float dloss, int64_t N, int64_t V);

#endif
