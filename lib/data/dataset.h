/* dataset.h - JSON Lines datasets (plain or zstd-compressed) and prompt templates.
 *
 * A dataset is a file of JSON objects, one per line; blank lines are skipped. A file that
 * starts with zstd's magic bytes (28 B5 2F FD) is decompressed as a stream (never held whole
 * in memory). Each record is turned into one text by a template: "{field}" is replaced by the
 * record's string field, "{{" and "}}" stand for literal braces.
 *
 * Errors name the file and line, in git's form:
 *     data.jsonl:7: record has no field 'article' (the template needs it)
 *     data.jsonl:3:5: invalid JSON: '[' or '{' expected near 'x'
 *     data.jsonl.zst: truncated zstd stream
 * and return MOAI_EIO (a bad template or response_start: MOAI_EUSAGE).
 *
 * Ownership: struct dataset_texts owns one buffer holding every filled text; release it with
 * dataset_texts_release. Thread-safety: none shared; a dataset_texts may be read from any
 * number of threads once loaded.
 *
 *     struct dataset_texts dt;
 *     if (dataset_load(&dt, "data.jsonl.zst", "{article}\n{highlights}", NULL, -1, &err) < 0) ...
 *     for (int64_t i = 0; i < dt.n; i++) use(dataset_text(&dt, i), dataset_text_len(&dt, i));
 */
#ifndef MOAI_DATASET_H
#define MOAI_DATASET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"

/* A parsed template: literal pieces and field names, alternating. */
struct dataset_template {
    int nparts;
    struct dataset_part {
        char *text; /* literal text (braces unescaped) or the field name */
        size_t len;
        int is_field;
    } * parts;
    /* response_start: the part holding it (-1 when none) and the byte offset just past its
     * end inside that literal part. */
    int resp_part;
    size_t resp_end;
};

/* Parses tmpl. response_start may be NULL; when given it must occur inside the template's
 * literal text (the first occurrence counts). Returns 0, or MOAI_EUSAGE with err filled:
 *     template '{article': unclosed '{' at column 1
 * Release with dataset_template_release. */
int dataset_template_parse(struct dataset_template *t, const char *tmpl, const char *response_start,
                           struct moai_err *err);
void dataset_template_release(struct dataset_template *t);

/* The filled texts of a dataset, concatenated in one buffer. */
struct dataset_texts {
    int64_t n;        /* records */
    char *buf;        /* every text, each followed by a NUL */
    size_t *off;      /* (n + 1) byte offsets of each text in buf; off[n] = used bytes */
    size_t *resp_end; /* (n) bytes of each text up to the end of response_start, or
                           SIZE_MAX when no response_start; NULL when none was given */
    int64_t *line;    /* (n) line number of each record in its file */
    /* Where special tokens may be matched: the template's own text. Record i's ranges are the
     * pairs spec[spec_off[i] .. spec_off[i + 1]) of byte offsets into its text, ascending;
     * spec_off NULL when not recorded (anywhere). */
    size_t *spec;
    size_t *spec_off; /* (n + 1) */
    /* The byte ranges in the loss (formats messages and alpaca), as spec; train_off NULL for
     * format text, whose masking is resp_end. */
    size_t *train;
    size_t *train_off; /* (n + 1) */
    size_t cap;        /* bytes allocated for buf */
};

static inline const char *dataset_text(const struct dataset_texts *d, int64_t i)
{
    return d->buf + d->off[i];
}

static inline size_t dataset_text_len(const struct dataset_texts *d, int64_t i)
{
    return d->off[i + 1] - d->off[i] - 1;
}

static inline const size_t *dataset_text_spec(const struct dataset_texts *d, int64_t i)
{
    static const size_t none[2];
    if (!d->spec_off)
        return NULL;
    return d->spec ? d->spec + d->spec_off[i] : none;
}

static inline size_t dataset_text_nspec(const struct dataset_texts *d, int64_t i)
{
    return d->spec_off ? (d->spec_off[i + 1] - d->spec_off[i]) / 2 : 0;
}

static inline const size_t *dataset_text_train(const struct dataset_texts *d, int64_t i)
{
    return d->train_off ? d->train + d->train_off[i] : NULL;
}

static inline size_t dataset_text_ntrain(const struct dataset_texts *d, int64_t i)
{
    return d->train_off ? (d->train_off[i + 1] - d->train_off[i]) / 2 : 0;
}

/* How records become text. */
enum dataset_kind {
    DATASET_TEXT,     /* the template */
    DATASET_MESSAGES, /* {"messages": [{"role", "content"}]} through a chat template */
    DATASET_ALPACA,   /* {"instruction", "input", "output"} with the Alpaca prompt */
};

/* The chat templates, each as its model family publishes it (Hugging Face chat_template):
 *   llama3   <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|> a turn (stripped)
 *   llama2   [INST] <<SYS>>\nSYS\n<</SYS>>\n\nUSER [/INST] ANSWER </s><s>[INST] ...
 *   mistral  [INST] USER [/INST]ANSWER</s>[INST] ...
 *   chatml   <|im_start|>ROLE\nCONTENT<|im_end|>\n a turn
 * The BOS that opens llama3, llama2 and mistral is the tokenizer's (added, not in the text). */
enum dataset_chat {
    DATASET_CHAT_LLAMA3,
    DATASET_CHAT_LLAMA2,
    DATASET_CHAT_MISTRAL,
    DATASET_CHAT_CHATML
};

struct dataset_format {
    enum dataset_kind kind;
    const struct dataset_template *tmpl; /* DATASET_TEXT */
    enum dataset_chat chat;              /* DATASET_MESSAGES */
    bool train_all; /* loss on every token, not only the assistant turns / the output */
};

/* The chat template named name; returns 0, or -1 when there is none of that name. */
int dataset_chat_parse(enum dataset_chat *chat, const char *name);
const char *dataset_chat_name(enum dataset_chat chat);

/* Reads a dataset file (JSON Lines, or a JSON array of records; plain or zstd) in format f,
 * its first limit records (-1: all). Errors name the file and line ("data.jsonl:7: ...") or
 * the array element ("data.json: record 3: ..."). Returns 0 or a negative code. */
int dataset_load_format(struct dataset_texts *out, const char *path, const struct dataset_format *f,
                        int64_t limit, struct moai_err *err);

/* Reads the file at path and fills the template for its first limit records (-1: all).
 * An empty dataset (no records) is an error. Returns 0 or a negative code with err filled. */
int dataset_load(struct dataset_texts *out, const char *path, const char *tmpl,
                 const char *response_start, int64_t limit, struct moai_err *err);

/* The same over size bytes in memory (plain or zstd); name is used in error messages.
 * The entry point of the fuzzer. */
int dataset_load_mem(struct dataset_texts *out, const char *name, const void *data, size_t size,
                     const char *tmpl, const char *response_start, int64_t limit,
                     struct moai_err *err);

void dataset_texts_release(struct dataset_texts *d);

#endif
