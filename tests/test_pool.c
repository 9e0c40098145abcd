/* test_pool.c - the model's thread pool: every task runs exactly once, on a valid thread. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "model/pool.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct count_job {
    atomic_int *hits;
    atomic_int bad_thread;
    int nthreads;
};

static void count_task(void *arg, int64_t task, int thread)
{
    struct count_job *j = arg;
    atomic_fetch_add(&j->hits[task], 1);
    if (thread < 0 || thread >= j->nthreads)
        atomic_store(&j->bad_thread, 1);
}

static void test_pool_each_task_once(void **state)
{
    (void) state;
    for (int nthreads = 1; nthreads <= 4; nthreads++) {
        struct pool *p = pool_create(nthreads);
        assert_non_null(p);
        assert_int_equal(pool_threads(p), nthreads);
        for (int64_t ntasks = 0; ntasks < 70; ntasks += 7) {
            /* many short jobs back to back: workers go from job to job while spinning */
            for (int rep = 0; rep < 50; rep++) {
                atomic_int hits[70];
                for (int i = 0; i < 70; i++)
                    atomic_init(&hits[i], 0);
                struct count_job j = {hits, 0, nthreads};
                pool_run(p, ntasks, count_task, &j);
                for (int64_t i = 0; i < 70; i++)
                    assert_int_equal(atomic_load(&hits[i]), i < ntasks ? 1 : 0);
                assert_int_equal(atomic_load(&j.bad_thread), 0);
            }
        }
        pool_free(p);
    }
}

static void test_pool_after_sleep(void **state)
{
    (void) state;
    /* workers that fell asleep between jobs wake for the next one */
    struct pool *p = pool_create(3);
    for (int rep = 0; rep < 3; rep++) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        atomic_int hits[16];
        for (int i = 0; i < 16; i++)
            atomic_init(&hits[i], 0);
        struct count_job j = {hits, 0, 3};
        pool_run(p, 16, count_task, &j);
        for (int i = 0; i < 16; i++)
            assert_int_equal(atomic_load(&hits[i]), 1);
    }
    pool_free(p);
}

static void test_pool_null_is_serial(void **state)
{
    (void) state;
    atomic_int hits[5];
    for (int i = 0; i < 5; i++)
        atomic_init(&hits[i], 0);
    struct count_job j = {hits, 0, 1};
    assert_int_equal(pool_threads(NULL), 1);
    pool_run(NULL, 5, count_task, &j);
    for (int i = 0; i < 5; i++)
        assert_int_equal(atomic_load(&hits[i]), 1);
    pool_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_each_task_once),
        cmocka_unit_test(test_pool_after_sleep),
        cmocka_unit_test(test_pool_null_is_serial),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
