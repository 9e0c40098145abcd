/* optim.h - AdamW, gradient clipping, learning-rate schedules, random init, bf16 conversion.
 *
 * AdamW is torch.optim.AdamW (PyTorch 1.13, amsgrad off): decoupled weight decay
 * p *= 1 - lr wd, moments m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, bias corrections
 * in double, p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), in the same order of
 * fp32 operations. Parameters, gradients and both moments are flat float arrays (the arenas of
 * struct llama_params), so one call updates a whole model or any slice of it (a shard).
 *
 * Clipping is torch.nn.utils.clip_grad_norm_: the global L2 norm (summed in double, in a fixed
 * order), and when norm > max_norm every gradient is scaled by max_norm / (norm + 1e-6).
 *
 * Schedules are transformers' get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
 * and get_cosine_schedule_with_warmup (half a cosine): the learning rate of the optimizer step
 * that follows `step` scheduler steps (0 for the first optimizer step, as a LambdaLR applies
 * it) is base_lr * optim_lr_factor(...).
 *
 * Random init is transformers' _init_weights for Llama: linear and embedding weights drawn from
 * normal(0, initializer_range), the embedding row of pad_token_id zeroed, RMSNorm weights 1.
 * The generator is counter-based and portable: element pair j of the tensor with index k (its
 * position in Hugging Face order) takes r1 = optim_rng(seed, k, 2j), r2 = optim_rng(seed, k,
 * 2j + 1) and Box-Muller in double, u1 = ((r1 >> 11) + 1) 2^-53, u2 = (r2 >> 11) 2^-53,
 * x[2j] = std sqrt(-2 ln u1) cos(2 pi u2), x[2j+1] = std sqrt(-2 ln u1) sin(2 pi u2), rounded
 * to float. optim_rng is splitmix64's output function of seed ^ (k * 0xD1B54A32D192ED03) +
 * (counter + 1) * 0x9E3779B97F4A7C15. So any shard of any tensor can be initialized alone, by
 * any number of threads, and gets the values a single process would.
 *
 * The pool arguments may be NULL (serial); results do not depend on the thread count.
 * Thread-safety: functions touch only their arguments.
 *
 *     struct optim_adamw hp = {.lr = 1e-5, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
 *     double norm = optim_clip_grad_norm(pool, g.arena, g.nfloats, 1.0);
 *     optim_adamw_step(pool, p.arena, g.arena, m.arena, v.arena, p.nfloats, step, &hp);
 */
#ifndef MOAI_MODEL_OPTIM_H
#define MOAI_MODEL_OPTIM_H

#include "model/config.h"
#include "model/llama.h"
#include "model/pool.h"

#include <stdint.h>

struct optim_adamw {
    double lr; /* this step's learning rate (schedule applied) */
    double beta1, beta2;
    double eps;
    double weight_decay;
};

/* One AdamW step on n parameters; step is the 1-based count of steps including this one. */
void optim_adamw_update(float *param, const float *grad, float *m, float *v, int64_t n,
                        int64_t step, const struct optim_adamw *hp);
/* The same over the pool. */
void optim_adamw_step(struct pool *pool, float *param, const float *grad, float *m, float *v,
                      int64_t n, int64_t step, const struct optim_adamw *hp);

/* L2 norm of n gradients. */
double optim_grad_norm(struct pool *pool, const float *grad, int64_t n);
/* Its square: the sum of the squares in double, over the pool in chunks cut by n only (so the
 * same for any thread count). */
double optim_sum_squares(struct pool *pool, const float *x, int64_t n);
/* x *= a, over the pool. */
void optim_scale(struct pool *pool, float *x, int64_t n, float a);
/* Whether every one of n floats is finite (no NaN, no infinity), over the pool. */
bool optim_all_finite(struct pool *pool, const float *x, int64_t n);
/* x = 0, over the pool. */
void optim_zero(struct pool *pool, float *x, int64_t n);
/* Clips to max_norm (<= 0: no clipping) and returns the norm before clipping. */
double optim_clip_grad_norm(struct pool *pool, float *grad, int64_t n, double max_norm);

enum optim_schedule {
    OPTIM_SCHEDULE_CONSTANT,
    OPTIM_SCHEDULE_LINEAR,
    OPTIM_SCHEDULE_COSINE,
};

/* Multiplier of the base learning rate after `step` scheduler steps, warmup steps of linear
 * warmup from 0, total the training's optimizer steps. */
double optim_lr_factor(enum optim_schedule schedule, int64_t step, int64_t warmup, int64_t total);

/* The generator described above. */
uint64_t optim_rng(uint64_t seed, uint64_t stream, uint64_t counter);
/* x[i] for i in [0, n) = element first + i of the normal(0, std) stream `stream`. */
void optim_init_normal(float *x, int64_t first, int64_t n, double std, uint64_t seed,
                       uint64_t stream);
/* Fresh weights for a whole model, as described above. */
void optim_init_params(struct pool *pool, struct llama_params *p, const struct model_config *cfg,
                       uint64_t seed);

/* fp32 -> bf16 rounding to nearest even (NaN stays a quiet NaN of the same sign). */
uint16_t optim_bf16_from_f32(float x);
/* bf16 -> fp32, exact. */
float optim_f32_from_bf16(uint16_t x);
void optim_f32_to_bf16(uint16_t *dst, const float *src, int64_t n);
void optim_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);

#endif
