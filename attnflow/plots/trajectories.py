"""Figures of trajectories: tokens on the sphere (d = 3) and pairwise cosines over time (any d)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import crop_time, figure, save, subplots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _sphere_wireframe(ax):
    u, v = np.mgrid[0 : 2 * np.pi : 30j, 0 : np.pi : 15j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.88", linewidth=0.4)


def sphere_axes(ax, *, ticks: bool = True):
    """Equal-aspect 3D axes around the unit sphere, with a light wireframe drawn below everything else."""
    ax.computed_zorder = False
    _sphere_wireframe(ax)
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-1.05, 1.05)
    ax.set_box_aspect((1, 1, 1))
    for setter in (ax.set_xticks, ax.set_yticks, ax.set_zticks):
        setter([-1, 0, 1] if ticks else [])
    ax.set_xlabel("x1", labelpad=-8)
    ax.set_ylabel("x2", labelpad=-8)
    ax.set_zlabel("x3", labelpad=-8)
    ax.tick_params(labelsize=7, pad=-2)


def geodesic(points, per_segment: int = 12):
    """Points ``(s, 3)`` joined along great circles (``per_segment`` points between saves) instead of by chords.

    Points are normalised first, so a path of unnormalised states is drawn through their directions.
    """
    P = np.asarray(points, float)
    P = P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-300)
    if len(P) < 2:
        return P
    a, b = P[:-1], P[1:]
    cos = np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)
    om = np.arccos(cos)[:, None, None]
    s = np.linspace(0.0, 1.0, per_segment, endpoint=False)[None, :, None]
    small = om < 1e-6
    with np.errstate(invalid="ignore", divide="ignore"):
        w0 = np.where(small, 1 - s, np.sin((1 - s) * om) / np.sin(om))
        w1 = np.where(small, s, np.sin(s * om) / np.sin(om))
    seg = w0 * a[:, None] + w1 * b[:, None]
    seg = seg / np.maximum(np.linalg.norm(seg, axis=-1, keepdims=True), 1e-300)
    return np.concatenate([seg.reshape(-1, 3), P[-1:]], axis=0)


def sphere_trajectories(trajectory, path: str | Path, *, title: str = "", members: int = 4, select=None, titles=None) -> Figure:
    """Token paths on the unit sphere for a few ensemble members, drawn along great circles between saves.

    **Arguments:** `trajectory` ``(s, b, n, 3)``; `path` the PNG to write; `members` how many members (the first
    ones) when `select` is not given; `select` optional member indices to draw; `titles` optional one title per
    drawn member (e.g. the outcome's name).

    **Returns:** the figure drawn (written to `path`, closed).
    """
    import matplotlib

    traj = np.asarray(trajectory)
    if traj.ndim != 4 or traj.shape[-1] != 3:
        raise ValueError(f"sphere_trajectories needs (steps, batch, tokens, 3), got {traj.shape}")
    idx = list(range(min(members, traj.shape[1]))) if select is None else [int(i) for i in select]
    m = len(idx)
    fig = figure(figsize=(3.9 * m, 4.3))
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, traj.shape[2]))
    for j, b in enumerate(idx):
        ax = fig.add_subplot(1, m, j + 1, projection="3d")
        sphere_axes(ax)
        for i in range(traj.shape[2]):
            p = geodesic(traj[:, b, i])
            ax.plot(p[:, 0], p[:, 1], p[:, 2], color=colors[i], linewidth=1.0)
            ax.scatter(*p[0], color=colors[i], marker="o", s=12, alpha=0.6)
        with np.errstate(invalid="ignore", divide="ignore"):  # zero or non-finite tokens: not drawn
            end = traj[-1, b] / np.linalg.norm(traj[-1, b], axis=-1, keepdims=True)
        ax.scatter(*end.T, color="crimson", marker="*", s=70, depthshade=False, zorder=10)
        head = titles[j] if titles is not None else f"member {b}"
        ax.set_title(f"{head}\n(o start, * end)", fontsize=9)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def pairwise_cosines(trajectory, ts, path: str | Path, *, member: int = 0, title: str = "") -> Figure:
    """All pairwise cosines <x_i, x_j>/(|x_i||x_j|) of one ensemble member against time.

    The time axis is cropped to where the cosines change, and the figure says until when they stay flat.

    **Arguments:** `trajectory` ``(s, b, n, d)``; `ts` ``(s,)``; `path` the PNG to write.

    **Returns:** the figure drawn (written to `path`, closed).
    """
    traj = np.asarray(trajectory)[:, member]
    ts = np.asarray(ts, float)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # zero or non-finite tokens: gaps
        X = traj / np.linalg.norm(traj, axis=-1, keepdims=True)
        G = np.einsum("sid,sjd->sij", X, X)
    iu = np.triu_indices(X.shape[1], 1)
    fig, ax = subplots(figsize=(7, 4))
    C = G[:, iu[0], iu[1]]
    if len(iu[0]):
        ax.plot(ts, C, linewidth=0.8, alpha=0.7, marker="." if len(ts) < 30 else None, ms=3)
        crop_time(ax, ts, C)
    ax.set_xlabel("layer step k" if np.allclose(ts, np.round(ts)) else "time t")
    ax.set_ylabel("cos(x_i, x_j)")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"pairwise cosines, member {member} ({len(iu[0])} pairs)")
    return save(fig, path)
