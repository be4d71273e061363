"""Classifier and basin studies: invariances, paper results, resume after SIGKILL, sharding."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import attnflow as af
from attnflow.analysis import basins as bs, classify as cl, equilibria as eq
from attnflow.cli import main

V3 = np.diag([1.0, 0.5, -0.3])


def mapped(V, K=None, beta=1.0, alpha=0.1, heads=None):
    h = heads if heads is not None else af.Heads.single(V, K=K)
    return af.LayerMap(af.SelfAttention(h, af.Attention("softmax"), beta), alpha)


def test_classifier_labels_constructed_states():
    dyn = mapped(V3)
    n = 6
    states = jnp.stack([eq.consensus(dyn, 0, n), eq.consensus(dyn, 2, n, -1), eq.bipartite(dyn, 1, 2, n),
                        jnp.concatenate([eq.consensus(dyn, 0, 3), af.sample.sphere(jax.random.PRNGKey(0), (1, 3)).repeat(3, 0)])])
    L = jax.tree.map(np.asarray, cl.classify(dyn, states))
    assert L.kind.tolist() == [cl.CONSENSUS, cl.CONSENSUS, cl.BIPARTITE, cl.CLUSTERING]
    assert L.eigenvector.tolist() == [0, 2, 1, -1] and L.sign.tolist()[:3] == [1, -1, 1]
    assert L.split.tolist()[2] == 2 and L.clusters.tolist() == [1, 1, 2, 2]
    assert cl.describe(cl.label_rows(cl.classify(dyn, states))[2], n)["name"] == "bipartite v2 2:4"
    assert cl.classify(dyn, states).names()[:2] == ["consensus +v1", "consensus -v3"]
    nc = af.OUTCOMES.index("not_converged")
    rows = cl.label_rows(cl.classify(dyn, states, np.array([nc, nc, af.OUTCOMES.index("converged"), nc])))
    assert rows[0].tolist() == rows[3].tolist() == [nc] + [0] * (rows.shape[1] - 1)  # one not-converged class
    assert cl.classify(dyn, states, np.array([nc, 1, 1, 1])).names()[0] == "not converged"
    poly = cl.classify(mapped(V3), eq.polygonal(4, 3)[None])
    assert int(poly.kind[0]) == cl.POLYGONAL


@given(seed=st.integers(0, 1000))
def test_labels_invariant_under_token_permutation_and_rotation_symmetry(seed):
    rng = np.random.default_rng(seed)
    I = np.eye(3)
    dyn = mapped(I)
    # a two-cluster state of the rotation-symmetric model, and a rotated, permuted copy: one label
    X = np.asarray(eq.bipartite(V3, 0, 2, 5))
    R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    Y = (X @ R.T)[rng.permutation(5)]
    rows = cl.label_rows(cl.classify(dyn, jnp.asarray(np.stack([X, Y]))))
    np.testing.assert_array_equal(rows[0], rows[1])
    # token order never changes a label of an anisotropic model either
    Z = np.asarray(af.sample.sphere(jax.random.PRNGKey(seed), (5, 3)))
    rows = cl.label_rows(cl.classify(mapped(V3), jnp.asarray(np.stack([Z, Z[rng.permutation(5)]]))))
    np.testing.assert_array_equal(rows[0], rows[1])


def test_wilson_interval():
    lo, hi = bs.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert bs.wilson(0, 10)[0] == 0.0


def test_simultaneous_z_is_bonferronis_normal_quantile():
    """z_K = Phi^-1(1 - 0.05 / (2K)) against SciPy; bad K or level are refused."""
    from scipy.stats import norm

    for K in (1, 2, 3, 7, 50):
        assert bs.simultaneous_z(K) == pytest.approx(norm.ppf(1 - 0.05 / (2 * K)), abs=1e-12)
    assert bs.simultaneous_z(4, 0.9) == pytest.approx(norm.ppf(1 - 0.1 / 8), abs=1e-12)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            bs.simultaneous_z(bad)
    with pytest.raises(ValueError):
        bs.simultaneous_z(3, 1.0)


def axis_fraction(res, kinds=("consensus", "bipartite"), k=0):
    return res.union(lambda a: a.kind in kinds and a.eigenvector == k).fraction


def test_ss_dominant_positive_and_negative_definite():
    """[SS]: symmetric Q^T K = V; dominant positive eigenvalue -> every token on the v_1 axis; negative definite
    -> sign split on +-v_d (the last eigenvector, index d-1)."""
    N = 400
    pos = bs.basin_fractions(mapped(V3, K=V3), jax.random.PRNGKey(0), N, tokens=6, budget=af.Budget(steps=4000))
    assert axis_fraction(pos) == 1.0  # Wilson lower bound at 400/400: 0.990
    neg_V = np.diag([-0.2, -0.5, -1.0])
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(neg_V, K=neg_V), af.Attention("softmax"), 1.0))
    neg = bs.basin_fractions(flow, jax.random.PRNGKey(1), N, tokens=6, budget=af.Budget(t1=300.0, dt=0.05))
    split = neg.union(lambda a: a.kind == "bipartite" and a.eigenvector == 2).count
    assert split / N == 1.0, neg.to_json()


def test_pm_thm1_multihead_shared_weights_consensus():
    """[PM Thm 1]: several heads, shared weights, dominant real eigenvalue -> consensus on +-v_1."""
    rng = np.random.default_rng(0)
    H, d = 5, 3
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([V3 @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    heads = af.Heads(Q=rng.normal(size=(H, d, d)) / 2, K=rng.normal(size=(H, d, d)) / 2, V=Vs, O=Os)
    res = bs.basin_fractions(mapped(None, heads=heads), jax.random.PRNGKey(2), 300, tokens=10, budget=af.Budget(steps=4000),
                             execution=af.Execution(backend="xla"))  # five heads: the xla path compiles in a fraction of the time
    cons = res.union(lambda a: a.kind == "consensus" and a.eigenvector == 0).count
    assert cons / res.samples > 0.95, res.to_json()


def test_bipartite_basin_small_near_threshold_large_when_decoupled():
    """Near its stability threshold (beta_c = 0.5493 for this model, M = V) the bipartite point's local basin is
    far smaller than that of consensus on v_1; at beta = 2 (antipodal tokens decoupled) it is large.
    Measured: radius 0.41 at beta = 0.553 (1.007 beta_c), 0.75 at 0.56, 1.42 at 0.6, >= 2 (the cap) at 2.0;
    consensus >= 2 throughout."""
    kw = dict(q=0.9, samples=32, iters=5, budget=af.Budget(steps=20000), r_max=2.0)
    near = mapped(V3, K=V3, beta=0.553)
    lb = bs.local_basin_radius(near, eq.bipartite(near, 0, 3, 6), jax.random.PRNGKey(3), **kw)
    lc = bs.local_basin_radius(near, eq.consensus(near, 0, 6), jax.random.PRNGKey(3), **kw)
    far = mapped(V3, K=V3, beta=2.0)
    lf = bs.local_basin_radius(far, eq.bipartite(far, 0, 3, 6), jax.random.PRNGKey(3), **kw)
    print(f"local radii: bipartite near threshold {lb.radius}, consensus {lc}, bipartite decoupled {lf}")
    assert not lb.lower_bound and lb.radius <= 0.5 and lb.equilibrium == "bipartite v1 3:3"
    # recovery at the largest radius tried: only a lower bound is known, and it is reported as one
    for r, name in ((lc, "consensus +v1"), (lf, "bipartite v1 3:3")):
        assert r.lower_bound and r.radius is None and r.at_least == 2.0 and r.equilibrium == name
        assert "≥ 2" in r.line() and "tangent" in r.distance
        json.dumps(r.to_json(), allow_nan=False)


def test_critical_shock_escapes():
    dyn = mapped(V3, K=V3, beta=0.6)
    Xb = eq.bipartite(dyn, 0, 3, 6)
    cs = bs.critical_shock(dyn, Xb, jax.random.PRNGKey(4), steps=300, iters=20, r_max=2.0, candidates=32)
    assert cs.radius is not None and cs.radius <= cs.monte_carlo_radius + 1e-12
    assert cs.equilibrium == "bipartite v1 3:3" and not cs.lower_bound and "tangent" in cs.distance
    assert "an upper bound" in cs.line() and json.dumps(cs.to_json(), allow_nan=False)
    # no escape up to a tiny r_max from the stable consensus: a lower bound, reported as one
    lb = bs.critical_shock(dyn, eq.consensus(dyn, 0, 6), jax.random.PRNGKey(4), steps=20, iters=1, r_max=1e-3, candidates=4)
    assert lb.radius is None and lb.lower_bound and lb.at_least == 1e-3 and lb.equilibrium == "consensus +v1"
    assert "≥ 0.001" in lb.line()
    # the returned shock really leaves: its end state is far from the bipartite point
    Y = af.simulate(dyn, af.model.normalize_rows(Xb + cs.delta)[None], steps=3000).final[0]
    assert float(jnp.max(jnp.abs(Y - Xb))) > 0.1


CFG = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
K = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
alpha = 0.1
tokens = 6
steps = 2000
[basins]
samples = {samples}
chunk_size = {chunk}
"""


def _no_nan(name):
    raise AssertionError(f"{name} in JSON")


@pytest.mark.slow  # a subprocess killed and resumed: run by the second CI step (pytest -m slow)
def test_cli_json_shape_and_resume_after_sigkill(tmp_path, capsys):
    cfg = tmp_path / "b.toml"
    cfg.write_text(CFG.format(samples=3000, chunk=100))
    full = tmp_path / "full"
    assert main(["basins", str(cfg), "--out", str(full), "--json", "--no-progress"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert set(ref) >= {"samples", "unclassified", "not_converged", "attractors", "categories", "max_steps"} and ref["samples"] == 3000
    assert set(ref["attractors"][0]) >= {"name", "kind", "outcome", "eigenvector", "sign", "split", "fraction", "interval", "count", "verdict"}
    # one result file, strict JSON, equal to what was printed
    assert not (full / "summary.json").exists()
    assert json.loads((full / "result.json").read_text(), parse_constant=_no_nan) == ref
    # a second process, killed once some chunks are on disk, then resumed
    run = tmp_path / "killed"
    # --no-compile-cache: with the programs the first run cached, the whole study can end between two polls
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", "--no-compile-cache", "basins", str(cfg), "--out", str(run),
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 240:
        if len(list((run / "chunks").glob("*.parquet"))) >= 3 if (run / "chunks").exists() else False:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((run / "chunks").glob("*.parquet")))
    assert 3 <= done < 30, done
    assert main(["basins", str(cfg), "--out", str(run), "--resume", "--json", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed == ref
    assert main(["basins", str(cfg), "--out", str(run), "--json"]) == 2  # no --resume: refuses to overwrite
    assert "resume" in capsys.readouterr().err


SHARD = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    import attnflow as af
    from attnflow.analysis import basins as bs
    assert jax.local_device_count() == int(sys.argv[2])
    V = np.diag([1.0, 0.5, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    r = bs.basin_fractions(dyn, jax.random.PRNGKey(7), 300, tokens=6, budget=af.Budget(steps=2000), execution=af.Execution(chunk=100))
    json.dump(r.to_json(), open(sys.argv[1], "w"))
""")


@pytest.mark.slow  # two subprocesses: run by the second CI step (pytest -m slow)
def test_sharded_basins_equal_one_device(tmp_path):
    script = tmp_path / "s.py"
    outs = []
    for ndev, flags in [(4, "--xla_force_host_platform_device_count=4"), (1, "")]:
        script.write_text(SHARD if ndev == 4 else SHARD.replace('os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"', ""))
        env = {**os.environ, "XLA_FLAGS": flags}
        r = subprocess.run([sys.executable, str(script), str(tmp_path / f"{ndev}.json"), str(ndev)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads((tmp_path / f"{ndev}.json").read_text()))
    assert [(a["name"], a["count"]) for a in outs[0]["attractors"]] == [(a["name"], a["count"]) for a in outs[1]["attractors"]]


def test_process_split_merges_to_single_process(tmp_path):
    """Two 'processes' (process_index 0 and 1 of 2) fill one run directory; a resume merges them."""
    dyn = mapped(V3, K=V3)
    kw = dict(tokens=6, budget=af.Budget(steps=2000))
    ex = lambda **p: af.Execution(chunk=50, **p)  # noqa: E731
    single = bs.basin_fractions(dyn, jax.random.PRNGKey(5), 200, execution=ex(), **kw)
    run = tmp_path / "mh"
    af.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, execution=ex(process=(0, 2)), **kw)
    af.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, resume=True, execution=ex(process=(1, 2)), **kw)
    merged = af.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, resume=True, execution=ex(), **kw)
    assert merged.to_json() == single.to_json()


# ------------------------------------------------------------------------------------ the pooled study (issue 13)

def small(cap, chunk=20, certify=True, **ex):
    """The keyword arguments of a small study: 4 tokens, tol 1e-7, a cap, blocks of `chunk`."""
    return dict(tokens=4, stop=af.Stop(1e-7, certify=certify), budget=af.Budget(max_steps=cap),
                execution=af.Execution(chunk=chunk, **ex))


def _wilson_np(k, N, z=1.96):
    """Closed-form Wilson score interval, written out independently of attnflow."""
    p = k / N
    c = (p + z**2 / (2 * N)) / (1 + z**2 / N)
    h = z / (1 + z**2 / N) * np.sqrt(p * (1 - p) / N + z**2 / (4 * N**2))
    return max(0.0, c - h), min(1.0, c + h)


def _members(run):
    from attnflow.io.results import read_members

    m = read_members(run)
    return m["name"].tolist(), m["outcome"].tolist(), m["steps"].tolist()


def test_members_do_not_depend_on_pool_group_blocks_backend_or_resume(tmp_path):
    """Sample i comes from fold_in(key, i): every member's name, outcome and steps (the per-sample table of the run
    directory) are the same for any pool size, group, block size, backend (xla, lanes; float64) and after a resume,
    and equal simulating every sample alone for the whole cap (reference: simulate + classify, one by one; without
    certificates, which decide members before they converge: tests/test_certify.py)."""
    from attnflow.io.results import RunDirWriter

    dyn, key, N, cap = mapped(V3, K=V3), jax.random.PRNGKey(11), 40, 3000
    runs = {}
    for tag, kw in (("a", dict(pool=16, group=10)), ("b", dict(pool=64, group=1, chunk=13)), ("c", dict(pool=5, backend="lanes"))):
        chunk = kw.pop("chunk", 20)
        with RunDirWriter(tmp_path / tag, initial=tag == "a") as w:
            runs[tag] = bs.basin_fractions(dyn, key, N, run_dir=w, **small(cap, chunk, certify=False, **kw))
    assert runs["a"].max_steps == cap and runs["a"].to_json() == runs["b"].to_json()
    assert _members(tmp_path / "a") == _members(tmp_path / "b") == _members(tmp_path / "c")
    from attnflow.io.results import read_members

    init = read_members(tmp_path / "a")["initial"].reshape(N, 4, 3)
    names, outcomes, steps = _members(tmp_path / "a")
    for i in range(N):  # one by one, no pool: one simulate call of the whole cap per sample
        x0 = af.sample.sphere(jax.random.fold_in(key, i), (1, 4, 3))
        np.testing.assert_allclose(init[i], np.asarray(x0)[0], atol=1e-14)  # the table holds sample i
        sol = af.simulate(dyn, x0, steps=cap, tol=1e-7)
        assert (cl.classify(dyn, sol.final, sol.outcome).names()[0], af.OUTCOMES[int(sol.outcome[0])], int(sol.steps[0])) == (
            names[i], outcomes[i], steps[i])
    blocks = sorted((tmp_path / "a" / "chunks").glob("*.parquet"))
    assert len(blocks) == 2
    blocks[1].unlink()  # as if killed before block 1 was written
    with RunDirWriter(tmp_path / "a", resume=True, initial=True) as w:
        again = af.basin_fractions(dyn, key, N, run_dir=w, **small(cap, certify=False, pool=64))
    assert again.to_json() == runs["a"].to_json() and _members(tmp_path / "a") == (names, outcomes, steps)


def test_unclassified_members_widen_the_intervals_and_warn():
    """A short cap leaves members unclassified: each attractor's interval is [Wilson lower of k/N, Wilson upper of
    (k+u)/N] and contains the fraction a long-budget run of the same samples finds; one warning names max_steps.
    Unions of attractors get the same kind of interval."""
    dyn, key, N = mapped(V3, K=V3), jax.random.PRNGKey(12), 200
    short = bs.basin_fractions(dyn, key, N, **small(60, group=20))
    long = bs.basin_fractions(dyn, key, N, **small(20000))
    u = short.unclassified
    assert short.not_converged == u > 0 and long.unclassified == 0
    assert [c.name for c in short.categories] == ["not converged"] and short.categories[0].outcome == "not_converged"
    for a in short.attractors:
        lo, hi = _wilson_np(a.count, N)[0], _wilson_np(a.count + u, N)[1]
        assert a.interval == pytest.approx((lo, hi), abs=1e-12)
        assert a.sampling_interval == pytest.approx(_wilson_np(a.count, N), abs=1e-12)
    for b in long.attractors:
        a = next((x for x in short.attractors if x.name == b.name), None)
        lo, hi = a.interval if a is not None else (0.0, _wilson_np(u, N)[1])
        assert lo <= b.fraction <= hi, (b.name, b.fraction, lo, hi)
    assert short.warning is not None and "max_steps" in short.warning and short.lines()[-1] == short.warning
    assert long.warning is None
    # simultaneous intervals: the same formulas with z = Phi^-1(1 - 0.05 / (2K)), K attractors and categories (SciPy)
    from scipy.stats import norm

    zK = norm.ppf(1 - 0.05 / (2 * (len(short.attractors) + len(short.categories))))
    for a in short.attractors:
        want = (_wilson_np(a.count, N, zK)[0], _wilson_np(a.count + u, N, zK)[1])
        assert a.simultaneous_interval == pytest.approx(want, abs=1e-12)
        assert a.simultaneous_interval[0] <= a.interval[0] and a.simultaneous_interval[1] >= a.interval[1]
    for c in short.categories:
        assert c.simultaneous_interval == pytest.approx(_wilson_np(c.count, N, zK), abs=1e-12)
    assert short.to_json()["attractors"][0]["simultaneous_interval"] == list(short.attractors[0].simultaneous_interval)
    onv1 = short.union(lambda a: a.eigenvector == 0, name="on v1")
    k = sum(a.count for a in short.attractors if a.eigenvector == 0)
    assert onv1.count == k and onv1.interval == pytest.approx((_wilson_np(k, N)[0], _wilson_np(k + u, N)[1]), abs=1e-12)
    assert short.union([]).count == 0 and onv1.to_json()["members"] == {a.name: a.count for a in short.attractors if a.eigenvector == 0}
    with pytest.raises(ValueError, match="categories"):
        short.union(["not converged"])
    frame = short.to_frame()
    assert list(frame["name"]) == [a.name for a in short.attractors + short.categories]
    assert frame["count"].sum() == N and frame["lower"].tolist() == [a.interval[0] for a in short.attractors + short.categories]


def test_degenerate_members_are_failures_and_json_has_no_nan():
    """alpha = 1e20 in float32 overflows the normalisation: finite all-zero or non-finite states are failures,
    never an attractor, and the JSON holds no NaN."""
    V = np.diag([1.0, 0.4, -0.3]).astype(np.float32)
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 1e20)
    res = bs.basin_fractions(dyn, jax.random.PRNGKey(0), 32, tokens=4, budget=af.Budget(max_steps=50))
    assert res.attractors == () and res.unclassified == 32
    assert {c.kind for c in res.categories} <= {"degenerate", "nonfinite"}
    text = json.dumps(res.to_json(), allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=_no_nan)


def test_slow_passage_near_a_saddle_is_not_counted_as_an_attractor():
    """Starts 1e-9 from the bipartite point, unstable at beta = 0.3 (rho = 1.02): the per-step change is below tol
    at once, so counting labels of stopped members (as Attractors.jl does) puts them all in the basin of
    "bipartite v1 3:3". A long run without early stop shows they leave it; attnflow reports them as "saddle".
    At beta = 2 the same point is stable and stays an attractor."""
    N = 16
    for beta, unstable in ((0.3, True), (2.0, False)):
        dyn = mapped(V3, K=V3, beta=beta)
        Xb = eq.bipartite(dyn, 0, 3, 6)
        sampler = bs.Around(Xb, 1e-9)
        res = bs.basin_fractions(dyn, jax.random.PRNGKey(4), N, sampler=sampler, budget=af.Budget(steps=2000))
        x0 = bs.draw_samples(sampler, jax.random.PRNGKey(4), range(N))
        stopped = af.simulate(dyn, x0, steps=2000, tol=1e-7)
        naive = cl.classify(dyn, stopped.final, stopped.outcome).names()
        assert naive == ["bipartite v1 3:3"] * N and int(np.max(stopped.steps)) <= 2  # what label counting sees
        free = af.simulate(dyn, x0, steps=20000)  # no early stop: the reference
        left = [nm != "bipartite v1 3:3" for nm in cl.classify(dyn, free.final).names()]
        if unstable:
            assert all(left)
            assert res.attractors == () and [c.name for c in res.categories] == ["saddle"]
            sad = res.categories[0]
            assert sad.count == N and sad.members == {"bipartite v1 3:3": N} and sad.interval == pytest.approx(_wilson_np(N, N))
        else:
            assert not any(left)
            assert [(a.name, a.count, a.verdict) for a in res.attractors] == [("bipartite v1 3:3", N, "stable")]


def test_equilibrium_names():
    assert cl.equilibrium_name("consensus", 0) == "consensus +v1"
    assert cl.equilibrium_name("consensus", 0, sign=-1) == "consensus -v1"
    assert cl.equilibrium_name("bipartite", 0, split=3, tokens=10) == "bipartite v1 3:7"
    assert cl.equilibrium_name("consensus", None) == "consensus (off-axis)"
    assert cl.equilibrium_name("clustering", None, sizes=[3, 4, 3]) == "clustering 4:3:3"
    assert cl.equilibrium_name("not_converged", None) == "not converged"
    assert cl.equilibrium_name(cl.BIPARTITE, 2, split=1, tokens=4) == "bipartite v3 1:3"


@pytest.mark.slow
def test_readme_config_default_basins_agree_with_ten_times_the_budget(tmp_path, capsys):
    """Done-when of issue 13: the README's config (steps = 2000, tol = 1e-6, float32) with the default [basins]
    gives fractions inside their intervals of a run with ten times the budget (max_steps x 10); and the old fixed
    budget (max_steps = steps) now reports intervals that also contain them."""
    cfg = tmp_path / "readme.toml"
    cfg.write_text(README_CFG)
    outs = {}
    for name, extra in (("default", ""), ("ten", "max_steps = 200000\n"), ("fixed", "max_steps = 2000\n")):
        (tmp_path / f"{name}.toml").write_text(README_CFG + ("[basins]\n" + extra if extra else ""))
        assert main(["basins", str(tmp_path / f"{name}.toml"), "--json", "--no-progress"]) == 0
        outs[name] = json.loads(capsys.readouterr().out)
    assert outs["default"]["max_steps"] == 20000 and outs["ten"]["max_steps"] == 200000
    print({k: (v["unclassified"], [(a["name"], a["count"]) for a in v["attractors"]]) for k, v in outs.items()})
    for run in ("default", "fixed"):
        mine = {a["name"]: a for a in outs[run]["attractors"]}
        u, N = outs[run]["unclassified"], outs[run]["samples"]
        for b in outs["ten"]["attractors"]:
            lo, hi = mine[b["name"]]["interval"] if b["name"] in mine else (0.0, _wilson_np(u, N)[1])
            assert lo <= b["fraction"] <= hi, (run, b["name"], b["fraction"], lo, hi)


README_CFG = """
[model]
d = 3
heads = 1
V = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]
beta = 1.0
attention = "softmax"
[dynamics]
time = "discrete"
alpha = 0.1
norm = "l2"
tokens = 10
steps = 2000
tol = 1e-6
dtype = "float32"
seed = 0
"""


def test_the_backend_used_is_part_of_the_run_identity(tmp_path):
    """The resolved backend goes into the manifest; a resume on another backend is refused in one line naming it
    (float32 results of two backends agree to rounding only, so their blocks must not be mixed)."""
    import json

    from attnflow.io.results import RunDirError

    dyn = mapped(V3, K=V3)
    kw = dict(tokens=4, budget=af.Budget(steps=30, max_steps=60), stop=af.Stop(1e-6))
    run = tmp_path / "r"
    af.basin_fractions(dyn, jax.random.PRNGKey(1), 20, run_dir=run, execution=af.Execution(chunk=10, backend="xla"), **kw)
    assert json.loads((run / "manifest.json").read_text())["identity"]["backend"] == "xla"
    with pytest.raises(RunDirError, match="backend") as e:
        af.basin_fractions(dyn, jax.random.PRNGKey(1), 20, run_dir=run, resume=True,
                           execution=af.Execution(chunk=10, backend="lanes"), **kw)
    assert "\n" not in str(e.value)


def test_layernorm_maps_are_not_degenerate_in_a_basin_study():
    """Degeneracy is the model's own state_residual (checked in simulate): LayerNorm tokens have norm sqrt(d), not 1,
    and must not be counted as 'degenerate' (a host-side unit-sphere check once did exactly that)."""
    from attnflow.model.norms import LayerNorm

    ln = af.LayerMap(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0), 0.1, LayerNorm())
    sampler = lambda key, num: jax.vmap(LayerNorm())(jax.random.normal(key, (num, 4, 3)))
    res = bs.basin_fractions(ln, jax.random.PRNGKey(0), 16, sampler=sampler, budget=af.Budget(steps=50, max_steps=100),
                             stop=af.Stop(1e-6))
    assert {c.name: c.count for c in res.categories}.get("degenerate", 0) == 0


def test_unique_rows_equals_numpy_unique_and_survives_collisions(monkeypatch):
    """The hashed row uniquing gives np.unique's groups (up to order); a forced hash collision falls back to it."""
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, 4, size=(500, 6))
    rows[::7] = rows[0]
    for r in (rows, rows[:1], rows[:, :1]):
        uniq, first, inv = bs.unique_rows(r)
        ref = np.unique(r, axis=0)
        assert sorted(map(tuple, uniq)) == sorted(map(tuple, ref))
        assert np.array_equal(uniq[inv], r) and np.array_equal(r[first], uniq)
        assert all(first[j] == np.flatnonzero(inv == j).min() for j in range(len(uniq)))
    from attnflow.analysis.basins import tally

    monkeypatch.setattr(tally, "_HASH", np.zeros_like(tally._HASH))  # every row hashes to 0
    uniq, first, inv = bs.unique_rows(rows)
    assert len(uniq) == len(np.unique(rows, axis=0)) and np.array_equal(uniq[inv], rows)


def test_gram_spectrum_equals_numpy():
    """The Gram features: eigenvalues of X X^T (numpy), whether n > d or n < d."""
    rng = np.random.default_rng(1)
    for n, d in [(6, 3), (2, 4), (3, 3)]:
        X = rng.normal(size=(n, d))
        np.testing.assert_allclose(np.asarray(cl._gram_spectrum(jnp.asarray(X))), np.linalg.eigvalsh(X @ X.T), atol=1e-12)


def test_adaptive_ci_width_adds_blocks_until_narrow_and_equals_a_fixed_run():
    """ci_width: blocks are added (the pool drains between them) until every attractor's interval is narrower; the
    result equals a plain study of the same number of samples (sample i is fold_in(key, i) either way)."""
    dyn, key = mapped(V3, K=V3), jax.random.PRNGKey(5)
    kw = dict(tokens=4, budget=af.Budget(steps=2000), execution=af.Execution(chunk=40, backend="xla"))
    res = bs.basin_fractions(dyn, key, 40, ci_width=0.25, **kw)
    assert res.samples > 40 and res.samples % 40 == 0
    assert all(a.interval[1] - a.interval[0] < 0.25 for a in res.attractors)
    plain = bs.basin_fractions(dyn, key, res.samples, **kw)
    assert plain.to_json() == res.to_json()
    assert res.warning is None or "ci_width" not in res.warning


def test_a_ci_width_not_reached_at_the_cap_is_a_warning():
    """The adaptive mode stops at 100 x samples; a width not reached there is said (it was reported as a plain
    result, with nothing to tell it from one that met its width)."""
    dyn, key = mapped(V3, K=V3), jax.random.PRNGKey(5)
    kw = dict(tokens=4, budget=af.Budget(steps=2000), execution=af.Execution(chunk=2, backend="xla"))
    res = bs.basin_fractions(dyn, key, 2, ci_width=1e-6, **kw)
    assert res.samples == 200
    assert res.warning is not None and "ci_width = 1e-06 not reached" in res.warning and "200 samples" in res.warning
    assert any("ci_width" in line for line in res.lines()) and "ci_width" in res.to_json()["warning"]


def test_adaptive_flow_study_names_every_member_as_diffrax_does():
    """The adaptive mode of the pool (an embedded Tsit5 pair per member, to steady state) names every member as a
    one-by-one diffrax solve (attnflow.simulate with Adaptive: Tsit5, PID controller, steady-state event) does."""
    from attnflow.io.results import RunDirWriter, read_members

    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V3, K=V3), af.Attention("softmax"), 1.0))
    key, N, solver = jax.random.PRNGKey(3), 12, af.Adaptive()
    with RunDirWriter(tmp_dir := __import__("tempfile").mkdtemp() + "/r") as w:
        res = bs.basin_fractions(flow, key, N, tokens=4, solver=solver, stop=af.Stop(1e-6), run_dir=w,
                                 execution=af.Execution(chunk=5))
    names = read_members(tmp_dir)["name"].tolist()
    x0 = np.stack([np.asarray(af.sample.sphere(jax.random.fold_in(key, i), (1, 4, 3)))[0] for i in range(N)])
    sol = af.simulate(flow, x0, t1=200.0, solver=solver, tol=1e-6)
    assert cl.classify(flow, sol.final, sol.outcome).names() == names
    assert res.unclassified == 0 and res.max_steps == 10_000


def test_public_basin_fractions_shows_its_real_signature():
    """attnflow.basin_fractions names its parameters (no *args/**kwargs): about a dozen, run_dir and resume among
    them, the rest the analysis function's own, with the same defaults."""
    import inspect

    top = inspect.signature(af.basin_fractions).parameters
    lib = inspect.signature(bs.basin_fractions).parameters
    kinds = {p.kind for p in top.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    assert {"run_dir", "resume", "budget", "stop", "execution", "tokens", "sampler", "solver"} <= set(top)
    assert len(top) <= 15 and len(lib) <= 14
    assert all(top[k].default == lib[k].default for k in lib if k != "run_dir")
    assert "resume" in (af.basin_fractions.__doc__ or "")


@settings(max_examples=2)
@given(seed=st.integers(0, 2**16), flow=st.booleans())
def test_property_odd_dynamics_give_equal_plus_and_minus_consensus_fractions(seed, flow):
    """A symmetric V with the full mask makes the dynamics odd (X -> -X maps trajectories onto trajectories), and the
    uniform sampler is symmetric: so the +v1 and -v1 consensus basins have equal fractions. Checked exactly: the
    study of the mirrored samples (-X) names every member as the mirror image of the study of X (consensus +v1 <->
    -v1, bipartite m:(n-m) <-> (n-m):m), so over the two studies the +v1 and -v1 counts are equal."""
    rng = np.random.default_rng(seed)
    Qm, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    V = Qm @ np.diag([1.0, rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8)]) @ Qm.T  # symmetric, top eigenvalue 1
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    dyn = af.SphereFlow(att) if flow else af.LayerMap(att, 0.2)
    kw = {} if flow else dict(budget=af.Budget(max_steps=3000))
    base = bs.Sphere(5, 3, "float64")
    mirrored = lambda k, num: -base(k, num)  # noqa: E731
    a = bs.basin_fractions(dyn, jax.random.PRNGKey(seed), 40, sampler=base, **kw)
    b = bs.basin_fractions(dyn, jax.random.PRNGKey(seed), 40, sampler=mirrored, **kw)

    def mirror(name):
        if name.startswith("consensus"):
            return name.replace("+", "#").replace("-", "+").replace("#", "-")
        if name.startswith("bipartite"):
            head, split = name.rsplit(" ", 1)
            m, r = split.split(":")
            return f"{head} {r}:{m}"
        return name

    counts_a = {x.name: x.count for x in a.attractors + a.categories}
    counts_b = {mirror(x.name): x.count for x in b.attractors + b.categories}
    assert counts_a == counts_b
    plus = counts_a.get("consensus +v1", 0) + counts_b.get("consensus -v1", 0)  # the -v1 count of b, mirrored
    minus = counts_a.get("consensus -v1", 0) + counts_b.get("consensus +v1", 0)
    assert plus == minus


FLOW_CFG = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]
K = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
time = "continuous"
tokens = 4
t1 = 10.0
dt = 0.05
dtype = "float64"
{solver}
[basins]
samples = 96
"""


@pytest.mark.parametrize("solver", [None, "rk4"])
def test_cli_flow_study_defaults_to_the_adaptive_pair(tmp_path, capsys, solver):
    """A config that names no solver runs a flow study with the adaptive pair (the API's default for a study
    without dt); solver = "rk4" keeps the fixed step at dt. Both equal the API's study member by member (label,
    outcome and step count: the two solvers take different numbers of steps)."""
    from attnflow.io.results import RunDirWriter, read_members

    cfg = tmp_path / "f.toml"
    cfg.write_text(FLOW_CFG.format(solver="" if solver is None else f'solver = "{solver}"'))
    assert main(["basins", str(cfg), "--out", str(tmp_path / "cli"), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    V = np.diag([1.0, 0.4, -0.3])
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))
    kw = dict(solver=af.Adaptive()) if solver is None else dict(budget=af.Budget(t1=10.0, dt=0.05), solver=af.RK4())
    with RunDirWriter(tmp_path / "api") as w:
        bs.basin_fractions(flow, jax.random.PRNGKey(0), 96, tokens=4, run_dir=w, **kw)
    got, ref = read_members(tmp_path / "cli"), read_members(tmp_path / "api")
    for col in ("name", "outcome", "steps"):
        np.testing.assert_array_equal(np.asarray(got[col]), np.asarray(ref[col]))
    assert len(ref["steps"]) == 96


def test_adaptive_default_tol_stops_the_members_of_a_stiffer_model():
    """The adaptive pair holds a member near a stable equilibrium at a residual of about (atol + rtol) |W|, however
    long it runs (here |W| = 3.3, beta = 3, float64: max |f| between 2e-7 and 5e-6 at t = 200, below no 1e-7). The
    default stop tolerance of a study stays above that, so that without certificates every member still stops, with the
    names the certificates give."""
    from attnflow.evolve.options import check_tol, solver_floor

    rng = np.random.default_rng(0)
    V = rng.normal(size=(3, 3))
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V + V.T), af.Attention("softmax"), 3.0))
    solver = af.Adaptive()
    w = np.linalg.norm(np.asarray(flow.attn.heads.layer_matrix()), 2)
    assert solver_floor(flow, solver) == pytest.approx((1e-8 + 1e-6) * w)
    assert check_tol(None, flow, solver, None, "float64", study=True) == pytest.approx(8 * (1e-8 + 1e-6) * w)
    names = {}
    for cert in (False, True):
        r = bs.basin_fractions(flow, jax.random.PRNGKey(5), 200, tokens=5, solver=solver, stop=af.Stop(None, certify=cert))
        assert r.to_json()["not_converged"] == 0 and r.to_json()["unclassified"] == 0
        names[cert] = {a.name: a.count for a in r.attractors}
    assert names[False] == names[True]


def test_the_warning_advises_what_fits_the_unclassified_members():
    """Raising max_steps helps members that did not converge, not overflowed or degenerate ones (a study of
    alpha = 1e30 advised it for 3000 degenerate members)."""
    from types import SimpleNamespace as NS

    from attnflow.analysis.basins.results import _warning

    att = [NS(sampling_interval=(0.4, 0.6))]
    cat = lambda o, c, m=5000: NS(outcome=o, name=o.replace("_", " "), count=c, steps_max=m)  # noqa: E731
    w = _warning(att, [cat("degenerate", 300)], 300, 1000, 5000)
    assert "max_steps" not in w and "check the model's scale" in w
    w = _warning(att, [cat("not_converged", 200), cat("nonfinite", 100)], 300, 1000, 5000)
    assert "raise [basins] max_steps (now 5000)" in w and "overflowed" in w
    # members not converged that all stopped before the cap were stopped by tol, unresolved (a slow flow): more steps
    # would not help them
    w = _warning(att, [cat("not_converged", 200, 4000)], 200, 1000, 5000, 9.5e-5)
    assert "max_steps" not in w and "lower [basins] tol" in w and "9.5e-05" in w
    assert _warning(att, [cat("not_converged", 10)], 10, 1000, 5000) is None  # within the sampling half-width


def test_a_state_whose_clusters_are_not_resolved_at_tol_is_not_named():
    """Tokens closing in on one point but still a few tol apart are no equilibrium resolved at the classifier's tol:
    reported not converged, not named by the accidental split (it named 'bipartite v1 5:0', two clusters at +v1, or
    a clustering state); clusters far apart keep their name. float64, tol 1e-3."""
    from attnflow.analysis.classify import classify

    V = np.diag([1.0, 0.4, -0.3])
    e1 = np.array([1.0, 0.0, 0.0])
    tilt = lambda a: np.array([np.cos(a), np.sin(a), 0.0])  # noqa: E731
    near = np.stack([e1, e1, tilt(3e-3), tilt(3e-3), e1])  # consensus +v1 not yet resolved: two clusters 3e-3 apart
    far = np.stack([e1, e1, -e1, -e1, e1])  # bipartite v1 3:2
    tight = np.stack([e1, tilt(2e-4), e1, tilt(1e-4), e1])  # consensus within tol
    L = classify(V, np.stack([near, far, tight]), tol=1e-3)
    assert L.names() == ["not converged", "bipartite v1 3:2", "consensus +v1"]


def test_clustering_names_are_one_per_row_and_an_ambiguous_name_is_refused():
    """A clustering state's name carries its Gram spectrum to the row's own precision (thousandths), so two rows
    whose spectra differ in the third decimal get two names (they had shared one at two decimals, and res[name]
    found only the first); a name that several attractors share is a KeyError, not the first of them."""
    import dataclasses

    conv = af.OUTCOMES.index("converged")
    rows = [np.array([conv, cl.CLUSTERING, -1, 0, 0, 1, 1, g, 2000 - g]) for g in (1231, 1234)]
    names = [cl.describe(r, 2)["name"] for r in rows]
    assert names[0] != names[1] and "1.231" in names[0] and "1.234" in names[1]
    res = bs.basin_fractions(mapped(V3), jax.random.PRNGKey(0), 40, **small(3000))
    a = res.attractors[0]
    assert res[a.name] is a
    twice = dataclasses.replace(res, attractors=tuple(res.attractors) + (dataclasses.replace(a, count=0),))
    with pytest.raises(KeyError, match="2 attractors are named"):
        twice[a.name]
