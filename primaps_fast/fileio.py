"""Crash-safe file writing: every output appears complete or not at all.

Each writer produces a temporary file in the destination's folder (same file system, so the final
``os.replace`` is atomic) and renames it over the destination only after the data was written
completely. On any error (a full disk, an interrupt) the temporary file is removed and the previous
content of the destination, if any, is untouched. A process killed by a signal (``kill -9``) cannot remove
its temporary file; the name carries the host and process id, so the first write of a later process into
the same folder removes the temporaries of processes of this host that no longer run.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
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
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{_owner()}.", suffix=".tmp", dir=folder)
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
    if folder not in _swept:
        _swept.add(folder)
        _remove_orphans(folder)


_swept: set = set()  # folders whose orphaned temporaries this process removed (once: a folder may be large)


def _owner() -> str:
    """``<host>-<pid>`` of this process, as it appears in its temporary file names (no dots)."""
    return f"{os.uname().nodename.replace('.', '_')}-{os.getpid()}" if hasattr(os, "uname") else str(os.getpid())


def _remove_orphans(folder: str) -> None:
    """Remove the temporary files (``.<name>.<host>-<pid>.<random>.tmp``) in ``folder`` of processes of this
    host that no longer run (killed while writing)."""
    host = _owner().rsplit("-", 1)[0]
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            parts = entry.name.split(".")
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp") and len(parts) >= 5):
                continue
            who = parts[-3].rsplit("-", 1)
            if len(who) != 2 or who[0] != host or not who[1].isdigit() or _running(int(who[1])):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def digest(obj) -> str:
    """SHA-256 of a nest of dicts, lists/tuples, tensors and plain values (numbers, strings, None): what a
    file stores next to its contents so that a corruption that still parses (a flipped byte in a tensor's
    data, which ``torch.load`` does not detect) is found. Dict keys are taken in sorted order."""
    import torch

    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode() + b":")
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{type(x).__name__} {x!r};".encode())

    feed(obj)
    return h.hexdigest()


def _explain(exc: OSError, path) -> OSError:
    if exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on device while writing {os.fspath(path)}; free some "
                                     "space and rerun (files written before are intact, the run resumes)")
    return exc
