/* lora_dev.c - one device's LoRA adapters in a parallel layout (see lora_dev.h). */
#include "exec/lora_dev.h"

#include <string.h>

/* The device's shard config restricted to its stage's layers. */
static struct model_config stage_config(const struct shard *s)
{
    struct model_config c = s->cfg;
    c.num_hidden_layers = s->nlayers;
    return c;
}

int64_t lora_dev_bytes(const struct shard *s, const struct lora_config *lc, int64_t B, int64_t T)
{
    return 4 * (int64_t) sizeof(float) * shard_lora_floats(s, lc->rank, lc->targets) +
           (int64_t) lora_work_bytes(&s->cfg, lc, B, T);
}

int lora_dev_init(struct lora_dev *d, const struct shard *s, const struct lora_config *lc,
                  int64_t B, int64_t T, struct moai_err *err)
{
    struct lora_params *arenas[] = {&d->a, &d->g, &d->m1, &d->m2};
    int rc = 0;

    memset(d, 0, sizeof(*d));
    d->lc = *lc;
    d->cfg = stage_config(s);
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = lora_params_init(arenas[i], &d->cfg, lc->rank, lc->targets, s->first_layer, NULL, err);
    if (rc == 0)
        rc = lora_init(&d->state, &s->cfg, lc, B, T, err);
    if (rc < 0) {
        for (int i = 0; i < 4; i++)
            lora_params_release(arenas[i]);
        return rc;
    }
    d->ready = true;
    return 0;
}

void lora_dev_release(struct lora_dev *d)
{
    if (!d->ready)
        return;
    lora_release(&d->state);
    lora_params_release(&d->m2);
    lora_params_release(&d->m1);
    lora_params_release(&d->g);
    lora_params_release(&d->a);
    memset(d, 0, sizeof(*d));
}

static struct lora_params *part_of(const struct lora_dev *d, int which)
{
    const struct lora_params *p = which == 0 ? &d->a : which == 1 ? &d->m1 : &d->m2;
    return (struct lora_params *) p;
}

void lora_dev_load(struct lora_dev *d, const struct shard *s, const struct lora_params *whole,
                   int which)
{
    struct lora_params *p = part_of(d, which);
    for (int64_t l = 0; l < s->nlayers; l++)
        shard_lora_copy(s, &whole->layers[s->first_layer + l], &p->layers[l], d->lc.rank,
                        d->lc.targets, false);
}

void lora_dev_store(const struct lora_dev *d, const struct shard *s, struct lora_params *whole,
                    int which)
{
    struct lora_params *p = part_of(d, which);
    for (int64_t l = 0; l < s->nlayers; l++)
        shard_lora_copy(s, &whole->layers[s->first_layer + l], &p->layers[l], d->lc.rank,
                        d->lc.targets, true);
}

int lora_dev_gather(const struct lora_dev *d, const struct shard *s, struct comm *world, int which,
                    const struct shard *others, int nothers, float *tmp, struct lora_params *whole)
{
    const struct lora_params *p = part_of(d, which);
    int rc = 0, r;
    if (s->dp_rank != 0)
        return 0;
    if (s->dev != 0)
        return comm_send(world, 0, p->arena, sizeof(float) * (size_t) p->nfloats);
    lora_dev_store(d, s, whole, which);
    for (int i = 0; i < nothers; i++) {
        const struct shard *o = &others[i];
        struct model_config oc = stage_config(o);
        int64_t per = model_lora_layer_param_count(&o->cfg, d->lc.rank, d->lc.targets);
        if (o->dev == 0)
            continue;
        if ((r = comm_recv(world, o->dev, tmp,
                           sizeof(float) *
                               (size_t) shard_lora_floats(o, d->lc.rank, d->lc.targets))) < 0 &&
            rc == 0)
            rc = r;
        for (int64_t l = 0; l < o->nlayers; l++) {
            struct lora_layer view;
            lora_layer_bind(&view, tmp + l * per, &oc, d->lc.rank, d->lc.targets,
                            o->first_layer + l);
            shard_lora_copy(o, &whole->layers[o->first_layer + l], &view, d->lc.rank, d->lc.targets,
                            true);
        }
    }
    return rc;
}

void lora_dev_attach(struct lora_dev *d, struct llama *m, struct llama_layer *lview,
                     struct llama_layer *gview)
{
    for (int64_t l = 0; l < d->a.nlayers; l++) {
        lview[l].lora = &d->a.layers[l];
        gview[l].lora = &d->g.layers[l];
    }
    lora_attach(m, &d->state);
}

/* Does the base tensor of target t have kv heads as its rows (k, v)? */
static bool kv_rows(int t)
{
    return model_layer_tensors[model_lora_targets[t].layer].rows == MODEL_DIM_KV;
}

/* A row-parallel target (o, down): its input split over the tp group. */
static bool row_parallel(int t)
{
    return model_layer_tensors[model_lora_targets[t].layer].cols != MODEL_DIM_D;
}

static int64_t numel_a(const struct lora_dev *d, int t)
{
    return d->lc.rank * model_dim(&d->cfg, model_layer_tensors[model_lora_targets[t].layer].cols);
}

static int64_t numel_b(const struct lora_dev *d, int t)
{
    return d->lc.rank * model_dim(&d->cfg, model_layer_tensors[model_lora_targets[t].layer].rows);
}

int lora_dev_reduce(struct lora_dev *d, const struct shard *s, struct comm *dpc, struct comm *kvc)
{
    int rc = 0, r;
    if (s->lay.dp > 1 && (r = comm_allreduce_sum(dpc, d->g.arena, (size_t) d->g.nfloats)) < 0)
        rc = r;
    if (!s->kv_replicated)
        return rc;
    for (int64_t l = 0; l < d->g.nlayers; l++)
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++)
            if (d->g.layers[l].lora_B[t] && kv_rows(t) &&
                (r = comm_allreduce_sum(kvc, d->g.layers[l].lora_B[t], (size_t) numel_b(d, t))) <
                    0 &&
                rc == 0)
                rc = r;
    return rc;
}

static double sumsq(const float *x, int64_t n)
{
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++)
        acc += (double) x[i] * x[i];
    return acc;
}

double lora_dev_sumsq(const struct lora_dev *d, const struct shard *s)
{
    double total = 0.0;
    int sharing = s->kv_replicated ? s->lay.tp / (int) s->full.num_key_value_heads : 1;
    if (s->dp_rank != 0)
        return 0.0;
    for (int64_t l = 0; l < d->g.nlayers; l++)
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
            const struct lora_layer *g = &d->g.layers[l];
            if (!g->lora_A[t])
                continue;
            /* A: whole on every tp rank for a column-parallel target */
            if (row_parallel(t) || s->tp_rank == 0)
                total += sumsq(g->lora_A[t], numel_a(d, t));
            /* B: whole for a row-parallel target; a shared kv head's rows on several ranks */
            bool counted =
                row_parallel(t) ? s->tp_rank == 0 : !kv_rows(t) || s->tp_rank % sharing == 0;
            if (counted)
                total += sumsq(g->lora_B[t], numel_b(d, t));
        }
    return total;
}

void lora_dev_step(struct lora_dev *d, struct pool *pool, int64_t step,
                   const struct optim_adamw *hp, float scale)
{
    if (scale != 1.0f)
        for (int64_t i = 0; i < d->g.nfloats; i++)
            d->g.arena[i] *= scale;
    optim_adamw_step(pool, d->a.arena, d->g.arena, d->m1.arena, d->m2.arena, d->a.nfloats, step,
                     hp);
}
