"""Figures of trajectories: tokens on the sphere (d = 3) and pairwise cosines over time (any d)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import save  # noqa: E402


def _sphere_wireframe(ax):
    u, v = np.mgrid[0 : 2 * np.pi : 30j, 0 : np.pi : 15j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)


def sphere_trajectories(trajectory, path: str | Path, *, title: str = "", members: int = 4) -> Path:
    """Token paths on the unit sphere for the first few ensemble members.

    **Arguments:** `trajectory` ``(s, b, n, 3)``; `path` the PNG to write.
    """
    traj = np.asarray(trajectory)
    if traj.ndim != 4 or traj.shape[-1] != 3:
        raise ValueError(f"sphere_trajectories needs (steps, batch, tokens, 3), got {traj.shape}")
    m = min(members, traj.shape[1])
    fig = plt.figure(figsize=(4.2 * m, 4.4))
    for b in range(m):
        ax = fig.add_subplot(1, m, b + 1, projection="3d")
        _sphere_wireframe(ax)
        colors = plt.cm.viridis(np.linspace(0, 1, traj.shape[2]))
        for i in range(traj.shape[2]):
            p = traj[:, b, i]
            ax.plot(p[:, 0], p[:, 1], p[:, 2], color=colors[i], linewidth=1.0)
            ax.scatter(*p[0], color=colors[i], marker="o", s=12, alpha=0.5)
            ax.scatter(*p[-1], color="crimson", marker="*", s=60)
        ax.set_box_aspect((1, 1, 1))
        for setter in (ax.set_xticks, ax.set_yticks, ax.set_zticks):
            setter([-1, 0, 1])
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_zlabel("x3")
        ax.set_title(f"member {b} (o start, * end)", fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def pairwise_cosines(trajectory, ts, path: str | Path, *, member: int = 0, title: str = "") -> Path:
    """All pairwise cosines <x_i, x_j>/(|x_i||x_j|) of one ensemble member against time.

    **Arguments:** `trajectory` ``(s, b, n, d)``; `ts` ``(s,)``; `path` the PNG to write.
    """
    traj = np.asarray(trajectory)[:, member]
    X = traj / np.linalg.norm(traj, axis=-1, keepdims=True)
    G = np.einsum("sid,sjd->sij", X, X)
    iu = np.triu_indices(X.shape[1], 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(iu[0]):
        ax.plot(np.asarray(ts), G[:, iu[0], iu[1]], linewidth=0.8, alpha=0.7)
    ax.set_xlabel("step" if np.allclose(np.asarray(ts), np.round(ts)) else "time t")
    ax.set_ylabel("cos(x_i, x_j)")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"pairwise cosines, member {member} ({len(iu[0])} pairs)")
    return save(fig, path)
