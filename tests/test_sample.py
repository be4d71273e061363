"""Samplers: unit norms, uniformity moments, exact equiangular Gram matrices, perturbation radii."""

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

import attnflow as af


def test_sphere_is_unit_and_isotropic():
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(0), (20000, 3)))
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-12)
    # uniform on S^2: E[x] = 0, E[x x^T] = I/3 (Monte Carlo, 5 sigma)
    assert np.abs(X.mean(0)).max() < 5 * np.sqrt(1 / 3 / 20000)
    np.testing.assert_allclose(X.T @ X / len(X), np.eye(3) / 3, atol=0.02)


@given(n=st.integers(2, 6), frac=st.floats(0.0, 1.0), seed=st.integers(0, 100))
def test_equiangular_gram(n, frac, seed):
    lo = -1.0 / (n - 1)
    rho = lo + frac * (1 - lo)
    X = np.asarray(af.sample.equiangular(n, n + 1, rho, key=jax.random.PRNGKey(seed)))
    G = X @ X.T
    np.testing.assert_allclose(np.diag(G), 1.0, atol=1e-12)
    np.testing.assert_allclose(G[~np.eye(n, dtype=bool)], rho, atol=1e-12)


def test_equiangular_errors():
    with pytest.raises(ValueError, match="rho must lie"):
        af.sample.equiangular(4, 4, -0.5)
    with pytest.raises(ValueError, match="need d >= 4"):
        af.sample.equiangular(4, 3, 0.2)
    assert af.sample.equiangular(4, 3, -1 / 3).shape == (4, 3)  # the simplex fits in d = n - 1


def test_perturbations():
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(1), (5, 3)))
    P = np.asarray(af.sample.perturb_ball(jax.random.PRNGKey(2), X, 0.1, 64))
    np.testing.assert_allclose(np.linalg.norm(P, axis=-1), 1.0, atol=1e-12)
    # tangent displacement of norm 0.1, then renormalised: per-token chordal distance <= 0.1
    assert np.all(np.linalg.norm(P - X, axis=-1) <= 0.1 + 1e-12)
    np.testing.assert_allclose(np.sqrt((np.tan(np.arccos(np.clip(np.sum(P * X, -1), -1, 1))) ** 2).sum(-1)), 0.1, rtol=1e-8)
    Q = np.asarray(af.sample.perturb(jax.random.PRNGKey(3), X, 0.01, 8))
    assert Q.shape == (8, 5, 3) and np.linalg.norm(Q - X, axis=-1).max() < 0.1
