"""Basins of any system: fractions with intervals, basin maps on 2-D slices, basin entropy, the uncertainty
exponent, minimal fatal shocks and tipping probabilities (docs/model.md section 12)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from ..basins.intervals import interval_with_unknown, simultaneous_z, wilson
from ._label import Attractor, Matcher, recurrence
from ._run import final_segments
from ._system import Flow


@dataclasses.dataclass(frozen=True)
class Run:
    """How members are run and judged: `t1` (flows) or `steps` (maps), the fixed RK4 step `dt` of a flow, a final
    segment of `tail` samples `stride` steps apart, the recurrence tolerance `tol`, the attractor-matching
    tolerance `match_tol`, and the members per compiled call `chunk`."""

    t1: float | None = None
    steps: int | None = None
    dt: float = 0.05
    tail: int = 256
    stride: int = 1
    tol: float = 1e-3
    match_tol: float = 0.05
    chunk: int = 65536

    def __post_init__(self):
        for name in ("dt", "tol", "match_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float, np.number)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Run.{name} must be a finite number > 0, got {v!r}")
        if self.t1 is not None and not (math.isfinite(self.t1) and self.t1 > 0):
            raise ValueError(f"Run.t1 must be a finite number > 0, got {self.t1!r}")
        if self.steps is not None and not (int(self.steps) == self.steps and self.steps >= 1):
            raise ValueError(f"Run.steps must be an integer >= 1, got {self.steps!r}")
        for name, least in (("tail", 2), ("stride", 1), ("chunk", 1)):
            v = getattr(self, name)
            if not (isinstance(v, (int, np.integer)) and v >= least):
                raise ValueError(f"Run.{name} must be an integer >= {least}, got {v!r}")

    def total_steps(self, system) -> int:
        """Steps of a member's run."""
        if isinstance(system, Flow):
            if self.t1 is None or self.steps is not None:
                raise ValueError("a flow runs for t1 (with dt), not steps")
            return int(round(self.t1 / self.dt))
        if self.steps is None or self.t1 is not None:
            raise ValueError("a map runs for steps, not t1")
        return int(self.steps)

    def sample_time(self, system) -> float:
        """Time between two samples of the final segment."""
        return self.stride * (self.dt if isinstance(system, Flow) else 1.0)


def label_members(system, y0, run: Run = Run(), *, label: Callable | None = None, matcher: Matcher | None = None,
                  progress=None, finals: list | None = None):
    """Labels of the members ``y0`` ``(b, m)``: attractor ids (0, 1, ... in order of first arrival; -1 unknown), and the
    :class:`Matcher` holding the attractors. With `label` (a function of one member's final segment ``(tail, m)``
    returning an int, -1 for unknown), the user's labels are used instead of recurrence. With `finals` (a list), each
    chunk's final states ``(c, m)`` are appended to it."""
    steps = run.total_steps(system)
    dt = run.dt if isinstance(system, Flow) else 1.0
    matcher = matcher if matcher is not None else Matcher(system.space, run.match_tol, run.sample_time(system), system)
    out = np.empty(len(y0), int)
    for s, e, seg in final_segments(system, y0, steps=steps, dt=dt, tail=run.tail, stride=run.stride, chunk=run.chunk):
        if label is not None:
            out[s:e] = [int(label(seg[i])) for i in range(e - s)]
        else:
            kind, lag = recurrence(system.space, seg, run.tol, flow=isinstance(system, Flow))
            out[s:e] = matcher.assign(seg, kind, lag)
        if finals is not None:
            finals.append(seg[:, -1])
        if progress is not None:
            progress(e)
    return out, matcher


@dataclasses.dataclass(frozen=True)
class Fractions:
    """Basin fractions of N members: per label, `count`, `fraction`, the Wilson 95% interval widened by the
    `unknown` members (`lo`, `hi`), and the simultaneous 95% interval over all labels at once (Bonferroni,
    `sim_lo`, `sim_hi`); `attractors` the records of the labels. Members on unstable fixed points (`saddle`) are
    counted with the unknown ones."""

    labels: np.ndarray
    counts: dict[int, int]
    unknown: int
    saddle: int
    N: int
    intervals: dict[int, tuple[float, float]]
    simultaneous: dict[int, tuple[float, float]]
    attractors: tuple[Attractor, ...]

    def fraction(self, label: int) -> float:
        """count / N."""
        return self.counts.get(label, 0) / self.N

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dict(N=self.N, unknown=self.unknown, saddle=self.saddle,
                    basins=[dict(label=k, count=c, fraction=c / self.N, lo=self.intervals[k][0],
                                 hi=self.intervals[k][1], sim_lo=self.simultaneous[k][0],
                                 sim_hi=self.simultaneous[k][1],
                                 attractor=next((a.to_dict() for a in self.attractors if a.label == k), None))
                            for k, c in sorted(self.counts.items())])


def fractions_of(labels: np.ndarray, attractors=()) -> Fractions:
    """The :class:`Fractions` of a label array (-1: unknown)."""
    labels = np.asarray(labels)
    N = len(labels)
    unstable = [a.label for a in attractors if a.stable is False]
    saddle = int(np.sum(np.isin(labels, unstable)))
    labels = np.where(np.isin(labels, unstable), -1, labels)
    u = int(np.sum(labels < 0))
    ks = sorted(int(k) for k in np.unique(labels[labels >= 0]))
    counts = {k: int(np.sum(labels == k)) for k in ks}
    z = simultaneous_z(max(len(ks), 1))
    intervals = {k: interval_with_unknown(counts[k], u, N) for k in ks}
    sim = {k: interval_with_unknown(counts[k], u, N, z) for k in ks}
    return Fractions(labels=labels, counts=counts, unknown=u, saddle=saddle, N=N, intervals=intervals, simultaneous=sim,
                     attractors=tuple(attractors))


def basin_fractions(system, y0, run: Run = Run(), *, label: Callable | None = None, progress=None) -> Fractions:
    """Basin fractions of any system over the initial states ``y0`` ``(N, m)``, with intervals.

    **Arguments:** `system` a :class:`Flow` or :class:`Map`; `run` a :class:`Run`; `label` an optional labelling
    function of a final segment (default: fixed points and periodic orbits by recurrence, docs/model.md section 12).

    **Returns:** :class:`Fractions`.
    """
    labels, matcher = label_members(system, np.asarray(y0), run, label=label, progress=progress)
    return fractions_of(labels, matcher.attractors)


# ----------------------------------------------------------------------------------------------- basin maps
@dataclasses.dataclass(frozen=True)
class Slice:
    """A two-parameter family of initial states: y(a, b) = origin + a u + b v (projected onto the space), or
    ``fn(a, b)`` for any other slice (e.g. two angles of one token with the others fixed). `a`, `b`: the grid values
    ``(na,)``, ``(nb,)``."""

    a: np.ndarray
    b: np.ndarray
    origin: np.ndarray | None = None
    u: np.ndarray | None = None
    v: np.ndarray | None = None
    fn: Callable | None = None

    @classmethod
    def coordinates(cls, i: int, j: int, a, b, base) -> "Slice":
        """The plane of coordinates i and j through `base` (the other coordinates fixed)."""
        base = np.asarray(base, float)
        u, v = np.zeros_like(base), np.zeros_like(base)
        u[i], v[j] = 1.0, 1.0
        o = base.copy()
        o[i] = o[j] = 0.0
        return cls(a=np.asarray(a, float), b=np.asarray(b, float), origin=o, u=u, v=v)

    def states(self, rows: slice | None = None) -> np.ndarray:
        """The initial states of the grid (row-major over b then a: ``(nb * na, m)``), or of some rows of b."""
        bs = self.b if rows is None else self.b[rows]
        A, Bm = np.meshgrid(self.a, bs)
        if self.fn is not None:
            return np.stack([np.asarray(self.fn(x, y), float) for x, y in zip(A.ravel(), Bm.ravel())])
        return self.origin[None, :] + A.ravel()[:, None] * self.u[None, :] + Bm.ravel()[:, None] * self.v[None, :]


@dataclasses.dataclass(frozen=True)
class BasinMap:
    """A label image ``(nb, na)`` over a :class:`Slice` (-1: unknown), with the attractors."""

    image: np.ndarray
    a: np.ndarray
    b: np.ndarray
    attractors: tuple[Attractor, ...]

    def fractions(self) -> Fractions:
        """The fractions of the grid's labels."""
        return fractions_of(self.image.ravel(), self.attractors)


def basin_map(system, sl: Slice, run: Run = Run(), *, label: Callable | None = None, rows_per_chunk: int | None = None,
              progress=None) -> BasinMap:
    """The label image of a slice, streamed row block by row block (up to 1000 x 1000 and beyond: memory is one
    block). Labels do not depend on the block size (attractors are numbered in grid order)."""
    na, nb = len(sl.a), len(sl.b)
    rpc = rows_per_chunk or max(1, run.chunk // max(na, 1))
    matcher = Matcher(system.space, run.match_tol, run.sample_time(system), system)
    image = np.empty((nb, na), int)
    for r0 in range(0, nb, rpc):
        r1 = min(r0 + rpc, nb)
        y0 = sl.states(slice(r0, r1))
        labels, _ = label_members(system, y0, dataclasses.replace(run, chunk=len(y0)), label=label, matcher=matcher)
        image[r0:r1] = labels.reshape(r1 - r0, na)
        if progress is not None:
            progress(r1 * na)
    return BasinMap(image=image, a=np.asarray(sl.a), b=np.asarray(sl.b), attractors=tuple(matcher.attractors))


# ---------------------------------------------------------------------------------------- entropy, exponent
def basin_entropy(image: np.ndarray, box: int = 20) -> tuple[float, float]:
    """Basin entropy S_b and boundary basin entropy S_bb (Daza et al. 2016) of a label image, on non-overlapping
    boxes of ``box`` pixels per side starting at the first pixel (a remainder narrower than a box is left out):
    S_b is the mean over all boxes of -sum_j p_j ln p_j (p_j the share of label j in the box; unknown pixels are a
    label of their own), S_bb the mean over the boxes with more than one label (NaN when there is none).
    S_bb > ln 2 is a sufficient condition for a fractal boundary."""
    img = np.asarray(image)
    if isinstance(box, bool) or not isinstance(box, (int, np.integer)) or img.ndim < 1 or box < 1:
        raise ValueError(f"need a label image and an integer box >= 1, got shape {img.shape}, box {box!r}")
    shape = tuple((s // box) for s in img.shape)
    if min(shape) == 0:
        raise ValueError(f"box = {box} is larger than the image {img.shape}")
    crop = img[tuple(slice(0, n * box) for n in shape)]
    # (n0, box, n1, box, ...) -> boxes x pixels
    blocks = crop.reshape(sum(((n, box) for n in shape), ()))
    order = tuple(range(0, 2 * len(shape), 2)) + tuple(range(1, 2 * len(shape), 2))
    blocks = blocks.transpose(order).reshape(int(np.prod(shape)), box ** len(shape))
    S = np.zeros(len(blocks))
    multi = np.zeros(len(blocks), bool)
    for lab in np.unique(crop):
        p = np.mean(blocks == lab, axis=1)
        nz = p > 0
        S[nz] -= p[nz] * np.log(p[nz])
        multi |= nz & (p < 1)
    Sb = float(S.mean())
    Sbb = float(S[multi].mean()) if multi.any() else math.nan
    return Sb, Sbb


@dataclasses.dataclass(frozen=True)
class Exponent:
    """The uncertainty exponent alpha of a label image with its 95% interval (least squares on log f(eps) against
    log eps; NaN when too few box sizes), the box sizes `eps` (pixels) and the uncertain fractions `f` used; the
    boundary's box-counting dimension is D = d - alpha."""

    alpha: float
    lo: float
    hi: float
    eps: np.ndarray
    f: np.ndarray


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""The two-sided 95% quantiles of Student's t with 1..30 degrees of freedom."""

MIN_BOXES = 5
"""An exponent needs at least this many box sizes with f > 0 (3 degrees of freedom); fewer give alpha unknown."""


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t: the table up to 30 degrees of freedom, then the Cornish-Fisher expansion
    z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2) around the normal quantile z (within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return T975[df - 1]
    z = 1.959963984540054
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def uncertainty_exponent(image: np.ndarray, eps=None) -> Exponent:
    """The uncertainty exponent (Grebogi et al. 1983) of a label image: f(eps) is the fraction of non-overlapping
    boxes of eps pixels per side that hold more than one label, f ~ eps^alpha (default eps = 3, 4, ..., max(7, n /
    16, n) pixels, n the shorter side: small boxes, before f saturates at 1). The 95% interval is the least-squares
    slope +- t_{0.975, k-2} standard errors over the k box sizes used; with fewer than :data:`MIN_BOXES` of them
    alpha is unknown (NaN)."""
    img = np.asarray(image)
    if img.ndim < 1 or img.size == 0:
        raise ValueError(f"need a label image, got shape {img.shape}")
    if eps is not None:
        e = np.asarray(eps)
        if e.ndim != 1 or e.size == 0 or e.dtype.kind not in "iuf" or not np.all(np.isfinite(e)) \
                or np.any(e != np.round(e)) or np.any(e < 1) or np.any(e > min(img.shape)):
            raise ValueError(f"eps must be box sizes in whole pixels, 1 <= eps <= {min(img.shape)} (the image's "
                             f"shorter side), got {eps!r}")
    eps = np.asarray(eps if eps is not None else np.arange(3, min(max(7, min(img.shape) // 16), min(img.shape)) + 1),
                     int)
    f = []
    for e in eps:
        shape = tuple(s // e for s in img.shape)
        crop = img[tuple(slice(0, n * e) for n in shape)]
        blocks = crop.reshape(sum(((n, e) for n in shape), ()))
        order = tuple(range(0, 2 * len(shape), 2)) + tuple(range(1, 2 * len(shape), 2))
        blocks = blocks.transpose(order).reshape(int(np.prod(shape)), e ** len(shape))
        f.append(np.mean(np.any(blocks != blocks[:, :1], axis=1)))
    f = np.asarray(f)
    use = f > 0
    x, y = np.log(eps[use]), np.log(f[use])
    if len(x) < MIN_BOXES:
        return Exponent(math.nan, math.nan, math.nan, eps, f)
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    s2 = float(resid @ resid) / (len(x) - 2)
    se = math.sqrt(s2 * np.linalg.inv(A.T @ A)[1, 1])
    t = t975(len(x) - 2)
    return Exponent(float(coef[1]), float(coef[1] - t * se), float(coef[1] + t * se), eps, f)


# ---------------------------------------------------------------------------------------- minimal fatal shock
@dataclasses.dataclass(frozen=True)
class FatalShock:
    """The minimal fatal shock of an attractor, bracketed: `upper` is the norm of a shock found (and simulated) that
    leaves the basin for another attractor (`shock`, its vector); `lower` is the largest norm below which every one
    of the `tested` shocks returned to the attractor (a bound over the tested directions and radii, not a proof).
    `upper` is inf when no shock up to `r_max` reached another attractor. `unknown` of the tested shocks reached no
    attractor the run recognised (label unknown): they are not counted as fatal, and `lower` stays below them."""

    lower: float
    upper: float
    shock: np.ndarray | None
    tested: int
    unknown: int = 0


def _tangent_basis(space, y) -> np.ndarray:
    """An orthonormal basis ``(m, k)`` of the tangent space at ``y``: all of R^m, less each sphere block's normal."""
    m = y.size
    P = np.eye(m)
    for block in space.spheres:
        b = list(block)
        u = np.zeros(m)
        u[b] = y[b] / max(np.linalg.norm(y[b]), 1e-300)
        P -= np.outer(u, u)
    if not space.spheres:
        return np.eye(m)
    w, V = np.linalg.eigh(P)
    return V[:, w > 0.5]


def minimal_fatal_shock(system, state, run: Run = Run(), *, directions: int = 256, radii: int = 64,
                        r_max: float = 1.0, refine: int = 20, key=None, label: Callable | None = None) -> FatalShock:
    """Search the smallest perturbation of ``state`` (a point on an attractor) that sends it to another attractor.

    Shocks r u for unit vectors u in the tangent space at ``state`` (R^m less each sphere block's normal): `directions`
    evenly spaced angles when that space is 2-D, the two directions when it is 1-D (a circle S^1), random ones from
    `key` projected onto it otherwise; and `radii` radii up to `r_max`: along each direction the first radius whose
    member does not return to the attractor of ``state`` is bisected `refine` times against the last radius that
    returned. The shocked state is projected back onto the space (on spheres a geodesic step for small shocks).

    **Returns:** a :class:`FatalShock`: `upper` the smallest leaving shock found, `lower` the smallest radius at
    which any direction first left the grid's returning radii (over the tested shocks only).
    """
    import jax
    import jax.numpy as jnp

    from ._system import key_of

    for name, v in (("directions", directions), ("radii", radii)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
    if not (isinstance(r_max, (int, float, np.floating, np.integer)) and math.isfinite(r_max) and r_max > 0):
        raise ValueError(f"r_max must be a finite number > 0, got {r_max!r}")
    y = np.asarray(state, float)
    m = y.size
    y = np.asarray(system.space.project(jnp.asarray(y)), float)  # a point of the space (unit sphere blocks)
    B = _tangent_basis(system.space, y)  # (m, k): the directions a shock may take
    k = B.shape[1]
    if k == 0:
        raise ValueError("the space has no tangent direction at this state: nothing to shock")
    if k == 1:
        U = np.stack([B[:, 0], -B[:, 0]])
        directions = 2
    elif k == 2:
        ang = np.linspace(0, 2 * np.pi, directions, endpoint=False)
        U = np.cos(ang)[:, None] * B[:, 0] + np.sin(ang)[:, None] * B[:, 1]
    else:
        U = np.array(jax.random.normal(key_of(key), (directions, m)), dtype=float)
        U = (U @ B) @ B.T  # tangent to each sphere (the same random directions as before off spheres: B = I)
        U /= np.linalg.norm(U, axis=1, keepdims=True)
    rs = np.linspace(r_max / radii, r_max, radii)
    matcher = Matcher(system.space, run.match_tol, run.sample_time(system), system)
    home, _ = label_members(system, y[None, :], run, label=label, matcher=matcher)
    home = int(home[0])
    if home < 0:
        raise ValueError("the state does not settle on an attractor under this run (label unknown)")
    y0 = (y[None, None, :] + rs[None, :, None] * U[:, None, :]).reshape(-1, m)
    labs, _ = label_members(system, y0, run, label=label, matcher=matcher)
    labs = labs.reshape(directions, radii)
    tested = directions * radii
    unknown = int(np.sum(labs < 0))
    leave = (labs >= 0) & (labs != home)  # reached another attractor: fatal
    away = labs != home  # fatal or unknown: not shown to return
    first_away = np.where(away.any(1), np.argmax(away, 1), radii)
    lower = float(np.min(np.where(first_away > 0, rs[np.maximum(first_away - 1, 0)], 0.0)))
    first = np.where(leave.any(1), np.argmax(leave, 1), radii)
    cand = np.nonzero(first < radii)[0]
    if cand.size == 0:
        return FatalShock(lower=min(lower, float(r_max)), upper=math.inf, shock=None, tested=tested, unknown=unknown)
    # bisect between the last radius that returned below the first fatal one and the fatal one
    back = (labs == home) & (np.arange(radii)[None, :] < first[:, None])
    last_back = np.where(back.any(1), radii - 1 - np.argmax(back[:, ::-1], 1), -1)[cand]
    lo = np.where(last_back >= 0, rs[np.maximum(last_back, 0)], 0.0)
    hi = rs[first[cand]]
    for _ in range(refine):  # bisect every candidate direction at once
        mid = (lo + hi) / 2
        lab, _ = label_members(system, y[None, :] + mid[:, None] * U[cand], run, label=label, matcher=matcher)
        tested += len(cand)
        unknown += int(np.sum(lab < 0))
        out = (lab >= 0) & (lab != home)
        home_ = lab == home
        lower = min(lower, float(np.min(np.where(home_ | out, np.inf, mid), initial=np.inf)))  # unknown: not returned
        hi = np.where(out, mid, hi)
        lo = np.where(home_, mid, lo)
        # an unknown mid is neither: the bracket stays, so bisect its upper half (towards the fatal shock found)
        lo = np.where(~out & ~home_, mid, lo)
    best = int(np.argmin(hi))
    return FatalShock(lower=min(lower, float(np.min(lo))), upper=float(hi[best]), shock=hi[best] * U[cand[best]],
                      tested=tested, unknown=unknown)


# ---------------------------------------------------------------------------------------------- tipping
@dataclasses.dataclass(frozen=True)
class Tipping:
    """P(attractor j after | attractor i before) from paired members: `matrix[i, j]` with Wilson 95% intervals
    `lo`, `hi`; `before`, `after` the attractors at the two parameter values (a row and a column for each label,
    before or after: the column of an attractor that vanished is zeros; a row with no member is NaN); `counts[i]` the members that started on attractor i. Members unknown before or
    after, including those on saddles, are counted apart (`unknown`). Attractors after are matched to those before by their features (docs/model.md section 12)."""

    matrix: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    counts: np.ndarray
    before: tuple[Attractor, ...]
    after: tuple[Attractor, ...]
    unknown: int


def match_across(before, after, space, max_distance: float = math.inf, first_new: int = 0) -> dict[int, int]:
    """One-to-one matching of the attractors `after` to those `before` (same kind, nearest features first, greedy by
    distance, up to `max_distance`), as Attractors.jl's global continuation matches by distance: a dict from an
    after-label to a before-label; unmatched after-attractors get new labels, numbered after the before ones and
    from `first_new` on (a continuation passes the labels it ever used, so that an attractor that vanished never
    lends its label to a new one)."""
    from ._label import _dist

    pairs = []
    for a in after:
        for b in before:
            if a.kind != b.kind:
                continue
            m = a.state.size
            if a.kind == "fixed point":
                dist = float(_dist(space, a.features[:m], b.features[:m]))
            else:
                dist = float(np.sqrt(np.sum((a.features - b.features) ** 2)))
            if dist <= max_distance:
                pairs.append((dist, a.label, b.label))
    out, used = {}, set()
    for dist, la, lb in sorted(pairs):
        if la not in out and lb not in used:
            out[la] = lb
            used.add(lb)
    nxt = max(max([b.label for b in before], default=-1) + 1, int(first_new))
    for a in after:
        if a.label not in out:
            out[a.label] = nxt
            nxt += 1
    return out


def _renamed(a, new: int):
    """A copy of an attractor under a new label; a generic name ("fixed point 3") follows the label."""
    name = a.name
    old = f"{a.kind} {a.label}"
    if name == old or name.startswith(old + " "):
        name = f"{a.kind} {new}" + name[len(old):]
    return dataclasses.replace(a, label=new, name=name)


def _relabel(labels, attractors, mapping):
    labels = np.where(labels >= 0, np.vectorize(lambda v: mapping.get(int(v), -1))(labels) if labels.size else labels, -1)
    atts = tuple(sorted((_renamed(a, mapping[a.label]) for a in attractors), key=lambda a: a.label))
    return labels, atts


def _unknown_on_saddles(labels, attractors):
    """Labels of members on unstable fixed points set to -1 (they are in no basin)."""
    return np.where(np.isin(labels, [a.label for a in attractors if a.stable is False]), -1, labels)


def tipping(system_before, system_after, y0, run: Run = Run(), *, label: Callable | None = None,
            max_distance: float = math.inf) -> Tipping:
    """Tipping probabilities (Kaszas et al. 2019) between two parameter values: each member y0 is run to its
    attractor under `system_before`; that final state then evolves under `system_after`. Attractors after are
    matched to those before by :func:`match_across` (so a moved attractor keeps its label; one that vanished keeps
    its column, indexed by label, filled with zeros; one that appeared gets a new label and a new column)."""
    parts: list = []
    lab0, m0 = label_members(system_before, y0, run, label=label, finals=parts)  # one run gives labels and finals
    lab0 = _unknown_on_saddles(lab0, m0.attractors)
    lab1, m1 = label_members(system_after, np.concatenate(parts), run, label=label)
    after = tuple(m1.attractors)
    if label is None:
        lab1, after = _relabel(lab1, m1.attractors, match_across(m0.attractors, m1.attractors, system_after.space,
                                                                  max_distance))
        lab1 = _unknown_on_saddles(lab1, after)
    K0 = max([a.label for a in m0.attractors] + [int(lab0.max(initial=-1))]) + 1
    K1 = max([a.label for a in after] + [int(lab1.max(initial=-1)), K0 - 1]) + 1  # a column per attractor (saddles: 0)
    ok = (lab0 >= 0) & (lab1 >= 0)
    M = np.full((K0, K1), math.nan)
    lo, hi = np.zeros((K0, K1)), np.ones((K0, K1))
    counts = np.array([int(np.sum(ok & (lab0 == i))) for i in range(K0)])
    for i in range(K0):
        for j in range(K1):
            c = int(np.sum(ok & (lab0 == i) & (lab1 == j)))
            if counts[i]:
                M[i, j] = c / counts[i]
            lo[i, j], hi[i, j] = wilson(c, int(counts[i]))
    return Tipping(matrix=M, lo=lo, hi=hi, counts=counts, before=tuple(m0.attractors), after=after,
                   unknown=int(np.sum(~ok)))


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Basin fractions along a parameter: `values`, and per value the :class:`Fractions` whose labels are matched to
    the previous value's attractors (:func:`match_across`), so label k is one attractor followed along the
    parameter."""

    values: tuple[float, ...]
    fractions: tuple[Fractions, ...]


def continuation(make_system: Callable, values, y0, run: Run = Run(), *, max_distance: float = math.inf,
                 label: Callable | None = None) -> Continuation:
    """Fractions of the same members at each parameter value (``make_system(value)`` gives the system), with the
    attractors matched from one value to the next (a user's `label` function: its labels are kept as they are). An
    attractor that appears gets a label never used before in the continuation, so label k is one attractor (an
    attractor that vanishes and appears again later is a new one)."""
    out, prev, used = [], None, 0
    for v in values:
        system = make_system(v)
        labels, m = label_members(system, y0, run, label=label)
        atts = tuple(m.attractors)
        if prev is not None and label is None:
            labels, atts = _relabel(labels, atts, match_across(prev, atts, system.space, max_distance, used))
        out.append(fractions_of(labels, atts))
        used = max([used] + [a.label + 1 for a in atts])
        prev = atts
    return Continuation(values=tuple(float(v) for v in values), fractions=tuple(out))
