/* shard.h - what one device of a parallel layout holds, and exactly how many bytes.
 *
 * A layout of dp x pp x tp devices numbers its devices with the tensor-parallel rank
 * fastest, then the pipeline stage, then the data-parallel replica:
 *
 *     dev = (dp_rank * pp + stage) * tp + tp_rank
 *
 * so a tensor-parallel group is tp consecutive devices (inside one node, as the planner
 * requires) and a pipeline's stages are tp devices apart.
 *
 * A device holds the parameters of its stage's tp shard as *units*, each of which ZeRO
 * shards, gathers and reduces as one piece: the embedding (first stage), one unit per layer,
 * the final norm and the lm_head (last stage; with tied embeddings the lm_head is the
 * embedding itself when pp = 1, and a copy of it, kept equal, on the last stage when pp > 1,
 * as Megatron-LM does). The units lie in one arena in this order. Under ZeRO a unit of len
 * floats is cut into dp chunks of ceil(len / dp) floats (the last padded); data-parallel rank
 * r owns chunk r of every unit, and its shard is the concatenation of those chunks.
 *
 * shard_bytes is the memory the executor allocates for the device, by the same arithmetic as
 * its allocations, so the planner's cpu memory model (plan/mem.c) can call it and predict
 * what is measured to the byte.
 *
 * Pure functions besides shard_init's allocation of the unit table; thread-safe.
 *
 *     struct shard s;
 *     shard_init(&s, &cfg, &layout, block_size, nthreads, dev, &err);
 *     struct shard_bytes b; shard_bytes(&s, &b);  ... b.total ...
 *     shard_release(&s);
 */
#ifndef MOAI_LAYOUT_SHARD_H
#define MOAI_LAYOUT_SHARD_H

#include "err.h"
#include "model/config.h"
#include "model/llama.h"
#include "recipe.h"

#include <stdbool.h>
#include <stdint.h>

/* The parallel layout to run: the planner's choice (struct plan embeds it), the executor's input. */
struct layout {
    int dp, pp, tp;
    int num_micro_batches;    /* per replica per step */
    int64_t batch_per_device; /* sequences per micro-batch */
    enum recompute recomputation;
    bool distribute_param;          /* ZeRO-2 */
    bool distribute_low_prec_param; /* ZeRO-3 */
};

enum shard_unit_kind {
    SHARD_EMBED,
    SHARD_LAYER,
    SHARD_NORM,
    SHARD_LMHEAD,
};

struct shard_unit {
    enum shard_unit_kind kind;
    int64_t layer; /* SHARD_LAYER: the model's layer index */
    int64_t off;   /* first float in the device's arena */
    int64_t len;   /* floats */
    int64_t chunk; /* ceil(len / dp) */
    int64_t shard; /* first float of this unit's chunk in a rank's ZeRO shard */
};

struct shard {
    struct layout lay;
    int dev, dp_rank, stage, tp_rank;
    struct model_config full; /* the whole model */
    struct model_config cfg;  /* one tp shard of it (llama_shard_config) */
    int64_t first_layer, nlayers;
    bool has_embed, has_head;
    bool tied_copy;                  /* the lm_head unit copies the embedding (tied, pp > 1) */
    int64_t vocab_first, vocab_rows; /* this shard's real vocabulary rows */
    int64_t kv_first;                /* the first kv head it holds (of the whole model) */
    bool kv_replicated;              /* tp > kv heads: its kv head is shared with others */
    int nunits;
    struct shard_unit *units;
    int embed_unit, norm_unit, lm_head_unit; /* indices, -1 when absent */
    int64_t floats;                          /* the units' sum */
    int64_t shard_floats;                    /* the chunks' sum */
    int64_t max_padded;                      /* max over units of chunk x dp */
    int64_t max_chunk;
    int64_t norm_padded; /* the final norm unit's chunk x dp (0 without the head) */
    int64_t in_flight;   /* micro-batches whose activations the stage keeps under 1F1B */
    struct llama_shape shape;
};

/* Device dev's part of layout lay for the model full, micro-batches of T tokens, nthreads
 * threads. Returns 0 or MOAI_ENOMEM. */
int shard_init(struct shard *s, const struct model_config *full, const struct layout *lay,
               int64_t T, int nthreads, int dev, struct moai_err *err);
void shard_release(struct shard *s);

/* The device of coordinates (dp_rank, stage, tp_rank). */
int shard_device(const struct layout *lay, int dp_rank, int stage, int tp_rank);

/* Which llama_keep the recomputation mode means. */
enum llama_keep shard_keep(enum recompute rc);

/* The bytes a device allocates, by kind. */
struct shard_bytes {
    int64_t weights;     /* working weights, or the ZeRO-3 shard and gathered units */
    int64_t gradients;   /* gradients, or the ZeRO-2 shard, bucket and reduction chunk */
    int64_t optimizer;   /* Adam's two moments */
    int64_t activations; /* in_flight micro-batches' kept activations */
    int64_t workspace;   /* the model's workspace (logits, gradients in flight, scratch) */
    int64_t total;
};

void shard_bytes(const struct shard *s, struct shard_bytes *b);

/* Copies unit u's floats from the whole model's arena (Hugging Face order, model_param_count
 * floats) into dst (u's len floats; vocabulary rows past the real ones zeroed), or back from
 * src into the arena. */
void shard_unit_from_full(const struct shard *s, int u, const float *full, float *dst);
void shard_unit_to_full(const struct shard *s, int u, const float *src, float *full);

/* Ranges [start, end) of unit u whose values another device of the layout also holds
 * (replicated norms on tp ranks past 0, a shared kv head's k and v on all but the first
 * rank sharing it, the tied lm_head copy): left out of the gradient norm so every value
 * counts once. Returns how many (at most 4). */
int shard_duplicate_ranges(const struct shard *s, int u, int64_t ranges[4][2]);

/* Points l at the tensors of one layer unit of configuration c (Hugging Face order). */
void shard_layer_view(struct llama_layer *l, float *base, const struct model_config *c);

/* The range [*start, *end) of layer unit u holding k_proj and v_proj (adjacent). */
void shard_kv_range(const struct shard *s, int u, int64_t *start, int64_t *end);

/* Layers [*first, *first + *count) of stage (0-based) among pp stages of L layers: L / pp
 * each, the L % pp extra layers going to stages 1, 2, ... (never to the first stage, which
 * holds the embedding and the most activations under 1F1B). */
void shard_stage_layers(int64_t L, int pp, int stage, int64_t *first, int64_t *count);

/* Micro-batches whose activations stage keeps at once under 1F1B: all of the warm-up
 * forwards, min(pp - stage, num_micro_batches). */
int64_t shard_in_flight(int pp, int stage, int num_micro_batches);

/* Threads of the model's pool on each of ndev cpu devices of this process (its cores shared
 * out, at least one each). */
int shard_cpu_threads(int ndev);

#endif
