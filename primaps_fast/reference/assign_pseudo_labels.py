"""Reference PriMaPs-EM E-step: a plain-PyTorch port of the official ``training_step`` pseudo-label loop
(github visinf/primaps, ``train.py``: per-pixel argmax, then ``cls[fill].mode()`` per PriMaPs mask).

It takes the class scores at feature resolution ``(B, K, h, w)`` and upsamples them with
``F.interpolate(mode="bilinear", align_corners=False)`` to the label size, as the official code does
with the features before its 1x1 conv head (a 1x1 conv commutes with bilinear upsampling, docs/design.md).
Slow and literal on purpose: it is the oracle for the tests and the benchmark baseline.

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
