"""Energies, rates, radial shadows, entropy and the monotonicity condition, against NumPy loops,
finite differences and hand-derived identities (float64; one float32 dtype check)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnflow as af
from attnflow.analysis import energy as en


def sym_heads(Ms, Ws=None):
    """Q = I, K = M_h, V = W_h (default M_h), O = I: score matrices M_h, head matrices W_h."""
    Ms = [np.asarray(m, float) for m in Ms]
    Ws = Ms if Ws is None else [np.asarray(w, float) for w in Ws]
    eye = np.eye(Ms[0].shape[0])
    H = len(Ms)
    return af.Heads(Q=np.stack([eye] * H), K=np.stack(Ms), V=np.stack(Ws), O=np.stack([eye] * H))


def energy_np(X, Ms, beta):
    """E_h = 1/(2 beta n^2) sum_ij exp(beta x_i^T M_h x_j), plain loops."""
    n = X.shape[0]
    out = []
    for M in Ms:
        tot = 0.0
        for i in range(n):
            for j in range(n):
                tot += np.exp(beta * X[i] @ M @ X[j])
        out.append(tot / (2 * beta * n * n))
    return np.array(out)


def entropy_np(A):
    return np.array([-sum(a * np.log(a) for a in row if a > 0) for row in A])


def rand_sym(rng, d, scale=1.0):
    A = rng.normal(size=(d, d)) * scale
    return (A + A.T) / 2


# --- energies and rates -----------------------------------------------------------------------


def test_energies_match_numpy_loop():
    rng = np.random.default_rng(0)
    Ms = [rng.normal(size=(3, 3)) for _ in range(2)]  # not symmetric: the energy is defined anyway
    attn = af.SelfAttention(sym_heads(Ms), af.Attention("softmax"), 0.7)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(0), (5, 3)))
    np.testing.assert_allclose(en.head_energies(attn, X), energy_np(X, Ms, 0.7), rtol=1e-13)
    assert float(en.energy(af.SphereFlow(attn), X)) == pytest.approx(energy_np(X, Ms, 0.7).sum(), rel=1e-13)


@pytest.mark.parametrize("kind", ["softmax", "unnormalized"])
@pytest.mark.parametrize("Flow", [af.SphereFlow, af.FlatFlow])
def test_rates_equal_finite_differences_and_decomposition(kind, Flow):
    rng = np.random.default_rng(1)
    Ms = [rand_sym(rng, 3) for _ in range(3)]
    Ws = [rng.normal(size=(3, 3)) for _ in range(3)]  # general values: no gradient structure needed here
    attn = af.SelfAttention(sym_heads(Ms, Ws), af.Attention(kind), 1.2)
    flow = Flow(attn)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(1), (5, 3)))
    r = en.energy_rates(flow, X)
    v = np.asarray(flow.vf(0.0, X))
    h = 1e-5
    fd = (energy_np(X + h * v, Ms, 1.2) - energy_np(X - h * v, Ms, 1.2)) / (2 * h)
    np.testing.assert_allclose(r.per_head, fd, rtol=1e-8, atol=1e-10)
    assert float(r.total) == pytest.approx(fd.sum(), rel=1e-8)
    # row sums of the decomposition reproduce the autodiff per-head rates; flat flows have no radial terms
    np.testing.assert_allclose(np.asarray(r.terms).sum(1), r.per_head, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.terms, np.asarray(r.terms_flat) + np.asarray(r.terms_radial), atol=1e-14)
    if Flow is af.FlatFlow:
        assert np.all(np.asarray(r.terms_radial) == 0)
    # radial shadows <x_i, f^h_i> from a NumPy loop
    for hh in range(3):
        S = 1.2 * X @ Ms[hh] @ X.T
        A = np.exp(S) / (np.exp(S).sum(1, keepdims=True) if kind == "softmax" else 5)
        f = (A @ X) @ Ws[hh].T
        np.testing.assert_allclose(np.asarray(r.shadows)[hh], np.sum(X * f, axis=1), rtol=1e-12)


def test_gradient_structure_closed_forms():
    """W_h = M_h symmetric: T[h, h] = sum_i c^h_i |P f^h_i|^2 and T[h, g] radial = -sum_i c^h_i r^h_i r^g_i."""
    rng = np.random.default_rng(2)
    n, beta = 6, 0.9
    Ms = [rand_sym(rng, 3) for _ in range(2)]
    attn = af.SelfAttention(sym_heads(Ms), af.Attention("softmax"), beta)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(2), (n, 3)))
    r = en.energy_rates(af.SphereFlow(attn), X)
    f = np.asarray(attn.head_outputs(X))
    for h in range(2):
        c = np.exp(beta * X @ Ms[h] @ X.T).sum(1) / n**2
        Pf = f[h] - np.sum(X * f[h], 1, keepdims=True) * X
        assert float(r.terms[h, h]) == pytest.approx(np.sum(c * np.sum(Pf * Pf, 1)), rel=1e-11)
        g = 1 - h
        shadow = -np.sum(c * np.sum(X * f[h], 1) * np.sum(X * f[g], 1))
        assert float(r.terms_radial[h, g]) == pytest.approx(shadow, rel=1e-11)


@settings(max_examples=10)
@given(heads=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), flat=st.booleans())
def test_property_unnormalized_symmetric_energy_nondecreasing(heads, seed, flat):
    """W_h = M_h symmetric, unnormalized kernel, 1-4 heads: E non-decreasing (rates and saved states)."""
    rng = np.random.default_rng(seed)
    Ms = [rand_sym(rng, 3, 0.4 if flat else 0.8) for _ in range(heads)]
    attn = af.SelfAttention(sym_heads(Ms), af.Attention("unnormalized"), 1.0)
    flow = af.FlatFlow(attn) if flat else af.SphereFlow(attn)
    x0 = af.sample.sphere(jax.random.PRNGKey(seed % 1000), (2, 4, 3))
    # the flat unnormalized flow blows up in finite time (d|x|^2/dt ~ e^{beta lambda |x|^2}): short horizon.
    # On the sphere the step follows the vector field's size, sum_h |M_h| e^{|M_h|}: a fixed dt = 0.03 let RK4
    # lose 18% of E in one draw (3 heads, seed 35077696; exact rates >= 0 throughout: integration error).
    t1, saves = (0.04, 10) if flat else (3.0, 20)
    lip = sum(np.linalg.norm(M, 2) * np.exp(np.linalg.norm(M, 2)) for M in Ms)
    dt_max = 0.002 if flat else min(0.03, 0.2 / lip)
    steps = saves * int(np.ceil(t1 / (saves * dt_max)))
    tr = en.diagnose(flow, x0, t1=t1, dt=t1 / steps, saves=saves)
    assert np.all(np.isfinite(tr.energy))
    assert np.all(tr.monotone), tr.explain(int(np.argmin(tr.monotone)))
    assert np.all(tr.rate >= -1e-12 * np.abs(tr.energy))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), beta=st.floats(0.2, 3.0), flat=st.booleans())
def test_property_softmax_one_head_energy_nondecreasing(seed, beta, flat):
    rng = np.random.default_rng(seed)
    attn = af.SelfAttention(sym_heads([rand_sym(rng, 3)]), af.Attention("softmax"), beta)
    flow = af.FlatFlow(attn) if flat else af.SphereFlow(attn)
    x0 = af.sample.sphere(jax.random.PRNGKey(seed % 1000), (2, 4, 3))
    tr = en.diagnose(flow, x0, t1=0.5 if flat else 2.0, dt=0.01 if flat else 0.02, saves=10)  # flat: norms grow
    assert np.all(np.isfinite(tr.energy))
    assert np.all(tr.monotone), tr.explain(int(np.argmin(tr.monotone)))
    assert np.all(tr.rate >= -1e-12 * np.abs(tr.energy))


# --- counter-examples --------------------------------------------------------------------------

# Documented counter-example: two NON-orthogonal symmetric heads (W_h = M_h, overlap of ranges ~1),
# unnormalized kernel, on the sphere. The total E is provably monotone (equal head weights c = 1/n), but
# E_1 decreases: its cross-head radial shadow term -(1/n) sum_i r^1_i r^0_i outweighs its own gradient part
# and the flat cross term. (Found with energy_trace on 8 random starts; member 0 of PRNGKey(0).)
CE_M1 = np.array([[1.0, 0.5, 0.0], [0.5, 0.2, 0.0], [0.0, 0.0, -0.3]])
CE_M2 = np.array([[-0.4, 0.0, 0.3], [0.0, 1.0, 0.2], [0.3, 0.2, 0.5]])


def test_counterexample_per_head_energy_decreases_from_radial_shadows():
    attn = af.SelfAttention(sym_heads([CE_M1, CE_M2]), af.Attention("unnormalized"), 1.0)
    cond = en.monotonicity_condition(attn)
    assert cond.total_sphere and not cond.per_head_sphere and cond.max_overlap > 0.5
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (8, 5, 3))[:1]
    tr = en.diagnose(af.SphereFlow(attn), x0, t1=6.0, dt=0.01, saves=60)
    assert tr.monotone[0]  # total monotone, as the condition certifies
    assert not tr.head_monotone[0, 1]  # ... but head 1's energy decreases
    assert np.diff(tr.head_energy[:, 0, 1]).min() < -1e-3
    k = int(np.argmin(tr.head_rate[:, 0, 1]))
    own, cross, shadow = en._trace._parts(tr.terms_flat[k, 0], tr.terms_radial[k, 0], 1)
    assert own >= 0 and cross > 0 and shadow < -(own + cross)  # the radial shadow term is the culprit
    # recompute that shadow term independently: -(1/n) sum_i <x_i, f^1_i><x_i, f^0_i>
    X = np.asarray(tr.ts[k] * 0 + af.simulate(af.SphereFlow(attn), x0, t1=6.0, dt=0.01, saves=60).trajectory[k, 0])
    n = 5
    f = [((np.exp(X @ M @ X.T) / n) @ X) @ M.T for M in (CE_M1, CE_M2)]
    ref = -np.sum(np.sum(X * f[1], 1) * np.sum(X * f[0], 1)) / n
    assert shadow == pytest.approx(ref, rel=1e-9)
    assert "radial shadow" in tr.explain_head(0, 1)


def test_softmax_multi_head_energy_decreases_and_is_explained():
    """docs/model.md section 7: two symmetric softmax heads, d = 3, n = 7, beta = 1.5: E is not monotone.

    docs/model.md section 7 quotes a relative drop of 3.6e-3 for one unspecified model. Measured over 20 random pairs
    (entries N(0, 1), symmetrised; 16 starts each, RK4 dt = 0.01 and 0.001 alike, t1 = 10): 206/320 members
    non-monotone, every model has some; relative drop median 4.6e-3, max 0.35; first break caused by the
    radial shadow terms in 192 members and by the flat cross-head terms in 14."""
    rng = np.random.default_rng(0)
    Ms = [rand_sym(rng, 3, 1.0) for _ in range(2)]
    attn = af.SelfAttention(sym_heads(Ms), af.Attention("softmax"), 1.5)
    cond = en.monotonicity_condition(attn)
    assert not cond.total_sphere and not cond.total_flat
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (16, 7, 3))
    tr = en.diagnose(af.SphereFlow(attn), x0, t1=10.0, dt=0.01, saves=200)
    assert not np.all(tr.monotone)
    m = int(np.argmax(tr.relative_drop))
    assert tr.relative_drop[m] > 1e-2
    k = int(tr.first_violation[m])
    assert k > 0 and tr.breaking_head[m] in (0, 1) and tr.cause[m] in (1, 2, 3)
    assert tr.energy[k, m] < tr.energy[k - 1, m] or tr.rate[k, m] < 0
    assert "decreases" in tr.explain(m)
    # causes are an enumeration: names by member, one record per failing member (index, first saved state, time)
    assert tr.cause_names[m] in ("own_gradient", "cross_head", "radial_shadow") and f"[{tr.cause_names[m]}]" in tr.explain(m)
    assert bool(np.asarray(tr.result == getattr(en.Cause, tr.cause_names[m]))[m])
    fails = tr.failures()
    assert [f["member"] for f in fails] == list(np.flatnonzero(~tr.monotone))
    f = next(f for f in fails if f["member"] == m)
    assert f["saved_state"] == k and f["time"] == pytest.approx(tr.ts[k]) and f["cause"] == tr.cause_names[m]
    assert set(tr.cause_names[tr.monotone]) <= {"none"}


# --- the sufficient condition, both ways --------------------------------------------------------


def _random_ball_states(key, num, n, d):
    k1, k2 = jax.random.split(key)
    X = af.sample.sphere(k1, (num, n, d))
    return X * jax.random.uniform(k2, (num, n, 1), minval=0.3, maxval=1.0)


@eqx.filter_jit
def _rates(flow, X):
    return jax.vmap(lambda x: (lambda r: (r.total, r.per_head))(en.energy_rates(flow, x)))(X)


def _min_rates(flow, X):
    return tuple(np.asarray(a) for a in _rates(flow, X))


def test_condition_orthogonal_heads_flat_per_head_and_sphere_counterexample():
    # orthogonal ranges: M_1 on e1, M_2 on span(e2, e3), W_h = M_h
    M1, M2 = np.diag([2.0, 0, 0]), np.diag([0, 1.0, -0.5])
    attn = af.SelfAttention(sym_heads([M1, M2]), af.Attention("softmax"), 3.0)
    cond = en.monotonicity_condition(attn)
    assert cond.max_overlap < 1e-12 and cond.per_head_flat and cond.total_flat
    assert not cond.total_sphere and not cond.per_head_sphere
    X = _random_ball_states(jax.random.PRNGKey(0), 500, 4, 3)
    tot, ph = _min_rates(af.FlatFlow(attn), X)
    assert tot.min() >= 0 and ph.min() >= -1e-15  # certified: every E_h rises on the flat flow
    # sphere: the radial shadows survive orthogonality and the total rate goes negative
    found = en.find_energy_decrease(af.SphereFlow(attn), jax.random.PRNGKey(0), tokens=5, num=2000)
    assert found["relative_rate"] < -1e-3 and found["head_relative_rate"] < 0
    r = en.energy_rates(af.SphereFlow(attn), found["state"])
    assert np.all(np.abs(np.asarray(r.terms_flat) - np.diag(np.diag(np.asarray(r.terms_flat)))) < 1e-12)  # no flat cross terms
    assert np.asarray(r.terms_radial)[~np.eye(2, dtype=bool)].min() < 0


def test_condition_robust_to_approximate_orthogonality():
    """Slightly rotated orthogonal heads: the margin (with the measured weight ratio) certifies the flat flow."""
    th = 0.02
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    M1, M2 = np.diag([1.0, 0, 0]), R @ np.diag([0, 1.0, 0.6]) @ R.T
    attn = af.SelfAttention(sym_heads([M1, M2]), af.Attention("softmax"), 0.5)
    worst = en.monotonicity_condition(attn)
    assert worst.max_overlap == pytest.approx(np.sin(th), rel=1e-9)
    assert worst.flat_margin >= 0 and worst.total_flat and not worst.per_head_flat
    X = _random_ball_states(jax.random.PRNGKey(3), 1000, 4, 3)
    kappa = float(np.max(jax.vmap(lambda x: en.head_weight_ratio(attn, x))(X)))
    assert kappa <= worst.weight_ratio.max()
    sharp = en.monotonicity_condition(attn, weight_ratio=kappa)
    assert sharp.flat_margin > worst.flat_margin
    tot, _ = _min_rates(af.FlatFlow(attn), X)
    assert tot.min() >= 0
    # a large overlap breaks the margin, and then a decreasing state exists (random symmetric heads)
    rng = np.random.default_rng(1)
    [rand_sym(rng, 3) for _ in range(2)]  # skip the first pair drawn
    bad = af.SelfAttention(sym_heads([rand_sym(rng, 3) for _ in range(2)]), af.Attention("softmax"), 1.5)
    assert not en.monotonicity_condition(bad).total_flat
    found = en.find_energy_decrease(af.FlatFlow(bad), jax.random.PRNGKey(1), tokens=7, num=3000)
    assert found["relative_rate"] < -1e-2


def test_condition_rejects_models_without_gradient_structure():
    rng = np.random.default_rng(4)
    M = rand_sym(rng, 3)
    assert not en.monotonicity_condition(af.SelfAttention(sym_heads([M], [M + 0.1 * np.eye(3)]))).total_sphere
    assert not en.monotonicity_condition(af.SelfAttention(sym_heads([M + np.triu(np.ones((3, 3)), 1)]))).total_flat
    one = en.monotonicity_condition(af.SelfAttention(sym_heads([M]), af.Attention("softmax")))
    assert one.total_sphere and one.per_head_sphere and one.total_flat
    with pytest.raises(ValueError, match="full mask"):
        en.monotonicity_condition(af.SelfAttention(sym_heads([M]), af.Attention("softmax", "causal")))


# --- entropy --------------------------------------------------------------------------------------


def test_entropy_matches_numpy_and_consensus_value():
    rng = np.random.default_rng(5)
    Ms = [rand_sym(rng, 3) for _ in range(2)]
    attn = af.SelfAttention(sym_heads(Ms), af.Attention("softmax", "causal"), 1.1)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(5), (6, 3)))
    S = np.asarray(en.attention_entropy(attn, X))
    for h in range(2):
        np.testing.assert_allclose(S[h], entropy_np(np.asarray(attn.weights(X))[h]), rtol=1e-12)
    assert np.all(np.isfinite(S))
    # consensus: uniform attention, S_i = log n (full mask)
    full = af.SelfAttention(sym_heads(Ms), af.Attention("softmax"), 1.1)
    Xc = np.tile(X[:1], (6, 1))
    np.testing.assert_allclose(en.attention_entropy(full, Xc), np.log(6), rtol=1e-13)


def test_entropy_rate_matches_trajectory_finite_difference():
    rng = np.random.default_rng(6)
    attn = af.SelfAttention(sym_heads([rand_sym(rng, 3) for _ in range(2)]), af.Attention("softmax"), 1.3)
    flow = af.SphereFlow(attn)
    x0 = af.sample.sphere(jax.random.PRNGKey(6), (1, 5, 3))
    h = 1e-3
    sol = af.simulate(flow, x0, t1=0.4, dt=h, saves=400)
    tr = en.energy_trace(flow, sol.trajectory, sol.ts)
    fd = (tr.entropy[2:, 0] - tr.entropy[:-2, 0]) / (2 * h)
    np.testing.assert_allclose(tr.entropy_rate[1:-1, 0], fd, rtol=1e-5, atol=1e-7)
    # and the per-token jvp equals a central difference along vf at one state
    X = np.asarray(x0[0])
    v = np.asarray(flow.vf(0.0, X))
    eps = 1e-6
    fd1 = (np.asarray(en.attention_entropy(attn, X + eps * v)) - np.asarray(en.attention_entropy(attn, X - eps * v))) / (2 * eps)
    np.testing.assert_allclose(en.entropy_rate(flow, X), fd1, rtol=1e-7, atol=1e-9)


def test_entropy_rises_along_equiangular_softmax_flow():
    from attnflow.analysis.equiangular import scalar_heads

    attn = af.SelfAttention(scalar_heads([1.0], [2.0], 4), af.Attention("softmax"), 1.0)
    x0 = af.sample.equiangular(4, 4, 0.0, key=jax.random.PRNGKey(0))[None]
    tr = en.diagnose(af.SphereFlow(attn), x0, t1=5.0, dt=0.01, saves=50)
    assert np.all(np.diff(tr.entropy[:, 0]) > 0) and np.all(tr.entropy_rate[:, 0] > -1e-14)
    assert tr.entropy[-1, 0] == pytest.approx(np.log(4), abs=1e-3)


# --- maps, dtypes, validation ----------------------------------------------------------------------


def test_discrete_map_trace_and_float32():
    M = np.diag([1.0, 0.3, -0.2])
    attn = af.SelfAttention(sym_heads([M]), af.Attention("softmax"), 1.0)
    dyn = af.LayerMap(attn, alpha=0.1)
    x0 = af.sample.sphere(jax.random.PRNGKey(7), (3, 4, 3))
    tr = en.diagnose(dyn, x0, steps=40, saves=8)
    assert tr.energy.shape == (9, 3) and np.all(np.isnan(tr.rate))
    assert tr.cause.max() in (0, 4)
    attn32 = af.SelfAttention(sym_heads([M]).astype(jnp.float32), af.Attention("softmax"), np.float32(1.0))
    X = af.sample.sphere(jax.random.PRNGKey(8), (4, 3), dtype=jnp.float32)
    r = en.energy_rates(af.SphereFlow(attn32), X)
    assert r.per_head.dtype == jnp.float32 and en.head_energies(attn32, X).dtype == jnp.float32
    assert en.attention_entropy(attn32, X).dtype == jnp.float32


def test_validation_errors():
    M = np.eye(3)
    attn = af.SelfAttention(sym_heads([M]))
    with pytest.raises(TypeError, match="flow"):
        en.energy_rates(af.LayerMap(attn), np.eye(3))
    with pytest.raises(ValueError, match="saves"):
        en.diagnose(af.SphereFlow(attn), np.eye(3)[None], t1=1.0, dt=0.1)
    with pytest.raises(ValueError, match="trajectory"):
        en.energy_trace(af.SphereFlow(attn), np.zeros((3, 3)))


def test_coarse_solver_drop_is_reported_as_integration_error():
    """A stiff unnormalized pair (|M_2| = 4.6, beta = 1.5): RK4 with dt = 1e-3 drops E by ~70% between saves
    although the exact rate is >= 0 at both ends; dt = 1e-4 is monotone, as the theorem requires."""
    M1 = np.array([[-0.5190133298294971, 0.20966643065838195, -0.1596397207421396],
                   [0.20966643065838195, 0.20442021540537625, 0.40816496240731726],
                   [-0.1596397207421396, 0.40816496240731726, 0.5939459107122969]])
    M2 = np.array([[0.7197279364283922, 2.3714729705593394, 0.00562179145979347],
                   [2.3714729705593394, 3.15090813353985, 0.4772955826849046],
                   [0.00562179145979347, 0.4772955826849046, 0.9944856278202228]])
    flow = af.SphereFlow(af.SelfAttention(sym_heads([M1, M2]), af.Attention("unnormalized"), 1.5))
    x0 = af.sample.sphere(jax.random.PRNGKey(2), (16, 7, 3))[:1]
    coarse = en.diagnose(flow, x0, t1=0.1, dt=1e-3, saves=2)
    assert not coarse.monotone[0] and coarse.cause[0] == 6 and "reduce dt" in coarse.explain(0)
    fine = en.diagnose(flow, x0, t1=0.1, dt=1e-4, saves=2)
    assert fine.monotone[0]


def test_entropy_is_not_monotone_in_general():
    """One symmetric softmax head: E is monotone, but the mean attention entropy can fall (tokens first
    concentrate their attention, then cluster). Its monotone rise toward log n is specific to regimes such as
    the equiangular one (test above)."""
    M = np.diag([1.0, 0.5, -0.4])
    attn = af.SelfAttention(sym_heads([M]), af.Attention("softmax"), 1.5)
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (4, 7, 3))
    tr = en.diagnose(af.SphereFlow(attn), x0, t1=6.0, dt=0.01, saves=60)
    assert np.all(tr.monotone)
    assert np.min(tr.entropy_rate) < -1e-3 and np.min(np.diff(tr.entropy, axis=0)) < -1e-4


def test_cause_enumeration_codes_names_and_messages():
    """The Cause codes are the historical integers (0 none ... 6 integration error), with names and messages."""
    names = ("none", "own_gradient", "cross_head", "radial_shadow", "discrete_step", "nonfinite", "integration_error")
    assert len(en.Cause) == 7
    for code, name in enumerate(names):
        assert en.cause_name(code) == name and en.cause_name(getattr(en.Cause, name)) == name
    assert en.CAUSES[0] == "none" and en.CAUSES[3] == "radial shadow terms" and "reduce dt" in en.CAUSES[6]
    assert en.EnergyTrace.CAUSES == en.CAUSES
    assert en.Cause[en.Cause.radial_shadow] == "radial shadow terms"


def test_split_package_keeps_every_public_name():
    """energy.py became a package (one module per concept); every name importable before still is, from
    attnflow.analysis.energy and (for the ones re-exported there) from attnflow."""
    old = ["head_energies", "energy", "energy_gradients", "radial_shadows", "EnergyRates", "energy_rates",
           "attention_entropy", "entropy_rate", "EnergyTrace", "energy_trace", "diagnose", "MonotonicityCondition",
           "monotonicity_condition", "head_weight_ratio", "find_energy_decrease"]
    import attnflow.analysis.energy as mod

    for name in old:
        assert callable(getattr(mod, name)) and name in mod.__all__
    for name in ("EnergyRates", "EnergyTrace", "MonotonicityCondition", "attention_entropy", "diagnose", "energy_rates",
                 "energy_trace", "entropy_rate", "find_energy_decrease", "head_energies", "monotonicity_condition",
                 "radial_shadows"):
        assert getattr(af, name) is getattr(mod, name)
    assert af.energy is mod  # the module, as before (its function is af.energy.energy)
