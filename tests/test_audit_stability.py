"""Audit of docs/model.md sections 4-5 (equilibria, stability): regressions for reproduced wrong answers.

References are plain NumPy (no attnflow helper): the drift, the map, the vector field and Jacobians by central
differences. Tolerances: float64 throughout (x64 on in conftest); finite-difference checks at 1e-6 (the difference
step is 1e-6), closed forms at 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import equilibria as eq
from attnflow.analysis import stability as st

jax.config.update("jax_enable_x64", True)


def _np_drift_uniform(X, W):
    """Uniform attention, full mask, one head: u_i = W xbar."""
    return np.tile(W @ X.mean(0), (len(X), 1))


def test_flat_flow_residual_is_the_whole_vector_field():
    """A FlatFlow (dx/dt = u, no projection) at consensus on v_1 moves (u = lambda_1 v_1 != 0): the equilibrium
    residual must say so. The old residual projected u onto x^perp and reported 0, and refine then reported success
    at this non-equilibrium."""
    W = np.diag([1.0, 0.5, -0.2])
    ff = af.FlatFlow(af.SelfAttention(af.Heads.single(W), af.Attention("uniform"), 1.0))
    X = np.tile([1.0, 0.0, 0.0], (4, 1))
    u = _np_drift_uniform(X, W)
    np.testing.assert_allclose(np.asarray(eq.residual(ff, jnp.asarray(X))), u, atol=1e-14)
    assert float(st.analyse(ff, jnp.asarray(X)[None]).residual[0]) == pytest.approx(1.0, abs=1e-14)
    # refine must not report success at the consensus: it finds a true zero of the flat flow's field instead, here
    # X = 0 (the mean token in ker W; refine no longer pins a flat flow's tokens to the unit sphere)
    ref = eq.refine(ff, jnp.asarray(X + 0.01))
    assert bool(ref.success)
    assert float(np.abs(np.asarray(eq.residual(ff, ref.state))).max()) < 1e-12
    assert float(np.abs(np.asarray(ref.state)).max()) < 1e-12


def test_flat_flow_spectrum_is_the_extrinsic_one():
    """FlatFlow, uniform attention, a regular polygon (W xbar = 0, so u = 0): the state space is R^{nd} and the
    Jacobian is (1 1^T / n) (x) W, eigenvalues those of W once and 0; max Re = lambda_1 = 1 (reference: central
    differences of the NumPy drift in R^{nd}). The old analyse projected onto x_i^perp and reported 0.566."""
    W = np.diag([1.0, 0.5, -0.2])
    ff = af.FlatFlow(af.SelfAttention(af.Heads.single(W), af.Attention("uniform"), 1.0))
    X = np.asarray(eq.polygonal(4, 3, jax.random.PRNGKey(3)))
    z, h = X.ravel(), 1e-6
    J = np.stack([(_np_drift_uniform((z + h * e).reshape(X.shape), W) - _np_drift_uniform((z - h * e).reshape(X.shape), W)).ravel()
                  / (2 * h) for e in np.eye(z.size)], axis=1)
    stab = st.analyse(ff, jnp.asarray(X)[None])
    assert stab.measure[0] == pytest.approx(np.linalg.eigvals(J).real.max(), abs=1e-6)
    assert stab.measure[0] == pytest.approx(1.0, abs=1e-6)


def _layernorm_map_fixed_point():
    """A LayerMap normalising with LayerNorm(gain, bias), its plain NumPy step, a stable fixed point reached by
    iterating that step (|step(X) - X| < 1e-12), and the generator that drew them."""
    rng = np.random.default_rng(0)
    d = 4
    Q, K = rng.normal(size=(1, d, d)), rng.normal(size=(1, d, d))
    V, O = rng.normal(size=(1, d, d)) / np.sqrt(d), rng.normal(size=(1, d, d)) / np.sqrt(d)
    g, b = rng.uniform(0.5, 2, d), rng.normal(size=d) * 0.5
    m = af.LayerMap(af.SelfAttention(af.Heads(Q, K, V, O), af.Attention("softmax"), 1.0), 1.0,
                    norm=af.LayerNorm(gain=jnp.asarray(g), bias=jnp.asarray(b)))

    def step(X):
        s = (X @ Q[0].T) @ (X @ K[0].T).T
        a = np.exp(s - s.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        y = X + a @ X @ (O[0] @ V[0]).T
        c = y - y.mean(1, keepdims=True)
        return c / np.sqrt((c * c).mean(1, keepdims=True)) * g + b

    X = rng.normal(size=(3, d))
    for _ in range(3000):
        X = step(X)
    assert np.abs(step(X) - X).max() < 1e-12
    return m, step, X, rng


def test_layernorm_map_with_gain_and_bias_spectrum():
    """A LayerMap normalising with LayerNorm(gain, bias): its tokens are not on unit spheres and x^perp is not the
    tangent space. At a stable fixed point (reached by iterating the map) the spectral radius must be that of the
    map's own Jacobian (its image manifold is invariant, so the extrinsic eigenvalues are the intrinsic ones plus
    zeros); the old analyse reported 0.4628 for 0.5234. Reference: central differences of the NumPy step, 1e-6."""
    m, step, X, rng = _layernorm_map_fixed_point()
    z, h = X.ravel(), 1e-6
    J = np.stack([(step((z + h * e).reshape(X.shape)) - step((z - h * e).reshape(X.shape))).ravel() / (2 * h)
                  for e in np.eye(z.size)], axis=1)
    rho = np.abs(np.linalg.eigvals(J)).max()
    stab = st.analyse(m, jnp.asarray(X)[None])
    assert stab.measure[0] == pytest.approx(rho, abs=1e-6)
    assert stab.verdict_names[0] == "stable"
    # the same map in a stack (one layer, as a loaded transformer is) is off the spheres too
    stack = st.analyse(af.LayerStack.from_layers([m]), jnp.asarray(X)[None])
    assert stack.measure[0] == pytest.approx(rho, abs=1e-6)


def test_consensus_closed_form_refuses_complex_eigenvalues_and_bad_alpha():
    """No consensus exists on a complex eigenvector (eq.consensus refuses it); the closed form used to return a
    spectrum built from Re lambda_k. A non-positive or non-finite alpha used to return numbers (or NaN)."""
    V = np.array([[1.0, -3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 0.5]])  # 1 +- 3i, 0.5
    m = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    with pytest.raises(ValueError, match="complex"):
        eq.consensus(m, 0, 3)
    with pytest.raises(ValueError, match="complex"):
        st.consensus_closed_form(m, 0, 3, alpha=0.1)
    for a in (-0.5, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            st.consensus_closed_form(np.diag([1.0, 0.5, -0.2]), 0, 3, alpha=a)


def test_consensus_closed_form_follows_the_model():
    """A LayerMap with alpha=None used to get the flow's spectrum (-lambda_k, lambda_j - lambda_k), a flow with an
    alpha the map's: now a map's own alpha is the default, a different one or an alpha for a flow is refused, and a
    FlatFlow (no equilibrium at consensus) is refused. Reference: the closed form of docs/model.md section 5,
    written out for V = diag(1, 0.5, -0.2), n = 2, alpha = 0.3, to 1e-12."""
    V = np.diag([1.0, 0.5, -0.2])
    attn = af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0)
    lam, a, n, d = np.array([1.0, 0.5, -0.2]), 0.3, 2, 3
    want = np.r_[np.full((n - 1) * (d - 1), 1 / (1 + a)), (1 + a * lam[1:]) / (1 + a)]
    got = st.consensus_closed_form(af.LayerMap(attn, a), 0, n)
    np.testing.assert_allclose(np.sort(got.real), np.sort(want), atol=1e-12)
    with pytest.raises(ValueError, match="differs"):
        st.consensus_closed_form(af.LayerMap(attn, a), 0, n, alpha=0.1)
    with pytest.raises(ValueError, match="flow"):
        st.consensus_closed_form(af.SphereFlow(attn), 0, n, alpha=a)
    with pytest.raises(ValueError, match="FlatFlow"):
        st.consensus_closed_form(af.FlatFlow(attn), 0, n)


@pytest.mark.parametrize("diag", [(1.0, 1.0, -0.5), (1.0, 1.0, -3.0), (2.0, 2.0, 2.0)])
def test_step_size_threshold_with_a_repeated_principal_eigenvalue(diag):
    """lambda_2 = lambda_1: the common mode (1 + alpha lambda_2)/(1 + alpha lambda_1) = 1 for every alpha, so
    consensus on v_1 is never (asymptotically) stable; analyse says neutral. The old threshold was inf (or 1.0)."""
    m = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag(diag)), af.Attention("softmax"), 1.0), 0.1)
    assert st.step_size_threshold(m) == 0.0
    assert st.analyse(m, eq.consensus(m, 0, 3)[None]).verdict_names[0] == "neutral"


def test_refine_and_verdict_off_the_unit_spheres():
    """refine pinned every token to the unit sphere, so it could not land on an equilibrium of a LayerNorm(gain, bias)
    map (its tokens have other norms) and reported failure; a basin study's verdict of such a map was "unknown".
    Reference: the fixed point reached by iterating the map in plain NumPy (float64, |step(X) - X| < 1e-12); refine
    from a 1e-3 perturbation must return it to 1e-9."""
    from attnflow.analysis.basins.verify import verify_state

    m, step, X, rng = _layernorm_map_fixed_point()
    X0 = X + 1e-3 * rng.normal(size=X.shape)
    ref = eq.refine(m, jnp.asarray(X0))
    assert bool(ref.success)
    np.testing.assert_allclose(np.asarray(ref.state), X, atol=1e-9)
    assert verify_state(m, jnp.asarray(X0)) == "stable"
