"""Certified balls (docs/model.md section 9, "Early decisions"): the Lyapunov metric against SciPy, the contraction
checked by applying the step map itself at random points of each ball (for the adaptive solver's certificates of the
flow: by a diffrax solve of the flow), and, member by member, the same names with certificates as without them (maps,
RK4 and adaptive flows, float32 and float64).

Tolerances: the Lyapunov solutions to 1e-9 relative (float64); contraction by the certified factor q1 = (1 + q0)/2 at
every sampled point (flows: by exp(mu0 t / 2) over t = 1, up to 1e-9 for the solve's error); names exactly equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import attnflow as af
from attnflow.analysis.basins import certify
from attnflow.io.results import RunDirWriter, read_members
from attnflow.model.norms import normalize_rows

V3 = np.diag([1.0, 0.5, -0.3])


def test_lyapunov_metric_against_scipy():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(12, 12))
    A *= 0.95 / np.max(np.abs(np.linalg.eigvals(A)))
    S = certify._lyapunov(A)
    ref = scipy.linalg.solve_discrete_lyapunov(A.T, np.eye(12))  # A^T S A - S + I = 0
    np.testing.assert_allclose(S, ref, rtol=1e-9, atol=1e-9)
    # |A|_S = sqrt(1 - 1/lambda_max(S)), the contraction of the linearisation in the Lyapunov metric
    w, U = np.linalg.eigh(S)
    half, half_inv = (U * np.sqrt(w)) @ U.T, (U / np.sqrt(w)) @ U.T
    assert np.linalg.norm(half @ A @ half_inv, 2) == pytest.approx(np.sqrt(1 - 1 / w.max()), rel=1e-9)


def test_continuous_lyapunov_metric_against_scipy():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(12, 12))
    A -= (np.max(np.linalg.eigvals(A).real) + 0.05) * np.eye(12)  # Hurwitz, slowest rate 0.05
    S = certify._lyapunov_continuous(A)
    ref = scipy.linalg.solve_continuous_lyapunov(A.T, -np.eye(12))  # A^T S + S A = -I
    np.testing.assert_allclose(S, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
    # the log-norm of A in the S-metric is -1 / (2 lambda_max(S))
    w, U = np.linalg.eigh(S)
    half, half_inv = (U * np.sqrt(w)) @ U.T, (U / np.sqrt(w)) @ U.T
    B = half @ A @ half_inv
    assert np.linalg.eigvalsh(0.5 * (B + B.T)).max() == pytest.approx(-0.5 / w.max(), rel=1e-9)


def test_certified_balls_of_a_flow_contract_along_the_flow():
    """The adaptive solver's certificates are those of the flow: every certified equilibrium is stable, and from
    random points of its ball (on the spheres) the exact flow (diffrax, rtol 1e-10) brings the distance to X* in the
    metric of A^T S + S A = -I (A and S recomputed here: jacfwd and SciPy) down by at least exp(mu0 t / 2)."""
    import diffrax

    dyn = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    n, d, T = 6, 3, 1.0
    certs = certify.certificates(dyn, af.Adaptive(), tokens=n, dtype=np.float64)
    got = {(c.axis, c.m) for c in certs}
    assert {(0, 0), (0, n)} <= got and all(c.continuous and c.q0 < 0 for c in certs)
    assert not any(a > 0 and m in (0, n) for a, m in got)  # consensus on v2, v3: unstable
    assert set(af.analyse(dyn, jnp.stack([jnp.asarray(c.X) for c in certs])).verdict_names) == {"stable"}
    term = diffrax.ODETerm(lambda t, y, a: dyn.vf(t, y))
    flow = jax.jit(jax.vmap(lambda y: diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, T, 0.01, y, stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12), max_steps=100_000).ys[-1]))
    rng = np.random.default_rng(4)
    for c in certs:
        fn = lambda z: dyn.vf(0.0, normalize_rows(z.reshape(n, d))).ravel()  # noqa: E731
        A0 = np.asarray(jax.jacfwd(fn)(jnp.asarray(c.X.ravel())))
        P = np.zeros((n * d, n * d))
        for i in range(n):
            P[i * d:(i + 1) * d, i * d:(i + 1) * d] = np.outer(c.X[i], c.X[i])
        A = A0 - np.max(np.abs(np.linalg.eigvals(A0))) * P
        S = scipy.linalg.solve_continuous_lyapunov(A.T, -np.eye(n * d))
        mu0 = -0.5 / np.linalg.eigvalsh(S).max()
        assert c.q0 == pytest.approx(mu0, rel=1e-6)
        u = rng.normal(size=(100, n, d))
        u *= (c.radius * rng.uniform(0.2, 1.0, size=(100, 1, 1))) / np.linalg.norm(u, axis=(1, 2), keepdims=True)
        Y = np.asarray(normalize_rows(jnp.asarray(c.X[None] + u)))
        Y = Y[np.linalg.norm(Y - c.X[None], axis=(1, 2)) <= c.radius]
        assert len(Y) > 50
        e0 = (Y - c.X[None]).reshape(len(Y), -1)
        e1 = (np.asarray(flow(jnp.asarray(Y))) - c.X[None]).reshape(len(Y), -1)
        r0 = np.sqrt(np.einsum("bi,ij,bj->b", e0, S, e0))
        r1 = np.sqrt(np.einsum("bi,ij,bj->b", e1, S, e1))
        assert np.all(r1 <= np.exp(0.5 * mu0 * T) * r0 + 1e-9), (c.axis, c.m, float(np.max(r1 / r0)), np.exp(0.5 * mu0 * T))


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)])
def test_certified_balls_contract_under_the_step_map(dtype):
    """Every certified equilibrium is stable; at random points Y of its Euclidean ball (on the spheres), one step of
    the map G itself (no Jacobian) brings Y closer in the Lyapunov metric by at least q1 = (1 + q0)/2."""
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V3.astype(dtype), K=V3.astype(dtype)), af.Attention("softmax"), 1.0), 0.1)
    n = 6
    certs = certify.certificates(dyn, tokens=n, dtype=dtype)
    got = {(c.axis, c.m) for c in certs}
    assert {(0, 0), (0, n)} <= got  # consensus on -v1 and +v1
    assert not any(a > 0 and m in (0, n) for a, m in got)  # consensus on v2, v3: unstable, never certified
    stab = af.analyse(dyn, jnp.stack([jnp.asarray(c.X, dtype) for c in certs]))
    assert set(stab.verdict_names) == {"stable"}
    rng = np.random.default_rng(1)
    G = jax.jit(jax.vmap(lambda X: dyn.step(0, X)))
    for c in certs:
        A = np.asarray(jax.jacfwd(lambda z: dyn.step(0, normalize_rows(z.reshape(n, 3))).ravel())(jnp.asarray(c.X.ravel(), dtype)), np.float64)
        S = certify._lyapunov(A)
        q1 = 0.5 * (1 + np.sqrt(1 - 1 / np.linalg.eigvalsh(S).max()))
        u = rng.normal(size=(200, n, 3))
        u *= (c.radius * rng.uniform(0.2, 1.0, size=(200, 1, 1))) / np.linalg.norm(u, axis=(1, 2), keepdims=True)
        Y = np.asarray(normalize_rows(jnp.asarray(c.X[None] + u)), np.float64)
        Y = Y[np.linalg.norm(Y - c.X[None], axis=(1, 2)) <= c.radius]  # on the spheres and in the ball
        assert len(Y) > 100
        e0 = (Y - c.X[None]).reshape(len(Y), -1)
        e1 = (np.asarray(G(jnp.asarray(Y, dtype)), np.float64) - c.X[None]).reshape(len(Y), -1)
        r0 = np.sqrt(np.einsum("bi,ij,bj->b", e0, S, e0))
        r1 = np.sqrt(np.einsum("bi,ij,bj->b", e1, S, e1))
        slack = 1e-5 if dtype == np.float32 else 1e-12  # rounding of G in float32
        assert np.all(r1 <= q1 * r0 + slack), (c.axis, c.m, float(np.max(r1 / r0)), q1)


def _names(tmp_path, tag, model, certify_, dtype, **kw):
    tol = 1e-6 if dtype == np.float64 or isinstance(model, af.LayerMap) else 4e-6  # float32 flow, dt = 0.1: floor 1.2e-6
    with RunDirWriter(tmp_path / tag) as w:
        res = af.basin_fractions(model, jax.random.PRNGKey(3), 240, tokens=6, stop=af.Stop(tol, certify=certify_),
                                 run_dir=w, execution=af.Execution(chunk=120), **kw)
    m = read_members(tmp_path / tag)
    return res, m["name"].tolist(), m["outcome"].tolist(), m["steps"]


@pytest.mark.parametrize("kind, dtype", [("map", np.float32), ("rk4", np.float64), ("adaptive", np.float32),
                                         pytest.param("adaptive", np.float64, marks=pytest.mark.slow),
                                         pytest.param("map", np.float64, marks=pytest.mark.slow),
                                         pytest.param("rk4", np.float32, marks=pytest.mark.slow)])
def test_certified_members_have_the_names_of_running_to_convergence(tmp_path, kind, dtype):
    """Member by member, a study with certificates names every member as the same study run to convergence, and
    decides members earlier (fewer steps on average)."""
    att = af.SelfAttention(af.Heads.single(V3.astype(dtype), K=V3.astype(dtype)), af.Attention("softmax"), 1.0)
    model, kw = {"map": (af.LayerMap(att, 0.1), dict(budget=af.Budget(max_steps=6000))),
                 "rk4": (af.SphereFlow(att), dict(budget=af.Budget(t1=20.0, dt=0.1, max_steps=6000))),
                 "adaptive": (af.SphereFlow(att), dict(solver=af.Adaptive()))}[kind]
    r1, n1, o1, s1 = _names(tmp_path, "cert", model, True, dtype, **kw)
    r0, n0, o0, s0 = _names(tmp_path, "conv", model, False, dtype, **kw)
    assert n1 == n0
    assert "certified" in o1 and "certified" not in o0
    assert s1.mean() < 0.9 * s0.mean(), (s1.mean(), s0.mean())
    assert [(a.name, a.count) for a in r1.attractors] == [(a.name, a.count) for a in r0.attractors]
    assert sum(a.certified for a in r1.attractors) == o1.count("certified")
    assert all(a.verdict == "stable" for a in r1.attractors if a.certified)  # the certificate proves it
    # a resume that reads every block back gives the same result, verdicts included (certified rows are marked stable
    # when their blocks are read)
    with RunDirWriter(tmp_path / "cert", resume=True) as w:
        again = af.basin_fractions(model, jax.random.PRNGKey(3), 240, tokens=6, run_dir=w,
                                   stop=af.Stop(r1.tol, certify=True), execution=af.Execution(chunk=120), **kw)
    key = lambda r: [(a.name, a.count, a.verdict, a.certified) for a in r.attractors]  # noqa: E731
    assert key(again) == key(r1)


def test_certificates_are_computed_only_where_they_pay(tmp_path):
    """Certificates cost about (n d)^3: a study computes them for small states, or when it has at least 20 (n d)^2
    samples; a small study of a larger state runs its members to convergence, with the same names."""
    from attnflow.analysis.basins.certify import worth_certifying

    assert worth_certifying(10, 10, 3) and worth_certifying(1, 8, 4)  # n d <= 32
    assert not worth_certifying(10**4, 20, 3) and worth_certifying(20 * 60**2, 20, 3)
    V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    out = {}
    for cert in (True, False):
        with RunDirWriter(tmp_path / str(cert)) as w:
            af.basin_fractions(dyn, jax.random.PRNGKey(1), 60, tokens=12, stop=af.Stop(1e-6, certify=cert), run_dir=w,
                               budget=af.Budget(max_steps=6000))
        out[cert] = read_members(tmp_path / str(cert))
    assert "certified" not in out[True]["outcome"].tolist()
    assert out[True]["name"].tolist() == out[False]["name"].tolist()
    np.testing.assert_array_equal(out[True]["steps"], out[False]["steps"])


def test_certificate_names_its_eigenvector_as_names_do():
    """`Certificate.v` is the eigenvector number of the names (v3 for the third eigenvector in eigenpairs order),
    while `axis` indexes the candidate axes (real simple eigenvectors only). For W = diag(2, 2, 1, -0.5), v1 and v2
    belong to a repeated eigenvalue and are no axes, so the candidate axes are v3 and v4; for W = diag(2, 0.5, 0.5, -1)
    they are v1 and v4, and the certified equilibria (on v1 only: a single symmetric head has no other stable ones)
    are named with v = 1."""
    from attnflow.analysis.classify import classify
    from attnflow.analysis.equilibria import eigenpairs

    def flow(diag):
        V = np.diag(diag)
        return af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=np.eye(4)), af.Attention("softmax"), 1.0))

    assert [k for k, _ in certify._candidates(flow([2.0, 2.0, 1.0, -0.5]), af.Adaptive())] == [2, 3]
    f = flow([2.0, 0.5, 0.5, -1.0])
    assert [k for k, _ in certify._candidates(f, af.Adaptive())] == [0, 3]
    certs = certify.certificates(f, af.Adaptive(), tokens=3, dtype=np.float64)
    assert certs and all(c.v == 1 and c.axis == 0 for c in certs)
    _, vecs = eigenpairs(f)
    for c in certs:
        u = np.real(vecs[:, c.v - 1])
        assert np.allclose(np.abs(c.X @ u), np.linalg.norm(u))  # every token at +-v_{c.v}
        name = classify(f, c.X[None]).names()[0]
        assert f"v{c.v}" in name, (name, c.v)
