"""``python -m bench.wordfold N``: the word-count fold over N lines, checked against ``collections.Counter``.

The client of ``bench.memory``'s fold row (``--job wordcount``): it passes a
*generator* of N lines to ``fanout.map(examples.wordcount.words, ...)``, whose
fold (a ``Counter``) runs on the workers, and checks the folded value against
the count made here, word for word.  It prints one JSON line (lines, words,
distinct, seconds, ok) and exits 0 only if the two counts are equal.

The lines: a pool of :data:`POOL` distinct lines of 4 to 12 words, drawn from a
vocabulary of :data:`VOCABULARY` made-up words with Zipf-like frequencies (as
natural text has: a few words very often, most rarely), and line ``i`` is pool
line ``(i * STRIDE) % POOL``.  So the local count is exact without running N lines
through a Counter here: each pool line's words times how often it occurs.  The
generator makes each line as it is asked for, so the client holds none of them.

``python -m bench.wordfold merge-cost P B`` times, in this process, what a callback
merging every partial itself would spend: P partials of B-line batches (20 distinct
ones, cycled), written as part files and merged one at a time, as
``workers.folding.merge_folded`` does with no running total.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

#: Distinct lines, and the distinct words they are made of.
POOL = 1 << 16
VOCABULARY = 50_000
#: Coprime with POOL: consecutive lines are far apart in the pool, as in a real text.
STRIDE = 40_503
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fi", "gu", "he", "jo", "bu")


def vocabulary(size: int = VOCABULARY) -> list[str]:
    """``size`` distinct made-up words of two to four syllables."""
    words: list[str] = []
    for length in (2, 3, 4):
        for combo in itertools.product(SYLLABLES, repeat=length):
            words.append("".join(combo))
            if len(words) == size:
                return words
    raise ValueError(f"no more than {len(words)} words")


def pool(size: int = POOL, seed: int = 19) -> list[str]:
    """``size`` lines of words drawn with Zipf-like weights (the k-th word ~ 1/k)."""
    rng = random.Random(seed)
    words = vocabulary()
    weights = list(itertools.accumulate(1 / (k + 1) for k in range(len(words))))
    return [" ".join(rng.choices(words, cum_weights=weights, k=rng.randint(4, 12))) for _ in range(size)]


def lines(n: int, table: list[str] | None = None) -> Iterator[str]:
    """Line ``i`` of ``n``: pool line ``(i * STRIDE) % POOL``, made as it is asked for."""
    table = table or pool()
    size = len(table)
    return (table[(i * STRIDE) % size] for i in range(n))


def expected(n: int, table: list[str] | None = None) -> Counter[str]:
    """``Counter`` of the words of the first ``n`` lines, from how often each pool line occurs."""
    from examples.wordcount import words

    table = table or pool()
    size = len(table)
    full, rest = divmod(n, size)
    times = Counter({k: full for k in range(size)}) if full else Counter[int]()
    times.update((i * STRIDE) % size for i in range(rest))
    counts: Counter[str] = Counter()
    for k, m in times.items():
        for word in words(table[k]):
            counts[word] += m
    return counts


def merge_cost(partials: int, batch: int) -> dict[str, Any]:
    """Seconds to merge ``partials`` partials of ``batch`` lines each from their files, and per partial."""
    import tempfile

    from examples.wordcount import words
    from workers import results
    from workers.core import json_problem
    from workers.fanin import run_batch
    from workers.folding import fold_part, merge_folded

    table, fold = pool(), words.fold
    assert fold is not None
    distinct = [
        fold_part(fold, run_batch(words, 0, list(lines(batch * (k + 1), table))[batch * k :]), json_problem)
        for k in range(20)
    ]
    with tempfile.TemporaryDirectory(prefix="fanout-foldcost-") as where:
        refs = [
            dict(results.write_part(where, {**distinct[i % 20], "start": i * batch})) for i in range(partials)
        ]
        started = time.perf_counter()
        merge_folded(
            refs, partials * batch, words.fold, lambda r: results.read_part(r["url"]), lambda f: None
        )
        seconds = time.perf_counter() - started
    return {
        "partials": partials,
        "batch": batch,
        "words_per_partial": round(sum(len(p["partial"]) for p in distinct) / 20),
        "seconds": round(seconds, 2),
        "ms_per_partial": round(seconds / partials * 1000, 2),
    }


def main(argv: list[str]) -> int:
    if argv and argv[0] == "merge-cost":
        print(json.dumps(merge_cost(int(argv[1]), int(argv[2]))))
        return 0
    import fanout
    from examples.wordcount import words

    n = int(argv[0].replace("_", ""))
    table = pool()
    started = time.perf_counter()
    outcome = fanout.map(words, lines(n, table), timeout=float(argv[1]) if len(argv) > 1 else 3600)
    seconds = time.perf_counter() - started
    folded = Counter(outcome.reduced or {})
    ok = outcome.ok and outcome.total == n and folded == expected(n, table)
    print(
        json.dumps(
            {
                "lines": n,
                "words": sum(folded.values()),
                "distinct": len(folded),
                "seconds": round(seconds, 2),
                "failed": outcome.failed,
                "reduce_error": outcome.reduce_error,
                "ok": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
