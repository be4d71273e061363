"""Metastable episodes found inside the time loop, streamed: no trajectory is stored (docs/model.md section 11).

For one configuration X (n, d), every ``check`` steps an observer reads

- the speed s: the root mean square over tokens of the last step's displacement, divided by dt for flows;
- the clusters: token i's label is the smallest j with cos(x_i, x_j) > 1 - eps (so the labels are the connected
  groups when every cluster is tighter than eps and farther than eps from the others, as on a plateau);
- the energy E of the model's attention (docs/model.md section 7), when it has one.

A small state machine turns these readings into episodes (:class:`Plateaus`); the batch is a ``vmap`` of it.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..._types import Array, Batch, Bool, Float, Int, Tokens
from ...model.dynamics import AbstractDynamics, AbstractFlow
from ...model.heads import SelfAttention
from ...model.norms import normalize_rows


class Plateaus(eqx.Module):
    """The rule that finds metastable episodes (docs/model.md section 11).

    - `fraction`: a plateau is entered when the speed falls below this fraction of its peak since the last exit.
    - `min_duration`: ... and stays below it, with a constant cluster count, for at least this long (time units of
      the flow; one step of a map is 1).
    - `eps`: tokens i, j are in one cluster when cos(x_i, x_j) > 1 - eps.
    - `check`: the observer reads the state every this many time units (rounded to whole steps, at least one).
    - `max_episodes`: episodes stored per member (later ones are counted, not stored).
    - `max_sizes`: the largest cluster sizes stored per episode.

    An episode ends at the first reading whose cluster count differs from its own (a merge or a split).
    """

    fraction: float = eqx.field(static=True, default=0.1)
    min_duration: float = eqx.field(static=True, default=2.0)
    eps: float = eqx.field(static=True, default=1e-2)
    check: float = eqx.field(static=True, default=0.25)
    max_episodes: int = eqx.field(static=True, default=16)
    max_sizes: int = eqx.field(static=True, default=8)

    def __check_init__(self):
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ValueError(f"fraction must be a number in (0, 1), got {self.fraction!r}")
        for name in ("min_duration", "check"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        for name in ("max_episodes", "max_sizes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    def check_dtype(self, dtype) -> None:
        """Refuse an `eps` the dtype cannot resolve: a cosine near 1 is known to about 64 units in the last place."""
        floor = 64 * float(np.finfo(np.dtype(dtype)).eps)
        if self.eps < floor:
            raise ValueError(f"eps = {self.eps:g} is below {floor:.2g}, the resolution of a cosine near 1 in "
                             f"{np.dtype(dtype).name} (64 units in the last place); use eps >= {floor:.2g}")


def cluster_labels(X: Tokens, eps, *, block: int | None = None) -> Int[Array, " n"]:
    """label_i = the smallest j with cos(x_i, x_j) > 1 - eps (i itself when no smaller j is that close); with
    `block`, computed over blocks of that many tokens (memory O(n b))."""
    if block is not None:
        return _pairs_blocked(None, X, eps, int(block))[0]
    return _pairs_dense(None, X, eps)[0]


class Reading(eqx.Module):
    """What the observer reads from one configuration."""

    speed: Float[Array, ""]
    count: Int[Array, ""]
    sizes: Int[Array, " s"]
    energy: Float[Array, ""]
    pairs: Float[Array, ""]


def _pairs_blocked(dyn, X: Tokens, eps, block: int):
    """Over blocks of b tokens j (memory O(n b), never O(n^2)): per token i the smallest j with cos > 1 - eps, the
    number of close pairs, and the energy of section 7 by a running log-sum-exp of the scores per head."""
    n = X.shape[0]
    U = normalize_rows(X)
    attn = getattr(dyn, "attn", None)
    has_energy = isinstance(attn, SelfAttention)
    if has_energy:
        q, k, scale = attn._factors(X)
        kk = k if k.ndim == 2 else jnp.moveaxis(k, 1, 0)  # keys with the token axis first
        H = q.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    Up = jnp.pad(U, ((0, pad), (0, 0)))
    idx = jnp.arange(nb * block, dtype=jnp.int32)
    rows = jnp.arange(n, dtype=jnp.int32)
    if has_energy:
        kp = jnp.pad(kk, ((0, pad),) + ((0, 0),) * (kk.ndim - 1))

    def step(carry, t):
        first, close, m, l = carry
        j = jax.lax.dynamic_slice_in_dim(idx, t * block, block)
        valid = j < n
        Ub = jax.lax.dynamic_slice_in_dim(Up, t * block, block)
        c = ((U @ Ub.T) > 1 - eps) & valid[None, :]
        c = c | (j[None, :] == rows[:, None])
        cand = jnp.min(jnp.where(c, j[None, :], jnp.int32(n)), axis=1)
        first = jnp.minimum(first, cand)
        close = close + jnp.sum(c & (j[None, :] != rows[:, None]), dtype=jnp.int32)
        if has_energy:
            kb = jax.lax.dynamic_slice_in_dim(kp, t * block, block)
            kb = kb if kk.ndim == 2 else jnp.moveaxis(kb, 0, 1)
            sb = attn._scores_of(q, kb, scale)  # (h, n, b)
            sb = jnp.where(valid[None, None, :], sb, -jnp.inf)
            mb = jnp.maximum(m, jnp.max(sb, axis=(1, 2)))
            l = l * jnp.exp(m - mb) + jnp.sum(jnp.exp(sb - mb[:, None, None]), axis=(1, 2))
            m = mb
        return (first, close, m, l), None

    H_ = H if has_energy else 1
    c0 = (jnp.full((n,), n, jnp.int32), jnp.zeros((), jnp.int32), jnp.full((H_,), -jnp.inf, X.dtype),
          jnp.zeros((H_,), X.dtype))
    (first, close, m, l), _ = jax.lax.scan(step, c0, jnp.arange(nb, dtype=jnp.int32))
    if has_energy:
        beta = attn.beta.astype(X.dtype)
        # in log space, exponentiated once: finite whenever E_h itself is representable
        energy = jnp.sum(jnp.exp(m + jnp.log(l) - jnp.log(2 * beta) - 2 * math.log(n)))
    else:
        energy = jnp.full((), jnp.nan, X.dtype)
    return first.astype(jnp.int32), close, energy


def _pairs_dense(dyn, X: Tokens, eps):
    n = X.shape[0]
    U = normalize_rows(X)
    c = (U @ U.T) > 1 - eps
    c_self = c | jnp.eye(n, dtype=bool)
    close = jnp.sum(c & ~jnp.eye(n, dtype=bool))
    attn = getattr(dyn, "attn", None)
    if isinstance(attn, SelfAttention):
        from ..energy import head_energies

        energy = jnp.sum(head_energies(attn, X))
    else:
        energy = jnp.full((), jnp.nan, X.dtype)
    return jnp.argmax(c_self, axis=1).astype(jnp.int32), close, energy


READ_DENSE_MAX = 512
"""Readings of up to this many tokens use the dense (n, n) Gram matrix; above it they stream over blocks of
:data:`READ_BLOCK` tokens (memory O(n b) per member)."""

READ_BLOCK = 256


def read(dyn, X: Tokens, X_prev: Tokens, dt, eps: float, max_sizes: int) -> Reading:
    """The observer's reading of X (``X_prev`` is the state one step earlier)."""
    n = X.shape[0]
    disp = jnp.sum((X - X_prev) ** 2, axis=-1)
    speed = jnp.sqrt(jnp.mean(disp)) / dt
    if n > READ_DENSE_MAX:
        lab, close, energy = _pairs_blocked(dyn, X, eps, READ_BLOCK)
    else:
        lab, close, energy = _pairs_dense(dyn, X, eps)
    sizes = jnp.zeros((n,), jnp.int32).at[lab].add(1)
    # the number of distinct labels (docs/model.md 11.1), as many as the sizes; not the tokens that are their own
    # label, which differ when closeness is not transitive (a chain 0 - 1 - 2: labels 0 0 1)
    count = jnp.sum(sizes > 0).astype(jnp.int32)
    k = min(max_sizes, n)
    top = jax.lax.top_k(sizes, k)[0]
    if k < max_sizes:
        top = jnp.concatenate([top, jnp.zeros((max_sizes - k,), jnp.int32)])
    pairs = close.astype(X.dtype) / max(n * (n - 1), 1)
    return Reading(speed=speed, count=count, sizes=top, energy=energy, pairs=pairs)


class Episodes(eqx.Module):
    """The metastable episodes of each member (batch axis first; E = ``max_episodes``, S = ``max_sizes``).

    - `entry`, `exit`: ``(b, E)`` times; `exit` is +inf while the episode was still on at the end of the run
      (``open``), NaN for unused slots.
    - `count`: ``(b, E)`` clusters during the episode (0 in unused slots); `sizes`: ``(b, E, S)`` the largest
      cluster sizes, descending.
    - `energy_entry`, `energy_exit`: ``(b, E)`` energies at entry and exit (NaN without an attention energy or an
      exit); `speed`: ``(b, E)`` the mean speed over the episode's readings.
    - `num`: ``(b,)`` episodes found (may exceed E: the rest are counted, not stored).
    - `open`: ``(b,)`` whether the last episode was still on when the run ended.
    - `t_end`: ``(b,)`` the time the member's run ended; `finite`: ``(b,)`` False where the state went non-finite
      (the member stopped there).
    - `t1`: ``(b,)`` the end of the run (the time of its last reading, the same for every member; None in episodes
      built by hand: then the latest `t_end`). A member stopped on a one-cluster episode is known to stay there up
      to `t1` and beyond (:meth:`censor_at`).
    """

    entry: Float[Array, "b e"]
    exit: Float[Array, "b e"]
    count: Int[Array, "b e"]
    sizes: Int[Array, "b e s"]
    energy_entry: Float[Array, "b e"]
    energy_exit: Float[Array, "b e"]
    speed: Float[Array, "b e"]
    num: Int[Array, " b"]
    open: Bool[Array, " b"]
    t_end: Float[Array, " b"]
    finite: Bool[Array, " b"]
    t1: Float[Array, " b"] | None = None

    def censor_at(self, e: int) -> np.ndarray:
        """Per member, where episode `e` (when open) is censored: `t1` for an open one-cluster episode of a finite
        member (absorbing: it never ends, so it was at risk of ending through the whole run), `t_end` otherwise (the
        member stopped being observed there). Leading axes are kept."""
        t_end = np.asarray(self.t_end)
        t1 = np.max(t_end, -1, keepdims=True, initial=-np.inf) if self.t1 is None else np.asarray(self.t1)
        absorbed = (np.asarray(self.count)[..., e] == 1) & np.asarray(self.finite)
        return np.where(absorbed, t1, t_end)

    def first(self) -> dict[str, np.ndarray]:
        """Per member: the first episode's count, entry, exit and dwell time (NaN where it has none; the dwell time
        of an open episode is its lower bound, censored as in :meth:`censor_at`, flagged by ``first_open``). Leading
        axes (a sweep over beta) are kept."""
        has = np.asarray(self.num) > 0
        entry = np.where(has, np.asarray(self.entry)[..., 0], np.nan)
        exit_ = np.where(has, np.asarray(self.exit)[..., 0], np.nan)
        is_open = has & ~np.isfinite(exit_)
        dwell = np.where(is_open, self.censor_at(0) - entry, exit_ - entry)
        return {"count": np.where(has, np.asarray(self.count)[..., 0], 0), "entry": entry, "exit": exit_,
                "dwell": dwell, "first_open": is_open}


class Series(eqx.Module):
    """Readings at every check, for the first ``trace`` members: `t` ``(c,)``; `speed`, `energy`, `count` (clusters)
    and `pairs` (the fraction of token pairs with cos > 1 - eps), each ``(c, m)``. The energy is section 7's, over all
    pairs whatever the mask (for causal attention it is not the flow's Lyapunov function). After a member stopped
    (one cluster, or a non-finite state) its last finite reading is repeated."""

    t: Float[Array, " c"]
    speed: Float[Array, "c m"]
    energy: Float[Array, "c m"]
    count: Int[Array, "c m"]
    pairs: Float[Array, "c m"]


def _init_state(rule: Plateaus, dtype):
    E, S = rule.max_episodes, rule.max_sizes
    nan = jnp.asarray(jnp.nan, dtype)
    f = lambda v=nan: jnp.full((E,), v, dtype)  # noqa: E731
    return dict(
        entry=f(), exit=f(), count=jnp.zeros((E,), jnp.int32), sizes=jnp.zeros((E, S), jnp.int32),
        e_in=f(), e_out=f(), sp_sum=f(jnp.asarray(0, dtype)), sp_n=jnp.zeros((E,), jnp.int32),
        num=jnp.zeros((), jnp.int32), on=jnp.zeros((), bool), peak=jnp.zeros((), dtype),
        k=jnp.zeros((), jnp.int32), k_sum=jnp.zeros((), dtype), k_n=jnp.zeros((), jnp.int32),
        cand=jnp.zeros((), bool), c_t=nan, c_k=jnp.zeros((), jnp.int32), c_e=nan,
        c_sum=jnp.zeros((), dtype), c_n=jnp.zeros((), jnp.int32),
    )


def _advance(rule: Plateaus, st: dict, t, r: Reading) -> dict:
    """One reading at time t through the episode state machine (docs/model.md section 11). The current episode's
    count and speed sum live in their own fields (`k`, `k_sum`, `k_n`), so an episode past the storage cap is
    followed exactly like a stored one; only the storing is skipped."""
    st = dict(st)
    E = rule.max_episodes
    slot = jnp.clip(st["num"] - 1, 0, E - 1)  # the current episode's slot (when on and stored)
    stored = st["num"] <= E
    on = st["on"]
    # -- on an episode: the count changed -> close it; otherwise accumulate its speed
    close = on & (r.count != st["k"])
    keep = on & ~close
    k_sum = jnp.where(keep, st["k_sum"] + r.speed, st["k_sum"])
    k_n = jnp.where(keep, st["k_n"] + 1, st["k_n"])
    upd = lambda a, v, m: a.at[slot].set(jnp.where(m & stored, v, a[slot]))  # noqa: E731
    st["exit"] = upd(st["exit"], t, close)
    st["e_out"] = upd(st["e_out"], r.energy, close)
    st["sp_sum"] = upd(st["sp_sum"], k_sum, keep)
    st["sp_n"] = upd(st["sp_n"], k_n, keep)
    # -- off an episode: track the peak, the candidate, and open an episode once the candidate lasted
    off = ~on
    peak = jnp.where(close, r.speed, jnp.where(off, jnp.maximum(st["peak"], r.speed), st["peak"]))
    below = off & (r.speed < rule.fraction * peak)
    same = st["cand"] & (st["c_k"] == r.count)
    start = below & ~same
    grow = below & same
    c_t = jnp.where(start, t, st["c_t"])
    c_e = jnp.where(start, r.energy, st["c_e"])
    c_k = jnp.where(start, r.count, st["c_k"])
    c_sum = jnp.where(start, r.speed, jnp.where(grow, st["c_sum"] + r.speed, st["c_sum"]))
    c_n = jnp.where(start, 1, jnp.where(grow, st["c_n"] + 1, st["c_n"]))
    cand = below
    open_ = cand & (t - c_t >= rule.min_duration * (1 - 1e-6))
    new = jnp.minimum(st["num"], E - 1)
    fits = st["num"] < E
    put = lambda a, v: a.at[new].set(jnp.where(open_ & fits, v, a[new]))  # noqa: E731
    st["entry"] = put(st["entry"], c_t)
    st["count"] = put(st["count"], c_k)
    st["sizes"] = st["sizes"].at[new].set(jnp.where(open_ & fits, r.sizes, st["sizes"][new]))
    st["e_in"] = put(st["e_in"], c_e)
    st["sp_sum"] = put(st["sp_sum"], c_sum)
    st["sp_n"] = put(st["sp_n"], c_n)
    st["num"] = st["num"] + open_.astype(jnp.int32)
    st["on"] = keep | open_
    st["cand"] = cand & ~open_
    st["k"] = jnp.where(open_, c_k, st["k"])
    st["k_sum"] = jnp.where(open_, c_sum, k_sum)
    st["k_n"] = jnp.where(open_, c_n, k_n)
    st.update(peak=peak, c_t=c_t, c_e=c_e, c_k=c_k, c_sum=c_sum, c_n=c_n)
    return st


def _run_one(dyn, solver, x0, dt, rule: Plateaus, every: int, total: int, n_checks: int, trace: bool,
             stop_at_one: bool, stop_after: int | None):
    """Evolve one configuration for `total` steps, reading it every `every` steps and after the last one; a member
    that stopped (one cluster, or a non-finite state) keeps its last (finite) reading for the remaining checks."""
    from ...evolve.backends import one_step

    dtype = x0.dtype
    args = (dyn, solver, dt)
    buf0 = (jnp.zeros((n_checks,), dtype), jnp.zeros((n_checks,), dtype), jnp.zeros((n_checks,), jnp.int32),
            jnp.zeros((n_checks,), dtype)) if trace else ()

    def segment(c):
        X, k, st, done, fin, t_end, i, buf = c

        def body(j, carry):
            Y, _ = carry
            return one_step(args, k + j, Y), Y

        steps = jnp.minimum(every, total - k)  # the last segment ends at step `total` (t1), never past it
        Y, Y_prev = jax.lax.fori_loop(0, steps, body, (X, X))
        ok = jnp.all(jnp.isfinite(Y))
        t = ((k + steps).astype(dtype)) * dt
        r = read(dyn, Y, Y_prev, dt, rule.eps, rule.max_sizes)
        st2 = _advance(rule, st, t, r)
        st = jax.tree.map(lambda a, b: jnp.where(ok, a, b), st2, st)
        done = ~ok | (stop_at_one & st["on"] & (st["k"] == 1))
        if stop_after is not None:
            done = done | (st["num"] >= stop_after)
        if trace:  # a non-finite state repeats the last finite reading (the first one has none to repeat)
            vals = (r.speed, r.energy, r.count, r.pairs)
            new = ok | (i == 0)
            buf = tuple(b.at[i].set(jnp.where(new, v, b[jnp.maximum(i - 1, 0)])) for b, v in zip(buf, vals))
        return (jnp.where(ok, Y, X), k + steps, st, done, fin & ok, jnp.where(ok, t, t_end), i + 1, buf)

    c0 = (x0, jnp.zeros((), jnp.int32), _init_state(rule, dtype), jnp.zeros((), bool), jnp.ones((), bool),
          jnp.zeros((), dtype), jnp.zeros((), jnp.int32), buf0)
    c = jax.lax.while_loop(lambda c: (c[6] < n_checks) & ~c[3], segment, c0)
    X, _, st, done, fin, t_end, i, buf = c
    if trace:  # checks after the member stopped repeat its last reading
        last = jnp.maximum(i - 1, 0)
        buf = tuple(jnp.where(jnp.arange(n_checks) >= i, b[last], b) for b in buf)
    return st, fin, t_end, (buf if trace else None)


@eqx.filter_jit
def _run(dyn, solver, x0, dt, betas, rule, every, total, n_checks, trace, stop_at_one, stop_after):
    def batch(d):
        return jax.vmap(lambda x: _run_one(d, solver, x, dt, rule, every, total, n_checks, trace > 0, stop_at_one,
                                           stop_after))(x0)

    if betas is None:
        return batch(dyn)
    return jax.vmap(lambda b: batch(dyn.with_params(beta=b)))(betas)


def _episodes(st, fin, t_end, t1: float) -> Episodes:
    st = jax.tree.map(np.asarray, st)
    n = st["sp_n"]
    speed = np.where(n > 0, st["sp_sum"] / np.maximum(n, 1), np.nan)
    E = st["entry"].shape[-1]
    last = np.clip(st["num"] - 1, 0, E - 1)
    is_open = st["on"] & (st["num"] > 0)
    exit_ = st["exit"].copy()
    stored_open = is_open & (st["num"] <= E)
    np.put_along_axis(exit_, last[..., None], np.where(stored_open[..., None], np.inf,
                                                       np.take_along_axis(exit_, last[..., None], -1)), -1)
    t_end = np.asarray(t_end)
    return Episodes(entry=st["entry"], exit=exit_, count=st["count"], sizes=st["sizes"], energy_entry=st["e_in"],
                    energy_exit=st["e_out"], speed=speed, num=st["num"], open=is_open, t_end=t_end,
                    finite=np.asarray(fin), t1=np.full(t_end.shape, t1, t_end.dtype))


def run_steps(t1: float, dt: float) -> int:
    """The steps of a run to `t1`: t1 / dt when it is a whole number (to 1e-9 relative), otherwise rounded down, so
    that a run never goes past `t1`."""
    ratio = float(t1) / float(dt)
    k = round(ratio)
    if abs(k - ratio) <= 1e-9 * max(1.0, ratio):
        return int(k)
    return int(math.floor(ratio))


def check_span(t1: float, dt: float) -> int:
    """The steps of a run to `t1` with step `dt` (:func:`run_steps`), or a ValueError: t1 and dt finite and > 0, at
    least one and at most 2^31 - 1 steps (they are counted in int32)."""
    if not (math.isfinite(float(t1)) and math.isfinite(float(dt)) and t1 > 0 and dt > 0):
        raise ValueError(f"t1 and dt must be finite numbers > 0, got t1={t1!r}, dt={dt!r}")
    total = run_steps(t1, dt)
    if total < 1:
        raise ValueError(f"t1 = {t1!r} is shorter than one step dt = {dt!r}")
    if total > 2**31 - 1:
        raise ValueError(f"t1 / dt = {t1!r} / {dt!r} is {total} steps; at most 2^31 - 1")
    return total


def find_plateaus(dynamics: AbstractDynamics, x0: Batch, *, t1: float, dt: float | None = None,
                  rule: Plateaus = Plateaus(), solver=None, trace: int = 0, stop_at_one: bool = True,
                  stop_after: int | None = None, beta=None) -> tuple[Episodes, Series | None]:
    """Find the metastable episodes of every member, streamed inside one compiled loop.

    **Arguments:**

    - `dynamics`: a flow (:class:`~attnflow.SphereFlow`, ...) or a map; `x0` ``(b, n, d)``.
    - `t1`: how long each member runs (a map: steps), rounded down to whole steps when it is not a whole number of
      them: a run never goes past `t1`, and its last reading is at its end; `dt`: the fixed step of a flow (default
      0.05).
    - `rule`: a :class:`Plateaus`; `solver`: RK4 for flows (Euler works too), Iterate for maps.
    - `trace`: keep the readings at every check of the first `trace` members (a :class:`Series`).
    - `stop_at_one`: stop a member once it sits on a one-cluster episode (all tokens within eps of each other stay
      together: they see the same field).
    - `stop_after`: stop a member once it has entered this many episodes (the last one is then open: its exit is
      unknown). None: run to `t1`.
    - `beta`: optional ``(p,)`` values of beta, run in the same compiled call (every array gains an axis p).

    **Returns:** ``(episodes, series)``; series is None when ``trace == 0``.
    """
    from ...evolve.solvers import RK4, Iterate

    x0 = jnp.asarray(x0)
    if x0.ndim != 3 or not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be a floating (batch, tokens, d) array, got shape {tuple(x0.shape)} {x0.dtype}")
    flow = isinstance(dynamics, AbstractFlow)
    if solver is None:
        solver = RK4() if flow else Iterate()
    solver.check(dynamics)
    if not flow:
        if dt not in (None, 1, 1.0):
            raise ValueError("a map steps by 1; dt is for flows")
        dt = 1.0
    dt = 0.05 if dt is None else float(dt)
    rule.check_dtype(x0.dtype)
    total = check_span(t1, dt)
    every = max(1, int(round(rule.check / dt)))
    n_checks = -(-total // every)  # every `every` steps, and at step `total` (t1) when that is not one of them
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, (int, np.integer))
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be None or an integer >= 1, got {stop_after!r}")
    trace = int(trace)
    if not 0 <= trace:
        raise ValueError(f"trace must be >= 0, got {trace}")
    if beta is not None:
        b = np.atleast_1d(np.asarray(beta, float))
        if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b) & (b > 0)):
            raise ValueError(f"beta must be finite numbers > 0 (one per run), got {np.asarray(beta).tolist()}")
    betas = None if beta is None else jnp.asarray(np.atleast_1d(np.asarray(beta, float)), x0.dtype)
    st, fin, t_end, out = _run(dynamics, solver, x0, jnp.asarray(dt, x0.dtype), betas, rule, every, total,
                               n_checks, trace, bool(stop_at_one), stop_after)
    eps = _episodes(st, fin, t_end, total * dt)
    series = None
    if trace:
        t = np.minimum(np.arange(1, n_checks + 1) * every, total) * dt
        sp, en, ct, pr = (np.asarray(a) for a in out)  # (..., b, c)
        m = min(trace, x0.shape[0])
        sw = lambda a: np.swapaxes(a[..., :m, :], -1, -2)  # noqa: E731  (..., c, m)
        series = Series(t=t, speed=sw(sp), energy=sw(en), count=sw(ct), pairs=sw(pr))
    return eps, series
