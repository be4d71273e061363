"""Token normalisations N applied after each step of the discrete layer map (docs/model.md section 3)."""

from __future__ import annotations

import abc
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, Float, Tokens


def safe_norm(x: Float[Array, "... d"], axis: int = -1, keepdims: bool = True) -> Float[Array, "..."]:
    """Euclidean norm with a gradient that is finite at zero (double-where)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    ok = sq > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def normalize_rows(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """Rows scaled to unit norm (times one reciprocal square root per row); zero rows stay zero."""
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    ok = sq > 0
    return x * jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 1.0)


def sphere_residual(X: Tokens) -> Float[Array, ""]:
    """max_i | |x_i| - 1 |: how far X is from the product of unit spheres."""
    return jnp.max(jnp.abs(jnp.sqrt(jnp.sum(X * X, axis=-1)) - 1.0))


class AbstractNorm(eqx.Module):
    """A normalisation N: (n, d) -> (n, d), applied token by token."""

    @abc.abstractmethod
    def __call__(self, y: Tokens) -> Tokens: ...

    def residual(self, X: Tokens) -> Float[Array, ""]:
        """How far X is from the image of N (0 where that image is not a constraint this norm can check)."""
        return jnp.zeros((), X.dtype)


class L2Norm(AbstractNorm):
    """N(y) = y / |y|: tokens live on the unit sphere."""

    def __call__(self, y: Tokens) -> Tokens:
        """Each row divided by its Euclidean norm."""
        return normalize_rows(y)

    def residual(self, X: Tokens) -> Float[Array, ""]:
        """max_i | |x_i| - 1 | (a zero row, e.g. after an overflow, gives 1)."""
        return sphere_residual(X)


class NoNorm(AbstractNorm):
    """N(y) = y."""

    def __call__(self, y: Tokens) -> Tokens:
        """The identity."""
        return y


class LayerNorm(AbstractNorm):
    """Centre each token, divide by its standard deviation, then optional affine gain and bias.

    Without the affine part and with ``eps = 0`` (the default) tokens live on the sphere of radius sqrt(d) in the
    mean-zero hyperplane; ``eps`` must be a finite number >= 0, `gain` and `bias` of shape ``(d,)``.
    """

    gain: Float[Array, " d"] | None = None
    bias: Float[Array, " d"] | None = None
    eps: float = eqx.field(static=True, default=0.0)

    def __check_init__(self):
        # eps < 0 makes var + eps <= 0 for tokens of small spread, which the guard below would then leave centred but
        # unscaled (a silently wrong token); a gain or bias of another shape than (d,) would broadcast per token
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not 0 <= self.eps < float("inf"):
            raise ValueError(f"LayerNorm eps must be a finite number >= 0, got {self.eps!r}")
        for name in ("gain", "bias"):
            v = getattr(self, name)
            if v is not None and len(jnp.shape(v)) != 1:
                raise ValueError(f"LayerNorm {name} must have shape (d,), got {tuple(jnp.shape(v))}")

    def __call__(self, y: Tokens) -> Tokens:
        for name in ("gain", "bias"):  # a gain of shape (1,) would broadcast over the d coordinates
            v = getattr(self, name)
            if v is not None and tuple(jnp.shape(v)) != tuple(jnp.shape(y))[-1:]:
                raise ValueError(f"LayerNorm {name} of shape {tuple(jnp.shape(v))} does not fit tokens of d = "
                                 f"{jnp.shape(y)[-1]}")
        c = y - jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.mean(c * c, axis=-1, keepdims=True) + self.eps
        ok = var > 0
        out = c / jnp.where(ok, jnp.sqrt(jnp.where(ok, var, 1.0)), 1.0)
        if self.gain is not None:
            out = out * self.gain
        if self.bias is not None:
            out = out + self.bias
        return out

    def residual(self, X: Tokens) -> Float[Array, ""]:
        """Without affine part and eps: max_i max(|mean(x_i)|, | |x_i| - sqrt(d) |) (rows of norm sqrt(d) in the
        mean-zero hyperplane); otherwise 0 (the image is not checked)."""
        if self.gain is not None or self.bias is not None or self.eps != 0:
            return jnp.zeros((), X.dtype)
        d = X.shape[-1]
        mean = jnp.max(jnp.abs(jnp.mean(X, axis=-1)))
        return jnp.maximum(mean, jnp.max(jnp.abs(jnp.sqrt(jnp.sum(X * X, axis=-1)) - jnp.sqrt(d))))


def make_norm(name: str) -> AbstractNorm:
    """``"l2"``, ``"layernorm"`` (no affine) or ``"none"``."""
    table = {"l2": L2Norm, "layernorm": LayerNorm, "none": NoNorm}
    if name not in table:
        raise ValueError(f"unknown norm {name!r}; expected one of {', '.join(table)}")
    return table[name]()
