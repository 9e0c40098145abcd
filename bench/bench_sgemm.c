/* bench_sgemm.c - the machine's own OpenBLAS sgemm rate, the yardstick of every other row. */
#include "bench_util.h"

int main(void)
{
    char fig[64];
    openblas_set_num_threads(2);
    snprintf(fig, sizeof(fig), "%.1f GFLOP/s", bench_sgemm_gflops(1024, 1024, 1024, 9));
    bench_row("sgemm 1024^3 fp32, 2 threads (median of 9)", fig, "-", "the yardstick");
    openblas_set_num_threads(1);
    snprintf(fig, sizeof(fig), "%.1f GFLOP/s", bench_sgemm_gflops(1024, 1024, 1024, 9));
    bench_row("sgemm 1024^3 fp32, 1 thread (median of 9)", fig, "-", "");
    return 0;
}
