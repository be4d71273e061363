"""The tiled lanes path of simulate (attnflow.evolve.kernels.lanes_run, the CPU default for small-d softmax/l2
layer maps) against the vmapped XLA path, member by member: same status codes, step counts and states.

Tolerances: float64 1e-12 (same arithmetic up to ordering); float32 1e-4 after 1000 steps (rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.evolve.kernels import lanes_applies, lanes_run
from attnflow.evolve.simulate import CONVERGED, MAX_STEPS, NONFINITE, _fixed_one, _make_plan
from attnflow.evolve.solvers import RK4, Adaptive, Euler
from attnflow.model.norms import LayerNorm


def _dyn(seed, H, d, dh, beta=1.5, alpha=0.2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(d)
    hd = af.Heads(*(s * rng.standard_normal(sh).astype(dtype) for sh in [(H, dh, d)] * 3 + [(H, d, dh)]))
    return af.LayerMap(af.SelfAttention(hd, af.Attention("softmax"), np.asarray(beta, dtype)), np.asarray(alpha, dtype))


def _both(dyn, x0, steps, tol, saves, tile):
    plan, solver, dt = _make_plan(dyn, x0, steps, None, None, None, saves, tol, 1)
    ref = jax.vmap(lambda x: _fixed_one(dyn, solver, x, dt, plan))(x0)
    out = lanes_run(dyn, x0, plan, tile=tile)
    return out, ref


@pytest.mark.parametrize("H,d,dh,n", [(1, 3, 3, 10), (3, 3, 2, 6), (2, 5, 4, 4)])
@pytest.mark.parametrize("tol,saves", [(None, None), (1e-8, None), (1e-6, 5), (None, 4)])
def test_lanes_equals_vmapped_path_float64(H, d, dh, n, tol, saves):
    dyn = _dyn(H * 10 + d, H, d, dh)
    x0 = af.sample.sphere(jax.random.PRNGKey(H), (11, n, d), dtype=jnp.float64)
    x0 = x0.at[3].set(jnp.nan)  # a non-finite member is data, not an error
    (f, tr, st, ns), (rf, rtr, rst, rns) = _both(dyn, x0, 200, tol, saves, tile=4)  # 11 members: a ragged last tile
    np.testing.assert_array_equal(st, rst)
    np.testing.assert_array_equal(ns, rns)
    assert int(st[3]) == NONFINITE
    ok = np.arange(11) != 3
    np.testing.assert_allclose(np.asarray(f)[ok], np.asarray(rf)[ok], rtol=0, atol=1e-12)
    if saves:
        np.testing.assert_allclose(np.asarray(tr)[ok], np.asarray(rtr)[ok], rtol=0, atol=1e-12)
    else:
        assert tr is None and rtr is None
    assert set(np.asarray(st)[ok].tolist()) <= ({CONVERGED, MAX_STEPS} if tol is not None else {MAX_STEPS})


def test_lanes_float32_agrees_over_1000_steps():
    dyn = _dyn(1, 5, 3, 3, dtype=np.float32)
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (300, 10, 3), dtype=jnp.float32)
    (f, _, st, ns), (rf, _, rst, rns) = _both(dyn, x0, 1000, None, None, tile=128)
    assert f.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(f), np.asarray(rf), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(st, rst)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(f), axis=-1), 1.0, atol=1e-5)


def test_simulate_uses_lanes_for_small_maps_only():
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (4, 5, 3))
    dyn = _dyn(0, 1, 3, 3, dtype=np.float32)
    plan, solver, _ = _make_plan(dyn, x0, 10, None, None, None, None, None, 1)
    assert lanes_applies(dyn, x0, plan, solver) == (jax.default_backend() == "cpu")
    causal = af.LayerMap(af.SelfAttention(dyn.attn.heads, af.Attention("softmax", mask="causal"), 1.0), 0.1)
    relu = af.LayerMap(af.SelfAttention(dyn.attn.heads, af.Attention("relu"), 1.0), 0.1)
    ln = af.LayerMap(dyn.attn, 0.1, LayerNorm())
    for other in (causal, relu, ln):
        assert not lanes_applies(other, x0, plan, solver)
    big = af.sample.sphere(jax.random.PRNGKey(0), (4, 5, 16))
    assert not lanes_applies(_dyn(0, 1, 16, 4, dtype=np.float32), big, plan, solver)
    flow = af.SphereFlow(dyn.attn)
    fplan, fsolver, _ = _make_plan(flow, x0, None, 1.0, 0.1, None, None, None, 1)
    assert lanes_applies(flow, x0, fplan, fsolver) == (jax.default_backend() == "cpu")  # RK4
    aplan, asolver, _ = _make_plan(flow, x0, None, 1.0, None, Adaptive(), None, None, 1)
    assert not lanes_applies(flow, x0, aplan, asolver)
    flat = af.FlatFlow(dyn.attn)
    assert not lanes_applies(flat, x0, fplan, fsolver)


@pytest.mark.parametrize("solver", [RK4(), Euler()], ids=["rk4", "euler"])
@pytest.mark.parametrize("tol,saves", [(None, None), (1e-6, None), (1e-5, 5)])
def test_lanes_sphere_flow_equals_vmapped_path_float64(solver, tol, saves):
    dyn = _dyn(3, 2, 3, 3)
    flow = af.SphereFlow(dyn.attn)
    x0 = af.sample.sphere(jax.random.PRNGKey(4), (9, 7, 3), dtype=jnp.float64)
    x0 = x0.at[2].set(jnp.inf)
    plan, solv, dt = _make_plan(flow, x0, None, 20.0, 0.1, solver, saves, tol, 1)
    dt = jnp.asarray(dt, x0.dtype)
    ref = jax.vmap(lambda x: _fixed_one(flow, solv, x, dt, plan))(x0)
    out = lanes_run(flow, x0, plan, dt=dt, solver=solv, tile=4)
    np.testing.assert_array_equal(out[2], ref[2])
    np.testing.assert_array_equal(out[3], ref[3])
    ok = np.arange(9) != 2
    np.testing.assert_allclose(np.asarray(out[0])[ok], np.asarray(ref[0])[ok], rtol=0, atol=1e-12)
    if saves:
        np.testing.assert_allclose(np.asarray(out[1])[ok], np.asarray(ref[1])[ok], rtol=0, atol=1e-12)


def test_simulate_public_api_matches_numpy_reference_through_lanes():
    """The public simulate (lanes on CPU) against a plain NumPy loop that shares no code with it."""
    import references as ref

    dyn = _dyn(7, 2, 3, 3)
    x0 = af.sample.sphere(jax.random.PRNGKey(2), (5, 6, 3), dtype=jnp.float64)
    sol = af.simulate(dyn, x0, steps=60)
    hd = dyn.attn.heads
    for b in range(5):
        X = ref.layer_map(np.asarray(x0[b]), 60, np.asarray(hd.Q), np.asarray(hd.K), np.asarray(hd.V), np.asarray(hd.O), 1.5, 0.2)[-1]
        np.testing.assert_allclose(np.asarray(sol.final[b]), X, rtol=0, atol=1e-10)
