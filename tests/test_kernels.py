"""The fused small-d layer map (attnflow.evolve.kernels) against the XLA path of simulate and a plain
NumPy loop. On the CPU the Pallas kernel runs through the interpreter (interpret=True)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.evolve.kernels import fused_applies, fused_layer_map, lane_layer_map
from attnflow.evolve.simulate import _make_plan
from attnflow.model.attention import Attention
from attnflow.model.dynamics import LayerMap, SphereFlow
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
    """ATTNFLOW_FUSED=1 routes simulate through the kernel (interpreted here); results and status agree."""
    key = jax.random.PRNGKey(5)
    dyn = _dyn(key, 1, 3, 3, 1.0, 0.3, jnp.float32)
    x0 = _x0(key, 4, 4, 3, jnp.float32)
    monkeypatch.setenv("ATTNFLOW_FUSED", "0")
    ref = af.simulate(dyn, x0, steps=13)
    monkeypatch.setenv("ATTNFLOW_FUSED", "1")
    got = af.simulate(dyn, x0, steps=14)  # a new step count: a new trace, taken by the fused branch
    one = fused_layer_map(dyn, x0, 14, interpret=True)
    np.testing.assert_array_equal(np.asarray(got.final), np.asarray(one))
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
    assert not fused_applies(dyn, x0, saving) and not fused_applies(dyn, x0, tol)
    attn = dyn.attn
    for other in (
        LayerMap(attn, alpha=0.3, norm=NoNorm()),
        LayerMap(attn, alpha=0.3, norm=LayerNorm(jnp.ones(3), jnp.zeros(3))),
        LayerMap(SelfAttention(attn.heads, Attention(mask="causal")), alpha=0.3),
        LayerMap(SelfAttention(attn.heads, Attention(kind="uniform")), alpha=0.3),
    ):
        assert not fused_applies(other, x0, plan)
    flow = SphereFlow(attn)
    fplan = _make_plan(flow, x0, None, 1.0, 0.1, None, None, None, 1)[0]
    assert not fused_applies(flow, x0, fplan)
    big = _x0(key, 2, 4, 16, jnp.float32)
    dbig = _dyn(key, 1, 16, 4, 1.0, 0.3, jnp.float32)
    assert not fused_applies(dbig, big, _make_plan(dbig, big, 10, None, None, None, None, None, 1)[0])
    monkeypatch.setenv("ATTNFLOW_FUSED", "0")
    assert not fused_applies(dyn, x0, plan)
