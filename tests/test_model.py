"""Model pieces against the plain NumPy loops in references.py (float64: rel. 1e-12 per step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import attnflow as af
from attnflow.model import allowed_set, parse_mask

import references as ref

KINDS = ["softmax", "unnormalized", "uniform", "relu", "sinkhorn"]


def random_heads(rng, H, d, dh, scale=0.7):
    Q = rng.normal(size=(H, dh, d)) * scale
    K = rng.normal(size=(H, dh, d)) * scale
    V = rng.normal(size=(H, dh, d)) * scale
    O = rng.normal(size=(H, d, dh)) * scale
    return Q, K, V, O


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask,window", [("full", None), ("causal", None), ("window", 2)])
def test_drift_matches_numpy(kind, mask, window):
    rng = np.random.default_rng(1)
    n, d, H, dh = 5, 4, 2, 3
    Q, K, V, O = random_heads(rng, H, d, dh)
    X = rng.normal(size=(n, d))
    attn = af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind, mask, window), 0.8)
    got = np.asarray(attn(jnp.asarray(X)))
    want = ref.drift(X, Q, K, V, O, 0.8, kind=kind, mask=mask, window=window)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_relu_row_normalised_and_sinkhorn_options():
    rng = np.random.default_rng(2)
    S = rng.normal(size=(6, 6))
    a = np.asarray(af.Attention("relu", relu_normalize=True)(jnp.asarray(S)))
    np.testing.assert_allclose(a, ref.attention_matrix(S, "relu", relu_normalize=True), atol=1e-14)
    # sinkhorn with k = 1 is softmax; with many iterations it is doubly stochastic
    s1 = af.Attention("sinkhorn", sinkhorn_iters=1)(jnp.asarray(S))
    np.testing.assert_allclose(s1, af.Attention("softmax")(jnp.asarray(S)), atol=1e-14)
    s50 = np.asarray(af.Attention("sinkhorn", sinkhorn_iters=200)(jnp.asarray(S)))
    np.testing.assert_allclose(s50.sum(0), 1.0, atol=1e-8)
    np.testing.assert_allclose(s50.sum(1), 1.0, atol=1e-12)


def test_masks():
    assert parse_mask("window:3") == ("window", 3)
    with pytest.raises(ValueError, match="window"):
        parse_mask("window:0")
    with pytest.raises(ValueError, match="unknown mask"):
        parse_mask("banded")
    np.testing.assert_array_equal(allowed_set(4, "window", 2), ref.allowed(4, "window", 2))
    np.testing.assert_array_equal(allowed_set(4, "causal"), ref.allowed(4, "causal"))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown attention kind"):
        af.Attention("cosine")
    with pytest.raises(ValueError, match="beta must be"):
        af.SelfAttention(af.Heads.single(np.eye(3)), beta=-1.0)
    with pytest.raises(ValueError, match="alpha must be"):
        af.LayerMap(af.SelfAttention(af.Heads.single(np.eye(3))), alpha=0.0)
    with pytest.raises(ValueError, match="O must have shape"):
        af.Heads(np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="square"):
        af.Heads.single(np.ones((3, 2)))


def test_layer_and_score_matrices():
    rng = np.random.default_rng(3)
    Q, K, V, O = random_heads(rng, 3, 4, 2)
    h = af.Heads(Q, K, V, O)
    np.testing.assert_allclose(h.layer_matrix(), sum(O[i] @ V[i] for i in range(3)), atol=1e-14)
    np.testing.assert_allclose(h.score_matrices()[1], Q[1].T @ K[1], atol=1e-14)
    X = rng.normal(size=(5, 4))
    S = np.asarray(af.SelfAttention(h, beta=0.5).scores(jnp.asarray(X)))
    np.testing.assert_allclose(S[2], 0.5 * X @ (Q[2].T @ K[2]) @ X.T, atol=1e-13)


def test_biases_enter_like_hf_attention():
    rng = np.random.default_rng(4)
    n, d, H, dh = 4, 6, 2, 3
    Q, K, V, O = random_heads(rng, H, d, dh)
    bq, bk, bv = (rng.normal(size=(H, dh)) for _ in range(3))
    bo = rng.normal(size=d)
    X = rng.normal(size=(n, d))
    got = af.SelfAttention(af.Heads(Q, K, V, O, bq, bk, bv, bo), beta=0.4)(jnp.asarray(X))
    want = np.zeros((n, d)) + bo
    for h in range(H):
        q, k, v = X @ Q[h].T + bq[h], X @ K[h].T + bk[h], X @ V[h].T + bv[h]
        s = 0.4 * q @ k.T
        a = np.exp(s - s.max(1, keepdims=True))
        a /= a.sum(1, keepdims=True)
        want += (a @ v) @ O[h].T
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_layernorm_affine_and_radius():
    rng = np.random.default_rng(5)
    Y = rng.normal(size=(4, 6))
    out = np.asarray(af.LayerNorm()(jnp.asarray(Y)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.sqrt(6), rtol=1e-12)
    np.testing.assert_allclose(out.mean(1), 0, atol=1e-13)
    g, b = rng.normal(size=6), rng.normal(size=6)
    np.testing.assert_allclose(af.LayerNorm(jnp.asarray(g), jnp.asarray(b))(jnp.asarray(Y)), out * g + b, rtol=1e-12)


@given(perm_seed=st.integers(0, 10_000), kind=st.sampled_from(KINDS), time=st.sampled_from(["map", "flow"]))
def test_permutation_equivariance(perm_seed, kind, time):
    """Full attention: permuting the tokens permutes the step (map) or the vector field (flow)."""
    rng = np.random.default_rng(perm_seed)
    n, d = 6, 3
    Q, K, V, O = random_heads(rng, 2, d, 2)
    attn = af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind), 1.3)
    X = jnp.asarray(rng.normal(size=(n, d)))
    X = X / jnp.linalg.norm(X, axis=1, keepdims=True)
    p = rng.permutation(n)
    f = (lambda Z: af.LayerMap(attn, 0.3).step(0, Z)) if time == "map" else (lambda Z: af.SphereFlow(attn).vf(0.0, Z))
    np.testing.assert_allclose(f(X[p]), f(X)[p], rtol=1e-12, atol=1e-13)


def test_layer_stack_groups_and_matches_sequence():
    """A stack of layers with two masks compiles to two groups and equals applying the layers in order."""
    rng = np.random.default_rng(6)
    d, n = 4, 5
    layers, params = [], []
    for ell in range(4):
        Q, K, V, O = random_heads(rng, 2, d, 2)
        mask = ("causal", None) if ell % 2 == 0 else ("window", 2)
        layers.append(af.LayerMap(af.SelfAttention(af.Heads(Q, K, V, O), af.Attention("softmax", *mask), 0.5), 1.0))
        params.append((Q, K, V, O, mask))
    stack = af.LayerStack.from_layers(layers)
    assert len(stack.groups) == 2 and stack.num_layers == 4
    X0 = rng.normal(size=(n, d))
    X0 /= np.linalg.norm(X0, axis=1, keepdims=True)
    sol = af.simulate(stack, jnp.asarray(X0)[None], saves=4)
    X = X0
    for ell, (Q, K, V, O, (mask, w)) in enumerate(params):
        X = ref.layer_map(X, 1, Q, K, V, O, 0.5, 1.0, mask=mask, window=w)[-1]
        np.testing.assert_allclose(sol.trajectory[ell + 1, 0], X, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="exceeds"):
        af.simulate(stack, jnp.asarray(X0)[None], steps=5)


def test_heads_from_host_data_have_jnp_dtypes_and_compile_nothing():
    """Heads built from NumPy arrays or lists take the dtype ``jnp.asarray`` would give them (floats kept, integers
    and Python numbers as JAX's default float), never weakly typed, without an eager XLA compile (jnp.asarray of host
    data compiles a program per shape in JAX 0.10). A shape no other test uses, so that no cached program hides one."""
    from jax import monitoring

    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, dur, **kw: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    V = np.diag(np.arange(1.0, 8.0))
    built = [af.Heads.single(V), af.Heads.single(V.astype(np.float32)), af.Heads.single(np.eye(7, dtype=np.int64)),
             af.Heads.single(V.tolist(), Q=np.eye(7), K=V), af.Heads(Q=V[None], K=V[None], V=V[None], O=V[None])]
    assert compiles == []
    for h in built:
        for a in (h.Q, h.K, h.V, h.O):
            assert isinstance(a, jax.Array) and not a.weak_type
    assert built[0].V.dtype == jnp.asarray(V).dtype == built[2].V.dtype == built[3].V.dtype
    assert built[1].V.dtype == jnp.float32 and built[1].O.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(built[0].O[0]), np.eye(7))
    np.testing.assert_array_equal(np.asarray(built[3].V[0]), V.astype(built[3].V.dtype))


def test_float32_keeps_dtype():
    V = np.diag([1.0, 0.5, -0.2])
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (3, 4, 3), dtype=jnp.float32)
    for dyn, kw in [
        (af.LayerMap(af.SelfAttention(af.Heads.single(V)), 0.1), dict(steps=5, saves=5)),
        (af.SphereFlow(af.SelfAttention(af.Heads.single(V))), dict(t1=0.5, dt=0.1, saves=5)),
    ]:
        sol = af.simulate(dyn, x0, **kw)
        assert sol.final.dtype == jnp.float32 and sol.trajectory.dtype == jnp.float32
