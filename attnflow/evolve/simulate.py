"""simulate(dynamics, x0, ...) -> Solution: the one place where time loops, early stopping,
chunking and sharding live.

The loop is written for one configuration X (n, d) and lifted to a batch with ``vmap``; a parameter
sweep is one more ``vmap``. Under ``vmap`` a ``while_loop`` runs until every member has stopped, and
stopped members are frozen, so early stopping needs no batch logic of its own. Chunks are fed to the
same compiled function (the last chunk is padded), so memory is bounded by the chunk and nothing
recompiles between chunks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Batch, Float, Int
from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap
from .solvers import RK4, AbstractSolver, Adaptive, Iterate

from . import backends
from ._plan import Plan
from .backends import BACKENDS, one_step, resolve_backend
from .status import (
    CONVERGED as CONVERGED,
    DEGENERATE as DEGENERATE,
    DEGENERATE_TOL,
    MAX_STEPS as MAX_STEPS,
    NONFINITE as NONFINITE,
    SOLVER_FAILED as SOLVER_FAILED,
    STATUS_NAMES as STATUS_NAMES,
    Status as Status,
    status_counts,
)

_TRACES = 0


def trace_count() -> int:
    """How many times the simulation kernel has been traced (compiled) in this process."""
    return _TRACES


class Solution(eqx.Module):
    """The result of :func:`simulate`. Arrays live on the device, or on the host (NumPy) when the run
    was chunked.

    - `final`: ``(b, n, d)`` final states (``(p, b, n, d)`` for a sweep over p values).
    - `trajectory`: ``(s, b, n, d)`` saved states including the initial one, or None.
    - `ts`: ``(s,)`` the saved step indices (maps) or times (flows), or None.
    - `status`: ``(b,)`` int codes of :class:`Status` (names: :data:`STATUS_NAMES`).
    - `steps`: ``(b,)`` steps taken by each member.
    - `backend`: the backend that computed it (``"xla"``, ``"lanes"`` or ``"fused"``).
    """

    final: Batch
    trajectory: Float[Array, "s b n d"] | None
    ts: Float[Array, " s"] | None
    status: Int[Array, " b"]
    steps: Int[Array, " b"]
    backend: str = eqx.field(static=True, default="xla")

    def status_counts(self) -> dict[str, int]:
        """Number of members per status name (see :class:`Status`)."""
        return status_counts(self.status)


def _fixed_one(dyn, solver, x0, dt, plan: Plan):
    """Evolve one configuration with a fixed-step solver."""

    def advance(X, k, status):
        Xn = one_step((dyn, solver, dt), k, X)
        finite = jnp.all(jnp.isfinite(Xn))
        status = jnp.where(finite, status, NONFINITE)
        if plan.tol is not None:
            change = jnp.max(jnp.abs(Xn - X))
            if plan.continuous:
                change = change / dt
            status = jnp.where(finite & (change < plan.tol), CONVERGED, status)
        return jnp.where(finite, Xn, X), status

    if plan.tol is None:

        def body(c, _):
            X, k, st, n = c
            Xn, stn = advance(X, k, st)
            run = st == MAX_STEPS
            return (jnp.where(run, Xn, X), k + 1, jnp.where(run, stn, st), n + run), None

        def segment(c, s):
            c, _ = jax.lax.scan(body, c, None, length=plan.seg_len, unroll=plan.unroll)
            return c, (c[0] if plan.save else None)

    else:

        def segment(c, s):
            end = (s + 1) * plan.seg_len

            def body(c):
                X, k, st, n = c
                Xn, st = advance(X, k, st)
                return Xn, k + 1, st, n + 1

            c = jax.lax.while_loop(lambda c: (c[1] < end) & (c[2] == MAX_STEPS), body, c)
            return c, (c[0] if plan.save else None)

    zero = jnp.zeros((), jnp.int32)
    c0 = (x0, zero, jnp.asarray(MAX_STEPS, jnp.int32), zero)
    (X, _, status, n), saved = jax.lax.scan(segment, c0, jnp.arange(plan.n_seg))
    traj = jnp.concatenate([x0[None], saved]) if plan.save else None
    return X, traj, status, n


def _adaptive_one(dyn, solver: Adaptive, x0, dt_save, plan: Plan):
    """Evolve one configuration with an adaptive diffrax solve, saving every ``dt_save``."""
    term = diffrax.ODETerm(lambda t, y, args: dyn.vf(t, y))
    ts = jnp.arange(plan.n_seg + 1, dtype=x0.dtype) * dt_save
    event = None
    if plan.tol is not None:
        cond = diffrax.steady_state_event(rtol=0.0, atol=plan.tol, norm=lambda v: jnp.max(jnp.abs(v)))
        event = diffrax.Event(cond)
    sol = diffrax.diffeqsolve(
        term,
        solver.solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=solver.dt0,
        y0=x0,
        saveat=diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts), diffrax.SubSaveAt(t1=True)]),
        stepsize_controller=diffrax.PIDController(rtol=solver.rtol, atol=solver.atol),
        max_steps=solver.max_steps,
        event=event,
        throw=False,
    )
    saved, final = sol.ys[0], sol.ys[1][-1]
    finite = jnp.all(jnp.isfinite(final))
    status = jnp.where(
        sol.result == diffrax.RESULTS.event_occurred,
        CONVERGED,
        jnp.where(sol.result == diffrax.RESULTS.successful, MAX_STEPS, SOLVER_FAILED),
    )
    status = jnp.where(finite, status, NONFINITE).astype(jnp.int32)
    final = dyn.project(jnp.where(finite, final, x0))
    traj = None
    if plan.save:
        ok = jnp.all(jnp.isfinite(saved), axis=(1, 2))[:, None, None]
        traj = jax.vmap(dyn.project)(jnp.where(ok, saved, final))
    return final, traj, status, sol.stats["num_steps"].astype(jnp.int32)


def _run_impl(dyn, solver, x0, dt, sweep, plan: Plan):
    global _TRACES
    _TRACES += 1
    if plan.backend == "lanes":
        from .backends.lanes import lanes_run

        out = lanes_run(dyn, solver, x0, dt, plan)
    elif plan.backend == "fused":
        from .backends.fused import fused_run

        out = fused_run(dyn, solver, x0, dt, plan)
    else:
        one = _adaptive_one if plan.adaptive else _fixed_one

        def batch(d):
            return jax.vmap(lambda x: one(d, solver, x, dt, plan))(x0)

        out = batch(dyn) if sweep is None else jax.vmap(lambda vals: batch(dyn.with_params(**vals)))(sweep)
    return _mark_degenerate(dyn, *out)


def _mark_degenerate(dyn, final, traj, status, steps):
    """Status ``degenerate`` for members whose final state is finite but off the state space (every backend)."""
    resid = jnp.vectorize(dyn.state_residual, signature="(n,d)->()")(final)
    off = (resid > DEGENERATE_TOL) & ((status == CONVERGED) | (status == MAX_STEPS))
    return final, traj, jnp.where(off, DEGENERATE, status).astype(status.dtype), steps


_run = eqx.filter_jit(_run_impl)


def _make_plan(dyn, x0, steps, t1, dt, solver, saves, tol, unroll):
    if not isinstance(dyn, AbstractDynamics):
        raise TypeError(f"dynamics must be an attnflow model (SphereFlow, LayerMap, ...), got {type(dyn).__name__}")
    if tol is not None and not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if isinstance(dyn, AbstractMap):
        solver = Iterate() if solver is None else solver
        solver.check(dyn)
        if steps is None:
            if dyn.num_layers is None:
                raise ValueError("a discrete simulation needs steps=")
            steps = dyn.num_layers
        if dyn.num_layers is not None and steps > dyn.num_layers:
            raise ValueError(f"steps={steps} exceeds the {dyn.num_layers} layers of the stack")
        dt = 1.0
    elif isinstance(dyn, AbstractFlow):
        solver = RK4() if solver is None else solver
        solver.check(dyn)
        if t1 is None or not (t1 > 0):
            raise ValueError(f"a continuous simulation needs t1 > 0, got {t1}")
        if isinstance(solver, Adaptive):
            steps = saves if saves is not None else 1
            dt = t1 / steps
        else:
            if dt is None or not (dt > 0):
                raise ValueError(f"a fixed-step continuous simulation needs dt > 0, got {dt}")
            steps = int(round(t1 / dt))
            if steps < 1 or abs(steps * dt - t1) > 1e-9 * max(1.0, t1):
                raise ValueError(f"t1={t1} must be a whole number of steps dt={dt}")
    else:  # pragma: no cover - AbstractDynamics has only these two families
        raise TypeError(type(dyn).__name__)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    adaptive = isinstance(solver, Adaptive)
    if saves is None or adaptive:
        n_seg = saves if (adaptive and saves) else 1
        seg_len = 1 if adaptive else int(steps)
    else:
        if saves < 1 or steps % saves:
            raise ValueError(f"saves={saves} must divide the number of steps {steps}")
        n_seg, seg_len = int(saves), int(steps) // int(saves)
    plan = Plan(
        n_seg=int(n_seg),
        seg_len=int(seg_len),
        save=saves is not None,
        tol=None if tol is None else float(tol),
        continuous=isinstance(dyn, AbstractFlow),
        adaptive=adaptive,
        unroll=int(unroll),
    )
    return plan, solver, dt


def _check_x0(dyn, x0):
    x0 = jnp.asarray(x0) if not isinstance(x0, np.ndarray) else x0
    if x0.ndim != 3:
        raise ValueError(f"x0 must have shape (batch, tokens, d), got {tuple(x0.shape)}")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be floating point, got {x0.dtype}")
    return x0


def simulate_chunks(
    dynamics: AbstractDynamics,
    x0: Batch,
    *,
    steps: int | None = None,
    t1: float | None = None,
    dt: float | None = None,
    solver: AbstractSolver | Adaptive | None = None,
    saves: int | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
    shard: bool | None = None,
    sweep: dict | None = None,
    unroll: int = 1,
    backend: str = "auto",
) -> Iterator[tuple[int, int, tuple]]:
    """Yield ``(start, stop, (final, trajectory, status, steps))`` chunk by chunk, batch axis first.

    The arrays of each chunk are NumPy (on the host). Arguments as in :func:`simulate`; the backend used is
    :func:`chunk_backend` of the same arguments.
    """
    x0, plan, solver, dt, C = _prepare(dynamics, x0, steps, t1, dt, solver, saves, tol, unroll, chunk_size, shard, sweep, backend)
    B, ndev = x0.shape[0], plan.shards
    sharding = None
    if ndev > 1:
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    dt_arr = jnp.asarray(dt, dtype=x0.dtype)
    sweep_arrs = None if sweep is None else {k: jnp.asarray(v, dtype=x0.dtype) for k, v in sweep.items()}
    for start in range(0, B, C):
        stop = min(start + C, B)
        xb = x0[start:stop]
        if stop - start < C:  # pad with valid states so nothing recompiles and nothing goes non-finite
            pad = np.broadcast_to(np.asarray(xb[:1]), (C - (stop - start),) + tuple(xb.shape[1:]))
            xb = np.concatenate([np.asarray(xb), pad])
        xb = jax.device_put(xb, sharding) if sharding is not None else jnp.asarray(xb)
        out = _run(dynamics, solver, xb, dt_arr, sweep_arrs, plan)
        ax = 0 if sweep is None else 1
        out = jax.tree.map(lambda a: np.asarray(a).take(np.arange(stop - start), axis=ax), out)
        yield start, stop, out


def _prepare(dynamics, x0, steps, t1, dt, solver, saves, tol, unroll, chunk_size, shard, sweep, backend):
    """Checked inputs, the plan (with its resolved backend), solver, dt and the chunk size."""
    x0 = _check_x0(dynamics, x0)
    plan, solver, dt = _make_plan(dynamics, x0, steps, t1, dt, solver, saves, tol, unroll)
    B = x0.shape[0]
    ndev = jax.local_device_count() if (shard is None or shard) else 1
    C = B if chunk_size is None else min(int(chunk_size), B)
    if C < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    C = math.ceil(C / ndev) * ndev
    shape = (C // ndev,) + tuple(x0.shape[1:])  # what one device runs per call
    resolved = resolve_backend(backend, dynamics, solver, plan, shape, x0.dtype, sweep=sweep is not None)
    return x0, dataclasses.replace(plan, shards=ndev, backend=resolved), solver, dt, C


def chunk_backend(dynamics: AbstractDynamics, x0, **kwargs) -> str:
    """The backend :func:`simulate` would use for these arguments (``backend="auto"`` resolved; see
    :func:`attnflow.evolve.backends.choose_backend`). A pure function of the model, shapes, solver and platform."""
    kw = {k: kwargs.get(k) for k in ("steps", "t1", "dt", "solver", "saves", "tol", "chunk_size", "shard")}
    plan = _prepare(dynamics, x0, **kw, unroll=kwargs.get("unroll", 1), sweep=kwargs.get("sweep"), backend=kwargs.get("backend", "auto"))[1]
    return plan.backend


def _gather(chunks, ax, bar):
    """Concatenate the host arrays of :func:`simulate_chunks` along the batch axis ``ax``."""
    parts = []
    for start, stop, out in chunks:
        parts.append(out)
        if bar is not None:
            bar.update(stop - start)
    return tuple(None if parts[0][i] is None else np.concatenate([p[i] for p in parts], axis=ax) for i in range(4))


def _saved_ts(plan: Plan, dt) -> np.ndarray:
    return np.arange(plan.n_seg + 1) * plan.seg_len * float(dt)


def simulate(
    dynamics: AbstractDynamics,
    x0: Batch,
    *,
    steps: int | None = None,
    t1: float | None = None,
    dt: float | None = None,
    solver: AbstractSolver | Adaptive | None = None,
    saves: int | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
    shard: bool | None = None,
    progress: bool = False,
    unroll: int = 1,
    backend: str = "auto",
    _sweep: dict | None = None,
) -> Solution:
    """Evolve a batch of configurations under ``dynamics``.

    **Arguments:**

    - `dynamics`: a map (:class:`LayerMap`, :class:`LayerStack`) or a flow (:class:`SphereFlow`, :class:`FlatFlow`).
    - `x0`: ``(b, n, d)`` initial states (see :mod:`attnflow.evolve.sample`).
    - `steps`: number of map iterations (a stack defaults to its layer count).
    - `t1`, `dt`: final time and fixed step of a flow (``dt`` unused by :class:`Adaptive`).
    - `solver`: :class:`Iterate` for maps (default); :class:`RK4` (default), :class:`Euler` or
      :class:`Adaptive` for flows.
    - `saves`: save the trajectory at this many equally spaced points after the start (it must divide
      the step count of fixed-step solvers); None keeps only the final state.
    - `tol`: stop a member once its per-step change (max abs; divided by dt for flows) is below tol.
    - `chunk_size`: run the batch in chunks of this size; results are gathered on the host.
    - `shard`: split each chunk across all local devices (default: when there is more than one).
    - `progress`: show a progress bar with samples/s and ETA (chunked runs).
    - `unroll`: scan unroll factor of the fixed-step loop.
    - `backend`: how the batch is executed (:mod:`attnflow.evolve.backends`): ``"xla"`` (vmapped; any model,
      solver and sweep), ``"lanes"`` (the model's step unrolled into batch-wide lanes over cache-sized tiles;
      fast on CPU for small n and d), ``"fused"`` (the same in one Pallas kernel, for GPUs; not yet timed on
      one), or ``"auto"`` (default): a pure function of the model, shapes, solver and platform
      (:func:`~attnflow.evolve.backends.choose_backend`). The one used is ``Solution.backend``.

    **Returns:** a :class:`Solution`; failures are per-member status codes (:class:`Status`), never exceptions.
    """
    x0, plan, solver_, dt_used, _ = _prepare(dynamics, x0, steps, t1, dt, solver, saves, tol, unroll, chunk_size, shard, _sweep, backend)
    B = x0.shape[0]
    kw = dict(steps=steps, t1=t1, dt=dt, solver=solver, saves=saves, tol=tol, shard=shard, sweep=_sweep, unroll=unroll, backend=plan.backend)
    ax = 0 if _sweep is None else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=B, unit="samples", desc="simulate", smoothing=0.1)
    if (chunk_size is None or chunk_size >= B) and jax.local_device_count() == 1:
        sweep_arrs = None if _sweep is None else {k: jnp.asarray(v, dtype=x0.dtype) for k, v in _sweep.items()}
        final, traj, status, nsteps = _run(dynamics, solver_, jnp.asarray(x0), jnp.asarray(dt_used, x0.dtype), sweep_arrs, plan)
        if bar is not None:
            bar.update(B)
    else:
        final, traj, status, nsteps = _gather(simulate_chunks(dynamics, x0, chunk_size=chunk_size, **kw), ax, bar)
    if bar is not None:
        bar.close()
    if traj is not None:  # (.., b, s, n, d) -> (.., s, b, n, d)
        traj = jnp.moveaxis(traj, ax + 1, ax) if isinstance(traj, jax.Array) else np.moveaxis(traj, ax + 1, ax)
    ts = _saved_ts(plan, dt_used) if plan.save else None
    return Solution(final=final, trajectory=traj, ts=ts, status=status, steps=nsteps, backend=plan.backend)


def sweep(
    dynamics: AbstractDynamics,
    x0: Batch,
    *,
    beta: Float[Array, " p"] | None = None,
    alpha: Float[Array, " p"] | None = None,
    **kwargs,
) -> Solution:
    """:func:`simulate` for p parameter values at once, inside one compiled call.

    `beta` and/or `alpha` are arrays of length p (both given: paired element-wise). Every field of
    the returned :class:`Solution` gains a leading axis p (the trajectory is ``(p, s, b, n, d)``).
    New values of the same length reuse the compiled kernel.
    """
    vals = {}
    if beta is not None:
        vals["beta"] = np.atleast_1d(np.asarray(beta, dtype=float))
    if alpha is not None:
        vals["alpha"] = np.atleast_1d(np.asarray(alpha, dtype=float))
    if not vals:
        raise ValueError("sweep needs beta= and/or alpha=")
    lens = {len(v) for v in vals.values()}
    if len(lens) != 1:
        raise ValueError(f"beta and alpha must have the same length, got {[len(v) for v in vals.values()]}")
    for name, v in vals.items():
        if not np.all(np.isfinite(v) & (v > 0)):
            raise ValueError(f"every {name} must be a finite number > 0, got {v.tolist()}")
    return simulate(dynamics, x0, _sweep=vals, **kwargs)
