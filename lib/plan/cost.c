/* cost.c - the predicted step time of a parallel layout (see cost.h). */
#include "plan/cost.h"

#include "flavor.h"
#include "layout/shard.h"
#include "model/llama.h"
#include "model/bf16.h"
#include "plan/mem.h"
#include "plan/plan.h"

#include <math.h>
#include <string.h>

/* The device figures (sustained product rates, fused attention, collective bandwidths) live
 * with their sources in flavor.c; the constants here are what is common to every device. */

/* Fraction of HBM bandwidth that streaming kernels reach (STREAM-like copies reach 80-90%). */
#define COST_HBM_EFFICIENCY 0.8

/* Launch and synchronization overhead per kernel on an accelerator (a few microseconds; the
 * CUDA / HIP launch latency measured by every microbenchmark suite). */
#define COST_KERNEL_LAUNCH_SECONDS 5e-6

/* Latency of one collective step on a link: intra-node (xGMI / NVLink) and inter-node (RDMA),
 * as NCCL's own tuning model takes them. */
#define COST_INTRA_LATENCY_SECONDS 5e-6
#define COST_INTER_LATENCY_SECONDS 1e-5

/* On the cpu device, the executor reduces gradients after the backward; about half of it
 * overlaps the other devices' remaining work (bench_parallel). */
#define COST_DP_OVERLAP_CPU 0.5

/* A collective that overlaps compute takes part of the device with it (NCCL / RCCL kernels
 * run on the same compute units and memory): the overlapped compute slows by this fraction
 * of the hidden communication time. Fitted on the calibration runs (bench/calibration):
 * 0.1-0.2 of the hidden time, the range overlap studies of FSDP and Megatron report. */
#define COST_OVERLAP_SLOWDOWN 0.15

/* The cpu device's devices are threads sharing the machine's cores. When they outnumber the
 * cores, a collective waits until every member thread has been scheduled again, not the
 * microseconds of a link. Measured with bench_parallel (make bench) on 4 devices over 2
 * cores: the tp 2 and tp 4 plans of the tiny model took 0-20 ms per step more than their
 * compute over their ~20 tensor-parallel collectives per micro-batch; 0.5 ms each. */
#define COST_CPU_SYNC_SECONDS 5e-4

/* Elementwise work of a layer (norms, rotary, softmax, SwiGLU, residuals) streams its saved
 * activations about this many times over forward and backward. */
#define COST_ELEMENTWISE_PASSES 4.0

/* The cross-entropy streams each logit about this many bytes over forward and backward
 * (bf16 logits read, fp32 upcast written and read, fp32 gradient written, bf16 written). */
#define COST_LOSS_BYTES_PER_LOGIT 16.0

static bool is_cpu(const struct flavor *f)
{
    return strcmp(f->device.name, "cpu") == 0;
}

/* Cores per device when the cpu flavor's devices outnumber this machine's cores (they share
 * them), else 0. */
static double cpu_shared(const struct flavor *f)
{
    int cores = shard_cpu_threads(1);
    return is_cpu(f) && f->devices > cores ? (double) cores / f->devices : 0.0;
}

double cost_device_tflops(const struct flavor *f)
{
    if (is_cpu(f) && f->device.tflops <= 0)
        return flavor_cpu_tflops() / f->devices;
    return f->device.tflops;
}

double cost_gemm_efficiency(const struct flavor *f)
{
    return f->device.gemm_efficiency;
}

double cost_gemm_seconds(double m, double n, double k, double batch, int elem_bytes,
                         const struct flavor *f)
{
    double x = fmin(m, fmin(n, k));
    double eff = cost_gemm_efficiency(f) * x / (x + f->device.gemm_half_dim);
    double flops = 2.0 * m * n * k * batch;
    double compute = flops / (cost_device_tflops(f) * 1e12 * eff);
    double bytes = (m * k + k * n + m * n) * batch * elem_bytes;
    double memory = bytes / (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);
    double launch = is_cpu(f) ? 0.0 : COST_KERNEL_LAUNCH_SECONDS;
    return fmax(compute, memory) + launch;
}

double cost_allreduce_seconds(double bytes, int n, double gbps, double latency_seconds)
{
    if (n <= 1)
        return 0.0;
    return 2.0 * (n - 1) / n * bytes / (gbps * 1e9) + 2.0 * (n - 1) * latency_seconds;
}

double cost_attention_fraction(const struct recipe *r)
{
    double a = r->dataset.packed_attention;
    return r->dataset.packing && a > 0.0 && a < 1.0 ? a : 1.0;
}

double cost_model_flops(const struct model_config *cfg, const struct recipe *r)
{
    double tokens = (double) r->training.batch_size * (double) r->training.block_size;
    double D = (double) cfg->hidden_size, L = (double) cfg->num_hidden_layers;
    double matmul = L * (double) (model_layer_param_count(cfg) - 2 * cfg->hidden_size) +
                    (double) cfg->vocab_size * D;
    double attention = 6.0 * L * (double) r->training.block_size *
                       (double) (cfg->num_attention_heads * cfg->head_dim) *
                       cost_attention_fraction(r);
    if (r->lora.enabled) { /* a frozen base: 2 forward + 2 input-gradient FLOPs a weight */
        double adapters =
            L * (double) model_lora_layer_param_count(cfg, r->lora.rank, r->lora.targets);
        return (4.0 * matmul + 6.0 * adapters) * tokens + attention * tokens;
    }
    return 6.0 * matmul * tokens + attention * tokens;
}

/* One layer on one device for one micro-batch: forward and backward seconds, and the part of
 * the forward that selective recomputation repeats (the attention core). */
struct layer_seconds {
    double fwd, bwd, attn_fwd, selective;
};

/* The attention core, q k^T, softmax and p v, of b sequences of s tokens, Hd heads of hd:
 * fused (FlashAttention's convention: 2 b Hd s^2 hd forward FLOPs with the causal half
 * skipped, the backward 2.5 times the forward, at the device's sustained rate) or, on a
 * device without a fused kernel, two batched products each way over the whole s x s. Packed
 * rows (frac < 1, cost_attention_fraction) run each example as its own causal block, the
 * blocks between examples skipped: frac s^2 of the s^2 products per head, so the fused FLOPs
 * and the keys of each product scale by frac. */
static void attention_seconds(const struct flavor *f, double s, double b, double Hd, double hd,
                              double frac, int e, double *fwd, double *bwd)
{
    if (f->device.attn_tflops > 0) {
        double flops = 2.0 * b * Hd * s * s * hd * frac;
        *fwd = flops / (f->device.attn_tflops * 1e12) + COST_KERNEL_LAUNCH_SECONDS;
        *bwd = 2.5 * flops / (f->device.attn_tflops * 1e12) + COST_KERNEL_LAUNCH_SECONDS;
        return;
    }
    *fwd = 2.0 * cost_gemm_seconds(s, s * frac, hd, b * Hd, e, f);
    *bwd = 2.0 * *fwd;
}

/* The adapters' forward products of one layer for M tokens on one device: x A^T (M x r x in)
 * and t B^T (M x out x r) per target, at the shard's sizes. */
static double lora_seconds(const struct model_config *cfg, const struct recipe *r,
                           const struct plan *p, double M, int e)
{
    struct model_config sc;
    double sec = 0.0, rank = (double) r->lora.rank;
    llama_shard_config(&sc, cfg, p->lay.tp);
    for (int t = 0; t < MODEL_LORA_NTARGETS; t++) {
        if (!(r->lora.targets & (1u << t)))
            continue;
        const struct model_layer_tensor_desc *d = &model_layer_tensors[model_lora_targets[t].layer];
        double out = (double) model_dim(&sc, d->rows), in = (double) model_dim(&sc, d->cols);
        sec += cost_gemm_seconds(M, rank, in, 1, e, &r->flavor) +
               cost_gemm_seconds(M, out, rank, 1, e, &r->flavor);
    }
    return sec;
}

/* On the cpu device (measured speed) under training.precision bf16, where bf16 products run
 * (bf16_available: AVX512_BF16), the executor multiplies the projections and lm_head in bf16
 * (llama_set_bf16) at this machine's measured bf16 rate, flavor_cpu_bf16_tflops; attention and
 * the elementwise work stay fp32. A cpu product is compute bound (its roofline's compute term),
 * so the ratio of the two rates divides its time. 1 elsewhere. */
static double cpu_bf16_speedup(const struct recipe *r)
{
    const struct flavor *f = &r->flavor;
    if (!is_cpu(f) || f->device.tflops > 0 || r->training.precision != PRECISION_BF16 ||
        !bf16_available())
        return 1.0;
    return flavor_cpu_bf16_tflops() / flavor_cpu_tflops();
}

static void layer_seconds(struct layer_seconds *t, const struct model_config *cfg,
                          const struct recipe *r, const struct plan *p, int e)
{
    const struct flavor *f = &r->flavor;
    double s = (double) r->training.block_size, b = (double) p->lay.batch_per_device, M = s * b;
    double D = (double) cfg->hidden_size, hd = (double) cfg->head_dim;
    double Hd = (double) mem_heads_per_device(cfg, p->lay.tp);
    double KVd = (double) mem_kv_heads_per_device(cfg, p->lay.tp);
    double F = (double) cfg->intermediate_size / p->lay.tp;
    double attn_bwd;

    double gemms = cost_gemm_seconds(M, (Hd + 2 * KVd) * hd, D, 1, e, f) /* q, k, v */
                   + cost_gemm_seconds(M, D, Hd * hd, 1, e, f)           /* o */
                   + cost_gemm_seconds(M, 2 * F, D, 1, e, f)             /* gate, up */
                   + cost_gemm_seconds(M, D, F, 1, e, f);                /* down */
    gemms /= cpu_bf16_speedup(r);
    attention_seconds(f, s, b, Hd, hd, cost_attention_fraction(r), e, &t->attn_fwd, &attn_bwd);
    double act = (double) mem_layer_activation_bytes(
        cfg, (int64_t) s, (int64_t) b, p->lay.tp, RECOMPUTE_NONE, e, mem_act_flags(f, p->lay.tp));
    double elementwise =
        COST_ELEMENTWISE_PASSES / 2 * act / (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);
    t->fwd = gemms + t->attn_fwd + elementwise;
    t->bwd = 2.0 * (gemms + elementwise) + attn_bwd;
    if (r->lora.enabled) {
        /* a frozen base: its products' input gradients only, no weight gradients; the
         * adapters' two thin products forward, four backward */
        double lora = lora_seconds(cfg, r, p, M, e);
        t->fwd += lora;
        t->bwd += 2.0 * lora - gemms;
    }
    /* selective recomputation repeats the attention core (Megatron's, unfused) or, with fused
     * attention, half the products and the elementwise work (operator-level; see mem.c) */
    t->selective = f->device.attn_tflops > 0 ? gemms / 2 + elementwise : t->attn_fwd;
}

/* The lm_head's three products and the cross-entropy of one micro-batch on one device. */
static double head_seconds(const struct model_config *cfg, const struct recipe *r,
                           const struct plan *p, int e)
{
    const struct flavor *f = &r->flavor;
    double M = (double) r->training.block_size * (double) p->lay.batch_per_device;
    double V = (double) mem_vocab_per_device(cfg, p->lay.tp), D = (double) cfg->hidden_size;
    double loss =
        COST_LOSS_BYTES_PER_LOGIT * M * V / (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);
    /* forward, input gradient and (unless frozen: LoRA) weight gradient */
    return (r->lora.enabled ? 2.0 : 3.0) * cost_gemm_seconds(M, V, D, 1, e, f) /
               cpu_bf16_speedup(r) +
           loss;
}

/* The bandwidth of a data-parallel group: inside a node the collective bus bandwidth; across
 * nodes each of its g members on a node drives its own network link (NCCL's rings over
 * rail-matched NICs), so g x inter_node_gbps, at most the intra-node figure. Devices are
 * numbered tp fastest, then dp: a dp group has max(1, devices_per_node / tp) members per node
 * when it crosses nodes. */
static double dp_gbps(const struct flavor *f, const struct plan *p, bool *crosses)
{
    *crosses = p->lay.dp * p->lay.tp > f->devices_per_node;
    if (!*crosses)
        return f->device.intra_node_gbps;
    int g = f->devices_per_node / p->lay.tp > 1 ? f->devices_per_node / p->lay.tp : 1;
    return fmin(f->device.intra_node_gbps, g * f->device.inter_node_gbps);
}

/* Communication c hidden behind a compute window w: what shows, plus the slowdown of the
 * compute it shares the device with. */
static double exposed(double c, double w)
{
    return fmax(c - w, 0.0) + COST_OVERLAP_SLOWDOWN * fmin(c, w);
}

/* The parameters of the larger end stage on one device (the first or the last). */
static int64_t stage_params(const struct model_config *cfg, const struct plan *p)
{
    int64_t n = mem_stage_params(cfg, p->lay.pp, p->lay.tp, 0);
    int64_t n_last = mem_stage_params(cfg, p->lay.pp, p->lay.tp, p->lay.pp - 1);
    return n_last > n ? n_last : n;
}

/* Of those, the trained ones: all, or with LoRA the adapters (whose gradients the data-parallel
 * group reduces and whose optimizer state the step updates). */
static int64_t trained_params(const struct model_config *cfg, const struct recipe *r,
                              const struct plan *p)
{
    if (!r->lora.enabled)
        return stage_params(cfg, p);
    int64_t a = mem_lora_stage_params(cfg, r, p->lay.pp, p->lay.tp, 0);
    int64_t a_last = mem_lora_stage_params(cfg, r, p->lay.pp, p->lay.tp, p->lay.pp - 1);
    return a_last > a ? a_last : a;
}

/* The data-parallel traffic of the stage holding n parameters and its exposed part. Without
 * sharding, the gradients are all-reduced once per step, bucket by bucket while the last
 * micro-batch's backward runs (DDP, Megatron's overlapped grad reduce); the first layers'
 * bucket (one unit) is reduced after the backward ends. distribute_param reduce-scatters every
 * micro-batch's gradients during its backward and all-gathers the updated weights once, during
 * the next step's first forward; distribute_low_prec_param also all-gathers the weights of
 * every unit in each micro-batch's forward and backward, prefetched (FSDP, ZeRO-3). On the cpu
 * device the executor's collectives follow the backward (COST_DP_OVERLAP_CPU). */
static void dp_seconds(struct cost_breakdown *c, const struct model_config *cfg,
                       const struct recipe *r, const struct plan *p, const struct mem_dtypes *d,
                       double fwd_window, double bwd_window)
{
    const struct flavor *f = &r->flavor;
    int64_t n = trained_params(cfg, r, p);
    double unit = (double) mem_stage_max_unit_params(cfg, p->lay.pp, p->lay.tp, 0) /
                  (double) mem_stage_params(cfg, p->lay.pp, p->lay.tp, 0);
    bool crosses;
    double gbps = dp_gbps(f, p, &crosses);
    double lat = crosses ? COST_INTER_LATENCY_SECONDS : COST_INTRA_LATENCY_SECONDS;
    double ar_grads = cost_allreduce_seconds((double) n * d->grad, p->lay.dp, gbps, lat);
    double ag_weights = cost_allreduce_seconds((double) n * d->weight, p->lay.dp, gbps, lat) / 2;
    /* ZeRO-3 gathers the whole stage's weights in flight, a frozen base's too */
    double ag_stage =
        cost_allreduce_seconds((double) stage_params(cfg, p) * d->weight, p->lay.dp, gbps, lat) / 2;
    bool zero2 = p->lay.distribute_param || p->lay.distribute_low_prec_param;
    double mb = p->lay.num_micro_batches;

    if (is_cpu(f)) {
        double full = zero2 ? ar_grads / 2 * mb + ag_weights : ar_grads;
        if (p->lay.distribute_low_prec_param)
            full += 2.0 * ag_stage * mb;
        c->dp_comm_seconds = full;
        c->dp_exposed_seconds =
            fmax(full - COST_DP_OVERLAP_CPU * bwd_window * mb, (1.0 - COST_DP_OVERLAP_CPU) * full);
        return;
    }
    if (!zero2) {
        c->dp_comm_seconds = ar_grads;
        c->dp_exposed_seconds = exposed(ar_grads * (1.0 - unit), bwd_window) + ar_grads * unit;
        return;
    }
    double rs = ar_grads / 2;
    c->dp_comm_seconds = rs * mb + ag_weights;
    c->dp_exposed_seconds =
        mb * exposed(rs * (1.0 - unit), bwd_window) + rs * unit + exposed(ag_weights, fwd_window);
    if (p->lay.distribute_low_prec_param) {
        c->dp_comm_seconds += 2.0 * ag_stage * mb;
        c->dp_exposed_seconds +=
            mb * (exposed(ag_stage, fwd_window) + exposed(ag_stage, fmax(bwd_window - rs, 0.0))) +
            ag_stage * unit;
    }
}

void cost_estimate(struct cost_breakdown *c, const struct model_config *cfg, const struct recipe *r,
                   const struct plan *p)
{
    const struct flavor *f = &r->flavor;
    struct mem_dtypes d;
    struct layer_seconds layer;

    memset(c, 0, sizeof(*c));
    mem_dtypes(&d, r);
    int e = d.act;
    layer_seconds(&layer, cfg, r, p, e);

    /* The slowest stage: the most layers, plus the embedding or lm_head at the ends. */
    int64_t first, most = 0;
    for (int st = 0; st < p->lay.pp; st++) {
        int64_t count;
        shard_stage_layers(cfg->num_hidden_layers, p->lay.pp, st, &first, &count);
        if (count > most)
            most = count;
    }
    double recompute = p->lay.recomputation == RECOMPUTE_FULL        ? layer.fwd
                       : p->lay.recomputation == RECOMPUTE_SELECTIVE ? layer.selective
                                                                     : 0.0;
    double per_layer = layer.fwd + layer.bwd + recompute;
    double head = head_seconds(cfg, r, p, e);
    double tick_compute = (double) most * per_layer + (p->lay.pp == 1 ? head : 0.0);
    double shared = cpu_shared(f);
    if (p->lay.pp > 1 && shared > 0) /* a waiting stage lends its core: the average stage */
        tick_compute = (double) cfg->num_hidden_layers / p->lay.pp * per_layer + head / p->lay.pp;
    else if (p->lay.pp > 1 && head > 0) /* the last stage's lm_head makes it the slowest, roughly */
        tick_compute += head / 2;

    /* Tensor parallel: 2 all-reduces of the layer output in the forward, 2 in the backward
     * (sequence-parallel: a reduce-scatter and an all-gather each, the same traffic). */
    double s = (double) r->training.block_size, b = (double) p->lay.batch_per_device, M = s * b;
    double act_bytes = M * (double) cfg->hidden_size * e;
    double tp_tick = 4.0 * (double) most *
                     cost_allreduce_seconds(act_bytes, p->lay.tp, f->device.intra_node_gbps,
                                            COST_INTRA_LATENCY_SECONDS);
    if (shared > 0 && p->lay.tp > 1) /* and the embedding's, the loss's (3) and lm_head's */
        tp_tick += (4.0 * (double) most + 4.0) * COST_CPU_SYNC_SECONDS;
    /* Stage to stage: one activation forward, its gradient backward, per micro-batch. */
    bool stages_cross_nodes = p->lay.dp * p->lay.tp >= f->devices_per_node;
    double p2p_gbps = stages_cross_nodes ? f->device.inter_node_gbps : f->device.intra_node_gbps;
    double p2p_tick = p->lay.pp > 1 ? 2.0 * act_bytes / (p2p_gbps * 1e9) : 0.0;

    double tick = tick_compute + tp_tick + p2p_tick;
    c->compute_seconds = tick_compute * p->lay.num_micro_batches;
    c->tp_comm_seconds = tp_tick * p->lay.num_micro_batches;
    c->p2p_seconds = p2p_tick * p->lay.num_micro_batches;
    /* the bubble; on shared cores the idle stages' cores go to the busy ones */
    c->bubble_seconds = tick * (p->lay.pp - 1) * (shared > 0 ? shared : 1.0);

    dp_seconds(c, cfg, r, p, &d, (double) most * layer.fwd,
               (double) most * (layer.bwd + recompute));

    /* Adam: read and write master, moments, gradient of the device's share. */
    int64_t n = trained_params(cfg, r, p);
    bool zero2 = p->lay.distribute_param || p->lay.distribute_low_prec_param;
    double share = zero2 ? (double) n / p->lay.dp : (double) n;
    c->optimizer_seconds = share * (2.0 * (d.master + d.moments) + d.grad + d.weight) /
                           (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);

    c->step_seconds = c->compute_seconds + c->tp_comm_seconds + c->p2p_seconds + c->bubble_seconds +
                      c->dp_exposed_seconds + c->optimizer_seconds;
    c->model_flops = cost_model_flops(cfg, r);
    /* the forward again: a third of a step, half of one with a frozen base */
    double recompute_flops = p->lay.recomputation == RECOMPUTE_FULL
                                 ? c->model_flops / (r->lora.enabled ? 2.0 : 3.0)
                                 : 0.0;
    c->step_flops = c->model_flops + recompute_flops;
}
