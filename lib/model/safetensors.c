/* safetensors.c - safetensors reading with every offset checked, atomic writing (see .h). */
#include "model/safetensors.h"

#include "model/optim.h"
#include "progress.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u << 20)

static const struct {
    const char *name;
    int size;
    int supported;
} dtypes[] = {
    [ST_F32] = {"F32", 4, 1},
    [ST_F16] = {"F16", 2, 1},
    [ST_BF16] = {"BF16", 2, 1},
};

/* Sizes of the dtypes the format knows but this reader does not convert. */
static int other_dtype_size(const char *name)
{
    static const struct {
        const char *name;
        int size;
    } others[] = {{"F64", 8}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4}, {"I16", 2},
                  {"U16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1},
                  {"F8_E5M2", 1}};
    for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++)
        if (!strcmp(name, others[i].name))
            return others[i].size;
    return 0;
}

static int cmp_begin(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *) a;
    const struct st_tensor *y = *(const struct st_tensor *const *) b;
    return (x->data > y->data) - (x->data < y->data);
}

static int parse_entry(struct st_tensor *t, const char *key, const json_t *v,
                       const uint8_t *area, size_t area_size, const char *name,
                       struct moai_err *err)
{
    const json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape");
    const json_t *offs = json_object_get(v, "data_offsets");
    int64_t numel = 1;

    if (!json_is_object(v))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': entry is not an object", name, key);
    if (!json_is_string(dt))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': 'dtype' is not a string", name,
                            key);
    if (!json_is_array(shape) || json_array_size(shape) > ST_MAX_DIMS)
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': 'shape' is not a list of at most %d "
                            "sizes", name, key, ST_MAX_DIMS);
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !json_is_integer(json_array_get(offs, 0)) || !json_is_integer(json_array_get(offs, 1)))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': 'data_offsets' is not two integers",
                            name, key);
    t->ndim = (int) json_array_size(shape);
    for (int d = 0; d < t->ndim; d++) {
        const json_t *s = json_array_get(shape, (size_t) d);
        if (!json_is_integer(s) || json_integer_value(s) < 0)
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': shape has a negative or "
                                "non-integer size", name, key);
        t->shape[d] = json_integer_value(s);
        if (t->shape[d] && numel > INT64_MAX / 8 / t->shape[d])
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': shape is too large", name, key);
        numel *= t->shape[d];
    }
    json_int_t begin = json_integer_value(json_array_get(offs, 0));
    json_int_t end = json_integer_value(json_array_get(offs, 1));
    if (begin < 0 || end < begin)
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': data offsets [%lld, %lld) are not "
                            "an interval", name, key, (long long) begin, (long long) end);
    if ((uint64_t) end > area_size)
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': data offsets [%lld, %lld) run past "
                            "the end of the data area (%zu bytes)", name, key,
                            (long long) begin, (long long) end, area_size);
    const char *dname = json_string_value(dt);
    int size = 0, found = -1;
    for (int i = 0; i < (int) (sizeof(dtypes) / sizeof(dtypes[0])); i++)
        if (!strcmp(dname, dtypes[i].name)) {
            found = i;
            size = dtypes[i].size;
        }
    if (found < 0) {
        if (!other_dtype_size(dname))
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': unknown dtype '%s'", name, key,
                                dname);
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': dtype %s is not supported (F32, "
                            "F16 and BF16 are)", name, key, dname);
    }
    if ((int64_t) (end - begin) != numel * size)
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': %lld bytes of data, but %s x %lld "
                            "elements need %lld", name, key, (long long) (end - begin), dname,
                            (long long) numel, (long long) numel * size);
    t->dtype = (enum st_dtype) found;
    t->numel = numel;
    t->data = area + begin;
    t->nbytes = (size_t) (end - begin);
    if (!(t->name = strdup(key)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    return 0;
}

int st_parse(struct st_file *f, const void *data, size_t size, const char *name,
             struct moai_err *err)
{
    const uint8_t *bytes = data;
    uint64_t n = 0;
    json_error_t jerr;
    int rc = 0;

    if (!f->path && !(f->path = strdup(name)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    if (size < 8)
        return moai_err_set(err, MOAI_EIO, "%s: file too short for a safetensors header (%zu "
                            "bytes)", name, size);
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | bytes[i];
    if (n > ST_MAX_HEADER || n > size - 8)
        return moai_err_set(err, MOAI_EIO, "%s: header length %llu runs past the end of the file "
                            "(%zu bytes)", name, (unsigned long long) n, size);
    json_t *root = json_loadb((const char *) bytes + 8, (size_t) n, JSON_REJECT_DUPLICATES,
                              &jerr);
    if (!root)
        return moai_err_set(err, MOAI_EIO, "%s: header is not JSON: %s (column %d)", name,
                            jerr.text, jerr.column);
    if (!json_is_object(root)) {
        json_decref(root);
        return moai_err_set(err, MOAI_EIO, "%s: header is not a JSON object", name);
    }
    const uint8_t *area = bytes + 8 + n;
    size_t area_size = size - 8 - (size_t) n;
    f->tensors = calloc(json_object_size(root) + 1, sizeof(*f->tensors));
    if (!f->tensors) {
        json_decref(root);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(v)) {
                rc = moai_err_set(err, MOAI_EIO, "%s: '__metadata__' is not an object", name);
                break;
            }
            continue;
        }
        struct st_tensor *t = &f->tensors[f->ntensors];
        if ((rc = parse_entry(t, key, v, area, area_size, name, err)) < 0)
            break;
        t->file = f;
        f->ntensors++;
    }
    json_decref(root);
    if (rc == 0 && f->ntensors > 1) {
        const struct st_tensor **order = malloc((size_t) f->ntensors * sizeof(*order));
        if (!order)
            return moai_err_set(err, MOAI_ENOMEM, "out of memory");
        for (int i = 0; i < f->ntensors; i++)
            order[i] = &f->tensors[i];
        qsort(order, (size_t) f->ntensors, sizeof(*order), cmp_begin);
        for (int i = 1; i < f->ntensors && rc == 0; i++)
            if (order[i]->data < order[i - 1]->data + order[i - 1]->nbytes)
                rc = moai_err_set(err, MOAI_EIO, "%s: tensors '%s' and '%s' overlap", name,
                                  order[i - 1]->name, order[i]->name);
        free(order);
    }
    return rc;
}

int st_open(struct st_file *f, const char *path, struct moai_err *err)
{
    struct stat st;
    int fd, rc;

    memset(f, 0, sizeof(*f));
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return moai_err_set(err, MOAI_EIO, "cannot read '%s': not a regular file", path);
    }
    f->size = (size_t) st.st_size;
    if (f->size > 0) {
        f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (f->map == MAP_FAILED) {
            f->map = NULL;
            close(fd);
            return moai_err_set(err, MOAI_EIO, "cannot map '%s': %s", path, strerror(errno));
        }
    }
    close(fd);
    if (!(f->path = strdup(path))) {
        st_close(f);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    rc = st_parse(f, f->map ? f->map : (const uint8_t *) "", f->size, path, err);
    if (rc < 0)
        st_close(f);
    return rc;
}

void st_close(struct st_file *f)
{
    for (int i = 0; i < f->ntensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    if (f->map)
        munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof(*f));
}

const struct st_tensor *st_find(const struct st_file *f, const char *name)
{
    for (int i = 0; i < f->ntensors; i++)
        if (!strcmp(f->tensors[i].name, name))
            return &f->tensors[i];
    return NULL;
}

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t) (h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400));
            bits = sign | ((uint32_t) (127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float x;
    memcpy(&x, &bits, sizeof(x));
    return x;
}

int st_to_f32(const struct st_tensor *t, float *dst, struct moai_err *err)
{
    (void) err;
    const uint8_t *p = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        switch (t->dtype) {
        case ST_F32:
            memcpy(&dst[i], p + 4 * i, 4);
            break;
        case ST_F16: {
            uint16_t h = (uint16_t) (p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = f16_to_f32(h);
            break;
        }
        case ST_BF16: {
            uint16_t h = (uint16_t) (p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = optim_f32_from_bf16(h);
            break;
        }
        }
    }
    return 0;
}

int st_set_open_dir(struct st_set *s, const char *dir, struct moai_err *err)
{
    char path[4096];
    json_error_t jerr;
    int rc = 0;

    memset(s, 0, sizeof(*s));
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (access(path, F_OK) == 0) {
        if (!(s->files = calloc(1, sizeof(*s->files))))
            return moai_err_set(err, MOAI_ENOMEM, "out of memory");
        if ((rc = st_open(&s->files[0], path, err)) < 0) {
            st_set_close(s);
            return rc;
        }
        s->nfiles = 1;
        return 0;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    json_t *index = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!index) {
        if (access(path, F_OK) != 0)
            return moai_err_set(err, MOAI_EIO, "no weights in '%s' (model.safetensors or "
                                "model.safetensors.index.json)", dir);
        return moai_err_set(err, MOAI_EIO, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                            jerr.column, jerr.text);
    }
    json_t *map = json_object_get(index, "weight_map");
    if (!json_is_object(map)) {
        json_decref(index);
        return moai_err_set(err, MOAI_EIO, "%s: 'weight_map' is not an object", path);
    }
    /* The distinct shard names, in order of first appearance. */
    const char **names = calloc(json_object_size(map) + 1, sizeof(*names));
    int nnames = 0;
    const char *key;
    json_t *v;
    if (!names) {
        json_decref(index);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    json_object_foreach(map, key, v) {
        if (!json_is_string(v)) {
            rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s': the shard is not a file name",
                              path, key);
            break;
        }
        const char *file = json_string_value(v);
        if (strchr(file, '/')) {
            rc = moai_err_set(err, MOAI_EIO, "%s: shard '%s' is not a file name in '%s'", path,
                              file, dir);
            break;
        }
        int seen = 0;
        for (int i = 0; i < nnames && !seen; i++)
            seen = !strcmp(names[i], file);
        if (!seen)
            names[nnames++] = file;
    }
    if (rc == 0 && !(s->files = calloc((size_t) nnames + 1, sizeof(*s->files))))
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
    struct progress bar;
    if (rc == 0)
        progress_init(&bar, "Loading checkpoint shards", nnames, "it");
    for (int i = 0; rc == 0 && i < nnames; i++) {
        char shard[4096];
        snprintf(shard, sizeof(shard), "%s/%s", dir, names[i]);
        if ((rc = st_open(&s->files[i], shard, err)) == 0) {
            s->nfiles++;
            progress_update(&bar, i + 1);
        }
    }
    if (rc == 0)
        progress_finish(&bar);
    json_object_foreach(map, key, v) {
        if (rc < 0)
            break;
        const char *file = json_string_value(v);
        for (int i = 0; i < s->nfiles; i++) {
            const char *base = strrchr(s->files[i].path, '/');
            if (strcmp(base ? base + 1 : s->files[i].path, file))
                continue;
            if (!st_find(&s->files[i], key))
                rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is not in its shard '%s'",
                                  path, key, file);
        }
    }
    free(names);
    json_decref(index);
    if (rc < 0)
        st_set_close(s);
    return rc;
}

void st_set_close(struct st_set *s)
{
    for (int i = 0; i < s->nfiles; i++)
        st_close(&s->files[i]);
    free(s->files);
    memset(s, 0, sizeof(*s));
}

const struct st_tensor *st_set_find(const struct st_set *s, const char *name)
{
    for (int i = 0; i < s->nfiles; i++) {
        const struct st_tensor *t = st_find(&s->files[i], name);
        if (t)
            return t;
    }
    return NULL;
}

static int write_all(FILE *f, const void *p, size_t n)
{
    return fwrite(p, 1, n, f) == n ? 0 : -1;
}

int st_write(const char *path, int n, const struct st_write_tensor *t, enum st_dtype dtype,
             struct moai_err *err)
{
    int esize = dtypes[dtype].size;
    json_t *h = json_object();
    uint64_t off = 0;
    char tmp[4096];
    int rc = 0;

    if (dtype == ST_F16)
        return moai_err_set(err, MOAI_EUSAGE, "%s: writing F16 is not supported", path);
    json_object_set_new(h, "__metadata__", json_pack("{s:s}", "format", "pt"));
    for (int i = 0; i < n; i++) {
        int64_t numel = 1;
        json_t *shape = json_array();
        for (int d = 0; d < t[i].ndim; d++) {
            json_array_append_new(shape, json_integer(t[i].shape[d]));
            numel *= t[i].shape[d];
        }
        uint64_t bytes = (uint64_t) numel * (uint64_t) esize;
        json_object_set_new(h, t[i].name,
                            json_pack("{s:s, s:o, s:[I, I]}", "dtype", dtypes[dtype].name,
                                      "shape", shape, "data_offsets", (json_int_t) off,
                                      (json_int_t) (off + bytes)));
        off += bytes;
    }
    char *text = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(h);
    if (!text)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    size_t hlen = strlen(text), padded = (hlen + 7) & ~(size_t) 7;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t) ((uint64_t) padded >> (8 * i));

    snprintf(tmp, sizeof(tmp), "%s.tmp-%ld", path, (long) getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        free(text);
        return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", tmp, strerror(errno));
    }
    rc |= write_all(f, len8, 8);
    rc |= write_all(f, text, hlen);
    for (size_t i = hlen; i < padded; i++)
        rc |= fputc(' ', f) == EOF ? -1 : 0;
    free(text);
    uint16_t buf[4096];
    for (int i = 0; i < n && rc == 0; i++) {
        int64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= t[i].shape[d];
        if (dtype == ST_F32) {
            rc |= write_all(f, t[i].data, (size_t) numel * 4);
            continue;
        }
        for (int64_t j = 0; j < numel && rc == 0; j += 4096) {
            int64_t k = numel - j < 4096 ? numel - j : 4096;
            optim_f32_to_bf16(buf, t[i].data + j, k);
            rc |= write_all(f, buf, (size_t) k * 2);
        }
    }
    if (rc == 0 && (fflush(f) != 0 || fsync(fileno(f)) != 0))
        rc = -1;
    if (fclose(f) != 0)
        rc = -1;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = -1;
    if (rc < 0) {
        int e = errno;
        unlink(tmp);
        return moai_err_set(err, MOAI_EIO, "cannot write '%s': %s", path, strerror(e));
    }
    char dir[4096];
    snprintf(dir, sizeof(dir), "%s", path);
    int dfd = open(dirname(dir), O_RDONLY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}
