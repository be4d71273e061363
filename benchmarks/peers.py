"""The peers: the same discrete layer map (and projected RK4 flow) written as a user would write it.

Every peer takes float32 weights Q, K, V: (H, dh, d), O: (H, d, dh), beta, alpha and a state
(B, n, d), and returns the state after ``steps`` steps. ``kind`` is ``"map"`` (x <- N(x + alpha u))
or ``"rk4"`` (projected RK4 of the sphere flow with step ``dt``).
"""

from __future__ import annotations

import os

import numpy as np


# ----------------------------------------------------------------------------- NumPy
def _np_drift_one(X, w):
    Q, K, V, O, beta = w["Q"], w["K"], w["V"], w["O"], w["beta"]
    U = np.zeros_like(X)
    for h in range(Q.shape[0]):
        q, k, v = X @ Q[h].T, X @ K[h].T, X @ V[h].T
        s = beta * (q @ k.T)
        s = s - s.max(axis=1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(axis=1, keepdims=True)
        U += (a @ v) @ O[h].T
    return U


def _np_drift_batched(X, w):
    q = np.einsum("hed,bnd->bhne", w["Q"], X)
    k = np.einsum("hed,bnd->bhne", w["K"], X)
    v = np.einsum("hed,bnd->bhne", w["V"], X)
    s = w["beta"] * np.einsum("bhie,bhje->bhij", q, k)
    s -= s.max(axis=-1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(axis=-1, keepdims=True)
    z = np.einsum("bhij,bhje->bhie", a, v)
    return np.einsum("hde,bhie->bid", w["O"], z)


def _np_normalize(Y):
    return Y / np.linalg.norm(Y, axis=-1, keepdims=True)


def _np_sphere_vf(drift, X, w):
    U = drift(X, w)
    return U - np.sum(U * X, axis=-1, keepdims=True) * X


def _np_evolve(drift, X, w, steps, kind, dt):
    X = X.copy()
    for _ in range(steps):
        if kind == "map":
            X = _np_normalize(X + w["alpha"] * drift(X, w))
        else:
            f = lambda Z: _np_sphere_vf(drift, Z, w)  # noqa: E731
            k1 = f(X)
            k2 = f(X + (dt / 2) * k1)
            k3 = f(X + (dt / 2) * k2)
            k4 = f(X + dt * k3)
            X = _np_normalize(X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))
    return X


def numpy_loop(w, kind="map", dt=None):
    """A Python loop over ensembles, each evolved with small matrix products (as in the papers' code)."""

    def run(X0, steps):
        return np.stack([_np_evolve(_np_drift_one, x, w, steps, kind, dt) for x in X0])

    return run


def numpy_batched(w, kind="map", dt=None):
    """The whole batch at once through einsum."""

    def run(X0, steps):
        return _np_evolve(_np_drift_batched, X0, w, steps, kind, dt)

    return run


# ----------------------------------------------------------------------------- PyTorch
def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


def _torch_fns(w, kind, dt, device):
    import torch

    T = {k: torch.as_tensor(np.asarray(w[k]), device=device) for k in ("Q", "K", "V", "O")}
    beta, alpha = float(w["beta"]), float(w["alpha"])

    def drift(X):
        q = torch.einsum("hed,bnd->bhne", T["Q"], X)
        k = torch.einsum("hed,bnd->bhne", T["K"], X)
        v = torch.einsum("hed,bnd->bhne", T["V"], X)
        a = torch.softmax(beta * (q @ k.transpose(-1, -2)), dim=-1)
        return torch.einsum("hde,bhie->bid", T["O"], a @ v)

    def normalize(Y):
        return Y / torch.linalg.vector_norm(Y, dim=-1, keepdim=True)

    def step(X):
        if kind == "map":
            return normalize(X + alpha * drift(X))

        def f(Z):
            U = drift(Z)
            return U - (U * Z).sum(-1, keepdim=True) * Z

        k1 = f(X)
        k2 = f(X + (dt / 2) * k1)
        k3 = f(X + (dt / 2) * k2)
        k4 = f(X + dt * k3)
        return normalize(X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))

    return step


def torch_peer(w, kind="map", dt=None, compile=False):
    """Eager (or ``torch.compile``d per step) batched PyTorch on the GPU if there is one, else the CPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # 2 intra-op threads spin-wait badly on a loaded 2-core CPU (18x slower, measured)
        torch.set_num_threads(int(os.environ.get("ATTNFLOW_BENCH_TORCH_THREADS", "1")))
    step = _torch_fns(w, kind, dt, device)
    if compile:
        step = torch.compile(step, dynamic=False)

    def run(X0, steps):
        with torch.no_grad():
            X = torch.as_tensor(np.asarray(X0), device=device)
            for _ in range(steps):
                X = step(X)
            if device == "cuda":
                torch.cuda.synchronize()
            return X.cpu().numpy()

    return run


# ----------------------------------------------------------------------------- plain JAX
def jax_plain(w, kind="map", dt=None):
    """The 20-line JAX a user writes: the step for one configuration, ``vmap``, ``lax.scan``, ``jit``."""
    import jax
    import jax.numpy as jnp

    Q, K, V, O = (jnp.asarray(w[k]) for k in ("Q", "K", "V", "O"))
    beta, alpha = float(w["beta"]), float(w["alpha"])

    def drift(X):  # X: (n, d)
        q, k, v = X @ jnp.swapaxes(Q, 1, 2), X @ jnp.swapaxes(K, 1, 2), X @ jnp.swapaxes(V, 1, 2)
        a = jax.nn.softmax(beta * q @ jnp.swapaxes(k, 1, 2), axis=-1)
        return jnp.sum((a @ v) @ jnp.swapaxes(O, 1, 2), axis=0)

    def normalize(Y):
        return Y / jnp.linalg.norm(Y, axis=-1, keepdims=True)

    def step(X):
        if kind == "map":
            return normalize(X + alpha * drift(X))
        f = lambda Z: (lambda U: U - jnp.sum(U * Z, -1, keepdims=True) * Z)(drift(Z))  # noqa: E731
        k1 = f(X)
        k2 = f(X + (dt / 2) * k1)
        k3 = f(X + (dt / 2) * k2)
        k4 = f(X + dt * k3)
        return normalize(X + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4))

    cache = {}

    def run(X0, steps):
        if steps not in cache:
            cache[steps] = jax.jit(
                lambda X: jax.lax.scan(lambda c, _: (jax.vmap(step)(c), None), X, None, length=steps)[0]
            )
        return cache[steps](jnp.asarray(X0)).block_until_ready()

    return run
