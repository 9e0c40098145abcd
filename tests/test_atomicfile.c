/* test_atomicfile.c - files replaced whole or not at all: the success path, real failures
 * (a missing or unwritable folder, a destination that is a folder) and injected ones.
 *
 * Faults are injected at the system calls: this binary links with -Wl,--wrap for open, write,
 * fsync and rename (see the Makefile), which reroutes those calls in libmoai.a and here. An
 * armed fault fails the call with the chosen errno; writes can also be cut short or
 * interrupted, which the writer must absorb. After every failure the test checks that the
 * folder holds exactly what it held before: no temporary file, the destination unchanged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "atomicfile.h"
#include "data/tokcache.h"
#include "exec/ckpt.h"
#include "model/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- the injector ------------------------------------------------------------------------ */

static struct {
    int open_errno;      /* open with O_CREAT fails with this */
    int write_errno;     /* write fails with this */
    int file_fsync;      /* fsync of a file fails with this */
    int dir_fsync;       /* fsync of a folder fails with this */
    int rename_errno;    /* rename fails with this */
    int short_writes;    /* writes move at most 3 bytes, every other one first fails EINTR */
    int interrupted;     /* the EINTR toggle of short_writes */
    long writes, fsyncs; /* calls seen */
} fault;

int __real_open(const char *path, int flags, ...);
int __wrap_open(const char *path, int flags, ...);
ssize_t __real_write(int fd, const void *p, size_t n);
ssize_t __wrap_write(int fd, const void *p, size_t n);
int __real_fsync(int fd);
int __wrap_fsync(int fd);
int __real_rename(const char *from, const char *to);
int __wrap_rename(const char *from, const char *to);

int __wrap_open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & O_CREAT) {
        va_list ap;
        va_start(ap, flags);
        mode = (mode_t) va_arg(ap, int);
        va_end(ap);
        if (fault.open_errno) {
            errno = fault.open_errno;
            return -1;
        }
    }
    return __real_open(path, flags, mode);
}

ssize_t __wrap_write(int fd, const void *p, size_t n)
{
    fault.writes++;
    if (fault.write_errno) {
        errno = fault.write_errno;
        return -1;
    }
    if (fault.short_writes) {
        if ((fault.interrupted = !fault.interrupted)) {
            errno = EINTR;
            return -1;
        }
        return __real_write(fd, p, n < 3 ? n : 3);
    }
    return __real_write(fd, p, n);
}

int __wrap_fsync(int fd)
{
    struct stat st;
    int e = fstat(fd, &st) == 0 && S_ISDIR(st.st_mode) ? fault.dir_fsync : fault.file_fsync;
    fault.fsyncs++;
    if (e) {
        errno = e;
        return -1;
    }
    return __real_fsync(fd);
}

int __wrap_rename(const char *from, const char *to)
{
    if (fault.rename_errno) {
        errno = fault.rename_errno;
        return -1;
    }
    return __real_rename(from, to);
}

/* ---- helpers ----------------------------------------------------------------------------- */

static char tmp[512];

static int setup(void **state)
{
    (void) state;
    const char *base = getenv("TMPDIR");
    snprintf(tmp, sizeof(tmp), "%s/moai-af-XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmp) ? 0 : -1;
}

static int teardown(void **state)
{
    (void) state;
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "chmod -R u+w '%s'; rm -rf '%s'", tmp, tmp);
    return system(cmd) == 0 ? 0 : -1;
}

static int disarm(void **state)
{
    (void) state;
    memset(&fault, 0, sizeof(fault));
    return 0;
}

/* tmp/name in one of eight static buffers. */
static const char *tpath(const char *name)
{
    static char bufs[8][600];
    static int next;
    char *p = bufs[next++ % 8];
    snprintf(p, 600, "%s/%s", tmp, name);
    return p;
}

/* A fresh empty folder tmp/name. */
static const char *fresh_dir(const char *name)
{
    const char *d = tpath(name);
    assert_int_equal(mkdir(d, 0777), 0);
    return d;
}

/* Names in folder dir (dot files too, but not . and ..), sorted, joined by spaces. */
static void list_dir(const char *dir, char *out, size_t size)
{
    char *names[64];
    int n = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    assert_non_null(d);
    while ((e = readdir(d)) && n < 64)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            names[n++] = strdup(e->d_name);
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char *t = names[j];
            names[j] = names[j - 1];
            names[j - 1] = t;
        }
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (i)
            strncat(out, " ", size - strlen(out) - 1);
        strncat(out, names[i], size - strlen(out) - 1);
        free(names[i]);
    }
}

static void assert_listing(const char *dir, const char *want)
{
    char names[1024];
    list_dir(dir, names, sizeof(names));
    assert_string_equal(names, want);
}

static void assert_contents(const char *path, const char *want)
{
    char buf[256] = {0};
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    assert_int_equal(n, strlen(want));
    assert_string_equal(buf, want);
}

static void put(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* "cannot write 'path': strerror(e)" */
static void assert_write_error(const struct moai_err *err, const char *path, int e)
{
    char want[800];
    snprintf(want, sizeof(want), "cannot write '%s': %s", path, strerror(e));
    assert_int_equal(err->code, MOAI_EIO);
    assert_string_equal(err->msg, want);
}

/* ---- the success path -------------------------------------------------------------------- */

static void test_atomicfile_creates_and_replaces(void **state)
{
    (void) state;
    struct moai_err err = {0};
    struct atomicfile a;
    const char *dir = fresh_dir("ok");
    const char *path = tpath("ok/f.txt");

    assert_int_equal(atomicfile_begin(&a, path, &err), 0);
    assert_int_equal(atomicfile_write(&a, "hello ", 6), 0);
    assert_int_equal(atomicfile_write(&a, "", 0), 0);
    assert_int_equal(atomicfile_write(&a, "world", 5), 0);
    assert_int_equal(access(path, F_OK), -1); /* nothing under the name before the commit */
    assert_int_equal(atomicfile_commit(&a, &err), 0);
    assert_contents(path, "hello world");
    assert_listing(dir, "f.txt");
    assert_true(fault.fsyncs >= 2); /* the file and its folder */

    /* the mode any new file gets: 0666 less the umask */
    mode_t mask = umask(022);
    umask(mask);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0666 & ~mask);

    /* replacing, in one call; a relative name syncs the current folder */
    assert_int_equal(atomicfile_write_all(path, "new", 3, &err), 0);
    assert_contents(path, "new");
    assert_int_equal(atomicfile_write_all(path, "", 0, &err), 0);
    assert_contents(path, "");
    assert_listing(dir, "f.txt");
    char cwd[4096];
    assert_non_null(getcwd(cwd, sizeof(cwd)));
    assert_int_equal(chdir(dir), 0);
    assert_int_equal(atomicfile_write_all("rel.txt", "r", 1, &err), 0);
    assert_int_equal(chdir(cwd), 0);
    assert_listing(dir, "f.txt rel.txt");
}

/* Writes cut to 3 bytes and interrupted by signals still write everything. */
static void test_atomicfile_short_and_interrupted_writes(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *path = tpath("short.txt");
    const char *text = "a longer text than one short write moves";

    fault.short_writes = 1;
    assert_int_equal(atomicfile_write_all(path, text, strlen(text), &err), 0);
    assert_true(fault.writes >= 2 * ((long) strlen(text) / 3));
    assert_contents(path, text);
}

/* Folders that cannot be synced (ENOTSUP, EINVAL) count as synced. */
static void test_atomicfile_dir_sync_not_supported(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *dir = fresh_dir("nosync");
    const char *path = tpath("nosync/f");

    fault.dir_fsync = ENOTSUP;
    assert_int_equal(atomicfile_write_all(path, "1", 1, &err), 0);
    assert_int_equal(atomicfile_sync_dir(dir, &err), 0);
    fault.dir_fsync = EINVAL;
    assert_int_equal(atomicfile_write_all(path, "2", 1, &err), 0);
    assert_int_equal(atomicfile_sync_dir(dir, &err), 0);
    assert_contents(path, "2");
    assert_listing(dir, "f");
}

static void test_atomicfile_abort(void **state)
{
    (void) state;
    struct moai_err err = {0};
    struct atomicfile a;
    const char *dir = fresh_dir("abort");
    const char *path = tpath("abort/f");

    put(path, "old");
    assert_int_equal(atomicfile_begin(&a, path, &err), 0);
    atomicfile_write(&a, "new", 3);
    atomicfile_abort(&a);
    assert_contents(path, "old");
    assert_listing(dir, "f");
}

/* ---- real failures ----------------------------------------------------------------------- */

static void test_atomicfile_missing_folder(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *path = tpath("no-such-dir/f");

    assert_int_equal(atomicfile_write_all(path, "x", 1, &err), MOAI_EIO);
    assert_write_error(&err, path, ENOENT);
    assert_int_equal(atomicfile_sync_dir(tpath("no-such-dir"), &err), MOAI_EIO);
    char want[800];
    snprintf(want, sizeof(want), "cannot sync '%s': No such file or directory",
             tpath("no-such-dir"));
    assert_string_equal(err.msg, want);
}

/* A folder without write permission. Root writes there anyway, so for root the permission
 * error is injected at the creation of the temporary file. */
static void test_atomicfile_unwritable_folder(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *dir = fresh_dir("ro");
    const char *path = tpath("ro/f");

    put(path, "old");
    assert_int_equal(chmod(dir, 0555), 0);
    if (geteuid() == 0)
        fault.open_errno = EACCES;
    assert_int_equal(atomicfile_write_all(path, "new", 3, &err), MOAI_EIO);
    fault.open_errno = 0;
    assert_int_equal(chmod(dir, 0755), 0);
    assert_write_error(&err, path, EACCES);
    assert_contents(path, "old");
    assert_listing(dir, "f");
}

/* The destination is a folder: the rename fails, the folder and its contents stay. */
static void test_atomicfile_destination_is_a_folder(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *dir = fresh_dir("isdir");
    const char *path = fresh_dir("isdir/target");

    put(tpath("isdir/target/inside"), "kept");
    assert_int_equal(atomicfile_write_all(path, "x", 1, &err), MOAI_EIO);
    assert_write_error(&err, path, EISDIR);
    assert_listing(dir, "target");
    assert_listing(path, "inside");
    assert_contents(tpath("isdir/target/inside"), "kept");
}

/* ---- injected failures ------------------------------------------------------------------- */

/* Each step that can fail before the rename: the error names the destination and its cause,
 * the old file stays, no temporary file remains. */
static void test_atomicfile_injected_failures(void **state)
{
    (void) state;
    struct {
        int *knob, e;
    } cases[] = {
        {&fault.open_errno, EMFILE}, {&fault.write_errno, ENOSPC}, {&fault.write_errno, EDQUOT},
        {&fault.file_fsync, EIO},    {&fault.rename_errno, EXDEV},
    };
    const char *dir = fresh_dir("inject");
    const char *path = tpath("inject/f");

    put(path, "old");
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct moai_err err = {0};
        *cases[i].knob = cases[i].e;
        assert_int_equal(atomicfile_write_all(path, "new", 3, &err), MOAI_EIO);
        *cases[i].knob = 0;
        assert_write_error(&err, path, cases[i].e);
        assert_contents(path, "old");
        assert_listing(dir, "f");
    }

    /* a write error is remembered: later writes do nothing, the commit reports the first */
    struct moai_err err = {0};
    struct atomicfile a;
    assert_int_equal(atomicfile_begin(&a, path, &err), 0);
    fault.write_errno = ENOSPC;
    assert_int_equal(atomicfile_write(&a, "n", 1), -1);
    fault.write_errno = EIO;
    long writes = fault.writes;
    assert_int_equal(atomicfile_write(&a, "ew", 2), -1);
    assert_int_equal(fault.writes, writes);
    fault.write_errno = 0;
    assert_int_equal(atomicfile_commit(&a, &err), MOAI_EIO);
    assert_write_error(&err, path, ENOSPC);
    assert_contents(path, "old");
    assert_listing(dir, "f");
}

/* A folder sync that fails for a real reason is an error, though the rename has happened. */
static void test_atomicfile_dir_sync_failure(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *dir = fresh_dir("dirsync");
    const char *path = tpath("dirsync/f");

    fault.dir_fsync = EIO;
    assert_int_equal(atomicfile_write_all(path, "new", 3, &err), MOAI_EIO);
    assert_write_error(&err, path, EIO);
    assert_listing(dir, "f");
    assert_int_equal(atomicfile_sync_dir(dir, &err), MOAI_EIO);
    char want[800];
    snprintf(want, sizeof(want), "cannot sync '%s': Input/output error", dir);
    assert_string_equal(err.msg, want);
}

/* The three writers built on the module leave nothing behind when a write fails. */
static void test_atomicfile_users_leave_nothing(void **state)
{
    (void) state;
    struct moai_err err = {0};
    const char *dir = fresh_dir("users");
    float x[2] = {1, 2};
    struct st_write_tensor t = {.name = "x", .ndim = 1, .shape = {2}, .data = x};
    const char *st = tpath("users/model.safetensors");
    const char *js = tpath("users/state.json");
    const char *cache = tpath("users/cache.tok");

    fault.write_errno = ENOSPC;
    assert_int_equal(st_write(st, 1, &t, ST_F32, &err), MOAI_EIO);
    assert_write_error(&err, st, ENOSPC);

    json_t *obj = json_pack("{s:i}", "step", 3);
    assert_non_null(obj);
    assert_int_equal(ckpt_write_json_file(js, obj, &err), MOAI_EIO);
    assert_write_error(&err, js, ENOSPC);
    json_decref(obj);

    int32_t tokens[4] = {1, 2, 3, 4}, labels[4] = {2, 3, 4, -100};
    int64_t lengths[2] = {2, 2}, masked[2] = {0, 0};
    uint8_t mask[4] = {0, 0, 0, 0};
    struct tokenized ds = {.n = 2,
                           .T = 2,
                           .tokens = tokens,
                           .labels = labels,
                           .lengths = lengths,
                           .masked = masked,
                           .mask = mask};
    assert_int_equal(tokcache_store(&ds, cache, 7, &err), MOAI_EIO);
    assert_write_error(&err, cache, ENOSPC);
    assert_listing(dir, "");

    fault.write_errno = 0; /* and with the fault gone, each writes its file */
    assert_int_equal(st_write(st, 1, &t, ST_F32, &err), 0);
    assert_int_equal(tokcache_store(&ds, cache, 7, &err), 0);
    assert_listing(dir, "cache.tok model.safetensors");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_atomicfile_creates_and_replaces, disarm),
        cmocka_unit_test_setup(test_atomicfile_short_and_interrupted_writes, disarm),
        cmocka_unit_test_setup(test_atomicfile_dir_sync_not_supported, disarm),
        cmocka_unit_test_setup(test_atomicfile_abort, disarm),
        cmocka_unit_test_setup(test_atomicfile_missing_folder, disarm),
        cmocka_unit_test_setup(test_atomicfile_unwritable_folder, disarm),
        cmocka_unit_test_setup(test_atomicfile_destination_is_a_folder, disarm),
        cmocka_unit_test_setup(test_atomicfile_injected_failures, disarm),
        cmocka_unit_test_setup(test_atomicfile_dir_sync_failure, disarm),
        cmocka_unit_test_setup(test_atomicfile_users_leave_nothing, disarm),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
