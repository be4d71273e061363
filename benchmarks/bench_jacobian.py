"""Jacobian + eigenvalues of 10^4 states (n = 10, d = 3) in one jitted call, against a NumPy peer.

    python benchmarks/bench_jacobian.py [--states 10000]

attnflow: `attnflow.analysis.stability.jacobians` (jacfwd, vmapped, one jit) then NumPy eigvals on the host.
Peer (same run): batched NumPy central finite differences of the same layer map (2 nd = 60 batched evaluations),
then host eigvals of its (nd x nd) extrinsic Jacobians, as a user's script would (attnflow's eig runs on the
smaller n(d-1) intrinsic matrices; the split of attnflow's time into Jacobians and eig is printed). Both are checked to agree before timing; warm-up first; median of repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import attnflow as af
from attnflow.analysis import stability as st


def numpy_step(X, V, beta, alpha):
    S = beta * np.einsum("bid,bjd->bij", X, X)
    A = np.exp(S - S.max(-1, keepdims=True))
    A /= A.sum(-1, keepdims=True)
    Y = X + alpha * np.einsum("bij,bjd->bid", A, X) @ V.T
    return Y / np.linalg.norm(Y, axis=-1, keepdims=True)


def numpy_jacobians(X, V, beta, alpha, h=1e-6):
    b, n, d = X.shape
    J = np.empty((b, n * d, n * d))
    for c in range(n * d):
        e = np.zeros(n * d)
        e[c] = h
        e = e.reshape(n, d)
        J[:, :, c] = (numpy_step(X + e, V, beta, alpha) - numpy_step(X - e, V, beta, alpha)).reshape(b, -1) / (2 * h)
    return J


def median_time(fn, repeats=3):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--states", type=int, default=10_000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "jacobian_cpu.json"))
    a = p.parse_args()
    jax.config.update("jax_enable_x64", True)
    n, d, b = 10, 3, a.states
    V = np.diag([1.0, 0.4, -0.3])
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(V), af.Attention("softmax"), 1.0), 0.1)
    X = np.asarray(af.sample.sphere(jax.random.PRNGKey(0), (b, n, d)))

    def ours():
        Jint, Jext, _ = st.jacobians(dyn, X)
        Jext.block_until_ready()
        return np.asarray(Jext), np.linalg.eigvals(np.asarray(Jint))

    def peer():
        J = numpy_jacobians(X, V, 1.0, 0.1)
        return J, np.linalg.eigvals(J)

    Jo, _ = ours()  # warm-up (compile)
    Jp, _ = peer()
    err = float(np.max(np.abs(Jo - Jp)))
    assert err < 1e-6, f"attnflow and the NumPy peer disagree: {err}"
    t_jac = median_time(lambda: st.jacobians(dyn, X)[0].block_until_ready())
    t_ours = median_time(ours)
    t_peer = median_time(peer)
    rec = {
        "benchmark": "jacobian_eig",
        "states": b, "n": n, "d": d, "dtype": "float64",
        "attnflow_jacobians_s": t_jac, "attnflow_total_s": t_ours, "numpy_fd_total_s": t_peer,
        "ratio_numpy_over_attnflow": t_peer / t_ours, "max_abs_diff": err,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "device": str(jax.devices()[0]), "jax": jax.__version__, "numpy": np.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"{b} states, n={n}, d={d}: attnflow jacobians {t_jac:.3f} s, + host eig {t_ours:.3f} s; "
          f"NumPy finite differences + eig {t_peer:.3f} s; ratio {t_peer / t_ours:.2f}x (agree to {err:.1e})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
