"""Figures: matplotlib is imported only inside this package."""

from __future__ import annotations

from pathlib import Path


def save(fig, path) -> Path:
    """Lay out, write (110 dpi) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
