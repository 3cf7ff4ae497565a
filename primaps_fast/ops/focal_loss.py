"""M-step loss of PriMaPs-EM: the official ``FocalLoss`` on bilinearly upsampled class scores."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch
from primaps_fast.common import class_weights
from primaps_fast.ops.assign_pseudo_labels import check_labels, check_logits


def check_gamma(gamma, name: str = "gamma") -> float:
    """The focal exponent: a finite number >= 0 (a negative one turns the weights of confident classes into
    infinities)."""
    return _dispatch.check_number(gamma, name, lo=0.0)


@torch.library.custom_op("primaps_fast::focal_loss", mutates_args=(), device_types="cpu")
def _focal_loss_cpu(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int,
                    with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """C++ kernel (two fused passes) on float32 ``(B, K, h, w)`` logits and int64 ``(B, H, W)`` target:
    the float32 mean loss and its gradient w.r.t. the logits (``(0, 0, 0, 0)`` unless ``with_grad``)."""
    cpp = _dispatch.cpp()
    threads = _dispatch.num_threads()
    B, K = logits.shape[:2]
    H, W = target.shape[-2:]
    n = B * H * W
    sums = torch.empty(B, K, dtype=torch.float64)
    cpp.focal_confidence(logits.numpy(), H, W, sums.numpy(), threads)
    weight = class_weights(sums, n, gamma)
    loss = torch.empty(B, dtype=torch.float64)
    grad = torch.empty_like(logits) if with_grad else torch.empty(0, 0, 0, 0)
    cpp.focal_loss_grad(logits.numpy(), target.numpy(), weight.numpy(), ignore_index, loss.numpy(),
                        grad.numpy(), with_grad, threads)
    return (loss.sum() / n).to(torch.float32), grad.div_(n)


@_focal_loss_cpu.register_fake
def _(logits, target, gamma, ignore_index, with_grad):
    grad_shape = logits.shape if with_grad else (0, 0, 0, 0)
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(grad_shape, dtype=torch.float32)


def _focal_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _focal_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("focal_loss: the gradient was not computed (the op ran with with_grad=False)")
    return grad * grad_loss, None, None, None, None


_focal_loss_cpu.register_autograd(_focal_loss_backward, setup_context=_focal_loss_setup)


_dispatch.skip_dynamo_import(_focal_loss_cpu)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, ignore_index: int = 255,
               backend: str | None = None) -> torch.Tensor:
    """The official ``FocalLoss`` on ``F.interpolate(logits, target size, bilinear, align_corners=False)``.

    Args:
        logits: float ``(B, K, h, w)``, ``K >= 2``, finite, differentiable: class scores at feature
            resolution (C++/Triton compute in float32 and return the dtype of ``logits``).
        target: integer ``(B, H, W)`` class ids in ``[0, K)`` or ``ignore_index``.
        gamma: focal exponent of the class weights, finite and >= 0.
        ignore_index: target value (an int64) of pixels that contribute 0 (they still count in the mean).
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        scalar tensor ``mean over all B*H*W pixels of w_t * (logsumexp_k up_k - up_t)`` (0 at ignored
        pixels), with ``up`` the upsampled logits and the detached class weights
        ``w_k = (1 - mean over all pixels of softmax(up)_k) ** gamma``. Differentiable w.r.t. ``logits``
        (the weights are constants). The C++ backend fuses the upsampling into two passes over the
        pixels (confidences, then loss and gradient) and never stores ``(B, K, H, W)``.
    """
    check_logits(logits)
    check_labels(target, logits, "target", ignore_index)
    check_gamma(gamma)
    backend = _dispatch.choose_backend(backend, logits, target)
    if backend == "reference":
        return _dispatch.reference("focal_loss")(logits, target, gamma=gamma, ignore_index=ignore_index)
    if backend == "cuda":
        raise _dispatch.cuda_not_wired("focal_loss")
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
    if bool(bad.any()):
        raise ValueError(f"target: class ids must be in [0, {logits.shape[1]}) or ignore_index={ignore_index}")
    if backend == "triton":
        from primaps_fast.triton.focal_loss import focal_loss_triton

        return focal_loss_triton(logits, target, float(gamma), ignore_index)
    x = logits.to(torch.float32).contiguous()
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _focal_loss_cpu(x, target.to(torch.int64).contiguous(), float(gamma), ignore_index, with_grad)
    return loss.to(logits.dtype)
