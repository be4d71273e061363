"""Where a study's member pools run on a CPU: JAX's own client, worker processes, or one-thread clients of this
process (``Execution.cores``), in the same run, on the same members.

    python benchmarks/bench_cores.py --samples 100000

Each (study, placement) runs in a new process without a compilation cache: its first call (compile included) and a
second, warm call. Studies (float32, certificates on, the defaults otherwise):

- ``adaptive``: the sphere flow of ``bench_peer_basins.py`` (one softmax head, V = diag(1, 0.4, -0.3), n = 8, d = 3),
  the adaptive pair;
- ``rk4``: the same flow with fixed RK4 (dt = 0.05, t1 = 30);
- ``layer_map``: the toy layer map of ``bench_basins.py`` (n = 10, d = 3, cap 1000);
- ``tokens32``: RK4 (t1 = 20) on 32 tokens in d = 3, xla backend, a random head (samples / 30);
- ``d16``: RK4 (t1 = 20) on 16 tokens in d = 16, a random head (samples / 50).

Placements: ``jax`` (``cores=0``: the pools on JAX's client), ``workers`` (two worker processes), ``cores`` (two
one-thread clients). Printed: seconds, and each placement's ratio to ``jax``; every placement's attractor counts must
be equal (the run stops otherwise). Results go to benchmarks/results/cores_<device>.json.
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
import json, sys, time
import jax, numpy as np
import attnflow as af
study, samples, placement = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ex = {"jax": dict(cores=0), "workers": dict(workers=2), "cores": dict(cores=2)}[placement]
key = jax.random.PRNGKey(0)
rng = np.random.default_rng(0)


def flow_of(V):
    return af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))


if study in ("adaptive", "rk4"):
    flow = flow_of(np.diag([1.0, 0.4, -0.3]).astype(np.float32))
    budget = None if study == "adaptive" else af.Budget(t1=30.0, dt=0.05)
    run = lambda: af.basin_fractions(flow, key, samples, sampler=af.basins.Sphere(8, 3, "float32"), budget=budget,
                                     execution=af.Execution(**ex))
elif study == "layer_map":
    Vm = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    toy = af.LayerMap(af.SelfAttention(af.Heads.single(Vm, K=Vm), af.Attention("softmax"), 1.0), 0.1)
    run = lambda: af.basin_fractions(toy, key, samples, tokens=10, budget=af.Budget(max_steps=1000), stop=af.Stop(1e-6),
                                     execution=af.Execution(**ex))
else:
    n, d, backend, samples = (32, 3, "xla", samples // 30) if study == "tokens32" else (16, 16, "auto", samples // 50)
    flow = flow_of((np.eye(d) + 0.3 * rng.standard_normal((d, d))).astype(np.float32))
    run = lambda: af.basin_fractions(flow, key, samples, sampler=af.basins.Sphere(n, d, "float32"),
                                     budget=af.Budget(t1=20.0, dt=0.05), execution=af.Execution(backend=backend, **ex))
times = []
for _ in range(2):
    t = time.perf_counter()
    r = run()
    times.append(time.perf_counter() - t)
print(json.dumps({"study": study, "placement": placement, "samples": r.samples, "first_s": times[0],
                  "warm_s": times[1], "counts": [(a.name, a.count) for a in r.attractors],
                  "device": str(jax.devices()[0])}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--studies", nargs="+", default=["adaptive", "rk4", "layer_map", "tokens32", "d16"])
    p.add_argument("--placements", nargs="+", default=["jax", "workers", "cores"])
    p.add_argument("--out", help="record file name under benchmarks/results (default cores_<device>.json)")
    a = p.parse_args()
    rows = []
    for study in a.studies:
        got = {}
        for placement in a.placements:
            load = os.getloadavg()
            out = subprocess.run([sys.executable, "-c", CHILD, study, str(a.samples), placement], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load_average_before"] = [round(v, 2) for v in load]
            got[placement] = r
            rows.append(r)
            print(f"{study:10s} {placement:8s} N={r['samples']:>7d}: first {r['first_s']:6.2f} s, warm {r['warm_s']:6.2f} s",
                  flush=True)
        counts = {pl: r["counts"] for pl, r in got.items()}
        if len({json.dumps(c) for c in counts.values()}) != 1:
            sys.exit(f"{study}: the placements disagree: {counts}")
        if "jax" in got:
            for pl, r in got.items():
                if pl != "jax":
                    r["first_over_jax"] = got["jax"]["first_s"] / r["first_s"]
                    r["warm_over_jax"] = got["jax"]["warm_s"] / r["warm_s"]
                    print(f"  {study} {pl} / jax: first {r['first_over_jax']:.2f}x, warm {r['warm_over_jax']:.2f}x")
    dev = rows[0]["device"].split(":")[0] if rows else "cpu"
    path = Path(__file__).parent / "results" / (a.out or f"cores_{dev}.json")
    path.write_text(json.dumps({"benchmark": "cores", "results": rows,
                                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                            "python": platform.python_version()},
                                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                               indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
