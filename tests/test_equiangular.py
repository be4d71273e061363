"""Equiangular reduction against full simulations, SciPy and hand-derived closed forms (float64)."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.integrate import quad, solve_ivp

import attnflow as af
from attnflow.analysis import equiangular as eq


def rhs_np(r, n, beta, w, m, kind="softmax"):
    """docs/model.md section 7, written out independently (NumPy)."""
    out = 0.0
    for wh, mh in zip(w, m):
        if kind == "softmax":
            ao = np.exp(beta * mh * r) / (np.exp(beta * mh) + (n - 1) * np.exp(beta * mh * r))
        else:
            ao = max(beta * mh * r, 0.0) / n
        out += wh * ao
    return 2 * (1 - r) * (1 + (n - 1) * r) * out


def full_flow(w, m, d, beta, kind="softmax"):
    return af.SphereFlow(af.SelfAttention(eq.scalar_heads(w, m, d), af.Attention(kind), beta))


@pytest.mark.parametrize(
    "w, m, kind, rho0",
    [([1.0], [1.0], "softmax", -0.2), ([1.0, 0.5], [2.0, -1.0], "softmax", 0.1), ([0.7, 1.2], [1.5, 0.5], "relu", 0.2)],
)
def test_reduced_ode_matches_full_simulation(w, m, kind, rho0):
    n, d, beta = 4, 5, 1.3
    X0 = af.sample.equiangular(n, d, rho0, key=jax.random.PRNGKey(3))
    sol = af.simulate(full_flow(w, m, d, beta, kind), X0[None], t1=2.0, dt=2e-3, saves=10)
    G = np.einsum("sid,sjd->sij", sol.trajectory[:, 0], sol.trajectory[:, 0])
    iu = np.triu_indices(n, 1)
    assert np.ptp(G[:, iu[0], iu[1]], axis=1).max() < 1e-10  # stays equiangular
    rho = eq.solve_reduced(rho0, sol.ts, n=n, beta=beta, w=w, m=m, kind=kind)
    np.testing.assert_allclose(eq.equiangular_rho(sol.trajectory[:, 0]), rho, atol=1e-9)
    ivp = solve_ivp(lambda t, r: rhs_np(r[0], n, beta, w, m, kind), (0, 2.0), [rho0], t_eval=sol.ts, rtol=1e-13, atol=1e-14, method="DOP853")
    np.testing.assert_allclose(rho, ivp.y[0], atol=1e-10)


def test_reduced_rhs_matches_numpy():
    for r in (-0.2, 0.0, 0.4, 0.95):
        got = float(eq.reduced_rhs(r, n=6, beta=2.0, w=[1.0, 0.3], m=[0.5, 2.0]))
        assert got == pytest.approx(rhs_np(r, 6, 2.0, [1.0, 0.3], [0.5, 2.0]), rel=1e-13)


def test_clustering_time_against_quadrature_and_simulation():
    n, d, rho0, eps, w, m = 4, 4, 0.0, 1e-2, [1.0], [1.0]
    betas = np.array([0.5, 2.0])
    T = np.asarray(eq.clustering_time(eps, rho0, n=n, beta=betas, w=w, m=m))
    for b, t in zip(betas, T):
        ref, _ = quad(lambda r: 1 / rhs_np(r, n, b, w, m), rho0, 1 - eps, epsabs=1e-13, epsrel=1e-12, limit=200)
        assert t == pytest.approx(ref, rel=1e-9)
    # the full simulation crosses rho = 1 - eps at T (linear interpolation between saves of spacing 0.01)
    X0 = af.sample.equiangular(n, d, rho0, key=jax.random.PRNGKey(0))
    assert T.max() < 4.0
    sol = af.sweep(full_flow(w, m, d, 1.0), X0[None], beta=betas, t1=4.0, dt=5e-3, saves=400)
    for p, t in enumerate(T):
        r = eq.equiangular_rho(sol.trajectory[p, :, 0])
        k = int(np.argmax(r >= 1 - eps))
        assert k > 0
        tc = np.interp(1 - eps, r[k - 1 : k + 1], sol.ts[k - 1 : k + 1])
        assert tc == pytest.approx(t, abs=1e-4)


def test_rate_near_consensus_and_simplex():
    n, beta, w, m = 5, 1.7, [1.0, 0.4], [1.0, 2.5]
    # near rho = 1: F(1 - delta) / delta -> lambda_1
    for kind in ("softmax", "relu"):
        lam = eq.rate_near_consensus(beta=beta, w=w, m=m, kind=kind)
        delta = 1e-7
        assert rhs_np(1 - delta, n, beta, w, m, kind) / delta == pytest.approx(lam, rel=1e-5)
    assert eq.rate_near_consensus(beta=beta, w=w, m=m) == pytest.approx(2 * 1.4)
    # at the simplex rho_* = -1/(n-1): F(rho_*) = 0 and F'(rho_*) = lambda_0 (central difference)
    rs = -1 / (n - 1)
    assert abs(rhs_np(rs, n, beta, w, m)) < 1e-15
    h = 1e-6
    fd = (rhs_np(rs + h, n, beta, w, m) - rhs_np(rs - h, n, beta, w, m)) / (2 * h)
    assert eq.rate_near_simplex(n=n, beta=beta, w=w, m=m) == pytest.approx(fd, rel=1e-7)
    # and the full simulation's late-time decay of 1 - rho follows lambda_1 (softmax: independent of beta)
    d = 5
    X0 = af.sample.equiangular(n, d, 0.3, key=jax.random.PRNGKey(1))
    sol = af.simulate(full_flow(w, m, d, beta), X0[None], t1=6.0, dt=5e-3, saves=12)
    r = eq.equiangular_rho(sol.trajectory[:, 0])
    slope = -np.log((1 - r[-1]) / (1 - r[-2])) / (sol.ts[-1] - sol.ts[-2])
    assert slope == pytest.approx(2 * 1.4, rel=2e-3)


def test_critical_beta_matches_simulated_transition():
    """beta_c = log(n-1)/(m(1-rho0)) against a beta sweep of full simulations from equiangular starts."""
    n, d, rho0, w, m = 5, 5, 0.2, [1.0], [1.5]
    bc = eq.critical_beta(n=n, rho0=rho0, m=m)
    assert bc == pytest.approx(np.log(4) / (1.5 * 0.8))
    step = 0.05
    betas = np.concatenate([[1e-8], np.arange(step, 3 * bc, step)])
    X0 = af.sample.equiangular(n, d, rho0, key=jax.random.PRNGKey(2))
    h = 1e-3
    sol = af.sweep(full_flow(w, m, d, 1.0), X0[None], beta=betas, t1=2 * h, dt=h, saves=2)
    r = eq.equiangular_rho(sol.trajectory[:, :, 0])
    speed = (-3 * r[:, 0] + 4 * r[:, 1] - r[:, 2]) / (2 * h)  # second-order one-sided derivative at t = 0
    ratio = speed / speed[0]
    assert np.all(np.diff(ratio) < 0)
    k = int(np.argmax(ratio < eq.critical_speed_ratio(n)))  # first swept beta past the transition
    assert betas[k - 1] <= bc <= betas[k]
    # at beta_c exactly, half of the attention goes to the token itself
    assert float(eq.self_attention_weight(rho0, n=n, beta=bc, m=m[0])) == pytest.approx(0.5, abs=1e-14)


def test_critical_beta_heterogeneous_and_regimes():
    n, rho0 = 6, 0.0
    w, m = np.array([1.0, 0.5]), np.array([1.0, 3.0])
    bc = eq.critical_beta(n=n, rho0=rho0, m=m, w=w)
    a = np.array([float(eq.self_attention_weight(rho0, n=n, beta=bc, m=mh)) for mh in m])
    assert np.sum(w * (a - 0.5)) == pytest.approx(0.0, abs=1e-12)
    # regimes of T_eps for one head: near-flat below beta_c, exponential growth with slope m(1 - rho0) far above
    bc1 = eq.critical_beta(n=n, rho0=rho0, m=[1.0])
    T = np.asarray(eq.clustering_time(1e-3, rho0, n=n, beta=np.array([0.0 + 1e-9, 0.5 * bc1, 6 * bc1, 7 * bc1]), w=[1.0], m=[1.0]))
    assert T[1] / T[0] < 1.2
    slope = np.log(T[3] / T[2]) / bc1
    assert slope == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="n >= 3"):
        eq.critical_beta(n=2, rho0=0.0, m=[1.0])


@settings(max_examples=8)
@given(
    m1=st.floats(0.2, 3.0), m2=st.floats(0.2, 3.0), w1=st.floats(0.2, 2.0), w2=st.floats(0.2, 2.0), beta=st.floats(0.3, 3.0)
)
def test_superadditivity_property(m1, m2, w1, w2, beta):
    g = eq.superadditivity_gain(1e-3, 0.0, n=5, beta=beta, heads_a=([w1], [m1]), heads_b=([w2], [m2]))
    assert g >= -1e-9
    if abs(m1 - m2) > 0.5 and max(m1, m2) * beta > 1.5:
        assert g > 1e-4


def test_superadditivity_equality_for_homogeneous_heads_and_full_simulation():
    assert abs(eq.superadditivity_gain(1e-3, 0.0, n=5, beta=2.0, heads_a=([1.0], [2.0]), heads_b=([0.3], [2.0]))) < 1e-9
    # heterogeneous pair: the combined clustering time of a full two-head simulation matches the reduced T_eps
    n, d, eps = 4, 4, 1e-2
    w, m, beta = [1.0, 1.0], [0.5, 3.0], 2.0
    T12 = float(eq.clustering_time(eps, 0.0, n=n, beta=beta, w=w, m=m))
    X0 = af.sample.equiangular(n, d, 0.0, key=jax.random.PRNGKey(5))
    sol = af.simulate(full_flow(w, m, d, beta), X0[None], t1=4.0, dt=5e-3, saves=400)
    r = eq.equiangular_rho(sol.trajectory[:, 0])
    k = int(np.argmax(r >= 1 - eps))
    assert np.interp(1 - eps, r[k - 1 : k + 1], sol.ts[k - 1 : k + 1]) == pytest.approx(T12, abs=1e-4)
    assert eq.superadditivity_gain(eps, 0.0, n=n, beta=beta, heads_a=([1.0], [0.5]), heads_b=([1.0], [3.0])) > 0.05


def test_relu_vs_softmax_linearised():
    n, beta, w, m = 5, 2.0, [1.0], [1.0]
    a = eq.linearised_times(1e-3, 1e-2, n=n, beta=beta, w=w, m=m)
    b = eq.linearised_times(1e-3, 1e-6, n=n, beta=beta, w=w, m=m)
    # softmax escape stays below delta / F(0) as rho0 -> 0; relu escape grows like log(1/rho0)
    F0 = rhs_np(0.0, n, beta, w, m)
    assert a["escape_softmax"] < b["escape_softmax"] < 0.1 / F0
    assert a["escape_softmax"] == pytest.approx((0.1 - 1e-2) / F0, rel=1e-12)  # from rho0 to delta at speed F(0)
    assert b["escape_relu"] - a["escape_relu"] == pytest.approx(n * np.log(1e4) / (2 * beta), rel=1e-12)
    assert a["approach_softmax"] / a["approach_relu"] == pytest.approx(beta * m[0])
    # nonlinear relu from rho0 <= 0 never clusters; from rho0 > 0 its T_eps matches quadrature
    assert np.isinf(float(eq.clustering_time(1e-3, -0.1, n=n, beta=beta, w=w, m=m, kind="relu")))
    ref, _ = quad(lambda r: 1 / rhs_np(r, n, beta, w, m, "relu"), 1e-3, 1 - 1e-3, epsrel=1e-12, limit=200)
    assert float(eq.clustering_time(1e-3, 1e-3, n=n, beta=beta, w=w, m=m, kind="relu")) == pytest.approx(ref, rel=1e-8)


def test_validation():
    with pytest.raises(ValueError, match="softmax' or 'relu"):
        eq.reduced_rhs(0.1, n=3, beta=1.0, w=[1.0], m=[1.0], kind="uniform")
    with pytest.raises(ValueError, match="same length"):
        eq.reduced_rhs(0.1, n=3, beta=1.0, w=[1.0, 2.0], m=[1.0])
    with pytest.raises(ValueError, match="rho0"):
        eq.clustering_time(1e-3, 1.0, n=3, beta=1.0, w=[1.0], m=[1.0])


def test_clustering_time_is_float64_on_the_host_without_x64():
    """With JAX's x64 mode off (a user's default float32 process) T_eps and rho(t) are still solved in float64:
    float32 cannot meet the quadrature's tolerances and used to return inf for every beta. Reference: scipy quad."""
    n, rho0, eps, w, m = 5, 0.0, 1e-3, [1.0], [1.0]
    betas = np.array([0.5, 1.0, 3.0])
    with jax.enable_x64(False):
        T = eq.clustering_time(eps, rho0, n=n, beta=betas, w=w, m=m)
        rho = eq.solve_reduced(rho0, np.linspace(0.0, 2.0, 5), n=n, beta=1.0, w=w, m=m)
        assert jax.numpy.zeros(1).dtype == np.float32  # the process default is untouched
    assert T.dtype == np.float64 and rho.dtype == np.float64 and np.all(np.isfinite(T))
    for b, t in zip(betas, T):
        ref, _ = quad(lambda r: 1 / rhs_np(r, n, b, w, m), rho0, 1 - eps, epsabs=1e-13, epsrel=1e-12, limit=200)
        assert t == pytest.approx(ref, rel=1e-9)
    ref = solve_ivp(lambda t, r: [rhs_np(r[0], n, 1.0, w, m)], (0.0, 2.0), [rho0], t_eval=np.linspace(0.0, 2.0, 5),
                    rtol=1e-12, atol=1e-14).y[0]
    np.testing.assert_allclose(rho, ref, atol=1e-9)


def test_closed_forms_are_float64_and_refuse_a_bad_beta():
    # float32 rounded them (1e-8 relative) and underflowed e^{-beta m (1 - rho)}: an initial speed of 1.5e-52 was 0
    kw = dict(n=4, w=[1.0], m=[1.0])
    v = eq.initial_speed(0.1, beta=120.0, **kw)
    p = (1 - 0.1) * (1 + 3 * 0.1)
    assert float(v) == pytest.approx(2 * p / (np.exp(120.0 * 0.9) + 3), rel=1e-12) and float(v) > 0
    assert eq.rate_near_simplex(beta=2.0, **kw) == pytest.approx(2 * 4 / (np.exp(2.0 * 4 / 3) + 3), rel=1e-14)
    assert float(eq.reduced_rhs(1 - 1e-9, beta=1.0, **kw)) == pytest.approx(2 * 1e-9 * (1 + 3 * (1 - 1e-9)) / 4 * 1.0,
                                                                            rel=1e-6)
    for bad in (-1.0, 0.0, np.nan):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            eq.clustering_time(0.01, 0.1, beta=bad, **kw)
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            eq.initial_speed(0.1, beta=bad, **kw)
