"""Token normalisations N applied after each step of the discrete layer map (MODEL.md section 3)."""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp

from .._types import Array, Float, Tokens


def safe_norm(x: Float[Array, "... d"], axis: int = -1, keepdims: bool = True) -> Float[Array, "..."]:
    """Euclidean norm with a gradient that is finite at zero (double-where)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    ok = sq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def normalize_rows(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """Rows scaled to unit norm; zero rows stay zero."""
    r = safe_norm(x)
    return x / jnp.where(r > 0, r, 1.0)


class AbstractNorm(eqx.Module):
    """A normalisation N: (n, d) -> (n, d), applied token by token."""

    @abc.abstractmethod
    def __call__(self, y: Tokens) -> Tokens: ...


class L2Norm(AbstractNorm):
    """N(y) = y / |y|: tokens live on the unit sphere."""

    def __call__(self, y: Tokens) -> Tokens:
        return normalize_rows(y)


class NoNorm(AbstractNorm):
    """N(y) = y."""

    def __call__(self, y: Tokens) -> Tokens:
        return y


class LayerNorm(AbstractNorm):
    """Centre each token, divide by its standard deviation, then optional affine gain and bias.

    Without the affine part tokens live on the sphere of radius sqrt(d) in the mean-zero hyperplane.
    """

    gain: Float[Array, " d"] | None = None
    bias: Float[Array, " d"] | None = None
    eps: float = eqx.field(static=True, default=0.0)

    def __call__(self, y: Tokens) -> Tokens:
        c = y - jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(c * c, axis=-1, keepdims=True) + self.eps
        ok = var > 0
        out = c / jnp.where(ok, jnp.sqrt(jnp.where(ok, var, 1.0)), 1.0)
        if self.gain is not None:
            out = out * self.gain
        if self.bias is not None:
            out = out + self.bias
        return out


def make_norm(name: str) -> AbstractNorm:
    """``"l2"``, ``"layernorm"`` (no affine) or ``"none"``."""
    table = {"l2": L2Norm, "layernorm": LayerNorm, "none": NoNorm}
    if name not in table:
        raise ValueError(f"unknown norm {name!r}; expected one of {', '.join(table)}")
    return table[name]()
