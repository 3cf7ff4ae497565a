"""Reference PriMaPs-EM E-step labels and M-step loss: a plain-PyTorch port of the official
``training_step`` pseudo-label loop and ``FocalLoss`` (github visinf/primaps, ``train.py``).

Both take the class scores at feature resolution ``(B, K, h, w)`` and upsample them with
``F.interpolate(mode="bilinear", align_corners=False)`` to the label size, as the official code does
with the features before its 1x1 conv head (a 1x1 conv commutes with bilinear upsampling, DESIGN.md
section 3). Slow and literal on purpose: it is the oracle for the tests and the benchmark baseline.

Ties: the official ``cls[fill].mode()`` leaves the winner among classes with equal counts to
``torch.mode``'s implementation, which is not documented; on CPU it returns the smallest tied value
(``tests/test_assign_pseudo_labels.py`` checks the reference against the literal ``torch.mode`` loop).
The API fixes this rule (smallest class id) for every backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def assign_pseudo_labels(logits: torch.Tensor, mask_ids: torch.Tensor, *,
                         ignore_index: int = 255) -> torch.Tensor:
    """Majority class of every pseudo mask (the official E-step).

    Args:
        logits: float ``(B, K, h, w)`` class scores at feature resolution.
        mask_ids: integer ``(B, H, W)`` mask id of every pixel; ``ignore_index`` marks pixels in no mask.
        ignore_index: the id of unassigned pixels, also written to them in the output.

    Returns:
        int64 ``(B, H, W)``: for each image and each mask id ``m != ignore_index``, the class that wins
        the most pixels of ``argmax_k`` of the bilinearly upsampled logits inside the mask (ties: the
        smallest class id, as ``torch.mode`` on CPU), written to every pixel
        of the mask; ``ignore_index`` elsewhere.
    """
    size = tuple(mask_ids.shape[-2:])
    up = F.interpolate(logits.detach().float(), size, mode="bilinear", align_corners=False)
    cls = up.argmax(1)
    num_classes = logits.shape[1]
    out = []
    for c, msk in zip(cls, mask_ids.long()):
        pseudo = torch.full_like(msk, ignore_index)
        ids = msk.unique()
        for m in ids[ids != ignore_index]:
            fill = (pseudo == ignore_index) & (msk == m)
            votes = c[fill]
            votes = votes[votes != ignore_index]
            if votes.numel() == 0:
                continue
            counts = torch.bincount(votes, minlength=num_classes)
            pseudo[fill] = int(counts.argmax())  # first maximum: the smallest class id
        out.append(pseudo)
    return torch.stack(out)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               ignore_index: int = 255) -> torch.Tensor:
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
    """
    up = F.interpolate(logits, tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
    k = up.shape[1]
    mean_conf = up.detach().softmax(1).permute(1, 0, 2, 3).reshape(k, -1).mean(dim=1)
    weight = (1 - mean_conf) ** gamma
    return F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index,
                           reduction="none").mean()
