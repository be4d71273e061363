"""Parameter continuation of equilibria in beta or alpha, with stability tracking and bifurcation points."""

from __future__ import annotations

import equinox as eqx
import numpy as np

from .._types import Tokens
from ..model.dynamics import AbstractDynamics, AbstractMap
from .equilibria import refine
from .stability import STABLE, analyse, verdict_name


class Branch(eqx.Module):
    """A followed equilibrium: per parameter value its state, stability measure, verdict and residual,
    plus the parameter values where the verdict changes (located by bisection).

    - `param`: ``"beta"`` or ``"alpha"``; `values` ``(p,)`` in the order followed.
    - `states` ``(p, n, d)``, `measure` ``(p,)`` (rho for maps, max Re for flows), `verdict` ``(p,)``
      :class:`~attnflow.analysis.stability.Verdict` codes, `residual` ``(p,)`` the refinement residuals.
    - `changes` ``(c,)``: the parameter values where stability switches; `before`, `after` ``(c,)``: the verdict
      codes at the followed values either side of each change, in the direction the values run
      (:meth:`describe` prints them).
    """

    param: str = eqx.field(static=True)
    values: np.ndarray
    states: np.ndarray
    measure: np.ndarray
    verdict: np.ndarray
    residual: np.ndarray
    changes: np.ndarray
    discrete: bool = eqx.field(static=True)
    before: np.ndarray = eqx.field(default_factory=lambda: np.zeros(0, int))
    after: np.ndarray = eqx.field(default_factory=lambda: np.zeros(0, int))

    @property
    def increasing(self) -> bool:
        """Whether the values were followed upwards."""
        return bool(self.values[-1] > self.values[0])

    def describe(self, name: str = "equilibrium") -> list[str]:
        """One line per change, e.g. ``"bipartite v1 5:5: stable -> unstable at beta = 2.31 as beta increases"``;
        a single line saying so when stability never changes."""
        way = "increases" if self.increasing else "decreases"
        if len(self.changes) == 0:
            names = sorted({verdict_name(int(v)) for v in self.verdict})
            return [f"{name}: {' / '.join(names)} for every {self.param} in [{self.values.min():.6g}, {self.values.max():.6g}]; no change"]
        return [
            f"{name}: {verdict_name(int(b))} -> {verdict_name(int(a))} at {self.param} = {c:.6g} as {self.param} {way}"
            for c, b, a in zip(self.changes, self.before, self.after)
        ]

    def to_json(self, name: str | None = None) -> dict:
        """The branch as JSON-ready values, verdicts by name."""
        way = "increasing" if self.increasing else "decreasing"
        return {
            "equilibrium": name, "param": self.param, "values": self.values, "measure": self.measure,
            "verdict": [verdict_name(int(v)) for v in self.verdict], "stable": self.verdict == STABLE,
            "residual": self.residual, "changes": self.changes,
            "transitions": [{"at": float(c), "from": verdict_name(int(b)), "to": verdict_name(int(a)), "direction": way}
                            for c, b, a in zip(self.changes, self.before, self.after)],
        }


def _point(dyn, param, value, X, tol):
    d = dyn.with_params(**{param: value})
    r = refine(d, X, tol=tol)
    s = analyse(d, np.asarray(r.state)[None])
    return np.asarray(r.state), float(s.measure[0]), int(s.verdict[0]), float(r.residual)


def _bisect(dyn, param, lo, hi, Xlo, vlo, tol, steps):
    """Locate the switch of stability between `lo` (verdict `vlo`, state `Xlo`) and `hi` by bisection."""
    slo = vlo == STABLE
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        Xm, _, vm, _ = _point(dyn, param, mid, Xlo, tol)
        if (vm == STABLE) == slo:
            lo, Xlo = mid, Xm
        else:
            hi = mid
        if abs(hi - lo) < 1e-10 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


def continue_equilibrium(
    dyn: AbstractDynamics, X0: Tokens, *, param: str, values, tol: float = 1e-9, bisect_steps: int = 40
) -> Branch:
    """Follow the equilibrium near X0 as `param` ("beta" or "alpha") runs over `values`.

    Each value is refined (Newton / Levenberg-Marquardt) from the previous state, its intrinsic spectrum
    computed, and between consecutive values where stability changes the switch is located by bisection
    on the parameter (to ``|delta| < 1e-10`` relative, or `bisect_steps` halvings).

    **Returns:** a :class:`Branch`; ``branch.describe(name)`` says what changes where, in which direction.
    """
    if param not in ("beta", "alpha"):
        raise ValueError(f"param must be 'beta' or 'alpha', got {param!r}")
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) < 2 or not np.all(values > 0):
        raise ValueError("values must be a 1-D array of at least two positive numbers")
    states, meas, verd, res = [], [], [], []
    X = np.asarray(X0)
    for v in values:
        X, m, vd, r = _point(dyn, param, v, X, tol)
        states.append(X)
        meas.append(m)
        verd.append(vd)
        res.append(r)
    # the verdicts either side of a change are those of the grid points: at the located switch itself the
    # spectrum touches the boundary, so a point there always reads "neutral"
    where = [i for i in range(len(values) - 1) if (verd[i] == STABLE) != (verd[i + 1] == STABLE)]
    changes = np.array([_bisect(dyn, param, values[i], values[i + 1], states[i], verd[i], tol, bisect_steps) for i in where], dtype=float)
    before = np.array([verd[i] for i in where], dtype=int)
    after = np.array([verd[i + 1] for i in where], dtype=int)
    return Branch(param, values, np.stack(states), np.array(meas), np.array(verd), np.array(res), changes,
                  isinstance(dyn, AbstractMap), before, after)
