"""Which attractor a member reached, from its final segment (docs/model.md section 12).

The default labelling recognises fixed points and periodic orbits by recurrence of the segment y_0..y_{T-1} (samples
``stride`` steps apart), with the tolerance `tol` (see :func:`recurrence`):

- a **fixed point** when every sample is within `tol` of the last one;
- a **periodic orbit** of p samples (a map's cycle, or a flow sampled in step with its orbit) when the whole segment
  is p-periodic within `tol`: every sample within `tol` of the sample with the same phase in the first period, and
  the orbit moves (some sample of its first period at least `tol` from the first);
- for a flow, a **periodic orbit** of period tau (any real number of samples) when every sample returns within `tol`
  to the orbit one period earlier *and* to the orbit in its first period in the segment, the orbit between samples
  given by cubic interpolation (so a spiral that loses a little per turn, or a chaotic orbit that nearly recurs once,
  does not pass: its drift over the whole segment exceeds `tol`);
- otherwise **unknown** (still moving, chaotic, or a period longer than half the segment).

Attractors are told apart by features invariant along the attractor: a fixed point by its position; an orbit by
its period and, per coordinate over exactly one period (p samples, or the interpolated orbit resampled at equally
spaced times over tau, so the sampling phase does not matter), the mean and the spread (for a periodic coordinate
the mean resultant vector (L / 2 pi) mean e^{i 2 pi (y - low) / L}, real and imaginary parts). Two members reached
the same attractor when their kinds agree, their periods agree to 10%, and their features are within `match_tol`.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

UNKNOWN, FIXED, PERIODIC = 0, 1, 2
KINDS = {UNKNOWN: "unknown", FIXED: "fixed point", PERIODIC: "periodic orbit"}

EXACT_TRIES = 4
"""Candidate lags (the first returns of the last sample within 2 tol) tried per member by the exact recurrence."""

GOLDEN_STEPS = 24
"""Golden-section steps refining a flow's period over a bracket of two samples (to about 2e-5 samples: the
mismatch this leaves is 2e-5 of a step's length, far below any tol)."""

COST_SAMPLES = 64
"""Samples (evenly spread over the segment) on which the golden section compares the orbit with itself one period
earlier; the acceptance test then uses every sample."""


def _diff(space, a, b):
    d = np.asarray(a - b, dtype=float)
    p, _ = space._pad(d.shape[-1])
    j = np.flatnonzero(p > 0)  # the periodic coordinates only, the short way round
    if j.size:
        d[..., j] = np.mod(d[..., j] + p[j] / 2, p[j]) - p[j] / 2
    return d


def _dist(space, a, b):
    d = _diff(space, a, b)
    return np.sqrt(np.sum(d * d, axis=-1))


def _unwrap(space, seg):
    """The segment with each periodic coordinate made continuous along time (sums of short-way steps)."""
    p, _ = space._pad(seg.shape[-1])
    if not np.any(p > 0):
        return seg
    d = _diff(space, seg[:, 1:], seg[:, :-1])
    u = np.concatenate([seg[:, :1], seg[:, :1] + np.cumsum(d, axis=1)], axis=1)
    return np.where(p > 0, u, seg)


def _interp(u, t):
    """The cubic (4-point Lagrange) interpolant of the samples ``u`` ``(b, T, m)`` at real sample times ``t``
    ``(b, n)`` in [1, T - 2]: ``(b, n, m)``."""
    T = u.shape[1]
    i = np.clip(np.floor(t).astype(int), 1, T - 3)
    s = (t - i)[..., None]
    w = (-s * (s - 1) * (s - 2) / 6, (s + 1) * (s - 1) * (s - 2) / 2, -(s + 1) * s * (s - 2) / 2,
         (s + 1) * s * (s - 1) / 6)
    out = np.zeros(t.shape + (u.shape[2],))
    for j, wj in zip((-1, 0, 1, 2), w):
        out += wj * np.take_along_axis(u, (i + j)[..., None], axis=1)
    return out


def _exact(space, seg, todo, tol):
    """Members of ``seg`` whose whole segment is p-periodic within tol (every sample within tol of the sample of
    the same phase in the first period), p the smallest such lag among the first returns of the last sample;
    ``(periodic, settled, p)``: settled when the first period stays within tol of its first sample (p = 1, or a
    member creeping towards a fixed point by less than tol per sample, without being one by the last-sample rule:
    still converging, not an orbit)."""
    b, T, m = seg.shape
    P = T // 2
    prof = _dist(space, seg[:, -2::-1, :], seg[:, -1:, :])[:, :P]  # D(l) = |y_{T-1} - y_{T-1-l}|, l = 1..P
    cand = todo[:, None] & (prof < 2 * tol)
    per = np.zeros(b, bool)
    settled = np.zeros(b, bool)
    lag = np.zeros(b)
    active = todo.copy()
    k = np.arange(T)
    for _ in range(EXACT_TRIES):
        active &= cand.any(1)
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        p = np.argmax(cand[idx], 1) + 1
        cand[idx, p - 1] = False
        ref = np.take_along_axis(seg[idx], (k[None, :] % p[:, None])[..., None], axis=1)
        ok = np.max(_dist(space, seg[idx], ref), axis=1) < tol
        # an orbit must move: one whose samples all lie within tol of its first (a lag of 1, or a member still
        # creeping towards a fixed point by less than tol per sample) is no orbit resolved at tol
        first = np.where(k[None, :] < p[:, None], _dist(space, seg[idx], seg[idx, :1]), 0.0)
        moves = np.max(first, axis=1) >= tol
        hit = idx[ok]
        per[hit[moves[ok]]] = True
        settled[hit[~moves[ok]]] = True
        lag[hit] = p[ok]
        active[hit] = False
    return per, settled, lag


def _flow_period(space, seg, todo, tol):
    """Members of a flow's segment that are periodic with a real period tau (samples): ``(periodic, tau)``.

    The first return of the last sample (after the segment went farther than 2 (tol + h) from it, h the largest
    step) is followed down to the nearest local minimum of the distance, then tau is refined by golden section
    over a bracket of two samples around it, minimising the mean squared distance between each sample and the
    interpolated orbit tau earlier. The orbit is accepted when every sample is within tol + e of the interpolated
    orbit one period earlier and of the interpolated orbit in its first period (j periods earlier, j as large as
    the segment allows), e = min(tol, max |4th difference| / 8) the cubic interpolation error (its bound is
    9 / 384 max |4th derivative| dt^4, about 0.023 max |4th difference|)."""
    b, T, m = seg.shape
    per = np.zeros(b, bool)
    tau = np.zeros(b)
    if T < 12:
        return per, tau
    u = _unwrap(space, seg)
    h = np.max(_dist(space, seg[:, 1:], seg[:, :-1]), axis=1)
    near = tol + h
    prof = _dist(space, seg[:, -2::-1, :], seg[:, -1:, :])  # prof[:, l - 1] = D(l)
    away = np.maximum.accumulate(prof > 2 * near[:, None], axis=1)
    back = away & (prof < near[:, None])
    has = todo & back.any(1)
    L = np.where(has, np.argmax(back, axis=1) + 1, 0)
    rows = np.arange(b)
    while True:  # down to the local minimum of D (a slow part of the orbit returns within tol + h early)
        nxt = np.minimum(L, T - 2)  # D(L + 1) is prof[:, L]
        move = has & (L + 1 <= T - 1) & (prof[rows, nxt] < prof[rows, np.maximum(L - 1, 0)])
        if not move.any():
            break
        L = np.where(move, L + 1, L)
    has &= (L >= 2) & (2 * (L + 1) <= T - 4)  # two periods and the interpolation stencil in the segment
    idx = np.nonzero(has)[0]
    if idx.size == 0:
        return per, tau
    ui, Li = u[idx], L[idx].astype(float)
    k = np.arange(T, dtype=float)[None, :]
    kc = np.unique(np.linspace(0, T - 1, COST_SAMPLES).round()).astype(int)  # the cost's samples
    uc, valid = ui[:, kc], kc[None, :] >= Li[:, None] + 3  # at least 32 valid: L <= T / 2 - 3

    def cost(s):
        t = np.where(valid, kc[None, :] - s[:, None], 2.0)
        d = _diff(space, uc, _interp(ui, t))
        return np.sum(np.where(valid, np.sum(d * d, -1), 0.0), 1)

    g = (np.sqrt(5) - 1) / 2
    lo, hi = Li - 1, Li + 1
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = cost(x1), cost(x2)
    for _ in range(GOLDEN_STEPS):
        left = f1 < f2  # the minimum is in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x1n = np.where(left, hi - g * (hi - lo), x2)
        x2n = np.where(left, x1, lo + g * (hi - lo))
        fn = cost(np.where(left, x1n, x2n))
        f1, f2 = np.where(left, fn, f2), np.where(left, f1, fn)
        x1, x2 = x1n, x2n
    ti = (lo + hi) / 2
    # what tau's resolution alone leaves: a mismatch of (hi - lo) / 2 samples' worth of the largest step one
    # period back, growing in proportion to the periods (so r_2 = 2 r_1: no trend, but the edge of the test below)
    e_tau = (hi - lo) / 2 * h[idx]
    d4 = ui[:, 4:] - 4 * ui[:, 3:-1] + 6 * ui[:, 2:-2] - 4 * ui[:, 1:-3] + ui[:, :-4]
    e_raw = np.max(np.sqrt(np.sum(d4 * d4, -1)), axis=1) / 8
    e = np.minimum(tol, e_raw)
    thr = tol + e
    one = k >= ti[:, None] + 1
    t1 = np.where(one, k - ti[:, None], 2.0)
    j = np.floor((k - 1) / ti[:, None])
    t0 = np.where(one, k - j * ti[:, None], 2.0)
    d1 = np.where(one, _dist(space, ui, _interp(ui, t1)), 0.0)
    d0 = np.where(one, _dist(space, ui, _interp(ui, t0)), 0.0)
    ok = (np.max(d1, 1) < thr) & (np.max(d0, 1) < thr)
    # a trend: over the last samples (k >= 2 tau + 1) the mismatch r_j one and two periods back; converging
    # geometrically by rho per period towards a limit delta away, r_j = delta (rho^-j - 1), so r_2 / r_1 = 1 + 1 / rho
    # > 2 and delta = r_1^2 / (r_2 - 2 r_1): a spiral still delta > tol from where it is going is not an orbit yet.
    # Only a mismatch well above the interpolation error (10 x max |4th difference| / 8) and the period's resolution
    # (10 x the mismatch two periods back of a tau off by half its final bracket) is read as a trend.
    late = k >= 2 * ti[:, None] + 1
    r1 = np.max(np.where(late, _dist(space, ui, _interp(ui, np.where(late, k - ti[:, None], 2.0))), 0.0), 1)
    r2 = np.max(np.where(late, _dist(space, ui, _interp(ui, np.where(late, k - 2 * ti[:, None], 2.0))), 0.0), 1)
    trend = (r1 > 10 * np.maximum(e_raw, 2 * e_tau)) & (r2 > 2 * r1)
    rest = np.where(trend, r1 ** 2 / np.maximum(r2 - 2 * r1, 1e-300), 0.0)
    ok &= rest < tol
    per[idx] = ok
    tau[idx] = np.where(ok, ti, 0.0)
    return per, tau


def recurrence(space, seg: np.ndarray, tol: float, *, flow: bool = True):
    """Per member of ``seg`` ``(b, T, m)``: ``(kind, lag)``; the lag (in samples, a real number for a flow's orbit)
    is the period of an orbit (0 otherwise).

    - **fixed point**: every sample within ``tol`` of the last;
    - **periodic orbit** (flows only, ``flow=True``, tried first): a real period tau <= (T - 6) / 2 samples found
      by interpolation (see ``_flow_period``): every sample within ``tol + e`` of the orbit one period earlier and
      of the orbit in the first period of the segment, e the estimated cubic interpolation error (at most tol), and
      no trend: a member converging geometrically towards a limit more than tol away (estimated from the mismatches
      one and two periods back, when they exceed what interpolation and tau's resolution leave) is not an orbit yet.
      So a slowly converging spiral or a chaotic member is unknown;
    - **periodic orbit** (exact, the members left): the smallest lag p >= 2 (p <= T / 2) for which every sample is
      within ``tol`` of the sample of the same phase in the first period (y_k against y_{k mod p}), the lags tried
      being the first returns of the last sample within 2 tol, and whose first period moves (some sample at least
      ``tol`` from the first; else the member is still converging). A map's cycle, or a flow sampled in step with
      its orbit;
    - **unknown** otherwise, and for any member with a non-finite sample."""
    seg = np.asarray(seg, dtype=float)
    b, T, m = seg.shape
    kind = np.full(b, UNKNOWN)
    lag = np.zeros(b)
    if T < 2:
        return kind, lag
    finite = np.all(np.isfinite(seg), axis=(1, 2))
    safe = np.where(finite[:, None, None], seg, 0.0)
    fixed = finite & (np.max(_dist(space, safe, safe[:, -1:, :]), axis=1) < tol)
    kind[fixed] = FIXED
    todo = finite & ~fixed
    if flow and todo.any():  # the real period first: a whole-sample lag of a flow's orbit may be a multiple of it
        per, tau = _flow_period(space, safe, todo, tol)
        kind[per] = PERIODIC
        lag[per] = tau[per]
        todo &= ~per
    per, _, p = _exact(space, safe, todo, tol)
    kind[per] = PERIODIC
    lag[per] = p[per]
    return kind, lag


def _one_period(space, seg, lag, M: int = 64):
    """Samples of exactly one period ending at the last sample, equally spaced in time, per member: the last p
    samples for an integer lag p, else the cubic interpolant of the (unwrapped) segment at max(M, 4 ceil(tau))
    equally spaced times over [T - 1 - tau, T - 1). Yields ``(rows, windows (r, n, m))`` for groups of members with
    the same number n of samples."""
    b, T, m = seg.shape
    u = _unwrap(space, seg)
    lag = np.asarray(lag, float)
    whole = np.abs(lag - np.round(lag)) < 1e-9
    n = np.where(whole, np.round(lag), np.minimum(4096, np.maximum(M, 4 * np.ceil(lag)))).astype(int)
    for w, size in {(bool(a), int(c)) for a, c in zip(whole, n)}:
        rows = np.nonzero((whole == w) & (n == size))[0]
        step = max(1, 2**20 // (size * m))  # at most about 8 MB of samples at a time
        for s in range(0, rows.size, step):
            r = rows[s:s + step]
            if w:
                yield r, u[r, T - size:]
            else:
                t = (T - 1 - lag[r, None]) + lag[r, None] * np.arange(size)[None, :] / size
                yield r, _interp(u[r], np.maximum(t, 1.0))


def features(space, seg: np.ndarray, kind: np.ndarray, lag: np.ndarray) -> np.ndarray:
    """Invariant features per member ``(b, 2 m)``: the position of a fixed point (spread 0), or the mean and spread
    per coordinate over exactly one period of an orbit (:func:`_one_period`: independent of the sampling phase;
    circular statistics for periodic coordinates); NaN for unknowns."""
    seg = np.asarray(seg, dtype=float)
    b, T, m = seg.shape
    p, lo = space._pad(m)
    out = np.full((b, 2 * m), np.nan)
    fx = kind == FIXED
    out[fx, :m] = seg[fx, -1, :]
    out[fx, m:] = 0.0
    sel = np.nonzero(kind == PERIODIC)[0]
    for r, w in _one_period(space, seg[sel], np.asarray(lag)[sel]):
        i = sel[r]
        mean = w.mean(1)
        spread = w.std(1)
        if np.any(p > 0):  # the mean resultant vector, scaled to the period (its angle is ill-posed when |z| ~ 0)
            per = np.where(p > 0, p, 1.0)
            z = np.exp(1j * 2 * np.pi * (w - lo) / per).mean(1) * per / (2 * np.pi)
            mean = np.where(p > 0, z.real, mean)
            spread = np.where(p > 0, z.imag, spread)
        out[i, :m] = mean
        out[i, m:] = spread
    return out


def _same_lag(lags, L):
    """Periods that agree to 10% (or within a sample)."""
    return np.abs(lags - L) <= np.maximum(1, 0.1 * L)


@dataclasses.dataclass
class Attractor:
    """One attractor found: its `kind` ("fixed point", "unstable fixed point", "periodic orbit"), `lag` (samples per
    period, rounded; 0 for a fixed point), `period` (time: lag x sample time, from the real period for a flow's orbit;
    None for maps' fixed points), `state` (a point on it), `features`, a `name`, and for a fixed point its linear
    stability `verdict` ("stable", "unstable", "neutral", "unknown"; None where not checked) from its Jacobian by
    autodiff, restricted to the tangent space on spheres, with the growth of an eigenvalue Re lambda (flow) or
    |lambda| - 1 (map) judged against :func:`attnflow.analysis.eigen.tolerance` of the state's dtype: unstable when
    some growth exceeds tol, neutral when none does and some is within tol of 0 (a continuum of fixed points, e.g. a
    symmetry), stable otherwise. `stable` is True (stable), False (unstable) or None (neutral, unknown or not
    checked). A member that sits exactly on an unstable fixed point (a saddle) is not in a basin:
    :func:`fractions_of` counts it as unknown; members that converged to a neutral one count in its basin."""

    label: int
    kind: str
    lag: int
    period: float | None
    state: np.ndarray
    features: np.ndarray
    name: str = ""
    stable: bool | None = None
    verdict: str | None = None

    def to_dict(self):
        """Plain values for JSON."""
        return dict(label=self.label, kind=self.kind, lag=self.lag, period=self.period, state=self.state.tolist(),
                    name=self.name, stable=self.stable, verdict=self.verdict)


class Matcher:
    """Assigns labels 0, 1, ... to attractors in the order members first reach them (so a streamed run gives the
    same labels for any chunk size); -1 for unknown members.

    A member joins an attractor when its features are within `match_tol` of the attractor's (the first member's). A
    warning is issued (once) when a member joins at a distance above match_tol / 2: members that reach one
    attractor agree to about the recurrence tolerance, so members that far apart may be on distinct attractors
    merged by too large a match_tol (match_tol is absolute, in the state's units)."""

    def __init__(self, space, match_tol: float, sample_time: float | None, system=None):
        self.space, self.tol, self.dt, self.system = space, float(match_tol), sample_time, system
        self.attractors: list[Attractor] = []
        self.dtype = np.dtype(np.float64)
        self._warned = False

    def _verdict(self, state) -> str | None:
        """Linear stability of a fixed point: the Jacobian by autodiff, restricted to the tangent space of the sphere
        blocks (an orthonormal basis T of the directions orthogonal to each block's point: T^T J T), then the
        verdict of its eigenvalues by :func:`attnflow.analysis.eigen.verdicts` (tolerance of the state's dtype);
        None when no system is known."""
        if self.system is None:
            return None
        import jax
        import jax.numpy as jnp

        from ..eigen import VERDICTS, block_eigvals, verdicts

        y = jnp.asarray(state)
        if self.system.time == "continuous":
            J = np.asarray(jax.jacfwd(lambda v: self.system.vf(0.0, v))(y), float)
        else:
            J = np.asarray(jax.jacfwd(lambda v: self.system.step(0, v))(y), float)
        m = J.shape[0]
        sizes = [1] * m  # the coordinates' groups: one per sphere block (its tangent directions), else one each
        if self.space.spheres:
            yy = np.asarray(state, float)
            cols, sizes, free = [], [], np.ones(m, bool)
            for block in self.space.spheres:  # a basis of each block's tangent space, supported on the block
                b = list(block)
                free[b] = False
                u = yy[b] / max(np.linalg.norm(yy[b]), 1e-300)
                w, V = np.linalg.eigh(np.eye(len(b)) - np.outer(u, u))
                basis = np.zeros((m, len(b) - 1))
                basis[b] = V[:, w > 0.5]
                cols.append(basis)
                sizes.append(len(b) - 1)
            for i in np.flatnonzero(free):
                cols.append(np.eye(m)[:, i:i + 1])
                sizes.append(1)
            T = np.concatenate(cols, axis=1)  # the tangent directions
            J = T.T @ J @ T
            sizes = [c for c in sizes if c > 0]
        if not np.all(np.isfinite(J)):
            return "unknown"
        # block by block where the coordinates' dependencies are triangular (eigen.block_eigvals)
        lam = block_eigvals(J, sizes) if J.size else np.zeros(0)
        if lam.size == 0:
            return "stable"
        _, v, _, _ = verdicts(lam[None, :], self.system.time == "discrete", dtype=self.dtype)
        return VERDICTS[int(v[0])]

    def _stable(self, state) -> bool | None:
        """True (stable), False (unstable), None (neutral, unknown, or no system)."""
        v = self._verdict(state)
        return {"stable": True, "unstable": False}.get(v)

    def _feature_distance(self, f, g, m, kind):
        if kind == FIXED:  # positions, the short way round
            return _dist(self.space, f[..., :m], g[..., :m])
        return np.sqrt(np.sum((f - g) ** 2, axis=-1))

    def _check_merge(self, dist, ok):
        if not self._warned and np.any(ok & (dist > self.tol / 2)):
            self._warned = True
            warnings.warn(f"members up to {float(np.max(np.where(ok, dist, 0))):.3g} apart (features) were put on one "
                          f"attractor with match_tol = {self.tol:g}: if they are distinct attractors, lower match_tol",
                          stacklevel=3)

    def assign(self, seg, kind, lag) -> np.ndarray:
        """Labels of one chunk (members in order)."""
        if np.issubdtype(np.asarray(seg).dtype, np.floating):
            self.dtype = np.asarray(seg).dtype
        m = seg.shape[-1]
        feats = features(self.space, seg, kind, lag)
        labels = np.full(len(kind), -1, int)
        todo = kind != UNKNOWN
        for a in self.attractors:  # match the known ones, vectorised
            kk = 1 if a.kind in ("fixed point", "unstable fixed point") else 2
            dist = self._feature_distance(feats, a.features, m, kk)
            ok = todo & (kind == kk) & _same_lag(lag, a.lag) & (dist < self.tol)
            self._check_merge(dist, ok)
            labels[ok] = a.label
            todo &= ~ok
        for i in np.nonzero(todo)[0]:  # new ones, in member order
            if labels[i] >= 0:
                continue
            kk = int(kind[i])
            period = None if kk == FIXED or self.dt is None else float(lag[i] * self.dt)
            a = Attractor(label=len(self.attractors), kind=KINDS[kk], lag=int(round(float(lag[i]))) if kk == PERIODIC else 0,
                          period=period, state=np.asarray(seg[i, -1]).copy(), features=feats[i].copy())
            suffix = ""
            if kk == FIXED:
                a.verdict = self._verdict(a.state)
                a.stable = {"stable": True, "unstable": False}.get(a.verdict)
                if a.stable is False:
                    a.kind = "unstable fixed point"
                elif a.verdict in ("neutral", "unknown"):
                    suffix = f" ({a.verdict})"
            a.name = f"{a.kind} {a.label}" + (f" (period {period:.4g})" if period is not None else "") + suffix
            namer = getattr(getattr(self.system, "f", None), "name_of", None)
            if namer is not None and kk == FIXED:  # an attention model names its equilibria itself
                a.name = namer(a.state) + (" (unstable)" if a.stable is False else suffix)
            self.attractors.append(a)
            dist = self._feature_distance(feats, feats[i], m, kk)
            same = (labels < 0) & (kind == kk) & _same_lag(lag, lag[i]) & (dist < self.tol)
            self._check_merge(dist, same)
            labels[same] = a.label
        return labels
