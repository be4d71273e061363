"""Adaptive steps per member, for the member pool (:mod:`attnflow.evolve.pool`): an embedded explicit Runge-Kutta
pair (the tableau of the diffrax solver in :class:`~attnflow.Adaptive`, e.g. Tsit5 or Dopri5) with an error estimate
and a step size of its own for every member.

One attempt from (X, t, h), written for one configuration and lifted with ``vmap``:

- k_1 = f(t, X). If ``max |k_1| < tol`` the member is at steady state: ``converged``, without a step (the rule of
  diffrax's ``steady_state_event`` that :func:`attnflow.simulate` uses with this solver). A non-finite k_1 is
  ``nonfinite``.
- the stages, the candidate Y = X + h sum_i b_i k_i and the error estimate E = h sum_i e_i k_i; the scaled error
  ``err = rms(E / (atol + rtol max(|X|, |Y|)))`` (diffrax's PIDController with its defaults: an integral controller).
- accepted when ``err < 1``: X <- project(Y) (back onto the state space, as the fixed-step solvers do), t <- t + h.
- the next step size ``h min(max(0.9 err^(-1/q), lo), hi)`` with q the order of the error estimate and
  (lo, hi) = (1, 10) after an accepted step, (0.2, 0.9) after a rejected one; a non-finite err counts as rejected and
  shrinks h by 0.2. A step size below 10 machine epsilons of t is ``solver_failed``.

Every attempt, accepted or not, counts as one step against the cap. The first step size of a member is Hairer's
(as diffrax's ``_select_initial_step``) unless the solver gives ``dt0``.
"""

from __future__ import annotations

import dataclasses

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .outcome import CONVERGED, NONFINITE, NOT_CONVERGED, SOLVER_FAILED


@dataclasses.dataclass(frozen=True)
class Controller:
    """The static description of an adaptive member run: the tableau (c, a, b, e), the order q of the error
    estimate, the tolerances and the controller's factors."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...]
    order: float
    rtol: float
    atol: float
    dt0: float | None
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0

    @classmethod
    def of(cls, solver) -> "Controller":
        """The controller of an :class:`~attnflow.Adaptive` solver (its diffrax solver must be an explicit
        Runge-Kutta pair with an error estimate: Tsit5, Dopri5, Dopri8, Bosh3, Heun, ...)."""
        inner = solver.solver
        tab = getattr(type(inner), "tableau", None)
        if tab is None or getattr(tab, "implicit", False) or tab.b_error is None:
            raise ValueError("adaptive member runs need an explicit Runge-Kutta pair with an error estimate "
                             f"(diffrax Tsit5, Dopri5, Bosh3, ...), got {type(inner).__name__}")
        term = diffrax.ODETerm(lambda t, y, args: y)
        order = inner.error_order(term)
        return cls(tuple(float(v) for v in tab.c), tuple(tuple(float(v) for v in np.atleast_1d(r)) for r in tab.a_lower),
                   tuple(float(v) for v in tab.b_sol), tuple(float(v) for v in tab.b_error), float(order),
                   float(solver.rtol), float(solver.atol), None if solver.dt0 is None else float(solver.dt0))


def _rms(v):
    return jnp.sqrt(jnp.mean(v * v))


def _attempt(dyn, ctl: Controller, tol: float, X, t, h):
    """One attempt of one member: ``(X, t, h, outcome or -1, counted)``; outcome -1: still running."""
    k1 = dyn.vf(t, X)
    finite1 = jnp.all(jnp.isfinite(k1))
    steady = finite1 & (jnp.max(jnp.abs(k1)) < tol)
    ks = [k1]
    for i, row in enumerate(ctl.a):
        Z = X + h * sum(a * k for a, k in zip(row, ks) if a != 0.0)
        ks.append(dyn.vf(t + ctl.c[i] * h, Z))
    Y = X + h * sum(b * k for b, k in zip(ctl.b, ks) if b != 0.0)
    E = h * sum(e * k for e, k in zip(ctl.e, ks) if e != 0.0)
    Ysafe = jnp.where(jnp.all(jnp.isfinite(Y)), Y, X)
    err = _rms(E / (ctl.atol + ctl.rtol * jnp.maximum(jnp.abs(X), jnp.abs(Ysafe))))
    keep = err < 1.0  # False for NaN
    factor = jnp.clip(ctl.safety * (1.0 / err) ** (1.0 / ctl.order), jnp.where(keep, 1.0, ctl.factormin),
                      jnp.where(keep, ctl.factormax, ctl.safety))
    factor = jnp.where(jnp.isfinite(factor), factor, ctl.factormin)
    h_new = (h * factor).astype(h.dtype)
    X_new = jnp.where(keep, dyn.project(jnp.where(jnp.all(jnp.isfinite(Y)), Y, X)), X)
    t_new = jnp.where(keep, t + h, t)
    tiny = h_new <= 10 * jnp.finfo(h.dtype).eps * jnp.maximum(1.0, jnp.abs(t_new))
    outcome = jnp.where(steady, CONVERGED, jnp.where(~finite1, NONFINITE, jnp.where(tiny, SOLVER_FAILED, -1)))
    moved = ~steady & finite1
    return (jnp.where(moved, X_new, X), jnp.where(moved, t_new, t), jnp.where(moved, h_new, h), outcome, moved)


def _members(rows, n, d):
    P = rows.shape[1]
    return jnp.transpose(rows.reshape(d, n, P), (2, 1, 0))


def _rows(X):
    P, n, d = X.shape
    return jnp.transpose(X, (2, 1, 0)).reshape(d * n, P)


def run_group(dyn, ctl: Controller, tol: float, cap, regions, group: int, n: int, d: int, rows, st, ns, t, h, tag):
    """`group` attempts of every running member (outcome ``not_converged`` and fewer than `cap` steps) of a pool
    ``(d n, P)``; the others are frozen. With `regions`, a member whose accepted step lands in a certified region
    stops as ``certified`` (:mod:`attnflow.evolve.regions`)."""
    from .outcome import CERTIFIED
    from .regions import test_state

    def one(_, c):
        X, st, ns, t, h, tag = c
        Xn, tn, hn, oc, moved = jax.vmap(lambda x, tt, hh: _attempt(dyn, ctl, tol, x, tt, hh))(X, t, h)
        run = (st == NOT_CONVERGED) & (ns < cap)
        if regions is not None:
            hit, tg = jax.vmap(lambda x: test_state(regions, x))(Xn)
            cert = run & moved & (tn != t) & hit & (oc < 0)
            oc = jnp.where(cert, CERTIFIED, oc)
            tag = jnp.where(cert, tg, tag)
        X = jnp.where(run[:, None, None], Xn, X)
        t, h = jnp.where(run, tn, t), jnp.where(run, hn, h)
        st = jnp.where(run & (oc >= 0), oc, st).astype(st.dtype)
        ns = ns + (run & moved).astype(ns.dtype)
        return X, st, ns, t, h, tag

    X, st, ns, t, h, tag = jax.lax.fori_loop(0, group, one, (_members(rows, n, d), st, ns, t, h, tag))
    return _rows(X), st, ns, t, h, tag


def _initial_one(dyn, ctl: Controller, X):
    """Hairer's first step size for one member (diffrax ``_select_initial_step``), or the solver's dt0."""
    if ctl.dt0 is not None:
        return jnp.asarray(ctl.dt0, X.dtype)
    scale = ctl.atol + jnp.abs(X) * ctl.rtol
    f0 = dyn.vf(0.0, X)
    d0, d1 = _rms(X / scale), _rms(f0 / scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
    f1 = dyn.vf(h0, X + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    md = jnp.maximum(d1, d2)
    h1 = jnp.where(md <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.where(md <= 1e-15, 1.0, md)) ** (1.0 / ctl.order))
    h = jnp.minimum(100 * h0, h1).astype(X.dtype)
    return jnp.where(jnp.isfinite(h) & (h > 0), h, jnp.asarray(1e-6, X.dtype))


def initial_step(dyn, ctl: Controller, n: int, d: int, rows):
    """The first step size of the member in every slot of a pool ``(d n, P)`` -> ``(P,)``."""
    return jax.vmap(lambda x: _initial_one(dyn, ctl, x))(_members(rows, n, d))
