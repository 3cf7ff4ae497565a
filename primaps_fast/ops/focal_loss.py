"""M-step loss of PriMaPs-EM: the official ``FocalLoss`` on bilinearly upsampled class scores."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch
from primaps_fast.ops.assign_pseudo_labels import check_labels, check_logits


def class_weights(prob_sums: torch.Tensor, num_pixels: int, gamma: float) -> torch.Tensor:
    """``(1 - mean softmax confidence) ** gamma`` in float32 from per-image float64 sums ``(B, K)``."""
    mean = (prob_sums.sum(0) / num_pixels).to(torch.float32)
    return (1 - mean) ** gamma


class _FocalLossCPU(torch.autograd.Function):
    """C++ forward (two fused passes) with the gradient computed in the second pass."""

    @staticmethod
    def forward(ctx, logits, target, gamma, ignore_index):
        cpp = _dispatch.cpp()
        threads = _dispatch.num_threads()
        x = logits.detach().to(torch.float32).contiguous()
        t = target.to(torch.int64).contiguous()
        B, K = x.shape[:2]
        H, W = t.shape[-2:]
        n = B * H * W
        sums = torch.empty(B, K, dtype=torch.float64)
        cpp.focal_confidence(x.numpy(), H, W, sums.numpy(), threads)
        weight = class_weights(sums, n, gamma)
        loss = torch.empty(B, dtype=torch.float64)
        with_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(x) if with_grad else torch.empty(0, 0, 0, 0)
        cpp.focal_loss_grad(x.numpy(), t.numpy(), weight.numpy(), ignore_index, loss.numpy(),
                            grad.numpy(), with_grad, threads)
        if with_grad:
            ctx.save_for_backward(grad.div_(n))
        return (loss.sum() / n).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(grad_output.dtype), None, None, None


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, ignore_index: int = 255,
               backend: str | None = None) -> torch.Tensor:
    """The official ``FocalLoss`` on ``F.interpolate(logits, target size, bilinear, align_corners=False)``.

    Args:
        logits: float ``(B, K, h, w)``, ``K >= 2``, finite, differentiable: class scores at feature
            resolution (C++/Triton compute in float32 and return the dtype of ``logits``).
        target: integer ``(B, H, W)`` class ids in ``[0, K)`` or ``ignore_index``.
        gamma: focal exponent of the class weights.
        ignore_index: target value of pixels that contribute 0 (they still count in the mean).
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "reference".

    Returns:
        scalar tensor ``mean over all B*H*W pixels of w_t * (logsumexp_k up_k - up_t)`` (0 at ignored
        pixels), with ``up`` the upsampled logits and the detached class weights
        ``w_k = (1 - mean over all pixels of softmax(up)_k) ** gamma``. Differentiable w.r.t. ``logits``
        (the weights are constants). The C++ backend fuses the upsampling into two passes over the
        pixels (confidences, then loss and gradient) and never stores ``(B, K, H, W)``.
    """
    check_logits(logits)
    check_labels(target, logits, "target", ignore_index)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma != gamma:
        raise TypeError(f"gamma: expected a real number, got {gamma!r}")
    backend = _dispatch.choose_backend(backend, logits, target)
    if backend == "reference":
        from primaps_fast.reference.train import focal_loss as ref

        return ref(logits, target, gamma=gamma, ignore_index=ignore_index)
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"target: class ids must be in [0, {logits.shape[1]}) or ignore_index={ignore_index}")
    if backend == "triton":
        from primaps_fast.triton.focal_loss import focal_loss_triton

        return focal_loss_triton(logits, target, float(gamma), ignore_index)
    return _FocalLossCPU.apply(logits, target, float(gamma), ignore_index)
