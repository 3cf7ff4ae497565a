"""Synthetic scenes with SSL-like features, deterministic by seed.

Each scene is a Voronoi partition of the image into regions; every region gets a class drawn with
imbalanced (Zipf-like) frequencies. The RGB image's colour follows the class (a class colour, a
per-region brightness shift, pixel noise). Features at patch resolution imitate a self-supervised ViT:

    f_p = a * mean_dir + b * prototype[class] + c * offset[region] + smooth noise + white noise,

averaged over the pixels of each patch (so patches on boundaries mix), with weights chosen so that the
cosine between classes is about 0.2 and within a class about 0.7 (docs/design.md, "Tests and benchmarks").
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from primaps_fast.progress import progress


class Scenes(NamedTuple):
    images: torch.Tensor    # uint8 (B, 3, H, W), RGB
    labels: torch.Tensor    # int64 (B, H, W), class ids in [0, num_classes)
    features: torch.Tensor  # float32 (B, C, H // patch, W // patch)


# Squared weights of the feature components (they sum to 1): mean direction, class prototype,
# region offset, smooth noise, white noise.
_WEIGHTS = torch.tensor([0.2, 0.5, 0.1, 0.1, 0.1]).sqrt()


def make_scenes(num_images: int, *, num_classes: int = 6, image_size=320, patch: int = 8,
                dim: int = 384, regions: tuple = (6, 12), feature_norm: float = 10.0,
                texture: float = 0.0, seed: int = 0, show_progress: bool = False) -> Scenes:
    """Generate ``num_images`` scenes.

    ``image_size`` is an int or ``(H, W)``, each divisible by ``patch``; features are
    ``(dim, H // patch, W // patch)`` with norms near ``feature_norm``. ``regions`` is the inclusive
    range of Voronoi cells per image. Class prototypes are shared by all images of one call.
    ``texture`` > 0 adds fine multi-scale colour texture of that standard deviation to every pixel
    (noise fields at 1/2, 1/4 and 1/16 resolution, upsampled), as photographs of textured surfaces
    have; the default 0 leaves the scenes (and the random stream) as they were.
    ``show_progress`` shows a progress bar (a few hundred ms per 320x320 scene).
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if num_images < 1 or num_classes < 1 or dim < 1 or patch < 1:
        raise ValueError("num_images, num_classes, dim and patch must be positive")
    if not texture >= 0:
        raise ValueError(f"texture: expected >= 0, got {texture}")
    if H % patch or W % patch:
        raise ValueError(f"image_size: {(H, W)} is not divisible by patch={patch}")
    g = torch.Generator().manual_seed(seed)
    h, w = H // patch, W // patch
    mean_dir = F.normalize(torch.randn(dim, generator=g), dim=0)
    prototypes = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    palette = torch.randint(30, 226, (num_classes, 3), generator=g).float()
    freq = 1.0 / torch.arange(1, num_classes + 1).float()  # Zipf: imbalanced classes

    ys = torch.arange(H).float().view(H, 1).expand(H, W)
    xs = torch.arange(W).float().view(1, W).expand(H, W)
    images, labels, features = [], [], []
    for _ in progress(range(num_images), "synthetic scenes", unit="img", enabled=show_progress):
        n_regions = int(torch.randint(regions[0], regions[1] + 1, (1,), generator=g))
        centres = torch.rand(n_regions, 2, generator=g) * torch.tensor([H, W]).float()
        region_class = torch.multinomial(freq, n_regions, replacement=True, generator=g)
        # Voronoi cells with a wavy boundary so they are not straight-edged polygons.
        wobble = 0.04 * max(H, W) * torch.sin(xs / 13.0 + ys / 17.0)
        dist = (ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2
        region = (dist + wobble[None] * dist.sqrt()).argmin(0)  # (H, W)
        label = region_class[region]

        shift = torch.randn(n_regions, 1, generator=g) * 12.0
        rgb = palette[label] + shift[region] + torch.randn(H, W, 3, generator=g) * 6.0
        if texture:
            field = sum(F.interpolate(torch.randn(1, 3, max(1, H // s), max(1, W // s), generator=g), size=(H, W),
                                      mode="bilinear", align_corners=False)[0] for s in (2, 4, 16))
            rgb = rgb + texture / 3 ** 0.5 * field.permute(1, 2, 0)
        images.append(rgb.clamp(0, 255).to(torch.uint8).permute(2, 0, 1))
        labels.append(label)

        offsets = F.normalize(torch.randn(n_regions, dim, generator=g), dim=1)
        region_feat = (_WEIGHTS[0] * mean_dir + _WEIGHTS[1] * prototypes[region_class]
                       + _WEIGHTS[2] * offsets)  # (R, C)
        share = F.avg_pool2d(F.one_hot(region, n_regions).permute(2, 0, 1).float()[None], patch)[0]
        feat = torch.einsum("rc,rhw->chw", region_feat, share)
        smooth = F.interpolate(torch.randn(1, dim, max(1, h // 8), max(1, w // 8), generator=g),
                               size=(h, w), mode="bilinear", align_corners=False)[0]
        feat = (feat + _WEIGHTS[3] * smooth / dim ** 0.5 * 1.7
                + _WEIGHTS[4] * torch.randn(dim, h, w, generator=g) / dim ** 0.5)
        features.append(feat * feature_norm)
    return Scenes(torch.stack(images), torch.stack(labels), torch.stack(features).contiguous())
