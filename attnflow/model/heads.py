"""Stacked per-head weights and the self-attention drift u_i = sum_h W_h sum_j a^h_ij x_j.

Formulas: docs/model.md sections 1-2. Matrices act on column vectors; tokens are rows of X.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._device import device_array
from .._types import Array, Float, Tokens
from .attention import Attention, allowed

AUTO_DENSE_MAX = 512
"""``key_block="auto"`` keeps the dense (n, n) attention up to this many tokens (per member, 512^2 scores of 4 or 8
bytes per head: 1-2 MiB); above it the keys stream in blocks of :data:`AUTO_BLOCK`."""

AUTO_BLOCK = 256
"""The key block of ``key_block="auto"`` above :data:`AUTO_DENSE_MAX` tokens."""


def _float(x):
    """`x` as a floating array that is never weakly typed (so jit caches do not split on Python floats): a tracer as
    it is, else on the host (NumPy; integers as JAX's default float, half precision as float32, as the weight loaders
    do), so that no eager XLA compile runs."""
    if isinstance(x, jax.core.Tracer):
        return x
    a = np.asarray(x)
    if jnp.issubdtype(a.dtype, jnp.floating):  # half precision (float16, bfloat16) is computed in float32
        return a if a.dtype.itemsize >= 4 else a.astype(np.float32)
    return a.astype(jnp.result_type(float))


def _as_float_array(x):
    """:func:`_float` on the device (:func:`attnflow._device.device_array`: host data without a compile)."""
    x = _float(x)
    return x if isinstance(x, jax.core.Tracer) else device_array(x)


def check_positive(name: str, x):
    """Refuse a concrete `x` (any shape: a swept array too) unless every entry is finite and > 0; tracers pass (they
    were checked where they were made concrete)."""
    if isinstance(x, jax.core.Tracer):
        return x
    a = np.asarray(x)
    if a.size and not (np.all(np.isfinite(a)) and np.all(a > 0)):
        shown = f"{float(a)}" if a.ndim == 0 else f"{a.tolist()}"[:80]
        raise ValueError(f"{name} must be a finite number > 0, got {shown}")
    return x


def check_scalar(name: str, x):
    """Refuse an `x` (concrete or traced) that is not a single number (shape ``()``) where it enters the arithmetic:
    a beta or alpha of shape (H,), (d,) or (n, 1) would broadcast silently against the per-head, per-coordinate or
    per-token axes and give a wrong drift or step without an error. A model may hold an array of values to be
    ``jax.vmap``-ed over (each member then sees one number); sweeps pass one traced scalar per member."""
    shape = tuple(np.shape(x)) if not isinstance(x, jax.core.Tracer) else tuple(x.shape)
    if shape != ():
        raise ValueError(f"{name} must be a single number (shape ()) where it is used, got an array of shape {shape}; "
                         f"sweep values with attnflow.sweep(..., {name}=[...]) or vmap over the model")
    return x


def _opt(x):
    return None if x is None else _as_float_array(x)


class Heads(eqx.Module):
    """Weights of H attention heads of width d_h acting on R^d.

    **Arguments:**

    - `Q`, `K`, `V`: ``(H, d_h, d)`` query, key and value matrices.
    - `O`: ``(H, d, d_h)`` output matrices; W_h = O_h V_h.
    - `bq`, `bk`, `bv`: optional ``(H, d_h)`` biases; `bo`: optional ``(d,)`` output bias
      (real transformers; docs/model.md's equations have none).
    """

    Q: Float[Array, "h dh d"] = eqx.field(converter=_as_float_array)
    K: Float[Array, "h dh d"] = eqx.field(converter=_as_float_array)
    V: Float[Array, "h dh d"] = eqx.field(converter=_as_float_array)
    O: Float[Array, "h d dh"] = eqx.field(converter=_as_float_array)
    bq: Float[Array, "h dh"] | None = eqx.field(default=None, converter=_opt)
    bk: Float[Array, "h dh"] | None = eqx.field(default=None, converter=_opt)
    bv: Float[Array, "h dh"] | None = eqx.field(default=None, converter=_opt)
    bo: Float[Array, " d"] | None = eqx.field(default=None, converter=_opt)

    def __check_init__(self):
        if self.Q.ndim != 3:
            raise ValueError(f"Q must have shape (heads, dh, d), got {self.Q.shape}")
        h, dh, d = self.Q.shape
        want = {"Q": (h, dh, d), "K": (h, dh, d), "V": (h, dh, d), "O": (h, d, dh)}
        for name, shape in want.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"{name} must have shape {shape} (heads, dh, d = {h}, {dh}, {d}), got {got}")
        for name, shape in {"bq": (h, dh), "bk": (h, dh), "bv": (h, dh), "bo": (d,)}.items():
            b = getattr(self, name)
            if b is not None and b.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {b.shape}")
        for name in ("Q", "K", "V", "O", "bq", "bk", "bv", "bo"):  # NaN weights: every member 'nonfinite', no reason
            a = getattr(self, name)
            if a is not None and not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(a))):
                raise ValueError(f"{name} has non-finite entries (NaN or inf): the weights must be finite")

    @classmethod
    def single(cls, V, Q=None, K=None) -> "Heads":
        """One head with O = I and d_h = d (so W = V). Q and K default to the identity."""
        V = _float(V)  # the field converters put the stacks on the device
        if V.ndim != 2 or V.shape[0] != V.shape[1]:
            raise ValueError(f"V must be a square (d, d) matrix, got shape {V.shape}")
        eye = np.eye(V.shape[0], dtype=V.dtype)
        Q = eye if Q is None else _float(Q)
        K = eye if K is None else _float(K)
        for name, M in (("Q", Q), ("K", K)):
            if M.shape != V.shape:
                raise ValueError(f"{name} must be a (d, d) matrix like V, {V.shape}, got shape {M.shape}")
        return cls(Q=Q[None], K=K[None], V=V[None], O=eye[None])

    @property
    def num_heads(self) -> int:
        """H, the number of heads."""
        return self.Q.shape[0]

    @property
    def head_dim(self) -> int:
        """d_h, the width of each head."""
        return self.Q.shape[1]

    @property
    def dim(self) -> int:
        """d, the token dimension."""
        return self.Q.shape[2]

    def head_matrices(self) -> Float[Array, "h d d"]:
        """W_h = O_h V_h."""
        return jnp.einsum("hde,hef->hdf", self.O, self.V)

    def layer_matrix(self) -> Float[Array, "d d"]:
        """W = sum_h O_h V_h."""
        return jnp.sum(self.head_matrices(), axis=0)

    def score_matrices(self) -> Float[Array, "h d d"]:
        """M_h = Q_h^T K_h, so <Q_h x, K_h y> = x^T M_h y."""
        return jnp.einsum("hed,hef->hdf", self.Q, self.K)

    def astype(self, dtype) -> "Heads":
        """The same heads with every array cast to dtype."""
        return jax.tree.map(lambda a: a.astype(dtype), self)


class SelfAttention(eqx.Module):
    """Multi-head self-attention with inverse temperature beta: X (n, d) -> drift U (n, d).

    **Arguments:**

    - `heads`: the weights, a :class:`Heads`.
    - `attention`: the kernel and mask, an :class:`Attention`.
    - `beta`: inverse temperature, a scalar array (swept values stay arrays: no recompilation).
    - `key_block`: how the attention is formed: None, the dense ``(h, n, n)`` matrices; an integer b, streamed over
      blocks of b keys with running sums per query (the online softmax, docs/model.md section 2; memory O(n b) per
      member, for thousands of tokens; every kernel but ``sinkhorn``); ``"auto"`` (default), dense up to
      :data:`AUTO_DENSE_MAX` tokens, streamed in blocks of :data:`AUTO_BLOCK` above.
    """

    heads: Heads
    attention: Attention = eqx.field(default_factory=Attention)
    beta: Float[Array, ""] = eqx.field(default=1.0, converter=_as_float_array)
    key_block: int | str | None = eqx.field(static=True, default="auto")

    def __check_init__(self):
        check_positive("beta", self.beta)
        kb = self.key_block
        if not (kb is None or kb == "auto" or (isinstance(kb, int) and not isinstance(kb, bool) and kb >= 1)):
            raise ValueError(f"key_block must be None (dense), 'auto' or a block size >= 1, got {kb!r}")
        if isinstance(kb, int) and not self.attention.streams:
            raise ValueError(f"attention kind {self.attention.kind!r} needs the whole attention matrix: key_block "
                             "must be None or 'auto'")

    def block_size(self, n: int) -> int | None:
        """The key block of the streamed path for n tokens, or None for the dense path: `key_block`, or for
        ``"auto"`` :data:`AUTO_BLOCK` keys when n > :data:`AUTO_DENSE_MAX` and the kernel streams (a pure
        function of the shapes)."""
        if self.key_block == "auto":
            return AUTO_BLOCK if n > AUTO_DENSE_MAX and self.attention.streams else None
        return self.key_block

    def _small_d(self) -> bool:
        """Contract through the d x d matrices M_h, W_h (cheaper when d <= 2 d_h) rather than the
        d_h-dimensional projections. Decided from static shapes, so it costs nothing at run time."""
        return self.heads.dim <= 2 * self.heads.head_dim

    def _factors(self, X: Tokens):
        """``(q, k, scale)`` with ``s^h_ij = scale <q^h_i, k^h_j>`` (k ``(n, e)`` shared by the heads, or
        ``(h, n, e)``; scale None for 1): the one place the scores' arithmetic is written."""
        hd = self.heads
        if not jnp.issubdtype(X.dtype, jnp.floating):  # beta.astype(int) would truncate beta (and M_h) silently
            raise TypeError(f"tokens must be floating point, got dtype {X.dtype}: pass X.astype(float)")
        if X.ndim != 2 or X.shape[-1] != hd.dim:
            raise ValueError(f"tokens must have shape (n, d) with d = {hd.dim} (one configuration; vmap over a batch), "
                             f"got shape {tuple(X.shape)}")
        beta = check_scalar("beta", self.beta).astype(X.dtype)  # beta (H,) would scale the columns of M_h, not heads
        if self._small_d() and hd.bq is None and hd.bk is None:
            XM = jnp.einsum("nd,hde->hne", X, (beta * hd.score_matrices()).astype(X.dtype))  # beta folded into M_h
            return XM, X, None
        q = jnp.einsum("hed,nd->hne", hd.Q, X)
        k = jnp.einsum("hed,nd->hne", hd.K, X)
        if hd.bq is not None:
            q = q + hd.bq[:, None, :]
        if hd.bk is not None:
            k = k + hd.bk[:, None, :]
        return q, k, beta

    @staticmethod
    def _scores_of(q, k, scale):
        s = jnp.einsum("hne,me->hnm", q, k) if k.ndim == 2 else jnp.einsum("hie,hje->hij", q, k)
        return s if scale is None else scale * s

    def scores(self, X: Tokens) -> Float[Array, "h n n"]:
        """s^h_ij = beta <Q_h x_i + bq_h, K_h x_j + bk_h>."""
        return self._scores_of(*self._factors(X))

    def weights(self, X: Tokens) -> Float[Array, "h n n"]:
        """Attention matrices a^h_ij, one per head."""
        return jax.vmap(self.attention)(self.scores(X))

    def _values(self, X: Tokens):
        """``(values, small)``: X itself (``(n, d)``, shared by the heads) on the W_h path (small True), else
        ``V_h X + bv_h`` ``(h, n, e)``."""
        hd = self.heads
        if self._small_d() and hd.bv is None:
            return X, True
        v = jnp.einsum("hed,nd->hne", hd.V, X)
        if hd.bv is not None:
            v = v + hd.bv[:, None, :]
        return v, False

    def _mixed(self, X: Tokens):
        """Per-head attention-weighted inputs: (A_h X, True) for the W_h path, (A_h (V_h X + bv_h), False) otherwise;
        over blocks of keys (memory O(n b), not O(n^2)) when :meth:`block_size` gives a block."""
        b = self.block_size(X.shape[0])
        if b is not None:
            return self._mixed_streamed(X, b)
        a = self.weights(X)
        v, small = self._values(X)
        if small:
            return jnp.einsum("hij,jd->hid", a, v), True
        return jnp.einsum("hij,hje->hie", a, v), False

    def _mixed_streamed(self, X: Tokens, b: int):
        """:meth:`_mixed` with the keys taken b at a time (a scan over ceil(n / b) blocks; the kernel's
        :meth:`~attnflow.Attention.block` accumulates each block into running sums per query), so that no
        ``(n, n)`` array is formed. The scores, values and allowed set are those of the dense path."""
        n = X.shape[0]
        q, k, scale = self._factors(X)
        v, small = self._values(X)
        H = q.shape[0]
        k = jnp.broadcast_to(k, (H,) + k.shape) if k.ndim == 2 else k
        v = jnp.broadcast_to(v, (H,) + v.shape) if v.ndim == 2 else v
        nb = -(-n // b)
        pad = nb * b - n
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0)))
        att = self.attention
        rows = jnp.arange(n)[:, None]

        def step(carry, t):
            j = t * b + jnp.arange(b)[None, :]
            kb = jax.lax.dynamic_slice_in_dim(k, t * b, b, axis=1)
            vb = jax.lax.dynamic_slice_in_dim(v, t * b, b, axis=1)
            s = self._scores_of(q, kb, scale)  # (h, n, b)
            keep = allowed(rows, j, att.mask, att.window) & (j < n)
            return jax.vmap(lambda c, sh, vh: att.block(c, sh, keep, vh))(carry, s, vb), None

        e = v.shape[-1]
        init = (jnp.full((H, n), -jnp.inf, X.dtype), jnp.zeros((H, n), X.dtype), jnp.zeros((H, n, e), X.dtype))
        carry, _ = jax.lax.scan(step, init, jnp.arange(nb))
        return jax.vmap(lambda c: att.finish(c, n))(carry), small

    def head_outputs(self, X: Tokens) -> Float[Array, "h n d"]:
        """f^h_i = O_h sum_j a^h_ij (V_h x_j + bv_h); the drift is their sum (plus bo)."""
        z, small = self._mixed(X)
        if small:
            return jnp.einsum("hed,hid->hie", self.heads.head_matrices().astype(X.dtype), z)
        return jnp.einsum("hde,hie->hid", self.heads.O, z)

    def __call__(self, X: Tokens) -> Tokens:
        """The drift u_i = sum_h f^h_i (+ bo), contracted over heads without materialising each f^h."""
        z, small = self._mixed(X)
        if small:
            u = jnp.einsum("hed,hid->ie", self.heads.head_matrices().astype(X.dtype), z)
        else:
            u = jnp.einsum("hde,hie->id", self.heads.O, z)
        if self.heads.bo is not None:
            u = u + self.heads.bo
        return u.astype(X.dtype)
