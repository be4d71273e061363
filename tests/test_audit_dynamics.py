"""Audit of docs/model.md sections 1-3 (state, attention, dynamics) against references that share no code with
attnflow: plain Python loops written from the formulas on that page (below), SciPy's solve_ivp for the flows.

Tolerances: float64 1e-12 relative for one evaluation (drift, step), float32 3e-5 relative; flows against solve_ivp
1e-8 (RK4, dt = 1e-2) or the adaptive solver's tolerance. The regression tests at the end are for inputs that used
to give a silently wrong answer: a beta or alpha of shape (H,), (d,) or (n, 1) broadcast against the other axes;
integer tokens truncated beta to 0; a LayerNorm with eps < 0 left tokens unscaled; a window of 2.5 acted as 3 and a
window with another mask was ignored; stack.step(k) past the last layer reused the last layer; NaN weights were
accepted. And for docs/model.md section 3's alpha -> oo limit, which is the power method for one token only.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp

import attnflow as af
from attnflow.model.transformer import FFN, TransformerBlock

REL = {np.float64: 1e-12, np.float32: 3e-5}


# ------------------------------------------------------------------ references: docs/model.md sections 1-3, loops


def ref_allowed(i, j, mask, window):
    """N(i) of section 2's mask table."""
    if mask == "full":
        return True
    if mask == "causal":
        return j <= i
    return j <= i and i - j < window


def ref_weights(S, kind, mask, window, iters=3, relu_normalize=False):
    """a_ij of section 2's kernel table, one entry at a time (sinkhorn in the log domain, by explicit loops)."""
    n = len(S)
    ok = [[ref_allowed(i, j, mask, window) for j in range(n)] for i in range(n)]
    A = [[0.0] * n for _ in range(n)]
    if kind == "sinkhorn":
        L = [[S[i][j] if ok[i][j] else -math.inf for j in range(n)] for i in range(n)]

        def lse(vals):
            m = max(v for v in vals if v > -math.inf)
            return m + math.log(sum(math.exp(v - m) for v in vals if v > -math.inf))

        for _ in range(iters - 1):
            for i in range(n):
                z = lse(L[i])
                L[i] = [v - z for v in L[i]]
            for j in range(n):
                z = lse([L[i][j] for i in range(n)])
                for i in range(n):
                    L[i][j] -= z
        for i in range(n):
            z = lse(L[i])
            A[i] = [math.exp(v - z) if v > -math.inf else 0.0 for v in L[i]]
        return A
    for i in range(n):
        keys = [j for j in range(n) if ok[i][j]]
        if kind == "softmax":
            m = max(S[i][j] for j in keys)
            z = sum(math.exp(S[i][j] - m) for j in keys)
            for j in keys:
                A[i][j] = math.exp(S[i][j] - m) / z
        elif kind == "unnormalized":
            for j in keys:
                A[i][j] = math.exp(S[i][j]) / n
        elif kind == "uniform":
            for j in keys:
                A[i][j] = 1.0 / len(keys)
        elif kind == "relu":
            tot = sum(max(S[i][j], 0.0) for j in keys) if relu_normalize else n
            for j in keys:
                A[i][j] = max(S[i][j], 0.0) / tot if tot > 0 else 0.0
    return A


def ref_drift(X, P, beta, kind="softmax", mask="full", window=None, **kw):
    """u_i = sum_h O_h sum_j a^h_ij (V_h x_j + bv_h) (+ bo), s^h_ij = beta <Q_h x_i + bq_h, K_h x_j + bk_h>."""
    X = np.asarray(X, np.float64)
    n, d = X.shape
    U = np.zeros((n, d)) if P.get("bo") is None else np.tile(P["bo"], (n, 1))
    for h in range(P["Q"].shape[0]):
        b = {k: (0.0 if P.get(k) is None else P[k][h]) for k in ("bq", "bk", "bv")}
        q = [P["Q"][h] @ x + b["bq"] for x in X]
        k = [P["K"][h] @ x + b["bk"] for x in X]
        v = [P["V"][h] @ x + b["bv"] for x in X]
        S = [[beta * float(q[i] @ k[j]) for j in range(n)] for i in range(n)]
        A = ref_weights(S, kind, mask, window, **kw)
        for i in range(n):
            U[i] += P["O"][h] @ sum(A[i][j] * v[j] for j in range(n))
    return U


def ref_norm(Y, norm, gain=None, bias=None, eps=0.0):
    out = []
    for y in np.asarray(Y, np.float64):
        if norm == "l2":
            out.append(y / math.sqrt(sum(t * t for t in y)))
        elif norm == "layernorm":
            mu = sum(y) / len(y)
            var = sum((t - mu) ** 2 for t in y) / len(y)
            z = (y - mu) / math.sqrt(var + eps)
            out.append(z * (1.0 if gain is None else gain) + (0.0 if bias is None else bias))
        else:
            out.append(y.copy())
    return np.array(out)


def ref_tangent(X, U):
    """P(x_i) u_i = u_i - <x_i, u_i> x_i / |x_i|^2 (section 1)."""
    return np.array([u - (x @ u) / (x @ x) * x for x, u in zip(X, U)])


# ------------------------------------------------------------------------------------------------ helpers


def params(rng, H, d, dh, bias=False, scale=0.7):
    P = {k: rng.normal(size=(H, dh, d)) * scale for k in ("Q", "K", "V")}  # Q != K, V not symmetric
    P["O"] = rng.normal(size=(H, d, dh)) * scale
    for k in ("bq", "bk", "bv"):
        P[k] = rng.normal(size=(H, dh)) * 0.3 if bias else None
    P["bo"] = rng.normal(size=d) * 0.3 if bias else None
    return P


def heads(P, dtype=np.float64):
    hd = af.Heads(**{k: v for k, v in P.items() if v is not None})
    return hd.astype(jnp.float32) if dtype == np.float32 else hd


def unit(rng, shape):
    X = rng.normal(size=shape)
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def close(got, want, dtype, factor=1.0):
    got = np.asarray(got)
    assert got.dtype == dtype, got.dtype
    err = np.max(np.abs(got - want)) / (1.0 + np.max(np.abs(want)))
    assert err < REL[dtype] * factor, err


KINDS = ["softmax", "unnormalized", "uniform", "relu", "relu_normalize", "sinkhorn"]


def attention(kind, mask, window, iters):
    if kind == "relu_normalize":
        return af.Attention("relu", mask, window, relu_normalize=True), dict(relu_normalize=True)
    if kind == "sinkhorn":
        return af.Attention("sinkhorn", mask, window, sinkhorn_iters=iters), dict(iters=iters)
    return af.Attention(kind, mask, window), {}


# ------------------------------------------------------------------------------- section 2: the drift


@settings(max_examples=10)
@given(kind=st.sampled_from(KINDS), mask=st.sampled_from(["full", "causal", "window"]), n=st.sampled_from([1, 2, 3, 5]),
       d=st.sampled_from([1, 2, 3]), H=st.integers(1, 3), dh=st.integers(1, 3), bias=st.booleans(),
       logbeta=st.floats(-4, 1.5), iters=st.integers(1, 4), block=st.sampled_from([None, 1, 2]),
       f32=st.booleans(), seed=st.integers(0, 2**16))
def test_drift_matches_loop_reference(kind, mask, n, d, H, dh, bias, logbeta, iters, block, f32, seed):
    """Every kernel, mask, head layout (d <= 2 d_h contracts through M_h, W_h; wider d through Q_h, K_h, V_h, O_h),
    biases, dense or streamed keys, float32 and float64."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    P = params(rng, H, d, dh, bias)
    window = 2 if mask == "window" else None
    att, kw = attention(kind, mask, window, iters)
    beta = float(np.exp(logbeta))
    sa = af.SelfAttention(heads(P, dtype), att, beta, key_block=None if kind == "sinkhorn" else block)
    X = rng.normal(size=(n, d)).astype(dtype)
    close(eqx.filter_jit(lambda a, Y: a(Y))(sa, jnp.asarray(X)), ref_drift(X, P, beta, att.kind, mask, window, **kw),
          dtype)


# ----------------------------------------------------------------- section 3: maps and one solver step


@settings(max_examples=6)
@given(kind=st.sampled_from(KINDS), mask=st.sampled_from(["full", "causal", "window"]), n=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([2, 3]), H=st.integers(1, 2), norm=st.sampled_from(["l2", "layernorm", "affine", "none"]),
       eps=st.sampled_from([0.0, 1e-5, 0.3]), logalpha=st.floats(-3, 1), f32=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_map_and_solver_steps_match_reference(kind, mask, n, d, H, norm, eps, logalpha, f32, seed):
    """x_i <- N(x_i + alpha u_i) for every N (LayerNorm with eps, gain and bias); one projected Euler and one
    projected RK4 step of the sphere flow and of the flat flow (stages evaluated off the sphere)."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if f32 else np.float64
    P = params(rng, H, d, 2)
    window = 2 if mask == "window" else None
    att, kw = attention(kind, mask, window, 2)
    beta, alpha, dt = 0.9, float(np.exp(logalpha)), 0.05
    sa = af.SelfAttention(heads(P, dtype), att, beta)
    X = unit(rng, (n, d)).astype(dtype)
    Xr = X.astype(np.float64)
    g, b = (rng.normal(size=d), rng.normal(size=d)) if norm == "affine" else (None, None)
    N = {"l2": af.L2Norm(), "none": af.NoNorm()}.get(norm) or af.LayerNorm(
        None if g is None else jnp.asarray(g), None if b is None else jnp.asarray(b), eps)
    f = lambda Y: ref_drift(Y, P, beta, att.kind, mask, window, **kw)
    want = [ref_norm(Xr + alpha * f(Xr), "layernorm" if norm == "affine" else norm, g, b, eps)]
    for F, proj in [(lambda Y: ref_tangent(Y, f(Y)), lambda Y: ref_norm(Y, "l2")), (f, lambda Y: Y)]:
        k1 = F(Xr)
        k2 = F(Xr + dt / 2 * k1)
        k3 = F(Xr + dt / 2 * k2)
        k4 = F(Xr + dt * k3)
        want += [proj(Xr + dt * k1), proj(Xr + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4))]

    @eqx.filter_jit
    def steps(sa, N, X):
        dtj = jnp.asarray(dt, X.dtype)
        out = [af.LayerMap(sa, alpha, N).step(0, X)]
        for flow in (af.SphereFlow(sa), af.FlatFlow(sa)):
            out += [af.Euler().step(flow, 0, 0.0, X, dtj), af.RK4().step(flow, 0, 0.0, X, dtj)]
        return out

    for got, w in zip(steps(sa, N, jnp.asarray(X)), want):
        close(got, w, dtype)


# ------------------------------------------------------------------------------- flows over time


@pytest.mark.parametrize("kind,mask,flat,solver", [("softmax", "causal", True, "rk4"),
                                                   ("sinkhorn", "window", False, "adaptive")])
def test_flows_match_solve_ivp(kind, mask, flat, solver):
    """Sphere and flat flows, two heads, d = 2, against DOP853 at rtol 1e-12; sphere norms stay 1 at every save."""
    rng = np.random.default_rng(10 * flat)
    n, d, beta, T = 3, 2, 1.2, 1.5
    P = params(rng, 2, d, 2)
    window = 2 if mask == "window" else None
    sa = af.SelfAttention(heads(P), af.Attention(kind, mask, window), beta)
    dyn = af.FlatFlow(sa) if flat else af.SphereFlow(sa)
    X0 = unit(rng, (2, n, d))
    kw = dict(t1=T, dt=1e-2) if solver == "rk4" else dict(t1=T, solver=af.Adaptive(rtol=1e-10, atol=1e-12))
    sol = af.simulate(dyn, jnp.asarray(X0), saves=3, **kw)
    f = lambda Y: ref_drift(Y, P, beta, kind, mask, window)
    F = f if flat else (lambda Y: ref_tangent(Y, f(Y)))
    for b in range(2):
        ivp = solve_ivp(lambda t, y: F(y.reshape(n, d)).ravel(), (0, T), X0[b].ravel(), t_eval=np.linspace(0, T, 4),
                        rtol=1e-12, atol=1e-13, method="DOP853")
        want = ivp.y.T.reshape(4, n, d)
        if not flat and solver == "adaptive":  # projected at the saved times (section 3)
            want = want / np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(sol.trajectory[:, b]), want, atol=1e-8)
    if not flat:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(sol.trajectory), axis=-1), 1.0, atol=1e-13)


def test_transformer_blocks_and_stack_match_reference():
    """Pre-norm and post-norm blocks (LayerNorms with gain, bias and eps, a relu FFN) and a LayerStack of layers with
    their own beta and alpha, against the loops."""
    rng = np.random.default_rng(7)
    n, d, m = 3, 4, 5
    P = params(rng, 2, d, 2, bias=True)
    sa = af.SelfAttention(heads(P), af.Attention("softmax", "causal"), 0.6)
    Wi, bi, Wo, bo = rng.normal(size=(m, d)), rng.normal(size=m), rng.normal(size=(d, m)), rng.normal(size=d)
    ffn = FFN(jnp.asarray(Wi), jnp.asarray(bi), jnp.asarray(Wo), jnp.asarray(bo), act="relu")
    g1, b1, g2, b2 = (rng.normal(size=d) for _ in range(4))
    ln1 = af.LayerNorm(jnp.asarray(g1), jnp.asarray(b1), 1e-5)
    ln2 = af.LayerNorm(jnp.asarray(g2), jnp.asarray(b2), 1e-5)
    X = rng.normal(size=(n, d))
    u = lambda Y: ref_drift(Y, P, 0.6, "softmax", "causal")
    mlp = lambda Y: np.array([Wo @ np.maximum(Wi @ y + bi, 0) + bo for y in Y])
    pre = TransformerBlock(sa, ln1, af.NoNorm(), ln2, af.NoNorm(), ffn, alpha=0.7)
    h = X + 0.7 * u(ref_norm(X, "layernorm", g1, b1, 1e-5))
    close(pre.step(0, jnp.asarray(X)), h + mlp(ref_norm(h, "layernorm", g2, b2, 1e-5)), np.float64, 10)
    post = TransformerBlock(sa, af.NoNorm(), ln1, af.NoNorm(), ln2, ffn, alpha=1.0)
    h = ref_norm(X + u(X), "layernorm", g1, b1, 1e-5)
    close(post.step(0, jnp.asarray(X)), ref_norm(h + mlp(h), "layernorm", g2, b2, 1e-5), np.float64, 10)
    # a stack: layer l has its own weights, beta_l, alpha_l and mask
    Ps = [params(rng, 2, d, 2) for _ in range(3)]
    masks = [("window", 2), ("full", None), ("window", 2)]
    layers = [af.LayerMap(af.SelfAttention(heads(p), af.Attention("softmax", *mk), 0.5 + 0.2 * i), 0.3 + 0.1 * i)
              for i, (p, mk) in enumerate(zip(Ps, masks))]
    stack = af.LayerStack.from_layers(layers)
    assert len(stack.groups) == 2
    step = eqx.filter_jit(lambda s, k, Y: s.step(k, Y))
    Y = unit(rng, (n, d))
    Z = jnp.asarray(Y)
    for i, (p, (mask, w)) in enumerate(zip(Ps, masks)):
        Y = ref_norm(Y + (0.3 + 0.1 * i) * ref_drift(Y, p, 0.5 + 0.2 * i, "softmax", mask, w), "l2")
        Z = step(stack, jnp.asarray(i), Z)
        close(Z, Y, np.float64, 10)


# ------------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_configurations(dtype):
    """Coinciding tokens, antipodal tokens, orthogonal and antipodal together, d = 2; beta from 1e-12 (the uniform
    limit) to 1e4 (scores far past exp's float32 range: the softmax shift and the log-domain sinkhorn must not
    overflow). Float32 scores carry an absolute error of about beta |M| eps_32, hence its tolerance grows with beta."""
    rng = np.random.default_rng(3)
    P = params(rng, 1, 2, 2)
    a = np.array([0.6, 0.8])
    states = np.array([[[1.0, 0.0]] * 3, [a, -a, a], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    vf = eqx.filter_jit(lambda flow, X: jax.vmap(lambda Y: flow.vf(0.0, Y))(X))
    for kind in ["softmax", "sinkhorn", "uniform", "relu"]:
        for beta in [1e-12, 1e-2, 30.0, 1e4]:
            flow = af.SphereFlow(af.SelfAttention(heads(P, dtype), af.Attention(kind), beta))
            got = np.asarray(vf(flow, jnp.asarray(states, dtype)))
            assert np.all(np.isfinite(got)), (kind, beta)
            for g, X in zip(got, states):
                want = ref_tangent(X, ref_drift(X, P, beta, kind))
                close(g, want, dtype, max(1.0, beta * (0.1 if dtype == np.float32 else 1.0)))
                if beta == 1e-12 and kind != "relu":  # beta -> 0: softmax and sinkhorn tend to uniform weights
                    close(g, ref_tangent(X, ref_drift(X, P, 1.0, "uniform")), dtype)


# ---------------------------------------------------------------------------------- properties


@settings(max_examples=4)
@given(kind=st.sampled_from(KINDS), time=st.sampled_from(["map", "sphere", "flat"]), n=st.sampled_from([2, 5]),
       seed=st.integers(0, 2**16))
def test_permutation_equivariance_full_mask_and_not_causal(kind, time, n, seed):
    """Full mask: permuting the tokens permutes the step / vector field. The causal mask breaks it (checked on one
    transposition of the first two tokens, which changes token 0's allowed set)."""
    rng = np.random.default_rng(seed)
    P = params(rng, 2, 3, 2, bias=bool(seed % 2))
    att, _ = attention(kind, "full", None, 3)
    sa = af.SelfAttention(heads(P), att, 1.3)
    step = {"map": lambda a: af.LayerMap(a, 0.3).step, "sphere": lambda a: af.SphereFlow(a).vf,
            "flat": lambda a: af.FlatFlow(a).vf}[time]
    f = eqx.filter_jit(lambda a, Y: step(a)(0, Y))
    X = jnp.asarray(unit(rng, (n, 3)))
    p = rng.permutation(n)
    np.testing.assert_allclose(f(sa, X[p]), f(sa, X)[p], rtol=1e-12, atol=1e-13)
    if not kind.startswith("relu"):  # relu rows can be zero either way (negative scores): no sure counterexample
        causal = af.SelfAttention(heads(P), attention(kind, "causal", None, 3)[0], 1.3)
        swap = np.array([1, 0] + list(range(2, n)))
        assert np.max(np.abs(np.asarray(f(causal, X[swap]) - f(causal, X)[swap]))) > 1e-6


def test_energy_monotone_single_softmax_head_on_the_sphere():
    """Section 7: W = M = M^T, one softmax head: E = 1/(2 beta n^2) sum_ij exp(beta x_i^T M x_j) never decreases
    along the sphere flow (computed here from the saved states, by the formula)."""
    rng = np.random.default_rng(11)
    A = rng.normal(size=(3, 3))
    M = (A + A.T) / 2
    beta, n = 1.4, 6
    dyn = af.SphereFlow(af.SelfAttention(af.Heads.single(M, Q=np.eye(3), K=M), af.Attention("softmax"), beta))
    sol = af.simulate(dyn, jnp.asarray(unit(rng, (3, n, 3))), t1=4.0, dt=0.01, saves=40)
    for traj in np.moveaxis(np.asarray(sol.trajectory), 1, 0):
        E = [sum(math.exp(beta * X[i] @ M @ X[j]) for i in range(n) for j in range(n)) / (2 * beta * n * n)
             for X in traj]
        assert np.all(np.diff(E) >= -1e-12 * max(E)), np.diff(E).min()


# ---------------------------------------------------------- regressions: inputs that gave silent wrong answers


def test_beta_and_alpha_must_be_single_numbers_where_used():
    """A per-head beta (H,) used to broadcast against the last axis of M_h (a wrong drift, off by 1.7 on this example,
    when H = d) or against the keys (H = n); an alpha (d,) or (n, 1) scaled coordinates or tokens. A model may still
    hold an array of values to vmap over (each member then sees one number), so the refusal is at the use."""
    rng = np.random.default_rng(2)
    P = params(rng, 3, 3, 2)
    X = jnp.asarray(unit(rng, (4, 3)))
    for dh, beta in ((2, np.array([0.5, 1.0, 2.0])), (1, np.full(4, 0.5)), (2, np.array([[0.7]]))):
        sa = af.SelfAttention(heads(params(rng, 3, 3, dh)), af.Attention(), beta)
        for f in (sa, sa.weights, lambda Y, sa=sa: af.SphereFlow(sa).vf(0.0, Y),
                  lambda Y, sa=sa: eqx.filter_jit(lambda a, Z: a(Z))(sa, Y)):
            with pytest.raises(ValueError, match="beta must be a single number"):
                f(X)
    sa = af.SelfAttention(heads(P), af.Attention(), 0.8)
    for alpha in (np.array([0.1, 0.2, 0.3]), np.full((4, 1), 0.1)):
        with pytest.raises(ValueError, match="alpha must be a single number"):
            af.LayerMap(sa, alpha).step(0, X)
    lm = af.LayerMap(sa, 0.2)
    with pytest.raises(ValueError, match="beta must be a single number"):
        af.SphereFlow(sa).with_params(beta=np.array([0.5, 1.0, 2.0])).vf(0.0, X)
    with pytest.raises(ValueError, match="alpha must be a single number"):
        lm.with_params(alpha=np.array([0.1, 0.2, 0.3])).step(0, X)
    stack = af.LayerStack.from_layers([lm, lm])  # a group's array would be spread in the group's own order
    with pytest.raises(ValueError, match="beta must be a single number"):
        stack.with_params(beta=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="alpha must be a single number"):
        stack.with_params(alpha=np.array([0.1, 0.2]))
    # one number, a sweep (one traced scalar per member) and a vmap over the values still work
    X0 = jnp.asarray(unit(rng, (2, 4, 3)))
    sw = af.sweep(lm, X0, beta=[0.5, 1.5], alpha=[0.1, 0.3], steps=3)
    one = af.simulate(lm.with_params(beta=1.5, alpha=0.3), X0, steps=3)
    np.testing.assert_allclose(sw.final[1], one.final, rtol=1e-12)
    betas = jnp.asarray([0.5, 1.5])
    vm = jax.vmap(lambda b: af.SphereFlow(sa).with_params(beta=b).vf(0.0, X))(betas)
    np.testing.assert_allclose(vm[1], ref_tangent(np.asarray(X), ref_drift(np.asarray(X), P, 1.5)), rtol=1e-12)


def test_tokens_must_be_floating_with_the_models_d():
    """Integer tokens (jnp.asarray([[1, 0], ...]) is int) used to cast beta and M_h to int: a drift of 0 and a map
    that returned its input; tokens of another d or a batch gave einsum's message."""
    V = np.array([[1.0, 0.3], [-0.2, 0.8]])
    sa = af.SelfAttention(af.Heads.single(V, Q=np.array([[1.0, 0.5], [0.0, 1.0]])), af.Attention(), 0.7)
    Xi = jnp.asarray([[1, 0], [0, 1], [1, 0]])
    for f in (sa, lambda X: af.SphereFlow(sa).vf(0.0, X), lambda X: af.LayerMap(sa, 0.5).step(0, X), sa.weights):
        with pytest.raises(TypeError, match="tokens must be floating point, got dtype int"):
            f(Xi)
    for shape in [(3, 3), (3,), (2, 3, 2)]:
        with pytest.raises(ValueError, match=r"tokens must have shape \(n, d\) with d = 2"):
            sa(jnp.ones(shape))


def test_layernorm_refuses_negative_eps_and_misshapen_affine():
    """eps < 0 used to leave a token of small spread centred but unscaled ([1, 1.2, 0.8] -> [0, 0.2, -0.2] with
    eps = -0.5); a gain of shape (n, d) or (1,) broadcast per token or over the coordinates."""
    for kw in (dict(eps=-0.5), dict(eps=float("nan")), dict(eps=float("inf")), dict(gain=jnp.ones((3, 3))),
               dict(bias=jnp.ones(()))):
        with pytest.raises(ValueError, match="LayerNorm"):
            af.LayerNorm(**kw)
    with pytest.raises(ValueError, match=r"gain of shape \(1,\) does not fit tokens of d = 3"):
        af.LayerNorm(gain=jnp.ones(1))(jnp.ones((2, 3)))
    Y = jnp.asarray([[1.0, 1.2, 0.8]])
    np.testing.assert_allclose(af.LayerNorm(eps=0.5)(Y), ref_norm(np.asarray(Y), "layernorm", eps=0.5), rtol=1e-12)


def test_layer_stack_refuses_a_layer_it_does_not_have():
    """stack.step(k, X) and stack.layer(k) with a concrete k >= L used to clamp to the last layer (JAX's indexing)."""
    rng = np.random.default_rng(4)
    P1, P2 = params(rng, 1, 2, 2), params(rng, 1, 2, 2)
    l1 = af.LayerMap(af.SelfAttention(heads(P1), af.Attention("softmax")), 0.5)
    l2 = af.LayerMap(af.SelfAttention(heads(P2), af.Attention("uniform")), 0.5)
    stack = af.LayerStack.from_layers([l1, l2])
    X = jnp.asarray(unit(rng, (3, 2)))
    for k in (2, 5, jnp.asarray(7), -3):
        with pytest.raises(IndexError, match="this stack has 2 layers"):
            stack.step(k, X)
        with pytest.raises(IndexError, match="this stack has 2 layers"):
            stack.layer(k)
    close(stack.step(-1, X), ref_norm(np.asarray(X) + 0.5 * ref_drift(X, P2, 1.0, "uniform"), "l2"), np.float64)
    close(stack.step(np.int64(0), X), ref_norm(np.asarray(X) + 0.5 * ref_drift(X, P1, 1.0), "l2"), np.float64)


def test_attention_options_must_be_integers_and_a_window_needs_its_mask():
    """window=2.5 used to pass the range check and act as a window of 3 (i - j < 2.5); window=True as 1; a window given
    with mask='causal' was ignored; sinkhorn_iters=2.5 failed only when called."""
    S = jnp.zeros((5, 5))
    w3 = np.asarray(af.Attention("uniform", "window", 3)(S))
    np.testing.assert_allclose(w3[4], [0, 0, 1 / 3, 1 / 3, 1 / 3])  # the reference: N(4) = {2, 3, 4}
    for kw in (dict(mask="window", window=2.5), dict(mask="window", window=True), dict(mask="window"),
               dict(mask="causal", window=3), dict(mask="full", window=2), dict(kind="sinkhorn", sinkhorn_iters=2.5),
               dict(kind="sinkhorn", sinkhorn_iters=0)):
        with pytest.raises(ValueError, match="window|sinkhorn_iters"):
            af.Attention(**kw)


def test_special_cases_of_section_3():
    """Uniform full attention: u_i = W xbar. One token: the flow is Oja's P(x) W x. The l2 layer map with alpha -> oo
    tends to x_i <- u_i / |u_i|, u_i = W sum_j a_ij x_j: the power method W x / |W x| for n = 1 only (the docs said
    'the power method' for any n: for 4 tokens apart the limit differs from W x_i / |W x_i| by 0.2 here)."""
    rng = np.random.default_rng(8)
    d = 3
    W = rng.normal(size=(d, d))
    X = unit(rng, (4, d))
    uni = af.SelfAttention(af.Heads.single(W), af.Attention("uniform"), 1.0)
    close(uni(jnp.asarray(X)), np.tile(W @ X.mean(0), (4, 1)), np.float64)
    sa = af.SelfAttention(af.Heads.single(W, Q=rng.normal(size=(d, d))), af.Attention("softmax"), 1.0)
    x = X[:1]
    close(af.SphereFlow(sa).vf(0.0, jnp.asarray(x)), ref_tangent(x, x @ W.T), np.float64)
    big = af.LayerMap(sa, 1e9)
    out = np.asarray(big.step(0, jnp.asarray(X)))
    U = ref_drift(X, {"Q": np.asarray(sa.heads.Q), "K": np.eye(d)[None], "V": W[None], "O": np.eye(d)[None]}, 1.0)
    np.testing.assert_allclose(out, U / np.linalg.norm(U, axis=1, keepdims=True), atol=1e-8)
    power = X @ W.T / np.linalg.norm(X @ W.T, axis=1, keepdims=True)
    assert np.max(np.abs(out - power)) > 0.05
    np.testing.assert_allclose(big.step(0, jnp.asarray(x)), power[:1], atol=1e-8)


def test_non_finite_weights_are_refused():
    """NaN or inf weights used to be accepted: every simulated member then came back 'nonfinite', with no reason."""
    rng = np.random.default_rng(9)
    P = params(rng, 2, 3, 2, bias=True)
    for name in ("Q", "K", "V", "O", "bq", "bv", "bo"):
        bad = dict(P)
        bad[name] = P[name].copy()
        bad[name].flat[1] = np.nan if name != "O" else np.inf
        with pytest.raises(ValueError, match=f"{name} has non-finite entries"):
            heads(bad)
    with pytest.raises(ValueError, match="V has non-finite entries"):
        af.Heads.single(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_transformer_block_alpha_and_local_measures_refuse_what_they_cannot_compute():
    """A TransformerBlock took any alpha: 0, NaN and arrays (which broadcast over coordinates) without a word, as the
    layer map did before. critical_shock iterated a LayerStack past its last layer (JAX clamps the index: the last
    layer repeated) and renormalised a layernorm map's tokens onto the unit sphere; both are refused now."""
    from attnflow.analysis.basins import critical_shock, local_basin_radius
    from attnflow.model.transformer import TransformerBlock

    attn = af.SelfAttention(af.Heads.single(np.diag([1.0, 0.5, -0.3])), af.Attention("softmax"), 1.0)
    norms = dict(norm_in=af.NoNorm(), norm_attn=af.L2Norm(), norm_ffn=af.NoNorm(), norm_out=af.L2Norm(), ffn=None)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            TransformerBlock(attn=attn, alpha=bad, **norms)
    X = np.tile([1.0, 0.0, 0.0], (3, 1))
    with pytest.raises(ValueError, match="alpha"):
        TransformerBlock(attn=attn, alpha=np.array([1.0, 2.0, 3.0]), **norms).step(0, jnp.asarray(X))
    m = af.LayerMap(attn, 0.5)
    stack = af.LayerStack.from_layers([m, m])
    key = jax.random.PRNGKey(0)
    with pytest.raises(TypeError, match="autonomous"):
        critical_shock(stack, jnp.asarray(X), key, steps=5, iters=1, candidates=2)
    ln = af.LayerMap(attn, 0.5, norm=af.LayerNorm())
    with pytest.raises(ValueError, match="unit spheres"):
        critical_shock(ln, jnp.asarray(X), key, steps=5, iters=1, candidates=2)
    with pytest.raises(ValueError, match="unit spheres"):
        local_basin_radius(ln, jnp.asarray(X), key, budget=af.Budget(max_steps=5))
