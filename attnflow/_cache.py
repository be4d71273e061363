"""attnflow's own disk cache, next to JAX's persistent compilation cache: what a new process would otherwise compute
again before a basin study's first step, although an earlier process computed exactly the same. For the sphere flow
of issue 21's benchmark (10^4 members, 2-core CPU) a new process with a filled cache started its study in 1.3 s; with
the certificates stored here 1.1 s, and with the pool program's export too (:class:`ExportedProgram`) 0.8 s.

An entry is keyed by what determines it:

- the environment (:func:`environment_key`): attnflow's source code, the versions of JAX, jaxlib and the libraries
  of :data:`KNOWN`, JAX's configuration, the ``JAX_``/``XLA_``/``PJRT_`` environment, the devices and the CPU;
- the arguments: arrays by content, everything else in a canonical form (:func:`canonical`), which only attnflow's
  own types (and those of :data:`KNOWN`), plain containers and plain values have. A model class, a function or an
  object of the user's own is not identified by its name alone, so nothing that contains one is cached here.

It is on exactly when JAX's persistent cache is (``jax_compilation_cache_dir`` set: the command line's default,
:func:`attnflow.cli.use_compile_cache`), in the subdirectory :data:`SUBDIR` of it. Entries hold JSON and NumPy
arrays (no pickles) behind a SHA-256 checksum: an entry that cannot be read or does not match is computed again, and
a cache that cannot be written is skipped. What is read back is bit for bit what was computed, so a study gives the
same result with the cache, without it, and from a filled one.

Compiled programs are left to JAX's own cache: what is stored here is a program's export (StableHLO, which JAX
compiles, or finds in its cache, as it would the traced program). Storing XLA's CPU executables themselves, which
would skip the lowering too, was tried and dropped: JAX 0.10's CPU executables loaded that way failed to run ("Function
wrapped_iota not found") or crashed unless other programs had been loaded into the process first.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import io
import json
import os
import platform
import threading
import types
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from ._files import tmp_name

SUBDIR = "attnflow-artifacts"
"""The subdirectory of JAX's cache directory that holds attnflow's entries."""

_MAGIC = b"attnflow-cache-1\n"

MAX_BYTES = 256 * 2**20
"""The most bytes :data:`SUBDIR` holds: a write that takes it over removes the entries used least recently (a read
marks an entry used) until it holds at most 3/4 of this. A study's entries take about 0.1 MB (the sphere flow of
issue 21's benchmark: 4 kB of certificates, 50 kB of program), so this keeps thousands of them."""


class NotCanonical(Exception):
    """An object without a canonical form (see :func:`canonical`)."""


def directory() -> Path | None:
    """This process's cache directory, or None when JAX's persistent cache is off."""
    base = jax.config.jax_compilation_cache_dir
    return Path(base) / SUBDIR if base else None


@functools.lru_cache(maxsize=1)
def _source_key() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
        return "\n".join(line for line in first.splitlines()
                         if line.split(":")[0].strip() in ("vendor_id", "model name", "flags", "cpu family", "model"))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


@functools.lru_cache(maxsize=1)
def _fixed_facts() -> tuple[str, ...]:
    import importlib.metadata

    import jaxlib

    versions = []
    for pkg in KNOWN[1:]:
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} absent")
    return (_source_key(), *versions, jax.__version__, jaxlib.__version__, _cpu())


def environment_key() -> str:
    """A SHA-256 of everything outside the arguments that a compiled program or a computed result depends on."""
    devs = jax.devices()
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "PJRT_", "TF_CPP")))
    facts = [*_fixed_facts(), repr(sorted(jax.config.values.items())), repr(env),
             repr([(d.platform, d.device_kind, d.id, d.process_index) for d in devs]), devs[0].client.platform_version]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()


KNOWN = ("attnflow", "diffrax", "equinox")
"""The packages whose classes and functions :func:`canonical` identifies by name: attnflow's source, and the versions
of the others, are part of :func:`environment_key`."""


def _ours(t) -> bool:
    return getattr(t, "__module__", "").split(".")[0] in KNOWN


def canonical(obj) -> str:
    """A string that determines `obj`, for the static objects of attnflow's programs: None, bools, numbers, strings,
    dtypes, attnflow's enums, tuples, lists and dicts of these, dataclasses and equinox modules of the classes of
    :data:`KNOWN` (field by field), their module-level functions and classes (by name), and pytree structures
    (``PyTreeDef``) built of these. Raises :class:`NotCanonical` for anything else (arrays included: they are data)."""
    out: list[str] = []
    _canon(obj, out)
    return "".join(out)


def _canon(x, out: list[str]) -> None:
    if x is None or isinstance(x, (bool, str, bytes)):
        out.append(repr(x))
    elif isinstance(x, np.generic):  # a NumPy scalar: its dtype counts (a Python number is weakly typed)
        out.append(f"np:{x.dtype.str}:{x.tobytes().hex()}")
    elif isinstance(x, int) and not isinstance(x, enum.Enum):
        out.append(f"i{int(x)}")
    elif isinstance(x, float):
        out.append(f"f{x.hex()}")
    elif isinstance(x, complex):
        out.append(f"c{x.real.hex()},{x.imag.hex()}")
    elif isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
        out.append(f"dtype:{np.dtype(x).str}")
    elif isinstance(x, enum.Enum) and _ours(type(x)):
        out.append(f"enum:{type(x).__module__}.{type(x).__qualname__}.{x.name}")
    elif type(x) in (tuple, list):
        out.append("(" if type(x) is tuple else "[")
        for v in x:
            _canon(v, out)
            out.append(",")
        out.append(")")
    elif type(x) is dict:
        out.append("{")
        for k in sorted(x, key=repr):
            _canon(k, out)
            out.append(":")
            _canon(x[k], out)
            out.append(",")
        out.append("}")
    elif isinstance(x, jax.tree_util.PyTreeDef):
        _canon_treedef(x, out)
    elif isinstance(x, type):
        if not _ours(x) or "<locals>" in x.__qualname__:
            raise NotCanonical(f"class {x.__module__}.{x.__qualname__}")
        out.append(f"class:{x.__module__}.{x.__qualname__}")
    elif isinstance(x, types.FunctionType):
        if not _ours(x) or "<" in x.__qualname__ or x.__closure__:
            raise NotCanonical(f"function {x.__module__}.{x.__qualname__}")
        out.append(f"fn:{x.__module__}.{x.__qualname__}")
    elif type(x).__name__ == "_Missing" and type(x).__module__.startswith("equinox"):
        out.append("MISSING")
    elif dataclasses.is_dataclass(x) and _ours(type(x)):  # equinox modules are dataclasses
        out.append(f"obj:{type(x).__module__}.{type(x).__qualname__}(")
        for f in dataclasses.fields(x):
            out.append(f"{f.name}=")
            _canon(getattr(x, f.name, None), out)
            out.append(",")
        out.append(")")
    else:
        raise NotCanonical(f"{type(x).__module__}.{type(x).__qualname__}")


def _canon_treedef(t, out: list[str]) -> None:
    data = t.node_data()
    if data is None:  # a leaf
        out.append("*")
        return
    kind, aux = data
    if kind not in (tuple, list, dict, type(None)) and not _ours(kind):
        raise NotCanonical(f"pytree node {kind.__module__}.{kind.__qualname__}")
    _canon(kind if _ours(kind) else kind.__name__, out)
    out.append("[")
    _canon(aux, out)
    out.append("](")
    for c in t.children():
        _canon_treedef(c, out)
        out.append(",")
    out.append(")")


def content_key(*parts) -> str:
    """A SHA-256 of `parts` with :func:`environment_key`: pytrees whose arrays count by content and whose other
    leaves and structure by :func:`canonical`. Raises :class:`NotCanonical` where a part has no canonical form."""
    h = hashlib.sha256(environment_key().encode())
    for p in parts:
        leaves, treedef = jax.tree.flatten(p)
        h.update(canonical(treedef).encode())
        for x in leaves:
            if isinstance(x, (jax.Array, np.ndarray)):
                a = np.asarray(x)
                h.update(f"array:{a.dtype.str}{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
            else:
                h.update(canonical(x).encode())
            h.update(b";")
    return h.hexdigest()


def read(kind: str, key: str) -> bytes | None:
    """The entry `key` of `kind`, or None (no cache, no entry, or a damaged one)."""
    base = directory()
    if base is None:
        return None
    try:
        blob = (base / kind / key).read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 64
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    body = blob[head:]
    if hashlib.sha256(body).hexdigest().encode() != blob[len(_MAGIC):head]:
        return None
    try:
        os.utime(base / kind / key)  # used now: the last to be removed (see MAX_BYTES)
    except OSError:
        pass
    return body


def write(kind: str, key: str, body: bytes) -> None:
    """Store `body` as the entry `key` of `kind` (atomically; nothing when the cache is off or cannot be written)."""
    base = directory()
    if base is None:
        return
    p = base / kind / key
    tmp = tmp_name(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_MAGIC + hashlib.sha256(body).hexdigest().encode() + body)
        os.replace(tmp, p)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return
    _bound(base, keep=p)


def _bound(base: Path, keep: Path) -> None:
    """Remove the entries of `base` used least recently until it holds at most 3/4 of :data:`MAX_BYTES`, when it
    holds more than that (never `keep`, the entry just written). Another process may remove the same files: a file
    already gone is skipped."""
    entries = []
    for p in base.glob("*/*"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(e[1] for e in entries)
    if total <= MAX_BYTES:
        return
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= MAX_BYTES * 3 // 4:
            break
        if p == keep:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        total -= size


def read_arrays(kind: str, key: str) -> tuple[dict, dict] | None:
    """``(meta, arrays)`` of an entry written by :func:`write_arrays`, or None."""
    body = read(kind, key)
    if body is None:
        return None
    try:
        n = int.from_bytes(body[:8], "little")
        meta = json.loads(body[8:8 + n])
        with np.load(io.BytesIO(body[8 + n:]), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return meta, arrays
    except (ValueError, OSError, KeyError):
        return None


def write_arrays(kind: str, key: str, meta: dict, arrays: dict) -> None:
    """Store JSON `meta` and NumPy `arrays` (no pickles) as the entry `key` of `kind`."""
    if directory() is None:
        return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    m = json.dumps(meta).encode()
    write(kind, key, len(m).to_bytes(8, "little") + m + buf.getvalue())



# ------------------------------------------------------------------------------------------ exported programs


class ExportedProgram:
    """``impl(*args)`` as a JAX-exported program (:mod:`jax.export`: StableHLO with its input shapes), one per static
    part and argument shapes (equinox's partition: arrays are the arguments, everything else static). Every process
    runs the exported program under ``jax.jit`` (compiled, and cached, by JAX's persistent cache); with this cache on,
    the export itself is stored too, so that a new process skips tracing and lowering ``impl``, which JAX's cache
    still needs before it can look a program up (for a study's pool: about 0.4 s). A program that cannot be exported
    is compiled as a plain ``jax.jit`` of ``impl``, in every process alike. `out_structure(*args)` gives the pytree
    structure of ``impl(*args)`` without tracing ``impl`` (checked against the traced one before an export is
    stored). The call is dispatched asynchronously, like a jitted one."""

    def __init__(self, impl, name: str, out_structure):
        self.impl, self.name, self.out_structure = impl, name, out_structure
        self._jit = jax.jit(self._flat, static_argnums=(1, 2, 3))
        self._memory: dict = {}
        self._locks: dict = {}
        self._lock = threading.Lock()
        self._traced = threading.local()

    def _flat(self, leaves, dyn_def, static_leaves, static_def):
        args = eqx.combine(jax.tree.unflatten(dyn_def, leaves), jax.tree.unflatten(static_def, static_leaves))
        out = self.impl(*args)
        out_leaves, self._traced.out_def = jax.tree.flatten(out)
        return out_leaves

    def __call__(self, *args):
        dynamic, static = eqx.partition(args, eqx.is_array)
        leaves, dyn_def = jax.tree.flatten(dynamic)
        static_leaves, static_def = jax.tree.flatten(static)
        static_leaves = tuple(static_leaves)  # hashable, for the key and as jit's static argument
        leaves = [x if isinstance(x, jax.Array) else jax.numpy.asarray(x) for x in leaves]
        avals = tuple(jax.typeof(x) for x in leaves)
        plat = next(iter(leaves[0].devices())).platform if leaves else jax.default_backend()
        key = (dyn_def, static_leaves, static_def, avals, plat)
        entry = self._memory.get(key)
        if entry is None:
            with self._lock:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:
                entry = self._memory.get(key)
                if entry is None:
                    entry = self._memory[key] = self._build(args, leaves, dyn_def, static_leaves, static_def, avals,
                                                            plat)
        call, out_def = entry
        if call is None:  # not exportable: the plain program
            return jax.tree.unflatten(out_def, self._jit(leaves, dyn_def, static_leaves, static_def))
        return jax.tree.unflatten(out_def, call(leaves))

    def _disk_key(self, dyn_def, static_leaves, static_def, avals, plat) -> str | None:
        if directory() is None:
            return None
        try:
            parts = [environment_key(), self.name, plat, canonical(dyn_def), canonical(static_def),
                     canonical(static_leaves), repr([(a.shape, np.dtype(a.dtype).str, a.weak_type) for a in avals])]
        except NotCanonical:
            return None
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _build(self, args, leaves, dyn_def, static_leaves, static_def, avals, plat):
        from jax import export

        disk = self._disk_key(dyn_def, static_leaves, static_def, avals, plat)
        if disk is not None:
            body = read("programs", disk)
            if body is not None:
                try:
                    exported = export.deserialize(bytearray(body))
                    out_def = self.out_structure(*args)
                    if (tuple(exported.in_avals) == avals and out_def.num_leaves == len(exported.out_avals)
                            and tuple(exported.platforms) == (plat,)):
                        return jax.jit(exported.call), out_def
                except Exception:  # noqa: BLE001 - damaged, or another JAX's: export again
                    pass
        self._traced.out_def = None
        try:
            exported = export.export(self._jit, platforms=(plat,))(leaves, dyn_def, static_leaves, static_def)
        except Exception:  # noqa: BLE001 - e.g. a custom call export does not take: the plain program
            exported = None
        out_def = self._traced.out_def
        if out_def is None:  # JAX reused an earlier trace
            out_def = jax.tree.structure(jax.eval_shape(lambda: self.impl(*args)))
        if exported is None:
            return None, out_def
        if disk is not None:
            try:
                if self.out_structure(*args) == out_def:
                    write("programs", disk, bytes(exported.serialize()))
            except Exception:  # noqa: BLE001 - not serialisable here (flatbuffers missing): kept in memory only
                pass
        return jax.jit(exported.call), out_def
