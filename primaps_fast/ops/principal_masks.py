"""PriMaPs mask proposals: the loop of the official ``PriMaPs._get_pseudo`` before the median filter."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch
from primaps_fast.common import MAX_ABS, PrincipalMasks


def validate_args(features, threshold, stop_fraction, max_masks) -> torch.Tensor:
    """Checks of principal_masks (shared with pseudo_labels); returns features as (B, C, h, w)."""
    # NaN/Inf: checked here for the reference and Triton backends; the C++ kernel checks them itself
    # (for free, in its first pass) and raises the same ValueError.
    _dispatch.check_tensor(features, "features", ndim=(3, 4), floating=True)
    if features.dim() == 3:
        features = features[None]
    if min(features.shape[1:]) == 0:
        raise ValueError(f"features: empty channel or spatial size in shape {tuple(features.shape)}")
    for name, val in (("threshold", threshold), ("stop_fraction", stop_fraction)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(val).__name__}")
        if not 0.0 < float(val) <= 1.0:
            raise ValueError(f"{name}: expected a value in (0, 1], got {val}")
    if max_masks is not None:
        if isinstance(max_masks, bool) or not isinstance(max_masks, int):
            raise TypeError(f"max_masks: expected an int or None, got {type(max_masks).__name__}")
        if max_masks < 1:
            raise ValueError(f"max_masks: expected >= 1, got {max_masks}")
    return features


def stack_proposals(owner: torch.Tensor, value: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Disjoint proposals as owner (B, h, w) int (index or -1) and value (B, h, w) float32 ->
    masks (B, M, h, w) float32 with M = max(1, max(counts)) (torch version, for the Triton backend)."""
    B, h, w = owner.shape
    M = max(1, int(counts.max())) if counts.numel() else 1
    masks = torch.zeros(B, M, h, w, dtype=torch.float32, device=owner.device)
    inside = owner >= 0
    masks.scatter_(1, owner.clamp_min(0)[:, None], torch.where(inside, value, 0.0)[:, None])
    return masks


def principal_masks(features: torch.Tensor, *, threshold: float = 0.4, stop_fraction: float = 0.95,
                    max_masks: int | None = None, backend: str | None = None) -> PrincipalMasks:
    """PriMaPs mask proposals of a batch of feature maps.

    Args:
        features: float tensor (B, C, h, w), or (C, h, w) for B = 1; finite, |values| <= 1e15 (beyond,
            float32 sums of squares overflow). Computed in float32.
        threshold: psi of the paper, in (0, 1]: a pixel joins a proposal when its cosine to the anchor
            is at least ``threshold`` times the largest one.
        stop_fraction: in (0, 1]: stop once this fraction of the pixels belongs to a proposal.
        max_masks: optional cap on the number of proposals per image (>= 1).
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        ``PrincipalMasks(masks, counts)``: ``masks`` float32 (B, M, h, w) with ``M = max(counts)``
        (at least 1: an image whose features are all zero gets no proposal, and a batch of such images
        gives one all-zero row), ``masks[b, i]`` the i-th proposal of image b in extraction order, values
        in [0, 1], rows ``i >= counts[b]`` zero; ``counts`` int64 (B,). Both on the input's device.
        Proposals are disjoint; every one is non-empty and contains its anchor with value 1.

    Per image (official ``PriMaPs._get_pseudo``), with ``remaining`` = all pixels, while the fraction of
    removed pixels is below ``stop_fraction`` (compared in float32, as the official code):

    1. ``v`` = top eigenvector of the covariance of the remaining features (the official code takes the
       first right singular vector of ``torch.pca_lowrank(q=3, niter=100)``, which is centred);
    2. ``cos_p = v . f_p / max(|f_p|, 1e-12)`` on remaining pixels, 0 elsewhere; the anchor is the first
       pixel (row-major) with the largest ``|cos_p|``, and ``v`` is oriented so that its cosine is
       positive (deliberate fix: the official sign is arbitrary);
    3. ``sim_p`` = cosine of ``f_p`` to the anchor's normalised feature on remaining pixels, 0 elsewhere;
       ``sim_p = 0`` where ``sim_p < threshold * max(sim)``, then ``sim /= max(sim)``; that is the proposal,
       and its support leaves ``remaining``.

    Deliberate differences and degenerate cases (identical in every backend): no empty proposal is ever
    appended (the loop stops instead; the official loop appends empty/NaN ones until ``remaining`` has
    not changed for 3 iterations); when the covariance of the remaining features is ~0 (trace <= 1e-10
    times their mean squared norm: identical features, one pixel, all zero) ``v`` is their normalised
    mean; when ``v`` is orthogonal to every remaining feature (e.g. all zero) the loop stops. Zero-norm
    pixels never join a proposal.

    Backends: "reference" is the official algorithm with ``pca_lowrank`` (randomized, per-image Python
    loop); "cpu" forms the covariance once per image (SYRK, float64 accumulation) and downdates it as
    pixels leave, and finds ``v`` by block subspace iteration to a 1e-7 relative residual; "triton"
    advances the whole batch together: covariances by one batched float64 matmul per step, ``v`` from
    ``torch.linalg.eigh``, and Triton kernels for the per-pixel passes.
    """
    features = validate_args(features, threshold, stop_fraction, max_masks)
    backend = _dispatch.choose_backend(backend, features)
    if backend != "cpu":
        _dispatch.check_tensor(features, "features", finite=True)
        if float(features.abs().max()) > MAX_ABS:
            raise ValueError(f"features: |value| above {MAX_ABS:g} (float32 sums of squares would overflow)")
    if backend == "reference":
        return _dispatch.reference("principal_masks")(features, threshold=threshold,
                                                       stop_fraction=stop_fraction, max_masks=max_masks)
    if backend == "cuda":
        raise _dispatch.cuda_not_wired("principal_masks")
    if backend == "triton":
        from primaps_fast.triton.principal_masks import principal_masks_triton

        owner, value, counts = principal_masks_triton(
            features.float().contiguous(), float(threshold), float(stop_fraction), max_masks)
        return PrincipalMasks(stack_proposals(owner, value, counts), counts)
    owner, value, counts = principal_masks_cpu(features, threshold, stop_fraction, max_masks)
    masks = torch.empty(owner.shape[0], max(1, int(counts.max())), *owner.shape[1:], dtype=torch.float32)
    _dispatch.cpp().stack_proposals(owner.numpy(), value.numpy(), masks.numpy())
    return PrincipalMasks(masks, counts)


def principal_masks_cpu(features, threshold=0.4, stop_fraction=0.95, max_masks=None):
    """C++ kernel call on a (B, C, h, w) tensor: owner (B, h, w) int64, value (B, h, w) float32, counts."""
    x = features.detach().to(dtype=torch.float32).contiguous()
    B, _, h, w = x.shape
    owner = torch.empty(B, h, w, dtype=torch.int64)
    value = torch.empty(B, h, w, dtype=torch.float32)
    counts = torch.empty(B, dtype=torch.int64)
    _dispatch.cpp().principal_masks(x.numpy(), owner.numpy(), value.numpy(), counts.numpy(),
                                    float(threshold), float(stop_fraction),
                                    -1 if max_masks is None else int(max_masks), _dispatch.num_threads())
    return owner, value, counts
