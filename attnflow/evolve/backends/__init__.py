"""How a batch is executed: three backends, one definition of the dynamics.

- ``"xla"``: the per-configuration step (:func:`one_step`) lifted with ``vmap`` (any model, solver, sweep).
- ``"lanes"``: the same step re-evaluated with its small array axes unrolled into batch-wide lanes
  (:class:`~attnflow.evolve.backends.unroll.LaneProgram`), run over cache-sized tiles in plain XLA; the fast
  path on CPU for small models.
- ``"fused"``: the same unrolled step as the body of one Pallas (Triton) kernel that runs the whole
  simulation with each member's state in registers; for GPUs. Never chosen by ``"auto"``: it has not yet
  been timed on a GPU (off a GPU it runs through the Pallas interpreter, for tests).

:func:`choose_backend` is a pure function of the model, shapes, solver, call size and platform.
"""

from __future__ import annotations

import functools
import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp

from ..options import BACKENDS
from .unroll import LaneProgram, Unsupported

MAX_COST = 8000
"""Largest unrolled size (scalar operations per step, :attr:`LaneProgram.cost`) that ``"auto"`` sends to the lanes
path: its compile time grows with the size (on a 2-core CPU about 3 s for one head, n = 10, d = 3 (cost ~1.6e3)
and 10-15 s for five heads or RK4 (~7e3); the vmapped path compiles in well under a second)."""

MAX_STATE = 256
"""The lanes and fused backends hold a member's n d scalars in registers (one vector each): larger states are
refused before the step is unrolled (the unrolling itself would take long)."""

MIN_WORK = 1.2e5
"""``"auto"`` takes the lanes path on CPU when B x steps >= MIN_WORK x n x d: then the run time it saves (about
3x) exceeds its compile time. Smaller calls take the vmapped path."""


def one_step(args, k, X):
    """The step of one configuration: ``args = (dynamics, solver, dt)``; k the step index; X ``(n, d)``."""
    dyn, solver, dt = args
    return solver.step(dyn, k, k.astype(dt.dtype) * dt, X, dt)


def _key(args, n, d, dtype):
    """A hashable description of a lane program: the structure, shapes and dtypes of its arguments and their static
    leaves (building a program from them is deterministic), or None when some static leaf is unhashable."""
    leaves, treedef = jax.tree.flatten(args)
    desc = tuple(("a", tuple(x.shape), str(x.dtype)) if eqx.is_array(x) else ("s", x) for x in leaves)
    key = (treedef, desc, n, d, str(jnp.dtype(dtype)))
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _ByKey:
    """A program's arguments, hashed and compared by their :func:`_key` only."""

    def __init__(self, key, args):
        self.key, self.args = key, args

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _ByKey) and self.key == other.key


@functools.lru_cache(maxsize=32)
def _program(k: _ByKey, n: int, d: int, dtype: str) -> LaneProgram:
    return LaneProgram(one_step, k.args, n, d, dtype)


def lane_program(dyn, solver, dt, n: int, d: int, dtype) -> LaneProgram:
    """The :class:`LaneProgram` of ``solver.step`` on ``dyn``, built once per structure, shapes and dtypes (a
    bounded cache of the last 32; a failure is raised each time, never cached). Raises :class:`Unsupported` when
    the step cannot be unrolled."""
    args = (dyn, solver, jnp.asarray(dt, dtype))
    key = _key(args, n, d, dtype)
    if key is None:
        return LaneProgram(one_step, args, n, d, dtype)
    return _program(_ByKey(key, args), n, d, str(jnp.dtype(dtype)))


_FUNCTIONS = {"vf": lambda dyn, k, X: dyn.vf(0.0, X), "project": lambda dyn, k, X: dyn.project(X)}


def _build_function(name: str, dyn, n: int, d: int, dtype) -> LaneProgram:
    if name == "vf" and _uses_time(dyn, n, d, dtype):
        raise Unsupported("its vector field depends on t (the lanes adaptive mode takes autonomous flows)")
    return LaneProgram(_FUNCTIONS[name], dyn, n, d, dtype)


@functools.lru_cache(maxsize=32)
def _function(name: str, k: _ByKey, n: int, d: int, dtype: str) -> LaneProgram:
    return _build_function(name, k.args, n, d, dtype)


def _uses_time(dyn, n: int, d: int, dtype) -> bool:
    """Whether ``dyn.vf(t, X)`` reads t (its traced program uses the argument t)."""
    X = jax.ShapeDtypeStruct((n, d), jnp.dtype(dtype))
    jaxpr = jax.make_jaxpr(lambda t, X: dyn.vf(t, X))(jax.ShapeDtypeStruct((), jnp.dtype(dtype)), X).jaxpr
    t = jaxpr.invars[0]
    return any(v is t for e in jaxpr.eqns for v in e.invars) or any(v is t for v in jaxpr.outvars)


def lane_function(name: str, dyn, n: int, d: int, dtype) -> LaneProgram:
    """The :class:`LaneProgram` of one of the model's own functions of a state: ``"vf"`` (the vector field of an
    autonomous flow) or ``"project"`` (its projection onto the state space); ``prepare`` and ``step`` take the
    model itself. Cached like :func:`lane_program`."""
    key = _key(dyn, n, d, dtype)
    if key is None:
        return _build_function(name, dyn, n, d, dtype)
    return _function(name, _ByKey(key, dyn), n, d, str(jnp.dtype(dtype)))


def lanes_support(dyn, solver, plan, shape, dtype) -> str | None:
    """Why the lanes/fused backends cannot run this call (a sentence), or None when they can."""
    from ..solvers import Adaptive

    if plan.adaptive or isinstance(solver, Adaptive):
        return "adaptive solves run on the xla backend only"
    _, n, d = shape
    if n * d > MAX_STATE:
        return f"the state has n d = {n * d} scalars, more than MAX_STATE = {MAX_STATE}"
    try:
        lane_program(dyn, solver, 1.0, n, d, dtype)
    except Unsupported as e:
        return f"the model's step cannot be unrolled into lanes ({e})"
    return None


def choose_backend(dyn, solver, plan, shape, dtype, *, sweep: bool = False, platform: str | None = None) -> str:
    """The backend ``"auto"`` picks: a pure function of the model, solver, shapes, call size and platform.

    - sweeps, adaptive solves and any platform but the CPU: ``"xla"`` (on a GPU the fused kernel is available
      as ``backend="fused"`` but is not chosen until it has been timed there);
    - on the CPU: ``"lanes"`` when the model's step unrolls (:class:`LaneProgram`), its unrolled size is at most
      :data:`MAX_COST`, and the call is large enough to repay the compile (:data:`MIN_WORK`); else ``"xla"``.
    """
    platform = platform or jax.default_backend()
    if sweep or plan.adaptive or platform != "cpu":
        return "xla"
    B, n, d = shape
    if B * plan.n_seg * plan.seg_len < MIN_WORK * n * d:
        return "xla"
    if lanes_support(dyn, solver, plan, shape, dtype) is not None:
        return "xla"
    return "lanes" if lane_program(dyn, solver, 1.0, n, d, dtype).cost <= MAX_COST else "xla"


def resolve_backend(backend: str, dyn, solver, plan, shape, dtype, *, sweep: bool = False, platform: str | None = None) -> str:
    """``backend`` checked against the call (a ValueError says why it cannot run it), ``"auto"`` resolved."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return choose_backend(dyn, solver, plan, shape, dtype, sweep=sweep, platform=platform)
    if backend in ("lanes", "fused"):
        if sweep:
            raise ValueError(f"backend={backend!r} does not run parameter sweeps; use 'xla' or 'auto'")
        why = lanes_support(dyn, solver, plan, shape, dtype)
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {why}")
    return backend


def l2_cache_bytes() -> int:
    """The size of this machine's L2 cache (per core) in bytes, from Linux's sysfs; 1 MiB where it cannot be read.
    A fact of the machine: choices made from it change speed only, never a result."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            d = os.path.join(base, entry)
            with open(os.path.join(d, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return 1 << 20


SLOTS_RANGE = (128, 4096)
"""The range of :func:`cache_slots`."""


TILE_L2 = 2 << 20
"""The cache a tile of the pool's step is sized for (:func:`cache_slots`): 2 MiB, the L2 of the 2-core machine the
sizes were measured on. Fixed, not read from the machine: the tile is part of the arithmetic (XLA rounds an
operation differently for different extents), and a result must not depend on the machine."""


def cache_slots(cost: int, itemsize: int, l2: int | None = None) -> int:
    """Members per tile of an unrolled (lanes) program whose working set fits an L2 cache of `l2` bytes (default
    :data:`TILE_L2`): the largest power of two at most ``l2 / (cost * itemsize)`` (`cost` the program's scalar
    operations per step, each a lane vector of `itemsize` bytes per member), within :data:`SLOTS_RANGE`. A pure
    function of the model's size and the dtype. Measured on a 2-core VM with a 2 MiB L2 (toy model, cost 1452,
    float32: 256 slots): a basin study's pool of 128, 256, 512, 1024, 2048 slots ran 9 800, 25 700, 18 100, 19 500,
    19 600 samples/s."""
    l2 = TILE_L2 if l2 is None else int(l2)
    fit = max(1, l2 // max(1, int(cost) * int(itemsize)))
    p = 1 << (fit.bit_length() - 1)
    return int(min(max(p, SLOTS_RANGE[0]), SLOTS_RANGE[1]))


def cost(dyn, solver, shape, dtype) -> int:
    """The unrolled size of the lanes program for this model (see :data:`MAX_COST`); ``math.inf`` if unsupported."""
    _, n, d = shape
    if n * d > MAX_STATE:
        return math.inf
    try:
        return lane_program(dyn, solver, 1.0, n, d, dtype).cost
    except Unsupported:
        return math.inf
