"""CUDA backend of assign_pseudo_labels (``csrc/cuda/assign_pseudo_labels.cu``): one pass over the pixels
upsamples, takes the argmax and votes into a shared-memory histogram per block; then the majority per
(image, mask id) is written to the mask's pixels. Importing this module registers the kernel for
``primaps_fast::assign_pseudo_labels`` on CUDA tensors."""
from __future__ import annotations

import torch

import primaps_fast.ops.assign_pseudo_labels  # noqa: F401  (defines primaps_fast::assign_pseudo_labels)
from primaps_fast.cuda import extension, launch_context


def _assign_pseudo_labels_kernel(logits: torch.Tensor, ids: torch.Tensor, num_ids: int, ignore: int) -> torch.Tensor:
    """The op's CUDA kernel: float32 ``(B, K, h, w)`` logits, int64 ``(B, H, W)`` ids in ``[0, num_ids)`` or
    ``ignore`` -> int64 ``(B, H, W)`` majority classes (``ignore`` where the id is ``ignore``)."""
    if logits.dtype != torch.float32 or ids.dtype != torch.int64:
        raise TypeError(f"logits/ids: expected float32 and int64, got {logits.dtype} and {ids.dtype}")
    logits, ids = logits.contiguous(), ids.contiguous()
    device, stream = launch_context(logits, ids)
    B, K, h, w = logits.shape
    H, W = ids.shape[-2:]
    out = torch.empty_like(ids)
    hist = torch.zeros(B, num_ids, K, dtype=torch.int32, device=logits.device)
    winner = torch.empty(B, num_ids, dtype=torch.int32, device=logits.device)
    extension().assign_pseudo_labels(logits.data_ptr(), ids.data_ptr(), out.data_ptr(), hist.data_ptr(),
                                     winner.data_ptr(), B, K, h, w, H, W, num_ids, ignore, device, stream)
    return out


torch.library.register_kernel("primaps_fast::assign_pseudo_labels", "cuda", _assign_pseudo_labels_kernel)


def assign_pseudo_labels_cuda(x: torch.Tensor, ids: torch.Tensor, ignore: int, num_ids: int) -> torch.Tensor:
    """Majority class per (image, id) of the upsampled argmax; ``ignore`` where ``ids == ignore``.

    ``x``: contiguous float32 ``(B, K, h, w)``; ``ids``: int64 ``(B, H, W)`` in ``[0, num_ids)`` or ``ignore``,
    both on one CUDA device. Ties: the first class of a pixel's maximum, the smallest class of a mask's
    majority (as the C++ backend, whose upsampled scores it reproduces bit for bit).
    """
    return torch.ops.primaps_fast.assign_pseudo_labels(x, ids, num_ids, ignore)
