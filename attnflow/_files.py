"""Temporary file names shared by every atomic writer of attnflow (run directories, figures)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

TMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")
"""The names :func:`tmp_name` gives: what a lock holder may remove as stale, and what an interrupted process removes
of its own (``.NAME.PID.*.tmp``)."""


def tmp_name(p: Path) -> Path:
    """A temporary name next to ``p`` (``.NAME.PID.UUID12.tmp``), unique to this process and call (so two writers
    never share one), and recognisable as this process's after a kill."""
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
