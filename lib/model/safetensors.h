/* safetensors.h - safetensors files: reading (mmap, every offset checked), atomic writing,
 * sharded sets.
 *
 * The byte layout of a .safetensors file, field by field:
 *
 *   offset 0      8 bytes   N, the length of the header, an unsigned 64-bit little-endian
 *                           integer
 *   offset 8      N bytes   the header: UTF-8 JSON, one object, optionally followed by spaces
 *                           (writers pad it so that the data area starts at a multiple of 8):
 *                             {"__metadata__": {"format": "pt", ...},   (optional; strings)
 *                              "NAME": {"dtype": "F32" | "F16" | "BF16" | ...,
 *                                       "shape": [d0, d1, ...],
 *                                       "data_offsets": [BEGIN, END]},
 *                              ...}
 *   offset 8 + N  the rest  the data area. A tensor's bytes are [8 + N + BEGIN, 8 + N + END)
 *                           of the file: row-major, little-endian, not necessarily aligned.
 *
 * What the reader checks before it trusts an offset, in this order (the first failure is the
 * error; tests/data/bad/safetensors/ holds a file for each, but the 100 MiB limit):
 *   1. the file has at least 8 bytes;
 *   2. 8 + N <= the file size, and N <= ST_MAX_HEADER_BYTES (100 MiB);
 *   3. the header parses as UTF-8 JSON (jansson validates the encoding; duplicate keys are
 *      an error) and is an object; "__metadata__", when there, is an object of strings;
 *   4. every other entry is an object with "dtype" a string, "shape" an array of at most
 *      ST_MAX_DIMS integers, each >= 0, whose product times 8 does not overflow int64_t, and
 *      "data_offsets" an array of exactly two integers;
 *   5. 0 <= BEGIN <= END, and END <= the size of the data area;
 *   6. the dtype is one the format knows, and one this reader converts: F32, F16 or BF16
 *      (another is an error naming the tensor and the dtype);
 *   7. END - BEGIN == the dtype's size x the product of the shape;
 *   8. no two tensors' byte ranges overlap, and together they cover the data area from its
 *      first byte to its last without a gap (as the format's reference reader requires).
 * Only then does a struct st_tensor point into the data.
 *
 * A sharded checkpoint is model.safetensors.index.json, {"metadata": {"total_size": BYTES},
 * "weight_map": {NAME: FILE, ...}}, beside its shards (plain file names, in the same folder).
 * A struct st_set is one file or every shard of an index, opened together; each tensor the
 * index lists must be in the shard it names, and no tensor may be in two shards.
 *
 * The writer writes tensors in the order given, with {"__metadata__": {"format": "pt"}}, the
 * header padded with spaces to a multiple of 8 bytes, in F32 or BF16 (rounded to nearest, ties
 * to even, from fp32). A file is written atomically (atomicfile.h): a temporary file in the
 * same folder, fsync, rename over the target, fsync of the folder. A file written and read back gives the
 * same fp32 bits (F32) or the same rounded values (BF16), and writing those again gives the
 * same bytes.
 *
 * Ownership: st_open maps the file (MAP_PRIVATE, read only); a struct st_tensor, its name and
 * its data point into the struct st_file that holds it and are valid until st_close (or
 * st_set_close). st_parse does not copy the bytes it is given. Nothing is global: distinct
 * structs may be used from distinct threads; reading one opened file from several threads at
 * once is safe.
 *
 * Errors: functions return 0 or a negative MOAI_E* code (MOAI_EIO for a bad or unreadable
 * file, MOAI_EUSAGE for a bad argument, MOAI_ENOMEM) and fill err with one line naming the
 * file and the tensor: "model.safetensors: tensor 'lm_head.weight': data offsets [0, 12) run
 * past the end of the data area (8 bytes)". A failed open leaves nothing to close.
 *
 *     struct st_set set;
 *     if (st_set_open_dir(&set, "models/tiny-llama", &err) < 0) return err.code;
 *     st_to_f32(st_set_find(&set, "model.norm.weight"), dst, &err);  st_set_close(&set);
 */
#ifndef MOAI_SAFETENSORS_H
#define MOAI_SAFETENSORS_H

#include "err.h"

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS         8
#define ST_MAX_HEADER_BYTES ((uint64_t) 100 << 20)
/* Hugging Face's default max_shard_size, "5GB" (decimal). */
#define ST_DEFAULT_SHARD_BYTES ((uint64_t) 5000000000)

enum st_dtype {
    ST_F32,
    ST_F16,
    ST_BF16,
};

struct st_tensor {
    char *name; /* owned by the file */
    enum st_dtype dtype;
    int ndim; /* 0 (a scalar) .. ST_MAX_DIMS */
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;              /* product of shape; 1 for a scalar */
    const uint8_t *data;        /* raw bytes, into the map: a view, not aligned */
    size_t nbytes;              /* numel x the dtype's size */
    uint64_t begin;             /* data_offsets[0]: from the start of the data area */
    const struct st_file *file; /* the file holding it */
};

struct st_file {
    char *path;                /* as given to st_open (the name given to st_parse) */
    uint8_t *map;              /* the mapped file; NULL when parsed from memory or empty */
    size_t size;               /* bytes of the file (0 when parsed from memory) */
    uint64_t header_bytes;     /* N */
    struct st_tensor *tensors; /* in header order */
    int ntensors;
};

/* Opens path, maps it and makes every check above. Returns 0, MOAI_EIO (a message naming path:
 * "cannot open 'x': No such file or directory", or the first check that failed) or
 * MOAI_ENOMEM. On failure f holds nothing and needs no st_close. */
int st_open(struct st_file *f, const char *path, struct moai_err *err);

/* The same checks on size bytes at data, for tests and the fuzzer; name stands for the file in
 * messages. The bytes are not copied: they must outlive f. Returns as st_open. */
int st_parse(struct st_file *f, const void *data, size_t size, const char *name,
             struct moai_err *err);

/* Frees what f holds and unmaps the file; f is zeroed (closing twice is harmless). */
void st_close(struct st_file *f);

/* The tensor called name, or NULL. Linear in the number of tensors. */
const struct st_tensor *st_find(const struct st_file *f, const char *name);

/* "F32", "F16", "BF16"; bytes per element: 4, 2, 2. */
const char *st_dtype_name(enum st_dtype dtype);
int st_dtype_size(enum st_dtype dtype);

/* Converts t's numel elements into dst (numel floats, caller's memory). F32 is copied, F16 and
 * BF16 widen exactly (every value, subnormals, infinities; NaNs stay NaNs). Returns 0; err is
 * unused (kept for a dtype that may fail later). */
int st_to_f32(const struct st_tensor *t, float *dst, struct moai_err *err);

/* One value: bf16 from fp32 rounded to nearest, ties to even (NaN stays a quiet NaN, and
 * values past the largest bf16 round to infinity); and exact widenings. */
uint16_t st_bf16_from_f32(float x);
float st_f32_from_bf16(uint16_t h);
float st_f32_from_f16(uint16_t h);

/* A set of files read as one: one .safetensors file, or the shards of an index. */
struct st_set {
    struct st_file *files;
    int nfiles;
    char *index_path;                 /* the index read, or NULL for one file */
    const struct st_tensor **by_name; /* every tensor of the set, sorted by name */
    int64_t ntensors;
};

/* Opens path as a set: a .safetensors file, or an index (a name ending in ".json") and every
 * shard it names, with the "Loading checkpoint shards" progress bar over the shards. Checks
 * the index: an object whose "weight_map" is an object of plain file names in the index's
 * folder; each shard as st_open does; each listed tensor in the shard named; no tensor in two
 * shards. Returns 0, MOAI_EIO or MOAI_ENOMEM; on failure s holds nothing. */
int st_set_open(struct st_set *s, const char *path, struct moai_err *err);

/* Opens a Hugging Face model folder: dir/model.safetensors when it exists, otherwise
 * dir/model.safetensors.index.json (as st_set_open). Neither: MOAI_EIO "no weights in 'dir'
 * (model.safetensors or model.safetensors.index.json)". */
int st_set_open_dir(struct st_set *s, const char *dir, struct moai_err *err);

void st_set_close(struct st_set *s);

/* The tensor called name in any file of the set, or NULL. Logarithmic (a binary search). */
const struct st_tensor *st_set_find(const struct st_set *s, const char *name);

/* Tensors in all files of the set. */
int64_t st_set_ntensors(const struct st_set *s);

/* A tensor to write: numel fp32 values (caller's memory, read only), stored as the dtype
 * given to the writer. */
struct st_write_tensor {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const float *data;
};

/* Writes n tensors to path, in the given order, as dtype (ST_F32, or ST_BF16 rounded to
 * nearest even), atomically (see the top). The names must be distinct, non-empty UTF-8, not
 * "__metadata__"; ndim in 0..ST_MAX_DIMS, sizes >= 0. Returns 0, MOAI_EUSAGE (bad tensors or
 * dtype), MOAI_EIO ("cannot write 'x': No space left on device"; the target is untouched and
 * the temporary file removed) or MOAI_ENOMEM. */
int st_write(const char *path, int n, const struct st_write_tensor *t, enum st_dtype dtype,
             struct moai_err *err);

/* Writes n tensors into the folder dir as Hugging Face does: when their data fits in
 * max_shard_bytes (0: no limit), one file BASE.safetensors; otherwise shards
 * BASE-00001-of-0000K.safetensors, each holding whole tensors in the given order and starting
 * a new shard when the next tensor would pass the limit (a tensor larger than the limit gets a
 * shard of its own), then BASE.safetensors.index.json with {"metadata": {"total_size":
 * data bytes}, "weight_map": {NAME: FILE}} (keys sorted, indented by 2, as transformers
 * writes it). Every file is written atomically; afterwards the files of the other form (a
 * stale BASE.safetensors, index or BASE-*-of-*.safetensors shard not written now) are
 * removed, so that st_set_open_dir reads what was just written. *nshards (may be NULL) gets
 * the number of shards, 0 for one file. Returns as st_write. */
int st_write_sharded(const char *dir, const char *base, int n, const struct st_write_tensor *t,
                     enum st_dtype dtype, uint64_t max_shard_bytes, int *nshards,
                     struct moai_err *err);

#endif
