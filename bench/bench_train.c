/* bench_train.c - training throughput of whole steps on virtual devices: the tiny shape on 1
 * and 2 devices (data parallel, and ZeRO-2), beside the machine's sgemm rate. */
#include "bench_util.h"

#include "exec/train.h"
#include "model/optim.h"

#include <math.h>
#include <string.h>

#define NREC 64

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

static void run(const char *name, int dp, bool zero2, double sgemm)
{
    struct model_config cfg;
    struct moai_err err = {0};
    json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i}", "hidden_size", 288, "intermediate_size",
                          768, "num_hidden_layers", 6, "num_attention_heads", 6, "vocab_size",
                          32000);
    model_config_load(&cfg, NULL, o, &err);
    json_decref(o);
    const int64_t T = 256, batch = 8, steps = 6;
    int32_t *tokens = malloc(sizeof(int32_t) * NREC * T), *labels = malloc(sizeof(int32_t) * NREC * T);
    int32_t lengths[NREC];
    for (int64_t i = 0; i < NREC * T; i++)
        tokens[i] = labels[i] = (int32_t) ((i * 2654435761u) % 32000);
    for (int i = 0; i < NREC; i++)
        lengths[i] = (int32_t) T;
    struct llama_params p;
    llama_params_init(&p, &cfg, NULL, &err);
    optim_init_params(NULL, &p, &cfg, 1);

    char text[256];
    struct recipe r;
    snprintf(text, sizeof(text),
             "model: {path: m}\ndataset: {path: d}\ntraining: {batch_size: 8, block_size: 256,"
             " precision: fp32}\nflavor: {device: cpu, devices: %d}\n", dp);
    recipe_load_string(&r, text, strlen(text), "bench.yaml", NULL, &err);
    struct train_job job = {
        .recipe = &r, .cfg = &cfg,
        .layout = {.dp = dp, .pp = 1, .tp = 1, .num_micro_batches = 1,
                   .batch_per_device = batch / dp, .distribute_param = zero2},
        .train = {.n = NREC, .T = T, .tokens = tokens, .labels = labels, .lengths = lengths},
        .batch_rows = rows_fn, .batch_arg = (void *) &batch, .steps_per_epoch = 8,
        .total_steps = steps, .init_params = p.arena, .quiet = true,
    };
    struct train_result res;
    char fig[64], note[160];
    if (exec_train(&job, &res, &err) < 0) {
        bench_row(name, "error", "", err.msg);
    } else {
        double gflops = step_flops(&cfg, batch * T, T) / res.median_step_s * 1e-9;
        snprintf(fig, sizeof(fig), "%.0f tok/s", res.median_tokens_per_s);
        snprintf(note, sizeof(note), "%.1f GFLOP/s = %.0f%% of sgemm %.1f; median of %lld steps",
                 gflops, 100.0 * gflops / sgemm, sgemm, (long long) (steps - 1));
        bench_row(name, fig, ">= 1700", note);
    }
    recipe_release(&r);
    llama_params_release(&p);
    free(tokens);
    free(labels);
}

int main(void)
{
    openblas_set_num_threads(2);
    double sgemm = bench_sgemm_gflops(1024, 1024, 1024, 9);
    sgemm = fmax(sgemm, bench_sgemm_gflops(1024, 1024, 1024, 9)); /* the second is warm */
    run("train tiny (288x6, V 32000, 8x256), 1 device", 1, false, sgemm);
    run("train tiny, 2 devices, data parallel", 2, false, sgemm);
    run("train tiny, 2 devices, distribute_param", 2, true, sgemm);
    return 0;
}
