"""When an eigenvalue is real, neutral or unstable: one helper, one documented tolerance per dtype.

Every question of this kind in attnflow is answered here (docs/model.md section 5):

- is lambda real? ``|Im lambda| <= tol max(1, |lambda|)``;
- are two eigenvalues the same (a repeated eigenvalue, whose eigenvectors are no label)? ``|lambda - mu| <= tol
  max(1, |lambda|)``;
- the growth of an eigenvalue mu of a map's Jacobian is ``|mu| - 1``, of a flow's ``Re mu``: *unstable* when the
  growth exceeds tol, *neutral* when it is within tol of 0, *stable* below.

The tolerance is :func:`tolerance` of the dtype the matrix was computed in (for :func:`is_real` and
:func:`is_simple`, by default the precision of the eigenvalues given: complex64 ones are float32's):
``10^floor(log10 sqrt(eps))``, i.e. 1e-8 for float64 and 1e-4 for float32. The square root is the accuracy of an
eigenvalue of multiplicity two (a perturbation of size eps of a defective eigenvalue moves it by about sqrt(eps));
neutral directions of symmetric models come in such pairs, and a smaller tolerance would call them stable or
unstable by rounding.
"""

from __future__ import annotations

import math

import equinox as eqx
import numpy as np


def tolerance(dtype=np.float64) -> float:
    """The tolerance of eigenvalue questions for matrices computed in `dtype`: 1e-8 (float64), 1e-4 (float32)."""
    eps = float(np.finfo(np.dtype(dtype)).eps)
    return float(10.0 ** math.floor(math.log10(math.sqrt(eps))))


def _dtype(v: np.ndarray, dtype):
    """`dtype`, or when None the precision of the values themselves: float32 for float32/complex64 eigenvalues (what
    ``numpy.linalg.eig`` returns for a float32 matrix), float16 for float16, float64 for anything else."""
    if dtype is not None:
        return dtype
    if v.dtype in (np.dtype(np.float32), np.dtype(np.complex64)):
        return np.float32
    return np.float16 if v.dtype == np.dtype(np.float16) else np.float64


def is_real(values, *, dtype=None, tol: float | None = None) -> np.ndarray:
    """Which eigenvalues are real: ``|Im lambda| <= tol max(1, |lambda|)`` (default tol: :func:`tolerance` of `dtype`,
    by default the precision of `values`: 1e-4 for complex64, 1e-8 for complex128)."""
    v = np.asarray(values)
    tol = tolerance(_dtype(v, dtype)) if tol is None else tol
    return np.abs(v.imag) <= tol * np.maximum(1.0, np.abs(v))


def is_simple(values, *, dtype=None, tol: float | None = None) -> np.ndarray:
    """Which eigenvalues are simple: no other eigenvalue within ``tol max(1, |lambda|)`` (default tol as
    :func:`is_real`)."""
    v = np.asarray(values).ravel()
    tol = tolerance(_dtype(v, dtype)) if tol is None else tol
    close = np.abs(v[:, None] - v[None, :]) <= tol * np.maximum(1.0, np.abs(v))[:, None]
    return close.sum(axis=1) == 1


class Verdict(eqx.Enumeration):
    """The linear-stability verdict of an equilibrium, from its intrinsic spectrum (codes: 0 stable, 1 unstable,
    2 neutral, 3 unknown). The measure is rho, the spectral radius of the intrinsic Jacobian (maps), or max Re, its
    largest real part (flows)."""

    stable = "every intrinsic eigenvalue strictly inside the boundary (rho < 1 for a map, max Re < 0 for a flow)"
    unstable = "an intrinsic eigenvalue beyond the boundary (rho > 1 for a map, max Re > 0 for a flow)"
    neutral = "no eigenvalue beyond the boundary, some on it (within tol): linear stability is undecided"
    unknown = "the spectrum could not be computed (a non-finite Jacobian) or the equilibrium could not be refined"


VERDICTS: tuple[str, ...] = tuple(sorted(Verdict._name_to_item, key=lambda k: int(Verdict._name_to_item[k]._value)))
"""Verdict names by code."""
STABLE, UNSTABLE, NEUTRAL, UNKNOWN = (VERDICTS.index(k) for k in ("stable", "unstable", "neutral", "unknown"))


def verdicts(eigs, discrete: bool, *, dtype=np.float64, tol: float | None = None):
    """``(measure, verdict, n_neutral, n_unstable)`` of eigenvalue sets ``(..., m)``: the growth is ``|mu| - 1``
    (maps) or ``Re mu`` (flows); unstable above tol, neutral within tol of 0 (default tol: :func:`tolerance`).
    A set with a non-finite eigenvalue has verdict ``unknown`` and measure NaN."""
    eigs = np.asarray(eigs)
    tol = tolerance(dtype) if tol is None else tol
    finite = np.all(np.isfinite(eigs), axis=-1)
    safe = np.where(finite[..., None], eigs, 0.0)
    g = np.abs(safe) - 1.0 if discrete else safe.real
    measure = np.abs(safe).max(-1) if discrete else safe.real.max(-1)
    neutral = (np.abs(g) <= tol).sum(-1)
    unstable = (g > tol).sum(-1)
    verdict = np.where(unstable > 0, UNSTABLE, np.where(neutral > 0, NEUTRAL, STABLE))
    return (np.where(finite, measure, np.nan), np.where(finite, verdict, UNKNOWN), np.where(finite, neutral, 0),
            np.where(finite, unstable, 0))


def _components(dep: np.ndarray) -> list[list[int]]:
    """The strongly connected components of the directed graph ``dep`` ``(g, g)`` (i -> j when ``dep[i, j]``)
    (Tarjan's algorithm, iterative)."""
    g = dep.shape[0]
    succ = [np.flatnonzero(dep[i]) for i in range(g)]
    index, low, on, stack, comps = [-1] * g, [0] * g, [False] * g, [], []
    counter = 0
    for root in range(g):
        if index[root] >= 0:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on[v] = True
            for k in range(i, len(succ[v])):
                w = int(succ[v][k])
                if index[w] < 0:
                    work.append((v, k + 1))
                    work.append((w, 0))
                    break
                if on[w]:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on[w] = False
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(sorted(comp))
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
    return comps


def block_eigvals(J, groups) -> np.ndarray:
    """Eigenvalues of matrices ``J`` ``(..., m, m)`` whose coordinates come in `groups` (an int g: g groups of m / g
    consecutive coordinates, one per token; or a list of the groups' sizes, in order), read from the block-triangular
    form the groups' dependencies give: where the block of groups (i, j) is exactly zero (group i does not depend on
    group j, as under a causal or window mask), the eigenvalues of J are those of its diagonal blocks over the
    strongly connected components of the dependency graph. Exact, where ``numpy.linalg.eigvals`` of the whole matrix
    loses almost all of its digits on the repeated, defective eigenvalues such structures have (32 tokens under a
    window of 2: an error of about eps^(1/31), which made a stable equilibrium unstable, docs/model.md section 5).
    When every group depends on every other, this is ``eigvals(J)``."""
    J = np.asarray(J)
    m = J.shape[-1]
    if isinstance(groups, (int, np.integer)):
        sizes = [m // groups] * groups if groups > 0 and m % groups == 0 else None
    else:
        sizes = [int(c) for c in groups]
    if J.size == 0 or sizes is None or len(sizes) < 2 or sum(sizes) != m or min(sizes) < 1:
        return np.linalg.eigvals(J)
    flat = J.reshape(-1, m, m)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    nz = flat != 0
    g = len(sizes)
    # dep[b, i, j]: some entry of block (i, j) is nonzero
    rows_any = np.logical_or.reduceat(nz, starts[:-1], axis=1)
    dep = np.logical_or.reduceat(rows_any, starts[:-1], axis=2)
    out = np.empty(flat.shape[:2], dtype=complex)
    patterns, inverse = np.unique(dep.reshape(len(flat), -1), axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse.ravel() == p)
        comps = _components(pattern.reshape(g, g))
        if len(comps) == 1:
            out[rows] = np.linalg.eigvals(flat[rows])
            continue
        at = 0
        for comp in comps:
            idx = np.concatenate([np.arange(starts[c], starts[c + 1]) for c in comp])
            out[rows, at:at + idx.size] = np.linalg.eigvals(flat[rows][:, idx[:, None], idx[None, :]])
            at += idx.size
    return out.reshape(J.shape[:-1])
