"""Figures of energies and entropy along trajectories, per-head contributions, and T_eps(beta)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import crop_time, save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _xlabel(ts):
    return "layer step k" if np.allclose(ts, np.round(ts)) and len(ts) > 1 and np.all(np.diff(ts) >= 1) else "time t"


def energy_entropy(trace, path: str | Path, *, member: int = 0, title: str = "") -> Figure:
    """Total energy E and mean attention entropy of one member along its trajectory.

    **Arguments:** `trace` an :class:`~attnflow.analysis.energy.EnergyTrace`; `path` the PNG to write.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    ts = np.asarray(trace.ts)
    E = np.asarray(trace.energy)[:, member]
    S = np.asarray(trace.entropy)[:, member]
    n = np.asarray(trace.head_entropy).shape[-1]
    fig, (a1, a2) = subplots(1, 2, figsize=(11, 4))
    a1.plot(ts, E, color="C0", lw=1.6, label="E = sum_h E_h")
    k = int(np.asarray(trace.first_violation)[member])
    if k >= 0:
        a1.axvline(ts[k], color="crimson", ls="--", lw=1, label=f"first decrease (t = {ts[k]:.3g})")
    a1.set_xlabel(_xlabel(ts))
    a1.set_ylabel("energy E")
    verdict = "monotone" if bool(np.asarray(trace.monotone)[member]) else f"NOT monotone (drop {float(trace.relative_drop[member]):.2e})"
    a1.set_title(f"energy, member {member}: {verdict}", fontsize=10)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.plot(ts, S, color="C2", lw=1.6, label="mean attention entropy")
    a2.axhline(np.log(n), color="0.5", ls=":", lw=1, label=f"log n = {np.log(n):.3f}")
    a2.set_xlabel(_xlabel(ts))
    a2.set_ylabel("entropy (nats)")
    a2.set_title("attention entropy", fontsize=10)
    show = [ts[k]] if k >= 0 else []
    for a in (a1, a2):  # the same window on both panels
        crop_time(a, ts, np.stack([E, S], axis=1), show=show)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def head_contributions(trace, path: str | Path, *, member: int = 0, title: str = "") -> Figure:
    """Per-head energies E_h and (flows) the split of each dE_h/dt into own gradient part, cross-head terms and
    radial shadow terms.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    ts = np.asarray(trace.ts)
    Eh = np.asarray(trace.head_energy)[:, member]
    H = Eh.shape[1]
    flow = not np.all(np.isnan(np.asarray(trace.head_rate)))
    ncol = 2 if flow else 1
    fig, axes = subplots(1, ncol, figsize=(5.5 * ncol, 4), squeeze=False)
    a1 = axes[0, 0]
    for h in range(H):
        ok = bool(np.asarray(trace.head_monotone)[member, h])
        a1.plot(ts, Eh[:, h], lw=1.4, label=f"E_{h}" + ("" if ok else " (decreases)"))
    a1.set_xlabel(_xlabel(ts))
    a1.set_ylabel("per-head energy E_h")
    a1.set_title("per-head energies", fontsize=10)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    if flow:
        a2 = axes[0, 1]
        tf = np.asarray(trace.terms_flat)[:, member]
        tr = np.asarray(trace.terms_radial)[:, member]
        for h in range(H):
            own = tf[:, h, h] + tr[:, h, h]
            cross = tf[:, h].sum(-1) - tf[:, h, h]
            shadow = tr[:, h].sum(-1) - tr[:, h, h]
            c = f"C{h}"
            a2.plot(ts, own, color=c, lw=1.4, label=f"head {h}: own gradient part")
            if H > 1:
                a2.plot(ts, cross, color=c, lw=1.2, ls="--", label=f"head {h}: cross-head")
                a2.plot(ts, shadow, color=c, lw=1.2, ls=":", label=f"head {h}: radial shadow")
        a2.axhline(0, color="k", lw=0.6)
        a2.set_xlabel(_xlabel(ts))
        a2.set_ylabel("contribution to dE_h/dt")
        a2.set_title("decomposition of dE_h/dt", fontsize=10)
        a2.grid(alpha=0.3)
        a2.legend(fontsize=7, ncol=1 if H < 3 else 2)
    for a in axes[0]:  # the same window on every panel
        crop_time(a, ts, Eh)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def clustering_time(
    betas, T, beta_c: float, path: str | Path, *, eps: float, rho0: float, n: int, simulated=None, speed_ratio=None, title: str = ""
) -> Figure:
    """T_eps(beta) of the equiangular reduction on a log scale, with beta_c marked.

    **Arguments:** `betas`, `T` ``(p,)``; `beta_c`; `path`; `eps`, `rho0`, `n` for the labels;
    `simulated` optional ``(betas, T)`` from full simulations, drawn as markers; `speed_ratio` optional ``(p,)``
    F(rho0; beta)/F(rho0; 0), drawn on a second axis with its critical level n/(2(n-1)).

    **Returns:** the figure drawn (written to `path`, closed).
    """
    betas = np.asarray(betas, float)
    T = np.asarray(T, float)
    fig, ax = subplots(figsize=(7, 4.2))
    ax.semilogy(betas, T, color="C0", lw=1.8, label="reduced ODE")
    if simulated is not None:
        ax.semilogy(np.asarray(simulated[0]), np.asarray(simulated[1]), "o", color="C1", ms=4, label="full simulation")
    ax.axvline(beta_c, color="crimson", ls="--", lw=1.2, label=f"beta_c = {beta_c:.4g}")
    ax.set_xlabel("inverse temperature beta")
    ax.set_ylabel(f"clustering time T_eps (eps = {eps:g})")
    ax.set_title(title or f"equiangular start rho0 = {rho0:g}, n = {n}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if speed_ratio is not None:
        ax2 = ax.twinx()
        ax2.plot(betas, np.asarray(speed_ratio), color="C2", lw=1.2, ls="-.", label="initial speed / its beta->0 value")
        ax2.axhline(n / (2 * (n - 1)), color="C2", lw=0.8, ls=":", label="critical level n/(2(n-1))")
        ax2.set_ylabel("initial clustering speed ratio", color="C2")
        ax2.set_ylim(0, 1.05)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    return save(fig, path)
