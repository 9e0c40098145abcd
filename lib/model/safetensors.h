/* safetensors.h - reading (mmap) and writing (atomic) safetensors files, one or sharded.
 *
 * The byte layout of a .safetensors file:
 *
 *   offset 0       u64 little-endian N: the length of the header in bytes
 *   offset 8       N bytes of UTF-8 JSON, an object (trailing spaces allowed as padding):
 *                    {"__metadata__": {"format": "pt", ...},          (optional, strings)
 *                     "NAME": {"dtype": "F32" | "F16" | "BF16" | ...,
 *                              "shape": [d0, d1, ...],
 *                              "data_offsets": [BEGIN, END]}, ...}
 *   offset 8 + N   the data area; a tensor's bytes are [8 + N + BEGIN, 8 + N + END),
 *                  row-major, little-endian
 *
 * Checks the reader makes before it trusts an offset, in this order:
 *   1. the file has at least 8 bytes, and 8 + N <= file size, N <= 100 MiB;
 *   2. the header parses as JSON and is an object;
 *   3. every entry but __metadata__ is an object with "dtype" (a string), "shape" (an array of
 *      integers >= 0 whose product does not overflow) and "data_offsets" (two integers with
 *      0 <= BEGIN <= END);
 *   4. END <= the size of the data area;
 *   5. END - BEGIN == size of dtype x product of shape;
 *   6. no two tensors' byte ranges overlap;
 *   7. the dtype is one this reader converts: F32, F16, BF16 (others are an error naming the
 *      tensor and the dtype).
 *
 * A sharded checkpoint is model.safetensors.index.json ({"metadata": {...}, "weight_map":
 * {NAME: FILE}}) beside its shards; st_set opens one file or the index and its shards as one
 * set of tensors.
 *
 * Errors are one line naming the file and the tensor:
 *   "model.safetensors: tensor 'lm_head.weight': data offsets [0, 12) run past the end of the
 *    data area (8 bytes)".
 * Ownership: an opened file maps its bytes; tensors point into the map until st_close.
 *
 *     struct st_set set;
 *     st_set_open_dir(&set, "models/tiny-llama", &err);
 *     const struct st_tensor *t = st_set_find(&set, "model.norm.weight");
 *     st_to_f32(t, dst, &err);  st_set_close(&set);
 */
#ifndef MOAI_SAFETENSORS_H
#define MOAI_SAFETENSORS_H

#include "err.h"

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

enum st_dtype {
    ST_F32,
    ST_F16,
    ST_BF16,
};

struct st_tensor {
    char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const uint8_t *data;        /* into the map */
    size_t nbytes;
    const struct st_file *file; /* the file holding it */
};

struct st_file {
    char *path;
    uint8_t *map;               /* NULL when parsed from memory */
    size_t size;
    struct st_tensor *tensors;
    int ntensors;
};

/* Opens and checks path. Returns 0 or MOAI_EIO with a message naming the file. */
int st_open(struct st_file *f, const char *path, struct moai_err *err);

/* Checks size bytes at data (not copied: they must outlive f); name is used in messages. */
int st_parse(struct st_file *f, const void *data, size_t size, const char *name,
             struct moai_err *err);

void st_close(struct st_file *f);

const struct st_tensor *st_find(const struct st_file *f, const char *name);

/* Converts t to fp32 into dst (numel floats). BF16 and F16 convert exactly. Returns 0. */
int st_to_f32(const struct st_tensor *t, float *dst, struct moai_err *err);

/* A set of files: one model.safetensors, or the shards of an index. */
struct st_set {
    struct st_file *files;
    int nfiles;
};

/* Opens dir/model.safetensors, or dir/model.safetensors.index.json and its shards (with the
 * "Loading checkpoint shards" progress bar). Every tensor of the index must be in the shard
 * it names. Returns 0 or MOAI_EIO. */
int st_set_open_dir(struct st_set *s, const char *dir, struct moai_err *err);
void st_set_close(struct st_set *s);
const struct st_tensor *st_set_find(const struct st_set *s, const char *name);

/* A tensor to write: fp32 data converted to the file's dtype. */
struct st_write_tensor {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;
};

/* Writes n tensors to path in the given order as dtype (ST_F32 or ST_BF16, rounded to
 * nearest even), with {"__metadata__": {"format": "pt"}}, the header padded with spaces to a
 * multiple of 8 bytes. Atomic: a temporary file beside path, fsync, rename. Returns 0 or
 * MOAI_EIO. */
int st_write(const char *path, int n, const struct st_write_tensor *t, enum st_dtype dtype,
             struct moai_err *err);

#endif
