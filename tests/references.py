"""Plain NumPy references that share no code with attnflow: loops over tokens, written from docs/model.md."""

from __future__ import annotations

import numpy as np


def allowed(n, mask="full", window=None):
    A = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            if mask == "full":
                A[i, j] = True
            elif mask == "causal":
                A[i, j] = j <= i
            else:
                A[i, j] = (j <= i) and (i - j < window)
    return A


def attention_row(s, ok, kind, n, sinkhorn_iters=3, relu_normalize=False):
    """One row of attention weights from scores s (for every kind but sinkhorn)."""
    if kind == "softmax":
        m = max(s[j] for j in range(len(s)) if ok[j])
        e = np.array([np.exp(s[j] - m) if ok[j] else 0.0 for j in range(len(s))])
        return e / e.sum()
    if kind == "unnormalized":
        return np.array([np.exp(s[j]) / n if ok[j] else 0.0 for j in range(len(s))])
    if kind == "uniform":
        c = sum(ok)
        return np.array([1.0 / c if ok[j] else 0.0 for j in range(len(s))])
    if kind == "relu":
        r = np.array([max(s[j], 0.0) if ok[j] else 0.0 for j in range(len(s))])
        if relu_normalize:
            tot = r.sum()
            return r / tot if tot > 0 else r
        return r / n
    raise ValueError(kind)


def attention_matrix(S, kind, mask="full", window=None, sinkhorn_iters=3, relu_normalize=False):
    n = S.shape[0]
    ok = allowed(n, mask, window)
    if kind == "sinkhorn":
        K = np.where(ok, np.exp(S - S.max()), 0.0)
        for _ in range(sinkhorn_iters - 1):
            K = K / K.sum(axis=1, keepdims=True)
            K = K / K.sum(axis=0, keepdims=True)
        return K / K.sum(axis=1, keepdims=True)
    return np.stack([attention_row(S[i], ok[i], kind, n, sinkhorn_iters, relu_normalize) for i in range(n)])


def drift(X, Q, K, V, O, beta, kind="softmax", mask="full", window=None, **kw):
    """u_i = sum_h O_h sum_j a^h_ij V_h x_j with s^h_ij = beta <Q_h x_i, K_h x_j>, by explicit loops."""
    n, d = X.shape
    H = Q.shape[0]
    U = np.zeros((n, d))
    for h in range(H):
        S = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                S[i, j] = beta * (Q[h] @ X[i]) @ (K[h] @ X[j])
        A = attention_matrix(S, kind, mask, window, **kw)
        for i in range(n):
            acc = np.zeros(Q.shape[1])
            for j in range(n):
                acc += A[i, j] * (V[h] @ X[j])
            U[i] += O[h] @ acc
    return U


def normalise(Y, norm):
    out = np.empty_like(Y)
    for i, y in enumerate(Y):
        if norm == "l2":
            out[i] = y / np.linalg.norm(y)
        elif norm == "layernorm":
            c = y - y.mean()
            out[i] = c / np.sqrt((c * c).mean())
        else:
            out[i] = y
    return out


def layer_map(X, steps, Q, K, V, O, beta, alpha, norm="l2", **kw):
    """Trajectory of x_i <- N(x_i + alpha u_i), shape (steps + 1, n, d)."""
    traj = [X.copy()]
    for _ in range(steps):
        X = normalise(X + alpha * drift(X, Q, K, V, O, beta, **kw), norm)
        traj.append(X.copy())
    return np.stack(traj)


def sphere_vf(X, Q, K, V, O, beta, **kw):
    U = drift(X, Q, K, V, O, beta, **kw)
    return np.stack([U[i] - (X[i] @ U[i]) / (X[i] @ X[i]) * X[i] for i in range(len(X))])


# ------------------------------------------------------------------------------------- basin-study oracle
# A second, independent basin engine for one softmax head with O = I (W = V), the full mask and the l2 layer map,
# written from docs/model.md sections 2, 3, 5, 9 and 10: batched NumPy in float64, no attnflow code.


def _oracle_step(X, V, K, Q, alpha, beta):
    """x_i <- (x_i + alpha u_i) / |x_i + alpha u_i|, u_i = sum_j softmax_j(beta <Q x_i, K x_j>) V x_j; X (B, n, d)."""
    S = beta * np.einsum("bid,bjd->bij", X @ Q.T, X @ K.T)
    E = np.exp(S - S.max(axis=2, keepdims=True))
    A = E / E.sum(axis=2, keepdims=True)
    Y = X + alpha * np.einsum("bij,bjd->bid", A, X @ V.T)
    return Y / np.sqrt((Y * Y).sum(axis=2, keepdims=True))


def oracle_axes(W):
    """The eigenvectors of W that name an axis (docs/model.md sections 6 and 10): eigenvalues sorted by descending
    real part, ties by descending imaginary part; only simple real eigenvalues keep a vector, unit, its
    largest-magnitude entry positive. Returns a list of (k, v_k) with k the 0-based position in that order."""
    lam, vecs = np.linalg.eig(np.asarray(W, np.float64))
    order = sorted(range(len(lam)), key=lambda j: (-lam[j].real, -lam[j].imag))
    scale = max(1.0, float(np.max(np.abs(lam))))
    out = []
    for k, j in enumerate(order):
        if abs(lam[j].imag) > 1e-12 * scale * len(lam):
            continue
        if sum(abs(lam[i] - lam[j]) < 1e-9 for i in range(len(lam))) != 1:
            continue
        v = vecs[:, j]
        big = int(np.argmax(np.abs(v)))
        v = np.real(v * (abs(v[big]) / v[big]))
        v = v / np.linalg.norm(v)
        if v[int(np.argmax(np.abs(v)))] < 0:
            v = -v
        out.append((k, v))
    return out


def oracle_clusters(X, tol):
    """Cluster sizes of the tokens of X (n, d): connected components of the graph |x_i - x_j| < tol."""
    n = len(X)
    seen, sizes = [False] * n, []
    for s in range(n):
        if seen[s]:
            continue
        seen[s], todo, size = True, [s], 0
        while todo:
            i = todo.pop()
            size += 1
            for j in range(n):
                if not seen[j] and np.linalg.norm(X[i] - X[j]) < tol:
                    seen[j] = True
                    todo.append(j)
        sizes.append(size)
    return sorted(sizes, reverse=True)


def oracle_name(X, axes, tol):
    """"consensus +v1", "consensus -v2", "bipartite v1 3:7" (3 tokens at +v1) or "other" for a state X (n, d)."""
    n = len(X)
    sizes = oracle_clusters(X, tol)
    for k, v in axes:
        c = X @ v
        if not all(abs(abs(ci) - 1.0) < tol for ci in c):
            continue
        plus = sum(1 for ci in c if ci > 0)
        if len(sizes) == 1:
            return f"consensus {'+' if plus == n else '-'}v{k + 1}"
        if len(sizes) == 2 and 0 < plus < n:
            return f"bipartite v{k + 1} {plus}:{n - plus}"
        return "other"
    return "other"


def oracle_spectral_radius(X, V, K, Q, alpha, beta, h=1e-6):
    """Spectral radius of the intrinsic Jacobian of the map at X (n, d) (docs/model.md section 5): central
    differences of the map in R^{nd}, projected on an orthonormal basis of each tangent space x_i^perp (the last
    d - 1 columns of a QR factorisation of [x_i, I])."""
    n, d = X.shape
    F = lambda Y: _oracle_step(Y.reshape(1, n, d), V, K, Q, alpha, beta).reshape(n * d)  # noqa: E731
    x = X.reshape(n * d)
    J = np.empty((n * d, n * d))
    for j in range(n * d):
        e = np.zeros(n * d)
        e[j] = h
        J[:, j] = (F(x + e) - F(x - e)) / (2 * h)
    B = np.zeros((n * d, n * (d - 1)))
    for i in range(n):
        q, _ = np.linalg.qr(np.column_stack([X[i], np.eye(d)]))
        B[i * d : (i + 1) * d, i * (d - 1) : (i + 1) * (d - 1)] = q[:, 1:d]
    return float(np.max(np.abs(np.linalg.eigvals(B.T @ J @ B))))


def numpy_basin_members(V, K, Q, alpha, beta, x0, *, tol, cap, cluster_tol=1e-3, unstable_tol=1e-6, return_final=False):
    """An independent basin engine: every member of x0 (B, n, d) runs the l2 layer map of one softmax head
    (W = V, full mask) until its per-step change max |X_{k+1} - X_k| < tol (converged: steps = k, final state the
    state after step k), until it has taken `cap` steps (not converged), or until a step is non-finite (nonfinite:
    that step counts, the last finite state is kept). Converged members are named by :func:`oracle_name`; a name
    whose equilibrium is unstable (spectral radius of the intrinsic Jacobian at the final state of its lowest-index
    member > 1 + unstable_tol, no refinement) becomes "saddle" (all "other" states share one verdict, that of the
    lowest-index "other" member).

    Returns a list of (name, outcome, steps) per member, outcome "converged", "not_converged" or "nonfinite", name
    "not converged" / "nonfinite" for the last two; with `return_final`, also the final states (B, n, d)."""
    V, K, Q = (np.asarray(M, np.float64) for M in (V, K, Q))
    X = np.array(x0, np.float64)
    B = len(X)
    outcome = np.array(["running"] * B, dtype=object)
    steps = np.zeros(B, np.int64)
    for _ in range(cap):
        run = np.flatnonzero(outcome == "running")
        if not len(run):
            break
        with np.errstate(all="ignore"):
            Y = _oracle_step(X[run], V, K, Q, alpha, beta)
            finite = np.isfinite(Y).all(axis=(1, 2))
            change = np.abs(Y - X[run]).max(axis=(1, 2))
        steps[run] += 1
        X[run[finite]] = Y[finite]
        outcome[run[~finite]] = "nonfinite"
        outcome[run[finite & (change < tol)]] = "converged"
    outcome[outcome == "running"] = "not_converged"
    axes = oracle_axes(V)
    names = []
    for b in range(B):
        names.append(oracle_name(X[b], axes, cluster_tol) if outcome[b] == "converged"
                     else {"not_converged": "not converged", "nonfinite": "nonfinite"}[outcome[b]])
    verdict = {}
    for b in range(B):
        if outcome[b] == "converged" and names[b] not in verdict:
            verdict[names[b]] = oracle_spectral_radius(X[b], V, K, Q, alpha, beta) > 1 + unstable_tol
    names = [("saddle" if outcome[b] == "converged" and verdict[names[b]] else names[b]) for b in range(B)]
    out = [(names[b], str(outcome[b]), int(steps[b])) for b in range(B)]
    return (out, X) if return_final else out
