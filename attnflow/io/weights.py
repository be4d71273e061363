"""Reading named weight arrays from checkpoint files (safetensors, torch ``.bin``, ``.npz``), no network.

Every failure is a :class:`WeightsError` (a ``ValueError``) whose message names the file and the problem.
"""

from __future__ import annotations

import pathlib

import numpy as np


class WeightsError(ValueError):
    """A checkpoint that cannot be read or does not have the expected content."""


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


def read_npz(data: bytes, path="<npz>") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive given as bytes (never unpickled); one-line errors naming ``path``."""
    import io
    import zipfile

    if data[:6] == b"\x93NUMPY":
        raise WeightsError(f"weights file {str(path)!r} is a single .npy array; expected an .npz archive (numpy.savez) with Q, K, V[, O]")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise WeightsError(f"weights file {str(path)!r} is not an .npz archive (numpy.savez) with Q, K, V[, O]")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a damaged archive or a pickled member: one line
        msg = " ".join(str(e).split())[:200]
        raise WeightsError(f"weights file {str(path)!r} is not a readable .npz archive: {msg}") from None


def load_npz(path) -> dict[str, np.ndarray]:
    """Load the arrays (Q, K, V and O) of an .npz file; errors name the file."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read: {e.strerror or e}") from None
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
