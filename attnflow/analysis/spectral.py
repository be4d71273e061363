"""Spectra of layer, head and score matrices: eigenpairs, gaps, subspaces, cumulative products.

Formulas: docs/model.md sections 1, 6 and 8. Matrices act on column vectors (y = W x).

**Where it runs.** General (non-symmetric) eigendecompositions run on the host with
``numpy.linalg.eig`` (LAPACK ``geev``): the inputs are at most a few thousand wide, there are at
most a few dozen of them, and ``jnp.linalg.eig`` is CPU-only in JAX anyway (benchmarks/README.md records
the GPU ``eigvals`` path as ~8x slower than NumPy). Everything here takes and returns NumPy arrays.
"""

from __future__ import annotations

import dataclasses

import math

import numpy as np

from .eigen import is_real, tolerance

ORDERS = ("real", "modulus", "skip")
"""``real``: descending Re lambda; ``modulus``: descending |lambda|; ``skip``: descending |1 + lambda|, the
amplification of eigen-direction k by one layer x + W x with the skip connection (alpha = 1) under
uniform attention, i.e. the power method on I + W."""


def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS} (explicitly chosen), got {order!r}")
    return order


def _key(values: np.ndarray, order: str, log_s: float = 0.0) -> np.ndarray:
    """The sort key. For the eigenvalues of a matrix rescaled by 1/s (log_s = log s), the skip order is that of the
    matrix itself, |1 + s lambda|, through a key monotone in it that neither overflows nor rounds s lambda away:
    |1/s + lambda| for s >= 1, and (|1 + s lambda|^2 - 1)/s = 2 Re lambda + s |lambda|^2 for s < 1."""
    if order == "real":
        return values.real
    if order == "skip":
        if log_s == 0.0:
            return np.abs(1.0 + values)
        if log_s > 0.0:
            return np.abs(math.exp(-log_s) + values)
        return 2.0 * values.real + math.exp(log_s) * np.abs(values) ** 2
    return np.abs(values)


def _fix_sign(v: np.ndarray, tol: float) -> np.ndarray:
    """The sign convention of real eigenvectors: the first entry within `tol` (relative) of the largest magnitude is
    positive, so that entries tied in magnitude ((1, -1)/sqrt 2) do not leave the sign to rounding."""
    a = np.abs(v)
    j = int(np.flatnonzero(a >= a.max() * (1.0 - tol))[0])
    return v if v[j] > 0 else -v


def _square(W, name="W") -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError(f"{name} has non-finite entries")
    return W


@dataclasses.dataclass(frozen=True)
class Eigen:
    """Eigenpairs of a real square matrix, sorted.

    - `values`: ``(d,)`` complex eigenvalues, sorted by descending key (real part or modulus); within a
      complex-conjugate pair the one with positive imaginary part comes first.
    - `vectors`: ``(d, d)`` complex right eigenvectors, unit 2-norm, as columns (``W v_k = lambda_k v_k``).
    - `order`: ``"real"``, ``"modulus"`` or ``"skip"``.

    ``values, vectors = eig`` unpacks it.
    """

    values: np.ndarray
    vectors: np.ndarray
    order: str
    log_scale: float = 0.0
    """log s when `values` are those of a matrix rescaled by 1/s (:func:`cumulative_principal`): the skip key,
    the gap and the tie test are then those of the unscaled matrix (see :func:`_key`)."""

    def __iter__(self):
        """Unpacks as ``values, vectors`` (like NumPy's ``EigResult``)."""
        return iter((self.values, self.vectors))

    @property
    def lambda1(self) -> complex:
        """The principal eigenvalue (first in the chosen order)."""
        return complex(self.values[0])

    @property
    def v1(self) -> np.ndarray:
        """The principal unit eigenvector ``(d,)``."""
        return self.vectors[:, 0]

    def is_real(self, k: int = 0) -> bool:
        """Whether eigenvalue k is real (:func:`attnflow.analysis.eigen.is_real`)."""
        return bool(is_real(self.values[k]))


def _held_matrix(model):
    """W as `model` holds it, in its own dtype: W itself (an array), or its heads' layer matrix."""
    if isinstance(model, (np.ndarray, list)) or hasattr(model, "__array__") and not hasattr(model, "attn"):
        return model
    attn = getattr(model, "attn", model)
    heads = getattr(attn, "heads", attn)
    if not hasattr(heads, "layer_matrix"):
        raise TypeError(f"cannot find a layer matrix in {type(model).__name__}")
    return heads.layer_matrix()


def layer_matrix(model) -> np.ndarray:
    """W of a dynamics, a :class:`SelfAttention`, a :class:`Heads`, or W itself (host array, float64)."""
    W = np.asarray(_held_matrix(model), dtype=float)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be a square matrix, got shape {W.shape}")
    return W


def matrix_dtype(model) -> np.dtype:
    """The dtype W of `model` is computed in (float64 for anything but float16/float32): a float32 model's repeated
    eigenvalue is split by rounding far beyond float64's tolerance, and must not be called simple."""
    dt = np.asarray(_held_matrix(model)).dtype
    return dt if dt in (np.dtype(np.float16), np.dtype(np.float32)) else np.dtype(np.float64)


def eigenpairs(W, *, order: str) -> Eigen:
    """Eigenpairs of W sorted by descending real part (``order="real"``) or modulus (``order="modulus"``).

    The one eigen-decomposition of attnflow: :func:`attnflow.analysis.equilibria.eigenpairs` is this function
    with ``order="real"``, the numbering of the equilibria (v_1 = ``vectors[:, 0]``).

    **Arguments:**

    - `W`: ``(d, d)`` real matrix, or a model holding one (a dynamics, :class:`SelfAttention`, :class:`Heads`).
    - `order`: ``"real"``, ``"modulus"`` or ``"skip"`` (|1 + lambda|, see :data:`ORDERS`); no default: the
      choice changes the principal eigenvalue.

    **Returns:** an :class:`Eigen`. Real eigenvectors are returned with zero imaginary part and a sign
    fixed so their largest-magnitude entry is positive.
    """
    _check_order(order)
    return _eigen(_square(W if isinstance(W, np.ndarray) else layer_matrix(W)), order)


def _eigen(W: np.ndarray, order: str, log_s: float = 0.0) -> Eigen:
    """:func:`eigenpairs` of a checked square `W`, in the order of the eigenvalues of s W (see :func:`_key`)."""
    vals, vecs = np.linalg.eig(W)
    tol = tolerance(W.dtype)
    # Snap numerically real eigenvalues to the real axis and make their vectors real.
    real = is_real(vals)
    vals = np.where(real, vals.real + 0j, vals)
    vecs = vecs.astype(complex)
    for k in np.flatnonzero(real):
        v = vecs[:, k]
        # rotate the phase so the vector is real (geev already returns real ones for real eigenvalues)
        j = int(np.argmax(np.abs(v)))
        v = v * (abs(v[j]) / v[j])
        v = v.real / np.linalg.norm(v.real)
        vecs[:, k] = _fix_sign(v, tol)
    vecs = vecs / np.linalg.norm(vecs, axis=0, keepdims=True)
    # descending key; keys within the dtype's tolerance are tied (+lambda and -lambda in modulus order, a repeated
    # eigenvalue split by rounding), and a tie is ordered by descending imaginary part, then descending real part
    key = _key(vals, order, log_s)
    by_key = [int(i) for i in np.lexsort((-vals.real, -vals.imag, -key))]
    out, i = [], 0
    while i < len(by_key):
        j = i + 1
        while j < len(by_key) and key[by_key[j - 1]] - key[by_key[j]] <= tol * max(1.0, abs(key[by_key[j - 1]])):
            j += 1
        out += sorted(by_key[i:j], key=lambda m: (-vals[m].imag, -vals[m].real))
        i = j
    idx = np.array(out, dtype=int)
    return Eigen(values=vals[idx], vectors=vecs[:, idx], order=order, log_scale=float(log_s))


def _gap(eig: Eigen, k: int) -> tuple[float, float]:
    """(key_0 - key_k, relative gap (key_0 - key_k) / |key_0|) with the key of the matrix itself: for the skip order
    of a rescaled matrix (log_scale != 0) the gap of |1 + s lambda| divided by s, in the units of the returned
    (rescaled) eigenvalues like the other orders, and the scale-free relative gap."""
    vals, log_s = eig.values, eig.log_scale
    if eig.order != "skip" or log_s >= 0.0:
        key = _key(vals, eig.order, log_s)
        return float(key[0] - key[k]), float((key[0] - key[k]) / max(abs(key[0]), 1e-300))
    # s < 1: |1 + s l_0| - |1 + s l_k| = s (q_0 - q_k) / (|1 + s l_0| + |1 + s l_k|), q = 2 Re l + s |l|^2
    s = math.exp(log_s)
    q = _key(vals, "skip", log_s)
    a, b = abs(1.0 + s * vals[0]), abs(1.0 + s * vals[k])
    gap = (q[0] - q[k]) / max(a + b, 1e-300)
    return float(gap), float(s * gap / max(a, 1e-300))


def orthonormal_basis(vectors, tol: float = 1e-10) -> np.ndarray:
    """An orthonormal basis (columns) of the real span of the given (possibly complex) vectors.

    A complex vector v contributes Re v and Im v. **Arguments:** `vectors`: ``(d, k)`` columns.
    **Returns:** ``(d, r)`` with r the numerical rank.
    """
    V = np.asarray(vectors)
    if V.ndim == 1:
        V = V[:, None]
    cols = [V.real]
    if np.iscomplexobj(V):
        cols.append(V.imag)
    A = np.concatenate(cols, axis=1)
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.sum(s > tol * max(1.0, s[0] if s.size else 0.0)))
    return U[:, :r]


def real_subspace(v) -> np.ndarray:
    """span(Re v, Im v) as an orthonormal ``(d, 2)`` basis; ``(d, 1)`` for a real v ([PM] case 2)."""
    return orthonormal_basis(np.asarray(v)[:, None])


def spectral_gap(eig: Eigen) -> float:
    """key(lambda_1) - key(lambda_next), key = real part, modulus or |1 + lambda| as in ``eig.order``.

    For a rescaled product of :func:`cumulative_principal` (values of P_l / s_l) the skip gap is that of P_l's own
    |1 + lambda| divided by s_l (the real and modulus gaps are P_l's divided by s_l too).

    lambda_next is the first eigenvalue that is not the complex conjugate of lambda_1 (the
    "obvious correction" of [PM] for a complex principal pair).
    """
    vals = eig.values
    if vals.size < 2:
        return float("nan")
    k = 1
    if not eig.is_real(0) and vals.size > 1 and np.isclose(vals[1], np.conj(vals[0]), rtol=1e-9, atol=0):
        k = 2
    if k >= vals.size:
        return float("nan")
    return _gap(eig, k)[0]


def vector_correlation(a, b) -> float:
    """|<a, b>| / (|a| |b|) with the Hermitian inner product (1: the same line)."""
    a = np.asarray(a)
    b = np.asarray(b)
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def eigvec_correlations(eig: Eigen) -> np.ndarray:
    """``(d, d)`` matrix of |<v_i, v_j>| between the unit eigenvectors (ALBERT's near-collinear v_1, v_2)."""
    return np.abs(eig.vectors.conj().T @ eig.vectors)


def principal_subspace(eig: Eigen, *, tie: float | None = None) -> np.ndarray:
    """Orthonormal basis of the subspace the tokens should align with ([PM] cases 1-3).

    - case 1 (real, dominant): span(v_1), ``(d, 1)``;
    - case 2 (complex pair): span(Re v_1, Im v_1), ``(d, 2)``;
    - case 3 (near tie): when ``tie`` is given and the relative gap (key_1 - key_next) / |key_1| is
      below it, span(v_1, v_next) (plus imaginary parts).
    """
    vals = eig.values
    nxt = 2 if (not eig.is_real(0) and vals.size > 2 and np.isclose(vals[1], np.conj(vals[0]))) else 1
    cols = [eig.vectors[:, 0]]
    if tie is not None and nxt < vals.size:
        if _gap(eig, nxt)[1] < tie:
            cols.append(eig.vectors[:, nxt])
    return orthonormal_basis(np.stack(cols, axis=1))


def eigen_bases(eig: Eigen) -> np.ndarray:
    """One orthonormal basis per eigen-direction, padded to width 2: ``(m, d, 2)``.

    A real eigenvalue gives span(v_k) (second column zero); a complex-conjugate pair gives one
    2D basis span(Re v_k, Im v_k), counted once. Used for the all-eigenvector baselines of docs/model.md section 8.
    """
    d = eig.vectors.shape[0]
    out = []
    vals = eig.values
    used = np.zeros(vals.size, bool)
    for k in range(vals.size):
        if used[k]:
            continue
        used[k] = True
        B = np.zeros((d, 2))
        if eig.is_real(k):
            B[:, 0] = eig.vectors[:, k].real
        else:
            Q = real_subspace(eig.vectors[:, k])
            B[:, : Q.shape[1]] = Q
            # skip the conjugate partner, wherever it is in the order (a tied real eigenvalue may sort between them)
            free = np.flatnonzero(~used)
            if free.size:
                j = free[np.argmin(np.abs(vals[free] - np.conj(vals[k])))]
                if np.isclose(vals[j], np.conj(vals[k])):
                    used[j] = True
        out.append(B)
    return np.stack(out)


def subspace_correlation(X, basis) -> np.ndarray:
    """|P x| / |x| per token, P the orthogonal projector on span(basis) (|cos(x, v)| for one vector).

    **Arguments:** `X`: ``(..., d)`` tokens; `basis`: ``(d, k)`` orthonormal columns.
    **Returns:** ``(...)``.
    """
    X = np.asarray(X)
    proj = X @ np.asarray(basis)
    return np.linalg.norm(proj, axis=-1) / np.linalg.norm(X, axis=-1)


@dataclasses.dataclass(frozen=True)
class HeadSpectra:
    """Per-head spectra of W_h = O_h V_h computed from the small matrices V_h O_h.

    - `values`: ``(H, dh)`` the nonzero part of spec(W_h) (the other d - dh eigenvalues are 0),
      each row sorted like :func:`eigenpairs`.
    - `vectors`: ``(H, d, dh)`` unit eigenvectors of W_h, v = O_h y with V_h O_h y = lambda y.
    """

    values: np.ndarray
    vectors: np.ndarray
    order: str


def head_spectra(heads, *, order: str) -> HeadSpectra:
    """Per-head spectra the cheap way: eig of V_h O_h (dh x dh) instead of O_h V_h (d x d).

    If V_h O_h y = lambda y with lambda != 0 then O_h V_h (O_h y) = lambda (O_h y), so the eigenvectors
    of W_h are mapped back with O_h. Cost H * O(dh^3) instead of H * O(d^3).

    **Arguments:** `heads`: a :class:`attnflow.Heads`; `order`: ``"real"`` or ``"modulus"``.
    """
    _check_order(order)
    V = np.asarray(heads.V, dtype=float)
    O = np.asarray(heads.O, dtype=float)
    vals, vecs = [], []
    for Vh, Oh in zip(V, O):
        e = eigenpairs(Vh @ Oh, order=order)
        v = Oh @ e.vectors
        nrm = np.linalg.norm(v, axis=0, keepdims=True)
        v = v / np.where(nrm > 0, nrm, 1.0)
        for k in np.flatnonzero(e.values.imag == 0):  # the sign convention of eigenpairs
            v[:, k] = _fix_sign(v[:, k].real, tolerance(np.float64))
        vals.append(e.values)
        vecs.append(v)
    return HeadSpectra(values=np.stack(vals), vectors=np.stack(vecs), order=order)


def cumulative_principal(Ws, *, order: str) -> list[Eigen]:
    """Eigenpairs of the cumulative products P_l = W_l ... W_1, l = 1..L ([PM] Fig. 8).

    Each product is rescaled by its Frobenius norm before the next factor, so that deep stacks do not overflow:
    the eigenvectors and the order of the eigenvalues are those of P_l itself (the skip order |1 + lambda| is taken
    on P_l's eigenvalues, not on the rescaled ones), and the returned ``values`` are P_l's divided by the
    product's accumulated scale s_l > 0.

    **Arguments:** `Ws`: sequence of ``(d, d)`` layer matrices, first layer first; `order` as in
    :func:`eigenpairs`. **Returns:** a list of L :class:`Eigen`.
    """
    _check_order(order)
    P = None
    out = []
    log_s = 0.0  # log of the scale removed so far: P_l = exp(log_s) * P
    for l, W in enumerate(Ws):
        W = _square(W, f"W[{l}]").astype(float)
        P = W if P is None else W @ P
        norm = max(np.linalg.norm(P), 1e-300)
        P = P / norm
        log_s += math.log(norm)
        out.append(_eigen(P, order, log_s))
    if not out:
        raise ValueError("cumulative_principal needs at least one matrix")
    return out
