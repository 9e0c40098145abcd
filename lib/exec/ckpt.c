/* ckpt.c - atomic checkpoint directories (see ckpt.h). */
#include "exec/ckpt.h"

#include "atomicfile.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
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
    static const char *const names[] = {"config.json",
                                        "model.safetensors",
                                        "model.safetensors.index.json",
                                        "tokenizer.model",
                                        "tokenizer.json",
                                        "tokenizer_config.json",
                                        "plan.json",
                                        "optimizer.safetensors",
                                        "trainer_state.json",
                                        "generation_config.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(name, names[i]))
            return true;
    size_t len = strlen(name);
    return strstr(name, ".tmp-") ||
           (!strncmp(name, "model-", 6) && len > 12 && !strcmp(name + len - 12, ".safetensors"));
}

/* Earlier versions staged a save in ".BASE.tmp-PID" beside save_dir and moved the user's
 * entries of save_dir into it before swapping: a save killed then left them there. They go
 * back to the target (when it has no entry of that name) and the directory is removed. */
static void recover_legacy(const char *target)
{
    char dir[4096], base[1024], prefix[1100];
    DIR *d;
    struct dirent *e;
    struct stat st;

    split_path(target, dir, sizeof(dir), base, sizeof(base));
    if (!strcmp(base, ".") || !strcmp(base, "..") || !strcmp(base, "/") || !(d = opendir(dir)))
        return;
    snprintf(prefix, sizeof(prefix), ".%s.tmp-", base);
    while ((e = readdir(d))) {
        char sub[4096];
        if (strncmp(e->d_name, prefix, strlen(prefix)) != 0)
            continue;
        snprintf(sub, sizeof(sub), "%s/%s", dir, e->d_name);
        if (lstat(sub, &st) != 0 || !S_ISDIR(st.st_mode))
            continue;
        DIR *sd = opendir(sub);
        struct dirent *se;
        while (sd && (se = readdir(sd))) {
            char src[4096], dst[4096];
            if (!strcmp(se->d_name, ".") || !strcmp(se->d_name, "..") ||
                is_checkpoint_name(se->d_name))
                continue;
            snprintf(src, sizeof(src), "%s/%s", sub, se->d_name);
            snprintf(dst, sizeof(dst), "%s/%s", target, se->d_name);
            if (lstat(dst, &st) != 0)
                rename(src, dst);
        }
        if (sd)
            closedir(sd);
        ckpt_remove_tree(sub);
    }
    closedir(d);
}

/* A list of plain file names (no '/', not starting with '.'), one a line. */
struct names {
    char *text; /* the lines, '\n' turned into '\0' */
    size_t len;
};

static bool plain_name(const char *name)
{
    return name[0] && name[0] != '.' && !strchr(name, '/');
}

/* Reads the list in path; an absent file is an empty list. Returns 0 or MOAI_EIO. */
static int names_read(struct names *n, const char *path, struct moai_err *err)
{
    FILE *f = fopen(path, "rb");
    n->text = NULL;
    n->len = 0;
    if (!f)
        return errno == ENOENT
                   ? 0
                   : moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", path, strerror(errno));
    size_t cap = 0;
    for (;;) {
        if (n->len + 1 >= cap) {
            char *t = realloc(n->text, cap = cap ? cap * 2 : 1024);
            if (!t) {
                fclose(f);
                free(n->text);
                n->text = NULL;
                return moai_err_set(err, MOAI_ENOMEM, "out of memory reading '%s'", path);
            }
            n->text = t;
        }
        size_t got = fread(n->text + n->len, 1, cap - n->len - 1, f);
        if (!got)
            break;
        n->len += got;
    }
    bool bad = ferror(f);
    fclose(f);
    if (bad) {
        free(n->text);
        n->text = NULL;
        return moai_err_set(err, MOAI_EIO, "cannot read '%s'", path);
    }
    n->text[n->len] = '\0';
    for (size_t i = 0; i < n->len; i++)
        if (n->text[i] == '\n')
            n->text[i] = '\0';
    return 0;
}

/* The next name after *at (NULL at the end); *at starts at 0. Malformed lines are skipped. */
static const char *names_next(const struct names *n, size_t *at)
{
    while (n->text && *at < n->len) {
        const char *name = n->text + *at;
        *at += strlen(name) + 1;
        if (plain_name(name))
            return name;
    }
    return NULL;
}

static bool names_has(const struct names *n, const char *name)
{
    size_t at = 0;
    const char *x;
    while ((x = names_next(n, &at)))
        if (!strcmp(x, name))
            return true;
    return false;
}

/* Step 3 of a save whose commit list is in <stg>/.commit: moves the staged files into dir,
 * removes the previous checkpoint's files the new one lacks, and keeps the list as dir's
 * manifest. Redoing it after a kill at any point finishes the same save. */
static int finish_commit(const char *dir, const char *stg, struct moai_err *err)
{
    char commit[4096], manifest[4096];
    struct names now, was;
    const char *name;
    size_t at = 0;
    struct stat st;
    int rc;

    snprintf(commit, sizeof(commit), "%s/" CKPT_COMMIT, stg);
    snprintf(manifest, sizeof(manifest), "%s/" CKPT_MANIFEST, dir);
    if ((rc = names_read(&now, commit, err)) < 0)
        return rc;
    if ((rc = names_read(&was, manifest, err)) < 0) {
        free(now.text);
        return rc;
    }
    while (rc == 0 && (name = names_next(&now, &at))) {
        char src[4096], dst[4096];
        snprintf(src, sizeof(src), "%s/%s", stg, name);
        snprintf(dst, sizeof(dst), "%s/%s", dir, name);
        if (lstat(src, &st) == 0 && rename(src, dst) < 0) /* absent: moved before a kill */
            rc = moai_err_set(err, MOAI_EIO, "cannot rename '%s' to '%s': %s", src, dst,
                              strerror(errno));
    }
    at = 0;
    while (rc == 0 && (name = names_next(&was, &at))) {
        char old[4096];
        snprintf(old, sizeof(old), "%s/%s", dir, name);
        if (!names_has(&now, name) && lstat(old, &st) == 0 && S_ISREG(st.st_mode))
            unlink(old);
    }
    free(now.text);
    free(was.text);
    if (rc == 0 && rename(commit, manifest) < 0)
        rc = moai_err_set(err, MOAI_EIO, "cannot rename '%s' to '%s': %s", commit, manifest,
                          strerror(errno));
    if (rc == 0)
        rc = atomicfile_sync_dir(dir, err);
    if (rc == 0)
        ckpt_remove_tree(stg);
    return rc;
}

int ckpt_recover(const char *dir, struct moai_err *err)
{
    char stg[4096], commit[4096];
    struct stat st;

    snprintf(stg, sizeof(stg), "%s/" CKPT_STAGING, dir);
    if (lstat(stg, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    snprintf(commit, sizeof(commit), "%s/" CKPT_COMMIT, stg);
    if (lstat(commit, &st) != 0) { /* killed before its commit point */
        ckpt_remove_tree(stg);
        return 0;
    }
    return finish_commit(dir, stg, err);
}

int ckpt_stage_begin(struct ckpt_stage *s, const char *target, struct moai_err *err)
{
    int rc;

    snprintf(s->target, sizeof(s->target), "%s", target);
    snprintf(s->tmp, sizeof(s->tmp), "%s/" CKPT_STAGING, target);
    if ((rc = ckpt_mkdir_parents(target, err)) < 0 || (rc = ckpt_recover(target, err)) < 0) {
        s->tmp[0] = '\0';
        return rc;
    }
    recover_legacy(target);
    ckpt_remove_tree(s->tmp); /* a staging directory left without its commit list */
    if (mkdir(s->tmp, 0777) < 0) {
        rc = moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", s->tmp, strerror(errno));
        s->tmp[0] = '\0';
        return rc;
    }
    return 0;
}

const char *ckpt_stage_path(const struct ckpt_stage *s, const char *name, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%s", s->tmp, name);
    return buf;
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
    rc = atomicfile_write_all(path, withnl, len + 1, err);
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
    rc = atomicfile_write_all(ckpt_stage_path(s, name, path, sizeof(path)), data ? data : "", len,
                              err);
    free(data);
    return rc;
}

/* The staged files' names, one a line, into *out (malloc'd). Fails when an entry of the
 * target that one would replace is not a file (a user's directory of that name). */
static int staged_names(const struct ckpt_stage *s, char **out, size_t *len, struct moai_err *err)
{
    DIR *d = opendir(s->tmp);
    struct dirent *e;
    size_t cap = 0;
    int rc = 0;

    *out = NULL;
    *len = 0;
    if (!d)
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", s->tmp, strerror(errno));
    while (rc == 0 && (e = readdir(d))) {
        char path[4096];
        struct stat st;
        if (!plain_name(e->d_name))
            continue;
        snprintf(path, sizeof(path), "%s/%s", s->target, e->d_name);
        if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
            rc = moai_err_set(err, MOAI_EIO, "cannot save '%s': '%s' is in the way (not a file)",
                              e->d_name, path);
            break;
        }
        size_t n = strlen(e->d_name);
        if (*len + n + 1 > cap) {
            char *t = realloc(*out, cap = 2 * (cap + n + 1));
            if (!t) {
                rc = moai_err_set(err, MOAI_ENOMEM, "out of memory listing '%s'", s->tmp);
                break;
            }
            *out = t;
        }
        memcpy(*out + *len, e->d_name, n);
        (*out)[*len + n] = '\n';
        *len += n + 1;
    }
    closedir(d);
    if (rc < 0) {
        free(*out);
        *out = NULL;
    }
    return rc;
}

int ckpt_stage_commit(struct ckpt_stage *s, struct moai_err *err)
{
    char commit[4096], *list;
    size_t len;
    int rc;

    if ((rc = atomicfile_sync_dir(s->tmp, err)) < 0 || (rc = staged_names(s, &list, &len, err)) < 0)
        return rc;
    /* the commit point: the complete list, flushed, under its final name */
    snprintf(commit, sizeof(commit), "%s/" CKPT_COMMIT, s->tmp);
    rc = atomicfile_write_all(commit, list ? list : "", len, err);
    free(list);
    if (rc < 0)
        return rc;
    rc = finish_commit(s->target, s->tmp, err);
    s->tmp[0] = '\0'; /* committed: an abort must not remove what is now the checkpoint */
    return rc;
}

void ckpt_stage_abort(struct ckpt_stage *s)
{
    if (s->tmp[0])
        ckpt_remove_tree(s->tmp);
}

int ckpt_write_json_file(const char *path, const json_t *obj, struct moai_err *err)
{
    char *text = json_dumps(obj, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    int rc;
    if (!text)
        return moai_err_set(err, MOAI_ENOMEM, "out of memory writing '%s'", path);
    rc = atomicfile_write_all(path, text, strlen(text), err);
    free(text);
    return rc;
}

int ckpt_check_writable(const char *dir, struct moai_err *err)
{
    char at[4096];
    struct stat st;

    snprintf(at, sizeof(at), "%s", dir);
    for (;;) {
        if (stat(at, &st) == 0)
            break;
        if (errno != ENOENT)
            return moai_err_set(err, MOAI_EIO, "cannot use '%s': %s", at, strerror(errno));
        char *slash = strrchr(at, '/');
        while (slash && slash > at && slash[-1] == '/') /* "a//b" */
            slash--;
        if (!slash)
            snprintf(at, sizeof(at), ".");
        else if (slash == at)
            at[1] = '\0'; /* "/" */
        else
            *slash = '\0';
    }
    if (!S_ISDIR(st.st_mode))
        return moai_err_set(err, MOAI_EIO, "'%s' is not a directory", at);
    if (access(at, W_OK | X_OK) < 0)
        return moai_err_set(err, MOAI_EIO, "cannot write in '%s': %s", at, strerror(errno));
    return 0;
}

int ckpt_lock_acquire(struct ckpt_lock *l, const char *dir, struct moai_err *err)
{
    char stg[4096];
    struct stat st;
    int rc;

    l->fd = -1;
    snprintf(l->path, sizeof(l->path), "%s", dir);
    if ((rc = ckpt_check_writable(dir, err)) < 0)
        return rc;
    l->created = stat(dir, &st) != 0;
    if ((rc = ckpt_mkdir_parents(dir, err)) < 0)
        return rc;
    l->fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (l->fd < 0) {
        rc = moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", dir, strerror(errno));
        goto out_remove;
    }
    if (flock(l->fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK)
            rc = moai_err_set(err, MOAI_EIO, "'%s' is in use by another moai-finetune run", dir);
        else
            rc = moai_err_set(err, MOAI_EIO, "cannot lock '%s': %s", dir, strerror(errno));
        goto out_close;
    }
    if ((rc = ckpt_recover(dir, err)) < 0)
        goto out_close;
    /* the proof that a save can write here (root passes access() on a read-only mode) */
    snprintf(stg, sizeof(stg), "%s/" CKPT_STAGING, dir);
    if (mkdir(stg, 0777) < 0 || rmdir(stg) < 0) {
        rc = moai_err_set(err, MOAI_EIO, "cannot write in '%s': %s", dir, strerror(errno));
        goto out_close;
    }
    return 0;
out_close:
    close(l->fd);
    l->fd = -1;
out_remove:
    if (l->created)
        rmdir(dir);
    return rc;
}

void ckpt_lock_release(struct ckpt_lock *l)
{
    if (l->fd < 0)
        return;
    if (l->created)
        rmdir(l->path); /* only when empty */
    close(l->fd);
    l->fd = -1;
}

bool ckpt_present(const char *dir, char *name, size_t size)
{
    static const char *const names[] = {"trainer_state.json", "model.safetensors",
                                        "model.safetensors.index.json", "optimizer.safetensors",
                                        "config.json"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        if (access(path, F_OK) == 0) {
            snprintf(name, size, "%s", names[i]);
            return true;
        }
    }
    return false;
}

int ckpt_move_aside(const char *dir, char *to, size_t size, struct moai_err *err)
{
    DIR *d;
    struct dirent *e;
    int rc = 0;

    for (int n = 1;; n++) {
        snprintf(to, size, "%s/previous-%d", dir, n);
        if (mkdir(to, 0777) == 0)
            break;
        if (errno != EEXIST || n > 100000)
            return moai_err_set(err, MOAI_EIO, "cannot create '%s': %s", to, strerror(errno));
    }
    if (!(d = opendir(dir)))
        return moai_err_set(err, MOAI_EIO, "cannot open '%s': %s", dir, strerror(errno));
    while ((e = readdir(d)) && rc == 0) {
        char src[4096], dst[4096];
        if (!is_checkpoint_name(e->d_name) || strstr(e->d_name, ".tmp-"))
            continue;
        snprintf(src, sizeof(src), "%s/%s", dir, e->d_name);
        snprintf(dst, sizeof(dst), "%s/%s", to, e->d_name);
        if (rename(src, dst) < 0)
            rc = moai_err_set(err, MOAI_EIO, "cannot move '%s' to '%s': %s", src, dst,
                              strerror(errno));
    }
    closedir(d);
    if (rc == 0)
        rc = atomicfile_sync_dir(dir, err);
    return rc;
}
