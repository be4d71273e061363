"""Audit of docs/model.md section 9 (basins of attraction): certified balls against an independent NumPy reference.

The reference is a plain NumPy softmax drift (no attnflow code): u_i = sum_h O_h V_h sum_j a^h_ij x_j with
a^h_ij = softmax_j(beta <Q_h x_i, K_h x_j>), the layer map x_i <- (x_i + alpha u_i) / |x_i + alpha u_i|, its own
projected RK4 step, SciPy's ``solve_ivp`` for the sphere flow, and the naming oracle of tests/references.py. The
weights given to the reference are the model's own (rounded to the model's dtype, then float64), so both compute
the same model.

What a certificate claims (section 9, steps 3-5): every member on the spheres within the Euclidean radius of an
arrangement converges to a fixed point with that arrangement's name. Checked: (1) for heads whose drifts leave the
axis, the candidate is a fixed point only to 100 machine epsilons, and the fixed point the ball holds must lie in
it with the same name (the old code certified a float32 bipartite candidate 0.075 away from the equilibrium its
members reach, named ``polygonal 1:1 gram [2.0]`` when run to convergence, with a ball of radius 6.6e-5);
(2) members sampled in every certified ball (boundary included) of multi-head, Q != K, nonsymmetric-V models, maps
in float32 and RK4 flows in float64, reach a fixed point with the certificate's name under 3000 float64 NumPy steps.

Tolerances: fixed points to 1e-9 per step (float64 reference); names exactly equal (cluster tol 1e-3).
"""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import attnflow as af
from attnflow.analysis.basins import certify

from references import oracle_axes, oracle_name


def _drift(X, Q, K, V, O, beta):
    u = 0.0
    for h in range(Q.shape[0]):
        s = beta * (X @ Q[h].T) @ np.swapaxes(X @ K[h].T, -1, -2)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        u = u + (a @ (X @ V[h].T)) @ O[h].T
    return u


def _unit(X):
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def _tangent(X, P):
    u = _drift(X, *P)
    return u - np.sum(u * X, -1, keepdims=True) * X / np.sum(X * X, -1, keepdims=True)


def _map(X, P, alpha, steps):
    for _ in range(steps):
        X = _unit(X + alpha * _drift(X, *P))
    return X


def _rk4(X, P, dt, steps):
    for _ in range(steps):
        k1 = _tangent(X, P)
        k2 = _tangent(X + dt / 2 * k1, P)
        k3 = _tangent(X + dt / 2 * k2, P)
        k4 = _tangent(X + dt * k3, P)
        X = _unit(X + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
    return X


def _model(Q, K, V, O, beta, dtype):
    """The attnflow attention and the same weights for the reference (rounded to `dtype`, then float64)."""
    w = [np.asarray(a, dtype) for a in (Q, K, V, O)]
    att = af.SelfAttention(af.Heads(*w), af.Attention("softmax"), beta)
    return att, tuple(np.asarray(a, np.float64) for a in w) + (beta,)


def _cert_name(c, axes):
    """The name of a certificate's arrangement (its axis index counts the candidate axes only, not v1, v2, ...)."""
    name = oracle_name(c.X, axes, 1e-3)
    want = "consensus" if c.m in (0, len(c.X)) else "bipartite"
    assert name.startswith(want) and (want == "consensus" or name.endswith(f" {c.m}:{len(c.X) - c.m}")), name
    return name


@pytest.mark.parametrize("kind", ["map", "adaptive"])
def test_a_certified_ball_holds_the_fixed_point_it_names_when_the_heads_leave_the_axis(kind):
    """Two heads, W_h = W/2 +- E with E v1 orthogonal to v1 and score matrices diag(1 +- 0.1, 1, 1): the bipartite
    arrangement (v1, -v1) is not a fixed point, its drift has an off-axis part (c_1 - c_2) E v1. Scaled so that its
    residual is 1.1e-5 < 100 eps (float32) -- the map by alpha, the flow (adaptive solver: the certificate of the flow
    itself) by scaling the V_h -- it passes the fixed-point test. The equilibrium near it (SciPy, float64, on the
    unscaled flow, which has the same equilibria; fixed points of the layer map are the zeros of the tangent drift)
    is 0.075 away, named ``polygonal 1:1 gram [2.0]`` by section 10. A certified ball must hold the fixed point its
    members reach (within 1e-2 of X*, section 9 step 4) and give it X*'s name. Old code: the map's ball of radius
    6.6e-5 (S-radius 3.9e-3) and the flow's of radius 8.4e-3 were certified around (v1, -v1)."""
    W = np.diag([1.0, 0.5, -0.3])
    E = np.zeros((3, 3))
    E[1, 0] = 0.24
    Q = np.stack([np.eye(3)] * 2)
    K = np.stack([np.diag([1.1, 1.0, 1.0]), np.diag([0.9, 1.0, 1.0])])
    V = np.stack([W / 2 + E, W / 2 - E])
    O = np.stack([np.eye(3)] * 2)
    att, P = _model(Q, K, V, O, 1.0, np.float32)
    X0 = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    scale = 1.1e-5 / float(np.max(np.abs(_tangent(X0[None], P))))  # residual 1.1e-5 at X0 once scaled
    if kind == "map":
        certs = certify.certificates(af.LayerMap(att, scale), tokens=2, dtype=np.float32)
    else:
        slow, _ = _model(Q, K, V * scale, O, 1.0, np.float32)
        certs = certify.certificates(af.SphereFlow(slow), af.Adaptive(), tokens=2, dtype=np.float32)
    assert {(c.axis, c.m) for c in certs} >= {(0, 0), (0, 2)}  # the consensus of v1 (exact fixed points) stay
    axes = oracle_axes(P[2].sum(0))  # W = sum_h V_h (O_h = I)
    for c in certs:
        sol = solve_ivp(lambda t, y: _tangent(y.reshape(1, 2, 3), P).ravel(), (0.0, 400.0), c.X.ravel().astype(np.float64),
                        method="DOP853", rtol=1e-11, atol=1e-13)
        Xs = _unit(sol.y[:, -1].reshape(2, 3))
        assert np.max(np.abs(_tangent(Xs[None], P))) < 1e-9  # an equilibrium
        dist = float(np.linalg.norm(Xs - c.X))
        if kind == "map":  # a map's S >= I: the S-ball of radius R = radius sqrt(lambda_max(S)) holds the fixed point
            assert dist <= c.radius * np.sqrt(c.lyapunov), (c.axis, c.m, dist, c.radius * np.sqrt(c.lyapunov))
        assert dist <= certify.CENTRE_SHIFT, (c.axis, c.m, dist)
        assert oracle_name(Xs, axes, 1e-3) == _cert_name(c, axes), (c.axis, c.m, oracle_name(Xs, axes, 1e-3))


def _random_heads(rng, H, d):
    Q = np.stack([np.eye(d) + 0.4 * rng.normal(size=(d, d)) for _ in range(H)])
    K = np.stack([np.eye(d) + 0.4 * rng.normal(size=(d, d)) for _ in range(H)])
    T = np.eye(d) + 0.3 * rng.normal(size=(d, d))
    W = T @ np.diag(np.linspace(1.0, -0.3, d)) @ np.linalg.inv(T)  # real simple spectrum, nonsymmetric
    V = np.stack([W / H + 0.05 * rng.normal(size=(d, d)) for _ in range(H)])
    return Q, K, V, np.stack([np.eye(d)] * H)


@pytest.mark.parametrize("case", ["map-float32-2heads", "map-float32-1head", "rk4-float64-1head"])
def test_members_of_every_certified_ball_reach_its_name_under_numpy(case):
    """Soundness, member by member: points of each certified ball (uniform tangent directions and single-token
    displacements, at 0.8 to 1 of the radius, so the boundary is sampled) run 3000 float64 NumPy steps of the same
    map (or RK4 step) and end at a fixed point (step change < 1e-9) with the certificate's name. Two heads (Q != K,
    nonsymmetric V_h): consensus balls only (their bipartite arrangements are no fixed points); one head: bipartite
    balls too."""
    kind, dtype, heads = case.split("-")
    n, d, H, beta = {"2heads": (3, 3, 2, 1.5), "1head": (4, 3, 1, 3.0) if kind == "map" else (4, 2, 1, 3.0)}[heads]
    dtype = {"float32": np.float32, "float64": np.float64}[dtype]
    rng = np.random.default_rng(12)
    att, P = _model(*_random_heads(rng, H, d), beta, dtype)
    if kind == "map":
        certs = certify.certificates(af.LayerMap(att, 0.4), tokens=n, dtype=dtype)
        step = lambda X, k: _map(X, P, 0.4, k)  # noqa: E731
    else:
        certs = certify.certificates(af.SphereFlow(att), af.RK4(), 0.2, tokens=n, dtype=dtype)
        step = lambda X, k: _rk4(X, P, 0.2, k)  # noqa: E731
    assert {c.m for c in certs} >= ({0, n} if H > 1 else {0, 1, n})  # consensus (and bipartite) balls
    axes = oracle_axes(np.einsum("hij,hjk->ik", P[3], P[2]))
    for c in certs:
        U = rng.normal(size=(60, n, d))
        U[:20] *= (np.arange(n)[None, :, None] == rng.integers(0, n, 20)[:, None, None])  # one token displaced
        U -= np.sum(U * c.X, -1, keepdims=True) * c.X
        U /= np.linalg.norm(U, axis=(1, 2), keepdims=True)
        Y = _unit(c.X[None] + c.radius * rng.uniform(0.8, 1.0, (60, 1, 1)) * U)
        Y = Y[np.linalg.norm(Y - c.X[None], axis=(1, 2)) <= c.radius]
        assert len(Y) >= 40
        F = step(Y, 3000)
        assert np.max(np.abs(step(F, 1) - F)) < 1e-9
        names = {oracle_name(f, axes, 1e-3) for f in F}
        assert names == {_cert_name(c, axes)}, (case, c.axis, c.m, names)


def test_steps_median_is_numpys_median_of_the_members_steps(tmp_path):
    """`steps_median` of every attractor and category is numpy.median of its members' steps (per-sample table of
    the run directory): for an even count, the mean of the two middle values (the old code reported the upper one:
    4 members with steps [1, 2, 3, 4] gave 3, not 2.5). Exact equality."""
    import jax

    from attnflow.analysis.basins.tally import Tally
    from attnflow.io.results import RunDirWriter, read_members

    t = Tally(3)
    t.add(np.zeros((4, 1), np.int64), np.array([1, 2, 3, 4]))
    assert t.table[(0,)].median() == 2.5
    V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    with RunDirWriter(tmp_path / "r") as w:
        res = af.basin_fractions(dyn, jax.random.PRNGKey(5), 64, tokens=3, budget=af.Budget(max_steps=120),
                                 stop=af.Stop(certify=False), run_dir=w)
    m = read_members(tmp_path / "r")
    names, steps = np.asarray(m["name"]), np.asarray(m["steps"])
    assert res.categories and any(a.count % 2 == 0 for a in res.attractors + res.categories)
    for a in res.attractors + res.categories:
        assert a.steps_median == float(np.median(steps[names == a.name])), (a.name, a.steps_median)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ball_test_follows_the_euclidean_distance_for_small_radii(dtype):
    """The engine's region test (attnflow.evolve.regions: the array form of the pools, the per-state form of the
    adaptive solver, the row form of the Pallas kernel) against the float64 Euclidean distance of the same member to
    the nearest arrangement: inside at 0.9 r, outside at 1.1 r, for radii down to 1e-4 (the smallest certified balls,
    section 9). Old code: the distance was sum |x_i|^2 + 1 - 2 |<x_i, v>|, whose float32 cancellation (about 4 n eps)
    let members at 2.5 r in and kept members at 0.5 r out."""
    from attnflow.evolve.regions import Regions, test_rows, test_state

    rng = np.random.default_rng(7)
    n, d = 8, 3
    v = _unit(rng.standard_normal(d))
    w = _unit(rng.standard_normal(d))
    axes = np.stack([v, w])
    for r in (1e-4, 1e-3, 1e-2):
        for m in (0, 3, 8):
            radius2 = np.full((2, n + 1), -1.0)
            radius2[0, m] = r * r
            regions = Regions(axes.astype(dtype), radius2, (0, n + 1))
            X0 = np.where((np.arange(n) < m)[:, None], v, -v)
            for rho in (0.5, 0.9, 1.1, 1.5, 2.5):
                U = rng.standard_normal((200, n, d))
                U -= np.sum(U * X0, -1, keepdims=True) * X0  # tangent
                U *= rho * r / np.linalg.norm(U, axis=(1, 2), keepdims=True)
                X = _unit(X0 + U).astype(dtype)
                Xs = X.astype(np.float64)
                s = np.where(Xs @ v > 0, 1.0, -1.0)
                dist = np.sqrt(np.sum((Xs - s[..., None] * v) ** 2, axis=(1, 2)))  # float64, of the stored member
                plus = np.sum(s > 0, axis=1)
                want = (dist <= r) & (plus == m)
                rows = np.moveaxis(X, 0, -1).transpose(1, 0, 2).reshape(d * n, -1)  # row b n + i: coordinate b, token i
                hit, tag = test_rows(regions, rows, n, d)
                hit_t, _ = test_rows(regions, tuple(rows), n, d)
                hit_s = np.array([bool(test_state(regions, x)[0]) for x in X[:20]])
                sure = np.abs(dist / r - 1.0) > 0.05  # away from the boundary by more than rounding
                assert np.array_equal(np.asarray(hit)[sure], want[sure]), (dtype, r, m, rho)
                assert np.array_equal(np.asarray(hit_t)[sure], want[sure]), (dtype, r, m, rho)
                assert np.array_equal(hit_s[sure[:20]], want[:20][sure[:20]]), (dtype, r, m, rho)
                assert np.all(np.asarray(tag)[np.asarray(hit)] == m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_state_on_a_slow_manifold_gets_no_verdict_and_a_named_axis_gets_its_own(dtype):
    """W = diag(1, 0.99985, -0.3): a consensus 0.054 rad off v1 in the (v1, v2) plane moves at 8e-6 only (the gap
    is 1.5e-4): a study stops its members there, and in float32 the refinement (tolerance 1e-5) stayed put, so the
    row "consensus (off-axis)", no equilibrium, was called stable. One Newton step (8e-6 / 1.5e-4 = 0.054) shows the
    equilibrium is far: unknown. A row named "consensus +v1" from a member 0.03 rad off the axis (within the
    classifier's on-axis test) gets the verdict of +v1 (it was unknown: farther than MAX_SHIFT from the
    representative); a consensus of V = I (a continuum of equilibria) stays neutral."""
    from attnflow.analysis.basins.verify import newton_distance, verify_state

    def flow(v):
        return af.SphereFlow(af.SelfAttention(af.Heads.single(np.diag(v).astype(dtype)), af.Attention("softmax"), 1.0))

    def consensus(theta):
        return np.tile(np.array([np.cos(theta), np.sin(theta), 0.0], dtype), (4, 1))

    slow = flow([1.0, 0.99985, -0.3])
    assert newton_distance(slow, consensus(0.054)) == pytest.approx(0.054 * np.cos(0.054), rel=0.05)
    assert verify_state(slow, consensus(0.054)) == "unknown"
    v1 = np.array([1.0, 0.0, 0.0])
    assert verify_state(slow, consensus(0.0)) == "stable"
    assert verify_state(slow, consensus(0.03), axis=v1) == "stable"
    assert verify_state(flow([1.0, 1.0, 1.0]), consensus(0.7)) == "neutral"
