"""The attention streamed over blocks of keys (SelfAttention(key_block=b)) against the dense (n, n) path: the same
drift to 1e-12 relative in float64 (1e-5 in float32) for every streamable kernel, mask, head layout and block
size, the same Jacobian, O(B n b) memory in the compiled program, and the rule of key_block='auto'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnflow as af
from attnflow.model.heads import AUTO_BLOCK, AUTO_DENSE_MAX


def _jit(attn):
    return jax.jit(lambda X: attn(X))


def _heads(rng, h, d, e, bias):
    Q, K, V = (rng.standard_normal((h, e, d)) / np.sqrt(d) for _ in range(3))
    O = rng.standard_normal((h, d, e)) / np.sqrt(e)
    b = (lambda: rng.standard_normal((h, e)) * 0.3) if bias else (lambda: None)
    return af.Heads(Q=Q, K=K, V=V, O=O, bq=b(), bk=b(), bv=b())


def _pair(heads, kind, mask, window, block, beta=1.5, **kw):
    att = af.Attention(kind, mask, window, **kw)
    return (af.SelfAttention(heads, att, beta, key_block=None), af.SelfAttention(heads, att, beta, key_block=block))


@settings(max_examples=6)
@given(kind=st.sampled_from(["softmax", "unnormalized", "uniform", "relu", "relu_normalize"]),
       mask=st.sampled_from(["full", "causal", "window"]), h=st.integers(1, 3), e=st.sampled_from([1, 2, 5]),
       bias=st.booleans(), n=st.integers(1, 40), block=st.integers(1, 48), seed=st.integers(0, 1000))
def test_streamed_drift_equals_dense_float64(kind, mask, h, e, bias, n, block, seed):
    rng = np.random.default_rng(seed)
    d = 3
    kw = dict(relu_normalize=True) if kind == "relu_normalize" else {}
    dense, streamed = _pair(_heads(rng, h, d, e, bias), kind.split("_")[0], mask, 4 if mask == "window" else None,
                            block, **kw)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(seed), (n, d)))
    want, got = np.asarray(_jit(dense)(jnp.asarray(X))), np.asarray(_jit(streamed)(jnp.asarray(X)))
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * scale)


def test_streamed_small_d_path_float32_and_jacobian():
    """The shared-keys path (one head, d <= 2 d_h: scores through M = Q^T K, values through X) in float32 (1e-5), and
    the Jacobian of the sphere flow's vector field (jacfwd) in float64 (1e-10)."""
    V = np.diag([1.0, 0.4, -0.3])
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        H = af.Heads.single(V.astype(dtype), K=V.astype(dtype))
        dense, streamed = _pair(H, "softmax", "full", None, 16, beta=4.0)
        X = af.sample.sphere(jax.random.PRNGKey(2), (70, 3), dtype=dtype)
        np.testing.assert_allclose(np.asarray(_jit(streamed)(X)), np.asarray(_jit(dense)(X)), atol=tol)
    X = af.sample.sphere(jax.random.PRNGKey(3), (30, 3))
    Jd = jax.jit(jax.jacfwd(af.SphereFlow(dense).vf, argnums=1))(0.0, X)
    Js = jax.jit(jax.jacfwd(af.SphereFlow(streamed).vf, argnums=1))(0.0, X)
    np.testing.assert_allclose(np.asarray(Js), np.asarray(Jd), atol=1e-10)


def test_streamed_memory_is_linear_in_n():
    """The compiled vmapped vector field of 8 members of 2048 tokens: the dense path holds (8, 2048, 2048) score
    and weight arrays; the streamed one (8, 2048, 256) blocks (XLA's own memory analysis of the program)."""
    V = np.diag([1.0, 0.5]).astype(np.float32)
    sizes = {}
    for kb in (None, 256):
        flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 5.0, key_block=kb))
        X = jax.ShapeDtypeStruct((8, 2048, 2), jnp.float32)
        sizes[kb] = jax.jit(jax.vmap(lambda x: flow.vf(0.0, x))).lower(X).compile().memory_analysis().temp_size_in_bytes
    assert sizes[None] >= 8 * 2048 * 2048 * 4  # at least one dense (B, n, n) array
    assert sizes[256] <= 3 * 8 * 2048 * 256 * 4  # a few (B, n, b) blocks, nothing quadratic


def test_key_block_auto_rule_and_refusals():
    """'auto' is a function of n and the kernel only; sinkhorn (column sweeps) never streams; bad values refused."""
    H = af.Heads.single(np.eye(3))
    auto = af.SelfAttention(H, af.Attention("softmax"), 1.0)
    assert auto.key_block == "auto" and auto.block_size(AUTO_DENSE_MAX) is None
    assert auto.block_size(AUTO_DENSE_MAX + 1) == AUTO_BLOCK
    assert af.SelfAttention(H, af.Attention("sinkhorn"), 1.0).block_size(10**4) is None
    assert af.SelfAttention(H, af.Attention("softmax"), 1.0, key_block=None).block_size(10**4) is None
    with pytest.raises(ValueError, match="sinkhorn"):
        af.SelfAttention(H, af.Attention("sinkhorn"), 1.0, key_block=64)
    for bad in (0, -3, 2.5, True, "dense"):
        with pytest.raises(ValueError, match="key_block"):
            af.SelfAttention(H, af.Attention("softmax"), 1.0, key_block=bad)
    # above the threshold 'auto' streams, and equals the dense path
    X = af.sample.sphere(jax.random.PRNGKey(0), (AUTO_DENSE_MAX + 40, 3))
    dense = af.SelfAttention(H, af.Attention("softmax", "causal"), 2.0, key_block=None)
    np.testing.assert_allclose(np.asarray(af.SelfAttention(H, af.Attention("softmax", "causal"), 2.0)(X)),
                               np.asarray(dense(X)), atol=1e-12)
