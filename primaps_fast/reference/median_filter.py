"""Reference 3x3 median filter: the official ``MedianPool2d(kernel_size=3, stride=1, padding=1)``
(github visinf/primaps, ``primaps_modules/median_pool.py``) in plain PyTorch.

Deliberate difference (docs/design.md): reflect padding needs at least 2 pixels; on an axis of length 1
the pixel itself is used as the padding (replicate).
"""
from __future__ import annotations

import torch.nn.functional as F


def median_filter(masks):
    """Reference of :func:`primaps_fast.median_filter`: reflect padding, lower median of the 9 values
    (``torch.median``) on every ``(h, w)`` plane of ``masks`` (..., h, w); float32 result."""
    shape = masks.shape
    x = masks.reshape(1, -1, shape[-2], shape[-1]).float()
    # pad one axis at a time so a length-1 axis can fall back to replicate
    x = F.pad(x, (0, 0, 1, 1), mode="reflect" if shape[-2] > 1 else "replicate")
    x = F.pad(x, (1, 1, 0, 0), mode="reflect" if shape[-1] > 1 else "replicate")
    x = x.unfold(2, 3, 1).unfold(3, 3, 1)
    x = x.contiguous().view(x.shape[:4] + (-1,)).median(dim=-1)[0]
    return x.reshape(shape)
