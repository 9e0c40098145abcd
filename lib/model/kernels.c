/* kernels.c - fp32 forward/backward kernels of the Llama layers (see kernels.h). */
#include "model/kernels.h"

#include "model/simd.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* exp(x): x = n ln2 + r with |r| <= ln2/2, exp(r) by the Cephes expf polynomial, 2^n by
 * building the exponent bits. n is rounded with the 1.5 * 2^23 trick so no libm call and no
 * branch remains. */
SIMD_INLINE float expf_inline(float x0)
{
    /* Clamped so that NaN never reaches the integer conversion (undefined behaviour); NaN is
     * passed through by the select at the end. */
    float x = x0 > -87.33654f ? x0 : -87.33654f;
    x = x < 88.0f ? x : 88.0f;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    int32_t bits = ((int32_t) n + 127) * (1 << 23);
    float s;
    memcpy(&s, &bits, sizeof(s));
    return x0 != x0 ? x0 : p * s;
}

float kern_expf(float x)
{
    return expf_inline(x);
}

SIMD_INLINE float row_max(const float *x, int64_t n)
{
    float m[SIMD_KB];
    int64_t i = 0;
    for (int j = 0; j < SIMD_KB; j++)
        m[j] = -INFINITY;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    float r = -INFINITY;
    for (int j = 0; j < SIMD_KB; j++)
        r = m[j] > r ? m[j] : r;
    for (; i < n; i++)
        r = x[i] > r ? x[i] : r;
    return r;
}

/* x[i] = exp(x[i] - shift), in place; returns the sum. */
SIMD_INLINE float row_exp_inplace(float *x, float shift, int64_t n)
{
    float acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++) {
            float e = expf_inline(x[i + j] - shift);
            x[i + j] = e;
            acc[j] += e;
        }
    float s = 0.0f;
    for (; i < n; i++) {
        x[i] = expf_inline(x[i] - shift);
        s += x[i];
    }
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s;
}

/* sum of exp(x[i] - shift) */
SIMD_INLINE float row_exp_sum(const float *x, float shift, int64_t n)
{
    float acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            acc[j] += expf_inline(x[i + j] - shift);
    float s = 0.0f;
    for (; i < n; i++)
        s += expf_inline(x[i] - shift);
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s;
}

SIMD_INLINE void row_scale(float *x, float a, int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            x[i + j] *= a;
    for (; i < n; i++)
        x[i] *= a;
}

SIMD_INLINE float row_dot(const float *x, const float *y, int64_t n)
{
    float acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            acc[j] += x[i + j] * y[i + j];
    float s = 0.0f;
    for (; i < n; i++)
        s += x[i] * y[i];
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s;
}

/* d[i] += g[i] */
SIMD_INLINE void add_row(float *restrict d, const float *restrict g, int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            d[i + j] += g[i + j];
    for (; i < n; i++)
        d[i] += g[i];
}

/* Rotates the pairs (lo[i], hi[i]) by the angles of c, s: sign 1 forward, -1 backward. */
SIMD_INLINE void rotate_pairs(float *restrict lo, float *restrict hi, const float *restrict c,
                              const float *restrict s, float sign, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            float x1 = lo[i + j], x2 = hi[i + j], sn = sign * s[i + j];
            lo[i + j] = x1 * c[i + j] - x2 * sn;
            hi[i + j] = x2 * c[i + j] + x1 * sn;
        }
    for (; i < n; i++) {
        float x1 = lo[i], x2 = hi[i], sn = sign * s[i];
        lo[i] = x1 * c[i] - x2 * sn;
        hi[i] = x2 * c[i] + x1 * sn;
    }
}

/* sum of a[i] b[i] c[i] */
SIMD_INLINE float dot3(const float *restrict a, const float *restrict b, const float *restrict c,
                       int64_t n)
{
    float acc[SIMD_KB] = {0};
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            acc[j] += a[i + j] * b[i + j] * c[i + j];
    float s = 0.0f;
    for (; i < n; i++)
        s += a[i] * b[i] * c[i];
    for (int j = 0; j < SIMD_KB; j++)
        s += acc[j];
    return s;
}

/* y = w * (x * r) */
SIMD_INLINE void rms_scale_row(float *restrict y, const float *restrict x, const float *restrict w,
                               float r, int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            y[i + j] = w[i + j] * (x[i + j] * r);
    for (; i < n; i++)
        y[i] = w[i] * (x[i] * r);
}

/* dx += r (w dy - x c); dw += dy (x r) */
SIMD_INLINE void rms_back_row(float *restrict dx, float *restrict dw, const float *restrict dy,
                              const float *restrict x, const float *restrict w, float r, float c,
                              int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++) {
            dx[i + j] += r * (w[i + j] * dy[i + j] - x[i + j] * c);
            dw[i + j] += dy[i + j] * (x[i + j] * r);
        }
    for (; i < n; i++) {
        dx[i] += r * (w[i] * dy[i] - x[i] * c);
        dw[i] += dy[i] * (x[i] * r);
    }
}

/* s = p (s - dot) scale: softmax backward of one row, dP in s on entry */
SIMD_INLINE void softmax_back_row(float *restrict s, const float *restrict p, float dot,
                                  float scale, int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            s[i + j] = p[i + j] * (s[i + j] - dot) * scale;
    for (; i < n; i++)
        s[i] = p[i] * (s[i] - dot) * scale;
}

/* d = exp(x - shift) a */
SIMD_INLINE void exp_scaled_row(float *restrict d, const float *restrict x, float shift, float a,
                                int64_t n)
{
    int64_t i = 0;
    for (; i + SIMD_KB <= n; i += SIMD_KB)
        for (int j = 0; j < SIMD_KB; j++)
            d[i + j] = expf_inline(x[i + j] - shift) * a;
    for (; i < n; i++)
        d[i] = expf_inline(x[i] - shift) * a;
}

/* ---- embedding ---------------------------------------------------------------------- */

void embedding_forward(float *out, const int32_t *tokens, const float *emb, int64_t N, int64_t D)
{
    for (int64_t n = 0; n < N; n++)
        memcpy(out + n * D, emb + (int64_t) tokens[n] * D, sizeof(float) * (size_t) D);
}

SIMD_CLONES
void embedding_backward(float *demb, const float *dout, const int32_t *tokens, int64_t pad_id,
                        int64_t N, int64_t D)
{
    for (int64_t n = 0; n < N; n++) {
        if (tokens[n] == pad_id)
            continue;
        add_row(demb + (int64_t) tokens[n] * D, dout + n * D, D);
    }
}

/* ---- RMSNorm ------------------------------------------------------------------------ */

SIMD_CLONES
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, float eps,
                     int64_t N, int64_t D)
{
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D;
        float r = 1.0f / sqrtf(row_dot(x, x, D) / (float) D + eps);
        rstd[n] = r;
        rms_scale_row(out + n * D, x, weight, r, D);
    }
}

SIMD_CLONES
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                      const float *weight, const float *rstd, int64_t N, int64_t D)
{
    /* dx = r (g - xhat mean(g xhat)) with g = w dy, xhat = x r; dw = sum dy xhat */
    for (int64_t n = 0; n < N; n++) {
        const float *x = inp + n * D, *dy = dout + n * D;
        float r = rstd[n];
        float c = dot3(weight, dy, x, D) * r * r / (float) D;
        rms_back_row(dinp + n * D, dweight, dy, x, weight, r, c, D);
    }
}

/* ---- rotary embeddings -------------------------------------------------------------- */

void rope_inv_freq(float *inv_freq, int64_t hd, double theta, const struct rope_scaling *scaling)
{
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        float e = (float) (2 * i) / (float) hd;
        inv_freq[i] = 1.0f / powf((float) theta, e);
    }
    if (!scaling || scaling->type != ROPE_SCALING_LLAMA3)
        return;
    /* transformers' _compute_llama3_parameters, with its fp32 arithmetic */
    double old_ctx = (double) scaling->original_max_position_embeddings;
    float factor = (float) scaling->factor;
    float lff = (float) scaling->low_freq_factor;
    float low_wavelen = (float) (old_ctx / scaling->low_freq_factor);
    float high_wavelen = (float) (old_ctx / scaling->high_freq_factor);
    float span = (float) (scaling->high_freq_factor - scaling->low_freq_factor);
    for (int64_t i = 0; i < half; i++) {
        float f = inv_freq[i];
        float wavelen = (float) (2.0 * M_PI) / f;
        float scaled = wavelen > low_wavelen ? f / factor : f;
        bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        if (medium) {
            float smooth = ((float) old_ctx / wavelen - lff) / span;
            scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
        }
        inv_freq[i] = scaled;
    }
}

void rope_tables(float *cos_t, float *sin_t, const float *inv_freq, int64_t T, int64_t hd)
{
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < half; i++) {
            float angle = (float) t * inv_freq[i];
            cos_t[t * half + i] = (float) cos((double) angle);
            sin_t[t * half + i] = (float) sin((double) angle);
        }
}

SIMD_CLONES
void rope_forward_at(float *x, const float *cos_t, const float *sin_t, const int32_t *pos,
                     int64_t T, int64_t nh, int64_t hd, int64_t ld)
{
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        int64_t a = pos ? pos[t] : t;
        for (int64_t h = 0; h < nh; h++) {
            float *lo = x + t * ld + h * hd;
            rotate_pairs(lo, lo + half, cos_t + a * half, sin_t + a * half, 1.0f, half);
        }
    }
}

SIMD_CLONES
void rope_backward_at(float *dx, const float *cos_t, const float *sin_t, const int32_t *pos,
                      int64_t T, int64_t nh, int64_t hd, int64_t ld)
{
    int64_t half = hd / 2;
    for (int64_t t = 0; t < T; t++) {
        int64_t a = pos ? pos[t] : t;
        for (int64_t h = 0; h < nh; h++) {
            float *lo = dx + t * ld + h * hd;
            rotate_pairs(lo, lo + half, cos_t + a * half, sin_t + a * half, -1.0f, half);
        }
    }
}

void rope_forward(float *x, const float *cos_t, const float *sin_t, int64_t T, int64_t nh,
                  int64_t hd, int64_t ld)
{
    rope_forward_at(x, cos_t, sin_t, NULL, T, nh, hd, ld);
}

void rope_backward(float *dx, const float *cos_t, const float *sin_t, int64_t T, int64_t nh,
                   int64_t hd, int64_t ld)
{
    rope_backward_at(dx, cos_t, sin_t, NULL, T, nh, hd, ld);
}

/* ---- attention ---------------------------------------------------------------------- */

/* Softmax of row[0, n) in place, then zeros up to kend. The masked keys past n are set to
 * -inf first so that whole blocks of SIMD_KB lanes run vectorized (capacity: the row holds cap
 * floats); their exponentials (~1e-38 after the clamp) are far below the rounding of a sum of
 * at least 1, and are zeroed afterwards. */
SIMD_INLINE void softmax_row(float *row, int64_t n, int64_t kend, int64_t cap)
{
    int64_t nv = (n + SIMD_KB - 1) / SIMD_KB * SIMD_KB;
    if (nv > cap)
        nv = n;
    for (int64_t i = n; i < nv; i++)
        row[i] = -INFINITY;
    float m = row_max(row, n);
    float sum = row_exp_inplace(row, m, nv);
    row_scale(row, 1.0f / sum, n);
    int64_t z = kend > nv ? kend : nv;
    if (z > n)
        memset(row + n, 0, sizeof(float) * (size_t) (z - n));
}

static inline int64_t att_keys(int64_t len, int64_t T)
{
    return len < 1 ? 1 : (len > T ? T : len);
}

/* One head's causal attention over a span of n rows that are both its queries and its keys,
 * the first nkeys of them real keys: query t attends keys j <= t with j < nkeys. q, k, v rows
 * lie C floats apart, o rows ldo apart; p (n, n) rows ld apart, each with room for cap floats
 * from the span's first column. */
SIMD_INLINE void att_head_forward(float *o, int64_t ldo, float *p, int64_t ld, int64_t cap,
                                  const float *q, const float *k, const float *v, int64_t C,
                                  int64_t n, int64_t nkeys, int64_t hd, float scale)
{
    for (int64_t r0 = 0; r0 < n; r0 += KERN_ATT_BLOCK) {
        int64_t r1 = simd_min64(n, r0 + KERN_ATT_BLOCK), kend = simd_min64(r1, nkeys);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int) (r1 - r0), (int) kend, (int) hd,
                    scale, q + r0 * C, (int) C, k, (int) C, 0.0f, p + r0 * ld, (int) ld);
        for (int64_t t = r0; t < r1; t++)
            softmax_row(p + t * ld, simd_min64(t + 1, nkeys), kend, cap);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) (r1 - r0), (int) hd,
                    (int) kend, 1.0f, p + r0 * ld, (int) ld, v, (int) C, 0.0f, o + r0 * ldo,
                    (int) ldo);
    }
}

/* The backward of att_head_forward over the same span: dq (n rows, C apart) overwritten,
 * dk and dv accumulated; ds (n, n) scratch rows ld apart, like p. */
SIMD_INLINE void att_head_backward(float *dq, float *dk, float *dv, float *ds, const float *p,
                                   int64_t ld, const float *dO, int64_t ldo, const float *q,
                                   const float *k, const float *v, int64_t C, int64_t n,
                                   int64_t nkeys, int64_t hd, float scale)
{
    for (int64_t r0 = 0; r0 < n; r0 += KERN_ATT_BLOCK) {
        int64_t r1 = simd_min64(n, r0 + KERN_ATT_BLOCK), kend = simd_min64(r1, nkeys);
        /* dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) * scale */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int) (r1 - r0), (int) kend, (int) hd,
                    1.0f, dO + r0 * ldo, (int) ldo, v, (int) C, 0.0f, ds + r0 * ld, (int) ld);
        for (int64_t t = r0; t < r1; t++) {
            const float *prow = p + t * ld;
            float *srow = ds + t * ld;
            int64_t m = simd_min64(t + 1, nkeys);
            softmax_back_row(srow, prow, row_dot(prow, srow, m), scale, m);
            if (kend > m)
                memset(srow + m, 0, sizeof(float) * (size_t) (kend - m));
        }
        /* dQ = dS K */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int) (r1 - r0), (int) hd,
                    (int) kend, 1.0f, ds + r0 * ld, (int) ld, k, (int) C, 0.0f, dq + r0 * C,
                    (int) C);
    }
    /* dK += dS^T Q and dV += P^T dO by key blocks; rows before a block are masked */
    for (int64_t c0 = 0; c0 < nkeys; c0 += KERN_ATT_BLOCK) {
        int64_t c1 = simd_min64(c0 + KERN_ATT_BLOCK, nkeys);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int) (c1 - c0), (int) hd,
                    (int) (n - c0), 1.0f, ds + c0 * ld + c0, (int) ld, q + c0 * C, (int) C, 1.0f,
                    dk + c0 * C, (int) C);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int) (c1 - c0), (int) hd,
                    (int) (n - c0), 1.0f, p + c0 * ld + c0, (int) ld, dO + c0 * ldo, (int) ldo,
                    1.0f, dv + c0 * C, (int) C);
    }
}

SIMD_CLONES
void attention_forward(float *out, float *probs, const float *qkv, int64_t len, int64_t T,
                       int64_t H, int64_t KV, int64_t hd, int64_t kv0, int64_t kv1)
{
    const int64_t C = (H + 2 * KV) * hd, ldo = H * hd, G = H / KV;
    const float scale = (float) (1.0 / sqrt((double) hd));
    const int64_t nkeys = att_keys(len, T);

    for (int64_t g = kv0; g < kv1; g++) {
        const float *k = qkv + (H + g) * hd, *v = qkv + (H + KV + g) * hd;
        for (int64_t h = g * G; h < (g + 1) * G; h++)
            att_head_forward(out + h * hd, ldo, probs + h * T * T, T, T, qkv + h * hd, k, v, C, T,
                             nkeys, hd, scale);
    }
}

SIMD_CLONES
void attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                        const float *probs, int64_t len, int64_t T, int64_t H, int64_t KV,
                        int64_t hd, int64_t kv0, int64_t kv1)
{
    const int64_t C = (H + 2 * KV) * hd, ldo = H * hd, G = H / KV;
    const float scale = (float) (1.0 / sqrt((double) hd));
    const int64_t nkeys = att_keys(len, T);

    for (int64_t g = kv0; g < kv1; g++) {
        const float *k = qkv + (H + g) * hd, *v = qkv + (H + KV + g) * hd;
        float *dk = dqkv + (H + g) * hd, *dv = dqkv + (H + KV + g) * hd;
        for (int64_t t = 0; t < T; t++) {
            memset(dk + t * C, 0, sizeof(float) * (size_t) hd);
            memset(dv + t * C, 0, sizeof(float) * (size_t) hd);
        }
        for (int64_t h = g * G; h < (g + 1) * G; h++)
            att_head_backward(dqkv + h * hd, dk, dv, scratch, probs + h * T * T, T, dout + h * hd,
                              ldo, qkv + h * hd, k, v, C, T, nkeys, hd, scale);
    }
}

/* The end of the example that starts at row s0 of a packed row: the next row whose position
 * is 0, or len. */
static inline int64_t segment_end(const int32_t *pos, int64_t s0, int64_t len)
{
    int64_t s1 = s0 + 1;
    while (s1 < len && pos[s1] != 0)
        s1++;
    return s1;
}

SIMD_CLONES
void attention_forward_packed(float *out, float *probs, const float *qkv, const int32_t *pos,
                              int64_t len, int64_t T, int64_t H, int64_t KV, int64_t hd,
                              int64_t kv0, int64_t kv1)
{
    const int64_t C = (H + 2 * KV) * hd, ldo = H * hd, G = H / KV;
    const float scale = (float) (1.0 / sqrt((double) hd));
    len = len < 0 ? 0 : (len > T ? T : len);

    for (int64_t g = kv0; g < kv1; g++) {
        const float *k = qkv + (H + g) * hd, *v = qkv + (H + KV + g) * hd;
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            float *p = probs + h * T * T, *o = out + h * hd;
            for (int64_t s0 = 0, s1; s0 < len; s0 = s1) {
                s1 = segment_end(pos, s0, len);
                att_head_forward(o + s0 * ldo, ldo, p + s0 * T + s0, T, T - s0,
                                 qkv + s0 * C + h * hd, k + s0 * C, v + s0 * C, C, s1 - s0, s1 - s0,
                                 hd, scale);
            }
            for (int64_t t = len; t < T; t++)
                memset(o + t * ldo, 0, sizeof(float) * (size_t) hd);
        }
    }
}

SIMD_CLONES
void attention_backward_packed(float *dqkv, float *scratch, const float *dout, const float *qkv,
                               const float *probs, const int32_t *pos, int64_t len, int64_t T,
                               int64_t H, int64_t KV, int64_t hd, int64_t kv0, int64_t kv1)
{
    const int64_t C = (H + 2 * KV) * hd, ldo = H * hd, G = H / KV;
    const float scale = (float) (1.0 / sqrt((double) hd));
    len = len < 0 ? 0 : (len > T ? T : len);

    for (int64_t g = kv0; g < kv1; g++) {
        const float *k = qkv + (H + g) * hd, *v = qkv + (H + KV + g) * hd;
        float *dk = dqkv + (H + g) * hd, *dv = dqkv + (H + KV + g) * hd;
        for (int64_t t = 0; t < T; t++) {
            memset(dk + t * C, 0, sizeof(float) * (size_t) hd);
            memset(dv + t * C, 0, sizeof(float) * (size_t) hd);
        }
        for (int64_t h = g * G; h < (g + 1) * G; h++) {
            const float *p = probs + h * T * T;
            for (int64_t s0 = 0, s1; s0 < len; s0 = s1) {
                s1 = segment_end(pos, s0, len);
                att_head_backward(dqkv + s0 * C + h * hd, dk + s0 * C, dv + s0 * C, scratch,
                                  p + s0 * T + s0, T, dout + s0 * ldo + h * hd, ldo,
                                  qkv + s0 * C + h * hd, k + s0 * C, v + s0 * C, C, s1 - s0,
                                  s1 - s0, hd, scale);
            }
            for (int64_t t = len; t < T; t++)
                memset(dqkv + t * C + h * hd, 0, sizeof(float) * (size_t) hd);
        }
    }
}

/* ---- SwiGLU MLP --------------------------------------------------------------------- */

/* e[j] = exp(-g[j]) for one block: kept apart from the divisions that use it, so the clamps
 * inside the exponential stay selects and the block vectorizes. */
SIMD_INLINE void exp_neg_block(float *restrict e, const float *restrict g)
{
    for (int j = 0; j < SIMD_KB; j++)
        e[j] = expf_inline(-g[j]);
}

SIMD_CLONES
void swiglu_forward(float *h, const float *gu, int64_t N, int64_t F)
{
    for (int64_t n = 0; n < N; n++) {
        const float *restrict g = gu + n * 2 * F, *restrict u = g + F;
        float *restrict y = h + n * F;
        float e[SIMD_KB];
        int64_t i = 0;
        for (; i + SIMD_KB <= F; i += SIMD_KB) {
            exp_neg_block(e, g + i);
            for (int j = 0; j < SIMD_KB; j++)
                y[i + j] = g[i + j] / (1.0f + e[j]) * u[i + j];
        }
        for (; i < F; i++)
            y[i] = g[i] / (1.0f + expf_inline(-g[i])) * u[i];
    }
}

SIMD_CLONES
void swiglu_backward(float *dgu, const float *dh, const float *gu, int64_t N, int64_t F)
{
    for (int64_t n = 0; n < N; n++) {
        const float *restrict g = gu + n * 2 * F, *restrict u = g + F;
        const float *restrict dy = dh + n * F;
        float *restrict dg = dgu + n * 2 * F, *restrict du = dg + F;
        float e[SIMD_KB];
        int64_t i = 0;
        for (; i + SIMD_KB <= F; i += SIMD_KB) {
            exp_neg_block(e, g + i);
            for (int j = 0; j < SIMD_KB; j++) {
                float x = g[i + j];
                float s = 1.0f / (1.0f + e[j]);
                du[i + j] = dy[i + j] * (x * s);
                dg[i + j] = dy[i + j] * u[i + j] * s * (1.0f + x * (1.0f - s));
            }
        }
        for (; i < F; i++) {
            float x = g[i];
            float s = 1.0f / (1.0f + expf_inline(-x));
            du[i] = dy[i] * (x * s);
            dg[i] = dy[i] * u[i] * s * (1.0f + x * (1.0f - s));
        }
    }
}

/* ---- cross-entropy ------------------------------------------------------------------ */

SIMD_CLONES
void crossentropy_forward(float *losses, float *lse, const float *logits, const int32_t *targets,
                          int64_t N, int64_t V)
{
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * V;
        float m = row_max(x, V);
        float l = m + logf(row_exp_sum(x, m, V));
        lse[n] = l;
        losses[n] = targets[n] == KERN_IGNORE_INDEX ? 0.0f : l - x[targets[n]];
    }
}

/* Vocabulary-parallel cross-entropy, one shard of rows [v0, v0 + V): each row's log-sum-exp
 * over the shard, and the logit of its target when the shard holds it (else 0). */
SIMD_CLONES
void crossentropy_shard_lse(float *lse, float *tlogit, const float *logits, const int32_t *targets,
                            int64_t v0, int64_t N, int64_t V)
{
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * V;
        float m = row_max(x, V);
        lse[n] = m + logf(row_exp_sum(x, m, V));
        int64_t t = (int64_t) targets[n] - v0;
        tlogit[n] = targets[n] != KERN_IGNORE_INDEX && t >= 0 && t < V ? x[t] : 0.0f;
    }
}

SIMD_CLONES
void crossentropy_shard_backward(float *logits, const float *lse, const int32_t *targets,
                                 int64_t v0, float dloss, int64_t N, int64_t V)
{
    for (int64_t n = 0; n < N; n++) {
        float *x = logits + n * V;
        row_exp_inplace(x, lse[n], V);
        row_scale(x, dloss, V);
        int64_t t = (int64_t) targets[n] - v0;
        if (targets[n] != KERN_IGNORE_INDEX && t >= 0 && t < V)
            x[t] -= dloss;
    }
}

SIMD_CLONES
void crossentropy_fused(float *losses, float *logits, const int32_t *targets, float dloss,
                        int64_t N, int64_t V)
{
    for (int64_t n = 0; n < N; n++) {
        float *x = logits + n * V;
        int32_t t = targets[n];
        if (t == KERN_IGNORE_INDEX) {
            losses[n] = 0.0f;
            memset(x, 0, sizeof(float) * (size_t) V);
            continue;
        }
        float xt = x[t];
        float m = row_max(x, V);
        float sum = row_exp_inplace(x, m, V);
        losses[n] = m + logf(sum) - xt;
        row_scale(x, dloss / sum, V);
        x[t] -= dloss;
    }
}
