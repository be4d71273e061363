"""Autodiff stability against docs/model.md's closed forms, finite differences and simulations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import equilibria as eq, stability as st

import references as ref

TOL64 = 1e-10

def model_with_W(rng, W, H, kind="softmax", beta=0.7):
    d = W.shape[0]
    if H == 1:
        heads = af.Heads.single(W, Q=rng.normal(size=(d, d)), K=rng.normal(size=(d, d)))
    else:
        Vs = rng.normal(size=(H, d, d))
        Os = np.stack([W @ np.linalg.inv(Vs[h]) / H for h in range(H)])
        heads = af.Heads(Q=rng.normal(size=(H, d, d)), K=rng.normal(size=(H, d, d)), V=Vs, O=Os)
    return af.SelfAttention(heads, af.Attention(kind), beta)


@pytest.mark.parametrize("H", [1, 2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_consensus_spectra_match_closed_forms(H, symmetric, time):
    rng = np.random.default_rng(H + 10 * symmetric)
    d, n = 3, 4
    S = np.linalg.qr(rng.normal(size=(d, d)))[0] if symmetric else rng.normal(size=(d, d))
    W = S @ np.diag([1.0, 0.4, -0.3]) @ np.linalg.inv(S)
    attn = model_with_W(rng, W, H)
    np.testing.assert_allclose(attn.heads.layer_matrix(), W, atol=1e-12)
    dyn, alpha = (af.LayerMap(attn, 0.3), 0.3) if time == "discrete" else (af.SphereFlow(attn), None)
    X = jnp.stack([eq.consensus(dyn, k, n, s) for k in range(d) for s in (1, -1)])
    stab = st.analyse(dyn, X)
    for i, (k, s) in enumerate([(k, s) for k in range(d) for s in (1, -1)]):
        cf = st.consensus_closed_form(dyn, k, n, alpha=alpha)
        np.testing.assert_allclose(np.sort_complex(stab.eigenvalues[i]), np.sort_complex(cf), atol=TOL64)
        assert stab.residual[i] < 1e-14
        # consensus on v_1 (index 0) is the only stable consensus
        assert bool(stab.stable[i]) == (k == 0)


def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(3)
    attn = model_with_W(rng, rng.normal(size=(3, 3)), 2)
    X = af.sample.sphere(jax.random.PRNGKey(0), (5, 3))
    for dyn in (af.LayerMap(attn, 0.2), af.SphereFlow(attn)):
        J = np.asarray(st.extrinsic_jacobian(dyn, X))
        f = (lambda Z: dyn.step(0, Z)) if isinstance(dyn, af.LayerMap) else (lambda Z: dyn.vf(0.0, Z))
        h, x = 1e-6, np.asarray(X).ravel()
        fd = np.stack([(np.asarray(f(jnp.asarray(x + h * e).reshape(5, 3))) - np.asarray(f(jnp.asarray(x - h * e).reshape(5, 3)))).ravel() / (2 * h) for e in np.eye(15)], axis=1)
        np.testing.assert_allclose(J, fd, atol=1e-8)
        # intrinsic Jacobian = the tangent restriction: B^T J B with orthonormal tangent bases
        B = np.asarray(st.tangent_basis(X))
        np.testing.assert_allclose(np.einsum("nda,nd->na", B, np.asarray(X)), 0, atol=1e-14)
        np.testing.assert_allclose(np.einsum("nda,ndb->nab", B, B), np.broadcast_to(np.eye(2), (5, 2, 2)), atol=1e-14)


def test_stable_bipartite_small_perturbation_returns_large_escapes():
    """[PM Thm 3]: a locally stable bipartite consensus (single head, symmetric V, M = V, beta = 1)."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    n = 6
    Xb = eq.bipartite(dyn, 0, 3, n)
    assert bool(st.analyse(dyn, Xb[None]).stable[0])
    small = af.sample.perturb_ball(jax.random.PRNGKey(1), Xb, 0.05, 16)
    sol = af.simulate(dyn, small, steps=3000)
    np.testing.assert_allclose(np.abs(np.asarray(sol.final) @ np.array([1.0, 0, 0])), 1.0, atol=1e-6)
    assert np.all(np.max(np.abs(np.asarray(sol.final) - np.asarray(Xb)), axis=(1, 2)) < 1e-6)
    large = af.sample.perturb_ball(jax.random.PRNGKey(2), Xb, 3.0, 32)
    fin = np.asarray(af.simulate(dyn, large, steps=3000).final)
    c = fin @ np.array([1.0, 0, 0])
    consensus = np.all(c > 1 - 1e-6, axis=1) | np.all(c < -1 + 1e-6, axis=1)
    assert consensus.any()  # some large perturbations escape to consensus on +-v_1


def test_saddle_flag_and_dwell():
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    X = jnp.stack([eq.consensus(V, 0, 4), eq.consensus(V, 1, 4)])
    saddle, dwell, stab = st.saddle_flags(dyn, X, distance=1e-8)
    assert list(saddle) == [False, True]
    assert np.isinf(dwell[0]) and dwell[1] == pytest.approx(np.log(1e8) / np.log(stab.measure[1]))


def test_dwell_estimate_matches_simulation():
    """Saddle (consensus on v_2 of the map): the linear estimate log(1/eps)/log(rho) vs the simulated escape."""
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    X = eq.consensus(V, 1, 4)
    saddle, dwell, stab = st.saddle_flags(dyn, X[None], distance=1e-6)
    assert saddle[0] and stab.measure[0] == pytest.approx(1.1 / 1.05, abs=1e-12)
    measured = st.measured_dwell(dyn, X, distance=1e-6, steps=600)
    assert 0.85 * dwell[0] < measured < 1.1 * dwell[0]
    # a stable state never escapes
    assert np.isinf(st.measured_dwell(dyn, eq.consensus(V, 0, 4), distance=1e-3, steps=200))


def test_verdicts_are_an_enumeration_with_int_codes():
    """Verdict codes stay ints (0 stable, 1 unstable, 2 neutral, 3 unknown) for array use; names, items and JSON
    records come from the Verdict enumeration. The case: discrete map, V = diag(1, 0.4, -0.3), M = I (closed forms of
    docs/model.md section 5: consensus on v_1 stable, on v_2, v_3 unstable); a rotation-invariant W = I gives
    neutral directions."""
    assert (st.STABLE, st.UNSTABLE, st.NEUTRAL, st.UNKNOWN) == (0, 1, 2, 3)
    assert st.VERDICTS == ("stable", "unstable", "neutral", "unknown")
    assert [st.verdict_name(c) for c in range(4)] == list(st.VERDICTS) and af.Verdict is st.Verdict
    assert "rho < 1" in st.Verdict[st.Verdict.stable]
    V = np.diag([1.0, 0.4, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    stab = st.analyse(dyn, jnp.stack([eq.consensus(dyn, k, 4) for k in range(3)]))
    assert list(stab.verdict) == [0, 1, 1] and list(stab.verdict_names) == ["stable", "unstable", "unstable"]
    assert np.array_equal(np.asarray(stab.result == st.Verdict.unstable), [False, True, True])
    rec = stab.to_json(0)
    cf = st.consensus_closed_form(dyn, 0, 4, alpha=0.1)
    assert rec["verdict"] == "stable" and rec["spectral_radius"] == pytest.approx(np.abs(cf).max(), abs=1e-12)
    assert rec["neutral"] == 0 and rec["unstable_directions"] == 0 and rec["residual"] < 1e-14
    assert st.analyse(dyn, eq.consensus(dyn, 1, 4)[None]).to_json(0)["unstable_directions"] == int(np.sum(np.abs(st.consensus_closed_form(dyn, 1, 4, alpha=0.1)) > 1 + 1e-8))
    iso = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(3)), af.Attention("softmax"), 1.0))
    s_iso = st.analyse(iso, eq.bipartite(iso, 0, 2, 4)[None])
    assert s_iso.measure_name == "max Re" and s_iso.neutral[0] > 0 and s_iso.verdict_names[0] in ("neutral", "unstable")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_neutral_directions_survive_float32(dtype):
    """W = I (rotation symmetry): consensus has the closed-form eigenvalue (1 + alpha)/(1 + alpha) = 1 with
    multiplicity d - 1 = 2 (docs/model.md section 5), i.e. neutral, in float32 as in float64; the tolerance is the
    one of attnflow.analysis.eigen for the dtype, 1e-8 or 1e-4 (float32 rounds rho to 0.99999994, which tol = 1e-8
    would call stable)."""
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(np.eye(3)).astype(dtype), af.Attention("softmax"), 1.0), 0.1)
    X = jnp.stack([eq.consensus(dyn, 0, 4), eq.bipartite(dyn, 0, 2, 4)]).astype(dtype)
    stab = st.analyse(dyn, X)
    cf = st.consensus_closed_form(np.eye(3), 0, 4, alpha=0.1)
    assert int(np.sum(np.abs(np.abs(cf) - 1) < 1e-12)) == 2
    assert list(stab.verdict_names) == ["neutral", "unstable"] and stab.neutral[0] == 2
    assert stab.tol == (1e-8 if dtype == "float64" else 1e-4)


def test_one_eigenvalue_tolerance_per_dtype():
    """attnflow.analysis.eigen: 10^floor(log10 sqrt(eps)) per dtype; real / simple / verdicts use it; a non-finite
    spectrum is 'unknown', never an exception (reference: the definitions, by hand)."""
    from attnflow.analysis import eigen

    assert (eigen.tolerance(np.float64), eigen.tolerance(np.float32), eigen.tolerance(np.float16)) == (1e-8, 1e-4, 1e-2)
    lam = np.array([2.0 + 1e-9j, 2.0 - 1e-9j, 1.0 + 0.5j, 1.0 + 5e-5j])
    assert eigen.is_real(lam).tolist() == [True, True, False, False]
    assert eigen.is_real(lam, dtype=np.float32).tolist() == [True, True, False, True]
    assert eigen.is_simple(np.array([1.0, 1.0 + 1e-10, 2.0])).tolist() == [False, False, True]
    m, v, n0, nu = eigen.verdicts(np.array([[0.5, 1.0 + 5e-9, 0.9], [1.2, 0.1, 0.1], [np.nan, 0.1, 0.2]]), True)
    assert [eigen.VERDICTS[c] for c in v] == ["neutral", "unstable", "unknown"]
    assert n0.tolist() == [1, 0, 0] and nu.tolist() == [0, 1, 0] and np.isnan(m[2])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1e30, 1.0, 0.5]).astype(np.float32)), af.Attention("softmax"),
                                       1.0), 0.1)
    s = st.analyse(dyn, eq.consensus(dyn, 0, 3)[None].astype(np.float32))
    assert list(s.verdict_names) in (["unknown"], ["stable"], ["unstable"])  # an overflow is data, never a traceback


# ------------------------------------------------------------------------------------------------------------------
# docs/model.md section 4: when the drift at consensus / bipartite consensus is parallel to the tokens, against the
# plain NumPy drift of references.py (float64; its loops share no code with attnflow).

BETA = 0.7


def _random_heads(seed: int = 0, H: int = 2, d: int = 3):
    """Q, K, V, O (H, d, d) with independent N(0, 1) entries: W_h v_k is not parallel to v_k."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(H, d, d)) for _ in range(4)]


def _principal(Wh):
    """v_1 (unit) and lambda_1 of W = sum_h W_h, by NumPy; the principal eigenvalue must be real."""
    lam, vecs = np.linalg.eig(Wh.sum(0))
    k = int(np.argmax(lam.real))
    assert lam[k].imag == 0
    v = np.real(vecs[:, k])
    return v / np.linalg.norm(v), float(lam[k].real)


def _np_attention(X, Q, K, kind, mask="full", **kw):
    """The per-head attention matrices (H, n, n) of plain NumPy."""
    return np.stack([ref.attention_matrix(BETA * (X @ Q[h].T) @ (X @ K[h].T).T, kind, mask, **kw) for h in range(len(Q))])


def _tangent(U, v):
    """|P(v) u_i| per token."""
    return np.linalg.norm(U - np.outer(U @ v, v), axis=1)


@pytest.mark.parametrize("mask", ["full", "causal"])
@pytest.mark.parametrize("kind", ["softmax", "uniform", "sinkhorn", "unnormalized", "relu"])
def test_consensus_drift_is_parallel_when_the_heads_row_sums_agree(kind, mask):
    """u_i = sum_h c_{h,i} W_h v with c_{h,i} the row sums; the tangent part is (c_{1,i} - c_{2,i}) P W_1 v for two
    heads: zero for the row-stochastic kernels, nonzero for unnormalized and relu heads (then consensus on v_1 is no
    equilibrium: the flow's residual is that tangent part, and the map moves the tokens)."""
    Q, K, V, O = _random_heads()
    Wh = O @ V
    v, lam1 = _principal(Wh)
    X = np.tile(v, (5, 1))
    U = ref.drift(X, Q, K, V, O, BETA, kind=kind, mask=mask)
    c = _np_attention(X, Q, K, kind, mask).sum(-1)  # (H, n) row sums
    np.testing.assert_allclose(U, np.einsum("hi,hd->id", c, Wh @ v), rtol=1e-12, atol=1e-13)
    attn = af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind, mask), BETA)
    np.testing.assert_allclose(np.asarray(attn(jnp.asarray(X))), U, rtol=1e-12, atol=1e-13)
    tang = _tangent(U, v)
    flow_res = np.asarray(eq.residual(af.SphereFlow(attn), jnp.asarray(X)))
    np.testing.assert_allclose(np.linalg.norm(flow_res, axis=1), tang, atol=1e-13)
    map_res = np.abs(np.asarray(eq.residual(af.LayerMap(attn, 0.1), jnp.asarray(X)))).max()
    if kind in ("softmax", "uniform", "sinkhorn"):
        np.testing.assert_allclose(c, 1.0, atol=1e-14)
        assert tang.max() < 1e-14 and map_res < 1e-14
        return
    PW1v = Wh[0] @ v - (v @ Wh[0] @ v) * v
    np.testing.assert_allclose(tang, np.abs(c[0] - c[1]) * np.linalg.norm(PW1v), rtol=1e-12)
    assert tang.min() > 0.05 and map_res > 1e-3
    if mask == "full":  # the numbers docs/model.md section 4 quotes
        assert tang.max() == pytest.approx({"unnormalized": 0.4854, "relu": 0.4210}[kind], abs=1e-4)


@pytest.mark.parametrize("kind", ["unnormalized", "relu", "relu_normalize"])
def test_consensus_drift_parallel_cases_beyond_row_stochastic(kind):
    """The cases of docs/model.md section 4 where consensus on v_1 is an equilibrium for any kernel: one head; v_1 an
    eigenvector of every W_h (W_h = W / H); equal q_h = v^T M_h v (a shared score matrix). Row-normalised relu is
    row-stochastic only while every q_h > 0: a head with q_h < 0 has zero rows and breaks it."""
    kw = {"relu_normalize": True} if kind == "relu_normalize" else {}
    kind = "relu" if kind == "relu_normalize" else kind
    Q, K, V, O = _random_heads()
    v, _ = _principal(O @ V)
    M = np.einsum("hed,hef->hdf", Q, K)
    Q = Q * np.sign(np.einsum("d,hde,e->h", v, M, v))[:, None, None]  # both q_h > 0
    W = (O @ V).sum(0)
    cases = {
        "one head": (Q[:1], K[:1], V[:1], O[:1]),
        "W_h = W / H": (Q, K, V, np.stack([W @ np.linalg.inv(V[h]) / 2 for h in range(2)])),
        "shared score matrix": (np.stack([Q[0], Q[0]]), np.stack([K[0], K[0]]), V, O),
    }
    for what, (q, k, vv, o) in cases.items():
        u_axis, _ = _principal(o @ vv)
        X = np.tile(u_axis, (5, 1))
        assert _tangent(ref.drift(X, q, k, vv, o, BETA, kind=kind, **kw), u_axis).max() < 1e-13, what
    X = np.tile(v, (5, 1))
    if kw:  # row-normalised relu, both q_h > 0: row sums 1; then flip one head's q_h below 0
        assert _tangent(ref.drift(X, Q, K, V, O, BETA, kind=kind, **kw), v).max() < 1e-13
        Qf = np.stack([Q[0], -Q[1]])
        np.testing.assert_allclose(_np_attention(X, Qf, K, kind, **kw).sum(-1), [[1.0] * 5, [0.0] * 5], atol=1e-14)
        assert _tangent(ref.drift(X, Qf, K, V, O, BETA, kind=kind, **kw), v).min() > 0.05
    else:
        assert _tangent(ref.drift(X, Q, K, V, O, BETA, kind=kind), v).min() > 0.05


def test_bipartite_drift_needs_equal_signed_sums_across_heads():
    """At x_i = sigma_i v: u_i = sum_h b_{h,i} W_h v, b_{h,i} = sum_j a^h_ij sigma_j. Row-stochastic is not enough:
    for softmax b_{h,i} depends on q_h (closed form of docs/model.md section 4). Uniform attention, or W_h = W / H,
    keeps u_i on the axis."""
    Q, K, V, O = _random_heads()
    Wh = O @ V
    v, _ = _principal(Wh)
    n, m = 5, 2
    sigma = np.array([1.0] * m + [-1.0] * (n - m))
    X = sigma[:, None] * v
    q = np.einsum("d,hde,e->h", v, np.einsum("hed,hef->hdf", Q, K), v)
    b = _np_attention(X, Q, K, "softmax") @ sigma  # (H, n)
    e, f = np.exp(BETA * q), np.exp(-BETA * q)
    np.testing.assert_allclose(b[:, 0], (m * e - (n - m) * f) / (m * e + (n - m) * f), rtol=1e-13)
    np.testing.assert_allclose(b[:, -1], (m * f - (n - m) * e) / (m * f + (n - m) * e), rtol=1e-13)
    U = ref.drift(X, Q, K, V, O, BETA, kind="softmax")
    np.testing.assert_allclose(U, np.einsum("hi,hd->id", b, Wh @ v), rtol=1e-12, atol=1e-13)
    tang = _tangent(U, v)
    assert tang.max() == pytest.approx(0.4187, abs=1e-4) and tang.min() > 0.1  # quoted in docs/model.md section 4
    assert _tangent(ref.drift(X, Q, K, V, O, BETA, kind="uniform"), v).max() < 1e-13
    Os = np.stack([Wh.sum(0) @ np.linalg.inv(V[h]) / 2 for h in range(2)])
    assert _tangent(ref.drift(X, Q, K, V, Os, BETA, kind="softmax"), v).max() < 1e-13


def test_off_axis_consensus_of_two_unnormalized_heads():
    """The consensus set is invariant under the full mask, and every token follows x <- N(x + alpha sum_h c_h(x) W_h x)
    with c_h(x) = exp(beta x^T M_h x): its fixed point (plain NumPy iteration from v_1) is an equilibrium of attnflow's
    map off every eigenvector axis, while consensus on v_1 itself is not one (docs/model.md section 4)."""
    Q, K, V, O = _random_heads()
    Wh, M, alpha = O @ V, np.einsum("hed,hef->hdf", Q, K), 0.1
    v, _ = _principal(Wh)
    x = v.copy()
    for _ in range(2000):
        y = x + alpha * sum(np.exp(BETA * x @ M[h] @ x) * Wh[h] @ x for h in range(2))
        y /= np.linalg.norm(y)
        if np.max(np.abs(y - x)) < 1e-15:
            break
        x = y
    dyn = af.LayerMap(af.SelfAttention(af.Heads(Q, K, V, O), af.Attention("unnormalized"), BETA), alpha)
    assert np.abs(np.asarray(eq.residual(dyn, jnp.asarray(np.tile(x, (5, 1)))))).max() < 1e-13
    assert np.abs(np.asarray(eq.residual(dyn, jnp.asarray(np.tile(v, (5, 1)))))).max() > 1e-3
    lam, vecs = np.linalg.eig(Wh.sum(0))
    cos = np.abs(np.real(vecs).T @ x) / np.linalg.norm(np.real(vecs), axis=0)
    assert cos.max() < 1 - 1e-4  # on no eigenvector axis (cos with v_1: 0.9989)


# ------------------------------------------------------------------------------------------------------------------
# docs/model.md section 5: the spectrum at consensus for any mask, from the attention matrix A_0 at consensus.

def _intrinsic_fd(f, X, B, h=1e-6):
    """B^T J B by central differences of a plain NumPy map or vector field f (tangent perturbations)."""
    n, d = X.shape
    cols = []
    for j in range(n):
        for a in range(d - 1):
            E = np.zeros((n, d))
            E[j] = B[j][:, a] * h
            D = (f(X + E) - f(X - E)) / (2 * h)
            cols.append(np.concatenate([B[i].T @ D[i] for i in range(n)]))
    return np.stack(cols, axis=1)


MASKED = [("softmax", "causal", None, "float64"), ("softmax", "window", 2, "float64"), ("sinkhorn", "causal", None, "float64"),
          ("sinkhorn", "window", 2, "float64"), ("sinkhorn", "full", None, "float64"), ("relu_normalize", "causal", None, "float64"),
          ("sinkhorn", "causal", None, "float32")]


@pytest.mark.parametrize("kind,mask,window,dtype", MASKED)
def test_masked_consensus_spectrum_from_the_attention_at_consensus(kind, mask, window, dtype):
    """J_int = (I + alpha A_0 (x) W_perp) / (1 + alpha lambda_1) (map) and A_0 (x) W_perp - lambda_1 I (flow), with A_0
    the attention at consensus computed in plain NumPy from the mask; its eigenvalues nu are its diagonal (triangular),
    1/min(i, w) for softmax but not for sinkhorn. Against autodiff (float64: 1e-12; float32: 2e-5) and, in float64,
    against central differences of the NumPy map and vector field (1e-7). Two random heads (random O), d = 3, n = 5."""
    kw = {"relu_normalize": True} if kind == "relu_normalize" else {}
    kind = "relu" if kind == "relu_normalize" else kind
    Q, K, V, O = _random_heads()
    Wh = O @ V
    v, lam1 = _principal(Wh)
    q = np.einsum("d,hde,e->h", v, np.einsum("hed,hef->hdf", Q, K), v)
    Q = Q * np.sign(q)[:, None, None]  # every q_h > 0 (needed by row-normalised relu only)
    n, d, alpha = 5, 3, 0.3
    X = np.tile(v, (n, 1))
    A = _np_attention(X, Q, K, kind, mask, window=window, **kw)
    A0 = A[0]
    np.testing.assert_allclose(A[1], A0, atol=1e-15)  # the same for every head, and for any constant score:
    np.testing.assert_allclose(ref.attention_matrix(np.ones((n, n)), kind, mask, window, **kw), A0, atol=1e-15)
    nu = np.linalg.eigvals(A0)
    if mask != "full":  # lower triangular: the eigenvalues are the diagonal
        assert np.all(np.triu(A0, 1) == 0)
        np.testing.assert_allclose(np.sort(nu.real), np.sort(np.diag(A0)), atol=1e-15)
    naive = 1.0 / np.minimum(np.arange(1, n + 1), window or n) if mask != "full" else np.r_[1.0, np.zeros(n - 1)]
    if kind == "sinkhorn" and mask != "full":
        assert np.max(np.abs(np.diag(A0) - naive)) > 0.05  # not 1/i
    else:
        np.testing.assert_allclose(np.sort(nu.real), np.sort(naive), atol=1e-15)
    attn = af.SelfAttention(af.Heads(Q, K, V, O).astype(dtype), af.Attention(kind, mask, window, relu_normalize=bool(kw)), BETA)
    tol = 1e-12 if dtype == "float64" else 2e-5
    Xj = jnp.asarray(X, dtype)
    B = np.asarray(st.tangent_basis(Xj), np.float64)
    Wp = B[0].T @ Wh.sum(0) @ B[0]
    lam_others = np.linalg.eigvals(Wp)
    for dyn, f in ((af.LayerMap(attn, alpha), lambda Z: ref.layer_map(Z, 1, Q, K, V, O, BETA, alpha, kind=kind, mask=mask, window=window, **kw)[1]),
                   (af.SphereFlow(attn), lambda Z: ref.sphere_vf(Z, Q, K, V, O, BETA, kind=kind, mask=mask, window=window, **kw))):
        if isinstance(dyn, af.LayerMap):
            want = (np.eye(n * (d - 1)) + alpha * np.kron(A0, Wp)) / (1 + alpha * lam1)
            eigs = ((1 + alpha * np.outer(nu, lam_others)) / (1 + alpha * lam1)).ravel()
        else:
            want = np.kron(A0, Wp) - lam1 * np.eye(n * (d - 1))
            eigs = (np.outer(nu, lam_others) - lam1).ravel()
        Jint = np.asarray(st.jacobians(dyn, Xj[None])[0][0], np.float64)
        np.testing.assert_allclose(Jint, want, atol=tol * max(1.0, abs(lam1)))
        if dtype == "float64":
            np.testing.assert_allclose(_intrinsic_fd(f, X, B), want, atol=1e-7)
        if not (kind == "softmax" and mask == "window"):  # repeated nu there: defective, eigenvalues ill-conditioned
            got = np.linalg.eigvals(Jint)
            np.testing.assert_allclose(np.sort_complex(got), np.sort_complex(eigs), atol=(1e-11 if dtype == "float64" else 2e-5) * max(1.0, abs(lam1)))


def test_row_normalised_relu_closed_form_where_every_score_is_positive():
    """docs/model.md section 5 covers row-normalised relu when every q_h = beta <Q_h v_k, K_h v_k> > 0: the closed
    form against autodiff spectra of the map and the flow, two heads with positive definite score matrices (every
    q_h > 0 on every eigenvector), random V, O; d = 3, n = 5, float64, tolerance 1e-10."""
    rng = np.random.default_rng(3)
    H, d, n = 2, 3, 5
    Q = np.stack([np.linalg.cholesky((lambda A: A @ A.T + d * np.eye(d))(rng.normal(size=(d, d)))).T for _ in range(H)])
    V, O = rng.normal(size=(H, d, d)), rng.normal(size=(H, d, d))
    attn = af.SelfAttention(af.Heads(Q, Q, V, O), af.Attention("relu", relu_normalize=True), 0.7)
    lam = eq.eigenpairs(attn).values
    real = [k for k in range(d) if lam[k].imag == 0]
    checked = 0
    for dyn, alpha in ((af.LayerMap(attn, 0.1), 0.1), (af.SphereFlow(attn), None)):
        for k in real:
            if alpha is not None and 1 + alpha * lam[k].real <= 0:
                continue
            stab = st.analyse(dyn, eq.consensus(dyn, k, n)[None])
            assert stab.residual[0] < 1e-12
            cf = st.consensus_closed_form(dyn, k, n, alpha=alpha)
            np.testing.assert_allclose(np.sort_complex(stab.eigenvalues[0]), np.sort_complex(cf), atol=1e-10)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("kind", ["softmax", "sinkhorn"])
def test_full_mask_closed_form_with_random_output_matrices(kind):
    """The full-mask table of docs/model.md section 5 for two heads with random Q, K, V, O (so W_h v_k is not parallel
    to v_k), d = 4, n = 5: autodiff spectra of the map and the flow at consensus on every real eigenvector (the map
    only where 1 + alpha lambda_k > 0) against consensus_closed_form, float64."""
    Q, K, V, O = _random_heads(seed=5, d=4)
    attn = af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind), BETA)
    lam = eq.eigenpairs(attn).values
    real = [k for k in range(4) if lam[k].imag == 0]
    assert len(real) >= 2
    err = 0.0
    for dyn, alpha in ((af.LayerMap(attn, 0.1), 0.1), (af.SphereFlow(attn), None)):
        ks = [k for k in real if alpha is None or 1 + alpha * lam[k].real > 0]
        stab = st.analyse(dyn, jnp.stack([eq.consensus(dyn, k, 5) for k in ks]))
        assert np.all(stab.residual < 1e-13)
        for i, k in enumerate(ks):
            cf = st.consensus_closed_form(dyn, k, 5, alpha=alpha)
            err = max(err, np.max(np.abs(np.sort_complex(stab.eigenvalues[i]) - np.sort_complex(cf))))
    assert err < 1e-12


def test_step_size_threshold_against_an_alpha_scan_with_complex_eigenvalues():
    """docs/model.md section 5: alpha_max = min over |lambda_j| > lambda_1 of 2 (lambda_1 - Re lambda_j) /
    (|lambda_j|^2 - lambda_1^2), complex lambda_j included. W has eigenvalues 1, -0.5 +- 3i, -4 (non-normal): the
    complex pair bounds alpha at 3 / 8.25 = 0.3636, before the real -4 (2 / 3). A scan of alpha (autodiff spectra of
    the map at consensus on v_1 for 400 values in one call, and the closed form) changes from stable to unstable
    exactly there. A second W (1, 0.2 +- 0.5i, -3) has a complex pair inside |lambda| < lambda_1: only -3 bounds alpha."""
    rng = np.random.default_rng(7)
    S = rng.normal(size=(4, 4)) + 2 * np.eye(4)
    for pair, last, want in (([[-0.5, 3.0], [-3.0, -0.5]], -4.0, 3.0 / 8.25), ([[0.2, 0.5], [-0.5, 0.2]], -3.0, 1.0)):
        D = np.zeros((4, 4))
        D[0, 0], D[1:3, 1:3], D[3, 3] = 1.0, pair, last
        W = S @ D @ np.linalg.inv(S)
        thr = st.step_size_threshold(W)
        assert thr == pytest.approx(want, rel=1e-12)
        attn = af.SelfAttention(af.Heads.single(W, Q=rng.normal(size=(4, 4)), K=rng.normal(size=(4, 4))), af.Attention("softmax"), BETA)
        X = eq.consensus(attn, 0, 3)
        alphas = np.linspace(0.0025, 2 * want, 400)
        Jint = np.asarray(st.jacobians(af.LayerMap(attn, 0.1), X[None], alpha=alphas)[0][:, 0])
        rho = np.abs(np.linalg.eigvals(Jint)).max(-1)
        rho_cf = np.array([np.abs(st.consensus_closed_form(W, 0, 3, alpha=a)).max() for a in alphas])
        np.testing.assert_allclose(rho, rho_cf, atol=1e-12)
        stable = rho < 1
        first = int(np.argmin(stable))  # the first unstable alpha of the scan
        assert stable[:first].all() and not stable[first:].any()
        assert alphas[first - 1] < thr <= alphas[first]
    # it does not check lambda_1 > 0 (docs/model.md section 5): a finite bound where no alpha gives stability
    neg = np.diag([-1.0, -2.0, -3.0])
    assert st.step_size_threshold(neg) == pytest.approx(0.5)
    assert all(np.abs(st.consensus_closed_form(neg, 0, 3, alpha=a)).max() > 1 for a in (0.1, 0.25, 0.5, 0.9))


def test_a_window_masks_defective_spectrum_gives_the_exact_verdict():
    # consensus on v1 under a window of 2 (token i sees i - 1 and i): the intrinsic Jacobian is block lower
    # triangular, its diagonal blocks nu lambda_j - lambda_1 (nu = 1 for the first token, 1/2 for the others,
    # docs/model.md section 5), each repeated n - 1 times and defective. eigvals of the whole matrix lost almost all
    # digits (eps^(1/31) at n = 32) and called this stable state unstable: +0.005 against the exact -0.2245
    V = np.array([[-0.0913, -0.6131, 0.3246], [0.3971, -1.4652, 2.3869], [0.1896, -0.5093, -0.8940]])
    K = np.array([[-0.2595, 0.0318, 0.5952], [0.0056, 0.4839, -1.6100], [-0.7524, -1.0066, 0.1646]])
    lam = np.linalg.eigvals(V)
    k = int(np.argmax(lam.real))
    others = np.delete(lam, k)
    for n in (8, 32, 48):
        flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=K), af.Attention("uniform", mask="window", window=2),
                                              beta=1.0))
        st = af.analyse(flow, np.asarray(af.consensus(flow, k, n))[None])
        exact = max((nu * others - lam[k].real).real.max() for nu in (1.0, 0.5))
        assert st.verdict_names[0] == "stable" and abs(st.measure[0] - exact) < 1e-12, (n, st.measure[0], exact)


def test_block_eigvals_equal_numpys_on_any_dependency_structure():
    from scipy.sparse.csgraph import connected_components

    from attnflow.analysis.eigen import _components, block_eigvals

    rng = np.random.default_rng(0)
    for trial in range(200):
        g = int(rng.integers(1, 9))
        sizes = [int(c) for c in rng.integers(1, 4, g)]
        dep = rng.random((g, g)) < rng.random()
        np.fill_diagonal(dep, True)
        count, lab = connected_components(dep, directed=True, connection="strong")  # SciPy's components
        assert sorted(map(sorted, _components(dep))) == sorted(np.flatnonzero(lab == c).tolist() for c in range(count))
        st = np.concatenate([[0], np.cumsum(sizes)])
        J = rng.normal(size=(3, st[-1], st[-1]))
        for i in range(g):
            for j in range(g):
                if not dep[i, j]:
                    J[:, st[i]:st[i + 1], st[j]:st[j + 1]] = 0.0
        a, b = block_eigvals(J, sizes), np.linalg.eigvals(J)
        for x, y in zip(a, b):  # the same multiset of eigenvalues (well conditioned: random blocks)
            assert np.allclose(np.sort_complex(np.round(x, 8)), np.sort_complex(np.round(y, 8)), atol=1e-7), trial


def test_analyse_refuses_parameters_out_of_range_and_layer_stacks():
    V = np.array([[1.0, 0.5, 0.0], [0.0, 0.4, 0.3], [0.2, 0.0, -0.3]])
    fl = af.SphereFlow(af.SelfAttention(af.Heads.single(V), af.Attention("unnormalized"), beta=1.0))
    mp = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), beta=1.0), alpha=0.1)
    X = af.consensus(mp, 0, 3)[None]
    for kw in (dict(beta=[-1.0]), dict(beta=[0.0]), dict(beta=[1.0, np.nan])):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            st.analyse(fl, X, **kw)  # was analysed: 'unstable', max Re 1.94 at beta = -1
    for a in ([-0.5], [0.0]):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            st.analyse(mp, X, alpha=a)
    with pytest.raises(ValueError, match="a flow has none"):
        st.analyse(fl, X, alpha=[0.1])
    assert st.analyse(mp, X, beta=[0.5, 2.0], alpha=[0.1, 0.2]).verdict.shape == (2, 1)
    with pytest.raises(ValueError, match="same length"):
        st.analyse(mp, X, beta=[0.5, 2.0], alpha=[0.1])
    # a stack applies another map at each layer: it used to be analysed as its layer 0 alone
    L1 = af.LayerMap(af.SelfAttention(af.Heads.single(-3.0 * V), beta=1.0), alpha=0.1)
    with pytest.raises(TypeError, match="autonomous map"):
        st.analyse(af.LayerStack.from_layers([mp, L1]), X)
    with pytest.raises(TypeError, match="autonomous map"):
        st.analyse(af.LayerStack.from_layers([mp, L1, mp]), X)
    # equal layers are one map iterated (ALBERT's shared layer; a one-layer stack): analysed as that map
    one = st.analyse(mp, X)
    for layers in ([mp], [mp, mp, mp]):
        assert st.analyse(af.LayerStack.from_layers(layers), X).measure == pytest.approx(one.measure, abs=1e-12)


def test_bad_shapes_are_refused_by_name():
    from attnflow.analysis.classify import classify

    fl = af.SphereFlow(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.3])), beta=1.0))
    with pytest.raises(ValueError, match="d = 3"):
        classify(fl, np.ones((1, 4, 2)))
    with pytest.raises(ValueError, match="^Q must"):
        af.Heads.single(np.eye(3), Q=np.eye(2))
    with pytest.raises(ValueError, match="^K must"):
        af.Heads.single(np.eye(3), K=np.eye(2))
    assert classify(fl, np.array([[[1, 0, 0], [1, 0, 0], [-1, 0, 0]]])).names() == ["bipartite v1 2:1"]


def test_cli_stability_names_no_axis_after_a_repeated_eigenvalue(tmp_path, capsys):
    import json

    from attnflow.cli import main

    cfg = tmp_path / "rep.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]]\nbeta = 1.0\n[dynamics]\n'
                   'time = "discrete"\nalpha = 0.1\ntokens = 3\ndtype = "float64"\n')
    assert main(["--no-compile-cache", "stability", str(cfg), "--json"]) == 0
    names = [e["name"] for e in json.loads(capsys.readouterr().out)["equilibria"]]
    # lambda = 1 is double: its eigenvectors v1, v2 are arbitrary vectors of the plane, no axis (docs/model.md
    # section 10); the CLI called them "consensus +v1", "bipartite v2 2:1", where every other command says
    # "consensus (off-axis)" and "clustering 2:1 ..."
    assert not any(nm.startswith(("consensus +v1", "consensus -v1", "consensus +v2", "bipartite v1", "bipartite v2"))
                   for nm in names), names
    assert sum(nm.startswith("consensus (off-axis)") for nm in names) == 4
    assert {"consensus +v3", "consensus -v3", "bipartite v3 1:2", "bipartite v3 2:1"} <= set(names)
