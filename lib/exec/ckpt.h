/* ckpt.h - checkpoints written into a directory that stays the user's.
 *
 * A checkpoint is a Hugging Face style set of files (config.json, model.safetensors,
 * tokenizer.model, generation_config.json, plan.json, and for resuming optimizer.safetensors and trainer_state.json)
 * in save_dir. save_dir may hold anything else (the recipe, notes, other runs' directories);
 * it may be ".", "..", a symbolic link or a mount point. A save never moves, hides or deletes
 * an entry it did not write. It runs in three steps:
 *
 *   1. every file is written and flushed into the staging directory "<save_dir>/.moai-save"
 *      (the tool's own, on save_dir's filesystem);
 *   2. the list of their names is written and flushed to ".moai-save/.commit": the commit
 *      point. Before it, the previous checkpoint is whole and the staging directory is
 *      garbage; after it, the staged checkpoint is the checkpoint;
 *   3. each staged file is renamed into save_dir (replacing the previous checkpoint's file of
 *      that name), the previous checkpoint's files that the new one lacks (shards of a larger
 *      layout) are removed, and the list becomes "<save_dir>/.moai-checkpoint" (what the
 *      next save may remove: only names the tool wrote itself).
 *
 * ckpt_recover finishes step 3 of a save that was killed after its commit point and removes a
 * staging directory killed before it; every save and every lock runs it first. A run holds
 * save_dir with ckpt_lock (flock on the directory), so two runs never write one save_dir.
 *
 *     struct ckpt_lock l; ckpt_lock_acquire(&l, "outputs", &err);    (whole run)
 *     struct ckpt_stage s;
 *     ckpt_stage_begin(&s, "outputs", &err);
 *     st_write(ckpt_stage_path(&s, "model.safetensors", buf, sizeof(buf)), ...);
 *     ckpt_stage_write_json(&s, "trainer_state.json", state, &err);
 *     ckpt_stage_commit(&s, &err);            (or ckpt_stage_abort(&s) on failure)
 *     ckpt_lock_release(&l);
 *
 * Not thread-safe; one save at a time per target (the lock sees to it between processes).
 * Errors name the path and strerror.
 */
#ifndef MOAI_CKPT_H
#define MOAI_CKPT_H

#include "err.h"

#include <jansson.h>
#include <stdbool.h>

/* The staging directory's name inside save_dir, and the commit list's names. */
#define CKPT_STAGING  ".moai-save"
#define CKPT_COMMIT   ".commit"
#define CKPT_MANIFEST ".moai-checkpoint"

struct ckpt_stage {
    char target[4096]; /* the checkpoint directory */
    char tmp[4096];    /* the staging directory inside it */
};

/* Creates the target (and its parents) and an empty staging directory in it, after
 * ckpt_recover. Returns 0 or MOAI_EIO. */
int ckpt_stage_begin(struct ckpt_stage *s, const char *target, struct moai_err *err);

/* Writes "<staging>/<name>" into buf and returns buf. */
const char *ckpt_stage_path(const struct ckpt_stage *s, const char *name, char *buf, size_t size);

/* Writes obj as indented JSON to <staging>/<name>, flushed. Returns 0 or MOAI_EIO. */
int ckpt_stage_write_json(struct ckpt_stage *s, const char *name, const json_t *obj,
                          struct moai_err *err);

/* Copies the file src to <staging>/<name>, flushed. Returns 0 or MOAI_EIO. */
int ckpt_stage_copy_file(struct ckpt_stage *s, const char *name, const char *src,
                         struct moai_err *err);

/* Commits the staged files (steps 2 and 3 above). Returns 0, or MOAI_EIO: before the commit
 * point the target is then unchanged; after it, the next ckpt_recover finishes the save. */
int ckpt_stage_commit(struct ckpt_stage *s, struct moai_err *err);

/* Removes the staging directory and everything in it (all written by this save). */
void ckpt_stage_abort(struct ckpt_stage *s);

/* Finishes or removes what a killed save left in dir (see above); nothing when dir or its
 * staging directory does not exist. Returns 0 or MOAI_EIO (a rename that failed). */
int ckpt_recover(const char *dir, struct moai_err *err);

/* One run's hold on a save_dir. */
struct ckpt_lock {
    int fd;       /* the directory, flocked; -1 when not held */
    bool created; /* the directory did not exist before */
    char path[4096];
};

/* Checks, without creating anything, that checkpoints can be written in dir: dir is a
 * writable directory, or does not exist and its nearest existing ancestor is one. Returns 0
 * or MOAI_EIO with the reason ("'x' is not a directory", "cannot write in 'x': ..."). */
int ckpt_check_writable(const char *dir, struct moai_err *err);

/* Creates dir (and parents) when missing, opens and flocks it, finishes a killed save
 * (ckpt_recover) and proves it writable by creating and removing the staging directory.
 * Returns 0 or MOAI_EIO (also when another process holds it). On failure nothing is
 * held and a directory it created is removed. */
int ckpt_lock_acquire(struct ckpt_lock *l, const char *dir, struct moai_err *err);

/* Releases the lock; removes the directory when ckpt_lock_acquire created it and it is still
 * empty (a run that failed before saving leaves nothing behind). Safe on a lock not held. */
void ckpt_lock_release(struct ckpt_lock *l);

/* Writes obj to path atomically (atomicfile.h: temporary file, fsync, rename, fsync of the
 * directory). Returns 0 or MOAI_EIO (MOAI_ENOMEM when out of memory). */
int ckpt_write_json_file(const char *path, const json_t *obj, struct moai_err *err);

/* Creates path and its parents (mkdir -p). Returns 0 or MOAI_EIO. */
int ckpt_mkdir_parents(const char *path, struct moai_err *err);

/* Removes a directory tree (best effort). */
void ckpt_remove_tree(const char *path);

/* Whether dir holds a checkpoint's files (trainer_state.json, the weights, the optimizer state
 * or config.json); the first one found is written into name. plan.json alone, written when a
 * run starts, is no checkpoint. */
bool ckpt_present(const char *dir, char *name, size_t size);

/* Moves the checkpoint files of dir (the names a save writes) into a new subdirectory
 * "<dir>/previous-N" (the first N free) whose path is written into to; other entries stay.
 * Returns 0 or MOAI_EIO. */
int ckpt_move_aside(const char *dir, char *to, size_t size, struct moai_err *err);

#endif
