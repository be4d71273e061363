"""``python -m attnflow.io.config``: print the documented schema (every table, key, default and meaning)."""

from . import reference

print(reference())
