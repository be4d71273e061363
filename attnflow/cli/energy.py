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

from ._common import emit_json, info, out_dir

_KEYS = {"tol", "members", "eps", "rho0", "points", "beta_max", "w", "m"}


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "energy",
        help="energies, attention entropy and energy monotonicity along a simulation",
        description="Simulate the model of CONFIG.toml (continuous or discrete) and report the energy "
        "E = sum_h E_h, the mean attention entropy and whether E is non-decreasing (and if not, when and which "
        "head breaks it). Optional [energy] table: tol, members, eps, rho0, points, beta_max, w, m.",
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print {times, energy, entropy, monotone, ...} for member 0")
    p.add_argument("--out", metavar="DIR", help="directory for energy.npz and the figures")
    return p


def _settings(cfg):
    from attnflow.io.config import ConfigError

    sec = cfg.section("energy")
    unknown = sorted(set(sec) - _KEYS)
    if unknown:
        raise ConfigError(f"{cfg.path}: unknown key(s) in [energy]: {', '.join(unknown)} (allowed: {', '.join(sorted(_KEYS))})")

    def num(key, default, lo=None, hi=None, integer=False):
        v = sec.get(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise ConfigError(f"{cfg.path}: [energy] {key} must be {'an integer' if integer else 'a number'}, got {v!r}")
        if (lo is not None and not v > lo) or (hi is not None and not v < hi):
            raise ConfigError(f"{cfg.path}: [energy] {key} must lie in ({lo}, {hi}), got {v!r}")
        return v

    out = {
        "tol": num("tol", None, 0.0),
        "members": num("members", 16, 0, integer=True),
        "eps": num("eps", 1e-3, 0.0, 1.0),
        "rho0": num("rho0", 0.0, -1.0, 1.0),
        "points": num("points", 60, 1, integer=True),
        "beta_max": num("beta_max", None, 0.0),
    }
    for key in ("w", "m"):
        v = sec.get(key)
        if v is not None:
            try:
                v = np.atleast_1d(np.asarray(v, dtype=float))
            except (TypeError, ValueError):
                raise ConfigError(f"{cfg.path}: [energy] {key} must be a list of numbers, got {v!r}") from None
            if v.ndim != 1 or not np.all(np.isfinite(v)):
                raise ConfigError(f"{cfg.path}: [energy] {key} must be a flat list of finite numbers")
        out[key] = v
    if (out["w"] is None) != (out["m"] is None) or (out["w"] is not None and out["w"].shape != out["m"].shape):
        raise ConfigError(f"{cfg.path}: [energy] give both w and m, one value per head")
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
    from attnflow.analysis import equiangular as eq
    from attnflow.io.config import load_config

    cfg = load_config(args.config)
    st = _settings(cfg)
    out = out_dir(args.out)
    dyn = cfg.build()
    x0 = cfg.initial()
    kw = cfg.simulate_kwargs()
    kw["saves"] = _saves(cfg)
    kw["tol"] = None  # keep every saved state: the trace needs the whole trajectory
    info(f"energy: simulating {cfg.batch} x {cfg.tokens} tokens ({cfg.time}, {cfg.attention}, {cfg.num_heads} head(s))", quiet=args.json)
    sol = af.simulate(dyn, x0, **kw)
    traj = np.asarray(sol.trajectory)[:, : st["members"]]
    trace = en.energy_trace(dyn, traj, sol.ts, tol=st["tol"])
    cond = en.monotonicity_condition(dyn) if cfg.mask == "full" else None
    m0 = 0
    k = int(trace.first_violation[m0])
    summary = {
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
        "cause": trace.CAUSES[int(trace.cause[m0])],
        "explanation": trace.explain(m0),
        "members_traced": int(traj.shape[1]),
        "monotone_fraction": float(np.mean(trace.monotone)),
        "condition": None
        if cond is None
        else {
            "total_flat": cond.total_flat,
            "total_sphere": cond.total_sphere,
            "per_head_flat": cond.per_head_flat,
            "per_head_sphere": cond.per_head_sphere,
            "max_overlap": cond.max_overlap,
            "flat_margin": cond.flat_margin,
            "reason": cond.reason,
        },
        "clustering": None,
        "files": [],
    }
    # T_eps(beta) of the equiangular reduction with the configured (or given) scalar heads
    w, m, exact = _scalar_heads(cfg, st)
    n = cfg.tokens
    if n >= 3 and np.all(w > 0) and np.all(m > 0):
        bc = eq.critical_beta(n=n, rho0=st["rho0"], m=m, w=w)
        bmax = st["beta_max"] or 4 * bc
        betas = np.linspace(bmax / st["points"], bmax, st["points"])
        T = np.asarray(eq.clustering_time(st["eps"], st["rho0"], n=n, beta=betas, w=w, m=m))
        F = np.asarray(eq.initial_speed(st["rho0"], n=n, beta=betas, w=w, m=m))
        F0 = float(eq.initial_speed(st["rho0"], n=n, beta=np.array([1e-12]), w=w, m=m)[0])
        summary["clustering"] = {
            "w": w, "m": m, "exact_scalar_heads": exact, "n": n, "rho0": st["rho0"], "eps": st["eps"],
            "beta_c": bc, "betas": betas, "T_eps": T, "speed_ratio": F / F0,
        }
    else:
        summary["clustering_skipped"] = "T_eps(beta) needs n >= 3 and scalar heads with w_h > 0, m_h > 0 (set [energy] w, m)"
    if out is not None:
        from attnflow.plots import energy as pl

        np.savez(
            out / "energy.npz", ts=trace.ts, energy=trace.energy, head_energy=trace.head_energy, entropy=trace.entropy,
            rate=trace.rate, head_rate=trace.head_rate, monotone=trace.monotone,
        )
        summary["files"].append(str(out / "energy.npz"))
        summary["files"].append(str(pl.energy_entropy(trace, out / "energy_entropy.png", title=cfg.path.name)))
        summary["files"].append(str(pl.head_contributions(trace, out / "head_contributions.png", title=cfg.path.name)))
        c = summary["clustering"]
        if c is not None:
            label = "" if c["exact_scalar_heads"] else " (isotropic part tr/d of the configured heads)"
            summary["files"].append(
                str(pl.clustering_time(c["betas"], c["T_eps"], c["beta_c"], out / "clustering_time.png", eps=c["eps"], rho0=c["rho0"], n=n,
                                       speed_ratio=c["speed_ratio"],
                                       title=f"T_eps(beta), w = {np.round(w, 3).tolist()}, m = {np.round(m, 3).tolist()}{label}"))
            )
    if args.json:
        emit_json(summary)
    else:
        print(trace.explain(m0))
        for h in range(trace.head_energy.shape[-1]):
            print(trace.explain_head(m0, h))
        print(f"{summary['monotone_fraction']:.3f} of {traj.shape[1]} traced members monotone")
        if cond is not None:
            print(f"sufficient condition: {cond.reason}")
        if summary["clustering"] is not None:
            print(f"equiangular beta_c = {summary['clustering']['beta_c']:.6g} (n = {n}, rho0 = {st['rho0']})")
        for f in summary["files"]:
            print(f"wrote {f}")
    return 0
