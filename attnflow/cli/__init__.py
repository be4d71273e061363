"""The ``attnflow`` command line. Thin: parse, call the public API, print/write.

Each subcommand is a module ``attnflow.cli.<name>`` with ``add_parser(subparsers)`` and ``run(args)``. A command runs
under :func:`attnflow.cli._interrupt.call`: SIGINT (Ctrl-C) and SIGTERM stop it at any moment, the first compile
included, with one line on stderr and exit status 130 or 143.

Importing this package imports the standard library only (``attnflow`` imports :mod:`._interrupt` first thing in the
command's own process, before JAX).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import _interrupt

COMMANDS = ("simulate", "demo", "stability", "basins", "energy", "metastability", "geometry", "transformer", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``attnflow`` argument parser with one subcommand per entry of COMMANDS."""
    from .. import __version__

    p = _Parser(
        prog="attnflow",
        description="Self-attention dynamics of transformers at scale: simulate token ensembles, find and certify "
        "equilibria, measure basins of attraction, analyse real transformer weights.",
    )
    p.add_argument("--version", action="version", version=f"attnflow {__version__}")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (by default compiled programs are kept in "
                        f"{compile_cache_dir()} and reused by later runs)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"attnflow.cli.{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    """Run the ``attnflow`` command line; returns the exit status (2 on bad input, with one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, one line already printed)
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return _interrupt.call(lambda: _dispatch(args), command=args.command, out=getattr(args, "out", None))


def compile_cache_dir():
    """Where the command keeps JAX's compiled programs: ``$XDG_CACHE_HOME/attnflow/jax`` (default
    ``~/.cache/attnflow/jax``)."""
    import os
    from pathlib import Path

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "attnflow" / "jax"


COMPILE_CACHE_MAX_BYTES = 2**30
"""The most bytes JAX's cache of :func:`use_compile_cache` holds: JAX removes the programs used least recently
beyond it (a basin study's programs take about 0.3 MB). attnflow's own entries next to them have their own bound
(:data:`attnflow._cache.MAX_BYTES`)."""


def use_compile_cache(path=None) -> None:
    """Turn on JAX's persistent compilation cache in `path` (default :func:`compile_cache_dir`): a program compiled
    once (for the same model structure, shapes, backend and JAX version) is loaded from disk by every later run
    instead of compiled again. Every program is stored, however fast it compiled (a study compiles about 50 small
    ones besides its main loop: together they took about 0.8 s of a new process's start); the cache holds at most
    :data:`COMPILE_CACHE_MAX_BYTES`, the programs used least recently removed first."""
    import jax

    import os
    import uuid

    path = compile_cache_dir() if path is None else path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{os.getpid()}.{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:  # a read-only home or cache: run without the cache (JAX would warn at every program)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _bound_compile_cache(path)
    try:  # JAX opens its cache once per process: a cache it opened before (another directory, no bound) is closed
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


def _bound_compile_cache(path) -> None:
    """Bound JAX's cache in `path` to :data:`COMPILE_CACHE_MAX_BYTES`. JAX's bounded cache keeps a last-use stamp
    next to each program and fails to store new programs while an older program has none (a cache filled unbounded,
    e.g. by an earlier attnflow): such programs are stamped with their file's time first. Where this JAX names its
    files otherwise, the cache is left unbounded."""
    import jax

    try:
        from jax._src import lru_cache

        cache_sfx, atime_sfx = lru_cache._CACHE_SUFFIX, lru_cache._ATIME_SUFFIX
    except (ImportError, AttributeError):
        return
    try:
        for p in path.glob("*" + cache_sfx):
            stamp = p.with_name(p.name[: -len(cache_sfx)] + atime_sfx)
            if not stamp.exists():
                stamp.write_bytes(p.stat().st_mtime_ns.to_bytes(8, "little"))
    except OSError:  # not ours to fix: JAX skips a cache it cannot write
        return
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)


def _dispatch(args) -> int:
    """Run the parsed command; bad input becomes one line on stderr and exit status 2, anything else is raised."""
    from ..io.config import ConfigError
    from ..io.results import RunDirError
    from ..evolve.workers import WorkerError
    from ..io.weights import WeightsError
    from . import _common
    from ._common import UsageError, undo_out_dirs

    if not args.no_compile_cache:
        use_compile_cache()
    _common._MADE.clear()
    try:
        return int(args._run(args) or 0)
    except (ConfigError, UsageError, RunDirError, WeightsError) as e:
        undo_out_dirs()  # bad input writes nothing
        return _fail(args.command, str(e))
    except WorkerError as e:  # a worker process of a study was killed: its finished chunks are kept
        return _fail(args.command, f"{e}; continue with --resume")
    except OSError as e:  # a file that vanished, a full disk, ...: the system's one-line reason
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return _fail(args.command, f"{e.strerror or type(e).__name__}{where}")
    except MemoryError:
        return _fail(args.command, "out of memory; use a smaller batch, chunk_size or tokens")
    except Exception as e:
        if "RESOURCE_EXHAUSTED" in str(e):  # an allocation the memory estimate did not foresee
            return _fail(args.command, "out of device memory; use a smaller batch, --chunk-size / chunk_size, or tokens")
        raise
    except KeyboardInterrupt:  # only when called from a thread other than the main one (no handlers there)
        print(f"attnflow {args.command}: interrupted (SIGINT)", file=sys.stderr)
        return 130


def _fail(command: str, msg: str) -> int:
    """Print one line on stderr; exit status 2."""
    print(f"attnflow {command}: error: {' '.join(msg.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
