/* atomicfile.c - files replaced whole or not at all (see atomicfile.h). */
#include "atomicfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The folder part of path ("." when it has none), malloc'd; NULL when out of memory. */
static char *dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t) (slash - path));
}

/* fsync of dir; returns 0 or an errno value (ENOTSUP and EINVAL count as done). */
static int sync_dir_errno(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), e = 0;
    if (fd < 0)
        return errno;
    if (fsync(fd) < 0 && errno != ENOTSUP && errno != EINVAL)
        e = errno;
    close(fd);
    return e;
}

int atomicfile_sync_dir(const char *dir, struct moai_err *err)
{
    int e = sync_dir_errno(dir);
    return e ? moai_err_set(err, MOAI_EIO, "cannot sync '%s': %s", dir, strerror(e)) : 0;
}

/* Opens a fresh temporary name beside a->path into a->tmp and a->fd; returns 0 or an errno
 * value. A name left by an earlier process with the same pid is skipped, not reused. */
static int open_tmp(struct atomicfile *a)
{
    static atomic_uint counter;
    size_t size = strlen(a->path) + 64;

    if (!(a->tmp = malloc(size)))
        return ENOMEM;
    for (int tries = 0; tries < 1000; tries++) {
        snprintf(a->tmp, size, "%s.tmp-%ld-%u", a->path, (long) getpid(),
                 atomic_fetch_add(&counter, 1));
        a->fd = open(a->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (a->fd >= 0)
            return 0;
        if (errno != EEXIST)
            break;
    }
    int e = errno;
    free(a->tmp);
    a->tmp = NULL;
    return e;
}

static void release(struct atomicfile *a)
{
    free(a->path);
    free(a->tmp);
    free(a->dir);
    a->path = a->tmp = a->dir = NULL;
    a->fd = -1;
}

int atomicfile_begin(struct atomicfile *a, const char *path, struct moai_err *err)
{
    int e;

    memset(a, 0, sizeof(*a));
    a->fd = -1;
    if (!(a->path = strdup(path)) || !(a->dir = dir_of(path))) {
        release(a);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    }
    if ((e = open_tmp(a)) != 0) {
        release(a);
        if (e == ENOMEM)
            return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
        return moai_err_set(err, MOAI_EIO, "cannot write '%s': %s", path, strerror(e));
    }
    return 0;
}

int atomicfile_write(struct atomicfile *a, const void *p, size_t n)
{
    const char *at = p;

    while (n > 0 && !a->failed_errno) {
        ssize_t k = write(a->fd, at, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            a->failed_errno = k < 0 ? errno : EIO;
            break;
        }
        at += k;
        n -= (size_t) k;
    }
    return a->failed_errno ? -1 : 0;
}

void atomicfile_abort(struct atomicfile *a)
{
    if (a->fd >= 0)
        close(a->fd);
    if (a->tmp)
        unlink(a->tmp);
    release(a);
}

/* Syncs, closes and renames; returns 0 or the errno of the first step that failed, with the
 * temporary file removed. */
static int sync_and_rename(struct atomicfile *a)
{
    int e = a->failed_errno;

    if (!e && fsync(a->fd) < 0)
        e = errno;
    if (close(a->fd) < 0 && !e)
        e = errno;
    a->fd = -1;
    if (!e && rename(a->tmp, a->path) < 0)
        e = errno;
    if (e)
        unlink(a->tmp);
    return e;
}

int atomicfile_commit(struct atomicfile *a, struct moai_err *err)
{
    int e = sync_and_rename(a);
    if (!e)
        e = sync_dir_errno(a->dir);
    int rc = e ? moai_err_set(err, MOAI_EIO, "cannot write '%s': %s", a->path, strerror(e)) : 0;
    release(a);
    return rc;
}

int atomicfile_write_all(const char *path, const void *data, size_t len, struct moai_err *err)
{
    struct atomicfile a;
    int rc = atomicfile_begin(&a, path, err);
    if (rc < 0)
        return rc;
    atomicfile_write(&a, data, len);
    return atomicfile_commit(&a, err);
}
