"""Initial conditions: uniform on the sphere, perturbations of a configuration, equiangular starts.

Every sampler takes an explicit PRNG key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Batch, Float, Tokens
from ..model.dynamics import tangent_project
from ..model.norms import normalize_rows


def sphere(key: Array, shape: tuple[int, ...], dtype=None) -> Float[Array, "... d"]:
    """Points drawn uniformly on the unit sphere S^{d-1}; ``shape`` ends with d, e.g. ``(b, n, d)``."""
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"shape must end with the dimension d >= 1, got {shape}")
    dtype = dtype or jnp.result_type(float)
    return normalize_rows(jax.random.normal(key, shape, dtype=dtype))


def perturb(key: Array, X: Tokens, radius, num: int, *, tangent: bool = True) -> Batch:
    """``num`` perturbations of X (n, d), renormalised onto the sphere.

    Each token moves by a Gaussian step of standard deviation ``radius`` per coordinate (in the
    tangent space when ``tangent``), then is projected back. Returns ``(num, n, d)``.
    """
    X = jnp.asarray(X)
    noise = radius * jax.random.normal(key, (num,) + X.shape, dtype=X.dtype)
    if tangent:
        noise = jax.vmap(lambda e: tangent_project(X, e))(noise)
    return normalize_rows(X[None] + noise)


def perturb_ball(key: Array, X: Tokens, radius, num: int) -> Batch:
    """``num`` perturbations of X whose stacked tangent displacement has norm exactly ``radius``
    (uniform direction in R^{n(d-1)}), renormalised onto the sphere. Returns ``(num, n, d)``."""
    X = jnp.asarray(X)
    e = jax.random.normal(key, (num,) + X.shape, dtype=X.dtype)
    e = jax.vmap(lambda z: tangent_project(X, z))(e)
    e = e / jnp.sqrt(jnp.sum(e * e, axis=(1, 2), keepdims=True))
    return normalize_rows(X[None] + radius * e)


def equiangular(n: int, d: int, rho: float, *, key: Array | None = None, dtype=None) -> Tokens:
    """n unit vectors in R^d with all pairwise inner products equal to rho.

    Needs -1/(n-1) <= rho <= 1 and d >= n (d >= n - 1 when rho = -1/(n-1)). With a key, the
    configuration is randomly rotated.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lo = -1.0 / (n - 1) if n > 1 else -1.0
    if not (lo - 1e-12 <= rho <= 1.0):
        raise ValueError(f"rho must lie in [{lo:.4g}, 1] for n={n}, got {rho}")
    G = (1 - rho) * np.eye(n) + rho * np.ones((n, n))
    w, U = np.linalg.eigh(G)
    w = np.clip(w, 0.0, None)
    keep = w > 1e-12
    F = U[:, keep] * np.sqrt(w[keep])  # rows: vectors with Gram G, in R^rank
    if F.shape[1] > d:
        raise ValueError(f"{n} equiangular vectors with rho={rho} need d >= {F.shape[1]}, got d={d}")
    X = np.zeros((n, d))
    X[:, : F.shape[1]] = F
    dtype = dtype or jnp.result_type(float)
    X = jnp.asarray(X, dtype=dtype)
    if key is not None:
        Qm, R = jnp.linalg.qr(jax.random.normal(key, (d, d), dtype=dtype))
        Qm = Qm * jnp.sign(jnp.diag(R))
        X = X @ Qm.T
    return X
