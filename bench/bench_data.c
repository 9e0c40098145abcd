/* bench_data.c - tokenizing the shipped dataset (2 threads) and reloading it from the cache;
 * Llama 3's byte-level BPE against the SentencePiece path when MOAI_BENCH_LLAMA3 names a
 * Llama 3 tokenizer.json (scripts/run-bench.sh builds one from npm's llama3-tokenizer-js). */
#include "bench_util.h"

#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "data/tokcache.h"
#include "data/tokenize.h"
#include "log.h"

#define DATASET   "datasets/debian-descriptions.jsonl.zst"
#define TOKENIZER "models/tiny-llama/tokenizer.model"
#define TEMPLATE  "[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}"
#define RESPONSE  "[/SUMMARIZE]\n"

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void) st;
    (void) flag;
    (void) ftw;
    return remove(path);
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static void die(const struct moai_err *err)
{
    fprintf(stderr, "bench_data: %s\n", err->msg);
    exit(1);
}

/* Llama 3's tokenizer.json on the same texts, block 1024, 2 threads; per CPU-second, against
 * the SentencePiece row's rate measured the same way in this run. */
static void bench_llama3(const struct dataset_texts *texts, double spm_rate)
{
    const char *path = getenv("MOAI_BENCH_LLAMA3");
    struct moai_err err = {0};
    char fig[64], note[160], target[64];
    if (!path || !*path) {
        bench_row("data: tokenize Llama 3 BPE, block 1024", "-", "-",
                  "skipped: MOAI_BENCH_LLAMA3 names no Llama 3 tokenizer.json");
        return;
    }
    double t0 = bench_now();
    struct tokenizer *tk = tokenizer_load(path, &err);
    if (!tk)
        die(&err);
    double load = bench_now() - t0, t[3], c[3];
    for (int r = 0; r < 3; r++) {
        struct tokenized ds;
        t0 = bench_now();
        double c0 = cpu_now();
        if (tokenize_texts(&ds, texts, tk, 1024, 2, &err) < 0)
            die(&err);
        t[r] = bench_now() - t0;
        c[r] = cpu_now() - c0;
        tokenized_release(&ds);
    }
    double med = bench_median(t, 3), cmed = bench_median(c, 3);
    snprintf(fig, sizeof(fig), "%.0f ex/s", (double) texts->n / med);
    snprintf(target, sizeof(target), ">= %.0f ex/CPU-s", spm_rate);
    snprintf(note, sizeof(note), "median of 3; %.0f ex per CPU-second (target: SentencePiece's); "
             "tokenizer.json loads in %.2f s", (double) texts->n / cmed, load);
    bench_row("data: tokenize Llama 3 BPE, block 1024, 2 thr", fig, target, note);
    tokenizer_free(tk);
}

int main(void)
{
    struct moai_err err = {0};
    struct dataset_texts texts;
    char fig[64], name[96], note[96], dir[] = "/tmp/bench_data_cache.XXXXXX";
    double t[3];
    log_set_level(LOG_ERROR);
    double t0 = bench_now();
    if (dataset_load(&texts, DATASET, TEMPLATE, RESPONSE, -1, &err) < 0)
        die(&err);
    snprintf(fig, sizeof(fig), "%.2f s", bench_now() - t0);
    snprintf(note, sizeof(note), "%" PRId64 " records, zstd stream + JSON + template", texts.n);
    bench_row("data: read shipped dataset", fig, "-", note);
    struct tokenizer *sp = tokenizer_load(TOKENIZER, &err);
    if (!sp || !mkdtemp(dir))
        die(&err);
    double spm_rate = 0;
    const int64_t blocks[] = {1024, 256};
    for (int b = 0; b < 2; b++) {
        int64_t T = blocks[b];
        struct tokenized ds;
        double c[3];
        for (int r = 0; r < 3; r++) {
            t0 = bench_now();
            double c0 = cpu_now();
            if (tokenize_texts(&ds, &texts, sp, T, 2, &err) < 0)
                die(&err);
            t[r] = bench_now() - t0;
            c[r] = cpu_now() - c0;
            tokenized_release(&ds);
        }
        double med = bench_median(t, 3), cmed = bench_median(c, 3);
        snprintf(name, sizeof(name), "data: tokenize, block %" PRId64 ", 2 threads", T);
        snprintf(fig, sizeof(fig), "%.0f ex/s", (double) texts.n / med);
        /* the CPU-time rate shows what two free cores give when the machine is shared */
        snprintf(note, sizeof(note), "median of 3, %.2f s wall; %.0f ex per CPU-second", med,
                 (double) texts.n / cmed);
        bench_row(name, fig, ">= 20000 ex/s", note);
        if (T == 1024)
            spm_rate = (double) texts.n / cmed;
        /* first tokcache_prepare stores the cache; the next three load it */
        if (tokcache_prepare(&ds, DATASET, TOKENIZER, TEMPLATE, RESPONSE, T, -1, dir, &err) < 0)
            die(&err);
        tokenized_release(&ds);
        for (int r = 0; r < 3; r++) {
            t0 = bench_now();
            if (tokcache_prepare(&ds, DATASET, TOKENIZER, TEMPLATE, RESPONSE, T, -1, dir, &err) < 0)
                die(&err);
            t[r] = bench_now() - t0;
            tokenized_release(&ds);
        }
        med = bench_median(t, 3);
        snprintf(name, sizeof(name), "data: cached reload, block %" PRId64, T);
        snprintf(fig, sizeof(fig), "%.3f s", med);
        snprintf(note, sizeof(note), "median of 3, hash inputs + unzstd + verify");
        bench_row(name, fig, "< 1 s", note);
    }
    nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    tokenizer_free(sp);
    bench_llama3(&texts, spm_rate);
    dataset_texts_release(&texts);
    return 0;
}
