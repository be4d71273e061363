"""The lanes and fused backends (the model's own step unrolled into batch-wide lanes) against the vmapped XLA path
member by member, against a plain NumPy loop, and the pure backend choice.

On the CPU the fused Pallas kernel runs through the interpreter; its GPU lowering (Pallas -> Triton IR for "cuda")
is checked without a GPU. Tolerances: float64 1e-12 (the same arithmetic up to the order of sums); float32 1e-4
after 1000 steps of a contracting map (rounding)."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.evolve import backends
from attnflow.evolve.backends.fused import _local as fused_local
from attnflow.evolve.backends.fused import fused_run
from attnflow.evolve.backends.lanes import lanes_run
from attnflow.evolve.simulate import _fixed_one, _make_plan as _make_plan_records
from attnflow.evolve.solvers import RK4, Adaptive, Euler
from attnflow.evolve.outcome import CONVERGED, DEGENERATE, NONFINITE, NOT_CONVERGED as MAX_STEPS
from attnflow.model.norms import LayerNorm, NoNorm


def _make_plan(dyn, x0, steps, t1, dt, solver, saves, tol, unroll=1):
    """The simulate plan of these arguments (the records built from the shorthands)."""
    return _make_plan_records(dyn, af.Budget(steps=steps, t1=t1, dt=dt), af.Stop(tol), solver, saves)


def _heads(seed, H, d, dh, dtype=np.float64, scale=None):
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(d) if scale is None else scale
    return af.Heads(*(s * rng.standard_normal(sh).astype(dtype) for sh in [(H, dh, d)] * 3 + [(H, d, dh)]))


def _map(seed, H, d, dh, attention=None, norm=None, beta=1.5, alpha=0.2, dtype=np.float64, scale=None):
    att = af.SelfAttention(_heads(seed, H, d, dh, dtype, scale), attention or af.Attention("softmax"), np.asarray(beta, dtype))
    return af.LayerMap(att, np.asarray(alpha, dtype), norm or af.L2Norm())


def _x0(key, B, n, d, dtype=jnp.float64):
    return af.sample.sphere(jax.random.PRNGKey(key), (B, n, d), dtype=dtype)


def _compare(dyn, x0, run, *, steps=None, t1=None, dt=None, solver=None, tol=None, saves=None, atol=1e-12, bad=()):
    """Run ``run`` (a backend runner) and the vmapped per-configuration loop; assert equal status, steps, states."""
    plan, solver, dt = _make_plan(dyn, x0, steps, t1, dt, solver, saves, tol, 1)
    dt = jnp.asarray(dt, x0.dtype)
    ref = jax.vmap(lambda x: _fixed_one(dyn, solver, x, dt, plan))(x0)
    out = run(dyn, solver, x0, dt, plan)
    np.testing.assert_array_equal(np.asarray(out[2]), np.asarray(ref[2]))
    np.testing.assert_array_equal(np.asarray(out[3]), np.asarray(ref[3]))
    ok = np.ones(x0.shape[0], bool)
    ok[list(bad)] = False
    np.testing.assert_allclose(np.asarray(out[0])[ok], np.asarray(ref[0])[ok], rtol=0, atol=atol)
    if saves:
        assert out[1].shape == ref[1].shape == (x0.shape[0], saves + 1) + x0.shape[1:]
        np.testing.assert_allclose(np.asarray(out[1])[ok], np.asarray(ref[1])[ok], rtol=0, atol=atol)
    else:
        assert out[1] is None
    return np.asarray(out[2])


lanes4 = functools.partial(lanes_run, tile=4)  # 11 members in tiles of 4: a ragged last tile
fused4 = functools.partial(fused_run, block=4, interpret=True)


@pytest.mark.parametrize("run", [lanes4, fused4], ids=["lanes", "fused"])
@pytest.mark.parametrize("tol,saves", [(None, None), (1e-8, 4)])
def test_map_equals_vmapped_path_float64(run, tol, saves):
    dyn = _map(0, 2, 3, 3, scale=0.5)
    x0 = _x0(1, 11, 5, 3).at[3].set(jnp.nan)  # a non-finite member is data, not an error
    st = _compare(dyn, x0, run, steps=200, tol=tol, saves=saves, bad=[3])
    assert st[3] == NONFINITE
    if tol is not None:
        assert np.sum(st == CONVERGED) >= 5, st  # the early stop is exercised


@pytest.mark.parametrize("run", [lanes4, fused4], ids=["lanes", "fused"])
@pytest.mark.parametrize("solver", [RK4(), Euler()], ids=["rk4", "euler"])
def test_sphere_flow_equals_vmapped_path_float64(run, solver):
    flow = af.SphereFlow(_map(3, 1, 3, 3).attn)
    x0 = _x0(4, 9, 4, 3).at[2].set(jnp.inf)
    _compare(flow, x0, run, t1=6.0, dt=0.1, solver=solver, tol=1e-3, saves=3, bad=[2])


class Cosine(eqx.Module):
    """An attention kind that exists only in this test: a_ij proportional to 1 + cos(s_ij)."""

    def __call__(self, s):
        w = 1.0 + jnp.cos(s)
        return w / jnp.sum(w, axis=-1, keepdims=True)


class CubeNorm(eqx.Module):
    """A normalisation that exists only in this test: y / (1 + |y|^3)^(1/3)."""

    def __call__(self, y):
        r = jnp.sum(y * y, axis=-1, keepdims=True) ** 1.5
        return y / (1.0 + r) ** (1.0 / 3.0)

    def residual(self, X):
        return jnp.zeros((), X.dtype)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _map(5, 1, 3, 3, attention=Cosine()),
        lambda: _map(5, 1, 3, 3, norm=CubeNorm()),
        lambda: _map(6, 2, 3, 2, attention=af.Attention("softmax", mask="causal")),
        lambda: _map(6, 1, 3, 3, attention=af.Attention("relu", relu_normalize=True)),
        lambda: _map(6, 1, 3, 3, attention=af.Attention("sinkhorn", sinkhorn_iters=2), norm=LayerNorm()),
        lambda: af.FlatFlow(_map(7, 1, 3, 3, beta=0.5).attn),
    ],
    ids=["new-kind", "new-norm", "causal", "relu-normalized", "sinkhorn-layernorm", "flat-flow"],
)
def test_any_model_runs_on_the_lanes_path_with_no_edit_in_evolve(make):
    """The lanes path is generated from the model's own step: an attention kind and a norm defined here, in the
    test file, and models the old hand-written path never covered, run on it and equal the vmapped path."""
    dyn = make()
    x0 = _x0(8, 6, 4, 3)
    kw = dict(t1=1.0, dt=0.1) if isinstance(dyn, af.FlatFlow) else dict(steps=30)
    _compare(dyn, x0, lanes4, **kw)
    sol = af.simulate(dyn, x0, backend="lanes", **kw)
    assert sol.backend == "lanes"


def test_public_simulate_on_lanes_matches_numpy_loop():
    """The public simulate on the lanes backend against a plain NumPy loop that shares no code with it."""
    import references as ref

    dyn = _map(7, 2, 3, 3)
    x0 = _x0(2, 5, 6, 3)
    sol = af.simulate(dyn, x0, steps=61, backend="lanes")
    assert sol.backend == "lanes"
    hd = dyn.attn.heads
    for b in range(5):
        X = ref.layer_map(np.asarray(x0[b]), 61, np.asarray(hd.Q), np.asarray(hd.K), np.asarray(hd.V), np.asarray(hd.O), 1.5, 0.2)[-1]
        np.testing.assert_allclose(np.asarray(sol.final[b]), X, rtol=0, atol=1e-10)


def test_lanes_float32_agrees_over_1000_steps():
    dyn = _map(1, 2, 3, 3, beta=2.0, alpha=0.5, dtype=np.float32)
    x0 = _x0(0, 64, 5, 3, jnp.float32)
    ref = af.simulate(dyn, x0, steps=1000, backend="xla")
    got = af.simulate(dyn, x0, steps=1000, backend="lanes")
    assert got.final.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got.final), np.asarray(ref.final), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got.outcome), np.asarray(ref.outcome))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got.final), axis=-1), 1.0, atol=1e-5)
    assert float(np.max(np.abs(np.asarray(ref.final) - np.asarray(x0)))) > 0.1  # it moved


def test_auto_is_a_pure_function_of_model_shapes_solver_and_platform():
    dyn = _map(0, 1, 3, 3, dtype=np.float32)
    big, solver, _ = _make_plan(dyn, jnp.zeros((4000, 5, 3)), 1000, None, None, None, None, None, 1)
    small, _, _ = _make_plan(dyn, jnp.zeros((4000, 5, 3)), 10, None, None, None, None, None, 1)
    choose = backends.choose_backend
    shape, f32 = (4000, 5, 3), jnp.float32
    assert choose(dyn, solver, big, shape, f32, platform="cpu") == "lanes"
    assert [choose(dyn, solver, big, shape, f32, platform="cpu") for _ in range(3)] == ["lanes"] * 3  # no history
    assert choose(dyn, solver, small, shape, f32, platform="cpu") == "xla"  # 4 000 x 10 steps: compile would not pay
    assert choose(dyn, solver, big, shape, f32, platform="gpu") == "xla"  # the fused kernel is not timed on a GPU yet
    assert choose(dyn, solver, big, shape, f32, platform="cpu", sweep=True) == "xla"
    wide = _map(0, 4, 8, 8, dtype=np.float32)  # unrolled size far above MAX_COST: the compile would take minutes
    wbig, wsolver, _ = _make_plan(wide, jnp.zeros((4000, 32, 8)), 1000, None, None, None, None, None, 1)
    assert backends.cost(wide, wsolver, (4000, 32, 8), f32) > backends.MAX_COST
    assert choose(wide, wsolver, wbig, (4000, 32, 8), f32, platform="cpu") == "xla"
    flow = af.SphereFlow(dyn.attn)
    aplan, asolver, _ = _make_plan(flow, jnp.zeros(shape), None, 1.0, None, Adaptive(), None, None, 1)
    assert choose(flow, asolver, aplan, shape, f32, platform="cpu") == "xla"


class Sorted(eqx.Module):
    """Attention through a sort: the lanes interpretation has no rule for it."""

    def __call__(self, s):
        return jax.nn.softmax(jnp.sort(s, axis=-1), axis=-1)


def test_unsupported_steps_fall_back_on_auto_and_are_refused_when_asked_for():
    dyn = _map(0, 1, 3, 3, attention=Sorted())
    x0 = _x0(0, 4, 4, 3)
    plan, solver, _ = _make_plan(dyn, x0, 1000, None, None, None, None, None, 1)
    assert backends.choose_backend(dyn, solver, plan, (10**5, 4, 3), jnp.float64, platform="cpu") == "xla"
    with pytest.raises(ValueError, match="sort"):
        af.simulate(dyn, x0, steps=3, backend="lanes")
    with pytest.raises(ValueError, match="unknown backend"):
        af.simulate(dyn, x0, steps=3, backend="gpu-please")
    with pytest.raises(ValueError, match="sweeps"):
        af.sweep(_map(0, 1, 3, 3), x0, beta=[1.0, 2.0], steps=3, backend="lanes")
    assert af.simulate(dyn, x0, steps=3).backend == "xla"


@pytest.mark.parametrize("backend", ["xla", "lanes"])
def test_overflow_to_zero_rows_is_degenerate_not_converged(backend):
    """alpha = 1e20 in float32: |x + alpha u|^2 overflows, the rows become 0 and stop moving. That is a failure
    (status degenerate), never 'converged'. Reference: the final states really are zero rows (NumPy)."""
    dyn = _map(2, 1, 3, 3, alpha=1e20, dtype=np.float32)
    x0 = _x0(3, 8, 4, 3, jnp.float32)
    sol = af.simulate(dyn, x0, steps=20, tol=1e-6, backend=backend)
    rows = np.linalg.norm(np.asarray(sol.final), axis=-1)
    assert np.all(rows.min(axis=1) < 1e-6)  # every member has a zero row
    assert sol.outcome_counts()["degenerate"] == 8 and sol.outcome_counts()["converged"] == 0
    assert af.Outcome  # the names and messages of the codes
    assert af.evolve.outcome_message(DEGENERATE).startswith("its state stayed finite")


def test_healthy_members_are_not_degenerate_and_layernorm_residual_is_checked():
    dyn = _map(2, 1, 3, 3)
    sol = af.simulate(dyn, _x0(3, 5, 4, 3), steps=20)
    assert set(np.asarray(sol.outcome).tolist()) == {MAX_STEPS}
    ln = LayerNorm()
    X = ln(jnp.asarray(np.random.default_rng(0).standard_normal((4, 5))))
    assert float(ln.residual(X)) < 1e-12 and float(ln.residual(jnp.zeros((4, 5)))) == pytest.approx(np.sqrt(5))
    assert float(NoNorm().residual(jnp.zeros((4, 5)))) == 0.0


@pytest.mark.parametrize(
    "kind,H,dtype,tol,saves", [("map", 1, np.float32, None, None), ("map", 5, np.float32, 1e-6, 5), ("rk4", 2, np.float64, 1e-6, 5)]
)
def test_fused_kernel_lowers_to_triton_for_cuda(kind, H, dtype, tol, saves):
    """No GPU here, but the Pallas -> Triton lowering runs on the CPU: lowering for "cuda" must give a Triton custom
    call (JAX's default Pallas GPU backend, Mosaic GPU, rejects this kernel; it asks for Triton)."""
    att = af.SelfAttention(_heads(0, H, 3, 3, dtype), af.Attention("softmax"), np.asarray(1.5, dtype))
    dyn, solver, kw = (af.LayerMap(att, np.asarray(0.2, dtype)), None, dict(steps=200)) if kind == "map" else (af.SphereFlow(att), RK4(), dict(t1=20.0, dt=0.1))
    x0 = jnp.ones((1000, 10, 3), dtype)
    plan, solver, dt = _make_plan(dyn, x0, kw.get("steps"), kw.get("t1"), kw.get("dt"), solver, saves, tol, 1)
    dt = jnp.asarray(dt, dtype)
    prog = backends.lane_program(dyn, solver, dt, 10, 3, dtype)
    flats = prog.prepare((dyn, solver, dt))
    f = functools.partial(fused_local, prog=prog, plan=plan, block=128, interpret=False, unroll=1, continuous=kind != "map")
    text = jax.jit(f).trace(x0, dt, *flats).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and 'name = "_kernel"' in text


SHARD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np, attnflow as af
assert jax.local_device_count() == 4
m = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.2]))), alpha=0.1)
x0 = af.sample.sphere(jax.random.PRNGKey(5), (10, 4, 3))
runs = [dict(backend="xla")] + [dict(backend=b, **kw) for b in ("lanes", "fused") for kw in ({}, {"chunk_size": 6}, {"devices": 1})]
outs = [af.simulate(m, x0, steps=30, tol=1e-9, saves=5, execution=af.Execution(**kw)) for kw in ({("chunk" if k == "chunk_size" else k): v for k, v in r.items()} for r in runs)]
assert [o.backend for o in outs] == [r["backend"] for r in runs]
np.savez(sys.argv[1], **{f"t{i}": np.asarray(o.trajectory) for i, o in enumerate(outs)}, **{f"s{i}": np.asarray(o.outcome) for i, o in enumerate(outs)})
"""


@pytest.mark.slow
def test_backends_sharded_over_four_cpu_devices_equal_one(tmp_path):
    """Both unrolled backends (lanes; fused, interpreted) under shard_map on 4 forced CPU devices, chunked and not."""
    import os
    import subprocess
    import sys

    script = tmp_path / "s.py"
    script.write_text(SHARD)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "o.npz")], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    z = np.load(tmp_path / "o.npz")
    for i in range(1, 7):
        np.testing.assert_allclose(z[f"t{i}"], z["t0"], rtol=0, atol=1e-13)
        np.testing.assert_array_equal(z[f"s{i}"], z["s0"])


def test_cache_slots_is_a_pure_function_of_size_dtype_and_cache():
    """The tile of the lanes backend: the largest power of two whose working set (cost x itemsize per member) fits
    a cache, within [128, 4096] (by hand: 2 MiB / (1452 x 4) = 361 -> 256); by default the fixed TILE_L2 (2 MiB),
    not the machine's L2, which is read only as a fact of the machine for the benchmarks' records."""
    from attnflow.evolve.backends import SLOTS_RANGE, TILE_L2, cache_slots, l2_cache_bytes

    assert cache_slots(1452, 4, l2=2 << 20) == 256
    assert cache_slots(1452, 8, l2=2 << 20) == 128 and cache_slots(100, 4, l2=2 << 20) == 4096
    assert cache_slots(10**6, 4, l2=2 << 20) == SLOTS_RANGE[0]
    assert TILE_L2 == 2 << 20 and cache_slots(1452, 4) == 256 and l2_cache_bytes() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: _map(11, 2, 4, 3, attention=af.Attention("softmax", mask="causal")),
        lambda: _map(12, 1, 3, 3, attention=Cosine(), norm=CubeNorm()),
        lambda: _map(13, 3, 3, 2, attention=af.Attention("sinkhorn", sinkhorn_iters=2), norm=LayerNorm()),
    ],
    ids=["causal-two-heads", "new-kind-new-norm", "sinkhorn-three-heads"],
)
def test_batch_last_step_equals_the_unrolled_step_and_one_step_under_vmap(make):
    """One step in the lanes backend's batch-last form (:meth:`LaneProgram.step_array`), in the fused kernel's
    unrolled form (:meth:`LaneProgram.step`) and the per-configuration step under vmap, on the same states; float64,
    1e-12 (the same arithmetic; sums may be ordered differently). Also with one step index per member."""
    from attnflow.evolve.backends import one_step

    dyn = make()
    n, d, T = 6, dyn.attn.heads.dim, 9
    X = np.asarray(_x0(21, T, n, d))
    rows = jnp.asarray(np.transpose(X, (2, 1, 0)).reshape(d * n, T))
    prog = backends.lane_program(dyn, af.Iterate(), 1.0, n, d, jnp.float64)
    flats = prog.prepare((dyn, af.Iterate(), jnp.asarray(1.0, jnp.float64)))
    ref = jax.vmap(lambda x: one_step((dyn, af.Iterate(), jnp.asarray(1.0)), jnp.int32(3), x))(jnp.asarray(X))
    ref_rows = np.transpose(np.asarray(ref), (2, 1, 0)).reshape(d * n, T)
    got = jax.jit(lambda r, f: prog.step_array(f, jnp.int32(3), r))(rows, flats)
    assert got.shape == (d * n, T)
    np.testing.assert_allclose(np.asarray(got), ref_rows, rtol=0, atol=1e-12)
    unrolled = jnp.stack(prog.step(prog.scalars(flats), jnp.int32(3), tuple(rows), T))
    np.testing.assert_allclose(np.asarray(got), np.asarray(unrolled), rtol=0, atol=1e-12)
    per_member = jax.jit(lambda r, f: prog.step_array(f, jnp.full((T,), 3, jnp.int32), r))(rows, flats)
    np.testing.assert_allclose(np.asarray(per_member), np.asarray(got), rtol=0, atol=1e-12)


def test_constant_folding_with_numpy_equals_the_primitives():
    """The lanes interpreter folds constant ``iota``, ``broadcast_in_dim`` and exact conversions with NumPy: each
    equals the primitive's own result (value and dtype); other conversions (float to int) are left to the
    primitive."""
    import jax.numpy as jnp
    from jax import lax

    from attnflow.evolve.backends.unroll import _fold

    cases = [
        (lax.iota_p, [], dict(dtype=np.int32, shape=(3, 4, 2), dimension=1, sharding=None)),
        (lax.iota_p, [], dict(dtype=np.float32, shape=(5,), dimension=0, sharding=None)),
        (lax.broadcast_in_dim_p, [np.arange(3, dtype=np.int32)], dict(shape=(2, 3, 4), broadcast_dimensions=(1,), sharding=None)),
        (lax.broadcast_in_dim_p, [np.array(1.5, np.float32)], dict(shape=(8, 8), broadcast_dimensions=(), sharding=None)),
        (lax.broadcast_in_dim_p, [np.arange(6.0).reshape(2, 1, 3)], dict(shape=(2, 5, 3), broadcast_dimensions=(0, 1, 2), sharding=None)),
        (lax.convert_element_type_p, [np.array([True, False])], dict(new_dtype=np.float32, weak_type=False, sharding=None)),
        (lax.convert_element_type_p, [np.arange(-3, 4, dtype=np.int32)], dict(new_dtype=np.float64, weak_type=False, sharding=None)),
        (lax.convert_element_type_p, [np.array([1 / 3, 1e30, -2.5])], dict(new_dtype=np.float32, weak_type=False, sharding=None)),
    ]
    for prim, vals, params in cases:
        got = _fold(prim.name, params, vals)
        want = np.asarray(prim.bind(*(jnp.asarray(v) for v in vals), **params))
        assert got is not None and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert _fold("convert_element_type", dict(new_dtype=np.int32), [np.array([2.7, -2.7])]) is None
    assert _fold("exp", {}, [np.zeros(2)]) is None
