"""``attnflow stability CONFIG.toml``: equilibria of the configured model and their stability."""

from __future__ import annotations

import numpy as np

from ._common import UsageError, emit_json, gib, info, load_run_config, out_dir


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "stability",
        help="find and certify equilibria (consensus, bipartite, clustering) by autodiff",
        description="Analyse every consensus (each real eigenvector of W, both signs) and every bipartite consensus "
        "(each eigenvector, each split m) of the configured model: autodiff intrinsic Jacobian, eigenvalues, verdict. "
        "An optional [stability] table adds given states (refined first), a clustering search for "
        "non-eigenvector-aligned equilibria and a continuation (split 0: consensus). " + _schema_help(),
        epilog=_EPILOG,
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print the equilibria as JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="directory for spectra.png (and continuation.png)")
    return p


_EPILOG = (
    "Output: a header, then one row per candidate equilibrium. Names: v1, v2, ... are the eigenvectors of the layer "
    "matrix W = sum_h O_h V_h by descending real part of the eigenvalue (v1 principal; config keys 'eigenvector' "
    "count from 0, so eigenvector = 0 is v1); 'consensus +v1': every token at +v1; 'bipartite v1 3:7': 3 tokens at "
    "+v1 and 7 at -v1; 'clustering 2:1': clusters of 2 and 1 tokens not on an eigenvector. verdict: stable, unstable "
    "or neutral (no eigenvalue beyond the boundary, some on it within tol: undecided by linearisation). rho "
    "(discrete maps): spectral radius of the intrinsic Jacobian, the Jacobian restricted to the tangent space of the "
    "product of spheres; stable iff rho < 1. max Re (continuous flows): its largest real part; stable iff max Re < 0. "
    "neutral: the number of eigenvalues within tol of the boundary (symmetry directions). residual: max |step(X) - X| "
    "(maps) or max |projected vector field| (flows), how far the state is from an exact equilibrium. A summary line "
    "counts the stable equilibria; a continuation line names the followed equilibrium and each change of verdict "
    "with its direction."
)


def _schema_help() -> str:
    from attnflow.io.config import describe

    return describe("stability")


def _name(kind, k, sign, split, n, sizes=None):
    from attnflow.analysis.classify import equilibrium_name

    if kind == "given":
        return f"given state {split + 1}"
    if kind == "clustering":
        return equilibrium_name("clustering", None, sizes=sizes)
    return equilibrium_name(kind, k, sign=sign, split=split if kind == "bipartite" else None, tokens=n)


def _entry(label, record):
    """One equilibrium's JSON record: its name and fields, then its :meth:`Stability.to_json` record (verdict by
    name, rho or max Re, neutral and unstable direction counts, residual, eigenvalues)."""
    name, kind, k, sign, split = label
    e = {"name": name, "kind": kind, "eigenvector": None if k < 0 else f"v{k + 1}",
         "sign": sign if kind == "consensus" else None, "split": split if kind == "bipartite" else None}
    e.update(record)
    return e


def _analyse(st, dyn, states, tol, discrete: bool):
    """(a :class:`Stability` of the states whose spectrum could be computed, one JSON record per state). A state
    whose intrinsic Jacobian is not finite (the model overflows the dtype there) is reported with verdict
    ``unknown`` and no spectrum, never an exception."""
    try:
        stab = st.analyse(dyn, states, tol=tol)
        return stab, [stab.to_json(i) for i in range(len(states))]
    except np.linalg.LinAlgError:  # a non-finite Jacobian among the states: analyse the others
        pass
    records = [_unknown(discrete) for _ in range(len(states))]
    finite = np.flatnonzero(np.all(np.isfinite(np.asarray(st.jacobians(dyn, states)[0])), axis=(-2, -1)))
    if len(finite):
        try:
            stab = st.analyse(dyn, states[finite], tol=tol)
            for j, i in enumerate(finite):
                records[i] = stab.to_json(j)
            return stab, records
        except np.linalg.LinAlgError:
            pass
    return st.Stability(*(np.zeros((0,)) for _ in range(6)), discrete=discrete, tol=float(tol)), records


def _unknown(discrete: bool) -> dict:
    """The record of a state whose spectrum could not be computed (a non-finite Jacobian)."""
    return {"verdict": "unknown", "stable": False, ("spectral_radius" if discrete else "max_real"): None, "neutral": None,
            "unstable_directions": None, "residual": None, "eigenvalues": [],
            "reason": "the intrinsic Jacobian is not finite (the model overflows its dtype at this state)"}


def _meaning(discrete: bool, tol: float) -> str:
    if discrete:
        return (f"rho = spectral radius of the intrinsic Jacobian (the map restricted to the tangent space of the spheres): "
                f"stable iff rho < 1, neutral if the largest |eigenvalue| is 1 within tol = {tol:g}")
    return (f"max Re = largest real part of the intrinsic Jacobian's eigenvalues (the flow restricted to the tangent space "
            f"of the spheres): stable iff max Re < 0, neutral if it is 0 within tol = {tol:g}")


def _print_text(cfg, entries, branch_lines, discrete, tol):
    print(f"attnflow stability: {len(entries)} candidate equilibria of {cfg.path.name} "
          f"({'discrete map' if discrete else 'continuous flow'}, {cfg.tokens} tokens, d = {cfg.d})")
    print(_meaning(discrete, tol))
    res = "max |step(X) - X|" if discrete else "max |vector field projected on the tangent space|"
    print(f"neutral = number of eigenvalues within tol of the boundary (symmetry directions); residual = {res} at the "
          "state (0 at an exact equilibrium)")
    width = max(24, *(len(e["name"]) for e in entries))
    mname = "rho" if discrete else "max Re"
    print(f"{'equilibrium':{width}s}  {'verdict':9s}  {mname:>12s}  {'neutral':>7s}  {'residual':>8s}")
    for e in entries:
        meas = e.get("spectral_radius", e.get("max_real"))
        print(f"{e['name']:{width}s}  {e['verdict']:9s}  {_num(meas, '12.6g')}  {_num(e['neutral'], '7d')}  "
              f"{_num(e['residual'], '8.1e')}")
    counts = {v: sum(e["verdict"] == v for e in entries) for v in ("stable", "neutral", "unstable", "unknown")}
    unknown = f", {counts['unknown']} unknown: non-finite Jacobian, the model overflows its dtype" if counts["unknown"] else ""
    print(f"{counts['stable']} of {len(entries)} equilibria stable ({counts['neutral']} neutral, {counts['unstable']} unstable"
          f"{unknown})")
    for line in branch_lines:
        print(f"continuation: {line}")


def _num(v, spec: str) -> str:
    """A number formatted with `spec`, or '-' right-aligned in its width when it is unknown (None or not finite)."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return f"{'-':>{width}s}"
    return format(v, spec)


def _candidates(cfg, dyn, *, quiet):
    """(labels, states) of every candidate: consensus and bipartite on each real eigenvector, the given states
    (refined), the clustering search. A label is (name, kind, eigenvector index, sign, split or index)."""
    import jax
    import jax.numpy as jnp

    from attnflow.analysis import equilibria as eq

    from attnflow.analysis.classify import classify
    from attnflow.analysis.eigen import is_real, is_simple

    n, S = cfg.tokens, cfg.stability
    lam = np.asarray(eq.eigenpairs(dyn).values)
    real = [k for k in range(len(lam)) if is_real(lam, dtype=cfg.dtype)[k]]
    simple = is_simple(lam, dtype=cfg.dtype)
    labels, states = [], []

    def named(kind, k, s, split, X):
        # an eigenvector of a repeated eigenvalue is one arbitrary vector of its eigenspace, and names no axis
        # (docs/model.md section 10): the state gets the name every command gives it, and the vector it was built on
        if simple[k]:
            return _name(kind, k, s, split, n)
        general = classify(dyn, jnp.asarray(X)[None]).names()[0]
        return f"{general} [{'+' if s > 0 else '-'}v{k + 1}, {'split ' + str(split) + ', ' if kind == 'bipartite' else ''}" \
               "a vector of a repeated eigenvalue's eigenspace]"

    for k in real:
        for s in (1, -1):
            X = eq.consensus(dyn, k, n, s)
            labels.append((named("consensus", k, s, n, X), "consensus", k, s, n))
            states.append(X)
        for m in range(1, n):
            X = eq.bipartite(dyn, k, m, n)
            labels.append((named("bipartite", k, 1, m, X), "bipartite", k, 1, m))
            states.append(X)
    if cfg.states_array is not None:  # read, hashed and checked (shape, real, finite) at load
        given = cfg.states_array
        for i, X in enumerate(given):
            labels.append((_name("given", -1, 0, i, n), "given", -1, 0, i))
            states.append(eq.refine(dyn, jnp.asarray(X, dtype=cfg.dtype)).state)
    if S.clustering is not None:
        c = S.clustering
        found = eq.find_clusterings(dyn, jax.random.PRNGKey(cfg.seed), n, starts=c.starts, clusters=c.clusters)
        info(f"clustering search: {len(found)} non-eigenvector-aligned equilibria", quiet=quiet)
        for j, X in enumerate(found):
            sizes = sorted(np.unique(np.round(X, 6), axis=0, return_counts=True)[1], reverse=True)
            labels.append((f"{_name('clustering', -1, 0, 0, n, sizes)} #{j + 1}", "clustering", -1, 0, 0))
            states.append(jnp.asarray(X))
    return labels, states


def _check_memory(cfg) -> None:
    """Refuse, before allocating, an analysis whose Jacobians (one (n d)^2 matrix per candidate) cannot fit."""
    from ._common import available_memory

    n, d = cfg.tokens, cfg.d
    S = cfg.stability
    count = d * (n + 1) + (0 if cfg.states_array is None else len(cfg.states_array)) \
        + (0 if S.clustering is None else S.clustering.starts)
    need = 3 * count * (n * d) ** 2 * (4 if cfg.dtype == "float32" else 8)
    usable = available_memory()[1] // 2
    if need > usable:
        raise UsageError(f"{cfg.path}: the stability of ~{count} candidate equilibria of {n} tokens in d = {d} needs "
                         f"~{gib(need)} for their Jacobians, ~{gib(usable)} usable; reduce tokens")


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import jax.numpy as jnp

    from attnflow.analysis import continuation as co, equilibria as eq, stability as st
    from attnflow.model.dynamics import AbstractMap

    out = out_dir(args.out, "stability")  # before any work
    cfg = load_run_config(args.config)
    if cfg.d < 2:
        raise UsageError(f"{cfg.path}: [model] d = {cfg.d}: the stability analysis needs d >= 2 (on the sphere S^0 tokens "
                         "never move)")
    S = cfg.stability  # validated [stability] table
    _check_memory(cfg)
    dyn = cfg.build()
    n = cfg.tokens
    discrete = isinstance(dyn, AbstractMap)
    labels, states = _candidates(cfg, dyn, quiet=args.json)
    if not states:
        raise UsageError(f"{cfg.path}: W has no real eigenvector and no states were given")
    stab, records = _analyse(st, dyn, jnp.stack([jnp.asarray(X, dtype=states[0].dtype) for X in states]), S.tol, discrete)
    entries = [_entry(label, records[i]) for i, label in enumerate(labels)]
    result = {"equilibria": entries,
              "summary": {"stable": sum(bool(e["stable"]) for e in entries), "total": len(entries),
                          "unknown": sum(e["verdict"] == "unknown" for e in entries), "measure": stab.measure_name,
                          "meaning": _meaning(discrete, stab.tol)}}  # "continuation" only when requested
    branch, branch_lines = None, []
    if S.continuation is not None:
        c = S.continuation
        values = np.linspace(c.start, c.stop, c.num)
        param, k, m = c.param, c.eigenvector, c.split
        try:
            X0 = eq.consensus(dyn, k, n) if m == 0 else eq.bipartite(dyn, k, m, n)
        except ValueError as e:
            raise UsageError(f"{cfg.path}: [stability] continuation: {e}") from None
        try:
            branch = co.continue_equilibrium(dyn, X0, param=param, values=values)
        except np.linalg.LinAlgError:
            raise UsageError(f"{cfg.path}: [stability] continuation: the Jacobians along the branch are not finite "
                             f"(the model overflows {cfg.dtype}); use smaller weights, beta or alpha, or dtype = 'float64'") from None
        except ValueError as e:
            raise UsageError(f"{cfg.path}: [stability] continuation: {e}") from None
        bname = _name("consensus", k, 1, n, n) if m == 0 else _name("bipartite", k, 1, m, n)
        result["continuation"] = branch.to_json(bname)
        branch_lines = branch.describe(bname)
    if out is not None:
        from attnflow.plots.stability import continuation, spectra

        shown = [e for e in entries if e["verdict"] != "unknown" and (e["kind"] != "bipartite" or e["stable"])][:12]
        spectra([(e["name"], np.array([complex(*z) for z in e["eigenvalues"]]), e["stable"]) for e in shown],
                out / "spectra.png", discrete=discrete)
        if branch is not None:
            continuation(branch, out / "continuation.png", label=bname)
    if args.json:
        emit_json(result)
    else:
        _print_text(cfg, entries, branch_lines, discrete, stab.tol)
    return 0
