/* lora_dev.h - one device's LoRA adapters in a parallel layout: arenas, loading and gathering,
 * gradient reduction, the norm's share and the optimizer step.
 *
 * A device of a dp x pp x tp layout holds the adapters of its stage's layers, cut for its
 * tensor-parallel rank as the base is (model/lora.h: A whole and B by rows for q, k, v, gate,
 * up; A by columns and B whole for o, down; shard_lora_copy). Adapters are small: every
 * data-parallel rank keeps them whole with their gradients and both AdamW moments (ZeRO's
 * flags shard only the frozen base's weights), fp32, in four arenas of lora_param_floats of
 * the stage, plus the model's adapter scratch (struct lora). lora_dev_bytes is that sum, so
 * the planner's cpu memory model (plan/mem.c) predicts what the executor allocates.
 *
 * After a step's backwards the gradients are made whole: summed over the data-parallel group,
 * and the k and v rows of B of a kv head shared by several tp ranks (tp > kv heads) summed over
 * those ranks. Every value then counts once in the gradient norm: data-parallel rank 0 counts,
 * a tensor every tp rank holds whole (A of column-parallel targets, B of row-parallel ones) on
 * tp rank 0 only, a shared kv head's B rows on the first of its ranks.
 *
 * Not thread-safe: one struct per device thread; the collectives are the device's own.
 *
 *     lora_dev_init(&ld, &shard, &lc, B, T, &err);  lora_dev_load(&ld, &shard, &whole);
 *     lora_dev_attach(&ld, &model, lview, gview);  ... forward and backward ...
 *     lora_dev_reduce(&ld, &shard, &dpc, &kvc);  norm = sqrt(sum of lora_dev_sumsq);
 *     lora_dev_step(&ld, pool, step, &hp, scale);
 */
#ifndef MOAI_EXEC_LORA_DEV_H
#define MOAI_EXEC_LORA_DEV_H

#include "err.h"
#include "exec/comm.h"
#include "layout/shard.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optim.h"
#include "model/pool.h"

#include <stdint.h>

struct lora_dev {
    struct lora_config lc;
    struct model_config cfg; /* the device's shard config, its stage's layers */
    struct lora_params a;    /* adapters */
    struct lora_params g;    /* their gradients */
    struct lora_params m1;   /* AdamW's exp_avg */
    struct lora_params m2;   /* AdamW's exp_avg_sq */
    struct lora state;       /* the model's scratch, dropout stream and switch */
    bool ready;
};

/* Bytes a device of shard s allocates for adapters lc on micro-batches of B x T tokens. */
int64_t lora_dev_bytes(const struct shard *s, const struct lora_config *lc, int64_t B, int64_t T);

/* Allocates d's arenas (zeroed) and scratch for shard s. Returns 0 or MOAI_ENOMEM. */
int lora_dev_init(struct lora_dev *d, const struct shard *s, const struct lora_config *lc,
                  int64_t B, int64_t T, struct moai_err *err);
void lora_dev_release(struct lora_dev *d);

/* The device's part of whole-model adapters (lora_params of s->full, all layers): which is 0
 * for the adapters, 1 and 2 for the moments. lora_dev_store writes it back into whole. */
void lora_dev_load(struct lora_dev *d, const struct shard *s, const struct lora_params *whole,
                   int which);
void lora_dev_store(const struct lora_dev *d, const struct shard *s, struct lora_params *whole,
                    int which);

/* Gathers the adapters (which: 0) or a moment (1, 2) of the devices of data-parallel rank 0
 * into whole on device 0 (a collective over world: each of them sends its arena, device 0
 * receives in device order). On device 0, others are the shards of those devices (every
 * (stage, tp rank) in device order, nothers of them; its own included) and tmp holds the
 * largest one's shard_lora_floats; elsewhere they are NULL and 0. Returns 0 or the first
 * failed collective's code. */
int lora_dev_gather(const struct lora_dev *d, const struct shard *s, struct comm *world, int which,
                    const struct shard *others, int nothers, float *tmp, struct lora_params *whole);

/* Points the layer views (the stage's nlayers) at the adapters and their gradients, and the
 * model at the scratch. */
void lora_dev_attach(struct lora_dev *d, struct llama *m, struct llama_layer *lview,
                     struct llama_layer *gview);

/* The gradients made whole (collectives over dpc and, with shared kv heads, kvc; kvc may be
 * NULL otherwise). Returns 0 or the first collective's error. */
int lora_dev_reduce(struct lora_dev *d, const struct shard *s, struct comm *dpc, struct comm *kvc);

/* This device's share of the squared gradient norm. */
double lora_dev_sumsq(const struct lora_dev *d, const struct shard *s);

/* Gradients scaled by scale (clipping; 1 for none), then one AdamW step of the adapters. */
void lora_dev_step(struct lora_dev *d, struct pool *pool, int64_t step,
                   const struct optim_adamw *hp, float scale);

#endif
