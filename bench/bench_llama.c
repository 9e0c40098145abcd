/* bench_llama.c - training-step throughput of the Llama model, fp32 against the sgemm rate and
 * bf16 (llama_set_bf16) against the bf16 dot-product peak.
 *
 * One step is what training does per optimizer step: zero the gradients, forward and backward
 * of a B x T micro-batch, clip the gradient norm to 1, AdamW. Two shapes, on 2 threads; the
 * figure is the median of several steps after a warm-up step. FLOPs per token are counted as
 * 6 x (weights that multiply activations, lm_head included) + 12 x layers x seq x hidden for
 * attention (scores and weighted sum, forward and backward, without the causal halving), and
 * compared with OpenBLAS sgemm on 2 threads measured just before in the same run (fp32), or
 * with a loop of vdpbf16ps on 2 threads (bf16; no row without AVX512_BF16).
 *
 *     bench_llama                 both shapes, fp32 and bf16
 *     bench_llama small 3         one shape, 3 timed steps
 *     bench_llama tiny 5 bf16     one shape, one precision
 */
#include "bench_util.h"

#include "model/llama.h"
#include "model/optim.h"

#include <stdint.h>
#include <string.h>

struct shape {
    const char *name;
    int64_t D, L, H, F, V, T, B;
    int steps;
    double target_tokens_s;
};

static const struct shape shapes[] = {
    {"tiny", 288, 6, 6, 768, 32000, 256, 8, 7, 1700.0},
    {"small", 768, 12, 12, 2048, 32000, 512, 4, 5, 240.0},
};

static struct model_config shape_config(const struct shape *s)
{
    return bench_model_config(s->name, s->D, s->L, s->H, s->F, s->V, s->T);
}

static double flops_per_token(const struct model_config *c, int64_t T)
{
    double D = (double) c->hidden_size, hd = (double) c->head_dim;
    double qkv = D * (double) (c->num_attention_heads + 2 * c->num_key_value_heads) * hd;
    double layer = qkv + (double) c->num_attention_heads * hd * D + 3.0 * D * c->intermediate_size;
    double weights = (double) c->num_hidden_layers * layer + (double) c->vocab_size * D;
    return 6.0 * weights + 12.0 * (double) c->num_hidden_layers * (double) T * D;
}

static int run_shape(const struct shape *s, int steps, bool bf16)
{
    struct moai_err err = {0};
    struct model_config cfg = shape_config(s);
    struct llama m;
    struct llama_params p, g, m1, m2;
    struct llama_acts a;
    struct llama_work w;
    const int nthreads = 2;
    char fig[64], target[64], note[160], name[96];

    openblas_set_num_threads(2);
    double peak = bf16 ? bench_bf16_peak_gflops(nthreads) : bench_sgemm_gflops(1024, 1024, 1024, 9);

    if (llama_init(&m, &cfg, nthreads, &err) < 0 || llama_params_init(&p, &cfg, NULL, &err) < 0 ||
        llama_params_init(&g, &cfg, NULL, &err) < 0 ||
        llama_params_init(&m1, &cfg, NULL, &err) < 0 ||
        llama_params_init(&m2, &cfg, NULL, &err) < 0 ||
        llama_acts_init(&a, &cfg, s->B, s->T, &err) < 0 ||
        llama_work_init(&w, &cfg, s->B, s->T, nthreads, &err) < 0) {
        fprintf(stderr, "bench_llama: %s\n", err.msg);
        return 1;
    }
    llama_set_bf16(&m, bf16);
    optim_init_params(m.pool, &p, &cfg, 42);

    int64_t N = s->B * s->T;
    int32_t *tokens = malloc(sizeof(int32_t) * (size_t) N);
    uint64_t r = 1;
    for (int64_t i = 0; i < N; i++) {
        r = optim_rng(7, 0, (uint64_t) i);
        tokens[i] = (int32_t) (r % (uint64_t) cfg.vocab_size);
    }
    struct llama_batch b = {s->B, s->T, tokens, tokens, NULL, NULL};
    float dloss = 1.0f / (float) llama_batch_targets(&b);
    struct optim_adamw hp = {
        .lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01};

    double t[64], loss = 0.0;
    if (steps > 63)
        steps = 63;
    for (int k = 0; k <= steps; k++) {
        double t0 = bench_now();
        llama_params_zero(&m, &g);
        loss = llama_forward_backward(&m, &p, &g, &a, &w, &b, dloss) * dloss;
        optim_clip_grad_norm(m.pool, g.arena, g.nfloats, 1.0);
        optim_adamw_step(m.pool, p.arena, g.arena, m1.arena, m2.arena, p.nfloats, k + 1, &hp);
        if (k > 0)
            t[k - 1] = bench_now() - t0;
    }
    double med = bench_median(t, steps);
    double tokens_s = (double) N / med;
    double gflops = tokens_s * flops_per_token(&cfg, s->T) * 1e-9;

    snprintf(name, sizeof(name), "llama %s train step %s, 2 threads", s->name,
             bf16 ? "bf16" : "fp32");
    snprintf(fig, sizeof(fig), "%.0f tokens/s", tokens_s);
    if (bf16)
        snprintf(target, sizeof(target), "-");
    else
        snprintf(target, sizeof(target), ">= %.0f", s->target_tokens_s);
    snprintf(note, sizeof(note),
             "%.1f GFLOP/s = %.0f%% of %s %.1f; median of %d steps of %.3f s; loss %.3f", gflops,
             100.0 * gflops / peak, bf16 ? "bf16 dot peak" : "sgemm", peak, steps, med, loss);
    bench_row(name, fig, target, note);

    free(tokens);
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&m2);
    llama_params_release(&m1);
    llama_params_release(&g);
    llama_params_release(&p);
    llama_release(&m);
    return 0;
}

int main(int argc, char **argv)
{
    int rc = 0;
    if (argc > 2 && atoi(argv[2]) < 1) {
        fprintf(stderr, "usage: bench_llama [tiny|small [timed steps >= 1 [fp32|bf16]]]\n");
        return 2;
    }
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        if (argc > 1 && strcmp(argv[1], shapes[i].name))
            continue;
        for (int bf16 = 0; bf16 < 2; bf16++) {
            if (argc > 3 && strcmp(argv[3], bf16 ? "bf16" : "fp32"))
                continue;
            if (bf16 && !bf16_available()) {
                bench_row("llama train step bf16", "skipped", "-", bf16_unavailable_reason());
                continue;
            }
            rc |= run_shape(&shapes[i], argc > 2 ? atoi(argv[2]) : shapes[i].steps, bf16);
        }
    }
    return rc;
}
