"""M-step loss of PriMaPs-EM: the official ``FocalLoss`` on bilinearly upsampled class scores."""
from __future__ import annotations

from typing import Optional

import torch

from primaps_fast import _dispatch
from primaps_fast.common import class_weights
from primaps_fast.ops.assign_pseudo_labels import check_label_values, check_labels, check_logits


def check_gamma(gamma, name: str = "gamma") -> float:
    """The focal exponent: a finite number >= 0 (a negative one turns the weights of confident classes into
    infinities)."""
    return _dispatch.check_number(gamma, name, lo=0.0)


def check_target_values(target: torch.Tensor, K: int, ignore_index: int) -> None:
    """Every value of ``target`` a class id in ``[0, K)`` or ``ignore_index`` (two passes over it)."""
    check_label_values(target, "target", ignore_index)
    bad = (target != ignore_index) & ((target < 0) | (target >= K))
    if bool(bad.any()):
        raise ValueError(f"target: class ids must be in [0, {K}) or ignore_index={ignore_index}")


def confidence_sums_cpu(logits: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """C++ pass 1 on float32 ``(B, K, h, w)`` logits: float64 ``(B, K)`` sums of the upsampled softmax."""
    sums = torch.empty(logits.shape[0], logits.shape[1], dtype=torch.float64)
    _dispatch.cpp().focal_confidence(logits.numpy(), H, W, sums.numpy(), _dispatch.num_threads())
    return sums


# The one-pass C++ kernel keeps float32 moments of the gradient, (B, h, w, S, Kp) with S the most classes present
# in an image's target and Kp = K rounded up to 8, until the class weights are known; above this many bytes
# two passes run instead, with moments of one slot (the size of the gradient, Kp for K).
MAX_MOMENT_BYTES = 512 << 20


def _focal_loss_cpu(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int, with_grad: bool,
                    class_stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernels on float32 ``(B, K, h, w)`` logits and int64 ``(B, H, W)`` target: the float32 mean loss
    and its gradient w.r.t. the logits (``(0, 0, 0, 0)`` unless ``with_grad``). ``class_stats``, the class
    sums that make the weights and the pixel count that divides the sums over pixels: None (this batch's
    softmax sums and ``B*H*W``), a checked hook ``(sums, num_pixels) -> (sums, num_pixels)``
    (``focal_loss(class_stats=...)``) called once with this call's sums and count as soon as the sums are
    known, or the pair itself, known before the call.

    One pass over the pixels (``focal_moments``: softmax sums, per-class losses, the gradient's moments of
    each class present; the target's values checked as they are read), then the gradient from the moments
    and the weights (``focal_combine``). When those moments would exceed ``MAX_MOMENT_BYTES``, two passes:
    the softmax sums (``focal_confidence``), then the same kernel with one moment slot that every class
    adds to, times its weight."""
    B, K, h, w = logits.shape
    H, W = target.shape[-2:]
    cpp, threads = _dispatch.cpp(), _dispatch.num_threads()

    def statistics(sums):  # sums: this call's, computed when called
        if class_stats is None:
            return sums(), B * H * W
        return class_stats(sums(), B * H * W) if callable(class_stats) else class_stats

    slot, bad = torch.empty(B, K, dtype=torch.int32), torch.empty(B, dtype=torch.int64)
    cpp.focal_target_classes(target.numpy(), ignore_index, slot.numpy(), bad.numpy(), threads)
    if bool(bad.any()):
        check_target_values(target, K, ignore_index)
    slots, Kp = max(int((slot >= 0).sum(1).max()), 1), (K + 7) // 8 * 8  # Kp: csrc's padded_classes
    two_passes = with_grad and B * h * w * slots * Kp * 4 > MAX_MOMENT_BYTES
    if two_passes:  # the weights first
        class_sums, num_pixels = statistics(lambda: confidence_sums_cpu(logits, H, W))
        weight = class_weights(class_sums, num_pixels, gamma)
        # one slot that every class adds to, each pixel's moments times its class weight as they accumulate
        slot, factor, slots = torch.where(slot >= 0, 0, -1).to(torch.int32), weight, 1
    else:  # a slot per class present, weighted afterwards
        factor = torch.ones(K)
    sums, class_loss = torch.empty(B, K, dtype=torch.float64), torch.empty(B, K, dtype=torch.float64)
    moments = torch.empty((B, h, w, slots, Kp) if with_grad else (0, 0, 0, 0, 0))
    cpp.focal_moments(logits.numpy(), target.numpy(), slot.numpy(), factor.numpy(), ignore_index, sums.numpy(),
                      class_loss.numpy(), moments.numpy(), with_grad, threads)
    if not two_passes:
        class_sums, num_pixels = statistics(lambda: sums)
        weight = class_weights(class_sums, num_pixels, gamma)
    loss = (class_loss.sum(0) * weight.double()).sum() / num_pixels
    grad = torch.empty_like(logits) if with_grad else torch.empty(0, 0, 0, 0)
    if with_grad:
        combine_slot, combine_weight = slot, weight
        if two_passes:  # the one slot, weighted already
            combine_slot, combine_weight = torch.full_like(slot, -1), torch.ones(K)
            combine_slot[:, 0] = 0
        cpp.focal_combine(moments.numpy(), combine_slot.numpy(), combine_weight.numpy(), float(num_pixels),
                          grad.numpy(), threads)
    return loss.to(torch.float32), grad


@torch.library.custom_op("primaps_fast::focal_loss", mutates_args=(), device_types="cpu")
def _focal_loss_op(logits: torch.Tensor, target: torch.Tensor, gamma: float, ignore_index: int,
                   with_grad: bool, class_sums: Optional[torch.Tensor] = None,
                   num_pixels: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The custom op; this is its C++ kernel (``_focal_loss_cpu``) on float32 ``(B, K, h, w)`` logits and
    int64 ``(B, H, W)`` target: the float32 mean loss and its gradient w.r.t. the logits (``(0, 0, 0, 0)``
    unless ``with_grad``). With ``class_sums`` (float64 ``(R, K)``, see ``focal_loss(class_stats=...)``) the
    class weights come from them and the sums over pixels are divided by ``num_pixels`` instead of
    ``B*H*W``."""
    known = None if class_sums is None else (class_sums, num_pixels)
    return _focal_loss_cpu(logits, target, gamma, ignore_index, with_grad, known)


@_focal_loss_op.register_fake
def _(logits, target, gamma, ignore_index, with_grad, class_sums=None, num_pixels=0):
    grad_shape = logits.shape if with_grad else (0, 0, 0, 0)
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(grad_shape, dtype=torch.float32)


def _focal_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _focal_loss_backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("focal_loss: the gradient was not computed (the op ran with with_grad=False)")
    return grad * grad_loss, None, None, None, None, None, None


_focal_loss_op.register_autograd(_focal_loss_backward, setup_context=_focal_loss_setup)

if _dispatch.cuda_available():
    from primaps_fast.cuda.focal_loss import focal_loss_cuda

    _focal_loss_op.register_kernel("cuda")(focal_loss_cuda)


_dispatch.skip_dynamo_import(_focal_loss_op)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, ignore_index: int = 255,
               backend: str | None = None, class_stats=None) -> torch.Tensor:
    """The official ``FocalLoss`` on ``F.interpolate(logits, target size, bilinear, align_corners=False)``.

    Args:
        logits: float ``(B, K, h, w)``, ``K >= 2``, finite, differentiable: class scores at feature
            resolution (C++/Triton compute in float32 and return the dtype of ``logits``).
        target: integer ``(B, H, W)`` class ids in ``[0, K)`` or ``ignore_index``.
        gamma: focal exponent of the class weights, finite and >= 0.
        ignore_index: target value (an int64) of pixels that contribute 0 (they still count in the mean).
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".
        class_stats: optional callable ``(sums, num_pixels) -> (sums, num_pixels)`` for a batch split
            across calls (data-parallel ranks: ``primaps_fast.distributed``): it receives this call's
            float64 per-image sums of ``softmax(up)`` ``(B, K)`` and its pixel count ``B*H*W`` and returns
            those of the whole batch (rows ``(R, K)``, summed by the rule; a count > 0). The class weights
            come from the returned sums and the loss and gradient are divided by the returned count, so
            the losses (and gradients) of the parts add up to those of the whole batch.

    Returns:
        scalar tensor ``mean over all B*H*W pixels of w_t * (logsumexp_k up_k - up_t)`` (0 at ignored
        pixels), with ``up`` the upsampled logits and the detached class weights
        ``w_k = (1 - mean over all pixels of softmax(up)_k) ** gamma``. Differentiable w.r.t. ``logits``
        (the weights are constants). The C++ backend fuses the upsampling into one pass over the pixels
        (softmax sums, per-class losses and the gradient's per-class moments at feature resolution, the
        target's values checked as it reads them) and never stores ``(B, K, H, W)``.
    """
    check_logits(logits)
    check_labels(target, logits, "target", ignore_index, values=False)
    check_gamma(gamma)
    if class_stats is not None and not callable(class_stats):
        raise TypeError(f"class_stats: expected a callable or None, got {type(class_stats).__name__}")
    backend = _dispatch.choose_backend(backend, logits, target)
    if backend != "cpu":  # the C++ kernel checks the values as it reads them
        check_target_values(target, logits.shape[1], ignore_index)
    if backend == "reference":
        return _dispatch.reference("focal_loss")(logits, target, gamma=gamma, ignore_index=ignore_index,
                                                  class_stats=_checked(class_stats, logits.shape[1]))
    return _dispatch.kernel("focal_loss", backend)(logits, target, float(gamma), ignore_index,
                                                    _checked(class_stats, logits.shape[1]))


def focal_loss_kernel(logits, target, gamma: float, ignore_index: int, class_stats) -> torch.Tensor:
    """The C++ / CUDA backend (the custom op, by device) of validated arguments; ``class_stats`` already
    wrapped by ``_checked``. The loss in the dtype of ``logits``, differentiable w.r.t. them."""
    x = logits.to(torch.float32).contiguous()
    t = target.to(torch.int64).contiguous()
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    if class_stats is None:
        loss, _ = _focal_loss_op(x, t, gamma, ignore_index, with_grad)
    elif x.device.type == "cpu":  # the hook between the pass over the pixels and the gradient: one pass
        loss = _FocalLossWithStats.apply(x, t, gamma, ignore_index, class_stats, with_grad)
    else:
        H, W = t.shape[-2:]
        sums = _dispatch.kernel("focal_confidence", x.device.type)(x.detach(), H, W)
        sums, n = class_stats(sums, x.shape[0] * H * W)
        loss, _ = _focal_loss_op(x, t, gamma, ignore_index, with_grad, sums, n)
    return loss.to(logits.dtype)


class _FocalLossWithStats(torch.autograd.Function):
    """The C++ focal loss with a ``class_stats`` hook (data-parallel ranks), as one pass over the pixels: the
    hook gets the softmax sums that the pass computes, and the weights it returns make the loss and the
    gradient from the pass's moments. (The custom op takes statistics known before it runs, which would cost
    a pass of their own.)"""

    @staticmethod
    def forward(ctx, x, t, gamma, ignore_index, class_stats, with_grad):
        loss, grad = _focal_loss_cpu(x, t, gamma, ignore_index, with_grad, class_stats)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


def _checked(class_stats, K: int):
    """``class_stats`` wrapped so that its result is checked: float64 ``(R, K)`` sums and a count > 0."""
    if class_stats is None:
        return None

    def call(sums, num_pixels):
        out = class_stats(sums, num_pixels)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            raise TypeError("class_stats: must return (sums, num_pixels)")
        s, n = out
        if s.dim() != 2 or s.shape[1] != K or not s.is_floating_point():
            raise ValueError(f"class_stats: returned sums of shape {tuple(s.shape)}, expected float (R, {K})")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"class_stats: returned num_pixels={n!r}, expected an int > 0")
        return s.detach().to(device=sums.device, dtype=torch.float64).contiguous(), n

    return call
