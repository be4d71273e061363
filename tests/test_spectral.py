"""Spectral module vs numpy.linalg.eig and closed forms (float64; tolerances 1e-10 unless stated)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from attnflow import Heads
from attnflow.analysis import spectral as sp


def _rot(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _similar(D, seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=D.shape)
    return S @ D @ np.linalg.inv(S), S


@given(st.integers(0, 10_000), st.integers(2, 9), st.sampled_from(sp.ORDERS))
@settings(max_examples=25, deadline=None)
def test_eigenpairs_match_numpy(seed, d, order):
    W = np.random.default_rng(seed).normal(size=(d, d))
    e = sp.eigenpairs(W, order=order)
    ref = np.linalg.eigvals(W)
    # same multiset of eigenvalues
    for lam in ref:
        assert np.min(np.abs(e.values - lam)) < 1e-9 * max(1, abs(lam))
    # sorted by descending key
    key = {"real": e.values.real, "modulus": np.abs(e.values), "skip": np.abs(1 + e.values)}[order]
    assert np.all(np.diff(key) <= 1e-12)
    # W v = lambda v, unit norm
    assert np.allclose(W @ e.vectors, e.vectors * e.values, atol=1e-9)
    assert np.allclose(np.linalg.norm(e.vectors, axis=0), 1.0)


def test_order_changes_principal():
    # eigenvalues 2, -3, 1: by real part lambda1 = 2, by modulus lambda1 = -3
    W, S = _similar(np.diag([2.0, -3.0, 1.0]), 0)
    assert sp.eigenpairs(W, order="real").lambda1 == pytest.approx(2.0)
    assert sp.eigenpairs(W, order="modulus").lambda1 == pytest.approx(-3.0)
    v = sp.eigenpairs(W, order="modulus").v1
    assert sp.vector_correlation(v, S[:, 1]) == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="order"):
        sp.eigenpairs(W, order="abs")


def test_complex_pair_subspace_and_gap():
    D = np.zeros((4, 4))
    D[:2, :2] = 3.0 * _rot(0.7)  # 3 e^{+-0.7 i}: real part 3 cos 0.7
    D[2, 2], D[3, 3] = 1.5, -0.5
    W, S = _similar(D, 1)
    for order, key1 in (("real", 3 * np.cos(0.7)), ("modulus", 3.0)):
        e = sp.eigenpairs(W, order=order)
        assert not e.is_real(0)
        assert e.values[0].imag > 0 and np.isclose(e.values[1], np.conj(e.values[0]))
        # gap skips the conjugate partner: key1 - 1.5
        assert sp.spectral_gap(e) == pytest.approx(key1 - 1.5, abs=1e-10)
        B = sp.real_subspace(e.v1)
        assert B.shape == (4, 2) and np.allclose(B.T @ B, np.eye(2))
        # the real invariant plane is span(S[:, 0], S[:, 1])
        Q, _ = np.linalg.qr(S[:, :2])
        assert np.allclose(B @ B.T, Q @ Q.T, atol=1e-9)
        assert np.allclose(sp.principal_subspace(e) @ sp.principal_subspace(e).T, Q @ Q.T, atol=1e-9)
        bases = sp.eigen_bases(e)
        assert bases.shape == (3, 4, 2)  # pair counted once, two real eigenvalues


def test_repeated_moduli_and_near_tie():
    # eigenvalues 2, -2, 1.999 (repeated modulus 2), 0.1
    W, S = _similar(np.diag([2.0, -2.0, 1.999, 0.1]), 2)
    e = sp.eigenpairs(W, order="modulus")
    assert np.allclose(np.abs(e.values[:2]), 2.0)
    assert sp.spectral_gap(e) == pytest.approx(0.0, abs=1e-9)
    ref = np.linalg.eigvals(W)
    assert np.allclose(np.sort_complex(ref), np.sort_complex(e.values), atol=1e-9)
    er = sp.eigenpairs(W, order="real")
    assert er.lambda1 == pytest.approx(2.0)
    assert sp.spectral_gap(er) == pytest.approx(0.001, abs=1e-9)
    # near tie: span(v1, v2) with the tie tolerance, v1 alone without
    assert sp.principal_subspace(er).shape == (4, 1)
    B = sp.principal_subspace(er, tie=0.01)
    Q, _ = np.linalg.qr(S[:, [0, 2]])
    assert B.shape == (4, 2) and np.allclose(B @ B.T, Q @ Q.T, atol=1e-8)


def test_correlations_and_subspace_projection():
    rng = np.random.default_rng(3)
    W = rng.normal(size=(5, 5))
    e = sp.eigenpairs(W, order="real")
    C = sp.eigvec_correlations(e)
    assert np.allclose(np.diag(C), 1.0)
    for i in range(5):
        for j in range(5):
            ref = abs(np.sum(np.conj(e.vectors[:, i]) * e.vectors[:, j]))
            assert C[i, j] == pytest.approx(ref, abs=1e-12)
    X = rng.normal(size=(7, 5))
    v = rng.normal(size=5)
    v /= np.linalg.norm(v)
    c = sp.subspace_correlation(X, v[:, None])
    assert np.allclose(c, np.abs(X @ v) / np.linalg.norm(X, axis=1))
    B = np.linalg.qr(rng.normal(size=(5, 2)))[0]
    P = B @ B.T
    assert np.allclose(sp.subspace_correlation(X, B), np.linalg.norm(X @ P, axis=1) / np.linalg.norm(X, axis=1))


@pytest.mark.parametrize("order", sp.ORDERS)
def test_head_spectra_cheap_equals_full(order):
    rng = np.random.default_rng(4)
    H, dh, d = 3, 2, 7
    heads = Heads(Q=rng.normal(size=(H, dh, d)), K=rng.normal(size=(H, dh, d)), V=rng.normal(size=(H, dh, d)), O=rng.normal(size=(H, d, dh)))
    hs = sp.head_spectra(heads, order=order)
    assert hs.values.shape == (H, dh) and hs.vectors.shape == (H, d, dh)
    Wh = np.einsum("hde,hef->hdf", np.asarray(heads.O), np.asarray(heads.V))
    for h in range(H):
        full = np.linalg.eigvals(Wh[h])
        big = full[np.argsort(-np.abs(full))[:dh]]  # the dh nonzero ones
        assert np.allclose(np.sort_complex(big), np.sort_complex(hs.values[h]), atol=1e-9)
        assert np.allclose(Wh[h] @ hs.vectors[h], hs.vectors[h] * hs.values[h], atol=1e-9)


def test_cumulative_principal():
    rng = np.random.default_rng(5)
    Ws = [rng.normal(size=(4, 4)) for _ in range(4)]
    out = sp.cumulative_principal(Ws, order="modulus")
    P = np.eye(4)
    for l, W in enumerate(Ws):
        P = W @ P
        vals, vecs = np.linalg.eig(P)
        k = np.argmax(np.abs(vals))
        assert abs(out[l].lambda1) == pytest.approx(abs(vals[k]) / np.linalg.norm(P), rel=1e-8)
        if abs(abs(vals[k]) - np.sort(np.abs(vals))[-2]) > 1e-6 * abs(vals[k]) and abs(vals[k].imag) < 1e-12:
            assert sp.vector_correlation(out[l].v1, vecs[:, k]) == pytest.approx(1.0, abs=1e-8)


def _principal_plain(P, order):
    """NumPy reference: the eigenvector of P whose eigenvalue is first in `order` (ties not expected)."""
    vals, vecs = np.linalg.eig(P)
    key = {"real": vals.real, "modulus": np.abs(vals), "skip": np.abs(1 + vals)}[order]
    k = int(np.argmax(key))
    return vals, vecs[:, k], np.sort(key)[-2] < key[k] * (1 - 1e-9)


@pytest.mark.parametrize("order", sp.ORDERS)
@pytest.mark.parametrize("scale", [0.2, 1.0, 3.0])
def test_cumulative_principal_order_is_the_products_own(order, scale):
    """The rescaling of the partial products must not change which eigenvector comes first, in any order: the skip
    key |1 + lambda| is not scale invariant, so it is taken on P_l's own eigenvalues (before, diag(10, -25, 0.5)
    gave e1 for skip where P itself gives e2). Reference: np.linalg.eig of the unscaled products, float64."""
    rng = np.random.default_rng(7)
    assert sp.vector_correlation(sp.cumulative_principal([np.diag([10.0, -25.0, 0.5])], order=order)[0].v1,
                                 sp.eigenpairs(np.diag([10.0, -25.0, 0.5]), order=order).v1) == pytest.approx(1.0)
    checked = 0
    for trial in range(40):
        Ws = [scale * rng.normal(size=(3, 3)) for _ in range(3)]
        out = sp.cumulative_principal(Ws, order=order)
        P = np.eye(3)
        for l, W in enumerate(Ws):
            P = W @ P
            vals, v, clear = _principal_plain(P, order)
            if clear and np.all(np.abs(vals.imag) < 1e-12):
                assert sp.vector_correlation(out[l].v1, v) == pytest.approx(1.0, abs=1e-8), (trial, l)
                checked += 1
    assert checked > 40


def test_cumulative_principal_skip_order_in_deep_stacks():
    """Products far beyond float64's range: growing, the skip order tends to the modulus order (|1 + s lambda| ~
    s |lambda|); shrinking, to the real order (|1 + s lambda| ~ 1 + s Re lambda). diag(10, -25, 0.5)^300 ~ 25^300
    overflows; diag(0.1, -0.2, 0.05)^401 underflows, and its largest |1 + lambda| is 1 + 0.1^401 (e1), while its
    largest modulus is 0.2^401 (e2)."""
    grow = sp.cumulative_principal([np.diag([10.0, -25.0, 0.5])] * 300, order="skip")
    np.testing.assert_allclose(np.abs(grow[-1].v1), [0, 1, 0], atol=1e-12)
    shrink = sp.cumulative_principal([np.diag([0.1, -0.2, 0.05])] * 401, order="skip")
    np.testing.assert_allclose(np.abs(shrink[-1].v1), [1, 0, 0], atol=1e-12)
    assert np.abs(sp.cumulative_principal([np.diag([0.1, -0.2, 0.05])] * 401, order="modulus")[-1].v1[1]) == 1


def test_validation():
    with pytest.raises(ValueError, match="square"):
        sp.eigenpairs(np.ones((2, 3)), order="real")
    with pytest.raises(ValueError, match="non-finite"):
        sp.eigenpairs(np.array([[np.nan, 0], [0, 1.0]]), order="real")


def test_skip_order():
    # eigenvalues -1.9 (largest modulus), 1.2 (largest real part, largest |1 + lambda|), -0.5
    W, _ = _similar(np.diag([-1.9, 1.2, -0.5]), 6)
    assert sp.eigenpairs(W, order="modulus").lambda1 == pytest.approx(-1.9)
    e = sp.eigenpairs(W, order="skip")
    assert e.lambda1 == pytest.approx(1.2)
    assert sp.spectral_gap(e) == pytest.approx(2.2 - 0.9)


def test_one_eigenpairs():
    """equilibria.eigenpairs is spectral.eigenpairs of the layer matrix with order="real": the same Eigen type,
    the same numbers; it unpacks as (values, vectors). Reference: numpy.linalg.eig."""
    import attnflow as af
    from attnflow.analysis import equilibria as eq

    rng = np.random.default_rng(5)
    W = rng.normal(size=(4, 4))
    dyn = af.LayerMap(af.SelfAttention(Heads.single(W), af.Attention("softmax"), 1.0), 0.1)
    a, b = eq.eigenpairs(dyn), sp.eigenpairs(W, order="real")
    assert type(a) is sp.Eigen and a.order == "real"
    np.testing.assert_allclose(a.values, b.values, atol=1e-12)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-12)
    np.testing.assert_allclose(sp.eigenpairs(dyn, order="modulus").values, sp.eigenpairs(W, order="modulus").values, atol=1e-12)
    lam, V = a
    np.testing.assert_allclose(np.sort_complex(lam), np.sort_complex(np.linalg.eigvals(W)), atol=1e-10)
    np.testing.assert_allclose(W @ V, V * lam[None, :], atol=1e-10)
    assert np.all(np.diff(lam.real) <= 1e-12)


def test_eigen_bases_count_a_complex_pair_once_when_a_tied_real_eigenvalue_sorts_between():
    # eigenvalues 1 + i, 1, 1 - i, 0.2 in the real order (ties by descending imaginary part): the pair was counted
    # twice (4 directions, c_bar 0.5 instead of 1/3)
    S = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0]
    D = np.array([[1.0, -1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0.2]])
    e = sp.eigenpairs(S @ D @ S.T, order="real")
    assert np.isclose(e.values[1], 1.0)  # the real one between the pair
    B = sp.eigen_bases(e)
    assert B.shape[0] == 3
    assert sorted(int(np.linalg.matrix_rank(b, tol=1e-8)) for b in B) == [1, 1, 2]
