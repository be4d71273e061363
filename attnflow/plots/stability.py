"""Figures of stability: intrinsic spectra in the complex plane, continuation diagrams."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import save  # noqa: E402


def spectra(entries, path, *, discrete: bool, title: str = "") -> Path:
    """Eigenvalues of several equilibria. `entries`: list of (label, eigenvalues, stable)."""
    k = len(entries)
    cols = min(k, 4)
    rows = int(np.ceil(k / cols)) if k else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    for ax, (label, eigs, stable) in zip(axes.ravel(), entries):
        eigs = np.asarray(eigs)
        if discrete:
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(np.cos(t), np.sin(t), color="0.6", lw=0.8)
            ax.set_aspect("equal", adjustable="datalim")
        else:
            ax.axvline(0, color="0.6", lw=0.8)
        ax.scatter(eigs.real, eigs.imag, s=18, color="tab:green" if stable else "tab:red")
        ax.set_title(f"{label}\n{'stable' if stable else 'not stable'}", fontsize=8)
        ax.set_xlabel("Re")
        ax.set_ylabel("Im")
        ax.grid(alpha=0.3)
    fig.suptitle(title or ("intrinsic spectra (unit circle = stability boundary)" if discrete else "intrinsic spectra (Re = 0 is the boundary)"))
    return save(fig, path)


def continuation(branch, path, *, label: str = "") -> Path:
    """Stability measure along a continuation branch, stable parts green, switches marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    v, m = branch.values, branch.measure
    st = branch.verdict == 0
    ax.plot(v, m, color="0.7", lw=1)
    ax.scatter(v[st], m[st], color="tab:green", s=14, label="stable")
    ax.scatter(v[~st], m[~st], color="tab:red", s=14, label="not stable")
    ax.axhline(1.0 if branch.discrete else 0.0, color="k", ls=":", lw=0.8)
    for c in branch.changes:
        ax.axvline(c, color="tab:purple", ls="--", lw=1)
        ax.annotate(f"{branch.param} = {c:.4g}", (c, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel(branch.param)
    ax.set_ylabel("spectral radius" if branch.discrete else "max Re eigenvalue")
    ax.set_title(label or "continuation")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)
