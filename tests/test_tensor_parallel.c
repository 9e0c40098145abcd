/* test_tensor_parallel.c - the model's tensor-parallel forward and backward give the whole
 * model's loss and every gradient (whose own backward test_llama.c checks by finite
 * differences), for tp 2 and tp 4 (kv heads replicated, a padded vocabulary shard), tied and
 * untied, keeping all activations or recomputing them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "exec/comm.h"
#include "exec/dev.h"
#include "layout/shard.h"
#include "model/llama.h"
#include "model/optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define B 2
#define T 11

static struct model_config tiny(bool tied)
{
    struct model_config c = {0};
    snprintf(c.name, sizeof(c.name), "tiny");
    snprintf(c.architecture, sizeof(c.architecture), "LlamaForCausalLM");
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 4;
    c.vocab_size = 29; /* tp 4: shards of 8 rows, the last with 5 */
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.initializer_range = 0.3;
    c.tie_word_embeddings = tied;
    c.pad_token_id = 0;
    return c;
}

struct tp_case {
    struct model_config full;
    int tp;
    enum llama_keep keep;
    const float *params; /* the whole model's */
    struct llama_batch batch;
    float dloss;
    struct comm_group *g;
    float *grads[4]; /* each shard's gradient arena */
    double loss[4];
    struct shard sh[4];
};

static void tp_allreduce(void *arg, float *buf, int64_t n)
{
    comm_allreduce_sum(arg, buf, (size_t) n);
}

static void tp_allgather(void *arg, const float *in, float *out, int64_t n)
{
    comm_allgather(arg, in, out, (size_t) n);
}

/* One shard's forward and backward on its device thread. */
static int shard_worker(struct dev *d, void *arg)
{
    struct tp_case *tc = arg;
    struct shard *s = &tc->sh[d->id];
    struct moai_err err = {0};
    struct comm c;
    struct llama m;
    struct llama_params p, g;
    struct llama_acts a;
    struct llama_work w;

    comm_init(&c, tc->g, d->id);
    assert_int_equal(llama_init(&m, &s->cfg, 1, &err), 0);
    struct llama_tp hooks = {tc->tp,       d->id, s->vocab_first, s->vocab_rows, tp_allreduce,
                             tp_allgather, &c};
    llama_set_tp(&m, &hooks);
    assert_int_equal(llama_params_init(&p, &s->cfg, NULL, &err), 0);
    assert_int_equal(llama_params_init(&g, &s->cfg, NULL, &err), 0);
    /* with pp = dp = 1 the device's units are the shard's arena in Hugging Face order */
    assert_int_equal(s->floats, p.nfloats);
    for (int u = 0; u < s->nunits; u++)
        shard_unit_from_full(s, u, tc->params, p.arena + s->units[u].off);
    struct llama_shape shape = s->shape;
    shape.keep = tc->keep;
    assert_int_equal(llama_acts_bind_shape(&a, &s->cfg, &shape, NULL, &err), 0);
    assert_int_equal(llama_work_bind_shape(&w, &s->cfg, &shape, NULL, &err), 0);
    tc->loss[d->id] = llama_forward_backward(&m, &p, &g, &a, &w, &tc->batch, tc->dloss);
    tc->grads[d->id] = malloc(sizeof(float) * (size_t) g.nfloats);
    memcpy(tc->grads[d->id], g.arena, sizeof(float) * (size_t) g.nfloats);
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&g);
    llama_params_release(&p);
    llama_release(&m);
    return 0;
}

static double rel_err(const float *a, const float *b, int64_t n)
{
    double d = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        d += ((double) a[i] - b[i]) * ((double) a[i] - b[i]);
        s += (double) b[i] * b[i];
    }
    return sqrt(d / (s > 0 ? s : 1));
}

static void check_tp(bool tied, int tp, enum llama_keep keep)
{
    struct moai_err err = {0};
    struct tp_case tc = {.full = tiny(tied), .tp = tp, .keep = keep};
    const struct model_config *cfg = &tc.full;
    int32_t tokens[B * T], labels[B * T], lengths[B] = {T, T - 4};
    uint64_t s = 99;
    for (int i = 0; i < B * T; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        tokens[i] = (int) ((s >> 33) % (uint64_t) cfg->vocab_size);
        labels[i] = i % T >= lengths[i / T] || i % T < 2 ? -100 : tokens[i];
    }
    tc.batch = (struct llama_batch){B, T, tokens, labels, lengths, NULL};

    /* the whole model */
    struct llama m;
    struct llama_params p, g;
    struct llama_acts a;
    struct llama_work w;
    assert_int_equal(llama_init(&m, cfg, 1, &err), 0);
    assert_int_equal(llama_params_init(&p, cfg, NULL, &err), 0);
    assert_int_equal(llama_params_init(&g, cfg, NULL, &err), 0);
    optim_init_params(NULL, &p, cfg, 5);
    for (int64_t i = 0; i < p.nfloats; i++) /* norms away from 1, all in general position */
        p.arena[i] += 0.01f * (float) ((i * 37) % 11 - 5);
    assert_int_equal(llama_acts_init(&a, cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&w, cfg, B, T, 1, &err), 0);
    tc.dloss = 1.0f / (float) llama_batch_targets(&tc.batch);
    double loss = llama_forward_backward(&m, &p, &g, &a, &w, &tc.batch, tc.dloss);
    tc.params = p.arena;

    /* tp shards on tp device threads */
    struct layout lay = {.dp = 1,
                         .pp = 1,
                         .tp = tp,
                         .num_micro_batches = 1,
                         .batch_per_device = B,
                         .recomputation = RECOMPUTE_NONE};
    for (int r = 0; r < tp; r++)
        assert_int_equal(shard_init(&tc.sh[r], cfg, &lay, T, 1, r, &err), 0);
    struct dev_set ds;
    assert_int_equal(comm_group_create(&tc.g, tp, &err), 0);
    assert_int_equal(dev_set_init(&ds, tp, 1 << 30, &err), 0);
    assert_int_equal(dev_set_run(&ds, shard_worker, &tc, &err), 0);
    dev_set_release(&ds);
    comm_group_free(tc.g);

    /* every shard has the whole loss; the shards' gradients make the whole one (a kv head's
     * shared by several ranks: the sum of their partial gradients) */
    float *joined = calloc((size_t) g.nfloats, sizeof(float));
    for (int r = 0; r < tp; r++) {
        assert_true(fabs(tc.loss[r] - loss) <= 1e-5 * fabs(loss));
        struct shard *sh = &tc.sh[r];
        int sharing = sh->kv_replicated ? tp / (int) cfg->num_key_value_heads : 1;
        for (int u = 0; u < sh->nunits; u++) {
            float *unit = tc.grads[r] + sh->units[u].off;
            if (sh->units[u].kind == SHARD_LAYER && sharing > 1) {
                int64_t k0, k1;
                shard_kv_range(sh, u, &k0, &k1);
                if (r % sharing != 0)
                    continue; /* summed into the first rank sharing it, below */
                for (int o = 1; o < sharing; o++)
                    for (int64_t i = k0; i < k1; i++)
                        unit[i] += tc.grads[r + o][sh->units[u].off + i];
            }
            shard_unit_to_full(sh, u, unit, joined);
        }
    }
    /* ranks past the first of a kv group left their layers out: write theirs but the kv */
    for (int r = 0; r < tp; r++) {
        struct shard *sh = &tc.sh[r];
        int sharing = sh->kv_replicated ? tp / (int) cfg->num_key_value_heads : 1;
        if (sharing == 1 || r % sharing == 0)
            continue;
        for (int u = 0; u < sh->nunits; u++) {
            if (sh->units[u].kind != SHARD_LAYER)
                continue;
            int64_t k0, k1;
            float *unit = tc.grads[r] + sh->units[u].off;
            float *first = tc.grads[r - r % sharing] + sh->units[u].off;
            shard_kv_range(sh, u, &k0, &k1);
            memcpy(unit + k0, first + k0, sizeof(float) * (size_t) (k1 - k0));
            shard_unit_to_full(sh, u, unit, joined);
        }
    }
    double e = rel_err(joined, g.arena, g.nfloats);
    if (e > 1e-5) {
        print_error("tied %d tp %d keep %d: gradients differ by %.3g\n", tied, tp, (int) keep, e);
        fail();
    }
    free(joined);
    for (int r = 0; r < tp; r++) {
        free(tc.grads[r]);
        shard_release(&tc.sh[r]);
    }
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&g);
    llama_params_release(&p);
    llama_release(&m);
}

static void test_tensor_parallel_two_shards(void **state)
{
    (void) state;
    check_tp(false, 2, LLAMA_KEEP_ALL);
    check_tp(true, 2, LLAMA_KEEP_ALL);
}

static void test_tensor_parallel_four_shards_share_kv_heads(void **state)
{
    (void) state;
    check_tp(false, 4, LLAMA_KEEP_ALL);
    check_tp(true, 4, LLAMA_KEEP_ALL);
}

static void test_tensor_parallel_recomputation(void **state)
{
    (void) state;
    check_tp(false, 2, LLAMA_KEEP_NO_PROBS);
    check_tp(true, 4, LLAMA_KEEP_INPUT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tensor_parallel_two_shards),
        cmocka_unit_test(test_tensor_parallel_four_shards_share_kv_heads),
        cmocka_unit_test(test_tensor_parallel_recomputation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
