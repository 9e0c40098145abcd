/* lora.c - LoRA adapters: arena, PEFT init, names, forward and backward (see lora.h). */
#include "model/lora.h"

#include "model/llama.h"
#include "model/optim.h"
#include "model/pool.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ALIGN 64
#define ROWS  64 /* rows of a dropout task */

/* The random streams: A's init and the dropout masks (optim_rng's stream argument). */
#define STREAM_INIT    (1ull << 62)
#define STREAM_DROPOUT (1ull << 61)

static int64_t target_rows(const struct model_config *c, int t)
{
    return model_dim(c, model_layer_tensors[model_lora_targets[t].layer].rows);
}

static int64_t target_cols(const struct model_config *c, int t)
{
    return model_dim(c, model_layer_tensors[model_lora_targets[t].layer].cols);
}

/* A row-parallel target's input is split over the tensor-parallel group (its base tensor's
 * columns are query heads or the MLP width); a column-parallel one's is whole. */
static bool target_row_parallel(int t)
{
    return model_layer_tensors[model_lora_targets[t].layer].cols != MODEL_DIM_D;
}

int64_t lora_param_floats(const struct model_config *cfg, int64_t rank, unsigned targets)
{
    return cfg->num_hidden_layers * model_lora_layer_param_count(cfg, rank, targets);
}

void lora_layer_bind(struct lora_layer *l, float *base, const struct model_config *cfg,
                     int64_t rank, unsigned targets, int64_t index)
{
    memset(l, 0, sizeof(*l));
    l->index = index;
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
        if (!(targets & (1u << t)))
            continue;
        l->lora_A[t] = base;
        base += rank * target_cols(cfg, t);
        l->lora_B[t] = base;
        base += target_rows(cfg, t) * rank;
    }
}

int lora_params_init(struct lora_params *p, const struct model_config *cfg, int64_t rank,
                     unsigned targets, int64_t first_layer, float *arena, struct moai_err *err)
{
    int64_t L = cfg->num_hidden_layers, per = model_lora_layer_param_count(cfg, rank, targets);

    memset(p, 0, sizeof(*p));
    p->nfloats = lora_param_floats(cfg, rank, targets);
    p->layers = calloc((size_t) (L > 0 ? L : 1), sizeof(*p->layers));
    if (!p->layers)
        return moai_err_set(err, MOAI_ENOMEM, "cannot allocate the adapter table of %lld layers",
                            (long long) L);
    if (!arena) {
        size_t bytes = (size_t) p->nfloats * sizeof(float);
        if (posix_memalign((void **) &arena, ALIGN, bytes ? bytes : ALIGN)) {
            free(p->layers);
            p->layers = NULL;
            return moai_err_set(err, MOAI_ENOMEM, "cannot allocate %zu bytes of adapters", bytes);
        }
        memset(arena, 0, bytes);
        p->owned = true;
    }
    p->arena = arena;
    p->nlayers = L;
    for (int64_t l = 0; l < L; l++)
        lora_layer_bind(&p->layers[l], arena + l * per, cfg, rank, targets, first_layer + l);
    return 0;
}

void lora_params_release(struct lora_params *p)
{
    if (p->owned)
        free(p->arena);
    free(p->layers);
    memset(p, 0, sizeof(*p));
}

void lora_init_peft(struct lora_params *p, const struct model_config *cfg,
                    const struct model_config *full, int tp_rank, int64_t rank, unsigned targets,
                    uint64_t seed)
{
    for (int64_t l = 0; l < p->nlayers; l++) {
        const struct lora_layer *a = &p->layers[l];
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
            if (!(targets & (1u << t)))
                continue;
            /* kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain sqrt(3 / in) */
            int64_t in = target_cols(cfg, t), in_full = target_cols(full, t);
            int64_t c0 = target_row_parallel(t) ? (int64_t) tp_rank * in : 0;
            double bound = 1.0 / sqrt((double) in_full);
            uint64_t stream =
                STREAM_INIT + (uint64_t) a->index * MODEL_LORA_NTARGETS + (uint64_t) t;
            for (int64_t i = 0; i < rank; i++)
                for (int64_t j = 0; j < in; j++) {
                    uint64_t r = optim_rng(seed, stream, (uint64_t) (i * in_full + c0 + j));
                    double u = (double) (r >> 11) * 0x1p-53;
                    a->lora_A[t][i * in + j] = (float) ((2.0 * u - 1.0) * bound);
                }
            memset(a->lora_B[t], 0, sizeof(float) * (size_t) (target_rows(cfg, t) * rank));
        }
    }
}

int64_t lora_tensor_count(const struct model_config *cfg, unsigned targets)
{
    return cfg->num_hidden_layers * 2 * __builtin_popcount(targets);
}

void lora_tensor_at(struct llama_tensor *t, const struct lora_params *p,
                    const struct model_config *cfg, int64_t rank, unsigned targets, int64_t index)
{
    int per = 2 * __builtin_popcount(targets), k = (int) (index % per), tg = 0;
    int64_t l = index / per;

    for (int seen = -1; tg < MODEL_LORA_NTARGETS; tg++)
        if ((targets & (1u << tg)) && ++seen == k / 2)
            break;
    MOAI_ASSERT(tg < MODEL_LORA_NTARGETS);
    const char *base = model_layer_tensors[model_lora_targets[tg].layer].name;
    int stem = (int) (strlen(base) - strlen(".weight"));
    bool is_b = k % 2;
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "base_model.model.model.layers.%lld.%.*s.lora_%c.weight",
             (long long) (p ? p->layers[l].index : l), stem, base, is_b ? 'B' : 'A');
    t->ndim = 2;
    t->shape[0] = is_b ? target_rows(cfg, tg) : rank;
    t->shape[1] = is_b ? rank : target_cols(cfg, tg);
    t->numel = t->shape[0] * t->shape[1];
    t->kind = MODEL_TENSOR_LINEAR;
    t->layer = l;
    if (p)
        t->data = is_b ? p->layers[l].lora_B[tg] : p->layers[l].lora_A[tg];
}

/* The widest input among the targets. */
static int64_t widest_input(const struct model_config *cfg, unsigned targets)
{
    int64_t w = 0;
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++)
        if ((targets & (1u << t)) && target_cols(cfg, t) > w)
            w = target_cols(cfg, t);
    return w;
}

size_t lora_work_bytes(const struct model_config *cfg, const struct lora_config *lc, int64_t B,
                       int64_t T)
{
    int64_t N = B * T, floats = 2 * N * lc->rank;
    if (lc->dropout > 0)
        floats += N * widest_input(cfg, lc->targets);
    return (size_t) floats * sizeof(float);
}

int lora_init(struct lora *s, const struct model_config *cfg, const struct lora_config *lc,
              int64_t B, int64_t T, struct moai_err *err)
{
    memset(s, 0, sizeof(*s));
    s->cfg = *lc;
    s->scale = (float) (lc->alpha / (double) lc->rank);
    s->N = B * T;
    s->bytes = lora_work_bytes(cfg, lc, B, T);
    if (posix_memalign(&s->arena, ALIGN, s->bytes ? s->bytes : ALIGN))
        return moai_err_set(err, MOAI_ENOMEM, "cannot allocate %zu bytes of adapter scratch",
                            s->bytes);
    s->t = s->arena;
    s->dt = s->t + s->N * lc->rank;
    s->xd = lc->dropout > 0 ? s->dt + s->N * lc->rank : NULL;
    return 0;
}

void lora_release(struct lora *s)
{
    free(s->arena);
    memset(s, 0, sizeof(*s));
}

void lora_attach(struct llama *m, struct lora *s)
{
    m->lora = s;
}

void lora_merge(struct llama_params *p, const struct lora_params *a, const struct model_config *cfg,
                const struct lora_config *lc)
{
    float s = (float) (lc->alpha / (double) lc->rank);
    for (int64_t l = 0; l < a->nlayers; l++) {
        struct llama_layer *w = &p->layers[l];
        float *base[MODEL_LAYER_NTENSORS] = {
#define LORA_LAYER_FIELD(f, name, kind, rows, cols) w->f,
            MODEL_LAYER_TENSORS(LORA_LAYER_FIELD)
#undef LORA_LAYER_FIELD
        };
        for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
            if (!(lc->targets & (1u << t)))
                continue;
            int64_t out = target_rows(cfg, t), in = target_cols(cfg, t);
            /* W (out, in) += s B (out, r) A (r, in) */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) out, (int) in,
                        (int) lc->rank, s, a->layers[l].lora_B[t], (int) lc->rank,
                        a->layers[l].lora_A[t], (int) in, 1.0f, base[model_lora_targets[t].layer],
                        (int) in);
        }
    }
}

/* ---- dropout -------------------------------------------------------------------------- */

struct drop_job {
    float *out;
    const float *in;
    int64_t N, C, C_full, c0, n0;
    uint64_t seed, stream;
    float p, keep_scale;
};

static void drop_task(void *arg, int64_t task, int thread)
{
    const struct drop_job *j = arg;
    int64_t n1 = (task + 1) * ROWS < j->N ? (task + 1) * ROWS : j->N;
    (void) thread;
    for (int64_t n = task * ROWS; n < n1; n++)
        for (int64_t c = 0; c < j->C; c++) {
            uint64_t at = (uint64_t) ((j->n0 + n) * j->C_full + j->c0 + c);
            float u = (float) (optim_rng(j->seed, j->stream, at) >> 40) * 0x1p-24f;
            j->out[n * j->C + c] = u >= j->p ? j->in[n * j->C + c] * j->keep_scale : 0.0f;
        }
}

/* out (N, C) = the dropout mask of target t of layer a applied to in (N, C; may be out). The
 * mask is a function of the seed, the step's stream, the layer, the target and the element's
 * place among the step's tokens (first_token + n) and the whole input's columns, so backward
 * and a recomputed forward draw it again and every layout draws the single device's. */
static void apply_mask(struct llama *m, const struct lora_layer *a, float *out, const float *in,
                       int t, int64_t N)
{
    const struct lora *s = m->lora;
    int64_t C = target_cols(&m->cfg, t);
    bool split = target_row_parallel(t) && m->tp.size > 1;
    struct drop_job j = {.out = out,
                         .in = in,
                         .N = N,
                         .C = C,
                         .C_full = split ? C * m->tp.size : C,
                         .c0 = split ? C * m->tp.rank : 0,
                         .n0 = s->first_token,
                         .seed = s->cfg.seed ^ (s->stream * 0x9E3779B97F4A7C15ull),
                         .stream = STREAM_DROPOUT + (uint64_t) a->index * MODEL_LORA_NTARGETS +
                                   (uint64_t) t,
                         .p = (float) s->cfg.dropout,
                         .keep_scale = (float) (1.0 / (1.0 - s->cfg.dropout))};
    pool_run(m->pool, (N + ROWS - 1) / ROWS, drop_task, &j);
}

/* dropout(inp) of target t of layer a: inp itself without dropout (or outside training),
 * else the scratch holding it. */
static const float *dropped(struct llama *m, const struct lora_layer *a, const float *inp, int t,
                            int64_t N)
{
    struct lora *s = m->lora;
    if (!s->train || s->cfg.dropout <= 0)
        return inp;
    MOAI_ASSERT(s->xd && N <= s->N);
    apply_mask(m, a, s->xd, inp, t, N);
    return s->xd;
}

/* dinp += the mask of target t times src (N, C): dropout's backward, in place on src. */
static void add_dropped_grad(struct llama *m, const struct lora_layer *a, float *dinp, float *src,
                             int t, int64_t N)
{
    const struct lora *s = m->lora;
    int64_t C = target_cols(&m->cfg, t);
    if (s->train && s->cfg.dropout > 0)
        apply_mask(m, a, src, src, t, N);
    for (int64_t i = 0; i < N * C; i++)
        dinp[i] += src[i];
}

/* ---- forward and backward ------------------------------------------------------------- */

/* The column where target t's output starts among the fused targets from t0. */
static int64_t col_offset(const struct model_config *c, int t0, int t)
{
    int64_t off = 0;
    for (int u = t0; u < t; u++)
        off += target_rows(c, u);
    return off;
}

void lora_forward_col(struct llama *m, const struct lora_layer *a, float *out, int64_t ldo,
                      const float *inp, int t0, int t1, int64_t N)
{
    struct lora *s = m->lora;
    int64_t r = s ? s->cfg.rank : 0;
    if (!s || !a)
        return;
    for (int t = t0; t < t1; t++) {
        if (!a->lora_A[t])
            continue;
        int64_t in = target_cols(&m->cfg, t), outc = target_rows(&m->cfg, t);
        const float *x = dropped(m, a, inp, t, N);
        /* t = x A^T (N, r); out[:, off:off+outc] += s t B^T */
        llama_gemm(m, false, true, N, r, in, 1.0f, x, in, a->lora_A[t], in, 0.0f, s->t, r);
        llama_gemm(m, false, true, N, outc, r, s->scale, s->t, r, a->lora_B[t], r, 1.0f,
                   out + col_offset(&m->cfg, t0, t), ldo);
    }
}

/* t = dropout(inp) A^T (N, r), summed over the group for a row-parallel target. */
static void adapter_in(struct llama *m, const struct lora_layer *a, const float *x, int t,
                       int64_t N)
{
    struct lora *s = m->lora;
    int64_t r = s->cfg.rank, in = target_cols(&m->cfg, t);
    llama_gemm(m, false, true, N, r, in, 1.0f, x, in, a->lora_A[t], in, 0.0f, s->t, r);
    if (target_row_parallel(t))
        llama_tp_sum(m, s->t, N * r);
}

void lora_forward_row(struct llama *m, const struct lora_layer *a, float *out, const float *inp,
                      int t, int64_t N)
{
    struct lora *s = m->lora;
    if (!s || !a || !a->lora_A[t])
        return;
    int64_t r = s->cfg.rank, outc = target_rows(&m->cfg, t);
    adapter_in(m, a, dropped(m, a, inp, t, N), t, N);
    llama_gemm(m, false, true, N, outc, r, s->scale, s->t, r, a->lora_B[t], r, 1.0f, out, outc);
}

/* The gradients of one target from its output's gradient dout (N, outc) with row stride ldo
 * and its input x (dropout applied): gB += s dout^T t, dt = s dout B (summed over the group
 * for a column-parallel target), gA += dt^T x. Leaves dt in the scratch. */
static void adapter_grads(struct llama *m, const struct lora_layer *a, struct lora_layer *ga,
                          const float *dout, int64_t ldo, const float *x, int t, int64_t N)
{
    struct lora *s = m->lora;
    int64_t r = s->cfg.rank, in = target_cols(&m->cfg, t), outc = target_rows(&m->cfg, t);
    adapter_in(m, a, x, t, N);
    llama_gemm(m, true, false, outc, r, N, s->scale, dout, ldo, s->t, r, 1.0f, ga->lora_B[t], r);
    llama_gemm(m, false, false, N, r, outc, s->scale, dout, ldo, a->lora_B[t], r, 0.0f, s->dt, r);
    if (!target_row_parallel(t))
        llama_tp_sum(m, s->dt, N * r);
    llama_gemm(m, true, false, r, in, N, 1.0f, s->dt, r, x, in, 1.0f, ga->lora_A[t], in);
}

void lora_backward_col(struct llama *m, const struct lora_layer *a, struct lora_layer *ga,
                       float *dinp, const float *dout, int64_t ldo, const float *inp, int t0,
                       int t1, int64_t N)
{
    struct lora *s = m->lora;
    if (!s || !a || !ga)
        return;
    for (int t = t0; t < t1; t++) {
        if (!a->lora_A[t])
            continue;
        int64_t r = s->cfg.rank, in = target_cols(&m->cfg, t);
        const float *x = dropped(m, a, inp, t, N);
        adapter_grads(m, a, ga, dout + col_offset(&m->cfg, t0, t), ldo, x, t, N);
        if (!s->xd || x == inp) {
            llama_gemm(m, false, false, N, in, r, 1.0f, s->dt, r, a->lora_A[t], in, 1.0f, dinp, in);
            continue;
        }
        /* dinp += mask (dt A): the product into the dropout scratch, masked, added */
        llama_gemm(m, false, false, N, in, r, 1.0f, s->dt, r, a->lora_A[t], in, 0.0f, s->xd, in);
        add_dropped_grad(m, a, dinp, s->xd, t, N);
    }
}

void lora_backward_row(struct llama *m, const struct lora_layer *a, struct lora_layer *ga,
                       float *dinp, const float *dout, const float *inp, int t, int64_t N)
{
    struct lora *s = m->lora;
    if (!s || !a || !ga || !a->lora_A[t])
        return;
    int64_t r = s->cfg.rank, in = target_cols(&m->cfg, t), outc = target_rows(&m->cfg, t);
    const float *x = dropped(m, a, inp, t, N);
    adapter_grads(m, a, ga, dout, outc, x, t, N);
    if (x == inp) {
        llama_gemm(m, false, false, N, in, r, 1.0f, s->dt, r, a->lora_A[t], in, 1.0f, dinp, in);
        return;
    }
    llama_gemm(m, false, false, N, in, r, 1.0f, s->dt, r, a->lora_A[t], in, 0.0f, s->xd, in);
    add_dropped_grad(m, a, dinp, s->xd, t, N);
}
