"""Basins of attraction: Monte Carlo fractions with Wilson intervals, local basin radius, critical shocks,
continuation in beta/alpha. Chunked, streaming to a run directory, resumable, shardable.

Every chunk i draws its initial states from ``jax.random.fold_in(key, i)``, so results do not depend on
how the chunks are scheduled: resumed, sharded over the local devices, or split over processes.

Multi-host runs use ``jax.distributed``: start one process per host (or per local process group) with
``jax.distributed.initialize(coordinator_address="HOST:PORT", num_processes=P, process_id=I)`` -- or
``attnflow basins CONFIG --out DIR --coordinator HOST:PORT --num-processes P --process-id I`` -- and call
:func:`basin_fractions` with the same arguments in each. Process I computes the chunks i with i % P == I (each
on its own local devices), the per-attractor tallies are all-gathered at the end, and every process returns the
same global result; process 0 writes the summary. With a run directory it must be shared by all processes;
``resume`` works as in one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Tokens
from ..evolve import sample
from ..evolve.simulate import simulate
from ..model.dynamics import AbstractDynamics, AbstractFlow
from .classify import NOT_CONVERGED, classify, describe, label_rows


def wilson(k, N, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/N."""
    if N == 0:
        return (0.0, 1.0)
    p = k / N
    den = 1 + z * z / N
    c = (p + z * z / (2 * N)) / den
    h = z * math.sqrt(p * (1 - p) / N + z * z / (4 * N * N)) / den
    return (max(0.0, c - h), min(1.0, c + h))


@dataclasses.dataclass
class BasinResult:
    """Basin fractions: one dict per attractor (label, kind, eigenvector, sign, split, count, fraction,
    ci95, steps statistics), sorted by count, plus totals and the per-sample rows."""

    samples: int
    unconverged: int
    attractors: list[dict]
    rows: np.ndarray | None = None
    steps: np.ndarray | None = None
    finals: np.ndarray | None = None

    def to_json(self) -> dict:
        """The JSON form printed by ``attnflow basins --json``: samples, unconverged, one dict per attractor."""
        keep = ("label", "kind", "eigenvector", "sign", "split", "fraction", "ci95", "count", "steps_mean", "steps_median", "steps_max")
        return {"samples": self.samples, "unconverged": self.unconverged, "attractors": [{k: a[k] for k in keep} for a in self.attractors]}


class _Tally:
    """Streaming per-attractor counts and step statistics: memory grows with the number of attractors, not samples."""

    def __init__(self):
        self.table: dict[tuple, list] = {}
        self.n = None
        self.total = 0

    def add(self, rows: np.ndarray, steps: np.ndarray) -> None:
        self.n = _tokens_from_rows(rows)
        self.total += len(rows)
        uniq, inv = np.unique(rows, axis=0, return_inverse=True)
        inv = np.asarray(inv).ravel()
        for j, r in enumerate(uniq):
            s = steps[inv == j].astype(np.int64)
            self._accumulate(tuple(int(v) for v in r), len(s), int(s.sum()), int(s.max()), np.bincount(s))

    def merge(self, other: "_Tally") -> None:
        """Add another tally (e.g. another process's) into this one."""
        self.n = self.n if self.n is not None else other.n
        self.total += other.total
        for r, (c, ssum, smax, hist) in other.table.items():
            self._accumulate(r, c, ssum, smax, hist)

    def _accumulate(self, r: tuple, count: int, ssum: int, smax: int, hist: np.ndarray) -> None:
        e = self.table.setdefault(r, [0, 0, 0, np.zeros(1, np.int64)])
        e[0] += count
        e[1] += ssum
        e[2] = max(e[2], smax)
        if len(hist) > len(e[3]):
            e[3] = np.pad(e[3], (0, len(hist) - len(e[3])))
        e[3][: len(hist)] += hist

    def to_bytes(self) -> bytes:
        import json

        return json.dumps({"n": self.n, "total": self.total,
                           "table": [[list(r), c, s, m, h.tolist()] for r, (c, s, m, h) in self.table.items()]}).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> "_Tally":
        import json

        obj, t = json.loads(b.decode()), cls()
        t.n, t.total = obj["n"], obj["total"]
        t.table = {tuple(r): [c, s, m, np.asarray(h, np.int64)] for r, c, s, m, h in obj["table"]}
        return t

    def attractors(self) -> tuple[list[dict], int]:
        out = []
        for r, (c, ssum, smax, hist) in sorted(self.table.items(), key=lambda t: -t[1][0]):
            med = float(np.searchsorted(np.cumsum(hist), (c + 1) / 2))
            out.append({**describe(np.array(r), self.n), "count": c, "fraction": c / self.total,
                        "ci95": list(wilson(c, self.total)), "steps_mean": ssum / c, "steps_median": med, "steps_max": smax,
                        "row": np.array(r)})
        unconverged = sum(e[0] for r, e in self.table.items() if r[0] == NOT_CONVERGED)
        return out, unconverged


def uniform_sampler(tokens: int, d: int, dtype=None) -> Callable:
    """Initial states uniform on the sphere."""
    return lambda key, num: sample.sphere(key, (num, tokens, d), dtype=dtype)


def around_sampler(X, radius: float) -> Callable:
    """Initial states at tangent distance `radius` from X (uniform direction)."""
    return lambda key, num: sample.perturb_ball(key, X, radius, num)


def basin_fractions(
    dyn: AbstractDynamics,
    key: Array,
    samples: int,
    *,
    tokens: int | None = None,
    sampler: Callable | None = None,
    chunk_size: int = 10_000,
    tol: float = 1e-7,
    cluster_tol: float = 1e-3,
    steps: int | None = None,
    t1: float | None = None,
    dt: float | None = None,
    solver=None,
    run_dir=None,
    manifest: dict | None = None,
    resume: bool = False,
    progress: bool = False,
    ci_width: float | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    keep_finals: bool = False,
    dtype=None,
) -> BasinResult:
    """Monte Carlo basin fractions of the attractors of ``dyn``.

    **Arguments:**

    - `dyn`, `key`, `samples`: the model, a PRNG key and the number of initial states.
    - `tokens` n (with the default uniform sampler), or `sampler(key, num) -> (num, n, d)`.
    - `chunk_size`: states per chunk (memory is bounded by the chunk); chunk i uses ``fold_in(key, i)``. On a
      GPU use 10^5 or more, so that the fused kernel (128 members per program) fills the device.
    - `tol`: per-member convergence tolerance of :func:`attnflow.simulate`; members that do not converge are
      counted as "not converged". `cluster_tol`: the classifier's tolerance.
    - `steps` (maps) or `t1`, `dt`, `solver` (flows): the simulation budget.
    - `run_dir`: stream per-chunk Parquet tables and a manifest there; `resume` continues an existing run.
    - `ci_width`: adaptive mode: keep adding chunks (beyond `samples`, up to 100 x `samples`) until every 95%
      interval is narrower than this.
    - `process_index`, `process_count`: this process computes chunks i with i % count == index (default: from
      ``jax.distributed``, i.e. ``jax.process_index()``, ``jax.process_count()``). Under ``jax.distributed`` the
      tallies of all processes are all-gathered, so every process returns the global result.
    - `keep_finals`: also return the final states of the first ~2000 samples (for figures).

    Per-attractor counts and step statistics are tallied chunk by chunk, so host memory is bounded by the chunk
    and the number of attractors, not by `samples`.
    """
    from ..io.results import RunDir, RunDirError

    d = _dim(dyn)
    if sampler is None:
        if tokens is None:
            raise ValueError("basin_fractions needs tokens= (or a sampler)")
        sampler = uniform_sampler(tokens, d, dtype)
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples}, {chunk_size}")
    kw = dict(tol=tol)
    if isinstance(dyn, AbstractFlow):
        kw.update(t1=t1, dt=dt, solver=solver)
    else:
        kw.update(steps=steps)
    distributed = jax.process_count() > 1
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index}, {process_count}")
    if process_count > 1 and ci_width is not None:
        raise ValueError("the adaptive mode (ci_width) runs in one process; pass samples instead")
    rd = None
    if run_dir is not None:
        ident = {"samples": samples, "chunk_size": chunk_size, "key": np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key).tolist(), "tol": tol,
                 "config": (manifest or {}).get("config")}
        man = {"identity": ident, **(manifest or {}), "processes": process_count}
        if distributed:  # process 0 creates (or checks) the run directory; the others join it afterwards
            from jax.experimental import multihost_utils

            err = None
            if process_index == 0:
                try:
                    rd = RunDir(run_dir, man, resume=resume)
                except Exception as e:  # tell the other processes before raising, so none waits forever
                    err = e
            ok = np.asarray(multihost_utils.process_allgather(np.array([err is None], np.int32))).ravel()
            if err is not None:
                raise err
            if not ok.all():
                raise RunDirError(f"process 0 could not open the run directory {run_dir} (see its error)")
            if process_index != 0:
                rd = RunDir(run_dir, man, resume=True)
        else:
            rd = RunDir(run_dir, man, resume=resume)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=samples, unit="samples", desc="basins", smoothing=0.1)
    tally, finals, kept_rows = _Tally(), [], []
    n_chunks = math.ceil(samples / chunk_size)
    i = 0
    while True:
        if i >= n_chunks:
            if ci_width is None or i * chunk_size >= 100 * samples:
                break
            atts, _ = tally.attractors()
            if all(a["ci95"][1] - a["ci95"][0] < ci_width for a in atts):
                break
        num = chunk_size if (i < n_chunks - 1 or ci_width is not None and i >= n_chunks) else samples - chunk_size * (n_chunks - 1)
        if i % process_count != process_index:  # another process's chunk
            i += 1
            continue
        if rd is not None and rd.done(i):
            c = rd.read_chunk(i)
            rows, st = c["rows"], c["steps"]
        else:
            x0 = sampler(jax.random.fold_in(key, i), chunk_size)  # full-size chunk: one compiled shape
            sol = simulate(dyn, x0, **kw)
            labels = classify(dyn, sol.final, sol.status, tol=cluster_tol)
            rows = label_rows(labels)[:num]
            st = np.asarray(sol.steps)[:num]
            if rd is not None:
                rd.write_chunk(i, {"rows": rows, "steps": st, "status": np.asarray(sol.status)[:num]})
            if keep_finals and sum(len(f) for f in finals) < 2000:  # a sample for figures, not the study
                finals.append(np.asarray(sol.final)[:num])
                kept_rows.append(rows)
        tally.add(rows, st)
        if bar is not None:
            bar.update(num)
        i += 1
    if bar is not None:
        bar.close()
    if distributed and process_count > 1:
        tally = _allgather_tally(tally)
    atts, unconverged = tally.attractors()
    res = BasinResult(tally.total, unconverged, atts, np.concatenate(kept_rows) if kept_rows else None, None,
                      np.concatenate(finals) if finals else None)
    if rd is not None and process_index == 0:
        rd.write_json("summary.json", res.to_json())
    return res


def _allgather_tally(tally: _Tally) -> _Tally:
    """Merge the tallies of all ``jax.distributed`` processes (serialised, padded, all-gathered); same order everywhere."""
    from jax.experimental import multihost_utils

    b = np.frombuffer(tally.to_bytes(), np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([len(b)], np.int32))).ravel()
    buf = np.zeros(int(lens.max()), np.uint8)
    buf[: len(b)] = b
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lens), -1)
    out = _Tally()
    for k, ln in enumerate(lens):
        out.merge(_Tally.from_bytes(allb[k, : int(ln)].tobytes()))
    return out


def _dim(dyn) -> int:
    attn = getattr(dyn, "attn", None)
    if attn is None:
        raise TypeError(f"cannot infer d from {type(dyn).__name__}")
    return attn.heads.dim


def _tokens_from_rows(rows) -> int:
    return (rows.shape[1] - 4) // 2


def recovery_probability(dyn, X_eq: Tokens, radius: float, key: Array, *, samples: int = 256, tol: float = 1e-7,
                         cluster_tol: float = 1e-3, **sim) -> float:
    """Fraction of perturbations at tangent distance `radius` whose final state has the attractor label of X_eq.

    Recovery is judged by label (the classifier, tolerance `cluster_tol`), not by a raw distance: near a
    marginally stable point the per-step tolerance `tol` stops members at a distance of about tol / (1 - rho),
    which a fixed distance threshold would misread as escape.
    """
    X_eq = jnp.asarray(X_eq)
    x0 = sample.perturb_ball(key, X_eq, radius, samples)
    sol = simulate(dyn, x0, tol=tol, **sim)
    target = label_rows(classify(dyn, X_eq[None], tol=cluster_tol))[0]
    rows = label_rows(classify(dyn, sol.final, tol=cluster_tol))
    return float(np.mean(np.all(rows == target[None], axis=1)))


def local_basin_radius(dyn, X_eq: Tokens, key: Array, *, q: float = 0.9, r_max: float = 3.0, iters: int = 12,
                       samples: int = 256, **sim) -> dict:
    """Largest radius r (bisection in [0, r_max]) at which perturbations of X_eq recover with probability >= q."""
    lo, hi = 0.0, float(r_max)
    probs = {}
    p_hi = recovery_probability(dyn, X_eq, hi, jax.random.fold_in(key, 0), samples=samples, **sim)
    probs[hi] = p_hi
    if p_hi >= q:
        return {"radius": hi, "q": q, "probabilities": probs, "bracket": [hi, hi]}
    for it in range(1, iters + 1):
        mid = 0.5 * (lo + hi)
        p = recovery_probability(dyn, X_eq, mid, jax.random.fold_in(key, it), samples=samples, **sim)
        probs[mid] = p
        lo, hi = (mid, hi) if p >= q else (lo, mid)
    return {"radius": lo, "q": q, "probabilities": dict(sorted(probs.items())), "bracket": [lo, hi]}


def critical_shock(dyn, X_eq: Tokens, key: Array, *, steps: int = 200, candidates: int = 256, r_max: float = 3.0,
                   iters: int = 200, learning_rate: float = 0.02, escape: float = 0.5) -> dict:
    """Smallest perturbation that leaves the basin of X_eq (a discrete map), by optimisation with optax.

    Monte Carlo candidates at growing radii give a first escaping perturbation; then Adam minimises
    ``|delta|^2 + 10 relu(escape - dist(F^steps(X_eq + delta), X_eq))`` over the tangent perturbation delta,
    differentiating through ``steps`` iterations of the map. Every accepted iterate is checked to still escape
    (final distance >= `escape`) by simulation; the smallest such |delta| is returned.
    """
    import optax

    from ..model.norms import normalize_rows

    X = jnp.asarray(X_eq)

    def final_dist(delta):
        Y = normalize_rows(X + delta)
        Y = jax.lax.fori_loop(0, steps, lambda k, Z: dyn.step(k, Z), Y)
        return jnp.sqrt(jnp.sum((Y - X) ** 2))

    best = None
    for j, r in enumerate(np.linspace(r_max / 16, r_max, 16)):
        x0 = sample.perturb_ball(jax.random.fold_in(key, j), X, float(r), candidates)
        dists = jax.vmap(lambda Y: final_dist(Y - X))(x0)
        esc = np.flatnonzero(np.asarray(dists) >= escape)
        if len(esc):
            best = x0[esc[0]] - X
            break
    if best is None:
        return {"radius": None, "delta": None, "message": f"no escape found up to radius {r_max}"}
    from ..model.dynamics import tangent_project

    delta = tangent_project(X, best)
    opt = optax.adam(learning_rate)
    state = opt.init(delta)
    loss = lambda dl: jnp.sum(dl * dl) + 10.0 * jax.nn.relu(escape - final_dist(dl))  # noqa: E731
    step = jax.jit(lambda dl, s: _opt_step(loss, opt, dl, s, X))
    best_norm = float(jnp.linalg.norm(delta))
    best_delta = delta
    for _ in range(iters):
        delta, state = step(delta, state)
        if float(final_dist(delta)) >= escape and float(jnp.linalg.norm(delta)) < best_norm:
            best_norm, best_delta = float(jnp.linalg.norm(delta)), delta
    return {"radius": best_norm, "delta": np.asarray(best_delta), "monte_carlo_radius": float(jnp.linalg.norm(tangent_project(X, best)))}


def _opt_step(loss, opt, delta, state, X):
    from ..model.dynamics import tangent_project

    g = jax.grad(loss)(delta)
    upd, state = opt.update(g, state)
    return tangent_project(X, delta + upd), state


def continuation(dyn, key: Array, samples: int, *, param: str, values, **kw) -> dict:
    """Basin fractions over a grid of beta or alpha values; attractors matched across values by label."""
    if param not in ("beta", "alpha"):
        raise ValueError(f"param must be 'beta' or 'alpha', got {param!r}")
    values = [float(v) for v in values]
    results = [basin_fractions(dyn.with_params(**{param: v}), key, samples, **kw) for v in values]
    labels = []
    for r in results:
        for a in r.attractors:
            if a["label"] not in labels:
                labels.append(a["label"])
    table = {lab: [next((a["fraction"] for a in r.attractors if a["label"] == lab), 0.0) for r in results] for lab in labels}
    return {"param": param, "values": values, "fractions": table, "results": results}
