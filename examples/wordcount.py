"""Word counts over a directory of text files, fanned out to the workers, merged by a reduce.

Each work item is a file's path (the file itself never travels through Redis);
each worker counts the words of its files; the reduce, run once on a worker,
merges the counts.  Start workers that know these tasks, then run it::

    fanout worker --import examples.wordcount &
    python -m examples.wordcount /usr/share/common-licenses

Workers on other machines need the files at the same paths (a shared
directory), or items that are URLs they can read.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import fanout

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


@fanout.task(name="examples.wordcount.count_words", label=str)
def count_words(path: str, lowercase: bool = True) -> dict[str, int]:
    """How often each word occurs in the UTF-8 text file at ``path``."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return dict(Counter(WORD.findall(text.lower() if lowercase else text)))


@fanout.task(name="examples.wordcount.merge_counts")
def merge_counts(
    results: list[dict[str, int] | None], errors: list[dict[str, Any]], top: int = 10
) -> dict[str, Any]:
    """The reduce: all files' counts merged; the ``top`` most common words and the totals."""
    merged: Counter[str] = Counter()
    for counts in results:
        if counts:
            merged.update(counts)
    return {
        "files": len(results) - len(errors),
        "words": sum(merged.values()),
        "distinct": len(merged),
        "top": merged.most_common(top),
        "unreadable": [e["input"] for e in errors],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m examples.wordcount DIRECTORY", file=sys.stderr)
        return 2
    paths = sorted(str(p) for p in Path(argv[0]).resolve().rglob("*") if p.is_file())
    outcome = fanout.map(count_words, paths, reduce=merge_counts, reduce_kwargs={"top": 10}, timeout=600)
    summary = outcome.reduced
    print(f"{summary['files']} files, {summary['words']} words ({summary['distinct']} distinct)")
    for word, count in summary["top"]:
        print(f"{count:>8}  {word}")
    for failure in outcome.errors:
        print(f"could not read {failure.input}: {failure.error}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
