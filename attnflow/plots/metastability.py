"""Figures of metastability: the energy staircase, dwell times against beta, and phase diagrams."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def staircase(result, path: str | Path, *, tokens: int, beta: float, members: int = 4) -> Figure:
    """Energy and cluster count against time for the traced members of one (n, beta), with the episodes shaded.

    **Arguments:** `result` a :class:`~attnflow.analysis.metastability.MetastabilityResult`; `path` the PNG.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    j = int(np.argmin(np.abs(np.asarray(result.betas) - beta)))
    ser, ep = result.series[tokens], result.episodes[tokens]
    if ser is None:
        raise ValueError("the study kept no readings (trace = 0)")
    t = np.asarray(ser.t)
    E, K = np.asarray(ser.energy)[j], np.asarray(ser.count)[j]
    m = min(members, E.shape[1])
    fig, (a1, a2) = subplots(2, 1, figsize=(9, 6), sharex=True)
    for b in range(m):
        a1.plot(t, E[:, b], lw=1.3, color=f"C{b}", label=f"member {b}")
        a2.step(t, K[:, b], where="post", lw=1.3, color=f"C{b}")
        num = min(int(ep.num[j, b]), ep.entry.shape[-1])
        for e in range(num):
            lo, hi = float(ep.entry[j, b, e]), float(ep.exit[j, b, e])
            a2.axvspan(lo, hi if np.isfinite(hi) else t[-1], color=f"C{b}", alpha=0.08)
    a1.set_ylabel("energy E")
    a1.set_title(f"metastable staircase: n = {tokens}, beta = {result.betas[j]:g} (episodes shaded)", fontsize=10)
    a1.legend(fontsize=8)
    a2.set_ylabel("clusters")
    a2.set_yscale("log")
    a2.set_xlabel("time t")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def dwell_vs_beta(result, path: str | Path, *, tokens: int) -> Figure:
    """Median dwell time per cluster count against beta (log axis), with 95% intervals, lower bounds (open
    triangles: the run ended first) and the fitted exponential rates.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    fig, ax = subplots(figsize=(7, 4.5))
    cells = [c for c in result.cells if c.tokens == tokens]
    counts = sorted({k for c in cells for k in c.dwell})
    for i, k in enumerate(counts):
        col = f"C{i}"
        bk = [(c.beta, c.dwell[k]) for c in cells if k in c.dwell]
        known = [(b, m) for b, m in bk if m.known]
        bound = [(b, m) for b, m in bk if not m.known]
        if known:
            b = np.array([x[0] for x in known])
            v = np.array([x[1].value for x in known])
            lo = np.array([x[1].lo for x in known])
            hi = np.array([x[1].hi if np.isfinite(x[1].hi) else x[1].value * 10 for x in known])
            ax.errorbar(b, v, yerr=[v - lo, hi - v], fmt="o", color=col, capsize=3, label=f"{k} clusters")
        if bound:
            ax.plot([x[0] for x in bound], [x[1].value for x in bound], "^", mfc="none", color=col,
                    label=f"{k} clusters: > (run ended)")
        r = result.rates.get((tokens, k))
        if r is not None:
            bb = np.linspace(min(r.betas), max(r.betas), 50)
            ax.plot(bb, np.exp(r.intercept + r.rate * bb), "-", color=col, lw=1,
                    label=f"fit: rate {r.rate:.2f} [{r.lo:.2f}, {r.hi:.2f}]")
    ax.set_yscale("log")
    ax.set_xlabel("beta")
    ax.set_ylabel("median dwell time")
    ax.set_title(f"dwell times, n = {tokens}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if counts:  # no plateau of two clusters or more: nothing to name
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def first_counts(result, path: str | Path, *, tokens: int) -> Figure:
    """The distribution of the cluster count at the first plateau per beta, with Wilson intervals and, on the
    circle, the fastest linear mode k*.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    cells = [c for c in result.cells if c.tokens == tokens]
    fig, ax = subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(cells), 1)
    for i, c in enumerate(cells):
        ks = sorted(c.first_counts)
        f = np.array([c.first_counts[k][1] for k in ks])
        lo = np.array([c.first_counts[k][2] for k in ks])
        hi = np.array([c.first_counts[k][3] for k in ks])
        x = np.array(ks) + (i - (len(cells) - 1) / 2) * width
        label = f"beta = {c.beta:g}" + (f" (k* = {c.k_star})" if c.k_star is not None else "")
        ax.bar(x, f, width, yerr=[f - lo, hi - f], capsize=2, color=f"C{i}", label=label)
    ax.set_xlabel("clusters at the first plateau")
    ax.set_ylabel("fraction of members")
    ax.set_title(f"first plateau, n = {tokens}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def phase(diagram, path: str | Path) -> Figure:
    """Heatmaps of the pair fraction and the cluster count of a
    :class:`~attnflow.analysis.metastability.PhaseDiagram`.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    fig, axes = subplots(1, 2, figsize=(12, 4.5))
    cols = np.asarray(diagram.cols, float)
    rows = np.asarray(diagram.rows, float)
    for ax, z, name in ((axes[0], diagram.pairs, f"pairs with cos > 1 - {diagram.eps:g}"),
                        (axes[1], diagram.clusters, "clusters")):
        im = ax.pcolormesh(_edges(cols), _edges(rows), np.asarray(z), cmap="viridis", shading="flat",
                           norm=None if name != "clusters" else _lognorm(z))
        fig.colorbar(im, ax=ax)
        ax.set_xlabel(diagram.col_name)
        ax.set_ylabel(diagram.row_name)
        at = "" if diagram.time is None else f" at t = {diagram.time:g}"
        ax.set_title(f"{name}{at} ({diagram.members} members)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _edges(v):
    """Cell edges around the values v (midpoints; the ends mirrored), so unevenly spaced values keep their places."""
    v = np.asarray(v, float)
    if len(v) == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def _lognorm(z):
    from matplotlib.colors import LogNorm

    z = np.asarray(z, float)
    return LogNorm(vmin=max(np.nanmin(z), 1.0), vmax=max(np.nanmax(z), 1.0 + 1e-9))
