"""The member pool (attnflow.evolve.pool): member by member it equals simulate run for the whole cap, whatever the
pool size, group, queue blocks, backend (xla, lanes, fused) or number of devices; the cap is exact; the adaptive
mode agrees with diffrax; bad input is refused.

Reference: :func:`attnflow.simulate` with ``steps=cap`` on the vmapped XLA path, and a plain NumPy loop. Tolerances:
float64, states to 1e-12 (lanes arithmetic is ordered differently), status and steps exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnflow as af
from attnflow.analysis import classify as cl
from attnflow.evolve import pool as S

V3 = np.diag([1.0, 0.5, -0.3])


def mapped(V=V3, alpha=0.1, dtype=np.float64):
    V = np.asarray(V, dtype)
    return af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha)


def run_all(dyn, x0, *, pool, block, cap, tol, dt=None, solver=None, backend="auto", group=8, then=None):
    """Every member of x0 through a pool, in queue blocks of `block`, then a drain; results by sample index."""
    n, d = x0.shape[1:]
    p = S.empty_pool(pool, n, d, x0.dtype)
    budget = af.Budget(max_steps=cap) if dt is None else af.Budget(t1=cap * dt, dt=dt, max_steps=cap)
    kw = dict(budget=budget, stop=af.Stop(tol), solver=solver, execution=af.Execution(backend=backend, group=group), then=then)
    outs = []
    for j in range(0, len(x0), block):
        q = np.zeros((block, n, d), x0.dtype)
        qi = np.full(block, -1, np.int32)
        m = min(block, len(x0) - j)
        q[:m], qi[:m] = x0[j : j + m], np.arange(j, j + m)
        p, r = S.advance_pool(dyn, p, q, qi, m, **kw)
        outs.append(r.valid())
    p, r = S.advance_pool(dyn, p, q, qi, 0, drain=True, **kw)
    outs.append(r.valid())
    assert p.occupied() == 0
    idx, fin, st, ns = (np.concatenate([o[i] for o in outs]) for i in range(4))
    order = np.argsort(idx)
    assert np.array_equal(idx[order], np.arange(len(x0))), "every member retired exactly once"
    return fin[order], st[order], ns[order]


def sphere(B, n=5, d=3, seed=0, dtype=np.float64):
    return np.array(af.sample.sphere(jax.random.PRNGKey(seed), (B, n, d), dtype=dtype))


@pytest.mark.parametrize("backend", ["xla", "lanes"])
def test_pool_equals_simulate_member_by_member(backend):
    """A map with members that converge early, hit the cap, and one NaN member (nonfinite at step 1)."""
    dyn, cap = mapped(), 300
    x0 = sphere(300)
    x0[7] = np.nan
    ref = af.simulate(dyn, x0, steps=cap, tol=1e-6, backend="xla")
    fin, st, ns = run_all(dyn, x0, pool=32, block=64, cap=cap, tol=1e-6, backend=backend)
    assert np.array_equal(st, np.asarray(ref.outcome)) and np.array_equal(ns, np.asarray(ref.steps))
    ok = np.isfinite(np.asarray(ref.final)).all(axis=(1, 2))
    np.testing.assert_allclose(fin[ok], np.asarray(ref.final)[ok], atol=1e-12)
    names = set(af.OUTCOMES[c] for c in st)
    assert {"converged", "not_converged", "nonfinite"} <= names  # the case covers all three
    assert ns.max() == cap and np.all(ns[st == af.OUTCOMES.index("not_converged")] == cap)


def test_pool_equals_simulate_for_a_flow_and_a_stack():
    """A sphere flow (RK4, tol divided by dt) on both backends (lanes: a loop over the four stages); a layer stack (per-layer weights: the step index is
    each member's own) on the vmapped path."""
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    x0 = sphere(48, seed=1)
    ref = af.simulate(flow, x0, t1=30.0, dt=0.1, tol=1e-6, backend="xla")
    for backend in ("xla", "lanes"):
        fin, st, ns = run_all(flow, x0, pool=16, block=24, cap=300, tol=1e-6, dt=0.1, backend=backend)
        assert np.array_equal(st, np.asarray(ref.outcome)) and np.array_equal(ns, np.asarray(ref.steps))
        np.testing.assert_allclose(fin, np.asarray(ref.final), atol=1e-12)
    rng = np.random.default_rng(0)
    stack = af.LayerStack.from_layers([mapped(np.diag(rng.uniform(-1, 1, 3)), alpha=0.3) for _ in range(6)])
    ref = af.simulate(stack, x0, backend="xla")  # (simulate refuses tol on a stack of different layers)
    fin, st, ns = run_all(stack, x0, pool=16, block=24, cap=6, tol=0.5, backend="xla")  # no early stop in a stack
    assert np.array_equal(st, np.asarray(ref.outcome)) and np.array_equal(ns, np.asarray(ref.steps))
    np.testing.assert_allclose(fin, np.asarray(ref.final), atol=1e-12)


def test_labels_in_the_same_call_and_degenerate_status():
    """`then` (a classifier) runs on the retired members; a float32 overflow that zeroes rows is 'degenerate'."""
    dyn = mapped(alpha=1e20, dtype=np.float32)
    x0 = sphere(20, dtype=np.float32)
    p = S.empty_pool(8, 5, 3, np.float32)
    p, r = S.advance_pool(dyn, p, x0, np.arange(20, dtype=np.int32), 20, budget=af.Budget(max_steps=50),
                          stop=af.Stop(1e-6), drain=True, then=cl.classifier(dyn))
    idx, fin, st, ns, labels = r.valid()
    assert sorted(idx) == list(range(20))
    assert all(af.OUTCOMES[c] == "degenerate" for c in st)
    assert np.all(cl.label_rows(labels)[:, 0] == af.OUTCOMES.index("degenerate"))
    assert set(labels.names()) == {"degenerate"}


def test_bad_input_is_refused():
    dyn = mapped()
    p = S.empty_pool(4, 5, 3, np.float64)
    x0 = sphere(6)
    kw = dict(budget=af.Budget(max_steps=10), stop=af.Stop(1e-6))
    with pytest.raises(ValueError, match="count"):
        S.advance_pool(dyn, p, x0, np.arange(6), 7, **kw)
    with pytest.raises(ValueError, match="holds states"):
        S.advance_pool(dyn, S.empty_pool(4, 4, 3, np.float64), x0, np.arange(6), 6, **kw)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    with pytest.raises(ValueError, match="'xla' or 'lanes'"):
        S.advance_pool(flow, p, x0, np.arange(6), 6, solver=af.Adaptive(), execution=af.Execution(backend="fused"), **kw)
    with pytest.raises(ValueError, match="t1 > 0 and dt"):
        S.advance_pool(flow, p, x0, np.arange(6), 6, **kw)
    with pytest.raises(ValueError, match="at least one slot"):
        S.empty_pool(0, 5, 3, np.float64)
    for bad in (dict(steps=0), dict(max_steps=2**31), dict(t1=1.0, dt=0.3), dict(steps=True), dict(t1=float("nan"))):
        with pytest.raises(ValueError):
            af.Budget(**bad)
    for bad in (dict(backend="gpu"), dict(group=0), dict(pool=-1), dict(process=(2, 2))):
        with pytest.raises(ValueError):
            af.Execution(**bad)
    with pytest.raises(ValueError, match="tol"):
        af.Stop(-1.0)


def test_fused_mode_equals_xla_member_by_member():
    """The fused backend as a mode of the pool (the unrolled step for `group` steps in one Pallas kernel, through the
    Pallas interpreter here): the same outcome, steps and states as the vmapped path, members that converge, hit
    the cap, and go non-finite included."""
    dyn = mapped(alpha=0.3)
    x0 = sphere(20, n=3, seed=5)
    x0[3] = np.nan
    a = run_all(dyn, x0, pool=8, block=10, cap=40, tol=1e-4, backend="xla", group=5)
    b = run_all(dyn, x0, pool=8, block=10, cap=40, tol=1e-4, backend="fused", group=5)
    assert {"converged", "not_converged", "nonfinite"} <= {af.OUTCOMES[c] for c in a[1]}
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    np.testing.assert_allclose(a[0], b[0], atol=1e-12)


def test_fused_group_kernel_lowers_to_triton_for_cuda():
    """The pool's fused kernel compiles for a GPU, with and without certified regions: lowered for the cuda platform
    without one (Triton IR)."""
    import jax.numpy as jnp

    from attnflow.evolve.backends.fused import fused_group
    from attnflow.evolve.pool import _Spec
    from attnflow.evolve.regions import Regions

    dyn = mapped(dtype=np.float32)
    spec = _Spec(tol=1e-6, group=8, continuous=False, backend="fused")
    X = jnp.zeros((15, 256), jnp.float32)
    st, ns, tg = jnp.zeros(256, jnp.int32), jnp.zeros(256, jnp.int32), jnp.full(256, -1, jnp.int32)
    reg = Regions(jnp.eye(3, dtype=jnp.float32)[:1], ((1e-4, -1.0, -1.0, -1.0, -1.0, 1e-4),), (0,))
    for regions in (None, reg):
        f = lambda X, st, ns, tg: fused_group(dyn, af.Iterate(), 1.0, 100, regions, spec, 5, 3, X, st, ns, None, None, tg,  # noqa: E731
                                              interpret=False)
        text = jax.jit(f).trace(X, st, ns, tg).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower() or "tt." in text


def test_certified_regions_on_every_mode():
    """A member that enters a certified region stops there as 'certified' with the region's tag, after the same
    number of steps on the xla, lanes and fused (interpreted) backends and in the adaptive mode's own test; `then`
    labels it by its region's equilibrium (as converged), every other member by its own final state."""
    import jax.numpy as jnp

    from attnflow.analysis.classify import classifier, label_rows
    from attnflow.evolve.regions import Regions, test_state

    dyn = mapped(alpha=0.3)
    x0 = sphere(16, n=3, seed=9)
    reg = Regions(jnp.eye(3)[:1], ((0.05, -1.0, -1.0, 0.05),), (0,))  # consensus on -e1 and +e1: |X - X*|^2 <= 0.05
    clf = classifier(dyn)
    outs = {}
    for backend in ("xla", "lanes", "fused"):
        p = S.empty_pool(8, 3, 3, np.float64)
        p, r = S.advance_pool(dyn, p, x0, np.arange(16, dtype=np.int32), 16, budget=af.Budget(max_steps=400),
                              stop=af.Stop(1e-9), execution=af.Execution(backend=backend, group=3), drain=True, regions=reg,
                              then=clf)
        idx, fin, oc, ns, labels = r.valid()
        order = np.argsort(idx)
        outs[backend] = (oc[order], ns[order], np.asarray(r.tag)[: len(idx)][order], fin[order], label_rows(labels)[order])
    oc, ns, tg, fin, rows = outs["xla"]
    cert = oc == af.OUTCOMES.index("certified")
    assert cert.sum() >= 4 and set(tg[cert]) <= {0, 3} and np.all(tg[~cert] == -1)
    for b in ("lanes", "fused"):
        assert np.array_equal(outs[b][0], oc) and np.array_equal(outs[b][1], ns) and np.array_equal(outs[b][2], tg)
        assert np.array_equal(outs[b][4], rows)
    e1 = np.array([1.0, 0.0, 0.0])
    expect = {0: label_rows(clf(jnp.asarray(np.tile(-e1, (1, 3, 1)))))[0], 3: label_rows(clf(jnp.asarray(np.tile(e1, (1, 3, 1)))))[0]}
    assert expect[0][0] == af.OUTCOMES.index("converged") and not np.array_equal(expect[0], expect[3])
    for r, t in zip(rows[cert], tg[cert]):
        assert np.array_equal(r, expect[int(t)])
    own = label_rows(clf(jnp.asarray(fin[~cert]), jnp.asarray(oc[~cert])))
    assert np.array_equal(rows[~cert], own)
    for X, t in zip(fin[cert], tg[cert]):  # in the region now, and its test agrees
        v = np.array([1.0, 0, 0]) * (1 if t == 3 else -1)
        assert np.sum((X - v) ** 2) <= 0.05
        h, tt = test_state(reg, jnp.asarray(X))
        assert bool(h) and int(tt) == t


def test_region_equilibria_are_the_certified_arrangements():
    """``equilibria`` gives, for tag ``tags[a] + m``, m tokens at +axes[a] then n - m at -axes[a] (two axes with
    tag bases that are not contiguous), and zeros for tag -1; the region test puts that arrangement in its own
    region."""
    import jax.numpy as jnp

    from attnflow.evolve.regions import Regions, equilibria, test_state

    n = 4
    axes = np.array([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    reg = Regions(axes, np.full((2, n + 1), 0.01), (0, 2 * (n + 1)))
    tags = np.array([0, 3, 4, 10, 12, 14, -1], np.int32)
    got = np.asarray(equilibria(reg, jnp.asarray(tags), n))
    for X, t in zip(got, tags):
        if t < 0:
            assert np.all(X == 0)
            continue
        a, m = (0, t) if t <= n else (1, t - 2 * (n + 1))
        want = np.array([axes[a]] * m + [-axes[a]] * (n - m))
        np.testing.assert_array_equal(X, want)
        hit, tt = test_state(reg, jnp.asarray(X))
        assert bool(hit) and int(tt) == t


def test_adaptive_mode_agrees_with_diffrax_member_by_member():
    """The adaptive mode (an embedded Tsit5 pair, a step size per member, projected onto the spheres after each
    accepted step) against diffrax's Tsit5 with tight tolerances, run to each member's own final time: states agree
    to 1e-5 (float64; the pool's rtol/atol are 1e-6/1e-8). Members stop at steady state max |f| < tol."""
    import diffrax

    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    x0 = sphere(8, n=4, seed=7)
    p = S.empty_pool(5, 4, 3, np.float64)
    kw = dict(budget=af.Budget(max_steps=30), stop=af.Stop(1e-9), solver=af.Adaptive())
    p, r = S.advance_pool(flow, p, x0, np.arange(8, dtype=np.int32), 8, drain=True, **kw)
    idx, fin, st, ns, _ = r.valid()
    times = np.asarray(r.time)[: len(idx)]
    assert sorted(idx) == list(range(8)) and np.all(ns == 30) and np.all(times > 1.0)
    term = diffrax.ODETerm(lambda t, y, a: flow.vf(t, y))
    solve = jax.jit(jax.vmap(lambda y0, t1: diffrax.diffeqsolve(
        term, diffrax.Tsit5(), 0.0, t1, None, y0, stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-13),
        max_steps=20_000).ys[-1]))
    np.testing.assert_allclose(fin, np.asarray(solve(x0[idx], times)), atol=1e-5)
    # run to steady state: every member converges, with max |f| < tol at its final state
    p, r = S.advance_pool(flow, S.empty_pool(5, 4, 3, np.float64), x0, np.arange(8, dtype=np.int32), 8, drain=True,
                          budget=af.Budget(max_steps=5000), stop=af.Stop(1e-6), solver=af.Adaptive())
    idx, fin, st, ns, _ = r.valid()
    assert all(af.OUTCOMES[c] == "converged" for c in st)
    for X in fin:
        assert np.max(np.abs(np.asarray(flow.vf(0.0, X)))) < 1e-6


def test_adaptive_lanes_equal_xla_member_by_member_float64():
    """The adaptive mode unrolled into lanes (the CPU default) and under vmap (xla) take the same accepted and rejected
    steps in float64: the same outcome and number of steps for every member, states equal to 1e-11 (the two order
    the same sums differently)."""
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    x0 = sphere(24, n=4, seed=5)
    out = {}
    for backend in ("xla", "lanes"):
        p = S.empty_pool(7, 4, 3, np.float64)
        p, r = S.advance_pool(flow, p, x0, np.arange(24, dtype=np.int32), 24, drain=True, budget=af.Budget(max_steps=400),
                              stop=af.Stop(1e-7), solver=af.Adaptive(), execution=af.Execution(backend=backend))
        idx, fin, st_, ns, _ = r.valid()
        o = np.argsort(idx)
        out[backend] = (fin[o], st_[o], ns[o])
    assert np.array_equal(out["xla"][1], out["lanes"][1]) and np.array_equal(out["xla"][2], out["lanes"][2])
    assert len(set(out["xla"][2].tolist())) > 3  # members really take different numbers of steps
    np.testing.assert_allclose(out["lanes"][0], out["xla"][0], atol=1e-11)


def test_adaptive_default_group_is_four_and_groups_do_not_change_members():
    """The adaptive pair's default group is 4 (its members stop after a few dozen attempts), fixed steps keep 8; the
    group is speed only: groups 1, 4 (the default) and 8 give every member the same outcome, steps and state."""
    from attnflow.evolve.pool import GROUP, GROUP_ADAPTIVE, default_group, make_spec

    assert (default_group(af.Adaptive()), default_group(af.RK4()), default_group(af.Iterate())) == (4, 8, 8)
    assert (GROUP_ADAPTIVE, GROUP) == (4, 8)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    span = af.Budget(max_steps=400).resolve(flow, True, study=True)
    assert make_spec(flow, af.Adaptive(), span, af.Stop(1e-7), af.Execution(), "lanes", 4, 3, np.float64).group == 4
    assert make_spec(flow, af.Adaptive(), span, af.Stop(1e-7), af.Execution(group=8), "lanes", 4, 3, np.float64).group == 8
    x0 = sphere(24, n=4, seed=5)
    out = []
    for group in (1, None, 8):
        p = S.empty_pool(7, 4, 3, np.float64)
        p, r = S.advance_pool(flow, p, x0, np.arange(24, dtype=np.int32), 24, drain=True, budget=af.Budget(max_steps=400),
                              stop=af.Stop(1e-7), solver=af.Adaptive(), execution=af.Execution(group=group))
        idx, fin, st_, ns, _ = r.valid()
        o = np.argsort(idx)
        out.append((fin[o], st_[o], ns[o]))
    for other in out[1:]:
        assert np.array_equal(other[1], out[0][1]) and np.array_equal(other[2], out[0][2])
        np.testing.assert_array_equal(other[0], out[0][0])


def test_adaptive_mode_of_a_time_dependent_flow_runs_under_vmap():
    """A flow whose vector field reads t is not unrolled into lanes (the lanes adaptive mode evaluates f at t = 0):
    "auto" takes xla, and backend='lanes' is refused in one line that says why."""
    from attnflow.evolve.pool import _adaptive_backend

    class Pulsed(af.SphereFlow):
        def vf(self, t, X):
            return super().vf(t, X) * (1.0 + 0.5 * jnp.sin(t))

    base = af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0)
    assert _adaptive_backend("auto", af.SphereFlow(base), (10, 4, 3), np.float64) == "lanes"
    assert _adaptive_backend("auto", Pulsed(base), (10, 4, 3), np.float64) == "xla"
    with pytest.raises(ValueError, match="depends on t"):
        _adaptive_backend("lanes", Pulsed(base), (10, 4, 3), np.float64)


@settings(max_examples=10)
@given(backend=st.sampled_from(["xla", "lanes"]), pool=st.sampled_from([3, 16]), group=st.sampled_from([1, 5]),
       block=st.sampled_from([7, 24]), N=st.integers(1, 40), cap=st.sampled_from([1, 9, 60]))
def test_property_every_mode_retires_each_member_once_with_simulates_outcome(backend, pool, group, block, N, cap):
    """Any backend, pool size, group, queue block, study size and cap (pools larger than the study, groups longer than
    the cap, ragged last blocks): each sample is retired exactly once, with simulate's outcome, steps and state."""
    dyn = mapped(alpha=0.3)
    x0 = sphere(40, n=3, seed=11)
    ref = af.simulate(dyn, x0, steps=cap, tol=1e-6, backend="xla")
    fin, st_, ns = run_all(dyn, x0[:N], pool=pool, block=block, cap=cap, tol=1e-6, group=group, backend=backend)
    assert np.array_equal(st_, np.asarray(ref.outcome)[:N]) and np.array_equal(ns, np.asarray(ref.steps)[:N])
    np.testing.assert_allclose(fin, np.asarray(ref.final)[:N], atol=1e-12)


@pytest.mark.parametrize("case", ["adaptive_lanes", "map_lanes", "map_xla"])
def test_float32_members_do_not_depend_on_the_pool_size(case):
    """A pool runs its slots in tiles of a fixed width (pool_tile), so in float32 too every member's outcome, steps
    and final state are the same bits for any pool size: one padded tile (37 slots) and two tiles with a padded last
    one. (Before: XLA rounded the step differently for different pool sizes, and 35-37% of
    the step counts of an adaptive study changed between pools.)"""
    from attnflow.evolve.pool import pool_tile

    V = np.diag([1.0, 0.4, -0.3]).astype(np.float32)
    attn = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    backend = case.split("_")[1]
    if case.startswith("adaptive"):
        dyn, solver, budget, stop, n = af.SphereFlow(attn), af.Adaptive(), af.Budget(t1=200.0), af.Stop(1e-6), 8
    else:
        dyn, solver, budget, stop, n = af.LayerMap(attn, 0.1), af.Iterate(), af.Budget(max_steps=1000), af.Stop(1e-6), 10
    tile = pool_tile(dyn, solver, backend, n, 3, np.float32)
    assert tile in (128, 256)
    x0 = np.asarray(af.sample.sphere(jax.random.PRNGKey(3), (150, n, 3), dtype=jnp.float32))
    out = {}
    for size in (37, tile + 44):  # one padded tile; two tiles, the last padded
        p = S.empty_pool(size, n, 3, np.float32)
        p, r = S.advance_pool(dyn, p, x0, np.arange(150, dtype=np.int32), 150, drain=True, budget=budget, stop=stop,
                              solver=solver, execution=af.Execution(backend=backend))
        idx, fin, st_, ns, _ = r.valid()
        o = np.argsort(idx)
        assert np.array_equal(idx[o], np.arange(150))
        out[size] = (fin[o], st_[o], ns[o])
    ref = out[37]
    assert len(set(ref[2].tolist())) > 10  # members take many different numbers of steps
    for size, got in out.items():
        for a, b in zip(got, ref):
            assert np.array_equal(a, b), (case, size)


def test_pool_tile_is_a_pure_function_of_the_model_not_the_machine(monkeypatch):
    """The tile: on lanes from the model's size and dtype for a fixed 2 MiB cache (the machine's L2 does not enter),
    128 on a CPU's xla backend, none on fused or on a GPU's xla backend (unmeasured there: the pool stays one
    program, as before)."""
    from attnflow.evolve import backends
    from attnflow.evolve.pool import pool_tile

    V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    toy = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    assert pool_tile(toy, af.Iterate(), "lanes", 10, 3, np.float32) == 256
    assert pool_tile(toy, af.Iterate(), "lanes", 10, 3, np.float64) == 128
    monkeypatch.setattr(backends, "l2_cache_bytes", lambda: 64 << 20)  # another machine: the same tile
    assert pool_tile(toy, af.Iterate(), "lanes", 10, 3, np.float32) == 256
    assert pool_tile(toy, af.Iterate(), "xla", 10, 3, np.float32) == S.XLA_TILE == 128
    assert pool_tile(toy, af.Iterate(), "fused", 10, 3, np.float32) == 0
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert pool_tile(toy, af.Iterate(), "xla", 10, 3, np.float32) == 0
