/* flavor.h - the accelerator clusters a recipe can name: the catalog and custom mappings.
 *
 * A flavor is a device type, a device count and how many devices share a node. The catalog
 * holds the MoAI / KT flavors (MI250 GCDs, 65,520 MiB usable each, 8 to a node) and the
 * device types a custom mapping may name. Figures are per device (see flavor.c for each and
 * its source): memory, the dense bf16 peak, memory bandwidth, the collective bus bandwidth
 * inside a node and one device's network link across nodes, the sustained product and fused
 * attention rates, the runtime's reserve.
 *
 *     struct flavor f;
 *     if (flavor_lookup(&f, "4xLarge.2048GB", &err) < 0) ...   (case-insensitive)
 *     f.devices == 32, f.devices_per_node == 8
 *
 * Thread-safe: the tables are constant, the name lists and the cpu's measured speed are built
 * once under pthread_once. Errors through struct moai_err.
 */
#ifndef MOAI_FLAVOR_H
#define MOAI_FLAVOR_H

#include "err.h"

#include <stdbool.h>
#include <stdint.h>

struct device_type {
    const char *name;       /* "mi250", "h100-80gb", "cpu" */
    int64_t memory_bytes;   /* usable memory per device; 0 for cpu (computed) */
    double tflops;          /* dense bf16 peak, TFLOP/s; 0 for cpu (measured) */
    double hbm_gbps;        /* device memory bandwidth, GB/s */
    double intra_node_gbps; /* collective bus bandwidth inside a node, GB/s (NCCL's busbw:
                               a ring all-reduce of B bytes over n takes 2 (n-1)/n B / busbw) */
    double inter_node_gbps; /* network bandwidth of one device to other nodes, GB/s one way (a
                               group with g members per node crosses at g x this, at most the
                               intra-node figure) */
    double gemm_efficiency; /* sustained fraction of tflops of large bf16 products */
    double gemm_half_dim;   /* products whose smallest side is this run at half that rate */
    double attn_tflops;     /* sustained rate of fused causal attention, forward and backward
                               (FlashAttention convention); 0: unfused, products and a
                               softmax through memory, keeping the probabilities */
    int64_t reserve_bytes;  /* what the runtime holds outside the training state: context,
                               library workspaces, communicator buffers, allocator slack */
};

struct flavor {
    char name[64];             /* canonical catalog name, or "custom" */
    char given[64];            /* the name as the recipe spelled it ("4xlarge"), or "custom" */
    struct device_type device; /* with the recipe's overrides applied */
    int devices;
    int devices_per_node;
    bool custom; /* given as a mapping */
};

/* Looks a catalog name up, without regard to case, with or without its memory suffix.
 * Fails with MOAI_EUSAGE and a message listing the valid names. */
int flavor_lookup(struct flavor *f, const char *name, struct moai_err *err);

/* The device type named name, or NULL. */
const struct device_type *flavor_device_type(const char *name);

/* Sets up a custom flavor of n devices of type dev, devices_per_node per node (0: min(n, 8)).
 * For the cpu device, memory defaults to physical memory / n. Fails with MOAI_EUSAGE for an
 * unknown device type (the message lists the valid ones) or non-positive counts. */
int flavor_custom(struct flavor *f, const char *dev, int n, int devices_per_node,
                  struct moai_err *err);

/* The name to show a user: the spelling the recipe gave, else the canonical name. */
const char *flavor_display_name(const struct flavor *f);

/* This machine's fp32 matrix-product rate in TFLOP/s (OpenBLAS sgemm, 384^3, with the
 * OpenBLAS thread count as it is set; median of 5), measured on the first call and cached
 * for the life of the process. The planner divides it among a cpu flavor's devices.
 * Thread-safe. */
double flavor_cpu_tflops(void);

/* The same for bf16 products (bf16_gemm, model/bf16.h; measured with it, at the same size and
 * time) where they run: bf16_available(); else flavor_cpu_tflops(). Thread-safe. */
double flavor_cpu_bf16_tflops(void);

/* Number of nodes: ceil(devices / devices_per_node). */
int flavor_nodes(const struct flavor *f);

/* Comma-separated list of catalog names / device type names, for messages. */
const char *flavor_catalog_names(void);
const char *flavor_device_names(void);

/* Catalog access for tables and tests. */
int flavor_catalog_size(void);
const char *flavor_catalog_name(int i);

#endif
