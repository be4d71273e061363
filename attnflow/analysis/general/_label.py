"""Which attractor a member reached, from its final segment (docs/model.md section 12).

The default labelling recognises fixed points and periodic orbits by recurrence of the segment y_1..y_T (samples
``stride`` steps apart):

- a **fixed point** when every sample is within `tol` of the last one;
- a **periodic orbit** when the segment is not a fixed point and every sample of its second half returns near an
  earlier sample one period before (within `tol` plus the sampling spacing, see :func:`recurrence`);
- otherwise **unknown** (still moving, chaotic, or a period longer than half the segment).

Attractors are told apart by features invariant along the attractor: a fixed point by its position; an orbit by
its period and, per coordinate over the second half of the segment, the mean and the spread (for a periodic
coordinate the mean resultant vector (L / 2 pi) mean e^{i 2 pi (y - low) / L}, real and imaginary parts). Two members reached the same attractor when
their kinds agree, their periods agree to 10%, and their features are within `match_tol`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

UNKNOWN, FIXED, PERIODIC = 0, 1, 2
KINDS = {UNKNOWN: "unknown", FIXED: "fixed point", PERIODIC: "periodic orbit"}


def _diff(space, a, b):
    d = a - b
    p, _ = space._pad(d.shape[-1])
    if np.any(p > 0):
        per = np.where(p > 0, p, 1.0)
        d = np.where(p > 0, np.mod(d + per / 2, per) - per / 2, d)
    return d


def _dist(space, a, b):
    d = _diff(space, a, b)
    return np.sqrt(np.sum(d * d, axis=-1))


def recurrence(space, seg: np.ndarray, tol: float):
    """Per member of ``seg`` ``(b, T, m)``: ``(kind, lag)``; the lag (in samples) is the period of an orbit (0
    otherwise).

    The samples of a flow rarely fall on the same points of an orbit, so a return is judged against the sampling:
    within ``tol + h`` with h the member's largest distance between consecutive samples. The lag L is the first
    return of the last sample after the segment has gone farther than ``2 (tol + h)`` from it; the orbit is periodic
    when every sample of the second half returns within ``tol + h`` at a lag L - 1, L or L + 1."""
    b, T, m = seg.shape
    last = seg[:, -1, :]
    fixed = np.max(_dist(space, seg, last[:, None, :]), axis=1) < tol
    kind = np.where(fixed, FIXED, UNKNOWN)
    lag = np.zeros(b, int)
    h = np.max(_dist(space, seg[:, 1:], seg[:, :-1]), axis=1)
    near = tol + h
    prof = _dist(space, seg[:, ::-1, :][:, 1:, :], last[:, None, :])  # D(l) = dist(y_{T-1}, y_{T-1-l}), l = 1..T-1
    away = np.maximum.accumulate(prof > 2 * near[:, None], axis=1)
    back = away & (prof < near[:, None])
    has = back.any(1) & ~fixed
    L = np.where(has, np.argmax(back, axis=1) + 1, 0)
    half = T // 2
    ok = has & (L + 1 <= T - half)
    for i in np.nonzero(ok)[0]:
        t = np.arange(T - half, T)
        best = np.full(half, np.inf)
        for ell in (L[i] - 1, L[i], L[i] + 1):
            if ell >= 1:
                best = np.minimum(best, _dist(space, seg[i, t], seg[i, t - ell]))
        if np.all(best < near[i]):
            kind[i] = PERIODIC
            lag[i] = L[i]
    return kind, lag


def features(space, seg: np.ndarray, kind: np.ndarray, lag: np.ndarray) -> np.ndarray:
    """Invariant features per member ``(b, 2 m)``: the position of a fixed point (spread 0), or the mean and spread
    per coordinate over the second half of the segment for an orbit (many periods, so sampling phase averages out;
    circular statistics for periodic coordinates); NaN for unknowns."""
    b, T, m = seg.shape
    p, lo = space._pad(m)
    out = np.full((b, 2 * m), np.nan)
    fx = kind == FIXED
    out[fx, :m] = seg[fx, -1, :]
    out[fx, m:] = 0.0
    sel = kind == PERIODIC
    if sel.any():
        w = seg[sel, T - T // 2:, :]
        mean = w.mean(1)
        spread = w.std(1)
        if np.any(p > 0):  # the mean resultant vector, scaled to the period (its angle is ill-posed when |z| ~ 0)
            per = np.where(p > 0, p, 1.0)
            z = np.exp(1j * 2 * np.pi * (w - lo) / per).mean(1) * per / (2 * np.pi)
            mean = np.where(p > 0, z.real, mean)
            spread = np.where(p > 0, z.imag, spread)
        out[sel, :m] = mean
        out[sel, m:] = spread
    return out


def _same_lag(lags, L):
    """Periods that agree to 10% (lags of a flow's orbit jitter by a sample)."""
    return np.abs(lags - L) <= np.maximum(1, 0.1 * L)


@dataclasses.dataclass
class Attractor:
    """One attractor found: its `kind` ("fixed point", "periodic orbit"), `lag` (samples per period; 0 for a fixed
    point), `period` (time; None for maps' fixed points), `state` (a point on it), `features`, a `name`, and for a
    fixed point whether it is `stable` (its Jacobian by autodiff, restricted to the tangent space on spheres: every
    eigenvalue with real part < 0 for a flow, modulus < 1 for a map; None where not checked). A member that sits exactly on an unstable fixed point (a
    saddle) is not in a basin: :func:`fractions_of` counts it as unknown."""

    label: int
    kind: str
    lag: int
    period: float | None
    state: np.ndarray
    features: np.ndarray
    name: str = ""
    stable: bool | None = None

    def to_dict(self):
        """Plain values for JSON."""
        return dict(label=self.label, kind=self.kind, lag=self.lag, period=self.period, state=self.state.tolist(),
                    name=self.name, stable=self.stable)


class Matcher:
    """Assigns labels 0, 1, ... to attractors in the order members first reach them (so a streamed run gives the
    same labels for any chunk size); -1 for unknown members."""

    def __init__(self, space, match_tol: float, sample_time: float | None, system=None):
        self.space, self.tol, self.dt, self.system = space, float(match_tol), sample_time, system
        self.attractors: list[Attractor] = []

    def _stable(self, state) -> bool | None:
        """Linear stability of a fixed point: the Jacobian by autodiff, restricted to the tangent space of the sphere
        blocks (an orthonormal basis T of the directions orthogonal to each block's point: T^T J T), then every
        eigenvalue with real part < 0 (flows) or modulus < 1 (maps); None when no system is known."""
        if self.system is None:
            return None
        import jax
        import jax.numpy as jnp

        y = jnp.asarray(state)
        if self.system.time == "continuous":
            J = np.asarray(jax.jacfwd(lambda v: self.system.vf(0.0, v))(y), float)
        else:
            J = np.asarray(jax.jacfwd(lambda v: self.system.step(0, v))(y), float)
        if self.space.spheres:
            m = J.shape[0]
            P = np.eye(m)
            yy = np.asarray(state, float)
            for block in self.space.spheres:
                b = list(block)
                u = np.zeros(m)
                u[b] = yy[b] / max(np.linalg.norm(yy[b]), 1e-300)
                P -= np.outer(u, u)
            w, V = np.linalg.eigh(P)
            T = V[:, w > 0.5]  # the tangent directions
            J = T.T @ J @ T
        lam = np.linalg.eigvals(J) if J.size else np.zeros(0)
        if lam.size == 0:
            return True
        if self.system.time == "continuous":
            return bool(np.max(lam.real) < -1e-9)
        return bool(np.max(np.abs(lam)) < 1 - 1e-9)

    def _feature_distance(self, f, g, m, kind):
        if kind == FIXED:  # positions, the short way round
            return _dist(self.space, f[..., :m], g[..., :m])
        return np.sqrt(np.sum((f - g) ** 2, axis=-1))

    def assign(self, seg, kind, lag) -> np.ndarray:
        """Labels of one chunk (members in order)."""
        m = seg.shape[-1]
        feats = features(self.space, seg, kind, lag)
        labels = np.full(len(kind), -1, int)
        todo = kind != UNKNOWN
        for a in self.attractors:  # match the known ones, vectorised
            kk = 1 if a.kind == "fixed point" else 2
            ok = todo & (kind == kk) & _same_lag(lag, a.lag) & (self._feature_distance(feats, a.features, m, kk) < self.tol)
            labels[ok] = a.label
            todo &= ~ok
        for i in np.nonzero(todo)[0]:  # new ones, in member order
            if labels[i] >= 0:
                continue
            kk = int(kind[i])
            period = None if kk == FIXED or self.dt is None else float(lag[i] * self.dt)
            a = Attractor(label=len(self.attractors), kind=KINDS[kk], lag=int(lag[i]) if kk == PERIODIC else 0,
                          period=period, state=seg[i, -1].copy(), features=feats[i].copy())
            if kk == FIXED:
                a.stable = self._stable(a.state)
                if a.stable is False:
                    a.kind = "unstable fixed point"
            a.name = f"{a.kind} {a.label}" + (f" (period {period:.4g})" if period is not None else "")
            namer = getattr(getattr(self.system, "f", None), "name_of", None)
            if namer is not None and kk == FIXED:  # an attention model names its equilibria itself
                a.name = namer(a.state) + ("" if a.stable is not False else " (unstable)")
            self.attractors.append(a)
            same = (labels < 0) & (kind == kk) & _same_lag(lag, lag[i]) & (self._feature_distance(feats, feats[i], m, kk) < self.tol)
            labels[same] = a.label
        return labels
