"""Attention entropy S^h_i = -sum_j a^h_ij log a^h_ij and its exact production rate along a flow."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..._types import Array, Float, Tokens
from ...model.dynamics import AbstractFlow
from ._energies import _attn_of


@eqx.filter_jit
def attention_entropy(model, X: Tokens) -> Float[Array, "h n"]:
    """Attention entropies S^h_i = -sum_j a^h_ij log a^h_ij, per head and token ``(H, n)``.

    Zero weights contribute 0 (double ``where``, so derivatives stay finite). For kernels whose rows do
    not sum to one (unnormalized, relu) this is the same formula applied to the raw weights.
    """
    a = _attn_of(model).weights(X)
    pos = a > 0
    return -jnp.sum(jnp.where(pos, a * jnp.log(jnp.where(pos, a, 1.0)), 0.0), axis=-1)


@eqx.filter_jit
def entropy_rate(flow: AbstractFlow, X: Tokens) -> Float[Array, "h n"]:
    """Exact entropy production dS^h_i/dt = <grad S^h_i, vf> at one state: a forward-mode jvp along the
    vector field (not a finite difference). ``(H, n)``."""
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"entropy rates need a flow (SphereFlow, FlatFlow), got {type(flow).__name__}")
    v = flow.vf(0.0, X)
    _, dS = jax.jvp(lambda Y: attention_entropy(flow.attn, Y), (X,), (v,))
    return dS
