"""Equilibria of attention dynamics (docs/model.md section 4): constructors and Newton refinement.

Eigenvectors of the layer matrix W are indexed 0-based with eigenvalues ordered by descending real
part. Eigen-decompositions of small d x d matrices run on the host (NumPy): JAX's general ``eig``
exists only on the CPU, and is slow on GPUs (see benchmarks/README.md).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from .._device import brief_jit
from .._types import Array, Float, Tokens
from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap, FlatFlow, LayerMap, tangent_project
from ..model.norms import normalize_rows
from .eigen import is_real, is_simple
from .spectral import Eigen, eigenpairs as _eigenpairs, layer_matrix as layer_matrix, matrix_dtype


def eigenpairs(model, *, order: str = "real") -> Eigen:
    """:func:`attnflow.analysis.spectral.eigenpairs` of the layer matrix W of `model`, by default with
    ``order="real"`` (descending real part; ties: descending imaginary part), the 0-based numbering of the
    equilibria here (``k = 0`` is v_1). Returns an :class:`~attnflow.analysis.spectral.Eigen`, which unpacks as
    ``values, vectors`` (unit columns; real eigenvectors sign-fixed with their largest entry positive)."""
    return _eigenpairs(layer_matrix(model), order=order)


def _real_eigvec(model, k: int) -> np.ndarray:
    lam, V = eigenpairs(model)
    if not 0 <= k < len(lam):
        raise ValueError(f"eigenvector index k={k} out of range for d={len(lam)}")
    if not is_real(lam[k]):
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
    equilibrium of uniform attention (docs/model.md section 4, item 3). Needs n >= 2, d >= 2."""
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
    """Equilibrium residual: the tangent-projected vector field (sphere flows), the vector field itself (a
    :class:`FlatFlow`, whose state space is R^{nd}) or ``step(X) - X`` (maps)."""
    if isinstance(dyn, FlatFlow):  # no constraint: an equilibrium is a zero of the whole vector field
        return dyn.vf(0.0, X)
    if isinstance(dyn, AbstractFlow):
        return tangent_project(X, dyn.vf(0.0, X))
    if isinstance(dyn, AbstractMap):
        return dyn.step(0, X) - X
    raise TypeError(f"expected a flow or a map, got {type(dyn).__name__}")


class Refined(eqx.Module):
    """Result of :func:`refine`, carried through from the optimistix solve (leading batch axis if the input had one).

    - `state`: ``(n, d)`` the refined state (rows normalised when the model lives on the unit spheres).
    - `residual`: max |F| of the solver's objective at its final iterate (optimistix's own residual, not
      recomputed): F(X) = residual(X) + (|x_i|^2 - 1) x_i on the unit spheres, F(X) = residual(X) otherwise.
    - `result`: the ``optimistix.RESULTS`` item of the solve (``successful``, ``nonlinear_max_steps_reached``, ...).
    - `steps`: the number of Levenberg-Marquardt steps taken.
    - `success`: the solve succeeded and `residual` < `tol`.
    """

    state: Tokens
    residual: Float[Array, ""]
    result: optx.RESULTS
    steps: Array
    success: jax.Array


def _fix_map(dyn):
    if isinstance(dyn, AbstractMap) and not isinstance(dyn, LayerMap):
        raise TypeError("refine needs an autonomous map (LayerMap) or a flow")
    return dyn


def _solve_one(dyn, X0, rtol, atol, max_steps):
    n, d = X0.shape
    spheres = dyn.on_spheres  # off the unit spheres (flat flow, layernorm or no norm) nothing pins the tokens

    def fn(z, _):
        X = z.reshape(n, d)
        radial = (jnp.sum(X * X, axis=-1, keepdims=True) - 1.0) * X if spheres else 0.0
        return (residual(dyn, X) + radial).ravel()

    sol = optx.least_squares(
        fn, optx.LevenbergMarquardt(rtol=rtol, atol=atol), X0.ravel(), max_steps=max_steps, throw=False
    )
    r = jnp.max(jnp.abs(sol.state.f_info.residual))
    X = sol.value.reshape(n, d)
    return normalize_rows(X) if spheres else X, r, sol.result, sol.stats["num_steps"]


@brief_jit  # compiled cheaply on a CPU: same speed, measured at 1 to 2000 states
def _refine(dyn, X0, rtol, atol, max_steps):
    if X0.ndim == 2:
        return _solve_one(dyn, X0, rtol, atol, max_steps)
    return jax.vmap(lambda X: _solve_one(dyn, X, rtol, atol, max_steps))(X0)


def refine(dyn: AbstractDynamics, X0: Tokens, *, tol: float | None = None, max_steps: int = 200) -> Refined:
    """Refine approximate equilibria to machine precision.

    Solves ``residual(X) + (|x_i|^2 - 1) x_i = 0`` in R^{nd} by Levenberg-Marquardt (optimistix) for a model
    on the unit spheres (:attr:`~attnflow.model.dynamics.AbstractDynamics.on_spheres`): the radial term pins
    every token to the sphere, the residual (tangent-projected vector field, or ``step(X) - X``) vanishes
    exactly at equilibria. Off the unit spheres (a :class:`FlatFlow`, a layer map normalised by layernorm or
    none) it solves ``residual(X) = 0`` alone and leaves the rows unnormalised. A damped Gauss-Newton method
    copes with the singular Jacobians of symmetric models (neutral directions).

    **Arguments:** `dyn` a flow or a :class:`LayerMap`; `X0` ``(n, d)`` or a batch ``(b, n, d)`` (one solve per
    state, vmapped; a failed solve is data, never an exception); `tol` the residual below which a solve counts
    as a success (default 1e-10 in float64, 1e-5 in float32); `max_steps` per solve.

    **Returns:** a :class:`Refined` (with a leading batch axis for a batch).
    """
    _fix_map(dyn)
    X0 = jnp.asarray(X0)
    X0 = normalize_rows(X0) if dyn.on_spheres else X0
    # solve in JAX's default float (float64 when x64 is on): optimistix builds its damping in that dtype, and a
    # float32 state against it (or against float64 model parameters) would not solve
    X0 = X0.astype(jnp.promote_types(X0.dtype, jnp.result_type(float)))
    f64 = X0.dtype == jnp.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else tol
    X, r, result, steps = _refine(dyn, X0, 1e-14 if f64 else 1e-7, 1e-14 if f64 else 1e-7, max_steps)
    ok = (result == optx.RESULTS.successful) & (r < tol)
    return Refined(state=X, residual=r, result=result, steps=steps, success=ok)


def alignment(model, X: Tokens, tol: float = 1e-6) -> tuple[int, np.ndarray]:
    """The eigenvector index k (or -1) such that every token is at +-v_k, and the per-token signs. Only a simple real
    eigenvalue names an axis (docs/model.md section 10): an eigenvector of a repeated one is an arbitrary vector of
    its eigenspace."""
    lam, V = eigenpairs(model)
    dt = matrix_dtype(model)
    axis = is_real(lam, dtype=dt) & is_simple(lam, dtype=dt)
    X = np.asarray(X)
    for k in range(len(lam)):
        if not axis[k]:
            continue
        c = X @ np.real(V[:, k])
        if np.all(np.abs(np.abs(c) - 1) < tol):
            return k, np.sign(c).astype(int)
    return -1, np.zeros(len(X), dtype=int)


def _positions(X, tol: float = 1e-6) -> int:
    """The number of distinct token positions of X (tokens within `tol` in every coordinate share one)."""
    reps: list[np.ndarray] = []
    for x in np.asarray(X):
        if not any(np.max(np.abs(x - r)) < tol for r in reps):
            reps.append(x)
    return len(reps)


def find_clusterings(dyn: AbstractDynamics, key: Array, n: int, *, starts: int = 64, clusters: int = 2, tol: float | None = None):
    """Search for equilibria with ``clusters`` distinct token positions that are not eigenvector-aligned.

    Random starts put the tokens into ``clusters`` groups at random points of the sphere; all starts are
    refined in one vmapped :func:`refine`. Returns a list of distinct refined states (up to token order).
    """
    d = layer_matrix(dyn).shape[0]

    def start(kk):
        k1, k2 = jax.random.split(kk)
        centres = normalize_rows(jax.random.normal(k1, (clusters, d)))
        return centres[np.arange(n) % clusters] + 1e-3 * jax.random.normal(k2, (n, d))

    X0 = jax.vmap(start)(jax.random.split(key, starts))
    res = refine(dyn, X0, tol=tol)
    found, keys = [], []
    for X, ok in zip(np.asarray(res.state), np.asarray(res.success)):
        if not ok or alignment(dyn, X)[0] >= 0:
            continue
        if _positions(X) != clusters:  # a start whose groups merged (a consensus) or split is none of these
            continue
        G = np.round(np.sort((X @ X.T).ravel()), 6)
        if not any(np.allclose(G, g, atol=1e-6) for g in keys):
            keys.append(G)
            found.append(X)
    return found
