"""How a model is advanced by one step: iteration of a map, projected Euler, projected RK4, or diffrax."""

from __future__ import annotations

import abc
import numbers

import diffrax
import equinox as eqx

from .._types import Tokens
from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap


class AbstractSolver(eqx.Module):
    """A fixed-step solver: ``step(dynamics, k, t, X, dt) -> X_next``."""

    @abc.abstractmethod
    def step(self, dyn: AbstractDynamics, k, t, X: Tokens, dt) -> Tokens:
        """Advance X ``(n, d)`` from time t (step index k) by one step of size dt."""

    @abc.abstractmethod
    def check(self, dyn: AbstractDynamics) -> None:
        """Raise a ValueError if this solver cannot advance ``dyn``."""


class Iterate(AbstractSolver):
    """Apply a discrete map once per step."""

    def step(self, dyn, k, t, X, dt):
        """Apply the map once: ``dyn.step(k, X)``."""
        return dyn.step(k, X)

    def check(self, dyn):
        """Refuse flows: Iterate advances discrete maps only."""
        if not isinstance(dyn, AbstractMap):
            raise ValueError(f"Iterate advances discrete maps; got the flow {type(dyn).__name__}")


class _FlowSolver(AbstractSolver):
    def check(self, dyn):
        if not isinstance(dyn, AbstractFlow):
            raise ValueError(f"{type(self).__name__} integrates flows; got the map {type(dyn).__name__}")


class Euler(_FlowSolver):
    """Projected explicit Euler: X <- project(X + dt f(t, X))."""

    def step(self, dyn, k, t, X, dt):
        """One projected Euler step of the flow."""
        return dyn.project(X + dt * dyn.vf(t, X))


class RK4(_FlowSolver):
    """Classical fourth-order Runge-Kutta, projected back onto the state space after each step."""

    def step(self, dyn, k, t, X, dt):
        """One projected classical Runge-Kutta step of the flow."""
        k1 = dyn.vf(t, X)
        k2 = dyn.vf(t + dt / 2, X + (dt / 2) * k1)
        k3 = dyn.vf(t + dt / 2, X + (dt / 2) * k2)
        k4 = dyn.vf(t + dt, X + dt * k3)
        return dyn.project(X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))


class Adaptive(eqx.Module):
    """An adaptive diffrax solve (default Tsit5 with a PID step-size controller).

    The state is projected onto the state space only at saved times; between them the solver's
    tolerance bounds the drift off the sphere.
    """

    solver: diffrax.AbstractSolver = eqx.field(default_factory=diffrax.Tsit5)
    rtol: float = eqx.field(static=True, default=1e-6)
    atol: float = eqx.field(static=True, default=1e-8)
    dt0: float | None = eqx.field(static=True, default=None)
    max_steps: int = eqx.field(static=True, default=100_000)

    def __check_init__(self):
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v > 0 and v < float("inf")):
                raise ValueError(f"Adaptive {name} must be a finite number > 0, got {v!r}")
        if self.dt0 is not None and (isinstance(self.dt0, bool) or not isinstance(self.dt0, numbers.Real)
                                     or not (self.dt0 > 0 and self.dt0 < float("inf"))):
            raise ValueError(f"Adaptive dt0 must be None or a finite number > 0, got {self.dt0!r}")
        m = self.max_steps
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"Adaptive max_steps must be an integer >= 1, got {m!r}")

    def check(self, dyn):
        """Refuse maps: the adaptive solver integrates flows only."""
        if not isinstance(dyn, AbstractFlow):
            raise ValueError(f"Adaptive integrates flows; got the map {type(dyn).__name__}")


def make_solver(name: str):
    """``"iterate"``, ``"euler"``, ``"rk4"`` or ``"adaptive"``."""
    table = {"iterate": Iterate, "euler": Euler, "rk4": RK4, "adaptive": Adaptive}
    if name not in table:
        raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(table)}")
    return table[name]()
