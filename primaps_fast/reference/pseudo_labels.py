"""Reference PriMaPs pseudo labels: a plain-PyTorch port of the official ``PriMaPs._get_pseudo(img, feat,
zeros)`` (github visinf/primaps, ``primaps_modules/primaps.py``), one image at a time.

Deliberate differences from the official code (docs/design.md), besides those of
``reference/principal_masks.py`` and ``reference/median_filter.py``:

* **Background with one proposal.** The official ``squeeze()`` turns a single proposal into an
  ``(h, w)`` map, and ``sum(dim=0)`` then sums over rows instead of over masks. We always sum over masks.
  The mean of the non-zero filtered values is taken as 0 when there is none (the official gives NaN).
* **Image for the CRF.** ``primaps_fast.common.crf_image``: clamped to [0, 255] before the uint8 cast
  (the official cast wraps). Channels enter the CRF in BGR order, as in the official code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_fast.common import DEFAULT_MAX_MASKS, crf_image, scaled_float32
from primaps_fast.reference.dense_crf import dense_crf
from primaps_fast.reference.median_filter import median_filter
from primaps_fast.reference.principal_masks import proposals_one


def mask_logits(proposals: torch.Tensor) -> torch.Tensor:
    """Official post-processing of one image's proposals (m, h, w) -> log-probabilities (m + 1, h, w):
    median filter, x10, clamp to [0, 1], background first, ``log_softmax`` over masks."""
    p = (median_filter(proposals) * 10).clamp(0, 1)
    nonzero = p[p != 0]
    level = nonzero.mean() if nonzero.numel() else torch.zeros((), dtype=p.dtype)
    bg = (level - p.sum(dim=0)).clamp(0, 1)
    return F.log_softmax(torch.cat([bg[None], p], dim=0), dim=0)


def pseudo_labels(images, features, *, threshold=0.4, ignore_index=255, crf=True, crf_iterations=10):
    """Reference of :func:`primaps_fast.pseudo_labels`: the official ``_get_pseudo(img, feat, zeros)``
    per image (module docstring lists the deliberate differences). Returns int64 (B, H, W)."""
    B, _, H, W = images.shape
    per_image = [proposals_one(f, threshold, 0.95, DEFAULT_MAX_MASKS)
                 for f in scaled_float32(features.detach().cpu())]
    max_count = max(len(p) for p in per_image)
    if 1 <= ignore_index <= max_count:
        raise ValueError(f"ignore_index: {ignore_index} clashes with the mask ids 1..{max_count}")
    out = torch.empty(B, H, W, dtype=torch.int64)
    for b, props in enumerate(per_image):
        if props:
            logits = mask_logits(torch.stack(props))
        else:  # no proposal at all (all features zero): background only
            logits = torch.zeros(1, *features.shape[-2:])
        if crf:
            bgr = crf_image(images[b].detach().cpu()).flip(0)
            q = dense_crf(bgr[None], logits[None], iterations=crf_iterations)[0]
            lab = q.argmax(0)
        else:
            up = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            lab = up.argmax(0)
        lab = lab.to(torch.int64)
        lab[lab == 0] = ignore_index
        out[b] = lab
    return out.to(images.device)
