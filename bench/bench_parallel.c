/* bench_parallel.c - the shipped tiny model under several parallel plans on 4 cpu devices:
 * measured step time and peak memory beside the planner's predictions for the same plan, so
 * the cost and memory models are checked against this machine. */
#include "bench_util.h"

#include "exec/train.h"
#include "model/optim.h"
#include "plan/cost.h"
#include "plan/mem.h"
#include "plan/plan.h"

#include <math.h>
#include <string.h>

#define NREC  64
#define SEQ   256
#define BATCH 8
#define STEPS 5

static void rows_fn(void *arg, int64_t epoch, int64_t index, int64_t *rows)
{
    (void) arg;
    for (int64_t i = 0; i < BATCH; i++)
        rows[i] = (epoch * 13 + index * BATCH + i) % NREC;
}

struct layout_case {
    int dp, pp, tp, nmb;
    enum recompute rc;
    bool zero2, zero3;
};

static void run(const struct model_config *cfg, const struct layout_case *c, const float *init,
                const int32_t *tokens, const int32_t *lengths, double *ratio_sum, int *nratio)
{
    struct moai_err err = {0};
    char text[256], name[96], fig[32], target[32], note[200];
    struct recipe r;
    snprintf(text, sizeof(text),
             "model: {path: m}\ndataset: {path: d}\ntraining: {batch_size: %d, block_size: %d,"
             " precision: fp32}\nflavor: {device: cpu, devices: 4}\n",
             BATCH, SEQ);
    if (recipe_load_string(&r, text, strlen(text), "bench.yaml", NULL, &err) < 0) {
        bench_row("parallel", "error", "", err.msg);
        return;
    }
    struct plan p = {.lay = {.dp = c->dp,
                             .pp = c->pp,
                             .tp = c->tp,
                             .num_micro_batches = c->nmb,
                             .batch_per_device = BATCH / c->dp / c->nmb,
                             .recomputation = c->rc,
                             .distribute_param = c->zero2,
                             .distribute_low_prec_param = c->zero3}};
    struct cost_breakdown cost;
    struct mem_breakdown mem;
    cost_estimate(&cost, cfg, &r, &p);
    mem_estimate(&mem, cfg, &r, &p);

    int64_t batch = BATCH, peaks[4] = {0}; /* the benchmark's layouts use 4 devices */
    struct train_job job = {
        .recipe = &r,
        .cfg = cfg,
        .layout = {.dp = p.lay.dp,
                   .pp = p.lay.pp,
                   .tp = p.lay.tp,
                   .num_micro_batches = p.lay.num_micro_batches,
                   .batch_per_device = p.lay.batch_per_device,
                   .recomputation = p.lay.recomputation,
                   .distribute_param = p.lay.distribute_param,
                   .distribute_low_prec_param = p.lay.distribute_low_prec_param},
        .train = {.n = NREC, .T = SEQ, .tokens = tokens, .labels = tokens, .lengths = lengths},
        .batch_rows = rows_fn,
        .batch_arg = &batch,
        .steps_per_epoch = NREC / BATCH,
        .total_steps = STEPS,
        .init_params = init,
        .quiet = true,
        .peak_bytes = peaks,
    };
    struct train_result res;
    snprintf(name, sizeof(name), "parallel: dp %d pp %d tp %d mb %dx%lld rc %s%s", p.lay.dp,
             p.lay.pp, p.lay.tp, p.lay.num_micro_batches, (long long) p.lay.batch_per_device,
             recipe_recompute_name(p.lay.recomputation),
             p.lay.distribute_low_prec_param ? " z3"
             : p.lay.distribute_param        ? " z2"
                                             : "");
    if (exec_train(&job, &res, &err) < 0) {
        bench_row(name, "error", "", err.msg);
        recipe_release(&r);
        return;
    }
    int64_t peak = 0;
    for (int i = 0; i < res.ndev && i < 4; i++)
        peak = peaks[i] > peak ? peaks[i] : peak;
    double ratio = cost.step_seconds / res.median_step_s;
    *ratio_sum += log(ratio);
    (*nratio)++;
    snprintf(fig, sizeof(fig), "%.3f s", res.median_step_s);
    snprintf(target, sizeof(target), "pred %.3f s", cost.step_seconds);
    snprintf(note, sizeof(note),
             "predicted/measured time %.2f; memory %lld bytes, predicted/measured %.3f; median "
             "of %d steps",
             ratio, (long long) peak, (double) mem.total_bytes / (double) peak, STEPS - 1);
    bench_row(name, fig, target, note);
    recipe_release(&r);
}

int main(void)
{
    struct model_config cfg;
    struct moai_err err = {0};
    if (model_config_load(&cfg, "models/tiny-llama/config.json", NULL, &err) < 0) {
        bench_row("parallel", "error", "", err.msg);
        return 0;
    }
    int32_t *tokens = malloc(sizeof(int32_t) * NREC * SEQ), lengths[NREC];
    for (int64_t i = 0; i < NREC * SEQ; i++)
        tokens[i] = 4 + (int32_t) ((i * 2654435761u) % (uint64_t) (cfg.vocab_size - 4));
    for (int i = 0; i < NREC; i++)
        lengths[i] = SEQ;
    struct llama_params p;
    if (llama_params_init(&p, &cfg, NULL, &err) < 0) {
        bench_row("parallel", "error", "", err.msg);
        return 0;
    }
    optim_init_params(NULL, &p, &cfg, 1);

    static const struct layout_case cases[] = {
        {4, 1, 1, 1, RECOMPUTE_NONE, false, false},      {4, 1, 1, 1, RECOMPUTE_NONE, true, true},
        {2, 1, 2, 1, RECOMPUTE_NONE, false, false},      {1, 1, 4, 1, RECOMPUTE_NONE, false, false},
        {2, 2, 1, 2, RECOMPUTE_NONE, false, false},      {1, 4, 1, 8, RECOMPUTE_NONE, false, false},
        {1, 2, 2, 4, RECOMPUTE_SELECTIVE, false, false}, {2, 2, 1, 4, RECOMPUTE_FULL, true, false},
    };
    double ratio_sum = 0;
    int nratio = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run(&cfg, &cases[i], p.arena, tokens, lengths, &ratio_sum, &nratio);
    if (nratio > 0) {
        char fig[32];
        snprintf(fig, sizeof(fig), "%.2f", exp(ratio_sum / nratio));
        bench_row("parallel: predicted/measured step, geomean", fig, "1.00 +- 0.25",
                  "the cpu cost model against the plans above (tiny-llama, 8 x 256, 4 devices)");
    }
    llama_params_release(&p);
    free(tokens);
    return 0;
}
