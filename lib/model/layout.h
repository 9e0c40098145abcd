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

/* LoRA: the linear tensors of the layer that can carry an adapter, X(field, module), in the
 * table's order: the field of struct llama_layer and PEFT's module name (a recipe's
 * lora.target_modules). An adapter's two tensors are derived from its base tensor's row of
 * MODEL_LAYER_TENSORS, W (out, in): lora_A (r, in) and lora_B (out, r), named
 * "<the base name without .weight>.lora_A.weight" (lib/model/lora.h). */
#define MODEL_LORA_TARGETS(X)                                                                      \
    X(wq, q_proj)                                                                                  \
    X(wk, k_proj)                                                                                  \
    X(wv, v_proj)                                                                                  \
    X(wo, o_proj)                                                                                  \
    X(w_gate, gate_proj)                                                                           \
    X(w_up, up_proj)                                                                               \
    X(w_down, down_proj)

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

/* The index of each LoRA target: MODEL_LORA_wq, ...; a set of targets is a mask of
 * 1u << MODEL_LORA_x bits. */
enum model_lora_target {
#define MODEL_LORA_ENUM(field, module) MODEL_LORA_##field,
    MODEL_LORA_TARGETS(MODEL_LORA_ENUM)
#undef MODEL_LORA_ENUM
        MODEL_LORA_NTARGETS
};
#define MODEL_LORA_ALL ((1u << MODEL_LORA_NTARGETS) - 1)

struct model_lora_target_desc {
    const char *module;            /* PEFT's name: "q_proj" */
    enum model_layer_tensor layer; /* its base tensor's row in model_layer_tensors */
};

/* The LoRA targets, MODEL_LORA_NTARGETS entries, then a NULL module (a list of names). */
extern const struct model_lora_target_desc model_lora_targets[MODEL_LORA_NTARGETS + 1];

#endif
