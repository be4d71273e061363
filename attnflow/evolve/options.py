"""Typed options of every entry point that evolves members: how long they run (:class:`Budget`), when they stop
(:class:`Stop`) and how the work is executed (:class:`Execution`).

Each is a small frozen, validated record (an ``equinox.Module`` with static fields, so it is hashable and can be
part of a compiled signature), built once -- by the config loader or by the caller -- and taken as it is by
:func:`attnflow.simulate`, the member pool (:mod:`attnflow.evolve.pool`) and
:func:`attnflow.analysis.basins.basin_fractions`. The step arithmetic (``t1 / dt`` steps, the default cap, the
int32 limit) and its error messages exist here and nowhere else.

None of these records changes a result except :class:`Budget` and :class:`Stop`: an :class:`Execution` sets speed
and memory only (backend, block, pool and group sizes, devices, processes), never which outcome a member gets.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import equinox as eqx

from ..model.dynamics import AbstractDynamics, AbstractFlow, AbstractMap

STEPS_MAX = 2**31 - 1
"""Step counters are int32: no budget or cap may exceed this."""

DEFAULT_MAX_STEPS = 10_000
"""The smallest default cap of a study; the default is ``max(10 x budget, DEFAULT_MAX_STEPS)`` (at most
:data:`STEPS_MAX`)."""

STUDY_TOL = 1e-7
"""The smallest default stop tolerance of a study; the default is ``max(STUDY_TOL, 8 x floor)`` with the floor of
:func:`tol_floor` (so it is 1e-7 in float64 and follows the dtype and the model's scale in float32)."""

BACKENDS = ("auto", "xla", "lanes", "fused")


def _positive_int(name: str, v, upper: int = STEPS_MAX) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if not 1 <= int(v) <= upper:
        raise ValueError(f"{name} must be in [1, {upper}], got {v}")


def _positive_float(name: str, v) -> None:
    if v is None:
        return
    if isinstance(v, bool):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


class Span(NamedTuple):
    """A :class:`Budget` resolved for one model and solver.

    - `steps`: fixed steps of a run (maps: iterations; fixed-step flows: t1 / dt); None for the adaptive solver.
    - `dt`: the fixed step (1.0 for maps; None for the adaptive solver).
    - `t1`: the end time of a flow (None for maps).
    - `cap`: a study's cap per member, in steps (attempted steps for the adaptive solver).
    """

    steps: int | None
    dt: float | None
    t1: float | None
    cap: int


class Budget(eqx.Module):
    """How long each member runs.

    - `steps`: iterations of a map (a :class:`~attnflow.LayerStack` defaults to its layer count, and runs exactly
      its layers).
    - `t1`, `dt`: end time and fixed step of a flow; ``t1 / dt`` must be a whole number of steps. The adaptive
      solver uses `t1` only.
    - `max_steps`: a study's hard cap per member, in steps (the adaptive solver: attempted steps); members still
      moving there are ``not_converged``. Default ``max(10 x budget, 10_000)`` with budget = `steps` or
      ``t1 / dt``; at most ``2^31 - 1``. :func:`attnflow.simulate` runs the budget itself and ignores it.
    """

    steps: int | None = eqx.field(static=True, default=None)
    t1: float | None = eqx.field(static=True, default=None)
    dt: float | None = eqx.field(static=True, default=None)
    max_steps: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _positive_int("steps", self.steps)
        _positive_int("max_steps", self.max_steps)
        _positive_float("t1", self.t1)
        _positive_float("dt", self.dt)
        if self.t1 is not None and self.dt is not None:
            ratio = float(self.t1) / float(self.dt)
            if ratio > STEPS_MAX + 0.5:
                raise ValueError(f"t1 / dt = {ratio:.3g} steps is more than {STEPS_MAX}; use a larger dt or the adaptive solver")
            k = round(ratio)
            if k < 1 or abs(k * float(self.dt) - float(self.t1)) > 1e-9 * max(1.0, float(self.t1)):
                raise ValueError(f"t1 = {self.t1} must be a whole number of steps dt = {self.dt}")

    def resolve(self, dynamics: AbstractDynamics, adaptive: bool = False, *, study: bool = False) -> Span:
        """The budget for ``dynamics`` (``adaptive``: the adaptive solver): a :class:`Span`, or a ValueError that
        says what is missing. ``study``: a basin study, which needs only a cap."""
        if isinstance(dynamics, AbstractMap):
            if self.t1 is not None or self.dt is not None:
                raise ValueError("a map takes steps (and max_steps), not t1 or dt")
            if adaptive:
                raise ValueError("the adaptive solver integrates flows, not maps")
            layers = dynamics.num_layers
            steps = self.steps
            if layers is not None:
                if steps is not None and steps > layers:
                    raise ValueError(f"steps={steps} exceeds the {layers} layers of the stack")
                steps = layers if steps is None else steps
                return Span(int(steps), 1.0, None, int(layers))
            if steps is None:
                if not (study and self.max_steps is not None):
                    raise ValueError("a discrete simulation needs steps=" + (" (or max_steps=)" if study else ""))
                return Span(None, 1.0, None, int(self.max_steps))
            return Span(int(steps), 1.0, None, self._cap(int(steps)))
        if not isinstance(dynamics, AbstractFlow):
            raise TypeError(f"dynamics must be an attnflow model (SphereFlow, LayerMap, ...), got {type(dynamics).__name__}")
        if self.steps is not None:
            raise ValueError("a flow takes t1 and dt (t1 / dt steps), not steps")
        if adaptive:
            if self.t1 is None and not study:
                raise ValueError("a continuous simulation needs t1 > 0")
            return Span(None, None, None if self.t1 is None else float(self.t1),
                        int(self.max_steps) if self.max_steps is not None else DEFAULT_MAX_STEPS)
        if self.t1 is None or self.dt is None:
            raise ValueError("a fixed-step continuous run needs t1 > 0 and dt > 0 (t1 / dt steps)")
        steps = int(round(float(self.t1) / float(self.dt)))
        return Span(steps, float(self.dt), float(self.t1), self._cap(steps))

    def _cap(self, budget: int) -> int:
        if self.max_steps is not None:
            return int(self.max_steps)
        return int(min(max(10 * budget, DEFAULT_MAX_STEPS), STEPS_MAX))


class Stop(eqx.Module):
    """When a member stops before its budget: `tol`, the per-step change (max abs over the state; divided by dt for
    fixed-step flows; for the adaptive solver, max |f(X)|) below which it is ``converged`` (None: never early); and,
    in a basin study, `certify`: retire a member as soon as it enters a certified ball around a stable equilibrium
    (:mod:`attnflow.analysis.basins.certify`; computed where they pay, ``certify.worth_certifying``), with that
    equilibrium's label and outcome ``certified``."""

    tol: float | None = eqx.field(static=True, default=None)
    certify: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        _positive_float("tol", self.tol)
        if not isinstance(self.certify, bool):
            raise ValueError(f"certify must be True or False, got {self.certify!r}")


def _drift_scale(dynamics) -> float:
    """|W|, the spectral norm of the layer matrix (the size of an attention model's drift); 1 for other models."""
    import numpy as np

    attn = getattr(dynamics, "attn", None)
    return 1.0 if attn is None else float(np.linalg.norm(np.asarray(attn.heads.layer_matrix(), np.float64), 2))


def tol_floor(dynamics: AbstractDynamics, solver=None, dt: float | None = None, dtype="float32") -> tuple[float, str]:
    """The smallest stop tolerance a member can reach in `dtype`: ``(floor, why)``.

    A step of a member near an equilibrium changes its coordinates by whole roundings: by nothing, or by about one
    unit in the last place (eps) of its largest coordinate. So the per-step change of a map can only be trusted
    below tol when ``tol >= eps x scale`` (scale: 1 for tokens on the unit sphere, sqrt(d) for LayerNorm tokens); a
    fixed-step flow divides its change by dt, so its floor is ``eps x scale / dt``; the adaptive solver stops on
    max |f(X)|, which rounding leaves at about ``4 eps |W|`` (|W| the spectral norm of the layer matrix, the size of
    the drift; 4: measured 2.3 eps for |W| = 1 in float32)."""
    import numpy as np

    from ..model.dynamics import AbstractMap
    from .solvers import Adaptive

    eps = float(np.finfo(np.dtype(dtype)).eps)
    norm = type(getattr(dynamics, "norm", None)).__name__
    attn = getattr(dynamics, "attn", None)
    d = getattr(getattr(attn, "heads", None), "dim", None)
    scale = math.sqrt(d) if (norm == "LayerNorm" and d) else 1.0
    if isinstance(solver, Adaptive):
        w = _drift_scale(dynamics)
        return 4.0 * eps * max(w, 1e-30), f"the rounding of the vector field max |f(X)| in {np.dtype(dtype).name}, |W| = {w:.3g}"
    if isinstance(dynamics, AbstractMap) or dt is None:
        return eps * scale, f"one rounding of a coordinate of size {scale:.3g} per step in {np.dtype(dtype).name}"
    return eps * scale / float(dt), f"one rounding of a coordinate of size {scale:.3g} per step, divided by dt = {dt:g}, in {np.dtype(dtype).name}"


def solver_floor(dynamics: AbstractDynamics, solver=None) -> float:
    """The residual max |f(X)| at which the adaptive solver holds a member near a stable equilibrium: ``(atol + rtol)
    x |W|`` (0 for the fixed-step solvers). Near a steady state the explicit pair's step size grows until its
    stability bound limits it, and the accepted local errors, up to atol + rtol |X| (|X| = 1 on the spheres), leave
    the state that far from the equilibrium; the drift there is about |W| times that distance. Not a hard floor (a
    mildly stiff model gets below it), so a smaller `tol` is accepted; a study's default stays above it, so that its
    members stop (measured: rtol = 1e-6, |W| = 3.3, beta = 3, float64: residuals 2e-7 to 5e-6 after t = 200)."""
    from .solvers import Adaptive

    if not isinstance(solver, Adaptive):
        return 0.0
    return (float(solver.atol) + float(solver.rtol)) * _drift_scale(dynamics)


def check_tol(tol: float | None, dynamics: AbstractDynamics, solver=None, dt: float | None = None, dtype="float32",
              *, study: bool = False) -> float | None:
    """The stop tolerance to use: `tol` checked against :func:`tol_floor` (a ValueError that names the floor when it
    is below), or, for a study without one, the default ``max(STUDY_TOL, 8 x floor, 8 x solver_floor)``."""
    floor, why = tol_floor(dynamics, solver, dt, dtype)
    default = max(STUDY_TOL, 8.0 * floor, 8.0 * solver_floor(dynamics, solver))
    if tol is None:
        return default if study else None
    if tol < floor:
        raise ValueError(f"tol = {tol:g} is below {floor:.3g}, the smallest per-step change a member can resolve "
                         f"({why}); use tol >= {floor:.2g} (the default of a study here is {default:.2g})")
    return float(tol)


class Execution(eqx.Module):
    """How the work is executed: speed and memory only, never the outcome of a member.

    - `backend`: ``"auto"``, ``"xla"``, ``"lanes"`` or ``"fused"`` (see :mod:`attnflow.evolve.backends`).
    - `chunk`: members per call of :func:`attnflow.simulate` (results gathered on the host); for a study, samples
      per block (one Parquet table of a run directory; part of a run's identity). In :func:`attnflow.simulate` the
      members per call (the chunk, each device's share of it) can change the last bits of a member's trajectory,
      since XLA compiles an operation differently for different extents (measured: 2e-5 in float32 after 200 RK4
      steps of a sphere flow, 1e-14 in float64; a study does not: it steps in fixed tiles, see `pool`).
    - `pool`: member slots per device of a study (default: one tile of the pool's step,
      :func:`attnflow.evolve.pool.pool_tile`: on the lanes backend the slots whose unrolled step fits a 2 MiB cache,
      on xla on a CPU 128; on fused, and on xla on a GPU, ``min(16384, samples, max(chunk, 64))``). Speed and memory
      only: a pool runs its slots in tiles of that fixed width, so every member's outcome, steps and final state
      are the same bits for any pool size, in float32 too (on a GPU's xla backend, which has no tiles, the pool size
      may change the last bits).
    - `group`: steps between two retire-and-refill passes of a study's pool (default: 4 for the adaptive pair, 8
      otherwise, :func:`attnflow.evolve.pool.default_group`).
    - `devices`: how many local devices to use (default: all of them). A study runs one pool per device;
      :func:`attnflow.simulate` splits each call over them.
    - `workers`: worker processes of a study on a CPU, one pool each, with a one-thread XLA (default 0: the pools
      run in this process). Kept for the next study of the process. Rarely faster than `cores`, which run the same
      pools in this process without a worker's start-up (about 2 s).
    - `cores`: one-thread XLA clients of this process that run a study's pools on a CPU, one pool each, at once
      (:func:`attnflow._device.core_devices`; 0: the pools run on JAX's devices; default: one per core, at most 8 and
      at most one per pool of samples, for a study without workers in one process on one CPU device (one only below
      50 000 samples without JAX's persistent compilation cache, since each client compiles its own program), else
      0: :func:`attnflow.evolve.workers.default_cores`).
    - `process`: ``(index, count)``: this process computes the blocks b with ``b % count == index`` (default: from
      ``jax.distributed``, else ``(0, 1)``).
    """

    backend: str = eqx.field(static=True, default="auto")
    chunk: int | None = eqx.field(static=True, default=None)
    pool: int | None = eqx.field(static=True, default=None)
    group: int | None = eqx.field(static=True, default=None)
    devices: int | None = eqx.field(static=True, default=None)
    process: tuple[int, int] | None = eqx.field(static=True, default=None)
    workers: int | None = eqx.field(static=True, default=None)
    cores: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        _positive_int("chunk", self.chunk)
        _positive_int("pool", self.pool)
        _positive_int("group", self.group)
        _positive_int("devices", self.devices, 4096)
        w = self.workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, numbers.Integral) or not 0 <= int(w) <= 64):
            raise ValueError(f"workers must be an integer in [0, 64], got {self.workers!r}")
        c = self.cores
        if c is not None and (isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= int(c) <= 64):
            raise ValueError(f"cores must be an integer in [0, 64], got {self.cores!r}")
        if self.process is not None:
            if len(self.process) != 2:
                raise ValueError(f"process must be (index, count), got {self.process!r}")
            i, c = self.process
            _positive_int("process count", c, 1 << 20)
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < c:
                raise ValueError(f"process index must be in [0, {c}), got {i!r}")

    def local_devices(self) -> list:
        """The local devices this execution uses (the first `devices` of ``jax.local_devices()``)."""
        import jax

        devs = jax.local_devices()
        if self.devices is None:
            return devs
        if self.devices > len(devs):
            raise ValueError(f"devices={self.devices}, but this process has {len(devs)} local device(s)")
        return devs[: self.devices]

    def pool_devices(self) -> list:
        """The devices a study's pools run on, one pool each: `cores` one-thread CPU clients of this process if set,
        else :meth:`local_devices`."""
        if self.cores:
            from .._device import core_devices

            return core_devices(int(self.cores))
        return self.local_devices()


def options(budget=None, stop=None, execution=None, *, steps=None, t1=None, dt=None, max_steps=None, tol=None,
            backend=None, chunk=None) -> tuple[Budget, Stop, Execution]:
    """The three records from records and/or their shorthand keywords (a keyword must not repeat a record given)."""

    def merge(record, cls, **kw):
        given = {k: v for k, v in kw.items() if v is not None}
        if record is None:
            return cls(**given)
        if not isinstance(record, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(record).__name__}")
        if given:
            raise ValueError(f"pass {', '.join(given)} inside the {cls.__name__} or as keywords, not both")
        return record

    return (merge(budget, Budget, steps=steps, t1=t1, dt=dt, max_steps=max_steps), merge(stop, Stop, tol=tol),
            merge(execution, Execution, backend=backend, chunk=chunk))
