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
