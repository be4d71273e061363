"""The one JSON writer of attnflow: strict JSON (never ``NaN`` or ``Infinity``) for every command, result file and
manifest.

Results build plain dictionaries with their ``to_json`` methods; :func:`plain` turns what they hold (NumPy scalars
and arrays, tuples, paths, enumerations, records with ``to_json``) into JSON values, with every non-finite float
written as ``null``: a quantity that overflowed is unknown, and JSON has no number for it. :func:`dumps` then
serialises with ``allow_nan=False``, so a non-finite number that slipped through is an error, never a silent
``NaN`` in a file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def plain(obj):
    """``obj`` as JSON values: dicts (string keys), lists, str, int, finite float, bool or None; non-finite floats
    become None. Objects with a ``to_json()`` method are converted through it."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, complex):
        return [plain(obj.real), plain(obj.imag)]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return plain(obj.to_json())
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        a = np.asarray(obj)
        if a.dtype == object:
            return [plain(v) for v in a.tolist()]
        if np.iscomplexobj(a):
            return plain(np.stack([a.real, a.imag], axis=-1).tolist())
        return plain(a.tolist())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj`` (see :func:`plain`): no ``NaN`` or ``Infinity`` anywhere."""
    return json.dumps(plain(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)
