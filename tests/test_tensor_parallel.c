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
#include "exec/lora_dev.h"
#include "layout/shard.h"
#include "model/llama.h"
#include "model/lora.h"
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

/* ---- LoRA ------------------------------------------------------------------------------- */

/* The adapters of the layer tests: every target, rank 3, dropout on (its mask is drawn by the
 * element's place in the whole input, so the shards draw the single device's). */
static const struct lora_config lora_cfg = {3, 6.0, 0.2, MODEL_LORA_ALL, 23};

struct lora_case {
    struct tp_case tc;
    const struct lora_params *full; /* the whole model's adapters */
    float *grads[4];                /* each shard's adapter gradients (its own arena) */
    struct lora_params part[4];     /* each shard's adapters (for the join) */
};

static int64_t target_out(const struct model_config *cfg, int t)
{
    return model_dim(cfg, model_layer_tensors[model_lora_targets[t].layer].rows);
}

static int64_t target_in(const struct model_config *cfg, int t)
{
    return model_dim(cfg, model_layer_tensors[model_lora_targets[t].layer].cols);
}

/* A frozen base's gradient struct for p's layers whose adapters' gradients are ga's. */
static void frozen_grads(struct llama_params *g, struct lora_params *ga, int64_t L)
{
    memset(g, 0, sizeof(*g));
    g->layers = calloc((size_t) L, sizeof(struct llama_layer));
    assert_non_null(g->layers);
    g->nlayers = L;
    for (int64_t l = 0; l < L; l++)
        g->layers[l].lora = &ga->layers[l];
}

static int lora_shard_worker(struct dev *d, void *arg)
{
    struct lora_case *lc = arg;
    struct tp_case *tc = &lc->tc;
    struct shard *s = &tc->sh[d->id];
    struct moai_err err = {0};
    struct comm c;
    struct llama m;
    struct llama_params p, g;
    struct lora_params ga;
    struct llama_acts a;
    struct llama_work w;
    struct lora st;
    int64_t L = s->cfg.num_hidden_layers;

    comm_init(&c, tc->g, d->id);
    assert_int_equal(llama_init(&m, &s->cfg, 1, &err), 0);
    struct llama_tp hooks = {tc->tp,       d->id, s->vocab_first, s->vocab_rows, tp_allreduce,
                             tp_allgather, &c};
    llama_set_tp(&m, &hooks);
    assert_int_equal(llama_params_init(&p, &s->cfg, NULL, &err), 0);
    for (int u = 0; u < s->nunits; u++)
        shard_unit_from_full(s, u, tc->params, p.arena + s->units[u].off);
    struct lora_params *ap = &lc->part[d->id];
    assert_int_equal(lora_params_init(ap, &s->cfg, lora_cfg.rank, lora_cfg.targets, 0, NULL, &err),
                     0);
    assert_int_equal(lora_params_init(&ga, &s->cfg, lora_cfg.rank, lora_cfg.targets, 0, NULL, &err),
                     0);
    for (int64_t l = 0; l < L; l++) {
        shard_lora_copy(s, &lc->full->layers[l], &ap->layers[l], lora_cfg.rank, lora_cfg.targets,
                        false);
        p.layers[l].lora = &ap->layers[l];
    }
    frozen_grads(&g, &ga, L);
    assert_int_equal(lora_init(&st, &s->cfg, &lora_cfg, B, T, &err), 0);
    st.train = true;
    st.stream = 4;
    lora_attach(&m, &st);
    struct llama_shape shape = s->shape;
    shape.keep = tc->keep;
    assert_int_equal(llama_acts_bind_shape(&a, &s->cfg, &shape, NULL, &err), 0);
    assert_int_equal(llama_work_bind_shape(&w, &s->cfg, &shape, NULL, &err), 0);
    tc->loss[d->id] = llama_forward_backward(&m, &p, &g, &a, &w, &tc->batch, tc->dloss);
    lc->grads[d->id] = malloc(sizeof(float) * (size_t) ga.nfloats);
    memcpy(lc->grads[d->id], ga.arena, sizeof(float) * (size_t) ga.nfloats);
    free(g.layers);
    lora_release(&st);
    lora_params_release(&ga);
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&p);
    llama_release(&m);
    return 0;
}

/* LoRA under tensor parallelism gives the single device's loss and adapter gradients: the
 * shards' parts of a split tensor joined (summed where a shared kv head's ranks each hold a
 * partial gradient), and a tensor every shard holds whole equal on all of them. */
static void check_tp_lora(bool tied, int tp, enum llama_keep keep)
{
    struct moai_err err = {0};
    struct lora_case lc = {.tc = {.full = tiny(tied), .tp = tp, .keep = keep}};
    struct tp_case *tc = &lc.tc;
    const struct model_config *cfg = &tc->full;
    int64_t L = cfg->num_hidden_layers, rank = lora_cfg.rank;
    int32_t tokens[B * T], labels[B * T], lengths[B] = {T, T - 4};
    uint64_t s = 7;
    for (int i = 0; i < B * T; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        tokens[i] = (int) ((s >> 33) % (uint64_t) cfg->vocab_size);
        labels[i] = i % T >= lengths[i / T] || i % T < 2 ? -100 : tokens[i];
    }
    tc->batch = (struct llama_batch){B, T, tokens, labels, lengths, NULL};

    /* the whole model with non-zero adapters */
    struct llama m;
    struct llama_params p, g;
    struct lora_params a, ga;
    struct llama_acts acts;
    struct llama_work w;
    struct lora st;
    assert_int_equal(llama_init(&m, cfg, 1, &err), 0);
    assert_int_equal(llama_params_init(&p, cfg, NULL, &err), 0);
    optim_init_params(NULL, &p, cfg, 5);
    assert_int_equal(lora_params_init(&a, cfg, rank, lora_cfg.targets, 0, NULL, &err), 0);
    assert_int_equal(lora_params_init(&ga, cfg, rank, lora_cfg.targets, 0, NULL, &err), 0);
    lora_init_peft(&a, cfg, cfg, 0, rank, lora_cfg.targets, lora_cfg.seed);
    for (int64_t l = 0; l < L; l++) {
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++) /* B: small, not zero */
            optim_init_normal(a.layers[l].lora_B[t], 0, rank * target_out(cfg, t), 0.2, 31,
                              (uint64_t) (l * 8 + t));
        p.layers[l].lora = &a.layers[l];
    }
    frozen_grads(&g, &ga, L);
    assert_int_equal(lora_init(&st, cfg, &lora_cfg, B, T, &err), 0);
    st.train = true;
    st.stream = 4;
    lora_attach(&m, &st);
    assert_int_equal(llama_acts_init(&acts, cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&w, cfg, B, T, 1, &err), 0);
    tc->dloss = 1.0f / (float) llama_batch_targets(&tc->batch);
    double loss = llama_forward_backward(&m, &p, &g, &acts, &w, &tc->batch, tc->dloss);
    tc->params = p.arena;
    lc.full = &a;

    struct layout lay = {.dp = 1,
                         .pp = 1,
                         .tp = tp,
                         .num_micro_batches = 1,
                         .batch_per_device = B,
                         .recomputation = RECOMPUTE_NONE};
    for (int r = 0; r < tp; r++)
        assert_int_equal(shard_init(&tc->sh[r], cfg, &lay, T, 1, r, &err), 0);
    struct dev_set ds;
    assert_int_equal(comm_group_create(&tc->g, tp, &err), 0);
    assert_int_equal(dev_set_init(&ds, tp, 1 << 30, &err), 0);
    assert_int_equal(dev_set_run(&ds, lora_shard_worker, &lc, &err), 0);
    dev_set_release(&ds);
    comm_group_free(tc->g);

    /* join: the sum of every shard's part written into the whole (a split row or column is
     * one shard's, a shared kv head's rows the sum of its ranks' partials); a tensor held whole
     * (A of q, k, v, gate, up; B of o, down) is rank 0's, and every rank's equals it */
    struct lora_params joined, whole;
    assert_int_equal(lora_params_init(&joined, cfg, rank, lora_cfg.targets, 0, NULL, &err), 0);
    assert_int_equal(lora_params_init(&whole, cfg, rank, lora_cfg.targets, 0, NULL, &err), 0);
    for (int r = 0; r < tp; r++) {
        assert_true(fabs(tc->loss[r] - loss) <= 1e-5 * fabs(loss));
        memcpy(lc.part[r].arena, lc.grads[r], sizeof(float) * (size_t) lc.part[r].nfloats);
        memset(whole.arena, 0, sizeof(float) * (size_t) whole.nfloats);
        for (int64_t l = 0; l < L; l++)
            shard_lora_copy(&tc->sh[r], &whole.layers[l], &lc.part[r].layers[l], rank,
                            lora_cfg.targets, true);
        for (int64_t l = 0; l < L; l++)
            for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
                bool row_par = model_layer_tensors[model_lora_targets[t].layer].cols != MODEL_DIM_D;
                int64_t na = rank * target_in(cfg, t), nb = rank * target_out(cfg, t);
                float *wa = whole.layers[l].lora_A[t], *wb = whole.layers[l].lora_B[t];
                float *ja = joined.layers[l].lora_A[t], *jb = joined.layers[l].lora_B[t];
                float *held = row_par ? wb : wa, *sum = row_par ? wa : wb;
                float *jheld = row_par ? jb : ja, *jsum = row_par ? ja : jb;
                int64_t nheld = row_par ? nb : na, nsum = row_par ? na : nb;
                if (r == 0)
                    memcpy(jheld, held, sizeof(float) * (size_t) nheld);
                else if (rel_err(held, jheld, nheld) > 1e-6)
                    fail_msg("layer %lld target %d: rank %d's whole tensor differs from rank 0's",
                             (long long) l, t, r);
                for (int64_t i = 0; i < nsum; i++)
                    jsum[i] += sum[i];
            }
    }
    double e = rel_err(joined.arena, ga.arena, ga.nfloats);
    if (e > 1e-5) {
        print_error("lora: tied %d tp %d keep %d: gradients differ by %.3g\n", tied, tp, (int) keep,
                    e);
        fail();
    }
    double n = 0;
    for (int64_t i = 0; i < ga.nfloats; i++)
        n += fabs(ga.arena[i]);
    assert_true(n > 0);
    for (int r = 0; r < tp; r++) {
        free(lc.grads[r]);
        lora_params_release(&lc.part[r]);
        shard_release(&tc->sh[r]);
    }
    lora_params_release(&whole);
    lora_params_release(&joined);
    free(g.layers);
    lora_release(&st);
    lora_params_release(&ga);
    lora_params_release(&a);
    llama_work_release(&w);
    llama_acts_release(&acts);
    llama_params_release(&p);
    llama_release(&m);
}

static void test_tensor_parallel_lora(void **state)
{
    (void) state;
    check_tp_lora(false, 2, LLAMA_KEEP_ALL);
    check_tp_lora(true, 4, LLAMA_KEEP_ALL); /* kv heads shared */
    check_tp_lora(false, 2, LLAMA_KEEP_NO_PROBS);
    check_tp_lora(true, 4, LLAMA_KEEP_INPUT);
}

/* ---- LoRA devices: data x tensor parallelism, the gradients made whole, one AdamW step --- */

struct ld_case {
    struct model_config full;
    int dp, tp;
    const float *params;                /* the whole model's weights */
    const struct lora_params *adapters; /* the whole model's adapters */
    struct llama_batch batch[2];        /* data-parallel rank r's micro-batch */
    float dloss;
    struct comm_world *world;
    struct lora_params *after; /* the whole adapters after the step, written by the devices */
    double norm[8];
};

static int ld_worker(struct dev *d, void *arg)
{
    struct ld_case *lc = arg;
    struct moai_err err = {0};
    struct layout lay = {.dp = lc->dp,
                         .pp = 1,
                         .tp = lc->tp,
                         .num_micro_batches = 1,
                         .batch_per_device = B,
                         .recomputation = RECOMPUTE_NONE};
    struct shard s;
    struct comm tpc, dpc, kvc, world;
    struct llama m;
    struct llama_params p, g = {0};
    struct llama_acts a;
    struct llama_work w;
    struct lora_dev ld;

    assert_int_equal(shard_init(&s, &lc->full, &lay, T, 1, d->id, &err), 0);
    int sharing = s.kv_replicated ? lc->tp / (int) lc->full.num_key_value_heads : 1;
    comm_world_all(lc->world, d->id, &world);
    assert_int_equal(comm_world_split(lc->world, d->id, s.dp_rank, s.tp_rank, &tpc), 0);
    assert_int_equal(comm_world_split(lc->world, d->id, s.tp_rank, s.dp_rank, &dpc), 0);
    assert_int_equal(comm_world_split(lc->world, d->id, s.dp_rank * lc->tp + s.tp_rank / sharing,
                                      s.tp_rank, &kvc),
                     0);
    assert_int_equal(llama_init(&m, &s.cfg, 1, &err), 0);
    struct llama_tp hooks = {lc->tp,       s.tp_rank,    s.vocab_first, s.vocab_rows,
                             tp_allreduce, tp_allgather, &tpc};
    llama_set_tp(&m, &hooks);
    assert_int_equal(llama_params_init(&p, &s.cfg, NULL, &err), 0);
    for (int u = 0; u < s.nunits; u++)
        shard_unit_from_full(&s, u, lc->params, p.arena + s.units[u].off);
    assert_int_equal(lora_dev_init(&ld, &s, &lora_cfg, B, T, &err), 0);
    lora_dev_load(&ld, &s, lc->adapters, 0);
    g.layers = calloc((size_t) s.cfg.num_hidden_layers, sizeof(struct llama_layer));
    assert_non_null(g.layers);
    lora_dev_attach(&ld, &m, p.layers, g.layers);
    ld.state.train = true;
    ld.state.stream = 0; /* one step; the micro-batch's tokens come after the others' */
    ld.state.first_token = s.dp_rank * B * T;
    assert_int_equal(llama_acts_bind_shape(&a, &s.cfg, &s.shape, NULL, &err), 0);
    assert_int_equal(llama_work_bind_shape(&w, &s.cfg, &s.shape, NULL, &err), 0);
    llama_forward_backward(&m, &p, &g, &a, &w, &lc->batch[s.dp_rank], lc->dloss);
    assert_int_equal(lora_dev_reduce(&ld, &s, &dpc, &kvc), 0);
    double norm = sqrt(comm_allreduce_scalar(&world, lora_dev_sumsq(&ld, &s)));
    lc->norm[d->id] = norm;
    struct optim_adamw hp = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8};
    lora_dev_step(&ld, m.pool, 1, &hp, (float) (0.5 / (norm + 1e-6)));
    /* device 0 gathers the whole adapters from the devices of data-parallel rank 0 */
    struct shard others[4];
    float *tmp = NULL;
    int nothers = 0;
    if (d->id == 0) {
        for (; nothers < lc->tp; nothers++)
            assert_int_equal(shard_init(&others[nothers], &lc->full, &lay, T, 1,
                                        shard_device(&lay, 0, 0, nothers), &err),
                             0);
        tmp = malloc(sizeof(float) * (size_t) ld.a.nfloats);
        assert_non_null(tmp);
    }
    assert_int_equal(lora_dev_gather(&ld, &s, &world, 0, others, nothers, tmp, lc->after), 0);
    for (int i = 0; i < nothers; i++)
        shard_release(&others[i]);
    free(tmp);
    free(g.layers);
    lora_dev_release(&ld);
    llama_work_release(&w);
    llama_acts_release(&a);
    llama_params_release(&p);
    llama_release(&m);
    shard_release(&s);
    return 0;
}

/* dp x tp devices, each with its own micro-batch (dropout on), reduce their adapter gradients,
 * take the global norm with every value once, clip and step: the single device's norm and
 * adapters after the same step over both micro-batches (relative 1e-5). */
static void check_lora_dev(int dp, int tp)
{
    struct moai_err err = {0};
    struct ld_case lc = {.full = tiny(false), .dp = dp, .tp = tp};
    const struct model_config *cfg = &lc.full;
    int64_t L = cfg->num_hidden_layers, rank = lora_cfg.rank;
    int32_t tokens[2][B * T], labels[2][B * T], lengths[B] = {T, T - 3};
    uint64_t s = 11;
    for (int k = 0; k < 2; k++) {
        for (int i = 0; i < B * T; i++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            tokens[k][i] = (int) ((s >> 33) % (uint64_t) cfg->vocab_size);
            labels[k][i] = i % T >= lengths[i / T] || i % T < 1 ? -100 : tokens[k][i];
        }
        lc.batch[k] = (struct llama_batch){B, T, tokens[k], labels[k], lengths, NULL};
    }
    int64_t count = llama_batch_targets(&lc.batch[0]) + llama_batch_targets(&lc.batch[1]);
    lc.dloss = 1.0f / (float) count;

    /* one device, both micro-batches */
    struct llama m;
    struct llama_params p, g = {0};
    struct lora_params a, ga, m1, m2, after;
    struct llama_acts acts;
    struct llama_work w;
    struct lora st;
    assert_int_equal(llama_init(&m, cfg, 1, &err), 0);
    assert_int_equal(llama_params_init(&p, cfg, NULL, &err), 0);
    optim_init_params(NULL, &p, cfg, 3);
    struct lora_params *arenas[] = {&a, &ga, &m1, &m2, &after};
    for (int i = 0; i < 5; i++)
        assert_int_equal(lora_params_init(arenas[i], cfg, rank, lora_cfg.targets, 0, NULL, &err),
                         0);
    lora_init_peft(&a, cfg, cfg, 0, rank, lora_cfg.targets, lora_cfg.seed);
    for (int64_t l = 0; l < L; l++)
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++)
            optim_init_normal(a.layers[l].lora_B[t], 0, rank * target_out(cfg, t), 0.2, 37,
                              (uint64_t) (l * 8 + t));
    g.layers = calloc(L > 0 ? (size_t) L : 1, sizeof(struct llama_layer));
    assert_non_null(g.layers);
    for (int64_t l = 0; l < L; l++) {
        p.layers[l].lora = &a.layers[l];
        g.layers[l].lora = &ga.layers[l];
    }
    assert_int_equal(lora_init(&st, cfg, &lora_cfg, B, T, &err), 0);
    lora_attach(&m, &st);
    st.train = true;
    assert_int_equal(llama_acts_init(&acts, cfg, B, T, &err), 0);
    assert_int_equal(llama_work_init(&w, cfg, B, T, 1, &err), 0);
    for (int k = 0; k < 2; k++) { /* the step's two micro-batches, one after the other */
        st.first_token = k * B * T;
        llama_forward_backward(&m, &p, &g, &acts, &w, &lc.batch[k], lc.dloss);
    }
    lc.params = p.arena;
    lc.adapters = &a;
    lc.after = &after;
    double norm = optim_grad_norm(NULL, ga.arena, ga.nfloats);

    /* the devices: data-parallel rank r runs micro-batch r */
    assert_int_equal(dp, 2);
    assert_int_equal(comm_world_create(&lc.world, dp * tp, &err), 0);
    struct dev_set ds;
    assert_int_equal(dev_set_init(&ds, dp * tp, 1 << 30, &err), 0);
    assert_int_equal(dev_set_run(&ds, ld_worker, &lc, &err), 0);
    dev_set_release(&ds);
    comm_world_free(lc.world);

    struct optim_adamw hp = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8};
    float scale = (float) (0.5 / (norm + 1e-6));
    for (int64_t i = 0; i < ga.nfloats; i++)
        ga.arena[i] *= scale;
    optim_adamw_step(NULL, a.arena, ga.arena, m1.arena, m2.arena, a.nfloats, 1, &hp);
    for (int r = 0; r < dp * tp; r++)
        assert_true(fabs(lc.norm[r] - norm) <= 1e-5 * norm);
    double e = rel_err(after.arena, a.arena, a.nfloats);
    if (e > 1e-5) {
        print_error("lora devices dp %d tp %d: adapters after the step differ by %.3g\n", dp, tp,
                    e);
        fail();
    }
    free(g.layers);
    lora_release(&st);
    for (int i = 0; i < 5; i++)
        lora_params_release(arenas[i]);
    llama_work_release(&w);
    llama_acts_release(&acts);
    llama_params_release(&p);
    llama_release(&m);
}

static void test_tensor_parallel_lora_devices(void **state)
{
    (void) state;
    check_lora_dev(2, 2);
    check_lora_dev(2, 4); /* kv heads shared by two ranks each */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tensor_parallel_two_shards),
        cmocka_unit_test(test_tensor_parallel_four_shards_share_kv_heads),
        cmocka_unit_test(test_tensor_parallel_recomputation),
        cmocka_unit_test(test_tensor_parallel_lora),
        cmocka_unit_test(test_tensor_parallel_lora_devices),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
