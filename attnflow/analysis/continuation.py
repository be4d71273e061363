"""Parameter continuation of equilibria in beta or alpha, with stability tracking and bifurcation points."""

from __future__ import annotations

import equinox as eqx
import numpy as np

from .._types import Tokens
from ..model.dynamics import AbstractDynamics
from .equilibria import refine
from .stability import STABLE, analyse


class Branch(eqx.Module):
    """A followed equilibrium: per parameter value its state, stability measure, verdict and residual,
    plus the parameter values where the verdict changes (located by bisection)."""

    param: str = eqx.field(static=True)
    values: np.ndarray
    states: np.ndarray
    measure: np.ndarray
    verdict: np.ndarray
    residual: np.ndarray
    changes: np.ndarray
    discrete: bool = eqx.field(static=True)


def _point(dyn, param, value, X, tol):
    d = dyn.with_params(**{param: value})
    r = refine(d, X, tol=tol)
    s = analyse(d, np.asarray(r.state)[None])
    return np.asarray(r.state), float(s.measure[0]), int(s.verdict[0]), float(r.residual)


def continue_equilibrium(
    dyn: AbstractDynamics, X0: Tokens, *, param: str, values, tol: float = 1e-9, bisect_steps: int = 40
) -> Branch:
    """Follow the equilibrium near X0 as `param` ("beta" or "alpha") runs over `values`.

    Each value is refined (Newton / Levenberg-Marquardt) from the previous state, its intrinsic spectrum
    computed, and between consecutive values where stability changes the switch is located by bisection
    on the parameter (to ``|delta| < 1e-10`` relative, or `bisect_steps` halvings).
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
    changes = []
    for i in range(len(values) - 1):
        if (verd[i] == STABLE) != (verd[i + 1] == STABLE):
            lo, hi, Xlo, slo = values[i], values[i + 1], states[i], verd[i] == STABLE
            for _ in range(bisect_steps):
                mid = 0.5 * (lo + hi)
                Xm, _, vm, _ = _point(dyn, param, mid, Xlo, tol)
                if (vm == STABLE) == slo:
                    lo, Xlo = mid, Xm
                else:
                    hi = mid
                if hi - lo < 1e-10 * max(1.0, abs(hi)):
                    break
            changes.append(0.5 * (lo + hi))
    from ..model.dynamics import AbstractMap

    return Branch(param, values, np.stack(states), np.array(meas), np.array(verd), np.array(res), np.array(changes), isinstance(dyn, AbstractMap))
