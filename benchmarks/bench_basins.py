"""End-to-end basin study: n = 10, d = 3, discrete layer map, softmax, float32, a cap of 1000 steps, tol = 1e-6.

    python benchmarks/bench_basins.py --samples 10000 100000 [1000000] [--chunk 10000]

Two designs are measured in the same run, each study in a fresh subprocess (so that its peak host memory,
ru_maxrss, is its own), after a warm-up study of the same shapes in that process (compiles excluded):

- ``pool``: :func:`attnflow.analysis.basins.basin_fractions`: a pool of member slots on the device
  (:func:`attnflow.evolve.pool.advance_pool`, one pool per device); every 8 steps, members that stopped are retired and labelled in the
  same compiled call and their slots refilled, so a member costs about its own steps.
- ``fixed``: the previous design, written out here: chunks of ``--chunk`` states simulated for the whole budget
  (the chunk runs until its slowest member stops), then labelled.

Reported per study: samples/s, peak RSS, the unclassified count (not converged at the cap, or another failure),
the mean steps per member, and the steps paid per member (fixed: every member of a chunk pays the chunk's
longest run). Results go to benchmarks/results/basins_<device>.json with the machine and its load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, math, resource, sys, time
import jax, numpy as np
import attnflow as af
from attnflow.analysis import basins as bs, classify as cl
design, samples, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pool_size = None if sys.argv[4] == "default" else int(sys.argv[4])
CAP, TOL = 1000, 1e-6
V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)


def fixed(key, N):
    # the previous design: chunk i draws its states from fold_in(key, i) and runs the whole budget
    counts, unclassified, steps, paid = {}, 0, 0, 0
    for i in range(math.ceil(N / chunk)):
        num = min(chunk, N - i * chunk)
        x0 = af.sample.sphere(jax.random.fold_in(key, i), (chunk, 10, 3), dtype=np.float32)
        sol = af.simulate(dyn, x0, steps=CAP, tol=TOL)
        rows = cl.label_rows(cl.classify(dyn, sol.final, sol.outcome))[:num]
        st = np.asarray(sol.steps)[:num]
        steps += int(st.sum())
        paid += int(np.asarray(sol.steps).max()) * num
        unclassified += int((rows[:, 0] != af.OUTCOMES.index("converged")).sum())
        for r in map(tuple, rows):
            counts[r] = counts.get(r, 0) + 1
    names = sorted(((cl.describe(np.array(r), 10)["name"], c / N) for r, c in counts.items()), key=lambda t: -t[1])
    return {"unclassified": unclassified, "steps_mean": steps / N, "steps_paid_mean": paid / N, "attractors": names[:4]}


def pool(key, N):
    r = bs.basin_fractions(dyn, key, N, tokens=10, budget=af.Budget(max_steps=CAP), stop=af.Stop(TOL),
                           execution=af.Execution(chunk=chunk, pool=pool_size))
    total = sum(a.count * a.steps_mean for a in r.attractors + r.categories)
    from attnflow.evolve import backends
    from attnflow.evolve.pool import pool_tile
    default = pool_tile(dyn, af.Iterate(), r.backend, 10, 3, np.float32)
    return {"unclassified": r.unclassified, "steps_mean": total / N, "steps_paid_mean": None, "backend": r.backend,
            "pool": default if pool_size is None else pool_size, "default_pool": default,
            "l2_cache_bytes": backends.l2_cache_bytes(), "certified": sum(a.certified for a in r.attractors),
            "attractors": [(a.name, a.fraction) for a in r.attractors[:4]]}


run = {"fixed": fixed, "pool": pool}[design]
run(jax.random.PRNGKey(1), min(samples, 2 * chunk))  # warm-up: every compiled shape of the study
t = time.perf_counter()
out = run(jax.random.PRNGKey(0), samples)
dt = time.perf_counter() - t
print(json.dumps({"design": design, "samples": samples, "chunk": chunk, "seconds": dt, "samples_per_s": samples / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **out,
                  "device": str(jax.devices()[0]), "jax": jax.__version__}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--chunk", type=int, default=10_000)
    p.add_argument("--designs", nargs="+", default=["fixed", "pool"], choices=["fixed", "pool"])
    p.add_argument("--pools", nargs="+", default=["default"],
                   help="slots per device of the pool design: integers, or 'default' (from the L2 cache size)")
    p.add_argument("--out", help="record file name under benchmarks/results (default basins_<device>.json)")
    a = p.parse_args()
    rows, path = [], None
    runs = [(s, design, pool) for s in a.samples for design in a.designs for pool in (a.pools if design == "pool" else ["default"])]
    for s, design, pool in runs:
        load = os.getloadavg()
        out = subprocess.run([sys.executable, "-c", CHILD, design, str(s), str(a.chunk), str(pool)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["load_average_before"] = [round(v, 2) for v in load]
        r["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(r)
        print(f"{design:5s} {s:>9d} samples{'' if design == 'fixed' else ', pool ' + str(r['pool'])}: {r['seconds']:8.1f} s, {r['samples_per_s']:9.0f} samples/s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, unclassified {r['unclassified']}, mean steps {r['steps_mean']:.1f}, "
              f"load {r['load_average_before'][0]:.1f}", flush=True)
        path = record(rows, a.out)  # after every study, so an interrupted run keeps what it measured
    print(f"wrote {path}")


def record(rows, out=None):
    dev = "gpu" if "cuda" in rows[0]["device"].lower() or "gpu" in rows[0]["device"].lower() else "cpu"
    ratios = {}
    for r in rows:
        f = next((x for x in rows if x["design"] == "fixed" and x["samples"] == r["samples"]), None)
        if r["design"] == "pool" and f is not None and r.get("pool") == r.get("default_pool"):
            ratios[str(r["samples"])] = r["samples_per_s"] / f["samples_per_s"]
    rec = {"benchmark": "basins_end_to_end", "n": 10, "d": 3, "cap_steps": 1000, "dtype": "float32", "tol": 1e-6,
           "results": rows, "pool_over_fixed_samples_per_s": ratios,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(__file__).parent / "results" / (out or f"basins_{dev}.json")
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
