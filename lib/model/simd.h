/* simd.h - how the hot loops of the model are vectorized (kernels.c, optim.c).
 *
 * Elementwise loops are written as blocks of SIMD_KB lanes with a fixed-count inner loop,
 * which GCC vectorizes even at -O2 (its cheap cost model refuses loops that need an epilogue),
 * with a scalar tail. SIMD_KB = 16 fills one AVX-512 register, two AVX2 or four SSE ones.
 *
 * SIMD_CLONES marks a hot function to be compiled for AVX-512, AVX2+FMA and baseline x86-64,
 * the one to run chosen at load time (GCC's target_clones; plain elsewhere). Its helpers are
 * SIMD_INLINE, forced inline: GCC does not inline a plain function into a target clone (their
 * targets differ), and a call would leave the helper's loop on the baseline ISA.
 *
 *     SIMD_INLINE void add_block(float *o, const float *a) { for (int j = 0; j < SIMD_KB; j++) o[j] += a[j]; }
 *     SIMD_CLONES void add(float *o, const float *a, int64_t n) { ... add_block ... tail ... }
 */
#ifndef MOAI_MODEL_SIMD_H
#define MOAI_MODEL_SIMD_H

#include <stdint.h>

#define SIMD_KB 16

/* Not under ThreadSanitizer: its runtime is not up yet when the ifunc resolvers run. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

#define SIMD_INLINE static inline __attribute__((always_inline))

static inline int64_t simd_min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

#endif
