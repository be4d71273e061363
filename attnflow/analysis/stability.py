"""Stability of equilibria by autodiff (docs/model.md section 5).

The state lives on (S^{d-1})^n. The autodiff Jacobian of the map or vector field in R^{nd} is the
*extrinsic* Jacobian J; stability is decided by the *intrinsic* one, J_int = B^T J B, with B the
block-diagonal orthonormal basis of the tangent spaces (d x (d-1) per token). Discrete: stable iff the
spectral radius of J_int < 1; continuous: stable iff max Re eig(J_int) < 0. Eigenvalues within `tol` of
the boundary are *neutral* (symmetry directions, e.g. rotations when W, M are multiples of I): they are
counted and reported, never hidden.

Where things run: Jacobians are computed by ``jax.jacfwd`` inside one jit, vmapped over states (and
parameter values), on the default device. General eigenvalues are computed on the host with NumPy:
JAX's ``jnp.linalg.eig`` has no GPU kernel (it runs on the CPU), and benchmarks/README.md records
``eigvals`` on GPU 8x slower than NumPy on 2 CPU cores for 10^4 20 x 20 matrices.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._device import brief_jit
from .._types import Array, Float, Tokens, check_tolerance
from ..evolve.simulate import check_states
from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap, FlatFlow, LayerMap
from ..model.heads import check_positive
from ..model.norms import L2Norm
from . import _results, eigen as _eigen
from .eigen import VERDICTS as VERDICTS, Verdict as Verdict
from .eigen import is_real, is_simple
from .equilibria import _real_eigvec, eigenpairs, residual


STABLE, UNSTABLE, NEUTRAL, UNKNOWN = _eigen.STABLE, _eigen.UNSTABLE, _eigen.NEUTRAL, _eigen.UNKNOWN


def verdict_name(code) -> str:
    """The :class:`Verdict` name of a code (int) or item: ``"stable"``, ``"unstable"``, ``"neutral"`` or ``"unknown"``."""
    return _results.name(Verdict, code)


def tangent_basis(X: Tokens) -> Float[Array, "n d d-1"]:
    """Orthonormal bases of the tangent spaces x_i^perp, one ``(d, d-1)`` block per token."""

    def one(x):
        d = x.shape[0]
        x = x / jnp.linalg.norm(x)
        # Householder reflection taking e_j to x, with e_j the axis least aligned with x (stable).
        j = jnp.argmin(jnp.abs(x))
        e = jnp.zeros(d, x.dtype).at[j].set(1.0)
        w = e - x
        H = jnp.eye(d, dtype=x.dtype) - 2 * jnp.outer(w, w) / jnp.dot(w, w)
        cols = jnp.delete(H, j, axis=1, assume_unique_indices=True)  # H e_k for k != j: orthonormal, _|_ x
        return cols

    return jax.vmap(one)(X)


def _flat(dyn):
    if isinstance(dyn, AbstractFlow):
        return lambda X: dyn.vf(0.0, X)
    if isinstance(dyn, AbstractMap):
        return lambda X: dyn.step(0, X)
    raise TypeError(f"expected a flow or a map, got {type(dyn).__name__}")


def extrinsic_jacobian(dyn: AbstractDynamics, X: Tokens) -> Float[Array, "nd nd"]:
    """Jacobian of the map / vector field at X, in R^{nd} (row-major token ordering)."""
    n, d = X.shape
    f = _flat(dyn)
    return jax.jacfwd(lambda z: f(z.reshape(n, d)).ravel())(X.ravel())


def intrinsic_jacobian(dyn: AbstractDynamics, X: Tokens) -> Float[Array, "m m"]:
    """J_int = B^T J B on the tangent space of (S^{d-1})^n, m = n(d - 1)."""
    n, d = X.shape
    Bt = tangent_basis(X)  # (n, d, d-1)
    J = extrinsic_jacobian(dyn, X).reshape(n, d, n, d)
    return jnp.einsum("iak,iajb,jbl->ikjl", Bt, J, Bt).reshape(n * (d - 1), n * (d - 1))


@brief_jit  # compiled cheaply on a CPU: same speed, measured at 1 to 2000 states
def _jacobians(dyn, Xs, params):
    def one(d, X):
        return intrinsic_jacobian(d, X), extrinsic_jacobian(d, X), jnp.max(jnp.abs(residual(d, X)))

    batch = lambda d: jax.vmap(lambda X: one(d, X))(Xs)  # noqa: E731
    if params is None:
        return batch(dyn)
    return jax.vmap(lambda p: batch(dyn.with_params(**p)))(params)


def jacobians(dyn: AbstractDynamics, states, *, beta=None, alpha=None):
    """Intrinsic and extrinsic Jacobians and equilibrium residuals of many states in one jitted call.

    `states` is ``(b, n, d)``; with `beta` and/or `alpha` arrays of length p, every output gains a leading
    axis p. Returns ``(J_int (.., b, m, m), J_ext (.., b, nd, nd), residual (.., b))``.
    """
    if isinstance(dyn, AbstractMap) and getattr(dyn, "num_layers", None) is not None and not dyn.same_layers():
        raise TypeError(f"the stability of an equilibrium needs an autonomous map (a LayerMap or a TransformerBlock) or a "
                        f"flow; a {type(dyn).__name__} of {dyn.num_layers} layers applies a different map at each "
                        "layer and has no equilibria of its own (a stack of equal layers is one map: it is analysed): analyse one of its "
                        "layers")
    Xs = jnp.asarray(states)
    if Xs.ndim == 2:
        Xs = Xs[None]
    if Xs.ndim != 3 or not jnp.issubdtype(Xs.dtype, jnp.floating):
        raise ValueError(f"states must be floating point of shape (b, n, d) or (n, d), got {Xs.dtype} {tuple(Xs.shape)}")
    check_states(dyn, Xs)
    params = {}
    if beta is not None:
        params["beta"] = jnp.atleast_1d(jnp.asarray(check_positive("beta", beta), dtype=Xs.dtype))
    if alpha is not None:
        if not isinstance(dyn, AbstractMap):
            raise ValueError("alpha is a step size of the discrete layer map; a flow has none")
        params["alpha"] = jnp.atleast_1d(jnp.asarray(check_positive("alpha", alpha), dtype=Xs.dtype))
    if len({tuple(p.shape) for p in params.values()}) > 1 or any(p.ndim != 1 for p in params.values()):
        raise ValueError("beta and alpha must be numbers or 1-d arrays of the same length (one value per parameter "
                         f"point), got shapes {[tuple(p.shape) for p in params.values()]}")
    return _jacobians(dyn, Xs, params or None)


class Stability(eqx.Module):
    """Per-state stability data (NumPy arrays, leading batch axes as the input states).

    - `eigenvalues`: intrinsic eigenvalues, complex, sorted by decreasing ``measure`` contribution.
    - `measure`: rho, the spectral radius (maps), or max Re, the maximal real part (flows).
    - `verdict`: :class:`Verdict` codes, 0 stable, 1 unstable, 2 neutral (marginal directions only, no unstable
      one), 3 unknown (a non-finite Jacobian); :attr:`verdict_names` has the names, :attr:`result` the batch-shaped :class:`Verdict` item.
    - `neutral`: number of eigenvalues within `tol` of the boundary (symmetry directions).
    - `unstable`: number of eigenvalues beyond the boundary.
    - `residual`: max |residual| (how close the state is to an equilibrium).
    - `discrete`: True for maps.
    - `tol`: the tolerance used for `neutral` (see :func:`analyse`).
    """

    eigenvalues: np.ndarray
    measure: np.ndarray
    verdict: np.ndarray
    neutral: np.ndarray
    unstable: np.ndarray
    residual: np.ndarray
    discrete: bool = eqx.field(static=True)
    tol: float = eqx.field(static=True, default=1e-8)
    """The tolerance used (see :func:`analyse`)."""

    @property
    def stable(self) -> np.ndarray:
        """Boolean array: the verdict is `stable`."""
        return self.verdict == STABLE

    @property
    def verdict_names(self) -> np.ndarray:
        """The :class:`Verdict` names, an object array shaped like `verdict`."""
        return _results.name_array(Verdict, self.verdict)

    @property
    def result(self):
        """The verdicts as one batch-shaped :class:`Verdict` item (``stab.result == Verdict.stable``)."""
        return _results.item(Verdict, self.verdict)

    @property
    def measure_name(self) -> str:
        """``"rho"`` (spectral radius, maps) or ``"max Re"`` (largest real part, flows)."""
        return "rho" if self.discrete else "max Re"

    def to_json(self, i: int) -> dict:
        """One state's record (index `i` into a 1-d batch): verdict name, measure, counts, residual, eigenvalues."""
        return {
            "verdict": verdict_name(int(self.verdict[i])),
            "stable": bool(self.verdict[i] == STABLE),
            ("spectral_radius" if self.discrete else "max_real"): float(self.measure[i]),
            "neutral": int(self.neutral[i]),
            "unstable_directions": int(self.unstable[i]),
            "residual": float(self.residual[i]),
            "eigenvalues": [[float(z.real), float(z.imag)] for z in np.asarray(self.eigenvalues[i])],
        }


def classify_spectrum(eigs: np.ndarray, discrete: bool, tol: float | None = None, *, dtype=np.float64):
    """(measure, verdict, n_neutral, n_unstable) of an array of eigenvalue sets ``(..., m)``
    (:func:`attnflow.analysis.eigen.verdicts`)."""
    return _eigen.verdicts(eigs, discrete, dtype=dtype, tol=tol)


def analyse(dyn: AbstractDynamics, states, *, tol: float | None = None, beta=None, alpha=None) -> Stability:
    """Stability of equilibria: autodiff intrinsic Jacobians (one jit), eigenvalues on the host.

    **Arguments:** `dyn` a flow or map; `states` ``(b, n, d)`` (or one ``(n, d)``); `tol` the distance from the
    boundary within which an eigenvalue counts as neutral (default :func:`attnflow.analysis.eigen.tolerance` of the
    states' dtype: 1e-8 in float64, 1e-4 in float32, the accuracy of a repeated eigenvalue); `beta`, `alpha`
    optional parameter arrays (see :func:`jacobians`).

    **Returns:** a :class:`Stability` (its `tol` is the tolerance used). A state whose Jacobian is not finite (an
    overflow) gets verdict ``unknown``, NaN measure and NaN eigenvalues, never an exception.
    """
    Jint, Jext, res = jacobians(dyn, states, beta=beta, alpha=alpha)
    # off the product of unit spheres (a FlatFlow, a layer map normalising with LayerNorm or none) the tangent spaces
    # x_i^perp are not the state space's: read the spectrum from the extrinsic Jacobian (docs/model.md section 5)
    J = np.asarray(Jint if dyn.on_spheres else Jext)
    dtype = J.dtype
    tol = _eigen.tolerance(dtype) if tol is None else check_tolerance("tol", tol)
    finite = np.all(np.isfinite(J), axis=(-2, -1))
    n = np.shape(states)[-2]
    eigs = _eigen.block_eigvals(np.where(finite[..., None, None], J, 0.0), n).astype(complex)
    eigs = np.where(finite[..., None], eigs, np.nan)
    discrete = isinstance(dyn, AbstractMap)
    key = -np.abs(eigs) if discrete else -eigs.real
    eigs = np.take_along_axis(eigs, np.argsort(np.nan_to_num(key, nan=0.0), axis=-1, kind="stable"), axis=-1)
    measure, verdict, neutral, unstable = classify_spectrum(eigs, discrete, tol)
    return Stability(eigs, measure, verdict, neutral, unstable, np.asarray(res), discrete, tol)


def consensus_closed_form(model, k: int, n: int, *, alpha: float | None = None) -> np.ndarray:
    """Intrinsic eigenvalues at consensus on v_k (docs/model.md section 5), any number of heads.

    Discrete layer map (l2, step alpha): 1/(1 + alpha lambda_k) with multiplicity (n-1)(d-1), and
    (1 + alpha lambda_j)/(1 + alpha lambda_k) for j != k. Continuous flow (``alpha=None``): -lambda_k
    with multiplicity (n-1)(d-1), and lambda_j - lambda_k. For a :class:`LayerMap` `alpha` defaults to the map's own
    (another value is refused), for a flow it must be None; lambda_k must be real and alpha finite and > 0. Holds when the attention rows sum to one
    (softmax, uniform, sinkhorn; row-normalised relu when every head's score at consensus is positive), so the
    attention terms vanish at consensus, with the full mask and no value or output biases; refused otherwise.
    Sorted like :func:`analyse`.
    """
    lam, _ = eigenpairs(model)
    d = len(lam)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < d:
        raise ValueError(f"k indexes the value map's eigenpairs from 0 (v_1) to d - 1 = {d - 1}, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n is the number of tokens, an integer >= 1, got {n!r}")
    if not is_real(lam[k]):
        raise ValueError(f"eigenvalue {k} of W is complex ({lam[k]:.4g}): there is no consensus on a real eigenvector")
    if isinstance(model, FlatFlow):
        raise ValueError("the consensus closed form is for the sphere flow and the l2 layer map; a FlatFlow has no "
                         "equilibrium at consensus (u = lambda_k v_k != 0): use analyse() (autodiff)")
    if isinstance(model, AbstractFlow) and alpha is not None:
        raise ValueError(f"alpha is the step size of the layer map; this model is a flow ({type(model).__name__}): "
                         "pass alpha=None")
    if isinstance(model, LayerMap):
        a = float(np.asarray(model.alpha))
        if alpha is None:
            alpha = a  # the map's own step size, not the flow's spectrum
        elif not np.isclose(float(alpha), a, rtol=1e-12, atol=0.0):
            raise ValueError(f"alpha={alpha!r} differs from this LayerMap's alpha={a!r}: pass alpha=None or the model's")
    if alpha is not None and (isinstance(alpha, bool) or not np.isfinite(alpha) or not alpha > 0):
        raise ValueError(f"alpha is the step size of the layer map, a finite number > 0, got {alpha!r}")
    sa = getattr(model, "attn", None)
    att = getattr(sa, "attention", None)
    kind, mask = getattr(att, "kind", "softmax"), getattr(att, "mask", "full")
    relu_rows = kind == "relu" and bool(getattr(att, "relu_normalize", False))
    if att is not None and (mask != "full" or (kind not in ("softmax", "uniform", "sinkhorn") and not relu_rows)):
        raise ValueError(
            "the consensus closed form holds for row-stochastic attention (softmax, uniform, sinkhorn, row-normalised "
            f"relu) with the full mask; this model has kind={kind!r}, mask={mask!r}"
            + (", relu_normalize=False" if kind == "relu" else "") + ": use analyse() (autodiff)"
        )
    heads = getattr(sa, "heads", None)
    if heads is not None and (heads.bv is not None or heads.bo is not None):
        raise ValueError("the consensus closed form has no value or output biases (bv, bo): with them consensus on "
                         "v_k is in general no equilibrium; use analyse() (autodiff) at a located equilibrium")
    if isinstance(model, AbstractMap) and not isinstance(getattr(model, "norm", L2Norm()), L2Norm):
        raise ValueError(f"the consensus closed form is for the l2-normalised layer map; this one normalises with "
                         f"{type(model.norm).__name__}: use analyse() (autodiff)")
    if relu_rows:
        # row-normalised relu is row-stochastic where every row has a positive score: at consensus the scores are
        # q_h = beta <Q_h v_k + bq_h, K_h v_k + bk_h>, the same for every pair; all must be > 0 (docs/model.md 5)
        v = _real_eigvec(model, k)
        q = np.asarray(sa.scores(jnp.asarray(np.tile(v, (n, 1)), jnp.asarray(sa.beta).dtype)))[:, 0, 0]
        if not np.all(q > 0):
            raise ValueError(f"row-normalised relu at consensus on v_{k + 1} needs every head's score q_h > 0 (the "
                             f"rows are then uniform), got q = {np.array2string(q, precision=4)}: use analyse()")
    lk = lam[k].real
    others = np.delete(lam, k)
    if alpha is None:
        eigs = np.concatenate([np.full((n - 1) * (d - 1), -lk), others - lk])
        key = -eigs.real
    else:
        if 1 + alpha * lk <= 0:
            raise ValueError(f"the closed form needs 1 + alpha lambda_k > 0, got {1 + alpha * lk}")
        eigs = np.concatenate([np.full((n - 1) * (d - 1), 1 / (1 + alpha * lk)), (1 + alpha * others) / (1 + alpha * lk)])
        key = -np.abs(eigs)
    return eigs[np.argsort(key, kind="stable")].astype(complex)


def step_size_threshold(model) -> float:
    """The largest alpha for which consensus on v_1 is stable for the discrete map (docs/model.md section 5):
    |1 + alpha lambda_j| < 1 + alpha lambda_1 for all j >= 2. For lambda_j = a + ib this reads
    alpha (|lambda_j|^2 - lambda_1^2) < 2 (lambda_1 - a), so only eigenvalues with |lambda_j| > lambda_1 bound alpha:
    alpha < min_j 2 (lambda_1 - Re lambda_j) / (|lambda_j|^2 - lambda_1^2) (complex lambda_j included; for real
    lambda_j < -lambda_1 this is 2 / (-lambda_j - lambda_1)); inf when no eigenvalue bounds it."""
    lam, _ = eigenpairs(model)
    l1 = lam[0].real
    if not is_simple(lam)[0]:  # lambda_j = lambda_1: (1 + alpha lambda_j)/(1 + alpha lambda_1) = 1, never stable
        return 0.0
    bounds = [2.0 * (l1 - lj.real) / (abs(lj) ** 2 - l1**2) for lj in lam[1:] if abs(lj) > l1]
    return float(min(bounds)) if bounds else float("inf")


def dwell_time(stab: Stability, distance) -> np.ndarray:
    """Estimated time (flows) or steps (maps) for a perturbation of size `distance` along the most unstable
    direction to grow to O(1): log(1/distance)/log(rho) (maps) or log(1/distance)/max Re (flows); inf if
    the state is not unstable. A state that *looks* converged but is unstable is a metastable saddle."""
    growth = np.log(np.maximum(stab.measure, 1e-300)) if stab.discrete else stab.measure
    with np.errstate(divide="ignore"):
        t = np.log(1.0 / np.asarray(distance)) / growth
    return np.where(stab.verdict == UNSTABLE, t, np.inf)


def saddle_flags(dyn: AbstractDynamics, states, *, tol: float | None = None, distance: float | None = None):
    """For (apparently converged) final states: which are saddles (an unstable direction), and their dwell
    time, estimated from a perturbation of size `distance` (default: the state's own residual, floored at
    machine epsilon). Returns ``(is_saddle, dwell, Stability)``."""
    stab = analyse(dyn, states, tol=tol)
    eps = np.finfo(np.asarray(states).dtype).eps
    dist = np.maximum(stab.residual, eps) if distance is None else distance
    return stab.verdict == UNSTABLE, dwell_time(stab, dist), stab


def measured_dwell(dyn: AbstractDynamics, X: Tokens, *, distance: float, escape: float = 0.5, **simulate_kwargs) -> float:
    """Measured dwell time near a saddle X: perturb X by `distance` along its most unstable intrinsic
    eigendirection, evolve with :func:`attnflow.simulate` (pass ``steps=`` or ``t1=, dt=``; ``saves`` defaults
    to one per step for maps), and return the first saved time at which some token is farther than `escape`
    from X. ``inf`` if it never escapes within the run. Compare with :func:`dwell_time` (linear estimate).

    **Arguments:** `dyn` the dynamics, `X` (n, d) an equilibrium, `distance` the initial perturbation size.
    **Returns:** a float, steps (maps) or time (flows).
    """
    from ..evolve.simulate import simulate
    from ..model.norms import normalize_rows

    if not dyn.on_spheres:
        raise ValueError(f"measured_dwell perturbs along the tangent spaces of the unit spheres; this "
                         f"{type(dyn).__name__} does not live on them")
    X = jnp.asarray(X)
    n, d = X.shape
    Jint = np.asarray(jacobians(dyn, X[None])[0][0])
    w, vecs = np.linalg.eig(Jint)
    g = np.abs(w) if isinstance(dyn, AbstractMap) else w.real
    v = np.real(vecs[:, int(np.argmax(g))])
    if not np.any(v):  # complex pair: take the imaginary part
        v = np.imag(vecs[:, int(np.argmax(g))])
    B = np.asarray(tangent_basis(X))
    delta = np.einsum("iak,ik->ia", B, v.reshape(n, d - 1))
    delta *= distance / np.max(np.linalg.norm(delta, axis=-1))
    x0 = normalize_rows(X + jnp.asarray(delta, X.dtype))[None]
    if isinstance(dyn, AbstractMap) and "saves" not in simulate_kwargs and "steps" in simulate_kwargs:
        simulate_kwargs["saves"] = int(simulate_kwargs["steps"])
    sol = simulate(dyn, x0, **simulate_kwargs)
    dist = np.max(np.linalg.norm(np.asarray(sol.trajectory[:, 0]) - np.asarray(X), axis=-1), axis=-1)
    out = np.flatnonzero(dist > escape)
    return float(np.asarray(sol.ts)[out[0]]) if out.size else float("inf")
