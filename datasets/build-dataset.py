#!/usr/bin/env python3
"""Builds the Debian package description dataset (JSON Lines on standard output).

Reads the Translation-en lists that `apt-get update -o Acquire::Languages=en` leaves under
/var/lib/apt/lists/ (decompressed with apt-helper) and writes one JSON object per package,
sorted by package name:

    {"package": NAME, "article": LONG DESCRIPTION, "highlights": SYNOPSIS}

The long description keeps its paragraphs: continuation lines lose their leading space and are
joined with single spaces, a " ." line ends a paragraph (paragraphs are separated by a blank
line), and lines indented by two or more spaces (Debian's verbatim lines) stay lines of their
own. Records whose article has fewer than 40 words are dropped; a package listed twice keeps
its first description in the sorted order of the lists. The same lists give the same bytes.
"""
import glob
import json
import subprocess
import sys

MIN_WORDS = 40


def read_lists(paths):
    for path in paths:
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True,
                              capture_output=True).stdout.decode("utf-8", "replace")
        yield from text.split("\n\n")


def article_of(lines):
    """The long description: paragraphs joined by blank lines, verbatim lines kept."""
    paragraphs, current = [], ""
    for line in lines:
        body = line[1:]
        if body.strip() == ".":
            paragraphs.append(current)
            current = ""
        elif body.startswith(" "):
            if current and not current.endswith("\n"):
                current += "\n"
            current += body.rstrip() + "\n"
        else:
            if current and not current.endswith("\n"):
                current += " "
            current += body.strip()
    paragraphs.append(current)
    return "\n\n".join(p.strip("\n") for p in paragraphs if p.strip())


def parse(stanza):
    package, synopsis, body, in_desc = None, None, [], False
    for line in stanza.split("\n"):
        if line.startswith("Package: "):
            package, in_desc = line[len("Package: "):].strip(), False
        elif line.startswith("Description-en: "):
            synopsis, in_desc = line[len("Description-en: "):].strip(), True
        elif line.startswith(" ") and in_desc:
            body.append(line)
        else:
            in_desc = False
    if not package or not synopsis:
        return None
    return package, synopsis, article_of(body)


def main():
    lists = sorted(glob.glob("/var/lib/apt/lists/*_i18n_Translation-en*"))
    if not lists:
        sys.exit("build-dataset: no Translation-en lists: run "
                 "'apt-get update -o Acquire::Languages=en' first")
    records = {}
    for stanza in read_lists(lists):
        parsed = parse(stanza)
        if not parsed:
            continue
        package, synopsis, article = parsed
        if package in records or len(article.split()) < MIN_WORDS:
            continue
        records[package] = {"package": package, "article": article, "highlights": synopsis}
    for package in sorted(records):
        sys.stdout.write(json.dumps(records[package], ensure_ascii=False) + "\n")
    print(f"build-dataset: {len(records)} records from {len(lists)} lists", file=sys.stderr)


if __name__ == "__main__":
    main()
