/* test_optim.c - AdamW and clipping against PyTorch, schedules, random init, bf16. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/llama.h"
#include "model/optim.h"
#include "model/pool.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the PyTorch fixture (tests/ref/make_llama_ref.py) ------------------------------------ */

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
    unsigned char *bytes = malloc((size_t) size);
    r->data = malloc((size_t) size);
    assert_non_null(bytes);
    assert_non_null(r->data);
    assert_int_equal(fread(bytes, 1, (size_t) size, fp), (size_t) size);
    fclose(fp);
    for (size_t i = 0; i < r->nfloats; i++) {
        uint32_t u = (uint32_t) bytes[4 * i] | (uint32_t) bytes[4 * i + 1] << 8 |
                     (uint32_t) bytes[4 * i + 2] << 16 | (uint32_t) bytes[4 * i + 3] << 24;
        memcpy(&r->data[i], &u, 4);
    }
    free(bytes);
}

static const float *ref_tensor(const struct ref *r, const char *name, int64_t numel)
{
    json_t *t;
    size_t i;
    json_array_foreach(json_object_get(r->root, "tensors"), i, t)
    {
        if (strcmp(json_string_value(json_object_get(t, "name")), name))
            continue;
        int64_t off = json_integer_value(json_object_get(t, "offset"));
        assert_int_equal(json_integer_value(json_array_get(json_object_get(t, "shape"), 0)), numel);
        assert_true((size_t) (off + numel) <= r->nfloats);
        return r->data + off;
    }
    fail_msg("reference tensor '%s' is missing", name);
    return NULL;
}

static void ref_free(struct ref *r)
{
    json_decref(r->root);
    free(r->data);
}

/* every element within rtol relative (atol absolute near zero) */
static void assert_close(const char *what, const float *a, const float *b, int64_t n, double rtol,
                         double atol)
{
    for (int64_t i = 0; i < n; i++)
        if (fabs((double) a[i] - b[i]) > atol + rtol * fabs((double) b[i]))
            fail_msg("%s: element %lld: %.9g, expected %.9g", what, (long long) i, a[i], b[i]);
}

static void test_optim_adamw_matches_torch(void **state)
{
    (void) state;
    struct ref r;
    ref_load(&r, "adamw");
    json_t *hp_json = json_object_get(r.root, "adamw");
    int64_t n = json_integer_value(json_object_get(r.root, "n"));
    struct optim_adamw hp = {
        .lr = json_real_value(json_object_get(hp_json, "lr")),
        .beta1 = json_real_value(json_array_get(json_object_get(hp_json, "betas"), 0)),
        .beta2 = json_real_value(json_array_get(json_object_get(hp_json, "betas"), 1)),
        .eps = json_real_value(json_object_get(hp_json, "eps")),
        .weight_decay = json_real_value(json_object_get(hp_json, "weight_decay")),
    };
    float *p = malloc(sizeof(float) * (size_t) n);
    float *m = calloc((size_t) n, sizeof(float)), *v = calloc((size_t) n, sizeof(float));
    memcpy(p, ref_tensor(&r, "p0", n), sizeof(float) * (size_t) n);
    for (int step = 1; step <= 3; step++) {
        char name[32];
        snprintf(name, sizeof(name), "grad%d", step);
        optim_adamw_update(p, ref_tensor(&r, name, n), m, v, n, step, &hp);
        /* PyTorch's fp32 operations in the same order: relative error 1e-6 */
        snprintf(name, sizeof(name), "exp_avg%d", step);
        assert_close(name, m, ref_tensor(&r, name, n), n, 1e-6, 1e-12);
        snprintf(name, sizeof(name), "exp_avg_sq%d", step);
        assert_close(name, v, ref_tensor(&r, name, n), n, 1e-6, 1e-12);
        snprintf(name, sizeof(name), "param%d", step);
        assert_close(name, p, ref_tensor(&r, name, n), n, 1e-6, 1e-9);
    }
    free(p);
    free(m);
    free(v);
    ref_free(&r);
}

static void test_optim_clip_matches_torch(void **state)
{
    (void) state;
    struct ref r;
    ref_load(&r, "adamw");
    float g[33];
    memcpy(g, ref_tensor(&r, "clip_before", 33), sizeof(g));
    double max_norm = json_real_value(json_object_get(r.root, "clip_max_norm"));
    double want = json_real_value(json_object_get(r.root, "clip_norm"));
    double norm = optim_clip_grad_norm(NULL, g, 33, max_norm);
    assert_true(fabs(norm - want) <= 1e-6 * want);
    assert_close("clip_after", g, ref_tensor(&r, "clip_after", 33), 33, 1e-6, 1e-9);
    ref_free(&r);
}

static void test_optim_adamw_first_step(void **state)
{
    (void) state;
    /* from zero moments, bias correction makes the first update lr * g / (|g| + eps) */
    float p[4] = {1.0f, -2.0f, 0.5f, 3.0f}, g[4] = {0.3f, -1e-3f, 5.0f, 0.0f};
    float m[4] = {0}, v[4] = {0};
    struct optim_adamw hp = {
        .lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.5};
    optim_adamw_update(p, g, m, v, 4, 1, &hp);
    double decay = 1.0 - 0.1 * 0.5;
    assert_float_equal(p[0], 1.0 * decay - 0.1, 1e-6);
    assert_float_equal(p[1], -2.0 * decay + 0.1, 1e-5);
    assert_float_equal(p[2], 0.5 * decay - 0.1, 1e-6);
    assert_float_equal(p[3], 3.0 * decay, 1e-6); /* no gradient: decay only */
    assert_float_equal(m[2], 0.5, 1e-6);
    assert_float_equal(v[2], 0.025, 1e-7);
}

static void fill(float *x, int64_t n, uint64_t seed)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = (float) ((double) (optim_rng(seed, 1, (uint64_t) i) >> 11) * 0x1p-53 - 0.5);
}

static void test_optim_threads_same_result(void **state)
{
    (void) state;
    /* an odd size, so chunks and the vector tails all occur */
    int64_t n = 3 * 65536 + 1237;
    float *p1 = malloc(sizeof(float) * (size_t) n), *p2 = malloc(sizeof(float) * (size_t) n);
    float *g = malloc(sizeof(float) * (size_t) n);
    float *m1 = calloc((size_t) n, 4), *v1 = calloc((size_t) n, 4);
    float *m2 = calloc((size_t) n, 4), *v2 = calloc((size_t) n, 4);
    struct pool *pool = pool_create(3);
    struct optim_adamw hp = {
        .lr = 1e-3, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = 0.1};
    fill(p1, n, 1);
    memcpy(p2, p1, sizeof(float) * (size_t) n);
    for (int step = 1; step <= 2; step++) {
        fill(g, n, 10 + (uint64_t) step);
        optim_adamw_update(p1, g, m1, v1, n, step, &hp);
        optim_adamw_step(pool, p2, g, m2, v2, n, step, &hp);
    }
    assert_memory_equal(p1, p2, sizeof(float) * (size_t) n);
    assert_memory_equal(v1, v2, sizeof(float) * (size_t) n);
    double a = optim_grad_norm(NULL, g, n), b = optim_grad_norm(pool, g, n);
    assert_true(a == b);
    double direct = 0;
    for (int64_t i = 0; i < n; i++)
        direct += (double) g[i] * g[i];
    assert_true(fabs(a - sqrt(direct)) <= 1e-12 * a);
    pool_free(pool);
    free(p1);
    free(p2);
    free(g);
    free(m1);
    free(v1);
    free(m2);
    free(v2);
}

static void test_optim_clip_rules(void **state)
{
    (void) state;
    float g[3] = {3.0f, 4.0f, 0.0f}, h[3];
    memcpy(h, g, sizeof(g));
    /* below the limit: untouched */
    assert_float_equal(optim_clip_grad_norm(NULL, g, 3, 10.0), 5.0, 1e-12);
    assert_memory_equal(g, h, sizeof(g));
    /* 0 disables */
    assert_float_equal(optim_clip_grad_norm(NULL, g, 3, 0.0), 5.0, 1e-12);
    assert_memory_equal(g, h, sizeof(g));
    /* above: scaled by max_norm / (norm + 1e-6) */
    assert_float_equal(optim_clip_grad_norm(NULL, g, 3, 1.0), 5.0, 1e-12);
    assert_float_equal(g[0], 3.0 / (5.0 + 1e-6), 1e-7);
    assert_float_equal(g[1], 4.0 / (5.0 + 1e-6), 1e-7);
}

/* The pooled helpers the trainer's step uses: the same results on 1 and 3 threads, a NaN or
 * infinity found wherever it is (first element, a chunk's tail, the scalar tail). */
static void test_optim_pooled_helpers(void **state)
{
    (void) state;
    const int64_t n = 100003;
    float *x = malloc(sizeof(float) * (size_t) n), *y = malloc(sizeof(float) * (size_t) n);
    assert_non_null(x);
    assert_non_null(y);
    struct pool *pool = pool_create(3);
    assert_non_null(pool);
    double want = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = (float) ((i * 7919) % 1001 - 500) / 256.0f;
        want += (double) x[i] * x[i];
    }
    double s1 = optim_sum_squares(NULL, x, n), s3 = optim_sum_squares(pool, x, n);
    assert_true(s1 == s3);
    assert_true(fabs(s1 - want) <= 1e-12 * want);
    assert_true(optim_grad_norm(pool, x, n) == sqrt(s1));
    assert_true(optim_all_finite(NULL, x, n) && optim_all_finite(pool, x, n));
    const int64_t at[] = {0, 15, 16, 390, n / 2, n - 17, n - 1};
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t k = 0; k < sizeof(at) / sizeof(at[0]); k++)
        for (size_t b = 0; b < 3; b++) {
            float keep = x[at[k]];
            x[at[k]] = bad[b];
            assert_false(optim_all_finite(pool, x, n));
            assert_false(optim_all_finite(NULL, x, n));
            x[at[k]] = keep;
        }
    memcpy(y, x, sizeof(float) * (size_t) n);
    optim_scale(pool, y, n, 0.25f);
    for (int64_t i = 0; i < n; i++)
        assert_true(y[i] == x[i] * 0.25f);
    optim_zero(pool, y, n);
    for (int64_t i = 0; i < n; i++)
        assert_true(y[i] == 0.0f);
    pool_free(pool);
    free(x);
    free(y);
}

static void test_optim_schedules(void **state)
{
    (void) state;
    const struct {
        enum optim_schedule s;
        int64_t step, warmup, total;
        double want;
    } cases[] = {
        {OPTIM_SCHEDULE_CONSTANT, 0, 0, 100, 1.0},
        {OPTIM_SCHEDULE_CONSTANT, 0, 10, 100, 0.0},
        {OPTIM_SCHEDULE_CONSTANT, 5, 10, 100, 0.5},
        {OPTIM_SCHEDULE_CONSTANT, 10, 10, 100, 1.0},
        {OPTIM_SCHEDULE_CONSTANT, 500, 10, 100, 1.0},
        {OPTIM_SCHEDULE_LINEAR, 0, 0, 100, 1.0},
        {OPTIM_SCHEDULE_LINEAR, 50, 0, 100, 0.5},
        {OPTIM_SCHEDULE_LINEAR, 5, 10, 110, 0.5},
        {OPTIM_SCHEDULE_LINEAR, 10, 10, 110, 1.0},
        {OPTIM_SCHEDULE_LINEAR, 60, 10, 110, 0.5},
        {OPTIM_SCHEDULE_LINEAR, 109, 10, 110, 0.01},
        {OPTIM_SCHEDULE_LINEAR, 110, 10, 110, 0.0},
        {OPTIM_SCHEDULE_LINEAR, 130, 10, 110, 0.0},
        {OPTIM_SCHEDULE_COSINE, 0, 10, 110, 0.0},
        {OPTIM_SCHEDULE_COSINE, 10, 10, 110, 1.0},
        {OPTIM_SCHEDULE_COSINE, 35, 10, 110, 0.8535533905932737},
        {OPTIM_SCHEDULE_COSINE, 60, 10, 110, 0.5},
        {OPTIM_SCHEDULE_COSINE, 85, 10, 110, 0.14644660940672627},
        {OPTIM_SCHEDULE_COSINE, 110, 10, 110, 0.0},
        {OPTIM_SCHEDULE_COSINE, 0, 0, 1, 1.0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        double f = optim_lr_factor(cases[i].s, cases[i].step, cases[i].warmup, cases[i].total);
        if (fabs(f - cases[i].want) > 1e-12)
            fail_msg("case %zu: factor %.17g, expected %.17g", i, f, cases[i].want);
    }
}

static void test_optim_rng_is_splitmix64(void **state)
{
    (void) state;
    /* seed 0, stream 0: splitmix64 from state 0, whose first outputs are published */
    assert_true(optim_rng(0, 0, 0) == 0xE220A8397B1DCDAFull);
    assert_true(optim_rng(0, 0, 1) == 0x6E789E6AA1B965F4ull);
    assert_true(optim_rng(0, 0, 2) == 0x06C45D188009454Full);
    assert_true(optim_rng(1, 0, 0) != optim_rng(0, 0, 0));
    assert_true(optim_rng(0, 1, 0) != optim_rng(0, 0, 0));
}

static struct model_config init_config(void)
{
    struct model_config c = {0};
    snprintf(c.name, sizeof(c.name), "init");
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.vocab_size = 1000;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.initializer_range = 0.02;
    c.pad_token_id = 3;
    return c;
}

static void test_optim_init_params(void **state)
{
    (void) state;
    struct moai_err err = {0};
    struct model_config cfg = init_config();
    struct llama_params a, b;
    struct pool *pool = pool_create(3);
    assert_int_equal(llama_params_init(&a, &cfg, NULL, &err), 0);
    assert_int_equal(llama_params_init(&b, &cfg, NULL, &err), 0);
    optim_init_params(NULL, &a, &cfg, 1234);
    optim_init_params(pool, &b, &cfg, 1234);
    /* independent of threads */
    assert_memory_equal(a.arena, b.arena, llama_param_bytes(&cfg));
    for (int64_t k = 0; k < llama_tensor_count(&cfg); k++) {
        struct llama_tensor t;
        llama_tensor_at(&t, &a, &cfg, k);
        if (t.kind == MODEL_TENSOR_NORM) {
            for (int64_t i = 0; i < t.numel; i++)
                assert_true(t.data[i] == 1.0f);
            continue;
        }
        double s = 0, s2 = 0;
        for (int64_t i = 0; i < t.numel; i++) {
            s += t.data[i];
            s2 += (double) t.data[i] * t.data[i];
        }
        double mean = s / (double) t.numel, sd = sqrt(s2 / (double) t.numel - mean * mean);
        /* normal(0, 0.02): within 5 standard errors */
        assert_true(fabs(mean) < 5 * 0.02 / sqrt((double) t.numel));
        assert_true(fabs(sd - 0.02) < 5 * 0.02 / sqrt(2.0 * (double) t.numel) + 1e-4);
        /* any slice is the stream's own elements: a shard initializes alone */
        float slice[7];
        optim_init_normal(slice, 101, 7, 0.02, 1234, (uint64_t) k);
        if (t.kind != MODEL_TENSOR_EMBEDDING)
            assert_memory_equal(slice, t.data + 101, sizeof(slice));
    }
    /* the pad token's embedding row is zero, its neighbours are not */
    for (int64_t i = 0; i < cfg.hidden_size; i++)
        assert_true(a.embed[3 * cfg.hidden_size + i] == 0.0f);
    assert_true(a.embed[2 * cfg.hidden_size] != 0.0f && a.embed[4 * cfg.hidden_size] != 0.0f);
    /* another seed, other weights */
    optim_init_params(NULL, &b, &cfg, 1235);
    assert_true(memcmp(a.layers[0].wq, b.layers[0].wq, 64) != 0);
    llama_params_release(&a);
    llama_params_release(&b);
    pool_free(pool);
}

static void test_optim_bf16(void **state)
{
    (void) state;
    const struct {
        uint32_t f32;
        uint16_t bf16;
    } cases[] = {
        {0x3F800000u, 0x3F80},                        /* 1 */
        {0x3F808000u, 0x3F80},                        /* 1 + 2^-8: a tie, to even (down) */
        {0x3F818000u, 0x3F82},                        /* 1 + 3 * 2^-8: a tie, to even (up) */
        {0x3F808001u, 0x3F81},                        /* just above the tie: up */
        {0x3F807FFFu, 0x3F80},                        /* just below: down */
        {0xBF808001u, 0xBF81},                        /* negative */
        {0x7F7FFFFFu, 0x7F80},                        /* FLT_MAX rounds to infinity */
        {0x7F800000u, 0x7F80},                        /* infinity */
        {0xFF800000u, 0xFF80}, {0x00000001u, 0x0000}, /* the smallest subnormal rounds to zero */
        {0x80000000u, 0x8000},                        /* -0 */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        float f;
        memcpy(&f, &cases[i].f32, 4);
        if (optim_bf16_from_f32(f) != cases[i].bf16)
            fail_msg("case %zu: 0x%08x -> 0x%04x, expected 0x%04x", i, cases[i].f32,
                     optim_bf16_from_f32(f), cases[i].bf16);
    }
    /* NaN stays NaN (quiet), with its sign */
    float nan_f = -NAN;
    uint16_t b = optim_bf16_from_f32(nan_f);
    assert_true(isnan(optim_f32_from_bf16(b)) && (b & 0x8000));
    uint32_t snan = 0x7F800001u; /* a signalling NaN whose payload would truncate to inf */
    memcpy(&nan_f, &snan, 4);
    assert_true(isnan(optim_f32_from_bf16(optim_bf16_from_f32(nan_f))));
    /* bf16 -> f32 -> bf16 is exact for every finite value */
    for (uint32_t u = 0; u < 0x10000u; u++) {
        uint16_t x = (uint16_t) u;
        float f = optim_f32_from_bf16(x);
        if (isfinite(f))
            assert_int_equal(optim_bf16_from_f32(f), x);
    }
    float src[3] = {1.0f, -2.5f, 3.14159f}, back[3];
    uint16_t dst[3];
    optim_f32_to_bf16(dst, src, 3);
    optim_bf16_to_f32(back, dst, 3);
    assert_true(back[0] == 1.0f && back[1] == -2.5f);
    assert_float_equal(back[2], 3.140625, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_optim_adamw_matches_torch),
        cmocka_unit_test(test_optim_clip_matches_torch),
        cmocka_unit_test(test_optim_adamw_first_step),
        cmocka_unit_test(test_optim_threads_same_result),
        cmocka_unit_test(test_optim_clip_rules),
        cmocka_unit_test(test_optim_pooled_helpers),
        cmocka_unit_test(test_optim_schedules),
        cmocka_unit_test(test_optim_rng_is_splitmix64),
        cmocka_unit_test(test_optim_init_params),
        cmocka_unit_test(test_optim_bf16),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
