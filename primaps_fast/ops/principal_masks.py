"""PriMaPs mask proposals: the loop of the official ``PriMaPs._get_pseudo`` before the median filter."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch
from primaps_fast.common import DEFAULT_MAX_MASKS, PrincipalMasks, scaled_float32

MAX_MASKS_LIMIT = 2**63 - 1  # an int64 in the kernels


def validate_args(features, threshold, stop_fraction, max_masks) -> torch.Tensor:
    """Checks of principal_masks (shared with pseudo_labels); returns features as (B, C, h, w)."""
    # NaN/Inf: checked here for the reference and GPU backends; the C++ kernel checks them itself
    # (for free, in its first pass) and raises the same ValueError.
    _dispatch.check_tensor(features, "features", ndim=(3, 4), floating=True)
    if features.device.type not in ("cpu", "cuda"):
        raise ValueError(f"features: tensors on {features.device.type!r} are not supported; principal_masks "
                         "runs on CPU and CUDA tensors")
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
        if not 1 <= max_masks <= MAX_MASKS_LIMIT:
            raise ValueError(f"max_masks: expected an int in [1, 2**63 - 1] or None, got {max_masks}")
    return features


def workspace_bytes(B: int, C: int, N: int, backend: str) -> int:
    """Working memory of the proposal loop for B images of C channels and N pixels: per image a float64
    C x C scatter matrix and a few copies of the features. The C++ backend works on one image per thread,
    the GPU backends on the whole batch at once; the reference never forms a C x C matrix (0)."""
    if backend == "reference":
        return 0
    if backend == "cpu":
        cp, npad = -(-C // 4) * 4, -(-N // 16) * 16
        per_image = 8 * cp * cp + 4 * cp * npad + 4 * C * N + 2 * cp * (N + 16) + 48 * N + 300 * C
        return min(B, _dispatch.num_threads()) * per_image + 16 * B * N
    return B * (16 * C * C + 24 * C * N + 400 * C + 32 * N)  # S and A, shifted / normalised features


def check_memory(features: torch.Tensor, backend: str) -> None:
    """A clear ValueError, before anything is allocated, when the input needs more memory than the
    device has (e.g. C = 100000 channels: an 80 GB covariance per image, even for 2 pixels)."""
    B, C, h, w = features.shape
    _dispatch.check_memory(
        workspace_bytes(B, C, h * w, backend), "features",
        f"the proposals of {B} image(s) of {C} channels x {h * w} pixels on the {backend!r} backend (a float64 "
        f"{C} x {C} covariance per image, {8 * C * C / 2**30:.1f} GiB each; reduce the channels, e.g. by PCA, "
        "or the batch size)", features.device)


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
                    max_masks: int | None = DEFAULT_MAX_MASKS, backend: str | None = None) -> PrincipalMasks:
    """PriMaPs mask proposals of a batch of feature maps.

    Args:
        features: float tensor (B, C, h, w), or (C, h, w) for B = 1, finite, on the CPU or a CUDA
            device. Each image is first multiplied by a power of two that brings its largest |value|
            into [0.5, 1) (exact: the result does not depend on the scale of the features), then
            computed in float32.
        threshold: psi of the paper, in (0, 1]: a pixel joins a proposal when its cosine to the anchor
            is at least ``threshold`` times the largest one.
        stop_fraction: in (0, 1]: stop once this fraction of the pixels belongs to a proposal.
        max_masks: cap on the number of proposals per image, an int in [1, 2**63 - 1], or None for no
            cap. The default, 254, keeps mask ids 1..254 and the background / ignore id 255 in one
            uint8 label map (``pseudo_labels``' default ``ignore_index=255`` never clashes), and is far
            above what real images give (a handful of proposals per 40x40 feature map); it bounds
            degenerate inputs such as pure-noise features, where every proposal is one pixel (about
            1500 proposals at 40x40 without a cap).
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

    Deliberate differences and degenerate cases (identical in every backend): the power-of-two scaling
    above (the official ``F.normalize`` eps of 1e-12 is then relative to the image's largest value, not
    absolute, for features whose norms are below it); no empty proposal is ever
    appended (the loop stops instead; the official loop appends empty/NaN ones until ``remaining`` has
    not changed for 3 iterations); when the covariance of the remaining features is ~0 (trace <= 1e-10
    times their mean squared norm: identical features, one pixel, all zero) ``v`` is their normalised
    mean; when ``v`` is orthogonal to every remaining feature (e.g. all zero) the loop stops. Zero-norm
    pixels never join a proposal.

    Backends: "reference" is the official algorithm with ``pca_lowrank`` (randomized, per-image Python
    loop). The others form the covariance once per image (float64 accumulation) and downdate it as
    pixels leave, and iterate ``v`` from the previous proposal's vectors to a residual
    ``||A v - theta v|| <= 1e-7 theta``: "cpu" one image per thread with a locally optimal block method
    (LOBPCG); "triton" the whole batch together, round by round, and "cuda" in one launch (a thread block
    per image runs its whole loop), both with Chebyshev-filtered subspace iteration.

    Memory: the C++ and GPU backends hold a float64 C x C matrix per image (per thread on the CPU, per
    batch image on the GPU); an input that needs more than the device's memory is refused up front.
    """
    features = validate_args(features, threshold, stop_fraction, max_masks)
    backend = _dispatch.choose_backend(backend, features)
    check_memory(features, backend)
    if backend != "cpu":
        _dispatch.check_tensor(features, "features", finite=True)
    if max_masks is not None:  # more proposals than pixels cannot happen
        max_masks = min(max_masks, features.shape[2] * features.shape[3])
    if backend == "reference":
        return _dispatch.reference("principal_masks")(features, threshold=threshold,
                                                       stop_fraction=stop_fraction, max_masks=max_masks)
    owner, value, counts = _dispatch.kernel("principal_masks", backend)(features, float(threshold),
                                                                         float(stop_fraction), max_masks)
    if owner.device.type != "cpu":
        return PrincipalMasks(stack_proposals(owner, value, counts), counts)
    masks = torch.empty(owner.shape[0], max(1, int(counts.max())), *owner.shape[1:], dtype=torch.float32)
    _dispatch.cpp().stack_proposals(owner.numpy(), value.numpy(), masks.numpy())
    return PrincipalMasks(masks, counts)


def principal_masks_cpu(features, threshold=0.4, stop_fraction=0.95, max_masks=None):
    """C++ kernel call on a (B, C, h, w) tensor: owner (B, h, w) int64, value (B, h, w) float32, counts.
    The kernel scales float32 images by their power of two itself; float64 ones are scaled before the
    cast (which could otherwise overflow or underflow)."""
    x = features.detach()
    x = scaled_float32(x) if x.dtype == torch.float64 else x.to(dtype=torch.float32)
    x = x.contiguous()
    B, _, h, w = x.shape
    owner = torch.empty(B, h, w, dtype=torch.int64)
    value = torch.empty(B, h, w, dtype=torch.float32)
    counts = torch.empty(B, dtype=torch.int64)
    _dispatch.cpp().principal_masks(x.numpy(), owner.numpy(), value.numpy(), counts.numpy(),
                                    float(threshold), float(stop_fraction),
                                    -1 if max_masks is None else int(max_masks), _dispatch.num_threads())
    return owner, value, counts
