/* optim.c - AdamW, clipping, schedules, random init and bf16 conversion (see optim.h). */
#include "model/optim.h"

#include "model/simd.h"

#include <math.h>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <string.h>

/* Elements per task of the parallel loops: fixed, so results do not depend on threads. */
#define CHUNK ((int64_t) 1 << 16)
/* The norm's partial sums: at most this many, added in order. */
#define NORM_PARTS 256

/* ---- AdamW ----------------------------------------------------------------------------- */

/* out = sqrt(in) for one block. GCC does not vectorize sqrtf (it may set errno), so on x86-64
 * the baseline SSE instruction is used; it is exactly rounded like sqrtf. */
SIMD_INLINE void sqrt_block(float *restrict out, const float *restrict in)
{
#if defined(__SSE2__)
    for (int j = 0; j < SIMD_KB; j += 4)
        _mm_storeu_ps(out + j, _mm_sqrt_ps(_mm_loadu_ps(in + j)));
#else
    for (int j = 0; j < SIMD_KB; j++)
        out[j] = sqrtf(in[j]);
#endif
}

/* The moments of one block; v_out gets the new second moments for the square root. */
SIMD_INLINE void moments_block(float *restrict m, float *restrict v, float *restrict v_out,
                               const float *restrict g, float b1, float a1, float b2, float a2)
{
    for (int j = 0; j < SIMD_KB; j++) {
        m[j] = m[j] * b1 + a1 * g[j];
        v[j] = v[j] * b2 + a2 * g[j] * g[j];
        v_out[j] = v[j];
    }
}

SIMD_INLINE void param_block(float *restrict p, const float *restrict m, const float *restrict sq,
                             float decay, float neg_step, float bc2_sqrt, float eps)
{
    for (int j = 0; j < SIMD_KB; j++)
        p[j] = p[j] * decay + neg_step * (m[j] / (sq[j] / bc2_sqrt + eps));
}

SIMD_CLONES
void optim_adamw_update(float *param, const float *grad, float *m, float *v, int64_t n,
                        int64_t step, const struct optim_adamw *hp)
{
    /* The scalars as torch computes them: Python doubles, used as fp32 by the tensor ops. */
    const float decay = (float) (1.0 - hp->lr * hp->weight_decay);
    const float b1 = (float) hp->beta1, b2 = (float) hp->beta2;
    const float a1 = (float) (1.0 - hp->beta1), a2 = (float) (1.0 - hp->beta2);
    const double bc1 = 1.0 - pow(hp->beta1, (double) step);
    const double bc2 = 1.0 - pow(hp->beta2, (double) step);
    const float neg_step = (float) (-(hp->lr / bc1));
    const float bc2_sqrt = (float) sqrt(bc2);
    const float eps = (float) hp->eps;

    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB) {
        float vb[SIMD_KB], sb[SIMD_KB];
        moments_block(m + i, v + i, vb, grad + i, b1, a1, b2, a2);
        sqrt_block(sb, vb);
        param_block(param + i, m + i, sb, decay, neg_step, bc2_sqrt, eps);
    }
    for (; i < n; i++) {
        float g = grad[i];
        m[i] = m[i] * b1 + a1 * g;
        v[i] = v[i] * b2 + a2 * g * g;
        param[i] = param[i] * decay + neg_step * (m[i] / (sqrtf(v[i]) / bc2_sqrt + eps));
    }
}

struct adamw_job {
    float *param, *m, *v;
    const float *grad;
    int64_t n, step;
    const struct optim_adamw *hp;
};

static void adamw_task(void *arg, int64_t task, int thread)
{
    const struct adamw_job *j = arg;
    int64_t i0 = task * CHUNK, i1 = simd_min64(j->n, i0 + CHUNK);
    (void) thread;
    optim_adamw_update(j->param + i0, j->grad + i0, j->m + i0, j->v + i0, i1 - i0, j->step, j->hp);
}

void optim_adamw_step(struct pool *pool, float *param, const float *grad, float *m, float *v,
                      int64_t n, int64_t step, const struct optim_adamw *hp)
{
    struct adamw_job j = {param, m, v, grad, n, step, hp};
    pool_run(pool, (n + CHUNK - 1) / CHUNK, adamw_task, &j);
}

/* ---- clipping --------------------------------------------------------------------------- */

SIMD_CLONES
static double sum_squares(const float *x, int64_t n)
{
    double acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            acc[j] += (double) x[i + j] * (double) x[i + j];
    double s = 0.0;
    for (; i < n; i++)
        s += (double) x[i] * (double) x[i];
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s;
}

struct norm_job {
    const float *x;
    float *y;
    int64_t n, chunk;
    float scale;
    double parts[NORM_PARTS];
};

static void norm_task(void *arg, int64_t task, int thread)
{
    struct norm_job *j = arg;
    int64_t i0 = task * j->chunk, i1 = simd_min64(j->n, i0 + j->chunk);
    (void) thread;
    j->parts[task] = i0 < i1 ? sum_squares(j->x + i0, i1 - i0) : 0.0;
}

SIMD_CLONES
static void scale_floats(float *x, float a, int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            x[i + j] *= a;
    for (; i < n; i++)
        x[i] *= a;
}

static void scale_task(void *arg, int64_t task, int thread)
{
    struct norm_job *j = arg;
    int64_t i0 = task * j->chunk, i1 = simd_min64(j->n, i0 + j->chunk);
    (void) thread;
    if (i0 < i1)
        scale_floats(j->y + i0, j->scale, i1 - i0);
}

static int64_t norm_chunk(int64_t n)
{
    int64_t c = (n + NORM_PARTS - 1) / NORM_PARTS;
    c = (c + SIMD_KB - 1) / SIMD_KB * SIMD_KB;
    return c > 0 ? c : SIMD_KB;
}

double optim_sum_squares(struct pool *pool, const float *x, int64_t n)
{
    struct norm_job j = {.x = x, .n = n, .chunk = norm_chunk(n)};
    int64_t tasks = (n + j.chunk - 1) / j.chunk;
    pool_run(pool, tasks, norm_task, &j);
    double s = 0.0;
    for (int64_t t = 0; t < tasks; t++)
        s += j.parts[t];
    return s;
}

double optim_grad_norm(struct pool *pool, const float *grad, int64_t n)
{
    return sqrt(optim_sum_squares(pool, grad, n));
}

void optim_scale(struct pool *pool, float *x, int64_t n, float a)
{
    struct norm_job j = {.y = x, .n = n, .chunk = norm_chunk(n), .scale = a};
    pool_run(pool, (n + j.chunk - 1) / j.chunk, scale_task, &j);
}

/* 0 for finite values, NaN once any is NaN or infinite; lanes keep the chains independent. */
SIMD_CLONES
static bool floats_finite(const float *x, int64_t n)
{
    float acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            acc[j] += x[i + j] * 0.0f;
    float s = 0.0f;
    for (; i < n; i++)
        s += x[i] * 0.0f;
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s == 0.0f;
}

static void finite_task(void *arg, int64_t task, int thread)
{
    struct norm_job *j = arg;
    int64_t i0 = task * j->chunk, i1 = simd_min64(j->n, i0 + j->chunk);
    (void) thread;
    j->parts[task] = i0 < i1 && !floats_finite(j->x + i0, i1 - i0) ? 1.0 : 0.0;
}

bool optim_all_finite(struct pool *pool, const float *x, int64_t n)
{
    struct norm_job j = {.x = x, .n = n, .chunk = norm_chunk(n)};
    int64_t tasks = (n + j.chunk - 1) / j.chunk;
    pool_run(pool, tasks, finite_task, &j);
    for (int64_t t = 0; t < tasks; t++)
        if (j.parts[t] != 0.0)
            return false;
    return true;
}

static void zero_task(void *arg, int64_t task, int thread)
{
    struct norm_job *j = arg;
    int64_t i0 = task * j->chunk, i1 = simd_min64(j->n, i0 + j->chunk);
    (void) thread;
    if (i0 < i1)
        memset(j->y + i0, 0, sizeof(float) * (size_t) (i1 - i0));
}

void optim_zero(struct pool *pool, float *x, int64_t n)
{
    struct norm_job j = {.y = x, .n = n, .chunk = norm_chunk(n)};
    pool_run(pool, (n + j.chunk - 1) / j.chunk, zero_task, &j);
}

double optim_clip_grad_norm(struct pool *pool, float *grad, int64_t n, double max_norm)
{
    double norm = optim_grad_norm(pool, grad, n);
    if (max_norm <= 0.0)
        return norm;
    double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) {
        optim_scale(pool, grad, n, (float) coef);
    }
    return norm;
}

/* ---- schedules -------------------------------------------------------------------------- */

double optim_lr_factor(enum optim_schedule schedule, int64_t step, int64_t warmup, int64_t total)
{
    if (step < warmup)
        return (double) step / (double) (warmup > 1 ? warmup : 1);
    double span = (double) (total - warmup > 1 ? total - warmup : 1);
    switch (schedule) {
    case OPTIM_SCHEDULE_CONSTANT:
        return 1.0;
    case OPTIM_SCHEDULE_LINEAR: {
        double f = (double) (total - step) / span;
        return f > 0.0 ? f : 0.0;
    }
    case OPTIM_SCHEDULE_COSINE: {
        double progress = (double) (step - warmup) / span;
        double f = 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress));
        return f > 0.0 ? f : 0.0;
    }
    }
    return 1.0;
}

/* ---- random init ------------------------------------------------------------------------ */

uint64_t optim_rng(uint64_t seed, uint64_t stream, uint64_t counter)
{
    uint64_t z = (seed ^ (stream * 0xD1B54A32D192ED03ull)) + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The normal pair of Box-Muller draw `pair` of a stream. */
static void normal_pair(double out[2], uint64_t seed, uint64_t stream, uint64_t pair)
{
    uint64_t r1 = optim_rng(seed, stream, 2 * pair), r2 = optim_rng(seed, stream, 2 * pair + 1);
    double u1 = (double) ((r1 >> 11) + 1) * 0x1p-53;
    double u2 = (double) (r2 >> 11) * 0x1p-53;
    double rad = sqrt(-2.0 * log(u1));
    out[0] = rad * cos(2.0 * M_PI * u2);
    out[1] = rad * sin(2.0 * M_PI * u2);
}

void optim_init_normal(float *x, int64_t first, int64_t n, double std, uint64_t seed,
                       uint64_t stream)
{
    double z[2];
    int64_t e = first, end = first + n;
    while (e < end) {
        normal_pair(z, seed, stream, (uint64_t) e / 2);
        for (int k = (int) (e % 2); k < 2 && e < end; k++, e++)
            x[e - first] = (float) (std * z[k]);
    }
}

struct init_job {
    struct llama_tensor t;
    const struct model_config *cfg;
    uint64_t seed, stream;
};

static void init_task(void *arg, int64_t task, int thread)
{
    const struct init_job *j = arg;
    const struct llama_tensor *t = &j->t;
    int64_t i0 = task * CHUNK, i1 = simd_min64(t->numel, i0 + CHUNK);
    (void) thread;
    if (t->kind == MODEL_TENSOR_NORM) {
        for (int64_t i = i0; i < i1; i++)
            t->data[i] = 1.0f;
        return;
    }
    optim_init_normal(t->data + i0, i0, i1 - i0, j->cfg->initializer_range, j->seed, j->stream);
    int64_t pad = j->cfg->pad_token_id;
    if (t->kind == MODEL_TENSOR_EMBEDDING && pad >= 0 && pad < t->shape[0]) {
        int64_t r0 = pad * t->shape[1], r1 = r0 + t->shape[1];
        for (int64_t i = r0 > i0 ? r0 : i0; i < simd_min64(r1, i1); i++)
            t->data[i] = 0.0f;
    }
}

void optim_init_params(struct pool *pool, struct llama_params *p, const struct model_config *cfg,
                       uint64_t seed)
{
    for (int64_t k = 0; k < llama_tensor_count(cfg); k++) {
        struct init_job j = {.cfg = cfg, .seed = seed, .stream = (uint64_t) k};
        llama_tensor_at(&j.t, p, cfg, k);
        pool_run(pool, (j.t.numel + CHUNK - 1) / CHUNK, init_task, &j);
    }
}

/* ---- bf16 ------------------------------------------------------------------------------- */

uint16_t optim_bf16_from_f32(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t) ((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t) (u >> 16);
}

float optim_f32_from_bf16(uint16_t x)
{
    uint32_t u = (uint32_t) x << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

void optim_f32_to_bf16(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = optim_bf16_from_f32(src[i]);
}

void optim_bf16_to_f32(float *dst, const uint16_t *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = optim_f32_from_bf16(src[i]);
}
