/* yamltree.h - a small editable YAML node tree with source positions, built with libyaml.
 *
 * libyaml's document API gives a read-only graph; recipes need a tree that --set overrides
 * can edit and whose every node remembers where it came from ("recipe.yaml", line 7, column
 * 3, or "--set training.batch_size=64") so that errors point at it.
 *
 *     struct ynode *root;
 *     if (ytree_parse(&root, text, len, "recipe.yaml", &err) < 0) ...
 *     const struct ynode *v = ynode_get(root, "training");
 *     ynode_free(root);
 *
 * Ownership: a tree owns its nodes and strings; source names are copied into each node.
 * Limits: depth 64 and 100,000 nodes (aliases expanded), so hostile input cannot blow up.
 * Errors: MOAI_EUSAGE with "source:line:col: invalid YAML: <libyaml's problem>".
 */
#ifndef MOAI_YAMLTREE_H
#define MOAI_YAMLTREE_H

#include "err.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

enum ynode_kind {
    YNODE_SCALAR,
    YNODE_MAP,
    YNODE_SEQ,
};

struct ynode {
    enum ynode_kind kind;
    char *value;          /* scalar text (NUL-terminated), NULL for maps and sequences */
    bool quoted;          /* a quoted or block scalar: always a string, never a number */
    int line, col;        /* 1-based; 0 when the node came from the command line */
    char *source;         /* "recipe.yaml", "<stdin>", "--set KEY=VALUE" */
    struct ynode **keys;  /* map: key scalars, n of them */
    struct ynode **items; /* map: values; seq: items */
    size_t n;
};

/* Parses one YAML document. An empty document gives *root = NULL and returns 0. */
int ytree_parse(struct ynode **root, const char *text, size_t len, const char *source,
                struct moai_err *err);

/* Same; positions false leaves line and column out of error messages (for text that came
 * from the command line, where they mean little). */
int ytree_parse_opt(struct ynode **root, const char *text, size_t len, const char *source,
                    bool positions, struct moai_err *err);

void ynode_free(struct ynode *n);

/* The value of key in map n, or NULL (n may be NULL or not a map). */
struct ynode *ynode_get(const struct ynode *n, const char *key);

/* Writes "source:line:col" (or "source" when line is 0) into buf. Returns buf. */
const char *ynode_where(const struct ynode *n, char *buf, size_t size);

/* A plain scalar that YAML reads as null ("", "~", "null", "Null", "NULL"). */
bool ynode_is_null(const struct ynode *n);

/* Sets map[key] = value (taking ownership of value), creating the key when absent.
 * Returns 0, or -1 when map is not a map (value is then freed). */
int ynode_set(struct ynode *map, const char *key, struct ynode *value, const char *source);

/* A new empty map tagged with source. NULL when out of memory. */
struct ynode *ynode_new_map(const char *source);

/* Converts a node to JSON with YAML's core-schema typing of plain scalars (null, bool, int,
 * float, else string); quoted scalars stay strings. New reference, NULL on allocation failure. */
json_t *ynode_to_json(const struct ynode *n);

#endif
