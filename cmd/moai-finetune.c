/* moai-finetune.c - the command line: options, the loop over recipes, exit statuses. */
#include "err.h"
#include "log.h"
#include "data/validate.h"
#include "data/tokcache.h"
#include "data/tokenizer.h"
#include "exec/comm.h"
#include "exec/run.h"
#include "exec/steplog.h"
#include "exec/train.h"
#include "model/config.h"
#include "plan/plan.h"
#include "plan/report.h"
#include "progress.h"
#include "recipe.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MOAI_VERSION "0.1.0"

enum mode {
    MODE_TRAIN,
    MODE_PLAN,
    MODE_VALIDATE,
    MODE_TOKENIZE,
};

struct options {
    enum mode mode;
    bool json;
    bool mpi; /* started by mpirun */
    struct recipe_overrides ov;
    const char **sets;
    const char **recipes; /* in command-line order, options anywhere among them */
    int nrecipes;
};

static const char usage_text[] =
    "usage: moai-finetune [OPTIONS] RECIPE...\n"
    "\n"
    "Fine-tunes a Llama-family model from each YAML RECIPE ('-' reads standard input),\n"
    "planning the parallel layout over the recipe's flavor automatically. Started by\n"
    "mpirun, it shares the flavor's devices out over the ranks.\n"
    "\n"
    "  --plan-only        plan, print the plan and exit (reads only the recipe and config.json)\n"
    "  --json             JSON Lines on standard output\n"
    "  --set KEY=VALUE    override a recipe key by dotted path (repeatable)\n"
    "  --ap, --no-ap      switch advanced parallelization on or off\n"
    "  --validate         check the recipe, the files it names and that a plan fits; exit\n"
    "  --tokenize         print each example's input_ids and labels as JSON Lines; exit\n"
    "  -q, --quiet        log only warnings and errors\n"
    "  -v, --verbose      log more (debug lines)\n"
    "  -h, --help         show this help and exit\n"
    "  -V, --version      show the version and exit\n"
    "\n"
    "Exit status: 0 success, 1 run-time failure, 2 usage or recipe error, 3 out of memory,\n"
    "130 interrupted after a checkpoint was saved. See moai-finetune(1) and moai-recipe(5).\n";

/* This process's MPI rank under mpirun, else 0. */
static int mpi_rank;

static void print_error(const struct moai_err *err)
{
    progress_interrupt(); /* a bar left drawn by the failed phase */
    if (mpi_rank > 0) {   /* rank 0 has the whole report; the others say theirs in one line */
        fprintf(stderr, "moai-finetune: rank %d: error: %.*s\n", mpi_rank,
                (int) strcspn(err->msg, "\n"), err->msg);
        return;
    }
    fprintf(stderr, "moai-finetune: error: %s\n", err->msg);
    if (err->hint[0])
        fprintf(stderr, "hint: %s\n", err->hint);
}

/* The first error writing standard output since the last check_stdout, 0 when none. */
static int stdout_errno;

/* fflush(stdout), keeping the reason of a failure for check_stdout. */
static void flush_stdout(void)
{
    if (fflush(stdout) == EOF && !stdout_errno)
        stdout_errno = errno ? errno : EIO;
}

/* One JSON Lines object on standard output. */
static void print_json_line(json_t *obj)
{
    char *s = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    if (s) {
        puts(s);
        free(s);
    }
    flush_stdout();
}

/* Prints and frees a JSON object built for one recipe. */
static void print_json_result(json_t *obj)
{
    if (obj)
        print_json_line(obj);
    json_decref(obj);
}

static void print_json_status(const char *recipe, const char *status, const struct moai_err *err)
{
    json_t *o = json_pack("{s:s, s:s}", "recipe", recipe, "status", status);
    if (o && err)
        json_object_set_new(o, "error", json_string(err->msg));
    if (o)
        print_json_line(o);
    json_decref(o);
}

static int run_validate(const struct options *opt, const char *path, struct recipe *r,
                        struct moai_err *err)
{
    struct model_config cfg;
    int rc = recipe_check_files(r, err);
    if (rc < 0 || (rc = exec_check_save_dir(r, err)) < 0)
        return rc;
    if ((rc = data_validate(r, err)) < 0)
        return rc;
    if ((rc = exec_load_model_config(r, &cfg, err)) < 0)
        return rc;
    if ((rc = exec_check_resume(r, &cfg, err)) < 0)
        return rc;
    struct plan_result res;
    enum log_level level = log_get_level();
    if (level == LOG_INFO) /* the planner's lines are for --plan-only and training */
        log_set_level(LOG_WARN);
    rc = plan_search(&res, &cfg, r, err);
    log_set_level(level);
    if (rc == MOAI_EOOM)
        plan_oom_message(err, &res, &cfg, r);
    if (rc < 0)
        return rc;
    if (r->tokenizer && access(r->tokenizer, R_OK) == 0 &&
        (rc = tokenizer_check_vocab(r->tokenizer, cfg.vocab_size, err)) < 0)
        return moai_err_prefix(err, "%s", r->source);
    if (opt->json)
        print_json_status(path, "ok", NULL);
    else
        printf("%s: ok\n", path);
    return 0;
}

static int run_plan(const struct options *opt, const char *path, struct recipe *r,
                    struct moai_err *err)
{
    struct model_config cfg;
    struct plan_result res;
    int rc;

    (void) path;
    if ((rc = exec_load_model_config(r, &cfg, err)) < 0) {
        if (opt->json)
            print_json_result(plan_result_json(NULL, NULL, r, "error", err->msg));
        return rc;
    }
    rc = plan_search(&res, &cfg, r, err);
    if (rc == MOAI_EOOM)
        plan_oom_message(err, &res, &cfg, r);
    if (rc < 0) {
        if (opt->json) /* the report still says what was tried */
            print_json_result(plan_result_json(rc == MOAI_EOOM ? &res : NULL, &cfg, r,
                                               rc == MOAI_EOOM ? "oom" : "error", err->msg));
        return rc;
    }
    if (opt->json)
        print_json_result(plan_result_json(&res, &cfg, r, "ok", NULL));
    else
        plan_report_text(stdout, &res, &cfg, r);
    flush_stdout();
    return 0;
}

/* SIGINT, SIGTERM, SIGHUP and SIGPIPE (the reader of standard output went away) ask the
 * training loop to save and stop at the next step; a second one ends the process at once,
 * saying so (async-signal-safe: write(2) of constant strings). */
static void on_signal(int sig)
{
    if (exec_stop_requested) {
        static const char during[] = "moai-finetune: interrupted again during the save: "
                                     "stopping now; the previous checkpoint stays\n";
        static const char again[] = "moai-finetune: interrupted again: stopping now without "
                                    "saving\n";
        if (sig != SIGPIPE) {
            ssize_t w = exec_saving ? write(2, during, sizeof(during) - 1)
                                    : write(2, again, sizeof(again) - 1);
            (void) w;
            signal(sig, SIG_DFL);
            raise(sig);
        }
        return;
    }
    exec_stop_requested = sig;
}

/* Before a line on standard output: when it shares the terminal with the step bar (standard
 * error), the bar is erased first and drawn again below the line at the next update. */
static void stdout_line_begins(void)
{
    static int stdout_tty = -1;
    if (stdout_tty < 0)
        stdout_tty = isatty(STDOUT_FILENO);
    if (stdout_tty)
        progress_interrupt();
}

/* The errno of the first failed write on standard output, 0 when none. */
static int stdout_failure(void)
{
    flush_stdout();
    return stdout_errno ? stdout_errno : ferror(stdout) ? EIO : 0;
}

/* The training loop's report (exec/train.h): a step line, an evaluation line, or the two lines
 * before the final save; under --json the step and evaluation objects. */
static int print_event(void *arg, const struct train_event *ev)
{
    const struct options *opt = arg;
    char line[256];
    json_t *j = NULL;

    switch (ev->kind) {
    case TRAIN_STEP:
        if (opt->json)
            j = steplog_json(&ev->step);
        else
            steplog_format(line, sizeof(line), &ev->step);
        break;
    case TRAIN_EVAL:
        if (opt->json)
            j = steplog_eval_json(ev->eval_step, ev->total_steps, ev->eval_loss);
        else
            steplog_format_eval(line, sizeof(line), ev->eval_step, ev->total_steps, ev->eval_loss);
        break;
    case TRAIN_SAVING:
        if (opt->json)
            return 0;
        snprintf(line, sizeof(line), "Training Done\nSaving Model...");
        break;
    }
    stdout_line_begins();
    if (opt->json)
        print_json_result(j);
    else
        puts(line);
    return stdout_failure();
}

/* The result of a finished run: where the model was saved, or under --json the run's figures
 * with each device's peak memory against the plan. */
static void print_summary(void *arg, const struct exec_summary *s)
{
    const struct options *opt = arg;
    if (!opt->json) {
        printf("Model saved in '%s'\n", s->save_dir);
        flush_stdout();
        return;
    }
    json_t *peaks = json_array(), *predicted = json_array();
    for (int i = 0; i < s->ndev; i++) {
        json_array_append_new(peaks, json_integer(s->peak_bytes[i]));
        json_array_append_new(predicted, json_integer(s->predicted_bytes[i]));
    }
    print_json_result(
        json_pack("{s:s, s:s, s:s, s:I, s:f, s:o, s:f, s:f, s:I, s:o, s:o, s:I, s:I}", "status",
                  "done", "recipe", s->recipe, "save_dir", s->save_dir, "steps",
                  (json_int_t) s->steps, "loss", s->loss, "validation_loss",
                  isnan(s->validation_loss) ? json_null() : json_real(s->validation_loss),
                  "median_step_s", s->median_step_s, "median_tokens_per_s", s->median_tokens_per_s,
                  "predicted_bytes_per_device", (json_int_t) s->predicted_bytes_per_device,
                  "peak_bytes", peaks, "predicted_bytes", predicted, "process_predicted_bytes",
                  (json_int_t) s->process_predicted_bytes, "process_peak_bytes",
                  (json_int_t) s->process_peak_bytes));
}

static int run_train(const struct options *opt, const char *path, struct recipe *r,
                     struct moai_err *err)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE};
    struct exec_opts o = {.mpi = opt->mpi,
                          .report = print_event,
                          .done = print_summary,
                          .arg = (void *) opt,
                          .report_name = "standard output"};
    struct sigaction sa = {.sa_handler = on_signal}, old[4];
    int rc;

    (void) path;
    sigemptyset(&sa.sa_mask);
    exec_stop_requested = 0;
    for (int i = 0; i < 4; i++)
        sigaction(sigs[i], &sa, &old[i]);
    rc = exec_run(r, &o, err);
    for (int i = 0; i < 4; i++)
        sigaction(sigs[i], &old[i], NULL);
    return rc;
}

/* Fails when something written to standard output did not reach it (a full disk, a closed
 * pipe); the error is then cleared so the next recipe answers for its own output. */
static int check_stdout(struct moai_err *err)
{
    flush_stdout();
    int e = stdout_errno ? stdout_errno : ferror(stdout) ? EIO : 0;
    stdout_errno = 0;
    clearerr(stdout);
    return e ? moai_err_set(err, MOAI_EIO, "cannot write standard output: %s", strerror(e)) : 0;
}

/* Loads and runs one recipe. Returns its exit status. */
/* --tokenize: one JSON object per example, in file order, without padding. */
static int run_tokenize(const struct recipe *r, struct moai_err *err)
{
    struct tokenized ds;
    int rc = exec_prepare_data(r, &ds, NULL, err);
    if (rc < 0)
        return rc;
    for (int64_t i = 0; i < ds.n; i++) {
        const int32_t *tok = ds.tokens + i * ds.T, *lab = ds.labels + i * ds.T;
        fputs("{\"input_ids\": [", stdout);
        for (int64_t t = 0; t < ds.lengths[i]; t++)
            printf(t ? ", %d" : "%d", (int) tok[t]);
        fputs("], \"labels\": [", stdout);
        for (int64_t t = 0; t < ds.lengths[i]; t++)
            printf(t ? ", %d" : "%d", (int) lab[t]);
        fputs("]}\n", stdout);
    }
    tokenized_release(&ds);
    if (fflush(stdout) != 0 || ferror(stdout))
        return moai_err_set(err, MOAI_EIO, "cannot write to standard output");
    return 0;
}

static int run_recipe(const struct options *opt, const char *path)
{
    struct moai_err err = {0};
    struct recipe r;
    int rc = recipe_load(&r, path, &opt->ov, &err);
    bool loaded = rc == 0;

    if (rc == 0) {
        switch (opt->mode) {
        case MODE_VALIDATE:
            rc = run_validate(opt, path, &r, &err);
            break;
        case MODE_PLAN:
            rc = run_plan(opt, path, &r, &err);
            break;
        case MODE_TRAIN:
            rc = run_train(opt, path, &r, &err);
            break;
        case MODE_TOKENIZE:
            rc = run_tokenize(&r, &err);
            break;
        }
        recipe_release(&r);
    }
    if (rc == 0)
        rc = check_stdout(&err);
    if (rc < 0) {
        print_error(&err);
        if (opt->json && !(opt->mode == MODE_PLAN && loaded))
            print_json_status(path, rc == MOAI_EOOM ? "oom" : "error", &err);
    }
    return moai_err_exit_status(rc);
}

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "moai-finetune: error: ");
    fprintf(stderr, fmt, arg);
    fputc('\n', stderr);
    return 2;
}

/* --plan-only, --validate and --tokenize exclude each other. Returns 0, or the usage error's
 * exit status. */
static int set_mode(struct options *opt, enum mode mode)
{
    static const char *const names[] = {"", "--plan-only", "--validate", "--tokenize"};
    if (opt->mode == MODE_TRAIN || opt->mode == mode) {
        opt->mode = mode;
        return 0;
    }
    if (mode == MODE_TOKENIZE)
        return usage_error("%s cannot be combined with --plan-only or --validate", names[mode]);
    fprintf(stderr, "moai-finetune: error: %s cannot be combined with %s\n", names[mode],
            names[opt->mode]);
    return 2;
}

/* Reads the command line into opt. Returns -1 to go on with the recipes, else the exit status
 * (0 after --help or --version, 2 after a usage error). */
static int parse_args(int argc, char **argv, struct options *opt)
{
    enum { OPT_PLAN = 256, OPT_JSON, OPT_SET, OPT_AP, OPT_NO_AP, OPT_VALIDATE, OPT_TOKENIZE };
    static const struct option longopts[] = {
        {"plan-only", no_argument, NULL, OPT_PLAN},
        {"json", no_argument, NULL, OPT_JSON},
        {"set", required_argument, NULL, OPT_SET},
        {"ap", no_argument, NULL, OPT_AP},
        {"no-ap", no_argument, NULL, OPT_NO_AP},
        {"validate", no_argument, NULL, OPT_VALIDATE},
        {"tokenize", no_argument, NULL, OPT_TOKENIZE},
        {"quiet", no_argument, NULL, 'q'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c, status = -1;

    opterr = 0;
    /* GNU style: options anywhere among the recipes ("-" in the option string hands each
     * recipe over in order, whatever POSIXLY_CORRECT says); "--" ends the options. */
    while (status < 0 && (c = getopt_long(argc, argv, "-qvhV", longopts, NULL)) != -1) {
        switch (c) {
        case 1:
            opt->recipes[opt->nrecipes++] = optarg;
            break;
        case OPT_PLAN:
            status = set_mode(opt, MODE_PLAN) ? 2 : -1;
            break;
        case OPT_VALIDATE:
            status = set_mode(opt, MODE_VALIDATE) ? 2 : -1;
            break;
        case OPT_TOKENIZE:
            status = set_mode(opt, MODE_TOKENIZE) ? 2 : -1;
            break;
        case OPT_JSON:
            opt->json = true;
            break;
        case OPT_SET:
            if (!strchr(optarg, '=') || optarg[0] == '=')
                return usage_error("--set '%s': expected KEY=VALUE", optarg);
            opt->sets[opt->ov.nsets++] = optarg;
            break;
        case OPT_AP:
            opt->ov.ap = 1;
            break;
        case OPT_NO_AP:
            opt->ov.ap = 0;
            break;
        case 'q':
            log_set_level(LOG_WARN);
            break;
        case 'v':
            log_set_level(LOG_DEBUG);
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        case 'V':
            printf("moai-finetune %s\n", MOAI_VERSION);
            return 0;
        default:
            if (optopt && optopt < 256)
                return usage_error("unknown option '-%s'", (char[]){(char) optopt, 0});
            return usage_error("unknown option or missing argument '%s'", argv[optind - 1]);
        }
    }
    if (status >= 0)
        return status;
    opt->ov.sets = opt->sets;
    while (optind < argc) /* after "--" */
        opt->recipes[opt->nrecipes++] = argv[optind++];
    if (opt->nrecipes == 0)
        return usage_error("%s (usage: moai-finetune [OPTIONS] RECIPE...)", "no recipe given");
    return -1;
}

/* Under mpirun every rank runs the recipes; rank 0 alone speaks (results, logs and warnings:
 * the ranks do the same work; errors come from every rank), and each recipe's devices are
 * shared out over the ranks. Returns 0, or 1 when MPI cannot start. */
static int mpi_setup(struct options *opt)
{
    struct moai_err err = {0};
    opt->mpi = comm_mpi_launched();
    if (!opt->mpi)
        return 0;
    if (comm_mpi_init(&err) < 0) {
        fprintf(stderr, "moai-finetune: error: %s\n", err.msg);
        return 1;
    }
    mpi_rank = comm_mpi_rank();
    if (mpi_rank > 0) {
        log_set_level(LOG_ERROR);
        if (!freopen("/dev/null", "w", stdout))
            log_warn("cannot silence standard output of MPI rank %d", comm_mpi_rank());
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct options opt = {.mode = MODE_TRAIN, .ov = {.ap = -1}};
    int status;

    opt.sets = calloc((size_t) argc, sizeof(*opt.sets));
    opt.recipes = calloc((size_t) argc, sizeof(*opt.recipes));
    if (!opt.sets || !opt.recipes)
        status = 1;
    else if ((status = parse_args(argc, argv, &opt)) < 0 && (status = mpi_setup(&opt)) == 0) {
        for (int i = 0; i < opt.nrecipes; i++) {
            int s = run_recipe(&opt, opt.recipes[i]);
            status = s > status ? s : status;
        }
        if (opt.mpi)
            comm_mpi_finalize();
    }
    free(opt.sets);
    free(opt.recipes);
    return status;
}
