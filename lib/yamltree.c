/* yamltree.c - an editable YAML node tree with source positions (see yamltree.h). */
#include "yamltree.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#define YTREE_MAX_DEPTH 64
#define YTREE_MAX_NODES 100000

struct ybuild {
    yaml_document_t *doc;
    const char *source;
    size_t nodes;
    struct moai_err *err;
};

static struct ynode *ynode_alloc(enum ynode_kind kind, const char *source)
{
    struct ynode *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->kind = kind;
    n->source = strdup(source);
    if (!n->source) {
        free(n);
        return NULL;
    }
    return n;
}

struct ynode *ynode_new_map(const char *source)
{
    return ynode_alloc(YNODE_MAP, source);
}

void ynode_free(struct ynode *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->n; i++) {
        if (n->keys)
            ynode_free(n->keys[i]);
        ynode_free(n->items[i]);
    }
    free(n->keys);
    free(n->items);
    free(n->value);
    free(n->source);
    free(n);
}

static int ybuild_fail(struct ybuild *b, const yaml_node_t *yn, const char *what)
{
    return moai_err_set(b->err, MOAI_EUSAGE, "%s:%zu:%zu: %s", b->source, yn->start_mark.line + 1,
                        yn->start_mark.column + 1, what);
}

static int ybuild_node(struct ybuild *b, struct ynode **out, int index, int depth);

static int ybuild_append(struct ynode *n, struct ynode *key, struct ynode *item)
{
    struct ynode **items = realloc(n->items, (n->n + 1) * sizeof(*items));
    if (!items)
        return -1;
    n->items = items;
    if (n->kind == YNODE_MAP) {
        struct ynode **keys = realloc(n->keys, (n->n + 1) * sizeof(*keys));
        if (!keys)
            return -1;
        n->keys = keys;
        n->keys[n->n] = key;
    }
    n->items[n->n++] = item;
    return 0;
}

static int ybuild_nomem(struct ybuild *b)
{
    return moai_err_set(b->err, MOAI_ENOMEM, "%s: out of memory", b->source);
}

static int ybuild_scalar(struct ybuild *b, yaml_node_t *yn, struct ynode **out)
{
    struct ynode *n = ynode_alloc(YNODE_SCALAR, b->source);
    if (!n || !(n->value = strndup((const char *) yn->data.scalar.value, yn->data.scalar.length))) {
        ynode_free(n);
        return ybuild_nomem(b);
    }
    if (strlen(n->value) != yn->data.scalar.length) {
        ynode_free(n);
        return ybuild_fail(b, yn, "invalid YAML: NUL character in a scalar");
    }
    n->quoted = yn->data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
    *out = n;
    return 0;
}

static int ybuild_seq(struct ybuild *b, yaml_node_t *yn, int depth, struct ynode **out)
{
    struct ynode *n = ynode_alloc(YNODE_SEQ, b->source);
    if (!n)
        return ybuild_nomem(b);
    for (yaml_node_item_t *it = yn->data.sequence.items.start; it < yn->data.sequence.items.top;
         it++) {
        struct ynode *item;
        int rc = ybuild_node(b, &item, *it, depth + 1);
        if (rc < 0) {
            ynode_free(n);
            return rc;
        }
        if (ybuild_append(n, NULL, item) < 0) {
            ynode_free(item);
            ynode_free(n);
            return ybuild_nomem(b);
        }
    }
    *out = n;
    return 0;
}

/* The key of a pair of map n: a scalar not yet in n. */
static int ybuild_key(struct ybuild *b, const struct ynode *n, int index, int depth,
                      struct ynode **out)
{
    struct ynode *key;
    char where[512];
    int rc = ybuild_node(b, &key, index, depth);

    if (rc < 0)
        return rc;
    if (key->kind != YNODE_SCALAR)
        rc = moai_err_set(b->err, MOAI_EUSAGE, "%s: expected a plain key, found a %s",
                          ynode_where(key, where, sizeof(where)),
                          key->kind == YNODE_MAP ? "mapping" : "sequence");
    else if (ynode_get(n, key->value))
        rc = moai_err_set(b->err, MOAI_EUSAGE, "%s: duplicate key '%s'",
                          ynode_where(key, where, sizeof(where)), key->value);
    if (rc < 0) {
        ynode_free(key);
        return rc;
    }
    *out = key;
    return 0;
}

static int ybuild_map(struct ybuild *b, yaml_node_t *yn, int depth, struct ynode **out)
{
    struct ynode *n = ynode_alloc(YNODE_MAP, b->source);
    if (!n)
        return ybuild_nomem(b);
    for (yaml_node_pair_t *p = yn->data.mapping.pairs.start; p < yn->data.mapping.pairs.top; p++) {
        struct ynode *key, *val;
        int rc = ybuild_key(b, n, p->key, depth + 1, &key);
        if (rc < 0) {
            ynode_free(n);
            return rc;
        }
        if ((rc = ybuild_node(b, &val, p->value, depth + 1)) < 0) {
            ynode_free(key);
            ynode_free(n);
            return rc;
        }
        if (ybuild_append(n, key, val) < 0) {
            ynode_free(key);
            ynode_free(val);
            ynode_free(n);
            return ybuild_nomem(b);
        }
    }
    *out = n;
    return 0;
}

static int ybuild_node(struct ybuild *b, struct ynode **out, int index, int depth)
{
    yaml_node_t *yn = yaml_document_get_node(b->doc, index);
    int rc;

    *out = NULL;
    if (!yn)
        return moai_err_set(b->err, MOAI_EUSAGE, "%s: invalid YAML: dangling node", b->source);
    if (depth > YTREE_MAX_DEPTH)
        return ybuild_fail(b, yn, "invalid YAML: nested too deeply");
    if (++b->nodes > YTREE_MAX_NODES)
        return ybuild_fail(b, yn, "invalid YAML: too many nodes (aliases expanded)");

    switch (yn->type) {
    case YAML_SCALAR_NODE:
        rc = ybuild_scalar(b, yn, out);
        break;
    case YAML_SEQUENCE_NODE:
        rc = ybuild_seq(b, yn, depth, out);
        break;
    case YAML_MAPPING_NODE:
        rc = ybuild_map(b, yn, depth, out);
        break;
    default:
        return ybuild_fail(b, yn, "invalid YAML: empty node");
    }
    if (rc == 0) {
        (*out)->line = (int) yn->start_mark.line + 1;
        (*out)->col = (int) yn->start_mark.column + 1;
    }
    return rc;
}

int ytree_parse(struct ynode **root, const char *text, size_t len, const char *source,
                struct moai_err *err)
{
    return ytree_parse_opt(root, text, len, source, true, err);
}

/* "source:line:col" or "source" - where a libyaml problem is. */
static const char *mark_where(char *buf, size_t size, const char *source, const yaml_mark_t *m,
                              bool positions)
{
    if (positions)
        snprintf(buf, size, "%s:%zu:%zu", source, m->line + 1, m->column + 1);
    else
        snprintf(buf, size, "%s", source);
    return buf;
}

int ytree_parse_opt(struct ynode **root, const char *text, size_t len, const char *source,
                    bool positions, struct moai_err *err)
{
    char where[600];
    yaml_parser_t parser;
    yaml_document_t doc;
    int rc = 0;

    *root = NULL;
    if (!yaml_parser_initialize(&parser))
        return moai_err_set(err, MOAI_ENOMEM, "%s: out of memory", source);
    yaml_parser_set_input_string(&parser, (const unsigned char *) text, len);
    if (!yaml_parser_load(&parser, &doc)) {
        const yaml_mark_t *m = &parser.problem_mark;
        rc = moai_err_set(err, MOAI_EUSAGE, "%s: invalid YAML: %s%s%s",
                          mark_where(where, sizeof(where), source, m, positions),
                          parser.problem ? parser.problem : "error", parser.context ? " " : "",
                          parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        return rc;
    }
    if (yaml_document_get_root_node(&doc)) {
        struct ybuild b = {.doc = &doc, .source = source, .err = err};
        rc = ybuild_node(&b, root, 1, 0);
        /* A second document in the same stream is almost certainly a mistake. */
        if (rc == 0) {
            yaml_document_t next;
            if (!yaml_parser_load(&parser, &next)) {
                rc = moai_err_set(
                    err, MOAI_EUSAGE, "%s: invalid YAML: %s",
                    mark_where(where, sizeof(where), source, &parser.problem_mark, positions),
                    parser.problem ? parser.problem : "error");
            } else {
                if (yaml_document_get_root_node(&next))
                    rc = moai_err_set(err, MOAI_EUSAGE,
                                      "%s:%zu: expected one YAML document, found a second", source,
                                      next.start_mark.line + 1);
                yaml_document_delete(&next);
            }
            if (rc < 0) {
                ynode_free(*root);
                *root = NULL;
            }
        }
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return rc;
}

struct ynode *ynode_get(const struct ynode *n, const char *key)
{
    if (!n || n->kind != YNODE_MAP)
        return NULL;
    for (size_t i = 0; i < n->n; i++)
        if (strcmp(n->keys[i]->value, key) == 0)
            return n->items[i];
    return NULL;
}

const char *ynode_where(const struct ynode *n, char *buf, size_t size)
{
    if (n->line > 0)
        snprintf(buf, size, "%s:%d:%d", n->source, n->line, n->col);
    else
        snprintf(buf, size, "%s", n->source);
    return buf;
}

bool ynode_is_null(const struct ynode *n)
{
    if (!n || n->kind != YNODE_SCALAR || n->quoted)
        return false;
    const char *v = n->value;
    return !*v || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL");
}

int ynode_set(struct ynode *map, const char *key, struct ynode *value, const char *source)
{
    if (!map || map->kind != YNODE_MAP) {
        ynode_free(value);
        return -1;
    }
    for (size_t i = 0; i < map->n; i++) {
        if (strcmp(map->keys[i]->value, key) == 0) {
            ynode_free(map->items[i]);
            map->items[i] = value;
            return 0;
        }
    }
    struct ynode *k = ynode_alloc(YNODE_SCALAR, source);
    if (!k || !(k->value = strdup(key)) || ybuild_append(map, k, value) < 0) {
        ynode_free(k);
        ynode_free(value);
        return -1;
    }
    return 0;
}

static json_t *scalar_to_json(const struct ynode *n)
{
    const char *v = n->value;
    char *end;

    if (n->quoted)
        return json_string(v);
    if (ynode_is_null(n))
        return json_null();
    if (!strcmp(v, "true") || !strcmp(v, "True") || !strcmp(v, "TRUE"))
        return json_true();
    if (!strcmp(v, "false") || !strcmp(v, "False") || !strcmp(v, "FALSE"))
        return json_false();
    errno = 0;
    long long i = strtoll(v, &end, 10);
    if (*v && !*end && errno == 0)
        return json_integer(i);
    errno = 0;
    double d = strtod(v, &end);
    if (*v && !*end && errno == 0 && strpbrk(v, "0123456789"))
        return json_real(d);
    return json_string(v);
}

json_t *ynode_to_json(const struct ynode *n)
{
    json_t *j;

    switch (n->kind) {
    case YNODE_SCALAR:
        return scalar_to_json(n);
    case YNODE_SEQ:
        j = json_array();
        for (size_t i = 0; j && i < n->n; i++) {
            json_t *item = ynode_to_json(n->items[i]);
            if (!item || json_array_append_new(j, item) < 0) {
                json_decref(j);
                return NULL;
            }
        }
        return j;
    case YNODE_MAP:
        j = json_object();
        for (size_t i = 0; j && i < n->n; i++) {
            json_t *item = ynode_to_json(n->items[i]);
            if (!item || json_object_set_new(j, n->keys[i]->value, item) < 0) {
                json_decref(j);
                return NULL;
            }
        }
        return j;
    }
    return NULL;
}
