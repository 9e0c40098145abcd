/* ckpt.c - atomic checkpoint directories (see ckpt.h). */
#include "exec/ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

int ckpt_mkdir_parents(const char *path, struct moai_err *err)
{
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, 0777) < 0 && errno != EEXIST)
            return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0777) < 0 && errno != EEXIST)
        return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", buf, strerror(errno));
    return 0;
}

static void split_path(const char *path, char *dir, size_t dsize, char *base, size_t bsize)
{
    char a[4096], b[4096];
    snprintf(a, sizeof(a), "%s", path);
    snprintf(b, sizeof(b), "%s", path);
    snprintf(dir, dsize, "%s", dirname(a));
    snprintf(base, bsize, "%s", basename(b));
}

static int fsync_path(const char *path, struct moai_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    if (fsync(fd) < 0 && errno != EINVAL) {
        int e = errno;
        close(fd);
        return moai_err_set(err, MOAI_EIO, "cannot flush '%s': %s", path, strerror(e));
    }
    close(fd);
    return 0;
}

void ckpt_remove_tree(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *e;
    if (!d) {
        unlink(path);
        return;
    }
    while ((e = readdir(d))) {
        char sub[4096];
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name);
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            ckpt_remove_tree(sub);
        else
            unlink(sub);
    }
    closedir(d);
    rmdir(path);
}

/* A file a save writes (or a temporary of one): never the user's own. */
static bool is_checkpoint_name(const char *name)
{
    static const char *const names[] = {
        "config.json",        "model.safetensors", "model.safetensors.index.json",
        "tokenizer.model",    "plan.json",         "optimizer.safetensors",
        "trainer_state.json", "tokenizer.json",    "tokenizer_config.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(name, names[i]))
            return true;
    size_t len = strlen(name);
    return strstr(name, ".tmp-") ||
           (!strncmp(name, "model-", 6) && len > 12 && !strcmp(name + len - 12, ".safetensors"));
}

/* Moves every entry of from that to does not have into to (renames on one filesystem);
 * with users_only, only entries that are not checkpoint files. */
static void move_missing(const char *from, const char *to, bool users_only)
{
    DIR *d = opendir(from);
    struct dirent *e;
    if (!d)
        return;
    while ((e = readdir(d))) {
        char src[4096], dst[4096];
        struct stat st;
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
            (users_only && is_checkpoint_name(e->d_name)))
            continue;
        snprintf(src, sizeof(src), "%s/%s", from, e->d_name);
        snprintf(dst, sizeof(dst), "%s/%s", to, e->d_name);
        if (lstat(dst, &st) != 0)
            rename(src, dst);
    }
    closedir(d);
}

/* Removes ".BASE.tmp-*" directories left in dir by killed saves. A save killed while moving the
 * user's own files (see ckpt_stage_commit) left them there: they go back to the target first. */
static void remove_stale(const char *dir, const char *base, const char *target)
{
    char prefix[512];
    DIR *d = opendir(dir);
    struct dirent *e;
    struct stat st;
    if (!d)
        return;
    snprintf(prefix, sizeof(prefix), ".%s.tmp-", base);
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) {
            char sub[4096];
            snprintf(sub, sizeof(sub), "%s/%s", dir, e->d_name);
            if (stat(target, &st) == 0 && S_ISDIR(st.st_mode))
                move_missing(sub, target, true);
            ckpt_remove_tree(sub);
        }
    }
    closedir(d);
}

int ckpt_stage_begin(struct ckpt_stage *s, const char *target, struct moai_err *err)
{
    char dir[4096], base[1024];
    int rc;

    snprintf(s->target, sizeof(s->target), "%s", target);
    split_path(target, dir, sizeof(dir), base, sizeof(base));
    if ((rc = ckpt_mkdir_parents(dir, err)) < 0)
        return rc;
    remove_stale(dir, base, target);
    snprintf(s->tmp, sizeof(s->tmp), "%s/.%s.tmp-%ld", dir, base, (long) getpid());
    if (mkdir(s->tmp, 0777) < 0)
        return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", s->tmp, strerror(errno));
    return 0;
}

const char *ckpt_stage_path(const struct ckpt_stage *s, const char *name, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%s", s->tmp, name);
    return buf;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len) {
        ssize_t w = write(fd, data, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += w;
        len -= (size_t) w;
    }
    return 0;
}

/* Writes len bytes to path (created), flushed. */
static int write_file(const char *path, const char *data, size_t len, struct moai_err *err)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0)
        return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", path, strerror(errno));
    if (write_all(fd, data, len) < 0 || fsync(fd) < 0) {
        int e = errno;
        close(fd);
        unlink(path);
        return moai_err_set(err, MOAI_EIO, "cannot write '%s': %s", path, strerror(e));
    }
    if (close(fd) < 0)
        return moai_err_set(err, MOAI_EIO, "cannot write '%s': %s", path, strerror(errno));
    return 0;
}

int ckpt_stage_write_json(struct ckpt_stage *s, const char *name, const json_t *obj,
                          struct moai_err *err)
{
    char path[4096];
    char *text = json_dumps(obj, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    int rc;
    if (!text)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", name);
    size_t len = strlen(text);
    text[len] = '\0';
    ckpt_stage_path(s, name, path, sizeof(path));
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", name);
    }
    withnl[len] = '\n';
    rc = write_file(path, withnl, len + 1, err);
    free(withnl);
    return rc;
}

int ckpt_stage_copy_file(struct ckpt_stage *s, const char *name, const char *src,
                         struct moai_err *err)
{
    char path[4096];
    FILE *f = fopen(src, "rb");
    char *data = NULL;
    size_t len = 0, cap = 0;
    int rc;

    if (!f)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", src, strerror(errno));
    for (;;) {
        if (len == cap) {
            char *d = realloc(data, cap = cap ? cap * 2 : 1 << 16);
            if (!d) {
                free(data);
                fclose(f);
                return moai_err_set(err, MOAI_ENOMEM, "out of memory copying '%s'", src);
            }
            data = d;
        }
        size_t got = fread(data + len, 1, cap - len, f);
        if (!got)
            break;
        len += got;
    }
    if (ferror(f)) {
        free(data);
        fclose(f);
        return moai_err_set(err, MOAI_EIO, "cannot read '%s'", src);
    }
    fclose(f);
    rc = write_file(ckpt_stage_path(s, name, path, sizeof(path)), data ? data : "", len, err);
    free(data);
    return rc;
}

int ckpt_stage_commit(struct ckpt_stage *s, struct moai_err *err)
{
    char dir[4096], base[1024];
    struct stat st;
    int rc;

    split_path(s->target, dir, sizeof(dir), base, sizeof(base));
    if ((rc = fsync_path(s->tmp, err)) < 0)
        return rc;
    if (stat(s->target, &st) == 0) {
        if (!S_ISDIR(st.st_mode))
            return moai_err_set(err, MOAI_EIO, "cannot save into '%s': not a directory", s->target);
        /* save_dir may hold more than a checkpoint (other runs, logs): whatever the new
         * checkpoint does not replace moves into it first, so the swap keeps it. */
        move_missing(s->target, s->tmp, false);
        if ((rc = fsync_path(s->tmp, err)) < 0)
            return rc;
        if (renameat2(AT_FDCWD, s->tmp, AT_FDCWD, s->target, RENAME_EXCHANGE) < 0)
            return moai_err_set(err, MOAI_EIO, "cannot replace '%s': %s", s->target,
                                strerror(errno));
        if ((rc = fsync_path(dir, err)) < 0)
            return rc;
        ckpt_remove_tree(s->tmp); /* now the previous checkpoint */
        return 0;
    }
    if (rename(s->tmp, s->target) < 0)
        return moai_err_set(err, MOAI_EIO, "cannot rename '%s' to '%s': %s", s->tmp, s->target,
                            strerror(errno));
    return fsync_path(dir, err);
}

void ckpt_stage_abort(struct ckpt_stage *s)
{
    if (s->tmp[0])
        ckpt_remove_tree(s->tmp);
}

int ckpt_write_json_file(const char *path, const json_t *obj, struct moai_err *err)
{
    char tmp[4096];
    char *text = json_dumps(obj, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    int rc;
    if (!text)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    snprintf(tmp, sizeof(tmp), "%s.tmp-%ld", path, (long) getpid());
    rc = write_file(tmp, text, strlen(text), err);
    free(text);
    if (rc < 0)
        return rc;
    if (rename(tmp, path) < 0) {
        unlink(tmp);
        return moai_err_set(err, MOAI_EIO, "cannot rename '%s' to '%s': %s", tmp, path,
                            strerror(errno));
    }
    return 0;
}
