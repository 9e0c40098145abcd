/* mem.h - the planner's memory model: what one device holds for a parallel layout.
 *
 * For a layout (struct plan: dp x pp x tp, micro-batching, recomputation, sharding) the model
 * counts, on every pipeline stage, the bytes one device of that stage holds at the peak of a
 * training step, and reports the most loaded stage:
 *
 *   weights      the working weights of the device's tp shard of the stage (bf16, or fp32),
 *                divided over dp under distribute_low_prec_param (ZeRO-3) plus the two units
 *                (layers, embedding, lm_head) gathered in flight;
 *   gradients    same size as the working weights, divided over dp under distribute_param
 *                (ZeRO-2) plus one unit's full gradient waiting for its reduce-scatter;
 *   optimizer    fp32 master weights (bf16 only) and Adam's two fp32 moments, divided over dp
 *                under distribute_param: ZeRO's 2 + 2 + 12 bytes per parameter (bf16 mixed
 *                precision), 4 + 4 + 8 (fp32);
 *   activations  what each layer saves for backward (mem_layer_activation_bytes, derived in
 *                mem.c from the tensors a Llama layer keeps, with fused attention and
 *                sequence parallelism where the device's stack has them), times the
 *                micro-batches in flight on the stage under 1F1B (min(pp - stage,
 *                num_micro_batches));
 *   logits       on the last stage: one micro-batch's logits and their gradient, fp32;
 *   communication  stage-to-stage send and receive buffers (pp > 1);
 *   reserve      the runtime's own: context, library workspaces, communicator buffers,
 *                allocator slack (mem_reserve_bytes, per device type).
 *
 * With LoRA (recipe lora.enabled) the base model is frozen: its working weights stay, it has
 * no gradients, master copy or moments; the adapters have all four, as the parameters of a
 * full fine-tuning, and each layer keeps its adapters' x A^T (and dropout(x) with dropout) for
 * backward. On the cpu the executor's arithmetic again: the base's weights (in bf16 under
 * precision bf16 but not ZeRO-3, widened unit by unit: layout/shard.h's shard_lora_base16),
 * the adapters' fp32 weights, gradients and moments and adapter scratch (exec/lora_dev.h's
 * lora_dev_bytes).
 *
 * On the cpu device the executor's own arithmetic (layout/shard.h) gives the figure: every
 * tensor fp32 whatever the recipe's precision, the arenas it allocates, no reserve; so the
 * prediction equals the measured peak of every device, for every layout. (Under bf16 the
 * products round their operands into packed panels on the computing thread's stack,
 * model/bf16.h: no arena changes.)
 *
 * Stages get contiguous, balanced layer ranges (shard_stage_layers, layout/shard.h); the embedding counts
 * toward the first stage, the final norm and lm_head toward the last, a tied embedding
 * toward both. Tensor parallelism splits heads, kv heads (replicated when tp exceeds them),
 * the MLP width and the vocabulary (padded up to a multiple of tp); norms are replicated.
 *
 * All quantities are int64_t bytes or element counts. Thread-safe, no errors (the caller
 * checks the layout is valid first); on the cpu device mem_stage sizes the executor's shard,
 * which allocates a small table (when that fails, total_bytes is INT64_MAX: never fits).
 *
 *     struct mem_breakdown m;
 *     mem_estimate(&m, &cfg, &recipe, &plan);
 *     if (m.total_bytes > recipe.flavor.device.memory_bytes) ... does not fit
 */
#ifndef MOAI_PLAN_MEM_H
#define MOAI_PLAN_MEM_H

#include "model/config.h"
#include "recipe.h"

#include <stdint.h>

struct plan;

/* One device's memory at the peak of a step, for its most loaded stage. */
struct mem_breakdown {
    int stage;      /* the most loaded pipeline stage, 0-based */
    int64_t params; /* parameters of the device's tp shard of that stage */
    int64_t weights_bytes;
    int64_t gradients_bytes;
    int64_t optimizer_bytes; /* master weights + Adam moments */
    int64_t master_bytes;    /* of which fp32 master weights */
    int64_t gathered_bytes;  /* of weights and gradients: the units ZeRO gathers in flight */
    int64_t activations_bytes;
    int64_t logits_bytes;
    int64_t communication_bytes; /* stage-to-stage send and receive buffers */
    int64_t reserve_bytes;
    int64_t total_bytes; /* the sum of the seven above */
};

/* Bytes per element of each kind of tensor, by precision and device. */
struct mem_dtypes {
    int weight;  /* working weights: 2 (bf16) or 4 */
    int grad;    /* gradients: like the working weights */
    int master;  /* fp32 master copy: 4 under bf16, 0 when the weights are fp32 */
    int moments; /* Adam's exp_avg and exp_avg_sq: 8 */
    int act;     /* activations: 2 (bf16) or 4 */
};

void mem_dtypes(struct mem_dtypes *d, const struct recipe *r);

/* Heads and kv heads on one device of a tp group (kv heads replicated when tp exceeds
 * them), and the vocabulary rows of one shard (ceil(V / tp)). */
int64_t mem_heads_per_device(const struct model_config *cfg, int tp);
int64_t mem_kv_heads_per_device(const struct model_config *cfg, int tp);
int64_t mem_vocab_per_device(const struct model_config *cfg, int tp);

/* Parameters on one device of a tp group: one transformer layer; the embedding (or the
 * lm_head: the same size); a whole stage (layers + embedding on the first, final norm and
 * lm_head on the last; a tied embedding on both when pp > 1, once when pp == 1). */
int64_t mem_layer_params(const struct model_config *cfg, int tp);
int64_t mem_embedding_params(const struct model_config *cfg, int tp);
int64_t mem_stage_params(const struct model_config *cfg, int pp, int tp, int stage);

/* LoRA (r->lora; 0 without it): the adapters' parameters of a stage on one device of a tp
 * group, and what one layer's adapters keep for backward for one micro-batch (x A^T of every
 * target, and dropout(x) with dropout), elements of act_bytes. */
int64_t mem_lora_stage_params(const struct model_config *cfg, const struct recipe *r, int pp,
                              int tp, int stage);
int64_t mem_lora_layer_activation_bytes(const struct model_config *cfg, const struct recipe *r,
                                        int64_t s, int64_t b, int tp, int act_bytes);

/* The largest single unit (a layer, the embedding, the lm_head) on the stage, per device:
 * what ZeRO-3 gathers at a time and ZeRO-2 holds as one gradient bucket. */
int64_t mem_stage_max_unit_params(const struct model_config *cfg, int pp, int tp, int stage);

/* How a device's stack keeps activations (mem_act_flags). */
enum {
    MEM_ACT_FUSED = 1,        /* fused attention: a log-sum-exp per row, no probabilities */
    MEM_ACT_SEQ_PARALLEL = 2, /* tp > 1 splits the norms' tensors along the sequence */
};

/* The flags of flavor f's device at tensor-parallel degree tp: fused attention where the
 * device type has a fused-attention rate, sequence parallelism with tp > 1 on accelerators. */
unsigned mem_act_flags(const struct flavor *f, int tp);

/* Bytes one transformer layer keeps for backward for one micro-batch of b sequences of
 * length s on one device of a tp group, elements of act_bytes, under flags (MEM_ACT_*; see
 * the derivation in mem.c). */
int64_t mem_layer_activation_bytes(const struct model_config *cfg, int64_t s, int64_t b, int tp,
                                   enum recompute rc, int act_bytes, unsigned flags);

/* The logits of one micro-batch and what the cross-entropy keeps of them, on one device of a
 * tp group (vocabulary-parallel): 4 + 4 + act_bytes (bf16) bytes each unfused, 4 + act_bytes
 * with a fused cross-entropy (flags & MEM_ACT_FUSED). */
int64_t mem_logits_bytes(const struct model_config *cfg, int64_t s, int64_t b, int tp,
                         int act_bytes, unsigned flags);

/* The runtime's reserve on one device: the device type's (runtime context, library
 * workspaces, communicator buffers, allocator slack; flavor.c gives the figures and their
 * sources); 0 on cpu, whose executor sizes its arenas exactly. */
int64_t mem_reserve_bytes(const struct flavor *f);

/* The breakdown of one stage of layout p. */
void mem_stage(struct mem_breakdown *m, const struct model_config *cfg, const struct recipe *r,
               const struct plan *p, int stage);

/* The breakdown of the most loaded stage of layout p (ties: the earlier stage). */
void mem_estimate(struct mem_breakdown *m, const struct model_config *cfg, const struct recipe *r,
                  const struct plan *p);

/*
 * The whole process on the cpu device. Beside the devices' arenas (mem_stage, exact) a run
 * holds what the executor keeps on the host (lib/exec/run.c, train.c): the fp32 model the
 * devices start from, the moments a resumed run reads, the gathered model, moments and master
 * copy the process of device 0 saves from (touched at the first save), the tokenized examples
 * and the training loop's copy of them, the worker threads (stacks and OpenBLAS packing
 * buffers), and the program with its libraries before it loads anything (runtime_bytes,
 * measured: mem_process_runtime_bytes). The peak is that sum; loading the weights adds their
 * mapped file for a moment, less than the devices' arenas that come after it.
 */
struct mem_process_in {
    int first_device, devices; /* the devices this process runs (all, without MPI) */
    int64_t examples;          /* tokenized examples (0 when not yet known: --plan-only) */
    int64_t valid_examples;    /* of which held out for validation */
    bool resume;               /* moments read from a checkpoint */
    int64_t runtime_bytes;     /* mem_process_runtime_bytes() */
};

struct mem_process {
    int64_t runtime_bytes;    /* the program and its libraries */
    int64_t devices_bytes;    /* the arenas of the process's devices */
    int64_t threads_bytes;    /* their worker threads */
    int64_t host_bytes;       /* host copies of the model (and moments when resuming) */
    int64_t checkpoint_bytes; /* the gathered model, moments and master for saving */
    int64_t data_bytes;       /* tokenized examples and the loop's copies */
    int64_t total_bytes;      /* the sum: the process's predicted peak resident size */
};

/* Returns 0, or MOAI_ENOMEM when a device's sizing table cannot be allocated (pm is then
 * incomplete). */
int mem_process(struct mem_process *pm, const struct model_config *cfg, const struct recipe *r,
                const struct plan *p, const struct mem_process_in *in);

/* This process's resident size now (VmRSS), and its peak so far (VmHWM), in bytes; 0 where
 * /proc cannot tell. */
int64_t mem_process_runtime_bytes(void);
int64_t mem_process_peak_bytes(void);

/* What an allocator reports as requested when the layout does not fit: a step allocates in
 * the order reserve, weights, activations and logits (forward), gradients (backward),
 * optimizer state (the first optimizer step, as PyTorch's AdamW and the source documents'
 * failure show), and fails at the first phase that crosses capacity; the figure is the
 * memory in use with that phase's allocation counted. Returns total_bytes when it fits. */
int64_t mem_requested_bytes(const struct mem_breakdown *m, int64_t capacity);

#endif
