/* train.c - the training loop of any dp x pp x tp plan on the devices (see train.h). */
#include "exec/train.h"

#include "exec/comm.h"
#include "exec/dev.h"
#include "exec/lora_dev.h"
#include "layout/shard.h"
#include "exec/steplog.h"
#include "log.h"
#include "model/optim.h"
#include "progress.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile sig_atomic_t exec_stop_requested;
volatile sig_atomic_t exec_saving;

/* What every device thread of this process shares. */
struct run {
    const struct train_job *job;
    const struct layout *plan;
    struct comm_world *world;
    int ndev, nthreads;
    bool zero2, zero3;
    bool lora;                            /* adapters on a frozen base (job->lora_init) */
    bool base16;                          /* that base held in bf16 (shard_lora_base16) */
    struct lora_config lc;                /* their configuration */
    struct lora_params host_a[3];         /* device 0: the gathered adapters and moments */
    int64_t B, T;                         /* micro-batch sequences, tokens */
    float *host_params, *host_m, *host_v; /* the whole model, gathered on device 0 for saving */
    double *durations;                    /* device 0's step times */
    int64_t ndurations;
    struct train_result *res;
    int save_rc;
    struct moai_err save_err;
    int local_failed;         /* a device of this process failed to set up */
    int report_errno;         /* device 0's report failed (job->report) */
    atomic_int failed;        /* set by the first device whose own failure stops the run */
    struct moai_err fail_err; /* its error (written once, read after the threads end) */
};

/* One micro-batch's tokens, kept from its forward to its backward. */
struct slot {
    int32_t *tokens, *labels, *lengths, *positions; /* positions: packed rows' */
    struct llama_batch batch;
    int64_t first_token; /* its first token's place among the step's (LoRA's dropout) */
};

/* One device's state. */
struct device {
    struct run *run;
    struct dev *dev;
    struct shard sh;
    bool sh_ready;
    struct comm world; /* every device */
    struct comm dpc;   /* the data-parallel group: same stage and tp rank */
    struct comm tpc;   /* the tensor-parallel group: same replica and stage */
    struct comm ppc;   /* the pipeline: same replica and tp rank, ranked by stage */
    struct comm kvc;   /* the tp ranks sharing one kv head (tp > kv heads) */
    struct comm embc;  /* the first and last stage's embedding copies (tied, pp > 1) */
    struct llama m;
    bool m_ready;
    float *params;                     /* the units' weights (not under ZeRO-3) */
    uint16_t *params16;                /* a bf16 frozen base's instead (run->base16) */
    float *grads;                      /* the units' gradients (no sharding) */
    float *pshard;                     /* ZeRO-3: this rank's weight shard */
    float *gshard;                     /* ZeRO-2/3: gradient shard */
    float *mom1, *mom2;                /* Adam moments: whole or shard */
    int64_t opt_floats;                /* floats of each moment */
    float *bucket, *nbuck;             /* ZeRO-2/3: one unit's gradient; the final norm's */
    float *wbuf[2], *nbuf;             /* ZeRO-3: gathered units; the final norm */
    float *tmp;                        /* ZeRO-2/3: a chunk */
    struct llama_layer *lview, *gview; /* (nlayers) views of the layer units */
    struct llama_acts *acts;           /* (in_flight) */
    int nacts;
    struct llama_work work;
    bool work_ready;
    struct slot *slots; /* (in_flight) */
    int64_t *rows;      /* (batch_size) the step's rows */
    int64_t reserved;   /* bytes counted for the model's own arenas */
    int comm_rc;        /* the first failed collective's code (its group failed alike), or 0 */

    struct lora_dev ld;  /* LoRA: the device's adapters */
    int64_t ld_reserved; /* bytes counted for them */
};

static int64_t fbytes(int64_t floats)
{
    return floats * (int64_t) sizeof(float);
}

/* Keeps the first failure of a collective. Every rank of the failed call's group fails alike
 * and goes on calling the same collectives, so nobody waits forever; the next agreement over
 * the world (once a step, before a save, after validation) stops every device. */
static void ck(struct device *dv, int rc)
{
    if (rc < 0 && dv->comm_rc == 0)
        dv->comm_rc = rc;
}

/* Records a device's own failure as the run's error (the first one wins), and returns code.
 * The devices that only learn of it stop with MOAI_EIO; exec_train reports this one. */
static int run_fail(struct run *run, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int run_fail(struct run *run, int code, const char *fmt, ...)
{
    int expected = 0;
    if (atomic_compare_exchange_strong(&run->failed, &expected, 1)) {
        va_list ap;
        va_start(ap, fmt);
        moai_err_vset(&run->fail_err, code, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* Whether any device of the world says bad (collective over the world). */
static bool any_device(struct device *dv, bool bad)
{
    return comm_allreduce_scalar(&dv->world, bad ? 1.0 : 0.0) > 0;
}

int64_t exec_device_bytes(const struct model_config *cfg, const struct layout *layout, int64_t T,
                          int nthreads)
{
    int64_t most = 0;
    for (int stage = 0; stage < layout->pp; stage++) {
        struct shard s;
        struct shard_bytes b;
        if (shard_init(&s, cfg, layout, T, nthreads, shard_device(layout, 0, stage, 0), NULL) < 0)
            return -1;
        shard_bytes(&s, &b);
        shard_release(&s);
        most = b.total > most ? b.total : most;
    }
    return most;
}

/* ---- the tensor-parallel hooks of the model ------------------------------------------- */

static void tp_allreduce_hook(void *arg, float *buf, int64_t n)
{
    struct device *dv = arg;
    ck(dv, comm_allreduce_sum(&dv->tpc, buf, (size_t) n));
}

static void tp_allgather_hook(void *arg, const float *in, float *out, int64_t n)
{
    struct device *dv = arg;
    ck(dv, comm_allgather(&dv->tpc, in, out, (size_t) n));
}

/* ---- buffers -------------------------------------------------------------------------- */

static float *alloc_floats(struct device *dv, int64_t n, const char *what, int *rc)
{
    if (*rc < 0)
        return NULL;
    float *p = dev_alloc(dv->dev, fbytes(n), what);
    if (!p)
        *rc = dv->dev->err.code ? dv->dev->err.code : MOAI_EOOM;
    return p;
}

/* A bf16 frozen base: its units in bf16, widened one at a time into fp32 buffers (those of
 * ZeRO-3's gathered units) before they run. */
static int device_alloc_base16(struct device *dv)
{
    const struct shard *s = &dv->sh;
    int rc = 0;
    dv->params16 = dev_alloc(dv->dev, 2 * s->floats, "the bf16 weights");
    if (!dv->params16)
        return dv->dev->err.code ? dv->dev->err.code : MOAI_EOOM;
    for (int i = 0; i < 2; i++)
        dv->wbuf[i] = alloc_floats(dv, s->max_padded, "a widened unit", &rc);
    if (s->norm_padded)
        dv->nbuf = alloc_floats(dv, s->norm_padded, "the widened final norm", &rc);
    return rc;
}

/* LoRA: the device's adapters, counted against its memory. */
static int device_alloc_lora(struct device *dv)
{
    struct run *run = dv->run;
    struct moai_err err = {0};
    int64_t bytes = lora_dev_bytes(&dv->sh, &run->lc, run->B, run->T);
    int rc = dev_reserve(dv->dev, bytes, "the adapters");
    if (rc < 0)
        return rc;
    dv->ld_reserved = bytes;
    if (lora_dev_init(&dv->ld, &dv->sh, &run->lc, run->B, run->T, &err) < 0) {
        dv->dev->err = err;
        return err.code;
    }
    return 0;
}

/* The device's model: its thread pool, the precision of its products, its tensor-parallel
 * hooks. */
static int device_model_init(struct device *dv)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    struct moai_err err = {0};

    if (llama_init(&dv->m, &s->cfg, run->nthreads, &err) < 0) {
        dv->dev->err = err;
        return err.code;
    }
    dv->m_ready = true;
    /* training.precision bf16: products in bf16 where the cpu has AVX512_BF16 (llama.h) */
    llama_set_bf16(&dv->m, run->job->recipe->training.precision == PRECISION_BF16);
    struct llama_tp tp = {.size = s->lay.tp,
                          .rank = s->tp_rank,
                          .vocab_first = s->vocab_first,
                          .vocab_rows = s->vocab_rows,
                          .allreduce = tp_allreduce_hook,
                          .allgather = tp_allgather_hook,
                          .arg = dv};
    llama_set_tp(&dv->m, &tp);
    return 0;
}

/* The weights, gradients and Adam moments the layout gives the device, in the order of
 * shard_bytes, so a device short of memory fails where the planner says. */
static int device_alloc_state(struct device *dv)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    int rc = 0;

    if (run->base16) {
        rc = device_alloc_base16(dv);
    } else if (!run->zero3) {
        dv->params = alloc_floats(dv, s->floats, "the weights", &rc);
    } else {
        dv->pshard = alloc_floats(dv, s->shard_floats, "the weight shard", &rc);
        for (int i = 0; i < 2; i++)
            dv->wbuf[i] = alloc_floats(dv, s->max_padded, "a gathered unit", &rc);
        if (s->norm_padded)
            dv->nbuf = alloc_floats(dv, s->norm_padded, "the gathered final norm", &rc);
    }
    if (run->lora) {
        /* a frozen base: no gradients, no moments */
    } else if (!run->zero2) {
        dv->grads = alloc_floats(dv, s->floats, "the gradients", &rc);
    } else {
        dv->gshard = alloc_floats(dv, s->shard_floats, "the gradient shard", &rc);
        dv->bucket = alloc_floats(dv, s->max_padded, "a gradient bucket", &rc);
        dv->tmp = alloc_floats(dv, s->max_chunk, "a reduction chunk", &rc);
        if (s->norm_padded)
            dv->nbuck = alloc_floats(dv, s->norm_padded, "the final norm's gradient", &rc);
    }
    dv->opt_floats = run->lora ? 0 : run->zero2 ? s->shard_floats : s->floats;
    if (!run->lora) {
        dv->mom1 = alloc_floats(dv, dv->opt_floats, "the Adam moments", &rc);
        dv->mom2 = alloc_floats(dv, dv->opt_floats, "the Adam moments", &rc);
    }
    if (rc < 0)
        return rc;
    return run->lora ? device_alloc_lora(dv) : 0;
}

/* Every buffer of the device: its model, its state, then the activations of the micro-batches
 * in flight and the workspace. */
static int device_alloc(struct device *dv)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    struct moai_err err = {0};
    int rc;

    if ((rc = device_model_init(dv)) < 0 || (rc = device_alloc_state(dv)) < 0)
        return rc;
    int64_t act = (int64_t) llama_acts_bytes_shape(&s->cfg, &s->shape);
    int64_t bytes = s->in_flight * act + (int64_t) llama_work_bytes_shape(&s->cfg, &s->shape);
    if ((rc = dev_reserve(dv->dev, bytes, "the activations and workspace")) < 0)
        return rc;
    dv->reserved = bytes;
    dv->acts = calloc((size_t) s->in_flight, sizeof(*dv->acts));
    dv->slots = calloc((size_t) s->in_flight, sizeof(*dv->slots));
    dv->lview = calloc((size_t) (s->nlayers + 1), sizeof(*dv->lview));
    dv->gview = calloc((size_t) (s->nlayers + 1), sizeof(*dv->gview));
    if (!dv->acts || !dv->slots || !dv->lview || !dv->gview)
        return moai_err_set(&dv->dev->err, MOAI_ENOMEM, "out of memory");
    if (run->lora) /* the views keep their adapters; the gradient views no base tensor */
        lora_dev_attach(&dv->ld, &dv->m, dv->lview, dv->gview);
    for (int i = 0; i < s->in_flight; i++) {
        if (llama_acts_bind_shape(&dv->acts[i], &s->cfg, &s->shape, NULL, &err) < 0) {
            dv->dev->err = err;
            return err.code;
        }
        dv->nacts++;
        struct slot *sl = &dv->slots[i];
        size_t n = (size_t) (run->B * run->T);
        sl->tokens = malloc(n * sizeof(int32_t));
        sl->labels = malloc(n * sizeof(int32_t));
        sl->lengths = malloc((size_t) run->B * sizeof(int32_t));
        sl->positions = malloc(n * sizeof(int32_t));
        if (!sl->tokens || !sl->labels || !sl->lengths || !sl->positions)
            return moai_err_set(&dv->dev->err, MOAI_ENOMEM, "out of memory");
    }
    if (llama_work_bind_shape(&dv->work, &s->cfg, &s->shape, NULL, &err) < 0) {
        dv->dev->err = err;
        return err.code;
    }
    dv->work_ready = true;
    return 0;
}

static void device_free(struct device *dv)
{
    const struct shard *s = &dv->sh;
    struct dev *d = dv->dev;

    for (int i = 0; dv->slots && i < s->in_flight; i++) {
        free(dv->slots[i].tokens);
        free(dv->slots[i].labels);
        free(dv->slots[i].lengths);
        free(dv->slots[i].positions);
    }
    free(dv->slots);
    free(dv->rows);
    for (int i = 0; i < dv->nacts; i++)
        llama_acts_release(&dv->acts[i]);
    free(dv->acts);
    free(dv->lview);
    free(dv->gview);
    if (dv->work_ready)
        llama_work_release(&dv->work);
    if (dv->reserved)
        dev_unreserve(d, dv->reserved);
    lora_dev_release(&dv->ld);
    if (dv->ld_reserved)
        dev_unreserve(d, dv->ld_reserved);
    if (dv->sh_ready) {
        dev_free(d, dv->mom1, fbytes(dv->opt_floats));
        dev_free(d, dv->mom2, fbytes(dv->opt_floats));
        dev_free(d, dv->nbuck, fbytes(s->norm_padded));
        dev_free(d, dv->tmp, fbytes(s->max_chunk));
        dev_free(d, dv->bucket, fbytes(s->max_padded));
        dev_free(d, dv->gshard, fbytes(s->shard_floats));
        dev_free(d, dv->grads, fbytes(s->floats));
        dev_free(d, dv->nbuf, fbytes(s->norm_padded));
        for (int i = 0; i < 2; i++)
            dev_free(d, dv->wbuf[i], fbytes(s->max_padded));
        dev_free(d, dv->pshard, fbytes(s->shard_floats));
        dev_free(d, dv->params, fbytes(s->floats));
        dev_free(d, dv->params16, 2 * s->floats);
        shard_release(&dv->sh);
    }
    if (dv->m_ready)
        llama_release(&dv->m);
}

/* The floats of unit u that data-parallel rank r owns: [*first, *first + *n) of the unit. */
static void owned(const struct shard_unit *u, int r, int64_t *first, int64_t *n)
{
    int64_t a = u->chunk * r, b = a + u->chunk;
    a = a < u->len ? a : u->len;
    b = b < u->len ? b : u->len;
    *first = a;
    *n = b - a;
}

/* Loads the starting weights (and moments on resume) from the whole model's arenas. */
static int device_load(struct device *dv)
{
    const struct train_job *job = dv->run->job;
    const struct shard *s = &dv->sh;
    bool zero2 = dv->run->zero2, zero3 = dv->run->zero3;
    float *unit = malloc((size_t) fbytes(s->max_padded));
    if (!unit)
        return moai_err_set(&dv->dev->err, MOAI_ENOMEM, "out of memory");

    for (int ui = 0; ui < s->nunits; ui++) {
        const struct shard_unit *u = &s->units[ui];
        int64_t first, n;
        owned(u, s->dp_rank, &first, &n);
        shard_unit_from_full(s, ui, job->init_params, unit);
        if (dv->run->base16) {
            optim_f32_to_bf16(dv->params16 + u->off, unit, u->len);
        } else if (zero3 && dv->run->lora &&
                   dv->run->job->recipe->training.precision == PRECISION_BF16) {
            /* ZeRO-3 keeps fp32 shards, of the bf16 values every other layout holds */
            for (int64_t i = first; i < first + n; i++)
                unit[i] = optim_f32_from_bf16(optim_bf16_from_f32(unit[i]));
            memcpy(dv->pshard + u->shard, unit + first, (size_t) fbytes(n));
        } else if (zero3)
            memcpy(dv->pshard + u->shard, unit + first, (size_t) fbytes(n));
        else
            memcpy(dv->params + u->off, unit, (size_t) fbytes(u->len));
        for (int k = 0; k < 2 && job->init_m && !dv->run->lora; k++) {
            float *mom = k ? dv->mom2 : dv->mom1;
            shard_unit_from_full(s, ui, k ? job->init_v : job->init_m, unit);
            if (zero2)
                memcpy(mom + u->shard, unit + first, (size_t) fbytes(n));
            else
                memcpy(mom + u->off, unit, (size_t) fbytes(u->len));
        }
    }
    free(unit);
    if (dv->run->lora) {
        lora_dev_load(&dv->ld, s, job->lora_init, 0);
        if (job->lora_m) {
            lora_dev_load(&dv->ld, s, job->lora_m, 1);
            lora_dev_load(&dv->ld, s, job->lora_v, 2);
        }
    }
    return 0;
}

/* ---- units in and out of the model ---------------------------------------------------- */

/* The weights of unit u for the model to read: in the arena, or gathered (ZeRO-3) or widened
 * (a bf16 frozen base) into buf. */
static float *unit_weights(struct device *dv, int u, float *buf)
{
    const struct shard_unit *x = &dv->sh.units[u];
    if (dv->run->base16) {
        optim_bf16_to_f32(buf, dv->params16 + x->off, x->len);
        return buf;
    }
    if (!dv->run->zero3)
        return dv->params + x->off;
    ck(dv, comm_allgather(&dv->dpc, dv->pshard + x->shard, buf, (size_t) x->chunk));
    return buf;
}

/* Where unit u's gradient accumulates: the arena, or the zeroed bucket buf (ZeRO-2/3). */
static float *unit_grads(struct device *dv, int u, float *buf)
{
    const struct shard_unit *x = &dv->sh.units[u];
    if (!dv->run->zero2)
        return dv->grads + x->off;
    memset(buf, 0, (size_t) fbytes(x->chunk * dv->sh.lay.dp));
    return buf;
}

/* ZeRO-2/3: reduce-scatters unit u's gradient from buf and adds this rank's chunk to the
 * gradient shard. */
static void unit_reduce(struct device *dv, int u, const float *buf)
{
    const struct shard_unit *x = &dv->sh.units[u];
    if (!dv->run->zero2)
        return;
    float *dst = dv->gshard + x->shard;
    ck(dv, comm_reduce_scatter_sum(&dv->dpc, buf, dv->tmp, (size_t) x->chunk));
    for (int64_t i = 0; i < x->chunk; i++)
        dst[i] += dv->tmp[i];
}

/* The unit of the stage's local layer l. */
static int layer_unit(const struct device *dv, int64_t l)
{
    return (dv->sh.has_embed ? 1 : 0) + (int) l;
}

/* ---- one micro-batch through the stage ------------------------------------------------ */

/* Forward of the micro-batch in slot k: the embedding (first stage) or the received input,
 * the stage's layers, and on the last stage the head and loss. Returns the loss sum (last
 * stage; 0 elsewhere). */
static double stage_forward(struct device *dv, int k, bool backward, float dloss)
{
    const struct shard *s = &dv->sh;
    struct llama_acts *a = &dv->acts[k];
    const struct llama_batch *b = &dv->slots[k].batch;
    struct llama_params pv = {0};

    dv->ld.state.first_token = dv->slots[k].first_token;
    if (s->has_embed) {
        pv.embed = unit_weights(dv, s->embed_unit, dv->wbuf[0]);
        llama_embed_forward(&dv->m, &pv, a, &dv->work, b);
    }
    for (int64_t l = 0; l < s->nlayers; l++) {
        float *out = l + 1 < s->nlayers ? a->layers[l + 1].x : a->xf;
        shard_layer_view(&dv->lview[l], unit_weights(dv, layer_unit(dv, l), dv->wbuf[0]), &s->cfg);
        llama_layer_forward(&dv->m, &dv->lview[l], &a->layers[l], out, &dv->work, b);
    }
    if (!s->has_head)
        return 0.0;
    if (!s->has_embed)
        llama_set_targets(&dv->work, b);
    pv.norm = unit_weights(dv, s->norm_unit, dv->nbuf);
    pv.lm_head =
        unit_weights(dv, s->lm_head_unit >= 0 ? s->lm_head_unit : s->embed_unit, dv->wbuf[1]);
    return llama_head_forward(&dv->m, &pv, a, &dv->work, backward, dloss);
}

/* stage_backward with a frozen base: the adapters' gradients only (the views' base tensors
 * are NULL), nothing to reduce per unit. */
static void stage_backward_lora(struct device *dv, int k)
{
    const struct shard *s = &dv->sh;
    struct llama_acts *a = &dv->acts[k];
    const struct llama_batch *b = &dv->slots[k].batch;
    struct llama_params pv = {0}, gv = {0};

    dv->ld.state.first_token = dv->slots[k].first_token;
    if (s->has_head) {
        int lm = s->lm_head_unit >= 0 ? s->lm_head_unit : s->embed_unit;
        /* the units the forward just before gathered or widened are still in place */
        bool held = dv->run->zero3 || dv->run->base16;
        pv.norm = held ? dv->nbuf : dv->params + s->units[s->norm_unit].off;
        pv.lm_head = held ? dv->wbuf[1] : dv->params + s->units[lm].off;
        llama_head_backward(&dv->m, &pv, &gv, a, &dv->work);
    }
    for (int64_t l = s->nlayers - 1; l >= 0; l--) {
        shard_layer_view(&dv->lview[l], unit_weights(dv, layer_unit(dv, l), dv->wbuf[0]), &s->cfg);
        llama_layer_backward(&dv->m, &dv->lview[l], &dv->gview[l], &a->layers[l], &dv->work, b);
    }
}

/* Backward of the micro-batch in slot k, right after its forward on the last stage, else
 * with the gradient of the stage's output in work.dres. Leaves the gradient of the stage's
 * input in work.dres (the first stage scatters it into the embedding). */
static void stage_backward(struct device *dv, int k)
{
    const struct shard *s = &dv->sh;
    struct llama_acts *a = &dv->acts[k];
    const struct llama_batch *b = &dv->slots[k].batch;
    struct llama_params pv = {0}, gv = {0};

    if (dv->run->lora) {
        stage_backward_lora(dv, k);
        return;
    }
    if (s->has_head) {
        int lm = s->lm_head_unit >= 0 ? s->lm_head_unit : s->embed_unit;
        /* the weights gathered by the forward just before are still in place */
        pv.norm = dv->run->zero3 ? dv->nbuf : dv->params + s->units[s->norm_unit].off;
        pv.lm_head = dv->run->zero3 ? dv->wbuf[1] : dv->params + s->units[lm].off;
        gv.norm = unit_grads(dv, s->norm_unit, dv->nbuck);
        gv.lm_head = unit_grads(dv, lm, dv->bucket);
        llama_head_backward(&dv->m, &pv, &gv, a, &dv->work);
        unit_reduce(dv, s->norm_unit, gv.norm);
        unit_reduce(dv, lm, gv.lm_head);
    }
    for (int64_t l = s->nlayers - 1; l >= 0; l--) {
        int u = layer_unit(dv, l);
        shard_layer_view(&dv->lview[l], unit_weights(dv, u, dv->wbuf[0]), &s->cfg);
        float *g = unit_grads(dv, u, dv->bucket);
        shard_layer_view(&dv->gview[l], g, &s->cfg);
        llama_layer_backward(&dv->m, &dv->lview[l], &dv->gview[l], &a->layers[l], &dv->work, b);
        unit_reduce(dv, u, g);
    }
    if (s->has_embed) {
        gv.embed = unit_grads(dv, s->embed_unit, dv->bucket);
        llama_embed_backward(&dv->m, &gv, &dv->work, b);
        unit_reduce(dv, s->embed_unit, gv.embed);
    }
}

/* Copies records rows[0..B) into slot k; labels of rows past `real` are masked. */
static void fill_slot(struct device *dv, int k, const struct train_records *recs,
                      const int64_t *rows, int64_t B, int64_t real)
{
    struct slot *sl = &dv->slots[k];
    int64_t T = recs->T;
    for (int64_t i = 0; i < B; i++) {
        memcpy(sl->tokens + i * T, recs->tokens + rows[i] * T, (size_t) T * sizeof(int32_t));
        if (i < real)
            memcpy(sl->labels + i * T, recs->labels + rows[i] * T, (size_t) T * sizeof(int32_t));
        else
            for (int64_t t = 0; t < T; t++)
                sl->labels[i * T + t] = -100;
        sl->lengths[i] = recs->lengths[rows[i]];
        if (recs->positions)
            memcpy(sl->positions + i * T, recs->positions + rows[i] * T,
                   (size_t) T * sizeof(int32_t));
    }
    sl->batch = (struct llama_batch){.B = B,
                                     .T = T,
                                     .tokens = sl->tokens,
                                     .labels = sl->labels,
                                     .lengths = sl->lengths,
                                     .positions = recs->positions ? sl->positions : NULL};
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

/* ---- the pipeline schedule ------------------------------------------------------------ */

static size_t act_bytes(const struct device *dv)
{
    return (size_t) fbytes(dv->run->B * dv->run->T * dv->sh.full.hidden_size);
}

/* Micro-batch i of this replica's share of the step's rows into its slot. */
static void fill_micro_batch(struct device *dv, const int64_t *rows, int i)
{
    const struct shard *s = &dv->sh;
    int64_t B = dv->run->B, first = ((int64_t) s->dp_rank * s->lay.num_micro_batches + i) * B;
    fill_slot(dv, i % (int) s->in_flight, &dv->run->job->train, rows + first, B, B);
    dv->slots[i % (int) s->in_flight].first_token = first * dv->run->T;
}

/* Where the input of micro-batch slot k arrives (not on the first stage). */
static float *stage_input(struct device *dv, int k)
{
    return dv->acts[k].layers[0].x;
}

/*
 * One step's micro-batches under 1F1B (PipeDream-Flush, as Megatron-LM schedules it): stage
 * s first runs min(pp - s - 1, nmb) forwards, then alternates one forward and one backward,
 * then runs the remaining backwards. Sends and receives between neighbouring stages pair up
 * as exchanges (comm_sendrecv), so rendezvous transports never deadlock. Micro-batch i uses
 * slot i mod in_flight: a slot is reused only after its backward. Returns the loss sum of
 * the stage (the last stage's; 0 elsewhere).
 */
static double step_pipeline(struct device *dv, const int64_t *rows, float dloss)
{
    const struct shard *s = &dv->sh;
    int pp = s->lay.pp, stage = s->stage, nmb = s->lay.num_micro_batches;
    int nslot = (int) s->in_flight;
    int warm = pp - stage - 1 < nmb ? pp - stage - 1 : nmb, rest = nmb - warm;
    bool first = stage == 0, last = stage == pp - 1;
    size_t bytes = act_bytes(dv);
    double loss = 0.0;

    for (int i = 0; i < warm; i++) {
        fill_micro_batch(dv, rows, i);
        if (!first)
            ck(dv, comm_recv(&dv->ppc, stage - 1, stage_input(dv, i % nslot), bytes));
        loss += stage_forward(dv, i % nslot, true, dloss);
        ck(dv, comm_send(&dv->ppc, stage + 1, dv->acts[i % nslot].xf, bytes));
    }
    if (rest > 0) {
        fill_micro_batch(dv, rows, warm);
        if (!first)
            ck(dv, comm_recv(&dv->ppc, stage - 1, stage_input(dv, warm % nslot), bytes));
    }
    for (int i = 0; i < rest; i++) {
        int f = warm + i, k = f % nslot, bk = i % nslot;
        loss += stage_forward(dv, k, true, dloss);
        if (!last)
            ck(dv, comm_sendrecv(&dv->ppc, stage + 1, dv->acts[k].xf, bytes, stage + 1,
                                 dv->work.dres, bytes));
        stage_backward(dv, bk);
        if (i == rest - 1) {
            if (!first)
                ck(dv, comm_send(&dv->ppc, stage - 1, dv->work.dres, bytes));
        } else {
            fill_micro_batch(dv, rows, f + 1);
            if (!first)
                ck(dv, comm_sendrecv(&dv->ppc, stage - 1, dv->work.dres, bytes, stage - 1,
                                     stage_input(dv, (f + 1) % nslot), bytes));
        }
    }
    for (int i = rest; i < nmb; i++) {
        ck(dv, comm_recv(&dv->ppc, stage + 1, dv->work.dres, bytes));
        stage_backward(dv, i % nslot);
        if (!first)
            ck(dv, comm_send(&dv->ppc, stage - 1, dv->work.dres, bytes));
    }
    return loss;
}

/* ---- the optimizer step --------------------------------------------------------------- */

/* Sums, over comm c, floats [a, b) of every unit's gradient that ranges() selects. Under
 * ZeRO only the owned chunk of each unit is held, so the range is clipped to it. */
static void sum_unit_range(struct device *dv, struct comm *c, int u, int64_t a, int64_t b)
{
    const struct shard_unit *x = &dv->sh.units[u];
    if (!dv->run->zero2) {
        ck(dv, comm_allreduce_sum(c, dv->grads + x->off + a, (size_t) (b - a)));
        return;
    }
    int64_t first, n;
    owned(x, dv->sh.dp_rank, &first, &n);
    int64_t lo = a > first ? a : first, hi = b < first + n ? b : first + n;
    if (hi < lo)
        hi = lo; /* every rank of c calls with the same count: same chunking */
    ck(dv, comm_allreduce_sum(c, dv->gshard + x->shard + (lo - first), (size_t) (hi - lo)));
}

/* Gradients that several devices hold partial sums of become whole: the k and v of a kv
 * head shared by tp ranks, the tied embedding's first- and last-stage copies. */
static void sum_replicas(struct device *dv)
{
    const struct shard *s = &dv->sh;
    if (s->kv_replicated)
        for (int u = 0; u < s->nunits; u++)
            if (s->units[u].kind == SHARD_LAYER) {
                int64_t a, b;
                shard_kv_range(s, u, &a, &b);
                sum_unit_range(dv, &dv->kvc, u, a, b);
            }
    if (s->full.tie_word_embeddings && s->lay.pp > 1) {
        int u = s->has_embed ? s->embed_unit : s->has_head ? s->lm_head_unit : -1;
        if (u >= 0)
            sum_unit_range(dv, &dv->embc, u, 0, s->units[u].len);
    }
}

static double sumsq(const float *x, int64_t n)
{
    double acc = 0.0;
    for (int64_t i = 0; i < n; i++)
        acc += (double) x[i] * x[i];
    return acc;
}

/* This device's share of the squared gradient norm: what it holds of each unit (its chunk
 * under ZeRO; otherwise the units u with u mod dp = its data-parallel rank, the replicas
 * sharing the work), less what another device also holds. Over the pool. */
static double local_sumsq(struct device *dv)
{
    const struct shard *s = &dv->sh;
    double total = 0.0;
    for (int u = 0; u < s->nunits; u++) {
        const struct shard_unit *x = &s->units[u];
        int64_t first = 0, n = x->len, dup[4][2];
        const float *g = dv->run->zero2 ? dv->gshard + x->shard : dv->grads + x->off;
        if (!dv->run->zero2 && u % s->lay.dp != s->dp_rank)
            continue;
        if (dv->run->zero2)
            owned(x, s->dp_rank, &first, &n);
        total += optim_sum_squares(dv->m.pool, g, n);
        int nd = shard_duplicate_ranges(s, u, dup);
        for (int i = 0; i < nd; i++) {
            int64_t lo = dup[i][0] > first ? dup[i][0] : first;
            int64_t hi = dup[i][1] < first + n ? dup[i][1] : first + n;
            if (hi > lo)
                total -= sumsq(g + (lo - first), hi - lo);
        }
    }
    return total;
}

/* The adapters' optimizer step: gradients made whole, the global norm, clipping, AdamW.
 * Returns the gradient norm. */
static double optimizer_step_lora(struct device *dv, int64_t step, const struct optim_adamw *hp)
{
    const struct shard *s = &dv->sh;
    double clip = dv->run->job->recipe->training.grad_clip;
    ck(dv, lora_dev_reduce(&dv->ld, s, &dv->dpc, s->kv_replicated ? &dv->kvc : NULL));
    double norm = sqrt(comm_allreduce_scalar(&dv->world, lora_dev_sumsq(&dv->ld, s)));
    float scale = clip > 0 && norm > clip ? (float) (clip / (norm + 1e-6)) : 1.0f;
    lora_dev_step(&dv->ld, dv->m.pool, step, hp, scale);
    return norm;
}

/* The optimizer step once the step's gradients are complete. Returns the gradient norm. */
static double optimizer_step(struct device *dv, int64_t step, double lr)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    const struct recipe *r = run->job->recipe;
    struct optim_adamw hp = {.lr = lr,
                             .beta1 = r->training.betas[0],
                             .beta2 = r->training.betas[1],
                             .eps = r->training.eps,
                             .weight_decay = r->training.weight_decay};

    if (run->lora)
        return optimizer_step_lora(dv, step, &hp);
    if (!run->zero2)
        ck(dv, comm_allreduce_sum(&dv->dpc, dv->grads, (size_t) s->floats));
    sum_replicas(dv);
    double norm = sqrt(comm_allreduce_scalar(&dv->world, local_sumsq(dv)));
    float *g = run->zero2 ? dv->gshard : dv->grads;
    int64_t n = run->zero2 ? s->shard_floats : s->floats;
    if (r->training.grad_clip > 0 && norm > r->training.grad_clip) {
        float scale = (float) (r->training.grad_clip / (norm + 1e-6));
        optim_scale(dv->m.pool, g, n, scale);
    }
    if (!run->zero2) {
        optim_adamw_step(dv->m.pool, dv->params, g, dv->mom1, dv->mom2, n, step, &hp);
        return norm;
    }
    if (run->zero3) {
        optim_adamw_step(dv->m.pool, dv->pshard, g, dv->mom1, dv->mom2, n, step, &hp);
        return norm;
    }
    /* ZeRO-2: update the owned chunk of each unit in the whole weights, then all-gather */
    for (int u = 0; u < s->nunits; u++) {
        const struct shard_unit *x = &s->units[u];
        int64_t first, cnt;
        owned(x, s->dp_rank, &first, &cnt);
        if (cnt > 0)
            optim_adamw_step(dv->m.pool, dv->params + x->off + first, dv->gshard + x->shard,
                             dv->mom1 + x->shard, dv->mom2 + x->shard, cnt, step, &hp);
        memset(dv->tmp, 0, (size_t) fbytes(x->chunk));
        memcpy(dv->tmp, dv->params + x->off + first, (size_t) fbytes(cnt));
        ck(dv, comm_allgather(&dv->dpc, dv->tmp, dv->bucket, (size_t) x->chunk));
        memcpy(dv->params + x->off, dv->bucket, (size_t) fbytes(x->len));
    }
    return norm;
}

/* Whether every weight this device updates is finite after the step. */
static bool params_finite(const struct device *dv)
{
    const float *p = dv->run->lora ? dv->ld.a.arena : dv->run->zero3 ? dv->pshard : dv->params;
    int64_t n = dv->run->lora    ? dv->ld.a.nfloats
                : dv->run->zero3 ? dv->sh.shard_floats
                                 : dv->sh.floats;
    return optim_all_finite(dv->m.pool, p, n);
}

/* ---- checkpoints ---------------------------------------------------------------------- */

/* The whole unit u of weights (k = 0) or a moment (1, 2) into out (max_padded floats):
 * gathered over the data-parallel group when sharded (collective over it). */
static void unit_whole(struct device *dv, int u, int k, float *out)
{
    const struct shard_unit *x = &dv->sh.units[u];
    bool sharded = k == 0 ? dv->run->zero3 : dv->run->zero2;
    const float *src = k == 0 ? (sharded ? dv->pshard : dv->params) : k == 1 ? dv->mom1 : dv->mom2;
    if (!sharded) {
        memcpy(out, src + x->off, (size_t) fbytes(x->len));
        return;
    }
    int64_t first, n;
    owned(x, dv->sh.dp_rank, &first, &n);
    memset(dv->tmp, 0, (size_t) fbytes(x->chunk));
    memcpy(dv->tmp, src + x->shard, (size_t) fbytes(n));
    ck(dv, comm_allgather(&dv->dpc, dv->tmp, out, (size_t) x->chunk));
}

/* The buffers of a checkpoint's gather: one unit of this device's; on device 0 a unit of any
 * device and the layout of every device of replica 0 it receives from. */
struct gather {
    float *unit, *tmp;
    struct shard *others;
    int nothers, ready; /* others: pp x tp, those laid out */
};

static void gather_release(struct gather *g)
{
    for (int i = 0; i < g->ready; i++)
        shard_release(&g->others[i]);
    free(g->others);
    free(g->tmp);
    free(g->unit);
}

/* Returns whether every buffer is there. */
static bool gather_init(struct gather *g, const struct device *dv)
{
    const struct shard *s = &dv->sh;
    int64_t most = 1;

    memset(g, 0, sizeof(*g));
    g->nothers = s->lay.pp * s->lay.tp;
    g->unit = malloc((size_t) fbytes(s->max_padded > 0 ? s->max_padded : 1));
    if (!g->unit || s->dev != 0)
        return g->unit != NULL;
    g->others = calloc((size_t) g->nothers, sizeof(*g->others));
    for (int i = 0; g->others && i < g->nothers; i++, g->ready++) {
        int d = shard_device(&s->lay, 0, i / s->lay.tp, i % s->lay.tp);
        if (shard_init(&g->others[i], &s->full, &s->lay, dv->run->T, dv->run->nthreads, d, NULL) <
            0)
            break;
        most = g->others[i].max_padded > most ? g->others[i].max_padded : most;
    }
    g->tmp = g->ready == g->nothers ? malloc((size_t) fbytes(most)) : NULL;
    return g->tmp != NULL;
}

/* Gathers the weights and both moments of the whole model into device 0's host arrays:
 * replica 0's devices send their units (ZeRO's gathers, collective over the data-parallel
 * group, run on every rank), device 0 places them, in device order. */
static void gather_state(struct device *dv, struct gather *g)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    float *arr[3] = {run->host_params, run->host_m, run->host_v};

    for (int u = 0; u < s->nunits; u++)
        for (int k = 0; k < 3; k++) {
            unit_whole(dv, u, k, g->unit);
            if (s->dp_rank != 0)
                continue;
            if (s->dev == 0)
                shard_unit_to_full(s, u, g->unit, arr[k]);
            else if (!(s->tied_copy && u == s->lm_head_unit))
                ck(dv, comm_send(&dv->world, 0, g->unit, (size_t) fbytes(s->units[u].len)));
        }
    for (int i = 0; s->dev == 0 && i < g->nothers; i++) {
        const struct shard *o = &g->others[i];
        if (o->dev == 0)
            continue;
        for (int u = 0; u < o->nunits; u++) {
            if (o->tied_copy && u == o->lm_head_unit)
                continue;
            for (int k = 0; k < 3; k++) {
                ck(dv, comm_recv(&dv->world, o->dev, g->tmp, (size_t) fbytes(o->units[u].len)));
                shard_unit_to_full(o, u, g->tmp, arr[k]);
            }
        }
    }
}

/* Weights and moments of the whole model on device 0: every device of data-parallel rank 0
 * sends its units (gathered over its group first under ZeRO), device 0 places them in the
 * Hugging Face order of the host arenas, then saves. */
/* Device 0 saves what was gathered (the model's weights and moments, or the adapters' with
 * LoRA); every device learns whether the save worked. */
static int save_gathered(struct device *dv, int64_t steps_done, const float *p, const float *m,
                         const float *v)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    if (s->dev == 0 && run->job->save) {
        memset(&run->save_err, 0, sizeof(run->save_err));
        exec_saving = 1;
        run->save_rc = run->job->save(run->job->save_arg, steps_done, p, m, v, &run->save_err);
        exec_saving = 0;
    }
    if (!any_device(dv, s->dev == 0 && run->save_rc < 0))
        return 0;
    return s->dev == 0 ? run->save_rc : MOAI_EIO;
}

static int save_checkpoint_lora(struct device *dv, int64_t steps_done);

/* Weights and moments of the whole model on device 0: every device of data-parallel rank 0
 * sends its units (gathered over its group first under ZeRO), device 0 places them in the
 * Hugging Face order of the host arenas, then saves. */
static int save_checkpoint(struct device *dv, int64_t steps_done)
{
    struct run *run = dv->run;
    struct gather g;

    if (run->lora)
        return save_checkpoint_lora(dv, steps_done);
    bool bad = !gather_init(&g, dv);
    /* every device has its buffers, or none sends nor receives */
    if (any_device(dv, bad)) {
        if (bad)
            run_fail(run, MOAI_ENOMEM, "out of memory gathering the checkpoint of step %lld",
                     (long long) steps_done);
        gather_release(&g);
        return bad ? MOAI_ENOMEM : MOAI_EIO;
    }
    gather_state(dv, &g);
    gather_release(&g);
    /* a collective that failed anywhere: the gathered state is not the run's; not saved */
    if (any_device(dv, dv->comm_rc < 0)) {
        if (dv->comm_rc < 0)
            run_fail(run, dv->comm_rc,
                     "a collective failed (out of memory) gathering the "
                     "checkpoint of step %lld",
                     (long long) steps_done);
        return dv->comm_rc < 0 ? dv->comm_rc : MOAI_EIO;
    }
    return save_gathered(dv, steps_done, run->host_params, run->host_m, run->host_v);
}

/* The adapters and their moments gathered on device 0 (lora_dev_gather), then saved there. */
static int save_checkpoint_lora(struct device *dv, int64_t steps_done)
{
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    int nothers = s->lay.pp * s->lay.tp, ready = 0;
    struct shard *others = NULL;
    float *tmp = NULL;
    bool bad = false;

    if (s->dev == 0) {
        int64_t most = 1;
        others = calloc((size_t) nothers, sizeof(*others));
        for (int i = 0; others && i < nothers; i++, ready++) {
            int d = shard_device(&s->lay, 0, i / s->lay.tp, i % s->lay.tp);
            if (shard_init(&others[i], &s->full, &s->lay, run->T, run->nthreads, d, NULL) < 0)
                break;
            int64_t n = shard_lora_floats(&others[i], run->lc.rank, run->lc.targets);
            most = n > most ? n : most;
        }
        tmp = ready == nothers ? malloc((size_t) fbytes(most)) : NULL;
        bad = !tmp;
    }
    if (any_device(dv, bad)) {
        if (bad)
            run_fail(run, MOAI_ENOMEM, "out of memory gathering the checkpoint of step %lld",
                     (long long) steps_done);
        for (int i = 0; i < ready; i++)
            shard_release(&others[i]);
        free(others);
        free(tmp);
        return bad ? MOAI_ENOMEM : MOAI_EIO;
    }
    for (int k = 0; k < 3; k++)
        ck(dv, lora_dev_gather(&dv->ld, s, &dv->world, k, others, s->dev == 0 ? nothers : 0, tmp,
                               &run->host_a[k]));
    for (int i = 0; i < ready; i++)
        shard_release(&others[i]);
    free(others);
    free(tmp);
    if (any_device(dv, dv->comm_rc < 0)) {
        if (dv->comm_rc < 0)
            run_fail(run, dv->comm_rc,
                     "a collective failed (out of memory) gathering the checkpoint of step %lld",
                     (long long) steps_done);
        return dv->comm_rc < 0 ? dv->comm_rc : MOAI_EIO;
    }
    return save_gathered(dv, steps_done, run->host_a[0].arena, run->host_a[1].arena,
                         run->host_a[2].arena);
}

/* ---- validation ----------------------------------------------------------------------- */

/* Validation loss over the validation records, split over the replicas, each micro-batch
 * forward through the pipeline, into *loss (NAN when nothing counts). Returns 0, or an error
 * on every device alike. */
static int validate(struct device *dv, double *loss)
{
    dv->ld.state.train = false; /* no dropout in evaluation (the step turns it back on) */
    struct run *run = dv->run;
    const struct shard *s = &dv->sh;
    const struct train_records *vr = &run->job->valid;
    int dp = s->lay.dp, pp = s->lay.pp, stage = s->stage;
    int64_t per = (vr->n + dp - 1) / dp;
    int64_t lo = per * s->dp_rank, hi = lo + per < vr->n ? lo + per : vr->n;
    int64_t *rows = malloc((size_t) run->B * sizeof(*rows)), count = 0;
    size_t bytes = act_bytes(dv);
    double sum = 0;

    *loss = NAN;
    /* every replica runs the same number of micro-batches (ZeRO-3's gathers are collective) */
    if (any_device(dv, !rows)) {
        free(rows);
        return rows ? MOAI_EIO : run_fail(run, MOAI_ENOMEM, "out of memory validating");
    }
    int64_t nmb = (per + run->B - 1) / run->B;
    for (int64_t k = 0; k < nmb; k++) {
        int64_t B = 0;
        for (int64_t i = lo + k * run->B; i < hi && B < run->B; i++)
            rows[B++] = i;
        int64_t real = B;
        while (B < run->B) /* pad with a repeated row whose labels do not count */
            rows[B++] = real ? rows[0] : 0;
        fill_slot(dv, 0, vr, rows, B, real);
        count += count_targets(vr, rows, real);
        if (stage > 0)
            ck(dv, comm_recv(&dv->ppc, stage - 1, stage_input(dv, 0), bytes));
        double l = stage_forward(dv, 0, false, 1.0f);
        if (stage < pp - 1)
            ck(dv, comm_send(&dv->ppc, stage + 1, dv->acts[0].xf, bytes));
        if (s->has_head && s->tp_rank == 0)
            sum += l;
    }
    free(rows);
    bool counts = s->stage == 0 && s->tp_rank == 0;
    sum = comm_allreduce_scalar(&dv->world, sum);
    double total = comm_allreduce_scalar(&dv->world, counts ? (double) count : 0.0);
    if (any_device(dv, dv->comm_rc < 0))
        return dv->comm_rc < 0
                   ? run_fail(run, dv->comm_rc, "a collective failed (out of memory) validating")
                   : MOAI_EIO;
    *loss = total > 0 ? sum / total : NAN;
    return 0;
}

/* Hands an event to the job's report (device 0's thread). A failed report is kept in
 * run->report_errno and stops the run at the next step, saving, as a signal does. */
static void report(struct run *run, const struct train_event *ev)
{
    const struct train_job *job = run->job;
    int e = job->report ? job->report(job->report_arg, ev) : 0;
    if (e && !run->report_errno)
        run->report_errno = e;
}

/* Validation after step: every device runs it (it is collective); device 0 records the loss in
 * job->eval_losses and reports it. Returns 0 with *loss, or the
 * collective failure of validate. */
static int evaluate(struct device *dv, int64_t step, double *loss)
{
    struct run *run = dv->run;
    const struct train_job *job = run->job;
    double vl;
    int rc = validate(dv, &vl);
    if (rc < 0)
        return rc;
    *loss = vl;
    if (dv->dev->id != 0)
        return 0;
    if (job->eval_losses)
        job->eval_losses[step - 1] = vl;
    report(run, &(struct train_event){.kind = TRAIN_EVAL,
                                      .eval_step = step,
                                      .total_steps = job->total_steps,
                                      .eval_loss = vl});
    return 0;
}

/* The communicators of device dev: its groups in the layout, split from the world. */
static int device_comms(struct device *dv)
{
    struct comm_world *w = dv->run->world;
    const struct shard *s = &dv->sh;
    int d = s->dev, dp = s->lay.dp, pp = s->lay.pp, tp = s->lay.tp, ndev = dp * pp * tp;
    int rc = 0;

    comm_world_all(w, d, &dv->world);
    rc |= comm_world_split(w, d, s->stage * tp + s->tp_rank, s->dp_rank, &dv->dpc);
    rc |= comm_world_split(w, d, s->dp_rank * pp + s->stage, s->tp_rank, &dv->tpc);
    rc |= comm_world_split(w, d, s->dp_rank * tp + s->tp_rank, s->stage, &dv->ppc);
    /* kv groups: same replica, stage and kv head */
    rc |= comm_world_split(
        w, d, (s->dp_rank * pp + s->stage) * (int) s->full.num_key_value_heads + (int) s->kv_first,
        s->tp_rank, &dv->kvc);
    /* the embedding's two copies: first and last stage of a replica and tp rank; the other
     * devices each alone */
    bool emb = s->full.tie_word_embeddings && pp > 1 && (s->has_embed || s->has_head);
    rc |=
        comm_world_split(w, d, emb ? s->dp_rank * tp + s->tp_rank : ndev + d, s->stage, &dv->embc);
    return rc ? moai_err_set(&dv->dev->err, MOAI_ENOMEM, "out of memory splitting communicators")
              : 0;
}

/* A device whose own buffers fit learns, on device 0, which device ran out of memory and
 * what it asked for (in this process or another), for the OUT_OF_MEMORY report; the others
 * fail quietly. Collective over the world, like the check before it. */
static int alloc_failed_elsewhere(struct device *dv)
{
    struct run *run = dv->run;
    struct dev *d = dv->dev;
    bool oom = d->err.code == MOAI_EOOM;
    double any_oom = comm_allreduce_scalar(&dv->world, oom ? 1.0 : 0.0);
    int first = -1;
    for (int i = 0; i < run->ndev && any_oom > 0; i++) {
        double asked = comm_allreduce_scalar(
            &dv->world, i == d->id && oom ? (double) d->oom_requested_bytes : 0);
        if (asked > 0 && first < 0) {
            first = i;
            if (d->id == 0) {
                run->res->oom_device = i;
                run->res->oom_requested_bytes = (int64_t) asked;
            }
        }
    }
    if (d->err.code < 0)
        return d->err.code;
    if (__atomic_load_n(&run->local_failed, __ATOMIC_SEQ_CST)) /* it reports the failure */
        return 0;
    if (first >= 0)
        return moai_err_set(&d->err, MOAI_EOOM, "device %d ran out of memory", first);
    return moai_err_set(&d->err, MOAI_EIO, "another device failed to set up");
}

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGINT:
        return "SIGINT";
    case SIGTERM:
        return "SIGTERM";
    case SIGPIPE:
        return "SIGPIPE";
    case SIGHUP:
        return "SIGHUP";
    default:
        return "a signal";
    }
}

/* The error of a run stopped after saving: by a signal here or in another process (MOAI_EINTR),
 * or by a failed report (MOAI_EIO). */
static int interrupted(const struct run *run, struct moai_err *err)
{
    const char *dir = run->job->recipe->training.save_dir;
    long long step = (long long) run->res->steps_done;
    int sig = exec_stop_requested;
    if (!sig && run->report_errno)
        return moai_err_set(err, MOAI_EIO,
                            "cannot write %s: %s; checkpoint saved in '%s' after step %lld",
                            run->job->report_name ? run->job->report_name : "the report",
                            strerror(run->report_errno), dir, step);
    if (!sig)
        return moai_err_set(err, MOAI_EINTR,
                            "interrupted by a signal to another MPI rank: checkpoint saved in "
                            "'%s' after step %lld",
                            dir, step);
    return moai_err_set(err, MOAI_EINTR,
                        "interrupted by %s: checkpoint saved in '%s' after step %lld",
                        signal_name(sig), dir, step);
}

/* Device d's shard of the layout, its communicators and its buffers. Collective: every device
 * learns whether any failed, so none waits forever at a collective. *stop is then set on every
 * device (the return is 0 on a device of the failing one's process, which reports it); the
 * caller frees what was set up. */
static int device_prepare(struct device *dv, struct dev *d, struct run *run, bool *stop)
{
    int rc;

    memset(dv, 0, sizeof(*dv));
    dv->run = run;
    dv->dev = d;
    comm_world_all(run->world, d->id, &dv->world);
    *stop = true;
    rc = shard_init(&dv->sh, run->job->cfg, run->plan, run->T, run->nthreads, d->id, &d->err);
    dv->sh_ready = rc == 0;
    /* before the groups are split, every device learns whether each has its layout */
    if (any_device(dv, rc < 0))
        return rc < 0 ? run_fail(run, MOAI_ENOMEM,
                                 "device %d: out of memory laying out its part of the model", d->id)
                      : MOAI_EIO;
    if ((rc = device_comms(dv)) < 0) /* on every device alike */
        return run_fail(run, rc, "%s", d->err.msg);
    rc = device_alloc(dv);
    dv->rows = malloc((size_t) run->job->recipe->training.batch_size * sizeof(*dv->rows));
    if (rc == 0 && !dv->rows)
        rc = moai_err_set(&d->err, MOAI_ENOMEM, "out of memory");
    if (rc < 0)
        __atomic_store_n(&run->local_failed, 1, __ATOMIC_SEQ_CST); /* read after the collective */
    if (comm_allreduce_scalar(&dv->world, rc < 0 ? 1.0 : 0.0) > 0)
        return alloc_failed_elsewhere(dv);
    *stop = false;
    return 0;
}

/* Whether the run stops before this step: a signal to any process, or device 0's failed
 * report, stops every device (collective). */
static bool stop_requested(struct device *dv)
{
    struct run *run = dv->run;
    int id = dv->dev->id;
    bool here =
        id == run->world->first_dev && (exec_stop_requested || (id == 0 && run->report_errno));
    return any_device(dv, here);
}

/* Where step (from 1) falls: its epoch and index (job->step_at, or epochs of steps_per_epoch);
 * returns whether it ends its epoch. */
static bool step_place(const struct train_job *job, int64_t step, int64_t *epoch, int64_t *index)
{
    if (job->step_at)
        return job->step_at(job->batch_arg, step - 1, epoch, index);
    *epoch = (step - 1) / job->steps_per_epoch;
    *index = (step - 1) % job->steps_per_epoch;
    return *index == job->steps_per_epoch - 1;
}

/* One optimizer step on every device: the step's rows, the pipeline over its micro-batches,
 * the loss of the global batch, the update. Fills *sr (device 0 reports it) and *broken (any
 * device's weights not finite after the update: > 0). Every device sees the same outcome. */
static int train_step(struct device *dv, int64_t step, struct step_record *sr, double *broken)
{
    struct run *run = dv->run;
    const struct train_job *job = run->job;
    const struct recipe *r = job->recipe;
    struct dev *d = dv->dev;
    int64_t batch = r->training.batch_size;

    double t0 = progress_now();
    int64_t epoch, index;
    step_place(job, step, &epoch, &index);
    job->batch_rows(job->batch_arg, epoch, index, dv->rows);
    int64_t ntargets = count_targets(&job->train, dv->rows, batch);
    if (ntargets == 0) { /* every device has the same rows: all stop alike, before work */
        moai_err_set(&d->err, MOAI_EUSAGE,
                     "step %lld has no token counted in the loss: every label of its %lld "
                     "sequences is masked (training.block_size %lld cuts them before "
                     "dataset.response_start's response)",
                     (long long) step, (long long) batch, (long long) run->T);
        moai_err_hint(&d->err, "raise training.block_size, or drop the examples whose "
                               "prompt fills the block");
        return MOAI_EUSAGE;
    }
    float dloss = 1.0f / (float) ntargets;

    if (run->lora) {
        optim_zero(dv->m.pool, dv->ld.g.arena, dv->ld.g.nfloats);
        dv->ld.state.stream = (uint64_t) step; /* the step's dropout masks */
        dv->ld.state.train = true;
    } else if (!run->zero2) {
        optim_zero(dv->m.pool, dv->grads, dv->sh.floats);
    } else {
        optim_zero(dv->m.pool, dv->gshard, dv->sh.shard_floats);
    }
    double loss_sum = step_pipeline(dv, dv->rows, dloss);
    bool counts = dv->sh.has_head && dv->sh.tp_rank == 0;
    double loss = comm_allreduce_scalar(&dv->world, counts ? loss_sum : 0.0) / (double) ntargets;
    if (!isfinite(loss)) /* every device sees the same loss and stops alike */
        return moai_err_set(&d->err, MOAI_EIO, "the loss is not finite (%g) at step %lld", loss,
                            (long long) step);
    enum optim_schedule sched = (enum optim_schedule) r->training.lr_schedule;
    double lr = r->training.lr *
                optim_lr_factor(sched, step - 1, r->training.warmup_steps, job->total_steps);
    double norm = optimizer_step(dv, step, lr);
    /* a broken state is never saved nor trained on, nor one a failed collective left: every
     * device learns of either (a failure counts 1e6, a broken device 1) */
    *broken = comm_allreduce_scalar(&dv->world, (params_finite(dv) ? 0.0 : 1.0) +
                                                    (dv->comm_rc < 0 ? 1e6 : 0.0));
    if (*broken >= 1e6)
        return dv->comm_rc < 0
                   ? run_fail(run, dv->comm_rc, "a collective failed (out of memory) at step %lld",
                              (long long) step)
                   : MOAI_EIO;
    comm_barrier(&dv->world);
    double dt = progress_now() - t0;

    int64_t real = 0, examples = 0; /* the tokens that are not padding, the examples */
    for (int64_t i = 0; i < batch; i++) {
        real += job->train.lengths[dv->rows[i]];
        examples += job->train.examples ? job->train.examples[dv->rows[i]] : 1;
    }
    *sr = (struct step_record){.step = step,
                               .total_steps = job->total_steps,
                               .loss = loss,
                               .duration_s = dt,
                               .tokens_per_s = (double) (batch * r->training.block_size) / dt,
                               .real_tokens_per_s = (double) real / dt,
                               .lr = lr,
                               .grad_norm = norm,
                               .rows = batch,
                               .examples = examples,
                               .real_tokens = real,
                               .packed = job->train.positions != NULL};
    return 0;
}

/* Device 0's record of a step: its time and loss, its report every log_interval steps and the
 * first and the last (so a run shows where its loss started and ended), the step bar. */
static void record_step(struct run *run, const struct step_record *sr, struct progress *bar)
{
    const struct train_job *job = run->job;
    int64_t step = sr->step;

    run->durations[run->ndurations++] = sr->duration_s;
    run->res->last_loss = sr->loss;
    if (job->step_losses)
        job->step_losses[step - 1] = sr->loss;
    if (step % job->recipe->training.log_interval == 0 || step == job->start_step + 1 ||
        step == job->total_steps)
        report(run, &(struct train_event){.kind = TRAIN_STEP, .step = *sr});
    if (bar) {
        char text[64];
        if (sr->packed)
            progress_postfix(bar, ", loss %s, lr %.2e, %lld examples",
                             steplog_format_loss(text, sizeof(text), sr->loss), sr->lr,
                             (long long) sr->examples);
        else
            progress_postfix(bar, ", loss %s, lr %.2e",
                             steplog_format_loss(text, sizeof(text), sr->loss), sr->lr);
        progress_update(bar, step);
    }
}

/* A non-finite gradient norm, or weights a step broke (broken > 0), stop the run unsaved. */
static int check_update(struct device *dv, const struct step_record *sr, double broken)
{
    struct moai_err *err = &dv->dev->err;
    if (isfinite(sr->grad_norm) && broken == 0)
        return 0;
    if (!isfinite(sr->grad_norm))
        moai_err_set(err, MOAI_EIO,
                     "the gradient norm is not finite (%g) at step %lld: stopped without saving it",
                     sr->grad_norm, (long long) sr->step);
    else
        moai_err_set(err, MOAI_EIO,
                     "a weight is not finite after the update of step %lld (gradient norm %g): "
                     "stopped without saving it",
                     (long long) sr->step, sr->grad_norm);
    moai_err_hint(err, "lower training.lr or training.weight_decay, or set training.grad_clip");
    return MOAI_EIO;
}

/* After a step: the evaluations due (every eval_interval steps and at each epoch's end; the last
 * step's comes with the final save), then the interval's checkpoint, after them so that its
 * history holds them. */
static int after_step(struct device *dv, int64_t step)
{
    const struct train_job *job = dv->run->job;
    const struct recipe *r = job->recipe;
    double vl;
    int rc;

    if (step == job->total_steps)
        return 0;
    bool eval_due =
        r->training.eval_interval != RECIPE_NONE && step % r->training.eval_interval == 0;
    int64_t epoch, index;
    if ((eval_due || step_place(job, step, &epoch, &index)) && job->valid.n > 0 &&
        (rc = evaluate(dv, step, &vl)) < 0)
        return rc;
    if (r->training.save_interval != RECIPE_NONE && step % r->training.save_interval == 0)
        return save_checkpoint(dv, step);
    return 0;
}

/* The steps from job->start_step on; *done counts the optimizer steps done. A stop request
 * saves the state after the last step done and returns MOAI_EINTR. */
static int train_steps(struct device *dv, int64_t *done)
{
    struct run *run = dv->run;
    const struct train_job *job = run->job;
    struct dev *d = dv->dev;
    struct progress bar; /* device 0 draws the step bar on a terminal (a plain line otherwise) */
    bool show_bar = d->id == 0 && !job->quiet;
    int rc = 0;

    if (show_bar) {
        progress_init(&bar, "Training", job->total_steps, "steps");
        progress_start_at(&bar, job->start_step);
        progress_update(&bar, job->start_step); /* drawn while the first step runs */
    }
    for (int64_t step = job->start_step + 1; step <= job->total_steps; step++) {
        struct step_record sr;
        double broken = 0;
        if (stop_requested(dv)) {
            rc = save_checkpoint(dv, step - 1);
            rc = rc < 0 ? rc : MOAI_EINTR;
            break;
        }
        if ((rc = train_step(dv, step, &sr, &broken)) < 0)
            break;
        if (d->id == 0)
            record_step(run, &sr, show_bar ? &bar : NULL);
        if ((rc = check_update(dv, &sr, broken)) < 0)
            break;
        *done = step;
        if (d->id == run->world->first_dev)
            run->res->steps_done = step;
        if ((rc = after_step(dv, step)) < 0)
            break;
    }
    if (show_bar)
        progress_finish(&bar);
    return rc;
}

/* The end of a run that trained (rc 0): the final evaluation and checkpoint; the error of one
 * stopped early. */
static int device_finish(struct device *dv, int64_t done, int rc)
{
    struct run *run = dv->run;
    struct dev *d = dv->dev;
    double vl;

    if (rc == 0 && run->job->valid.n > 0) {
        rc = evaluate(dv, done, &vl);
        if (rc == 0 && d->id == 0)
            run->res->valid_loss = vl;
    }
    if (rc == 0)
        rc = save_checkpoint(dv, done);
    if (rc == MOAI_EINTR && d->id == run->world->first_dev)
        rc = interrupted(run, &d->err);
    if (rc < 0 && rc != MOAI_EINTR && rc == run->save_rc && d->id == 0)
        d->err = run->save_err;
    return rc;
}

/* Device 0 learns every device's peak memory, other processes' devices too (collective). */
static void gather_peaks(struct device *dv)
{
    struct run *run = dv->run;
    struct dev *d = dv->dev;
    for (int i = 0; i < run->ndev; i++) {
        double peak = comm_allreduce_scalar(&dv->world, i == d->id ? (double) d->peak_bytes : 0.0);
        if (d->id == 0 && run->job->peak_bytes)
            run->job->peak_bytes[i] = (int64_t) peak;
    }
}

/* One device's thread: set up, load, train, finish. */
static int device_run(struct dev *d, void *arg)
{
    struct run *run = arg;
    struct device dv;
    int64_t done = run->job->start_step; /* this device's count of optimizer steps done */

    bool stop;
    int rc = device_prepare(&dv, d, run, &stop);
    if (stop) {
        device_free(&dv);
        return rc;
    }
    rc = device_load(&dv);
    if (any_device(&dv, rc < 0))
        rc = rc < 0 ? run_fail(run, rc, "device %d: out of memory loading the weights", d->id)
                    : MOAI_EIO;
    if (rc == 0)
        rc = train_steps(&dv, &done);
    rc = device_finish(&dv, done, rc);
    gather_peaks(&dv);
    device_free(&dv);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

/* LoRA: the adapters' configuration, and on the process of device 0 the whole model's
 * adapters and moments it gathers for a save. */
static int run_lora_init(struct run *run, bool gathers, struct moai_err *err)
{
    const struct recipe *r = run->job->recipe;
    int rc = 0;
    run->lc = (struct lora_config){r->lora.rank, r->lora.alpha, r->lora.dropout, r->lora.targets,
                                   r->training.seed};
    run->base16 = shard_lora_base16(&run->job->layout, r);
    for (int k = 0; gathers && rc == 0 && k < 3; k++)
        rc = lora_params_init(&run->host_a[k], run->job->cfg, run->lc.rank, run->lc.targets, 0,
                              NULL, err);
    return rc;
}

/* The median of device 0's step times, the first (warm-up) excepted when there are more. */
static double median_step(struct run *run)
{
    int64_t skip = run->ndurations > 1 ? 1 : 0, n = run->ndurations - skip;
    double *d = run->durations + skip;
    qsort(d, (size_t) n, sizeof(double), cmp_double);
    return n % 2 ? d[n / 2] : 0.5 * (d[n / 2 - 1] + d[n / 2]);
}

/* The run's figures once its devices are done (rc: how it ended): every device's peak (this
 * process's, when device 0 is another's), the device that ran out of memory, the median step. */
static void fill_result(struct train_result *res, struct run *run, const struct dev_set *ds,
                        int first, int rc)
{
    const struct train_job *job = run->job;
    const struct recipe *r = job->recipe;

    res->ndev = run->ndev;
    res->capacity_bytes = r->flavor.device.memory_bytes;
    for (int i = 0; i < ds->n && first > 0 && job->peak_bytes; i++)
        job->peak_bytes[first + i] = ds->devs[i].peak_bytes;
    res->peak_bytes = job->peak_bytes;
    res->interrupted = rc == MOAI_EINTR;
    for (int i = 0; rc == MOAI_EOOM && i < ds->n && !res->oom_requested_bytes; i++)
        if (ds->devs[i].oom_requested_bytes) {
            res->oom_device = first + i;
            res->oom_requested_bytes = ds->devs[i].oom_requested_bytes;
            break;
        }
    if (run->ndurations > 0) {
        res->median_step_s = median_step(run);
        res->median_tokens_per_s =
            (double) (r->training.batch_size * r->training.block_size) / res->median_step_s;
    }
}

int exec_train(const struct train_job *job, struct train_result *res, struct moai_err *err)
{
    const struct layout *plan = &job->layout;
    const struct recipe *r = job->recipe;
    struct run run;
    struct dev_set ds;
    int64_t P = model_param_count(job->cfg);
    int ndev = plan->dp * plan->pp * plan->tp, rc;

    memset(res, 0, sizeof(*res));
    res->valid_loss = NAN;
    memset(&run, 0, sizeof(run));
    run.job = job;
    run.plan = plan;
    run.ndev = ndev;
    run.zero2 = plan->distribute_param || plan->distribute_low_prec_param;
    run.zero3 = plan->distribute_low_prec_param;
    run.lora = job->lora_init != NULL;
    run.B = plan->batch_per_device;
    run.T = r->training.block_size;
    run.res = res;
    run.nthreads = shard_cpu_threads(ndev); /* as the planner sized the workspace */
    run.world = job->world;
    int first = run.world ? run.world->first_dev : 0;
    int nlocal = run.world ? run.world->nlocal : ndev;
    if (run.lora && (rc = run_lora_init(&run, first == 0, err)) < 0)
        goto out;
    if (first == 0 && !run.lora) { /* device 0 gathers the checkpoints */
        run.host_params = malloc((size_t) fbytes(P));
        run.host_m = malloc((size_t) fbytes(P));
        run.host_v = malloc((size_t) fbytes(P));
        if (!run.host_params || !run.host_m || !run.host_v) {
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory for the host copy of the weights");
            goto out;
        }
    }
    run.durations = malloc((size_t) (job->total_steps + 1) * sizeof(double));
    if (!run.durations) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        goto out;
    }
    if (!run.world && (rc = comm_world_create(&run.world, ndev, err)) < 0)
        goto out;
    if ((rc = dev_set_init(&ds, nlocal, r->flavor.device.memory_bytes, err)) < 0)
        goto out_world;
    for (int i = 0; i < nlocal; i++)
        ds.devs[i].id = first + i;
    res->steps_done = job->start_step;
    rc = dev_set_run(&ds, device_run, &run, err);
    if (rc < 0 && rc != MOAI_EINTR && atomic_load(&run.failed)) {
        *err = run.fail_err; /* the device whose own failure stopped the run */
        rc = err->code;
    }
    fill_result(res, &run, &ds, first, rc);
    dev_set_release(&ds);
out_world:
    if (!job->world)
        comm_world_free(run.world);
out:
    free(run.host_params);
    free(run.host_m);
    free(run.host_v);
    for (int k = 0; k < 3; k++)
        lora_params_release(&run.host_a[k]);
    free(run.durations);
    return rc;
}
