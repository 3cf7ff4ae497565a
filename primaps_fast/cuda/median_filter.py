"""CUDA kernel of median_filter (``csrc/cuda/median_filter.cu``): 3x3 median with reflect padding, one
output pixel per thread. ``primaps_fast.ops.median_filter`` registers it for the custom op
``primaps_fast::median_filter`` on CUDA tensors."""
from __future__ import annotations

import torch

from primaps_fast._dispatch import cuda_module
from primaps_fast.cuda import launch_context


def median_filter_cuda(planes: torch.Tensor) -> torch.Tensor:
    """float32 ``(P, h, w)`` planes on a CUDA device -> their 3x3 medians (no NaN/Inf check: the public op
    checks)."""
    if planes.dtype != torch.float32 or planes.dim() != 3:
        raise TypeError(f"planes: expected float32 (P, h, w), got {planes.dtype} of shape {tuple(planes.shape)}")
    planes = planes.contiguous()
    out = torch.empty_like(planes)
    device, stream = launch_context(planes)
    P, h, w = planes.shape
    cuda_module().median_filter(planes.data_ptr(), out.data_ptr(), P, h, w, device, stream)
    return out
