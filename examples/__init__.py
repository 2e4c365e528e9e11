"""Runnable examples of fanout's public API (``python -m examples.wordcount DIR``)."""
