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


_CORES: list = []
_CORES_LOCK = __import__("threading").Lock()


def core_devices(count: int) -> list:
    """`count` CPU devices of this process, each of its own XLA client with a one-thread pool (``PJRT_NPROC=1`` when
    the client is made), made once per process and kept.

    **Why.** A study's pool is a loop of small kernels; on JAX's CPU client XLA hands them to a thread pool of one
    thread per core, and for kernels this small the hand-offs cost more than the second core gives. A client of one
    thread runs the same program without them, and two such clients run two pools at once, one per core, in this
    process: no worker process to start. Measured on the 2-core CPU (2026-12-04, the adaptive sphere flow of
    ``benchmarks/bench_peer_basins.py``, 10^4 members, warm): 0.51 s on JAX's client, 0.37 s on one one-thread
    client, 0.23 s on two; 10^5 members 1.7 s on two, as in two worker processes. (Two devices of JAX's one client
    share its thread pool, and their programs, run at once, were seen to deadlock there.) Speed only: a program
    computes the same bits on any of these clients (a study's pool steps in fixed tiles)."""
    import os

    from jaxlib import xla_client

    with _CORES_LOCK:
        while len(_CORES) < count:
            before = os.environ.get("PJRT_NPROC")
            os.environ["PJRT_NPROC"] = "1"  # read by XLA's CPU client when it is made
            try:
                client = xla_client.make_cpu_client(asynchronous=True)
            finally:
                os.environ.pop("PJRT_NPROC") if before is None else os.environ.update(PJRT_NPROC=before)
            _CORES.append(client.devices()[0])
        return _CORES[:count]


def on_device(tree, device):
    """`tree` with every JAX array leaf put on `device` (other leaves as they are)."""
    return jax.tree.map(lambda a: jax.device_put(a, device) if isinstance(a, jax.Array) else a, tree)
