"""``attnflow simulate CONFIG.toml``: evolve the configured ensemble and write its trajectories."""

from __future__ import annotations

import io
import sys
import time

import numpy as np

from ._common import UsageError, emit_json, info, load_run_config, out_dir, plan_chunk


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "simulate",
        help="simulate an ensemble from a TOML config",
        description="Simulate the ensemble described by CONFIG.toml. Writes DIR/trajectories.npz (final; trajectory "
        "and ts when [dynamics] saves is set; outcome; steps) and a figure. The memory of the call is estimated "
        "first: a batch that does not fit is run in chunks (or refused with a suggested --chunk-size). "
        + _schema_help(),
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--out", metavar="DIR", help="directory for trajectories.npz and figures")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--chunk-size", type=int, default=None, help="simulate the batch in chunks of this size")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _schema_help() -> str:
    from attnflow.io.config import describe

    return describe("model") + " " + describe("dynamics")


def summarize(final) -> dict:
    """Per-member cosine statistics of the final states. A member whose final state is not finite, or has a token
    of zero norm (an overflowed or degenerate run), has no cosines: it counts as neither consensus nor aligned, and
    ``mean_min_cos`` is the mean over the other members (None when there is none)."""
    X = np.asarray(final, dtype=float)
    with np.errstate(all="ignore"):
        norms = np.linalg.norm(X, axis=-1, keepdims=True)
        ok = np.all(np.isfinite(X), axis=(1, 2)) & np.all((norms > 0) & np.isfinite(norms), axis=(1, 2))
        X = np.where(ok[:, None, None], X / np.where(norms > 0, norms, 1.0), 0.0)
        G = np.einsum("bid,bjd->bij", X, X)
    n = X.shape[1]
    iu = np.triu_indices(n, 1)
    off = G[:, iu[0], iu[1]] if n > 1 else np.ones((X.shape[0], 1))
    return {
        "consensus_fraction": float(np.mean(ok & np.all(off > 1 - 1e-4, axis=1))),
        "antipodal_or_aligned_fraction": float(np.mean(ok & np.all(np.abs(off) > 1 - 1e-4, axis=1))),
        "mean_min_cos": float(np.mean(off.min(axis=1)[ok])) if ok.any() else None,
        "members_with_cosines": int(np.sum(ok)),
    }


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import attnflow as af

    if args.chunk_size is not None and args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    out = out_dir(args.out, "simulate")  # before any work: an unwritable --out is refused now, not after the run
    cfg = load_run_config(args.config)
    quiet = args.json
    item = 4 if cfg.dtype == "float32" else 8
    saved = (cfg.saves + 1) if cfg.saves is not None else 2
    chunk = plan_chunk(cfg, cfg.batch, args.chunk_size, what=f"batch = {cfg.batch}", flag="--chunk-size",
                       host_per_member=item * cfg.tokens * cfg.d * (saved + 1))
    if chunk is not None and args.chunk_size is None:
        info(f"attnflow simulate: the batch does not fit in memory at once; simulating in chunks of {chunk} (--chunk-size to choose)")
    dyn = cfg.build()
    x0 = cfg.initial()
    if cfg.tol is not None:  # a tol below what the dtype resolves would never stop a member: one line now
        from attnflow.evolve.options import check_tol
        from attnflow.evolve.solvers import Adaptive

        solver = cfg.solver_object()
        try:
            check_tol(cfg.tol, dyn, solver, None if (cfg.time == "discrete" or isinstance(solver, Adaptive)) else cfg.dt, cfg.dtype)
        except ValueError as e:
            raise UsageError(f"{cfg.path}: [dynamics] tol: {e}") from None
    info(f"simulating {cfg.batch} x {cfg.tokens} tokens in d={cfg.d} ({cfg.time}, {cfg.attention}, {cfg.num_heads} head(s))", quiet=quiet)
    t0 = time.perf_counter()
    sol = af.simulate(dyn, x0, cfg.budget, solver=cfg.solver_object(), saves=cfg.saves, stop=cfg.stop,
                      execution=cfg.execution(chunk=chunk), progress=(not args.no_progress) and sys.stderr.isatty())
    np.asarray(sol.final)
    wall = time.perf_counter() - t0
    summary = {
        "config": str(cfg.path),
        "time": cfg.time,
        "batch": cfg.batch,
        "tokens": cfg.tokens,
        "d": cfg.d,
        "heads": cfg.num_heads,
        "dtype": cfg.dtype,
        "backend": sol.backend,
        "outcomes": sol.outcome_counts(),
        "steps_mean": float(np.mean(np.asarray(sol.steps))),
        "steps_max": int(np.max(np.asarray(sol.steps))),
        "seconds": wall,
        **summarize(sol.final),
        "files": [],
    }
    if out is not None:
        summary["files"] += _write_outputs(out, sol, x0, cfg)
    if args.json:
        emit_json(summary)
    else:
        st = ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items() if v)
        print(f"{cfg.batch} members in {wall:.2f} s: {st}; mean steps {summary['steps_mean']:.1f}")
        print(f"consensus {summary['consensus_fraction']:.3f}, all tokens on one axis {summary['antipodal_or_aligned_fraction']:.3f}")
        for f in summary["files"]:
            print(f"wrote {f}")
    return 0


def _write_outputs(out, sol, x0, cfg) -> list[str]:
    """trajectories.npz (written atomically) and the figures; returns the paths written."""
    files: list[str] = []
    arrays = {"final": np.asarray(sol.final), "outcome": np.asarray(sol.outcome), "steps": np.asarray(sol.steps)}
    if sol.trajectory is not None:
        arrays["trajectory"] = np.asarray(sol.trajectory)
        arrays["ts"] = np.asarray(sol.ts)
    from attnflow.io.results import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out / "trajectories.npz", buf.getvalue())  # complete or absent, never partial
    files.append(str(out / "trajectories.npz"))
    from attnflow.plots.trajectories import pairwise_cosines, sphere_trajectories

    traj = arrays.get("trajectory")
    ts = arrays.get("ts")
    if traj is None:  # only the start and the end were kept
        traj = np.stack([np.asarray(x0), arrays["final"]])
        ts = np.array([0.0, float(cfg.steps if cfg.time == "discrete" else cfg.t1)])
    if cfg.d == 3:
        sphere_trajectories(traj, out / "sphere.png", title=f"{cfg.path.name}")  # returns the Figure drawn
        files.append(str(out / "sphere.png"))
    pairwise_cosines(traj, ts, out / "cosines.png")
    files.append(str(out / "cosines.png"))
    return files
