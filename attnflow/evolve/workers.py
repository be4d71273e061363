"""Worker processes for the member pools of a study on a CPU: one process per core, each with a one-thread XLA.

**Why processes.** A pool's program is a loop of small kernels (a few hundred lanes each). On a CPU, XLA hands them
to a thread pool of one thread per core, and for kernels this small the hand-offs cost more than the second core
gives. Measured on the 2-core CPU (2026-12-03, the sphere flow of ``benchmarks/bench_peer_basins.py``, adaptive, 2 x
10^4 members, warm): 1.10-1.32 s in one process with XLA's default pool, 0.78-0.80 s with a pool of one thread
(``PJRT_NPROC=1``), and 0.43-0.44 s as two such processes side by side, each on its own core with half of the
members. Two CPU devices in one process cannot do the same: their programs, run at once, were seen to deadlock in
XLA's thread pool. So a study splits every block between worker processes, as it splits it between devices: each
worker runs its own pool on its own share (:func:`attnflow.evolve.pool.stream_members`), and the parent labels,
tallies and writes what they retire. A member's outcome, steps and final state never depend on the split.

**Lifetime.** A worker is a new interpreter (``python -c``, this attnflow first on its path: about 1.5 s to import
JAX; not :mod:`multiprocessing`, which would run the caller's script again in every worker unless it is guarded by
``if __name__ == "__main__"``), fed pickled calls on a pipe, in order. Workers are kept for the next study of the
process, so a second study starts warm. They take JAX's settings that matter from the parent (64-bit mode, the
persistent compilation cache), ignore SIGINT (Ctrl-C stops the parent, which ends them) and end with their parent
(their pipe closes). A worker that dies takes its pool's members with it: the study raises
:class:`WorkerError`, and a run directory keeps the blocks finished before (resumable).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import io
import itertools
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading

MAX_WORKERS = 8
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


class WorkerError(RuntimeError):
    """A worker process of a study died (killed, out of memory)."""


def cores() -> int:
    """The CPU cores this process may run on: those of its affinity mask, at most its cgroup's CPU quota (a
    container may see every core of its host and be allowed two)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


CORES_MIN_SAMPLES = 50_000
"""Without JAX's persistent compilation cache, a study's default uses more than one one-thread client from this many
samples on: each client compiles its own copy of the pool program, and the second compile, run alongside the
certificates, costs a new process about 0.8 s (measured on the 2-core CPU, 2026-12-04, the adaptive sphere flow of
``benchmarks/bench_peer_basins.py``, first call / warm: 10^4 samples 2.2 / 0.37 s on one client against 3.0 / 0.22 s
on two; 3 x 10^4 samples 2.7 / 0.96 s against 3.5 / 0.56 s), which a study pays back from a few times 10^4 samples
on. With the cache on (the CLI's default), the other clients load the first one's program from it, and a study uses
them all (10^4 samples, filled cache: 0.60-0.76 s on two clients against 0.67-0.68 s on one)."""


def default_cores(samples: int, pool: int, *, platform: str, local_devices: int, processes: int,
                  cached: bool = True) -> int:
    """The one-thread clients (:func:`attnflow._device.core_devices`) of a study without workers whose execution sets
    none: for a study in one process on one CPU device, one per core, at most :data:`MAX_WORKERS` and at most one per
    `pool` samples (one only, below :data:`CORES_MIN_SAMPLES` samples, unless JAX's persistent compilation cache is on:
    `cached`); else 0 (the pools run on JAX's devices). Speed only: a member's outcome never depends on it.

    They replace worker processes as the default (workers now run only when asked for): as fast warm, and without a
    worker's start-up. Measured on the 2-core CPU (2026-12-04, ``benchmarks/bench_cores.py``, 10^5 samples, new
    process without a compilation cache, first call / warm): the adaptive sphere flow 4.4 / 1.7 s on two clients
    against 5.8 / 1.7 s in two workers and 6.4 / 4.5 s on JAX's client; the RK4 flow 16.6 / 10.2 s against 17.9 / 10.2
    s and 22.8 / 19.0 s; the toy layer map 4.3 / 1.7 s against 5.5 / 1.8 s and 5.8 / 4.1 s."""
    if platform != "cpu" or local_devices != 1 or processes != 1:
        return 0
    if not cached and samples < CORES_MIN_SAMPLES:
        return 1
    return max(1, min(cores(), MAX_WORKERS, -(-samples // max(1, pool))))


def unsent(obj) -> str | None:
    """Why `obj` (a model, a solver, the settings of a pool call) cannot be sent to a worker process, or None: it must
    pickle, and every class and function it names must be importable by a new interpreter (one defined in a script
    run as ``__main__``, or in a notebook, is not)."""
    found: list[str] = []

    class _Check(pickle.Pickler):
        def reducer_override(self, o):
            if callable(o):  # classes and functions (and callable instances: their class's module)
                mod = getattr(o, "__module__", None)
                if mod == "__main__":
                    found.append(getattr(o, "__qualname__", repr(o)))
            return NotImplemented

    try:
        _Check(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        error = None
    except Exception as e:  # noqa: BLE001 - any failure to pickle is the reason
        error = f"it cannot be pickled ({type(e).__name__}: {e})"
    if found:
        return f"{found[0]} is defined in __main__ (a script or a notebook), which a worker process cannot import"
    return error


# ------------------------------------------------------------------------------------------------ in the worker
_STREAMS: dict = {}
"""This worker's streams by id: several studies of one process (e.g. in threads) may share its workers."""
MAX_STREAMS = 8


def _begin(sid: int, ctx: dict, layout) -> None:
    """Start stream `sid`: keep its settings, make an empty pool and compile its program (a call on an empty queue,
    with `layout`'s region shapes)."""
    import jax

    from .pool import compile_pool_call, empty_pool

    pool = empty_pool(ctx["pool_size"], ctx["n"], ctx["d"], ctx["dtype"], jax.devices()[0])  # as stream_members
    kw = {k: ctx[k] for k in ("budget", "stop", "solver", "execution", "then")}
    compile_pool_call(ctx["dyn"], pool, ctx["share"], ctx["n"], ctx["d"], regions=layout, **kw)
    while len(_STREAMS) >= MAX_STREAMS:  # the oldest goes (a block of it would then be refused, loudly)
        _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[sid] = {"dyn": ctx["dyn"], "kw": kw, "pool": pool}


def _block(sid: int, q, qi, count: int, drain: bool, regions):
    """One pool call of stream `sid` on this worker's share of a block: the retired members on the host
    (:meth:`~attnflow.evolve.pool.Retired.sink_args`)."""
    from .pool import advance_pool

    st = _STREAMS.get(sid)
    if st is None:
        raise RuntimeError(f"internal error: a worker got a block of stream {sid}, which it did not begin (or dropped)")
    st["pool"], out = advance_pool(st["dyn"], st["pool"], q, qi, count, drain=drain, regions=regions, **st["kw"])
    return out.sink_args()


_CALLS = {"begin": _begin, "block": _block, "pid": os.getpid}


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _frame(f) -> bytes:
    """One message's bytes (EOFError at the end of the pipe)."""
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", head)
    data = f.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _recv(f):
    return pickle.loads(_frame(f))


def _serve() -> None:
    """The worker's loop: read ``(name, args)`` calls from stdin, write ``(ok, result or exception)`` to the
    protocol pipe (the original stdout; fd 1 then writes to stderr, so a stray print cannot break the protocol)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    path, settings = _recv(inp)
    sys.path[:] = path  # the parent's: the modules of its models import here as there
    import jax

    for k, v in settings.items():
        jax.config.update(k, v)
    while True:
        try:
            data = _frame(inp)
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            name, args = pickle.loads(data)  # (a model whose module does not import here fails here, not the worker)
            res = (True, _CALLS[name](*args))
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            res = (False, e)
        try:
            try:
                _send(out, res)
            except Exception as e:  # noqa: BLE001 - e.g. an exception that does not pickle
                _send(out, (False, RuntimeError(f"a worker's result could not be sent: {type(e).__name__}: {e}")))
        except OSError:  # the parent is gone
            return


# ------------------------------------------------------------------------------------------------ in the parent
class _Worker:
    """One worker process: calls are answered in the order they were made. A writer thread sends them (a call of
    several hundred kB fills the pipe until the worker, busy with the previous one, reads it: the caller must not wait
    for that while the other workers idle) and a reader thread resolves their futures."""

    def __init__(self, settings: dict):
        # this process's environment, passed on, plus what XLA reads when it starts: a one-thread pool, the CPU
        env = dict(os.environ, PJRT_NPROC="1", JAX_PLATFORMS="cpu")
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this attnflow's parent
        # a Ctrl-C is the parent's to handle (it ends the workers): the worker ignores SIGINT from its first
        # statement, and is started with SIGINT blocked, so that one arriving before that statement waits and is then
        # discarded (a SIGINT while it imported JAX printed a KeyboardInterrupt traceback and killed it)
        code = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "hasattr(signal, 'pthread_sigmask') and signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                f"import sys; sys.path.insert(0, {here!r}); from attnflow.evolve.workers import _serve; _serve()")
        blocked = hasattr(signal, "pthread_sigmask")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=env)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.pending: collections.deque[cf.Future] = collections.deque()
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.dead = False
        self.outbox.put((list(sys.path), settings))
        self.threads = [threading.Thread(target=self._write, daemon=True, name="attnflow-worker-writer"),
                        threading.Thread(target=self._read, daemon=True, name="attnflow-worker-reader")]
        for t in self.threads:
            t.start()

    def submit(self, name: str, *args) -> cf.Future:
        """Send the call ``name(*args)`` (:data:`_CALLS`); its future holds the result or the worker's exception."""
        fut: cf.Future = cf.Future()
        with self.lock:
            if self.dead:
                fut.set_exception(WorkerError("a worker process of this study died"))
                return fut
            self.pending.append(fut)
            self.outbox.put((name, args))
        return fut

    def _write(self) -> None:
        # a message holds the model's JAX arrays: the thread must not keep the last reference to one while it waits,
        # since the reference would be dropped here when close() wakes it at exit, while the interpreter finalises,
        # and a JAX array freed by a daemon thread then aborts the process ("FATAL: exception not rethrown", exit
        # status 134, seen once in three runs of a 10^5-member study)
        try:
            while True:
                msg = self.outbox.get()
                if msg is None:
                    break
                _send(self.proc.stdin, msg)
                del msg
        except Exception:  # noqa: BLE001 - the worker is gone: the reader fails the pending calls
            pass
        finally:
            try:
                self.proc.stdin.close()
            except Exception:  # noqa: BLE001
                pass

    def _read(self) -> None:
        while True:
            try:
                data = _frame(self.proc.stdout)
            except Exception:  # noqa: BLE001 - the end of the pipe: the worker is gone
                break
            try:
                ok, res = pickle.loads(data)
            except Exception as e:  # noqa: BLE001 - that call's result is lost, the next ones are not
                ok, res = False, RuntimeError(f"a worker's result could not be read: {type(e).__name__}: {e}")
            with self.lock:
                fut = self.pending.popleft()
            (fut.set_result if ok else fut.set_exception)(res)
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        with self.lock:
            self.dead = True
            while self.pending:
                self.pending.popleft().set_exception(WorkerError(
                    f"a worker process of this study died (exit status {code}: killed, or out of memory?); "
                    "the blocks finished before are kept in a run directory"))
        try:
            self.proc.stdout.close()
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        """End the process: its pipes close, and the writer and reader threads end with them."""
        self.outbox.put(None)
        try:
            self.proc.terminate()
        except OSError:
            pass


class Stream:
    """One study's stream on the workers (:meth:`Workers.begin`): its calls name it, so that studies sharing the
    workers (e.g. in threads) never run on each other's model."""

    def __init__(self, workers: "Workers", sid: int, started: list[cf.Future]):
        self.workers, self.sid, self.started = workers, sid, started
        self.count = workers.count

    def block(self, j: int, q, qi, count: int, drain: bool, regions) -> cf.Future:
        """Submit one pool call of the stream (:func:`attnflow.evolve.pool.advance_pool` on queue `q`, indices `qi`,
        its first `count` entries) to worker `j`; its future holds the retired members on the host."""
        return self.workers.procs[j].submit("block", self.sid, q, qi, int(count), bool(drain), regions)

    def result(self, j: int, fut: cf.Future):
        """The result of worker `j`'s call `fut` (the stream's start error first)."""
        try:
            self.started[j].result()
            return fut.result()
        except WorkerError:
            _drop(self.workers)
            raise


class Workers:
    """`count` worker processes. :meth:`begin` starts a :class:`Stream` on all of them."""

    _sids = itertools.count(1)

    def __init__(self, count: int, settings: dict):
        self.count, self.settings = count, settings
        self.procs = [_Worker(settings) for _ in range(count)]

    def begin(self, ctx: dict, layout) -> Stream:
        """Start a new stream (`ctx`: the model and the pool call's settings) on every worker; returns at once."""
        sid = next(self._sids)
        return Stream(self, sid, [w.submit("begin", sid, ctx, layout) for w in self.procs])

    def close(self) -> None:
        """End the worker processes (calls in flight are dropped)."""
        for w in self.procs:
            w.close()


_LIVE: dict = {}
_LOCK = threading.Lock()


def _settings() -> dict:
    import jax

    keys = ("jax_enable_x64", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size", "jax_default_matmul_precision")
    return {k: getattr(jax.config, k) for k in keys}


def workers(count: int) -> Workers:
    """`count` workers with this process's current JAX settings: those of an earlier study when they match and are
    alive (warm), else new ones (the old ones end)."""
    settings = _settings()
    with _LOCK:
        w = _LIVE.get("w")
        if w is not None and w.count == count and w.settings == settings and not any(p.dead for p in w.procs):
            return w
        if w is not None:
            w.close()
        w = _LIVE["w"] = Workers(count, settings)
        return w


def _drop(w: Workers) -> None:
    with _LOCK:
        if _LIVE.get("w") is w:
            del _LIVE["w"]
    w.close()


def drop_all() -> None:
    """End the worker processes (a study cut short by an exception: its workers may still run its calls)."""
    w = _LIVE.get("w")
    if w is not None:
        _drop(w)


@atexit.register
def _end_at_exit() -> None:
    """At exit: end the worker processes and wait (briefly) for their threads, so that nothing they hold is freed
    by a daemon thread while the interpreter finalises (see :meth:`_Worker._write`)."""
    w = _LIVE.get("w")
    drop_all()
    if w is not None:
        for p in w.procs:
            for t in p.threads:
                t.join(timeout=5)
