"""Reference PriMaPs pseudo labels: a plain-PyTorch port of the official ``PriMaPs._get_pseudo``
(github visinf/primaps, ``primaps_modules/primaps.py`` and ``median_pool.py``), one image at a time.

It is the oracle for the tests and the baseline for the benchmarks. Deliberate differences from the
official code (DESIGN.md section 2), shared by every backend:

* **Sign of the principal direction.** ``torch.pca_lowrank`` returns ``v`` with an arbitrary sign, and
  the sign decides which end of the axis gives the anchor. We orient ``v`` so that the remaining pixel
  with the largest ``|v . f^_p|`` (the first one in row-major order on exact ties) has a positive
  cosine; that pixel is then the anchor, and it is always a remaining pixel.
* **No empty proposals.** The official loop can append empty (0/0 = NaN) proposals and only stops once
  ``remaining`` has not changed for three iterations. A non-empty proposal always removes pixels, so that
  early stop only ever fires after empty proposals; we stop instead of appending one.
* **Degenerate covariance.** When the covariance of the remaining features is ~0 (its trace is at most
  ``1e-10`` times the mean squared norm of those features, e.g. all remaining features identical, a
  single remaining pixel, or all of them zero), ``v`` is the normalised mean of the remaining features
  (``pca_lowrank`` would return an arbitrary vector there). When ``v`` is orthogonal to every remaining
  normalised feature (in particular when all remaining features are zero) the loop stops. Zero-norm
  features normalise to zero (``F.normalize``, eps 1e-12): they never join a proposal and never give NaN.
* **Background with one proposal.** The official ``squeeze()`` turns a single proposal into an
  ``(h, w)`` map, and ``sum(dim=0)`` then sums over rows instead of over masks. We always sum over masks.
  The mean of the non-zero filtered values is taken as 0 when there is none (the official gives NaN).
* **Image for the CRF.** The official ``to_pil_image(unnorm(x))`` multiplies by 255 and casts to uint8,
  which wraps values outside [0, 255]; we clamp to [0, 255] first, then truncate. uint8 RGB images are
  used as they are. Channels enter the CRF in BGR order, as in the official code.
* **Scale.** Each image is multiplied by the power of two that brings its largest ``|value|`` into
  [0.5, 1) before anything else: exact, so nothing changes for ordinary features, but the proposals no
  longer depend on the scale (the official ``F.normalize`` eps of 1e-12 and float32 underflow made tiny
  features, e.g. ``f * 1e-35``, behave differently, and huge ones overflowed).
* **At most 254 proposals per image** by default (``DEFAULT_MAX_MASKS``; the official loop has no cap).
  Mask ids 1..254 and the ignore id 255 then fit one uint8 label map; real images give a handful.
* **Median filter on 1-pixel axes.** Reflect padding needs at least 2 pixels; on an axis of length 1 the
  pixel itself is used as the padding (replicate).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Degenerate-covariance test: trace(cov) <= DEGENERATE_RTOL * mean ||f||^2 (both in float64).
DEGENERATE_RTOL = 1e-10

# Default cap on the proposals per image (module docstring).
DEFAULT_MAX_MASKS = 254


def _scaled_float32(feat: torch.Tensor) -> torch.Tensor:
    """``feat`` (one image) times ``2**-e`` with its largest ``|value|`` ``* 2**-e`` in [0.5, 1), as
    float32: exact in float64 (two factors, for exponents beyond float64's range of powers of two), then
    rounded once."""
    e = math.frexp(float(feat.detach().abs().max()))[1]  # 0 for an all-zero image
    return (feat.double() * 2.0 ** -(e // 2) * 2.0 ** -(e - e // 2)).float()


def _principal_direction(x: torch.Tensor) -> torch.Tensor:
    """Top principal direction (C,) of the rows of ``x`` (n, C): official ``pca_lowrank(q=3, niter=100)``,
    or the normalised mean when the covariance is degenerate (module docstring)."""
    xd = x.double()
    mean = xd.mean(0)
    trace = (xd - mean).pow(2).sum() / xd.shape[0]
    mean_sq = xd.pow(2).sum() / xd.shape[0]
    if trace <= DEGENERATE_RTOL * mean_sq:
        return F.normalize(mean.float(), dim=0)
    q = min(3, x.shape[0], x.shape[1])
    _, _, v = torch.pca_lowrank(x, q=q, niter=100)
    return v[:, 0]


def _proposals_one(feat: torch.Tensor, threshold: float, stop_fraction: float, max_masks):
    """The proposal loop of ``PriMaPs._get_pseudo`` for one image ``feat`` (C, h, w): list of (h, w)."""
    C, h, w = feat.shape
    fn = F.normalize(feat, dim=0)
    remaining = torch.ones(h, w, dtype=torch.bool)
    stop = torch.tensor(stop_fraction, dtype=torch.float32)
    proposals = []
    while (~remaining).sum() / remaining.numel() < stop:
        if max_masks is not None and len(proposals) >= max_masks:
            break
        v = _principal_direction(feat[:, remaining].T)
        cos = torch.einsum("c,cij->ij", v, fn)
        cos[~remaining] = 0
        # Sign fix: the remaining pixel with the largest |cos| (first in row-major order) is the anchor.
        flat = cos.abs().flatten()
        if flat.max() == 0:  # v orthogonal to every remaining feature: nothing to propose
            break
        anchor_idx = int(torch.nonzero(flat == flat.max())[0, 0])
        anchor = fn.flatten(1)[:, anchor_idx]
        sim = torch.einsum("c,cij->ij", anchor, fn)
        sim[~remaining] = 0
        if sim.max() <= 0:  # anchor of (sub)denormal norm: its self-similarity underflows
            break
        sim[sim < threshold * sim.max()] = 0
        sim = sim / sim.max()
        proposals.append(sim)
        remaining &= ~(sim > 0)
    return proposals


def principal_masks(features, *, threshold=0.4, stop_fraction=0.95, max_masks=DEFAULT_MAX_MASKS):
    """Reference of :func:`primaps_fast.principal_masks` (same arguments and result; no validation).

    ``features``: float (B, C, h, w) or (C, h, w). Uses ``torch.pca_lowrank(q=3, niter=100)`` as the
    official code does, which is randomized (global torch RNG): on inputs whose top eigenvalue is not
    well separated it is not converged, and the result varies between calls.
    """
    from primaps_fast.ops.principal_masks import PrincipalMasks

    if features.dim() == 3:
        features = features[None]
    device = features.device
    feats = torch.stack([_scaled_float32(f.detach().cpu()) for f in features])
    B, _, h, w = feats.shape
    per_image = [_proposals_one(f, threshold, stop_fraction, max_masks) for f in feats]
    counts = torch.tensor([len(p) for p in per_image], dtype=torch.int64)
    M = max(1, int(counts.max()))
    masks = torch.zeros(B, M, h, w, dtype=torch.float32)
    for b, props in enumerate(per_image):
        for i, p in enumerate(props):
            masks[b, i] = p
    return PrincipalMasks(masks.to(device), counts.to(device))


def median_filter(masks):
    """Reference of :func:`primaps_fast.median_filter`: the official ``MedianPool2d(3, 1, 1)`` (reflect
    padding, lower median of the 9 values) on every channel of ``masks`` (..., h, w). Axes of length 1
    are padded with the pixel itself (reflect needs 2 pixels)."""
    shape = masks.shape
    x = masks.reshape(1, -1, shape[-2], shape[-1]).float()
    # pad one axis at a time so a length-1 axis can fall back to replicate
    x = F.pad(x, (0, 0, 1, 1), mode="reflect" if shape[-2] > 1 else "replicate")
    x = F.pad(x, (1, 1, 0, 0), mode="reflect" if shape[-1] > 1 else "replicate")
    x = x.unfold(2, 3, 1).unfold(3, 3, 1)
    x = x.contiguous().view(x.shape[:4] + (-1,)).median(dim=-1)[0]
    return x.reshape(shape)


def mask_logits(proposals: torch.Tensor) -> torch.Tensor:
    """Official post-processing of one image's proposals (m, h, w) -> log-probabilities (m + 1, h, w):
    median filter, x10, clamp to [0, 1], background first, ``log_softmax`` over masks."""
    p = (median_filter(proposals) * 10).clamp(0, 1)
    nonzero = p[p != 0]
    level = nonzero.mean() if nonzero.numel() else torch.zeros((), dtype=p.dtype)
    bg = (level - p.sum(dim=0)).clamp(0, 1)
    return F.log_softmax(torch.cat([bg[None], p], dim=0), dim=0)


def crf_image(image: torch.Tensor) -> torch.Tensor:
    """The uint8 image (3, H, W) the official code hands to the CRF, in RGB order: float images are
    un-normalised with the ImageNet mean/std, times 255, clamped to [0, 255] and truncated."""
    if image.dtype == torch.uint8:
        return image
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    x = (image.float() * std + mean) * 255
    return x.clamp(0, 255).to(torch.uint8)


def pseudo_labels(images, features, *, threshold=0.4, ignore_index=255, crf=True, crf_iterations=10):
    """Reference of :func:`primaps_fast.pseudo_labels`: the official ``_get_pseudo(img, feat, zeros)``
    per image (module docstring lists the deliberate differences). Returns int64 (B, H, W)."""
    B, _, H, W = images.shape
    per_image = [_proposals_one(_scaled_float32(f.detach().cpu()), threshold, 0.95, DEFAULT_MAX_MASKS)
                 for f in features]
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
            from primaps_fast.reference.crf import dense_crf

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
