"""The attnflow benchmark suite: every workload against every peer available on this machine.

    python -m benchmarks.run [--quick] [--json] [--tiny] [--out benchmarks/results] [--no-plot]
    attnflow bench [--quick] [--json]            (the same code)

Figure of merit: token-steps per second, B * n * steps / seconds (median of repeats, after a warm-up
that also checks the peer against attnflow). Sizes: GPU sizes per issue 7 when JAX sees a GPU, reduced
CPU sizes otherwise (``--quick`` smaller still, ``--tiny`` for tests).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import peers

TOL = {"map": 2e-4, "rk4": 2e-4, "adaptive": 2e-3}
"""Max abs difference allowed between a peer's final state and attnflow's (float32, unit vectors)."""


# ----------------------------------------------------------------------------- workloads
def make_weights(H, dh, d, seed, beta, alpha):
    rng = np.random.default_rng(seed)
    s = 1.0 / np.sqrt(d)
    w = {
        "Q": (rng.standard_normal((H, dh, d)) * s).astype(np.float32),
        "K": (rng.standard_normal((H, dh, d)) * s).astype(np.float32),
        "V": (rng.standard_normal((H, dh, d)) * s).astype(np.float32),
        "O": (rng.standard_normal((H, d, dh)) * s / np.sqrt(H)).astype(np.float32),
        "beta": np.float32(beta),
        "alpha": np.float32(alpha),
    }
    if H == 1 and dh == d:
        w["O"] = np.eye(d, dtype=np.float32)[None]
    return w


def initial(B, n, d, seed=1):
    x = np.random.default_rng(seed).standard_normal((B, n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def flops_per_token_step(H, dh, d, n):
    """Multiply-adds counted as 2 flops; exp and division as 1 each."""
    proj = 2 * 3 * H * dh * d + 2 * H * d * dh  # q, k, v, O
    attn = H * (2 * n * dh + 3 * n + 2 * n * dh)  # scores, softmax (max, exp, sum), a @ v
    return proj + attn + 3 * d + 2 * d + 2  # residual, norm


def sizes(backend, mode):
    """Batch sizes and steps per workload for this backend and mode."""
    gpu = backend == "gpu"
    if mode == "tiny":
        return {
            "toy": dict(Bs=[8], steps=4, slow_B=2),
            "toy_mh": dict(Bs=[8], steps=4, slow_B=2),
            "albert": dict(Bs=[2], steps=2, slow_B=1),
            "continuous": dict(Bs=[8], steps=4, slow_B=2),
        }
    if gpu:
        q = mode == "quick"
        return {
            "toy": dict(Bs=[10**4, 10**5] + ([] if q else [10**6]), steps=200 if q else 1000, slow_B=100, np_B=10**4),
            "toy_mh": dict(Bs=[10**4, 10**5] + ([] if q else [10**6]), steps=200, slow_B=100, np_B=10**4),
            "albert": dict(Bs=[256] + ([1024] if q else [1024, 4096]), steps=24, slow_B=4, np_B=16),
            "continuous": dict(Bs=[10**4, 10**5], steps=100, slow_B=50, np_B=10**4),
        }
    q = mode == "quick"
    return {
        "toy": dict(Bs=[256, 2048, 8192] if q else [256, 2048, 16384, 65536], steps=100, slow_B=8, np_B=2048),
        "toy_mh": dict(Bs=[256, 2048] if q else [256, 2048, 16384], steps=100, slow_B=8, np_B=2048),
        "albert": dict(Bs=[8, 32] if q else [8, 32, 128], steps=24, slow_B=2),
        "continuous": dict(Bs=[256, 2048] if q else [256, 2048, 16384], steps=50, slow_B=4, np_B=2048),
    }


WORKLOADS = {
    # name: (H, dh, d, n, beta, alpha, kind)
    "toy": (1, 3, 3, 10, 2.0, 0.5, "map"),
    "toy_mh": (5, 3, 3, 10, 2.0, 0.5, "map"),
    "albert": (12, 64, 768, 10, 1.0, 1.0, "map"),
    "continuous": (1, 3, 3, 10, 2.0, 0.05, "rk4"),  # alpha column = dt
}


# ----------------------------------------------------------------------------- attnflow
def fast_backend(n, d):
    """The backend the suite times as ``attnflow``: for small states (n d <= 256 scalars) the unrolled lanes path
    on a CPU and the fused kernel on a GPU, else ``auto``. The suite times the steady state after a warm-up call,
    so it names the backend explicitly instead of letting ``auto`` weigh the compile against the call size
    (``ATTNFLOW_BENCH_BACKEND`` overrides it)."""
    import jax

    from attnflow.evolve.backends import MAX_STATE

    if n * d > MAX_STATE:
        return "auto"
    return os.environ.get("ATTNFLOW_BENCH_BACKEND") or ("fused" if jax.default_backend() == "gpu" else "lanes")


def attnflow_impl(w, kind, dt, adaptive=False, backend=None):
    """The public ``simulate`` on ``backend`` (default :func:`fast_backend`; adaptive solves run on ``xla``)."""
    import jax.numpy as jnp

    import attnflow as af
    from attnflow.evolve.solvers import RK4, Adaptive
    from attnflow.model.dynamics import LayerMap, SphereFlow
    from attnflow.model.heads import Heads, SelfAttention

    hd = Heads(*(jnp.asarray(w[k]) for k in ("Q", "K", "V", "O")))
    backend = "xla" if adaptive else (backend or fast_backend(10, hd.dim))
    attn = SelfAttention(hd, beta=jnp.float32(w["beta"]))
    if kind == "map":
        dyn = LayerMap(attn, alpha=jnp.float32(w["alpha"]))

        def run(X0, steps):
            return af.simulate(dyn, jnp.asarray(X0), steps=steps, backend=backend).final.block_until_ready()

    else:
        dyn = SphereFlow(attn)
        solver = Adaptive(rtol=1e-5, atol=1e-6) if adaptive else RK4()

        def run(X0, steps):
            t1 = float(steps * dt)
            kw = dict(t1=t1, solver=solver) if adaptive else dict(t1=t1, dt=dt, solver=solver)
            return af.simulate(dyn, jnp.asarray(X0), backend=backend, **kw).final.block_until_ready()

    return run


# ----------------------------------------------------------------------------- timing
def time_it(run, X0, steps, repeats, min_time):
    run(X0, steps)  # warm-up (compile)
    ts = []
    t_start = time.perf_counter()
    while len(ts) < repeats or (time.perf_counter() - t_start < min_time and len(ts) < 50):
        t = time.perf_counter()
        run(X0, steps)
        ts.append(time.perf_counter() - t)
        if len(ts) >= 2 and sum(ts) > 4 * min_time:
            break
    return statistics.median(ts), len(ts)


def matmul_rate(backend, size=2048, repeats=5):
    """Measured float32 matmul rate (flop/s) through XLA (default precision) and NumPy."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    out = {}
    A, Bm = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(jnp.matmul)
    f(A, Bm).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(A, Bm).block_until_ready()
        ts.append(time.perf_counter() - t)
    out["xla"] = 2 * size**3 / statistics.median(ts)
    if backend != "gpu":
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        out["numpy"] = 2 * size**3 / statistics.median(ts)
    out["size"] = size
    return out


def env_info():
    import jax

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = int(os.environ.get("ATTNFLOW_BENCH_TORCH_THREADS", "1"))
    except Exception:
        info["torch"] = None
    try:
        import attnflow

        info["attnflow"] = attnflow.__version__
    except Exception:
        pass
    return info


# ----------------------------------------------------------------------------- the suite
def run_suite(mode="full", workloads=None, impls=None, log=print):
    """Run the suite. Returns ``(records, info)``; records are dicts with workload, impl, B, steps,
    token_steps_per_s (plus seconds, max_abs_diff)."""
    import jax

    backend = jax.default_backend()
    info = env_info()
    sz = sizes(backend, mode)
    repeats = 1 if mode == "tiny" else 3
    min_time = 0.0 if mode == "tiny" else 0.5
    records = []
    names = list(WORKLOADS) if workloads is None else list(workloads)
    have_torch = peers.torch_available()
    for wl in names:
        H, dh, d, n, beta, alpha, kind = WORKLOADS[wl]
        dt = alpha if kind == "rk4" else None
        w = make_weights(H, dh, d, seed=sum(map(ord, wl)), beta=beta, alpha=alpha if kind == "map" else 1.0)
        s = sz[wl]
        steps = s["steps"]
        Bmax = max(s["Bs"])
        check_B = min(4, Bmax)
        X_check = initial(check_B, n, d, seed=7)
        cand = {
            "attnflow": lambda: attnflow_impl(w, kind, dt),
            "numpy_loop": lambda: peers.numpy_loop(w, kind, dt),
            "numpy_batched": lambda: peers.numpy_batched(w, kind, dt),
            "jax_plain": lambda: peers.jax_plain(w, kind, dt),
        }
        if have_torch:
            cand["torch"] = lambda: peers.torch_peer(w, kind, dt)
            cand["torch_compile"] = lambda: peers.torch_peer(w, kind, dt, compile=True)
        cand["attnflow_xla"] = lambda: attnflow_impl(w, kind, dt, backend="xla")
        if kind == "rk4":
            cand["attnflow_adaptive"] = lambda: attnflow_impl(w, kind, dt, adaptive=True)
        ref = attnflow_impl(w, kind, dt)(X_check, steps)
        ref = np.asarray(ref)
        for impl, make in cand.items():
            if impls is not None and impl not in impls:
                continue
            try:
                run = make()
                got = np.asarray(run(X_check, steps))
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                log(f"  {wl:10s} {impl:18s} skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            diff = float(np.max(np.abs(got - ref)))
            tol = TOL["adaptive" if impl == "attnflow_adaptive" else kind]
            if not np.isfinite(diff) or diff > tol:
                raise AssertionError(f"{wl}/{impl} disagrees with attnflow: max |diff| = {diff:.3g} > {tol}")
            if impl == "numpy_loop":
                Bs = [s["slow_B"]]
            elif impl == "numpy_batched" or (impl.startswith("torch") and backend != "gpu"):
                Bs = [b for b in s["Bs"] if b <= s.get("np_B", Bmax)] or [min(s["Bs"])]
            else:
                Bs = s["Bs"]
            for B in Bs:
                X0 = initial(B, n, d, seed=3)
                sec, reps = time_it(run, X0, steps, repeats, min_time)
                tps = B * n * steps / sec
                rec = dict(workload=wl, impl=impl, B=int(B), steps=int(steps), token_steps_per_s=tps,
                           seconds=sec, repeats=reps, max_abs_diff=diff, tol=tol)
                records.append(rec)
                log(f"  {wl:10s} {impl:18s} B={B:<8d} steps={steps:<5d} {tps:10.3e} token-steps/s  "
                    f"({sec * 1e3:.1f} ms, |diff|={diff:.1e})")
    info["matmul_flops_per_s"] = matmul_rate(backend, size=256 if mode == "tiny" else 2048)
    info["flops_per_token_step"] = {k: flops_per_token_step(*v[:4]) for k, v in WORKLOADS.items()}
    info["mode"] = mode
    info["attnflow_backend"] = {wl: fast_backend(WORKLOADS[wl][3], WORKLOADS[wl][2]) for wl in WORKLOADS}
    return records, info


def best(records, wl, impl):
    r = [x for x in records if x["workload"] == wl and x["impl"] == impl]
    return max(r, key=lambda x: x["token_steps_per_s"]) if r else None


def table(records, info):
    """Best token-steps/s per (workload, impl) and attnflow's ratio to each peer."""
    lines = []
    wls = list(dict.fromkeys(r["workload"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lines.append(f"{'workload':10s} {'impl':18s} {'B':>8s} {'token-steps/s':>14s} {'attnflow / impl':>16s}")
    for wl in wls:
        a = best(records, wl, "attnflow")
        for impl in impls:
            r = best(records, wl, impl)
            if r is None:
                continue
            ratio = "" if a is None else f"{a['token_steps_per_s'] / r['token_steps_per_s']:.2f}x"
            lines.append(f"{wl:10s} {impl:18s} {r['B']:>8d} {r['token_steps_per_s']:>14.3e} {ratio:>16s}")
    mm = info.get("matmul_flops_per_s", {})
    a = best(records, "albert", "attnflow")
    if a and mm:
        fl = a["token_steps_per_s"] * info["flops_per_token_step"]["albert"]
        lines.append(f"albert attnflow: {fl / 1e9:.1f} GFLOP/s = {fl / mm['xla']:.0%} of the measured XLA "
                     f"float32 matmul rate ({mm['xla'] / 1e9:.1f} GFLOP/s at {mm['size']}^3)")
    return "\n".join(lines)


def plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    wls = list(dict.fromkeys(r["workload"] for r in records))
    fig, axes = plt.subplots(1, len(wls), figsize=(4.2 * len(wls), 3.8), squeeze=False)
    for ax, wl in zip(axes[0], wls):
        for impl in dict.fromkeys(r["impl"] for r in records if r["workload"] == wl):
            rs = sorted((r for r in records if r["workload"] == wl and r["impl"] == impl), key=lambda r: r["B"])
            ax.plot([r["B"] for r in rs], [r["token_steps_per_s"] for r in rs], "o-", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("batch size B (ensembles)")
        ax.set_ylabel("token-steps / s")
        ax.set_title(wl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on a 2-core CPU)")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (tests)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list on stdout")
    p.add_argument("--workloads", default=None, help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                   help="folder for the results JSON and the plot ('' to write nothing)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    try:
        return run_cli(a)
    except ValueError as e:  # bad input (e.g. an unknown workload): one line, exit status 2
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


def run_cli(a) -> int:
    mode = "tiny" if a.tiny else ("quick" if a.quick else "full")
    wls = None if not a.workloads else a.workloads.split(",")
    for wl in wls or []:
        if wl not in WORKLOADS:
            raise ValueError(f"unknown workload {wl!r}; expected some of {', '.join(WORKLOADS)}")
    impls = None if not a.impls else a.impls.split(",")
    known = ("numpy_loop", "numpy_batched", "jax_plain", "torch", "torch_compile", "attnflow", "attnflow_xla",
             "attnflow_adaptive")
    for im in impls or []:
        if im not in known:
            raise ValueError(f"unknown implementation {im!r}; expected some of {', '.join(known)}")
    log = (lambda m: print(m, file=sys.stderr)) if a.json else print
    records, info = run_suite(mode, wls, impls, log=log)
    if a.json:
        from attnflow._json import dumps  # the one strict writer: a failed timing is null, never NaN

        print(dumps([{k: r[k] for k in ("workload", "impl", "B", "steps", "token_steps_per_s")} for r in records]))
    else:
        print(table(records, info))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = f"{info['backend']}_{mode}"
        from attnflow._json import dumps

        with open(os.path.join(a.out, f"suite_{tag}.json"), "w") as f:
            f.write(dumps({"info": info, "records": records}, indent=1))
        if not a.no_plot:
            plot(records, os.path.join(a.out, f"suite_{tag}.png"))
        log(f"wrote {a.out}/suite_{tag}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
