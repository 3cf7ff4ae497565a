"""Dense CRF (pydensecrf's mean field, Krähenbühl's "v2" code) on a batch, with the GIL released.

Semantics (docs/dense_crf.md): ``unary_from_softmax`` (clip to [1e-5, 1], -log), a Gaussian kernel on
``(x, y) / pos_sxy`` and a bilateral kernel on ``(x / bi_sxy, y / bi_sxy, c0 / bi_srgb, c1 / bi_srgb,
c2 / bi_srgb)`` (image channels in the order given), both through the permutohedral lattice with
symmetric normalisation, Potts compatibility and parallel mean-field updates.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from primaps_fast import _dispatch
from primaps_fast.common import crf_unary


def _check_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise TypeError(f"iterations: expected an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations: expected >= 0, got {iterations}")
    for name, value in (("pos_sxy", pos_sxy), ("pos_compat", pos_compat), ("bi_sxy", bi_sxy),
                        ("bi_srgb", bi_srgb), ("bi_compat", bi_compat)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a finite number > 0, got {value}")


def _check_images(images):
    _dispatch.check_tensor(images, "images", ndim=4)
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8 (B, 3, H, W), got {images.dtype}")
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")


def dense_crf_list(images: torch.Tensor, probs: Sequence[torch.Tensor], *, iterations: int = 10,
                   pos_sxy: float = 1.0, pos_compat: float = 3.0, bi_sxy: float = 67.0,
                   bi_srgb: float = 3.0, bi_compat: float = 4.0,
                   backend: str | None = None) -> list:
    """Dense CRF of each image with its own label count (the batch entry point of ``pseudo_labels``).

    Args:
        images: uint8 ``(B, 3, H, W)``; the channels enter the bilateral features in this order.
        probs: a sequence of ``B`` float tensors ``(L_b, H, W)``, ``L_b >= 1``: per-pixel probabilities
            (softmax already applied), finite. The unary is ``-log(clip(p, 1e-5, 1))``.
        iterations: mean-field iterations (>= 0; 0 returns the clipped, renormalised probabilities).
        pos_sxy, pos_compat: Gaussian kernel (pydensecrf ``addPairwiseGaussian``), > 0.
        bi_sxy, bi_srgb, bi_compat: bilateral kernel (``addPairwiseBilateral``), > 0.
        backend: None (C++ on CPU; CUDA C++ or Triton on CUDA), "cpu", "cuda", "triton" or "reference".

    Returns:
        a list of ``B`` float32 tensors ``(L_b, H, W)``: the marginals Q of pydensecrf's
        ``inference(iterations)``, on the device of ``images``.

    Raises ``ValueError`` when a lattice key does not fit in 62 bits (huge images or tiny
    ``bi_srgb``/``sxy``; pydensecrf's int16 keys silently overflow there).
    """
    _check_images(images)
    _check_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat)
    B, _, H, W = images.shape
    if isinstance(probs, torch.Tensor) or not isinstance(probs, Sequence):
        raise TypeError(f"probs: expected a sequence of {B} tensors (L_b, H, W), got {type(probs).__name__}")
    if len(probs) != B:
        raise ValueError(f"probs: expected {B} tensors (one per image), got {len(probs)}")
    for b, p in enumerate(probs):
        _dispatch.check_tensor(p, f"probs[{b}]", ndim=3, floating=True, finite=True)
        if tuple(p.shape[1:]) != (H, W):
            raise ValueError(f"probs[{b}]: expected shape (L, {H}, {W}), got {tuple(p.shape)}")
    backend = _dispatch.choose_backend(backend, images, *probs)
    params = dict(iterations=iterations, pos_sxy=float(pos_sxy), pos_compat=float(pos_compat),
                  bi_sxy=float(bi_sxy), bi_srgb=float(bi_srgb), bi_compat=float(bi_compat))
    if backend == "reference":
        return _dispatch.reference("dense_crf_list")(images, list(probs), **params)
    if backend == "cuda":
        raise _dispatch.cuda_not_wired("dense_crf")
    if backend == "triton":
        from primaps_fast.triton.dense_crf import dense_crf_triton

        return dense_crf_triton(images, [p.float() for p in probs], **params)
    return _dense_crf_cpu(images, probs, **params)


@torch.library.custom_op("primaps_fast::dense_crf", mutates_args=(), device_types="cpu")
def _dense_crf_flat(images: torch.Tensor, unary: torch.Tensor, labels: torch.Tensor, iterations: int,
                    pos_sxy: float, pos_compat: float, bi_sxy: float, bi_srgb: float,
                    bi_compat: float) -> torch.Tensor:
    """C++ kernel: uint8 ``(B, 3, H, W)`` images, float32 flat unary (each image's ``(L_b, H, W)`` in
    turn), int64 ``(B,)`` label counts ``L_b`` -> the marginals Q, laid out like ``unary``."""
    out = torch.empty_like(unary)
    _dispatch.cpp().dense_crf(images.numpy(), unary.numpy(), labels.numpy(), out.numpy(), iterations,
                              pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat, _dispatch.num_threads())
    return out


@_dense_crf_flat.register_fake
def _(images, unary, labels, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    return torch.empty_like(unary)


def _dense_crf_cpu(images, probs, *, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    labels = torch.tensor([p.shape[0] for p in probs], dtype=torch.int64)
    # unary_from_softmax in float32; one flat buffer for the whole batch (label counts differ).
    unary = torch.cat([crf_unary(p.detach()).reshape(-1) for p in probs])
    out = _dense_crf_flat(images.detach().contiguous(), unary, labels, iterations, pos_sxy, pos_compat,
                          bi_sxy, bi_srgb, bi_compat)
    H, W = images.shape[-2:]
    counts = labels.tolist()
    return [q.view(L, H, W) for q, L in zip(out.split([L * H * W for L in counts]), counts)]


def dense_crf(images: torch.Tensor, logits: torch.Tensor, *, iterations: int = 10, pos_sxy: float = 1.0,
              pos_compat: float = 3.0, bi_sxy: float = 67.0, bi_srgb: float = 3.0, bi_compat: float = 4.0,
              backend: str | None = None) -> torch.Tensor:
    """Mean-field marginals of the fully connected CRF of pydensecrf (as the official PriMaPs calls it).

    Args:
        images: uint8 ``(B, 3, H, W)``. The channels enter the bilateral features in the order given
            (the lattice is not invariant to their order; the official pipeline passes BGR).
        logits: float ``(B, L, h, w)``, ``L >= 1``, finite; upsampled bilinearly
            (``align_corners=False``) to ``(H, W)`` when ``(h, w) != (H, W)``, then softmax (float32).
        iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat, backend: as
            :func:`dense_crf_list`.

    Returns:
        float32 ``(B, L, H, W)``: pydensecrf's ``inference(iterations)`` of ``DenseCRF2D`` with
        ``unary_from_softmax(softmax(logits))``, ``addPairwiseGaussian(sxy=pos_sxy,
        compat=pos_compat)`` and ``addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, compat=bi_compat)``.
        The C++ backend reproduces pydensecrf's float32 arithmetic step by step (same lattice, same
        summation order); only ``exp``/``log`` differ in the last bits (a vectorised ``expf``, ~1 ulp),
        so marginals agree to ~1e-5.
    """
    _check_images(images)
    _dispatch.check_tensor(logits, "logits", ndim=4, floating=True, finite=True)
    if logits.shape[0] != images.shape[0]:
        raise ValueError(f"logits: batch {logits.shape[0]} does not match images batch {images.shape[0]}")
    H, W = images.shape[-2:]
    x = logits.detach().float()
    if tuple(x.shape[-2:]) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    probs = torch.softmax(x, dim=1)
    out = dense_crf_list(images, list(probs), iterations=iterations, pos_sxy=pos_sxy, pos_compat=pos_compat,
                         bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat, backend=backend)
    return torch.stack(out)
