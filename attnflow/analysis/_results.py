"""Small helpers between integer result codes (stored in NumPy arrays) and ``eqx.Enumeration`` items.

Result arrays keep their integer codes (cheap to store, vmap and compare); an enumeration gives every code a
name and a message, like ``optimistix.RESULTS``. The code of an item is its position in the class body.
"""

from __future__ import annotations

import numpy as np


def names(enum) -> tuple[str, ...]:
    """The item names of an ``eqx.Enumeration`` in code order."""
    items = enum._name_to_item
    return tuple(sorted(items, key=lambda k: int(items[k]._value)))


def code(item) -> int:
    """The integer code of one enumeration item."""
    return int(np.asarray(item._value))


def name(enum, value) -> str:
    """The name of one code (int) or item."""
    v = value if isinstance(value, (int, np.integer)) else code(value)
    return names(enum)[int(v)]


def message(enum, value) -> str:
    """The message of one code (int) or item."""
    return enum[getattr(enum, name(enum, value))]


def name_array(enum, codes) -> np.ndarray:
    """An array of names (``dtype=object``) with the shape of `codes`."""
    table = np.array(names(enum), dtype=object)
    return table[np.asarray(codes, dtype=int)]


def item(enum, codes):
    """The enumeration item (batch-shaped, like a vmapped ``optimistix`` result) holding `codes`."""
    import equinox as eqx

    first = getattr(enum, names(enum)[0])
    return eqx.tree_at(lambda i: i._value, first, np.asarray(codes, dtype=np.int32))
