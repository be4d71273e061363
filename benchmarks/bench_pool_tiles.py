"""Basin studies at each backend's default pool, in two source trees back to back (an A/B of a change to the pool).

    python benchmarks/bench_pool_tiles.py [--before PATH_TO_OTHER_CHECKOUT] [--out pool_tiles_cpu.json]

Cases (float32, one process, ``Execution(workers=0)``, each in a fresh subprocess: a first call, compile included,
then three warm calls; the median warm time is reported):

- ``map lanes`` / ``map xla``: the toy layer map of ``bench_basins.py`` (n = 10, d = 3, cap 1000, tol 1e-6), 10^4
  samples;
- ``flow lanes``: the adaptive sphere flow of ``bench_peer_basins.py`` (n = 8), 10^4 samples;
- ``rk4 lanes``: the same flow with fixed RK4 (dt = 0.05, t1 = 30), 10^4 samples;
- ``flow xla``: the adaptive flow on the xla backend, 3000 samples.

With ``--before``, every case runs in that tree too (``PYTHONPATH``), interleaved with this one; the ratio is
before / after. Each run also records a digest of the per-member steps, so equal digests mean equal members.
Results go to benchmarks/results/<out> with the machine and its load average.
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
import hashlib, json, sys, time
import jax, numpy as np
import attnflow as af
which, backend, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
V = np.diag([1.0, 0.4, -0.3]).astype(np.float32)
att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
Vm = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
toy = af.LayerMap(af.SelfAttention(af.Heads.single(Vm, K=Vm), af.Attention("softmax"), 1.0), 0.1)
flow, key = af.SphereFlow(att), jax.random.PRNGKey(0)


def go():
    ex = af.Execution(workers=0, backend=backend)
    if which == "flow":
        return af.basin_fractions(flow, key, N, sampler=af.basins.Sphere(8, 3, "float32"), execution=ex)
    if which == "rk4":
        return af.basin_fractions(flow, key, N, sampler=af.basins.Sphere(8, 3, "float32"),
                                  budget=af.Budget(t1=30.0, dt=0.05), execution=ex)
    return af.basin_fractions(toy, key, N, tokens=10, budget=af.Budget(max_steps=1000), stop=af.Stop(1e-6), execution=ex)


t = time.perf_counter(); r = go(); first = time.perf_counter() - t
warm = []
for _ in range(3):
    t = time.perf_counter(); go(); warm.append(time.perf_counter() - t)
digest = hashlib.sha256(json.dumps([(a.name, a.count, a.steps_mean) for a in r.attractors + r.categories]).encode()).hexdigest()[:12]
print(json.dumps({"first_s": first, "warm_s": sorted(warm)[1], "members": digest, "attnflow": af.__file__}))
"""

CASES = [("map", "lanes", 10_000), ("map", "xla", 10_000), ("flow", "lanes", 10_000), ("rk4", "lanes", 10_000),
         ("flow", "xla", 3_000)]


def child(tree: str, case) -> dict:
    import tempfile

    env = dict(os.environ, PYTHONPATH=tree)
    with tempfile.TemporaryDirectory() as cwd:  # not a checkout: `python -c` puts the working directory first
        out = subprocess.run([sys.executable, "-c", CHILD, *map(str, case)], capture_output=True, text=True, env=env,
                             cwd=cwd)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res.pop("attnflow").startswith(str(Path(tree).resolve())):
        sys.exit(f"the child did not import attnflow from the tree {tree}")
    return res


def _commit(tree: str | None) -> str | None:
    """The commit of a checkout (the record names it, not its path)."""
    if tree is None:
        return None
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="another checkout of attnflow, run interleaved with this one")
    ap.add_argument("--out", default="pool_tiles_cpu.json")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1])
    rows = []
    print(f"{'case':<12} {'before warm s':>14} {'after warm s':>13} {'before/after':>13} {'first s (b/a)':>15}  same members")
    for case in CASES:
        load = os.getloadavg()[0]
        b = child(args.before, case) if args.before else None
        a = child(here, case)
        rows.append({"case": " ".join(map(str, case)), "before": b, "after": a, "load_avg_1min": load})
        bw = f"{b['warm_s']:.2f}" if b else "-"
        ratio = f"{b['warm_s'] / a['warm_s']:.2f}x" if b else "-"
        first = f"{b['first_s']:.1f} / {a['first_s']:.1f}" if b else f"{a['first_s']:.1f}"
        same = "-" if not b else ("yes" if b["members"] == a["members"] else "no")
        print(f"{case[0] + ' ' + case[1]:<12} {bw:>14} {a['warm_s']:>13.2f} {ratio:>13} {first:>15}  {same}", flush=True)
    import jax

    rec = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "jax": jax.__version__}, "before": _commit(args.before), "rows": rows}
    path = Path(__file__).parent / "results" / args.out
    path.write_text(json.dumps(rec, indent=1))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
