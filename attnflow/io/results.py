"""Run directories: a JSON manifest plus one Parquet table per finished chunk, so runs stream and resume.

Layout::

    DIR/manifest.json        identity (config, input files by SHA-256, attnflow version, dtype, backend),
                             versions, seed, chunk size, samples (written first, atomically)
    DIR/.lock                held by the one process that writes DIR (a second one is refused)
    DIR/chunks/00000.parquet one row per sample of chunk 0 (written atomically when the chunk is done)
    ...

A killed run loses at most the chunk in flight; ``resume`` skips the chunks already on disk. Because chunk
keys are ``fold_in(key, chunk_index)``, a resumed run is identical to an uninterrupted one.

Guarantees: one writer per directory (a ``filelock`` lock; under ``jax.distributed`` process 0 holds it for
the job, whose processes write disjoint chunks); a resume with another identity (a changed config key or input
file, another attnflow version, dtype or backend) is refused in one line that names what changed; a damaged
or foreign chunk (unreadable, or stamped with another run's identity or index) is recomputed with a one-line
notice; a damaged manifest is refused with one line saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import uuid
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


IDENTITY_KEYS = ("config", "inputs", "dtype", "backend", "platform")  # top-level manifest entries that are part of the identity too


def _tmp(p: Path) -> Path:
    """A temporary name next to ``p``, unique to this process and call (so two writers never share one)."""
    return p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_bytes(p: Path, data: bytes) -> None:
    """Write a file completely or not at all (a unique temporary file, then a rename)."""
    tmp = _tmp(p)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(o):
    return json.loads(json.dumps(o, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _flatten(d, prefix="") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def describe_change(old: dict, new: dict) -> str | None:
    """The first difference between two identities, as a short phrase naming the key (None when equal)."""
    a, b = _flatten(old), _flatten(new)
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            parts = k.split(".")
            if parts[0] == "inputs" and len(parts) >= 2:  # input files are identified by their SHA-256 only
                def h(v):
                    return str(v)[:12] + "..." if isinstance(v, str) and len(v) == 64 else _short(v)
                return f"input file {parts[1]} changed (sha256 {h(a.get(k, '<absent>'))} -> {h(b.get(k, '<absent>'))})"
            if parts[0] == "config" and len(parts) >= 3:
                name = f"[{parts[1]}] {'.'.join(parts[2:])}"
            else:
                name = k
            return f"{name} was {_short(a.get(k, '<absent>'))}, now {_short(b.get(k, '<absent>'))}"
    return None


def _default_lock() -> bool:
    """Whether this process takes the directory lock: always, except the processes > 0 of a jax.distributed job."""
    if "jax" not in sys.modules:
        return True
    import jax

    try:
        return jax.process_count() == 1 or jax.process_index() == 0
    except Exception:  # noqa: BLE001 - no backend yet: a single process
        return True


def hold_lock(path):
    """Take the lock of run directory ``path`` for this process (reentrant within it); one-line RunDirError when
    another process holds it. The lock is released when the returned object is released or collected."""
    from filelock import FileLock, Timeout

    path = Path(path)
    lk = FileLock(str(path / ".lock"), timeout=0, is_singleton=True)
    try:
        lk.acquire()
    except Timeout:
        raise RunDirError(f"{path} is in use by another attnflow process (it holds {path / '.lock'}); "
                          "wait for it to finish, or use another --out") from None
    except OSError as e:
        raise RunDirError(f"cannot lock the run directory {path}: {e.strerror or e}") from None
    return lk


class RunDir:
    """A run directory for chunked studies: one writer (a file lock), identity by content, resume over damage.

    **Arguments:**

    - `path`: the directory (created if needed).
    - `manifest`: the manifest to write; its ``identity`` entry (plus ``inputs``, ``dtype`` and ``backend``, and the
      attnflow version) must match an existing run's to resume it.
    - `resume`: continue an existing run instead of refusing to touch it.
    - `lock`: take the directory's lock (default: yes, except in processes > 0 of a ``jax.distributed`` job, which
      join the directory process 0 holds and write disjoint chunks).
    """

    def __init__(self, path, manifest: dict, *, resume: bool = False, lock: bool | None = None):
        self.path = Path(path)
        self.chunks = self.path / "chunks"
        self._lock = None
        try:
            self.chunks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create the run directory {self.path}: {e.strerror or e}") from None
        if lock if lock is not None else _default_lock():
            self._acquire()
        try:
            self._open(manifest, resume)
        except BaseException:
            self.close()
            raise

    def _acquire(self):
        self._lock = hold_lock(self.path)

    def close(self) -> None:
        """Release the directory's lock (also done when the object is collected or the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _open(self, manifest: dict, resume: bool):
        from .. import __version__

        mpath = self.path / "manifest.json"
        ident = {**manifest.get("identity", {}), **{k: manifest[k] for k in IDENTITY_KEYS if k in manifest},
                 "attnflow": __version__}
        ident = _jsonable(ident)
        self.identity = ident
        self.identity_hash = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        if mpath.exists():
            if not resume:
                raise RunDirError(f"{self.path} already holds a run; pass resume (--resume) to continue it, or use a new directory")
            try:
                old = json.loads(mpath.read_text())
                old_ident = old["identity"]
                if not isinstance(old_ident, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise RunDirError(f"cannot resume {self.path}: its manifest.json is damaged; restore it, or move the directory "
                                  "aside and start the run again in a new --out") from None
            change = describe_change(old_ident, ident)
            if change is not None:
                raise RunDirError(f"cannot resume {self.path}: {change} (use a new --out for a different run)")
        else:
            if resume and any(self.chunks.glob("*.parquet")):
                raise RunDirError(f"cannot resume {self.path}: its manifest.json is missing; move the directory aside and "
                                  "start the run again in a new --out")
            manifest = {**manifest, "identity": ident, "identity_sha256": self.identity_hash, "versions": versions()}
            atomic_write_bytes(mpath, json.dumps(manifest, indent=2, default=str).encode())
        self.chunks.mkdir(parents=True, exist_ok=True)
        self._cache: dict[int, pa.Table] = {}

    def chunk_path(self, i: int) -> Path:
        """Path of chunk i's Parquet table."""
        return self.chunks / f"{i:05d}.parquet"

    def done(self, i: int) -> bool:
        """Whether chunk i is finished: its table exists, reads back, and is stamped with this run and index.

        A damaged or foreign chunk is removed with a one-line notice on stderr, so that it is recomputed
        (chunk i is deterministic)."""
        p = self.chunk_path(i)
        if not p.exists():
            return False
        try:
            t = pq.read_table(p)
            meta = t.schema.metadata or {}
            stamp = (meta.get(b"attnflow.identity", b"").decode(), meta.get(b"attnflow.chunk", b"").decode())
            if stamp != (self.identity_hash, str(i)):
                raise ValueError("it belongs to another run or chunk")
        except Exception as e:  # noqa: BLE001 - any unreadable table is recomputed
            print(f"attnflow: {p} is damaged ({_one_line(e)}); recomputing chunk {i}", file=sys.stderr, flush=True)
            p.unlink(missing_ok=True)
            return False
        self._cache[i] = t
        return True

    def write_chunk(self, i: int, columns: dict[str, np.ndarray]) -> None:
        """Write chunk i's columns atomically (a unique temporary file, then a rename), stamped with this run."""
        table = pa.table({k: pa.array(np.asarray(v)) if np.asarray(v).ndim == 1 else pa.array(list(np.asarray(v))) for k, v in columns.items()})
        table = table.replace_schema_metadata({"attnflow.identity": self.identity_hash, "attnflow.chunk": str(i)})
        tmp = _tmp(self.chunk_path(i))
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.chunk_path(i))  # atomic: a chunk file is complete or absent
        finally:
            tmp.unlink(missing_ok=True)

    def read_chunk(self, i: int) -> dict[str, np.ndarray]:
        """Read chunk i's columns back as NumPy arrays."""
        t = self._cache.pop(i, None)
        if t is None:
            t = pq.read_table(self.chunk_path(i))
        return {c: np.stack(t.column(c).to_numpy(zero_copy_only=False)) if pa.types.is_list(t.schema.field(c).type) else t.column(c).to_numpy()
                for c in t.column_names}

    def write_json(self, name: str, obj) -> Path:
        """Write an object as JSON into the run directory."""
        p = self.path / name
        atomic_write_bytes(p, json.dumps(obj, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode())
        return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


class RunDirWriter:
    """The run-directory writer a basin study streams its blocks through (see
    :class:`attnflow.analysis.basins.StudyWriter`): the directory is opened when the study knows its identity.

    **Arguments:** `path` (the directory), `resume` (continue an existing run), `manifest` (extra manifest entries,
    e.g. the config; merged with the study's identity).

    Under ``jax.distributed`` process 0 creates (or checks) the directory first and the other processes join it
    afterwards; an error in process 0 is raised in every process, so none waits forever.
    """

    def __init__(self, path, *, resume: bool = False, manifest: dict | None = None):
        self.path = Path(path)
        self.resume = resume
        self.manifest = dict(manifest or {})
        self.rd: RunDir | None = None

    def open(self, identity: dict, *, process_index: int = 0, process_count: int = 1, distributed: bool = False) -> None:
        """Create or check the directory for a study with this `identity`."""
        man = {**self.manifest, "identity": {**self.manifest.get("identity", {}), **identity}, "processes": process_count}
        if not distributed:
            self.rd = RunDir(self.path, man, resume=self.resume)
            return
        from jax.experimental import multihost_utils

        err = None
        if process_index == 0:
            try:
                self.rd = RunDir(self.path, man, resume=self.resume)
            except Exception as e:  # noqa: BLE001 - tell the other processes before raising
                err = e
        ok = np.asarray(multihost_utils.process_allgather(np.array([err is None], np.int32))).ravel()
        if err is not None:
            raise err
        if not ok.all():
            raise RunDirError(f"process 0 could not open the run directory {self.path} (see its error)")
        if process_index != 0:
            self.rd = RunDir(self.path, man, resume=True)

    def done(self, i: int) -> bool:
        """Whether block i is written."""
        return self.rd.done(i)

    def read_chunk(self, i: int) -> dict:
        """Block i's columns."""
        return self.rd.read_chunk(i)

    def write_chunk(self, i: int, columns: dict) -> None:
        """Write block i atomically."""
        self.rd.write_chunk(i, columns)

    def write_json(self, name: str, obj) -> Path:
        """Write the study's result (strict JSON: no NaN) into the directory."""
        p = self.path / name
        atomic_write_bytes(p, json.dumps(obj, indent=2, allow_nan=False,
                                         default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode())
        return p

    def close(self) -> None:
        """Release the directory's lock."""
        if self.rd is not None:
            self.rd.close()


def basin_fractions(*args, run_dir=None, resume: bool = False, manifest: dict | None = None, **kwargs):
    """:func:`attnflow.analysis.basins.basin_fractions` that streams its blocks to the run directory `run_dir`
    (a :class:`RunDirWriter`; ``resume=True`` continues a killed run). Without `run_dir` it is that function.
    This is ``attnflow.basin_fractions``."""
    from ..analysis import basins

    if run_dir is not None:
        if kwargs.get("writer") is not None:
            raise ValueError("pass run_dir= or writer=, not both")
        kwargs["writer"] = RunDirWriter(run_dir, resume=resume, manifest=manifest)
    return basins.basin_fractions(*args, manifest=manifest, **kwargs)
