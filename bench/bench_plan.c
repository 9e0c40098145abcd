/* bench_plan.c - planning time and candidate count for Llama-3-70B on 48xlarge (384 devices),
 * batch 1024, block 1024. Target: at least 1,000 candidates in under 100 ms. */
#include "bench_util.h"

#include "log.h"
#include "plan/plan.h"

#include <string.h>

int main(void)
{
    static const char text[] = "model: {path: configs/models/llama3-70b}\ndataset: {path: d}\n"
                               "training: {batch_size: 1024, block_size: 1024}\n"
                               "flavor: 48xlarge\n";
    struct recipe r;
    struct model_config cfg;
    struct plan_result res;
    struct moai_err err = {0};
    double ms[9];
    char fig[64], note[256], brief[128];

    log_set_level(LOG_WARN);
    if (recipe_load_string(&r, text, strlen(text), "bench.yaml", NULL, &err) < 0 ||
        model_config_load(&cfg, "configs/models/llama3-70b/config.json", NULL, &err) < 0) {
        bench_row("planner: llama3-70b on 48xlarge", "error", "", err.msg);
        return 1;
    }
    for (int i = 0; i < 9; i++) {
        double t0 = bench_now();
        plan_search(&res, &cfg, &r, &err);
        ms[i] = (bench_now() - t0) * 1e3;
    }
    snprintf(fig, sizeof(fig), "%.1f ms", bench_median(ms, 9));
    snprintf(note, sizeof(note), "%lld candidates, %lld fit; picks %s (median of 9)",
             (long long) res.candidates, (long long) res.feasible,
             plan_brief(brief, sizeof(brief), &res.best));
    bench_row("planner: llama3-70b, 48xlarge, batch 1024", fig, "< 100 ms", note);
    recipe_release(&r);
    return 0;
}
