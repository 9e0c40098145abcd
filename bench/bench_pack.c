/* bench_pack.c - packed rows' attention costs the sum of its examples' squares: one row of
 * 1024 tokens as one example against the same row packed with 8 examples of 128, forward and
 * backward, beside the ratio of the query-key products each computes. */
#include "bench_util.h"

#include "model/kernels.h"

#include <stdlib.h>
#include <string.h>

enum { T = 1024, H = 8, KV = 4, HD = 32, EXAMPLES = 8, REPS = 7 };

/* Query-key products of causal attention over n rows in KERN_ATT_BLOCK row blocks (each block
 * of rows runs over the keys up to its end). */
static double block_products(int64_t n)
{
    double p = 0;
    for (int64_t r0 = 0; r0 < n; r0 += KERN_ATT_BLOCK) {
        int64_t r1 = r0 + KERN_ATT_BLOCK < n ? r0 + KERN_ATT_BLOCK : n;
        p += (double) (r1 - r0) * (double) r1;
    }
    return p;
}

int main(void)
{
    const int64_t C = (H + 2 * KV) * HD;
    float *qkv = malloc(sizeof(float) * T * C), *out = malloc(sizeof(float) * T * H * HD);
    float *probs = malloc(sizeof(float) * H * T * T), *dqkv = malloc(sizeof(float) * T * C);
    float *scratch = malloc(sizeof(float) * T * T);
    int32_t *pos = malloc(sizeof(int32_t) * T);
    if (!qkv || !out || !probs || !dqkv || !scratch || !pos) {
        fprintf(stderr, "bench_pack: out of memory\n");
        return 1;
    }
    uint64_t s = 1;
    for (int64_t i = 0; i < T * C; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        qkv[i] = (float) ((double) (s >> 40) / (double) (1 << 24)) - 0.5f;
    }
    for (int64_t t = 0; t < T; t++)
        pos[t] = (int32_t) (t % (T / EXAMPLES));
    double whole[REPS], packed[REPS];
    for (int k = 0; k < REPS; k++) {
        double t0 = bench_now();
        attention_forward(out, probs, qkv, T, T, H, KV, HD, 0, KV);
        attention_backward(dqkv, scratch, out, qkv, probs, T, T, H, KV, HD, 0, KV);
        double t1 = bench_now();
        attention_forward_packed(out, probs, qkv, pos, T, T, H, KV, HD, 0, KV);
        attention_backward_packed(dqkv, scratch, out, qkv, probs, pos, T, T, H, KV, HD, 0, KV);
        whole[k] = t1 - t0;
        packed[k] = bench_now() - t1;
    }
    double mw = bench_median(whole, REPS), mp = bench_median(packed, REPS);
    double ideal = block_products(T) / (EXAMPLES * block_products(T / EXAMPLES));
    char fig[64], note[200];
    snprintf(fig, sizeof(fig), "%.2fx", mw / mp);
    snprintf(note, sizeof(note),
             "1 x 1024 tokens %.1f ms, 8 x 128 packed %.1f ms (medians of %d, fwd + bwd, 8 heads "
             "of 32); products %.2fx fewer",
             1e3 * mw, 1e3 * mp, REPS, ideal);
    bench_row("attention: a packed row against one example", fig, ">= 4.00x", note);
    free(qkv);
    free(out);
    free(probs);
    free(dqkv);
    free(scratch);
    free(pos);
    return 0;
}
