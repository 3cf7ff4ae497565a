"""Crash-safe file writing: every output appears complete or not at all.

Each writer produces a temporary file in the destination's folder (same file system, so the final
``os.replace`` is atomic) and renames it over the destination only after the data was written
completely. On any error (a full disk, an interrupt) the temporary file is removed and the previous
content of the destination, if any, is untouched.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_all(f, data: bytes) -> None:
    # A separate function so tests can simulate a full disk by patching it.
    f.write(data)


def write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    try:
        with atomic_open(path, "wb") as f:
            _write_all(f, data)
    except OSError as exc:
        raise _explain(exc, path) from exc


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically. Always valid JSON: NaN and infinities (which
    ``json`` would write as the bare, non-standard ``NaN``/``Infinity``) raise ``ValueError`` before
    anything is written; store them as ``None`` (null) where they mean "undefined"."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"obj: cannot write {os.fspath(path)} as JSON: it contains NaN or an infinity "
                         f"({exc}), which JSON cannot represent") from None
    write_bytes(path, (text + "\n").encode())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) array as PNG."""
    from PIL import Image

    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"array: expected uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_png(path, array: np.ndarray) -> None:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array as a PNG file, atomically."""
    write_bytes(path, png_bytes(array))


def write_npy(path, array: np.ndarray) -> None:
    """Write ``array`` in .npy format, atomically."""
    buf = io.BytesIO()
    np.save(buf, array)
    write_bytes(path, buf.getvalue())


def torch_save(path, obj) -> None:
    """``torch.save`` to ``path`` atomically (a checkpoint is never left half-written)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def _explain(exc: OSError, path) -> OSError:
    if exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device while writing {os.fspath(path)}; free some "
                                     "space and rerun (files written before are intact, the run resumes)")
    return exc
