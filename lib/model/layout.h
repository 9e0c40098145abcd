/* layout.h - the tensors of a Llama layer: one table from which everything is derived.
 *
 * MODEL_LAYER_TENSORS lists a transformer layer's tensors in Hugging Face order, one line each:
 * the C field that points at it (struct llama_layer), its name after "model.layers.<i>.", its
 * kind, and its rows and columns as dimensions of the config (MODEL_DIM_NONE for a vector).
 * The parameter arena holds them back to back in this order, so the table alone gives:
 *   - the fields of struct llama_layer and the binding of their pointers (lib/model/llama.c,
 *     and a device's shard of a layer, lib/layout/shard.c);
 *   - the names and shapes that safetensors files are checked against (lib/model/tensors.c);
 *   - the parameters of a layer (model_layer_param_count), whole or of a tensor-parallel shard
 *     (a config of per-device dimensions: llama_shard_config), which the planner's memory
 *     model uses;
 *   - how tensor parallelism splits each tensor: along MODEL_DIM_Q (query heads), MODEL_DIM_KV
 *     (kv heads) and MODEL_DIM_F (the MLP width); MODEL_DIM_D is never split.
 * Adding a tensor to the layer (a bias, an adapter) is one line here.
 *
 * q, k, v are adjacent (one ((H + 2 KV) hd, D) matrix) and so are gate and up (one (2F, D)
 * matrix): the model multiplies them as such, so their order here is part of the contract.
 *
 *     for (int k = 0; k < MODEL_LAYER_NTENSORS; k++)
 *         n += model_dim(cfg, model_layer_tensors[k].rows) *
 *              model_dim_or_one(cfg, model_layer_tensors[k].cols);
 */
#ifndef MOAI_MODEL_LAYOUT_H
#define MOAI_MODEL_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

/* X(field, name, kind, rows, cols) */
#define MODEL_LAYER_TENSORS(X)                                                                     \
    X(input_norm, "input_layernorm.weight", NORM, D, NONE)                                         \
    X(wq, "self_attn.q_proj.weight", LINEAR, Q, D)                                                 \
    X(wk, "self_attn.k_proj.weight", LINEAR, KV, D)                                                \
    X(wv, "self_attn.v_proj.weight", LINEAR, KV, D)                                                \
    X(wo, "self_attn.o_proj.weight", LINEAR, D, Q)                                                 \
    X(post_norm, "post_attention_layernorm.weight", NORM, D, NONE)                                 \
    X(w_gate, "mlp.gate_proj.weight", LINEAR, F, D)                                                \
    X(w_up, "mlp.up_proj.weight", LINEAR, F, D)                                                    \
    X(w_down, "mlp.down_proj.weight", LINEAR, D, F)

/* Dimensions of the config that tensor shapes are made of. */
enum model_dim {
    MODEL_DIM_NONE, /* a vector's missing second dimension */
    MODEL_DIM_D,    /* hidden_size */
    MODEL_DIM_Q,    /* num_attention_heads x head_dim */
    MODEL_DIM_KV,   /* num_key_value_heads x head_dim */
    MODEL_DIM_F,    /* intermediate_size */
    MODEL_DIM_V,    /* vocab_size */
};

enum model_tensor_kind {
    MODEL_TENSOR_EMBEDDING, /* (V, D), rows looked up */
    MODEL_TENSOR_NORM,      /* (D), RMSNorm weight */
    MODEL_TENSOR_LINEAR,    /* (out, in), row-major */
};

/* The index of each layer tensor in the table: MODEL_LAYER_wq, ... */
enum model_layer_tensor {
#define MODEL_LAYER_ENUM(field, name, kind, rows, cols) MODEL_LAYER_##field,
    MODEL_LAYER_TENSORS(MODEL_LAYER_ENUM)
#undef MODEL_LAYER_ENUM
        MODEL_LAYER_NTENSORS
};

struct model_layer_tensor_desc {
    const char *name; /* after "model.layers.<i>." */
    enum model_tensor_kind kind;
    enum model_dim rows, cols;
};

/* The table, MODEL_LAYER_NTENSORS entries in arena order. */
extern const struct model_layer_tensor_desc model_layer_tensors[MODEL_LAYER_NTENSORS];

#endif
