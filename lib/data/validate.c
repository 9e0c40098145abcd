/* validate.c - --validate's look at the data (see validate.h). */
#include "data/validate.h"

#include "data/dataset.h"

int data_validate(const struct recipe *r, struct moai_err *err)
{
    struct dataset_template t;
    struct dataset_texts dt;
    int64_t limit = r->dataset.limit;
    int rc;

    /* the template and response_start first: their errors are the recipe's */
    if ((rc = dataset_template_parse(&t, r->dataset.template, r->dataset.response_start, err)) < 0)
        return moai_err_prefix(err, "%s", r->source);
    dataset_template_release(&t);
    if (limit == RECIPE_NONE || limit > DATA_VALIDATE_RECORDS)
        limit = DATA_VALIDATE_RECORDS;
    rc = dataset_load(&dt, r->dataset.path, r->dataset.template, r->dataset.response_start, limit,
                      err);
    if (rc == 0)
        dataset_texts_release(&dt);
    return rc;
}
