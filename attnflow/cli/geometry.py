"""``attnflow geometry CONFIG.toml``: a basin map of the configured model on a 2-D slice (two angles of one token,
the other tokens fixed at a random reference state), its basin entropy and uncertainty exponent, optionally the
minimal fatal shock of every attractor found and the tipping matrix to another beta (docs/model.md section 12).

With ``--out DIR`` the map is saved block by block (``map_partial.npz``); a rerun with the same settings continues
after the last saved block.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np

from ._common import UsageError, emit_json, info, load_run_config, out_dir, releasing_locks


def add_parser(sub):
    """Register this subcommand on the ``attnflow`` parser."""
    from attnflow.io.config import describe

    p = sub.add_parser(
        "geometry",
        help="basin map on a 2-D slice, basin entropy, uncertainty exponent, fatal shocks, tipping",
        description="Label every point of a resolution x resolution slice of initial states (two angles of one "
        "token; the other tokens at a random reference state from [dynamics] seed) by the attractor it reaches "
        "(fixed points and periodic orbits by recurrence, docs/model.md section 12), and report the fractions with "
        "intervals, the basin entropy S_b and boundary basin entropy S_bb (S_bb > ln 2: fractal boundary), the "
        "uncertainty exponent with its interval, and optionally minimal fatal shocks and a tipping matrix. "
        + describe("geometry"),
    )
    p.add_argument("config", help="path to the TOML configuration")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--out", metavar="DIR", help="directory for geometry.json, basin_map.npz and the figures "
                   "(a rerun with the same settings resumes the map)")
    return p


def _slice(cfg, g, ref):
    """The slice: two angles of one token (d = 3), or one angle each of two tokens (d = 2)."""
    n, d = cfg.tokens, cfg.d
    res = g.resolution
    if d not in (2, 3):
        raise UsageError(f"{cfg.path}: [geometry] slices are angles of tokens: d must be 2 or 3, got {d}")
    tok = g.token
    if tok >= n or (d == 2 and tok + 1 >= n):
        raise UsageError(f"{cfg.path}: [geometry] token = {tok} needs {'tok + 2' if d == 2 else 'token + 1'} <= tokens = {n}")
    from attnflow.analysis import general as ga

    if d == 3:
        a, b = np.linspace(0, 2 * np.pi, res), np.linspace(0, np.pi, res)  # azimuth, polar

        def fn(phi, th):
            X = ref.copy()
            X[tok] = [np.sin(th) * np.cos(phi), np.sin(th) * np.sin(phi), np.cos(th)]
            return X.ravel()
    else:
        a = b = np.linspace(0, 2 * np.pi, res)

        def fn(p1, p2):
            X = ref.copy()
            X[tok] = [np.cos(p1), np.sin(p1)]
            X[tok + 1] = [np.cos(p2), np.sin(p2)]
            return X.ravel()

    return ga.Slice(a=a, b=b, fn=fn)


def _settings(cfg) -> dict:
    """What identifies a run, by value: the config with its input files (``[model] weights``, ...) by content
    (:meth:`~attnflow.io.config.RunConfig.identity`), not by path, so that a changed file is never resumed."""
    g = cfg.geometry
    return dict(config=cfg.identity(), table={f.name: getattr(g, f.name) for f in dataclasses.fields(g)})


def _att_to_json(a):
    return dict(label=a.label, kind=a.kind, lag=a.lag, period=a.period, state=a.state.tolist(),
                features=a.features.tolist(), name=a.name, stable=a.stable, verdict=a.verdict)


def _att_from_json(d):
    from attnflow.analysis.general import Attractor

    return Attractor(label=d["label"], kind=d["kind"], lag=d["lag"], period=d["period"], state=np.asarray(d["state"]),
                     features=np.asarray(d["features"]), name=d["name"], stable=d["stable"], verdict=d.get("verdict"))


def _save_partial(out: Path, image, rows_done, matcher, settings):
    from attnflow.io.results import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, image=image, rows_done=rows_done,
             meta=json.dumps(dict(settings=settings, attractors=[_att_to_json(a) for a in matcher.attractors])))
    atomic_write_bytes(out / "map_partial.npz", buf.getvalue())


def _load_partial(out: Path, settings, shape):
    p = out / "map_partial.npz"
    if not p.exists():
        return None
    try:
        with np.load(p) as z:
            meta = json.loads(str(z["meta"]))
            if meta["settings"] != json.loads(json.dumps(settings)) or z["image"].shape != shape:
                info(f"geometry: {p} holds a map with other settings or input files; starting afresh")
                return None
            return z["image"].copy(), int(z["rows_done"]), [_att_from_json(a) for a in meta["attractors"]]
    except Exception:  # noqa: BLE001 - truncated (BadZipFile), damaged: computed again
        return None


def _run(args, locks: list) -> int:
    """Entry point of ``attnflow geometry``."""
    import jax

    from attnflow.analysis import general as ga
    from attnflow.evolve.sample import sphere

    out = out_dir(args.out, "geometry")
    cfg = load_run_config(args.config)
    g = cfg.geometry
    model = cfg.build()
    n, d = cfg.tokens, cfg.d
    _slice(cfg, g, None)  # refuse a bad slice before any work
    ref = np.asarray(sphere(cfg.key(), (n, d), dtype=cfg.dtype), dtype=float)
    sl = _slice(cfg, g, ref)
    system = ga.attention_system(model, n)
    try:
        if cfg.time == "discrete":
            run_ = ga.Run(steps=cfg.steps, tail=g.tail, tol=g.tol, match_tol=g.match_tol)
        else:
            run_ = ga.Run(t1=cfg.t1, dt=cfg.dt, tail=g.tail, tol=g.tol, match_tol=g.match_tol)
        run_.total_steps(system)
        if g.tail > run_.total_steps(system):
            raise ValueError(f"tail = {g.tail} exceeds the {run_.total_steps(system)} steps of a member")
    except ValueError as e:
        raise UsageError(f"{cfg.path}: [geometry] {e}") from None
    settings = _settings(cfg)
    res = g.resolution
    image = np.full((res, res), -2, int)
    matcher = ga.Matcher(system.space, run_.match_tol, run_.sample_time(system), system)
    start = 0
    if out is not None:
        from attnflow.io.results import hold_lock

        locks.append(hold_lock(out))  # one process per directory, held until this command ends
        got = _load_partial(out, settings, image.shape)
        if got is not None:
            image, start, matcher.attractors = got
            info(f"geometry: resuming after row {start} of {res}")
        else:  # a run with other settings (or none readable): none of its results stays beside this one's
            from attnflow.io.results import clear_outputs

            clear_outputs(out, "geometry")
    info(f"geometry: basin map {res} x {res} of token {g.token} ({cfg.time}, n = {n}, d = {d})", quiet=args.json)
    for r0 in range(start, res, g.rows_per_block):
        r1 = min(r0 + g.rows_per_block, res)
        y0 = sl.states(slice(r0, r1))
        labels, _ = ga.label_members(system, y0, dataclasses.replace(run_, chunk=len(y0)), matcher=matcher)
        image[r0:r1] = labels.reshape(r1 - r0, res)
        if out is not None:
            _save_partial(out, image, r1, matcher, settings)
        info(f"geometry: rows {r1}/{res}", quiet=args.json)
    bm = ga.BasinMap(image=image, a=sl.a, b=sl.b, attractors=tuple(matcher.attractors))
    fr = bm.fractions()
    Sb, Sbb = ga.basin_entropy(image, g.box)
    ex = ga.uncertainty_exponent(image)
    summary = dict(config=str(cfg.path), slice=dict(token=g.token, resolution=res, a=[float(sl.a[0]), float(sl.a[-1])],
                                                      b=[float(sl.b[0]), float(sl.b[-1])]),
                   fractions=fr.to_dict(), entropy=dict(box=g.box, S_b=Sb, S_bb=Sbb,
                                                        fractal_test=bool(Sbb > math.log(2)) if Sbb == Sbb else None),
                   uncertainty_exponent=dict(alpha=ex.alpha, lo=ex.lo, hi=ex.hi, eps=ex.eps.tolist(), f=ex.f.tolist()))
    if g.shock:
        shocks = []
        for a in bm.attractors:
            if a.kind != "fixed point" or a.stable is False:
                continue
            fs = ga.minimal_fatal_shock(system, a.state, run_, directions=g.directions, radii=g.radii, r_max=g.r_max,
                                        key=jax.random.fold_in(cfg.key(), a.label))
            shocks.append(dict(attractor=a.label, name=a.name, lower=fs.lower, upper=fs.upper, tested=fs.tested,
                               unknown=fs.unknown))
        summary["fatal_shocks"] = shocks
    if g.tipping_beta is not None:
        after = ga.attention_system(model.with_params(beta=np.asarray(g.tipping_beta, dtype=cfg.dtype)), n)
        tp = ga.tipping(system, after, sl.states(), run_)
        summary["tipping"] = dict(beta_before=cfg.beta, beta_after=g.tipping_beta, matrix=tp.matrix.tolist(),
                                  lo=tp.lo.tolist(), hi=tp.hi.tolist(), counts=tp.counts.tolist(), unknown=tp.unknown,
                                  before=[a.name for a in tp.before], after=[a.name for a in tp.after])
    if out is not None:
        _write(out, bm, summary)
    if args.json:
        emit_json(summary)
    else:
        _print(cfg, summary)
    return 0


def _write(out: Path, bm, summary) -> None:
    from attnflow._json import dumps
    from attnflow.io.results import atomic_write_bytes
    from attnflow.plots import save, subplots

    atomic_write_bytes(out / "geometry.json", dumps(summary, indent=1).encode())
    buf = io.BytesIO()
    np.savez(buf, image=bm.image, a=bm.a, b=bm.b)
    atomic_write_bytes(out / "basin_map.npz", buf.getvalue())
    fig, ax = subplots(figsize=(6.5, 5))
    im = ax.pcolormesh(bm.a, bm.b, bm.image, shading="nearest", cmap="tab10", vmin=-1, vmax=9)
    ax.set_xlabel("slice a")
    ax.set_ylabel("slice b")
    e = summary["entropy"]
    ax.set_title(f"basin map: S_b = {e['S_b']:.3f}, S_bb = {e['S_bb']:.3f} (box {e['box']}); -1 unknown", fontsize=9)
    fig.colorbar(im, ax=ax, label="attractor label")
    fig.tight_layout()
    save(fig, out / "basin_map.png")


def _print(cfg, s) -> None:
    fr = s["fractions"]
    print(f"attnflow geometry: {cfg.path.name}: slice of token {s['slice']['token']}, "
          f"{s['slice']['resolution']}^2 members, {fr['unknown']} unknown ({fr['saddle']} on saddles)")
    for b in fr["basins"]:
        name = b["attractor"]["name"] if b["attractor"] else str(b["label"])
        print(f"  {name:40s} {b['fraction']:.4f}  [{b['lo']:.4f}, {b['hi']:.4f}]  simultaneous [{b['sim_lo']:.4f}, {b['sim_hi']:.4f}]")
    e = s["entropy"]
    print(f"basin entropy (box {e['box']}): S_b = {e['S_b']:.4f}, S_bb = {e['S_bb']:.4f}"
          + ("" if e["fractal_test"] is None else f" ({'> ln 2: fractal boundary' if e['fractal_test'] else '<= ln 2: the test is silent'})"))
    u = s["uncertainty_exponent"]
    if u["alpha"] is None or u["alpha"] != u["alpha"]:
        print("uncertainty exponent: unknown (fewer than 5 box sizes cross a boundary: raise the resolution)")
    else:
        print(f"uncertainty exponent: alpha = {u['alpha']:.3f} [{u['lo']:.3f}, {u['hi']:.3f}]")
    for f in s.get("fatal_shocks", []):
        if f["upper"] is None or not math.isfinite(f["upper"]):
            print(f"minimal fatal shock of {f['name']}: at least {f['lower']:.4g} (no tested shock up to r_max reached "
                  f"another attractor; {f['tested']} tested, {f.get('unknown', 0)} of them unknown)")
        else:
            print(f"minimal fatal shock of {f['name']}: in [{f['lower']:.4g}, {f['upper']:.4g}] (upper: a shock found "
                  f"that reaches another attractor; lower: over the {f['tested']} shocks tested, "
                  f"{f.get('unknown', 0)} of them unknown)")
    if "tipping" in s:
        t = s["tipping"]
        print(f"tipping from beta = {t['beta_before']:g} to {t['beta_after']:g} (rows: before, columns: after): "
              f"{np.round(np.asarray(t['matrix'], float), 3).tolist()}")


run = releasing_locks(_run)
