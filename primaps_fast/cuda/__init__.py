"""CUDA C++ backend: launchers of the kernels in ``csrc/cuda`` (module ``primaps_fast._C_cuda``), one module
per op, mirroring ``primaps_fast.triton`` (``<op>_cuda`` for ``<op>_triton``, same arguments).

Where an op is a torch custom op (``primaps_fast::<op>``), ``primaps_fast.ops.<op>`` registers the CUDA
kernel of this package for its CUDA dispatch key when ``primaps_fast._C_cuda`` was built. Launchers take
inputs the public op has validated and reach the compiled module through
``primaps_fast._dispatch.cuda_module()``; they allocate outputs and workspaces with torch on the inputs'
device and run the kernels on torch's current stream there. Nothing here needs a GPU at import time.
"""
from __future__ import annotations

import torch


def launch_context(*tensors: torch.Tensor) -> tuple[int, int]:
    """``(device index, stream handle)`` for kernels on ``tensors``: all on one CUDA device, torch's current
    stream of that device (so the kernels order with torch's work, and CUDA graphs capture them)."""
    devices = {t.device for t in tensors}
    device = next(iter(devices))
    if len(devices) != 1 or device.type != "cuda":
        raise ValueError(f"CUDA backend: expected tensors on one CUDA device, got {sorted(map(str, devices))}")
    return device.index, torch.cuda.current_stream(device).cuda_stream
