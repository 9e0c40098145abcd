/* bf16.h - matrix products in bf16 with fp32 accumulation on cpus with AVX512_BF16.
 *
 * bf16_gemm computes C (M, N) = alpha op(A) op(B) + beta C, row-major, like cblas_sgemm, but
 * rounds every element of A and B to bf16 (nearest, ties to even) as it packs them and
 * multiplies the bf16 pairs with vdpbf16ps, which sums each pair's two exact products into an
 * fp32 accumulator: mixed precision as PyTorch's autocast runs a product (bf16 operands, fp32
 * accumulation and result). The operands stay fp32 in memory (the fp32 master weights and
 * activations): the bf16 copy of each operand is made in the packed panels, so it is always the
 * rounding of the current fp32 values, as a copy refreshed after every optimizer step would be.
 *
 * Blocking (Goto's): panels of K (up to 320 values, or up to 768 when K is longer), columns of
 * op(B) and rows of op(A) are packed into bf16 pairs (k, k+1) on the calling thread's stack
 * (about 540 KiB), and a 12 x 32 register tile sums them. op(A) rows whose K is contiguous are
 * copied as they lie (no transposition); op(B) columns whose K is contiguous are transposed in
 * registers. The panels of K depend on K alone: every element of C sums its products in the
 * same order wherever it lies in C, so splitting a product into blocks of rows or columns
 * changes no bit.
 *
 * Availability: bf16_cpu_has() is true when the cpu has AVX512_BF16 (checked once at run time
 * with cpuid), and bf16_gemm must only be called then; bf16_available() also needs the
 * environment not to set MOAI_CPU_BF16=0 (the fallback forced): the model asks it. Thread-safe;
 * no allocation, no errors.
 *
 *     if (bf16_available())
 *         bf16_gemm(false, true, M, N, K, 1.0f, A, K, B, K, 0.0f, C, N);
 *     else
 *         cblas_sgemm(...);
 */
#ifndef MOAI_MODEL_BF16_H
#define MOAI_MODEL_BF16_H

#include <stdbool.h>
#include <stdint.h>

/* Whether the cpu has AVX512_BF16, AVX512F, VL and BW (and the OS saves their registers). */
bool bf16_cpu_has(void);

/* Whether products should run in bf16: the cpu has AVX512_BF16 (and AVX512F, VL, BW) and MOAI_CPU_BF16
 * is not "0". Decided on the first call. */
bool bf16_available(void);

/* Why not, when bf16_available() is false: "the cpu lacks AVX512_BF16" or "MOAI_CPU_BF16=0";
 * NULL when it is available. */
const char *bf16_unavailable_reason(void);

/* C (M, N) = alpha op(A) op(B) + beta C; op(A) is (M, K): A (M, lda) or, with ta, A^T of
 * A (K, lda); op(B) is (K, N): B (K, ldb) or, with tb, B^T of B (N, ldb). With beta == 0, C is
 * only written (it may hold anything before). K == 0 scales C by beta. */
void bf16_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
               int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* bf16_gemm with A already in bf16 (lda in bf16 values): the same products and the same bits
 * as bf16_gemm with the fp32 values A was rounded from (by bf16_round_in_place, the rounding
 * of the packing), reading half the bytes. */
void bf16_gemm_a16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                   const uint16_t *A, int64_t lda, const float *B, int64_t ldb, float beta,
                   float *C, int64_t ldc);

/* Rounds x[0 .. n) to bf16 as bf16_gemm's packing does (nearest, ties to even; the
 * instruction's own treatment of subnormals) and stores the results as uint16 over the first
 * half of the same memory, ((uint16_t *) x)[i]. Only where bf16_cpu_has(). */
void bf16_round_in_place(float *x, int64_t n);

/* Peak rate of this cpu's bf16 arithmetic on one thread in GFLOP/s: the best of runs of a loop
 * of independent vdpbf16ps on registers for about seconds (2 flops per product); 0 without
 * AVX512_BF16. For benchmarks. */
double bf16_dot_peak_gflops(double seconds);

#endif
