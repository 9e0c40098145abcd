/* atomicfile.h - files replaced whole or not at all, and directory syncs.
 *
 * A file is written to a temporary file beside its destination ("PATH.tmp-PID-N", created
 * with mode 0666 less the umask), flushed with fsync, renamed over the destination, and then
 * the destination's directory is synced so that the rename survives a crash. A reader sees the
 * old file or the new one, never a part. Checkpoints, safetensors files and the token cache
 * are written this way.
 *
 *     struct atomicfile a;
 *     if (atomicfile_begin(&a, "out/model.safetensors", &err) < 0) return err.code;
 *     atomicfile_write(&a, header, n); atomicfile_write(&a, data, m);
 *     return atomicfile_commit(&a, &err);               (or atomicfile_abort(&a))
 *
 * Errors: 0 or MOAI_EIO (MOAI_ENOMEM when the names cannot be allocated), with one message
 * "cannot write 'PATH': REASON" naming the destination. On every failure before the rename
 * the temporary file is removed and the destination is untouched. A directory sync that fails
 * with ENOTSUP or EINVAL (file systems that cannot sync directories) counts as done; any
 * other failure is an error, reported after the rename has taken place (the new file is in
 * place, but its rename may not survive a crash).
 *
 * Thread-safety: a struct atomicfile belongs to one thread; different files may be written
 * from different threads at once (the temporary names carry a process-wide counter).
 */
#ifndef MOAI_ATOMICFILE_H
#define MOAI_ATOMICFILE_H

#include "err.h"

#include <stddef.h>

struct atomicfile {
    char *path;       /* the destination (a copy) */
    char *dir;        /* its directory, synced after the rename */
    char *tmp;        /* the temporary file beside it */
    int fd;           /* open on tmp; -1 once closed */
    int failed_errno; /* the first write's errno, 0 while every write succeeded */
};

/* Creates the temporary file for path. Returns 0, or MOAI_EIO / MOAI_ENOMEM with nothing
 * created; a on success is owned by the caller until atomicfile_commit or atomicfile_abort. */
int atomicfile_begin(struct atomicfile *a, const char *path, struct moai_err *err);

/* Appends n bytes. A failure is remembered (later writes do nothing) and reported by
 * atomicfile_commit. Returns 0, or -1 once any write has failed. */
int atomicfile_write(struct atomicfile *a, const void *p, size_t n);

/* Syncs, closes and renames the temporary file over the destination, then syncs the
 * directory. Returns 0 or MOAI_EIO (see above). Releases a either way. */
int atomicfile_commit(struct atomicfile *a, struct moai_err *err);

/* Closes and removes the temporary file; the destination is untouched. Releases a. */
void atomicfile_abort(struct atomicfile *a);

/* Replaces path with len bytes of data: begin, write, commit. Returns as atomicfile_commit. */
int atomicfile_write_all(const char *path, const void *data, size_t len, struct moai_err *err);

/* fsync of the directory dir, so that the creations, renames and removals in it survive a
 * crash; ENOTSUP and EINVAL from fsync count as done. Returns 0 or MOAI_EIO with "cannot sync
 * 'DIR': REASON". */
int atomicfile_sync_dir(const char *dir, struct moai_err *err);

#endif
