"""The fused small-d kernel (attnflow.evolve.kernels) against the XLA path of simulate and a plain NumPy loop.
On the CPU the Pallas kernel runs through the interpreter (interpret=True), and its GPU lowering (Pallas ->
Triton IR for "cuda") is checked without a GPU.

Tolerances: float64 1e-12 against the vmapped path and a NumPy loop (same arithmetic up to ordering);
float32 1e-5 after 1000 steps of a contracting map (rounding)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.evolve.kernels import fused_applies, fused_layer_map, fused_run, lane_layer_map
from attnflow.evolve.kernels.lanes import _fused_local, _pack
from attnflow.evolve.simulate import CONVERGED, NONFINITE, _fixed_one, _make_plan
from attnflow.evolve.solvers import RK4, Adaptive, Euler
from attnflow.model.attention import Attention
from attnflow.model.dynamics import FlatFlow, LayerMap, SphereFlow
from attnflow.model.heads import Heads, SelfAttention
from attnflow.model.norms import LayerNorm, NoNorm


def _dyn(key, H, d, dh, beta, alpha, dtype):
    k = jax.random.split(key, 4)
    s = 1 / np.sqrt(d)
    Q, K, V = (s * jax.random.normal(k[i], (H, dh, d), dtype) for i in range(3))
    O = s * jax.random.normal(k[3], (H, d, dh), dtype)
    return LayerMap(SelfAttention(Heads(Q, K, V, O), beta=beta), alpha=alpha)


def _x0(key, B, n, d, dtype):
    x = jax.random.normal(key, (B, n, d), dtype)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_loop(dyn, x0, steps):
    hd = dyn.attn.heads
    Q, K, V, O = (np.asarray(a, np.float64) for a in (hd.Q, hd.K, hd.V, hd.O))
    beta, alpha = float(dyn.attn.beta), float(dyn.alpha)
    out = []
    for X in np.asarray(x0, np.float64):
        for _ in range(steps):
            U = np.zeros_like(X)
            for h in range(Q.shape[0]):
                s = beta * (X @ Q[h].T) @ (X @ K[h].T).T
                a = np.exp(s - s.max(1, keepdims=True))
                a /= a.sum(1, keepdims=True)
                U += a @ (X @ V[h].T) @ O[h].T
            Y = X + alpha * U
            X = Y / np.linalg.norm(Y, axis=1, keepdims=True)
        out.append(X)
    return np.stack(out)


@pytest.mark.parametrize("H,n,d,dh", [(1, 4, 3, 3), (2, 3, 3, 3)])
def test_float64_against_numpy_loop(H, n, d, dh):
    """float64: the fused kernel and the lanes XLA path equal a plain NumPy loop to 1e-12 (20 steps)."""
    key = jax.random.PRNGKey(H + n)
    dyn = _dyn(key, H, d, dh, 1.7, 0.6, jnp.float64)
    x0 = _x0(jax.random.fold_in(key, 1), 5, n, d, jnp.float64)
    ref = _numpy_loop(dyn, x0, 20)
    got = fused_layer_map(dyn, x0, 20, block=4, interpret=True)  # B=5 pads to 8: two grid programs
    assert got.dtype == jnp.float64 and got.shape == x0.shape
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(lane_layer_map(dyn, x0, 20)), ref, atol=1e-12)


@pytest.mark.parametrize("H,n", [(1, 4), (2, 3)])
def test_float32_1000_steps_against_xla_path(H, n):
    """float32, 1000 steps: the fused kernel agrees with simulate's XLA path to float32 rounding.

    The map contracts to clusters (beta = 2, alpha = 0.5), so rounding differences do not grow; the
    bound 1e-5 is ~100 ulps of a unit vector."""
    key = jax.random.PRNGKey(10 + H)
    dyn = _dyn(key, H, 3, 3, 2.0, 0.5, jnp.float32)
    x0 = _x0(jax.random.fold_in(key, 2), 6, n, 3, jnp.float32)
    os.environ["ATTNFLOW_FUSED"] = "0"
    try:
        ref = af.simulate(dyn, x0, steps=1000).final
    finally:
        os.environ.pop("ATTNFLOW_FUSED")
    got = fused_layer_map(dyn, x0, 1000, block=8, interpret=True)
    assert got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - ref)))
    assert err < 1e-5, err
    # and it moved: the final state is far from the start
    assert float(jnp.max(jnp.abs(ref - x0))) > 0.1


def test_dispatch_through_simulate(monkeypatch):
    """ATTNFLOW_FUSED=1 routes simulate through the kernel (interpreted here); results, status and steps agree."""
    key = jax.random.PRNGKey(5)
    dyn = _dyn(key, 1, 3, 3, 1.0, 0.3, jnp.float32)
    x0 = _x0(key, 4, 4, 3, jnp.float32)
    monkeypatch.setenv("ATTNFLOW_FUSED", "0")
    ref = af.simulate(dyn, x0, steps=13)
    monkeypatch.setenv("ATTNFLOW_FUSED", "1")
    got = af.simulate(dyn, x0, steps=14)  # a new step count: a new trace, taken by the fused branch
    one = fused_layer_map(dyn, x0, 14, interpret=True)
    np.testing.assert_allclose(np.asarray(got.final), np.asarray(one), rtol=0, atol=1e-6)  # equal on the CPU
    assert np.all(np.asarray(got.steps) == 14) and np.all(np.asarray(got.status) == 0)
    assert np.all(np.asarray(ref.steps) == 13)


def test_fused_applies_only_where_it_should(monkeypatch):
    key = jax.random.PRNGKey(0)
    dyn = _dyn(key, 1, 3, 3, 1.0, 0.3, jnp.float32)
    x0 = _x0(key, 2, 4, 3, jnp.float32)
    plan = _make_plan(dyn, x0, 10, None, None, None, None, None, 1)[0]
    monkeypatch.delenv("ATTNFLOW_FUSED", raising=False)
    assert fused_applies(dyn, x0, plan) == (jax.default_backend() == "gpu")  # never on the CPU by default
    monkeypatch.setenv("ATTNFLOW_FUSED", "1")
    assert fused_applies(dyn, x0, plan)
    saving = _make_plan(dyn, x0, 10, None, None, None, 5, None, 1)[0]
    tol = _make_plan(dyn, x0, 10, None, None, None, None, 1e-6, 1)[0]
    assert fused_applies(dyn, x0, saving) and fused_applies(dyn, x0, tol)  # full semantics in the kernel
    attn = dyn.attn
    for other in (
        LayerMap(attn, alpha=0.3, norm=NoNorm()),
        LayerMap(attn, alpha=0.3, norm=LayerNorm(jnp.ones(3), jnp.zeros(3))),
        LayerMap(SelfAttention(attn.heads, Attention(mask="causal")), alpha=0.3),
        LayerMap(SelfAttention(attn.heads, Attention(kind="uniform")), alpha=0.3),
    ):
        assert not fused_applies(other, x0, plan)
    flow = SphereFlow(attn)
    fplan, fsolver, _ = _make_plan(flow, x0, None, 1.0, 0.1, None, None, None, 1)
    assert fused_applies(flow, x0, fplan, fsolver)  # RK4
    aplan, asolver, _ = _make_plan(flow, x0, None, 1.0, None, Adaptive(), None, None, 1)
    assert not fused_applies(flow, x0, aplan, asolver)
    assert not fused_applies(FlatFlow(attn), x0, fplan, fsolver)
    big = _x0(key, 2, 32, 8, jnp.float32)  # H n^2 d = 8192 > MAX_COST
    dbig = _dyn(key, 1, 8, 4, 1.0, 0.3, jnp.float32)
    assert not fused_applies(dbig, big, _make_plan(dbig, big, 10, None, None, None, None, None, 1)[0])
    monkeypatch.setenv("ATTNFLOW_FUSED", "0")
    assert not fused_applies(dyn, x0, plan)


def _model(kind, H, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    hd = Heads(*(0.5 * rng.standard_normal(sh).astype(dtype) for sh in [(H, 3, 3)] * 3 + [(H, 3, 3)]))
    att = SelfAttention(hd, Attention("softmax"), np.asarray(1.5, dtype))
    if kind == "map":
        return LayerMap(att, np.asarray(0.2, dtype)), None, dict(steps=200)
    return SphereFlow(att), (RK4() if kind == "rk4" else Euler()), dict(t1=20.0, dt=0.1)


@pytest.mark.parametrize("kind", ["map", "rk4", "euler"])
@pytest.mark.parametrize("tol,saves", [(None, None), ("tol", None), ("tol", 5), (None, 4)])
def test_fused_equals_vmapped_path_float64(kind, tol, saves):
    """The kernel (interpreted) keeps the vmapped path's semantics member by member: same status codes and step
    counts (tol early stop, frozen members, a non-finite member keeps its last finite state), states and saved
    trajectories to 1e-12 in float64. 11 members in blocks of 4: a padded last block."""
    dyn, solver, kw = _model(kind, 2, 5, np.float64)
    tol = None if tol is None else (1e-8 if kind == "map" else 1e-3)  # the flows converge slowly in t1 = 20
    x0 = _x0(jax.random.PRNGKey(1), 11, 5, 3, jnp.float64).at[3].set(jnp.nan)
    plan, solver, dt = _make_plan(dyn, x0, kw.get("steps"), kw.get("t1"), kw.get("dt"), solver, saves, tol, 1)
    dt = jnp.asarray(dt, x0.dtype)
    ref = jax.vmap(lambda x: _fixed_one(dyn, solver, x, dt, plan))(x0)
    out = fused_run(dyn, x0, plan, dt=dt, solver=solver, block=4)
    np.testing.assert_array_equal(out[2], ref[2])
    np.testing.assert_array_equal(out[3], ref[3])
    st = np.asarray(out[2])
    assert st[3] == NONFINITE
    if tol is not None:
        assert np.sum(st == CONVERGED) >= 5, st  # the early stop is exercised
    ok = np.arange(11) != 3
    np.testing.assert_allclose(np.asarray(out[0])[ok], np.asarray(ref[0])[ok], rtol=0, atol=1e-12)
    if saves:
        assert out[1].shape == ref[1].shape == (11, saves + 1, 5, 3)
        np.testing.assert_allclose(np.asarray(out[1])[ok], np.asarray(ref[1])[ok], rtol=0, atol=1e-12)
    else:
        assert out[1] is None


@pytest.mark.parametrize("kind", ["map", "rk4"])
@pytest.mark.parametrize("H,dtype", [(1, np.float32), (5, np.float32), (2, np.float64)])
@pytest.mark.parametrize("tol,saves", [(None, None), (1e-6, 5)])
def test_fused_kernel_lowers_to_triton_for_cuda(kind, H, dtype, tol, saves):
    """No GPU here, but the Pallas -> Triton lowering runs on the CPU: lowering for the "cuda" platform must give
    a Triton custom call for every variant simulate dispatches (maps and flows, tol, saves, heads, dtypes).
    (JAX's default Pallas GPU backend, Mosaic GPU, rejects this kernel; the kernel asks for Triton.) The last
    stage, Triton -> PTX, happens in XLA on the GPU; if it fails there, simulate falls back to the XLA path
    (next test)."""
    dyn, solver, kw = _model(kind, H, 10, dtype)
    x0 = jnp.ones((1000, 10, 3), dtype)
    plan, solver, dt = _make_plan(dyn, x0, kw.get("steps"), kw.get("t1"), kw.get("dt"), solver, saves, tol, 1)
    params = _pack(dyn, dtype, dyn.alpha if kind == "map" else dt)
    f = functools.partial(_fused_local, kind=kind, plan=plan, block=128, interpret=False)
    text = jax.jit(f).trace(x0, params).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and 'name = "_kernel"' in text


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the forced compile failure only happens off the GPU")
def test_simulate_falls_back_to_xla_when_the_kernel_fails_to_compile(monkeypatch):
    """A kernel that does not compile costs a warning, not a run: simulate takes the XLA path (here the Pallas
    call is forced to compile for real on the CPU, which Pallas refuses), and every later call skips the kernel."""
    from attnflow.evolve.kernels import lanes

    monkeypatch.setattr(lanes, "FAILED", None)
    monkeypatch.setattr(lanes, "_interpret", lambda: False)
    key = jax.random.PRNGKey(8)
    dyn = _dyn(key, 1, 3, 3, 1.0, 0.3, jnp.float32)
    x0 = _x0(key, 6, 4, 3, jnp.float32)
    monkeypatch.setenv("ATTNFLOW_FUSED", "0")
    ref = af.simulate(dyn, x0, steps=17, tol=1e-6)
    monkeypatch.setenv("ATTNFLOW_FUSED", "1")
    with pytest.warns(RuntimeWarning, match="fused Pallas kernel failed to compile"):
        got = af.simulate(dyn, x0, steps=17, tol=1e-6)
    assert lanes.FAILED is not None
    np.testing.assert_array_equal(np.asarray(got.final), np.asarray(ref.final))
    np.testing.assert_array_equal(np.asarray(got.status), np.asarray(ref.status))
    plan = _make_plan(dyn, x0, 17, None, None, None, None, None, 1)[0]
    assert not fused_applies(dyn, x0, plan)  # remembered for the process


def test_on_a_gpu_the_kernel_takes_over_once_the_xla_path_has_spent_its_compile_time(monkeypatch):
    """Tiering (ATTNFLOW_FUSED unset on a GPU, simulated here): calls stay on the XLA path until the XLA path has
    spent the kernel's estimated compile time on their signature, then move to the kernel; results agree either way."""
    import importlib

    import attnflow.evolve.kernels as K
    from attnflow.evolve.kernels import lanes

    S = importlib.import_module("attnflow.evolve.simulate")  # the module (attnflow.evolve.simulate is the function)

    monkeypatch.delenv("ATTNFLOW_FUSED", raising=False)
    monkeypatch.setattr(lanes, "fused_mode", lambda: "auto")  # what a GPU backend gives
    monkeypatch.setattr(lanes, "FAILED", None)
    traced = []
    monkeypatch.setattr(K, "fused_run", lambda *a, **k: traced.append(1) or lanes.fused_run(*a, **k))
    key = jax.random.PRNGKey(9)
    dyn = _dyn(key, 1, 3, 3, 1.0, 0.3, jnp.float32)
    x0 = _x0(key, 7, 5, 3, jnp.float32)

    monkeypatch.setattr(S, "FUSED_COMPILE_S_PER_COST", 1e9)  # never worth compiling
    a = af.simulate(dyn, x0, steps=19, tol=1e-7)
    b = af.simulate(dyn, x0, steps=19, tol=1e-7)
    assert not traced
    spent = [v for k, v in S._XLA_SPENT.items() if k[3] == (7, 5, 3)]
    assert len(spent) == 1 and spent[0] > 0  # both calls timed on one signature

    monkeypatch.setattr(S, "FUSED_COMPILE_S_PER_COST", 1e-12)  # already paid for: the next call takes the kernel
    c = af.simulate(dyn, x0, steps=19, tol=1e-7)
    assert traced == [1]
    for r in (b, c):
        np.testing.assert_allclose(np.asarray(r.final), np.asarray(a.final), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(r.status), np.asarray(a.status))
