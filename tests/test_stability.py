"""Autodiff stability against docs/model.md's closed forms, finite differences and simulations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import equilibria as eq, stability as st

TOL64 = 1e-10

def model_with_W(rng, W, H, kind="softmax", beta=0.7):
    d = W.shape[0]
    if H == 1:
        heads = af.Heads.single(W, Q=rng.normal(size=(d, d)), K=rng.normal(size=(d, d)))
    else:
        Vs = rng.normal(size=(H, d, d))
        Os = np.stack([W @ np.linalg.inv(Vs[h]) / H for h in range(H)])
        heads = af.Heads(Q=rng.normal(size=(H, d, d)), K=rng.normal(size=(H, d, d)), V=Vs, O=Os)
    return af.SelfAttention(heads, af.Attention(kind), beta)


@pytest.mark.parametrize("H", [1, 2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_consensus_spectra_match_closed_forms(H, symmetric, time):
    rng = np.random.default_rng(H + 10 * symmetric)
    d, n = 3, 4
    S = np.linalg.qr(rng.normal(size=(d, d)))[0] if symmetric else rng.normal(size=(d, d))
    W = S @ np.diag([1.0, 0.4, -0.3]) @ np.linalg.inv(S)
    attn = model_with_W(rng, W, H)
    np.testing.assert_allclose(attn.heads.layer_matrix(), W, atol=1e-12)
    dyn, alpha = (af.LayerMap(attn, 0.3), 0.3) if time == "discrete" else (af.SphereFlow(attn), None)
    X = jnp.stack([eq.consensus(dyn, k, n, s) for k in range(d) for s in (1, -1)])
    stab = st.analyse(dyn, X)
    for i, (k, s) in enumerate([(k, s) for k in range(d) for s in (1, -1)]):
        cf = st.consensus_closed_form(dyn, k, n, alpha=alpha)
        np.testing.assert_allclose(np.sort_complex(stab.eigenvalues[i]), np.sort_complex(cf), atol=TOL64)
        assert stab.residual[i] < 1e-14
        # consensus on v_1 (index 0) is the only stable consensus
        assert bool(stab.stable[i]) == (k == 0)


def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(3)
    attn = model_with_W(rng, rng.normal(size=(3, 3)), 2)
    X = af.sample.sphere(jax.random.PRNGKey(0), (5, 3))
    for dyn in (af.LayerMap(attn, 0.2), af.SphereFlow(attn)):
        J = np.asarray(st.extrinsic_jacobian(dyn, X))
        f = (lambda Z: dyn.step(0, Z)) if isinstance(dyn, af.LayerMap) else (lambda Z: dyn.vf(0.0, Z))
        h, x = 1e-6, np.asarray(X).ravel()
        fd = np.stack([(np.asarray(f(jnp.asarray(x + h * e).reshape(5, 3))) - np.asarray(f(jnp.asarray(x - h * e).reshape(5, 3)))).ravel() / (2 * h) for e in np.eye(15)], axis=1)
        np.testing.assert_allclose(J, fd, atol=1e-8)
        # intrinsic Jacobian = the tangent restriction: B^T J B with orthonormal tangent bases
        B = np.asarray(st.tangent_basis(X))
        np.testing.assert_allclose(np.einsum("nda,nd->na", B, np.asarray(X)), 0, atol=1e-14)
        np.testing.assert_allclose(np.einsum("nda,ndb->nab", B, B), np.broadcast_to(np.eye(2), (5, 2, 2)), atol=1e-14)


def test_stable_bipartite_small_perturbation_returns_large_escapes():
    """[PM Thm 3]: a locally stable bipartite consensus (single head, symmetric V, M = V, beta = 1)."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    n = 6
    Xb = eq.bipartite(dyn, 0, 3, n)
    assert bool(st.analyse(dyn, Xb[None]).stable[0])
    small = af.sample.perturb_ball(jax.random.PRNGKey(1), Xb, 0.05, 16)
    sol = af.simulate(dyn, small, steps=3000)
    np.testing.assert_allclose(np.abs(np.asarray(sol.final) @ np.array([1.0, 0, 0])), 1.0, atol=1e-6)
    assert np.all(np.max(np.abs(np.asarray(sol.final) - np.asarray(Xb)), axis=(1, 2)) < 1e-6)
    large = af.sample.perturb_ball(jax.random.PRNGKey(2), Xb, 3.0, 32)
    fin = np.asarray(af.simulate(dyn, large, steps=3000).final)
    c = fin @ np.array([1.0, 0, 0])
    consensus = np.all(c > 1 - 1e-6, axis=1) | np.all(c < -1 + 1e-6, axis=1)
    assert consensus.any()  # some large perturbations escape to consensus on +-v_1


def test_saddle_flag_and_dwell():
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    X = jnp.stack([eq.consensus(V, 0, 4), eq.consensus(V, 1, 4)])
    saddle, dwell, stab = st.saddle_flags(dyn, X, distance=1e-8)
    assert list(saddle) == [False, True]
    assert np.isinf(dwell[0]) and dwell[1] == pytest.approx(np.log(1e8) / np.log(stab.measure[1]))


def test_dwell_estimate_matches_simulation():
    """Saddle (consensus on v_2 of the map): the linear estimate log(1/eps)/log(rho) vs the simulated escape."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    X = eq.consensus(V, 1, 4)
    saddle, dwell, stab = st.saddle_flags(dyn, X[None], distance=1e-6)
    assert saddle[0] and stab.measure[0] == pytest.approx(1.1 / 1.05, abs=1e-12)
    measured = st.measured_dwell(dyn, X, distance=1e-6, steps=600)
    assert 0.85 * dwell[0] < measured < 1.1 * dwell[0]
    # a stable state never escapes
    assert np.isinf(st.measured_dwell(dyn, eq.consensus(V, 0, 4), distance=1e-3, steps=200))


def test_verdicts_are_an_enumeration_with_int_codes():
    """Verdict codes stay ints (0 stable, 1 unstable, 2 neutral) for array use; names, items and JSON records
    come from the Verdict enumeration. The case: discrete map, V = diag(1, 0.4, -0.3), M = I (closed forms of
    docs/model.md section 5: consensus on v_1 stable, on v_2, v_3 unstable); a rotation-invariant W = I gives
    neutral directions."""
    assert (st.STABLE, st.UNSTABLE, st.NEUTRAL) == (0, 1, 2) and st.VERDICTS == ("stable", "unstable", "neutral")
    assert [st.verdict_name(c) for c in range(3)] == list(st.VERDICTS)
    assert "rho < 1" in st.Verdict[st.Verdict.stable]
    V = np.diag([1.0, 0.4, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    stab = st.analyse(dyn, jnp.stack([eq.consensus(dyn, k, 4) for k in range(3)]))
    assert list(stab.verdict) == [0, 1, 1] and list(stab.verdict_names) == ["stable", "unstable", "unstable"]
    assert np.array_equal(np.asarray(stab.result == st.Verdict.unstable), [False, True, True])
    rec = stab.to_json(0)
    cf = st.consensus_closed_form(dyn, 0, 4, alpha=0.1)
    assert rec["verdict"] == "stable" and rec["spectral_radius"] == pytest.approx(np.abs(cf).max(), abs=1e-12)
    assert rec["neutral"] == 0 and rec["unstable_directions"] == 0 and rec["residual"] < 1e-14
    assert st.analyse(dyn, eq.consensus(dyn, 1, 4)[None]).to_json(0)["unstable_directions"] == int(np.sum(np.abs(st.consensus_closed_form(dyn, 1, 4, alpha=0.1)) > 1 + 1e-8))
    iso = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(3)), af.Attention("softmax"), 1.0))
    s_iso = st.analyse(iso, eq.bipartite(iso, 0, 2, 4)[None])
    assert s_iso.measure_name == "max Re" and s_iso.neutral[0] > 0 and s_iso.verdict_names[0] in ("neutral", "unstable")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_neutral_directions_survive_float32(dtype):
    """W = I (rotation symmetry): consensus has the closed-form eigenvalue (1 + alpha)/(1 + alpha) = 1 with
    multiplicity d - 1 = 2 (docs/model.md section 5), i.e. neutral, in float32 as in float64; the tolerance is
    raised to 100 machine epsilons (float32 rounds rho to 0.99999994, which tol = 1e-8 would call stable)."""
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(np.eye(3)).astype(dtype), af.Attention("softmax"), 1.0), 0.1)
    X = jnp.stack([eq.consensus(dyn, 0, 4), eq.bipartite(dyn, 0, 2, 4)]).astype(dtype)
    stab = st.analyse(dyn, X)
    cf = st.consensus_closed_form(np.eye(3), 0, 4, alpha=0.1)
    assert int(np.sum(np.abs(np.abs(cf) - 1) < 1e-12)) == 2
    assert list(stab.verdict_names) == ["neutral", "unstable"] and stab.neutral[0] == 2
    assert stab.tol == (1e-8 if dtype == "float64" else pytest.approx(100 * np.finfo(np.float32).eps))
