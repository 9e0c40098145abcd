/* bench_util.h - shared pieces of the benchmarks: timing, medians, the machine's sgemm rate.
 *
 * Every benchmark compares its figures against OpenBLAS sgemm measured in the same run, so
 * a slower or busier machine shifts both sides together. Rows are printed in one table:
 *
 *     bench_row("planner: llama3-70b on 48xlarge", "12.3 ms", "< 100 ms", "1534 candidates");
 */
#ifndef MOAI_BENCH_UTIL_H
#define MOAI_BENCH_UTIL_H

#include "model/bf16.h"
#include "model/config.h"

#include <cblas.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

/* Median of n values (sorts them in place). */
static inline double bench_median(double *v, int n)
{
    qsort(v, (size_t) n, sizeof(double), bench_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median GFLOP/s of an (m x k) * (k x n) fp32 product over reps runs, with the OpenBLAS
 * thread count as it is set (OPENBLAS_NUM_THREADS or openblas_set_num_threads). */
static inline double bench_sgemm_gflops(int m, int n, int k, int reps)
{
    float *a = malloc(sizeof(float) * (size_t) m * (size_t) k);
    float *b = malloc(sizeof(float) * (size_t) k * (size_t) n);
    float *c = malloc(sizeof(float) * (size_t) m * (size_t) n);
    double t[64];
    if (reps > 64)
        reps = 64;
    for (size_t i = 0; i < (size_t) m * (size_t) k; i++)
        a[i] = (float) (i % 7) * 0.1f;
    for (size_t i = 0; i < (size_t) k * (size_t) n; i++)
        b[i] = (float) (i % 5) * 0.1f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f, c, n);
    for (int r = 0; r < reps; r++) {
        double t0 = bench_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, k, b, n, 0.0f,
                    c, n);
        t[r] = bench_now() - t0;
    }
    double med = bench_median(t, reps);
    free(a);
    free(b);
    free(c);
    return 2.0 * m * n * k / med * 1e-9;
}

static void *bench_bf16_peak_thread(void *arg)
{
    *(double *) arg = bf16_dot_peak_gflops(0.3);
    return NULL;
}

/* The bf16 peak of threads threads running the vdpbf16ps loop at once (bf16.h), GFLOP/s; 0
 * without AVX512_BF16. */
static inline double bench_bf16_peak_gflops(int threads)
{
    pthread_t t[16];
    double g[16] = {0}, sum = 0.0;
    int n = threads < 16 ? threads : 16, started = 0;
    for (; started < n; started++)
        if (pthread_create(&t[started], NULL, bench_bf16_peak_thread, &g[started]) != 0)
            break;
    for (int i = 0; i < started; i++) {
        pthread_join(t[i], NULL);
        sum += g[i];
    }
    return started == n ? sum : 0.0;
}

static inline void bench_row(const char *name, const char *figure, const char *target,
                             const char *note)
{
    printf("%-44s %14s %14s %s\n", name, figure, target, note);
    fflush(stdout);
}

/* The Llama config of a benchmark's shape (hidden D, L layers, H heads and as many kv heads,
 * intermediate F, vocabulary V, T positions), untied, with Llama's usual constants. */
static inline struct model_config bench_model_config(const char *name, int64_t D, int64_t L,
                                                     int64_t H, int64_t F, int64_t V, int64_t T)
{
    struct model_config c = {0};
    snprintf(c.name, sizeof(c.name), "%s", name);
    snprintf(c.architecture, sizeof(c.architecture), "LlamaForCausalLM");
    c.hidden_size = D;
    c.intermediate_size = F;
    c.num_hidden_layers = L;
    c.num_attention_heads = H;
    c.num_key_value_heads = H;
    c.head_dim = D / H;
    c.vocab_size = V;
    c.max_position_embeddings = T;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 10000.0;
    c.initializer_range = 0.02;
    c.tie_word_embeddings = false;
    c.bos_token_id = 1;
    c.eos_token_id = 2;
    c.pad_token_id = -1;
    return c;
}

#endif
