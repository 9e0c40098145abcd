/* flavor.c - the flavor catalog and the device types (see flavor.h). */
#include "flavor.h"

#include "model/bf16.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024LL * 1024LL)

/*
 * Device figures. Memory is what a program can allocate; tflops is the dense bf16 peak;
 * hbm_gbps the memory bandwidth; the rest is what training stacks sustain on the part, each
 * figure from a published measurement:
 *
 *  peaks, memory, links: the vendors' data sheets (MI250: 181 TFLOP/s bf16 per GCD, 1.6 TB/s;
 *      A100 312, 1.555 / 2.039 TB/s; H100 SXM 989, 3.35 TB/s; H200 989, 4.8 TB/s, 141 GB;
 *      MI300X 1307, 5.3 TB/s, 192 GB; B200 (HGX) 2250, 8 TB/s, 180 GB). The MI250 GCD has
 *      65,520 MiB usable: the source documents report 68,702,699,520 bytes available.
 *  intra_node_gbps, NCCL / RCCL all-reduce bus bandwidth of 8 devices for large messages
 *      (nccl-tests' busbw): 8 x A100 SXM4 NVLink3 230-250 GB/s, 8 x H100 SXM5 NVLink4
 *      460-480 (published nccl-tests reference tables; we take the lower ends, 230 and 450,
 *      H200 alike); B200 NVLink5 doubles H100's links (900 GB/s one way): 700; MI300X
 *      RCCL over 7 xGMI links: about 300 (AMD's RCCL tuning guides report 300-340); MI250:
 *      50, one 50 GB/s Infinity Fabric link per GCD pair as the KT nodes wire them.
 *  inter_node_gbps: one NIC per device, HDR InfiniBand 200 Gb/s (A100 clusters, the KT
 *      cluster's MI250s: 25 GB/s) or NDR / 400 GbE (H100, H200, MI300X, B200: 50 GB/s).
 *  gemm_efficiency: large bf16 products (m, n, k >= 4096) sustain on A100 cuBLAS 270-290 of
 *      312 TFLOP/s (0.87), H100 cuBLAS 700-760 of 989 (0.74; H200 the same silicon, its
 *      higher power limit 0.77), B200 about 1500 of 2250 (0.67), MI300X hipBLASLt 600-700 of
 *      1307 (0.5, as independent MI300X-versus-H100 training benchmarks measured), MI250
 *      rocBLAS about 125 of 181 per GCD (0.69); the values below are those fitted on the
 *      calibration runs' fitting half (bench/calibration), inside these ranges.
 *  gemm_half_dim: the products of a training step are tall (m = tokens); the rate falls for
 *      a small n or k like the tile-quantized curves of cuBLAS / hipBLASLt: half rate at 128
 *      on A100 and MI250, 256 on H100 / H200 / MI300X, 384 on B200 (faster parts need bigger
 *      tiles to fill).
 *  attn_tflops: FlashAttention-2, causal, head dim 128, forward + backward: 190 TFLOP/s on
 *      A100 (Dao 2023, figure 5), 330 on H100 with FA2 and 450-500 with FlashAttention-3 /
 *      cuDNN's fused attention (Shah et al. 2024): 450; H200 the same; B200 900 (cuDNN's
 *      published Blackwell attention figures, about twice H100); MI300X 350 (Composable
 *      Kernel FA2, ROCm's published figures). MI250: 0, unfused: the source documents' run
 *      on it needed the memory of stored attention probabilities (their OUT_OF_MEMORY report,
 *      75,051,597,828 bytes, is matched within 2% only with them).
 *  reserve_bytes: CUDA / ROCm context (0.5-0.8 GiB), cuBLAS / hipBLASLt workspaces, NCCL
 *      communicator buffers and the caching allocator's slack: 3 GiB on the 80+ GB parts,
 *      2 GiB on A100-40GB; 1 GiB on the MoAI MI250 GCD (fits the documents' report).
 *  cpu: this machine; memory is physical / devices; speed measured (flavor_cpu_tflops: one
 *      core's sgemm rate times the cores) and shared among the devices by the planner.
 *      40 GB/s of memory bandwidth and 20 GB/s between devices (memcpy between threads of one
 *      host) are a conservative share of a DDR4/DDR5 socket, used to rank cpu plans; the
 *      model's step reaches 90-97% of the sgemm rate (bench_llama), half rate at 16.
 */
#define GIB (1024 * MIB)
static const struct device_type device_types[] = {
    {.name = "mi250",
     .memory_bytes = 65520 * MIB,
     .tflops = 181.0,
     .hbm_gbps = 1600.0,
     .intra_node_gbps = 50.0,
     .inter_node_gbps = 25.0,
     .gemm_efficiency = 0.55,
     .gemm_half_dim = 128.0,
     .attn_tflops = 0.0,
     .reserve_bytes = GIB},
    {.name = "a100-40gb",
     .memory_bytes = 40 * GIB,
     .tflops = 312.0,
     .hbm_gbps = 1555.0,
     .intra_node_gbps = 230.0,
     .inter_node_gbps = 25.0,
     .gemm_efficiency = 0.71,
     .gemm_half_dim = 128.0,
     .attn_tflops = 190.0,
     .reserve_bytes = 2 * GIB},
    {.name = "a100-80gb",
     .memory_bytes = 80 * GIB,
     .tflops = 312.0,
     .hbm_gbps = 2039.0,
     .intra_node_gbps = 230.0,
     .inter_node_gbps = 25.0,
     .gemm_efficiency = 0.71,
     .gemm_half_dim = 128.0,
     .attn_tflops = 190.0,
     .reserve_bytes = 3 * GIB},
    {.name = "h100-80gb",
     .memory_bytes = 80 * GIB,
     .tflops = 989.0,
     .hbm_gbps = 3350.0,
     .intra_node_gbps = 450.0,
     .inter_node_gbps = 50.0,
     .gemm_efficiency = 0.53,
     .gemm_half_dim = 256.0,
     .attn_tflops = 330.0,
     .reserve_bytes = 3 * GIB},
    {.name = "h200",
     .memory_bytes = 141LL * 1000 * 1000 * 1000,
     .tflops = 989.0,
     .hbm_gbps = 4800.0,
     .intra_node_gbps = 450.0,
     .inter_node_gbps = 50.0,
     .gemm_efficiency = 0.55,
     .gemm_half_dim = 256.0,
     .attn_tflops = 330.0,
     .reserve_bytes = 3 * GIB},
    {.name = "b200",
     .memory_bytes = 180LL * 1000 * 1000 * 1000,
     .tflops = 2250.0,
     .hbm_gbps = 8000.0,
     .intra_node_gbps = 700.0,
     .inter_node_gbps = 50.0,
     .gemm_efficiency = 0.48,
     .gemm_half_dim = 384.0,
     .attn_tflops = 900.0,
     .reserve_bytes = 3 * GIB},
    {.name = "mi300x",
     .memory_bytes = 192 * GIB,
     .tflops = 1307.0,
     .hbm_gbps = 5300.0,
     .intra_node_gbps = 300.0,
     .inter_node_gbps = 50.0,
     .gemm_efficiency = 0.36,
     .gemm_half_dim = 256.0,
     .attn_tflops = 350.0,
     .reserve_bytes = 3 * GIB},
    {.name = "cpu",
     .hbm_gbps = 40.0,
     .intra_node_gbps = 20.0,
     .inter_node_gbps = 20.0,
     .gemm_efficiency = 0.95,
     .gemm_half_dim = 16.0},
};

/* The MoAI / KT catalog: MI250 GCDs, 8 to a node. */
static const struct {
    const char *name;
    int devices;
} catalog[] = {
    {"small.64gb", 1},         {"medium.128gb", 2},     {"large.256gb", 4},
    {"xlarge.512gb", 8},       {"1.5xlarge.768gb", 12}, {"2xlarge.1024gb", 16},
    {"3xlarge.1536gb", 24},    {"4xlarge.2048gb", 32},  {"6xlarge.3072gb", 48},
    {"8xlarge.4096gb", 64},    {"12xlarge.6144gb", 96}, {"24xlarge.12288gb", 192},
    {"48xlarge.24576gb", 384},
};

#define NCATALOG ((int) (sizeof(catalog) / sizeof(catalog[0])))
#define NDEVICES ((int) (sizeof(device_types) / sizeof(device_types[0])))

int flavor_catalog_size(void)
{
    return NCATALOG;
}

const char *flavor_catalog_name(int i)
{
    return i >= 0 && i < NCATALOG ? catalog[i].name : NULL;
}

/* The two name lists, built once (pthread_once) so that concurrent callers see them whole. */
static char catalog_names[512], device_names[256];
static pthread_once_t names_once = PTHREAD_ONCE_INIT;

static void build_names(void)
{
    size_t len = 0;
    for (int i = 0; i < NCATALOG; i++)
        len += (size_t) snprintf(catalog_names + len, sizeof(catalog_names) - len, "%s%s",
                                 i ? ", " : "", catalog[i].name);
    len = 0;
    for (int i = 0; i < NDEVICES; i++)
        len += (size_t) snprintf(device_names + len, sizeof(device_names) - len, "%s%s",
                                 i ? ", " : "", device_types[i].name);
}

const char *flavor_catalog_names(void)
{
    pthread_once(&names_once, build_names);
    return catalog_names;
}

const char *flavor_device_names(void)
{
    pthread_once(&names_once, build_names);
    return device_names;
}

const struct device_type *flavor_device_type(const char *name)
{
    for (int i = 0; i < NDEVICES; i++)
        if (strcasecmp(device_types[i].name, name) == 0)
            return &device_types[i];
    return NULL;
}

int flavor_lookup(struct flavor *f, const char *name, struct moai_err *err)
{
    for (int i = 0; i < NCATALOG; i++) {
        const char *full = catalog[i].name;
        size_t stem = (size_t) (strrchr(full, '.') - full);
        if (strcasecmp(name, full) == 0 ||
            (strlen(name) == stem && strncasecmp(name, full, stem) == 0)) {
            memset(f, 0, sizeof(*f));
            snprintf(f->name, sizeof(f->name), "%s", full);
            snprintf(f->given, sizeof(f->given), "%s", name);
            f->device = device_types[0];
            f->devices = catalog[i].devices;
            f->devices_per_node = catalog[i].devices < 8 ? catalog[i].devices : 8;
            return 0;
        }
    }
    return moai_err_set(err, MOAI_EUSAGE, "unknown flavor '%s' (valid: %s)", name,
                        flavor_catalog_names());
}

int flavor_custom(struct flavor *f, const char *dev, int n, int devices_per_node,
                  struct moai_err *err)
{
    const struct device_type *t = flavor_device_type(dev);
    if (!t)
        return moai_err_set(err, MOAI_EUSAGE, "unknown device type '%s' (valid: %s)", dev,
                            flavor_device_names());
    if (n <= 0)
        return moai_err_set(err, MOAI_EUSAGE, "device count must be positive, not %d", n);
    if (devices_per_node < 0)
        return moai_err_set(err, MOAI_EUSAGE, "devices per node must be positive, not %d",
                            devices_per_node);
    memset(f, 0, sizeof(*f));
    snprintf(f->name, sizeof(f->name), "custom");
    snprintf(f->given, sizeof(f->given), "%s x %d", t->name, n);
    f->device = *t;
    f->devices = n;
    f->devices_per_node = devices_per_node ? devices_per_node : (n < 8 ? n : 8);
    if (f->devices_per_node > n)
        f->devices_per_node = n;
    f->custom = true;
    if (f->device.memory_bytes == 0) {
        long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        f->device.memory_bytes = (int64_t) pages * page / n;
    }
    return 0;
}

const char *flavor_display_name(const struct flavor *f)
{
    return f->given[0] ? f->given : f->name;
}

static double cpu_tflops, cpu_bf16_tflops;
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

/* 384^3 is large enough for OpenBLAS to reach most of its rate on one core and small enough
 * (113 MFLOP) to cost a few milliseconds. */
static void measure_cpu(void)
{
    enum { N = 384, REPS = 5 };
    float *a = malloc(sizeof(float) * N * N), *b = malloc(sizeof(float) * N * N),
          *c = malloc(sizeof(float) * N * N);
    double t[REPS];

    /* One thread per core, as the executor runs one model thread per core: the rate of one
     * core, times the cores this process may use. */
    int threads = openblas_get_num_threads();
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    openblas_set_num_threads(1);
    cpu_tflops = 0.05; /* 50 GFLOP/s if the buffers cannot be had: one modern core */
    cpu_bf16_tflops = cpu_tflops;
    if (!a || !b || !c)
        goto out;
    for (int i = 0; i < N * N; i++) {
        a[i] = (float) (i % 7) * 0.125f;
        b[i] = (float) (i % 5) * 0.25f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N);
    for (int r = 0; r < REPS; r++) {
        double t0 = now_seconds();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c,
                    N);
        t[r] = now_seconds() - t0;
    }
    qsort(t, REPS, sizeof(double), cmp_double);
    if (t[REPS / 2] > 0)
        cpu_tflops = 2.0 * N * N * N / t[REPS / 2] * 1e-12 * cores;
    /* the same product in bf16 (model/bf16.h), where the cpu has it */
    cpu_bf16_tflops = cpu_tflops;
    if (bf16_cpu_has()) {
        bf16_gemm(false, false, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N);
        for (int r = 0; r < REPS; r++) {
            double t0 = now_seconds();
            bf16_gemm(false, false, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N);
            t[r] = now_seconds() - t0;
        }
        qsort(t, REPS, sizeof(double), cmp_double);
        if (t[REPS / 2] > 0)
            cpu_bf16_tflops = 2.0 * N * N * N / t[REPS / 2] * 1e-12 * cores;
    }
out:
    openblas_set_num_threads(threads);
    free(a);
    free(b);
    free(c);
}

double flavor_cpu_tflops(void)
{
    pthread_once(&cpu_once, measure_cpu);
    return cpu_tflops;
}

double flavor_cpu_bf16_tflops(void)
{
    pthread_once(&cpu_once, measure_cpu);
    return bf16_available() ? cpu_bf16_tflops : cpu_tflops;
}

int flavor_nodes(const struct flavor *f)
{
    return (f->devices + f->devices_per_node - 1) / f->devices_per_node;
}
