"""Headless matplotlib for the PNGs dialogsum logs: one place that selects the Agg backend and saves figures."""

from __future__ import annotations

from pathlib import Path


def subplots(*args, **kwargs):
    """`plt.subplots` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    """Lay out, write and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
