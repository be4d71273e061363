"""A metastability study: episodes of many members over a sweep of beta and n, summarised with intervals.

Statistics (docs/model.md section 11):

- the cluster count at the first plateau: per count, the fraction of members with Wilson 95% intervals (members
  with no plateau inside the run are counted apart, as unknown);
- dwell times per cluster count and escape times (the exit of the first plateau): right-censored by the end of the
  run, so summarised by the Kaplan-Meier median, with a 95% bootstrap interval over members; a median the run did
  not reach is reported as a lower bound, never as a value;
- per cluster count k, the exponential rate r of the median dwell time in beta, log T_k(beta) = a + r beta: least
  squares over the betas whose median is known, with a 95% bootstrap interval (members resampled, paired across
  beta). Counts are not mixed: a k-cluster plateau and a (k+1)-cluster one are different states.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ..basins.intervals import wilson
from ._modes import circle_scale, fastest_mode
from ._plateaus import Episodes, Plateaus, Series, find_plateaus

BOOTSTRAP = 200
"""Bootstrap resamples of the members for the intervals of medians and rates."""


def km_median(durations: np.ndarray, observed: np.ndarray) -> tuple[float, bool]:
    """The Kaplan-Meier median of right-censored durations: ``(median, known)``, the first duration where the
    survival curve S <= 1/2. When S never falls to 1/2, the median is beyond the data: ``(largest duration, False)``,
    a lower bound. S is a product of floats; where it lies within 1e-9 of 1/2 the comparison is made in exact
    integers (S = 1/2 exactly, as for 2m uncensored durations after the m-th, is not lost to rounding)."""
    d = np.asarray(durations, float)
    o = np.asarray(observed, bool)
    if d.size == 0:
        return math.nan, False
    order = np.lexsort((~o, d))  # at equal times, events before censorings
    d, o = d[order], o[order]
    at_risk = d.size - np.arange(d.size)
    surv = np.cumprod(np.where(o, 1.0 - 1.0 / at_risk, 1.0))
    for i in np.nonzero(o & (surv <= 0.5 + 1e-9))[0]:  # S steps down only at events
        if surv[i] < 0.5 - 1e-9 or _half_or_below(at_risk[: i + 1][o[: i + 1]]):
            return float(d[i]), True
    return float(d.max()), False


def _half_or_below(at_risk) -> bool:
    """Whether prod (1 - 1/r) over the risk sets r of the events is <= 1/2, in exact integers."""
    num = den = 1
    for r in at_risk.tolist():
        num, den = num * (r - 1), den * r
    return 2 * num <= den


@dataclasses.dataclass(frozen=True)
class Median:
    """A Kaplan-Meier median with its 95% bootstrap interval; `known` False: `value` is a lower bound. In JSON an
    infinite `lo` or `hi` is written as null; with ``events + censored > 0`` a null bound is +inf (NaN, unknown,
    only occurs without any duration)."""

    value: float
    lo: float
    hi: float
    known: bool
    events: int
    censored: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dataclasses.asdict(self)


MIN_EVENTS = 10
"""Fewer observed exits than this leave a median's interval and a rate's beta unused: too few to bootstrap."""


def _median_with_interval(d, o, groups, rng, members: int) -> Median:
    """KM median of (d, o) with a bootstrap over all `members` (a member contributes its durations, possibly none;
    a resample whose median is beyond the run counts as +inf). With fewer than :data:`MIN_EVENTS` observed exits the
    interval is (value, +inf) when known: too few to say more."""
    value, known = km_median(d, o)
    boots = []
    if d.size and known and int(o.sum()) >= MIN_EVENTS:
        idx = [np.nonzero(groups == g)[0] for g in range(members)]
        for _ in range(BOOTSTRAP):
            pick = np.concatenate([idx[g] for g in rng.integers(0, members, members)])
            m, k = km_median(d[pick], o[pick]) if pick.size else (math.nan, False)
            boots.append(m if k else math.inf)
    if boots:  # order statistics
        lo, hi = np.percentile(boots, 2.5, method="lower"), np.percentile(boots, 97.5, method="higher")
    elif d.size and known:
        lo, hi = value, math.inf
    else:
        lo, hi = (value, math.inf) if d.size else (math.nan, math.nan)
    return Median(value=float(value), lo=float(lo), hi=float(hi), known=bool(known), events=int(o.sum()),
                  censored=int((~o).sum()))


def _durations(ep: Episodes, count: int | None = None, first: bool = False):
    """(durations, observed, member) of the stored episodes (those with `count`; or only the first). An open
    episode is censored where :meth:`Episodes.censor_at` says: at the end of the run for a one-cluster episode (it
    never ends), where the member stopped otherwise."""
    num = np.minimum(np.asarray(ep.num), ep.entry.shape[1])
    entry, exit_ = np.asarray(ep.entry), np.asarray(ep.exit)
    ends = [ep.censor_at(e) for e in range(1 if first else entry.shape[1])]
    d, o, g = [], [], []
    for b in range(entry.shape[0]):
        for e in range(1 if first else num[b]):
            if e >= num[b] or (count is not None and int(ep.count[b, e]) != count):
                continue
            closed = np.isfinite(exit_[b, e])
            d.append((exit_[b, e] if closed else ends[e][b]) - entry[b, e])
            o.append(closed)
            g.append(b)
    return np.asarray(d, float), np.asarray(o, bool), np.asarray(g, int)


def _escape(ep: Episodes):
    """(time of leaving the first plateau, observed, member), over members that have one; a member whose first
    plateau is one cluster never leaves it and is censored at the end of the run."""
    num = np.asarray(ep.num)
    has = num > 0
    exit_ = np.asarray(ep.exit)[:, 0]
    closed = has & np.isfinite(exit_)
    t = np.where(closed, exit_, ep.censor_at(0))
    return t[has], closed[has], np.nonzero(has)[0]


@dataclasses.dataclass(frozen=True)
class Cell:
    """The summary of one (n, beta): `first_counts` maps a cluster count to ``(members, fraction, lo, hi)`` of the
    members whose first plateau has that count; `no_plateau` members had none inside the run; `dwell` maps a count
    to the :class:`Median` dwell time of its episodes; `first_dwell` and `escape` are the first plateau's dwell time
    and exit time; `k_star` the fastest linear mode on the circle
    (docs/model.md section 11.5; None for a model outside its setting: see
    :func:`~attnflow.analysis.metastability._modes.circle_scale`)."""

    tokens: int
    beta: float
    members: int
    first_counts: dict[int, tuple[int, float, float, float]]
    no_plateau: int
    dwell: dict[int, Median]
    first_dwell: Median
    escape: Median
    k_star: int | None

    @property
    def mode(self) -> int | None:
        """The most frequent cluster count at the first plateau (None without any plateau)."""
        if not self.first_counts:
            return None
        return max(self.first_counts, key=lambda k: (self.first_counts[k][0], -k))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dict(tokens=self.tokens, beta=self.beta, members=self.members, mode=self.mode, k_star=self.k_star,
                    no_plateau=self.no_plateau,
                    first_counts={str(k): dict(members=v[0], fraction=v[1], lo=v[2], hi=v[3])
                                  for k, v in sorted(self.first_counts.items())},
                    dwell={str(k): m.to_dict() for k, m in sorted(self.dwell.items())},
                    first_dwell=self.first_dwell.to_dict(), escape=self.escape.to_dict())


def summarise(ep: Episodes, tokens: int, beta: float, k_star: int | None, rng) -> Cell:
    """The :class:`Cell` of one (n, beta) from its members' episodes."""
    B = ep.num.shape[0]
    num = np.asarray(ep.num)
    first = np.where(num > 0, np.asarray(ep.count)[:, 0], 0)
    counts = {}
    for k in sorted(set(first[num > 0].tolist())):
        m = int(np.sum(first == k))
        lo, hi = wilson(m, B)
        counts[int(k)] = (m, m / B, lo, hi)
    dwell = {}
    stored = np.asarray(ep.count)[np.arange(ep.count.shape[1])[None, :] < np.minimum(num, ep.count.shape[1])[:, None]]
    for k in sorted(set(stored.tolist()) - {1}):  # one cluster is absorbing: it has no dwell time
        dwell[int(k)] = _median_with_interval(*_durations(ep, count=int(k)), rng, B)
    return Cell(tokens=int(tokens), beta=float(beta), members=int(B), first_counts=counts,
                no_plateau=int(np.sum(num == 0)), dwell=dwell,
                first_dwell=_median_with_interval(*_durations(ep, first=True), rng, B),
                escape=_median_with_interval(*_escape(ep), rng, B), k_star=k_star)


@dataclasses.dataclass(frozen=True)
class Rate:
    """The fitted rate r of log T = a + r beta (T the median dwell time of the episodes with `count` clusters) at one
    n, with its 95% bootstrap interval; `betas` are the values used (those whose median the run reached)."""

    tokens: int
    count: int
    rate: float
    lo: float
    hi: float
    intercept: float
    betas: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dataclasses.asdict(self)


def _fit(betas, medians):
    b, m = np.asarray(betas, float), np.asarray(medians, float)
    A = np.stack([np.ones_like(b), b], 1)
    (a, r), *_ = np.linalg.lstsq(A, np.log(m), rcond=None)
    return float(r), float(a)


def fit_rate(eps: list[Episodes], betas, tokens: int, count: int, rng) -> Rate | None:
    """The exponential rate in beta of the median dwell time of the episodes with `count` clusters, over the betas
    whose median is known from at least :data:`MIN_EVENTS` exits (None with fewer than two such betas). The 95%
    interval resamples the members (paired across beta); when more than 2.5% of the resamples lose a median, the
    interval is unknown (NaN), never a narrowed one."""
    durs = [_durations(e, count=count) for e in eps]
    meds = [km_median(d, o) for d, o, _ in durs]
    use = [i for i, (m, k) in enumerate(meds) if k and m > 0 and int(durs[i][1].sum()) >= MIN_EVENTS]
    if len(use) < 2:
        return None
    r, a = _fit([betas[i] for i in use], [meds[i][0] for i in use])
    B = eps[0].num.shape[0]
    boots, failed = [], 0
    idx = {i: [np.nonzero(durs[i][2] == p)[0] for p in range(B)] for i in use}
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, B, B)
        ms = []
        for i in use:
            d, o, _ = durs[i]
            sel = np.concatenate([idx[i][p] for p in pick])
            m, k = km_median(d[sel], o[sel]) if sel.size else (math.nan, False)
            ms.append(m if (k and m > 0) else math.nan)
        if np.all(np.isfinite(ms)):
            boots.append(_fit([betas[i] for i in use], ms)[0])
        else:
            failed += 1
    if failed > 0.025 * BOOTSTRAP:
        lo, hi = math.nan, math.nan
    else:
        lo, hi = np.percentile(boots, 2.5), np.percentile(boots, 97.5)
    return Rate(tokens=int(tokens), count=int(count), rate=r, lo=float(lo), hi=float(hi), intercept=a,
                betas=tuple(float(betas[i]) for i in use))


@dataclasses.dataclass(frozen=True)
class MetastabilityResult:
    """The result of :func:`metastability`: one :class:`Cell` per (n, beta) in `cells`, one :class:`Rate` per
    (n, count) in `rates` (those with at least two betas whose median dwell time is known), the raw `episodes[n]` (axis 0 over beta) and `series[n]` (the
    readings of the first traced members, axis 0 over beta), and the settings."""

    cells: tuple[Cell, ...]
    rates: dict[tuple[int, int], Rate]
    episodes: dict[int, Episodes]
    series: dict[int, Series | None]
    betas: tuple[float, ...]
    tokens: tuple[int, ...]
    rule: Plateaus
    t1: float
    dt: float

    def cell(self, tokens: int, beta: float) -> Cell:
        """The cell of (tokens, beta)."""
        for c in self.cells:
            if c.tokens == tokens and math.isclose(c.beta, beta):
                return c
        raise KeyError(f"no cell for tokens={tokens}, beta={beta}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the summaries and settings; not the raw episodes)."""
        return dict(cells=[c.to_dict() for c in self.cells],
                    rates=[r.to_dict() for r in self.rates.values()],
                    betas=list(self.betas), tokens=list(self.tokens), t1=self.t1, dt=self.dt,
                    rule={f.name: getattr(self.rule, f.name) for f in dataclasses.fields(self.rule)})

    def to_frame(self):
        """One row per (tokens, beta, count) with the first-plateau fraction and interval and the median dwell time
        (a pandas DataFrame)."""
        import pandas as pd

        rows = []
        for c in self.cells:
            for k in sorted(set(c.first_counts) | set(c.dwell)):
                m, f, lo, hi = c.first_counts.get(k, (0, 0.0, *wilson(0, c.members)))
                dw = c.dwell.get(k)
                rows.append(dict(tokens=c.tokens, beta=c.beta, count=k, first_members=m, first_fraction=f,
                                 first_lo=lo, first_hi=hi,
                                 dwell_median=None if dw is None else dw.value,
                                 dwell_lo=None if dw is None else dw.lo, dwell_hi=None if dw is None else dw.hi,
                                 dwell_known=None if dw is None else dw.known))
        return pd.DataFrame(rows)


def metastability(dynamics, key, *, tokens, betas, members: int, t1: float, dt: float | None = None,
                  rule: Plateaus = Plateaus(), trace: int = 4, x0=None, seed: int = 0,
                  stop_after: int | None = None, progress=None, done: dict | None = None,
                  on_done=None) -> MetastabilityResult:
    """Episodes of `members` random initial states for every n in `tokens` and beta in `betas`, summarised.

    **Arguments:**

    - `dynamics`: a flow or map with ``.attn`` (its beta is replaced by each value of `betas`).
    - `key`: the PRNG key of the initial states, uniform on the sphere (the same members for every beta).
    - `tokens`, `betas`: the sweep; all betas of one n run in one compiled call.
    - `members`, `t1`, `dt`, `rule`, `stop_after`: as in :func:`find_plateaus`; `trace`: members whose readings
      are kept for figures.
    - `x0`: optional dict n -> ``(members, n, d)`` initial states instead of random ones.
    - `seed`: the seed of the bootstrap resampling (explicit, so a result is reproducible).
    - `progress`: optional callable ``(i, total, tokens)`` called before each n.
    - `done`: optional dict n -> ``(episodes, series)`` already computed (a resumed run: those n are not run again);
      `on_done`: optional callable ``(n, episodes, series)`` called after each n is computed (to save it).

    **Returns:** a :class:`MetastabilityResult`.
    """
    from ...evolve.sample import sphere

    tokens = tuple(int(n) for n in np.atleast_1d(tokens))
    betas = tuple(float(b) for b in np.atleast_1d(np.asarray(betas, float)))
    if not tokens or min(tokens) < 2:
        raise ValueError(f"tokens must list integers >= 2, got {tokens}")
    if len(set(tokens)) != len(tokens):  # each n is one cell, one file of episodes: a second would replace the first
        raise ValueError(f"tokens must list each n once, got {list(tokens)}")
    if len(set(betas)) != len(betas):
        raise ValueError(f"betas must list each beta once, got {list(betas)}")
    if not betas or not all(math.isfinite(b) and b > 0 for b in betas):
        raise ValueError(f"betas must be finite numbers > 0, got {betas}")
    if isinstance(members, bool) or not isinstance(members, (int, np.integer)) or members < 1:
        raise ValueError(f"members must be an integer >= 1, got {members!r}")
    attn = getattr(dynamics, "attn", None)
    if attn is None:
        raise TypeError(f"metastability needs a model with .attn (SphereFlow, LayerMap, ...), got {type(dynamics).__name__}")
    d = attn.heads.dim
    dtype = attn.heads.Q.dtype
    rng = np.random.default_rng(seed)
    # k* of docs/model.md section 11.5, only for the model it describes (at c x beta when every M_h = c I); None otherwise
    scale = circle_scale(dynamics)
    cells, rates, episodes, series = [], {}, {}, {}
    keys = jax.random.split(key, len(tokens))
    for i, n in enumerate(tokens):
        if progress is not None:
            progress(i, len(tokens), n)
        if done is not None and n in done:
            ep, ser = done[n]
        else:
            X = np.asarray(x0[n]) if x0 is not None else np.asarray(sphere(keys[i], (members, n, d), dtype=dtype))
            ep, ser = find_plateaus(dynamics, X, t1=t1, dt=dt, rule=rule, trace=trace, beta=betas,
                                    stop_after=stop_after)
            if on_done is not None:
                on_done(n, ep, ser)
        per_beta = [jax.tree.map(lambda a, j=j: np.asarray(a)[j], ep) for j in range(len(betas))]
        for j, b in enumerate(betas):
            ks = fastest_mode(scale * b, kind=attn.attention.kind) if scale is not None else None
            cells.append(summarise(per_beta[j], n, b, ks, rng))
        for k in sorted({k for c in cells if c.tokens == n for k in c.dwell}):
            r = fit_rate(per_beta, betas, n, k, rng)
            if r is not None:
                rates[(n, k)] = r
        episodes[n], series[n] = ep, ser
    flow_dt = 1.0 if getattr(dynamics, "time", "") == "discrete" else (0.05 if dt is None else float(dt))
    return MetastabilityResult(cells=tuple(cells), rates=rates, episodes=episodes, series=series, betas=betas,
                               tokens=tokens, rule=rule, t1=float(t1), dt=flow_dt)
