"""The streaming tally of a basin study: per label row, the count, the step statistics and one representative final
state (the lowest sample index). Memory grows with the number of distinct rows, not with the samples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

_HASH = np.random.default_rng(20261130).integers(1, 2**62, size=4096, dtype=np.int64) | 1


def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unique rows, index of the first occurrence of each, inverse)`` of integer rows ``(b, r)``, as
    ``np.unique(rows, axis=0, return_index=True, return_inverse=True)`` gives them but in another order, and fast:
    each row is hashed to one int64 (wrapping multiply-add). The result is checked; should two rows share a hash,
    the exact row sort is used."""
    rows = np.ascontiguousarray(rows, np.int64)
    if rows.shape[1] > len(_HASH):
        return _exact_unique(rows)
    keys = rows @ _HASH[: rows.shape[1]]
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    inv = np.asarray(inv).ravel()
    uniq = rows[first]
    if not np.array_equal(uniq[inv], rows):  # a hash collision
        return _exact_unique(rows)
    return uniq, first, inv


def _exact_unique(rows):
    uniq, first, inv = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return uniq, first, np.asarray(inv).ravel()


@dataclasses.dataclass
class Entry:
    """One row of the tally: count, sum and max of the steps, the histogram of steps, the representative
    ``(sample index, final state (n d,) float64)`` of the lowest sample index (or None), and how many of its members
    were decided by a certificate."""

    count: int = 0
    steps_sum: int = 0
    steps_max: int = 0
    hist: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.int64))
    rep: tuple | None = None
    certified: int = 0

    def median(self) -> float:
        """The median number of steps (:func:`hist_median`)."""
        return hist_median(self.hist, self.count)


def hist_median(hist: np.ndarray, count: int) -> float:
    """The median of `count` values given by their histogram (``hist[s]`` values equal to s), as ``numpy.median``
    gives it: the middle value, or for an even count the mean of the two middle ones (the k-th smallest value is the
    first s whose cumulative count reaches k)."""
    cum = np.cumsum(hist)
    lo, hi = np.searchsorted(cum, [(count + 1) // 2, count // 2 + 1])
    return 0.5 * (float(lo) + float(hi))


class Tally:
    """Streaming per-row counts (see the module doc). `tokens` is n (rows do not encode it)."""

    def __init__(self, tokens: int | None = None):
        self.table: dict[tuple, Entry] = {}
        self.n = tokens
        self.total = 0

    def add(self, rows: np.ndarray, steps: np.ndarray, index: np.ndarray | None = None, finals=None,
            certified: np.ndarray | None = None) -> None:
        """Tally rows ``(b, r)`` with their steps; `index` (sample indices) and `finals` ``(b, n*d)`` give
        representatives (rows with a non-finite final state are skipped); `certified` marks the members decided by
        a certificate (their final state is no representative: it has not converged)."""
        self.total += len(rows)
        if not len(rows):
            return
        uniq, _, inv = unique_rows(rows)
        finite = None if finals is None else np.all(np.isfinite(finals), axis=1)
        cert = np.zeros(len(rows), bool) if certified is None else np.asarray(certified, bool)
        if finite is not None:
            finite = finite & ~cert
        for j, r in enumerate(uniq):
            sel = inv == j
            s = steps[sel].astype(np.int64)
            rep = None
            if index is not None and finals is not None:
                ok = np.flatnonzero(sel & finite)
                if len(ok):
                    m = ok[np.argmin(index[ok])]
                    rep = (int(index[m]), np.asarray(finals[m], np.float64))
            self._accumulate(tuple(int(v) for v in r), len(s), int(s.sum()), int(s.max()), np.bincount(s), rep,
                             int(np.sum(cert[sel])))

    def merge(self, other: "Tally") -> None:
        """Add another tally (e.g. another process's) into this one."""
        self.n = self.n if self.n is not None else other.n
        self.total += other.total
        for r, e in other.table.items():
            self._accumulate(r, e.count, e.steps_sum, e.steps_max, e.hist, e.rep, e.certified)

    def _accumulate(self, r, count, ssum, smax, hist, rep, certified=0) -> None:
        e = self.table.setdefault(r, Entry())
        e.count += count
        e.certified += certified
        e.steps_sum += ssum
        e.steps_max = max(e.steps_max, smax)
        if len(hist) > len(e.hist):
            e.hist = np.pad(e.hist, (0, len(hist) - len(e.hist)))
        e.hist[: len(hist)] += hist
        if rep is not None and (e.rep is None or rep[0] < e.rep[0]):
            e.rep = rep

    def to_bytes(self) -> bytes:
        """Serialise (for the multi-host all-gather)."""
        tab = []
        for r, e in self.table.items():
            nz = np.flatnonzero(e.hist)
            tab.append([list(r), e.count, e.steps_sum, e.steps_max, nz.tolist(), e.hist[nz].tolist(),
                        None if e.rep is None else [e.rep[0], e.rep[1].tolist()], e.certified])
        return json.dumps({"n": self.n, "total": self.total, "table": tab}).encode()

    @classmethod
    def from_bytes(cls, b: bytes) -> "Tally":
        """Inverse of :meth:`to_bytes`."""
        obj = json.loads(b.decode())
        t = cls(obj["n"])
        t.total = obj["total"]
        for r, c, s, m, nz, hv, rep, cert in obj["table"]:
            h = np.zeros(max(nz) + 1 if nz else 1, np.int64)
            h[nz] = hv
            t.table[tuple(r)] = Entry(c, s, m, h, None if rep is None else (rep[0], np.asarray(rep[1], np.float64)), cert)
        return t

    def counts(self) -> dict[tuple, int]:
        """Count per label row."""
        return {r: e.count for r, e in self.table.items()}


def gather_tally(tally: Tally) -> Tally:
    """Merge the tallies of all ``jax.distributed`` processes (serialised, padded, all-gathered); the same result,
    in the same order, in every process."""
    from jax.experimental import multihost_utils

    b = np.frombuffer(tally.to_bytes(), np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([len(b)], np.int32))).ravel()
    buf = np.zeros(int(lens.max()), np.uint8)
    buf[: len(b)] = b
    allb = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lens), -1)
    out = Tally(tally.n)
    for k, ln in enumerate(lens):
        out.merge(Tally.from_bytes(allb[k, : int(ln)].tobytes()))
    return out
