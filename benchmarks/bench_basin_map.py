"""A 1000 x 1000 basin map of the Grebogi map, streamed by row blocks, against vectorised NumPy in the same run.

    python benchmarks/bench_basin_map.py --resolution 1000 --steps 2000

attnflow: :func:`attnflow.analysis.general.basin_map` (float64; each member iterated `steps` times, a final segment
of 16 samples, recurrence labels), in a fresh process: the first call (compile included) and a second call (warm).
The peer: the same iteration written in vectorised NumPy over the whole grid at once (float64), then the label by
the final point's distance to the two fixed points (0, -J0) and (pi, J0). Both label images are compared pixel by
pixel. The record goes to benchmarks/results/basin_map_cpu.json with the machine and the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import equinox as eqx, jax.numpy as jnp, numpy as np
from attnflow.analysis import general as g
res, steps = int(sys.argv[1]), int(sys.argv[2])
class Grebogi(eqx.Module):
    def __call__(self, k, y):
        th, x = y[0], y[1]
        return jnp.stack([th + 1.32 * jnp.sin(2 * th) - 0.9 * jnp.sin(4 * th) - x * jnp.sin(th), -0.3 * jnp.cos(th)])
system = g.Map(Grebogi(), g.Space.periodic([2 * np.pi, 0.0]))
sl = g.Slice.coordinates(0, 1, np.linspace(0, 2 * np.pi, res), np.linspace(-0.5, 0.5, res), [0.0, 0.0])
run = g.Run(steps=steps, tail=16, tol=1e-6, match_tol=1e-3, chunk=65536)
t = time.perf_counter(); bm = g.basin_map(system, sl, run); first = time.perf_counter() - t
t = time.perf_counter(); bm = g.basin_map(system, sl, run); warm = time.perf_counter() - t
np.save(sys.argv[3], bm.image)
print(json.dumps({"first_s": first, "warm_s": warm, "attractors": [a.state.tolist() for a in bm.attractors],
                  "unknown": int(np.sum(bm.image < 0)), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def numpy_peer(res: int, steps: int):
    import numpy as np

    th, x = np.meshgrid(np.linspace(0, 2 * np.pi, res), np.linspace(-0.5, 0.5, res))
    for _ in range(steps):
        th, x = np.mod(th + 1.32 * np.sin(2 * th) - 0.9 * np.sin(4 * th) - x * np.sin(th), 2 * np.pi), -0.3 * np.cos(th)
    d0 = np.hypot(np.minimum(th, 2 * np.pi - th), x + 0.3)
    d1 = np.hypot(th - np.pi, x - 0.3)
    return np.where(d0 < 1e-6, 0, np.where(d1 < 1e-6, 1, -1))


def main():
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    load = os.getloadavg()
    img_path = Path("/tmp") / f"attnflow_bench_map_{os.getpid()}.npy"
    out = subprocess.run([sys.executable, "-c", CHILD, str(a.resolution), str(a.steps), str(img_path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    t = time.perf_counter()
    peer = numpy_peer(a.resolution, a.steps)
    peer_s = time.perf_counter() - t
    img = np.load(img_path)
    img_path.unlink()
    # attnflow numbers attractors in order of first arrival: map its labels to the peer's by the attractor states
    to_peer = {i: (0 if abs(s[1] + 0.3) < 1e-6 else 1) for i, s in enumerate(r["attractors"])}
    mapped = np.vectorize(lambda v: to_peer.get(int(v), -1))(img)
    agree = float(np.mean(mapped == peer))
    rec = {"benchmark": "basin_map_grebogi", "resolution": a.resolution, "steps": a.steps,
           "attnflow_first_s": r["first_s"], "attnflow_warm_s": r["warm_s"], "numpy_s": peer_s,
           "warm_speedup_over_numpy": peer_s / r["warm_s"], "cold_speedup_over_numpy": peer_s / r["first_s"],
           "pixel_agreement": agree, "unknown": r["unknown"], "peak_rss_mb": r["peak_rss_mb"],
           "load_average_before": [round(v, 2) for v in load],
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{a.resolution}^2 Grebogi basin map, {a.steps} steps: attnflow first call {r['first_s']:.1f} s, warm "
          f"{r['warm_s']:.1f} s; NumPy {peer_s:.1f} s ({rec['warm_speedup_over_numpy']:.2f}x warm, "
          f"{rec['cold_speedup_over_numpy']:.2f}x cold); pixels equal {agree:.6f}; peak RSS {r['peak_rss_mb']:.0f} MB")
    path = Path(__file__).parent / "results" / "basin_map_cpu.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
