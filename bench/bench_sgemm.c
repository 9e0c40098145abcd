/* bench_sgemm.c - the machine's own OpenBLAS sgemm rate, the yardstick of every other row; and
 * the bf16 product (model/bf16.h) on one thread beside the bf16 dot-product peak. */
#include "bench_util.h"

/* Median GFLOP/s of bf16_gemm on (n x n) by (n x n), one thread. */
static double bf16_gemm_gflops(int n, int reps)
{
    float *a = malloc(sizeof(float) * (size_t) n * (size_t) n);
    float *b = malloc(sizeof(float) * (size_t) n * (size_t) n);
    float *c = malloc(sizeof(float) * (size_t) n * (size_t) n);
    double t[64], med = 0.0;
    reps = reps > 64 ? 64 : reps;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t) n * (size_t) n; i++) {
            a[i] = (float) (i % 7) * 0.1f;
            b[i] = (float) (i % 5) * 0.1f;
        }
        bf16_gemm(false, false, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now();
            bf16_gemm(false, false, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
            t[r] = bench_now() - t0;
        }
        med = bench_median(t, reps);
    }
    free(a);
    free(b);
    free(c);
    return med > 0 ? 2.0 * n * n * n / med * 1e-9 : 0.0;
}

int main(void)
{
    char fig[64], note[128];
    openblas_set_num_threads(2);
    snprintf(fig, sizeof(fig), "%.1f GFLOP/s", bench_sgemm_gflops(1024, 1024, 1024, 9));
    bench_row("sgemm 1024^3 fp32, 2 threads (median of 9)", fig, "-", "the yardstick");
    openblas_set_num_threads(1);
    double sgemm1 = bench_sgemm_gflops(1024, 1024, 1024, 9);
    snprintf(fig, sizeof(fig), "%.1f GFLOP/s", sgemm1);
    bench_row("sgemm 1024^3 fp32, 1 thread (median of 9)", fig, "-", "");
    if (!bf16_cpu_has()) {
        bench_row("bf16_gemm 1024^3, 1 thread", "skipped", "-", "the cpu lacks AVX512_BF16");
        return 0;
    }
    double peak = bf16_dot_peak_gflops(0.3), g = bf16_gemm_gflops(1024, 9);
    snprintf(fig, sizeof(fig), "%.1f GFLOP/s", g);
    snprintf(note, sizeof(note), "%.0f%% of the bf16 dot peak %.1f; %.2fx sgemm on 1 thread",
             100.0 * g / peak, peak, g / sgemm1);
    bench_row("bf16_gemm 1024^3, 1 thread (median of 9)", fig, "-", note);
    return 0;
}
