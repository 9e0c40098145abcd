/* safetensors.c - safetensors reading with every offset checked, atomic writing (see .h). */
#include "model/safetensors.h"

#include "atomicfile.h"
#include "progress.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c copies F32 data as is: it needs a little-endian host"
#endif

/* ---- dtypes ----------------------------------------------------------------------------- */

/* Every dtype the format names, with its size; conv is the enum st_dtype this reader converts
 * it to, or -1. */
static const struct {
    const char *name;
    int size;
    int conv;
} dtypes[] = {
    {"F32", 4, ST_F32}, {"F16", 2, ST_F16}, {"BF16", 2, ST_BF16}, {"F64", 8, -1},
    {"I64", 8, -1},     {"U64", 8, -1},     {"I32", 4, -1},       {"U32", 4, -1},
    {"I16", 2, -1},     {"U16", 2, -1},     {"I8", 1, -1},        {"U8", 1, -1},
    {"BOOL", 1, -1},    {"F8_E4M3", 1, -1}, {"F8_E5M2", 1, -1},   {"F8_E8M0", 1, -1},
};
#define NDTYPES ((int) (sizeof(dtypes) / sizeof(dtypes[0])))

const char *st_dtype_name(enum st_dtype dtype)
{
    return dtypes[dtype].name; /* the first three rows are in enum order */
}

int st_dtype_size(enum st_dtype dtype)
{
    return dtypes[dtype].size;
}

static int dtype_row(const char *name)
{
    for (int i = 0; i < NDTYPES; i++)
        if (!strcmp(name, dtypes[i].name))
            return i;
    return -1;
}

/* ---- reading ---------------------------------------------------------------------------- */

/* Checks 4 to 7 of the header comment for one entry; on success t points into area. */
static int parse_entry(struct st_tensor *t, const char *key, const json_t *v, const uint8_t *area,
                       size_t area_size, const char *name, struct moai_err *err)
{
    const json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape");
    const json_t *offs = json_object_get(v, "data_offsets");
    int64_t numel = 1;

    if (!json_is_object(v))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': entry is not an object", name, key);
    if (!json_is_string(dt))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': 'dtype' is not a string", name, key);
    if (!json_is_array(shape) || json_array_size(shape) > ST_MAX_DIMS)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s': 'shape' is not a list of at most %d sizes", name, key,
                            ST_MAX_DIMS);
    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !json_is_integer(json_array_get(offs, 0)) || !json_is_integer(json_array_get(offs, 1)))
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': 'data_offsets' is not two integers",
                            name, key);
    t->ndim = (int) json_array_size(shape);
    for (int d = 0; d < t->ndim; d++) {
        const json_t *s = json_array_get(shape, (size_t) d);
        if (!json_is_integer(s) || json_integer_value(s) < 0)
            return moai_err_set(err, MOAI_EIO,
                                "%s: tensor '%s': shape has a negative or non-integer size", name,
                                key);
        t->shape[d] = json_integer_value(s);
        /* numel x 8 (the largest dtype) must stay within int64_t */
        if (t->shape[d] && numel > INT64_MAX / 8 / t->shape[d])
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': shape is too large", name, key);
        numel *= t->shape[d];
    }
    json_int_t begin = json_integer_value(json_array_get(offs, 0));
    json_int_t end = json_integer_value(json_array_get(offs, 1));
    if (begin < 0 || end < begin)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s': data offsets [%lld, %lld) are not an interval", name,
                            key, (long long) begin, (long long) end);
    if ((uint64_t) end > area_size)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s': data offsets [%lld, %lld) run past the end of the "
                            "data area (%zu bytes)",
                            name, key, (long long) begin, (long long) end, area_size);
    const char *dname = json_string_value(dt);
    int row = dtype_row(dname);
    if (row < 0)
        return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': unknown dtype '%s'", name, key, dname);
    if (dtypes[row].conv < 0)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s': dtype %s is not supported (F32, F16 and BF16 are)",
                            name, key, dname);
    int64_t want = numel * dtypes[row].size;
    if ((int64_t) (end - begin) != want)
        return moai_err_set(err, MOAI_EIO,
                            "%s: tensor '%s': %lld bytes of data, but %s x %lld elements need "
                            "%lld",
                            name, key, (long long) (end - begin), dname, (long long) numel,
                            (long long) want);
    t->dtype = (enum st_dtype) dtypes[row].conv;
    t->numel = numel;
    t->data = area + begin;
    t->nbytes = (size_t) (end - begin);
    t->begin = (uint64_t) begin;
    if (!(t->name = strdup(key)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    return 0;
}

static int cmp_range(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *) a;
    const struct st_tensor *y = *(const struct st_tensor *const *) b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return (x->nbytes > y->nbytes) - (x->nbytes < y->nbytes);
}

/* Check 8: the byte ranges, sorted, tile the data area exactly. */
static int check_layout(const struct st_file *f, size_t area_size, const char *name,
                        struct moai_err *err)
{
    const struct st_tensor **order = malloc(((size_t) f->ntensors + 1) * sizeof(*order));
    uint64_t expected = 0;
    int rc = 0;

    if (!order)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    for (int i = 0; i < f->ntensors; i++)
        order[i] = &f->tensors[i];
    qsort(order, (size_t) f->ntensors, sizeof(*order), cmp_range);
    for (int i = 0; i < f->ntensors && rc == 0; i++) {
        if (order[i]->begin < expected)
            rc = moai_err_set(err, MOAI_EIO, "%s: tensors '%s' and '%s' overlap", name,
                              order[i - 1]->name, order[i]->name);
        else if (order[i]->begin > expected)
            rc = moai_err_set(err, MOAI_EIO,
                              "%s: bytes [%llu, %llu) of the data area belong to no tensor", name,
                              (unsigned long long) expected, (unsigned long long) order[i]->begin);
        else
            expected = order[i]->begin + order[i]->nbytes;
    }
    if (rc == 0 && expected < area_size)
        rc = moai_err_set(err, MOAI_EIO,
                          "%s: bytes [%llu, %zu) of the data area belong to no tensor", name,
                          (unsigned long long) expected, area_size);
    free(order);
    return rc;
}

/* "__metadata__" is an object of strings. */
static int check_metadata(const json_t *v, const char *name, struct moai_err *err)
{
    const char *key;
    const json_t *value;

    if (!json_is_object(v))
        return moai_err_set(err, MOAI_EIO, "%s: '__metadata__' is not an object", name);
    json_object_foreach((json_t *) v, key, value) if (!json_is_string(value)) return moai_err_set(
        err, MOAI_EIO, "%s: '__metadata__' value '%s' is not a string", name, key);
    return 0;
}

/* Checks 1 to 8 on size bytes at bytes; fills f's header_bytes and tensors. */
static int parse(struct st_file *f, const uint8_t *bytes, size_t size, const char *name,
                 struct moai_err *err)
{
    json_error_t jerr;
    uint64_t n = 0;
    int rc = 0;

    if (size < 8)
        return moai_err_set(err, MOAI_EIO,
                            "%s: file too short for a safetensors header (%zu bytes)", name, size);
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | bytes[i];
    if (n > size - 8)
        return moai_err_set(err, MOAI_EIO,
                            "%s: header length %llu runs past the end of the file (%zu bytes)",
                            name, (unsigned long long) n, size);
    if (n > ST_MAX_HEADER_BYTES)
        return moai_err_set(err, MOAI_EIO, "%s: header length %llu is past the limit of %llu", name,
                            (unsigned long long) n, (unsigned long long) ST_MAX_HEADER_BYTES);
    f->header_bytes = n;
    json_t *root = json_loadb((const char *) bytes + 8, (size_t) n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return moai_err_set(err, MOAI_EIO, "%s: header is not JSON: %s (column %d)", name,
                            moai_oneline(jerr.text), jerr.column);
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
    json_object_foreach(root, key, v)
    {
        if (!strcmp(key, "__metadata__")) {
            if ((rc = check_metadata(v, name, err)) < 0)
                break;
            continue;
        }
        struct st_tensor *t = &f->tensors[f->ntensors];
        if ((rc = parse_entry(t, key, v, area, area_size, name, err)) < 0) {
            free(t->name);
            t->name = NULL;
            break;
        }
        t->file = f;
        f->ntensors++;
    }
    json_decref(root);
    if (rc == 0)
        rc = check_layout(f, area_size, name, err);
    return rc;
}

int st_parse(struct st_file *f, const void *data, size_t size, const char *name,
             struct moai_err *err)
{
    memset(f, 0, sizeof(*f));
    if (!(f->path = strdup(name)))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    int rc = parse(f, data, size, name, err);
    if (rc < 0)
        st_close(f);
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
            int e = errno;
            f->map = NULL;
            close(fd);
            return moai_err_set(err, MOAI_EIO, "cannot map '%s': %s", path, strerror(e));
        }
    }
    close(fd);
    if (!(f->path = strdup(path))) {
        st_close(f);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    rc = parse(f, f->map ? f->map : (const uint8_t *) "", f->size, path, err);
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

/* ---- conversions ------------------------------------------------------------------------ */

static float f32_from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}

float st_f32_from_bf16(uint16_t h)
{
    return f32_from_bits((uint32_t) h << 16);
}

uint16_t st_bf16_from_f32(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep the sign and payload top, make it quiet */
        return (uint16_t) ((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even; carries into inf */
    return (uint16_t) (u >> 16);
}

float st_f32_from_f16(uint16_t h)
{
    uint32_t sign = (uint32_t) (h >> 15) << 31, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;

    if (exp == 0x1f) /* infinity, NaN (payload kept) */
        return f32_from_bits(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return f32_from_bits(sign);
        /* subnormal: man x 2^-24, normalized */
        int shift = 0;
        while (!(man & 0x400u)) {
            man <<= 1;
            shift++;
        }
        return f32_from_bits(sign | ((uint32_t) (113 - shift) << 23) | ((man & 0x3ffu) << 13));
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

int st_to_f32(const struct st_tensor *t, float *dst, struct moai_err *err)
{
    const uint8_t *p = t->data;
    (void) err;

    switch (t->dtype) {
    case ST_F32:
        memcpy(dst, p, (size_t) t->numel * 4);
        break;
    case ST_F16:
        for (int64_t i = 0; i < t->numel; i++)
            dst[i] = st_f32_from_f16((uint16_t) (p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    case ST_BF16:
        for (int64_t i = 0; i < t->numel; i++)
            dst[i] = st_f32_from_bf16((uint16_t) (p[2 * i] | (p[2 * i + 1] << 8)));
        break;
    }
    return 0;
}

/* ---- sets ------------------------------------------------------------------------------- */

static char *path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b + 1);
    }
    return p;
}

/* The folder part of path ("." when none); a new string. */
static char *path_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    size_t n = slash == path ? 1 : (size_t) (slash - path);
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, path, n);
        d[n] = '\0';
    }
    return d;
}

static const char *path_base(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}

static int cmp_tensor_name(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *) a;
    const struct st_tensor *y = *(const struct st_tensor *const *) b;
    return strcmp(x->name, y->name);
}

/* Sorts the set's tensors by name into s->by_name; two tensors of one name are an error
 * (source names the set in the message). */
static int set_build_index(struct st_set *s, const char *source, struct moai_err *err)
{
    int64_t n = st_set_ntensors(s), k = 0;
    const struct st_tensor **v = malloc(((size_t) n + 1) * sizeof(*v));
    if (!v)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    for (int f = 0; f < s->nfiles; f++)
        for (int i = 0; i < s->files[f].ntensors; i++)
            v[k++] = &s->files[f].tensors[i];
    qsort(v, (size_t) n, sizeof(*v), cmp_tensor_name);
    for (int64_t i = 1; i < n; i++)
        if (!strcmp(v[i - 1]->name, v[i]->name)) {
            const char *a = path_base(v[i - 1]->file->path), *b = path_base(v[i]->file->path);
            bool ab = strcmp(a, b) < 0;
            int rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is in both '%s' and '%s'", source,
                                  v[i]->name, ab ? a : b, ab ? b : a);
            free(v);
            return rc;
        }
    s->by_name = v;
    s->ntensors = n;
    return 0;
}

static int set_alloc(struct st_set *s, int nfiles, struct moai_err *err)
{
    memset(s, 0, sizeof(*s));
    if (!(s->files = calloc((size_t) nfiles + 1, sizeof(*s->files))))
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    return 0;
}

static int set_open_file(struct st_set *s, const char *path, struct moai_err *err)
{
    int rc;
    if ((rc = set_alloc(s, 1, err)) < 0)
        return rc;
    if ((rc = st_open(&s->files[0], path, err)) < 0) {
        free(s->files);
        memset(s, 0, sizeof(*s));
        return rc;
    }
    s->nfiles = 1;
    if ((rc = set_build_index(s, path, err)) < 0)
        st_set_close(s);
    return rc;
}

static int load_index(json_t **root, const char *path, struct moai_err *err)
{
    json_error_t jerr;
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    *root = json_loadf(fp, JSON_REJECT_DUPLICATES, &jerr);
    fclose(fp);
    if (!*root)
        return moai_err_set(err, MOAI_EIO, "%s:%d:%d: invalid JSON: %s", path, jerr.line,
                            jerr.column, moai_oneline(jerr.text));
    if (!json_is_object(*root)) {
        json_decref(*root);
        return moai_err_set(err, MOAI_EIO, "%s: not a JSON object", path);
    }
    return 0;
}

/* The distinct shard names of map, sorted, into *names (pointing into map). */
static int index_shards(const char ***names, int *nnames, const json_t *map, const char *path,
                        struct moai_err *err)
{
    const char **v = calloc(json_object_size(map) + 1, sizeof(*v));
    const char *key;
    json_t *file;
    int n = 0;

    if (!v)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    json_object_foreach((json_t *) map, key, file)
    {
        const char *s = json_string_value(file);
        if (!json_is_string(file)) {
            free(v);
            return moai_err_set(err, MOAI_EIO, "%s: tensor '%s': the shard is not a file name",
                                path, key);
        }
        if (!*s || strchr(s, '/') || !strcmp(s, ".") || !strcmp(s, "..")) {
            free(v);
            return moai_err_set(err, MOAI_EIO,
                                "%s: tensor '%s': shard '%s' is not a file name in the index's "
                                "folder",
                                path, key, s);
        }
        v[n++] = s;
    }
    qsort(v, (size_t) n, sizeof(*v), cmp_str);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (k == 0 || strcmp(v[k - 1], v[i]))
            v[k++] = v[i];
    *names = v;
    *nnames = k;
    return 0;
}

static int set_open_index(struct st_set *s, const char *path, struct moai_err *err)
{
    json_t *root = NULL;
    const char **names = NULL;
    char *dir = NULL;
    int nnames = 0, rc;

    memset(s, 0, sizeof(*s));
    if ((rc = load_index(&root, path, err)) < 0)
        return rc;
    const json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map)) {
        rc = moai_err_set(err, MOAI_EIO, "%s: 'weight_map' is not an object", path);
        goto out_root;
    }
    if ((rc = index_shards(&names, &nnames, map, path, err)) < 0)
        goto out_root;
    if (!(dir = path_dir(path))) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        goto out_names;
    }
    if ((rc = set_alloc(s, nnames, err)) < 0)
        goto out_dir;
    if (!(s->index_path = strdup(path))) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        goto out_set;
    }

    struct progress bar;
    progress_init(&bar, "Loading checkpoint shards", nnames, "it");
    for (int i = 0; i < nnames; i++) {
        char *shard = path_join(dir, names[i]);
        if (!shard) {
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
            goto out_set;
        }
        rc = st_open(&s->files[i], shard, err);
        free(shard);
        if (rc < 0)
            goto out_set;
        s->nfiles++;
        progress_update(&bar, i + 1);
    }
    progress_finish(&bar);

    const char *key;
    json_t *file;
    json_object_foreach((json_t *) map, key, file)
    {
        const char *fname = json_string_value(file);
        const char **at = bsearch(&fname, names, (size_t) nnames, sizeof(*names), cmp_str);
        if (!st_find(&s->files[at - names], key)) {
            rc = moai_err_set(err, MOAI_EIO, "%s: tensor '%s' is not in its shard '%s'", path, key,
                              fname);
            goto out_set;
        }
    }
    rc = set_build_index(s, path, err);
out_set:
    if (rc < 0)
        st_set_close(s);
out_dir:
    free(dir);
out_names:
    free(names);
out_root:
    json_decref(root);
    return rc;
}

int st_set_open(struct st_set *s, const char *path, struct moai_err *err)
{
    size_t n = strlen(path);
    if (n >= 5 && !strcmp(path + n - 5, ".json"))
        return set_open_index(s, path, err);
    return set_open_file(s, path, err);
}

int st_set_open_dir(struct st_set *s, const char *dir, struct moai_err *err)
{
    char *single = path_join(dir, "model.safetensors");
    char *index = path_join(dir, "model.safetensors.index.json");
    int rc;

    memset(s, 0, sizeof(*s));
    if (!single || !index)
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
    else if (access(single, F_OK) == 0)
        rc = set_open_file(s, single, err);
    else if (access(index, F_OK) == 0)
        rc = set_open_index(s, index, err);
    else
        rc = moai_err_set(err, MOAI_EIO,
                          "no weights in '%s' (model.safetensors or model.safetensors.index.json)",
                          dir);
    free(single);
    free(index);
    return rc;
}

void st_set_close(struct st_set *s)
{
    free(s->by_name);
    for (int i = 0; i < s->nfiles; i++)
        st_close(&s->files[i]);
    free(s->files);
    free(s->index_path);
    memset(s, 0, sizeof(*s));
}

const struct st_tensor *st_set_find(const struct st_set *s, const char *name)
{
    if (!s->by_name)
        return NULL;
    struct st_tensor key = {.name = (char *) name};
    const struct st_tensor *kp = &key;
    const struct st_tensor *const *hit =
        bsearch(&kp, s->by_name, (size_t) s->ntensors, sizeof(*s->by_name), cmp_tensor_name);
    return hit ? *hit : NULL;
}

int64_t st_set_ntensors(const struct st_set *s)
{
    int64_t n = 0; /* counted, so that it also holds while the set is being opened */
    for (int i = 0; i < s->nfiles; i++)
        n += s->files[i].ntensors;
    return n;
}

/* ---- writing ---------------------------------------------------------------------------- */

static int64_t write_numel(const struct st_write_tensor *t)
{
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++)
        numel *= t->shape[d];
    return numel;
}

static int cmp_wname(const void *a, const void *b)
{
    return strcmp((*(const struct st_write_tensor *const *) a)->name,
                  (*(const struct st_write_tensor *const *) b)->name);
}

/* The writer's argument checks; target names the file or folder in messages. */
static int check_write_args(const char *target, int n, const struct st_write_tensor *t,
                            enum st_dtype dtype, struct moai_err *err)
{
    if (dtype != ST_F32 && dtype != ST_BF16)
        return moai_err_set(err, MOAI_EUSAGE, "%s: writing %s is not supported (F32 and BF16 are)",
                            target, st_dtype_name(dtype));
    if (n < 0)
        return moai_err_set(err, MOAI_EUSAGE, "%s: %d tensors to write", target, n);
    for (int i = 0; i < n; i++) {
        const char *name = t[i].name;
        int64_t numel = 1;
        if (!name || !*name || !strcmp(name, "__metadata__"))
            return moai_err_set(err, MOAI_EUSAGE, "%s: tensor %d has no usable name ('%s')", target,
                                i, name ? name : "");
        if (t[i].ndim < 0 || t[i].ndim > ST_MAX_DIMS)
            return moai_err_set(err, MOAI_EUSAGE, "%s: tensor '%s' has %d dimensions (0 to %d)",
                                target, name, t[i].ndim, ST_MAX_DIMS);
        for (int d = 0; d < t[i].ndim; d++) {
            int64_t s = t[i].shape[d];
            if (s < 0 || (s && numel > INT64_MAX / 8 / s))
                return moai_err_set(err, MOAI_EUSAGE, "%s: tensor '%s' has a bad size %lld", target,
                                    name, (long long) s);
            numel *= s;
        }
        if (numel > 0 && !t[i].data)
            return moai_err_set(err, MOAI_EUSAGE, "%s: tensor '%s' has no data", target, name);
    }
    const struct st_write_tensor **order = malloc(((size_t) n + 1) * sizeof(*order));
    int rc = 0;
    if (!order)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        order[i] = &t[i];
    qsort(order, (size_t) n, sizeof(*order), cmp_wname);
    for (int i = 1; i < n && rc == 0; i++)
        if (!strcmp(order[i - 1]->name, order[i]->name))
            rc = moai_err_set(err, MOAI_EUSAGE, "%s: tensor '%s' is written twice", target,
                              order[i]->name);
    free(order);
    return rc;
}

/* The header of n tensors: compact JSON, padded with spaces to a multiple of 8 bytes. */
static char *make_header(int n, const struct st_write_tensor *t, enum st_dtype dtype, size_t *len)
{
    json_t *h = json_pack("{s:{s:s}}", "__metadata__", "format", "pt");
    uint64_t off = 0;
    int bad = !h;

    for (int i = 0; i < n && !bad; i++) {
        json_t *shape = json_array();
        bad = !shape;
        for (int d = 0; d < t[i].ndim && !bad; d++)
            bad = json_array_append_new(shape, json_integer(t[i].shape[d]));
        uint64_t bytes = (uint64_t) write_numel(&t[i]) * (uint64_t) st_dtype_size(dtype);
        json_t *e =
            bad ? NULL
                : json_pack("{s:s, s:o, s:[I, I]}", "dtype", st_dtype_name(dtype), "shape", shape,
                            "data_offsets", (json_int_t) off, (json_int_t) (off + bytes));
        bad = !e || json_object_set_new(h, t[i].name, e);
        off += bytes;
    }
    char *text = bad ? NULL : json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(h);
    if (!text)
        return NULL;
    size_t n0 = strlen(text), padded = (n0 + 7) & ~(size_t) 7;
    char *out = realloc(text, padded + 1);
    if (!out) {
        free(text);
        return NULL;
    }
    memset(out + n0, ' ', padded - n0);
    out[padded] = '\0';
    *len = padded;
    return out;
}

/* One file, arguments already checked. */
static int write_file(const char *path, int n, const struct st_write_tensor *t, enum st_dtype dtype,
                      struct moai_err *err)
{
    struct atomicfile a;
    size_t hlen;
    uint8_t len8[8];
    int rc;

    char *header = make_header(n, t, dtype, &hlen);
    if (!header)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    if ((rc = atomicfile_begin(&a, path, err)) < 0) {
        free(header);
        return rc;
    }
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t) ((uint64_t) hlen >> (8 * i));
    atomicfile_write(&a, len8, 8);
    atomicfile_write(&a, header, hlen);
    free(header);

    enum { CHUNK = 1 << 15 };
    uint16_t *buf = dtype == ST_BF16 ? malloc(CHUNK * sizeof(*buf)) : NULL;
    if (dtype == ST_BF16 && !buf) {
        atomicfile_abort(&a);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    }
    for (int i = 0; i < n && !a.failed_errno; i++) {
        int64_t numel = write_numel(&t[i]);
        if (dtype == ST_F32) {
            atomicfile_write(&a, t[i].data, (size_t) numel * 4);
            continue;
        }
        for (int64_t j = 0; j < numel && !a.failed_errno; j += CHUNK) {
            int64_t k = numel - j < CHUNK ? numel - j : CHUNK;
            for (int64_t q = 0; q < k; q++)
                buf[q] = st_bf16_from_f32(t[i].data[j + q]);
            atomicfile_write(&a, buf, (size_t) k * 2);
        }
    }
    free(buf);
    return atomicfile_commit(&a, err);
}

int st_write(const char *path, int n, const struct st_write_tensor *t, enum st_dtype dtype,
             struct moai_err *err)
{
    int rc = check_write_args(path, n, t, dtype, err);
    return rc < 0 ? rc : write_file(path, n, t, dtype, err);
}

/* Is name BASE-NNNNN-of-NNNNN.safetensors? Then *index and *count get the numbers. */
static bool is_shard_name(const char *name, const char *base, int *index, int *count)
{
    size_t b = strlen(base);
    if (strncmp(name, base, b))
        return false;
    const char *p = name + b;
    if (strlen(p) != strlen("-00001-of-00001.safetensors"))
        return false;
    for (int i = 0; i < 5; i++)
        if (p[1 + i] < '0' || p[1 + i] > '9' || p[10 + i] < '0' || p[10 + i] > '9')
            return false;
    if (p[0] != '-' || strncmp(p + 6, "-of-", 4) || strcmp(p + 15, ".safetensors"))
        return false;
    *index = atoi(p + 1);
    *count = atoi(p + 10);
    return true;
}

/* Removes dir's files of the other form than the one just written: the single file when
 * nshards > 0, the index when nshards == 0, and shards not of this write. */
static int remove_stale(const char *dir, const char *base, int nshards, struct moai_err *err)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    size_t b = strlen(base);
    int rc = 0;

    if (!d)
        return moai_err_set(err, MOAI_EIO, "cannot read '%s': %s", dir, strerror(errno));
    while (rc == 0 && (e = readdir(d))) {
        const char *name = e->d_name;
        int index, count;
        bool stale;
        if (is_shard_name(name, base, &index, &count))
            stale = nshards == 0 || count != nshards || index < 1 || index > nshards;
        else if (!strncmp(name, base, b) && !strcmp(name + b, ".safetensors"))
            stale = nshards > 0;
        else if (!strncmp(name, base, b) && !strcmp(name + b, ".safetensors.index.json"))
            stale = nshards == 0;
        else
            stale = false;
        if (!stale)
            continue;
        char *p = path_join(dir, name);
        if (!p)
            rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        else if (unlink(p) < 0 && errno != ENOENT)
            rc =
                moai_err_set(err, MOAI_EIO, "cannot remove the stale '%s': %s", p, strerror(errno));
        free(p);
    }
    closedir(d);
    return rc == 0 ? atomicfile_sync_dir(dir, err) : rc;
}

static int write_index(const char *path, const json_t *index, struct moai_err *err)
{
    struct atomicfile a;
    int rc;
    char *text = json_dumps(index, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (!text)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    if ((rc = atomicfile_begin(&a, path, err)) == 0) {
        atomicfile_write(&a, text, strlen(text));
        atomicfile_write(&a, "\n", 1);
        rc = atomicfile_commit(&a, err);
    }
    free(text);
    return rc;
}

/* dir/name, written with the n tensors of t. */
static int write_named(const char *dir, const char *name, int n, const struct st_write_tensor *t,
                       enum st_dtype dtype, struct moai_err *err)
{
    char *path = path_join(dir, name);
    if (!path)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    int rc = write_file(path, n, t, dtype, err);
    free(path);
    return rc;
}

/* Cuts the n tensors of t, in order, into shards of at most max_bytes (a tensor larger than
 * that alone): shard s holds tensors [first[s], first[s + 1]). Returns the shard count. */
static int cut_shards(int n, const struct st_write_tensor *t, uint64_t esize, uint64_t max_bytes,
                      int *first)
{
    uint64_t bytes = 0;
    int k = 0;
    for (int i = 0; i < n; i++) {
        uint64_t b = (uint64_t) write_numel(&t[i]) * esize;
        if (k == 0 || (bytes > 0 && bytes + b > max_bytes)) {
            first[k++] = i;
            bytes = 0;
        }
        bytes += b;
    }
    first[k] = n;
    return k;
}

/* Writes the k shards BASE-NNNNN-of-NNNNN.safetensors, each tensor's name mapped to its
 * shard's in map. */
static int write_shards(const char *dir, const char *base, int k, const int *first,
                        const struct st_write_tensor *t, enum st_dtype dtype, json_t *map,
                        struct moai_err *err)
{
    char name[512];
    int rc;
    for (int s = 0; s < k; s++) {
        snprintf(name, sizeof(name), "%s-%05d-of-%05d.safetensors", base, s + 1, k);
        if ((rc = write_named(dir, name, first[s + 1] - first[s], t + first[s], dtype, err)) < 0)
            return rc;
        for (int i = first[s]; i < first[s + 1]; i++)
            if (json_object_set_new(map, t[i].name, json_string(name)))
                return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    return 0;
}

/* BASE.safetensors.index.json: the total size and the weight map. */
static int write_shard_index(const char *dir, const char *base, uint64_t total, json_t *map,
                             struct moai_err *err)
{
    char name[512];
    json_t *index = json_object();
    int rc;
    if (!index ||
        json_object_set_new(index, "metadata",
                            json_pack("{s:I}", "total_size", (json_int_t) total)) ||
        json_object_set(index, "weight_map", map)) {
        json_decref(index);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory");
    }
    snprintf(name, sizeof(name), "%s.safetensors.index.json", base);
    char *ipath = path_join(dir, name);
    if (!ipath)
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
    else
        rc = write_index(ipath, index, err);
    free(ipath);
    json_decref(index);
    return rc;
}

int st_write_sharded(const char *dir, const char *base, int n, const struct st_write_tensor *t,
                     enum st_dtype dtype, uint64_t max_shard_bytes, int *nshards,
                     struct moai_err *err)
{
    uint64_t total = 0, esize = (uint64_t) st_dtype_size(dtype);
    char name[512];
    int rc, k;

    if (nshards)
        *nshards = 0;
    if ((rc = check_write_args(dir, n, t, dtype, err)) < 0)
        return rc;
    if (!*base || strchr(base, '/') || strlen(base) > 256)
        return moai_err_set(err, MOAI_EUSAGE, "%s: '%s' is not a file name", dir, base);
    for (int i = 0; i < n; i++)
        total += (uint64_t) write_numel(&t[i]) * esize;

    if (max_shard_bytes == 0 || total <= max_shard_bytes) {
        snprintf(name, sizeof(name), "%s.safetensors", base);
        rc = write_named(dir, name, n, t, dtype, err);
        return rc < 0 ? rc : remove_stale(dir, base, 0, err);
    }
    int *first = malloc(((size_t) n + 2) * sizeof(*first));
    json_t *map = json_object();
    if (!first || !map) {
        rc = moai_err_set(err, MOAI_ENOMEM, "out of memory");
        goto out;
    }
    if ((k = cut_shards(n, t, esize, max_shard_bytes, first)) > 99999) {
        rc = moai_err_set(err, MOAI_EUSAGE, "%s: %d shards are more than the names allow", dir, k);
        goto out;
    }
    if ((rc = write_shards(dir, base, k, first, t, dtype, map, err)) == 0 &&
        (rc = write_shard_index(dir, base, total, map, err)) == 0 &&
        (rc = remove_stale(dir, base, k, err)) == 0 && nshards)
        *nshards = k;
out:
    json_decref(map);
    free(first);
    return rc;
}
