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


def test_simulate_uses_lanes_for_small_models_and_large_calls_only(monkeypatch):
    monkeypatch.delenv("ATTNFLOW_LANES", raising=False)
    from attnflow.evolve.kernels.lanes import MAX_COST, lanes_cost

    cpu = jax.default_backend() == "cpu"
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (4000, 5, 3))
    dyn = _dyn(0, 1, 3, 3, dtype=np.float32)
    big, solver, _ = _make_plan(dyn, x0, 1000, None, None, None, None, None, 1)
    small, _, _ = _make_plan(dyn, x0, 10, None, None, None, None, None, 1)
    assert lanes_applies(dyn, x0, big, solver) == cpu
    assert not lanes_applies(dyn, x0, small, solver)  # 4 000 x 10 steps: the compile would not pay
    causal = af.LayerMap(af.SelfAttention(dyn.attn.heads, af.Attention("softmax", mask="causal"), 1.0), 0.1)
    relu = af.LayerMap(af.SelfAttention(dyn.attn.heads, af.Attention("relu"), 1.0), 0.1)
    ln = af.LayerMap(dyn.attn, 0.1, LayerNorm())
    for other in (causal, relu, ln):
        assert not lanes_applies(other, x0, big, solver)
    wide = af.sample.sphere(jax.random.PRNGKey(0), (4000, 32, 8))  # H n^2 d = 8192 > MAX_COST: compile too long
    wdyn = _dyn(0, 1, 8, 4, dtype=np.float32)
    assert lanes_cost(wdyn, wide) > MAX_COST and not lanes_applies(wdyn, wide, big, solver)
    flow = af.SphereFlow(dyn.attn)
    fplan, fsolver, _ = _make_plan(flow, x0, None, 100.0, 0.1, None, None, None, 1)
    assert lanes_applies(flow, x0, fplan, fsolver) == cpu  # RK4, 1000 steps
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


def test_simulate_public_api_matches_numpy_reference_through_lanes(monkeypatch):
    """The public simulate, forced onto the lanes path, against a plain NumPy loop that shares no code with it."""
    import references as ref

    monkeypatch.setenv("ATTNFLOW_LANES", "1")  # a shape no other test uses, so this traces afresh

    dyn = _dyn(7, 2, 3, 3)
    x0 = af.sample.sphere(jax.random.PRNGKey(2), (5, 6, 3), dtype=jnp.float64)
    sol = af.simulate(dyn, x0, steps=61)
    hd = dyn.attn.heads
    for b in range(5):
        X = ref.layer_map(np.asarray(x0[b]), 61, np.asarray(hd.Q), np.asarray(hd.K), np.asarray(hd.V), np.asarray(hd.O), 1.5, 0.2)[-1]
        np.testing.assert_allclose(np.asarray(sol.final[b]), X, rtol=0, atol=1e-10)


SHARD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np, attnflow as af
assert jax.local_device_count() == 4
m = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.2]))), alpha=0.1)
x0 = af.sample.sphere(jax.random.PRNGKey(5), (10, 5, 3))
outs = [af.simulate(m, x0, steps=50, tol=1e-9, saves=5, **kw) for kw in ({}, {"chunk_size": 6}, {"shard": False})]
np.savez(sys.argv[1], **{f"t{i}": np.asarray(o.trajectory) for i, o in enumerate(outs)}, **{f"s{i}": np.asarray(o.status) for i, o in enumerate(outs)})
"""


@pytest.mark.parametrize("path", ["ATTNFLOW_LANES", "ATTNFLOW_FUSED"])
def test_lanes_sharded_over_four_cpu_devices_equals_one(tmp_path, path):
    """Both fast paths (the lanes path, the fused kernel interpreted) under shard_map on 4 forced CPU devices."""
    import os
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(SHARD)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", path: "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "o.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    z = np.load(tmp_path / "o.npz")
    for i in (1, 2):
        np.testing.assert_allclose(z[f"t{i}"], z["t0"], rtol=0, atol=1e-13)
        np.testing.assert_array_equal(z[f"s{i}"], z["s0"])
