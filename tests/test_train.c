/* test_train.c - every data-parallel layout trains to the same losses as one device. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "exec/train.h"
#include "model/optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NREC  64
#define SEQ   16
#define STEPS 6

struct fixture {
    struct model_config cfg;
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
    json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:b, s:i}", "hidden_size", 32,
                          "intermediate_size", 48, "num_hidden_layers", 2, "num_attention_heads", 4,
                          "num_key_value_heads", 2, "vocab_size", 40, "tie_word_embeddings", 1,
                          "pad_token_id", 3);
    assert_int_equal(model_config_load(&fx.cfg, NULL, o, &err), 0);
    json_decref(o);
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
    struct llama_params p;
    assert_int_equal(llama_params_init(&p, &fx.cfg, NULL, &err), 0);
    optim_init_params(NULL, &p, &fx.cfg, 7);
    fx.init = malloc((size_t) p.nfloats * sizeof(float));
    memcpy(fx.init, p.arena, (size_t) p.nfloats * sizeof(float));
    llama_params_release(&p);
    return 0;
}

static int teardown(void **state)
{
    (void) state;
    free(fx.init);
    return 0;
}

/* A checkpoint kept in memory by the save callback. */
struct snapshot {
    int64_t steps_done;
    float *params, *m, *v;
    int saves;
};

static int snapshot_save(void *arg, int64_t steps_done, const float *params, const float *m,
                         const float *v, struct moai_err *err)
{
    (void) err;
    struct snapshot *s = arg;
    int64_t P = model_param_count(&fx.cfg);
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

/* Trains STEPS steps of a batch of 8 under a layout; fills losses. */
static int train(int dp, int nmb, bool zero2, bool zero3, int64_t capacity, double *losses,
                 struct train_result *res, struct moai_err *err)
{
    char text[512];
    struct recipe r;
    snprintf(text, sizeof(text),
             "model: {path: m}\ndataset: {path: d}\n"
             "training: {batch_size: 8, block_size: %d, precision: fp32, lr: 1.0e-2,"
             " lr_schedule: cosine, warmup_steps: 2, weight_decay: 0.1, grad_clip: 0.5%s}\n"
             "flavor: {device: cpu, devices: %d, memory_gb: %g}\n",
             SEQ, extra_training, dp, (double) capacity / 1073741824.0);
    assert_int_equal(recipe_load_string(&r, text, strlen(text), "t.yaml", NULL, err), 0);
    int64_t batch = 8;
    struct train_job job = {
        .recipe = &r,
        .cfg = &fx.cfg,
        .layout = {.dp = dp,
                   .pp = 1,
                   .tp = 1,
                   .num_micro_batches = nmb,
                   .batch_per_device = 8 / dp / nmb,
                   .recomputation = RECOMPUTE_NONE,
                   .distribute_param = zero2,
                   .distribute_low_prec_param = zero3},
        .train =
            {.n = NREC, .T = SEQ, .tokens = fx.tokens, .labels = fx.labels, .lengths = fx.lengths},
        .batch_rows = batch_rows,
        .batch_arg = &batch,
        .steps_per_epoch = 4,
        .total_steps = STEPS,
        .init_params = fx.init,
        .quiet = true,
        .step_losses = losses,
        .save = snap_out ? snapshot_save : NULL,
        .save_arg = snap_out,
    };
    if (snap_in) {
        job.start_step = snap_in->steps_done;
        job.init_params = snap_in->params;
        job.init_m = snap_in->m;
        job.init_v = snap_in->v;
    }
    int rc = exec_train(&job, res, err);
    recipe_release(&r);
    return rc;
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
    struct exec_layout lay = {.dp = 2,
                              .pp = 1,
                              .tp = 1,
                              .num_micro_batches = 1,
                              .batch_per_device = 4,
                              .distribute_param = true,
                              .distribute_low_prec_param = true};
    int64_t need = exec_device_bytes(&fx.cfg, &lay, SEQ, 1);
    assert_int_equal(train(2, 1, true, true, 1 << 30, losses, &res, &err), 0);
    assert_int_equal(res.peak_bytes[0], need);
    assert_int_equal(res.peak_bytes[1], need);

    /* A device one byte short of it fails cleanly with the out-of-memory error. */
    assert_int_equal(train(2, 1, true, true, need - 1024, losses, &res, &err), MOAI_EOOM);
    assert_non_null(strstr(err.msg, "out of memory"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_layouts_match_one_device),
        cmocka_unit_test(test_train_is_reproducible),
        cmocka_unit_test(test_train_resume_is_bit_identical),
        cmocka_unit_test(test_train_non_finite_loss_stops),
        cmocka_unit_test(test_train_device_memory_is_counted),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
