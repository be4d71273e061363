"""``attnflow stability CONFIG.toml``: equilibria of the configured model and their stability."""

from __future__ import annotations

import numpy as np

from ._common import UsageError, emit_json, info, out_dir


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "stability",
        help="find and certify equilibria (consensus, bipartite, clustering) by autodiff",
        description="Analyse every consensus (each real eigenvector of W, both signs) and every bipartite consensus "
        "(each eigenvector, each split m) of the configured model: autodiff intrinsic Jacobian, eigenvalues, verdict. "
        "An optional [stability] table adds: states = 'x.npy' (given states, refined first), "
        "clustering = {starts = 64, clusters = 2} (a search for non-eigenvector-aligned equilibria), and "
        "continuation = {param = 'alpha'|'beta', start, stop, num, eigenvector = 0, split = 0} (split 0: consensus).",
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print the equilibria as JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="directory for spectra.png (and continuation.png)")
    return p


def _entry(kind, k, sign, split, stab, i, discrete):
    eigs = stab.eigenvalues[i]
    e = {"kind": kind, "eigenvector": k, "sign": sign, "split": split, "stable": bool(stab.verdict[i] == 0)}
    e["spectral_radius" if discrete else "max_real"] = float(stab.measure[i])
    e["eigenvalues"] = [[float(z.real), float(z.imag)] for z in eigs]
    return e


def _verdict(stab, i):
    return ["stable", "unstable", "neutral"][int(stab.verdict[i])]


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import jax
    import jax.numpy as jnp

    from attnflow.analysis import continuation as co, equilibria as eq, stability as st
    from attnflow.io.config import load_config
    from attnflow.model.dynamics import AbstractMap

    cfg = load_config(args.config)
    out = out_dir(args.out)
    sec = cfg.section("stability")
    unknown = sorted(set(sec) - {"states", "clustering", "continuation", "tol"})
    if unknown:
        raise UsageError(f"{cfg.path}: unknown key(s) in [stability]: {', '.join(unknown)}")
    dyn = cfg.build()
    n = cfg.tokens
    discrete = isinstance(dyn, AbstractMap)
    lam, _ = eq.eigenpairs(dyn)
    real = [k for k in range(len(lam)) if abs(lam[k].imag) < 1e-12]
    labels, states = [], []
    for k in real:
        for s in (1, -1):
            labels.append(("consensus", k, s, 0))
            states.append(eq.consensus(dyn, k, n, s))
        for m in range(1, n):
            labels.append(("bipartite", k, 1, m))
            states.append(eq.bipartite(dyn, k, m, n))
    if "states" in sec:
        from pathlib import Path

        p = Path(sec["states"])
        p = p if p.is_absolute() else cfg.path.parent / p
        if not p.exists():
            raise UsageError(f"{cfg.path}: [stability] states file {str(p)!r} not found")
        given = np.load(p)
        if given.ndim == 2:
            given = given[None]
        if given.shape[1:] != (n, cfg.d):
            raise UsageError(f"{cfg.path}: [stability] states must have shape (k, {n}, {cfg.d}), got {given.shape}")
        for i, X in enumerate(given):
            labels.append(("given", -1, 0, i))
            states.append(eq.refine(dyn, jnp.asarray(X, dtype=cfg.dtype)).state)
    if "clustering" in sec:
        c = sec["clustering"]
        found = eq.find_clusterings(dyn, jax.random.PRNGKey(cfg.seed), n, starts=int(c.get("starts", 64)), clusters=int(c.get("clusters", 2)))
        info(f"clustering search: {len(found)} non-eigenvector-aligned equilibria", quiet=args.json)
        for X in found:
            labels.append((f"{len(np.unique(np.round(X, 6), axis=0))}-clustering", -1, 0, 0))
            states.append(jnp.asarray(X))
    if not states:
        raise UsageError(f"{cfg.path}: W has no real eigenvector and no states were given")
    stab = st.analyse(dyn, jnp.stack([jnp.asarray(X, dtype=states[0].dtype) for X in states]), tol=float(sec.get("tol", 1e-8)))
    entries = [_entry(kind, k, s, m, stab, i, discrete) for i, (kind, k, s, m) in enumerate(labels)]
    result = {"equilibria": entries}  # exactly the documented shape; "continuation" only when requested
    branch = None
    if "continuation" in sec:
        c = sec["continuation"]
        try:
            values = np.linspace(float(c["start"]), float(c["stop"]), int(c.get("num", 20)))
            param = c.get("param", "beta")
            k, m = int(c.get("eigenvector", 0)), int(c.get("split", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{cfg.path}: [stability] continuation needs param, start, stop, num: {e}") from None
        X0 = eq.consensus(dyn, k, n) if m == 0 else eq.bipartite(dyn, k, m, n)
        try:
            branch = co.continue_equilibrium(dyn, X0, param=param, values=values)
        except ValueError as e:
            raise UsageError(f"{cfg.path}: [stability] continuation: {e}") from None
        result["continuation"] = {"param": param, "values": branch.values, "measure": branch.measure,
                                  "stable": branch.verdict == 0, "changes": branch.changes}
    if out is not None:
        from attnflow.plots.stability import continuation, spectra

        shown = [e for e in entries if e["kind"] != "bipartite" or e["stable"]][:12]
        spectra([(e["kind"] if e["eigenvector"] < 0 else f"{e['kind']} v{e['eigenvector']} {'+' if e['sign'] >= 0 else '-'}{'' if not e['split'] else ' m=' + str(e['split'])}",
                  np.array([complex(*z) for z in e["eigenvalues"]]), e["stable"]) for e in shown], out / "spectra.png", discrete=discrete)
        if branch is not None:
            continuation(branch, out / "continuation.png", label=f"{'consensus' if m == 0 else 'bipartite'} on v{k}")
    if args.json:
        emit_json(result)
    else:
        for i, e in enumerate(entries):
            meas = e.get("spectral_radius", e.get("max_real"))
            print(f"{e['kind']:>12s} v{e['eigenvector']:<2d} sign {e['sign']:+d} split {e['split']:<2d} {_verdict(stab, i):9s} "
                  f"{'rho' if discrete else 'max Re'} = {meas:.6g}  neutral {int(stab.neutral[i])}  residual {float(stab.residual[i]):.1e}")
        if branch is not None:
            print(f"continuation in {branch.param}: stability changes at {', '.join(f'{c:.6g}' for c in branch.changes) or 'none'}")
    return 0
