/* tokenize.c - records to fixed-length token, label and length arrays, on several threads. */
#include "data/tokenize.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "progress.h"

struct tok_job {
    struct tokenized *ds;
    const struct dataset_texts *texts;
    const struct tokenizer *tk;
    uint32_t *starts; /* (T) scratch: where each id starts */
    int64_t begin, end;
    _Atomic int64_t done; /* rows finished, for the progress bar */
    _Atomic int finished; /* set last by the worker */
    int64_t truncated;
    int rc;
    struct moai_err err;
};

/* True when the bytes [a, z) overlap one of the n ranges r[2k], r[2k + 1] (an empty token,
 * a == z, counts where it stands). */
static bool in_ranges(const size_t *r, size_t n, size_t a, size_t z)
{
    if (z <= a)
        z = a + 1;
    for (size_t k = 0; k < n; k++)
        if (a < r[2 * k + 1] && z > r[2 * k])
            return true;
    return false;
}

/* Row i: [BOS] + ids + [EOS] (no second EOS when the text ends with it), cut to T, padded;
 * mask row: 1 where the label is masked (the prompt), 0 elsewhere, padding included. */
static int tokenize_row(struct tok_job *j, int64_t i)
{
    struct tokenized *ds = j->ds;
    const int64_t T = ds->T;
    int32_t *row = ds->tokens + i * T;
    uint8_t *mask = ds->mask + i * T;
    const char *text = dataset_text(j->texts, i);
    size_t len = dataset_text_len(j->texts, i), n, before = 0;
    bool split = j->texts->resp_end && j->texts->resp_end[i] != SIZE_MAX;
    const size_t *train = dataset_text_train(j->texts, i);
    size_t ntrain = dataset_text_ntrain(j->texts, i);
    int64_t nb = ds->bos_id >= 0; /* 1 with a BOS, 0 without */
    int rc = train ? tokenizer_encode_starts(j->tk, text, len, dataset_text_spec(j->texts, i),
                                             dataset_text_nspec(j->texts, i), row + nb, j->starts,
                                             (size_t) (T - nb), &n, &j->err)
                   : tokenizer_encode(j->tk, text, len, dataset_text_spec(j->texts, i),
                                      dataset_text_nspec(j->texts, i),
                                      split ? j->texts->resp_end[i] : SIZE_MAX, row + nb,
                                      (size_t) (T - nb), &n, &before, &j->err);
    if (rc < 0)
        return moai_err_prefix(&j->err, "record %" PRId64 " (line %" PRId64 ")", i,
                               j->texts->line[i]);
    if (nb)
        row[0] = ds->bos_id;
    int64_t real = nb + (int64_t) n;
    bool text_eos = n > 0 && real <= T && row[real - 1] == ds->eos_id;
    bool has_eos = text_eos || real < T;
    if (text_eos) {
        /* the text's own EOS ends it */
    } else if (has_eos) {
        row[real++] = ds->eos_id;
    } else {
        real = T;
        j->truncated++;
    }
    for (int64_t t = real; t < T; t++)
        row[t] = ds->pad_id;
    ds->lengths[i] = real;
    memset(mask, 0, (size_t) T);
    if (train) { /* a token is learned when its bytes overlap a range; the BOS when the text's
                  * first byte is learned */
        int64_t end = has_eos && !text_eos ? real - 1 : real, last = nb + (int64_t) n;
        mask[0] = nb ? !in_ranges(train, ntrain, 0, 1) : 0;
        for (int64_t t = nb; t < end; t++) {
            size_t a = j->starts[t - nb];
            size_t z = t + 1 < last && t + 1 < T ? j->starts[t + 1 - nb] : len;
            mask[t] = !in_ranges(train, ntrain, a, z);
        }
        int64_t m = 0;
        while (m < real && mask[m])
            m++;
        ds->masked[i] = m;
        return 0;
    }
    /* the BOS and every piece that starts before the end of response_start; never the EOS */
    int64_t m = split ? nb + (int64_t) before : 0;
    int64_t keep = has_eos ? real - 1 : real;
    ds->masked[i] = m < keep ? m : keep;
    memset(mask, 1, (size_t) ds->masked[i]);
    return 0;
}

/* Tokenizes rows [from, to) of j's range; publishes progress in j->done. */
static void tok_range(struct tok_job *j, int64_t from, int64_t to)
{
    for (int64_t i = from; i < to && j->rc == 0; i++) {
        j->rc = tokenize_row(j, i);
        if (j->rc == 0)
            atomic_store_explicit(&j->done, i + 1 - j->begin, memory_order_relaxed);
    }
}

static void *tok_worker(void *arg)
{
    struct tok_job *j = arg;
    tok_range(j, j->begin, j->end);
    atomic_store_explicit(&j->finished, 1, memory_order_release);
    return NULL;
}

void tokenized_fill_labels(struct tokenized *ds)
{
    for (int64_t i = 0; i < ds->n; i++) {
        const int32_t *tok = ds->tokens + i * ds->T;
        int32_t *lab = ds->labels + i * ds->T;
        const uint8_t *mask = ds->mask + i * ds->T;
        for (int64_t t = 0; t < ds->T; t++)
            lab[t] = mask[t] || t >= ds->lengths[i] ? DATA_IGNORE_INDEX : tok[t];
    }
}

static int64_t progress_sum(struct tok_job *jobs, int nthreads)
{
    int64_t sum = 0;
    for (int k = 0; k < nthreads; k++)
        sum += atomic_load_explicit(&jobs[k].done, memory_order_relaxed);
    return sum;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ds's token ids from tk and its arrays for texts' records of T tokens. */
static int tokenized_alloc(struct tokenized *ds, const struct dataset_texts *texts,
                           const struct tokenizer *tk, int64_t T, struct moai_err *err)
{
    if (T < 2 || T > INT32_MAX)
        return moai_err_set(err, MOAI_EUSAGE, "block size %" PRId64 " is outside [2, %d]", T,
                            INT32_MAX);
    ds->bos_id = tokenizer_bos_id(tk);
    ds->eos_id = tokenizer_eos_id(tk);
    ds->pad_id = tokenizer_pad_id(tk);
    if (ds->eos_id < 0 || ds->pad_id < 0) {
        moai_err_set(err, MOAI_EUSAGE, "tokenizer '%s' has no EOS token", tokenizer_path(tk));
        return moai_err_hint(err, "set eos_token in tokenizer_config.json beside it");
    }
    ds->n = texts->n;
    ds->T = T;
    size_t cells = (size_t) ds->n * (size_t) T;
    ds->tokens = malloc(sizeof(int32_t) * cells);
    ds->labels = malloc(sizeof(int32_t) * cells);
    ds->lengths = malloc(sizeof(int64_t) * (size_t) ds->n);
    ds->masked = malloc(sizeof(int64_t) * (size_t) ds->n);
    ds->mask = malloc(cells);
    if (!ds->tokens || !ds->labels || !ds->lengths || !ds->masked || !ds->mask) {
        tokenized_release(ds);
        return moai_err_set(err, MOAI_ENOMEM, "tokenizing %" PRId64 " records: out of memory",
                            texts->n);
    }
    return 0;
}

/* nthreads jobs, each with an equal share of ds's rows (and its scratch for train ranges). */
static int jobs_init(struct tok_job *jobs, int nthreads, struct tokenized *ds,
                     const struct dataset_texts *texts, const struct tokenizer *tk,
                     struct moai_err *err)
{
    for (int k = 0; k < nthreads; k++) {
        memset(&jobs[k], 0, sizeof(jobs[k]));
        jobs[k].ds = ds;
        jobs[k].texts = texts;
        jobs[k].tk = tk;
        if (texts->train_off && !(jobs[k].starts = malloc(sizeof(uint32_t) * (size_t) ds->T))) {
            for (int q = 0; q <= k; q++)
                free(jobs[q].starts);
            return moai_err_set(err, MOAI_ENOMEM, "tokenizing: out of memory");
        }
        jobs[k].begin = ds->n * k / nthreads;
        jobs[k].end = ds->n * (k + 1) / nthreads;
        atomic_init(&jobs[k].done, 0);
    }
    return 0;
}

/* Runs jobs 1.. on threads (or here, when a thread cannot start) and job 0 here in slices,
 * updating the bar between them; returns when every job is done. */
static void jobs_run(struct tok_job *jobs, int nthreads, struct progress *bar)
{
    pthread_t tid[64];
    int started[64] = {0};

    for (int k = 1; k < nthreads; k++)
        started[k] = pthread_create(&tid[k], NULL, tok_worker, &jobs[k]) == 0;
    for (int k = 1; k < nthreads; k++)
        if (!started[k])
            tok_worker(&jobs[k]); /* no thread: do its share here */
    for (int64_t b = jobs[0].begin; b < jobs[0].end && jobs[0].rc == 0; b += 64) {
        tok_range(&jobs[0], b, b + 64 < jobs[0].end ? b + 64 : jobs[0].end);
        progress_update(bar, progress_sum(jobs, nthreads));
    }
    for (int k = 1; k < nthreads; k++) {
        if (!started[k])
            continue;
        while (!atomic_load_explicit(&jobs[k].finished, memory_order_acquire)) {
            progress_update(bar, progress_sum(jobs, nthreads));
            sleep_ms(20);
        }
        pthread_join(tid[k], NULL);
    }
}

/* Frees the jobs' scratch, adds up their truncations into ds; the first job's error. */
static int jobs_finish(struct tok_job *jobs, int nthreads, struct tokenized *ds,
                       struct moai_err *err)
{
    int rc = 0;
    for (int k = 0; k < nthreads; k++) {
        free(jobs[k].starts);
        ds->truncated += jobs[k].truncated;
        if (rc == 0 && jobs[k].rc < 0) {
            rc = jobs[k].rc;
            if (err)
                *err = jobs[k].err;
        }
    }
    return rc;
}

int tokenize_texts(struct tokenized *out, const struct dataset_texts *texts,
                   const struct tokenizer *tk, int64_t T, int nthreads, struct moai_err *err)
{
    struct tok_job jobs[64];
    struct progress bar;
    int rc;

    memset(out, 0, sizeof(*out));
    if ((rc = tokenized_alloc(out, texts, tk, T, err)) < 0)
        return rc;
    nthreads = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
    if ((rc = jobs_init(jobs, nthreads, out, texts, tk, err)) < 0) {
        tokenized_release(out);
        return rc;
    }
    progress_init(&bar, "Map", out->n, "examples");
    jobs_run(jobs, nthreads, &bar);
    if ((rc = jobs_finish(jobs, nthreads, out, err)) < 0) {
        tokenized_release(out);
        return rc;
    }
    progress_update(&bar, out->n);
    progress_finish(&bar);
    tokenized_fill_labels(out);
    return 0;
}

int64_t tokenized_count_unscored(const struct tokenized *ds)
{
    int64_t none = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        const int32_t *lab = ds->labels + i * ds->T;
        int64_t t = 1; /* the first position predicts nothing (labels shift by one) */
        while (t < ds->T && lab[t] == DATA_IGNORE_INDEX)
            t++;
        none += t == ds->T;
    }
    return none;
}

void tokenized_log_stats(const struct tokenized *ds)
{
    int64_t real = 0, unscored = tokenized_count_unscored(ds);
    for (int64_t i = 0; i < ds->n; i++)
        real += ds->lengths[i];
    double mean = ds->n ? (double) real / (double) ds->n : 0.0;
    double pad = ds->n ? 1.0 - (double) real / ((double) ds->n * (double) ds->T) : 0.0;
    log_info("Tokenized %" PRId64 " examples of %" PRId64 " tokens: %" PRId64 " truncated, %" PRId64
             " with no token counted in the loss, mean %.1f real tokens, "
             "%.1f%% padding.",
             ds->n, ds->T, ds->truncated, unscored, mean, 100.0 * pad);
    if (unscored > 0)
        log_warn("%" PRId64 " of %" PRId64 " examples have no token counted in the loss (the "
                 "block size %" PRId64 " cuts them before their response): they teach nothing.",
                 unscored, ds->n, ds->T);
    if (ds->truncated * 20 > ds->n)
        log_warn("%" PRId64 " of %" PRId64 " examples (%.1f%%) are longer than the block size "
                 "%" PRId64 " and lose their end and EOS.",
                 ds->truncated, ds->n, 100.0 * (double) ds->truncated / (double) ds->n, ds->T);
}

void tokenized_release(struct tokenized *ds)
{
    free(ds->tokens);
    free(ds->labels);
    free(ds->lengths);
    free(ds->masked);
    free(ds->mask);
    memset(ds, 0, sizeof(*ds));
}
