"""Evolve a batch of states of any system and keep a short final segment, streamed in chunks (one compiled call per
chunk shape; the last chunk is padded)."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._system import Flow, Map, rk4_step


def _one(system, y0, dt, steps: int, tail: int, stride: int):
    """Run ``steps`` steps of one state; return its last ``tail`` samples, one every ``stride`` steps."""
    flow = isinstance(system, Flow)

    def advance(k, y):
        if flow:
            return rk4_step(system, k.astype(y.dtype) * dt, y, dt)
        return system.step(k, y)

    head = steps - tail * stride
    y = jax.lax.fori_loop(0, head, advance, system.space.project(y0))

    def sample(c, _):
        k, y = c
        y = jax.lax.fori_loop(k, k + stride, advance, y)
        return (k + stride, y), y

    (_, _), seg = jax.lax.scan(sample, (jnp.asarray(head, jnp.int32), y), None, length=tail)
    return seg


@functools.partial(eqx.filter_jit)
def _batch(system, y0, dt, steps, tail, stride):
    return jax.vmap(lambda y: _one(system, y, dt, steps, tail, stride))(y0)


def _check(system, y0, *, steps, dt, tail, stride, chunk):
    """Refuse bad inputs with one ValueError before any work."""
    if y0.ndim != 2:
        raise ValueError(f"initial states must have shape (batch, m), got {y0.shape}")
    if y0.shape[0] == 0 or y0.shape[1] == 0:
        raise ValueError(f"need at least one initial state of at least one coordinate, got shape {y0.shape}")
    if not np.issubdtype(y0.dtype, np.floating):
        raise ValueError(f"initial states must be real floating point, got dtype {y0.dtype} (use y0.astype(float))")
    for name, v, least in (("steps", steps, 1), ("tail", tail, 1), ("stride", stride, 1), ("chunk", chunk, 1)):
        if not (isinstance(v, (int, np.integer)) and v >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
    if not (np.isscalar(dt) and np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    if tail * stride > steps:
        raise ValueError(f"tail x stride = {tail * stride} exceeds the {steps} steps")
    m = y0.shape[1]
    space = system.space
    if space.periods and len(space.periods) != m:
        raise ValueError(f"the space has {len(space.periods)} coordinates, the state {m}")
    for block in space.spheres:
        if any(not 0 <= i < m for i in block):
            raise ValueError(f"sphere block {block} has a coordinate outside the state's {m}")
    y = jax.ShapeDtypeStruct((m,), jnp.asarray(y0[:1]).dtype)
    fn = (lambda v: system.vf(jnp.zeros((), v.dtype), v)) if isinstance(system, Flow) else (lambda v: system.step(0, v))
    try:
        out = jax.eval_shape(fn, y)
    except ValueError:
        raise
    except Exception as e:  # a user's function that fails on one state
        raise ValueError(f"the system's function fails on one state of shape ({m},): {type(e).__name__}: {e}") from None
    if getattr(out, "shape", None) != (m,):
        raise ValueError(f"the system's function must return shape ({m},) for a state of shape ({m},), got "
                         f"{getattr(out, 'shape', type(out).__name__)}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"the system's function must return real floating point values, got {out.dtype}")


def final_segments(system: Flow | Map, y0, *, steps: int, dt: float = 1.0, tail: int = 64, stride: int = 1,
                   chunk: int = 65536):
    """Yield ``(start, stop, segment)`` chunk by chunk: ``segment`` ``(c, tail, m)`` (NumPy), the last ``tail``
    samples of each member, one every ``stride`` steps, after ``steps`` steps in all."""
    y0 = np.asarray(y0)
    _check(system, y0, steps=steps, dt=dt, tail=tail, stride=stride, chunk=chunk)
    B = y0.shape[0]
    C = min(int(chunk), B)
    dt_arr = jnp.asarray(dt, jnp.asarray(y0[:1]).dtype)  # the dtype JAX computes in (float64 states: float32 without x64)
    for s in range(0, B, C):
        e = min(s + C, B)
        yb = y0[s:e]
        if e - s < C:
            yb = np.concatenate([yb, np.broadcast_to(yb[:1], (C - (e - s), yb.shape[1]))])
        seg = _batch(system, jnp.asarray(yb), dt_arr, int(steps), int(tail), int(stride))
        yield s, e, np.asarray(seg)[: e - s]
