/* test_bf16.c - the bf16 matrix product against references in double, on odd shapes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/bf16.h"
#include "model/safetensors.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A guard value around and between the rows of C: bf16_gemm must not write it. */
#define GUARD 12345.0f

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static float uniform(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float) ((double) (rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static double rounded(float x)
{
    return (double) st_f32_from_bf16(st_bf16_from_f32(x));
}

struct product {
    bool ta, tb;
    int64_t M, N, K, lda, ldb, ldc;
    float alpha, beta;
    float *A, *B, *C, *C0;
};

/* Operands with leading dimensions 3 past the rows they hold (strides that are no multiple of
 * a vector), uniform in [-1, 1); C the same, or NaN where beta == 0 (it must not be read). */
static void product_make(struct product *p, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
                         float alpha, float beta)
{
    memset(p, 0, sizeof(*p));
    p->ta = ta, p->tb = tb, p->M = M, p->N = N, p->K = K, p->alpha = alpha, p->beta = beta;
    int64_t arows = ta ? K : M, acols = ta ? M : K, brows = tb ? N : K, bcols = tb ? K : N;
    p->lda = acols + 3, p->ldb = bcols + 3, p->ldc = N + 3;
    p->A = malloc(sizeof(float) * (size_t) (arows * p->lda + 1));
    p->B = malloc(sizeof(float) * (size_t) (brows * p->ldb + 1));
    p->C = malloc(sizeof(float) * (size_t) (M * p->ldc));
    p->C0 = malloc(sizeof(float) * (size_t) (M * p->ldc));
    assert_non_null(p->A);
    assert_non_null(p->B);
    assert_non_null(p->C);
    assert_non_null(p->C0);
    for (int64_t i = 0; i < arows * p->lda + 1; i++)
        p->A[i] = uniform();
    for (int64_t i = 0; i < brows * p->ldb + 1; i++)
        p->B[i] = uniform();
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < p->ldc; j++)
            p->C0[i * p->ldc + j] = j >= N ? GUARD : beta == 0.0f ? NAN : uniform();
    memcpy(p->C, p->C0, sizeof(float) * (size_t) (M * p->ldc));
}

static void product_free(struct product *p)
{
    free(p->A);
    free(p->B);
    free(p->C);
    free(p->C0);
}

static double op_a(const struct product *p, int64_t i, int64_t k)
{
    return p->ta ? p->A[k * p->lda + i] : p->A[i * p->lda + k];
}

static double op_b(const struct product *p, int64_t k, int64_t j)
{
    return p->tb ? p->B[j * p->ldb + k] : p->B[k * p->ldb + j];
}

/*
 * Each element against two references in double. With the operands rounded to bf16 first (as
 * the kernel does), the products are exact and only the fp32 sums round: within
 * (K + 8) 2^-24 sum |a b| (a sum of K terms, one per K panel, alpha and beta C). With the fp32 operands,
 * bf16's rounding (2^-8 relative each: 8 significant bits) adds
 * 2^-7 sum |a b|: the deviation autocast accepts.
 */
static void product_check(const struct product *p)
{
    for (int64_t i = 0; i < p->M; i++) {
        for (int64_t j = 0; j < p->ldc; j++) {
            float got = p->C[i * p->ldc + j];
            if (j >= p->N) {
                assert_true(got == GUARD);
                continue;
            }
            double exact = 0.0, exact16 = 0.0, mag = 0.0;
            for (int64_t k = 0; k < p->K; k++) {
                double a = op_a(p, i, k), b = op_b(p, k, j);
                exact += a * b;
                exact16 += rounded((float) a) * rounded((float) b);
                mag += fabs(a * b);
            }
            double c0 = p->beta == 0.0f ? 0.0 : (double) p->beta * p->C0[i * p->ldc + j];
            double scale = fabs((double) p->alpha) * mag + fabs(c0);
            double tol16 = (double) (p->K + 8) * ldexp(1.0, -24) * scale;
            double tol32 = tol16 + ldexp(1.0, -7) * 1.01 * fabs((double) p->alpha) * mag;
            double want16 = (double) p->alpha * exact16 + c0, want = p->alpha * exact + c0;
            if (!(fabs(got - want16) <= tol16) || !(fabs(got - want) <= tol32))
                fail_msg("ta %d tb %d M %lld N %lld K %lld: C[%lld][%lld] = %.9g, bf16 reference "
                         "%.9g (tolerance %.3g), fp32 reference %.9g (tolerance %.3g)",
                         p->ta, p->tb, (long long) p->M, (long long) p->N, (long long) p->K,
                         (long long) i, (long long) j, got, want16, tol16, want, tol32);
        }
    }
}

static void run_case(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, float beta)
{
    struct product p;
    product_make(&p, ta, tb, M, N, K, alpha, beta);
    bf16_gemm(ta, tb, M, N, K, alpha, p.A, p.lda, p.B, p.ldb, beta, p.C, p.ldc);
    product_check(&p);
    product_free(&p);
}

/* Shapes around the kernel's sizes: the 12 x 32 tile, 16-wide vectors, 32-value runs and the
 * panels (96 rows, 768 columns, K up to 320 in one panel; a longer K in parts of at most 768
 * with 36 rows, 320 columns); one row, one column, K of 1, odd K, K over two and three panels
 * (odd parts too), N over two and three panels. */
static const int64_t shapes[][3] = {
    {1, 1, 1},    {1, 37, 5},    {13, 1, 33},   {12, 32, 2},   {11, 31, 31},    {25, 17, 3},
    {1, 300, 64}, {40, 1, 257},  {97, 33, 320}, {12, 513, 17}, {26, 65, 515},   {100, 390, 300},
    {9, 45, 641}, {3, 385, 700}, {5, 800, 40},  {2, 1601, 9},  {61, 330, 1700}, {37, 20, 769},
};

static void test_bf16_gemm_odd_shapes(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int t = 0; t < 4; t++)
            run_case(t & 1, t & 2, shapes[s][0], shapes[s][1], shapes[s][2], 1.0f, 0.0f);
}

static void test_bf16_gemm_alpha_beta(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    static const float ab[][2] = {{1.0f, 1.0f}, {-0.25f, 0.5f}, {2.0f, 0.0f}};
    for (size_t i = 0; i < sizeof(ab) / sizeof(ab[0]); i++)
        for (int t = 0; t < 4; t++) {
            run_case(t & 1, t & 2, 29, 45, 300, ab[i][0], ab[i][1]);
            run_case(t & 1, t & 2, 1, 3, 7, ab[i][0], ab[i][1]);
        }
}

/* K = 0 (or alpha = 0) leaves beta C, and beta = 0 then writes zeros over whatever C held. */
static void test_bf16_gemm_empty_k(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    float A[1] = {1.0f}, B[1] = {1.0f}, C[6] = {1, 2, 3, 4, 5, 6}, D[6] = {NAN, NAN, 0, 0, 0, 0};
    bf16_gemm(false, false, 2, 3, 0, 1.0f, A, 1, B, 3, 0.5f, C, 3);
    for (int i = 0; i < 6; i++)
        assert_true(C[i] == 0.5f * (float) (i + 1));
    bf16_gemm(false, false, 1, 2, 0, 1.0f, A, 1, B, 2, 0.0f, D, 2);
    assert_true(D[0] == 0.0f && D[1] == 0.0f);
}

/* A product split into blocks of rows or of columns (as the model's thread pool splits it)
 * equals the whole bit for bit: each element sums the same pairs in the same order, over the
 * same panels of K (K spans three). */
static void test_bf16_gemm_blocks_are_bit_identical(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    for (int t = 0; t < 4; t++) {
        bool ta = t & 1, tb = t & 2;
        struct product p;
        product_make(&p, ta, tb, 70, 90, 1700, 1.0f, 1.0f);
        float *whole = malloc(sizeof(float) * (size_t) (p.M * p.ldc));
        assert_non_null(whole);
        bf16_gemm(ta, tb, p.M, p.N, p.K, 1.0f, p.A, p.lda, p.B, p.ldb, 1.0f, p.C, p.ldc);
        memcpy(whole, p.C, sizeof(float) * (size_t) (p.M * p.ldc));
        /* rows 0..16, 17..69; then columns 0..47, 48..89 (odd cuts, not on a tile) */
        for (int split = 0; split < 2; split++) {
            memcpy(p.C, p.C0, sizeof(float) * (size_t) (p.M * p.ldc));
            int64_t cut = split == 0 ? 17 : 48;
            for (int h = 0; h < 2; h++) {
                int64_t i0 = h == 0 ? 0 : cut, n = h == 0 ? cut : (split == 0 ? p.M : p.N) - cut;
                if (split == 0)
                    bf16_gemm(ta, tb, n, p.N, p.K, 1.0f, p.A + (ta ? i0 : i0 * p.lda), p.lda, p.B,
                              p.ldb, 1.0f, p.C + i0 * p.ldc, p.ldc);
                else
                    bf16_gemm(ta, tb, p.M, n, p.K, 1.0f, p.A, p.lda, p.B + (tb ? i0 * p.ldb : i0),
                              p.ldb, 1.0f, p.C + i0, p.ldc);
            }
            assert_memory_equal(p.C, whole, sizeof(float) * (size_t) (p.M * p.ldc));
        }
        free(whole);
        product_free(&p);
    }
}

/* A given in bf16 (rounded in place by bf16_round_in_place) gives bf16_gemm's bits, for every
 * shape and transposition; subnormal values included (both round them alike). */
static void test_bf16_gemm_a16_matches(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int t = 0; t < 4; t++) {
            bool ta = t & 1, tb = t & 2;
            int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            struct product p;
            product_make(&p, ta, tb, M, N, K, 0.5f, 1.0f);
            p.A[0] = 1e-40f;
            p.A[p.lda - 1] = -3e-39f;
            size_t na = (size_t) ((ta ? K : M) * p.lda + 1);
            float *a16 = malloc(sizeof(float) * na),
                  *want = malloc(sizeof(float) * (size_t) (M * p.ldc));
            assert_non_null(a16);
            assert_non_null(want);
            memcpy(a16, p.A, sizeof(float) * na);
            bf16_round_in_place(a16, (int64_t) na);
            bf16_gemm(ta, tb, M, N, K, 0.5f, p.A, p.lda, p.B, p.ldb, 1.0f, p.C, p.ldc);
            memcpy(want, p.C, sizeof(float) * (size_t) (M * p.ldc));
            memcpy(p.C, p.C0, sizeof(float) * (size_t) (M * p.ldc));
            bf16_gemm_a16(ta, tb, M, N, K, 0.5f, (const uint16_t *) (void *) a16, p.lda, p.B, p.ldb,
                          1.0f, p.C, p.ldc);
            assert_memory_equal(p.C, want, sizeof(float) * (size_t) (M * p.ldc));
            free(a16);
            free(want);
            product_free(&p);
        }
}

/* bf16_round_in_place rounds to nearest, ties to even, as st_bf16_from_f32 does (normal
 * values), into the first half of the buffer, whatever the length's remainder by 32. */
static void test_bf16_round_in_place(void **state)
{
    (void) state;
    if (!bf16_cpu_has())
        skip();
    static const int64_t lengths[] = {1, 15, 31, 32, 33, 100};
    for (size_t l = 0; l < sizeof(lengths) / sizeof(lengths[0]); l++) {
        int64_t n = lengths[l];
        float *x = malloc(sizeof(float) * (size_t) n);
        uint16_t *want = malloc(sizeof(uint16_t) * (size_t) n);
        assert_non_null(x);
        assert_non_null(want);
        for (int64_t i = 0; i < n; i++) {
            x[i] = uniform() * 1000.0f;
            if (i == 3) /* a tie: the low 16 bits exactly half way, the kept bit odd */
                memcpy(&x[i], &(uint32_t){0x3f818000u}, sizeof(float));
            want[i] = st_bf16_from_f32(x[i]);
        }
        bf16_round_in_place(x, n);
        assert_memory_equal(x, want, sizeof(uint16_t) * (size_t) n);
        free(x);
        free(want);
    }
}

/* bf16_available follows the cpu and MOAI_CPU_BF16 (decided once: this process's view). */
static void test_bf16_available_follows_cpu_and_env(void **state)
{
    (void) state;
    const char *env = getenv("MOAI_CPU_BF16");
    bool forced_off = env && strcmp(env, "0") == 0;
    assert_int_equal(bf16_available(), bf16_cpu_has() && !forced_off);
    if (!bf16_cpu_has())
        assert_string_equal(bf16_unavailable_reason(), "the cpu lacks AVX512_BF16");
    else if (forced_off)
        assert_string_equal(bf16_unavailable_reason(), "MOAI_CPU_BF16=0");
    else
        assert_null(bf16_unavailable_reason());
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_gemm_odd_shapes),
        cmocka_unit_test(test_bf16_gemm_alpha_beta),
        cmocka_unit_test(test_bf16_gemm_empty_k),
        cmocka_unit_test(test_bf16_gemm_blocks_are_bit_identical),
        cmocka_unit_test(test_bf16_gemm_a16_matches),
        cmocka_unit_test(test_bf16_round_in_place),
        cmocka_unit_test(test_bf16_available_follows_cpu_and_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
