/* tokcache.c - the token cache: keyed, checksummed, zstd-compressed tokenized datasets. */
#include "data/tokcache.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "atomicfile.h"
#include "data/dataset.h"
#include "data/spm.h"
#include "log.h"
#include "progress.h"

#define FNV_PRIME       0x100000001b3ull
#define HEADER_BYTES    72
#define BYTE_ORDER_MARK 0x01020304u
static const char MAGIC[8] = "MOAITOK";

uint64_t tokcache_hash(uint64_t h, const void *data, size_t size)
{
    const unsigned char *p = data;
    size_t i = 0;
    for (; i + 8 <= size; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * FNV_PRIME;
    }
    for (; i < size; i++)
        h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

uint64_t tokcache_hash_final(uint64_t h)
{
    /* splitmix64's finalizer spreads the high bits of the word-wise FNV into the low ones */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

static uint64_t hash_u64(uint64_t h, uint64_t v)
{
    return tokcache_hash(h, &v, sizeof(v));
}

/* A string with its length (so "ab"+"c" and "a"+"bc" differ), or a marker for NULL. */
static uint64_t hash_str(uint64_t h, const char *s)
{
    if (!s)
        return hash_u64(h, UINT64_MAX);
    size_t n = strlen(s);
    return tokcache_hash(hash_u64(h, n), s, n);
}

static int hash_file(uint64_t *h, const char *path, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    unsigned char *buf = malloc(1 << 20);
    if (!buf) {
        fclose(f);
        return moai_err_set(err, MOAI_ENOMEM, "cannot hash '%s': out of memory", path);
    }
    uint64_t size = 0;
    size_t k;
    /* chunks are multiples of 8 bytes, so the word-wise hash is the same as over the whole */
    while ((k = fread(buf, 1, 1 << 20, f)) > 0) {
        *h = tokcache_hash(*h, buf, k);
        size += k;
    }
    int bad = ferror(f);
    free(buf);
    fclose(f);
    if (bad)
        return moai_err_set(err, MOAI_EIO, "cannot read '%s': %s", path, strerror(errno));
    *h = hash_u64(*h, size);
    return 0;
}

int tokcache_key(uint64_t *key, const char *dataset_path, const char *tokenizer_path,
                 const char *tmpl, const char *response_start, int64_t T, int64_t limit,
                 struct moai_err *err)
{
    return tokcache_key_format(key, dataset_path, tokenizer_path, tmpl, response_start, NULL, T,
                               limit, err);
}

int tokcache_key_format(uint64_t *key, const char *dataset_path, const char *tokenizer_path,
                        const char *tmpl, const char *response_start, const struct data_recipe *dr,
                        int64_t T, int64_t limit, struct moai_err *err)
{
    uint64_t h = hash_u64(TOKCACHE_HASH_INIT, TOKCACHE_VERSION);
    char cfg[4200];
    const char *slash = strrchr(tokenizer_path, '/');
    snprintf(cfg, sizeof(cfg), "%.*stokenizer_config.json",
             slash ? (int) (slash - tokenizer_path + 1) : 0, tokenizer_path);
    int rc = hash_file(&h, dataset_path, err);
    if (rc == 0)
        rc = hash_file(&h, tokenizer_path, err);
    if (rc == 0 && access(cfg, R_OK) == 0) /* it sets the BOS, EOS and pad of a tokenizer.json */
        rc = hash_file(&h, cfg, err);
    if (rc < 0)
        return rc;
    h = hash_str(h, tmpl);
    h = hash_str(h, response_start && response_start[0] ? response_start : NULL);
    h = hash_u64(h, (uint64_t) T);
    h = hash_u64(h, (uint64_t) (limit < 0 ? -1 : limit));
    if (dr) {
        h = hash_str(h, dr->format);
        h = hash_str(h, dr->chat_template);
        h = hash_u64(h, dr->train_all);
    }
    *key = tokcache_hash_final(h);
    return 0;
}

void tokcache_path(char *buf, size_t size, const char *cache_dir, uint64_t key)
{
    snprintf(buf, size, "%s/%016" PRIx64 ".tok.zst", cache_dir, key);
}

struct header {
    uint32_t version, bom;
    uint64_t key, n, T, truncated, payload_bytes, payload_sum, header_sum;
};

static void put64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static void header_encode(unsigned char *b, const struct header *h)
{
    memcpy(b, MAGIC, 8);
    memcpy(b + 8, &h->version, 4);
    memcpy(b + 12, &h->bom, 4);
    put64(b + 16, h->key);
    put64(b + 24, h->n);
    put64(b + 32, h->T);
    put64(b + 40, h->truncated);
    put64(b + 48, h->payload_bytes);
    put64(b + 56, h->payload_sum);
    put64(b + 64, tokcache_hash_final(tokcache_hash(TOKCACHE_HASH_INIT, b, 64)));
}

/* Payload bytes for n rows of T, or 0 on overflow. */
static uint64_t payload_bytes(uint64_t n, uint64_t T)
{
    if (n == 0 || T == 0 || n > UINT64_MAX / 16 || T > (UINT64_MAX / 5) / n)
        return 0;
    uint64_t a = n * T * 5, b = n * 16; /* tokens and mask, lengths and masked */
    return a > UINT64_MAX - b ? 0 : a + b;
}

static void header_decode(struct header *h, const unsigned char *b)
{
    memcpy(&h->version, b + 8, 4);
    memcpy(&h->bom, b + 12, 4);
    h->key = get64(b + 16);
    h->n = get64(b + 24);
    h->T = get64(b + 32);
    h->truncated = get64(b + 40);
    h->payload_bytes = get64(b + 48);
    h->payload_sum = get64(b + 56);
    h->header_sum = get64(b + 64);
}

/* The whole file at path into *file (malloc'd, *size bytes, at least a header's). */
static int read_file(const char *path, unsigned char **file, size_t *size, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    int rc = 0;

    *file = NULL;
    if (!f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    if (fstat(fileno(f), &st) < 0 || st.st_size < HEADER_BYTES) {
        rc = moai_err_set(err, MOAI_EIO, "%s: shorter than its %d-byte header", path, HEADER_BYTES);
        goto out;
    }
    *size = (size_t) st.st_size;
    if (!(*file = malloc(*size))) {
        rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    if (fread(*file, 1, *size, f) != *size) {
        rc = moai_err_set(err, MOAI_EIO, "cannot read '%s': %s", path,
                          ferror(f) ? strerror(errno) : "file shrank while reading");
        free(*file);
        *file = NULL;
    }
out:
    fclose(f);
    return rc;
}

/* The header of file must be this version's, intact, of key, with consistent sizes. */
static int check_header(const struct header *h, const unsigned char *file, uint64_t key,
                        const char *path, struct moai_err *err)
{
    if (memcmp(file, MAGIC, 8) != 0)
        return moai_err_set(err, MOAI_EIO, "%s: not a token cache (bad magic)", path);
    if (h->version != TOKCACHE_VERSION || h->bom != BYTE_ORDER_MARK)
        return moai_err_set(err, MOAI_EIO, "%s: format version %" PRIu32 ", expected %u", path,
                            h->version, TOKCACHE_VERSION);
    if (h->header_sum != tokcache_hash_final(tokcache_hash(TOKCACHE_HASH_INIT, file, 64)))
        return moai_err_set(err, MOAI_EIO, "%s: header checksum mismatch", path);
    if (h->key != key)
        return moai_err_set(err, MOAI_EIO, "%s: key %016" PRIx64 " does not match the file name",
                            path, h->key);
    if (h->T < 2 || h->T > INT32_MAX || h->truncated > h->n ||
        payload_bytes(h->n, h->T) != h->payload_bytes || h->payload_bytes > SIZE_MAX / 2)
        return moai_err_set(err, MOAI_EIO, "%s: inconsistent sizes in the header", path);
    return 0;
}

/* out's arrays for h's sizes, the payload decompressed into out->tokens (checked against its
 * sum) and spread over lengths, masked and mask. */
static int decode_payload(struct tokenized *out, const struct header *h, const unsigned char *file,
                          size_t fsize, const char *path, struct moai_err *err)
{
    const unsigned char *z = file + HEADER_BYTES;
    size_t zn = fsize - HEADER_BYTES, cells = (size_t) (h->n * h->T);

    if (ZSTD_getFrameContentSize(z, zn) != h->payload_bytes)
        return moai_err_set(err, MOAI_EIO, "%s: compressed payload is truncated or corrupt", path);
    out->tokens = malloc((size_t) h->payload_bytes);
    out->labels = malloc(sizeof(int32_t) * cells);
    out->lengths = malloc(sizeof(int64_t) * (size_t) h->n);
    out->masked = malloc(sizeof(int64_t) * (size_t) h->n);
    out->mask = malloc(cells);
    if (!out->tokens || !out->labels || !out->lengths || !out->masked || !out->mask)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", path);
    size_t got = ZSTD_decompress(out->tokens, (size_t) h->payload_bytes, z, zn);
    if (ZSTD_isError(got) || got != h->payload_bytes)
        return moai_err_set(err, MOAI_EIO, "%s: compressed payload is truncated or corrupt: %s",
                            path, ZSTD_isError(got) ? ZSTD_getErrorName(got) : "short");
    if (tokcache_hash_final(tokcache_hash(TOKCACHE_HASH_INIT, out->tokens, got)) != h->payload_sum)
        return moai_err_set(err, MOAI_EIO, "%s: payload checksum mismatch", path);
    out->n = (int64_t) h->n;
    out->T = (int64_t) h->T;
    out->truncated = (int64_t) h->truncated;
    memcpy(out->lengths, (unsigned char *) out->tokens + cells * 4, (size_t) h->n * 8);
    memcpy(out->masked, (unsigned char *) out->tokens + cells * 4 + h->n * 8, (size_t) h->n * 8);
    memcpy(out->mask, (unsigned char *) out->tokens + cells * 4 + h->n * 16, cells);
    return 0;
}

/* Every mask cell is 0 or 1, every length in 1..T with at most that many tokens masked. */
static int check_sequences(const struct tokenized *t, const char *path, struct moai_err *err)
{
    size_t cells = (size_t) t->n * (size_t) t->T;
    for (size_t c = 0; c < cells; c++)
        if (t->mask[c] > 1)
            return moai_err_set(err, MOAI_EIO, "%s: the label mask holds %d", path, t->mask[c]);
    for (int64_t i = 0; i < t->n; i++)
        if (t->lengths[i] < 1 || t->lengths[i] > t->T || t->masked[i] < 0 ||
            t->masked[i] > t->lengths[i])
            return moai_err_set(err, MOAI_EIO, "%s: sequence %" PRId64 " has impossible lengths",
                                path, i);
    return 0;
}

int tokcache_load(struct tokenized *out, const char *path, uint64_t key, struct moai_err *err)
{
    unsigned char *file = NULL;
    size_t fsize = 0;
    struct header h;
    int rc;

    memset(out, 0, sizeof(*out));
    if ((rc = read_file(path, &file, &fsize, err)) < 0)
        return rc;
    header_decode(&h, file);
    if ((rc = check_header(&h, file, key, path, err)) == 0 &&
        (rc = decode_payload(out, &h, file, fsize, path, err)) == 0 &&
        (rc = check_sequences(out, path, err)) == 0)
        tokenized_fill_labels(out);
    free(file);
    if (rc < 0)
        tokenized_release(out);
    return rc;
}

/* mkdir -p */
static int make_dirs(const char *dir, struct moai_err *err)
{
    char buf[4096];
    size_t n = strlen(dir);
    if (n == 0 || n >= sizeof(buf))
        return moai_err_set(err, MOAI_EUSAGE, "cache directory '%s': bad path", dir);
    memcpy(buf, dir, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0')
            continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0777) < 0 && errno != EEXIST)
            return moai_err_set(err, MOAI_EIO, "cannot create directory '%s': %s", buf,
                                strerror(errno));
        buf[i] = c;
    }
    return 0;
}

/* The payload of ds: tokens, lengths, masked counts and the label mask, one after another
 * (malloc'd, *size bytes); NULL when out of memory. */
static unsigned char *pack_payload(const struct tokenized *ds, size_t *size)
{
    size_t cells = (size_t) ds->n * (size_t) ds->T;
    size_t pbytes = (size_t) payload_bytes((uint64_t) ds->n, (uint64_t) ds->T);
    unsigned char *payload = malloc(pbytes);
    if (!payload)
        return NULL;
    memcpy(payload, ds->tokens, cells * 4);
    memcpy(payload + cells * 4, ds->lengths, (size_t) ds->n * 8);
    memcpy(payload + cells * 4 + (size_t) ds->n * 8, ds->masked, (size_t) ds->n * 8);
    memcpy(payload + cells * 4 + (size_t) ds->n * 16, ds->mask, cells);
    *size = pbytes;
    return payload;
}

/* The whole cache file of ds under key: the header, then the compressed payload, into *out
 * (malloc'd, *size bytes). Returns 0, MOAI_ENOMEM or MOAI_EIO (path names the file). */
static int encode_file(const struct tokenized *ds, uint64_t key, const char *path,
                       unsigned char **out, size_t *size, struct moai_err *err)
{
    size_t pbytes = 0;
    unsigned char *payload = pack_payload(ds, &pbytes);
    size_t bound = ZSTD_compressBound(pbytes);
    unsigned char *z = payload ? malloc(HEADER_BYTES + bound) : NULL;
    int rc = 0;

    if (!z) {
        rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    size_t zn = ZSTD_compress(z + HEADER_BYTES, bound, payload, pbytes, 3);
    if (ZSTD_isError(zn)) {
        rc = moai_err_set(err, MOAI_EIO, "%s: cannot compress: %s", path, ZSTD_getErrorName(zn));
        goto out;
    }
    struct header h = {
        .version = TOKCACHE_VERSION,
        .bom = BYTE_ORDER_MARK,
        .key = key,
        .n = (uint64_t) ds->n,
        .T = (uint64_t) ds->T,
        .truncated = (uint64_t) ds->truncated,
        .payload_bytes = pbytes,
        .payload_sum = tokcache_hash_final(tokcache_hash(TOKCACHE_HASH_INIT, payload, pbytes)),
    };
    header_encode(z, &h);
    *out = z;
    *size = HEADER_BYTES + zn;
    z = NULL;
out:
    free(payload);
    free(z);
    return rc;
}

int tokcache_store(const struct tokenized *ds, const char *path, uint64_t key, struct moai_err *err)
{
    char dir[4096];
    unsigned char *file = NULL;
    size_t size = 0;
    int rc;

    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = '\0';
        if (dir[0] && (rc = make_dirs(dir, err)) < 0)
            return rc;
    }
    if ((rc = encode_file(ds, key, path, &file, &size, err)) < 0)
        return rc;
    rc = atomicfile_write_all(path, file, size, err);
    free(file);
    return rc;
}

/* The chat template a tokenizer's special tokens call for; -1 when none fits. */
static int chat_of_tokenizer(const struct tokenizer *tk)
{
    if (tokenizer_token_id(tk, "<|start_header_id|>") >= 0)
        return DATASET_CHAT_LLAMA3;
    if (tokenizer_token_id(tk, "<|im_start|>") >= 0)
        return DATASET_CHAT_CHATML;
    if (tokenizer_token_id(tk, "[INST]") >= 0)
        return DATASET_CHAT_MISTRAL;
    return -1;
}

static int tokenize_fresh(struct tokenized *out, const char *dataset_path,
                          const char *tokenizer_path, const char *tmpl, const char *response_start,
                          const struct data_recipe *dr, int64_t T, int64_t limit,
                          struct moai_err *err)
{
    struct dataset_texts texts;
    struct dataset_template t;
    struct dataset_format f = {.kind = DATASET_TEXT, .tmpl = &t, .train_all = dr && dr->train_all};
    bool parsed = false;
    int rc = 0;
    const char *format = dr && dr->format ? dr->format : "text";
    struct tokenizer *tk = tokenizer_load(tokenizer_path, err);
    if (!tk)
        return err ? err->code : MOAI_EIO;
    if (!strcmp(format, "text")) {
        if ((rc = dataset_template_parse(&t, tmpl ? tmpl : "", response_start, err)) < 0)
            goto out;
        parsed = true;
    } else if (!strcmp(format, "alpaca")) {
        f.kind = DATASET_ALPACA;
    } else if (!strcmp(format, "messages")) {
        f.kind = DATASET_MESSAGES;
        int chat = chat_of_tokenizer(tk);
        if (dr->chat_template && dataset_chat_parse(&f.chat, dr->chat_template) < 0) {
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "unknown chat template '%s' (expected llama3, "
                              "llama2, mistral or chatml)",
                              dr->chat_template);
            goto out;
        }
        if (!dr->chat_template && chat < 0) {
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "no chat template fits the tokenizer '%s' (it "
                              "has none of <|start_header_id|>, <|im_start|>, [INST])",
                              tokenizer_path);
            moai_err_hint(err, "set dataset.chat_template: llama3, llama2, mistral or chatml");
            goto out;
        }
        if (!dr->chat_template)
            f.chat = (enum dataset_chat) chat;
    } else {
        rc = moai_err_set(err, MOAI_EUSAGE,
                          "unknown dataset format '%s' (expected text, messages "
                          "or alpaca)",
                          format);
        goto out;
    }
    rc = dataset_load_format(&texts, dataset_path, &f, limit, err);
    if (rc == 0) {
        rc = tokenize_texts(out, &texts, tk, T, 2, err);
        dataset_texts_release(&texts);
    }
out:
    if (parsed)
        dataset_template_release(&t);
    tokenizer_free(tk);
    return rc;
}

int tokcache_prepare(struct tokenized *out, const char *dataset_path, const char *tokenizer_path,
                     const char *tmpl, const char *response_start, int64_t T, int64_t limit,
                     const char *cache_dir, struct moai_err *err)
{
    return tokcache_prepare_format(out, dataset_path, tokenizer_path, tmpl, response_start, NULL, T,
                                   limit, cache_dir, err);
}

int tokcache_prepare_format(struct tokenized *out, const char *dataset_path,
                            const char *tokenizer_path, const char *tmpl,
                            const char *response_start, const struct data_recipe *dr, int64_t T,
                            int64_t limit, const char *cache_dir, struct moai_err *err)
{
    char path[4200];
    uint64_t key = 0;
    int rc;
    memset(out, 0, sizeof(*out));
    if (T < 2 || T > INT32_MAX)
        return moai_err_set(err, MOAI_EUSAGE, "block size %" PRId64 " is outside [2, %d]", T,
                            INT32_MAX);
    if (cache_dir) {
        rc = tokcache_key_format(&key, dataset_path, tokenizer_path, tmpl, response_start, dr, T,
                                 limit, err);
        if (rc < 0)
            return rc;
        tokcache_path(path, sizeof(path), cache_dir, key);
        struct moai_err lerr = {0};
        double t0 = progress_now();
        if (tokcache_load(out, path, key, &lerr) == 0) {
            log_info("Loaded %" PRId64 " tokenized examples from the cache '%s' in %.2f s.", out->n,
                     path, progress_now() - t0);
            tokenized_log_stats(out);
            return 0;
        }
        if (access(path, F_OK) == 0)
            log_warn("token cache unusable (%s); rebuilding it", lerr.msg);
    }
    rc = tokenize_fresh(out, dataset_path, tokenizer_path, tmpl, response_start, dr, T, limit, err);
    if (rc < 0)
        return rc;
    tokenized_log_stats(out);
    if (cache_dir) {
        struct moai_err serr = {0};
        if (tokcache_store(out, path, key, &serr) < 0)
            log_warn("cannot store the token cache: %s", serr.msg);
    }
    return 0;
}
