"""Backbone features against the official featurizer, every backbone at 224, the official size and 448 px.

    python benchmarks/backbone_parity.py [--sizes 224 official 448] [--backbones NAME ...] [--pos-std 0.5]

For each backbone, a seeded state dict in the official file's layout (``tests/official_vit.py``, full
depth) is saved as a ``.pth`` and loaded through ``Backbone(..., weights=path)``; its features are
compared with the tests' plain-PyTorch official forward on one random image: max |difference|, and the
same for timm's own position-embedding resampling (what ``Backbone`` did before the official
interpolation hook). Then bf16 autocast against fp32 at the official size: relative L2 and max
|difference| of the features and the fraction of equal pseudo-label ids (with the CRF) on four
synthetic scenes. Prints a Markdown table. Random weights: real DINO features may differ in scale;
``--pos-std`` sets the position embeddings' standard deviation (0.02 is DINO's initial scale).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

from official_vit import (official_resnet50_features, official_resnet50_state_dict,  # noqa: E402
                          official_vit_features, official_vit_state_dict)

import primaps_fast  # noqa: E402
from primaps_fast.backbones import BACKBONES, Backbone  # noqa: E402
from primaps_fast.data.synthetic import make_scenes  # noqa: E402
from primaps_fast.data.transforms import normalize  # noqa: E402


def timm_resampled(bb, x):
    """The features with timm's own ``_pos_embed`` (resampling to the output size) instead of the hook."""
    model = bb.model
    hook = model.__dict__.pop("_pos_embed")
    try:
        return bb(x)
    finally:
        model._pos_embed = hook


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["224", "official", "448"])
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--pos-std", type=float, default=0.5, help="std of the random position embeddings")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp()
    print("| backbone | size | max abs diff vs official | with timm's resampling | max abs feature | "
          "bf16 rel. L2 | bf16 max diff | bf16 labels equal | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        spec = BACKBONES[name]
        resnet = spec.kind == "resnet"
        sd = official_resnet50_state_dict(0) if resnet else official_vit_state_dict(name, 0, pos_std=args.pos_std)
        path = os.path.join(tmp, name + ".pth")
        torch.save(sd, path)
        fp32, bf16 = Backbone(name, path), Backbone(name, path, precision="bf16")
        for size in args.sizes:
            S = spec.resolution if size == "official" else int(size)
            S -= S % spec.patch
            t = time.perf_counter()
            x = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(S))
            want = official_resnet50_features(sd, x) if resnet else official_vit_features(name, sd, x)
            diff = (fp32(x) - want).abs().max().item()
            old = "-" if resnet else f"{(timm_resampled(fp32, x) - want).abs().max().item():.2e}"
            cells = [name, str(S), f"{diff:.2e}", old, f"{want.abs().max().item():.2f}"]
            if size == "official":
                scenes = make_scenes(4, image_size=S, patch=spec.patch, seed=0)
                a, b = fp32(normalize(scenes.images)), bf16(normalize(scenes.images))
                same = (primaps_fast.pseudo_labels(scenes.images, a) == primaps_fast.pseudo_labels(scenes.images, b))
                cells += [f"{((a - b).norm() / a.norm()).item():.2e}", f"{(a - b).abs().max().item():.3f}",
                          f"{same.float().mean().item():.4f}"]
            else:
                cells += ["-"] * 3
            print("| " + " | ".join(cells + [f"{time.perf_counter() - t:.0f}"]) + " |", flush=True)


if __name__ == "__main__":
    main()
