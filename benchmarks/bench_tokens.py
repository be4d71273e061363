"""Thousands of tokens: the attention streamed over blocks of keys against the dense (n, n) path, in the same run.

    python benchmarks/bench_tokens.py --cases 1000:64 4000:8 10000:2 --steps 20
    python benchmarks/bench_tokens.py --observe --cases 1000:64 10000:2 --steps 20

With ``--observe`` the two paths are: the plain run (streamed attention) and the same run with the metastability
observer (:func:`attnflow.analysis.metastability.find_plateaus`, a reading every 5 steps: speed, clusters, energy,
streamed over blocks of tokens above 512), to measure what finding plateaus costs; record
benchmarks/results/tokens_observe_cpu.json.

The model: the sphere flow, one softmax head, V = Q = K = I (d = 2), beta = 5, float32, Euler steps of dt = 0.01
through :func:`attnflow.simulate` (the xla backend). For each case n:B (n tokens, B members) and each path (dense:
``key_block=None``; streamed: ``key_block=256``), in a fresh process: the first call (compile included) and the
steady state (seconds per step, token-steps/s) of ``--steps`` steps, and the process's peak RSS. A dense case that
would need more than ``--dense-max-gib`` of scores is skipped (reported as such). The record goes to
benchmarks/results/tokens_cpu.json with the machine.
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

OBSERVE = r"""
import json, resource, sys, time
import jax, numpy as np
import attnflow as af
from attnflow.analysis.metastability import Plateaus, find_plateaus
n, B, steps, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2, dtype=np.float32)), af.Attention("softmax"), 5.0))
x0 = af.sample.sphere(jax.random.PRNGKey(0), (B, n, 2), dtype=np.float32)
def go():
    if mode == "plain":
        sol = af.simulate(flow, x0, t1=steps * 0.01, dt=0.01, solver=af.Euler(), backend="xla")
        return sol.final.block_until_ready()
    ep, _ = find_plateaus(flow, x0, t1=steps * 0.01, dt=0.01, solver=af.Euler(), rule=Plateaus(check=0.05),
                          stop_at_one=False)
    return np.asarray(ep.num)
t = time.perf_counter(); go(); first = time.perf_counter() - t
t = time.perf_counter(); go(); warm = time.perf_counter() - t
print(json.dumps({"n": n, "members": B, "steps": steps, "path": mode, "first_s": first, "warm_s": warm,
                  "s_per_step": warm / steps, "token_steps_per_s": n * B * steps / warm,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "device": str(jax.devices()[0]), "jax": jax.__version__}))
"""

CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
import attnflow as af
n, B, steps, kb = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
kb = None if kb == "dense" else int(kb)
att = af.SelfAttention(af.Heads.single(np.eye(2, dtype=np.float32)), af.Attention("softmax"), 5.0, key_block=kb)
flow = af.SphereFlow(att)
x0 = af.sample.sphere(jax.random.PRNGKey(0), (B, n, 2), dtype=np.float32)
t = time.perf_counter()
sol = af.simulate(flow, x0, t1=steps * 0.01, dt=0.01, solver=af.Euler(), backend="xla")
sol.final.block_until_ready()
first = time.perf_counter() - t
t = time.perf_counter()
sol = af.simulate(flow, x0, t1=steps * 0.01, dt=0.01, solver=af.Euler(), backend="xla")
sol.final.block_until_ready()
warm = time.perf_counter() - t
print(json.dumps({"n": n, "members": B, "steps": steps, "key_block": kb, "first_s": first, "warm_s": warm,
                  "s_per_step": warm / steps, "token_steps_per_s": n * B * steps / warm,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "finite": bool(np.all(np.isfinite(np.asarray(sol.final)))), "device": str(jax.devices()[0]),
                  "jax": jax.__version__}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["1000:64", "4000:8", "10000:2"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--dense-max-gib", type=float, default=8.0)
    p.add_argument("--observe", action="store_true", help="the plain run against the run with the plateau observer")
    a = p.parse_args()
    rows = []
    for case in a.cases:
        n, B = (int(v) for v in case.split(":"))
        for path in (("plain", "observe") if a.observe else ("dense", str(a.block))):
            if path == "dense" and 2 * B * n * n * 4 / 2**30 > a.dense_max_gib:
                rows.append({"n": n, "members": B, "key_block": None, "skipped": f"dense scores need more than {a.dense_max_gib} GiB"})
                print(f"n={n:>6d} B={B:>5d} dense: skipped (scores over {a.dense_max_gib} GiB)", flush=True)
                continue
            load = os.getloadavg()
            out = subprocess.run([sys.executable, "-c", OBSERVE if a.observe else CHILD, str(n), str(B), str(a.steps),
                                  path], capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"n": n, "members": B, "path": path,
                             "failed": out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else f"exit {out.returncode}"})
                print(f"n={n:>6d} B={B:>5d} {path:>6s}: failed ({rows[-1]['failed']})", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load_average_before"] = [round(v, 2) for v in load]
            rows.append(r)
            print(f"n={n:>6d} B={B:>5d} {path:>6s}: first call {r['first_s']:6.1f} s, {r['s_per_step'] * 1e3:8.1f} ms/step, "
                  f"{r['token_steps_per_s']:.3g} token-steps/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if a.observe:
        for r in rows:
            plain = next((q for q in rows if q["n"] == r["n"] and q.get("path") == "plain" and "warm_s" in q), None)
            if r.get("path") == "observe" and plain is not None and "warm_s" in r:
                r["observer_cost"] = r["warm_s"] / plain["warm_s"]
                print(f"n={r['n']}: the observer costs {r['observer_cost']:.2f}x the plain run (warm)")
    rec = {"benchmark": "thousands_of_tokens" + ("_observe" if a.observe else ""),
           "model": "sphere flow, softmax, V = Q = K = I, d = 2, beta = 5, float32, Euler dt 0.01",
           "results": rows, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                        "python": platform.python_version()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(__file__).parent / "results" / ("tokens_observe_cpu.json" if a.observe else "tokens_cpu.json")
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
