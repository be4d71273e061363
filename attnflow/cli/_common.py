"""Small helpers shared by the subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


class UsageError(ValueError):
    """Bad command-line input: printed as one line on stderr, exit status 2."""


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__array__"):
        return np.asarray(o).tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj) -> str:
    return json.dumps(obj, default=_default)


def emit_json(obj) -> None:
    """Print one JSON document on stdout."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def out_dir(path) -> Path | None:
    """Create the output directory (or return None when no --out was given)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {str(p)!r} exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


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
