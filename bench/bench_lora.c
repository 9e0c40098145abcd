/* bench_lora.c - LoRA against full fine-tuning: training-step throughput and memory of the
 * model on the cpu, and the planner's memory for Llama-2-13B and Llama-3-70B.
 *
 * A step is what training does per optimizer step (bench_llama's): zero the gradients,
 * forward and backward of a B x T micro-batch, clip to 1, AdamW; full fine-tuning updates
 * every weight, LoRA (rank 16 on the seven projections, the base frozen) only the adapters.
 * Two shapes on 2 threads, the median of several steps after a warm-up; both run in the same
 * process, LoRA's first, so each figure is compared with the other measured here. Memory is
 * the bytes of the arenas each allocates (weights, gradients, moments, activations,
 * workspace), and the process's peak resident size (VmHWM) after each (LoRA's before the full
 * fine-tuning's buffers exist). The planner rows give the memory per device of the shipped
 * recipes' best plans, and on a one-device flavor (small) where full fine-tuning of 13B does
 * not fit.
 *
 *     bench_lora            everything
 *     bench_lora small 3    one shape, 3 timed steps
 *     bench_lora plan       the planner's rows only
 */
#include "bench_util.h"

#include "log.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optim.h"
#include "plan/mem.h"
#include "plan/plan.h"
#include "recipe.h"

#include <stdint.h>
#include <string.h>

struct shape {
    const char *name;
    int64_t D, L, H, F, V, T, B;
    int steps;
};

static const struct shape shapes[] = {
    {"tiny", 288, 6, 6, 768, 32000, 256, 8, 7},
    {"small", 768, 12, 12, 2048, 32000, 512, 4, 5},
};

static const struct lora_config bench_lora = {16, 32.0, 0.0, MODEL_LORA_ALL, 42};

static struct model_config shape_config(const struct shape *s)
{
    return bench_model_config(s->name, s->D, s->L, s->H, s->F, s->V, s->T);
}

static int64_t peak_bytes(void)
{
    return mem_process_peak_bytes();
}

struct result {
    double tokens_s, step_s;
    int64_t arena_bytes, peak_bytes;
};

/* Median tokens/s of training steps, full fine-tuning (lora false) or LoRA. */
static int run_steps(const struct shape *s, bool lora, int steps, struct result *res)
{
    struct moai_err err = {0};
    struct model_config cfg = shape_config(s);
    struct llama m;
    struct llama_params p, g = {0}, m1, m2;
    struct lora_params a, ga, a1, a2;
    struct lora st;
    struct llama_acts acts;
    struct llama_work w;
    const int nthreads = 2;
    int64_t L = cfg.num_hidden_layers, N = s->B * s->T;

    if (llama_init(&m, &cfg, nthreads, &err) < 0 || llama_params_init(&p, &cfg, NULL, &err) < 0 ||
        llama_acts_init(&acts, &cfg, s->B, s->T, &err) < 0 ||
        llama_work_init(&w, &cfg, s->B, s->T, nthreads, &err) < 0)
        goto fail;
    optim_init_params(m.pool, &p, &cfg, 42);
    res->arena_bytes = (int64_t) (llama_param_bytes(&cfg) + acts.bytes + w.bytes);
    if (lora) {
        struct lora_params *arenas[] = {&a, &ga, &a1, &a2};
        for (int i = 0; i < 4; i++)
            if (lora_params_init(arenas[i], &cfg, bench_lora.rank, bench_lora.targets, 0, NULL,
                                 &err) < 0)
                goto fail;
        if (lora_init(&st, &cfg, &bench_lora, s->B, s->T, &err) < 0)
            goto fail;
        lora_init_peft(&a, &cfg, &cfg, 0, bench_lora.rank, bench_lora.targets, bench_lora.seed);
        lora_attach(&m, &st);
        st.train = true;
        g.layers = calloc((size_t) L, sizeof(struct llama_layer));
        if (!g.layers)
            goto fail;
        for (int64_t l = 0; l < L; l++) {
            p.layers[l].lora = &a.layers[l];
            g.layers[l].lora = &ga.layers[l];
        }
        res->arena_bytes += 4 * 4 * a.nfloats + (int64_t) st.bytes;
    } else {
        if (llama_params_init(&g, &cfg, NULL, &err) < 0 ||
            llama_params_init(&m1, &cfg, NULL, &err) < 0 ||
            llama_params_init(&m2, &cfg, NULL, &err) < 0)
            goto fail;
        res->arena_bytes += 3 * (int64_t) llama_param_bytes(&cfg);
    }

    int32_t *tokens = malloc(sizeof(int32_t) * (size_t) N);
    for (int64_t i = 0; i < N; i++)
        tokens[i] = (int32_t) (optim_rng(7, 0, (uint64_t) i) % (uint64_t) cfg.vocab_size);
    struct llama_batch b = {s->B, s->T, tokens, tokens, NULL, NULL};
    float dloss = 1.0f / (float) llama_batch_targets(&b);
    struct optim_adamw hp = {
        .lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};
    double t[64];
    for (int k = 0; k <= steps; k++) {
        double t0 = bench_now();
        if (lora) {
            memset(ga.arena, 0, sizeof(float) * (size_t) ga.nfloats);
            st.stream = (uint64_t) k;
            llama_forward_backward(&m, &p, &g, &acts, &w, &b, dloss);
            optim_clip_grad_norm(m.pool, ga.arena, ga.nfloats, 1.0);
            optim_adamw_step(m.pool, a.arena, ga.arena, a1.arena, a2.arena, a.nfloats, k + 1, &hp);
        } else {
            llama_params_zero(&m, &g);
            llama_forward_backward(&m, &p, &g, &acts, &w, &b, dloss);
            optim_clip_grad_norm(m.pool, g.arena, g.nfloats, 1.0);
            optim_adamw_step(m.pool, p.arena, g.arena, m1.arena, m2.arena, p.nfloats, k + 1, &hp);
        }
        if (k > 0)
            t[k - 1] = bench_now() - t0;
    }
    res->step_s = bench_median(t, steps);
    res->tokens_s = (double) N / res->step_s;
    res->peak_bytes = peak_bytes();
    free(tokens);
    if (lora) {
        free(g.layers);
        lora_release(&st);
        lora_params_release(&a2);
        lora_params_release(&a1);
        lora_params_release(&ga);
        lora_params_release(&a);
    } else {
        llama_params_release(&m2);
        llama_params_release(&m1);
        llama_params_release(&g);
    }
    llama_work_release(&w);
    llama_acts_release(&acts);
    llama_params_release(&p);
    llama_release(&m);
    return 0;
fail:
    fprintf(stderr, "bench_lora: %s\n", err.msg);
    return 1;
}

static int run_shape(const struct shape *s, int steps)
{
    struct result lo, fu;
    char name[96], fig[64], target[64], note[200];
    if (steps > 63)
        steps = 63;
    openblas_set_num_threads(2);
    if (run_steps(s, true, steps, &lo) || run_steps(s, false, steps, &fu))
        return 1;
    snprintf(name, sizeof(name), "lora %s train step, 2 threads", s->name);
    snprintf(fig, sizeof(fig), "%.0f tokens/s", lo.tokens_s);
    snprintf(target, sizeof(target), ">= %.0f (full)", fu.tokens_s);
    snprintf(note, sizeof(note), "x%.2f of full fine-tuning; medians of %d steps: %.3f s, %.3f s",
             lo.tokens_s / fu.tokens_s, steps, lo.step_s, fu.step_s);
    bench_row(name, fig, target, note);
    snprintf(name, sizeof(name), "lora %s memory (arenas)", s->name);
    snprintf(fig, sizeof(fig), "%.1f MiB", (double) lo.arena_bytes / 1048576.0);
    snprintf(target, sizeof(target), "< %.1f MiB", (double) fu.arena_bytes / 1048576.0);
    snprintf(note, sizeof(note), "full fine-tuning's arenas; process peak %.1f MiB, then %.1f MiB",
             (double) lo.peak_bytes / 1048576.0, (double) fu.peak_bytes / 1048576.0);
    bench_row(name, fig, target, note);
    return 0;
}

/* The planner's best plan of a shipped recipe, with and without LoRA. */
static int plan_rows(const char *path, const char *label, const char *flavor)
{
    char set_flavor[64], name[96], fig[64], target[64], note[200], brief[64];
    const char *sets[] = {set_flavor, "lora={rank: 16, alpha: 32}"};
    struct plan_result res[2];
    int rc[2];
    snprintf(set_flavor, sizeof(set_flavor), "flavor=%s", flavor);
    for (int k = 0; k < 2; k++) {
        struct recipe r;
        struct model_config cfg;
        struct moai_err err = {0};
        char cpath[4096];
        struct recipe_overrides ov = {.sets = sets, .nsets = 1 + k, .ap = -1};
        if (recipe_load(&r, path, &ov, &err) < 0)
            return fprintf(stderr, "bench_lora: %s\n", err.msg), 1;
        snprintf(cpath, sizeof(cpath), "%s/config.json", r.model.path);
        if (model_config_load(&cfg, cpath, NULL, &err) < 0)
            return fprintf(stderr, "bench_lora: %s\n", err.msg), 1;
        rc[k] = plan_search(&res[k], &cfg, &r, &err);
        recipe_release(&r);
    }
    snprintf(name, sizeof(name), "plan %s on %s, lora", label, flavor);
    if (rc[1] < 0)
        snprintf(fig, sizeof(fig), "OUT_OF_MEMORY");
    else
        snprintf(fig, sizeof(fig), "%.1f GiB", (double) res[1].best.mem.total_bytes / 1073741824.0);
    if (rc[0] < 0)
        snprintf(target, sizeof(target), "full: OOM");
    else
        snprintf(target, sizeof(target), "full %.1f GiB",
                 (double) res[0].best.mem.total_bytes / 1073741824.0);
    if (rc[1] == 0 && rc[0] == 0)
        snprintf(note, sizeof(note), "per device; %.0f vs %.0f tokens/s predicted; lora %s",
                 res[1].best.tokens_per_second, res[0].best.tokens_per_second,
                 plan_brief(brief, sizeof(brief), &res[1].best));
    else if (rc[1] == 0)
        snprintf(note, sizeof(note), "full fine-tuning requests %.1f GiB; lora: %.0f tokens/s",
                 (double) res[0].requested_bytes / 1073741824.0, res[1].best.tokens_per_second);
    else
        snprintf(note, sizeof(note), "neither fits");
    bench_row(name, fig, target, note);
    return 0;
}

int main(int argc, char **argv)
{
    int rc = 0;
    log_set_level(LOG_WARN);
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        if (argc > 1 && strcmp(argv[1], shapes[i].name))
            continue;
        rc |= run_shape(&shapes[i], argc > 2 ? atoi(argv[2]) : shapes[i].steps);
    }
    if (argc > 1 && strcmp(argv[1], "plan"))
        return rc;
    rc |= plan_rows("configs/llama2-13b.yaml", "llama2-13b", "4xlarge");
    rc |= plan_rows("configs/llama2-13b.yaml", "llama2-13b", "small");
    rc |= plan_rows("configs/llama3-70b.yaml", "llama3-70b", "8xlarge");
    rc |= plan_rows("configs/llama3-70b.yaml", "llama3-70b", "xlarge");
    return rc;
}
