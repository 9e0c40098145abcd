/* tokenizer.c - the tokenizer interface: SentencePiece, tokenizer.json BPE or tiktoken. */
#include "data/tokenizer.h"

#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/bpe.h"
#include "data/spm.h"

struct tokenizer {
    struct spm *sp; /* one of sp and bpe */
    struct bpe *bpe;
    char path[4096];
};

int tokenizer_resolve(char *buf, size_t size, const char *path, struct moai_err *err)
{
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        static const char *const names[] = {"tokenizer.json", "tokenizer.model"};
        for (int i = 0; i < 2; i++) {
            snprintf(buf, size, "%s/%s", path, names[i]);
            if (access(buf, F_OK) == 0)
                return 0;
        }
        return moai_err_set(err, MOAI_EIO,
                            "'%s' holds neither tokenizer.json nor "
                            "tokenizer.model",
                            path);
    }
    snprintf(buf, size, "%s", path);
    return 0;
}

/* Reads the first bytes of path into head; returns the count or -1 with err set. */
static long read_head(const char *path, char *head, size_t size, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    size_t n = fread(head, 1, size, f);
    int bad = ferror(f);
    fclose(f);
    if (bad)
        return moai_err_set(err, MOAI_EIO, "cannot read '%s'", path);
    return (long) n;
}

struct tokenizer *tokenizer_load(const char *path, struct moai_err *err)
{
    struct tokenizer *tk = calloc(1, sizeof(*tk));
    char head[512];
    if (!tk) {
        moai_err_set(err, MOAI_ENOMEM, "loading tokenizer '%s': out of memory", path);
        return NULL;
    }
    if (tokenizer_resolve(tk->path, sizeof(tk->path), path, err) < 0)
        goto fail;
    long n = read_head(tk->path, head, sizeof(head), err);
    if (n < 0)
        goto fail;
    long i = 0;
    while (i < n && (head[i] == ' ' || head[i] == '\n' || head[i] == '\r' || head[i] == '\t'))
        i++;
    if ((i < n && head[i] == '{') || bpe_is_tiktoken(head, (size_t) n)) {
        if (!(tk->bpe = bpe_load_file(tk->path, err)))
            goto fail;
        return tk;
    }
    /* A SentencePiece model is a protobuf: its first field is tag 0x0a (pieces). */
    if (n == 0 || head[0] != 0x0a) {
        moai_err_set(err, MOAI_EUSAGE,
                     "'%s' is not a tokenizer: expected a tokenizer.json, a "
                     "tiktoken file or a SentencePiece model",
                     tk->path);
        goto fail;
    }
    if (!(tk->sp = spm_load(tk->path, err)))
        goto fail;
    return tk;
fail:
    free(tk);
    return NULL;
}

void tokenizer_free(struct tokenizer *tk)
{
    if (!tk)
        return;
    spm_free(tk->sp);
    bpe_free(tk->bpe);
    free(tk);
}

/* The next BOS or EOS piece ("<s>", "</s>") inside the allowed ranges at or after from:
 * its offset (len when none), *id and *plen. SentencePiece never makes them from text. */
static size_t spm_next_special(const struct tokenizer *tk, const char *text, size_t len,
                               const size_t *spec, size_t nspec, size_t from, int32_t *id,
                               size_t *plen)
{
    int32_t sp_ids[2] = {spm_bos_id(tk->sp), spm_eos_id(tk->sp)};
    size_t best = len;
    for (size_t r = 0; r < nspec; r++) {
        size_t a = spec[2 * r] > from ? spec[2 * r] : from, z = spec[2 * r + 1];
        for (int k = 0; k < 2; k++) {
            const char *piece = sp_ids[k] >= 0 ? spm_piece(tk->sp, sp_ids[k]) : NULL;
            size_t pl = piece ? strlen(piece) : 0;
            for (size_t i = a; pl && i + pl <= z && i < best; i++)
                if (!memcmp(text + i, piece, pl)) {
                    best = i, *id = sp_ids[k], *plen = pl;
                    break;
                }
        }
        if (best < len)
            break;
    }
    return best;
}

/* SentencePiece over the segments between BOS / EOS pieces of the template's text; starts may
 * be NULL. Each segment is encoded on its own, as Hugging Face's Llama tokenizer does. */
static int spm_encode_segments(const struct tokenizer *tk, const char *text, size_t len,
                               const size_t *spec, size_t nspec, size_t boundary, int32_t *ids,
                               uint32_t *starts, size_t cap, size_t *n, size_t *n_before,
                               struct moai_err *err)
{
    size_t total = 0, before = 0, from = 0;
    int32_t *seg_ids = malloc(sizeof(int32_t) * (len + 1));
    uint32_t *seg_st = malloc(sizeof(uint32_t) * (len + 1));
    int rc = 0;
    if (!seg_ids || !seg_st) {
        rc = moai_err_set(err, MOAI_ENOMEM, "tokenizing: out of memory");
        goto out;
    }
    while (from <= len) {
        int32_t sid = -1;
        size_t pl = 0, at = spm_next_special(tk, text, len, spec, nspec, from, &sid, &pl), k = 0;
        if (at > from && (rc = spm_encode_offsets(tk->sp, text + from, at - from, seg_ids, seg_st,
                                                  len + 1, &k, err)) < 0)
            goto out;
        for (size_t i = 0; i < k; i++, total++) {
            if (total < cap) {
                ids[total] = seg_ids[i];
                if (starts)
                    starts[total] = (uint32_t) (from + seg_st[i]);
            }
            before += from + seg_st[i] < boundary;
        }
        if (at >= len)
            break;
        if (total < cap) {
            ids[total] = sid;
            if (starts)
                starts[total] = (uint32_t) at;
        }
        total++;
        before += at < boundary;
        from = at + pl;
    }
    *n = total;
    if (n_before)
        *n_before = before;
out:
    free(seg_ids);
    free(seg_st);
    return rc;
}

int tokenizer_encode(const struct tokenizer *tk, const char *text, size_t len, const size_t *spec,
                     size_t nspec, size_t boundary, int32_t *ids, size_t cap, size_t *n,
                     size_t *n_before, struct moai_err *err)
{
    int32_t sid;
    size_t pl;
    if (tk->sp && spec && spm_next_special(tk, text, len, spec, nspec, 0, &sid, &pl) < len)
        return spm_encode_segments(tk, text, len, spec, nspec, boundary, ids, NULL, cap, n,
                                   n_before, err);
    if (tk->bpe)
        return bpe_encode(tk->bpe, text, len, spec, nspec, boundary, ids, cap, n, n_before, err);
    size_t before = 0;
    int rc = boundary == SIZE_MAX
                 ? spm_encode_into(tk->sp, text, len, ids, cap, n, err)
                 : spm_encode_split(tk->sp, text, len, boundary, ids, cap, n, &before, err);
    if (n_before)
        *n_before = boundary == SIZE_MAX ? *n : before;
    return rc;
}

int tokenizer_encode_starts(const struct tokenizer *tk, const char *text, size_t len,
                            const size_t *spec, size_t nspec, int32_t *ids, uint32_t *starts,
                            size_t cap, size_t *n, struct moai_err *err)
{
    if (tk->bpe)
        return bpe_encode_starts(tk->bpe, text, len, spec, nspec, SIZE_MAX, ids, starts, cap, n,
                                 NULL, err);
    int32_t sid;
    size_t pl;
    if (spec && spm_next_special(tk, text, len, spec, nspec, 0, &sid, &pl) < len)
        return spm_encode_segments(tk, text, len, spec, nspec, SIZE_MAX, ids, starts, cap, n, NULL,
                                   err);
    return spm_encode_offsets(tk->sp, text, len, ids, starts, cap, n, err);
}

int32_t tokenizer_bos_id(const struct tokenizer *tk)
{
    return tk->bpe ? bpe_bos_id(tk->bpe) : spm_bos_id(tk->sp);
}

int32_t tokenizer_eos_id(const struct tokenizer *tk)
{
    return tk->bpe ? bpe_eos_id(tk->bpe) : spm_eos_id(tk->sp);
}

int32_t tokenizer_pad_id(const struct tokenizer *tk)
{
    if (tk->bpe)
        return bpe_pad_id(tk->bpe);
    return spm_pad_id(tk->sp) >= 0 ? spm_pad_id(tk->sp) : spm_eos_id(tk->sp);
}

int32_t tokenizer_vocab_size(const struct tokenizer *tk)
{
    return tk->bpe ? bpe_vocab_size(tk->bpe) : spm_vocab_size(tk->sp);
}

int32_t tokenizer_token_id(const struct tokenizer *tk, const char *token)
{
    if (tk->bpe)
        return bpe_token_id(tk->bpe, token);
    int32_t id = spm_piece_id(tk->sp, token);
    return id == spm_unk_id(tk->sp) && strcmp(token, "<unk>") ? -1 : id;
}

const char *tokenizer_kind(const struct tokenizer *tk)
{
    return tk->bpe ? bpe_kind(tk->bpe) : "sentencepiece";
}

const char *tokenizer_path(const struct tokenizer *tk)
{
    return tk->path;
}

/* The text of token id, or NULL. */
static const char *token_text(const struct tokenizer *tk, int32_t id, char *buf, size_t size)
{
    if (id < 0)
        return NULL;
    if (tk->sp)
        return spm_piece(tk->sp, id);
    size_t len;
    const char *s = bpe_token_bytes(tk->bpe, id, &len);
    if (!s || len + 1 > size)
        return NULL;
    memcpy(buf, s, len);
    buf[len] = 0;
    return buf;
}

int tokenizer_checkpoint_files(const char *path, const char **file_name, char **resolved,
                               json_t **config, struct moai_err *err)
{
    struct tokenizer *tk = tokenizer_load(path, err);
    json_t *cfg = NULL;
    if (!tk)
        return err ? err->code : MOAI_EIO;
    bool is_json = tk->bpe && strcmp(bpe_kind(tk->bpe), "tiktoken");
    if (is_json) {
        char cpath[4200];
        const char *slash = strrchr(tk->path, '/');
        snprintf(cpath, sizeof(cpath), "%.*stokenizer_config.json",
                 slash ? (int) (slash - tk->path + 1) : 0, tk->path);
        if (access(cpath, R_OK) == 0) {
            json_error_t jerr;
            cfg = json_load_file(cpath, 0, &jerr); /* read once already: it parses */
        }
    }
    if (!json_is_object(cfg)) {
        json_decref(cfg);
        cfg = json_object();
    }
    char buf[3][256];
    int32_t ids[3] = {tokenizer_bos_id(tk), tokenizer_eos_id(tk), tokenizer_pad_id(tk)};
    static const char *const keys[3] = {"bos_token", "eos_token", "pad_token"};
    for (int k = 0; k < 3; k++) {
        const char *t = token_text(tk, ids[k], buf[k], sizeof(buf[k]));
        json_object_set_new(cfg, keys[k], t ? json_string(t) : json_null());
    }
    json_object_set_new(cfg, "add_bos_token", json_boolean(ids[0] >= 0));
    json_object_set_new(cfg, "add_eos_token", json_false());
    json_object_set_new(cfg, "tokenizer_class",
                        json_string(tk->sp ? "LlamaTokenizer" : "PreTrainedTokenizerFast"));
    *file_name = is_json ? "tokenizer.json" : "tokenizer.model";
    *resolved = strdup(tk->path);
    tokenizer_free(tk);
    if (!*resolved) {
        json_decref(cfg);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    *config = cfg;
    return 0;
}

int tokenizer_check_vocab(const char *path, int64_t vocab_size, struct moai_err *err)
{
    struct tokenizer *tk = tokenizer_load(path, err);
    if (!tk)
        return err ? err->code : MOAI_EIO;
    int32_t n = tokenizer_vocab_size(tk);
    int rc = 0;
    if (n > vocab_size)
        rc = moai_err_set(err, MOAI_EUSAGE,
                          "tokenizer '%s' has %d ids, more than the model's "
                          "vocabulary of %lld",
                          tk->path, (int) n, (long long) vocab_size);
    else if (tokenizer_eos_id(tk) < 0)
        rc = moai_err_set(err, MOAI_EUSAGE, "tokenizer '%s' has no EOS token", tk->path);
    tokenizer_free(tk);
    return rc;
}
