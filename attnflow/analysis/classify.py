"""Labels of final states: consensus / bipartite / m-clustering / polygonal / not converged.

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
from ..evolve.simulate import CONVERGED
from .equilibria import eigenpairs

NOT_CONVERGED, CONSENSUS, BIPARTITE, CLUSTERING, POLYGONAL = 0, 1, 2, 3, 4
KIND_NAMES = ("not_converged", "consensus", "bipartite", "clustering", "polygonal")


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


def _components(X, tol):
    n = X.shape[0]
    D = jnp.sqrt(jnp.maximum(jnp.sum((X[:, None] - X[None]) ** 2, -1), 0.0))
    A = D < tol
    lab = jnp.arange(n)
    lab = jax.lax.fori_loop(0, n, lambda _, l: jnp.min(jnp.where(A, l[None, :], n), axis=1), lab)
    sizes = jnp.sum(lab[None, :] == jnp.arange(n)[:, None], axis=1)
    return jnp.sum(sizes > 0), -jnp.sort(-sizes)


def _one(X, status, vecs, real, tol, use_status, decimals):
    n = X.shape[0]
    clusters, sizes = _components(X, tol)
    c = X @ vecs  # (n, d): cosines with each eigenvector
    on_axis = jnp.all(jnp.abs(jnp.abs(c) - 1.0) < tol, axis=0) & real
    k = jnp.where(jnp.any(on_axis), jnp.argmax(on_axis), -1)
    ck = c[:, jnp.maximum(k, 0)]
    npos = jnp.sum(ck > 0)
    aligned = k >= 0
    consensus = clusters == 1
    bip = aligned & (clusters == 2)
    poly = (~aligned) & (clusters >= 2) & (jnp.max(jnp.abs(jnp.sum(X, axis=0))) < tol)
    kind = jnp.where(consensus, CONSENSUS, jnp.where(bip, BIPARTITE, jnp.where(poly, POLYGONAL, CLUSTERING)))
    if use_status:
        kind = jnp.where(status == CONVERGED, kind, NOT_CONVERGED)
    sign = jnp.where(consensus & aligned, jnp.where(npos == n, 1, -1), jnp.where(bip, 1, 0))
    split = jnp.where(bip, npos, jnp.where(consensus & aligned, n, 0))
    g = jnp.linalg.eigvalsh(X @ X.T)
    g = jnp.round(g * 10**decimals) / 10**decimals
    return kind, clusters, sizes, jnp.where(aligned | consensus, k, -1), sign, split, g


@eqx.filter_jit
def _classify(X, status, vecs, real, tol, use_status, decimals):
    out = jax.vmap(lambda x, s: _one(x, s, vecs, real, tol, use_status, decimals))(X, status)
    return Labels(*out)


def classify(model, final: Batch, status=None, *, tol: float = 1e-3, decimals: int = 3) -> Labels:
    """Label final states ``(b, n, d)`` of ``model`` (any dynamics, Heads, or W itself).

    `status` (from :class:`~attnflow.Solution`) marks members that did not converge; `tol` is the distance
    under which two tokens are one cluster, and how close |cos(x_i, v_k)| must be to 1.
    """
    lam, V = eigenpairs(model)
    real = np.abs(lam.imag) < 1e-12
    # an eigenvector of a repeated eigenvalue is an arbitrary basis vector of its eigenspace: not a label
    simple = np.array([np.sum(np.abs(lam - l) < 1e-9) == 1 for l in lam])
    real &= simple
    vecs = np.where(real[None, :], np.real(V), 0.0)
    X = jnp.asarray(final)
    if X.ndim == 2:
        X = X[None]
    use_status = status is not None
    st = jnp.zeros(X.shape[0], jnp.int32) if status is None else jnp.asarray(status)
    return _classify(X, st, jnp.asarray(vecs, X.dtype), jnp.asarray(real), float(tol), use_status, int(decimals))


def label_rows(labels: Labels) -> np.ndarray:
    """One integer row per state that identifies its attractor: (kind, eigenvector, sign, split, sizes...,
    gram x 10^3...) with the invariant features zeroed for eigenvector-aligned states and everything but the kind
    zeroed for states that did not converge."""
    L = jax.tree.map(np.asarray, labels)
    aligned = L.eigenvector >= 0
    sizes = np.where(aligned[:, None], 0, L.sizes)
    gram = np.where(aligned[:, None], 0, np.round(L.gram * 1000)).astype(np.int64)
    rows = np.column_stack([L.kind, L.eigenvector, L.sign, L.split, sizes, gram]).astype(np.int64)
    rows[L.kind == NOT_CONVERGED, 1:] = 0  # one "not converged" class, whatever the state looked like
    return rows


def describe(row, n: int) -> dict:
    """Human label and fields of an attractor row from :func:`label_rows`."""
    kind, k, sign, split = (int(v) for v in row[:4])
    sizes = [int(s) for s in row[4 : 4 + n] if s > 0]
    name = KIND_NAMES[kind]
    if kind == CONSENSUS and k >= 0:
        label = f"consensus v{k} {'+' if sign > 0 else '-'}"
    elif kind == CONSENSUS:
        label = "consensus (off-axis)"
    elif kind == BIPARTITE:
        label = f"bipartite v{k} {split}/{n}"
    elif kind == NOT_CONVERGED:
        label = "not converged"
    else:
        label = f"{len(sizes)}-{name} {sizes}"
        gram = [g / 1000 for g in row[4 + n :] if g != 0]
        label += f" gram {np.round(gram, 2).tolist()}" if kind == CLUSTERING else ""
    return {"label": label, "kind": name, "eigenvector": k if k >= 0 else None, "sign": sign if kind in (CONSENSUS, BIPARTITE) else None,
            "split": split if kind == BIPARTITE else None}
