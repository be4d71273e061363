"""Basins of attraction: Monte Carlo fractions with intervals that include what is unknown, local basin radius,
critical shocks, continuation in beta/alpha. Pooled, streaming to a run directory, resumable, shardable.

**Every member runs until it is classified, or until a hard cap.** A fixed-size pool of member slots lives on the
device (:func:`attnflow.evolve.stream.advance_pool`): every few steps (``round_steps``, default 8), members that
converged, failed or reached ``max_steps`` are retired (labelled in the same compiled call, tallied, written) and
their slots take the next samples of the stream. So a stopped member costs no further steps and slow members are
not cut off at a short budget. (Adaptive solves, the ``"fused"`` backend and processes with several local devices
run in rounds of :func:`attnflow.simulate` instead, :func:`run_pool`: each round is sharded over the devices.)

**Sample i is always drawn from** ``jax.random.fold_in(key, i)``, so results do not depend on the pool size, the
round length, the block size, the devices, the number of processes or a resume.

**Categories and intervals.** Members that hit ``max_steps`` ("not converged"), went non-finite ("nonfinite"), left
the sphere while finite ("degenerate"), whose solver failed ("solver failed") or that stopped at an equilibrium
verified to be unstable ("saddle") are *unclassified*: u members in all. An attractor with k of N members gets
the interval ``[wilson(k, N).lower, wilson(k + u, N).upper]``: the 95% Wilson interval widened by the worst-case
assignment of every unclassified member to it. Categories get their plain Wilson interval.

**Saddles.** A member's per-step change can drop below ``tol`` while it passes slowly near an unstable equilibrium.
Once per label, the equilibrium behind it (the final state of its lowest-index member) is refined
(:func:`attnflow.analysis.equilibria.refine`) and its intrinsic spectrum checked
(:func:`attnflow.analysis.stability.analyse`); members of labels whose equilibrium is unstable are reported as
"saddle", never in an attractor's basin.

**Run directories and processes.** Samples are grouped in blocks of ``chunk_size`` consecutive indices; a block is
written (through the `writer` passed in, e.g. :class:`attnflow.io.results.RunDirWriter`) once all its members are
retired, and ``resume`` skips written blocks. Multi-host runs use ``jax.distributed``: process I computes the
blocks b with b % P == I, the tallies are all-gathered at the end, and every process returns the same result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Tokens
from ..evolve import sample
from ..evolve.simulate import STATUS_NAMES, simulate
from ..evolve.stream import GROUP
from ..model.dynamics import AbstractDynamics, AbstractFlow
from .classify import KIND_NAMES, NOT_CONVERGED, SADDLE, UNCLASSIFIED, classifier, classify, describe, equilibrium_name, label_rows

_CODE = {name: code for code, name in enumerate(STATUS_NAMES)}
_MAX_STEPS, _CONVERGED = _CODE.get("max_steps", 0), _CODE.get("converged", 1)
DEFAULT_MAX_STEPS = 10_000
"""The smallest default step cap; the default is ``max(10 * budget, DEFAULT_MAX_STEPS)``."""


def wilson(k, N, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/N."""
    if N == 0:
        return (0.0, 1.0)
    p = k / N
    den = 1 + z * z / N
    c = (p + z * z / (2 * N)) / den
    h = z * math.sqrt(max(p * (1 - p), 0.0) / N + z * z / (4 * N * N)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def interval_with_unknown(k: int, u: int, N: int) -> tuple[float, float]:
    """``[wilson(k, N)[0], wilson(k + u, N)[1]]``: sampling error plus the worst case of the u unclassified members."""
    return (wilson(k, N)[0], wilson(min(k + u, N), N)[1])


# ----------------------------------------------------------------------------------------------- result records


@dataclasses.dataclass(frozen=True)
class Attractor:
    """One attractor (or outcome category) of a basin study.

    - `name`: :func:`~attnflow.analysis.classify.equilibrium_name` (``"consensus +v1"``, ``"bipartite v1 3:7"``,
      ``"not converged"``, ``"saddle"``, ...).
    - `kind`, `eigenvector` (0-based index; JSON writes ``"v1"``), `sign`, `split`, `sizes`: the label's fields.
    - `count`, `fraction` = count / samples; `interval`: see :func:`interval_with_unknown` (categories: Wilson);
      `sampling_interval`: the plain 95% Wilson interval of count / samples.
    - `steps_mean`, `steps_median`, `steps_max`: steps the members took.
    - `equilibrium`: ``"stable"``, ``"neutral"``, ``"unverified"`` or None (categories); `members`: for
      "saddle", the names of the unstable equilibria and their counts.
    - `row`: the integer label row (the tally key).
    """

    name: str
    kind: str
    count: int
    fraction: float
    interval: tuple[float, float]
    sampling_interval: tuple[float, float]
    steps_mean: float | None = None
    steps_median: float | None = None
    steps_max: int | None = None
    eigenvector: int | None = None
    sign: int | None = None
    split: int | None = None
    sizes: tuple[int, ...] | None = None
    equilibrium: str | None = None
    members: dict | None = None
    row: tuple | None = None

    @property
    def label(self) -> str:
        """Same as `name`."""
        return self.name

    @property
    def is_attractor(self) -> bool:
        """False for the outcome categories (not converged, nonfinite, degenerate, solver failed, saddle)."""
        return KIND_NAMES.index(self.kind) not in UNCLASSIFIED

    def __getitem__(self, key: str):  # read access as a mapping: a["fraction"], a["ci95"] (the interval)
        if key == "ci95":
            return list(self.interval)
        if key == "label":
            return self.name
        return getattr(self, key)

    def to_json(self) -> dict:
        """JSON form (finite numbers or null only): ``label`` is the `name`; ``eigenvector`` is written as ``"v1"``
        (1-based)."""
        out = {"label": self.name, "kind": self.kind, "count": self.count, "fraction": self.fraction,
               "interval": list(self.interval), "sampling_interval": list(self.sampling_interval),
               "steps_mean": self.steps_mean, "steps_median": self.steps_median, "steps_max": self.steps_max}
        if self.is_attractor:
            out.update(eigenvector=None if self.eigenvector is None else f"v{self.eigenvector + 1}", sign=self.sign,
                       split=self.split, sizes=None if self.sizes is None else list(self.sizes), equilibrium=self.equilibrium)
        if self.members is not None:
            out["members"] = dict(self.members)
        return _finite(out)


@dataclasses.dataclass
class BasinResult:
    """Basin fractions: the attractors (sorted by count), the outcome categories with members, totals, a warning.

    - `samples`: N; `unclassified`: u (members of every category); `unconverged`: members that hit `max_steps`.
    - `attractors`, `categories`: lists of :class:`Attractor`.
    - `warning`: one line when u could move a fraction by more than its sampling half-width, else None.
    - `max_steps`, `tol`: the cap and tolerance used.
    - `rows`, `finals`: label rows and final states of the lowest-index samples (for figures), or None.
    """

    samples: int
    unconverged: int
    attractors: list[Attractor]
    categories: list[Attractor] = dataclasses.field(default_factory=list)
    unclassified: int = 0
    warning: str | None = None
    max_steps: int | None = None
    tol: float | None = None
    rows: np.ndarray | None = None
    finals: np.ndarray | None = None
    names: list[str] | None = None
    backend: str | None = None

    def to_json(self) -> dict:
        """The JSON form printed by ``attnflow basins --json`` (no NaN or infinity anywhere)."""
        return _finite({"samples": self.samples, "max_steps": self.max_steps, "tol": self.tol, "backend": self.backend,
                        "unclassified": self.unclassified, "unconverged": self.unconverged,
                        "attractors": [a.to_json() for a in self.attractors],
                        "categories": [c.to_json() for c in self.categories], "warning": self.warning})

    def lines(self) -> list[str]:
        """The text report: a header, one line per attractor and per category, and the warning if any."""
        head = f"{'attractor':34s} {'fraction':>8s}  {'interval (95%, incl. unclassified)':>36s}  {'count':>7s}  steps(mean)"
        out = [f"{self.samples} samples, cap max_steps = {self.max_steps}, tol = {self.tol}", head]
        for a in self.attractors + self.categories:
            lo, hi = a.interval
            mean = "" if a.steps_mean is None else f"{a.steps_mean:.0f}"
            out.append(f"{a.name:34s} {a.fraction:8.4f}  {'[' + f'{lo:.4f}, {hi:.4f}' + ']':>36s}  {a.count:7d}  {mean}")
        if self.warning:
            out.append(self.warning)
        return out


def _finite(obj):
    """Replace NaN/inf floats by None, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ----------------------------------------------------------------------------------------------------- the tally

_HASH = np.random.default_rng(20261130).integers(1, 2**62, size=4096, dtype=np.int64) | 1


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unique rows, index of the first occurrence of each, inverse)`` of integer rows ``(b, r)``, as
    ``np.unique(rows, axis=0, return_index=True, return_inverse=True)`` gives them but in another order, and fast:
    each row is hashed to one int64 (wrapping multiply-add). The result is checked; should two rows share a hash,
    the exact row sort is used."""
    rows = np.ascontiguousarray(rows, np.int64)
    if rows.shape[1] > len(_HASH):
        return _exact_unique(rows)
    keys = rows @ _HASH[: rows.shape[1]]
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    inv = np.asarray(inv).ravel()
    uniq = rows[first]
    if not np.array_equal(uniq[inv], rows):  # a hash collision
        return _exact_unique(rows)
    return uniq, first, inv


def _exact_unique(rows):
    uniq, first, inv = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return uniq, first, np.asarray(inv).ravel()



class _Tally:
    """Streaming per-label counts, step statistics and one representative final state (the lowest sample index):
    memory grows with the number of labels, not samples. `tokens` is n (rows do not encode it)."""

    def __init__(self, tokens: int | None = None):
        self.table: dict[tuple, list] = {}
        self.n = tokens
        self.total = 0

    def add(self, rows: np.ndarray, steps: np.ndarray, index: np.ndarray | None = None, finals=None) -> None:
        """Tally rows ``(b, r)`` with their steps; `index` (sample indices) and `finals` ``(b, n*d)`` give
        representatives (NaN rows are skipped)."""
        self.total += len(rows)
        if not len(rows):
            return
        uniq, _, inv = unique_rows(rows)
        finite = None if finals is None else np.all(np.isfinite(finals), axis=1)
        for j, r in enumerate(uniq):
            sel = inv == j
            s = steps[sel].astype(np.int64)
            rep = None
            if index is not None and finals is not None:
                ok = np.flatnonzero(sel & finite)
                if len(ok):
                    m = ok[np.argmin(index[ok])]
                    rep = (int(index[m]), np.asarray(finals[m], np.float64))
            self._accumulate(tuple(int(v) for v in r), len(s), int(s.sum()), int(s.max()), np.bincount(s), rep)

    def merge(self, other: "_Tally") -> None:
        """Add another tally (e.g. another process's) into this one."""
        self.n = self.n if self.n is not None else other.n
        self.total += other.total
        for r, (c, ssum, smax, hist, rep) in other.table.items():
            self._accumulate(r, c, ssum, smax, hist, rep)

    def _accumulate(self, r, count, ssum, smax, hist, rep) -> None:
        e = self.table.setdefault(r, [0, 0, 0, np.zeros(1, np.int64), None])
        e[0] += count
        e[1] += ssum
        e[2] = max(e[2], smax)
        if len(hist) > len(e[3]):
            e[3] = np.pad(e[3], (0, len(hist) - len(e[3])))
        e[3][: len(hist)] += hist
        if rep is not None and (e[4] is None or rep[0] < e[4][0]):
            e[4] = rep

    def to_bytes(self) -> bytes:
        """Serialise (for the multi-host all-gather)."""
        tab = []
        for r, (c, s, m, h, rep) in self.table.items():
            nz = np.flatnonzero(h)
            tab.append([list(r), c, s, m, nz.tolist(), h[nz].tolist(), None if rep is None else [rep[0], rep[1].tolist()]])
        return json.dumps({"n": self.n, "total": self.total, "table": tab}).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> "_Tally":
        """Inverse of :meth:`to_bytes`."""
        obj = json.loads(b.decode())
        t = cls(obj["n"])
        t.total = obj["total"]
        for r, c, s, m, nz, hv, rep in obj["table"]:
            h = np.zeros(max(nz) + 1 if nz else 1, np.int64)
            h[nz] = hv
            t.table[tuple(r)] = [c, s, m, h, None if rep is None else (rep[0], np.asarray(rep[1], np.float64))]
        return t

    def counts(self) -> dict[tuple, int]:
        """Count per label row."""
        return {r: e[0] for r, e in self.table.items()}

    def attractors(self, verdicts: dict | None = None) -> tuple[list[Attractor], int]:
        """(records sorted by count, not-converged count) without saddle verification; see :func:`summarize`."""
        res = summarize(self, verdicts or {})
        return res.attractors + res.categories, res.unconverged


def summarize(tally: _Tally, verdicts: dict, *, max_steps: int | None = None, tol: float | None = None) -> BasinResult:
    """Turn a tally into a :class:`BasinResult`. `verdicts` maps a label row to "stable", "neutral", "unstable" or
    "unverified"; rows verified "unstable" go to the "saddle" category."""
    N, n = tally.total, tally.n
    stats = {}
    for r, (c, ssum, smax, hist, _) in tally.table.items():
        stats[r] = (c, ssum, smax, float(np.searchsorted(np.cumsum(hist), (c + 1) / 2)))
    cat_rows: dict[int, list] = {}
    att_rows = []
    for r in stats:
        kind = r[0]
        if kind not in UNCLASSIFIED and verdicts.get(r) == "unstable":
            kind = SADDLE
        (cat_rows.setdefault(kind, []) if kind in UNCLASSIFIED else att_rows).append(r)
    u = sum(stats[r][0] for rows in cat_rows.values() for r in rows)
    atts = []
    for r in att_rows:
        c, ssum, smax, med = stats[r]
        d = describe(np.array(r), n)
        atts.append(Attractor(d["label"], d["kind"], c, c / N, interval_with_unknown(c, u, N), wilson(c, N), ssum / c, med,
                              smax, d["eigenvector"], d["sign"], d["split"], None if d["sizes"] is None else tuple(d["sizes"]),
                              verdicts.get(r, "unverified"), None, r))
    atts.sort(key=lambda a: (-a.count, a.name))
    cats = []
    for kind in sorted(cat_rows):
        rows = cat_rows[kind]
        c = sum(stats[r][0] for r in rows)
        ssum = sum(stats[r][1] for r in rows)
        members = {describe(np.array(r), n)["label"]: stats[r][0] for r in rows} if kind == SADDLE else None
        cats.append(Attractor(equilibrium_name(KIND_NAMES[kind], None), KIND_NAMES[kind], c, c / N, wilson(c, N), wilson(c, N),
                              ssum / c, None, max(stats[r][2] for r in rows), members=members))
    unconverged = sum(stats[r][0] for r in cat_rows.get(NOT_CONVERGED, []))
    return BasinResult(N, unconverged, atts, cats, u, _warning(atts, u, N, max_steps, cat_rows, stats), max_steps, tol)


def _warning(atts, u, N, max_steps, cat_rows, stats) -> str | None:
    """One line when u / N exceeds the sampling half-width of some attractor's fraction."""
    if u == 0 or N == 0:
        return None
    half = min([(a.sampling_interval[1] - a.sampling_interval[0]) / 2 for a in atts] or [0.0])
    if u / N <= half:
        return None
    parts = ", ".join(f"{sum(stats[r][0] for r in rows)} {equilibrium_name(KIND_NAMES[k], None)}" for k, rows in sorted(cat_rows.items()))
    return (f"warning: {u} of {N} members are unclassified ({parts}); they could move a fraction by up to {u / N:.4f}, "
            f"more than its sampling half-width {half:.4f}: raise [basins] max_steps (now {max_steps})")


# ------------------------------------------------------------------------------------------- samplers and stream


@functools.lru_cache(maxsize=64)
def uniform_sampler(tokens: int, d: int, dtype=None) -> Callable:
    """Initial states uniform on the sphere: ``sampler(key, num) -> (num, n, d)`` (one object per arguments, so
    its compiled drawer is reused across studies)."""
    return lambda key, num: sample.sphere(key, (num, tokens, d), dtype=dtype)


def around_sampler(X, radius: float) -> Callable:
    """Initial states at tangent distance `radius` from X (uniform direction)."""
    return lambda key, num: sample.perturb_ball(key, X, radius, num)


def draw_samples(sampler: Callable, key: Array, indices) -> np.ndarray:
    """Samples ``indices`` of a study: sample i is ``sampler(fold_in(key, i), 1)[0]``. Returns ``(len, n, d)``."""
    return np.asarray(_drawer(sampler)(key, jnp.asarray(np.asarray(indices, np.uint32))))


_DRAWERS: dict = {}


def _drawer(sampler: Callable) -> Callable:
    """A jitted ``(key, indices) -> states`` for one sampler (compiled once per number of indices; cached for the
    last few samplers)."""
    f = _DRAWERS.get(sampler)
    if f is None:
        f = jax.jit(lambda key, idx: jax.vmap(lambda i: sampler(jax.random.fold_in(key, i), 1)[0])(idx))
        if len(_DRAWERS) >= 16:
            _DRAWERS.pop(next(iter(_DRAWERS)))
        _DRAWERS[sampler] = f
    return f


def sample_stream(sampler: Callable, key: Array, blocks: Iterator, block_size: int, samples: int) -> Iterator:
    """Yield ``(indices, states)`` block by block: block b holds the sample indices ``[b*C, min((b+1)*C, end))``,
    with ``end = samples`` for the blocks inside the study (blocks beyond it, in adaptive mode, are full). `blocks`
    yields block ids, or None to ask the consumer to drain (adaptive mode): it is passed on as ``(None, None)``."""
    draw = _drawer(sampler)
    for b in blocks:
        if b is None:
            yield None, None
            continue
        lo = b * block_size
        hi = lo + block_size if lo + block_size <= samples or lo >= samples else samples
        full = np.arange(lo, lo + block_size)  # a full block: one compiled shape
        yield full[: hi - lo], np.asarray(draw(key, jnp.asarray(full.astype(np.uint32))))[: hi - lo]


# ------------------------------------------------------------------------------------------------ the member pool


@dataclasses.dataclass
class _Retired:
    index: np.ndarray
    final: np.ndarray
    status: np.ndarray
    steps: np.ndarray


def _round_plan(dyn, steps, t1, dt, solver, max_steps, round_steps, stream: bool = False) -> tuple[int, int, dict]:
    """(K, cap, kwargs of one round). Rounds of :func:`attnflow.simulate` (``stream=False``): K steps per round, the
    cap rounded up to a whole number of rounds. A member stream (``stream=True``, :func:`run_stream`): K steps
    between retire-and-refill passes, the cap exact, the kwargs those of :func:`attnflow.evolve.stream.advance_pool`."""
    from ..evolve.solvers import Adaptive

    if isinstance(dyn, AbstractFlow):
        if isinstance(solver, Adaptive):  # no fixed step: one round of t1, no continuation
            return 1, 1, dict(t1=t1, solver=solver)
        if dt is None or t1 is None:
            raise ValueError("a continuous basin study needs t1 and dt (the step budget is t1 / dt steps)")
        budget = int(round(t1 / dt))
    else:
        layers = getattr(dyn, "num_layers", None)
        if layers is not None:  # a finite stack: exactly its layers, one round
            return int(layers), int(layers), (dict(solver=solver) if stream else dict(steps=int(layers)))
        if steps is None and max_steps is None:
            raise ValueError("a discrete basin study needs steps= (or max_steps=)")
        budget = int(steps if steps is not None else max_steps)
    cap = int(max_steps) if max_steps is not None else max(10 * budget, DEFAULT_MAX_STEPS)
    if cap < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    target = int(round_steps) if round_steps is not None else (GROUP if stream else 40)
    if target < 1:
        raise ValueError(f"round_steps must be >= 1, got {round_steps}")
    flow = isinstance(dyn, AbstractFlow)
    if stream:
        return target, cap, (dict(dt=dt, solver=solver) if flow else dict(solver=solver))
    K = max((k for k in range(1, min(target, cap) + 1) if cap % k == 0), default=1)
    if K < min(target, cap) / 2:
        K = min(target, cap)
        cap = math.ceil(cap / K) * K
    kw = dict(t1=K * dt, dt=dt, solver=solver) if flow else dict(steps=K)
    return K, cap, kw


def _pool_sizes(pool_size: int, ndev: int) -> list[int]:
    """Pool sizes used as the stream runs dry (fewer compiles than shrinking to every size)."""
    sizes, s = [], pool_size
    while s >= 64 or not sizes:
        sizes.append(math.ceil(s / ndev) * ndev)
        s //= 4
    return sizes or [math.ceil(pool_size / ndev) * ndev]


class _Slots:
    """The pool's host-side state: the member states, their sample indices (-1: free) and steps taken."""

    def __init__(self, P: int):
        self.idx = np.full(P, -1, np.int64)
        self.taken = np.zeros(P, np.int64)
        self.x = None
        self.queue: list = []  # (indices, states) drawn but not yet placed
        self.exhausted = self.waiting = False

    def refill(self, stream: Iterator) -> None:
        """Fill free slots from the stream; stop at its end, or at a drain request ``(None, None)``."""
        free = np.flatnonzero(self.idx < 0)
        while len(free) and not (self.exhausted or self.waiting):
            if not self.queue:
                try:
                    ii, xx = next(stream)
                except StopIteration:
                    self.exhausted = True
                    break
                if ii is None:
                    self.waiting = True
                else:
                    self.queue.append((ii, xx))
                continue
            ii, xx = self.queue[0]
            m = min(len(free), len(ii))
            if self.x is None:
                self.x = np.zeros((len(self.idx),) + xx.shape[1:], xx.dtype)
            self.x[free[:m]], self.idx[free[:m]], self.taken[free[:m]] = xx[:m], ii[:m], 0
            self.queue[0] = (ii[m:], xx[m:])
            if not len(ii) - m:
                self.queue.pop(0)
            free = free[m:]


def run_pool(dyn, stream: Iterator, *, pool_size: int, round_kw: dict, max_steps: int, tol: float,
             retire: Callable, drain: Callable | None = None) -> None:
    """Advance a pool of member slots round by round until the stream is exhausted and every member is retired.

    Each round calls :func:`attnflow.simulate` on the occupied slots with `round_kw` (K steps). A member is
    retired when its status is not "max_steps", when it has taken `max_steps` steps, or when it is degenerate
    (status "degenerate": :func:`attnflow.simulate` checks the model's own ``state_residual``). ``retire(_Retired)`` receives them.
    `drain()` is called when the stream yields ``(None, None)`` and every member is retired. Once the stream
    runs dry the pool shrinks (by factors of 4, so few shapes compile) to fit the members left.
    """
    sizes = _pool_sizes(pool_size, jax.local_device_count())
    pool = _Slots(sizes[0])
    pad = None  # a converged final state: padding slots that stop after one step (a lanes tile of them costs ~nothing)
    while True:
        pool.refill(stream)
        act = np.flatnonzero(pool.idx >= 0)
        if not len(act):
            if not pool.waiting:
                return
            if drain is not None:
                drain()
            pool.waiting = False
            continue
        S = next(s for s in reversed(sizes) if s >= len(act)) if (pool.exhausted or pool.waiting) else sizes[0]
        x = pool.x[act]  # occupied slots first, then padding: a valid state, converged if one is known
        if S > len(act):
            x = np.concatenate([x, np.broadcast_to(pool.x[act[0]] if pad is None else pad, (S - len(act),) + x.shape[1:])])
        sol = simulate(dyn, x, tol=tol, **round_kw)
        k = len(act)
        fin = np.asarray(sol.final)[:k]
        st = np.asarray(sol.status).astype(np.int64)[:k]
        pool.x[act] = fin
        pool.taken[act] += np.asarray(sol.steps).astype(np.int64)[:k]
        done = (st != _MAX_STEPS) | (pool.taken[act] >= max_steps)
        if done.any():
            if pad is None and np.any(done & (st == _CONVERGED)):
                pad = fin[np.flatnonzero(done & (st == _CONVERGED))[0]].copy()
            r = act[done]
            retire(_Retired(pool.idx[r].copy(), fin[done], st[done], pool.taken[r].copy()))
            pool.idx[r] = -1


def run_stream(dyn, stream: Iterator, *, pool_size: int, queue_size: int, step_kw: dict, max_steps: int, tol: float,
               group: int, label: Callable, sink: Callable, drain: Callable | None = None) -> None:
    """Run a member stream (:func:`attnflow.evolve.stream.advance_pool`) over the sample stream, block by block:
    one compiled call per block advances a pool of `pool_size` slots, retires stopped members every `group` steps
    and labels them (`label`, a traceable ``(final, status) -> Labels``) in the same call. The host hands each
    call's members to ``sink(index, rows, steps, status, finals)`` while the next call runs. `drain()` is called
    when the stream yields ``(None, None)`` and every member is retired."""
    from ..evolve.stream import advance_pool, empty_pool

    pool, pending = None, None
    kw = dict(cap=max_steps, tol=tol, group=group, then=label, **step_kw)

    def hand(out):
        if out is not None:
            idx, fin, st, steps, labels = out.valid()
            if len(idx):
                sink(idx, label_rows(labels), steps, st, fin)

    def empty_the_pool():
        nonlocal pool, pending
        if pool is not None:
            pool, out = advance_pool(dyn, pool, blank[0], blank[1], 0, drain=True, **kw)
            hand(pending)
            hand(out)
            pending = None

    blank = None
    for ii, xx in stream:
        if ii is None:  # a drain request
            empty_the_pool()
            if drain is not None:
                drain()
            continue
        if pool is None:
            pool = empty_pool(min(pool_size, queue_size), xx.shape[1], xx.shape[2], xx.dtype)
            blank = (np.zeros((queue_size,) + xx.shape[1:], xx.dtype), np.full(queue_size, -1, np.int32))
        if int(ii[-1]) >= 2**31 - 1:
            raise ValueError("a member stream numbers samples with int32: at most 2^31 - 1 samples")
        q, qi = blank[0].copy(), blank[1].copy()
        q[: len(ii)], qi[: len(ii)] = xx, ii
        pool, out = advance_pool(dyn, pool, q, qi, len(ii), **kw)
        hand(pending)  # the host labels the previous call's members while this call runs
        pending = out
    empty_the_pool()


# ------------------------------------------------------------------------------------------ labelling and blocks


class _Labeller:
    """Labels retired members in fixed-size batches (one compiled shape) and hands ``(index, rows, steps, status,
    finals)`` to `sink`."""

    def __init__(self, dyn, batch: int, cluster_tol: float, sink: Callable):
        self.label, self.batch, self.sink = classifier(dyn, tol=cluster_tol), batch, sink  # the model's eigenpairs once
        self.buf: list[_Retired] = []
        self.count = 0

    def add(self, r: _Retired) -> None:
        self.buf.append(r)
        self.count += len(r.index)
        if self.count >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        idx, fin, st, stp = (np.concatenate([getattr(r, f) for r in self.buf]) for f in ("index", "final", "status", "steps"))
        self.buf, self.count = [], 0
        rows = []
        for s in range(0, len(idx), self.batch):
            f, t = fin[s : s + self.batch], st[s : s + self.batch]
            pad = self.batch - len(f)
            safe = np.where(np.isfinite(f), f, 0.0)
            if pad:
                safe = np.concatenate([safe, np.broadcast_to(safe[:1], (pad,) + safe.shape[1:])])
                t = np.concatenate([t, np.full(pad, _CONVERGED, t.dtype)])
            rows.append(label_rows(classify(self.label, safe, t))[: len(f)])
        self.sink(idx, np.concatenate(rows), stp, st, fin)


class _Blocks:
    """Collects labelled members by block; a complete block is written (if a writer is given) and tallied."""

    def __init__(self, block: int, samples: int, tally: _Tally, writer, keep: int, on_done: Callable | None):
        self.C, self.N, self.tally, self.writer, self.keep, self.on_done = block, samples, tally, writer, keep, on_done
        self.open: dict[int, dict] = {}
        self.kept: dict[int, tuple] = {}

    def size(self, b: int) -> int:
        lo = b * self.C
        return self.C if lo >= self.N else min(self.C, self.N - lo)

    def add(self, idx, rows, steps, status, finals) -> None:
        flat = finals.reshape(len(finals), -1)
        for j in np.flatnonzero(idx < self.keep):
            self.kept[int(idx[j])] = (rows[j], finals[j])
        for b in np.unique(idx // self.C):
            sel = idx // self.C == b
            e = self.open.setdefault(int(b), {"index": [], "row": [], "steps": [], "status": [], "final": []})
            for k, v in (("index", idx[sel]), ("row", rows[sel]), ("steps", steps[sel]), ("status", status[sel]), ("final", flat[sel])):
                e[k].append(v)
            if sum(len(a) for a in e["index"]) == self.size(int(b)):
                self._complete(int(b), {k: np.concatenate(v) for k, v in self.open.pop(int(b)).items()})

    def _complete(self, b: int, cols: dict) -> None:
        order = np.argsort(cols["index"])
        cols = {k: v[order] for k, v in cols.items()}
        rep = _representatives(cols["row"], cols["final"])
        cols["rep"] = rep
        del cols["final"]
        if self.writer is not None:
            self.writer.write_chunk(b, cols)
        self.tally.add(cols["row"], cols["steps"], cols["index"], rep)
        if self.on_done is not None:
            self.on_done(len(cols["index"]))


def _representatives(rows: np.ndarray, finals: np.ndarray) -> np.ndarray:
    """Final states ``(b, n*d)`` (float64) kept only for the first member of each distinct label row; NaN elsewhere."""
    rep = np.full(finals.shape, np.nan)
    first = unique_rows(rows)[1]
    with np.errstate(invalid="ignore"):
        rep[first] = np.asarray(finals[first], np.float64)
    return rep


# ------------------------------------------------------------------------------------------- writer and gather


class StudyWriter(Protocol):
    """What :func:`basin_fractions` needs from a run directory (implemented by
    :class:`attnflow.io.results.RunDirWriter`)."""

    def open(self, identity: dict, *, process_index: int, process_count: int, distributed: bool) -> None:
        """Create or check the run directory for a study with this identity (all processes call it)."""

    def done(self, i: int) -> bool:
        """Whether block i is written."""

    def read_chunk(self, i: int) -> dict:
        """Block i's columns."""

    def write_chunk(self, i: int, columns: dict) -> None:
        """Write block i's columns (atomically)."""


def study_identity(key: Array, samples: int, *, chunk_size: int, tol: float, cluster_tol: float, max_steps: int,
                   config=None, backend: str | None = None, engine: str | None = None) -> dict:
    """The settings a resumed study must share with the run it continues (the resolved `backend` and `engine`
    included: float32 results of different compiled programs agree to rounding only)."""
    kd = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return {"samples": samples, "chunk_size": chunk_size, "key": np.asarray(kd).tolist(), "tol": tol,
            "cluster_tol": cluster_tol, "max_steps": max_steps, "sampling": "fold_in(key, sample index)", "config": config,
            "backend": backend, "engine": engine}


def gather_tally(tally: _Tally) -> _Tally:
    """Merge the tallies of all ``jax.distributed`` processes (serialised, padded, all-gathered); same order everywhere."""
    from jax.experimental import multihost_utils

    b = np.frombuffer(tally.to_bytes(), np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([len(b)], np.int32))).ravel()
    buf = np.zeros(int(lens.max()), np.uint8)
    buf[: len(b)] = b
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lens), -1)
    out = _Tally(tally.n)
    for k, ln in enumerate(lens):
        out.merge(_Tally.from_bytes(allb[k, : int(ln)].tobytes()))
    return out


_allgather_tally = gather_tally


# ------------------------------------------------------------------------------------------ saddle verification


def verify_labels(dyn, tally: _Tally, dtype=None) -> dict:
    """Once per attractor label: refine its representative final state to an equilibrium and check the intrinsic
    spectrum. Returns ``{row: "stable" | "neutral" | "unstable" | "unverified"}``."""
    from .equilibria import refine
    from .stability import analyse

    out = {}
    n = tally.n
    for r, e in tally.table.items():
        if r[0] in UNCLASSIFIED:
            continue
        rep = e[4]
        if rep is None or n is None:
            out[r] = "unverified"
            continue
        X = jnp.asarray(rep[1].reshape(n, -1), dtype)
        f64 = X.dtype == jnp.float64
        try:
            ref = refine(dyn, X)
            Xr = ref.state
            res = float(np.max(np.abs(np.asarray(Xr) - np.asarray(X))))
            if not np.all(np.isfinite(np.asarray(Xr))) or res > 1e-2:
                out[r] = "unverified"
                continue
            st = analyse(dyn, Xr[None], tol=1e-8 if f64 else 1e-4)
        except Exception:  # an equilibrium the tools cannot handle is reported as unverified, not guessed
            out[r] = "unverified"
            continue
        unstable, neutral = int(np.asarray(st.unstable).ravel()[0]), int(np.asarray(st.neutral).ravel()[0])
        out[r] = "unstable" if unstable > 0 else ("neutral" if neutral > 0 else "stable")
    return out


# ------------------------------------------------------------------------------------------------------ the study


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
    max_steps: int | None = None,
    round_steps: int | None = None,
    pool_size: int | None = None,
    writer: StudyWriter | None = None,
    manifest: dict | None = None,
    progress: bool = False,
    ci_width: float | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    keep_finals: bool = False,
    verify: bool = True,
    backend: str = "auto",
    dtype=None,
) -> BasinResult:
    """Monte Carlo basin fractions of the attractors of ``dyn`` (see the module docstring for the design).

    **Arguments:**

    - `dyn`, `key`, `samples`: the model, a PRNG key and the number N of initial states.
    - `tokens` n (with the default uniform sampler), or `sampler(key, num) -> (num, n, d)` (traceable by JAX);
      sample i is ``sampler(fold_in(key, i), 1)[0]``.
    - `tol`: per-step convergence tolerance of :func:`attnflow.simulate`; `cluster_tol`: the classifier's.
    - `steps` (maps) or `t1`, `dt`, `solver` (flows): the usual step budget B (B = t1 / dt for flows).
    - `max_steps`: hard cap per member, in steps; default ``max(10 B, 10_000)``. Rounded up to a whole number of
      rounds. Members still moving at the cap are "not converged". An adaptive flow solver runs one round of t1.
    - `round_steps`: steps between two retire-and-refill passes of the member pool (default 8; for rounds of
      :func:`attnflow.simulate`, 40 or a divisor of `max_steps` near it); `pool_size`: member slots (default
      ``min(512, N)`` on the lanes backend, else ``min(16384, N, max(chunk_size, 64))``). Neither changes any
      result, only speed.
    - `chunk_size`: samples per block of the run directory (and of the sampler calls).
    - `writer`: a :class:`StudyWriter` (e.g. ``attnflow.io.results.RunDirWriter(path, resume=..., manifest=...)``)
      that streams blocks to a run directory and resumes (``attnflow.basin_fractions(..., run_dir=PATH)`` builds
      it from a path). `manifest`: extra entries; its ``"config"`` is part of the study's identity.
    - `ci_width`: adaptive mode: keep adding blocks (beyond `samples`, up to 100 x `samples`) until every
      attractor's interval is narrower than this (one process only).
    - `process_index`, `process_count`: this process computes blocks b with b % count == index (default: from
      ``jax.distributed``); under ``jax.distributed`` the tallies are all-gathered.
    - `keep_finals`: also return the final states of the samples with index < 2000 (for figures).
    - `verify`: check every label's equilibrium (saddles become the "saddle" category).
    - `backend`: the :func:`attnflow.simulate` backend of every round; ``"auto"`` resolves it once for the whole
      study, as :func:`attnflow.chunk_backend` would for one call running all samples for the whole cap (a pure
      function of the model, the shapes, the number of samples and the cap), so every round takes the same path.

    **Returns:** a :class:`BasinResult`. Host memory is bounded by the pool, the blocks in flight and the number of
    labels, not by `samples`.
    """
    d = _dim(dyn)
    if sampler is None:
        if tokens is None:
            raise ValueError("basin_fractions needs tokens= (or a sampler)")
        sampler = uniform_sampler(tokens, d, dtype)
    if samples < 1 or chunk_size < 1:
        raise ValueError(f"samples and chunk_size must be >= 1, got {samples}, {chunk_size}")
    pi, pc, distributed = _processes(process_index, process_count, ci_width)
    shape = jax.eval_shape(lambda k: sampler(k, min(samples, chunk_size)), key)
    streamed, K, cap, round_kw = _engine(dyn, backend, shape, samples, steps, t1, dt, solver, max_steps, round_steps, tol)
    P = _pool_default(pool_size, samples, chunk_size, lanes=streamed and round_kw["backend"] == "lanes")
    if writer is not None:  # the backend and the engine actually used are part of the run's identity
        ident = study_identity(key, samples, chunk_size=chunk_size, tol=tol, cluster_tol=cluster_tol, max_steps=cap,
                               config=(manifest or {}).get("config"), backend=round_kw.get("backend"),
                               engine="stream" if streamed else "rounds")
        writer.open(ident, process_index=pi, process_count=pc, distributed=distributed)
    n = int(np.asarray(jax.eval_shape(lambda k: sampler(k, 1), key).shape)[1])
    tally = _Tally(n)
    bar = _progress_bar(samples) if progress else None
    update = (lambda c: bar.update(c)) if bar is not None else None
    blocks = _Blocks(chunk_size, samples, tally, writer, 2000 if keep_finals else 0, update)
    n_blocks = math.ceil(samples / chunk_size)
    adaptive = None if ci_width is None else (lambda: all(a.interval[1] - a.interval[0] < ci_width for a in summarize(tally, {}).attractors))
    ids = _block_ids(n_blocks, chunk_size, samples, pi, pc, writer, tally, adaptive, update)
    draws = sample_stream(sampler, key, ids, chunk_size, samples)
    if streamed:
        run_stream(dyn, draws, pool_size=P, queue_size=chunk_size if ci_width is not None else min(chunk_size, samples),
                   step_kw=round_kw, max_steps=cap, tol=tol, group=K, label=classifier(dyn, tol=cluster_tol), sink=blocks.add)
    else:
        labeller = _Labeller(dyn, P, cluster_tol, blocks.add)
        run_pool(dyn, draws, pool_size=P, round_kw=round_kw, max_steps=cap, tol=tol, retire=labeller.add, drain=labeller.flush)
        labeller.flush()
    if bar is not None:
        bar.close()
    return _finish(dyn, tally, blocks, gather=distributed and pc > 1, verify=verify, max_steps=cap, tol=tol,
                   backend=round_kw.get("backend"))


def _finish(dyn, tally: _Tally, blocks: "_Blocks", *, gather: bool, verify: bool, max_steps: int, tol, backend) -> BasinResult:
    """Gather the tallies of all processes, verify every label's equilibrium once, and build the result."""
    if blocks.open:  # pragma: no cover - every sample of every started block is retired by construction
        raise RuntimeError(f"internal error: blocks {sorted(blocks.open)} incomplete")
    if gather:
        tally = gather_tally(tally)
    verdicts = verify_labels(dyn, tally) if verify else {}
    res = summarize(tally, verdicts, max_steps=max_steps, tol=tol)
    res.backend = backend
    if blocks.kept:
        order = sorted(blocks.kept)
        res.rows = np.stack([blocks.kept[i][0] for i in order])
        res.finals = np.stack([blocks.kept[i][1] for i in order])
        res.names = [_member_name(r, tally.n, verdicts) for r in res.rows]
    return res


def _member_name(row, n: int, verdicts: dict) -> str:
    """The name a member is reported under (its attractor, its category, or "saddle")."""
    if row[0] not in UNCLASSIFIED and verdicts.get(tuple(int(v) for v in row)) == "unstable":
        return equilibrium_name("saddle", None)
    return describe(row, n)["label"]


def _pool_default(pool_size: int | None, samples: int, chunk_size: int, lanes: bool = False) -> int:
    """The pool size: as given, else ``min(LANES_POOL, samples)`` for a member stream on the lanes backend, else
    ``min(16384, samples, max(chunk_size, 64))`` (a pool no larger than about a block lets blocks complete, and be
    written, while the study runs)."""
    if pool_size is not None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        return int(pool_size)
    if lanes:
        return int(min(LANES_POOL, samples))
    return int(min(16384, samples, max(chunk_size, 64)))


LANES_POOL = 512
"""Default pool of a member stream on the lanes backend. Measured on the 2-core CPU (n = 10, d = 3, cap 1000, 10^5
samples): 256 slots 8 700 samples/s, 512 slots 10 700, 1024 slots 10 400; the drain at the end of a study costs
about a pool times the longest member's steps, so smaller is better for small studies (10^4 samples: 9 200, 9 200
and 7 600)."""


def _engine(dyn, backend, shape, samples, steps, t1, dt, solver, max_steps, round_steps, tol) -> tuple[bool, int, int, dict]:
    """``(streamed, K, cap, kwargs)``: the member stream (:func:`run_stream`, kwargs of
    :func:`attnflow.evolve.stream.advance_pool`) for fixed-step solves on the xla or lanes backend in a process with
    one local device; otherwise rounds of :func:`attnflow.simulate` (:func:`run_pool`, kwargs of one round, which
    shards over several local devices). The backend (``kwargs["backend"]``) is resolved once for the study."""
    from ..evolve.solvers import Adaptive

    K, cap, round_kw = _round_plan(dyn, steps, t1, dt, solver, max_steps, round_steps)
    be = _backend_kw(dyn, backend, shape, samples, cap, round_kw, tol)
    if be["backend"] in ("xla", "lanes") and not isinstance(solver, Adaptive) and jax.local_device_count() == 1:
        K, cap, step_kw = _round_plan(dyn, steps, t1, dt, solver, max_steps, round_steps, stream=True)
        return True, K, cap, {**step_kw, **be}
    return False, K, cap, {**round_kw, **be}


def _backend_kw(dyn, backend: str, shape, samples: int, cap: int, round_kw: dict, tol) -> dict:
    """``{"backend": name}`` for every round: ``"auto"`` is resolved once for the study as :func:`attnflow.chunk_backend`
    resolves one call that runs all `samples` for the whole cap (the rounds share one compiled program, so its
    compile is repaid by the whole study, not by one round)."""
    if backend != "auto":
        return {"backend": backend}
    from ..evolve.simulate import chunk_backend

    full = dict(round_kw)
    if "steps" in full:
        full["steps"] = cap
    elif "dt" in full and full.get("dt") is not None:
        full["t1"] = cap * full["dt"]
    n, d = shape.shape[1:]
    study = np.broadcast_to(np.zeros((1, n, d), shape.dtype), (samples, n, d))  # shape only: no memory
    return {"backend": chunk_backend(dyn, study, tol=tol, **full)}


def _processes(process_index, process_count, ci_width) -> tuple[int, int, bool]:
    distributed = jax.process_count() > 1
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index must be in [0, process_count), got {pi}, {pc}")
    if pc > 1 and ci_width is not None:
        raise ValueError("the adaptive mode (ci_width) runs in one process; pass samples instead")
    return pi, pc, distributed


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="samples", desc="basins", smoothing=0.1)


def _block_ids(n_blocks, block, samples, pi, pc, writer, tally, adaptive, update) -> Iterator:
    """Block ids this process must compute; blocks already written are read into the tally instead. In adaptive
    mode, yields None before each extra block (the consumer drains first) and stops when `adaptive()` is true."""
    b = 0
    while True:
        if b >= n_blocks:
            if adaptive is None:
                return
            yield None
            if adaptive() or b * block >= 100 * samples:
                return
        if b % pc == pi:
            if writer is not None and writer.done(b):
                c = writer.read_chunk(b)
                tally.add(np.asarray(c["row"]), np.asarray(c["steps"]), np.asarray(c["index"]), np.asarray(c["rep"], np.float64))
                if update is not None:
                    update(len(c["index"]))
            else:
                yield b
        b += 1


def _dim(dyn) -> int:
    attn = getattr(dyn, "attn", None)
    if attn is None:
        raise TypeError(f"cannot infer d from {type(dyn).__name__}")
    return attn.heads.dim


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
    rows = label_rows(classify(dyn, sol.final, sol.status, tol=cluster_tol))
    return float(np.mean(np.all(rows == target[None], axis=1)))


DISTANCE = ("Frobenius norm of the tangent perturbation of all n tokens together (before renormalising each token "
            "onto the sphere)")
"""The distance measure of :func:`local_basin_radius` and :func:`critical_shock`."""


def state_name(dyn, X: Tokens, cluster_tol: float = 1e-3) -> str:
    """The :func:`~attnflow.analysis.classify.equilibrium_name` of one state."""
    return classify(dyn, jnp.asarray(X)[None], tol=cluster_tol).names()[0]


def radius_line(what: str, r: dict) -> str:
    """One text line for a radius dict of :func:`local_basin_radius` or :func:`critical_shock`: the value, or
    "≥ r_max" for a lower bound, with the equilibrium it refers to."""
    if r.get("lower_bound"):
        val = f"≥ {r['at_least']:.4g} (the largest radius tried; a lower bound)"
    elif r.get("radius") is None:
        val = "not found"
    else:
        val = f"{r['radius']:.4g}"
    q = f", q = {r['q']}" if "q" in r else ""
    return f"{what} of {r.get('equilibrium', '?')}{q}: {val} (tangent distance)"


def local_basin_radius(dyn, X_eq: Tokens, key: Array, *, q: float = 0.9, r_max: float = 3.0, iters: int = 12,
                       samples: int = 256, cluster_tol: float = 1e-3, **sim) -> dict:
    """Largest radius r (bisection in [0, r_max]) at which perturbations of X_eq recover with probability >= q.

    **Returns:** a dict: ``equilibrium`` (its name), ``distance`` (:data:`DISTANCE`), ``q``, ``radius`` (None when
    only a lower bound is known), ``lower_bound`` (True when recovery at `r_max` is still >= q: the radius is then
    at least ``at_least`` = r_max, not measured), ``at_least``, ``bracket`` and ``probabilities`` per radius tried.
    """
    lo, hi = 0.0, float(r_max)
    probs = {}
    base = {"equilibrium": state_name(dyn, X_eq, cluster_tol), "distance": DISTANCE, "q": q}
    p_hi = recovery_probability(dyn, X_eq, hi, jax.random.fold_in(key, 0), samples=samples, cluster_tol=cluster_tol, **sim)
    probs[hi] = p_hi
    if p_hi >= q:
        return {**base, "radius": None, "lower_bound": True, "at_least": hi, "probabilities": probs, "bracket": [hi, None]}
    for it in range(1, iters + 1):
        mid = 0.5 * (lo + hi)
        p = recovery_probability(dyn, X_eq, mid, jax.random.fold_in(key, it), samples=samples, cluster_tol=cluster_tol, **sim)
        probs[mid] = p
        lo, hi = (mid, hi) if p >= q else (lo, mid)
    return {**base, "radius": lo, "lower_bound": False, "at_least": lo, "probabilities": dict(sorted(probs.items())),
            "bracket": [lo, hi]}


def critical_shock(dyn, X_eq: Tokens, key: Array, *, steps: int = 200, candidates: int = 256, r_max: float = 3.0,
                   iters: int = 200, learning_rate: float = 0.02, escape: float = 0.5) -> dict:
    """Smallest perturbation that leaves the basin of X_eq (a discrete map), by optimisation with optax.

    Monte Carlo candidates at growing radii give a first escaping perturbation; then Adam minimises
    ``|delta|^2 + 10 relu(escape - dist(F^steps(X_eq + delta), X_eq))`` over the tangent perturbation delta,
    differentiating through ``steps`` iterations of the map. Every accepted iterate is checked to still escape
    (final distance >= `escape`) by simulation; the smallest such |delta| is returned.

    **Returns:** a dict: ``equilibrium`` (its name), ``distance`` (:data:`DISTANCE`), ``radius`` (|delta|, an upper
    bound of the critical shock found by search; None when no escape was found), ``lower_bound`` (True when no
    candidate up to `r_max` escaped: then the shock is at least ``at_least`` = r_max for the candidates tried),
    ``delta`` and ``monte_carlo_radius``.
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
    base = {"equilibrium": state_name(dyn, X), "distance": DISTANCE}
    if best is None:
        return {**base, "radius": None, "lower_bound": True, "at_least": float(r_max), "delta": None,
                "message": f"no escape found up to radius {r_max}"}
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
    return {**base, "radius": best_norm, "lower_bound": False, "at_least": None, "delta": np.asarray(best_delta),
            "monte_carlo_radius": float(jnp.linalg.norm(tangent_project(X, best)))}


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
