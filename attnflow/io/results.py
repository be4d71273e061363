"""Run directories: a JSON manifest plus one Parquet table per finished chunk, so runs stream and resume.

Layout::

    DIR/manifest.json        config, versions, seed, chunk size, samples (written first)
    DIR/chunks/00000.parquet one row per sample of chunk 0 (written atomically when the chunk is done)
    ...

A killed run loses at most the chunk in flight; ``resume`` skips the chunks already on disk. Because chunk
keys are ``fold_in(key, chunk_index)``, a resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class RunDirError(ValueError):
    """The run directory cannot be used as asked (e.g. resuming a run with different settings)."""


def versions() -> dict:
    """Versions of attnflow, JAX, NumPy, Python, the platform and the devices, for manifests."""
    import jax

    from .. import __version__

    return {"attnflow": __version__, "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}


class RunDir:
    """A run directory for chunked studies."""

    def __init__(self, path, manifest: dict, *, resume: bool = False):
        self.path = Path(path)
        self.chunks = self.path / "chunks"
        mpath = self.path / "manifest.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if not resume:
                raise RunDirError(f"{self.path} already holds a run; pass resume (--resume) to continue it, or use a new directory")
            for k in manifest.get("identity", {}):
                if old.get("identity", {}).get(k) != manifest["identity"][k]:
                    raise RunDirError(f"cannot resume {self.path}: {k} was {old.get('identity', {}).get(k)!r}, now {manifest['identity'][k]!r}")
        else:
            self.chunks.mkdir(parents=True, exist_ok=True)
            manifest = {**manifest, "versions": versions()}
            tmp = mpath.with_suffix(".tmp")
            tmp.write_text(json.dumps(manifest, indent=2, default=str))
            os.replace(tmp, mpath)
        self.chunks.mkdir(parents=True, exist_ok=True)

    def chunk_path(self, i: int) -> Path:
        """Path of chunk i's Parquet table."""
        return self.chunks / f"{i:05d}.parquet"

    def done(self, i: int) -> bool:
        """Whether chunk i is finished (its table exists)."""
        return self.chunk_path(i).exists()

    def write_chunk(self, i: int, columns: dict[str, np.ndarray]) -> None:
        """Write chunk i's columns atomically (a temporary file, then a rename)."""
        table = pa.table({k: pa.array(np.asarray(v)) if np.asarray(v).ndim == 1 else pa.array(list(np.asarray(v))) for k, v in columns.items()})
        tmp = self.chunks / f".{i:05d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.chunk_path(i))  # atomic: a chunk file is complete or absent

    def read_chunk(self, i: int) -> dict[str, np.ndarray]:
        """Read chunk i's columns back as NumPy arrays."""
        t = pq.read_table(self.chunk_path(i))
        return {c: np.stack(t.column(c).to_numpy(zero_copy_only=False)) if pa.types.is_list(t.schema.field(c).type) else t.column(c).to_numpy()
                for c in t.column_names}

    def write_json(self, name: str, obj) -> Path:
        """Write an object as JSON into the run directory."""
        p = self.path / name
        p.write_text(json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
        return p
