"""``attnflow demo``: a small, real basin study ([PM] Fig. 13 style) that runs on a 2-core CPU in about 20 seconds
(12 with a filled compile cache)."""

from __future__ import annotations

import numpy as np

from ._common import emit_json, info, out_dir

#: The value matrix of the demo: the README's V, and the layer matrix W = sum_h O_h V_h of both demo models.
V_DEMO = np.diag([1.0, 0.4, -0.3])
ALPHA, BETA, TOKENS, STEPS = 0.1, 1.0, 10, 3000


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "demo",
        help="run a small end-to-end basin study and write its figures",
        description="[PM] Fig. 13 in small: the discrete layer map (d = 3, n = 10 tokens, softmax attention, beta = 1, "
        "alpha = 0.1, l2 normalisation) with V = diag(1, 0.4, -0.3), the value matrix of the README, as one head "
        "(Q = I, K = V) and as five random heads sharing the same layer matrix W = sum_h O_h V_h = V. It prints the "
        "model, then for each version: basin fractions of every attractor with 95% Wilson intervals, the verdict "
        "(stable / unstable / neutral) of each consensus and bipartite equilibrium on v1, and the local basin "
        "radius of a stable bipartite point next to that of consensus on v1. Equilibria are named as everywhere in "
        "attnflow: 'consensus +v1' (all tokens at +v1, v1 the eigenvector of V with the largest eigenvalue), "
        "'bipartite v1 3:7' (3 tokens at +v1, 7 at -v1).",
    )
    p.add_argument("--out", metavar="DIR", default="attnflow-demo", help="output directory (default: attnflow-demo)")
    p.add_argument("--samples", type=int, default=2000, help="initial states per model (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random heads and of the samples (default 0)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    return p


def models(seed: int = 0):
    """One head (Q = I, K = V: score matrix M = Q^T K = V; the model the README's "Ten lines" build) and five
    random heads whose layer matrix sum_h O_h V_h is the same V = diag(1, 0.4, -0.3), each head's W_h = V / 5.

    **Returns:** ``({"single head": model, "five heads": model}, V)``.
    """
    import attnflow as af

    d, H = 3, 5
    rng = np.random.default_rng(seed)
    V = V_DEMO
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([V @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    multi = af.Heads(Q=rng.normal(size=(H, d, d)) / np.sqrt(d), K=rng.normal(size=(H, d, d)) / np.sqrt(d), V=Vs, O=Os)
    mk = lambda heads: af.LayerMap(af.SelfAttention(heads, af.Attention("softmax"), BETA), alpha=ALPHA)  # noqa: E731
    return {"single head": mk(af.Heads.single(V, K=V)), "five heads": mk(multi)}, V


def _mat(A, digits: int = 3) -> str:
    A = np.asarray(A, float)
    if np.allclose(A, np.diag(np.diag(A))):
        d = np.diag(A)
        return "I" if np.allclose(d, 1) else "diag(" + ", ".join(f"{x:.{digits}g}" for x in d) + ")"
    return "[" + "; ".join(" ".join(f"{x:+.{digits}f}" for x in row) for row in A) + "]"


def model_record(dyn) -> dict:
    """The parameters of a demo model as plain lists: Q, K, V, O per head ``(H, d, d)``, W, alpha, beta, d."""
    h = dyn.attn.heads
    Q, K, V, O = (np.asarray(getattr(h, k), float) for k in ("Q", "K", "V", "O"))
    return {"d": int(V.shape[-1]), "heads": int(V.shape[0]), "alpha": float(dyn.alpha), "beta": float(dyn.attn.beta),
            "attention": "softmax", "norm": "l2", "Q": Q.tolist(), "K": K.tolist(), "V": V.tolist(), "O": O.tolist(),
            "W": np.einsum("hij,hjk->ik", O, V).tolist()}


def model_lines(mods, n: int, seed: int = 0) -> list[str]:
    """The printed description of the demo models (every matrix; rows separated by ';')."""
    first = model_record(next(iter(mods.values())))
    out = ["model: the discrete layer map x_i <- (x_i + alpha u_i) / |x_i + alpha u_i|,  "
           "u_i = sum_h O_h V_h sum_j softmax_j(beta <Q_h x_i, K_h x_j>) x_j",
           f"  d = {first['d']}, n = {n} tokens, alpha = {first['alpha']:g}, beta = {first['beta']:g}, softmax attention, "
           "full mask, l2 normalisation",
           f"  V = {_mat(V_DEMO)}: the README's value matrix; W = sum_h O_h V_h = V in both versions, so they share "
           "v1 = e1, v2 = e2, v3 = e3"]
    for name, dyn in mods.items():
        r = model_record(dyn)
        if r["heads"] == 1:
            out.append(f"  {name}: Q = {_mat(r['Q'][0])}, K = {_mat(r['K'][0])}, V = {_mat(r['V'][0])}, O = {_mat(r['O'][0])}"
                       " (score matrix M = Q^T K = V)")
        else:
            out.append(f"  {name}: Q_h, K_h ~ N(0, 1/d), V_h ~ N(0, 1) (numpy seed {seed}), O_h = V V_h^-1 / {r['heads']}:")
            out.append(("    head  " + "".join(f"{m:^23s}" for m in "QKVO")).rstrip())
            for h in range(r["heads"]):
                for i in range(r["d"]):
                    row = "".join("[" + " ".join(f"{x:+.2f}" for x in r[m][h][i]) + "]  " for m in "QKVO")
                    out.append(f"    {str(h + 1) if i == 0 else '':4s}  {row}".rstrip())
    return out


def _names(dyn, final, outcome) -> list[str]:
    from attnflow.analysis.classify import classify

    return list(classify(dyn, final, outcome).names())


def _pick_members(names: list[str], k: int = 4) -> list[int]:
    """Up to k members with distinct outcomes: the most common one first, then the non-consensus outcomes (the
    most common first, so one is shown whenever one occurs), then the rest; filled up with further members."""
    first: dict[str, int] = {}
    for i, s in enumerate(names):
        first.setdefault(s, i)
    by_count = sorted(first, key=lambda s: -names.count(s))
    order = by_count[:1] + [s for s in by_count[1:] if not s.startswith("consensus")] + [s for s in by_count[1:] if s.startswith("consensus")]
    pick = [first[s] for s in order][:k]
    pick += [i for i in range(len(names)) if i not in pick][: k - len(pick)]
    return pick


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import jax

    from attnflow.analysis.classify import equilibrium_name

    if not 1 <= args.samples <= 2**31 - 1:
        from ._common import UsageError

        raise UsageError(f"--samples must be an integer in [1, 2^31 - 1], got {args.samples}")
    if not 0 <= args.seed <= 2**32 - 1:
        from ._common import UsageError

        raise UsageError(f"--seed must be in [0, {2**32 - 1}] (larger seeds would repeat smaller ones), got {args.seed}")
    out = out_dir(args.out, "demo")
    mods, _ = models(args.seed)
    n, steps = TOKENS, STEPS
    key = jax.random.PRNGKey(args.seed)
    summary = {"samples": args.samples, "tokens": n, "steps": steps,
               "model": {name: model_record(dyn) for name, dyn in mods.items()}, "models": {}}
    if not args.json:
        print("\n".join(model_lines(mods, n, args.seed)))
    cons = equilibrium_name("consensus", 0, sign=1)
    for name, dyn in mods.items():
        entry = _study(name, dyn, args, key, out, cons)
        summary["models"][name] = entry
    threshold = _near_threshold(mods["single head"], key)
    if threshold is not None:
        summary["near_threshold"] = threshold
    if args.json:
        emit_json(summary)
        return 0
    for line in report_lines(summary):
        print(line)
    print(f"\nfigures in {out}/: *_fractions.png (basin fractions), *_paths.png (token paths on the sphere)")
    return 0


def _radius_of(r) -> float:
    """The measured radius of a :class:`~attnflow.LocalRadius`, or r_max (reported as a lower bound) when samples
    still recover at the largest radius."""
    return float(r.at_least) if r.radius is None else float(r.radius)


def _radius(r: float) -> str:
    return ">= 2 (the largest tried)" if r >= 2 else f"{r:.3g}"


def report_lines(summary: dict) -> list[str]:
    """The printed report of a demo summary: one block per model, each table with its header."""
    out = []
    for name, e in summary["models"].items():
        out += ["", f"{name}: basins of attraction ({summary['samples']} samples, {e['not_converged']} not converged "
                f"at the cap of {e['max_steps']} steps)",
                f"  {'attractor':24s} {'fraction':>8s}  {'95% Wilson interval':>20s}  {'count':>6s}"]
        for a in e["attractors"]:
            lo, hi = a["interval"]
            ci = f"[{lo:.3f}, {hi:.3f}]"
            out.append(f"  {a['name']:24s} {a['fraction']:8.3f}  {ci:>20s}  {a['count']:6d}")
        out += [f"  {'equilibrium on v1':24s} {'verdict':>8s}  {'spectral radius':>20s}"]
        for q in e["equilibria"]:
            out.append(f"  {q['name']:24s} {q['verdict']:>8s}  {q['spectral_radius']:20.6f}")
        if e.get("local_radius"):
            out.append(f"  {'local basin radius':24s} (largest perturbation from which >= 90% of samples return)")
            for lab, r in e["local_radius"].items():
                out.append(f"  {lab:24s} {_radius(r)}")
        out.append(f"  paths drawn: {', '.join(e['paths'])}")
    if "near_threshold" in summary:
        nt = summary["near_threshold"]
        out += ["", f"single head, {nt['equilibrium']} becomes stable at beta = {nt['beta_threshold']:.4f}; at beta = {nt['beta']:.4f} "
                f"its local basin radius is {_radius(nt['bipartite_radius'])}, against {_radius(nt['consensus_radius'])} for consensus +v1 "
                "(a small perturbation returns, a larger one escapes: [PM] Fig. 13b)"]
    return out


def _study(name, dyn, args, key, out, cons) -> dict:
    """One model of the demo: basin fractions, token paths of distinct outcomes, the v1 equilibria's verdicts and
    local basin radii; writes the two figures and returns the model's JSON entry."""
    import jax
    import jax.numpy as jnp

    import attnflow as af
    from attnflow.analysis import basins as bs, equilibria as eq, stability as st
    from attnflow.analysis.classify import equilibrium_name
    from attnflow.plots import basins as pb
    from attnflow.plots.trajectories import sphere_trajectories

    n, steps = TOKENS, STEPS
    tag = name.replace(" ", "_")
    budget = af.Budget(steps=steps)
    cap = budget.resolve(dyn, False, study=True).cap  # a study's cap: max_steps, by default 10 x the budget
    info(f"[demo] {name}: {args.samples} samples, n={n}, d=3, up to {cap} steps per member", quiet=args.json)
    res = bs.basin_fractions(dyn, key, args.samples, tokens=n, budget=budget,
                             execution=af.Execution(chunk=min(args.samples, 1000)))
    pb.fractions(res.attractors, out / f"{tag}_fractions.png", title=f"{name}: basin fractions ({res.samples} samples)")
    # token paths of members with distinct outcomes (the rarest first, so a non-consensus outcome shows)
    x0 = af.sample.sphere(jax.random.fold_in(key, 1), (64, n, 3))
    sol = af.simulate(dyn, x0, steps=steps, saves=150, tol=res.tol)  # the study's tol: above the dtype's floor
    names = _names(dyn, sol.final, sol.outcome)
    pick = _pick_members(names)
    sphere_trajectories(sol.trajectory, out / f"{tag}_paths.png", select=pick, titles=[names[i] for i in pick],
                        title=f"{name}: token paths on the sphere, members with different outcomes")
    states = [(cons, eq.consensus(dyn, 0, n))] + [
        (equilibrium_name("bipartite", 0, split=m, tokens=n), eq.bipartite(dyn, 0, m, n)) for m in range(1, n)]
    stab = st.analyse(dyn, jnp.stack([X for _, X in states]))
    verdicts = [st.verdict_name(int(v)) for v in np.asarray(stab.verdict)]
    entry = {"attractors": [a.to_json() for a in res.attractors], "categories": [c.to_json() for c in res.categories],
             "not_converged": int(res.not_converged), "max_steps": int(res.max_steps),
             "equilibria": [{"name": lab, "verdict": v, "spectral_radius": float(r)}
                            for (lab, _), v, r in zip(states, verdicts, np.asarray(stab.measure))],
             "paths": [names[i] for i in pick]}
    stable_bip = [(lab, X) for (lab, X), v in zip(states[1:], verdicts[1:]) if v == "stable"]
    if stable_bip:
        lab, Xb = stable_bip[len(stable_bip) // 2]
        kw = dict(q=0.9, samples=64, iters=6, budget=af.Budget(steps=steps), r_max=2.0)
        entry["local_radius"] = {lab: _radius_of(bs.local_basin_radius(dyn, Xb, key, **kw)),
                                 cons: _radius_of(bs.local_basin_radius(dyn, states[0][1], key, **kw))}
    return entry


def _near_threshold(single, key) -> dict | None:
    """[PM Fig. 13b]: just above the beta where the bipartite point becomes stable, its basin is tiny."""
    from attnflow.analysis import basins as bs, continuation as co, equilibria as eq
    from attnflow.analysis.classify import equilibrium_name
    from attnflow.evolve.options import Budget

    n = TOKENS
    Xb = eq.bipartite(single, 0, n // 2, n)
    branch = co.continue_equilibrium(single, Xb, param="beta", values=np.linspace(0.2, 1.0, 5))
    if len(branch.changes):
        bc = float(branch.changes[0])
        near = single.with_params(beta=1.01 * bc)
        kw = dict(q=0.9, samples=64, iters=6, budget=Budget(steps=20000), r_max=2.0)
        rb = bs.local_basin_radius(near, Xb, key, **kw)
        rc = bs.local_basin_radius(near, eq.consensus(near, 0, n), key, **kw)
        return {"equilibrium": equilibrium_name("bipartite", 0, split=n // 2, tokens=n),
                "beta_threshold": bc, "beta": 1.01 * bc, "bipartite_radius": _radius_of(rb),
                "bipartite_bracket": list(rb.bracket), "consensus_radius": _radius_of(rc)}
    return None
