"""What the dynamics are, for one configuration X (n, d) (docs/model.md section 3).

Two families, each an equinox Module:

- flows (continuous time): a vector field ``vf(t, X)`` and a projection back onto the state space;
- maps (discrete time): a step ``step(k, X)`` where k is the layer index.

How they are integrated lives in :mod:`attnflow.evolve`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float, Int, Tokens
from .heads import SelfAttention, _as_float_array, check_positive, check_scalar
from .norms import AbstractNorm, L2Norm, normalize_rows, sphere_residual


def tangent_project(X: Tokens, U: Tokens) -> Tokens:
    """P(x_i) u_i = u_i - <x_i, u_i> x_i / |x_i|^2, row by row."""
    xx = jnp.sum(X * X, axis=-1, keepdims=True)
    xu = jnp.sum(X * U, axis=-1, keepdims=True)
    return U - (xu / jnp.where(xx > 0, xx, 1.0)) * X


def _param(name: str, x):
    """A new beta or alpha as a float array, refused unless every entry is finite and > 0 (an array of values is
    for ``jax.vmap`` over the model; evaluated as it is, :func:`check_scalar` refuses it at its use)."""
    return _as_float_array(check_positive(name, x))


def set_attn_params(module, *, beta=None, alpha=None):
    """A copy of a layer with fields ``attn.beta`` and ``alpha`` replaced (arrays, so sweeps compile once)."""
    out = module
    if beta is not None:
        out = eqx.tree_at(lambda m: m.attn.beta, out, _param("beta", beta))
    if alpha is not None:
        out = eqx.tree_at(lambda m: m.alpha, out, _param("alpha", alpha))
    return out


class AbstractDynamics(eqx.Module):
    """Base of every model attnflow evolves."""

    time: ClassVar[str]
    """``"continuous"`` or ``"discrete"``."""

    @abc.abstractmethod
    def with_params(self, *, beta=None, alpha=None) -> "AbstractDynamics":
        """A copy with new beta and/or alpha values (arrays keep sweeps compiled once)."""

    def state_residual(self, X: Tokens) -> Float[Array, ""]:
        """How far X ``(n, d)`` is from the state space (0 where there is no constraint to check). A simulated
        member whose final state is off by more than ``attnflow.evolve.outcome.DEGENERATE_TOL`` is ``degenerate``."""
        return jnp.zeros((), X.dtype)

    @property
    def on_spheres(self) -> bool:
        """Whether the state space is the product of unit spheres (stability then reads the intrinsic Jacobian on
        their tangent spaces, docs/model.md section 5). True unless a model says otherwise (a user's dynamics is taken
        to live on the spheres)."""
        return True


class AbstractFlow(AbstractDynamics):
    """dX/dt = vf(t, X)."""

    time: ClassVar[str] = "continuous"
    attn: eqx.AbstractVar[SelfAttention]

    @abc.abstractmethod
    def vf(self, t, X: Tokens) -> Tokens:
        """The vector field dX/dt at time t, ``(n, d)``."""

    @abc.abstractmethod
    def project(self, X: Tokens) -> Tokens:
        """Map a state back onto the state space after a solver step."""

    def with_params(self, *, beta=None, alpha=None):
        """The same flow with new beta."""
        if alpha is not None:
            raise ValueError("alpha is a step size of the discrete layer map; a flow has none")
        if beta is None:
            return self
        return eqx.tree_at(lambda m: m.attn.beta, self, _param("beta", beta))


class SphereFlow(AbstractFlow):
    """dx_i/dt = P(x_i) u_i on the product of unit spheres."""

    attn: SelfAttention

    def vf(self, t, X: Tokens) -> Tokens:
        """The tangent-projected drift P_x u of docs/model.md section 1."""
        return tangent_project(X, self.attn(X))

    def project(self, X: Tokens) -> Tokens:
        """Rows back onto the unit sphere."""
        return normalize_rows(X)

    def state_residual(self, X: Tokens) -> Float[Array, ""]:
        """max_i | |x_i| - 1 |."""
        return sphere_residual(X)


class FlatFlow(AbstractFlow):
    """dx_i/dt = u_i, no projection."""

    attn: SelfAttention

    def vf(self, t, X: Tokens) -> Tokens:
        """The unprojected drift u."""
        return self.attn(X)

    def project(self, X: Tokens) -> Tokens:
        """The identity: no constraint."""
        return X

    @property
    def on_spheres(self) -> bool:
        """False: the state space is R^{nd}."""
        return False


class AbstractMap(AbstractDynamics):
    """x(k+1) = step(k, x(k))."""

    time: ClassVar[str] = "discrete"

    @abc.abstractmethod
    def step(self, k: Int[Array, ""], X: Tokens) -> Tokens:
        """Layer k applied to X ``(n, d)``."""

    @property
    def num_layers(self) -> int | None:
        """Number of distinct layers for a non-autonomous map; None when autonomous."""
        return None


class LayerMap(AbstractMap):
    """The discrete layer map x_i <- N(x_i + alpha u_i) [PM eq. (3), (8)].

    **Arguments:**

    - `attn`: the :class:`SelfAttention` producing the drift u.
    - `alpha`: the step size (array; alpha = 1 for real transformers).
    - `norm`: the normalisation N (:class:`L2Norm`, :class:`LayerNorm`, :class:`NoNorm`).
    """

    attn: SelfAttention
    alpha: Float[Array, ""] = eqx.field(default=1.0, converter=_as_float_array)
    norm: AbstractNorm = eqx.field(default_factory=L2Norm)

    def __check_init__(self):
        check_positive("alpha", self.alpha)

    def step(self, k, X: Tokens) -> Tokens:
        """x_i <- N(x_i + alpha u_i)."""
        alpha = check_scalar("alpha", self.alpha)  # an alpha (d,) or (n, 1) would scale coordinates or tokens
        return self.norm(X + alpha.astype(X.dtype) * self.attn(X)).astype(X.dtype)

    def with_params(self, *, beta=None, alpha=None):
        """The same map with new beta and/or alpha."""
        return set_attn_params(self, beta=beta, alpha=alpha)

    def state_residual(self, X: Tokens) -> Float[Array, ""]:
        """How far X is from the image of the normalisation (see :meth:`AbstractNorm.residual`)."""
        return self.norm.residual(X)

    @property
    def on_spheres(self) -> bool:
        """Whether the map normalises with :class:`L2Norm`."""
        return isinstance(self.norm, L2Norm)


def _signature(layer: eqx.Module):
    arrays, static = eqx.partition(layer, eqx.is_array)
    shapes = tuple((a.shape, a.dtype) for a in jax.tree.leaves(arrays))
    return jax.tree.structure(static), shapes


class LayerStack(AbstractMap):
    """A non-autonomous map: layer k applies its own map F_k (BERT, GPT-2, GPT-Neo).

    Layers of the same structure are stacked into one group (their arrays gain a leading axis), so
    a deep stack compiles to one ``lax.switch`` over the distinct layer kinds, not one branch per layer.
    Build it with :meth:`LayerStack.from_layers`. Shared-weight models (ALBERT) are a single
    :class:`LayerMap` iterated, or ``from_layers([layer] * L)``.
    """

    groups: tuple[AbstractMap, ...]
    group_of: Int[Array, " L"]
    index_in_group: Int[Array, " L"]

    @classmethod
    def from_layers(cls, layers) -> "LayerStack":
        """Stack discrete maps, first layer first; layers of the same structure share one group."""
        layers = list(layers)
        if not layers:
            raise ValueError("a LayerStack needs at least one layer")
        keys, members = [], []
        group_of, index_in = [], []
        for layer in layers:
            if not isinstance(layer, AbstractMap):
                raise TypeError(f"every layer must be a discrete map, got {type(layer).__name__}")
            sig = _signature(layer)
            if sig not in keys:
                keys.append(sig)
                members.append([])
            g = keys.index(sig)
            group_of.append(g)
            index_in.append(len(members[g]))
            members[g].append(layer)
        groups = tuple(
            jax.tree.map(lambda *xs: jnp.stack(xs), *m) if len(m) > 1 else jax.tree.map(lambda x: x[None], m[0])
            for m in members
        )
        return cls(groups=groups, group_of=jnp.asarray(group_of), index_in_group=jnp.asarray(index_in))

    @property
    def num_layers(self) -> int:
        """L, the number of layers."""
        return int(self.group_of.shape[0])

    def same_layers(self) -> bool:
        """Whether every layer is the same map (one layer, or equal layers: ALBERT's shared layer), so that the stack
        is one autonomous map iterated."""
        if len(self.groups) != 1:
            return False
        return all(bool(np.all(np.asarray(a) == np.asarray(a)[:1]))
                   for a in jax.tree.leaves(eqx.filter(self.groups[0], eqx.is_array)))

    def _check_layer(self, k):
        """Refuse a concrete layer index outside [-L, L) (JAX would clamp it to the last layer, silently); a traced
        index cannot be checked here (``simulate`` refuses more steps than layers)."""
        if isinstance(k, jax.core.Tracer):
            return
        L = self.num_layers
        i = int(k)
        if not -L <= i < L:
            raise IndexError(f"layer {i} does not exist: this stack has {L} layers (0 to {L - 1})")

    def layer(self, k: int) -> AbstractMap:
        """The map of layer k (a Python int)."""
        self._check_layer(k)
        g, j = int(self.group_of[k]), int(self.index_in_group[k])
        return jax.tree.map(lambda a: a[j], self.groups[g])

    def step(self, k, X: Tokens) -> Tokens:
        """Layer k of the stack applied to X (one lax.switch over the distinct layer kinds)."""
        self._check_layer(k)
        g = self.group_of[k]
        j = self.index_in_group[k]
        branches = [
            (lambda X, j, G=G: jax.tree.map(lambda a: a[j], G).step(k, X)) for G in self.groups
        ]
        if len(branches) == 1:
            return branches[0](X, j)
        return jax.lax.switch(g, branches, X, j)

    def state_residual(self, X: Tokens) -> Float[Array, ""]:
        """The sphere residual when every layer lands on the unit spheres (:attr:`on_spheres`); otherwise 0 (not
        checked)."""
        return sphere_residual(X) if self.on_spheres else jnp.zeros((), X.dtype)

    @property
    def on_spheres(self) -> bool:
        """Whether every layer lands on the unit spheres."""
        return all(G.on_spheres for G in self.groups)

    def with_params(self, *, beta=None, alpha=None):
        """The same stack with new beta and/or alpha in every layer."""
        def set_group(G):
            out = G
            if beta is not None:  # one value for every layer (an array would be spread over a group's own order)
                b = _param("beta", check_scalar("beta", beta))
                out = eqx.tree_at(lambda m: m.attn.beta, out, jnp.broadcast_to(b, G.attn.beta.shape))
            if alpha is not None:
                a = _param("alpha", check_scalar("alpha", alpha))
                out = eqx.tree_at(lambda m: m.alpha, out, jnp.broadcast_to(a, G.alpha.shape))
            return out

        return eqx.tree_at(lambda s: s.groups, self, tuple(set_group(G) for G in self.groups))
