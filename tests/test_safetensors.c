/* test_safetensors.c - safetensors round trips (F32, BF16, sharded), exact conversions, sets,
 * the tensor list of a config, loading and saving models, and every malformed file in
 * tests/data/bad/safetensors/ with its expected error line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "log.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/tensors.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char tmp[512];

static int setup(void **state)
{
    (void) state;
    const char *base = getenv("TMPDIR");
    snprintf(tmp, sizeof(tmp), "%s/moai-st-XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state)
{
    (void) state;
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    return system(cmd) == 0 ? 0 : -1;
}

/* tmp/name, in a static buffer of sixteen (a path is good for sixteen calls; copy it to keep
 * it longer). */
static const char *tpath(const char *fmt, ...)
{
    static char bufs[16][600];
    static int next;
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    char *p = bufs[next++ % 16];
    snprintf(p, 600, "%s/%s", tmp, name);
    return p;
}

static void *read_all(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *size = (size_t) ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = malloc(*size + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, *size, f), *size);
    fclose(f);
    return p;
}

/* Names in folder dir, sorted, joined by spaces. */
static void list_dir(const char *dir, char *out, size_t size)
{
    char *names[64];
    int n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    assert_non_null(d);
    while ((e = readdir(d)) && n < 64)
        if (e->d_name[0] != '.')
            names[n++] = strdup(e->d_name);
    closedir(d);
    for (int i = 0; i < n; i++) /* insertion sort: a handful of names */
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        snprintf(out + strlen(out), size - strlen(out), "%s%s", i ? " " : "", names[i]);
        free(names[i]);
    }
}

/* Runs tests/st_check.py on path; returns its output (which it asserts exits 0). */
static char *py_check(const char *path)
{
    static char all[8192];
    char cmd[1024], line[512];
    snprintf(cmd, sizeof(cmd), "python3 tests/st_check.py '%s'", path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    all[0] = '\0';
    while (fgets(line, sizeof(line), p))
        strncat(all, line, sizeof(all) - strlen(all) - 1);
    assert_int_equal(pclose(p), 0);
    return all;
}

static void test_safetensors_round_trip_f32(void **state)
{
    (void) state;
    float a[6] = {1.0f, -2.5f, 3.14159265f, 0.0f, -0.0f, 1e-40f /* subnormal */};
    float b[24], s = 7.0f;
    for (int i = 0; i < 24; i++)
        b[i] = (float) i / 3.0f - 4.0f;
    b[5] = NAN;
    b[6] = -INFINITY;
    struct st_write_tensor t[4] = {
        {.name = "model.a", .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b", .ndim = 3, .shape = {2, 3, 4}, .data = b},
        {.name = "scalar", .ndim = 0, .data = &s},
        {.name = "empty", .ndim = 2, .shape = {0, 5}, .data = NULL},
    };
    struct st_file f;
    struct moai_err err = {0};
    float out[24];
    const char *path = tpath("f32.safetensors");

    assert_int_equal(st_write(path, 4, t, ST_F32, &err), 0);
    assert_int_equal(st_open(&f, path, &err), 0);
    assert_int_equal(f.ntensors, 4);
    /* header order is the order given */
    assert_string_equal(f.tensors[0].name, "model.a");
    assert_string_equal(f.tensors[3].name, "empty");
    const struct st_tensor *tb = st_find(&f, "b");
    assert_non_null(tb);
    assert_int_equal(tb->ndim, 3);
    assert_int_equal(tb->shape[2], 4);
    assert_int_equal(tb->numel, 24);
    assert_int_equal(tb->nbytes, 96);
    assert_int_equal(st_to_f32(tb, out, &err), 0);
    assert_memory_equal(out, b, sizeof(b));      /* bit for bit, NaN and -inf included */
    assert_memory_equal(tb->data, b, sizeof(b)); /* the raw view */
    assert_int_equal(st_to_f32(st_find(&f, "model.a"), out, &err), 0);
    assert_memory_equal(out, a, sizeof(a));
    const struct st_tensor *ts = st_find(&f, "scalar");
    assert_int_equal(ts->ndim, 0);
    assert_int_equal(ts->numel, 1);
    assert_int_equal(st_find(&f, "empty")->numel, 0);
    assert_int_equal(st_find(&f, "empty")->nbytes, 0);
    assert_null(st_find(&f, "missing"));
    /* The header is padded with spaces to a multiple of 8 and names the format first. */
    assert_int_equal(f.header_bytes % 8, 0);
    assert_memory_equal(f.map + 8, "{\"__metadata__\":{\"format\":\"pt\"},\"model.a\":", 42);
    assert_int_equal(f.size, 8 + f.header_bytes + (6 + 24 + 1) * 4);

    /* Written again from what was read: the same bytes. */
    struct st_write_tensor again[4];
    float back[4][24];
    for (int i = 0; i < 4; i++) {
        const struct st_tensor *x = &f.tensors[i];
        again[i] = (struct st_write_tensor){.name = x->name, .ndim = x->ndim, .data = back[i]};
        memcpy(again[i].shape, x->shape, sizeof(x->shape));
        assert_int_equal(st_to_f32(x, back[i], &err), 0);
    }
    const char *path2 = tpath("f32-again.safetensors");
    assert_int_equal(st_write(path2, 4, again, ST_F32, &err), 0);
    size_t n1, n2;
    void *b1 = read_all(path, &n1), *b2 = read_all(path2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1);
    free(b1);
    free(b2);
    st_close(&f);
    st_close(&f); /* harmless */
}

static uint32_t bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static void test_safetensors_bf16_rounding(void **state)
{
    (void) state;
    /* fp32 bits -> bf16 bits, worked out by hand: round to nearest, ties to even. */
    static const uint32_t cases[][2] = {
        {0x3f800000, 0x3f80}, /* 1.0 */
        {0x3f808000, 0x3f80}, /* halfway, 0x3f80 is even: down */
        {0x3f818000, 0x3f82}, /* halfway, 0x3f81 is odd: up */
        {0x3f808001, 0x3f81}, /* just past halfway: up */
        {0x3f807fff, 0x3f80}, /* just before: down */
        {0x40490fdb, 0x4049}, /* pi -> 3.140625 */
        {0xbf7fffff, 0xbf80}, /* -0.99999994 -> -1.0, carry into the exponent */
        {0x7f7fffff, 0x7f80}, /* FLT_MAX -> +inf */
        {0x7f800000, 0x7f80}, /* +inf */
        {0xff800000, 0xff80}, /* -inf */
        {0x7fc00000, 0x7fc0}, /* quiet NaN */
        {0x7f800001, 0x7fc0}, /* signalling NaN with a low payload: stays a NaN */
        {0xffa00000, 0xffe0}, /* negative NaN keeps sign and payload top */
        {0x80000000, 0x8000}, /* -0.0 */
        {0x00000001, 0x0000}, /* smallest subnormal: down to +0 */
        {0x00018000, 0x0002}, /* subnormal, halfway, odd: up */
        {0x00008000, 0x0000}, /* subnormal, halfway, even: down */
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint16_t h = st_bf16_from_f32(from_bits(cases[i][0]));
        if (h != cases[i][1])
            fail_msg("bf16 of 0x%08x: 0x%04x, want 0x%04x", cases[i][0], h, cases[i][1]);
    }
    /* Widening is exact: every bf16 value is the fp32 with the same top 16 bits. */
    for (uint32_t h = 0; h < 65536; h++)
        assert_int_equal(bits(st_f32_from_bf16((uint16_t) h)), h << 16);
    /* bf16 -> fp32 -> bf16 is the identity (NaNs aside, which stay NaNs). */
    for (uint32_t h = 0; h < 65536; h++) {
        float x = st_f32_from_bf16((uint16_t) h);
        if (isnan(x))
            assert_true(isnan(st_f32_from_bf16(st_bf16_from_f32(x))));
        else
            assert_int_equal(st_bf16_from_f32(x), h);
    }

    /* Through a file: written as BF16, read back as the rounded values. */
    float v[17];
    for (size_t i = 0; i < 17; i++)
        v[i] = from_bits(cases[i][0]);
    struct st_write_tensor t = {.name = "v", .ndim = 1, .shape = {17}, .data = v};
    struct moai_err err = {0};
    struct st_file f;
    float out[17];
    const char *path = tpath("bf16.safetensors");
    assert_int_equal(st_write(path, 1, &t, ST_BF16, &err), 0);
    assert_int_equal(st_open(&f, path, &err), 0);
    assert_int_equal(f.tensors[0].dtype, ST_BF16);
    assert_int_equal(f.tensors[0].nbytes, 34);
    assert_int_equal(st_to_f32(&f.tensors[0], out, &err), 0);
    for (size_t i = 0; i < 17; i++)
        assert_int_equal(bits(out[i]), cases[i][1] << 16);
    /* ... and written again as BF16: the same bytes */
    t.data = out;
    const char *path2 = tpath("bf16-again.safetensors");
    assert_int_equal(st_write(path2, 1, &t, ST_BF16, &err), 0);
    size_t n1, n2;
    void *b1 = read_all(path, &n1), *b2 = read_all(path2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1);
    free(b1);
    free(b2);
    st_close(&f);
}

/* Every half-precision value, against the definition: (-1)^s x 2^(e-15) x 1.m, or
 * 2^-14 x 0.m for subnormals. */
static void test_safetensors_f16_exact(void **state)
{
    (void) state;
    for (uint32_t h = 0; h < 65536; h++) {
        int sign = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
        float want;
        if (e == 0x1f)
            want = m ? NAN : INFINITY;
        else if (e == 0)
            want = ldexpf((float) m, -24);
        else
            want = ldexpf((float) (1024 + m), e - 25);
        if (sign)
            want = -want;
        float got = st_f32_from_f16((uint16_t) h);
        if (isnan(want)) {
            assert_true(isnan(got));
            assert_int_equal(bits(got) >> 31, (uint32_t) sign);
        } else {
            assert_int_equal(bits(got), bits(want));
        }
    }

    /* An F16 tensor from memory, through st_parse. */
    const uint16_t h[6] = {0x3c00, 0xc000, 0x0001, 0x7bff, 0x7c00, 0x3555};
    const float want[6] = {1.0f,     -2.0f,    5.9604644775390625e-8f,
                           65504.0f, INFINITY, 0.333251953125f};
    uint8_t file[128];
    char hdr[] = "{\"h\":{\"dtype\":\"F16\",\"shape\":[6],\"data_offsets\":[0,12]}}    ";
    size_t hl = strlen(hdr);
    uint64_t n = hl;
    memcpy(file, &n, 8);
    memcpy(file + 8, hdr, hl);
    memcpy(file + 8 + hl, h, sizeof(h));
    struct st_file f;
    struct moai_err err = {0};
    float out[6];
    assert_int_equal(st_parse(&f, file, 8 + hl + sizeof(h), "mem", &err), 0);
    assert_string_equal(f.path, "mem");
    assert_null(f.map);
    assert_int_equal(st_to_f32(st_find(&f, "h"), out, &err), 0);
    assert_memory_equal(out, want, sizeof(want));
    st_close(&f);
    /* a failed parse leaves nothing behind */
    assert_int_equal(st_parse(&f, file, 20, "mem", &err), MOAI_EIO);
    assert_null(f.tensors);
    assert_null(f.path);
}

static void test_safetensors_write_errors(void **state)
{
    (void) state;
    float x[2] = {1, 2};
    struct moai_err err = {0};
    struct st_write_tensor t[2] = {
        {.name = "x", .ndim = 1, .shape = {2}, .data = x},
        {.name = "x", .ndim = 1, .shape = {2}, .data = x},
    };
    const char *path = tpath("w.safetensors");
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": tensor 'x' is written twice"));
    assert_int_equal(st_write(path, 1, t, ST_F16, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": writing F16 is not supported (F32 and BF16 are)"));
    t[1].name = "__metadata__";
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": tensor 1 has no usable name ('__metadata__')"));
    t[1] = (struct st_write_tensor){.name = "y", .ndim = 2, .shape = {2, -1}, .data = x};
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": tensor 'y' has a bad size -1"));
    t[1] = (struct st_write_tensor){.name = "y", .ndim = 9, .data = x};
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": tensor 'y' has 9 dimensions (0 to 8)"));
    t[1] = (struct st_write_tensor){.name = "y", .ndim = 1, .shape = {3}, .data = NULL};
    assert_int_equal(st_write(path, 2, t, ST_F32, &err), MOAI_EUSAGE);
    assert_non_null(strstr(err.msg, ": tensor 'y' has no data"));
    assert_int_equal(access(path, F_OK), -1); /* nothing was written */

    /* A folder that does not exist: an I/O error naming the file. */
    const char *bad = tpath("no-such-dir/w.safetensors");
    assert_int_equal(st_write(bad, 1, t, ST_F32, &err), MOAI_EIO);
    char want[700];
    snprintf(want, sizeof(want), "cannot write '%s': No such file or directory", bad);
    assert_string_equal(err.msg, want);

    /* Replacing a file is atomic and leaves no temporary file behind. */
    mkdir(tpath("atomic"), 0777);
    const char *target = tpath("atomic/model.safetensors");
    assert_int_equal(st_write(target, 1, t, ST_F32, &err), 0);
    x[0] = 42;
    assert_int_equal(st_write(target, 1, t, ST_F32, &err), 0);
    char names[512];
    list_dir(tpath("atomic"), names, sizeof(names));
    assert_string_equal(names, "model.safetensors");
    struct st_file f;
    float out[2];
    assert_int_equal(st_open(&f, target, &err), 0);
    assert_int_equal(st_to_f32(&f.tensors[0], out, &err), 0);
    assert_true(out[0] == 42 && out[1] == 2);
    st_close(&f);
    struct stat st;
    mode_t mask = umask(022);
    umask(mask);
    assert_int_equal(stat(target, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0666 & ~mask); /* as any new file: 0666 less the umask */
}

static void test_safetensors_sharded_round_trip(void **state)
{
    (void) state;
    float d[40];
    for (int i = 0; i < 40; i++)
        d[i] = (float) i * 0.5f;
    /* 16 + 8 + 40 + 4 + 24 + 16 bytes in F32 */
    struct st_write_tensor t[6] = {
        {.name = "w.a", .ndim = 2, .shape = {2, 2}, .data = d},
        {.name = "w.b", .ndim = 1, .shape = {2}, .data = d + 4},
        {.name = "w.c", .ndim = 2, .shape = {2, 5}, .data = d + 6}, /* larger than the limit */
        {.name = "w.d", .ndim = 1, .shape = {1}, .data = d + 16},
        {.name = "w.e", .ndim = 1, .shape = {6}, .data = d + 17},
        {.name = "a.first", .ndim = 1, .shape = {4}, .data = d + 23},
    };
    struct moai_err err = {0};
    struct st_set set;
    char names[1024], dir[600];
    int nshards = -1;
    snprintf(dir, sizeof(dir), "%s", tpath("sharded"));
    mkdir(dir, 0777);

    /* limit 32: [a b] 24, [c] 40 alone, [d e] 28, [first] 16 (28 + 16 > 32) */
    assert_int_equal(st_write_sharded(dir, "model", 6, t, ST_F32, 32, &nshards, &err), 0);
    assert_int_equal(nshards, 4);
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, "model-00001-of-00004.safetensors model-00002-of-00004.safetensors "
                               "model-00003-of-00004.safetensors model-00004-of-00004.safetensors "
                               "model.safetensors.index.json");
    size_t n;
    char *index = read_all(tpath("sharded/model.safetensors.index.json"), &n);
    index[n] = '\0';
    assert_string_equal(index, "{\n"
                               "  \"metadata\": {\n"
                               "    \"total_size\": 108\n"
                               "  },\n"
                               "  \"weight_map\": {\n"
                               "    \"a.first\": \"model-00004-of-00004.safetensors\",\n"
                               "    \"w.a\": \"model-00001-of-00004.safetensors\",\n"
                               "    \"w.b\": \"model-00001-of-00004.safetensors\",\n"
                               "    \"w.c\": \"model-00002-of-00004.safetensors\",\n"
                               "    \"w.d\": \"model-00003-of-00004.safetensors\",\n"
                               "    \"w.e\": \"model-00003-of-00004.safetensors\"\n"
                               "  }\n"
                               "}\n");
    free(index);

    assert_int_equal(st_set_open_dir(&set, dir, &err), 0);
    assert_int_equal(set.nfiles, 4);
    assert_int_equal(st_set_ntensors(&set), 6);
    assert_non_null(set.index_path);
    for (int i = 0; i < 6; i++) {
        float out[10];
        const struct st_tensor *x = st_set_find(&set, t[i].name);
        assert_non_null(x);
        assert_int_equal(st_to_f32(x, out, &err), 0);
        assert_memory_equal(out, t[i].data, (size_t) x->numel * 4);
    }
    assert_null(st_set_find(&set, "w"));
    assert_null(st_set_find(&set, "z"));
    st_set_close(&set);

    /* Fewer shards: the stale ones go. */
    assert_int_equal(st_write_sharded(dir, "model", 6, t, ST_BF16, 40, &nshards, &err), 0);
    assert_int_equal(nshards, 2); /* BF16: [a b c d] 34, [e first] 20 */
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, "model-00001-of-00002.safetensors model-00002-of-00002.safetensors "
                               "model.safetensors.index.json");
    /* One file when it fits: the index and shards go. */
    assert_int_equal(st_write_sharded(dir, "model", 6, t, ST_F32, 0, &nshards, &err), 0);
    assert_int_equal(nshards, 0);
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, "model.safetensors");
    assert_int_equal(st_set_open_dir(&set, dir, &err), 0);
    assert_int_equal(set.nfiles, 1);
    assert_null(set.index_path);
    assert_non_null(st_set_find(&set, "w.e"));
    st_set_close(&set);
    /* And back to shards: the single file goes (it would be read first). */
    assert_int_equal(st_write_sharded(dir, "model", 6, t, ST_F32, 64, &nshards, &err), 0);
    assert_int_equal(nshards, 2);
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, "model-00001-of-00002.safetensors model-00002-of-00002.safetensors "
                               "model.safetensors.index.json");
    /* Another base name in the same folder is left alone. */
    assert_int_equal(st_write_sharded(dir, "optimizer", 1, t, ST_F32, 0, NULL, &err), 0);
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, "model-00001-of-00002.safetensors model-00002-of-00002.safetensors "
                               "model.safetensors.index.json optimizer.safetensors");
    /* A set opened from one file path. */
    assert_int_equal(st_set_open(&set, tpath("sharded/optimizer.safetensors"), &err), 0);
    assert_int_equal(st_set_ntensors(&set), 1);
    st_set_close(&set);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_safetensors_index_errors(void **state)
{
    (void) state;
    float x[4] = {1, 2, 3, 4};
    struct st_write_tensor a = {.name = "x", .ndim = 1, .shape = {4}, .data = x};
    struct st_write_tensor b = {.name = "y", .ndim = 1, .shape = {2}, .data = x};
    struct moai_err err = {0};
    struct st_set set;
    char dir[600], index[600];
    snprintf(dir, sizeof(dir), "%s", tpath("index"));
    snprintf(index, sizeof(index), "%s", tpath("index/model.safetensors.index.json"));
    mkdir(dir, 0777);
    assert_int_equal(st_write(tpath("index/s1.safetensors"), 1, &a, ST_F32, &err), 0);
    assert_int_equal(st_write(tpath("index/s2.safetensors"), 1, &b, ST_F32, &err), 0);
    assert_int_equal(st_write(tpath("index/s3.safetensors"), 1, &a, ST_F32, &err), 0);
    static const struct {
        const char *json, *want; /* want follows the index path and ": " */
    } cases[] = {
        {"{\"weight_map\": {\"x\": \"s1.safetensors\", \"z\": \"s2.safetensors\"}}",
         "tensor 'z' is not in its shard 's2.safetensors'"},
        {"{\"weight_map\": {\"x\": \"s1.safetensors\", \"y\": \"s3.safetensors\"}}",
         "tensor 'y' is not in its shard 's3.safetensors'"},
        {"{\"weight_map\": {\"x\": \"s1.safetensors\", \"y\": \"s2.safetensors\", \"w\": "
         "\"s3.safetensors\"}}",
         "tensor 'w' is not in its shard 's3.safetensors'"},
        {"{\"weight_map\": {\"x\": \"s1.safetensors\", \"q\": \"s3.safetensors\"}}",
         "tensor 'q' is not in its shard 's3.safetensors'"},
        {"{\"metadata\": {}}", "'weight_map' is not an object"},
        {"[1]", "not a JSON object"},
        {"{\"weight_map\": {\"x\": 3}}", "tensor 'x': the shard is not a file name"},
        {"{\"weight_map\": {\"x\": \"../s1.safetensors\"}}",
         "tensor 'x': shard '../s1.safetensors' is not a file name in the index's folder"},
        {"{\"weight_map\": {\"x\": \"..\"}}",
         "tensor 'x': shard '..' is not a file name in the index's folder"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char want[1024];
        write_text(index, cases[i].json);
        snprintf(want, sizeof(want), "%s: %s", index, cases[i].want);
        assert_int_equal(st_set_open_dir(&set, dir, &err), MOAI_EIO);
        if (strcmp(err.msg, want))
            fail_msg("%s: got '%s', want '%s'", cases[i].json, err.msg, want);
        assert_null(set.files);
    }
    /* x in two shards */
    write_text(index, "{\"weight_map\": {\"x\": \"s3.safetensors\", \"y\": \"s2.safetensors\", "
                      "\"x2\": \"s1.safetensors\"}}");
    assert_int_equal(st_write(tpath("index/s1.safetensors"), 1, &a, ST_F32, &err), 0);
    a.name = "x2";
    struct st_write_tensor both[2] = {a, {.name = "x", .ndim = 0, .data = x}};
    assert_int_equal(st_write(tpath("index/s1.safetensors"), 2, both, ST_F32, &err), 0);
    assert_int_equal(st_set_open_dir(&set, dir, &err), MOAI_EIO);
    char want[1024];
    snprintf(want, sizeof(want), "%s: tensor 'x' is in both 's1.safetensors' and 's3.safetensors'",
             index);
    assert_string_equal(err.msg, want);
    /* a shard that is not there */
    write_text(index, "{\"weight_map\": {\"x\": \"s9.safetensors\"}}");
    assert_int_equal(st_set_open_dir(&set, dir, &err), MOAI_EIO);
    snprintf(want, sizeof(want), "cannot open '%s/s9.safetensors': No such file or directory", dir);
    assert_string_equal(err.msg, want);
    /* not JSON */
    write_text(index, "{\"weight_map\": ");
    assert_int_equal(st_set_open_dir(&set, dir, &err), MOAI_EIO);
    snprintf(want, sizeof(want), "%s:1:15: invalid JSON: unexpected token near end of file", index);
    assert_string_equal(err.msg, want);
    /* a bad shard: its own message */
    write_text(tpath("index/s4.safetensors"), "abc");
    write_text(index, "{\"weight_map\": {\"x\": \"s4.safetensors\"}}");
    assert_int_equal(st_set_open_dir(&set, dir, &err), MOAI_EIO);
    snprintf(want, sizeof(want),
             "%s/s4.safetensors: file too short for a safetensors header (3 bytes)", dir);
    assert_string_equal(err.msg, want);
    /* no weights at all */
    mkdir(tpath("none"), 0777);
    assert_int_equal(st_set_open_dir(&set, tpath("none"), &err), MOAI_EIO);
    snprintf(want, sizeof(want),
             "no weights in '%s' (model.safetensors or model.safetensors.index.json)",
             tpath("none"));
    assert_string_equal(err.msg, want);
}

static void tiny_config(struct model_config *cfg, bool tied)
{
    struct moai_err err = {0};
    json_t *o = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:b}", "hidden_size", 8,
                          "intermediate_size", 12, "num_hidden_layers", 2, "num_attention_heads", 2,
                          "num_key_value_heads", 1, "vocab_size", 16, "tie_word_embeddings", tied);
    assert_int_equal(model_config_load(cfg, NULL, o, &err), 0);
    json_decref(o);
}

static void test_safetensors_tensor_list(void **state)
{
    (void) state;
    struct model_config cfg;
    struct model_tensor t;
    tiny_config(&cfg, false);
    /* D 8, H 2, KV 1, hd 4, F 12, V 16, L 2 */
    static const struct {
        const char *name;
        int64_t rows, cols, offset;
    } want[] = {
        {"model.embed_tokens.weight", 16, 8, 0},
        {"model.layers.0.input_layernorm.weight", 8, 0, 128},
        {"model.layers.0.self_attn.q_proj.weight", 8, 8, 136},
        {"model.layers.0.self_attn.k_proj.weight", 4, 8, 200},
        {"model.layers.0.self_attn.v_proj.weight", 4, 8, 232},
        {"model.layers.0.self_attn.o_proj.weight", 8, 8, 264},
        {"model.layers.0.post_attention_layernorm.weight", 8, 0, 328},
        {"model.layers.0.mlp.gate_proj.weight", 12, 8, 336},
        {"model.layers.0.mlp.up_proj.weight", 12, 8, 432},
        {"model.layers.0.mlp.down_proj.weight", 8, 12, 528},
        {"model.layers.1.input_layernorm.weight", 8, 0, 624},
    };
    assert_int_equal(model_tensor_count(&cfg), 21);
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        model_tensor_at(&t, &cfg, (int64_t) i);
        assert_string_equal(t.name, want[i].name);
        assert_int_equal(t.shape[0], want[i].rows);
        assert_int_equal(t.shape[1], want[i].cols);
        assert_int_equal(t.ndim, want[i].cols ? 2 : 1);
        assert_int_equal(t.offset, want[i].offset);
    }
    model_tensor_at(&t, &cfg, 19);
    assert_string_equal(t.name, "model.norm.weight");
    model_tensor_at(&t, &cfg, 20);
    assert_string_equal(t.name, "lm_head.weight");
    assert_int_equal(t.offset + t.numel, model_param_count(&cfg));

    /* Names that are not tensors of this config. */
    static const char *const not_ours[] = {
        "model.layers.2.input_layernorm.weight",
        "model.layers.01.input_layernorm.weight",
        "model.layers.-1.input_layernorm.weight",
        "model.layers..input_layernorm.weight",
        "model.layers.0.input_layernorm.bias",
        "model.layers.0",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "lm_head.weight.x",
        "",
        "model.layers.99999999999999999999.mlp.up_proj.weight",
    };
    for (size_t i = 0; i < sizeof(not_ours) / sizeof(not_ours[0]); i++)
        assert_int_equal(model_tensor_find(NULL, &cfg, not_ours[i]), -1);
    tiny_config(&cfg, true);
    assert_int_equal(model_tensor_count(&cfg), 20);
    assert_int_equal(model_tensor_find(NULL, &cfg, "lm_head.weight"), -1);

    /* Every shipped config: the list tiles the arena exactly, and names find their index. */
    static const char *const shipped[] = {"llama2-7b", "llama2-13b", "llama2-70b",
                                          "llama3-8b", "llama3-70b", "mistral-7b"};
    for (size_t c = 0; c < sizeof(shipped) / sizeof(shipped[0]); c++) {
        char path[256];
        struct moai_err err = {0};
        snprintf(path, sizeof(path), "configs/models/%s/config.json", shipped[c]);
        assert_int_equal(model_config_load(&cfg, path, NULL, &err), 0);
        int64_t n = model_tensor_count(&cfg), next = 0;
        assert_int_equal(n, 2 + 9 * cfg.num_hidden_layers + !cfg.tie_word_embeddings);
        for (int64_t i = 0; i < n; i++) {
            struct model_tensor u;
            model_tensor_at(&t, &cfg, i);
            assert_int_equal(t.offset, next);
            assert_int_equal(t.numel, t.shape[0] * (t.ndim == 2 ? t.shape[1] : 1));
            next += t.numel;
            assert_int_equal(model_tensor_find(&u, &cfg, t.name), i);
            assert_string_equal(u.name, t.name);
        }
        assert_int_equal(next, model_param_count(&cfg));
    }
}

/* An arena of distinct values (not all representable in bf16). */
static float *fill_arena(const struct model_config *cfg)
{
    int64_t n = model_param_count(cfg);
    float *a = malloc((size_t) n * sizeof(float));
    assert_non_null(a);
    for (int64_t i = 0; i < n; i++)
        a[i] = (float) ((i * 7919) % 1001) / 1001.0f - 0.5f;
    return a;
}

/* Writes the tensors of cfg from arena, but for skip (left out), reshape (transposed) and,
 * when extra is set, with extra tensors. */
static void write_model(const char *path, const struct model_config *cfg, const float *arena,
                        const char *skip, const char *reshape, bool extra)
{
    int64_t n = model_tensor_count(cfg), k = 0;
    struct model_tensor *mt = calloc((size_t) n, sizeof(*mt));
    struct st_write_tensor *t = calloc((size_t) n + 2, sizeof(*t));
    struct moai_err err = {0};
    for (int64_t i = 0; i < n; i++) {
        model_tensor_at(&mt[i], cfg, i);
        if (skip && !strcmp(mt[i].name, skip))
            continue;
        t[k] = (struct st_write_tensor){.name = mt[i].name,
                                        .ndim = mt[i].ndim,
                                        .shape = {mt[i].shape[0], mt[i].shape[1]},
                                        .data = arena + mt[i].offset};
        if (reshape && !strcmp(mt[i].name, reshape)) {
            t[k].shape[0] = mt[i].shape[1];
            t[k].shape[1] = mt[i].shape[0];
        }
        k++;
    }
    if (extra) {
        t[k++] = (struct st_write_tensor){.name = "model.layers.0.self_attn.rotary_emb.inv_freq",
                                          .ndim = 1,
                                          .shape = {2},
                                          .data = arena};
        t[k++] = (struct st_write_tensor){
            .name = "model.layers.0.mlp.extra.weight", .ndim = 1, .shape = {3}, .data = arena};
    }
    assert_int_equal(st_write(path, (int) k, t, ST_F32, &err), 0);
    free(t);
    free(mt);
}

static void test_safetensors_model_load(void **state)
{
    (void) state;
    struct model_config cfg;
    struct moai_err err = {0};
    struct st_set set;
    tiny_config(&cfg, false);
    int64_t n = model_param_count(&cfg);
    float *arena = fill_arena(&cfg), *back = calloc((size_t) n, sizeof(float));
    char mdir[600], path[600];
    snprintf(mdir, sizeof(mdir), "%s", tpath("model"));
    snprintf(path, sizeof(path), "%s", tpath("model/model.safetensors"));
    mkdir(mdir, 0777);

    /* Saved by list, loaded by list: the same arena. */
    assert_int_equal(model_tensors_save(&cfg, arena, mdir, ST_F32, 0, &err), 0);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_check(&cfg, &set, mdir, true, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), 0);
    assert_memory_equal(back, arena, (size_t) n * sizeof(float));
    /* The file holds the tensors in list order. */
    struct model_tensor t;
    for (int64_t i = 0; i < model_tensor_count(&cfg); i++) {
        model_tensor_at(&t, &cfg, i);
        assert_string_equal(set.files[0].tensors[i].name, t.name);
    }
    st_set_close(&set);

    /* In one call, with config.json: the folder's name, overrides applied, a strict check. */
    json_t *cj = model_config_to_json(&cfg);
    assert_int_equal(json_dump_file(cj, tpath("model/config.json"), JSON_INDENT(2)), 0);
    json_decref(cj);
    struct model_config cfg2;
    json_t *over = json_pack("{s:f}", "rope_theta", 500000.0);
    assert_int_equal(model_tensors_open_dir(&cfg2, &set, mdir, over, true, &err), 0);
    assert_string_equal(cfg2.name, "model");
    assert_true(cfg2.rope_theta == 500000.0);
    assert_int_equal(model_param_count(&cfg2), n);
    st_set_close(&set);
    json_decref(over);
    over = json_pack("{s:i}", "vocab_size", 32); /* the weights no longer fit */
    assert_int_equal(model_tensors_open_dir(&cfg2, &set, mdir, over, false, &err), MOAI_EIO);
    assert_null(set.files);
    assert_non_null(strstr(err.msg, "tensor 'model.embed_tokens.weight' has shape [16, 8], the "
                                    "config needs [32, 8]"));
    json_decref(over);
    assert_int_equal(model_tensors_open_dir(&cfg2, &set, tpath("nothing"), NULL, false, &err),
                     MOAI_EIO);
    assert_non_null(strstr(err.msg, "nothing/config.json': No such file or directory"));

    /* BF16 and sharded: the rounded arena. */
    assert_int_equal(model_tensors_save(&cfg, arena, mdir, ST_BF16, 700, &err), 0);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_true(set.nfiles > 1);
    memset(back, 0, (size_t) n * sizeof(float));
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), 0);
    for (int64_t i = 0; i < n; i++)
        assert_int_equal(bits(back[i]), (uint32_t) st_bf16_from_f32(arena[i]) << 16);
    st_set_close(&set);

    /* A tensor missing. */
    assert_int_equal(model_tensors_save(&cfg, arena, mdir, ST_F32, 0, &err), 0);
    write_model(path, &cfg, arena, "model.layers.1.mlp.up_proj.weight", NULL, false);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), MOAI_EIO);
    char want[1024];
    snprintf(want, sizeof(want), "%s: tensor 'model.layers.1.mlp.up_proj.weight' is missing", mdir);
    assert_string_equal(err.msg, want);
    st_set_close(&set);

    /* A tensor of the wrong shape. */
    write_model(path, &cfg, arena, NULL, "model.layers.0.self_attn.k_proj.weight", false);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), MOAI_EIO);
    snprintf(want, sizeof(want),
             "%s: tensor 'model.layers.0.self_attn.k_proj.weight' has shape [8, 4], the config "
             "needs [4, 8]",
             path);
    assert_string_equal(err.msg, want);
    st_set_close(&set);

    /* Tied embeddings: lm_head.weight in the file is one tensor too many. */
    write_model(path, &cfg, arena, NULL, NULL, false);
    struct model_config tied;
    tiny_config(&tied, true);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    assert_int_equal(model_tensors_check(&tied, &set, mdir, true, &err), MOAI_EIO);
    snprintf(want, sizeof(want),
             "%s: tensor 'lm_head.weight' is not part of the config (1 such tensors)", path);
    assert_string_equal(err.msg, want);
    st_set_close(&set);

    /* Extra tensors: a warning (inv_freq not counted), or an error in strict mode. */
    write_model(path, &cfg, arena, NULL, NULL, true);
    assert_int_equal(st_set_open_dir(&set, mdir, &err), 0);
    FILE *log = tmpfile();
    assert_non_null(log);
    log_set_stream(log);
    assert_int_equal(model_tensors_load(&cfg, &set, back, mdir, &err), 0);
    log_set_stream(NULL);
    char line[1024] = "";
    rewind(log);
    assert_non_null(fgets(line, sizeof(line), log));
    fclose(log);
    snprintf(want, sizeof(want),
             "[warning] %s: 1 tensor(s) the config does not use, such as "
             "'model.layers.0.mlp.extra.weight' (ignored)\n",
             mdir);
    assert_non_null(strstr(line, want));
    assert_memory_equal(back, arena, (size_t) n * sizeof(float));
    assert_int_equal(model_tensors_check(&cfg, &set, mdir, true, &err), MOAI_EIO);
    snprintf(want, sizeof(want),
             "%s: tensor 'model.layers.0.mlp.extra.weight' is not part of the config (1 such "
             "tensors)",
             path);
    assert_string_equal(err.msg, want);
    st_set_close(&set);
    free(arena);
    free(back);
}

/* An independent reader of the published format (Python's standard library; Debian has no
 * python3-safetensors) reads what the writer wrote: one file in F32 and in BF16, and shards
 * with their index. Skipped without python3. */
static void test_safetensors_python_reader(void **state)
{
    (void) state;
    if (system("python3 -c 'import json, struct' 2>/dev/null") != 0)
        skip();
    float a[6] = {1.0f, -2.5f, 3.14159265f, 0.0f, -0.0f, 1e-40f}, b[24], s = 7.0f;
    for (int i = 0; i < 24; i++)
        b[i] = (float) i / 3.0f - 4.0f;
    struct st_write_tensor t[4] = {
        {.name = "model.a", .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b", .ndim = 3, .shape = {2, 3, 4}, .data = b},
        {.name = "scalar", .ndim = 0, .data = &s},
        {.name = "empty", .ndim = 2, .shape = {0, 5}, .data = NULL},
    };
    struct moai_err err = {0};
    const char *path = tpath("py.safetensors");

    assert_int_equal(st_write(path, 4, t, ST_F32, &err), 0);
    assert_string_equal(py_check(path), "model.a F32 [2, 3] 1.0 9.99994610111476e-41\n"
                                        "b F32 [2, 3, 4] -4.0 3.6666665077209473\n"
                                        "scalar F32 [] 7.0 7.0\n"
                                        "empty F32 [0, 5] - -\n");
    assert_int_equal(st_write(path, 4, t, ST_BF16, &err), 0);
    /* rounded: 1e-40 (0x000116c2) -> 0x0001, 3.6666665 (0x406aaaaa) -> 0x406b */
    assert_string_equal(py_check(path), "model.a BF16 [2, 3] 1.0 9.183549615799121e-41\n"
                                        "b BF16 [2, 3, 4] -4.0 3.671875\n"
                                        "scalar BF16 [] 7.0 7.0\n"
                                        "empty BF16 [0, 5] - -\n");
    mkdir(tpath("py"), 0777);
    int nshards;
    assert_int_equal(st_write_sharded(tpath("py"), "model", 4, t, ST_F32, 120, &nshards, &err), 0);
    assert_int_equal(nshards, 2);
    assert_string_equal(py_check(tpath("py/model.safetensors.index.json")),
                        "model.a F32 [2, 3] 1.0 9.99994610111476e-41\n"
                        "b F32 [2, 3, 4] -4.0 3.6666665077209473\n"
                        "scalar F32 [] 7.0 7.0\n"
                        "empty F32 [0, 5] - -\n");
}

static void test_safetensors_bad_files(void **state)
{
    (void) state;
    const char *bad = "tests/data/bad/safetensors";
    DIR *d = opendir(bad);
    struct dirent *e;
    int n = 0;
    assert_non_null(d);
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 13 || strcmp(e->d_name + len - 12, ".safetensors"))
            continue;
        char path[512], exp[512], want[1024] = "";
        snprintf(path, sizeof(path), "%s/%s", bad, e->d_name);
        snprintf(exp, sizeof(exp), "%s/%.*s.expected", bad, (int) (len - 12), e->d_name);
        FILE *f = fopen(exp, "r");
        if (!f)
            fail_msg("%s has no .expected file", path);
        if (!fgets(want, sizeof(want), f))
            want[0] = '\0';
        fclose(f);
        want[strcspn(want, "\n")] = '\0';
        struct st_file sf;
        struct moai_err err = {0};
        int rc = st_open(&sf, path, &err);
        if (rc == 0)
            st_close(&sf);
        if (rc != MOAI_EIO || strcmp(want, err.msg))
            fail_msg("%s: expected '%s', got '%s'", path, want, err.msg);
        /* nothing is left to close after a failure */
        assert_null(sf.tensors);
        assert_null(sf.map);
        n++;
    }
    closedir(d);
    assert_true(n >= 15);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_safetensors_round_trip_f32),
        cmocka_unit_test(test_safetensors_bf16_rounding),
        cmocka_unit_test(test_safetensors_f16_exact),
        cmocka_unit_test(test_safetensors_write_errors),
        cmocka_unit_test(test_safetensors_sharded_round_trip),
        cmocka_unit_test(test_safetensors_index_errors),
        cmocka_unit_test(test_safetensors_tensor_list),
        cmocka_unit_test(test_safetensors_model_load),
        cmocka_unit_test(test_safetensors_python_reader),
        cmocka_unit_test(test_safetensors_bad_files),
    };
    log_set_level(LOG_WARN); /* no "Loading checkpoint shards" lines */
    return cmocka_run_group_tests(tests, setup, teardown);
}
