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

from .._types import Array, Batch, Int
from ..evolve.simulate import STATUS_NAMES
from .equilibria import eigenpairs

NOT_CONVERGED, CONSENSUS, BIPARTITE, CLUSTERING, POLYGONAL = 0, 1, 2, 3, 4
NONFINITE, DEGENERATE, SOLVER_FAILED, SADDLE = 5, 6, 7, 8
KIND_NAMES = ("not_converged", "consensus", "bipartite", "clustering", "polygonal", "nonfinite", "degenerate",
              "solver_failed", "saddle")
"""Label kinds. Codes 0 and 5-8 are outcome categories, not attractors: a member that hit the step cap (0), went
non-finite (5), left the state space while finite, e.g. a zero row (6), whose solver failed (7), or that stopped at
an equilibrium verified to be unstable (8, set by the basin study, never by :func:`classify`)."""
UNCLASSIFIED = (NOT_CONVERGED, NONFINITE, DEGENERATE, SOLVER_FAILED, SADDLE)


def status_to_kind() -> np.ndarray:
    """Lookup table simulate status code -> label kind for members that did not converge (by status name, so new
    codes of :data:`attnflow.STATUS_NAMES` map correctly); unknown codes map to "solver_failed"."""
    names = tuple(STATUS_NAMES)
    size = max(len(names), 5)
    table = np.full(size, SOLVER_FAILED, np.int32)
    for code, name in enumerate(names):
        table[code] = {"max_steps": NOT_CONVERGED, "converged": -1, "nonfinite": NONFINITE, "degenerate": DEGENERATE,
                       "solver_failed": SOLVER_FAILED}.get(name, SOLVER_FAILED)
    if "degenerate" not in names and size > 4:
        table[4] = DEGENERATE
    return table


class Labels(eqx.Module):
    """Per-state labels (arrays with a leading batch axis).

    - `kind`: code in :data:`KIND_NAMES`.
    - `clusters`: number of distinct token positions.
    - `sizes`: ``(b, n)`` cluster sizes, sorted descending, zero-padded.
    - `eigenvector`: index k (descending real part) with every token at +-v_k, or -1.
    - `sign`: +1/-1 for consensus on +-v_k; +1 for bipartite (see `split`); 0 otherwise.
    - `split`: number of tokens at +v_k (bipartite), n for consensus, 0 otherwise.
    - `gram`: ``(b, n)`` sorted Gram-matrix eigenvalues, rounded to `decimals` (an invariant feature).
    """

    kind: Int[Array, " b"]
    clusters: Int[Array, " b"]
    sizes: Int[Array, "b n"]
    eigenvector: Int[Array, " b"]
    sign: Int[Array, " b"]
    split: Int[Array, " b"]
    gram: Array
    tokens: int = eqx.field(static=True, default=0)

    def rows(self) -> np.ndarray:
        """One integer row per state that identifies its attractor (see :func:`label_rows`)."""
        return label_rows(self)

    def names(self) -> list[str]:
        """The :func:`equilibrium_name` of every state."""
        return [describe(r, self.tokens)["label"] for r in self.rows()]


def _components(X, tol):
    n = X.shape[0]
    D = jnp.sqrt(jnp.maximum(jnp.sum((X[:, None] - X[None]) ** 2, -1), 0.0))
    A = D < tol
    lab = jnp.arange(n)
    lab = jax.lax.fori_loop(0, n, lambda _, l: jnp.min(jnp.where(A, l[None, :], n), axis=1), lab)
    sizes = jnp.sum(lab[None, :] == jnp.arange(n)[:, None], axis=1)
    return jnp.sum(sizes > 0), -jnp.sort(-sizes)


def _gram_spectrum(X):
    """The sorted eigenvalues of the Gram matrix X X^T ``(n,)``: those of the smaller of X X^T and X^T X, padded
    with the zeros of the rank deficit (the nonzero spectra of X X^T and X^T X coincide)."""
    n, d = X.shape
    if d >= n:
        return jnp.linalg.eigvalsh(X @ X.T)
    return jnp.concatenate([jnp.zeros(n - d, X.dtype), jnp.linalg.eigvalsh(X.T @ X)])


class Classifier(eqx.Module):
    """The labeller of one model: ``Classifier(...)(final, status=None) -> Labels`` (traceable; :func:`classifier`
    builds it, :func:`classify` calls it under ``jit``)."""

    vecs: Array
    real: Array
    table: Array
    tol: float = eqx.field(static=True)
    decimals: int = eqx.field(static=True)

    def __call__(self, final: Batch, status=None) -> Labels:
        st = jnp.zeros(final.shape[0], jnp.int32) if status is None else status
        vecs = self.vecs.astype(final.dtype)
        out = jax.vmap(lambda x, s: self._one(x, s, vecs, status is not None))(final, st)
        return Labels(*out, tokens=final.shape[1])

    def _one(self, X, status, vecs, use_status):
        n, tol = X.shape[0], self.tol
        clusters, sizes = _components(X, tol)
        c = X @ vecs  # (n, d): cosines with each eigenvector
        on_axis = jnp.all(jnp.abs(jnp.abs(c) - 1.0) < tol, axis=0) & self.real
        k = jnp.where(jnp.any(on_axis), jnp.argmax(on_axis), -1)
        ck = c[:, jnp.maximum(k, 0)]
        npos = jnp.sum(ck > 0)
        aligned = k >= 0
        consensus = clusters == 1
        bip = aligned & (clusters == 2)
        poly = (~aligned) & (clusters >= 2) & (jnp.max(jnp.abs(jnp.sum(X, axis=0))) < tol)
        kind = jnp.where(consensus, CONSENSUS, jnp.where(bip, BIPARTITE, jnp.where(poly, POLYGONAL, CLUSTERING)))
        if use_status:
            cat = self.table[jnp.clip(status, 0, self.table.shape[0] - 1)]
            kind = jnp.where(cat < 0, kind, cat)
        sign = jnp.where(consensus & aligned, jnp.where(npos == n, 1, -1), jnp.where(bip, 1, 0))
        split = jnp.where(bip, npos, jnp.where(consensus & aligned, n, 0))
        g = jnp.round(_gram_spectrum(X) * 10**self.decimals) / 10**self.decimals
        return kind, clusters, sizes, jnp.where(aligned | consensus, k, -1), sign, split, g


def classifier(model, *, tol: float = 1e-3, decimals: int = 3) -> Classifier:
    """The :class:`Classifier` of ``model`` (any dynamics, Heads, or W itself); see :func:`classify`."""
    lam, V = eigenpairs(model)
    real = np.abs(lam.imag) < 1e-12
    # an eigenvector of a repeated eigenvalue is an arbitrary basis vector of its eigenspace: not a label
    simple = np.array([np.sum(np.abs(lam - l) < 1e-9) == 1 for l in lam])
    real &= simple
    vecs = np.where(real[None, :], np.real(V), 0.0)
    return Classifier(jnp.asarray(vecs), jnp.asarray(real), jnp.asarray(status_to_kind()), float(tol), int(decimals))


_classify = eqx.filter_jit(lambda c, X, status: c(X, status))


def classify(model, final: Batch, status=None, *, tol: float = 1e-3, decimals: int = 3) -> Labels:
    """Label final states ``(b, n, d)`` of ``model`` (any dynamics, Heads, or W itself, or a :class:`Classifier`
    already built for it: then `tol` and `decimals` are its own).

    `status` (from :class:`~attnflow.Solution`) marks members that did not converge (kind "not_converged",
    "nonfinite", "degenerate" or "solver_failed" by status name); `tol` is the distance
    under which two tokens are one cluster, and how close |cos(x_i, v_k)| must be to 1.
    """
    X = jnp.asarray(final)
    if X.ndim == 2:
        X = X[None]
    c = model if isinstance(model, Classifier) else classifier(model, tol=tol, decimals=decimals)
    return _classify(c, X, None if status is None else jnp.asarray(status))


_CATEGORY_NAMES = {"not_converged": "not converged", "nonfinite": "nonfinite", "degenerate": "degenerate",
                   "solver_failed": "solver failed", "saddle": "saddle"}


def equilibrium_name(kind: str, vector: int | None, *, sign: int | None = None, split: int | None = None,
                     tokens: int | None = None, sizes=None) -> str:
    """The one human name of an equilibrium (or of an outcome category), used by every command, JSON and figure.

    Eigenvectors are numbered from 1 as in the papers: `vector` is the 0-based index k in the order of
    :func:`attnflow.analysis.equilibria.eigenpairs` (descending real part of the eigenvalue), and the name says
    ``v{k+1}``, so ``v1`` is the principal eigenvector.

    - consensus on an eigenvector: ``"consensus +v1"`` / ``"consensus -v1"`` (`sign`, default +1);
      consensus that is not on an eigenvector (`vector` None): ``"consensus (off-axis)"``.
    - bipartite: ``"bipartite v1 3:7"``: `split` = 3 tokens at +v1 and ``tokens - split`` = 7 at -v1
      (the sign of v_k is fixed by the largest entry being positive).
    - clustering / polygonal: ``"clustering 4:3:3"``, ``"polygonal 5:5"``: the cluster `sizes`, descending
      (just ``"clustering"`` when no sizes are given); on an eigenvector: ``"clustering v2 4:3:3"``.
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
    if kind in _CATEGORY_NAMES:
        return _CATEGORY_NAMES[kind]
    v = None if vector is None or int(vector) < 0 else f"v{int(vector) + 1}"
    if kind == "consensus":
        if v is None:
            return "consensus (off-axis)"
        return f"consensus {'-' if sign is not None and int(sign) < 0 else '+'}{v}"
    if kind == "bipartite":
        if split is None or tokens is None:
            raise ValueError("a bipartite name needs split and tokens")
        parts = f"{int(split)}:{int(tokens) - int(split)}"
        return f"bipartite {v} {parts}" if v is not None else f"bipartite (off-axis) {parts}"
    name = kind if v is None else f"{kind} {v}"
    sz = [int(s) for s in (sizes if sizes is not None else []) if int(s) > 0]
    return f"{name} {':'.join(str(s) for s in sorted(sz, reverse=True))}" if sz else name


def label_rows(labels: Labels) -> np.ndarray:
    """One integer row per state that identifies its attractor: (kind, eigenvector, sign, split, sizes...,
    gram x 10^3...) with the invariant features zeroed for eigenvector-aligned states and everything but the kind
    zeroed for states that did not converge."""
    L = jax.tree.map(np.asarray, labels)
    aligned = L.eigenvector >= 0
    sizes = np.where(aligned[:, None], 0, L.sizes)
    gram = np.where(aligned[:, None], 0, np.round(L.gram * 1000)).astype(np.int64)
    rows = np.column_stack([L.kind, L.eigenvector, L.sign, L.split, sizes, gram]).astype(np.int64)
    rows[np.isin(L.kind, UNCLASSIFIED), 1:] = 0  # one class per outcome category, whatever the state looked like
    return rows


def describe(row, n: int) -> dict:
    """Name and fields of an attractor row from :func:`label_rows` of states with `n` tokens.

    Returns a dict: ``label`` (the :func:`equilibrium_name`), ``kind``, ``eigenvector`` (0-based index, or None),
    ``sign``, ``split`` (tokens at +v_k for bipartite) and ``sizes`` (cluster sizes, descending)."""
    kind, k, sign, split = (int(v) for v in row[:4])
    sizes = [int(s) for s in row[4 : 4 + n] if s > 0]
    name = KIND_NAMES[kind]
    vec = k if k >= 0 and kind in (CONSENSUS, BIPARTITE) else None
    if kind == CONSENSUS:
        label = equilibrium_name(name, vec, sign=sign)
    elif kind == BIPARTITE:
        label = equilibrium_name(name, vec, split=split, tokens=n)
    elif kind in UNCLASSIFIED:
        label = equilibrium_name(name, None)
    else:
        label = equilibrium_name(name, None, sizes=sizes)
        gram = [g / 1000 for g in row[4 + n :] if g != 0]
        label += f" gram {np.round(gram, 2).tolist()}" if kind == CLUSTERING else ""
    return {"label": label, "kind": name, "eigenvector": vec,
            "sign": sign if kind in (CONSENSUS, BIPARTITE) and vec is not None else None,
            "split": split if kind == BIPARTITE else None, "sizes": sizes if kind in (CLUSTERING, POLYGONAL) else None}
