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
from hypothesis import given, strategies as st

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
    assert cl.describe(cl.label_rows(cl.classify(dyn, states))[2], n)["label"] == "bipartite v1 2/6"
    rows = cl.label_rows(cl.classify(dyn, states, status=np.array([0, 0, 1, 0])))
    assert rows[0].tolist() == rows[3].tolist() == [cl.NOT_CONVERGED] + [0] * (rows.shape[1] - 1)  # one unconverged class
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


def axis_fraction(res, kinds=("consensus", "bipartite"), k=0):
    return sum(a["count"] for a in res.attractors if a["kind"] in kinds and a["eigenvector"] == k) / res.samples


def test_ss_dominant_positive_and_negative_definite():
    """[SS]: symmetric Q^T K = V; dominant positive eigenvalue -> every token on the v_1 axis; negative definite
    -> sign split on +-v_d (the last eigenvector, index d-1)."""
    N = 400
    pos = bs.basin_fractions(mapped(V3, K=V3), jax.random.PRNGKey(0), N, tokens=6, chunk_size=N, steps=4000)
    assert axis_fraction(pos) == 1.0  # Wilson lower bound at 400/400: 0.990
    neg_V = np.diag([-0.2, -0.5, -1.0])
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(neg_V, K=neg_V), af.Attention("softmax"), 1.0))
    neg = bs.basin_fractions(flow, jax.random.PRNGKey(1), N, tokens=6, chunk_size=N, t1=300.0, dt=0.05)
    split = sum(a["count"] for a in neg.attractors if a["kind"] == "bipartite" and a["eigenvector"] == 2)
    assert split / N == 1.0, neg.to_json()


def test_pm_thm1_multihead_shared_weights_consensus():
    """[PM Thm 1]: several heads, shared weights, dominant real eigenvalue -> consensus on +-v_1."""
    rng = np.random.default_rng(0)
    H, d = 5, 3
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([V3 @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    heads = af.Heads(Q=rng.normal(size=(H, d, d)) / 2, K=rng.normal(size=(H, d, d)) / 2, V=Vs, O=Os)
    res = bs.basin_fractions(mapped(None, heads=heads), jax.random.PRNGKey(2), 300, tokens=10, chunk_size=300, steps=4000)
    cons = sum(a["count"] for a in res.attractors if a["kind"] == "consensus" and a["eigenvector"] == 0)
    assert cons / res.samples > 0.95, res.to_json()


def test_bipartite_basin_small_near_threshold_large_when_decoupled():
    """Near its stability threshold (beta_c = 0.5493 for this model, M = V) the bipartite point's local basin is
    far smaller than that of consensus on v_1; at beta = 2 (antipodal tokens decoupled) it is large.
    Measured: radius 0.41 at beta = 0.553 (1.007 beta_c), 0.75 at 0.56, 1.42 at 0.6, >= 2 (the cap) at 2.0;
    consensus >= 2 throughout."""
    kw = dict(q=0.9, samples=32, iters=5, steps=20000, r_max=2.0)
    near = mapped(V3, K=V3, beta=0.553)
    rb = bs.local_basin_radius(near, eq.bipartite(near, 0, 3, 6), jax.random.PRNGKey(3), **kw)["radius"]
    rc = bs.local_basin_radius(near, eq.consensus(near, 0, 6), jax.random.PRNGKey(3), **kw)["radius"]
    far = mapped(V3, K=V3, beta=2.0)
    rf = bs.local_basin_radius(far, eq.bipartite(far, 0, 3, 6), jax.random.PRNGKey(3), **kw)["radius"]
    print(f"local radii: bipartite near threshold {rb:.3g}, consensus {rc:.3g}, bipartite decoupled {rf:.3g}")
    assert rb <= 0.5 and rc >= 2.0 and rf >= 2.0


def test_critical_shock_escapes():
    dyn = mapped(V3, K=V3, beta=0.6)
    Xb = eq.bipartite(dyn, 0, 3, 6)
    cs = bs.critical_shock(dyn, Xb, jax.random.PRNGKey(4), steps=300, iters=20, r_max=2.0, candidates=32)
    assert cs["radius"] is not None and cs["radius"] <= cs["monte_carlo_radius"] + 1e-12
    # the returned shock really leaves: its end state is far from the bipartite point
    Y = af.simulate(dyn, af.model.normalize_rows(Xb + cs["delta"])[None], steps=3000).final[0]
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


def test_cli_json_shape_and_resume_after_sigkill(tmp_path, capsys):
    cfg = tmp_path / "b.toml"
    cfg.write_text(CFG.format(samples=1200, chunk=100))
    full = tmp_path / "full"
    assert main(["basins", str(cfg), "--out", str(full), "--json", "--no-progress"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert set(ref) >= {"samples", "unconverged", "attractors"} and ref["samples"] == 1200
    assert set(ref["attractors"][0]) >= {"label", "kind", "eigenvector", "sign", "split", "fraction", "ci95", "count"}
    # a second process, killed once some chunks are on disk, then resumed
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", "basins", str(cfg), "--out", str(run), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 240:
        if len(list((run / "chunks").glob("*.parquet"))) >= 3 if (run / "chunks").exists() else False:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((run / "chunks").glob("*.parquet")))
    assert 3 <= done < 12, done
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
    r = bs.basin_fractions(dyn, jax.random.PRNGKey(7), 300, tokens=6, chunk_size=100, steps=2000)
    json.dump(r.to_json(), open(sys.argv[1], "w"))
""")


def test_sharded_basins_equal_one_device(tmp_path):
    script = tmp_path / "s.py"
    outs = []
    for ndev, flags in [(4, "--xla_force_host_platform_device_count=4"), (1, "")]:
        script.write_text(SHARD if ndev == 4 else SHARD.replace('os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"', ""))
        env = {**os.environ, "XLA_FLAGS": flags}
        r = subprocess.run([sys.executable, str(script), str(tmp_path / f"{ndev}.json"), str(ndev)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads((tmp_path / f"{ndev}.json").read_text()))
    assert [(a["label"], a["count"]) for a in outs[0]["attractors"]] == [(a["label"], a["count"]) for a in outs[1]["attractors"]]


def test_process_split_merges_to_single_process(tmp_path):
    """Two 'processes' (process_index 0 and 1 of 2) fill one run directory; a resume merges them."""
    dyn = mapped(V3, K=V3)
    kw = dict(tokens=6, chunk_size=50, steps=2000, manifest={"config": "t"})
    single = bs.basin_fractions(dyn, jax.random.PRNGKey(5), 200, **kw)
    run = tmp_path / "mh"
    bs.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, process_index=0, process_count=2, **kw)
    bs.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, resume=True, process_index=1, process_count=2, **kw)
    merged = bs.basin_fractions(dyn, jax.random.PRNGKey(5), 200, run_dir=run, resume=True, **kw)
    assert merged.to_json() == single.to_json()
