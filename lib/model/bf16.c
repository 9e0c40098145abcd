/* bf16.c - bf16 matrix products with fp32 accumulation (AVX512_BF16), see bf16.h. */
#include "model/bf16.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BF16_X86    1
#define BF16_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16")))
#else
#define BF16_X86 0
#endif

/* The register tile: MR rows of op(A) by NR columns of op(B) (two vectors of 16 fp32), 24
 * accumulators of the 32 zmm registers. The panels: at most KC values of K, K cut into equal
 * even parts (K = 288 is one panel, not 256 + 32); MC rows of op(A) (60 KiB of bf16, in L2);
 * NC columns of op(B) (480 KiB, in L2 and L3), whose NR-wide strip (20 KiB) stays in L1 while
 * the A strips stream past it. A wide NC packs op(A) fewer times when N is long (lm_head's
 * 32000 columns). */
#define MR 12
#define NR 32
#define KC 320
#define MC 96
#define NC 768

static pthread_once_t avail_once = PTHREAD_ONCE_INIT;
static bool cpu_has;
static const char *avail_reason;

static void avail_check(void)
{
    const char *env = getenv("MOAI_CPU_BF16");
#if BF16_X86
    __builtin_cpu_init();
    cpu_has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
              __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
#endif
    if (!cpu_has)
        avail_reason = "the cpu lacks AVX512_BF16";
    else if (env && strcmp(env, "0") == 0)
        avail_reason = "MOAI_CPU_BF16=0";
}

bool bf16_cpu_has(void)
{
    pthread_once(&avail_once, avail_check);
    return cpu_has;
}

bool bf16_available(void)
{
    pthread_once(&avail_once, avail_check);
    return avail_reason == NULL;
}

const char *bf16_unavailable_reason(void)
{
    pthread_once(&avail_once, avail_check);
    return avail_reason;
}

static inline int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

static void scale_c(int64_t M, int64_t N, float beta, float *C, int64_t ldc)
{
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++)
            C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
}

#if BF16_X86

static inline __mmask16 mask_first(int64_t n)
{
    return n >= 16 ? (__mmask16) 0xffff : n <= 0 ? (__mmask16) 0 : (__mmask16) ((1u << n) - 1);
}

static inline __mmask32 mask_first32(int64_t n)
{
    return n >= 32 ? (__mmask32) 0xffffffffu : n <= 0 ? (__mmask32) 0 : (__mmask32) ((1u << n) - 1);
}

/*
 * Packing. Every operand is rounded to bf16 and grouped into pairs (k, k+1) of K, the operand
 * layout of vdpbf16ps: a uint32 holds bf16 S(2p) in its low half and bf16 S(2p + 1) in its high
 * half, zero past kc (K odd) and past the valid lines of a strip. op(B) becomes strips of NR
 * columns laid out pair by pair (kp groups of NR pairs, two vectors each); op(A) becomes rows
 * of pairs, either pair by pair in strips of MR rows (A_BY_PAIR: kp groups of MR pairs) or row
 * by row (A_BY_ROW: each row's kp pairs in turn, rows KCP or KP_WIDE apart), whichever its memory order
 * makes a straight copy.
 */
#define KCP      (KC / 2)
#define KP_WIDE  384
#define PF_PAIRS 4 /* how far ahead a strip of lines is prefetched, in pairs of rows */

/* A strip whose W lines are adjacent in memory (sw = 1), S(k, w) = src[k sk + w]: two rows k,
 * k+1 of 16 lines are rounded together and their halves interleaved into 16 pairs, out[p W + w]. */
BF16_TARGET static void pack_lines(uint32_t *out, const float *src, int64_t sk, int64_t kc, int W,
                                   int wv)
{
    /* the 16-bit lanes of pairs: lane 2w takes row k's line w (lane w), 2w + 1 row k+1's */
    static const uint16_t inter[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                       21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                       11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i idx = _mm512_loadu_si512(inter);
    int64_t kp = (kc + 1) / 2;
    for (int64_t p = 0; p < kp; p++) {
        const float *r0 = src + 2 * p * sk;
        bool odd_tail = 2 * p + 1 >= kc;
        if (p + PF_PAIRS < kp) /* rows far apart: fetch a few pairs ahead */
            for (int w = 0; w < W; w += 16) {
                _mm_prefetch((const char *) (r0 + 2 * PF_PAIRS * sk + w), _MM_HINT_T0);
                _mm_prefetch((const char *) (r0 + (2 * PF_PAIRS + 1) * sk + w), _MM_HINT_T0);
            }
        for (int w = 0; w < W; w += 16) {
            __mmask16 m = mask_first(wv - w);
            __m512 a = _mm512_maskz_loadu_ps(m, r0 + w);
            __m512 b = odd_tail ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, r0 + sk + w);
            __m512i v = (__m512i) _mm512_cvtne2ps_pbh(b, a);
            v = _mm512_permutexvar_epi16(idx, v);
            _mm512_mask_storeu_epi32(out + p * W + w, mask_first(W - w), v);
        }
    }
}

/* The 16 pairs of K values [k, k + 32) of a line whose K values are adjacent in memory (zero
 * past kc): rounding 32 values at once gives them in order. */
BF16_TARGET static inline __m512i run_pairs(const float *line, int64_t k, int64_t kc)
{
    __m512 a = _mm512_maskz_loadu_ps(mask_first(kc - k), line + k);
    __m512 b = _mm512_maskz_loadu_ps(mask_first(kc - k - 16), line + k + 16);
    return (__m512i) _mm512_cvtne2ps_pbh(b, a);
}

/* Rows of op(A) whose K values are adjacent in memory, row i at src + i si: row by row, each
 * row's kp pairs at out + i rs; rows wv .. W are zero. A straight copy. */
BF16_TARGET static void pack_rows(uint32_t *out, int64_t rs, const float *src, int64_t si,
                                  int64_t kc, int W, int wv)
{
    int64_t kp = (kc + 1) / 2;
    for (int w = 0; w < W; w++) {
        uint32_t *o = out + w * rs;
        for (int64_t k = 0; k < kc; k += 32) {
            if (w + 1 < wv) { /* the next row's two lines, while this one is rounded */
                _mm_prefetch((const char *) (src + (w + 1) * si + k), _MM_HINT_T0);
                _mm_prefetch((const char *) (src + (w + 1) * si + k + 16), _MM_HINT_T0);
            }
            __m512i v = w < wv ? run_pairs(src + w * si, k, kc) : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(o + k / 2, mask_first(kp - k / 2), v);
        }
    }
}

/* pack_rows for rows already in bf16 (src16 + i si): the pairs are the memory, copied. */
BF16_TARGET static void pack_rows16(uint32_t *out, int64_t rs, const uint16_t *src, int64_t si,
                                    int64_t kc, int W, int wv)
{
    int64_t kp = (kc + 1) / 2;
    for (int w = 0; w < W; w++) {
        uint32_t *o = out + w * rs;
        for (int64_t k = 0; k < kc; k += 32) {
            if (w + 1 < wv) /* the next row's line, while this one is copied */
                _mm_prefetch((const char *) (src + (w + 1) * si + k), _MM_HINT_T0);
            __m512i v = w < wv ? _mm512_maskz_loadu_epi16(mask_first32(kc - k), src + w * si + k)
                               : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(o + k / 2, mask_first(kp - k / 2), v);
        }
    }
}

/* pack_lines for lines already in bf16 (S(k, w) = src[k sk + w]): rows k and k + 1 widened
 * to the low and high halves of 16 pairs. */
BF16_TARGET static void pack_lines16(uint32_t *out, const uint16_t *src, int64_t sk, int64_t kc,
                                     int W, int wv)
{
    int64_t kp = (kc + 1) / 2;
    for (int64_t p = 0; p < kp; p++) {
        const uint16_t *r0 = src + 2 * p * sk;
        bool odd_tail = 2 * p + 1 >= kc;
        if (p + PF_PAIRS < kp) { /* rows far apart: fetch a few pairs ahead */
            _mm_prefetch((const char *) (r0 + 2 * PF_PAIRS * sk), _MM_HINT_T0);
            _mm_prefetch((const char *) (r0 + (2 * PF_PAIRS + 1) * sk), _MM_HINT_T0);
        }
        for (int w = 0; w < W; w += 16) {
            __mmask16 m = mask_first(wv - w);
            __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + w));
            __m512i b = odd_tail ? _mm512_setzero_si512()
                                 : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + sk + w));
            __m512i v = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
            _mm512_mask_storeu_epi32(out + p * W + w, mask_first(W - w), v);
        }
    }
}

/* r[c] = column c of the 16 x 16 matrix of 32-bit lanes whose row i is r[i] (in place). */
BF16_TARGET static inline void transpose16(__m512i r[16])
{
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* in each 128-bit lane L of u[4i + j]: column 4L + j of rows 4i .. 4i + 3 */
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        __m512i a0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
        __m512i a1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        __m512i b0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        __m512i b1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(a0, b0, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(a1, b1, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
        r[12 + j] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
    }
}

/* A strip of W columns of op(B) (W a multiple of 16) whose K values are adjacent in memory,
 * column w at src + w sw: pair by pair, out[p W + w]; 16 columns by 16 pairs are rounded a
 * line at a time and transposed in registers. Columns wv .. W are zero. */
BF16_TARGET static void pack_runs(uint32_t *out, const float *src, int64_t sw, int64_t kc, int W,
                                  int wv)
{
    int64_t kp = (kc + 1) / 2;
    for (int w0 = 0; w0 < W; w0 += 16) {
        for (int64_t k = 0; k < kc; k += 32) {
            __m512i r[16];
            for (int w = 0; w < 16; w++)
                r[w] = w0 + w < wv ? run_pairs(src + (w0 + w) * sw, k, kc) : _mm512_setzero_si512();
            transpose16(r);
            int64_t np = min64(16, kp - k / 2);
            for (int64_t q = 0; q < np; q++)
                _mm512_storeu_si512(out + (k / 2 + q) * W + w0, r[q]);
        }
    }
}

/* The register tile: c (m <= MR, n <= NR) = alpha pa . pb (+ beta c on the first K panel, or
 * + c on the later ones); pa holds MR rows of kp pairs in layout lay, pb kp groups of NR pairs.
 * Each element's sum runs over the pairs in order, the same wherever the element lies. */
BF16_TARGET static inline __attribute__((always_inline)) void
tile(int64_t rs, int64_t ps, int64_t kp, const uint32_t *pa, const uint32_t *pb, float *c,
     int64_t ldc, int m, int n, float alpha, float beta, bool first)
{
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < kp; p++) {
        __m512bh b0 = (__m512bh) _mm512_load_si512(pb);
        __m512bh b1 = (__m512bh) _mm512_load_si512(pb + 16);
#pragma GCC unroll 12
        for (int r = 0; r < MR; r++) {
            __m512bh a = (__m512bh) _mm512_set1_epi32((int) pa[r * rs]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
        pa += ps;
        pb += NR;
    }
    __mmask16 m0 = mask_first(n), m1 = mask_first(n - 16);
    __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(first ? beta : 1.0f);
    bool load = !first || beta != 0.0f;
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) {
        if (r >= m)
            break;
        float *cr = c + r * ldc;
        __m512 v0 = _mm512_mul_ps(va, acc[r][0]), v1 = _mm512_mul_ps(va, acc[r][1]);
        if (load) {
            v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, cr), v0);
            v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, cr + 16), v1);
        }
        _mm512_mask_storeu_ps(cr, m0, v0);
        _mm512_mask_storeu_ps(cr + 16, m1, v1);
    }
}

/* The tile for each layout of op(A), its strides fixed at compile time (one base register
 * and constant offsets in the loop): by pair, and by row KCP or KP_WIDE pairs apart. */
typedef void tile_fn(int64_t kp, const uint32_t *pa, const uint32_t *pb, float *c, int64_t ldc,
                     int m, int n, float alpha, float beta, bool first);

BF16_TARGET static void tile_by_pair(int64_t kp, const uint32_t *pa, const uint32_t *pb, float *c,
                                     int64_t ldc, int m, int n, float alpha, float beta, bool first)
{
    tile(1, MR, kp, pa, pb, c, ldc, m, n, alpha, beta, first);
}

BF16_TARGET static void tile_by_row(int64_t kp, const uint32_t *pa, const uint32_t *pb, float *c,
                                    int64_t ldc, int m, int n, float alpha, float beta, bool first)
{
    tile(KCP, 1, kp, pa, pb, c, ldc, m, n, alpha, beta, first);
}

BF16_TARGET static void tile_by_row_wide(int64_t kp, const uint32_t *pa, const uint32_t *pb,
                                         float *c, int64_t ldc, int m, int n, float alpha,
                                         float beta, bool first)
{
    tile(KP_WIDE, 1, kp, pa, pb, c, ldc, m, n, alpha, beta, first);
}

/* One of A (fp32, rounded as it is packed) and A16 (already bf16) is given. */
BF16_TARGET static void gemm_avx512(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                                    const float *A, const uint16_t *A16, int64_t lda,
                                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    uint32_t pa[MC * KCP] __attribute__((aligned(64)));
    uint32_t pb[NC * KCP] __attribute__((aligned(64)));
    /* A long K (a weight's gradient sums over every token, lm_head's input gradient over the
     * vocabulary) takes panels of KP_WIDE pairs in the same buffers, with fewer columns of
     * op(B) and rows of op(A), so that C is re-read fewer times. The panels depend on K alone,
     * never on M or N: a block of C sums in the same order as the whole. */
    bool wide = K > KC;
    int64_t kpw = wide ? KP_WIDE : KCP, kc_max = 2 * kpw;
    int64_t nc_max = NC * KCP / kpw, mc_max = MC * KCP / kpw / MR * MR;
    tile_fn *by_row = wide ? tile_by_row_wide : tile_by_row;
    int64_t parts = (K + kc_max - 1) / kc_max, kpart = ((K + parts - 1) / parts + 1) / 2 * 2;
    for (int64_t jc = 0; jc < N; jc += nc_max) {
        int64_t nc = min64(nc_max, N - jc);
        for (int64_t pc = 0; pc < K; pc += kpart) {
            int64_t kc = min64(kpart, K - pc), kp = (kc + 1) / 2;
            /* op(B)(k, j) is B[j ldb + k] with tb, else B[k ldb + j] */
            for (int64_t jr = 0; jr < nc; jr += NR) {
                int wv = (int) min64(NR, nc - jr);
                if (tb)
                    pack_runs(pb + jr * kp, B + (jc + jr) * ldb + pc, ldb, kc, NR, wv);
                else
                    pack_lines(pb + jr * kp, B + pc * ldb + jc + jr, ldb, kc, NR, wv);
            }
            for (int64_t ic = 0; ic < M; ic += mc_max) {
                int64_t mc = min64(mc_max, M - ic);
                /* op(A)(i, k) is A[k lda + i] with ta (strips pair by pair), else A[i lda + k]
                 * (row by row) */
                for (int64_t ir = 0; ir < mc; ir += MR) {
                    int wv = (int) min64(MR, mc - ir);
                    int64_t at = ta ? pc * lda + ic + ir : (ic + ir) * lda + pc;
                    if (ta && A16)
                        pack_lines16(pa + ir * kp, A16 + at, lda, kc, MR, wv);
                    else if (ta)
                        pack_lines(pa + ir * kp, A + at, lda, kc, MR, wv);
                    else if (A16)
                        pack_rows16(pa + ir * kpw, kpw, A16 + at, lda, kc, MR, wv);
                    else
                        pack_rows(pa + ir * kpw, kpw, A + at, lda, kc, MR, wv);
                }
                for (int64_t jr = 0; jr < nc; jr += NR)
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        float *c = C + (ic + ir) * ldc + jc + jr;
                        int m = (int) min64(MR, mc - ir), n = (int) min64(NR, nc - jr);
                        if (ta)
                            tile_by_pair(kp, pa + ir * kp, pb + jr * kp, c, ldc, m, n, alpha, beta,
                                         pc == 0);
                        else
                            by_row(kp, pa + ir * kpw, pb + jr * kp, c, ldc, m, n, alpha, beta,
                                   pc == 0);
                    }
            }
        }
    }
}

/* 24 independent accumulators (distinct starts, so the compiler cannot merge them): the loop
 * runs at the instruction's throughput. */
BF16_TARGET static double dot_loop(int64_t iters, float *sink)
{
    __m512 acc[24];
    __m512bh a = (__m512bh) _mm512_set1_epi32(0x3f803f80); /* (1, 1) */
    __m512bh b = (__m512bh) _mm512_set1_epi32(0x3c003c00); /* (2^-7, 2^-7) */
#pragma GCC unroll 24
    for (int r = 0; r < 24; r++)
        acc[r] = _mm512_set1_ps((float) r);
    for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 24
        for (int r = 0; r < 24; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], a, b);
    }
    __m512 s = acc[0];
    for (int r = 1; r < 24; r++)
        s = _mm512_add_ps(s, acc[r]);
    *sink = _mm512_reduce_add_ps(s);
    return (double) iters * 24 * 16 * 2 * 2;
}

#endif /* BF16_X86 */

/* The entry of both: the empty cases, then the kernel with A or A16. */
static void gemm_entry(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                       const float *A, const uint16_t *A16, int64_t lda, const float *B,
                       int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (M <= 0 || N <= 0)
        return;
    if (K <= 0 || alpha == 0.0f) {
        scale_c(M, N, beta, C, ldc);
        return;
    }
#if BF16_X86
    gemm_avx512(ta, tb, M, N, K, alpha, A, A16, lda, B, ldb, beta, C, ldc);
#else
    (void) ta, (void) tb, (void) A, (void) A16, (void) lda, (void) B, (void) ldb;
#endif
}

void bf16_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
               int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    gemm_entry(ta, tb, M, N, K, alpha, A, NULL, lda, B, ldb, beta, C, ldc);
}

void bf16_gemm_a16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha,
                   const uint16_t *A, int64_t lda, const float *B, int64_t ldb, float beta,
                   float *C, int64_t ldc)
{
    gemm_entry(ta, tb, M, N, K, alpha, NULL, A, lda, B, ldb, beta, C, ldc);
}

#if BF16_X86
BF16_TARGET static void round_avx512(float *x, int64_t n)
{
    uint16_t *out = (uint16_t *) (void *) x;
    /* 32 values read before their 64 bytes of results are written at half their offset: the
     * writes never reach values not yet read */
    for (int64_t i = 0; i < n; i += 32) {
        __m512 a = _mm512_maskz_loadu_ps(mask_first(n - i), x + i);
        __m512 b = _mm512_maskz_loadu_ps(mask_first(n - i - 16), x + i + 16);
        __m512i v = (__m512i) _mm512_cvtne2ps_pbh(b, a);
        _mm512_mask_storeu_epi16(out + i, mask_first32(n - i), v);
    }
}
#endif

void bf16_round_in_place(float *x, int64_t n)
{
#if BF16_X86
    round_avx512(x, n);
#else
    (void) x, (void) n;
#endif
}

/* Keeps the peak loop's result alive. */
static volatile float bf16_sink;

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

double bf16_dot_peak_gflops(double seconds)
{
    if (!bf16_cpu_has())
        return 0.0;
#if BF16_X86
    double best = 0.0, t_end = now_seconds() + seconds;
    do {
        double t0 = now_seconds();
        float sink;
        double flops = dot_loop(1 << 20, &sink);
        bf16_sink = sink;
        double t = now_seconds() - t0;
        if (t > 0 && flops / t > best)
            best = flops / t;
    } while (now_seconds() < t_end);
    return best * 1e-9;
#else
    (void) seconds;
    return 0.0;
#endif
}
