# %% [markdown]
# # 06 · Scaling: large basin studies, chunking, resume, several devices, benchmarks
#
# Basin studies need 10^5 to 10^8 initial conditions. attnflow streams them through a pool of member slots on the
# device (a member is retired as soon as it stops, and its slot takes the next sample), writes one Parquet table per
# finished chunk of samples to a run directory (memory is bounded by the pool and the chunk), resumes a killed run
# without losing or recomputing a finished chunk, and with several local devices shards the work over them. Sample
# i always draws its state from `fold_in(key, i)`, so none of this changes the result.
#
# Sizes: `SAMPLES` below is 10^6 in the committed run (about two minutes on a 2-core CPU; set
# `ATTNFLOW_SAMPLES` to change it); `ATTNFLOW_SMOKE=1` shrinks everything for CI.

# %%
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import numpy as np

import attnflow as af

SMOKE = bool(os.environ.get("ATTNFLOW_SMOKE"))
SAMPLES = 400 if SMOKE else int(os.environ.get("ATTNFLOW_SAMPLES", 1_000_000))
CHUNK = 100 if SMOKE else 10_000
V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha=0.1)
work = Path(tempfile.mkdtemp(prefix="attnflow-scaling-"))

# %% [markdown]
# ## A chunked, streamed study
# n = 10 tokens in d = 3, discrete map, up to 1000 steps, per-member early stop at tol = 1e-6, float32.

# %%
t = time.perf_counter()
study = dict(tokens=10, budget=af.Budget(steps=1000), stop=af.Stop(1e-6), execution=af.Execution(chunk=CHUNK))
res = af.basin_fractions(model, jax.random.PRNGKey(0), SAMPLES, run_dir=work / "run", **study)
dt = time.perf_counter() - t
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{SAMPLES} samples in {dt:.1f} s ({SAMPLES / dt:.0f} samples/s), peak RSS {peak_mb:.0f} MB")
for a in res.attractors:
    print(f"  {a.name:22s} {a.fraction:.4f}  [{a.interval[0]:.4f}, {a.interval[1]:.4f}]  mean steps {a.steps_mean:.0f}")
print("run directory:", sorted(p.name for p in (work / "run").iterdir()), f"{len(list((work / 'run' / 'chunks').iterdir()))} chunk files")

# %% [markdown]
# ## Resume: nothing finished is lost or recomputed
# We delete two chunk files (as if the run had been killed before writing them) and resume: only those two chunks
# are simulated again, and the result is identical. `attnflow basins CONFIG.toml --out DIR --resume` does the same;
# the tests kill a real process with SIGKILL.

# %%
for name in sorted((work / "run" / "chunks").glob("*.parquet"))[-2:]:
    name.unlink()
t = time.perf_counter()
again = af.basin_fractions(model, jax.random.PRNGKey(0), SAMPLES, run_dir=work / "run", resume=True, **study)
print(f"resumed in {time.perf_counter() - t:.1f} s (the full run took {dt:.1f} s); identical: {again.to_json() == res.to_json()}")

# %% [markdown]
# ## Several devices
# A study runs one member pool per local device, each on its share of every block (`simulate` shards each chunk's
# batch over the devices). On a CPU we can ask XLA for 4 host devices (this must happen before JAX starts, hence a
# subprocess) and check that the result does not change.

# %%
script = textwrap.dedent('''
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np, attnflow as af
    V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    m = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha=0.1)
    r = af.basin_fractions(m, jax.random.PRNGKey(0), int(sys.argv[1]), tokens=10, budget=af.Budget(steps=1000),
                           stop=af.Stop(1e-6), execution=af.Execution(chunk=int(sys.argv[2])))
    print(json.dumps({"devices": jax.local_device_count(), "result": r.to_json()}))
''')
n_dev = min(SAMPLES, 4 * CHUNK)
single = af.basin_fractions(model, jax.random.PRNGKey(0), n_dev, **study)
if SMOKE:  # the subprocesses are what the tests check on their own (tests/test_devices.py, tests/test_multihost.py)
    print("smoke size: the several-devices and several-processes runs are left to the tests")
else:
    out = subprocess.run([sys.executable, "-c", script, str(n_dev), str(CHUNK)], capture_output=True, text=True, check=True)
    multi = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{multi['devices']} devices vs 1 device, {n_dev} samples: identical counts:",
          [(a["name"], a["count"]) for a in multi["result"]["attractors"]] == [(a.name, a.count) for a in single.attractors])

# %% [markdown]
# ## Several processes (multi-host) with `jax.distributed`
# On a cluster, start one process per host with the same command plus `--coordinator HOST:PORT --num-processes P
# --process-id I` (or call `jax.distributed.initialize(...)` yourself before `basin_fractions`). Process I simulates
# the chunks i with i % P == I on its own devices, the per-attractor tallies are all-gathered, and process 0 writes
# the result. Here two local CPU processes share one run directory, and their result equals the one-process result
# above.

# %%
import socket

cfg = work / "basins.toml"
cfg.write_text(textwrap.dedent(f"""
    [model]
    d = 3
    V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
    K = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
    [dynamics]
    alpha = 0.1
    tokens = 10
    steps = 1000
    [basins]
    samples = {n_dev}
    chunk_size = {CHUNK}
    tol = 1e-6
    seed = 0
"""))
if not SMOKE:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "attnflow", "basins", str(cfg), "--out", str(work / "two"), "--json",
                               "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    two = json.loads(outs[0][0])
    print("2 processes vs 1 process, identical counts:",
          sorted((a["name"], a["count"]) for a in two["attractors"]) == sorted((a.name, a.count) for a in single.attractors))
    print("chunk files written:", sorted(p.name for p in (work / "two" / "chunks").glob("*.parquet")))

# %% [markdown]
# ## Benchmarks
# `benchmarks/` measures attnflow against a NumPy loop, batched NumPy, PyTorch (eager and compiled) and a plain JAX
# `jit(vmap(step))` in the same run, and records results with the machine they ran on. The recorded CPU results:

# %%
root = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
for f in sorted((root / "benchmarks" / "results").glob("*.json")):
    doc = json.loads(f.read_text())
    recs = (doc.get("records") or doc.get("results")) if isinstance(doc, dict) else doc
    if isinstance(recs, list) and recs and isinstance(recs[0], dict) and "token_steps_per_s" in recs[0] and "workload" in recs[0]:
        print(f"{f.name}: best token-steps/s per workload and implementation")
        best = {}
        for r in recs:
            k = (r["workload"], r["impl"])
            best[k] = max(best.get(k, 0.0), r["token_steps_per_s"])
        for wl in dict.fromkeys(k[0] for k in best):
            row = {impl: v for (w, impl), v in best.items() if w == wl}
            ref = row.get("attnflow")
            print(f"  {wl:10s} " + ", ".join(f"{impl} {v:.3g}" + (f" ({ref / v:.1f}x)" if ref and impl != "attnflow" else "") for impl, v in row.items()))
    elif isinstance(doc, dict) and "benchmark" in doc:
        print(f"{f.name}: {json.dumps({k: v for k, v in doc.items() if k not in ('machine', 'results')})[:300]}")
shutil.rmtree(work)

# %% [markdown]
# ## Throughput and memory against the number of samples
# `benchmarks/results/basins_cpu.json` holds the recorded end-to-end basin study (the model above, float32, on a
# 2-core CPU) at each recorded number of samples, one line per recorded design (`python benchmarks/bench_basins.py`
# re-measures it). Memory is set by the chunk, not by the size of the study, so the peak should stay flat as the
# number of samples grows, and so should the throughput. This notebook's own run is drawn as a star (its own chunk
# size; at smoke size in CI).

# %%
import matplotlib.pyplot as plt

rec = json.loads((root / "benchmarks" / "results" / "basins_cpu.json").read_text())
designs = {}
for r in rec["results"]:
    designs.setdefault(r.get("design", "recorded"), []).append(r)
fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
for name, rows in designs.items():
    rows = sorted(rows, key=lambda r: r["samples"])
    ns = [r["samples"] for r in rows]
    lab = f"{name}, chunk {rows[0]['chunk']:,}" + (f" ({rows[0]['backend']})" if rows[0].get("backend") else "")
    ax[0].plot(ns, [r["samples_per_s"] for r in rows], "o-", label=lab)
    ax[1].plot(ns, [r["peak_rss_mb"] for r in rows], "o-", label=lab)
    for r in rows:
        print(f"{name:>9s} {r['samples']:>9,d} samples: {r['samples_per_s']:7.0f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s")
ax[0].plot([SAMPLES], [SAMPLES / dt], "*", ms=14, color="crimson", label=f"this notebook's run, chunk {CHUNK:,}")
ax[1].plot([SAMPLES], [peak_mb], "*", ms=14, color="crimson", label="this notebook's run (whole kernel process)")
ax[0].set(xscale="log", xlabel="samples in the study", ylabel="samples / s",
          title=f"throughput (n = {rec['n']}, d = {rec['d']}, up to 1000 steps)")
ax[1].set(xscale="log", xlabel="samples in the study", ylabel="peak resident memory (MB)",
          title="peak memory: bounded by the chunk")
for a in ax:
    a.set_ylim(0, 1.2 * a.get_ylim()[1])
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8, loc="lower right")
fig.suptitle(f"basin study scaling, {rec['machine']['cpus']}-core CPU, {rec['dtype']}, recorded {rec['date'][:10]}")
fig.tight_layout()
