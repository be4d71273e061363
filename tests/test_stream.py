"""The member pool (attnflow.evolve.stream): member by member it equals simulate run for the whole cap, whatever the
pool size, group, queue blocks or backend; the cap is exact; bad input is refused.

Reference: :func:`attnflow.simulate` with ``steps=cap`` on the vmapped XLA path, and a plain NumPy loop. Tolerances:
float64, states to 1e-12 (lanes arithmetic is ordered differently), status and steps exactly.
"""

import jax
import numpy as np
import pytest
from hypothesis import given, strategies as st

import attnflow as af
from attnflow.analysis import classify as cl
from attnflow.evolve import stream as S

V3 = np.diag([1.0, 0.5, -0.3])


def mapped(V=V3, alpha=0.1, dtype=np.float64):
    V = np.asarray(V, dtype)
    return af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha)


def run_all(dyn, x0, *, pool, block, cap, tol, **kw):
    """Every member of x0 through a pool, in queue blocks of `block`, then a drain; results by sample index."""
    n, d = x0.shape[1:]
    p = S.empty_pool(pool, n, d, x0.dtype)
    outs = []
    for j in range(0, len(x0), block):
        q = np.zeros((block, n, d), x0.dtype)
        qi = np.full(block, -1, np.int32)
        m = min(block, len(x0) - j)
        q[:m], qi[:m] = x0[j : j + m], np.arange(j, j + m)
        p, r = S.advance_pool(dyn, p, q, qi, m, cap=cap, tol=tol, **kw)
        outs.append(r.valid())
    p, r = S.advance_pool(dyn, p, q, qi, 0, cap=cap, tol=tol, drain=True, **kw)
    outs.append(r.valid())
    assert p.occupied() == 0
    idx, fin, st, ns = (np.concatenate([o[i] for o in outs]) for i in range(4))
    order = np.argsort(idx)
    assert np.array_equal(idx[order], np.arange(len(x0))), "every member retired exactly once"
    return fin[order], st[order], ns[order]


def sphere(B, n=5, d=3, seed=0, dtype=np.float64):
    return np.array(af.sample.sphere(jax.random.PRNGKey(seed), (B, n, d), dtype=dtype))


@pytest.mark.parametrize("backend", ["xla", "lanes"])
def test_pool_equals_simulate_member_by_member(backend):
    """A map with members that converge early, hit the cap, and one NaN member (nonfinite at step 1)."""
    dyn, cap = mapped(), 300
    x0 = sphere(300)
    x0[7] = np.nan
    ref = af.simulate(dyn, x0, steps=cap, tol=1e-6, backend="xla")
    fin, st, ns = run_all(dyn, x0, pool=32, block=64, cap=cap, tol=1e-6, backend=backend)
    assert np.array_equal(st, np.asarray(ref.status)) and np.array_equal(ns, np.asarray(ref.steps))
    ok = np.isfinite(np.asarray(ref.final)).all(axis=(1, 2))
    np.testing.assert_allclose(fin[ok], np.asarray(ref.final)[ok], atol=1e-12)
    names = set(af.STATUS_NAMES[c] for c in st)
    assert {"converged", "max_steps", "nonfinite"} <= names  # the case covers all three
    assert ns.max() == cap and np.all(ns[st == af.STATUS_NAMES.index("max_steps")] == cap)


def test_pool_equals_simulate_for_a_flow_and_a_stack():
    """A sphere flow (RK4, tol divided by dt) on both backends; a layer stack (per-layer weights: the step index is
    each member's own) on the vmapped path."""
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    x0 = sphere(120, seed=1)
    ref = af.simulate(flow, x0, t1=30.0, dt=0.1, tol=1e-6, backend="xla")
    for backend in ("xla", "lanes"):
        fin, st, ns = run_all(flow, x0, pool=16, block=40, cap=300, tol=1e-6, dt=0.1, backend=backend)
        assert np.array_equal(st, np.asarray(ref.status)) and np.array_equal(ns, np.asarray(ref.steps))
        np.testing.assert_allclose(fin, np.asarray(ref.final), atol=1e-12)
    rng = np.random.default_rng(0)
    stack = af.LayerStack.from_layers([mapped(np.diag(rng.uniform(-1, 1, 3)), alpha=0.3) for _ in range(6)])
    ref = af.simulate(stack, x0, tol=1e-9, backend="xla")
    fin, st, ns = run_all(stack, x0, pool=16, block=40, cap=6, tol=1e-9, backend="xla")
    assert np.array_equal(st, np.asarray(ref.status)) and np.array_equal(ns, np.asarray(ref.steps))
    np.testing.assert_allclose(fin, np.asarray(ref.final), atol=1e-12)


def test_numpy_loop_reference():
    """Ten members against a plain NumPy loop of the map x <- normalize(x + alpha softmax(beta x M x^T) x V^T)."""
    dyn, cap, tol = mapped(), 400, 1e-7
    x0 = sphere(10, seed=3)
    fin, st, ns = run_all(dyn, x0, pool=4, block=3, cap=cap, tol=tol, backend="lanes")
    for b in range(10):
        X, k, status = x0[b].copy(), 0, "max_steps"
        while k < cap:
            S_ = X @ V3 @ X.T
            P = np.exp(S_ - S_.max(axis=1, keepdims=True))
            P /= P.sum(axis=1, keepdims=True)
            Y = X + 0.1 * P @ X @ V3.T
            Y /= np.linalg.norm(Y, axis=1, keepdims=True)
            k += 1
            change = np.abs(Y - X).max()
            X = Y
            if change < tol:
                status = "converged"
                break
        assert af.STATUS_NAMES[st[b]] == status and ns[b] == k
        np.testing.assert_allclose(fin[b], X, atol=1e-10)


def test_results_do_not_depend_on_pool_group_or_blocks():
    dyn = mapped()
    x0 = sphere(200, seed=4)
    a = run_all(dyn, x0, pool=8, block=200, cap=500, tol=1e-7, group=1, backend="lanes")
    b = run_all(dyn, x0, pool=64, block=30, cap=500, tol=1e-7, group=13, backend="lanes")
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    np.testing.assert_allclose(a[0], b[0], atol=1e-12)


def test_labels_in_the_same_call_and_degenerate_status():
    """`then` (a classifier) runs on the retired members; a float32 overflow that zeroes rows is 'degenerate'."""
    dyn = mapped(alpha=1e20, dtype=np.float32)
    x0 = sphere(20, dtype=np.float32)
    p = S.empty_pool(8, 5, 3, np.float32)
    p, r = S.advance_pool(dyn, p, x0, np.arange(20, dtype=np.int32), 20, cap=50, tol=1e-6, drain=True,
                          then=cl.classifier(dyn))
    idx, fin, st, ns, labels = r.valid()
    assert sorted(idx) == list(range(20))
    assert all(af.STATUS_NAMES[c] == "degenerate" for c in st)
    assert np.all(cl.label_rows(labels)[:, 0] == cl.DEGENERATE)


def test_bad_input_is_refused():
    dyn = mapped()
    p = S.empty_pool(4, 5, 3, np.float64)
    x0 = sphere(6)
    with pytest.raises(ValueError, match="count"):
        S.advance_pool(dyn, p, x0, np.arange(6), 7, cap=10, tol=1e-6)
    with pytest.raises(ValueError, match="holds states"):
        S.advance_pool(dyn, S.empty_pool(4, 4, 3, np.float64), x0, np.arange(6), 6, cap=10, tol=1e-6)
    with pytest.raises(ValueError, match="fused"):
        S.advance_pool(dyn, p, x0, np.arange(6), 6, cap=10, tol=1e-6, backend="fused")
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    with pytest.raises(ValueError, match="fixed-step"):
        S.advance_pool(flow, p, x0, np.arange(6), 6, cap=10, tol=1e-6, dt=0.1, solver=af.Adaptive())
    with pytest.raises(ValueError, match="at least one slot"):
        S.empty_pool(0, 5, 3, np.float64)


@given(pool=st.integers(1, 24), group=st.integers(1, 12), block=st.integers(1, 30), N=st.integers(1, 40),
       cap=st.integers(1, 60))
def test_property_every_member_retired_once_with_simulates_outcome(pool, group, block, N, cap):
    """Any pool size, group, queue block, study size and cap (pools larger than the study, groups longer than the
    cap, ragged last blocks): each sample is retired exactly once, with simulate's status, steps and state."""
    dyn = mapped(alpha=0.3)
    x0 = sphere(N, n=3, seed=N)
    ref = af.simulate(dyn, x0, steps=cap, tol=1e-6, backend="xla")
    fin, st_, ns = run_all(dyn, x0, pool=pool, block=block, cap=cap, tol=1e-6, group=group, backend="xla")
    assert np.array_equal(st_, np.asarray(ref.status)) and np.array_equal(ns, np.asarray(ref.steps))
    np.testing.assert_allclose(fin, np.asarray(ref.final), atol=1e-12)
