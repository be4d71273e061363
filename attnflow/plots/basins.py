"""Figures of basin studies: fractions with intervals, continuation, final states on the sphere by label."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import save  # noqa: E402


def fractions(attractors, path, *, title: str = "", top: int = 12) -> Path:
    """Horizontal bars of basin fractions with 95% Wilson intervals."""
    a = attractors[:top]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(a) + 1.4))
    y = np.arange(len(a))[::-1]
    f = np.array([x["fraction"] for x in a])
    lo = f - np.array([x["ci95"][0] for x in a])
    hi = np.array([x["ci95"][1] for x in a]) - f
    ax.barh(y, f, xerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=3)
    ax.set_yticks(y, [x["label"] for x in a], fontsize=8)
    ax.set_xlabel("basin fraction (95% Wilson interval)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "basins of attraction")
    return save(fig, path)


def continuation(cont, path, *, title: str = "") -> Path:
    """Stacked basin fractions against the continued parameter."""
    fig, ax = plt.subplots(figsize=(7, 4))
    v = np.asarray(cont["values"])
    labels = list(cont["fractions"])
    ax.stackplot(v, *[cont["fractions"][lab] for lab in labels], labels=labels, alpha=0.85)
    ax.set_xlabel(cont["param"])
    ax.set_ylabel("basin fraction")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"basin fractions vs {cont['param']}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save(fig, path)


def sphere_by_label(finals, labels, path, *, max_points: int = 400) -> Path:
    """Final tokens (d = 3) on the sphere, coloured by the attractor label of their sample."""
    X = np.asarray(finals)[:max_points]
    labs = list(labels)[:max_points]
    fig = plt.figure(figsize=(6, 5.5))
    ax = fig.add_subplot(projection="3d")
    for i, lab in enumerate(dict.fromkeys(labs)):
        sel = np.array([x == lab for x in labs])
        P = X[sel].reshape(-1, 3)
        jit = P + 0.03 * np.random.default_rng(i).normal(size=P.shape)  # separate coincident tokens a little
        ax.scatter(*jit.T, s=6, label=lab, alpha=0.6)
    ax.set(xlabel="x1", ylabel="x2", zlabel="x3", title="final tokens by attractor (jittered)")
    ax.legend(fontsize=7, markerscale=2)
    return save(fig, path)
