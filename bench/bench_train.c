/* bench_train.c - training throughput of whole steps on virtual devices against the model's own
 * step in the same run: the tiny and small shapes, fp32 and bf16, on 1 device and 2 devices
 * data parallel (and ZeRO-2 for tiny fp32), beside the machine's peaks (sgemm for fp32, the
 * vdpbf16ps loop for bf16).
 *
 * The model step is what bench_llama times (zero the gradients, forward and backward of the
 * batch, clip, AdamW) on 2 threads, measured right before and right after each trainer row
 * (the mean of the two medians); the trainer's is exec_train's median step over batches of the
 * same shape. The trainer should reach 90% of the model step (issue 18).
 *
 *     bench_train                  every row
 *     bench_train tiny bf16        one shape, one precision
 *     bench_train tiny bf16 1      its rows on 1 device only (2: data parallel only)
 */
#include "bench_util.h"

#include "exec/train.h"
#include "model/optim.h"

#include <math.h>
#include <string.h>

#define NREC 64

struct shape {
    const char *name;
    int64_t D, L, H, F, V, T, B;
    int steps;
};

static const struct shape shapes[] = {
    {"tiny", 288, 6, 6, 768, 32000, 256, 8, 11},
    {"small", 768, 12, 12, 2048, 32000, 512, 4, 4},
};

static void rows_fn(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    int64_t batch = *(const int64_t *) arg;
    for (int64_t i = 0; i < batch; i++)
        rows[i] = (epoch * 13 + index * batch + i) % NREC;
}

/* FLOPs of one step: 6 x (matmul weights) x tokens + attention 12 x L x T x D per token. */
static double step_flops(const struct model_config *c, int64_t tokens, int64_t T)
{
    /* The layers' projections and lm_head (tied or not); the embedding lookup and the norms
     * are no products. */
    int64_t matmul = c->num_hidden_layers * (model_layer_param_count(c) - 2 * c->hidden_size) +
                     c->vocab_size * c->hidden_size;
    return 6.0 * (double) matmul * (double) tokens +
           12.0 * (double) (c->num_hidden_layers * T * c->hidden_size) * (double) tokens;
}


/* The model's own step on 2 threads over the same batch, median seconds of steps - 1 after a
 * warm-up; 0 on failure. */
static double model_step_seconds(const struct model_config *cfg, const struct llama_params *init,
                                 const int32_t *tokens, const int32_t *labels, int64_t B, int64_t T,
                                 int steps, bool bf16)
{
    struct moai_err err = {0};
    struct llama m;
    struct llama_params p, g, m1, m2;
    struct llama_acts a;
    struct llama_work w;
    double t[64], med = 0.0;
    if (llama_init(&m, cfg, 2, &err) < 0)
        return 0.0;
    llama_set_bf16(&m, bf16);
    if (llama_params_init(&p, cfg, NULL, &err) == 0 &&
        llama_params_init(&g, cfg, NULL, &err) == 0 &&
        llama_params_init(&m1, cfg, NULL, &err) == 0 &&
        llama_params_init(&m2, cfg, NULL, &err) == 0 && llama_acts_init(&a, cfg, B, T, &err) == 0 &&
        llama_work_init(&w, cfg, B, T, 2, &err) == 0) {
        memcpy(p.arena, init->arena, llama_param_bytes(cfg));
        struct llama_batch b = {B, T, tokens, labels, NULL, NULL};
        float dloss = 1.0f / (float) llama_batch_targets(&b);
        struct optim_adamw hp = {
            .lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
        steps = steps > 63 ? 63 : steps;
        for (int k = 0; k <= steps; k++) {
            double t0 = bench_now();
            llama_params_zero(&m, &g);
            llama_forward_backward(&m, &p, &g, &a, &w, &b, dloss);
            optim_clip_grad_norm(m.pool, g.arena, g.nfloats, 1.0);
            optim_adamw_step(m.pool, p.arena, g.arena, m1.arena, m2.arena, p.nfloats, k + 1, &hp);
            if (k > 0)
                t[k - 1] = bench_now() - t0;
        }
        med = bench_median(t, steps);
        llama_work_release(&w);
        llama_acts_release(&a);
        llama_params_release(&m2);
        llama_params_release(&m1);
        llama_params_release(&g);
    }
    llama_params_release(&p);
    llama_release(&m);
    return med;
}

static void trainer_row(const struct shape *sh, const struct model_config *cfg,
                        const struct llama_params *init, struct train_records *recs, int dp,
                        bool zero2, bool bf16, double peak)
{
    /* the model's step on the trainer's first batch, right before and right after: a load
     * that drifts during the row weighs on both alike */
    double before = model_step_seconds(cfg, init, recs->tokens, recs->labels, sh->B, sh->T,
                                       sh->steps - 1, bf16);
    struct moai_err err = {0};
    int64_t batch = sh->B;
    char text[320], name[96], fig[64], note[256];
    struct recipe r;
    snprintf(text, sizeof(text),
             "model: {path: m}\ndataset: {path: d}\ntraining: {batch_size: %lld, block_size: "
             "%lld, precision: %s}\nflavor: {device: cpu, devices: %d}\n",
             (long long) sh->B, (long long) sh->T, bf16 ? "bf16" : "fp32", dp);
    snprintf(name, sizeof(name), "train %s %s, %d device%s%s", sh->name, bf16 ? "bf16" : "fp32", dp,
             dp > 1 ? "s" : "", dp > 1 ? (zero2 ? ", distribute_param" : ", data parallel") : "");
    if (recipe_load_string(&r, text, strlen(text), "bench.yaml", NULL, &err) < 0) {
        bench_row(name, "error", "", err.msg);
        return;
    }
    struct train_job job = {
        .recipe = &r,
        .cfg = cfg,
        .layout = {.dp = dp,
                   .pp = 1,
                   .tp = 1,
                   .num_micro_batches = 1,
                   .batch_per_device = batch / dp,
                   .distribute_param = zero2},
        .train = *recs,
        .batch_rows = rows_fn,
        .batch_arg = (void *) &batch,
        .steps_per_epoch = 8,
        .total_steps = sh->steps,
        .init_params = init->arena,
        .quiet = true,
    };
    struct train_result res;
    int rc = exec_train(&job, &res, &err);
    double after = model_step_seconds(cfg, init, recs->tokens, recs->labels, sh->B, sh->T,
                                      sh->steps - 1, bf16);
    double model_s = 0.5 * (before + after);
    if (rc < 0) {
        bench_row(name, "error", "", err.msg);
    } else {
        double gflops = step_flops(cfg, batch * sh->T, sh->T) / res.median_step_s * 1e-9;
        snprintf(fig, sizeof(fig), "%.0f tok/s", res.median_tokens_per_s);
        snprintf(note, sizeof(note),
                 "%.0f%% of the model step's %.0f tok/s (%.0f before, %.0f after); %.1f GFLOP/s = "
                 "%.0f%% of %s %.1f; median of %d steps",
                 100.0 * model_s / res.median_step_s, (double) (batch * sh->T) / model_s,
                 (double) (batch * sh->T) / before, (double) (batch * sh->T) / after, gflops,
                 100.0 * gflops / peak, bf16 ? "bf16 dot peak" : "sgemm", peak, sh->steps - 1);
        bench_row(name, fig, ">= 90% model", note);
    }
    recipe_release(&r);
}

/* devices: 1 or 2 for those rows only, 0 for all */
static void run_shape(const struct shape *sh, bool bf16, double peak, int devices)
{
    struct model_config cfg;
    struct moai_err err = {0};
    struct llama_params p;
    cfg = bench_model_config(sh->name, sh->D, sh->L, sh->H, sh->F, sh->V, sh->T);
    if (llama_params_init(&p, &cfg, NULL, &err) < 0) {
        bench_row(sh->name, "error", "", err.msg);
        return;
    }
    optim_init_params(NULL, &p, &cfg, 1);
    int64_t T = sh->T;
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t) (NREC * T));
    int32_t *labels = malloc(sizeof(int32_t) * (size_t) (NREC * T));
    int32_t lengths[NREC];
    if (!tokens || !labels) {
        bench_row(sh->name, "error", "", "out of memory");
        goto out;
    }
    for (int64_t i = 0; i < NREC * T; i++)
        tokens[i] = labels[i] = (int32_t) ((i * 2654435761u) % (uint64_t) cfg.vocab_size);
    for (int i = 0; i < NREC; i++)
        lengths[i] = (int32_t) T;

    struct train_records recs = {
        .n = NREC, .T = T, .tokens = tokens, .labels = labels, .lengths = lengths};
    if (devices != 2)
        trainer_row(sh, &cfg, &p, &recs, 1, false, bf16, peak);
    if (devices != 1)
        trainer_row(sh, &cfg, &p, &recs, 2, false, bf16, peak);
    if (devices != 1 && !bf16 && sh == &shapes[0])
        trainer_row(sh, &cfg, &p, &recs, 2, true, bf16, peak);
out:
    llama_params_release(&p);
    free(tokens);
    free(labels);
}

int main(int argc, char **argv)
{
    openblas_set_num_threads(2);
    double sgemm = bench_sgemm_gflops(1024, 1024, 1024, 9);
    sgemm = fmax(sgemm, bench_sgemm_gflops(1024, 1024, 1024, 9)); /* the second is warm */
    double bf16_peak = bench_bf16_peak_gflops(2);
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        if (argc > 1 && strcmp(argv[1], shapes[i].name))
            continue;
        for (int bf16 = 0; bf16 < 2; bf16++) {
            if (argc > 2 && strcmp(argv[2], bf16 ? "bf16" : "fp32"))
                continue;
            if (bf16 && !bf16_available()) {
                bench_row("train bf16", "skipped", "-", bf16_unavailable_reason());
                continue;
            }
            run_shape(&shapes[i], bf16, bf16 ? bf16_peak : sgemm, argc > 3 ? atoi(argv[3]) : 0);
        }
    }
    return 0;
}
