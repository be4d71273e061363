"""The small-d layer map x_i <- normalize(x_i + alpha sum_h W_h sum_j softmax_j(beta x_i^T M_h x_j) x_j),
and the sphere flow with the same drift, with the batch as the lane (fastest) dimension.

Layout: the state is held as d * n vectors of shape ``(B_tile,)``, one per (coordinate, token); every
per-token operation is elementwise on these vectors, and the weights (M_h = Q_h^T K_h, W_h = O_h V_h,
d x d each) are scalars. On a GPU each thread then owns one ensemble member and keeps its n d
coordinates in registers across all steps: no shared memory, no cross-lane traffic, one launch for
all steps. The ``(d, n, B)`` array in HBM is read once and written once (plus the saved states).

Two runners keep :func:`attnflow.simulate`'s per-member semantics (status codes, ``tol``, saves, step
counts): :func:`fused_run` (Pallas, lowered through Triton; the GPU path) and :func:`lanes_run` (plain XLA
over cache-sized tiles; the CPU path).

Flop and byte counts per token-step: benchmarks/README.md.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from ...model.attention import Attention
from ...model.dynamics import LayerMap
from ...model.norms import L2Norm

_MAX_D = 8  # fully unrolled code grows like H n^2 d; above this the XLA path is used
_MAX_N = 32


def _drift(xs, M, W, beta):
    """The drift u on lists: ``xs[a][i]`` is coordinate a of token i, a ``(B,)`` vector; returns ``u[a][i]``.

    ``M``, ``W``: nested Python lists of scalars (H x d x d); ``beta``: a scalar.
    """
    d, n = len(xs), len(xs[0])
    H = len(M)
    u = [[None] * n for _ in range(d)]
    for h in range(H):
        # q[b][i] = beta sum_a M[a][b] x[a][i]  (so that s_ij = sum_b q[b][i] x[b][j])
        q = [[beta * sum(M[h][a][b] * xs[a][i] for a in range(d)) for i in range(n)] for b in range(d)]
        for i in range(n):
            s = [sum(q[b][i] * xs[b][j] for b in range(d)) for j in range(n)]
            m = s[0]
            for j in range(1, n):
                m = jnp.maximum(m, s[j])
            e = [jnp.exp(sj - m) for sj in s]
            tot = e[0]
            for j in range(1, n):
                tot = tot + e[j]
            inv = 1.0 / tot
            z = [sum(e[j] * xs[c][j] for j in range(n)) * inv for c in range(d)]
            for a in range(d):
                f = sum(W[h][a][c] * z[c] for c in range(d))
                u[a][i] = f if u[a][i] is None else u[a][i] + f
    return u


def _normalize(ys):
    """Rows (tokens) scaled to unit norm on lists; zero rows stay zero."""
    d, n = len(ys), len(ys[0])
    out = [[None] * n for _ in range(d)]
    for i in range(n):
        r2 = sum(ys[a][i] * ys[a][i] for a in range(d))
        inv = jnp.where(r2 > 0, jax.lax.rsqrt(jnp.where(r2 > 0, r2, 1.0)), 1.0)
        for a in range(d):
            out[a][i] = ys[a][i] * inv
    return out


def _axpy(xs, c, us):
    """xs + c us on lists."""
    return [[x + c * u for x, u in zip(xr, ur)] for xr, ur in zip(xs, us)]


def _step(xs, M, W, beta, alpha):
    """One layer map x_i <- normalize(x_i + alpha u_i) on lists (see :func:`_drift`)."""
    return _normalize(_axpy(xs, alpha, _drift(xs, M, W, beta)))


def _sphere_vf(xs, M, W, beta):
    """P(x_i) u_i = u_i - <x_i, u_i> x_i / |x_i|^2 on lists (the SphereFlow vector field)."""
    d, n = len(xs), len(xs[0])
    u = _drift(xs, M, W, beta)
    out = [[None] * n for _ in range(d)]
    for i in range(n):
        xx = sum(xs[a][i] * xs[a][i] for a in range(d))
        xu = sum(xs[a][i] * u[a][i] for a in range(d))
        c = xu / jnp.where(xx > 0, xx, 1.0)
        for a in range(d):
            out[a][i] = u[a][i] - c * xs[a][i]
    return out


def _flow_step(xs, M, W, beta, dt, rk4: bool):
    """One projected Euler or RK4 step of the sphere flow on lists (as attnflow.evolve.solvers)."""
    k1 = _sphere_vf(xs, M, W, beta)
    if not rk4:
        return _normalize(_axpy(xs, dt, k1))
    k2 = _sphere_vf(_axpy(xs, dt / 2, k1), M, W, beta)
    k3 = _sphere_vf(_axpy(xs, dt / 2, k2), M, W, beta)
    k4 = _sphere_vf(_axpy(xs, dt, k3), M, W, beta)
    comb = [[a + 2 * b + 2 * c + e for a, b, c, e in zip(r1, r2, r3, r4)] for r1, r2, r3, r4 in zip(k1, k2, k3, k4)]
    return _normalize(_axpy(xs, dt / 6, comb))


def _make_step(kind, M, W, beta, last, d, n):
    """One step on a flat tuple of the d n rows (row a n + i: coordinate a of token i): the layer map
    (``kind="map"``, ``last`` = alpha) or a projected Euler/RK4 step of the sphere flow (``last`` = dt)."""
    if kind == "map":
        stepper = functools.partial(_step, M=M, W=W, beta=beta, alpha=last)
    else:
        stepper = functools.partial(_flow_step, M=M, W=W, beta=beta, dt=last, rk4=kind == "rk4")

    def step(X):
        rows = [list(X[a * n:(a + 1) * n]) for a in range(d)]
        return tuple(v for row in stepper(rows) for v in row)

    return step


def _over_rows(op, v):
    """Reduce over the rows of a state: a tuple of ``(T,)`` rows (the Pallas kernel: Triton tensors must have
    power-of-two sizes) or a ``(d n, T)`` array (the XLA path: CPU loops run far faster with one array carry)."""
    if isinstance(v, tuple):
        return functools.reduce(op, v)
    return op.reduce(v, axis=0)


def _advance(c, step, tol, scale):
    """One step of every member with the per-member semantics of the vmapped path: only running members move,
    a non-finite step keeps the last finite state (status NONFINITE), and with ``tol`` a member whose max-abs
    change (divided by ``scale``, dt for flows) is below tol stops as CONVERGED. ``c``: (state, k, status,
    steps), the state as rows (see :func:`_over_rows`) that ``step`` maps to the same form."""
    from ..simulate import CONVERGED, MAX_STEPS, NONFINITE

    X, k, st, ns = c
    Y = step(X)
    rowwise = (lambda f, *a: tuple(map(f, *a))) if isinstance(Y, tuple) else (lambda f, *a: f(*a))
    finite = _over_rows(jnp.logical_and, rowwise(jnp.isfinite, Y))
    new = jnp.where(finite, st, NONFINITE)
    if tol is not None:
        change = _over_rows(jnp.maximum, rowwise(lambda y, x: jnp.abs(y - x), Y, X))
        if scale is not None:
            change = change / scale
        new = jnp.where(finite & (change < tol), CONVERGED, new)
    run = st == MAX_STEPS
    keep = run & finite
    X = rowwise(lambda y, x: jnp.where(keep, y, x), Y, X)
    return X, k + 1, jnp.where(run, new, st), ns + run.astype(ns.dtype)


def _segment(c, s, step, plan, scale, unroll):
    """The steps of segment ``s``: all ``plan.seg_len`` of them, or with ``tol`` until every member of the
    batch (tile, program) has stopped."""
    from ..simulate import MAX_STEPS

    if plan.tol is None:
        return jax.lax.fori_loop(0, plan.seg_len, lambda _, c: _advance(c, step, None, scale), c, unroll=unroll)
    end = ((s + 1) * plan.seg_len).astype(jnp.int32)
    running = lambda c: (c[1] < end) & (jnp.max(jnp.where(c[2] == MAX_STEPS, 1, 0)) > 0)  # max: Triton has it
    c = jax.lax.while_loop(running, lambda c: _advance(c, step, plan.tol, scale), c)
    return c[0], end, c[2], c[3]


def _start(X):
    """The initial carry (state, k, status, steps)."""
    from ..simulate import MAX_STEPS

    zeros = jnp.zeros(X[0].shape, jnp.int32)  # X: a tuple of (T,) rows or a (d n, T) array
    return X, jnp.zeros((), jnp.int32), zeros + MAX_STEPS, zeros


def _to_lanes(x0, multiple):
    """``(B, n, d)`` -> ``(d n, Bp)``, Bp a multiple of `multiple`, padded with copies of member 0 (a valid member,
    so nothing goes non-finite)."""
    B, n, d = x0.shape
    xt = jnp.transpose(x0, (2, 1, 0)).reshape(d * n, B)
    Bp = -(-B // multiple) * multiple
    if Bp != B:
        xt = jnp.concatenate([xt, jnp.broadcast_to(xt[:, :1], (d * n, Bp - B))], axis=1)
    return xt


def _from_lanes(x0, X, saved):
    """The lanes layout back to the vmapped path's: final ``(d n, Bp)`` -> ``(B, n, d)``, saved
    ``(n_seg, d n, Bp)`` -> trajectory ``(B, n_seg + 1, n, d)`` starting at ``x0`` (or None)."""
    B, n, d = x0.shape
    final = jnp.transpose(X[:, :B].reshape(d, n, B), (2, 1, 0))
    if saved is None:
        return final, None
    s = jnp.transpose(saved[:, :, :B].reshape(saved.shape[0], d, n, B), (3, 0, 2, 1))
    return final, jnp.concatenate([x0[:, None], s], axis=1)


def _weights(dyn: LayerMap):
    hd = dyn.attn.heads
    return hd.score_matrices(), hd.head_matrices()


def _scalars(A):
    """A traced (H, d, d) array -> nested lists of scalars (static indexing)."""
    H, d, _ = A.shape
    return [[[A[h, a, b] for b in range(d)] for a in range(d)] for h in range(H)]


def lane_layer_map(dyn: LayerMap, x0, steps: int, unroll: int = 1):
    """``steps`` layer maps of a batch in the lanes layout, in plain XLA (no Pallas), without the per-member
    bookkeeping of :func:`lanes_run` (the bare arithmetic, timed as ``attnflow_lanes`` by the benchmark suite).

    **Arguments:** `dyn`: a :class:`LayerMap` that :func:`fused_applies` accepts; `x0`: ``(B, n, d)``;
    `steps`: static step count. **Returns:** the final ``(B, n, d)`` state.
    """
    B, n, d = x0.shape
    ft = x0.dtype
    Ms, Ws = _weights(dyn)
    step = _make_step("map", _scalars(Ms.astype(ft)), _scalars(Ws.astype(ft)), dyn.attn.beta.astype(ft), dyn.alpha.astype(ft), d, n)
    xt = _to_lanes(x0, 1)
    X = jax.lax.fori_loop(0, steps, lambda _, X: step(X), tuple(xt[r] for r in range(d * n)), unroll=unroll)
    return _from_lanes(x0, jnp.stack(X), None)[0]


def _pack(dyn, ft, last):
    """The kernel's scalar parameters in one vector: M (H d d), W (H d d), beta, then ``last`` (alpha or dt)."""
    Ms, Ws = _weights(dyn)
    return jnp.concatenate(
        [Ms.astype(ft).ravel(), Ws.astype(ft).ravel(), jnp.stack([dyn.attn.beta.astype(ft), jnp.asarray(last).astype(ft)])]
    )


def _kernel(p_ref, x_ref, o_ref, st_ref, ns_ref, *saved_ref, H, d, n, kind, plan, unroll):
    """One program: ``block`` members, the whole run. ``x_ref``/``o_ref``: ``(d n, block)`` (row a n + i is
    coordinate a of token i); ``st_ref``/``ns_ref``: ``(1, block)`` status and step counts; ``saved_ref``:
    ``(n_seg, d n, block)`` when the trajectory is saved. Same per-member semantics as the vmapped path:
    stopped members are frozen, a non-finite step keeps the last finite state, and with ``tol`` the program
    leaves a segment's step loop as soon as all of its members have stopped."""
    dd, D = d * d, d * n
    M = [[[p_ref[h * dd + a * d + b] for b in range(d)] for a in range(d)] for h in range(H)]
    W = [[[p_ref[H * dd + h * dd + a * d + b] for b in range(d)] for a in range(d)] for h in range(H)]
    beta, last = p_ref[2 * H * dd], p_ref[2 * H * dd + 1]  # last: alpha (maps) or dt (flows)
    step = _make_step(kind, M, W, beta, last, d, n)
    scale = None if kind == "map" else last

    def segment(s, c):
        c = _segment(c, s, step, plan, scale, unroll)
        if saved_ref:
            for r in range(D):
                saved_ref[0][s, r, :] = c[0][r]
        return c

    X, _, st, ns = jax.lax.fori_loop(0, plan.n_seg, segment, _start(tuple(x_ref[r, :] for r in range(D))))
    for r in range(D):
        o_ref[r, :] = X[r]
    st_ref[0, :] = st
    ns_ref[0, :] = ns


def _gpu_params() -> dict:
    """Lower through Triton, whose one-thread-per-lane model this kernel is written for. (Recent JAX lowers
    ``pallas_call`` to Mosaic GPU by default, which rejects this kernel: its copies of the (d n, block) state
    are not multiples of a warpgroup.)"""
    from jax.experimental.pallas import triton as pltriton

    return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}


def _fused_local(x0, params, *, kind, plan, block, interpret, unroll=1):
    """The Pallas call on a local batch ``x0`` ``(B, n, d)``: ``(final, trajectory, status, steps)``, batch first."""
    from jax.experimental import pallas as pl

    B, n, d = x0.shape
    D, ft = d * n, x0.dtype
    H = (params.shape[0] - 2) // (2 * d * d)
    xt = _to_lanes(x0, block)
    Bp = xt.shape[1]
    kern = functools.partial(_kernel, H=H, d=d, n=n, kind=kind, plan=plan, unroll=int(unroll))
    lanes = pl.BlockSpec((D, block), lambda g: (0, g))
    row = pl.BlockSpec((1, block), lambda g: (0, g))
    out_shape = [jax.ShapeDtypeStruct((D, Bp), ft), jax.ShapeDtypeStruct((1, Bp), jnp.int32), jax.ShapeDtypeStruct((1, Bp), jnp.int32)]
    out_specs = [lanes, row, row]
    if plan.save:
        out_shape.append(jax.ShapeDtypeStruct((plan.n_seg, D, Bp), ft))
        out_specs.append(pl.BlockSpec((plan.n_seg, D, block), lambda g: (0, 0, g)))
    outs = pl.pallas_call(
        kern,
        out_shape=tuple(out_shape),
        grid=(Bp // block,),
        in_specs=[pl.BlockSpec(params.shape, lambda g: (0,)), lanes],
        out_specs=tuple(out_specs),
        interpret=interpret,
        **({} if interpret else _gpu_params()),
    )(params, xt)
    final, traj = _from_lanes(x0, outs[0], outs[3] if plan.save else None)
    return final, traj, outs[1][0, :B], outs[2][0, :B]


def fused_layer_map(dyn: LayerMap, x0, steps: int, *, block: int = 128, interpret: bool | None = None, unroll: int = 1):
    """``steps`` layer maps in one Pallas launch: the batch is tiled over the grid in blocks of
    ``block`` lanes, and each block's state stays on chip (registers) across all steps.

    **Arguments:**

    - `dyn`: a :class:`LayerMap` accepted by :func:`fused_applies` (softmax, full mask, L2Norm, no biases).
    - `x0`: ``(B, n, d)`` initial states (any B: padded to a multiple of `block`).
    - `steps`: static number of steps.
    - `block`: lanes per program (a power of two).
    - `interpret`: run the kernel through the Pallas interpreter (default: when the backend is not a GPU).
    - `unroll`: unroll factor of the in-kernel step loop.

    **Returns:** the final ``(B, n, d)`` state (a member whose step went non-finite keeps its last finite state,
    as in :func:`attnflow.simulate`).
    """
    from ..simulate import _Plan

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    plan = _Plan(n_seg=1, seg_len=int(steps), save=False, tol=None, continuous=False, adaptive=False, unroll=1)
    params = _pack(dyn, x0.dtype, dyn.alpha)
    return _fused_local(x0, params, kind="map", plan=plan, block=block, interpret=interpret, unroll=unroll)[0]


def _small_model(dyn, x0) -> bool:
    """The models the lanes arithmetic covers: a LayerMap with L2Norm or a SphereFlow, with softmax attention,
    full mask, no biases, scalar beta (and alpha), d <= 8, n <= 32."""
    from ...model.dynamics import SphereFlow

    if isinstance(dyn, LayerMap):
        if not isinstance(dyn.norm, L2Norm) or jnp.ndim(dyn.alpha):
            return False
    elif type(dyn) is not SphereFlow:
        return False
    att, hd = dyn.attn.attention, dyn.attn.heads
    if not (isinstance(att, Attention) and att.kind == "softmax" and att.mask == "full"):
        return False
    if any(b is not None for b in (hd.bq, hd.bk, hd.bv, hd.bo)):
        return False
    if jnp.ndim(dyn.attn.beta):
        return False
    _, n, d = x0.shape
    return d <= _MAX_D and n <= _MAX_N


FAILED: str | None = None
"""Why the fused kernel failed to compile in this process (set by :func:`attnflow.simulate`, which then
takes the XLA path for every later call), or None."""


def _interpret() -> bool:
    """Run Pallas through its interpreter: everywhere but on a GPU."""
    return jax.default_backend() != "gpu"


def fused_mode() -> str:
    """``"off"``, ``"on"`` (``ATTNFLOW_FUSED=1``: any backend, interpreted off the GPU) or ``"auto"`` (a GPU
    backend, ``ATTNFLOW_FUSED`` unset: :func:`attnflow.simulate` moves a workload to the kernel once the XLA path
    has spent as long on it as the kernel takes to compile; see ``simulate.FUSED_COMPILE_S_PER_COST``)."""
    env = os.environ.get("ATTNFLOW_FUSED", "")
    if env == "0" or FAILED is not None:
        return "off"
    if env == "1":
        return "on"
    return "auto" if jax.default_backend() == "gpu" else "off"


def fused_applies(dyn, x0, plan, solver=None) -> bool:
    """Whether the fused Pallas kernel (:func:`fused_run`) can run this call, and :func:`fused_mode` is not off:
    a small model (softmax attention, full mask, no biases, scalar beta, d <= 8, n <= 32): a :class:`LayerMap`
    with :class:`L2Norm` iterated by :class:`~attnflow.evolve.solvers.Iterate`, or a SphereFlow integrated by
    :class:`~attnflow.evolve.solvers.Euler` or :class:`~attnflow.evolve.solvers.RK4`, with unrolled size
    H n^2 d x stages <= :data:`MAX_COST`. Any ``tol``, ``saves`` and float dtype; sweeps and adaptive solves
    take the vmapped path. ``ATTNFLOW_FUSED=0`` turns it off; ``ATTNFLOW_FUSED=1`` turns it on for any backend
    and from the first call. Never after a failed compile in this process (:data:`FAILED`)."""
    return fused_mode() != "off" and _covered(dyn, x0, plan, solver)


def _covered(dyn, x0, plan, solver) -> bool:
    """The calls both lanes runners cover: a small model (``_small_model``) stepped by Iterate (maps) or by
    Euler/RK4 (sphere flows), not adaptive, with unrolled size at most :data:`MAX_COST`."""
    from ..solvers import RK4, Euler, Iterate

    if plan.adaptive:
        return False
    solver = Iterate() if solver is None and isinstance(dyn, LayerMap) else solver
    ok = type(solver) is Iterate if isinstance(dyn, LayerMap) else type(solver) in (Euler, RK4)
    return ok and _small_model(dyn, x0) and lanes_cost(dyn, x0, solver) <= MAX_COST


def _kind(dyn, solver) -> str:
    from ..solvers import RK4

    return "map" if isinstance(dyn, LayerMap) else ("rk4" if isinstance(solver, RK4) else "euler")


def fused_run(dyn, x0, plan, *, dt=1.0, solver=None, block: int = 128, shards: int = 1):
    """The ``(final, trajectory, status, steps)`` tuple of the vmapped path, member by member, from one launch
    of the fused kernel: each program evolves ``block`` members with their state in registers for the whole
    run (all segments, saves written as they come). With ``shards > 1`` the batch is split over the local
    devices with ``shard_map``. For a SphereFlow, `dt` is the step and `solver` an Euler or RK4 instance."""
    last = dyn.alpha if isinstance(dyn, LayerMap) else dt
    params = _pack(dyn, x0.dtype, last)
    f = functools.partial(_fused_local, kind=_kind(dyn, solver), plan=plan, block=block, interpret=_interpret())
    return _shard(f, plan, shards)(x0, params)


def _shard(f, plan, shards):
    """``f(x0, *replicated)`` with the batch axis of ``x0`` and of its four outputs split over ``shards``
    local devices (``f`` itself when ``shards == 1``)."""
    if shards <= 1:
        return f
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(jax.local_devices()[:shards], ("batch",))
    out_specs = (P("batch"), P("batch") if plan.save else None, P("batch"), P("batch"))

    def g(x0, *rest):
        in_specs = (P("batch"),) + (P(),) * len(rest)
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(x0, *rest)

    return g


# ----------------------------------------------------------------------------- tiled lanes path (CPU)
TILE = 1024
"""Ensemble members per tile of the lanes path: a tile's (d, n, TILE) state and its intermediates stay in
cache across all its steps, and with ``tol`` a tile stops when its own members have stopped (measured on a
2-core CPU, toy n = 10, d = 3, B = 20 000: tiles of 512-4096 all within 10%; see benchmarks/README.md)."""


MAX_COST = 1500
"""Largest unrolled size H n^2 d x (stages: 1 for maps and Euler, 4 for RK4) the lanes path compiles. Its
compile time grows with this size: on the 2-core CPU 3 s at 300 (n = 10, d = 3, one head), 9 s at 1200 (the
same with RK4), 11-12 s at 1500 (five heads), 264 s at 24 000 (n = 20, five heads, RK4); the vmapped path
compiles in 0.2-0.4 s."""

MIN_WORK = 1.2e5
"""The lanes path is taken when B x steps >= MIN_WORK x n x d: then the run time it saves (about 3x on the
vmapped path's ~1.2e7 token-steps/s per head and stage) exceeds its compile time (about 0.01 s per unit of
H n^2 d x stages). Smaller calls take the vmapped path, which compiles in well under a second."""


def lanes_cost(dyn, x0, solver=None) -> int:
    """The unrolled size H n^2 d x stages of the lanes program for this model and batch."""
    from ..solvers import RK4

    _, n, d = x0.shape
    return dyn.attn.heads.num_heads * n * n * d * (4 if isinstance(solver, RK4) else 1)


def lanes_applies(dyn, x0, plan, solver) -> bool:
    """Whether :func:`attnflow.simulate` runs ``dyn`` through :func:`lanes_run` (XLA, batch as lanes, tiled):
    a small model (see ``_small_model``): a LayerMap iterated by :class:`~attnflow.evolve.solvers.Iterate`,
    or a SphereFlow integrated by :class:`~attnflow.evolve.solvers.Euler` or
    :class:`~attnflow.evolve.solvers.RK4`, on a CPU backend. Any ``tol``, ``saves`` and dtype are supported;
    sweeps and adaptive solves take the vmapped path. The compiled size must be at most :data:`MAX_COST`, and
    the call large enough to repay the compile (:data:`MIN_WORK`). ``ATTNFLOW_LANES=0`` turns it off;
    ``ATTNFLOW_LANES=1`` turns it on for any backend and call size (still within :data:`MAX_COST`)."""
    env = os.environ.get("ATTNFLOW_LANES", "")
    if env == "0" or not _covered(dyn, x0, plan, solver):
        return False
    if env == "1":
        return True
    B, n, d = x0.shape
    return jax.default_backend() == "cpu" and B * plan.n_seg * plan.seg_len >= MIN_WORK * n * d


def _tile_run(x, step, plan, scale):
    """Evolve one tile ``x`` ``(d n, T)`` by the flat-row ``step`` with the per-member semantics of the vmapped
    path (:func:`_advance`); with ``tol`` the tile stops as soon as all its members have stopped. Returns the final
    tile, the saved states ``(n_seg, d n, T)`` (or None), status ``(T,)`` and steps ``(T,)``."""

    stacked = lambda X: jnp.stack(step(tuple(X)))  # one (d n, T) carry: see _over_rows

    def segment(c, s):
        c = _segment(c, s, stacked, plan, scale, plan.unroll)
        return c, (c[0] if plan.save else None)

    (X, _, st, ns), saved = jax.lax.scan(segment, _start(x), jnp.arange(plan.n_seg, dtype=jnp.int32))
    return X, saved, st, ns


def _lanes_local(x0, Ms, Ws, beta, last, *, kind, plan, tile):
    B, n, d = x0.shape
    ft, D = x0.dtype, d * n
    T = min(tile, B)
    xt = _to_lanes(x0, T)
    nt = xt.shape[1] // T
    tiles = jnp.moveaxis(xt.reshape(D, nt, T), 1, 0)  # (nt, D, T)
    last = last.astype(ft)
    step = _make_step(kind, _scalars(Ms.astype(ft)), _scalars(Ws.astype(ft)), beta.astype(ft), last, d, n)
    scale = None if kind == "map" else last
    X, saved, st, ns = jax.lax.map(lambda x: _tile_run(x, step, plan, scale), tiles)
    X = jnp.moveaxis(X, 0, 1).reshape(D, nt * T)
    if plan.save:  # (nt, n_seg, D, T) -> (n_seg, D, nt T)
        saved = jnp.moveaxis(saved, 0, 2).reshape(plan.n_seg, D, nt * T)
    final, traj = _from_lanes(x0, X, saved)
    return final, traj, st.reshape(-1)[:B], ns.reshape(-1)[:B]


def lanes_run(dyn, x0, plan, *, dt=1.0, solver=None, tile: int = TILE, shards: int = 1):
    """The ``(final, trajectory, status, steps)`` tuple of the vmapped path, computed in the lanes layout
    (see the module docstring) over tiles of ``tile`` members, one ``lax.map`` over tiles.

    Same semantics as the vmapped path, member by member; the arithmetic is ordered differently, so float32
    results agree to rounding (about 1e-5 after 1000 steps of a contracting map), not bit for bit. With
    ``shards > 1`` the batch axis is split over the local devices with ``shard_map``. For a SphereFlow,
    `dt` is the step and `solver` an Euler or RK4 instance."""
    Ms, Ws = _weights(dyn)
    last = dyn.alpha if isinstance(dyn, LayerMap) else jnp.asarray(dt)
    f = functools.partial(_lanes_local, kind=_kind(dyn, solver), plan=plan, tile=tile)
    return _shard(f, plan, shards)(x0, Ms, Ws, dyn.attn.beta, last)
