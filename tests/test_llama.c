/* test_llama.c - the Llama kernels and model: gradient checks, PyTorch reference, buffers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "data/pack.h"
#include "model/kernels.h"
#include "model/bf16.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optim.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t rng_state = 88172645463325252ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double) (rng_state >> 11) * 0x1p-53;
}

static void fill(float *x, int64_t n, double lo, double hi)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (float) (lo + (hi - lo) * urand());
}

static float *falloc(int64_t n)
{
    float *x = calloc((size_t) n, sizeof(float));
    assert_non_null(x);
    return x;
}

/* sum_i out[i] * r[i] in double: the scalar objective whose gradient w.r.t. out is r. */
static double wsum(const float *out, const float *r, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double) out[i] * (double) r[i];
    return s;
}

/*
 * Finite-difference check: for up to `samples` entries of x (all when n <= samples; otherwise
 * evenly spread), the central difference (f(x + h) - f(x - h)) / 2h must match the analytic
 * gradient within |fd - an| <= atol + rtol * max(|fd|, |an|). Kernels are fp32 and the
 * objectives are summed in double, so h = 1e-2 balances truncation (O(h^2)) against fp32
 * rounding (O(1e-7 / h)); the tolerances each test states follow from that.
 */
static void grad_check(const char *what, double (*f)(void *), void *ctx, float *x, int64_t n,
                       const float *analytic, int64_t samples, double h, double rtol, double atol)
{
    int64_t step = n <= samples ? 1 : n / samples;
    double worst = 0.0;
    int64_t worst_i = -1;
    for (int64_t i = 0; i < n; i += step) {
        float save = x[i];
        x[i] = (float) (save + h);
        double hp = (double) x[i] - save;
        double fp = f(ctx);
        x[i] = (float) (save - h);
        double hm = save - (double) x[i];
        double fm = f(ctx);
        x[i] = save;
        double fd = (fp - fm) / (hp + hm);
        double an = analytic[i];
        double err = fabs(fd - an) / (atol + rtol * fmax(fabs(fd), fabs(an)));
        if (err > worst) {
            worst = err;
            worst_i = i;
        }
        if (err > 1.0)
            fail_msg("%s: element %lld: finite difference %.7g, analytic %.7g", what, (long long) i,
                     fd, an);
    }
    if (getenv("MOAI_GRAD_VERBOSE"))
        print_message("%-44s worst %.3f of tolerance (element %lld)\n", what, worst,
                      (long long) worst_i);
}

/* ---- kernel gradient checks --------------------------------------------------------------- */

struct emb_ctx {
    int32_t tokens[12];
    float *emb, *out, *r;
    int64_t N, D;
};

static double emb_loss(void *p)
{
    struct emb_ctx *c = p;
    embedding_forward(c->out, c->tokens, c->emb, c->N, c->D);
    return wsum(c->out, c->r, c->N * c->D);
}

static void test_llama_embedding_grad(void **state)
{
    (void) state;
    struct emb_ctx c = {{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8}, NULL, NULL, NULL, 12, 7};
    int64_t V = 10;
    c.emb = falloc(V * c.D);
    c.out = falloc(c.N * c.D);
    c.r = falloc(c.N * c.D);
    float *demb = falloc(V * c.D);
    fill(c.emb, V * c.D, -1, 1);
    fill(c.r, c.N * c.D, -1, 1);
    embedding_backward(demb, c.r, c.tokens, -1, c.N, c.D);
    /* linear: tolerance 3e-4 relative, 3e-5 absolute */
    grad_check("embedding", emb_loss, &c, c.emb, V * c.D, demb, 1000, 1e-2, 3e-4, 3e-5);
    /* padding_idx: token 5 gets no gradient */
    memset(demb, 0, sizeof(float) * (size_t) (V * c.D));
    embedding_backward(demb, c.r, c.tokens, 5, c.N, c.D);
    for (int64_t i = 0; i < c.D; i++)
        assert_true(demb[5 * c.D + i] == 0.0f);
    assert_true(demb[3 * c.D] != 0.0f);
    free(c.emb);
    free(c.out);
    free(c.r);
    free(demb);
}

struct norm_ctx {
    float *x, *w, *out, *rstd, *r;
    int64_t N, D;
};

static double norm_loss(void *p)
{
    struct norm_ctx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->x, c->w, 1e-5f, c->N, c->D);
    return wsum(c->out, c->r, c->N * c->D);
}

static void test_llama_rmsnorm_grad(void **state)
{
    (void) state;
    struct norm_ctx c = {.N = 5, .D = 37};
    int64_t n = c.N * c.D;
    c.x = falloc(n);
    c.w = falloc(c.D);
    c.out = falloc(n);
    c.rstd = falloc(c.N);
    c.r = falloc(n);
    float *dx = falloc(n), *dw = falloc(c.D);
    fill(c.x, n, -2, 2);
    fill(c.w, c.D, 0.5, 1.5);
    fill(c.r, n, -1, 1);
    norm_loss(&c);
    rmsnorm_backward(dx, dw, c.r, c.x, c.w, c.rstd, c.N, c.D);
    /* tolerance 1e-3 relative, 1e-4 absolute */
    grad_check("rmsnorm dx", norm_loss, &c, c.x, n, dx, 1000, 1e-2, 1e-3, 1e-4);
    grad_check("rmsnorm dw", norm_loss, &c, c.w, c.D, dw, 1000, 1e-2, 1e-3, 1e-4);
    /* the forward is HF's: weight * (x / sqrt(mean(x^2) + eps)) */
    double ms = 0;
    for (int64_t i = 0; i < c.D; i++)
        ms += (double) c.x[i] * c.x[i];
    double r0 = 1.0 / sqrt(ms / (double) c.D + 1e-5);
    assert_float_equal(c.out[3], c.w[3] * c.x[3] * r0, 1e-5);
    free(c.x);
    free(c.w);
    free(c.out);
    free(c.rstd);
    free(c.r);
    free(dx);
    free(dw);
}

struct rope_ctx {
    float *x, *out, *cos, *sin, *r;
    int64_t T, nh, hd, ld;
};

static double rope_loss(void *p)
{
    struct rope_ctx *c = p;
    memcpy(c->out, c->x, sizeof(float) * (size_t) (c->T * c->ld));
    rope_forward(c->out, c->cos, c->sin, c->T, c->nh, c->hd, c->ld);
    return wsum(c->out, c->r, c->T * c->ld);
}

static void test_llama_rope_grad(void **state)
{
    (void) state;
    struct rope_ctx c = {.T = 9, .nh = 3, .hd = 8, .ld = 30};
    int64_t n = c.T * c.ld;
    float inv[4];
    struct rope_scaling none = {0};
    c.x = falloc(n);
    c.out = falloc(n);
    c.r = falloc(n);
    c.cos = falloc(c.T * 4);
    c.sin = falloc(c.T * 4);
    float *dx = falloc(n);
    rope_inv_freq(inv, c.hd, 10000.0, &none);
    assert_float_equal(inv[0], 1.0, 1e-7);
    assert_float_equal(inv[1], 0.1, 1e-7);
    assert_float_equal(inv[3], 0.001, 1e-9);
    rope_tables(c.cos, c.sin, inv, c.T, c.hd);
    fill(c.x, n, -1, 1);
    fill(c.r, n, -1, 1);
    /* columns past nh * hd are not heads: no gradient, untouched output */
    for (int64_t t = 0; t < c.T; t++)
        for (int64_t i = c.nh * c.hd; i < c.ld; i++)
            c.r[t * c.ld + i] = 0.0f;
    memcpy(dx, c.r, sizeof(float) * (size_t) n);
    rope_backward(dx, c.cos, c.sin, c.T, c.nh, c.hd, c.ld);
    for (int64_t t = 0; t < c.T; t++)
        for (int64_t i = c.nh * c.hd; i < c.ld; i++)
            dx[t * c.ld + i] = 0.0f;
    /* linear: tolerance 3e-4 relative, 3e-5 absolute */
    grad_check("rope", rope_loss, &c, c.x, n, dx, 1000, 1e-2, 3e-4, 3e-5);
    /* rotate_half convention: out[i] = x[i] cos - x[i + hd/2] sin at position 5, pair 1 */
    int64_t t = 5, i = 1;
    float x1 = c.x[t * c.ld + i], x2 = c.x[t * c.ld + i + 4];
    double a = 5.0 * 0.1;
    assert_float_equal(c.out[t * c.ld + i], x1 * cos(a) - x2 * sin(a), 1e-6);
    assert_float_equal(c.out[t * c.ld + i + 4], x2 * cos(a) + x1 * sin(a), 1e-6);
    /* forward then backward gives the input back */
    memcpy(c.out, c.x, sizeof(float) * (size_t) n);
    rope_forward(c.out, c.cos, c.sin, c.T, c.nh, c.hd, c.ld);
    rope_backward(c.out, c.cos, c.sin, c.T, c.nh, c.hd, c.ld);
    for (int64_t k = 0; k < n; k++)
        assert_float_equal(c.out[k], c.x[k], 1e-6);
    free(c.x);
    free(c.out);
    free(c.r);
    free(c.cos);
    free(c.sin);
    free(dx);
}

static void test_llama_rope_llama3_scaling(void **state)
{
    (void) state;
    /* head_dim 8, theta 1e4: wavelengths 2 pi x {1, 10, 100, 1000}; with an original context
     * of 64 and factors 1 / 4 they are kept, smoothed, divided by 8, divided by 8 */
    struct rope_scaling rs = {ROPE_SCALING_LLAMA3, 8.0, 1.0, 4.0, 64};
    float inv[4];
    rope_inv_freq(inv, 8, 10000.0, &rs);
    double wl = 2 * M_PI / 0.1, smooth = (64.0 / wl - 1.0) / 3.0;
    double mid = (1 - smooth) * 0.1 / 8 + smooth * 0.1;
    assert_float_equal(inv[0], 1.0, 1e-7);
    assert_true(fabs(inv[1] - mid) < 1e-6 * mid);
    assert_true(fabs(inv[2] - 0.01 / 8) < 1e-6 * 0.01 / 8);
    assert_true(fabs(inv[3] - 0.001 / 8) < 1e-6 * 0.001 / 8);
}

struct att_ctx {
    float *qkv, *out, *probs, *r;
    int64_t len, T, H, KV, hd;
};

static double att_loss(void *p)
{
    struct att_ctx *c = p;
    attention_forward(c->out, c->probs, c->qkv, c->len, c->T, c->H, c->KV, c->hd, 0, c->KV);
    return wsum(c->out, c->r, c->T * c->H * c->hd);
}

static void test_llama_attention_grad(void **state)
{
    (void) state;
    /* GQA (4 query heads on 2 kv heads), 70 positions (two causal blocks), 61 real tokens */
    struct att_ctx c = {.len = 61, .T = 70, .H = 4, .KV = 2, .hd = 8};
    int64_t C = (c.H + 2 * c.KV) * c.hd, n = c.T * C, no = c.T * c.H * c.hd;
    c.qkv = falloc(n);
    c.out = falloc(no);
    c.probs = falloc(c.H * c.T * c.T);
    c.r = falloc(no);
    float *dqkv = falloc(n), *scratch = falloc(c.T * c.T);
    fill(c.qkv, n, -1.5, 1.5);
    fill(c.r, no, -1, 1);
    att_loss(&c);
    /* split the backward over the two kv heads as the model does */
    attention_backward(dqkv, scratch, c.r, c.qkv, c.probs, c.len, c.T, c.H, c.KV, c.hd, 0, 1);
    attention_backward(dqkv, scratch, c.r, c.qkv, c.probs, c.len, c.T, c.H, c.KV, c.hd, 1, 2);
    /* tolerance 2e-3 relative, 2e-4 absolute */
    grad_check("attention", att_loss, &c, c.qkv, n, dqkv, 1500, 1e-2, 2e-3, 2e-4);
    /* keys past len get no gradient from anyone */
    for (int64_t t = c.len; t < c.T; t++)
        for (int64_t i = c.H * c.hd; i < C; i++)
            assert_true(dqkv[t * C + i] == 0.0f);
    free(c.qkv);
    free(c.out);
    free(c.probs);
    free(c.r);
    free(dqkv);
    free(scratch);
}

static void test_llama_attention_matches_naive(void **state)
{
    (void) state;
    /* a direct softmax(q k^T / sqrt(hd) + mask) v in double, padding on the right */
    int64_t T = 67, H = 6, KV = 2, hd = 4, len = 50, C = (H + 2 * KV) * hd;
    float *qkv = falloc(T * C), *out = falloc(T * H * hd), *probs = falloc(H * T * T);
    fill(qkv, T * C, -2, 2);
    attention_forward(out, probs, qkv, len, T, H, KV, hd, 0, KV);
    double w[67];
    for (int64_t h = 0; h < H; h++) {
        int64_t g = h / (H / KV);
        for (int64_t t = 0; t < T; t++) {
            int64_t nk = t + 1 < len ? t + 1 : len;
            double m = -1e300, s = 0;
            for (int64_t j = 0; j < nk; j++) {
                double d = 0;
                for (int64_t i = 0; i < hd; i++)
                    d += (double) qkv[t * C + h * hd + i] * qkv[j * C + (H + g) * hd + i];
                w[j] = d / sqrt((double) hd);
                m = fmax(m, w[j]);
            }
            for (int64_t j = 0; j < nk; j++)
                s += (w[j] = exp(w[j] - m));
            for (int64_t i = 0; i < hd; i++) {
                double o = 0;
                for (int64_t j = 0; j < nk; j++)
                    o += w[j] / s * qkv[j * C + (H + KV + g) * hd + i];
                assert_true(fabs(out[t * H * hd + h * hd + i] - o) < 1e-5);
            }
        }
    }
    free(qkv);
    free(out);
    free(probs);
}

struct swiglu_ctx {
    float *gu, *h, *r;
    int64_t N, F;
};

static double swiglu_loss(void *p)
{
    struct swiglu_ctx *c = p;
    swiglu_forward(c->h, c->gu, c->N, c->F);
    return wsum(c->h, c->r, c->N * c->F);
}

static void test_llama_swiglu_grad(void **state)
{
    (void) state;
    struct swiglu_ctx c = {.N = 4, .F = 21};
    c.gu = falloc(c.N * 2 * c.F);
    c.h = falloc(c.N * c.F);
    c.r = falloc(c.N * c.F);
    float *dgu = falloc(c.N * 2 * c.F);
    fill(c.gu, c.N * 2 * c.F, -4, 4);
    fill(c.r, c.N * c.F, -1, 1);
    swiglu_backward(dgu, c.r, c.gu, c.N, c.F);
    /* tolerance 1e-3 relative, 1e-4 absolute */
    grad_check("swiglu", swiglu_loss, &c, c.gu, c.N * 2 * c.F, dgu, 1000, 1e-2, 1e-3, 1e-4);
    /* silu(g) * u as torch: g * sigmoid(g) * u */
    double g = c.gu[5], u = c.gu[c.F + 5];
    swiglu_loss(&c);
    assert_float_equal(c.h[5], g / (1 + exp(-g)) * u, 1e-6);
    free(c.gu);
    free(c.h);
    free(c.r);
    free(dgu);
}

struct ce_ctx {
    float *logits, *losses, *lse;
    int32_t targets[6];
    int64_t N, V;
    float dloss;
};

static double ce_loss(void *p)
{
    struct ce_ctx *c = p;
    crossentropy_forward(c->losses, c->lse, c->logits, c->targets, c->N, c->V);
    double s = 0;
    for (int64_t n = 0; n < c->N; n++)
        s += c->losses[n];
    return s * c->dloss;
}

static void test_llama_crossentropy_grad(void **state)
{
    (void) state;
    struct ce_ctx c = {.targets = {3, KERN_IGNORE_INDEX, 0, 40, KERN_IGNORE_INDEX, 17},
                       .N = 6,
                       .V = 41,
                       .dloss = 0.25f};
    int64_t n = c.N * c.V;
    c.logits = falloc(n);
    c.losses = falloc(c.N);
    c.lse = falloc(c.N);
    float *d = falloc(n), *fused_losses = falloc(c.N);
    fill(c.logits, n, -5, 5);
    ce_loss(&c);
    /* the fused kernel: the same losses, and the logits replaced by their gradient */
    memcpy(d, c.logits, sizeof(float) * (size_t) n);
    crossentropy_fused(fused_losses, d, c.targets, c.dloss, c.N, c.V);
    for (int64_t i = 0; i < c.N; i++)
        assert_float_equal(fused_losses[i], c.losses[i], 1e-5);
    /* tolerance 1e-3 relative, 5e-5 absolute */
    grad_check("crossentropy", ce_loss, &c, c.logits, n, d, 1000, 1e-2, 1e-3, 5e-5);
    /* ignored rows: no loss, no gradient */
    assert_true(c.losses[1] == 0.0f && c.losses[4] == 0.0f);
    for (int64_t v = 0; v < c.V; v++)
        assert_true(d[1 * c.V + v] == 0.0f);
    /* the loss is log-sum-exp minus the target logit */
    double s = 0;
    for (int64_t v = 0; v < c.V; v++)
        s += exp(c.logits[v]);
    assert_float_equal(c.losses[0], log(s) - c.logits[3], 1e-5);
    free(c.logits);
    free(c.losses);
    free(c.lse);
    free(d);
    free(fused_losses);
}

static void test_llama_expf_accuracy(void **state)
{
    (void) state;
    double worst = 0;
    for (double x = -87.0; x <= 88.0; x += 0.0137) {
        double e = exp((double) (float) x);
        double err = fabs(kern_expf((float) x) - e) / e;
        worst = fmax(worst, err);
    }
    assert_true(worst < 3e-7);
    assert_true(kern_expf(0.0f) == 1.0f);
    assert_true(kern_expf(-1000.0f) < 1e-37f && kern_expf(-1000.0f) >= 0.0f);
    assert_true(isfinite(kern_expf(1000.0f)));
}

/* relative error of a against b as a whole: ||a - b|| / ||b|| */
static double rel_err(const float *a, const float *b, int64_t n)
{
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d += ((double) a[i] - b[i]) * ((double) a[i] - b[i]);
        s += (double) b[i] * b[i];
    }
    return sqrt(d / (s > 0 ? s : 1));
}

/* ---- the whole model ---------------------------------------------------------------------- */

static struct model_config tiny_config(bool tied)
{
    struct model_config c = {0};
    snprintf(c.name, sizeof(c.name), "tiny");
    snprintf(c.architecture, sizeof(c.architecture), "LlamaForCausalLM");
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 4;
    c.vocab_size = 29;
    c.max_position_embeddings = 128;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.initializer_range = 0.3;
    c.rope_scaling = (struct rope_scaling){ROPE_SCALING_LLAMA3, 8.0, 1.0, 4.0, 16};
    c.tie_word_embeddings = tied;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.pad_token_id = -1;
    return c;
}

struct model_fixture {
    struct model_config cfg;
    struct llama m;
    struct llama_params p, g;
    struct llama_acts a;
    struct llama_work w;
    struct llama_batch b;
    int32_t *tokens, *labels, *lengths;
    float dloss;
};

static void model_setup(struct model_fixture *f, const struct model_config *cfg, int64_t B,
                        int64_t T, int nthreads, uint64_t seed)
{
    struct moai_err err = {0};
    memset(f, 0, sizeof(*f));
    f->cfg = *cfg;
    assert_int_equal(llama_init(&f->m, cfg, nthreads, &err), 0);
    assert_int_equal(llama_params_init(&f->p, cfg, NULL, &err), 0);
    assert_int_equal(llama_params_init(&f->g, cfg, NULL, &err), 0);
    assert_int_equal(llama_acts_init(&f->a, cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&f->w, cfg, B, T, nthreads, &err), 0);
    optim_init_params(f->m.pool, &f->p, cfg, seed);
    /* norms away from 1 so their gradients are exercised in general position */
    for (int64_t k = 0; k < llama_tensor_count(cfg); k++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &f->p, cfg, k);
        if (t.kind == MODEL_TENSOR_NORM)
            fill(t.data, t.numel, 0.7, 1.3);
    }
    f->tokens = calloc((size_t) (B * T), sizeof(int32_t));
    f->labels = calloc((size_t) (B * T), sizeof(int32_t));
    f->lengths = calloc((size_t) B, sizeof(int32_t));
    for (int64_t i = 0; i < B; i++) {
        f->lengths[i] = (int32_t) (T - 3 * i);
        for (int64_t t = 0; t < T; t++) {
            bool real = t < f->lengths[i];
            f->tokens[i * T + t] = real ? (int32_t) (urand() * (double) cfg->vocab_size) : 0;
            f->labels[i * T + t] = real && t >= 2 ? f->tokens[i * T + t] : KERN_IGNORE_INDEX;
        }
    }
    f->b = (struct llama_batch){B, T, f->tokens, f->labels, f->lengths, NULL};
    assert_int_equal(llama_batch_check(&f->m, &f->b, &err), 0);
    f->dloss = 1.0f / (float) llama_batch_targets(&f->b);
}

static void model_teardown(struct model_fixture *f)
{
    llama_work_release(&f->w);
    llama_acts_release(&f->a);
    llama_params_release(&f->g);
    llama_params_release(&f->p);
    llama_release(&f->m);
    free(f->tokens);
    free(f->labels);
    free(f->lengths);
}

static double model_loss(void *p)
{
    struct model_fixture *f = p;
    return llama_forward_backward(&f->m, &f->p, NULL, &f->a, &f->w, &f->b, f->dloss) * f->dloss;
}

/* Rebinds the fixture's activations and workspace to keep what `keep` says. */
static void model_keep(struct model_fixture *f, enum llama_keep keep)
{
    struct moai_err err = {0};
    struct llama_shape s = {.B = f->b.B,
                            .T = f->b.T,
                            .nlayers = f->cfg.num_hidden_layers,
                            .head = true,
                            .keep = keep,
                            .tp = 1,
                            .nthreads = f->m.nthreads};
    llama_acts_release(&f->a);
    llama_work_release(&f->w);
    assert_int_equal(llama_acts_bind_shape(&f->a, &f->cfg, &s, NULL, &err), 0);
    assert_int_equal(llama_work_bind_shape(&f->w, &f->cfg, &s, NULL, &err), 0);
}

static void model_grad_check_keep(bool tied, enum llama_keep keep)
{
    struct model_fixture f;
    struct model_config cfg = tiny_config(tied);
    model_setup(&f, &cfg, 2, 9, 1, 11);
    model_keep(&f, keep);
    llama_params_zero(&f.m, &f.g);
    llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
    /* every tensor, a spread of its entries: tolerance 1e-2 relative, 2e-4 absolute (the
     * mean loss is ~3.4 and its fp32 rounding ~1e-7 becomes ~1e-5 in a difference quotient) */
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t, gt;
        llama_tensor_at(&t, &f.p, &cfg, k);
        llama_tensor_at(&gt, &f.g, &cfg, k);
        grad_check(t.name, model_loss, &f, t.data, t.numel, gt.data, 24, 3e-3, 1e-2, 2e-4);
    }
    model_teardown(&f);
}

static void model_grad_check(bool tied)
{
    model_grad_check_keep(tied, LLAMA_KEEP_ALL);
}

static void test_llama_model_grad_untied(void **state)
{
    (void) state;
    model_grad_check(false);
}

/* Recomputation: the finite-difference check through the recomputing backwards, and the same
 * loss and gradients as keeping everything, bit for bit (the same operations run again), in
 * less memory. */
static void test_llama_recomputation(void **state)
{
    (void) state;
    model_grad_check_keep(false, LLAMA_KEEP_NO_PROBS);
    model_grad_check_keep(true, LLAMA_KEEP_INPUT);

    struct model_config cfg = tiny_config(false);
    struct model_fixture f;
    model_setup(&f, &cfg, 3, 12, 2, 9);
    llama_params_zero(&f.m, &f.g);
    double l0 = llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
    size_t all = f.a.bytes;
    float *g0 = falloc(f.g.nfloats);
    memcpy(g0, f.g.arena, llama_param_bytes(&cfg));
    for (int k = LLAMA_KEEP_NO_PROBS; k <= LLAMA_KEEP_INPUT; k++) {
        model_keep(&f, (enum llama_keep) k);
        assert_true(f.a.bytes < all);
        llama_params_zero(&f.m, &f.g);
        double l1 = llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
        assert_true(l0 == l1);
        assert_memory_equal(g0, f.g.arena, llama_param_bytes(&cfg));
    }
    free(g0);
    model_teardown(&f);
}

static void test_llama_model_grad_tied(void **state)
{
    (void) state;
    model_grad_check(true);
}

static void test_llama_threads_same_result(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(false);
    cfg.hidden_size = 64;
    cfg.head_dim = 16;
    cfg.intermediate_size = 96;
    cfg.vocab_size = 301;
    struct model_fixture f1, f3;
    rng_state = 12345;
    model_setup(&f1, &cfg, 3, 80, 1, 5);
    rng_state = 12345;
    model_setup(&f3, &cfg, 3, 80, 3, 5);
    assert_memory_equal(f1.p.arena, f3.p.arena, llama_param_bytes(&cfg));
    assert_memory_equal(f1.tokens, f3.tokens, sizeof(int32_t) * 240);
    llama_params_zero(&f1.m, &f1.g);
    llama_params_zero(&f3.m, &f3.g);
    double l1 = llama_forward_backward(&f1.m, &f1.p, &f1.g, &f1.a, &f1.w, &f1.b, f1.dloss);
    double l3 = llama_forward_backward(&f3.m, &f3.p, &f3.g, &f3.a, &f3.w, &f3.b, f3.dloss);
    /* 1 and 3 threads agree to rounding (see llama.h: an OpenBLAS kernel may sum a block of
     * rows in another order than the whole; fp32 sums of K <= 301 terms differ by up to about
     * K * 2^-24 relative, measured 2e-6 on the Haswell kernels), and a rerun with the same
     * threads is bit for bit */
    assert_true(fabs(l1 - l3) <= 1e-5 * fabs(l1));
    assert_true(rel_err(f3.g.arena, f1.g.arena, f1.g.nfloats) <= 1e-5);
    float *g3 = falloc(f3.g.nfloats);
    memcpy(g3, f3.g.arena, llama_param_bytes(&cfg));
    llama_params_zero(&f3.m, &f3.g);
    double again = llama_forward_backward(&f3.m, &f3.p, &f3.g, &f3.a, &f3.w, &f3.b, f3.dloss);
    assert_true(again == l3);
    assert_memory_equal(g3, f3.g.arena, llama_param_bytes(&cfg));
    free(g3);
    model_teardown(&f1);
    model_teardown(&f3);
}

static void test_llama_padding_invariance(void **state)
{
    (void) state;
    /* right padding: whatever the padded positions hold, loss and gradients are unchanged */
    struct model_config cfg = tiny_config(false);
    struct model_fixture f;
    model_setup(&f, &cfg, 3, 12, 2, 9);
    llama_params_zero(&f.m, &f.g);
    double l0 = llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
    float *g0 = falloc(f.g.nfloats);
    memcpy(g0, f.g.arena, llama_param_bytes(&cfg));
    for (int64_t i = 0; i < 3; i++)
        for (int64_t t = f.lengths[i]; t < 12; t++)
            f.tokens[i * 12 + t] = (int32_t) (7 + t);
    llama_params_zero(&f.m, &f.g);
    double l1 = llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
    assert_true(l0 == l1);
    assert_memory_equal(g0, f.g.arena, llama_param_bytes(&cfg));
    free(g0);
    model_teardown(&f);
}

static void test_llama_stages_match_whole(void **state)
{
    (void) state;
    /* two pipeline stages with workspaces of their own (embedding + layer 0; layer 1 + head),
     * the residual gradient handed from one to the other, give the whole model's results */
    struct model_config cfg = tiny_config(false);
    struct model_fixture f;
    struct moai_err err = {0};
    struct llama_work w1, w2;
    model_setup(&f, &cfg, 2, 10, 2, 21);
    llama_params_zero(&f.m, &f.g);
    double whole = llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, f.dloss);
    float *gw = falloc(f.g.nfloats);
    memcpy(gw, f.g.arena, llama_param_bytes(&cfg));

    assert_int_equal(llama_work_init(&w1, &cfg, 2, 10, 2, &err), 0);
    assert_int_equal(llama_work_init(&w2, &cfg, 2, 10, 2, &err), 0);
    llama_params_zero(&f.m, &f.g);
    llama_embed_forward(&f.m, &f.p, &f.a, &w1, &f.b);
    llama_layer_forward(&f.m, &f.p.layers[0], &f.a.layers[0], f.a.layers[1].x, &w1, &f.b);
    llama_set_targets(&w2, &f.b);
    llama_layer_forward(&f.m, &f.p.layers[1], &f.a.layers[1], f.a.xf, &w2, &f.b);
    double staged = llama_head_forward(&f.m, &f.p, &f.a, &w2, true, f.dloss);
    llama_head_backward(&f.m, &f.p, &f.g, &f.a, &w2);
    llama_layer_backward(&f.m, &f.p.layers[1], &f.g.layers[1], &f.a.layers[1], &w2, &f.b);
    memcpy(w1.dres, w2.dres, sizeof(float) * 2 * 10 * (size_t) cfg.hidden_size);
    llama_layer_backward(&f.m, &f.p.layers[0], &f.g.layers[0], &f.a.layers[0], &w1, &f.b);
    llama_embed_backward(&f.m, &f.g, &w1, &f.b);
    assert_true(staged == whole);
    assert_memory_equal(gw, f.g.arena, llama_param_bytes(&cfg));
    llama_work_release(&w1);
    llama_work_release(&w2);
    free(gw);
    model_teardown(&f);
}

static void test_llama_no_targets(void **state)
{
    (void) state;
    /* a batch whose labels are all -100 has loss 0 and no gradient */
    struct model_config cfg = tiny_config(true);
    struct model_fixture f;
    model_setup(&f, &cfg, 2, 6, 2, 4);
    for (int64_t i = 0; i < 12; i++)
        f.labels[i] = KERN_IGNORE_INDEX;
    assert_int_equal(llama_batch_targets(&f.b), 0);
    llama_params_zero(&f.m, &f.g);
    assert_true(llama_forward_backward(&f.m, &f.p, &f.g, &f.a, &f.w, &f.b, 1.0f) == 0.0);
    for (int64_t i = 0; i < f.g.nfloats; i++)
        assert_true(f.g.arena[i] == 0.0f);
    model_teardown(&f);
}

static void test_llama_layout_and_sizes(void **state)
{
    (void) state;
    struct moai_err err = {0};
    for (int tied = 0; tied < 2; tied++) {
        struct model_config cfg = tiny_config(tied);
        struct llama_params p;
        float *arena = aligned_alloc(64, (llama_param_bytes(&cfg) + 63) / 64 * 64);
        assert_int_equal(llama_params_init(&p, &cfg, arena, &err), 0);
        assert_false(p.owned);
        /* tensors follow one another in Hugging Face order without gaps */
        float *next = arena;
        int64_t total = 0;
        for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
            struct llama_tensor t;
            llama_tensor_at(&t, &p, &cfg, k);
            assert_ptr_equal(t.data, next);
            next += t.numel;
            total += t.numel;
        }
        assert_int_equal(total, llama_param_floats(&cfg));
        assert_int_equal(llama_tensor_count(&cfg), tied ? 20 : 21);
        assert_ptr_equal(p.lm_head, tied ? p.embed : p.norm + cfg.hidden_size);
        llama_params_release(&p);
        free(arena);
    }
    /* activation and workspace arenas are what the size functions say */
    struct model_config cfg = tiny_config(false);
    struct llama_acts a;
    struct llama_work w;
    assert_int_equal(llama_acts_init(&a, &cfg, 3, 10, &err), 0);
    assert_int_equal(llama_work_init(&w, &cfg, 3, 10, 2, &err), 0);
    assert_int_equal(a.bytes, llama_act_bytes(&cfg, 3, 10));
    assert_int_equal(w.bytes, llama_work_bytes(&cfg, 3, 10, 2));
    /* L layers, then xf and lnf (N D floats) and rstdf (N floats, padded to 64 bytes) */
    assert_int_equal(llama_act_bytes(&cfg, 3, 10),
                     2 * llama_layer_act_bytes(&cfg, 3, 10) + 2 * 30 * 16 * 4 + 128);
    assert_true(llama_work_bytes(&cfg, 3, 10, 2) >= 4 * 30 * 29);
    assert_true(llama_work_bytes(&cfg, 3, 10, 2) > llama_work_bytes(&cfg, 3, 10, 1));
    /* the largest kept buffer is right: B H T T probabilities per layer */
    assert_true(llama_layer_act_bytes(&cfg, 3, 10) >= 4 * 3 * 4 * 10 * 10);
    llama_acts_release(&a);
    llama_work_release(&w);
    /* or cut from the caller's arenas, which release leaves alone */
    void *am = aligned_alloc(64, llama_act_bytes(&cfg, 2, 7));
    void *wm = aligned_alloc(64, llama_work_bytes(&cfg, 2, 7, 1));
    assert_int_equal(llama_acts_bind(&a, &cfg, 2, 7, am, &err), 0);
    assert_int_equal(llama_work_bind(&w, &cfg, 2, 7, 1, wm, &err), 0);
    assert_false(a.owned || w.owned);
    assert_ptr_equal(a.layers[0].x, am);
    assert_true((char *) a.lnf + 2 * 7 * 16 * 4 <= (char *) am + a.bytes);
    assert_true((char *) w.dnorm_part >= (char *) wm &&
                (char *) w.dnorm_part + 16 * 4 <= (char *) wm + w.bytes);
    llama_acts_release(&a);
    llama_work_release(&w);
    free(am);
    free(wm);
}

static void test_llama_counts_match_config(void **state)
{
    (void) state;
    /* the model's arena and the planner's count agree for every shipped architecture */
    const char *names[] = {"llama2-7b", "llama2-13b", "llama2-70b",
                           "llama3-8b", "llama3-70b", "mistral-7b"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[128];
        struct model_config cfg;
        struct moai_err err = {0};
        snprintf(path, sizeof(path), "configs/models/%s/config.json", names[i]);
        if (model_config_load(&cfg, path, NULL, &err) < 0)
            fail_msg("%s", err.msg);
        assert_int_equal(llama_param_floats(&cfg), model_param_count(&cfg));
        int64_t sum = 0, layer0 = 0;
        for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
            struct llama_tensor t;
            llama_tensor_at(&t, NULL, &cfg, k);
            sum += t.numel;
            if (t.layer == 0)
                layer0 += t.numel;
        }
        assert_int_equal(sum, model_param_count(&cfg));
        assert_int_equal(layer0, model_layer_param_count(&cfg));
    }
    struct model_config tiny = tiny_config(true);
    assert_int_equal(llama_param_floats(&tiny), model_param_count(&tiny));
}

static void test_llama_tensor_names(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(false);
    struct llama_tensor t;
    llama_tensor_at(&t, NULL, &cfg, 0);
    assert_string_equal(t.name, "model.embed_tokens.weight");
    assert_int_equal(t.shape[0], 29);
    assert_int_equal(t.shape[1], 16);
    llama_tensor_at(&t, NULL, &cfg, 12);
    assert_string_equal(t.name, "model.layers.1.self_attn.k_proj.weight");
    assert_int_equal(t.ndim, 2);
    assert_int_equal(t.shape[0], 8);
    assert_int_equal(t.layer, 1);
    llama_tensor_at(&t, NULL, &cfg, 14);
    assert_string_equal(t.name, "model.layers.1.self_attn.o_proj.weight");
    assert_int_equal(t.shape[0], 16);
    assert_int_equal(t.shape[1], 16);
    llama_tensor_at(&t, NULL, &cfg, 18);
    assert_string_equal(t.name, "model.layers.1.mlp.down_proj.weight");
    assert_int_equal(t.shape[1], 24);
    llama_tensor_at(&t, NULL, &cfg, 19);
    assert_string_equal(t.name, "model.norm.weight");
    assert_int_equal(t.ndim, 1);
    assert_int_equal(t.kind, MODEL_TENSOR_NORM);
    llama_tensor_at(&t, NULL, &cfg, 20);
    assert_string_equal(t.name, "lm_head.weight");
}

static void test_llama_errors(void **state)
{
    (void) state;
    struct moai_err err = {0};
    struct llama m;
    struct model_config cfg = tiny_config(false);
    cfg.num_key_value_heads = 3;
    assert_int_equal(llama_init(&m, &cfg, 1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "model 'tiny': 'num_key_value_heads' (3) does not divide "
                                 "'num_attention_heads' (4)");
    cfg = tiny_config(false);
    cfg.head_dim = 5;
    assert_int_equal(llama_init(&m, &cfg, 1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "model 'tiny': 'head_dim' (5) is odd");
    cfg = tiny_config(false);
    cfg.hidden_size = 0;
    assert_int_equal(llama_init(&m, &cfg, 1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "model 'tiny': 'hidden_size' (0) is out of range");

    cfg = tiny_config(false);
    assert_int_equal(llama_init(&m, &cfg, 1, &err), 0);
    int32_t tokens[6] = {1, 2, 3, 4, 5, 6}, labels[6] = {1, 2, 3, -100, 5, 6}, lengths[2] = {3, 3};
    struct llama_batch b = {2, 3, tokens, labels, lengths, NULL};
    assert_int_equal(llama_batch_check(&m, &b, &err), 0);
    assert_int_equal(llama_batch_targets(&b), 4);
    tokens[4] = 29;
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    assert_string_equal(err.msg, "batch: sequence 1, position 1: token id 29 is outside the "
                                 "vocabulary [0, 29)");
    tokens[4] = 5;
    labels[2] = -1;
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    assert_string_equal(err.msg, "batch: sequence 0, position 2: label -1 is neither -100 nor in "
                                 "the vocabulary [0, 29)");
    labels[2] = 3;
    lengths[1] = 4;
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    assert_string_equal(err.msg, "batch: sequence 1: length 4 is outside [0, 3]");
    llama_release(&m);
}

/* ---- PyTorch reference ------------------------------------------------------------------- */

struct ref {
    json_t *root;
    float *data;
    size_t nfloats;
};

static void ref_load(struct ref *r, const char *name)
{
    char path[256];
    json_error_t jerr;
    snprintf(path, sizeof(path), "tests/data/ref/%s.json", name);
    r->root = json_load_file(path, 0, &jerr);
    if (!r->root)
        fail_msg("%s: %s", path, jerr.text);
    snprintf(path, sizeof(path), "tests/data/ref/%s.bin", name);
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    r->nfloats = (size_t) size / 4;
    r->data = malloc((size_t) size);
    assert_non_null(r->data);
    unsigned char *bytes = (unsigned char *) r->data;
    assert_int_equal(fread(bytes, 1, (size_t) size, fp), (size_t) size);
    fclose(fp);
    for (size_t i = 0; i < r->nfloats; i++) { /* little-endian on any host */
        uint32_t u = (uint32_t) bytes[4 * i] | (uint32_t) bytes[4 * i + 1] << 8 |
                     (uint32_t) bytes[4 * i + 2] << 16 | (uint32_t) bytes[4 * i + 3] << 24;
        memcpy(&r->data[i], &u, 4);
    }
}

static void ref_free(struct ref *r)
{
    json_decref(r->root);
    free(r->data);
}

static const float *ref_tensor(const struct ref *r, const char *name, int64_t numel)
{
    json_t *ts = json_object_get(r->root, "tensors"), *t;
    size_t i;
    json_array_foreach(ts, i, t)
    {
        if (strcmp(json_string_value(json_object_get(t, "name")), name))
            continue;
        int64_t n = 1;
        size_t j;
        json_t *d;
        json_array_foreach(json_object_get(t, "shape"), j, d) n *= json_integer_value(d);
        assert_int_equal(n, numel);
        int64_t off = json_integer_value(json_object_get(t, "offset"));
        assert_true((size_t) (off + n) <= r->nfloats);
        return r->data + off;
    }
    fail_msg("reference tensor '%s' is missing", name);
    return NULL;
}

static int32_t *ref_ints(json_t *arr)
{
    int32_t *v = calloc(json_array_size(arr) + 1, sizeof(int32_t));
    size_t i;
    json_t *x;
    json_array_foreach(arr, i, x) v[i] = (int32_t) json_integer_value(x);
    return v;
}

/* The model configuration of a fixture's "config" object. */
static struct model_config ref_config(json_t *jc, const char *name)
{
    struct model_config cfg = {0};
    snprintf(cfg.name, sizeof(cfg.name), "%s", name);
    cfg.hidden_size = json_integer_value(json_object_get(jc, "hidden_size"));
    cfg.intermediate_size = json_integer_value(json_object_get(jc, "intermediate_size"));
    cfg.num_hidden_layers = json_integer_value(json_object_get(jc, "num_hidden_layers"));
    cfg.num_attention_heads = json_integer_value(json_object_get(jc, "num_attention_heads"));
    cfg.num_key_value_heads = json_integer_value(json_object_get(jc, "num_key_value_heads"));
    cfg.head_dim = json_integer_value(json_object_get(jc, "head_dim"));
    cfg.vocab_size = json_integer_value(json_object_get(jc, "vocab_size"));
    cfg.rms_norm_eps = json_real_value(json_object_get(jc, "rms_norm_eps"));
    cfg.rope_theta = json_real_value(json_object_get(jc, "rope_theta"));
    cfg.tie_word_embeddings = json_is_true(json_object_get(jc, "tie_word_embeddings"));
    cfg.pad_token_id = json_integer_value(json_object_get(jc, "pad_token_id"));
    json_t *rs = json_object_get(jc, "rope_scaling");
    if (json_is_object(rs)) {
        cfg.rope_scaling.type = ROPE_SCALING_LLAMA3;
        cfg.rope_scaling.factor = json_real_value(json_object_get(rs, "factor"));
        cfg.rope_scaling.low_freq_factor = json_real_value(json_object_get(rs, "low_freq_factor"));
        cfg.rope_scaling.high_freq_factor =
            json_real_value(json_object_get(rs, "high_freq_factor"));
        cfg.rope_scaling.original_max_position_embeddings =
            json_integer_value(json_object_get(rs, "original_max_position_embeddings"));
    }
    return cfg;
}

/* The model against PyTorch's fp32 forward and backward: the loss within tol and every
 * gradient within gtol (relative; the 2-norm of the difference over the 2-norm); in fp32, or
 * with bf16 products (llama_set_bf16). */
static void ref_check_prec(const char *name, int nthreads, bool bf16, double tol, double gtol)
{
    struct ref r;
    struct moai_err err = {0};
    ref_load(&r, name);
    json_t *jb = json_object_get(r.root, "batch");
    struct model_config cfg = ref_config(json_object_get(r.root, "config"), name);
    int64_t B = json_integer_value(json_object_get(jb, "B"));
    int64_t T = json_integer_value(json_object_get(jb, "T"));
    int32_t *tokens = ref_ints(json_object_get(jb, "tokens"));
    int32_t *labels = ref_ints(json_object_get(jb, "labels"));
    int32_t *lengths = ref_ints(json_object_get(jb, "lengths"));

    struct llama m;
    struct llama_params p, g;
    struct llama_acts a;
    struct llama_work w;
    assert_int_equal(llama_init(&m, &cfg, nthreads, &err), 0);
    assert_int_equal(llama_set_bf16(&m, bf16), bf16);
    assert_int_equal(llama_params_init(&p, &cfg, NULL, &err), 0);
    assert_int_equal(llama_params_init(&g, &cfg, NULL, &err), 0);
    assert_int_equal(llama_acts_init(&a, &cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&w, &cfg, B, T, nthreads, &err), 0);
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &p, &cfg, k);
        memcpy(t.data, ref_tensor(&r, t.name, t.numel), sizeof(float) * (size_t) t.numel);
    }
    struct llama_batch b = {B, T, tokens, labels, lengths, NULL};
    assert_int_equal(llama_batch_check(&m, &b, &err), 0);
    int64_t count = llama_batch_targets(&b);
    assert_int_equal(count, json_integer_value(json_object_get(r.root, "targets")));
    double loss =
        llama_forward_backward(&m, &p, &g, &a, &w, &b, 1.0f / (float) count) / (double) count;
    double want = json_real_value(json_object_get(r.root, "loss"));
    if (!(fabs(loss - want) <= tol * fabs(want)))
        fail_msg("%s: loss %.9g differs from PyTorch's %.9g by more than %.3g (relative)", name,
                 loss, want, tol);
    double worst = 0.0;
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t;
        char gname[128];
        llama_tensor_at(&t, &g, &cfg, k);
        snprintf(gname, sizeof(gname), "grad.%s", t.name);
        double e = rel_err(t.data, ref_tensor(&r, gname, t.numel), t.numel);
        worst = e > worst ? e : worst;
        if (e > gtol)
            fail_msg("%s: gradient of '%s' differs from PyTorch's by %.3g (relative)", name, t.name,
                     e);
    }
    if (getenv("MOAI_GRAD_VERBOSE"))
        print_message("%s, %d threads%s: loss relative error %.2g, worst gradient %.2g\n", name,
                      nthreads, bf16 ? ", bf16" : "", fabs(loss - want) / fabs(want), worst);
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&g);
    llama_params_release(&p);
    llama_release(&m);
    free(tokens);
    free(labels);
    free(lengths);
    ref_free(&r);
}

/* fp32: loss and gradients within 1e-5 of PyTorch's */
static void ref_check(const char *name, int nthreads)
{
    ref_check_prec(name, nthreads, false, 1e-5, 1e-5);
}

static void test_llama_ref_gqa_untied_llama3(void **state)
{
    (void) state;
    ref_check("llama_gqa_untied", 1);
    ref_check("llama_gqa_untied", 2);
}

static void test_llama_ref_mha_tied(void **state)
{
    (void) state;
    ref_check("llama_mha_tied", 2);
}

/* ---- LoRA ------------------------------------------------------------------------------- */

/* A model fixture with adapters: p.layers[l].lora the adapters, the gradient g a frozen base
 * (every base tensor NULL) whose layers' lora are the adapters' gradients. */
struct lora_fixture {
    struct model_fixture f;
    struct lora_config lc;
    struct lora state;
    struct lora_params a, ga;
    struct llama_params g; /* the frozen base's gradient: tensors NULL */
};

static void lora_setup(struct lora_fixture *x, const struct model_config *cfg, int64_t B, int64_t T,
                       int nthreads, const struct lora_config *lc, bool nonzero_b)
{
    struct moai_err err = {0};
    model_setup(&x->f, cfg, B, T, nthreads, 5);
    x->lc = *lc;
    assert_int_equal(lora_params_init(&x->a, cfg, lc->rank, lc->targets, 0, NULL, &err), 0);
    assert_int_equal(lora_params_init(&x->ga, cfg, lc->rank, lc->targets, 0, NULL, &err), 0);
    lora_init_peft(&x->a, cfg, cfg, 0, lc->rank, lc->targets, lc->seed);
    if (nonzero_b)
        for (int64_t k = 0; k < lora_tensor_count(cfg, lc->targets); k++) {
            struct llama_tensor t;
            lora_tensor_at(&t, &x->a, cfg, lc->rank, lc->targets, k);
            if (strstr(t.name, "lora_B"))
                fill(t.data, t.numel, -0.4, 0.4);
        }
    assert_int_equal(lora_init(&x->state, cfg, lc, B, T, &err), 0);
    lora_attach(&x->f.m, &x->state);
    memset(&x->g, 0, sizeof(x->g));
    x->g.layers = calloc((size_t) cfg->num_hidden_layers, sizeof(struct llama_layer));
    assert_non_null(x->g.layers);
    x->g.nlayers = cfg->num_hidden_layers;
    for (int64_t l = 0; l < cfg->num_hidden_layers; l++) {
        x->f.p.layers[l].lora = &x->a.layers[l];
        x->g.layers[l].lora = &x->ga.layers[l];
    }
}

static void lora_teardown(struct lora_fixture *x)
{
    free(x->g.layers);
    lora_release(&x->state);
    lora_params_release(&x->ga);
    lora_params_release(&x->a);
    model_teardown(&x->f);
}

static double lora_loss_and_grads(struct lora_fixture *x)
{
    memset(x->ga.arena, 0, sizeof(float) * (size_t) x->ga.nfloats);
    return llama_forward_backward(&x->f.m, &x->f.p, &x->g, &x->f.a, &x->f.w, &x->f.b, x->f.dloss) *
           x->f.dloss;
}

static void lora_grad_check_one(const struct lora_config *lc, enum llama_keep keep, bool train)
{
    struct lora_fixture x;
    struct model_config cfg = tiny_config(false);
    lora_setup(&x, &cfg, 2, 9, 2, lc, true);
    model_keep(&x.f, keep);
    x.state.train = train;
    x.state.stream = 7;
    lora_loss_and_grads(&x);
    /* the base is frozen: only the adapters have gradients, and some are not zero */
    double norm = 0;
    for (int64_t i = 0; i < x.ga.nfloats; i++)
        norm += (double) x.ga.arena[i] * x.ga.arena[i];
    assert_true(norm > 1e-8);
    for (int64_t k = 0; k < lora_tensor_count(&cfg, lc->targets); k++) {
        struct llama_tensor t, gt;
        lora_tensor_at(&t, &x.a, &cfg, lc->rank, lc->targets, k);
        lora_tensor_at(&gt, &x.ga, &cfg, lc->rank, lc->targets, k);
        grad_check(t.name, model_loss, &x.f, t.data, t.numel, gt.data, 24, 3e-3, 1e-2, 2e-4);
    }
    lora_teardown(&x);
}

/* Finite differences of every adapter tensor through the whole model (a non-zero B), with and
 * without dropout (the mask is a function of the stream, so the loss is a function of the
 * adapters), keeping every activation or recomputing the layers. */
static void test_llama_lora_grad(void **state)
{
    (void) state;
    struct lora_config all = {3, 6.0, 0.0, MODEL_LORA_ALL, 13};
    struct lora_config some = {
        2, 5.0, 0.25, (1u << MODEL_LORA_wk) | (1u << MODEL_LORA_wo) | (1u << MODEL_LORA_w_up), 17};
    lora_grad_check_one(&all, LLAMA_KEEP_ALL, true);
    lora_grad_check_one(&some, LLAMA_KEEP_ALL, true);
    lora_grad_check_one(&some, LLAMA_KEEP_INPUT, true);
    lora_grad_check_one(&some, LLAMA_KEEP_NO_PROBS, false);
}

/* A fresh adapter (B zero) gives the base model's loss exactly, and its A the gradient zero
 * (dA = dt^T x with dt = s dy B = 0) while its B's is not. */
static void test_llama_lora_fresh_is_base(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(true);
    struct lora_config lc = {4, 8.0, 0.1, MODEL_LORA_ALL, 3};
    struct lora_fixture x;
    lora_setup(&x, &cfg, 2, 9, 2, &lc, false);
    x.state.train = true;
    double base = llama_forward_backward(&x.f.m, &x.f.p, NULL, &x.f.a, &x.f.w, &x.f.b, 1.0f);
    lora_attach(&x.f.m, NULL);
    double none = llama_forward_backward(&x.f.m, &x.f.p, NULL, &x.f.a, &x.f.w, &x.f.b, 1.0f);
    lora_attach(&x.f.m, &x.state);
    assert_true(base == none);
    lora_loss_and_grads(&x);
    double na = 0, nb = 0;
    for (int64_t k = 0; k < lora_tensor_count(&cfg, lc.targets); k++) {
        struct llama_tensor gt;
        lora_tensor_at(&gt, &x.ga, &cfg, lc.rank, lc.targets, k);
        for (int64_t i = 0; i < gt.numel; i++)
            *(strstr(gt.name, "lora_A") ? &na : &nb) += fabs(gt.data[i]);
    }
    assert_true(na == 0.0 && nb > 0.0);
    /* PEFT's init: A within +-1/sqrt(in), spread over it */
    const float *A = x.a.layers[1].lora_A[MODEL_LORA_w_down];
    double bound = 1.0 / sqrt((double) cfg.intermediate_size), lo = 0, hi = 0;
    for (int64_t i = 0; i < lc.rank * cfg.intermediate_size; i++) {
        assert_true(fabs(A[i]) < bound);
        lo = fmin(lo, A[i]);
        hi = fmax(hi, A[i]);
    }
    assert_true(lo < -0.8 * bound && hi > 0.8 * bound);
    lora_teardown(&x);
}

/* lora.merge: the merged model (W + (alpha / r) B A) gives the adapted model's loss, and its
 * weights differ from the base's by (alpha / r) B A only (targets; the other tensors equal). */
static void test_llama_lora_merge(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(false);
    struct lora_config lc = {3, 7.0, 0.0, (1u << MODEL_LORA_wk) | (1u << MODEL_LORA_w_down), 1};
    struct lora_fixture x;
    lora_setup(&x, &cfg, 2, 9, 2, &lc, true);
    double adapted = model_loss(&x.f);
    float *base = falloc(x.f.p.nfloats);
    memcpy(base, x.f.p.arena, sizeof(float) * (size_t) x.f.p.nfloats);
    lora_merge(&x.f.p, &x.a, &cfg, &lc);
    lora_attach(&x.f.m, NULL);
    double merged = model_loss(&x.f);
    assert_true(fabs(merged - adapted) <= 1e-5 * fabs(adapted));
    double s = lc.alpha / (double) lc.rank;
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &x.f.p, &cfg, k);
        const float *b0 = base + (t.data - x.f.p.arena);
        int tg = strstr(t.name, "k_proj")      ? MODEL_LORA_wk
                 : strstr(t.name, "down_proj") ? MODEL_LORA_w_down
                                               : -1;
        if (tg < 0) {
            assert_memory_equal(t.data, b0, sizeof(float) * (size_t) t.numel);
            continue;
        }
        const struct lora_layer *a = &x.a.layers[t.layer];
        int64_t out = t.shape[0], in = t.shape[1];
        for (int64_t i = 0; i < out; i++)
            for (int64_t j = 0; j < in; j++) {
                double ba = 0;
                for (int64_t q = 0; q < lc.rank; q++)
                    ba += (double) a->lora_B[tg][i * lc.rank + q] * a->lora_A[tg][q * in + j];
                double d = (double) t.data[i * in + j] - b0[i * in + j];
                assert_true(fabs(d - s * ba) <= 1e-6 * (1.0 + fabs(b0[i * in + j])));
            }
    }
    free(base);
    lora_teardown(&x);
}

/* Dropout: a training forward draws its mask from the step's stream (the same stream the same
 * loss, another stream another), evaluation uses none; two pipeline stages with workspaces of
 * their own give the whole model's loss and adapter gradients bit for bit, and micro-batches
 * of one sequence each (their tokens' masks) the same up to rounding. */
static void test_llama_lora_dropout_and_stages(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(false);
    struct lora_config lc = {4, 4.0, 0.3, MODEL_LORA_ALL, 8};
    struct lora_fixture x;
    struct moai_err err = {0};
    lora_setup(&x, &cfg, 2, 10, 2, &lc, true);
    double eval = model_loss(&x.f);
    x.state.train = true;
    x.state.stream = 1;
    double s1 = model_loss(&x.f), s1again = model_loss(&x.f);
    x.state.stream = 2;
    double s2 = model_loss(&x.f);
    assert_true(s1 == s1again);
    assert_true(s1 != s2 && s1 != eval && s2 != eval);
    x.state.train = false;
    assert_true(model_loss(&x.f) == eval);

    x.state.train = true;
    x.state.stream = 5;
    double whole = lora_loss_and_grads(&x);
    float *gw = falloc(x.ga.nfloats);
    memcpy(gw, x.ga.arena, sizeof(float) * (size_t) x.ga.nfloats);
    struct llama_work w1, w2;
    assert_int_equal(llama_work_init(&w1, &cfg, 2, 10, 2, &err), 0);
    assert_int_equal(llama_work_init(&w2, &cfg, 2, 10, 2, &err), 0);
    memset(x.ga.arena, 0, sizeof(float) * (size_t) x.ga.nfloats);
    struct llama_params *p = &x.f.p, *g = &x.g;
    struct llama_acts *a = &x.f.a;
    llama_embed_forward(&x.f.m, p, a, &w1, &x.f.b);
    llama_layer_forward(&x.f.m, &p->layers[0], &a->layers[0], a->layers[1].x, &w1, &x.f.b);
    llama_set_targets(&w2, &x.f.b);
    llama_layer_forward(&x.f.m, &p->layers[1], &a->layers[1], a->xf, &w2, &x.f.b);
    double staged = llama_head_forward(&x.f.m, p, a, &w2, true, x.f.dloss) * x.f.dloss;
    llama_head_backward(&x.f.m, p, g, a, &w2);
    llama_layer_backward(&x.f.m, &p->layers[1], &g->layers[1], &a->layers[1], &w2, &x.f.b);
    memcpy(w1.dres, w2.dres, sizeof(float) * 2 * 10 * (size_t) cfg.hidden_size);
    llama_layer_backward(&x.f.m, &p->layers[0], &g->layers[0], &a->layers[0], &w1, &x.f.b);
    llama_embed_backward(&x.f.m, g, &w1, &x.f.b);
    assert_true(staged == whole);
    assert_memory_equal(gw, x.ga.arena, sizeof(float) * (size_t) x.ga.nfloats);
    llama_work_release(&w1);
    llama_work_release(&w2);

    /* the two sequences as two micro-batches of one, each drawing its tokens' masks: the same
     * loss and gradients up to the order of the sums */
    struct llama_acts a1;
    struct llama_work w3;
    assert_int_equal(llama_acts_init(&a1, &cfg, 1, 10, &err), 0);
    assert_int_equal(llama_work_init(&w3, &cfg, 1, 10, 2, &err), 0);
    memset(x.ga.arena, 0, sizeof(float) * (size_t) x.ga.nfloats);
    double split = 0;
    for (int k = 0; k < 2; k++) {
        struct llama_batch bk = {
            1, 10, x.f.b.tokens + k * 10, x.f.b.labels + k * 10, x.f.b.lengths + k, NULL};
        x.state.first_token = k * 10;
        split += llama_forward_backward(&x.f.m, p, g, &a1, &w3, &bk, x.f.dloss) * x.f.dloss;
    }
    x.state.first_token = 0;
    assert_true(fabs(split - whole) <= 1e-5 * fabs(whole));
    assert_true(rel_err(x.ga.arena, gw, x.ga.nfloats) < 1e-5);
    llama_work_release(&w3);
    llama_acts_release(&a1);
    free(gw);
    lora_teardown(&x);
}

/* Adapter tensors: PEFT's names and shapes, in the arena's order without gaps. */
static void test_llama_lora_tensors(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(false);
    unsigned targets = (1u << MODEL_LORA_wq) | (1u << MODEL_LORA_w_down);
    struct lora_params a;
    struct moai_err err = {0};
    assert_int_equal(lora_params_init(&a, &cfg, 4, targets, 0, NULL, &err), 0);
    assert_int_equal(lora_tensor_count(&cfg, targets), 8);
    /* q (16 x 16): 4 x 16 + 16 x 4; down (16 x 24): 4 x 24 + 16 x 4; two layers */
    assert_int_equal(a.nfloats, 2 * (128 + 160));
    assert_int_equal(model_lora_layer_param_count(&cfg, 4, targets), 288);
    int64_t off = 0;
    for (int64_t k = 0; k < 8; k++) {
        struct llama_tensor t;
        lora_tensor_at(&t, &a, &cfg, 4, targets, k);
        assert_ptr_equal(t.data, a.arena + off);
        off += t.numel;
        if (k == 0) {
            assert_string_equal(t.name,
                                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
            assert_int_equal(t.shape[0], 4);
            assert_int_equal(t.shape[1], 16);
        }
        if (k == 7) {
            assert_string_equal(t.name,
                                "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight");
            assert_int_equal(t.shape[0], 16);
            assert_int_equal(t.shape[1], 4);
        }
    }
    assert_int_equal(off, a.nfloats);
    lora_params_release(&a);
}

/* LoRA against PyTorch (tests/ref/make_lora_ref.py): a model with non-zero adapters on every
 * target, the base frozen: the loss and every adapter gradient within 1e-5 relative, then 4
 * steps of clipping and AdamW on the adapters alone giving PyTorch's losses. */
static void test_llama_ref_lora(void **state)
{
    (void) state;
    struct ref r;
    struct moai_err err = {0};
    ref_load(&r, "lora_gqa");
    json_t *jb = json_object_get(r.root, "batch"), *jl = json_object_get(r.root, "lora");
    json_t *hp = json_object_get(r.root, "adamw");
    struct model_config cfg = ref_config(json_object_get(r.root, "config"), "lora_gqa");
    struct lora_config lc = {json_integer_value(json_object_get(jl, "r")),
                             json_real_value(json_object_get(jl, "lora_alpha")), 0.0,
                             MODEL_LORA_ALL, 0};
    int64_t B = json_integer_value(json_object_get(jb, "B"));
    int64_t T = json_integer_value(json_object_get(jb, "T"));
    int32_t *tokens = ref_ints(json_object_get(jb, "tokens"));
    int32_t *labels = ref_ints(json_object_get(jb, "labels"));
    int32_t *lengths = ref_ints(json_object_get(jb, "lengths"));
    struct llama m;
    struct llama_params p, g = {0};
    struct lora_params a, ga, m1, m2;
    struct llama_acts acts;
    struct llama_work w;
    struct lora st;
    int64_t L = cfg.num_hidden_layers;
    assert_int_equal(llama_init(&m, &cfg, 2, &err), 0);
    assert_int_equal(llama_params_init(&p, &cfg, NULL, &err), 0);
    struct lora_params *arenas[] = {&a, &ga, &m1, &m2};
    for (int i = 0; i < 4; i++)
        assert_int_equal(lora_params_init(arenas[i], &cfg, lc.rank, lc.targets, 0, NULL, &err), 0);
    assert_int_equal(llama_acts_init(&acts, &cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&w, &cfg, B, T, 2, &err), 0);
    assert_int_equal(lora_init(&st, &cfg, &lc, B, T, &err), 0);
    lora_attach(&m, &st);
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &p, &cfg, k);
        memcpy(t.data, ref_tensor(&r, t.name, t.numel), sizeof(float) * (size_t) t.numel);
    }
    for (int64_t k = 0; k < lora_tensor_count(&cfg, lc.targets); k++) {
        struct llama_tensor t;
        lora_tensor_at(&t, &a, &cfg, lc.rank, lc.targets, k);
        memcpy(t.data, ref_tensor(&r, t.name, t.numel), sizeof(float) * (size_t) t.numel);
    }
    g.layers = calloc((size_t) L, sizeof(struct llama_layer));
    assert_non_null(g.layers);
    for (int64_t l = 0; l < L; l++) {
        p.layers[l].lora = &a.layers[l];
        g.layers[l].lora = &ga.layers[l];
    }
    struct llama_batch b = {B, T, tokens, labels, lengths, NULL};
    assert_int_equal(llama_batch_check(&m, &b, &err), 0);
    int64_t count = llama_batch_targets(&b);
    double loss =
        llama_forward_backward(&m, &p, &g, &acts, &w, &b, 1.0f / (float) count) / (double) count;
    double want = json_real_value(json_object_get(r.root, "loss"));
    assert_true(fabs(loss - want) <= 1e-5 * fabs(want));
    for (int64_t k = 0; k < lora_tensor_count(&cfg, lc.targets); k++) {
        struct llama_tensor t;
        char gname[160];
        lora_tensor_at(&t, &ga, &cfg, lc.rank, lc.targets, k);
        snprintf(gname, sizeof(gname), "grad.%s", t.name);
        double e = rel_err(t.data, ref_tensor(&r, gname, t.numel), t.numel);
        if (e > 1e-5)
            fail_msg("gradient of '%s' differs from PyTorch's by %.3g (relative)", t.name, e);
    }

    /* the steps: loss, clip, AdamW (constant learning rate) on the adapters only */
    struct optim_adamw opt = {
        .lr = json_real_value(json_object_get(hp, "lr")),
        .beta1 = json_real_value(json_array_get(json_object_get(hp, "betas"), 0)),
        .beta2 = json_real_value(json_array_get(json_object_get(hp, "betas"), 1)),
        .eps = json_real_value(json_object_get(hp, "eps")),
        .weight_decay = json_real_value(json_object_get(hp, "weight_decay"))};
    json_t *steps = json_object_get(r.root, "step_losses");
    for (size_t step = 0; step < json_array_size(steps); step++) {
        memset(ga.arena, 0, sizeof(float) * (size_t) ga.nfloats);
        double l = llama_forward_backward(&m, &p, &g, &acts, &w, &b, 1.0f / (float) count) /
                   (double) count;
        double ls = json_real_value(json_array_get(steps, step));
        if (fabs(l - ls) > 1e-5 * fabs(ls))
            fail_msg("step %zu: loss %.7f, PyTorch's %.7f", step + 1, l, ls);
        optim_clip_grad_norm(m.pool, ga.arena, ga.nfloats,
                             json_real_value(json_object_get(hp, "clip")));
        optim_adamw_step(m.pool, a.arena, ga.arena, m1.arena, m2.arena, a.nfloats,
                         (int64_t) step + 1, &opt);
    }
    free(g.layers);
    lora_release(&st);
    llama_work_release(&w);
    llama_acts_release(&acts);
    for (int i = 0; i < 4; i++)
        lora_params_release(arenas[i]);
    llama_params_release(&p);
    llama_release(&m);
    free(tokens);
    free(labels);
    free(lengths);
    ref_free(&r);
}

/*
 * bf16 products (autocast's mixed precision) against PyTorch's fp32: each product rounds its
 * operands to 8 significant bits (2^-8 relative each), so a product is off by about 2^-8 of
 * its magnitude, the loss (an average over tokens) by less, and a gradient (a chain of
 * products, the norms' a reduction over every token) by a few times 2^-8. Measured
 * (MOAI_GRAD_VERBOSE=1): loss 6.5e-4 and 8e-5, worst gradient 2.0e-2 and 1.0e-2 (a norm
 * weight's); PyTorch's own autocast on the same weights and batches strays as far: loss
 * 3.7e-4 and 9.8e-5, worst gradient 2.9e-2 and 1.6e-2 (tests/ref/autocast_deviation.py).
 * Bounds 5e-3 and 8e-2 leave room for other cpus' orders. Skipped without AVX512_BF16 or with
 * MOAI_CPU_BF16=0 (products stay fp32, checked above).
 */
static void test_llama_ref_bf16(void **state)
{
    (void) state;
    if (!bf16_available())
        skip();
    ref_check_prec("llama_gqa_untied", 2, true, 5e-3, 8e-2);
    ref_check_prec("llama_mha_tied", 1, true, 5e-3, 8e-2);
}

/* With bf16 products every kernel's sums are cut by problem size only, so 1 and 3 threads
 * give the same loss and gradients bit for bit (fp32 agrees to rounding: OpenBLAS). */
static void test_llama_bf16_threads_bit_identical(void **state)
{
    (void) state;
    if (!bf16_available())
        skip();
    struct model_config cfg = tiny_config(false);
    cfg.hidden_size = 64;
    cfg.head_dim = 16;
    cfg.intermediate_size = 96;
    cfg.vocab_size = 301;
    struct model_fixture f1, f3;
    rng_state = 777;
    model_setup(&f1, &cfg, 3, 80, 1, 5);
    rng_state = 777;
    model_setup(&f3, &cfg, 3, 80, 3, 5);
    assert_true(llama_set_bf16(&f1.m, true));
    assert_true(llama_set_bf16(&f3.m, true));
    llama_params_zero(&f1.m, &f1.g);
    llama_params_zero(&f3.m, &f3.g);
    double l1 = llama_forward_backward(&f1.m, &f1.p, &f1.g, &f1.a, &f1.w, &f1.b, f1.dloss);
    double l3 = llama_forward_backward(&f3.m, &f3.p, &f3.g, &f3.a, &f3.w, &f3.b, f3.dloss);
    assert_true(l1 == l3);
    assert_memory_equal(f1.g.arena, f3.g.arena, llama_param_bytes(&cfg));
    /* and it is not the fp32 result: the products did run in bf16 */
    assert_false(llama_set_bf16(&f1.m, false));
    llama_params_zero(&f1.m, &f1.g);
    double l32 = llama_forward_backward(&f1.m, &f1.p, &f1.g, &f1.a, &f1.w, &f1.b, f1.dloss);
    assert_true(l32 != l1 && fabs(l32 - l1) <= 2e-2 * fabs(l32));
    model_teardown(&f1);
    model_teardown(&f3);
}

/* ---- sequence packing --------------------------------------------------------------------- */

struct patt_ctx {
    float *qkv, *out, *probs, *r;
    const int32_t *pos;
    int64_t len, T, H, KV, hd;
};

static double patt_loss(void *p)
{
    struct patt_ctx *c = p;
    attention_forward_packed(c->out, c->probs, c->qkv, c->pos, c->len, c->T, c->H, c->KV, c->hd, 0,
                             c->KV);
    return wsum(c->out, c->r, c->T * c->H * c->hd);
}

/* Positions of a packed row of examples of lens[0..k) tokens, then padding to T. */
static int64_t packed_positions(int32_t *pos, const int64_t *lens, int k, int64_t T)
{
    int64_t t = 0;
    for (int e = 0; e < k; e++)
        for (int64_t i = 0; i < lens[e]; i++)
            pos[t++] = (int32_t) i;
    int64_t len = t;
    for (; t < T; t++)
        pos[t] = (int32_t) (t - len);
    return len;
}

static void test_llama_attention_packed_grad(void **state)
{
    (void) state;
    /* examples of 70 (across a causal block), 5, 1 and 40 tokens, then 34 of padding; GQA */
    enum { T = 150 };
    const int64_t lens[4] = {70, 5, 1, 40};
    int32_t pos[T];
    struct patt_ctx c = {.T = T, .H = 4, .KV = 2, .hd = 8, .pos = pos};
    c.len = packed_positions(pos, lens, 4, T);
    int64_t C = (c.H + 2 * c.KV) * c.hd, n = c.T * C, no = c.T * c.H * c.hd;
    c.qkv = falloc(n);
    c.out = falloc(no);
    c.probs = falloc(c.H * c.T * c.T);
    c.r = falloc(no);
    float *dqkv = falloc(n), *scratch = falloc(c.T * c.T);
    fill(c.qkv, n, -1.5, 1.5);
    fill(c.r, no, -1, 1);
    patt_loss(&c);
    attention_backward_packed(dqkv, scratch, c.r, c.qkv, c.probs, pos, c.len, c.T, c.H, c.KV, c.hd,
                              0, 1);
    attention_backward_packed(dqkv, scratch, c.r, c.qkv, c.probs, pos, c.len, c.T, c.H, c.KV, c.hd,
                              1, 2);
    /* tolerance 2e-3 relative, 2e-4 absolute, as the unpacked attention's */
    grad_check("packed attention", patt_loss, &c, c.qkv, n, dqkv, 1500, 1e-2, 2e-3, 2e-4);
    /* the padding: zero output, no gradient */
    for (int64_t t = c.len; t < c.T; t++) {
        for (int64_t i = 0; i < c.H * c.hd; i++)
            assert_true(c.out[t * c.H * c.hd + i] == 0.0f);
        for (int64_t i = 0; i < C; i++)
            assert_true(dqkv[t * C + i] == 0.0f);
    }
    /* each example's output is that of the unpacked attention run on it alone */
    int64_t s0 = 0;
    for (int e = 0; e < 4; e++) {
        int64_t ne = lens[e];
        float *alone = falloc(ne * c.H * c.hd), *pa = falloc(c.H * ne * ne);
        attention_forward(alone, pa, c.qkv + s0 * C, ne, ne, c.H, c.KV, c.hd, 0, c.KV);
        assert_true(rel_err(c.out + s0 * c.H * c.hd, alone, ne * c.H * c.hd) < 1e-6);
        free(alone);
        free(pa);
        s0 += ne;
    }
    free(c.qkv);
    free(c.out);
    free(c.probs);
    free(c.r);
    free(dqkv);
    free(scratch);
}

static void test_llama_rope_positions(void **state)
{
    (void) state;
    /* rows rotated at positions 0 1 2 0 1 equal rows 0 1 2 and 0 1 rotated from 0 */
    enum { T = 5, HD = 8, LD = 16 };
    float inv[HD / 2], cs[T * HD / 2], sn[T * HD / 2], x[T * LD], y[T * LD];
    struct rope_scaling none = {0};
    const int32_t pos[T] = {0, 1, 2, 0, 1};
    rope_inv_freq(inv, HD, 10000.0, &none);
    rope_tables(cs, sn, inv, T, HD);
    fill(x, T * LD, -1, 1);
    memcpy(y, x, sizeof(x));
    rope_forward_at(x, cs, sn, pos, T, 2, HD, LD);
    rope_forward(y, cs, sn, 3, 2, HD, LD);
    rope_forward(y + 3 * LD, cs, sn, 2, 2, HD, LD);
    assert_memory_equal(x, y, sizeof(x));
    rope_backward_at(x, cs, sn, pos, T, 2, HD, LD);
    rope_backward(y, cs, sn, 3, 2, HD, LD);
    rope_backward(y + 3 * LD, cs, sn, 2, 2, HD, LD);
    assert_memory_equal(x, y, sizeof(x));
}

/* Examples of lens[e] tokens (T at most), each alone in a row of an unpacked batch, and packed
 * by data/pack.h into the rows of a second batch of the same T. */
struct packed_pair {
    struct model_fixture u; /* unpacked: one example per row */
    struct llama_batch pb;  /* packed */
    struct llama_acts pa;
    struct llama_work pw;
    int32_t *ptok, *plab, *ppos, *plen;
};

static void packed_pair_setup(struct packed_pair *pp, const struct model_config *cfg,
                              const int64_t *lens, int n, int64_t T, int nthreads,
                              enum llama_keep keep)
{
    struct moai_err err = {0};
    struct model_fixture *u = &pp->u;
    model_setup(u, cfg, n, T, nthreads, 17);
    /* the examples: lengths lens; a masked prompt of 2 tokens in every third */
    for (int e = 0; e < n; e++) {
        u->lengths[e] = (int32_t) lens[e];
        for (int64_t t = 0; t < T; t++) {
            bool real = t < lens[e];
            u->tokens[e * T + t] = real ? (int32_t) (urand() * (double) cfg->vocab_size) : 0;
            u->labels[e * T + t] =
                real && !(e % 3 == 0 && t < 2) ? u->tokens[e * T + t] : KERN_IGNORE_INDEX;
        }
    }
    int64_t order[16];
    for (int e = 0; e < n; e++)
        order[e] = e;
    struct packing p;
    assert_int_equal(pack_rows(&p, order, n, u->lengths, T, &err), 0);
    int64_t R = p.nrows;
    assert_true(R < n);
    pp->ptok = calloc((size_t) (R * T), sizeof(int32_t));
    pp->plab = calloc((size_t) (R * T), sizeof(int32_t));
    pp->ppos = calloc((size_t) (R * T), sizeof(int32_t));
    pp->plen = calloc((size_t) R, sizeof(int32_t));
    struct pack_source src = {T, u->tokens, u->labels, u->lengths, 0};
    for (int64_t r = 0; r < R; r++)
        pp->plen[r] = (int32_t) pack_row_fill(&p, r, &src, pp->ptok + r * T, pp->plab + r * T,
                                              pp->ppos + r * T);
    pack_release(&p);
    /* an example's first label as it would be unpacked (pack.h masks it): the model itself
     * must keep labels from crossing the boundary */
    for (int64_t i = 0; i < R * T; i++)
        if (pp->ppos[i] == 0 && i % T < pp->plen[i / T])
            pp->plab[i] = pp->ptok[i];
    pp->pb = (struct llama_batch){R, T, pp->ptok, pp->plab, pp->plen, pp->ppos};
    assert_int_equal(llama_batch_check(&u->m, &pp->pb, &err), 0);
    assert_int_equal(llama_batch_targets(&pp->pb), llama_batch_targets(&u->b));
    struct llama_shape s = {.B = R,
                            .T = T,
                            .nlayers = cfg->num_hidden_layers,
                            .head = true,
                            .keep = keep,
                            .tp = 1,
                            .nthreads = nthreads};
    assert_int_equal(llama_acts_bind_shape(&pp->pa, cfg, &s, NULL, &err), 0);
    assert_int_equal(llama_work_bind_shape(&pp->pw, cfg, &s, NULL, &err), 0);
    model_keep(u, keep);
}

static void packed_pair_teardown(struct packed_pair *pp)
{
    llama_acts_release(&pp->pa);
    llama_work_release(&pp->pw);
    free(pp->ptok);
    free(pp->plab);
    free(pp->ppos);
    free(pp->plen);
    model_teardown(&pp->u);
}

/* The same examples packed and unpacked: the same summed loss and the same gradients, to
 * rounding (the rows go through the matrix products in other groupings). */
static void packing_equivalence(int nthreads, enum llama_keep keep)
{
    struct model_config cfg = tiny_config(false);
    const int64_t lens[9] = {70, 30, 25, 12, 9, 4, 1, 2, 40};
    struct packed_pair pp;
    packed_pair_setup(&pp, &cfg, lens, 9, 80, nthreads, keep);
    struct model_fixture *u = &pp.u;
    llama_params_zero(&u->m, &u->g);
    double lu = llama_forward_backward(&u->m, &u->p, &u->g, &u->a, &u->w, &u->b, u->dloss);
    float *gu = falloc(u->g.nfloats);
    memcpy(gu, u->g.arena, llama_param_bytes(&cfg));
    llama_params_zero(&u->m, &u->g);
    double lp = llama_forward_backward(&u->m, &u->p, &u->g, &pp.pa, &pp.pw, &pp.pb, u->dloss);
    assert_true(fabs(lp - lu) <= 1e-5 * fabs(lu));
    assert_true(rel_err(u->g.arena, gu, u->g.nfloats) <= 1e-5);
    /* every tensor on its own too */
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor a, b;
        llama_tensor_at(&a, &u->g, &cfg, k);
        b = a;
        b.data = gu + (a.data - u->g.arena);
        if (rel_err(a.data, b.data, a.numel) > 1e-5)
            fail_msg("%s: packed and unpacked gradients differ by %g", a.name,
                     rel_err(a.data, b.data, a.numel));
    }
    free(gu);
    packed_pair_teardown(&pp);
}

static void test_llama_packing_equivalence(void **state)
{
    (void) state;
    packing_equivalence(1, LLAMA_KEEP_ALL);
    packing_equivalence(3, LLAMA_KEEP_ALL);
    packing_equivalence(2, LLAMA_KEEP_NO_PROBS);
    packing_equivalence(2, LLAMA_KEEP_INPUT);
}

static double packed_loss(void *p)
{
    struct packed_pair *pp = p;
    return llama_forward_backward(&pp->u.m, &pp->u.p, NULL, &pp->pa, &pp->pw, &pp->pb,
                                  pp->u.dloss) *
           pp->u.dloss;
}

/* The whole model's finite-difference check on packed rows. */
static void test_llama_packed_model_grad(void **state)
{
    (void) state;
    struct model_config cfg = tiny_config(true);
    const int64_t lens[5] = {5, 3, 1, 7, 4};
    struct packed_pair pp;
    packed_pair_setup(&pp, &cfg, lens, 5, 14, 1, LLAMA_KEEP_ALL);
    llama_params_zero(&pp.u.m, &pp.u.g);
    llama_forward_backward(&pp.u.m, &pp.u.p, &pp.u.g, &pp.pa, &pp.pw, &pp.pb, pp.u.dloss);
    /* tolerances of the unpacked model's check */
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t, gt;
        llama_tensor_at(&t, &pp.u.p, &cfg, k);
        llama_tensor_at(&gt, &pp.u.g, &cfg, k);
        grad_check(t.name, packed_loss, &pp, t.data, t.numel, gt.data, 24, 3e-3, 1e-2, 2e-4);
    }
    packed_pair_teardown(&pp);
}

static void test_llama_packed_batch_errors(void **state)
{
    (void) state;
    struct moai_err err = {0};
    struct model_config cfg = tiny_config(false);
    struct llama m;
    assert_int_equal(llama_init(&m, &cfg, 1, &err), 0);
    int32_t tokens[6] = {1, 2, 3, 4, 5, 0}, lengths[1] = {5};
    int32_t pos[6] = {0, 1, 0, 1, 3, 0};
    struct llama_batch b = {1, 6, tokens, NULL, lengths, pos};
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    assert_string_equal(err.msg, "batch: sequence 0, position 4: position id 3 neither starts an "
                                 "example (0) nor follows the previous token's");
    pos[4] = 2;
    assert_int_equal(llama_batch_check(&m, &b, &err), 0);
    pos[5] = 6; /* padding: any position in [0, T) */
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    pos[5] = 5;
    pos[0] = 1; /* a row starts an example */
    assert_int_equal(llama_batch_check(&m, &b, &err), MOAI_EIO);
    assert_string_equal(err.msg, "batch: sequence 0, position 0: position id 1 neither starts an "
                                 "example (0) nor follows the previous token's");
    llama_release(&m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_lora_grad),
        cmocka_unit_test(test_llama_lora_fresh_is_base),
        cmocka_unit_test(test_llama_lora_tensors),
        cmocka_unit_test(test_llama_lora_merge),
        cmocka_unit_test(test_llama_lora_dropout_and_stages),
        cmocka_unit_test(test_llama_ref_lora),
        cmocka_unit_test(test_llama_embedding_grad),
        cmocka_unit_test(test_llama_rmsnorm_grad),
        cmocka_unit_test(test_llama_rope_grad),
        cmocka_unit_test(test_llama_rope_llama3_scaling),
        cmocka_unit_test(test_llama_attention_grad),
        cmocka_unit_test(test_llama_attention_matches_naive),
        cmocka_unit_test(test_llama_swiglu_grad),
        cmocka_unit_test(test_llama_crossentropy_grad),
        cmocka_unit_test(test_llama_expf_accuracy),
        cmocka_unit_test(test_llama_model_grad_untied),
        cmocka_unit_test(test_llama_model_grad_tied),
        cmocka_unit_test(test_llama_recomputation),
        cmocka_unit_test(test_llama_threads_same_result),
        cmocka_unit_test(test_llama_padding_invariance),
        cmocka_unit_test(test_llama_stages_match_whole),
        cmocka_unit_test(test_llama_no_targets),
        cmocka_unit_test(test_llama_layout_and_sizes),
        cmocka_unit_test(test_llama_counts_match_config),
        cmocka_unit_test(test_llama_tensor_names),
        cmocka_unit_test(test_llama_errors),
        cmocka_unit_test(test_llama_ref_gqa_untied_llama3),
        cmocka_unit_test(test_llama_ref_mha_tied),
        cmocka_unit_test(test_llama_ref_bf16),
        cmocka_unit_test(test_llama_bf16_threads_bit_identical),
        cmocka_unit_test(test_llama_attention_packed_grad),
        cmocka_unit_test(test_llama_rope_positions),
        cmocka_unit_test(test_llama_packing_equivalence),
        cmocka_unit_test(test_llama_packed_model_grad),
        cmocka_unit_test(test_llama_packed_batch_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
