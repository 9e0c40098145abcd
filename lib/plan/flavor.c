/* flavor.c - the flavor catalog and the device types (see flavor.h). */
#include "plan/flavor.h"

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
 * bandwidths are GB/s one way.
 *  mi250: one GCD (half an MI250 package). 64 GiB less 16 MiB usable: the source documents
 *         report 68,702,699,520 bytes available. 181 TFLOP/s dense bf16 per GCD (383 per
 *         package, AMD MI250 data sheet), 1.6 TB/s HBM2e per GCD, Infinity Fabric 200 GB/s
 *         between the two GCDs of a package, 50 GB/s per link to other packages; across
 *         nodes the KT cluster's 200 Gb/s InfiniBand per device pair ~ 25 GB/s.
 *  a100/h100/h200: NVIDIA data sheets (312 / 989 / 989 TFLOP/s dense bf16; NVLink 300 /
 *         450 / 450 GB/s one way; 2.0 / 3.35 / 4.8 TB/s HBM); 400 Gb/s InfiniBand per GPU.
 *  mi300x: AMD data sheet, 1307 TFLOP/s dense bf16, 5.3 TB/s, Infinity Fabric 64 GB/s per
 *         peer link x 7 ~ 448 GB/s aggregate, we take one link's 64 GB/s.
 *  cpu:   this machine; memory is physical / devices; speed measured (flavor_cpu_tflops:
 *         one core's sgemm rate times the cores) and shared among the devices by the planner.
 *         40 GB/s of memory bandwidth and 20 GB/s between devices (memcpy between threads of
 *         one host) are a conservative share of a DDR4/DDR5 socket, used to rank cpu plans.
 */
static const struct device_type device_types[] = {
    {"mi250", 65520 * MIB, 181.0, 1600.0, 50.0, 25.0, 200.0},
    {"a100-40gb", 40LL * 1024 * MIB, 312.0, 1555.0, 300.0, 25.0, 0.0},
    {"a100-80gb", 80LL * 1024 * MIB, 312.0, 2039.0, 300.0, 25.0, 0.0},
    {"h100-80gb", 80LL * 1024 * MIB, 989.0, 3350.0, 450.0, 50.0, 0.0},
    {"h200", 141LL * 1000 * 1000 * 1000, 989.0, 4800.0, 450.0, 50.0, 0.0},
    {"mi300x", 192LL * 1024 * MIB, 1307.0, 5300.0, 64.0, 50.0, 0.0},
    {"cpu", 0, 0.0, 40.0, 20.0, 20.0, 0.0},
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

const char *flavor_catalog_names(void)
{
    static char names[512];
    if (!names[0]) {
        size_t len = 0;
        for (int i = 0; i < NCATALOG; i++)
            len += (size_t) snprintf(names + len, sizeof(names) - len, "%s%s", i ? ", " : "",
                                     catalog[i].name);
    }
    return names;
}

const char *flavor_device_names(void)
{
    static char names[256];
    if (!names[0]) {
        size_t len = 0;
        for (int i = 0; i < NDEVICES; i++)
            len += (size_t) snprintf(names + len, sizeof(names) - len, "%s%s", i ? ", " : "",
                                     device_types[i].name);
    }
    return names;
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

static double cpu_tflops;
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

int flavor_nodes(const struct flavor *f)
{
    return (f->devices + f->devices_per_node - 1) / f->devices_per_node;
}
