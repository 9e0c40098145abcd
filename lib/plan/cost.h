/* cost.h - the planner's cost model: the predicted time of one training step of a layout.
 *
 * The step of a layout (struct plan) is modelled as a 1F1B pipeline of num_micro_batches
 * micro-batches over pp stages, each tick being the slowest stage's forward and backward of
 * one micro-batch: its matrix products (a roofline per product: compute at the device's
 * peak times COST_GEMM_EFFICIENCY, or memory traffic at its HBM bandwidth, whichever is
 * slower), its elementwise work (memory bound), its recomputation, its tensor-parallel
 * all-reduces (4 per layer per micro-batch, ring, inside a node) and its stage-to-stage
 * sends. The pipeline takes (num_micro_batches + pp - 1) ticks, the last pp - 1 being the
 * bubble. The data-parallel gradient reduction (ring all-reduce; reduce-scatter per
 * micro-batch + all-gather when sharded; ZeRO-3's weight gathers) runs over the slowest link
 * its group crosses and is partly hidden behind the backward (COST_DP_OVERLAP); the Adam
 * update is memory bound. Every constant in cost.c carries its source.
 *
 * Units are in the names: _seconds, _flops, _bytes, _gbps (GB/s, 1e9 bytes), tflops
 * (1e12 FLOP/s). Pure functions (the cpu device's speed is measured once, see
 * flavor_cpu_tflops): thread-safe, no errors.
 *
 *     struct cost_breakdown c;
 *     cost_estimate(&c, &cfg, &recipe, &plan);
 *     printf("%.2f s per step\n", c.step_seconds);
 */
#ifndef MOAI_PLAN_COST_H
#define MOAI_PLAN_COST_H

#include "model/config.h"
#include "recipe.h"

struct plan;

struct cost_breakdown {
    double compute_seconds;    /* the slowest stage's products and elementwise work over
                                   the step's micro-batches, recomputation included */
    double tp_comm_seconds;    /* its tensor-parallel all-reduces over the step */
    double p2p_seconds;        /* its stage-to-stage sends over the step */
    double bubble_seconds;     /* the pipeline's pp - 1 idle ticks */
    double dp_comm_seconds;    /* data-parallel reduction and ZeRO gathers, in full */
    double dp_exposed_seconds; /* the part of it not hidden behind compute */
    double optimizer_seconds;  /* the Adam update of the device's share */
    double step_seconds;       /* the predicted step */
    double step_flops;         /* FLOPs executed per step on all devices, recomputation in */
    double model_flops;        /* 6 x matmul params x tokens + attention, per step */
};

/* Peak dense TFLOP/s of one device: the device type's figure, or for the cpu device this
 * machine's measured sgemm rate shared among the flavor's devices. */
double cost_device_tflops(const struct flavor *f);

/* The GEMM efficiency the model reaches at peak for large products (calibrated, cost.c). */
double cost_gemm_efficiency(const struct flavor *f);

/* Seconds for `batch` products of (m x k) by (k x n) with elements of elem_bytes bytes on one
 * device: max(flops / (peak x efficiency), bytes moved / (HBM x COST_HBM_EFFICIENCY)) plus a
 * launch overhead. */
double cost_gemm_seconds(double m, double n, double k, double batch, int elem_bytes,
                         const struct flavor *f);

/* Seconds for a ring all-reduce of bytes over n devices on links of gbps GB/s:
 * 2 (n - 1) / n x bytes / bandwidth + 2 (n - 1) latencies. 0 when n == 1. Reduce-scatter
 * and all-gather each take half of it. */
double cost_allreduce_seconds(double bytes, int n, double gbps, double latency_seconds);

/* The attention cost of the recipe's rows against a sequence filling each one: with
 * dataset.packing, r->dataset.packed_attention (the mean over packed rows of the sum of their
 * examples' squared lengths over s^2) when it is known and below 1; else 1 (an unpacked row's
 * causal attention, and the worst case of a packed one: one example filling it). */
double cost_attention_fraction(const struct recipe *r);

/* Model FLOPs of one step (no recomputation): 6 x matmul parameters x tokens plus attention
 * 12 x L x s x (H x hd) per token (times cost_attention_fraction). Matmul parameters are all but the input embedding (a
 * lookup) and the norms; a tied embedding counts once, as the lm_head. */
double cost_model_flops(const struct model_config *cfg, const struct recipe *r);

/* The predicted step of layout p (its dp, pp, tp, micro-batching, recomputation, sharding). */
void cost_estimate(struct cost_breakdown *c, const struct model_config *cfg, const struct recipe *r,
                   const struct plan *p);

#endif
