"""The engine of studies of many members: a pool of member slots per device, fed from a queue of initial states,
each member retired the moment it is decided.

:func:`advance_pool` runs every occupied slot with the model's own step. Every ``group`` steps, members that
stopped are retired into an output buffer and their slots take the next states of the queue, so a member costs its
own steps (rounded up to a whole group), not those of the slowest member of its batch. The pool outlives a call:
members still running when the queue runs dry go on in the next call, and ``drain=True`` runs until every slot is
empty. A traceable ``then(final, outcome)`` (e.g. a classifier) runs on the retired members in the same call.

**One retirement rule.** A member is retired when its outcome is decided: ``converged`` (per-step change below
tol; the adaptive solver: ``max |f(X)| < tol``), ``nonfinite``, ``solver_failed``, or when it has taken exactly
``cap`` steps (``not_converged``). ``degenerate`` is decided on the final state (the model's ``state_residual``).

**Modes, not engines.** Fixed-step solvers run on the ``"xla"`` backend (the per-configuration step under
``vmap``), ``"lanes"`` (the unrolled step, :class:`~attnflow.evolve.backends.unroll.LaneProgram`, on ``(d n, P)``
rows) or ``"fused"`` (the same unrolled step for ``group`` steps in one Pallas kernel); the adaptive solver runs
an embedded Runge-Kutta pair with a step size per member (:mod:`attnflow.evolve.adaptive`). Several local devices
run one pool each (:func:`stream_members`): each gets its own share of every queue block and its own compiled call,
dispatched asynchronously, with no collective inside the step loop.

Every member's outcome, steps and final state depend only on its initial state, the model, the solver, the budget
and the stop rule: never on its slot, the pool size, the group, the blocks, the device or the number of devices.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._cache import ExportedProgram
from .._device import device_array, on_device, tile_loop
from .._types import Array, Float, Int
from ..model.dynamics import AbstractFlow, AbstractMap
from . import adaptive as _adaptive, backends
from .backends import machine, one_step
from .options import Budget, Execution, Span, Stop
from .outcome import CERTIFIED, CONVERGED, NOT_CONVERGED, mark_degenerate
from .regions import Regions, equilibria, test_rows
from .solvers import RK4, Adaptive, Iterate

GROUP = 8
"""Default steps between two retire-and-refill passes of a fixed-step solver or a map: a member waits on average about
half of this after it stopped, and each pass moves ``d n`` numbers per slot. Measured on the 2-core CPU (n = 10, d = 3,
1024 slots, 3 x 10^4 samples): groups of 4, 8 and 16 steps within 5% of each other (10 600, 9 900-10 700, 10 200
samples/s); again with the batch-last lanes step (256 slots, 2026-12-03): 4 and 8 the same (1.42-1.46 s), 2 slower
(1.45-1.55 s); the RK4 sphere flow and the toy map on xla: 4 and 8 the same."""

GROUP_ADAPTIVE = 4
"""Default group of the adaptive pair, whose members stop after a few dozen attempts (28 on average in the sphere flow
of ``benchmarks/bench_peer_basins.py``), so that waiting for half a group costs more: measured on the 2-core CPU
(2026-12-03), 10^5 members 5.23-5.26 s with 4 against 5.50-5.57 s with 8; 2 x 10^4 members 1.10-1.12 s with 4,
1.08-1.11 s with 2, 1.17-1.25 s with 8 and 1.31-1.33 s with 16. The fused GPU kernel (fixed steps) keeps
:data:`GROUP`."""


XLA_TILE = 128
"""Members per tile of a pool's step on the ``"xla"`` backend (the model under ``vmap``). Measured on the 2-core CPU
(2026-12-03, float32, warm, one process): the toy layer map (10^4 samples, cap 1000) in pools of 64, 128, 256, 1024,
10 240 slots 1.7, 1.7, 1.75, 2.5, 8.7 s; the adaptive sphere flow (3000 samples) in 128, 256, 1024, 3000 slots
0.44, 0.55, 0.85, 1.3 s."""


def pool_tile(dynamics, solver, backend: str, n: int, d: int, dtype) -> int:
    """Members per tile of a pool's step: a pool runs its slots as a loop over tiles of exactly this many (the last
    one padded), so every member goes through the same compiled arithmetic whatever the pool size, the number of
    devices or worker processes, or the machine. (XLA compiles an operation differently for different extents:
    which loops it vectorises, splits over threads or contracts into fused multiply-adds; in float32 that changes
    the rounding. Measured, jax 0.10.2, the adaptive sphere flow of ``benchmarks/bench_peer_basins.py``: its vector
    field on 37, 64, 192 and 512 slots rounded four ways, and a study of 1000 members changed the step counts of
    35-37% of them between pools; in fixed tiles every pool gives the same bits.) On ``"lanes"``: the slots whose
    unrolled step fits a 2 MiB cache (:func:`attnflow.evolve.backends.cache_slots`), a pure function of the model's
    size and the dtype; on ``"xla"`` on a CPU: :data:`XLA_TILE`. 0 (no tiles: the pool is one program) on
    ``"fused"``, whose kernel has its own tiles, and on ``"xla"`` on other platforms, where a GPU wants thousands of
    members per kernel and no tile size has been measured (there the pool size may change a member's last bits)."""
    if backend == "lanes":
        return backends.cache_slots(lanes_cost(dynamics, solver, 1.0, n, d, dtype), np.dtype(dtype).itemsize)
    return XLA_TILE if backend == "xla" and jax.default_backend() == "cpu" else 0


def default_group(solver) -> int:
    """The group of :class:`~attnflow.Execution` when it sets none: :data:`GROUP_ADAPTIVE` for the adaptive pair,
    else :data:`GROUP`. Speed only: a member's outcome never depends on the group."""
    return GROUP_ADAPTIVE if isinstance(solver, Adaptive) else GROUP


class Pool(eqx.Module):
    """Member slots on one device: ``x`` ``(d n, P)`` states as rows (row ``a n + i`` is coordinate a of token i),
    ``index`` the sample index of each slot's member (-1: free), ``outcome`` and ``steps`` as in
    :class:`~attnflow.Solution`; ``t`` and ``h`` the time and next step size of each member (adaptive solver);
    ``tag`` the certified region a member entered (-1: none)."""

    x: Float[Array, "D P"]
    index: Int[Array, " P"]
    outcome: Int[Array, " P"]
    steps: Int[Array, " P"]
    t: Float[Array, " P"]
    h: Float[Array, " P"]
    tag: Int[Array, " P"]

    def occupied(self) -> int:
        """How many slots hold a member."""
        return int(jnp.sum(self.index >= 0))


def empty_pool(size: int, tokens: int, d: int, dtype, device=None) -> Pool:
    """A pool of `size` free slots for states ``(tokens, d)`` (on `device`, default the default device)."""
    if size < 1:
        raise ValueError(f"a pool needs at least one slot, got {size}")
    free = np.full((size,), -1, np.int32)
    arrs = (np.zeros((d * tokens, size), dtype), free, np.full((size,), CONVERGED, np.int32), np.zeros((size,), np.int32),
            np.zeros((size,), dtype), np.zeros((size,), dtype), free.copy())
    return Pool(*(jax.device_put(a, device) for a in arrs))


class Retired(eqx.Module):
    """The members one call retired, in order of retirement; the first ``count`` entries are valid (the buffer holds
    queue + pool entries). ``outcome`` includes ``degenerate``; ``time`` is each member's final time (steps x dt for
    fixed-step flows, steps for maps, the accepted time for the adaptive solver); ``tag`` the certified region of a
    ``certified`` member (-1 otherwise); ``extra`` is ``then(final, outcome)`` of :func:`advance_pool` (e.g. labels),
    or None; a certified member is shown to `then` as its region's equilibrium, with outcome ``converged``
    (:func:`attnflow.evolve.regions.equilibria`), so its label is the attractor its certificate proves."""

    index: Int[Array, " R"]
    final: Float[Array, "R n d"]
    outcome: Int[Array, " R"]
    steps: Int[Array, " R"]
    time: Float[Array, " R"]
    tag: Int[Array, " R"]
    count: Int[Array, ""]
    extra: object = None

    def valid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, object]:
        """``(index, final, outcome, steps, extra)`` of the retired members, on the host (NumPy; transfers only, so
        it does not wait for device work queued after this call); their times are ``np.asarray(time)[:count]``."""
        c = int(np.asarray(self.count))
        cut = lambda a: np.asarray(a)[:c]  # noqa: E731
        return (cut(self.index).astype(np.int64), cut(self.final), cut(self.outcome), cut(self.steps),
                None if self.extra is None else jax.tree.map(cut, self.extra))

    def sink_args(self) -> tuple:
        """``(index, outcome, steps, final, extra, tag)`` of the retired members on the host: the arguments of the
        `sink` of :func:`stream_members`."""
        idx, fin, st, steps, extra = self.valid()
        return idx, st, steps, fin, extra, np.asarray(self.tag)[: len(idx)]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static facts of a pool call (part of its compiled signature; the cap is data, so a new cap never
    recompiles)."""

    tol: float | None
    group: int
    continuous: bool
    backend: str
    adaptive: _adaptive.Controller | None = None
    tile: int = 0


def check_solver(dynamics, solver):
    """The solver of a member run: ``Iterate`` for maps, ``RK4`` (default) / ``Euler`` / ``Adaptive`` for flows."""
    if solver is None:
        solver = Iterate() if isinstance(dynamics, AbstractMap) else RK4()
    solver.check(dynamics)
    return solver


def pool_backend(backend: str, dynamics, solver, shape, dtype, span: Span) -> str:
    """The backend of a pool: ``backend`` checked against the model and solver (``"auto"`` resolved for a call that
    runs ``shape[0]`` members for the whole cap, so a study that resolves it from its own size takes one path
    whatever its pool or device count)."""
    from ._plan import Plan

    adaptive = isinstance(solver, Adaptive)
    if adaptive:
        return _adaptive_backend(backend, dynamics, shape, dtype)
    plan = Plan(n_seg=1, seg_len=int(span.cap), save=False, tol=None, continuous=isinstance(dynamics, AbstractFlow),
                adaptive=False, unroll=1)
    return backends.resolve_backend(backend, dynamics, solver, plan, tuple(shape), dtype)


def _adaptive_backend(backend: str, dynamics, shape, dtype) -> str:
    """The backend of an adaptive pool: ``"xla"`` (the model under vmap) or ``"lanes"`` (its vector field and
    projection unrolled into lanes); ``"auto"`` takes lanes on a CPU when both unroll and the state is small (the
    rules of :func:`attnflow.evolve.backends.choose_backend`)."""
    import jax as _jax

    if backend == "fused":
        raise ValueError("the adaptive solver runs on the 'xla' or 'lanes' backend, not 'fused'")
    if backend == "xla" or (backend == "auto" and _jax.default_backend() != "cpu"):
        return "xla"
    _, n, d = shape
    why = None
    if n * d > backends.MAX_STATE:
        why = f"the state has n d = {n * d} scalars, more than MAX_STATE = {backends.MAX_STATE}"
    else:
        try:
            cost = backends.lane_function("vf", dynamics, n, d, dtype).cost
            backends.lane_function("project", dynamics, n, d, dtype)
            if cost > backends.MAX_COST:
                why = f"its unrolled vector field has {cost} operations, more than MAX_COST = {backends.MAX_COST}"
        except backends.Unsupported as e:
            why = f"the model's vector field cannot be unrolled into lanes ({e})"
    if why is None:
        return "lanes"
    if backend == "lanes":
        raise ValueError(f"backend='lanes' cannot run this adaptive pool: {why}")
    return "xla"


def advance_pool(dynamics, pool: Pool, queue, queue_index, count: int, *, budget: Budget, stop: Stop, solver=None,
                 execution: Execution = Execution(), drain: bool = False, then: Callable | None = None,
                 regions: Regions | None = None) -> tuple[Pool, Retired]:
    """Run the pool on the first `count` states of `queue` ``(M, n, d)`` (sample indices `queue_index` ``(M,)``,
    int32), until the queue is used up; with `drain`, until every slot is empty.

    **Arguments:** the model; the pool (:func:`empty_pool`, or the one a previous call returned); the queue;
    `budget` (its cap, and dt for fixed-step flows: :meth:`Budget.resolve`), `stop` (tol), `solver` (default
    ``Iterate`` / ``RK4``), `execution` (its backend and group; ``"auto"`` is resolved for P members running the
    whole cap: a study passes the backend it resolved for itself), `drain`, `then` (traceable, run on the
    retired members in the same call), and `regions` (:class:`~attnflow.evolve.regions.Regions`: a member that
    enters one after a step is retired as ``certified``, with the region's tag). One compiled program per shape: `count` and `drain` are data. The call is
    dispatched asynchronously and runs on the device that holds the pool.

    **Returns:** the pool (keep it for the next call) and the :class:`Retired` members.
    """
    from .simulate import _check_x0

    queue = _check_x0(dynamics, queue)
    M, n, d = queue.shape
    D, P = pool.x.shape
    if D != n * d or pool.x.dtype != queue.dtype:
        raise ValueError(f"the pool holds states of {D} numbers in {pool.x.dtype}, the queue ({n}, {d}) in {queue.dtype}")
    if not 0 <= int(count) <= M or len(queue_index) != M:
        raise ValueError(f"count must be in [0, {M}] and queue_index of length {M}, got {count}, {len(queue_index)}")
    solver = check_solver(dynamics, solver)
    span = budget.resolve(dynamics, isinstance(solver, Adaptive), study=True)
    backend = pool_backend(execution.backend, dynamics, solver, (P, n, d), queue.dtype, span)
    spec = make_spec(dynamics, solver, span, stop, execution, backend, n, d, queue.dtype)
    (dev,) = pool.x.devices()
    put = lambda a, dtype=None: device_array(a, dtype, dev)  # noqa: E731
    dt = 1.0 if span.dt is None else span.dt
    return _advance(dynamics, solver, pool, put(queue), put(queue_index, jnp.int32), put(count, jnp.int32), put(bool(drain)),
                    put(dt, queue.dtype), put(span.cap, jnp.int32), None if regions is None else jax.device_put(regions, dev),
                    spec, then)


def make_spec(dynamics, solver, span: Span, stop: Stop, execution: Execution, backend: str, n: int, d: int,
              dtype) -> _Spec:
    """The static description of the pool calls of one run (states ``(n, d)`` of `dtype`)."""
    ctrl = _adaptive.Controller.of(solver) if isinstance(solver, Adaptive) else None
    if ctrl is not None and stop.tol is None:
        raise ValueError("the adaptive solver stops a member at steady state: it needs a tol")
    group = default_group(solver) if execution.group is None else int(execution.group)
    # a stack of different layers runs exactly its layers: a small change in one layer is no fixed point of the next
    stack = getattr(dynamics, "num_layers", None) is not None and not dynamics.same_layers()
    return _Spec(None if stack else stop.tol, group, isinstance(dynamics, AbstractFlow), backend, ctrl,
                 pool_tile(dynamics, solver, backend, n, d, dtype))


def _looped_stages(dyn, solver, n: int, d: int, dtype) -> int:
    """The number of stages when the pool's lanes step is a loop over stages around one copy of the model's unrolled
    vector field (the adaptive pair: its tableau's; RK4: four), or 0 when the whole step is unrolled instead (maps,
    Euler, or a vector field that does not unroll on its own)."""
    if not isinstance(dyn, AbstractFlow):
        return 0
    stages = len(solver.solver.tableau.b_sol) if isinstance(solver, Adaptive) else 4 if type(solver) is RK4 else 0
    if stages:
        try:
            backends.lane_function("vf", dyn, n, d, dtype)
            backends.lane_function("project", dyn, n, d, dtype)
        except backends.Unsupported:
            return 0
    return stages


def lanes_cost(dyn, solver, dt, n: int, d: int, dtype) -> int:
    """The size of the lanes step a pool compiles, in scalar operations per step (its working set, in lane vectors):
    for a loop over stages, the vector field's plus a state and a vector field per stage; else the unrolled step's."""
    stages = _looped_stages(dyn, solver, n, d, dtype)
    if stages:
        return backends.lane_function("vf", dyn, n, d, dtype).cost + 8 * n * d * stages
    return backends.lane_program(dyn, solver, dt, n, d, dtype).cost


def _rk4_stage_loop(dyn, solver, dt, n: int, d: int, P: int, dtype):
    """RK4 on lanes for an autonomous flow, as a loop over its four stages around one copy of the unrolled vector
    field (the stages unrolled hold four copies: several times the compile time); the arithmetic of
    :meth:`~attnflow.RK4.step`, in its order. None when :func:`_looped_stages` says the whole step is unrolled.
    The vector field is the unrolled one (:meth:`LaneProgram.step`), not the batch-last one the other lanes programs
    use: in this loop it ran a 2 x 10^4-member study of the benchmarks' sphere flow in 4.0-4.1 s warm against 4.9 s
    (and the stages written out batch-last, 4.7 s), for 0.3-0.7 s more compile (2-core CPU, float32, 256 slots)."""
    if type(solver) is not RK4 or not _looped_stages(dyn, solver, n, d, dtype):
        return None
    ops = _adaptive.lane_ops(dyn, n, d, P, dtype, unrolled=True)
    half, whole = jnp.asarray(0.5, dtype) * dt, jnp.asarray(1.0, dtype) * dt
    shifts = jnp.stack([jnp.zeros((), dtype), half, half, whole])  # stage i evaluates f at X + shifts[i] k_(i-1)
    weights = jnp.asarray([1.0, 2.0, 2.0, 1.0], dtype)

    def step(X, k):
        def stage(i, c):
            acc, prev = c
            ki = ops.f(None, X + shifts[i] * prev)
            return acc + weights[i] * ki, ki

        zero = jnp.zeros_like(X)
        acc, _ = jax.lax.fori_loop(0, 4, stage, (zero, zero))
        return ops.project(X + (dt / 6) * acc)

    return step


def _group_runner(dyn, solver, dt, cap, regions, spec: _Spec, n: int, d: int, P: int, dtype):
    """``run(X, outcome, steps, t, h, tag) -> (X, outcome, steps, t, h, tag)``: `spec.group` steps of every member
    that still runs (the others are frozen), on ``(d n, P)`` rows: in tiles of ``spec.tile`` members on the lanes
    and xla backends (:func:`pool_tile`, :func:`_tiled`), in the fused kernel's own tiles on the fused one."""
    if not spec.tile:
        return _tile_runner(dyn, solver, dt, cap, regions, spec, n, d, P, dtype)
    return _tiled(_tile_runner(dyn, solver, dt, cap, regions, spec, n, d, spec.tile, dtype), P, spec.tile)


def _tiled(run, P: int, W: int):
    """`run` (on ``(d n, W)`` rows) over ``(d n, P)`` rows as a loop over tiles of W slots, the last one padded with
    frozen copies of slot 0 (:func:`~attnflow._device.tile_loop`)."""
    nt = -(-P // W)
    Pp = nt * W

    def pad(a, fill):
        if Pp == P:
            return a
        extra = jnp.broadcast_to(a[..., :1] if fill is None else jnp.asarray(fill, a.dtype), a.shape[:-1] + (Pp - P,))
        return jnp.concatenate([a, extra], axis=-1)

    def tiled(X, st, ns, t, h, tag):
        c = (pad(X, None), pad(st, CONVERGED), pad(ns, 0), pad(t, 0), pad(h, 0), pad(tag, -1))

        def body(i, c):
            out = run(*[jax.lax.dynamic_slice_in_dim(a, i * W, W, axis=a.ndim - 1) for a in c])
            return tuple(jax.lax.dynamic_update_slice_in_dim(a, o.astype(a.dtype), i * W, axis=a.ndim - 1)
                         for a, o in zip(c, out))

        c = tile_loop(body, nt, c)
        return tuple(a[..., :P] for a in c)

    return tiled


def _tile_runner(dyn, solver, dt, cap, regions, spec: _Spec, n: int, d: int, P: int, dtype):
    """:func:`_group_runner` on one tile of P slots."""
    scale = dt if spec.continuous else None
    if spec.adaptive is not None:
        return functools.partial(_adaptive.run_group, dyn, spec.adaptive, spec.tol, cap, regions, spec.group, n, d,
                                 lanes=spec.backend == "lanes")
    if spec.backend == "fused":
        from .backends.fused import fused_group

        return functools.partial(fused_group, dyn, solver, dt, cap, regions, spec, n, d)
    if spec.backend == "lanes":
        step = _rk4_stage_loop(dyn, solver, dt, n, d, P, dtype)
        if step is None:
            prog = backends.lane_program(dyn, solver, dt, n, d, dtype)
            flats = prog.prepare((dyn, solver, dt))
            step = lambda X, k: prog.step_array(flats, k, X)  # noqa: E731
    else:

        def step(X, k):
            Xm = jnp.transpose(X.reshape(d, n, P), (2, 1, 0))
            Y = jax.vmap(lambda x, kk: one_step((dyn, solver, dt), kk, x))(Xm, k)
            return jnp.transpose(Y, (2, 1, 0)).reshape(d * n, P)

    check = None if regions is None else (lambda Y: test_rows(regions, Y, n, d))

    def run(X, st, ns, t, h, tag):
        def one(_, c):
            X, st, ns, tag = c
            out = machine.advance((X, ns, st, ns, tag), step, spec.tol, scale, cap, check, chain=spec.backend == "lanes")
            return out[0], out[2], out[3], (tag if check is None else out[4])

        X, st, ns, tag = jax.lax.fori_loop(0, spec.group, one, (X, st, ns, tag))
        return X, st, ns, t, h, tag

    return run


def _advance_impl(dyn, solver, pool: Pool, queue, qidx, count, drain, dt, cap, regions, spec: _Spec, then):
    M, n, d = queue.shape
    D, P = pool.x.shape
    R = M + P
    Q = jnp.transpose(queue, (2, 1, 0)).reshape(D, M)
    run = _group_runner(dyn, solver, dt, cap, regions, spec, n, d, P, queue.dtype)

    def retire(c):
        (x, idx, st, ns, t, h, tg), head, (ox, oi, os_, on, ot, og), nout = c
        occ = idx >= 0
        done = occ & ((st != NOT_CONVERGED) | (ns >= cap))
        pos = jnp.where(done, nout + jnp.cumsum(done, dtype=jnp.int32) - 1, R)  # R: out of bounds, dropped
        ox, oi = ox.at[:, pos].set(x, mode="drop"), oi.at[pos].set(idx, mode="drop")
        os_, on = os_.at[pos].set(st, mode="drop"), on.at[pos].set(ns, mode="drop")
        ot = ot.at[pos].set(t if spec.adaptive is not None else ns.astype(t.dtype) * dt, mode="drop")
        og = og.at[pos].set(tg, mode="drop")
        want = done | ~occ
        q = head + jnp.cumsum(want, dtype=jnp.int32) - 1
        take = want & (q < count)
        qc = jnp.clip(q, 0, M - 1)
        x = jnp.where(take[None], Q[:, qc], x)
        idx = jnp.where(take, qidx[qc], jnp.where(want, -1, idx))
        st = jnp.where(take, NOT_CONVERGED, jnp.where(want, CONVERGED, st))
        ns = jnp.where(take, 0, ns)
        t = jnp.where(take, 0.0, t)
        h = jnp.where(take, 0.0, h)  # a new member takes its first step size in its first attempt
        tg = jnp.where(want, -1, tg)
        return ((x, idx, st, ns, t, h, tg), head + jnp.sum(take, dtype=jnp.int32), (ox, oi, os_, on, ot, og),
                nout + jnp.sum(done, dtype=jnp.int32))

    def body(c):
        (x, idx, st, ns, t, h, tg), head, out, nout = retire(c)
        x, st, ns, t, h, tg = run(x, st, ns, t, h, tg)
        return (x, idx, st, ns, t, h, tg), head, out, nout

    cond = lambda c: (c[1] < count) | (drain & jnp.any(c[0][1] >= 0))  # noqa: E731
    zero = jnp.zeros((), jnp.int32)
    out = (jnp.zeros((D, R), queue.dtype), jnp.full((R,), -1, jnp.int32), jnp.zeros((R,), jnp.int32), jnp.zeros((R,), jnp.int32),
           jnp.zeros((R,), queue.dtype), jnp.full((R,), -1, jnp.int32))
    c = ((pool.x, pool.index, pool.outcome, pool.steps, pool.t, pool.h, pool.tag), zero, out, zero)
    c = retire(jax.lax.while_loop(cond, body, c))
    slots, _, (ox, oi, os_, on, ot, og), nout = c
    final = jnp.transpose(ox.reshape(d, n, R), (2, 1, 0))
    os_ = mark_degenerate(dyn, final, os_)
    extra = None
    if then is not None:
        shown, oc = final, os_
        if regions is not None:  # a certified member is labelled by its region's equilibrium
            cert = (os_ == CERTIFIED) & (og >= 0)
            shown = jnp.where(cert[:, None, None], equilibria(regions, og, n).astype(final.dtype), final)
            oc = jnp.where(cert, CONVERGED, os_).astype(os_.dtype)
        extra = then(shown, oc)
    return Pool(*slots), Retired(oi, final, os_, on, ot, og, nout, extra)


def _advance_structure(dyn, solver, pool, queue, qidx, count, drain, dt, cap, regions, spec, then):
    """The pytree structure of ``_advance_impl``'s result, without tracing it (`then` only, on one state)."""
    n, d = queue.shape[1:]
    extra = None if then is None else jax.eval_shape(
        then, jax.ShapeDtypeStruct((1, n, d), queue.dtype), jax.ShapeDtypeStruct((1,), jnp.int32))
    return jax.tree.structure((pool, Retired(0, 0, 0, 0, 0, 0, 0, extra)))


_advance = ExportedProgram(_advance_impl, "attnflow.evolve.pool._advance", _advance_structure)
"""``_advance_impl`` compiled once per model structure and shapes, through :mod:`jax.export` (a new process with
attnflow's disk cache on loads the export instead of tracing and lowering it: :mod:`attnflow._cache`), dispatched
asynchronously (``eqx.filter_jit`` waits for its results, which would keep the host from labelling one call's members
while the next call runs)."""


# ------------------------------------------------------------------------------------------- the host driver


def stream_members(dynamics, stream: Iterator, *, budget: Budget, stop: Stop, solver=None, execution: Execution,
                   pool_size: int, queue_size: int, then: Callable | None, sink: Callable, drain: Callable | None = None,
                   regions: Regions | None = None, workers=None) -> None:
    """Run every member of a sample stream through one pool per local device (``execution.local_devices()``), or
    with `workers` (the :class:`attnflow.evolve.workers.Stream` of :func:`begin_workers`) one pool per worker
    process.

    `stream` yields ``(indices, states)`` blocks of at most `queue_size` members (or ``(None, None)``: a drain
    request, after which `drain()` is called once every member is retired). Each block is split into contiguous
    shares, one per device; every device runs its own compiled call on its share (same program, dispatched
    asynchronously, no collective), and the host hands the previous calls' members to
    ``sink(index, outcome, steps, final, extra, tag)`` while the next calls run. `execution.backend` must be resolved
    (not ``"auto"``), so that every device takes the same path.
    """
    devices = execution.pool_devices() if workers is None else [None] * workers.count
    ndev = len(devices)
    # Several CPU devices of one client share its threads: their programs run one at a time (running them at once,
    # each waiting on the same thread pool, was seen to deadlock); accelerators, clients of their own
    # (execution.cores) and worker processes run theirs concurrently.
    serial = workers is None and ndev > 1 and devices[0].platform == "cpu" and len({id(v.client) for v in devices}) < ndev
    if workers is None:  # the model's arrays on each pool's device (they may be committed elsewhere: another client)
        dyns = [on_device(dynamics, dev) for dev in devices]
        thens = [on_device(then, dev) for dev in devices]
    else:
        dyns, thens = [dynamics] * ndev, [then] * ndev
    share, size = _shares(queue_size, pool_size, ndev)
    pools: list[Pool | None] = [None] * ndev
    pending: list = []
    blank = None

    def hand(outs):
        for j, out in outs:
            args = workers.result(j, out) if workers is not None else out.sink_args()
            if len(args[0]):
                sink(*args)

    def call(j, q, qi, count, drain_):
        """Pool call `j` (dispatched: a Retired, or a worker's future)."""
        if workers is not None:
            return j, workers.block(j, q, qi, count, drain_, regions)
        pools[j], out = advance_pool(dyns[j], pools[j], q, qi, count, budget=budget, stop=stop, solver=solver,
                                     execution=execution, drain=drain_, then=thens[j], regions=regions)
        if serial:
            out.count.block_until_ready()
        return j, out

    def empty_all():
        nonlocal pending
        outs = [call(j, blank[0], blank[1], 0, True) for j in range(ndev)]
        hand(pending)
        hand(outs)
        pending = []

    for ii, xx in stream:
        if ii is None:
            if blank is not None:
                empty_all()
            if drain is not None:
                drain()
            continue
        if len(ii) and int(ii[-1]) >= 2**31 - 1:
            raise ValueError("a study numbers samples with int32: at most 2^31 - 1 samples")
        if blank is None:
            blank = _blank(share, xx.shape[1], xx.shape[2], xx.dtype)
            if workers is None:
                pools = [empty_pool(size, xx.shape[1], xx.shape[2], xx.dtype, dev) for dev in devices]
        outs = []
        for j in range(ndev):
            lo, hi = min(j * share, len(ii)), min((j + 1) * share, len(ii))
            q, qi = blank[0].copy(), blank[1].copy()
            q[: hi - lo], qi[: hi - lo] = xx[lo:hi], ii[lo:hi]
            outs.append(call(j, q, qi, hi - lo, False))
        hand(pending)  # the host takes the previous calls' members while these calls run
        pending = outs
    if blank is not None:
        empty_all()


def _shares(queue_size: int, pool_size: int, ndev: int) -> tuple[int, int]:
    """``(share, size)``: the queue entries and the pool slots of each device in :func:`stream_members`."""
    share = -(-queue_size // ndev)
    return share, max(1, min(pool_size, share))


def _blank(share: int, n: int, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((share, n, d), dtype), np.full(share, -1, np.int32)


def begin_workers(workers, dynamics, n: int, d: int, dtype, *, budget: Budget, stop: Stop, solver=None,
                  execution: Execution, pool_size: int, queue_size: int, then: Callable | None,
                  regions: Regions | None = None):
    """Begin a stream of :func:`stream_members` on `workers` (:class:`attnflow.evolve.workers.Workers`): each makes
    its pool and compiles its program (`regions` may hold other radii of the same shapes), while the caller goes on.
    Returns the :class:`~attnflow.evolve.workers.Stream` to pass to :func:`stream_members`."""
    share, size = _shares(queue_size, pool_size, workers.count)
    ctx = dict(dyn=dynamics, n=n, d=d, dtype=np.dtype(dtype), share=share, pool_size=size, budget=budget, stop=stop,
               solver=solver, execution=execution, then=then)
    return workers.begin(ctx, regions)


def prepare_members(dynamics, n: int, d: int, dtype, *, budget: Budget, stop: Stop, solver=None, execution: Execution,
                    pool_size: int, queue_size: int, then: Callable | None, regions: Regions | None = None) -> None:
    """Compile the pool program of :func:`stream_members` with these arguments (the same shapes, and the same `then`:
    it is part of the program) on every device, by a call on an empty queue, which runs nothing (`regions` may hold
    other radii of the same shapes: the radii are data). Meant for a background thread while the caller computes
    what the stream needs (certificates): XLA compiles without holding the GIL."""
    devices = execution.pool_devices()
    share, size = _shares(queue_size, pool_size, len(devices))

    def one(dev):
        dyn, th = on_device(dynamics, dev), on_device(then, dev)
        compile_pool_call(dyn, empty_pool(size, n, d, dtype, dev), share, n, d, budget=budget, stop=stop,
                          solver=solver, execution=execution, then=th, regions=regions)

    if len(devices) > 1 and execution.cores:
        # clients of their own compile the program each: with JAX's persistent cache on, the first compiles and
        # stores it, and the others load it from there; without it, they compile at once (without the GIL)
        if jax.config.jax_compilation_cache_dir:
            one(devices[0])
            devices = devices[1:]
        with cf.ThreadPoolExecutor(len(devices)) as ex:
            list(ex.map(one, devices))
    else:
        for dev in devices:
            one(dev)


def compile_pool_call(dynamics, pool: Pool, share: int, n: int, d: int, **kw) -> None:
    """Compile the :func:`advance_pool` call of `pool` on queues of `share` states ``(n, d)`` (keywords: those of
    the call) by a call on an empty queue, which runs nothing; returns once it is compiled."""
    q, qi = _blank(share, n, d, pool.x.dtype)
    _, out = advance_pool(dynamics, pool, q, qi, 0, **kw)
    out.count.block_until_ready()
