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

/* The field that opens at tmpl[i] ('{') closes at *end ('}'), with a name. */
static int field_end(const char *tmpl, size_t i, size_t *end, struct moai_err *err)
{
    char q[128];
    size_t n = strlen(tmpl), j = i + 1;
    while (j < n && tmpl[j] != '}' && tmpl[j] != '{')
        j++;
    if (j >= n || tmpl[j] == '{')
        return moai_err_set(err, MOAI_EUSAGE, "template '%s': unclosed '{' at column %zu",
                            quote_one_line(q, sizeof(q), tmpl), i + 1);
    if (j == i + 1)
        return moai_err_set(err, MOAI_EUSAGE, "template '%s': empty field name '{}' at column %zu",
                            quote_one_line(q, sizeof(q), tmpl), i + 1);
    *end = j;
    return 0;
}

/* tmpl cut into t's parts: literal text ("{{" and "}}" for braces) and {field}s. */
static int template_split(struct dataset_template *t, const char *tmpl, struct moai_err *err)
{
    char q[128];
    size_t n = strlen(tmpl), nlit = 0;
    char *lit = malloc(n + 1);
    int rc = 0;
    if (!lit)
        return moai_err_set(err, MOAI_ENOMEM, "template: out of memory");
    for (size_t i = 0; i < n && rc == 0;) {
        size_t j = i;
        if ((tmpl[i] == '{' || tmpl[i] == '}') && tmpl[i + 1] == tmpl[i]) {
            lit[nlit++] = tmpl[i];
            i += 2;
        } else if (tmpl[i] == '}') {
            rc = moai_err_set(err, MOAI_EUSAGE,
                              "template '%s': single '}' at column %zu (write '}}' for a "
                              "literal brace)",
                              quote_one_line(q, sizeof(q), tmpl), i + 1);
        } else if (tmpl[i] == '{') {
            if ((rc = field_end(tmpl, i, &j, err)) == 0 && nlit > 0) {
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
    return rc;
}

/* The first literal part holding response_start: t->resp_part, and t->resp_end just past it. */
static int find_response_start(struct dataset_template *t, const char *tmpl,
                               const char *response_start, struct moai_err *err)
{
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
        char q[128], q2[128];
        return moai_err_set(err, MOAI_EUSAGE,
                            "response_start '%s' does not occur in the literal text of "
                            "template '%s'",
                            quote_one_line(q2, sizeof(q2), response_start),
                            quote_one_line(q, sizeof(q), tmpl));
    }
    return 0;
}

int dataset_template_parse(struct dataset_template *t, const char *tmpl, const char *response_start,
                           struct moai_err *err)
{
    memset(t, 0, sizeof(*t));
    t->resp_part = -1;
    int rc = template_split(t, tmpl, err);
    if (rc == 0 && response_start && response_start[0])
        rc = find_response_start(t, tmpl, response_start, err);
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
    size_t *to = realloc(d->train_off, sizeof(size_t) * (size_t) (c + 1));
    if (!to)
        return MOAI_ENOMEM;
    d->train_off = to;
    *rec_cap = c;
    return 0;
}

/* One record being built: its text is appended at d->buf + used, its ranges at the ends of
 * d->spec and d->train (counted in spec_off[n] and train_off[n] until it is complete). */
struct rec {
    struct dataset_texts *d;
    size_t start, used;
    size_t *spec_cap, *train_cap;
};

/* Appends [a, b) to a record's range list, merging it with a range that ends at a. */
static int range_add(size_t **arr, size_t *cap, size_t *count, size_t a, size_t b)
{
    if (a == b)
        return 0;
    if (*count >= 2 && (*arr)[*count - 1] == a) {
        (*arr)[*count - 1] = b;
        return 0;
    }
    if (*count + 2 > *cap) {
        size_t c = *cap ? *cap * 2 : 1024;
        size_t *sp = realloc(*arr, sizeof(size_t) * c);
        if (!sp)
            return MOAI_ENOMEM;
        *arr = sp;
        *cap = c;
    }
    (*arr)[*count] = a;
    (*arr)[*count + 1] = b;
    *count += 2;
    return 0;
}

/* Appends n bytes of s to the record: markup (special tokens allowed) or record text, in the
 * loss or not. */
static int rec_put(struct rec *r, const char *s, size_t n, bool markup, bool train)
{
    struct dataset_texts *d = r->d;
    if (texts_reserve(d, r->used + n + 1) < 0)
        return MOAI_ENOMEM;
    memcpy(d->buf + r->used, s, n);
    size_t a = r->used - r->start, b = a + n;
    r->used += n;
    if (markup && range_add(&d->spec, r->spec_cap, &d->spec_off[d->n], a, b) < 0)
        return MOAI_ENOMEM;
    if (train && range_add(&d->train, r->train_cap, &d->train_off[d->n], a, b) < 0)
        return MOAI_ENOMEM;
    return 0;
}

static int rec_puts(struct rec *r, const char *s, bool markup, bool train)
{
    return rec_put(r, s, strlen(s), markup, train);
}

static bool is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

/* "'a', 'b'" - the fields of a record, for the error of a missing one. */
static const char *field_list(char *buf, size_t size, json_t *obj)
{
    const char *key;
    json_t *val;
    size_t len = 0;
    buf[0] = '\0';
    json_object_foreach(obj, key, val)
    {
        (void) val;
        if (len + strlen(key) + 8 >= size) {
            snprintf(buf + len, size - len, ", ...");
            break;
        }
        len += (size_t) snprintf(buf + len, size - len, "%s'%s'", len ? ", " : "", key);
    }
    return len ? buf : "no fields";
}

/* Fills the text template with the record's fields. */
static int fill_text(struct rec *r, const struct dataset_format *f, json_t *obj, const char *where,
                     struct moai_err *err)
{
    const struct dataset_template *t = f->tmpl;
    struct dataset_texts *d = r->d;
    d->resp_end[d->n] = SIZE_MAX;
    for (int k = 0; k < t->nparts; k++) {
        const struct dataset_part *p = &t->parts[k];
        const char *s = p->text;
        size_t n = p->len;
        if (p->is_field) {
            json_t *v = json_object_get(obj, p->text);
            if (!v) {
                char has[512];
                return moai_err_set(err, MOAI_EUSAGE,
                                    "%s: record has no field '%s' (the template needs it; the "
                                    "record has %s)",
                                    where, p->text, field_list(has, sizeof(has), obj));
            }
            if (!json_is_string(v))
                return moai_err_set(err, MOAI_EIO, "%s: field '%s' is %s, not a string", where,
                                    p->text, json_kind(v));
            s = json_string_value(v);
            n = json_string_length(v);
        }
        size_t at = r->used - r->start;
        if (rec_put(r, s, n, !p->is_field, false) < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", where);
        if (k == t->resp_part)
            d->resp_end[d->n] = at + t->resp_end;
    }
    return 0;
}

/* A string field of obj, or an error naming it. */
static const char *string_field(json_t *obj, const char *key, const char *what, const char *where,
                                struct moai_err *err)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        moai_err_set(err, MOAI_EIO, "%s: %s has no field '%s'", where, what, key);
        return NULL;
    }
    if (!json_is_string(v)) {
        moai_err_set(err, MOAI_EIO, "%s: %s field '%s' is %s, not a string", where, what, key,
                     json_kind(v));
        return NULL;
    }
    return json_string_value(v);
}

/* s without leading and trailing whitespace (Jinja's strip()): start and length. */
static const char *strip(const char *s, size_t *n)
{
    size_t len = strlen(s);
    while (len && strchr(" \t\n\r\f\v", *s))
        s++, len--;
    while (len && strchr(" \t\n\r\f\v", s[len - 1]))
        len--;
    *n = len;
    return s;
}

enum role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT };

/* Renders one turn with a chat template. The BOS that opens the published templates is the
 * one the tokenizer adds (not in the text); first: the turn is the first user turn; sys: the
 * system prompt (llama2 folds it into the first user turn). */
static int render_turn(struct rec *r, const struct dataset_format *f, enum role role,
                       const char *content, const char *sys, bool first)
{
    bool tr = f->train_all || role == ROLE_ASSISTANT, rc = 0;
    static const char *const names[] = {"system", "user", "assistant"};
    size_t n;
    const char *c;
    switch (f->chat) {
    case DATASET_CHAT_LLAMA3: /* <|start_header_id|>role<|end_header_id|>\n\n strip <|eot_id|> */
        c = strip(content, &n);
        rc = rec_puts(r, "<|start_header_id|>", true, f->train_all) ||
             rec_puts(r, names[role], true, f->train_all) ||
             rec_puts(r, "<|end_header_id|>\n\n", true, f->train_all) ||
             rec_put(r, c, n, false, tr) || rec_puts(r, "<|eot_id|>", true, tr);
        break;
    case DATASET_CHAT_LLAMA2: /* [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s> */
        if (role == ROLE_USER) {
            rc = (!first && rec_puts(r, "<s>", true, f->train_all)) ||
                 rec_puts(r, "[INST] ", true, f->train_all);
            if (sys) { /* strip() applies to the system prompt and user text together */
                rc = rc || rec_puts(r, "<<SYS>>\n", true, tr) || rec_puts(r, sys, false, tr) ||
                     rec_puts(r, "\n<</SYS>>\n\n", true, tr);
                c = content, n = strlen(content);
                while (n && strchr(" \t\n\r\f\v", c[n - 1]))
                    n--;
            } else {
                c = strip(content, &n);
            }
            rc = rc || rec_put(r, c, n, false, tr) || rec_puts(r, " [/INST]", true, tr);
        } else {
            c = strip(content, &n);
            rc = rec_puts(r, " ", true, f->train_all) || rec_put(r, c, n, false, tr) ||
                 rec_puts(r, " </s>", true, tr);
        }
        break;
    case DATASET_CHAT_MISTRAL: /* [INST] user [/INST]answer</s> */
        if (role == ROLE_USER)
            rc = rec_puts(r, "[INST] ", true, tr) || rec_puts(r, content, false, tr) ||
                 rec_puts(r, " [/INST]", true, tr);
        else
            rc = rec_puts(r, content, false, tr) || rec_puts(r, "</s>", true, tr);
        break;
    case DATASET_CHAT_CHATML: /* <|im_start|>role\ncontent<|im_end|>\n */
        rc = rec_puts(r, "<|im_start|>", true, f->train_all) ||
             rec_puts(r, names[role], true, f->train_all) ||
             rec_puts(r, "\n", true, f->train_all) || rec_puts(r, content, false, tr) ||
             rec_puts(r, "<|im_end|>", true, tr) || rec_puts(r, "\n", true, f->train_all);
        break;
    }
    return rc ? MOAI_ENOMEM : 0;
}

static const char *const chat_names[] = {"llama3", "llama2", "mistral", "chatml"};

/* A record {"messages": [{"role", "content"}, ...]} through the chat template. */
static int fill_messages(struct rec *r, const struct dataset_format *f, json_t *obj,
                         const char *where, struct moai_err *err)
{
    json_t *list = json_object_get(obj, "messages"), *m;
    size_t i;
    if (!list)
        return moai_err_set(err, MOAI_EIO,
                            "%s: record has no field 'messages' (dataset.format is "
                            "messages)",
                            where);
    if (!json_is_array(list) || json_array_size(list) == 0)
        return moai_err_set(err, MOAI_EIO, "%s: 'messages' is %s, not a list of turns", where,
                            json_is_array(list) ? "empty" : json_kind(list));
    const char *sys = NULL;
    bool first_user = true, any_assistant = false;
    json_array_foreach(list, i, m)
    {
        char what[64];
        snprintf(what, sizeof(what), "messages[%zu]", i);
        if (!json_is_object(m))
            return moai_err_set(err, MOAI_EIO, "%s: %s is %s, not an object", where, what,
                                json_kind(m));
        const char *role = string_field(m, "role", what, where, err);
        const char *content = role ? string_field(m, "content", what, where, err) : NULL;
        if (!content)
            return MOAI_EIO;
        enum role ro;
        if (!strcmp(role, "system"))
            ro = ROLE_SYSTEM;
        else if (!strcmp(role, "user"))
            ro = ROLE_USER;
        else if (!strcmp(role, "assistant"))
            ro = ROLE_ASSISTANT;
        else
            return moai_err_set(err, MOAI_EIO,
                                "%s: %s has role '%s' (expected system, user or "
                                "assistant)",
                                where, what, role);
        if (ro == ROLE_SYSTEM &&
            (f->chat == DATASET_CHAT_LLAMA2 || f->chat == DATASET_CHAT_MISTRAL)) {
            if (i != 0 || f->chat == DATASET_CHAT_MISTRAL)
                return moai_err_set(err, MOAI_EIO, "%s: %s: the %s chat template takes %s", where,
                                    what, chat_names[f->chat],
                                    f->chat == DATASET_CHAT_MISTRAL ? "no system turn"
                                                                    : "a system turn only first");
            sys = content;
            continue;
        }
        if (ro == ROLE_ASSISTANT)
            any_assistant = true;
        if (render_turn(r, f, ro, content, ro == ROLE_USER && first_user ? sys : NULL,
                        ro == ROLE_USER && first_user) < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", where);
        if (ro == ROLE_USER)
            first_user = false;
    }
    if (!any_assistant && !f->train_all)
        return moai_err_set(err, MOAI_EIO, "%s: the record has no assistant turn to learn", where);
    return 0;
}

/* A record {"instruction", "input", "output"} with the Alpaca prompt; "input" may be absent
 * or empty. */
static int fill_alpaca(struct rec *r, const struct dataset_format *f, json_t *obj,
                       const char *where, struct moai_err *err)
{
    const char *ins = string_field(obj, "instruction", "record", where, err);
    const char *out = ins ? string_field(obj, "output", "record", where, err) : NULL;
    if (!out)
        return MOAI_EIO;
    const char *in = "";
    if (json_object_get(obj, "input") && !(in = string_field(obj, "input", "record", where, err)))
        return MOAI_EIO;
    bool all = f->train_all;
    int rc;
    if (*in)
        rc = rec_puts(r,
                      "Below is an instruction that describes a task, paired with an input "
                      "that provides further context. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\n",
                      true, all) ||
             rec_puts(r, ins, false, all) || rec_puts(r, "\n\n### Input:\n", true, all) ||
             rec_puts(r, in, false, all);
    else
        rc = rec_puts(r,
                      "Below is an instruction that describes a task. Write a response that "
                      "appropriately completes the request.\n\n### Instruction:\n",
                      true, all) ||
             rec_puts(r, ins, false, all);
    rc = rc || rec_puts(r, "\n\n### Response:\n", true, all) || rec_puts(r, out, false, true);
    return rc ? moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", where) : 0;
}

/* Appends record d->n from a parsed JSON value; where names it in messages ("file:7"). */
static int add_object(struct dataset_texts *d, const struct dataset_format *f, json_t *obj,
                      const char *where, int64_t lineno, size_t *spec_cap, size_t *train_cap,
                      struct moai_err *err)
{
    struct rec r = {.d = d,
                    .start = d->off[d->n],
                    .used = d->off[d->n],
                    .spec_cap = spec_cap,
                    .train_cap = train_cap};
    size_t spec0 = d->spec_off[d->n], train0 = d->train_off[d->n];
    int rc;
    if (!json_is_object(obj)) {
        rc = moai_err_set(err, MOAI_EIO, "%s: record is %s, not an object", where, json_kind(obj));
        goto fail;
    }
    d->resp_end[d->n] = SIZE_MAX;
    rc = f->kind == DATASET_MESSAGES ? fill_messages(&r, f, obj, where, err)
         : f->kind == DATASET_ALPACA ? fill_alpaca(&r, f, obj, where, err)
                                     : fill_text(&r, f, obj, where, err);
    if (rc == 0 && rec_put(&r, "", 1, false, false) < 0) /* the NUL */
        rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", where);
    if (rc < 0)
        goto fail;
    d->line[d->n] = lineno;
    size_t spec1 = d->spec_off[d->n], train1 = d->train_off[d->n];
    d->spec_off[d->n] = spec0;
    d->train_off[d->n] = train0;
    d->n++;
    d->off[d->n] = r.used;
    d->spec_off[d->n] = spec1;
    d->train_off[d->n] = train1;
    return 0;
fail:
    d->spec_off[d->n] = spec0;
    d->train_off[d->n] = train0;
    return rc;
}

/* Parses one line and appends its record as record d->n. */
static int add_record(struct dataset_texts *d, const struct dataset_format *f, const char *name,
                      int64_t lineno, const char *line, size_t len, size_t *spec_cap,
                      size_t *train_cap, struct moai_err *err)
{
    json_error_t jerr;
    char where[4200];
    json_t *obj = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!obj && strstr(jerr.text, "unable to decode byte"))
        return moai_err_set(err, MOAI_EIO, "%s:%" PRId64 ":%d: invalid UTF-8 (%s)", name, lineno,
                            jerr.column, moai_oneline(jerr.text));
    if (!obj)
        return moai_err_set(err, MOAI_EIO, "%s:%" PRId64 ":%d: invalid JSON: %s", name, lineno,
                            jerr.column, moai_oneline(jerr.text));
    snprintf(where, sizeof(where), "%s:%" PRId64, name, lineno);
    int rc = add_object(d, f, obj, where, lineno, spec_cap, train_cap, err);
    json_decref(obj);
    return rc;
}

/* A JSON array file: the whole text is in buf; each element is a record. */
static int read_array(struct dataset_texts *d, const char *name, const char *buf, size_t size,
                      const struct dataset_format *f, int64_t limit, size_t *spec_cap,
                      size_t *train_cap, struct moai_err *err)
{
    json_error_t jerr;
    json_t *arr = json_loadb(buf, size, JSON_REJECT_DUPLICATES, &jerr), *v;
    int64_t rec_cap = 0;
    size_t i;
    int rc = 0;
    if (!arr) {
        if (strstr(jerr.text, "unable to decode byte"))
            return moai_err_set(err, MOAI_EIO, "%s:%d:%d: invalid UTF-8 (%s)", name, jerr.line,
                                jerr.column, moai_oneline(jerr.text));
        return moai_err_set(err, MOAI_EIO, "%s:%d:%d: invalid JSON: %s", name, jerr.line,
                            jerr.column, moai_oneline(jerr.text));
    }
    if (!json_is_array(arr)) { /* '[' was seen: jansson only returns arrays here */
        json_decref(arr);
        return moai_err_set(err, MOAI_EIO, "%s: expected a JSON array of records", name);
    }
    json_array_foreach(arr, i, v)
    {
        char where[4200];
        if (limit >= 0 && d->n >= limit)
            break;
        if ((rc = texts_grow(d, &rec_cap)) < 0) {
            rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", name);
            break;
        }
        if (i == 0)
            d->off[0] = d->spec_off[0] = d->train_off[0] = 0;
        snprintf(where, sizeof(where), "%s: record %zu", name, i + 1);
        if ((rc = add_object(d, f, v, where, (int64_t) i + 1, spec_cap, train_cap, err)) < 0)
            break;
    }
    json_decref(arr);
    if (rc == 0 && d->n == 0)
        rc = moai_err_set(err, MOAI_EIO, "%s: dataset has no records", name);
    return rc;
}

/* Reads every line of s, filling records until limit; a stream whose first non-blank byte
 * is '[' is read whole as a JSON array of records. */
/* The lines of a source, one at a time; or, when its first non-blank byte is '[', the whole
 * source at once (a JSON array). */
struct line_reader {
    char *line;
    size_t len, cap;
    bool done;  /* the source is exhausted */
    bool first; /* its first non-blank byte is still to come */
    bool array; /* that byte is '[' */
};

static int line_append(struct line_reader *r, const char *from, size_t n)
{
    if (r->len + n + 1 > r->cap) {
        size_t c = r->cap ? r->cap : 4096;
        while (c < r->len + n + 1)
            c *= 2;
        char *l = realloc(r->line, c);
        if (!l)
            return MOAI_ENOMEM;
        r->line = l;
        r->cap = c;
    }
    memcpy(r->line + r->len, from, n);
    r->len += n;
    return 0;
}

/* Whether the source is an array, decided at its first non-blank byte (or its end). */
static void sniff_array(struct line_reader *r, const char *from, size_t avail)
{
    size_t i = 0;
    while (i < avail && strchr(" \t\r\n", from[i]))
        i++;
    if (i < avail || r->done) {
        r->first = false;
        r->array = i < avail && from[i] == '[';
    }
}

/* The next line into r->line (its newline dropped; the last may lack one), or for an array
 * everything to the end. Returns 0 or a negative code. */
static int next_line(struct line_reader *r, struct src *s, struct moai_err *err)
{
    r->len = 0;
    for (;;) {
        if (s->outpos == s->outlen) {
            long k = src_fill(s, err);
            if (k < 0)
                return (int) k;
            if (k == 0)
                r->done = true;
        }
        const char *from = (const char *) s->out + s->outpos;
        size_t avail = s->outlen - s->outpos;
        if (r->first)
            sniff_array(r, from, avail);
        const char *nl = r->done || r->array ? NULL : memchr(from, '\n', avail);
        size_t take = nl ? (size_t) (nl - from) : avail;
        if (line_append(r, from, take) < 0)
            return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", s->name);
        s->outpos += take + (nl ? 1 : 0);
        if (nl || r->done)
            return 0;
    }
}

static int read_lines(struct dataset_texts *d, struct src *s, const struct dataset_format *f,
                      int64_t limit, struct moai_err *err)
{
    struct line_reader r = {.first = true};
    size_t spec_cap = 0, train_cap = 0;
    int64_t lineno = 0, rec_cap = 0;
    int rc = texts_grow(d, &rec_cap);
    if (rc < 0)
        goto oom;
    d->off[0] = 0;
    d->spec_off[0] = 0;
    d->train_off[0] = 0;
    while (!r.done && (r.array || limit < 0 || d->n < limit)) {
        if ((rc = next_line(&r, s, err)) < 0)
            goto out;
        if (r.array) {
            rc = read_array(d, s->name, r.line, r.len, f, limit, &spec_cap, &train_cap, err);
            goto out;
        }
        if (r.done && r.len == 0 && lineno > 0)
            break;
        lineno++;
        if (is_blank(r.line, r.len))
            continue;
        if ((rc = texts_grow(d, &rec_cap)) < 0)
            goto oom;
        if ((rc = add_record(d, f, s->name, lineno, r.line, r.len, &spec_cap, &train_cap, err)) < 0)
            goto out;
    }
    if (d->n == 0)
        rc = moai_err_set(err, MOAI_EIO, "%s: dataset has no records", s->name);
    goto out;
oom:
    rc = moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", s->name);
out:
    free(r.line);
    return rc;
}

int dataset_chat_parse(enum dataset_chat *chat, const char *name)
{
    for (int i = 0; i < 4; i++)
        if (!strcmp(name, chat_names[i])) {
            *chat = (enum dataset_chat) i;
            return 0;
        }
    return -1;
}

const char *dataset_chat_name(enum dataset_chat chat)
{
    return chat_names[chat];
}

static int load(struct dataset_texts *out, struct src *s, const struct dataset_format *f,
                int64_t limit, struct moai_err *err)
{
    memset(out, 0, sizeof(*out));
    int rc = src_open(s, err);
    if (rc == 0)
        rc = read_lines(out, s, f, limit, err);
    if (rc == 0 && (f->kind != DATASET_TEXT || f->tmpl->resp_part < 0)) {
        free(out->resp_end);
        out->resp_end = NULL;
    }
    if (rc == 0 && f->kind == DATASET_TEXT) {
        free(out->train);
        free(out->train_off);
        out->train = NULL;
        out->train_off = NULL;
    }
    src_close(s);
    if (rc < 0)
        dataset_texts_release(out);
    return rc;
}

/* load() with a text template parsed from tmpl and response_start. */
static int load_text(struct dataset_texts *out, struct src *s, const char *tmpl,
                     const char *response_start, int64_t limit, struct moai_err *err)
{
    struct dataset_template t;
    struct dataset_format f = {.kind = DATASET_TEXT, .tmpl = &t};
    memset(out, 0, sizeof(*out));
    int rc = dataset_template_parse(&t, tmpl, response_start, err);
    if (rc < 0) {
        src_close(s);
        return rc;
    }
    rc = load(out, s, &f, limit, err);
    dataset_template_release(&t);
    return rc;
}

int dataset_load_format(struct dataset_texts *out, const char *path, const struct dataset_format *f,
                        int64_t limit, struct moai_err *err)
{
    struct src s = {.name = path};
    memset(out, 0, sizeof(*out));
    s.f = fopen(path, "rb");
    if (!s.f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    return load(out, &s, f, limit, err);
}

int dataset_load(struct dataset_texts *out, const char *path, const char *tmpl,
                 const char *response_start, int64_t limit, struct moai_err *err)
{
    struct src s = {.name = path};
    memset(out, 0, sizeof(*out));
    s.f = fopen(path, "rb");
    if (!s.f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    return load_text(out, &s, tmpl, response_start, limit, err);
}

int dataset_load_mem(struct dataset_texts *out, const char *name, const void *data, size_t size,
                     const char *tmpl, const char *response_start, int64_t limit,
                     struct moai_err *err)
{
    static const unsigned char empty[1];
    struct src s = {.name = name, .mem = data ? data : empty, .memsize = size};
    return load_text(out, &s, tmpl, response_start, limit, err);
}

void dataset_texts_release(struct dataset_texts *d)
{
    free(d->buf);
    free(d->off);
    free(d->resp_end);
    free(d->line);
    free(d->spec);
    free(d->spec_off);
    free(d->train);
    free(d->train_off);
    memset(d, 0, sizeof(*d));
}
