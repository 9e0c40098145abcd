/* test_comm_mpi.c - the Open MPI transport: collectives in rank order, splits, exchanges.
 *
 * The cmocka tests start this same binary under `mpirun --oversubscribe` (2 and 4 processes,
 * 1 to 4 devices each); launched so, it runs every check on its devices' threads and exits
 * non-zero on the first wrong value. Expected values follow comm.h's definition (sums in
 * rank order from rank 0's value), which the shared-memory transport's tests check too, so
 * the two transports give the same bits. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "exec/comm.h"
#include "exec/dev.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N 37 /* floats per rank: not a multiple of any group size */

static const char *self;

/* A value of device d at i whose sums depend on their order. */
static float value(int d, int i)
{
    unsigned h = (unsigned) (d * 7919 + i * 104729 + 1) * 2654435761u;
    float mag = (float) (1u << (h % 24));
    return ((float) (h >> 8 & 0xffff) / 65536.0f - 0.5f) * mag;
}

struct child {
    struct comm_world *w;
    int ndev;
    int failures;
};

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "device %d: check failed: %s (line %d)\n", d->id, #cond, __LINE__);    \
            __atomic_add_fetch(&ch->failures, 1, __ATOMIC_RELAXED);                                \
        }                                                                                          \
    } while (0)

/* The members of a group in rank order, as comm_world_split ranks them. */
static int group_of(int ndev, int d, int (*color)(int), int (*key)(int), int *ids)
{
    int n = 0;
    for (int e = 0; e < ndev; e++)
        if (color(e) == color(d))
            ids[n++] = e;
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && (key(ids[j]) < key(ids[j - 1]) ||
                                  (key(ids[j]) == key(ids[j - 1]) && ids[j] < ids[j - 1]));
             j--) {
            int t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    return n;
}

static int color_parity(int d)
{
    return d % 2;
}

static int key_reverse(int d)
{
    return -d;
}

static int color_all(int d)
{
    (void) d;
    return 0;
}

static int key_id(int d)
{
    return d;
}

/* Every collective of c (whose ranks are devices ids[0..size)) against its definition. */
static void check_collectives(struct child *ch, struct dev *d, struct comm *c, const int *ids)
{
    int size = c->size, me = c->rank;
    float buf[N], want[N], *in = malloc(sizeof(float) * N * (size_t) size);
    float *out = malloc(sizeof(float) * N * (size_t) size);

    CHECK(ids[me] == d->id);
    /* all-reduce */
    for (int i = 0; i < N; i++) {
        buf[i] = value(d->id, i);
        want[i] = value(ids[0], i);
        for (int r = 1; r < size; r++)
            want[i] += value(ids[r], i);
    }
    CHECK(comm_allreduce_sum(c, buf, N) == 0);
    CHECK(memcmp(buf, want, sizeof(buf)) == 0);
    /* reduce-scatter: slice me of everyone's (N x size) */
    for (int i = 0; i < N * size; i++)
        in[i] = value(d->id, 1000 + i);
    CHECK(comm_reduce_scatter_sum(c, in, buf, N) == 0);
    for (int i = 0; i < N; i++) {
        want[i] = value(ids[0], 1000 + me * N + i);
        for (int r = 1; r < size; r++)
            want[i] += value(ids[r], 1000 + me * N + i);
    }
    CHECK(memcmp(buf, want, sizeof(buf)) == 0);
    /* all-gather */
    for (int i = 0; i < N; i++)
        buf[i] = value(d->id, 2000 + i);
    CHECK(comm_allgather(c, buf, out, N) == 0);
    for (int r = 0; r < size; r++)
        for (int i = 0; i < N; i++)
            CHECK(out[r * N + i] == value(ids[r], 2000 + i));
    /* scalars, from 0.0 in rank order */
    double s = 0.0;
    for (int r = 0; r < size; r++)
        s += (double) value(ids[r], 3000);
    CHECK(comm_allreduce_scalar(c, (double) value(d->id, 3000)) == s);
    comm_barrier(c);
    free(in);
    free(out);
}

static int child_worker(struct dev *d, void *arg)
{
    struct child *ch = arg;
    struct comm all, par;
    int ids[64];

    comm_world_all(ch->w, d->id, &all);
    group_of(ch->ndev, d->id, color_all, key_id, ids);
    check_collectives(ch, d, &all, ids);
    CHECK(comm_world_split(ch->w, d->id, d->id % 2, -d->id, &par) == 0);
    group_of(ch->ndev, d->id, color_parity, key_reverse, ids);
    check_collectives(ch, d, &par, ids);

    /* a chain exchanging with both neighbours (deadlocks with two blocking sends) */
    for (int i = 0; i < 8; i++) {
        int r = all.rank, n = all.size, fwd = r * 100 + i, got = -1, from_prev = -1;
        if (r + 1 < n)
            comm_sendrecv(&all, r + 1, &fwd, sizeof(fwd), r + 1, &got, sizeof(got));
        if (r > 0)
            comm_sendrecv(&all, r - 1, &fwd, sizeof(fwd), r - 1, &from_prev, sizeof(from_prev));
        CHECK((r + 1 < n ? got : from_prev) == (r + 1 < n ? r + 1 : r - 1) * 100 + i);
    }
    /* plain send and receive around a ring, in an order that cannot deadlock */
    int token = d->id, next = (all.rank + 1) % all.size,
        prev = (all.rank + all.size - 1) % all.size;
    if (all.rank == 0) {
        comm_send(&all, next, &token, sizeof(token));
        comm_recv(&all, prev, &token, sizeof(token));
        CHECK(token == all.size - 1);
    } else {
        int t;
        comm_recv(&all, prev, &t, sizeof(t));
        CHECK(t == all.rank - 1);
        comm_send(&all, next, &token, sizeof(token));
    }
    return 0;
}

/* Launched by mpirun: the checks over ndev devices. */
static int child_main(int ndev)
{
    struct moai_err err = {0};
    struct child ch = {.ndev = ndev};
    struct dev_set ds;
    if (comm_mpi_init(&err) < 0) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    int rc = comm_world_create_mpi(&ch.w, ndev, &err);
    if (rc < 0) {
        if (comm_mpi_rank() == 0)
            fprintf(stderr, "%s\n", err.msg);
        comm_mpi_finalize();
        return 2;
    }
    dev_set_init(&ds, ch.w->nlocal, 1 << 20, &err);
    for (int i = 0; i < ch.w->nlocal; i++)
        ds.devs[i].id = ch.w->first_dev + i;
    rc = dev_set_run(&ds, child_worker, &ch, &err);
    dev_set_release(&ds);
    comm_world_free(ch.w);
    comm_mpi_finalize();
    return rc < 0 || ch.failures ? 1 : 0;
}

/* Runs this binary under mpirun; returns its exit status, its standard error in err. */
static int launch(int procs, int ndev, char *err, size_t size)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "mpirun --oversubscribe -n %d %s child %d 2>&1", procs, self, ndev);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(err, 1, size - 1, p);
    err[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void expect_clean(int procs, int ndev)
{
    char out[8192];
    int st = launch(procs, ndev, out, sizeof(out));
    if (st != 0) {
        print_error("mpirun -n %d, %d devices: status %d\n%s\n", procs, ndev, st, out);
        fail();
    }
}

static void test_comm_mpi_two_ranks_two_devices_each(void **state)
{
    (void) state;
    expect_clean(2, 4);
}

static void test_comm_mpi_four_ranks_one_device_each(void **state)
{
    (void) state;
    expect_clean(4, 4);
}

static void test_comm_mpi_two_ranks_four_devices_each(void **state)
{
    (void) state;
    expect_clean(2, 8);
}

static void test_comm_mpi_devices_not_a_multiple(void **state)
{
    (void) state;
    char out[8192];
    assert_int_equal(launch(3, 4, out, sizeof(out)), 2);
    assert_non_null(strstr(out, "4 devices cannot be shared out over 3 MPI ranks: the device "
                                "count must be a multiple of the rank count"));
}

int main(int argc, char **argv)
{
    if (comm_mpi_launched())
        return child_main(argc > 2 ? atoi(argv[2]) : 4);
    self = argv[0];
    /* mpirun as root, and the children's leak checker told about Open MPI's own allocations */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("LSAN_OPTIONS",
           "suppressions=tests/lsan-mpi.supp:fast_unwind_on_malloc=0:print_suppressions=0", 1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_comm_mpi_two_ranks_two_devices_each),
        cmocka_unit_test(test_comm_mpi_four_ranks_one_device_each),
        cmocka_unit_test(test_comm_mpi_two_ranks_four_devices_each),
        cmocka_unit_test(test_comm_mpi_devices_not_a_multiple),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
