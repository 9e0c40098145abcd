/* config.h - the model architecture: Hugging Face config.json for Llama and Mistral.
 *
 * Reads LlamaForCausalLM / MistralForCausalLM config.json files with jansson, applies a
 * recipe's inline overrides (model.config), checks consistency, and counts parameters
 * exactly. The planner and the model share model_param_count.
 *
 *     struct model_config cfg;
 *     if (model_config_load(&cfg, "configs/models/llama3-8b/config.json", NULL, &err) < 0) ...
 *     model_param_count(&cfg) == 8030261248
 *
 * Errors name the file and the key: "config.json: 'num_attention_heads' (12) does not divide
 * 'hidden_size' (1000)". Thread-safe; no allocation survives a call.
 */
#ifndef MOAI_MODEL_CONFIG_H
#define MOAI_MODEL_CONFIG_H

#include "err.h"
#include "model/layout.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

enum rope_scaling_type {
    ROPE_SCALING_NONE = 0,
    ROPE_SCALING_LLAMA3, /* Llama 3.1 style: factor, low/high_freq_factor, original */
};

struct rope_scaling {
    enum rope_scaling_type type;
    double factor;
    double low_freq_factor;
    double high_freq_factor;
    int64_t original_max_position_embeddings;
};

struct model_config {
    char name[128];              /* the model directory's base name, or "model" */
    char architecture[64];       /* "LlamaForCausalLM" | "MistralForCausalLM" */
    int64_t hidden_size;         /* D */
    int64_t intermediate_size;   /* F, the MLP width */
    int64_t num_hidden_layers;   /* L */
    int64_t num_attention_heads; /* H */
    int64_t num_key_value_heads; /* KV, divides H */
    int64_t head_dim;            /* hd; D / H unless given */
    int64_t vocab_size;          /* V */
    int64_t max_position_embeddings;
    int64_t sliding_window; /* Mistral's attention window, 0 when none */
    double rms_norm_eps;
    double rope_theta;
    double initializer_range; /* std of the normal init, default 0.02 */
    struct rope_scaling rope_scaling;
    bool tie_word_embeddings;
    int64_t bos_token_id; /* -1 when absent */
    int64_t eos_token_id; /* -1 when absent; the first when a list */
    int64_t pad_token_id; /* -1 when absent */
    char torch_dtype[16]; /* "bfloat16", "float16", "float32", "" */
};

/* Reads path (a config.json), applies overrides (a JSON object of config.json keys, may be
 * NULL) and checks the result. path may be NULL when overrides stand alone. Returns 0, or
 * MOAI_EIO (unreadable, not JSON) / MOAI_EUSAGE (inconsistent or missing values). */
int model_config_load(struct model_config *cfg, const char *path, const json_t *overrides,
                      struct moai_err *err);

/* Same from a parsed object; source names it in messages. */
int model_config_from_json(struct model_config *cfg, const json_t *root, const char *source,
                           struct moai_err *err);

/* Writes cfg as a Hugging Face config.json object (new reference). */
json_t *model_config_to_json(const struct model_config *cfg);

/* The largest model a config may describe (10^15 parameters): larger sizes are an error, so
 * that every count in int64_t stays far from overflowing. */
#define MODEL_MAX_PARAMS 1000000000000000LL

/* Exact parameter count (embedding, layers, final norm, lm_head unless tied). */
int64_t model_param_count(const struct model_config *cfg);

/* Parameters of one transformer layer: the sum over the layer's tensor table (layout.h).
 * With a config of per-device dimensions (llama_shard_config), those of a tensor-parallel
 * shard. */
int64_t model_layer_param_count(const struct model_config *cfg);

/* The size of dimension d (layout.h) in cfg: 0 for MODEL_DIM_NONE. */
int64_t model_dim(const struct model_config *cfg, enum model_dim d);

/* Elements of the layer tensor k (an index of model_layer_tensors) under cfg. */
int64_t model_layer_tensor_numel(const struct model_config *cfg, int k);

/* Parameters of one layer's LoRA adapters of rank r on the targets (a mask of
 * 1u << MODEL_LORA_x bits): r (in + out) per target. With a shard config, a tensor-parallel
 * shard's (the split side of each adapter is the shard's, the other whole). */
int64_t model_lora_layer_param_count(const struct model_config *cfg, int64_t rank,
                                     unsigned targets);

#endif
