"""CUDA backend of focal_loss (``csrc/cuda/focal_loss.cu``): forward and backward fused with the bilinear
upsampling, one block per output row, deterministic (fixed-order sums, no floating-point atomics).
Importing this module registers the kernel for ``primaps_fast::focal_loss`` on CUDA tensors (its autograd
formula is the op's, shared with the CPU kernel)."""
from __future__ import annotations

import torch

import primaps_fast.ops.focal_loss  # noqa: F401  (defines primaps_fast::focal_loss and its autograd)
from primaps_fast.cuda import extension, launch_context


def _focal_loss_kernel(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int,
                       with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's CUDA kernel: float32 ``(B, K, h, w)`` logits, int64 ``(B, H, W)`` target -> the float32 mean
    loss and its gradient w.r.t. the logits (``(0, 0, 0, 0)`` unless ``with_grad``)."""
    if logits.dtype != torch.float32 or target.dtype != torch.int64:
        raise TypeError(f"logits/target: expected float32 and int64, got {logits.dtype} and {target.dtype}")
    logits, target = logits.contiguous(), target.contiguous()
    device, stream = launch_context(logits, target)
    ext = extension()
    B, K, h, w = logits.shape
    H, W = target.shape[-2:]
    dev = logits.device
    conf = torch.empty(B, H, K, dtype=torch.float64, device=dev)
    weight = torch.empty(K, dtype=torch.float32, device=dev)
    ext.focal_weights(logits.data_ptr(), conf.data_ptr(), weight.data_ptr(), B, K, h, w, H, W, float(gamma),
                      device, stream)
    loss = torch.empty(B, H, dtype=torch.float64, device=dev)
    rows = torch.empty(B, H, K, w, dtype=torch.float32, device=dev) if with_grad else None
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(0, 0, 0, 0)
    ext.focal_loss_grad(logits.data_ptr(), target.data_ptr(), weight.data_ptr(), ignore_index, loss.data_ptr(),
                        rows.data_ptr() if with_grad else 0, grad.data_ptr() if with_grad else 0, with_grad,
                        B, K, h, w, H, W, device, stream)
    return (loss.sum() / (B * H * W)).to(torch.float32), grad


torch.library.register_kernel("primaps_fast::focal_loss", "cuda", _focal_loss_kernel)


def focal_loss_cuda(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int) -> torch.Tensor:
    """focal_loss on validated CUDA inputs (``target`` ids in ``[0, K)`` or ``ignore_index``); differentiable."""
    x = logits.to(torch.float32).contiguous()
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = torch.ops.primaps_fast.focal_loss(x, target.to(torch.int64).contiguous(), float(gamma), ignore_index,
                                                with_grad)
    return loss.to(logits.dtype)
