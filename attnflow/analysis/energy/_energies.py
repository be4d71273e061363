"""Energies, their gradients, radial shadows, and the exact energy rates with their per-head decomposition.

For one configuration X (n, d) and a :class:`~attnflow.model.SelfAttention` with score matrices
M_h = Q_h^T K_h (biases included in the scores when present), the per-head energy is
E_h(X) = 1/(2 beta n^2) sum_{i,j} exp(s^h_ij), s^h_ij = beta x_i^T M_h x_j, and E = sum_h E_h
(docs/model.md section 7).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ..._types import Array, Float, Tokens
from ...model.dynamics import AbstractFlow, SphereFlow
from ...model.heads import SelfAttention


def _attn_of(model) -> SelfAttention:
    if isinstance(model, SelfAttention):
        return model
    attn = getattr(model, "attn", None)
    if isinstance(attn, SelfAttention):
        return attn
    if hasattr(model, "groups"):
        raise ValueError("energies need one SelfAttention; for a LayerStack pass stack.layer(k)")
    raise TypeError(f"expected a SelfAttention or a model with .attn, got {type(model).__name__}")


@eqx.filter_jit
def head_energies(model, X: Tokens) -> Float[Array, " h"]:
    """Per-head energies E_h = 1/(2 beta n^2) sum_{i,j} exp(s^h_ij) (all pairs; masks play no part).

    **Arguments:** `model` a :class:`SelfAttention` or a flow/map holding one (``.attn``); `X` ``(n, d)``.

    **Returns:** ``(H,)``.
    """
    attn = _attn_of(model)
    s = attn.scores(X)
    n = X.shape[0]
    beta = attn.beta.astype(X.dtype)
    # log-sum-exp, divided in log space and exponentiated once: finite as long as the energy itself is representable
    return jnp.exp(jax.nn.logsumexp(s, axis=(1, 2)) - jnp.log(2 * beta) - 2 * math.log(n))


@eqx.filter_jit
def energy(model, X: Tokens) -> Float[Array, ""]:
    """Total energy E = sum_h E_h of one configuration ``(n, d)``."""
    return jnp.sum(head_energies(model, X))


@eqx.filter_jit
def energy_gradients(model, X: Tokens) -> Float[Array, "h n d"]:
    """Euclidean gradients grad_X E_h of every per-head energy, by reverse-mode autodiff."""
    return jax.jacrev(lambda Y: head_energies(model, Y))(X)


@eqx.filter_jit
def radial_shadows(model, X: Tokens) -> Float[Array, "h n"]:
    """Radial shadows r^h_i = <x_i, f^h_i>: head h's output projected on token i's direction
    (times |x_i|; on the sphere |x_i| = 1). ``(H, n)``."""
    f = _attn_of(model).head_outputs(X)
    return jnp.einsum("nd,hnd->hn", X, f)


class EnergyRates(eqx.Module):
    """Exact energy rates of one state along a flow, and their decomposition.

    - `total`: dE/dt = <grad E, vf>.
    - `per_head`: ``(H,)`` dE_h/dt = <grad E_h, vf> (autodiff).
    - `terms`: ``(H, H)`` T[h, g] = sum_i <grad_i E_h, P_i f^g_i> with P_i the tangent projection on the sphere
      (identity for the flat flow). Row sums plus `bias` equal `per_head`. T[h, h] is head h's gradient part:
      when W_h = M_h = M_h^T it is sum_i c^h_i |P_i f^h_i|^2 >= 0 with c^h_i = Z^h_i/n^2 (softmax) or 1/n
      (unnormalized); off-diagonal entries are the cross-head terms.
    - `terms_flat`: ``(H, H)`` sum_i <grad_i E_h, f^g_i>.
    - `terms_radial`: ``(H, H)`` -sum_i <grad_i E_h, x_i><x_i, f^g_i>/|x_i|^2: the radial shadow terms
      (zero for the flat flow). `terms = terms_flat + terms_radial`.
    - `bias`: ``(H,)`` the part of dE_h/dt due to the output bias bo (zero without one).
    - `shadows`: ``(H, n)`` the radial shadows <x_i, f^h_i>.
    """

    total: Float[Array, ""]
    per_head: Float[Array, " h"]
    terms: Float[Array, "h h"]
    terms_flat: Float[Array, "h h"]
    terms_radial: Float[Array, "h h"]
    bias: Float[Array, " h"]
    shadows: Float[Array, "h n"]


def _inverse_square_norms(X):
    xx = jnp.sum(X * X, axis=-1)
    return jnp.where(xx > 0, 1.0 / jnp.where(xx > 0, xx, 1.0), 0.0)


def _bias_rate(flow, G, X, inv):
    """The part of every dE_h/dt due to the output bias bo (zeros without one)."""
    bo = flow.attn.heads.bo
    if bo is None:
        return jnp.zeros(G.shape[0], X.dtype)
    b = jnp.broadcast_to(bo.astype(X.dtype), X.shape)
    if isinstance(flow, SphereFlow):
        b = b - (jnp.sum(X * b, axis=-1) * inv)[:, None] * X
    return jnp.einsum("hnd,nd->h", G, b)


@eqx.filter_jit
def energy_rates(flow: AbstractFlow, X: Tokens) -> EnergyRates:
    """dE/dt, dE_h/dt and their head-by-head decomposition at one state ``X (n, d)`` of a flow.

    **Arguments:** `flow` a :class:`SphereFlow` or :class:`FlatFlow`; `X` ``(n, d)``.

    **Returns:** an :class:`EnergyRates`.
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"energy rates need a flow (SphereFlow, FlatFlow), got {type(flow).__name__}")
    G = energy_gradients(flow.attn, X)  # (H, n, d)
    per_head = jnp.einsum("hnd,nd->h", G, flow.vf(0.0, X))
    f = flow.attn.head_outputs(X)  # (H, n, d)
    flat = jnp.einsum("hnd,gnd->hg", G, f)
    inv = _inverse_square_norms(X)
    shadows = jnp.einsum("nd,gnd->gn", X, f)
    if isinstance(flow, SphereFlow):
        gx = jnp.einsum("hnd,nd->hn", G, X)
        radial = -jnp.einsum("hn,gn,n->hg", gx, shadows, inv)
    else:
        radial = jnp.zeros_like(flat)
    return EnergyRates(
        total=jnp.sum(per_head),
        per_head=per_head,
        terms=flat + radial,
        terms_flat=flat,
        terms_radial=radial,
        bias=_bias_rate(flow, G, X, inv),
        shadows=shadows,
    )
