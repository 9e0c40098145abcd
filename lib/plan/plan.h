/* plan.h - the Advanced Parallelization: enumerate layouts, keep those that fit, pick the
 * fastest.
 *
 * A plan is dp data-parallel replicas x pp pipeline stages x tp tensor-parallel shards, using
 * every device of the flavor (dp x pp x tp == devices: a flavor is taken whole, as the
 * platform splits a batch over all its devices), num_micro_batches micro-batches of
 * batch_per_device sequences with dp x num_micro_batches x batch_per_device == batch_size,
 * a recomputation mode and two sharding flags. Devices are numbered tp fastest, then dp,
 * then pp, so a tp group is consecutive devices inside a node and a dp group spans nodes
 * only when dp x tp exceeds a node.
 *
 * Valid candidates: tp divides the devices of a node, the attention heads and the MLP width,
 * and divides the kv heads or is a multiple of them (kv heads are then replicated);
 * pp <= layers; dp divides the batch; every (num_micro_batches, batch_per_device) pair whose
 * product is batch_size / dp; recomputation none, selective, full; sharding none,
 * distribute_param, or distribute_param + distribute_low_prec_param (the second implies the
 * first: ZeRO-3 shards what ZeRO-2 does and the weights too); with dp == 1 sharding is off
 * unless pinned. Recipe pins (parallel.*) restrict every field.
 *
 * plan_search with AP on: enumerates, sizes every candidate (mem.h), drops those over the
 * device memory, costs the rest (cost.h), picks the lowest step time (ties: less memory,
 * then fewer pipeline stages, less tp), and logs the platform's lines (log_info) and at
 * debug level the ten best and the five rejected candidates closest to fitting. With AP off:
 * the plain layout, dp over every device, the batch split evenly, one micro-batch, no
 * recomputation, no sharding.
 *
 * Errors: MOAI_EUSAGE for a pin no candidate satisfies (the message says why: "pinned tp 3
 * does not divide the 32 attention heads"), a batch the devices do not divide with AP off,
 * or no layout using every device; MOAI_EOOM when nothing fits: res is then filled for the
 * report (best: the layout closest to fitting, requested and available bytes). The result
 * owns no memory. Thread-safe apart from the log lines.
 *
 *     struct plan_result res;
 *     int rc = plan_search(&res, &cfg, &recipe, &err);
 *     if (rc == 0) use res.best; else if (rc == MOAI_EOOM) plan_report_oom(stderr, &res, ...);
 */
#ifndef MOAI_PLAN_PLAN_H
#define MOAI_PLAN_PLAN_H

#include "err.h"
#include "layout/shard.h"
#include "model/config.h"
#include "plan/cost.h"
#include "plan/mem.h"
#include "recipe.h"

#include <stdbool.h>
#include <stdint.h>

#define PLAN_RUNNERS_UP 5

struct plan {
    struct layout lay;        /* what each device runs: dp x pp x tp == devices, micro-batches */
    struct mem_breakdown mem; /* the most loaded device */
    struct cost_breakdown cost;
    double predicted_step_seconds;
    double tokens_per_second; /* batch_size x block_size / step */
    double tflops_per_device; /* model FLOPs (no recomputation) / step / devices */
};

struct plan_result {
    bool advanced;    /* AP was on */
    struct plan best; /* the selected plan; on MOAI_EOOM the closest to fitting */
    struct plan runners_up[PLAN_RUNNERS_UP]; /* the next fastest that fit */
    int n_runners_up;
    int64_t candidates;      /* valid layouts considered (1 with AP off) */
    int64_t feasible;        /* those that fit */
    double plan_ms;          /* wall time of the search */
    int64_t param_count;     /* the model's parameters */
    int64_t requested_bytes; /* on MOAI_EOOM: mem_requested_bytes of best */
    int64_t available_bytes; /* one device's memory */
};

/* Plans cfg under recipe r (its flavor, batch, block size, precision, parallel.*). Returns
 * 0 with res->best set, MOAI_EOOM with res filled for the report, or MOAI_EUSAGE. */
int plan_search(struct plan_result *res, const struct model_config *cfg, const struct recipe *r,
                struct moai_err *err);

/* Fills p's memory and cost for its layout (the fields dp ... distribute_low_prec_param). */
void plan_evaluate(struct plan *p, const struct model_config *cfg, const struct recipe *r);

/* Checks a layout against the model, flavor and batch; MOAI_EUSAGE naming the first field
 * that breaks a rule ("tp 3 does not divide the 32 attention heads"). */
int plan_check(const struct plan *p, const struct model_config *cfg, const struct recipe *r,
               struct moai_err *err);

/* The configuration line of the platform, without the log prefix:
 * "num_stages : 2, num_micro_batches : 4, batch_per_device : 1, No TP, recomputation : 0,
 * distribute_param : true, distribute_low_prec_param : false" ("No PP, ..." with one stage,
 * "TP : 4" with tp 4, recomputation 0, 1 or full(2)). Returns buf. */
char *plan_config_line(char *buf, size_t size, const struct plan *p);

/* Our own line after it: dp, memory per device against capacity, step time, throughput. */
char *plan_summary_line(char *buf, size_t size, const struct plan *p, int64_t capacity_bytes);

/* A compact one-line description for debug logs and reports:
 * "dp 16 pp 2 tp 1 mb 4x1 rc none zero-2". Returns buf. */
char *plan_brief(char *buf, size_t size, const struct plan *p);

/* "none", "selective", "full". */
const char *plan_recompute_name(enum recompute rc);

#endif
