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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_study_samples_are_bit_for_bit_those_of_the_plain_sampler(dtype):
    """A study's draw (compiled with the CPU options for brief programs) gives sample i exactly as the sampler gives
    it under a plain jit: ``sampler(fold_in(key, i), 1)[0]``, bit for bit, for the sphere and the ball samplers."""
    import jax.numpy as jnp

    from attnflow.analysis.basins.sampling import Around, Sphere, draw_samples

    key = jax.random.PRNGKey(11)
    idx = np.arange(3000, dtype=np.uint32)
    for s in (Sphere(8, 3, dtype), Sphere(5, 7, dtype), Around(np.eye(3, dtype=dtype)[[0, 0, 1, 2]], 0.3)):
        plain = jax.jit(lambda k, i: jax.vmap(lambda j: s(jax.random.fold_in(k, j), 1)[0])(i))
        want = np.asarray(plain(key, jnp.asarray(idx)))
        got = draw_samples(s, key, idx)
        assert got.dtype == np.dtype(dtype) and got.tobytes() == want.tobytes()


def test_a_sample_does_not_depend_on_the_indices_drawn_with_it():
    """Sample i is the same bits whether it is drawn alone, in a short block, or in a block of 10^4 (a study's
    block size, a resume, a user's own call): draw_samples draws fixed tiles of DRAW_TILE. (Before, float32 samples
    drawn 37 at a time differed from the same samples of a 10^4 block by up to 1.8e-7.)"""
    from attnflow.analysis.basins.sampling import DRAW_TILE, Around, Sphere, draw_samples

    key = jax.random.PRNGKey(0)
    for s in (Sphere(8, 3, "float32"), Sphere(10, 3, "float32"), Around(np.eye(3, dtype=np.float32)[[0, 0, 1, 2]], 0.3)):
        block = draw_samples(s, key, np.arange(10_000))
        for lo, m in ((0, 1), (0, 37), (0, 64), (5, 200), (100, DRAW_TILE + 1), (9000, 1000)):
            assert draw_samples(s, key, np.arange(lo, lo + m)).tobytes() == block[lo: lo + m].tobytes(), (s, lo, m)
    assert draw_samples(Sphere(8, 3, "float32"), key, np.arange(0)).shape == (0, 8, 3)
