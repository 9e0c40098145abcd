/* train.c - the data-parallel training loop on virtual devices (see train.h). */
#include "exec/train.h"

#include "exec/comm.h"
#include "exec/dev.h"
#include "exec/steplog.h"
#include "log.h"
#include "model/optim.h"
#include "plan/mem.h"
#include "progress.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

volatile sig_atomic_t exec_stop_requested;

/*
 * Units. The flat parameter arena (Hugging Face order) is cut into units that are sharded,
 * gathered and reduced one at a time: 0 the embedding, 1..L the layers, L+1 the final norm
 * and lm_head (the norm alone when the embedding is tied). A unit of len floats is split into
 * dp chunks of ceil(len / dp) floats (the last one padded); rank r owns chunk r of every unit,
 * and its shard is the concatenation of those chunks.
 */
struct unit {
    int64_t off;   /* first float in the flat arena */
    int64_t len;   /* floats */
    int64_t chunk; /* ceil(len / dp) */
    int64_t shard; /* first float of this unit's chunk in a rank's shard */
};

struct layout {
    int nunits;
    struct unit *units;
    int64_t shard_floats; /* sum of the chunks */
    int64_t max_padded;   /* max over units of chunk x dp: one gathered unit or bucket */
    int64_t max_chunk;
    int64_t layer_floats;
};

static int64_t layer_floats(const struct model_config *c)
{
    int64_t D = c->hidden_size, hd = c->head_dim, F = c->intermediate_size;
    return 2 * D + (c->num_attention_heads + 2 * c->num_key_value_heads) * hd * D +
           D * c->num_attention_heads * hd + 3 * F * D;
}

static int layout_init(struct layout *lo, const struct model_config *c, int dp)
{
    int64_t V = c->vocab_size, D = c->hidden_size, L = c->num_hidden_layers;
    lo->nunits = (int) L + 2;
    lo->units = calloc((size_t) lo->nunits, sizeof(*lo->units));
    if (!lo->units)
        return MOAI_ENOMEM;
    lo->layer_floats = layer_floats(c);
    int64_t off = 0, shard = 0;
    lo->max_padded = lo->max_chunk = 0;
    for (int u = 0; u < lo->nunits; u++) {
        struct unit *x = &lo->units[u];
        if (u == 0)
            x->len = V * D;
        else if (u <= L)
            x->len = lo->layer_floats;
        else
            x->len = D + (c->tie_word_embeddings ? 0 : V * D);
        x->off = off;
        x->chunk = (x->len + dp - 1) / dp;
        x->shard = shard;
        off += x->len;
        shard += x->chunk;
        if (x->chunk * dp > lo->max_padded)
            lo->max_padded = x->chunk * dp;
        if (x->chunk > lo->max_chunk)
            lo->max_chunk = x->chunk;
    }
    lo->shard_floats = shard;
    MOAI_ASSERT(off == model_param_count(c));
    return 0;
}

/* Points a layer struct at the floats of one layer unit (Hugging Face order). */
static void layer_view(struct llama_layer *l, float *base, const struct model_config *c)
{
    int64_t D = c->hidden_size, hd = c->head_dim, F = c->intermediate_size;
    int64_t H = c->num_attention_heads, KV = c->num_key_value_heads;
    l->input_norm = base;
    l->wq = l->input_norm + D;
    l->wk = l->wq + H * hd * D;
    l->wv = l->wk + KV * hd * D;
    l->wo = l->wv + KV * hd * D;
    l->post_norm = l->wo + D * H * hd;
    l->w_gate = l->post_norm + D;
    l->w_up = l->w_gate + F * D;
    l->w_down = l->w_up + F * D;
}

/* What every device thread shares. */
struct run {
    const struct train_job *job;
    const struct exec_layout *plan;
    struct layout lo;
    struct comm_world *world;
    int dp, nthreads;
    bool zero2, zero3;
    int64_t B, T;                         /* micro-batch sequences, tokens */
    float *host_params, *host_m, *host_v; /* gathered for saving */
    double *durations;                    /* device 0's step times */
    int64_t ndurations;
    struct train_result *res;
    int save_rc;
    struct moai_err save_err;
};

/* One device's state. */
struct replica {
    struct run *run;
    struct dev *dev;
    int rank;
    struct comm world, dpc;
    struct llama m;
    bool m_ready;
    struct llama_params p; /* full working weights (not under ZeRO-3) */
    struct llama_params g; /* full gradients (no sharding) */
    float *params, *grads; /* the arenas of p and g */
    float *pshard;         /* ZeRO-3: this rank's parameter shard (the master) */
    float *gshard;         /* ZeRO-2/3: gradient shard */
    float *mom1, *mom2;    /* Adam moments: full or shard */
    int64_t opt_floats;    /* floats of the moments */
    float *bucket;         /* ZeRO-2/3: one unit's gradient, padded */
    float *wbuf[2];        /* ZeRO-3: gathered units */
    float *tmp;            /* a chunk */
    float *normgrad;       /* ZeRO-2/3 with tied embeddings: the final norm's gradient */
    struct llama_acts acts;
    struct llama_work work;
    bool acts_ready, work_ready;
    int32_t *tokens, *labels, *lengths; /* one micro-batch */
    int64_t reserved;                   /* bytes counted for the model's own arenas */
};

static int64_t fbytes(int64_t floats)
{
    return floats * (int64_t) sizeof(float);
}

int64_t exec_device_bytes(const struct model_config *cfg, const struct exec_layout *plan, int64_t T,
                          int nthreads)
{
    struct layout lo;
    int dp = plan->dp;
    int64_t P = model_param_count(cfg), total = 0;
    bool zero2 = plan->distribute_param || plan->distribute_low_prec_param;
    bool zero3 = plan->distribute_low_prec_param;

    if (layout_init(&lo, cfg, dp) < 0)
        return -1;
    total += fbytes(zero3 ? lo.shard_floats : P);                 /* weights */
    total += fbytes(zero2 ? lo.shard_floats + lo.max_padded : P); /* gradients */
    total += 2 * fbytes(zero2 ? lo.shard_floats : P);             /* moments */
    if (zero2)
        total += fbytes(lo.max_chunk + (cfg->tie_word_embeddings ? cfg->hidden_size * dp : 0));
    if (zero3)
        total += 2 * fbytes(lo.max_padded);
    total += (int64_t) llama_act_bytes(cfg, plan->batch_per_device, T);
    total += (int64_t) llama_work_bytes(cfg, plan->batch_per_device, T, nthreads);
    free(lo.units);
    return total;
}

static float *alloc_floats(struct replica *rp, int64_t n, const char *what, int *rc)
{
    float *p = dev_alloc(rp->dev, fbytes(n), what);
    if (!p && *rc == 0)
        *rc = rp->dev->err.code ? rp->dev->err.code : MOAI_EOOM;
    return p;
}

static int replica_alloc(struct replica *rp)
{
    struct run *run = rp->run;
    const struct model_config *cfg = run->job->cfg;
    const struct layout *lo = &run->lo;
    int64_t P = model_param_count(cfg);
    struct moai_err err = {0};
    int rc = 0;

    if (llama_init(&rp->m, cfg, run->nthreads, &err) < 0) {
        rp->dev->err = err;
        return err.code;
    }
    rp->m_ready = true;
    if (!run->zero3) {
        rp->params = alloc_floats(rp, P, "the weights", &rc);
        if (rp->params && llama_params_init(&rp->p, cfg, rp->params, &err) < 0)
            rc = err.code;
    } else {
        rp->pshard = alloc_floats(rp, lo->shard_floats, "the weight shard", &rc);
        for (int i = 0; i < 2 && rc == 0; i++)
            rp->wbuf[i] = alloc_floats(rp, lo->max_padded, "a gathered unit", &rc);
    }
    if (rc == 0 && !run->zero2) {
        rp->grads = alloc_floats(rp, P, "the gradients", &rc);
        if (rp->grads && llama_params_init(&rp->g, cfg, rp->grads, &err) < 0)
            rc = err.code;
    } else if (rc == 0) {
        rp->gshard = alloc_floats(rp, lo->shard_floats, "the gradient shard", &rc);
        if (rc == 0)
            rp->bucket = alloc_floats(rp, lo->max_padded, "a gradient bucket", &rc);
        if (rc == 0)
            rp->tmp = alloc_floats(rp, lo->max_chunk, "a reduction chunk", &rc);
        if (rc == 0 && cfg->tie_word_embeddings)
            rp->normgrad = alloc_floats(rp, cfg->hidden_size * run->dp, "the norm gradient", &rc);
    }
    rp->opt_floats = run->zero2 ? lo->shard_floats : P;
    if (rc == 0)
        rp->mom1 = alloc_floats(rp, rp->opt_floats, "the Adam moments", &rc);
    if (rc == 0)
        rp->mom2 = alloc_floats(rp, rp->opt_floats, "the Adam moments", &rc);
    if (rc == 0) {
        int64_t bytes = (int64_t) llama_act_bytes(cfg, run->B, run->T) +
                        (int64_t) llama_work_bytes(cfg, run->B, run->T, run->nthreads);
        rc = dev_reserve(rp->dev, bytes, "the activations and workspace");
        if (rc == 0)
            rp->reserved = bytes;
    }
    if (rc == 0 && llama_acts_init(&rp->acts, cfg, run->B, run->T, &err) < 0)
        rc = err.code;
    rp->acts_ready = rc == 0;
    if (rc == 0 && llama_work_init(&rp->work, cfg, run->B, run->T, run->nthreads, &err) < 0)
        rc = err.code;
    rp->work_ready = rc == 0;
    if (rc == 0) {
        size_t n = (size_t) (run->B * run->T);
        rp->tokens = malloc(n * sizeof(int32_t));
        rp->labels = malloc(n * sizeof(int32_t));
        rp->lengths = malloc((size_t) run->B * sizeof(int32_t));
        if (!rp->tokens || !rp->labels || !rp->lengths)
            rc = moai_err_set(&err, MOAI_ENOMEM, "out of memory");
    }
    if (rc < 0 && err.code && !rp->dev->err.code)
        rp->dev->err = err;
    return rc;
}

static void replica_free(struct replica *rp)
{
    struct run *run = rp->run;
    const struct layout *lo = &run->lo;
    int64_t P = model_param_count(run->job->cfg);

    free(rp->tokens);
    free(rp->labels);
    free(rp->lengths);
    if (rp->work_ready)
        llama_work_release(&rp->work);
    if (rp->acts_ready)
        llama_acts_release(&rp->acts);
    if (rp->reserved)
        dev_unreserve(rp->dev, rp->reserved);
    dev_free(rp->dev, rp->mom1, fbytes(rp->opt_floats));
    dev_free(rp->dev, rp->mom2, fbytes(rp->opt_floats));
    dev_free(rp->dev, rp->normgrad, fbytes(run->job->cfg->hidden_size * run->dp));
    dev_free(rp->dev, rp->tmp, fbytes(lo->max_chunk));
    dev_free(rp->dev, rp->bucket, fbytes(lo->max_padded));
    dev_free(rp->dev, rp->gshard, fbytes(lo->shard_floats));
    llama_params_release(&rp->g); /* the pointer tables; the arenas are the device's */
    llama_params_release(&rp->p);
    dev_free(rp->dev, rp->grads, fbytes(P));
    for (int i = 0; i < 2; i++)
        dev_free(rp->dev, rp->wbuf[i], fbytes(lo->max_padded));
    dev_free(rp->dev, rp->pshard, fbytes(lo->shard_floats));
    dev_free(rp->dev, rp->params, fbytes(P));
    if (rp->m_ready)
        llama_release(&rp->m);
}

/* The floats of unit u that rank r owns: [*first, *first + *n) within the unit. */
static void owned(const struct unit *u, int r, int64_t *first, int64_t *n)
{
    int64_t a = u->chunk * r, b = a + u->chunk;
    if (a > u->len)
        a = u->len;
    if (b > u->len)
        b = u->len;
    *first = a;
    *n = b - a;
}

/* Loads the starting weights and moments into this rank's buffers. */
static void replica_load(struct replica *rp)
{
    struct run *run = rp->run;
    const struct train_job *job = run->job;
    const struct layout *lo = &run->lo;
    int64_t P = model_param_count(job->cfg);

    if (!run->zero3)
        memcpy(rp->params, job->init_params, (size_t) fbytes(P));
    for (int u = 0; u < lo->nunits; u++) {
        const struct unit *x = &lo->units[u];
        int64_t first, n;
        owned(x, rp->rank, &first, &n);
        if (run->zero3)
            memcpy(rp->pshard + x->shard, job->init_params + x->off + first, (size_t) fbytes(n));
        if (run->zero2 && job->init_m) {
            memcpy(rp->mom1 + x->shard, job->init_m + x->off + first, (size_t) fbytes(n));
            memcpy(rp->mom2 + x->shard, job->init_v + x->off + first, (size_t) fbytes(n));
        }
    }
    if (!run->zero2 && job->init_m) {
        memcpy(rp->mom1, job->init_m, (size_t) fbytes(P));
        memcpy(rp->mom2, job->init_v, (size_t) fbytes(P));
    }
}

/* ZeRO-3: gathers unit u of the weights into buf. */
static void gather_unit(struct replica *rp, int u, float *buf)
{
    const struct unit *x = &rp->run->lo.units[u];
    comm_allgather(&rp->dpc, rp->pshard + x->shard, buf, x->chunk);
}

/* ZeRO-2/3: reduce-scatters unit u's gradient from buf (padded) and adds this rank's chunk
 * to the gradient shard. */
static void reduce_unit(struct replica *rp, int u, const float *buf)
{
    const struct unit *x = &rp->run->lo.units[u];
    float *dst = rp->gshard + x->shard;
    comm_reduce_scatter_sum(&rp->dpc, buf, rp->tmp, x->chunk);
    for (int64_t i = 0; i < x->chunk; i++)
        dst[i] += rp->tmp[i];
}

/* The weights the model reads: the full arena, or views of gathered units (ZeRO-3). */
static void weights_view(struct replica *rp, struct llama_params *v)
{
    if (!rp->run->zero3)
        *v = rp->p;
    else
        memset(v, 0, sizeof(*v));
}

/* Forward of one micro-batch; returns the loss sum. With backward, also its gradients:
 * accumulated into rp->g, or reduced unit by unit into the gradient shard. */
static double micro_batch(struct replica *rp, const struct llama_batch *b, bool backward,
                          float dloss)
{
    struct run *run = rp->run;
    const struct model_config *cfg = run->job->cfg;
    const struct layout *lo = &run->lo;
    int64_t L = cfg->num_hidden_layers, D = cfg->hidden_size;
    bool tied = cfg->tie_word_embeddings;
    struct llama_params pv;
    struct llama_layer lv;
    double loss;

    if (!run->zero2 && !run->zero3)
        return llama_forward_backward(&rp->m, &rp->p, backward ? &rp->g : NULL, &rp->acts,
                                      &rp->work, b, dloss);

    weights_view(rp, &pv);
    if (run->zero3) {
        gather_unit(rp, 0, rp->wbuf[0]);
        pv.embed = rp->wbuf[0];
    }
    llama_embed_forward(&rp->m, &pv, &rp->acts, &rp->work, b);
    for (int64_t l = 0; l < L; l++) {
        const struct llama_layer *lp = run->zero3 ? &lv : &rp->p.layers[l];
        float *out = l + 1 < L ? rp->acts.layers[l + 1].x : rp->acts.xf;
        if (run->zero3) {
            gather_unit(rp, (int) l + 1, rp->wbuf[0]);
            layer_view(&lv, rp->wbuf[0], cfg);
        }
        llama_layer_forward(&rp->m, lp, &rp->acts.layers[l], out, &rp->work, b);
    }
    if (run->zero3) {
        gather_unit(rp, (int) L + 1, rp->wbuf[0]);
        pv.norm = rp->wbuf[0];
        if (tied) {
            gather_unit(rp, 0, rp->wbuf[1]);
            pv.lm_head = rp->wbuf[1];
        } else {
            pv.lm_head = rp->wbuf[0] + D;
        }
    }
    loss = llama_head_forward(&rp->m, &pv, &rp->acts, &rp->work, backward, dloss);
    if (!backward)
        return loss;

    /* Backward, one unit's gradient in the bucket at a time. */
    struct llama_params gv;
    memset(&gv, 0, sizeof(gv));
    memset(rp->bucket, 0, (size_t) fbytes(lo->max_padded));
    if (tied) {
        memset(rp->normgrad, 0, (size_t) fbytes(D * run->dp));
        gv.norm = rp->normgrad;
        gv.lm_head = rp->bucket;
    } else {
        gv.norm = rp->bucket;
        gv.lm_head = rp->bucket + D;
    }
    llama_head_backward(&rp->m, &pv, &gv, &rp->acts, &rp->work);
    if (tied) {
        reduce_unit(rp, (int) L + 1, rp->normgrad);
        reduce_unit(rp, 0, rp->bucket);
    } else {
        reduce_unit(rp, (int) L + 1, rp->bucket);
    }
    for (int64_t l = L - 1; l >= 0; l--) {
        const struct llama_layer *lp = run->zero3 ? &lv : &rp->p.layers[l];
        struct llama_layer lg;
        if (run->zero3) {
            gather_unit(rp, (int) l + 1, rp->wbuf[0]);
            layer_view(&lv, rp->wbuf[0], cfg);
        }
        memset(rp->bucket, 0, (size_t) fbytes(lo->units[l + 1].chunk * run->dp));
        layer_view(&lg, rp->bucket, cfg);
        llama_layer_backward(&rp->m, lp, &lg, &rp->acts.layers[l], &rp->work, b);
        reduce_unit(rp, (int) l + 1, rp->bucket);
    }
    memset(rp->bucket, 0, (size_t) fbytes(lo->units[0].chunk * run->dp));
    gv.embed = rp->bucket;
    llama_embed_backward(&rp->m, &gv, &rp->work, b);
    reduce_unit(rp, 0, rp->bucket);
    return loss;
}

/* Copies records rows[0..B) into the micro-batch buffers. */
static void fill_batch(struct replica *rp, const struct train_records *recs, const int64_t *rows,
                       int64_t B, struct llama_batch *b)
{
    int64_t T = recs->T;
    for (int64_t i = 0; i < B; i++) {
        memcpy(rp->tokens + i * T, recs->tokens + rows[i] * T, (size_t) T * sizeof(int32_t));
        memcpy(rp->labels + i * T, recs->labels + rows[i] * T, (size_t) T * sizeof(int32_t));
        rp->lengths[i] = recs->lengths[rows[i]];
    }
    *b = (struct llama_batch){
        .B = B, .T = T, .tokens = rp->tokens, .labels = rp->labels, .lengths = rp->lengths};
}

/* Labels that count in records rows (position t >= 1 of each, not -100). */
static int64_t count_targets(const struct train_records *recs, const int64_t *rows, int64_t n)
{
    int64_t count = 0, T = recs->T;
    for (int64_t i = 0; i < n; i++) {
        const int32_t *lab = recs->labels + rows[i] * T;
        for (int64_t t = 1; t < T; t++)
            count += lab[t] != -100;
    }
    return count;
}

/* The optimizer step after the gradients of a step are complete. Returns the norm. */
static double optimizer_step(struct replica *rp, int64_t step, double lr)
{
    struct run *run = rp->run;
    const struct recipe *r = run->job->recipe;
    const struct layout *lo = &run->lo;
    int64_t P = model_param_count(run->job->cfg);
    struct optim_adamw hp = {.lr = lr,
                             .beta1 = r->training.betas[0],
                             .beta2 = r->training.betas[1],
                             .eps = r->training.eps,
                             .weight_decay = r->training.weight_decay};
    double norm;

    if (!run->zero2) {
        comm_allreduce_sum(&rp->dpc, rp->grads, (size_t) P);
        norm = optim_clip_grad_norm(rp->m.pool, rp->grads, P, r->training.grad_clip);
        optim_adamw_step(rp->m.pool, rp->params, rp->grads, rp->mom1, rp->mom2, P, step, &hp);
        return norm;
    }
    double local = optim_grad_norm(rp->m.pool, rp->gshard, lo->shard_floats);
    norm = sqrt(comm_allreduce_scalar(&rp->dpc, local * local));
    if (r->training.grad_clip > 0 && norm > r->training.grad_clip) {
        float scale = (float) (r->training.grad_clip / (norm + 1e-6));
        for (int64_t i = 0; i < lo->shard_floats; i++)
            rp->gshard[i] *= scale;
    }
    if (run->zero3) {
        optim_adamw_step(rp->m.pool, rp->pshard, rp->gshard, rp->mom1, rp->mom2, lo->shard_floats,
                         step, &hp);
        return norm;
    }
    /* ZeRO-2: update the owned chunk of each unit in the full weights, then all-gather. */
    for (int u = 0; u < lo->nunits; u++) {
        const struct unit *x = &lo->units[u];
        int64_t first, n;
        owned(x, rp->rank, &first, &n);
        if (n > 0)
            optim_adamw_step(rp->m.pool, rp->params + x->off + first, rp->gshard + x->shard,
                             rp->mom1 + x->shard, rp->mom2 + x->shard, n, step, &hp);
        memset(rp->tmp, 0, (size_t) fbytes(x->chunk));
        memcpy(rp->tmp, rp->params + x->off + first, (size_t) fbytes(n));
        comm_allgather(&rp->dpc, rp->tmp, rp->bucket, x->chunk);
        memcpy(rp->params + x->off, rp->bucket, (size_t) fbytes(x->len));
    }
    return norm;
}

/* Gathers weights and moments into the host buffers and lets device 0 save them. */
static int save_checkpoint(struct replica *rp, int64_t steps_done)
{
    struct run *run = rp->run;
    const struct layout *lo = &run->lo;
    int64_t P = model_param_count(run->job->cfg);

    if (!run->zero3 && rp->rank == 0)
        memcpy(run->host_params, rp->params, (size_t) fbytes(P));
    if (!run->zero2 && rp->rank == 0) {
        memcpy(run->host_m, rp->mom1, (size_t) fbytes(P));
        memcpy(run->host_v, rp->mom2, (size_t) fbytes(P));
    }
    for (int u = 0; u < lo->nunits && run->zero2; u++) {
        const struct unit *x = &lo->units[u];
        int64_t first, n;
        owned(x, rp->rank, &first, &n);
        if (run->zero3)
            memcpy(run->host_params + x->off + first, rp->pshard + x->shard, (size_t) fbytes(n));
        memcpy(run->host_m + x->off + first, rp->mom1 + x->shard, (size_t) fbytes(n));
        memcpy(run->host_v + x->off + first, rp->mom2 + x->shard, (size_t) fbytes(n));
    }
    comm_barrier(&rp->world);
    if (rp->dev->id == 0 && run->job->save) {
        memset(&run->save_err, 0, sizeof(run->save_err));
        run->save_rc = run->job->save(run->job->save_arg, steps_done, run->host_params, run->host_m,
                                      run->host_v, &run->save_err);
    }
    comm_barrier(&rp->world);
    return run->save_rc;
}

/* Validation loss over the validation records, split over the replicas. */
static double validate(struct replica *rp)
{
    struct run *run = rp->run;
    const struct train_records *vr = &run->job->valid;
    int64_t per = (vr->n + run->dp - 1) / run->dp;
    int64_t lo = per * rp->rank, hi = lo + per < vr->n ? lo + per : vr->n;
    int64_t *rows = malloc((size_t) run->B * sizeof(*rows)), count = 0;
    double sum = 0;

    if (!rows) /* tiny; a failure here only loses the validation figure */
        per = 0;

    /* Every replica runs the same number of micro-batches (ZeRO-3 gathers are collective). */
    int64_t nmb = (per + run->B - 1) / run->B;
    for (int64_t k = 0; k < nmb; k++) {
        int64_t B = 0;
        for (int64_t i = lo + k * run->B; i < hi && B < run->B; i++)
            rows[B++] = i;
        int64_t real = B;
        while (B < run->B) /* pad with a repeated row whose labels we do not count */
            rows[B++] = real ? rows[0] : 0;
        struct llama_batch b;
        fill_batch(rp, vr, rows, B, &b);
        for (int64_t i = real; i < B; i++)
            for (int64_t t = 0; t < vr->T; t++)
                rp->labels[i * vr->T + t] = -100;
        count += count_targets(vr, rows, real);
        sum += micro_batch(rp, &b, false, 1.0f);
    }
    free(rows);
    sum = comm_allreduce_scalar(&rp->dpc, sum);
    double total = comm_allreduce_scalar(&rp->dpc, (double) count);
    return total > 0 ? sum / total : NAN;
}

static void print_step(const struct run *run, const struct step_record *s)
{
    if (run->job->json) {
        json_t *j = steplog_json(s);
        char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
        if (text)
            puts(text);
        free(text);
        json_decref(j);
    } else {
        char line[256];
        puts(steplog_format(line, sizeof(line), s));
    }
    fflush(stdout);
}

static int replica_run(struct dev *d, void *arg)
{
    struct run *run = arg;
    const struct train_job *job = run->job;
    const struct recipe *r = job->recipe;
    struct replica rp;
    int64_t batch = r->training.batch_size, nmb = run->plan->num_micro_batches;
    int64_t *rows = NULL;
    int rc;

    memset(&rp, 0, sizeof(rp));
    rp.run = run;
    rp.dev = d;
    rp.rank = d->id; /* pp = tp = 1: device i is data-parallel rank i */
    comm_world_all(run->world, d->id, &rp.world);
    if (comm_world_split(run->world, d->id, 0, d->id, &rp.dpc) < 0)
        return moai_err_set(&d->err, MOAI_ENOMEM, "out of memory splitting communicators");

    rc = replica_alloc(&rp);
    /* Every device learns whether any failed, so none waits forever at a collective. */
    double failed = comm_allreduce_scalar(&rp.world, rc < 0 ? 1.0 : 0.0);
    rows = malloc((size_t) batch * sizeof(*rows));
    if (failed > 0 || !rows) {
        replica_free(&rp);
        free(rows);
        return rc < 0 ? rc : 0;
    }
    replica_load(&rp);

    for (int64_t step = job->start_step + 1; step <= job->total_steps; step++) {
        double stop = comm_allreduce_scalar(&rp.world, d->id == 0 && exec_stop_requested);
        if (stop > 0) {
            rc = save_checkpoint(&rp, step - 1);
            if (rc == 0)
                rc = MOAI_EINTR;
            break;
        }
        double t0 = progress_now();
        int64_t epoch = (step - 1) / job->steps_per_epoch;
        job->batch_rows(job->batch_arg, epoch, (step - 1) % job->steps_per_epoch, rows);
        int64_t ntargets = count_targets(&job->train, rows, batch);
        float dloss = ntargets > 0 ? 1.0f / (float) ntargets : 0.0f;
        double loss_sum = 0;

        if (!run->zero2)
            llama_params_zero(&rp.m, &rp.g);
        else
            memset(rp.gshard, 0, (size_t) fbytes(run->lo.shard_floats));
        for (int64_t k = 0; k < nmb; k++) {
            struct llama_batch b;
            fill_batch(&rp, &job->train, rows + (rp.rank * nmb + k) * run->B, run->B, &b);
            loss_sum += micro_batch(&rp, &b, true, dloss);
        }
        double loss = comm_allreduce_scalar(&rp.dpc, loss_sum) / (double) (ntargets ? ntargets : 1);
        if (!isfinite(loss)) { /* every rank sees the same loss and stops alike */
            moai_err_set(&d->err, MOAI_EIO, "the loss is not finite (%g) at step %lld", loss,
                         (long long) step);
            rc = MOAI_EIO;
            break;
        }
        enum optim_schedule sched = (enum optim_schedule) r->training.lr_schedule;
        double lr = r->training.lr *
                    optim_lr_factor(sched, step - 1, r->training.warmup_steps, job->total_steps);
        double norm = optimizer_step(&rp, step, lr);
        comm_barrier(&rp.world);
        double dt = progress_now() - t0;

        if (d->id == 0) {
            struct step_record s = {.step = step,
                                    .total_steps = job->total_steps,
                                    .loss = loss,
                                    .duration_s = dt,
                                    .tokens_per_s = (double) (batch * r->training.block_size) / dt,
                                    .lr = lr,
                                    .grad_norm = norm};
            run->durations[run->ndurations++] = dt;
            run->res->last_loss = loss;
            if (job->step_losses)
                job->step_losses[step - 1] = loss;
            /* every log_interval steps, and the first and the last, so a run shows where
             * its loss started and ended */
            if (!job->quiet && (step % r->training.log_interval == 0 ||
                                step == job->start_step + 1 || step == job->total_steps))
                print_step(run, &s);
        }
        run->res->steps_done = step;
        if (r->training.save_interval != RECIPE_NONE && step % r->training.save_interval == 0 &&
            step != job->total_steps) {
            if ((rc = save_checkpoint(&rp, step)) < 0)
                break;
        }
        if (step % job->steps_per_epoch == 0 && job->valid.n > 0 && step != job->total_steps) {
            double vl = validate(&rp);
            if (d->id == 0)
                log_info("epoch %lld: validation loss %.6g",
                         (long long) (step / job->steps_per_epoch), vl);
        }
    }
    if (rc == 0 && job->valid.n > 0) {
        double vl = validate(&rp);
        if (d->id == 0)
            run->res->valid_loss = vl;
    }
    if (rc == 0)
        rc = save_checkpoint(&rp, run->res->steps_done);
    if (rc == MOAI_EINTR && d->id == 0)
        moai_err_set(&d->err, MOAI_EINTR, "interrupted: checkpoint saved in '%s' after step %lld",
                     r->training.save_dir, (long long) run->res->steps_done);
    if (rc < 0 && rc != MOAI_EINTR && rc == run->save_rc)
        d->err = run->save_err;
    free(rows);
    replica_free(&rp);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

int exec_train(const struct train_job *job, struct train_result *res, struct moai_err *err)
{
    const struct exec_layout *plan = &job->layout;
    const struct recipe *r = job->recipe;
    struct run run;
    struct dev_set ds;
    int64_t P = model_param_count(job->cfg);
    int ndev = plan->dp * plan->pp * plan->tp, rc;

    memset(res, 0, sizeof(*res));
    res->valid_loss = NAN;
    if (plan->pp > 1 || plan->tp > 1)
        return moai_err_set(err, MOAI_ENOTYET,
                            "the plan needs %s parallelism, whose execution is not built yet",
                            plan->pp > 1 ? "pipeline" : "tensor");
    if (plan->recomputation != RECOMPUTE_NONE)
        return moai_err_set(err, MOAI_ENOTYET,
                            "the plan needs %s recomputation, whose execution is not built yet",
                            recipe_recompute_name(plan->recomputation));

    memset(&run, 0, sizeof(run));
    run.job = job;
    run.plan = plan;
    run.dp = plan->dp;
    run.zero2 = plan->distribute_param || plan->distribute_low_prec_param;
    run.zero3 = plan->distribute_low_prec_param;
    run.B = plan->batch_per_device;
    run.T = r->training.block_size;
    run.res = res;
    run.nthreads = mem_cpu_threads(ndev); /* as the planner sized the workspace */
    if (layout_init(&run.lo, job->cfg, run.dp) < 0)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    run.host_params = malloc((size_t) fbytes(P));
    run.host_m = malloc((size_t) fbytes(P));
    run.host_v = malloc((size_t) fbytes(P));
    run.durations = malloc((size_t) (job->total_steps + 1) * sizeof(double));
    if (!run.host_params || !run.host_m || !run.host_v || !run.durations) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory for the host copy of the weights");
        goto out;
    }
    if ((rc = comm_world_create(&run.world, ndev, err)) < 0)
        goto out;
    if ((rc = dev_set_init(&ds, ndev, r->flavor.device.memory_bytes, err)) < 0)
        goto out_world;
    res->steps_done = job->start_step;
    rc = dev_set_run(&ds, replica_run, &run, err);
    res->ndev = ndev;
    res->capacity_bytes = r->flavor.device.memory_bytes;
    for (int i = 0; i < ndev && i < 64; i++)
        res->peak_bytes[i] = ds.devs[i].peak_bytes;
    res->interrupted = rc == MOAI_EINTR;
    for (int i = 0; rc == MOAI_EOOM && i < ndev; i++)
        if (ds.devs[i].oom_requested_bytes) {
            res->oom_device = i;
            res->oom_requested_bytes = ds.devs[i].oom_requested_bytes;
            break;
        }
    if (run.ndurations > 0) {
        int64_t first = run.ndurations > 1 ? 1 : 0, n = run.ndurations - first;
        qsort(run.durations + first, (size_t) n, sizeof(double), cmp_double);
        res->median_step_s =
            n % 2 ? run.durations[first + n / 2]
                  : 0.5 * (run.durations[first + n / 2 - 1] + run.durations[first + n / 2]);
        res->median_tokens_per_s =
            (double) (r->training.batch_size * r->training.block_size) / res->median_step_s;
    }
    dev_set_release(&ds);
out_world:
    comm_world_free(run.world);
out:
    free(run.lo.units);
    free(run.host_params);
    free(run.host_m);
    free(run.host_v);
    free(run.durations);
    return rc;
}
