/* test_exec.c - virtual devices and the shared-memory communicator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "exec/ckpt.h"
#include "exec/comm.h"
#include "exec/dev.h"
#include "exec/steplog.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define N   4
#define LEN 17001 /* not a multiple of N: uneven chunks, each over one block of the allreduce */

struct collective_case {
    struct comm_group *g;
    float results[N][LEN * N];
    double scalar[N];
    float recv[N][LEN];
};

/* rank r holds x[i] = r * 1000 + i * 0.001 + 1/3: values whose sum depends on the order. */
static float value(int r, size_t i)
{
    return (float) r * 1000.0f + (float) i * 0.001f + 1.0f / 3.0f;
}

static int collective_worker(struct dev *d, void *arg)
{
    struct collective_case *cc = arg;
    struct comm c;
    float *buf = dev_alloc(d, (int64_t) sizeof(float) * LEN * N, "buffer");
    float out[LEN];

    if (!buf)
        return d->err.code;
    comm_init(&c, cc->g, d->id);
    for (size_t i = 0; i < LEN; i++)
        buf[i] = value(d->id, i);
    comm_allreduce_sum(&c, buf, LEN);
    memcpy(cc->results[d->id], buf, sizeof(float) * LEN);

    for (size_t i = 0; i < LEN * N; i++)
        buf[i] = value(d->id, i);
    comm_reduce_scatter_sum(&c, buf, out, LEN);
    memcpy(cc->results[d->id] + LEN, out, sizeof(out)); /* reuse the row's tail */

    cc->scalar[d->id] = comm_allreduce_scalar(&c, 0.5 * (d->id + 1));

    /* A ring of sends: rank r sends its id pattern to r + 1. */
    for (size_t i = 0; i < LEN; i++)
        out[i] = (float) d->id + (float) i;
    if (d->id % 2 == 0) {
        comm_send(&c, (d->id + 1) % N, out, sizeof(out));
        comm_recv(&c, (d->id + N - 1) % N, cc->recv[d->id], sizeof(out));
    } else {
        comm_recv(&c, (d->id + N - 1) % N, cc->recv[d->id], sizeof(out));
        comm_send(&c, (d->id + 1) % N, out, sizeof(out));
    }
    dev_free(d, buf, (int64_t) sizeof(float) * LEN * N);
    return 0;
}

static void test_exec_collectives_in_rank_order(void **state)
{
    (void) state;
    struct collective_case *cc = calloc(1, sizeof(*cc));
    struct dev_set ds;
    struct moai_err err = {0};

    assert_int_equal(comm_group_create(&cc->g, N, &err), 0);
    assert_int_equal(dev_set_init(&ds, N, 1 << 20, &err), 0);
    assert_int_equal(dev_set_run(&ds, collective_worker, cc, &err), 0);
    for (int r = 0; r < N; r++) {
        for (size_t i = 0; i < LEN; i++) {
            float sum = value(0, i);
            for (int q = 1; q < N; q++)
                sum += value(q, i);
            /* bit-identical to the sequential sum in rank order, on every rank */
            assert_memory_equal(&cc->results[r][i], &sum, sizeof(float));
            float rs = value(0, r * LEN + i);
            for (int q = 1; q < N; q++)
                rs += value(q, r * LEN + i);
            assert_memory_equal(&cc->results[r][LEN + i], &rs, sizeof(float));
            assert_true(cc->recv[r][i] == (float) ((r + N - 1) % N) + (float) i);
        }
        assert_true(cc->scalar[r] == 0.5 + 1.0 + 1.5 + 2.0);
        assert_int_equal(ds.devs[r].peak_bytes, (int64_t) sizeof(float) * LEN * N);
        assert_int_equal(ds.devs[r].used_bytes, 0);
    }
    dev_set_release(&ds);
    comm_group_free(cc->g);
    free(cc);
}

struct gather_case {
    struct comm_group *g;
    float out[N][N * 8];
};

static int gather_worker(struct dev *d, void *arg)
{
    struct gather_case *gc = arg;
    struct comm c;
    float in[8];
    comm_init(&c, gc->g, d->id);
    for (int i = 0; i < 8; i++)
        in[i] = (float) (d->id * 8 + i);
    comm_allgather(&c, in, gc->out[d->id], 8);
    return 0;
}

static void test_exec_allgather(void **state)
{
    (void) state;
    struct gather_case gc;
    struct dev_set ds;
    struct moai_err err = {0};
    assert_int_equal(comm_group_create(&gc.g, N, &err), 0);
    assert_int_equal(dev_set_init(&ds, N, 1 << 20, &err), 0);
    assert_int_equal(dev_set_run(&ds, gather_worker, &gc, &err), 0);
    for (int r = 0; r < N; r++)
        for (int i = 0; i < N * 8; i++)
            assert_true(gc.out[r][i] == (float) i);
    dev_set_release(&ds);
    comm_group_free(gc.g);
}

static int greedy_worker(struct dev *d, void *arg)
{
    (void) arg;
    void *a = dev_alloc(d, 600, "weights");
    if (!a)
        return d->err.code;
    void *b = dev_alloc(d, 600, "activations"); /* 1200 > 1000: must fail cleanly */
    if (!b) {
        int rc = d->err.code;
        dev_free(d, a, 600);
        return rc;
    }
    dev_free(d, b, 600);
    dev_free(d, a, 600);
    return 0;
}

static void test_exec_device_out_of_memory(void **state)
{
    (void) state;
    struct dev_set ds;
    struct moai_err err = {0};
    assert_int_equal(dev_set_init(&ds, 2, 1000, &err), 0);
    assert_int_equal(dev_set_run(&ds, greedy_worker, NULL, &err), MOAI_EOOM);
    assert_string_equal(err.msg, "device 0 is out of memory allocating activations: 600 bytes "
                                 "requested with 600 of 1000 in use");
    assert_int_equal(ds.devs[1].peak_bytes, 600);
    dev_set_release(&ds);
}

static char *slurp(const char *path)
{
    static char buf[4096];
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        n += e->d_name[0] != '.' || (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."));
    closedir(d);
    return n;
}

static void save(const char *target, int step)
{
    struct ckpt_stage s;
    struct moai_err err = {0};
    json_t *state = json_pack("{s:i}", "step", step);
    assert_int_equal(ckpt_stage_begin(&s, target, &err), 0);
    assert_int_equal(ckpt_stage_write_json(&s, "trainer_state.json", state, &err), 0);
    assert_int_equal(ckpt_stage_commit(&s, &err), 0);
    json_decref(state);
}

static void test_exec_checkpoint_swap_is_atomic(void **state)
{
    (void) state;
    char root[] = "/tmp/moai-ckpt-XXXXXX", target[256], path[512];
    assert_non_null(mkdtemp(root));
    snprintf(target, sizeof(target), "%s/out/run", root);
    snprintf(path, sizeof(path), "%s/trainer_state.json", target);

    save(target, 1); /* a new target, parents created */
    assert_non_null(strstr(slurp(path), "\"step\": 1"));
    save(target, 2); /* replaces the previous one */
    assert_non_null(strstr(slurp(path), "\"step\": 2"));

    /* A save killed between writing and swapping leaves the previous checkpoint whole. */
    pid_t pid = fork();
    if (pid == 0) {
        struct ckpt_stage s;
        struct moai_err err = {0};
        json_t *st = json_pack("{s:i}", "step", 3);
        if (ckpt_stage_begin(&s, target, &err) == 0)
            ckpt_stage_write_json(&s, "trainer_state.json", st, &err);
        _exit(9); /* as if killed before ckpt_stage_commit */
    }
    int status;
    waitpid(pid, &status, 0);
    assert_int_equal(WEXITSTATUS(status), 9);
    assert_non_null(strstr(slurp(path), "\"step\": 2"));
    char stg[512];
    struct stat st;
    snprintf(stg, sizeof(stg), "%s/.moai-save", target);
    assert_int_equal(stat(stg, &st), 0); /* the killed save's staging, inside the target */
    snprintf(path, sizeof(path), "%s/out", root);
    assert_int_equal(count_entries(path), 1); /* nothing beside the target */

    /* An aborted save too; and the next save removes the stale staging directory. */
    struct ckpt_stage s;
    struct moai_err err = {0};
    assert_int_equal(ckpt_stage_begin(&s, target, &err), 0);
    ckpt_stage_abort(&s);
    assert_int_not_equal(stat(stg, &st), 0);
    save(target, 4);
    assert_int_not_equal(stat(stg, &st), 0);
    snprintf(path, sizeof(path), "%s/trainer_state.json", target);
    assert_non_null(strstr(slurp(path), "\"step\": 4"));

    /* What the user keeps in save_dir survives saves: a file and a directory of its own. */
    char keep[512], sub[512];
    snprintf(keep, sizeof(keep), "%s/notes.txt", target);
    snprintf(sub, sizeof(sub), "%s/other-run", target);
    FILE *f = fopen(keep, "w");
    fputs("mine", f);
    fclose(f);
    mkdir(sub, 0777);
    save(target, 5);
    assert_string_equal(slurp(keep), "mine");
    assert_int_equal(stat(sub, &st), 0);
    assert_non_null(strstr(slurp(path), "\"step\": 5"));
    ckpt_remove_tree(root);
}

/* Writes text to dir/name. */
static void put(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_exec_checkpoint_recover_after_commit(void **state)
{
    (void) state;
    char root[] = "/tmp/moai-ckpt-XXXXXX", stg[512], path[512];
    struct moai_err err = {0};
    struct stat st;
    assert_non_null(mkdtemp(root));

    /* a checkpoint of two shards, and the user's own files beside it */
    struct ckpt_stage s;
    assert_int_equal(ckpt_stage_begin(&s, root, &err), 0);
    put(s.tmp, "model-00001-of-00002.safetensors", "a");
    put(s.tmp, "model-00002-of-00002.safetensors", "b");
    put(s.tmp, "trainer_state.json", "{\"step\": 1}");
    assert_int_equal(ckpt_stage_commit(&s, &err), 0);
    put(root, "notes.txt", "mine");
    put(root, "model-00009-of-00009.safetensors", "the user's, not in the manifest");

    /* a save killed after its commit point, one file already moved: the next start finishes
     * it; the previous checkpoint's shards go, nothing of the user's does */
    snprintf(stg, sizeof(stg), "%s/.moai-save", root);
    assert_int_equal(mkdir(stg, 0777), 0);
    put(stg, "trainer_state.json", "{\"step\": 2}");
    put(root, "model.safetensors", "new"); /* moved before the kill */
    put(stg, ".commit", "model.safetensors\ntrainer_state.json\n");
    assert_int_equal(ckpt_recover(root, &err), 0);
    snprintf(path, sizeof(path), "%s/trainer_state.json", root);
    assert_string_equal(slurp(path), "{\"step\": 2}");
    snprintf(path, sizeof(path), "%s/model.safetensors", root);
    assert_string_equal(slurp(path), "new");
    snprintf(path, sizeof(path), "%s/model-00001-of-00002.safetensors", root);
    assert_int_not_equal(stat(path, &st), 0);
    snprintf(path, sizeof(path), "%s/notes.txt", root);
    assert_string_equal(slurp(path), "mine");
    snprintf(path, sizeof(path), "%s/model-00009-of-00009.safetensors", root);
    assert_string_equal(slurp(path), "the user's, not in the manifest");
    assert_int_not_equal(stat(stg, &st), 0);

    /* killed before the commit point: the staged files go, the checkpoint stays */
    assert_int_equal(mkdir(stg, 0777), 0);
    put(stg, "trainer_state.json", "{\"step\": 3}");
    assert_int_equal(ckpt_recover(root, &err), 0);
    snprintf(path, sizeof(path), "%s/trainer_state.json", root);
    assert_string_equal(slurp(path), "{\"step\": 2}");
    assert_int_not_equal(stat(stg, &st), 0);

    /* a directory of the user's where a checkpoint file would go stops the save before its
     * commit point, and is left alone */
    snprintf(path, sizeof(path), "%s/config.json", root);
    assert_int_equal(mkdir(path, 0777), 0);
    assert_int_equal(ckpt_stage_begin(&s, root, &err), 0);
    put(s.tmp, "config.json", "{}");
    assert_int_equal(ckpt_stage_commit(&s, &err), MOAI_EIO);
    assert_non_null(strstr(err.msg, "is in the way (not a file)"));
    ckpt_stage_abort(&s);
    assert_int_equal(stat(path, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    ckpt_remove_tree(root);
}

static void test_exec_checkpoint_lock(void **state)
{
    (void) state;
    char root[] = "/tmp/moai-ckpt-XXXXXX", dir[512], file[512];
    struct moai_err err = {0};
    struct ckpt_lock a, b;
    struct stat st;
    assert_non_null(mkdtemp(root));
    snprintf(dir, sizeof(dir), "%s/new/run", root);

    /* a directory that does not exist yet is created, held, and removed again when empty */
    assert_int_equal(ckpt_check_writable(dir, &err), 0);
    assert_int_equal(ckpt_lock_acquire(&a, dir, &err), 0);
    assert_int_equal(stat(dir, &st), 0);
    pid_t pid = fork(); /* flock is per open file: another process is refused */
    if (pid == 0) {
        struct ckpt_lock c;
        struct moai_err e = {0};
        int rc = ckpt_lock_acquire(&c, dir, &e);
        _exit(rc == MOAI_EIO && strstr(e.msg, "is in use by another moai-finetune run") ? 7 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    assert_int_equal(WEXITSTATUS(status), 7);
    ckpt_lock_release(&a);
    assert_int_not_equal(stat(dir, &st), 0);
    assert_int_equal(ckpt_lock_acquire(&b, dir, &err), 0);
    put(dir, "notes.txt", "mine"); /* not empty: kept */
    ckpt_lock_release(&b);
    assert_int_equal(stat(dir, &st), 0);

    /* a file where the directory should be, or above it */
    snprintf(file, sizeof(file), "%s/file", root);
    put(root, "file", "x");
    assert_int_equal(ckpt_check_writable(file, &err), MOAI_EIO);
    snprintf(dir, sizeof(dir), "'%s' is not a directory", file);
    assert_string_equal(err.msg, dir);
    assert_int_equal(ckpt_lock_acquire(&a, file, &err), MOAI_EIO);
    assert_string_equal(err.msg, dir);
    snprintf(dir, sizeof(dir), "%s/sub", file);
    assert_int_equal(ckpt_check_writable(dir, &err), MOAI_EIO);
    snprintf(file, sizeof(file), "cannot use '%s': Not a directory", dir);
    assert_string_equal(err.msg, file);
    ckpt_remove_tree(root);
}

static void test_exec_step_line_format(void **state)
{
    (void) state;
    char buf[256], loss[64];
    struct step_record s = {.step = 4,
                            .total_steps = 17944,
                            .loss = 2.03125,
                            .duration_s = 1.2718,
                            .tokens_per_s = 12882.8749,
                            .real_tokens_per_s = 8000.004,
                            .lr = 1e-5};
    assert_string_equal(steplog_format(buf, sizeof(buf), &s),
                        "[Step 4/17944] | Loss: 2.03125 | Duration: 1.27 | Throughput: 12882.87 "
                        "tokens/sec");
    assert_string_equal(steplog_format_loss(loss, sizeof(loss), 10.0), "10");
    assert_string_equal(steplog_format_loss(loss, sizeof(loss), 8.987654321), "8.987654");
    assert_string_equal(steplog_format_loss(loss, sizeof(loss), 0.000123456789), "0.0001234568");
    assert_string_equal(steplog_format_loss(loss, sizeof(loss), 0.0), "0");
    json_t *j = steplog_json(&s);
    char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    assert_string_equal(text, "{\"step\":4,\"total_steps\":17944,\"loss\":2.03125,"
                              "\"duration_s\":1.27,\"tokens_per_s\":12882.87,\"lr\":1e-5,"
                              "\"grad_norm\":0.0,\"real_tokens_per_s\":8000.0}");
    free(text);
    json_decref(j);
    /* a step whose figures are not finite is still an object, with nulls */
    s.loss = NAN;
    s.grad_norm = INFINITY;
    j = steplog_json(&s);
    text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    assert_string_equal(text, "{\"step\":4,\"total_steps\":17944,\"loss\":null,"
                              "\"duration_s\":1.27,\"tokens_per_s\":12882.87,\"lr\":1e-5,"
                              "\"grad_norm\":null,\"real_tokens_per_s\":8000.0}");
    free(text);
    json_decref(j);
    /* packed rows: the step's rows, examples and real tokens in the object; the line is the
     * platform's */
    s.loss = 2.03125;
    s.grad_norm = 0.5;
    s.rows = 16;
    s.examples = 31;
    s.real_tokens = 3862;
    s.packed = true;
    assert_string_equal(steplog_format(buf, sizeof(buf), &s),
                        "[Step 4/17944] | Loss: 2.03125 | Duration: 1.27 | Throughput: 12882.87 "
                        "tokens/sec");
    j = steplog_json(&s);
    text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    assert_string_equal(text, "{\"step\":4,\"total_steps\":17944,\"loss\":2.03125,"
                              "\"duration_s\":1.27,\"tokens_per_s\":12882.87,\"lr\":1e-5,"
                              "\"grad_norm\":0.5,\"real_tokens_per_s\":8000.0,\"rows\":16,"
                              "\"examples\":31,\"real_tokens\":3862}");
    free(text);
    json_decref(j);
}

static void test_exec_eval_line_format(void **state)
{
    (void) state;
    char buf[256];
    assert_string_equal(steplog_format_eval(buf, sizeof(buf), 10, 60, 2.345678),
                        "[Eval 10/60] | Validation loss: 2.345678 | Perplexity: 10.44");
    json_t *j = steplog_eval_json(10, 60, 2.345678);
    char *text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    assert_string_equal(text, "{\"eval\":10,\"total_steps\":60,\"validation_loss\":2.345678,"
                              "\"perplexity\":10.44}");
    free(text);
    json_decref(j);
    j = steplog_eval_json(1, 2, NAN); /* never dropped: null */
    text = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    assert_string_equal(text, "{\"eval\":1,\"total_steps\":2,\"validation_loss\":null,"
                              "\"perplexity\":null}");
    free(text);
    json_decref(j);
}

struct split_case {
    struct comm_world *w;
    double sums[8];
    int ranks[8], sizes[8];
};

static int split_worker(struct dev *d, void *arg)
{
    struct split_case *sc = arg;
    struct comm c;
    /* 8 devices as dp 2 x tp 4: tp groups are consecutive devices, ranked by device. */
    if (comm_world_split(sc->w, d->id, d->id / 4, 3 - d->id % 4, &c) < 0)
        return MOAI_ENOMEM;
    sc->ranks[d->id] = c.rank;
    sc->sizes[d->id] = c.size;
    sc->sums[d->id] = comm_allreduce_scalar(&c, (double) d->id);
    return 0;
}

static void test_exec_world_split(void **state)
{
    (void) state;
    struct split_case sc;
    struct dev_set ds;
    struct moai_err err = {0};
    assert_int_equal(comm_world_create(&sc.w, 8, &err), 0);
    assert_int_equal(dev_set_init(&ds, 8, 1 << 20, &err), 0);
    assert_int_equal(dev_set_run(&ds, split_worker, &sc, &err), 0);
    for (int d = 0; d < 8; d++) {
        assert_int_equal(sc.sizes[d], 4);
        assert_int_equal(sc.ranks[d], 3 - d % 4); /* ranked by key */
        assert_true(sc.sums[d] == (d < 4 ? 0 + 1 + 2 + 3 : 4 + 5 + 6 + 7));
    }
    dev_set_release(&ds);
    comm_world_free(sc.w);
}

struct chain_case {
    struct comm_group *g;
    int got[N][16];
};

/* A pipeline of N ranks passing 16 messages forward and 16 back, each exchange with a
 * neighbour done as one comm_sendrecv: rank r sends its forward message to r + 1 while it
 * receives r + 1's backward message, which with two blocking sends would deadlock. */
static int chain_worker(struct dev *d, void *arg)
{
    struct chain_case *cc = arg;
    struct comm c;
    int r = d->id;
    comm_init(&c, cc->g, r);
    for (int i = 0; i < 16; i++) {
        int fwd = r * 100 + i, bwd = -1;
        if (r + 1 < N)
            comm_sendrecv(&c, r + 1, &fwd, sizeof(fwd), r + 1, &bwd, sizeof(bwd));
        int from_prev = -1;
        if (r > 0)
            comm_sendrecv(&c, r - 1, &fwd, sizeof(fwd), r - 1, &from_prev, sizeof(from_prev));
        cc->got[r][i] = r + 1 < N ? bwd : from_prev;
    }
    return 0;
}

static void test_exec_sendrecv_exchanges(void **state)
{
    (void) state;
    struct chain_case cc;
    struct dev_set ds;
    struct moai_err err = {0};
    assert_int_equal(comm_group_create(&cc.g, N, &err), 0);
    assert_int_equal(dev_set_init(&ds, N, 1 << 20, &err), 0);
    assert_int_equal(dev_set_run(&ds, chain_worker, &cc, &err), 0);
    for (int r = 0; r < N; r++)
        for (int i = 0; i < 16; i++)
            assert_int_equal(cc.got[r][i], (r + 1 < N ? r + 1 : r - 1) * 100 + i);
    dev_set_release(&ds);
    comm_group_free(cc.g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exec_collectives_in_rank_order),
        cmocka_unit_test(test_exec_allgather),
        cmocka_unit_test(test_exec_device_out_of_memory),
        cmocka_unit_test(test_exec_checkpoint_swap_is_atomic),
        cmocka_unit_test(test_exec_checkpoint_recover_after_commit),
        cmocka_unit_test(test_exec_checkpoint_lock),
        cmocka_unit_test(test_exec_step_line_format),
        cmocka_unit_test(test_exec_eval_line_format),
        cmocka_unit_test(test_exec_world_split),
        cmocka_unit_test(test_exec_sendrecv_exchanges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
