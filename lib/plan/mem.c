/* mem.c - the memory model of one device for a parallel layout (see mem.h). */
#include "plan/mem.h"

#include "layout/shard.h"
#include "model/llama.h"
#include "model/lora.h"
#include "plan/plan.h"

#include <stdio.h>
#include <string.h>

#define GIB (1024LL * 1024LL * 1024LL)

static int64_t div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

static bool is_cpu(const struct flavor *f)
{
    return strcmp(f->device.name, "cpu") == 0;
}

void mem_dtypes(struct mem_dtypes *d, const struct recipe *r)
{
    bool bf16 = r->training.precision == PRECISION_BF16 && !is_cpu(&r->flavor);
    d->weight = bf16 ? 2 : 4;
    d->grad = bf16 ? 2 : 4;
    d->master = bf16 ? 4 : 0;
    d->moments = 8;
    d->act = bf16 ? 2 : 4;
}

/* The per-device dimensions are the executor's (llama_shard_config): one rule for both. */
int64_t mem_heads_per_device(const struct model_config *cfg, int tp)
{
    struct model_config sc;
    llama_shard_config(&sc, cfg, tp);
    return sc.num_attention_heads;
}

int64_t mem_kv_heads_per_device(const struct model_config *cfg, int tp)
{
    struct model_config sc;
    llama_shard_config(&sc, cfg, tp);
    return sc.num_key_value_heads;
}

int64_t mem_vocab_per_device(const struct model_config *cfg, int tp)
{
    struct model_config sc;
    llama_shard_config(&sc, cfg, tp);
    return sc.vocab_size;
}

/* A layer's parameters on one device of a tp group: the layer table (model/layout.h) at the
 * shard's dimensions; norms replicated. */
int64_t mem_layer_params(const struct model_config *cfg, int tp)
{
    struct model_config sc;
    llama_shard_config(&sc, cfg, tp);
    return model_layer_param_count(&sc);
}

int64_t mem_embedding_params(const struct model_config *cfg, int tp)
{
    return mem_vocab_per_device(cfg, tp) * cfg->hidden_size;
}

int64_t mem_stage_params(const struct model_config *cfg, int pp, int tp, int stage)
{
    int64_t first, count;
    shard_stage_layers(cfg->num_hidden_layers, pp, stage, &first, &count);
    int64_t n = count * mem_layer_params(cfg, tp);
    if (stage == 0)
        n += mem_embedding_params(cfg, tp);
    if (stage == pp - 1) {
        n += cfg->hidden_size; /* final norm */
        if (!cfg->tie_word_embeddings || pp > 1)
            n += mem_embedding_params(cfg, tp); /* lm_head, or the tied copy */
    }
    return n;
}

int64_t mem_lora_stage_params(const struct model_config *cfg, const struct recipe *r, int pp,
                              int tp, int stage)
{
    struct model_config sc;
    int64_t first, count;
    if (!r->lora.enabled)
        return 0;
    llama_shard_config(&sc, cfg, tp);
    shard_stage_layers(cfg->num_hidden_layers, pp, stage, &first, &count);
    return count * model_lora_layer_param_count(&sc, r->lora.rank, r->lora.targets);
}

int64_t mem_lora_layer_activation_bytes(const struct model_config *cfg, const struct recipe *r,
                                        int64_t s, int64_t b, int tp, int act_bytes)
{
    struct model_config sc;
    int64_t M = s * b, elems = 0;
    if (!r->lora.enabled)
        return 0;
    llama_shard_config(&sc, cfg, tp);
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
        if (!(r->lora.targets & (1u << t)))
            continue;
        elems += M * r->lora.rank; /* x A^T, the input of B */
        if (r->lora.dropout > 0)   /* dropout(x), the input of A */
            elems += M * model_dim(&sc, model_layer_tensors[model_lora_targets[t].layer].cols);
    }
    return act_bytes * elems;
}

int64_t mem_stage_max_unit_params(const struct model_config *cfg, int pp, int tp, int stage)
{
    int64_t first, count, unit = 0;
    shard_stage_layers(cfg->num_hidden_layers, pp, stage, &first, &count);
    if (count > 0)
        unit = mem_layer_params(cfg, tp);
    if ((stage == 0 || stage == pp - 1) && mem_embedding_params(cfg, tp) > unit)
        unit = mem_embedding_params(cfg, tp);
    return unit;
}

/*
 * Activations of one Llama layer, per device, for one micro-batch (b sequences of s
 * tokens, M = s b), following Korthikanti et al. 2022 ("Reducing Activation Recomputation
 * in Large Transformer Models", section 4): count every tensor autograd keeps for the
 * backward. The paper's GPT layer keeps s b h (34 + 5 a s / h) bytes in 16-bit, with tensor
 * parallelism (no sequence parallelism) s b h (10 + 24 / t + 5 a s / (h t)). A Llama layer
 * differs: RMSNorm instead of LayerNorm, no dropout anywhere (so none of the paper's masks,
 * nor the dropout outputs), grouped-query attention, rotary embeddings and a 3-matrix SwiGLU
 * MLP of width F. Its saved tensors, in elements (e bytes each), with Hd = H / t query heads
 * and KVd kv heads (KV / t, or 1 when t > KV and kv heads are replicated) per device:
 *
 *   input_layernorm      its input x                             M D      replicated
 *                        its output, the input of q, k, v        M D      replicated
 *                        rstd, one fp32 per token                M        (4 bytes)
 *   attention            q after rotary                          M Hd hd
 *                        k after rotary, v                       2 M KVd hd
 *                        softmax(q k^T / sqrt(hd)) probabilities b Hd s^2 (unfused only)
 *                        or one fp32 log-sum-exp per row         b Hd s   (fused: 4 bytes)
 *                        the context, input of o_proj            M Hd hd
 *                        (rotary's backward is linear: nothing to keep)
 *   post_attention_norm  its input, the residual sum             M D      replicated
 *                        its output, the input of gate and up    M D      replicated
 *                        rstd                                    M        (4 bytes)
 *   SwiGLU MLP           gate output g, up output u              2 M F/t
 *                        silu(g) * u, the input of down_proj     M F/t
 *                        (silu(g) recomputed from g in the fused backward)
 *
 *   bytes = e [4 M D + M hd (2 Hd + 2 KVd) + 3 M F / t (+ b Hd s^2)] + 8 M (+ 4 b Hd s)
 *
 * For the paper's own shapes (KV = H, hd H = h) this is s b h (8 + (4 h + 3 F) e / (h t))
 * + e a s^2 b / t against the paper's 10 + 24/t and 5 a s / (h t): the replicated part loses
 * the two dropout masks, the s^2 part keeps only the probabilities (2 instead of 5 bytes),
 * and the MLP part is 3 F instead of the GELU MLP's 16 h. For Llama-2-13B (F = 2.7 h),
 * unfused, it comes to 32.1 s b h + 2 a s^2 b bytes.
 *
 * Fused attention (FlashAttention, cuDNN, Composable Kernel: MEM_ACT_FUSED) keeps one
 * log-sum-exp per row instead of the probabilities. Sequence parallelism (MEM_ACT_SEQ_PARALLEL,
 * with tp > 1: Megatron-Core's and torchtitan's way) splits the replicated tensors and the
 * rstds along the sequence over the tp group: 4 M D / t.
 *
 * Selective recomputation, unfused, is Megatron's: keep q, k, v and recompute the
 * probabilities, so the b Hd s^2 term goes. With fused attention there is nothing left to drop
 * there, and stacks that have it checkpoint by operator instead (torchtitan's op-level
 * selective checkpointing, Megatron-Core's recompute modules): the layer input, the attention
 * output and its log-sum-exp, and every other product's output are kept, the rest (norms,
 * SwiGLU, the other products) recomputed:
 *   e [M D + M Hd hd + (M hd (Hd + 2 KVd) + 2 M D + 2 M F / t) / 2] + 8 M + 4 b Hd s. Full recomputation keeps only the layer
 * input x (M D, M D / t sequence-parallel); the layer's other tensors are rebuilt one layer
 * at a time in the backward (mem_stage adds one layer's worth, once).
 */
int64_t mem_layer_activation_bytes(const struct model_config *cfg, int64_t s, int64_t b, int tp,
                                   enum recompute rc, int act_bytes, unsigned flags)
{
    int64_t D = cfg->hidden_size, hd = cfg->head_dim, F = cfg->intermediate_size / tp;
    int64_t Hd = mem_heads_per_device(cfg, tp), KVd = mem_kv_heads_per_device(cfg, tp);
    int64_t M = s * b, e = act_bytes;
    int64_t sp = (flags & MEM_ACT_SEQ_PARALLEL) ? tp : 1;

    if (rc == RECOMPUTE_FULL)
        return e * div_up(M * D, sp);
    if (rc == RECOMPUTE_SELECTIVE && (flags & MEM_ACT_FUSED)) {
        /* operator-level: x and the attention output kept, every other product's output */
        int64_t kept = div_up(M * D, sp) + M * Hd * hd +
                       (M * hd * (Hd + 2 * KVd) + 2 * div_up(M * D, sp) + 2 * M * F) / 2;
        return e * kept + 8 * div_up(M, sp) + 4 * b * Hd * s;
    }
    int64_t elems = div_up(4 * M * D, sp) + M * hd * (2 * Hd + 2 * KVd) + 3 * M * F;
    int64_t bytes = e * elems + 8 * div_up(M, sp);
    if (flags & MEM_ACT_FUSED)
        bytes += 4 * b * Hd * s;
    else if (rc != RECOMPUTE_SELECTIVE)
        bytes += e * b * Hd * s * s;
    return bytes;
}

unsigned mem_act_flags(const struct flavor *f, int tp)
{
    unsigned flags = 0;
    if (f->device.attn_tflops > 0)
        flags |= MEM_ACT_FUSED;
    if (tp > 1 && !is_cpu(f))
        flags |= MEM_ACT_SEQ_PARALLEL;
    return flags;
}

/* The lm_head's output for one micro-batch, vocabulary-parallel over tp (Megatron's parallel
 * cross-entropy). Unfused, as Hugging Face's LlamaForCausalLM computes it: the logits upcast
 * to fp32 for the cross-entropy and their fp32 gradient, and under bf16 the bf16 logits the
 * lm_head wrote (4 + 4 + 2 bytes each). A fused cross-entropy (MEM_ACT_FUSED stacks:
 * Megatron's, llm-foundry's and Liger's kernels) keeps the bf16 logits and one fp32 buffer
 * that becomes their gradient in place (2 + 4). */
int64_t mem_logits_bytes(const struct model_config *cfg, int64_t s, int64_t b, int tp,
                         int act_bytes, unsigned flags)
{
    int64_t low = act_bytes < 4 ? act_bytes : 0;
    int64_t per = (flags & MEM_ACT_FUSED) ? 4 + low : 4 + 4 + low;
    return s * b * mem_vocab_per_device(cfg, tp) * per;
}

int64_t mem_reserve_bytes(const struct flavor *f)
{
    return is_cpu(f) ? 0 : f->device.reserve_bytes;
}

/* LoRA on the cpu device: the frozen base keeps its fp32 weights arena (and the ZeRO-3
 * gathering of it) but has no gradients and no moments; the adapters of the stage's tp shard
 * (shard_lora_floats) have fp32 weights, gradients and two moments, unsharded, and the model's
 * adapter scratch (lora_work_bytes) joins the workspace: exec/lora_dev.h's lora_dev_bytes.
 * With training.precision bf16 (and not ZeRO-3) the base is held in bf16 and widened one unit
 * at a time (shard_lora_base16). */
static void mem_cpu_lora(struct mem_breakdown *m, const struct shard *s, const struct recipe *r)
{
    struct lora_config lc = {r->lora.rank, r->lora.alpha, r->lora.dropout, r->lora.targets,
                             r->training.seed};
    int64_t a = shard_lora_floats(s, lc.rank, lc.targets);
    m->params += a;
    if (shard_lora_base16(&s->lay, r)) /* the frozen base in bf16, widened unit by unit */
        m->weights_bytes = shard_base16_weight_bytes(s);
    m->weights_bytes += 4 * a;
    m->gradients_bytes = 4 * a;
    m->optimizer_bytes = 8 * a;
    m->logits_bytes += (int64_t) lora_work_bytes(&s->cfg, &lc, s->shape.B, s->shape.T);
    m->total_bytes = m->weights_bytes + m->gradients_bytes + m->optimizer_bytes +
                     m->activations_bytes + m->logits_bytes;
}

/*
 * The cpu device runs every plan in fp32 with the executor's exact arenas: layout/shard.h
 * counts what one device of a stage allocates (its units of weights, gradients and moments,
 * sharded and gathered as ZeRO does, the kept activations of the micro-batches in flight,
 * the model's workspace), by the arithmetic the executor allocates with. So the prediction is
 * the measurement; tests check both against the measured peaks.
 */
static void mem_cpu_exec(struct mem_breakdown *m, const struct model_config *cfg,
                         const struct recipe *r, const struct plan *p, int stage)
{
    const struct layout *lay = &p->lay;
    struct shard s;
    struct shard_bytes b;

    memset(m, 0, sizeof(*m));
    m->stage = stage;
    if (shard_init(&s, cfg, lay, r->training.block_size,
                   shard_cpu_threads(p->lay.dp * p->lay.pp * p->lay.tp),
                   shard_device(lay, 0, stage, 0), NULL) < 0) {
        m->total_bytes = INT64_MAX; /* out of host memory for a table: cannot plan it */
        return;
    }
    shard_bytes(&s, &b);
    m->params = s.floats;
    m->weights_bytes = b.weights;
    m->gradients_bytes = b.gradients;
    m->optimizer_bytes = b.optimizer;
    m->activations_bytes = b.activations;
    m->logits_bytes = b.workspace;
    m->reserve_bytes = 0;
    m->total_bytes = b.total;
    if (r->lora.enabled)
        mem_cpu_lora(m, &s, r);
    shard_release(&s);
}

/* Activations of the micro-batches in flight on the stage, its logits and stage-to-stage
 * buffers, and the reserve: the parts of a device's memory that do not depend on what is
 * trained; extra_per_layer is what each layer keeps beyond the base's (LoRA's). */
static void mem_stage_runtime(struct mem_breakdown *m, const struct model_config *cfg,
                              const struct recipe *r, const struct plan *p, int stage,
                              const struct mem_dtypes *d, int64_t extra_per_layer)
{
    int64_t first, count;
    int64_t s = r->training.block_size, b = p->lay.batch_per_device;
    shard_stage_layers(cfg->num_hidden_layers, p->lay.pp, stage, &first, &count);
    /* Activations of the micro-batches in flight: 1F1B keeps pp - stage of them on stage
     * `stage` (all of the warm-up forwards), never more than there are. */
    int64_t in_flight = shard_in_flight(p->lay.pp, stage, p->lay.num_micro_batches);
    unsigned flags = mem_act_flags(&r->flavor, p->lay.tp);
    int64_t per_layer =
        mem_layer_activation_bytes(cfg, s, b, p->lay.tp, p->lay.recomputation, d->act, flags);
    if (p->lay.recomputation != RECOMPUTE_FULL)
        per_layer += extra_per_layer;
    m->activations_bytes = in_flight * count * per_layer;
    if (count > 0 && p->lay.recomputation == RECOMPUTE_FULL)
        m->activations_bytes +=
            mem_layer_activation_bytes(cfg, s, b, p->lay.tp, RECOMPUTE_NONE, d->act, flags) +
            extra_per_layer;
    else if (count > 0 && p->lay.recomputation == RECOMPUTE_SELECTIVE && !(flags & MEM_ACT_FUSED))
        m->activations_bytes += (int64_t) d->act * b * mem_heads_per_device(cfg, p->lay.tp) * s * s;
    if (stage == p->lay.pp - 1) {
        /* The final norm's input, output and rstd; then the logits of one micro-batch (the
         * last stage runs each micro-batch's backward right after its forward). */
        m->activations_bytes += 2 * d->act * s * b * cfg->hidden_size + 4 * s * b;
        m->logits_bytes = mem_logits_bytes(cfg, s, b, p->lay.tp, d->act, flags);
    }
    /* Stage-to-stage buffers: the activation received and the gradient sent back. */
    if (p->lay.pp > 1)
        m->communication_bytes = 2 * d->act * s * b * cfg->hidden_size;
    m->reserve_bytes = mem_reserve_bytes(&r->flavor);
}

/* LoRA on an accelerator: the frozen base in its working dtype (sharded and gathered under
 * ZeRO-3 as in full fine-tuning), without gradients, master copy or moments; the adapters
 * like a fully trained model's parameters (working weights, gradients, master and moments,
 * sharded under ZeRO-2), and what each layer's adapters keep for backward. */
static void mem_stage_lora(struct mem_breakdown *m, const struct model_config *cfg,
                           const struct recipe *r, const struct plan *p, int stage,
                           const struct mem_dtypes *d)
{
    int64_t n = m->params, unit = mem_stage_max_unit_params(cfg, p->lay.pp, p->lay.tp, stage);
    int64_t a = mem_lora_stage_params(cfg, r, p->lay.pp, p->lay.tp, stage);
    int dp = p->lay.dp;
    bool zero2 = p->lay.distribute_param || p->lay.distribute_low_prec_param;
    bool zero3 = p->lay.distribute_low_prec_param;
    int64_t a_share = zero2 ? div_up(a, dp) : a;

    m->params = n + a;
    if (zero3 && dp > 1) {
        m->weights_bytes = d->weight * (div_up(n, dp) + (unit * 2 < n ? unit * 2 : n));
        m->gathered_bytes = d->weight * (unit * 2 < n ? unit * 2 : n);
    } else {
        m->weights_bytes = d->weight * n;
    }
    m->weights_bytes += d->weight * a;
    m->gradients_bytes = d->grad * a_share;
    m->optimizer_bytes = (int64_t) (d->master + d->moments) * a_share;
    m->master_bytes = (int64_t) d->master * a_share;
    mem_stage_runtime(m, cfg, r, p, stage, d,
                      mem_lora_layer_activation_bytes(cfg, r, r->training.block_size,
                                                      p->lay.batch_per_device, p->lay.tp, d->act));
    m->total_bytes = m->weights_bytes + m->gradients_bytes + m->optimizer_bytes +
                     m->activations_bytes + m->logits_bytes + m->communication_bytes +
                     m->reserve_bytes;
}

void mem_stage(struct mem_breakdown *m, const struct model_config *cfg, const struct recipe *r,
               const struct plan *p, int stage)
{
    if (is_cpu(&r->flavor)) {
        mem_cpu_exec(m, cfg, r, p, stage);
        return;
    }
    struct mem_dtypes d;

    mem_dtypes(&d, r);
    memset(m, 0, sizeof(*m));
    m->stage = stage;

    int64_t n = mem_stage_params(cfg, p->lay.pp, p->lay.tp, stage);
    int64_t unit = mem_stage_max_unit_params(cfg, p->lay.pp, p->lay.tp, stage);
    int dp = p->lay.dp;
    bool zero2 = p->lay.distribute_param || p->lay.distribute_low_prec_param;
    bool zero3 = p->lay.distribute_low_prec_param;
    m->params = n;
    if (r->lora.enabled) {
        mem_stage_lora(m, cfg, r, p, stage, &d);
        return;
    }

    /* Working weights; under ZeRO-3 a 1/dp shard plus the unit computing and the unit being
     * prefetched, gathered whole. */
    if (zero3 && dp > 1)
        m->weights_bytes = d.weight * (div_up(n, dp) + (unit * 2 < n ? unit * 2 : n));
    else
        m->weights_bytes = d.weight * n;

    /* Gradients; sharded: a 1/dp shard plus one unit's full gradient in its bucket. */
    if (zero2 && dp > 1)
        m->gradients_bytes = d.grad * (div_up(n, dp) + unit);
    else
        m->gradients_bytes = d.grad * n;

    m->optimizer_bytes = (int64_t) (d.master + d.moments) * (zero2 ? div_up(n, dp) : n);
    m->master_bytes = (int64_t) d.master * (zero2 ? div_up(n, dp) : n);
    if (zero3 && dp > 1)
        m->gathered_bytes += d.weight * (unit * 2 < n ? unit * 2 : n);
    if (zero2 && dp > 1)
        m->gathered_bytes += d.grad * unit;

    mem_stage_runtime(m, cfg, r, p, stage, &d, 0);
    m->total_bytes = m->weights_bytes + m->gradients_bytes + m->optimizer_bytes +
                     m->activations_bytes + m->logits_bytes + m->communication_bytes +
                     m->reserve_bytes;
}

void mem_estimate(struct mem_breakdown *m, const struct model_config *cfg, const struct recipe *r,
                  const struct plan *p)
{
    struct mem_breakdown cur;
    mem_stage(m, cfg, r, p, 0);
    for (int st = 1; st < p->lay.pp; st++) {
        /* Stages 1 .. pp-2 differ only by one layer and fewer micro-batches in flight: the
         * heaviest middle stage is the first holding an extra layer, stage 1. */
        if (st > 1 && st < p->lay.pp - 1 && !is_cpu(&r->flavor))
            continue;
        mem_stage(&cur, cfg, r, p, st);
        if (cur.total_bytes > m->total_bytes)
            *m = cur;
    }
}

int64_t mem_requested_bytes(const struct mem_breakdown *m, int64_t capacity)
{
    const int64_t phases[] = {
        m->reserve_bytes + m->communication_bytes,
        m->weights_bytes,
        m->activations_bytes + m->logits_bytes,
        m->gradients_bytes,
        m->optimizer_bytes,
    };
    int64_t used = 0;
    for (size_t i = 0; i < sizeof(phases) / sizeof(phases[0]); i++) {
        used += phases[i];
        if (used > capacity)
            return used;
    }
    return used;
}

/* A worker thread's resident share: the pages of its stack it touches and OpenBLAS's
 * per-thread packing buffers for sgemm panels (GEMM_P x GEMM_Q floats of A and GEMM_Q x GEMM_R
 * of B for the Haswell / SkylakeX / Zen kernels: about 1.5 MiB), measured with VmHWM over 1 to
 * 4 cpu devices (bench_process in make bench). bf16 products pack on the stack instead
 * (model/bf16.h: about 540 KiB), within it. */
#define MEM_THREAD_BYTES (2LL * 1024 * 1024)

int mem_process(struct mem_process *pm, const struct model_config *cfg, const struct recipe *r,
                const struct plan *p, const struct mem_process_in *in)
{
    int64_t P = model_param_count(cfg), T = r->training.block_size;
    int ndev = p->lay.dp * p->lay.pp * p->lay.tp;

    memset(pm, 0, sizeof(*pm));
    pm->runtime_bytes = in->runtime_bytes;
    for (int d = in->first_device; d < in->first_device + in->devices; d++) {
        struct mem_breakdown m;
        mem_stage(&m, cfg, r, p, d / p->lay.tp % p->lay.pp);
        if (m.total_bytes == INT64_MAX) /* its table could not be allocated */
            return MOAI_ENOMEM;
        pm->devices_bytes += m.total_bytes;
    }
    pm->threads_bytes = (int64_t) in->devices * shard_cpu_threads(ndev) * MEM_THREAD_BYTES;
    pm->host_bytes = 4 * P * (in->resume ? 3 : 1);
    if (in->first_device == 0)
        pm->checkpoint_bytes = 3 * 4 * P;
    /* tokens and labels (int32) and a length per example: the tokenized set, the loop's copy
     * of it and of the held-out examples */
    int64_t per = 2 * 4 * T + 4;
    pm->data_bytes = per * (2 * in->examples + in->valid_examples);
    /* packing (data/batch.h, batch_packer): five int64 indices an example (the epoch's order,
     * its packing and the packer's scratch), two steps of packed rows and the held-out
     * examples' rows (at most one each), each T tokens, labels and positions, a length and an
     * example count */
    if (r->dataset.packing && in->examples > 0)
        pm->data_bytes += 5 * 8 * in->examples +
                          (3 * 4 * T + 8) * (2 * r->training.batch_size + in->valid_examples);
    pm->total_bytes = pm->runtime_bytes + pm->devices_bytes + pm->threads_bytes + pm->host_bytes +
                      pm->checkpoint_bytes + pm->data_bytes;
    return 0;
}

static int64_t status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long long kib = 0;
    size_t n = strlen(key);
    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f))
        if (!strncmp(line, key, n) && line[n] == ':') {
            sscanf(line + n + 1, "%lld", &kib);
            break;
        }
    fclose(f);
    return (int64_t) kib * 1024;
}

int64_t mem_process_runtime_bytes(void)
{
    return status_kib("VmRSS");
}

int64_t mem_process_peak_bytes(void)
{
    return status_kib("VmHWM");
}
