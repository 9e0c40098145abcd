/* shard.c - one device's units of parameters and its exact memory (see shard.h). */
#include "layout/shard.h"

#include <sched.h>

#include <stdlib.h>
#include <string.h>

static int64_t div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

int shard_device(const struct layout *lay, int dp_rank, int stage, int tp_rank)
{
    return (dp_rank * lay->pp + stage) * lay->tp + tp_rank;
}

enum llama_keep shard_keep(enum recompute rc)
{
    return rc == RECOMPUTE_FULL        ? LLAMA_KEEP_INPUT
           : rc == RECOMPUTE_SELECTIVE ? LLAMA_KEEP_NO_PROBS
                                       : LLAMA_KEEP_ALL;
}

void shard_stage_layers(int64_t L, int pp, int stage, int64_t *first, int64_t *count)
{
    int64_t base = L / pp, rem = L % pp;
    int64_t before = stage < 1 ? 0 : (stage - 1 < rem ? stage - 1 : rem);
    *first = stage * base + before;
    *count = base + (stage >= 1 && stage <= rem);
}

int64_t shard_in_flight(int pp, int stage, int num_micro_batches)
{
    return pp - stage < num_micro_batches ? pp - stage : num_micro_batches;
}

int shard_cpu_threads(int ndev)
{
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    return cores / ndev > 1 ? cores / ndev : 1;
}

static void add_unit(struct shard *s, enum shard_unit_kind kind, int64_t layer, int64_t len)
{
    struct shard_unit *u = &s->units[s->nunits++];
    int dp = s->lay.dp;
    u->kind = kind;
    u->layer = layer;
    u->off = s->floats;
    u->len = len;
    u->chunk = div_up(len, dp);
    u->shard = s->shard_floats;
    s->floats += len;
    s->shard_floats += u->chunk;
    if (u->chunk * dp > s->max_padded)
        s->max_padded = u->chunk * dp;
    if (u->chunk > s->max_chunk)
        s->max_chunk = u->chunk;
}

int shard_init(struct shard *s, const struct model_config *full, const struct layout *lay,
               int64_t T, int nthreads, int dev, struct moai_err *err)
{
    int tp = lay->tp, pp = lay->pp;
    memset(s, 0, sizeof(*s));
    s->lay = *lay;
    s->dev = dev;
    s->tp_rank = dev % tp;
    s->stage = dev / tp % pp;
    s->dp_rank = dev / tp / pp;
    s->full = *full;
    llama_shard_config(&s->cfg, full, tp);
    shard_stage_layers(full->num_hidden_layers, pp, s->stage, &s->first_layer, &s->nlayers);
    s->has_embed = s->stage == 0;
    s->has_head = s->stage == pp - 1;
    s->tied_copy = full->tie_word_embeddings && pp > 1 && s->has_head;

    int64_t Vs = s->cfg.vocab_size, D = full->hidden_size;
    s->vocab_first = s->tp_rank * Vs;
    s->vocab_rows = full->vocab_size - s->vocab_first < Vs ? full->vocab_size - s->vocab_first : Vs;
    if (s->vocab_rows < 0)
        s->vocab_rows = 0;
    int64_t H = full->num_attention_heads, KV = full->num_key_value_heads;
    int64_t Hd = s->cfg.num_attention_heads;
    s->kv_first = s->tp_rank * Hd / (H / KV);
    s->kv_replicated = tp > KV;

    s->units = calloc((size_t) (s->nlayers + 3), sizeof(*s->units));
    if (!s->units)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    s->embed_unit = s->norm_unit = s->lm_head_unit = -1;
    if (s->has_embed) {
        s->embed_unit = s->nunits;
        add_unit(s, SHARD_EMBED, -1, Vs * D);
    }
    for (int64_t l = 0; l < s->nlayers; l++)
        add_unit(s, SHARD_LAYER, s->first_layer + l, model_layer_param_count(&s->cfg));
    if (s->has_head) {
        s->norm_unit = s->nunits;
        add_unit(s, SHARD_NORM, -1, D);
        s->norm_padded = s->units[s->norm_unit].chunk * lay->dp;
        if (!full->tie_word_embeddings || pp > 1) {
            s->lm_head_unit = s->nunits;
            add_unit(s, SHARD_LMHEAD, -1, Vs * D);
        }
    }
    int64_t nmb = lay->num_micro_batches;
    s->in_flight = shard_in_flight(pp, s->stage, nmb);
    s->shape = (struct llama_shape){.B = lay->batch_per_device,
                                    .T = T,
                                    .nlayers = s->nlayers,
                                    .head = s->has_head,
                                    .keep = shard_keep(lay->recomputation),
                                    .tp = tp,
                                    .nthreads = nthreads};
    return 0;
}

void shard_release(struct shard *s)
{
    free(s->units);
    s->units = NULL;
}

void shard_bytes(const struct shard *s, struct shard_bytes *b)
{
    bool zero2 = s->lay.distribute_param || s->lay.distribute_low_prec_param;
    bool zero3 = s->lay.distribute_low_prec_param;
    int64_t f = sizeof(float);

    b->weights = f * (zero3 ? s->shard_floats + 2 * s->max_padded + s->norm_padded : s->floats);
    b->gradients =
        f * (zero2 ? s->shard_floats + s->max_padded + s->max_chunk + s->norm_padded : s->floats);
    b->optimizer = 2 * f * (zero2 ? s->shard_floats : s->floats);
    b->activations = s->in_flight * (int64_t) llama_acts_bytes_shape(&s->cfg, &s->shape);
    b->workspace = (int64_t) llama_work_bytes_shape(&s->cfg, &s->shape);
    b->total = b->weights + b->gradients + b->optimizer + b->activations + b->workspace;
}

void shard_layer_view(struct llama_layer *l, float *base, const struct model_config *c)
{
    llama_layer_bind(l, base, c);
}

/* Where this device's part of dimension d starts in the whole, and its size: tensor
 * parallelism splits the query heads, the kv heads (one kept whole when they are replicated)
 * and the MLP width; the hidden size is whole everywhere. */
static void dim_split(const struct shard *s, enum model_dim d, int64_t *start, int64_t *count)
{
    *count = model_dim(&s->cfg, d);
    switch (d) {
    case MODEL_DIM_Q:
    case MODEL_DIM_F:
        *start = s->tp_rank * *count;
        return;
    case MODEL_DIM_KV:
        *start = s->kv_first * s->full.head_dim;
        return;
    case MODEL_DIM_NONE:
    case MODEL_DIM_D:
    case MODEL_DIM_V:
        break;
    }
    *start = 0;
}

/* Is tensor k of a layer held whole by every device of a tp group (no dimension split)? */
static bool replicated_over_tp(int k)
{
    enum model_dim r = model_layer_tensors[k].rows, c = model_layer_tensors[k].cols;
    return (r == MODEL_DIM_D || r == MODEL_DIM_NONE) && (c == MODEL_DIM_D || c == MODEL_DIM_NONE);
}

/* Is tensor k of a layer split by kv heads? */
static bool split_by_kv(int k)
{
    return model_layer_tensors[k].rows == MODEL_DIM_KV ||
           model_layer_tensors[k].cols == MODEL_DIM_KV;
}

/* Copies rows x cols floats between a matrix of leading dimension ld_full and one of ld_part,
 * towards the part (to_full false) or the whole (to_full true). */
static void copy_block(float *full, int64_t ld_full, float *part, int64_t ld_part, int64_t rows,
                       int64_t cols, bool to_full)
{
    for (int64_t i = 0; i < rows; i++) {
        float *a = full + i * ld_full, *b = part + i * ld_part;
        if (to_full)
            memcpy(a, b, sizeof(float) * (size_t) cols);
        else
            memcpy(b, a, sizeof(float) * (size_t) cols);
    }
}

/* Offsets in the whole model's arena: the embedding, layer l, the final norm, lm_head. */
static int64_t full_layer_off(const struct model_config *c, int64_t l)
{
    return c->vocab_size * c->hidden_size + l * model_layer_param_count(c);
}

static void unit_copy(const struct shard *s, int ui, float *full, float *part, bool to_full)
{
    const struct shard_unit *u = &s->units[ui];
    const struct model_config *fc = &s->full, *sc = &s->cfg;
    int64_t D = fc->hidden_size, L = fc->num_hidden_layers;

    switch (u->kind) {
    case SHARD_EMBED:
    case SHARD_LMHEAD: {
        int64_t off =
            u->kind == SHARD_LMHEAD && !fc->tie_word_embeddings ? full_layer_off(fc, L) + D : 0;
        float *src = full + off + s->vocab_first * D;
        if (!to_full)
            memset(part + s->vocab_rows * D, 0,
                   sizeof(float) * (size_t) (u->len - s->vocab_rows * D));
        copy_block(src, D, part, D, s->vocab_rows, D, to_full);
        break;
    }
    case SHARD_NORM:
        copy_block(full + full_layer_off(fc, L), D, part, D, 1, D, to_full);
        break;
    case SHARD_LAYER: {
        float *fk = full + full_layer_off(fc, u->layer), *pk = part;
        for (int k = 0; k < MODEL_LAYER_NTENSORS; k++) {
            const struct model_layer_tensor_desc *t = &model_layer_tensors[k];
            int64_t r0, rn, c0, cn;
            dim_split(s, t->rows, &r0, &rn);
            if (t->cols == MODEL_DIM_NONE) {
                copy_block(fk + r0, rn, pk, rn, 1, rn, to_full);
            } else {
                int64_t ld = model_dim(fc, t->cols);
                dim_split(s, t->cols, &c0, &cn);
                copy_block(fk + r0 * ld + c0, ld, pk, cn, rn, cn, to_full);
            }
            fk += model_layer_tensor_numel(fc, k);
            pk += model_layer_tensor_numel(sc, k);
        }
        break;
    }
    }
}

void shard_unit_from_full(const struct shard *s, int u, const float *full, float *dst)
{
    unit_copy(s, u, (float *) full, dst, false);
}

void shard_unit_to_full(const struct shard *s, int u, const float *src, float *full)
{
    unit_copy(s, u, full, (float *) src, true);
}

bool shard_lora_base16(const struct layout *lay, const struct recipe *r)
{
    return r->lora.enabled && r->training.precision == PRECISION_BF16 &&
           !lay->distribute_low_prec_param;
}

int64_t shard_base16_weight_bytes(const struct shard *s)
{
    return 2 * s->floats + (int64_t) sizeof(float) * (2 * s->max_padded + s->norm_padded);
}

int64_t shard_lora_floats(const struct shard *s, int64_t rank, unsigned targets)
{
    return s->nlayers * model_lora_layer_param_count(&s->cfg, rank, targets);
}

void shard_lora_copy(const struct shard *s, const struct lora_layer *full, struct lora_layer *part,
                     int64_t rank, unsigned targets, bool to_full)
{
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
        if (!(targets & (1u << t)))
            continue;
        const struct model_layer_tensor_desc *d = &model_layer_tensors[model_lora_targets[t].layer];
        int64_t r0, rn, c0, cn;
        dim_split(s, d->rows, &r0, &rn);
        dim_split(s, d->cols, &c0, &cn);
        /* A (r, in): the shard's input columns; B (out, r): its output rows */
        copy_block(full->lora_A[t] + c0, model_dim(&s->full, d->cols), part->lora_A[t], cn, rank,
                   cn, to_full);
        copy_block(full->lora_B[t] + r0 * rank, rank, part->lora_B[t], rank, rn, rank, to_full);
    }
}

void shard_kv_range(const struct shard *s, int u, int64_t *start, int64_t *end)
{
    int64_t at = 0;
    (void) u; /* every layer unit has the same layout */
    *start = *end = -1;
    for (int k = 0; k < MODEL_LAYER_NTENSORS; k++) {
        int64_t n = model_layer_tensor_numel(&s->cfg, k);
        if (split_by_kv(k)) {
            if (*start < 0)
                *start = at;
            *end = at + n;
        }
        at += n;
    }
}

/* Appends [a, b) to ranges, merged with the last one when they touch. */
static int add_range(int64_t ranges[4][2], int n, int64_t a, int64_t b)
{
    if (n > 0 && ranges[n - 1][1] == a) {
        ranges[n - 1][1] = b;
        return n;
    }
    MOAI_ASSERT(n < 4);
    ranges[n][0] = a;
    ranges[n][1] = b;
    return n + 1;
}

int shard_duplicate_ranges(const struct shard *s, int ui, int64_t ranges[4][2])
{
    const struct shard_unit *u = &s->units[ui];
    int n = 0;

    switch (u->kind) {
    case SHARD_EMBED:
        break;
    case SHARD_NORM:
        if (s->tp_rank != 0) {
            ranges[n][0] = 0;
            ranges[n++][1] = u->len;
        }
        break;
    case SHARD_LMHEAD:
        if (s->tied_copy) {
            ranges[n][0] = 0;
            ranges[n++][1] = u->len;
        }
        break;
    case SHARD_LAYER: {
        /* what another device of the tp group holds too: the tensors no dimension of which
         * is split (the norms) past rank 0, and the kv projections past the first rank that
         * shares a replicated kv head */
        int sharing = s->lay.tp / (int) s->full.num_key_value_heads;
        bool dup[2] = {s->tp_rank != 0, s->kv_replicated && s->tp_rank % sharing != 0};
        for (int pass = 0; pass < 2; pass++) { /* the norms first, then k and v */
            int64_t at = 0;
            for (int k = 0; k < MODEL_LAYER_NTENSORS; k++) {
                int64_t len = model_layer_tensor_numel(&s->cfg, k);
                if (dup[pass] && (pass == 0 ? replicated_over_tp(k) : split_by_kv(k)))
                    n = add_range(ranges, n, at, at + len);
                at += len;
            }
        }
        break;
    }
    }
    return n;
}
