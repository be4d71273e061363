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


def final_segments(system: Flow | Map, y0, *, steps: int, dt: float = 1.0, tail: int = 64, stride: int = 1,
                   chunk: int = 65536):
    """Yield ``(start, stop, segment)`` chunk by chunk: ``segment`` ``(c, tail, m)`` (NumPy), the last ``tail``
    samples of each member, one every ``stride`` steps, after ``steps`` steps in all."""
    y0 = np.asarray(y0)
    if y0.ndim != 2:
        raise ValueError(f"initial states must have shape (batch, m), got {y0.shape}")
    if tail * stride > steps:
        raise ValueError(f"tail x stride = {tail * stride} exceeds the {steps} steps")
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
