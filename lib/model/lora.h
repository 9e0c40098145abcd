/* lora.h - LoRA adapters on a Llama layer's linear tensors, with PEFT's semantics.
 *
 * For a target projection of weight W (out, in) (model/layout.h: MODEL_LORA_TARGETS, whose
 * shapes come from the base tensor's row of MODEL_LAYER_TENSORS) an adapter adds
 *
 *     y = x W^T + s dropout(x) A^T B^T,   s = alpha / r,
 *
 * A (r, in) lora_A and B (out, r) lora_B. A fresh adapter is PEFT's: A Kaiming-uniform with
 * a = sqrt(5), that is uniform in [-1/sqrt(in), 1/sqrt(in)), B zero, so the first step's loss is
 * the base model's. The base is frozen: its gradient struct has NULL tensors (the model then
 * skips their products) and only A and B get gradients.
 *
 * Arena. A model's adapters lie in one arena, layer after layer, and in a layer target after
 * target in the table's order, A then B (lora_param_floats floats); gradients and AdamW
 * moments are the same struct over arenas of their own, as struct llama_params.
 *
 * Tensor parallelism (Megatron-LM's split, as the base's). For a column-parallel target
 * (q, k, v, gate, up: W split by rows) A is whole and B holds the shard's rows; for a
 * row-parallel one (o, down: W split by columns) A holds the shard's columns and B is whole. A
 * shard config (llama_shard_config) gives those shapes. The partial products meet in an
 * allreduce of the (N, r) product x A^T (row-parallel, forward) or of dy B (column-parallel,
 * backward), so every device of a group holds the whole A's gradient (column-parallel) or B's
 * (row-parallel) and the single-device values.
 *
 * Randomness is counter-based (optim_rng): A's element (i, j) of target t of layer l takes
 * draw i in + j of a stream of (l, t), and the dropout mask of input element (n, j) of a
 * micro-batch draw (first_token + n) in + j of a stream of (stream, l, t), j counted in the
 * whole tensor's columns, first_token the micro-batch's first token among the step's (its
 * place in the global batch times T). So any shard, pipeline stage, data-parallel split,
 * micro-batching and thread count draws the single device's values, and a recomputed forward
 * and the backward the same mask.
 *
 * Errors: the _init functions return 0 or a negative MOAI_E* and fill err. One thread at a
 * time may use a struct lora (it is the scratch of one struct llama).
 *
 *     lora_params_init(&a, &cfg, 8, MODEL_LORA_ALL, NULL, &err);
 *     lora_init_peft(&a, &cfg, &cfg, 0, 0, seed);
 *     lora_init(&state, &cfg, &(struct lora_config){8, 16.0, 0.0, MODEL_LORA_ALL, seed}, B, T,
 *               &err);
 *     lora_attach(&model, &state); p.layers[l].lora = &a.layers[l]; g.layers[l].lora = ...
 */
#ifndef MOAI_MODEL_LORA_H
#define MOAI_MODEL_LORA_H

#include "err.h"
#include "model/config.h"
#include "model/layout.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct llama;
struct llama_params;
struct llama_tensor;

/* What the recipe's lora mapping says. */
struct lora_config {
    int64_t rank;     /* r >= 1 */
    double alpha;     /* the output scale is alpha / r */
    double dropout;   /* in [0, 1) */
    unsigned targets; /* a mask of 1u << MODEL_LORA_x bits */
    uint64_t seed;    /* training.seed: A's init and the dropout masks */
};

/* One layer's adapters: lora_A[t] (r, in) and lora_B[t] (out, r) of each target t, NULL when t is not a
 * target. */
struct lora_layer {
    float *lora_A[MODEL_LORA_NTARGETS];
    float *lora_B[MODEL_LORA_NTARGETS];
    int64_t index; /* the layer's index in the whole model (the random streams') */
};

/* A model's (or a stage's) adapters, or their gradients or moments: one arena. */
struct lora_params {
    struct lora_layer *layers; /* (nlayers) */
    float *arena;
    int64_t nfloats; /* lora_param_floats */
    int64_t nlayers;
    bool owned; /* arena allocated (and freed) here */
};

/* The model's adapter state: configuration, where the dropout masks are drawn, scratch. */
struct lora {
    struct lora_config cfg;
    float scale;         /* alpha / r */
    bool train;          /* dropout applies (a training forward and its backward) */
    uint64_t stream;     /* the step's dropout stream (its index), set by the caller */
    int64_t first_token; /* the micro-batch's first token among the step's, set likewise */
    int64_t N;           /* rows the scratch holds */
    float *t;            /* (N, r) dropout(x) A^T */
    float *dt;           /* (N, r) its gradient */
    float *xd;           /* (N, the widest input) dropout(x); NULL without dropout */
    void *arena;
    size_t bytes; /* lora_work_bytes */
};

/* Floats of the adapters of cfg's layers (lora_params' arena). */
int64_t lora_param_floats(const struct model_config *cfg, int64_t rank, unsigned targets);

/* Points l's adapters into base in the arena's order; model_lora_layer_param_count floats. */
void lora_layer_bind(struct lora_layer *l, float *base, const struct model_config *cfg,
                     int64_t rank, unsigned targets, int64_t index);

/* Points p into arena (lora_param_floats floats, caller-owned) for cfg's layers, the first of
 * them the model's layer first_layer; NULL allocates a zeroed one that lora_params_release
 * frees. */
int lora_params_init(struct lora_params *p, const struct model_config *cfg, int64_t rank,
                     unsigned targets, int64_t first_layer, float *arena, struct moai_err *err);
void lora_params_release(struct lora_params *p);

/* PEFT's fresh adapters into p (of shard config cfg, tensor-parallel rank tp_rank of a model
 * full): every A Kaiming-uniform (a = sqrt(5)) from seed, every B zero. */
void lora_init_peft(struct lora_params *p, const struct model_config *cfg,
                    const struct model_config *full, int tp_rank, int64_t rank, unsigned targets,
                    uint64_t seed);

/* Adapter tensors of a whole model: 2 per target per layer. */
int64_t lora_tensor_count(const struct model_config *cfg, unsigned targets);
/* The index-th, in the arena's order, named as PEFT saves it
 * ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), pointing into p's
 * arena (data NULL when p is NULL). */
void lora_tensor_at(struct llama_tensor *t, const struct lora_params *p,
                    const struct model_config *cfg, int64_t rank, unsigned targets, int64_t index);

/* The merged model: every target's W (out, in) of p += (alpha / r) B A, from the adapters a of
 * the same layers (PEFT's merge_and_unload), in fp32. */
void lora_merge(struct llama_params *p, const struct lora_params *a, const struct model_config *cfg,
                const struct lora_config *lc);

/* Scratch bytes for micro-batches of B x T tokens (of shard config cfg). */
size_t lora_work_bytes(const struct model_config *cfg, const struct lora_config *lc, int64_t B,
                       int64_t T);
/* Sets s up with its scratch in an arena of its own; train, stream and first_token start
 * false and 0. */
int lora_init(struct lora *s, const struct model_config *cfg, const struct lora_config *lc,
              int64_t B, int64_t T, struct moai_err *err);
void lora_release(struct lora *s);

/* Makes m run its layers' adapters (a layer's lora pointer) with s's configuration and
 * scratch; NULL detaches them. */
void lora_attach(struct llama *m, struct lora *s);

/* ---- the layer's calls (lib/model/llama.c), next to the base products ---- */

/* Column-parallel targets [t0, t1) (adjacent in the table, their outputs side by side in the
 * rows of out, (N, ldo)): out += s dropout(inp) A^T B^T; inp (N, in). */
void lora_forward_col(struct llama *m, const struct lora_layer *a, float *out, int64_t ldo,
                      const float *inp, int t0, int t1, int64_t N);
/* A row-parallel target t: out (N, out) += s dropout(inp) A^T B^T, with the (N, r) partial
 * product summed over the tensor-parallel group; out is the whole (reduced) output. */
void lora_forward_row(struct llama *m, const struct lora_layer *a, float *out, const float *inp,
                      int t, int64_t N);
/* The backward of lora_forward_col, after the base's input gradient is reduced over the
 * group: ga's A and B += their gradients; dinp (N, in) += the adapters' part. */
void lora_backward_col(struct llama *m, const struct lora_layer *a, struct lora_layer *ga,
                       float *dinp, const float *dout, int64_t ldo, const float *inp, int t0,
                       int t1, int64_t N);
/* The backward of lora_forward_row: dout is the whole output's gradient, dinp the shard's
 * input gradient (the base's, added to). */
void lora_backward_row(struct llama *m, const struct lora_layer *a, struct lora_layer *ga,
                       float *dinp, const float *dout, const float *inp, int t, int64_t N);

#endif
