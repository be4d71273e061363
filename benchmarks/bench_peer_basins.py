"""attnflow's basin study against pyBasin's method, on the same members, in the same run.

    python benchmarks/bench_peer_basins.py --samples 10000 100000

The case (issue 21): the sphere flow with softmax attention, one head, V = diag(1, 0.4, -0.3), Q = I, K = V, beta = 1,
n = 8 tokens in d = 3, float32, initial states uniform on the sphere (sample i from fold_in(key, i), the same states
for every method).

- ``peer`` (pyBasin's method, written out here with its libraries: pyBasin itself needs Python >= 3.12): diffrax
  Dopri5 with a PID controller (rtol 1e-6, atol 1e-8) under ``vmap`` to the fixed horizon t = 30, then each member
  labelled by its nearest template, one template per sign pattern on v1 (the equilibria: consensus and bipartite
  consensus on +-v1), named as attnflow names them.
- ``attnflow``: :func:`attnflow.basin_fractions` on the same states, with certificates (a member is retired once it
  enters a certified ball around a stable equilibrium), in each of its modes: fixed RK4 (dt = 0.05) on the lanes
  backend, and the adaptive Tsit5 pair per member (a flow study's default, on lanes).
- ``layer_map``: the toy layer-map study of ``bench_basins.py`` (n = 10, cap 1000), for its three times only.
- ``adaptive_1e-5`` (not run by default): the adaptive study with the pair's tolerances ten times looser than the
  default (rtol 1e-5, atol 1e-7), to weigh speed against accuracy.
- ``reference`` (not run by default; labels only, one call): float64 Tsit5 at rtol 1e-10, atol 1e-12 to t = 200 on the
  same states, each member named by its sign pattern on v1; every method's labels are compared with it.

Each method runs in fresh processes: once with an empty JAX compilation cache (cold), once more with the cache that
run filled, and then a second time in that process (warm). Reported: samples/s for each, the labels' agreement member
by member with the peer, and the machine. Results go to benchmarks/results/peer_basins_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t_import = time.perf_counter()
import jax, numpy as np
import attnflow as af
from attnflow.cli import use_compile_cache
from pathlib import Path
method, samples, cache, labels_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
use_compile_cache(Path(cache))
t_import = time.perf_counter() - t_import
V = np.diag([1.0, 0.4, -0.3]).astype(np.float32)
flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))
key, n = jax.random.PRNGKey(0), 8
sampler = af.basins.Sphere(n, 3, "float32")


def peer(N):
    import diffrax
    x0 = jnp_states(N)
    term = diffrax.ODETerm(lambda t, y, a: flow.vf(t, y))
    solve = jax.jit(jax.vmap(lambda y0: diffrax.diffeqsolve(term, diffrax.Dopri5(), 0.0, 30.0, None, y0,
                    stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), max_steps=100_000, throw=False).ys[-1]))
    out = []
    for s in range(0, N, 10_000):
        out.append(np.asarray(solve(x0[s:s + 10_000])))
    final = np.concatenate(out)
    v1 = np.array([1.0, 0.0, 0.0], np.float32)
    plus = (final @ v1 > 0)  # the nearest template per token: +v1 or -v1 (each token's nearest sign)
    m = plus.sum(axis=1)
    names = np.where(m == n, "consensus +v1", np.where(m == 0, "consensus -v1", np.char.add(np.char.add("bipartite v1 ", m.astype(str)), np.char.add(":", (n - m).astype(str)))))
    return names


def jnp_states(N):
    return np.asarray(af.basins.draw_samples(sampler, key, np.arange(N)))


def study(N, solver):
    from attnflow.io.results import RunDirWriter, read_members
    import tempfile, shutil
    d = tempfile.mkdtemp()
    kw = {"rk4": dict(budget=af.Budget(t1=30.0, dt=0.05)),  # adaptive: a flow study's default
          "adaptive_1e-5": dict(solver=af.Adaptive(rtol=1e-5, atol=1e-7)),
          "adaptive_in_process": dict(execution=af.Execution(workers=0)),
          "adaptive_workers": dict(execution=af.Execution(workers=2))}.get(solver, {})
    with RunDirWriter(Path(d) / "r") as w:
        af.basin_fractions(flow, key, N, sampler=sampler, run_dir=w, **kw)
    names = read_members(Path(d) / "r")["name"]
    shutil.rmtree(d)
    return names


def layer_map(N):
    # the toy layer-map study of bench_basins.py (n = 10, cap 1000): its times only, no peer
    Vm = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    toy = af.LayerMap(af.SelfAttention(af.Heads.single(Vm, K=Vm), af.Attention("softmax"), 1.0), 0.1)
    r = af.basin_fractions(toy, key, N, tokens=10, budget=af.Budget(max_steps=1000), stop=af.Stop(1e-6))
    return [a.name for a in r.attractors]


def reference(N):
    # labels only: float64 Tsit5 at rtol 1e-10, atol 1e-12 to t = 200 on the same (float32) states, sign patterns on
    # v1 (every member of this case is within 1e-6 of such an arrangement by then); one call
    import diffrax
    jax.config.update("jax_enable_x64", True)
    V64 = np.diag([1.0, 0.4, -0.3])
    f64 = af.SphereFlow(af.SelfAttention(af.Heads.single(V64, K=V64), af.Attention("softmax"), 1.0))
    term = diffrax.ODETerm(lambda t, y, a: f64.vf(t, y))
    solve = jax.jit(jax.vmap(lambda y0: diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 200.0, None, y0,
                    stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12), max_steps=1_000_000, throw=False).ys[-1]))
    x0 = jnp_states(N).astype(np.float64)
    x = np.concatenate([np.asarray(solve(x0[s:s + 2000])) for s in range(0, N, 2000)])[..., 0]
    if np.abs(x).min() < 1 - 1e-6:
        sys.exit("reference: a member is not yet at a sign pattern on v1 at t = 200")
    m = (x > 0).sum(axis=1)
    return np.where(m == n, "consensus +v1", np.where(m == 0, "consensus -v1", np.char.add(np.char.add("bipartite v1 ", m.astype(str)), np.char.add(":", (n - m).astype(str)))))


run = {"peer": peer, "rk4": lambda N: study(N, "rk4"), "adaptive": lambda N: study(N, "adaptive"),
       "adaptive_1e-5": lambda N: study(N, "adaptive_1e-5"), "reference": reference, "layer_map": layer_map,
       "adaptive_in_process": lambda N: study(N, "adaptive_in_process"),
       "adaptive_workers": lambda N: study(N, "adaptive_workers")}[method]
times = []
for _ in range(1 if method == "reference" else 2):  # the first call is cold (or loads the cache), the second warm
    t = time.perf_counter()
    names = run(samples)
    times.append(time.perf_counter() - t)
np.save(labels_out, np.asarray(names, dtype=str))
print(json.dumps({"method": method, "samples": samples, "first_s": times[0], "warm_s": times[-1], "import_s": t_import,
                  "device": str(jax.devices()[0]), "jax": jax.__version__}))
"""


def child(method: str, samples: int, cache: str, labels: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(samples), cache, labels], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[10_000])
    p.add_argument("--methods", nargs="+", default=["peer", "rk4", "adaptive", "layer_map"])
    p.add_argument("--out", help="record file name under benchmarks/results (default peer_basins_<device>.json)")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for N in a.samples:
            labels = {}
            for m in a.methods:
                cache = os.path.join(tmp, f"cache_{m}_{N}")
                load = os.getloadavg()
                cold = child(m, N, cache, os.path.join(tmp, f"{m}_{N}.npy"))  # empty cache
                if m == "reference":  # labels only
                    labels[m] = np.load(os.path.join(tmp, f"{m}_{N}.npy"))
                    print(f"{m:9s} N={N:>7d}: labels in {cold['first_s']:.1f} s", flush=True)
                    continue
                filled = child(m, N, cache, os.path.join(tmp, f"{m}_{N}.npy"))  # the cache cold filled
                if m != "layer_map":  # another model: its times only
                    labels[m] = np.load(os.path.join(tmp, f"{m}_{N}.npy"))
                r = {"method": m, "samples": N, "cold_samples_per_s": N / cold["first_s"],
                     "filled_cache_samples_per_s": N / filled["first_s"], "warm_samples_per_s": N / filled["warm_s"],
                     "cold_s": cold["first_s"], "filled_cache_s": filled["first_s"], "warm_s": filled["warm_s"],
                     "import_s": filled["import_s"], "load_average_before": [round(v, 2) for v in load],
                     "device": cold["device"], "jax": cold["jax"]}
                rows.append(r)
                print(f"{m:9s} N={N:>7d}: cold {r['cold_s']:6.1f} s, filled cache {r['filled_cache_s']:6.1f} s, warm "
                      f"{r['warm_s']:6.1f} s  ({r['warm_samples_per_s']:.0f} samples/s warm)", flush=True)
            if "peer" in labels:
                for m in labels:
                    if m not in ("peer", "reference"):
                        agree = float(np.mean(labels[m] == labels["peer"]))
                        for r in rows:
                            if r["method"] == m and r["samples"] == N:
                                r["label_agreement_with_peer"] = agree
                        print(f"  {m}: labels equal to the peer's for {agree:.4%} of the members")
            for m, other in (("adaptive", "rk4"), ("adaptive_1e-5", "adaptive"), ("peer", "reference"),
                             ("adaptive", "reference"), ("adaptive_1e-5", "reference"), ("rk4", "reference")):
                if m in labels and other in labels:
                    agree = float(np.mean(labels[m] == labels[other]))
                    for r in rows:
                        if r["method"] == m and r["samples"] == N:
                            r[f"label_agreement_with_{other}"] = agree
                    print(f"  {m}: labels equal to {other}'s for {agree:.4%} of the members "
                          f"({int(np.sum(labels[m] != labels[other]))} differ)")
            for r in rows:
                if r["samples"] == N and r["method"] not in ("peer", "layer_map") and "peer" in labels:
                    peer = next(x for x in rows if x["method"] == "peer" and x["samples"] == N)
                    for k in ("cold", "filled_cache", "warm"):
                        r[f"{k}_over_peer"] = r[f"{k}_samples_per_s"] / peer[f"{k}_samples_per_s"]
                    print(f"  {r['method']} / peer: cold {r['cold_over_peer']:.2f}x, filled cache "
                          f"{r['filled_cache_over_peer']:.2f}x, warm {r['warm_over_peer']:.2f}x")
    dev = "gpu" if "cuda" in rows[0]["device"].lower() else "cpu"
    rec = {"benchmark": "basins_against_pybasin_method", "n": 8, "d": 3, "dtype": "float32", "results": rows,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(__file__).parent / "results" / (a.out or f"peer_basins_{dev}.json")
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
