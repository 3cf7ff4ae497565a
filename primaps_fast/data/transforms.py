"""Image/label transforms of the official pipeline (``primaps_modules/transforms.py``).

Evaluation and pseudo-label generation: resize the shorter side to ``size`` (bilinear for images,
nearest for labels), centre crop ``size x size``, scale to [0, 1], normalise with the ImageNet mean/std.
Training (``pseudo_gen.PseudoLabelData``) adds a random horizontal flip of everything together and, for the student
view of PriMaPs-EM, photometric augmentations of the image only (Gaussian blur with sigma in
[0.1, 2], then either colour jitter (p = 0.3) or grayscale (p = 0.1), chosen with equal probability).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from primaps_fast.common import IMAGENET_MEAN, IMAGENET_STD


def _tf():
    import torchvision.transforms.functional as TF  # imported lazily: torchvision is a timm dependency

    return TF


def resize_center_crop(image, label=None, size: int = 320):
    """PIL image (and optional PIL label) -> resized (shorter side ``size``) and centre-cropped."""
    TF = _tf()
    image = TF.center_crop(TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR), [size, size])
    if label is not None:
        label = TF.center_crop(TF.resize(label, size, interpolation=TF.InterpolationMode.NEAREST), [size, size])
    return image, label


def to_normalized_tensor(image) -> torch.Tensor:
    """PIL RGB image or uint8 ``(H, W, 3)`` array -> float32 ``(3, H, W)`` with ImageNet normalisation."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: expected an RGB image, got an array of shape {array.shape}")
    return normalize(torch.from_numpy(array.copy()).permute(2, 0, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(..., 3, H, W)`` -> float32 normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: float normalised ``(..., 3, H, W)`` -> uint8 RGB (rounded, clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return ((images * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def student_augment(image: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
    """The student view of the official ``Compose(..., student_augs=True)`` on a normalised image.

    Gaussian blur (kernel 21, sigma uniform in [0.1, 2]); then with probability 1/2 colour jitter
    (applied with probability 0.3; brightness, contrast, saturation, hue 0.1) else grayscale (applied
    with probability 0.1). The official code applies these to the normalised tensor; so do we.
    """
    TF = _tf()
    import torchvision.transforms as T

    rng = rng or random
    out = TF.gaussian_blur(image, kernel_size=21, sigma=rng.uniform(0.1, 2.0))
    if rng.random() < 0.5:
        if rng.random() < 0.3:
            out = T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)(out)
    elif rng.random() < 0.1:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out
