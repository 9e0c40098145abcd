/* cost.c - the predicted step time of a parallel layout (see cost.h). */
#include "plan/cost.h"

#include "plan/mem.h"
#include "plan/plan.h"

#include <math.h>
#include <string.h>

/* Fraction of peak that large bf16 products reach on an accelerator inside a full training
 * step. Calibrated on the source documents' one self-consistent run (Llama-3-70B, batch 512 x
 * 1024 on 64 MI250 GCDs, 129 s per step): its model FLOPs, 2.26e17 per step, over 129 s and
 * 64 devices are 27 TFLOP/s per device, 15% of the 181 TFLOP/s peak, with recomputation,
 * pipeline bubble and communication inside that figure. Published MI250 and A100 training runs
 * reach 30-45% of peak in the products themselves; 0.35 is taken, and the rest of the gap is
 * left to the bubble, recomputation and exposed communication modelled below. */
#define COST_GEMM_EFFICIENCY_ACCEL 0.35

/* On the cpu device the model's training step reaches 90-97% of the machine's 1024^3 sgemm
 * rate on the tiny benchmark shape (hidden 288; bench_llama in make bench). */
#define COST_GEMM_EFFICIENCY_CPU 0.95

/* Efficiency falls for small products: x / (x + COST_GEMM_HALF_DIM) of the large-product
 * rate, x the smallest of m, n, k; half speed at 64, 94% at 1024 (the shape of measured
 * rocBLAS / cuBLAS and OpenBLAS curves). */
#define COST_GEMM_HALF_DIM 64.0
/* OpenBLAS on one core is near its full rate from about 128 up: half speed at 16. */
#define COST_GEMM_HALF_DIM_CPU 16.0

/* Fraction of HBM bandwidth that streaming kernels reach (STREAM-like copies reach 80-90%). */
#define COST_HBM_EFFICIENCY 0.8

/* Launch and synchronization overhead per kernel on an accelerator (a few microseconds). */
#define COST_KERNEL_LAUNCH_SECONDS 5e-6

/* Latency of one collective step on a link: intra-node (xGMI / NVLink) and inter-node (RDMA). */
#define COST_INTRA_LATENCY_SECONDS 5e-6
#define COST_INTER_LATENCY_SECONDS 1e-5

/* Fraction of the data-parallel communication hidden behind the backward: PyTorch DDP and
 * DeepSpeed overlap bucketed reductions with the remaining backward; about half is typical. */
#define COST_DP_OVERLAP 0.5

/* The cpu device's devices are threads sharing the machine's cores. When they outnumber the
 * cores, a collective waits until every member thread has been scheduled again, not the
 * microseconds of a link. Measured with bench_parallel (make bench) on 4 devices over 2
 * cores: the tp 2 and tp 4 plans of the tiny model took 0-20 ms per step more than their
 * compute over their ~20 tensor-parallel collectives per micro-batch; 0.5 ms each. */
#define COST_CPU_SYNC_SECONDS 5e-4

/* Elementwise work of a layer (norms, rotary, softmax, SwiGLU, residuals) streams its saved
 * activations about this many times over forward and backward. */
#define COST_ELEMENTWISE_PASSES 4.0

static bool is_cpu(const struct flavor *f)
{
    return strcmp(f->device.name, "cpu") == 0;
}

/* Cores per device when the cpu flavor's devices outnumber this machine's cores (they share
 * them), else 0. */
static double cpu_shared(const struct flavor *f)
{
    int cores = mem_cpu_threads(1);
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
    return is_cpu(f) ? COST_GEMM_EFFICIENCY_CPU : COST_GEMM_EFFICIENCY_ACCEL;
}

double cost_gemm_seconds(double m, double n, double k, double batch, int elem_bytes,
                         const struct flavor *f)
{
    double x = fmin(m, fmin(n, k));
    double half = is_cpu(f) ? COST_GEMM_HALF_DIM_CPU : COST_GEMM_HALF_DIM;
    double eff = cost_gemm_efficiency(f) * x / (x + half);
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

double cost_model_flops(const struct model_config *cfg, const struct recipe *r)
{
    double tokens = (double) r->training.batch_size * (double) r->training.block_size;
    double D = (double) cfg->hidden_size, L = (double) cfg->num_hidden_layers;
    double matmul = L * (double) (model_layer_param_count(cfg) - 2 * cfg->hidden_size) +
                    (double) cfg->vocab_size * D;
    double attention = 12.0 * L * (double) r->training.block_size *
                       (double) (cfg->num_attention_heads * cfg->head_dim);
    return 6.0 * matmul * tokens + attention * tokens;
}

/* Forward seconds of one layer on one device for one micro-batch, split into the attention
 * core (recomputed under selective recomputation) and the rest. */
static void layer_forward_seconds(const struct model_config *cfg, const struct recipe *r,
                                  const struct plan *p, int e, double *attn, double *rest)
{
    const struct flavor *f = &r->flavor;
    double s = (double) r->training.block_size, b = (double) p->batch_per_device, M = s * b;
    double D = (double) cfg->hidden_size, hd = (double) cfg->head_dim;
    double Hd = (double) mem_heads_per_device(cfg, p->tp);
    double KVd = (double) mem_kv_heads_per_device(cfg, p->tp);
    double F = (double) cfg->intermediate_size / p->tp;

    *rest = cost_gemm_seconds(M, (Hd + 2 * KVd) * hd, D, 1, e, f) /* q, k, v */
            + cost_gemm_seconds(M, D, Hd * hd, 1, e, f)           /* o */
            + cost_gemm_seconds(M, 2 * F, D, 1, e, f)             /* gate, up */
            + cost_gemm_seconds(M, D, F, 1, e, f);                /* down */
    *attn = 2.0 * cost_gemm_seconds(s, s, hd, b * Hd, e, f);      /* q k^T, then p v */
    double act = (double) mem_layer_activation_bytes(cfg, (int64_t) s, (int64_t) b, p->tp,
                                                     RECOMPUTE_NONE, e);
    *rest += COST_ELEMENTWISE_PASSES / 2 * act / (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);
}

void cost_estimate(struct cost_breakdown *c, const struct model_config *cfg, const struct recipe *r,
                   const struct plan *p)
{
    const struct flavor *f = &r->flavor;
    struct mem_dtypes d;
    double attn, rest;
    int e;

    memset(c, 0, sizeof(*c));
    mem_dtypes(&d, r);
    e = d.act;
    layer_forward_seconds(cfg, r, p, e, &attn, &rest);

    /* The slowest stage: the most layers, plus the embedding or lm_head at the ends. */
    int64_t first, most = 0;
    for (int st = 0; st < p->pp; st++) {
        int64_t count;
        mem_stage_layers(cfg->num_hidden_layers, p->pp, st, &first, &count);
        if (count > most)
            most = count;
    }
    double fwd = attn + rest;
    double recompute = p->recomputation == RECOMPUTE_FULL        ? fwd
                       : p->recomputation == RECOMPUTE_SELECTIVE ? attn
                                                                 : 0.0;
    double s = (double) r->training.block_size, b = (double) p->batch_per_device, M = s * b;
    double V = (double) mem_vocab_per_device(cfg, p->tp), D = (double) cfg->hidden_size;
    double head = 3.0 * cost_gemm_seconds(M, V, D, 1, e, f);
    double tick_compute = (double) most * (3.0 * fwd + recompute) + (p->pp == 1 ? head : 0.0);
    double shared = cpu_shared(f);
    if (p->pp > 1 && shared > 0) /* a waiting stage lends its core: the average stage */
        tick_compute =
            (double) cfg->num_hidden_layers / p->pp * (3.0 * fwd + recompute) + head / p->pp;
    else if (p->pp > 1 && head > 0) /* the last stage's lm_head makes it the slowest, roughly */
        tick_compute += head / 2;

    /* Tensor parallel: 2 all-reduces of the layer output in the forward, 2 in the backward. */
    double act_bytes = M * D * e;
    double tp_tick = 4.0 * (double) most *
                     cost_allreduce_seconds(act_bytes, p->tp, f->device.intra_node_gbps,
                                            COST_INTRA_LATENCY_SECONDS);
    if (shared > 0 && p->tp > 1) /* and the embedding's, the loss's (3) and lm_head's */
        tp_tick += (4.0 * (double) most + 4.0) * COST_CPU_SYNC_SECONDS;
    /* Stage to stage: one activation forward, its gradient backward, per micro-batch. */
    bool stages_cross_nodes = p->dp * p->tp >= f->devices_per_node;
    double p2p_gbps = stages_cross_nodes ? f->device.inter_node_gbps : f->device.intra_node_gbps;
    double p2p_tick = p->pp > 1 ? 2.0 * act_bytes / (p2p_gbps * 1e9) : 0.0;

    double tick = tick_compute + tp_tick + p2p_tick;
    c->compute_seconds = tick_compute * p->num_micro_batches;
    c->tp_comm_seconds = tp_tick * p->num_micro_batches;
    c->p2p_seconds = p2p_tick * p->num_micro_batches;
    /* the bubble; on shared cores the idle stages' cores go to the busy ones */
    c->bubble_seconds = tick * (p->pp - 1) * (shared > 0 ? shared : 1.0);

    /* Data parallel: the stage's gradients reduced over dp over the slowest link crossed. */
    int64_t n = mem_stage_params(cfg, p->pp, p->tp, 0);
    int64_t n_last = mem_stage_params(cfg, p->pp, p->tp, p->pp - 1);
    if (n_last > n)
        n = n_last;
    bool dp_crosses_nodes = p->dp * p->tp > f->devices_per_node;
    double dp_gbps = dp_crosses_nodes ? f->device.inter_node_gbps : f->device.intra_node_gbps;
    double lat = dp_crosses_nodes ? COST_INTER_LATENCY_SECONDS : COST_INTRA_LATENCY_SECONDS;
    double grad_bytes = (double) n * d.grad, weight_bytes = (double) n * d.weight;
    bool zero2 = p->distribute_param || p->distribute_low_prec_param;
    double full = cost_allreduce_seconds(grad_bytes, p->dp, dp_gbps, lat);
    if (!zero2) {
        c->dp_comm_seconds = full;
    } else {
        /* reduce-scatter of every micro-batch's gradients, all-gather of the weights once */
        double half_rs = cost_allreduce_seconds(grad_bytes, p->dp, dp_gbps, lat) / 2;
        double half_ag = cost_allreduce_seconds(weight_bytes, p->dp, dp_gbps, lat) / 2;
        c->dp_comm_seconds = half_rs * p->num_micro_batches + half_ag;
        if (p->distribute_low_prec_param) /* weights gathered for forward and backward */
            c->dp_comm_seconds += 2.0 * half_ag * p->num_micro_batches;
    }
    double backward = c->compute_seconds * 2.0 / 3.0;
    c->dp_exposed_seconds = fmax(c->dp_comm_seconds - COST_DP_OVERLAP * backward,
                                 (1.0 - COST_DP_OVERLAP) * c->dp_comm_seconds);

    /* Adam: read and write master, moments, gradient of the device's share. */
    double share = zero2 ? (double) n / p->dp : (double) n;
    c->optimizer_seconds = share * (2.0 * (d.master + d.moments) + d.grad + d.weight) /
                           (f->device.hbm_gbps * 1e9 * COST_HBM_EFFICIENCY);

    c->step_seconds = c->compute_seconds + c->tp_comm_seconds + c->p2p_seconds + c->bubble_seconds +
                      c->dp_exposed_seconds + c->optimizer_seconds;
    c->model_flops = cost_model_flops(cfg, r);
    double recompute_flops = p->recomputation == RECOMPUTE_FULL ? c->model_flops / 3.0 : 0.0;
    c->step_flops = c->model_flops + recompute_flops;
}
