"""Reading named weight arrays from checkpoint files (safetensors, torch ``.bin``, ``.npz``), no network.

Every failure is a :class:`WeightsError` (a ``ValueError``) whose message names the file and the problem.

Arrays read from ``.npz`` and ``.npy`` files are sized from their headers before any of them is read: the zip
directory's uncompressed sizes and each ``.npy`` header's shape x dtype. An archive or array that would unpack to
more than :data:`MAX_ARRAY_BYTES` (2 GiB) in all is refused, so a small file that inflates to gigabytes never
reaches memory.
"""

from __future__ import annotations

import pathlib

import numpy as np

MAX_ARRAY_BYTES = 2 << 30
"""The most bytes the arrays of one ``.npz`` / ``.npy`` input may take once unpacked (2 GiB)."""


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not have the expected content."""


def _size(n: int) -> str:
    """A byte count in human units (three significant digits)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def npy_header(fp, what: str):
    """``(shape, fortran_order, dtype, nbytes)`` from the header of a ``.npy`` stream, reading nothing else.

    Raises :class:`WeightsError` (naming `what`) for a header that is not a ``.npy`` header, or one that describes
    Python objects (they would need unpickling, which attnflow refuses)."""
    from numpy.lib import format as fmt

    try:
        version = fmt.read_magic(fp)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except Exception as e:  # noqa: BLE001 - any malformed header is one line
        msg = " ".join(str(e).split())[:120] or type(e).__name__
        raise WeightsError(f"{what} is not a readable .npy array ({msg})") from None
    if dtype.hasobject:
        raise WeightsError(f"{what} holds Python objects (dtype {dtype}); attnflow reads numbers only and never unpickles")
    count = 1
    for s in shape:
        count *= int(s)
    return shape, fortran, dtype, count * dtype.itemsize


def _too_big(what: str, nbytes: int, limit: int) -> WeightsError:
    return WeightsError(f"{what} would take {_size(nbytes)} once unpacked, more than the limit of {_size(limit)} "
                        "for the arrays of one input file")


def load_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as NumPy arrays (float16/bfloat16 become float32)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except WeightsError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/invalid headers
        if "bfloat16" in str(e).lower() or "bf16" in str(e).lower():
            try:
                return _load_safetensors_bf16(path)
            except Exception as e2:  # noqa: BLE001 - a malformed header or buffer: one line
                raise WeightsError(f"{path}: not a readable safetensors file (truncated or malformed?): "
                                   f"{type(e2).__name__}") from None
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or malformed?): {e}") from None
    return {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in out.items()}


def _load_safetensors_bf16(path) -> dict[str, np.ndarray]:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for k, meta in header.items():
        if k == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = raw[base + a : base + b]
        if meta["dtype"] == "BF16":
            arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(buf, {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}[meta["dtype"]])
        out[k] = arr.reshape(meta["shape"]).astype(np.float32) if arr.dtype != np.int64 else arr.reshape(meta["shape"])
    return out


def load_torch_bin(path) -> dict[str, np.ndarray]:
    """A ``pytorch_model.bin`` via ``torch.load(weights_only=True)``; needs torch (never unpickles code)."""
    path = pathlib.Path(path)
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading pytorch_model.bin needs torch, which is not installed "
                           "(convert the checkpoint to model.safetensors)") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message is several lines with advice to unpickle code: never shown
        kind = "it needs unpickling Python objects, which attnflow refuses" if "weights_only" in str(e) or "Unpickl" in str(e) \
            else f"{type(e).__name__}"
        raise WeightsError(f"{path}: not a readable weights-only torch checkpoint ({kind}); "
                           "convert it to model.safetensors") from None
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def read_npz(data: bytes, path="<npz>", limit: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive given as bytes (never unpickled); one-line errors naming ``path``.

    The sizes are checked from the archive's headers before any array is read: the zip directory's uncompressed
    sizes and every member's ``.npy`` header (shape x dtype); more than `limit` bytes in all (default
    :data:`MAX_ARRAY_BYTES`) is refused."""
    import io
    import zipfile

    what = f"weights file {str(path)!r}"
    limit = MAX_ARRAY_BYTES if limit is None else limit
    if data[:6] == b"\x93NUMPY":
        raise WeightsError(f"{what} is a single .npy array; expected an .npz archive (numpy.savez) with Q, K, V[, O]")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise WeightsError(f"{what} is not an .npz archive (numpy.savez) with Q, K, V[, O]")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            declared = sum(i.file_size for i in infos)
            if declared > limit:
                raise _too_big(what, declared, limit)
            sizes = {}
            for info in infos:  # every header first: nothing is read while the total is unknown
                if not info.filename.endswith(".npy"):
                    raise WeightsError(f"{what} has a member {info.filename[:60]!r} that is not a .npy array")
                with z.open(info) as f:
                    sizes[info.filename] = npy_header(f, f"{what}: member {info.filename[:60]!r}")[3]
            if sum(sizes.values()) > limit:
                raise _too_big(what, sum(sizes.values()), limit)
            out = {}
            for info in infos:
                with z.open(info) as f:
                    out[info.filename[: -len(".npy")]] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged archive: one line
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise WeightsError(f"{what} is not a readable .npz archive: {msg}") from None


def read_npy(data: bytes, what: str, limit: int | None = None) -> np.ndarray:
    """The array of a ``.npy`` file given as bytes (never unpickled), its size checked from the header first
    (at most `limit` bytes, default :data:`MAX_ARRAY_BYTES`)."""
    import io

    limit = MAX_ARRAY_BYTES if limit is None else limit

    buf = io.BytesIO(data)
    shape, _, dtype, nbytes = npy_header(buf, what)
    if nbytes > limit:
        raise _too_big(what, nbytes, limit)
    if len(data) - buf.tell() < nbytes:
        raise WeightsError(f"{what} is truncated: its header announces {_size(nbytes)} of data, the file holds "
                           f"{_size(len(data) - buf.tell())}")
    buf.seek(0)
    try:
        return np.lib.format.read_array(buf, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable array is one line
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise WeightsError(f"{what} is not a readable .npy array: {msg}") from None


def load_npz(path) -> dict[str, np.ndarray]:
    """Load the arrays (Q, K, V and O) of an .npz file; errors name the file. Only a regular file of at most
    :data:`MAX_ARRAY_BYTES` is read."""
    from .config.validate import ConfigError, read_bytes

    path = pathlib.Path(path)
    try:
        data = read_bytes(f"weights file {str(path)!r}", path, MAX_ARRAY_BYTES)
    except ConfigError as e:
        raise WeightsError(str(e)) from None
    return read_npz(data, path)


def load_arrays(path) -> dict[str, np.ndarray]:
    """Dispatch on the suffix: ``.safetensors``, ``.bin``/``.pt``, ``.npz``."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return load_torch_bin(path)
    if path.suffix == ".npz":
        return load_npz(path)
    raise WeightsError(f"{path}: unsupported weights format {path.suffix!r} (expected .safetensors, .bin or .npz)")
