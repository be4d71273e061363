"""simulate() against independent references: NumPy loops, SciPy's solve_ivp, convergence orders."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import attnflow as af
from attnflow.evolve.outcome import CONVERGED, NONFINITE, NOT_CONVERGED
from attnflow.evolve.simulate import compiled_programs

import references as ref

RTOL64 = 1e-10  # float64, 100 steps


def unit(rng, shape):
    X = rng.normal(size=shape)
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


def heads(rng, H, d):
    if H == 1:
        V = rng.normal(size=(d, d)) * 0.6
        Q, K = rng.normal(size=(d, d)) * 0.6, rng.normal(size=(d, d)) * 0.6
        return Q[None], K[None], V[None], np.eye(d)[None]
    dh = 2
    return tuple(rng.normal(size=s) * 0.6 for s in [(H, dh, d), (H, dh, d), (H, dh, d), (H, d, dh)])


KINDS_SEED = ["softmax", "unnormalized", "uniform", "relu", "sinkhorn"]  # a deterministic seed per case (not hash())
MASKS_SEED = ["full", "causal"]
NORMS_SEED = ["l2", "layernorm", "none"]
CASES = [(k, m, "l2", H) for k in ["softmax", "unnormalized", "uniform", "relu", "sinkhorn"] for m in ["full", "causal"] for H in (1, 3)]
CASES += [("softmax", "full", nrm, H) for nrm in ["layernorm", "none"] for H in (1, 3)]


@pytest.mark.parametrize("kind,mask,norm,H", CASES)
def test_layer_map_matches_numpy_loop_100_steps(kind, mask, norm, H):
    rng = np.random.default_rng([KINDS_SEED.index(kind), MASKS_SEED.index(mask), NORMS_SEED.index(norm), H])
    n, d, alpha, beta = 4, 3, 0.05, 0.9
    Q, K, V, O = heads(rng, H, d)
    X0 = unit(rng, (2, n, d))
    dyn = af.LayerMap(af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind, mask), beta), alpha, af.model.make_norm(norm))
    sol = af.simulate(dyn, jnp.asarray(X0), steps=100, saves=4)
    for b in range(2):
        want = ref.layer_map(X0[b], 100, Q, K, V, O, beta, alpha, norm=norm, kind=kind, mask=mask)
        got = np.asarray(sol.trajectory[:, b])
        np.testing.assert_allclose(got, want[::25], rtol=RTOL64, atol=RTOL64)
    np.testing.assert_array_equal(sol.ts, [0, 25, 50, 75, 100])


def flow(H=1, d=3, kind="softmax", seed=0, beta=1.0):
    rng = np.random.default_rng(seed)
    Q, K, V, O = heads(rng, H, d)
    return af.SphereFlow(af.SelfAttention(af.Heads(Q, K, V, O), af.Attention(kind), beta)), (Q, K, V, O)


def test_sphere_flow_matches_scipy_and_keeps_norms():
    dyn, (Q, K, V, O) = flow(H=2, seed=1)
    rng = np.random.default_rng(2)
    X0 = unit(rng, (1, 5, 3))
    sol = af.simulate(dyn, jnp.asarray(X0), t1=2.0, dt=1e-3, saves=4)
    f = lambda t, y: ref.sphere_vf(y.reshape(5, 3), Q, K, V, O, 1.0).ravel()  # noqa: E731
    ivp = solve_ivp(f, (0, 2.0), X0[0].ravel(), t_eval=[0, 0.5, 1.0, 1.5, 2.0], rtol=1e-12, atol=1e-13, method="DOP853")
    np.testing.assert_allclose(np.asarray(sol.trajectory[:, 0]).reshape(5, -1), ivp.y.T, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sol.trajectory), axis=-1), 1.0, atol=1e-12)


def test_rk4_is_fourth_order_and_euler_first_order():
    dyn, _ = flow(H=1, seed=3)
    X0 = jnp.asarray(unit(np.random.default_rng(4), (1, 4, 3)))
    exact = af.simulate(dyn, X0, t1=1.0, dt=1 / 1024).final
    for solver, order in [(af.RK4(), 4), (af.Euler(), 1)]:
        errs = [float(jnp.max(jnp.abs(af.simulate(dyn, X0, t1=1.0, dt=dt, solver=solver).final - exact))) for dt in (1 / 8, 1 / 16, 1 / 32)]
        slopes = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert np.all(np.abs(slopes - order) < 0.35), (solver, errs, slopes)


def test_adaptive_matches_rk4():
    dyn, _ = flow(H=2, seed=5)
    X0 = jnp.asarray(unit(np.random.default_rng(6), (3, 5, 3)))
    a = af.simulate(dyn, X0, t1=3.0, solver=af.Adaptive(rtol=1e-10, atol=1e-12), saves=3)
    r = af.simulate(dyn, X0, t1=3.0, dt=1e-3, saves=3)
    np.testing.assert_allclose(a.trajectory, r.trajectory, atol=1e-8)
    assert np.all(np.asarray(a.outcome) == NOT_CONVERGED) and np.all(np.asarray(a.steps) > 0)
    conv = af.simulate(dyn, X0, t1=500.0, solver=af.Adaptive(), tol=1e-6, saves=5)
    assert np.all(np.asarray(conv.outcome) == CONVERGED)
    np.testing.assert_allclose(conv.trajectory[-1], conv.final)  # saves after the event repeat the final state
    # adaptive solves chunk and sweep like the fixed-step ones
    sw = af.sweep(dyn, X0, beta=[0.5, 1.0], t1=3.0, solver=af.Adaptive(rtol=1e-10, atol=1e-12), chunk_size=2)
    np.testing.assert_allclose(sw.final[1], a.final, atol=1e-8)
    np.testing.assert_allclose(sw.final[0], af.simulate(dyn.with_params(beta=0.5), X0, t1=3.0, solver=af.Adaptive(rtol=1e-10, atol=1e-12)).final, atol=1e-10)


def reduced_rhs(rho, n, beta, w, m):
    b = sum(wh * np.exp(beta * mh * rho) / (np.exp(beta * mh) + (n - 1) * np.exp(beta * mh * rho)) for wh, mh in zip(w, m))
    return 2 * (1 - rho) * (1 + (n - 1) * rho) * b


@pytest.mark.parametrize("w,m", [([1.0], [1.0]), ([0.7, 0.4], [2.0, -0.5])])
def test_equiangular_start_follows_reduced_ode(w, m):
    n, d, beta, rho0 = 4, 4, 1.3, -0.2
    H = len(w)
    eye = np.eye(d)
    hd = af.Heads(Q=np.stack([eye] * H), K=np.stack([mh * eye for mh in m]), V=np.stack([wh * eye for wh in w]), O=np.stack([eye] * H))
    dyn = af.SphereFlow(af.SelfAttention(hd, af.Attention("softmax"), beta))
    X0 = af.sample.equiangular(n, d, rho0, key=jax.random.PRNGKey(1))
    sol = af.simulate(dyn, X0[None], t1=2.0, dt=2e-3, saves=8)
    G = np.einsum("sid,sjd->sij", sol.trajectory[:, 0], sol.trajectory[:, 0])
    iu = np.triu_indices(n, 1)
    assert np.ptp(G[:, iu[0], iu[1]], axis=1).max() < 1e-10  # stays equiangular
    ivp = solve_ivp(lambda t, r: reduced_rhs(r, n, beta, w, m), (0, 2.0), [rho0], t_eval=sol.ts, rtol=1e-13, atol=1e-14, method="DOP853")
    np.testing.assert_allclose(G[:, 0, 1], ivp.y[0], atol=1e-9)


def test_no_recompilation_for_new_beta_alpha_values():
    V = np.diag([1.0, 0.4, -0.2])
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (8, 5, 3))
    base = af.LayerMap(af.SelfAttention(af.Heads.single(V), beta=1.0), alpha=0.1)
    af.sweep(base, x0, beta=[0.5, 1.0], alpha=[0.1, 0.2], steps=10)
    af.simulate(base, x0, steps=10)
    n0 = compiled_programs()
    af.sweep(base, x0, beta=[2.0, 3.0], alpha=[0.05, 0.3], steps=10)
    af.simulate(base.with_params(beta=4.0, alpha=0.7), x0, steps=10)
    af.simulate(af.LayerMap(af.SelfAttention(af.Heads.single(V), beta=2.5), alpha=0.3), x0, steps=10)
    assert compiled_programs() == n0


def test_sweep_equals_separate_runs():
    V = np.diag([1.0, 0.4, -0.2])
    x0 = af.sample.sphere(jax.random.PRNGKey(1), (4, 5, 3))
    base = af.LayerMap(af.SelfAttention(af.Heads.single(V)), alpha=0.1)
    s = af.sweep(base, x0, beta=[0.5, 2.0], steps=30, saves=3)
    assert s.trajectory.shape == (2, 4, 4, 5, 3)
    for i, b in enumerate([0.5, 2.0]):
        one = af.simulate(base.with_params(beta=b), x0, steps=30, saves=3)
        np.testing.assert_allclose(s.final[i], one.final, rtol=1e-13)
        np.testing.assert_allclose(s.trajectory[i], one.trajectory, rtol=1e-13)


def test_early_stop_status_and_nonfinite_as_data():
    V = np.diag([1.0, 0.4, -0.2])
    x0 = af.sample.sphere(jax.random.PRNGKey(2), (6, 5, 3))
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V)), alpha=0.5)
    sol = af.simulate(dyn, x0, steps=5000, tol=1e-9, saves=10)
    assert np.all(np.asarray(sol.outcome) == CONVERGED)
    assert np.all(np.asarray(sol.steps) < 5000)
    # the saved trajectory after convergence repeats the final state
    np.testing.assert_allclose(sol.trajectory[-1], sol.final)
    # too few steps: max_steps status, steps = budget
    short = af.simulate(dyn, x0, steps=3, tol=1e-12)
    assert np.all(np.asarray(short.outcome) == NOT_CONVERGED) and np.all(np.asarray(short.steps) == 3)
    # unnormalised kernel, no normalisation, large beta: overflow -> NONFINITE, last finite state kept
    blow = af.LayerMap(af.SelfAttention(af.Heads.single(5 * np.eye(3)), af.Attention("unnormalized"), 3.0), 1.0, af.NoNorm())
    mixed = jnp.concatenate([x0[:2] * 1e-3, x0[2:4]])
    s2 = af.simulate(blow, mixed, steps=50)
    assert np.all(np.asarray(s2.outcome)[2:] == NONFINITE)
    assert np.all(np.isfinite(np.asarray(s2.final)))


def test_chunked_equals_unchunked_and_progress():
    V = np.diag([1.0, 0.4, -0.2])
    x0 = af.sample.sphere(jax.random.PRNGKey(3), (10, 5, 3))
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V)), alpha=0.1)
    whole = af.simulate(dyn, x0, steps=40, saves=2, tol=1e-8)
    n0 = None
    for cs in (3, 4):
        part = af.simulate(dyn, x0, steps=40, saves=2, tol=1e-8, chunk_size=cs, progress=True)
        if n0 is None:
            n0 = compiled_programs()
        np.testing.assert_allclose(part.trajectory, whole.trajectory, rtol=1e-14)
        np.testing.assert_array_equal(part.outcome, whole.outcome)
        assert isinstance(part.final, np.ndarray)
    with pytest.raises(ValueError, match="chunk"):
        af.simulate(dyn, x0, steps=4, chunk_size=0)


def test_validation_messages():
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(np.eye(3))), alpha=0.1)
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (2, 3, 3))
    with pytest.raises(ValueError, match="steps="):
        af.simulate(dyn, x0)
    with pytest.raises(ValueError, match="saves=3 must divide"):
        af.simulate(dyn, x0, steps=10, saves=3)
    with pytest.raises(ValueError, match=r"\(batch, tokens, d\)"):
        af.simulate(dyn, x0[0], steps=2)
    with pytest.raises(ValueError, match="t1 > 0"):
        af.simulate(af.SphereFlow(dyn.attn), x0, dt=0.1)
    with pytest.raises(ValueError, match="flow"):
        af.simulate(af.SphereFlow(dyn.attn), x0, t1=1.0, dt=0.1, solver=af.Iterate())



def test_states_that_do_not_fit_the_model_are_one_line_errors():
    """Tokens of another d, a flow's states off its sphere and half-precision states are refused before any work by
    simulate and analyse; a map may start anywhere (its step normalises), and half-precision weights compute in
    float32 (as the weight loaders do)."""
    V = np.diag([1.0, 0.4, -0.3])
    sa = af.SelfAttention(af.Heads.single(V, K=V))
    flow, lmap = af.SphereFlow(sa), af.LayerMap(sa, alpha=0.1)
    x4 = af.sample.sphere(jax.random.PRNGKey(0), (2, 5, 4))
    x3 = af.sample.sphere(jax.random.PRNGKey(0), (2, 5, 3))
    for dyn, kw in [(flow, dict(t1=1.0, dt=0.1)), (lmap, dict(steps=3))]:
        with pytest.raises(ValueError, match=r"5 tokens in d = 4 do not fit this model"):
            af.simulate(dyn, x4, **kw)
        with pytest.raises(ValueError, match=r"5 tokens in d = 4 do not fit this model"):
            af.analyse(dyn, x4[0])
        with pytest.raises(ValueError, match="float32 or float64, got float16"):
            af.simulate(dyn, x3.astype(jnp.float16), **kw)
    with pytest.raises(ValueError, match=r"off this flow's state space by 2(.*)unit norm"):
        af.simulate(flow, 3.0 * x3, t1=1.0, dt=0.1)
    with pytest.raises(ValueError, match="off this flow's state space"):
        af.analyse(flow, 3.0 * x3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(af.simulate(lmap, 3.0 * x3, steps=2).final), axis=-1), 1.0,
                               rtol=1e-6)
    bad = np.asarray(x3).copy()
    bad[0, 0, 0] = np.nan  # a non-finite start stays a per-member outcome
    assert af.simulate(flow, bad, t1=1.0, dt=0.1).outcome_counts()["nonfinite"] == 1
    half = af.SphereFlow(af.SelfAttention(af.Heads.single(V.astype(np.float16), K=V.astype(np.float16))))
    assert half.attn.heads.V.dtype == jnp.float32
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        af.basins.Sphere(5, 3, "float16")


SHARD_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import attnflow as af
    assert jax.local_device_count() == 4, jax.devices()
    V = np.diag([1.0, 0.4, -0.2])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V)), alpha=0.1)
    x0 = af.sample.sphere(jax.random.PRNGKey(5), (10, 5, 3))
    sharded = af.simulate(dyn, x0, steps=50, tol=1e-9, saves=5)
    chunked = af.simulate(dyn, x0, steps=50, tol=1e-9, saves=5, chunk_size=6)
    single = af.simulate(dyn, x0, steps=50, tol=1e-9, saves=5, execution=af.Execution(devices=1))
    np.savez(sys.argv[1], sharded=np.asarray(sharded.trajectory), chunked=np.asarray(chunked.trajectory),
             single=np.asarray(single.trajectory), status=np.asarray(sharded.outcome), status1=np.asarray(single.outcome))
    """
)


def test_sharding_on_four_cpu_devices_matches_one(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "o.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    z = np.load(tmp_path / "o.npz")
    ref1 = af.simulate(
        af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.2]))), alpha=0.1),
        af.sample.sphere(jax.random.PRNGKey(5), (10, 5, 3)), steps=50, tol=1e-9, saves=5,
    )
    for k in ("sharded", "chunked", "single"):
        np.testing.assert_allclose(z[k], ref1.trajectory, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(z["status"], z["status1"])


def test_tolerance_floor_per_dtype_and_model():
    """A tol below what the dtype can resolve never fires: refused in one line naming the floor (one rounding of a
    unit coordinate per step: eps; divided by dt for a fixed-step flow; 4 eps |W| for the adaptive solver's |f|).
    A study's default is max(1e-7, 8 floor)."""
    from attnflow.evolve.options import check_tol, tol_floor

    V32 = np.diag([1.0, 0.4, -0.3]).astype(np.float32)
    att = af.SelfAttention(af.Heads.single(V32, K=V32), af.Attention("softmax"), 1.0)
    m, flow = af.LayerMap(att, 0.1), af.SphereFlow(att)
    eps32, eps64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
    assert tol_floor(m, None, None, np.float32)[0] == eps32 and tol_floor(m, None, None, np.float64)[0] == eps64
    assert tol_floor(flow, af.RK4(), 0.05, np.float32)[0] == pytest.approx(eps32 / 0.05)
    assert tol_floor(flow, af.Adaptive(), None, np.float32)[0] == pytest.approx(4 * eps32 * 1.0)
    assert check_tol(None, m, None, None, np.float32, study=True) == pytest.approx(8 * eps32)
    assert check_tol(None, m, None, None, np.float64, study=True) == 1e-7 and check_tol(None, m, None, None, np.float64) is None
    x0 = af.sample.sphere(jax.random.PRNGKey(0), (4, 5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"tol = 1e-07 is below 1.19e-07") as e:
        af.simulate(m, x0, steps=10, tol=1e-7)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="divided by dt = 0.05"):
        af.basin_fractions(flow, jax.random.PRNGKey(0), 4, tokens=5, budget=af.Budget(t1=1.0, dt=0.05), stop=af.Stop(1e-6))
    af.simulate(m, x0, steps=10, tol=2e-7)  # above the floor: runs


def test_a_stack_of_different_layers_refuses_an_early_stop():
    # a member whose change in one layer is below tol is no fixed point of the next layer: tol stopped the run after
    # layer 1 of 3 and reported it "converged" (token 0 at e1, against 0.986, 0.1665 after the three layers)
    W0 = np.diag([1.0, 0.4, -0.3])
    c, s = np.cos(0.7), np.sin(0.7)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    mk = lambda W: af.LayerMap(af.SelfAttention(af.Heads.single(W), af.Attention("softmax"), beta=1.0), alpha=1.0)  # noqa: E731
    x0 = np.zeros((1, 4, 3))
    x0[..., 0] = 1.0
    with pytest.raises(ValueError, match="runs exactly its layers"):
        af.simulate(af.LayerStack.from_layers([mk(W0), mk(W0), mk(R @ W0 @ R.T)]), x0, tol=1e-6)
    same = af.simulate(af.LayerStack.from_layers([mk(W0)] * 3), x0, tol=1e-6)  # equal layers: one map iterated
    assert int(same.outcome[0]) == CONVERGED


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_non_finite_start_is_one_members_outcome_and_costs_nothing(adaptive):
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.3])), af.Attention("softmax"), 1.0))
    x0 = np.asarray(af.basins.draw_samples(af.basins.Sphere(4, 3, "float64"), jax.random.PRNGKey(0), np.arange(4)))
    for bad in (np.nan, np.inf):  # inf refused the whole batch ("off this flow's state space by inf")
        x = x0.copy()
        x[1, 0, 0] = bad
        kw = dict(solver=af.Adaptive(), t1=50.0, tol=1e-6) if adaptive else dict(t1=5.0, dt=0.05)
        sol = af.simulate(flow, x, **kw)
        assert list(np.asarray(sol.outcome) == NONFINITE) == [False, True, False, False]
        if adaptive:  # it was retried to max_steps (100 000 steps, 8 s) while the others took 5-7
            assert int(sol.steps[1]) == 0
