/* tensors.h - the tensors a model config expects, by Hugging Face name, and their loading and
 * saving through safetensors.
 *
 * The list, in this order (the order of the parameter arena: every tensor back to back, no
 * gaps, so a tensor's offset is the sum of the sizes before it):
 *
 *   model.embed_tokens.weight                          (V, D)
 *   for each layer i in 0 .. L-1, the layer table of model/layout.h:
 *     model.layers.i.input_layernorm.weight            (D)
 *     model.layers.i.self_attn.q_proj.weight           (H x hd, D)
 *     ...
 *     model.layers.i.mlp.down_proj.weight              (D, F)
 *   model.norm.weight                                  (D)
 *   lm_head.weight                                     (V, D), unless tie_word_embeddings
 *
 * The sizes add up to model_param_count(cfg).
 *
 * Loading checks a safetensors set against the list: every tensor present with the right
 * shape, and reports the tensors the config does not use (a log_warn line, or an error in
 * strict mode; rotary_emb.inv_freq buffers, which older checkpoints carry, are ignored).
 *
 * Ownership: nothing here allocates memory that outlives a call; the arena is the caller's.
 * Thread-safe (log_warn aside). Errors: 0 or a negative MOAI_E* code with one line in err,
 * naming the file or folder and the tensor:
 *   "m/model.safetensors: tensor 'lm_head.weight' has shape [16, 8], the config needs [32, 8]"
 *   "m: tensor 'model.norm.weight' is missing"
 *
 *     if (model_tensors_open_dir(&cfg, &set, "models/tiny-llama", NULL, false, &err) < 0) ...
 *     float *arena = malloc(model_param_count(&cfg) * sizeof(float));
 *     model_tensors_load(&cfg, &set, arena, "models/tiny-llama", &err);  st_set_close(&set);
 */
#ifndef MOAI_TENSORS_H
#define MOAI_TENSORS_H

#include "err.h"
#include "model/config.h"
#include "model/safetensors.h"

#include <stdbool.h>
#include <stdint.h>

struct model_tensor {
    char name[96];    /* "model.layers.79.post_attention_layernorm.weight" */
    int ndim;         /* 1 (norms) or 2 */
    int64_t shape[2]; /* shape[1] is 0 when ndim == 1 */
    int64_t numel;
    int64_t offset; /* floats from the start of the arena */
    enum model_tensor_kind kind;
    int64_t layer; /* the layer, or -1 */
};

/* Tensors of the config: 2 + MODEL_LAYER_NTENSORS x L, plus 1 unless the embeddings are
 * tied. */
int64_t model_tensor_count(const struct model_config *cfg);

/* Fills t with the index-th tensor of the list (0 <= index < model_tensor_count; otherwise an
 * assertion fails). Constant time. */
void model_tensor_at(struct model_tensor *t, const struct model_config *cfg, int64_t index);

/* The index of the tensor called name in the list, or -1 when the config has none of that
 * name (t, when not NULL, is filled on success). */
int64_t model_tensor_find(struct model_tensor *t, const struct model_config *cfg, const char *name);

/* Checks set against cfg: each tensor of the list present (MOAI_EIO "dir: tensor 'x' is
 * missing") with the right shape (MOAI_EIO "file: tensor 'x' has shape [a, b], the config
 * needs [c, d]"); tensors of the set not in the list are logged with log_warn (one line: how
 * many, and the first), or with strict are MOAI_EIO "file: tensor 'x' is not part of the
 * config (N such tensors)". dir names the set in messages about missing tensors. */
int model_tensors_check(const struct model_config *cfg, const struct st_set *set, const char *dir,
                        bool strict, struct moai_err *err);

/* model_tensors_check (not strict), then every tensor converted to fp32 at its offset in
 * arena (model_param_count floats, the caller's). On failure the arena may be partly
 * written. Returns 0 or MOAI_EIO. */
int model_tensors_load(const struct model_config *cfg, const struct st_set *set, float *arena,
                       const char *dir, struct moai_err *err);

/* Opens a Hugging Face model folder in one call: dir/config.json (with overrides, a JSON
 * object or NULL) into cfg, its weights (st_set_open_dir: model.safetensors, or the index and
 * shards with the "Loading checkpoint shards" bar) into set, then model_tensors_check. Returns
 * 0 with set open (the caller closes it with st_set_close), or the first error with nothing
 * left open: config errors as model_config_load, weight errors MOAI_EIO. */
int model_tensors_open_dir(struct model_config *cfg, struct st_set *set, const char *dir,
                           const json_t *overrides, bool strict, struct moai_err *err);

/* Saves the arena's tensors under their names, in list order, as dir/model.safetensors or
 * shards and model.safetensors.index.json past max_shard_bytes (st_write_sharded; 0 for no
 * limit), as dtype (ST_BF16 or ST_F32). dir must exist. Returns as st_write_sharded. */
int model_tensors_save(const struct model_config *cfg, const float *arena, const char *dir,
                       enum st_dtype dtype, uint64_t max_shard_bytes, struct moai_err *err);

#endif
