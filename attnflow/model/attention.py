"""Attention kernels and masks: scores (n, n) -> attention matrix (n, n).

Formulas: docs/model.md section 2. Row i of the result holds the weights a_ij token i gives token j.
"""

from __future__ import annotations

import numbers

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, AttnMatrix, Bool, Scores

KINDS = ("softmax", "unnormalized", "uniform", "relu", "sinkhorn")
MASKS = ("full", "causal", "window")


WINDOW_MAX = 2**31 - 1
"""The largest window width: token indices are int32 (a window wider than the sequence is the causal mask)."""


def parse_mask(spec: str) -> tuple[str, int | None]:
    """Parse ``"full"``, ``"causal"`` or ``"window:W"`` (an integer 1 <= W <= 2^31 - 1) into ``(mask, window)``;
    a ``ValueError`` with a short message otherwise."""
    spec = str(spec).strip()
    shown = repr(spec) if len(spec) <= 40 else repr(spec[:37] + "...")
    if spec in ("full", "causal"):
        return spec, None
    if spec.startswith("window:"):
        w = spec.split(":", 1)[1].strip()
        if not (w.isascii() and w.isdigit()):
            raise ValueError(f"mask 'window:W' needs an integer W >= 1, got {shown}")
        w = w.lstrip("0") or "0"
        if len(w) > len(str(WINDOW_MAX)) or not 1 <= int(w) <= WINDOW_MAX:
            raise ValueError(f"mask 'window:W' needs an integer W in [1, {WINDOW_MAX}], got {shown}")
        return "window", int(w)
    raise ValueError(f"unknown mask {shown}; expected 'full', 'causal' or 'window:W'")


def allowed_set(n: int, mask: str, window: int | None = None) -> Bool[Array, "n n"]:
    """The allowed set N(i) as a boolean (n, n) matrix: ``allowed[i, j]`` iff j in N(i)."""
    return allowed(jnp.arange(n)[:, None], jnp.arange(n)[None, :], mask, window)


def allowed(i, j, mask: str, window: int | None = None):
    """Whether key j is in N(i), for broadcastable integer index arrays i (queries) and j (keys)."""
    if mask == "full":
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(i), jnp.shape(j)), dtype=bool)
    if mask == "causal":
        return j <= i
    if mask == "window":
        return (j <= i) & (i - j < window)
    raise ValueError(f"unknown mask {mask!r}")


def softmax(s: Scores, axis: int = -1) -> AttnMatrix:
    """exp(s_ij - m_i) / sum_j exp(s_ij - m_i) with m_i = max_j s_ij (entries of -inf get weight 0), computed as
    one reciprocal per row times the exponentials."""
    m = jax.lax.stop_gradient(jnp.max(s, axis=axis, keepdims=True))
    e = jnp.exp(s - m)
    return e * (1.0 / jnp.sum(e, axis=axis, keepdims=True))


def _safe_div(num, den):
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


class Attention(eqx.Module):
    """An attention kernel with a mask.

    **Arguments:**

    - `kind`: one of ``softmax``, ``unnormalized`` (exp(s)/n), ``uniform`` (1/|N(i)|, the multi-agent
      Oja flow), ``relu`` (max(s, 0)/n) or ``sinkhorn`` (doubly stochastic scaling of exp(s)).
    - `mask`: ``full``, ``causal`` or ``window`` (|i - j| < window and j <= i).
    - `window`: the window width W, an integer, for ``mask="window"`` only (None otherwise).
    - `sinkhorn_iters`: k, an integer >= 1, the number of row normalisations (k = 1 is softmax).
    - `relu_normalize`: divide relu weights by their row sum instead of n.
    """

    kind: str = eqx.field(static=True, default="softmax")
    mask: str = eqx.field(static=True, default="full")
    window: int | None = eqx.field(static=True, default=None)
    sinkhorn_iters: int = eqx.field(static=True, default=3)
    relu_normalize: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; expected one of {', '.join(MASKS)}")
        def integer(v):  # 2.5 would pass a range check and then act as 3 (i - j < 2.5); True as 1
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if self.mask == "window" and not (integer(self.window) and 1 <= self.window <= WINDOW_MAX):
            raise ValueError(f"mask='window' needs an integer 1 <= window <= {WINDOW_MAX}, got {self.window!r}")
        if self.mask != "window" and self.window is not None:
            raise ValueError(f"window={self.window!r} is only for mask='window' (it would be ignored by mask={self.mask!r})")
        if not (integer(self.sinkhorn_iters) and self.sinkhorn_iters >= 1):
            raise ValueError(f"sinkhorn_iters must be an integer >= 1, got {self.sinkhorn_iters!r}")

    @property
    def streams(self) -> bool:
        """Whether the kernel is a row-wise function of each row's scores that can be accumulated over blocks of
        keys (every kind but ``sinkhorn``, whose column sweeps need the whole matrix)."""
        return self.kind != "sinkhorn"

    def block(self, carry, scores, keep, values):
        """Fold one block of keys into the running sums of each query row: ``carry = (m, l, acc)`` (running max
        of the scores, the sum of the weights before normalisation, the weighted sum of the values, ``(n,)``,
        ``(n,)``, ``(n, e)``), `scores` ``(n, b)`` of the block, `keep` ``(n, b)`` its allowed set (and the padding),
        `values` ``(b, e)``. The softmax is the online softmax: sums taken relative to the running max, rescaled
        by exp(m_old - m_new) when the max grows. :meth:`finish` gives the rows of ``A @ values``."""
        m, l, acc = carry
        if self.kind == "softmax":
            s = jnp.where(keep, scores, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet: all weights 0
            e = jnp.exp(s - ref[:, None])
            r = jnp.exp(m - ref)
            return m_new, l * r + jnp.sum(e, axis=-1), acc * r[:, None] + e @ values
        if self.kind == "unnormalized":
            w = jnp.where(keep, jnp.exp(jnp.where(keep, scores, 0.0)), 0.0)
        elif self.kind == "uniform":
            w = keep.astype(scores.dtype)
        elif self.kind == "relu":
            w = jnp.where(keep, jnp.maximum(scores, 0.0), 0.0)
        else:
            raise ValueError(f"attention kind {self.kind!r} cannot be computed over blocks of keys")
        return m, l + jnp.sum(w, axis=-1), acc + w @ values

    def finish(self, carry, n: int):
        """The rows ``sum_j a_ij values_j`` from the running sums of :meth:`block` (n the number of keys)."""
        m, l, acc = carry
        if self.kind in ("softmax", "uniform"):
            return acc * (1.0 / l)[:, None]
        if self.kind == "relu" and self.relu_normalize:
            return acc * _safe_div(jnp.ones_like(l), l)[:, None]
        return acc / n

    def __call__(self, scores: Scores) -> AttnMatrix:
        """Attention matrix from the scores s_ij = beta <q_i, k_j>."""
        n = scores.shape[-1]
        allowed = allowed_set(n, self.mask, self.window)
        dtype = scores.dtype
        if self.kind == "softmax":
            return softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        if self.kind == "unnormalized":
            return jnp.where(allowed, jnp.exp(jnp.where(allowed, scores, 0.0)), 0.0) / n
        if self.kind == "uniform":
            a = allowed.astype(dtype)
            return a / jnp.sum(a, axis=-1, keepdims=True)
        if self.kind == "relu":
            r = jnp.where(allowed, jnp.maximum(scores, 0.0), 0.0)
            if self.relu_normalize:
                return _safe_div(r, jnp.sum(r, axis=-1, keepdims=True))
            return r / n
        # sinkhorn, in the log domain: (k - 1) row+column sweeps, then a final row normalisation.
        logk = jnp.where(allowed, scores, -jnp.inf)
        for _ in range(self.sinkhorn_iters - 1):
            logk = logk - jax.nn.logsumexp(logk, axis=-1, keepdims=True)
            logk = logk - jax.nn.logsumexp(logk, axis=-2, keepdims=True)
        return softmax(logk, axis=-1)
