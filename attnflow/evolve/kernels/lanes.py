"""The small-d layer map x_i <- normalize(x_i + alpha sum_h W_h sum_j softmax_j(beta x_i^T M_h x_j) x_j)
with the batch as the lane (fastest) dimension.

Layout: the state is held as d * n vectors of shape ``(B_tile,)``, one per (coordinate, token); every
per-token operation is elementwise on these vectors, and the weights (M_h = Q_h^T K_h, W_h = O_h V_h,
d x d each) are scalars. On a GPU each thread then owns one ensemble member and keeps its n d
coordinates in registers across all steps: no shared memory, no cross-lane traffic, one launch for
all steps. The ``(d, n, B)`` array in HBM is read once and written once.

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


def _step(xs, M, W, beta, alpha):
    """One layer map on lists: ``xs[a][i]`` is coordinate a of token i, a ``(B,)`` vector.

    ``M``, ``W``: nested Python lists of scalars (H x d x d); ``beta``, ``alpha``: scalars.
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
    out = [[None] * n for _ in range(d)]
    for i in range(n):
        y = [xs[a][i] + alpha * u[a][i] for a in range(d)]
        r2 = sum(ya * ya for ya in y)
        inv = jnp.where(r2 > 0, jax.lax.rsqrt(jnp.where(r2 > 0, r2, 1.0)), 1.0)
        for a in range(d):
            out[a][i] = y[a] * inv
    return out


def _weights(dyn: LayerMap):
    hd = dyn.attn.heads
    return hd.score_matrices(), hd.head_matrices()


def _scalars(A):
    """A traced (H, d, d) array -> nested lists of scalars (static indexing)."""
    H, d, _ = A.shape
    return [[[A[h, a, b] for b in range(d)] for a in range(d)] for h in range(H)]


def _loop(xs, M, W, beta, alpha, steps, unroll):
    d, n = len(xs), len(xs[0])

    def body(_, flat):
        x = [list(flat[a * n:(a + 1) * n]) for a in range(d)]
        y = _step(x, M, W, beta, alpha)
        return tuple(v for row in y for v in row)

    flat = tuple(v for row in xs for v in row)
    flat = jax.lax.fori_loop(0, steps, body, flat, unroll=unroll)
    return [list(flat[a * n:(a + 1) * n]) for a in range(d)]


def lane_layer_map(dyn: LayerMap, x0, steps: int, unroll: int = 1):
    """``steps`` layer maps of a batch in the lanes layout, in plain XLA (no Pallas).

    **Arguments:** `dyn`: a :class:`LayerMap` that :func:`fused_applies` accepts; `x0`: ``(B, n, d)``;
    `steps`: static step count. **Returns:** the final ``(B, n, d)`` state.
    """
    B, n, d = x0.shape
    dt = x0.dtype
    Ms, Ws = _weights(dyn)
    M, W = _scalars(Ms.astype(dt)), _scalars(Ws.astype(dt))
    beta, alpha = dyn.attn.beta.astype(dt), dyn.alpha.astype(dt)
    xt = jnp.transpose(x0, (2, 1, 0))  # (d, n, B)
    xs = [[xt[a, i] for i in range(n)] for a in range(d)]
    ys = _loop(xs, M, W, beta, alpha, steps, unroll)
    return jnp.transpose(jnp.stack([jnp.stack(r) for r in ys]), (2, 1, 0))


def _kernel(p_ref, x_ref, o_ref, *, H, d, n, steps, unroll):
    # p_ref: (2 H d d + 2,) scalars: M then W then beta, alpha.
    dd = d * d
    M = [[[p_ref[h * dd + a * d + b] for b in range(d)] for a in range(d)] for h in range(H)]
    W = [[[p_ref[H * dd + h * dd + a * d + b] for b in range(d)] for a in range(d)] for h in range(H)]
    beta, alpha = p_ref[2 * H * dd], p_ref[2 * H * dd + 1]
    xs = [[x_ref[a * n + i, :] for i in range(n)] for a in range(d)]
    ys = _loop(xs, M, W, beta, alpha, steps, unroll)
    for a in range(d):
        for i in range(n):
            o_ref[a * n + i, :] = ys[a][i]


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

    **Returns:** the final ``(B, n, d)`` state.
    """
    from jax.experimental import pallas as pl

    B, n, d = x0.shape
    dt = x0.dtype
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    Ms, Ws = _weights(dyn)
    H = Ms.shape[0]
    params = jnp.concatenate(
        [Ms.astype(dt).ravel(), Ws.astype(dt).ravel(), jnp.stack([dyn.attn.beta.astype(dt), dyn.alpha.astype(dt)])]
    )
    Bp = -(-B // block) * block
    xt = jnp.transpose(x0, (2, 1, 0)).reshape(d * n, B)
    if Bp != B:  # pad with copies of a valid member so nothing goes non-finite
        xt = jnp.concatenate([xt, jnp.broadcast_to(xt[:, :1], (d * n, Bp - B))], axis=1)
    kern = functools.partial(_kernel, H=H, d=d, n=n, steps=int(steps), unroll=int(unroll))
    out = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((d * n, Bp), dt),
        grid=(Bp // block,),
        in_specs=[
            pl.BlockSpec(params.shape, lambda g: (0,)),
            pl.BlockSpec((d * n, block), lambda g: (0, g)),
        ],
        out_specs=pl.BlockSpec((d * n, block), lambda g: (0, g)),
        interpret=interpret,
    )(params, xt)
    return jnp.transpose(out[:, :B].reshape(d, n, B), (2, 1, 0))


def fused_applies(dyn, x0, plan) -> bool:
    """Whether :func:`attnflow.simulate` may run ``dyn`` through the fused kernel: a GPU backend, a
    :class:`LayerMap` with softmax attention, full mask, :class:`L2Norm`, no biases, d <= 8, n <= 32,
    float32 states, a fixed number of steps with no ``tol``, no saved trajectory, no sweep.
    Set ``ATTNFLOW_FUSED=0`` to force the XLA path, ``ATTNFLOW_FUSED=1`` to force the kernel (interpreted
    off the GPU; for testing)."""
    env = os.environ.get("ATTNFLOW_FUSED", "")
    if env == "0":
        return False
    if not isinstance(dyn, LayerMap) or not isinstance(dyn.norm, L2Norm):
        return False
    att, hd = dyn.attn.attention, dyn.attn.heads
    if not (isinstance(att, Attention) and att.kind == "softmax" and att.mask == "full"):
        return False
    if any(b is not None for b in (hd.bq, hd.bk, hd.bv, hd.bo)):
        return False
    if jnp.ndim(dyn.attn.beta) or jnp.ndim(dyn.alpha):
        return False
    _, n, d = x0.shape
    if d > _MAX_D or n > _MAX_N or x0.dtype != jnp.float32 and env != "1":
        return False
    if plan.continuous or plan.adaptive or plan.tol is not None or plan.save:
        return False
    return env == "1" or jax.default_backend() == "gpu"


def fused_run(dyn, x0, plan):
    """The ``(final, trajectory, status, steps)`` tuple of the XLA path, from the fused kernel.

    Status is ``MAX_STEPS`` for finite final states and ``NONFINITE`` otherwise (the kernel does not
    keep the last finite state)."""
    from ..simulate import MAX_STEPS, NONFINITE

    steps = plan.n_seg * plan.seg_len
    X = fused_layer_map(dyn, x0, steps)
    ok = jnp.all(jnp.isfinite(X), axis=(1, 2))
    status = jnp.where(ok, MAX_STEPS, NONFINITE).astype(jnp.int32)
    return X, None, status, jnp.full(x0.shape[:1], steps, jnp.int32)
