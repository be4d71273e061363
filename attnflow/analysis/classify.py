"""Labels of final states: consensus / bipartite / m-clustering / polygonal, or an outcome category
(not converged, nonfinite, degenerate, solver failed, saddle).

Batched and jitted: millions of states are labelled chunk by chunk. Labels never depend on token order:
clusters are the connected components of the graph |x_i - x_j| < tol (min-label propagation), and the
features used to group states that are not aligned with an eigenvector of W are invariant under token
permutations and rotations: the sorted cluster sizes and the sorted spectrum of the Gram matrix X X^T.
So a continuous symmetry (W, M multiples of I) never splits one attractor into many.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._device import device_array
from .._types import Array, Batch, Int
from ..evolve.outcome import CONVERGED, NONFINITE, NOT_CONVERGED, OUTCOMES, SADDLE, outcome_code
from .eigen import is_real, is_simple
from .equilibria import eigenpairs
from .spectral import matrix_dtype

CONSENSUS, BIPARTITE, CLUSTERING, POLYGONAL = 0, 1, 2, 3
KIND_NAMES = ("consensus", "bipartite", "clustering", "polygonal")
"""The kinds of equilibria a converged state is labelled with (codes 0-3). What became of a member that did not
converge is its :class:`~attnflow.Outcome`, never a kind."""

OUTCOME_LABELS = {"not_converged": "not converged", "nonfinite": "nonfinite", "degenerate": "degenerate",
                  "solver_failed": "solver failed", "saddle": "saddle"}
"""How the outcome categories (every outcome but ``converged``) are named in reports, JSON and figures."""


class Labels(eqx.Module):
    """Per-state labels (arrays with a leading batch axis).

    - `outcome`: :class:`~attnflow.Outcome` code of each member (``converged`` when the states were given alone;
      ``nonfinite`` for a state with a non-finite entry, which is never named as an equilibrium).
    - `kind`: code in :data:`KIND_NAMES` (the shape of the state, whatever its outcome).
    - `clusters`: number of distinct token positions.
    - `sizes`: ``(b, n)`` cluster sizes, sorted descending, zero-padded.
    - `eigenvector`: index k (descending real part) with every token at +-v_k, or -1.
    - `sign`: +1/-1 for consensus on +-v_k; +1 for bipartite (see `split`); 0 otherwise.
    - `split`: number of tokens at +v_k (bipartite), n for consensus, 0 otherwise.
    - `gram`: ``(b, n)`` sorted Gram-matrix eigenvalues, rounded to `decimals` (an invariant feature).
    """

    outcome: Int[Array, " b"]
    kind: Int[Array, " b"]
    clusters: Int[Array, " b"]
    sizes: Int[Array, "b n"]
    eigenvector: Int[Array, " b"]
    sign: Int[Array, " b"]
    split: Int[Array, " b"]
    gram: Array
    tokens: int = eqx.field(static=True, default=0)

    def rows(self) -> np.ndarray:
        """One integer row per member that identifies its attractor or outcome (see :func:`label_rows`)."""
        return label_rows(self)

    def names(self) -> list[str]:
        """The name of every member: its attractor's :func:`equilibrium_name`, or its outcome category."""
        return [describe(r, self.tokens)["name"] for r in self.rows()]


SEPARATION = 10.0
"""Two clusters of a converged state must be at least ``SEPARATION x tol`` apart; closer (but not within `tol`),
the state is no equilibrium resolved at `tol` (e.g. tokens still closing in on one point, stopped by a coarse stop
tolerance), and the member is reported ``not converged`` rather than named by an accidental split."""


def _components(X, tol):
    """(number of clusters, sizes descending, whether two distinct clusters are closer than SEPARATION x tol)."""
    n = X.shape[0]
    D = jnp.sqrt(jnp.maximum(jnp.sum((X[:, None] - X[None]) ** 2, -1), 0.0))
    A = D < tol
    lab = jnp.arange(n)
    lab = jax.lax.fori_loop(0, n, lambda _, l: jnp.min(jnp.where(A, l[None, :], n), axis=1), lab)
    sizes = jnp.sum(lab[None, :] == jnp.arange(n)[:, None], axis=1)
    close = jnp.any((lab[:, None] != lab[None, :]) & (D < SEPARATION * tol))
    return jnp.sum(sizes > 0), -jnp.sort(-sizes), close


def _gram_spectrum(X):
    """The sorted eigenvalues of the Gram matrix X X^T ``(n,)``: those of the smaller of X X^T and X^T X, padded
    with the zeros of the rank deficit (the nonzero spectra of X X^T and X^T X coincide)."""
    n, d = X.shape
    if d >= n:
        return jnp.linalg.eigvalsh(X @ X.T)
    return jnp.concatenate([jnp.zeros(n - d, X.dtype), jnp.linalg.eigvalsh(X.T @ X)])


class Classifier(eqx.Module):
    """The labeller of one model: ``Classifier(...)(final, outcome=None) -> Labels`` (traceable; :func:`classifier`
    builds it, :func:`classify` calls it under ``jit``)."""

    vecs: Array
    real: Array
    tol: float = eqx.field(static=True)
    decimals: int = eqx.field(static=True)

    def __call__(self, final: Batch, outcome=None) -> Labels:
        oc = jnp.full(final.shape[0], CONVERGED, jnp.int32) if outcome is None else jnp.asarray(outcome, jnp.int32)
        # a state with a non-finite entry is no equilibrium, whatever it was called (states given alone are)
        oc = jnp.where((oc == CONVERGED) & ~jnp.all(jnp.isfinite(final), axis=(1, 2)), NONFINITE, oc)
        vecs = self.vecs.astype(final.dtype)
        *out, unresolved = jax.vmap(lambda x: self._one(jnp.where(jnp.isfinite(x), x, 0.0), vecs))(final)
        oc = jnp.where((oc == CONVERGED) & unresolved, NOT_CONVERGED, oc)
        return Labels(oc, *out, tokens=final.shape[1])

    def _one(self, X, vecs):
        n, tol = X.shape[0], self.tol
        clusters, sizes, close = _components(X, tol)
        r = jnp.sqrt(jnp.sum(X * X, axis=-1, keepdims=True))
        c = (X / jnp.where(r > 0, r, 1.0)) @ vecs  # (n, d): cosines with each eigenvector (off the unit sphere too)
        on_axis = jnp.all(jnp.abs(jnp.abs(c) - 1.0) < tol, axis=0) & self.real
        k = jnp.where(jnp.any(on_axis), jnp.argmax(on_axis), -1)
        ck = c[:, jnp.maximum(k, 0)]
        npos = jnp.sum(ck > 0)
        aligned = k >= 0
        consensus = clusters == 1
        bip = aligned & (clusters == 2) & (npos > 0) & (npos < n)
        poly = (~aligned) & (clusters >= 2) & (jnp.max(jnp.abs(jnp.sum(X, axis=0))) < tol)
        kind = jnp.where(consensus, CONSENSUS, jnp.where(bip, BIPARTITE, jnp.where(poly, POLYGONAL, CLUSTERING)))
        sign = jnp.where(consensus & aligned, jnp.where(npos == n, 1, -1), jnp.where(bip, 1, 0))
        split = jnp.where(bip, npos, jnp.where(consensus & aligned, n, 0))
        g = jnp.round(_gram_spectrum(X) * 10**self.decimals) / 10**self.decimals
        # unresolved at tol: two clusters closer than SEPARATION x tol, or two clusters on one side of an axis (every
        # token on the axis but the state neither a consensus nor bipartite: two clusters on one side, or three or more)
        unresolved = close | (aligned & ~consensus & ~bip)
        return kind, clusters, sizes, jnp.where(aligned | consensus, k, -1), sign, split, g, unresolved


def classifier(model, *, tol: float = 1e-3, decimals: int = 3) -> Classifier:
    """The :class:`Classifier` of ``model`` (any dynamics, Heads, or W itself); see :func:`classify`. Only the real,
    simple eigenvectors of W label states (:mod:`attnflow.analysis.eigen`): an eigenvector of a repeated eigenvalue
    is an arbitrary basis vector of its eigenspace."""
    lam, V = eigenpairs(model)
    dt = matrix_dtype(model)  # the tolerance of the dtype W was computed in (W itself is handed over in float64)
    real = is_real(lam, dtype=dt) & is_simple(lam, dtype=dt)
    vecs = np.where(real[None, :], np.real(V), 0.0)
    return Classifier(device_array(vecs), device_array(real), float(tol), int(decimals))


_classify = eqx.filter_jit(lambda c, X, outcome: c(X, outcome))


def classify(model, final: Batch, outcome=None, *, tol: float = 1e-3, decimals: int = 3) -> Labels:
    """Label final states ``(b, n, d)`` of ``model`` (any dynamics, Heads, or W itself, or a :class:`Classifier`
    already built for it: then `tol` and `decimals` are its own).

    `outcome` (``Solution.outcome``) says what became of each member; only ``converged`` members are named by their
    attractor (the others by their outcome). `tol` is the distance under which two tokens are one cluster, and how
    close |cos(x_i, v_k)| must be to 1.
    """
    X = jnp.asarray(final)
    if X.ndim == 2:
        X = X[None]
    c = model if isinstance(model, Classifier) else classifier(model, tol=tol, decimals=decimals)
    d = c.vecs.shape[-2]
    if X.ndim != 3 or X.shape[-1] != d or jnp.issubdtype(X.dtype, jnp.complexfloating):
        raise ValueError(f"final states must be real (b, n, d) or (n, d) with d = {d} (the model's), got "
                         f"{X.dtype} {tuple(np.shape(final))}")
    if not jnp.issubdtype(X.dtype, jnp.floating):  # integer or boolean coordinates (e.g. exact +-e_k)
        X = X.astype(c.vecs.real.dtype if jnp.iscomplexobj(c.vecs) else c.vecs.dtype)
    return _classify(c, X, None if outcome is None else jnp.asarray(outcome, jnp.int32))


def equilibrium_name(kind: str, vector: int | None, *, sign: int | None = None, split: int | None = None,
                     tokens: int | None = None, sizes=None) -> str:
    """The one human name of an equilibrium (or of an outcome category), used by every command, JSON and figure.

    Eigenvectors are numbered from 1 as in the papers: `vector` is the 0-based index k in the order of
    :func:`attnflow.analysis.equilibria.eigenpairs` (descending real part of the eigenvalue), and the name says
    ``v{k+1}``, so ``v1`` is the principal eigenvector.

    - consensus on an eigenvector: ``"consensus +v1"`` / ``"consensus -v1"`` (`sign`, default +1);
      consensus that is not on an eigenvector (`vector` None): ``"consensus (off-axis)"``.
    - bipartite: ``"bipartite v1 3:7"``: `split` = 3 tokens at +v1 and ``tokens - split`` = 7 at -v1
      (the sign of v_k is fixed by the largest entry being positive); without a vector (`vector` None) there is no
      sign to count against: ``"bipartite (off-axis) 7:3"``, the two sizes descending.
    - clustering / polygonal: ``"clustering 4:3:3"``, ``"polygonal 5:5"``: the cluster `sizes`, descending
      (just ``"clustering"`` when no sizes are given). :func:`describe` appends the row's Gram spectrum
      (``"polygonal 1:1:1:1 gram [2.0, 2.0]"``, a square) so that distinct rows have distinct names. The
      classifier never names one on an eigenvector (every token on an axis is a consensus, a bipartite state, or
      unresolved: ``not converged``).
    - outcome categories that are no equilibrium: ``"not converged"``, ``"nonfinite"``, ``"degenerate"``,
      ``"solver failed"``, ``"saddle"``.
    - any other kind: the kind with ``v{k+1}`` and the sizes appended when given.

    **Arguments:** `kind` (``"consensus"``, ``"bipartite"``, ``"clustering"``, ``"polygonal"``, a category above,
    or a code from :data:`KIND_NAMES`); `vector` (0-based eigenvector index or None); `sign`, `split`, `tokens`,
    `sizes` as above.

    **Returns:** the name (str).
    """
    if isinstance(kind, (int, np.integer)):
        kind = KIND_NAMES[int(kind)]
    kind = str(kind).strip().lower().replace(" ", "_").replace("-", "_")
    if kind in OUTCOME_LABELS:
        return OUTCOME_LABELS[kind]
    v = None if vector is None or int(vector) < 0 else f"v{int(vector) + 1}"
    if kind == "consensus":
        if v is None:
            return "consensus (off-axis)"
        return f"consensus {'-' if sign is not None and int(sign) < 0 else '+'}{v}"
    if kind == "bipartite":
        if split is None or tokens is None:
            raise ValueError("a bipartite name needs split and tokens")
        m, rest = int(split), int(tokens) - int(split)
        if v is not None:
            return f"bipartite {v} {m}:{rest}"
        return f"bipartite (off-axis) {max(m, rest)}:{min(m, rest)}"  # no axis, no sign: the sizes, descending
    name = kind if v is None else f"{kind} {v}"
    sz = [int(s) for s in (sizes if sizes is not None else []) if int(s) > 0]
    return f"{name} {':'.join(str(s) for s in sorted(sz, reverse=True))}" if sz else name


def label_rows(labels: Labels) -> np.ndarray:
    """One integer row per member that identifies its attractor or outcome: (outcome, kind, eigenvector, sign,
    split, sizes..., gram x 10^3...) with the invariant features zeroed for eigenvector-aligned states, and everything
    but the outcome zeroed for members that did not converge (one row per outcome category)."""
    L = jax.tree.map(np.asarray, labels)
    aligned = L.eigenvector >= 0
    sizes = np.where(aligned[:, None], 0, L.sizes)
    gram = np.where(aligned[:, None], 0, np.round(L.gram * 1000)).astype(np.int64)
    rows = np.column_stack([L.outcome, L.kind, L.eigenvector, L.sign, L.split, sizes, gram]).astype(np.int64)
    rows[L.outcome != CONVERGED, 1:] = 0
    return rows


def describe(row, n: int) -> dict:
    """Name and fields of a row of :func:`label_rows` of states with `n` tokens.

    Returns a dict: ``name`` (what the member is reported under: the :func:`equilibrium_name` of its attractor, or
    its outcome category, e.g. ``"not converged"`` or ``"saddle"``), ``outcome`` (its :class:`~attnflow.Outcome`
    name), ``equilibrium`` (the name of the equilibrium it stopped at, for ``converged`` and ``saddle`` rows, else
    None), ``kind`` (the equilibrium kind, or the outcome name for a category), ``eigenvector`` (0-based index, or
    None), ``sign``, ``split`` (tokens at +v_k for bipartite) and ``sizes`` (cluster sizes, descending)."""
    outcome, kind, k, sign, split = (int(v) for v in row[:5])
    oname = OUTCOMES[outcome]
    if outcome != CONVERGED and outcome != SADDLE:
        return {"name": OUTCOME_LABELS[oname], "outcome": oname, "equilibrium": None, "kind": oname, "eigenvector": None,
                "sign": None, "split": None, "sizes": None}
    sizes = [int(s) for s in row[5 : 5 + n] if s > 0]
    kname = KIND_NAMES[kind]
    vec = k if k >= 0 and kind in (CONSENSUS, BIPARTITE) else None
    if kind == CONSENSUS:
        eq = equilibrium_name(kname, vec, sign=sign)
    elif kind == BIPARTITE:
        eq = equilibrium_name(kname, vec, split=split, tokens=n)
    else:
        eq = equilibrium_name(kname, None, sizes=sizes)
        gram = [g / 1000 for g in row[5 + n :] if g != 0]
        # the row's thousandths: one name per row (two zero-sum states with the same sizes, a square and a
        # tetrahedron, are two polygonal rows)
        eq += f" gram {np.round(gram, 3).tolist()}"
    return {"name": eq if outcome == CONVERGED else OUTCOME_LABELS[oname], "outcome": oname, "equilibrium": eq,
            "kind": kname if outcome == CONVERGED else oname, "eigenvector": vec,
            "sign": sign if kind in (CONSENSUS, BIPARTITE) and vec is not None else None,
            "split": split if kind == BIPARTITE else None, "sizes": sizes if kind in (CLUSTERING, POLYGONAL) else None}


def category_row(outcome: str | int, width: int) -> np.ndarray:
    """The label row of an outcome category (every field but the outcome zero), of length `width`."""
    code = outcome_code(outcome) if isinstance(outcome, str) else int(outcome)
    row = np.zeros(width, np.int64)
    row[0] = code
    return row
