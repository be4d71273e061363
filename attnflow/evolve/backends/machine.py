"""The per-member step machine shared by the lanes and fused backends: the state of a tile (or of a Pallas
program) is ``d n`` rows of ``(T,)`` lanes; only running members move, a non-finite step keeps the last finite
state, and with ``tol`` a member stops once its change is below tol -- the semantics of the vmapped path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..outcome import CERTIFIED, CONVERGED, NONFINITE, NOT_CONVERGED


def over_rows(op, v, chain: bool = False):
    """Reduce over the rows of a state: a tuple of ``(T,)`` rows (the Pallas kernel: Triton tensors must have
    power-of-two sizes) or a ``(d n, T)`` array (the XLA path: CPU loops run far faster with one array carry). With
    `chain` (the lanes backend) an array's rows are combined by a chain of elementwise operations, which XLA fuses
    with the batch-last step, instead of a reduce (a kernel of its own): measured, the toy layer map at 5.4e6 against
    4.3e6 member-steps/s (256 members, float32, the 2-core CPU); the xla backend keeps the reduce."""
    if isinstance(v, tuple):
        return functools.reduce(op, v)
    if chain:
        return functools.reduce(op, [v[r] for r in range(v.shape[0])])
    return op.reduce(v, axis=0)


def advance(c, step, tol, scale, cap=None, check=None, chain=False):
    """One step of every member. ``c``: (state, k, status, steps), plus the region tag with `check`; ``step(X, k)``
    maps a state (rows, see :func:`over_rows`) to the next in the same form; with ``tol`` a member whose max-abs
    change (divided by ``scale``, dt for flows) is below tol stops as converged. With ``cap``, a member that has
    taken ``cap`` steps no longer moves (its status stays "not_converged"). With ``check`` (``check(Y) -> (hit,
    tag)``, :mod:`attnflow.evolve.regions`), a member whose new state lies in a certified region stops as
    certified with that region's tag (unless the same step also meets tol: converged). `chain`: see
    :func:`over_rows`."""
    X, k, st, ns = c[:4]
    Y = step(X, k)
    rowwise = (lambda f, *a: tuple(map(f, *a))) if isinstance(Y, tuple) else (lambda f, *a: f(*a))
    finite = over_rows(jnp.logical_and, rowwise(jnp.isfinite, Y), chain)
    new = jnp.where(finite, st, NONFINITE)
    if check is not None:
        hit, tag_new = check(Y)
        new = jnp.where(finite & hit, CERTIFIED, new)
    if tol is not None:
        change = over_rows(jnp.maximum, rowwise(lambda y, x: jnp.abs(y - x), Y, X), chain)
        if scale is not None:
            change = change / scale
        new = jnp.where(finite & (change < tol), CONVERGED, new)
    run = st == NOT_CONVERGED
    if cap is not None:
        run = run & (ns < cap)
    keep = run & finite
    X = rowwise(lambda y, x: jnp.where(keep, y, x), Y, X)
    out = (X, k + 1, jnp.where(run, new, st), ns + run.astype(ns.dtype))
    if check is None:
        return out
    return out + (jnp.where(run & (new == CERTIFIED), tag_new, c[4]),)


def segment(c, s, step, plan, scale, unroll, chain=False):
    """The steps of segment ``s``: all ``plan.seg_len`` of them, or with ``tol`` until every member of the
    tile (program) has stopped."""
    if plan.tol is None:
        return jax.lax.fori_loop(0, plan.seg_len, lambda _, c: advance(c, step, None, scale, chain=chain), c, unroll=unroll)
    end = ((s + 1) * plan.seg_len).astype(jnp.int32)
    running = lambda c: (c[1] < end) & (jnp.max(jnp.where(c[2] == NOT_CONVERGED, 1, 0)) > 0)  # max: Triton has it
    c = jax.lax.while_loop(running, lambda c: advance(c, step, plan.tol, scale, chain=chain), c)
    return c[0], end, c[2], c[3]


def start(X):
    """The initial carry (state, k, status, steps)."""
    zeros = jnp.zeros(X[0].shape, jnp.int32)  # X: a tuple of (T,) rows or a (d n, T) array
    return X, jnp.zeros((), jnp.int32), zeros + NOT_CONVERGED, zeros


def to_lanes(x0, multiple):
    """``(B, n, d)`` -> ``(d n, Bp)``, Bp a multiple of `multiple`, padded with copies of member 0 (a valid member,
    so nothing goes non-finite)."""
    B, n, d = x0.shape
    xt = jnp.transpose(x0, (2, 1, 0)).reshape(d * n, B)
    Bp = -(-B // multiple) * multiple
    if Bp != B:
        xt = jnp.concatenate([xt, jnp.broadcast_to(xt[:, :1], (d * n, Bp - B))], axis=1)
    return xt


def from_lanes(x0, X, saved):
    """The lanes layout back to the vmapped path's: final ``(d n, Bp)`` -> ``(B, n, d)``, saved
    ``(n_seg, d n, Bp)`` -> trajectory ``(B, n_seg + 1, n, d)`` starting at ``x0`` (or None)."""
    B, n, d = x0.shape
    final = jnp.transpose(X[:, :B].reshape(d, n, B), (2, 1, 0))
    if saved is None:
        return final, None
    s = jnp.transpose(saved[:, :, :B].reshape(saved.shape[0], d, n, B), (3, 0, 2, 1))
    return final, jnp.concatenate([x0[:, None], s], axis=1)


def shard(f, plan, shards):
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
