"""CUDA backend of median_filter (``csrc/cuda/median_filter.cu``): 3x3 median with reflect padding, one
output pixel per thread. Importing this module registers the kernel for ``primaps_fast::median_filter``
on CUDA tensors."""
from __future__ import annotations

import torch

import primaps_fast.ops.median_filter  # noqa: F401  (defines the custom op primaps_fast::median_filter)
from primaps_fast.cuda import extension, launch_context


def _median_filter_planes(planes: torch.Tensor) -> torch.Tensor:
    """The op's CUDA kernel: float32 ``(P, h, w)`` planes -> their 3x3 medians (no NaN/Inf check: the
    public op checks)."""
    if planes.dtype != torch.float32 or planes.dim() != 3:
        raise TypeError(f"planes: expected float32 (P, h, w), got {planes.dtype} of shape {tuple(planes.shape)}")
    planes = planes.contiguous()
    out = torch.empty_like(planes)
    device, stream = launch_context(planes)
    P, h, w = planes.shape
    extension().median_filter(planes.data_ptr(), out.data_ptr(), P, h, w, device, stream)
    return out


torch.library.register_kernel("primaps_fast::median_filter", "cuda", _median_filter_planes)


def median_filter_cuda(masks: torch.Tensor) -> torch.Tensor:
    """masks (..., h, w) float32 contiguous, on a CUDA device -> 3x3 median, reflect padding, same shape."""
    h, w = masks.shape[-2:]
    return torch.ops.primaps_fast.median_filter(masks.reshape(-1, h, w)).reshape(masks.shape)
