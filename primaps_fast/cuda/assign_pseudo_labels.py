"""CUDA backend of assign_pseudo_labels (``csrc/cuda/assign_pseudo_labels.cu``): one pass over the pixels
upsamples, takes the argmax and votes into a shared-memory histogram per block; then the majority per
(image, mask id) is written to the mask's pixels. ``primaps_fast.ops.assign_pseudo_labels`` registers it
for the custom op ``primaps_fast::assign_pseudo_labels`` on CUDA tensors."""
from __future__ import annotations

import torch

from primaps_fast._dispatch import cuda_module
from primaps_fast.cuda import launch_context


def assign_pseudo_labels_cuda(logits: torch.Tensor, ids: torch.Tensor, num_ids: int, ignore: int,
                              ignore_class: int) -> torch.Tensor:
    """float32 ``(B, K, h, w)`` logits, int64 ``(B, H, W)`` ids in ``[0, num_ids)`` or ``ignore`` -> int64
    ``(B, H, W)`` majority classes (``ignore`` where the id is ``ignore``), the votes for class
    ``ignore_class`` not counted (``ignore_class`` for a mask without votes). Ties: the first class of a
    pixel's maximum, the smallest class of a mask's majority (as the C++ kernel, whose upsampled scores it
    reproduces bit for bit)."""
    if logits.dtype != torch.float32 or ids.dtype != torch.int64:
        raise TypeError(f"logits/ids: expected float32 and int64, got {logits.dtype} and {ids.dtype}")
    logits, ids = logits.contiguous(), ids.contiguous()
    device, stream = launch_context(logits, ids)
    B, K, h, w = logits.shape
    H, W = ids.shape[-2:]
    out = torch.empty_like(ids)
    hist = torch.zeros(B, num_ids, K, dtype=torch.int32, device=logits.device)
    winner = torch.empty(B, num_ids, dtype=torch.int32, device=logits.device)
    cuda_module().assign_pseudo_labels(logits.data_ptr(), ids.data_ptr(), out.data_ptr(), hist.data_ptr(),
                                       winner.data_ptr(), B, K, h, w, H, W, num_ids, ignore, ignore_class, device,
                                       stream)
    return out

