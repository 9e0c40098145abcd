/* peft.h - a LoRA adapter directory in PEFT's format: adapter_config.json and
 * adapter_model.safetensors.
 *
 * The directory is what PEFT's save_pretrained writes for a LoRA adapter of a causal LM, and
 * what PeftModel.from_pretrained loads:
 *
 *   adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8,
 *                               "lora_alpha": 16, "lora_dropout": 0.05,
 *                               "target_modules": ["q_proj", "v_proj"], "bias": "none",
 *                               "base_model_name_or_path": "...", "fan_in_fan_out": false,
 *                               "inference_mode": true, ...}
 *   adapter_model.safetensors  for every layer N and target, in layer order and the targets'
 *                               order (model/layout.h), F32:
 *                               base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
 *                               (r, in) and ...lora_B.weight (out, r)
 *
 * The reader checks what the tool relies on: peft_type LORA, an integer r >= 1, a number
 * lora_alpha > 0, lora_dropout in [0, 1), target_modules a list of the seven projections'
 * names (or one such name as a string, or "all-linear"), bias "none", fan_in_fan_out false or
 * absent, no use_rslora / use_dora, no layers_to_transform; then every adapter tensor of the
 * model present with its shape (F32, F16 or BF16, widened to fp32), and no other tensor.
 *
 * Errors: 0 or a negative MOAI_E* (MOAI_EIO for a bad or unreadable file) with one line naming
 * the file and the key or tensor. Thread-safe (no globals).
 *
 *     json_t *c = peft_config_json(&lc, "models/tiny-llama");   ... written by the caller
 *     peft_write_weights("out/adapter_model.safetensors", &adapters, &cfg, &lc, &err);
 *     peft_read_config("out", &lc, &err); peft_read_weights("out", &adapters, &cfg, &lc, &err);
 */
#ifndef MOAI_MODEL_PEFT_H
#define MOAI_MODEL_PEFT_H

#include "err.h"
#include "model/config.h"
#include "model/lora.h"

#include <jansson.h>

#define PEFT_CONFIG  "adapter_config.json"
#define PEFT_WEIGHTS "adapter_model.safetensors"

/* adapter_config.json's object for lc (a new reference; NULL when out of memory). */
json_t *peft_config_json(const struct lora_config *lc, const char *base_model);

/* Writes the whole model's adapters a (of cfg) to path, F32, atomically. */
int peft_write_weights(const char *path, const struct lora_params *a,
                       const struct model_config *cfg, const struct lora_config *lc,
                       struct moai_err *err);

/* Reads dir/adapter_config.json into lc's rank, alpha, dropout and targets (seed untouched). */
int peft_read_config(const char *dir, struct lora_config *lc, struct moai_err *err);

/* Reads dir/adapter_model.safetensors into a (the whole model's adapters of cfg and lc). */
int peft_read_weights(const char *dir, struct lora_params *a, const struct model_config *cfg,
                      const struct lora_config *lc, struct moai_err *err);

/* AdamW's moments of the adapters, for an exact resume: "<adapter name>.exp_avg" and
 * ".exp_avg_sq" per adapter tensor, F32, in the adapters' order (a checkpoint's
 * optimizer.safetensors). The reader wants every one with its shape. */
int peft_write_moments(const char *path, const struct lora_params *m1, const struct lora_params *m2,
                       const struct model_config *cfg, const struct lora_config *lc,
                       struct moai_err *err);
int peft_read_moments(const char *path, struct lora_params *m1, struct lora_params *m2,
                      const struct model_config *cfg, const struct lora_config *lc,
                      struct moai_err *err);

#endif
