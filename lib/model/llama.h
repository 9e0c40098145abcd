/* llama.h - the Hugging Face Llama causal LM in fp32: parameters, activations, forward, backward.
 *
 * The model follows transformers' modeling_llama: token embedding; per layer RMSNorm,
 * grouped-query causal self-attention with rotary embeddings (rotate_half convention, Llama 3
 * rope_scaling), a residual, RMSNorm, a SwiGLU MLP down(silu(gate(x)) * up(x)), a residual;
 * a final RMSNorm; lm_head (tied to the embedding or not); cross-entropy over shifted labels
 * (position t predicts label t+1), -100 ignored, the mean taken by the caller's dloss.
 * Padding is on the right and given by each sequence's length (its attention mask's ones): a
 * real token never sees padding, so padding changes no real token's output, and a padded
 * query attends the real tokens, as Hugging Face's mask makes it. As torch.nn.Embedding with
 * padding_idx = pad_token_id, the pad token's embedding row gets no gradient.
 *
 * Memory. Four kinds of buffer, each ONE arena whose size a function below gives exactly, so
 * the planner's memory model and the run agree byte for byte:
 *   - parameters, struct llama_params: every tensor in Hugging Face order without gaps
 *     (llama_param_bytes); gradients and AdamW moments are the same struct over arenas of
 *     their own, so an optimizer sees one flat array of model_param_count floats;
 *   - activations kept for backward for one micro-batch of B sequences x T tokens,
 *     struct llama_acts (llama_act_bytes);
 *   - workspace of a micro-batch: logits (B T V floats), gradient buffers, rotary tables,
 *     per-thread attention scratch, struct llama_work (llama_work_bytes).
 * Only small tables of pointers (the per-layer structs) are allocated besides. A step
 * allocates nothing. Ownership: an _init or _bind function given an arena points into it and
 * its _release leaves it to the caller; given NULL it allocates one that _release frees.
 *
 * Stages. Forward and backward come per stage, so an executor can run a contiguous layer range
 * on one device: llama_embed_forward, llama_layer_forward (one layer), llama_head_forward
 * (final norm, lm_head, loss), and their backwards in reverse. The gradient of the residual
 * stream travels between stages in work->dres (N, D). llama_forward_backward chains them.
 *
 * Threads. struct llama owns a pool of nthreads threads (the caller is one) that splits
 * matrix products and the other kernels. llama_init sets OpenBLAS to one thread per call
 * (openblas_set_num_threads(1)): all parallelism is the pool's, so no BLAS thread spins against
 * it. Row-wise kernels, attention and every reduction are cut into tasks by problem size only
 * and reduced in a fixed order; a matrix product is cut into one block of rows or columns per
 * thread, each a single sgemm over the whole K. So a run is bit-for-bit reproducible for a
 * given nthreads, and other thread counts agree to rounding only: OpenBLAS kernels (which
 * differ by cpu: Haswell, Zen, SkylakeX...) may sum a block of rows in another order than the
 * whole, so results differ in the last bits (a relative 2e-6 on the Haswell kernels). Under
 * bf16 compute (llama_set_bf16) a block is a bf16_gemm, whose sums do not depend on the split.
 * One thread at a time may use a struct llama.
 *
 * Errors: llama_init, the _init functions and llama_batch_check return 0 or a negative MOAI_E*
 * and fill err. Forward and backward trust a checked batch.
 *
 *     llama_init(&m, &cfg, 2, &err); llama_params_init(&p, &cfg, NULL, &err); ...
 *     llama_params_zero(&m, &g);
 *     double loss_sum = llama_forward_backward(&m, &p, &g, &acts, &work, &batch,
 *                                              1.0f / (float) llama_batch_targets(&batch));
 */
#ifndef MOAI_MODEL_LLAMA_H
#define MOAI_MODEL_LLAMA_H

#include "err.h"
#include "model/config.h"
#include "model/pool.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct lora;       /* model/lora.h */
struct lora_layer; /* model/lora.h */

/* One transformer layer's tensors, (out, in) row-major, one field per line of the table in
 * model/layout.h (Hugging Face order: input_norm (D), wq (H hd, D), wk and wv (KV hd, D),
 * wo (D, H hd), post_norm (D), w_gate and w_up (F, D), w_down (D, F)). Bound by
 * llama_layer_bind: wq/wk/wv are adjacent (one ((H + 2 KV) hd, D) matrix) and so are
 * w_gate/w_up (one (2F, D) matrix); the model multiplies them as such. */
struct llama_layer {
#define LLAMA_LAYER_FIELD(field, name, kind, rows, cols) float *field;
    MODEL_LAYER_TENSORS(LLAMA_LAYER_FIELD)
#undef LLAMA_LAYER_FIELD
    struct lora_layer *lora; /* the layer's LoRA adapters (or their gradients), NULL: none */
};

/* Points l's tensors into base, one after the other in the table's order, at cfg's sizes
 * (a whole layer, or a tensor-parallel shard's with a shard config); model_layer_param_count
 * floats. Leaves l->lora as it is. */
void llama_layer_bind(struct llama_layer *l, float *base, const struct model_config *cfg);

/* Parameters (or their gradients, or an AdamW moment): pointers into one arena. */
struct llama_params {
    float *embed;               /* (V, D) model.embed_tokens.weight */
    struct llama_layer *layers; /* (L) */
    float *norm;                /* (D) model.norm.weight */
    float *lm_head;             /* (V, D) lm_head.weight; equals embed when tied */
    float *arena;               /* every tensor above in this order, no gaps */
    int64_t nfloats;            /* llama_param_floats(cfg) = model_param_count(cfg) */
    int64_t nlayers;            /* L */
    bool owned;                 /* arena allocated (and freed) here */
};

/* Activations of one layer kept for backward; N = B T. */
struct llama_layer_acts {
    float *x;     /* (N, D) layer input, the residual stream */
    float *rstd1; /* (N) */
    float *ln1;   /* (N, D) input_layernorm output */
    float *qkv;   /* (N, (H + 2 KV) hd) q, k (rotated), v */
    float *probs; /* (B, H, T, T) attention probabilities */
    float *atty;  /* (N, H hd) attention output, o_proj input */
    float *x2;    /* (N, D) residual stream after attention */
    float *rstd2; /* (N) */
    float *ln2;   /* (N, D) post_attention_layernorm output */
    float *gu;    /* (N, 2F) gate | up projections */
    float *h;     /* (N, F) silu(gate) * up, down_proj input */
};

struct llama_acts {
    int64_t B, T, nlayers;
    struct llama_layer_acts *layers; /* (L); layer l's output is layers[l + 1].x, or xf */
    float *xf;                       /* (N, D) output of the last layer */
    float *rstdf;                    /* (N) */
    float *lnf;                      /* (N, D) final norm output, lm_head input */
    void *arena;
    size_t bytes; /* llama_act_bytes */
    bool owned;   /* arena allocated (and freed) here */
};

struct llama_work {
    int64_t B, T;
    int nthreads;
    float *rope_inv_freq;    /* (hd/2) */
    float *rope_cos;         /* (T, hd/2) */
    float *rope_sin;         /* (T, hd/2) */
    int32_t *targets;        /* (N) labels shifted by one position */
    int32_t *scored;         /* (N) rows whose target counts, in order; nscored of them */
    int32_t *scored_targets; /* (N) their targets */
    int32_t *scored_index;   /* (N) a row's place in scored, or -1 */
    int64_t nscored;
    float *losses; /* (N) loss of each scored row */
    float *lse;    /* (N) log-sum-exp of each scored row's logits (evaluation) */
    float *logits; /* (N, V) logits of the scored rows; after a training forward,
                                   their gradient (in bf16 over each row's first half when
                                   dlogits16: bf16 products round it so anyway) */
    bool dlogits16;
    float *lnc;        /* (N, D) lm_head input of the scored rows, then its gradient */
    float *dres;       /* (N, D) gradient of the residual stream between stages */
    float *dln;        /* (N, D) */
    float *dqkv;       /* (N, (H + 2 KV) hd) */
    float *datty;      /* (N, H hd) */
    float *dgu;        /* (N, 2F) */
    float *dh;         /* (N, F) */
    float *scratch;    /* (nthreads, T, T) attention backward */
    float *dnorm_part; /* (ceil(N / 64), D) per-chunk RMSNorm weight gradients */
    float *lse_all;    /* (tp, N) every shard's log-sum-exp (vocabulary-parallel head) */
    float *re_probs;   /* (B, H, T, T) selective recomputation: one layer's probabilities */
    struct llama_layer_acts re; /* full recomputation: one layer's activations (x borrowed) */
    float *re_out;              /* (N, D) full recomputation: that layer's output */
    void *arena;
    size_t bytes; /* llama_work_bytes */
    bool owned;   /* arena allocated (and freed) here */
};

/* A micro-batch of B right-padded sequences of T tokens.
 *
 * Packed rows (positions set; data/pack.h makes them): a sequence holds several examples back
 * to back, then padding. positions[b][t] is the token's position in its example: 0 at an
 * example's first token, one more than the previous token's within it. Then, as if each
 * example ran alone: rotary embeddings use these positions; attention is block-diagonal causal
 * (a token attends only the earlier tokens of its own example); the last token of an example
 * scores nothing (its next label is another example's); the padding past lengths[b] attends
 * nothing (its positions need only lie in [0, T)). So a packed example's loss and gradients
 * are those it has unpacked, to rounding. */
struct llama_batch {
    int64_t B, T;
    const int32_t *tokens;    /* (B, T) input ids in [0, V) */
    const int32_t *labels;    /* (B, T) ids or -100; position t is scored against labels[t+1] */
    const int32_t *lengths;   /* (B) real tokens per sequence (the attention mask's ones);
                                     NULL: all T */
    const int32_t *positions; /* (B, T) packed rows: each token's position in its example;
                                 NULL: one sequence per row, positions 0..T-1 */
};

/* Which activations a layer keeps for backward (the plan's recomputation): all of them; all
 * but the attention probabilities, recomputed from q and k in backward (selective); only the
 * layer's input, the whole layer run again in backward (full). Recomputation needs one
 * layer's worth of scratch in the workspace. */
enum llama_keep {
    LLAMA_KEEP_ALL,
    LLAMA_KEEP_NO_PROBS,
    LLAMA_KEEP_INPUT,
};

/* What one device runs: a micro-batch of B x T tokens through nlayers layers (a pipeline
 * stage), with or without the final norm, lm_head and loss, of a model sharded over tp
 * devices (configuration from llama_shard_config), on nthreads threads. */
struct llama_shape {
    int64_t B, T;
    int64_t nlayers;
    bool head;
    enum llama_keep keep;
    int tp;
    int nthreads;
};

/*
 * Tensor parallelism (Megatron-LM's layout). Each of tp devices holds, of every layer, the
 * query heads [r H/tp, (r+1) H/tp), their kv heads (KV/tp of them, or the one they share when
 * tp > KV, replicated), the MLP columns [r F/tp, (r+1) F/tp) of gate and up and the same rows
 * of down's input, the norms whole; and rows [vocab_first, vocab_first + vocab_rows) of the
 * embedding and lm_head (ceil(V/tp) rows allocated, the last shard's tail unused). The model
 * calls allreduce where partial sums meet: after o_proj and down_proj in forward, on the
 * gradients of the two norm outputs in backward, on the embedding's output and the lm_head
 * input's gradient; allgather joins the shards' log-sum-exps of the cross-entropy. Every
 * device of a tp group computes the same residual stream, loss and norm gradients.
 */
struct llama_tp {
    int size, rank;
    int64_t vocab_first, vocab_rows;
    void (*allreduce)(void *arg, float *buf, int64_t n);
    void (*allgather)(void *arg, const float *in, float *out, int64_t n); /* out: size x n */
    void *arg;
};

/* The model instance: configuration (of one tensor-parallel shard) and thread pool. */
struct llama {
    struct model_config cfg;
    struct pool *pool;
    int nthreads;
    struct llama_tp tp; /* size 0 or 1: the whole model */
    struct lora *lora;  /* LoRA's state (model/lora.h: lora_attach), NULL: no adapters */
    bool bf16;          /* matrix products in bf16 (llama_set_bf16) */
};

/* The configuration of one of tp shards of full: heads, kv heads (at least 1), MLP width
 * and vocabulary (rounded up) divided; the caller checks tp divides heads and width and
 * divides or is a multiple of the kv heads. */
void llama_shard_config(struct model_config *out, const struct model_config *full, int tp);

/* Makes m one shard of a tensor-parallel group (m's configuration is the shard's). */
void llama_set_tp(struct llama *m, const struct llama_tp *tp);

/* Checks that cfg is a shape this code runs (positive sizes, KV divides H, even head_dim, sizes
 * within int range for BLAS), copies it and starts nthreads - 1 threads. */
int llama_init(struct llama *m, const struct model_config *cfg, int nthreads, struct moai_err *err);
void llama_release(struct llama *m);

/* Mixed precision as autocast runs it (training.precision: bf16): the matrix products of the
 * projections, the MLP and lm_head take bf16 operands (the fp32 weights and activations rounded
 * to nearest even as they are packed, model/bf16.h) and sum in fp32; norms, rotary embeddings,
 * attention, softmax, the loss and every reduction stay fp32, and so do the weights, gradients
 * and optimizer state in memory (no arena changes size). Needs bf16_available(): without it
 * (the cpu lacks AVX512_BF16, or MOAI_CPU_BF16=0) the products stay fp32 and the first such
 * call of the process logs why. Returns whether products now run in bf16. llama_init leaves
 * it off: fp32 as before, bit for bit. */
bool llama_set_bf16(struct llama *m, bool bf16);

/* ---- sizes (the planner calls these) ---- */

/* Floats of the parameter arena: equals model_param_count(cfg). */
int64_t llama_param_floats(const struct model_config *cfg);
/* llama_param_floats(cfg) * sizeof(float). */
size_t llama_param_bytes(const struct model_config *cfg);
/* Activations kept for backward for B x T tokens. */
size_t llama_act_bytes(const struct model_config *cfg, int64_t B, int64_t T);
/* Of those, one layer's (llama_act_bytes = L * this + the final norm's). */
size_t llama_layer_act_bytes(const struct model_config *cfg, int64_t B, int64_t T);
/* Workspace for B x T tokens and nthreads threads; its logits part is B T V floats. */
size_t llama_work_bytes(const struct model_config *cfg, int64_t B, int64_t T, int nthreads);
/* The same two for what one device runs (the two above: the whole model, keeping all). */
size_t llama_acts_bytes_shape(const struct model_config *cfg, const struct llama_shape *s);
size_t llama_work_bytes_shape(const struct model_config *cfg, const struct llama_shape *s);

/* ---- buffers ---- */

/* Points p into arena (llama_param_bytes, 64-byte aligned, caller-owned), or when arena is
 * NULL allocates a zeroed one that llama_params_release frees. Arenas allocated here of
 * 2 MiB or more are 2 MiB-aligned and advised for transparent huge pages (MADV_HUGEPAGE). */
int llama_params_init(struct llama_params *p, const struct model_config *cfg, float *arena,
                      struct moai_err *err);
void llama_params_release(struct llama_params *p);
/* Sets every float of the arena to 0 (gradients before a step). */
void llama_params_zero(struct llama *m, struct llama_params *p);

/* Activations of B x T tokens in an arena of their own (llama_act_bytes). */
int llama_acts_init(struct llama_acts *a, const struct model_config *cfg, int64_t B, int64_t T,
                    struct moai_err *err);
/* The same cut from arena (llama_act_bytes, 64-byte aligned, caller-owned; NULL: own). */
int llama_acts_bind(struct llama_acts *a, const struct model_config *cfg, int64_t B, int64_t T,
                    void *arena, struct moai_err *err);
/* Activations of a shape: s->nlayers layers, keeping what s->keep says. */
int llama_acts_bind_shape(struct llama_acts *a, const struct model_config *cfg,
                          const struct llama_shape *s, void *arena, struct moai_err *err);
void llama_acts_release(struct llama_acts *a);

/* The workspace (llama_work_bytes) in an arena of its own; also fills the rotary tables for
 * positions 0..T-1. nthreads must be at least the model's. */
int llama_work_init(struct llama_work *w, const struct model_config *cfg, int64_t B, int64_t T,
                    int nthreads, struct moai_err *err);
/* The same cut from arena (llama_work_bytes, 64-byte aligned, caller-owned; NULL: own). */
int llama_work_bind(struct llama_work *w, const struct model_config *cfg, int64_t B, int64_t T,
                    int nthreads, void *arena, struct moai_err *err);
int llama_work_bind_shape(struct llama_work *w, const struct model_config *cfg,
                          const struct llama_shape *s, void *arena, struct moai_err *err);
void llama_work_release(struct llama_work *w);

/* ---- tensors by name (loading, saving, initialization) ---- */

struct llama_tensor {
    char name[96]; /* "model.layers.3.self_attn.q_proj.weight" */
    float *data;   /* into the params (or gradient, moment) arena */
    int ndim;      /* 1 or 2 */
    int64_t shape[2];
    int64_t numel;
    enum model_tensor_kind kind;
    int64_t layer; /* -1 outside the layers */
};

/* Tensors of the model (model_tensor_count, tensors.h). */
int64_t llama_tensor_count(const struct model_config *cfg);
/* The index-th tensor in Hugging Face order (the arena's order: model_tensor_at), pointing
 * into p's arena (data NULL when p is NULL). */
void llama_tensor_at(struct llama_tensor *t, const struct llama_params *p,
                     const struct model_config *cfg, int64_t index);

/* ---- the model ---- */

/* Checks ids against the vocabulary, labels (-100 or an id), lengths (in [0, T]) and positions
 * (0 at a row's start, then 0 or one more than the previous within its length, in [0, T)
 * past it); names the sequence and position of a bad value. */
int llama_batch_check(const struct llama *m, const struct llama_batch *b, struct moai_err *err);
/* Labels that count after the shift: labels[b][t] != -100 for t >= 1 (and, in packed rows,
 * not the first token of an example). */
int64_t llama_batch_targets(const struct llama_batch *b);

/* labels -> w->targets, shifted by one position (the last position of a sequence, and of
 * each example of a packed row, scores nothing). llama_embed_forward does it; a stage that runs the head without the embedding
 * calls it before llama_head_forward. */
void llama_set_targets(struct llama_work *w, const struct llama_batch *b);

/* tokens -> a->layers[0].x (or a->xf when L = 0); also llama_set_targets. */
void llama_embed_forward(struct llama *m, const struct llama_params *p, struct llama_acts *a,
                         struct llama_work *w, const struct llama_batch *b);
/* One layer: la->x -> out (the next layer's x, or acts->xf), saving la for backward. */
void llama_layer_forward(struct llama *m, const struct llama_layer *lp, struct llama_layer_acts *la,
                         float *out, struct llama_work *w, const struct llama_batch *b);
/* a->xf -> final norm -> logits -> loss. Returns the sum of the token losses (double). Only
 * rows whose target counts go through lm_head (padding and masked prompts cost nothing
 * there). With backward, the logits become their gradient for a loss scaled by dloss (1 /
 * number of counted tokens of the whole step for a mean), ready for llama_head_backward. */
double llama_head_forward(struct llama *m, const struct llama_params *p, struct llama_acts *a,
                          struct llama_work *w, bool backward, float dloss);

/* lm_head and final norm: g->lm_head, g->norm += ; w->dres = gradient w.r.t. a->xf. */
void llama_head_backward(struct llama *m, const struct llama_params *p, struct llama_params *g,
                         struct llama_acts *a, struct llama_work *w);
/* One layer: w->dres holds the gradient w.r.t. the layer's output on entry and w.r.t. its
 * input on return; lg += the layer's weight gradients. */
void llama_layer_backward(struct llama *m, const struct llama_layer *lp, struct llama_layer *lg,
                          struct llama_layer_acts *la, struct llama_work *w,
                          const struct llama_batch *b);
/* g->embed += w->dres scattered by token (tokens equal to pad_token_id get none, as
 * torch.nn.Embedding's padding_idx). */
void llama_embed_backward(struct llama *m, struct llama_params *g, struct llama_work *w,
                          const struct llama_batch *b);

/* Whole model: returns the loss sum. Loss only when g is NULL. Gradients accumulate into g
 * (zero it first with llama_params_zero for a fresh step). A frozen tensor has a NULL
 * gradient (LoRA's base model: every tensor of g NULL but the layers' adapters); its
 * weight-gradient product is skipped. */
double llama_forward_backward(struct llama *m, const struct llama_params *p, struct llama_params *g,
                              struct llama_acts *a, struct llama_work *w,
                              const struct llama_batch *b, float dloss);

/* For the model's own modules (lora.c): the pool's matrix product, C (M, N) = alpha op(A)
 * op(B) + beta C row-major, and the sum over the tensor-parallel group (nothing without one). */
void llama_gemm(struct llama *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                int64_t ldc);
void llama_tp_sum(struct llama *m, float *buf, int64_t n);

#endif
