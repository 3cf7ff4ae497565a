"""CUDA backend of the pseudo-label post-processing (``csrc/cuda/pseudo_labels.cu``), the C++ kernel's
``mask_labels`` / ``mask_probs`` on the GPU: from the raw proposals (the median filter is fused), the x10 gain, background and log_softmax over masks
at feature resolution, then the bilinear upsampling fused with the arg-max or the softmax."""
from __future__ import annotations

import torch

from primaps_fast._dispatch import cuda_module
from primaps_fast.cuda import launch_context


def _mask_logits(masks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Raw proposals float32 ``(B, M, h, w)`` -> log-probabilities ``(B, M + 1, h, w)``, background first;
    channels beyond ``counts[b] + 1`` are left unset (the upsampling kernels never read them)."""
    if masks.dtype != torch.float32 or counts.dtype != torch.int64:
        raise TypeError(f"masks/counts: expected float32 and int64, got {masks.dtype} and {counts.dtype}")
    masks, counts = masks.contiguous(), counts.contiguous()
    device, stream = launch_context(masks, counts)
    ext = cuda_module()
    B, M, h, w = masks.shape
    logits = torch.empty(B, M + 1, h, w, dtype=torch.float32, device=masks.device)
    chunks = ext.mask_logits_chunks(M, h, w)
    part_sum = torch.empty(B, chunks, dtype=torch.float64, device=masks.device)
    part_count = torch.empty(B, chunks, dtype=torch.int64, device=masks.device)
    ext.mask_logits(masks.data_ptr(), counts.data_ptr(), logits.data_ptr(), part_sum.data_ptr(),
                    part_count.data_ptr(), B, M, h, w, device, stream)
    return logits


def mask_labels_cuda(masks: torch.Tensor, counts: torch.Tensor, size: tuple[int, int],
                     ignore_index: int) -> torch.Tensor:
    """crf=False: (B, H, W) int64 ids 1..counts[b], ignore_index for the background.

    ``masks``: the raw proposals float32 ``(B, M, h, w)`` of principal_masks; ``counts``: int64 ``(B,)`` in
    ``[0, M]``, on the same CUDA device; ``size``: ``(H, W)``.
    """
    logits = _mask_logits(masks, counts)
    B, M, h, w = masks.shape
    H, W = size
    labels = torch.empty(B, H, W, dtype=torch.int64, device=masks.device)
    device, stream = launch_context(logits, counts)
    cuda_module().mask_labels(logits.data_ptr(), counts.data_ptr(), labels.data_ptr(), B, M, h, w, H, W,
                              int(ignore_index), device, stream)
    return labels


def mask_probs_cuda(masks: torch.Tensor, counts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """crf=True: (B, M + 1, H, W) float32 softmax of the upsampled log-probabilities, zero beyond
    counts[b] + 1 (arguments as :func:`mask_labels_cuda`)."""
    logits = _mask_logits(masks, counts)
    B, M, h, w = masks.shape
    H, W = size
    probs = torch.empty(B, M + 1, H, W, dtype=torch.float32, device=masks.device)
    device, stream = launch_context(logits, counts)
    cuda_module().mask_probs(logits.data_ptr(), counts.data_ptr(), probs.data_ptr(), B, M, h, w, H, W, device, stream)
    return probs
