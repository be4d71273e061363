"""Coverage of attnflow's basin intervals: repeated small studies of a model whose fractions are known.

    python benchmarks/bench_coverage.py --reference 1000000 --studies 1000 --samples 200

The model: the layer map with one softmax head, V = diag(1, 0.5, -0.3), Q = I, K = V, beta = 1, alpha = 0.1, n = 6
tokens in d = 3, float32 (consensus on +-v1 and the bipartite states on v1, from about 0.4 down to about 0.01).

1. **Reference.** One study of ``--reference`` samples (key 2026) with a cap of 10 000 steps: its fractions are the
   true fractions to about +-0.001 (its own 95% half-widths are recorded).
2. **Fixed N.** ``--studies`` studies of ``--samples`` samples each, keys 0, 1, ... (independent of the reference),
   at the default cap of 1000 steps. For each attractor of the reference: how often its reported 95% interval (widened
   by the study's unclassified members), its plain Wilson interval and its simultaneous interval contain the
   reference fraction; and how often all the simultaneous intervals of a study hold at once. An attractor a study
   did not see has the interval of count 0.
3. **Adaptive ci_width.** The same number of studies with ``ci_width`` (start ``--samples // 2``, blocks added until
   every interval is narrower than ``--ci-width``): optional stopping, which can break coverage.

Reported: coverage per attractor and at once, with a 95% Wilson interval of each coverage itself (the Monte Carlo
error of this benchmark), and the machine. The record goes to benchmarks/results/coverage_cpu.json (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnflow as af  # noqa: E402
from attnflow.analysis.basins import interval_with_unknown, simultaneous_z, wilson  # noqa: E402


def model():
    V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
    return af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)


def covers(iv, p) -> bool:
    return iv[0] <= p <= iv[1]


def tally_coverage(results, ref: dict) -> dict:
    """Per reference attractor: the fraction of studies whose interval / sampling / simultaneous interval holds
    its reference fraction; and of studies whose simultaneous intervals all hold."""
    per = {name: {"interval": 0, "sampling_interval": 0, "simultaneous_interval": 0} for name in ref}
    joint = 0
    for r in results:
        have = {a.name: a for a in r.attractors}
        K = max(1, len(r.attractors) + len(r.categories))
        z = simultaneous_z(K)
        all_hold = True
        for name, p in ref.items():
            if name in have:
                a = have[name]
                ivs = (a.interval, a.sampling_interval, a.simultaneous_interval)
            else:  # not seen: count 0
                ivs = (interval_with_unknown(0, r.unclassified, r.samples), wilson(0, r.samples),
                       interval_with_unknown(0, r.unclassified, r.samples, z))
            for key, iv in zip(("interval", "sampling_interval", "simultaneous_interval"), ivs):
                per[name][key] += covers(iv, p)
            all_hold &= covers(ivs[2], p)
        joint += all_hold
    m = len(results)
    out = {name: {k: v / m for k, v in c.items()} for name, c in per.items()}
    return {"per_attractor": out, "simultaneous_all": joint / m, "studies": m,
            "coverage_mc_halfwidth": (wilson(int(0.95 * m), m)[1] - wilson(int(0.95 * m), m)[0]) / 2}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=int, default=1_000_000)
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--ci-width", type=float, default=0.15)
    p.add_argument("--modes", nargs="+", default=["fixed", "ci_width"], choices=["fixed", "ci_width"])
    p.add_argument("--out", default="coverage_cpu.json", help="record file name under benchmarks/results")
    a = p.parse_args()
    dyn, n = model(), 6
    t0 = time.perf_counter()
    ref_res = af.basin_fractions(dyn, jax.random.PRNGKey(2026), a.reference, tokens=n,
                                 budget=af.Budget(max_steps=10_000), execution=af.Execution(chunk=10_000), progress=True)
    t_ref = time.perf_counter() - t0
    ref = {x.name: x.fraction for x in ref_res.attractors}
    print(f"reference ({a.reference} samples, {t_ref:.0f} s, {ref_res.unclassified} unclassified):")
    for x in ref_res.attractors:
        print(f"  {x.name:20s} {x.fraction:.5f}  [{x.interval[0]:.5f}, {x.interval[1]:.5f}]")
    rows = {}
    for mode in a.modes:
        t0 = time.perf_counter()
        results = []
        for j in range(a.studies):
            kw = dict(ci_width=a.ci_width) if mode == "ci_width" else {}
            N = a.samples // 2 if mode == "ci_width" else a.samples
            results.append(af.basin_fractions(dyn, jax.random.PRNGKey(j), N, tokens=n,
                                              execution=af.Execution(chunk=N), budget=af.Budget(max_steps=1000), **kw))
            if (j + 1) % 100 == 0:
                print(f"  {mode}: {j + 1} studies, {time.perf_counter() - t0:.0f} s", flush=True)
        cov = tally_coverage(results, ref)
        cov["seconds"] = time.perf_counter() - t0
        cov["samples_mean"] = float(np.mean([r.samples for r in results]))
        sizes, counts = np.unique([r.samples for r in results], return_counts=True)
        cov["samples_histogram"] = {str(int(k)): int(c) for k, c in zip(sizes, counts)}
        cov["unclassified_mean"] = float(np.mean([r.unclassified for r in results]))
        rows[mode] = cov
        print(f"{mode}: {cov['studies']} studies of {cov['samples_mean']:.0f} samples on average "
              f"(Monte Carlo +-{cov['coverage_mc_halfwidth']:.3f} on each coverage); sizes {cov['samples_histogram']}")
        print(f"  {'attractor':20s} {'p':>8s} {'interval':>9s} {'sampling':>9s} {'simult.':>9s}")
        for name, c in cov["per_attractor"].items():
            print(f"  {name:20s} {ref[name]:8.4f} {c['interval']:9.3f} {c['sampling_interval']:9.3f} "
                  f"{c['simultaneous_interval']:9.3f}")
        print(f"  every simultaneous interval of a study at once: {cov['simultaneous_all']:.3f}")
    rec = {"benchmark": "basin_interval_coverage", "model": "layer map, V = diag(1, 0.5, -0.3), n = 6, d = 3, float32",
           "reference": {"samples": a.reference, "seconds": t_ref, "unclassified": ref_res.unclassified,
                         "fractions": ref, "intervals": {x.name: list(x.interval) for x in ref_res.attractors}},
           "studies": a.studies, "samples": a.samples, "ci_width": a.ci_width, "results": rows,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "jax": jax.__version__, "device": str(jax.devices()[0])},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(__file__).parent / "results" / a.out
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
