"""``attnflow basins CONFIG.toml``: Monte Carlo basin fractions, streamed to a resumable run directory."""

from __future__ import annotations

import contextlib
import sys

from ._common import UsageError, emit_json, info, out_dir, stdout_to_stderr

KEYS = {"samples", "seed", "chunk_size", "tol", "cluster_tol", "ci_width", "sampler", "continuation", "local"}


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "basins",
        help="basin fractions of the attractors, with intervals; resumable",
        description="Sample initial states, simulate, label every final state and report each attractor's basin "
        "fraction with a 95%% Wilson interval. [basins] table: samples, seed, chunk_size, tol, cluster_tol, ci_width "
        "(adaptive), sampler = 'uniform' or {around = 'consensus'|'bipartite', eigenvector = 0, split = 1, radius = 0.1}, "
        "continuation = {param = 'beta'|'alpha', values = [...]}, local = {eigenvector = 0, split = 0, q = 0.9, samples = 128}. "
        "With --out, per-chunk Parquet tables and a manifest are written there and --resume continues a killed run.",
    )
    p.add_argument("config")
    p.add_argument("--out", metavar="DIR", help="run directory (Parquet chunks, manifest, summary, figures)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished chunks")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("multi-host (jax.distributed)", "Start the same command once per process, with the same "
                             "config (and, with --out, a directory all processes share); chunk i runs in process "
                             "i %% P, the tallies are all-gathered, and process 0 prints and writes the result.")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, metavar="P")
    g.add_argument("--process-id", type=int, metavar="I")
    return p


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


def _run(args):
    import jax

    from attnflow.analysis import basins as bs, equilibria as eq
    from attnflow.io.config import load_config
    from attnflow.io.results import RunDirError

    cfg = load_config(args.config)
    sec = cfg.section("basins")
    dist = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in dist):
        if any(v is None for v in dist):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id} of {args.num_processes}")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    lead = jax.process_index() == 0
    unknown = sorted(set(sec) - KEYS)
    if unknown:
        raise UsageError(f"{cfg.path}: unknown key(s) in [basins]: {', '.join(unknown)} (allowed: {', '.join(sorted(KEYS))})")
    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR (the run directory to continue)")
    out = out_dir(args.out)
    dyn = cfg.build()
    samples = int(sec.get("samples", 1000))
    chunk = int(sec.get("chunk_size", min(samples, 10_000)))
    if samples < 1 or chunk < 1:
        raise UsageError(f"{cfg.path}: [basins] samples and chunk_size must be >= 1")
    key = jax.random.PRNGKey(int(sec.get("seed", cfg.seed)))
    sampler = None
    spec = sec.get("sampler", "uniform")
    if isinstance(spec, dict):
        k, m, r = int(spec.get("eigenvector", 0)), int(spec.get("split", 0)), float(spec.get("radius", 0.1))
        X = eq.consensus(dyn, k, cfg.tokens) if spec.get("around", "consensus") == "consensus" or m == 0 else eq.bipartite(dyn, k, m, cfg.tokens)
        sampler = bs.around_sampler(X.astype(cfg.dtype), r)
    elif spec != "uniform":
        raise UsageError(f"{cfg.path}: [basins] sampler must be 'uniform' or a table {{around, eigenvector, split, radius}}")
    sim = cfg.simulate_kwargs()
    sim.pop("saves", None)
    sim.pop("tol", None)
    kw = dict(tokens=cfg.tokens, sampler=sampler, chunk_size=chunk, tol=float(sec.get("tol", cfg.tol or 1e-7)),
              cluster_tol=float(sec.get("cluster_tol", 1e-3)), dtype=cfg.dtype, **sim)
    progress = (not args.no_progress) and sys.stderr.isatty() and not args.json and lead
    try:
        res = bs.basin_fractions(dyn, key, samples, run_dir=out, resume=args.resume, progress=progress,
                                 ci_width=sec.get("ci_width"), keep_finals=out is not None and cfg.d == 3,
                                 manifest={"config": cfg.raw, "config_path": str(cfg.path)}, **kw)
    except RunDirError as e:
        raise UsageError(str(e)) from None
    result = res.to_json()
    if "local" in sec:
        loc = sec["local"]
        k, m = int(loc.get("eigenvector", 0)), int(loc.get("split", 0))
        X = eq.consensus(dyn, k, cfg.tokens) if m == 0 else eq.bipartite(dyn, k, m, cfg.tokens)
        lb = bs.local_basin_radius(dyn, X, jax.random.fold_in(key, 10**6), q=float(loc.get("q", 0.9)),
                                   samples=int(loc.get("samples", 128)), **sim)
        result["local"] = {"eigenvector": k, "split": m, "q": lb["q"], "radius": lb["radius"], "bracket": lb["bracket"]}
    cont = None
    if "continuation" in sec:
        c = sec["continuation"]
        try:
            cont = bs.continuation(dyn, key, samples, param=c["param"], values=c["values"], **kw)
        except (KeyError, ValueError) as e:
            raise UsageError(f"{cfg.path}: [basins] continuation needs param and values: {e}") from None
        result["continuation"] = {"param": cont["param"], "values": cont["values"], "fractions": cont["fractions"]}
    if not lead:
        return None  # every process holds the global result; process 0 reports it
    if out is not None:
        from attnflow.plots import basins as pb

        pb.fractions(res.attractors, out / "fractions.png", title=f"{cfg.path.name}: {res.samples} samples")
        if cont is not None:
            pb.continuation(cont, out / "continuation.png")
        if res.finals is not None:
            from attnflow.analysis.classify import describe

            n = cfg.tokens
            pb.sphere_by_label(res.finals, [describe(r, n)["label"] for r in res.rows[: len(res.finals)]], out / "sphere.png")
        (out / "result.json").write_text(__import__("json").dumps(result, indent=2, default=float))
    if args.json:
        return result
    info(f"{res.samples} samples, {res.unconverged} not converged", quiet=False)
    lines = [f"{a['label']:32s} {a['fraction']:.4f}  [{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}]  n={a['count']}" for a in res.attractors]
    if "local" in result:
        lines.append(f"local basin radius (q={result['local']['q']}): {result['local']['radius']:.4g}")
    return lines
