"""CUDA C++ backend: launchers of the kernels in ``csrc/cuda`` (module ``primaps_fast._C_cuda``), one module
per op, mirroring ``primaps_fast.triton`` (``<op>_cuda`` for ``<op>_triton``, same arguments).

Importing ``primaps_fast.cuda.<op>`` registers the op's CUDA kernel for its torch custom op
(``primaps_fast::<op>``, CUDA dispatch key) where the op has one. Launchers take inputs the public op
has validated; they allocate outputs and workspaces with torch on the inputs' device and run the kernels
on torch's current stream there. Nothing here needs a GPU at import time.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module ``primaps_fast._C_cuda``; a clear error when the package was built without it."""
    try:
        from primaps_fast import _C_cuda
    except ImportError as exc:
        raise RuntimeError(
            "primaps_fast was built without its CUDA extension (primaps_fast._C_cuda): nvcc was not found at "
            "build time, or PRIMAPS_FAST_CUDA=0; reinstall with nvcc on PATH (or CUDA_HOME set)"
        ) from exc
    return _C_cuda


def built() -> bool:
    """True when ``primaps_fast._C_cuda`` was built and imports (it needs no GPU to import)."""
    try:
        extension()
    except RuntimeError:
        return False
    return True


def launch_context(*tensors: torch.Tensor) -> tuple[int, int]:
    """``(device index, stream handle)`` for kernels on ``tensors``: all on one CUDA device, torch's current
    stream of that device (so the kernels order with torch's work, and CUDA graphs capture them)."""
    devices = {t.device for t in tensors}
    device = next(iter(devices))
    if len(devices) != 1 or device.type != "cuda":
        raise ValueError(f"CUDA backend: expected tensors on one CUDA device, got {sorted(map(str, devices))}")
    return device.index, torch.cuda.current_stream(device).cuda_stream
