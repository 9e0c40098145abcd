/* validate.c - --validate's look at the data (see validate.h). */
#include "data/validate.h"

#include "data/dataset.h"

/* Chat and instruction records: their structure, through the recipe's chat template (ChatML,
 * which takes every role, when the template is left to the tokenizer: --validate loads no
 * tokenizer for the data). */
static int validate_records(const struct recipe *r, int64_t limit, struct moai_err *err)
{
    static const enum dataset_kind kinds[] = {
        [RECIPE_FORMAT_TEXT] = DATASET_TEXT,
        [RECIPE_FORMAT_MESSAGES] = DATASET_MESSAGES,
        [RECIPE_FORMAT_ALPACA] = DATASET_ALPACA,
    };
    static const enum dataset_chat chats[] = {
        [RECIPE_CHAT_AUTO] = DATASET_CHAT_CHATML,   [RECIPE_CHAT_LLAMA3] = DATASET_CHAT_LLAMA3,
        [RECIPE_CHAT_LLAMA2] = DATASET_CHAT_LLAMA2, [RECIPE_CHAT_MISTRAL] = DATASET_CHAT_MISTRAL,
        [RECIPE_CHAT_CHATML] = DATASET_CHAT_CHATML,
    };
    struct dataset_format f = {.kind = kinds[r->dataset.format],
                               .chat = chats[r->dataset.chat_template],
                               .train_all = r->dataset.train_on == RECIPE_TRAIN_ON_ALL};
    struct dataset_texts dt;
    int rc = dataset_load_format(&dt, r->dataset.path, &f, limit, err);
    if (rc == 0)
        dataset_texts_release(&dt);
    return rc;
}

int data_validate(const struct recipe *r, struct moai_err *err)
{
    struct dataset_template t;
    struct dataset_texts dt;
    int64_t limit = r->dataset.limit;
    int rc;

    if (limit == RECIPE_NONE || limit > DATA_VALIDATE_RECORDS)
        limit = DATA_VALIDATE_RECORDS;
    if (r->dataset.format != RECIPE_FORMAT_TEXT)
        return validate_records(r, limit, err);
    /* the template and response_start first: their errors are the recipe's */
    if ((rc = dataset_template_parse(&t, r->dataset.template, r->dataset.response_start, err)) < 0)
        return moai_err_prefix(err, "%s", r->source);
    dataset_template_release(&t);
    rc = dataset_load(&dt, r->dataset.path, r->dataset.template, r->dataset.response_start, limit,
                      err);
    if (rc == 0)
        dataset_texts_release(&dt);
    return rc;
}
