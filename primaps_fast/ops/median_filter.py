"""3x3 median filter of PriMaPs proposals (official ``MedianPool2d(kernel_size=3, stride=1, padding=1)``)."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch


@torch.library.custom_op("primaps_fast::median_filter", mutates_args=(), device_types="cpu")
def _median_filter_op(planes: torch.Tensor) -> torch.Tensor:
    """The custom op on float32 ``(P, h, w)`` planes; this is its C++ kernel (raises ValueError on NaN/Inf)."""
    out = torch.empty_like(planes)
    _dispatch.cpp().median_filter(planes.numpy(), out.numpy(), _dispatch.num_threads())
    return out


@_median_filter_op.register_fake
def _(planes):
    return torch.empty_like(planes)


if _dispatch.cuda_available():
    from primaps_fast.cuda.median_filter import median_filter_cuda

    _median_filter_op.register_kernel("cuda")(median_filter_cuda)


_dispatch.skip_dynamo_import(_median_filter_op)


def median_filter_op(masks: torch.Tensor) -> torch.Tensor:
    """The C++ / CUDA kernel (the custom op, by device) of float ``(..., h, w)`` masks: float32 medians."""
    x = masks.detach().to(dtype=torch.float32).contiguous()
    return _median_filter_op(x.reshape(-1, x.shape[-2], x.shape[-1])).reshape(masks.shape)


def median_filter(masks: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """3x3 median filter with reflect padding, each ``(h, w)`` plane independently.

    Args:
        masks: float tensor ``(..., h, w)`` with at least 2 dimensions (e.g. ``(B, M, h, w)`` proposals);
            computed in float32, finite.
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        float32 tensor of the shape of ``masks``: the median (the 5th smallest) of each pixel's 3x3
        neighbourhood, the border reflected (``F.pad(mode="reflect")``: index -1 reads index 1), as the
        official ``MedianPool2d``. On an axis of length 1, which reflect padding cannot handle, the pixel
        itself is used (replicate). All-zero planes (rows beyond ``counts``) stay zero.
    """
    _dispatch.check_tensor(masks, "masks", floating=True)
    if masks.dim() < 2:
        raise ValueError(f"masks: expected at least 2 dimensions (..., h, w), got shape {tuple(masks.shape)}")
    backend = _dispatch.choose_backend(backend, masks)
    if backend != "cpu":  # the C++ kernel checks NaN/Inf itself
        _dispatch.check_tensor(masks, "masks", finite=True)
    if backend == "reference":
        return _dispatch.reference("median_filter")(masks)
    return _dispatch.kernel("median_filter", backend)(masks)
