"""``attnflow metastability CONFIG.toml``: metastable plateaus, dwell times and phase diagrams over a sweep of beta
and n. The model comes from ``[model]`` and ``[dynamics]`` (``time``, ``norm``, ``dtype``, ``seed``), the sweep from
``[metastability]`` (see ``attnflow metastability --help``).

With ``--out DIR`` every n is saved as soon as it is computed (``episodes_n<N>.npz``); a second run with the same
settings loads them and computes only the rest, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from ._common import UsageError, emit_json, info, load_run_config, out_dir, releasing_locks


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    from attnflow.io.config import describe

    p = sub.add_parser(
        "metastability",
        help="metastable plateaus, dwell times and phase diagrams over beta and n",
        description="Run members uniform on the sphere for every n and beta of [metastability], find their "
        "metastable episodes inside the compiled loop (speed below a fraction of its peak, constant cluster count, "
        "for a minimum duration: docs/model.md section 11) and report the cluster count at the first plateau, dwell "
        "times per cluster count and escape times with 95% intervals, the exponential rate of the dwell times in "
        "beta, and phase diagrams. " + describe("metastability"),
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="directory for metastability.json, the figures and the per-n episodes "
                   "(a rerun with the same settings resumes)")
    return p


def _settings(cfg) -> dict:
    """What identifies a run, by value: the config with its input files (``[model] weights``, ...) by content
    (:meth:`~attnflow.io.config.RunConfig.identity`), not by path, so that a changed file is never resumed."""
    m = cfg.metastability
    seed = cfg.seed if m.seed is None else m.seed
    return dict(config=cfg.identity(), seed=seed, table={f.name: getattr(m, f.name) for f in dataclasses.fields(m)})


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _stamp(settings: dict) -> str:
    """The SHA-256 of a run's settings: every file a run saves carries it, so that a resume loads only its own."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _save_n(out: Path, n: int, ep, ser, stamp: str) -> None:
    from attnflow.io.results import atomic_write_bytes

    arrays = {f"ep_{f.name}": np.asarray(getattr(ep, f.name)) for f in dataclasses.fields(ep)}
    if ser is not None:
        arrays.update({f"ser_{f.name}": np.asarray(getattr(ser, f.name)) for f in dataclasses.fields(ser)})
    arrays.update(meta_run=np.asarray(stamp), meta_n=np.asarray(n))  # whose run, which n
    atomic_write_bytes(out / f"episodes_n{n}.npz", _npz_bytes(arrays))


def _same_settings(out: Path, settings: dict) -> bool:
    p = out / "settings.json"
    try:
        old = json.loads(p.read_text()) if p.exists() else None
    except (OSError, ValueError):
        old = None
    if old == json.loads(json.dumps(settings)):
        return True
    from attnflow.io.results import clear_outputs

    # another run's files (or those of a run whose settings are lost): never mixed into this one, nor left beside it
    if clear_outputs(out, "metastability"):
        info(f"metastability: {out} holds a run with other (or unreadable) settings; starting afresh")
    return False


def _load_done(out: Path, tokens, stamp: str) -> dict:
    """The n already computed by an earlier run with the same settings (files stamped with that run and their n;
    any other, or one unreadable in any way, is computed again)."""
    from attnflow.analysis.metastability import Episodes, Series

    done = {}
    for n in tokens:
        f = out / f"episodes_n{n}.npz"
        if not f.exists():
            continue
        try:
            with np.load(f) as z:
                if str(z["meta_run"]) != stamp or int(z["meta_n"]) != n:
                    continue
                ep = Episodes(**{k[3:]: z[k] for k in z.files if k.startswith("ep_")})
                ser_keys = [k for k in z.files if k.startswith("ser_")]
                ser = Series(**{k[4:]: z[k] for k in ser_keys}) if ser_keys else None
        except Exception:  # noqa: BLE001 - truncated (BadZipFile), damaged, foreign: computed again
            continue
        done[n] = (ep, ser)
    return done


def _run(args, locks: list) -> int:
    """Entry point of ``attnflow metastability``."""
    from attnflow.analysis import metastability as ms
    from attnflow.io.results import atomic_write_bytes, hold_lock

    out = out_dir(args.out, "metastability")
    cfg = load_run_config(args.config)
    m = cfg.metastability
    try:
        rule = ms.Plateaus(fraction=m.fraction, min_duration=m.min_duration, eps=m.eps, check=m.check,
                           max_episodes=m.max_episodes)
        rule.check_dtype(cfg.dtype)
        ms.check_span(m.t1, 1.0 if cfg.time == "discrete" else m.dt)
        if m.min_duration > m.t1:
            raise ValueError(f"min_duration = {m.min_duration:g} is longer than t1 = {m.t1:g}: no plateau could be "
                             "found")
    except ValueError as e:
        raise UsageError(f"{cfg.path}: [metastability] {e}") from None
    if cfg.time != "continuous":
        info("metastability: [dynamics] time = 'discrete': t1 counts map steps", quiet=args.json)
    dyn = cfg.build()
    settings = _settings(cfg)
    tokens = tuple(m.tokens)
    done, same, stamp = {}, False, _stamp(settings)
    if out is not None:
        locks.append(hold_lock(out))  # one process per directory, held until this command ends
        same = _same_settings(out, settings)
        done = _load_done(out, tokens, stamp) if same else {}
        atomic_write_bytes(out / "settings.json", json.dumps(settings, indent=1).encode())
        if done:
            info(f"metastability: resuming: n = {sorted(done)} loaded from {out}")
    import jax

    key = jax.random.PRNGKey(settings["seed"])
    dt = None if cfg.time == "discrete" else m.dt

    def progress(i, total, n):
        info(f"metastability: n = {n} ({i + 1}/{total}), {len(m.betas)} betas x {m.members} members, t1 = {m.t1:g}",
             quiet=args.json)

    res = ms.metastability(dyn, key, tokens=tokens, betas=m.betas, members=m.members, t1=m.t1, dt=dt, rule=rule,
                           trace=m.trace, progress=progress, done=done,
                           on_done=None if out is None else (lambda n, ep, ser: _save_n(out, n, ep, ser, stamp)))
    summary = dict(config=str(cfg.path), **res.to_dict())
    phases = []
    if m.phase:
        pkey = jax.random.fold_in(key, 1)
        phases.append(_phase(out, same, stamp, "t", lambda: ms.phase_t_beta(
            dyn, pkey, tokens=tokens[0], betas=m.betas, members=m.members, t1=m.t1, dt=dt, eps=m.eps,
            check=max(m.check, m.t1 / 200))))
        if len(tokens) > 1:
            phases.append(_phase(out, same, stamp, "tokens", lambda: ms.phase_at_time(
                dyn, pkey, over="tokens", values=tokens, betas=m.betas, members=m.members, time=m.t1, dt=dt,
                eps=m.eps)))
        summary["phase"] = [p.to_dict() for p in phases]
    if out is not None:
        _write_files(out, res, phases, summary)
    if args.json:
        emit_json(summary)
    else:
        _print_text(cfg, res, phases, out)
    return 0


def _phase(out, same: bool, stamp: str, name: str, compute):
    """A phase diagram: loaded from an earlier run with the same settings (its file stamped with that run), or
    computed (and saved at once)."""
    from attnflow._json import dumps
    from attnflow.analysis.metastability import PhaseDiagram
    from attnflow.io.results import atomic_write_bytes

    f = None if out is None else out / f"phase_{name}_beta.json"
    if f is not None and same and f.exists():
        try:
            saved = json.loads(f.read_text())
            if saved.pop("run") == stamp:
                return PhaseDiagram.from_dict(saved)
        except Exception:  # noqa: BLE001 - unreadable, damaged or another run's: computed again
            pass
    p = compute()
    if f is not None:
        atomic_write_bytes(f, dumps({**p.to_dict(), "run": stamp}, indent=1).encode())
    return p


def _write_files(out: Path, res, phases, summary) -> None:
    from attnflow._json import dumps
    from attnflow.io.results import atomic_write_bytes
    from attnflow.plots import metastability as pm

    atomic_write_bytes(out / "metastability.json", dumps(summary, indent=1).encode())
    frame = res.to_frame()
    atomic_write_bytes(out / "first_plateau.csv", frame.to_csv(index=False).encode())
    for n in res.tokens:
        pm.first_counts(res, out / f"first_counts_n{n}.png", tokens=n)
        pm.dwell_vs_beta(res, out / f"dwell_n{n}.png", tokens=n)
        if res.series[n] is not None:
            pm.staircase(res, out / f"staircase_n{n}.png", tokens=n, beta=res.betas[len(res.betas) // 2])
    for i, p in enumerate(phases):
        pm.phase(p, out / f"phase_{p.col_name}_beta.png")


def _print_text(cfg, res, phases, out) -> None:
    print(f"attnflow metastability: {cfg.path.name} ({cfg.time}, {cfg.attention}, d = {cfg.d}); "
          f"{res.cells[0].members} members per (n, beta), t1 = {res.t1:g}")
    print(f"{'n':>6s} {'beta':>6s} {'mode':>4s} {'k*':>3s}  first-plateau counts (fraction [95%])      "
          f"{'no plateau':>10s}  first dwell (median [95%])")
    for c in res.cells:
        counts = ", ".join(f"{k}: {v[1]:.2f} [{v[2]:.2f}, {v[3]:.2f}]" for k, v in sorted(c.first_counts.items()))
        fd = c.first_dwell
        dwell = "-" if fd.events + fd.censored == 0 else (
            f"{fd.value:.3g} [{fd.lo:.3g}, {fd.hi:.3g}]" if fd.known else f"> {fd.value:.3g} (not reached in the run)")
        ks = "-" if c.k_star is None else str(c.k_star)
        mode = "-" if c.mode is None else str(c.mode)
        print(f"{c.tokens:6d} {c.beta:6g} {mode:>4s} {ks:>3s}  {counts:40s} {c.no_plateau:10d}  {dwell}")
    for (n, k), r in sorted(res.rates.items()):
        print(f"dwell time of {k}-cluster plateaus, n = {n}: log T = {r.intercept:.3g} + r beta, "
              f"r = {r.rate:.3g} [{r.lo:.3g}, {r.hi:.3g}] over beta = {list(r.betas)}")
    for p in phases:
        if p.col_name == "t":
            ct = p.clustering_time()
            shown = ", ".join(f"beta {b:g}: {'> t1' if np.isnan(t) else f'{t:.3g}'}" for b, t in zip(p.rows, ct))
            print(f"clustering time (half the pairs within eps), n = {res.tokens[0]}: {shown}")
    if out is not None:
        print(f"wrote {out}/metastability.json, first_plateau.csv and figures")


run = releasing_locks(_run)
