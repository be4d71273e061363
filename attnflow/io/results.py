"""Run directories: a JSON manifest plus one Parquet table per finished chunk, so runs stream and resume.

Layout::

    DIR/.attnflow            which attnflow command wrote DIR ({"command": "basins"}; see claim_dir)
    DIR/manifest.json        identity (config, input files by SHA-256, attnflow version, dtype, backend),
                             versions, seed, chunk size, samples (written first, atomically)
    DIR/.lock                held by the one process that writes DIR (a second one is refused)
    DIR/chunks/00000.parquet one row per sample of chunk 0 (written atomically when the chunk is done)
    ...

A killed run loses at most the chunk in flight; ``resume`` skips the chunks already on disk. Because chunk
keys are ``fold_in(key, chunk_index)``, a resumed run is identical to an uninterrupted one.

**Chunk tables.** A chunk is a dict of NumPy columns of one length: 1-D numbers or booleans, 1-D strings (NumPy
``str`` arrays, or ``object`` arrays of ``str``), and 2-D numbers (one fixed-length list per row).
:meth:`RunDir.read_chunk` and :func:`read_members` give them back with the same dtypes and shapes (strings as
NumPy ``str`` arrays). Each table's schema metadata holds the run's identity hash, the chunk index, the column
list and a SHA-256 of the column data (names, dtypes, shapes and values, in name order), all checked on reading.
A basin study (:func:`attnflow.analysis.basins.basin_fractions`) writes, per sample: ``index`` (the sample index
i, int64), ``name`` (the attractor or outcome name, e.g. ``consensus +v1``), ``outcome`` (e.g. ``converged``),
``steps`` (steps taken), its label ``row`` and representative ``rep`` columns, ``final`` (the final state,
flattened to ``(n * d,)``, of the samples kept for figures, i < 2000; NaN for the others) and, when the writer is
created with ``initial=True``, ``initial`` (the initial state, flattened to ``(n * d,)``).

Guarantees: one writer per directory (a ``filelock`` lock; under ``jax.distributed`` process 0 holds it for
the job, whose processes write disjoint chunks); a resume with another identity (a changed config key or input
file, another attnflow version, dtype or backend) is refused in one line that names what changed. Reading has
no side effects: :meth:`RunDir.done` says whether a chunk is complete and valid, :meth:`RunDir.damaged` says in
one line why an existing chunk is not (unreadable, stamped with another run or index, a column missing, contents
that do not match their checksum), and the caller repairs it explicitly by recomputing it and writing it again
(:meth:`RunDir.write_chunk` replaces a file atomically). Temporary files a killed writer left behind are removed,
with a one-line notice, when the directory is next opened under its lock. A damaged manifest is refused with one
line saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import sys
import weakref
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from .._files import TMP_NAME, tmp_name


class RunDirError(ValueError):
    """The run directory cannot be used as asked (e.g. resuming a run with different settings)."""


def versions() -> dict:
    """Versions of attnflow, JAX, NumPy, Python, the platform and the devices, for manifests."""
    import jax

    from .. import __version__

    return {"attnflow": __version__, "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "devices": [str(d) for d in jax.devices()]}


IDENTITY_KEYS = ("config", "inputs", "dtype", "backend", "platform")  # top-level manifest entries that are part of the identity too


def _arrow():
    """pyarrow and pyarrow.parquet, imported when a chunk is read or written (``import attnflow`` does not)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


# ------------------------------------------------------------------------------------- atomic writes
_TMP = TMP_NAME  # the names _tmp gives
_LIVE: set[str] = set()  # temporary files this process is writing now (never removed as stale)


_tmp = tmp_name


def _write_atomic(p: Path, write) -> None:
    """Call ``write(tmp)`` on a unique temporary name next to ``p``, then rename it to ``p``: complete or absent."""
    tmp = _tmp(p)
    _LIVE.add(str(tmp))
    try:
        write(tmp)
        try:
            os.replace(tmp, p)
        except OSError as e:  # e.g. a directory where the file goes: name the file, not the temporary one
            raise OSError(e.errno, e.strerror, str(p)) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        finally:
            _LIVE.discard(str(tmp))


def atomic_write_bytes(p: Path, data: bytes) -> None:
    """Write a file completely or not at all (a unique temporary file, then a rename)."""
    _write_atomic(Path(p), lambda t: t.write_bytes(data))


def remove_stale_temporaries(path) -> int:
    """Remove the temporary files (``.NAME.PID.UUID.tmp``) that a killed writer left in run directory ``path`` and
    its ``chunks/``, saying so in one line on stderr; returns how many. Only the holder of the directory's lock
    may call this (files this process is writing now are kept)."""
    path = Path(path)
    removed: list[tuple[Path, int]] = []
    for d in (path, path / "chunks"):
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        n = 0
        for e in entries:
            if not _TMP.match(e.name) or str(d / e.name) in _LIVE:
                continue
            try:
                if not e.is_file(follow_symlinks=False):
                    continue
                os.unlink(d / e.name)
                n += 1
            except FileNotFoundError:
                continue
            except OSError:  # not ours to remove (permissions): leave it
                continue
        if n:
            removed.append((d, n))
    total = sum(n for _, n in removed)
    if total:
        where = " and ".join(str(d) for d, _ in removed)
        print(f"attnflow: removed {total} stale temporary file{'s' if total != 1 else ''} from {where}",
              file=sys.stderr, flush=True)
    return total


# ------------------------------------------------------------------------------------- identities
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


def _speed_free(ident: dict) -> dict:
    """`ident` without the config keys that change speed only (:data:`attnflow.io.config.schema.SPEED_ONLY`): a run
    recorded them in its identity before they were known to be speed only, and resumes with other values."""
    from .config.schema import SPEED_ONLY

    config = ident.get("config")
    if not isinstance(config, dict):
        return ident
    config = {t: ({k: v for k, v in tab.items() if (t, k) not in SPEED_ONLY} if isinstance(tab, dict) else tab)
              for t, tab in config.items()}
    return {**ident, "config": config}


def _identity_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _chunk_count(ident: dict) -> int | None:
    """The number of chunks of a basin study's run (ceil(samples / chunk_size) of its identity), or None when the
    identity does not say (a run directory of another kind)."""
    try:
        n, c = int(ident["samples"]), int(ident["chunk_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return -(-n // c) if n > 0 and c > 0 else None


def _manifest_identity(path: Path, what: str) -> dict:
    """The identity recorded in ``path/manifest.json``; one-line RunDirError when it is missing or damaged."""
    mpath = path / "manifest.json"
    if not mpath.exists():
        raise RunDirError(f"cannot {what} {path}: its manifest.json is missing; move the directory aside and "
                          "start the run again in a new --out")
    try:
        ident = json.loads(mpath.read_text())["identity"]
        if not isinstance(ident, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise RunDirError(f"cannot {what} {path}: its manifest.json is damaged; restore it, or move the directory "
                          "aside and start the run again in a new --out") from None
    return ident


# ------------------------------------------------------------------------------------- the lock
def _default_lock() -> bool:
    """Whether this process takes the directory lock: always, except the processes > 0 of a jax.distributed job."""
    if "jax" not in sys.modules:
        return True
    import jax

    try:
        return jax.process_count() == 1 or jax.process_index() == 0
    except RuntimeError:  # no backend can start yet: a single process
        return True


class DirLock:
    """This process's hold on the lock of a run directory (from :func:`hold_lock`), released once: by
    :meth:`release`, on leaving a ``with`` block, when the object is collected, or when the process ends."""

    def __init__(self, path: Path, lock):
        self.path = Path(path)
        self._release = weakref.finalize(self, lock.release)  # runs at most once; no __del__ needed

    @property
    def held(self) -> bool:
        """Whether this hold is still in force."""
        return self._release.alive

    def release(self) -> None:
        """Release this hold (idempotent). The lock is free once every hold of this process is released."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def hold_lock(path) -> DirLock:
    """Take the lock of run directory ``path`` for this process (reentrant within it); one-line RunDirError when
    another process holds it. The lock is held until the returned :class:`DirLock` is released or collected."""
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
    return DirLock(path, lk)


def _mkdir(p: Path) -> None:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {p.parent if p.name == 'chunks' else p}: "
                          f"{e.strerror or e}") from None


# ------------------------------------------------------------------------------------- chunk tables
_FORMAT = "1"


def _columns(columns: dict) -> dict[str, np.ndarray]:
    """The columns as NumPy arrays in their stored form: 1-D numbers/booleans, 1-D ``str``, 2-D numbers; all of
    one length. TypeError or ValueError for anything else."""
    out: dict[str, np.ndarray] = {}
    rows = None
    for name, v in columns.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"column names must be non-empty strings, got {name!r}")
        a = np.asarray(v)
        if a.dtype.kind == "O":
            items = a.ravel().tolist()
            bad = next((x for x in items if not isinstance(x, str)), None)
            if items and bad is not None:
                raise TypeError(f"column {name!r}: an object column must hold only str, found {type(bad).__name__}")
            a = np.array(items, dtype=str).reshape(a.shape) if items else np.zeros(a.shape, dtype="<U1")
        if a.dtype.kind == "U":
            if a.ndim != 1:
                raise ValueError(f"column {name!r}: a string column must be 1-D, got shape {a.shape}")
        elif a.dtype.kind in "biuf":
            if a.ndim not in (1, 2):
                raise ValueError(f"column {name!r}: a numeric column must be 1-D or 2-D, got shape {a.shape}")
            if a.ndim == 2 and a.shape[1] == 0:
                raise ValueError(f"column {name!r}: a 2-D column needs at least one value per row")
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
        else:
            raise TypeError(f"column {name!r}: dtype {a.dtype} cannot be stored (numbers, booleans or str)")
        if rows is None:
            rows = len(a)
        elif len(a) != rows:
            raise ValueError(f"column {name!r} has {len(a)} rows, the others {rows}")
        out[name] = a
    return out


def _dtype_name(a: np.ndarray) -> str:
    return "str" if a.dtype.kind == "U" else a.dtype.newbyteorder("<").str


def _column_list(cols: dict[str, np.ndarray]) -> list:
    """[name, dtype, shape without the row count] per column, in name order (stored in the table's metadata)."""
    return [[k, _dtype_name(cols[k]), list(cols[k].shape[1:])] for k in sorted(cols)]


def chunk_digest(columns: dict) -> str:
    """SHA-256 (hex) of chunk columns: for each column in name order, its name, dtype, shape and values (strings
    as length-prefixed UTF-8, numbers as little-endian bytes). Independent of how the table is stored."""
    cols = _columns(columns)
    h = hashlib.sha256(b"attnflow chunk v1\0")
    for k in sorted(cols):
        a = cols[k]
        h.update(json.dumps([k, _dtype_name(a), list(a.shape)]).encode() + b"\0")
        if a.dtype.kind == "U":
            for s in a.tolist():
                b = s.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        else:
            h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def _table(cols: dict[str, np.ndarray], meta: dict):
    pa, _ = _arrow()
    arrays = {}
    for k, a in cols.items():
        if a.ndim == 1:
            arrays[k] = _to_arrow(a)
        else:
            arrays[k] = pa.FixedSizeListArray.from_arrays(_to_arrow(np.ascontiguousarray(a).reshape(-1)), a.shape[1])
    return pa.Table.from_arrays(list(arrays.values()), names=list(arrays)).replace_schema_metadata(meta)


def _to_arrow(a: np.ndarray):
    """A 1-d NumPy column as an Arrow array (string, bool, integer or float), built from its buffers: ``pa.array``
    and ``to_numpy`` import pandas, 0.2 s of a new process's first chunk."""
    pa, _ = _arrow()
    if a.dtype.kind == "U":
        data = [s.encode("utf-8") for s in a.tolist()]
        off = np.zeros(len(data) + 1, np.int64)
        np.cumsum([len(b) for b in data], out=off[1:])
        if off[-1] >= 2**31:
            raise ValueError("a string column of more than 2 GiB in one chunk")
        return pa.Array.from_buffers(pa.string(), len(data), [None, pa.py_buffer(off.astype(np.int32)), pa.py_buffer(b"".join(data))])
    if a.dtype.kind == "b":
        return pa.Array.from_buffers(pa.bool_(), len(a), [None, pa.py_buffer(np.packbits(a, bitorder="little"))])
    if a.dtype.kind not in "iuf":
        raise TypeError(f"a column of dtype {a.dtype} cannot be stored")
    a = np.ascontiguousarray(a, a.dtype.newbyteorder("="))
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(a)])


def _from_arrow(col) -> np.ndarray:
    """An Arrow array (no missing values) of a type :func:`_to_arrow` writes, as NumPy, read from its buffers."""
    pa, _ = _arrow()
    t, n, o = col.type, len(col), col.offset
    bufs = col.buffers()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        off = np.frombuffer(bufs[1], np.int64 if pa.types.is_large_string(t) else np.int32)[o : o + n + 1] if n else []
        data = b"" if bufs[2] is None else bufs[2].to_pybytes()
        items = [data[off[i] : off[i + 1]].decode("utf-8") for i in range(n)]
        return np.array(items, dtype=str) if items else np.zeros(0, dtype="<U1")
    if pa.types.is_boolean(t):
        dt = np.dtype(bool)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
        dt = np.dtype(f"<{kind}{t.bit_width // 8}")
    else:
        raise ValueError(f"type {t}, which attnflow does not write")
    if n == 0:
        return np.zeros(0, dt)
    if bufs[1] is None:
        raise ValueError(f"an array of type {t} without data")
    if dt.kind == "b":
        return np.unpackbits(np.frombuffer(bufs[1], np.uint8), bitorder="little")[o : o + n].astype(bool)
    return np.frombuffer(bufs[1], dt)[o : o + n].copy()


def _decode(table) -> dict[str, np.ndarray]:
    """A table's columns as NumPy arrays (ValueError for a type attnflow does not write, or missing values)."""
    pa, _ = _arrow()
    out = {}
    for k in table.column_names:
        col = table.column(k).combine_chunks()
        if col.null_count:
            raise ValueError(f"column {k!r} has missing values")
        t = col.type
        flat = col.flatten() if pa.types.is_fixed_size_list(t) else col
        if flat.null_count:
            raise ValueError(f"column {k!r} has missing values")
        try:
            out[k] = _from_arrow(flat) if flat is col else _from_arrow(flat).reshape(len(col), t.list_size)
        except ValueError as e:
            raise ValueError(f"column {k!r}: {e}") from None
    return out


def _write_table(table, p: Path) -> None:
    """Write a Parquet table to ``p`` through a native file (a path given to pyarrow as such may be read as a URI,
    e.g. ``run:1/...``)."""
    pa, pq = _arrow()
    with pa.OSFile(os.fspath(p), "wb") as f:
        pq.write_table(table, f)


def _load(p: Path, identity_hash: str, i: int) -> tuple[dict | None, str | None]:
    """(columns, None) for a valid chunk ``i`` of the run ``identity_hash`` at ``p``; (None, reason) otherwise.
    Reads only; never raises for a damaged file."""
    pa, pq = _arrow()
    try:
        # a native file, as in _write_table; (pq.read_table imports pandas)
        with pa.OSFile(os.fspath(p), "rb") as src, pq.ParquetFile(src) as f:
            table = f.read()
    except (OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError, pa.ArrowException) as e:
        return None, f"unreadable: {_one_line(e)}"
    meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
    if meta.get("attnflow.identity") != identity_hash:
        return None, "it belongs to another run"
    stamp = meta.get("attnflow.chunk")
    if stamp != str(i):
        return None, f"it is stamped as chunk {stamp if stamp and len(stamp) <= 20 else '?'}, not {i}"
    if "attnflow.sha256" not in meta or "attnflow.columns" not in meta:
        return None, "it has no checksum (written by an older attnflow)"
    try:
        want = json.loads(meta["attnflow.columns"])
        want = {str(c[0]): (str(c[1]), [int(x) for x in c[2]]) for c in want}
    except (ValueError, TypeError, KeyError, IndexError):
        return None, "its column list is damaged"
    have = set(table.column_names)
    missing = sorted(set(want) - have)
    if missing:
        return None, f"column {missing[0]!r} is missing"
    extra = sorted(have - set(want))
    if extra:
        return None, f"it has an unexpected column {extra[0]!r}"
    try:
        cols = _decode(table)
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException) as e:
        return None, _one_line(e)
    for k, (dt, shape) in want.items():
        if _dtype_name(cols[k]) != dt or list(cols[k].shape[1:]) != shape:
            return None, f"column {k!r} is {_dtype_name(cols[k])} {list(cols[k].shape[1:])}, written as {dt} {shape}"
    if chunk_digest(cols) != meta["attnflow.sha256"]:
        return None, "its contents do not match their SHA-256 checksum"
    return cols, None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


_CHUNK = re.compile(r"^(\d{5}|[1-9]\d{5,})\.parquet$")
"""Chunk file names as :meth:`RunDir.chunk_path` writes them (``{i:05d}.parquet``), and no other spelling of the
same index (``3.parquet``, ``000003.parquet``: a copy would be read as that chunk a second time)."""


# ------------------------------------------------------------------------------------- the run directory
class RunDir:
    """A run directory for chunked studies: one writer (a file lock), identity by content, verified chunks.

    Use it as a context manager (``with RunDir(path, manifest) as rd:``): its lock is released on exit, by
    :meth:`close` (idempotent), or when the object is collected.

    **Arguments:**

    - `path`: the directory (created if needed).
    - `manifest`: the manifest to write; its ``identity`` entry (plus ``inputs``, ``dtype`` and ``backend``, and the
      attnflow version) must match an existing run's to resume it.
    - `resume`: continue an existing run instead of refusing to touch it.
    - `lock`: take the directory's lock (default: yes, except in processes > 0 of a ``jax.distributed`` job, which
      join the directory process 0 holds and write disjoint chunks), or a :class:`DirLock` already held (which
      stays its owner's to release). With the lock held, stale temporary files are removed when the directory is
      opened.
    """

    def __init__(self, path, manifest: dict, *, resume: bool = False, lock: bool | DirLock | None = None):
        self.path = Path(path)
        self.chunks = self.path / "chunks"
        self._own: DirLock | None = None  # the hold this object took (released by close)
        self._closed = False
        self._cache: tuple | None = None  # (index, file signature, columns) of the last chunk verified
        _mkdir(self.chunks)
        if isinstance(lock, DirLock):
            if not lock.held:
                raise RunDirError(f"the lock of {self.path} was already released")
            held = True
        elif lock if lock is not None else _default_lock():
            self._own = hold_lock(self.path)
            held = True
        else:
            held = False
        try:
            self._open(manifest, resume)
            if held:
                remove_stale_temporaries(self.path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's lock, if this object took it (idempotent; also done when it is collected)."""
        self._closed = True
        self._cache = None
        if self._own is not None:
            self._own.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (a closed run directory writes nothing)."""
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _open(self, manifest: dict, resume: bool):
        from .. import __version__

        mpath = self.path / "manifest.json"
        ident = {**manifest.get("identity", {}), **{k: manifest[k] for k in IDENTITY_KEYS if k in manifest},
                 "attnflow": __version__}
        ident = _jsonable(ident)
        self.identity = ident
        self.identity_hash = _identity_hash(ident)
        if mpath.exists():
            if not resume:
                raise RunDirError(f"{self.path} already holds a run; pass resume (--resume) to continue it, or use a new directory")
            old = _manifest_identity(self.path, "resume")
            change = describe_change(_speed_free(old), _speed_free(ident))
            if change is not None:
                raise RunDirError(f"cannot resume {self.path}: {change} (use a new --out for a different run)")
            # the run keeps the identity it was started with (its chunks are stamped with it), whatever the settings
            # of speed only it recorded
            self.identity, self.identity_hash = old, _identity_hash(old)
            count = _chunk_count(old)
            if count is not None:  # a file past the run's last chunk is none of its chunks, and nothing would replace it
                for p in self.chunks.iterdir():
                    if (m := _CHUNK.match(p.name)) and int(m.group(1)) >= count:
                        try:
                            p.unlink()
                        except FileNotFoundError:
                            pass
        else:
            if resume and any(_CHUNK.match(p.name) for p in self.chunks.iterdir()):
                raise RunDirError(f"cannot resume {self.path}: its manifest.json is missing; move the directory aside and "
                                  "start the run again in a new --out")
            manifest = {**manifest, "identity": ident, "identity_sha256": self.identity_hash, "versions": versions()}
            atomic_write_bytes(mpath, json.dumps(manifest, indent=2, default=str).encode())

    def _writable(self) -> None:
        if self._closed:
            raise RunDirError(f"the run directory {self.path} was closed; open it again to write")

    def chunk_path(self, i: int) -> Path:
        """Path of chunk i's Parquet table."""
        return self.chunks / f"{i:05d}.parquet"

    def _check(self, i: int) -> tuple[dict | None, str | None]:
        """(columns, None) for a valid chunk i, (None, reason) for a damaged one, (None, None) when absent."""
        p = self.chunk_path(i)
        try:
            st = p.stat()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"cannot be read ({e.strerror or e})"
        if not stat.S_ISREG(st.st_mode):
            return None, "it is not a regular file"
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[:2] == (i, sig):
            return self._cache[2], None
        cols, reason = _load(p, self.identity_hash, i)
        if cols is not None:
            self._cache = (i, sig, cols)  # read_chunk(i) right after done(i) does not read the file twice
        return cols, reason

    def done(self, i: int) -> bool:
        """Whether chunk i is finished: its table exists, reads back, is stamped with this run and index, holds
        every column it was written with, and matches its checksum. Reads only (see :meth:`damaged`)."""
        return self._check(i)[0] is not None

    def damaged(self, i: int) -> str | None:
        """Why chunk i's file is not a valid chunk of this run, in one line; None when it is valid or absent.
        Reads only: the caller repairs a damaged chunk by recomputing it and calling :meth:`write_chunk`."""
        return self._check(i)[1]

    def write_chunk(self, i: int, columns: dict) -> None:
        """Write chunk i's columns atomically (a unique temporary file, then a rename; an existing file is
        replaced), stamped with this run, the index, the column list and the SHA-256 of the data."""
        self._writable()
        cols = _columns(columns)
        meta = {"attnflow.format": _FORMAT, "attnflow.identity": self.identity_hash, "attnflow.chunk": str(i),
                "attnflow.columns": json.dumps(_column_list(cols)), "attnflow.sha256": chunk_digest(cols)}
        table = _table(cols, meta)
        if self._cache is not None and self._cache[0] == i:
            self._cache = None
        _write_atomic(self.chunk_path(i), lambda t: _write_table(table, t))

    def read_chunk(self, i: int) -> dict[str, np.ndarray]:
        """Chunk i's columns as NumPy arrays, verified as by :meth:`done` (strings as ``str`` arrays, 2-D columns
        as 2-D arrays, dtypes as written). One-line RunDirError when the chunk is absent or damaged."""
        cols, reason = self._check(i)
        if self._cache is not None and self._cache[0] == i:
            self._cache = None
        if reason is not None:
            raise RunDirError(f"{self.chunk_path(i)} is damaged ({reason}); recompute chunk {i} (resume the run)")
        if cols is None:
            raise RunDirError(f"chunk {i} of {self.path} is not written")
        return cols

    def write_json(self, name: str, obj) -> Path:
        """Write an object as strict JSON (non-finite numbers as null) into the run directory, atomically."""
        from .._json import dumps

        self._writable()
        p = self.path / name
        atomic_write_bytes(p, dumps(obj, indent=2).encode())
        return p


def read_members(path) -> dict[str, np.ndarray]:
    """Every finished chunk of run directory `path`, concatenated into one per-sample table and sorted by the
    ``index`` column (columns, dtypes and shapes as stored; see the module docstring for the columns a basin study
    writes). Each chunk is verified as by :meth:`RunDir.done`; reads only, without the lock. An empty dict when no
    chunk is written yet; a one-line RunDirError for a missing or damaged manifest, a damaged chunk (resume the run
    to recompute it) or chunks with different columns."""
    path = Path(path)
    ident = _manifest_identity(path, "read")
    h, count = _identity_hash(ident), _chunk_count(ident)
    try:
        files = sorted((int(m.group(1)), path / "chunks" / e) for e in os.listdir(path / "chunks") if (m := _CHUNK.match(e)))
    except FileNotFoundError:
        files = []
    except OSError as e:
        raise RunDirError(f"cannot read {path / 'chunks'}: {e.strerror or e}") from None
    parts = []
    for i, p in files:
        if count is not None and i >= count:
            raise RunDirError(f"{p} is no chunk of this run, which has {count} (0 to {count - 1}); remove it, or resume "
                              "the run (--resume), which removes it")
        cols, reason = _load(p, h, i)
        if cols is None:
            raise RunDirError(f"{p} is damaged ({reason}); resume the run (--resume) to recompute chunk {i}")
        if parts and set(cols) != set(parts[0][1]):
            diff = sorted(set(cols) ^ set(parts[0][1]))[0]
            raise RunDirError(f"chunks {parts[0][0]} and {i} of {path} hold different columns (e.g. {diff!r})")
        parts.append((i, cols))
    if not parts:
        return {}
    out = {k: np.concatenate([c[k] for _, c in parts]) for k in parts[0][1]}
    if "index" in out:
        order = np.argsort(out["index"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------- the study's writer
class RunDirWriter:
    """The run-directory writer a basin study streams its blocks through (see
    :class:`attnflow.analysis.basins.StudyWriter`): the directory's lock is taken now (so a second writer is
    refused before any work) and the directory is opened when the study knows its identity (:meth:`open`).
    Use it as a context manager (``with RunDirWriter(path, resume=..., manifest=...) as w:``); the lock is
    released on exit, by :meth:`close` (idempotent), or when the object is collected.

    **Arguments:** `path` (the directory), `resume` (continue an existing run), `manifest` (extra manifest entries,
    e.g. the config; merged with the study's identity), `initial` (store each sample's initial state, the
    ``initial`` column; when False, an ``initial`` column given to :meth:`write_chunk` is dropped. Part of the
    identity when True, so one run's chunks all hold the same columns), `lock` (take the directory's lock; default:
    yes, except in processes > 0 of a ``jax.distributed`` job).

    Under ``jax.distributed`` process 0 creates (or checks) the directory first and the other processes join it
    afterwards; an error in process 0 is raised in every process, so none waits forever.
    """

    def __init__(self, path, *, resume: bool = False, manifest: dict | None = None, initial: bool = False,
                 lock: bool | None = None):
        self.path = Path(path)
        self.resume = resume
        self.manifest = dict(manifest or {})
        self.initial = bool(initial)
        self.rd: RunDir | None = None
        self._closed = False
        self._lock: DirLock | None = None
        if lock if lock is not None else _default_lock():
            _mkdir(self.path)
            self._lock = hold_lock(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self, identity: dict, *, process_index: int = 0, process_count: int = 1, distributed: bool = False) -> None:
        """Create or check the directory for a study with this `identity`."""
        if self._closed:
            raise RunDirError(f"the run-directory writer of {self.path} was closed")
        if self.rd is not None:
            self.rd.close()
            self.rd = None
        ident = {**self.manifest.get("identity", {}), **identity}
        if self.initial:
            ident["initial"] = True
        man = {**self.manifest, "identity": ident, "processes": process_count}
        lock = self._lock if self._lock is not None else False
        if not distributed:
            self.rd = RunDir(self.path, man, resume=self.resume, lock=lock)
            return
        from jax.experimental import multihost_utils

        err = None
        if process_index == 0:
            try:
                self.rd = RunDir(self.path, man, resume=self.resume, lock=lock)
            except Exception as e:  # noqa: BLE001 - tell the other processes before raising
                err = e
        ok = np.asarray(multihost_utils.process_allgather(np.array([err is None], np.int32))).ravel()
        if err is not None:
            raise err
        if not ok.all():
            raise RunDirError(f"process 0 could not open the run directory {self.path} (see its error)")
        if process_index != 0:
            self.rd = RunDir(self.path, man, resume=True, lock=lock)

    def _dir(self) -> RunDir:
        if self.rd is None:
            raise RunDirError(f"the run directory {self.path} is not open ({'closed' if self._closed else 'call open first'})")
        return self.rd

    def chunk_path(self, i: int) -> Path:
        """Path of block i's Parquet table."""
        return self.path / "chunks" / f"{i:05d}.parquet"

    def done(self, i: int) -> bool:
        """Whether block i is written, complete and valid (reads only; see :meth:`RunDir.done`)."""
        return self._dir().done(i)

    def damaged(self, i: int) -> str | None:
        """Why block i's file is not valid, in one line; None when valid or absent (see :meth:`RunDir.damaged`)."""
        return self._dir().damaged(i)

    def read_chunk(self, i: int) -> dict:
        """Block i's columns (verified; see :meth:`RunDir.read_chunk`)."""
        return self._dir().read_chunk(i)

    def write_chunk(self, i: int, columns: dict) -> None:
        """Write block i atomically (replacing a damaged file); its ``initial`` column only with ``initial=True``."""
        if not self.initial and "initial" in columns:
            columns = {k: v for k, v in columns.items() if k != "initial"}
        self._dir().write_chunk(i, columns)

    def write_json(self, name: str, obj) -> Path:
        """Write the study's result (strict JSON: no NaN) into the directory, atomically."""
        return self._dir().write_json(name, obj)

    def close(self) -> None:
        """Release the directory's lock (idempotent)."""
        self._closed = True
        if self.rd is not None:
            self.rd.close()
            self.rd = None
        if self._lock is not None:
            self._lock.release()


# ------------------------------------------------------------------------------------- output ownership
MARKER = ".attnflow"
"""The file (JSON, ``{"command": NAME}``) that says which attnflow command writes a directory."""

OUTPUTS = {
    "simulate": ("trajectories.npz", "cosines.png"),
    "basins": ("manifest.json", "result.json", "fractions.png", "chunks"),
    "stability": ("spectra.png",),
    "energy": ("energy.npz", "energy_entropy.png", "head_contributions.png", "clustering_time.png"),
    "transformer": ("pm.json", "pm.npz", "alignment.png", "alignment_steered.png", "eigenvalues.png", "cumulative.png",
                    "steering.png"),
    "demo": ("*_fractions.png", "*_paths.png"),
    "metastability": ("metastability.json", "first_plateau.csv", "episodes_n*.npz", "phase_*_beta.json",
                      "phase_*_beta.png", "first_counts_n*.png", "dwell_n*.png", "staircase_n*.png"),
    "geometry": ("geometry.json", "map_partial.npz", "basin_map.npz", "basin_map.png"),
}
"""Names (glob patterns) that only one command writes: they identify a directory written before markers existed."""


def clear_outputs(path, command: str, keep=()) -> list[str]:
    """Remove the files of `command` (:data:`OUTPUTS`) from directory `path`, but those named in `keep`: a run that
    starts afresh (other settings than the run there) leaves no result of the earlier run beside its own, even when
    it is interrupted. Returns the names removed."""
    path = Path(path)
    gone = []
    for f in sorted(path.iterdir()) if path.is_dir() else []:
        if f.name in keep or not f.is_file() or not any(fnmatch(f.name, pat) for pat in OUTPUTS.get(command, ())):
            continue
        f.unlink()
        gone.append(f.name)
    return gone


def _marker_command(path: Path) -> str | None:
    """The command named by the marker of `path` (None without one); one-line RunDirError for a damaged one."""
    m = path / MARKER
    try:
        text = m.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read {m}: {e.strerror or e}") from None
    try:
        cmd = json.loads(text)["command"]
        if not isinstance(cmd, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RunDirError(f"{m} is damaged (it says which attnflow command wrote {path}); restore or remove it, "
                          "or choose another --out") from None
    return cmd


def dir_owners(path) -> list[str]:
    """The attnflow commands whose output directory `path` holds, sorted: the one its marker names, and those
    whose own files (:data:`OUTPUTS`; a ``chunks/`` folder counts when it holds chunk tables) are in it. Empty for a
    directory without attnflow output. One-line RunDirError for a damaged marker."""
    path = Path(path)
    owners = set()
    cmd = _marker_command(path)
    if cmd is not None:
        owners.add(cmd)
    try:
        names = os.listdir(path)
    except OSError:
        names = []
    for c, pats in OUTPUTS.items():
        for n in names:
            if not any(fnmatch(n, pat) for pat in pats):
                continue
            if n == "chunks":
                try:
                    if not any(_CHUNK.match(e) for e in os.listdir(path / n)):
                        continue  # an empty chunks/ folder is no output
                except OSError:
                    continue
            owners.add(c)
            break
    return sorted(owners)


def claim_dir(path, command: str) -> Path:
    """Claim output directory `path` (existing, writable) for attnflow `command` before any work: refuse in one
    line (RunDirError) a directory that holds another command's output (its marker, or without one its files, or a
    basins run's chunks); otherwise write the marker (atomically, when absent). The same command may re-use its own
    directory (simulate overwrites its files; basins needs resume)."""
    path = Path(path)
    others = [c for c in dir_owners(path) if c != command]
    if others:
        raise RunDirError(f"--out {path} holds the output of 'attnflow {others[0]}'; choose another directory for "
                          f"'attnflow {command}' (each command writes its own)")
    if not (path / MARKER).exists():
        atomic_write_bytes(path / MARKER, (json.dumps({"command": command}) + "\n").encode())
    return path


def basin_fractions(
    dyn,
    key,
    samples: int,
    *,
    tokens: int | None = None,
    sampler=None,
    solver=None,
    budget=None,
    stop=None,
    execution=None,
    cluster_tol: float = 1e-3,
    ci_width: float | None = None,
    progress=False,
    run_dir=None,
    resume: bool = False,
):
    """Monte Carlo basin fractions, streamed to a run directory: this is ``attnflow.basin_fractions``.

    Every argument but the last two is that of :func:`attnflow.analysis.basins.basin_fractions` (the model, key,
    N; `tokens` or `sampler`; `solver`; the :class:`~attnflow.Budget`, :class:`~attnflow.Stop` and
    :class:`~attnflow.Execution` records; `cluster_tol`; `ci_width`; `progress`).

    - `run_dir`: a directory path (a :class:`RunDirWriter` is made for it, and closed, releasing its lock, when the
      study ends), or a writer of your own (e.g. ``RunDirWriter(path, initial=True)`` to keep every initial state),
      or None (nothing written).
    - `resume`: continue the run in `run_dir` (its finished blocks are read, not recomputed; the result equals an
      uninterrupted run's).

    **Returns:** a :class:`~attnflow.BasinResult`.
    """
    from ..analysis.basins import basin_fractions as study

    kw = dict(tokens=tokens, sampler=sampler, solver=solver, budget=budget, stop=stop, execution=execution,
              cluster_tol=cluster_tol, ci_width=ci_width, progress=progress)
    if run_dir is None:
        if resume:
            raise ValueError("resume=True needs run_dir= (the run directory to continue)")
        return study(dyn, key, samples, **kw)
    if isinstance(run_dir, (str, os.PathLike)):
        if str(run_dir) == "":
            raise ValueError("run_dir must be a directory path, got an empty string")
        with RunDirWriter(run_dir, resume=resume) as writer:
            return study(dyn, key, samples, run_dir=writer, **kw)
    if resume:
        raise ValueError("resume=True is for a run_dir path; a writer object carries its own resume setting")
    return study(dyn, key, samples, run_dir=run_dir, **kw)
