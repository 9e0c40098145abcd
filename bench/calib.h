/* calib.h - the planner against published training runs (bench/calibration/runs.json).
 *
 * Each run of the table gives a model shape, a cluster (device type, count, devices per
 * node), the global batch, micro-batch and sequence length, the layout it ran (tp, pp, dp,
 * recomputation, sharding) and its published throughput per device, sometimes its peak
 * memory. calib_run_eval plans the same recipe twice: at the published layout (pinned, as a
 * user would pin it in parallel.*, with the fields a source leaves out, such as the
 * micro-batch, left to the planner) and free (the planner's own choice), and returns the
 * predicted throughput of both, the predicted memory and whether the published layout was
 * predicted to fit. bench_calibration prints the table; tests/test_calibration.c checks the
 * targets of the calibration (issue 11) so that a change of the models that breaks them fails.
 *
 * GPT-shaped runs (arch "gpt": GELU MLP of width 4h, learned positions, biases) are planned as
 * the Llama of the same width whose SwiGLU MLP has the GELU MLP's parameters and FLOPs,
 * 3 D F = 2 D (4 D): F = 8 D / 3 rounded up to a multiple of 128. Sharding "fsdp" / "zero3"
 * is distribute_low_prec_param, "zero2" distribute_param. Runs the planner cannot express
 * (context parallelism, fp8, ZeRO-1's sharding of the optimizer state alone, a device type
 * outside the catalog) are skipped with a reason, and so is a run with an "exclude" reason. fp16 runs count as bf16 (the same
 * tensor-core rate and bytes). Where a source publishes TFLOP/s rather than tokens/s, its own
 * FLOP count per token converts it ("flop_formula", calib_tokens_from_tflops).
 *
 * Memory is the planner's for its own stack, whose cross-entropy is fused (the executor's
 * way: bf16 logits and one fp32 buffer that becomes their gradient, 6 bytes a logit). A run
 * whose stack keeps PyTorch's unfused loss ("loss": "unfused" in the table: the fp32 upcast,
 * the saved log-softmax and its gradient beside the bf16 logits, 14 bytes a logit when the
 * backward starts) is compared with that difference added.
 *
 *     json_t *runs = calib_load("bench/calibration/runs.json", &err);
 *     struct calib_result c;
 *     calib_run_eval(&c, json_array_get(runs, i));
 */
#ifndef MOAI_BENCH_CALIB_H
#define MOAI_BENCH_CALIB_H

#include "log.h"
#include "plan/plan.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bytes a logit of PyTorch's unfused cross-entropy holds at the start of the backward. */
#define CALIB_UNFUSED_LOSS_BYTES 14

struct calib_result {
    char id[96], split[16], device[32], skipped[160];
    int devices;
    double published_tps;     /* tokens/s per device, published */
    double predicted_tps;     /* at the published layout */
    double choice_tps;        /* at the planner's own choice */
    bool published_fits;      /* the published layout fits the predicted memory */
    double predicted_gib;     /* the published layout's most loaded device */
    double published_gib;     /* 0 when not published */
    char choice[128];         /* plan_brief of the choice */
    char layout[128];         /* plan_brief of the published layout as planned */
};

static int calib_int(const json_t *o, const char *key, int def)
{
    const json_t *v = json_object_get(o, key);
    return json_is_integer(v) ? (int) json_integer_value(v) : def;
}

static const char *calib_str(const json_t *o, const char *key, const char *def)
{
    const json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : def;
}

static double calib_num(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : 0.0;
}

/* Tokens/s per device from a published TFLOP/s per device and the source's own FLOP count
 * per token ("flop_formula"): Megatron-Core r0.8's num_floating_point_operations,
 * 12 L h^2 ((1 + g/a + s/h) + ffn/h (x 3/2 gated) + V / 2Lh), and Megatron-LM 2021's
 * 96 L h^2 (1 + s/6h + V/16Lh), which counts full recomputation. 0 when neither. */
static double calib_tokens_from_tflops(const json_t *run, const json_t *pub)
{
    const json_t *m = json_object_get(run, "model");
    const char *formula = calib_str(pub, "flop_formula", "");
    double tflops = calib_num(pub, "tflops_per_device");
    double L = calib_int(m, "layers", 0), h = calib_int(m, "hidden_size", 0);
    double a = calib_int(m, "heads", 1), g = calib_int(m, "kv_heads", calib_int(m, "heads", 1));
    double ffn = calib_int(m, "intermediate_size", 0), V = calib_int(m, "vocab_size", 0);
    double s = calib_int(run, "seq_len", 0), per_token = 0;
    double gated = !strcmp(calib_str(m, "arch", "llama"), "gpt") ? 1.0 : 1.5;
    if (!strcmp(formula, "megatron-core")) /* heads x head_dim = hidden */
        per_token = 12 * L * h * h * ((1 + g / a + s / h) + ffn / h * gated + V / (2 * L * h));
    else if (!strcmp(formula, "megatron-2021"))
        per_token = 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h));
    return per_token > 0 && tflops > 0 ? tflops * 1e12 / per_token : 0.0;
}

/* The Llama config of the run's model (config.json keys). */
static int calib_model(struct model_config *cfg, const json_t *run, int seq, struct moai_err *err)
{
    const json_t *m = json_object_get(run, "model");
    int64_t D = calib_int(m, "hidden_size", 0), F = calib_int(m, "intermediate_size", 0);
    if (!strcmp(calib_str(m, "arch", "llama"), "gpt"))
        F = ((8 * D + 2) / 3 + 127) / 128 * 128;
    int heads = calib_int(m, "heads", 0);
    json_t *j = json_pack("{s:s, s:I, s:I, s:i, s:i, s:i, s:i, s:i, s:b}", "model_type", "llama",
                          "hidden_size", (json_int_t) D, "intermediate_size", (json_int_t) F,
                          "num_hidden_layers", calib_int(m, "layers", 0), "num_attention_heads",
                          heads, "num_key_value_heads", calib_int(m, "kv_heads", heads),
                          "vocab_size", calib_int(m, "vocab_size", 0), "max_position_embeddings",
                          seq, "tie_word_embeddings",
                          json_is_true(json_object_get(m, "tied_embeddings")));
    if (!j)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    int rc = model_config_from_json(cfg, j, calib_str(m, "name", "model"), err);
    json_decref(j);
    return rc;
}

/* Device variants of the table that the catalog has as a type with other figures: the
 * type, and the flavor mapping's overrides. */
static const struct {
    const char *device, *type, *overrides;
} calib_variants[] = {
    /* Grand Teton's H100 with 96 GB of HBM2e at a 500 W limit (torchtitan's paper) */
    {"h100-96gb", "h100-80gb", ", memory_gb: 96"},
};

static const char *calib_type(const char *device, const char **overrides)
{
    *overrides = "";
    for (size_t i = 0; i < sizeof(calib_variants) / sizeof(calib_variants[0]); i++)
        if (!strcmp(device, calib_variants[i].device)) {
            *overrides = calib_variants[i].overrides;
            return calib_variants[i].type;
        }
    return flavor_device_type(device) ? device : NULL;
}

/* The recipe of the run: its cluster, batch and sequence, no pins. For fitting, the
 * environment variable CALIB_TFLOPS scales every device's peak (the product rate) by its
 * value: the gemm_efficiency of flavor.c were chosen so that the fitting half's median ratio at
 * scale 1 is near 1 (e.g. CALIB_TFLOPS=0.8 build/bench/bench_calibration shows the effect). */
static int calib_recipe(struct recipe *r, const json_t *run, const char *device,
                        struct moai_err *err)
{
    char text[512], scale[64] = "";
    const char *overrides;
    const char *type = calib_type(device, &overrides);
    const char *env = getenv("CALIB_TFLOPS");
    if (env)
        snprintf(scale, sizeof(scale), ", tflops: %g",
                 atof(env) * flavor_device_type(type)->tflops);
    int n = snprintf(text, sizeof(text),
                     "model: {path: none}\ndataset: {path: none}\n"
                     "training: {batch_size: %d, block_size: %d, precision: bf16}\n"
                     "flavor: {device: %s, devices: %d, devices_per_node: %d%s%s}\n",
                     calib_int(run, "global_batch", 0), calib_int(run, "seq_len", 0), type,
                     calib_int(run, "devices", 0), calib_int(run, "devices_per_node", 8),
                     overrides, scale);
    return recipe_load_string(r, text, (size_t) n, calib_str(run, "id", "run"), NULL, err);
}

/* Pins the published layout in the recipe's parallel.* as a user would: tp, pp, dp, the
 * micro-batches (from the global and micro batch), recomputation and sharding, each where the
 * source publishes it; what it leaves out stays the planner's to choose. */
static void calib_pins(struct recipe *r, const json_t *run)
{
    const json_t *mb = json_object_get(run, "micro_batch");
    const char *rc = calib_str(run, "recomputation", NULL);
    const char *sh = calib_str(run, "sharding", NULL);
    int tp = calib_int(run, "tp", 1), pp = calib_int(run, "pp", 1);
    int dp = calib_int(run, "dp", calib_int(run, "devices", 1) / (tp * pp));

    r->parallel.tp = tp;
    r->parallel.pp = pp;
    r->parallel.dp = dp;
    if (json_is_integer(mb) && json_integer_value(mb) > 0)
        r->parallel.num_micro_batches =
            (int) (calib_int(run, "global_batch", 0) / (dp * (int) json_integer_value(mb)));
    if (rc)
        r->parallel.recomputation = !strcmp(rc, "full")        ? RECOMPUTE_FULL
                                    : !strcmp(rc, "selective") ? RECOMPUTE_SELECTIVE
                                                               : RECOMPUTE_NONE;
    if (sh) {
        bool z3 = !strcmp(sh, "fsdp") || !strcmp(sh, "zero3");
        r->parallel.distribute_low_prec_param = z3;
        r->parallel.distribute_param = z3 || !strcmp(sh, "zero2");
    }
}

/* plan_search without its log lines. */
static int calib_search(struct plan_result *res, const struct model_config *cfg,
                        const struct recipe *r, struct moai_err *err)
{
    enum log_level level = log_get_level();
    log_set_level(LOG_ERROR);
    int rc = plan_search(res, cfg, r, err);
    log_set_level(level);
    return rc;
}

/* Plans one run (see the top of this file). Returns 0, or -1 with c->skipped saying why. */
static int calib_run_eval(struct calib_result *c, const json_t *run)
{
    struct moai_err err = {0};
    struct model_config cfg;
    struct recipe r;
    struct plan_result res;
    const char *device = calib_str(run, "device", "");
    int seq = calib_int(run, "seq_len", 0);

    memset(c, 0, sizeof(*c));
    snprintf(c->id, sizeof(c->id), "%s", calib_str(run, "id", "?"));
    snprintf(c->split, sizeof(c->split), "%s", calib_str(run, "split", "fit"));
    snprintf(c->device, sizeof(c->device), "%s", device);
    c->devices = calib_int(run, "devices", 0);
    const json_t *pub = json_object_get(run, "published");
    c->published_tps = calib_num(pub, "tokens_per_s_per_device");
    if (c->published_tps <= 0)
        c->published_tps = calib_tokens_from_tflops(run, pub);
    c->published_gib = calib_num(run, "peak_memory_gib");
    if (calib_int(run, "cp", 1) > 1) {
        snprintf(c->skipped, sizeof(c->skipped), "context parallelism");
        return -1;
    }
    if (json_is_string(json_object_get(run, "exclude"))) {
        snprintf(c->skipped, sizeof(c->skipped), "excluded: %.140s",
                 calib_str(run, "exclude", ""));
        return -1;
    }
    const char *precision = calib_str(run, "precision", "bf16");
    if (strcmp(precision, "bf16") && strcmp(precision, "fp16")) {
        snprintf(c->skipped, sizeof(c->skipped), "precision %s",
                 calib_str(run, "precision", "?"));
        return -1;
    }
    if (!strcmp(calib_str(run, "sharding", ""), "zero1")) {
        /* Megatron's distributed optimizer: full gradients, one reduce-scatter per step */
        snprintf(c->skipped, sizeof(c->skipped),
                 "sharding zero1 (optimizer state only) is not among the planner's layouts");
        return -1;
    }
    if (c->published_tps <= 0) {
        snprintf(c->skipped, sizeof(c->skipped), "no tokens/s per device");
        return -1;
    }
    const char *overrides;
    if (!calib_type(device, &overrides)) {
        snprintf(c->skipped, sizeof(c->skipped), "device %s not in the catalog", device);
        return -1;
    }
    if (calib_model(&cfg, run, seq, &err) < 0 || calib_recipe(&r, run, device, &err) < 0) {
        snprintf(c->skipped, sizeof(c->skipped), "%.150s", err.msg);
        return -1;
    }
    struct recipe pinned = r;
    calib_pins(&pinned, run);
    int rc = calib_search(&res, &cfg, &pinned, &err);
    plan_brief(c->layout, sizeof(c->layout), &res.best);
    if (rc < 0 && rc != MOAI_EOOM) {
        snprintf(c->skipped, sizeof(c->skipped), "layout: %.140s", err.msg);
        recipe_release(&r);
        return -1;
    }
    const struct plan *p = &res.best;
    c->predicted_tps = p->tokens_per_second / c->devices;
    int64_t total = p->mem.total_bytes;
    if (!strcmp(calib_str(run, "loss", "fused"), "unfused") && p->mem.stage == p->lay.pp - 1)
        total += p->mem.logits_bytes * (CALIB_UNFUSED_LOSS_BYTES - 6) / 6;
    c->predicted_gib = (double) total / 1073741824.0;
    c->published_fits = rc == 0 && total <= r.flavor.device.memory_bytes;

    if (calib_search(&res, &cfg, &r, &err) == 0) {
        c->choice_tps = res.best.tokens_per_second / c->devices;
        plan_brief(c->choice, sizeof(c->choice), &res.best);
    } else {
        snprintf(c->choice, sizeof(c->choice), "none fits");
    }
    recipe_release(&r);
    return 0;
}

/* The table, or NULL with err set. The caller json_decref's it. */
static json_t *calib_load(const char *path, struct moai_err *err)
{
    json_error_t je;
    json_t *runs = json_load_file(path, 0, &je);
    if (!runs) {
        moai_err_set(err, MOAI_EIO, "%s:%d: %s", path, je.line, je.text);
        return NULL;
    }
    if (!json_is_array(runs)) {
        json_decref(runs);
        moai_err_set(err, MOAI_EUSAGE, "%s: not a JSON array of runs", path);
        return NULL;
    }
    return runs;
}

#endif
