"""The PNG plot: items/s against N for per-item and batched doubling (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.suite import Figure


def plot(figures: Sequence[Figure], path: Path, title: str) -> Path | None:
    """Draw the doubling curves to ``path``; None if matplotlib is not installed or nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = ("double, one task per item", "double, batched (auto)")
    if not any(f.name in names for f in figures):
        return None  # no doubling suite in this run: nothing to draw
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, marker in zip(names, ("o", "s"), strict=True):
        points = sorted((f for f in figures if f.name == name), key=lambda f: f.n)
        if not points:
            continue
        xs = [f.n for f in points]
        ys = [f.median for f in points]
        low = [f.median - min(f.rates) for f in points]
        high = [max(f.rates) - f.median for f in points]
        ax.errorbar(xs, ys, yerr=[low, high], marker=marker, capsize=3, label=f"fanout: {name}")
        refs = [f for f in points if f.reference_rates]
        if refs:
            ax.plot(
                [f.n for f in refs],
                [f.reference_median for f in refs],
                marker=marker,
                linestyle=":",
                color="grey",
                # The reference's name without its per-N parameters ("chunks(1,000)").
                label=f"reference: {refs[0].reference.split('(')[0]}",
            )
        dask = [f for f in points if f.dask_rates]
        if dask:
            ax.plot(
                [f.n for f in dask],
                [f.dask_median for f in dask],
                marker=marker,
                linestyle="--",
                color="tab:orange",
                label=f"Dask LocalCluster, client.map: {name.split(',')[1].strip()}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items (N)")
    ax.set_ylabel("items/s (median, min-max bars)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
