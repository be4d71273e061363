"""End-to-end basin study: n = 10, d = 3, discrete layer map, softmax, 1000 steps, float32.

    python benchmarks/bench_basins.py --samples 10000 100000 [1000000] [--chunk 10000]

Each study runs in a fresh subprocess so that its peak host memory (ru_maxrss) is its own. Reports samples/s and
peak memory per study size; with a fixed chunk size, peak memory must not grow with the number of samples.
Results go to benchmarks/results/basins_<device>.json with the machine they ran on.
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
import json, resource, sys, time
import jax, numpy as np
import attnflow as af
from attnflow.analysis import basins as bs
samples, chunk = int(sys.argv[1]), int(sys.argv[2])
V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
bs.basin_fractions(dyn, jax.random.PRNGKey(1), chunk, tokens=10, chunk_size=chunk, steps=1000, tol=1e-6)  # warm-up (compile)
t = time.perf_counter()
r = bs.basin_fractions(dyn, jax.random.PRNGKey(0), samples, tokens=10, chunk_size=chunk, steps=1000, tol=1e-6)
dt = time.perf_counter() - t
print(json.dumps({"samples": samples, "chunk": chunk, "seconds": dt, "samples_per_s": samples / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "unconverged": r.unconverged, "attractors": [(a["label"], a["fraction"]) for a in r.attractors[:4]],
                  "device": str(jax.devices()[0]), "jax": jax.__version__}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--chunk", type=int, default=10_000)
    a = p.parse_args()
    rows = []
    path = None
    for s in a.samples:
        out = subprocess.run([sys.executable, "-c", CHILD, str(s), str(a.chunk)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{s:>9d} samples: {r['seconds']:8.1f} s, {r['samples_per_s']:9.0f} samples/s, "
              f"{r['samples_per_s'] * 10 * 1000:.3g} token-steps/s at the 1000-step budget, peak RSS {r['peak_rss_mb']:.0f} MB")
        path = record(rows)  # after every size, so an interrupted run keeps what it measured
    print(f"wrote {path}")


def record(rows):
    dev = "gpu" if "cuda" in rows[0]["device"].lower() or "gpu" in rows[0]["device"].lower() else "cpu"
    rec = {"benchmark": "basins_end_to_end", "n": 10, "d": 3, "steps": 1000, "dtype": "float32", "tol": 1e-6, "results": rows,
           "peak_memory_grows": rows[-1]["peak_rss_mb"] > 1.2 * rows[0]["peak_rss_mb"] if len(rows) > 1 else None,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(__file__).parent / "results" / f"basins_{dev}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return path

if __name__ == "__main__":
    main()
