"""Checking user input: one value against its annotation and constraints, whole tables against their records,
numbers against a dtype, and files (read only when they are regular files of a bounded size).

Every problem is a :class:`ConfigError` whose message is one line that says where (the caller's ``where``: file,
table, key) and what was expected. The same checks serve the TOML run configuration and the ``config.json`` of
Hugging Face checkpoints (:mod:`attnflow.io.hf`), so both speak alike:

- integers: ``must be an integer, got ...``; ``must be >= 1, got 0``; ``must be in [1, 10000], got -1``
- numbers: ``must be a finite number > 0, got ...`` (wrong type, non-finite, too large or out of range)
- booleans: ``must be true or false (without quotes), got 'false'``; strings: ``must be a string`` or
  ``must be one of 'a', 'b', got 'c' (did you mean 'a'?)``

Limits: a config file is at most :data:`MAX_CONFIG_BYTES` (16 MiB) and its values are nested at most
:data:`MAX_NESTING` levels deep; an input file (weights, init, states) is at most :data:`MAX_INPUT_BYTES` (2 GiB),
and its arrays at most 2 GiB once unpacked (:data:`attnflow.io.weights.MAX_ARRAY_BYTES`), checked from the
archive's headers before any array is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import reprlib
import stat
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Union

import numpy as np

from .schema import Matrix, hints


class ConfigError(ValueError):
    """A problem with user input, reported as one line."""


MAX_CONFIG_BYTES = 16 << 20
"""The largest config file read (16 MiB): larger matrices belong in a weights file."""
MAX_INPUT_BYTES = 2 << 30
"""The largest input file (weights, init, states) read (2 GiB)."""
MAX_NESTING = 16
"""The deepest nesting of TOML values accepted (the schema needs 5: file, table, inline table, array, row)."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 4, 40, 40


def show(v) -> str:
    """A short, one-line representation of a value for a message (bounded in length and depth, never recursing
    far: a value nested thousands of levels deep is shown as ``[[[...]]]``)."""
    try:
        r = _REPR.repr(v)
    except RecursionError:  # pragma: no cover - reprlib stops at maxlevel
        r = type(v).__name__
    r = " ".join(r.split())
    return r if len(r) <= 80 else r[:77] + "..."


def one_line(e: BaseException | str, limit: int = 200) -> str:
    """An exception (or text) as one short line."""
    return " ".join(str(e).split())[:limit] or (type(e).__name__ if isinstance(e, BaseException) else "")


def did_you_mean(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest option, else `` (allowed: a, b, c)``."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(sorted(options))})"


# -------------------------------------------------------------------------------------------- one value
_OPS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_TESTS = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b, "lt": lambda a, b: a < b}


def bounds(meta) -> str:
    """The constraints of `meta` as text: ``>= 1``, ``in [1, 10000]``, ``in (0, 1)`` (empty if none)."""
    lims = [(k, op, meta[k]) for k, op in _OPS if meta.get(k) is not None]
    lower = [x for x in lims if x[0] in ("ge", "gt")]
    upper = [x for x in lims if x[0] in ("le", "lt")]
    if len(lower) == 1 and len(upper) == 1:
        lo, hi = lower[0], upper[0]
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[2]!r}, {hi[2]!r}{']' if hi[0] == 'le' else ')'}"
    return " and ".join(f"{op} {lim!r}" for _, op, lim in lims)


def in_range(v, meta) -> bool:
    """Whether `v` satisfies every bound of `meta`."""
    return all(_TESTS[k](v, meta[k]) for k, _ in _OPS if meta.get(k) is not None)


def check_int(where: str, v, meta=None) -> int:
    """A strict integer (no bool, no float) within the bounds of `meta`."""
    meta = meta or {}
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where} must be an integer, got {show(v)}")
    if not in_range(v, meta):
        raise ConfigError(f"{where} must be {bounds(meta)}, got {v}")
    return v


def check_float(where: str, v, meta=None) -> float:
    """A strict finite number (no bool; integers become floats) within the bounds of `meta`."""
    meta = meta or {}
    rng = bounds(meta)
    bad = ConfigError(f"{where} must be a finite number{' ' + rng if rng else ''}, got {show(v)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad
    try:
        f = float(v)
    except OverflowError:  # an integer beyond the float range
        raise bad from None
    if not math.isfinite(f) or not in_range(f, meta):
        raise bad
    return f


def check_bool(where: str, v) -> bool:
    """A strict boolean (``true``/``false``; no ``"false"``, no 0/1)."""
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false (without quotes), got {show(v)}")
    return v


def check_str(where: str, v, meta=None) -> str:
    """A string, one of ``meta["choices"]`` when given (unless a model constructor checks them)."""
    meta = meta or {}
    if not isinstance(v, str):
        raise ConfigError(f"{where} must be a string, got {show(v)}")
    choices = meta.get("choices")
    if choices and not meta.get("checked_by") and v not in choices:
        hint = difflib.get_close_matches(v, choices, n=1, cutoff=0.6)
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {show(v)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return v


def _typename(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def value(where: str, v, tp, meta=None):
    """Check one value against an annotation (int, float, bool, str, :data:`Matrix`, ``list[...]``, a record
    type, or a ``Union`` of those with None); returns the typed value (floats as floats, tuples for arrays)."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return value(where, v, args[0], meta)
        # str | Table: a named choice or an inline table
        for a in args:
            if a is str and isinstance(v, str):
                return value(where, v, str, meta)
            if a is int and isinstance(v, int) and not isinstance(v, bool):
                return value(where, v, int, meta)
            if dataclasses.is_dataclass(a) and isinstance(v, dict):
                return parse_table(a, v, where)
        raise ConfigError(f"{where} must be {' or '.join(_typename(a) for a in args)}, got {show(v)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ConfigError(f"{where} must be a table, got {show(v)}")
        return parse_table(tp, v, where)
    if tp is bool:
        return check_bool(where, v)
    if tp is int:
        return check_int(where, v, meta)
    if tp is float:
        return check_float(where, v, meta)
    if tp is str:
        return check_str(where, v, meta)
    if tp is Matrix:
        if not isinstance(v, list) or not v or not all(isinstance(r, list) for r in v):
            raise ConfigError(f"{where} must be a matrix (an array of arrays of numbers), got {show(v)}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for r in v for x in r):
            raise ConfigError(f"{where} must hold numbers only")
        if len({len(r) for r in v}) != 1:
            raise ConfigError(f"{where} must be rectangular (rows of equal length)")
        try:
            return tuple(tuple(float(x) for x in r) for r in v)
        except OverflowError:
            raise ConfigError(f"{where} holds a number too large for a float") from None
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where} must be a non-empty array, got {show(v)}")
        return tuple(value(f"{where}[{i}]", x, elem, meta) for i, x in enumerate(v))
    raise TypeError(f"unsupported schema type {tp!r}")  # pragma: no cover - a schema bug, not user input


def parse_table(cls, raw, where: str):
    """Check a TOML table against the record type ``cls``: unknown keys, missing keys, types and ranges."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {show(raw)}")
    types = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            raise ConfigError(f"{where} has an unknown key {show(k)}{did_you_mean(str(k), names)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kw[f.name] = value(f"{where} {f.name}", raw[f.name], types[f.name], f.metadata)
        elif f.default is MISSING:
            raise ConfigError(f"{where} needs {f.name} ({f.metadata['doc']})")
    return cls(**kw)


def nesting_exceeds(obj, limit: int) -> bool:
    """Whether lists / dicts in `obj` are nested more than `limit` levels deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, (list, tuple, dict)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (o.values() if isinstance(o, dict) else o))
    return False


def check_nesting(where: str, raw: dict, limit: int = MAX_NESTING) -> None:
    """Refuse (naming the table and key) a value nested more than `limit` levels deep in a config dict
    (`where` is the file's name)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of tables, got {show(raw)}")
    for t, tab in raw.items():
        items = tab.items() if isinstance(tab, dict) else [(None, tab)]
        for k, v in items:
            if nesting_exceeds(v, limit - 2):
                label = f"[{str(t)[:40]}]" + ("" if k is None else f" {str(k)[:40]}")
                raise ConfigError(f"{where}: {label} is nested more than {limit} levels deep")


# --------------------------------------------------------------------------------------------- dtypes
def check_fits(where: str, a, dtype: str) -> None:
    """Refuse numbers that overflow (or underflow to zero in) the chosen dtype."""
    fi = np.finfo(dtype)
    a = np.abs(np.asarray(a, dtype=np.float64))
    if a.size and a.max() > fi.max:
        raise ConfigError(f"{where} has magnitude {a.max():.3g}, which overflows {dtype} (max {float(fi.max):.3g})")
    tiny = a[(a > 0) & (a < fi.tiny)]
    if tiny.size:
        raise ConfigError(f"{where} has magnitude {tiny.min():.3g}, which underflows {dtype} (smallest normal {float(fi.tiny):.3g})")


def real_array(where: str, a: np.ndarray) -> np.ndarray:
    """A real, finite float64 copy of `a` (complex, non-numeric or non-finite arrays are refused)."""
    if np.iscomplexobj(a):
        raise ConfigError(f"{where} is complex ({a.dtype}); attnflow needs real numbers")
    if a.dtype.kind not in "fiu":
        raise ConfigError(f"{where} has dtype {a.dtype}, expected real numbers")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"{where} contains non-finite values")
    return a


# ---------------------------------------------------------------------------------------------- files
def _size(n: int) -> str:
    from ..weights import _size as size

    return size(n)


def read_bytes(name: str, p: Path, limit: int = MAX_INPUT_BYTES, *, expected: str = "a file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; one-line errors that start with `name`.

    Devices (``/dev/zero``), FIFOs, sockets and directories are refused without reading (the file is opened
    non-blocking and checked with ``fstat``), and so is a file larger than `limit`, before reading it."""
    p = Path(p)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise ConfigError(f"{name} {str(p)!r} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{name} {str(p)!r} is a directory, expected {expected}") from None
    except OSError as e:
        raise ConfigError(f"{name} {str(p)!r} could not be read: {e.strerror or type(e).__name__}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{name} {str(p)!r} is a directory, expected {expected}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{name} {str(p)!r} is not a regular file (a device, FIFO or socket), expected {expected}")
        if st.st_size > limit:
            raise ConfigError(f"{name} {str(p)!r} is {_size(st.st_size)}, more than the limit of {_size(limit)}")
        chunks, total = [], 0
        while True:
            b = os.read(fd, min(1 << 24, limit + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > limit:
                raise ConfigError(f"{name} {str(p)!r} grew beyond the limit of {_size(limit)} while being read")
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{name} {str(p)!r} could not be read: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)


def load_npy(where: str, p: Path) -> tuple[np.ndarray, str]:
    """A real, finite .npy array (never unpickled, sized from its header before reading) and the SHA-256 of the
    file; one-line errors."""
    from ..weights import WeightsError, read_npy

    data = read_bytes(f"{where} file", p)
    what = f"{where} file {str(p)!r}"
    if data[:2] == b"PK":
        raise ConfigError(f"{what} is an .npz archive; expected a .npy array (numpy.save)")
    try:
        a = read_npy(data, what)
    except WeightsError as e:
        raise ConfigError(str(e)) from None
    return real_array(what, a), hashlib.sha256(data).hexdigest()
