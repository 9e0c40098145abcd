/* test_data.c - datasets, templates, the SentencePiece shim, tokenization, token cache, batching. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/batch.h"
#include "data/dataset.h"
#include "data/spm.h"
#include "data/tokcache.h"
#include "data/tokenize.h"
#include "data/tokenizer.h"
#include "log.h"

#define TOKENIZER "models/tiny-llama/tokenizer.model"
#define TEMPLATE  "[SUMMARIZE] {article} [/SUMMARIZE]\n{highlights}"
#define BAD_DIR   "tests/data/bad/datasets"

static char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t) n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t) n, f), (size_t) n);
    buf[n] = '\0';
    fclose(f);
    if (size)
        *size = (size_t) n;
    return buf;
}

static void write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, size, f), size);
    fclose(f);
}

static struct tokenizer *tk_load(void)
{
    struct moai_err err = {0};
    struct tokenizer *tk = tokenizer_load(TOKENIZER, &err);
    if (!tk)
        fail_msg("%s", err.msg);
    return tk;
}

static struct spm *tokenizer(void)
{
    struct moai_err err = {0};
    struct spm *sp = spm_load(TOKENIZER, &err);
    if (!sp)
        fail_msg("%s", err.msg);
    return sp;
}

/* Parses one line of space-separated ids. Returns the count. */
static size_t parse_ids(const char *line, int32_t *ids, size_t cap)
{
    size_t n = 0;
    char *end;
    for (const char *p = line; *p && *p != '\n' && n < cap; p = end) {
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        ids[n++] = (int32_t) v;
    }
    return n;
}

/* Loads texts from a string in memory. */
static int load_mem(struct dataset_texts *dt, const char *data, const char *tmpl, const char *resp,
                    struct moai_err *err)
{
    return dataset_load_mem(dt, "mem.jsonl", data, strlen(data), tmpl, resp, -1, err);
}

/* ---- the SentencePiece shim against the spm_encode tool ---- */

static void test_spm_encode_matches_tool(void **state)
{
    (void) state;
    struct spm *sp = tokenizer();
    char *text = read_file("tests/data/datasets/sample.txt", NULL);
    char *ids = read_file("tests/data/datasets/sample.ids", NULL);
    char *tl = text, *il = ids;
    int lines = 0;
    struct moai_err err = {0};
    while (*tl) {
        char *te = strchr(tl, '\n'), *ie = strchr(il, '\n');
        assert_non_null(te);
        assert_non_null(ie);
        int32_t want[4096];
        size_t nwant = parse_ids(il, want, 4096);
        int32_t *got;
        size_t ngot;
        assert_int_equal(spm_encode(sp, tl, (size_t) (te - tl), &got, &ngot, &err), 0);
        assert_int_equal(ngot, nwant);
        assert_memory_equal(got, want, nwant * sizeof(int32_t));
        char *back;
        assert_int_equal(spm_decode(sp, got, ngot, &back, &err), 0);
        assert_int_equal(strlen(back), (size_t) (te - tl)); /* identity normalization */
        assert_memory_equal(back, tl, (size_t) (te - tl));
        free(back);
        free(got);
        tl = te + 1;
        il = ie + 1;
        lines++;
    }
    assert_int_equal(lines, 88);
    assert_int_equal(spm_vocab_size(sp), 8000);
    assert_int_equal(spm_unk_id(sp), 0);
    assert_int_equal(spm_bos_id(sp), 1);
    assert_int_equal(spm_eos_id(sp), 2);
    assert_int_equal(spm_pad_id(sp), 3);
    assert_int_equal(spm_piece_id(sp, "[SUMMARIZE]"), 4);
    assert_int_equal(spm_piece_id(sp, "[/SUMMARIZE]"), 5);
    int32_t bad = 8000;
    char *out;
    assert_int_equal(spm_decode(sp, &bad, 1, &out, &err), MOAI_EUSAGE);
    free(text);
    free(ids);
    spm_free(sp);
}

/* The fast offsets of spm_encode_split equal SentencePiece's own, on every sample line at
 * many boundaries, and on texts that force the exact path (a literal U+2581, no text). */
static void test_spm_split_offsets_exact(void **state)
{
    (void) state;
    struct spm *sp = tokenizer();
    char *text = read_file("tests/data/datasets/sample.txt", NULL);
    static const char *extra[] = {"x \xe2\x96\x81 y => z", " leading space => b", ""};
    int32_t a[4096], b[4096];
    uint32_t begins[4096];
    struct moai_err err = {0};
    char *tl = text;
    int checks = 0;
    for (int line = 0;; line++) {
        const char *s;
        size_t len;
        if (*tl) {
            char *te = strchr(tl, '\n');
            s = tl;
            len = (size_t) (te - tl);
            tl = te + 1;
        } else if (line - 88 < 3) {
            s = extra[line - 88];
            len = strlen(s);
        } else {
            break;
        }
        size_t n1, n2, before;
        assert_int_equal(spm_encode_offsets(sp, s, len, b, begins, 4096, &n2, &err), 0);
        for (size_t bd = 0; bd <= len + 1; bd += 1 + bd / 4) {
            assert_int_equal(spm_encode_split(sp, s, len, bd, a, 4096, &n1, &before, &err), 0);
            size_t want = 0;
            for (size_t j = 0; j < n2; j++)
                if (begins[j] < bd)
                    want = j + 1;
            assert_int_equal(n1, n2);
            assert_memory_equal(a, b, n1 * sizeof(int32_t));
            if (before != want)
                fail_msg("line %d boundary %zu: %zu pieces before, SentencePiece says %zu", line,
                         bd, before, want);
            checks++;
        }
    }
    assert_true(checks > 500);
    free(text);
    spm_free(sp);
}

static void test_spm_bad_tokenizer(void **state)
{
    (void) state;
    const char *files[] = {"tests/data/bad/tokenizer/not-a-model.model",
                           "tests/data/bad/tokenizer/truncated.model",
                           "tests/data/bad/tokenizer/missing.model"};
    for (int i = 0; i < 3; i++) {
        struct moai_err err = {0};
        char want[256];
        snprintf(want, sizeof(want), "cannot load tokenizer '%s': ", files[i]);
        assert_null(spm_load(files[i], &err));
        assert_int_equal(err.code, MOAI_EIO);
        assert_memory_equal(err.msg, want, strlen(want));
        assert_true(strlen(err.msg) > strlen(want)); /* the library's reason follows */
        assert_null(strchr(err.msg, '\n'));
    }
    /* through tokcache_prepare, a file that is no tokenizer says so (not SentencePiece's parse
     * error), and a truncated SentencePiece model gives the library's reason */
    struct tokenized ds;
    struct moai_err err = {0};
    assert_int_equal(tokcache_prepare(&ds, "tests/data/datasets/small.jsonl",
                                      "tests/data/bad/tokenizer/not-a-model.model", TEMPLATE, NULL,
                                      64, -1, NULL, &err),
                     MOAI_EUSAGE);
    assert_string_equal(err.msg, "'tests/data/bad/tokenizer/not-a-model.model' is not a "
                                 "tokenizer: expected a tokenizer.json, a tiktoken file or a "
                                 "SentencePiece model");
    assert_int_equal(tokcache_prepare(&ds, "tests/data/datasets/small.jsonl",
                                      "tests/data/bad/tokenizer/truncated.model", TEMPLATE, NULL,
                                      64, -1, NULL, &err),
                     MOAI_EIO);
    assert_non_null(strstr(err.msg, "cannot load tokenizer 'tests/data/bad/tokenizer/"));
}

/* ---- datasets and templates ---- */

static void test_dataset_template_fill(void **state)
{
    (void) state;
    struct dataset_texts dt;
    struct moai_err err = {0};
    const char *data = "{\"a\": \"x\", \"b\": \"y\\nz\", \"extra\": 1}\n";
    assert_int_equal(load_mem(&dt, data, "{{a}} {a}-{b}}}", NULL, &err), 0);
    assert_int_equal(dt.n, 1);
    assert_string_equal(dataset_text(&dt, 0), "{a} x-y\nz}");
    assert_int_equal(dataset_text_len(&dt, 0), 10);
    assert_null(dt.resp_end);
    dataset_texts_release(&dt);

    assert_int_equal(load_mem(&dt, data, "Q: {a}\nA: {b}", "\nA: ", &err), 0);
    assert_string_equal(dataset_text(&dt, 0), "Q: x\nA: y\nz");
    assert_int_equal(dt.resp_end[0], 8); /* "Q: x\nA: " */
    dataset_texts_release(&dt);
}

static void test_dataset_template_errors(void **state)
{
    (void) state;
    struct {
        const char *tmpl, *resp, *msg;
    } cases[] = {
        {"{article", NULL, "template '{article': unclosed '{' at column 1"},
        {"x {a{b}", NULL, "template 'x {a{b}': unclosed '{' at column 3"},
        {"a}b", NULL, "template 'a}b': single '}' at column 2 (write '}}' for a literal brace)"},
        {"a {} b", NULL, "template 'a {} b': empty field name '{}' at column 3"},
        {"{a}\n{b}", "Answer:",
         "response_start 'Answer:' does not occur in the literal text of template '{a}\\n{b}'"},
        {"{a} {b}", "a",
         "response_start 'a' does not occur in the literal text of template "
         "'{a} {b}'"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct dataset_template t;
        struct moai_err err = {0};
        assert_int_equal(dataset_template_parse(&t, cases[i].tmpl, cases[i].resp, &err),
                         MOAI_EUSAGE);
        assert_string_equal(err.msg, cases[i].msg);
    }
}

static void test_dataset_zstd_equals_plain(void **state)
{
    (void) state;
    struct dataset_texts a, b, c;
    struct moai_err err = {0};
    assert_int_equal(dataset_load(&a, "tests/data/datasets/small.jsonl", TEMPLATE, NULL, -1, &err),
                     0);
    assert_int_equal(
        dataset_load(&b, "tests/data/datasets/small.jsonl.zst", TEMPLATE, NULL, -1, &err), 0);
    assert_int_equal(a.n, 6);
    assert_int_equal(b.n, 6);
    assert_int_equal(a.off[a.n], b.off[b.n]);
    assert_memory_equal(a.buf, b.buf, a.off[a.n]);
    assert_int_equal(
        dataset_load(&c, "tests/data/datasets/small.jsonl.zst", TEMPLATE, NULL, 4, &err), 0);
    assert_int_equal(c.n, 4);
    assert_memory_equal(a.buf, c.buf, c.off[c.n]);
    dataset_texts_release(&a);
    dataset_texts_release(&b);
    dataset_texts_release(&c);
}

/* A plain file of several read chunks, lines crossing chunk boundaries. */
static void test_dataset_large_plain_file(void **state)
{
    (void) state;
    char path[] = "/tmp/test_data_large.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 5000; i++)
        fprintf(f, "{\"t\": \"record %d %0*d\"}\n", i, 40 + i % 97, i);
    fclose(f);
    struct dataset_texts dt;
    struct moai_err err = {0};
    assert_int_equal(dataset_load(&dt, path, "{t}", NULL, -1, &err), 0);
    unlink(path);
    assert_int_equal(dt.n, 5000);
    for (int i = 0; i < 5000; i += 499) {
        char want[256];
        snprintf(want, sizeof(want), "record %d %0*d", i, 40 + i % 97, i);
        assert_string_equal(dataset_text(&dt, i), want);
        assert_int_equal(dt.line[i], i + 1);
    }
    dataset_texts_release(&dt);
}

static void test_dataset_blank_lines_and_line_numbers(void **state)
{
    (void) state;
    struct dataset_texts dt;
    struct moai_err err = {0};
    const char *ok = "\n{\"a\": \"1\"}\r\n  \n{\"a\": \"2\"}";
    assert_int_equal(load_mem(&dt, ok, "{a}", NULL, &err), 0);
    assert_int_equal(dt.n, 2);
    assert_int_equal(dt.line[0], 2);
    assert_int_equal(dt.line[1], 4);
    assert_string_equal(dataset_text(&dt, 1), "2");
    dataset_texts_release(&dt);
    const char *bad = "\n{\"a\": \"1\"}\n\n{\"b\": \"2\"}\n";
    assert_int_equal(load_mem(&dt, bad, "{a}", NULL, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "mem.jsonl:4: record has no field 'a' (the template needs it; "
                                 "the record has 'b')");
    /* a limit stops before a later bad line */
    assert_int_equal(dataset_load_mem(&dt, "mem.jsonl", bad, strlen(bad), "{a}", NULL, 1, &err), 0);
    assert_int_equal(dt.n, 1);
    dataset_texts_release(&dt);
}

/* Every tests/data/bad/datasets/NAME.* has NAME.expected holding its error line. */
static void test_dataset_bad_files(void **state)
{
    (void) state;
    DIR *d = opendir(BAD_DIR);
    assert_non_null(d);
    struct dirent *e;
    int checked = 0;
    while ((e = readdir(d))) {
        const char *dot = strstr(e->d_name, ".jsonl");
        if (!dot || strstr(e->d_name, ".expected"))
            continue;
        char path[512], exp_path[512];
        snprintf(path, sizeof(path), "%s/%s", BAD_DIR, e->d_name);
        snprintf(exp_path, sizeof(exp_path), "%s/%.*s.expected", BAD_DIR, (int) (dot - e->d_name),
                 e->d_name);
        char *want = read_file(exp_path, NULL);
        want[strcspn(want, "\n")] = '\0';
        struct dataset_texts dt;
        struct moai_err err = {0};
        int rc = dataset_load(&dt, path, TEMPLATE, NULL, -1, &err);
        /* a record that does not fit the template is a recipe error (exit 2), the rest I/O */
        int want_rc = strstr(want, "(the template needs it") ? MOAI_EUSAGE : MOAI_EIO;
        if (rc != want_rc || strcmp(err.msg, want) != 0)
            fail_msg("%s: got %d '%s', expected '%s'", path, rc, err.msg, want);
        /* the same bytes through the memory entry point give the same message */
        size_t size;
        char *bytes = read_file(path, &size);
        assert_int_equal(dataset_load_mem(&dt, path, bytes, size, TEMPLATE, NULL, -1, &err),
                         want_rc);
        assert_string_equal(err.msg, want);
        free(bytes);
        free(want);
        checked++;
    }
    closedir(d);
    assert_true(checked >= 10);
}

/* ---- tokenization ---- */

static void tokenize_mem(struct tokenized *ds, const char *data, const char *tmpl, const char *resp,
                         int64_t T)
{
    struct dataset_texts dt;
    struct moai_err err = {0};
    struct tokenizer *sp = tk_load();
    if (load_mem(&dt, data, tmpl, resp, &err) < 0)
        fail_msg("%s", err.msg);
    if (tokenize_texts(ds, &dt, sp, T, 2, &err) < 0)
        fail_msg("%s", err.msg);
    dataset_texts_release(&dt);
    tokenizer_free(sp);
}

static void test_tokenize_matches_tool(void **state)
{
    (void) state;
    struct tokenized one, two;
    struct dataset_texts dt;
    struct moai_err err = {0};
    struct tokenizer *sp = tk_load();
    assert_int_equal(
        dataset_load(&dt, "tests/data/datasets/sample.jsonl", "{text}", NULL, -1, &err), 0);
    assert_int_equal(tokenize_texts(&one, &dt, sp, 256, 1, &err), 0);
    assert_int_equal(tokenize_texts(&two, &dt, sp, 256, 2, &err), 0);
    assert_memory_equal(one.tokens, two.tokens, sizeof(int32_t) * 256 * (size_t) one.n);
    assert_memory_equal(one.labels, two.labels, sizeof(int32_t) * 256 * (size_t) one.n);
    char *ids = read_file("tests/data/datasets/sample.ids", NULL);
    char *il = ids;
    for (int64_t i = 0; i < two.n; i++) {
        int32_t want[256];
        size_t n = parse_ids(il, want, 256);
        assert_true(n + 2 <= 256);
        const int32_t *row = two.tokens + i * 256;
        assert_int_equal(row[0], 1);
        assert_memory_equal(row + 1, want, n * sizeof(int32_t));
        assert_int_equal(row[n + 1], 2);
        assert_int_equal(two.lengths[i], (int64_t) n + 2);
        for (int64_t t = (int64_t) n + 2; t < 256; t++) {
            assert_int_equal(row[t], 3);
            assert_int_equal(two.labels[i * 256 + t], DATA_IGNORE_INDEX);
        }
        il = strchr(il, '\n') + 1;
    }
    assert_int_equal(two.truncated, 0);
    free(ids);
    tokenized_release(&one);
    tokenized_release(&two);
    dataset_texts_release(&dt);
    tokenizer_free(sp);
}

static void assert_row(const struct tokenized *ds, int64_t i, const int32_t *tok,
                       const int32_t *lab, int64_t len)
{
    assert_memory_equal(ds->tokens + i * ds->T, tok, sizeof(int32_t) * (size_t) ds->T);
    assert_memory_equal(ds->labels + i * ds->T, lab, sizeof(int32_t) * (size_t) ds->T);
    assert_int_equal(ds->lengths[i], len);
}

/* "a b" is pieces [268 "▁a", 715 "▁b"] (spm_encode --output_format=id). */
static void test_tokenize_padding_and_truncation(void **state)
{
    (void) state;
    const char *data = "{\"t\": \"a b\"}\n";
    struct tokenized ds;
    tokenize_mem(&ds, data, "{t}", NULL, 6);
    assert_row(&ds, 0, (int32_t[]){1, 268, 715, 2, 3, 3}, (int32_t[]){1, 268, 715, 2, -100, -100},
               4);
    assert_int_equal(ds.truncated, 0);
    tokenized_release(&ds);
    tokenize_mem(&ds, data, "{t}", NULL, 4); /* exact fit: EOS kept */
    assert_row(&ds, 0, (int32_t[]){1, 268, 715, 2}, (int32_t[]){1, 268, 715, 2}, 4);
    assert_int_equal(ds.truncated, 0);
    tokenized_release(&ds);
    tokenize_mem(&ds, data, "{t}", NULL, 3); /* too long: the EOS is lost, counted */
    assert_row(&ds, 0, (int32_t[]){1, 268, 715}, (int32_t[]){1, 268, 715}, 3);
    assert_int_equal(ds.truncated, 1);
    tokenized_release(&ds);
}

/* "a => b" is [268 "▁a" @0, 5950 "▁=>" @1, 715 "▁b" @4]; response_start " =>" ends at 4. */
static void test_tokenize_response_start(void **state)
{
    (void) state;
    const char *data = "{\"q\": \"a\", \"r\": \"b\"}\n";
    struct tokenized ds;
    tokenize_mem(&ds, data, "{q} => {r}", " =>", 7);
    assert_row(&ds, 0, (int32_t[]){1, 268, 5950, 715, 2, 3, 3},
               (int32_t[]){-100, -100, -100, 715, 2, -100, -100}, 5);
    assert_int_equal(ds.masked[0], 3);
    tokenized_release(&ds);
    /* the response is empty: everything but the EOS is masked, the EOS still learned */
    tokenize_mem(&ds, data, "{q} =>", " =>", 6);
    assert_row(&ds, 0, (int32_t[]){1, 268, 5950, 2, 3, 3},
               (int32_t[]){-100, -100, -100, 2, -100, -100}, 4);
    tokenized_release(&ds);
    /* truncated inside the prompt: every label masked, nothing out of range */
    tokenize_mem(&ds, data, "{q} => {r}", " =>", 2);
    assert_row(&ds, 0, (int32_t[]){1, 268}, (int32_t[]){-100, -100}, 2);
    assert_int_equal(ds.truncated, 1);
    tokenized_release(&ds);
}

static void test_tokenize_bad_block_size(void **state)
{
    (void) state;
    struct dataset_texts dt;
    struct tokenized ds;
    struct moai_err err = {0};
    struct tokenizer *sp = tk_load();
    assert_int_equal(load_mem(&dt, "{\"t\": \"a\"}", "{t}", NULL, &err), 0);
    assert_int_equal(tokenize_texts(&ds, &dt, sp, 1, 2, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "block size 1 is outside [2, 2147483647]");
    dataset_texts_release(&dt);
    tokenizer_free(sp);
}

/* ---- the token cache ---- */

static char cache_root[64];

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void) st;
    (void) flag;
    (void) ftw;
    return remove(path);
}

static int cache_setup(void **state)
{
    (void) state;
    strcpy(cache_root, "/tmp/test_data_cache.XXXXXX");
    return mkdtemp(cache_root) ? 0 : -1;
}

static int cache_teardown(void **state)
{
    (void) state;
    return nftw(cache_root, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static void prepare(struct tokenized *ds, const char *dir, int64_t T, char *log, size_t logsize)
{
    struct moai_err err = {0};
    FILE *f = fmemopen(log, logsize, "w");
    log_set_stream(f);
    log_set_level(LOG_INFO);
    int rc = tokcache_prepare(ds, "tests/data/datasets/small.jsonl", TOKENIZER, TEMPLATE,
                              "[/SUMMARIZE]\n", T, -1, dir, &err);
    log_set_level(LOG_WARN);
    log_set_stream(NULL);
    fclose(f);
    if (rc < 0)
        fail_msg("%s", err.msg);
}

static void assert_same_set(const struct tokenized *a, const struct tokenized *b)
{
    assert_int_equal(a->n, b->n);
    assert_int_equal(a->T, b->T);
    assert_int_equal(a->truncated, b->truncated);
    size_t cells = (size_t) (a->n * a->T);
    assert_memory_equal(a->tokens, b->tokens, cells * 4);
    assert_memory_equal(a->labels, b->labels, cells * 4);
    assert_memory_equal(a->lengths, b->lengths, (size_t) a->n * 8);
    assert_memory_equal(a->masked, b->masked, (size_t) a->n * 8);
}

static void cache_file(char *path, size_t size, const char *dir, int64_t T)
{
    uint64_t key;
    struct moai_err err = {0};
    assert_int_equal(tokcache_key(&key, "tests/data/datasets/small.jsonl", TOKENIZER, TEMPLATE,
                                  "[/SUMMARIZE]\n", T, -1, &err),
                     0);
    tokcache_path(path, size, dir, key);
}

static void test_tokcache_hit_and_miss(void **state)
{
    (void) state;
    char dir[256], path[512], log[4096];
    snprintf(dir, sizeof(dir), "%s/a/b", cache_root); /* parents are created */
    struct tokenized fresh, cached, other;
    prepare(&fresh, dir, 64, log, sizeof(log));
    assert_null(strstr(log, "Loaded"));
    cache_file(path, sizeof(path), dir, 64);
    assert_int_equal(access(path, R_OK), 0);
    prepare(&cached, dir, 64, log, sizeof(log));
    assert_non_null(strstr(log, "Loaded 6 tokenized examples from the cache"));
    assert_same_set(&fresh, &cached);
    assert_true(cached.masked[0] > 1);          /* response_start survived the trip */
    prepare(&other, dir, 32, log, sizeof(log)); /* another block size: a miss */
    assert_null(strstr(log, "Loaded"));
    assert_int_equal(other.T, 32);
    char other_path[512];
    cache_file(other_path, sizeof(other_path), dir, 32);
    assert_string_not_equal(path, other_path);
    assert_int_equal(access(other_path, R_OK), 0);
    tokenized_release(&fresh);
    tokenized_release(&cached);
    tokenized_release(&other);
}

static void test_tokcache_corrupt_is_rebuilt(void **state)
{
    (void) state;
    char dir[256], path[512], log[4096];
    snprintf(dir, sizeof(dir), "%s/c", cache_root);
    struct tokenized good;
    prepare(&good, dir, 64, log, sizeof(log));
    cache_file(path, sizeof(path), dir, 64);
    size_t size;
    char *orig = read_file(path, &size);
    /* a byte flipped in the header, in the compressed payload, the file truncated, emptied */
    size_t flips[] = {3, 30, 60, 80, size - 5};
    for (int k = 0; k < 7; k++) {
        char *bytes = malloc(size);
        memcpy(bytes, orig, size);
        size_t len = size;
        if (k < 5)
            bytes[flips[k]] ^= 0x40;
        else
            len = k == 5 ? size / 2 : 0;
        write_file(path, bytes, len);
        struct tokenized got, direct;
        struct moai_err err = {0};
        uint64_t key;
        assert_int_equal(tokcache_key(&key, "tests/data/datasets/small.jsonl", TOKENIZER, TEMPLATE,
                                      "[/SUMMARIZE]\n", 64, -1, &err),
                         0);
        assert_int_equal(tokcache_load(&direct, path, key, &err), MOAI_EIO);
        prepare(&got, dir, 64, log, sizeof(log));
        if (!strstr(log, "[warning] token cache unusable"))
            fail_msg("case %d: no warning in '%s'", k, log);
        assert_same_set(&good, &got);
        /* rebuilt: the file is whole again */
        assert_int_equal(tokcache_load(&direct, path, key, &err), 0);
        assert_same_set(&good, &direct);
        tokenized_release(&direct);
        tokenized_release(&got);
        free(bytes);
    }
    free(orig);
    tokenized_release(&good);
}

/* path, stored from t under key 7, with the edit applied to its bytes, loaded: the error
 * message, "" when it loads. */
static void load_edited(const struct tokenized *t, const char *path, void (*edit)(char *, size_t *),
                        char *msg, size_t size)
{
    struct moai_err err = {0};
    struct tokenized got;
    size_t len;
    assert_int_equal(tokcache_store(t, path, 7, &err), 0);
    char *bytes = read_file(path, &len);
    edit(bytes, &len);
    write_file(path, bytes, len);
    free(bytes);
    int rc = tokcache_load(&got, path, 7, &err);
    snprintf(msg, size, "%s", rc < 0 ? err.msg : "");
    if (rc == 0)
        tokenized_release(&got);
}

static void keep(char *b, size_t *n)
{
    (void) b, (void) n;
}
static void bad_magic(char *b, size_t *n)
{
    (void) n, b[0] ^= 1;
}
static void bad_version(char *b, size_t *n)
{
    (void) n, b[8] = 9;
}
static void bad_header_sum(char *b, size_t *n)
{
    (void) n, b[24] ^= 1;
}
static void cut_header(char *b, size_t *n)
{
    (void) b, *n = 71;
}
static void cut_payload(char *b, size_t *n)
{
    (void) b, *n -= 3;
}

/* Each check tokcache_load makes names the file and what is wrong. */
static void test_tokcache_load_messages(void **state)
{
    (void) state;
    int32_t tokens[4] = {5, 6, 7, 8}, labels[4];
    int64_t lengths[2] = {2, 1}, masked[2] = {1, 0};
    uint8_t mask[4] = {1, 0, 0, 0};
    struct tokenized t = {.n = 2,
                          .T = 2,
                          .tokens = tokens,
                          .labels = labels,
                          .lengths = lengths,
                          .masked = masked,
                          .mask = mask};
    char path[512], want[1024], msg[1024];
    struct moai_err err = {0};
    struct tokenized got;
    snprintf(path, sizeof(path), "%s/m.tok", cache_root);

    assert_int_equal(tokcache_load(&got, path, 7, &err), MOAI_EIO);
    snprintf(want, sizeof(want), "cannot open '%s': No such file or directory", path);
    assert_string_equal(err.msg, want);

    load_edited(&t, path, keep, msg, sizeof(msg));
    assert_string_equal(msg, "");
    assert_int_equal(tokcache_load(&got, path, 8, &err), MOAI_EIO);
    snprintf(want, sizeof(want), "%s: key 0000000000000007 does not match the file name", path);
    assert_string_equal(err.msg, want);

    static const struct {
        void (*edit)(char *, size_t *);
        const char *what;
    } cases[] = {
        {bad_magic, "not a token cache (bad magic)"},
        {bad_version, "format version 9, expected 2"},
        {bad_header_sum, "header checksum mismatch"},
        {cut_header, "shorter than its 72-byte header"},
        {cut_payload, "compressed payload is truncated or corrupt: "},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        load_edited(&t, path, cases[i].edit, msg, sizeof(msg));
        snprintf(want, sizeof(want), "%s: %s", path, cases[i].what);
        if (strncmp(msg, want, strlen(want)) != 0) /* zstd may add its reason after a colon */
            fail_msg("got '%s', want '%s'", msg, want);
    }

    /* stored as given, checked when loaded */
    mask[1] = 2;
    load_edited(&t, path, keep, msg, sizeof(msg));
    snprintf(want, sizeof(want), "%s: the label mask holds 2", path);
    assert_string_equal(msg, want);
    mask[1] = 0;
    masked[1] = 2; /* more masked than its length */
    load_edited(&t, path, keep, msg, sizeof(msg));
    snprintf(want, sizeof(want), "%s: sequence 1 has impossible lengths", path);
    assert_string_equal(msg, want);
}

static void test_tokcache_hash_known_values(void **state)
{
    (void) state;
    /* FNV-1a 64 of "a" (one tail byte) is 0xaf63dc4c8601ec8c */
    assert_int_equal(tokcache_hash(TOKCACHE_HASH_INIT, "a", 1), 0xaf63dc4c8601ec8cull);
    assert_int_not_equal(tokcache_hash(TOKCACHE_HASH_INIT, "abcdefgh", 8),
                         tokcache_hash(TOKCACHE_HASH_INIT, "abcdefgi", 8));
}

/* ---- batching ---- */

static void test_batch_splitmix64_reference(void **state)
{
    (void) state;
    uint64_t s = 0;
    /* the published first outputs of splitmix64 seeded with 0 */
    assert_int_equal(batch_splitmix64(&s), 0xe220a8397b1dcdafull);
    assert_int_equal(batch_splitmix64(&s), 0x6e789e6aa1b965f4ull);
}

static void test_batch_split(void **state)
{
    (void) state;
    struct batches a, b, c;
    struct moai_err err = {0};
    assert_int_equal(batch_init(&a, 100, 8, 0.1, true, 42, &err), 0);
    assert_int_equal(batch_init(&b, 100, 8, 0.1, true, 42, &err), 0);
    assert_int_equal(batch_init(&c, 100, 8, 0.1, true, 43, &err), 0);
    assert_int_equal(a.n_val, 10);
    assert_int_equal(a.n_train, 90);
    assert_int_equal(a.steps_per_epoch, 11); /* floor(90 / 8): the partial batch dropped */
    assert_memory_equal(a.val, b.val, 10 * sizeof(int64_t));
    assert_memory_not_equal(a.val, c.val, 10 * sizeof(int64_t));
    char seen[100] = {0};
    for (int64_t i = 0; i < a.n_train; i++) {
        seen[a.train[i]]++;
        if (i)
            assert_true(a.train[i] > a.train[i - 1]);
    }
    for (int64_t i = 0; i < a.n_val; i++) {
        seen[a.val[i]]++;
        if (i)
            assert_true(a.val[i] > a.val[i - 1]);
    }
    for (int i = 0; i < 100; i++)
        assert_int_equal(seen[i], 1);
    batch_release(&a);
    batch_release(&b);
    batch_release(&c);
    assert_int_equal(batch_init(&a, 10, 8, 0.5, true, 1, &err), MOAI_EUSAGE);
    assert_string_equal(err.msg, "dataset has 5 training records, fewer than one batch of 8");
    assert_int_equal(batch_init(&a, 10, 2, 1.0, true, 1, &err), MOAI_EUSAGE);
    assert_int_equal(batch_init(&a, 10, 2, 0.0, true, 1, &err), 0);
    assert_int_equal(a.n_val, 0);
    batch_release(&a);
}

static void test_batch_shuffle(void **state)
{
    (void) state;
    struct batches b, f;
    struct moai_err err = {0};
    assert_int_equal(batch_init(&b, 50, 4, 0.0, true, 7, &err), 0);
    assert_int_equal(batch_init(&f, 50, 4, 0.0, false, 7, &err), 0);
    int64_t e0[50], e0b[50], e1[50], rows[4];
    batch_epoch_order(&b, 0, e0);
    batch_epoch_order(&b, 0, e0b);
    batch_epoch_order(&b, 1, e1);
    assert_memory_equal(e0, e0b, sizeof(e0));
    assert_memory_not_equal(e0, e1, sizeof(e0));
    int64_t sorted[50];
    memcpy(sorted, e1, sizeof(sorted));
    char seen[50] = {0};
    for (int i = 0; i < 50; i++)
        seen[sorted[i]]++;
    for (int i = 0; i < 50; i++)
        assert_int_equal(seen[i], 1);
    for (int64_t s = 0; s < b.steps_per_epoch; s++) {
        batch_rows(&b, 1, s, rows);
        assert_memory_equal(rows, e1 + s * 4, sizeof(rows));
        batch_rows(&f, 1, s, rows);
        for (int k = 0; k < 4; k++)
            assert_int_equal(rows[k], s * 4 + k); /* file order */
    }
    assert_int_equal(b.steps_per_epoch, 12);
    batch_release(&b);
    batch_release(&f);
}

int main(void)
{
    log_set_level(LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spm_encode_matches_tool),
        cmocka_unit_test(test_spm_split_offsets_exact),
        cmocka_unit_test(test_spm_bad_tokenizer),
        cmocka_unit_test(test_dataset_template_fill),
        cmocka_unit_test(test_dataset_template_errors),
        cmocka_unit_test(test_dataset_zstd_equals_plain),
        cmocka_unit_test(test_dataset_large_plain_file),
        cmocka_unit_test(test_dataset_blank_lines_and_line_numbers),
        cmocka_unit_test(test_dataset_bad_files),
        cmocka_unit_test(test_tokenize_matches_tool),
        cmocka_unit_test(test_tokenize_padding_and_truncation),
        cmocka_unit_test(test_tokenize_response_start),
        cmocka_unit_test(test_tokenize_bad_block_size),
        cmocka_unit_test_setup_teardown(test_tokcache_hit_and_miss, cache_setup, cache_teardown),
        cmocka_unit_test_setup_teardown(test_tokcache_corrupt_is_rebuilt, cache_setup,
                                        cache_teardown),
        cmocka_unit_test_setup_teardown(test_tokcache_load_messages, cache_setup, cache_teardown),
        cmocka_unit_test(test_tokcache_hash_known_values),
        cmocka_unit_test(test_batch_splitmix64_reference),
        cmocka_unit_test(test_batch_split),
        cmocka_unit_test(test_batch_shuffle),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
