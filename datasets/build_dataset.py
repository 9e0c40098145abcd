#!/usr/bin/env python3
"""build_dataset.py - Debian's English package descriptions as summarization records (JSON Lines).

Reads apt's Translation-en lists (already decompressed, given as text files or '-' for
standard input, in the order given) and writes one JSON object per line on standard output:

    {"package": "0ad", "article": "<long description>", "highlights": "<synopsis>"}

The article is the long description: continuation lines with their leading space removed,
joined with single spaces within a paragraph; paragraphs (split at " .") are separated by a
blank line; verbatim lines (two leading spaces) keep their own line. Records whose article has
fewer than MIN_WORDS words are dropped; the first description seen for a package wins; output
is sorted by package name. Standard library only; output depends only on the input bytes.
"""
import json
import sys

MIN_WORDS = 40


def stanzas(lines):
    """Yields (package, synopsis, [continuation lines]) for each stanza."""
    pkg, syn, cont, in_desc = None, None, [], False
    for raw in lines:
        line = raw.rstrip("\n")
        if line == "":
            if pkg is not None and syn is not None:
                yield pkg, syn, cont
            pkg, syn, cont, in_desc = None, None, [], False
        elif line.startswith(" ") or line.startswith("\t"):
            if in_desc:
                cont.append(line)
        else:
            in_desc = False
            key, _, value = line.partition(":")
            if key == "Package":
                pkg = value.strip()
            elif key.startswith("Description-"):
                syn = value.strip()
                in_desc = True
    if pkg is not None and syn is not None:
        yield pkg, syn, cont


def article(cont):
    """The long description as text: paragraphs joined by a blank line."""
    paragraphs, units, words = [], [], []

    def end_words():
        if words:
            units.append(" ".join(words))
            words.clear()

    def end_paragraph():
        end_words()
        if units:
            paragraphs.append("\n".join(units))
            units.clear()

    for line in cont:
        body = line[1:].rstrip()
        if body == ".":
            end_paragraph()
        elif line.startswith("  ") or line.startswith(" \t"):
            end_words()
            units.append(body)
        elif body:
            words.append(body.strip())
    end_paragraph()
    return "\n\n".join(paragraphs)


def main(paths):
    seen = {}
    for path in paths:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")
        with f:
            for pkg, syn, cont in stanzas(f):
                if pkg in seen:
                    continue
                text = article(cont)
                seen[pkg] = (text, syn) if len(text.split()) >= MIN_WORDS else None
    out = sys.stdout
    n = 0
    for pkg in sorted(seen):
        if seen[pkg] is None:
            continue
        text, syn = seen[pkg]
        rec = {"package": pkg, "article": text, "highlights": syn}
        out.write(json.dumps(rec, ensure_ascii=False, separators=(", ", ": ")) + "\n")
        n += 1
    print(f"build_dataset.py: {n} records", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
