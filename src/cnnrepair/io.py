"""Atomic file writes, safe checkpoint and array loading (no pickles), and file hashes: a crash never leaves a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnrepair.errors import CnnRepairError


def sha256(path: Path) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file beside ``path`` (flushed to disk), then rename it into
    place. Serialising in memory first turns a full disk into a Python ``OSError`` here, never an abort
    inside a C++ writer."""

    def _write(p: Path) -> None:
        with open(p, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, _write)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory."""
    import io as _io

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and infinities become null), indented, atomically."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text))


def write_text(path: Path, text: str) -> None:
    """Write text, atomically."""
    atomic_write(path, lambda p: p.write_text(text))


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a corrupt one into a one-line error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CnnRepairError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CnnRepairError(f"{path}: not valid JSON ({exc}); delete it and rerun the step that writes it") from None


def save_torch(path: Path, obj: dict[str, Any]) -> None:
    """Save a dict of tensors and plain values, atomically."""
    atomic_write_bytes(path, torch_bytes(obj))


def load_torch(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: a pickle from elsewhere is code, never run it."""
    path = Path(path)
    if not path.is_file():
        raise CnnRepairError(f"{path}: {what} not found; run the step that creates it first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CnnRepairError(
            f"{path}: unreadable {what} ({first[:160]}); delete it and rerun the step that writes it"
        ) from None
    if not isinstance(obj, dict):
        raise CnnRepairError(f"{path}: not a cnnrepair {what} (expected a dict); delete it and rerun")
    return obj


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Save arrays uncompressed to an .npz, atomically."""

    def _write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, _write)


def load_npz(path: Path, what: str = "array file") -> dict[str, np.ndarray]:
    """Load an .npz without pickles, with a one-line error for a corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CnnRepairError(f"{path}: {what} not found; run the step that creates it first")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise CnnRepairError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); "
                             "save it with np.savez (plain arrays, no objects)") from None
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # np.load hands back a member that is not an .npy array (a raw pickle) as bytes
            raise CnnRepairError(f"{path}: member {key!r} of the {what} is not a NumPy array (a pickle or other file); "
                                 "save it with np.savez (plain arrays, no objects)")
    return arrays


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (Python or NumPy) replaced by None, so strict parsers read it."""
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return _finite(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
