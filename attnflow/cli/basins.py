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
    g.add_argument("--coordinator-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the coordinator and the other processes (default 60): a process > 0 "
                   "retries connecting to --coordinator until then, and refuses in one line if nothing answers")
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
    """Manifest entries that identify a run, by value (:meth:`attnflow.io.config.RunConfig.identity`): the config
    as parsed and typed (``beta = 1`` and ``beta = 1.0`` are the same run; defaults filled in), input files by
    SHA-256 (their paths are recorded but are not identity: hosts may mount them differently), dtype, computing
    path (backend, platform). The file as written is recorded for humans under ``config_toml``, not identity."""
    import jax

    ident = cfg.identity()
    return {"config": ident["config"], "config_toml": cfg.raw, "inputs": ident["inputs"],
            "input_paths": {k: v["path"] for k, v in cfg.inputs.items()}, "dtype": ident["dtype"],
            "backend": ident["backend"], "platform": jax.default_backend()}


def _peek_config(path) -> dict:
    """The TOML of the config (one-line errors for a missing or malformed file), without touching JAX."""
    from attnflow.io.config import read_toml

    return read_toml(path)


def _equilibrium(cfg, dyn, k: int, m: int, where: str):
    """The consensus (m = 0) or bipartite (m > 0) state on real eigenvector k; one-line error otherwise."""
    from attnflow.analysis import equilibria as eq

    try:
        return eq.consensus(dyn, k, cfg.tokens) if m == 0 else eq.bipartite(dyn, k, m, cfg.tokens)
    except ValueError as e:
        raise UsageError(f"{cfg.path}: [basins] {where}: {e}") from None


def _run(args):
    import jax

    from attnflow.io.results import RunDirError, RunDirWriter

    dist = _check_args(args)
    out = out_dir(args.out, "basins")  # before any work: an unwritable --out is refused now
    _peek_config(args.config)  # a missing or malformed file is refused before joining a distributed job
    if any(v is not None for v in dist):  # before anything initialises JAX's backend (the config's model does)
        _join(jax, args)
    cfg = load_run_config(args.config)
    if cfg.d < 2:
        raise UsageError(f"{cfg.path}: [model] d = {cfg.d}: a basin study needs d >= 2 (on the sphere S^0 tokens "
                         "never move)")
    lead = jax.process_index() == 0
    pool = _pool_size(cfg, cfg.basins, cfg.basins.samples, cfg.basins_chunk_size)
    fresh = args.resume and out is not None and lead and not (out / "manifest.json").exists()
    try:  # the run directory's one lock is taken now, before any compile, and released on return
        writer = None if out is None else RunDirWriter(out, resume=args.resume, initial=cfg.basins.initial, manifest={
            "config_path": str(cfg.path), **run_identity(cfg)})
    except RunDirError as e:
        raise UsageError(str(e)) from None
    if fresh and not any((out / "chunks").glob("*.parquet")):
        info(f"basins: --resume: {out} holds no run yet; starting one", quiet=args.json)
    with writer if writer is not None else contextlib.nullcontext():
        return _study(args, cfg, pool, writer, out, lead)


def _study(args, cfg, pool, writer, out, lead):
    """The study, the optional local radius and continuation, and the outputs (lines, or the JSON document)."""
    import jax

    from attnflow.analysis import basins as bs
    from attnflow.io.results import RunDirError

    b = cfg.basins
    dyn = cfg.build()
    key = jax.random.PRNGKey(cfg.basins_seed)
    sampler = None
    if not isinstance(b.sampler, str):
        sp = b.sampler
        sampler = bs.Around(_equilibrium(cfg, dyn, sp.eigenvector, sp.split, "sampler").astype(cfg.dtype), sp.radius)
    kw = dict(tokens=None if sampler is not None else cfg.tokens, sampler=sampler, solver=cfg.solver_object(study=True),
              budget=cfg.budget, stop=_checked_stop(cfg, dyn), execution=cfg.basins_execution(pool=pool),
              cluster_tol=b.cluster_tol)
    progress = (not args.no_progress) and sys.stderr.isatty() and not args.json and lead
    try:
        res = bs.basin_fractions(dyn, key, b.samples, ci_width=b.ci_width, run_dir=writer,
                                 progress=True if progress else (_estimate() if lead and not args.no_progress else False),
                                 **kw)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    result = res.to_json()
    local = None
    if b.local is not None:
        loc = b.local
        X = _equilibrium(cfg, dyn, loc.eigenvector, loc.split, "local")
        local = bs.local_basin_radius(dyn, X, jax.random.fold_in(key, 10**6), q=loc.q, samples=loc.samples,
                                      budget=cfg.budget, solver=cfg.solver_object(study=True), stop=cfg.basins_stop)
        result["local"] = local.to_json()
    cont = None
    if b.continuation is not None:
        c = b.continuation
        cont = bs.continuation(dyn, key, b.samples, param=c.param, values=list(c.values), **kw)
        result["continuation"] = {k: v for k, v in cont.to_json().items() if k != "results"}
    if not lead:
        return None  # every process holds the global result; process 0 reports it
    if out is not None:
        _write_outputs(out, cfg, res, cont, result, writer)
    if args.json:
        return result
    return res.lines() + ([local.line()] if local is not None else [])


def _checked_stop(cfg, dyn):
    """The study's Stop with its tol resolved: the config's, or the default of the dtype; one line when the config's
    tol is below the floor the dtype can resolve."""
    import dataclasses

    from attnflow.evolve.options import check_tol
    from attnflow.evolve.solvers import Adaptive

    stop, solver = cfg.basins_stop, cfg.solver_object(study=True)
    dt = None if (cfg.time == "discrete" or isinstance(solver, Adaptive)) else cfg.dt
    try:
        return dataclasses.replace(stop, tol=check_tol(stop.tol, dyn, solver, dt, cfg.dtype, study=True))
    except ValueError as e:
        where = "[basins] tol" if cfg.basins.tol is not None else "[dynamics] tol"
        raise UsageError(f"{cfg.path}: {where}: {e}") from None


def _estimate():
    """``progress(done, total)`` for a run without a progress bar (and without --no-progress): one line on stderr with
    the rate and the time left, once, 10 s after the first finished block, when the study will take more than a
    minute more. The rate is measured from that first block on: the start (compiling, certificates) and blocks
    read back on a resume do not count."""
    import time

    first, said = [None], [False]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if said[0] or done <= 0:
            return
        if first[0] is None:
            first[0] = (now, done)
            return
        t0, d0 = first[0]
        dt = now - t0
        if dt < 10 or done <= d0:
            return
        left = (total - done) * dt / (done - d0)
        if left > 60:
            said[0] = True
            info(f"attnflow basins: {done} of {total} samples, {(done - d0) / dt:.3g} samples/s; about "
                 f"{_duration(left)} to go")

    return report


def _duration(s: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= 2 * size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.0f} s"


def _check_args(args):
    """Refuse inconsistent flags in one line; returns (coordinator, num_processes, process_id)."""
    import math

    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    dist = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in dist):
        if any(v is None for v in dist):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id} of {args.num_processes}")
        _address(args.coordinator)
    t = args.coordinator_timeout
    if not (math.isfinite(t) and 0 < t <= 86400):
        raise UsageError(f"--coordinator-timeout must be a number of seconds in (0, 86400], got {t}")
    return dist


def _address(spec: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address); one line otherwise."""
    host, sep, port = str(spec).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--coordinator must be HOST:PORT with a port in [1, 65535], got {spec!r}")
    return host, int(port)


def _join(jax, args) -> None:
    """Join the ``jax.distributed`` job within ``--coordinator-timeout`` seconds.

    JAX aborts the whole process (a C++ check failure, exit -6, after its own timeout) when it cannot reach the
    coordinator, which no Python code can catch. So a process > 0 first probes the coordinator's port with plain
    TCP connections, retried until the timeout, and refuses in one line when nothing answers; then JAX gets the
    time left as its ``initialization_timeout``. Process 0 runs the coordinator service itself: it waits up to the
    timeout for the other processes (past it, JAX's own abort ends the process: it cannot be turned into one line)."""
    import math
    import socket
    import time

    timeout = args.coordinator_timeout
    deadline = time.monotonic() + timeout
    if args.process_id != 0:
        host, port = _address(args.coordinator)
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UsageError(f"--coordinator {args.coordinator}: no coordinator answered within {timeout:g} s ({last}); "
                                 "start process 0 first, check HOST:PORT, or raise --coordinator-timeout")
            try:
                with socket.create_connection((host, port), timeout=min(left, 2.0)):
                    break
            except OSError as e:  # refused, unreachable, unknown host, timed out: retry until the deadline
                last = e.strerror or str(e) or type(e).__name__
                time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    left = max(1, math.ceil(deadline - time.monotonic()))
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=left)


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
    if res.members is not None and cfg.d == 3:
        pb.sphere_by_label(res.members.finals, list(res.members.names), out / "sphere.png")
    from attnflow._json import plain

    writer.write_json("result.json", plain(result))  # the one result file of the run (strict JSON: no NaN, atomic)
