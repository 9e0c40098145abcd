/* tensors.h - the weights of a model config, read from a safetensors set into a flat arena.
 *
 * The arena is the model's parameter arena (model/llama.h): every tensor in Hugging Face order
 * without gaps, so llama_tensor_at names each one and says where it lives. Loading checks that
 * every tensor the config needs is present with the right shape, converts it to fp32, and
 * reports the tensors the config does not use (a warning; rotary inv_freq buffers silently).
 *
 *     float *arena = ... llama_param_bytes(&cfg) ...;
 *     if (model_tensors_load(&cfg, &set, arena, &err) < 0) ...
 *
 * Errors name the file and the tensor: "m/model.safetensors: tensor 'lm_head.weight' has shape
 * [16, 8], the config needs [32, 8]", "m: tensor 'model.norm.weight' is missing".
 */
#ifndef MOAI_TENSORS_H
#define MOAI_TENSORS_H

#include "err.h"
#include "model/config.h"
#include "model/safetensors.h"

/* Fills arena (model_param_count floats) from set. Returns 0 or MOAI_EIO. dir names the set
 * in messages about missing tensors. */
int model_tensors_load(const struct model_config *cfg, const struct st_set *set, float *arena,
                       const char *dir, struct moai_err *err);

#endif
