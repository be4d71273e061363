"""Figures of basin studies: fractions with intervals, continuation, final states on the sphere by label."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import figure, save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def fractions(attractors, path: str | Path, *, title: str = "", top: int = 12) -> Figure:
    """Horizontal bars of basin fractions with 95% intervals, each fraction printed next to its bar.

    **Arguments:** `attractors` records with attributes ``name``, ``fraction`` and ``interval`` (lo, hi), such as
    the attractor records of a basin study's ``attractors`` (nothing else is read);
    `path` the PNG to write; `title`; `top` how many to draw (the first `top`, top to bottom).

    **Returns:** the figure drawn (written to `path`, closed): one bar per drawn record.
    """
    a = list(attractors)[:top]
    fig, ax = subplots(figsize=(7.5, 0.45 * len(a) + 1.4))
    y = np.arange(len(a))[::-1]
    f = np.array([float(x.fraction) for x in a])
    lo = f - np.array([float(x.interval[0]) for x in a])
    hi = np.array([float(x.interval[1]) for x in a]) - f
    ax.barh(y, f, xerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=3)
    for yi, fi, right in zip(y, f, f + hi):  # the fraction, printed right of its interval
        ax.text(min(right + 0.015, 0.9), yi, f"{fi:.3f}", va="center", fontsize=7, color="0.25")
    ax.set_yticks(y, [str(x.name) for x in a], fontsize=8)
    ax.set_xlabel("basin fraction (95% interval: Wilson, widened by the unclassified members)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "basins of attraction")
    return save(fig, path)


def continuation(cont, path: str | Path, *, title: str = "") -> Figure:
    """Stacked basin fractions against the continued parameter.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    fig, ax = subplots(figsize=(7, 4))
    v = np.asarray(cont.values)
    labels = list(cont.fractions)
    ax.stackplot(v, *[cont.fractions[lab] for lab in labels], labels=labels, alpha=0.85)
    ax.set_xlabel(cont.param)
    ax.set_ylabel("basin fraction")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"basin fractions vs {cont.param}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(fig, path)


def _groups(P, tol: float = 0.05):
    """Coincident points of ``(n, 3)`` merged: list of (mean point, multiplicity)."""
    out = []
    for p in P:
        for g in out:
            if np.linalg.norm(g[0] / g[1] - p) < tol:
                g[0] += p
                g[1] += 1
                break
        else:
            out.append([p.astype(float).copy(), 1])
    return [(s / np.linalg.norm(s), m) for s, m in out]


def sphere_by_label(finals, labels, path: str | Path, *, max_points: int = 400, panels: int = 6) -> Figure:
    """Final tokens (d = 3) on the sphere, one panel per attractor (the most frequent `panels`), equal aspect.

    Each panel draws the final tokens of up to 40 samples with that label as small dots, and one sample's tokens
    as large markers with the number of tokens that coincide there (e.g. a 3:7 split shows x3 and x7).

    **Arguments:** `finals` ``(m, n, 3)``; `labels` one name per sample; `path` the PNG to write; `max_points`
    how many samples to read; `panels` how many attractors to draw.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    from .trajectories import sphere_axes

    X = np.asarray(finals, float)[:max_points]
    with np.errstate(invalid="ignore", divide="ignore"):  # zero or non-finite tokens (degenerate): not drawn
        X = X / np.linalg.norm(X, axis=-1, keepdims=True)
    labs = list(labels)[: len(X)]
    names, counts = np.unique(np.array(labs, dtype=object), return_counts=True)
    order = [str(names[i]) for i in np.argsort(-counts, kind="stable")]
    count = dict(zip((str(n) for n in names), counts.tolist()))
    shown = order[:panels]
    cols = min(len(shown), 3) or 1
    rows = int(np.ceil(len(shown) / cols)) or 1
    fig = figure(figsize=(3.6 * cols, 4.0 * rows + 0.4))
    for j, lab in enumerate(shown):
        ax = fig.add_subplot(rows, cols, j + 1, projection="3d")
        sphere_axes(ax, ticks=False)
        sel = np.array([x == lab for x in labs])
        P = X[sel][:40]
        c = f"C{j % 10}"
        ax.scatter(*P.reshape(-1, 3).T, s=5, color=c, alpha=0.25, depthshade=False)
        for g, m in _groups(P[0]):
            ax.scatter(*g, s=40 + 12 * m, color=c, edgecolor="k", linewidth=0.6, depthshade=False, zorder=10)
            ax.text(*(1.22 * g), f"x{m}", fontsize=8, ha="center", va="center", zorder=11)
        ax.set_title(f"{lab}\n{count[lab]} of {len(labs)} samples", fontsize=9)
    more = len(order) - len(shown)
    fig.suptitle("final tokens by attractor (dots: up to 40 samples; markers: one sample, x = tokens there)"
                 + (f"; {more} rarer attractor{'s' if more > 1 else ''} not drawn" if more > 0 else ""), fontsize=9)
    return save(fig, path)
