"""``attnflow demo``: a small, real study that runs on a CPU in about a minute."""

from __future__ import annotations

import numpy as np

from ._common import emit_json, info, out_dir


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="run a small end-to-end study and write its figures",
        description="Single head vs five heads (d = 3, n = 10, discrete layer map, softmax): simulate an ensemble "
        "from uniform random starts and report how often the tokens reach consensus or a sign split on one axis.",
    )
    p.add_argument("--out", metavar="DIR", default="attnflow-demo", help="output directory (default: attnflow-demo)")
    p.add_argument("--samples", type=int, default=2000, help="ensemble size per model (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    return p


def models(seed: int):
    """A symmetric single-head V with a dominant positive eigenvalue, and five random heads sharing it as W."""
    import jax
    import jax.numpy as jnp

    import attnflow as af

    d, H = 3, 5
    rng = np.random.default_rng(seed)
    Qm, _ = np.linalg.qr(rng.normal(size=(d, d)))
    V = Qm @ np.diag([1.0, 0.4, -0.3]) @ Qm.T
    single = af.Heads.single(V)
    # Five heads, dh = 3, whose layer matrix sum_h O_h V_h equals V.
    Vs = rng.normal(size=(H, d, d))
    Os = np.stack([V @ np.linalg.inv(Vs[h]) / H for h in range(H)])
    Qs = rng.normal(size=(H, d, d)) / np.sqrt(d)
    Ks = rng.normal(size=(H, d, d)) / np.sqrt(d)
    multi = af.Heads(Q=Qs, K=Ks, V=Vs, O=Os)
    mk = lambda heads: af.LayerMap(af.SelfAttention(heads, af.Attention("softmax"), 1.0), alpha=0.1)  # noqa: E731
    del jax, jnp
    return {"single head": mk(single), "five heads": mk(multi)}, V


def run(args) -> int:
    import jax

    import attnflow as af
    from attnflow.cli.simulate import summarize
    from attnflow.plots.trajectories import sphere_trajectories

    out = out_dir(args.out)
    mods, V = models(args.seed)
    x0 = af.sample.sphere(jax.random.PRNGKey(args.seed), (args.samples, 10, 3))
    results = {}
    for name, dyn in mods.items():
        info(f"[demo] {name}: {args.samples} samples, n=10, d=3, up to 3000 steps", quiet=args.json)
        sol = af.simulate(dyn, x0, steps=3000, tol=1e-7)
        traj = af.simulate(dyn, x0[:4], steps=3000, saves=100).trajectory
        png = sphere_trajectories(traj, out / f"{name.replace(' ', '_')}.png", title=f"{name}: token paths")
        results[name] = {"status": sol.status_counts(), **summarize(sol.final), "figure": str(png)}
    if args.json:
        emit_json({"samples": args.samples, "results": results})
    else:
        for name, r in results.items():
            print(
                f"{name:12s}: consensus {r['consensus_fraction']:.3f}, on one axis {r['antipodal_or_aligned_fraction']:.3f}, "
                f"converged {r['status']['converged']}/{args.samples}; figure {r['figure']}"
            )
    return 0
