/* dataset.c - JSON Lines datasets, plain or zstd-streamed, and prompt template filling. */
#include "data/dataset.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

/* ---- templates ---- */

/* Writes s into buf for a one-line message: newlines and tabs escaped, cut at 60 bytes. */
static const char *quote_one_line(char *buf, size_t size, const char *s)
{
    size_t j = 0;
    for (size_t i = 0; s[i] && j + 5 < size; i++) {
        if (i >= 60) {
            memcpy(buf + j, "...", 3);
            j += 3;
            break;
        }
        if (s[i] == '\n' || s[i] == '\t') {
            buf[j++] = '\\';
            buf[j++] = s[i] == '\n' ? 'n' : 't';
        } else {
            buf[j++] = s[i];
        }
    }
    buf[j] = '\0';
    return buf;
}

static int add_part(struct dataset_template *t, const char *text, size_t len, int is_field)
{
    struct dataset_part *p = realloc(t->parts, sizeof(*p) * (size_t) (t->nparts + 1));
    if (!p)
        return MOAI_ENOMEM;
    t->parts = p;
    char *s = malloc(len + 1);
    if (!s)
        return MOAI_ENOMEM;
    memcpy(s, text, len);
    s[len] = '\0';
    p[t->nparts].text = s;
    p[t->nparts].len = len;
    p[t->nparts].is_field = is_field;
    t->nparts++;
    return 0;
}

int dataset_template_parse(struct dataset_template *t, const char *tmpl, const char *response_start,
                           struct moai_err *err)
{
    char q[128];
    size_t n = strlen(tmpl);
    char *lit = malloc(n + 1);
    size_t nlit = 0;
    int rc = 0;
    memset(t, 0, sizeof(*t));
    t->resp_part = -1;
    if (!lit)
        return moai_err_set(err, MOAI_ENOMEM, "template: out of memory");
    for (size_t i = 0; i < n && rc == 0;) {
        if (tmpl[i] == '{' && tmpl[i + 1] == '{') {
            lit[nlit++] = '{';
            i += 2;
        } else if (tmpl[i] == '}' && tmpl[i + 1] == '}') {
            lit[nlit++] = '}';
            i += 2;
        } else if (tmpl[i] == '}') {
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "template '%s': single '}' at column %zu (write '}}' for a "
                              "literal brace)",
                              quote_one_line(q, sizeof(q), tmpl), i + 1);
        } else if (tmpl[i] == '{') {
            size_t j = i + 1;
            while (j < n && tmpl[j] != '}' && tmpl[j] != '{')
                j++;
            if (j >= n || tmpl[j] == '{')
                rc = moai_err_set(err, MOAI_EUSAGE, "template '%s': unclosed '{' at column %zu",
                                  quote_one_line(q, sizeof(q), tmpl), i + 1);
            else if (j == i + 1)
                rc = moai_err_set(err, MOAI_EUSAGE,
                                  "template '%s': empty field name '{}' at column %zu",
                                  quote_one_line(q, sizeof(q), tmpl), i + 1);
            if (rc == 0 && nlit > 0) {
                rc = add_part(t, lit, nlit, 0);
                nlit = 0;
            }
            if (rc == 0)
                rc = add_part(t, tmpl + i + 1, j - i - 1, 1);
            i = j + 1;
        } else {
            lit[nlit++] = tmpl[i++];
        }
    }
    if (rc == 0 && nlit > 0)
        rc = add_part(t, lit, nlit, 0);
    free(lit);
    if (rc == MOAI_ENOMEM)
        moai_err_set(err, rc, "template: out of memory");
    if (rc == 0 && response_start && response_start[0]) {
        size_t rl = strlen(response_start);
        for (int k = 0; k < t->nparts && t->resp_part < 0; k++) {
            const struct dataset_part *p = &t->parts[k];
            const char *at = p->is_field ? NULL : memmem(p->text, p->len, response_start, rl);
            if (at) {
                t->resp_part = k;
                t->resp_end = (size_t) (at - p->text) + rl;
            }
        }
        if (t->resp_part < 0) {
            char q2[128];
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "response_start '%s' does not occur in the literal text of "
                              "template '%s'",
                              quote_one_line(q2, sizeof(q2), response_start),
                              quote_one_line(q, sizeof(q), tmpl));
        }
    }
    if (rc < 0)
        dataset_template_release(t);
    return rc;
}

void dataset_template_release(struct dataset_template *t)
{
    for (int k = 0; k < t->nparts; k++)
        free(t->parts[k].text);
    free(t->parts);
    t->parts = NULL;
    t->nparts = 0;
}

/* ---- a byte source: a file or memory, optionally zstd-decompressed ---- */

#define SRC_CHUNK ((size_t) 1 << 17)

struct src {
    const char *name;
    FILE *f;
    const unsigned char *mem; /* memory source, or NULL */
    size_t memsize, mempos;
    bool zstd, raw_eof;
    ZSTD_DStream *zs;
    unsigned char *in; /* raw bytes read ahead (zstd) */
    ZSTD_inBuffer zin;
    size_t zret; /* the decoder's last return that made progress: 0 when a frame just ended */
    unsigned char *out; /* bytes ready for the line splitter */
    size_t outlen, outpos;
};

/* Reads up to cap raw bytes. Returns the count, 0 at the end, or a negative code. */
static long read_raw(struct src *s, unsigned char *buf, size_t cap, struct moai_err *err)
{
    if (s->mem) {
        size_t k = s->memsize - s->mempos < cap ? s->memsize - s->mempos : cap;
        memcpy(buf, s->mem + s->mempos, k);
        s->mempos += k;
        return (long) k;
    }
    size_t k = fread(buf, 1, cap, s->f);
    if (k < cap && ferror(s->f))
        return moai_err_set(err, MOAI_EIO, "cannot read '%s': %s", s->name, strerror(errno));
    return (long) k;
}

static int src_open(struct src *s, struct moai_err *err)
{
    unsigned char magic[4] = {0};
    size_t have;
    s->out = malloc(SRC_CHUNK);
    s->in = malloc(SRC_CHUNK);
    if (!s->out || !s->in)
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", s->name);
    if (s->mem) {
        have = s->memsize < 4 ? s->memsize : 4;
        memcpy(magic, s->mem, have);
    } else {
        long k = read_raw(s, s->in, SRC_CHUNK, err);
        if (k < 0)
            return (int) k;
        have = (size_t) k;
        memcpy(magic, s->in, have < 4 ? have : 4);
    }
    s->zstd =
        have >= 4 && magic[0] == 0x28 && magic[1] == 0xB5 && magic[2] == 0x2F && magic[3] == 0xFD;
    if (s->zstd) {
        s->zs = ZSTD_createDStream();
        if (!s->zs)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", s->name);
        ZSTD_initDStream(s->zs);
        s->zret = 1; /* nothing decoded yet */
        s->zin.src = s->in;
        s->zin.size = s->mem ? 0 : have;
        s->zin.pos = 0;
    } else if (!s->mem) {
        memcpy(s->out, s->in, have); /* the bytes already read are the first output */
        s->outlen = have;
    }
    return 0;
}

/* Makes the next output bytes ready. Returns their count, 0 at the end, or a negative code. */
static long src_fill(struct src *s, struct moai_err *err)
{
    s->outpos = s->outlen = 0;
    if (!s->zstd) {
        long k = read_raw(s, s->out, SRC_CHUNK, err);
        s->outlen = k > 0 ? (size_t) k : 0;
        return k;
    }
    for (;;) {
        if (s->zin.pos == s->zin.size && !s->raw_eof) {
            long k = read_raw(s, s->in, SRC_CHUNK, err);
            if (k < 0)
                return k;
            s->raw_eof = k == 0;
            s->zin.src = s->in;
            s->zin.size = (size_t) k;
            s->zin.pos = 0;
        }
        ZSTD_outBuffer o = {s->out, SRC_CHUNK, 0};
        size_t in_before = s->zin.pos;
        size_t ret = ZSTD_decompressStream(s->zs, &o, &s->zin);
        if (ZSTD_isError(ret))
            return moai_err_set(err, MOAI_EIO, "%s: corrupt zstd data: %s", s->name,
                                ZSTD_getErrorName(ret));
        if (o.pos > 0 || s->zin.pos != in_before)
            s->zret = ret;
        if (o.pos > 0) {
            s->outlen = o.pos;
            return (long) o.pos;
        }
        if (s->raw_eof && s->zin.pos == s->zin.size) {
            if (s->zret != 0)
                return moai_err_set(err, MOAI_EIO, "%s: truncated zstd stream", s->name);
            return 0;
        }
    }
}

static void src_close(struct src *s)
{
    ZSTD_freeDStream(s->zs);
    free(s->in);
    free(s->out);
    if (s->f)
        fclose(s->f);
}

/* ---- records ---- */

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* Makes buf hold at least need bytes. */
static int texts_reserve(struct dataset_texts *d, size_t need)
{
    if (need > d->cap) {
        size_t cap = d->cap ? d->cap : 1 << 16;
        while (cap < need)
            cap *= 2;
        char *b = realloc(d->buf, cap);
        if (!b)
            return MOAI_ENOMEM;
        d->buf = b;
        d->cap = cap;
    }
    return 0;
}

/* Room for record n: grows the per-record arrays geometrically. */
static int texts_grow(struct dataset_texts *d, int64_t *rec_cap)
{
    if (d->n + 1 < *rec_cap)
        return 0;
    int64_t c = *rec_cap ? *rec_cap * 2 : 1024;
    size_t *off = realloc(d->off, sizeof(size_t) * (size_t) (c + 1));
    if (!off)
        return MOAI_ENOMEM;
    d->off = off;
    size_t *re = realloc(d->resp_end, sizeof(size_t) * (size_t) c);
    if (!re)
        return MOAI_ENOMEM;
    d->resp_end = re;
    int64_t *ln = realloc(d->line, sizeof(int64_t) * (size_t) c);
    if (!ln)
        return MOAI_ENOMEM;
    d->line = ln;
    size_t *so = realloc(d->spec_off, sizeof(size_t) * (size_t) (c + 1));
    if (!so)
        return MOAI_ENOMEM;
    d->spec_off = so;
    *rec_cap = c;
    return 0;
}

/* Appends the range [a, b) to the special-token ranges of the record being added. */
static int spec_add(struct dataset_texts *d, size_t *spec_cap, size_t a, size_t b)
{
    size_t used = d->spec_off[d->n];
    if (used + 2 > *spec_cap) {
        size_t c = *spec_cap ? *spec_cap * 2 : 1024;
        size_t *sp = realloc(d->spec, sizeof(size_t) * c);
        if (!sp)
            return MOAI_ENOMEM;
        d->spec = sp;
        *spec_cap = c;
    }
    d->spec[used] = a;
    d->spec[used + 1] = b;
    d->spec_off[d->n] = used + 2; /* moved to spec_off[n + 1] when the record is complete */
    return 0;
}

static bool is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

/* Parses one line and appends its filled text as record d->n. On failure the partial text is
 * left past off[n] and the caller gives up on the whole dataset. */
static int add_record(struct dataset_texts *d, const struct dataset_template *t, const char *name,
                      int64_t lineno, const char *line, size_t len, size_t *spec_cap,
                      struct moai_err *err)
{
    size_t spec_start = d->spec_off[d->n];
    json_error_t jerr;
    json_t *obj = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    size_t start = d->off[d->n], used = start;
    int rc = 0;
    if (!obj && strstr(jerr.text, "unable to decode byte"))
        return moai_err_set(err, MOAI_EIO, "%s:%" PRId64 ":%d: invalid UTF-8 (%s)", name, lineno,
                            jerr.column, jerr.text);
    if (!obj)
        return moai_err_set(err, MOAI_EIO, "%s:%" PRId64 ":%d: invalid JSON: %s", name, lineno,
                            jerr.column, jerr.text);
    if (!json_is_object(obj)) {
        rc = moai_err_set(err, MOAI_EIO, "%s:%" PRId64 ": record is %s, not an object", name,
                          lineno, json_kind(obj));
        goto out;
    }
    d->resp_end[d->n] = SIZE_MAX;
    for (int k = 0; k <= t->nparts; k++) {
        const char *s = "";
        size_t n = 1; /* the final NUL */
        if (k < t->nparts) {
            const struct dataset_part *p = &t->parts[k];
            s = p->text;
            n = p->len;
            if (p->is_field) {
                json_t *v = json_object_get(obj, p->text);
                if (!v) {
                    rc = moai_err_set(err, MOAI_EIO,
                                      "%s:%" PRId64
                                      ": record has no field '%s' (the template needs it)",
                                      name, lineno, p->text);
                    goto out;
                }
                if (!json_is_string(v)) {
                    rc = moai_err_set(err, MOAI_EIO,
                                      "%s:%" PRId64 ": field '%s' is %s, not a string", name,
                                      lineno, p->text, json_kind(v));
                    goto out;
                }
                s = json_string_value(v);
                n = json_string_length(v);
            }
        }
        if (texts_reserve(d, used + n) < 0) {
            rc = moai_err_set(err, MOAI_ENOMEM, "%s:%" PRId64 ": out of memory", name, lineno);
            goto out;
        }
        memcpy(d->buf + used, s, n);
        if (k < t->nparts && !t->parts[k].is_field && n > 0 &&
            spec_add(d, spec_cap, used - start, used - start + n) < 0) {
            rc = moai_err_set(err, MOAI_ENOMEM, "%s:%" PRId64 ": out of memory", name, lineno);
            goto out;
        }
        if (k == t->resp_part)
            d->resp_end[d->n] = used - start + t->resp_end;
        used += n;
    }
    d->line[d->n] = lineno;
    size_t spec_end = d->spec_off[d->n];
    d->spec_off[d->n] = spec_start;
    d->n++;
    d->off[d->n] = used;
    d->spec_off[d->n] = spec_end;
    json_decref(obj);
    return 0;
out:
    d->spec_off[d->n] = spec_start;
    json_decref(obj);
    return rc;
}

/* Reads every line of s, filling records until limit. */
static int read_lines(struct dataset_texts *d, struct src *s, const struct dataset_template *t,
                      int64_t limit, struct moai_err *err)
{
    char *line = NULL;
    size_t len = 0, cap = 0;
    int64_t lineno = 0, rec_cap = 0;
    size_t spec_cap = 0;
    bool done = false;
    int rc = texts_grow(d, &rec_cap);
    if (rc < 0)
        goto oom;
    d->off[0] = 0;
    d->spec_off[0] = 0;
    while (!done && (limit < 0 || d->n < limit)) {
        if (s->outpos == s->outlen) {
            long k = src_fill(s, err);
            if (k < 0) {
                rc = (int) k;
                goto out;
            }
            if (k == 0)
                done = true; /* the last line may lack its newline */
        }
        const char *from = (const char *) s->out + s->outpos;
        size_t avail = s->outlen - s->outpos;
        const char *nl = done ? NULL : memchr(from, '\n', avail);
        size_t take = nl ? (size_t) (nl - from) : avail;
        if (len + take + 1 > cap) {
            size_t c = cap ? cap : 4096;
            while (c < len + take + 1)
                c *= 2;
            char *l = realloc(line, c);
            if (!l)
                goto oom;
            line = l;
            cap = c;
        }
        memcpy(line + len, from, take);
        len += take;
        s->outpos += take + (nl ? 1 : 0);
        if (!nl && !done)
            continue;
        if (done && len == 0 && lineno > 0)
            break;
        lineno++;
        if (!is_blank(line, len)) {
            if ((rc = texts_grow(d, &rec_cap)) < 0)
                goto oom;
            if ((rc = add_record(d, t, s->name, lineno, line, len, &spec_cap, err)) < 0)
                goto out;
        }
        len = 0;
    }
    if (d->n == 0)
        rc = moai_err_set(err, MOAI_EIO, "%s: dataset has no records", s->name);
    goto out;
oom:
    rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", s->name);
out:
    free(line);
    return rc;
}

static int load(struct dataset_texts *out, struct src *s, const char *tmpl,
                const char *response_start, int64_t limit, struct moai_err *err)
{
    struct dataset_template t;
    int rc = dataset_template_parse(&t, tmpl, response_start, err);
    memset(out, 0, sizeof(*out));
    if (rc < 0) {
        src_close(s);
        return rc;
    }
    rc = src_open(s, err);
    if (rc == 0)
        rc = read_lines(out, s, &t, limit, err);
    if (rc == 0 && t.resp_part < 0) {
        free(out->resp_end);
        out->resp_end = NULL;
    }
    src_close(s);
    dataset_template_release(&t);
    if (rc < 0)
        dataset_texts_release(out);
    return rc;
}

int dataset_load(struct dataset_texts *out, const char *path, const char *tmpl,
                 const char *response_start, int64_t limit, struct moai_err *err)
{
    struct src s = {.name = path};
    memset(out, 0, sizeof(*out));
    s.f = fopen(path, "rb");
    if (!s.f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    return load(out, &s, tmpl, response_start, limit, err);
}

int dataset_load_mem(struct dataset_texts *out, const char *name, const void *data, size_t size,
                     const char *tmpl, const char *response_start, int64_t limit,
                     struct moai_err *err)
{
    static const unsigned char empty[1];
    struct src s = {.name = name, .mem = data ? data : empty, .memsize = size};
    return load(out, &s, tmpl, response_start, limit, err);
}

void dataset_texts_release(struct dataset_texts *d)
{
    free(d->buf);
    free(d->off);
    free(d->resp_end);
    free(d->line);
    free(d->spec);
    free(d->spec_off);
    memset(d, 0, sizeof(*d));
}
