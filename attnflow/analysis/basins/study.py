"""The basin study: Monte Carlo basin fractions with intervals that include what is unknown (docs/model.md
section 9), streamed through the member pool, resumable, split over devices and processes.

**Every member runs until its outcome is decided, or until a hard cap.** The study feeds its samples to the one
engine, :func:`attnflow.evolve.pool.stream_members`: a pool of member slots per local device retires each member
the moment it stops (converged, non-finite, failed, or ``max_steps`` steps taken) and labels it in the same compiled
call. So a stopped member costs no further steps and slow members are not cut off at a short budget.

**Sample i is always drawn from** ``jax.random.fold_in(key, i)``, so the per-member outcomes, steps and labels do
not depend on the pool size, the group, the block size, the devices, the number of processes or a resume.

**Saddles.** A member's per-step change can drop below ``tol`` while it passes slowly near an unstable
equilibrium. The first time a label appears, its equilibrium is refined from the member of lowest index and its
intrinsic spectrum checked (:mod:`attnflow.analysis.basins.verify`); members of labels whose equilibrium is
unstable get outcome ``saddle``, never an attractor's basin.

**Run directories and processes.** Samples are grouped in blocks of ``execution.chunk`` consecutive indices; a
block is written through the `run_dir` writer passed in (e.g. :class:`attnflow.io.results.RunDirWriter`) once all
its members are retired: one row per sample (index, name, outcome, steps, and the initial state if the writer
keeps it). Finished blocks are read back instead of recomputed; a damaged one is recomputed with a notice.
Multi-host runs use ``jax.distributed``: process I computes the blocks b with b % P == I, the tallies are
all-gathered at the end, and every process returns the same result.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ... import _cache
from ..._device import core_devices
from ..._types import Array, check_tolerance
from ...evolve.options import Budget, Execution, Stop, check_tol
from ...evolve.outcome import CERTIFIED, CONVERGED, OUTCOMES, SADDLE
from ...evolve.simulate import check_shape
from ...evolve import workers as _workers
from ...evolve.pool import begin_workers, check_solver, pool_backend, pool_tile, prepare_members, stream_members
from ...evolve.solvers import Adaptive
from ...model import AbstractFlow
from ..classify import classifier, describe, label_rows
from .certify import layout as certify_layout, worth_certifying
from .results import BasinResult, MemberSample, summarize
from .sampling import Sphere, draw_samples, sample_stream
from .tally import Tally, gather_tally, unique_rows
from .verify import Verifier

KEEP = 2000
"""The members of lowest sample index whose final states a result keeps (:attr:`BasinResult.members`)."""

SAMPLES_MAX = 2**31 - 1
"""Samples are numbered with int32 inside the engine."""


class StudyWriter(Protocol):
    """What :func:`basin_fractions` needs from a run directory (implemented by
    :class:`attnflow.io.results.RunDirWriter`)."""

    initial: bool
    """Whether the writer keeps each member's initial state (an ``initial`` column)."""

    def open(self, identity: dict, *, process_index: int, process_count: int, distributed: bool) -> None:
        """Create or check the run directory for a study with this identity (all processes call it)."""

    def done(self, i: int) -> bool:
        """Whether block i is written, complete and valid (no side effects)."""

    def damaged(self, i: int) -> str | None:
        """Why block i's file exists but is not valid (one line), or None."""

    def read_chunk(self, i: int) -> dict:
        """Block i's columns."""

    def write_chunk(self, i: int, columns: dict) -> None:
        """Write (or replace) block i's columns atomically."""


def basin_fractions(
    dyn,
    key: Array,
    samples: int,
    *,
    tokens: int | None = None,
    sampler: Callable | None = None,
    solver=None,
    budget: Budget | None = None,
    stop: Stop | None = None,
    execution: Execution | None = None,
    cluster_tol: float = 1e-3,
    ci_width: float | None = None,
    progress: bool | Callable[[int, int], None] = False,
    run_dir: StudyWriter | None = None,
) -> BasinResult:
    """Monte Carlo basin fractions of the attractors of ``dyn`` (see the module docstring for the design).

    **Arguments:**

    - `dyn`, `key`, `samples`: the model, a PRNG key and the number N of initial states (at most ``2^31 - 1``).
    - `tokens` n (initial states uniform on the sphere, in the dtype of the model's value weights), or
      `sampler(key, num) -> (num, n, d)` (traceable by JAX, e.g. :class:`Sphere`, :class:`Around`); sample i is
      ``sampler(fold_in(key, i), 1)[0]``.
    - `solver`: ``Iterate`` for maps (default); for flows :class:`~attnflow.Adaptive` (an embedded Runge-Kutta pair
      with a step size per member, :mod:`attnflow.evolve.adaptive`; the default when `budget` sets no ``dt``),
      ``RK4`` (the default when it does) or ``Euler``.
    - `budget`: a :class:`~attnflow.Budget`: ``steps`` (maps) or ``t1, dt`` (fixed-step flows) set the default cap
      ``max(10 x budget, 10_000)``; ``max_steps`` sets it exactly. Members still moving at the cap are
      ``not_converged``.
    - `stop`: a :class:`~attnflow.Stop`; its ``tol`` decides ``converged`` (default ``max(1e-7, 8 x floor)``, the
      floor of :func:`attnflow.evolve.options.tol_floor`: 1e-7 in float64, about 1e-6 for a float32 map; a tol below
      the floor is refused), its ``certify`` whether members may be decided early by certificates (computed where
      they pay: n d <= 32, or at least 20 (n d)^2 samples, :func:`~attnflow.analysis.basins.certify.worth_certifying`).
    - `execution`: an :class:`~attnflow.Execution`: backend (``"auto"`` resolved once for the whole study, a pure
      function of the model, the shapes, N, the cap and the platform), ``chunk`` (samples per block, default
      ``min(N, 10_000)``), ``pool`` (slots per device), ``group`` (steps between retire passes), ``devices``,
      ``process``. None of these changes a member's initial state, outcome, steps or final state, in float32
      too: samples are drawn, and pools step, in tiles of a fixed width
      (:data:`~attnflow.analysis.basins.sampling.DRAW_TILE`, :func:`attnflow.evolve.pool.pool_tile`).
    - `cluster_tol`: the classifier's tolerance (distance under which two tokens are one cluster).
    - `ci_width`: adaptive mode: keep adding blocks (beyond `samples`, up to 100 x `samples`) until every
      attractor's interval is narrower than this (one process only).
    - `progress`: a progress bar (True), or a callable ``(done, total)`` called after each block.
    - `run_dir`: a :class:`StudyWriter` that streams blocks to a run directory and resumes
      (``attnflow.basin_fractions(..., run_dir=PATH, resume=...)`` builds one from a path).

    **Returns:** a :class:`BasinResult`. Host memory is bounded by the pools, the blocks in flight and the number of
    labels, not by `samples`.
    """
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1):
        raise ValueError(f"tokens must be an integer >= 1, got {tokens!r}")
    cluster_tol = check_tolerance("cluster_tol", cluster_tol, allow_zero=False)
    sampler = _sampler(dyn, tokens, sampler)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or not 1 <= samples <= SAMPLES_MAX:
        raise ValueError(f"samples must be an integer in [1, {SAMPLES_MAX}], got {samples!r}")
    budget = Budget() if budget is None else budget
    stop = Stop() if stop is None else stop
    if solver is None and isinstance(dyn, AbstractFlow) and budget.dt is None:
        solver = Adaptive()  # a flow study without a fixed step: the adaptive pair, per member
    solver = check_solver(dyn, solver)
    span = budget.resolve(dyn, isinstance(solver, Adaptive), study=True)
    shape = jax.eval_shape(lambda k: sampler(k, 1), key)
    n, d, dtype = int(shape.shape[1]), int(shape.shape[2]), shape.dtype
    try:  # any model: one step traced on the sampler's shape
        check_shape(dyn, (n, d), dtype)
    except ValueError as e:
        raise ValueError(f"the sampler draws {n} tokens in d = {d}, but the model does not take them: {e}") from None
    if d < 2:
        raise ValueError("a basin study needs d >= 2 (d = 1: tokens on the sphere S^0 are +-1 and never move)")
    stop = dataclasses.replace(stop, tol=check_tol(stop.tol, dyn, solver, span.dt, dtype, study=True))
    then = classifier(dyn, tol=cluster_tol)
    layout = None
    if stop.certify and worth_certifying(samples, n, d):
        layout = certify_layout(dyn, solver, n, dtype)
    # the execution is resolved, and the pool program compiled, in another thread while this one computes the
    # certificates (the program takes the radii as data: layout's shapes suffice)
    # (with worker processes: they are started, and each compiles its own, while this thread computes the
    # certificates)
    begun: list = []  # this study's stream on the workers

    def prepare(ex):
        kw = dict(budget=budget, stop=stop, solver=solver, execution=ex, pool_size=ex.pool,
                  queue_size=_queue_size(ex, samples, ci_width), then=then, regions=layout)
        if ex.workers:
            begun.append(begin_workers(_workers.workers(ex.workers), dyn, n, d, dtype, **kw))
        else:
            prepare_members(dyn, n, d, dtype, **kw)

    ahead = _Ahead(lambda: _execution(execution, dyn, solver, samples, n, d, dtype, span, ci_width,
                                      (dyn, solver, budget, stop, then)), prepare)
    try:
        return _study(dyn, key, samples, sampler, solver, budget, stop, span, n, d, dtype, then, layout, ci_width,
                      cluster_tol, progress, run_dir, ahead, begun, prepare)
    finally:
        ahead.cancel()


def _study(dyn, key, samples, sampler, solver, budget, stop, span, n, d, dtype, then, layout, ci_width, cluster_tol,
           progress, run_dir, ahead, begun, prepare) -> BasinResult:
    """The study once its compile thread `ahead` is started (:func:`basin_fractions`)."""
    regions = _certified(dyn, solver, span, n, dtype, layout)
    ex, pi, pc, distributed = ahead.execution()
    if run_dir is not None:
        run_dir.open(study_identity(dyn, key, samples, sampler, solver, span.cap, stop, cluster_tol, ex),
                     process_index=pi, process_count=pc, distributed=distributed)
    tally, verifier = Tally(n), Verifier(dyn, dtype)
    queue_size = _queue_size(ex, samples, ci_width)
    draw_samples(sampler, key, np.arange(ex.chunk))  # the sampler's program, meanwhile (one shape: a full block)
    ahead.join()
    report = _progress(progress, samples)
    blocks = _Blocks(ex.chunk, samples, tally, run_dir, verifier, report, (n, d))
    n_blocks = math.ceil(samples / ex.chunk)
    adaptive = None if ci_width is None else (lambda: all(a.interval[1] - a.interval[0] < ci_width
                                                          for a in summarize(tally, {}).attractors))
    ids = _block_ids(n_blocks, ex.chunk, samples, pi, pc, run_dir, blocks, adaptive)
    stream = blocks.watch(sample_stream(sampler, key, ids, ex.chunk, samples))
    if ex.workers and not begun:  # starting them failed in the other thread: again here, where it raises
        prepare(ex)
    pool_workers = begun[0] if ex.workers else None
    try:
        stream_members(dyn, stream, budget=budget, stop=stop, solver=solver, execution=ex, pool_size=ex.pool,
                       queue_size=queue_size, then=then, sink=blocks.add, regions=regions, workers=pool_workers)
    except BaseException:
        if pool_workers is not None:  # they may still run this study's calls: end them (the next study starts new ones)
            _workers.drop_all()
        raise
    report(None)
    if blocks.open:  # pragma: no cover - every sample of every started block is retired by construction
        raise RuntimeError(f"internal error: blocks {sorted(blocks.open)} incomplete")
    if distributed and pc > 1:
        tally = gather_tally(tally)
    res = summarize(tally, verifier.complete(tally), max_steps=span.cap, tol=stop.tol, backend=ex.backend,
                    members=blocks.members())
    if adaptive is not None and res.attractors and not adaptive():  # the cap came first: say so, with the widest
        widest = max(a.interval[1] - a.interval[0] for a in res.attractors)
        missed = (f"warning: ci_width = {ci_width:g} not reached: the study stopped at its cap of {res.samples} "
                  f"samples with a 95% interval {widest:.3g} wide")
        res = dataclasses.replace(res, warning=missed if res.warning is None else f"{res.warning}\n{missed}")
    return res


_CERTS: dict = {}
"""The certificates of the last studies of this process, by model, solver, step, tokens and dtype (a pure function of
them: a second study of the same model reuses them)."""


def _certified(dyn, solver, span, n, dtype, layout):
    """The certified regions of the study (:mod:`.certify`: `layout`'s shapes, None for none). The pool labels a
    certified member by its region's equilibrium (:class:`~attnflow.evolve.pool.Retired`), stable by construction."""
    from .certify import regions as make_regions

    if layout is None:
        return None
    key = (fingerprint(dyn), fingerprint(solver), span.dt, n, str(jnp.dtype(dtype)))
    certs = _CERTS.get(key)
    if certs is None:
        certs = _stored_certificates(dyn, solver, span.dt, n, dtype)
        if len(_CERTS) >= 16:
            _CERTS.pop(next(iter(_CERTS)))
        _CERTS[key] = certs
    return make_regions(certs, layout)


def _stored_certificates(dyn, solver, dt, n, dtype) -> list:
    """:func:`~.certify.certificates` of the study, read from attnflow's disk cache where a previous process stored
    them (:mod:`attnflow._cache`: the same numbers, so the same study), else computed (and stored)."""
    from .certify import Certificate, certificates

    try:
        key = _cache.content_key("certificates", dyn, solver, dt, n, str(jnp.dtype(dtype)))
    except _cache.NotCanonical:
        key = None
    stored = None if key is None else _cache.read_arrays("certificates", key)
    if stored is not None:
        meta, arrays = stored
        try:
            return [Certificate(X=arrays[f"X{i}"], **c) for i, c in enumerate(meta["certificates"])]
        except (KeyError, TypeError, ValueError):
            pass
    certs = certificates(dyn, solver, dt, tokens=n, dtype=dtype)
    if key is not None:  # every field but the state X as JSON (Python numbers: floats round-trip exactly)
        scalars = [{f.name: np.asarray(getattr(c, f.name)).item() for f in dataclasses.fields(c) if f.name != "X"}
                   for c in certs]
        _cache.write_arrays("certificates", key, {"certificates": scalars},
                            {f"X{i}": np.asarray(c.X) for i, c in enumerate(certs)})
    return certs


def _queue_size(ex: Execution, samples: int, ci_width) -> int:
    return ex.chunk if ci_width is not None else min(ex.chunk, samples)


class _Ahead(threading.Thread):
    """In a daemon thread: ``resolve()`` (the study's execution; :meth:`execution` waits for it and raises its
    error), then ``prepare(execution)`` (compiling the pool program; :meth:`join` waits for it). A failure of
    `prepare` is dropped: the study's own call of the same program raises it.

    A study that ends early (refused, interrupted, or with nothing left to compute) calls :meth:`cancel`: `prepare`
    is then skipped if it has not begun. One already in XLA's compiler cannot be stopped, and the interpreter must
    not exit under it (it would abort: "FATAL: exception not rethrown", exit 134), so the exit waits for it
    (:func:`_join_ahead`, at exit)."""

    live: "set[_Ahead]" = set()
    lock = threading.Lock()

    def __init__(self, resolve: Callable, prepare: Callable):
        super().__init__(daemon=True, name="attnflow-compile")
        self.resolve, self.prepare = resolve, prepare
        self.resolved = threading.Event()
        self.cancelled = False
        self.result, self.error = None, None
        with _Ahead.lock:
            _Ahead.live.add(self)
        self.start()

    def run(self):
        try:
            try:
                self.result = self.resolve()
            except BaseException as e:  # noqa: BLE001 - raised in the study's thread by execution()
                self.error = e
                return
            finally:
                self.resolved.set()
            if self.cancelled:
                return
            try:
                self.prepare(self.result[0])
            except Exception:  # noqa: BLE001 - reported by the study's own call
                pass
        finally:
            with _Ahead.lock:
                _Ahead.live.discard(self)

    def cancel(self) -> None:
        """The study is over: skip `prepare` if it has not begun."""
        self.cancelled = True

    def execution(self):
        self.resolved.wait()
        if self.error is not None:
            raise self.error
        return self.result


@atexit.register
def _join_ahead() -> None:
    """At exit, wait for the compile threads still running (see :class:`_Ahead`)."""
    with _Ahead.lock:
        live = list(_Ahead.live)
    for t in live:
        t.cancel()
        t.join()


def _sampler(dyn, tokens, sampler):
    if sampler is not None:
        if tokens is not None:
            raise ValueError("pass tokens= or sampler=, not both")
        return sampler
    if tokens is None:
        raise ValueError("basin_fractions needs tokens= (or a sampler)")
    heads = getattr(getattr(dyn, "attn", None), "heads", None)
    if heads is None:
        raise ValueError(f"{type(dyn).__name__} has no attention heads to take d from: pass a sampler")
    return Sphere(int(tokens), int(heads.dim), str(jnp.dtype(heads.V.dtype)))


def _execution(execution, dyn, solver, samples, n, d, dtype, span, ci_width, sent=None):
    """The study's execution with every default resolved (backend, chunk, pool, process), and the process split."""
    ex = Execution() if execution is None else execution
    chunk = min(samples, 10_000) if ex.chunk is None else ex.chunk
    backend = pool_backend(ex.backend, dyn, solver, (samples, n, d), dtype, span)
    tile = pool_tile(dyn, solver, backend, n, d, dtype)  # lanes and xla: the pool's tile, its fastest size measured
    pool = ex.pool if ex.pool is not None else min(tile, samples) if tile else min(16384, samples, max(chunk, 64))
    distributed = jax.process_count() > 1
    pi, pc = ex.process if ex.process is not None else (jax.process_index(), jax.process_count())
    if pc > 1 and ci_width is not None:
        raise ValueError("the adaptive mode (ci_width) runs in one process; pass samples instead")
    workers = ex.workers or 0  # only when asked for (the default is one-thread clients in this process: cores)
    if workers and jax.default_backend() != "cpu":
        raise ValueError("worker processes run a study on the CPU; this process's JAX backend is "
                         f"{jax.default_backend()}")
    elif workers and ex.devices is not None and ex.devices > 1:
        raise ValueError("pass devices or workers, not both: each worker process runs one pool on one CPU device")
    elif workers and (why := _workers.unsent(sent)) is not None:
        raise ValueError(f"workers={workers}: the model cannot be sent to a worker process: {why}; define it in a "
                         "module, or pass workers=0")
    cores = ex.cores
    if cores is None:
        cores = 0 if workers else _workers.default_cores(samples, pool, platform=jax.default_backend(),
                                                         local_devices=len(ex.local_devices()), processes=pc,
                                                         cached=bool(jax.config.jax_compilation_cache_dir))
        try:
            core_devices(cores)
        except Exception:  # noqa: BLE001 - a jaxlib that cannot make another CPU client: JAX's own (speed only)
            cores = 0
    elif cores and workers:
        raise ValueError("pass workers or cores, not both: each runs the study's pools, in processes or in this one")
    elif cores and jax.default_backend() != "cpu":
        raise ValueError(f"cores run a study on the CPU; this process's JAX backend is {jax.default_backend()}")
    elif cores and ex.devices is not None and ex.devices > 1:
        raise ValueError("pass devices or cores, not both: each core runs one pool on a CPU client of its own")
    cpus = _workers.cores()
    for name, k, each in (("workers", workers, "worker is a new interpreter that starts JAX and compiles its own pool "
                                               "program (about 2 s each)"),
                          ("cores", cores, "client compiles its own copy of the pool program (about a second and "
                                           "150 MB each)")):
        if k > cpus:
            warnings.warn(f"{name}={k}, but this process may run on {cpus} CPU core(s): each {each} and they share "
                          "the cores; the result is the same", stacklevel=3)
    ex = Execution(backend=backend, chunk=chunk, pool=pool, group=ex.group, devices=ex.devices, process=(pi, pc),
                   workers=workers, cores=cores)
    return ex, pi, pc, distributed


def _progress(progress, total: int) -> Callable:
    """``report(count)`` after each block (``report(None)`` at the end)."""
    if callable(progress):
        done = [0]

        def report(c):
            if c is not None:
                done[0] += c
                progress(done[0], total)

        return report
    if not progress:
        return lambda c: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="samples", desc="basins", smoothing=0.1)
    return lambda c: bar.close() if c is None else bar.update(c)


def fingerprint(obj) -> str:
    """A SHA-256 of a pytree (a model, a solver, a sampler): its structure, static fields and array contents. Plain
    functions are identified by their qualified name."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree.flatten(obj)
    h.update(str(treedef).encode())
    for x in leaves:
        if eqx.is_array(x) or isinstance(x, np.ndarray):
            a = np.asarray(x)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        elif callable(x):
            h.update(f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__name__)}".encode())
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def study_identity(dyn, key: Array, samples: int, sampler, solver, cap: int, stop: Stop, cluster_tol: float,
                   execution: Execution) -> dict:
    """The settings a resumed study must share with the run it continues: the model, sampler and solver by content,
    the key, N, the cap, the stop rule (tol, certificates), the block size and the resolved backend (float32
    results of two backends agree to rounding only)."""
    kd = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return {"samples": int(samples), "chunk_size": int(execution.chunk), "key": np.asarray(kd).tolist(), "tol": stop.tol,
            "certify": stop.certify,
            "cluster_tol": cluster_tol, "max_steps": int(cap), "sampling": "fold_in(key, sample index)",
            "model": fingerprint(dyn), "sampler": fingerprint(sampler), "solver": fingerprint(solver),
            "backend": execution.backend}


def _block_ids(n_blocks, block, samples, pi, pc, writer, blocks, adaptive) -> Iterator:
    """Block ids this process must compute; blocks already written are read into the tally instead (a damaged one is
    recomputed, with a notice). In adaptive mode, yields None before each extra block (the consumer drains first)
    and stops when `adaptive()` is true."""
    b = 0
    while True:
        if b >= n_blocks:
            if adaptive is None:
                return
            yield None
            if adaptive() or b * block >= 100 * samples:
                return
        if b % pc == pi:
            if writer is not None and writer.done(b):
                blocks.read(b)
            else:
                why = None if writer is None else writer.damaged(b)
                if why is not None:
                    print(f"attnflow: block {b} of the run directory is damaged ({why}); recomputing it",
                          file=sys.stderr, flush=True)
                yield b
        b += 1


class _Blocks:
    """Collects retired members by block: names them (verifying each new label's equilibrium once), and writes (if
    a writer is given) and tallies each block once all its members are in."""

    def __init__(self, block: int, samples: int, tally: Tally, writer, verifier: Verifier, report: Callable,
                 final_shape: tuple[int, int]):
        self.C, self.N, self.tally, self.writer, self.verifier, self.report = block, samples, tally, writer, verifier, report
        self.final_shape = final_shape  # (n, d): a member's final state
        self.keep_initial = bool(getattr(writer, "initial", False))
        self.open: dict[int, dict] = {}
        self.initial: dict[int, np.ndarray] = {}
        self.kept: dict[int, tuple] = {}

    def size(self, b: int) -> int:
        lo = b * self.C
        return self.C if lo >= self.N else min(self.C, self.N - lo)

    def watch(self, stream: Iterator) -> Iterator:
        """Pass the sample stream on, keeping each block's initial states when the writer stores them."""
        for ii, xx in stream:
            if ii is not None and self.keep_initial and len(ii):
                self.initial[int(ii[0]) // self.C] = xx.reshape(len(xx), -1)
            yield ii, xx

    def read(self, b: int) -> None:
        """Tally a block already written."""
        c = self.writer.read_chunk(b)
        idx, rows = np.asarray(c["index"]), np.asarray(c["row"])
        if "final" in c:  # the members kept for figures, as the run that computed the block kept them
            for j in np.flatnonzero(idx < KEEP):
                self.kept[int(idx[j])] = (rows[j], np.asarray(c["final"][j]).reshape(self.final_shape))
        cert = np.asarray(c["outcome"]) == "certified"
        self._stable(rows[cert])
        self.tally.add(rows, np.asarray(c["steps"]), idx, np.asarray(c["rep"], np.float64), certified=cert)
        self.report(len(idx))

    def add(self, idx, outcome, steps, finals, labels, tag) -> None:
        """Take the members one pool call retired (the sink of :func:`attnflow.evolve.pool.stream_members`), with
        their labels (a certified member's: its region's equilibrium's)."""
        rows = label_rows(labels)
        cert = outcome == CERTIFIED
        self._stable(rows[cert])
        self._saddles(idx, rows, finals, cert)
        for j in np.flatnonzero(idx < KEEP):
            self.kept[int(idx[j])] = (rows[j], finals[j])
        flat = finals.reshape(len(finals), -1)
        oc = np.where(cert, CERTIFIED, rows[:, 0])  # what became of each member (the row holds its attractor)
        for b in np.unique(idx // self.C):
            sel = idx // self.C == b
            e = self.open.setdefault(int(b), {"index": [], "row": [], "steps": [], "final": [], "outcome": []})
            for k, v in (("index", idx[sel]), ("row", rows[sel]), ("steps", steps[sel]), ("final", flat[sel]), ("outcome", oc[sel])):
                e[k].append(v)
            if sum(len(a) for a in e["index"]) == self.size(int(b)):
                self._complete(int(b), {k: np.concatenate(v) for k, v in self.open.pop(int(b)).items()})

    def _stable(self, rows) -> None:
        """The labels of certified members: their equilibria are stable (the certificate proves it)."""
        for r in (unique_rows(rows)[0] if len(rows) else ()):
            self.verifier.verdicts[tuple(int(v) for v in r)] = "stable"

    def _saddles(self, idx, rows, finals, cert) -> None:
        """Verify every new converged label (from its member of lowest index here); members of labels whose
        equilibrium is unstable get outcome ``saddle`` (their row keeps the equilibrium's fields)."""
        conv = np.flatnonzero((rows[:, 0] == CONVERGED) & ~cert)
        if not len(conv):
            return
        uniq, _, inv = unique_rows(rows[conv])
        for j, r in enumerate(uniq):
            members = conv[inv == j]
            rep = members[np.argmin(idx[members])]
            if self.verifier(tuple(int(v) for v in r), finals[rep]) == "unstable":
                rows[members, 0] = SADDLE

    def _complete(self, b: int, cols: dict) -> None:
        order = np.argsort(cols["index"])
        cols = {k: v[order] for k, v in cols.items()}
        cert = cols["outcome"] == CERTIFIED
        uniq, _, inv = unique_rows(cols["row"])
        names = np.array([describe(r, self.tally.n)["name"] for r in uniq], dtype=str)
        rep = np.full(cols["final"].shape, np.nan)
        for j in range(len(uniq)):  # one representative per distinct row: its first converged member
            ok = np.flatnonzero((inv == j) & ~cert)
            if len(ok):
                rep[ok[0]] = np.asarray(cols["final"][ok[0]], np.float64)
        # the final states of the members kept for figures (sample index < KEEP; NaN for the others), so that a
        # resumed run draws the same members as one run without a break
        fin = cols["final"]
        final = np.where((cols["index"] < KEEP)[:, None], fin, np.nan).astype(fin.dtype)
        out = {"index": cols["index"].astype(np.int64), "name": names[inv],
               "outcome": np.asarray(OUTCOMES)[cols["outcome"]], "steps": cols["steps"].astype(np.int64),
               "row": cols["row"], "rep": rep, "final": final}
        init = self.initial.pop(b, None)
        if init is not None:
            out["initial"] = init
        if self.writer is not None:
            self.writer.write_chunk(b, out)
        self.tally.add(out["row"], out["steps"], out["index"], rep, certified=cert)
        self.report(len(out["index"]))

    def members(self) -> MemberSample | None:
        """The kept members (lowest sample indices), for figures."""
        if not self.kept:
            return None
        order = sorted(self.kept)
        rows = [self.kept[i][0] for i in order]
        return MemberSample(np.asarray(order), tuple(describe(r, self.tally.n)["name"] for r in rows),
                            np.stack([self.kept[i][1] for i in order]))
