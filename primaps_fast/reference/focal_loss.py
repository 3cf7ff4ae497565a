"""Reference PriMaPs-EM M-step loss: a plain-PyTorch port of the official ``FocalLoss`` (github
visinf/primaps, ``train.py``) applied to the bilinearly upsampled class scores.

It takes the class scores at feature resolution ``(B, K, h, w)`` and upsamples them with
``F.interpolate(mode="bilinear", align_corners=False)`` to the label size, as the official code does
with the features before its 1x1 conv head (a 1x1 conv commutes with bilinear upsampling, docs/design.md).
Slow and literal on purpose: it is the oracle for the tests and the benchmark baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               ignore_index: int = 255, class_stats=None) -> torch.Tensor:
    """The official ``FocalLoss`` on the bilinearly upsampled logits (differentiable in ``logits``).

    Args:
        logits: float ``(B, K, h, w)`` class scores at feature resolution.
        target: int64 ``(B, H, W)`` class ids, ``ignore_index`` for unlabelled pixels.
        gamma: focal exponent of the class weights.
        ignore_index: target value whose pixels contribute 0 (but still count in the mean).

    Returns:
        scalar: ``mean over all B*H*W pixels of w_t * CE(up, t)`` (0 for ignored pixels), where
        ``up = F.interpolate(logits, (H, W), bilinear, align_corners=False)`` and the class weights
        ``w_k = (1 - mean softmax(up)_k over all pixels) ** gamma`` are detached.
        With ``class_stats`` (a batch split across calls, as ``primaps_fast.focal_loss``'s): the per-image
        float64 sums of ``softmax(up)`` and ``B*H*W`` go through it, the weights come from the returned
        sums and count, and the sum of ``w_t * CE`` over this call's pixels is divided by the count.
    """
    up = F.interpolate(logits, tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    if class_stats is not None:
        sums, n = class_stats(up.detach().softmax(1).double().sum((2, 3)), target.numel())
        weight = ((1 - sums.sum(0) / n) ** gamma).to(up.dtype)
        return F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index,
                               reduction="none").sum() / n
    k = up.shape[1]
    mean_conf = up.detach().softmax(1).permute(1, 0, 2, 3).reshape(k, -1).mean(dim=1)
    weight = (1 - mean_conf) ** gamma
    return F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index,
                           reduction="none").mean()
