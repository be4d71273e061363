"""A pool of member slots on the device, fed from a queue of initial states: the engine of long Monte Carlo
studies (:func:`attnflow.analysis.basins.basin_fractions`).

:func:`advance_pool` runs every occupied slot with the model's own step, with the per-member semantics of
:func:`attnflow.simulate` with ``steps=cap`` and ``tol`` (status, steps, final state). Every ``group`` steps,
members that stopped (converged, non-finite, or at the cap) are retired into an output buffer and their slots
take the next states of the queue. So a member costs its own steps (rounded up to a whole group), not those of
the slowest member of its batch. The pool outlives a call: members still running when the queue runs dry go on
in the next call, and a call with ``drain=True`` runs until every slot is empty.

Backends: ``"lanes"`` (the unrolled step, :class:`~attnflow.evolve.backends.unroll.LaneProgram`, on ``(d n, P)``
rows) and ``"xla"`` (the vmapped per-configuration step). The step index given to the model is each member's own
step count, as in :func:`attnflow.simulate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float, Int
from ..model.dynamics import AbstractFlow
from . import backends
from .backends import machine, one_step
from .simulate import _check_x0, _make_plan, _mark_degenerate
from .status import CONVERGED, MAX_STEPS

GROUP = 8
"""Steps between two retire-and-refill passes: a member waits on average about half of this after it stopped, and
each pass moves ``d n`` numbers per slot. Measured on the 2-core CPU (n = 10, d = 3, 1024 slots, 3 x 10^4 samples):
groups of 4, 8 and 16 steps within 5% of each other (10 600, 9 900-10 700, 10 200 samples/s)."""


class Pool(eqx.Module):
    """Member slots: ``x`` ``(d n, P)`` states as rows (row ``a n + i`` is coordinate a of token i), ``index`` the
    sample index of each slot's member (-1: free), ``status`` and ``steps`` as in :class:`~attnflow.Solution`."""

    x: Float[Array, "D P"]
    index: Int[Array, " P"]
    status: Int[Array, " P"]
    steps: Int[Array, " P"]

    def occupied(self) -> int:
        """How many slots hold a member."""
        return int(jnp.sum(self.index >= 0))


def empty_pool(size: int, tokens: int, d: int, dtype) -> Pool:
    """A pool of `size` free slots for states ``(tokens, d)``."""
    if size < 1:
        raise ValueError(f"a pool needs at least one slot, got {size}")
    free = jnp.full((size,), -1, jnp.int32)
    return Pool(jnp.zeros((d * tokens, size), dtype), free, jnp.full((size,), CONVERGED, jnp.int32), jnp.zeros((size,), jnp.int32))


class Retired(eqx.Module):
    """The members one call retired, in order of retirement; the first ``count`` entries are valid (the buffer holds
    queue + pool entries). ``status`` includes ``degenerate`` (checked on the final state, as in simulate);
    ``extra`` is ``then(final, status)`` of :func:`advance_pool` (e.g. labels), or None."""

    index: Int[Array, " R"]
    final: Float[Array, "R n d"]
    status: Int[Array, " R"]
    steps: Int[Array, " R"]
    count: Int[Array, ""]
    extra: object = None

    def valid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, object]:
        """``(index, final, status, steps, extra)`` of the retired members, on the host (NumPy; transfers only, so
        it does not wait for device work queued after this call)."""
        c = int(np.asarray(self.count))
        cut = lambda a: np.asarray(a)[:c]  # noqa: E731
        return (cut(self.index).astype(np.int64), cut(self.final), cut(self.status), cut(self.steps),
                None if self.extra is None else jax.tree.map(cut, self.extra))


@dataclasses.dataclass(frozen=True)
class _Spec:
    cap: int
    tol: float | None
    group: int
    continuous: bool
    backend: str


def advance_pool(dynamics, pool: Pool, queue, queue_index, count: int, *, cap: int, tol: float | None, drain: bool = False,
                 dt: float | None = None, solver=None, backend: str = "auto", group: int = GROUP,
                 then: Callable | None = None) -> tuple[Pool, Retired]:
    """Run the pool on the first `count` states of `queue` ``(M, n, d)`` (sample indices `queue_index` ``(M,)``,
    int32), until the queue is used up; with `drain`, until every slot is empty. Members stop at `tol` (per-step
    max-abs change, divided by dt for flows) or after `cap` steps. `dt` and `solver` as in :func:`attnflow.simulate`
    (fixed-step solvers only). One compiled program per shape: `count` and `drain` are data.

    **Returns:** the pool (keep it for the next call) and the :class:`Retired` members.
    """
    queue = _check_x0(dynamics, queue)
    M, n, d = queue.shape
    D, P = pool.x.shape
    if D != n * d or pool.x.dtype != queue.dtype:
        raise ValueError(f"the pool holds states of {D} numbers in {pool.x.dtype}, the queue ({n}, {d}) in {queue.dtype}")
    if not 0 <= int(count) <= M or len(queue_index) != M:
        raise ValueError(f"count must be in [0, {M}] and queue_index of length {M}, got {count}, {len(queue_index)}")
    if group < 1 or cap < 1:
        raise ValueError(f"group and cap must be >= 1, got {group}, {cap}")
    if isinstance(dynamics, AbstractFlow):
        if dt is None:
            raise ValueError("a continuous member pool needs dt")
        plan, solver, dt_used = _make_plan(dynamics, queue, None, cap * dt, dt, solver, None, tol, 1)
    else:
        plan, solver, dt_used = _make_plan(dynamics, queue, cap, None, None, solver, None, tol, 1)
    if plan.adaptive:
        raise ValueError("a member pool needs a fixed-step solver (an adaptive solve has no step to group)")
    if backend == "fused":
        raise ValueError("a member pool runs on the 'xla' or 'lanes' backend, not 'fused'")
    resolved = backends.resolve_backend(backend, dynamics, solver, plan, (P, n, d), queue.dtype)
    spec = _Spec(int(cap), plan.tol, int(group), plan.continuous, resolved)
    return _advance(dynamics, solver, pool, jnp.asarray(queue), jnp.asarray(queue_index, jnp.int32),
                    jnp.asarray(count, jnp.int32), jnp.asarray(bool(drain)), jnp.asarray(dt_used, queue.dtype), spec, then)


def _row_step(dyn, solver, dt, spec: _Spec, n: int, d: int, P: int, dtype):
    """``step(X, k)`` on ``(d n, P)`` rows with per-slot step indices ``k`` ``(P,)``."""
    if spec.backend == "lanes":
        prog = backends.lane_program(dyn, solver, dt, n, d, dtype)
        scal = prog.scalars(prog.prepare((dyn, solver, dt)))
        return lambda X, k: jnp.stack(prog.step(scal, k, tuple(X), P))

    def step(X, k):
        Xm = jnp.transpose(X.reshape(d, n, P), (2, 1, 0))
        Y = jax.vmap(lambda x, kk: one_step((dyn, solver, dt), kk, x))(Xm, k)
        return jnp.transpose(Y, (2, 1, 0)).reshape(d * n, P)

    return step


def _advance_impl(dyn, solver, pool: Pool, queue, qidx, count, drain, dt, spec: _Spec, then):
    M, n, d = queue.shape
    D, P = pool.x.shape
    R = M + P
    Q = jnp.transpose(queue, (2, 1, 0)).reshape(D, M)
    step = _row_step(dyn, solver, dt, spec, n, d, P, queue.dtype)
    scale = dt if spec.continuous else None

    def one(_, c):
        X, st, ns = c
        X, _, st, ns = machine.advance((X, ns, st, ns), step, spec.tol, scale, spec.cap)
        return X, st, ns

    def retire(c):
        (x, idx, st, ns), head, (ox, oi, os_, on), nout = c
        occ = idx >= 0
        done = occ & ((st != MAX_STEPS) | (ns >= spec.cap))
        pos = jnp.where(done, nout + jnp.cumsum(done, dtype=jnp.int32) - 1, R)  # R: out of bounds, dropped
        ox, oi = ox.at[:, pos].set(x, mode="drop"), oi.at[pos].set(idx, mode="drop")
        os_, on = os_.at[pos].set(st, mode="drop"), on.at[pos].set(ns, mode="drop")
        want = done | ~occ
        q = head + jnp.cumsum(want, dtype=jnp.int32) - 1
        take = want & (q < count)
        qc = jnp.clip(q, 0, M - 1)
        x = jnp.where(take[None], Q[:, qc], x)
        idx = jnp.where(take, qidx[qc], jnp.where(want, -1, idx))
        st = jnp.where(take, MAX_STEPS, jnp.where(want, CONVERGED, st))
        ns = jnp.where(take, 0, ns)
        return (x, idx, st, ns), head + jnp.sum(take, dtype=jnp.int32), (ox, oi, os_, on), nout + jnp.sum(done, dtype=jnp.int32)

    def body(c):
        (x, idx, st, ns), head, out, nout = retire(c)
        x, st, ns = jax.lax.fori_loop(0, spec.group, one, (x, st, ns))
        return (x, idx, st, ns), head, out, nout

    cond = lambda c: (c[1] < count) | (drain & jnp.any(c[0][1] >= 0))  # noqa: E731
    zero = jnp.zeros((), jnp.int32)
    out = (jnp.zeros((D, R), queue.dtype), jnp.full((R,), -1, jnp.int32), jnp.zeros((R,), jnp.int32), jnp.zeros((R,), jnp.int32))
    c = ((pool.x, pool.index, pool.status, pool.steps), zero, out, zero)
    c = retire(jax.lax.while_loop(cond, body, c))
    (x, idx, st, ns), _, (ox, oi, os_, on), nout = c
    final = jnp.transpose(ox.reshape(d, n, R), (2, 1, 0))
    final, _, os_, on = _mark_degenerate(dyn, final, None, os_, on)
    extra = None if then is None else then(final, os_)
    return Pool(x, idx, st, ns), Retired(oi, final, os_, on, nout, extra)


@functools.partial(jax.jit, static_argnums=1)
def _advance_jit(dynamic, static):
    return _advance_impl(*eqx.combine(dynamic, static))


def _advance(*args):
    """``_advance_impl`` compiled, dispatched asynchronously (``eqx.filter_jit`` waits for its results, which would
    keep the host from labelling one call's members while the next call runs)."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    return _advance_jit(dynamic, static)
