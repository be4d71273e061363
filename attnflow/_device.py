"""Host data onto the device without a compile, and brief programs compiled cheaply."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def device_array(x, dtype=None, device=None):
    """`x` as a JAX array of `dtype` (canonical: float64 is float32 unless x64 is on), on `device`. Host data goes
    through ``jax.device_put``: ``jnp.asarray`` of host data compiles a small program per shape and dtype (JAX
    0.10), 10-90 ms each in a new process. Values round as ``jnp.asarray`` rounds them (to nearest)."""
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, dtype)
    if isinstance(x, jax.Array):
        out = x if dtype is None or x.dtype == jnp.dtype(dtype) else x.astype(dtype)
        return out if device is None else jax.device_put(out, device)
    a = np.asarray(x)
    a = a.astype(jax.dtypes.canonicalize_dtype(a.dtype if dtype is None else dtype), copy=False)
    return jax.device_put(a, device)


BRIEF_CPU = {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 1}
"""XLA options for programs that run briefly, on a CPU: the older loop emitters and LLVM at -O1."""


def brief_jit(fun):
    """``eqx.filter_jit(fun)`` for a program whose compile outweighs its run (a study's sampler, the certificates'
    Jacobians, the stability Jacobians, the refinement of equilibria): on a CPU it is compiled with
    :data:`BRIEF_CPU`, in a third to two thirds of the time, which counts in a new process (2-core CPU: the sphere
    sampler for 10^4 samples 0.35 -> 0.11 s, the certificates' Jacobians 0.34 -> 0.15 s, the stability Jacobians
    0.57 -> 0.37 s, the refinement 1.96 -> 1.19 s), and runs as fast (measured for 1 to 2000 states). The samples
    drawn are bit for bit those of the default compile (tests/test_sample.py); other results may differ in their last
    bits. Other backends: the defaults."""
    default, cpu = eqx.filter_jit(fun), eqx.filter_jit(fun, compiler_options=BRIEF_CPU)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return (cpu if jax.default_backend() == "cpu" else default)(*args, **kwargs)

    return call


def tile_loop(body, count: int, carry):
    """``fori_loop(0, count, body, carry)`` over the tiles of a fixed-width computation, with the trip count hidden
    from XLA (an optimisation barrier), so that one tile compiles exactly as many do (a loop of one trip would be
    inlined into its surroundings and rounded differently). Used where a result must not depend on how many members
    are computed together (a study's pool, its sampler)."""
    return jax.lax.fori_loop(0, jax.lax.optimization_barrier(jnp.int32(count)), body, carry)
