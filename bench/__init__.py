"""fanout's benchmark suite: ``python -m bench --help``.

Benchmarks measure speed; the test suite never does (no timed assertions there).
"""
