"""``attnflow energy CONFIG.toml``: energies, attention entropy and the monotonicity verdict along a simulation.

Optional ``[energy]`` table::

    [energy]
    tol = 1e-10        # relative tolerance of "non-decreasing" (default: 1e-10 float64, 1e-5 float32)
    members = 16       # ensemble members traced (the JSON reports member 0)
    eps = 1e-3         # T_eps(beta) figure: cluster threshold rho >= 1 - eps
    rho0 = 0.0         # ... equiangular start
    points = 60        # ... number of beta values, up to beta_max (default 4 beta_c)
    beta_max = 5.0
    w = [1.0]          # ... scalar heads (default: tr(W_h)/d and tr(M_h)/d of the configured heads)
    m = [1.0]
"""

from __future__ import annotations

import numpy as np

from ._common import UsageError, emit_json, info, load_run_config, out_dir, plan_chunk


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "energy",
        help="energies, attention entropy and energy monotonicity along a simulation",
        description="Simulate the model of CONFIG.toml (continuous or discrete) and report the energy "
        "E = sum_h E_h, the mean attention entropy and whether E is non-decreasing (and if not, when and which "
        "head breaks it). " + _schema_help(),
        epilog=_EPILOG + " " + _keys_help(),
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print JSON: member 0's curves and verdict {times, energy, entropy, monotone, cause, ...}, every failing "
                   "member (failures), the sufficient condition and the T_eps(beta) curve (clustering)")
    p.add_argument("--out", metavar="DIR", help="directory for energy.npz and the figures")
    return p


_EPILOG = (
    "Output: E = sum_h E_h is the energy, E_h = 1/(2 beta n^2) sum_ij exp(beta <x_i, M_h x_j>) head h's part "
    "(M_h = Q_h^T K_h, docs/model.md section 7); entropy is the mean attention entropy -sum_j a_ij log a_ij; dE/dt and "
    "dE_h/dt are exact rates along a flow (autodiff), split into the head's own gradient part, cross-head terms and "
    "radial shadow terms (from r_i = <x_i, f_i>, the part of a head's output along the token). A member is monotone "
    "when E never decreases by more than tol (relative) between saved states and, for flows, dE/dt >= -tol |E|. "
    "Each failing member is listed with the first saved state (index and time t, or step for maps) where E dropped, "
    "the head that lost most, and the cause: own_gradient, cross_head, radial_shadow (the most negative part of that "
    "head's rate), discrete_step (maps), nonfinite (E overflowed), integration_error (E dropped although dE/dt >= 0 "
    "at both ends: reduce dt). The sufficient condition is checked on the weights alone. beta_c is the critical "
    "inverse temperature of the equiangular reduction (scalar heads W_h = w_h I, M_h = m_h I; rho0 the common "
    "starting inner product), T_eps the time until every <x_i, x_j> >= 1 - eps."
)


def _keys_help() -> str:
    """The [energy] keys with their defaults and meanings, from the config schema."""
    import dataclasses

    from attnflow.io import config

    parts = []
    for f in dataclasses.fields(config.EnergyTable):
        default = "" if f.default is None or f.default is dataclasses.MISSING else f" (default {f.default!r})"
        parts.append(f"{f.name}{default}: {f.metadata.get('doc', '')}")
    return "[energy] keys: " + "; ".join(parts) + "."


def _schema_help() -> str:
    from attnflow.io.config import describe

    return describe("energy")


def _settings(cfg):
    """The validated [energy] table (attnflow.io.config.EnergyTable) as the dict the command uses."""
    e = cfg.energy
    out = {k: getattr(e, k) for k in ("tol", "members", "eps", "rho0", "points", "beta_max")}
    for key in ("w", "m"):
        v = getattr(e, key)
        out[key] = None if v is None else np.asarray(v, dtype=float)
    return out


def _scalar_heads(cfg, st):
    """(w, m, exact): the scalar heads of the T_eps(beta) figure."""
    if st["w"] is not None:
        return st["w"], st["m"], True
    hd = cfg.heads
    W = np.asarray(hd.head_matrices(), float)
    M = np.asarray(hd.score_matrices(), float)
    d = W.shape[-1]
    w = np.trace(W, axis1=1, axis2=2) / d
    m = np.trace(M, axis1=1, axis2=2) / d
    eye = np.eye(d)
    exact = bool(np.allclose(W, w[:, None, None] * eye) and np.allclose(M, m[:, None, None] * eye))
    return w, m, exact


def _saves(cfg):
    if cfg.saves is not None:
        return cfg.saves
    if cfg.time == "continuous" and cfg.solver == "adaptive":
        return 100
    total = cfg.steps if cfg.time == "discrete" else int(round(cfg.t1 / cfg.dt))
    return max(k for k in range(1, min(total, 200) + 1) if total % k == 0)


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import attnflow as af
    from attnflow.analysis import energy as en

    out = out_dir(args.out, "energy")  # before any work
    cfg = load_run_config(args.config)
    st = _settings(cfg)
    item = 4 if cfg.dtype == "float32" else 8
    if plan_chunk(cfg, cfg.batch, None, what=f"batch = {cfg.batch}", flag="batch =",
                  host_per_member=item * cfg.tokens * cfg.d * (_saves(cfg) + 2)) is not None:
        raise UsageError(f"{cfg.path}: [dynamics] batch = {cfg.batch} does not fit in memory at once (energy traces the "
                         "whole trajectory); reduce batch")
    dyn = cfg.build()
    x0 = cfg.initial()
    info(f"energy: simulating {cfg.batch} x {cfg.tokens} tokens ({cfg.time}, {cfg.attention}, {cfg.num_heads} head(s))", quiet=args.json)
    # no stop: the trace needs every saved state of the whole trajectory
    sol = af.simulate(dyn, x0, cfg.budget, solver=cfg.solver_object(), saves=_saves(cfg), execution=cfg.execution())
    traj = np.asarray(sol.trajectory)[:, : st["members"]]
    trace = en.energy_trace(dyn, traj, sol.ts, tol=st["tol"])
    cond = en.monotonicity_condition(dyn) if cfg.mask == "full" else None
    summary = _summary(cfg, trace, cond)
    summary["clustering"], skipped = _clustering(cfg, st)
    if skipped:
        summary["clustering_skipped"] = skipped
    if out is not None:
        summary["files"] = _write_files(out, cfg, trace, summary["clustering"])
    if args.json:
        emit_json(summary)
    else:
        _print_text(cfg, st, trace, cond, summary)
    return 0


def _summary(cfg, trace, cond) -> dict:
    """The JSON document: member 0's curves and verdict, every failing member, the sufficient condition."""
    from attnflow.analysis import energy as en

    m0 = 0
    k = int(trace.first_violation[m0])
    return {
        "config": str(cfg.path),
        "time_kind": cfg.time,
        "times": np.asarray(trace.ts),
        "energy": trace.energy[:, m0],
        "head_energy": trace.head_energy[:, m0],
        "entropy": trace.entropy[:, m0],
        "rate": None if cfg.time == "discrete" else trace.rate[:, m0],
        "entropy_rate": None if cfg.time == "discrete" else trace.entropy_rate[:, m0],
        "monotone": bool(trace.monotone[m0]),
        "head_monotone": [bool(b) for b in trace.head_monotone[m0]],
        "relative_drop": float(trace.relative_drop[m0]),
        "first_violation_time": None if k < 0 else float(trace.ts[k]),
        "breaking_head": None if k < 0 else int(trace.breaking_head[m0]),
        "cause": en.cause_name(int(trace.cause[m0])),
        "cause_message": trace.CAUSES[int(trace.cause[m0])],
        "explanation": trace.explain(m0),
        "members_traced": int(trace.energy.shape[1]),
        "members_monotone": int(np.sum(trace.monotone)),
        "monotone_fraction": float(np.mean(trace.monotone)),
        "failures": trace.failures(),
        "condition": None if cond is None else {
            "total_flat": cond.total_flat, "total_sphere": cond.total_sphere, "per_head_flat": cond.per_head_flat,
            "per_head_sphere": cond.per_head_sphere, "max_overlap": cond.max_overlap, "flat_margin": cond.flat_margin,
            "reason": cond.reason,
        },
        "clustering": None,
        "files": [],
    }


def _clustering(cfg, st):
    """(T_eps(beta) of the equiangular reduction with the configured or given scalar heads, or None; why skipped)."""
    from attnflow.analysis import equiangular as eq

    w, m, exact = _scalar_heads(cfg, st)
    n = cfg.tokens
    if not (n >= 3 and np.all(w > 0) and np.all(m > 0)):
        return None, "T_eps(beta) needs n >= 3 and scalar heads with w_h > 0, m_h > 0 (set [energy] w, m)"
    bc = eq.critical_beta(n=n, rho0=st["rho0"], m=m, w=w)
    bmax = st["beta_max"] or 4 * bc
    betas = np.linspace(bmax / st["points"], bmax, st["points"])
    T = np.asarray(eq.clustering_time(st["eps"], st["rho0"], n=n, beta=betas, w=w, m=m))
    F = np.asarray(eq.initial_speed(st["rho0"], n=n, beta=betas, w=w, m=m))
    F0 = float(eq.initial_speed(st["rho0"], n=n, beta=np.array([1e-12]), w=w, m=m)[0])
    return {"w": w, "m": m, "exact_scalar_heads": exact, "n": n, "rho0": st["rho0"], "eps": st["eps"],
            "beta_c": bc, "betas": betas, "T_eps": T, "speed_ratio": F / F0}, None


def _write_files(out, cfg, trace, c) -> list[str]:
    from attnflow.plots import energy as pl

    np.savez(
        out / "energy.npz", ts=trace.ts, energy=trace.energy, head_energy=trace.head_energy, entropy=trace.entropy,
        rate=trace.rate, head_rate=trace.head_rate, monotone=trace.monotone,
    )
    pl.energy_entropy(trace, out / "energy_entropy.png", title=cfg.path.name)  # figures return the Figure drawn
    pl.head_contributions(trace, out / "head_contributions.png", title=cfg.path.name)
    files = [out / "energy.npz", out / "energy_entropy.png", out / "head_contributions.png"]
    if c is not None:
        label = "" if c["exact_scalar_heads"] else " (isotropic part tr/d of the configured heads)"
        title = f"T_eps(beta), w = {np.round(c['w'], 3).tolist()}, m = {np.round(c['m'], 3).tolist()}{label}"
        pl.clustering_time(c["betas"], c["T_eps"], c["beta_c"], out / "clustering_time.png", eps=c["eps"],
                           rho0=c["rho0"], n=c["n"], speed_ratio=c["speed_ratio"], title=title)
        files.append(out / "clustering_time.png")
    return [str(f) for f in files]


def _print_text(cfg, st, trace, cond, summary) -> None:
    s, b = trace.energy.shape
    heads = trace.head_energy.shape[-1]
    tol = st["tol"] if st["tol"] is not None else (1e-10 if cfg.dtype == "float64" else 1e-5)
    print(f"attnflow energy: {cfg.path.name} ({cfg.time}, {cfg.attention}, {heads} head(s), {cfg.tokens} tokens, d = {cfg.d}); "
          f"{b} member(s) traced over {s} saved states; monotone = E non-decreasing within tol = {tol:g} (relative)")
    print(trace.explain(0))
    for h in range(heads):
        print(trace.explain_head(0, h))
    print(f"{summary['members_monotone']} of {b} traced members monotone")
    fails = summary["failures"]
    if fails:
        print("members whose E is not monotone (saved state: index of the first saved state where E dropped or dE/dt < 0):")
        print(f"{'member':>6s}  {'saved state':>11s}  {'t' if cfg.time == 'continuous' else 'step':>10s}  {'head':>4s}  cause")
        for f in fails:
            head = "-" if f["head"] < 0 else str(f["head"])
            print(f"{f['member']:6d}  {f['saved_state']:11d}  {f['time']:10.4g}  {head:>4s}  {f['cause']}")
    if cond is not None:
        print(f"sufficient condition: {cond.reason}")
    c = summary["clustering"]
    if c is not None:
        print(f"equiangular beta_c = {c['beta_c']:.6g} (n = {c['n']}, rho0 = {c['rho0']}); "
              f"T_eps from {np.min(c['T_eps']):.4g} to {np.max(c['T_eps']):.4g} for beta in ({c['betas'][0]:.3g}, {c['betas'][-1]:.3g}]")
    for f in summary["files"]:
        print(f"wrote {f}")
