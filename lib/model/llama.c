/* llama.c - the Llama causal LM: buffers, tensor table, parallel forward and backward. */
#include "model/llama.h"

#include "log.h"
#include "model/bf16.h"
#include "model/kernels.h"
#include "model/lora.h"
#include "model/tensors.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Rows per task of the row-wise kernels; also the row chunks of the RMSNorm weight gradient
 * partial sums, so the reduction order depends on N only. */
#define ROWS 64
/* Alignment of every buffer cut from the activation and workspace arenas. */
#define ALIGN 64

static inline int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static inline int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* ---- arena layout --------------------------------------------------------------------- */

/* Cuts aligned pieces from base, or only counts them when base is NULL, so the size functions
 * and the binding share one walk and cannot disagree. */
struct bump {
    char *base;
    size_t off;
};

static void *bump(struct bump *b, size_t bytes)
{
    size_t o = (b->off + ALIGN - 1) / ALIGN * ALIGN;
    b->off = o + bytes;
    return b->base ? b->base + o : NULL;
}

static float *bumpf(struct bump *b, int64_t n)
{
    return bump(b, sizeof(float) * (size_t) n);
}

static size_t bump_total(const struct bump *b)
{
    return (b->off + ALIGN - 1) / ALIGN * ALIGN;
}

static int64_t qkv_cols(const struct model_config *c)
{
    return (c->num_attention_heads + 2 * c->num_key_value_heads) * c->head_dim;
}

/* One layer's kept activations: everything (keep all), all but the attention probabilities
 * (selective recomputation), or only the layer input (full recomputation); the pointers of
 * what is not kept stay NULL. */
static void layer_acts_layout(struct llama_layer_acts *la, struct bump *b,
                              const struct model_config *c, int64_t B, int64_t T,
                              enum llama_keep keep, bool with_x)
{
    int64_t N = B * T, D = c->hidden_size, F = c->intermediate_size;
    int64_t H = c->num_attention_heads, hd = c->head_dim;
    memset(la, 0, sizeof(*la));
    if (with_x)
        la->x = bumpf(b, N * D);
    if (keep == LLAMA_KEEP_INPUT)
        return;
    la->rstd1 = bumpf(b, N);
    la->ln1 = bumpf(b, N * D);
    la->qkv = bumpf(b, N * qkv_cols(c));
    if (keep == LLAMA_KEEP_ALL)
        la->probs = bumpf(b, B * H * T * T);
    la->atty = bumpf(b, N * H * hd);
    la->x2 = bumpf(b, N * D);
    la->rstd2 = bumpf(b, N);
    la->ln2 = bumpf(b, N * D);
    la->gu = bumpf(b, N * 2 * F);
    la->h = bumpf(b, N * F);
}

static void acts_layout(struct llama_acts *a, struct bump *b, const struct model_config *c,
                        const struct llama_shape *s)
{
    struct llama_layer_acts dummy;
    int64_t N = s->B * s->T, D = c->hidden_size;
    for (int64_t l = 0; l < s->nlayers; l++)
        layer_acts_layout(a->layers ? &a->layers[l] : &dummy, b, c, s->B, s->T, s->keep, true);
    a->xf = bumpf(b, N * D);
    if (s->head) {
        a->rstdf = bumpf(b, N);
        a->lnf = bumpf(b, N * D);
    }
}

static void work_layout(struct llama_work *w, struct bump *b, const struct model_config *c,
                        const struct llama_shape *s)
{
    int64_t B = s->B, T = s->T, N = B * T, D = c->hidden_size, F = c->intermediate_size;
    int64_t H = c->num_attention_heads, hd = c->head_dim, V = c->vocab_size;
    int nthreads = s->nthreads < 1 ? 1 : s->nthreads;
    w->rope_inv_freq = bumpf(b, hd / 2);
    w->rope_cos = bumpf(b, T * (hd / 2));
    w->rope_sin = bumpf(b, T * (hd / 2));
    w->targets = bump(b, sizeof(int32_t) * (size_t) N);
    w->scored = bump(b, sizeof(int32_t) * (size_t) N);
    w->scored_targets = bump(b, sizeof(int32_t) * (size_t) N);
    w->scored_index = bump(b, sizeof(int32_t) * (size_t) N);
    w->losses = bumpf(b, N);
    w->lse = bumpf(b, N);
    if (s->head) {
        w->logits = bumpf(b, N * V);
        w->lnc = bumpf(b, N * D);
        if (s->tp > 1)
            w->lse_all = bumpf(b, N * s->tp);
    }
    w->dres = bumpf(b, N * D);
    w->dln = bumpf(b, N * D);
    w->dqkv = bumpf(b, N * qkv_cols(c));
    w->datty = bumpf(b, N * H * hd);
    w->dgu = bumpf(b, N * 2 * F);
    w->dh = bumpf(b, N * F);
    w->scratch = bumpf(b, (int64_t) nthreads * T * T);
    w->dnorm_part = bumpf(b, cdiv(N, ROWS) * D);
    /* recomputation: one layer's probabilities, or one layer's activations and its output */
    memset(&w->re, 0, sizeof(w->re));
    w->re_probs = NULL;
    w->re_out = NULL;
    if (s->keep == LLAMA_KEEP_NO_PROBS && s->nlayers > 0)
        w->re_probs = bumpf(b, B * H * T * T);
    if (s->keep == LLAMA_KEEP_INPUT && s->nlayers > 0) {
        layer_acts_layout(&w->re, b, c, B, T, LLAMA_KEEP_ALL, false);
        w->re_out = bumpf(b, N * D);
    }
}

static struct llama_shape whole_shape(const struct model_config *cfg, int64_t B, int64_t T,
                                      int nthreads)
{
    return (struct llama_shape){.B = B,
                                .T = T,
                                .nlayers = cfg->num_hidden_layers,
                                .head = true,
                                .keep = LLAMA_KEEP_ALL,
                                .tp = 1,
                                .nthreads = nthreads};
}

int64_t llama_param_floats(const struct model_config *cfg)
{
    return model_param_count(cfg);
}

size_t llama_param_bytes(const struct model_config *cfg)
{
    return sizeof(float) * (size_t) llama_param_floats(cfg);
}

size_t llama_layer_act_bytes(const struct model_config *cfg, int64_t B, int64_t T)
{
    struct llama_layer_acts la;
    struct bump b = {NULL, 0};
    layer_acts_layout(&la, &b, cfg, B, T, LLAMA_KEEP_ALL, true);
    return bump_total(&b);
}

size_t llama_acts_bytes_shape(const struct model_config *cfg, const struct llama_shape *s)
{
    struct llama_acts a = {0};
    struct bump b = {NULL, 0};
    acts_layout(&a, &b, cfg, s);
    return bump_total(&b);
}

size_t llama_work_bytes_shape(const struct model_config *cfg, const struct llama_shape *s)
{
    struct llama_work w = {0};
    struct bump b = {NULL, 0};
    work_layout(&w, &b, cfg, s);
    return bump_total(&b);
}

size_t llama_act_bytes(const struct model_config *cfg, int64_t B, int64_t T)
{
    struct llama_shape s = whole_shape(cfg, B, T, 1);
    return llama_acts_bytes_shape(cfg, &s);
}

size_t llama_work_bytes(const struct model_config *cfg, int64_t B, int64_t T, int nthreads)
{
    struct llama_shape s = whole_shape(cfg, B, T, nthreads);
    return llama_work_bytes_shape(cfg, &s);
}

void llama_shard_config(struct model_config *out, const struct model_config *full, int tp)
{
    *out = *full;
    if (tp <= 1)
        return;
    out->num_attention_heads = full->num_attention_heads / tp;
    out->num_key_value_heads = full->num_key_value_heads >= tp ? full->num_key_value_heads / tp : 1;
    out->intermediate_size = full->intermediate_size / tp;
    out->vocab_size = (full->vocab_size + tp - 1) / tp;
}

/* Arenas of 2 MiB or more are aligned to 2 MiB and asked for transparent huge pages: the
 * strided reads of attention heads and GEMM packing then miss the TLB far less. */
#define HUGE_PAGE ((size_t) 2 << 20)

static void *arena_alloc(size_t bytes)
{
    void *p = NULL;
    if (posix_memalign(&p, bytes < HUGE_PAGE ? ALIGN : HUGE_PAGE, bytes ? bytes : ALIGN))
        return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= HUGE_PAGE)
        madvise(p, bytes, MADV_HUGEPAGE);
#endif
    return p;
}

/* ---- parameters ----------------------------------------------------------------------- */

void llama_layer_bind(struct llama_layer *l, float *base, const struct model_config *cfg)
{
    float **field[MODEL_LAYER_NTENSORS] = {
#define LLAMA_LAYER_ADDR(f, name, kind, rows, cols) &l->f,
        MODEL_LAYER_TENSORS(LLAMA_LAYER_ADDR)
#undef LLAMA_LAYER_ADDR
    };
    for (int k = 0; k < MODEL_LAYER_NTENSORS; k++) {
        *field[k] = base;
        base += model_layer_tensor_numel(cfg, k);
    }
}

int llama_params_init(struct llama_params *p, const struct model_config *cfg, float *arena,
                      struct moai_err *err)
{
    int64_t L = cfg->num_hidden_layers, D = cfg->hidden_size, V = cfg->vocab_size;
    size_t bytes = llama_param_bytes(cfg);

    memset(p, 0, sizeof(*p));
    p->layers = calloc((size_t) (L > 0 ? L : 1), sizeof(struct llama_layer));
    if (!p->layers)
        return moai_err_set(err, MOAI_ENOMEM, "cannot allocate the layer table of %lld layers",
                            (long long) L);
    if (!arena) {
        arena = arena_alloc(bytes);
        if (!arena) {
            free(p->layers);
            p->layers = NULL;
            return moai_err_set(err, MOAI_ENOMEM, "cannot allocate %zu bytes of parameters", bytes);
        }
        memset(arena, 0, bytes);
        p->owned = true;
    }
    p->arena = arena;
    p->nfloats = llama_param_floats(cfg);
    p->nlayers = L;

    float *q = arena;
    p->embed = q;
    q += V * D;
    for (int64_t l = 0; l < L; l++) {
        llama_layer_bind(&p->layers[l], q, cfg);
        q += model_layer_param_count(cfg);
    }
    p->norm = q;
    q += D;
    if (cfg->tie_word_embeddings) {
        p->lm_head = p->embed;
    } else {
        p->lm_head = q;
        q += V * D;
    }
    MOAI_ASSERT(q - arena == p->nfloats);
    return 0;
}

void llama_params_release(struct llama_params *p)
{
    if (p->owned)
        free(p->arena);
    free(p->layers);
    memset(p, 0, sizeof(*p));
}

int64_t llama_tensor_count(const struct model_config *cfg)
{
    return model_tensor_count(cfg);
}

void llama_tensor_at(struct llama_tensor *t, const struct llama_params *p,
                     const struct model_config *cfg, int64_t index)
{
    struct model_tensor mt;
    model_tensor_at(&mt, cfg, index);
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", mt.name);
    t->data = p ? p->arena + mt.offset : NULL;
    t->ndim = mt.ndim;
    t->shape[0] = mt.shape[0];
    t->shape[1] = mt.shape[1];
    t->numel = mt.numel;
    t->kind = mt.kind;
    t->layer = mt.layer;
}

/* ---- activations and workspace -------------------------------------------------------- */

int llama_acts_init(struct llama_acts *a, const struct model_config *cfg, int64_t B, int64_t T,
                    struct moai_err *err)
{
    return llama_acts_bind(a, cfg, B, T, NULL, err);
}

int llama_acts_bind(struct llama_acts *a, const struct model_config *cfg, int64_t B, int64_t T,
                    void *arena, struct moai_err *err)
{
    struct llama_shape s = whole_shape(cfg, B, T, 1);
    return llama_acts_bind_shape(a, cfg, &s, arena, err);
}

int llama_acts_bind_shape(struct llama_acts *a, const struct model_config *cfg,
                          const struct llama_shape *s, void *arena, struct moai_err *err)
{
    int64_t L = s->nlayers;
    memset(a, 0, sizeof(*a));
    a->B = s->B;
    a->T = s->T;
    a->nlayers = L;
    a->bytes = llama_acts_bytes_shape(cfg, s);
    a->layers = calloc((size_t) (L > 0 ? L : 1), sizeof(struct llama_layer_acts));
    if (!arena) {
        arena = arena_alloc(a->bytes);
        a->owned = true;
    }
    a->arena = arena;
    if (!a->layers || !a->arena) {
        size_t bytes = a->bytes;
        llama_acts_release(a);
        return moai_err_set(err, MOAI_ENOMEM,
                            "cannot allocate %zu bytes of activations for %lld x %lld tokens",
                            bytes, (long long) s->B, (long long) s->T);
    }
    struct bump b = {a->arena, 0};
    acts_layout(a, &b, cfg, s);
    MOAI_ASSERT(bump_total(&b) == a->bytes);
    return 0;
}

void llama_acts_release(struct llama_acts *a)
{
    free(a->layers);
    if (a->owned)
        free(a->arena);
    memset(a, 0, sizeof(*a));
}

int llama_work_init(struct llama_work *w, const struct model_config *cfg, int64_t B, int64_t T,
                    int nthreads, struct moai_err *err)
{
    return llama_work_bind(w, cfg, B, T, nthreads, NULL, err);
}

int llama_work_bind(struct llama_work *w, const struct model_config *cfg, int64_t B, int64_t T,
                    int nthreads, void *arena, struct moai_err *err)
{
    struct llama_shape s = whole_shape(cfg, B, T, nthreads);
    return llama_work_bind_shape(w, cfg, &s, arena, err);
}

int llama_work_bind_shape(struct llama_work *w, const struct model_config *cfg,
                          const struct llama_shape *s, void *arena, struct moai_err *err)
{
    memset(w, 0, sizeof(*w));
    w->B = s->B;
    w->T = s->T;
    w->nthreads = s->nthreads < 1 ? 1 : s->nthreads;
    w->bytes = llama_work_bytes_shape(cfg, s);
    if (!arena) {
        arena = arena_alloc(w->bytes);
        if (!arena)
            return moai_err_set(err, MOAI_ENOMEM,
                                "cannot allocate %zu bytes of workspace for %lld x %lld tokens",
                                w->bytes, (long long) s->B, (long long) s->T);
        w->owned = true;
    }
    w->arena = arena;
    struct bump b = {w->arena, 0};
    work_layout(w, &b, cfg, s);
    MOAI_ASSERT(bump_total(&b) == w->bytes);
    rope_inv_freq(w->rope_inv_freq, cfg->head_dim, cfg->rope_theta, &cfg->rope_scaling);
    rope_tables(w->rope_cos, w->rope_sin, w->rope_inv_freq, s->T, cfg->head_dim);
    return 0;
}

void llama_work_release(struct llama_work *w)
{
    if (w->owned)
        free(w->arena);
    memset(w, 0, sizeof(*w));
}

/* ---- the model instance --------------------------------------------------------------- */

int llama_init(struct llama *m, const struct model_config *cfg, int nthreads, struct moai_err *err)
{
    memset(m, 0, sizeof(*m));
    const struct {
        const char *key;
        int64_t value;
    } dims[] = {
        {"hidden_size", cfg->hidden_size},
        {"intermediate_size", cfg->intermediate_size},
        {"num_attention_heads", cfg->num_attention_heads},
        {"num_key_value_heads", cfg->num_key_value_heads},
        {"head_dim", cfg->head_dim},
        {"vocab_size", cfg->vocab_size},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].value < 1 || dims[i].value > INT_MAX / 4)
            return moai_err_set(err, MOAI_EUSAGE, "model '%s': '%s' (%lld) is out of range",
                                cfg->name, dims[i].key, (long long) dims[i].value);
    if (cfg->num_hidden_layers < 0)
        return moai_err_set(err, MOAI_EUSAGE, "model '%s': 'num_hidden_layers' (%lld) is negative",
                            cfg->name, (long long) cfg->num_hidden_layers);
    if (cfg->num_attention_heads % cfg->num_key_value_heads)
        return moai_err_set(err, MOAI_EUSAGE,
                            "model '%s': 'num_key_value_heads' (%lld) does not divide "
                            "'num_attention_heads' (%lld)",
                            cfg->name, (long long) cfg->num_key_value_heads,
                            (long long) cfg->num_attention_heads);
    if (cfg->head_dim % 2)
        return moai_err_set(err, MOAI_EUSAGE, "model '%s': 'head_dim' (%lld) is odd", cfg->name,
                            (long long) cfg->head_dim);
    if (nthreads < 1)
        nthreads = 1;
    m->cfg = *cfg;
    m->nthreads = nthreads;
    if (nthreads > 1) {
        m->pool = pool_create(nthreads);
        if (!m->pool)
            return moai_err_set(err, MOAI_ENOMEM, "cannot start %d threads", nthreads);
    }
    openblas_set_num_threads(1);
    return 0;
}

void llama_release(struct llama *m)
{
    pool_free(m->pool);
    memset(m, 0, sizeof(*m));
}

static pthread_once_t bf16_note_once = PTHREAD_ONCE_INIT;

static void bf16_note(void)
{
    log_info("bf16: %s; matrix products run in fp32 (OpenBLAS sgemm).", bf16_unavailable_reason());
}

bool llama_set_bf16(struct llama *m, bool bf16)
{
    m->bf16 = bf16 && bf16_available();
    if (bf16 && !m->bf16)
        pthread_once(&bf16_note_once, bf16_note);
    return m->bf16;
}

/* ---- batches -------------------------------------------------------------------------- */

static int64_t seq_len(const struct llama_batch *b, int64_t i)
{
    return b->lengths ? b->lengths[i] : b->T;
}

/* Whether token t of sequence i starts an example of a packed row. */
static bool starts_example(const struct llama_batch *b, int64_t i, int64_t t)
{
    return b->positions && b->positions[i * b->T + t] == 0;
}

int llama_batch_check(const struct llama *m, const struct llama_batch *b, struct moai_err *err)
{
    int64_t V = m->cfg.vocab_size;
    for (int64_t i = 0; i < b->B; i++) {
        if (b->lengths && (b->lengths[i] < 0 || b->lengths[i] > b->T))
            return moai_err_set(err, MOAI_EIO,
                                "batch: sequence %lld: length %d is outside [0, %lld]",
                                (long long) i, b->lengths[i], (long long) b->T);
        for (int64_t t = 0; b->positions && t < b->T; t++) {
            int32_t pos = b->positions[i * b->T + t];
            bool real = t < seq_len(b, i);
            if (real ? pos != 0 && (t == 0 || pos != b->positions[i * b->T + t - 1] + 1)
                     : pos < 0 || pos >= b->T)
                return moai_err_set(err, MOAI_EIO,
                                    "batch: sequence %lld, position %lld: position id %d neither "
                                    "starts an example (0) nor follows the previous token's",
                                    (long long) i, (long long) t, pos);
        }
        for (int64_t t = 0; t < b->T; t++) {
            int32_t id = b->tokens[i * b->T + t];
            if (id < 0 || id >= V)
                return moai_err_set(err, MOAI_EIO,
                                    "batch: sequence %lld, position %lld: token id %d is outside "
                                    "the vocabulary [0, %lld)",
                                    (long long) i, (long long) t, id, (long long) V);
            if (!b->labels)
                continue;
            int32_t lab = b->labels[i * b->T + t];
            if (lab != KERN_IGNORE_INDEX && (lab < 0 || lab >= V))
                return moai_err_set(err, MOAI_EIO,
                                    "batch: sequence %lld, position %lld: label %d is neither -100 "
                                    "nor in the vocabulary [0, %lld)",
                                    (long long) i, (long long) t, lab, (long long) V);
        }
    }
    return 0;
}

int64_t llama_batch_targets(const struct llama_batch *b)
{
    int64_t n = 0;
    if (!b->labels)
        return 0;
    for (int64_t i = 0; i < b->B; i++)
        for (int64_t t = 1; t < b->T; t++)
            n += b->labels[i * b->T + t] != KERN_IGNORE_INDEX && !starts_example(b, i, t);
    return n;
}

/* ---- parallel matrix products --------------------------------------------------------- */

/* C (M, N) = alpha op(A) op(B) + beta C, row-major, split over the pool into one block of rows
 * or columns per thread (whichever dimension is longer). Each block is a single-threaded sgemm
 * over the full K, so every element sums its K products in the same order however the product
 * is split; or, under bf16 compute (llama_set_bf16), a bf16_gemm (bf16 operands, fp32 sums),
 * whose elements do not depend on the split at all. */
struct gemm_job {
    bool ta, tb, split_rows, bf16;
    int64_t M, N, K, lda, ldb, ldc, chunk;
    float alpha, beta;
    const float *A, *B;
    const uint16_t *A16; /* A already in bf16, instead of A (bf16 compute only) */
    float *C;
};

static void gemm_block(const struct gemm_job *j, int64_t i0, int64_t i1)
{
    const float *A = j->A, *B = j->B;
    const uint16_t *A16 = j->A16;
    float *C = j->C;
    int64_t M = j->M, N = j->N;
    if (j->split_rows) {
        if (A16)
            A16 += j->ta ? i0 : i0 * j->lda;
        else
            A += j->ta ? i0 : i0 * j->lda;
        C += i0 * j->ldc;
        M = i1 - i0;
    } else {
        B += j->tb ? i0 * j->ldb : i0;
        C += i0;
        N = i1 - i0;
    }
    if (A16) {
        bf16_gemm_a16(j->ta, j->tb, M, N, j->K, j->alpha, A16, j->lda, B, j->ldb, j->beta, C,
                      j->ldc);
        return;
    }
    if (j->bf16) {
        bf16_gemm(j->ta, j->tb, M, N, j->K, j->alpha, A, j->lda, B, j->ldb, j->beta, C, j->ldc);
        return;
    }
    cblas_sgemm(CblasRowMajor, j->ta ? CblasTrans : CblasNoTrans, j->tb ? CblasTrans : CblasNoTrans,
                (int) M, (int) N, (int) j->K, j->alpha, A, (int) j->lda, B, (int) j->ldb, j->beta,
                C, (int) j->ldc);
}

static void gemm_task(void *arg, int64_t task, int thread)
{
    const struct gemm_job *j = arg;
    int64_t n = j->split_rows ? j->M : j->N;
    int64_t i0 = task * j->chunk, i1 = min64(n, i0 + j->chunk);
    (void) thread;
    if (i0 < i1)
        gemm_block(j, i0, i1);
}

/* A product with A in fp32 (A16 NULL) or already in bf16 (A NULL; bf16 compute only). */
static void gemm_split(struct llama *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                       float alpha, const float *A, const uint16_t *A16, int64_t lda,
                       const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    struct gemm_job j = {.ta = ta,
                         .tb = tb,
                         .split_rows = M >= N,
                         .bf16 = m->bf16 || A16,
                         .M = M,
                         .N = N,
                         .K = K,
                         .lda = lda,
                         .ldb = ldb,
                         .ldc = ldc,
                         .alpha = alpha,
                         .beta = beta,
                         .A = A,
                         .B = B,
                         .A16 = A16,
                         .C = C};
    if (M == 0 || N == 0)
        return;
    int64_t n = j.split_rows ? M : N;
    j.chunk = cdiv(cdiv(n, m->nthreads), 16) * 16;
    pool_run(m->pool, cdiv(n, j.chunk), gemm_task, &j);
}

static void gemm(struct llama *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc)
{
    gemm_split(m, ta, tb, M, N, K, alpha, A, NULL, lda, B, ldb, beta, C, ldc);
}

/* gemm with A already in bf16 (lda in bf16 values): bf16 compute only. */
static void gemm_a16(struct llama *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                     float alpha, const uint16_t *A, int64_t lda, const float *B, int64_t ldb,
                     float beta, float *C, int64_t ldc)
{
    gemm_split(m, ta, tb, M, N, K, alpha, NULL, A, lda, B, ldb, beta, C, ldc);
}

/* out (N, OC) (+)= inp (N, C) . W (OC, C)^T */
static void linear_forward(struct llama *m, float *out, const float *inp, const float *W,
                           bool accumulate, int64_t N, int64_t C, int64_t OC)
{
    gemm(m, false, true, N, OC, C, 1.0f, inp, C, W, C, accumulate ? 1.0f : 0.0f, out, OC);
}

/* dinp (N, C) = dout (N, OC) . W (OC, C); dW (OC, C) += dout^T . inp */
static void linear_backward(struct llama *m, float *dinp, float *dW, const float *dout,
                            const float *inp, const float *W, int64_t N, int64_t C, int64_t OC)
{
    gemm(m, false, false, N, C, OC, 1.0f, dout, OC, W, C, 0.0f, dinp, C);
    if (dW) /* NULL: a frozen weight */
        gemm(m, true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dW, C);
}

/* ---- row-wise kernels over the pool --------------------------------------------------- */

enum row_op {
    ROW_EMBED,
    ROW_RMSNORM, /* and copy the input into a second buffer (the residual) */
    ROW_RMSNORM_BACK,
    ROW_SWIGLU,
    ROW_SWIGLU_BACK,
    ROW_CE_FUSED,
    ROW_CE_FUSED16, /* and each row's gradient rounded to bf16 in place (bf16_round_in_place) */
    ROW_CE_FORWARD,
    ROW_ZERO,
    ROW_GATHER,  /* out row i = in row ids[i] */
    ROW_SCATTER, /* out row n = in row ids[n], or zeros where ids[n] < 0 */
};

struct row_job {
    enum row_op op;
    int64_t N, D, V;
    float eps, dloss;
    float *out, *out2, *aux;
    const float *in, *in2, *w;
    const int32_t *ids;
};

static void row_task(void *arg, int64_t task, int thread)
{
    const struct row_job *j = arg;
    int64_t n0 = task * ROWS, n = min64(j->N, n0 + ROWS) - n0, D = j->D;
    (void) thread;
    switch (j->op) {
    case ROW_EMBED:
        embedding_forward(j->out + n0 * D, j->ids + n0, j->in, n, D);
        break;
    case ROW_RMSNORM:
        rmsnorm_forward(j->out + n0 * D, j->aux + n0, j->in + n0 * D, j->w, j->eps, n, D);
        if (j->out2)
            memcpy(j->out2 + n0 * D, j->in + n0 * D, sizeof(float) * (size_t) (n * D));
        break;
    case ROW_RMSNORM_BACK: {
        float *part = j->out2 + task * D;
        memset(part, 0, sizeof(float) * (size_t) D);
        rmsnorm_backward(j->out + n0 * D, part, j->in + n0 * D, j->in2 + n0 * D, j->w, j->aux + n0,
                         n, D);
        break;
    }
    case ROW_SWIGLU:
        swiglu_forward(j->out + n0 * D, j->in + n0 * 2 * D, n, D);
        break;
    case ROW_SWIGLU_BACK:
        swiglu_backward(j->out + n0 * 2 * D, j->in + n0 * D, j->in2 + n0 * 2 * D, n, D);
        break;
    case ROW_CE_FUSED:
        crossentropy_fused(j->aux + n0, j->out + n0 * j->V, j->ids + n0, j->dloss, n, j->V);
        break;
    case ROW_CE_FUSED16: /* a row at a time: rounded while it is in the cache */
        for (int64_t i = n0; i < n0 + n; i++) {
            crossentropy_fused(j->aux + i, j->out + i * j->V, j->ids + i, j->dloss, 1, j->V);
            bf16_round_in_place(j->out + i * j->V, j->V);
        }
        break;
    case ROW_CE_FORWARD:
        crossentropy_forward(j->aux + n0, j->out2 + n0, j->out + n0 * j->V, j->ids + n0, n, j->V);
        break;
    case ROW_ZERO:
        memset(j->out + n0 * D, 0, sizeof(float) * (size_t) (n * D));
        break;
    case ROW_GATHER:
    case ROW_SCATTER:
        for (int64_t i = n0; i < n0 + n; i++) {
            if (j->ids[i] >= 0)
                memcpy(j->out + i * D, j->in + (int64_t) j->ids[i] * D, sizeof(float) * (size_t) D);
            else
                memset(j->out + i * D, 0, sizeof(float) * (size_t) D);
        }
        break;
    }
}

static void rows_run(struct llama *m, struct row_job *j)
{
    pool_run(m->pool, cdiv(j->N, ROWS), row_task, j);
}

/* RMSNorm backward: dinp (N, D) += ..., dweight (D) += the sum of per-chunk partials, added in
 * chunk order. */
static void rmsnorm_backward_par(struct llama *m, struct llama_work *w, float *dinp, float *dweight,
                                 const float *dout, const float *inp, const float *weight,
                                 const float *rstd, int64_t N, int64_t D)
{
    struct row_job j = {.op = ROW_RMSNORM_BACK,
                        .N = N,
                        .D = D,
                        .out = dinp,
                        .out2 = w->dnorm_part,
                        .aux = (float *) rstd,
                        .in = dout,
                        .in2 = inp,
                        .w = weight};
    rows_run(m, &j);
    for (int64_t c = 0; dweight && c < cdiv(N, ROWS); c++) {
        const float *part = w->dnorm_part + c * D;
        for (int64_t i = 0; i < D; i++)
            dweight[i] += part[i];
    }
}

/* ---- attention over the pool: one task per (sequence, kv head) ------------------------ */

struct att_job {
    const struct model_config *cfg;
    const struct llama_batch *batch;
    struct llama_work *w;
    struct llama_layer_acts *la;
    float *probs; /* the layer's probabilities: kept in la, or the recomputation scratch */
    bool rope;    /* rotate q and k first (not when recomputing from the rotated ones) */
};

static void att_forward_task(void *arg, int64_t task, int thread)
{
    const struct att_job *j = arg;
    const struct model_config *c = j->cfg;
    int64_t H = c->num_attention_heads, KV = c->num_key_value_heads, hd = c->head_dim;
    int64_t T = j->batch->T, C = qkv_cols(c), G = H / KV;
    int64_t b = task / KV, g = task % KV;
    float *qkv = j->la->qkv + b * T * C;
    const int32_t *pos = j->batch->positions ? j->batch->positions + b * T : NULL;
    (void) thread;
    if (j->rope) {
        rope_forward_at(qkv + g * G * hd, j->w->rope_cos, j->w->rope_sin, pos, T, G, hd, C);
        rope_forward_at(qkv + (H + g) * hd, j->w->rope_cos, j->w->rope_sin, pos, T, 1, hd, C);
    }
    if (pos)
        attention_forward_packed(j->la->atty + b * T * H * hd, j->probs + b * H * T * T, qkv, pos,
                                 seq_len(j->batch, b), T, H, KV, hd, g, g + 1);
    else
        attention_forward(j->la->atty + b * T * H * hd, j->probs + b * H * T * T, qkv,
                          seq_len(j->batch, b), T, H, KV, hd, g, g + 1);
}

static void att_backward_task(void *arg, int64_t task, int thread)
{
    const struct att_job *j = arg;
    const struct model_config *c = j->cfg;
    int64_t H = c->num_attention_heads, KV = c->num_key_value_heads, hd = c->head_dim;
    int64_t T = j->batch->T, C = qkv_cols(c), G = H / KV;
    int64_t b = task / KV, g = task % KV;
    float *dqkv = j->w->dqkv + b * T * C;
    const int32_t *pos = j->batch->positions ? j->batch->positions + b * T : NULL;
    float *scratch = j->w->scratch + (int64_t) thread * T * T;
    if (pos)
        attention_backward_packed(dqkv, scratch, j->w->datty + b * T * H * hd,
                                  j->la->qkv + b * T * C, j->probs + b * H * T * T, pos,
                                  seq_len(j->batch, b), T, H, KV, hd, g, g + 1);
    else
        attention_backward(dqkv, scratch, j->w->datty + b * T * H * hd, j->la->qkv + b * T * C,
                           j->probs + b * H * T * T, seq_len(j->batch, b), T, H, KV, hd, g, g + 1);
    rope_backward_at(dqkv + g * G * hd, j->w->rope_cos, j->w->rope_sin, pos, T, G, hd, C);
    rope_backward_at(dqkv + (H + g) * hd, j->w->rope_cos, j->w->rope_sin, pos, T, 1, hd, C);
}

/* ---- tensor parallelism --------------------------------------------------------------- */

void llama_set_tp(struct llama *m, const struct llama_tp *tp)
{
    m->tp = *tp;
}

static bool tp_on(const struct llama *m)
{
    return m->tp.size > 1;
}

static void tp_allreduce(struct llama *m, float *buf, int64_t n)
{
    if (tp_on(m))
        m->tp.allreduce(m->tp.arg, buf, n);
}

/* Vocabulary-parallel embedding: rows of tokens in [v0, v0 + rows), zeros for the others. */
struct embed_job {
    float *out;
    const float *emb;
    const int32_t *tokens;
    int64_t N, D, v0, rows;
};

static void embed_task(void *arg, int64_t task, int thread)
{
    const struct embed_job *j = arg;
    (void) thread;
    for (int64_t n = task * ROWS; n < min64(j->N, task * ROWS + ROWS); n++) {
        int64_t t = (int64_t) j->tokens[n] - j->v0;
        if (t >= 0 && t < j->rows)
            memcpy(j->out + n * j->D, j->emb + t * j->D, sizeof(float) * (size_t) j->D);
        else
            memset(j->out + n * j->D, 0, sizeof(float) * (size_t) j->D);
    }
}

/* Cross-entropy over a vocabulary split by rows: each shard's logits (S, V) for its rows
 * [v0, v0 + V). Pass 1 gives each row's local log-sum-exp; pass 2, given the global one,
 * the losses' target terms and (training) the logits' gradient in place. */
struct vce_job {
    float *logits, *lse_local, *tlogit;
    const float *lse;
    const int32_t *targets;
    int64_t S, V, v0;
    float dloss;
    bool backward;
};

static void vce_lse_task(void *arg, int64_t task, int thread)
{
    const struct vce_job *j = arg;
    int64_t i0 = task * ROWS, n = min64(j->S, i0 + ROWS) - i0;
    (void) thread;
    crossentropy_shard_lse(j->lse_local + i0, j->tlogit + i0, j->logits + i0 * j->V,
                           j->targets + i0, j->v0, n, j->V);
}

static void vce_grad_task(void *arg, int64_t task, int thread)
{
    const struct vce_job *j = arg;
    int64_t i0 = task * ROWS, n = min64(j->S, i0 + ROWS) - i0;
    (void) thread;
    crossentropy_shard_backward(j->logits + i0 * j->V, j->lse + i0, j->targets + i0, j->v0,
                                j->dloss, n, j->V);
}

/* ---- stages --------------------------------------------------------------------------- */

void llama_set_targets(struct llama_work *w, const struct llama_batch *b)
{
    MOAI_ASSERT(w->B == b->B && w->T == b->T);
    for (int64_t i = 0; i < b->B; i++)
        for (int64_t t = 0; t < b->T; t++)
            w->targets[i * b->T + t] = b->labels && t + 1 < b->T && !starts_example(b, i, t + 1)
                                           ? b->labels[i * b->T + t + 1]
                                           : KERN_IGNORE_INDEX;
}

void llama_embed_forward(struct llama *m, const struct llama_params *p, struct llama_acts *a,
                         struct llama_work *w, const struct llama_batch *b)
{
    int64_t N = b->B * b->T, D = m->cfg.hidden_size;
    float *out = a->nlayers ? a->layers[0].x : a->xf;
    MOAI_ASSERT(a->B == b->B && a->T == b->T);
    llama_set_targets(w, b);
    if (tp_on(m)) {
        struct embed_job j = {out, p->embed, b->tokens, N, D, m->tp.vocab_first, m->tp.vocab_rows};
        pool_run(m->pool, cdiv(N, ROWS), embed_task, &j);
        tp_allreduce(m, out, N * D);
        return;
    }
    struct row_job j = {
        .op = ROW_EMBED, .N = N, .D = D, .out = out, .in = p->embed, .ids = b->tokens};
    rows_run(m, &j);
}

/* out = out + inp W^T, where under tensor parallelism inp W^T is this shard's partial sum,
 * all-reduced (in w->dln, free during forward) before it is added. */
static void linear_forward_rowpar(struct llama *m, float *out, const float *inp, const float *W,
                                  struct llama_work *w, int64_t N, int64_t C, int64_t OC)
{
    if (!tp_on(m)) {
        linear_forward(m, out, inp, W, true, N, C, OC);
        return;
    }
    linear_forward(m, w->dln, inp, W, false, N, C, OC);
    tp_allreduce(m, w->dln, N * OC);
    for (int64_t i = 0; i < N * OC; i++)
        out[i] += w->dln[i];
}

/* The layer's forward on activations la that keep everything but perhaps the probabilities
 * (then written to the recomputation scratch). */
static void layer_forward(struct llama *m, const struct llama_layer *lp,
                          struct llama_layer_acts *la, float *out, struct llama_work *w,
                          const struct llama_batch *b)
{
    const struct model_config *c = &m->cfg;
    int64_t N = b->B * b->T, D = c->hidden_size, F = c->intermediate_size;
    int64_t H = c->num_attention_heads, KV = c->num_key_value_heads, hd = c->head_dim;
    int64_t C = qkv_cols(c);
    float eps = (float) c->rms_norm_eps;

    /* ln1 = rmsnorm(x); x2 = x, the residual that o_proj adds to */
    struct row_job jn = {.op = ROW_RMSNORM,
                         .N = N,
                         .D = D,
                         .eps = eps,
                         .out = la->ln1,
                         .out2 = la->x2,
                         .aux = la->rstd1,
                         .in = la->x,
                         .w = lp->input_norm};
    rows_run(m, &jn);
    /* qkv = ln1 [Wq; Wk; Wv]^T */
    MOAI_ASSERT(lp->wk == lp->wq + H * hd * D && lp->wv == lp->wk + KV * hd * D);
    linear_forward(m, la->qkv, la->ln1, lp->wq, false, N, D, C);
    lora_forward_col(m, lp->lora, la->qkv, C, la->ln1, MODEL_LORA_wq, MODEL_LORA_wv + 1, N);
    struct att_job ja = {c, b, w, la, la->probs ? la->probs : w->re_probs, true};
    MOAI_ASSERT(ja.probs);
    pool_run(m->pool, b->B * KV, att_forward_task, &ja);
    /* x2 += atty Wo^T */
    linear_forward_rowpar(m, la->x2, la->atty, lp->wo, w, N, H * hd, D);
    lora_forward_row(m, lp->lora, la->x2, la->atty, MODEL_LORA_wo, N);
    /* ln2 = rmsnorm(x2); out = x2 */
    struct row_job jn2 = {.op = ROW_RMSNORM,
                          .N = N,
                          .D = D,
                          .eps = eps,
                          .out = la->ln2,
                          .out2 = out,
                          .aux = la->rstd2,
                          .in = la->x2,
                          .w = lp->post_norm};
    rows_run(m, &jn2);
    /* gu = ln2 [Wgate; Wup]^T; h = silu(gate) * up; out += h Wdown^T */
    MOAI_ASSERT(lp->w_up == lp->w_gate + F * D);
    linear_forward(m, la->gu, la->ln2, lp->w_gate, false, N, D, 2 * F);
    lora_forward_col(m, lp->lora, la->gu, 2 * F, la->ln2, MODEL_LORA_w_gate, MODEL_LORA_w_up + 1,
                     N);
    struct row_job js = {.op = ROW_SWIGLU, .N = N, .D = F, .out = la->h, .in = la->gu};
    rows_run(m, &js);
    linear_forward_rowpar(m, out, la->h, lp->w_down, w, N, F, D);
    lora_forward_row(m, lp->lora, out, la->h, MODEL_LORA_w_down, N);
}

/* Full recomputation: the layer kept only its input; run it again in the workspace's
 * one-layer scratch, its output going to a scratch of its own. */
static struct llama_layer_acts *layer_recompute(struct llama *m, const struct llama_layer *lp,
                                                struct llama_layer_acts *la, struct llama_work *w,
                                                const struct llama_batch *b)
{
    MOAI_ASSERT(w->re_out);
    w->re.x = la->x;
    layer_forward(m, lp, &w->re, w->re_out, w, b);
    return &w->re;
}

void llama_layer_forward(struct llama *m, const struct llama_layer *lp, struct llama_layer_acts *la,
                         float *out, struct llama_work *w, const struct llama_batch *b)
{
    if (la->ln1) {
        layer_forward(m, lp, la, out, w, b);
        return;
    }
    /* only the input kept: run in the scratch, keep the output */
    MOAI_ASSERT(w->re_out);
    w->re.x = la->x;
    layer_forward(m, lp, &w->re, out, w, b);
}

double llama_head_forward(struct llama *m, const struct llama_params *p, struct llama_acts *a,
                          struct llama_work *w, bool backward, float dloss)
{
    const struct model_config *c = &m->cfg;
    int64_t N = a->B * a->T, D = c->hidden_size, V = c->vocab_size, S = 0;

    struct row_job jn = {.op = ROW_RMSNORM,
                         .N = N,
                         .D = D,
                         .eps = (float) c->rms_norm_eps,
                         .out = a->lnf,
                         .aux = a->rstdf,
                         .in = a->xf,
                         .w = p->norm};
    rows_run(m, &jn);
    /* only scored rows (target not -100) go through lm_head: padding and masked prompts cost
     * nothing there */
    for (int64_t n = 0; n < N; n++) {
        w->scored_index[n] = -1;
        if (w->targets[n] == KERN_IGNORE_INDEX)
            continue;
        w->scored_index[n] = (int32_t) S;
        w->scored[S] = (int32_t) n;
        w->scored_targets[S++] = w->targets[n];
    }
    w->nscored = S;
    w->dlogits16 = false;
    if (S == 0)
        return 0.0;
    struct row_job jg = {
        .op = ROW_GATHER, .N = S, .D = D, .out = w->lnc, .in = a->lnf, .ids = w->scored};
    rows_run(m, &jg);
    double sum = 0.0;
    if (tp_on(m)) {
        /* this shard's logits over its real rows; the log-sum-exp joined over the shards in
         * rank order, the target's logit summed from the shard that holds it */
        int64_t Vr = m->tp.vocab_rows, tp = m->tp.size;
        linear_forward(m, w->logits, w->lnc, p->lm_head, false, S, D, Vr);
        struct vce_job j = {.logits = w->logits,
                            .lse_local = w->lse,
                            .tlogit = w->losses,
                            .lse = w->lse,
                            .targets = w->scored_targets,
                            .S = S,
                            .V = Vr,
                            .v0 = m->tp.vocab_first,
                            .dloss = dloss};
        pool_run(m->pool, cdiv(S, ROWS), vce_lse_task, &j);
        m->tp.allgather(m->tp.arg, w->lse, w->lse_all, S);
        tp_allreduce(m, w->losses, S);
        for (int64_t i = 0; i < S; i++) {
            float mx = w->lse_all[i];
            for (int64_t r = 1; r < tp; r++)
                mx = w->lse_all[r * S + i] > mx ? w->lse_all[r * S + i] : mx;
            double e = 0.0;
            for (int64_t r = 0; r < tp; r++)
                e += exp((double) w->lse_all[r * S + i] - mx);
            w->lse[i] = mx + (float) log(e);
            w->losses[i] = w->lse[i] - w->losses[i];
            sum += w->losses[i];
        }
        if (backward)
            pool_run(m->pool, cdiv(S, ROWS), vce_grad_task, &j);
        return sum;
    }
    linear_forward(m, w->logits, w->lnc, p->lm_head, false, S, D, V);
    /* under bf16 compute the gradient is kept in bf16, as the products would round it: the
     * backward's two products then read half the bytes */
    w->dlogits16 = backward && m->bf16;
    struct row_job jc = {.op = !backward      ? ROW_CE_FORWARD
                               : w->dlogits16 ? ROW_CE_FUSED16
                                              : ROW_CE_FUSED,
                         .N = S,
                         .V = V,
                         .dloss = dloss,
                         .out = w->logits,
                         .out2 = w->lse,
                         .aux = w->losses,
                         .ids = w->scored_targets};
    rows_run(m, &jc);
    for (int64_t i = 0; i < S; i++)
        sum += w->losses[i];
    return sum;
}

void llama_head_backward(struct llama *m, const struct llama_params *p, struct llama_params *g,
                         struct llama_acts *a, struct llama_work *w)
{
    const struct model_config *c = &m->cfg;
    int64_t N = a->B * a->T, D = c->hidden_size, S = w->nscored;
    int64_t V = tp_on(m) ? m->tp.vocab_rows : c->vocab_size;

    /* dW += dlogits^T lnc first, then lnc (no longer needed) takes dlnc = dlogits W */
    if (S > 0) {
        if (w->dlogits16) {
            const uint16_t *dl = (const uint16_t *) (void *) w->logits; /* rows 2V values apart */
            if (g->lm_head)
                gemm_a16(m, true, false, V, D, S, 1.0f, dl, 2 * V, w->lnc, D, 1.0f, g->lm_head, D);
            gemm_a16(m, false, false, S, D, V, 1.0f, dl, 2 * V, p->lm_head, D, 0.0f, w->lnc, D);
        } else {
            if (g->lm_head) /* NULL: frozen */
                gemm(m, true, false, V, D, S, 1.0f, w->logits, V, w->lnc, D, 1.0f, g->lm_head, D);
            gemm(m, false, false, S, D, V, 1.0f, w->logits, V, p->lm_head, D, 0.0f, w->lnc, D);
        }
        tp_allreduce(m, w->lnc, S * D);
    }
    struct row_job js = {
        .op = ROW_SCATTER, .N = N, .D = D, .out = w->dln, .in = w->lnc, .ids = w->scored_index};
    rows_run(m, &js);
    struct row_job jz = {.op = ROW_ZERO, .N = N, .D = D, .out = w->dres};
    rows_run(m, &jz);
    rmsnorm_backward_par(m, w, w->dres, g->norm, w->dln, a->xf, p->norm, a->rstdf, N, D);
}

void llama_layer_backward(struct llama *m, const struct llama_layer *lp, struct llama_layer *lg,
                          struct llama_layer_acts *la, struct llama_work *w,
                          const struct llama_batch *b)
{
    const struct model_config *c = &m->cfg;
    int64_t N = b->B * b->T, D = c->hidden_size, F = c->intermediate_size;
    int64_t H = c->num_attention_heads, KV = c->num_key_value_heads, hd = c->head_dim;
    int64_t C = qkv_cols(c);

    MOAI_ASSERT(w->nthreads >= m->nthreads); /* one attention scratch per thread */
    if (!la->ln1)                            /* full recomputation */
        la = layer_recompute(m, lp, la, w, b);
    float *probs = la->probs;
    if (!probs) { /* selective recomputation: the probabilities again from q and k */
        struct att_job jr = {c, b, w, la, w->re_probs, false};
        MOAI_ASSERT(jr.probs);
        pool_run(m->pool, b->B * KV, att_forward_task, &jr);
        probs = w->re_probs;
    }

    /* MLP: dh = dres Wdown; dgu = swiglu'; dln = dgu [Wgate; Wup] */
    linear_backward(m, w->dh, lg->w_down, w->dres, la->h, lp->w_down, N, F, D);
    lora_backward_row(m, lp->lora, lg->lora, w->dh, w->dres, la->h, MODEL_LORA_w_down, N);
    struct row_job js = {
        .op = ROW_SWIGLU_BACK, .N = N, .D = F, .out = w->dgu, .in = w->dh, .in2 = la->gu};
    rows_run(m, &js);
    MOAI_ASSERT(lp->w_up == lp->w_gate + F * D && (!lg->w_gate || lg->w_up == lg->w_gate + F * D));
    linear_backward(m, w->dln, lg->w_gate, w->dgu, la->ln2, lp->w_gate, N, D, 2 * F);
    tp_allreduce(m, w->dln, N * D);
    lora_backward_col(m, lp->lora, lg->lora, w->dln, w->dgu, 2 * F, la->ln2, MODEL_LORA_w_gate,
                      MODEL_LORA_w_up + 1, N);
    rmsnorm_backward_par(m, w, w->dres, lg->post_norm, w->dln, la->x2, lp->post_norm, la->rstd2, N,
                         D);

    /* attention: datty = dres Wo; dqkv by (sequence, kv head); dln = dqkv [Wq; Wk; Wv] */
    linear_backward(m, w->datty, lg->wo, w->dres, la->atty, lp->wo, N, H * hd, D);
    lora_backward_row(m, lp->lora, lg->lora, w->datty, w->dres, la->atty, MODEL_LORA_wo, N);
    struct att_job ja = {c, b, w, la, probs, false};
    pool_run(m->pool, b->B * KV, att_backward_task, &ja);
    MOAI_ASSERT(lp->wk == lp->wq + H * hd * D && lp->wv == lp->wk + KV * hd * D &&
                (!lg->wq || (lg->wk == lg->wq + H * hd * D && lg->wv == lg->wk + KV * hd * D)));
    linear_backward(m, w->dln, lg->wq, w->dqkv, la->ln1, lp->wq, N, D, C);
    tp_allreduce(m, w->dln, N * D);
    lora_backward_col(m, lp->lora, lg->lora, w->dln, w->dqkv, C, la->ln1, MODEL_LORA_wq,
                      MODEL_LORA_wv + 1, N);
    rmsnorm_backward_par(m, w, w->dres, lg->input_norm, w->dln, la->x, lp->input_norm, la->rstd1, N,
                         D);
}

void llama_embed_backward(struct llama *m, struct llama_params *g, struct llama_work *w,
                          const struct llama_batch *b)
{
    int64_t N = b->B * b->T, D = m->cfg.hidden_size;
    if (!g->embed) /* frozen */
        return;
    if (!tp_on(m)) {
        embedding_backward(g->embed, w->dres, b->tokens, m->cfg.pad_token_id, N, D);
        return;
    }
    for (int64_t n = 0; n < N; n++) {
        int64_t t = (int64_t) b->tokens[n] - m->tp.vocab_first;
        if (b->tokens[n] == m->cfg.pad_token_id || t < 0 || t >= m->tp.vocab_rows)
            continue;
        float *row = g->embed + t * D;
        const float *d = w->dres + n * D;
        for (int64_t i = 0; i < D; i++)
            row[i] += d[i];
    }
}

double llama_forward_backward(struct llama *m, const struct llama_params *p, struct llama_params *g,
                              struct llama_acts *a, struct llama_work *w,
                              const struct llama_batch *b, float dloss)
{
    int64_t L = m->cfg.num_hidden_layers;
    MOAI_ASSERT(w->nthreads >= m->nthreads);
    llama_embed_forward(m, p, a, w, b);
    for (int64_t l = 0; l < L; l++)
        llama_layer_forward(m, &p->layers[l], &a->layers[l], l + 1 < L ? a->layers[l + 1].x : a->xf,
                            w, b);
    double loss = llama_head_forward(m, p, a, w, g != NULL, dloss);
    if (!g)
        return loss;
    llama_head_backward(m, p, g, a, w);
    for (int64_t l = L - 1; l >= 0; l--)
        llama_layer_backward(m, &p->layers[l], &g->layers[l], &a->layers[l], w, b);
    llama_embed_backward(m, g, w, b);
    return loss;
}

/* ---- zeroing gradients ---------------------------------------------------------------- */

struct zero_job {
    float *x;
    int64_t n, chunk;
};

static void zero_task(void *arg, int64_t task, int thread)
{
    const struct zero_job *j = arg;
    int64_t i0 = task * j->chunk, i1 = min64(j->n, i0 + j->chunk);
    (void) thread;
    if (i0 < i1)
        memset(j->x + i0, 0, sizeof(float) * (size_t) (i1 - i0));
}

void llama_params_zero(struct llama *m, struct llama_params *p)
{
    struct zero_job j = {p->arena, p->nfloats, 1 << 18};
    pool_run(m->pool, cdiv(p->nfloats, j.chunk), zero_task, &j);
}

/* ---- for the model's own modules ------------------------------------------------------ */

void llama_gemm(struct llama *m, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                int64_t ldc)
{
    gemm(m, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void llama_tp_sum(struct llama *m, float *buf, int64_t n)
{
    tp_allreduce(m, buf, n);
}
