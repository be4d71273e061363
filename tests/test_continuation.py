"""Continuation in alpha/beta: the step-size bifurcation of docs/model.md section 5 found by bisection."""

import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import continuation as co, equilibria as eq, stability as st


def test_step_size_condition_bites_where_predicted():
    V = np.diag([1.0, 0.2, -3.0])
    thr = st.step_size_threshold(V)
    assert thr == pytest.approx(2 / (3.0 - 1.0))
    attn = af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0)
    X = eq.consensus(V, 0, 4)[None]
    for alpha, stable in [(0.95 * thr, True), (1.05 * thr, False)]:
        assert bool(st.analyse(af.LayerMap(attn, alpha), X).stable[0]) == stable
    branch = co.continue_equilibrium(af.LayerMap(attn, 0.2), X[0], param="alpha", values=np.linspace(0.2, 1.6, 8))
    assert len(branch.changes) == 1 and branch.changes[0] == pytest.approx(thr, abs=1e-7)
    # the grid 0.2, 0.4, ..., 1.6 holds alpha = 1 = thr itself, where rho = 1 exactly: that point reads neutral
    assert [st.verdict_name(v) for v in branch.verdict] == ["stable"] * 4 + ["neutral"] + ["unstable"] * 3
    assert branch.describe("consensus +v1") == [f"consensus +v1: stable -> neutral at alpha = {branch.changes[0]:.6g} as alpha increases"]
    back = co.continue_equilibrium(af.LayerMap(attn, 1.6), X[0], param="alpha", values=np.linspace(1.6, 0.3, 6))
    assert back.changes[0] == pytest.approx(thr, abs=1e-7) and "unstable -> stable" in back.describe()[0] and "decreases" in back.describe()[0]
    assert back.to_json("c")["transitions"] == [{"at": back.changes[0], "from": "unstable", "to": "stable", "direction": "decreasing"}]
    # batched over parameter values in one call
    s = st.jacobians(af.LayerMap(attn, 0.2), X, alpha=[0.5, 1.5])[0]
    assert s.shape == (2, 1, 8, 8)


def test_beta_continuation_of_stable_consensus_and_bipartite():
    """Consensus on v_1 stays stable for every beta (its spectrum does not depend on beta, docs/model.md section 5);
    each continuation point is refined to an equilibrium."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    betas = np.linspace(0.5, 3.0, 5)
    b = co.continue_equilibrium(dyn, eq.consensus(dyn, 0, 4), param="beta", values=betas)
    np.testing.assert_allclose(b.values, betas)
    assert np.all(b.verdict == st.STABLE) and len(b.changes) == 0
    np.testing.assert_allclose(b.measure, (1 + 0.1 * 0.5) / (1 + 0.1 * 1.0), atol=1e-10)  # common mode along v_2 dominates
    assert np.all(b.residual < 1e-12)
    with pytest.raises(ValueError):
        co.continue_equilibrium(dyn, eq.consensus(dyn, 0, 4), param="gamma", values=betas)


def test_step_size_threshold_with_complex_eigenvalues():
    """Eigenvalues 1 and +-10i: |1 + alpha 10i| > 1 + alpha once alpha > 2/99, although no real eigenvalue is below
    -lambda_1 (the old rule returned inf). Reference: the autodiff spectral radius at consensus on either side."""
    W = np.array([[1.0, 0, 0], [0, 0, 10.0], [0, -10.0, 0]])
    thr = st.step_size_threshold(W)
    assert thr == pytest.approx(2 * (1 - 0) / (100 - 1), rel=1e-12)
    attn = af.SelfAttention(af.Heads.single(W), af.Attention("softmax"), 1.0)
    X = eq.consensus(W, 0, 3)[None]
    for alpha, stable in [(0.95 * thr, True), (1.05 * thr, False)]:
        assert bool(st.analyse(af.LayerMap(attn, alpha), X).stable[0]) == stable


def test_consensus_closed_form_refuses_masks_it_does_not_hold_for():
    V = np.diag([1.0, 0.4, -0.3])
    causal = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax", mask="causal"), 1.0), 0.3)
    with pytest.raises(ValueError, match="full"):
        st.consensus_closed_form(causal, 0, 4, alpha=0.3)
    relu = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("relu"), 1.0), 0.3)
    with pytest.raises(ValueError, match="row-stochastic"):
        st.consensus_closed_form(relu, 0, 4, alpha=0.3)
    # row-normalised relu is row-stochastic at consensus when the score q = beta v^T M v is positive: on v_3 of
    # M = V = diag(1, 0.4, -0.3), q = -0.3 (the rows are zero there)
    rn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("relu", relu_normalize=True), 1.0), 0.3)
    with pytest.raises(ValueError, match="q_h > 0"):
        st.consensus_closed_form(rn, 2, 4, alpha=0.3)
    biased = af.SphereFlow(af.SelfAttention(af.Heads(*(np.eye(3)[None],) * 4, bv=np.ones((1, 3))), beta=1.0))
    with pytest.raises(ValueError, match="biases"):
        st.consensus_closed_form(biased, 0, 4)
    ln = af.LayerMap(af.SelfAttention(af.Heads.single(V)), 0.3, norm=af.LayerNorm())
    with pytest.raises(ValueError, match="l2"):
        st.consensus_closed_form(ln, 0, 4, alpha=0.3)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V), beta=1.0))
    for k in (3, -1, 1.0):  # v_1..v_3 are k = 0..2; a negative k must not wrap to the last pair
        with pytest.raises(ValueError, match="from 0"):
            st.consensus_closed_form(flow, k, 4)
    with pytest.raises(ValueError, match="number of tokens"):
        st.consensus_closed_form(flow, 0, 0)
