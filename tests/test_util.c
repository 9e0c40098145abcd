/* test_util.c - errors, log lines and progress bars. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "err.h"
#include "log.h"
#include "progress.h"

#include <string.h>

static void test_err_set_and_prefix(void **state)
{
    (void) state;
    struct moai_err err = {0};
    assert_int_equal(moai_err_set(&err, MOAI_EIO, "cannot open '%s'", "x"), MOAI_EIO);
    moai_err_prefix(&err, "%s:%d", "model.safetensors", 3);
    assert_string_equal(err.msg, "model.safetensors:3: cannot open 'x'");
    assert_int_equal(err.code, MOAI_EIO);
}

static void test_err_exit_status(void **state)
{
    (void) state;
    assert_int_equal(moai_err_exit_status(MOAI_OK), 0);
    assert_int_equal(moai_err_exit_status(MOAI_EIO), 1);
    assert_int_equal(moai_err_exit_status(MOAI_EUSAGE), 2);
    assert_int_equal(moai_err_exit_status(MOAI_EOOM), 3);
    assert_int_equal(moai_err_exit_status(MOAI_EINTR), 130);
}

static void test_log_format(void **state)
{
    (void) state;
    char buf[256] = {0};
    FILE *f = fmemopen(buf, sizeof(buf), "w");
    log_set_stream(f);
    log_info("The number of candidates is %d.", 30);
    log_debug("hidden");
    log_set_stream(NULL);
    fclose(f);
    /* [2026-11-22 14:07:02.815] [info] The number of candidates is 30. */
    assert_int_equal(buf[0], '[');
    assert_int_equal(buf[5], '-');
    assert_int_equal(buf[20], '.');
    assert_int_equal(buf[24], ']');
    assert_string_equal(buf + 25, " [info] The number of candidates is 30.\n");
}

static void test_progress_format(void **state)
{
    (void) state;
    char buf[512];
    progress_format(buf, sizeof(buf), "Map", 1000, 1000, 5.0, "examples", 10);
    assert_string_equal(buf, "Map: 100%|██████████| 1000/1000 [00:05<00:00, 200.00 examples/s]");
    progress_format(buf, sizeof(buf), "Loading checkpoint shards", 1, 2, 4.15, "it", 4);
    assert_string_equal(buf, "Loading checkpoint shards:  50%|██  | 1/2 [00:04<00:04,  4.15s/it]");
    /* a resumed run: 10 of its steps in 10 s, so 1 step/s and 30 s to go; the postfix last */
    progress_format_from(buf, sizeof(buf), "Training", 20, 30, 60, 10.0, "steps", 10,
                         ", loss 4.61, lr 5.00e-04");
    assert_string_equal(buf, "Training:  50%|█████     | 30/60 [00:10<00:30, 1.00 steps/s, loss "
                             "4.61, lr 5.00e-04]");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_err_set_and_prefix),
        cmocka_unit_test(test_err_exit_status),
        cmocka_unit_test(test_log_format),
        cmocka_unit_test(test_progress_format),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
