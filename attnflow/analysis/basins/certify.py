"""Certificates: balls around stable equilibria in which the step map contracts, so that a member entering one is
decided (docs/model.md section 9, "Early decisions").

For every real, simple eigenvector v of the layer matrix W and every split m (m tokens at +v, n - m at -v; m = n
and m = 0 are consensus on +v and -v, the others bipartite consensus, which need a permutation-equivariant model: the
full mask), the candidate arrangement is kept when it is a fixed point of the step map G of the study (the map
itself, or one fixed step of the flow's solver) to 100 machine epsilons, and G is linearised there:

1. ``A = D(G o N)(X*)``, N the row normalisation, whose spectrum is the intrinsic spectrum plus zeros; its spectral
   radius must be below 1 (a strictly stable fixed point of G; neutral and unstable ones get no certificate).
2. The Lyapunov metric ``S = sum_k (A^T)^k A^k`` (the solution of ``A^T S A - S = -I``, by doubling), in which
   ``|A|_S = q0 = sqrt(1 - 1 / lambda_max(S)) < 1``.
3. A radius r (in the S-norm) such that ``|D(G o N)(Y)|_S <= q1 = (1 + q0) / 2`` for every Y with
   ``|Y - X*|_S <= r``: then G o N maps that ball into itself and contracts it, so every member in it converges to
   X*. The sup is estimated numerically: at points of the ball (random directions, the directions of A's largest
   singular vectors, at 1/4, 1/2, 3/4 and all of the radius), and r is then halved again for margin. X* is a fixed
   point only up to its residual e (rounding, or heads whose drifts leave the axis): the ball is kept only when it
   still maps into itself around the fixed point it holds, at most min(r/2, :data:`CENTRE_SHIFT`) from X*
   (:func:`_shift_ok`), so that its members get X*'s name. This is a
   numerical certificate, not an interval-arithmetic proof (the tests check it member by member against runs to
   convergence).
4. The engine tests the Euclidean ball ``|X - X*|_2 <= r / sqrt(lambda_max(S))``, which lies inside the S-ball, as
   the distance to the nearest arrangement of X* (:mod:`attnflow.evolve.regions`).

A flow integrated by the adaptive solver has no fixed step map; its certificate is the same construction for the flow
itself (docs/model.md section 9): the vector field f extended off the spheres as ``F(z) = f(N(z)) - c (z - N(z))``
(equal to f on the spheres, which it leaves invariant; c the spectral radius of ``D(f o N)(X*)``), ``A = DF(X*)``
Hurwitz, S the solution of ``A^T S + S A = -I``, in which the log-norm of A is ``mu0 = -1 / (2 lambda_max(S))``, and
a radius in which the log-norm of ``DF(Y)`` stays below ``mu1 = mu0 / 2``: there the S-distance to X* decays at least
like ``exp(mu1 t)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..._device import brief_jit, device_array
from ...evolve.backends import one_step
from ...evolve.regions import Regions
from ...evolve.solvers import Adaptive
from ...model.dynamics import LayerMap, SphereFlow
from ...model.norms import L2Norm, normalize_rows
from ..eigen import is_real, is_simple
from ..equilibria import eigenpairs
from ..spectral import matrix_dtype

RADII = tuple(2.0**-k for k in range(13))
"""The S-norm radii tried, largest first (1 down to about 2.4e-4)."""

FREE_STATE = 32
"""States of at most this many numbers (n d) are always certified: their certificates take about a second (measured on
the 2-core CPU, float32, one head: 0.9-1.0 s at n d = 30; 4.3-4.7 s at 60; 28-52 s at 120, growing like (n d)^3)."""

SAMPLES_PER_STATE2 = 20
"""Larger states are certified when the study has at least ``SAMPLES_PER_STATE2 (n d)^2`` samples: then the steps
the certificates save (about 40% of a member's) outweigh their cost."""


def worth_certifying(samples: int, n: int, d: int) -> bool:
    """Whether a study of `samples` members of n tokens in d dimensions computes certificates (:data:`FREE_STATE`,
    :data:`SAMPLES_PER_STATE2`): a choice of speed only, since a certified member gets the name it would get by
    running to convergence (where the study without certificates gets there within its cap and tolerances:
    docs/model.md section 9)."""
    nd = int(n) * int(d)
    return nd <= FREE_STATE or int(samples) >= SAMPLES_PER_STATE2 * nd * nd


DIRECTIONS = 32
"""Random directions sampled in the ball at each radius (plus the leading singular directions of A)."""


@dataclasses.dataclass(frozen=True)
class Certificate:
    """One certified equilibrium: its axis index `axis` (into :func:`candidate_axes`, the real simple eigenvectors
    only; `v` is the axis's eigenvector number as names write it, 1-based: ``v = 3`` is ``v3``) and split `m` (tokens
    at +v), the equilibrium `X` ``(n, d)``,
    `q0` (the contraction of the linearisation in the Lyapunov metric), `lyapunov` (lambda_max of S), `radius`
    (the Euclidean radius the engine tests, over the whole state) and `margin` (the largest ``|DG|_S`` found in the
    ball of twice the certified radius, at most ``(1 + q0) / 2``). `continuous`: a certificate of the flow itself
    (the adaptive solver); then `q0` is the log-norm ``mu0 < 0`` of ``DF(X*)`` in the metric and `margin` the largest
    log-norm of ``DF`` found in the ball of twice the radius, at most ``mu0 / 2``."""

    axis: int
    m: int
    X: np.ndarray
    q0: float
    lyapunov: float
    radius: float
    margin: float
    continuous: bool = False
    v: int = 0


@brief_jit
def _linearise(dyn, solver, dt, Z, n: int):
    """``(G(N(z)), D(G o N)(z))`` for every row z of ``Z`` ``(b, n d)``: N the row normalisation and G one step of the
    study's dynamics (step index 0: the certified models are autonomous), or with ``solver=None`` the flow's vector
    field f at t = 0. Compiled once per model structure and batch shape."""

    def Gn(z):
        X = normalize_rows(z.reshape(n, -1))
        if solver is None:
            return dyn.vf(0.0, X).ravel()
        return one_step((dyn, solver, dt), jnp.zeros((), jnp.int32), X).ravel()

    return jax.vmap(lambda z: (Gn(z), jax.jacfwd(Gn)(z)))(Z)


def _lyapunov(A: np.ndarray, Q: np.ndarray | None = None) -> np.ndarray:
    """``S = sum_k (A^T)^k Q A^k`` (default Q = I) by doubling (A with spectral radius < 1): the solution of
    ``A^T S A - S = -Q``."""
    S, Ak = (np.eye(A.shape[0]) if Q is None else np.array(Q, np.float64)), A.copy()
    for _ in range(64):
        S_next = S + Ak.T @ S @ Ak
        Ak = Ak @ Ak
        if np.max(np.abs(S_next - S)) <= 1e-13 * np.max(np.abs(S_next)):
            return S_next
        S = S_next
    return S


def _lyapunov_continuous(A: np.ndarray) -> np.ndarray:
    """The solution S of ``A^T S + S A = -I`` (A Hurwitz), through the Cayley transform: with ``B = A / c`` (c the
    spectral radius of A), ``Ad = (I + B)(I - B)^-1`` has spectral radius below 1, and S solves
    ``Ad^T (c S) Ad - c S = -2 (I - B)^-T (I - B)^-1``."""
    c = float(np.max(np.abs(np.linalg.eigvals(A))))
    B = A / c
    inv = np.linalg.inv(np.eye(A.shape[0]) - B)
    Ad = (np.eye(A.shape[0]) + B) @ inv
    return _lyapunov(Ad, 2.0 * inv.T @ inv) / c


def _norm_S(J: np.ndarray, half: np.ndarray, half_inv: np.ndarray) -> np.ndarray:
    """``|J|_S = |S^(1/2) J S^(-1/2)|_2`` for a batch of matrices ``(b, m, m)``."""
    return np.linalg.norm(half @ J @ half_inv, ord=2, axis=(-2, -1))


def certificates(dyn, solver=None, dt=None, *, tokens: int, dtype=np.float64, equivariant: bool | None = None,
                 seed: int | None = None) -> list[Certificate]:
    """The certified equilibria of ``dyn`` (see the module doc) for members of `tokens` tokens, the study's `solver`
    and step `dt` (fixed-step flows). Only models on the product of unit spheres with a layer matrix (a
    :class:`~attnflow.LayerMap` with the l2 norm, a :class:`~attnflow.SphereFlow`) get certificates. With the
    adaptive solver the certificate is that of the flow itself (its steps have no fixed map)."""
    from ...evolve.pool import check_solver

    numbered = _candidates(dyn, solver)
    vecs = [vec for _, vec in numbered]
    if not vecs:
        return []
    continuous = isinstance(solver, Adaptive)
    solver = None if continuous else check_solver(dyn, solver)
    n = int(tokens)
    if equivariant is None:
        equivariant = getattr(getattr(dyn.attn, "attention", None), "mask", "full") == "full"
    cands, where = [], []
    for a, v in enumerate(vecs):
        for m in range(n + 1):
            if 0 < m < n and not equivariant:
                continue
            cands.append(np.concatenate([np.tile(v, (m, 1)), np.tile(-v, (n - m, 1))]))
            where.append((a, m))
    if not cands:
        return []
    Xr = np.stack(cands)
    nd = Xr.shape[1] * Xr.shape[2]
    dt_arr = device_array(1.0 if dt is None else dt, dtype)
    batch = 4 * (DIRECTIONS + 8)  # one compiled shape for the candidates and every ball (see _certify_one)

    def lin(Z):
        """``(G o N (Z), its Jacobians)`` of rows ``Z`` ``(k, n d)``, float64, in fixed batches of one shape."""
        outs = []
        for s0 in range(0, len(Z), batch):
            part = Z[s0 : s0 + batch]
            pad = np.concatenate([part, np.broadcast_to(part[:1], (batch - len(part), nd))])
            Zp = device_array(pad, dtype)
            g, J = _linearise(dyn, solver, dt_arr, Zp, n)
            outs.append((np.asarray(g, np.float64)[: len(part)], np.asarray(J, np.float64)[: len(part)]))
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    g, A = lin(Xr.reshape(len(cands), nd))
    Xr = np.asarray(device_array(Xr, dtype), np.float64)  # the candidates in the study's dtype
    eps = float(np.finfo(np.dtype(dtype)).eps)
    # only arrangements that are fixed points of the step map themselves (one head, or heads whose drifts stay on
    # the axis: docs/model.md section 4) are certified; the others are left to converge
    # the residual e = f(X*) (flows) or G(X*) - X* (maps): rounding, or, for heads whose drifts leave the axis, a
    # small defect; _certify_one checks that the ball still maps into itself around the fixed point near X*
    res = g if continuous else g - Xr.reshape(len(cands), nd)
    if continuous:  # f(X*) = 0 up to the rounding of its terms
        fixed = np.max(np.abs(g), axis=1) / np.maximum(1.0, np.max(np.abs(A), axis=(1, 2)))
    else:
        fixed = np.max(np.abs(res), axis=1)
    ok = fixed <= 100 * eps
    jac = lambda Y: lin(Y)[1]  # noqa: E731
    seed = 20261202 if seed is None else int(seed)
    one = _certify_one_flow if continuous else _certify_one
    out = []
    for j in np.flatnonzero(ok):
        cert = one(jac, Xr[j], A[j], seed + j, nd, eps, dtype, res[j])
        if cert is not None:
            a, m = where[j]
            out.append(Certificate(a, m, np.asarray(Xr[j]), *cert, continuous=continuous, v=numbered[a][0] + 1))
    return out


FRACS = (0.25, 0.5, 0.75, 1.0)
"""Where on each chord [X*, Y] the Jacobian is sampled."""


def _directions(seed, nd, x, d, half, half_inv, M):
    """The sampling directions at X* (flat `x`): DIRECTIONS random ones and the 4 leading right singular vectors of
    the metric-conjugated linearisation `M`, both signs; each projected onto the tangent space of the spheres at X*
    and scaled to S-norm 1."""
    u = np.random.default_rng(seed).standard_normal((DIRECTIONS, nd))  # NumPy: the same directions in every process
    sv = np.linalg.svd(M)[2][:4]  # the directions the linearisation stretches most, in the S-metric
    u = np.concatenate([u, sv, -sv]) @ half_inv.T
    xr = x.reshape(1, -1, d)
    ur = u.reshape(len(u), -1, d)
    u = (ur - np.sum(ur * xr, axis=-1, keepdims=True) * xr).reshape(len(u), nd)  # tangent at X*
    size = np.linalg.norm(u @ half.T, axis=1)
    keep = size > 1e-6 * size.max()  # a radial singular vector has no tangent part
    return u[keep] / size[keep, None]  # |u_i|_S = 1


def _chords(x, dirs, r, d):
    """Points of the chords [X*, Y] for Y = N(X* + r u) on the spheres (u in `dirs`, tangent, |u|_S = 1), at the
    fractions FRACS: the mean-value inequality of the certificate runs along these segments (members stay on the
    spheres), which stay within O(r^2) of the spheres. Returns the points ``(len(FRACS) len(dirs), nd)``."""
    Y = x[None] + r * dirs
    Yr = Y.reshape(len(Y), -1, d)
    Y = (Yr / np.linalg.norm(Yr, axis=-1, keepdims=True)).reshape(len(Y), -1)
    fr = np.asarray(FRACS)
    return (x[None, None] + fr[:, None, None] * (Y - x[None])[None]).reshape(-1, x.size)


def _metric(S):
    """``(S^(1/2), S^(-1/2), lambda_max(S))`` of a Lyapunov solution, or None when it is not positive definite."""
    w, U = np.linalg.eigh((S + S.T) / 2)
    if not (np.all(np.isfinite(w)) and w.min() > 0):
        return None
    return (U * np.sqrt(w)) @ U.T, (U / np.sqrt(w)) @ U.T, float(w.max())


def _largest_radius(worst, bound):
    """``(index into RADII, worst value there)`` of the largest radius whose sampled `worst` is at most `bound`, by
    bisection over the (descending) radii, or None when none passes."""
    lo, hi = -1, len(RADII)  # RADII[hi] passes (hi == len: none known), RADII[lo] fails (lo == -1: none known)
    found = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        w = worst(RADII[mid])
        if w <= bound:
            hi, found = mid, w
        else:
            lo = mid
    return None if found is None else (hi, found)


CENTRE_SHIFT = 1e-2
"""The largest Euclidean distance (over the whole state) allowed between a candidate X* and the fixed point that its
certified ball holds (X* is a fixed point only up to its residual e): within 1e-2 every token's direction is within
1e-2 of X*'s, so ``||cos(x_i, v)| - 1| <= 5e-5``, far inside the classifier's default tolerance (1e-3): the members
get X*'s name (docs/model.md section 9, step 4 of "Early decisions")."""


def _shift_ok(half, res, R, rate):
    """Whether the residual `res` of X* (``G(X*) - X*``, or ``f(X*)`` for a flow) keeps the S-ball of radius R
    (already halved for margin) invariant around a fixed point near X*: ``|G(Y) - X*|_S <= q1 |Y - X*|_S + |e|_S``
    (flows: ``d/dt |Y - X*|_S <= mu1 |Y - X*|_S + |e|_S``), so the ball maps into itself when ``|e|_S <= rate R``
    (rate = 1 - q1, or -mu1) and holds one fixed point, within ``|e|_S / rate`` of X*. Required: that shift at most
    ``R / 2``, and at most :data:`CENTRE_SHIFT` in the Euclidean norm (``|w|_2 <= |w|_S / sqrt(lambda_min(S))``;
    a map's S is >= I, a flow's need not be)."""
    shift = float(np.linalg.norm(half @ np.asarray(res, np.float64))) / rate
    euclid = shift / float(np.min(np.linalg.eigvalsh(half)))  # half = S^(1/2): its smallest eigenvalue sqrt(lambda_min)
    return bool(np.isfinite(euclid) and shift <= 0.5 * R and euclid <= CENTRE_SHIFT)


def _certify_one(jac, X, A, seed, nd, eps, dtype, res=None):
    """``(q0, lambda_max(S), Euclidean radius, margin)`` of one fixed point, or None when it is not certified (`res`:
    the residual ``G(X*) - X*``, see :func:`_shift_ok`)."""
    rho = float(np.max(np.abs(np.linalg.eigvals(A))))
    if not (rho < 1 - 1e3 * eps):
        return None
    m = _metric(_lyapunov(A))
    if m is None:
        return None
    half, half_inv, lmax = m
    q0 = float(np.sqrt(max(0.0, 1.0 - 1.0 / lmax)))
    q1 = 0.5 * (1.0 + q0)
    d = X.shape[-1]
    x = np.asarray(X, np.float64).ravel()
    dirs = _directions(seed, nd, x, d, half, half_inv, half @ A @ half_inv)

    def worst(r):
        J = jac(_chords(x, dirs, r, d))
        return float(np.max(_norm_S(J, half, half_inv))) if np.all(np.isfinite(J)) else np.inf

    got = _largest_radius(worst, q1)
    if got is None:
        return None
    R = 0.5 * RADII[got[0]]  # half the radius found, for margin
    if res is not None and not _shift_ok(half, res, R, 1.0 - q1):
        return None
    return q0, lmax, R / np.sqrt(lmax), got[1]


def _radial(Y: np.ndarray, d: int) -> np.ndarray:
    """``I - DN(y)`` for every row y of ``Y`` ``(b, n d)``: N the row normalisation, ``DN(y)`` block diagonal with
    blocks ``(I - u u^T) / |y_i|`` (u = y_i / |y_i|)."""
    b, nd = Y.shape
    y = Y.reshape(b, nd // d, d)
    r = np.linalg.norm(y, axis=-1)
    u = y / r[..., None]
    eye = np.eye(d)
    blocks = eye - (eye - u[..., :, None] * u[..., None, :]) / r[..., None, None]
    out = np.zeros((b, nd, nd))
    for i in range(nd // d):
        out[:, i * d:(i + 1) * d, i * d:(i + 1) * d] = blocks[:, i]
    return out


def _certify_one_flow(jac, X, A0, seed, nd, eps, dtype, res=None):
    """``(mu0, lambda_max(S), Euclidean radius, margin)`` of one equilibrium of a flow (the module doc: the extended
    field ``F(z) = f(N(z)) - c (z - N(z))`` and the log-norm of DF in the metric of ``A^T S + S A = -I``), or None
    when it is not certified."""
    d = X.shape[-1]
    x = np.asarray(X, np.float64).ravel()
    c = float(np.max(np.abs(np.linalg.eigvals(A0))))
    if not c > 0:
        return None
    A = A0 - c * _radial(x[None], d)[0]
    if not float(np.max(np.linalg.eigvals(A).real)) < -1e3 * eps * c:
        return None
    m = _metric(_lyapunov_continuous(A))
    if m is None:
        return None
    half, half_inv, lmax = m
    mu0 = -0.5 / lmax
    mu1 = 0.5 * mu0
    dirs = _directions(seed, nd, x, d, half, half_inv, half @ A @ half_inv)

    def worst(r):
        Y = _chords(x, dirs, r, d)
        J = jac(Y)
        if not np.all(np.isfinite(J)):
            return np.inf
        B = half @ (J - c * _radial(Y, d)) @ half_inv
        return float(np.max(np.linalg.eigvalsh(0.5 * (B + np.swapaxes(B, -1, -2)))))

    got = _largest_radius(worst, mu1)
    if got is None:
        return None
    R = 0.5 * RADII[got[0]]
    if res is not None and not _shift_ok(half, res, R, -mu1):
        return None
    return mu0, lmax, R / np.sqrt(lmax), got[1]


def candidate_axes(dyn, solver=None) -> list[np.ndarray]:
    """The unit axes on which :func:`certificates` looks for equilibria (the real, simple eigenvectors of the layer
    matrix, in :func:`~attnflow.analysis.equilibria.eigenpairs` order), or [] for a model that gets none: only models
    on the product of unit spheres with a layer matrix (a :class:`~attnflow.LayerMap` with the l2 norm, a
    :class:`~attnflow.SphereFlow`; with the adaptive solver, a flow)."""
    return [vec for _, vec in _candidates(dyn, solver)]


def _candidates(dyn, solver) -> list[tuple[int, np.ndarray]]:
    """:func:`candidate_axes` with each axis's 0-based index in :func:`~attnflow.analysis.equilibria.eigenpairs`
    order (the k of the name v_{k+1})."""
    on_spheres = isinstance(dyn, SphereFlow) or (isinstance(dyn, LayerMap) and isinstance(dyn.norm, L2Norm))
    if not on_spheres or (isinstance(solver, Adaptive) and not isinstance(dyn, SphereFlow)):
        return []
    if getattr(getattr(dyn, "attn", None), "heads", None) is None:
        return []
    lam, V = eigenpairs(dyn)
    dt = matrix_dtype(dyn)  # the classifier's rule (docs/model.md section 10), so a certified member is named alike
    axis = is_real(lam, dtype=dt) & is_simple(lam, dtype=dt)
    return [(k, np.real(V[:, k]) / np.linalg.norm(np.real(V[:, k]))) for k in range(len(lam)) if axis[k]]


def layout(dyn, solver, tokens: int, dtype) -> Regions | None:
    """The :class:`~attnflow.evolve.regions.Regions` of a study before its certificates are known: every candidate
    axis, no radius (all negative). :func:`regions` fills in the same shapes, so the study's pool program can be
    compiled while the certificates are computed. None for a model that gets no certificates."""
    vecs = candidate_axes(dyn, solver)
    if not vecs:
        return None
    n = int(tokens)
    return Regions(device_array(np.stack(vecs), dtype), np.full((len(vecs), n + 1), -1.0), [a * (n + 1) for a in range(len(vecs))])


def regions(certs: list[Certificate], empty: Regions) -> Regions:
    """The regions of these certificates: `empty` (:func:`layout`'s, for the same model and solver) with their radii.
    The equilibrium of region ``axis (n + 1) + m`` is :func:`attnflow.evolve.regions.equilibria`'s."""
    r2 = np.array(empty.radius2, np.float64)
    for c in certs:
        r2[c.axis, c.m] = float(c.radius) ** 2
    return Regions(empty.axes, r2, empty.tags)
