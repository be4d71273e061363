"""Regression tests from an audit of docs/model.md sections 6-7 (spectral selection; equiangular reduction).

Each reference is computed independently in plain NumPy. Tolerances: these functions compute on the host in
float64 (NumPy eig, or the float64 host solve of the equiangular module); the float64 tolerance is stated per test.
The relu / critical-beta formulas are evaluated by attnflow in the process's default JAX dtype (float32 unless
x64 is enabled), so those tests use a float32-safe relative tolerance of 1e-5.
"""

import numpy as np
import pytest

from attnflow import Heads
from attnflow.analysis import equiangular as eq
from attnflow.analysis import spectral as sp

F32_RTOL = 1e-5  # float32 evaluation of the closed forms
F64_RTOL = 1e-9  # float64 host eigen-decompositions


def test_cumulative_skip_gap_and_tie_use_the_products_own_key():
    # P_l = W_l ... W_1 rescaled by s_l: the skip gap must be P_l's gap of |1 + lambda| (divided by s_l), never
    # negative, and the tie test of principal_subspace must use P_l's relative gap.
    rng = np.random.default_rng(2)
    checked = 0
    for t in range(60):
        d = int(rng.integers(2, 6))
        Ws = [[0.2, 3.0, 20.0][t % 3] * rng.standard_normal((d, d)) for _ in range(int(rng.integers(2, 5)))]
        cum = sp.cumulative_principal(Ws, order="skip")
        P = np.eye(d)
        for W, e in zip(Ws, cum):
            P = W @ P
            lam = np.linalg.eigvals(P)
            key = np.sort(np.abs(1 + lam))[::-1]
            s = np.linalg.norm(P)  # only a scale: compare relative gaps, which do not depend on it
            if np.iscomplex(e.values[0]) and not np.isclose(e.values[0].imag, 0):
                continue  # conjugate pairs: keep the reference simple
            rel_ref = (key[0] - key[1]) / key[0]
            g = sp.spectral_gap(e)
            assert g >= -1e-12 * s
            lam_s = e.values * np.abs(lam).max() / np.abs(e.values).max()  # P_l's own eigenvalues
            k_s = np.abs(1 + lam_s)
            assert np.isclose(g * np.abs(lam).max() / np.abs(e.values).max(), k_s[0] - k_s[1],
                              rtol=1e-7, atol=F64_RTOL * k_s[0])
            one = sp.orthonormal_basis(e.vectors[:, :1]).shape[1]
            two = sp.orthonormal_basis(e.vectors[:, :2]).shape[1]
            for tie, dim in ((rel_ref * 0.5, one), (rel_ref * 2 + 1e-12, two)):
                if rel_ref > 1e-6:
                    assert sp.principal_subspace(e, tie=tie).shape[1] == dim
            checked += 1
    assert checked > 20


def test_head_spectra_real_vectors_follow_the_sign_convention():
    # section 6: a real eigenvector's sign is fixed so that its largest-magnitude entry is positive
    rng = np.random.default_rng(3)
    H, d, dh = 3, 5, 3
    Q, K, V = (rng.standard_normal((H, dh, d)) for _ in range(3))
    O = rng.standard_normal((H, d, dh))
    hs = sp.head_spectra(Heads(Q=Q, K=K, V=V, O=O), order="real")
    n_real = 0
    for h in range(H):
        Wh = O[h] @ V[h]
        for k in range(dh):
            v, lam = hs.vectors[h][:, k], hs.values[h][k]
            assert np.abs(Wh @ v - lam * v).max() <= F64_RTOL * max(1, abs(lam))
            if lam.imag == 0:
                n_real += 1
                assert v[np.argmax(np.abs(v))].real > 0
    assert n_real >= 3


def test_clustering_time_is_inf_when_rho_cannot_rise():
    # sum_h w_h < 0: F < 0 on the whole interval, rho decreases: T must be +inf, not a negative number
    T = eq.clustering_time(1e-2, 0.1, n=4, beta=np.array([0.5, 1.0]), w=-1.0, m=1.0)
    assert np.all(np.isinf(T)) and np.all(T > 0)
    T = eq.clustering_time(1e-2, 0.1, n=4, beta=1.0, w=1.0, m=1.0)  # unchanged when F > 0
    assert np.isfinite(T) and T > 0


def test_clustering_time_rejects_n_below_two_with_a_value_error():
    with pytest.raises(ValueError, match="n >= 2"):
        eq.clustering_time(1e-2, 0.1, n=1, beta=1.0, w=1.0, m=1.0)


@pytest.mark.parametrize("w,m", [([1.0], [-1.0]), ([1.0, 1.0], [1.0, -2.0]), ([1.0, 0.5], [2.0, 0.3])])
def test_relu_linear_rates_match_the_derivative_of_F(w, m):
    n, beta = 5, 2.0
    w, m = np.array(w), np.array(m)

    def F(r):  # independent reference of the relu reduction: a_o = max(beta m rho, 0)/n
        return 2 * (1 - r) * (1 + (n - 1) * r) * np.sum(w * np.maximum(beta * m * r, 0) / n)

    h = 1e-7
    lam1 = F(1 - h) / h  # d delta/dt = -F(1 - delta) = -lambda_1 delta
    rs = -1 / (n - 1)
    lam0 = (F(rs + h) - F(rs - h)) / (2 * h)
    assert np.isclose(eq.rate_near_consensus(beta=beta, w=w, m=m, kind="relu"), lam1, rtol=F32_RTOL, atol=1e-6)
    assert np.isclose(eq.rate_near_simplex(n=n, beta=beta, w=w, m=m, kind="relu"), lam0, rtol=F32_RTOL, atol=1e-6)


def test_critical_beta_small_unequal_m_is_not_merged():
    # m = 1e-9, 2e-9 are not equal; the root of sum_h w_h (a_self^h - 1/2) = 0 is found by an independent bisection
    n, rho0, m, w = 6, 0.0, np.array([1e-9, 2e-9]), np.array([1.0, 1.0])

    def g(b):
        return np.sum(w * (1 / (1 + (n - 1) * np.exp(-b * m * (1 - rho0))) - 0.5))

    lo, hi = 0.0, 1e12
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    assert np.isclose(eq.critical_beta(n=n, rho0=rho0, m=m, w=w), 0.5 * (lo + hi), rtol=F64_RTOL)
