"""Figures of stability: intrinsic spectra in the complex plane, continuation diagrams."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _margin(eigs, discrete: bool):
    """(measure, margin, the eigenvalue that sets it): spectral radius and 1 - rho for a map, max Re and -max Re
    for a flow."""
    if len(eigs) == 0:
        return np.nan, np.nan, 0j
    k = int(np.argmax(np.abs(eigs) if discrete else eigs.real))
    meas = float(np.abs(eigs[k]) if discrete else eigs[k].real)
    return meas, (1.0 - meas) if discrete else -meas, complex(eigs[k])


def spectra(entries, path: str | Path, *, discrete: bool, title: str = "") -> Figure:
    """Eigenvalues of several equilibria, zoomed on where they lie, with the stability margin printed.

    Each panel shows the eigenvalues together with the nearest part of the boundary (the unit circle for a map,
    Re = 0 for a flow), so a margin like 1 - 0.9967 stays visible; a small inset shows the whole unit circle with
    the zoomed window.

    **Arguments:** `entries` list of (label, eigenvalues, stable); `path` the PNG to write; `discrete` map or flow;
    `title`.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    from matplotlib.patches import Rectangle

    k = len(entries)
    cols = min(k, 4) or 1
    rows = int(np.ceil(k / cols)) if k else 1
    fig, axes = subplots(rows, cols, figsize=(3.7 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    t = np.linspace(0, 2 * np.pi, 4000)
    for ax, (label, eigs, stable) in zip(axes.ravel(), entries):
        eigs = np.asarray(eigs, complex)
        color = "tab:green" if stable else "tab:red"
        meas, margin, lam = _margin(eigs, discrete)
        if discrete:
            ax.plot(np.cos(t), np.sin(t), color="0.4", lw=0.9)
            edge = lam / abs(lam) if abs(lam) > 0 else 1.0 + 0j  # the boundary point nearest the leading eigenvalue
        else:
            ax.axvline(0, color="0.4", lw=0.9)
            edge = complex(0.0, lam.imag)
        ax.scatter(eigs.real, eigs.imag, s=16, color=color, zorder=3)
        if len(eigs):
            ax.plot([lam.real, edge.real], [lam.imag, edge.imag], color="k", lw=1.4, zorder=4)
            pts = np.concatenate([eigs, [edge]])
            lo = np.array([pts.real.min(), pts.imag.min()])
            hi = np.array([pts.real.max(), pts.imag.max()])
            pad = max(0.12 * float(np.max(hi - lo)), 2 * abs(margin) if np.isfinite(margin) else 0.0, 1e-3)
            c, half = (lo + hi) / 2, float(np.max(hi - lo)) / 2 + pad
            ax.set_xlim(c[0] - half, c[0] + half)
            ax.set_ylim(c[1] - half, c[1] + half)
            if discrete and half < 0.6:  # where the window sits on the whole circle
                ov = ax.inset_axes([0.02, 0.70, 0.28, 0.28])
                ov.plot(np.cos(t), np.sin(t), color="0.5", lw=0.6)
                ov.add_patch(Rectangle((c[0] - half, c[1] - half), 2 * half, 2 * half, fill=False, color="crimson", lw=0.8))
                ov.set_xlim(-1.2, 1.2)
                ov.set_ylim(-1.2, 1.2)
                ov.set_aspect("equal")
                ov.set_xticks([])
                ov.set_yticks([])
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        what = "rho" if discrete else "max Re"
        ax.set_title(f"{label}: {'stable' if stable else 'not stable'}\n{what} = {meas:.6g}, margin {margin:+.3g}", fontsize=8)
        ax.set_xlabel("Re", fontsize=8)
        ax.set_ylabel("Im", fontsize=8)
    fig.suptitle(title or ("intrinsic spectra, zoomed; black segment = margin 1 - rho to the unit circle (the stability boundary)"
                           if discrete else "intrinsic spectra, zoomed; black segment = margin -max Re to Re = 0 (the stability boundary)"),
                 fontsize=10)
    return save(fig, path)


def continuation(branch, path: str | Path, *, label: str = "") -> Figure:
    """Stability measure along a continuation branch, stable parts green, switches marked.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    fig, ax = subplots(figsize=(6.5, 4))
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
