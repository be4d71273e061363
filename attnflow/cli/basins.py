"""``attnflow basins CONFIG.toml``: Monte Carlo basin fractions, streamed to a resumable run directory."""

from __future__ import annotations

import contextlib
import sys

from ._common import UsageError, emit_json, info, load_run_config, out_dir, plan_chunk, stdout_to_stderr


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "basins",
        help="basin fractions of the attractors, with intervals; resumable",
        description="Sample initial states, simulate, label every final state and report each attractor's basin "
        "fraction with a 95% interval that also covers every unclassified member (not converged, nonfinite, "
        "degenerate, solver failed, saddle). Eigenvectors are named v1, v2, ... (v1 principal). With --out, per-chunk "
        "Parquet tables, a manifest and one result.json are written there "
        "and --resume continues a killed run (one writer per directory; the inputs must be unchanged). "
        + _schema_help(),
    )
    p.add_argument("config")
    p.add_argument("--out", metavar="DIR", help="run directory (Parquet chunks, manifest, result.json, figures)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished chunks")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("multi-host (jax.distributed)", "Start the same command once per process, with the same "
                             "config (and, with --out, a directory all processes share); chunk i runs in process "
                             "i % P, the tallies are all-gathered, and process 0 prints and writes the result.")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, metavar="P")
    g.add_argument("--process-id", type=int, metavar="I")
    return p


def _schema_help() -> str:
    from attnflow.io.config import describe

    return describe("basins")


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    distributed = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    with stdout_to_stderr() if distributed else contextlib.nullcontext():  # gloo prints on stdout
        result = _run(args)
    if isinstance(result, dict):
        emit_json(result)
    elif isinstance(result, list):
        print("\n".join(result))
    return 0


def run_identity(cfg) -> dict:
    """Manifest entries that identify a run beyond its config: input files by SHA-256 (their paths are recorded
    but are not identity: hosts may mount them differently), dtype, computing path (backend, platform)."""
    import jax

    return {"inputs": {k: v["sha256"] for k, v in cfg.inputs.items()}, "input_paths": {k: v["path"] for k, v in cfg.inputs.items()},
            "dtype": cfg.dtype, "backend": cfg.backend, "platform": jax.default_backend()}


def _peek_config(path) -> dict:
    """The TOML of the config (one-line errors for a missing or malformed file), without touching JAX."""
    from attnflow.io.config import read_toml

    return read_toml(path)


def _equilibrium(cfg, eq, dyn, k: int, m: int, where: str):
    """The consensus (m = 0) or bipartite (m > 0) state on real eigenvector k; one-line error otherwise."""
    try:
        return eq.consensus(dyn, k, cfg.tokens) if m == 0 else eq.bipartite(dyn, k, m, cfg.tokens)
    except ValueError as e:
        raise UsageError(f"{cfg.path}: [basins] {where}: {e}") from None


def _run(args):
    import jax

    from attnflow.analysis import basins as bs, equilibria as eq
    from attnflow.io.results import RunDirError, RunDirWriter, hold_lock

    dist = _check_args(args)
    out = out_dir(args.out)  # before any work: an unwritable --out is refused now
    _peek_config(args.config)  # a missing or malformed file is refused before joining a distributed job
    if any(v is not None for v in dist):  # before anything initialises JAX's backend (the config's model does)
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    cfg = load_run_config(args.config)
    b = cfg.basins
    lead = jax.process_index() == 0
    samples = b.samples
    chunk = min(samples, 10_000) if b.chunk_size is None else b.chunk_size  # part of the run's identity: never chosen from free memory
    pool_size = _pool_size(cfg, b, samples, chunk)
    lock = hold_lock(out) if out is not None and lead else None  # noqa: F841 - one writer per run directory, held until return
    dyn = cfg.build()
    key = jax.random.PRNGKey(cfg.seed if b.seed is None else b.seed)
    sampler = None
    if not isinstance(b.sampler, str):
        sp = b.sampler
        X = _equilibrium(cfg, eq, dyn, sp.eigenvector, sp.split, "sampler")
        sampler = bs.around_sampler(X.astype(cfg.dtype), sp.radius)
    sim = cfg.simulate_kwargs()
    sim.pop("saves", None)
    sim.pop("tol", None)
    kw = dict(tokens=cfg.tokens, sampler=sampler, chunk_size=chunk, tol=b.tol if b.tol is not None else (cfg.tol or 1e-7),
              cluster_tol=b.cluster_tol, dtype=cfg.dtype, max_steps=b.max_steps, round_steps=b.round_steps,
              pool_size=pool_size, **sim)
    progress = (not args.no_progress) and sys.stderr.isatty() and not args.json and lead
    try:
        writer = None if out is None else RunDirWriter(out, resume=args.resume, manifest={
            "config": cfg.raw, "config_path": str(cfg.path), **run_identity(cfg)})
        res = bs.basin_fractions(dyn, key, samples, writer=writer, progress=progress,
                                 ci_width=b.ci_width, keep_finals=out is not None and cfg.d == 3, **kw)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    result = res.to_json()
    if b.local is not None:
        loc = b.local
        k, m = loc.eigenvector, loc.split
        X = _equilibrium(cfg, eq, dyn, k, m, "local")
        lb = bs.local_basin_radius(dyn, X, jax.random.fold_in(key, 10**6), q=loc.q, samples=loc.samples, **sim)
        result["local"] = {k_: lb[k_] for k_ in ("equilibrium", "distance", "q", "radius", "lower_bound", "at_least", "bracket")}
    cont = None
    if b.continuation is not None:
        c = b.continuation
        cont = bs.continuation(dyn, key, samples, param=c.param, values=list(c.values), **kw)
        result["continuation"] = {"param": cont["param"], "values": cont["values"], "fractions": cont["fractions"]}
    if not lead:
        return None  # every process holds the global result; process 0 reports it
    if out is not None:
        _write_outputs(out, cfg, res, cont, result, writer)
    if args.json:
        return result
    lines = res.lines()
    if "local" in result:
        lines.append(bs.radius_line("local basin radius", result["local"]))
    return lines


def _check_args(args):
    """Refuse inconsistent flags in one line; returns (coordinator, num_processes, process_id)."""
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    dist = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in dist):
        if any(v is None for v in dist):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id} of {args.num_processes}")
    return dist


def _pool_size(cfg, b, samples, chunk):
    """The member pool: device memory is set by it (speed only, never the result). None (the library's default,
    :func:`attnflow.analysis.basins.basin_fractions`) when the largest default pool fits; a default that does not
    fit is made smaller here; an explicit pool_size that does not fit is refused with a size that does."""
    pool = min(16384, samples, max(chunk, 64)) if b.pool_size is None else b.pool_size
    fit = plan_chunk(cfg, pool, b.pool_size, what=f"{cfg.path}: [basins]", flag="pool_size =")
    if b.pool_size is not None:
        return b.pool_size if fit is None else fit
    if fit is not None:
        info(f"attnflow basins: a pool of {pool} members does not fit in memory; using pool_size = {fit}")
    return fit


def _write_outputs(out, cfg, res, cont, result, writer) -> None:
    """The figures and the one result file of the run (strict JSON, written atomically)."""
    from attnflow.plots import basins as pb

    pb.fractions(res.attractors, out / "fractions.png", title=f"{cfg.path.name}: {res.samples} samples")
    if cont is not None:
        pb.continuation(cont, out / "continuation.png")
    if res.finals is not None:
        pb.sphere_by_label(res.finals, res.names, out / "sphere.png")
    writer.write_json("result.json", result)  # the one result file of the run (strict JSON, atomic)
