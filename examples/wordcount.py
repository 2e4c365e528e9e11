"""Word counts over lines of text, fanned out to the workers and folded as they go.

Each item is one line of text.  ``words`` splits a line into its words; the
task's fold, ``tally``, adds them to a ``Counter``: each batch of lines folds
into one partial count on its worker, and the partials are merged as they
arrive, one at a time (no process holds more than the running total and one
partial, however many lines there are).  Start workers that know the task,
then run it::

    fanout worker --import examples.wordcount &
    python -m examples.wordcount /usr/share/common-licenses/*      # or text on stdin

The answer is ``collections.Counter`` over the same lines, word for word.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import fanout

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def tally(counts: Counter[str], words: Iterable[str] | Mapping[str, int]) -> Counter[str]:
    """``words`` (a line's, or a partial's counts) added to ``counts``: the fold's step and its merge."""
    counts.update(words)
    return counts


@fanout.task(name="examples.wordcount.words", batch_size=20_000, fold=fanout.Fold(tally, initial=Counter))
def words(line: str, lowercase: bool = True) -> list[str]:
    """The words of one line of text."""
    return WORD.findall(line.lower() if lowercase else line)


def count_locally(lines: Iterable[str]) -> Counter[str]:
    """The same count in this process: what the fanned-out one must equal."""
    counts: Counter[str] = Counter()
    for line in lines:
        tally(counts, words(line))
    return counts


def read_lines(paths: list[str]) -> Iterator[str]:
    """The lines of the UTF-8 text files at ``paths`` (stdin for none), without their line ends."""
    if not paths:
        yield from (line.rstrip("\n") for line in sys.stdin)
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from (line.rstrip("\n") for line in fh)


def main(argv: list[str]) -> int:
    if any(arg.startswith("-") for arg in argv):
        print("usage: python -m examples.wordcount [FILE...]   (stdin without files)", file=sys.stderr)
        return 2
    outcome = fanout.map(words, read_lines([str(Path(p).resolve()) for p in argv]), timeout=600)
    if outcome.reduce_error:
        print(f"the count failed: {outcome.reduce_error}", file=sys.stderr)
        return 1
    counts = Counter(outcome.reduced)
    print(f"{outcome.total} lines, {sum(counts.values())} words ({len(counts)} distinct)")
    for word, count in counts.most_common(10):
        print(f"{count:>8}  {word}")
    for failure in outcome.errors:
        print(f"line {failure.index + 1}: {failure.error}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
