"""Figures of the [PM] experiment: alignment per layer (Fig. 2(b)), leading eigenvalues (Fig. 6),
cumulative products (Fig. 8) and the steering curve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def alignment(result, path: str | Path, *, title: str = "") -> Figure:
    """c vs c-bar, Delta vs Delta-bar (mean +- std over tokens) and p vs p-bar across layers ([PM] Fig. 2(b)).

    **Returns:** the figure drawn (written to `path`, closed).
    """
    m = result.metrics
    L = np.arange(1, len(m.c) + 1)
    fig, ax = subplots(3, 1, figsize=(6.5, 8), sharex=True)
    ax[0].errorbar(L, m.c, yerr=m.c_std, marker="o", capsize=3, color="C3", label="c (principal subspace)")
    ax[0].plot(L, m.c_bar, marker="s", ls="--", color="0.4", label="c-bar (all eigenvectors)")
    ax[0].set_ylabel("correlation c")
    ax[1].errorbar(L, m.delta, yerr=m.delta_std, marker="o", capsize=3, color="C0", label="Delta")
    ax[1].plot(L, m.delta_bar, marker="s", ls="--", color="0.4", label="Delta-bar")
    ax[1].axhline(0, color="k", lw=0.7)
    ax[1].set_ylabel("increment Delta")
    ax[2].plot(L, m.p, marker="o", color="C2", label="p = P(Delta > 0)")
    ax[2].plot(L, m.p_bar, marker="s", ls="--", color="0.4", label="p-bar")
    ax[2].axhline(0.5, color="k", lw=0.7, ls=":")
    ax[2].set_ylabel("probability")
    ax[2].set_xlabel("layer l")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax[2].set_xticks(L)
    fig.suptitle(title or f"{result.model}: alignment with v1(l), {result.samples} x {result.tokens} tokens", fontsize=10)
    return save(fig, path)


def eigenvalues(result, path: str | Path, *, title: str = "") -> Figure:
    """Real parts and moduli of the leading eigenvalues of each layer matrix ([PM] Fig. 6).

    **Returns:** the figure drawn (written to `path`, closed).
    """
    ev = result.metrics.eigenvalues
    L = np.arange(1, ev.shape[0] + 1)
    fig, (a1, a2) = subplots(1, 2, figsize=(11, 4))
    for k in range(ev.shape[1]):
        a1.plot(L, ev[:, k].real, marker="o", ms=4, label=f"Re lambda_{k + 1}")
        a2.plot(L, np.abs(ev[:, k]), marker="o", ms=4, label=f"|lambda_{k + 1}|")
    a1.set_ylabel("real part")
    a2.set_ylabel("modulus")
    for a in (a1, a2):
        a.set_xlabel("layer l")
        a.set_xticks(L)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title or f"{result.model}: leading eigenvalues of W_l (order: {result.order})", fontsize=10)
    return save(fig, path)


def cumulative(result, path: str | Path, *, title: str = "") -> Figure:
    """Alignment with the principal eigenvector of W_l ... W_1 vs the all-eigenvector mean ([PM] Fig. 8).

    **Returns:** the figure drawn (written to `path`, closed).
    """
    m = result.metrics
    L = np.arange(1, len(m.c) + 1)
    fig, ax = subplots(figsize=(6.5, 3.8))
    ax.plot(L, m.c_cum, marker="o", color="C4", label="|cos(x(l), principal eigvec of W_l...W_1)|")
    ax.plot(L, m.c_cum_bar, marker="s", ls="--", color="0.4", label="mean over all eigenvectors")
    ax.set_xlabel("layer l")
    ax.set_ylabel("correlation")
    ax.set_xticks(L)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{result.model}: cumulative products", fontsize=10)
    return save(fig, path)


def steering_curve(trace, path: str | Path, *, target: float = 0.99, title: str = "") -> Figure:
    """Final mean |cos(x, u)| against the steering gain gamma.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    g = np.array([t[0] for t in trace], float)
    c = np.array([t[1] for t in trace], float)
    fig, ax = subplots(figsize=(6.5, 3.8))
    pos = g > 0
    ax.semilogx(g[pos], c[pos], marker="o", color="C1", label="mean final |cos(x, u)|")
    if np.any(~pos):
        ax.axhline(c[~pos][0], color="0.5", ls=":", label=f"gamma = 0: {c[~pos][0]:.3f}")
    ax.axhline(target, color="crimson", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel("gain gamma")
    ax.set_ylabel("final |cos(x, u)|")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "steering the last layer toward u", fontsize=10)
    return save(fig, path)
