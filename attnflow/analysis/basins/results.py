"""The results of a basin study: frozen records with one JSON form (docs/model.md section 9)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from ..._json import plain
from ...evolve.outcome import CONVERGED, NOT_CONVERGED, OUTCOMES, SADDLE
from ..classify import OUTCOME_LABELS, describe
from .intervals import interval_with_unknown, simultaneous_z, wilson
from .tally import Tally, hist_median


@dataclasses.dataclass(frozen=True)
class Attractor:
    """One attractor, outcome category, or union of attractors of a basin study.

    - `name`: what it is reported under: :func:`~attnflow.analysis.classify.equilibrium_name` for an attractor
      (``"consensus +v1"``, ``"bipartite v1 3:7"``), the category's name (``"not converged"``, ``"saddle"``, ...),
      or the name given to a union.
    - `kind`: the equilibrium kind (``"consensus"``, ``"bipartite"``, ``"clustering"``, ``"polygonal"``), the
      outcome name of a category (``"not_converged"``, ``"saddle"``, ...), or ``"union"``.
    - `outcome`: the :class:`~attnflow.Outcome` name of its members (``"converged"`` for attractors and unions).
    - `count`, `fraction` = count / samples; `interval`: for attractors and unions, the 95% Wilson interval widened
      by every unclassified member (:func:`~attnflow.analysis.basins.interval_with_unknown`); for categories, the
      plain Wilson interval; `sampling_interval`: the plain 95% Wilson interval of count / samples.
    - `steps_mean`, `steps_median`, `steps_max`: steps its members took (None for a union).
    - `eigenvector` (0-based index; JSON writes ``"v1"``), `sign`, `split`, `sizes`: the label's fields.
    - `verdict`: the :class:`~attnflow.Verdict` name of the attractor's equilibrium (``"stable"``, ``"neutral"`` or
      ``"unknown"``; unstable ones are the ``saddle`` category), None for categories.
    - `members`: for ``saddle``, the unstable equilibria and their counts; for a union, its attractors and counts.
    - `row`: the integer label row (the tally key), None for a union.
    - `certified`: how many of its members were decided by a certificate (outcome ``certified``: they entered a
      contracting ball around its verified stable equilibrium) rather than by convergence.
    - `simultaneous_interval`: like `interval`, with the Bonferroni-adjusted z of the K attractors and categories of
      its study (:func:`~attnflow.analysis.basins.intervals.simultaneous_z`), so that all K hold together with
      probability at least 95%; None for a union.
    """

    name: str
    kind: str
    outcome: str
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
    verdict: str | None = None
    members: dict | None = None
    row: tuple | None = None
    certified: int = 0
    simultaneous_interval: tuple[float, float] | None = None

    @property
    def is_attractor(self) -> bool:
        """True for attractors and unions of them, False for the outcome categories."""
        return self.outcome == "converged"

    def to_json(self) -> dict:
        """The JSON form (finite numbers or null only; ``eigenvector`` written as ``"v1"``, 1-based)."""
        out = {"name": self.name, "kind": self.kind, "outcome": self.outcome, "count": self.count,
               "fraction": self.fraction, "interval": list(self.interval),
               "sampling_interval": list(self.sampling_interval),
               "simultaneous_interval": None if self.simultaneous_interval is None else list(self.simultaneous_interval),
               "steps_mean": self.steps_mean,
               "steps_median": self.steps_median, "steps_max": self.steps_max}
        if self.is_attractor and self.kind != "union":
            out.update(eigenvector=None if self.eigenvector is None else f"v{self.eigenvector + 1}", sign=self.sign,
                       split=self.split, sizes=None if self.sizes is None else list(self.sizes), verdict=self.verdict,
                       certified=self.certified)
        if self.members is not None:
            out["members"] = dict(self.members)
        return plain(out)


@dataclasses.dataclass(frozen=True)
class MemberSample:
    """The members of lowest sample index of a study (at most 2000), for figures: `index`, `names` (what each is
    reported under) and `finals` ``(m, n, d)``."""

    index: np.ndarray
    names: tuple[str, ...]
    finals: np.ndarray


@dataclasses.dataclass(frozen=True)
class BasinResult:
    """Basin fractions: the attractors (by count), the outcome categories, totals and a warning.

    - `samples`: N; `unclassified`: u, the members of every category; `not_converged`: those that hit the cap.
    - `attractors`, `categories`: tuples of :class:`Attractor`.
    - `max_steps`, `tol`, `backend`: the cap, the stop tolerance and the backend used.
    - `warning`: one line when u could move a fraction by more than its sampling half-width, else None.
    - `members`: a :class:`MemberSample` of the lowest-index members (for figures), or None.
    """

    samples: int
    attractors: tuple[Attractor, ...]
    categories: tuple[Attractor, ...] = ()
    unclassified: int = 0
    not_converged: int = 0
    max_steps: int | None = None
    tol: float | None = None
    backend: str | None = None
    warning: str | None = None
    members: MemberSample | None = dataclasses.field(default=None, compare=False, repr=False)

    def __getitem__(self, name: str) -> Attractor:
        """The attractor or category of this name (KeyError listing the names otherwise, or when several share it)."""
        found = [a for a in self.attractors + self.categories if a.name == name]
        if len(found) > 1:
            raise KeyError(f"{len(found)} attractors are named {name!r}; select them from res.attractors")
        if found:
            return found[0]
        raise KeyError(f"no attractor or category named {name!r}; have {[a.name for a in self.attractors + self.categories]}")

    def union(self, select: Callable[[Attractor], bool] | Iterable[str], name: str | None = None) -> Attractor:
        """The fraction of a union of attractors, with its interval: e.g. every bipartite state,
        ``res.union(lambda a: a.kind == "bipartite")``, or every state on v1,
        ``res.union(lambda a: a.eigenvector == 0)``, or ``res.union(["consensus +v1", "consensus -v1"])``.

        Its count k is the sum of theirs; its interval is ``[wilson(k, N).lower, wilson(k + u, N).upper]`` like any
        attractor's (u the unclassified members: sampling error plus the worst case of the unknown). Only
        attractors can be joined (a category is not a basin); an empty selection has count 0.
        """
        if callable(select):
            chosen = [a for a in self.attractors if select(a)]
        else:
            wanted = list(select)
            names = {a.name: a for a in self.attractors}
            cats = {c.name for c in self.categories}
            bad = [w for w in wanted if w not in names]
            if any(w in cats for w in bad):
                raise ValueError(f"{[w for w in bad if w in cats]} are outcome categories, not attractors: a union joins attractors")
            if bad:
                raise ValueError(f"no attractor named {bad}; have {sorted(names)}")
            chosen = [names[w] for w in dict.fromkeys(wanted)]
        k, N, u = sum(a.count for a in chosen), self.samples, self.unclassified
        return Attractor(name or " | ".join(a.name for a in chosen) or "(empty union)", "union", "converged", k,
                         k / N if N else 0.0, interval_with_unknown(k, u, N), wilson(k, N),
                         members={a.name: a.count for a in chosen})

    def to_json(self) -> dict:
        """The JSON form (every command, result file and notebook uses these keys; no NaN or infinity)."""
        return plain({"samples": self.samples, "max_steps": self.max_steps, "tol": self.tol, "backend": self.backend,
                      "unclassified": self.unclassified, "not_converged": self.not_converged,
                      "attractors": [a.to_json() for a in self.attractors],
                      "categories": [c.to_json() for c in self.categories], "warning": self.warning})

    def to_frame(self):
        """A pandas DataFrame, one row per attractor then per category: name, kind, outcome, count, fraction, the
        interval and sampling interval bounds, steps, the label's fields and the verdict."""
        import pandas as pd

        rows = []
        for a in self.attractors + self.categories:
            rows.append({"name": a.name, "kind": a.kind, "outcome": a.outcome, "count": a.count, "fraction": a.fraction,
                         "lower": a.interval[0], "upper": a.interval[1], "sampling_lower": a.sampling_interval[0],
                         "sampling_upper": a.sampling_interval[1],
                         "simultaneous_lower": None if a.simultaneous_interval is None else a.simultaneous_interval[0],
                         "simultaneous_upper": None if a.simultaneous_interval is None else a.simultaneous_interval[1],
                         "steps_mean": a.steps_mean,
                         "steps_median": a.steps_median, "steps_max": a.steps_max,
                         "eigenvector": None if a.eigenvector is None else f"v{a.eigenvector + 1}", "sign": a.sign,
                         "split": a.split, "sizes": None if a.sizes is None else ":".join(map(str, a.sizes)),
                         "verdict": a.verdict})
        return pd.DataFrame(rows, columns=["name", "kind", "outcome", "count", "fraction", "lower", "upper",
                                           "sampling_lower", "sampling_upper", "simultaneous_lower",
                                           "simultaneous_upper", "steps_mean", "steps_median", "steps_max",
                                           "eigenvector", "sign", "split", "sizes", "verdict"])

    def lines(self) -> list[str]:
        """The text report: a header, one line per attractor and per category, and the warning if any."""
        head = f"{'attractor':34s} {'fraction':>8s}  {'interval (95%, incl. unclassified)':>36s}  {'count':>7s}  steps(mean)"
        out = [f"{self.samples} samples, cap max_steps = {self.max_steps}, tol = {self.tol if self.tol is None else format(self.tol, '.3g')}", head]
        for a in self.attractors + self.categories:
            lo, hi = a.interval
            mean = "" if a.steps_mean is None else f"{a.steps_mean:.0f}"
            out.append(f"{a.name:34s} {a.fraction:8.4f}  {'[' + f'{lo:.4f}, {hi:.4f}' + ']':>36s}  {a.count:7d}  {mean}")
        if self.warning:
            out.append(self.warning)
        return out


def summarize(tally: Tally, verdicts: dict, *, max_steps: int | None = None, tol: float | None = None,
              backend: str | None = None, members: MemberSample | None = None) -> BasinResult:
    """A :class:`BasinResult` from a tally whose rows start with the outcome code (saddles already marked) and the
    verdicts of the converged rows (``{row: "stable" | "neutral" | "unknown"}``)."""
    N, n = tally.total, tally.n
    by_outcome: dict[int, list] = {}
    att_rows = []
    for r in tally.table:
        (att_rows if r[0] == CONVERGED else by_outcome.setdefault(r[0], [])).append(r)
    u = sum(tally.table[r].count for rows in by_outcome.values() for r in rows)
    atts = []
    for r in att_rows:
        e, d = tally.table[r], describe(np.array(r), n)
        atts.append(Attractor(d["name"], d["kind"], "converged", e.count, e.count / N, interval_with_unknown(e.count, u, N),
                              wilson(e.count, N), e.steps_sum / e.count, e.median(), e.steps_max, d["eigenvector"], d["sign"],
                              d["split"], None if d["sizes"] is None else tuple(d["sizes"]), verdicts.get(r, "unknown"), None, r,
                              e.certified))
    atts.sort(key=lambda a: (-a.count, a.name, a.row))  # a total order: the same result whatever the order of the tally
    cats = []
    for code in sorted(by_outcome):
        rows = by_outcome[code]
        es = [tally.table[r] for r in rows]
        c = sum(e.count for e in es)
        hist = np.zeros(max(len(e.hist) for e in es), np.int64)
        for e in es:
            hist[: len(e.hist)] += e.hist
        med = hist_median(hist, c)
        mem = None
        if code == SADDLE:
            mem = {}
            for r, e in zip(rows, es):
                eq = describe(np.array(r), n)["equilibrium"]
                mem[eq] = mem.get(eq, 0) + e.count
        oname = OUTCOMES[code]
        cats.append(Attractor(OUTCOME_LABELS[oname], oname, oname, c, c / N, wilson(c, N), wilson(c, N),
                              sum(e.steps_sum for e in es) / c, med, max(e.steps_max for e in es), members=mem))
    # simultaneous intervals: Bonferroni over the K attractors and categories reported
    z = simultaneous_z(max(1, len(atts) + len(cats)))
    atts = [dataclasses.replace(a, simultaneous_interval=interval_with_unknown(a.count, u, N, z)) for a in atts]
    cats = [dataclasses.replace(c, simultaneous_interval=wilson(c.count, N, z)) for c in cats]
    not_conv = sum(tally.table[r].count for r in by_outcome.get(NOT_CONVERGED, []))
    return BasinResult(N, tuple(atts), tuple(cats), u, not_conv, max_steps, tol, backend,
                       _warning(atts, cats, u, N, max_steps, tol), members)


def _warning(atts, cats, u, N, max_steps, tol=None) -> str | None:
    """One line when u / N exceeds the sampling half-width of some attractor's fraction, with advice per category
    (members not converged that stopped before max_steps were stopped by the stop tolerance with clusters not yet
    resolved, docs/model.md section 10: more steps would not help them)."""
    if u == 0 or N == 0:
        return None
    half = min([(a.sampling_interval[1] - a.sampling_interval[0]) / 2 for a in atts] or [0.0])
    if u / N <= half:
        return None
    parts = ", ".join(f"{c.count} {c.name}" for c in cats)
    stopped = ("members stopped by the stop tolerance" + (f" ({tol:.2g})" if tol is not None else "") + " before "
               "their clusters were resolved (a slow flow): lower [basins] tol, or use float64 or the adaptive solver, whose "
               "floors are lower")
    capped = f"raise [basins] max_steps (now {max_steps})"
    nc = next((c for c in cats if c.outcome == "not_converged" and c.count), None)
    below_cap = nc is not None and None not in (nc.steps_max, max_steps) and nc.steps_max < max_steps
    advice = {"not_converged": stopped if below_cap else capped,
              "saddle": "members stopped within tol of saddles (unstable equilibria): a smaller tol may let them move on",
              "nonfinite": "nonfinite states overflowed: check the model's scale (alpha, beta, the weights) or the step",
              "degenerate": "degenerate states left the state space: check the model's scale (alpha, beta, the "
                            "weights) or the step",
              "solver_failed": "the solver failed: check the model's scale or the solver's tolerances"}
    todo = "; ".join(advice[c.outcome] for c in cats if c.count and c.outcome in advice)
    return (f"warning: {u} of {N} members are unclassified ({parts}); they could move a fraction by up to {u / N:.4f}, "
            f"more than its sampling half-width {half:.4f}: {todo}")
