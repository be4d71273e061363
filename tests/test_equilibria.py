"""Equilibrium constructors and the root finder: residuals, refinement, non-aligned clusterings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import equilibria as eq, stability as st


def test_polygonal_equilibria_are_unstable():
    dyn = af.SphereFlow(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.5, -0.3])), af.Attention("uniform")))
    for n in (3, 4, 6):
        stab = st.analyse(dyn, eq.polygonal(n, 3, jax.random.PRNGKey(n))[None])
        assert stab.residual[0] < 1e-14 and stab.verdict[0] == st.UNSTABLE


def test_refine_recovers_constructed_equilibria():
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 2.0), 0.1)
    for X in (eq.bipartite(dyn, 0, 2, 5), eq.consensus(dyn, 1, 5, -1), eq.bipartite(dyn, 2, 1, 5)):
        noisy = X + 1e-2 * jax.random.normal(jax.random.PRNGKey(0), X.shape)
        r = eq.refine(dyn, noisy)
        assert bool(r.success) and np.max(np.abs(np.asarray(r.state) - np.asarray(X))) < 1e-10


def test_clustering_equilibrium_not_eigenvector_aligned():
    """Documented example: single softmax head, V = diag(1, .5, -.3), M = V, beta = 2, n = 4, flow: two-point
    clusterings exist whose points are not on eigenvector axes."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 2.0))
    found = eq.find_clusterings(dyn, jax.random.PRNGKey(1), 4, starts=8)
    assert found
    for X in found:
        assert eq.alignment(dyn, X)[0] == -1
        assert np.max(np.abs(np.asarray(eq.residual(dyn, jnp.asarray(X))))) < 1e-10
        assert len(np.unique(np.round(X, 6), axis=0)) == 2


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_constructed_states_are_equilibria_for_nonsymmetric_multihead(time):
    """Consensus/bipartite on every real eigenvector of a non-symmetric 2-head W: residual at round-off (float64)."""
    rng = np.random.default_rng(7)
    d, n, H = 3, 5, 2
    S = rng.normal(size=(d, d))
    W = S @ np.diag([1.2, 0.3, -0.5]) @ np.linalg.inv(S)
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([W @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    attn = af.SelfAttention(af.Heads(Q=rng.normal(size=(H, d, d)), K=rng.normal(size=(H, d, d)), V=Vs, O=Os), af.Attention("softmax"), 0.8)
    dyn = af.LayerMap(attn, 0.4) if time == "discrete" else af.SphereFlow(attn)
    lam, vecs = eq.eigenpairs(dyn)
    assert np.all(np.diff(lam.real) <= 0)  # 0-based, descending real part
    for k in range(d):
        v = np.real(vecs[:, k]) / np.linalg.norm(np.real(vecs[:, k]))
        np.testing.assert_allclose(np.abs(np.asarray(eq.consensus(dyn, k, n, -1)) @ v), 1.0, atol=1e-14)
        states = [eq.consensus(dyn, k, n, s) for s in (1, -1)] + [eq.bipartite(dyn, k, m, n) for m in range(1, n)]
        for X in states:
            assert np.max(np.abs(np.asarray(eq.residual(dyn, X)))) < 1e-13
        # not an equilibrium: a random state has an O(1) residual (the check can fail)
    X = af.sample.sphere(jax.random.PRNGKey(0), (n, d))
    assert np.max(np.abs(np.asarray(eq.residual(dyn, X)))) > 1e-3


def test_constructor_validation():
    V = np.diag([1.0, 0.5, -0.3])
    with pytest.raises(ValueError, match="0 < m < n"):
        eq.bipartite(V, 0, 0, 4)
    with pytest.raises(ValueError, match="sign"):
        eq.consensus(V, 0, 4, sign=2)
    with pytest.raises(ValueError, match="polygonal"):
        eq.polygonal(1, 3)
    P = np.asarray(eq.polygonal(5, 4, jax.random.PRNGKey(3)))
    np.testing.assert_allclose(P.sum(0), 0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1, atol=1e-14)


def test_refine_carries_the_optimistix_result():
    """refine returns optimistix's own result, step count and residual (not recomputed); a batch is refined in
    one vmapped call; a solve cut short is reported as such, never raised."""
    import optimistix as optx

    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 2.0), 0.1)
    X = jnp.stack([eq.bipartite(dyn, 0, 2, 5), eq.consensus(dyn, 1, 5, -1)])
    noisy = X + 1e-2 * jax.random.normal(jax.random.PRNGKey(0), X.shape)
    r = eq.refine(dyn, noisy)
    assert r.state.shape == (2, 5, 3) and r.residual.shape == (2,) and np.all(np.asarray(r.success))
    assert np.all(np.asarray(r.result == optx.RESULTS.successful)) and np.all(np.asarray(r.steps) > 0)
    np.testing.assert_allclose(np.asarray(r.state), np.asarray(X), atol=1e-10)
    # the carried residual bounds the equilibrium residual of the returned state (NumPy check of step(X) - X)
    for Xi, ri in zip(np.asarray(r.state), np.asarray(r.residual)):
        assert ri < 1e-12 and np.max(np.abs(np.asarray(dyn.step(0, jnp.asarray(Xi))) - Xi)) < 1e-12
    cut = eq.refine(dyn, noisy[0], max_steps=1)
    assert not bool(cut.success) and bool(cut.result == optx.RESULTS.nonlinear_max_steps_reached) and int(cut.steps) == 1
