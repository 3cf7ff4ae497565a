"""PriMaPs pseudo labels: the official ``PriMaPs._get_pseudo(img, feat, zeros)`` for a whole batch."""
from __future__ import annotations

import torch

from primaps_fast import _dispatch
from primaps_fast.common import crf_image
from primaps_fast.ops.dense_crf import MAX_ITERATIONS
from primaps_fast.ops.principal_masks import principal_masks, validate_args


def _check_args(images, features, threshold, ignore_index, crf_iterations):
    _dispatch.check_tensor(images, "images", ndim=4)
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images: expected uint8 RGB or float normalized images, got {images.dtype}")
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.is_floating_point():
        _dispatch.check_tensor(images, "images", finite=True)
    # NaN/Inf in features: principal_masks rejects them (the C++ kernel in its first pass, for free)
    _dispatch.check_tensor(features, "features", ndim=4, floating=True)
    validate_args(features, threshold, 0.95, None)
    if images.device != features.device:
        raise ValueError(f"images/features: on different devices ({images.device} vs {features.device})")
    if images.shape[0] != features.shape[0]:
        raise ValueError(f"images/features: batch sizes differ ({images.shape[0]} vs {features.shape[0]})")
    (H, W), (h, w) = images.shape[-2:], features.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"images/features: image size {(H, W)} is not a multiple of the feature grid {(h, w)}")
    _dispatch.check_int(ignore_index, "ignore_index")
    _dispatch.check_int(crf_iterations, "crf_iterations", lo=1, hi=MAX_ITERATIONS)


def check_ignore_index(ignore_index: int, max_count: int) -> None:
    """Mask ids are 1..M; an ignore_index among them would merge a mask with the background."""
    if 1 <= ignore_index <= max_count:
        raise ValueError(f"ignore_index: {ignore_index} clashes with the mask ids 1..{max_count} of this "
                         f"batch; use 0, a negative value or a value above {max_count} (e.g. 255)")


def crf_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) images in BGR order, as the official CRF sees them: float images are
    un-normalised with the ImageNet mean/std, times 255, clamped to [0, 255] (the official cast wraps
    instead) and truncated; uint8 RGB images are used as they are."""
    return crf_image(images.detach()).flip(1).contiguous()


def pseudo_labels(images: torch.Tensor, features: torch.Tensor, *, threshold: float = 0.4,
                  ignore_index: int = 255, crf: bool = True, crf_iterations: int = 10,
                  backend: str | None = None) -> torch.Tensor:
    """PriMaPs pseudo labels of a batch (official ``PriMaPs._get_pseudo(img, feat, zeros)`` per image).

    Args:
        images: ``(B, 3, H, W)`` float images normalised with the ImageNet mean/std (the official
            transforms), or uint8 RGB. Only the CRF looks at them.
        features: float ``(B, C, h, w)``, finite; ``H`` and ``W`` must be multiples of ``h`` and ``w``.
        threshold: psi of :func:`primaps_fast.principal_masks`.
        ignore_index: label of background pixels, an int64; must not be one of the mask ids ``1..M``.
        crf: refine with the dense CRF (pydensecrf parameters of the official code) or not.
        crf_iterations: mean-field iterations, in ``[1, 1000]`` (``dense_crf.MAX_ITERATIONS``).
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        int64 ``(B, H, W)``: mask ids ``1..counts[b]`` and ``ignore_index`` for the background.

    Per image: the proposals of :func:`principal_masks` (stop fraction 0.95); 3x3 median filter with
    reflect padding per proposal, x10, clamp to [0, 1]; background ``clamp(mean(non-zero values) -
    sum of masks, 0, 1)`` stacked first; ``log_softmax`` over masks; bilinear upsampling
    (``align_corners=False``) to ``(H, W)``; with ``crf=True`` the dense CRF on the uint8 image in BGR
    order (softmax of the upsampled log-probabilities as the unary), else the arg-max directly (first
    maximum on ties); id 0 becomes ``ignore_index``. Images with different proposal counts keep their
    own label count.

    Deliberate differences from the official code (also in ``primaps_fast.reference``): those of
    :func:`principal_masks`; the background sums over masks also when there is a single proposal (the
    official ``squeeze()`` makes it sum over rows); no NaN when no value is non-zero (the mean is taken
    as 0); float images are clamped to [0, 255] before the uint8 cast (the official wraps).
    """
    _check_args(images, features, threshold, ignore_index, crf_iterations)
    backend = _dispatch.choose_backend(backend, images, features)
    (H, W) = images.shape[-2:]
    if backend == "reference":
        _dispatch.check_tensor(features, "features", finite=True)
        return _dispatch.reference("pseudo_labels")(images, features, threshold=threshold, ignore_index=ignore_index,
                                                     crf=crf, crf_iterations=crf_iterations)
    masks, counts = principal_masks(features, threshold=threshold, backend=backend)
    check_ignore_index(ignore_index, int(counts.max()))
    # (B, M + 1, H, W) float32 probabilities, and the CRF's buffers of the same size
    _dispatch.check_memory((5 if crf else 1) * 4 * masks.shape[0] * (masks.shape[1] + 1) * H * W, "features",
                           f"the pseudo labels of {masks.shape[0]} images of {H}x{W} pixels with up to "
                           f"{masks.shape[1]} proposals", masks.device)
    if not crf:
        return _dispatch.kernel("mask_labels", backend)(masks, counts, (H, W), ignore_index)
    probs = _dispatch.kernel("mask_probs", backend)(masks, counts, (H, W))
    labels = _crf_argmax(images, probs, counts, crf_iterations, backend)
    return torch.where(labels == 0, torch.full_like(labels, ignore_index), labels)


def mask_labels_cpu(masks: torch.Tensor, counts: torch.Tensor, size: tuple, ignore_index: int) -> torch.Tensor:
    """C++ post-processing of the raw proposals float32 ``(B, M, h, w)`` with int64 ``counts``: median
    filter, background, log-softmax, upsampling to ``size`` fused with the arg-max -> int64 ``(B, H, W)``
    ids 1..counts[b], ``ignore_index`` for the background."""
    labels = torch.empty(masks.shape[0], *size, dtype=torch.int64)
    _dispatch.cpp().mask_labels(masks.numpy(), counts.numpy(), labels.numpy(), int(ignore_index),
                                _dispatch.num_threads())
    return labels


def mask_probs_cpu(masks: torch.Tensor, counts: torch.Tensor, size: tuple) -> torch.Tensor:
    """As :func:`mask_labels_cpu`, the upsampling fused with the softmax: float32 ``(B, M + 1, H, W)``
    probabilities for the CRF, zero beyond ``counts[b] + 1``."""
    probs = torch.empty(masks.shape[0], masks.shape[1] + 1, *size, dtype=torch.float32)
    _dispatch.cpp().mask_probs(masks.numpy(), counts.numpy(), probs.numpy(), _dispatch.num_threads())
    return probs


def _crf_argmax(images, probs, counts, iterations, backend):
    """Dense CRF (helper module primaps_fast.ops.dense_crf) per image with its own label count."""
    from primaps_fast.ops.dense_crf import dense_crf_list

    bgr = crf_images(images)
    per_image = [probs[b, : int(counts[b]) + 1].contiguous() for b in range(probs.shape[0])]
    marginals = dense_crf_list(bgr, per_image, iterations=iterations, backend=backend)
    return torch.stack([q.argmax(0) for q in marginals]).to(torch.int64)
