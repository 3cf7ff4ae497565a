"""Reference PriMaPs mask proposals: a plain-PyTorch port of the proposal loop of the official
``PriMaPs._get_pseudo`` (github visinf/primaps, ``primaps_modules/primaps.py``), one image at a time.

It is the oracle for the tests and the baseline for the benchmarks. Deliberate differences from the
official code (docs/design.md, "Deliberate differences"), shared by every backend:

* **Sign of the principal direction.** ``torch.pca_lowrank`` returns ``v`` with an arbitrary sign, and
  the sign decides which end of the axis gives the anchor. We orient ``v`` so that the remaining pixel
  with the largest ``|v . f^_p|`` (the first one in row-major order on exact ties) has a positive
  cosine; that pixel is then the anchor, and it is always a remaining pixel.
* **No empty proposals.** The official loop can append empty (0/0 = NaN) proposals and only stops once
  ``remaining`` has not changed for three iterations. A non-empty proposal always removes pixels, so that
  early stop only ever fires after empty proposals; we stop instead of appending one.
* **Degenerate covariance.** When the covariance of the remaining features is ~0 (its trace is at most
  ``DEGENERATE_RTOL`` times the mean squared norm of those features, e.g. all remaining features
  identical, a single remaining pixel, or all of them zero), ``v`` is the normalised mean of the
  remaining features (``pca_lowrank`` would return an arbitrary vector there). When ``v`` is orthogonal
  to every remaining normalised feature (in particular when all remaining features are zero) the loop
  stops. Zero-norm features normalise to zero (``F.normalize``, eps 1e-12): they never join a proposal
  and never give NaN.
* **Scale.** Each image is multiplied by the power of two that brings its largest ``|value|`` into
  [0.5, 1) before anything else: exact, so nothing changes for ordinary features, but the proposals no
  longer depend on the scale (the official ``F.normalize`` eps of 1e-12 and float32 underflow made tiny
  features, e.g. ``f * 1e-35``, behave differently, and huge ones overflowed).
* **At most ``DEFAULT_MAX_MASKS`` (254) proposals per image** by default (the official loop has no cap).
  Mask ids 1..254 and the ignore id 255 then fit one uint8 label map; real images give a handful.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from primaps_fast.common import DEFAULT_MAX_MASKS, DEGENERATE_RTOL, PrincipalMasks, scaled_float32


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


def proposals_one(feat: torch.Tensor, threshold: float, stop_fraction: float, max_masks):
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
    if features.dim() == 3:
        features = features[None]
    device = features.device
    feats = scaled_float32(features.detach().cpu())
    B, _, h, w = feats.shape
    per_image = [proposals_one(f, threshold, stop_fraction, max_masks) for f in feats]
    counts = torch.tensor([len(p) for p in per_image], dtype=torch.int64)
    M = max(1, int(counts.max()))
    masks = torch.zeros(B, M, h, w, dtype=torch.float32)
    for b, props in enumerate(per_image):
        for i, p in enumerate(props):
            masks[b, i] = p
    return PrincipalMasks(masks.to(device), counts.to(device))
