"""Host data onto the device without a compile."""

from __future__ import annotations

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
