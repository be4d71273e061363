"""Certified regions: balls around equilibria inside which a member's fate is decided before it converges.

A :class:`Regions` holds, for each of A unit axes v_a (eigenvectors of the layer matrix), a squared radius
``radius2[a, m]`` for the equilibria with m tokens at +v_a and n - m at -v_a (m = n: consensus on +v_a, m = 0:
consensus on -v_a, otherwise bipartite consensus), or a negative number where none is certified. A member X is in
region (a, m) when, assigning each token to the nearer of +v_a and -v_a, exactly m tokens go to +v_a and the squared
distance to that arrangement, ``sum_i min(|x_i - v_a|^2, |x_i + v_a|^2)``, is at most ``radius2[a, m]``. That is the
exact Euclidean distance to the nearest arrangement of the equilibrium with m tokens at +v_a (the tokens can be
permuted: the regions of a study are made for permutation-equivariant models, or, with a mask, for consensus only).
It is computed from the differences ``x_i -+ v_a`` themselves, so its rounding error is relative (a few eps of the
distance): expanded as ``|x_i|^2 + 1 - 2 |<x_i, v_a>|`` it would cancel, with an absolute error of about 4 n eps in
the squared distance, as large in float32 as the squared radius of the smallest balls (1e-8).

The engine (:mod:`attnflow.evolve.pool`) tests every running member after each of its steps and retires a member in
a region with outcome ``certified`` and the region's index ``a (n + 1) + m``; what makes a region (a ball in which
the step map provably contracts) is computed by :mod:`attnflow.analysis.basins.certify`. The test is written on the
rows of a member's state (row ``b n + i`` is coordinate b of token i), as a tuple of ``(T,)`` rows (the Pallas
kernel) or a ``(d n, T)`` array (XLA), and on one ``(n, d)`` state (the adaptive mode).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._device import device_array
from .._types import Array, Float


class Regions(eqx.Module):
    """Certified regions (see the module doc): `axes` ``(A, d)`` unit vectors (every axis that may hold one);
    `radius2` ``(A, n + 1)`` the squared Euclidean radii over the whole state, ``radius2[a, m]`` for m tokens at
    +axes[a] (negative: none); `tags` (static) the tag base of each axis (its index among all the axes of the model,
    times n + 1). The axes and radii are data, so a study's pool program is compiled once for a model's axes, before
    (and while) its certificates are computed (:func:`attnflow.analysis.basins.certify.layout`)."""

    axes: Float[Array, "A d"]
    radius2: Float[Array, "A n+1"]
    tags: tuple = eqx.field(static=True)

    def __init__(self, axes, radius2, tags):
        self.axes = device_array(axes)
        self.radius2 = device_array(radius2, self.axes.dtype)
        self.tags = tuple(int(t) for t in tags)
        if self.axes.ndim != 2 or self.radius2.shape != (self.axes.shape[0], self.radius2.shape[-1]) or len(self.tags) != self.axes.shape[0]:
            raise ValueError(f"Regions: axes (A, d), radius2 (A, n + 1) and A tags, got {self.axes.shape}, "
                             f"{self.radius2.shape} and {len(self.tags)}")

    @property
    def count(self) -> int:
        """How many regions are certified."""
        return int(np.sum(np.asarray(self.radius2) >= 0))


def _test(regions: Regions, x, axis, radius, n: int, d: int):
    """``(hit, tag)``: ``x(b, i)`` = coordinate b of token i as a lane vector (or scalar), ``axis(a, b)`` = v_a[b],
    ``radius(a, m)`` = radius2[a, m]."""
    hit, tag = None, None
    for a, base in enumerate(regions.tags):
        pos = [sum(x(b, i) * axis(a, b) for b in range(d)) > 0 for i in range(n)]  # token i nearer +v_a
        plus = sum(jnp.where(p, 1, 0) for p in pos)
        dist = 0.0
        for i in range(n):
            for b in range(d):
                e = x(b, i) - jnp.where(pos[i], axis(a, b), -axis(a, b))
                dist = dist + e * e
        lim = sum(jnp.where(plus == m, radius(a, m), 0.0) for m in range(n + 1))  # radius2[a, plus]
        h = dist <= lim  # never where radius2 < 0
        hit = h if hit is None else hit | h
        tag = jnp.where(h, base + plus, -1) if tag is None else jnp.where(h, base + plus, tag)
    if hit is None:
        z = x(0, 0)
        return jnp.zeros_like(z, dtype=bool), jnp.zeros_like(z, dtype=jnp.int32) - 1
    return hit, tag


def test_rows(regions: Regions, X, n: int, d: int, get_axis=None, get_radius=None):
    """``(hit, tag)`` for members stored as rows: a tuple of ``d n`` rows (the Pallas kernel; `get_axis(a, b)` and
    `get_radius(a, m)` read its axes and radii) or a ``(d n, T)`` array (XLA: whole-array operations, which keep the
    compiled step loop small)."""
    if not isinstance(X, tuple):
        return _test_arrays(regions, X.reshape(d, n, X.shape[-1]))
    rows = X
    axis = get_axis or (lambda a, b: regions.axes[a, b])
    radius = get_radius or (lambda a, m: regions.radius2[a, m])
    return _test(regions, lambda b, i: rows[b * n + i], axis, radius, n, d)


def _test_arrays(regions: Regions, Y):
    """:func:`_test` on arrays: ``Y`` ``(d, n, T)``, coordinate b of token i of each member."""
    d = Y.shape[0]
    ax = regions.axes.astype(Y.dtype)
    A = ax.shape[0]
    c = jnp.stack([sum(ax[a, b] * Y[b] for b in range(d)) for a in range(A)])  # <x_i, v_a>, (A, n, T)
    pos = c > 0
    plus = jnp.sum(pos, axis=1, dtype=jnp.int32)  # (A, T)
    near = jnp.where(pos[:, None], ax[:, :, None, None], -ax[:, :, None, None])  # the nearer of +-v_a, (A, d, n, T)
    dist = jnp.sum(jnp.square(Y[None] - near), axis=(1, 2))  # (A, T): from the differences, no cancellation
    lim = jnp.take_along_axis(regions.radius2.astype(dist.dtype), plus, axis=1)  # radius2[a, plus[a]], (A, T)
    h = dist <= lim  # never where radius2 < 0
    hit, tag = jnp.zeros(Y.shape[2:], bool), jnp.full(Y.shape[2:], -1, jnp.int32)
    for a, base in enumerate(regions.tags):  # the last axis that holds the member names it (balls are disjoint)
        hit, tag = hit | h[a], jnp.where(h[a], base + plus[a], tag)
    return hit, tag


def equilibria(regions: Regions, tag, n: int):
    """The equilibrium of the region of each tag ``(R,)``, ``(R, n, d)``: for tag ``tags[a] + m``, m tokens at
    +axes[a] and then n - m at -axes[a] (the arrangement :mod:`attnflow.analysis.basins.certify` certifies); zeros
    for tag -1."""
    R, d = tag.shape[0], regions.axes.shape[1]
    v, m = jnp.zeros((R, d), regions.axes.dtype), jnp.zeros((R,), jnp.int32)
    for a, base in enumerate(regions.tags):
        inside = (tag >= base) & (tag <= base + n)
        v, m = jnp.where(inside[:, None], regions.axes[a], v), jnp.where(inside, tag - base, m)
    plus = jnp.arange(n)[None, :] < m[:, None]
    return jnp.where(plus[..., None], v[:, None], -v[:, None])


def test_state(regions: Regions, X):
    """``(hit, tag)`` of one member ``(n, d)``."""
    hit, tag = _test_arrays(regions, X.T[:, :, None])
    return hit[0], tag[0]
