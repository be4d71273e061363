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

Every attempt, accepted or not, counts as one step against the cap. The first step size of a member is the solver's
``dt0``, or Hairer's first guess ``0.01 rms(X / sc) / rms(f(X) / sc)`` (``sc = atol + rtol |X|``), taken from the
first stage of its first attempt.
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


class _Ops:
    """How an attempt sees its members: one member ``(n, d)`` (``lanes=False``: every reduction is over the whole
    state) or a pool's rows ``(d n, P)`` (``lanes=True``: reductions over axis 0, one value per member); ``f(t, X)``
    and ``project(X)`` act on that layout."""

    def __init__(self, f, project, lanes: bool):
        self.f, self.project, self.lanes = f, project, lanes

    def red(self, fn, v):
        return fn(v, axis=0) if self.lanes else fn(v)

    def b(self, v):  # a per-member value against a state
        return v[None] if self.lanes else v


def _first_h(ops: _Ops, ctl: Controller, X, k1, h):
    """The step size of an attempt: `h`, or for a new member (h = 0) the solver's dt0, or else Hairer's first
    guess ``0.01 d0 / d1`` with ``d0 = rms(X / sc)``, ``d1 = rms(f(X) / sc)``, ``sc = atol + rtol |X|`` (as diffrax,
    without its second evaluation of f: k1 is the attempt's own first stage)."""
    if ctl.dt0 is not None:
        first = jnp.asarray(ctl.dt0, h.dtype)
    else:
        sc = ctl.atol + jnp.abs(X) * ctl.rtol
        d0 = jnp.sqrt(ops.red(jnp.mean, (X / sc) ** 2))
        d1 = jnp.sqrt(ops.red(jnp.mean, (k1 / sc) ** 2))
        small = (d0 < 1e-5) | (d1 < 1e-5) | ~jnp.isfinite(d1)
        first = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1)).astype(h.dtype)
    return jnp.where(h > 0, h, first)


def _attempt(ops: _Ops, ctl: Controller, tol: float, X, t, h):
    """One attempt of every member in `X` (see :class:`_Ops`): ``(X, t, h, outcome or -1, counted)``; outcome -1:
    still running. A member's first attempt (h = 0) takes its first step size from its first stage."""
    if not ops.lanes:  # one member under vmap: the stages written out (XLA fuses them best)
        k1 = ops.f(t, X)
        h = _first_h(ops, ctl, X, k1, h)
        ks = [k1]
        for i, row in enumerate(ctl.a):
            Z = X + h * sum(a * k for a, k in zip(row, ks) if a != 0.0)
            ks.append(ops.f(t + ctl.c[i] * h, Z))
        Y = X + h * sum(b * k for b, k in zip(ctl.b, ks) if b != 0.0)
        E = h * sum(e * k for e, k in zip(ctl.e, ks) if e != 0.0)
        return _accept(ops, ctl, tol, X, t, h, k1, Y, E)
    # lanes: every stage, the first included, in one loop over the tableau's rows (one copy of the unrolled f in the
    # compiled program, not one per stage: it compiles several times faster, and runs faster)
    s_ = len(ctl.b)
    A = np.zeros((s_, s_), np.float64)
    for i, row in enumerate(ctl.a):
        A[i + 1, : len(row)] = row
    A = jnp.asarray(A, X.dtype)
    C = jnp.asarray((0.0,) + tuple(ctl.c), X.dtype)

    def stage(i, ks):
        # the step size from the first stage, in every stage (stage 0 does not use it: its row of A is zero); measured:
        # recomputing these few reductions is faster than carrying h through a lax.cond on the stage index
        hi = _first_h(ops, ctl, X, ks[0], h)
        Z = X + hi[None] * jnp.tensordot(A[i], ks, axes=1)
        return ks.at[i].set(ops.f(t + C[i] * hi, Z))

    ks = jax.lax.fori_loop(0, s_, stage, jnp.zeros((s_,) + X.shape, X.dtype))
    h = _first_h(ops, ctl, X, ks[0], h)
    Y = X + h[None] * jnp.tensordot(jnp.asarray(ctl.b, X.dtype), ks, axes=1)
    E = h[None] * jnp.tensordot(jnp.asarray(ctl.e, X.dtype), ks, axes=1)
    return _accept(ops, ctl, tol, X, t, h, ks[0], Y, E)


def _accept(ops: _Ops, ctl: Controller, tol: float, X, t, h, k1, Y, E):
    """The controller's decision on an attempt from (X, t, h) with first stage k1, candidate Y and error estimate E
    (see :func:`_attempt`)."""
    finite1 = ops.red(jnp.all, jnp.isfinite(k1))
    steady = finite1 & (ops.red(jnp.max, jnp.abs(k1)) < tol)
    finiteY = ops.b(ops.red(jnp.all, jnp.isfinite(Y)))
    Ysafe = jnp.where(finiteY, Y, X)
    q = E / (ctl.atol + ctl.rtol * jnp.maximum(jnp.abs(X), jnp.abs(Ysafe)))
    err = jnp.sqrt(ops.red(jnp.mean, q * q))
    keep = err < 1.0  # False for NaN
    factor = jnp.clip(ctl.safety * (1.0 / err) ** (1.0 / ctl.order), jnp.where(keep, 1.0, ctl.factormin),
                      jnp.where(keep, ctl.factormax, ctl.safety))
    factor = jnp.where(jnp.isfinite(factor), factor, ctl.factormin)
    h_new = (h * factor).astype(h.dtype)
    X_new = jnp.where(ops.b(keep), ops.project(Ysafe), X)
    t_new = jnp.where(keep, t + h, t)
    tiny = h_new <= 10 * jnp.finfo(h.dtype).eps * jnp.maximum(1.0, jnp.abs(t_new))
    outcome = jnp.where(steady, CONVERGED, jnp.where(~finite1, NONFINITE, jnp.where(tiny, SOLVER_FAILED, -1)))
    moved = ~steady & finite1
    return (jnp.where(ops.b(moved), X_new, X), jnp.where(moved, t_new, t), jnp.where(moved, h_new, h), outcome, moved)


def _member_ops(dyn) -> _Ops:
    return _Ops(dyn.vf, dyn.project, lanes=False)


def lane_ops(dyn, n: int, d: int, P: int, dtype, *, unrolled: bool = False) -> _Ops:
    """:class:`_Ops` on a pool's rows ``(d n, P)`` from the vector field and projection of ``dyn`` re-evaluated on
    lanes (:class:`~attnflow.evolve.backends.unroll.LaneProgram`: the model's own arithmetic, no second copy), in
    batch-last form, or `unrolled` into per-member scalars."""
    from . import backends

    vf = backends.lane_function("vf", dyn, n, d, dtype)
    pr = backends.lane_function("project", dyn, n, d, dtype)
    fv, fp = vf.prepare(dyn), pr.prepare(dyn)
    k0 = jnp.zeros((), jnp.int32)
    if unrolled:
        sv, sp = vf.scalars(fv), pr.scalars(fp)
        return _Ops(lambda t, X: jnp.stack(vf.step(sv, k0, tuple(X), P)), lambda X: jnp.stack(pr.step(sp, k0, tuple(X), P)),
                    lanes=True)
    return _Ops(lambda t, X: vf.step_array(fv, k0, X), lambda X: pr.step_array(fp, k0, X), lanes=True)


def _members(rows, n, d):
    P = rows.shape[1]
    return jnp.transpose(rows.reshape(d, n, P), (2, 1, 0))


def _rows(X):
    P, n, d = X.shape
    return jnp.transpose(X, (2, 1, 0)).reshape(d * n, P)


def run_group(dyn, ctl: Controller, tol: float, cap, regions, group: int, n: int, d: int, rows, st, ns, t, h, tag,
              lanes: bool = False):
    """`group` attempts of every running member (outcome ``not_converged`` and fewer than `cap` steps) of a pool
    ``(d n, P)``; the others are frozen. With `regions`, a member whose accepted step lands in a certified region
    stops as ``certified`` (:mod:`attnflow.evolve.regions`). `lanes`: the unrolled model on the rows (the lanes
    backend), else the per-configuration model under ``vmap`` (xla)."""
    from .outcome import CERTIFIED
    from .regions import test_rows, test_state

    P = rows.shape[1]
    if lanes:
        ops = lane_ops(dyn, n, d, P, rows.dtype)
        attempt = lambda X, t, h: _attempt(ops, ctl, tol, X, t, h)  # noqa: E731
        test = None if regions is None else (lambda X: test_rows(regions, X, n, d))
        X0 = rows
    else:
        ops = _member_ops(dyn)
        attempt = jax.vmap(lambda x, tt, hh: _attempt(ops, ctl, tol, x, tt, hh))
        test = None if regions is None else jax.vmap(lambda x: test_state(regions, x))
        X0 = _members(rows, n, d)
    mask = (lambda v: v[None]) if lanes else (lambda v: v[:, None, None])

    def one(_, c):
        X, st, ns, t, h, tag = c
        Xn, tn, hn, oc, moved = attempt(X, t, h)
        run = (st == NOT_CONVERGED) & (ns < cap)
        if test is not None:
            hit, tg = test(Xn)
            cert = run & moved & (tn != t) & hit & (oc < 0)
            oc = jnp.where(cert, CERTIFIED, oc)
            tag = jnp.where(cert, tg, tag)
        X = jnp.where(mask(run), Xn, X)
        t, h = jnp.where(run, tn, t), jnp.where(run, hn, h)
        st = jnp.where(run & (oc >= 0), oc, st).astype(st.dtype)
        ns = ns + (run & moved).astype(ns.dtype)
        return X, st, ns, t, h, tag

    X, st, ns, t, h, tag = jax.lax.fori_loop(0, group, one, (X0, st, ns, t, h, tag))
    return (X if lanes else _rows(X)), st, ns, t, h, tag
