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
import functools
import math
from collections.abc import Iterator

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Batch, Float, Int
from ..model.dynamics import AbstractDynamics, AbstractFlow, SphereFlow
from .solvers import RK4, AbstractSolver, Adaptive, Iterate

from ._plan import Plan
from .backends import one_step, resolve_backend
from .options import Budget, Execution, Stop, check_tol, options
from .outcome import (
    CONVERGED,
    DEGENERATE_TOL,
    NONFINITE,
    NOT_CONVERGED,
    SOLVER_FAILED,
    mark_degenerate,
    outcome_counts,
)


class Solution(eqx.Module):
    """The result of :func:`simulate`. Arrays live on the device, or on the host (NumPy) when the run
    was chunked.

    - `final`: ``(b, n, d)`` final states (``(p, b, n, d)`` for a sweep over p values).
    - `trajectory`: ``(s, b, n, d)`` saved states including the initial one, or None.
    - `ts`: ``(s,)`` the saved step indices (maps) or times (flows), or None.
    - `outcome`: ``(b,)`` int codes of :class:`~attnflow.Outcome` (names: :data:`~attnflow.OUTCOMES`).
    - `steps`: ``(b,)`` steps taken by each member.
    - `backend`: the backend that computed it (``"xla"``, ``"lanes"`` or ``"fused"``).
    """

    final: Batch
    trajectory: Float[Array, "s b n d"] | None
    ts: Float[Array, " s"] | None
    outcome: Int[Array, " b"]
    steps: Int[Array, " b"]
    backend: str = eqx.field(static=True, default="xla")

    def outcome_counts(self) -> dict[str, int]:
        """Number of members per outcome name (see :class:`~attnflow.Outcome`)."""
        return outcome_counts(self.outcome)


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
            run = st == NOT_CONVERGED
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

            c = jax.lax.while_loop(lambda c: (c[1] < end) & (c[2] == NOT_CONVERGED), body, c)
            return c, (c[0] if plan.save else None)

    zero = jnp.zeros((), jnp.int32)
    c0 = (x0, zero, jnp.asarray(NOT_CONVERGED, jnp.int32), zero)
    (X, _, status, n), saved = jax.lax.scan(segment, c0, jnp.arange(plan.n_seg))
    traj = jnp.concatenate([x0[None], saved]) if plan.save else None
    return X, traj, status, n


def _adaptive_one(dyn, solver: Adaptive, x0, dt_save, plan: Plan):
    """Evolve one configuration with an adaptive diffrax solve, saving every ``dt_save``."""
    term = diffrax.ODETerm(lambda t, y, args: dyn.vf(t, y))
    ts = jnp.arange(plan.n_seg + 1, dtype=x0.dtype) * dt_save
    # a member whose state is not finite stops at once (outcome nonfinite below): diffrax would retry it to max_steps
    bad = lambda t, y, args, **kw: ~jnp.all(jnp.isfinite(y))  # noqa: E731
    if plan.tol is not None:
        steady = diffrax.steady_state_event(rtol=0.0, atol=plan.tol, norm=lambda v: jnp.max(jnp.abs(v)))
        event = diffrax.Event(lambda t, y, args, **kw: steady(t, y, args, **kw) | bad(t, y, args, **kw))
    else:
        event = diffrax.Event(bad)
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
        jnp.where(sol.result == diffrax.RESULTS.successful, NOT_CONVERGED, SOLVER_FAILED),
    )
    status = jnp.where(finite, status, NONFINITE).astype(jnp.int32)
    final = dyn.project(jnp.where(finite, final, x0))
    traj = None
    if plan.save:
        ok = jnp.all(jnp.isfinite(saved), axis=(1, 2))[:, None, None]
        traj = jax.vmap(dyn.project)(jnp.where(ok, saved, final))
    return final, traj, status, sol.stats["num_steps"].astype(jnp.int32)


def _run_impl(dyn, solver, x0, dt, sweep, plan: Plan):
    if plan.backend == "lanes":
        from .backends.lanes import lanes_run

        final, traj, outcome, steps = lanes_run(dyn, solver, x0, dt, plan)
    elif plan.backend == "fused":
        from .backends.fused import fused_run

        final, traj, outcome, steps = fused_run(dyn, solver, x0, dt, plan)
    else:
        one = _adaptive_one if plan.adaptive else _fixed_one

        def batch(d):
            return jax.vmap(lambda x: one(d, solver, x, dt, plan))(x0)

        final, traj, outcome, steps = batch(dyn) if sweep is None else jax.vmap(lambda vals: batch(dyn.with_params(**vals)))(sweep)
    return final, traj, mark_degenerate(dyn, final, outcome), steps


@functools.partial(jax.jit, static_argnums=(1, 2))
def _run_jit(dynamic, static_leaves, static_def):
    return _run_impl(*eqx.combine(dynamic, jax.tree.unflatten(static_def, static_leaves)))


def _run(*args):
    """``_run_impl`` compiled once per signature (model structure, shapes, dtypes, plan) and dispatched
    asynchronously. The compiled programs are jax's own cache: :func:`compiled_programs` counts them."""
    dynamic, static = eqx.partition(args, eqx.is_array)
    leaves, treedef = jax.tree.flatten(static)  # hashable: the structure and the static leaves
    return _run_jit(dynamic, tuple(leaves), treedef)


def compiled_programs() -> int:
    """How many programs :func:`simulate` has compiled in this process (a recompilation guard for tests)."""
    return int(_run_jit._cache_size())


def _make_plan(dyn, budget: Budget, stop: Stop, solver, saves):
    """The plan of one call, the solver and the step size: every budget check is :meth:`Budget.resolve`'s."""
    if not isinstance(dyn, AbstractDynamics):
        raise TypeError(f"dynamics must be an attnflow model (SphereFlow, LayerMap, ...), got {type(dyn).__name__}")
    solver = (Iterate() if not isinstance(dyn, AbstractFlow) else RK4()) if solver is None else solver
    solver.check(dyn)
    adaptive = isinstance(solver, Adaptive)
    span = budget.resolve(dyn, adaptive)
    if stop.tol is not None and getattr(dyn, "num_layers", None) is not None and not dyn.same_layers():
        raise ValueError("tol stops a member whose step changes it by less than tol, as at a fixed point; a LayerStack "
                         "of different layers runs exactly its layers (a small change in one layer is no fixed point "
                         "of the next): pass no tol")
    if adaptive:
        steps = saves if saves is not None else 1
        dt = span.t1 / steps
    else:
        steps, dt = span.steps, span.dt
    if saves is not None and (isinstance(saves, bool) or not isinstance(saves, (int, np.integer)) or saves < 1):
        raise ValueError(f"saves must be a positive integer, got {saves!r}")
    if saves is None or adaptive:
        n_seg = saves if (adaptive and saves) else 1
        seg_len = 1 if adaptive else int(steps)
    else:
        if steps % saves:
            raise ValueError(f"saves={saves} must divide the number of steps {steps}")
        n_seg, seg_len = int(saves), int(steps) // int(saves)
    plan = Plan(n_seg=int(n_seg), seg_len=int(seg_len), save=saves is not None, tol=stop.tol,
                continuous=isinstance(dyn, AbstractFlow), adaptive=adaptive, unroll=1)
    return plan, solver, dt


_FITS: set = set()
"""Model structures (tree, leaf shapes and dtypes) and state shapes that :func:`check_shape` has traced."""


def check_states(dyn: AbstractDynamics, X) -> None:
    """Refuse states ``(..., n, d)`` that ``dyn`` cannot take, in one line: :func:`check_shape`, and, for a flow,
    states off its state space by more than :data:`~attnflow.evolve.outcome.DEGENERATE_TOL` (e.g. rows not of unit
    norm for :class:`SphereFlow`: its tangent projection is exact only there)."""
    shape = tuple(X.shape[-2:])
    check_shape(dyn, shape, X.dtype)
    if isinstance(dyn, AbstractFlow) and X.size:
        flat = jnp.reshape(jnp.asarray(X), (-1,) + shape)
        finite = jnp.all(jnp.isfinite(flat), axis=(1, 2))  # a non-finite start is a per-member outcome, not an error
        off = float(jnp.max(jnp.where(finite, jax.vmap(dyn.state_residual)(jnp.where(finite[:, None, None], flat, 0.0)),
                                      0.0)))
        if off > DEGENERATE_TOL:
            raise ValueError(f"the states are off this flow's state space by {off:.3g} (tolerance {DEGENERATE_TOL:g}): "
                             + ("pass tokens of unit norm (X / |X| row by row)" if isinstance(dyn, SphereFlow)
                                else "pass states on it (see its state_residual)"))


def check_shape(dyn: AbstractDynamics, shape: tuple[int, int], dtype) -> None:
    """Refuse states of shape ``(n, d)`` and `dtype` that ``dyn`` cannot take, in one line: half precision, or tokens
    of another dimension than the model's (one step traced once per model structure, nothing computed)."""
    shape, dtype = tuple(shape), jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"states must be float32 or float64, got {dtype} (half precision cannot resolve the tolerances "
                         f"attnflow decides with): pass X.astype(np.float32)")
    leaves, tree = jax.tree.flatten(dyn)
    fits = (tree, tuple((getattr(a, "shape", None), getattr(a, "dtype", None)) for a in leaves), shape, dtype)
    try:
        hash(fits)
    except TypeError:  # a static field that cannot be hashed: trace every time
        fits = None
    if fits is None or fits not in _FITS:
        one, k = jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((), jnp.int32)  # k traced: every layer
        step = (lambda k, Y: dyn.vf(0.0, Y)) if isinstance(dyn, AbstractFlow) else (lambda k, Y: dyn.step(k, Y))
        try:
            out = eqx.filter_eval_shape(step, k, one)
        except (TypeError, ValueError) as e:
            raise ValueError(f"states of {shape[0]} tokens in d = {shape[1]} do not fit this model: "
                             f"{str(e).splitlines()[0]}") from None
        if getattr(out, "shape", None) != shape:
            raise ValueError(f"states of {shape[0]} tokens in d = {shape[1]} do not fit this model: one step maps "
                             f"them to shape {getattr(out, 'shape', None)}")
        if fits is not None:
            if len(_FITS) > 64:
                _FITS.clear()
            _FITS.add(fits)


def _check_x0(dyn, x0):
    x0 = jnp.asarray(x0) if not isinstance(x0, np.ndarray) else x0
    if x0.ndim != 3:
        raise ValueError(f"x0 must have shape (batch, tokens, d), got {tuple(x0.shape)}")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be floating point, got {x0.dtype}")
    return x0


def _prepare(dynamics, x0, budget: Budget, stop: Stop, execution: Execution, solver, saves, sweep):
    """Checked inputs, the plan (with its resolved backend and devices), solver, dt and the chunk size."""
    x0 = _check_x0(dynamics, x0)
    check_states(dynamics, x0)
    plan, solver, dt = _make_plan(dynamics, budget, stop, solver, saves)
    B = x0.shape[0]
    ndev = len(execution.local_devices())
    C = B if execution.chunk is None else min(int(execution.chunk), B)
    C = math.ceil(C / ndev) * ndev
    shape = (C // ndev,) + tuple(x0.shape[1:])  # what one device runs per call
    resolved = resolve_backend(execution.backend, dynamics, solver, plan, shape, x0.dtype, sweep=sweep is not None)
    return x0, dataclasses.replace(plan, shards=ndev, backend=resolved), solver, dt, C


def simulate_chunks(dynamics: AbstractDynamics, x0: Batch, budget: Budget, *, stop: Stop = Stop(),
                    execution: Execution = Execution(), solver=None, saves: int | None = None,
                    sweep: dict | None = None) -> Iterator[tuple[int, int, tuple]]:
    """Yield ``(start, stop, (final, trajectory, outcome, steps))`` chunk by chunk (``execution.chunk`` members),
    batch axis first. The arrays of each chunk are NumPy (on the host). Arguments as in :func:`simulate`."""
    x0, plan, solver, dt, C = _prepare(dynamics, x0, budget, stop, execution, solver, saves, sweep)
    B, ndev = x0.shape[0], plan.shards
    sharding = None
    if ndev > 1:
        mesh = jax.sharding.Mesh(np.array(execution.local_devices()), ("batch",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    dt_arr = jnp.asarray(dt, dtype=x0.dtype)
    sweep_arrs = None if sweep is None else {k: jnp.asarray(v, dtype=x0.dtype) for k, v in sweep.items()}
    for start in range(0, B, C):
        end = min(start + C, B)
        xb = x0[start:end]
        if end - start < C:  # pad with valid states so nothing recompiles and nothing goes non-finite
            pad = np.broadcast_to(np.asarray(xb[:1]), (C - (end - start),) + tuple(xb.shape[1:]))
            xb = np.concatenate([np.asarray(xb), pad])
        xb = jax.device_put(xb, sharding) if sharding is not None else jnp.asarray(xb)
        out = _run(dynamics, solver, xb, dt_arr, sweep_arrs, plan)
        ax = 0 if sweep is None else 1
        out = jax.tree.map(lambda a: np.asarray(a).take(np.arange(end - start), axis=ax), out)
        yield start, end, out


def chunk_backend(dynamics: AbstractDynamics, x0, budget: Budget | None = None, *, stop: Stop | None = None,
                  execution: Execution | None = None, solver=None, saves: int | None = None, sweep: dict | None = None,
                  steps=None, t1=None, dt=None, tol=None, backend=None, chunk_size=None) -> str:
    """The backend :func:`simulate` would use for these arguments (``backend="auto"`` resolved; see
    :func:`attnflow.evolve.backends.choose_backend`). A pure function of the model, shapes, solver and platform."""
    budget, stop, execution = options(budget, stop, execution, steps=steps, t1=t1, dt=dt, tol=tol, backend=backend, chunk=chunk_size)
    return _prepare(dynamics, x0, budget, stop, execution, solver, saves, sweep)[1].backend


def _gather(chunks, ax, bar):
    """Concatenate the host arrays of :func:`simulate_chunks` along the batch axis ``ax``."""
    parts = []
    for start, end, out in chunks:
        parts.append(out)
        if bar is not None:
            bar.update(end - start)
    return tuple(None if parts[0][i] is None else np.concatenate([p[i] for p in parts], axis=ax) for i in range(4))


def _saved_ts(plan: Plan, dt) -> np.ndarray:
    return np.arange(plan.n_seg + 1) * plan.seg_len * float(dt)


def simulate(
    dynamics: AbstractDynamics,
    x0: Batch,
    budget: Budget | None = None,
    *,
    solver: AbstractSolver | Adaptive | None = None,
    saves: int | None = None,
    stop: Stop | None = None,
    execution: Execution | None = None,
    progress: bool = False,
    steps: int | None = None,
    t1: float | None = None,
    dt: float | None = None,
    tol: float | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
    _sweep: dict | None = None,
) -> Solution:
    """Evolve a batch of configurations under ``dynamics``.

    **Arguments:**

    - `dynamics`: a map (:class:`LayerMap`, :class:`LayerStack`) or a flow (:class:`SphereFlow`, :class:`FlatFlow`).
    - `x0`: ``(b, n, d)`` initial states (see :mod:`attnflow.evolve.sample`).
    - `budget`: a :class:`~attnflow.Budget`: ``steps`` map iterations (a stack defaults to its layer count), or
      ``t1`` and ``dt`` for a flow (``dt`` unused by :class:`Adaptive`). Shorthands: `steps`, `t1`, `dt`.
    - `solver`: :class:`Iterate` for maps (default); :class:`RK4` (default), :class:`Euler` or
      :class:`Adaptive` for flows.
    - `saves`: save the trajectory at this many equally spaced points after the start (it must divide
      the step count of fixed-step solvers); None keeps only the final state.
    - `stop`: a :class:`~attnflow.Stop`: stop a member once its per-step change (max abs; divided by dt for
      flows) is below ``tol``. Shorthand: `tol`.
    - `execution`: an :class:`~attnflow.Execution`: the backend (``"xla"``: vmapped, any model, solver and
      sweep; ``"lanes"``: the model's step unrolled into batch-wide lanes over cache-sized tiles, fast on CPU for
      small n and d; ``"fused"``: the same in one Pallas kernel, for GPUs, not yet timed on one; ``"auto"``
      (default): a pure function of the model, shapes, solver and platform,
      :func:`~attnflow.evolve.backends.choose_backend`); ``chunk``: run the batch in chunks of this size, gathered
      on the host; ``devices``: split each chunk over this many local devices (default all). Shorthands:
      `backend`, `chunk_size`.
    - `progress`: show a progress bar with samples/s and ETA (chunked runs).

    **Returns:** a :class:`Solution` (its ``backend`` is the one used); failures are per-member outcome codes
    (:class:`~attnflow.Outcome`), never exceptions.
    """
    budget, stop, execution = options(budget, stop, execution, steps=steps, t1=t1, dt=dt, tol=tol, backend=backend,
                                      chunk=chunk_size)
    x0, plan, solver_, dt_used, _ = _prepare(dynamics, x0, budget, stop, execution, solver, saves, _sweep)
    if stop.tol is not None:  # a tol below what the dtype can resolve would never fire: refused, naming the floor
        check_tol(stop.tol, dynamics, solver_, None if plan.adaptive or not plan.continuous else dt_used, x0.dtype)
    B = x0.shape[0]
    ax = 0 if _sweep is None else 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=B, unit="samples", desc="simulate", smoothing=0.1)
    if (execution.chunk is None or execution.chunk >= B) and plan.shards == 1:
        sweep_arrs = None if _sweep is None else {k: jnp.asarray(v, dtype=x0.dtype) for k, v in _sweep.items()}
        final, traj, outcome, nsteps = _run(dynamics, solver_, jnp.asarray(x0), jnp.asarray(dt_used, x0.dtype), sweep_arrs, plan)
        if bar is not None:
            bar.update(B)
    else:
        ex = dataclasses.replace(execution, backend=plan.backend)
        chunks = simulate_chunks(dynamics, x0, budget, stop=stop, execution=ex, solver=solver, saves=saves, sweep=_sweep)
        final, traj, outcome, nsteps = _gather(chunks, ax, bar)
    if bar is not None:
        bar.close()
    if traj is not None:  # (.., b, s, n, d) -> (.., s, b, n, d)
        traj = jnp.moveaxis(traj, ax + 1, ax) if isinstance(traj, jax.Array) else np.moveaxis(traj, ax + 1, ax)
    ts = _saved_ts(plan, dt_used) if plan.save else None
    return Solution(final=final, trajectory=traj, ts=ts, outcome=outcome, steps=nsteps, backend=plan.backend)


def sweep(
    dynamics: AbstractDynamics,
    x0: Batch,
    *,
    beta: Float[Array, " p"] | None = None,
    alpha: Float[Array, " p"] | None = None,
    **kwargs,
) -> Solution:
    """:func:`simulate` for p parameter values at once, inside one compiled call.

    `beta` and/or `alpha` are arrays of length p (both given: paired element-wise). Every per-member field of
    the returned :class:`Solution` gains a leading axis p (the trajectory is ``(p, s, b, n, d)``); the save times
    `ts`, shared, stay ``(s,)``.
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
