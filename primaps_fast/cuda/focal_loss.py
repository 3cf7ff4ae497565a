"""CUDA backend of focal_loss (``csrc/cuda/focal_loss.cu``): forward and backward fused with the bilinear
upsampling, one block per output row, deterministic (fixed-order sums, no floating-point atomics).
``primaps_fast.ops.focal_loss`` registers it for the custom op ``primaps_fast::focal_loss`` on CUDA tensors
(its autograd formula is the op's, shared with the CPU kernel)."""
from __future__ import annotations

from typing import Optional

import torch

from primaps_fast._dispatch import cuda_module
from primaps_fast.common import class_weights
from primaps_fast.cuda import launch_context


def _confidences(logits: torch.Tensor, H: int, W: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, K, h, w)`` logits -> float64 ``(B, H, K)`` per-row sums of the upsampled softmax and
    the float32 ``(K,)`` class weights of this batch alone."""
    B, K, h, w = logits.shape
    device, stream = launch_context(logits)
    conf = torch.empty(B, H, K, dtype=torch.float64, device=logits.device)
    weight = torch.empty(K, dtype=torch.float32, device=logits.device)
    cuda_module().focal_weights(logits.data_ptr(), conf.data_ptr(), weight.data_ptr(), B, K, h, w, H, W,
                                float(gamma), device, stream)
    return conf, weight


def confidence_sums_cuda(logits: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """float32 contiguous ``(B, K, h, w)`` CUDA logits -> float64 ``(B, K)`` sums of the softmax of the
    logits upsampled to ``(H, W)`` (what ``focal_loss(class_stats=...)`` hands to its hook)."""
    return _confidences(logits, H, W, 0.0)[0].sum(1)


def focal_loss_cuda(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int,
                    with_grad: bool, class_sums: Optional[torch.Tensor] = None,
                    num_pixels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(B, K, h, w)`` logits, int64 ``(B, H, W)`` target -> the float32 mean loss and its
    gradient w.r.t. the logits (``(0, 0, 0, 0)`` unless ``with_grad``). With ``class_sums`` (float64
    ``(R, K)``) the class weights come from them and the mean is over ``num_pixels``."""
    if logits.dtype != torch.float32 or target.dtype != torch.int64:
        raise TypeError(f"logits/target: expected float32 and int64, got {logits.dtype} and {target.dtype}")
    logits, target = logits.contiguous(), target.contiguous()
    device, stream = launch_context(logits, target)
    B, K, h, w = logits.shape
    H, W = target.shape[-2:]
    if class_sums is None:
        weight, num_pixels = _confidences(logits, H, W, gamma)[1], B * H * W
    else:
        weight = class_weights(class_sums.to(logits.device), num_pixels, gamma).contiguous()
    loss = torch.empty(B, H, dtype=torch.float64, device=logits.device)
    rows = torch.empty(B, H, K, w, dtype=torch.float32, device=logits.device) if with_grad else None
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0, 0, 0, 0)
    cuda_module().focal_loss_grad(logits.data_ptr(), target.data_ptr(), weight.data_ptr(), ignore_index,
                                  loss.data_ptr(), rows.data_ptr() if with_grad else 0,
                                  grad.data_ptr() if with_grad else 0, with_grad, B, K, h, w, H, W, num_pixels,
                                  device, stream)
    return (loss.sum() / num_pixels).to(torch.float32), grad

