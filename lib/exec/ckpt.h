/* ckpt.h - atomic checkpoint directories.
 *
 * A checkpoint is a Hugging Face style directory (config.json, model.safetensors,
 * tokenizer.model, generation_config.json, plan.json, and for resuming optimizer.safetensors and
 * trainer_state.json).
 * It is written whole into a staging directory beside the target (".NAME.tmp-PID"), every file
 * flushed, and then swapped in with one renameat2(RENAME_EXCHANGE) (or a plain rename when
 * there is no previous checkpoint), so a save interrupted at any point leaves the previous
 * checkpoint intact. Entries of save_dir that the checkpoint does not write (other runs'
 * directories, logs) are carried over into the new one before the swap, so a save never
 * deletes them. Stale staging directories from killed runs are removed by the next save
 * (after returning any such entries to save_dir).
 *
 *     struct ckpt_stage s;
 *     ckpt_stage_begin(&s, "outputs", &err);
 *     st_write(ckpt_stage_path(&s, "model.safetensors", buf, sizeof(buf)), ...);
 *     ckpt_stage_write_json(&s, "trainer_state.json", state, &err);
 *     ckpt_stage_commit(&s, &err);            (or ckpt_stage_abort(&s) on failure)
 *
 * Not thread-safe; one save at a time per target. Errors name the path and strerror.
 */
#ifndef MOAI_CKPT_H
#define MOAI_CKPT_H

#include "err.h"

#include <jansson.h>
#include <stdbool.h>

struct ckpt_stage {
    char target[4096]; /* the checkpoint directory */
    char tmp[4096];    /* the staging directory beside it */
};

/* Creates the staging directory (and the target's parents). Returns 0 or MOAI_EIO. */
int ckpt_stage_begin(struct ckpt_stage *s, const char *target, struct moai_err *err);

/* Writes "<staging>/<name>" into buf and returns buf. */
const char *ckpt_stage_path(const struct ckpt_stage *s, const char *name, char *buf, size_t size);

/* Writes obj as indented JSON to <staging>/<name>, flushed. Returns 0 or MOAI_EIO. */
int ckpt_stage_write_json(struct ckpt_stage *s, const char *name, const json_t *obj,
                          struct moai_err *err);

/* Copies the file src to <staging>/<name>, flushed. Returns 0 or MOAI_EIO. */
int ckpt_stage_copy_file(struct ckpt_stage *s, const char *name, const char *src,
                         struct moai_err *err);

/* Flushes the staging directory and swaps it in place of the target; the previous
 * checkpoint is then removed. Returns 0 or MOAI_EIO (the target is then unchanged). */
int ckpt_stage_commit(struct ckpt_stage *s, struct moai_err *err);

/* Removes the staging directory and everything in it. */
void ckpt_stage_abort(struct ckpt_stage *s);

/* Writes obj to path atomically (temporary file, fsync, rename). Returns 0 or MOAI_EIO. */
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
