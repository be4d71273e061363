"""Phase diagrams of clustering: over (t, beta) at fixed (n, d) in one compiled sweep, and over (beta, n) or
(beta, d) at a fixed time (one compiled sweep over beta per shape). docs/model.md section 11.

Two quantities, averaged over the members: the fraction of token pairs with cos(x_i, x_j) > 1 - eps, and the number
of clusters (as in :func:`~attnflow.analysis.metastability.cluster_labels`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ._plateaus import Plateaus, find_plateaus


@dataclasses.dataclass(frozen=True)
class PhaseDiagram:
    """Member means on a grid: `pairs` and `clusters` of shape ``(len(rows), len(cols))``, with their standard
    errors `pairs_se`, `clusters_se`; `rows` are the values of `row_name` (``"beta"``), `cols` of `col_name`
    (``"t"``, ``"tokens"`` or ``"d"``); `members` per cell and the settings (`eps`; `time` for a fixed-time
    diagram: the time at which the state was read)."""

    row_name: str
    rows: tuple[float, ...]
    col_name: str
    cols: tuple[float, ...]
    pairs: np.ndarray
    pairs_se: np.ndarray
    clusters: np.ndarray
    clusters_se: np.ndarray
    members: int
    eps: float
    time: float | None = None

    def clustering_time(self, level: float = 0.5) -> np.ndarray:
        """Per row of a (t, beta) diagram: the first t at which the mean pair fraction reaches `level` (NaN when it
        does not within the run: unknown, later than the last t)."""
        if self.col_name != "t":
            raise ValueError("clustering_time needs a diagram over t")
        t = np.asarray(self.cols)
        out = np.full(len(self.rows), np.nan)
        for i, row in enumerate(self.pairs):
            hit = np.nonzero(row >= level)[0]
            if hit.size:
                out[i] = t[hit[0]]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PhaseDiagram":
        """The inverse of :meth:`to_dict`."""
        arr = lambda k: np.asarray(d[k], float)  # noqa: E731
        return cls(row_name=d["row_name"], rows=tuple(d["rows"]), col_name=d["col_name"], cols=tuple(d["cols"]),
                   pairs=arr("pairs"), pairs_se=arr("pairs_se"), clusters=arr("clusters"),
                   clusters_se=arr("clusters_se"), members=int(d["members"]), eps=float(d["eps"]), time=d.get("time"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return dict(row_name=self.row_name, rows=list(self.rows), col_name=self.col_name, cols=list(self.cols),
                    pairs=self.pairs.tolist(), pairs_se=self.pairs_se.tolist(), clusters=self.clusters.tolist(),
                    clusters_se=self.clusters_se.tolist(), members=self.members, eps=self.eps, time=self.time)


def _means(a, axis):
    a = np.asarray(a, float)
    m = a.mean(axis)
    se = a.std(axis, ddof=1) / math.sqrt(a.shape[axis]) if a.shape[axis] > 1 else np.full_like(m, np.nan)
    return m, se


def _check_sweep(betas, members, tokens) -> np.ndarray:
    """The betas as an array, after refusing what no diagram can be made of, in one line."""
    b = np.atleast_1d(np.asarray(betas, float))
    if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b) & (b > 0)):
        raise ValueError(f"betas must list finite numbers > 0, got {np.asarray(betas).tolist()}")
    if isinstance(members, bool) or not isinstance(members, (int, np.integer)) or members < 1:
        raise ValueError(f"members must be an integer >= 1, got {members!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 2):
        raise ValueError(f"tokens must be an integer >= 2 (one token never clusters), got {tokens!r}")
    return b


def _readings(dynamics, x0, betas, t1, dt, eps, check):
    """Per beta, per member, per check: (t, pairs (p, b, c), clusters (p, b, c))."""
    rule = Plateaus(eps=eps, check=check)
    _, ser = find_plateaus(dynamics, x0, t1=t1, dt=dt, rule=rule, trace=x0.shape[0], stop_at_one=False,
                           beta=betas)
    return ser


def phase_t_beta(dynamics, key, *, tokens: int, betas, members: int, t1: float, dt: float | None = None,
                 eps: float = 1e-2, check: float = 0.5, x0=None) -> PhaseDiagram:
    """The (t, beta) diagram at fixed n and d: one compiled call over every beta (the same members for each).

    **Arguments:** `dynamics` a model with ``.attn``; `key` the PRNG key of the members (uniform on the sphere, or
    `x0` ``(members, tokens, d)``); `betas` the rows; the columns are the times every `check` up to `t1`.
    """
    from ...evolve.sample import sphere

    d = dynamics.attn.heads.dim
    betas = _check_sweep(betas, members if x0 is None else max(1, len(x0)), tokens if x0 is None else None)
    X = np.asarray(x0) if x0 is not None else np.asarray(sphere(key, (members, tokens, d), dtype=dynamics.attn.heads.Q.dtype))
    ser = _readings(dynamics, X, betas, t1, dt, eps, check)
    # series arrays are (p, c, m): members on the last axis
    pairs, pse = _means(ser.pairs, -1)
    clus, cse = _means(ser.count, -1)
    return PhaseDiagram(row_name="beta", rows=tuple(betas.tolist()), col_name="t", cols=tuple(np.asarray(ser.t).tolist()),
                        pairs=pairs, pairs_se=pse, clusters=clus, clusters_se=cse, members=X.shape[0], eps=eps)


def phase_at_time(dynamics, key, *, over: str, values, betas, members: int, time: float, tokens: int | None = None,
                  dt: float | None = None, eps: float = 1e-2) -> PhaseDiagram:
    """The (beta, n) or (beta, d) diagram at a fixed time: one compiled sweep over beta per value of n (`over` =
    ``"tokens"``) or d (``"d"``, the model's weights must then be the identity: Q = K = V = I, rebuilt per d).

    **Arguments:** `values` the columns; `tokens` the fixed n of a (beta, d) diagram; the rest as in
    :func:`phase_t_beta`. The state is read once, at `time` exactly when it is a whole number of steps dt (rounded
    down to one otherwise); the diagram's `time` is the time read.
    """
    import equinox as eqx
    import jax.numpy as jnp

    from ...evolve.sample import sphere
    from ...model.heads import Heads

    if over not in ("tokens", "d"):
        raise ValueError(f"over must be 'tokens' or 'd', got {over!r}")
    if len(values) == 0:
        raise ValueError("values must list at least one n or d")
    betas = _check_sweep(betas, members, tokens if over == "d" else None)
    if over == "tokens" and any(int(v) < 2 for v in values):
        raise ValueError(f"values must list n >= 2 (one token never clusters), got {list(values)}")
    if not (isinstance(time, (int, float, np.integer, np.floating)) and math.isfinite(time) and time > 0):
        raise ValueError(f"time must be a finite number > 0, got {time!r}")
    attn = dynamics.attn
    dtype = attn.heads.Q.dtype
    if over == "d":
        if tokens is None:
            raise ValueError("a (beta, d) diagram needs tokens=")
        H = attn.heads
        if not (H.num_heads == 1 and all(np.allclose(np.asarray(M), np.eye(H.dim)) for M in (H.Q[0], H.K[0], H.V[0], H.O[0]))
                and all(b is None or not np.any(np.asarray(b)) for b in (H.bq, H.bk, H.bv, H.bo))):
            raise ValueError("a (beta, d) diagram rebuilds the weights for each d: it needs Q = K = V = O = I and no "
                             "biases")
    pairs, pse, clus, cse = [], [], [], []
    keys = jax.random.split(key, len(values))
    for i, v in enumerate(values):
        dyn, n = dynamics, tokens
        if over == "d":
            dyn = eqx.tree_at(lambda m: m.attn.heads, dynamics, Heads.single(jnp.eye(int(v), dtype=dtype)))
        else:
            n = int(v)
        d = dyn.attn.heads.dim
        X = np.asarray(sphere(keys[i], (members, n, d), dtype=dtype))
        # one reading, at the end of the run: t = time (rounded down to whole steps when it is not a whole number)
        ser = _readings(dyn, X, betas, time, dt, eps, time)
        read_at = float(ser.t[-1])
        m, s = _means(np.asarray(ser.pairs)[:, -1, :], -1)
        pairs.append(m), pse.append(s)
        m, s = _means(np.asarray(ser.count)[:, -1, :], -1)
        clus.append(m), cse.append(s)
    T = lambda L: np.stack(L, 1)  # noqa: E731  (p, values)
    return PhaseDiagram(row_name="beta", rows=tuple(betas.tolist()), col_name=over,
                        cols=tuple(float(v) for v in values), pairs=T(pairs), pairs_se=T(pse), clusters=T(clus),
                        clusters_se=T(cse), members=members, eps=eps, time=read_at)
