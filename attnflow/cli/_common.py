"""Small helpers shared by the subcommands."""

from __future__ import annotations

import math
import sys
from pathlib import Path


class UsageError(ValueError):
    """Bad command-line input: printed as one line on stderr, exit status 2."""


def to_json(obj, *, indent: int | None = None) -> str:
    """Strict JSON text of a command's result: the one writer :func:`attnflow._json.dumps` (NumPy values as plain
    ones, every non-finite number as ``null``, never ``NaN`` or ``Infinity``)."""
    from .._json import dumps

    return dumps(obj, indent=indent)


def emit_json(obj) -> None:
    """Print one strict JSON document on stdout (:func:`to_json`)."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def out_dir(path, command: str | None = None) -> Path | None:
    """Create the output directory and check that it is writable, before any work (None when no --out). With
    `command` (the subcommand's name), also claim it for that command: a directory holding another command's
    output is refused in one line, and the marker ``DIR/.attnflow`` is written (:func:`attnflow.io.results.claim_dir`)."""
    if path is None:
        return None
    if str(path) == "":  # Path("") is the current directory: never write there by accident
        raise UsageError("--out needs a directory name, got an empty string")
    import os
    import uuid

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {str(p)!r} exists and is not a directory")
    made = [q for q in (p, *p.parents) if not q.exists()]  # what this call creates, deepest first
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".attnflow-probe.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {str(p)!r} is not writable ({e.strerror or type(e).__name__}); choose another directory") from None
    if command is not None:
        from ..io.results import MARKER, RunDirError, claim_dir

        _MADE.append((p, made, not (p / MARKER).exists(), {q.name for q in p.iterdir()}))
        try:
            claim_dir(p, command)
        except RunDirError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"--out {str(p)!r} is not writable ({e.strerror or type(e).__name__}); choose another directory") from None
    return p


_MADE: list = []
"""``(directory, the directories created for it, whether its marker was written, the names it held)`` of every
:func:`out_dir` of this process's command, for :func:`undo_out_dirs`."""


def undo_out_dirs() -> None:
    """Take back what :func:`out_dir` wrote when the command then refused its input (exit status 2), so that bad input
    writes nothing: the marker and the lock file it added, where nothing else was written into the directory since,
    and the directories it created, where they are then empty. A directory the command wrote anything else into is
    left as it is."""
    from ..io.results import MARKER

    while _MADE:
        p, made, marked, before = _MADE.pop()
        try:
            new = {q.name for q in p.iterdir()} - before
            ours = ({MARKER} if marked else set()) | {".lock"}
            if new <= ours:  # nothing but the marker and the lock was written since
                for name in new:
                    (p / name).unlink()
                for q in made:  # deepest first; a directory that is not empty stays
                    q.rmdir()
        except OSError:
            pass


def load_run_config(path):
    """Load and validate a config; at this edge (and only here) JAX is switched to float64 when the config asks.

    attnflow's library never changes JAX's settings: a ``dtype = "float64"`` config needs ``jax_enable_x64``,
    and the command line, which owns its process, enables it explicitly before building anything.
    """
    from ..io.config import parse_config, read_toml

    raw = read_toml(path)
    dyn = raw.get("dynamics")
    if isinstance(dyn, dict) and dyn.get("dtype") == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    return parse_config(raw, Path(path))


# ------------------------------------------------------------------------------------------ memory guard
def available_memory() -> tuple[int, int]:
    """(device bytes, host bytes) that a call may use now: free accelerator memory, MemAvailable of the host."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        import os

        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            host = 8 << 30
    import jax

    dev = host
    d = jax.local_devices()[0]
    if d.platform != "cpu":
        try:
            st = d.memory_stats() or {}
            dev = int(st.get("bytes_limit", 0)) - int(st.get("bytes_in_use", 0)) or host
        except (RuntimeError, NotImplementedError, AttributeError, TypeError, ValueError):  # no memory statistics: the host's
            dev = host
    return dev, host


def member_bytes(cfg) -> int:
    """Working memory of one ensemble member during one step: states and stages, the attention scores
    (heads x tokens^2, a few copies) and the per-head projections. A deliberate over-estimate."""
    item = 4 if cfg.dtype == "float32" else 8
    n, d, h = cfg.tokens, cfg.d, cfg.num_heads
    dh = int(cfg.weights["Q"].shape[1])
    return item * (8 * n * d + 3 * h * n * n + 4 * h * n * dh)


def gib(b: float) -> str:
    """A byte count in GiB, three significant digits."""
    return f"{b / 2**30:.3g} GiB"


def plan_chunk(cfg, members: int, chunk: int | None, *, what: str, flag: str, host_per_member: int = 0) -> int | None:
    """Check before allocating that ``members`` fit, in chunks of ``chunk`` (None: all at once, or a size chosen
    here). Returns the chunk size to use (None: no chunking); refuses in one line that suggests a size."""
    dev, host = available_memory()
    dev_budget, host_budget = dev // 2, host // 2
    one = member_bytes(cfg)
    if host_per_member * members > host_budget:
        raise UsageError(f"{what}: the results of {members} members need ~{gib(host_per_member * members)} of host memory, "
                         f"~{gib(host_budget)} usable; reduce batch (or saves)")
    if one > dev_budget:
        raise UsageError(f"{what}: one member ({cfg.tokens} tokens, {cfg.num_heads} head(s)) needs ~{gib(one)} per step, "
                         f"~{gib(dev_budget)} usable; reduce tokens")
    fit = max(1, dev_budget // one)
    if chunk is not None:
        if chunk * one > dev_budget:
            raise UsageError(f"{what}: {flag} {chunk} needs ~{gib(chunk * one)} per step, ~{gib(dev_budget)} usable; "
                             f"use {flag} {2 ** int(math.log2(fit))} or less")
        return chunk
    if members > fit:
        return 2 ** int(math.log2(fit))
    return None


def info(msg: str, *, quiet: bool = False) -> None:
    """Human-readable progress on stderr (stdout stays clean for --json)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class stdout_to_stderr:
    """Send file descriptor 1 to stderr while active, so that native libraries (e.g. gloo under
    ``jax.distributed``) that print on stdout cannot corrupt ``--json`` output."""

    def __enter__(self):
        import os

        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        return self

    def __exit__(self, *exc):
        import os

        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        return False


def releasing_locks(command):
    """``run(args)`` for a command written as ``command(args, locks)``: every run-directory hold it appends to
    `locks` is released when it ends, however it ends (a hold left to the garbage collector kept a second in-process
    run of the same --out waiting)."""

    def run(args) -> int:
        locks: list = []
        try:
            return command(args, locks)
        finally:
            for lock in locks:
                lock.release()

    run.__doc__ = command.__doc__
    return run
