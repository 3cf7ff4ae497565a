"""Definitions shared by the production code and the reference (``primaps_fast.reference``).

Constants of the official pipeline, the result type of ``principal_masks`` and the conversions of the
dense CRF's inputs. This module imports nothing else from the package, so the reference can import it
and still be a leaf that checks the fast paths independently (docs/design.md, "Parity").
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# ImageNet normalisation of the official transforms (``primaps_modules/transforms.py``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# principal_masks: the covariance of the remaining features is degenerate when its trace is at most
# DEGENERATE_RTOL times their mean squared norm (both in float64); the direction is then their mean.
DEGENERATE_RTOL = 1e-10

# principal_masks: at most this many proposals per image by default: mask ids 1..254, the background
# and the ignore id 255 then fit one uint8 label map (the official loop has no cap; real images give a
# handful of proposals, pure noise about one per pixel).
DEFAULT_MAX_MASKS = 254

# Dense CRF unary: probabilities are clipped to [CRF_CLIP, 1] before -log (pydensecrf.utils.unary_from_softmax).
CRF_CLIP = 1e-5


class PrincipalMasks(NamedTuple):
    """Result of ``principal_masks``."""
    masks: torch.Tensor   # float32 (B, M, h, w), values in [0, 1]; rows >= counts[b] are zero
    counts: torch.Tensor  # int64 (B,)


def crf_image(image: torch.Tensor) -> torch.Tensor:
    """The uint8 image ``(..., 3, H, W)`` the official code hands to the dense CRF, in RGB order.

    Float images are un-normalised with the ImageNet mean/std, times 255, clamped to [0, 255] and
    truncated (the official ``to_pil_image`` cast wraps out-of-range values instead of clamping: a
    deliberate difference); uint8 images are returned as they are.
    """
    if image.dtype == torch.uint8:
        return image
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    x = (image.float() * std + mean) * 255
    return x.clamp(0, 255).to(torch.uint8)


def crf_unary(probs: torch.Tensor) -> torch.Tensor:
    """``-log(clip(p, CRF_CLIP, 1))`` in float32 (pydensecrf's ``unary_from_softmax``)."""
    return -torch.log(probs.float().clamp(CRF_CLIP, 1.0))


def class_weights(prob_sums: torch.Tensor, num_pixels: int, gamma: float) -> torch.Tensor:
    """Focal-loss class weights ``(1 - mean softmax confidence) ** gamma`` in float32, from per-image
    float64 sums of the softmax ``(B, K)`` over ``num_pixels`` pixels in all (the C++ and Triton
    backends; the reference computes the same rule from the upsampled scores)."""
    mean = (prob_sums.sum(0) / num_pixels).to(torch.float32)
    return (1 - mean) ** gamma


def scaled_float32(features: torch.Tensor) -> torch.Tensor:
    """Each image of ``features`` (B, ...) times ``2**-e``, ``e`` the binary exponent of its largest
    ``|value|`` (which lands in [0.5, 1)), as float32. A power of two changes no digit (the product is
    exact in float64, then rounded once to float32, exactly for float32 and narrower inputs), so the
    proposals do not depend on the scale of the features, and the scaled values no longer underflow in
    products (tiny features) or overflow in float32 sums of squares (huge ones). Every backend applies
    it (the C++ kernel itself, in its first pass over float32 features)."""
    big = features.detach().abs().amax(dim=tuple(range(1, features.dim()))).double()
    exponent = torch.frexp(big)[1].long()  # big = mantissa * 2**exponent, 0 for an all-zero image
    half = torch.div(exponent, 2, rounding_mode="floor")
    shape = (-1,) + (1,) * (features.dim() - 1)
    one = torch.ones_like(big)
    # two float64 factors: float64 inputs can need powers beyond float64's range (2**1074)
    scaled = features.double() * torch.ldexp(one, -half).view(shape) * torch.ldexp(one, half - exponent).view(shape)
    return scaled.float()
