"""Equilibria of attention dynamics (MODEL.md section 4): constructors and Newton refinement.

Eigenvectors of the layer matrix W are indexed 0-based with eigenvalues ordered by descending real
part. Eigen-decompositions of small d x d matrices run on the host (NumPy): JAX's general ``eig``
exists only on the CPU, and is slow on GPUs (see GPU_NOTES.md).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._types import Array, Float, Tokens
from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap, LayerMap, tangent_project
from ..model.norms import normalize_rows


def layer_matrix(model) -> np.ndarray:
    """W of a dynamics, a :class:`SelfAttention`, a :class:`Heads`, or W itself (host array)."""
    if isinstance(model, (np.ndarray, jax.Array, list)):
        W = np.asarray(model, dtype=float)
        if W.ndim != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"W must be a square matrix, got shape {W.shape}")
        return W
    attn = getattr(model, "attn", model)
    heads = getattr(attn, "heads", attn)
    if not hasattr(heads, "layer_matrix"):
        raise TypeError(f"cannot find a layer matrix in {type(model).__name__}")
    return np.asarray(heads.layer_matrix(), dtype=float)


def eigenpairs(model) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (complex, ``(d,)``) and unit eigenvectors (columns, ``(d, d)``) of W, sorted by
    descending real part (ties: descending imaginary part): :func:`attnflow.spectral.eigenpairs` with
    ``order="real"`` (real eigenvectors sign-fixed: largest entry positive). Real eigenvectors are returned real."""
    from .spectral import eigenpairs as _eig

    e = _eig(np.asarray(layer_matrix(model), dtype=np.float64), order="real")
    lam, V = e.values, e.vectors
    if np.all(lam.imag == 0):
        V = V.real
    return lam, V


def _real_eigvec(model, k: int) -> np.ndarray:
    lam, V = eigenpairs(model)
    if not 0 <= k < len(lam):
        raise ValueError(f"eigenvector index k={k} out of range for d={len(lam)}")
    if abs(lam[k].imag) > 1e-12:
        raise ValueError(f"eigenvalue {k} of W is complex ({lam[k]:.4g}): no consensus on a real eigenvector")
    v = np.real(V[:, k])
    return v / np.linalg.norm(v)


def consensus(model, k: int, n: int, sign: int = 1) -> Tokens:
    """Consensus: every token at ``sign * v_k``. Returns ``(n, d)``."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    v = sign * _real_eigvec(model, k)
    return jnp.asarray(np.tile(v, (n, 1)))


def bipartite(model, k: int, m: int, n: int) -> Tokens:
    """Bipartite consensus: the first m tokens at +v_k, the other n - m at -v_k (0 < m < n)."""
    if not 0 < m < n:
        raise ValueError(f"a bipartite split needs 0 < m < n, got m={m}, n={n}")
    v = _real_eigvec(model, k)
    return jnp.asarray(np.concatenate([np.tile(v, (m, 1)), np.tile(-v, (n - m, 1))]))


def polygonal(n: int, d: int, key: Array | None = None) -> Tokens:
    """n unit tokens at the vertices of a regular polygon in a (random) plane: they sum to zero, an
    equilibrium of uniform attention (MODEL.md section 4, item 3). Needs n >= 2, d >= 2."""
    if n < 2 or d < 2:
        raise ValueError(f"a polygonal configuration needs n >= 2 and d >= 2, got n={n}, d={d}")
    t = 2 * np.pi * np.arange(n) / n
    X = np.zeros((n, d))
    X[:, 0], X[:, 1] = np.cos(t), np.sin(t)
    if key is not None:
        Qm, R = np.linalg.qr(np.asarray(jax.random.normal(key, (d, d))))
        X = X @ (Qm * np.sign(np.diag(R))).T
    return jnp.asarray(X)


def residual(dyn: AbstractDynamics, X: Tokens) -> Tokens:
    """Equilibrium residual: the tangent-projected vector field (flows) or ``step(X) - X`` (maps)."""
    if isinstance(dyn, AbstractFlow):
        return tangent_project(X, dyn.vf(0.0, X))
    if isinstance(dyn, AbstractMap):
        return dyn.step(0, X) - X
    raise TypeError(f"expected a flow or a map, got {type(dyn).__name__}")


class Refined(eqx.Module):
    """Result of :func:`refine`: the state, its residual norm, and whether it met the tolerance."""

    state: Tokens
    residual: Float[Array, ""]
    success: jax.Array


def _fix_map(dyn):
    if isinstance(dyn, AbstractMap) and not isinstance(dyn, LayerMap):
        raise TypeError("refine needs an autonomous map (LayerMap) or a flow")
    return dyn


@eqx.filter_jit
def _refine(dyn, X0, rtol, atol, max_steps):
    n, d = X0.shape

    def fn(z, _):
        X = z.reshape(n, d)
        radial = (jnp.sum(X * X, axis=-1, keepdims=True) - 1.0) * X
        return (residual(dyn, X) + radial).ravel()

    sol = optx.least_squares(
        fn, optx.LevenbergMarquardt(rtol=rtol, atol=atol), X0.ravel(), max_steps=max_steps, throw=False
    )
    X = normalize_rows(sol.value.reshape(n, d))
    r = jnp.max(jnp.abs(residual(dyn, X)))
    return X, r


def refine(dyn: AbstractDynamics, X0: Tokens, *, tol: float = 1e-10, max_steps: int = 200) -> Refined:
    """Refine an approximate equilibrium to machine precision on the product of spheres.

    Solves ``residual(X) + (|x_i|^2 - 1) x_i = 0`` in R^{nd} by Levenberg-Marquardt (optimistix): the
    radial term pins every token to the sphere, the residual (tangent-projected vector field, or
    ``step(X) - X``) vanishes exactly at equilibria. A damped Gauss-Newton method copes with the
    singular Jacobians of symmetric models (neutral directions). Returns a :class:`Refined`.
    """
    _fix_map(dyn)
    X0 = normalize_rows(jnp.asarray(X0))
    X, r = _refine(dyn, X0, 1e-14 if X0.dtype == jnp.float64 else 1e-7, 1e-14 if X0.dtype == jnp.float64 else 1e-7, max_steps)
    return Refined(state=X, residual=r, success=r < tol)


def alignment(model, X: Tokens, tol: float = 1e-6) -> tuple[int, np.ndarray]:
    """The eigenvector index k (or -1) such that every token is at +-v_k, and the per-token signs."""
    lam, V = eigenpairs(model)
    X = np.asarray(X)
    for k in range(len(lam)):
        if abs(lam[k].imag) > 1e-12:
            continue
        c = X @ np.real(V[:, k])
        if np.all(np.abs(np.abs(c) - 1) < tol):
            return k, np.sign(c).astype(int)
    return -1, np.zeros(len(X), dtype=int)


def find_clusterings(dyn: AbstractDynamics, key: Array, n: int, *, starts: int = 64, clusters: int = 2, tol: float = 1e-10):
    """Search for equilibria with ``clusters`` distinct token positions that are not eigenvector-aligned.

    Random starts put the tokens into ``clusters`` groups at random points of the sphere; each start is
    refined with :func:`refine`. Returns a list of distinct refined states (up to token order).
    """
    d = layer_matrix(dyn).shape[0]
    found, keys = [], []
    for kk in jax.random.split(key, starts):
        k1, k2 = jax.random.split(kk)
        centres = normalize_rows(jax.random.normal(k1, (clusters, d)))
        assign = np.arange(n) % clusters
        X0 = centres[assign] + 1e-3 * jax.random.normal(k2, (n, d))
        res = refine(dyn, X0, tol=tol)
        if not bool(res.success):
            continue
        X = np.asarray(res.state)
        if alignment(dyn, X)[0] >= 0:
            continue
        G = np.round(np.sort((X @ X.T).ravel()), 6)
        if not any(np.allclose(G, g, atol=1e-6) for g in keys):
            keys.append(G)
            found.append(X)
    return found
