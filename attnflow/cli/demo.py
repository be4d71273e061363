"""``attnflow demo``: a small, real basin study ([PM] Fig. 13 style) that runs on a CPU in about a minute."""

from __future__ import annotations

import numpy as np

from ._common import emit_json, info, out_dir


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser(
        "demo",
        help="run a small end-to-end basin study and write its figures",
        description="[PM] Fig. 13 in small: the discrete layer map (d = 3, n = 10, softmax, alpha = 0.1) with one head "
        "vs five heads sharing the same layer matrix W. For each: basin fractions of every attractor with 95%% "
        "intervals, the stability of each consensus and bipartite equilibrium, and the local basin radius of the "
        "stable bipartite point next to that of consensus on v_1.",
    )
    p.add_argument("--out", metavar="DIR", default="attnflow-demo", help="output directory (default: attnflow-demo)")
    p.add_argument("--samples", type=int, default=2000, help="initial states per model (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    return p


def models(seed: int = 0):
    """One head (Q = I, K = V: M = V) and five random heads whose layer matrix sum_h O_h V_h is the same V."""
    import attnflow as af

    d, H = 3, 5
    rng = np.random.default_rng(seed)
    V = np.diag([1.0, 0.5, -0.3])
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([V @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    multi = af.Heads(Q=rng.normal(size=(H, d, d)) / np.sqrt(d), K=rng.normal(size=(H, d, d)) / np.sqrt(d), V=Vs, O=Os)
    mk = lambda heads: af.LayerMap(af.SelfAttention(heads, af.Attention("softmax"), 1.0), alpha=0.1)  # noqa: E731
    return {"single head": mk(af.Heads.single(V, K=V)), "five heads": mk(multi)}, V


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    import jax
    import jax.numpy as jnp

    import attnflow as af
    from attnflow.analysis import basins as bs, equilibria as eq, stability as st
    from attnflow.plots import basins as pb
    from attnflow.plots.trajectories import sphere_trajectories

    out = out_dir(args.out)
    mods, V = models(args.seed)
    n, steps = 10, 3000
    key = jax.random.PRNGKey(args.seed)
    summary = {"samples": args.samples, "tokens": n, "models": {}}
    for name, dyn in mods.items():
        tag = name.replace(" ", "_")
        info(f"[demo] {name}: {args.samples} samples, n={n}, d=3, up to {steps} steps", quiet=args.json)
        res = bs.basin_fractions(dyn, key, args.samples, tokens=n, chunk_size=min(args.samples, 1000), steps=steps)
        pb.fractions(res.attractors, out / f"{tag}_fractions.png", title=f"{name}: basin fractions ({res.samples} samples)")
        x0 = af.sample.sphere(key, (4, n, 3))
        sphere_trajectories(af.simulate(dyn, x0, steps=steps, saves=100).trajectory, out / f"{tag}_paths.png", title=f"{name}: token paths")
        labels = [("consensus v0 +", eq.consensus(dyn, 0, n))] + [(f"bipartite v0 {m}/{n}", eq.bipartite(dyn, 0, m, n)) for m in range(1, n)]
        stab = st.analyse(dyn, jnp.stack([X for _, X in labels]))
        stable_bip = [(lab, X) for (lab, X), s in zip(labels[1:], stab.stable[1:]) if s]
        entry = {"attractors": res.to_json()["attractors"], "unconverged": res.unconverged,
                 "stable_equilibria": [lab for (lab, _), s in zip(labels, stab.stable) if s]}
        if stable_bip:
            lab, Xb = stable_bip[len(stable_bip) // 2]
            kw = dict(q=0.9, samples=64, iters=6, steps=steps, r_max=2.0)
            entry["local_radius"] = {lab: bs.local_basin_radius(dyn, Xb, key, **kw)["radius"],
                                     "consensus v0 +": bs.local_basin_radius(dyn, labels[0][1], key, **kw)["radius"]}
        summary["models"][name] = entry
    # [PM Fig. 13b]: just above the beta where the bipartite point becomes stable, its basin is tiny.
    from attnflow.analysis import continuation as co

    single = mods["single head"]
    Xb = eq.bipartite(single, 0, n // 2, n)
    branch = co.continue_equilibrium(single, Xb, param="beta", values=np.linspace(0.2, 1.0, 5))
    if len(branch.changes):
        bc = float(branch.changes[0])
        near = single.with_params(beta=1.01 * bc)
        kw = dict(q=0.9, samples=64, iters=6, steps=20000, r_max=2.0)
        rb = bs.local_basin_radius(near, Xb, key, **kw)
        rc = bs.local_basin_radius(near, eq.consensus(near, 0, n), key, **kw)
        summary["near_threshold"] = {"beta_threshold": bc, "beta": 1.01 * bc, "bipartite_radius": rb["radius"],
                                     "bipartite_bracket": rb["bracket"], "consensus_radius": rc["radius"]}
    if args.json:
        emit_json(summary)
        return 0
    for name, e in summary["models"].items():
        print(f"\n{name}: {e['unconverged']} not converged; stable equilibria on v0: {', '.join(e['stable_equilibria']) or 'none'}")
        for a in e["attractors"]:
            print(f"  {a['label']:28s} {a['fraction']:.3f}  [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
        for lab, r in e.get("local_radius", {}).items():
            print(f"  local basin radius (recovery >= 90%) of {lab}: {'>= 2 (the largest tried)' if r >= 2 else f'{r:.3g}'}")
    if "near_threshold" in summary:
        nt = summary["near_threshold"]
        print(f"\nsingle head, bipartite v0 {n // 2}/{n} becomes stable at beta = {nt['beta_threshold']:.4f}; at beta = {nt['beta']:.4f} "
              f"its local basin radius is {nt['bipartite_radius']:.3g}, against {'>= 2' if nt['consensus_radius'] >= 2 else format(nt['consensus_radius'], '.3g')} for consensus on v0 "
              f"(a small perturbation returns, a larger one escapes: [PM] Fig. 13b)")
    print(f"\nfigures in {out}/")
    return 0
