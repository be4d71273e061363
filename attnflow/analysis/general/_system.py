"""Any dynamics: a user's vector field or map on a state space, for one state y ``(m,)`` (docs/model.md section 12).

What a system *is* (``Flow`` / ``Map`` with a ``Space``) stays apart from how it is evolved (:mod:`._run`). The user's
function is any callable, typically an equinox Module (its arrays are then traced, so new parameter values do not
recompile); it is written for one state and batched with ``vmap`` at the edge.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..._types import Array, Float


class Space(eqx.Module):
    """A state space: R^m with some coordinates periodic, and some blocks of coordinates on unit spheres.

    - `periods`: ``(m,)`` entries: 0 for an ordinary coordinate, L > 0 for a coordinate taken modulo L (an angle:
      2 pi), wrapped into ``[low, low + L)``; `low` ``(m,)`` the lower ends (default 0).
    - `spheres`: tuples of coordinate indices, each block kept on the unit sphere (a product of spheres).

    Distances are Euclidean with each periodic coordinate's difference taken the short way round.
    """

    periods: tuple[float, ...] = eqx.field(static=True, default=())
    low: tuple[float, ...] = eqx.field(static=True, default=())
    spheres: tuple[tuple[int, ...], ...] = eqx.field(static=True, default=())

    def __check_init__(self):
        if any(not (math.isfinite(p) and p >= 0) for p in self.periods):
            raise ValueError(f"periods must be finite numbers >= 0 (0: not periodic), got {self.periods}")
        if self.low and len(self.low) != len(self.periods):
            raise ValueError(f"low needs one entry per coordinate ({len(self.periods)}), got {len(self.low)}")
        seen = set()
        for block in self.spheres:
            if len(block) < 2 or any(i in seen for i in block):
                raise ValueError(f"each sphere block needs >= 2 distinct coordinates not in another block, got {self.spheres}")
            seen.update(block)
            if any(self.periods and i < len(self.periods) and self.periods[i] > 0 for i in block):
                raise ValueError("a coordinate cannot be both periodic and on a sphere")

    @classmethod
    def euclidean(cls) -> "Space":
        """R^m."""
        return cls()

    @classmethod
    def periodic(cls, periods, low=None) -> "Space":
        """Coordinates with the given periods (0: not periodic), e.g. ``Space.periodic([2 * pi, 0])``."""
        periods = tuple(float(p) for p in periods)
        return cls(periods=periods, low=tuple(float(v) for v in (low if low is not None else [0.0] * len(periods))))

    @classmethod
    def product_of_spheres(cls, n: int, d: int) -> "Space":
        """n unit spheres S^{d-1}: the state is ``(n d,)``, block i the coordinates i d, ..., i d + d - 1."""
        return cls(spheres=tuple(tuple(range(i * d, (i + 1) * d)) for i in range(n)))

    def _pad(self, m: int):
        p = np.zeros(m)
        lo = np.zeros(m)
        if self.periods:
            if len(self.periods) != m:
                raise ValueError(f"the space has {len(self.periods)} coordinates, the state {m}")
            p[:] = self.periods
            lo[:] = self.low if self.low else 0.0
        return p, lo

    def project(self, y: Float[Array, " m"]) -> Float[Array, " m"]:
        """Wrap periodic coordinates into ``[low, low + L)`` and normalise each sphere block."""
        p, lo = self._pad(y.shape[-1])
        if np.any(p > 0):
            per = jnp.asarray(np.where(p > 0, p, 1.0), y.dtype)
            wrapped = jnp.mod(y - lo, per) + lo
            y = jnp.where(jnp.asarray(p > 0), wrapped, y)
        for block in self.spheres:
            idx = jnp.asarray(block)
            v = y[..., idx]
            nrm = jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True))
            y = y.at[..., idx].set(v / jnp.where(nrm > 0, nrm, 1.0))
        return y

    def difference(self, a, b):
        """a - b with each periodic coordinate's difference in ``[-L/2, L/2)``."""
        diff = a - b
        p, _ = self._pad(diff.shape[-1])
        if np.any(p > 0):
            per = jnp.asarray(np.where(p > 0, p, 1.0), diff.dtype)
            short = jnp.mod(diff + per / 2, per) - per / 2
            diff = jnp.where(jnp.asarray(p > 0), short, diff)
        return diff

    def distance(self, a, b):
        """The Euclidean distance, the short way round for periodic coordinates."""
        d = self.difference(a, b)
        return jnp.sqrt(jnp.sum(d * d, axis=-1))


class Flow(eqx.Module):
    """dy/dt = f(t, y) on `space`; `f` any callable (an equinox Module to have its arrays traced)."""

    f: Callable
    space: Space = Space()
    time = "continuous"

    def vf(self, t, y):
        """The vector field."""
        return self.f(t, y)


class Map(eqx.Module):
    """y <- f(k, y) on `space` (k the step index)."""

    f: Callable
    space: Space = Space()
    time = "discrete"

    def step(self, k, y):
        """One iteration, projected onto the space."""
        return self.space.project(self.f(k, y))


def rk4_step(system: Flow, t, y, dt):
    """One classical RK4 step, projected onto the space."""
    k1 = system.vf(t, y)
    k2 = system.vf(t + dt / 2, y + dt / 2 * k1)
    k3 = system.vf(t + dt / 2, y + dt / 2 * k2)
    k4 = system.vf(t + dt, y + dt * k3)
    return system.space.project(y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4))


def as_system(obj, space: Space | None = None):
    """A :class:`Flow` or :class:`Map` from an attnflow model or from a system already (a ``SphereFlow`` becomes a
    flow on n spheres with the state flattened to ``(n d,)``)."""
    if isinstance(obj, (Flow, Map)):
        return obj if space is None else eqx.tree_at(lambda s: s.space, obj, space)
    from ...model.dynamics import AbstractFlow, AbstractMap

    if isinstance(obj, (AbstractFlow, AbstractMap)):
        raise TypeError("pass an attnflow model through attention_system(model, n) (its state is (n, d))")
    raise TypeError(f"expected attnflow.analysis.general.Flow or Map, got {type(obj).__name__}")


def attention_system(model, n: int):
    """An attnflow model as a system on flattened states ``(n d,)``: a flow or map on n spheres (a ``SphereFlow``, or a
    map that normalises with ``L2Norm``), else on R^{n d}."""
    from ...model.dynamics import AbstractFlow, SphereFlow
    from ...model.norms import L2Norm

    d = model.attn.heads.dim
    on_spheres = isinstance(model, SphereFlow) or isinstance(getattr(model, "norm", None), L2Norm)
    space = Space.product_of_spheres(n, d) if on_spheres else Space()

    if isinstance(model, AbstractFlow):
        return Flow(_Reshaped(model, n, d, "vf"), space)
    return Map(_Reshaped(model, n, d, "step"), space)


class _Reshaped(eqx.Module):
    model: eqx.Module
    n: int = eqx.field(static=True)
    d: int = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def __call__(self, t, y):
        X = y.reshape(self.n, self.d)
        return getattr(self.model, self.method)(t, X).reshape(-1)

    def name_of(self, state) -> str:
        """The attention model's own name of a fixed point (docs/model.md section 10), e.g. ``consensus +v1``."""
        from ..basins.local import state_name

        return state_name(self.model, np.asarray(state).reshape(self.n, self.d))


def key_of(key):
    """A PRNG key (None: key 0)."""
    return jax.random.PRNGKey(0) if key is None else key
