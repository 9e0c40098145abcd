/* test_train.c - every parallel layout trains to the same losses as one device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "data/pack.h"
#include "exec/lora_dev.h"
#include "exec/train.h"
#include "model/lora.h"
#include "model/bf16.h"
#include "model/optim.h"
#include "plan/mem.h"
#include "plan/plan.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NREC  64
#define SEQ   16
#define STEPS 6

struct fixture {
    struct model_config cfg, untied;
    float *init_untied;
    int32_t tokens[NREC * SEQ], labels[NREC * SEQ], lengths[NREC];
    float *init;
};

static struct fixture fx;

static void batch_rows(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    int64_t batch = *(const int64_t *) arg;
    for (int64_t i = 0; i < batch; i++) /* a different slice each step and epoch */
        rows[i] = (epoch * 7 + index * batch + i * 3) % NREC;
}

static int setup(void **state)
{
    (void) state;
    struct moai_err err = {0};
    /* 4 layers (pp 4), 4 heads over 2 kv heads (tp 4 replicates kv heads), a vocabulary of
     * 42 (tp 4: shards of 11 rows, the last with 9) */
    for (int tied = 0; tied < 2; tied++) {
        json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:b, s:i}", "hidden_size", 32,
                              "intermediate_size", 48, "num_hidden_layers", 4,
                              "num_attention_heads", 4, "num_key_value_heads", 2, "vocab_size", 42,
                              "tie_word_embeddings", tied, "pad_token_id", 3);
        assert_int_equal(model_config_load(tied ? &fx.cfg : &fx.untied, NULL, o, &err), 0);
        json_decref(o);
    }
    uint64_t s = 12345;
    for (int r = 0; r < NREC; r++) {
        int len = 6 + r % (SEQ - 6);
        fx.lengths[r] = len;
        for (int t = 0; t < SEQ; t++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            int id = 4 + (int) ((s >> 33) % 36);
            fx.tokens[r * SEQ + t] = t < len ? id : 3;
            fx.labels[r * SEQ + t] = t < len && !(r % 5 == 0 && t < 3) ? id : -100;
        }
    }
    for (int tied = 0; tied < 2; tied++) {
        const struct model_config *cfg = tied ? &fx.cfg : &fx.untied;
        float **init = tied ? &fx.init : &fx.init_untied;
        struct llama_params p;
        assert_int_equal(llama_params_init(&p, cfg, NULL, &err), 0);
        optim_init_params(NULL, &p, cfg, 7);
        *init = malloc((size_t) p.nfloats * sizeof(float));
        memcpy(*init, p.arena, (size_t) p.nfloats * sizeof(float));
        llama_params_release(&p);
    }
    return 0;
}

static int teardown(void **state)
{
    (void) state;
    free(fx.init);
    free(fx.init_untied);
    return 0;
}

/* A checkpoint kept in memory by the save callback. */
struct snapshot {
    int64_t P; /* floats of the model saved */
    int64_t steps_done;
    float *params, *m, *v;
    int saves;
};

static int snapshot_save(void *arg, int64_t steps_done, const float *params, const float *m,
                         const float *v, struct moai_err *err)
{
    (void) err;
    struct snapshot *s = arg;
    int64_t P = s->P;
    if (s->saves++ > 0) /* keep the first (the mid-run) one */
        return 0;
    s->steps_done = steps_done;
    s->params = malloc((size_t) P * sizeof(float));
    s->m = malloc((size_t) P * sizeof(float));
    s->v = malloc((size_t) P * sizeof(float));
    memcpy(s->params, params, (size_t) P * sizeof(float));
    memcpy(s->m, m, (size_t) P * sizeof(float));
    memcpy(s->v, v, (size_t) P * sizeof(float));
    return 0;
}

static struct snapshot *snap_in, *snap_out;
static const char *extra_training = "";
/* LoRA: the recipe's mapping ("" for full fine-tuning) and the adapters it starts from */
static const struct lora_config test_lora = {4, 8.0, 0.1, MODEL_LORA_ALL, 7};
static bool with_lora;
static const char *precision = "fp32"; /* LoRA bf16: the frozen base held in bf16 */

/* A layout of the tests: dp x pp x tp, micro-batches, recomputation, sharding, model. */
struct lay {
    int dp, pp, tp, nmb;
    enum recompute rc;
    bool zero2, zero3, untied;
};

/* Each device's peak of the last run (train_result.peak_bytes points here). */
static int64_t peaks[64];

/* Trains STEPS steps of a batch of 8 under a layout; fills losses. */
static int train_lay(const struct lay *l, int64_t capacity, double *losses,
                     struct train_result *res, struct moai_err *err)
{
    char text[512];
    struct recipe r;
    int ndev = l->dp * l->pp * l->tp;
    snprintf(
        text, sizeof(text),
        "model: {path: m}\ndataset: {path: d}\n"
        "training: {batch_size: 8, block_size: %d, precision: %s, lr: 1.0e-2,"
        " lr_schedule: cosine, warmup_steps: 2, weight_decay: 0.1, grad_clip: 0.5, seed: 7%s}\n"
        "flavor: {device: cpu, devices: %d, memory_gb: %g}\n%s",
        SEQ, precision, extra_training, ndev, (double) capacity / 1073741824.0,
        with_lora ? "lora: {rank: 4, alpha: 8.0, dropout: 0.1}\n" : "");
    assert_int_equal(recipe_load_string(&r, text, strlen(text), "t.yaml", NULL, err), 0);
    int64_t batch = 8;
    const struct model_config *cfg = l->untied ? &fx.untied : &fx.cfg;
    struct lora_params a[3] = {{0}};
    if (snap_out)
        snap_out->P = with_lora ? lora_param_floats(cfg, test_lora.rank, test_lora.targets)
                                : model_param_count(cfg);
    struct train_job job = {
        .recipe = &r,
        .cfg = l->untied ? &fx.untied : &fx.cfg,
        .layout = {.dp = l->dp,
                   .pp = l->pp,
                   .tp = l->tp,
                   .num_micro_batches = l->nmb,
                   .batch_per_device = 8 / l->dp / l->nmb,
                   .recomputation = l->rc,
                   .distribute_param = l->zero2,
                   .distribute_low_prec_param = l->zero3},
        .train =
            {.n = NREC, .T = SEQ, .tokens = fx.tokens, .labels = fx.labels, .lengths = fx.lengths},
        .batch_rows = batch_rows,
        .batch_arg = &batch,
        .steps_per_epoch = 4,
        .total_steps = STEPS,
        .init_params = l->untied ? fx.init_untied : fx.init,
        .quiet = true,
        .step_losses = losses,
        .peak_bytes = peaks,
        .save = snap_out ? snapshot_save : NULL,
        .save_arg = snap_out,
    };
    if (with_lora) { /* PEFT's fresh adapters, or the snapshot's adapters and moments */
        const float *from[3] = {NULL, NULL, NULL};
        if (snap_in) {
            from[0] = snap_in->params;
            from[1] = snap_in->m;
            from[2] = snap_in->v;
        }
        for (int k = 0; k < 3; k++)
            assert_int_equal(lora_params_init(&a[k], cfg, test_lora.rank, test_lora.targets, 0,
                                              (float *) from[k], err),
                             0);
        if (!snap_in)
            lora_init_peft(&a[0], cfg, cfg, 0, test_lora.rank, test_lora.targets, 7);
        job.lora_init = &a[0];
        job.lora_m = snap_in ? &a[1] : NULL;
        job.lora_v = snap_in ? &a[2] : NULL;
    }
    if (snap_in) {
        job.start_step = snap_in->steps_done;
        if (!with_lora) {
            job.init_params = snap_in->params;
            job.init_m = snap_in->m;
            job.init_v = snap_in->v;
        }
    }
    int rc = exec_train(&job, res, err);
    for (int k = 0; k < 3; k++)
        lora_params_release(&a[k]);
    recipe_release(&r);
    return rc;
}

static int train(int dp, int nmb, bool zero2, bool zero3, int64_t capacity, double *losses,
                 struct train_result *res, struct moai_err *err)
{
    struct lay l = {dp, 1, 1, nmb, RECOMPUTE_NONE, zero2, zero3, false};
    return train_lay(&l, capacity, losses, res, err);
}

static void test_train_layouts_match_one_device(void **state)
{
    (void) state;
    static const struct {
        int dp, nmb;
        bool zero2, zero3;
    } layouts[] = {
        {2, 1, false, false}, {4, 1, false, false}, {2, 2, false, false}, {2, 1, true, false},
        {4, 2, true, false},  {2, 1, true, true},   {4, 1, true, true},   {1, 2, false, false},
    };
    double ref[STEPS], got[STEPS];
    struct train_result res;
    struct moai_err err = {0};

    assert_int_equal(train(1, 1, false, false, 1 << 30, ref, &res, &err), 0);
    assert_true(ref[STEPS - 1] < ref[0]); /* it learns */
    for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++) {
        memset(&err, 0, sizeof(err));
        assert_int_equal(train(layouts[i].dp, layouts[i].nmb, layouts[i].zero2, layouts[i].zero3,
                               1 << 30, got, &res, &err),
                         0);
        for (int s = 0; s < STEPS; s++) {
            double rel = fabs(got[s] - ref[s]) / fabs(ref[s]);
            if (getenv("SHOW"))
                fprintf(stderr, "dp %d mb %d z2 %d z3 %d step %d rel %.3g loss %.6f\n",
                        layouts[i].dp, layouts[i].nmb, layouts[i].zero2, layouts[i].zero3, s + 1,
                        rel, got[s]);
            if (rel > 1e-5) {
                print_error("dp %d mb %d zero2 %d zero3 %d step %d: %.9g vs %.9g (rel %.3g)\n",
                            layouts[i].dp, layouts[i].nmb, layouts[i].zero2, layouts[i].zero3,
                            s + 1, got[s], ref[s], rel);
                fail();
            }
        }
    }
}

/* How close a layout's losses must be to one device's (relative, every step). */
static double layout_tol = 1e-5;

/* Losses of layout l against one device's, within layout_tol relative at every step. */
static void expect_same_losses(const struct lay *l, const double *ref)
{
    double got[STEPS], worst = 0;
    struct train_result res;
    struct moai_err err = {0};
    int rc = train_lay(l, 1 << 30, got, &res, &err);
    if (rc != 0) {
        print_error("dp %d pp %d tp %d: %s\n", l->dp, l->pp, l->tp, err.msg);
        fail();
    }
    for (int s = 0; s < STEPS; s++) {
        double rel = fabs(got[s] - ref[s]) / fabs(ref[s]);
        worst = rel > worst ? rel : worst;
        if (rel > layout_tol) {
            print_error("dp %d pp %d tp %d mb %d rc %d z2 %d z3 %d untied %d step %d: %.9g vs "
                        "%.9g (rel %.3g)\n",
                        l->dp, l->pp, l->tp, l->nmb, (int) l->rc, l->zero2, l->zero3, l->untied,
                        s + 1, got[s], ref[s], rel);
            fail();
        }
    }
    if (getenv("SHOW"))
        fprintf(stderr, "dp %d pp %d tp %d mb %d rc %d z2 %d z3 %d untied %d: worst rel %.3g\n",
                l->dp, l->pp, l->tp, l->nmb, (int) l->rc, l->zero2, l->zero3, l->untied, worst);
}

static void test_train_model_parallel_matches_one_device(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 2, 1, 1, RECOMPUTE_NONE, false, false, false},
        {1, 2, 1, 4, RECOMPUTE_NONE, false, false, false},
        {1, 4, 1, 4, RECOMPUTE_NONE, false, false, false},
        {1, 4, 1, 2, RECOMPUTE_NONE, false, false, false},
        {1, 1, 2, 1, RECOMPUTE_NONE, false, false, false},
        {1, 1, 4, 2, RECOMPUTE_NONE, false, false, false}, /* kv heads replicated */
        {2, 2, 2, 2, RECOMPUTE_NONE, false, false, false},
        {1, 1, 1, 2, RECOMPUTE_SELECTIVE, false, false, false},
        {1, 1, 1, 1, RECOMPUTE_FULL, false, false, false},
        {1, 2, 2, 2, RECOMPUTE_SELECTIVE, false, false, false},
        {1, 2, 2, 4, RECOMPUTE_FULL, false, false, false},
        {2, 2, 1, 2, RECOMPUTE_NONE, true, false, false},
        {2, 1, 2, 2, RECOMPUTE_FULL, true, true, false},
        {2, 2, 2, 1, RECOMPUTE_SELECTIVE, true, true, false},
        {1, 2, 1, 2, RECOMPUTE_NONE, false, false, true},
        {1, 1, 4, 1, RECOMPUTE_NONE, false, false, true},
        {2, 2, 2, 2, RECOMPUTE_FULL, true, true, true},
    };
    double ref[2][STEPS];
    struct train_result res;
    struct moai_err err = {0};
    for (int u = 0; u < 2; u++) {
        struct lay one = {1, 1, 1, 1, RECOMPUTE_NONE, false, false, u == 1};
        assert_int_equal(train_lay(&one, 1 << 30, ref[u], &res, &err), 0);
        assert_true(ref[u][STEPS - 1] < ref[u][0]);
    }
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++)
        expect_same_losses(&lays[i], ref[lays[i].untied]);
}

/* Every device's measured peak is what layout/shard.h says it allocates. */
static void test_train_model_parallel_memory_is_exact(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 4, 1, 4, RECOMPUTE_NONE, false, false, false},
        {2, 2, 2, 2, RECOMPUTE_SELECTIVE, true, true, true},
        {1, 2, 2, 2, RECOMPUTE_FULL, true, false, false},
    };
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++) {
        double losses[STEPS];
        struct train_result res;
        struct moai_err err = {0};
        const struct lay *l = &lays[i];
        struct layout el = {l->dp, l->pp,    l->tp,   l->nmb, 8 / l->dp / l->nmb,
                            l->rc, l->zero2, l->zero3};
        assert_int_equal(train_lay(l, 1 << 30, losses, &res, &err), 0);
        for (int d = 0; d < res.ndev; d++) {
            struct shard s;
            struct shard_bytes b;
            assert_int_equal(shard_init(&s, l->untied ? &fx.untied : &fx.cfg, &el, SEQ,
                                        shard_cpu_threads(res.ndev), d, &err),
                             0);
            shard_bytes(&s, &b);
            shard_release(&s);
            assert_int_equal(res.peak_bytes[d], b.total);
        }
    }
}

/* training.precision bf16: every device's measured peak is still what layout/shard.h says
 * (bf16 operands live in the products' panels on the stack, no arena changes), and the
 * losses follow fp32's: within 2e-3 relative over the steps (bf16 rounds each product's
 * operands to 8 significant bits, 2^-8 relative; measured 1e-4 on both layouts, SHOW=1), and
 * differ from them where the cpu runs bf16 products (they did run). */
static void test_train_bf16_memory_is_exact_losses_close(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 1, 1, 1, RECOMPUTE_NONE, false, false, false},
        {2, 2, 2, 1, RECOMPUTE_SELECTIVE, true, false, true},
    };
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++) {
        double ref[STEPS], got[STEPS], worst = 0.0;
        struct train_result res;
        struct moai_err err = {0};
        const struct lay *l = &lays[i];
        assert_int_equal(train_lay(l, 1 << 30, ref, &res, &err), 0);
        precision = "bf16";
        int rc = train_lay(l, 1 << 30, got, &res, &err);
        precision = "fp32";
        assert_int_equal(rc, 0);
        struct layout el = {l->dp, l->pp,    l->tp,   l->nmb, 8 / l->dp / l->nmb,
                            l->rc, l->zero2, l->zero3};
        for (int d = 0; d < res.ndev; d++) {
            struct shard s;
            struct shard_bytes b;
            assert_int_equal(shard_init(&s, l->untied ? &fx.untied : &fx.cfg, &el, SEQ,
                                        shard_cpu_threads(res.ndev), d, &err),
                             0);
            shard_bytes(&s, &b);
            shard_release(&s);
            assert_int_equal(res.peak_bytes[d], b.total);
        }
        for (int k = 0; k < STEPS; k++) {
            double rel = fabs(got[k] - ref[k]) / fabs(ref[k]);
            worst = rel > worst ? rel : worst;
        }
        if (getenv("SHOW"))
            fprintf(stderr, "bf16, layout %zu: worst rel %.3g\n", i, worst);
        assert_true(worst <= 2e-3);
        if (bf16_available())
            assert_true(worst > 0.0);
        else
            assert_true(worst == 0.0);
    }
}

static void test_train_model_parallel_resume_is_bit_identical(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 2, 2, 2, RECOMPUTE_NONE, false, false, false},
        {2, 2, 1, 1, RECOMPUTE_NONE, true, true, false},
        {1, 1, 4, 1, RECOMPUTE_NONE, true, false, true},
    };
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++) {
        double whole[STEPS], resumed[STEPS];
        struct snapshot snap = {0};
        struct train_result res;
        struct moai_err err = {0};

        extra_training = ", save_interval: 3";
        snap_out = &snap;
        assert_int_equal(train_lay(&lays[i], 1 << 30, whole, &res, &err), 0);
        snap_out = NULL;
        extra_training = "";
        snap_in = &snap;
        assert_int_equal(train_lay(&lays[i], 1 << 30, resumed, &res, &err), 0);
        snap_in = NULL;
        if (memcmp(resumed + 3, whole + 3, 3 * sizeof(double))) {
            print_error("layout %zu: step 4 %.9g vs %.9g\n", i, resumed[3], whole[3]);
            fail();
        }
        free(snap.params);
        free(snap.m);
        free(snap.v);
    }
}

/* LoRA: every layout of the model-parallel test (data, pipeline and tensor parallelism,
 * ZeRO flags, recomputation, tied and untied) trains the adapters to one device's losses, with
 * dropout on; the first step's loss is the base model's (a fresh adapter changes nothing), and
 * the adapters train (the losses fall, not as full fine-tuning's). */
static void test_train_lora_layouts_match_one_device(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {2, 1, 1, 1, RECOMPUTE_NONE, false, false, false},
        {1, 1, 1, 2, RECOMPUTE_NONE, false, false, false},
        {2, 1, 1, 2, RECOMPUTE_NONE, true, false, false},
        {2, 1, 1, 1, RECOMPUTE_NONE, true, true, false},
        {1, 2, 1, 4, RECOMPUTE_NONE, false, false, false},
        {1, 4, 1, 4, RECOMPUTE_NONE, false, false, false},
        {1, 1, 2, 1, RECOMPUTE_NONE, false, false, false},
        {1, 1, 4, 2, RECOMPUTE_NONE, false, false, false}, /* kv heads replicated */
        {2, 2, 2, 2, RECOMPUTE_NONE, false, false, false},
        {1, 1, 1, 2, RECOMPUTE_SELECTIVE, false, false, false},
        {1, 1, 1, 1, RECOMPUTE_FULL, false, false, false},
        {1, 2, 2, 4, RECOMPUTE_FULL, false, false, false},
        {2, 1, 2, 2, RECOMPUTE_FULL, true, true, false},
        {2, 2, 2, 1, RECOMPUTE_SELECTIVE, true, true, false},
        {1, 2, 1, 2, RECOMPUTE_NONE, false, false, true},
        {1, 1, 4, 1, RECOMPUTE_NONE, false, false, true},
        {2, 2, 2, 2, RECOMPUTE_FULL, true, true, true},
    };
    double ref[2][STEPS], full[2][STEPS];
    struct train_result res;
    struct moai_err err = {0};
    for (int u = 0; u < 2; u++) {
        struct lay one = {1, 1, 1, 1, RECOMPUTE_NONE, false, false, u == 1};
        assert_int_equal(train_lay(&one, 1 << 30, full[u], &res, &err), 0);
        with_lora = true;
        assert_int_equal(train_lay(&one, 1 << 30, ref[u], &res, &err), 0);
        with_lora = false;
        assert_true(ref[u][0] == full[u][0]); /* B = 0: the base model's loss, to the bit */
        assert_true(ref[u][STEPS - 1] < ref[u][0]);
        assert_true(ref[u][STEPS - 1] != full[u][STEPS - 1]);
    }
    with_lora = true;
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++)
        expect_same_losses(&lays[i], ref[lays[i].untied]);
    with_lora = false;
}

/* LoRA: every device's measured peak is the planner's memory for the plan (the frozen base's
 * weights, no gradients nor moments, the adapters' arenas), and a resumed run continues to
 * the bit. */
static void test_train_lora_memory_and_resume(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 2, 2, 2, RECOMPUTE_NONE, false, false, false},
        {2, 2, 1, 1, RECOMPUTE_FULL, true, true, false},
        {1, 1, 4, 1, RECOMPUTE_NONE, true, false, true},
    };
    with_lora = true;
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++) {
        const struct lay *l = &lays[i];
        double whole[STEPS], resumed[STEPS];
        struct snapshot snap = {0};
        struct train_result res;
        struct moai_err err = {0};
        struct layout el = {l->dp, l->pp,    l->tp,   l->nmb, 8 / l->dp / l->nmb,
                            l->rc, l->zero2, l->zero3};
        extra_training = ", save_interval: 3";
        snap_out = &snap;
        assert_int_equal(train_lay(l, 1 << 30, whole, &res, &err), 0);
        snap_out = NULL;
        extra_training = "";
        for (int d = 0; d < res.ndev; d++) {
            struct shard s;
            struct shard_bytes b;
            assert_int_equal(shard_init(&s, l->untied ? &fx.untied : &fx.cfg, &el, SEQ,
                                        shard_cpu_threads(res.ndev), d, &err),
                             0);
            shard_bytes(&s, &b);
            assert_int_equal(res.peak_bytes[d],
                             b.weights + b.activations + b.workspace +
                                 lora_dev_bytes(&s, &test_lora, el.batch_per_device, SEQ));
            shard_release(&s);
        }
        snap_in = &snap;
        assert_int_equal(train_lay(l, 1 << 30, resumed, &res, &err), 0);
        snap_in = NULL;
        if (memcmp(resumed + 3, whole + 3, 3 * sizeof(double))) {
            print_error("lora layout %zu: step 4 %.9g vs %.9g\n", i, resumed[3], whole[3]);
            fail();
        }
        free(snap.params);
        free(snap.m);
        free(snap.v);
    }
    with_lora = false;
}

/* LoRA with training.precision bf16: the frozen base held in bf16 (widened unit by unit, or
 * under ZeRO-3 fp32 shards of the same bf16 values): every layout gives one device's losses,
 * each device's peak is the planner's prediction to the byte, and the base's bytes are half
 * of fp32's. */
static void test_train_lora_bf16_base(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {2, 1, 1, 2, RECOMPUTE_NONE, true, false, false},
        {2, 1, 1, 1, RECOMPUTE_NONE, true, true, false},
        {1, 2, 2, 2, RECOMPUTE_FULL, false, false, false},
        {1, 1, 4, 1, RECOMPUTE_NONE, false, false, true},
    };
    double ref[2][STEPS], fp32[STEPS];
    struct train_result res;
    struct moai_err err = {0};
    with_lora = true;
    struct lay one = {1, 1, 1, 1, RECOMPUTE_NONE, false, false, false};
    assert_int_equal(train_lay(&one, 1 << 30, fp32, &res, &err), 0);
    int64_t fp32_peak = res.peak_bytes[0];
    precision = "bf16";
    /* On a cpu with AVX512_BF16, precision bf16 also runs the products in bf16 (model/bf16.h):
     * a layout's other order of fp32 sums can then round an activation to the neighbouring
     * bf16 value (2^-8 apart), so layouts agree to 1e-4 rather than 1e-5 (measured: 1.4e-5
     * after 6 steps). */
    layout_tol = bf16_available() ? 1e-4 : 1e-5;
    for (int u = 0; u < 2; u++) {
        one.untied = u == 1;
        assert_int_equal(train_lay(&one, 1 << 30, ref[u], &res, &err), 0);
        if (u == 0) {
            assert_true(ref[0][0] != fp32[0]); /* the base rounded to bf16 */
            assert_true(fabs(ref[0][0] - fp32[0]) < 1e-2 * fabs(fp32[0]));
            assert_true(res.peak_bytes[0] < fp32_peak);
        }
    }
    for (size_t i = 0; i < sizeof(lays) / sizeof(lays[0]); i++) {
        const struct lay *l = &lays[i];
        expect_same_losses(l, ref[l->untied]);
        /* the planner's prediction of every device */
        char text[512];
        struct recipe r;
        snprintf(text, sizeof(text),
                 "model: {path: m}\ndataset: {path: d}\ntraining: {batch_size: 8, block_size: "
                 "%d, precision: bf16}\nflavor: {device: cpu, devices: %d, memory_gb: 1}\n"
                 "lora: {rank: 4, alpha: 8.0, dropout: 0.1}\n",
                 SEQ, l->dp * l->pp * l->tp);
        assert_int_equal(recipe_load_string(&r, text, strlen(text), "t.yaml", NULL, &err), 0);
        struct plan p = {
            .lay = {l->dp, l->pp, l->tp, l->nmb, 8 / l->dp / l->nmb, l->rc, l->zero2, l->zero3}};
        assert_int_equal(train_lay(l, 1 << 30, fp32, &res, &err), 0);
        for (int d = 0; d < res.ndev; d++) {
            struct mem_breakdown mb;
            mem_stage(&mb, l->untied ? &fx.untied : &fx.cfg, &r, &p, d / l->tp % l->pp);
            assert_int_equal(res.peak_bytes[d], mb.total_bytes);
        }
        recipe_release(&r);
    }
    precision = "fp32";
    with_lora = false;
    layout_tol = 1e-5;
}

static void test_train_is_reproducible(void **state)
{
    (void) state;
    double a[STEPS], b[STEPS];
    struct train_result res;
    struct moai_err err = {0};
    assert_int_equal(train(2, 2, true, false, 1 << 30, a, &res, &err), 0);
    assert_int_equal(train(2, 2, true, false, 1 << 30, b, &res, &err), 0);
    assert_memory_equal(a, b, sizeof(a)); /* bit for bit */
}

static void test_train_resume_is_bit_identical(void **state)
{
    (void) state;
    static const struct {
        int dp;
        bool zero2, zero3;
    } layouts[] = {{1, false, false}, {2, true, false}, {2, true, true}};
    for (size_t i = 0; i < sizeof(layouts) / sizeof(layouts[0]); i++) {
        double whole[STEPS], resumed[STEPS];
        struct snapshot snap = {0};
        struct train_result res;
        struct moai_err err = {0};

        extra_training = ", save_interval: 3";
        snap_out = &snap;
        assert_int_equal(
            train(layouts[i].dp, 1, layouts[i].zero2, layouts[i].zero3, 1 << 30, whole, &res, &err),
            0);
        snap_out = NULL;
        extra_training = "";
        assert_int_equal(snap.steps_done, 3);

        snap_in = &snap;
        memset(resumed, 0, sizeof(resumed));
        assert_int_equal(train(layouts[i].dp, 1, layouts[i].zero2, layouts[i].zero3, 1 << 30,
                               resumed, &res, &err),
                         0);
        snap_in = NULL;
        assert_int_equal(res.steps_done, STEPS);
        /* Steps 4..6 of the resumed run are those of the uninterrupted one, bit for bit. */
        assert_memory_equal(resumed + 3, whole + 3, 3 * sizeof(double));
        free(snap.params);
        free(snap.m);
        free(snap.v);
    }
}

static void test_train_non_finite_loss_stops(void **state)
{
    (void) state;
    double losses[STEPS];
    struct train_result res;
    struct moai_err err = {0};
    int64_t P = model_param_count(&fx.cfg);
    float *good = fx.init, *bad = malloc((size_t) P * sizeof(float));
    memcpy(bad, good, (size_t) P * sizeof(float));
    bad[P - 1] = NAN; /* a norm weight: every logit becomes NaN */
    fx.init = bad;
    assert_int_equal(train(2, 1, true, false, 1 << 30, losses, &res, &err), MOAI_EIO);
    assert_string_equal(err.msg, "the loss is not finite (nan) at step 1");
    fx.init = good;
    free(bad);
}

static void test_train_device_memory_is_counted(void **state)
{
    (void) state;
    double losses[STEPS];
    struct train_result res;
    struct moai_err err = {0};
    struct layout lay = {.dp = 2,
                         .pp = 1,
                         .tp = 1,
                         .num_micro_batches = 1,
                         .batch_per_device = 4,
                         .distribute_param = true,
                         .distribute_low_prec_param = true};
    int64_t need = exec_device_bytes(&fx.cfg, &lay, SEQ, shard_cpu_threads(2));
    assert_int_equal(train(2, 1, true, true, 1 << 30, losses, &res, &err), 0);
    assert_int_equal(res.peak_bytes[0], need);
    assert_int_equal(res.peak_bytes[1], need);

    /* A device 1 KiB short of it fails cleanly with the out-of-memory error. */
    assert_int_equal(train(2, 1, true, true, need - 1024, losses, &res, &err), MOAI_EOOM);
    assert_non_null(strstr(err.msg, "out of memory"));
}

/* ---- packing ---------------------------------------------------------------------------- */

/* 8 examples a step, in pairs that pack into one row each (4 rows a step): a + b <= SEQ, and
 * no third example fits beside a pair, so data/pack.h packs exactly these pairs in order. */
#define NPK (STEPS * 8)

static struct {
    int32_t tokens[NPK * SEQ], labels[NPK * SEQ], lengths[NPK];
    int32_t ptok[NPK / 2 * SEQ], plab[NPK / 2 * SEQ], ppos[NPK / 2 * SEQ], plen[NPK / 2],
        pex[NPK / 2];
} pk;

static void packed_examples(void)
{
    struct moai_err err = {0};
    uint64_t s = 777;
    for (int e = 0; e < NPK; e++) {
        int j = e / 2, a = 3 + j % 9;
        int len = e % 2 ? SEQ - a - j % 3 : a;
        pk.lengths[e] = len;
        for (int t = 0; t < SEQ; t++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            int id = 4 + (int) ((s >> 33) % 36);
            pk.tokens[e * SEQ + t] = t < len ? id : 3;
            pk.labels[e * SEQ + t] = t < len && !(e % 5 == 0 && t < 2) ? id : -100;
        }
    }
    int64_t order[NPK];
    for (int e = 0; e < NPK; e++)
        order[e] = e;
    struct packing p;
    assert_int_equal(pack_rows(&p, order, NPK, pk.lengths, SEQ, &err), 0);
    assert_int_equal(p.nrows, NPK / 2);
    struct pack_source src = {SEQ, pk.tokens, pk.labels, pk.lengths, 3};
    for (int r = 0; r < NPK / 2; r++) {
        assert_int_equal(p.items[p.first[r]], 2 * r); /* the pairs, in order */
        pk.plen[r] = (int32_t) pack_row_fill(&p, r, &src, pk.ptok + r * SEQ, pk.plab + r * SEQ,
                                             pk.ppos + r * SEQ);
        pk.pex[r] = (int32_t) (p.first[r + 1] - p.first[r]);
    }
    pack_release(&p);
}

static void rows_in_order(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    int64_t batch = *(const int64_t *) arg;
    (void) epoch;
    for (int64_t i = 0; i < batch; i++)
        rows[i] = index * batch + i;
}

/* STEPS steps of the examples under layout l: 8 a step one to a row, or packed into 4 rows. */
static void train_packing(const struct lay *l, bool packed, double *losses)
{
    char text[512];
    struct recipe r;
    struct train_result res;
    struct moai_err err = {0};
    int64_t batch = packed ? 4 : 8;
    snprintf(text, sizeof(text),
             "model: {path: m}\ndataset: {path: d, packing: %s}\n"
             "training: {batch_size: %lld, block_size: %d, precision: fp32, lr: 1.0e-2,"
             " lr_schedule: cosine, warmup_steps: 2, weight_decay: 0.1, grad_clip: 0.5}\n"
             "flavor: {device: cpu, devices: %d}\n%s",
             packed ? "true" : "false", (long long) batch, SEQ, l->dp * l->pp * l->tp,
             with_lora ? "lora: {rank: 4, alpha: 8.0}\n" : "");
    assert_int_equal(recipe_load_string(&r, text, strlen(text), "t.yaml", NULL, &err), 0);
    struct train_records unpacked = {
        .n = NPK, .T = SEQ, .tokens = pk.tokens, .labels = pk.labels, .lengths = pk.lengths};
    struct train_records rows = {.n = NPK / 2,
                                 .T = SEQ,
                                 .tokens = pk.ptok,
                                 .labels = pk.plab,
                                 .lengths = pk.plen,
                                 .positions = pk.ppos,
                                 .examples = pk.pex};
    struct train_job job = {
        .recipe = &r,
        .cfg = &fx.cfg,
        .layout = {.dp = l->dp,
                   .pp = l->pp,
                   .tp = l->tp,
                   .num_micro_batches = l->nmb,
                   .batch_per_device = batch / l->dp / l->nmb,
                   .recomputation = l->rc,
                   .distribute_param = l->zero2,
                   .distribute_low_prec_param = l->zero3},
        .train = packed ? rows : unpacked,
        .batch_rows = rows_in_order,
        .batch_arg = &batch,
        .steps_per_epoch = STEPS,
        .total_steps = STEPS,
        .init_params = fx.init,
        .quiet = true,
        .step_losses = losses,
        .peak_bytes = peaks,
    };
    struct lora_params a = {0};
    if (with_lora) { /* PEFT's fresh adapters, without dropout (its masks follow the rows) */
        assert_int_equal(
            lora_params_init(&a, &fx.cfg, test_lora.rank, test_lora.targets, 0, NULL, &err), 0);
        lora_init_peft(&a, &fx.cfg, &fx.cfg, 0, test_lora.rank, test_lora.targets, 7);
        job.lora_init = &a;
    }
    int rc = exec_train(&job, &res, &err);
    if (rc != 0) {
        print_error("dp %d pp %d tp %d packed %d: %s\n", l->dp, l->pp, l->tp, packed, err.msg);
        fail();
    }
    lora_params_release(&a);
    recipe_release(&r);
}

/* The same examples packed and unpacked train to the same losses (to rounding: the summed
 * loss and the gradients agree, and so every update), in every kind of layout, fine-tuning
 * the whole model or LoRA adapters. */
static void test_train_packing_matches_unpacked(void **state)
{
    (void) state;
    static const struct lay lays[] = {
        {1, 1, 1, 1, RECOMPUTE_NONE, false, false, false},
        {2, 1, 1, 2, RECOMPUTE_NONE, true, false, false},
        {1, 2, 1, 2, RECOMPUTE_NONE, false, false, false},
        {1, 1, 2, 1, RECOMPUTE_NONE, false, false, false},
        {1, 2, 2, 2, RECOMPUTE_NONE, false, false, false},
        {2, 2, 2, 1, RECOMPUTE_SELECTIVE, true, true, false},
        {1, 1, 1, 2, RECOMPUTE_SELECTIVE, false, false, false},
        {1, 2, 2, 1, RECOMPUTE_FULL, false, false, false},
    };
    size_t n = sizeof(lays) / sizeof(lays[0]);
    packed_examples();
    for (size_t k = 0; k < 2 * n; k++) {
        double unpacked[STEPS], packed[STEPS];
        size_t i = k % n;
        with_lora = k >= n; /* the layouts again with LoRA adapters on the frozen base */
        train_packing(&lays[i], false, unpacked);
        train_packing(&lays[i], true, packed);
        assert_true(unpacked[STEPS - 1] < unpacked[0]);
        for (int s = 0; s < STEPS; s++) {
            double rel = fabs(packed[s] - unpacked[s]) / fabs(unpacked[s]);
            if (getenv("SHOW"))
                fprintf(stderr, "packing: layout %zu step %d rel %.3g\n", i, s + 1, rel);
            if (rel > 1e-5) {
                print_error("dp %d pp %d tp %d rc %d step %d: packed %.9g, unpacked %.9g\n",
                            lays[i].dp, lays[i].pp, lays[i].tp, (int) lays[i].rc, s + 1, packed[s],
                            unpacked[s]);
                fail();
            }
        }
    }
    with_lora = false;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_layouts_match_one_device),
        cmocka_unit_test(test_train_model_parallel_matches_one_device),
        cmocka_unit_test(test_train_model_parallel_memory_is_exact),
        cmocka_unit_test(test_train_bf16_memory_is_exact_losses_close),
        cmocka_unit_test(test_train_model_parallel_resume_is_bit_identical),
        cmocka_unit_test(test_train_lora_layouts_match_one_device),
        cmocka_unit_test(test_train_lora_memory_and_resume),
        cmocka_unit_test(test_train_lora_bf16_base),
        cmocka_unit_test(test_train_is_reproducible),
        cmocka_unit_test(test_train_resume_is_bit_identical),
        cmocka_unit_test(test_train_non_finite_loss_stops),
        cmocka_unit_test(test_train_device_memory_is_counted),
        cmocka_unit_test(test_train_packing_matches_unpacked),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
